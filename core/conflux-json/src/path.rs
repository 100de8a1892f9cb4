//! Dotted field paths into an event payload (`data.restaurantId`, `items.0.sku`).

use sonic_rs::{JsonValueMutTrait, JsonValueTrait, Value};

use crate::edit::{KeyTree, Splice};
use crate::{field::Field, payload::Payload};

/// A parsed field path; parse once at build time, use per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    text: String,
    segments: Vec<String>,
}

impl FieldPath {
    /// Parses `a.b.0.c`. Empty segments are refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("field path is empty".into());
        }
        let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("field path `{text}` has an empty segment"));
        }
        Ok(FieldPath { text: text.to_owned(), segments })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The path's steps (`a.b.0` → `a`, `b`, `0`).
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The value at this path, if every step exists.
    pub fn get<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        let mut current = root;
        for segment in &self.segments {
            current = if current.is_array() {
                current.get(segment.parse::<usize>().ok()?)?
            } else {
                current.get(segment.as_str())?
            };
        }
        Some(current)
    }

    /// The value at this path in a payload, read from its text when it was
    /// not parsed (see [`Field`]). Same steps as [`FieldPath::get`]: a
    /// number indexes an array, anything else names an object's member.
    pub fn lookup<'p>(&self, payload: &'p Payload) -> Option<Field<'p>> {
        self.segments.iter().try_fold(payload.root(), |at, segment| {
            if at.is_array() {
                at.index(segment.parse::<usize>().ok()?)
            } else {
                at.get(segment)
            }
        })
    }

    /// Sets the value at this path, creating objects along the way.
    /// Fails only when a step goes through a non-object value.
    pub fn set(&self, root: &mut Value, value: Value) -> Result<(), String> {
        let (last, parents) = self.segments.split_last().expect("path is never empty");
        let mut current = root;
        for segment in parents {
            if current.is_null() {
                *current = Value::new_object();
            }
            let object = current
                .as_object_mut()
                .ok_or_else(|| format!("`{}`: `{segment}` is not inside an object", self.text))?;
            if object.get(segment).is_none() {
                object.insert(segment, Value::new_object());
            }
            current = object.get_mut(segment).expect("just inserted");
        }
        if current.is_null() {
            *current = Value::new_object();
        }
        let object =
            current.as_object_mut().ok_or_else(|| format!("`{}`: parent of `{last}` is not an object", self.text))?;
        object.insert(last, value);
        Ok(())
    }
}

/// Several field paths read together: a payload that was not parsed is
/// scanned once for all of them (a stage reading a time, a group and a
/// metric field does not walk the text three times).
#[derive(Debug, Clone, Default)]
pub struct FieldSet {
    paths: Vec<FieldPath>,
    /// Where each path's value lands in a scan; `None` for a path looked up
    /// on its own (a number among its steps may index an array).
    slots: Vec<Option<usize>>,
    slot_count: usize,
    tree: KeyTree,
}

impl FieldSet {
    pub fn new(paths: impl IntoIterator<Item = FieldPath>) -> Self {
        let mut set = FieldSet::default();
        for path in paths {
            let same = set.paths.iter().position(|p| *p == path).and_then(|i| set.slots[i]);
            let slot = match same {
                Some(slot) => Some(slot),
                None if path.segments.iter().any(|s| s.parse::<usize>().is_ok()) => None,
                None if set.tree.insert(&path.segments, set.slot_count) => {
                    set.slot_count += 1;
                    Some(set.slot_count - 1)
                }
                None => None,
            };
            set.paths.push(path);
            set.slots.push(slot);
        }
        set
    }

    /// The value at each path, in the order the paths were given, as
    /// [`FieldPath::lookup`] would find it.
    pub fn lookup<'p>(&self, payload: &'p Payload) -> Vec<Option<Field<'p>>> {
        if let Field::Text(text) = payload.root() {
            let mut found = vec![None; self.slot_count];
            if self.tree.scan(text, &mut found) {
                return self
                    .paths
                    .iter()
                    .zip(&self.slots)
                    .map(|(path, slot)| match slot {
                        Some(slot) => found[*slot].map(|start| Field::Text(&text[start..])),
                        None => path.lookup(payload),
                    })
                    .collect();
            }
        }
        self.paths.iter().map(|path| path.lookup(payload)).collect()
    }
}

/// Field paths located in a payload's JSON text in one pass, for a stage
/// that reads several fields and writes some (a script): where each value
/// starts, and where each object that may receive a new member closes. The
/// writes then become splices at known places instead of more scans.
#[derive(Debug, Clone, Default)]
pub struct TextScan {
    tree: KeyTree,
    /// What each slot holds: a value (false) or a close (true), at a path.
    slots: Vec<(bool, Vec<String>)>,
}

impl TextScan {
    /// The slot that will hold where the value at `path` starts; None for a
    /// path a plain scan cannot follow (a key with quotes or escapes).
    pub fn value<P: AsRef<str>>(&mut self, path: &[P]) -> Option<usize> {
        self.slot(false, path)
    }

    /// The slot that will hold where the object at `path` (the root when
    /// empty) closes, so a member can be added to it.
    pub fn close<P: AsRef<str>>(&mut self, path: &[P]) -> Option<usize> {
        self.slot(true, path)
    }

    fn slot<P: AsRef<str>>(&mut self, close: bool, path: &[P]) -> Option<usize> {
        let same = |(c, p): &(bool, Vec<String>)| {
            *c == close && p.iter().map(String::as_str).eq(path.iter().map(AsRef::as_ref))
        };
        if let Some(slot) = self.slots.iter().position(same) {
            return Some(slot);
        }
        let slot = self.slots.len();
        let added = if close { self.tree.insert_close(path, slot) } else { self.tree.insert(path, slot) };
        if !added {
            return None;
        }
        self.slots.push((close, path.iter().map(|p| p.as_ref().to_owned()).collect()));
        Some(slot)
    }

    /// Scans a payload that still has its text and whose root is an object;
    /// None otherwise (read it with [`Field`] instead).
    pub fn locate<'p>(&self, payload: &'p Payload) -> Option<Located<'p>> {
        let Field::Text(text) = payload.root() else { return None };
        let mut found = vec![None; self.slots.len()];
        self.tree.scan(text, &mut found).then_some(Located { text, found })
    }
}

/// What [`TextScan::locate`] found in one payload's text.
#[derive(Debug)]
pub struct Located<'p> {
    text: &'p [u8],
    found: Vec<Option<usize>>,
}

impl<'p> Located<'p> {
    /// The value in a value slot, if the path is there (each parent an object).
    pub fn value(&self, slot: usize) -> Option<Field<'p>> {
        self.found[slot].map(|start| Field::Text(&self.text[start..]))
    }

    /// Whether a value slot holds an object.
    pub fn is_object(&self, slot: usize) -> bool {
        self.found[slot].is_some_and(|start| self.text.get(start) == Some(&b'{'))
    }

    /// The splice that sets member `name` to `json`, given the member's value
    /// slot and its object's close slot. Apply with [`Payload::splice`].
    /// None when the object was not found or `name` needs escaping.
    pub fn set(&self, value: usize, close: usize, name: &str, json: &[u8]) -> Option<Splice> {
        crate::edit::set_splice(self.text, self.found[value], self.found[close], name, json)
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_set() {
        let mut v: Value = sonic_rs::from_str(r#"{"data":{"id":"r1","items":[{"sku":"a"}]}}"#).unwrap();
        assert_eq!(FieldPath::parse("data.id").unwrap().get(&v).and_then(|v| v.as_str()), Some("r1"));
        assert_eq!(FieldPath::parse("data.items.0.sku").unwrap().get(&v).and_then(|v| v.as_str()), Some("a"));
        assert!(FieldPath::parse("data.nope").unwrap().get(&v).is_none());
        let text = Payload::from_json(br#"{"data":{"id":"r1","items":[{"sku":"a"}],"0":"zero"}}"#).unwrap();
        let sku = FieldPath::parse("data.items.0.sku").unwrap();
        assert_eq!(sku.lookup(&text).and_then(|f| f.as_str()).as_deref(), Some("a"), "read from the text");
        let zero = FieldPath::parse("data.0").unwrap();
        assert_eq!(zero.lookup(&text).and_then(|f| f.as_str()).as_deref(), Some("zero"), "a number names a member");
        assert!(FieldPath::parse("data.items.x").unwrap().lookup(&text).is_none());
        FieldPath::parse("data.extra.deep").unwrap().set(&mut v, Value::from(3)).unwrap();
        assert_eq!(FieldPath::parse("data.extra.deep").unwrap().get(&v).and_then(|v| v.as_i64()), Some(3));
        assert!(FieldPath::parse("data.id.x").unwrap().set(&mut v, Value::from(1)).is_err());
        assert!(FieldPath::parse("a..b").is_err());
    }

    #[test]
    fn a_set_finds_what_each_path_finds() {
        let docs = [
            r#"{"t":"x","data":{"id":"r1","n":2,"items":[{"sku":"a"}],"0":"zero"},"data":{"id":"second"},"t":"y"}"#,
            r#"{"data":"scalar","t":1}"#,
            r#"{"t":{"deep":[1,2]},"data":{"n":{"v":null}}}"#,
            r#"{"a\u0062":1,"t":2}"#,
            r#"[1,2]"#,
            r#"{}"#,
        ];
        let paths = ["t", "data.id", "data.n", "data.items.0.sku", "data.0", "data.id", "data.n.v", "nope.x", "t.deep"];
        let set = FieldSet::new(paths.iter().map(|p| FieldPath::parse(p).unwrap()));
        for doc in docs {
            for payload in
                [Payload::from_json(doc.as_bytes()).unwrap(), Payload::from(sonic_rs::from_str::<Value>(doc).unwrap())]
            {
                let together: Vec<String> = set
                    .lookup(&payload)
                    .iter()
                    .map(|f| format!("{:?}", f.map(|f| f.to_value().into_owned())))
                    .collect();
                let one_by_one: Vec<String> = paths
                    .iter()
                    .map(|p| {
                        format!(
                            "{:?}",
                            FieldPath::parse(p).unwrap().lookup(&payload).map(|f| f.to_value().into_owned())
                        )
                    })
                    .collect();
                assert_eq!(together, one_by_one, "{doc}");
            }
        }
    }

    #[test]
    fn a_text_scan_places_writes_where_one_edit_at_a_time_would() {
        let docs = [
            r#"{"type":"a","data":{"guests":6,"zone":"t"},"n":[1,{"x":"}"}]}"#,
            r#" { "data" : { } , "type" : 1 } "#,
            r#"{"data":{"zone":"first"},"data":{"zone":"second"}}"#,
            r#"{"data":{"g\u0075ests":1,"guests":2}}"#,
            r#"{"data":"scalar"}"#,
            r#"[1]"#,
        ];
        let writes: [(&[&str], &str); 4] =
            [(&["data", "zone"], r#""x""#), (&["data", "large"], "true"), (&["data", "n"], "1"), (&["top"], "[]")];
        let mut scan = TextScan::default();
        let slots: Vec<(usize, usize)> = writes
            .iter()
            .map(|(path, _)| (scan.value(path).unwrap(), scan.close(&path[..path.len() - 1]).unwrap()))
            .collect();
        assert_eq!(scan.value(&["data", "zone"]), Some(slots[0].0), "a path asked twice shares its slot");
        assert_eq!(scan.value(&["a\"b"]), None, "a key that needs escaping is not scanned");
        for doc in docs {
            let mut payload = Payload::from_json(doc.as_bytes()).unwrap();
            let mut one_by_one = doc.trim().as_bytes().to_vec();
            let expected =
                writes.iter().all(|(path, value)| crate::edit::set(&mut one_by_one, path, value.as_bytes(), None));
            let located = scan.locate(&payload);
            let splices: Option<Vec<Splice>> = located.and_then(|located| {
                writes
                    .iter()
                    .zip(&slots)
                    .map(|((path, value), (slot, close))| {
                        located.set(*slot, *close, path.last().unwrap(), value.as_bytes())
                    })
                    .collect()
            });
            match splices {
                Some(splices) => {
                    assert!(expected, "the scan wrote where a plain edit cannot: {doc}");
                    assert!(payload.splice(splices));
                    assert_eq!(payload.raw_json(), Some(&one_by_one[..]), "{doc}");
                }
                None => assert!(!expected || doc.contains('\\'), "the scan gave up on {doc}"),
            }
        }
    }
}
