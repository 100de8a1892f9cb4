//! Request bodies to events: a JSON object, a JSON array of objects, or
//! NDJSON. Every bad element is reported, not just the first.

use conflux_api::sonic_rs::{JsonContainerTrait, JsonValueTrait};
use conflux_api::Value;
use conflux_json::guard::{self, JsonError};
use serde::Serialize;

/// How a body is framed, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One object, or an array of objects.
    Json,
    /// One object per line.
    Ndjson,
}

impl Format {
    /// The format of a `Content-Type` value; `None` for anything else (415).
    pub fn of(content_type: &str) -> Option<Format> {
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(Format::Json),
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
            | "application/jsonlines" => Some(Format::Ndjson),
            e if e.starts_with("application/") && e.ends_with("+json") => Some(Format::Json),
            _ => None,
        }
    }
}

/// One refused element of a body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadElement {
    /// Position in a JSON array (0-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Line of an NDJSON body (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub reason: String,
}

/// Why a body was refused (`400`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBody {
    pub reason: String,
    pub elements: Vec<BadElement>,
}

impl BadBody {
    fn whole(reason: impl Into<String>) -> Self {
        BadBody { reason: reason.into(), elements: Vec::new() }
    }
}

fn kind(v: &Value) -> &'static str {
    if v.is_array() {
        "an array"
    } else if v.is_str() {
        "a string"
    } else if v.is_number() {
        "a number"
    } else if v.is_boolean() {
        "a boolean"
    } else if v.is_null() {
        "null"
    } else {
        "an object"
    }
}

/// Parses a body into event payloads (each a JSON object).
pub fn parse(format: Format, bytes: &[u8]) -> Result<Vec<Value>, BadBody> {
    match format {
        Format::Json => parse_json(bytes),
        Format::Ndjson => parse_ndjson(bytes),
    }
}

fn parse_json(bytes: &[u8]) -> Result<Vec<Value>, BadBody> {
    let value: Value = match guard::parse(bytes) {
        Ok(v) => v,
        Err(e) => {
            // A broken array: find which elements are broken.
            if let Some(parts) = split_array(bytes) {
                let elements: Vec<BadElement> = parts
                    .iter()
                    .enumerate()
                    .filter_map(|(i, part)| match guard::parse(part) {
                        Ok(v) if v.is_object() => None,
                        Ok(v) => Some(BadElement {
                            index: Some(i),
                            line: None,
                            reason: format!("expected an object, found {}", kind(&v)),
                        }),
                        Err(e) => Some(BadElement { index: Some(i), line: None, reason: e.to_string() }),
                    })
                    .collect();
                if !elements.is_empty() {
                    return Err(BadBody { reason: "malformed JSON array".into(), elements });
                }
            }
            return Err(BadBody::whole(match e {
                JsonError::Refused(refusal) => refusal.to_string(),
                JsonError::Syntax(e) => format!("malformed JSON: {e}"),
            }));
        }
    };
    if value.is_object() {
        return Ok(vec![value]);
    }
    let Some(array) = value.as_array() else {
        return Err(BadBody::whole(format!("expected an object or an array of objects, found {}", kind(&value))));
    };
    let elements: Vec<BadElement> = array
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_object())
        .map(|(i, v)| BadElement {
            index: Some(i),
            line: None,
            reason: format!("expected an object, found {}", kind(v)),
        })
        .collect();
    if !elements.is_empty() {
        return Err(BadBody { reason: "array elements must be objects".into(), elements });
    }
    if array.is_empty() {
        return Err(BadBody::whole("empty array"));
    }
    Ok(array.iter().cloned().collect())
}

fn parse_ndjson(bytes: &[u8]) -> Result<Vec<Value>, BadBody> {
    let mut events = Vec::new();
    let mut elements = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match guard::parse(line) {
            Ok(v) if v.is_object() => events.push(v),
            Ok(v) => elements.push(BadElement {
                index: None,
                line: Some(i + 1),
                reason: format!("expected an object, found {}", kind(&v)),
            }),
            Err(e) => elements.push(BadElement { index: None, line: Some(i + 1), reason: e.to_string() }),
        }
    }
    if !elements.is_empty() {
        return Err(BadBody { reason: "malformed NDJSON".into(), elements });
    }
    if events.is_empty() {
        return Err(BadBody::whole("empty body"));
    }
    Ok(events)
}

/// Splits the text of a top-level JSON array into its elements' texts,
/// tracking nesting and strings; `None` when it is not an array at all.
fn split_array(bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
    if bytes[start] != b'[' {
        return None;
    }
    let mut parts = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut element_start = start + 1;
    let mut closed = false;
    for (i, &b) in bytes.iter().enumerate().skip(start + 1) {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => depth -= 1,
            b']' => {
                parts.push(&bytes[element_start..i]);
                closed = true;
                break;
            }
            b',' if depth == 0 => {
                parts.push(&bytes[element_start..i]);
                element_start = i + 1;
            }
            _ => {}
        }
    }
    if !closed {
        parts.push(&bytes[element_start..]);
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(Format::of("application/json; charset=utf-8"), Some(Format::Json));
        assert_eq!(Format::of("application/x-ndjson"), Some(Format::Ndjson));
        assert_eq!(Format::of("application/cloudevents+json"), Some(Format::Json));
        assert_eq!(Format::of("text/plain"), None);
    }

    #[test]
    fn objects_arrays_and_lines() {
        assert_eq!(parse(Format::Json, br#"{"a":1}"#).unwrap().len(), 1);
        assert_eq!(parse(Format::Json, br#"[{"a":1},{"b":2}]"#).unwrap().len(), 2);
        assert_eq!(parse(Format::Ndjson, b"{\"a\":1}\n\n{\"b\":2}\r\n").unwrap().len(), 2);
    }

    #[test]
    fn every_bad_element_is_reported() {
        let bad = parse(Format::Json, br#"[{"a":1}, 3, {"b":2}, "x"]"#).unwrap_err();
        let idx: Vec<_> = bad.elements.iter().map(|e| e.index.unwrap()).collect();
        assert_eq!(idx, vec![1, 3]);
        let broken = parse(Format::Json, br#"[{"a":1}, {"b": }, {"c":"],"}, {oops}]"#).unwrap_err();
        let idx: Vec<_> = broken.elements.iter().map(|e| e.index.unwrap()).collect();
        assert_eq!(idx, vec![1, 3], "{broken:?}");
        let lines = parse(Format::Ndjson, b"{\"a\":1}\nnope\n{\"b\":2}\n[1]").unwrap_err();
        let lines: Vec<_> = lines.elements.iter().map(|e| e.line.unwrap()).collect();
        assert_eq!(lines, vec![2, 4]);
        assert!(parse(Format::Json, b"{\"a\":").unwrap_err().elements.is_empty());
        assert!(parse(Format::Json, b"42").is_err());
    }
}
