//! Admission control for `Submit`: a per-sender token bucket, the free-disk
//! watermark, the "store unavailable" latch, and per-sender submit slots
//! ([`SubmitSlots`]) so that one sender's burst cannot fill the store's
//! write batches, and the submits in progress by message ([`Submitting`]) so that
//! a withdrawal is not overtaken by an earlier submit of its message; and for the
//! other `Exchange` requests, per-participant request slots ([`RequestSlots`]) so that
//! one participant's flood of acks, rejects, withdrawals or status reads cannot fill
//! the store's one writer (or its readers) and starve the others.
//!
//! # Invariants
//! - A bucket never holds more than `burst` tokens; one submit takes one token.
//! - Once the store reported `Unavailable`, new submits are refused until a
//!   later store write succeeds again (`store_recovered`).
//! - The free-disk figure is refreshed by the timer loop, never measured on the
//!   request path.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use trmx_proto::{MessageId, ParticipantId};

use crate::error::BrokerError;

/// One sender's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

/// Decides whether a submit may go to the store.
#[derive(Debug)]
pub struct Admission {
    rate_per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<ParticipantId, Bucket>>,
    min_free_disk_bytes: u64,
    free_disk_bytes: AtomicU64,
    store_unavailable: AtomicBool,
}

impl Admission {
    /// A new admission gate.
    pub fn new(rate_per_second: u32, burst: u32, min_free_disk_bytes: u64) -> Self {
        Self {
            rate_per_second: f64::from(rate_per_second),
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
            min_free_disk_bytes,
            free_disk_bytes: AtomicU64::new(u64::MAX),
            store_unavailable: AtomicBool::new(false),
        }
    }

    /// Checks the store latch and the disk watermark, then takes one token of
    /// `sender`'s bucket (real time: rates are about load, not message time).
    pub fn admit(&self, sender: &ParticipantId) -> Result<(), BrokerError> {
        self.check(sender).map_err(Refusal::into_error)
    }

    /// [`Admission::admit`], telling why a submit is refused.
    pub fn check(&self, sender: &ParticipantId) -> Result<(), Refusal> {
        if self.store_unavailable.load(Ordering::Acquire) {
            return Err(Refusal::StoreUnavailable);
        }
        if self.low_on_disk() {
            return Err(Refusal::LowDisk);
        }
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let bucket = buckets.entry(sender.clone()).or_insert(Bucket {
            tokens: self.burst,
            refilled_at: now,
        });
        let elapsed = now.duration_since(bucket.refilled_at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_second).min(self.burst);
        bucket.refilled_at = now;
        if bucket.tokens < 1.0 {
            return Err(Refusal::Rate {
                per_second: self.rate_per_second,
            });
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    fn low_on_disk(&self) -> bool {
        self.free_disk_bytes.load(Ordering::Acquire) < self.min_free_disk_bytes
    }

    /// Whether new submits can be stored: no failed flush latched and free disk at or
    /// above the watermark (what `trmx_store_writable` and `/readyz` report).
    pub fn store_writable(&self) -> bool {
        !self.is_store_unavailable() && !self.low_on_disk()
    }

    /// The store failed to make a write durable: refuse new submits.
    pub fn store_failed(&self) {
        self.store_unavailable.store(true, Ordering::Release);
    }

    /// A store write succeeded again: accept submits.
    pub fn store_recovered(&self) {
        self.store_unavailable.store(false, Ordering::Release);
    }

    /// Whether submits are refused because the store failed.
    pub fn is_store_unavailable(&self) -> bool {
        self.store_unavailable.load(Ordering::Acquire)
    }

    /// Records the free space of the data directory.
    pub fn set_free_disk_bytes(&self, bytes: u64) {
        self.free_disk_bytes.store(bytes, Ordering::Release);
    }
}

/// Per-sender limits on submits between their admission and their answer.
///
/// Slots: at most `per_sender` submits of one sender are written at once. More
/// wait (they are not refused): the store's group commit then interleaves every
/// sender's writes instead of serving one sender's burst of hundreds first, so a
/// burst from one participant costs the others little latency.
///
/// Bytes: the envelopes of one sender's waiting and written submits hold at most
/// `bytes_per_sender` bytes of memory. A submit beyond it is refused at once
/// ([`Refusal::Waiting`]), so a sender that sends faster than the store writes
/// cannot fill the broker's memory while its requests wait.
///
/// # Invariants
/// - At most `per_sender` submits of one sender hold a slot at a time.
/// - The envelope bytes of one sender's reservations never exceed `bytes_per_sender`.
/// - The map holds one entry per sender that ever submitted; senders are
///   registry participants (others are refused before), so it is bounded.
#[derive(Debug)]
pub struct SubmitSlots {
    per_sender: usize,
    bytes_per_sender: u32,
    senders: Mutex<HashMap<ParticipantId, SenderSlots>>,
}

#[derive(Debug, Clone)]
struct SenderSlots {
    writing: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl SubmitSlots {
    /// At most `per_sender` (at least 1) concurrent submits per sender, and
    /// `bytes_per_sender` envelope bytes of its submits in memory.
    pub fn new(per_sender: usize, bytes_per_sender: u32) -> Self {
        Self {
            per_sender: per_sender.max(1),
            bytes_per_sender,
            senders: Mutex::new(HashMap::new()),
        }
    }

    fn of(&self, sender: &ParticipantId) -> SenderSlots {
        let mut senders = self
            .senders
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        senders
            .entry(sender.clone())
            .or_insert_with(|| SenderSlots {
                writing: Arc::new(Semaphore::new(self.per_sender)),
                bytes: Arc::new(Semaphore::new(self.bytes_per_sender as usize)),
            })
            .clone()
    }

    /// Reserves `bytes` of `sender`'s memory budget until the permit drops;
    /// [`Refusal::Waiting`] when the budget is spent.
    pub fn reserve(
        &self,
        sender: &ParticipantId,
        bytes: u64,
    ) -> Result<OwnedSemaphorePermit, Refusal> {
        let spent = Refusal::Waiting {
            limit_bytes: u64::from(self.bytes_per_sender),
        };
        let bytes = u32::try_from(bytes).map_err(|_| spent)?;
        self.of(sender)
            .bytes
            .try_acquire_many_owned(bytes)
            .map_err(|_| spent)
    }

    /// Waits for one of `sender`'s slots; it is freed when the permit drops.
    /// (`None` only if the semaphore were closed, which it never is.)
    pub async fn acquire(&self, sender: &ParticipantId) -> Option<OwnedSemaphorePermit> {
        self.of(sender).writing.acquire_owned().await.ok()
    }
}

/// Per-participant limits on the `Exchange` requests other than `Submit` (`Ack`,
/// `Reject`, `Withdraw`, `GetStatus`, `GetInfo`, and a `Receive` stream until its first
/// lease): the store has one writer thread for everyone, so without them one participant
/// sending many such requests at once (64 `Ack`s of 1,024 unknown ids each) fills its
/// queue and every other participant's submits and acks wait behind them.
///
/// Requests: at most `per_participant` of one participant's requests are served at once.
/// Ack ids: the `Ack`s of one participant being served carry at most `ack_ids` ids
/// together (an `Ack` costs the store one lookup per id, so its ids are what count).
/// A request that finds no room waits up to `wait` (`limits.refusal_delay`) for it, in
/// arrival order, then is refused (`RESOURCE_EXHAUSTED`, [`Crowded`]): the flooder is
/// slowed to its share and told why, and its requests never queue in the broker longer
/// than that. A node acks each delivery as it has stored it, one call at a time per
/// stream, and makes up to four such calls at once in all (ack or reject, `GetStatus`,
/// a withdrawal, `GetInfo`): the default request limit is four per node for
/// `limits.max_streams_per_participant` nodes.
///
/// # Invariants
/// - At most `per_participant` requests of one participant hold a slot at a time.
/// - The ids of one participant's `Ack`s holding slots never exceed `ack_ids`.
/// - The map holds one entry per participant that made a request; callers are registry
///   participants (others are refused before), so it is bounded.
#[derive(Debug)]
pub struct RequestSlots {
    per_participant: usize,
    ack_ids: u32,
    wait: Duration,
    participants: Mutex<HashMap<ParticipantId, ParticipantSlots>>,
}

#[derive(Debug)]
struct ParticipantSlots {
    requests: Arc<Semaphore>,
    ack_ids: Arc<Semaphore>,
    /// When the last refusal was logged, and the refusals since.
    warned_at: Option<Instant>,
    refused_since: u64,
    /// The setting that refused the last of them.
    refused_by: &'static str,
}

/// Refusals of one participant's requests not logged yet (see [`RequestSlots::unlogged`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnloggedRefusals {
    /// Whose requests were refused.
    pub participant: ParticipantId,
    /// The setting that refused the last of them.
    pub setting: &'static str,
    /// How many since the last warning.
    pub refused: u64,
}

/// Shortest time between two warnings about one participant's refused requests.
pub const CROWDED_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// A request's slot (and its `Ack`'s ids), freed when dropped.
#[derive(Debug)]
pub struct RequestPermit {
    _request: OwnedSemaphorePermit,
    _ack_ids: Option<OwnedSemaphorePermit>,
}

/// Why [`RequestSlots::acquire`] refused a request: which limit was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crowded {
    /// `limits.max_concurrent_requests_per_participant` requests were being served.
    Requests {
        /// The configured limit.
        limit: usize,
    },
    /// The `Ack`s being served held `limits.max_ack_ids_in_progress_per_participant` ids.
    AckIds {
        /// The configured limit.
        limit: u32,
    },
}

impl Crowded {
    /// The setting that refused the request.
    pub fn setting(self) -> &'static str {
        match self {
            Crowded::Requests { .. } => "limits.max_concurrent_requests_per_participant",
            Crowded::AckIds { .. } => "limits.max_ack_ids_in_progress_per_participant",
        }
    }

    /// The error `participant` gets.
    pub fn into_error(self, participant: &ParticipantId) -> BrokerError {
        let held = match self {
            Crowded::Requests { limit } => format!("{limit} requests"),
            Crowded::AckIds { limit } => format!("Acks of {limit} message ids"),
        };
        BrokerError::ResourceExhausted(format!(
            "{participant} already has {held} in progress at the broker ({}); send fewer \
             at once and retry when they are answered",
            self.setting()
        ))
    }
}

impl RequestSlots {
    /// At most `per_participant` (at least 1) requests and `ack_ids` (at least 1) ids of
    /// `Ack`s of one participant served at once; a request waits up to `wait` for room.
    pub fn new(per_participant: usize, ack_ids: u32, wait: Duration) -> Self {
        Self {
            per_participant: per_participant.max(1),
            ack_ids: ack_ids.max(1),
            wait,
            participants: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ParticipantId, ParticipantSlots>> {
        self.participants
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn of(&self, participant: &ParticipantId) -> (Arc<Semaphore>, Arc<Semaphore>) {
        let mut participants = self.lock();
        let slots = participants
            .entry(participant.clone())
            .or_insert_with(|| ParticipantSlots {
                requests: Arc::new(Semaphore::new(self.per_participant)),
                ack_ids: Arc::new(Semaphore::new(self.ack_ids as usize)),
                warned_at: None,
                refused_since: 0,
                refused_by: "",
            });
        (slots.requests.clone(), slots.ack_ids.clone())
    }

    /// A slot for one request of `participant` carrying `ack_ids` ids (0 for any request
    /// but `Ack`; more than the limit are counted as the limit), waiting up to the
    /// configured time for one to free.
    pub async fn acquire(
        &self,
        participant: &ParticipantId,
        ack_ids: usize,
    ) -> Result<RequestPermit, Crowded> {
        let (requests, ids) = self.of(participant);
        let deadline = Instant::now() + self.wait;
        let request = take(requests, 1, deadline).await.ok_or(Crowded::Requests {
            limit: self.per_participant,
        })?;
        // (in arrival order: a large `Ack` waiting for its ids holds the smaller ones of
        // the same participant behind it, up to `wait`, then is refused and they go on.
        // That costs only the participant that sent it at once with so many others (by
        // default more than 1,024 ids already in progress), at most `wait` (250 ms by
        // default) against an ack timeout of a minute; served out of order, a large
        // `Ack` could wait behind a stream of small ones until its every retry is refused)
        let ack_ids = match u32::try_from(ack_ids).map(|n| n.min(self.ack_ids)) {
            Ok(0) => None,
            Ok(n) => Some(take(ids, n, deadline).await),
            Err(_) => Some(take(ids, self.ack_ids, deadline).await),
        };
        let ack_ids = match ack_ids {
            None => None,
            Some(Some(permit)) => Some(permit),
            Some(None) => {
                return Err(Crowded::AckIds {
                    limit: self.ack_ids,
                });
            }
        };
        Ok(RequestPermit {
            _request: request,
            _ack_ids: ack_ids,
        })
    }

    /// Notes a refusal of `participant`'s request by `crowded`: `Some(refusals)` when a
    /// warning about it is due (the first, then at most one per
    /// [`CROWDED_WARN_INTERVAL`]), with the refusals since the last one, this one included.
    pub fn refused(&self, participant: &ParticipantId, crowded: Crowded) -> Option<u64> {
        let now = Instant::now();
        let mut participants = self.lock();
        let slots = participants.get_mut(participant)?;
        slots.refused_since += 1;
        slots.refused_by = crowded.setting();
        slots.take_due(now)
    }

    /// The refusals not logged yet of each participant whose warning interval has passed
    /// since its last warning, taken as logged now. A flood's refusals after its last
    /// warning are logged by the next refusal only; when the flood stops, this is what
    /// logs them (called now and then by a task that runs anyway: no timer per
    /// participant).
    pub fn unlogged(&self) -> Vec<UnloggedRefusals> {
        let now = Instant::now();
        let mut participants = self.lock();
        participants
            .iter_mut()
            .filter_map(|(participant, slots)| {
                slots.take_due(now).map(|refused| UnloggedRefusals {
                    participant: participant.clone(),
                    setting: slots.refused_by,
                    refused,
                })
            })
            .collect()
    }
}

impl ParticipantSlots {
    /// The refusals since the last warning, if there are any and another warning is due
    /// at `now` (the first, then at most one per [`CROWDED_WARN_INTERVAL`]).
    fn take_due(&mut self, now: Instant) -> Option<u64> {
        let due = self.refused_since > 0
            && self
                .warned_at
                .is_none_or(|at| now.duration_since(at) >= CROWDED_WARN_INTERVAL);
        if !due {
            return None;
        }
        self.warned_at = Some(now);
        Some(std::mem::take(&mut self.refused_since))
    }
}

/// `n` permits of `semaphore`: at once if free, else waiting (in arrival order) until
/// `deadline`; `None` if they did not free by then.
async fn take(
    semaphore: Arc<Semaphore>,
    n: u32,
    deadline: Instant,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = semaphore.clone().try_acquire_many_owned(n) {
        return Some(permit);
    }
    match tokio::time::timeout_at(deadline, semaphore.acquire_many_owned(n)).await {
        Ok(Ok(permit)) => Some(permit),
        // (the semaphore is never closed)
        Ok(Err(_)) | Err(_) => None,
    }
}

/// The submits between their admission and their store write, by sender and message
/// id, and the withdrawals of the last minutes, so that a `Withdraw` is never overtaken
/// by an earlier submit of the same message.
///
/// A node whose submit went unanswered (its connection broke, or it gave up waiting)
/// may have the user withdraw the message, and then asks the broker to withdraw it, on a
/// new connection. The earlier submit can still be on its way: waiting for its sender's
/// write slot, or its body still arriving; that connection's end is noticed later. (It
/// never waits inside the broker for a slot of its connection, where no timeout would
/// count the wait: a connection is offered no more HTTP/2 streams than are served at
/// once, `LimitsConfig::streams_per_connection`.) Without this, the withdrawal would
/// find nothing (`NOT_FOUND`: "the broker never had it"), and the submit would then store
/// the message and deliver it. With it, a withdrawal keeps, for `refuse_for`, the fact
/// that the message was withdrawn: no submit of it starts writing from then on (each
/// answers `FAILED_PRECONDITION` and stores nothing), and the withdrawal waits for the
/// submits already writing, so the store sees it after them. `refuse_for` outlasts
/// every request that can still be on its way: the broker's request timeout, and its
/// HTTP/2 keepalive's time to close a dead connection with the requests queued on it.
///
/// # Invariants
/// - A submit that has not started writing when a withdrawal of its (sender, id) begins
///   never writes, if it starts within `refuse_for`; one writing then is written before
///   the withdrawal reaches the store.
/// - A pending entry exists exactly while a submit of its (sender, id) is registered.
/// - At most [`MAX_WITHDRAWALS_KEPT_PER_SENDER`] withdrawals are kept per sender (the
///   oldest go first), so a sender withdrawing made-up ids cannot fill the memory.
#[derive(Debug)]
pub struct Submitting {
    state: Mutex<SubmittingState>,
    refuse_for: Duration,
}

/// Most withdrawals [`Submitting`] keeps per sender.
pub const MAX_WITHDRAWALS_KEPT_PER_SENDER: usize = 10_000;

#[derive(Debug, Default)]
struct SubmittingState {
    pending: HashMap<(ParticipantId, MessageId), Pending>,
    withdrawn: HashMap<ParticipantId, Withdrawals>,
}

#[derive(Debug)]
struct Pending {
    /// Registered submits not yet writing.
    waiting: usize,
    /// Submits writing to the store.
    writing: watch::Sender<usize>,
}

/// One sender's recent withdrawals: when each began, and their order.
#[derive(Debug, Default)]
struct Withdrawals {
    at: HashMap<MessageId, Instant>,
    order: VecDeque<(Instant, MessageId)>,
}

impl Withdrawals {
    /// Forgets the withdrawals that began `refuse_for` or more before `now`.
    fn forget_before(&mut self, now: Instant, refuse_for: Duration) {
        while let Some(&(at, id)) = self.order.front() {
            if now.duration_since(at) < refuse_for {
                break;
            }
            self.order.pop_front();
            if self.at.get(&id) == Some(&at) {
                self.at.remove(&id);
            }
        }
    }

    fn refuses(&self, id: MessageId, now: Instant, refuse_for: Duration) -> bool {
        self.at
            .get(&id)
            .is_some_and(|at| now.duration_since(*at) < refuse_for)
    }
}

impl Submitting {
    /// Refuses the submits of a withdrawn message for `refuse_for` after its withdrawal.
    pub fn new(refuse_for: Duration) -> Self {
        Self {
            state: Mutex::default(),
            refuse_for,
        }
    }

    /// Registers a submit of `sender`'s message `id`, before it waits for anything.
    pub fn enter(&self, sender: &ParticipantId, id: MessageId) -> SubmitTicket<'_> {
        let key = (sender.clone(), id);
        let mut state = self.lock();
        let pending = state.pending.entry(key.clone()).or_insert_with(|| Pending {
            waiting: 0,
            writing: watch::Sender::new(0),
        });
        pending.waiting += 1;
        SubmitTicket {
            owner: self,
            key,
            writing: false,
        }
    }

    /// Begins a withdrawal of `sender`'s message `id`: from now on, for `refuse_for`, no
    /// submit of it starts writing. Waits until those writing are done, and returns how
    /// many were waiting (they will not be written). The withdrawal goes to the store
    /// next, after their writes; when the store refuses it (the message was acknowledged
    /// or purged), [`Self::withdrawal_refused`] lifts the refusal.
    pub async fn withdraw(&self, sender: &ParticipantId, id: MessageId) -> Withdrawal {
        let now = Instant::now();
        let (waiting, writing) = {
            let mut state = self.lock();
            let withdrawals = state.withdrawn.entry(sender.clone()).or_default();
            withdrawals.forget_before(now, self.refuse_for);
            if withdrawals.order.len() >= MAX_WITHDRAWALS_KEPT_PER_SENDER
                && let Some((at, oldest)) = withdrawals.order.pop_front()
                && withdrawals.at.get(&oldest) == Some(&at)
            {
                withdrawals.at.remove(&oldest);
            }
            withdrawals.at.insert(id, now);
            withdrawals.order.push_back((now, id));
            match state.pending.get(&(sender.clone(), id)) {
                Some(pending) => (pending.waiting, Some(pending.writing.subscribe())),
                None => (0, None),
            }
        };
        if let Some(mut writing) = writing {
            // (an error: the last submit has gone, and the entry with it)
            let _ = writing.wait_for(|n| *n == 0).await;
        }
        Withdrawal { waiting, at: now }
    }

    /// The store refused `withdrawal` (the message stays as it is): submits of the message
    /// are not refused for it any longer. A retry of the stored message gets its receipt,
    /// and one of a message the recipient acknowledged must not be told "withdrawn".
    pub fn withdrawal_refused(
        &self,
        sender: &ParticipantId,
        id: MessageId,
        withdrawal: Withdrawal,
    ) {
        let mut state = self.lock();
        if let Some(withdrawals) = state.withdrawn.get_mut(sender)
            && withdrawals.at.get(&id) == Some(&withdrawal.at)
        {
            // (its place in `order` goes when it is old enough, like a replaced one)
            withdrawals.at.remove(&id);
        }
    }

    /// How many messages have submits registered.
    #[cfg(test)]
    pub(crate) fn messages(&self) -> usize {
        self.lock().pending.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SubmittingState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// A registered submit (see [`Submitting`]); dropping it ends the registration.
#[derive(Debug)]
pub struct SubmitTicket<'a> {
    owner: &'a Submitting,
    key: (ParticipantId, MessageId),
    writing: bool,
}

impl SubmitTicket<'_> {
    /// Moves the submit from waiting to writing, unless its message was withdrawn less
    /// than `refuse_for` ago: then `Err`, and it must not be written.
    pub fn start_writing(&mut self) -> Result<(), Withdrawn> {
        if self.writing {
            return Ok(());
        }
        let refuse_for = self.owner.refuse_for;
        let mut state = self.owner.lock();
        let (sender, id) = &self.key;
        if state
            .withdrawn
            .get(sender)
            .is_some_and(|w| w.refuses(*id, Instant::now(), refuse_for))
        {
            return Err(Withdrawn);
        }
        // (the entry lives while this ticket does)
        if let Some(pending) = state.pending.get_mut(&self.key) {
            pending.waiting -= 1;
            pending.writing.send_modify(|n| *n += 1);
        }
        self.writing = true;
        Ok(())
    }
}

impl Drop for SubmitTicket<'_> {
    fn drop(&mut self) {
        let mut state = self.owner.lock();
        let Some(pending) = state.pending.get_mut(&self.key) else {
            return;
        };
        if self.writing {
            pending.writing.send_modify(|n| *n -= 1);
        } else {
            pending.waiting -= 1;
        }
        if pending.waiting == 0 && *pending.writing.borrow() == 0 {
            state.pending.remove(&self.key);
        }
    }
}

/// A withdrawal begun by [`Submitting::withdraw`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Withdrawal {
    /// The submits of the message that were waiting: they will not be written.
    pub waiting: usize,
    at: Instant,
}

/// A submit refused because its message was withdrawn while it was on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Withdrawn;

/// Why [`Admission::check`] refused a submit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// A flush failed and no write has succeeded since (`UNAVAILABLE`).
    StoreUnavailable,
    /// Free disk below `limits.min_free_disk_bytes` (`RESOURCE_EXHAUSTED`).
    LowDisk,
    /// The sender's token bucket is empty (`RESOURCE_EXHAUSTED`).
    Rate {
        /// The configured sustained rate.
        per_second: f64,
    },
    /// The sender's submits waiting for the store already hold its memory budget
    /// (`RESOURCE_EXHAUSTED`; see [`SubmitSlots`]).
    Waiting {
        /// The configured budget.
        limit_bytes: u64,
    },
}

impl Refusal {
    /// The error the caller gets.
    pub fn into_error(self) -> BrokerError {
        match self {
            Refusal::StoreUnavailable => BrokerError::Unavailable(
                "the broker cannot store messages right now; retry later".into(),
            ),
            Refusal::LowDisk => BrokerError::ResourceExhausted(
                "the broker is low on disk space and accepts no new messages; retry later".into(),
            ),
            Refusal::Rate { per_second } => BrokerError::ResourceExhausted(format!(
                "submit rate limit of {per_second} messages/s exceeded; retry later"
            )),
            Refusal::Waiting { limit_bytes } => BrokerError::ResourceExhausted(format!(
                "this sender's submits waiting for the store already hold {limit_bytes} bytes \
                 (limits.max_waiting_submit_bytes_per_sender); retry when they are answered"
            )),
        }
    }
}

/// Free bytes available to unprivileged users on the filesystem of `path`.
pub fn free_disk_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(s: &str) -> ParticipantId {
        ParticipantId::parse(s).unwrap()
    }

    #[test]
    fn a_sender_gets_its_burst_then_is_refused() {
        let gate = Admission::new(1, 3, 0);
        for _ in 0..3 {
            gate.admit(&id("NL-NRM")).unwrap();
        }
        let err = gate.admit(&id("NL-NRM")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(matches!(
            gate.check(&id("NL-NRM")),
            Err(Refusal::Rate { .. })
        ));
        // another sender is unaffected
        gate.admit(&id("BE-PAYOKE")).unwrap();
    }

    #[test]
    fn low_disk_and_a_failed_store_refuse() {
        let gate = Admission::new(100, 100, 1000);
        assert!(gate.store_writable());
        gate.set_free_disk_bytes(999);
        assert_eq!(
            gate.admit(&id("NL-NRM")).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(gate.check(&id("NL-NRM")), Err(Refusal::LowDisk));
        assert!(!gate.store_writable());
        gate.set_free_disk_bytes(1000);
        gate.admit(&id("NL-NRM")).unwrap();
        assert!(gate.store_writable());
        gate.store_failed();
        assert_eq!(
            gate.admit(&id("NL-NRM")).unwrap_err().code(),
            tonic::Code::Unavailable
        );
        assert_eq!(gate.check(&id("NL-NRM")), Err(Refusal::StoreUnavailable));
        assert!(!gate.store_writable());
        gate.store_recovered();
        gate.admit(&id("NL-NRM")).unwrap();
        assert!(gate.store_writable());
    }

    #[test]
    fn free_disk_is_measured() {
        let dir = std::env::temp_dir();
        assert!(free_disk_bytes(&dir).unwrap() > 0);
    }

    #[tokio::test]
    async fn a_sender_gets_at_most_its_slots_and_others_are_not_held() {
        let slots = SubmitSlots::new(2, 1 << 20);
        let nl = id("NL-NRM");
        let first = slots.acquire(&nl).await;
        let second = slots.acquire(&nl).await;
        assert!(first.is_some() && second.is_some());
        // the third of NL-NRM waits ...
        let wait = std::time::Duration::from_millis(30);
        assert!(
            tokio::time::timeout(wait, slots.acquire(&nl))
                .await
                .is_err()
        );
        // ... while another sender is served at once ...
        assert!(
            tokio::time::timeout(wait, slots.acquire(&id("BE-PAYOKE")))
                .await
                .is_ok()
        );
        // ... and a freed slot lets NL-NRM's next submit in.
        drop(first);
        assert!(tokio::time::timeout(wait, slots.acquire(&nl)).await.is_ok());
    }

    #[test]
    fn a_sender_holds_at_most_its_byte_budget_and_others_are_not_held() {
        let slots = SubmitSlots::new(2, 1000);
        let nl = id("NL-NRM");
        let first = slots.reserve(&nl, 600).unwrap();
        let refused = slots.reserve(&nl, 500).unwrap_err();
        assert_eq!(refused, Refusal::Waiting { limit_bytes: 1000 });
        assert_eq!(refused.into_error().code(), tonic::Code::ResourceExhausted);
        // what is left still fits, and another sender has its own budget
        let _second = slots.reserve(&nl, 400).unwrap();
        let _other = slots.reserve(&id("BE-PAYOKE"), 1000).unwrap();
        // an answered submit gives its bytes back
        drop(first);
        assert!(slots.reserve(&nl, 500).is_ok());
        // an envelope larger than the whole budget never fits
        assert!(slots.reserve(&id("INT-IOM"), 1001).is_err());
    }

    #[tokio::test]
    async fn a_participant_gets_at_most_its_request_slots_and_others_are_not_held() {
        let slots = RequestSlots::new(2, 1024, Duration::ZERO);
        let nl = id("NL-NRM");
        let first = slots.acquire(&nl, 0).await.unwrap();
        let _second = slots.acquire(&nl, 1).await.unwrap();
        let refused = slots.acquire(&nl, 0).await.unwrap_err();
        assert_eq!(refused, Crowded::Requests { limit: 2 });
        let error = refused.into_error(&nl);
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        assert!(
            error
                .to_string()
                .contains("limits.max_concurrent_requests_per_participant"),
            "{error}"
        );
        // another participant has slots of its own
        let _other = slots.acquire(&id("BE-PAYOKE"), 0).await.unwrap();
        // a finished request frees its slot
        drop(first);
        assert!(slots.acquire(&nl, 0).await.is_ok());
    }

    #[tokio::test]
    async fn the_acks_of_a_participant_hold_at_most_their_ids() {
        let slots = RequestSlots::new(8, 1024, Duration::ZERO);
        let nl = id("NL-NRM");
        let big = slots.acquire(&nl, 1000).await.unwrap();
        let refused = slots.acquire(&nl, 100).await.unwrap_err();
        assert_eq!(refused, Crowded::AckIds { limit: 1024 });
        assert!(
            refused
                .into_error(&nl)
                .to_string()
                .contains("limits.max_ack_ids_in_progress_per_participant")
        );
        // what is left still fits; requests without ids do not count; another
        // participant has its own ids
        let _small = slots.acquire(&nl, 24).await.unwrap();
        let _status = slots.acquire(&nl, 0).await.unwrap();
        let _other = slots.acquire(&id("BE-PAYOKE"), 1024).await.unwrap();
        // a refused ack gave back its request slot: 3 of 8 are held, so 5 more fit
        for _ in 0..5 {
            std::mem::forget(slots.acquire(&nl, 0).await.unwrap());
        }
        assert!(matches!(
            slots.acquire(&nl, 0).await,
            Err(Crowded::Requests { .. })
        ));
        drop(big);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_slot_then_is_refused() {
        let wait = Duration::from_millis(250);
        let slots = Arc::new(RequestSlots::new(1, 1024, wait));
        let nl = id("NL-NRM");
        let held = slots.acquire(&nl, 0).await.unwrap();
        // one that finds no slot is refused once the wait is over, not before
        let started = Instant::now();
        assert!(slots.acquire(&nl, 0).await.is_err());
        assert_eq!(started.elapsed(), wait);
        // one whose slot frees within the wait is served
        let waiting = tokio::spawn({
            let (slots, nl) = (slots.clone(), nl.clone());
            async move { slots.acquire(&nl, 0).await.map(drop) }
        });
        tokio::time::sleep(wait / 2).await;
        drop(held);
        assert_eq!(waiting.await.unwrap(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_reported_once_per_interval_per_participant() {
        let slots = RequestSlots::new(1, 1024, Duration::ZERO);
        let (nl, be) = (id("NL-NRM"), id("BE-PAYOKE"));
        let _held = slots.acquire(&nl, 0).await.unwrap();
        let _other = slots.acquire(&be, 0).await.unwrap();
        assert_eq!(
            slots.refused(&nl, REQUESTS),
            Some(1),
            "the first is reported"
        );
        assert_eq!(slots.refused(&nl, REQUESTS), None);
        assert_eq!(slots.refused(&nl, REQUESTS), None);
        assert_eq!(
            slots.refused(&be, REQUESTS),
            Some(1),
            "another participant is its own"
        );
        tokio::time::advance(CROWDED_WARN_INTERVAL).await;
        assert_eq!(
            slots.refused(&nl, REQUESTS),
            Some(3),
            "then the count since the last report"
        );
    }

    const REQUESTS: Crowded = Crowded::Requests { limit: 1 };

    /// A flood's refusals after its last warning are logged once its interval has passed
    /// although no request of it comes any more: [`RequestSlots::unlogged`] hands them over
    /// once, naming the setting that refused the last; a participant whose refusals were
    /// all logged, or whose interval has not passed, is not named.
    #[tokio::test(start_paused = true)]
    async fn the_refusals_after_the_last_warning_are_handed_over_when_the_flood_stops() {
        let slots = RequestSlots::new(1, 1024, Duration::ZERO);
        let (nl, be) = (id("NL-NRM"), id("BE-PAYOKE"));
        let _held = slots.acquire(&nl, 0).await.unwrap();
        let _other = slots.acquire(&be, 0).await.unwrap();
        assert_eq!(slots.refused(&nl, REQUESTS), Some(1));
        assert_eq!(slots.refused(&be, REQUESTS), Some(1));
        let ack_ids = Crowded::AckIds { limit: 1024 };
        assert_eq!(slots.refused(&nl, REQUESTS), None);
        assert_eq!(slots.refused(&nl, ack_ids), None);
        assert_eq!(slots.unlogged(), vec![], "within the interval");
        tokio::time::advance(CROWDED_WARN_INTERVAL).await;
        assert_eq!(
            slots.unlogged(),
            vec![UnloggedRefusals {
                participant: nl.clone(),
                setting: "limits.max_ack_ids_in_progress_per_participant",
                refused: 2,
            }]
        );
        assert_eq!(slots.unlogged(), vec![], "handed over once");
        // (the interval runs from that line: the next refusal waits for it)
        assert_eq!(slots.refused(&nl, REQUESTS), None);
        tokio::time::advance(CROWDED_WARN_INTERVAL).await;
        assert_eq!(slots.refused(&nl, REQUESTS), Some(2));
    }

    /// Every permit of `nl` is free: `per_participant` requests, the last an `Ack` of all
    /// `ack_ids`, are each served at once (with no wait), and one more is refused.
    async fn all_free(slots: &RequestSlots, nl: &ParticipantId) {
        let mut held = Vec::new();
        for _ in 1..slots.per_participant {
            held.push(slots.acquire(nl, 0).await.expect("a request slot leaked"));
        }
        held.push(
            slots
                .acquire(nl, slots.ack_ids as usize)
                .await
                .expect("a request slot or ack ids leaked"),
        );
        assert!(slots.acquire(nl, 0).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order_and_a_cancelled_one_gives_its_turn_on() {
        let slots = Arc::new(RequestSlots::new(1, 1024, Duration::from_secs(5)));
        let nl = id("NL-NRM");
        let held = slots.acquire(&nl, 0).await.unwrap();
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..4 {
            let (slots, nl, served) = (slots.clone(), nl.clone(), served.clone());
            waiters.push(tokio::spawn(async move {
                let permit = slots.acquire(&nl, n).await;
                served.lock().unwrap().push(n);
                // (held a while: the next must wait for it)
                tokio::time::sleep(Duration::from_millis(10)).await;
                permit.map(drop)
            }));
            // (each queued before the next arrives)
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        waiters[1].abort();
        drop(held);
        for (n, waiter) in waiters.into_iter().enumerate() {
            match waiter.await {
                Ok(result) => assert_eq!(result, Ok(()), "waiter {n}"),
                Err(e) => assert!(n == 1 && e.is_cancelled(), "waiter {n}: {e}"),
            }
        }
        assert_eq!(*served.lock().unwrap(), vec![0, 2, 3]);
        all_free(&slots, &nl).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_cancelled_while_it_waits_for_ids_gives_back_its_slot_and_the_ids_it_got() {
        let slots = Arc::new(RequestSlots::new(3, 1024, Duration::from_secs(5)));
        let nl = id("NL-NRM");
        let big = slots.acquire(&nl, 1000).await.unwrap();
        // waits holding a request slot (and, once freed, some of the ids it needs)
        let waiting = tokio::spawn({
            let (slots, nl) = (slots.clone(), nl.clone());
            async move { slots.acquire(&nl, 1024).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        // one that comes after it waits behind it, though its 24 ids are free
        let small = tokio::spawn({
            let (slots, nl) = (slots.clone(), nl.clone());
            async move { slots.acquire(&nl, 24).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!small.is_finished(), "an ack went ahead of an earlier one");
        // cancelled, the first gives back what it held: the next is served at once
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        assert_eq!(small.await.unwrap(), Ok(()));
        drop(big);
        all_free(&slots, &nl).await;
        // (so does one cancelled while waiting for its request slot)
        let held: Vec<_> = [
            slots.acquire(&nl, 0).await.unwrap(),
            slots.acquire(&nl, 0).await.unwrap(),
            slots.acquire(&nl, 0).await.unwrap(),
        ]
        .into();
        let waiting = tokio::spawn({
            let (slots, nl) = (slots.clone(), nl.clone());
            async move { slots.acquire(&nl, 512).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        drop(held);
        all_free(&slots, &nl).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_of_the_whole_budget_is_served_and_a_larger_one_counts_as_the_budget() {
        let slots = Arc::new(RequestSlots::new(4, 1024, Duration::from_millis(250)));
        let nl = id("NL-NRM");
        let whole = slots.acquire(&nl, 1024).await.unwrap();
        assert_eq!(
            slots.acquire(&nl, 1).await.unwrap_err(),
            Crowded::AckIds { limit: 1024 }
        );
        drop(whole);
        let over = slots.acquire(&nl, usize::MAX).await.unwrap();
        assert!(slots.acquire(&nl, 1).await.is_err());
        drop(over);
        all_free(&slots, &nl).await;
    }

    #[tokio::test]
    async fn a_task_that_panics_holding_a_slot_gives_it_back() {
        let slots = Arc::new(RequestSlots::new(2, 1024, Duration::ZERO));
        let nl = id("NL-NRM");
        let panicked = tokio::spawn({
            let (slots, nl) = (slots.clone(), nl.clone());
            async move {
                let _permit = slots.acquire(&nl, 1024).await.unwrap();
                panic!("store work panicked");
            }
        });
        assert!(panicked.await.unwrap_err().is_panic());
        all_free(&slots, &nl).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_withdrawal_refuses_the_submits_of_its_message_for_a_while() {
        let refuse_for = Duration::from_secs(170);
        let submitting = Submitting::new(refuse_for);
        let (nl, be) = (id("NL-NRM"), id("BE-PAYOKE"));
        let (message, other) = (MessageId::new_v7(), MessageId::new_v7());
        let mut first = submitting.enter(&nl, message);
        let mut retry = submitting.enter(&nl, message);
        let mut other_message = submitting.enter(&nl, other);
        let mut other_sender = submitting.enter(&be, message);
        assert_eq!(submitting.withdraw(&nl, message).await.waiting, 2);
        assert_eq!(first.start_writing(), Err(Withdrawn));
        assert_eq!(retry.start_writing(), Err(Withdrawn));
        // another message, or the same id from another sender, is another message
        assert_eq!(other_message.start_writing(), Ok(()));
        assert_eq!(other_sender.start_writing(), Ok(()));
        // a submit that reaches the broker after the withdrawal (it was queued on its
        // old connection) is refused too, until `refuse_for` has passed
        tokio::time::advance(refuse_for - Duration::from_secs(1)).await;
        let mut late = submitting.enter(&nl, message);
        assert_eq!(late.start_writing(), Err(Withdrawn));
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut later = submitting.enter(&nl, message);
        assert_eq!(later.start_writing(), Ok(()));
        drop((first, retry, other_message, other_sender, late, later));
        assert_eq!(
            submitting.messages(),
            0,
            "every entry goes with its submits"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_withdrawing_made_up_ids_keeps_a_bounded_record() {
        let submitting = Submitting::new(Duration::from_secs(170));
        let nl = id("NL-NRM");
        let first = MessageId::new_v7();
        submitting.withdraw(&nl, first).await;
        for _ in 0..MAX_WITHDRAWALS_KEPT_PER_SENDER {
            submitting.withdraw(&nl, MessageId::new_v7()).await;
        }
        let state = submitting.lock();
        let kept = &state.withdrawn[&nl];
        assert_eq!(kept.order.len(), MAX_WITHDRAWALS_KEPT_PER_SENDER);
        assert_eq!(kept.at.len(), MAX_WITHDRAWALS_KEPT_PER_SENDER);
        assert!(!kept.at.contains_key(&first), "the oldest went first");
    }

    #[tokio::test]
    async fn a_withdrawal_waits_for_the_submits_of_its_message_being_written() {
        let submitting = Submitting::new(Duration::from_secs(170));
        let nl = id("NL-NRM");
        let message = MessageId::new_v7();
        let mut writing = submitting.enter(&nl, message);
        writing.start_writing().unwrap();
        let mut withdrawal = Box::pin(submitting.withdraw(&nl, message));
        // (a zero timeout polls the withdrawal once)
        let polled = tokio::time::timeout(Duration::ZERO, &mut withdrawal).await;
        assert!(polled.is_err(), "the withdrawal waits for the write");
        drop(writing);
        let withdrawal = tokio::time::timeout(Duration::from_secs(5), withdrawal)
            .await
            .expect("the withdrawal goes on once the write is done");
        assert_eq!(
            withdrawal.waiting, 0,
            "a submit being written is not cancelled"
        );
        assert_eq!(submitting.messages(), 0);
        // nothing registered: nothing to wait for
        assert_eq!(submitting.withdraw(&nl, message).await.waiting, 0);
    }
}
