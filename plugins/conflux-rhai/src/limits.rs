//! The sandbox's limits, in a module of their own because both the
//! interpreter (`script`) and the native path (`native`) honour them, and
//! neither should depend on the other for them.

use schemars::JsonSchema;
use serde::Deserialize;

/// Limits that keep a runaway script from hurting the process. A script that
/// exceeds one fails the event it was running on, not the pipeline.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Operations one run may take (an infinite loop stops here).
    pub max_operations: u64,
    /// Depth of nested function calls.
    pub max_call_depth: usize,
    /// Depth of nested expressions.
    pub max_expr_depth: usize,
    /// Longest string a script may build, in bytes.
    pub max_string_size: usize,
    /// Most items in an array a script builds.
    pub max_array_size: usize,
    /// Most entries in a map a script builds.
    pub max_map_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_depth: 32,
            max_expr_depth: 64,
            max_string_size: 1 << 20,
            max_array_size: 10_000,
            max_map_size: 10_000,
        }
    }
}
