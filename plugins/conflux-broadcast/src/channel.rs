//! One channel: every published event carries a sequence number that grows
//! (one sequence for the whole channel space, so one cursor covers every
//! channel of a connection; channels see gaps between theirs), the
//! last events are kept (bounded by count and age) so a client that
//! reconnects with the last sequence it saw gets what it missed, and the
//! latest event per key is kept so a new subscriber starts from the whole
//! current state (`initial_state` as of sequence N, then only what comes
//! after N: no gap, no duplicate between the two).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How much a channel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLimits {
    /// Events kept for resuming.
    pub history: usize,
    /// Oldest event kept for resuming.
    pub history_age: Duration,
    /// Keys whose latest event is kept for `initial_state`; past it the
    /// least recently updated key is forgotten.
    pub max_keys: usize,
}

impl Default for ChannelLimits {
    fn default() -> Self {
        ChannelLimits { history: 1000, history_age: Duration::from_secs(300), max_keys: 10_000 }
    }
}

/// A published event: its sequence in the channel, its state key if it
/// has one, and its frame, encoded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub key: Option<String>,
    pub frame: Bytes,
}

/// What a reconnecting client gets for its cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Everything after the cursor, in order.
    Missed(Vec<Entry>),
    /// The cursor is older than the history (or from another epoch of the
    /// channel): start again from the whole state.
    Reset { seq: u64, state: Vec<Entry> },
}

#[derive(Debug)]
struct Kept {
    entry: Entry,
    at: Instant,
}

/// A channel's sequence, history and state.
#[derive(Debug)]
pub struct Channel {
    limits: ChannelLimits,
    /// Sequence of the last published event (0: none yet).
    seq: u64,
    /// Every event of this channel after this sequence is in `history`: it
    /// grows as history is trimmed, and starts where the channel space
    /// began to be watched (a late instance knows nothing before it).
    complete_after: u64,
    history: VecDeque<Kept>,
    /// Latest entry per key.
    state: HashMap<String, Entry>,
}

impl Channel {
    pub fn new(limits: ChannelLimits) -> Channel {
        Channel::watched_after(limits, 0)
    }

    /// A channel whose events up to `seq` were never seen here.
    pub fn watched_after(limits: ChannelLimits, seq: u64) -> Channel {
        Channel { limits, seq, complete_after: seq, history: VecDeque::new(), state: HashMap::new() }
    }

    /// Sequence of the last event published.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends an event; returns its entry (to send to the subscribers).
    pub fn publish(&mut self, key: Option<String>, frame: Bytes, now: Instant) -> Entry {
        self.publish_at(self.seq + 1, key, frame, now).unwrap_or_else(|| unreachable!("the next sequence is new"))
    }

    /// Appends an event whose sequence was given where it was published
    /// (fan-out across instances). A sequence at or below the channel's is
    /// one this instance has already seen: `None`, nothing changes.
    pub fn publish_at(&mut self, seq: u64, key: Option<String>, frame: Bytes, now: Instant) -> Option<Entry> {
        if seq <= self.seq {
            return None;
        }
        self.seq = seq;
        let entry = Entry { seq, key, frame };
        if let Some(key) = &entry.key {
            if !self.state.contains_key(key) && self.state.len() >= self.limits.max_keys {
                self.forget_oldest_key();
            }
            self.state.insert(key.clone(), entry.clone());
        }
        self.history.push_back(Kept { entry: entry.clone(), at: now });
        self.trim(now);
        Some(entry)
    }

    /// Drops history past its count and age.
    pub fn trim(&mut self, now: Instant) {
        while self.history.len() > self.limits.history
            || self.history.front().is_some_and(|k| now.duration_since(k.at) > self.limits.history_age)
        {
            if let Some(dropped) = self.history.pop_front() {
                self.complete_after = dropped.entry.seq;
            }
        }
    }

    fn forget_oldest_key(&mut self) {
        if let Some(oldest) = self.state.values().min_by_key(|e| e.seq).and_then(|e| e.key.clone()) {
            self.state.remove(&oldest);
        }
    }

    /// The latest entry of every key, in sequence order, as of [`Channel::seq`].
    pub fn state(&self) -> Vec<Entry> {
        let mut state: Vec<Entry> = self.state.values().cloned().collect();
        state.sort_by_key(|e| e.seq);
        state
    }

    /// What a client that last saw `cursor` gets: the events after it if
    /// the history still holds them all, else the whole state again.
    /// `latest` is the newest sequence of the channel space: a cursor past
    /// it comes from before a restart.
    pub fn resume(&self, cursor: u64, latest: u64) -> Resume {
        if cursor > latest.max(self.seq) || cursor < self.complete_after {
            return Resume::Reset { seq: self.seq, state: self.state() };
        }
        Resume::Missed(self.history.iter().filter(|k| k.entry.seq > cursor).map(|k| k.entry.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn limits(history: usize) -> ChannelLimits {
        ChannelLimits { history, history_age: Duration::from_secs(60), max_keys: 3 }
    }

    #[test]
    fn state_then_updates_after_it_leave_no_gap_and_no_duplicate() {
        let now = Instant::now();
        let mut channel = Channel::new(limits(100));
        for (i, key) in ["a", "b", "a", "c"].iter().enumerate() {
            channel.publish(Some(key.to_string()), frame(&format!("{key}{i}")), now);
        }
        let (seq, state) = (channel.seq(), channel.state());
        assert_eq!(seq, 4);
        let frames: Vec<&[u8]> = state.iter().map(|e| &e.frame[..]).collect();
        assert_eq!(frames, [&b"b1"[..], b"a2", b"c3"], "latest per key, in sequence order");
        channel.publish(Some("b".into()), frame("b4"), now);
        assert_eq!(
            channel.resume(seq, 5),
            Resume::Missed(vec![Entry { seq: 5, key: Some("b".into()), frame: frame("b4") }])
        );
        assert_eq!(channel.resume(5, 5), Resume::Missed(Vec::new()));
    }

    #[test]
    fn a_cursor_older_than_the_history_starts_again_from_the_state() {
        let now = Instant::now();
        let mut channel = Channel::new(limits(2));
        for i in 0..5 {
            channel.publish(Some(format!("k{}", i % 2)), frame(&i.to_string()), now);
        }
        // History holds 4 and 5: a client at 3 misses nothing it cannot get.
        assert!(matches!(channel.resume(3, 5), Resume::Missed(m) if m.iter().map(|e| e.seq).eq([4, 5])));
        match channel.resume(2, 5) {
            Resume::Reset { seq, state } => {
                assert_eq!(seq, 5);
                assert_eq!(state.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(channel.resume(9, 5), Resume::Reset { seq: 5, .. }), "a cursor from the future");
    }

    #[test]
    fn history_is_bounded_by_age_and_state_by_keys() {
        let start = Instant::now();
        let mut channel = Channel::new(limits(100));
        channel.publish(None, frame("old"), start);
        channel.publish(None, frame("new"), start + Duration::from_secs(61));
        assert!(matches!(channel.resume(0, 2), Resume::Reset { .. }), "the first event aged out");
        for key in ["a", "b", "c", "d"] {
            channel.publish(Some(key.into()), frame(key), start + Duration::from_secs(62));
        }
        let keys: Vec<String> = channel.state().into_iter().filter_map(|e| e.key).collect();
        assert_eq!(keys, ["b", "c", "d"], "the least recently updated key is forgotten");
    }

    #[test]
    fn sequences_given_upstream_are_applied_once() {
        let now = Instant::now();
        let mut channel = Channel::new(limits(10));
        assert!(channel.publish_at(7, None, frame("x"), now).is_some());
        assert!(channel.publish_at(7, None, frame("x"), now).is_none(), "seen already");
        assert!(channel.publish_at(5, None, frame("y"), now).is_none());
        assert_eq!(channel.publish(None, frame("z"), now).seq, 8);
    }

    #[test]
    fn gaps_between_a_channels_sequences_are_other_channels_events() {
        let now = Instant::now();
        let mut channel = Channel::watched_after(limits(10), 100);
        assert!(matches!(channel.resume(40, 120), Resume::Reset { .. }), "before this instance watched");
        channel.publish_at(104, None, frame("a"), now);
        channel.publish_at(117, None, frame("b"), now);
        assert!(matches!(channel.resume(110, 120), Resume::Missed(m) if m.iter().map(|e| e.seq).eq([117])));
        assert!(matches!(channel.resume(100, 120), Resume::Missed(m) if m.len() == 2));
    }
}
