//! Edits at known places: find several member paths of a JSON object in one
//! pass, change some, and splice the changes into the original text.
//!
//! [`Fields`](crate::Fields) splits an object into its members and writes
//! them all back; a guest that masks three fields of `data` then scans
//! `data` twice and writes both levels anew. With [`Paths`] the text is
//! scanned once, nothing is built per member, and the output is the input
//! with a few byte ranges replaced (or members added before a closing brace).

use std::borrow::Cow;

use crate::fields::{string_text, write_string, Scanner};

/// Member paths (`["data", "userId"]`) to find in each event, numbered in
/// the order given. Build once, in [`Stage::configure`](crate::Stage::configure) or `Default`.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    root: Node,
    /// Per path: its last key and the node of the object holding it.
    leaves: Vec<(String, usize)>,
    nodes: usize,
}

/// An object along the paths: the members wanted in it.
#[derive(Debug, Clone, Default)]
struct Node {
    id: usize,
    /// Key, the path that ends there (if one does), the object below it.
    members: Vec<(String, Option<usize>, Node)>,
}

impl Paths {
    /// Paths of object keys; each must have at least one key.
    pub fn new<P: AsRef<str>>(paths: impl IntoIterator<Item = impl AsRef<[P]>>) -> Paths {
        let mut built = Paths { nodes: 1, ..Paths::default() };
        for path in paths {
            built.add(path.as_ref());
        }
        built
    }

    /// Adds a path and returns its number (a path added twice keeps its first number).
    pub fn add<P: AsRef<str>>(&mut self, path: &[P]) -> usize {
        assert!(!path.is_empty(), "a path has at least one key");
        let index = self.leaves.len();
        let nodes = &mut self.nodes;
        let mut node = &mut self.root;
        for (depth, key) in path.iter().enumerate() {
            let key = key.as_ref();
            let at = match node.members.iter().position(|(name, ..)| name == key) {
                Some(at) => at,
                None => {
                    node.members.push((key.to_string(), None, Node { id: *nodes, members: Vec::new() }));
                    *nodes += 1;
                    node.members.len() - 1
                }
            };
            if depth + 1 == path.len() {
                if let Some(existing) = node.members[at].1 {
                    return existing;
                }
                node.members[at].1 = Some(index);
                self.leaves.push((key.to_string(), node.id));
            }
            node = &mut node.members[at].2;
        }
        index
    }

    /// How many paths there are.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// Scans an event's payload (a JSON object) once for every path.
    pub fn find<'t>(&'t self, bytes: &'t [u8]) -> Result<Found<'t>, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("payload is not UTF-8: {e}"))?;
        let mut found = Found {
            paths: self,
            text,
            values: vec![None; self.leaves.len()],
            closes: vec![None; self.nodes],
            edits: vec![None; self.leaves.len()],
        };
        let mut scan = Scanner::new(text);
        let shape = |e: String| format!("payload is not a JSON object: {e}");
        scan.skip_ws();
        scan_object(&mut scan, &self.root, &mut found).map_err(shape)?;
        scan.skip_ws();
        if scan.at != text.len() {
            return Err(shape(format!("trailing characters at byte {}", scan.at)));
        }
        Ok(found)
    }
}

/// Walks the object at the scanner, recording the wanted members' values
/// (at their first place, as `Fields::get` finds them) and where each
/// wanted object closes.
fn scan_object(scan: &mut Scanner<'_>, node: &Node, found: &mut Found<'_>) -> Result<(), String> {
    scan.expect(b'{')?;
    let mut met = vec![false; node.members.len()];
    scan.skip_ws();
    if scan.peek() == Some(b'}') {
        found.closes[node.id] = Some(scan.at);
        scan.at += 1;
        return Ok(());
    }
    loop {
        scan.skip_ws();
        let (name, _) = scan.key()?;
        scan.expect(b':')?;
        scan.skip_ws();
        let start = scan.at;
        let wanted = node.members.iter().enumerate().find(|(i, (key, ..))| !met[*i] && *key == name);
        match wanted {
            Some((i, (_, path, below))) => {
                met[i] = true;
                if !below.members.is_empty() && scan.peek() == Some(b'{') {
                    scan_object(scan, below, found)?;
                } else {
                    scan.value()?;
                }
                if let Some(path) = path {
                    found.values[*path] = Some((start, scan.at));
                }
            }
            None => scan.value()?,
        }
        scan.skip_ws();
        match scan.peek() {
            Some(b',') => scan.at += 1,
            Some(b'}') => {
                found.closes[node.id] = Some(scan.at);
                scan.at += 1;
                return Ok(());
            }
            _ => return Err(format!("expected `,` or `}}` at byte {}", scan.at)),
        }
    }
}

/// One payload's paths, found; edits are collected and applied by [`Found::to_vec`].
#[derive(Debug)]
pub struct Found<'t> {
    paths: &'t Paths,
    text: &'t str,
    /// Per path: the byte range of its value.
    values: Vec<Option<(usize, usize)>>,
    /// Per object node: where its closing brace is.
    closes: Vec<Option<usize>>,
    /// Per path: its new raw JSON value.
    edits: Vec<Option<Vec<u8>>>,
}

impl<'t> Found<'t> {
    /// The raw JSON of path `n`'s value (`"u-1"`, `42`, `{"a":1}`), as the payload has it.
    pub fn get(&self, n: usize) -> Option<&'t str> {
        self.values[n].map(|(start, end)| &self.text[start..end])
    }

    /// Path `n`'s value when it is a JSON string (unescaped; borrowed when it has no escapes).
    pub fn get_str(&self, n: usize) -> Option<Cow<'t, str>> {
        self.get(n).and_then(string_text)
    }

    /// Sets path `n` to raw JSON text: replaces its value, or adds the member
    /// at the end of its object (new members of one object land in path order). Fails when that object is not in the
    /// payload. The text is not checked here: the host refuses a payload
    /// that is not JSON.
    pub fn set_raw(&mut self, n: usize, raw: impl Into<Vec<u8>>) -> Result<(), String> {
        let (name, node) = &self.paths.leaves[n];
        if self.values[n].is_none() && self.closes[*node].is_none() {
            return Err(format!("no object to add `{name}` to"));
        }
        self.edits[n] = Some(raw.into());
        Ok(())
    }

    /// Sets path `n` to a string.
    pub fn set_str(&mut self, n: usize, value: &str) -> Result<(), String> {
        let mut raw = Vec::with_capacity(value.len() + 2);
        write_string(&mut raw, value);
        self.set_raw(n, raw)
    }

    /// The payload with every edit applied; untouched bytes are copied as they are.
    pub fn to_vec(&self) -> Vec<u8> {
        // (where, replaced up to, path): replacements and insertions, in text order.
        let mut splices: Vec<(usize, usize, usize)> = Vec::with_capacity(self.edits.len());
        for (n, edit) in self.edits.iter().enumerate() {
            if edit.is_none() {
                continue;
            }
            match self.values[n] {
                Some((start, end)) => splices.push((start, end, n)),
                None => {
                    let close = self.closes[self.paths.leaves[n].1].expect("set_raw checked the object is there");
                    splices.push((close, close, n));
                }
            }
        }
        splices.sort_by_key(|&(start, _, n)| (start, n));
        let bytes = self.text.as_bytes();
        let added: usize = splices.iter().map(|&(.., n)| self.paths.leaves[n].0.len() + 4).sum::<usize>()
            + self.edits.iter().flatten().map(Vec::len).sum::<usize>();
        let mut out = Vec::with_capacity(bytes.len() + added);
        let mut at = 0;
        let mut inserted_at = None;
        for (start, end, n) in splices {
            out.extend_from_slice(&bytes[at..start]);
            let raw = self.edits[n].as_deref().expect("only edited paths are spliced");
            if start == end {
                // A new member: after a comma unless it is the first in an empty object.
                let empty = self.text[..start].trim_end().ends_with('{');
                if !empty || inserted_at == Some(start) {
                    out.push(b',');
                }
                write_string(&mut out, &self.paths.leaves[n].0);
                out.push(b':');
                inserted_at = Some(start);
            }
            out.extend_from_slice(raw);
            at = end;
        }
        out.extend_from_slice(&bytes[at..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fields;

    /// The same edits made by splitting both levels into members.
    fn with_fields(text: &str, edits: &[(&str, &str)]) -> String {
        let mut top = Fields::parse_str(text).unwrap();
        let mut data = top.object("data").unwrap().unwrap();
        for (key, raw) in edits {
            data.set_raw(key, raw.to_string());
        }
        let data = data.to_raw();
        top.set_raw("data", data);
        String::from_utf8(top.to_vec()).unwrap()
    }

    fn compact(text: &str) -> String {
        serde_json::from_str::<serde_json::Value>(text).unwrap().to_string()
    }

    #[test]
    fn splices_agree_with_splitting_into_members() {
        let paths = Paths::new([["data", "userId"], ["data", "band"], ["data", "guests"], ["data", "x\"y"]]);
        for text in [
            r#"{"id":"e1","data":{"userId":"u-1","guests":2,"tags":["a]",{"b":"}"}]},"note":"a\"b"}"#,
            r#"{"data":{}}"#,
            r#" { "data" : { "guests" : 3 , "userId" : null } , "z" : [ ] } "#,
            r#"{"data":{"userId":"first"},"data":{"userId":"second"}}"#,
            r#"{"data":{"us\u0065rId":"escaped key","band":"old"}}"#,
        ] {
            let mut found = paths.find(text.as_bytes()).unwrap();
            let user = found.get_str(0).map(|s| s.into_owned());
            found.set_str(0, &format!("anon:{}", user.unwrap_or_default())).unwrap();
            found.set_raw(1, "\"couple\"").unwrap();
            found.set_raw(3, "1").unwrap();
            found.set_raw(1, "\"group\"").unwrap();
            let spliced = String::from_utf8(found.to_vec()).unwrap();
            let user = paths.find(text.as_bytes()).unwrap().get_str(0).map(|s| s.into_owned()).unwrap_or_default();
            let expected =
                with_fields(text, &[("userId", &format!("\"anon:{user}\"")), ("band", "\"group\""), ("x\"y", "1")]);
            assert_eq!(compact(&spliced), compact(&expected), "{text}");
        }
    }

    #[test]
    fn reads_first_places_and_refuses_what_it_cannot_place() {
        let mut paths = Paths::new([&["data", "a"][..], &["data", "b", "c"], &["top"]]);
        assert_eq!(paths.add(&["data", "a"]), 0, "a path added again keeps its number");
        assert_eq!(paths.len(), 3);
        let found = paths.find(br#"{"data":{"a":1,"a":2,"b":"no object"},"top":{"k":[1]}}"#).unwrap();
        assert_eq!(found.get(0), Some("1"));
        assert_eq!(found.get(2), Some(r#"{"k":[1]}"#));
        let mut found = paths.find(br#"{"data":{"b":"no object"}}"#).unwrap();
        assert!(found.set_raw(1, "2").unwrap_err().contains("no object"));
        assert_eq!(found.to_vec(), br#"{"data":{"b":"no object"}}"#, "nothing set, nothing changed");
        for bad in [&b"[1]"[..], b"{\"data\":{\"a\":1}", b"{} x", b"\xff"] {
            assert!(paths.find(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
