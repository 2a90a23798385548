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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tracing::{error, warn};

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

/// Readings of the operating system's clocks (a fake one in tests).
pub trait TimeSource: Send + Sync + Debug + 'static {
    /// The wall clock.
    fn wall(&self) -> SystemTime;
    /// A clock that only moves forward, at the rate of real time, also
    /// while the machine sleeps.
    fn elapsed(&self) -> Duration;
}

/// The operating system's clocks: `CLOCK_REALTIME`, and `CLOCK_BOOTTIME` on
/// Linux (which, unlike `CLOCK_MONOTONIC`, counts a suspended machine's
/// sleep, so waking up is not a jump of the wall clock).
#[derive(Debug)]
#[cfg_attr(target_os = "linux", derive(Default))]
pub struct OsTime {
    #[cfg(not(target_os = "linux"))]
    start: std::time::Instant,
}

#[cfg(not(target_os = "linux"))]
impl Default for OsTime {
    fn default() -> Self {
        Self {
            start: std::time::Instant::now(),
        }
    }
}

impl TimeSource for OsTime {
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }

    // std has no CLOCK_BOOTTIME reading (`Instant` is CLOCK_MONOTONIC)
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn elapsed(&self) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists
        // on every Linux since 2.6.39 and cannot fail with a valid pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        debug_assert_eq!(rc, 0);
        Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        )
    }

    #[cfg(not(target_os = "linux"))]
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// How often the error of a held clock is logged again.
const HELD_LOG_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// The system clock, guarded against jumps.
///
/// Every reading is compared with the previous one it accepted, moved on by
/// the real time elapsed between them. Within `max_step` of that the clock
/// follows the system clock (NTP's adjustments, small steps). Further off —
/// a jump, forward or back — it keeps time from the elapsed real time
/// alone ("holds"), logs an error naming the offset, and reports it as
/// `trmx_clock_offset_seconds`, until the system clock agrees again or the
/// operator accepts it ([`Self::accept_system_time`]: SIGHUP, or a restart).
/// It never goes backwards: a small step back makes it stand still until
/// the system clock has caught up.
///
/// Clones share the same state.
#[derive(Debug)]
pub struct GuardedClock<S: TimeSource = OsTime> {
    inner: Arc<Guarded<S>>,
}

impl<S: TimeSource> Clone for GuardedClock<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Guarded<S> {
    source: S,
    max_step: Duration,
    state: Mutex<GuardState>,
}

#[derive(Debug)]
struct GuardState {
    /// The last accepted wall reading, and the elapsed reading taken with it.
    anchor_wall: SystemTime,
    anchor_elapsed: Duration,
    /// The latest instant handed out.
    last: SystemTime,
    /// While held: the system clock's offset from this clock (ms), and when
    /// (elapsed reading) the error was last logged.
    held: Option<(i64, Duration)>,
}

impl GuardedClock<OsTime> {
    /// The operating system's clock, held when it jumps by more than `max_step`.
    pub fn system(max_step: Duration) -> Self {
        Self::new(OsTime::default(), max_step)
    }
}

impl<S: TimeSource> GuardedClock<S> {
    /// `source`'s wall clock, held when it jumps by more than `max_step`.
    pub fn new(source: S, max_step: Duration) -> Self {
        let anchor_wall = source.wall();
        let anchor_elapsed = source.elapsed();
        Self {
            inner: Arc::new(Guarded {
                source,
                max_step,
                state: Mutex::new(GuardState {
                    anchor_wall,
                    anchor_elapsed,
                    last: anchor_wall,
                    held: None,
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GuardState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Follows the system clock again from its current reading, however far
    /// it is from this clock's time; returns the offset it had (ms), if held.
    pub fn accept_system_time(&self) -> Option<i64> {
        let wall = self.inner.source.wall();
        let elapsed = self.inner.source.elapsed();
        let mut state = self.lock();
        // (when following, nothing to do: and `last` must not move back)
        let (offset, _) = state.held.take()?;
        state.anchor_wall = wall;
        state.anchor_elapsed = elapsed;
        state.last = wall;
        warn!(
            offset_seconds = offset / 1000,
            "the system clock is accepted as it is: the broker's time moved by the offset, \
             and expiry, redelivery and retentions follow the new time"
        );
        Some(offset)
    }
}

/// `a - b` in milliseconds, saturating.
fn signed_millis(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(ahead) => i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX),
        Err(behind) => i64::try_from(behind.duration().as_millis())
            .map(|ms| -ms)
            .unwrap_or(i64::MIN),
    }
}

impl<S: TimeSource> Clock for GuardedClock<S> {
    fn now(&self) -> SystemTime {
        let wall = self.inner.source.wall();
        let elapsed = self.inner.source.elapsed();
        let max_step = i64::try_from(self.inner.max_step.as_millis()).unwrap_or(i64::MAX);
        let mut state = self.lock();
        let expected = state.anchor_wall + elapsed.saturating_sub(state.anchor_elapsed);
        let offset = signed_millis(wall, expected);
        let now = if offset.unsigned_abs() <= max_step.unsigned_abs() {
            if let Some((held, _)) = state.held.take() {
                warn!(
                    offset_seconds = offset / 1000,
                    was_seconds = held / 1000,
                    "the system clock agrees with the broker's time again; following it"
                );
            }
            state.anchor_wall = wall;
            state.anchor_elapsed = elapsed;
            wall
        } else {
            let log = match state.held {
                None => true,
                Some((_, logged)) => elapsed.saturating_sub(logged) >= HELD_LOG_INTERVAL,
            };
            if log {
                error!(
                    offset_seconds = offset / 1000,
                    max_step_seconds = self.inner.max_step.as_secs(),
                    "the system clock jumped: the broker keeps its own time (from the real \
                     time elapsed) so that no message expires, and no retention runs, by a \
                     wrong clock. Correct the system clock (the broker follows it again once \
                     it agrees), or, if the new time is right, send SIGHUP or restart the \
                     broker to accept it"
                );
            }
            let logged = match state.held {
                Some((_, at)) if !log => at,
                _ => elapsed,
            };
            state.held = Some((offset, logged));
            expected
        };
        state.last = state.last.max(now);
        state.last
    }

    fn held_offset_millis(&self) -> Option<i64> {
        self.lock().held.map(|(offset, _)| offset)
    }
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

    /// A wall clock and an elapsed clock the test moves.
    #[derive(Debug, Clone)]
    struct FakeTime(Arc<Mutex<(SystemTime, Duration)>>);

    impl FakeTime {
        fn at(millis: Millis) -> Self {
            Self(Arc::new(Mutex::new((
                trmx_proto::time::from_millis(millis),
                Duration::from_secs(1000),
            ))))
        }
        /// Real time passes: both clocks move.
        fn pass(&self, by: Duration) {
            let mut t = self.0.lock().unwrap();
            t.0 += by;
            t.1 += by;
        }
        /// The wall clock is set: only it moves.
        fn step(&self, forward: bool, by: Duration) {
            let mut t = self.0.lock().unwrap();
            t.0 = if forward { t.0 + by } else { t.0 - by };
        }
    }

    impl TimeSource for FakeTime {
        fn wall(&self) -> SystemTime {
            self.0.lock().unwrap().0
        }
        fn elapsed(&self) -> Duration {
            self.0.lock().unwrap().1
        }
    }

    const T0: Millis = 1_700_000_000_000;
    const DAY: Duration = Duration::from_secs(86_400);

    fn guarded() -> (GuardedClock<FakeTime>, FakeTime) {
        let time = FakeTime::at(T0);
        (
            GuardedClock::new(time.clone(), Duration::from_secs(60)),
            time,
        )
    }

    #[test]
    fn a_guarded_clock_follows_the_system_clock_and_its_small_steps() {
        let (clock, time) = guarded();
        assert_eq!(clock.now_millis(), T0);
        time.pass(Duration::from_secs(10));
        assert_eq!(clock.now_millis(), T0 + 10_000);
        // NTP steps it by 30 s, within the 60 s allowed: followed
        time.step(true, Duration::from_secs(30));
        assert_eq!(clock.now_millis(), T0 + 40_000);
        // steps add up only over one reading: two more steps of 50 s, each
        // read, are followed
        time.step(true, Duration::from_secs(50));
        assert_eq!(clock.now_millis(), T0 + 90_000);
        time.step(true, Duration::from_secs(50));
        assert_eq!(clock.now_millis(), T0 + 140_000);
        assert_eq!(clock.held_offset_millis(), None);
    }

    #[test]
    fn a_jump_forward_is_held_until_the_system_clock_agrees_again() {
        let (clock, time) = guarded();
        clock.now();
        time.step(true, 365 * DAY);
        assert_eq!(clock.now_millis(), T0, "a year ahead is not followed");
        assert_eq!(
            clock.held_offset_millis(),
            Some(i64::try_from((365 * DAY).as_millis()).unwrap())
        );
        // real time still moves the held clock
        time.pass(Duration::from_secs(5));
        assert_eq!(clock.now_millis(), T0 + 5_000);
        // the operator corrects the system clock: followed again
        time.step(false, 365 * DAY);
        time.pass(Duration::from_secs(1));
        assert_eq!(clock.now_millis(), T0 + 6_000);
        assert_eq!(clock.held_offset_millis(), None);
    }

    #[test]
    fn a_jump_back_is_held_and_the_clock_never_goes_backwards() {
        let (clock, time) = guarded();
        time.pass(Duration::from_secs(100));
        assert_eq!(clock.now_millis(), T0 + 100_000);
        time.step(false, DAY);
        time.pass(Duration::from_secs(1));
        assert_eq!(clock.now_millis(), T0 + 101_000);
        assert!(clock.held_offset_millis().unwrap() < 0);
        // a small step back (followed) does not move the clock backwards:
        // it stands until the system clock passes where it was
        let (clock, time) = guarded();
        time.pass(Duration::from_secs(10));
        clock.now();
        time.step(false, Duration::from_secs(20));
        assert_eq!(clock.now_millis(), T0 + 10_000);
        time.pass(Duration::from_secs(15));
        assert_eq!(clock.now_millis(), T0 + 10_000);
        time.pass(Duration::from_secs(10));
        assert_eq!(clock.now_millis(), T0 + 15_000);
    }

    #[test]
    fn the_operator_accepts_a_jump() {
        let (clock, time) = guarded();
        assert_eq!(clock.accept_system_time(), None, "nothing held");
        time.step(true, 2 * DAY);
        clock.now();
        assert!(clock.held_offset_millis().is_some());
        // clones share the state: the broker's copy sees the acceptance
        let shared = clock.clone();
        let offset = shared.accept_system_time();
        assert_eq!(offset, Some(i64::try_from((2 * DAY).as_millis()).unwrap()));
        assert_eq!(clock.held_offset_millis(), None);
        let two_days = u64::try_from((2 * DAY).as_millis()).unwrap();
        assert_eq!(clock.now_millis(), T0 + two_days);
        time.pass(Duration::from_secs(1));
        assert_eq!(clock.now_millis(), T0 + two_days + 1_000);
    }

    #[test]
    fn the_os_time_source_moves_forward() {
        let os = OsTime::default();
        let a = os.elapsed();
        std::thread::sleep(Duration::from_millis(5));
        assert!(os.elapsed() >= a + Duration::from_millis(5));
        let clock = GuardedClock::system(Duration::from_secs(60));
        let before = SystemTime::now();
        let now = clock.now();
        assert!(now >= before - Duration::from_secs(1) && now <= SystemTime::now());
        assert_eq!(clock.held_offset_millis(), None);
    }
}
