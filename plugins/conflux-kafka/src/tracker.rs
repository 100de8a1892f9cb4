//! Which offsets may be committed: per partition, ranges of offsets in
//! flight, committed only up to the first range not yet acknowledged (a gap
//! holds the commit back). A failed range asks for a seek back so it is
//! redelivered, after a wait that doubles with each consecutive failure of
//! the partition (a persistently failing output must not spin the consumer);
//! revoked partitions give up their state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conflux_api::AckStatus;

/// Topic and partition.
pub type Tp = (Arc<str>, i32);

#[derive(Debug)]
struct Partition {
    /// Changes when the partition is reset, so late acknowledgements of an earlier life are ignored.
    generation: u64,
    /// First offset of each range in flight → (last offset, acknowledged).
    inflight: BTreeMap<i64, (i64, bool)>,
    /// Next offset to commit, once everything before it is done.
    done_up_to: Option<i64>,
    committed: Option<i64>,
    /// Earliest offset whose delivery failed: seek back there.
    failed: Option<i64>,
    /// Failures since the last success: sets the wait before reading again.
    failures: u32,
    /// Paused after a failure: read again from this offset at this time.
    retry: Option<(Instant, i64)>,
}

/// How long a partition waits before a failed event is read again.
pub use conflux_api::Backoff;

#[derive(Debug, Default)]
pub struct Tracker {
    parts: HashMap<Tp, Partition>,
    next_generation: u64,
    /// Events read and not yet acknowledged, all partitions together.
    pub unacked: usize,
}

impl Tracker {
    fn fresh(&mut self) -> Partition {
        self.next_generation += 1;
        Partition {
            generation: self.next_generation,
            inflight: BTreeMap::new(),
            done_up_to: None,
            committed: None,
            failed: None,
            failures: 0,
            retry: None,
        }
    }

    /// Records a range handed to the pipeline; returns its generation.
    pub fn track(&mut self, tp: &Tp, first: i64, last: i64) -> u64 {
        if !self.parts.contains_key(tp) {
            let p = self.fresh();
            self.parts.insert(tp.clone(), p);
        }
        let p = self.parts.get_mut(tp).expect("inserted");
        p.inflight.insert(first, (last, false));
        self.unacked += (last - first + 1) as usize;
        p.generation
    }

    /// The pipeline finished a range.
    pub fn done(&mut self, tp: &Tp, first: i64, generation: u64, status: AckStatus) {
        let Some(p) = self.parts.get_mut(tp) else { return };
        if p.generation != generation {
            return;
        }
        let Some(entry) = p.inflight.get_mut(&first) else { return };
        if status == AckStatus::Errored {
            p.failed = Some(p.failed.map_or(first, |f| f.min(first)));
            return;
        }
        // Delivered, or rejected for good (counted and logged by the engine): either way, done.
        entry.1 = true;
        p.failures = 0;
        self.unacked -= (entry.0 - first + 1) as usize;
        while let Some((&start, &(last, true))) = p.inflight.first_key_value() {
            p.inflight.remove(&start);
            p.done_up_to = Some(last + 1);
        }
    }

    /// Offsets to commit now (those that moved since the last commit).
    pub fn due(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.parts {
            if let Some(next) = p.done_up_to {
                if p.committed != Some(next) {
                    out.push((tp.clone(), next));
                }
            }
        }
        out
    }

    /// Notes a successful commit.
    pub fn committed(&mut self, tp: &Tp, offset: i64) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.committed = Some(offset);
        }
    }

    /// Partitions with a failed range, to pause: their state starts over and
    /// they wait (returned) before [`Tracker::due_retries`] hands them back.
    pub fn take_failed(&mut self, now: Instant, backoff: Backoff) -> Vec<(Tp, i64, Duration)> {
        let failed: Vec<(Tp, i64)> =
            self.parts.iter().filter_map(|(tp, p)| p.failed.map(|f| (tp.clone(), f))).collect();
        let mut out = Vec::with_capacity(failed.len());
        for (tp, offset) in failed {
            let failures = self.parts.get(&tp).map_or(0, |p| p.failures) + 1;
            self.reset(&tp, true);
            let wait = backoff.wait(failures);
            if let Some(p) = self.parts.get_mut(&tp) {
                p.failures = failures;
                p.retry = Some((now + wait, offset));
            }
            out.push((tp, offset, wait));
        }
        out
    }

    /// Partitions whose wait after a failure is over: the offset to read again from.
    pub fn due_retries(&mut self, now: Instant) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.parts {
            if let Some((at, offset)) = p.retry {
                if at <= now {
                    p.retry = None;
                    out.push((tp.clone(), offset));
                }
            }
        }
        out
    }

    /// Makes a partition wait again (its seek back failed).
    pub fn retry_later(&mut self, tp: &Tp, offset: i64, at: Instant) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.retry = Some((at, offset));
        }
    }

    /// Whether a partition is waiting after a failure (what it reads meanwhile is stale).
    pub fn waiting(&self, tp: &Tp) -> bool {
        self.parts.get(tp).is_some_and(|p| p.retry.is_some())
    }

    /// Partitions waiting after a failure.
    pub fn waiting_count(&self) -> usize {
        self.parts.values().filter(|p| p.retry.is_some()).count()
    }

    /// When the next waiting partition is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.parts.values().filter_map(|p| p.retry.map(|(at, _)| at)).min()
    }

    /// Forgets a partition (revoked, or seeking back); returns what may still be committed.
    pub fn reset(&mut self, tp: &Tp, keep: bool) -> Option<i64> {
        let old = self.parts.remove(tp)?;
        let pending: usize = old
            .inflight
            .iter()
            .filter(|(_, (_, done))| !done)
            .map(|(first, (last, _))| (last - first + 1) as usize)
            .sum();
        self.unacked -= pending;
        let commit = old.done_up_to.filter(|next| old.committed != Some(*next));
        if keep {
            let mut p = self.fresh();
            p.done_up_to = old.done_up_to;
            p.committed = old.committed;
            p.failures = old.failures;
            self.parts.insert(tp.clone(), p);
        }
        commit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(350) };

    fn tp() -> Tp {
        (Arc::from("t"), 0)
    }

    #[test]
    fn a_gap_holds_the_commit_back() {
        let mut t = Tracker::default();
        let g = t.track(&tp(), 0, 9);
        t.track(&tp(), 10, 19);
        t.track(&tp(), 20, 29);
        t.done(&tp(), 10, g, AckStatus::Delivered);
        t.done(&tp(), 20, g, AckStatus::Rejected);
        assert!(t.due().is_empty(), "offsets 0-9 are not done");
        t.done(&tp(), 0, g, AckStatus::Delivered);
        assert_eq!(t.due(), vec![(tp(), 30)]);
        t.committed(&tp(), 30);
        assert!(t.due().is_empty());
        assert_eq!(t.unacked, 0);
    }

    #[test]
    fn failures_seek_back_and_late_acks_are_ignored() {
        let mut t = Tracker::default();
        let g = t.track(&tp(), 0, 9);
        t.track(&tp(), 10, 19);
        t.done(&tp(), 0, g, AckStatus::Delivered);
        t.done(&tp(), 10, g, AckStatus::Errored);
        let now = Instant::now();
        assert_eq!(t.take_failed(now, BACKOFF), vec![(tp(), 10, Duration::from_millis(100))]);
        assert_eq!(t.unacked, 0);
        assert_eq!(t.due(), vec![(tp(), 10)], "what was done before the failure still commits");
        let g2 = t.track(&tp(), 10, 19);
        t.done(&tp(), 10, g, AckStatus::Delivered);
        assert_eq!(t.due(), vec![(tp(), 10)], "an acknowledgement from before the seek counts for nothing");
        t.done(&tp(), 10, g2, AckStatus::Delivered);
        assert_eq!(t.due(), vec![(tp(), 20)]);
    }

    #[test]
    fn revoking_returns_the_pending_commit() {
        let mut t = Tracker::default();
        let g = t.track(&tp(), 0, 4);
        t.track(&tp(), 5, 9);
        t.done(&tp(), 0, g, AckStatus::Delivered);
        assert_eq!(t.reset(&tp(), false), Some(5));
        assert_eq!(t.unacked, 0);
        t.done(&tp(), 5, g, AckStatus::Delivered);
        assert!(t.due().is_empty());
    }

    #[test]
    fn the_wait_after_a_failure_doubles_up_to_the_cap_and_resets_on_success() {
        assert_eq!(BACKOFF.wait(1), Duration::from_millis(100));
        assert_eq!(BACKOFF.wait(2), Duration::from_millis(200));
        assert_eq!(BACKOFF.wait(3), Duration::from_millis(350));
        assert_eq!(BACKOFF.wait(u32::MAX), Duration::from_millis(350));

        let mut t = Tracker::default();
        let start = Instant::now();
        let mut now = start;
        for expected in [100, 200, 350, 350] {
            let g = t.track(&tp(), 5, 9);
            t.done(&tp(), 5, g, AckStatus::Errored);
            let failed = t.take_failed(now, BACKOFF);
            assert_eq!(failed, vec![(tp(), 5, Duration::from_millis(expected))]);
            assert!(t.waiting(&tp()));
            assert_eq!(t.next_retry(), Some(now + Duration::from_millis(expected)));
            assert!(t.due_retries(now).is_empty(), "not before the wait is over");
            now += Duration::from_millis(expected);
            assert_eq!(t.due_retries(now), vec![(tp(), 5)]);
            assert!(!t.waiting(&tp()));
        }
        let g = t.track(&tp(), 5, 9);
        t.done(&tp(), 5, g, AckStatus::Delivered);
        let g = t.track(&tp(), 10, 12);
        t.done(&tp(), 10, g, AckStatus::Errored);
        assert_eq!(t.take_failed(now, BACKOFF)[0].2, Duration::from_millis(100), "a success starts the wait over");
        assert_eq!(t.waiting_count(), 1);
        assert_eq!(t.reset(&tp(), false), Some(10));
        assert_eq!(t.waiting_count(), 0, "a revoked partition waits no more");
    }
}
