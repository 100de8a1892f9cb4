//! Live delivery for Conflux: the `broadcast` output, serving channels to
//! browsers and dashboards over WebSocket and Server-Sent Events.
//!
//! The parts that hold no socket: `channel` (a channel's bounded history
//! and latest event per key, and what a subscriber gets first:
//! `initial_state` at sequence N, or what it missed since its cursor),
//! `queue` (a client's bounded queue and what a slow client costs:
//! disconnect, drop the oldest, or conflate to the latest per key),
//! `permit` (which channels a client may read, from the patterns its
//! token's claims fill in), `hub` (the channel space: one sequence and one
//! lock, so a subscriber's start and the updates after it meet with no gap
//! and no duplicate), `frame` (the wire format, encoded once per event).
//! Then the parts that do: `server` (the listener, sessions, auth),
//! `fanout` (one channel space across instances through a Redis stream),
//! `output` (the component).
//!
//! Frames are encoded once and shared (`Bytes`): every receiver of an
//! event holds the same buffer.

pub mod channel;
mod fanout;
pub mod frame;
pub mod hub;
mod output;
pub mod permit;
pub mod queue;
mod server;

pub use channel::{Channel, ChannelLimits, Entry, Resume};
pub use hub::{Hub, SlowCounts, Subscriber};
pub use output::BroadcastConfig;
pub use permit::{Pattern, PatternError, Permit};
pub use queue::{ClientQueue, Pushed, Queued, SlowClient};

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
