//! Reading a stopped broker's store without opening it in place (`check-config`).
//!
//! Opening a sled 0.34 database writes to it, even to read one key: its recovery zeroes
//! the rest of the log's last segment (the `db` file grows to a whole segment), writes a
//! snapshot of the page table (`snap.*`), and deletes the blob files newer than the log
//! it found; closing flushes. A start does all that anyway, but `check-config` changes
//! nothing, and may run as root, where files it left would belong to root. So
//! [`last_running_offline`] opens a copy of sled's files (not `blobs/`, the large
//! values, which the `meta` tree never holds), made in a private temporary directory
//! inside the data directory (the same filesystem, and the same protection as the
//! payloads the copy holds), removed once read. The copy is made under a shared lock on
//! the store's `db` file, sled's own lock: a broker starting meanwhile waits for it
//! (then fails, as for any process holding the store), and a running broker is found
//! without reading anything.

use std::fs::File;
use std::path::Path;

use super::audit::open_existing;
use super::ops::storage;
use crate::store::{Millis, StoreError};

/// Free space a copy leaves at least, beyond its own size: sled's recovery of the copy
/// grows the log to a whole segment and writes a snapshot.
const COPY_HEADROOM: u64 = 64 << 20;

/// What [`last_running_offline`] found in a data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastRunMark {
    /// No broker store there yet (no directory, or no sled log in it).
    NoStore,
    /// Another process holds the store: a running broker, or an offline `store` command.
    InUse,
    /// Too little free space for the copy it is read from (bytes).
    NoRoomToCopy {
        /// The size of the copy and the space it needs besides.
        needed: u64,
        /// Free bytes on the data directory's filesystem.
        free: u64,
    },
    /// The last run the store records (`None`: it records none).
    Recorded(Option<Millis>),
}

/// Reads what [`crate::store::BrokerStore::last_running`] would answer for the store in
/// `path`, from a copy (see the module doc), leaving the store's files as they are.
pub fn last_running_offline(path: &Path) -> Result<LastRunMark, StoreError> {
    let fail = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LastRunMark::NoStore),
        Err(e) => return Err(fail(format!("cannot read the directory: {e}"))),
    };
    // sled's lock is on its log file: no log, no store yet
    let log = match File::open(path.join("db")) {
        Ok(log) => log,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LastRunMark::NoStore),
        Err(e) => return Err(fail(format!("cannot open the store's log file: {e}"))),
    };
    // (sled takes an exclusive flock on it; ours goes with `log`)
    match rustix::fs::flock(&log, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(LastRunMark::InUse),
        Err(e) => return Err(fail(format!("cannot lock the store's log file: {e}"))),
    }
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| fail(format!("cannot read the directory: {e}")))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let sled_file = name == "conf" || name == "db" || name.starts_with("snap.");
        let meta = entry
            .metadata()
            .map_err(|e| fail(format!("cannot read {name}: {e}")))?;
        if sled_file && meta.is_file() {
            files.push((entry.path(), entry.file_name(), meta.len()));
        }
    }
    let needed = files
        .iter()
        .map(|(_, _, len)| len)
        .sum::<u64>()
        .saturating_add(COPY_HEADROOM);
    let free = rustix::fs::statvfs(path)
        .map(|stat| stat.f_bavail.saturating_mul(stat.f_frsize))
        .map_err(|e| fail(format!("cannot measure the free space: {e}")))?;
    if free < needed {
        return Ok(LastRunMark::NoRoomToCopy { needed, free });
    }
    // (0700, removed on drop, also after a failure)
    let copy = tempfile::Builder::new()
        .prefix(".trmx-check-config-")
        .tempdir_in(path)
        .map_err(|e| {
            fail(format!(
                "cannot make a directory for a copy of the store: {e}"
            ))
        })?;
    for (from, name, _) in &files {
        std::fs::copy(from, copy.path().join(name))
            .map_err(|e| fail(format!("cannot copy {}: {e}", from.display())))?;
    }
    // the copy is complete: the store may go
    drop(log);
    let db = open_existing(copy.path()).map_err(|e| match e {
        StoreError::Open { reason, .. } => fail(reason),
        other => other,
    })?;
    let meta = db.open_tree("meta").map_err(storage)?;
    let recorded = super::last_running(&meta)?;
    drop(meta);
    drop(db);
    copy.close()
        .map_err(|e| fail(format!("cannot remove the copy of the store: {e}")))?;
    Ok(LastRunMark::Recorded(recorded))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::store::sled::{SledOptions, SledStore};
    use crate::store::{BrokerStore, Lifecycle};

    /// Every file under `dir`: its contents and modification time.
    fn files(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(files(&path));
            } else {
                let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
                out.insert(path.clone(), (std::fs::read(&path).unwrap(), modified));
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_run_is_read_without_touching_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert_eq!(last_running_offline(&data).unwrap(), LastRunMark::NoStore);
        std::fs::create_dir(&data).unwrap();
        assert_eq!(last_running_offline(&data).unwrap(), LastRunMark::NoStore);

        let store = SledStore::open(&data, SledOptions::default(), Lifecycle::default()).unwrap();
        assert_eq!(last_running_offline(&data).unwrap(), LastRunMark::InUse);
        store.mark_running(1_700_000_000_000).await.unwrap();
        store.close().await.unwrap();
        drop(store);
        // (sled lets go of its lock a moment after the last handle)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while last_running_offline(&data).unwrap() == LastRunMark::InUse {
            assert!(std::time::Instant::now() < deadline, "still in use");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }

        let before = files(&data);
        assert_eq!(
            last_running_offline(&data).unwrap(),
            LastRunMark::Recorded(Some(1_700_000_000_000))
        );
        assert_eq!(files(&data), before, "the store's files changed");
    }
}
