//! PostgreSQL and TimescaleDB for Conflux: the `postgres` output.
//!
//! `sql` builds the statements once from the options, `encode` turns typed
//! rows into binary COPY data or UNNEST arrays, `output` writes a batch per
//! transaction and isolates refused rows by bisection under savepoints,
//! `offsets` keeps `exactly_once` positions in the same transaction,
//! `timescale` makes the table a hypertable with retention and rollups
//! (continuous aggregates), or their plain-PostgreSQL fallbacks.

mod encode;
mod offsets;
mod output;
mod sql;
mod timescale;

pub use output::{Mode, PostgresOutputConfig};
pub use timescale::{AllRows, HypertableConfig, RollupConfig, RollupMetric};

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
