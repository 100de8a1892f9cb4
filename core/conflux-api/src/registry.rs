//! Self-registration of component types, without a central list.
//!
//! Each plugin crate submits one [`Registration`] per component type:
//!
//! ```ignore
//! conflux_api::inventory::submit!(Registration::input::<GenerateConfig>());
//! ```
//!
//! The engine looks types up by kind and name, deserializes the options into
//! the plugin's typed config (with the path of any bad option), and calls its
//! `build`. The config type's JSON Schema documents the options.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer};

use crate::component::{BuildContext, BuiltInput, BuiltStage, Output};
use crate::error::{BuildError, BuildErrorKind};

/// The three kinds of component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Input,
    Stage,
    Output,
}

impl Kind {
    /// Singular name, as used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Input => "input",
            Kind::Stage => "stage",
            Kind::Output => "output",
        }
    }

    /// The pipeline file's section for this kind.
    pub fn section(self) -> &'static str {
        match self {
            Kind::Input => "inputs",
            Kind::Stage => "stages",
            Kind::Output => "outputs",
        }
    }
}

/// Typed config of an input type.
pub trait InputConfig: DeserializeOwned + JsonSchema + 'static {
    /// The `type:` value that selects it.
    const TYPE: &'static str;
    fn build(self, cx: &BuildContext) -> Result<BuiltInput, BuildError>;
}

/// Typed config of a stage type.
pub trait StageConfig: DeserializeOwned + JsonSchema + 'static {
    const TYPE: &'static str;
    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError>;
}

/// Typed config of an output type.
pub trait OutputConfig: DeserializeOwned + JsonSchema + 'static {
    const TYPE: &'static str;
    fn build(self, cx: &BuildContext) -> Result<Box<dyn Output>, BuildError>;
}

/// A build function: raw options (everything but `type` and `from`) to a component.
pub type BuildFn<T> = fn(serde_json::Value, &BuildContext) -> Result<T, BuildError>;

/// Builds a component of one kind.
pub enum Factory {
    Input(BuildFn<BuiltInput>),
    Stage(BuildFn<BuiltStage>),
    Output(BuildFn<Box<dyn Output>>),
}

/// One registered component type.
pub struct Registration {
    pub kind: Kind,
    pub name: &'static str,
    /// Inline schema of the options; nested types land in the generator's definitions.
    pub schema: fn(&mut SchemaGenerator) -> Schema,
    pub factory: Factory,
}

inventory::collect!(Registration);

fn schema_of<C: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    C::json_schema(generator)
}

/// Deserializes options into a typed config, keeping the path of the first bad one.
///
/// Messages describe a bad value by its kind (`a string of 24 characters`),
/// never by its text: option values often come from `${VAR}` and hold secrets.
pub fn deserialize_options<C: DeserializeOwned>(raw: serde_json::Value) -> Result<C, BuildError> {
    serde_path_to_error::deserialize(Options::<OptionError>(raw, std::marker::PhantomData)).map_err(|e| {
        let path = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
        let OptionError { message, kind } = e.into_inner();
        BuildError { path, message, offset: None, kind }
    })
}

/// What a bad value is, without its text.
pub fn describe_value(unexpected: &de::Unexpected) -> String {
    match unexpected {
        de::Unexpected::Str(s) => describe_str(s),
        de::Unexpected::Bool(_) => "a boolean".into(),
        de::Unexpected::Unsigned(_) | de::Unexpected::Signed(_) => "an integer".into(),
        de::Unexpected::Float(_) => "a number".into(),
        de::Unexpected::Char(_) => "a character".into(),
        de::Unexpected::Bytes(b) => format!("{} bytes", b.len()),
        other => other.to_string(),
    }
}

/// `a string of N characters`: the kind and length of a string, never its text.
pub fn describe_str(s: &str) -> String {
    match s.chars().count() {
        0 => "an empty string".into(),
        1 => "a string of 1 character".into(),
        n => format!("a string of {n} characters"),
    }
}

/// The error type options deserialize with: serde's messages, values left
/// out, and the kind of mistake kept apart from the text.
#[derive(Debug)]
struct OptionError {
    message: String,
    kind: BuildErrorKind,
}

impl OptionError {
    fn invalid(message: String) -> Self {
        OptionError { message, kind: BuildErrorKind::Invalid }
    }
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OptionError {}

impl de::Error for OptionError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        OptionError::invalid(msg.to_string())
    }
    fn invalid_type(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        let kind = match unexp {
            de::Unexpected::Str(_) => BuildErrorKind::StringForOtherType,
            _ => BuildErrorKind::Invalid,
        };
        OptionError { message: format!("invalid type: {}, expected {exp}", describe_value(&unexp)), kind }
    }
    fn invalid_value(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        OptionError::invalid(format!("invalid value: {}, expected {exp}", describe_value(&unexp)))
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let list = expected.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ");
        OptionError::invalid(format!("unknown variant ({}), expected one of {list}", describe_str(variant)))
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        // serde's own wording; a field name is config text, never a secret.
        let message = de::value::Error::unknown_field(field, expected).to_string();
        OptionError { message, kind: BuildErrorKind::UnknownField(field.to_string()) }
    }
    fn missing_field(field: &'static str) -> Self {
        OptionError { message: format!("missing field `{field}`"), kind: BuildErrorKind::MissingField(field.into()) }
    }
}

/// A JSON value as a deserializer whose error type is `E` (serde_json's own
/// error type would print bad values whole).
struct Options<E>(serde_json::Value, std::marker::PhantomData<E>);

impl<'de, E: de::Error> IntoDeserializer<'de, E> for Options<E> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

fn options<E>(value: serde_json::Value) -> Options<E> {
    Options(value, std::marker::PhantomData)
}

impl<'de, E: de::Error> de::Deserializer<'de> for Options<E> {
    type Error = E;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, E> {
        use serde_json::Value;
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => visitor.visit_u64(u),
                (None, Some(i)) => visitor.visit_i64(i),
                _ => visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(options::<E>));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Object(map) => {
                let mut map = MapDeserializer::new(map.into_iter().map(|(k, v)| (k, options::<E>(v))));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, E> {
        match self.0 {
            serde_json::Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: de::Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, E> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, E> {
        match self.0 {
            serde_json::Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            serde_json::Value::Object(map) if map.len() == 1 => {
                let map = MapDeserializer::new(map.into_iter().map(|(k, v)| (k, options::<E>(v))));
                visitor.visit_enum(de::value::MapAccessDeserializer::new(map))
            }
            other => Err(E::invalid_type(unexpected(&other), &"a variant name or a mapping of one variant")),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

fn unexpected(value: &serde_json::Value) -> de::Unexpected<'_> {
    match value {
        serde_json::Value::Null => de::Unexpected::Unit,
        serde_json::Value::Bool(b) => de::Unexpected::Bool(*b),
        serde_json::Value::Number(_) => de::Unexpected::Other("a number"),
        serde_json::Value::String(s) => de::Unexpected::Str(s),
        serde_json::Value::Array(_) => de::Unexpected::Seq,
        serde_json::Value::Object(_) => de::Unexpected::Map,
    }
}

fn build_input<C: InputConfig>(raw: serde_json::Value, cx: &BuildContext) -> Result<BuiltInput, BuildError> {
    deserialize_options::<C>(raw)?.build(cx)
}

fn build_stage<C: StageConfig>(raw: serde_json::Value, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
    deserialize_options::<C>(raw)?.build(cx)
}

fn build_output<C: OutputConfig>(raw: serde_json::Value, cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
    deserialize_options::<C>(raw)?.build(cx)
}

impl Registration {
    pub const fn input<C: InputConfig>() -> Self {
        Registration {
            kind: Kind::Input,
            name: C::TYPE,
            schema: schema_of::<C>,
            factory: Factory::Input(build_input::<C>),
        }
    }

    pub const fn stage<C: StageConfig>() -> Self {
        Registration {
            kind: Kind::Stage,
            name: C::TYPE,
            schema: schema_of::<C>,
            factory: Factory::Stage(build_stage::<C>),
        }
    }

    pub const fn output<C: OutputConfig>() -> Self {
        Registration {
            kind: Kind::Output,
            name: C::TYPE,
            schema: schema_of::<C>,
            factory: Factory::Output(build_output::<C>),
        }
    }

    /// Every registered type, sorted by kind then name.
    pub fn all() -> Vec<&'static Registration> {
        let mut all: Vec<_> = inventory::iter::<Registration>.into_iter().collect();
        all.sort_by_key(|r| (r.kind, r.name));
        all
    }

    /// The type registered under `name` for `kind`.
    pub fn find(kind: Kind, name: &str) -> Option<&'static Registration> {
        inventory::iter::<Registration>.into_iter().find(|r| r.kind == kind && r.name == name)
    }

    /// The JSON Schema of this type's options.
    pub fn options_schema(&self) -> Schema {
        let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
        let mut schema = (self.schema)(&mut generator);
        let defs = generator.take_definitions(true);
        if !defs.is_empty() {
            schema.insert("$defs".into(), serde_json::Value::Object(defs));
        }
        schema
    }

    /// The first paragraph of the config type's doc comment.
    pub fn summary(&self) -> String {
        let schema = self.options_schema();
        schema
            .get("description")
            .and_then(|d| d.as_str())
            .map(|d| d.split("\n\n").next().unwrap_or(d).replace('\n', " "))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        count: Option<u64>,
        keys: Option<Vec<String>>,
        mode: Option<Mode>,
        wait: Option<crate::config::Duration>,
        #[serde(default)]
        extra: Option<serde_json::Value>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
        Slow,
    }

    #[test]
    fn bad_values_are_described_never_echoed() {
        let secret = "hunter2-hunter2";
        for (option, kind) in [
            ("count", "invalid type: a string of 15 characters, expected u64"),
            ("keys", "invalid type: a string of 15 characters, expected a sequence"),
            ("mode", "unknown variant (a string of 15 characters), expected one of `fast`, `slow`"),
            ("wait", "invalid duration; write e.g. 500ms, 5s, 5m, 1h, 7d (found a string of 15 characters)"),
        ] {
            let err = deserialize_options::<Sample>(serde_json::json!({ option: secret })).unwrap_err();
            assert_eq!(err.path, vec![option.to_string()]);
            assert!(err.message.starts_with(kind) && !err.message.contains("hunter"), "{option}: {}", err.message);
        }
        let ok: Sample = deserialize_options(serde_json::json!({
            "count": 3, "keys": ["a"], "mode": "slow", "wait": "5s", "extra": { "a": [1, -2, 2.5, null] }
        }))
        .unwrap();
        assert_eq!(ok.extra.unwrap(), serde_json::json!({ "a": [1, -2, 2.5, null] }));
        let err = deserialize_options::<Sample>(serde_json::json!({ "nope": 1 })).unwrap_err();
        assert!(err.message.starts_with("unknown field `nope`"), "{}", err.message);
    }

    /// The loader points at a mistake by its kind, never by reading the message.
    #[test]
    fn mistakes_carry_their_kind() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Needs {
            count: u64,
        }
        let kind = |value| deserialize_options::<Needs>(value).unwrap_err().kind;
        assert_eq!(
            deserialize_options::<Sample>(serde_json::json!({ "nope": 1 })).unwrap_err().kind,
            BuildErrorKind::UnknownField("nope".into())
        );
        assert_eq!(kind(serde_json::json!({})), BuildErrorKind::MissingField("count".into()));
        assert_eq!(kind(serde_json::json!({ "count": "12" })), BuildErrorKind::StringForOtherType);
        assert_eq!(kind(serde_json::json!({ "count": "" })), BuildErrorKind::StringForOtherType);
        assert_eq!(kind(serde_json::json!({ "count": true })), BuildErrorKind::Invalid);
        assert_eq!(kind(serde_json::json!({ "count": -1 })), BuildErrorKind::Invalid);
    }
}
