//! Passes every event on unchanged: the baseline cost of the boundary.

use conflux_wasm_guest::{export_stage, Event, Outcome, Stage};

#[derive(Default)]
struct Identity;

impl Stage for Identity {
    fn process(&mut self, _event: Event) -> Result<Outcome, String> {
        Ok(Outcome::Keep)
    }
}

export_stage!(Identity);
