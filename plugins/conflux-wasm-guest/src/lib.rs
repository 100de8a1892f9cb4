//! Write a Conflux `wasm` stage in Rust.
//!
//! Implement [`Stage`] (one event in, one [`Outcome`] out), export it with
//! [`export_stage!`], and build a component:
//!
//! ```sh
//! cargo build --release --target wasm32-wasip2
//! ```
//!
//! ```ignore
//! use conflux_wasm_guest::{export_stage, Event, Outcome, Stage};
//!
//! #[derive(Default)]
//! struct OnlyBookings;
//!
//! impl Stage for OnlyBookings {
//!     fn process(&mut self, event: Event) -> Result<Outcome, String> {
//!         let doc: serde_json::Value = event.json()?;
//!         Ok(if doc["type"].as_str().is_some_and(|t| t.starts_with("booking_")) { Outcome::Keep } else { Outcome::Drop })
//!     }
//! }
//!
//! export_stage!(OnlyBookings);
//! ```
//!
//! The host calls the guest with whole batches (`schemas/wit/conflux-stage.wit`);
//! this crate loops over them so a stage only sees one event at a time.

extern crate self as conflux_wasm_guest;

mod fields;
mod paths;

pub use fields::{string_text, write_string, Fields};
pub use paths::{Found, Paths};

use std::any::Any;
use std::cell::RefCell;

#[doc(hidden)]
pub use wit_bindgen;

/// Bindings generated from the WIT contract (`schemas/wit`).
#[doc(hidden)]
#[allow(unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "stage",
        path: "../../schemas/wit",
        pub_export_macro: true,
        export_macro_name: "__export_stage",
        default_bindings_module: "conflux_wasm_guest::bindings",
        runtime_path: "conflux_wasm_guest::wit_bindgen::rt",
    });
}

pub use bindings::conflux::stage::types::{Emitted, Event, Outcome};

/// A transform run by the Conflux `wasm` stage.
pub trait Stage: Default + 'static {
    /// Reads the stage's `config` option (JSON `null` when unset) once per
    /// instance, before the first event. An error refuses the module.
    fn configure(&mut self, config: serde_json::Value) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Decides what becomes of one event. `Err(reason)` sends it to the
    /// stage's `error` port, like [`Outcome::Fail`].
    fn process(&mut self, event: Event) -> Result<Outcome, String>;
}

impl Event {
    /// An event with a JSON payload and nothing else.
    pub fn from_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Event, String> {
        Ok(Event { key: None, value: to_bytes(value)?, metadata: Vec::new(), timestamp: None })
    }

    /// The payload parsed into any deserializable type (`serde_json::Value`,
    /// your own struct, or a borrowed map of raw values for speed).
    pub fn json<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, String> {
        serde_json::from_slice(&self.value).map_err(|e| format!("payload is not the expected JSON: {e}"))
    }

    /// Replaces the payload.
    pub fn set_json<T: serde::Serialize + ?Sized>(&mut self, value: &T) -> Result<(), String> {
        self.value = to_bytes(value)?;
        Ok(())
    }

    /// A metadata entry, as JSON text.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Sets a metadata entry to a JSON value.
    pub fn set_meta<T: serde::Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), String> {
        let text = serde_json::to_string(value).map_err(|e| e.to_string())?;
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = text,
            None => self.metadata.push((key.to_string(), text)),
        }
        Ok(())
    }
}

fn to_bytes<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| format!("cannot serialize payload: {e}"))
}

impl Outcome {
    /// Emits one event on the default port in place of the input.
    pub fn one(event: Event) -> Outcome {
        Outcome::Emit(vec![Emitted { port: None, event }])
    }

    /// Emits several events on the default port (a split); none is a drop.
    pub fn many(events: impl IntoIterator<Item = Event>) -> Outcome {
        Outcome::Emit(events.into_iter().map(|event| Emitted { port: None, event }).collect())
    }

    /// Emits one event on a named port (declared in the stage's `ports` option).
    pub fn to(port: impl Into<String>, event: Event) -> Outcome {
        Outcome::Emit(vec![Emitted { port: Some(port.into()), event }])
    }
}

thread_local! {
    /// The one stage value of this instance (a component instance is single-threaded).
    static STAGE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

#[doc(hidden)]
pub fn __init<S: Stage>(config: &str) -> Result<(), String> {
    let config: serde_json::Value = serde_json::from_str(config).map_err(|e| format!("config is not JSON: {e}"))?;
    let mut stage = S::default();
    stage.configure(config)?;
    STAGE.with(|slot| *slot.borrow_mut() = Some(Box::new(stage)));
    Ok(())
}

#[doc(hidden)]
pub fn __process<S: Stage>(batch: Vec<Event>) -> Result<Vec<Outcome>, String> {
    STAGE.with(|slot| {
        let mut slot = slot.borrow_mut();
        let stage = slot
            .as_mut()
            .and_then(|s| s.downcast_mut::<S>())
            .ok_or_else(|| "process called before init".to_string())?;
        Ok(batch.into_iter().map(|event| stage.process(event).unwrap_or_else(Outcome::Fail)).collect())
    })
}

/// Exports a [`Stage`] type as the component's `init` and `process`.
/// Call it once, at the root of a `cdylib` crate.
#[macro_export]
macro_rules! export_stage {
    ($stage:ty) => {
        #[doc(hidden)]
        struct __ConfluxStageExport;

        impl $crate::bindings::Guest for __ConfluxStageExport {
            fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__init::<$stage>(&config)
            }

            fn process(
                batch: ::std::vec::Vec<$crate::Event>,
            ) -> ::std::result::Result<::std::vec::Vec<$crate::Outcome>, ::std::string::String> {
                $crate::__process::<$stage>(batch)
            }
        }

        $crate::bindings::__export_stage!(__ConfluxStageExport with_types_in $crate::bindings);
    };
}
