//! Setting a field inside JSON text without parsing it into a tree.
//!
//! Making sonic's parsed objects writable copies every field into a hash
//! map (about a microsecond for a booking event) and loses the field order.
//! When a payload still has its text, setting a few fields by editing the
//! text and parsing it once again is cheaper, keeps the order, and leaves
//! the payload with text that outputs copy instead of serializing.

use sonic_rs::{JsonContainerTrait, Value};

/// Sets `path` to `value` (JSON text) inside `json`, in place. Every parent
/// on the path must exist and be an object. Returns false, with `json`
/// untouched, when the text does not allow a plain edit: a parent is
/// missing or not an object, a key is written with escapes. A key that
/// appears twice is found at its first place, as sonic's `get` finds it.
///
/// `parsed`, the value `json` was parsed from if at hand, lets a new key in
/// an object that closes the document (the root, or a last member such as
/// `data` in `{"type":…,"data":{…}}`) be placed from the end of the text
/// without scanning it.
pub fn set(json: &mut Vec<u8>, path: &[impl AsRef<str>], value: &[u8], parsed: Option<&Value>) -> bool {
    let Some((name, parents)) = path.split_last() else { return false };
    if !is_plain_key(name.as_ref()) {
        return false;
    }
    if let Some(close) = parsed.and_then(|doc| closing_brace_of_new_key(json, doc, path)) {
        let empty = json[..close].trim_ascii_end().ends_with(b"{");
        insert_member(json, close, empty, name.as_ref(), value);
        return true;
    }
    let mut object = skip_ws(json, 0);
    for parent in parents {
        match find(json, object, parent.as_ref().as_bytes()) {
            Some(Found::Member { value_start, .. }) if json.get(value_start) == Some(&b'{') => object = value_start,
            _ => return false,
        }
    }
    match find(json, object, name.as_ref().as_bytes()) {
        Some(Found::Member { value_start }) => {
            let Some(value_end) = skip_value(json, value_start) else { return false };
            json.splice(value_start..value_end, value.iter().copied());
        }
        Some(Found::Absent { close, empty }) => insert_member(json, close, empty, name.as_ref(), value),
        None => return false,
    }
    true
}

fn insert_member(json: &mut Vec<u8>, close: usize, empty: bool, name: &str, value: &[u8]) {
    json.splice(close..close, member_text(empty, name, value));
}

/// `"name":value`, after a comma unless it is to be an empty object's first member.
fn member_text(empty: bool, name: &str, value: &[u8]) -> Vec<u8> {
    let mut member = Vec::with_capacity(name.len() + value.len() + 4);
    if !empty {
        member.push(b',');
    }
    member.push(b'"');
    member.extend_from_slice(name.as_bytes());
    member.extend_from_slice(b"\":");
    member.extend_from_slice(value);
    member
}

/// A replacement of `text[start..end]`, computed on a payload's text and
/// applied with [`crate::payload::Payload::splice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splice {
    pub start: usize,
    pub end: usize,
    pub text: Vec<u8>,
}

/// The splice that sets member `name` of an object in `json`: replaces the
/// value that starts at `value_start` if the member is there, else adds the
/// member before the object's closing brace at `close`. None when neither is
/// known or `name` cannot be written plainly.
pub(crate) fn set_splice(
    json: &[u8],
    value_start: Option<usize>,
    close: Option<usize>,
    name: &str,
    value: &[u8],
) -> Option<Splice> {
    if !is_plain_key(name) {
        return None;
    }
    match (value_start, close) {
        (Some(start), _) => {
            let end = skip_value(json, start)?;
            Some(Splice { start, end, text: value.to_vec() })
        }
        (None, Some(close)) if json.get(close) == Some(&b'}') => {
            let empty = json[..close].trim_ascii_end().ends_with(b"{");
            Some(Splice { start: close, end: close, text: member_text(empty, name, value) })
        }
        _ => None,
    }
}

/// `json` with every splice applied, in one pass. Splices must not overlap;
/// insertions (members added before a brace) at one place land in the order
/// given, each after a comma (the first of an empty object's new members
/// was made without one).
pub(crate) fn apply_splices(json: &[u8], splices: &mut [Splice]) -> Option<Vec<u8>> {
    splices.sort_by_key(|s| s.start);
    let added: usize = splices.iter().map(|s| s.text.len() + 1).sum();
    let mut out = Vec::with_capacity(json.len() + added);
    let mut at = 0;
    let mut inserted_at = None;
    for splice in splices.iter() {
        if splice.start < at || splice.end < splice.start || splice.end > json.len() {
            return None;
        }
        out.extend_from_slice(&json[at..splice.start]);
        let insertion = splice.start == splice.end;
        if insertion && inserted_at == Some(splice.start) && splice.text.first() != Some(&b',') {
            out.push(b',');
        }
        inserted_at = insertion.then_some(splice.start);
        out.extend_from_slice(&splice.text);
        at = splice.end;
    }
    out.extend_from_slice(&json[at..]);
    Some(out)
}

/// Where the object to receive a new key closes, when the parsed value shows
/// that the key is new and that every object on the path is the last member
/// of its parent (so the objects close, innermost first, at the text's end).
fn closing_brace_of_new_key(json: &[u8], doc: &Value, path: &[impl AsRef<str>]) -> Option<usize> {
    let (name, parents) = path.split_last()?;
    if !is_plain_key(name.as_ref()) {
        return None;
    }
    let mut object = doc.as_object()?;
    for parent in parents {
        let (last_key, last) = object.iter().last()?;
        // `get` must find that very member (a repeated key is read at its first place).
        if last_key != parent.as_ref() || !std::ptr::eq(object.get(&parent.as_ref())?, last) {
            return None;
        }
        object = last.as_object()?;
    }
    if object.get(&name.as_ref()).is_some() {
        return None;
    }
    let mut end = json.len();
    for _ in 0..=parents.len() {
        end = json[..end].trim_ascii_end().len();
        if end == 0 || json[end - 1] != b'}' {
            return None;
        }
        end -= 1;
    }
    Some(end)
}

/// The value of member `key` of the object `json` starts with (well-formed
/// JSON), as the text from where that value starts: the value is not
/// skipped, so descending into it costs nothing extra. `Some(None)` when
/// the object has no such member, `None` when a plain scan cannot tell (not
/// an object, a key written with escapes).
pub(crate) fn member<'j>(json: &'j [u8], key: &str) -> Option<Option<&'j [u8]>> {
    if !is_plain_key(key) {
        return None;
    }
    match find(json, 0, key.as_bytes())? {
        Found::Member { value_start } => Some(Some(&json[value_start..])),
        Found::Absent { .. } => Some(None),
    }
}

/// The length of the value `json` starts with.
pub(crate) fn value_len(json: &[u8]) -> Option<usize> {
    skip_value(json, 0)
}

/// Member name, the slot its value goes to (if a path ends there), members below it.
type KeyMember = (Box<[u8]>, Option<usize>, KeyTree);

/// Paths of plain object keys, merged into a tree, to find together in one
/// pass over a document ([`KeyTree::scan`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyTree {
    members: Vec<KeyMember>,
    /// The slot that receives where this object's closing brace is (for a
    /// member to be added); the scan then reads the object to its end.
    close: Option<usize>,
}

impl KeyTree {
    /// Adds a path whose value is to go to `slot`; false (tree unchanged)
    /// for a path a plain scan cannot follow.
    pub(crate) fn insert(&mut self, path: &[impl AsRef<str>], slot: usize) -> bool {
        if path.is_empty() {
            return false;
        }
        match self.node(path) {
            Some(node) => {
                node.1 = Some(slot);
                true
            }
            None => false,
        }
    }

    /// Asks for where the object at `path` (the root when empty) closes, in `slot`.
    pub(crate) fn insert_close(&mut self, path: &[impl AsRef<str>], slot: usize) -> bool {
        if path.is_empty() {
            self.close = Some(slot);
            return true;
        }
        match self.node(path) {
            Some(node) => {
                node.2.close = Some(slot);
                true
            }
            None => false,
        }
    }

    /// The member entry for a non-empty path, created as needed.
    fn node(&mut self, path: &[impl AsRef<str>]) -> Option<&mut KeyMember> {
        if !path.iter().all(|key| is_plain_key(key.as_ref())) {
            return None;
        }
        let (last, parents) = path.split_last()?;
        let mut tree = self;
        for key in parents {
            let at = tree.member(key.as_ref().as_bytes());
            tree = &mut tree.members[at].2;
        }
        let at = tree.member(last.as_ref().as_bytes());
        Some(&mut tree.members[at])
    }

    fn member(&mut self, key: &[u8]) -> usize {
        match self.members.iter().position(|(name, ..)| &name[..] == key) {
            Some(at) => at,
            None => {
                self.members.push((key.into(), None, KeyTree::default()));
                self.members.len() - 1
            }
        }
    }

    fn wants_anything(&self) -> bool {
        !self.members.is_empty() || self.close.is_some()
    }

    /// Finds every path in the object `json` starts with, writing where each
    /// value starts into its slot (`found` must hold every slot, all `None`).
    /// A key that repeats is taken at its first place, as `find` does.
    /// False when a plain scan cannot read the document (escaped keys, not
    /// an object): then `found` means nothing.
    pub(crate) fn scan(&self, json: &[u8], found: &mut [Option<usize>]) -> bool {
        let mut left = found.len();
        self.scan_object(json, 0, found, &mut left).is_some()
    }

    /// Returns where the object opening at `open` ends, or `usize::MAX` once
    /// every slot is filled (the scan stops there).
    fn scan_object(&self, json: &[u8], open: usize, found: &mut [Option<usize>], left: &mut usize) -> Option<usize> {
        if json.get(open) != Some(&b'{') {
            return None;
        }
        // Members of this object already met: later repeats of their key are skipped.
        let mut met = 0u64;
        let mut i = skip_ws(json, open + 1);
        if json.get(i) == Some(&b'}') {
            return Some(self.closed(i, found, left));
        }
        loop {
            let (raw_key, value_start) = member_at(json, i)?;
            let member = self
                .members
                .iter()
                .enumerate()
                .find(|(n, (name, ..))| &name[..] == raw_key && (*n >= 64 || met & (1 << n) == 0));
            let value_end = match member {
                Some((n, (_, slot, below))) => {
                    if n < 64 {
                        met |= 1 << n;
                    }
                    if let Some(slot) = slot.filter(|s| found[*s].is_none()) {
                        found[slot] = Some(value_start);
                        *left -= 1;
                        if *left == 0 {
                            return Some(usize::MAX);
                        }
                    }
                    if below.wants_anything() && json.get(value_start) == Some(&b'{') {
                        below.scan_object(json, value_start, found, left)?
                    } else {
                        skip_value(json, value_start)?
                    }
                }
                None => skip_value(json, value_start)?,
            };
            if value_end == usize::MAX {
                return Some(usize::MAX);
            }
            match next_member(json, value_end)? {
                Next::Member(next) => i = next,
                Next::Close(close) => return Some(self.closed(close, found, left)),
            }
        }
    }

    /// Records that this object closes at `close` if asked; returns where it
    /// ends, or `usize::MAX` when that filled the last slot.
    fn closed(&self, close: usize, found: &mut [Option<usize>], left: &mut usize) -> usize {
        if let Some(slot) = self.close.filter(|s| found[*s].is_none()) {
            found[slot] = Some(close);
            *left -= 1;
            if *left == 0 {
                return usize::MAX;
            }
        }
        close + 1
    }
}

fn is_plain_key(key: &str) -> bool {
    !key.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
}

enum Found {
    /// The key is there; its value starts at `value_start`.
    Member { value_start: usize },
    /// The key is not there; the object closes at `close`.
    Absent { close: usize, empty: bool },
}

/// Looks for `key` among the members of the object starting at `open`,
/// stopping at the first match. None for anything but a well-formed object
/// whose keys up to the match (or all, if absent) are plain.
fn find(json: &[u8], open: usize, key: &[u8]) -> Option<Found> {
    if json.get(open) != Some(&b'{') {
        return None;
    }
    let mut i = skip_ws(json, open + 1);
    if json.get(i) == Some(&b'}') {
        return Some(Found::Absent { close: i, empty: true });
    }
    loop {
        let (raw_key, value_start) = member_at(json, i)?;
        if raw_key == key {
            return Some(Found::Member { value_start });
        }
        match next_member(json, skip_value(json, value_start)?)? {
            Next::Member(next) => i = next,
            Next::Close(close) => return Some(Found::Absent { close, empty: false }),
        }
    }
}

/// The object member whose key starts at `i`: its key as written and where
/// its value starts. None for a key written with escapes or a malformed member.
fn member_at(json: &[u8], i: usize) -> Option<(&[u8], usize)> {
    if json.get(i) != Some(&b'"') {
        return None;
    }
    // The key's first stop must be its closing quote: an escape (or a
    // control byte) means it is not plain.
    let stop = crate::check::string_stop(json, i + 1)?;
    if json[stop] != b'"' {
        return None;
    }
    let raw_key = &json[i + 1..stop];
    let colon = skip_ws(json, stop + 1);
    if json.get(colon) != Some(&b':') {
        return None;
    }
    Some((raw_key, skip_ws(json, colon + 1)))
}

/// What follows a member's value.
enum Next {
    /// Another member, starting here.
    Member(usize),
    /// The object's closing brace, here.
    Close(usize),
}

fn next_member(json: &[u8], value_end: usize) -> Option<Next> {
    let i = skip_ws(json, value_end);
    match json.get(i) {
        Some(b',') => Some(Next::Member(skip_ws(json, i + 1))),
        Some(b'}') => Some(Next::Close(i)),
        _ => None,
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index after the string opening at `i`.
fn skip_string(json: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        // Eight bytes at a time: most strings in events are short, where memchr's setup costs more.
        i = crate::check::string_stop(json, i)?;
        match json[i] {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            // A control byte: not in checked text, but no reason to stop here.
            _ => i += 1,
        }
    }
}

/// Bytes that matter when skipping over an object or array.
const STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'[' as usize] = true;
    table[b'}' as usize] = true;
    table[b']' as usize] = true;
    table
};

/// Bytes that end a number, `true`, `false` or `null`.
const SCALAR_END: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    let ends = b",}] \t\n\r";
    while i < ends.len() {
        table[ends[i] as usize] = true;
        i += 1;
    }
    table
};

/// The index after the value starting at `i`.
fn skip_value(json: &[u8], i: usize) -> Option<usize> {
    match json.get(i)? {
        b'"' => skip_string(json, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                j += json.get(j..)?.iter().position(|b| STRUCTURAL[*b as usize])?;
                match json[j] {
                    b'"' => {
                        j = skip_string(json, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                }
                j += 1;
            }
        }
        _ => {
            let len = json[i..].iter().position(|b| SCALAR_END[*b as usize]).unwrap_or(json.len() - i);
            (len > 0).then_some(i + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(json: &str, path: &[&str], value: &str) -> Option<String> {
        let mut text = json.as_bytes().to_vec();
        // With the parsed value at hand, the result is the same where the
        // scan succeeds; the end-of-text path may also take what it refuses.
        if let Ok(parsed) = sonic_rs::from_str::<Value>(json) {
            let mut fast = text.clone();
            if set(&mut fast, path, value.as_bytes(), Some(&parsed)) {
                sonic_rs::from_slice::<Value>(&fast).expect("an edit parses");
            } else {
                fast = text.clone();
            }
            let mut slow = text.clone();
            if set(&mut slow, path, value.as_bytes(), None) {
                assert_eq!(String::from_utf8_lossy(&fast), String::from_utf8_lossy(&slow), "{json} {path:?}");
            }
        }
        set(&mut text, path, value.as_bytes(), None).then(|| String::from_utf8(text).unwrap())
    }

    #[test]
    fn adds_and_replaces_keeping_the_order() {
        let json = r#"{"type":"a","data":{"guests":6,"zone":"t"},"n":[1,{"x":"}"}]}"#;
        assert_eq!(
            edit(json, &["data", "large"], "true").unwrap(),
            r#"{"type":"a","data":{"guests":6,"zone":"t","large":true},"n":[1,{"x":"}"}]}"#
        );
        assert_eq!(
            edit(json, &["data", "guests"], "7").unwrap(),
            r#"{"type":"a","data":{"guests":7,"zone":"t"},"n":[1,{"x":"}"}]}"#
        );
        assert_eq!(edit(json, &["n"], "null").unwrap(), r#"{"type":"a","data":{"guests":6,"zone":"t"},"n":null}"#);
        assert_eq!(edit("{}", &["a"], "1").unwrap(), r#"{"a":1}"#);
        assert_eq!(
            edit(" { \"a\" : \"q\\\"}\" , \"b\":{ } } ", &["b", "c"], "2").unwrap(),
            " { \"a\" : \"q\\\"}\" , \"b\":{ \"c\":2} } "
        );
    }

    #[test]
    fn refuses_what_it_cannot_edit_plainly() {
        let json = r#"{"type":"a","data":"text","dup":1,"dup":2,"esc\u0061pe":1}"#;
        assert_eq!(edit(json, &["data", "x"], "1"), None, "parent not an object");
        assert_eq!(edit(json, &["missing", "x"], "1"), None, "parent missing");
        assert_eq!(edit(json, &["new"], "1"), None, "an escaped key elsewhere in the object");
        assert_eq!(
            edit(json, &["dup"], "0").unwrap(),
            r#"{"type":"a","data":"text","dup":0,"dup":2,"esc\u0061pe":1}"#,
            "the first of a repeated key, the one sonic reads"
        );
        assert_eq!(edit("[1,2]", &["a"], "1"), None, "not an object");
        assert_eq!(edit(r#"{"a":1"#, &["b"], "1"), None, "truncated");
        let empty: &[&str] = &[];
        assert_eq!(edit("{}", empty, "1"), None);
    }

    /// Every edit of many documents parses, and equals the same change made
    /// on the parsed value (payloads are parsed again from edited text).
    #[test]
    fn edits_parse_and_agree_with_value_edits() {
        use sonic_rs::{JsonValueMutTrait, JsonValueTrait};
        let docs = [
            r#"{}"#,
            r#"{"a":1}"#,
            r#" {"a" : { } , "b":[{"a":"}]"}], "c":"\\"}"#,
            r#"{"type":"x","data":{"n":-1.5e3,"s":"a,b}","o":{"p":null,"q":[true,false]}}}"#,
            "{\n\t\"a\":\t{\"b\" :\r\n2 }\n}",
            r#"{"u":"\u00e9\ud83d\ude00","data":{}}"#,
        ];
        let paths: [&[&str]; 7] =
            [&["a"], &["new"], &["data", "n"], &["data", "added"], &["data", "o", "p"], &["a", "b"], &["u"]];
        let values = ["1", "\"t\\\"q\"", "null", "[1,{\"x\":2}]", "{}", "-0.25", "true"];
        let mut checked = 0;
        for doc in docs {
            for (i, path) in paths.iter().enumerate() {
                let value_text = values[i % values.len()];
                let mut text = doc.as_bytes().to_vec();
                let parsed: Value = sonic_rs::from_str(doc).unwrap();
                let hint = (i % 2 == 0).then_some(&parsed);
                if !set(&mut text, path, value_text.as_bytes(), hint) {
                    continue;
                }
                let edited: Value = sonic_rs::from_slice(&text).unwrap_or_else(|e| panic!("{doc} {path:?}: {e}"));
                let mut expected: Value = sonic_rs::from_str(doc).unwrap();
                let mut target = &mut expected;
                for segment in &path[..path.len() - 1] {
                    target = target.get_mut(*segment).unwrap();
                }
                target
                    .as_object_mut()
                    .unwrap()
                    .insert(path[path.len() - 1], sonic_rs::from_str::<Value>(value_text).unwrap());
                assert_eq!(edited, expected, "{doc} {path:?}");
                assert!(edited.is_object() && edited.as_object().is_some_and(|o| !o.is_empty()));
                checked += 1;
            }
        }
        assert!(checked >= 20, "{checked} edits checked");
    }
}

#[cfg(test)]
mod fast_path {
    use super::*;

    #[test]
    fn a_new_key_in_a_closing_object_is_placed_from_the_end() {
        let json = br#"{"id":"e","data":{"guests":6,"zone":"t"}} "#;
        let parsed: Value = sonic_rs::from_slice(json).unwrap();
        assert_eq!(closing_brace_of_new_key(json, &parsed, &["data", "large"]), Some(json.len() - 3));
        assert_eq!(closing_brace_of_new_key(json, &parsed, &["large"]), Some(json.len() - 2));
        assert_eq!(
            closing_brace_of_new_key(json, &parsed, &["data", "zone"]),
            None,
            "an existing key is replaced by a scan"
        );
        assert_eq!(closing_brace_of_new_key(json, &parsed, &["id", "x"]), None, "not the last member");
    }
}
