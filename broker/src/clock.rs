//! Time source. Every time-dependent decision of the broker (ack deadlines,
//! backoff, expiry, retentions) takes its "now" from a [`Clock`], so tests
//! drive time with a [`ManualClock`] instead of sleeping.
//!
//! A running broker uses a [`GuardedClock`]: the system clock, except when
//! it jumps. Expiry and the retentions are final (a message dead-lettered,
//! a payload deleted), so a wall clock set a year ahead by mistake would
//! otherwise expire every queued message at the next tick, and one set back
//! would hold every redelivery until it caught up.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use trmx_durable::clock::{
    GuardedClock, OsTime, StartClock, TimeSource, check_start, human_span,
};

use crate::store::Millis;

/// A source of the current instant.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current instant.
    fn now(&self) -> SystemTime;

    /// The current instant in milliseconds since the Unix epoch (the
    /// storage encoding of instants).
    fn now_millis(&self) -> Millis {
        trmx_proto::time::to_millis(self.now())
    }

    /// While this clock does not follow the operating system's clock (see
    /// [`GuardedClock`]): how far that clock is ahead of this one, in
    /// milliseconds (negative when it is behind). `None` when it follows.
    fn held_offset_millis(&self) -> Option<i64> {
        None
    }
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to (tests). Clones share the same
/// instant.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// A clock standing at `millis` milliseconds after the Unix epoch.
    pub fn at_millis(millis: Millis) -> Self {
        Self::new(trmx_proto::time::from_millis(millis))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|poison| poison.into_inner());
        *now += by;
    }

    /// Sets the clock to `at` (which may be earlier than now).
    pub fn set(&self, at: SystemTime) {
        let mut now = self.now.lock().unwrap_or_else(|poison| poison.into_inner());
        *now = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

impl<S: TimeSource> Clock for GuardedClock<S> {
    fn now(&self) -> SystemTime {
        GuardedClock::now(self)
    }

    fn held_offset_millis(&self) -> Option<i64> {
        GuardedClock::held_offset_millis(self)
    }
}

/// The guarded system clock of a running broker, with `lifecycle.max_clock_step`.
pub fn broker_clock(max_step: Duration) -> GuardedClock {
    GuardedClock::system(
        max_step,
        "restart the broker to accept it (SIGHUP does not; a jump of more than \
         lifecycle.max_downtime also needs `trmx-broker store accept-clock` \
         with the broker stopped)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = ManualClock::at_millis(1_700_000_000_000);
        let other = clock.clone();
        assert_eq!(clock.now_millis(), 1_700_000_000_000);
        other.advance(Duration::from_millis(1500));
        assert_eq!(clock.now_millis(), 1_700_000_001_500);
        clock.set(trmx_proto::time::from_millis(5));
        assert_eq!(other.now_millis(), 5);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_millis() > 1_577_836_800_000);
    }
}
