//! A payload: JSON text checked once at the input, read field by field from
//! the text, parsed into a tree at most once.

use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use bytes::Bytes;
use sonic_rs::{JsonValueMutTrait, Value};

use crate::field::Field;
use crate::guard::JsonError;

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
    pub fn splice(&mut self, mut splices: Vec<crate::edit::Splice>) -> bool {
        let Some(raw) = &self.raw else { return false };
        match crate::edit::apply_splices(raw, &mut splices) {
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
                    && crate::edit::set(&mut text, path, &encoded, first.take().flatten())
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

/// Trims a body and checks it (nesting and numbers by [`crate::guard`]): single-line text completely (syntax, UTF-8)
/// without building a tree; a body with line breaks is parsed, so that
/// writing the payload as a JSON line stays one line.
fn check_json_line(text: &[u8]) -> Result<Checked<'_>, JsonError> {
    let text = text.trim_ascii();
    if memchr::memchr2(b'\n', b'\r', text).is_some() {
        return crate::guard::parse(text).map(Checked::Parsed);
    }
    // The fast check vouches for the common shapes (depth and numbers
    // included); for anything else (and for the error message) the guard
    // bounds depth and numbers, then skipping with `IgnoredAny` checks the
    // rest, allocating nothing.
    if !crate::check::is_valid(text) {
        crate::guard::check(text)?;
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
