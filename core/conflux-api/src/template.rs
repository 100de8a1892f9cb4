//! String templates over event fields: `events.{{ type }}.{{ data.restaurantId }}`.
//! Parsed once at build time; rendering fails when a field is missing, so a
//! topic or subject is never silently wrong.

use sonic_rs::{JsonValueTrait, Value};

use crate::path::FieldPath;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(FieldPath),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; `{{ path }}` inserts a payload field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| format!("`{{{{` without `}}}}` in `{text}`"))?;
            parts.push(Part::Field(FieldPath::parse(after[..end].trim())?));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Whether the template has no fields (renders the same for every event).
    pub fn is_static(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// Renders with `data`'s fields; strings go in as they are, other values as JSON.
    pub fn render(&self, data: &Value) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(path) => {
                    let value = path.get(data).ok_or_else(|| format!("field `{path}` is missing"))?;
                    match value.as_str() {
                        Some(s) => out.push_str(s),
                        None if value.is_null() => return Err(format!("field `{path}` is null")),
                        None => out.push_str(&sonic_rs::to_string(value).map_err(|e| e.to_string())?),
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_and_refuses_missing_ones() {
        let t = Template::parse("events.{{ type }}.{{data.n}}").unwrap();
        let v: Value = sonic_rs::from_str(r#"{"type":"click","data":{"n":3}}"#).unwrap();
        assert_eq!(t.render(&v).unwrap(), "events.click.3");
        assert!(t.render(&sonic_rs::from_str(r#"{"type":"x"}"#).unwrap()).is_err());
        assert!(Template::parse("plain").unwrap().is_static());
        assert!(Template::parse("a.{{ b").is_err());
    }
}
