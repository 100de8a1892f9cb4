//! The event model: a payload parsed once, metadata, and two clocks.

use std::borrow::Cow;
use std::sync::Arc;

use crate::ack::AckToken;
use conflux_json::{Field, Payload};
use sonic_rs::Value;

/// Events move between components in batches: every hop carries one.
pub type Batch = Vec<Event>;

/// One event flowing through a pipeline.
///
/// `data` is the payload: JSON text checked at the input, read field by
/// field from the text ([`Payload::field`]), parsed at most once, where a
/// stage first needs the whole tree (it reads as a [`Value`] through `Deref`). `meta` carries where it came from (topic,
/// partition, offset, HTTP headers, errors recorded by stages).
#[derive(Debug, Clone)]
pub struct Event {
    /// The payload.
    pub data: Payload,
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
    /// reading per batch instead of reading the clock per event). Inputs that
    /// receive JSON text pass [`Payload::from_json`].
    pub fn with_time(data: impl Into<Payload>, ingest_time: Timestamp) -> Self {
        Event {
            data: data.into(),
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
    pub fn derive(&self, data: impl Into<Payload>) -> Self {
        Event {
            data: data.into(),
            meta: self.meta.clone(),
            event_time: self.event_time,
            ingest_time: self.ingest_time,
            ack: self.ack.clone(),
            position: self.position.clone(),
        }
    }
}

/// An event's payload: the parsed value, plus the JSON text it was parsed
/// Event metadata: a small ordered map of names to values. Names are
/// mostly constants (`nats.subject`, `kafka.offset`): those are kept as
/// `&'static str`, not copied into a new string for every event.
///
/// A sorted vector rather than a tree: an event carries a handful of
/// entries, found faster by a short search than through tree nodes, and
/// one allocation holds them all (a tree allocates a node of eleven).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata(Vec<(Cow<'static, str>, Value)>);

impl Metadata {
    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(name, _)| name.as_ref().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn insert(&mut self, key: impl Into<Cow<'static, str>>, value: impl Into<Value>) {
        let key = key.into();
        match self.find(&key) {
            Ok(i) => self.0[i].1 = value.into(),
            Err(i) => self.0.insert(i, (key, value.into())),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    /// Entries in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(name, value)| (name.as_ref(), value))
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
        parse_utc_fast(text.as_bytes()).or_else(|| {
            chrono::DateTime::parse_from_rfc3339(text).ok().and_then(|t| t.timestamp_nanos_opt()).map(Timestamp)
        })
    }

    /// Reads a timestamp from a payload value: an RFC 3339 string, or a
    /// number of epoch seconds (< 10^11), milliseconds (< 10^14) or
    /// nanoseconds beyond that.
    pub fn from_value(value: &Value) -> Option<Self> {
        Self::from_field(&Field::Parsed(value))
    }

    /// [`Timestamp::from_value`] for a field read from a payload.
    pub fn from_field(field: &Field<'_>) -> Option<Self> {
        if let Some(text) = field.as_str() {
            return Self::parse_rfc3339(&text);
        }
        if let Some(n) = field.as_i64() {
            return Some(Self::from_epoch_number(n as f64));
        }
        field.as_f64().map(Self::from_epoch_number)
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

/// The common UTC shape `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, parsed by hand: event
/// times are read for every event a window sees. Anything else returns `None`
/// and goes through the full parser.
fn parse_utc_fast(b: &[u8]) -> Option<Timestamp> {
    fn digits(b: &[u8]) -> Option<i64> {
        b.iter().try_fold(0i64, |n, c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
    }
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (hour, minute, second) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if !(1..=month_days).contains(&day) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let rest = &b[19..];
    let (fraction, zone) = match rest.first() {
        Some(b'.') => {
            let len = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if len == 0 || len > 9 {
                return None;
            }
            (digits(&rest[1..1 + len])? * 10i64.pow(9 - len as u32), &rest[1 + len..])
        }
        _ => (0, rest),
    };
    if !matches!(zone, [b'Z' | b'z']) {
        return None;
    }
    // Days since the epoch from the civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    seconds.checked_mul(1_000_000_000)?.checked_add(fraction).map(Timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_keeps_one_value_per_name_in_name_order() {
        use sonic_rs::JsonValueTrait;
        let mut meta = Metadata::default();
        meta.insert("kafka.topic", "orders");
        meta.insert("auth.subject", "u-1");
        meta.insert(String::from("kafka.key"), "k");
        meta.insert("kafka.topic", "payments");
        let names: Vec<&str> = meta.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["auth.subject", "kafka.key", "kafka.topic"]);
        assert_eq!(meta.get("kafka.topic").and_then(|v| v.as_str()), Some("payments"));
        assert_eq!(meta.remove("kafka.key").and_then(|v| v.as_str().map(str::to_string)), Some("k".into()));
        assert_eq!((meta.len(), meta.get("kafka.key")), (2, None));
    }

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
    fn the_fast_utc_parser_agrees_with_chrono() {
        let chrono_parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp_nanos_opt().unwrap();
        for text in [
            "2026-11-22T08:13:04.152Z",
            "1970-01-01T00:00:00Z",
            "2024-02-29T23:59:59.999999999Z",
            "2000-03-01T00:00:00.5z",
            "1969-12-31T23:59:59.1Z",
            "2100-12-31t12:00:00Z",
        ] {
            assert_eq!(parse_utc_fast(text.as_bytes()).map(|t| t.0), Some(chrono_parse(text)), "{text}");
        }
        for other in
            ["2026-11-22T10:00:00+01:00", "2026-11-22 10:00:00Z", "2026-13-01T00:00:00Z", "2026-11-22T10:00:00.Z"]
        {
            assert_eq!(parse_utc_fast(other.as_bytes()), None, "{other} goes to the full parser");
        }
        assert_eq!(
            Timestamp::parse_rfc3339("2026-11-22T11:00:00+01:00"),
            Timestamp::parse_rfc3339("2026-11-22T10:00:00Z")
        );
        assert_eq!(Timestamp::parse_rfc3339("2026-02-30T10:00:00Z"), None, "chrono refuses impossible dates");
    }

    #[test]
    fn derived_events_share_the_ack() {
        let (token, _rx) = AckToken::channel();
        let e = Event::new(Value::from(1)).with_ack(token);
        let d = e.derive(Value::from(2));
        assert!(d.ack.is_tracked());
    }

    #[test]
    fn raw_json_lasts_until_the_payload_is_touched() {
        use sonic_rs::{JsonValueMutTrait, JsonValueTrait};
        let text = br#"{"a": 1}"#;
        let value: Value = sonic_rs::from_slice(text).unwrap();
        let mut e = Event::with_time(Payload::parsed(value, text), Timestamp::now());
        let copy = e.derive(e.data.clone());
        assert_eq!(copy.data.raw_json(), Some(&text[..]));
        let mut out = Vec::new();
        e.data.write_json(&mut out);
        assert_eq!(out, text);
        assert!(e.data.get("a").is_some(), "reading keeps the text");
        assert!(e.data.raw_json().is_some());
        e.data.as_object_mut().unwrap().insert("b", 2);
        assert_eq!(e.data.raw_json(), None);
        out.clear();
        e.data.write_json(&mut out);
        assert_eq!(
            sonic_rs::from_slice::<Value>(&out).unwrap(),
            sonic_rs::from_str::<Value>(r#"{"a":1,"b":2}"#).unwrap()
        );
        let mut other = copy.clone();
        *other.data = Value::from(3);
        assert_eq!(other.data.raw_json(), None);
        assert_eq!(copy.data.raw_json(), Some(&text[..]), "clones are independent");
    }
}
