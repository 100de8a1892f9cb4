//! Dotted field paths into an event payload (`data.restaurantId`, `items.0.sku`).

use sonic_rs::{JsonValueMutTrait, JsonValueTrait, Value};

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
        FieldPath::parse("data.extra.deep").unwrap().set(&mut v, Value::from(3)).unwrap();
        assert_eq!(FieldPath::parse("data.extra.deep").unwrap().get(&v).and_then(|v| v.as_i64()), Some(3));
        assert!(FieldPath::parse("data.id.x").unwrap().set(&mut v, Value::from(1)).is_err());
        assert!(FieldPath::parse("a..b").is_err());
    }
}
