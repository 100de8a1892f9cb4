//! The front door every server plugin stands on: where it listens, which
//! paths it answers, who may come in (authentication, rate limit) and how
//! (TLS, CORS, connection limits).
//!
//! The options are declared once, in [`server_config!`], and spliced into
//! each server's config struct. `#[serde(flatten)]` would say the same in
//! fewer tokens, but it cannot be combined with `deny_unknown_fields` without
//! losing the path of a bad value (`queue: x` would point at the input, not
//! at `queue`), and a typo must stay an error that names its line.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Router;
use conflux_api::{Batch, BuildContext, BuildError};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower_http::cors::CorsLayer;

use crate::auth::{Auth, AuthConfig, AuthError, Identity};
use crate::connections::ConnectionLimits;
use crate::intake::{Limiter, RateLimitConfig, Reply};
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

/// Declares a server's config struct with the front door's options
/// (`address`, `path`, `connections`, `auth`, `rate_limit`, `cors`, `tls`)
/// ahead of its own, and `fn server_options(&self) -> ServerOptions`.
///
/// `server_config! { intake; … }` adds the intake's options too (`ack`,
/// `queue`, `queue_timeout`, `ack_timeout`, `max_queue_bytes`, `schema`,
/// `partial`) and `fn intake_options(&self) -> IntakeOptions`: for servers
/// that receive events rather than send them.
#[macro_export]
macro_rules! server_config {
    (intake; $(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $crate::server_config! {
            $(#[$meta])*
            pub struct $name {
                /// When to answer (default `async`): on queueing (`async`) or once every output
                /// confirmed (`sync`).
                #[serde(default)]
                pub ack: $crate::intake::AckMode,
                /// How long a request (or message) may wait for room in the pipeline before
                /// `503` (default 1s).
                #[serde(default)]
                pub queue_timeout: Option<conflux_api::config::Duration>,
                /// With `ack: sync`, how long to wait for the outputs before `504` (default 30s).
                #[serde(default)]
                pub ack_timeout: Option<conflux_api::config::Duration>,
                /// Requests (or messages, all connections together) queued ahead of the pipeline.
                #[serde(default = "crate::intake::default_queue")]
                pub queue: usize,
                /// Most body bytes whose events are in the pipeline (queued or not yet
                /// confirmed); past it `503` with `Retry-After`.
                #[serde(default = "crate::intake::default_max_queue_bytes")]
                pub max_queue_bytes: conflux_api::config::ByteSize,
                /// JSON Schema file events must match, else `422` (relative to the pipeline file).
                #[serde(default)]
                pub schema: Option<std::path::PathBuf>,
                /// With `schema`, whether a batch with some invalid events is refused whole with
                /// `422` or its valid events accepted, the invalid ones listed in the answer
                /// (default `reject_all`).
                #[serde(default)]
                pub partial: $crate::intake::PartialMode,
                $($body)*
            }
        }

        impl $name {
            /// The intake's options, apart from the server's own.
            fn intake_options(&self) -> $crate::intake::IntakeOptions {
                $crate::intake::IntakeOptions {
                    ack: self.ack,
                    queue_timeout: self.queue_timeout,
                    ack_timeout: self.ack_timeout,
                    queue: self.queue,
                    max_queue_bytes: self.max_queue_bytes,
                    schema: self.schema.clone(),
                    partial: self.partial,
                }
            }
        }
    };
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            /// Address to listen on, such as `0.0.0.0:8080`.
            pub address: String,
            /// Path (or list of paths) the server answers on, each starting with `/`.
            #[serde(default)]
            pub path: $crate::front_door::Paths,
            /// Timeouts and the connection limit that keep slow or idle clients
            /// from holding the server.
            #[serde(default)]
            pub connections: $crate::connections::ConnectionLimits,
            /// Authentication (API keys or JWT); unset accepts anyone. Browsers, which
            /// cannot set headers on a WebSocket or an `EventSource`, may pass `?token=`
            /// where the server says so.
            #[serde(default)]
            pub auth: Option<$crate::auth::AuthConfig>,
            /// Token bucket per client (API key, JWT subject, else IP address; per
            /// connection for a WebSocket's messages); failed credentials are charged
            /// to the IP address.
            #[serde(default)]
            pub rate_limit: Option<$crate::intake::RateLimitConfig>,
            /// Cross-origin (browser) access.
            #[serde(default)]
            pub cors: Option<$crate::server::CorsConfig>,
            /// Serve HTTPS (and `wss://`).
            #[serde(default)]
            pub tls: Option<$crate::server::TlsConfig>,
            $($body)*
        }

        impl $name {
            /// The front door's options, apart from the server's own.
            fn server_options(&self) -> $crate::front_door::ServerOptions {
                $crate::front_door::ServerOptions {
                    address: self.address.clone(),
                    path: self.path.clone(),
                    connections: self.connections.clone(),
                    auth: self.auth.clone(),
                    rate_limit: self.rate_limit.clone(),
                    cors: self.cors.clone(),
                    tls: self.tls.clone(),
                }
            }
        }
    };
}

/// The front door's options, as [`server_config!`] declares them.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub address: String,
    pub path: Paths,
    pub connections: ConnectionLimits,
    pub auth: Option<AuthConfig>,
    pub rate_limit: Option<RateLimitConfig>,
    pub cors: Option<CorsConfig>,
    pub tls: Option<TlsConfig>,
}

/// What the rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// Every admitted request takes a token from its client's bucket.
    PerClient,
    /// Admission charges failed credentials only; each connection then
    /// limits its own messages ([`Gate::connection_limiter`]).
    PerConnection,
}

/// Authentication then rate limit, held by each request handler.
#[derive(Clone)]
pub struct Gate {
    auth: Option<Arc<Auth>>,
    /// Per-client buckets: admitted clients (per-client scope) and failed credentials (always).
    limiter: Option<Arc<Limiter>>,
    quota: Option<Quota>,
    scope: LimitScope,
}

impl Gate {
    /// Admits a caller from its headers (or, where browsers cannot send
    /// headers, a `?token=` that may be a JWT or an API key), or answers
    /// `401`/`403`/`429`.
    pub fn admit(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        peer: SocketAddr,
    ) -> Result<Identity, Box<Response>> {
        let identity = match &self.auth {
            None => Identity::default(),
            Some(auth) => {
                let mut credentials = auth.credentials(headers);
                if credentials.api_key.is_none() && credentials.bearer.is_none() {
                    if let Some(token) = query_token {
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
                        self.charge(&format!("ip:{}", peer.ip()))?;
                        return Err(Box::new(refusal(e)));
                    }
                }
            }
        };
        if self.scope == LimitScope::PerClient {
            self.charge(identity.client.as_deref().unwrap_or(&format!("ip:{}", peer.ip())))?;
        }
        Ok(identity)
    }

    /// Whether callers must bring credentials.
    pub fn requires_auth(&self) -> bool {
        self.auth.is_some()
    }

    /// Whether the request headers carry credentials (the configured API
    /// key header, or a bearer token), right or wrong.
    pub fn brings_credentials(&self, headers: &HeaderMap) -> bool {
        self.auth.as_ref().is_some_and(|auth| {
            let credentials = auth.credentials(headers);
            credentials.api_key.is_some() || credentials.bearer.is_some()
        })
    }

    /// Checks a token that came in a message rather than with the request
    /// (a WebSocket's first message): a JWT, or else an API key. A failure
    /// is charged to the caller's address like any other.
    pub fn check_token(&self, token: &str, peer: SocketAddr) -> Result<Identity, AuthError> {
        let Some(auth) = &self.auth else { return Ok(Identity::default()) };
        let credentials = if token.matches('.').count() == 2 {
            crate::auth::Credentials { bearer: Some(token), api_key: None }
        } else {
            crate::auth::Credentials { bearer: None, api_key: Some(token) }
        };
        auth.check(&credentials).inspect_err(|_| {
            let _ = self.charge(&format!("ip:{}", peer.ip()));
        })
    }

    /// A fresh bucket for one connection's messages (per-connection scope).
    pub fn connection_limiter(&self) -> Option<DefaultDirectRateLimiter> {
        (self.scope == LimitScope::PerConnection).then_some(self.quota).flatten().map(RateLimiter::direct)
    }

    /// Takes a token from `client`'s bucket, or answers `429` with `Retry-After`.
    fn charge(&self, client: &str) -> Result<(), Box<Response>> {
        match self.limiter.as_ref().map(|l| l.check(client)) {
            Some(Err(wait)) => {
                Err(Box::new(Reply::retry(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded", wait).into_response()))
            }
            _ => Ok(()),
        }
    }
}

fn refusal(e: AuthError) -> Response {
    match e {
        AuthError::Unauthorized(m) => {
            let mut r = error(StatusCode::UNAUTHORIZED, m);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r
        }
        AuthError::Forbidden(m) => error(StatusCode::FORBIDDEN, m),
    }
}

/// A server's front door, built and checked, not yet listening.
pub struct FrontDoor {
    pub gate: Gate,
    paths: Vec<String>,
    cors: Option<CorsLayer>,
    listen: Listen,
}

impl ServerOptions {
    /// Checks paths, reads the TLS files and auth keys now, so that a bad
    /// option fails `lint`, not the run.
    pub fn build(self, cx: &BuildContext, scope: LimitScope) -> Result<FrontDoor, BuildError> {
        let paths = self.path.list();
        if paths.is_empty() || paths.iter().any(|p| !p.starts_with('/')) {
            return Err(BuildError::at(["path"], "paths must start with `/`"));
        }
        let auth = match &self.auth {
            Some(a) => Auth::build(a, |p| cx.resolve(p))?.map(Arc::new),
            None => None,
        };
        let quota = self.rate_limit.as_ref().map(RateLimitConfig::quota).transpose()?;
        let limiter = quota.map(|q| Arc::new(Limiter::new(q)));
        let tls = self.tls.as_ref().map(|t| load_tls(t, cx)).transpose()?;
        let cors = self.cors.as_ref().map(CorsConfig::layer).transpose()?;
        Ok(FrontDoor {
            gate: Gate { auth, limiter: limiter.clone(), quota, scope },
            paths,
            cors,
            listen: Listen { address: self.address, tls, limiter, limits: self.connections },
        })
    }
}

impl FrontDoor {
    /// The app `routes` builds on every path (behind CORS when configured),
    /// and where to serve it: for servers that send rather than receive.
    pub fn into_server<S: Clone + Send + Sync + 'static>(
        self,
        routes: impl Fn(Router<S>, &str) -> Router<S>,
        state: S,
    ) -> (Router, Listen) {
        let mut app = Router::new();
        for path in &self.paths {
            app = routes(app, path);
        }
        let mut app = app.with_state(state);
        if let Some(cors) = self.cors {
            app = app.layer(cors);
        }
        (app, self.listen)
    }

    /// The connection limits, for handlers that read bodies.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.listen.limits
    }

    /// Serves `route` on every path (behind CORS when configured) and
    /// hands the pipeline `rx`, in batches of up to `max_batch` events.
    pub fn into_input<S: Clone + Send + Sync + 'static>(
        self,
        route: MethodRouter<S>,
        state: S,
        rx: mpsc::Receiver<Batch>,
        max_batch: usize,
        kind: &'static str,
    ) -> QueueInput {
        let (app, listen) = self.into_server(|app, path| app.route(path, route.clone()), state);
        QueueInput {
            listen,
            app: Some(app),
            rx,
            max_batch: max_batch.max(1),
            stop: CancellationToken::new(),
            task: None,
            kind,
        }
    }
}
