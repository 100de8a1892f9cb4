//! Serving: binding, optional TLS (rustls), CORS, graceful stop, and the
//! input half that moves queued requests into the pipeline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use conflux_api::config::Duration;
use conflux_api::{async_trait, Batch, BuildContext, BuildError, Emitter, Input, PluginError};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::intake::{Limiter, Reply};

/// Serve over TLS (rustls) with a certificate chain and private key in PEM files.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM), relative to the pipeline file.
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1), relative to the pipeline file.
    pub key: PathBuf,
}

/// Cross-origin requests from browsers.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins (`https://app.example.com`); `["*"]` allows any.
    pub allow_origins: Vec<String>,
    /// Request headers browsers may send.
    #[serde(default = "default_cors_headers")]
    pub allow_headers: Vec<String>,
    /// Whether browsers may send cookies and credentials (not with `*`).
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long browsers may cache the preflight answer (`Access-Control-Max-Age`); unset sends
    /// no such header, leaving it to the browser.
    #[serde(default)]
    pub max_age: Option<Duration>,
}

fn default_cors_headers() -> Vec<String> {
    vec!["content-type".into(), "authorization".into(), "x-api-key".into()]
}

impl CorsConfig {
    pub fn layer(&self) -> Result<CorsLayer, BuildError> {
        let mut layer = CorsLayer::new().allow_methods([Method::POST, Method::GET, Method::OPTIONS]);
        if self.allow_origins.iter().any(|o| o == "*") {
            if self.allow_credentials {
                return Err(BuildError::at(
                    ["cors", "allow_credentials"],
                    "credentials cannot be allowed for any origin (`*`)",
                ));
            }
            layer = layer.allow_origin(AllowOrigin::any());
        } else {
            let origins = self
                .allow_origins
                .iter()
                .map(|o| HeaderValue::from_str(o).map_err(|e| BuildError::at(["cors", "allow_origins"], e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            layer = layer.allow_origin(origins);
        }
        let headers = self
            .allow_headers
            .iter()
            .map(|h| {
                axum::http::HeaderName::try_from(h.as_str())
                    .map_err(|e| BuildError::at(["cors", "allow_headers"], e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        layer = layer.allow_headers(headers).allow_credentials(self.allow_credentials);
        if let Some(age) = self.max_age {
            layer = layer.max_age(age.0);
        }
        Ok(layer)
    }
}

/// Reads the certificate and key now, so a bad file fails `lint`, not the run.
pub fn load_tls(tls: &TlsConfig, cx: &BuildContext) -> Result<Arc<rustls::ServerConfig>, BuildError> {
    use conflux_api::files::{read_config_file, CONFIG_FILE_LIMIT};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_path = cx.resolve(&tls.cert);
    let cert_pem =
        read_config_file(&cert_path, CONFIG_FILE_LIMIT).map_err(|e| BuildError::at(["tls", "cert"], e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BuildError::at(["tls", "cert"], format!("cannot read {}: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(BuildError::at(["tls", "cert"], format!("no certificate in {}", cert_path.display())));
    }
    let key_path = cx.resolve(&tls.key);
    let key_pem =
        read_config_file(&key_path, CONFIG_FILE_LIMIT).map_err(|e| BuildError::at(["tls", "key"], e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        BuildError::at(["tls", "key"], format!("cannot read a private key from {}: {e}", key_path.display()))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BuildError::at(["tls"], e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| BuildError::at(["tls"], format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A plain error answer.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    Reply::error(status, message).into_response()
}

/// What a server needs to start: where, how, and what to serve.
pub struct Listen {
    pub address: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limiter: Option<Arc<Limiter>>,
    pub limits: crate::connections::ConnectionLimits,
}

impl Listen {
    /// Binds the address and serves `app` until `stop` (a retryable error
    /// when the address cannot be bound yet, so the engine tries again).
    pub async fn start(
        &self,
        app: Router,
        stop: CancellationToken,
        kind: &'static str,
    ) -> Result<JoinHandle<()>, PluginError> {
        let listener = tokio::net::TcpListener::bind(&self.address)
            .await
            .map_err(|e| PluginError::retryable_from(format!("cannot listen on {}", self.address), e))?;
        tracing::info!(kind, address = %self.address, tls = self.tls.is_some(), "listening");
        let tls = self.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(crate::connections::serve(listener, tls, app, self.limits.clone(), stop.clone(), kind));
        if let Some(limiter) = self.limiter.clone() {
            tokio::spawn(async move {
                let mut every = tokio::time::interval(StdDuration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = every.tick() => limiter.sweep(),
                    }
                }
            });
        }
        Ok(task)
    }
}

/// The pipeline side of a server: reads queued batches, starts and stops the server.
pub struct QueueInput {
    pub listen: Listen,
    /// Built lazily on connect, so building opens nothing.
    pub app: Option<Router>,
    pub rx: mpsc::Receiver<Batch>,
    pub max_batch: usize,
    pub stop: CancellationToken,
    pub task: Option<JoinHandle<()>>,
    pub kind: &'static str,
}

#[async_trait]
impl Input for QueueInput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        if self.task.is_some() {
            return Ok(());
        }
        let app = self.app.clone().ok_or_else(|| PluginError::fatal("server already consumed"))?;
        let task = self.listen.start(app, self.stop.clone(), self.kind).await?;
        self.task = Some(task);
        Ok(())
    }

    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let Some(first) = self.rx.recv().await else {
            return Ok(false);
        };
        // Many small requests travel on as one batch; each keeps its own token.
        let mut size = first.len();
        out.emit_batch(first);
        while size < self.max_batch {
            match self.rx.try_recv() {
                Ok(batch) => {
                    size += batch.len();
                    out.emit_batch(batch);
                }
                Err(_) => break,
            }
        }
        Ok(true)
    }

    async fn close(&mut self) {
        self.stop.cancel();
        // Requests queued but never read: their senders hear an error, not a false success.
        self.rx.close();
        while let Ok(batch) = self.rx.try_recv() {
            crate::intake::reject(batch);
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(StdDuration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
    }
}
