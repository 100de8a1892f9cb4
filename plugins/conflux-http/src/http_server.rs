//! `http_server` input.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use conflux_api::config::{ByteSize, Duration};
use conflux_api::{inventory, BuildContext, BuildError, BuiltInput, InputConfig, Registration};
use conflux_validate::EventSchema;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, AuthConfig, AuthError, Identity};
use crate::body::{parse, Format};
use crate::connections::{read_body, BodyError, ConnectionLimits};
use crate::intake::{timeouts, AckMode, Intake, Limiter, PartialMode, RateLimitConfig, Reply};
use crate::server::{error, load_tls, CorsConfig, Listen, QueueInput, TlsConfig};

/// One path or several.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Paths {
    One(String),
    Many(Vec<String>),
}

impl Default for Paths {
    fn default() -> Self {
        Paths::One("/".into())
    }
}

impl Paths {
    pub fn list(&self) -> Vec<String> {
        match self {
            Paths::One(p) => vec![p.clone()],
            Paths::Many(ps) => ps.clone(),
        }
    }
}

/// Receives events over HTTP `POST`: a JSON object, a JSON array of objects,
/// or NDJSON (`application/x-ndjson`); each request's events form one batch.
///
/// Answers: `202` (`ack: async`) or `200` (`ack: sync`, once every output
/// confirmed; `502` if one failed, `504` past `ack_timeout`) with
/// `{"accepted": n}`; `400` malformed body (each bad array element by
/// `index`, NDJSON line by `line`); `401`/`403` auth; `413` body over
/// `max_body`; `415` other content types; `422` schema violations; `429`
/// over the rate limit and `503` when the pipeline stays full past
/// `queue_timeout`, both with `Retry-After`. Events carry metadata
/// `http.path`, `auth.subject` and the chosen `auth.claim.<name>`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpServerConfig {
    /// Address to listen on, such as `0.0.0.0:8080`.
    pub address: String,
    /// Path (or list of paths) accepting `POST`.
    #[serde(default)]
    pub path: Paths,
    /// When to answer (default `async`): on queueing (`async`) or after every output confirmed (`sync`).
    #[serde(default)]
    pub ack: AckMode,
    /// Largest accepted body; larger ones get `413`.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// How long a request may wait for room in the pipeline before `503` (default 1s).
    #[serde(default)]
    pub queue_timeout: Option<Duration>,
    /// With `ack: sync`, how long to wait for the outputs before `504` (default 30s).
    #[serde(default)]
    pub ack_timeout: Option<Duration>,
    /// Requests queued ahead of the pipeline.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Most body bytes whose events are in the pipeline (queued or not yet
    /// confirmed); past it requests get `503` with `Retry-After`.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: ByteSize,
    /// Timeouts and the connection limit that keep slow or idle clients
    /// from holding the server.
    #[serde(default)]
    pub connections: ConnectionLimits,
    /// Authentication; unset accepts anyone.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Token bucket per client (API key, JWT subject, else IP address); failed credentials are charged to the IP address.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// JSON Schema file events must match, else `422` (relative to the pipeline file).
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// With `schema`, whether a batch with some invalid events is refused whole with `422` or its
    /// valid events accepted, the invalid ones listed in the answer (default `reject_all`).
    #[serde(default)]
    pub partial: PartialMode,
    /// Cross-origin (browser) access.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// Serve HTTPS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Most events handed to the pipeline in one batch (requests are combined up to this).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
}

fn default_max_body() -> ByteSize {
    ByteSize(1024 * 1024)
}

pub(crate) fn default_max_queue_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

fn default_queue() -> usize {
    256
}

fn default_max_batch() -> usize {
    1024
}

/// What both servers build from their options.
pub struct Common {
    pub intake: Arc<Intake>,
    pub auth: Option<Arc<Auth>>,
    pub limiter: Option<Arc<Limiter>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub rx: tokio::sync::mpsc::Receiver<conflux_api::Batch>,
}

#[allow(clippy::too_many_arguments)]
pub fn build_common(
    cx: &BuildContext,
    auth: Option<&AuthConfig>,
    rate_limit: Option<&RateLimitConfig>,
    schema: Option<&PathBuf>,
    tls: Option<&TlsConfig>,
    queue: usize,
    (ack, partial): (AckMode, PartialMode),
    (queue_timeout, ack_timeout): (Option<Duration>, Option<Duration>),
    max_queue_bytes: ByteSize,
) -> Result<Common, BuildError> {
    if queue == 0 {
        return Err(BuildError::at(["queue"], "queue must be at least 1"));
    }
    let auth = match auth {
        Some(a) => Auth::build(a, |p| cx.resolve(p))?.map(Arc::new),
        None => None,
    };
    let limiter = rate_limit.map(|r| r.quota().map(|q| Arc::new(Limiter::new(q)))).transpose()?;
    let schema = schema
        .map(|p| EventSchema::load(&cx.resolve(p)).map(Arc::new).map_err(|e| BuildError::at(["schema"], e.to_string())))
        .transpose()?;
    let tls = tls.map(|t| load_tls(t, cx)).transpose()?;
    let (queue_timeout, ack_timeout) = timeouts(queue_timeout, ack_timeout);
    let (tx, rx) = tokio::sync::mpsc::channel(queue);
    let intake = Arc::new(Intake {
        tx,
        schema,
        partial,
        ack,
        queue_timeout,
        ack_timeout,
        held: Arc::default(),
        max_bytes: usize::try_from(max_queue_bytes.0).unwrap_or(usize::MAX),
    });
    Ok(Common { intake, auth, limiter, tls, rx })
}

impl InputConfig for HttpServerConfig {
    const TYPE: &'static str = "http_server";
    fn build(self, cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        let common = build_common(
            cx,
            self.auth.as_ref(),
            self.rate_limit.as_ref(),
            self.schema.as_ref(),
            self.tls.as_ref(),
            self.queue,
            (self.ack, self.partial),
            (self.queue_timeout, self.ack_timeout),
            self.max_queue_bytes,
        )?;
        let paths = self.path.list();
        if paths.is_empty() || paths.iter().any(|p| !p.starts_with('/')) {
            return Err(BuildError::at(["path"], "paths must start with `/`"));
        }
        let state = Arc::new(HttpState {
            intake: common.intake,
            auth: common.auth,
            limiter: common.limiter.clone(),
            max_body: self.max_body.0 as usize,
            limits: self.connections.clone(),
        });
        let mut app = Router::new();
        for path in &paths {
            app = app.route(path, post(ingest));
        }
        let mut app = app.layer(DefaultBodyLimit::disable()).with_state(state);
        if let Some(cors) = &self.cors {
            app = app.layer(cors.layer()?);
        }
        Ok(BuiltInput::new(QueueInput {
            listen: Listen {
                address: self.address,
                tls: common.tls,
                limiter: common.limiter,
                limits: self.connections,
            },
            app: Some(app),
            rx: common.rx,
            max_batch: self.max_batch.max(1),
            stop: CancellationToken::new(),
            task: None,
            kind: "http_server",
        }))
    }
}

inventory::submit!(Registration::input::<HttpServerConfig>());

struct HttpState {
    intake: Arc<crate::intake::Intake>,
    auth: Option<Arc<Auth>>,
    limiter: Option<Arc<Limiter>>,
    max_body: usize,
    limits: ConnectionLimits,
}

/// Which buckets [`admit`] charges: failed credentials to the caller's
/// address, admitted clients to their own (a WebSocket limits its messages
/// per connection instead, so it charges failures only).
#[derive(Clone, Copy)]
pub struct Buckets<'l> {
    pub failures: Option<&'l Limiter>,
    pub clients: Option<&'l Limiter>,
}

/// Authentication then rate limit; shared with the WebSocket upgrade.
pub fn admit(
    auth: Option<&Auth>,
    buckets: Buckets<'_>,
    headers: &HeaderMap,
    query_token: Option<&str>,
    peer: SocketAddr,
) -> Result<Identity, Box<Response>> {
    let identity = match auth {
        None => Identity::default(),
        Some(auth) => {
            let mut credentials = auth.credentials(headers);
            if credentials.api_key.is_none() && credentials.bearer.is_none() {
                if let Some(token) = query_token {
                    // Browsers cannot set headers on a WebSocket: a `?token=` may be a JWT or an API key.
                    if token.matches('.').count() == 2 {
                        credentials.bearer = Some(token);
                    } else {
                        credentials.api_key = Some(token);
                    }
                }
            }
            match auth.check(&credentials) {
                Ok(identity) => identity,
                Err(e) => {
                    // Failed credentials are charged to the caller's address, so
                    // guessing keys or tokens is throttled like any other client.
                    limit(buckets.failures, &format!("ip:{}", peer.ip()))?;
                    return Err(match e {
                        AuthError::Unauthorized(m) => {
                            let mut r = error(StatusCode::UNAUTHORIZED, m);
                            r.headers_mut()
                                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                            Box::new(r)
                        }
                        AuthError::Forbidden(m) => Box::new(error(StatusCode::FORBIDDEN, m)),
                    });
                }
            }
        }
    };
    let client = identity.client.clone().unwrap_or_else(|| format!("ip:{}", peer.ip()));
    limit(buckets.clients, &client)?;
    Ok(identity)
}

/// Takes a token from `client`'s bucket, or answers `429` with `Retry-After`.
fn limit(limiter: Option<&Limiter>, client: &str) -> Result<(), Box<Response>> {
    match limiter.map(|l| l.check(client)) {
        Some(Err(wait)) => {
            Err(Box::new(Reply::retry(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded", wait).into_response()))
        }
        _ => Ok(()),
    }
}

async fn ingest(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: MatchedPath,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let identity = match admit(
        state.auth.as_deref(),
        Buckets { failures: state.limiter.as_deref(), clients: state.limiter.as_deref() },
        &headers,
        None,
        peer,
    ) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(format) = Format::of(content_type) else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send application/json (object or array) or application/x-ndjson",
        );
    };
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("body exceeds {} bytes", state.max_body));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.max_body) {
        return too_large();
    }
    let bytes = match read_body(body, state.max_body, &state.limits).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::TooSlow(reason)) => {
            let mut response = error(StatusCode::REQUEST_TIMEOUT, reason);
            response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            return response;
        }
        Err(BodyError::Broken) => return error(StatusCode::BAD_REQUEST, "the body was broken off"),
    };
    let payloads = match parse(format, &bytes) {
        Ok(p) => p,
        Err(bad) => {
            let mut body = serde_json::json!({ "error": bad.reason });
            if !bad.elements.is_empty() {
                body["elements"] = serde_json::to_value(&bad.elements).unwrap_or_default();
            }
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
    };
    state.intake.submit(payloads, bytes.len(), &identity, path.as_str()).await.into_response()
}
