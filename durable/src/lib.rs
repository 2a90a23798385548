//! Completes sled's flush so that what it flushed survives a power cut.
//!
//! sled 0.34's `Db::flush` makes writes survive a crash of the process, not
//! a power cut or a kernel panic:
//! - it writes its log (`<dir>/db`) with `sync_file_range`, which neither
//!   asks the disk to empty its volatile write cache nor commits the size of
//!   a log file that grew;
//! - it writes every item larger than a quarter of a segment (128 KiB with
//!   the default 512 KiB segments: a message with a large attachment, or one
//!   of sled's own pages grown that large; a broker store under a 4 KiB
//!   benchmark holds about a hundred) into a file of its own under
//!   `<dir>/blobs/`, and never syncs those files or that directory at all.
//!
//! A crash of the process loses none of this (the kernel's page cache
//! survives it). A power cut can lose what was already answered for.
//!
//! [`DiskSync::sync`], called after every successful `Db::flush` and before
//! anyone is answered, closes the gap:
//! 1. It fdatasyncs every blob file closed since the last call. inotify
//!    tells which ones, so a flush without large values costs one
//!    non-blocking read.
//! 2. It fsyncs the blob directory when entries came or went.
//! 3. It fdatasyncs the log.
//!
//! The blobs go first, so that the log never points to a blob that a power
//! cut could take. [`DiskSync::open`] syncs once what was written before the
//! watch began: every blob file, sled's `conf` (written once, never synced),
//! the directories and the log. Linux only (inotify).
//!
//! Besides: [`clock`], the system clock guarded against jumps; [`private_dir`], a data
//! directory only its owner can enter; [`replace`], the atomic replacement of the small
//! files kept beside a store; [`last_run`], one of them, the last run of a process on its
//! store, which `check-config` reads instead of the store; [`store_exists`], whether a
//! directory holds a sled store, told without opening it; [`open_sled`], opening one in
//! a process that may have closed it a moment ago; [`log_filter`], the rule broker and node
//! apply to the log filter an operator gives them (a level or `target=level`, no bare word),
//! and the layer that keeps sled's dumps of stored bytes out of every log; [`flush_sled`],
//! sled's flush in the one turn of the process.

pub mod clock;
pub mod last_run;
pub mod log_filter;
pub mod replace;

pub use replace::{ReplaceError, ReplaceStep, replace_file};

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::OwnedFd;
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;

/// The one turn of the process for sled's flushes (see [`flush_sled`]).
static FLUSH_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// sled's flush of the database `tree` belongs to (a `Db` is its default tree), one at
/// a time in the process. Blocks: call it off an async runtime.
///
/// sled 0.34's flushes, several at once beside a transaction, can hang for good (sled
/// issues #1241, #1308: fixed on sled's main branch, never released), and the lock they
/// hang on is sled's own, one per process, not one per database. A node's concurrent
/// sends hung its store in about 1 run in 10 of a probe test. Broker and node make every
/// flush through here: in production a process has one store and the turn costs an
/// uncontended lock; tests run a broker and nodes in one process.
pub fn flush_sled(tree: &sled::Tree) -> sled::Result<usize> {
    let _turn = hold_flush_turn();
    tree.flush()
}

/// Takes the turn of [`flush_sled`] until the guard is dropped: for a test that shows a
/// flush waits for it.
pub fn hold_flush_turn() -> std::sync::MutexGuard<'static, ()> {
    FLUSH_TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The log file in a sled 0.34 directory.
const LOG_FILE: &str = "db";
/// sled's settings file, written once when the database is created (unsynced).
const CONF_FILE: &str = "conf";
/// The directory of a sled 0.34 database that holds the large items.
const BLOB_DIR: &str = "blobs";
/// Room for a few inotify events at a time (each at most 16 + 256 bytes).
const EVENT_BUFFER: usize = 8192;

/// Makes the flushes of one sled database durable (see the crate docs).
#[derive(Debug)]
pub struct DiskSync {
    log: File,
    /// The blob directory. (Not kept open: an open handle would delay the
    /// event that says it was removed until the handle is closed.)
    blobs: PathBuf,
    inotify: OwnedFd,
    events: Vec<MaybeUninit<u8>>,
    /// Why a sync failed: every later sync fails with it (until the store
    /// is opened again; see [`DiskSync::sync`]).
    broken: Option<String>,
}

/// What one [`DiskSync::sync`] synced besides the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    /// Blob files fdatasynced.
    pub blob_files: usize,
    /// Whether the blob directory was fsynced.
    pub blob_dir: bool,
}

impl DiskSync {
    /// Starts watching the sled database in `dir` (already opened by sled,
    /// which created its files), and syncs everything it holds once, so that
    /// nothing written before the watch began is left out.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let blobs = dir.join(BLOB_DIR);
        let inotify =
            inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).map_err(|e| match e {
                Errno::MFILE => io::Error::other(
                    "cannot watch the store's files: this user's inotify instances are all in \
                     use (raise the sysctl fs.inotify.max_user_instances)",
                ),
                e => io::Error::other(format!("cannot watch the store's files (inotify): {e}")),
            })?;
        inotify::add_watch(
            &inotify,
            &blobs,
            WatchFlags::CLOSE_WRITE
                | WatchFlags::CREATE
                | WatchFlags::DELETE
                | WatchFlags::MOVED_FROM
                | WatchFlags::MOVED_TO
                | WatchFlags::DELETE_SELF
                | WatchFlags::MOVE_SELF
                | WatchFlags::ONLYDIR,
        )
        .map_err(|e| match e {
            Errno::NOSPC => io::Error::other(format!(
                "cannot watch {}: this user's inotify watches are all in use \
                 (raise the sysctl fs.inotify.max_user_watches)",
                blobs.display()
            )),
            e => with_path(e.into(), &blobs),
        })?;
        let log = File::open(dir.join(LOG_FILE)).map_err(|e| with_path(e, &dir.join(LOG_FILE)))?;
        let sync = Self {
            log,
            blobs,
            inotify,
            events: vec![MaybeUninit::uninit(); EVENT_BUFFER],
            broken: None,
        };
        sync.sync_every_blob()?;
        sync.sync_blob_dir()?;
        sync_file(&dir.join(CONF_FILE))?;
        // the directory entries of the log, `conf` and `blobs` themselves,
        // and of the database directory (sled creates it when missing)
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| with_path(e, dir))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            match File::open(parent).and_then(|d| d.sync_all()) {
                // (a parent this user may not list was not created by it either)
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
                other => other.map_err(|e| with_path(e, parent))?,
            }
        }
        sync.log.sync_data()?;
        Ok(sync)
    }

    /// Makes everything the last `Db::flush` wrote durable. Call it after
    /// every successful flush; an error means the flush is not durable.
    ///
    /// An error is final: every later call fails with it. After a failed
    /// fsync the kernel may have dropped the pages it could not write, and
    /// the events read before the failure are consumed, so a later success
    /// would prove nothing. Opening the store again syncs every file anew.
    pub fn sync(&mut self) -> io::Result<Synced> {
        if let Some(why) = &self.broken {
            return Err(io::Error::other(why.clone()));
        }
        self.sync_changes().inspect_err(|e| {
            self.broken = Some(format!(
                "{e}; no later flush of this store is trusted: open it again (restart) once \
                 the cause is fixed"
            ));
        })
    }

    fn sync_changes(&mut self) -> io::Result<Synced> {
        let changes = self.read_events()?;
        let mut synced = Synced::default();
        if changes.overflowed {
            tracing::warn!(
                blobs = %self.blobs.display(),
                "the kernel dropped file events of the store's blob directory: syncing every blob file"
            );
            synced.blob_files = self.sync_every_blob()?;
        } else {
            for name in &changes.closed {
                if sync_file(&self.blobs.join(name))? {
                    synced.blob_files += 1;
                }
            }
        }
        if changes.overflowed || changes.entries_changed {
            self.sync_blob_dir()?;
            synced.blob_dir = true;
        }
        self.log.sync_data()?;
        Ok(synced)
    }

    /// Drains the pending inotify events.
    fn read_events(&mut self) -> io::Result<Changes> {
        let mut changes = Changes::default();
        let mut reader = inotify::Reader::new(&self.inotify, &mut self.events);
        loop {
            let event = match reader.next() {
                Ok(event) => event,
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let flags = event.events();
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                changes.overflowed = true;
                continue;
            }
            if flags.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF | ReadFlags::IGNORED)
            {
                // what is written there now is not watched
                return Err(io::Error::other(format!(
                    "{} was removed, moved or unmounted while the store is open",
                    self.blobs.display()
                )));
            }
            if flags.intersects(
                ReadFlags::CREATE | ReadFlags::DELETE | ReadFlags::MOVED_FROM | ReadFlags::MOVED_TO,
            ) {
                changes.entries_changed = true;
            }
            if flags.contains(ReadFlags::CLOSE_WRITE)
                && let Some(name) = event.file_name()
            {
                changes
                    .closed
                    .insert(OsStr::from_bytes(name.to_bytes()).to_owned());
            }
        }
        Ok(changes)
    }

    /// Fsyncs the blob directory (its entries).
    fn sync_blob_dir(&self) -> io::Result<()> {
        File::open(&self.blobs)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| with_path(e, &self.blobs))
    }

    /// Fdatasyncs every file in the blob directory; returns how many.
    fn sync_every_blob(&self) -> io::Result<usize> {
        let mut count = 0;
        for entry in std::fs::read_dir(&self.blobs).map_err(|e| with_path(e, &self.blobs))? {
            if sync_file(&entry?.path())? {
                count += 1;
            }
        }
        Ok(count)
    }
}

/// Makes `dir` (created with its parents when missing) a directory that only
/// its owner can enter. A store holds personal data, and sled creates its
/// files with the modes the umask allows (0644 under the usual 022), readable
/// by every local user who can reach them. A directory that exists with
/// permissions for its group or others is narrowed to its owner's (logged);
/// one this user cannot narrow is an error that says what to run.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::fs::{DirBuilder, Permissions};
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    let mode = match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => meta.permissions().mode() & 0o777,
        Ok(_) => {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| with_path(e, dir));
        }
        Err(e) => return Err(with_path(e, dir)),
    };
    if mode & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(dir, Permissions::from_mode(mode & 0o700)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{} is open to other users (mode {mode:o}) and cannot be narrowed: {e}; \
                 run `chmod 700 {}` as its owner",
                dir.display(),
                dir.display()
            ),
        )
    })?;
    tracing::warn!(
        dir = %dir.display(),
        was = format!("{mode:o}"),
        now = format!("{:o}", mode & 0o700),
        "the data directory was open to other users: narrowed to its owner"
    );
    Ok(())
}

/// Whether `dir` holds a sled store (its log file), found without opening, locking or
/// reading anything in it.
pub fn store_exists(dir: &Path) -> io::Result<bool> {
    match std::fs::symlink_metadata(dir.join(LOG_FILE)) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// How long [`open_sled`] waits for a directory lock that is being released.
pub const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens `config`'s database. sled's I/O threads let go of the directory lock a moment
/// after the last handle of a closed database is dropped: one reopened in the same
/// process (a broker or node restarted in place, a compaction right after, the tests)
/// can see the lock still held, and is given up to [`SLED_LOCK_WAIT`] for it. Another
/// process that holds the lock is still reported ([`sled_locked`] tells that error).
pub fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        match config.open() {
            Err(e) if sled_locked(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened => return opened,
        }
    }
}

/// Whether opening a sled database failed because its directory lock is held.
pub fn sled_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(error)
        if error.kind() == io::ErrorKind::WouldBlock || error.to_string().contains("lock"))
}

/// What happened in the blob directory since the last read.
#[derive(Debug, Default)]
struct Changes {
    /// Files closed after writing.
    closed: BTreeSet<OsString>,
    /// Entries were created, removed or renamed.
    entries_changed: bool,
    /// The kernel's event queue overflowed: some events are lost.
    overflowed: bool,
}

/// Fdatasyncs the file `path`; `false` when it is gone (sled removed the
/// blob already).
fn sync_file(path: &Path) -> io::Result<bool> {
    match File::open(path) {
        Ok(file) => {
            file.sync_data().map_err(|e| with_path(e, path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(with_path(e, path)),
    }
}

/// `e`, saying which file it is about.
fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A database closed a moment ago (its lock still held, as sled's I/O threads hold
    /// it a little after the last handle is dropped) is opened once the lock is let go.
    #[test]
    fn a_lock_let_go_within_the_wait_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path());
        let db = config.open().unwrap();
        let (opening, open_now) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            open_now.recv().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(db);
        });
        opening.send(()).unwrap();
        let reopened = open_sled(&config);
        holder.join().unwrap();
        reopened.unwrap();
    }

    /// A lock held on (another process on the directory) is reported, and told.
    #[test]
    fn a_lock_held_on_is_reported_as_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path());
        let _db = config.open().unwrap();
        let error = open_sled(&config).unwrap_err();
        assert!(sled_locked(&error), "{error}");
        assert!(!sled_locked(&sled::Error::Unsupported("x".into())));
    }

    fn sled_dir() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .cache_capacity(1 << 20)
            .flush_every_ms(None)
            .open()
            .expect("open sled");
        (dir, db)
    }

    #[test]
    fn a_flush_without_large_values_syncs_only_the_log() {
        let (dir, db) = sled_dir();
        let mut sync = DiskSync::open(dir.path()).expect("watch");
        db.insert("k", vec![7u8; 4096]).expect("insert");
        db.flush().expect("flush");
        assert_eq!(sync.sync().expect("sync"), Synced::default());
    }

    #[test]
    fn a_value_sled_keeps_in_a_blob_file_is_synced_with_the_flush() {
        // This is the sled behaviour the crate exists for: if sled stopped
        // writing large values to `blobs/`, this test says so.
        let (dir, db) = sled_dir();
        let mut sync = DiskSync::open(dir.path()).expect("watch");
        db.insert("attachment", vec![7u8; 300 << 10])
            .expect("insert");
        db.flush().expect("flush");
        let synced = sync.sync().expect("sync");
        assert!(synced.blob_files >= 1, "{synced:?}");
        assert!(synced.blob_dir, "{synced:?}");
        // nothing new: nothing more to sync
        assert_eq!(sync.sync().expect("sync"), Synced::default());
    }

    #[test]
    fn a_blob_still_being_written_is_synced_once_it_is_closed() {
        let (dir, _db) = sled_dir();
        let mut sync = DiskSync::open(dir.path()).expect("watch");
        let path = dir.path().join(BLOB_DIR).join("12345");
        let mut file = File::create(&path).expect("create");
        file.write_all(b"half").expect("write");
        let synced = sync.sync().expect("sync");
        assert_eq!(synced.blob_files, 0, "not closed yet");
        assert!(synced.blob_dir, "a new entry");
        file.write_all(b" and the rest").expect("write");
        drop(file);
        assert_eq!(
            sync.sync().expect("sync"),
            Synced {
                blob_files: 1,
                blob_dir: false
            }
        );
        // removed by sled after a rewrite: the directory again, no file
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            sync.sync().expect("sync"),
            Synced {
                blob_files: 0,
                blob_dir: true
            }
        );
    }

    #[test]
    fn every_blob_file_sled_wrote_before_the_watch_is_found() {
        let (dir, db) = sled_dir();
        db.insert("attachment", vec![7u8; 300 << 10])
            .expect("insert");
        db.flush().expect("flush");
        let blobs = std::fs::read_dir(dir.path().join(BLOB_DIR))
            .expect("blobs")
            .count();
        assert!(blobs >= 1);
        let sync = DiskSync::open(dir.path()).expect("watch");
        assert_eq!(sync.sync_every_blob().expect("sync"), blobs);
    }

    #[test]
    fn a_removed_blob_directory_fails_every_later_sync() {
        let (dir, _db) = sled_dir();
        let mut sync = DiskSync::open(dir.path()).expect("watch");
        std::fs::remove_dir_all(dir.path().join(BLOB_DIR)).expect("remove");
        let err = sync.sync().expect_err("removed");
        assert!(err.to_string().contains("removed, moved"), "{err}");
        // a new directory would not be watched: still refused
        std::fs::create_dir(dir.path().join(BLOB_DIR)).expect("recreate");
        assert!(sync.sync().is_err());
    }

    #[test]
    fn a_data_directory_is_created_or_narrowed_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().expect("tempdir");
        let fresh = root.path().join("a/b/data");
        private_dir(&fresh).expect("created");
        assert_eq!(mode(&fresh), 0o700);
        let open = root.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&open).expect("narrowed");
        assert_eq!(mode(&open), 0o700);
        // already private: left as it is
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        private_dir(&open).expect("private");
        assert_eq!(mode(&open), 0o500);
        let file = root.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = private_dir(&file).expect_err("a file");
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn a_missing_blob_directory_is_an_error_naming_it() {
        let (dir, _db) = sled_dir();
        std::fs::remove_dir_all(dir.path().join(BLOB_DIR)).expect("remove");
        let err = DiskSync::open(dir.path()).expect_err("no blobs dir");
        assert!(err.to_string().contains(BLOB_DIR), "{err}");
    }
}
