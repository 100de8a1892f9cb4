//! Connecting inputs and outputs with backoff.

use conflux_api::{Health, Input, Output, PluginError};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::RetryConfig;

/// Something the engine connects with backoff.
pub(super) enum Connectable<'a> {
    Input(&'a mut dyn Input),
    Output(&'a mut dyn Output),
}

impl Connectable<'_> {
    async fn connect(&mut self) -> Result<(), PluginError> {
        match self {
            Connectable::Input(i) => i.connect().await,
            Connectable::Output(o) => o.connect().await,
        }
    }
}

/// How a connect with backoff ended.
#[derive(Debug, PartialEq)]
pub(super) enum Connect {
    Connected,
    /// `stop` fired first.
    Stopped,
    /// `retry.max_attempts` attempts failed; a later batch may try again.
    GaveUp(String),
    /// The plugin says retrying cannot help (bad settings, a server-side
    /// object that contradicts the configuration).
    Fatal(String),
}

/// Connects, retrying with backoff, at most `retry.max_attempts` times (0 =
/// until stopped). The component is marked up once connected and down with
/// the last error while it is not.
pub(super) async fn connect_with_backoff(
    component: &str,
    stop: &CancellationToken,
    retry: &RetryConfig,
    health: &Health,
    mut target: Connectable<'_>,
) -> Connect {
    let mut attempt = 0;
    loop {
        match target.connect().await {
            Ok(()) => {
                health.up();
                return Connect::Connected;
            }
            Err(e) if !e.is_retryable() => {
                let message = format!("cannot connect: {}", e.chain());
                health.down(&message);
                return Connect::Fatal(message);
            }
            Err(e) => {
                attempt += 1;
                health.down(format!("cannot connect (attempt {attempt}): {}", e.chain()));
                if retry.max_attempts > 0 && attempt >= retry.max_attempts {
                    warn!(%component, attempt, error = %e.chain(), "connect failed; giving up (retry.max_attempts)");
                    return Connect::GaveUp(format!("cannot connect after {attempt} attempts: {}", e.chain()));
                }
                let wait = retry.backoff(attempt);
                warn!(%component, attempt, error = %e.chain(), retry_in = ?wait, "connect failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Connect::Stopped,
                }
            }
        }
    }
}
