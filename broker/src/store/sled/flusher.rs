//! Group commit: one flusher thread makes writes durable for many callers at once.
//!
//! A caller finishes its transaction, then asks for the next flush that
//! *starts* after that moment (`started + 1`) and awaits it. The thread runs
//! one flush at a time; every request that arrives while a flush runs is
//! served by the following one. So N concurrent writers cost about two
//! fsyncs, not N.
//!
//! A flush runs on its own thread (not a caller's task) so that a caller whose
//! future is dropped (client gone) can never leave the flush half done.
//!
//! A flush is sled's `flush` and then [`DiskSync::sync`]: sled alone
//! survives a crash of the process but not a power cut (see `trmx_durable`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::watch;
use trmx_durable::DiskSync;

use crate::store::StoreError;

/// Makes the store's flushes fail like a full disk (storage-fault tests).
/// Clones share the switch.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch(Arc<AtomicBool>);

impl FaultSwitch {
    /// While `true`, every flush fails (and so every write answers
    /// `Unavailable`); set back to `false` and the next flush succeeds.
    pub fn set_failing(&self, failing: bool) {
        self.0.store(failing, Ordering::SeqCst);
    }

    /// Whether flushes currently fail.
    pub fn is_failing(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Progress published by the flusher thread.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Number of the last flush that finished (ok or not).
    finished: u64,
    /// Number of the last flush that succeeded.
    last_ok: u64,
    /// Why the last failed flush failed.
    last_error: String,
    /// The thread has stopped.
    stopped: bool,
}

#[derive(Debug, Default)]
struct Requests {
    /// Highest flush number somebody waits for.
    wanted: u64,
    /// Number of the last flush started.
    started: u64,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    requests: Mutex<Requests>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
    /// Blob files the flushes synced (large values; tests read it).
    blob_files_synced: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Requests> {
        self.requests
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The group-commit flusher of one sled database.
#[derive(Debug)]
pub(super) struct Flusher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    /// Starts the flusher thread for `db`, whose flushes `sync` completes,
    /// with the nice value `nice` (0: unchanged).
    pub(super) fn start(
        db: ::sled::Db,
        sync: DiskSync,
        faults: FaultSwitch,
        observer: Option<super::FlushObserver>,
        nice: i32,
    ) -> std::io::Result<Self> {
        let (progress, _) = watch::channel(Progress::default());
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
            progress,
            blob_files_synced: Default::default(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("trmx-store-flush".to_owned())
            .spawn(move || {
                super::apply_thread_nice("trmx-store-flush", nice);
                // If the thread dies (a panic in sled or the observer), the
                // waiting writers must hear of it, not wait forever.
                let _stopped = StopGuard(&thread_shared);
                run(&thread_shared, &db, sync, &faults, observer.as_ref());
            })?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Waits until everything written before this call is durable.
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
        let mut progress = self.shared.progress.subscribe();
        let target = {
            let mut requests = self.shared.lock();
            if requests.stop {
                return Err(StoreError::Unavailable("store closed".to_owned()));
            }
            let target = requests.started + 1;
            requests.wanted = requests.wanted.max(target);
            target
        };
        self.shared.wake.notify_one();
        let seen = progress
            .wait_for(|p| p.finished >= target || p.stopped)
            .await
            .map_err(|_| StoreError::Unavailable("flusher stopped".to_owned()))?;
        if seen.last_ok >= target {
            Ok(())
        } else if seen.finished >= target {
            Err(StoreError::Unavailable(format!(
                "flush failed: {}",
                seen.last_error
            )))
        } else {
            Err(StoreError::Unavailable("store closed".to_owned()))
        }
    }

    /// Whether the last finished flush succeeded (so new writes may proceed
    /// without first proving the disk works again).
    pub(super) fn healthy(&self) -> bool {
        let p = self.shared.progress.borrow();
        p.last_ok == p.finished && !p.stopped
    }

    /// How many blob files (sled's files for large values) the flushes synced.
    #[cfg(test)]
    pub(super) fn blob_files_synced(&self) -> u64 {
        self.shared.blob_files_synced.load(Ordering::Relaxed)
    }

    /// Stops the thread after the flushes already requested, and waits for it.
    pub(super) fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("store flusher thread panicked");
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Publishes the end of the flusher thread when dropped, also by a panic:
/// the flush under way then counts as failed, and every waiter and every
/// later write is answered `Unavailable` (the store is not healthy again
/// until it is reopened).
struct StopGuard<'a>(&'a Shared);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        if panicked {
            tracing::error!(
                "store flusher thread panicked: the broker refuses writes until restarted"
            );
        }
        let started = {
            let mut requests = self.0.lock();
            requests.stop = true;
            requests.started
        };
        self.0.progress.send_modify(|p| {
            if panicked {
                p.finished = p.finished.max(started);
                p.last_error = "the store's flusher thread panicked".to_owned();
            }
            p.stopped = true;
        });
    }
}

fn run(
    shared: &Shared,
    db: &::sled::Db,
    mut sync: DiskSync,
    faults: &FaultSwitch,
    observer: Option<&super::FlushObserver>,
) {
    loop {
        let number = {
            let mut requests = shared.lock();
            while requests.wanted <= requests.started && !requests.stop {
                requests = shared
                    .wake
                    .wait(requests)
                    .unwrap_or_else(|poison| poison.into_inner());
            }
            if requests.wanted <= requests.started {
                break; // stop requested and nothing left to flush
            }
            requests.started += 1;
            requests.started
        };
        let result = if faults.is_failing() {
            Err("injected storage fault (disk full)".to_owned())
        } else {
            let started = std::time::Instant::now();
            // (in the process's one turn: see `trmx_durable::flush_sled`)
            let result = trmx_durable::flush_sled(db)
                .map_err(|e| e.to_string())
                .and_then(|_| sync.sync().map_err(|e| e.to_string()))
                .map(|synced| {
                    shared
                        .blob_files_synced
                        .fetch_add(synced.blob_files as u64, Ordering::Relaxed);
                });
            if let Some(observer) = observer {
                (observer.0)(started.elapsed());
            }
            result
        };
        if let Err(reason) = &result {
            tracing::error!(error = %reason, "store flush failed");
        }
        shared.progress.send_modify(|p| {
            p.finished = number;
            match result {
                Ok(()) => p.last_ok = number,
                Err(reason) => p.last_error = reason,
            }
        });
    }
}
