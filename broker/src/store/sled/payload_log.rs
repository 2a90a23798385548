//! The payload log: message payloads in append-only segment files beside
//! the sled database (`<store>/payloads/<segment>.seg`) instead of inside
//! sled's tree nodes.
//!
//! Why: sled keeps values in its B-tree leaves, splits a leaf at 17 entries
//! and rewrites whole nodes when it consolidates them, so a 4 KiB payload was
//! serialised and written about 2.5 times (measured: 10.8 KiB written per
//! 4 KiB message) and a flush took about 4 ms. Here a payload is written
//! once, with the other payloads of its batch in one `write`. The record in
//! sled holds the segment and offset ([`LogRef`]); its size and SHA-256 are in
//! the record as before.
//!
//! Rules that keep it safe:
//! - Only the store's writer thread stages and writes. It writes the staged
//!   payloads of a batch and `fdatasync`s them BEFORE the transaction that
//!   refers to them commits ([`PayloadLog::write_staged`]): no record, durable
//!   or not, ever points at bytes that are not durable. (sled's own flush
//!   still makes the records durable before any answer.)
//! - Segments are never rewritten, only deleted whole: when no record keeps
//!   a payload in one (`counters`: `p` + segment → kept payloads, kept by
//!   `Tx::put` in the same transaction as the records). Appends go to the
//!   newest segment only, so the count of an older one never rises again;
//!   `Core::collect_payload_segments` reads the counts, flushes sled, then
//!   deletes the segments it saw at zero.
//! - Every open starts a new segment. A tail written for a batch that never
//!   committed (crash between `write_staged` and the commit) is never
//!   appended to, and goes with its segment.
//! - Files are 0600 and the directory 0700: payloads are personal data. A new
//!   segment's directory entry is synced before anything refers to it.

use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::codec::LogRef;
use super::flusher::FaultSwitch;
use crate::store::StoreError;

/// Default size after which a new segment is started.
pub(super) const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Name of the directory inside the store directory.
const DIR: &str = "payloads";
/// File name extension of a segment.
const EXT: &str = "seg";

/// The payload log of one store.
#[derive(Debug)]
pub(super) struct PayloadLog {
    dir: PathBuf,
    segment_bytes: u64,
    active: Mutex<Active>,
    /// While set, writes fail like on a full disk (storage-fault tests).
    faults: FaultSwitch,
    /// Read handles by segment (reads come from the writer thread and from
    /// nowhere else, but `Core` is shared, so this is behind a lock).
    readers: Mutex<HashMap<u64, Arc<File>>>,
}

/// The segment appended to.
#[derive(Debug)]
struct Active {
    id: u64,
    file: File,
    /// Bytes written and synced: the next write goes here (positioned, so a
    /// failed partial write is simply overwritten by the next one).
    len: u64,
    /// Staged payloads not yet written (they follow `len`).
    staged: Vec<u8>,
    /// A write failed since the last `write_staged`: the batch must fail,
    /// since some of its staged payloads are not on disk.
    failed: Option<StoreError>,
}

impl PayloadLog {
    /// Opens the log in `<store_dir>/payloads` and starts a new segment
    /// after the newest one there.
    pub(super) fn open(
        store_dir: &Path,
        segment_bytes: u64,
        faults: FaultSwitch,
    ) -> std::io::Result<Self> {
        let dir = store_dir.join(DIR);
        DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let newest = list_segments(&dir)?.last().copied().unwrap_or(0);
        let id = newest + 1;
        let file = create_segment(&dir, id)?;
        Ok(Self {
            dir,
            segment_bytes: segment_bytes.max(1),
            active: Mutex::new(Active {
                id,
                file,
                len: 0,
                staged: Vec::new(),
                failed: None,
            }),
            faults,
            readers: Mutex::new(HashMap::new()),
        })
    }

    fn active(&self) -> MutexGuard<'_, Active> {
        self.active
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The segment new payloads go to.
    pub(super) fn active_id(&self) -> u64 {
        self.active().id
    }

    /// Places `payload` after the staged ones and returns where it will
    /// be. Nothing is on disk until [`Self::write_staged`]. Starts a new
    /// segment (writing and syncing the old one first) when this one is full.
    pub(super) fn stage(&self, payload: &[u8]) -> Result<LogRef, StoreError> {
        let mut active = self.active();
        let used = active.len + active.staged.len() as u64;
        if used > 0 && used + payload.len() as u64 > self.segment_bytes {
            // payloads staged earlier in this batch go to the old segment
            let rolled = write_out(&mut active, &self.faults)
                .map_err(|e| self.failed("write", &e))
                .and_then(|()| {
                    create_segment(&self.dir, active.id + 1).map_err(|e| self.failed("create", &e))
                });
            match rolled {
                Ok(file) => {
                    active.id += 1;
                    active.file = file;
                    active.len = 0;
                }
                Err(e) => {
                    active.staged.clear();
                    active.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        let at = LogRef {
            segment: active.id,
            offset: active.len + active.staged.len() as u64,
        };
        active.staged.extend_from_slice(payload);
        Ok(at)
    }

    /// Writes the staged payloads and waits until they are durable. Call it
    /// before committing the records that refer to them.
    ///
    /// On an error nothing staged since the last call counts: the batch
    /// fails as a whole, and the next payloads take the same offsets.
    pub(super) fn write_staged(&self) -> Result<(), StoreError> {
        let mut active = self.active();
        if let Some(e) = active.failed.take() {
            active.staged.clear();
            return Err(e);
        }
        write_out(&mut active, &self.faults).map_err(|e| {
            active.staged.clear();
            self.failed("write", &e)
        })
    }

    /// The `len` bytes at `at`.
    pub(super) fn read(&self, at: LogRef, len: u64) -> Result<Vec<u8>, StoreError> {
        let file = {
            let mut readers = self
                .readers
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            match readers.get(&at.segment) {
                Some(file) => Arc::clone(file),
                None => {
                    let file = File::open(segment_path(&self.dir, at.segment)).map_err(|e| {
                        StoreError::Corrupt(format!(
                            "payload segment {} cannot be opened: {e}",
                            at.segment
                        ))
                    })?;
                    let file = Arc::new(file);
                    readers.insert(at.segment, Arc::clone(&file));
                    file
                }
            }
        };
        let len = usize::try_from(len)
            .map_err(|_| StoreError::Corrupt("payload size out of range".to_owned()))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, at.offset).map_err(|e| {
            StoreError::Corrupt(format!(
                "payload at segment {} offset {} unreadable: {e}",
                at.segment, at.offset
            ))
        })?;
        Ok(buf)
    }

    /// Segments on disk, oldest first.
    pub(super) fn segments(&self) -> Result<Vec<u64>, StoreError> {
        list_segments(&self.dir).map_err(|e| self.failed("list", &e))
    }

    /// Deletes segment `id` (no record keeps a payload in it).
    pub(super) fn remove(&self, id: u64) -> Result<(), StoreError> {
        self.readers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&id);
        match std::fs::remove_file(segment_path(&self.dir, id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.failed("delete", &e)),
        }
    }

    fn failed(&self, what: &str, e: &std::io::Error) -> StoreError {
        StoreError::Unavailable(format!(
            "payload log in {}: {what} failed: {e}",
            self.dir.display()
        ))
    }
}

fn write_out(active: &mut Active, faults: &FaultSwitch) -> std::io::Result<()> {
    if active.staged.is_empty() {
        return Ok(());
    }
    if faults.is_failing() {
        return Err(std::io::Error::other("injected storage fault (disk full)"));
    }
    active.file.write_all_at(&active.staged, active.len)?;
    active.file.sync_data()?;
    active.len += active.staged.len() as u64;
    active.staged.clear();
    Ok(())
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.{EXT}"))
}

/// Creates segment `id` (0600) and syncs the directory entry.
fn create_segment(dir: &Path, id: u64) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(segment_path(dir, id))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
            continue;
        }
        if let Some(id) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| u64::from_str_radix(s, 16).ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn staged_payloads_read_back_after_writing_and_segments_roll_over() {
        let dir = tempfile::tempdir().unwrap();
        let log = PayloadLog::open(dir.path(), 10, FaultSwitch::default()).unwrap();
        let a = log.stage(b"hello").unwrap();
        let b = log.stage(b"world").unwrap();
        assert_eq!((a.segment, a.offset, b.offset), (1, 0, 5));
        // full: the next one starts segment 2 (and writes segment 1)
        let c = log.stage(b"again").unwrap();
        assert_eq!((c.segment, c.offset), (2, 0));
        log.write_staged().unwrap();
        assert_eq!(log.read(a, 5).unwrap(), b"hello");
        assert_eq!(log.read(b, 5).unwrap(), b"world");
        assert_eq!(log.read(c, 5).unwrap(), b"again");
        assert!(matches!(log.read(c, 6), Err(StoreError::Corrupt(_))));
        assert_eq!(log.segments().unwrap(), vec![1, 2]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join(DIR)), 0o700);
        assert_eq!(mode(&segment_path(&dir.path().join(DIR), 1)), 0o600);
        // a reopened log starts after the newest segment and reads the old ones
        drop(log);
        let log = PayloadLog::open(dir.path(), 10, FaultSwitch::default()).unwrap();
        assert_eq!(log.active_id(), 3);
        assert_eq!(log.read(b, 5).unwrap(), b"world");
        log.remove(1).unwrap();
        log.remove(1).unwrap();
        assert!(matches!(log.read(a, 5), Err(StoreError::Corrupt(_))));
        assert_eq!(log.segments().unwrap(), vec![2, 3]);
    }

    #[test]
    fn a_failed_write_fails_the_batch_and_the_next_one_takes_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultSwitch::default();
        let log = PayloadLog::open(dir.path(), 10, faults.clone()).unwrap();
        let a = log.stage(b"first").unwrap();
        log.write_staged().unwrap();
        faults.set_failing(true);
        let lost = log.stage(b"lost!").unwrap();
        assert!(matches!(
            log.write_staged(),
            Err(StoreError::Unavailable(_))
        ));
        // a roll-over that cannot write the old segment fails the job, and
        // the batch with it (its earlier payload is not on disk either)
        let b = log.stage(b"early").unwrap();
        assert!(log.stage(b"rolls").is_err());
        assert!(log.write_staged().is_err());
        faults.set_failing(false);
        assert!(log.write_staged().is_ok());
        let c = log.stage(b"again").unwrap();
        assert_eq!((c.segment, c.offset), (lost.segment, lost.offset));
        assert_eq!(b.offset, lost.offset);
        log.write_staged().unwrap();
        assert_eq!(log.read(a, 5).unwrap(), b"first");
        assert_eq!(log.read(c, 5).unwrap(), b"again");
        assert_eq!(log.segments().unwrap(), vec![1]);
    }
}
