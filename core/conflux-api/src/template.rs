//! String templates over an event: `events.{{ type }}.{{ data.restaurantId }}`
//! reads payload fields, `{{ meta.kafka.key }}` or `{{ meta.result_key }}`
//! its metadata. Parsed once at build time. Payload fields are read from the
//! event's text when it has not been parsed (as [`FieldPath::lookup`] does),
//! so rendering a topic never builds a tree. Rendering fails when a value
//! is missing or null, so a topic, subject or key is never silently wrong.

use std::borrow::Cow;

use sonic_rs::{JsonValueTrait, Value};

use crate::event::{Event, Metadata};
use crate::{Field, FieldPath};
use conflux_json::path::FieldSet;

/// Why a template does not parse or cannot be rendered for an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{{{` without `}}}}` in `{0}`")]
    Unclosed(String),
    #[error("{0}")]
    BadPath(String),
    #[error("field `{0}` is missing")]
    Missing(String),
    #[error("field `{0}` is null")]
    Null(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(FieldPath),
    /// `meta.a.b.c`: metadata keys are flat (`kafka.key`, `auth.claim.tenant`),
    /// so each split of the path into (key, path inside its value) is tried,
    /// longest key first.
    Meta {
        text: String,
        splits: Vec<(String, Vec<String>)>,
    },
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; `{{ path }}` inserts a payload field, `{{ meta.key }}` a metadata value.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| TemplateError::Unclosed(text.to_string()))?;
            let inner = after[..end].trim();
            let path = FieldPath::parse(inner).map_err(TemplateError::BadPath)?;
            parts.push(match inner.strip_prefix("meta.") {
                Some(_) => meta_part(&path),
                None => Part::Field(path),
            });
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

    /// Renders for one event; strings go in as they are, other values as JSON.
    pub fn render(&self, event: &Event) -> Result<String, TemplateError> {
        self.render_read(event, None)
    }

    /// Renders with the payload fields `read` already found (one scan for
    /// every template of a component, see [`TemplateFields`]).
    pub fn render_with(&self, event: &Event, read: &ReadFields<'_, '_>) -> Result<String, TemplateError> {
        self.render_read(event, Some(read))
    }

    fn render_read(&self, event: &Event, read: Option<&ReadFields<'_, '_>>) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(path) => {
                    let found = match read.and_then(|r| r.get(path)) {
                        Some(found) => found,
                        None => path.lookup(&event.data),
                    };
                    let field = found.ok_or_else(|| TemplateError::Missing(path.to_string()))?;
                    if field.is_null() {
                        return Err(TemplateError::Null(path.to_string()));
                    }
                    match field.as_str() {
                        Some(s) => out.push_str(&s),
                        None => out.push_str(&field.json_text()),
                    }
                }
                Part::Meta { text, splits } => {
                    let value = meta_value(&event.meta, splits).ok_or_else(|| TemplateError::Missing(text.clone()))?;
                    if value.is_null() {
                        return Err(TemplateError::Null(text.clone()));
                    }
                    match value.as_str() {
                        Some(s) => out.push_str(s),
                        None => out.push_str(&sonic_rs::to_string(&*value).unwrap_or_default()),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The payload fields of several templates, read from an event's text in
/// one pass rather than one scan per field: an output rendering a key, a
/// field and an amount per event walks the payload once.
#[derive(Debug, Clone, Default)]
pub struct TemplateFields {
    set: FieldSet,
    paths: Vec<FieldPath>,
}

impl TemplateFields {
    pub fn new<'t>(templates: impl IntoIterator<Item = &'t Template>) -> Self {
        let mut paths: Vec<FieldPath> = Vec::new();
        for template in templates {
            for part in &template.parts {
                if let Part::Field(path) = part {
                    if !paths.contains(path) {
                        paths.push(path.clone());
                    }
                }
            }
        }
        TemplateFields { set: FieldSet::new(paths.iter().cloned()), paths }
    }

    /// Every field of the templates, found in one scan of the event's payload.
    pub fn read<'s, 'p>(&'s self, event: &'p Event) -> ReadFields<'s, 'p> {
        let found = if self.paths.is_empty() { Vec::new() } else { self.set.lookup(&event.data) };
        ReadFields { paths: &self.paths, found }
    }
}

/// The fields [`TemplateFields::read`] found in one event.
pub struct ReadFields<'s, 'p> {
    paths: &'s [FieldPath],
    found: Vec<Option<Field<'p>>>,
}

impl<'p> ReadFields<'_, 'p> {
    /// `None` when `path` was not among the fields read.
    fn get(&self, path: &FieldPath) -> Option<Option<Field<'p>>> {
        self.paths.iter().position(|p| p == path).map(|i| self.found[i])
    }
}

fn meta_part(path: &FieldPath) -> Part {
    let segments = &path.segments()[1..];
    let splits =
        (1..=segments.len()).rev().map(|take| (segments[..take].join("."), segments[take..].to_vec())).collect();
    Part::Meta { text: path.to_string(), splits }
}

/// The metadata value a `meta.…` path names.
fn meta_value<'m>(meta: &'m Metadata, splits: &[(String, Vec<String>)]) -> Option<Cow<'m, Value>> {
    splits.iter().find_map(|(key, inside)| {
        let mut at = meta.get(key)?;
        for step in inside {
            at = if at.is_array() { at.get(step.parse::<usize>().ok()?)? } else { at.get(step.as_str())? };
        }
        Some(Cow::Borrowed(at))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Payload;

    fn event(json: &str) -> Event {
        Event::with_time(Payload::from_json(json.as_bytes()).unwrap(), crate::Timestamp::now())
    }

    #[test]
    fn fields_read_in_one_scan_render_as_a_lookup_each_would() {
        let key = Template::parse("r:{{ data.r }}:{{ type }}").unwrap();
        let field = Template::parse("{{ data.zone }}/{{ data.tags.1 }}").unwrap();
        let missing = Template::parse("{{ data.nope }}").unwrap();
        let fields = TemplateFields::new([&key, &field, &missing]);
        for json in [r#"{"type":"t","data":{"r":"a","zone":3,"tags":["x",{"y":1}]}}"#, r#"{"data":{"r":null}}"#] {
            let e = event(json);
            let read = fields.read(&e);
            for t in [&key, &field, &missing] {
                assert_eq!(t.render_with(&e, &read), t.render(&e), "{json}");
            }
        }
        let other = Template::parse("{{ type }}-{{ data.r }}").unwrap();
        let e = event(r#"{"type":"t","data":{"r":"a"}}"#);
        assert_eq!(other.render_with(&e, &TemplateFields::default().read(&e)).unwrap(), "t-a");
    }

    #[test]
    fn renders_fields_from_the_text_and_refuses_missing_or_null_ones() {
        let t = Template::parse("events.{{ type }}.{{data.n}}.{{ data.tags }}").unwrap();
        let e = event(r#"{"type":"click","data":{"n":3,"tags":["a",1]}}"#);
        assert_eq!(t.render(&e).unwrap(), r#"events.click.3.["a",1]"#);
        assert!(e.data.raw_json().is_some(), "rendering read the text, it did not parse the payload");
        assert_eq!(t.render(&event(r#"{"type":"x"}"#)), Err(TemplateError::Missing("data.n".into())));
        let null = Template::parse("{{ type }}").unwrap().render(&event(r#"{"type":null}"#));
        assert_eq!(null, Err(TemplateError::Null("type".into())));
        assert!(Template::parse("plain").unwrap().is_static());
        assert_eq!(Template::parse("a.{{ b"), Err(TemplateError::Unclosed("a.{{ b".into())));
        assert!(matches!(Template::parse("{{ a..b }}"), Err(TemplateError::BadPath(_))));
    }

    #[test]
    fn reads_flat_metadata_keys_and_paths_inside_their_values() {
        let mut e = event(r#"{"meta":"payload field"}"#);
        e.meta.insert("kafka.key", "k-1");
        e.meta.insert("auth.claim.tenant", "t-9");
        e.meta.insert("kafka.headers", sonic_rs::from_str::<Value>(r#"{"origin":"web","n":[4]}"#).unwrap());
        let t = Template::parse("{{ meta.kafka.key }}/{{ meta.auth.claim.tenant }}/{{ meta.kafka.headers.origin }}/{{ meta.kafka.headers.n.0 }}").unwrap();
        assert_eq!(t.render(&e).unwrap(), "k-1/t-9/web/4");
        let missing = Template::parse("{{ meta.kafka.partition }}").unwrap().render(&e);
        assert_eq!(missing, Err(TemplateError::Missing("meta.kafka.partition".into())));
    }
}
