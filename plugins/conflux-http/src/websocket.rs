//! `websocket_server` input.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, MatchedPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use conflux_api::config::{ByteSize, Duration};
use conflux_api::{inventory, BuildContext, BuildError, BuiltInput, InputConfig, Registration};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, AuthConfig, Identity};
use crate::body::{parse, Format};
use crate::connections::ConnectionLimits;
use crate::http_server::{admit, build_common, Buckets, Paths};
use crate::intake::{AckMode, Intake, Limiter, PartialMode, RateLimitConfig, Reply};
use crate::server::{Listen, QueueInput, TlsConfig};

/// Receives events over WebSocket: each text (or binary) message holds a
/// JSON object or an array of objects and becomes one batch.
///
/// Every message gets a JSON reply, in order, with its 1-based `seq` on the
/// connection and an HTTP-like `status`: `202`/`200` with `accepted` (per
/// `ack`), `400` malformed (with `elements`), `413` over `max_message`, `422`
/// schema violations, `429` over the per-connection rate (with
/// `retry_after`), `502`/`503`/`504` as for `http_server`. Authentication
/// happens at the upgrade (`401`/`403`), from headers or a `?token=` query
/// parameter (a JWT or an API key), since browsers cannot set headers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebsocketServerConfig {
    /// Address to listen on, such as `0.0.0.0:3000`.
    pub address: String,
    /// Path (or list of paths) accepting WebSocket upgrades.
    #[serde(default)]
    pub path: Paths,
    /// When to reply (default `async`): on queueing (`async`) or after every output confirmed (`sync`).
    #[serde(default)]
    pub ack: AckMode,
    /// Largest accepted message; larger ones get a `413` reply.
    #[serde(default = "default_max_message")]
    pub max_message: ByteSize,
    /// How long a message may wait for room in the pipeline before a `503` reply (default 1s).
    #[serde(default)]
    pub queue_timeout: Option<Duration>,
    /// With `ack: sync`, how long to wait for the outputs before a `504` reply (default 30s).
    #[serde(default)]
    pub ack_timeout: Option<Duration>,
    /// Messages queued ahead of the pipeline, all connections together.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Most message bytes whose events are in the pipeline (queued or not
    /// yet confirmed), all connections together; past it a `503` reply.
    #[serde(default = "crate::http_server::default_max_queue_bytes")]
    pub max_queue_bytes: ByteSize,
    /// Timeouts and the connection limit that keep slow or idle clients
    /// from holding the server (`idle_timeout` does not close an open WebSocket).
    #[serde(default)]
    pub connections: ConnectionLimits,
    /// Authentication at the upgrade; unset accepts anyone.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Token bucket per connection (`per_connection: 50/s`); failed credentials at the upgrade are charged to the IP address.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// JSON Schema file events must match, else a `422` reply.
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// With `schema`, whether a message with some invalid events is refused whole with `422` or its
    /// valid events accepted, the invalid ones listed in the reply (default `reject_all`).
    #[serde(default)]
    pub partial: PartialMode,
    /// Serve `wss://`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_max_message() -> ByteSize {
    ByteSize(1024 * 1024)
}

fn default_queue() -> usize {
    256
}

impl InputConfig for WebsocketServerConfig {
    const TYPE: &'static str = "websocket_server";
    fn build(self, cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        let common = build_common(
            cx,
            self.auth.as_ref(),
            None,
            self.schema.as_ref(),
            self.tls.as_ref(),
            self.queue,
            (self.ack, self.partial),
            (self.queue_timeout, self.ack_timeout),
            self.max_queue_bytes,
        )?;
        let quota = self.rate_limit.as_ref().map(RateLimitConfig::quota).transpose()?;
        let state = Arc::new(WsState {
            intake: common.intake,
            auth: common.auth,
            quota,
            failures: quota.map(|q| Arc::new(Limiter::new(q))),
            max_message: self.max_message.0 as usize,
        });
        let mut app = Router::new();
        for path in self.path.list() {
            if !path.starts_with('/') {
                return Err(BuildError::at(["path"], "paths must start with `/`"));
            }
            app = app.route(&path, get(upgrade));
        }
        Ok(BuiltInput::new(QueueInput {
            listen: Listen { address: self.address, tls: common.tls, limiter: None, limits: self.connections },
            app: Some(app.with_state(state)),
            rx: common.rx,
            max_batch: 1024,
            stop: CancellationToken::new(),
            task: None,
            kind: "websocket_server",
        }))
    }
}

inventory::submit!(Registration::input::<WebsocketServerConfig>());

struct WsState {
    intake: Arc<Intake>,
    auth: Option<Arc<Auth>>,
    quota: Option<Quota>,
    /// Failed credentials at the upgrade, per caller address (as `http_server` charges them).
    failures: Option<Arc<Limiter>>,
    max_message: usize,
}

async fn upgrade(
    State(state): State<Arc<WsState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: MatchedPath,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let token = query.get("token").or_else(|| query.get("api_key")).map(String::as_str);
    let identity = match admit(
        state.auth.as_deref(),
        Buckets { failures: state.failures.as_deref(), clients: None },
        &headers,
        token,
        peer,
    ) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let path = path.as_str().to_string();
    // The transport limit sits above ours, so an oversized message gets a 413 reply rather than a dropped connection.
    let hard_limit = state.max_message.saturating_mul(2).max(64 * 1024);
    ws.max_message_size(hard_limit).on_upgrade(move |socket| serve(socket, state, identity, path))
}

async fn serve(mut socket: WebSocket, state: Arc<WsState>, identity: Identity, path: String) {
    let limiter: Option<DefaultDirectRateLimiter> = state.quota.map(RateLimiter::direct);
    let mut seq: u64 = 0;
    while let Some(message) = socket.recv().await {
        let bytes = match message {
            Ok(Message::Text(text)) => axum::body::Bytes::from(text),
            Ok(Message::Binary(bytes)) => bytes,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        seq += 1;
        let reply = handle(&state, limiter.as_ref(), &identity, &path, &bytes).await;
        let mut body = reply.body;
        body["seq"] = json!(seq);
        body["status"] = json!(reply.status.as_u16());
        if let Some(secs) = reply.retry_after {
            body["retry_after"] = json!(secs);
        }
        if socket.send(Message::Text(body.to_string().into())).await.is_err() {
            break;
        }
    }
}

async fn handle(
    state: &WsState,
    limiter: Option<&DefaultDirectRateLimiter>,
    identity: &Identity,
    path: &str,
    bytes: &[u8],
) -> Reply {
    use governor::clock::{Clock, DefaultClock};
    if let Some(limiter) = limiter {
        if let Err(not_until) = limiter.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Reply::retry(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded", wait.as_secs() + 1);
        }
    }
    if bytes.len() > state.max_message {
        return Reply::error(StatusCode::PAYLOAD_TOO_LARGE, format!("message exceeds {} bytes", state.max_message));
    }
    match parse(Format::Json, bytes) {
        Ok(payloads) => state.intake.submit(payloads, bytes.len(), identity, path).await,
        Err(bad) => {
            let mut reply = Reply::error(StatusCode::BAD_REQUEST, bad.reason);
            if !bad.elements.is_empty() {
                reply.body["elements"] = serde_json::to_value(&bad.elements).unwrap_or_default();
            }
            reply
        }
    }
}
