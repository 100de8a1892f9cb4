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
pub mod field;
pub mod files;
pub mod health;
pub mod json_check;
pub mod json_edit;
pub mod json_guard;
pub mod metrics;
pub mod path;
pub mod registry;
pub mod secrets;
pub mod template;

pub use ack::{AckStatus, AckToken};
pub use async_trait::async_trait;
pub use backoff::Backoff;
pub use bytes::{self, Bytes};
pub use component::{BuildContext, BuiltInput, BuiltStage, Emitter, Input, Output, PortId, Stage};
pub use error::{BuildError, FailedEvent, PluginError};
pub use event::{Batch, Event, Metadata, Payload, Position, Timestamp};
pub use field::Field;
pub use health::{Health, HealthState};
pub use json_guard::JsonError;
pub use registry::{InputConfig, Kind, OutputConfig, Registration, StageConfig};
pub use sonic_rs::{self, Value};

/// Re-exported so plugins register without naming `inventory` themselves.
pub use inventory;
