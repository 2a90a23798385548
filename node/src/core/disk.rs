//! The health of the node's store flushes, and the switch that makes them fail.
//!
//! Every flush of the store ([`super::store::Store::flush_async`], and the running mark)
//! goes through [`Disk`]: it fails while the [`StoreFaults`] switch is set (storage-fault
//! tests, as the broker's `FaultSwitch`), and it remembers whether the last flush failed
//! and why, for [`super::NodeCore::status`]. The first failure after a success is said at
//! ERROR with what to do (again every [`REPEAT`] while it lasts), the first success after
//! failures at INFO: a failing disk is said once, not once per delivery, submit and retry.
//!
//! A real write error leaves sled's database failing until it is opened again (sled 0.34
//! keeps the first I/O error and answers it to every later call), so a node whose disk
//! was repaired may still need a restart: the ERROR says so, and the status goes on
//! saying that the store fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::NodeError;

/// Makes the node store's flushes fail like a full disk (storage-fault tests; see
/// [`super::NodeCore::store_faults`]). Clones share the switch.
#[derive(Debug, Clone, Default)]
pub struct StoreFaults(Arc<AtomicBool>);

impl StoreFaults {
    /// While `true`, every flush of the store fails (what was written before it stays
    /// written but is not durable); set back to `false` and the next flush succeeds.
    pub fn set_failing(&self, failing: bool) {
        self.0.store(failing, Ordering::SeqCst);
    }

    /// Whether flushes currently fail.
    pub fn is_failing(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How often a failing store is said again at ERROR while it lasts.
const REPEAT: Duration = Duration::from_secs(15 * 60);

/// What the store's flushes met, shared by the clones of a store.
#[derive(Debug, Clone, Default)]
pub(crate) struct Disk {
    faults: StoreFaults,
    /// Why the last flush failed and when that was last said; `None` when it succeeded
    /// (or none ran yet).
    failing: Arc<Mutex<Option<(String, Instant)>>>,
}

impl Disk {
    /// The switch of this store.
    pub(crate) fn faults(&self) -> StoreFaults {
        self.faults.clone()
    }

    /// `Err` while the switch is set: call before flushing.
    pub(crate) fn check(&self) -> Result<(), NodeError> {
        if self.faults.is_failing() {
            return Err(NodeError::Store(
                "injected storage fault (disk full)".to_owned(),
            ));
        }
        Ok(())
    }

    /// Records the outcome of a flush; says the first failure and the recovery.
    pub(crate) fn note(&self, result: &Result<(), NodeError>) {
        let mut failing = self
            .failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!("the node's store can write to disk again");
                }
            }
            Err(e) => {
                let now = Instant::now();
                let said = match failing.as_ref() {
                    Some((_, said)) if now.duration_since(*said) < REPEAT => *said,
                    _ => {
                        tracing::error!(
                            error = %e,
                            "the node's store cannot write to disk: it acknowledges no delivery \
                             to the broker, submits nothing and refuses sends until it can; free \
                             disk space or repair the disk, then restart the node if this goes \
                             on (a write error can leave the store failing until it is reopened)"
                        );
                        now
                    }
                };
                *failing = Some((e.to_string(), said));
            }
        }
    }

    /// Why the last flush failed, if it did.
    pub(crate) fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(why, _)| why.clone())
    }
}
