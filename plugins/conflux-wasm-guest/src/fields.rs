//! Shallow JSON editing: read an object's members without building a tree,
//! change a few, write it back. Much cheaper than a full `serde_json::Value`
//! round trip when a guest touches a handful of fields.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON object's members in their original order, each value kept as raw JSON text.
#[derive(Debug, Clone, Default)]
pub struct Fields<'a> {
    members: Vec<(Cow<'a, str>, Cow<'a, RawValue>)>,
}

impl<'a> Fields<'a> {
    /// Reads an object from JSON bytes (borrowing from them).
    pub fn parse(bytes: &'a [u8]) -> Result<Fields<'a>, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("payload is not a JSON object: {e}"))
    }

    /// The raw JSON of a member.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    /// A member read as a typed value (a string, a number, a struct).
    pub fn get_as<'s, T: Deserialize<'s>>(&'s self, key: &str) -> Option<Result<T, String>> {
        self.get(key).map(|raw| serde_json::from_str(raw.get()).map_err(|e| format!("`{key}`: {e}")))
    }

    /// A member that is itself an object, read shallowly too.
    pub fn object(&self, key: &str) -> Option<Result<Fields<'_>, String>> {
        self.get(key).map(|raw| Fields::parse(raw.get().as_bytes()).map_err(|e| format!("`{key}`: {e}")))
    }

    /// Sets (or adds, at the end) a member to any serializable value.
    pub fn set<T: serde::Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), String> {
        let raw = serde_json::value::to_raw_value(value).map_err(|e| format!("`{key}`: {e}"))?;
        self.set_raw(key, raw);
        Ok(())
    }

    /// Sets (or adds, at the end) a member to raw JSON.
    pub fn set_raw(&mut self, key: &str, raw: Box<RawValue>) {
        match self.members.iter_mut().find(|(k, _)| k == key) {
            Some(member) => member.1 = Cow::Owned(raw),
            None => self.members.push((Cow::Owned(key.to_string()), Cow::Owned(raw))),
        }
    }

    /// Removes a member, returning whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.members.len();
        self.members.retain(|(k, _)| k != key);
        before != self.members.len()
    }

    /// Member names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(k, _)| k.as_ref())
    }

    /// Writes the object as compact JSON.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.members.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>() + 2);
        out.push(b'{');
        for (i, (key, value)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, key.as_ref());
            out.push(b':');
            out.extend_from_slice(value.get().as_bytes());
        }
        out.push(b'}');
        out
    }

    /// The object as a raw JSON value, to nest it with [`Fields::set_raw`].
    pub fn to_raw(&self) -> Box<RawValue> {
        let text = String::from_utf8(self.to_vec()).expect("JSON output is UTF-8");
        RawValue::from_string(text).expect("members are valid JSON")
    }
}

/// A member name, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Key(key), value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push((key, Cow::Borrowed(value)));
                }
                Ok(Fields { members })
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_order_and_untouched_members() {
        let text = br#"{"id":"e1","data":{"userId":"u-1","guests":2},"note":"a\"b"}"#;
        let mut top = Fields::parse(text).unwrap();
        let mut data = top.object("data").unwrap().unwrap();
        assert_eq!(data.get_as::<String>("userId").unwrap().unwrap(), "u-1");
        data.set("userId", "anon").unwrap();
        data.set("band", "couple").unwrap();
        let data = data.to_raw();
        top.set_raw("data", data);
        assert_eq!(
            String::from_utf8(top.to_vec()).unwrap(),
            r#"{"id":"e1","data":{"userId":"anon","guests":2,"band":"couple"},"note":"a\"b"}"#
        );
        assert!(Fields::parse(b"[1]").is_err());
    }
}
