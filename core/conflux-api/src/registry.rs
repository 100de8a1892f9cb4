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
use serde::de::DeserializeOwned;

use crate::component::{BuildContext, BuiltInput, BuiltStage, Output};
use crate::error::BuildError;

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
pub fn deserialize_options<C: DeserializeOwned>(raw: serde_json::Value) -> Result<C, BuildError> {
    serde_path_to_error::deserialize(raw).map_err(|e| {
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
        BuildError { path, message: e.into_inner().to_string(), offset: None }
    })
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
