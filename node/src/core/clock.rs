//! Time source of the node core: every time-dependent rule (retention, due
//! dates, timestamps of entries) reads the injected [`Clock`], so tests run
//! with a [`ManualClock`]. A running node uses a [`GuardedClock`]: the system
//! clock, but not its jumps (retention erases bodies for good).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

pub use trmx_durable::clock::{GuardedClock, TimeSource};

/// A source of the current instant.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> SystemTime;
}

impl<S: TimeSource> Clock for GuardedClock<S> {
    fn now(&self) -> SystemTime {
        GuardedClock::now(self)
    }
}

/// The guarded system clock of a running node (`storage.max_clock_step_secs`).
pub fn node_clock(max_step: Duration) -> GuardedClock {
    GuardedClock::system(
        max_step,
        "restart the node to accept it (a jump of more than storage.max_downtime_secs also \
         needs `trmx-node --config FILE accept-clock` with the node stopped)",
    )
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: Mutex::new(start),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *now += by;
    }

    /// Sets the clock to `at`.
    pub fn set(&self, at: SystemTime) {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *now = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
