//! Reading fields of a payload without parsing the rest of it.
//!
//! Inputs keep each event's JSON text and check it without building a tree
//! ([`Payload::from_json`](crate::payload::Payload::from_json)); a stage that reads
//! two fields of a 300-byte event then scans for those two in the text
//! instead of allocating and freeing a tree of every field. A payload that is
//! already parsed answers from its tree.

use std::borrow::Cow;

use sonic_rs::{JsonType, JsonValueTrait, Value};

/// One value inside a payload: a node of its parsed tree, or the slice of
/// its JSON text that spells the value.
#[derive(Debug, Clone, Copy)]
pub enum Field<'p> {
    Parsed(&'p Value),
    /// Text that starts with one well-formed JSON value; what follows it (the
    /// rest of the enclosing document) is ignored. Not cutting the value
    /// out spares a scan over an object on the way to one of its members.
    Text(&'p [u8]),
}

impl<'p> Field<'p> {
    /// The JSON type of the value.
    pub fn kind(&self) -> JsonType {
        match *self {
            Field::Parsed(v) => v.get_type(),
            Field::Text(t) => match t.first() {
                Some(b'"') => JsonType::String,
                Some(b'{') => JsonType::Object,
                Some(b'[') => JsonType::Array,
                Some(b't' | b'f') => JsonType::Boolean,
                Some(b'n') => JsonType::Null,
                _ => JsonType::Number,
            },
        }
    }

    pub fn is_null(&self) -> bool {
        self.kind() == JsonType::Null
    }

    pub fn is_object(&self) -> bool {
        self.kind() == JsonType::Object
    }

    pub fn is_array(&self) -> bool {
        self.kind() == JsonType::Array
    }

    /// The member `key` of an object (the first, if the text repeats it).
    pub fn get(&self, key: &str) -> Option<Field<'p>> {
        match *self {
            Field::Parsed(v) => v.get(key).map(Field::Parsed),
            // A plain scan finds most members; sonic-rs, checking as it goes, the rest.
            Field::Text(t) if t.first() == Some(&b'{') => match crate::edit::member(t, key) {
                Some(found) => found.map(Field::Text),
                None => {
                    let t = exact(t);
                    sonic_rs::get_from_slice(t, [key]).ok().and_then(|v| text_of(t, v))
                }
            },
            Field::Text(_) => None,
        }
    }

    /// The element `index` of an array.
    pub fn index(&self, index: usize) -> Option<Field<'p>> {
        match *self {
            Field::Parsed(v) => v.get(index).map(Field::Parsed),
            Field::Text(t) if t.first() == Some(&b'[') => {
                let t = exact(t);
                sonic_rs::get_from_slice(t, [index]).ok().and_then(|v| text_of(t, v))
            }
            Field::Text(_) => None,
        }
    }

    /// A string's contents, unescaped (borrowed from the payload when it has no escapes).
    pub fn as_str(&self) -> Option<Cow<'p, str>> {
        match *self {
            Field::Parsed(v) => v.as_str().map(Cow::Borrowed),
            Field::Text(t) if t.first() == Some(&b'"') => {
                let t = exact(t);
                let inner = &t[1..t.len() - 1];
                if memchr::memchr(b'\\', inner).is_none() {
                    // The text was checked as UTF-8 when it was accepted.
                    std::str::from_utf8(inner).ok().map(Cow::Borrowed)
                } else {
                    sonic_rs::from_slice::<String>(t).ok().map(Cow::Owned)
                }
            }
            Field::Text(_) => None,
        }
    }

    /// Like [`Value::as_i64`]: integers that fit, not floats.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Field::Parsed(v) => v.as_i64(),
            Field::Text(t) => match number(exact(t))? {
                Number::Int(i) => Some(i),
                Number::Other => self.to_value().as_i64(),
            },
        }
    }

    /// Like [`Value::as_f64`]: any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Field::Parsed(v) => v.as_f64(),
            Field::Text(t) => match number(exact(t))? {
                Number::Int(i) => Some(i as f64),
                Number::Other => self.to_value().as_f64(),
            },
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Field::Parsed(v) => v.as_bool(),
            Field::Text(t) => match exact(t) {
                b"true" => Some(true),
                b"false" => Some(false),
                _ => None,
            },
        }
    }

    /// The value as JSON text: its own text when it has one (no tree is built).
    pub fn json_text(&self) -> Cow<'p, str> {
        match *self {
            Field::Parsed(v) => Cow::Owned(sonic_rs::to_string(v).unwrap_or_default()),
            // The text was checked as UTF-8 when it was accepted.
            Field::Text(t) => String::from_utf8_lossy(exact(t)),
        }
    }

    /// The value as a tree: borrowed when parsed, built from its text otherwise.
    pub fn to_value(&self) -> Cow<'p, Value> {
        match *self {
            Field::Parsed(v) => Cow::Borrowed(v),
            Field::Text(t) => Cow::Owned(sonic_rs::from_slice(exact(t)).unwrap_or_default()),
        }
    }
}

/// The value a [`Field::Text`] starts with, without what follows it.
fn exact(text: &[u8]) -> &[u8] {
    &text[..crate::edit::value_len(text).unwrap_or(text.len())]
}

enum Number {
    /// An integer literal that fits an `i64` (most numbers in events).
    Int(i64),
    /// Anything else (fractions, exponents, big integers): read as sonic-rs reads it.
    Other,
}

/// Classifies number text; None for text that is not a number.
fn number(text: &[u8]) -> Option<Number> {
    if !matches!(text.first(), Some(b'-' | b'0'..=b'9')) {
        return None;
    }
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Some(Number::Other);
    }
    // Up to 18 digits cannot overflow.
    let magnitude = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(match digits.len() < text.len() {
        // sonic-rs reads `-0` as a float.
        true if magnitude == 0 => Number::Other,
        true => Number::Int(-magnitude),
        false => Number::Int(magnitude),
    })
}

/// The slice of `outer` that `value`, found inside it, spells. sonic-rs
/// answers a lookup in a slice with a part of that slice, so this is always
/// `Some`; it is checked rather than assumed.
fn text_of<'p>(outer: &'p [u8], value: sonic_rs::LazyValue<'_>) -> Option<Field<'p>> {
    let inner = value.as_raw_str().as_bytes();
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    let slice = outer.get(start..start + inner.len())?;
    (slice.as_ptr() == inner.as_ptr() && !slice.is_empty()).then_some(Field::Text(slice))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Payload;

    const DOCS: &[&str] = &[
        r#"{"a": 1, "s": "plain", "e": "tab\tquote\" \u00e9 \ud83d\ude00", "f": 2.5, "x": 1e3, "n": null}"#,
        r#"{"big": 18446744073709551615, "neg": -9223372036854775808, "t": true, "no": false, "arr": [1, {"k": "v"}]}"#,
        r#" { "d" : { "deep" : { "v" : -0.0 } } , "dup": 1, "dup": 2, "u": "żółw", "z": -0, "m": -12 } "#,
        r#"{"a": [], "o": {}, "s": "", "q": "\\\\"}"#,
    ];

    const PATHS: &[&[&str]] = &[
        &["a"],
        &["s"],
        &["e"],
        &["f"],
        &["x"],
        &["n"],
        &["big"],
        &["neg"],
        &["t"],
        &["no"],
        &["arr"],
        &["d", "deep", "v"],
        &["d", "deep"],
        &["dup"],
        &["u"],
        &["o"],
        &["q"],
        &["missing"],
        &["s", "below"],
        &["d", "missing", "v"],
        &["z"],
        &["m"],
    ];

    fn describe(f: Option<Field<'_>>) -> String {
        match f {
            None => "missing".into(),
            Some(f) => format!(
                "{:?} {:?} {:?} {:?} {:?} {} {} {} {}",
                f.kind(),
                f.as_str(),
                f.as_i64(),
                f.as_f64().map(f64::to_bits),
                f.as_bool(),
                f.is_null(),
                f.is_object(),
                f.is_array(),
                f.to_value()
            ),
        }
    }

    #[test]
    fn text_and_tree_answer_alike() {
        for doc in DOCS {
            let text = Payload::from_json(doc.as_bytes()).unwrap();
            let tree = Payload::from(sonic_rs::from_str::<Value>(doc).unwrap());
            assert!(matches!(text.root(), Field::Text(_)), "a checked line is not parsed");
            assert!(matches!(tree.root(), Field::Parsed(_)));
            for path in PATHS {
                assert_eq!(describe(text.field(path)), describe(tree.field(path)), "{doc} at {path:?}");
            }
            assert_eq!(
                describe(text.root().get("arr").and_then(|a| a.index(1)).and_then(|o| o.get("k"))),
                describe(tree.root().get("arr").and_then(|a| a.index(1)).and_then(|o| o.get("k")))
            );
            assert!(matches!(text.root(), Field::Text(_)), "reading fields does not parse the payload");
        }
    }

    #[test]
    fn unescaped_strings_borrow_the_text() {
        let p = Payload::from_json(br#"{"s": "plain", "e": "a\nb"}"#).unwrap();
        assert!(matches!(p.field(&["s"]).unwrap().as_str(), Some(Cow::Borrowed("plain"))));
        assert_eq!(p.field(&["e"]).unwrap().as_str().as_deref(), Some("a\nb"));
    }

    #[test]
    fn checking_refuses_what_parsing_refuses() {
        for bad in [
            &b"{\"a\": }"[..],
            b"{\"a\": 1",
            b"{\"a\": 1} x",
            b"{\"a\": \"\xff\"}",
            b"{\"a\": \"\x01\"}",
            b"{\"a\": \"\\q\"}",
            b"{\"a\": 01}",
            b"{\"a\": tru}",
            b"[1,]",
            b"",
        ] {
            assert!(Payload::from_json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
            assert!(sonic_rs::from_slice::<Value>(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
