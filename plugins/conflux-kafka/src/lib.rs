//! Kafka through rdkafka: the `kafka` input commits offsets only for events
//! the pipeline acknowledged, in order per partition; the `kafka` output
//! acknowledges events once their delivery reports arrive.

mod input;
mod output;
mod tracker;

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
