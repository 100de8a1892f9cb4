//! Stream entries as Redis returns them (`XREADGROUP`, `XAUTOCLAIM`), and
//! how one entry becomes an event's payload and position.
//!
//! Replies are read from [`redis::Value`] by hand: both RESP2 arrays and
//! RESP3 maps are accepted, and a reply of an unexpected shape is an error
//! with a description, never a panic.

use conflux_api::sonic_rs::JsonValueMutTrait;
use conflux_api::{Bytes, Payload, Value as Json};
use redis::Value;

/// One stream entry. `fields` is `None` for an entry still pending in the
/// group whose data was trimmed from the stream (`XTRIM`, `MAXLEN`).
#[derive(Debug, PartialEq)]
pub struct Entry {
    pub id: String,
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// A stream's name and the entries read from it.
pub type StreamEntries = (Vec<u8>, Vec<Entry>);

/// An `XREADGROUP` reply: the entries of each stream that had any, by stream
/// name. Nil (the `BLOCK` ran out) is no entries.
pub fn read_reply(reply: Value) -> Result<Vec<StreamEntries>, String> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs,
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Array(pair) => two(pair, "a stream and its entries"),
                other => Err(unexpected("a stream and its entries", &other)),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(unexpected("the streams read", &other)),
    };
    pairs.into_iter().map(|(name, entries)| Ok((bytes(name, "a stream name")?, entry_list(entries)?))).collect()
}

/// An `XAUTOCLAIM` reply: the cursor to continue the scan from (`0-0` once
/// the whole pending list was scanned) and the entries claimed. Ids of
/// trimmed entries (the third element, Redis 7) were already dropped from
/// the pending list by Redis and need nothing from us.
pub(super) fn autoclaim_reply(reply: Value) -> Result<(String, Vec<Entry>), String> {
    let Value::Array(items) = reply else { return Err(unexpected("an XAUTOCLAIM reply", &reply)) };
    let mut items = items.into_iter();
    let (Some(cursor), Some(entries)) = (items.next(), items.next()) else {
        return Err("an XAUTOCLAIM reply without its cursor and entries".into());
    };
    Ok((text(cursor, "a cursor")?, entry_list(entries)?))
}

fn entry_list(value: Value) -> Result<Vec<Entry>, String> {
    let items = match value {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(unexpected("a list of entries", &other)),
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(pair) = item else { return Err(unexpected("an entry", &item)) };
            let (id, fields) = two(pair, "an entry id and its fields")?;
            let fields = match fields {
                Value::Nil => None,
                Value::Array(flat) => {
                    if flat.len() % 2 != 0 {
                        return Err("an entry with an odd number of field names and values".into());
                    }
                    let mut pairs = Vec::with_capacity(flat.len() / 2);
                    let mut flat = flat.into_iter();
                    while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                        pairs.push((bytes(name, "a field name")?, bytes(value, "a field value")?));
                    }
                    Some(pairs)
                }
                Value::Map(pairs) => Some(
                    pairs
                        .into_iter()
                        .map(|(k, v)| Ok((bytes(k, "a field name")?, bytes(v, "a field value")?)))
                        .collect::<Result<_, String>>()?,
                ),
                other => return Err(unexpected("an entry's fields", &other)),
            };
            Ok(Entry { id: text(id, "an entry id")?, fields })
        })
        .collect()
}

fn two(items: Vec<Value>, what: &str) -> Result<(Value, Value), String> {
    let mut items = items.into_iter();
    match (items.next(), items.next(), items.next()) {
        (Some(a), Some(b), None) => Ok((a, b)),
        _ => Err(format!("expected {what}, got a list of another length")),
    }
}

fn bytes(value: Value, what: &str) -> Result<Vec<u8>, String> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(n) => Ok(n.to_string().into_bytes()),
        other => Err(unexpected(what, &other)),
    }
}

fn text(value: Value, what: &str) -> Result<String, String> {
    String::from_utf8(bytes(value, what)?).map_err(|_| format!("{what} that is not UTF-8"))
}

/// Names the kind of value only: replies hold event data, which stays out of errors.
fn unexpected(what: &str, got: &Value) -> String {
    let kind = match got {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::BulkString(_) | Value::SimpleString(_) | Value::VerbatimString { .. } => "a string",
        Value::Array(_) | Value::Set(_) => "a list",
        Value::Map(_) => "a map",
        Value::ServerError(_) => "an error",
        _ => "another kind of value",
    };
    format!("expected {what}, got {kind}")
}

/// Bits of an entry id's sequence part in an event's position offset.
const SEQUENCE_BITS: u32 = 20;

/// The position offset of an entry id `ms-seq`: `ms × 2^20 + seq`, which
/// grows with the id as long as `seq < 2^20` (a million entries in one
/// millisecond) and `ms < 2^44` (the year 2527). Ids beyond that (written
/// by hand) have no offset: their events carry no position.
pub fn offset(id: &str) -> Option<u64> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    (ms < 1 << (64 - SEQUENCE_BITS) && seq < 1 << SEQUENCE_BITS).then_some(ms << SEQUENCE_BITS | seq)
}

/// Why an entry's payload could not be taken as JSON.
pub(super) const NOT_JSON: &str = "payload is not JSON";

/// An entry's payload: the JSON text in field `field`, or, for an entry
/// without that field, an object of all its fields (values as strings).
/// `Err` holds the field's text as a JSON string, for port `invalid`.
pub(super) fn payload(mut fields: Vec<(Vec<u8>, Vec<u8>)>, field: &str) -> Result<Payload, Payload> {
    // The last value wins, as when Redis's own clients read an entry into a map.
    if let Some(position) = fields.iter().rposition(|(name, _)| name == field.as_bytes()) {
        let text = Bytes::from(fields.swap_remove(position).1);
        return Payload::from_json_bytes(text.clone())
            .map_err(|_| Json::from(String::from_utf8_lossy(&text).as_ref()).into());
    }
    let mut object = Json::new_object();
    if let Some(map) = object.as_object_mut() {
        for (name, value) in &fields {
            map.insert(String::from_utf8_lossy(name).as_ref(), Json::from(String::from_utf8_lossy(value).as_ref()));
        }
    }
    Ok(object.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![bulk(id), Value::Array(fields.iter().map(|f| bulk(f)).collect())])
    }

    #[test]
    fn reads_resp2_and_resp3_replies() {
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![entry("1-0", &["data", "{}"]), Value::Array(vec![bulk("2-0"), Value::Nil])]),
        ])]);
        let expected = vec![(
            b"orders".to_vec(),
            vec![
                Entry { id: "1-0".into(), fields: Some(vec![(b"data".to_vec(), b"{}".to_vec())]) },
                Entry { id: "2-0".into(), fields: None },
            ],
        )];
        assert_eq!(read_reply(resp2).unwrap(), expected);
        let resp3 = Value::Map(vec![(
            bulk("orders"),
            Value::Array(vec![entry("1-0", &["data", "{}"]), Value::Array(vec![bulk("2-0"), Value::Nil])]),
        )]);
        assert_eq!(read_reply(resp3).unwrap(), expected);
        assert!(read_reply(Value::Nil).unwrap().is_empty(), "a BLOCK that ran out");
    }

    #[test]
    fn odd_shapes_are_errors_that_name_no_data() {
        let odd = Value::Array(vec![Value::Array(vec![bulk("s"), Value::Array(vec![entry("1-0", &["data"])])])]);
        assert_eq!(read_reply(odd).unwrap_err(), "an entry with an odd number of field names and values");
        let wrong = Value::Array(vec![bulk("secret-looking text")]);
        let err = read_reply(wrong).unwrap_err();
        assert!(err.contains("got a string") && !err.contains("secret"), "{err}");
        assert!(autoclaim_reply(Value::Int(3)).is_err());
    }

    #[test]
    fn reads_autoclaim_replies() {
        let reply =
            Value::Array(vec![bulk("0-0"), Value::Array(vec![entry("5-1", &["a", "b"])]), Value::Array(vec![])]);
        let (cursor, entries) = autoclaim_reply(reply).unwrap();
        assert_eq!(cursor, "0-0");
        assert_eq!(entries, vec![Entry { id: "5-1".into(), fields: Some(vec![(b"a".to_vec(), b"b".to_vec())]) }]);
    }

    #[test]
    fn offsets_grow_with_the_id() {
        assert_eq!(offset("0-1"), Some(1));
        assert_eq!(offset("1-0"), Some(1 << 20));
        let ids = ["1700000000000-0", "1700000000000-1", "1700000000000-1048575", "1700000000001-0"];
        let offsets: Vec<u64> = ids.iter().map(|id| offset(id).unwrap()).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        assert_eq!(offset("1-1048576"), None, "a sequence beyond 20 bits");
        assert_eq!(offset(&format!("{}-0", 1u64 << 44)), None, "a time beyond 44 bits");
        assert_eq!(offset("17000-x"), None);
        assert_eq!(offset("garbage"), None);
    }

    #[test]
    fn payload_is_the_field_or_else_every_field() {
        let fields = |pairs: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
        };
        let json = |p: &Payload| conflux_api::sonic_rs::to_string(p).unwrap();
        let p = payload(fields(&[("data", r#"{"n":1}"#), ("other", "x")]), "data").unwrap();
        assert_eq!(json(&p), r#"{"n":1}"#);
        let p = payload(fields(&[("user", "u1"), ("n", "2")]), "data").unwrap();
        assert_eq!(json(&p), r#"{"n":"2","user":"u1"}"#);
        let bad = payload(fields(&[("data", "{not json")]), "data").unwrap_err();
        assert_eq!(json(&bad), r#""{not json""#);
        let p = payload(fields(&[("body", "[1,2]")]), "body").unwrap();
        assert_eq!(json(&p), "[1,2]");
    }
}
