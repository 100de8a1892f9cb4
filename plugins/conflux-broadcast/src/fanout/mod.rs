//! Several instances, one channel space: with `fanout`, an instance does
//! not publish into its own hub but appends to a shared bus (a Redis
//! stream or a NATS JetStream stream), and every instance, itself
//! included, follows the bus into its hub. The sequence is the bus's own
//! (the Redis entry id, the JetStream stream sequence), given where the
//! event was published, so every instance numbers an event alike and a
//! client that moves from one instance to another resumes by its cursor.
//!
//! An event is acknowledged once the bus holds it. A follower that loses
//! the bus reconnects with backoff and reads on after the last sequence it
//! saw, so nothing is missed while the bus still holds what came meanwhile.
//! A starting instance replays what the bus holds to rebuild its channels.

mod nats;
mod redis;

use std::sync::Arc;
use std::time::Duration as StdDuration;

use conflux_api::{Backoff, BuildContext, BuildError, Event, Payload, PluginError};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::frame;
use crate::hub::Hub;
use crate::output::Routed;

/// The bus instances share.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum FanoutConfig {
    /// A Redis stream.
    Redis(redis::RedisBusConfig),
    /// A NATS JetStream stream.
    Nats(nats::NatsBusConfig),
}

impl FanoutConfig {
    pub fn build(self, cx: &BuildContext) -> Result<Fanout, BuildError> {
        Ok(match self {
            FanoutConfig::Redis(config) => Fanout::Redis(Box::new(redis::RedisBus::build(config, cx)?)),
            FanoutConfig::Nats(config) => Fanout::Nats(Box::new(nats::NatsBus::build(config, cx)?)),
        })
    }
}

/// The bus of one broadcast output.
pub enum Fanout {
    Redis(Box<redis::RedisBus>),
    Nats(Box<nats::NatsBus>),
}

impl Fanout {
    /// The epoch every instance on this bus shares: named after the bus's stream.
    pub fn epoch(&self) -> String {
        let name = match self {
            Fanout::Redis(bus) => bus.name(),
            Fanout::Nats(bus) => bus.name(),
        };
        // FNV-1a: short, and stable across processes and versions.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        format!("bus{:08x}", hash as u32)
    }

    pub async fn connect(&self) -> Result<(), PluginError> {
        match self {
            Fanout::Redis(bus) => bus.connect().await,
            Fanout::Nats(bus) => bus.connect().await,
        }
    }

    /// Appends the events to the bus, in order; returns once the bus holds them all.
    pub async fn publish(&self, routed: &[(&Event, Routed)]) -> Result<(), PluginError> {
        if routed.is_empty() {
            return Ok(());
        }
        match self {
            Fanout::Redis(bus) => bus.publish(routed).await,
            Fanout::Nats(bus) => bus.publish(routed).await,
        }
    }

    /// Reads the bus into `hub` until `stop`.
    pub async fn follow(self: Arc<Self>, hub: Arc<Hub>, stop: CancellationToken) {
        let mut follower = Follower { epoch: hub.epoch().to_string(), hub, first: true, failures: 0 };
        match &*self {
            Fanout::Redis(bus) => bus.follow(&mut follower, &stop).await,
            Fanout::Nats(bus) => bus.follow(&mut follower, &stop).await,
        }
    }
}

/// One event as the bus carries it.
pub struct BusEntry<'a> {
    pub channel: &'a str,
    pub kind: &'a str,
    pub key: Option<&'a str>,
    pub data: &'a [u8],
}

/// Applies bus entries to the hub, and paces reconnects.
pub struct Follower {
    hub: Arc<Hub>,
    epoch: String,
    first: bool,
    failures: u32,
}

impl Follower {
    /// Publishes one entry in the hub under the sequence the bus gave it.
    pub fn apply(&mut self, seq: u64, entry: BusEntry<'_>) {
        if self.first {
            // What the bus no longer holds, before its first entry, is unknown here.
            self.hub.watch_after(seq.saturating_sub(1));
            self.first = false;
        }
        let Ok(data) = Payload::from_json(entry.data) else {
            tracing::debug!(seq, "a fan-out entry whose data is not JSON; skipped");
            return;
        };
        let BusEntry { channel, kind, key, .. } = entry;
        let epoch = &self.epoch;
        self.hub.publish_at(seq, channel, key.map(str::to_string), |seq| {
            frame::update(epoch, seq, kind, channel, key, &data)
        });
    }

    /// The bus answered: later failures start the backoff over.
    pub fn healthy(&mut self) {
        self.failures = 0;
    }

    /// Waits before the next attempt after a failure; `false` when stopped meanwhile.
    pub async fn retry(&mut self, bus: &str, error: &str, stop: &CancellationToken) -> bool {
        self.failures += 1;
        let wait = Backoff::new(StdDuration::from_millis(100), StdDuration::from_secs(5)).wait(self.failures);
        tracing::warn!(bus, error = %error, retry_in = ?wait, "fan-out bus read failed");
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}
