//! Exponential backoff, the one schedule every retry loop uses: output
//! writes and connects, Kafka redelivery, JetStream naks, checkpoint saves
//! and restores, Redis calls.

use std::time::Duration;

/// Waits `initial`, doubling after each consecutive failure, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max }
    }

    /// The wait after the `failures`-th consecutive failure (1 = the first).
    pub fn wait(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_initial_up_to_max() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let waits: Vec<u128> = (0..6).map(|f| backoff.wait(f).as_millis()).collect();
        assert_eq!(waits, vec![100, 100, 200, 400, 700, 700]);
        assert_eq!(backoff.wait(u32::MAX), Duration::from_millis(700), "no overflow");
    }
}
