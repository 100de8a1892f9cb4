pub mod admin;
pub mod config;
pub mod graph;
pub mod metrics;
pub mod runtime;
pub mod schema;
pub mod testing;
pub mod yaml;
