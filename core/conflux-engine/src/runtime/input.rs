//! The task that runs an input: connect, read until the end or `stop`, close.

use conflux_api::{AckStatus, Batch, Emitter, Input, PluginError};
use tracing::{debug, warn};

use super::connect::{connect_with_backoff, Connect, Connectable};
use super::route::{fail_batch, track_acks};
use super::Task;
use crate::config::RetryConfig;

pub(super) async fn run(task: Task, mut input: Box<dyn Input>, retry: RetryConfig) -> Result<(), String> {
    let Task { component, router, stop, health, declared_ports, .. } = task;
    match connect_with_backoff(&component, &stop, &retry, &health, Connectable::Input(&mut *input)).await {
        Connect::Connected => {}
        Connect::Stopped => return Ok(()),
        Connect::GaveUp(e) | Connect::Fatal(e) => return Err(format!("input failed: {e}")),
    }
    debug!(%component, "input started");
    let mut out = Emitter::new(declared_ports);
    let mut failures = 0;
    let result = loop {
        let read = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            read = input.read(&mut out) => read,
        };
        let more = match read {
            Ok(more) => {
                if failures > 0 {
                    health.up();
                }
                failures = 0;
                more
            }
            Err(e) if e.is_retryable() => {
                failures += 1;
                let wait = retry.backoff(failures);
                health.down(format!("read failed: {}", e.chain()));
                warn!(%component, error = %e.chain(), retry_in = ?wait, "read failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => break Ok(()),
                }
                if matches!(e, PluginError::NotConnected { .. }) {
                    match connect_with_backoff(&component, &stop, &retry, &health, Connectable::Input(&mut *input))
                        .await
                    {
                        Connect::Connected => {}
                        Connect::Stopped => break Ok(()),
                        Connect::GaveUp(e) | Connect::Fatal(e) => break Err(format!("input failed: {e}")),
                    }
                }
                true
            }
            Err(e) => break Err(format!("input failed: {}", e.chain())),
        };
        let emitted: Vec<(usize, Batch)> = out.drain().collect();
        for (port, mut batch) in emitted {
            track_acks(&mut batch, &router.metrics);
            router.route(port, batch).await;
        }
        if !more {
            break Ok(());
        }
    };
    // A read cancelled at shutdown may have left events behind: they were never sent.
    for (_, batch) in out.drain() {
        fail_batch(&batch, AckStatus::Errored);
    }
    input.close().await;
    debug!(%component, "input finished");
    result
}
