//! [`SledStore`]: the embedded implementation of [`BrokerStore`] on sled 0.34.
//!
//! - `codec`: binary encoding of the message record and of index keys.
//! - `tx`: inside one transaction — index maintenance derived from the record,
//!   receipts, lifecycle transitions.
//! - `ops`: each broker operation as synchronous sled transactions.
//! - `writer`: the single writer thread; merges consecutive changes into one
//!   transaction.
//! - `flusher`: the group-commit flusher thread.
//! - [`failpoint`]: test-only crash points and disk faults of a broker process
//!   (`TRMX_BROKER_FAILPOINT`, `TRMX_BROKER_FAULT_FILE`), read once at open.
//! - this file: opening, the async layer (changes on the writer thread, reads
//!   on `spawn_blocking`, then wait for the shared flush), wake-ups, and the
//!   priority (nice value) of the writer and flusher threads.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ::sled::Transactional as _;
use tokio::sync::broadcast;
use trmx_proto::{MessageId, ParticipantId};

pub use self::audit::{audit_records_offline, tamper_audit_record, verify_audit_offline};
pub use self::compact::{CompactReport, compact_offline, dir_bytes};
use self::failpoint::{FailPoints, Point};
pub use self::flusher::FaultSwitch;
use self::flusher::Flusher;
#[cfg(test)]
pub(crate) use self::ops::MAX_TIMERS_PER_TICK;
use self::ops::storage;
use self::tx::{TREE_NAMES, Tx, TxResult};
pub use self::verify::{StoreReport, verify_store_offline};
use self::writer::Writer;
use crate::store::audit::{AuditEvent, AuditReport, OperatorAction};
use crate::store::{
    Accepted, AckResult, BrokerStore, ChangeError, Leased, Lifecycle, Millis, NewMessage, Presence,
    PurgeResult, QueueStats, RedriveResult, RejectResult, Released, SearchFilter, SearchPage,
    StatusRecord, StoreError, StreamEnd, StreamId, SubmitOutcome, TickError, TickReport,
    WithdrawResult,
};

mod audit;
mod codec;
mod compact;
pub mod failpoint;
mod flusher;
mod ops;
mod presence;
mod tx;
mod verify;
mod writer;

/// Format marker stored in the `meta` tree.
const FORMAT: &[u8] = b"trmx-broker-store/1";
/// The `meta` key of [`BrokerStore::mark_running`]'s instant (8 bytes, big-endian ms).
const RUNNING_KEY: &[u8] = b"running_at";
/// Lease attempts when every candidate was settled meanwhile.
const LEASE_ATTEMPTS: usize = 3;
/// Capacity of the wake-up channel.
const WAKEUP_CAPACITY: usize = 1024;

/// Tuning of the sled database.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled page-cache size in bytes (sled's own default is 1 GiB; set it).
    pub cache_capacity_bytes: u64,
    /// Told how long each flush (fsync) took — for the flush-latency metric.
    pub flush_observer: Option<FlushObserver>,
    /// Nice value of the writer and flusher threads (0: leave it as is).
    /// Every change passes through them in order: on a busy machine, giving
    /// them a core first (nice -8) gave about 5% more end-to-end throughput
    /// and a lower p99 at 5,000 msgs/s (7.7–8.8 vs 9.4–11.5 ms) in
    /// alternating `trmx-bench --writer-nice` runs on 2 cores.
    pub writer_nice: i32,
}

/// A callback told the duration of every flush; it runs on the flusher
/// thread, so it must be quick (e.g. a histogram observation).
#[derive(Clone)]
pub struct FlushObserver(pub Arc<dyn Fn(std::time::Duration) + Send + Sync>);

impl fmt::Debug for FlushObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FlushObserver")
    }
}

impl Default for SledOptions {
    fn default() -> Self {
        Self {
            flush_observer: None,
            cache_capacity_bytes: 16 * 1024 * 1024,
            writer_nice: 0,
        }
    }
}

/// The broker's store on an embedded sled database.
///
/// Trees (all keys big-endian, `seq` = `broker_seq`, a participant id in a key
/// is followed by a 0 byte):
///
/// | tree | key → value |
/// |---|---|
/// | `records` | seq → message record (metadata, then the payload while it is kept) |
/// | `payloads` | seq → payload bytes (only records written before payloads moved into the record) |
/// | `by_id` | message id → seqs (ack / reject / operator by id; with the record's sender: idempotency, status, withdraw) |
/// | `queue` | recipient, priority, seq → () — due for delivery, lease order |
/// | `leased` | seq → ack deadline, stream id, attempt, delivery time — the lease of an IN_FLIGHT message |
/// | `timers` | at, kind, seq → () — backoff end, expiry, retentions |
/// | `dead` | seq → () — EXPIRED and DEAD_LETTERED records |
/// | `counters` | `r`+recipient → depth, in flight, bytes; `s`+sender → queued bytes |
/// | `backoff` | recipient, seq → () — ACCEPTED and backing off before a redelivery (with `queue` and `leased`: a recipient's oldest unacknowledged message) |
/// | `meta` | `format` → store format; `seq_floor` → added to sled's id generator for new seqs (written by `store compact`, see `compact.rs`); `backoff_indexed` → `backoff` is complete and in step: the `running_at` of the run that last kept it, written with it (stores written before it, or run by an earlier version since, are indexed at open); `unusable_payloads_dropped` → no expired receipt or rejected message keeps its payload (the same kind of mark: stores written before, or run by an earlier version since, have them deleted at open) |
/// | `presence` | participant id → last seen, certificate not_after (operator gauges; written outside the message transactions) |
///
/// # Invariants
/// - Every index entry, timer and counter is a function of one record; every
///   change writes the record and exactly those entries in ONE sled
///   transaction (`tx::Tx::put`), together with any receipt it causes. So after
///   a crash the trees agree with each other.
/// - A leased (IN_FLIGHT) message is its stored due ACCEPTED record plus its
///   `leased` entry: a lease does not rewrite the record (with its payload);
///   reading a record applies the entry. The lease deadlines are read from
///   the whole `leased` tree, which holds only messages in flight.
///   (Stores written before kept the record IN_FLIGHT with an `inflight`
///   entry and a `Lease` timer, or a `leases` entry by deadline: `recover`
///   empties those trees at start-up; a left-over `Lease` timer goes stale.)
/// - A record is in `queue` iff it is ACCEPTED and not backing off; it has a
///   `Due` timer and a `backoff` entry iff ACCEPTED and backing off; it has a
///   `leased` entry iff IN_FLIGHT; it has an `Expiry` timer iff ACCEPTED or
///   IN_FLIGHT; it is in `dead` iff EXPIRED or DEAD_LETTERED. (So a message
///   delivered and acknowledged at its first attempt writes no `backoff`
///   entry: the operator's oldest-message age costs the hot path nothing.)
/// - A payload exists (with its record, or in `payloads` for old records) iff `payload_kept`: from submit until ACKNOWLEDGED /
///   WITHDRAWN / PURGED, or until the dead-letter retention of an EXPIRED /
///   DEAD_LETTERED message passed (none is kept for a message that can never be
///   redriven: a rejected one, an expired receipt). The metadata of a final message is deleted
///   after `max(metadata_retention, dead_letter_retention)` (retention only for
///   ACKNOWLEDGED / WITHDRAWN / PURGED).
/// - `counters` hold the payload bytes of ACCEPTED + IN_FLIGHT messages per
///   sender (the quota) and per recipient, and the per-recipient depth and
///   in-flight counts.
/// - A message is leased to at most one stream (leases are serialised and
///   re-checked inside the transaction).
/// - No answer is given before the change is flushed: every operation waits for
///   a flush that started after its transaction committed. After a failed
///   flush, no write is attempted until a flush succeeds again.
/// - Time comes only from the `now` arguments.
/// - Nothing in memory grows with the backlog: queues, timers and indexes are
///   sled trees; only the sled page cache (`cache_capacity_bytes`) holds data.
/// - sled holds what a transaction read until it commits, and a record
///   carries its payload: the batches (tick, requeues, compaction) and the
///   changes by id (`Ack`, `Reject`, `Withdraw`) read at most
///   `ops::BATCH_READ_BYTES` of records per transaction, or one id's records
///   when larger, and the writer merges the latter only up to that together.
///   So an `Ack` of many large messages is applied in several transactions,
///   each message's change in one.
pub struct SledStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// The database and its trees, used by the writer thread and by reads.
pub(super) struct Core {
    trees: Vec<::sled::Tree>,
    /// Last seen and certificate expiry per participant (`presence.rs`).
    presence: ::sled::Tree,
    /// The store's format, seq floor and [`RUNNING_KEY`].
    meta: ::sled::Tree,
    /// Added to sled's id generator for new seqs (`compact.rs`).
    seq_floor: u64,
    life: Lifecycle,
    /// Queued messages found damaged by a lease (`ops::Leases::damaged`):
    /// passed by from then on. Few, and forgotten at a restart.
    unleasable: std::sync::Mutex<HashSet<u64>>,
    /// Damaged records the queue figures (read at every metrics scrape) have
    /// logged already: each is logged there once per process, not at every
    /// scrape (see `ops::Core::waiting`). At most `ops::DAMAGED_REMEMBERED`.
    damaged_logged: std::sync::Mutex<HashSet<u64>>,
    /// The most records one batch transaction of `ops` read (tests only).
    #[cfg(test)]
    largest_batch: std::sync::atomic::AtomicUsize,
    /// The most bytes of records and payloads one transaction read, as it read
    /// them (`Tx::record`, `Tx::payload`; tests only): what sled held at once.
    #[cfg(test)]
    largest_read: std::sync::atomic::AtomicU64,
}

/// Everything behind a [`SledStore`]. Field order is drop order: the
/// writer finishes its jobs, then the flusher its flushes, then sled closes.
struct Inner {
    writer: Writer,
    flusher: Flusher,
    core: Arc<Core>,
    faults: FaultSwitch,
    closed: AtomicBool,
    wakeups: broadcast::Sender<ParticipantId>,
    path: PathBuf,
    failpoints: FailPoints,
}

impl SledStore {
    /// Opens (or creates) the store in directory `path`. Blocking: call it at
    /// start-up (or inside `spawn_blocking`). Fails with [`StoreError::Open`]
    /// when the directory is locked by another broker process, not writable,
    /// or holds data of another format.
    pub fn open(path: &Path, opts: SledOptions, lifecycle: Lifecycle) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        pin_malloc_mmap_threshold();
        trmx_durable::private_dir(path).map_err(|e| open_err(e.to_string()))?;
        let config = ::sled::Config::new()
            .path(path)
            .cache_capacity(opts.cache_capacity_bytes)
            .mode(::sled::Mode::HighThroughput)
            .flush_every_ms(None);
        let db = trmx_durable::open_sled(&config).map_err(|e| open_err(describe_open_error(&e)))?;
        let meta = db.open_tree("meta").map_err(|e| open_err(e.to_string()))?;
        match meta.get("format").map_err(|e| open_err(e.to_string()))? {
            Some(format) if format.as_ref() != FORMAT => {
                return Err(open_err(format!(
                    "unknown data format {:?} (expected {:?})",
                    String::from_utf8_lossy(&format),
                    String::from_utf8_lossy(FORMAT)
                )));
            }
            Some(_) => {}
            None => {
                meta.insert("format", FORMAT)
                    .map_err(|e| open_err(e.to_string()))?;
                trmx_durable::flush_sled(&db).map_err(|e| open_err(describe_open_error(&e)))?;
            }
        }
        let seq_floor = compact::seq_floor(&meta).map_err(|e| open_err(e.to_string()))?;
        let trees = TREE_NAMES
            .iter()
            .map(|name| db.open_tree(name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| open_err(e.to_string()))?;
        ops::index_backoff(&trees, &meta).map_err(|e| open_err(e.to_string()))?;
        let presence = db
            .open_tree(presence::TREE)
            .map_err(|e| open_err(e.to_string()))?;
        let faults = FaultSwitch::default();
        let failpoints = FailPoints::from_env().map_err(&open_err)?;
        failpoint::watch_fault_file(&faults).map_err(&open_err)?;
        let sync = trmx_durable::DiskSync::open(path)
            .map_err(|e| open_err(format!("cannot sync the store's files: {e}")))?;
        let flusher = Flusher::start(
            db.clone(),
            sync,
            faults.clone(),
            opts.flush_observer.clone(),
            opts.writer_nice,
        )
        .map_err(|e| open_err(format!("cannot start the flusher thread: {e}")))?;
        let core = Arc::new(Core {
            trees,
            presence,
            meta,
            seq_floor,
            life: lifecycle,
            unleasable: Default::default(),
            damaged_logged: Default::default(),
            #[cfg(test)]
            largest_batch: Default::default(),
            #[cfg(test)]
            largest_read: Default::default(),
        });
        core.drop_unusable_payloads()
            .map_err(|e| open_err(e.to_string()))?;
        let writer = Writer::start(Arc::clone(&core), opts.writer_nice)
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        let (wakeups, _) = broadcast::channel(WAKEUP_CAPACITY);
        tracing::info!(path = %path.display(), cache_bytes = opts.cache_capacity_bytes, "store opened");
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                flusher,
                core,
                faults,
                closed: AtomicBool::new(false),
                wakeups,
                path: path.to_owned(),
                failpoints,
            }),
        })
    }

    /// The switch that makes flushes fail like a full disk (storage-fault tests).
    pub fn fault_switch(&self) -> FaultSwitch {
        self.inner.faults.clone()
    }

    /// The lifecycle parameters in force.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.inner.core.life
    }

    /// Refuses writes on a closed store, and after a failed flush until a
    /// new flush succeeds.
    async fn ready(&self) -> Result<(), StoreError> {
        self.inner.ready().await
    }

    /// Runs the read `op` on a blocking thread.
    async fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Core) -> Result<T, StoreError> + Send + 'static,
    {
        let core = Arc::clone(&self.inner.core);
        tokio::task::spawn_blocking(move || op(&core))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }

    /// Applies the change `op` inside a transaction on the writer thread
    /// (merged with other changes), waits until it is durable, then wakes
    /// the recipients it made messages due for ([`to_completion`]: also when
    /// the caller goes away meanwhile).
    async fn change<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Tx<'_>) -> TxResult<(T, BTreeSet<ParticipantId>)> + Send + 'static,
    {
        self.ready().await?;
        let inner = Arc::clone(&self.inner);
        to_completion(async move {
            let (value, wake) = inner.writer.transaction(op).await?;
            inner.durable_then_wake(wake).await?;
            Ok(value)
        })
        .await
    }

    /// [`Self::change`], but a write applied whose flush then failed comes back with
    /// the error ([`ChangeError::committed`]): the write is kept, and the caller acts on
    /// it at once (a retry would find it done and not act again).
    async fn change_reporting<T, F>(&self, op: F) -> Result<T, ChangeError<T>>
    where
        T: Send + std::fmt::Debug + 'static,
        F: Fn(&Tx<'_>) -> TxResult<(T, BTreeSet<ParticipantId>)> + Send + 'static,
    {
        self.change_planned(|_| Ok(Vec::new()), move |tx, _| op(tx))
            .await
    }

    /// [`Self::change_reporting`] of a change by id: `plan` runs on the writer
    /// thread, against the committed trees, and says which records `op` reads
    /// in its transaction ([`Core::plan`]; its parts are run as one), which
    /// shares a transaction only up to `ops::BATCH_READ_BYTES` read with others.
    async fn change_planned<T, P, F>(&self, plan: P, op: F) -> Result<T, ChangeError<T>>
    where
        T: Send + std::fmt::Debug + 'static,
        P: FnOnce(&Core) -> Result<Vec<ops::Part>, StoreError> + Send + 'static,
        F: Fn(&Tx<'_>, &ops::Part) -> TxResult<(T, BTreeSet<ParticipantId>)> + Send + 'static,
    {
        self.ready().await?;
        let inner = Arc::clone(&self.inner);
        to_completion(async move {
            let (value, wake) = inner
                .writer
                .prepared_transaction_reading(
                    move |core, _| {
                        let part = ops::Part::joined(plan(core)?);
                        let bytes = part.bytes;
                        Ok((part, bytes))
                    },
                    op,
                )
                .await?;
            Ok(match inner.durable_then_wake(wake).await {
                Ok(()) => Ok(value),
                Err(error) => Err(ChangeError {
                    committed: Some(value),
                    error,
                }),
            })
        })
        .await?
    }

    /// Like [`Self::change`], for operations that scan before they write:
    /// `op` runs alone on the writer thread.
    async fn change_alone<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Core) -> Result<(T, BTreeSet<ParticipantId>), StoreError> + Send + 'static,
    {
        self.ready().await?;
        let inner = Arc::clone(&self.inner);
        to_completion(async move {
            let (value, wake) = inner.writer.exclusive(op).await?;
            inner.durable_then_wake(wake).await?;
            Ok(value)
        })
        .await
    }

    /// [`Self::change_reporting`] with the test fail points: `after_write` is passed once
    /// the transaction is applied, `after_flush` once it is durable (see [`failpoint`]).
    async fn change_at<T, F>(
        &self,
        after_write: Point,
        after_flush: Option<Point>,
        op: F,
    ) -> Result<T, ChangeError<T>>
    where
        T: Send + std::fmt::Debug + 'static,
        F: Fn(&Tx<'_>) -> TxResult<(T, BTreeSet<ParticipantId>)> + Send + 'static,
    {
        self.ready().await?;
        let inner = Arc::clone(&self.inner);
        to_completion(async move {
            let (value, wake) = inner.writer.transaction(op).await?;
            inner.failpoints.hit(after_write);
            // (a failed flush keeps the write: the next one makes it durable)
            if let Err(error) = inner.durable_then_wake(wake).await {
                return Ok(Err(ChangeError {
                    committed: Some(value),
                    error,
                }));
            }
            if let Some(point) = after_flush {
                inner.failpoints.hit(point);
            }
            Ok(Ok(value))
        })
        .await?
    }
}

impl Inner {
    /// See [`SledStore::ready`].
    async fn ready(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("store closed".to_owned()));
        }
        if !self.flusher.healthy() {
            self.flusher.durable().await?;
        }
        Ok(())
    }

    async fn durable_then_wake(&self, wake: BTreeSet<ParticipantId>) -> Result<(), StoreError> {
        self.flusher.durable().await?;
        for recipient in wake {
            // no receiver is fine: nobody is connected
            let _ = self.wakeups.send(recipient);
        }
        Ok(())
    }
}

/// Runs `work` (a change, its flush and its wake-ups) in a task of its own and
/// waits for it. The caller may go away while it waits: a client whose deadline
/// passed, or who hung up, has its handler dropped wherever it awaits. The change
/// is applied all the same (the writer thread does not know), and becomes durable
/// with the next flush; but the wake-up of the recipients it made messages due
/// for would go with the caller, and a recipient's idle stream would sleep until
/// something unrelated woke it — while the sender's retry, a duplicate, wakes
/// nobody. A panic of `work` is the caller's, as before, and so is its span.
async fn to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::spawn(tracing::Instrument::in_current_span(work)).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StoreError::Unavailable(format!("store task failed: {e}"))),
    }
}

/// sled allocates a fresh 512 KiB I/O buffer for every flush. With glibc's
/// *dynamic* mmap threshold, the first such buffer freed raises the threshold
/// and later ones are carved from the heap, which then fragments: measured,
/// RSS grows with the number of flushes to ~240 MiB (64 MiB cache) instead of
/// ~110 MiB with the threshold pinned. Pinning it (to glibc's own default,
/// 128 KiB) turns the dynamic adjustment off; it is process-wide and harmless
/// for everything else.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn pin_malloc_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning; it is thread-safe and
    // has no memory-safety preconditions.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    if ok != 1 {
        tracing::warn!("could not pin the malloc mmap threshold");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn pin_malloc_mmap_threshold() {}

/// Gives the calling thread the nice value `nice` (0: leaves it alone); logs
/// why not if that is not permitted, and the thread runs on as it was.
fn apply_thread_nice(thread: &str, nice: i32) {
    if nice == 0 {
        return;
    }
    if let Err(error) = set_thread_nice(nice) {
        tracing::warn!(
            thread,
            nice,
            %error,
            "cannot set the store thread's priority (store.writer_nice); it runs at the \
             broker's. Grant CAP_SYS_NICE or RLIMIT_NICE (systemd: LimitNICE=), or set \
             store.writer_nice = 0"
        );
    }
}

/// Sets the nice value of the calling thread. On Linux the nice value is a
/// thread's own (setpriority(2), NOTES), so the other threads keep theirs.
/// Raising it is always allowed; lowering it below 0 needs CAP_SYS_NICE or
/// RLIMIT_NICE.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take plain integers, touch no memory of
    // ours and are thread-safe.
    let done = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_thread_nice(_nice: i32) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "per-thread nice values are Linux-only",
    ))
}

/// What an operator reads when the data directory cannot be opened.
///
/// sled 0.34 reports a failed directory lock as `could not acquire lock on "<path>":
/// <the OS error in Rust's debug form>` (an `Other` I/O error): that text is told as a
/// sentence instead, so that `trmx-broker run`, `store verify` and `store compact` say
/// what to do rather than print `Os { code: 11, kind: WouldBlock, .. }`.
fn describe_open_error(e: &::sled::Error) -> String {
    const LOCKED: &str = "the data directory is locked by another process (is a broker running on it? stop it first)";
    let ::sled::Error::Io(io) = e else {
        return e.to_string();
    };
    let text = io.to_string();
    let lock_failed = text.starts_with("could not acquire lock");
    if io.kind() == std::io::ErrorKind::WouldBlock || (lock_failed && text.contains("WouldBlock")) {
        return LOCKED.to_owned();
    }
    if lock_failed {
        return format!(
            "cannot lock the data directory: {}",
            debug_os_message(&text).unwrap_or("the operating system refused the lock")
        );
    }
    match io.kind() {
        std::io::ErrorKind::PermissionDenied => format!("the data directory is not writable: {io}"),
        _ => text,
    }
}

/// The `message: "…"` of an `io::Error` printed in Rust's debug form inside `text`.
fn debug_os_message(text: &str) -> Option<&str> {
    let start = text.find("message: \"")? + "message: \"".len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// [`RUNNING_KEY`] in `meta`.
fn last_running(meta: &::sled::Tree) -> Result<Option<Millis>, StoreError> {
    meta.get(RUNNING_KEY)
        .map_err(storage)?
        .map(|value| decode_running(&value))
        .transpose()
}

/// The stored value of [`RUNNING_KEY`].
fn decode_running(value: &[u8]) -> Result<Millis, StoreError> {
    <[u8; 8]>::try_from(value)
        .map(Millis::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("meta: running_at is not 8 bytes".to_owned()))
}

/// Records `now` as the last run of the stopped broker whose store is in `path`, so that
/// its next start accepts the system clock (see `lifecycle.max_downtime`), and appends
/// to the audit log, in the same transaction, that `operator` did so (with the instant
/// recorded before and `now`): moving the store's time changes what expires at the next
/// start. Returns the instant recorded before, if any. Durable when it returns.
pub fn accept_clock_offline(
    path: &Path,
    now: Millis,
    operator: &str,
) -> Result<Option<Millis>, StoreError> {
    let db = audit::open_existing(path)?;
    // the audit trees at their `Tx` indexes, then `meta`
    let mut trees = TREE_NAMES
        .iter()
        .map(|name| db.open_tree(name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(storage)?;
    let meta_at = trees.len();
    trees.push(db.open_tree("meta").map_err(storage)?);
    let seq_floor = compact::seq_floor(&trees[meta_at])?;
    let life = Lifecycle::default();
    let result = trees
        .as_slice()
        .transaction(|t: &Vec<::sled::transaction::TransactionalTree>| {
            let before = match t[meta_at]
                .get(RUNNING_KEY)?
                .map(|value| decode_running(&value))
                .transpose()
            {
                Ok(before) => before,
                Err(e) => return tx::abort(e),
            };
            // the marks of the one-time passes (the `backoff` index, the
            // deletion of unusable payloads) stay in step if they were: a store
            // of an earlier version, or one it ran on, has them done at the
            // start, and one this version ran on must not have them done again
            let running = t[meta_at]
                .get(RUNNING_KEY)?
                .map(|running| running.to_vec())
                .unwrap_or_default();
            let mut in_step = Vec::new();
            for key in [ops::BACKOFF_INDEXED_KEY, ops::UNUSABLE_PAYLOADS_DROPPED_KEY] {
                if t[meta_at].get(key)?.is_some_and(|mark| mark == running) {
                    in_step.push(key);
                }
            }
            t[meta_at].insert(RUNNING_KEY, &now.to_be_bytes()[..])?;
            for key in in_step {
                t[meta_at].insert(key, &now.to_be_bytes()[..])?;
            }
            let tx = Tx {
                t: &t[..meta_at],
                life: &life,
                seq_floor,
                audit_block: Default::default(),
                #[cfg(test)]
                read: Default::default(),
            };
            tx.audit(
                now,
                AuditEvent::Operator(OperatorAction::AcceptClock {
                    operator: operator.to_owned(),
                    recorded_before: before,
                    accepted: now,
                }),
            )?;
            tx.finish_audit()?;
            Ok(before)
        });
    let before = match result {
        Ok(before) => before,
        Err(::sled::transaction::TransactionError::Abort(e)) => return Err(e),
        Err(::sled::transaction::TransactionError::Storage(e)) => return Err(storage(e)),
    };
    trmx_durable::flush_sled(&db).map_err(storage)?;
    trmx_durable::DiskSync::open(path).map_err(|e| StoreError::Open {
        path: path.display().to_string(),
        reason: format!("cannot sync the store's files: {e}"),
    })?;
    Ok(before)
}

#[tonic::async_trait]
impl BrokerStore for SledStore {
    async fn submit(
        &self,
        msg: NewMessage,
        now: Millis,
    ) -> Result<SubmitOutcome, ChangeError<SubmitOutcome>> {
        self.change_at(
            Point::AfterWriteBeforeFlush,
            Some(Point::AfterFlushBeforeReply),
            move |tx| tx.submit(&msg, now),
        )
        .await
    }

    async fn lease(
        &self,
        recipient: &ParticipantId,
        stream: StreamId,
        max: usize,
        max_bytes: u64,
        now: Millis,
    ) -> Result<Vec<Leased>, StoreError> {
        let recipient = recipient.clone();
        // A lease is not waited on to be durable: a crash undoes it and
        // `recover` makes the message due again (at least once). It becomes
        // durable with the next flush anyone waits for (the ack's at the latest).
        self.ready().await?;
        // A candidate can be settled by an earlier job of the same batch
        // (ack after a timeout, withdraw): then look again rather than
        // answer "nothing due" while the queue holds more. A look that found
        // damaged messages does not count: they are passed by from then on,
        // so each look gets further down the queue.
        let mut attempts = 0;
        while attempts < LEASE_ATTEMPTS {
            let (scan_for, lease_for) = (recipient.clone(), recipient.clone());
            let (leases, had_candidates) = self
                .inner
                .writer
                .prepared_transaction(
                    move |core, claimed| core.lease_candidates(&scan_for, max, claimed),
                    move |tx, candidates| {
                        let leases =
                            tx.lease(&lease_for, stream, candidates, max, max_bytes, now)?;
                        Ok((leases, !candidates.is_empty()))
                    },
                )
                .await?;
            if leases.damaged.is_empty() {
                attempts += 1;
            } else {
                self.inner
                    .core
                    .unleasable
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .extend(leases.damaged);
            }
            if !leases.leased.is_empty() || !had_candidates {
                return Ok(leases.leased);
            }
        }
        Ok(Vec::new())
    }

    async fn ack(
        &self,
        recipient: &ParticipantId,
        ids: &[MessageId],
        now: Millis,
    ) -> Result<Vec<AckResult>, ChangeError<Vec<AckResult>>> {
        self.ready().await?;
        let inner = Arc::clone(&self.inner);
        let (recipient, ids) = (recipient.clone(), ids.to_vec());
        // Planned on the writer thread, one record at a time (`Core::plan`), and
        // applied in parts of at most `BATCH_READ_BYTES` of records: the part
        // that planned it first, each later one in a transaction of its own.
        // Each message's change is atomic with its receipt, and the answer
        // waits for the flush of them all (there is none between parts): a
        // crash between two parts may leave the earlier ones applied, which the
        // node's repeat of the whole ack (it had no answer) finds ACKNOWLEDGED,
        // as a repeated ack does.
        to_completion(async move {
            let planning = recipient.clone();
            let applying = recipient.clone();
            let (mut results, mut wake, rest) = inner
                .writer
                .prepared_transaction_reading(
                    move |core, _| {
                        let mut parts = core.plan(&ids, ops::ackable(&planning))?;
                        let bytes = parts.first().map_or(0, |p| p.bytes);
                        // (the first part is run here, the others after it)
                        let rest = parts.split_off(1.min(parts.len()));
                        Ok(((parts, rest), bytes))
                    },
                    move |tx, (first, rest)| {
                        let (mut results, mut wake) = (Vec::new(), BTreeSet::new());
                        for part in first {
                            let (r, w) = tx.ack(&applying, part, now)?;
                            results.extend(r);
                            wake.extend(w);
                        }
                        Ok((results, wake, rest.clone()))
                    },
                )
                .await?;
            inner.failpoints.hit(Point::DuringAck);
            for part in rest {
                let applied = match inner.ready().await {
                    Ok(()) => {
                        let recipient = recipient.clone();
                        inner
                            .writer
                            .transaction_reading(part.bytes, move |tx| {
                                tx.ack(&recipient, &part, now)
                            })
                            .await
                    }
                    Err(e) => Err(e),
                };
                match applied {
                    Ok((r, w)) => {
                        results.extend(r);
                        wake.extend(w);
                    }
                    Err(e) => {
                        // the receipts of the parts applied go to their senders
                        // all the same, once durable; the node repeats the ack
                        let _ = inner.durable_then_wake(wake).await;
                        return Ok(Err(ChangeError {
                            committed: Some(results),
                            error: e,
                        }));
                    }
                }
                inner.failpoints.hit(Point::DuringAck);
            }
            // (a failed flush keeps the writes: the next one makes them durable)
            Ok(match inner.durable_then_wake(wake).await {
                Ok(()) => Ok(results),
                Err(error) => Err(ChangeError {
                    committed: Some(results),
                    error,
                }),
            })
        })
        .await?
    }

    async fn reject(
        &self,
        recipient: &ParticipantId,
        id: MessageId,
        reason_code: &str,
        field_path: &str,
        now: Millis,
    ) -> Result<RejectResult, ChangeError<RejectResult>> {
        let recipient = recipient.clone();
        let reason_code = reason_code.to_owned();
        let field_path = field_path.to_owned();
        let planning = recipient.clone();
        self.change_planned(
            move |core| core.plan(&[id], ops::rejectable(&planning)),
            move |tx, part| tx.reject(&recipient, part, &reason_code, &field_path, now),
        )
        .await
    }

    async fn resubmitted(
        &self,
        sender: &ParticipantId,
        id: MessageId,
        fingerprint: [u8; 32],
    ) -> Result<Option<Accepted>, StoreError> {
        let sender = sender.clone();
        let found = self
            .read(move |core| core.identical(&sender, id, &fingerprint))
            .await?;
        let Some(accepted) = found else {
            return Ok(None);
        };
        // The first submit may have committed it without its flush having
        // finished yet (or failed): answer only once it is durable.
        self.ready().await?;
        self.inner.flusher.durable().await?;
        Ok(Some(accepted))
    }

    fn writes_durable(&self) -> bool {
        !self.inner.closed.load(Ordering::SeqCst) && self.inner.flusher.healthy()
    }

    async fn release_stream(
        &self,
        recipient: &ParticipantId,
        stream: StreamId,
        end: StreamEnd,
        now: Millis,
    ) -> Result<Released, ChangeError<Released>> {
        let recipient = recipient.clone();
        let on = ops::Requeue::Stream {
            recipient,
            stream,
            failed_attempt: end == StreamEnd::Recipient,
        };
        self.ready().await?;
        let inner = Arc::clone(&self.inner);
        // Like `change_alone`, but what was committed before a failure (of a later
        // batch, or of the flush) is reported with the error, as `tick` does.
        to_completion(async move {
            let (released, wake, applied) = inner
                .writer
                .exclusive(move |core| Ok(core.requeue_in_flight_partly(&on, now)))
                .await?;
            Ok(match inner.durable_then_wake(wake).await.and(applied) {
                Ok(()) => Ok(released),
                Err(error) => Err(ChangeError {
                    committed: Some(released),
                    error,
                }),
            })
        })
        .await?
    }

    async fn withdraw(
        &self,
        sender: &ParticipantId,
        id: MessageId,
        now: Millis,
    ) -> Result<WithdrawResult, ChangeError<WithdrawResult>> {
        let sender = sender.clone();
        let planning = sender.clone();
        self.change_planned(
            move |core| core.plan(&[id], ops::sent_by(&planning)),
            move |tx, part| Ok((tx.withdraw(&sender, part, now)?, BTreeSet::new())),
        )
        .await
    }

    async fn status(
        &self,
        sender: &ParticipantId,
        id: MessageId,
    ) -> Result<Option<StatusRecord>, StoreError> {
        let sender = sender.clone();
        self.read(move |core| core.status(&sender, id)).await
    }

    async fn tick(&self, now: Millis) -> Result<TickReport, TickError> {
        self.ready().await?;
        let inner = Arc::clone(&self.inner);
        // Like `change_alone`, but what was committed before a failure (of a
        // later transaction, or of the flush) is reported with the error.
        to_completion(async move {
            let (report, wake, applied) = inner
                .writer
                .exclusive(move |core| {
                    let (mut report, wake, applied) = core.tick(now);
                    // A failing audit retention must not fail the tick: the
                    // timers it applied are committed.
                    if applied.is_ok() {
                        report.audit_prune_error =
                            core.audit_prune(now).err().map(|e| e.to_string());
                    }
                    Ok((report, wake, applied))
                })
                .await?;
            // (a failed flush first: it is the one that stops the submits)
            let result = match inner.durable_then_wake(wake).await.and(applied) {
                Ok(()) => Ok(report),
                Err(error) => Err(TickError {
                    applied: Box::new(report),
                    error,
                }),
            };
            Ok(result)
        })
        .await?
    }

    async fn next_timer(&self) -> Result<Option<Millis>, StoreError> {
        self.read(Core::next_timer).await
    }

    async fn last_running(&self) -> Result<Option<Millis>, StoreError> {
        self.read(|core| last_running(&core.meta)).await
    }

    async fn mark_running(&self, now: Millis) -> Result<(), StoreError> {
        self.change_alone(move |core| {
            // with the mark of the `backoff` index, which this version keeps in
            // step (`ops::backoff_indexed`), in one atomic batch
            let mut batch = ::sled::Batch::default();
            batch.insert(RUNNING_KEY, &now.to_be_bytes()[..]);
            batch.insert(ops::BACKOFF_INDEXED_KEY, &now.to_be_bytes()[..]);
            // and of the one-time deletion of unusable payloads, which this
            // version never keeps (`ops::UNUSABLE_PAYLOADS_DROPPED_KEY`)
            batch.insert(ops::UNUSABLE_PAYLOADS_DROPPED_KEY, &now.to_be_bytes()[..]);
            core.meta.apply_batch(batch).map_err(storage)?;
            Ok(((), BTreeSet::new()))
        })
        .await
    }

    async fn recover(&self, now: Millis) -> Result<u64, StoreError> {
        self.change_alone(move |core| {
            let (released, mut wake) = core.requeue_in_flight(&ops::Requeue::Restart, now)?;
            let (_, woken) = core.shorten_backoffs(now)?;
            wake.extend(woken);
            Ok((released, wake))
        })
        .await
        .map(|released| released.requeued)
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        self.read(Core::queue_stats).await
    }

    async fn purge(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
        reason: &str,
        now: Millis,
    ) -> Result<PurgeResult, ChangeError<PurgeResult>> {
        let (sender, reason) = (sender.cloned(), reason.to_owned());
        self.change_reporting(move |tx| tx.purge(id, sender.as_ref(), &reason, now))
            .await
    }

    async fn redrive(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
        now: Millis,
    ) -> Result<RedriveResult, ChangeError<RedriveResult>> {
        let sender = sender.cloned();
        self.change_reporting(move |tx| tx.redrive(id, sender.as_ref(), now))
            .await
    }

    async fn dead_letters(
        &self,
        limit: usize,
        after_seq: Option<u64>,
    ) -> Result<SearchPage, StoreError> {
        self.read(move |core| core.dead_letters(limit, after_seq))
            .await
    }

    async fn search(&self, filter: SearchFilter) -> Result<SearchPage, StoreError> {
        self.read(move |core| core.search(&filter)).await
    }

    async fn audit_append_operator(
        &self,
        action: OperatorAction,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.change(move |tx| {
            tx.audit(now, AuditEvent::Operator(action.clone()))?;
            Ok(((), BTreeSet::new()))
        })
        .await
    }

    async fn audit_verify(&self) -> Result<AuditReport, StoreError> {
        self.read(Core::audit_verify).await
    }

    // The action's audit record names the id; the lifecycle record the purge or
    // redrive writes with it names the sender of the message it changed.
    async fn operator_purge(
        &self,
        operator: &str,
        id: MessageId,
        sender: Option<&ParticipantId>,
        reason: &str,
        now: Millis,
    ) -> Result<PurgeResult, ChangeError<PurgeResult>> {
        let action = OperatorAction::Purge {
            operator: operator.to_owned(),
            message_id: id,
            reason: reason.to_owned(),
        };
        let (sender, reason) = (sender.cloned(), reason.to_owned());
        self.change_reporting(move |tx| {
            tx.audit(now, AuditEvent::Operator(action.clone()))?;
            tx.purge(id, sender.as_ref(), &reason, now)
        })
        .await
    }

    async fn operator_redrive(
        &self,
        operator: &str,
        id: MessageId,
        sender: Option<&ParticipantId>,
        now: Millis,
    ) -> Result<RedriveResult, ChangeError<RedriveResult>> {
        let action = OperatorAction::Redrive {
            operator: operator.to_owned(),
            message_id: id,
        };
        let sender = sender.cloned();
        self.change_reporting(move |tx| {
            tx.audit(now, AuditEvent::Operator(action.clone()))?;
            tx.redrive(id, sender.as_ref(), now)
        })
        .await
    }

    async fn save_presence(&self, seen: Vec<Presence>) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.change_alone(move |core| {
            core.save_presence(&seen)?;
            Ok(((), BTreeSet::new()))
        })
        .await
    }

    async fn presence(&self) -> Result<Vec<Presence>, StoreError> {
        self.read(Core::presence).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        // joining the writer thread blocks: it finishes the queued changes first
        tokio::task::spawn_blocking(move || inner.writer.stop())
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?;
        let flushed = self.inner.flusher.durable().await;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.flusher.stop())
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?;
        tracing::info!(path = %self.inner.path.display(), ok = flushed.is_ok(), "store closed");
        flushed
    }

    fn wakeups(&self) -> broadcast::Receiver<ParticipantId> {
        self.inner.wakeups.subscribe()
    }
}

#[cfg(test)]
impl SledStore {
    /// How many of sled's blob files (large values) the flushes synced.
    pub(crate) fn blob_files_synced(&self) -> u64 {
        self.inner.flusher.blob_files_synced()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// sled's lock error as sled 0.34 builds it (`config.rs`).
    fn sled_lock_error(os: std::io::Error) -> ::sled::Error {
        ::sled::Error::Io(std::io::Error::other(format!(
            "could not acquire lock on {:?}: {:?}",
            "/var/lib/trmx/broker/db", os
        )))
    }

    #[test]
    fn a_held_lock_is_told_as_a_sentence_without_debug_text() {
        let held = sled_lock_error(std::io::Error::from_raw_os_error(libc::EWOULDBLOCK));
        let told = describe_open_error(&held);
        assert!(told.contains("locked by another process"), "{told}");
        assert!(!told.contains("Os {") && !told.contains("kind:"), "{told}");

        let refused = sled_lock_error(std::io::Error::from_raw_os_error(libc::EACCES));
        let told = describe_open_error(&refused);
        assert_eq!(told, "cannot lock the data directory: Permission denied");
    }

    /// The nice value of a thread, from /proc/self/task/TID/stat (field 19).
    fn nice_of(stat_path: &Path) -> Option<i32> {
        let stat = std::fs::read_to_string(stat_path).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        fields.get(16)?.parse().ok()
    }

    fn own_nice() -> i32 {
        nice_of(Path::new("/proc/thread-self/stat")).expect("own nice value")
    }

    /// Nice values of this process's threads named `name` (the kernel keeps
    /// the first 15 bytes of a thread name).
    fn nices_of_threads(name: &str) -> Vec<i32> {
        let shown = &name[..name.len().min(15)];
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task")
            .expect("task list")
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == shown
                && let Some(nice) = nice_of(&task.path().join("stat"))
            {
                out.push(nice);
            }
        }
        out
    }

    #[test]
    fn a_thread_nice_value_is_the_threads_own() {
        let before = own_nice();
        if before >= 19 {
            return; // cannot go lower than the lowest priority
        }
        let inside = std::thread::spawn(move || {
            set_thread_nice(before + 1).expect("raising the nice value is always allowed");
            own_nice()
        })
        .join()
        .expect("thread");
        assert_eq!(inside, before + 1);
        assert_eq!(
            own_nice(),
            before,
            "the calling thread keeps its nice value"
        );
    }

    #[test]
    fn the_writer_and_flusher_threads_run_at_writer_nice() {
        let nice = own_nice() + 1;
        if nice > 19 {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = SledOptions {
            writer_nice: nice,
            ..SledOptions::default()
        };
        let store = SledStore::open(dir.path(), opts, Lifecycle::default()).expect("open");
        // the threads set their own value as they start
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for name in ["trmx-store-write", "trmx-store-flush"] {
            while !nices_of_threads(name).contains(&nice) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name} threads run at {:?}, expected one at {nice}",
                    nices_of_threads(name)
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        drop(store);
    }
}
