//! A client's queue of frames not yet written to its socket, bounded in
//! bytes, and what happens when a slow client fills it: the connection is
//! closed, the oldest frames are dropped, or updates of the same key are
//! conflated into the latest one (a slow dashboard still converges to the
//! truth). One stalled client never holds more than its bound, and never
//! slows the others or the pipeline.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

/// What a full queue does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SlowClient {
    /// Close the connection: the client reconnects and resumes by sequence.
    #[default]
    Disconnect,
    /// Drop the oldest frames to make room.
    DropOldest,
    /// Replace a queued update of the same key with the new one; drop the
    /// oldest frames when that is not enough.
    Conflate,
}

/// A frame waiting to be written, with the key updates of it conflate under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// `channel` + state key; `None`: never conflated.
    pub conflate_key: Option<Arc<str>>,
    pub frame: Bytes,
}

/// What [`ClientQueue::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued after dropping this many older frames.
    DroppedOldest(usize),
    /// Took the place of a queued update of the same key.
    Conflated,
    /// The queue is full and the policy is to close the connection.
    Disconnect,
}

/// One client's bounded queue.
#[derive(Debug)]
pub struct ClientQueue {
    max_bytes: usize,
    policy: SlowClient,
    items: VecDeque<Queued>,
    bytes: usize,
}

impl ClientQueue {
    pub fn new(max_bytes: usize, policy: SlowClient) -> ClientQueue {
        ClientQueue { max_bytes, policy, items: VecDeque::new(), bytes: 0 }
    }

    /// Bytes of the frames queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queues a frame under the client's policy. A frame larger than the
    /// whole bound is still taken when the queue is empty (it could never
    /// be sent otherwise).
    pub fn push(&mut self, item: Queued) -> Pushed {
        let size = item.frame.len();
        if self.bytes + size <= self.max_bytes || self.items.is_empty() {
            self.bytes += size;
            self.items.push_back(item);
            return Pushed::Queued;
        }
        match self.policy {
            SlowClient::Disconnect => Pushed::Disconnect,
            SlowClient::DropOldest => Pushed::DroppedOldest(self.make_room_and_push(item)),
            SlowClient::Conflate => {
                let same = item
                    .conflate_key
                    .as_ref()
                    .and_then(|key| self.items.iter().rposition(|q| q.conflate_key.as_ref() == Some(key)));
                match same {
                    // The last queued update of the key: what follows it is newer, so order holds.
                    Some(at) => {
                        self.bytes = self.bytes - self.items[at].frame.len() + size;
                        self.items[at] = item;
                        if self.bytes > self.max_bytes {
                            // The new update is larger than the one it replaced.
                            let dropped = self.drop_oldest_except_last();
                            return if dropped > 0 { Pushed::DroppedOldest(dropped) } else { Pushed::Conflated };
                        }
                        Pushed::Conflated
                    }
                    None => Pushed::DroppedOldest(self.make_room_and_push(item)),
                }
            }
        }
    }

    /// Queues a frame past the bound: what a subscription starts with
    /// (`initial_state`, what it missed) and replies to the client. They
    /// are bounded by the channel's history and state, not by the client.
    pub fn push_always(&mut self, item: Queued) {
        self.bytes += item.frame.len();
        self.items.push_back(item);
    }

    fn make_room_and_push(&mut self, item: Queued) -> usize {
        let size = item.frame.len();
        let mut dropped = 0;
        while !self.items.is_empty() && self.bytes + size > self.max_bytes {
            if let Some(old) = self.items.pop_front() {
                self.bytes -= old.frame.len();
                dropped += 1;
            }
        }
        self.bytes += size;
        self.items.push_back(item);
        dropped
    }

    fn drop_oldest_except_last(&mut self) -> usize {
        let mut dropped = 0;
        while self.items.len() > 1 && self.bytes > self.max_bytes {
            if let Some(old) = self.items.pop_front() {
                self.bytes -= old.frame.len();
                dropped += 1;
            }
        }
        dropped
    }

    /// The next frame to write.
    pub fn pop(&mut self) -> Option<Queued> {
        let item = self.items.pop_front()?;
        self.bytes -= item.frame.len();
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: Option<&str>, text: &str) -> Queued {
        Queued { conflate_key: key.map(Arc::from), frame: Bytes::copy_from_slice(text.as_bytes()) }
    }

    fn drain(queue: &mut ClientQueue) -> Vec<String> {
        std::iter::from_fn(|| queue.pop()).map(|q| String::from_utf8(q.frame.to_vec()).unwrap()).collect()
    }

    #[test]
    fn a_full_queue_disconnects_by_default() {
        let mut queue = ClientQueue::new(8, SlowClient::default());
        assert_eq!(queue.push(item(None, "abcd")), Pushed::Queued);
        assert_eq!(queue.push(item(None, "efgh")), Pushed::Queued);
        assert_eq!(queue.push(item(None, "i")), Pushed::Disconnect);
        assert_eq!(queue.bytes(), 8, "nothing past the bound is held");
    }

    #[test]
    fn drop_oldest_keeps_the_newest_frames_within_the_bound() {
        let mut queue = ClientQueue::new(8, SlowClient::DropOldest);
        for text in ["aaaa", "bbbb", "cccc"] {
            queue.push(item(None, text));
        }
        assert_eq!(queue.push(item(None, "dd")), Pushed::DroppedOldest(1));
        assert_eq!(drain(&mut queue), ["cccc", "dd"]);
        assert_eq!(queue.bytes(), 0);
    }

    #[test]
    fn conflate_keeps_the_latest_update_per_key_so_a_slow_client_converges() {
        let mut queue = ClientQueue::new(6, SlowClient::Conflate);
        queue.push(item(Some("r1"), "a1"));
        queue.push(item(Some("r2"), "b1"));
        queue.push(item(Some("r1"), "a2"));
        assert_eq!(queue.push(item(Some("r1"), "a3")), Pushed::Conflated);
        assert_eq!(queue.push(item(Some("r2"), "b2")), Pushed::Conflated);
        // r1 and r2 each end at their latest value, in an order that never shows an older one last.
        assert_eq!(drain(&mut queue), ["a1", "b2", "a3"]);
    }

    #[test]
    fn a_frame_larger_than_the_bound_is_taken_by_an_empty_queue() {
        let mut queue = ClientQueue::new(2, SlowClient::Disconnect);
        assert_eq!(queue.push(item(None, "too large")), Pushed::Queued);
        assert_eq!(queue.push(item(None, "x")), Pushed::Disconnect);
    }
}
