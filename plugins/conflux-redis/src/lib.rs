//! Redis for Conflux: one connection holder ([`RedisConn`]) for every
//! component that talks to Redis (aggregate checkpoints, dedupe), the
//! `redis` output, and the `redis` input (streams in a consumer group, or
//! pub/sub).

mod command;
mod conn;
mod input;
mod output;

pub use command::CommandConfig;
pub use conn::RedisConn;
pub use input::RedisInputConfig;
pub use output::RedisOutputConfig;

/// Reading `XREAD`/`XREADGROUP` replies and turning entry ids into positions,
/// for other crates that follow a stream (the broadcast output's fan-out bus).
pub mod streams {
    pub use crate::input::entries::{offset, read_reply, Entry, StreamEntries};
}

/// The `url` of the Redis input and output when none is given.
fn default_url() -> String {
    "redis://127.0.0.1:6379".into()
}

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
