//! Replacing a small file atomically, for the small records a process keeps beside its
//! store (the CRL record, the broker's last run).
//!
//! [`replace_file`] writes the new contents to a temporary file beside the file (mode
//! 0600: these records sit in a data directory of personal data, and say when and
//! against what its process ran), fsyncs it, renames it over the file and fsyncs the
//! directory: after a crash or a power cut the file holds the old contents or the new,
//! never a mix, and a reader never sees a partial file.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The step of [`replace_file`] that failed, naming the file or directory it failed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplaceStep {
    /// Writing (or syncing) the new contents to this temporary file, beside the file.
    Write(PathBuf),
    /// Renaming this temporary file over the file.
    Rename(PathBuf),
    /// Syncing this directory (the file's) after the rename.
    SyncDir(PathBuf),
}

impl fmt::Display for ReplaceStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplaceStep::Write(tmp) => write!(f, "cannot write {}", tmp.display()),
            ReplaceStep::Rename(tmp) => write!(f, "cannot rename {} over it", tmp.display()),
            ReplaceStep::SyncDir(dir) => write!(f, "cannot sync its directory {}", dir.display()),
        }
    }
}

/// Why [`replace_file`] failed: the step, and what the OS said.
#[derive(Debug)]
pub struct ReplaceError {
    /// The step that failed.
    pub step: ReplaceStep,
    /// What the OS said.
    pub error: io::Error,
}

impl fmt::Display for ReplaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.error)
    }
}

impl std::error::Error for ReplaceError {}

/// Replaces the contents of `path` with `contents` atomically and durably (see the module
/// doc). The temporary file is `<path>.tmp`: one writer at a time (the caller holds what
/// makes it the file's only writer, such as its store's lock). After a failure `path` is
/// as it was (unless only the directory's sync failed), and the temporary file is removed.
///
/// Writes and syncs synchronously.
pub fn replace_file(path: &Path, contents: &[u8]) -> Result<(), ReplaceError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        });
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(ReplaceError {
            step: ReplaceStep::Write(tmp),
            error,
        });
    }
    if let Err(error) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ReplaceError {
            step: ReplaceStep::Rename(tmp),
            error,
        });
    }
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|error| ReplaceError {
            step: ReplaceStep::SyncDir(dir.to_owned()),
            error,
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        replace_file(&path, b"first").unwrap();
        replace_file(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["record.json"], "a temporary file is left behind");
    }

    #[test]
    fn a_failure_names_the_step_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        let tmp = dir.path().join("record.json.tmp");
        // (a directory in the way fails the write as root too, unlike a mode)
        std::fs::create_dir(&tmp).unwrap();
        let failed = replace_file(&path, b"x").unwrap_err();
        assert_eq!(failed.step, ReplaceStep::Write(tmp.clone()));
        std::fs::remove_dir(&tmp).unwrap();
        // the file itself in the way: the rename fails
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), "").unwrap();
        let failed = replace_file(&path, b"x").unwrap_err();
        assert_eq!(failed.step, ReplaceStep::Rename(tmp.clone()));
        assert!(
            failed
                .to_string()
                .starts_with(&format!("cannot rename {} over it: ", tmp.display())),
            "{failed}"
        );
        assert!(
            std::fs::metadata(&tmp).is_err(),
            "the temporary file is left behind"
        );
    }
}
