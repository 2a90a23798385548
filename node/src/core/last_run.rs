//! The node's last-run file ([`LAST_RUN_FILE`] in `data_dir`, beside the store's own
//! files; format and reading in [`trmx_durable::last_run`]): the last time a node recorded
//! in its store that it ran, kept where `trmx-node check-config` reads it, and the clock
//! check that command makes from it ([`check_clock_offline`]) without opening, locking or
//! copying the store.
//!
//! # Invariants
//! - Those of [`trmx_durable::last_run`]: the store's mark is the truth (the start checks
//!   the store), the file is never ahead of it, and it is replaced atomically (mode 0600).
//! - The node writes the file right after its store recorded the same instant, at start
//!   and every minute (`LastRunWriter`), and `trmx-node accept-clock` after it recorded
//!   the clock it accepts. A write that fails is a warning, never a stop.

use std::path::{Path, PathBuf};

use tracing::{info, warn};
use trmx_durable::clock::human_span;

pub use trmx_durable::last_run::{ClockCheck, LAST_RUN_FILE, LastRun, path, read};

use super::{CLOCK_BEHIND, ClockBounds, Millis, NodeError, format_millis as when, judge_clock};

/// What the file says about itself, for whoever opens it.
const ABOUT: &str = "The last time a trmx node recorded in the store in this directory that it \
     ran (last_run_ms: milliseconds since the Unix epoch), written after the store recorded \
     it. `trmx-node check-config` reads it to make the clock check of a start without \
     opening the store; the start itself checks the store.";

/// A failing write is said at the first failure, then at every this many in a row: every
/// five minutes of the node's running mark, which comes every minute.
const WARN_EVERY_FAILURES: u64 = 5;

/// Records `at`, which the store in `data_dir` has just recorded as the node's last run, in
/// the last-run file (replaced atomically). Writes and syncs a small file synchronously.
pub fn write(data_dir: &Path, at: Millis) -> Result<(), NodeError> {
    trmx_durable::last_run::write(data_dir, at, ABOUT).map_err(|failed| {
        NodeError::Store(format!(
            "last-run file {}: {failed}",
            path(data_dir).display()
        ))
    })
}

/// The running node's writes of its last-run file, after each running mark of its store.
#[derive(Debug)]
pub(super) struct LastRunWriter {
    data_dir: PathBuf,
    /// Writes failed in a row.
    failing: u64,
}

impl LastRunWriter {
    pub(super) fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            failing: 0,
        }
    }

    /// Writes `at`, which the store has just recorded, off the runtime. A failure is a
    /// warning (see [`WARN_EVERY_FAILURES`]) and nothing else: the start checks the clock
    /// against the store, not the file.
    pub(super) async fn record(&mut self, at: Millis) {
        let dir = self.data_dir.clone();
        let error = match tokio::task::spawn_blocking(move || write(&dir, at)).await {
            Ok(Ok(())) => {
                if self.written() {
                    info!("the last-run file is written again");
                }
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(error) => format!("the task writing the last-run file failed: {error}"),
        };
        if let Some(failures) = self.failed() {
            warn!(
                %error,
                failures,
                "cannot write the last-run file: check-config cannot check the clock against \
                 the node's last run (the node goes on; its start checks the store)"
            );
        }
    }

    /// Counts a failed write: `Some(failures in a row)` when it is to be said.
    fn failed(&mut self) -> Option<u64> {
        self.failing += 1;
        (self.failing - 1)
            .is_multiple_of(WARN_EVERY_FAILURES)
            .then_some(self.failing)
    }

    /// A write succeeded: whether writes were failing.
    fn written(&mut self) -> bool {
        std::mem::take(&mut self.failing) > 0
    }
}

/// The warning the start gives (and logs) for the clock `check` found, if any.
pub fn clock_warning(check: &ClockCheck) -> Option<String> {
    match check {
        ClockCheck::Checked {
            last_run,
            behind: Some(by),
            ..
        } => Some(format!(
            "clock: {} (behind: {}, last run: {})",
            CLOCK_BEHIND,
            human_span(*by),
            when(*last_run)
        )),
        _ => None,
    }
}

/// The clock check as `trmx-node check-config` says it.
pub fn clock_line(check: &ClockCheck) -> String {
    check.describe("node", "trmx-node accept-clock", when)
}

/// The clock check of a start against the last run kept in `data_dir`'s last-run file,
/// with the start's rule (`judge_clock`): its refusal is the error. Looks whether there
/// is a store (a start without one is a first start, whatever a file left behind says),
/// and reads nothing of it, so it works beside a running node too.
pub fn check_clock_offline(
    data_dir: &Path,
    now: Millis,
    bounds: ClockBounds,
) -> Result<ClockCheck, NodeError> {
    ClockCheck::beside_store(
        data_dir,
        now,
        |last_run| judge_clock(Some(last_run), now, bounds),
        |e| {
            NodeError::Store(format!(
                "cannot look for a store in {}: {e}",
                data_dir.display()
            ))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_write_is_said_at_first_then_every_fifth_time_in_a_row() {
        let mut writer = LastRunWriter::new(PathBuf::new());
        let said: Vec<_> = (0..11).map(|_| writer.failed()).collect();
        assert_eq!(
            said,
            [
                Some(1),
                None,
                None,
                None,
                None,
                Some(6),
                None,
                None,
                None,
                None,
                Some(11)
            ]
        );
        assert!(writer.written(), "it was failing");
        assert!(!writer.written());
        assert_eq!(writer.failed(), Some(1), "a new failure is said at once");
    }

    #[test]
    fn a_failed_write_names_the_file_and_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("last-run.json.tmp");
        // (a directory in the way fails the write as root too, unlike a mode)
        std::fs::create_dir(&tmp).unwrap();
        let text = write(dir.path(), 1).unwrap_err().to_string();
        assert!(
            text.starts_with(&format!(
                "store: last-run file {}: cannot write {}: ",
                path(dir.path()).display(),
                tmp.display()
            )),
            "{text}"
        );
        std::fs::remove_dir(&tmp).unwrap();
        write(dir.path(), 2).unwrap();
        assert_eq!(read(dir.path()), LastRun::At(2));
        let text = std::fs::read_to_string(path(dir.path())).unwrap();
        assert!(text.contains("trmx node"), "{text}");
    }
}
