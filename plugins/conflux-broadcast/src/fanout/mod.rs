//! Several instances, one channel space: with `fanout`, an instance does
//! not publish into its own hub but appends to a shared bus (a Redis
//! stream or a NATS JetStream stream), and every instance, itself
//! included, follows the bus into its hub. The sequence is the bus's own
//! (the Redis entry id, the JetStream stream sequence), given where the
//! event was published, so every instance numbers an event alike and a
//! client that moves from one instance to another resumes by its cursor.
//!
//! An event is acknowledged once the bus holds it, and the bus holds it
//! once however often its write was retried (see [`Outgoing`]). A follower that loses
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
        let bus = match self {
            FanoutConfig::Redis(config) => Bus::Redis(Box::new(redis::RedisBus::build(config, cx)?)),
            FanoutConfig::Nats(config) => Bus::Nats(Box::new(nats::NatsBus::build(config, cx)?)),
        };
        Ok(Fanout { bus, publisher: format!("{:016x}", fastrand::u64(..)) })
    }
}

/// The bus of one broadcast output.
pub struct Fanout {
    bus: Bus,
    /// Names this process on the bus: random per start.
    publisher: String,
}

enum Bus {
    Redis(Box<redis::RedisBus>),
    Nats(Box<nats::NatsBus>),
}

impl Fanout {
    /// The epoch every instance on this bus shares: named after the bus's stream.
    pub fn epoch(&self) -> String {
        let name = match &self.bus {
            Bus::Redis(bus) => bus.name(),
            Bus::Nats(bus) => bus.name(),
        };
        // FNV-1a: short, and stable across processes and versions.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        format!("bus{:08x}", hash as u32)
    }

    pub async fn connect(&self) -> Result<(), PluginError> {
        match &self.bus {
            Bus::Redis(bus) => bus.connect().await,
            Bus::Nats(bus) => bus.connect().await,
        }
    }

    /// Appends the events to the bus, in order, once however often a write
    /// is retried; returns once the bus holds them all.
    pub async fn publish(&self, routed: &[(&Event, Routed)]) -> Result<(), PluginError> {
        if routed.is_empty() {
            return Ok(());
        }
        let batch = Outgoing::new(&self.publisher, routed);
        match &self.bus {
            Bus::Redis(bus) => bus.publish(&batch).await,
            Bus::Nats(bus) => bus.publish(&batch).await,
        }
    }

    /// Reads the bus into `hub` until `stop`.
    pub async fn follow(self: Arc<Self>, hub: Arc<Hub>, stop: CancellationToken) {
        let mut follower = Follower { epoch: hub.epoch().to_string(), hub, first: true, failures: 0 };
        match &self.bus {
            Bus::Redis(bus) => bus.follow(&mut follower, &stop).await,
            Bus::Nats(bus) => bus.follow(&mut follower, &stop).await,
        }
    }
}

/// One write batch as the bus gets it: each event's JSON, and a name for
/// the batch that is the same on every retry of it. A write whose reply was
/// lost (the bus went away, or answered late) is retried by the engine; the
/// bus refuses what it already holds under that name (the Redis script's
/// list of recent batches, JetStream's `Nats-Msg-Id`), so it lands once.
/// The name hashes the publisher with each event's channel, type, key, data
/// and arrival time: two batches with equal payloads still differ.
pub struct Outgoing<'a> {
    pub publisher: &'a str,
    pub token: String,
    pub events: Vec<(&'a Routed, bytes::Bytes)>,
}

impl<'a> Outgoing<'a> {
    fn new(publisher: &'a str, routed: &'a [(&Event, Routed)]) -> Outgoing<'a> {
        use std::hash::Hasher;
        // SipHash with fixed keys: the same batch hashes alike within this
        // process, which is the only one that names batches `publisher`.
        let mut hash = std::hash::DefaultHasher::new();
        let events = routed
            .iter()
            .map(|(event, r)| {
                let mut json = Vec::with_capacity(event.data.json_len());
                event.data.write_json(&mut json);
                for part in [r.channel.as_bytes(), r.kind.as_bytes(), r.key.as_deref().unwrap_or("").as_bytes(), &json]
                {
                    hash.write_usize(part.len());
                    hash.write(part);
                }
                hash.write_i64(event.ingest_time.0);
                (r, bytes::Bytes::from(json))
            })
            .collect();
        Outgoing { publisher, token: format!("{:016x}", hash.finish()), events }
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
