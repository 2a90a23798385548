//! The broker's last-run file ([`LAST_RUN_FILE`] in the data directory, the format and
//! reading of [`trmx_durable::last_run`]): the last time a broker recorded in its store
//! that it ran ([`crate::store::BrokerStore::mark_running`]), kept where
//! `trmx-broker check-config` reads it without touching the store.
//!
//! # Invariants
//! - Those of [`trmx_durable::last_run`]: the store's mark is the truth, the file is
//!   never ahead of it, and it is replaced atomically (mode 0600).
//! - The broker writes the file right after its store recorded the same instant (at
//!   start, then every minute), and `trmx-broker store accept-clock` after it recorded
//!   the clock it accepts. A write that fails is logged and the broker goes on.

use std::path::Path;

pub use trmx_durable::last_run::{LAST_RUN_FILE, LastRun, path, read};

use crate::error::BrokerError;
use crate::store::Millis;

/// What the file says about itself, for whoever opens it.
const ABOUT: &str = "The last time a trmx broker recorded in the store in this directory that \
     it ran (last_run_ms: milliseconds since the Unix epoch), written after the store \
     recorded it. `trmx-broker check-config` reads it to make the clock check of a start \
     without opening the store; the start itself checks the store.";

/// Records `at`, which the store in `data_dir` has just recorded as its last run, in the
/// last-run file (replaced atomically). Writes and syncs a small file synchronously.
pub fn write(data_dir: &Path, at: Millis) -> Result<(), BrokerError> {
    trmx_durable::last_run::write(data_dir, at, ABOUT).map_err(|failed| BrokerError::Io {
        context: format!(
            "last-run file {}: {}",
            path(data_dir).display(),
            failed.step
        ),
        error: failed.error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_last_run_reads_back_and_says_it_is_the_brokers() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1_700_000_000_123).unwrap();
        assert_eq!(read(dir.path()), LastRun::At(1_700_000_000_123));
        let text = std::fs::read_to_string(path(dir.path())).unwrap();
        assert!(text.contains("trmx broker"), "{text}");
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
                "last-run file {}: cannot write {}: ",
                path(dir.path()).display(),
                tmp.display()
            )),
            "{text}"
        );
    }
}
