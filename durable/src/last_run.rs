//! The last-run file ([`LAST_RUN_FILE`] beside a store): the last time a process (broker
//! or node) recorded in its store that it ran, kept in a small file of its own as well, so
//! that its `check-config` makes the clock check of a start ([`crate::clock::check_start`])
//! without touching the store. (Opening a sled store writes to it, a running process holds
//! its lock, and its log holds the payloads: a copy of it to read one key would be a copy
//! of personal data.)
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
//! `last_run_ms` is the instant the store records, in milliseconds since the Unix epoch;
//! `about` is the writer's own account of the file, for whoever opens it.
//!
//! # Invariants
//! - The store's mark is the truth: a start checks the clock against the store, never
//!   against this file, which only `check-config` reads.
//! - A process writes the file right after its store recorded the same instant, never
//!   before, so the file is not ahead of its store. A write that fails leaves the file
//!   behind the store by the time its writes failed.
//! - The file is replaced atomically ([`crate::replace_file`], mode 0600): a reader sees
//!   the record before or after, never a mix.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::clock::{StartClock, human_span};
use crate::replace::{ReplaceError, replace_file};

/// The file, in the store's directory, that holds the last run of a process on that store.
pub const LAST_RUN_FILE: &str = "last-run.json";

/// The format this version writes, and the one it reads.
const FORMAT: u32 = 1;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LastRunRecord {
    format: u32,
    #[allow(dead_code)] // (for people: read only to check that it is there)
    about: String,
    last_run_ms: u64,
}

/// What the last-run file of a store's directory says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastRun {
    /// There is no file (nothing ran there yet, or only a version older than the file).
    Missing,
    /// The last run recorded, in milliseconds since the Unix epoch.
    At(u64),
    /// The file cannot be read, or does not parse: why.
    Damaged(String),
}

/// The last-run file of the store in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(LAST_RUN_FILE)
}

/// Reads the last-run file of `dir`. Reads a small file synchronously.
pub fn read(dir: &Path) -> LastRun {
    let bytes = match std::fs::read(path(dir)) {
        Ok(bytes) => bytes,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return LastRun::Missing;
        }
        Err(error) => return LastRun::Damaged(format!("cannot read it: {error}")),
    };
    let record: LastRunRecord = match serde_json::from_slice(&bytes) {
        Ok(record) => record,
        Err(error) => return LastRun::Damaged(format!("not a last-run record: {error}")),
    };
    if record.format != FORMAT {
        return LastRun::Damaged(format!(
            "format {} (this version reads format {FORMAT})",
            record.format
        ));
    }
    LastRun::At(record.last_run_ms)
}

/// What a clock check without the store goes by in `dir`: `None` when there is no store
/// there (a start there is a first start, whatever a file left behind says), else what
/// its last-run file says. Looks whether the store's log exists, and reads nothing of the
/// store ([`crate::store_exists`]).
pub fn beside_store(dir: &Path) -> io::Result<Option<LastRun>> {
    Ok(crate::store_exists(dir)?.then(|| read(dir)))
}

/// The clock check of a start as `check-config` makes it from the last-run file beside a
/// store ([`ClockCheck::beside_store`]). The file is not the start's truth, the store is:
/// a file that cannot tell is "not checked", never a refusal, and a clock the start would
/// refuse is the start rule's own error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClockCheck {
    /// No store in the directory yet: the first start records the clock.
    FirstStart,
    /// A store without a last-run file beside it (last run by a version older than the
    /// file): not checked.
    NotRecorded,
    /// The last-run file cannot be read or parsed: not checked.
    Damaged {
        /// The last-run file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Checked: the system clock at `now` against the last run the file records (both in
    /// milliseconds since the Unix epoch).
    Checked {
        /// The last run the file records.
        last_run: u64,
        /// The system clock.
        now: u64,
        /// How far behind the last run the clock is, when the start would warn of it.
        behind: Option<Duration>,
    },
}

impl ClockCheck {
    /// The check for the store in `dir` at `now`, with the start's rule `judge` (given the
    /// last run; its refusal is the error). `io` says what went wrong looking for the
    /// store. Reads nothing of the store ([`beside_store`]).
    pub fn beside_store<E>(
        dir: &Path,
        now: u64,
        judge: impl FnOnce(u64) -> Result<StartClock, E>,
        io: impl FnOnce(io::Error) -> E,
    ) -> Result<Self, E> {
        Ok(match beside_store(dir).map_err(io)? {
            None => Self::FirstStart,
            Some(LastRun::Missing) => Self::NotRecorded,
            Some(LastRun::Damaged(reason)) => Self::Damaged {
                file: path(dir),
                reason,
            },
            Some(LastRun::At(last_run)) => Self::Checked {
                last_run,
                now,
                behind: match judge(last_run)? {
                    StartClock::Behind(by) => Some(by),
                    StartClock::Fine | StartClock::TooFar { .. } => None,
                },
            },
        })
    }

    /// What was found, in a word: `firstStart`, `ok`, `behind` (accepted, with the
    /// start's warning) or `notChecked`.
    pub fn status(&self) -> &'static str {
        match self {
            Self::FirstStart => "firstStart",
            Self::NotRecorded | Self::Damaged { .. } => "notChecked",
            Self::Checked { behind: None, .. } => "ok",
            Self::Checked {
                behind: Some(_), ..
            } => "behind",
        }
    }

    /// The last run checked against.
    pub fn last_run(&self) -> Option<u64> {
        match self {
            Self::Checked { last_run, .. } => Some(*last_run),
            _ => None,
        }
    }

    /// The check as `check-config` says it, for a `process` (`"broker"`, `"node"`) whose
    /// command `accept` accepts the clock, with instants as `time` writes them.
    pub fn describe(&self, process: &str, accept: &str, time: impl Fn(u64) -> String) -> String {
        let writers = format!(
            "the {process} writes it at start and every minute, and `{accept}` when it \
             accepts the clock"
        );
        let unchecked = format!("the {process} checks the clock against its store when it starts");
        match self {
            Self::FirstStart => {
                format!(
                    "first start: no store in data_dir yet (the {process} records its time there)"
                )
            }
            Self::NotRecorded => format!(
                "not checked: the store in data_dir has no {LAST_RUN_FILE} beside it (a \
                 {process} older than this one ran on it last); {writers}; {unchecked}"
            ),
            Self::Damaged { file, reason } => format!(
                "not checked: {} is damaged: {reason}; {writers}; {unchecked}",
                file.display()
            ),
            Self::Checked {
                last_run,
                now,
                behind,
            } => {
                let span = human_span(Duration::from_millis(now.abs_diff(*last_run)));
                let which = if now >= last_run { "after" } else { "before" };
                let warned = if behind.is_some() {
                    ", with the warning above"
                } else {
                    ""
                };
                format!(
                    "OK{warned}: the system clock reads {}, {span} {which} the last run of a \
                     {process} on this store ({}, as {LAST_RUN_FILE} records it)",
                    time(*now),
                    time(*last_run)
                )
            }
        }
    }
}

/// Records `at`, which the store in `dir` has just recorded as its last run, in the
/// last-run file (replaced atomically), saying `about` of itself. Writes and syncs a small
/// file synchronously.
pub fn write(dir: &Path, at: u64, about: &str) -> Result<(), ReplaceError> {
    // (spelled out rather than serialised, so that writing cannot fail on encoding: the
    // one string is quoted by serde_json)
    let text = format!(
        "{{\n  \"format\": {FORMAT},\n  \"about\": {},\n  \"last_run_ms\": {at}\n}}\n",
        serde_json::Value::from(about)
    );
    replace_file(&path(dir), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_last_run_reads_back_and_a_missing_one_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), LastRun::Missing);
        assert_eq!(read(&dir.path().join("nowhere")), LastRun::Missing);
        write(dir.path(), 1_700_000_000_123, "a \"quoted\"\nabout").unwrap();
        assert_eq!(read(dir.path()), LastRun::At(1_700_000_000_123));
        write(dir.path(), 1_700_000_060_456, "").unwrap();
        assert_eq!(read(dir.path()), LastRun::At(1_700_000_060_456));
    }

    #[test]
    fn the_file_is_the_json_record_the_module_describes() {
        let dir = tempfile::tempdir().unwrap();
        let about = "what it is, \"quoted\" \\ and\nover two lines";
        write(dir.path(), 1_796_083_200_123, about).unwrap();
        let text = std::fs::read_to_string(path(dir.path())).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "format": 1,
                "about": about,
                "last_run_ms": 1_796_083_200_123_u64,
            })
        );
        assert!(text.starts_with("{\n  \"format\": 1,\n"), "{text}");
        assert!(text.ends_with("}\n"), "{text}");
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
    fn without_a_store_a_file_left_behind_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(beside_store(&dir.path().join("nowhere")).unwrap(), None);
        write(dir.path(), 1, "").unwrap();
        assert_eq!(beside_store(dir.path()).unwrap(), None);
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(beside_store(dir.path()).unwrap(), Some(LastRun::At(1)));
        std::fs::remove_file(path(dir.path())).unwrap();
        assert_eq!(beside_store(dir.path()).unwrap(), Some(LastRun::Missing));
        drop(db);
    }
}
