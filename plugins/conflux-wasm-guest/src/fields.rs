//! Shallow JSON editing: read an object's members without building a tree,
//! change a few, write it back. One pass over the bytes finds where each
//! member starts and ends; untouched members are copied through as they
//! are, so a guest that masks three fields pays for a scan and a copy, not
//! for a parse into `serde_json::Value` and a serialization back.
//!
//! The scanner checks structure (quotes, brackets, separators), not the
//! grammar of every number: payloads come from the host, which parsed them,
//! and whatever a guest emits is parsed again by the host.

use std::borrow::Cow;

/// A JSON object's members in their original order, each value kept as raw JSON text.
#[derive(Debug, Clone, Default)]
pub struct Fields<'a> {
    members: Vec<(Key<'a>, Cow<'a, str>)>,
}

/// A member name, borrowed when the source has no escapes in it.
#[derive(Debug, Clone)]
struct Key<'a> {
    name: Cow<'a, str>,
    /// The name as it was written, quotes included, when it can be copied out unchanged.
    written: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// Reads an object from JSON bytes (borrowing from them).
    pub fn parse(bytes: &'a [u8]) -> Result<Fields<'a>, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("payload is not UTF-8: {e}"))?;
        Fields::parse_str(text)
    }

    /// Reads an object from JSON text (borrowing from it).
    pub fn parse_str(text: &'a str) -> Result<Fields<'a>, String> {
        let mut scan = Scanner::new(text);
        let members = scan.object().map_err(|e| format!("payload is not a JSON object: {e}"))?;
        scan.skip_ws();
        if scan.at != text.len() {
            return Err(format!("payload is not a JSON object: trailing characters at byte {}", scan.at));
        }
        Ok(Fields { members })
    }

    /// The raw JSON text of a member (`"u-1"`, `42`, `{"a":1}`).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.members.iter().find(|(k, _)| k.name == key).map(|(_, v)| v.as_ref())
    }

    /// A member's text when it is a JSON string (unescaped; borrowed when it has no escapes).
    pub fn get_str(&self, key: &str) -> Option<Cow<'_, str>> {
        self.get(key).and_then(string_text)
    }

    /// A member read as a typed value (a string, a number, a struct).
    pub fn get_as<'s, T: serde::Deserialize<'s>>(&'s self, key: &str) -> Option<Result<T, String>> {
        self.get(key).map(|raw| serde_json::from_str(raw).map_err(|e| format!("`{key}`: {e}")))
    }

    /// A member that is itself an object, read shallowly too.
    pub fn object(&self, key: &str) -> Option<Result<Fields<'_>, String>> {
        self.get(key).map(|raw| Fields::parse_str(raw).map_err(|e| format!("`{key}`: {e}")))
    }

    /// Sets (or adds, at the end) a member to any serializable value.
    pub fn set<T: serde::Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), String> {
        let raw = serde_json::to_string(value).map_err(|e| format!("`{key}`: {e}"))?;
        self.set_raw(key, raw);
        Ok(())
    }

    /// Sets (or adds, at the end) a member to a string, without going through serde.
    pub fn set_str(&mut self, key: &str, value: &str) {
        let mut raw = Vec::with_capacity(value.len() + 2);
        write_string(&mut raw, value);
        self.set_raw(key, String::from_utf8(raw).expect("escaped text is UTF-8"));
    }

    /// Sets (or adds, at the end) a member to raw JSON text. The text is not
    /// checked here: the host refuses an emitted payload that is not JSON.
    pub fn set_raw(&mut self, key: &str, raw: impl Into<Cow<'a, str>>) {
        let raw = raw.into();
        match self.members.iter_mut().find(|(k, _)| k.name == key) {
            Some(member) => member.1 = raw,
            None => self.members.push((Key { name: Cow::Owned(key.to_string()), written: None }, raw)),
        }
    }

    /// Removes a member, returning whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.members.len();
        self.members.retain(|(k, _)| k.name != key);
        before != self.members.len()
    }

    /// Member names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(k, _)| k.name.as_ref())
    }

    /// Appends the object as compact JSON to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.members.iter().map(|(k, v)| k.name.len() + v.len() + 4).sum::<usize>() + 2);
        out.push(b'{');
        for (i, (key, value)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match key.written {
                Some(written) => out.extend_from_slice(written.as_bytes()),
                None => write_string(out, &key.name),
            }
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        }
        out.push(b'}');
    }

    /// The object as compact JSON.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// The object as JSON text, to nest it with [`Fields::set_raw`].
    pub fn to_raw(&self) -> String {
        String::from_utf8(self.to_vec()).expect("JSON output is UTF-8")
    }
}

/// The text of a raw JSON string (`"a\"b"` → `a"b`); `None` for any other value.
pub fn string_text(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

/// Appends `text` as a JSON string, escaping only where JSON requires it.
pub fn write_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut copied = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&bytes[copied..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
                copied = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[copied..i]);
        out.extend_from_slice(escape);
        copied = i + 1;
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

/// A cursor over JSON text that finds where values start and end.
pub(crate) struct Scanner<'a> {
    text: &'a str,
    pub(crate) at: usize,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Scanner { text, at: 0 }
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    pub(crate) fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    pub(crate) fn expect(&mut self, byte: u8) -> Result<(), String> {
        self.skip_ws();
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", byte as char, self.at))
        }
    }

    /// The members of the object starting here.
    fn object(&mut self) -> Result<Vec<(Key<'a>, Cow<'a, str>)>, String> {
        self.expect(b'{')?;
        let mut members = Vec::with_capacity(16);
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(members);
        }
        loop {
            self.skip_ws();
            let (name, written) = self.key()?;
            let key = Key { name, written };
            self.expect(b':')?;
            self.skip_ws();
            let start = self.at;
            self.value()?;
            members.push((key, Cow::Borrowed(&self.text[start..self.at])));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(members);
                }
                _ => return Err(format!("expected `,` or `}}` at byte {}", self.at)),
            }
        }
    }

    /// Reads a member name: its text, and the name as written (quotes
    /// included) when it has no escapes.
    pub(crate) fn key(&mut self) -> Result<(Cow<'a, str>, Option<&'a str>), String> {
        let start = self.at;
        let escaped = self.string()?;
        let written = &self.text[start..self.at];
        if escaped {
            let name = serde_json::from_str::<String>(written).map_err(|e| format!("member name: {e}"))?;
            Ok((Cow::Owned(name), None))
        } else {
            Ok((Cow::Borrowed(&written[1..written.len() - 1]), Some(written)))
        }
    }

    /// Skips the string starting here; tells whether it had escapes.
    fn string(&mut self) -> Result<bool, String> {
        if self.peek() != Some(b'"') {
            return Err(format!("expected a string at byte {}", self.at));
        }
        let bytes = self.text.as_bytes();
        let mut i = self.at + 1;
        let mut escaped = false;
        loop {
            i = next_quote_or_backslash(bytes, i).ok_or("unterminated string")?;
            if bytes[i] == b'"' {
                self.at = i + 1;
                return Ok(escaped);
            }
            escaped = true;
            i += 2;
        }
    }

    /// Skips one value of any kind.
    pub(crate) fn value(&mut self) -> Result<(), String> {
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{' | b'[') => self.nested(),
            Some(_) => {
                let start = self.at;
                while let Some(b) = self.peek() {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                        break;
                    }
                    self.at += 1;
                }
                if self.at == start {
                    Err(format!("expected a value at byte {start}"))
                } else {
                    Ok(())
                }
            }
            None => Err("unexpected end of input".into()),
        }
    }

    /// Skips an object or array: brackets counted, strings stepped over
    /// whole (so brackets inside them do not count).
    fn nested(&mut self) -> Result<(), String> {
        let bytes = self.text.as_bytes();
        let mut depth = 0usize;
        loop {
            match bytes.get(self.at) {
                Some(b'"') => {
                    self.string()?;
                    continue;
                }
                Some(b'{' | b'[') => depth += 1,
                Some(b'}' | b']') => {
                    depth -= 1;
                    if depth == 0 {
                        self.at += 1;
                        return Ok(());
                    }
                }
                Some(_) => {}
                None => return Err("unexpected end of input".into()),
            }
            self.at += 1;
        }
    }
}

/// Where the next `"` or `\` is, from `from` on. Looks at eight bytes at a
/// time (the usual bit trick for "has a byte equal to"): strings are most of
/// a payload, and a byte-by-byte loop is what a scan spends its time on.
fn next_quote_or_backslash(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = word ^ (ONES * u64::from(b'"'));
        let slash = word ^ (ONES * u64::from(b'\\'));
        let found = (quote.wrapping_sub(ONES) & !quote | slash.wrapping_sub(ONES) & !slash) & HIGH;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    bytes.get(i..)?.iter().position(|&b| b == b'"' || b == b'\\').map(|p| i + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_order_and_untouched_members() {
        let text = br#"{"id":"e1","data":{"userId":"u-1","guests":2,"tags":["a]",{"b":"}"}]},"note":"a\"b"}"#;
        let mut top = Fields::parse(text).unwrap();
        let mut data = top.object("data").unwrap().unwrap();
        assert_eq!(data.get_as::<String>("userId").unwrap().unwrap(), "u-1");
        assert_eq!(data.get("tags"), Some(r#"["a]",{"b":"}"}]"#));
        data.set("userId", "anon").unwrap();
        data.set_str("band", "cou\"ple");
        let data = data.to_raw();
        top.set_raw("data", data);
        assert_eq!(
            String::from_utf8(top.to_vec()).unwrap(),
            r#"{"id":"e1","data":{"userId":"anon","guests":2,"tags":["a]",{"b":"}"}],"band":"cou\"ple"},"note":"a\"b"}"#
        );
        assert_eq!(top.get_str("note").unwrap(), "a\"b");
        assert_eq!(top.get_str("id").unwrap(), "e1");
        assert!(top.get_str("data").is_none());
    }

    #[test]
    fn whitespace_and_escaped_names() {
        let text = b" { \"a\\u0062\" : [ 1 , 2 ] ,\n\"c\":null } ";
        let mut fields = Fields::parse(text).unwrap();
        assert_eq!(fields.keys().collect::<Vec<_>>(), ["ab", "c"]);
        assert_eq!(fields.get("ab"), Some("[ 1 , 2 ]"));
        assert!(fields.remove("c"));
        assert!(!fields.remove("c"));
        assert_eq!(fields.to_raw(), r#"{"ab":[ 1 , 2 ]}"#);
        assert_eq!(Fields::parse(b"{}").unwrap().to_raw(), "{}");
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        for bad in [&b"[1]"[..], b"{\"a\":1", b"{\"a\" 1}", b"{\"a\":}", b"{\"a\":[1}", b"{\"a\":\"x}", b"{} x", b""] {
            assert!(Fields::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn finds_quotes_and_backslashes_at_every_offset() {
        for len in 0..20 {
            for at in 0..len {
                for stop in [b'"', b'\\'] {
                    let mut text = vec![b'a'; len];
                    text[at] = stop;
                    // A byte just above each target must not match (borrows in the bit trick).
                    if at + 1 < len {
                        text[at + 1] = stop + 1;
                    }
                    for from in 0..=at {
                        assert_eq!(next_quote_or_backslash(&text, from), Some(at), "len {len} at {at} from {from}");
                    }
                }
            }
            assert_eq!(next_quote_or_backslash(&vec![b'#'; len], 0), None);
        }
    }

    #[test]
    fn writes_strings_escaped_like_serde_json() {
        for text in ["plain", "q\"b\\s", "line\nfeed\ttab\r", "\u{1}\u{1f}", "é✓"] {
            let mut out = Vec::new();
            write_string(&mut out, text);
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(text).unwrap());
        }
    }
}
