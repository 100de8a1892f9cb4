//! The event model: a payload parsed once, metadata, and two clocks.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::ack::AckToken;
use sonic_rs::Value;

/// Events move between components in batches: every hop carries one.
pub type Batch = Vec<Event>;

/// One event flowing through a pipeline.
///
/// `data` is the structured payload, parsed once at the input and never
/// re-parsed by later stages. `meta` carries where it came from (topic,
/// partition, offset, HTTP headers, errors recorded by stages).
#[derive(Debug, Clone)]
pub struct Event {
    /// The payload.
    pub data: Value,
    /// Source and processing metadata; not part of the payload.
    pub meta: Metadata,
    /// Event time, when a stage or input knows it.
    pub event_time: Option<Timestamp>,
    /// When Conflux received the event.
    pub ingest_time: Timestamp,
    /// Acknowledgement handle back to the source.
    pub ack: AckToken,
    /// Where a replayable source read it, so stateful stages can tell a replay from new data.
    pub position: Option<Position>,
}

/// A place in a replayable source: a file line, a Kafka partition offset, a
/// JetStream stream sequence. Offsets only grow within one `stream`, which is
/// what lets a checkpoint say "everything up to here is counted".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Names the ordered sequence (`file:/data/in.ndjson`, `kafka:orders/3`); shared by its events.
    pub stream: Arc<str>,
    /// Grows by at least one per event within the stream.
    pub offset: u64,
}

impl Event {
    /// An untracked event received now.
    pub fn new(data: Value) -> Self {
        Event::with_time(data, Timestamp::now())
    }

    /// An untracked event with a given ingest time (inputs share one clock
    /// reading per batch instead of reading the clock per event).
    pub fn with_time(data: Value, ingest_time: Timestamp) -> Self {
        Event {
            data,
            meta: Metadata::default(),
            event_time: None,
            ingest_time,
            ack: AckToken::untracked(),
            position: None,
        }
    }

    /// Attach an acknowledgement token.
    pub fn with_ack(mut self, ack: AckToken) -> Self {
        self.ack = ack;
        self
    }

    /// Records where a replayable source read it.
    pub fn at(mut self, stream: &Arc<str>, offset: u64) -> Self {
        self.position = Some(Position { stream: stream.clone(), offset });
        self
    }

    /// A new event derived from this one (a split, an aggregate row): it
    /// carries the same metadata, clocks, acknowledgement and position.
    pub fn derive(&self, data: Value) -> Self {
        Event {
            data,
            meta: self.meta.clone(),
            event_time: self.event_time,
            ingest_time: self.ingest_time,
            ack: self.ack.clone(),
            position: self.position.clone(),
        }
    }
}

/// Event metadata: a small ordered map of names to values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata(BTreeMap<String, Value>);

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Nanoseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp(now.as_nanos() as i64)
    }

    pub fn from_millis(ms: i64) -> Self {
        Timestamp(ms.saturating_mul(1_000_000))
    }

    pub fn as_millis(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }

    /// Parses RFC 3339 (`2026-11-22T10:00:00Z`, with offset or fraction).
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        chrono::DateTime::parse_from_rfc3339(text).ok().and_then(|t| t.timestamp_nanos_opt()).map(Timestamp)
    }

    /// Reads a timestamp from a payload value: an RFC 3339 string, or a
    /// number of epoch seconds (< 10^11), milliseconds (< 10^14) or
    /// nanoseconds beyond that.
    pub fn from_value(value: &Value) -> Option<Self> {
        use sonic_rs::JsonValueTrait;
        if let Some(text) = value.as_str() {
            return Self::parse_rfc3339(text);
        }
        if let Some(n) = value.as_i64() {
            return Some(Self::from_epoch_number(n as f64));
        }
        value.as_f64().map(Self::from_epoch_number)
    }

    fn from_epoch_number(n: f64) -> Self {
        let abs = n.abs();
        let nanos = if abs < 1e11 {
            n * 1e9
        } else if abs < 1e14 {
            n * 1e6
        } else {
            n
        };
        Timestamp(nanos as i64)
    }

    /// RFC 3339 with millisecond precision, UTC (`2026-11-22T10:00:00.000Z`).
    pub fn to_rfc3339(self) -> String {
        chrono::DateTime::from_timestamp_nanos(self.0).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_and_epochs() {
        let t = Timestamp::parse_rfc3339("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-22T10:00:00.000Z");
        let secs = Value::from(t.as_millis() / 1000);
        let millis = Value::from(t.as_millis());
        assert_eq!(Timestamp::from_value(&secs), Some(t));
        assert_eq!(Timestamp::from_value(&millis), Some(t));
        assert_eq!(Timestamp::from_value(&Value::from("not a time")), None);
        let offset = Timestamp::parse_rfc3339("2026-11-22T11:00:00+01:00").unwrap();
        assert_eq!(offset, t);
    }

    #[test]
    fn derived_events_share_the_ack() {
        let (token, _rx) = AckToken::channel();
        let e = Event::new(Value::from(1)).with_ack(token);
        let d = e.derive(Value::from(2));
        assert!(d.ack.is_tracked());
    }
}
