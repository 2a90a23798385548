//! The broker's durable storage, behind [`BrokerStore`] (DESIGN.md §6).
//!
//! The interface speaks in broker operations (submit, lease, ack, reject,
//! withdraw, expire what is due, read a status), never in key-value terms, so
//! that another backend (e.g. PostgreSQL) can implement it later and pass the
//! same conformance suite.
//!
//! - this module: the contract — [`BrokerStore`] and the types it speaks in
//!   (see `/work/notes/STORE_API.md`, the shared contract with the service layer).
//! - [`sled`]: [`SledStore`], the embedded implementation (sled trees,
//!   one transaction per logical change, group-committed flushes, timers as keys).
//! - `conformance` (tests only): the suite every implementation must pass.
//! - [`audit`]: the hash-chained audit log's records, canonical encoding and chain
//!   check; every state change and operator action appends a record in the same
//!   atomic write ([`BrokerStore::audit_verify`], [`BrokerStore::audit_append_operator`]).
//!
//! Receipts (DESIGN.md §3 "Receipts") are made by the store, inside the same
//! atomic write as the state change that causes them, under the ids of
//! [`MessageId::receipt_for`](trmx_proto::MessageId::receipt_for).

use std::time::Duration;

use trmx_proto::envelope::Priority;
use trmx_proto::{CaseRef, Kind, MessageId, ParticipantId, pb};

pub mod audit;
pub mod sled;

#[cfg(test)]
mod conformance;

pub use self::audit::{AuditReport, OperatorAction};
pub use self::sled::{
    CompactReport, FaultSwitch, FlushObserver, SledOptions, SledStore, StoreReport,
    accept_clock_offline, audit_records_offline, compact_offline, dir_bytes, tamper_audit_record,
    verify_audit_offline, verify_store_offline,
};

/// Milliseconds since the Unix epoch; every instant in the store uses this.
pub type Millis = u64;

/// Identifies one Receive stream within this broker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(pub u64);

/// State of a message (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Durable, waiting for the recipient (possibly backing off before a redelivery).
    Accepted,
    /// On one recipient stream, not yet acknowledged.
    InFlight,
    /// The recipient's node stored it (final).
    Acknowledged,
    /// Its lifetime ended first (operator may redrive while the payload is kept).
    Expired,
    /// Rejected by the recipient, or too many attempts.
    DeadLettered,
    /// Taken back by the sender (final).
    Withdrawn,
    /// Removed by an operator (final).
    Purged,
}

impl State {
    /// The wire enum.
    pub fn to_pb(self) -> pb::MessageState {
        match self {
            State::Accepted => pb::MessageState::Accepted,
            State::InFlight => pb::MessageState::InFlight,
            State::Acknowledged => pb::MessageState::Acknowledged,
            State::Expired => pb::MessageState::Expired,
            State::DeadLettered => pb::MessageState::DeadLettered,
            State::Withdrawn => pb::MessageState::Withdrawn,
            State::Purged => pb::MessageState::Purged,
        }
    }

    /// Whether the message still waits for delivery (ACCEPTED or IN_FLIGHT).
    pub fn is_active(self) -> bool {
        matches!(self, State::Accepted | State::InFlight)
    }
}

/// A message handed to `submit`, already validated by the service layer.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The idempotency key (with `sender`).
    pub message_id: MessageId,
    /// The caller, from its certificate.
    pub sender: ParticipantId,
    /// The addressee.
    pub recipient: ParticipantId,
    /// An application kind (never a broker-made one).
    pub kind: Kind,
    /// The pseudonymous case reference.
    pub case_ref: CaseRef,
    /// The message this one answers.
    pub in_reply_to: Option<MessageId>,
    /// Urgent messages are leased first.
    pub priority: Priority,
    /// Set by the sender node.
    pub created_at: Millis,
    /// Already defaulted and capped by the service layer.
    pub expires_at: Millis,
    /// E.g. `application/x-protobuf; proto=trmx.v1.Referral`.
    pub content_type: String,
    /// Opaque bytes, never inspected or logged.
    pub payload: bytes::Bytes,
    /// SHA-256 of `payload` (checked by the service layer).
    pub payload_sha256: [u8; 32],
    /// SHA-256 over the client-set fields (canonical encoding) — equal fingerprints = same submit.
    pub fingerprint: [u8; 32],
}

/// What the broker answers for a durable submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Per-broker sequence number.
    pub broker_seq: u64,
    /// When the message became durable (the first time).
    pub accepted_at: Millis,
    /// When it expires.
    pub expires_at: Millis,
}

/// Result of [`BrokerStore::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Stored and durable.
    Accepted(Accepted),
    /// same (sender, message_id) and same fingerprint: the first receipt
    Duplicate(Accepted),
    /// same (sender, message_id), different fingerprint → ALREADY_EXISTS
    Conflict,
    /// the sender's queued-bytes quota would be exceeded → RESOURCE_EXHAUSTED
    QuotaExceeded,
    /// another sender's message to the same recipient has this id → ALREADY_EXISTS. The
    /// recipient acknowledges and rejects by id (and a node keeps its inbox by id), so two
    /// live messages of one recipient must never share one: an ack of one would settle
    /// both, and the second would be lost.
    IdTaken,
}

/// A message leased to a stream: everything needed to build the `Delivery`.
#[derive(Debug, Clone)]
pub struct Leased {
    /// The message's id.
    pub message_id: MessageId,
    /// None for broker-made receipts.
    pub sender: Option<ParticipantId>,
    /// The addressee (the caller of `lease`).
    pub recipient: ParticipantId,
    /// The message kind.
    pub kind: Kind,
    /// The case reference.
    pub case_ref: CaseRef,
    /// The message this one answers.
    pub in_reply_to: Option<MessageId>,
    /// Its priority.
    pub priority: Priority,
    /// Set by the sender node (the broker's `accepted_at` for receipts).
    pub created_at: Millis,
    /// When it expires.
    pub expires_at: Millis,
    /// Content type of the payload.
    pub content_type: String,
    /// The opaque payload.
    pub payload: bytes::Bytes,
    /// SHA-256 of `payload`.
    pub payload_sha256: [u8; 32],
    /// When the broker made it durable.
    pub accepted_at: Millis,
    /// Per-broker sequence number.
    pub broker_seq: u64,
    /// 1 for the first delivery.
    pub attempt: u32,
}

/// Per-id result of [`BrokerStore::ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckResult {
    /// Acknowledged now or before.
    Acknowledged {
        /// The message's kind, from its record (`trmx_messages_acknowledged_total` counts
        /// by it, also for an ack no stream of this process holds the delivery of).
        kind: Kind,
        /// It was acknowledged before this call (a repeat, e.g. a retry after a lost
        /// answer, or the id twice in one call): nothing changed now, and it is not counted
        /// again.
        already: bool,
    },
    /// Not a message delivered to the caller.
    NotFound,
}

/// Result of [`BrokerStore::reject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectResult {
    /// Dead-lettered now or before (by a rejection).
    Rejected {
        /// It was rejected before this call (a repeat, e.g. a retry after a lost
        /// answer): nothing changed now, and it is not counted again.
        already: bool,
    },
    /// Not a message delivered to the caller.
    NotFound,
}

/// Result of [`BrokerStore::withdraw`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WithdrawResult {
    /// Withdrawn (now or before, at `at`).
    Withdrawn {
        /// When it was withdrawn.
        at: Millis,
        /// Its recipient (whose streams drop it if it waits to be sent).
        recipient: ParticipantId,
        /// It was withdrawn before this call (a repeat, e.g. a retry after a lost
        /// answer): nothing changed now, and it is not counted again.
        already: bool,
    },
    /// Unknown, or not the caller's.
    NotFound,
    /// Too late: the recipient has it → FAILED_PRECONDITION.
    AlreadyAcknowledged,
    /// Purged by an operator already → FAILED_PRECONDITION.
    Final {
        /// The state it is in.
        state: State,
    },
}

/// Result of [`BrokerStore::purge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeResult {
    /// Purged now (NDR queued to the sender). Says whose message it was, from
    /// the purge's own transaction, so that the caller need not read it again
    /// (a failed read after a durable purge must not turn it into an error).
    Purged {
        /// Its recipient (whose streams drop it if it waits to be sent).
        recipient: ParticipantId,
        /// Its sender (who has a non-delivery report queued); none for a receipt.
        sender: Option<ParticipantId>,
    },
    /// Purged before, at `at` (e.g. a retry after an answer that was lost):
    /// nothing changed.
    AlreadyPurged {
        /// When it was purged.
        at: Millis,
        /// Its recipient (the retry drops the message from its streams again, which
        /// is harmless: the purge that made it did, also one whose flush failed, see
        /// [`ChangeError`]).
        recipient: ParticipantId,
        /// Its sender; none for a receipt.
        sender: Option<ParticipantId>,
    },
    /// No such message.
    NotFound,
    /// Only ACCEPTED or IN_FLIGHT messages can be purged (PURGED ones are
    /// [`PurgeResult::AlreadyPurged`]).
    NotPurgeable {
        /// The state it is in.
        state: State,
    },
    /// No sender was named, and more than one sender used this id: nothing changed.
    Ambiguous {
        /// The participants to name as `sender` for each message with this id: its
        /// sender, or for a receipt the participant it goes to.
        senders: Vec<Option<ParticipantId>>,
    },
}

/// Result of [`BrokerStore::redrive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveResult {
    /// ACCEPTED again with a fresh lifetime, its attempts counted from 0 again (the
    /// attempt limit applies to the new lifetime; a delivery before the redrive no
    /// longer counts as one, so its late ack is `NotFound` until the message is leased
    /// again: acks name a message by id, so one then acknowledges the new lease, which
    /// is right, since the node holds the message).
    Redriven {
        /// Its seq, first acceptance and new expiry.
        accepted: Accepted,
        /// The attempts it had used before the redrive, which no longer count.
        attempts_before: u32,
    },
    /// No such message.
    NotFound,
    /// Not EXPIRED or DEAD_LETTERED-by-attempts with its payload kept.
    NotRedrivable {
        /// The state it is in.
        state: State,
    },
    /// No sender was named, and more than one sender used this id: nothing changed.
    Ambiguous {
        /// The participants to name as `sender` for each message with this id: its
        /// sender, or for a receipt the participant it goes to.
        senders: Vec<Option<ParticipantId>>,
    },
}

/// Metadata of one message (never the payload).
#[derive(Debug, Clone)]
pub struct StatusRecord {
    /// The message's id.
    pub message_id: MessageId,
    /// None for broker-made receipts.
    pub sender: Option<ParticipantId>,
    /// The addressee.
    pub recipient: ParticipantId,
    /// The message kind.
    pub kind: Kind,
    /// The case reference.
    pub case_ref: CaseRef,
    /// The message this one answers.
    pub in_reply_to: Option<MessageId>,
    /// Its priority.
    pub priority: Priority,
    /// Current state.
    pub state: State,
    /// How many times it was handed to the recipient.
    pub attempts: u32,
    /// When the broker made it durable.
    pub accepted_at: Millis,
    /// When it expires (or expired).
    pub expires_at: Millis,
    /// When it was last handed to the recipient.
    pub last_delivered_at: Option<Millis>,
    /// When `state` was entered.
    pub state_changed_at: Millis,
    /// While ACCEPTED after an ack timeout: when it is due again.
    pub next_attempt_at: Option<Millis>,
    /// Why it is dead-lettered / expired / purged (a code, never a body value).
    pub reason_code: String,
    /// For a rejection: the offending body field path.
    pub field_path: String,
    /// Payload size in bytes.
    pub payload_size: u64,
    /// Whether the payload is still stored.
    pub payload_kept: bool,
    /// Per-broker sequence number.
    pub broker_seq: u64,
    /// Whether an operator can redrive it now. Never for a receipt: one expires only
    /// after its sender's node left it for the whole metadata retention, and that node
    /// asks about the message and submits again one the broker no longer knows.
    pub redrivable: bool,
}

/// What a `tick` did (for logs and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// leases past their ack deadline put back (ACCEPTED with backoff)
    pub redelivery_due: u64,
    /// attempts exhausted
    pub dead_lettered: u64,
    /// lifetimes ended
    pub expired: u64,
    /// dead-letter retention passed
    pub payloads_deleted: u64,
    /// metadata retention passed
    pub metadata_deleted: u64,
    /// recipients that have newly due messages (so the service can wake their streams)
    pub woken: Vec<ParticipantId>,
    /// The leases of the messages that expired IN_FLIGHT: their streams give their slots
    /// back at once (`max_in_flight`), rather than at the ack deadline, which the node
    /// that still holds the message may let pass; the messages behind them are due.
    pub expired_in_flight: Vec<ExpiredLease>,
    /// The leases whose ack deadline passed with the message's attempts used up
    /// (`max_attempts`: DEAD_LETTERED, a `MAX_ATTEMPTS` non-delivery report to the sender):
    /// their copies still waiting in a stream's send buffer (a slow link) are dropped, not
    /// sent, and their slots freed, as for [`Self::expired_in_flight`]. The recipient must
    /// not get a message its sender is told was not delivered. (A copy already handed to the
    /// connection cannot be called back: its ack is `ACK_RESULT_NOT_FOUND`, which the proto
    /// documents for a message dead-lettered since its delivery.)
    pub dead_lettered_in_flight: Vec<ExpiredLease>,
    /// The audit log's retention could not run (e.g. a damaged record): the timers
    /// above were applied all the same, and the next tick tries again.
    pub audit_prune_error: Option<String>,
}

/// A [`BrokerStore::tick`] that failed. It applies its timers in several atomic writes,
/// so it may fail after some were committed: what those did comes with the error, for the
/// caller to act on as on a tick that succeeded (wake the streams, free the slots of the
/// leases that expired or were dead-lettered in flight, which no later tick reports again).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct TickError {
    /// What the tick applied before it failed (empty when it failed first).
    pub applied: Box<TickReport>,
    /// Why it stopped.
    #[source]
    pub error: StoreError,
}

impl From<StoreError> for TickError {
    /// A tick that failed before it applied anything.
    fn from(error: StoreError) -> Self {
        Self {
            applied: Box::default(),
            error,
        }
    }
}

/// A change that failed. Its write may have been applied and only its flush failed: the
/// write is kept (the next flush that succeeds makes it durable), so what it did is
/// `committed`, for the caller to act on at once as on a change that succeeded (drop a
/// purged or withdrawn copy waiting in its recipient's stream, count it), since a retry
/// finds it done and does not do it again. `None` when nothing was written.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ChangeError<T: std::fmt::Debug> {
    /// What the change wrote before its flush failed (`None`: nothing).
    pub committed: Option<T>,
    /// Why it failed.
    #[source]
    pub error: StoreError,
}

impl<T: std::fmt::Debug> From<StoreError> for ChangeError<T> {
    /// A change that failed before it wrote anything.
    fn from(error: StoreError) -> Self {
        Self {
            committed: None,
            error,
        }
    }
}

/// A lease ended for good: its message expired ([`TickReport::expired_in_flight`]), or its
/// last attempt failed: its ack deadline passed ([`TickReport::dead_lettered_in_flight`]) or
/// its stream ended ([`Released::dead_lettered_in_flight`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLease {
    /// The recipient whose stream held it.
    pub recipient: ParticipantId,
    /// The message.
    pub message_id: MessageId,
    /// The lease's ack deadline: which lease it was (a later one has another).
    pub deadline: Millis,
}

/// Lifecycle parameters the store applies (from the broker config).
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// lease length
    pub ack_timeout: Duration,
    /// then DEAD_LETTERED (+ NDR, reason MAX_ATTEMPTS); never a receipt, which is tried
    /// until it expires (no report can tell its sender it was dead-lettered)
    pub max_attempts: u32,
    /// backoff = base * 2^(attempts-1), capped
    pub redelivery_backoff_base: Duration,
    /// cap of the backoff
    pub redelivery_backoff_max: Duration,
    /// how long payloads of expired / dead-lettered messages are kept (for redrive; not
    /// those never redriven: a rejected message's, an expired receipt's, deleted at once)
    pub dead_letter_retention: Duration,
    /// receipts expire no earlier than this; metadata is kept this long after a final state
    pub metadata_retention: Duration,
    /// bytes of payloads in ACCEPTED/IN_FLIGHT per sender
    pub max_queued_bytes_per_sender: u64,
    /// how long audit records are kept (whole segments are dropped once their last
    /// record is older)
    pub audit_retention: Duration,
    /// the longest lifetime a message gets (`limits.max_lifetime`), also when redriven
    pub max_lifetime: Duration,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(60),
            max_attempts: 10,
            redelivery_backoff_base: Duration::from_secs(5),
            redelivery_backoff_max: Duration::from_secs(600),
            dead_letter_retention: Duration::from_secs(7 * 24 * 3600),
            metadata_retention: Duration::from_secs(30 * 24 * 3600),
            max_queued_bytes_per_sender: 1 << 30,
            audit_retention: Duration::from_secs(800 * 24 * 3600),
            max_lifetime: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// Per-recipient queue figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// The recipient.
    pub recipient: ParticipantId,
    /// Messages ACCEPTED (due or backing off).
    pub depth: u64,
    /// Messages IN_FLIGHT.
    pub in_flight: u64,
    /// Oldest `accepted_at` among the messages the recipient has not
    /// acknowledged yet: ACCEPTED (due now or backing off before a
    /// redelivery) and IN_FLIGHT. (Oldest by acceptance order, `broker_seq`.)
    pub oldest_accepted_at: Option<Millis>,
    /// Payload bytes of ACCEPTED + IN_FLIGHT messages.
    pub bytes: u64,
}

/// What the broker last knew of a participant, kept across restarts so that
/// "not seen for a day" and "certificate expires soon" still hold for a
/// participant that does not come back after the broker restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The participant.
    pub participant: ParticipantId,
    /// When it last called the broker or had a Receive stream open.
    pub last_seen: Millis,
    /// `not_after` of the certificate it last connected with, if known.
    pub cert_not_after: Option<Millis>,
}

/// Operator metadata search (never payloads). Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct SearchFilter {
    /// Only this message id.
    pub message_id: Option<MessageId>,
    /// Only from this sender.
    pub sender: Option<ParticipantId>,
    /// Only to this recipient.
    pub recipient: Option<ParticipantId>,
    /// Only this case.
    pub case_ref: Option<CaseRef>,
    /// Only in this state.
    pub state: Option<State>,
    /// Only of this kind.
    pub kind: Option<Kind>,
    /// Only accepted at or after this instant.
    pub accepted_from: Option<Millis>,
    /// Only accepted before this instant.
    pub accepted_until: Option<Millis>,
    /// At most this many results (0 means 100).
    pub limit: usize,
    /// Only messages with a `broker_seq` above this one: the next page of an
    /// earlier search ([`SearchPage::resume_after`]).
    pub after_seq: Option<u64>,
    /// Examine at most this many messages (0: no bound), so that a filter
    /// that matches little cannot keep one call reading the whole store; the
    /// page then says where to continue.
    pub scan_limit: usize,
}

/// Who ended a `Receive` stream (see [`BrokerStore::release_stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The recipient's side: closed, reset or gone.
    Recipient,
    /// The broker: shutting down, a store failure. (A revoked certificate's connection is
    /// closed under the stream, which then sees its recipient gone.)
    Broker,
}

/// What [`BrokerStore::release_stream`] did with a stream's unacknowledged deliveries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Back in their queue (due at once, or after the backoff).
    pub requeued: u64,
    /// Attempts used up: DEAD_LETTERED, a non-delivery report to the sender.
    pub dead_lettered: u64,
    /// The leases behind [`Self::dead_lettered`], each with its ack deadline. The released
    /// stream sends nothing more, but an earlier copy of the message (leased before on
    /// another stream of the recipient, whose ack deadline passed while it waited in that
    /// stream's send buffer) may still wait to be sent: it is dropped, not sent, as for
    /// [`TickReport::dead_lettered_in_flight`]. The recipient must not get a message its
    /// sender is told was not delivered.
    pub dead_lettered_in_flight: Vec<ExpiredLease>,
}

/// One page of a [`BrokerStore::search`] or [`BrokerStore::dead_letters`].
#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    /// The matching messages, in `broker_seq` order: at most the limit.
    pub records: Vec<StatusRecord>,
    /// Set when the page stopped before the end: more messages matched than
    /// the limit, or the scan limit was reached first (more may match). The
    /// `after_seq` that continues the search.
    pub resume_after: Option<u64>,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot make writes durable (flush failed, disk full, ...). The broker must stop accepting.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The data directory cannot be opened (locked by another broker, not writable, corrupt).
    #[error("cannot open store at {path}: {reason}")]
    Open {
        /// The data directory.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A stored record cannot be decoded.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

/// Every method that changes state returns only after the change is durable (flushed);
/// concurrent calls share flushes (group commit). Receipts are created inside the same
/// atomic write as the state change that causes them.
///
/// Changes apply in the order their calls hand them to the store, and a change handed
/// over applies even if its caller stops waiting for the answer. (`Withdraw` relies on
/// this: it waits until the submits of its message have handed their writes over, then
/// follows them; see `admission::Submitting`.)
#[tonic::async_trait]
pub trait BrokerStore: Send + Sync + std::fmt::Debug + 'static {
    /// Idempotent on (sender, message_id).
    /// A submit whose flush fails says what it committed ([`ChangeError::committed`]): a
    /// message it stored stays stored (durable with the next flush) and is delivered, so
    /// the caller counts it as on a submit that succeeded, though it answers the sender
    /// an error: the sender's retry is a [`SubmitOutcome::Duplicate`], which is not
    /// counted again.
    async fn submit(
        &self,
        msg: NewMessage,
        now: Millis,
    ) -> Result<SubmitOutcome, ChangeError<SubmitOutcome>>;
    /// The first receipt of `sender`'s message `id` when it is stored with `fingerprint` (a
    /// retry of the same content), once it is durable; `None` when it is not stored, or stored
    /// with other content. Reads only: for retries that a precondition refuses before
    /// [`Self::submit`] (a lifetime passed since, a recipient gone from the registry, a rate
    /// limit), which must still get the first receipt.
    async fn resubmitted(
        &self,
        sender: &ParticipantId,
        id: MessageId,
        fingerprint: [u8; 32],
    ) -> Result<Option<Accepted>, StoreError>;
    /// Up to `max` due messages for `recipient` (state ACCEPTED and not backing off, not expired):
    /// urgent first, then broker_seq order. Marks them IN_FLIGHT on `stream` with deadline now+ack_timeout, attempts+1.
    ///
    /// Their payloads take at most `max_bytes` together: leasing stops before the message
    /// that would go over (a message larger than `max_bytes` is leased alone, when it comes
    /// first). The ack timeout runs from the lease, so a stream leases only what it can send
    /// soon: a slow link then does not time out deliveries still waiting to be sent.
    async fn lease(
        &self,
        recipient: &ParticipantId,
        stream: StreamId,
        max: usize,
        max_bytes: u64,
        now: Millis,
    ) -> Result<Vec<Leased>, StoreError>;
    /// The recipient stored these. Per id: Acknowledged when it is addressed to `recipient` and was delivered at least
    /// once (IN_FLIGHT, or back in ACCEPTED after a timeout, or already ACKNOWLEDGED → harmless,
    /// `already`), with the message's kind, else NotFound. An id named twice in one call is
    /// acknowledged at its first place, `already` at the second.
    /// Deletes the payload, queues the DELIVERY_RECEIPT to the sender (not for receipts: a receipt never causes a receipt).
    /// Applied in parts, each an atomic write: an ack that fails after some were committed
    /// (a later part, or the flush) says what those did ([`ChangeError::committed`]: the
    /// results of the ids up to the failure, in order), for the caller to act on as on an
    /// ack that succeeded (count them, free their stream slots): a repeat finds them
    /// acknowledged `already`.
    async fn ack(
        &self,
        recipient: &ParticipantId,
        ids: &[MessageId],
        now: Millis,
    ) -> Result<Vec<AckResult>, ChangeError<Vec<AckResult>>>;
    /// IN_FLIGHT (or delivered and back in ACCEPTED) to `recipient` → DEAD_LETTERED (rejected; never
    /// redrivable), NDR with reason + field path. Rejecting again is harmless.
    /// A reject whose flush fails says what it committed ([`ChangeError::committed`]),
    /// for the caller to act on as on a reject that succeeded (count the dead letter,
    /// free its stream slot): a repeat finds it rejected `already`.
    async fn reject(
        &self,
        recipient: &ParticipantId,
        id: MessageId,
        reason_code: &str,
        field_path: &str,
        now: Millis,
    ) -> Result<RejectResult, ChangeError<RejectResult>>;
    /// The stream ended with these IN_FLIGHT messages unacknowledged. Ended by the recipient
    /// ([`StreamEnd::Recipient`]), each delivery was a failed attempt (DESIGN.md §4): due again
    /// after the backoff, or DEAD_LETTERED (+ NDR) when its attempts are used up (never a
    /// receipt: see [`Lifecycle::max_attempts`]), so that a
    /// message that makes the recipient's node drop its stream is not handed to it forever.
    /// Ended by the broker ([`StreamEnd::Broker`]), they are due again at once. Every
    /// unacknowledged delivery of the stream counts, also one its node never read.
    /// The release is applied in several atomic writes: one that fails after some were
    /// committed (a later one, or the flush) says what those did
    /// ([`ChangeError::committed`]), for the caller to act on as on a release that
    /// succeeded (count its dead letters, drop the copies of their messages still waiting
    /// in the recipient's other streams); nothing releases those leases again.
    async fn release_stream(
        &self,
        recipient: &ParticipantId,
        stream: StreamId,
        end: StreamEnd,
        now: Millis,
    ) -> Result<Released, ChangeError<Released>>;
    /// Sender takes back its message (ACCEPTED, IN_FLIGHT, or EXPIRED or DEAD_LETTERED with
    /// the payload kept for a redrive) → WITHDRAWN, payload deleted; no NDR.
    /// One whose flush fails says what its transaction found ([`ChangeError::committed`]),
    /// for the caller to act on as on one that succeeded: a withdrawal it wrote (drop the
    /// copies waiting for the recipient, count it: a repeat finds it withdrawn `already`),
    /// or a refusal, which wrote nothing (the message stays as it is).
    async fn withdraw(
        &self,
        sender: &ParticipantId,
        id: MessageId,
        now: Millis,
    ) -> Result<WithdrawResult, ChangeError<WithdrawResult>>;
    /// Metadata of `sender`'s message `id` (None if unknown or not the sender's).
    async fn status(
        &self,
        sender: &ParticipantId,
        id: MessageId,
    ) -> Result<Option<StatusRecord>, StoreError>;
    /// Applies the timers due at `now` (ack timeouts → redelivery with backoff or dead-letter,
    /// expiry, retentions), earliest first: a bounded number per call, so that a clock far
    /// ahead (all timers due at once) does not hold every other operation until all are
    /// applied. While some are left, [`Self::next_timer`] is at or before `now`: the caller
    /// calls again.
    /// On an error some timers may have been applied already, and their wake-ups not sent:
    /// the caller wakes every stream, and frees the slots of the leases the committed part
    /// reports ([`TickError::applied`]).
    async fn tick(&self, now: Millis) -> Result<TickReport, TickError>;
    /// Earliest instant at which `tick` has something to do (None if nothing pending).
    async fn next_timer(&self) -> Result<Option<Millis>, StoreError>;
    /// Called once at start: every IN_FLIGHT lease of a previous process becomes due again,
    /// and a message backing off is due at the latest its backoff after `now` (its due
    /// instant came from the clock of the previous process, which may have been ahead of
    /// this one: a start accepts a clock behind). Returns how many leases were released.
    async fn recover(&self, now: Millis) -> Result<u64, StoreError>;
    /// The instant a broker last recorded with [`Self::mark_running`] (`None` for a store
    /// never marked). Read at start, to catch a system clock that jumped while the broker
    /// was down: expiry and the retentions are final.
    async fn last_running(&self) -> Result<Option<Millis>, StoreError>;
    /// Records, durably, that a broker runs on this store at `now`.
    async fn mark_running(&self, now: Millis) -> Result<(), StoreError>;
    /// Per-recipient depth (ACCEPTED), in flight, oldest accepted_at of a message not yet
    /// acknowledged (ACCEPTED or IN_FLIGHT), queued bytes — for operators and metrics. Reads
    /// a fixed number of entries per recipient and one per message in flight, never a
    /// backlog, and costs the writes of a message delivered at once nothing.
    async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError>;
    /// Operator: ACCEPTED / IN_FLIGHT → PURGED, payload deleted, NDR (outcome PURGED) to the sender.
    /// `reason` is the operator's note (kept in the record, never sent to anyone).
    ///
    /// Message ids are unique per sender only. With `sender` the message is `sender`'s `id`;
    /// without, `id` must be one message ([`PurgeResult::Ambiguous`] otherwise), so that an
    /// operator never acts on another organisation's message that carries the same id. A
    /// receipt's sender is the broker: it is named by the participant it goes to (the sender
    /// of the message it reports on), and of the receipts with `id` to one participant the
    /// newest is meant (an older one is of an earlier message sent under the same id, whose
    /// metadata went since).
    async fn purge(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
        reason: &str,
        now: Millis,
    ) -> Result<PurgeResult, ChangeError<PurgeResult>>;
    /// Operator: EXPIRED, or DEAD_LETTERED by attempts, with the payload kept → ACCEPTED with a fresh
    /// lifetime (as long as the original one) and attempts reset. Never a rejected message,
    /// nor a receipt (see [`StatusRecord::redrivable`]).
    /// `sender` as for [`Self::purge`].
    async fn redrive(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
        now: Millis,
    ) -> Result<RedriveResult, ChangeError<RedriveResult>>;
    /// Operator: EXPIRED and DEAD_LETTERED messages still on record, oldest first: at most
    /// `limit` (0 means 100) with a `broker_seq` above `after_seq`.
    async fn dead_letters(
        &self,
        limit: usize,
        after_seq: Option<u64>,
    ) -> Result<SearchPage, StoreError>;
    /// Operator: metadata search (never payloads), in broker_seq order. A record that cannot
    /// be read is skipped (and logged), not an error of the whole search.
    async fn search(&self, filter: SearchFilter) -> Result<SearchPage, StoreError>;
    /// Operator: appends `action` to the audit log (durable when this returns).
    async fn audit_append_operator(
        &self,
        action: OperatorAction,
        now: Millis,
    ) -> Result<(), StoreError>;
    /// Operator: walks the audit log's hash chain and reports the first broken record.
    async fn audit_verify(&self) -> Result<AuditReport, StoreError>;
    /// [`Self::purge`] by `operator`, audited (the action with its reason) in the same
    /// atomic write as the purge.
    async fn operator_purge(
        &self,
        operator: &str,
        id: MessageId,
        sender: Option<&ParticipantId>,
        reason: &str,
        now: Millis,
    ) -> Result<PurgeResult, ChangeError<PurgeResult>>;
    /// [`Self::redrive`] by `operator`, audited in the same atomic write as the redrive.
    async fn operator_redrive(
        &self,
        operator: &str,
        id: MessageId,
        sender: Option<&ParticipantId>,
        now: Millis,
    ) -> Result<RedriveResult, ChangeError<RedriveResult>>;
    /// Records the presence of each participant in `seen` (one entry per
    /// participant; a later `last_seen` replaces an earlier one, an older one
    /// is ignored). Durable when this returns.
    async fn save_presence(&self, seen: Vec<Presence>) -> Result<(), StoreError>;
    /// Every presence recorded, in participant order.
    async fn presence(&self) -> Result<Vec<Presence>, StoreError>;
    /// Flush and close (graceful shutdown). Later writes fail with `Unavailable`.
    async fn close(&self) -> Result<(), StoreError>;
    /// Whether writes are made durable now: open, and no failed flush since the last one that
    /// succeeded. (A read that works says nothing about it.)
    fn writes_durable(&self) -> bool;
    /// After each durable write, every recipient that got newly due messages (new submit, receipt
    /// queued, stream released, recovery, redelivery due, redrive) is sent here, so the service can
    /// wake its streams. On `RecvError::Lagged`, wake every stream. The default never sends.
    fn wakeups(&self) -> tokio::sync::broadcast::Receiver<ParticipantId> {
        tokio::sync::broadcast::channel(1).1
    }
}
