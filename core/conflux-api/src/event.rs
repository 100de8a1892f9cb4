//! The event model: a payload parsed once, metadata, and two clocks.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::ack::AckToken;
use crate::field::Field;
use crate::JsonError;
use sonic_rs::{JsonValueMutTrait, Value};

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
/// from for as long as the two agree. Stages and outputs that hand the
/// payload on as JSON copy that text instead of serializing the value.
/// Reading goes through `Deref`; any mutable access (`DerefMut`, so
/// `*event.data = v` or `event.data.as_object_mut()` too) drops the text
/// first, so it can never disagree with the value. [`Payload::set_fields`]
/// edits the text instead and parses it again only when someone reads the
/// value: a script that adds a field to events bound for a file or a topic
/// never pays for a tree.
#[derive(Clone)]
pub struct Payload {
    /// Always set when `raw` is None; else parsed from `raw` on first read.
    value: OnceLock<Value>,
    /// `Bytes`: an edited text becomes the new text without a copy.
    raw: Option<Bytes>,
}

impl Payload {
    /// A payload together with the JSON text it was parsed from. `raw` must
    /// be that very text: it stands in for the value wherever JSON is wanted.
    pub fn parsed(value: Value, raw: &[u8]) -> Self {
        Payload { value: OnceLock::from(value), raw: Some(Bytes::copy_from_slice(raw)) }
    }

    /// Accepts a message body or an input line. A single-line body is
    /// checked (well-formed JSON, UTF-8) but not parsed: it is kept as the
    /// payload's text, stages read fields straight from it
    /// ([`Payload::field`]), the tree is built only if someone asks for it,
    /// and outputs copy the text. A body with line breaks is parsed and not
    /// kept, so that writing the payload as a JSON line stays one line.
    pub fn from_json(text: &[u8]) -> Result<Self, JsonError> {
        match check_json_line(text)? {
            Checked::Line(line) => Ok(Payload { value: OnceLock::new(), raw: Some(Bytes::copy_from_slice(line)) }),
            Checked::Parsed(value) => Ok(value.into()),
        }
    }

    /// [`Payload::from_json`] for a body the caller already holds as
    /// `Bytes` (a NATS message, a slice of an input's read buffer): a
    /// single-line body is kept without a copy.
    pub fn from_json_bytes(body: Bytes) -> Result<Self, JsonError> {
        match check_json_line(&body)? {
            Checked::Line(line) => {
                let start = line.as_ptr() as usize - body.as_ptr() as usize;
                let raw = body.slice(start..start + line.len());
                Ok(Payload { value: OnceLock::new(), raw: Some(raw) })
            }
            Checked::Parsed(value) => Ok(value.into()),
        }
    }

    /// The whole payload as a [`Field`]: its tree if it was parsed, else its text.
    pub fn root(&self) -> Field<'_> {
        match (self.value.get(), &self.raw) {
            (Some(value), _) => Field::Parsed(value),
            (None, Some(raw)) => Field::Text(raw),
            (None, None) => Field::Parsed(self.value()),
        }
    }

    /// The value at a path of object keys, read without parsing the payload
    /// when it has not been parsed yet.
    pub fn field<S: AsRef<str>>(&self, path: &[S]) -> Option<Field<'_>> {
        path.iter().try_fold(self.root(), |at, key| at.get(key.as_ref()))
    }

    /// The payload as its text alone, while it has one: a copy that costs a
    /// reference count (no tree), to put back if a change must be undone.
    pub fn text_copy(&self) -> Option<Payload> {
        self.raw.as_ref().map(|raw| Payload { value: OnceLock::new(), raw: Some(raw.clone()) })
    }

    /// The JSON text the value was parsed from, if it is still unchanged.
    pub fn raw_json(&self) -> Option<&[u8]> {
        self.raw.as_ref().map(|raw| &raw[..])
    }

    /// Length of the payload as JSON text: its text's length when it has
    /// one, else the length of its serialization (computed).
    pub fn json_len(&self) -> usize {
        match &self.raw {
            Some(raw) => raw.len(),
            None => {
                let mut out = Vec::new();
                self.write_json(&mut out);
                out.len()
            }
        }
    }

    /// Appends the payload as JSON: the original text when there is one.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match &self.raw {
            Some(raw) => out.extend_from_slice(raw),
            // Serializing a `Value` into a Vec cannot fail.
            None => sonic_rs::to_writer(&mut *out, self.value()).expect("a Value serializes"),
        }
    }

    pub fn into_value(mut self) -> Value {
        self.value();
        self.value.take().unwrap_or_default()
    }

    fn value(&self) -> &Value {
        self.value.get_or_init(|| match &self.raw {
            // The text is either what an input parsed or an edit of it that
            // `json_edit` keeps well-formed (its tests parse every edit).
            Some(raw) => sonic_rs::from_slice(raw).unwrap_or_else(|e| {
                tracing::error!(error = %e, "edited payload text does not parse; the payload is null");
                Value::new_null()
            }),
            None => Value::new_null(),
        })
    }

    /// Applies splices computed on this payload's current text (by
    /// [`crate::path::Located::set`]) in one pass. False, with the payload
    /// unchanged, when it has no text or the splices do not fit it.
    pub fn splice(&mut self, mut splices: Vec<crate::json_edit::Splice>) -> bool {
        let Some(raw) = &self.raw else { return false };
        match crate::json_edit::apply_splices(raw, &mut splices) {
            Some(text) => {
                self.value = OnceLock::new();
                self.raw = Some(Bytes::from(text));
                true
            }
            None => false,
        }
    }

    /// Sets fields, each given by its path of object keys; the parents must
    /// already be objects (a write whose parent is not is skipped). A payload
    /// with text has its text edited (field order kept), and the value is
    /// parsed again from it on the next read; without text, the value is
    /// changed in place.
    pub fn set_fields<P: AsRef<str>>(&mut self, writes: Vec<(&[P], Value)>) {
        if let Some(raw) = &self.raw {
            let mut text = Vec::with_capacity(raw.len() + 64);
            text.extend_from_slice(raw);
            let mut encoded = Vec::new();
            // The parsed value describes the text for the first edit only.
            let mut first = Some(self.value.get());
            let edited = writes.iter().all(|(path, value)| {
                encoded.clear();
                sonic_rs::to_writer(&mut encoded, value).is_ok()
                    && crate::json_edit::set(&mut text, path, &encoded, first.take().flatten())
            });
            if edited {
                self.value = OnceLock::new();
                self.raw = Some(Bytes::from(text));
                return;
            }
        }
        let data: &mut Value = self;
        'writes: for (path, value) in writes {
            let Some((name, parents)) = path.split_last() else { continue };
            let mut target = &mut *data;
            for segment in parents {
                match target.get_mut(segment.as_ref()) {
                    Some(next) => target = next,
                    None => continue 'writes,
                }
            }
            if let Some(object) = target.as_object_mut() {
                object.insert(name.as_ref(), value);
            }
        }
    }
}

/// What [`check_json_line`] found: a checked line (trimmed), or a parsed multi-line body.
enum Checked<'t> {
    Line(&'t [u8]),
    Parsed(Value),
}

/// Trims a body and checks it (nesting and numbers by [`crate::json_guard`]): single-line text completely (syntax, UTF-8)
/// without building a tree; a body with line breaks is parsed, so that
/// writing the payload as a JSON line stays one line.
fn check_json_line(text: &[u8]) -> Result<Checked<'_>, JsonError> {
    let text = text.trim_ascii();
    if memchr::memchr2(b'\n', b'\r', text).is_some() {
        return crate::json_guard::parse(text).map(Checked::Parsed);
    }
    // The fast check vouches for the common shapes (depth and numbers
    // included); for anything else (and for the error message) the guard
    // bounds depth and numbers, then skipping with `IgnoredAny` checks the
    // rest, allocating nothing.
    if !crate::json_check::is_valid(text) {
        crate::json_guard::check(text)?;
        // A tree, not `IgnoredAny`: skipping accepts bad `\u` escapes and
        // lone surrogates that a later read of the kept text refuses (the
        // payload then read as null). Found by the json_check fuzz target.
        sonic_rs::from_slice::<Value>(text)?;
    }
    Ok(Checked::Line(text))
}

impl Default for Payload {
    fn default() -> Self {
        Value::default().into()
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Payload { value: OnceLock::from(value), raw: None }
    }
}

impl Deref for Payload {
    type Target = Value;
    fn deref(&self) -> &Value {
        self.value()
    }
}

impl DerefMut for Payload {
    fn deref_mut(&mut self) -> &mut Value {
        self.value();
        self.raw = None;
        self.value.get_mut().expect("value() initialised it")
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// The kept text when there is one (as outputs write it), else the tree.
impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Kept text was checked as UTF-8 when it was accepted.
        match self.raw.as_deref().map(std::str::from_utf8) {
            Some(Ok(text)) => f.write_str(text),
            _ => (**self).fmt(f),
        }
    }
}

impl serde::Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(serializer)
    }
}

/// Event metadata: a small ordered map of names to values. Names are
/// mostly constants (`nats.subject`, `kafka.offset`): those are kept as
/// `&'static str`, not copied into a new string for every event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata(BTreeMap<Cow<'static, str>, Value>);

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    pub fn insert(&mut self, key: impl Into<Cow<'static, str>>, value: impl Into<Value>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

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

    /// Found by the `json_check` fuzz target: a single-line text with a bad
    /// `\u` escape (or a lone surrogate) passes `from_json`'s slow path
    /// (`IgnoredAny` skips escapes without decoding them), is kept as the
    /// payload's text, and then reads as null because sonic-rs refuses it
    /// as a `Value`. `check_json_line` now parses such lines as a tree.
    #[test]
    fn from_json_refuses_what_does_not_parse_as_a_value() {
        for text in [&br#""\uVVVV""#[..], br#"{"a":"\uVVVV"}"#, br#""\ud83d""#, br#"{"id":"\ud83dx"}"#] {
            if let Ok(payload) = Payload::from_json(text) {
                let raw = payload.raw_json().unwrap_or_default();
                assert!(
                    sonic_rs::from_slice::<Value>(raw).is_ok(),
                    "accepted {:?}, which reads as null",
                    String::from_utf8_lossy(text)
                );
            }
        }
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

    #[test]
    fn message_bodies_keep_their_text_when_it_is_one_line() {
        let p = Payload::from_json(b" {\"a\": [1, 2]}\n").unwrap();
        assert_eq!(p.raw_json(), Some(&b"{\"a\": [1, 2]}"[..]), "trimmed, kept");
        let p = Payload::from_json(b"{\n  \"a\": 1\n}").unwrap();
        assert_eq!(p.raw_json(), None, "a pretty-printed body would break a JSON-lines output");
        let mut out = Vec::new();
        p.write_json(&mut out);
        assert_eq!(out, br#"{"a":1}"#);
        assert!(Payload::from_json(b"{bad").is_err());
    }

    #[test]
    fn bodies_held_as_bytes_are_kept_without_a_copy() {
        use sonic_rs::JsonValueTrait;
        let body = Bytes::from_static(b" {\"a\": [1, 2]}\r\n");
        let p = Payload::from_json_bytes(body.clone()).unwrap();
        let raw = p.raw_json().unwrap();
        assert_eq!(raw, &b"{\"a\": [1, 2]}"[..], "trimmed");
        assert_eq!(raw.as_ptr(), body[1..].as_ptr(), "a slice of the body, not a copy");
        let p = Payload::from_json_bytes(Bytes::from_static(b"{\n\"a\": 1}")).unwrap();
        assert_eq!(p.raw_json(), None, "multi-line bodies are parsed, as with from_json");
        assert_eq!(p.get("a").and_then(|v| v.as_i64()), Some(1));
        assert!(Payload::from_json_bytes(Bytes::from_static(b"{\"a\": }")).is_err());
        assert!(Payload::from_json_bytes(Bytes::from_static(b"\xff")).is_err());
    }

    #[test]
    fn set_fields_edits_the_text_and_parses_on_read() {
        use sonic_rs::JsonValueTrait;
        let text = br#"{"a": 1, "d": {"x": true}}"#;
        let mut p = Payload::parsed(sonic_rs::from_slice(text).unwrap(), text);
        let (a, dy): (&[&str], &[&str]) = (&["a"], &["d", "y"]);
        p.set_fields(vec![(a, Value::from(2)), (dy, Value::from("z"))]);
        assert_eq!(
            p.raw_json(),
            Some(&br#"{"a": 2, "d": {"x": true,"y":"z"}}"#[..]),
            "text edited in place, order kept"
        );
        assert_eq!(p.get("d").and_then(|d| d.get("y")).and_then(|y| y.as_str()), Some("z"), "parsed on read");

        // Without text (or where the text cannot be edited plainly) the value changes.
        let mut p = Payload::from(sonic_rs::from_str::<Value>(r#"{"d":{}}"#).unwrap());
        p.set_fields(vec![(dy, Value::from(1)), (&["missing", "k"][..], Value::from(1))]);
        assert_eq!(p.to_string(), r#"{"d":{"y":1}}"#, "a write under a missing parent is skipped");
        let mut p = Payload::parsed(sonic_rs::from_str(r#"{"d":3}"#).unwrap(), br#"{"d":3}"#);
        p.set_fields(vec![(a, Value::from(1))]);
        assert_eq!(p.raw_json(), Some(&br#"{"d":3,"a":1}"#[..]));
    }
}
