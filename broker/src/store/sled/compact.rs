//! Offline compaction: copies a stopped broker's store into a fresh sled
//! database and swaps it in, to give back the disk space sled does not.
//!
//! sled 0.34 keeps rewritten pages in the segments of its log and reuses a
//! segment only once most of it is dead, so its files grow with the messages
//! processed, not with what is kept (about 6× the live keys and values after
//! a benchmark run; see the README). A fresh database holds each key once.
//!
//! The one trap: message seqs come from sled's database-wide id generator,
//! which a copy does not carry over (it starts again at 0). The copy stores a
//! floor in `meta` (`seq_floor`) above every seq of the original, and new seqs
//! are `floor + id` ([`super::tx::Tx::next_seq`]), so no new record can land on
//! an old one.
//!
//! No record of the original is changed (sled's opening of it does its own
//! housekeeping on its files): it is kept next to the data directory until
//! the operator removes it, and the swap is one atomic `rename` exchange, so
//! an interruption at any point leaves a complete store at the data directory.

use std::path::{Path, PathBuf};

use super::audit::open_existing;
use super::ops::{BATCH_READ_BYTES, storage};
use crate::store::StoreError;

/// Key of the seq floor in the `meta` tree (u64, big-endian).
const SEQ_FLOOR_KEY: &[u8] = b"seq_floor";
/// Keys per sled batch when copying a tree.
const COPY_BATCH: usize = 1024;
/// The files the broker keeps in the data directory besides sled's: a compacted store
/// must not lose them (a lost CRL record would let an older CRL in at the next start; a
/// lost last-run file would leave `check-config` without its clock check until the
/// broker ran again).
const BROKER_FILES: &[&str] = &[
    crate::server::CRL_RECORD_FILE,
    crate::last_run::LAST_RUN_FILE,
];

/// The seq floor stored in `meta` (0 in a store never compacted).
pub(super) fn seq_floor(meta: &::sled::Tree) -> Result<u64, StoreError> {
    match meta.get(SEQ_FLOOR_KEY).map_err(storage)? {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("meta: seq_floor is not 8 bytes".to_owned())),
    }
}

/// What [`compact_offline`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// Keys copied (all trees).
    pub keys: u64,
    /// Bytes of those keys and their values.
    pub key_value_bytes: u64,
    /// Bytes of the store's files before.
    pub bytes_before: u64,
    /// Bytes of the compacted store's files.
    pub bytes_after: u64,
    /// Where the compacted store is: the data directory itself, or `--output`.
    pub compacted: PathBuf,
    /// Where the original store is kept (None with `--output`: it stayed in place).
    pub original_kept_at: Option<PathBuf>,
}

/// Compacts the stopped broker's store at `path`.
///
/// With `output`, writes the compacted copy there (a directory that must not
/// exist yet) and leaves `path` alone: for a data directory that is a mount
/// point, or to inspect the copy first. Without it, builds the copy next to
/// `path` (`<path>.compacting`), checks it, and swaps the two atomically; the
/// original stays at `<path>.before-compaction-<unix seconds>`.
///
/// Fails without changing anything when the broker still runs on `path`
/// (the directory is locked), when `path` holds no broker store, or when the
/// copy's checksum differs from the original's.
pub fn compact_offline(path: &Path, output: Option<&Path>) -> Result<CompactReport, StoreError> {
    let fail = |at: &Path, reason: String| StoreError::Open {
        path: at.display().to_string(),
        reason,
    };
    // the real directory: `.` works, and through a symlink the directory
    // itself is swapped (the link then points at the compacted store)
    let path = &std::fs::canonicalize(path)
        .map_err(|e| fail(path, format!("cannot find the data directory: {e}")))?;
    let target = match output {
        Some(out) => out.to_owned(),
        None => sibling(path, "compacting")?,
    };
    if target.exists() {
        return Err(fail(
            &target,
            "already exists (left by an interrupted compaction?): remove it, then compact again"
                .to_owned(),
        ));
    }
    let bytes_before = dir_bytes(path);
    // The copy is ours until it is swapped in: removed on any failure. Both
    // databases stay open (and so locked) until the swap is done, so that a
    // broker started meanwhile cannot open either directory and write into
    // the one about to move away.
    let copied = copy_store(path, &target)
        .and_then(|copied| copy_permissions(path, &target).map(|()| copied))
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&target);
        })?;
    let report = |compacted: PathBuf, original_kept_at: Option<PathBuf>| CompactReport {
        keys: copied.keys,
        key_value_bytes: copied.key_value_bytes,
        bytes_before,
        bytes_after: dir_bytes(&compacted),
        compacted,
        original_kept_at,
    };
    if output.is_some() {
        return Ok(report(target, None));
    }
    exchange(&target, path).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&target);
    })?;
    // (after the exchange, `target` holds the original)
    let kept = free_sibling(path, &format!("before-compaction-{}", unix_seconds()))?;
    std::fs::rename(&target, &kept).map_err(|e| {
        fail(
            &target,
            format!(
                "the compacted store is in place; the original is here, and could not be \
                 renamed to {}: {e}",
                kept.display()
            ),
        )
    })?;
    sync_parent(path)?;
    Ok(report(path.to_owned(), Some(kept)))
}

/// The two open databases of a compaction, and what was copied.
struct Copied {
    _original: ::sled::Db,
    _copy: ::sled::Db,
    keys: u64,
    key_value_bytes: u64,
}

/// Copies the store at `path` into a new database at `target`, checks the
/// copy against the original, stores the seq floor, and flushes the copy
/// to disk (every file: it must survive a power cut once it is swapped in).
fn copy_store(path: &Path, target: &Path) -> Result<Copied, StoreError> {
    let old = open_existing(path)?;
    let old_floor = seq_floor(&old.open_tree("meta").map_err(storage)?)?;
    // above every seq handed out: the generator never gives an id twice
    let next = old.generate_id().map_err(storage)?;
    let new_floor = old_floor
        .checked_add(next)
        .ok_or_else(|| StoreError::Corrupt("message seqs are exhausted".to_owned()))?;
    // as private as the store it replaces (see `trmx_durable::private_dir`)
    trmx_durable::private_dir(target).map_err(|e| StoreError::Open {
        path: target.display().to_string(),
        reason: e.to_string(),
    })?;
    let new = ::sled::Config::new()
        .path(target)
        .cache_capacity(16 << 20)
        .mode(::sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .map_err(|e| StoreError::Open {
            path: target.display().to_string(),
            reason: super::describe_open_error(&e),
        })?;
    let (keys, key_value_bytes, _) = copy_trees(&old, &new)?;
    let (before, after) = (
        old.checksum().map_err(storage)?,
        new.checksum().map_err(storage)?,
    );
    if before != after {
        return Err(StoreError::Corrupt(format!(
            "the copy's checksum {after:08x} differs from the original's {before:08x}; \
             nothing was changed"
        )));
    }
    new.open_tree("meta")
        .and_then(|meta| meta.insert(SEQ_FLOOR_KEY, &new_floor.to_be_bytes()[..]))
        .map_err(storage)?;
    trmx_durable::flush_sled(&new).map_err(storage)?;
    copy_broker_files(path, target)?;
    // (syncs the directory too, so the files copied above are in it after a power cut)
    trmx_durable::DiskSync::open(target).map_err(|e| StoreError::Open {
        path: target.display().to_string(),
        reason: format!("cannot sync the copy: {e}"),
    })?;
    Ok(Copied {
        _original: old,
        _copy: new,
        keys,
        key_value_bytes,
    })
}

/// Copies the [`BROKER_FILES`] that `from` holds into `to`, synced.
fn copy_broker_files(from: &Path, to: &Path) -> Result<(), StoreError> {
    for name in BROKER_FILES {
        let copied = std::fs::copy(from.join(name), to.join(name))
            .and_then(|_| std::fs::File::open(to.join(name)))
            .and_then(|file| file.sync_all());
        match copied {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Open {
                    path: from.join(name).display().to_string(),
                    reason: format!("cannot copy it into the compacted store: {e}"),
                });
            }
        }
    }
    Ok(())
}

/// Copies every tree of `from` into the empty `to`, in key order; returns
/// the keys copied, their bytes (keys and values), and the most bytes one
/// sled batch held.
///
/// A batch stops at [`COPY_BATCH`] keys or [`BATCH_READ_BYTES`] (one value
/// more): it holds every value it is given until it is applied, and a record
/// carries its payload, so 1,024 records of `max_envelope_bytes` were held at
/// once (8 GiB at the default 8 MiB, 64 GiB at its ceiling), which a store of
/// large messages could not be compacted in.
fn copy_trees(from: &::sled::Db, to: &::sled::Db) -> Result<(u64, u64, u64), StoreError> {
    let (mut keys, mut bytes, mut most_held) = (0u64, 0u64, 0u64);
    for name in from.tree_names() {
        let source = from.open_tree(&name).map_err(storage)?;
        let dest = to.open_tree(&name).map_err(storage)?;
        let mut batch = ::sled::Batch::default();
        let (mut in_batch, mut batch_bytes) = (0, 0u64);
        for item in source.iter() {
            let (key, value) = item.map_err(storage)?;
            let size = (key.len() + value.len()) as u64;
            bytes += size;
            batch_bytes += size;
            batch.insert(key, value);
            in_batch += 1;
            keys += 1;
            if in_batch == COPY_BATCH || batch_bytes >= BATCH_READ_BYTES {
                most_held = most_held.max(batch_bytes);
                dest.apply_batch(std::mem::take(&mut batch))
                    .map_err(storage)?;
                (in_batch, batch_bytes) = (0, 0);
            }
        }
        most_held = most_held.max(batch_bytes);
        dest.apply_batch(batch).map_err(storage)?;
    }
    Ok((keys, bytes, most_held))
}

/// `<path>.<suffix>`, next to `path`.
fn sibling(path: &Path, suffix: &str) -> Result<PathBuf, StoreError> {
    let name = path.file_name().ok_or_else(|| StoreError::Open {
        path: path.display().to_string(),
        reason: "not a directory name".to_owned(),
    })?;
    let mut name = name.to_os_string();
    name.push(".");
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// [`sibling`]`(path, stem)`, or with `-2`, `-3`… added until no such file exists.
fn free_sibling(path: &Path, stem: &str) -> Result<PathBuf, StoreError> {
    let mut candidate = sibling(path, stem)?;
    let mut n = 1;
    while candidate.exists() {
        n += 1;
        candidate = sibling(path, &format!("{stem}-{n}"))?;
    }
    Ok(candidate)
}

/// Swaps the directories `a` and `b` in one step (Linux `renameat2` with
/// `RENAME_EXCHANGE`), so that `b` is never missing: a broker started at any
/// moment finds either the original or the compacted store, never an empty
/// directory in which sled would start a new one.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // one libc call; std has no atomic exchange of two paths
fn exchange(a: &Path, b: &Path) -> Result<(), StoreError> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| StoreError::Open {
            path: p.display().to_string(),
            reason: "the path holds a NUL byte".to_owned(),
        })
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    Err(StoreError::Open {
        path: b.display().to_string(),
        reason: format!(
            "cannot swap in the compacted store from {} ({e}); nothing was changed. If the data \
             directory is a mount point, compact with --output DIR and move the files by hand",
            a.display()
        ),
    })
}

/// Elsewhere there is no atomic exchange: the caller must use `--output`.
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> Result<(), StoreError> {
    Err(StoreError::Open {
        path: b.display().to_string(),
        reason: format!(
            "swapping in {} needs Linux; nothing was changed. Compact with --output DIR and \
             move the files by hand",
            a.display()
        ),
    })
}

/// Gives `to` the permission bits of `from` (a data directory is often 0700).
fn copy_permissions(from: &Path, to: &Path) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Open {
        path: to.display().to_string(),
        reason: format!("cannot set the permissions: {e}"),
    };
    let mode = std::fs::metadata(from).map_err(io)?.permissions();
    std::fs::set_permissions(to, mode).map_err(io)
}

/// Makes the renames in `path`'s parent directory durable.
fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| StoreError::Open {
            path: parent.display().to_string(),
            reason: format!("cannot sync the directory after the swap: {e}"),
        })
}

/// Total bytes of the files under `dir` (0 for what cannot be read): a
/// store's size on disk.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&entry.path()),
            Ok(_) => entry.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compaction's sled batches stop at `BATCH_READ_BYTES` of keys and values (one
    /// value more), not only at `COPY_BATCH` keys: a batch holds what it is given until it
    /// is applied, and 1,024 large records were gigabytes at once. Every key is still
    /// copied, byte for byte.
    #[test]
    fn a_copy_of_large_records_is_cut_at_its_byte_budget() {
        const LARGE: usize = 1 << 20;
        const N: u64 = 40;
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            ::sled::Config::new()
                .path(dir.path().join(name))
                .cache_capacity(16 << 20)
                .open()
                .unwrap()
        };
        let (from, to) = (open("from"), open("to"));
        let records = from.open_tree("records").unwrap();
        for seq in 0..N {
            records
                .insert(seq.to_be_bytes(), vec![seq as u8; LARGE])
                .unwrap();
        }
        let (keys, _, most_held) = copy_trees(&from, &to).unwrap();
        assert_eq!(keys, N);
        assert!(
            most_held <= BATCH_READ_BYTES + LARGE as u64 + 8,
            "one batch of the copy held {most_held} bytes (at most {BATCH_READ_BYTES} and one \
             record expected)"
        );
        let copied = to.open_tree("records").unwrap();
        assert_eq!(copied.len() as u64, N);
        assert_eq!(from.checksum().unwrap(), to.checksum().unwrap());
    }
}
