//! The contract between the Conflux engine and its plugins.
//!
//! Plugins depend on this crate only, never on the runtime: it defines the
//! event model ([`Event`], [`Batch`]), end-to-end acknowledgement
//! ([`AckToken`]), the three component traits ([`Input`], [`Stage`],
//! [`Output`]), self-registration ([`Registration`]) and the small config
//! value types every plugin shares ([`config`]).

pub mod ack;
pub mod backoff;
pub mod columns;
pub mod component;
pub mod config;
pub mod error;
pub mod event;
pub mod files;
pub mod health;
pub mod metrics;
pub mod registry;
pub mod secrets;
pub mod template;

pub use ack::{AckStatus, AckToken};
pub use async_trait::async_trait;
pub use backoff::Backoff;
pub use bytes::{self, Bytes};
pub use component::{BuildContext, BuiltInput, BuiltStage, Emitter, Input, Output, PortId, Stage, WriteOptions};
/// The JSON text engine: an event's payload is its type, so the contract names it.
pub use conflux_json::{Field, FieldPath, JsonError, Payload};
pub use error::{BuildError, FailedEvent, PluginError};
pub use event::{Batch, Event, Metadata, Position, Timestamp};
pub use health::{Health, HealthState};
pub use registry::{InputConfig, Kind, OutputConfig, Registration, StageConfig};
pub use sonic_rs::{self, Value};

/// Re-exported so plugins register without naming `inventory` themselves.
pub use inventory;
