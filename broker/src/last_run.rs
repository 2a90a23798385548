//! The last-run file ([`LAST_RUN_FILE`] in the data directory): the last time a broker
//! recorded in its store that it ran ([`crate::store::BrokerStore::mark_running`]), kept
//! in a small file of its own as well, so that `trmx-broker check-config` makes the clock
//! check of a start without touching the store. (Opening a sled store writes to it, a
//! running broker holds its lock, and its log holds the payloads: a copy of it to read one
//! key would be a copy of personal data.)
//!
//! The file is JSON:
//!
//! ```json
//! {
//!   "format": 1,
//!   "about": "…",
//!   "last_run_ms": 1796083200123
//! }
//! ```
//!
//! `last_run_ms` is the instant the store records, in milliseconds since the Unix epoch.
//!
//! # Invariants
//! - The store's mark is the truth: the start checks the clock against the store, never
//!   against this file, which only `check-config` reads.
//! - The broker writes the file right after its store recorded the same instant (at start,
//!   then every minute), and `trmx-broker store accept-clock` after it recorded the clock
//!   it accepts; never before, so the file is not ahead of its store. A write that fails
//!   is logged and the broker goes on: the file is then behind the store by the time its
//!   writes failed.
//! - The file is replaced atomically ([`trmx_durable::replace_file`], mode 0600): a reader
//!   sees the record before or after, never a mix.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::store::Millis;

/// The file in `data_dir` that holds the last run of a broker on the store there.
pub const LAST_RUN_FILE: &str = "last-run.json";

/// The format this version writes, and the one it reads.
const FORMAT: u32 = 1;

/// What the file says about itself, for whoever opens it.
const ABOUT: &str = "The last time a trmx broker recorded in the store in this directory that \
     it ran (last_run_ms: milliseconds since the Unix epoch), written after the store \
     recorded it. `trmx-broker check-config` reads it to make the clock check of a start \
     without opening the store; the start itself checks the store.";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LastRunFile {
    format: u32,
    about: String,
    last_run_ms: Millis,
}

/// What the last-run file of a data directory says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastRun {
    /// There is no file (no broker ran there yet, or only one older than the file).
    Missing,
    /// The last run recorded.
    At(Millis),
    /// The file cannot be read, or does not parse: why.
    Damaged(String),
}

/// The last-run file of `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(LAST_RUN_FILE)
}

/// Reads the last-run file of `data_dir`. Reads a small file synchronously.
pub fn read(data_dir: &Path) -> LastRun {
    let bytes = match std::fs::read(path(data_dir)) {
        Ok(bytes) => bytes,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return LastRun::Missing;
        }
        Err(error) => return LastRun::Damaged(format!("cannot read it: {error}")),
    };
    let file: LastRunFile = match serde_json::from_slice(&bytes) {
        Ok(file) => file,
        Err(error) => return LastRun::Damaged(format!("not a last-run record: {error}")),
    };
    if file.format != FORMAT {
        return LastRun::Damaged(format!(
            "format {} (this version reads format {FORMAT})",
            file.format
        ));
    }
    LastRun::At(file.last_run_ms)
}

/// Records `at`, which the store in `data_dir` has just recorded as its last run, in the
/// last-run file (replaced atomically). Writes and syncs a small file synchronously.
pub fn write(data_dir: &Path, at: Millis) -> Result<(), BrokerError> {
    let file = path(data_dir);
    let mut text = serde_json::to_string_pretty(&LastRunFile {
        format: FORMAT,
        about: ABOUT.to_owned(),
        last_run_ms: at,
    })
    .map_err(|e| BrokerError::Io {
        context: format!("encoding the last-run record {}", file.display()),
        error: std::io::Error::other(e),
    })?;
    text.push('\n');
    trmx_durable::replace_file(&file, text.as_bytes()).map_err(|failed| BrokerError::Io {
        context: format!("last-run file {}: {}", file.display(), failed.step),
        error: failed.error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_last_run_reads_back_and_a_missing_one_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), LastRun::Missing);
        assert_eq!(read(&dir.path().join("nowhere")), LastRun::Missing);
        write(dir.path(), 1_700_000_000_123).unwrap();
        assert_eq!(read(dir.path()), LastRun::At(1_700_000_000_123));
        write(dir.path(), 1_700_000_060_456).unwrap();
        assert_eq!(read(dir.path()), LastRun::At(1_700_000_060_456));
    }

    #[test]
    fn a_damaged_file_says_why() {
        let dir = tempfile::tempdir().unwrap();
        for (contents, why) in [
            ("", "not a last-run record: EOF"),
            ("{\"format\": 1}", "not a last-run record: missing field"),
            (
                "{\"format\": 2, \"about\": \"\", \"last_run_ms\": 1}",
                "format 2 (this version reads format 1)",
            ),
            (
                "{\"format\": 1, \"about\": \"\", \"last_run_ms\": -1}",
                "not a last-run record: invalid value",
            ),
        ] {
            std::fs::write(path(dir.path()), contents).unwrap();
            match read(dir.path()) {
                LastRun::Damaged(reason) => assert!(reason.starts_with(why), "{reason}"),
                other => panic!("{contents:?} read as {other:?}"),
            }
        }
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
