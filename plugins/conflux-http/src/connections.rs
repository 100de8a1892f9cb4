//! The servers' accept loop: every connection gets a header read timeout,
//! an idle timeout between requests, and a place under a connection limit;
//! request bodies get a read timeout and a minimum rate ([`read_body`]).
//!
//! Why our own loop: `axum::serve` has none of these, so about 1,100
//! connections that never finished their headers (slowloris) made every
//! normal request time out. Over the limit a connection is answered `503`
//! at once and closed, rather than left in the accept queue.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration as StdDuration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::Router;
use conflux_api::config::{ByteSize, Duration};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

/// Limits on each connection and on how many there are.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers, from the connection's
    /// start or the end of the previous request (default 10s); then the connection is closed.
    pub header_timeout: Duration,
    /// Longest wait for the next piece of a request body (default 10s); then `408`.
    pub body_timeout: Duration,
    /// Slowest average body upload accepted, in bytes per second, once a
    /// body has taken `body_timeout` (default 1KiB); slower gets `408`.
    pub min_body_rate: ByteSize,
    /// How long a keep-alive connection may carry no bytes before it is
    /// closed (default 60s). An open WebSocket is not closed by it.
    pub idle_timeout: Duration,
    /// Most open connections (default 4096); one more is answered `503`
    /// with `Retry-After` at once and closed.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            min_body_rate: ByteSize(1024),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// Accepts connections until `stop`, then lets open ones finish their
/// requests (each closes once idle) before returning.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
    kind: &'static str,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();
    let limits = Arc::new(limits);
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most often: wait for some to close.
                    tracing::warn!(kind, error = %e, "accept failed");
                    tokio::time::sleep(StdDuration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    kind,
                    max_connections = limits.max_connections,
                    refused,
                    "connection limit reached; refusing with 503"
                );
            }
            tracker.spawn(refuse(stream));
            continue;
        };
        let (app, tls, limits, stop) = (app.clone(), tls.clone(), limits.clone(), stop.clone());
        tracker.spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, peer, app, &limits, stop).await,
                Some(acceptor) => match tokio::time::timeout(limits.header_timeout.0, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => connection(stream, peer, app, &limits, stop).await,
                    Ok(Err(e)) => tracing::debug!(kind, %peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(kind, %peer, "TLS handshake timed out"),
                },
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Answers a connection over the limit and closes it, without reading it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    const ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
Connection: close\r\nContent-Length: 43\r\n\r\n{\"error\":\"too many connections, retry later\"}";
    let _ = tokio::time::timeout(StdDuration::from_secs(1), async {
        let _ = stream.write_all(ANSWER).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves one connection's requests until it closes, is idle too long, or the server stops.
async fn connection<IO>(io: IO, peer: SocketAddr, app: Router, limits: &ConnectionLimits, stop: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { inner: io, activity: activity.clone() });
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        app.clone().call(request)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout.0)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let idle = limits.idle_timeout.0;
    let check = (idle / 4).clamp(StdDuration::from_millis(50), StdDuration::from_secs(1));
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            _ = stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(check), if !closing => {
                // A request in progress (an `ack: sync` answer waiting) is
                // finished first: graceful shutdown closes once idle.
                if activity.idle_for() >= idle {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> StdDuration {
        let last = StdDuration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A stream that records its traffic in an [`Activity`].
struct Watched<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a request body was not read whole.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Over `max_body`.
    TooLarge,
    /// Stalled past `body_timeout`, or slower than `min_body_rate`.
    TooSlow(String),
    /// The client broke the body off.
    Broken,
}

/// Reads a whole body, at most `max` bytes, each piece within
/// `body_timeout` and on average at least `min_body_rate` once a body has
/// taken `body_timeout`.
pub async fn read_body(mut body: Body, max: usize, limits: &ConnectionLimits) -> Result<Bytes, BodyError> {
    let started = Instant::now();
    let wait = limits.body_timeout.0;
    let mut data: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return Err(BodyError::TooSlow(format!("no body data for {}", humantime::format_duration(wait)))),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(BodyError::Broken),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(piece) = frame.into_data() {
            if data.len() + piece.len() > max {
                return Err(BodyError::TooLarge);
            }
            data.extend_from_slice(&piece);
        }
        let took = started.elapsed();
        if took > wait && (data.len() as f64) < limits.min_body_rate.0 as f64 * took.as_secs_f64() {
            return Err(BodyError::TooSlow(format!(
                "body slower than {} bytes per second (min_body_rate)",
                limits.min_body_rate.0
            )));
        }
    }
    Ok(Bytes::from(data))
}
