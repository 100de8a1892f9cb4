//! Acknowledging stream entries once the pipeline is done with them.
//!
//! Every entry handed to the pipeline is *outstanding* until its token
//! resolves and, when it was confirmed, its `XACK` went through. The reader
//! skips outstanding entries when it reads its own pending list again or
//! claims idle ones (no duplicate of an event still on its way), and stops
//! reading while `max_unacked` are outstanding.
//!
//! Delivered and rejected entries are acknowledged (a rejected one would
//! fail again: it went to a dead letter or was counted as discarded). A
//! failed entry is not: it stays in the group's pending list and is claimed
//! again once idle for `claim_after`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conflux_api::{AckStatus, AckToken, Backoff};
use tokio::sync::{mpsc, Notify};

use crate::RedisConn;

/// An entry: its stream's index among the input's streams, and its id.
pub(super) type Key = (usize, String);

/// The entries read and not yet settled, shared by the reader, the tokens
/// and the acknowledging task.
#[derive(Default)]
pub(super) struct Outstanding {
    keys: Mutex<HashSet<Key>>,
    /// Fires whenever entries are settled, for a reader waiting on `max_unacked`.
    settled: Notify,
}

impl Outstanding {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashSet<Key>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.keys().len()
    }

    /// Records an entry about to be handed on; `false` when it already is outstanding.
    pub fn insert(&self, key: Key) -> bool {
        self.keys().insert(key)
    }

    fn settle(&self, keys: impl Iterator<Item = Key>) {
        {
            let mut held = self.keys();
            for key in keys {
                held.remove(&key);
            }
        }
        self.settled.notify_waiters();
    }

    /// Waits until fewer than `limit` entries are outstanding.
    pub async fn below(&self, limit: usize) {
        loop {
            let settled = self.settled.notified();
            if self.len() < limit {
                return;
            }
            settled.await;
        }
    }
}

/// What a token reports when the pipeline is done with an entry.
pub(super) struct Done {
    key: Key,
    status: AckStatus,
}

/// Hands out tokens that report to the acknowledging task.
#[derive(Clone)]
pub(super) struct Acks {
    tx: mpsc::UnboundedSender<Done>,
}

impl Acks {
    /// A token for one entry, already recorded as outstanding.
    pub fn token(&self, key: Key) -> AckToken {
        let tx = self.tx.clone();
        AckToken::new(move |status| {
            let _ = tx.send(Done { key, status });
        })
    }

    /// Acknowledges an entry that never reaches the pipeline (trimmed from the stream).
    pub fn settle_now(&self, key: Key) {
        let _ = self.tx.send(Done { key, status: AckStatus::Delivered });
    }
}

/// The most `XACK`s sent in one round trip.
const MOST_PER_ROUND: usize = 4096;
/// Retries of a failed round of acknowledgements: Redis gone for longer than
/// this costs redeliveries (the entries stay pending and are claimed again), not more.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
const RETRY_BUDGET: Duration = Duration::from_secs(30);

/// Starts the task that acknowledges settled entries, on a connection of its
/// own (the reader's blocks in `XREADGROUP`). It ends once every token and
/// the returned [`Acks`] are gone.
pub(super) fn start(mut conn: RedisConn, group: String, streams: Arc<[String]>, outstanding: Arc<Outstanding>) -> Acks {
    let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
    tokio::spawn(async move {
        let mut done = Vec::with_capacity(MOST_PER_ROUND);
        while rx.recv_many(&mut done, MOST_PER_ROUND).await > 0 {
            let mut ids: Vec<Vec<&str>> = vec![Vec::new(); streams.len()];
            let mut failed = 0;
            for Done { key: (stream, id), status } in &done {
                match status {
                    AckStatus::Delivered | AckStatus::Rejected => ids[*stream].push(id),
                    AckStatus::Errored => failed += 1,
                }
            }
            if failed > 0 {
                tracing::debug!(entries = failed, "delivery failed; the entries stay pending and are claimed again");
            }
            let mut pipe = redis::pipe();
            for (stream, ids) in streams.iter().zip(&ids).filter(|(_, ids)| !ids.is_empty()) {
                pipe.cmd("XACK").arg(stream).arg(&group).arg(ids).ignore();
            }
            if ids.iter().any(|ids| !ids.is_empty()) {
                if let Err(e) = conn.query_pipe_retrying::<()>(&pipe, RETRY, RETRY_BUDGET).await {
                    tracing::warn!(
                        url = %conn.url(),
                        error = %e,
                        "cannot acknowledge stream entries; they stay pending and will be delivered again"
                    );
                }
            }
            outstanding.settle(done.drain(..).map(|d| d.key));
        }
    });
    Acks { tx }
}
