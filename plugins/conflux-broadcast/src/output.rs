//! The `broadcast` output: events published on channels, served to
//! browsers and dashboards over WebSocket and Server-Sent Events from one
//! listener (the HTTP inputs' front door: TLS, CORS, connection limits,
//! API keys or JWT).
//!
//! An event is acknowledged once it is in its channel's history (or, with
//! `fanout`, on the shared bus): delivery to each client is best effort
//! within the bounds below, and a client that missed something resumes
//! from its cursor.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use conflux_api::config::{ByteSize, Duration};
use conflux_api::template::{Template, TemplateFields};
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, Event, FailedEvent, Output, OutputConfig, PluginError,
    Registration,
};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use conflux_api::component::RESULT_KEY_META;

use crate::channel::ChannelLimits;
use crate::fanout::{Fanout, FanoutConfig};
use crate::hub::{Hub, SlowCounts};
use crate::permit::Pattern;
use crate::queue::SlowClient;
use crate::server::{self, Served, ServerSettings};

conflux_http::server_config! {
    /// Publishes events on channels and serves them over WebSocket and
    /// Server-Sent Events on one address: `GET <path>?channels=a,b` (or
    /// `<path>/<channel>`) upgrades to a WebSocket when asked, else streams
    /// SSE. Each channel keeps its latest event per key (a subscriber first
    /// gets `initial_state`, then every update after it, with no gap and no
    /// duplicate) and its last events (a client that reconnects with
    /// `?since=<cursor>` or `Last-Event-ID` gets what it missed). With
    /// `auth`, a client reads only the channels its token allows.
    #[derive(Debug, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct BroadcastConfig {
        /// Channel each event is published on, a template (`restaurant:{{ data.restaurantId }}`).
        pub channel: String,
        /// The frame's `type` (a template; default `update`): `metrics_update` for
        /// window results, `{{ type }}` to pass the event's own.
        #[serde(default = "default_message_type")]
        pub message_type: String,
        /// The latest event per key kept for `initial_state`.
        #[serde(default)]
        pub state: StateConfig,
        /// Events each channel keeps for clients that resume (default 1000).
        #[serde(default = "default_history")]
        pub history: usize,
        /// Oldest event a channel keeps for resuming (default 5m).
        #[serde(default = "default_history_age")]
        pub history_age: Duration,
        /// Frames waiting for one client, in bytes (default 1MiB); past it `slow_client` decides.
        #[serde(default = "default_max_queue_bytes")]
        pub max_queue_bytes: ByteSize,
        /// What a client whose queue is full costs: `disconnect` (it reconnects and
        /// resumes), `drop_oldest`, or `conflate` (only the latest update per key is
        /// kept, so a slow dashboard still converges to the truth). Default `disconnect`.
        #[serde(default)]
        pub slow_client: SlowClientConfig,
        /// Ping (WebSocket) or comment (SSE) interval (default 30s).
        #[serde(default = "default_heartbeat")]
        pub heartbeat: Duration,
        /// A WebSocket client that sends nothing, not even a pong, for this long is
        /// closed (default three heartbeats).
        #[serde(default)]
        pub client_timeout: Option<Duration>,
        /// Channels one connection may subscribe to (default 64).
        #[serde(default = "default_max_subscriptions")]
        pub max_subscriptions: usize,
        /// Channel patterns every admitted client may read, filled from its token's
        /// claims (`restaurant:{claims.restaurant_id}`); `*` matches any run. Without
        /// `auth` every channel is open.
        #[serde(default)]
        pub allow: Vec<String>,
        /// Claim listing more patterns the token's holder may read (`["restaurant:*"]`
        /// for an admin). Default `channels`.
        #[serde(default = "default_channels_claim")]
        pub channels_claim: String,
        /// Cookie that may carry the token (default `conflux_token`).
        #[serde(default = "default_token_cookie")]
        pub token_cookie: String,
        /// A WebSocket that brought no credentials must send `{"type": "auth", "token": …}`
        /// within this time (default 10s).
        #[serde(default = "default_auth_timeout")]
        pub auth_timeout: Duration,
        /// Share one channel space with other instances through a bus.
        #[serde(default)]
        pub fanout: Option<FanoutConfig>,
    }
}

/// Which key an event's state is kept under.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// A template (`{{ data.zone }}`); default the aggregate result key
    /// (`meta.result_key`), so each group's window is one entry. Events
    /// without a key are history only.
    #[serde(default)]
    pub key: Option<String>,
}

/// How a full client queue is handled.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SlowClientConfig {
    #[default]
    Disconnect,
    DropOldest,
    Conflate,
}

fn default_message_type() -> String {
    "update".into()
}
fn default_history() -> usize {
    1000
}
fn default_history_age() -> Duration {
    Duration::from_secs(300)
}
fn default_max_queue_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(30)
}
fn default_max_subscriptions() -> usize {
    64
}
fn default_channels_claim() -> String {
    "channels".into()
}
fn default_token_cookie() -> String {
    "conflux_token".into()
}
fn default_auth_timeout() -> Duration {
    Duration::from_secs(10)
}

fn template(text: &str, path: &str) -> Result<Template, BuildError> {
    Template::parse(text).map_err(|e| BuildError::at([path], e.to_string()))
}

impl OutputConfig for BroadcastConfig {
    const TYPE: &'static str = "broadcast";

    fn build(self, cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        let channel = template(&self.channel, "channel")?;
        let kind = template(&self.message_type, "message_type")?;
        let key = self.state.key.as_deref().map(|k| template(k, "key")).transpose()?;
        if self.history == 0 {
            return Err(BuildError::at(["history"], "keep at least one event"));
        }
        if self.heartbeat.0 < StdDuration::from_millis(100) {
            return Err(BuildError::at(["heartbeat"], "at least 100ms"));
        }
        let allow = self
            .allow
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Pattern::parse(p).map_err(|e| BuildError::at(["allow".to_string(), i.to_string()], e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let front = self.server_options().build(cx, conflux_http::front_door::LimitScope::PerClient)?;
        let slow = SlowCounts {
            dropped: cx.metrics.counter("broadcast_frames_dropped", "Frames dropped from slow clients' queues."),
            conflated: cx.metrics.counter(
                "broadcast_updates_conflated",
                "Queued updates replaced by a newer one of the same key (slow clients).",
            ),
            disconnected: cx
                .metrics
                .counter("broadcast_slow_clients_disconnected", "Connections closed because their queue was full."),
        };
        let limits = ChannelLimits { history: self.history, history_age: self.history_age.0, max_keys: 10_000 };
        let fanout = self.fanout.map(|f| f.build(cx)).transpose()?;
        let epoch = match &fanout {
            Some(bus) => bus.epoch(),
            None => local_epoch(),
        };
        let hub = Arc::new(Hub::new(limits, epoch, slow));
        let settings = ServerSettings {
            max_queue_bytes: self.max_queue_bytes.0 as usize,
            slow_client: match self.slow_client {
                SlowClientConfig::Disconnect => SlowClient::Disconnect,
                SlowClientConfig::DropOldest => SlowClient::DropOldest,
                SlowClientConfig::Conflate => SlowClient::Conflate,
            },
            heartbeat: self.heartbeat.0,
            client_timeout: self.client_timeout.map_or(self.heartbeat.0 * 3, |t| t.0),
            max_subscriptions: self.max_subscriptions.max(1),
            allow,
            channels_claim: self.channels_claim,
            token_cookie: self.token_cookie,
            auth_timeout: self.auth_timeout.0,
        };
        let stop = CancellationToken::new();
        let served = server::build(front, hub.clone(), settings, stop.clone(), cx);
        let fields = TemplateFields::new([&channel, &kind].into_iter().chain(key.as_ref()));
        Ok(Box::new(BroadcastOutput {
            hub,
            channel,
            kind,
            key,
            fields,
            served,
            fanout: fanout.map(Arc::new),
            stop,
            tasks: Vec::new(),
            published: cx.metrics.counter("broadcast_events_published", "Events appended to a channel's history."),
        }))
    }
}

inventory::submit!(Registration::output::<BroadcastConfig>());

/// A process's own epoch: its start time, so cursors from an earlier run
/// are told apart (base 36 keeps it short).
fn local_epoch() -> String {
    let mut n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut text = Vec::new();
    while n > 0 {
        text.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
    }
    text.reverse();
    String::from_utf8(text).unwrap_or_default()
}

/// Where one event goes, rendered from it.
pub struct Routed {
    pub channel: String,
    pub kind: String,
    pub key: Option<String>,
}

struct BroadcastOutput {
    hub: Arc<Hub>,
    channel: Template,
    kind: Template,
    key: Option<Template>,
    fields: TemplateFields,
    served: Served,
    fanout: Option<Arc<Fanout>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    published: conflux_api::metrics::Counter,
}

impl BroadcastOutput {
    fn route(&self, event: &Event) -> Result<Routed, String> {
        let read = self.fields.read(event);
        let channel = self.channel.render_with(event, &read).map_err(|e| format!("channel: {e}"))?;
        if channel.is_empty() || channel.len() > server::MAX_CHANNEL_LEN {
            return Err(format!("channel: {} bytes (1 to {} allowed)", channel.len(), server::MAX_CHANNEL_LEN));
        }
        let kind = self.kind.render_with(event, &read).map_err(|e| format!("message_type: {e}"))?;
        let key = match &self.key {
            Some(key) => Some(key.render_with(event, &read).map_err(|e| format!("state key: {e}"))?),
            None => event.meta.get(RESULT_KEY_META).and_then(|v| {
                use conflux_api::sonic_rs::JsonValueTrait;
                v.as_str().map(str::to_string)
            }),
        };
        Ok(Routed { channel, kind, key })
    }
}

#[async_trait]
impl Output for BroadcastOutput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        if !self.tasks.is_empty() {
            return Ok(());
        }
        if let Some(bus) = &self.fanout {
            bus.connect().await?;
            self.tasks.push(tokio::spawn(bus.clone().follow(self.hub.clone(), self.stop.clone())));
        }
        let task = self.served.start().await?;
        self.tasks.push(task);
        Ok(())
    }

    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let mut refused = Vec::new();
        let mut routed = Vec::with_capacity(batch.len());
        for (index, event) in batch.iter().enumerate() {
            match self.route(event) {
                Ok(r) => routed.push((event, r)),
                Err(reason) => refused.push(FailedEvent::new(index, reason)),
            }
        }
        match &self.fanout {
            Some(bus) => bus.publish(&routed).await?,
            None => {
                let epoch = self.hub.epoch();
                self.hub.publish_all(routed.iter().map(|(event, r)| {
                    (r.channel.as_str(), r.key.clone(), move |seq| {
                        crate::frame::update(epoch, seq, &r.kind, &r.channel, r.key.as_deref(), &event.data)
                    })
                }));
            }
        }
        self.published.inc_by(routed.len() as u64);
        if refused.is_empty() {
            Ok(())
        } else {
            Err(PluginError::Partial(refused))
        }
    }

    async fn close(&mut self) -> Result<(), PluginError> {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            if tokio::time::timeout(StdDuration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
        Ok(())
    }
}
