//! The system clock, guarded against jumps.
//!
//! The broker expires messages and runs its retentions by the wall clock,
//! and a node erases bodies past their retention date by it. Both are final
//! (a message dead-lettered, a body deleted), so a wall clock set a year
//! ahead by mistake (a mistyped date, a dead RTC battery at boot) would
//! otherwise expire every queued message, or erase every body, at once; one
//! set back would hold every redelivery until it caught up.
//!
//! [`GuardedClock`] compares every reading of the wall clock with the
//! previous one it accepted, moved on by the real time elapsed between them
//! (Linux `CLOCK_BOOTTIME`, which, unlike `CLOCK_MONOTONIC`, counts a
//! suspended machine's sleep, so waking up is not a jump). Within
//! `max_step` of that it follows the wall clock (NTP's adjustments, small
//! steps). Further off, forward or back, it keeps time from the elapsed real
//! time alone ("holds"), logs an error naming the offset (again every 15
//! minutes), and reports the offset ([`GuardedClock::held_offset_millis`]),
//! until the wall clock agrees again, or the process is restarted: a new
//! clock takes the wall clock as it is (so a jump while the process is down
//! cannot be told from the time it was down). It never goes backwards:
//! after a small step back it stands still until the wall clock has caught
//! up.
//!
//! Across a restart, [`check_start`] compares the wall clock with the last
//! time the process recorded in its store: a clock further than
//! `max_downtime` from it, either way, is taken for a wrong clock.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tracing::{error, warn};

/// Readings of the operating system's clocks (a fake one in tests).
pub trait TimeSource: Send + Sync + Debug + 'static {
    /// The wall clock.
    fn wall(&self) -> SystemTime;
    /// A clock that only moves forward, at the rate of real time, also
    /// while the machine sleeps.
    fn elapsed(&self) -> Duration;
}

/// The operating system's clocks: `CLOCK_REALTIME`, and `CLOCK_BOOTTIME`
/// (Linux; elsewhere the monotonic clock).
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

    #[cfg(target_os = "linux")]
    fn elapsed(&self) -> Duration {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
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

/// The system clock, guarded against jumps (see the module documentation).
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
    /// What the operator does to accept a jump, for the log, e.g. "restart
    /// the broker to accept it".
    accept_hint: &'static str,
    state: Mutex<GuardState>,
}

#[derive(Debug)]
struct GuardState {
    /// The last accepted wall reading, and the elapsed reading taken with it.
    anchor_wall: SystemTime,
    anchor_elapsed: Duration,
    /// The latest instant handed out.
    last: SystemTime,
    /// While held: the wall clock's offset from this clock (ms), and when
    /// (elapsed reading) the error was last logged.
    held: Option<(i64, Duration)>,
}

impl GuardedClock<OsTime> {
    /// The operating system's clock, held when it jumps by more than
    /// `max_step`; `accept_hint` tells the operator how to accept a jump.
    pub fn system(max_step: Duration, accept_hint: &'static str) -> Self {
        Self::new(OsTime::default(), max_step, accept_hint)
    }
}

impl<S: TimeSource> GuardedClock<S> {
    /// `source`'s wall clock, held when it jumps by more than `max_step`.
    pub fn new(source: S, max_step: Duration, accept_hint: &'static str) -> Self {
        let anchor_wall = source.wall();
        let anchor_elapsed = source.elapsed();
        Self {
            inner: Arc::new(Guarded {
                source,
                max_step,
                accept_hint,
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current instant: the wall clock's, or while held, the last
    /// accepted one moved on by the real time elapsed since.
    pub fn now(&self) -> SystemTime {
        let (now, event) = {
            let mut state = self.lock();
            // Both clocks are read under the lock: a reading taken before
            // another caller's newer one must not be compared with it (it
            // would look like a step back by its own age).
            let wall = self.inner.source.wall();
            let elapsed = self.inner.source.elapsed();
            self.advance(&mut state, wall, elapsed)
        };
        // (logged without the lock: a slow log must not stall every caller)
        match event {
            Event::None => {}
            Event::Agrees { offset, was } => warn!(
                offset_seconds = offset / 1000,
                was_seconds = was / 1000,
                "the system clock agrees with this process's time again; following it"
            ),
            Event::Held { offset } => error!(
                offset_seconds = offset / 1000,
                max_step_seconds = self.inner.max_step.as_secs(),
                "the system clock jumped: this process keeps its own time (from the real time \
                 elapsed) so that nothing expires, and no retention runs, by a wrong clock. \
                 Correct the system clock (it is followed again once it agrees), or, if the new \
                 time is right, {}",
                self.inner.accept_hint
            ),
        }
        now
    }

    fn advance(
        &self,
        state: &mut GuardState,
        wall: SystemTime,
        elapsed: Duration,
    ) -> (SystemTime, Event) {
        let since = elapsed.saturating_sub(state.anchor_elapsed);
        // (an instant past what SystemTime holds: take the wall clock's)
        let expected = state.anchor_wall.checked_add(since).unwrap_or(wall);
        let offset = signed_millis(wall, expected);
        let max_step = i64::try_from(self.inner.max_step.as_millis()).unwrap_or(i64::MAX);
        let (now, event) = if offset.unsigned_abs() <= max_step.unsigned_abs() {
            let event = match state.held.take() {
                Some((was, _)) => Event::Agrees { offset, was },
                None => Event::None,
            };
            state.anchor_wall = wall;
            state.anchor_elapsed = elapsed;
            (wall, event)
        } else {
            let (logged, event) = match state.held {
                Some((_, at)) if elapsed.saturating_sub(at) < HELD_LOG_INTERVAL => {
                    (at, Event::None)
                }
                _ => (elapsed, Event::Held { offset }),
            };
            state.held = Some((offset, logged));
            (expected, event)
        };
        state.last = state.last.max(now);
        (state.last, event)
    }

    /// While the wall clock is not followed: how far it is ahead of this
    /// clock, in milliseconds (negative when behind), as of the last
    /// [`Self::now`]. `None` while it is followed.
    pub fn held_offset_millis(&self) -> Option<i64> {
        self.lock().held.map(|(offset, _)| offset)
    }
}

/// What a reading changed, to be logged.
enum Event {
    None,
    Agrees { offset: i64, was: i64 },
    Held { offset: i64 },
}

/// How the wall clock at a start compares with the last time the process ran on its
/// store ([`check_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartClock {
    /// Nothing recorded, or the clock is ahead of the last run by less than
    /// `max_downtime` (the time the process was down), or behind it by at most `max_step`.
    Fine,
    /// Behind the last run by more than `max_step`, less than `max_downtime`: the start
    /// goes on (timers scheduled before come that much later), and says so.
    Behind(Duration),
    /// Further from the last run than `max_downtime`: taken for a wrong clock, the start
    /// is refused until the operator accepts the clock.
    TooFar {
        /// Whether the clock is ahead of the last run (else behind).
        ahead: bool,
        /// By how much.
        by: Duration,
    },
}

/// Compares `now` with `last`, the last time the process recorded that it ran on its
/// store (milliseconds since the Unix epoch). `max_downtime` `None` accepts any clock.
///
/// A small step back is accepted, with a warning: NTP correcting a clock that ran fast
/// while the process ran (a jump it held) must not keep the restart that accepts it
/// from starting.
pub fn check_start(
    last: Option<u64>,
    now: u64,
    max_step: Duration,
    max_downtime: Option<Duration>,
) -> StartClock {
    let Some(last) = last else {
        return StartClock::Fine;
    };
    let (ahead, by) = if now >= last {
        (true, Duration::from_millis(now - last))
    } else {
        (false, Duration::from_millis(last - now))
    };
    match max_downtime {
        Some(longest) if by > longest => StartClock::TooFar { ahead, by },
        _ if !ahead && by > max_step => StartClock::Behind(by),
        _ => StartClock::Fine,
    }
}

/// A span of time for a person: `1 second`, `4 minutes`, `5.2 hours`, `365.0 days`.
pub fn human_span(span: Duration) -> String {
    let secs = span.as_secs_f64();
    if secs >= 2.0 * 86_400.0 {
        format!("{:.1} days", secs / 86_400.0)
    } else if secs >= 2.0 * 3_600.0 {
        format!("{:.1} hours", secs / 3_600.0)
    } else if secs >= 120.0 {
        format!("{} minutes", span.as_secs() / 60)
    } else if span.as_secs() == 1 {
        "1 second".to_owned()
    } else {
        format!("{} seconds", span.as_secs())
    }
}

/// `a - b` in milliseconds, saturating.
fn signed_millis(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(ahead) => i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX),
        Err(behind) => i64::try_from(behind.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn a_start_takes_a_clock_far_from_the_last_run_for_a_wrong_one() {
        let (step, week) = (Duration::from_secs(60), Duration::from_secs(7 * 86_400));
        let last = 1_800_000_000_000;
        let check = |now| check_start(Some(last), now, step, Some(week));
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap();
        assert_eq!(check_start(None, 0, step, Some(week)), StartClock::Fine);
        assert_eq!(check(last + ms(week)), StartClock::Fine, "down for a week");
        assert_eq!(
            check(last - ms(step)),
            StartClock::Fine,
            "a small step back"
        );
        assert_eq!(
            check(last - ms(step) - 1),
            StartClock::Behind(step + Duration::from_millis(1))
        );
        assert_eq!(
            check(last + ms(week) + 1),
            StartClock::TooFar {
                ahead: true,
                by: week + Duration::from_millis(1)
            }
        );
        assert_eq!(
            check(last - ms(week) - 1),
            StartClock::TooFar {
                ahead: false,
                by: week + Duration::from_millis(1)
            }
        );
        // no max_downtime: any clock, a step back still said
        assert_eq!(
            check_start(Some(last), u64::MAX, step, None),
            StartClock::Fine
        );
        assert!(matches!(
            check_start(Some(last), 0, step, None),
            StartClock::Behind(_)
        ));
    }

    #[test]
    fn spans_read_in_human_units() {
        let span = |secs| human_span(Duration::from_secs(secs));
        assert_eq!(span(59), "59 seconds");
        assert_eq!(span(1), "1 second");
        assert_eq!(span(0), "0 seconds");
        assert_eq!(span(300), "5 minutes");
        assert_eq!(span(5 * 3_600 + 720), "5.2 hours");
        assert_eq!(span(365 * 86_400 + 1), "365.0 days");
        assert_eq!(
            human_span(Duration::from_millis(31_536_001_234)),
            "365.0 days"
        );
    }

    /// A wall clock and an elapsed clock the test moves.
    #[derive(Debug, Clone)]
    struct FakeTime(Arc<Mutex<(SystemTime, Duration)>>);

    impl FakeTime {
        fn at(millis: u64) -> Self {
            Self(Arc::new(Mutex::new((
                UNIX_EPOCH + Duration::from_millis(millis),
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

    const T0: u64 = 1_700_000_000_000;
    const DAY: Duration = Duration::from_secs(86_400);

    fn guarded() -> (GuardedClock<FakeTime>, FakeTime) {
        let time = FakeTime::at(T0);
        (
            GuardedClock::new(time.clone(), Duration::from_secs(60), "restart it"),
            time,
        )
    }

    fn millis(clock: &GuardedClock<FakeTime>) -> u64 {
        u64::try_from(clock.now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
    }

    fn ms(d: Duration) -> i64 {
        i64::try_from(d.as_millis()).unwrap()
    }

    #[test]
    fn follows_the_system_clock_and_its_small_steps() {
        let (clock, time) = guarded();
        assert_eq!(millis(&clock), T0);
        time.pass(Duration::from_secs(10));
        assert_eq!(millis(&clock), T0 + 10_000);
        // NTP steps it by 30 s, within the 60 s allowed: followed
        time.step(true, Duration::from_secs(30));
        assert_eq!(millis(&clock), T0 + 40_000);
        // steps count from the last reading: two more of 50 s, each read,
        // are followed
        time.step(true, Duration::from_secs(50));
        assert_eq!(millis(&clock), T0 + 90_000);
        time.step(true, Duration::from_secs(50));
        assert_eq!(millis(&clock), T0 + 140_000);
        assert_eq!(clock.held_offset_millis(), None);
    }

    #[test]
    fn a_jump_forward_is_held_until_the_system_clock_agrees_again() {
        let (clock, time) = guarded();
        clock.now();
        time.step(true, 365 * DAY);
        assert_eq!(millis(&clock), T0, "a year ahead is not followed");
        assert_eq!(clock.held_offset_millis(), Some(ms(365 * DAY)));
        // real time still moves the held clock, and the offset is current
        time.pass(Duration::from_secs(5));
        assert_eq!(millis(&clock), T0 + 5_000);
        time.step(true, DAY);
        assert_eq!(millis(&clock), T0 + 5_000);
        assert_eq!(clock.held_offset_millis(), Some(ms(366 * DAY)));
        // the operator corrects the system clock: followed again
        time.step(false, 366 * DAY);
        time.pass(Duration::from_secs(1));
        assert_eq!(millis(&clock), T0 + 6_000);
        assert_eq!(clock.held_offset_millis(), None);
    }

    #[test]
    fn a_jump_back_is_held_and_the_clock_never_goes_backwards() {
        let (clock, time) = guarded();
        time.pass(Duration::from_secs(100));
        assert_eq!(millis(&clock), T0 + 100_000);
        time.step(false, DAY);
        time.pass(Duration::from_secs(1));
        assert_eq!(millis(&clock), T0 + 101_000);
        assert_eq!(clock.held_offset_millis(), Some(-ms(DAY)));
        // a small step back (followed) does not move the clock backwards:
        // it stands until the system clock passes where it was
        let (clock, time) = guarded();
        time.pass(Duration::from_secs(10));
        clock.now();
        time.step(false, Duration::from_secs(20));
        assert_eq!(millis(&clock), T0 + 10_000);
        time.pass(Duration::from_secs(15));
        assert_eq!(millis(&clock), T0 + 10_000);
        time.pass(Duration::from_secs(10));
        assert_eq!(millis(&clock), T0 + 15_000);
    }

    #[test]
    fn clones_share_the_state_and_a_new_clock_takes_the_wall_clock() {
        let (clock, time) = guarded();
        time.step(true, 2 * DAY);
        let shared = clock.clone();
        assert_eq!(millis(&shared), T0);
        assert_eq!(clock.held_offset_millis(), Some(ms(2 * DAY)));
        // a restart: what the operator does to accept the new time
        let restarted = GuardedClock::new(time.clone(), Duration::from_secs(60), "restart it");
        let two_days = T0 + u64::try_from(ms(2 * DAY)).unwrap();
        assert_eq!(millis(&restarted), two_days);
        assert_eq!(restarted.held_offset_millis(), None);
    }

    /// Readings that advance both clocks a little at each call, as real
    /// time does, from many threads at once: never a jump, never backwards.
    #[test]
    fn concurrent_callers_never_see_a_jump_or_time_going_back() {
        #[derive(Debug)]
        struct Ticking(Mutex<u64>);
        impl TimeSource for Ticking {
            fn wall(&self) -> SystemTime {
                let mut t = self.0.lock().unwrap();
                *t += 1;
                UNIX_EPOCH + Duration::from_millis(T0 + *t)
            }
            fn elapsed(&self) -> Duration {
                Duration::from_millis(*self.0.lock().unwrap())
            }
        }
        let clock = GuardedClock::new(Ticking(Mutex::new(0)), Duration::from_secs(1), "restart");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || {
                    let mut last = UNIX_EPOCH;
                    for _ in 0..2_000 {
                        let now = clock.now();
                        assert!(now >= last);
                        last = now;
                        assert_eq!(clock.held_offset_millis(), None);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn a_wall_clock_at_the_end_of_time_does_not_panic() {
        // (the latest instant SystemTime holds on Linux, less 10 s)
        let end = u64::try_from(i64::MAX).unwrap() - 10;
        let time = FakeTime::at(0);
        time.step(true, Duration::from_secs(end));
        let clock = GuardedClock::new(time.clone(), Duration::from_secs(60), "restart it");
        let start = clock.now();
        // 100 s of real time pass while the wall clock is set back by as
        // much: the held time would lie past the end of SystemTime
        time.step(false, Duration::from_secs(100));
        time.pass(Duration::from_secs(100));
        assert_eq!(clock.now(), start);
    }

    #[test]
    fn the_os_time_source_moves_forward() {
        let os = OsTime::default();
        let a = os.elapsed();
        std::thread::sleep(Duration::from_millis(5));
        assert!(os.elapsed() >= a + Duration::from_millis(5));
        let clock = GuardedClock::system(Duration::from_secs(60), "restart it");
        let before = SystemTime::now();
        let now = clock.now();
        assert!(now >= before - Duration::from_secs(1) && now <= SystemTime::now());
        assert_eq!(clock.held_offset_millis(), None);
    }
}
