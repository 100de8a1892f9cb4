//! Rhai in the pipeline: the `rhai` stage (map, split, drop), the `filter`
//! and `switch` stages, and [`Condition`] — the one expression language of
//! the product, which other plugins (aggregate `where`, alert rules) reuse.
//!
//! Scripts see the payload as `event` and the metadata as `meta`. The payload
//! is not converted to a script value up front: `event` is a handle whose
//! property reads convert only the field touched and whose writes go straight
//! into the event, which is what makes small scripts cheap.

mod handle;
mod helpers;
mod limits;
mod native;
mod script;
mod stages;

pub use limits::Limits;
pub use rhai::Dynamic;
pub use script::{Condition, RunState, Script, ScriptError};

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
