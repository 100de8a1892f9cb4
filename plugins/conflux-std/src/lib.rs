//! Built-in components that need no external service, so a pipeline runs on
//! a fresh machine: `generate`, `stdin` and `file` inputs; `stdout`, `file`
//! and `drop` outputs.

mod codec;
mod drop_output;
mod file;
mod file_output;
mod generate;
mod stdio;

pub use codec::Codec;

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}
