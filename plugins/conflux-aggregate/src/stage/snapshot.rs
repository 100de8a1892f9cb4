//! Checkpoints: restoring the state before the first event, and saving it
//! so that the sources of what it holds can be acknowledged.

use std::collections::HashMap;
use std::time::Instant;

use conflux_api::Emitter;
use tracing::{debug, error, info, warn};

use super::results::emit_pending;
use super::{AggregateStage, GroupState};
use crate::durable::{Durability, GroupRef, SavedSnapshot, WindowRef, SNAPSHOT_VERSION};

impl AggregateStage {
    /// Loads the last snapshot before the first event is processed. Until it
    /// can (store unreachable, unreadable or from another configuration), the
    /// stage waits: processing without its state would double-count.
    pub(super) async fn ensure_restored(&mut self, out: &mut Emitter) {
        let backoff =
            conflux_api::Backoff::new(std::time::Duration::from_millis(500), std::time::Duration::from_secs(30));
        let mut failures = 0;
        loop {
            let Some(durability) = self.durability.as_mut() else { return };
            if durability.restored {
                return;
            }
            let loaded = durability.store.load().await.map_err(|e| e.to_string());
            let place = durability.store.describe();
            match loaded.and_then(|bytes| self.restore(bytes.as_deref(), out)) {
                Ok(()) => return,
                Err(reason) => {
                    failures += 1;
                    let wait = backoff.wait(failures);
                    error!(
                        component = %self.component,
                        checkpoint = %place,
                        %reason,
                        retry_in = ?wait,
                        "cannot restore the aggregate checkpoint; nothing is processed until it can"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    pub(super) fn restore(&mut self, bytes: Option<&[u8]>, out: &mut Emitter) -> Result<(), String> {
        let durability = self.durability.as_mut().expect("checked by the caller");
        let Some(bytes) = bytes else {
            info!(component = %self.component, checkpoint = %durability.store.describe(), "no checkpoint yet; starting empty");
            durability.restored = true;
            return Ok(());
        };
        let snapshot: SavedSnapshot = conflux_api::sonic_rs::from_slice(bytes)
            .map_err(|e| format!("the checkpoint is not readable ({e}); remove it to start empty"))?;
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(format!(
                "the checkpoint has layout version {}, this build reads {SNAPSHOT_VERSION}; remove it to start empty",
                snapshot.version
            ));
        }
        if snapshot.fingerprint != durability.fingerprint {
            return Err("the checkpoint was written with a different window, group_by or metrics;                  restore that configuration, or remove the checkpoint to start empty"
                .into());
        }
        self.windows.clear();
        self.states = 0;
        for window in snapshot.windows {
            let groups: HashMap<String, GroupState> = window
                .groups
                .into_iter()
                .map(|g| {
                    let state = GroupState {
                        group: g.group,
                        accs: g.accs,
                        tokens: Vec::new(),
                        dirty: false,
                        revision: g.revision,
                    };
                    (g.key, state)
                })
                .collect();
            self.states += groups.len();
            self.windows.insert((window.start, window.end), groups);
        }
        for (key, session) in snapshot.sessions {
            self.sessions.entry(key).or_default().push(session);
        }
        self.gauges = snapshot.gauges.into_iter().collect();
        self.max_event_time = snapshot.max_event_time;
        self.closed_early = snapshot.closed_early;
        self.last_slide_emitted = snapshot.last_slide_emitted;
        let replay = durability.restore(snapshot.positions, snapshot.counted, snapshot.pending);
        info!(
            component = %self.component,
            checkpoint = %durability.store.describe(),
            states = self.states,
            results_to_resend = replay.len(),
            "restored aggregate state from checkpoint"
        );
        emit_pending(replay, out);
        Ok(())
    }

    pub(super) fn snapshot_bytes(&self) -> Vec<u8> {
        let durability = self.durability.as_ref().expect("checked by the caller");
        let windows = self
            .windows
            .iter()
            .map(|(&(start, end), groups)| WindowRef {
                start,
                end,
                groups: groups
                    .iter()
                    .map(|(key, state)| GroupRef {
                        key,
                        group: &state.group,
                        accs: &state.accs,
                        revision: state.revision,
                    })
                    .collect(),
            })
            .collect();
        let mut snapshot = durability.snapshot(windows);
        snapshot.sessions = self.sessions.iter().flat_map(|(k, list)| list.iter().map(|w| (k.clone(), *w))).collect();
        snapshot.gauges = self.gauges.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        snapshot.max_event_time = self.max_event_time;
        snapshot.closed_early = self.closed_early;
        snapshot.last_slide_emitted = self.last_slide_emitted;
        // Values and accumulators always serialize; an empty snapshot would only mean a fresh start.
        conflux_api::sonic_rs::to_vec(&snapshot).unwrap_or_default()
    }

    /// Writes a snapshot; once durable, the sources of everything in it are acknowledged.
    pub(super) async fn checkpoint(&mut self, out: &mut Emitter) {
        let Some(durability) = self.durability.as_mut() else { return };
        emit_pending(durability.settle(), out);
        let bytes = self.snapshot_bytes();
        let size = bytes.len();
        let durability = self.durability.as_mut().expect("checked above");
        let started = Instant::now();
        match durability.store.save(bytes).await {
            Ok(()) => {
                debug!(
                    component = %self.component,
                    bytes = size,
                    acknowledged = durability.held(),
                    took = ?started.elapsed(),
                    "checkpoint saved"
                );
                durability.saved();
            }
            Err(e) => {
                durability.failed();
                warn!(
                    component = %self.component,
                    error = %e,
                    waiting = durability.held(),
                    "checkpoint failed; sources stay unacknowledged until one succeeds"
                );
            }
        }
    }

    pub(super) async fn checkpoint_if_due(&mut self, out: &mut Emitter) {
        if self.durability.as_ref().is_some_and(Durability::due) {
            self.checkpoint(out).await;
        }
    }
}
