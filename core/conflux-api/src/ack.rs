//! End-to-end acknowledgement, in the manner of drop-based finalizers.
//!
//! A source creates one [`AckToken`] per unit it can acknowledge (a Kafka
//! offset range, an HTTP request) and clones it into every event of that
//! unit. Fan-out clones it again; a stage that absorbs events keeps their
//! tokens. When the last clone is dropped the source's callback runs once
//! with the worst status any holder recorded. Tokens dropped while a thread
//! unwinds from a panic count as [`AckStatus::Errored`], so a crashing
//! component can never acknowledge what it did not deliver.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Final outcome of an event as the source hears it. Ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum AckStatus {
    /// Every output it reached confirmed it, or a stage dropped it on purpose.
    Delivered = 0,
    /// The event is bad and will never succeed (invalid, script error); do not retry.
    Rejected = 1,
    /// Delivery failed; the source should redeliver or report failure.
    Errored = 2,
}

impl AckStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => AckStatus::Delivered,
            1 => AckStatus::Rejected,
            _ => AckStatus::Errored,
        }
    }

    /// Lower-case name used in metrics labels and HTTP answers.
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Delivered => "delivered",
            AckStatus::Rejected => "rejected",
            AckStatus::Errored => "errored",
        }
    }
}

type Callback = Box<dyn FnOnce(AckStatus) + Send>;

struct Shared {
    status: AtomicU8,
    on_done: Mutex<Option<Callback>>,
    /// A token this one reports into once done (engine bookkeeping wraps the source's token).
    parent: Option<AckToken>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let mut status = AckStatus::from_u8(*self.status.get_mut());
        if std::thread::panicking() {
            status = AckStatus::Errored;
        }
        let callback = match self.on_done.get_mut() {
            Ok(slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(callback) = callback {
            callback(status);
        }
        if let Some(parent) = self.parent.take() {
            parent.mark(status);
        }
    }
}

/// A handle on one acknowledgement unit; cheap to clone (one atomic increment).
///
/// The default token tracks nothing: sources that cannot acknowledge
/// (a generator, stdin) use it and pay nothing.
#[derive(Clone, Default)]
pub struct AckToken(Option<Arc<Shared>>);

impl std::fmt::Debug for AckToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("AckToken(untracked)"),
            Some(s) => write!(
                f,
                "AckToken({:?}, holders={})",
                AckStatus::from_u8(s.status.load(Ordering::Relaxed)),
                Arc::strong_count(s)
            ),
        }
    }
}

impl AckToken {
    /// A token whose `callback` runs once, when the last clone is dropped.
    pub fn new(callback: impl FnOnce(AckStatus) + Send + 'static) -> Self {
        AckToken(Some(Arc::new(Shared {
            status: AtomicU8::new(AckStatus::Delivered as u8),
            on_done: Mutex::new(Some(Box::new(callback))),
            parent: None,
        })))
    }

    /// A token that runs `callback` when done and then passes its status on
    /// to `parent`, which is released with it.
    pub fn chain(parent: AckToken, callback: impl FnOnce(AckStatus) + Send + 'static) -> Self {
        AckToken(Some(Arc::new(Shared {
            status: AtomicU8::new(AckStatus::Delivered as u8),
            on_done: Mutex::new(Some(Box::new(callback))),
            parent: Some(parent),
        })))
    }

    /// Whether two tokens are clones of one another (both untracked counts as the same).
    pub fn same(&self, other: &AckToken) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    /// A token and a receiver that resolves with its final status.
    pub fn channel() -> (Self, tokio::sync::oneshot::Receiver<AckStatus>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = AckToken::new(move |status| {
            let _ = tx.send(status);
        });
        (token, rx)
    }

    /// A token that tracks nothing.
    pub fn untracked() -> Self {
        AckToken(None)
    }

    /// Whether a source is listening on this token.
    pub fn is_tracked(&self) -> bool {
        self.0.is_some()
    }

    /// Records an outcome; the worst outcome recorded by any holder wins.
    pub fn mark(&self, status: AckStatus) {
        if let Some(shared) = &self.0 {
            shared.status.fetch_max(status as u8, Ordering::AcqRel);
        }
    }

    /// The worst outcome recorded so far.
    pub fn status(&self) -> AckStatus {
        self.0.as_ref().map(|s| AckStatus::from_u8(s.status.load(Ordering::Acquire))).unwrap_or(AckStatus::Delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn recorder() -> (AckToken, Arc<Mutex<Vec<AckStatus>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        (AckToken::new(move |s| sink.lock().unwrap().push(s)), seen)
    }

    #[test]
    fn fires_once_after_last_clone() {
        let (token, seen) = recorder();
        let a = token.clone();
        let b = token.clone();
        drop(token);
        drop(a);
        assert!(seen.lock().unwrap().is_empty());
        drop(b);
        assert_eq!(*seen.lock().unwrap(), vec![AckStatus::Delivered]);
    }

    #[test]
    fn worst_status_wins() {
        let (token, seen) = recorder();
        let a = token.clone();
        a.mark(AckStatus::Errored);
        token.mark(AckStatus::Rejected);
        drop(a);
        drop(token);
        assert_eq!(*seen.lock().unwrap(), vec![AckStatus::Errored]);
    }

    #[test]
    fn drop_during_panic_is_an_error() {
        let (token, seen) = recorder();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = token;
            panic!("component crashed");
        }));
        assert!(result.is_err());
        assert_eq!(*seen.lock().unwrap(), vec![AckStatus::Errored]);
    }

    #[test]
    fn chained_tokens_report_to_their_parent() {
        let (parent, seen) = recorder();
        let (inner_seen_tx, inner_seen) = std::sync::mpsc::channel();
        let child = AckToken::chain(parent, move |s| inner_seen_tx.send(s).unwrap());
        let clone = child.clone();
        clone.mark(AckStatus::Rejected);
        drop(child);
        assert!(seen.lock().unwrap().is_empty());
        drop(clone);
        assert_eq!(inner_seen.recv().unwrap(), AckStatus::Rejected);
        assert_eq!(*seen.lock().unwrap(), vec![AckStatus::Rejected]);
    }

    #[test]
    fn untracked_costs_nothing_and_never_fires() {
        let count = Arc::new(AtomicUsize::new(0));
        let token = AckToken::untracked();
        token.mark(AckStatus::Errored);
        assert!(!token.is_tracked());
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }
}
