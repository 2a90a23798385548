//! The single writer thread: every change of the store runs here, in order.
//!
//! sled serialises transactions behind one process-wide lock anyway, so one
//! thread loses nothing and gains a lot: no lock contention, no pile of
//! blocking threads, and consecutive transactional jobs (submit, ack, reject,
//! withdraw, purge, redrive) are merged into ONE sled transaction, which
//! spreads its fixed cost over the batch — up to `BATCH_READ_BYTES` of
//! stored records read together, as far as the jobs tell ([`run_batch`]);
//! past it the batch goes on in another. Each job stays atomic: a batch
//! commits all its jobs or none; if a batch aborts, its jobs are retried one
//! by one so that only the faulty one fails.
//!
//! The writer only applies changes; the callers then wait for the group-commit
//! flush (`flusher`) before answering.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::Core;
use super::ops::BATCH_READ_BYTES;
use super::tx::{Tx, TxResult};
use crate::store::StoreError;

/// Most jobs merged into one transaction.
const MAX_BATCH: usize = 256;
/// Jobs waiting for the writer (callers wait beyond that: backpressure).
const QUEUE_CAPACITY: usize = 4096;

/// What the jobs of one batch have already picked in their `prepare` step
/// (message seqs), so that two leases of the same batch pick different ones
/// (a later lease still looks at the earlier ones' picks, and takes in order
/// what they left: see `Core::lease_candidates`).
pub(super) type Claimed = HashSet<u64>;

/// A job that runs inside a (possibly shared) transaction.
trait TxJob: Send {
    /// Runs before the batch's transaction starts, against the committed
    /// trees (scans are impossible inside a sled transaction: it holds sled's
    /// global write lock, which an iterator would wait for).
    fn prepare(&mut self, _core: &Core, _claimed: &mut Claimed) -> Result<(), StoreError> {
        Ok(())
    }
    /// Bytes of stored records its run reads, as far as known once prepared
    /// (0: a little; see [`run_batch`]).
    fn read_bytes(&self) -> u64 {
        0
    }
    /// Runs inside the transaction (may run again if sled retries it).
    fn run(&self, tx: &Tx<'_>) -> TxResult<()>;
    /// Sends the result of the last run, or `err`.
    fn reply(self: Box<Self>, err: Option<StoreError>);
}

struct TxJobOf<T, F> {
    f: F,
    read_bytes: u64,
    out: RefCell<Option<T>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> TxJob for TxJobOf<T, F>
where
    T: Send,
    F: Fn(&Tx<'_>) -> TxResult<T> + Send,
{
    fn read_bytes(&self) -> u64 {
        self.read_bytes
    }

    fn run(&self, tx: &Tx<'_>) -> TxResult<()> {
        let value = (self.f)(tx)?;
        *self.out.borrow_mut() = Some(value);
        Ok(())
    }

    fn reply(self: Box<Self>, err: Option<StoreError>) {
        let result = match (err, self.out.into_inner()) {
            (Some(e), _) => Err(e),
            (None, Some(value)) => Ok(value),
            (None, None) => Err(StoreError::Unavailable(
                "store job produced no result".to_owned(),
            )),
        };
        // the caller may be gone (client disconnected): the change stands
        let _ = self.reply.send(result);
    }
}

/// A transactional job with a `prepare` step whose result `S` `f` reads.
struct PreparedJobOf<S, T, P, F> {
    prepare: Option<P>,
    state: Option<S>,
    read_bytes: u64,
    f: F,
    out: RefCell<Option<T>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<S, T, P, F> TxJob for PreparedJobOf<S, T, P, F>
where
    S: Send,
    T: Send,
    P: FnOnce(&Core, &mut Claimed) -> Result<(S, u64), StoreError> + Send,
    F: Fn(&Tx<'_>, &S) -> TxResult<T> + Send,
{
    fn prepare(&mut self, core: &Core, claimed: &mut Claimed) -> Result<(), StoreError> {
        if let Some(prepare) = self.prepare.take() {
            let (state, read_bytes) = prepare(core, claimed)?;
            self.state = Some(state);
            self.read_bytes = read_bytes;
        }
        Ok(())
    }

    fn read_bytes(&self) -> u64 {
        self.read_bytes
    }

    fn run(&self, tx: &Tx<'_>) -> TxResult<()> {
        let Some(state) = &self.state else {
            return Err(::sled::transaction::ConflictableTransactionError::Abort(
                StoreError::Unavailable("store job not prepared".to_owned()),
            ));
        };
        let value = (self.f)(tx, state)?;
        *self.out.borrow_mut() = Some(value);
        Ok(())
    }

    fn reply(self: Box<Self>, err: Option<StoreError>) {
        let result = match (err, self.out.into_inner()) {
            (Some(e), _) => Err(e),
            (None, Some(value)) => Ok(value),
            (None, None) => Err(StoreError::Unavailable(
                "store job produced no result".to_owned(),
            )),
        };
        let _ = self.reply.send(result);
    }
}

enum Job {
    Tx(Box<dyn TxJob>),
    Plain(Box<dyn FnOnce(&Core) + Send>),
}

/// Handle of the writer thread.
#[derive(Debug)]
pub(super) struct Writer {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Starts the writer thread with the nice value `nice` (0: unchanged).
    pub(super) fn start(core: Arc<Core>, nice: i32) -> std::io::Result<Self> {
        let (jobs, mut rx) = mpsc::channel(QUEUE_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("trmx-store-write".to_owned())
            .spawn(move || {
                super::apply_thread_nice("trmx-store-write", nice);
                run(&core, &mut rx);
            })?;
        Ok(Self {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>, StoreError> {
        self.jobs
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
            .ok_or_else(closed)
    }

    /// Runs `f` inside a transaction (possibly shared with other jobs).
    pub(super) async fn transaction<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Tx<'_>) -> TxResult<T> + Send + 'static,
    {
        self.transaction_reading(0, f).await
    }

    /// [`Self::transaction`] for an `f` that reads `read_bytes` of stored
    /// records: shared only with jobs that read at most [`BATCH_READ_BYTES`]
    /// with it.
    pub(super) async fn transaction_reading<T, F>(
        &self,
        read_bytes: u64,
        f: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Tx<'_>) -> TxResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = TxJobOf {
            f,
            read_bytes,
            out: RefCell::new(None),
            reply,
        };
        self.sender()?
            .send(Job::Tx(Box::new(job)))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Runs `prepare` on the writer thread against the committed trees just
    /// before the batch's transaction starts, then `f` inside it (possibly
    /// shared with other jobs).
    pub(super) async fn prepared_transaction<S, T, P, F>(
        &self,
        prepare: P,
        f: F,
    ) -> Result<T, StoreError>
    where
        S: Send + 'static,
        T: Send + 'static,
        P: FnOnce(&Core, &mut Claimed) -> Result<S, StoreError> + Send + 'static,
        F: Fn(&Tx<'_>, &S) -> TxResult<T> + Send + 'static,
    {
        self.prepared_transaction_reading(move |core, claimed| Ok((prepare(core, claimed)?, 0)), f)
            .await
    }

    /// [`Self::prepared_transaction`] whose `prepare` also tells the bytes of
    /// stored records `f` reads (see [`Self::transaction_reading`]).
    pub(super) async fn prepared_transaction_reading<S, T, P, F>(
        &self,
        prepare: P,
        f: F,
    ) -> Result<T, StoreError>
    where
        S: Send + 'static,
        T: Send + 'static,
        P: FnOnce(&Core, &mut Claimed) -> Result<(S, u64), StoreError> + Send + 'static,
        F: Fn(&Tx<'_>, &S) -> TxResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = PreparedJobOf {
            prepare: Some(prepare),
            state: None,
            read_bytes: 0,
            f,
            out: RefCell::new(None),
            reply,
        };
        self.sender()?
            .send(Job::Tx(Box::new(job)))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Runs `f` alone on the writer thread (operations that scan before
    /// they write, and write in several transactions).
    pub(super) async fn exclusive<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Core) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = move |core: &Core| {
            let _ = reply.send(f(core));
        };
        self.sender()?
            .send(Job::Plain(Box::new(job)))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// How many jobs wait for the writer (tests only).
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.sender()
            .map_or(0, |jobs| jobs.max_capacity() - jobs.capacity())
    }

    /// Lets the queued jobs finish, then stops the thread and waits for it.
    pub(super) fn stop(&self) {
        drop(
            self.jobs
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .take(),
        );
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("store writer thread panicked");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("store closed".to_owned())
}

fn run(core: &Core, rx: &mut mpsc::Receiver<Job>) {
    let mut pending: Option<Job> = None;
    loop {
        let job = match pending.take() {
            Some(job) => job,
            None => match rx.blocking_recv() {
                Some(job) => job,
                None => break, // every sender is gone
            },
        };
        match job {
            Job::Plain(f) => f(core),
            Job::Tx(first) => {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Job::Tx(job)) => batch.push(job),
                        Ok(plain) => {
                            pending = Some(plain);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                run_batch(core, batch);
            }
        }
    }
}

fn run_batch(core: &Core, jobs: Vec<Box<dyn TxJob>>) {
    let mut claimed = Claimed::new();
    let mut batch = Vec::with_capacity(jobs.len());
    for mut job in jobs {
        match job.prepare(core, &mut claimed) {
            Ok(()) => batch.push(job),
            Err(e) => job.reply(Some(e)),
        }
    }
    // sled holds every value a transaction read until it commits: the jobs
    // that read records by the megabyte (an `Ack` of large messages, a
    // `Reject`, a withdrawal: `Core::plan` in `ops`) share a transaction only up
    // to `BATCH_READ_BYTES` together (one alone when larger), else 256 of
    // them could hold gigabytes at once.
    let mut group = Vec::with_capacity(batch.len());
    let mut bytes = 0u64;
    for job in batch {
        let read = job.read_bytes();
        if !group.is_empty() && bytes.saturating_add(read) > BATCH_READ_BYTES {
            commit(core, std::mem::take(&mut group));
            bytes = 0;
        }
        bytes = bytes.saturating_add(read);
        group.push(job);
    }
    commit(core, group);
}

/// Runs the prepared `batch` in one transaction (each job alone if it fails).
fn commit(core: &Core, batch: Vec<Box<dyn TxJob>>) {
    if batch.is_empty() {
        return;
    }
    let result = core.transact(|tx| {
        for job in &batch {
            job.run(tx)?;
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            for job in batch {
                job.reply(None);
            }
        }
        Err(e) if batch.len() == 1 => {
            if let Some(job) = batch.into_iter().next() {
                job.reply(Some(e));
            }
        }
        Err(_) => {
            // isolate the job that failed: the others commit on their own
            for job in batch {
                let alone = core.transact(|tx| job.run(tx));
                job.reply(alone.err());
            }
        }
    }
}
