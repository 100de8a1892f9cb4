//! The channel space of one broadcast server: channels by name, each with
//! its subscribers, and one sequence for them all (so one cursor covers
//! every channel of a connection). Publishing and subscribing take the
//! same lock, so a subscriber's starting point (the state as of sequence
//! N, or what it missed since its cursor) and the updates after it meet
//! exactly: none lost between them, none sent twice, all in sequence
//! order on the connection. A publish never waits for a client: it only
//! appends to each subscriber's bounded queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use conflux_api::metrics::Counter;
use tokio::sync::Notify;

use crate::channel::{Channel, ChannelLimits, Entry, Resume};
use crate::queue::{ClientQueue, Pushed, Queued, SlowClient};

/// What happened to slow clients (frames dropped, updates conflated,
/// connections closed), as the metrics the output exports.
#[derive(Debug, Default, Clone)]
pub struct SlowCounts {
    pub dropped: Counter,
    pub conflated: Counter,
    pub disconnected: Counter,
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

    /// Queues a reply to the client itself (never dropped by the policy).
    pub fn reply(&self, frame: Bytes) {
        self.lock().push_always(Queued { conflate_key: None, frame });
        self.ready.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClientQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, item: Queued, counts: &SlowCounts) {
        match self.lock().push(item) {
            Pushed::Queued => {}
            Pushed::DroppedOldest(n) => counts.dropped.inc_by(n as u64),
            Pushed::Conflated => counts.conflated.inc(),
            Pushed::Disconnect => {
                counts.disconnected.inc();
                self.closed.store(true, Ordering::Release);
            }
        }
        self.ready.notify_one();
    }
}

struct Slot {
    channel: Channel,
    subscribers: Vec<Arc<Subscriber>>,
}

struct Space {
    /// The newest sequence published.
    seq: u64,
    /// Nothing at or before this sequence was seen here (an instance that
    /// joined a fan-out bus late).
    floor: u64,
    channels: HashMap<String, Slot>,
}

/// Every channel of one server.
pub struct Hub {
    limits: ChannelLimits,
    epoch: String,
    space: Mutex<Space>,
    pub slow: SlowCounts,
}

/// The frame a channel's whole state is sent as: (channel, sequence it is as of, latest entry per key).
pub type InitialFrame<'a> = &'a dyn Fn(&str, u64, &[Entry]) -> Bytes;

impl Hub {
    /// A channel space whose cursors are only good within `epoch` (a
    /// process's start, or the fan-out bus it shares with others).
    pub fn new(limits: ChannelLimits, epoch: impl Into<String>, slow: SlowCounts) -> Hub {
        Hub {
            limits,
            epoch: epoch.into(),
            space: Mutex::new(Space { seq: 0, floor: 0, channels: HashMap::new() }),
            slow,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The newest sequence published.
    pub fn latest(&self) -> u64 {
        self.lock().seq
    }

    /// Channels known (with history, state or subscribers).
    pub fn channels(&self) -> usize {
        self.lock().channels.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Space> {
        self.space.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Says this hub starts watching a shared sequence after `seq`: what
    /// came before is unknown here, so older cursors get the whole state.
    pub fn watch_after(&self, seq: u64) {
        let mut space = self.lock();
        if space.seq < seq {
            space.seq = seq;
            space.floor = seq;
        }
    }

    /// Publishes on `channel` with the next sequence: `encode` makes the
    /// frame once the sequence is known (it is part of the frame), shared by
    /// every subscriber. The event is in the channel's history when this
    /// returns: what an acknowledgement means for a broadcast.
    pub fn publish(&self, channel: &str, key: Option<String>, encode: impl FnOnce(u64) -> Bytes) -> u64 {
        let mut space = self.lock();
        let seq = space.seq + 1;
        self.append(&mut space, seq, channel, key, encode);
        seq
    }

    /// Publishes several events under one lock, in order (a write batch):
    /// a client's writer wakes to all of its frames of the batch at once, so
    /// it writes them in one go. Each item is (channel, key, encode).
    pub fn publish_all<'a, E>(&self, items: impl IntoIterator<Item = (&'a str, Option<String>, E)>)
    where
        E: FnOnce(u64) -> Bytes,
    {
        let mut space = self.lock();
        for (channel, key, encode) in items {
            let seq = space.seq + 1;
            self.append(&mut space, seq, channel, key, encode);
        }
    }

    /// Publishes an event whose sequence was given where it was published
    /// (a fan-out bus). A sequence at or below the newest is one already
    /// seen: `false`, nothing changes.
    pub fn publish_at(&self, seq: u64, channel: &str, key: Option<String>, encode: impl FnOnce(u64) -> Bytes) -> bool {
        let mut space = self.lock();
        if seq <= space.seq {
            return false;
        }
        self.append(&mut space, seq, channel, key, encode);
        true
    }

    fn append(
        &self,
        space: &mut Space,
        seq: u64,
        channel: &str,
        key: Option<String>,
        encode: impl FnOnce(u64) -> Bytes,
    ) {
        space.seq = seq;
        let floor = space.floor;
        let slot = space
            .channels
            .entry(channel.to_string())
            .or_insert_with(|| Slot { channel: Channel::watched_after(self.limits, floor), subscribers: Vec::new() });
        let conflate_key: Option<Arc<str>> = key.as_ref().map(|k| format!("{channel}\u{1f}{k}").into());
        let Some(entry) = slot.channel.publish_at(seq, key, encode(seq), Instant::now()) else { return };
        slot.subscribers.retain(|s| !s.is_closed());
        for subscriber in &slot.subscribers {
            subscriber.deliver(Queued { conflate_key: conflate_key.clone(), frame: entry.frame.clone() }, &self.slow);
        }
    }

    /// Subscribes to `channels` at once. Without a cursor each channel
    /// starts from its whole state (`initial`, as of the newest sequence);
    /// with the sequence the client saw last, from what it missed (or its
    /// whole state, when that is older than the history). What it missed
    /// is queued first, in sequence order, then the states: the client's
    /// cursor only ever moves forward. Returns the newest sequence.
    pub fn subscribe(
        &self,
        channels: &[String],
        subscriber: &Arc<Subscriber>,
        cursor: Option<u64>,
        initial: InitialFrame<'_>,
    ) -> u64 {
        let mut space = self.lock();
        let (latest, floor) = (space.seq, space.floor);
        let mut missed: Vec<Entry> = Vec::new();
        let mut states: Vec<Bytes> = Vec::new();
        for name in channels {
            let slot = space.channels.entry(name.clone()).or_insert_with(|| Slot {
                channel: Channel::watched_after(self.limits, floor),
                subscribers: Vec::new(),
            });
            match cursor.map(|c| slot.channel.resume(c, latest)) {
                Some(Resume::Missed(entries)) => missed.extend(entries),
                Some(Resume::Reset { state, .. }) => states.push(initial(name, latest, &state)),
                None => states.push(initial(name, latest, &slot.channel.state())),
            }
            if !slot.subscribers.iter().any(|s| Arc::ptr_eq(s, subscriber)) {
                slot.subscribers.push(subscriber.clone());
            }
        }
        missed.sort_by_key(|e| e.seq);
        {
            let mut queue = subscriber.lock();
            for entry in missed {
                queue.push_always(Queued { conflate_key: None, frame: entry.frame });
            }
            for frame in states {
                queue.push_always(Queued { conflate_key: None, frame });
            }
        }
        subscriber.ready.notify_one();
        latest
    }

    /// Stops delivering `channels` to `subscriber`.
    pub fn unsubscribe(&self, channels: &[String], subscriber: &Arc<Subscriber>) {
        let mut space = self.lock();
        for name in channels {
            if let Some(slot) = space.channels.get_mut(name) {
                slot.subscribers.retain(|s| !Arc::ptr_eq(s, subscriber));
            }
        }
    }

    /// Subscribers of a channel (closed ones are left out on the next publish).
    pub fn subscribers(&self, channel: &str) -> usize {
        let space = self.lock();
        space.channels.get(channel).map_or(0, |slot| slot.subscribers.iter().filter(|s| !s.is_closed()).count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, text: &str) -> Bytes {
        Bytes::from(format!("{seq}:{text}"))
    }

    fn initial(channel: &str, seq: u64, state: &[Entry]) -> Bytes {
        let seqs: Vec<String> = state.iter().map(|e| e.seq.to_string()).collect();
        Bytes::from(format!("state {channel}@{seq} [{}]", seqs.join(",")))
    }

    fn drain(s: &Subscriber) -> Vec<String> {
        std::iter::from_fn(|| s.try_next()).map(|b| String::from_utf8(b.to_vec()).unwrap()).collect()
    }

    fn sub(hub: &Hub, channels: &[&str], s: &Arc<Subscriber>, cursor: Option<u64>) -> u64 {
        let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
        hub.subscribe(&channels, s, cursor, &initial)
    }

    #[test]
    fn a_subscriber_gets_the_state_then_exactly_what_follows() {
        let hub = Hub::new(ChannelLimits::default(), "e", SlowCounts::default());
        for i in 0..5 {
            hub.publish("r:1", Some(format!("k{}", i % 2)), |seq| frame(seq, &i.to_string()));
        }
        let s = Subscriber::new(1 << 20, SlowClient::Disconnect);
        assert_eq!(sub(&hub, &["r:1"], &s, None), 5);
        hub.publish("r:1", None, |seq| frame(seq, "x"));
        hub.publish("r:2", None, |seq| frame(seq, "other channel"));
        assert_eq!(drain(&s), ["state r:1@5 [4,5]", "6:x"]);
    }

    #[test]
    fn one_cursor_resumes_every_channel_of_a_connection() {
        let hub = Hub::new(ChannelLimits::default(), "e", SlowCounts::default());
        for (i, channel) in ["a", "b", "a", "c", "b"].iter().enumerate() {
            hub.publish(channel, None, |seq| frame(seq, &i.to_string()));
        }
        let s = Subscriber::new(1 << 20, SlowClient::Disconnect);
        sub(&hub, &["a", "b"], &s, Some(1));
        assert_eq!(drain(&s), ["2:1", "3:2", "5:4"], "what a and b published after 1, in order");
        let late = Subscriber::new(1 << 20, SlowClient::Disconnect);
        sub(&hub, &["a"], &late, Some(99));
        assert_eq!(drain(&late), ["state a@5 []"], "a cursor from before a restart gets the whole state");
    }

    #[test]
    fn a_stalled_client_is_closed_and_never_slows_the_others() {
        let hub = Hub::new(ChannelLimits::default(), "e", SlowCounts::default());
        let stalled = Subscriber::new(16, SlowClient::Disconnect);
        let reader = Subscriber::new(1 << 20, SlowClient::Disconnect);
        sub(&hub, &["c"], &stalled, None);
        sub(&hub, &["c"], &reader, None);
        drain(&reader);
        let _ = stalled.try_next();
        let mut read = Vec::new();
        for i in 0..100 {
            hub.publish("c", None, |seq| frame(seq, &format!("event-{i}")));
            read.extend(drain(&reader));
        }
        assert_eq!(read.len(), 100, "the reading client got everything");
        assert!(stalled.is_closed());
        assert!(stalled.queued_bytes() <= 16);
        assert_eq!(hub.subscribers("c"), 1);
        assert_eq!(hub.slow.disconnected.get(), 1);
    }

    #[test]
    fn conflating_clients_converge_to_the_latest_value_per_key() {
        let hub = Hub::new(ChannelLimits::default(), "e", SlowCounts::default());
        let slow = Subscriber::new(64, SlowClient::Conflate);
        sub(&hub, &["c"], &slow, None);
        let _ = slow.try_next();
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
        assert!(hub.slow.conflated.get() > 0);
    }

    #[test]
    fn sequences_from_a_bus_are_applied_once_and_a_late_hub_knows_its_floor() {
        let hub = Hub::new(ChannelLimits::default(), "bus", SlowCounts::default());
        hub.watch_after(40);
        assert!(hub.publish_at(41, "c", None, |seq| frame(seq, "a")));
        assert!(!hub.publish_at(41, "c", None, |seq| frame(seq, "a")), "seen already");
        assert!(hub.publish_at(57, "c", None, |seq| frame(seq, "b")));
        let s = Subscriber::new(1 << 20, SlowClient::Disconnect);
        sub(&hub, &["c"], &s, Some(41));
        assert_eq!(drain(&s), ["57:b"]);
        sub(&hub, &["c"], &s, Some(12));
        assert_eq!(drain(&s), ["state c@57 []"], "before this hub watched: the state again");
    }

    #[tokio::test]
    async fn next_waits_for_a_frame() {
        let hub = Arc::new(Hub::new(ChannelLimits::default(), "e", SlowCounts::default()));
        let s = Subscriber::new(1024, SlowClient::Disconnect);
        sub(&hub, &["c"], &s, Some(0));
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
