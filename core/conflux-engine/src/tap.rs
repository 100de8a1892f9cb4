//! A live tap for the dashboard: the last few events each component
//! emitted, per port. It costs one atomic load per batch until the page
//! asks for it, and stops again once nobody has asked for a while. What it
//! shows is masked like a log line: a secret option value that turns up in
//! an event is never shown.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conflux_api::{Batch, Timestamp};
use serde::Serialize;

/// Events kept per component.
const KEEP: usize = 10;
/// Events of one batch taken (its last ones).
const PER_BATCH: usize = 2;
/// Longest event text shown.
const MAX_TEXT: usize = 600;
/// How long the tap runs after the page last asked.
const WATCHED_FOR: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Serialize)]
pub struct Tapped {
    /// When it was seen, RFC 3339.
    pub at: String,
    pub port: String,
    pub event: String,
}

/// Every component's tap.
pub struct Taps {
    start: Instant,
    /// Milliseconds since `start` until which events are recorded (0: off).
    until_ms: AtomicU64,
    kept: Mutex<HashMap<Arc<str>, VecDeque<Tapped>>>,
}

impl Default for Taps {
    fn default() -> Self {
        Taps { start: Instant::now(), until_ms: AtomicU64::new(0), kept: Mutex::default() }
    }
}

impl Taps {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn watching(&self) -> bool {
        self.until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// What was seen lately, by `pipeline/component`; records on for a while.
    pub fn watch(&self) -> HashMap<String, Vec<Tapped>> {
        self.until_ms.store(self.now_ms() + WATCHED_FOR.as_millis() as u64, Ordering::Relaxed);
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter().map(|(k, v)| (k.to_string(), v.iter().cloned().collect())).collect()
    }

    /// Forgets a pipeline that ended.
    pub fn forget(&self, pipeline: &str) {
        let prefix = format!("{pipeline}/");
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| !k.starts_with(&prefix));
    }
}

/// One component's tap.
#[derive(Clone)]
pub struct Tap {
    taps: Arc<Taps>,
    key: Arc<str>,
}

impl Tap {
    pub fn new(taps: Arc<Taps>, pipeline: &str, component: &str) -> Tap {
        Tap { taps, key: format!("{pipeline}/{component}").into() }
    }

    /// Keeps the last events of `batch`, emitted on `port`, while the page watches.
    pub fn record(&self, port: &str, batch: &Batch) {
        if !self.taps.watching() {
            return;
        }
        let at = Timestamp::now().to_rfc3339();
        let mut json = Vec::new();
        let taken: Vec<Tapped> = batch[batch.len().saturating_sub(PER_BATCH)..]
            .iter()
            .map(|event| {
                json.clear();
                event.data.write_json(&mut json);
                let mut text = String::from_utf8_lossy(&json).into_owned();
                if text.len() > MAX_TEXT {
                    let cut = (0..=MAX_TEXT).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
                    text.truncate(cut);
                    text.push('…');
                }
                let event = conflux_api::secrets::redact(&text).into_owned();
                Tapped { at: at.clone(), port: if port.is_empty() { "default".into() } else { port.into() }, event }
            })
            .collect();
        let mut kept = self.taps.kept.lock().unwrap_or_else(|p| p.into_inner());
        let queue = kept.entry(self.key.clone()).or_default();
        for t in taken {
            if queue.len() == KEEP {
                queue.pop_front();
            }
            queue.push_back(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_api::{Event, Payload};

    fn batch(n: usize) -> Batch {
        (0..n)
            .map(|i| Event::with_time(Payload::from_json(format!("{{\"n\":{i}}}").as_bytes()).unwrap(), Timestamp(0)))
            .collect()
    }

    #[test]
    fn records_only_while_watched_and_keeps_the_last_few() {
        let taps = Arc::new(Taps::default());
        let tap = Tap::new(taps.clone(), "p", "c");
        tap.record("", &batch(5));
        assert!(taps.watch().is_empty(), "nothing is recorded before the page asks");
        for _ in 0..8 {
            tap.record("", &batch(5));
        }
        let seen = &taps.watch()["p/c"];
        assert_eq!(seen.len(), KEEP);
        assert_eq!(seen.last().unwrap().event, "{\"n\":4}");
        assert_eq!(seen.last().unwrap().port, "default");
        taps.forget("p");
        assert!(taps.watch().is_empty());
    }
}
