//! Redis for Conflux: one connection holder ([`RedisConn`]) for every
//! component that talks to Redis (aggregate checkpoints, dedupe), and the
//! `redis` output.

mod command;
mod conn;
mod output;

pub use command::CommandConfig;
pub use conn::RedisConn;
pub use output::RedisOutputConfig;

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
