//! The `aggregate` stage: metrics per group over event-time windows.
//!
//! Windows close when the watermark (highest event time seen minus
//! `allowed_lateness`) passes their end, or after `idle_timeout` of silence;
//! later events go to the `late` port. Every accumulator is mergeable, which
//! is what sliding windows are built from.

mod accumulator;
mod config;
mod stage;
mod window;

pub use config::AggregateConfig;

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
