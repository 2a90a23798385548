//! Test-only fault injection of the broker process: crash points and a failing disk.
//!
//! Nothing here does anything unless one of these environment variables is set when
//! the store opens (they are read once, in [`super::SledStore::open`]). They exist for
//! the crash and storage-fault tests of the `trmx-tests` crate, which start the real
//! broker executable as a child process; never set them in production.
//!
//! - `TRMX_BROKER_FAILPOINT=<point>[:N]` ([`FAILPOINT_ENV`]): the process calls
//!   [`std::process::abort`] the `N`-th time (default: the first) it reaches `<point>`:
//!   - `after-write-before-flush`: a `Submit`'s transaction is applied, its flush not
//!     yet requested — the message may or may not survive, its sender has no receipt;
//!   - `after-flush-before-reply`: the `Submit` is durable, its receipt not yet sent —
//!     the message must survive, and the sender's retry gets `duplicate = true`;
//!   - `during-ack`: an `Ack`'s transaction is applied, its flush not yet requested —
//!     the recipient sees the message again (at least once) and deduplicates it. An
//!     `Ack` of large messages applied in parts (`BATCH_READ_BYTES`) reaches it after
//!     each part: `during-ack:1` crashes between its first and second.
//!
//!   A value that names no point makes the store refuse to open (a typo in a test must
//!   not silently run a test without its crash).
//! - `TRMX_BROKER_FAULT_FILE=<path>` ([`FAULT_FILE_ENV`]): while a file exists at
//!   `<path>`, every flush fails like a failing disk (the [`FaultSwitch`] is set and
//!   cleared by a thread that looks every few milliseconds), so a test can break and
//!   repair the disk of a broker process from outside.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::FaultSwitch;

/// Names the crash point and how many hits before it fires (`point[:N]`).
pub const FAILPOINT_ENV: &str = "TRMX_BROKER_FAILPOINT";
/// Names a file whose existence makes every flush fail.
pub const FAULT_FILE_ENV: &str = "TRMX_BROKER_FAULT_FILE";
/// How often the fault file is looked at.
const FAULT_FILE_POLL: Duration = Duration::from_millis(10);

/// A place in the store where the process can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// After a submit's transaction, before its flush.
    AfterWriteBeforeFlush,
    /// After a submit's flush, before its answer.
    AfterFlushBeforeReply,
    /// After an ack's transaction, before its flush.
    DuringAck,
}

impl Point {
    /// Every point, in the order of a message's life.
    pub const ALL: [Point; 3] = [
        Point::AfterWriteBeforeFlush,
        Point::AfterFlushBeforeReply,
        Point::DuringAck,
    ];

    /// The name used in [`FAILPOINT_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Point::AfterWriteBeforeFlush => "after-write-before-flush",
            Point::AfterFlushBeforeReply => "after-flush-before-reply",
            Point::DuringAck => "during-ack",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// The crash point armed for this store, if any.
#[derive(Debug, Default)]
pub(super) struct FailPoints {
    armed: Option<(Point, AtomicU64)>,
}

impl FailPoints {
    /// Reads [`FAILPOINT_ENV`]; an unknown value is an error naming the variable.
    pub(super) fn from_env() -> Result<Self, String> {
        let Ok(value) = std::env::var(FAILPOINT_ENV) else {
            return Ok(Self::default());
        };
        let (name, count) = match value.split_once(':') {
            Some((name, count)) => (name, count.parse::<u64>().ok().filter(|n| *n > 0)),
            None => (value.as_str(), Some(1)),
        };
        let (Some(point), Some(count)) = (Point::parse(name), count) else {
            return Err(format!(
                "{FAILPOINT_ENV}={value:?} is not a fail point (expected one of {} with an optional :N, N >= 1)",
                Point::ALL.map(Point::name).join(", ")
            ));
        };
        tracing::warn!(
            fail_point = point.name(),
            at_hit = count,
            "test fail point armed: this process will abort"
        );
        Ok(Self {
            armed: Some((point, AtomicU64::new(count))),
        })
    }

    /// Counts a pass through `point`; aborts the process at the armed hit.
    pub(super) fn hit(&self, point: Point) {
        let Some((armed, remaining)) = &self.armed else {
            return;
        };
        if *armed == point && remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            tracing::error!(
                fail_point = point.name(),
                "test fail point reached: aborting"
            );
            std::process::abort();
        }
    }
}

/// With [`FAULT_FILE_ENV`] set, starts a thread that keeps `faults` failing while
/// the named file exists.
pub(super) fn watch_fault_file(faults: &FaultSwitch) -> Result<(), String> {
    let Some(path) = std::env::var_os(FAULT_FILE_ENV).map(PathBuf::from) else {
        return Ok(());
    };
    tracing::warn!(path = %path.display(), "test disk fault file watched: flushes fail while it exists");
    let faults = faults.clone();
    std::thread::Builder::new()
        .name("trmx-fault-file".to_owned())
        .spawn(move || {
            loop {
                let failing = path.exists();
                if failing != faults.is_failing() {
                    tracing::warn!(failing, "test disk fault switched");
                    faults.set_failing(failing);
                }
                std::thread::sleep(FAULT_FILE_POLL);
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the fault-file thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_have_stable_names() {
        for point in Point::ALL {
            assert_eq!(Point::parse(point.name()), Some(point));
        }
        assert_eq!(Point::parse("during-ack"), Some(Point::DuringAck));
        assert_eq!(Point::parse("nowhere"), None);
    }

    #[test]
    fn an_unarmed_point_never_fires() {
        let points = FailPoints::default();
        for point in Point::ALL {
            points.hit(point);
        }
    }
}
