//! `websocket_server` input.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, MatchedPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use conflux_api::config::ByteSize;
use conflux_api::{inventory, BuildContext, BuildError, BuiltInput, InputConfig, Registration};
use governor::DefaultDirectRateLimiter;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Identity;
use crate::body::{parse, Format};
use crate::front_door::{Gate, LimitScope};
use crate::intake::{Intake, Reply};
use crate::server_config;

server_config! {
    intake;
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
        /// Largest accepted message; larger ones get a `413` reply.
        #[serde(default = "default_max_message")]
        pub max_message: ByteSize,
    }
}

fn default_max_message() -> ByteSize {
    ByteSize(1024 * 1024)
}

impl InputConfig for WebsocketServerConfig {
    const TYPE: &'static str = "websocket_server";
    fn build(self, cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        let (intake, rx) = self.intake_options().build(cx)?;
        let front = self.server_options().build(cx, LimitScope::PerConnection)?;
        let state = Arc::new(WsState { intake, gate: front.gate.clone(), max_message: self.max_message.0 as usize });
        Ok(BuiltInput::new(front.into_input(get(upgrade), state, rx, 1024, "websocket_server")))
    }
}

inventory::submit!(Registration::input::<WebsocketServerConfig>());

struct WsState {
    intake: Arc<Intake>,
    gate: Gate,
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
    let identity = match state.gate.admit(&headers, token, peer) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let path = path.as_str().to_string();
    // The transport limit sits above ours, so an oversized message gets a 413 reply rather than a dropped connection.
    let hard_limit = state.max_message.saturating_mul(2).max(64 * 1024);
    ws.max_message_size(hard_limit).on_upgrade(move |socket| serve(socket, state, identity, path))
}

async fn serve(mut socket: WebSocket, state: Arc<WsState>, identity: Identity, path: String) {
    let limiter = state.gate.connection_limiter();
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
