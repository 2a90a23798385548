//! The node core: the participant's durable outbox, inbox, case index, due
//! list and retention, and the link to the broker.
//!
//! Module map:
//! - [`clock`]: the injected time source ([`Clock`], [`SystemClock`], [`ManualClock`]).
//! - `body`: the message bodies (re-export of `trmx_proto::body`).
//! - `store` (private): the sled database — outbox, inbox, idempotency, dedup,
//!   case and due indexes; every state change is one transaction.
//! - `link` (private): the broker link — submit loop, receive loop, `GetInfo`.
//!
//! Data flow: [`NodeCore::send`] validates, stores the entry as `QUEUED` and
//! flushes, then wakes the submit loop, which submits to the broker and marks
//! it `SUBMITTED`. The receive loop stores each delivery (or the effect of a
//! receipt), flushes, then acknowledges it; [`NodeCore::watch`] streams new
//! inbox entries by their node-local `seq`.

mod body;
pub mod clock;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;

pub use body::{Body, BodyContext};
pub use clock::{Clock, ManualClock, SystemClock};
pub use trmx_proto::envelope::Priority;
pub use trmx_proto::time::Date;
pub use trmx_proto::{CaseRef, Kind, MessageId, ParticipantId, ValidationError};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// What the core needs to run.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This node's participant ID; must match the node certificate.
    pub participant: ParticipantId,
    /// Directory of the sled database.
    pub data_dir: PathBuf,
    /// The broker, `host:port`.
    pub broker_addr: String,
    /// The name in the broker certificate, e.g. `localhost`.
    pub broker_server_name: String,
    /// CA, certificate and key of this node.
    pub tls: trmx_transport::TlsPaths,
    /// The `Receive` window.
    pub max_in_flight: u32,
    /// Shortest wait before reconnecting (jittered exponential backoff).
    pub reconnect_min: Duration,
    /// Longest wait before reconnecting.
    pub reconnect_max: Duration,
    /// Lifetime of sent messages (`expires_at`); `None` leaves the broker default.
    pub default_lifetime: Option<Duration>,
    /// How often retention erases expired bodies.
    pub retention_check_interval: Duration,
    /// sled page cache size.
    pub cache_capacity_bytes: u64,
}

/// A message the application asks the node to send.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// Client-chosen, 1..=128 of `[A-Za-z0-9._:-]`: the same key with the same
    /// content gives the same entry; with different content an
    /// [`NodeError::IdempotencyConflict`].
    pub idempotency_key: String,
    /// The recipient.
    pub recipient: ParticipantId,
    /// The case; `None` opens a new case (random UUID v4).
    pub case_ref: Option<CaseRef>,
    /// The message this one answers.
    pub in_reply_to: Option<MessageId>,
    /// Delivery priority.
    pub priority: Priority,
    /// The body; validated before anything is stored.
    pub body: Body,
    /// When the broker should stop trying; `None` uses the configured default.
    pub expires_at: Option<SystemTime>,
}

/// State of an outbox entry (DESIGN.md §4). Moves only forward, except
/// `Failed → Delivered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboxState {
    /// Stored locally, not yet accepted by the broker.
    Queued,
    /// Durable on the broker.
    Submitted,
    /// The recipient's node stored it.
    Delivered,
    /// Refused by the broker or never delivered (see [`OutboxEntry::failure`]).
    Failed,
}

impl OutboxState {
    /// Lower-case name: `queued`, `submitted`, `delivered`, `failed`.
    pub fn name(self) -> &'static str {
        match self {
            OutboxState::Queued => "queued",
            OutboxState::Submitted => "submitted",
            OutboxState::Delivered => "delivered",
            OutboxState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for OutboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a message failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `rejected-by-broker`, `rejected-by-recipient`, `expired`,
    /// `dead-lettered`, `purged`.
    pub outcome: String,
    /// Machine-readable reason (gRPC code name or the recipient's reason code).
    pub reason_code: String,
    /// Offending field path, if any; never a value.
    pub field_path: String,
}

/// A message this node sent (or will send).
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// The message id (UUIDv7 minted by the node).
    pub message_id: MessageId,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// The recipient.
    pub recipient: ParticipantId,
    /// The kind.
    pub kind: Kind,
    /// The case.
    pub case_ref: CaseRef,
    /// The message answered.
    pub in_reply_to: Option<MessageId>,
    /// Priority.
    pub priority: Priority,
    /// Delivery state.
    pub state: OutboxState,
    /// A reply that arrived (`ANSWERED` on top of the state).
    pub answered_by: Option<MessageId>,
    /// When it was queued.
    pub created_at: Millis,
    /// When the broker accepted it.
    pub submitted_at: Option<Millis>,
    /// When it was delivered or failed.
    pub outcome_at: Option<Millis>,
    /// Why it failed.
    pub failure: Option<Failure>,
    /// Submit attempts so far.
    pub submit_attempts: u32,
    /// Last submit error (gRPC code and message), for operators.
    pub last_error: Option<String>,
    /// The body was erased by retention.
    pub body_erased: bool,
}

/// A message this node received.
#[derive(Debug, Clone)]
pub struct InboxEntry {
    /// Node-local, strictly increasing; the resume point of [`NodeCore::watch`].
    pub seq: u64,
    /// The message id.
    pub message_id: MessageId,
    /// The sender.
    pub sender: ParticipantId,
    /// The kind.
    pub kind: Kind,
    /// The case.
    pub case_ref: CaseRef,
    /// The message answered.
    pub in_reply_to: Option<MessageId>,
    /// Priority.
    pub priority: Priority,
    /// Sender's creation time.
    pub created_at: Millis,
    /// When the broker accepted it.
    pub accepted_at: Millis,
    /// When this node stored it.
    pub received_at: Millis,
    /// A reply this node sent.
    pub answered_by: Option<MessageId>,
    /// The body was erased by retention.
    pub body_erased: bool,
}

/// One message, decoded; the body is `None` when erased.
#[derive(Debug, Clone)]
pub enum MessageView {
    /// Sent by this node.
    Outbox(OutboxEntry, Option<Body>),
    /// Received by this node.
    Inbox(InboxEntry, Option<Body>),
}

/// Direction of a message relative to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This node sent it.
    Sent,
    /// This node received it.
    Received,
}

/// One message of a case timeline.
#[derive(Debug, Clone)]
pub struct TimelineEntry {
    /// When it was created (sent) or received.
    pub at: Millis,
    /// Sent or received.
    pub direction: Direction,
    /// The message id.
    pub message_id: MessageId,
    /// The kind.
    pub kind: Kind,
    /// The other party.
    pub counterpart: ParticipantId,
    /// The message answered.
    pub in_reply_to: Option<MessageId>,
    /// The outbox state (`queued`, `submitted`, `delivered`, `failed`,
    /// with `+answered` when answered) or `received` (`received+answered`).
    pub state: String,
}

/// Why something is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueKind {
    /// We sent a request with `respond_by`; no answer yet.
    AwaitingAnswer,
    /// We received a request with `respond_by`; we have not answered.
    AnswerOwed,
    /// A follow-up's `next_follow_up_due` passed with no later follow-up on the case.
    FollowUpDue,
}

/// Something due on or before a date.
#[derive(Debug, Clone)]
pub struct DueItem {
    /// The message that sets the date.
    pub message_id: MessageId,
    /// Its case.
    pub case_ref: CaseRef,
    /// Its kind.
    pub kind: Kind,
    /// The other party.
    pub counterpart: ParticipantId,
    /// The date.
    pub due: Date,
    /// What is due.
    pub what: DueKind,
}

/// Filter of outbox / inbox listings. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this case.
    pub case_ref: Option<CaseRef>,
    /// Only this recipient (outbox) or sender (inbox).
    pub counterpart: Option<ParticipantId>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this state (outbox only).
    pub state: Option<OutboxState>,
    /// Most entries returned; 0 means 100.
    pub limit: usize,
}

/// What the node is doing.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// This node.
    pub participant: ParticipantId,
    /// Whether the receive stream to the broker is open.
    pub broker_connected: bool,
    /// The last broker error (code and message; never personal data).
    pub last_broker_error: Option<String>,
    /// Outbox entries waiting to be submitted.
    pub outbox_queued: u64,
    /// Outbox entries submitted, no outcome yet.
    pub outbox_submitted: u64,
    /// Outbox entries failed.
    pub outbox_failed: u64,
    /// Inbox entries.
    pub inbox_total: u64,
    /// Highest inbox `seq`.
    pub last_inbox_seq: u64,
}

/// One participant of the broker's registry.
#[derive(Debug, Clone)]
pub struct ParticipantInfo {
    /// Participant ID.
    pub id: ParticipantId,
    /// Human-readable name.
    pub display_name: String,
    /// Country code or `INT`.
    pub country: String,
    /// `nrm`, `ngo`, `authority`, `international-organisation`, `return-counselling`.
    pub organisation_type: String,
    /// Kinds it accepts.
    pub accepts: Vec<Kind>,
}

/// Errors of the node core (mapped to gRPC status codes by the local API).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A request or body breaks a rule (`INVALID_ARGUMENT` with the field path).
    #[error("{0}")]
    Invalid(ValidationError),
    /// The idempotency key was used for a different message (`ALREADY_EXISTS`).
    #[error("idempotency key {key} was used for a different message")]
    IdempotencyConflict {
        /// The key.
        key: String,
    },
    /// No such message (`NOT_FOUND`).
    #[error("message {0} not found")]
    NotFound(MessageId),
    /// The operation does not fit the message's state (`FAILED_PRECONDITION`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The broker cannot be reached (`UNAVAILABLE`).
    #[error("broker unavailable: {0}")]
    BrokerUnavailable(String),
    /// The local database failed.
    #[error("store: {0}")]
    Store(String),
    /// The configuration is unusable.
    #[error("config: {0}")]
    Config(String),
}

/// The running node core. Cheap to clone (shared state inside).
#[derive(Debug, Clone)]
pub struct NodeCore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: CoreConfig,
    #[allow(dead_code)]
    clock: Arc<dyn Clock>,
}

impl NodeCore {
    /// Opens the store and starts the broker link and retention tasks.
    pub async fn start(config: CoreConfig, clock: Arc<dyn Clock>) -> Result<NodeCore, NodeError> {
        Ok(NodeCore {
            inner: Arc::new(Inner { config, clock }),
        })
    }

    /// Stops the link tasks, flushes and closes the store.
    pub async fn shutdown(&self) {}

    /// Validates and stores a message as `QUEUED` (flushed before this returns),
    /// then wakes the submit loop.
    pub async fn send(&self, req: SendRequest) -> Result<OutboxEntry, NodeError> {
        let _ = req;
        Err(NodeError::Store("not implemented yet".into()))
    }

    /// Takes back a message that has not been delivered yet.
    pub async fn withdraw(&self, id: MessageId) -> Result<(), NodeError> {
        Err(NodeError::NotFound(id))
    }

    /// Outbox entries, newest first.
    pub async fn outbox(&self, filter: &ListFilter) -> Result<Vec<OutboxEntry>, NodeError> {
        let _ = filter;
        Ok(Vec::new())
    }

    /// Inbox entries, newest first.
    pub async fn inbox(&self, filter: &ListFilter) -> Result<Vec<InboxEntry>, NodeError> {
        let _ = filter;
        Ok(Vec::new())
    }

    /// One message with its body (if not erased).
    pub async fn message(&self, id: MessageId) -> Result<Option<MessageView>, NodeError> {
        let _ = id;
        Ok(None)
    }

    /// Every message of a case, in order.
    pub async fn case_timeline(&self, case_ref: CaseRef) -> Result<Vec<TimelineEntry>, NodeError> {
        let _ = case_ref;
        Ok(Vec::new())
    }

    /// What is due on or before `today`.
    pub async fn due(&self, today: Date) -> Result<Vec<DueItem>, NodeError> {
        let _ = today;
        Ok(Vec::new())
    }

    /// The broker's participant registry (cached, refreshed on each connect).
    pub async fn participants(&self) -> Result<Vec<ParticipantInfo>, NodeError> {
        Ok(Vec::new())
    }

    /// Connection state and queue sizes.
    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            participant: self.inner.config.participant.clone(),
            broker_connected: false,
            last_broker_error: None,
            outbox_queued: 0,
            outbox_submitted: 0,
            outbox_failed: 0,
            inbox_total: 0,
            last_inbox_seq: 0,
        }
    }

    /// Every inbox entry with `seq > after_seq`, then new ones as they are
    /// stored; never misses one.
    pub fn watch(
        &self,
        after_seq: u64,
    ) -> impl Stream<Item = Result<InboxEntry, NodeError>> + Send + 'static {
        let _ = after_seq;
        futures::stream::empty()
    }
}
