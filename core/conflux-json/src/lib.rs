//! The JSON text engine under every Conflux event.
//!
//! An event's payload stays the JSON text it arrived as for as long as it
//! can: [`check`] vouches for that text without building a tree, [`guard`]
//! bounds nesting and numbers where a tree is built, [`field`] and [`path`]
//! read fields by scanning the text, [`edit`] splices new values into it, and
//! [`payload::Payload`] keeps text and tree together so that neither can
//! disagree with the other. Nothing here knows about pipelines or plugins.

pub mod check;
pub mod edit;
pub mod field;
pub mod guard;
pub mod path;
pub mod payload;

pub use field::Field;
pub use guard::JsonError;
pub use path::FieldPath;
pub use payload::Payload;
