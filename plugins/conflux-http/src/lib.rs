//! HTTP and WebSocket intake: `http_server` and `websocket_server` inputs.
//!
//! Both stand on one front door ([`front_door`]: address, paths, TLS, CORS,
//! authentication by API keys or JWT, token-bucket rate limits) and one
//! intake ([`intake`]): body size limits, optional schema checks, and a
//! bounded queue into the pipeline whose fullness turns into
//! `503` + `Retry-After` instead of unbounded memory. With `ack: sync` the
//! answer waits for the request's acknowledgement token, so `200` means every
//! output confirmed.

// `auth` and `body` are public for the fuzz targets (fuzz/), not an API.
#[doc(hidden)]
pub mod auth;
#[doc(hidden)]
pub mod body;
// The front door is public for servers in other crates (the `broadcast`
// output): its options macro, gate and accept loop are shared, not an API.
#[doc(hidden)]
pub mod connections;
#[doc(hidden)]
pub mod front_door;
mod http_server;
#[doc(hidden)]
pub mod intake;
#[doc(hidden)]
pub mod server;
mod websocket;

pub use auth::{ApiKeysConfig, AuthConfig, JwtConfig, Secret};
pub use connections::ConnectionLimits;
pub use intake::{AckMode, PartialMode, RateLimitConfig};
pub use server::{CorsConfig, TlsConfig};

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
