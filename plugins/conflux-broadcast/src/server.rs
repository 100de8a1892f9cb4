//! The listener: one path answers both WebSocket (when the request asks
//! to upgrade) and Server-Sent Events. A connection is admitted by the
//! front door's gate, gets a [`Permit`] from its token's claims, and
//! subscribes by path (`<path>/<channel>`), query (`?channels=a,b`) or, on
//! a WebSocket, by message. What it may not read it never receives: a
//! subscription is checked before anything of the channel is queued.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use conflux_api::metrics::{Counter, Gauge};
use conflux_api::{BuildContext, PluginError};
use conflux_http::auth::Identity;
use conflux_http::front_door::{FrontDoor, Gate};
use conflux_http::server::{error, Listen};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::frame::{self, Cursor};
use crate::hub::{Hub, Subscriber};
use crate::permit::{Pattern, Permit};
use crate::queue::SlowClient;

/// Longest channel name accepted from a client or rendered from an event.
pub const MAX_CHANNEL_LEN: usize = 256;

/// Close codes a client can act on (4000-4999 are the application's).
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
const CLOSE_UNAUTHORIZED: u16 = 4003;
const CLOSE_TOO_SLOW: u16 = 4008;
const CLOSE_TIMEOUT: u16 = 4009;

/// The output's options that shape each connection.
pub struct ServerSettings {
    pub max_queue_bytes: usize,
    pub slow_client: SlowClient,
    pub heartbeat: StdDuration,
    pub client_timeout: StdDuration,
    pub max_subscriptions: usize,
    pub allow: Vec<Pattern>,
    pub channels_claim: String,
    pub token_cookie: String,
    pub auth_timeout: StdDuration,
}

struct Stats {
    connections: Gauge,
    subscriptions: Gauge,
    frames_sent: Counter,
    denied: Counter,
}

struct Shared {
    hub: Arc<Hub>,
    gate: Gate,
    settings: ServerSettings,
    stats: Stats,
    stop: CancellationToken,
}

/// The server, built and not yet listening.
pub struct Served {
    app: axum::Router,
    listen: Listen,
    stop: CancellationToken,
}

impl Served {
    /// Listens until the `stop` it was built with; open connections close then too.
    pub async fn start(&self) -> Result<JoinHandle<()>, PluginError> {
        self.listen.start(self.app.clone(), self.stop.clone(), "broadcast").await
    }
}

pub fn build(
    front: FrontDoor,
    hub: Arc<Hub>,
    settings: ServerSettings,
    stop: CancellationToken,
    cx: &BuildContext,
) -> Served {
    let stats = Stats {
        connections: cx.metrics.gauge("broadcast_connections", "Open WebSocket and SSE connections."),
        subscriptions: cx.metrics.gauge("broadcast_subscriptions", "Channel subscriptions of open connections."),
        frames_sent: cx.metrics.counter("broadcast_frames_sent", "Frames written to clients."),
        denied: cx.metrics.counter(
            "broadcast_subscriptions_denied",
            "Subscriptions refused: channel not permitted, bad name or too many.",
        ),
    };
    let shared = Arc::new(Shared { hub, gate: front.gate.clone(), settings, stats, stop: stop.clone() });
    let (app, listen) = front.into_server(
        |app, path| {
            let nested = format!("{}/{{*channel}}", path.trim_end_matches('/'));
            app.route(path, get(connect)).route(&nested, get(connect))
        },
        shared,
    );
    Served { app, listen, stop }
}

/// One connection's subscriptions and what it may read.
struct Session {
    shared: Arc<Shared>,
    subscriber: Arc<Subscriber>,
    permit: Permit,
    channels: Vec<String>,
    /// The token's `exp`: the connection is closed then.
    expires: Option<u64>,
}

impl Session {
    fn new(shared: Arc<Shared>, identity: &Identity) -> Session {
        let settings = &shared.settings;
        let permit = permit_for(&shared.gate, settings, identity);
        let subscriber = Subscriber::new(settings.max_queue_bytes, settings.slow_client);
        shared.stats.connections.add(1);
        Session { shared, subscriber, permit, channels: Vec::new(), expires: identity.expires }
    }

    /// Subscribes to every channel of `wanted`, or to none of them: the
    /// error says why (`403` not permitted, `400` a bad name, `429` too many).
    fn subscribe(&mut self, wanted: Vec<String>, cursor: Option<&Cursor>) -> Result<(), (StatusCode, String)> {
        let new: Vec<String> = dedup(wanted).into_iter().filter(|c| !self.channels.contains(c)).collect();
        let refuse = |status, message: String| {
            self.shared.stats.denied.inc();
            Err((status, message))
        };
        if let Some(bad) = new.iter().find(|c| c.is_empty() || c.len() > MAX_CHANNEL_LEN) {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("a channel name has 1 to {MAX_CHANNEL_LEN} bytes, not {}", bad.len()),
            );
        }
        if let Some(denied) = new.iter().find(|c| !self.permit.allows(c)) {
            return refuse(StatusCode::FORBIDDEN, format!("not permitted to read channel `{denied}`"));
        }
        if self.channels.len() + new.len() > self.shared.settings.max_subscriptions {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!("at most {} channels per connection", self.shared.settings.max_subscriptions),
            );
        }
        if new.is_empty() {
            return Ok(());
        }
        let hub = &self.shared.hub;
        let epoch = hub.epoch().to_string();
        self.subscriber.reply(frame::reply(&json!({"type": "subscribed", "channels": new})));
        let since = cursor.and_then(|c| c.within(&epoch));
        hub.subscribe(&new, &self.subscriber, since, &|channel, seq, state| {
            frame::initial_state(&epoch, channel, seq, state)
        });
        self.shared.stats.subscriptions.add(new.len() as i64);
        self.channels.extend(new);
        Ok(())
    }

    fn unsubscribe(&mut self, channels: Vec<String>) {
        let gone: Vec<String> = dedup(channels).into_iter().filter(|c| self.channels.contains(c)).collect();
        self.shared.hub.unsubscribe(&gone, &self.subscriber);
        self.channels.retain(|c| !gone.contains(c));
        self.shared.stats.subscriptions.add(-(gone.len() as i64));
        self.subscriber.reply(frame::reply(&json!({"type": "unsubscribed", "channels": gone})));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.hub.unsubscribe(&self.channels, &self.subscriber);
        self.shared.stats.subscriptions.add(-(self.channels.len() as i64));
        self.shared.stats.connections.add(-1);
    }
}

fn dedup(mut channels: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    channels.retain(|c| seen.insert(c.clone()));
    channels
}

/// The channels `identity` may read: the configured patterns and those its
/// token's `channels_claim` lists, filled from its claims. Without auth,
/// every channel.
fn permit_for(gate: &Gate, settings: &ServerSettings, identity: &Identity) -> Permit {
    if !gate.requires_auth() {
        return Permit::new(&[Pattern::parse("*").unwrap_or_else(|_| unreachable!("`*` parses"))], |_| None);
    }
    let claims = identity.claims.as_deref();
    let claim = |path: &str| {
        let mut value = claims?;
        for part in path.split('.') {
            value = value.get(part)?;
        }
        match value {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let mut patterns = settings.allow.clone();
    let listed = claims.and_then(|c| c.get(&settings.channels_claim));
    let listed: Vec<&str> = match listed {
        Some(serde_json::Value::String(one)) => vec![one.as_str()],
        Some(serde_json::Value::Array(many)) => many.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    patterns.extend(listed.into_iter().filter_map(|p| Pattern::parse(p).ok()));
    Permit::new(&patterns, claim)
}

/// What a request asks for, from its path and query.
struct Ask {
    channels: Vec<String>,
    cursor: Option<Cursor>,
    token: Option<String>,
}

fn ask(path_channel: Option<String>, query: &HashMap<String, String>, headers: &HeaderMap, cookie: &str) -> Ask {
    let mut channels: Vec<String> = path_channel.into_iter().collect();
    for name in ["channels", "channel"] {
        if let Some(list) = query.get(name) {
            channels.extend(list.split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::to_string));
        }
    }
    let cursor = query
        .get("since")
        .map(String::as_str)
        .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
        .and_then(Cursor::parse);
    let token = query.get("token").or_else(|| query.get("api_key")).cloned().or_else(|| cookie_value(headers, cookie));
    Ask { channels, cursor, token }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

async fn connect(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let Some(peer) = peer else { return error(StatusCode::INTERNAL_SERVER_ERROR, "no peer address") };
    let query: HashMap<String, String> =
        axum::extract::Query::<HashMap<String, String>>::try_from_uri(&parts.uri).map(|q| q.0).unwrap_or_default();
    let path_channel = axum::extract::Path::<HashMap<String, String>>::from_request_parts(&mut parts, &())
        .await
        .ok()
        .and_then(|p| p.0.get("channel").cloned());
    let ask = ask(path_channel, &query, &parts.headers, &shared.settings.token_cookie);
    let wants_websocket = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    // A browser's WebSocket cannot send headers: it may authenticate with its first message instead.
    let deferred = wants_websocket
        && shared.gate.requires_auth()
        && ask.token.is_none()
        && !shared.gate.brings_credentials(&parts.headers);
    let identity = if deferred {
        None
    } else {
        match shared.gate.admit(&parts.headers, ask.token.as_deref(), peer) {
            Ok(identity) => Some(identity),
            Err(refusal) => return *refusal,
        }
    };
    if let Some(identity) = &identity {
        if let Some(response) = expired(identity) {
            return response;
        }
    }
    if wants_websocket {
        let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(upgrade) => upgrade,
            Err(rejection) => return rejection.into_response(),
        };
        // Checked before the upgrade, so a refusal is a plain 401/403 the client can read.
        let session = match identity.map(|id| open(&shared, &id, ask.channels.clone(), ask.cursor.as_ref())) {
            Some(Ok(session)) => Some(session),
            Some(Err((status, message))) => return error(status, message),
            None => None,
        };
        let pending = Pending { channels: ask.channels, cursor: ask.cursor, peer };
        // tungstenite's defaults give every connection 128 KiB buffers; a client sends
        // little (subscribe messages), and what we send is flushed at once.
        let upgrade = upgrade.max_message_size(64 * 1024).read_buffer_size(4 * 1024).write_buffer_size(8 * 1024);
        return upgrade.on_upgrade(move |socket| websocket(socket, shared, session, pending));
    }
    let Some(identity) = identity else { unreachable!("only a WebSocket defers its authentication") };
    match open(&shared, &identity, ask.channels, ask.cursor.as_ref()) {
        Ok(session) => sse(session),
        Err((status, message)) => error(status, message),
    }
}

/// An identity whose token has expired since it was checked (leeway
/// aside, the gate already refused expired ones).
fn expired(identity: &Identity) -> Option<Response> {
    let exp = identity.expires?;
    (exp <= now_secs()).then(|| error(StatusCode::UNAUTHORIZED, "token expired"))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// When a token's `exp` falls, as a deadline on this process's clock.
fn deadline(expires: Option<u64>) -> Option<Instant> {
    expires.map(|exp| Instant::now() + StdDuration::from_secs(exp.saturating_sub(now_secs())))
}

fn open(
    shared: &Arc<Shared>,
    identity: &Identity,
    channels: Vec<String>,
    cursor: Option<&Cursor>,
) -> Result<Session, (StatusCode, String)> {
    let mut session = Session::new(shared.clone(), identity);
    session.subscribe(channels, cursor)?;
    Ok(session)
}

/// What a WebSocket that authenticates by message asked for at the upgrade.
struct Pending {
    channels: Vec<String>,
    cursor: Option<Cursor>,
    peer: SocketAddr,
}

/// A message from a WebSocket client.
#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Auth {
        token: String,
    },
    Subscribe {
        channels: Vec<String>,
        #[serde(default)]
        since: Option<String>,
    },
    Unsubscribe {
        channels: Vec<String>,
    },
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))
}

/// Waits for `{"type": "auth", "token": …}` and opens the session with it.
async fn authenticate(socket: &mut WebSocket, shared: &Arc<Shared>, pending: &Pending) -> Result<Session, Message> {
    let first = tokio::time::timeout(shared.settings.auth_timeout, socket.recv()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(_) => return Err(close(CLOSE_UNAUTHORIZED, "expected an auth message")),
        Err(_) => return Err(close(CLOSE_UNAUTHORIZED, "no auth message in time")),
    };
    let Ok(ClientMessage::Auth { token }) = serde_json::from_str::<ClientMessage>(&text) else {
        return Err(close(CLOSE_UNAUTHORIZED, "the first message must be {\"type\":\"auth\",\"token\":…}"));
    };
    let identity = shared.gate.check_token(&token, pending.peer).map_err(|_| close(CLOSE_UNAUTHORIZED, "bad token"))?;
    if expired(&identity).is_some() {
        return Err(close(CLOSE_TOKEN_EXPIRED, "token expired"));
    }
    let mut session = Session::new(shared.clone(), &identity);
    if let Err((_, message)) = session.subscribe(pending.channels.clone(), pending.cursor.as_ref()) {
        session.subscriber.reply(frame::reply(&json!({"type": "error", "message": message})));
    }
    Ok(session)
}

async fn websocket(mut socket: WebSocket, shared: Arc<Shared>, session: Option<Session>, pending: Pending) {
    let mut session = match session {
        Some(session) => session,
        None => match authenticate(&mut socket, &shared, &pending).await {
            Ok(session) => session,
            Err(message) => {
                let _ = socket.send(message).await;
                return;
            }
        },
    };
    let settings = &shared.settings;
    let expiry = deadline(session.expires);
    let mut heartbeat = tokio::time::interval_at(Instant::now() + settings.heartbeat, settings.heartbeat);
    let mut heard = Instant::now();
    let subscriber = session.subscriber.clone();
    let reason = loop {
        tokio::select! {
            next = subscriber.next() => {
                let Some(first) = next else { break close(CLOSE_TOO_SLOW, "too slow: queue full, resume with since") };
                // Let the publisher finish the round it is in: its other frames for us join this write.
                tokio::task::yield_now().await;
                // What is queued goes out in one flush.
                let mut sent = 0u64;
                let mut failed = false;
                for frame in std::iter::once(first).chain(std::iter::from_fn(|| subscriber.try_next()).take(255)) {
                    let Ok(text) = Utf8Bytes::try_from(frame::json_of(&frame)) else { continue };
                    if socket.feed(Message::Text(text)).await.is_err() {
                        failed = true;
                        break;
                    }
                    sent += 1;
                }
                shared.stats.frames_sent.inc_by(sent);
                let flushed = tokio::time::timeout(settings.client_timeout, socket.flush()).await;
                if failed || !matches!(flushed, Ok(Ok(()))) {
                    return;
                }
            }
            message = socket.recv() => {
                heard = Instant::now();
                match message {
                    Some(Ok(Message::Text(text))) => handle(&mut session, &text),
                    Some(Ok(Message::Binary(_))) => session.subscriber.reply(frame::reply(&json!({"type": "error", "message": "send text messages"}))),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
            _ = heartbeat.tick() => {
                if heard.elapsed() > settings.client_timeout {
                    break close(CLOSE_TIMEOUT, "no pong from the client");
                }
                if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
            _ = sleep_until(expiry) => break close(CLOSE_TOKEN_EXPIRED, "token expired"),
            _ = shared.stop.cancelled() => break close(1001, "server stopping"),
        }
    };
    let _ = tokio::time::timeout(StdDuration::from_secs(1), socket.send(reason)).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn handle(session: &mut Session, text: &str) {
    let reply_error = |session: &Session, status: StatusCode, message: String, channels: Option<&[String]>| {
        session.subscriber.reply(frame::reply(&json!({
            "type": "error", "status": status.as_u16(), "message": message, "channels": channels,
        })));
    };
    match serde_json::from_str::<ClientMessage>(text) {
        Ok(ClientMessage::Subscribe { channels, since }) => {
            let cursor = since.as_deref().and_then(Cursor::parse);
            if let Err((status, message)) = session.subscribe(channels.clone(), cursor.as_ref()) {
                reply_error(session, status, message, Some(&channels));
            }
        }
        Ok(ClientMessage::Unsubscribe { channels }) => session.unsubscribe(channels),
        Ok(ClientMessage::Auth { .. }) => {
            reply_error(session, StatusCode::BAD_REQUEST, "already authenticated".into(), None)
        }
        Err(e) => reply_error(
            session,
            StatusCode::BAD_REQUEST,
            format!("expected {{\"type\": \"subscribe\" | \"unsubscribe\", \"channels\": [...]}}: {e}"),
            None,
        ),
    }
}

/// Streams the session as Server-Sent Events until the client goes, its
/// token expires, its queue overflows (`disconnect`) or the server stops.
fn sse(session: Session) -> Response {
    let shared = session.shared.clone();
    let heartbeat = shared.settings.heartbeat;
    let expiry = deadline(session.expires);
    let stream = futures_util::stream::unfold(Some(session), move |state| async move {
        let session = state?;
        let subscriber = session.subscriber.clone();
        tokio::select! {
            next = subscriber.next() => {
                let first = next?;
                let mut chunk = bytes::BytesMut::from(&first[..]);
                let mut sent = 1;
                while let Some(more) = subscriber.try_next() {
                    chunk.extend_from_slice(&more);
                    sent += 1;
                    if chunk.len() > 64 * 1024 {
                        break;
                    }
                }
                session.shared.stats.frames_sent.inc_by(sent);
                Some((Ok::<Bytes, Infallible>(chunk.freeze()), Some(session)))
            }
            _ = tokio::time::sleep(heartbeat) => Some((Ok(Bytes::from_static(frame::SSE_HEARTBEAT)), Some(session))),
            _ = sleep_until(expiry) => Some((Ok(Bytes::from_static(b"event: expired\ndata: {\"type\":\"error\",\"message\":\"token expired\"}\n\n")), None)),
            _ = session.shared.stop.cancelled() => None,
        }
    });
    let first = futures_util::stream::once(async { Ok::<Bytes, Infallible>(Bytes::from_static(b"retry: 1000\n\n")) });
    let mut response = Response::new(Body::from_stream(first.chain(stream)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
