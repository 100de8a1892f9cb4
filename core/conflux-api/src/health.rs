//! Whether a component can do its work right now, as `/ready` reports it.
//!
//! The engine marks an output up once it connects and down while it cannot
//! connect or its writes are being retried; a stage that does I/O of its own
//! (restoring a checkpoint, a dedupe store) marks itself through the
//! [`Health`] its [`crate::BuildContext`] carries.

use std::sync::{Arc, Mutex};

/// One component's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthState {
    /// Not connected yet.
    Starting,
    Up,
    /// The last error, for `/ready` and logs.
    Down(String),
}

/// A shared handle on one component's state; cloning shares it.
#[derive(Debug, Clone)]
pub struct Health(Arc<Mutex<HealthState>>);

impl Default for Health {
    fn default() -> Self {
        Health(Arc::new(Mutex::new(HealthState::Starting)))
    }
}

impl Health {
    pub fn up(&self) {
        self.set(HealthState::Up);
    }

    /// Marks the component down with the reason `/ready` shows.
    pub fn down(&self, reason: impl std::fmt::Display) {
        self.set(HealthState::Down(reason.to_string()));
    }

    pub fn state(&self) -> HealthState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_up(&self) -> bool {
        self.state() == HealthState::Up
    }

    fn set(&self, state: HealthState) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_state() {
        let health = Health::default();
        let seen_by_engine = health.clone();
        assert_eq!(seen_by_engine.state(), HealthState::Starting);
        health.down("connection refused");
        assert_eq!(seen_by_engine.state(), HealthState::Down("connection refused".into()));
        health.up();
        assert!(seen_by_engine.is_up());
    }
}
