//! Typed values taken out of events for outputs that write columns rather
//! than text (a database row): each column names where its value comes from
//! (a payload field, a metadata key, the event or ingest time) and the type
//! it must have. A value of the wrong type is an error naming the column,
//! never a silent conversion: `"42"` is not an integer.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::Deserialize;
use sonic_rs::JsonType;

use crate::event::{Event, Timestamp};
use crate::Field;
use crate::FieldPath;

/// The type a column's value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Text,
    /// A JSON integer that fits 64 bits.
    Integer,
    /// Any JSON number.
    Double,
    Boolean,
    /// An RFC 3339 string, or epoch seconds, milliseconds or nanoseconds.
    Timestamp,
    /// Any JSON value, kept as JSON.
    Json,
}

/// One column as configured: `guests: { from: data.guests, type: integer }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    /// Where the value comes from: a payload field path (`data.guests`),
    /// `meta.<key>` (`meta.result_key`), `event_time` or `ingest_time`.
    pub from: String,
    #[serde(rename = "type")]
    pub kind: ColumnType,
    /// Write NULL when the value is missing or null, instead of refusing the event.
    #[serde(default)]
    pub nullable: bool,
}

/// A value taken out of an event, of its column's type.
#[derive(Debug, Clone, PartialEq)]
pub enum TypedValue {
    Null,
    Text(String),
    Integer(i64),
    Double(f64),
    Boolean(bool),
    Timestamp(Timestamp),
    /// JSON text, as the event had it (never parsed and written again).
    Json(String),
}

/// Why an event has no valid value for a column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ColumnError {
    #[error("column `{column}`: `{from}` is missing")]
    Missing { column: String, from: String },
    #[error("column `{column}`: `{from}` is null")]
    Null { column: String, from: String },
    #[error("column `{column}`: expected {expected}, found {found}")]
    WrongType { column: String, expected: &'static str, found: &'static str },
}

#[derive(Debug, Clone)]
enum Source {
    Payload(FieldPath),
    Meta(String),
    EventTime,
    IngestTime,
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    from: String,
    source: Source,
    kind: ColumnType,
    nullable: bool,
}

/// Columns in a fixed order, resolved once at build time; their payload
/// fields are found in one scan of each event's text.
#[derive(Debug, Clone)]
pub struct Columns {
    columns: Vec<Column>,
    /// The payload paths, in column order (columns from elsewhere have none).
    fields: conflux_json::path::FieldSet,
}

impl Columns {
    /// Builds from (name, config) pairs, in the order the output writes them.
    pub fn new<'a>(columns: impl IntoIterator<Item = (&'a str, &'a ColumnConfig)>) -> Result<Self, String> {
        let mut built = Vec::new();
        for (name, config) in columns {
            let source = match config.from.as_str() {
                "event_time" => Source::EventTime,
                "ingest_time" => Source::IngestTime,
                from => match from.strip_prefix("meta.") {
                    Some(key) if !key.is_empty() => Source::Meta(key.to_string()),
                    _ => Source::Payload(FieldPath::parse(from).map_err(|e| format!("column `{name}`: {e}"))?),
                },
            };
            let time_source = matches!(source, Source::EventTime | Source::IngestTime);
            if time_source && config.kind != ColumnType::Timestamp {
                return Err(format!("column `{name}`: `{}` is a time; its type must be `timestamp`", config.from));
            }
            built.push(Column {
                name: name.to_string(),
                from: config.from.clone(),
                source,
                kind: config.kind,
                nullable: config.nullable,
            });
        }
        let paths = built.iter().filter_map(|c| match &c.source {
            Source::Payload(path) => Some(path.clone()),
            _ => None,
        });
        Ok(Columns { fields: conflux_json::path::FieldSet::new(paths), columns: built })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    pub fn types(&self) -> impl Iterator<Item = ColumnType> + '_ {
        self.columns.iter().map(|c| c.kind)
    }

    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// One value per column, in order; payload fields are read from the
    /// event's text in one scan, without parsing it.
    pub fn values(&self, event: &Event) -> Result<Vec<TypedValue>, ColumnError> {
        let found = self.fields.lookup(&event.data);
        let mut from_payload = found.into_iter();
        self.columns
            .iter()
            .map(|column| {
                let field = match &column.source {
                    Source::Payload(_) => from_payload.next().flatten(),
                    _ => None,
                };
                column.value(event, field)
            })
            .collect()
    }
}

impl Column {
    /// `payload`: this column's field, found by [`Columns::values`]'s scan.
    fn value(&self, event: &Event, payload: Option<Field<'_>>) -> Result<TypedValue, ColumnError> {
        let found: Option<Field<'_>> = match &self.source {
            Source::EventTime => return self.time(event.event_time),
            Source::IngestTime => return Ok(TypedValue::Timestamp(event.ingest_time)),
            Source::Payload(_) => payload,
            Source::Meta(key) => event.meta.get(key).map(Field::Parsed),
        };
        let Some(field) = found else {
            return self.absent(ColumnError::Missing { column: self.name.clone(), from: self.from.clone() });
        };
        if field.is_null() {
            return self.absent(ColumnError::Null { column: self.name.clone(), from: self.from.clone() });
        }
        let wrong = |expected| ColumnError::WrongType { column: self.name.clone(), expected, found: kind(&field) };
        Ok(match self.kind {
            ColumnType::Text => TypedValue::Text(field.as_str().map(Cow::into_owned).ok_or_else(|| wrong("a string"))?),
            ColumnType::Integer => TypedValue::Integer(field.as_i64().ok_or_else(|| wrong("an integer"))?),
            ColumnType::Double => TypedValue::Double(field.as_f64().ok_or_else(|| wrong("a number"))?),
            ColumnType::Boolean => TypedValue::Boolean(field.as_bool().ok_or_else(|| wrong("a boolean"))?),
            ColumnType::Timestamp => TypedValue::Timestamp(
                Timestamp::from_field(&field).ok_or_else(|| wrong("an RFC 3339 time or epoch number"))?,
            ),
            ColumnType::Json => TypedValue::Json(field.json_text().into_owned()),
        })
    }

    fn time(&self, at: Option<Timestamp>) -> Result<TypedValue, ColumnError> {
        match at {
            Some(t) => Ok(TypedValue::Timestamp(t)),
            None => self.absent(ColumnError::Missing { column: self.name.clone(), from: self.from.clone() }),
        }
    }

    fn absent(&self, error: ColumnError) -> Result<TypedValue, ColumnError> {
        if self.nullable {
            Ok(TypedValue::Null)
        } else {
            Err(error)
        }
    }
}

/// What was found, for errors (never the value: it may be personal data).
fn kind(field: &Field<'_>) -> &'static str {
    match field.kind() {
        JsonType::String => "a string",
        JsonType::Number if field.as_i64().is_some() => "an integer",
        JsonType::Number => "a number with a fraction or beyond 64 bits",
        JsonType::Boolean => "a boolean",
        JsonType::Object => "an object",
        JsonType::Array => "an array",
        JsonType::Null => "null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Payload;

    fn columns(spec: &[(&str, &str, ColumnType, bool)]) -> Columns {
        let configs: Vec<(String, ColumnConfig)> = spec
            .iter()
            .map(|(name, from, kind, nullable)| {
                (name.to_string(), ColumnConfig { from: from.to_string(), kind: *kind, nullable: *nullable })
            })
            .collect();
        Columns::new(configs.iter().map(|(n, c)| (n.as_str(), c))).unwrap()
    }

    fn event(json: &str) -> Event {
        let mut e = Event::with_time(Payload::from_json(json.as_bytes()).unwrap(), Timestamp::from_millis(5));
        e.meta.insert("result_key", "p/agg/[\"r-1\"]/t");
        e
    }

    #[test]
    fn values_come_out_typed_from_fields_metadata_and_times() {
        use ColumnType::*;
        let cols = columns(&[
            ("id", "data.id", Text, false),
            ("guests", "data.guests", Integer, false),
            ("price", "data.price", Double, false),
            ("vip", "data.vip", Boolean, false),
            ("at", "timestamp", Timestamp, false),
            ("tags", "data.tags", Json, false),
            ("key", "meta.result_key", Text, false),
            ("seen", "ingest_time", Timestamp, false),
            ("note", "data.note", Text, true),
        ]);
        let e = event(
            r#"{"timestamp":"2026-11-22T10:00:00Z","data":{"id":"b-1","guests":4,"price":12,"vip":true,"tags":["a"]}}"#,
        );
        let values = cols.values(&e).unwrap();
        assert_eq!(
            values[..4],
            [
                TypedValue::Text("b-1".into()),
                TypedValue::Integer(4),
                TypedValue::Double(12.0),
                TypedValue::Boolean(true)
            ]
        );
        assert_eq!(values[4], TypedValue::Timestamp(crate::Timestamp::parse_rfc3339("2026-11-22T10:00:00Z").unwrap()));
        assert_eq!(values[5], TypedValue::Json(r#"["a"]"#.to_string()));
        assert_eq!(values[6], TypedValue::Text("p/agg/[\"r-1\"]/t".into()));
        assert_eq!(values[7], TypedValue::Timestamp(crate::Timestamp::from_millis(5)));
        assert_eq!(values[8], TypedValue::Null, "a nullable missing value is NULL");
        assert!(e.data.raw_json().is_some(), "read from the text, not parsed");
    }

    #[test]
    fn a_wrong_type_or_missing_value_names_the_column_not_the_value() {
        use ColumnType::*;
        let cols = columns(&[("guests", "data.guests", Integer, false)]);
        let err = cols.values(&event(r#"{"data":{"guests":"4"}}"#)).unwrap_err();
        assert_eq!(err.to_string(), "column `guests`: expected an integer, found a string");
        let err = cols.values(&event(r#"{"data":{"guests":4.5}}"#)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column `guests`: expected an integer, found a number with a fraction or beyond 64 bits"
        );
        let err = cols.values(&event(r#"{"data":{}}"#)).unwrap_err();
        assert_eq!(err, ColumnError::Missing { column: "guests".into(), from: "data.guests".into() });
        let err = cols.values(&event(r#"{"data":{"guests":null}}"#)).unwrap_err();
        assert_eq!(err.to_string(), "column `guests`: `data.guests` is null");
    }

    #[test]
    fn times_must_be_timestamp_columns() {
        let config = ColumnConfig { from: "event_time".into(), kind: ColumnType::Text, nullable: false };
        let err = Columns::new([("at", &config)]).unwrap_err();
        assert!(err.contains("must be `timestamp`"), "{err}");
    }
}
