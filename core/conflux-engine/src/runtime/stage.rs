//! The task that runs a stage: batches in, emitted batches routed, ticks,
//! and `finish` or `stop` at the end.

use std::time::Instant;

use conflux_api::{AckStatus, Batch, Emitter, HealthState, Stage};
use tokio::sync::mpsc;
use tracing::warn;

use super::route::{distinct_tokens, fail_batch, fail_queue};
use super::Task;

pub(super) async fn run(task: Task, mut stage: Box<dyn Stage>, mut rx: mpsc::Receiver<Batch>) -> Result<(), String> {
    let Task { router, stop, hard, health, declared_ports, metrics, .. } = task;
    // A stage that does I/O of its own reports through the same handle;
    // one that never did is up as soon as it runs.
    if health.state() == HealthState::Starting {
        health.up();
    }
    let mut out = Emitter::new(declared_ports);
    let mut ticker = stage.tick_interval().map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let tick = async {
            match ticker.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = hard.cancelled() => {
                let lost = fail_queue(&mut rx);
                warn!(component = %router.name, events = lost, "stage stopped at the deadline; queued events failed back");
                return Ok(());
            }
            batch = rx.recv() => match batch {
                Some(batch) => {
                    metrics.queued.set(rx.len() as i64);
                    metrics.received.inc_by(batch.len() as u64);
                    let started = Instant::now();
                    // If the deadline interrupts the stage, its batch is failed, not acknowledged.
                    let tokens = distinct_tokens(&batch);
                    tokio::select! {
                        biased;
                        _ = stage.process(batch, &mut out) => {}
                        _ = hard.cancelled() => {
                            for token in &tokens {
                                token.mark(AckStatus::Errored);
                            }
                            drop(tokens);
                            for (_, emitted) in out.drain() {
                                fail_batch(&emitted, AckStatus::Errored);
                            }
                            fail_queue(&mut rx);
                            return Ok(());
                        }
                    }
                    metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
                    router.route_all(&mut out).await;
                }
                None => break,
            },
            _ = tick => {
                stage.tick(&mut out).await;
                router.route_all(&mut out).await;
            }
        }
    }
    if stop.is_cancelled() {
        stage.stop(&mut out).await;
    } else {
        stage.finish(&mut out).await;
    }
    router.route_all(&mut out).await;
    Ok(())
}
