//! Live delivery for Conflux, the parts that hold no socket: `channel`
//! (a channel's sequence, bounded history and latest event per key, and
//! what a subscriber gets first: `initial_state` at sequence N, or what it
//! missed since its cursor), `queue` (a client's bounded queue and what a
//! slow client costs: disconnect, drop the oldest, or conflate to the
//! latest per key), `permit` (which channels a client may read, from the
//! patterns its token's claims fill in), `hub` (the channel space of one
//! server: publish and subscribe under one lock per channel, so a
//! subscriber's start and the updates after it meet with no gap and no
//! duplicate).
//!
//! Frames are encoded once and shared (`Bytes`): every receiver of an
//! event holds the same buffer.

pub mod channel;
pub mod hub;
pub mod permit;
pub mod queue;

pub use channel::{Channel, ChannelLimits, Entry, Resume};
pub use hub::{Hub, SlowCounts, Start, Subscriber};
pub use permit::{Pattern, PatternError, Permit};
pub use queue::{ClientQueue, Pushed, Queued, SlowClient};
