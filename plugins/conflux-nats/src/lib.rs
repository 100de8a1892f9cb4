//! NATS: the `nats` input (core subjects, optionally in a queue group, or a
//! JetStream durable pull consumer acknowledged once the pipeline is done
//! with each message) and the `nats` output (core publish, or JetStream
//! publish confirmed by the server).

mod cumulative;
mod input;
mod output;

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}

fn default_url() -> String {
    "nats://127.0.0.1:4222".into()
}
