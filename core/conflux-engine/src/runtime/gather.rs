//! Gathers events from upstream batches into write batches (an output's
//! `batch:` option), holding at most about two batches' worth.

use std::collections::VecDeque;

use conflux_api::{Batch, Event};
use tokio::time::Instant;

use crate::options::BatchConfig;

pub(super) struct Gather {
    /// `None`: each upstream batch is written as it comes.
    config: Option<Limits>,
    /// Complete write batches, oldest first.
    ready: VecDeque<Batch>,
    /// The batch being filled, its payload bytes and when its first event came.
    open: Batch,
    open_bytes: usize,
    opened_at: Option<Instant>,
}

struct Limits {
    max_events: usize,
    max_bytes: Option<usize>,
    linger: Option<std::time::Duration>,
}

impl Gather {
    pub fn new(config: Option<&BatchConfig>) -> Self {
        let config = config.map(|c| Limits {
            max_events: c.max_events(),
            max_bytes: c.max_bytes.map(|b| usize::try_from(b.0).unwrap_or(usize::MAX)),
            linger: c.linger.map(|d| d.0),
        });
        Gather { config, ready: VecDeque::new(), open: Vec::new(), open_bytes: 0, opened_at: None }
    }

    /// Whether another upstream batch may be taken in (memory stays bounded).
    pub fn has_room(&self) -> bool {
        match &self.config {
            None => self.ready.is_empty(),
            Some(_) => self.ready.len() < 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.open.is_empty()
    }

    pub fn push(&mut self, batch: Batch) {
        let Some(limits) = &self.config else {
            if !batch.is_empty() {
                self.ready.push_back(batch);
            }
            return;
        };
        let (max_events, max_bytes) = (limits.max_events, limits.max_bytes);
        for event in batch {
            let bytes = if max_bytes.is_some() { event.data.json_len() } else { 0 };
            if max_bytes.is_some_and(|max| !self.open.is_empty() && self.open_bytes + bytes > max) {
                self.close_open();
            }
            self.add(event, bytes);
            if self.open.len() >= max_events || max_bytes.is_some_and(|max| self.open_bytes >= max) {
                self.close_open();
            }
        }
    }

    /// The next batch to write. `upstream_idle`: nothing is waiting in the
    /// channel, so an open batch without `linger` is written now;
    /// `closing`: upstream has ended, write whatever is held.
    pub fn take(&mut self, upstream_idle: bool, closing: bool) -> Option<Batch> {
        if let Some(batch) = self.ready.pop_front() {
            return Some(batch);
        }
        if self.open.is_empty() {
            return None;
        }
        let due = match self.config.as_ref().and_then(|c| c.linger) {
            None => upstream_idle,
            Some(linger) => self.opened_at.is_some_and(|at| at.elapsed() >= linger),
        };
        if due || closing {
            self.close_open();
            return self.ready.pop_front();
        }
        None
    }

    /// When the open batch is due by `linger`, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        let linger = self.config.as_ref()?.linger?;
        Some(self.opened_at? + linger)
    }

    /// Everything held, for failing it back.
    pub fn drain(&mut self) -> impl Iterator<Item = Batch> + '_ {
        self.close_open();
        self.ready.drain(..)
    }

    fn add(&mut self, event: Event, bytes: usize) {
        if self.open.is_empty() {
            self.opened_at = Some(Instant::now());
        }
        self.open.push(event);
        self.open_bytes += bytes;
    }

    fn close_open(&mut self) {
        if !self.open.is_empty() {
            self.ready.push_back(std::mem::take(&mut self.open));
        }
        self.open_bytes = 0;
        self.opened_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_api::config::{ByteSize, Duration};
    use conflux_api::Payload;

    fn events(n: usize, text: &str) -> Batch {
        (0..n).map(|_| Event::with_time(Payload::from_json(text.as_bytes()).unwrap(), Default::default())).collect()
    }

    fn sizes(gather: &mut Gather, idle: bool, closing: bool) -> Vec<usize> {
        std::iter::from_fn(|| gather.take(idle, closing)).map(|b| b.len()).collect()
    }

    #[test]
    fn without_config_upstream_batches_pass_as_they_come() {
        let mut gather = Gather::new(None);
        gather.push(events(3, "{}"));
        assert!(!gather.has_room());
        assert_eq!(sizes(&mut gather, false, false), vec![3]);
        assert!(gather.has_room() && gather.is_empty());
    }

    #[test]
    fn small_batches_are_merged_and_large_ones_split() {
        let config = BatchConfig { max_events: Some(4), ..Default::default() };
        let mut gather = Gather::new(Some(&config));
        gather.push(events(3, "{}"));
        // More may be on its way: nothing is due yet.
        assert_eq!(sizes(&mut gather, false, false), Vec::<usize>::new());
        gather.push(events(7, "{}"));
        assert_eq!(sizes(&mut gather, false, false), vec![4, 4]);
        // The last two go once upstream is idle.
        assert_eq!(sizes(&mut gather, true, false), vec![2]);
    }

    #[test]
    fn bytes_close_a_batch_before_it_would_pass_the_limit() {
        // Each payload is 9 bytes: `{"a":123}`.
        let config = BatchConfig { max_bytes: Some(ByteSize(20)), ..Default::default() };
        let mut gather = Gather::new(Some(&config));
        gather.push(events(5, r#"{"a":123}"#));
        assert_eq!(sizes(&mut gather, false, true), vec![2, 2, 1]);
    }

    #[test]
    fn linger_holds_a_batch_until_its_deadline() {
        let config = BatchConfig { linger: Some(Duration::from_secs(3600)), ..Default::default() };
        let mut gather = Gather::new(Some(&config));
        gather.push(events(2, "{}"));
        assert!(gather.deadline().is_some());
        assert_eq!(sizes(&mut gather, true, false), Vec::<usize>::new());
        assert_eq!(sizes(&mut gather, true, true), vec![2]);
        assert!(gather.deadline().is_none());
    }
}
