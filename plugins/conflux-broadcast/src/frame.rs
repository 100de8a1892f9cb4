//! What goes over the wire. Every frame is built once, as Server-Sent
//! Events text (`id: <cursor>` when it has one, then `data: <json>` and a
//! blank line); a WebSocket sends the JSON inside it, a slice of the same
//! buffer, so every receiver of an event shares one allocation whichever
//! transport it uses.
//!
//! A cursor is `<epoch>-<sequence>`: sequences are only comparable within
//! one epoch (a process's start, or the fan-out bus several instances
//! share), so a cursor from another epoch starts the client over from the
//! whole state rather than from the wrong place.

use bytes::{BufMut, Bytes};
use conflux_api::Payload;

use crate::channel::Entry;

/// An SSE comment: keeps proxies and the client's idle timer awake.
pub const SSE_HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// The sequence a client saw last, within an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: String,
    pub seq: u64,
}

impl Cursor {
    /// Reads `<epoch>-<sequence>`; anything else is no cursor.
    pub fn parse(text: &str) -> Option<Cursor> {
        let (epoch, seq) = text.trim().rsplit_once('-')?;
        Some(Cursor { epoch: epoch.to_string(), seq: seq.parse().ok()? })
    }

    /// The sequence, when the cursor belongs to `epoch`.
    pub fn within(&self, epoch: &str) -> Option<u64> {
        (self.epoch == epoch).then_some(self.seq)
    }
}

fn push_str(out: &mut Vec<u8>, text: &str) {
    // A &str always serializes; the writer cannot fail.
    let _ = serde_json::to_writer((&mut *out).writer(), text);
}

fn open(epoch: &str, seq: u64, capacity: usize) -> Vec<u8> {
    // A Vec becomes `Bytes` without a copy.
    let mut out = Vec::with_capacity(capacity + 96);
    out.put_slice(b"id: ");
    out.put_slice(epoch.as_bytes());
    out.put_u8(b'-');
    out.put_slice(seq.to_string().as_bytes());
    out.put_slice(b"\ndata: ");
    out
}

fn head(out: &mut Vec<u8>, kind: &str, channel: &str, epoch: &str, seq: u64) {
    out.put_slice(b"{\"type\":");
    push_str(out, kind);
    out.put_slice(b",\"channel\":");
    push_str(out, channel);
    out.put_slice(b",\"seq\":");
    out.put_slice(seq.to_string().as_bytes());
    out.put_slice(b",\"id\":\"");
    out.put_slice(epoch.as_bytes());
    out.put_u8(b'-');
    out.put_slice(seq.to_string().as_bytes());
    out.put_u8(b'"');
}

/// One event: `{"type", "channel", "seq", "id", "key"?, "data"}`.
pub fn update(epoch: &str, seq: u64, kind: &str, channel: &str, key: Option<&str>, data: &Payload) -> Bytes {
    let mut out = open(epoch, seq, data.json_len() + channel.len() + kind.len());
    head(&mut out, kind, channel, epoch, seq);
    if let Some(key) = key {
        out.put_slice(b",\"key\":");
        push_str(&mut out, key);
    }
    out.put_slice(b",\"data\":");
    let start = out.len();
    data.write_json(&mut out);
    if out[start..].iter().any(|&b| b == b'\n' || b == b'\r') {
        // JSON text as it came (pretty-printed): a line break can only be
        // whitespace between tokens (inside a string it is escaped), and an
        // SSE `data:` line must not hold one.
        let json: Vec<u8> = out.drain(start..).filter(|&b| b != b'\n' && b != b'\r').collect();
        out.extend_from_slice(&json);
    }
    out.put_slice(b"}\n\n");
    Bytes::from(out)
}

/// A channel's whole state as of `seq`: `{"type": "initial_state", …, "entries": [update, …]}`.
pub fn initial_state(epoch: &str, channel: &str, seq: u64, entries: &[Entry]) -> Bytes {
    let size: usize = entries.iter().map(|e| e.frame.len()).sum();
    let mut out = open(epoch, seq, size + channel.len());
    head(&mut out, "initial_state", channel, epoch, seq);
    out.put_slice(b",\"entries\":[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(&json_of(&entry.frame));
    }
    out.put_slice(b"]}\n\n");
    Bytes::from(out)
}

/// A reply to the client itself (subscribed, unsubscribed, error): no cursor.
pub fn reply(json: &serde_json::Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    let _ = serde_json::to_writer((&mut out).writer(), json);
    out.put_slice(b"\n\n");
    Bytes::from(out)
}

/// The JSON inside a frame, for a WebSocket: a slice of the same buffer.
pub fn json_of(frame: &Bytes) -> Bytes {
    let start = match frame.starts_with(b"id: ") {
        true => frame.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1),
        false => 0,
    };
    let start = start + b"data: ".len();
    let end = frame.len().saturating_sub(2).max(start);
    frame.slice(start.min(end)..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_sse_text_around_the_json_a_websocket_sends() {
        let data = Payload::from_json(br#"{"n":1,"s":"a\nb"}"#).unwrap();
        let frame = update("e1", 7, "metrics_update", "restaurant:\"r-1\"", Some("k"), &data);
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(text.starts_with("id: e1-7\ndata: {"), "{text}");
        assert!(text.ends_with("}\n\n"));
        assert_eq!(text.matches('\n').count(), 3, "the JSON is one line: {text}");
        let json: serde_json::Value = serde_json::from_slice(&json_of(&frame)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "metrics_update", "channel": "restaurant:\"r-1\"", "seq": 7, "id": "e1-7",
                "key": "k", "data": {"n": 1, "s": "a\nb"}})
        );
        let entry = Entry { seq: 7, key: Some("k".into()), frame };
        let state = initial_state("e1", "c", 9, &[entry.clone(), entry]);
        let json: serde_json::Value = serde_json::from_slice(&json_of(&state)).unwrap();
        assert_eq!(json["type"], "initial_state");
        assert_eq!(json["seq"], 9);
        assert_eq!(json["entries"][1]["data"]["n"], 1);
        let pretty = Payload::from_json(b"{\n  \"a\": [1,\r\n 2]\n}").unwrap();
        let frame = update("e", 1, "u", "c", None, &pretty);
        assert_eq!(&json_of(&frame)[..], br#"{"type":"u","channel":"c","seq":1,"id":"e-1","data":{"a":[1,2]}}"#);
        let reply = reply(&serde_json::json!({"type": "subscribed"}));
        assert_eq!(&json_of(&reply)[..], br#"{"type":"subscribed"}"#);
    }

    #[test]
    fn cursors_name_their_epoch() {
        let cursor = Cursor::parse("k3x9-41").unwrap();
        assert_eq!(cursor.within("k3x9"), Some(41));
        assert_eq!(cursor.within("other"), None);
        assert_eq!(Cursor::parse("12"), None);
        assert_eq!(Cursor::parse("e-x"), None);
        assert_eq!(Cursor::parse("a-b-5").unwrap().epoch, "a-b");
    }
}
