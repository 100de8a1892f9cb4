//! PostgreSQL and TimescaleDB for Conflux: the `postgres` output.
//!
//! `sql` builds the statements once from the options, `encode` turns typed
//! rows into binary COPY data or UNNEST arrays, `output` writes a batch per
//! transaction and isolates refused rows by bisection.

mod encode;
mod output;
mod sql;

pub use output::{Mode, PostgresOutputConfig};

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
