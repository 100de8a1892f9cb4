//! The channel space of one broadcast server: channels by name, each with
//! its subscribers. Publishing and subscribing take the same lock per
//! channel, so a subscriber's starting point (the state as of sequence N,
//! or what it missed since its cursor) and the updates after it meet
//! exactly: none lost between them, none sent twice. A publish never waits
//! for a client: it only appends to each subscriber's bounded queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::channel::{Channel, ChannelLimits, Entry, Resume};
use crate::queue::{ClientQueue, Pushed, Queued, SlowClient};

/// What happened to slow clients, for metrics.
#[derive(Debug, Default)]
pub struct SlowCounts {
    pub dropped: AtomicU64,
    pub conflated: AtomicU64,
    pub disconnected: AtomicU64,
}

/// One connection's side of the hub: its queue and a wake-up for the task
/// writing to its socket.
#[derive(Debug)]
pub struct Subscriber {
    queue: Mutex<ClientQueue>,
    ready: Notify,
    closed: AtomicBool,
}

impl Subscriber {
    pub fn new(max_queue_bytes: usize, slow_client: SlowClient) -> Arc<Subscriber> {
        Arc::new(Subscriber {
            queue: Mutex::new(ClientQueue::new(max_queue_bytes, slow_client)),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// The next frame to write, waiting for one; `None` once the hub closed
    /// the connection (its queue overflowed under `disconnect`).
    pub async fn next(&self) -> Option<Bytes> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(item) = self.lock().pop() {
                return Some(item.frame);
            }
            self.ready.notified().await;
        }
    }

    /// Frames queued, without waiting.
    pub fn try_next(&self) -> Option<Bytes> {
        self.lock().pop().map(|q| q.frame)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Bytes waiting in this subscriber's queue.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClientQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, item: Queued, counts: &SlowCounts) {
        match self.lock().push(item) {
            Pushed::Queued => {}
            Pushed::DroppedOldest(n) => {
                counts.dropped.fetch_add(n as u64, Ordering::Relaxed);
            }
            Pushed::Conflated => {
                counts.conflated.fetch_add(1, Ordering::Relaxed);
            }
            Pushed::Disconnect => {
                counts.disconnected.fetch_add(1, Ordering::Relaxed);
                self.closed.store(true, Ordering::Release);
            }
        }
        self.ready.notify_one();
    }
}

/// Where a new subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The latest entry per key as of `seq`; updates after `seq` follow in the queue.
    State { seq: u64, state: Vec<Entry> },
    /// The entries after the client's cursor; newer ones follow in the queue.
    Missed(Vec<Entry>),
}

struct Slot {
    channel: Channel,
    subscribers: Vec<Arc<Subscriber>>,
}

/// Every channel of one server.
pub struct Hub {
    limits: ChannelLimits,
    channels: Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
    pub slow: SlowCounts,
}

impl Hub {
    pub fn new(limits: ChannelLimits) -> Hub {
        Hub { limits, channels: Mutex::new(HashMap::new()), slow: SlowCounts::default() }
    }

    fn slot(&self, name: &str) -> Arc<Mutex<Slot>> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Slot { channel: Channel::new(self.limits), subscribers: Vec::new() }))
            })
            .clone()
    }

    /// Publishes on `channel`: `encode` makes the frame once the sequence is
    /// known (it is part of the frame), shared by every subscriber. Returns
    /// the sequence given. The event is in the channel's history when this
    /// returns: what an acknowledgement means for a broadcast.
    pub fn publish(&self, channel: &str, key: Option<String>, encode: impl FnOnce(u64) -> Bytes) -> u64 {
        let slot = self.slot(channel);
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        let seq = slot.channel.seq() + 1;
        let entry = slot.channel.publish(key.clone(), encode(seq), Instant::now());
        let conflate_key = key.map(|k| format!("{channel}\u{1f}{k}"));
        slot.subscribers.retain(|s| !s.is_closed());
        for subscriber in &slot.subscribers {
            subscriber.deliver(Queued { conflate_key: conflate_key.clone(), frame: entry.frame.clone() }, &self.slow);
        }
        entry.seq
    }

    /// Subscribes to `channel`, from its whole state or, with the sequence
    /// the client saw last, from what it missed (or the whole state when
    /// that is older than the history).
    pub fn subscribe(&self, channel: &str, subscriber: &Arc<Subscriber>, cursor: Option<u64>) -> Start {
        let slot = self.slot(channel);
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        let start = match cursor.map(|c| slot.channel.resume(c)) {
            Some(Resume::Missed(missed)) => Start::Missed(missed),
            Some(Resume::Reset { seq, state }) => Start::State { seq, state },
            None => Start::State { seq: slot.channel.seq(), state: slot.channel.state() },
        };
        slot.subscribers.push(subscriber.clone());
        start
    }

    /// Stops delivering `channel` to `subscriber`.
    pub fn unsubscribe(&self, channel: &str, subscriber: &Arc<Subscriber>) {
        let slot = self.slot(channel);
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.subscribers.retain(|s| !Arc::ptr_eq(s, subscriber));
    }

    /// Subscribers of a channel (closed ones already left out on the next publish).
    pub fn subscribers(&self, channel: &str) -> usize {
        let slot = self.slot(channel);
        let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.subscribers.iter().filter(|s| !s.is_closed()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, text: &str) -> Bytes {
        Bytes::from(format!("{seq}:{text}"))
    }

    fn drain(s: &Subscriber) -> Vec<String> {
        std::iter::from_fn(|| s.try_next()).map(|b| String::from_utf8(b.to_vec()).unwrap()).collect()
    }

    #[test]
    fn a_subscriber_gets_the_state_then_exactly_what_follows() {
        let hub = Hub::new(ChannelLimits::default());
        for i in 0..5 {
            hub.publish("r:1", Some(format!("k{}", i % 2)), |seq| frame(seq, &i.to_string()));
        }
        let s = Subscriber::new(1 << 20, SlowClient::Disconnect);
        let Start::State { seq, state } = hub.subscribe("r:1", &s, None) else {
            panic!("a new client starts from the state")
        };
        assert_eq!(seq, 5);
        assert_eq!(state.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        hub.publish("r:1", None, |seq| frame(seq, "x"));
        hub.publish("r:2", None, |seq| frame(seq, "other channel"));
        assert_eq!(drain(&s), ["6:x"]);
    }

    #[test]
    fn a_reconnecting_client_resumes_from_its_cursor() {
        let hub = Hub::new(ChannelLimits::default());
        for i in 0..3 {
            hub.publish("c", None, |seq| frame(seq, &i.to_string()));
        }
        let s = Subscriber::new(1 << 20, SlowClient::Disconnect);
        let Start::Missed(missed) = hub.subscribe("c", &s, Some(1)) else { panic!("within the history") };
        assert_eq!(missed.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn a_stalled_client_is_closed_and_never_slows_the_others() {
        let hub = Hub::new(ChannelLimits::default());
        let stalled = Subscriber::new(16, SlowClient::Disconnect);
        let reader = Subscriber::new(1 << 20, SlowClient::Disconnect);
        hub.subscribe("c", &stalled, None);
        hub.subscribe("c", &reader, None);
        let mut read = Vec::new();
        for i in 0..100 {
            hub.publish("c", None, |seq| frame(seq, &format!("event-{i}")));
            read.extend(drain(&reader));
        }
        assert_eq!(read.len(), 100, "the reading client got everything");
        assert!(stalled.is_closed());
        assert!(stalled.queued_bytes() <= 16);
        assert_eq!(hub.subscribers("c"), 1);
        assert_eq!(hub.slow.disconnected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn conflating_clients_converge_to_the_latest_value_per_key() {
        let hub = Hub::new(ChannelLimits::default());
        let slow = Subscriber::new(64, SlowClient::Conflate);
        hub.subscribe("c", &slow, None);
        for i in 0..1000 {
            hub.publish("c", Some(format!("k{}", i % 3)), |seq| frame(seq, &format!("k{}={i}", i % 3)));
        }
        let got = drain(&slow);
        let last: HashMap<String, String> = got
            .iter()
            .filter_map(|f| f.split_once(':').map(|(_, v)| v.split_once('=').unwrap()))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(last["k0"], "999");
        assert_eq!(last["k1"], "997");
        assert_eq!(last["k2"], "998");
        assert!(hub.slow.conflated.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn next_waits_for_a_frame() {
        let hub = Arc::new(Hub::new(ChannelLimits::default()));
        let s = Subscriber::new(1024, SlowClient::Disconnect);
        hub.subscribe("c", &s, None);
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                hub.publish("c", None, |seq| frame(seq, "late"));
            })
        };
        assert_eq!(s.next().await.as_deref(), Some(&b"1:late"[..]));
        publisher.await.unwrap();
    }
}
