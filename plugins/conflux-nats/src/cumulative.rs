//! Bookkeeping for JetStream's `all` acknowledgement policy, where one ack
//! of stream sequence `s` covers every message pending at or below `s`.
//!
//! Such an ack is safe only when every pending message at or below `s` is
//! one this session was handed and the pipeline is done with. Two things
//! can break that, and this module guards against both:
//!
//! - **Messages an earlier session left pending.** After a restart the
//!   server sends new messages before it redelivers the old pending ones
//!   (they wait out `ack_wait`), so a cumulative ack of a new message would
//!   cover old ones nobody processed. Until every such message is back,
//!   nothing is acknowledged (`CumulativeAcks::server_pending` opens the gate).
//! - **Failures.** A failed (nak'ed) message holds the ack point below it
//!   until its redelivery is done, as a gap holds a Kafka commit back.
//!
//! The server also ignores an `all` ack whose delivery sequence is not
//! above the one of the previous ack (a redelivered message has a high
//! delivery sequence, a message delivered before it a lower one), so the
//! message an ack is sent for is always one delivered after the last acked.
//! Generic over `M` (the message) so it is tested without a server.
//! A failed message is simply never marked done here: it is nak'ed, comes
//! back, and its redelivery is announced and done like any other.

use std::collections::BTreeMap;

/// Where a message sits in its stream and in the consumer's deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequences {
    /// Stream sequence: the message's place in the stream.
    pub stream: u64,
    /// Consumer (delivery) sequence: grows with every delivery, redeliveries included.
    pub delivery: u64,
}

/// The messages handed to the pipeline and not yet acknowledged, by stream
/// sequence. Bounded by the consumer's `max_ack_pending`: the server hands
/// out no more than that unacknowledged.
#[derive(Debug)]
pub struct CumulativeAcks<M> {
    /// `None` while the pipeline works on (or will see again) the message;
    /// the done message (its latest delivery) once it is confirmed or rejected.
    open: BTreeMap<u64, Option<(M, u64)>>,
    /// Delivery sequence of the last ack sent; the server ignores an `all` ack at or below it.
    last_acked_delivery: u64,
    /// Holds every ack back while messages an earlier session left pending
    /// may still come back. It opens when the server counts no more pending
    /// messages than this session holds (a count taken before the server was
    /// asked, so a message delivered meanwhile can keep it shut, never open it).
    gated: bool,
}

impl<M> CumulativeAcks<M> {
    /// `pending_at_start`: the consumer's `num_ack_pending` when the session began.
    pub fn new(pending_at_start: u64) -> Self {
        CumulativeAcks { open: BTreeMap::new(), last_acked_delivery: 0, gated: pending_at_start > 0 }
    }

    /// A message was handed to the pipeline (announced before its event can finish).
    pub fn delivered(&mut self, stream_sequence: u64) {
        self.open.entry(stream_sequence).or_insert(None);
    }

    /// The pipeline is done with a message (confirmed, or rejected on
    /// purpose): it is not to come back. A message no longer tracked
    /// (already covered by an ack) is dropped.
    pub fn done(&mut self, message: M, at: Sequences) {
        if let Some(slot) = self.open.get_mut(&at.stream) {
            let newer = slot.as_ref().is_none_or(|(_, delivery)| at.delivery > *delivery);
            if newer {
                *slot = Some((message, at.delivery));
            }
        }
    }

    /// Whether acks are held back for an earlier session's pending messages.
    pub fn gated(&self) -> bool {
        self.gated
    }

    /// How many distinct messages this session holds unacknowledged; take it
    /// *before* asking the server for its pending count.
    pub fn held(&self) -> u64 {
        self.open.len() as u64
    }

    /// Opens the gate when the server's pending count (asked after `held`
    /// was taken) is no more than what this session held: every message an
    /// earlier session left pending has come back.
    pub fn server_pending(&mut self, held_before_asking: u64, server_pending: u64) {
        if server_pending <= held_before_asking {
            self.gated = false;
        }
    }

    /// The message to acknowledge now, if any: the last of the done run at
    /// the bottom of the open messages. Acking it covers the run.
    pub fn ack_point(&mut self) -> Option<M> {
        if self.gated() {
            return None;
        }
        // The run: done entries from the lowest sequence up.
        let mut end = None;
        for (sequence, slot) in &self.open {
            match slot {
                Some(_) => end = Some(*sequence),
                None => break,
            }
        }
        let end = end?;
        // Pick the run's last entry, or failing that (the server would ignore
        // it) keep the run whole until a later delivery can stand for it.
        let (_, delivery) = self.open[&end].as_ref().expect("the run is done");
        if *delivery <= self.last_acked_delivery {
            return None;
        }
        self.last_acked_delivery = *delivery;
        let mut last = None;
        while let Some(entry) = self.open.first_entry() {
            let sequence = *entry.key();
            let slot = entry.remove();
            if sequence == end {
                last = slot;
                break;
            }
        }
        last.map(|(message, _)| message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(stream: u64, delivery: u64) -> Sequences {
        Sequences { stream, delivery }
    }

    /// Delivers sequences 1..=n with delivery sequence = stream sequence.
    fn delivered(acks: &mut CumulativeAcks<u64>, range: std::ops::RangeInclusive<u64>) {
        for s in range {
            acks.delivered(s);
        }
    }

    #[test]
    fn one_ack_covers_a_done_run_and_a_gap_holds_it_back() {
        let mut acks = CumulativeAcks::new(0);
        delivered(&mut acks, 1..=5);
        for s in [1, 2, 4, 5] {
            acks.done(s, at(s, s));
        }
        assert_eq!(acks.ack_point(), Some(2), "3 is still in the pipeline");
        assert_eq!(acks.ack_point(), None, "nothing new");
        acks.done(3, at(3, 3));
        assert_eq!(acks.ack_point(), Some(5));
        assert_eq!(acks.held(), 0);
    }

    #[test]
    fn a_failed_message_holds_the_point_until_its_redelivery_is_done() {
        let mut acks = CumulativeAcks::new(0);
        delivered(&mut acks, 1..=4);
        acks.done(1, at(1, 1));
        // 2 failed: nak'ed, never marked done.
        acks.done(3, at(3, 3));
        acks.done(4, at(4, 4));
        assert_eq!(acks.ack_point(), Some(1));
        // Redelivered as delivery 5: announced again, then done.
        acks.delivered(2);
        assert_eq!(acks.ack_point(), None);
        acks.done(2, at(2, 5));
        assert_eq!(acks.ack_point(), Some(4), "message 4 (delivery 4 > 1) stands for 2..=4");
    }

    #[test]
    fn the_run_is_acked_with_its_last_message_even_when_an_earlier_one_was_redelivered_later() {
        let mut acks = CumulativeAcks::new(0);
        delivered(&mut acks, 1..=3);
        acks.done(2, at(2, 2));
        acks.done(3, at(3, 3));
        // 1 failed and came back as delivery 4.
        acks.delivered(1);
        acks.done(1, at(1, 4));
        assert_eq!(acks.ack_point(), Some(3), "stream sequence 3 covers 1..=3");
        delivered(&mut acks, 4..=5);
        acks.done(4, at(4, 5));
        acks.done(5, at(5, 6));
        assert_eq!(acks.ack_point(), Some(5), "delivery 6 > 3");
    }

    #[test]
    fn a_stale_last_delivery_keeps_the_run_until_a_newer_one_extends_it() {
        let mut acks = CumulativeAcks::new(0);
        delivered(&mut acks, 1..=2);
        // 1 redelivered late (delivery 5), 2 delivered once (delivery 2).
        acks.done(1, at(1, 5));
        assert_eq!(acks.ack_point(), Some(1));
        acks.done(2, at(2, 2));
        assert_eq!(acks.ack_point(), None, "the server would ignore delivery 2 after 5");
        assert_eq!(acks.held(), 1, "kept, not forgotten");
        acks.delivered(3);
        acks.done(3, at(3, 6));
        assert_eq!(acks.ack_point(), Some(3), "3 covers 2 as well");
        assert_eq!(acks.held(), 0);
    }

    #[test]
    fn nothing_is_acked_until_an_earlier_sessions_pending_messages_are_back() {
        // The earlier session left 2 messages pending (stream sequences 1 and 2).
        let mut acks = CumulativeAcks::new(2);
        // New messages arrive first and finish.
        delivered(&mut acks, 3..=4);
        acks.done(3, at(3, 3));
        acks.done(4, at(4, 4));
        assert_eq!(acks.ack_point(), None, "an ack of 4 would cover 1 and 2");
        // The server counts 4 pending; this session holds 2: two are still out there.
        let held = acks.held();
        acks.server_pending(held, 4);
        assert!(acks.gated());
        acks.delivered(1);
        acks.delivered(2);
        let held = acks.held();
        acks.server_pending(held, 4);
        assert!(!acks.gated(), "all four pending messages are this session's");
        assert_eq!(acks.ack_point(), None, "1 and 2 are still in the pipeline");
        acks.done(2, at(2, 6));
        acks.done(1, at(1, 5));
        assert_eq!(acks.ack_point(), Some(4));
    }

    #[test]
    fn a_message_already_covered_is_not_tracked_again() {
        let mut acks = CumulativeAcks::new(0);
        delivered(&mut acks, 1..=2);
        acks.done(1, at(1, 1));
        acks.done(2, at(2, 2));
        assert_eq!(acks.ack_point(), Some(2));
        acks.done(1, at(1, 3));
        assert_eq!(acks.held(), 0);
        assert_eq!(acks.ack_point(), None);
    }
}
