pub mod config;
pub mod yaml;
pub mod graph;
pub mod metrics;
pub mod runtime;
