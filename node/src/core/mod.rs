//! The node core: the participant's durable outbox, inbox, case index, due
//! list and retention, and the link to the broker.
//!
//! Module map:
//! - [`clock`]: the injected time source ([`Clock`], [`SystemClock`], [`ManualClock`]).
//! - [`last_run`]: the last-run file beside the store, where the node writes what it
//!   records as its last run, and the clock check `check-config` makes from it.
//! - `store` (private): the sled database — outbox, inbox, idempotency, dedup,
//!   case and due indexes; every state change is one transaction.
//! - `link` (private): the broker link — submit loop, receive loop, `GetInfo`,
//!   and the certificate check that moves the link to a new connection when the
//!   node certificate changes, once the broker has answered on that connection.
//! - `channel` (private): the channel every broker call goes through, replaced
//!   by a new one (new connection) on such a move.
//!
//! Data flow: [`NodeCore::send`] validates, stores the entry as `QUEUED` and
//! flushes, then wakes the submit loop, which submits to the broker and marks
//! it `SUBMITTED`. A send and a withdrawal run in a task of their own, which the
//! caller awaits: a local API client that gives up drops only the waiting, never the
//! change halfway; [`NodeCore::shutdown`] takes no new one and waits for those under
//! way (within [`CoreConfig::shutdown_grace`]) before it stops the link. The receive
//! loop stores each delivery (or the effect of a receipt), flushes, then acknowledges
//! it; [`NodeCore::watch`] streams new inbox entries by their node-local `seq`.

mod channel;
pub mod clock;
mod disk;
#[cfg(test)]
mod fake_broker;
pub mod last_run;
mod link;
mod store;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use trmx_proto::pb;
use trmx_proto::pb::exchange_client::ExchangeClient;
use trmx_proto::time::{to_millis, to_timestamp};

use channel::LinkChannel;
use last_run::LastRunWriter;
use store::{CaseKnown, InboxMark, NewOutgoing, Store};
use trmx_durable::clock::{StartClock, human_span};

pub use clock::{Clock, GuardedClock, ManualClock, SystemClock, TimeSource, node_clock};
pub use disk::StoreFaults;
pub use trmx_proto::body::{Body, BodyContext};
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
    /// The federation's CRL: a broker certificate it lists is refused.
    pub crl: Option<PathBuf>,
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
    /// How often the node asks the broker about messages submitted that long
    /// ago without a receipt, and submits again those the broker lost
    /// (`None`: never).
    pub outbox_check_interval: Option<Duration>,
    /// How long after an entry `FAILED` as expired or dead-lettered the outbox check
    /// still asks the broker about it (an operator may redrive it, and its delivery
    /// receipt be lost), at most once per `link::REDRIVE_ASK_PERIOD` (`None`: never).
    pub redrive_watch: Option<Duration>,
    /// sled page cache size.
    pub cache_capacity_bytes: u64,
    /// How long a withdrawal waits for the broker: first for the answer to a submit in
    /// progress (the message may be in it), then for the answer to its own call. Past
    /// either it answers `UNAVAILABLE` (try again); submits wait for it meanwhile.
    pub withdraw_timeout: Duration,
    /// How long the receive loop waits for the broker's answer to an ack or a reject
    /// ([`BROKER_ANSWER_TIMEOUT`] by default): past it, the link takes the broker for
    /// broken and reconnects (the message comes again, and is acknowledged again).
    pub broker_answer_timeout: Duration,
    /// How long the submit loop (and the outbox check's submit of a message the broker
    /// lost) waits for the broker's answer to a `Submit` ([`SUBMIT_ANSWER_TIMEOUT`] by
    /// default): past it, the submit counts as failed and is tried again after the
    /// backoff (the broker's idempotency makes a second copy impossible).
    pub submit_answer_timeout: Duration,
    /// How often the link compares the certificate its connection presents with the
    /// certificate file; when they differ (a renewal), it moves to a new connection, once
    /// the broker has answered a call on it (a certificate it refuses leaves the link
    /// where it is, and its next connections present the old one too).
    pub certificate_check_interval: Duration,
    /// How far the system clock may be from the store's last run at start.
    pub clock_bounds: ClockBounds,
    /// How long [`NodeCore::shutdown`] waits for the sends and withdrawals under way when
    /// it starts ([`SHUTDOWN_GRACE`] by default) before it stops the link: what still
    /// runs then is cut as a crash would cut it (each of their store changes is one
    /// transaction, and the same call again finds what was done).
    pub shutdown_grace: Duration,
}

/// How far the system clock may be from the last time a node ran on its store, when it
/// starts (see [`NodeCore::start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockBounds {
    /// Furthest behind without a warning (`storage.max_clock_step_secs`).
    pub max_step: Duration,
    /// Furthest, ahead or behind (`storage.max_downtime_secs`); `None`: no check.
    pub max_downtime: Option<Duration>,
}

impl Default for ClockBounds {
    fn default() -> Self {
        Self {
            max_step: Duration::from_secs(60),
            max_downtime: Some(Duration::from_secs(7 * 86_400)),
        }
    }
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
    /// The case: one this node sent or received a message in. `None` opens a new
    /// case (random UUID v4), or, with `in_reply_to`, takes the case of the message
    /// it answers, which must be one this node received.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// `rejected-by-broker`, `rejected-by-recipient`, `expired`,
    /// `dead-lettered`, `purged`, `withdrawn`, `erased`, `lost-by-broker`.
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
    /// The outcomes of receipts that contradicted the first final report, which stands.
    pub contradicted_by: Vec<String>,
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
    /// When its sender created it (a message sent from here: when it was queued).
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

/// How often the link checks whether the node certificate changed, by default
/// ([`CoreConfig::certificate_check_interval`]): a renewed certificate is presented to the
/// broker within seconds, not from whenever the connection happens to break.
pub(crate) const CERTIFICATE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How long a withdrawal waits for the broker, by default ([`CoreConfig::withdraw_timeout`]).
pub(crate) const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the receive loop waits for the broker's answer to an ack or a reject, by
/// default ([`CoreConfig::broker_answer_timeout`]): the broker answers once its write is
/// flushed, within milliseconds when all is well.
pub const BROKER_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the submit loop waits for the broker's answer to a `Submit`, by default
/// ([`CoreConfig::submit_answer_timeout`], `broker.submit_answer_timeout_secs`). Longer than [`BROKER_ANSWER_TIMEOUT`]: a
/// large envelope on a slow link takes its time to arrive, and a broker ends every
/// request that takes longer than its `limits.request_timeout` (60 s by default) itself.
/// But bounded: a broker that takes a submit and never answers (its store stalled, a
/// proxy that holds the stream, a broken broker), on a connection that stays up, held
/// every message behind it in the outbox until the node restarted.
pub const SUBMIT_ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a shutdown waits for the sends and withdrawals under way, by default
/// ([`CoreConfig::shutdown_grace`]): long enough for one that has started to end, as a
/// withdrawal waits at most twice [`CoreConfig::withdraw_timeout`] (15 s by default)
/// for the broker (for a submit in progress, then for its own call) and a send at most
/// twice 3 s for the broker's registry (`REGISTRY_REFRESH_WAIT`), plus their store
/// writes; short enough that a broker that does not answer does not hold a stop up for
/// long (systemd kills a service that takes 90 s to stop).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2 * WITHDRAW_TIMEOUT.as_secs() + 5);

/// What [`NodeCore::withdraw`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawal {
    /// Withdrawn: the recipient will not get it from the broker.
    Done,
    /// Withdrawn here; the broker could not be reached, and an earlier submit may have
    /// brought it there: the node withdraws it there too as soon as it reaches the
    /// broker. If the recipient got it first, its delivery receipt will say so.
    BrokerPending,
}

/// Why something is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueKind {
    /// We sent a request with `respond_by`; no answer yet.
    AwaitingAnswer,
    /// We received a request with `respond_by`; we have not answered.
    AnswerOwed,
    /// A follow-up's `next_follow_up_due` passed with no later follow-up on the case
    /// from the same sender to the same recipient.
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

/// Where a page of [`NodeCore::due`] starts: the first item at or after this date and
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueCursor {
    /// The date.
    pub due: Date,
    /// The message, in the byte order of its id among those of one date.
    pub message_id: MessageId,
}

/// Where a page of [`NodeCore::case_timeline`] starts: the first message of the case at
/// or after this creation time and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaseCursor {
    /// The creation time ([`TimelineEntry::at`]).
    pub at: Millis,
    /// The message, in the byte order of its id among those of one instant.
    pub message_id: MessageId,
}

/// Messages in a page of [`NodeCore::case_timeline`] asked with limit 0: every case but
/// an exceptional one fits (a case holds tens of messages), in about 150 KB.
pub const CASE_PAGE_DEFAULT: usize = 1_000;
/// Most messages in a page of [`NodeCore::case_timeline`] (about 1.5 MB, within the 4 MiB
/// a gRPC client accepts by default).
pub const CASE_PAGE_MAX: usize = 10_000;

/// The size of a page of [`NodeCore::case_timeline`] asked with `limit`.
fn case_page_limit(limit: usize) -> usize {
    match limit {
        0 => CASE_PAGE_DEFAULT,
        limit => limit.min(CASE_PAGE_MAX),
    }
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
    /// Where the listing starts (a [`Page::next`] of an earlier page): the
    /// entries at or below this seq; `None` for the newest.
    pub start: Option<u64>,
}

/// One page of a listing: of the outbox or inbox (newest first, continued at the seq
/// `C`), of what is due (oldest first, continued at a [`DueCursor`]), or of a case
/// timeline (oldest first, continued at a [`CaseCursor`]).
#[derive(Debug, Clone)]
pub struct Page<T, C = u64> {
    /// The entries.
    pub entries: Vec<T>,
    /// Where the next page starts ([`ListFilter::start`], or the `start` of
    /// [`NodeCore::due`] or [`NodeCore::case_timeline`]); `None` when no further entry
    /// matches.
    pub next: Option<C>,
}

impl<T, C> Page<T, C> {
    /// The page with `f` applied to each entry.
    pub(crate) fn try_map<U, E>(self, f: impl FnMut(T) -> Result<U, E>) -> Result<Page<U, C>, E> {
        Ok(Page {
            entries: self.entries.into_iter().map(f).collect::<Result<_, _>>()?,
            next: self.next,
        })
    }
}

/// What the node is doing.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// This node.
    pub participant: ParticipantId,
    /// Whether the receive stream to the broker is open.
    pub broker_connected: bool,
    /// The last broker error since the node was last connected (code and message;
    /// never personal data).
    pub last_broker_error: Option<String>,
    /// Outbox entries waiting to be submitted.
    pub outbox_queued: u64,
    /// Outbox entries submitted, no outcome yet.
    pub outbox_submitted: u64,
    /// Outbox entries failed.
    pub outbox_failed: u64,
    /// Inbox entries durably stored (an entry is counted once its flush is done, as
    /// it is listed and watched then).
    pub inbox_total: u64,
    /// Highest inbox `seq` durably stored.
    pub last_inbox_seq: u64,
    /// The node certificate the next connection to the broker presents; `None` when
    /// it cannot be read.
    pub certificate: Option<CertificateStatus>,
    /// The end of validity of the broker's certificate as the node's last handshake
    /// with the broker saw it; `None` before the first one (or offline).
    pub broker_certificate_not_after: Option<SystemTime>,
    /// Messages withdrawn here whose withdrawal on the broker is still to be done.
    pub withdrawals_pending: u64,
    /// Why the store's last flush failed (a full or failing disk); `None` when it
    /// succeeded.
    pub store_error: Option<String>,
}

/// The node certificate in [`NodeStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateStatus {
    /// Its serial, lower-case hex.
    pub serial_hex: String,
    /// The end of its validity.
    pub not_after: SystemTime,
    /// Why the TLS files as they are now are not used (they changed, and cannot be:
    /// a key that is not the certificate's, another identity, ...; or the broker did not
    /// accept their certificate): the certificate above is the one read before, or the
    /// one the connection presents. `None` when the files are in force.
    pub refused: Option<String>,
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
    /// A configured limit is reached (`RESOURCE_EXHAUSTED`): the message names its
    /// config key.
    #[error("{what}: the limit {key} = {limit} is reached; close one, or raise {key}")]
    LimitReached {
        /// What there is too much of, e.g. `too many Watch streams open`.
        what: &'static str,
        /// The config key of the limit, e.g. `api.max_watch_streams`.
        key: &'static str,
        /// Its value.
        limit: usize,
    },
    /// The configuration is unusable.
    #[error("config: {0}")]
    Config(String),
    /// The system clock disagrees with the last time a node ran on the store (see
    /// [`ClockBounds`]): the node does not start.
    #[error("clock: {0}")]
    ClockJump(String),
    /// The node is shutting down: it takes no new send or withdrawal (`UNAVAILABLE`).
    #[error("the node is shutting down: try again once it runs again")]
    ShuttingDown,
}

/// The environment variable of the test-only fail point.
pub const FAILPOINT_ENV: &str = "TRMX_FAILPOINT";

/// The running node core. Cheap to clone (shared state inside).
#[derive(Debug, Clone)]
pub struct NodeCore {
    inner: Arc<Inner>,
}

/// Link state shown by [`NodeCore::status`].
#[derive(Debug, Default)]
struct LinkState {
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// `None` until the first `GetInfo` answered.
    participants: Mutex<Option<Vec<ParticipantInfo>>>,
    /// The broker's `limits.max_envelope_bytes`; 0 until a `GetInfo` answered.
    max_envelope_bytes: AtomicU64,
    /// Held by the one registry refresh of [`check_recipient`] in flight: the sends that
    /// wait for it take what it found rather than each asking the broker again.
    registry_refresh: tokio::sync::Mutex<()>,
    /// Registry refreshes of [`check_recipient`] done (answered or not).
    registry_refreshes: AtomicU64,
    /// Whether the last of them went unanswered: its send, and those that waited for it,
    /// were decided by a registry the broker did not confirm just now, and their refusal
    /// says so.
    registry_refresh_failed: AtomicBool,
}

#[derive(Debug)]
struct Inner {
    config: CoreConfig,
    clock: Arc<dyn Clock>,
    store: Store,
    link: LinkState,
    /// The broker link's channel (`None` when started offline); `client` calls
    /// through it. Its TLS handle is always the one of the connection in use: the
    /// handle of the first channel would go on saying, after a move to a renewed
    /// certificate, that the connection presents the old one.
    channel: Option<LinkChannel>,
    /// `None` when started offline.
    client: Option<ExchangeClient<LinkChannel>>,
    submit_wake: Notify,
    /// Held by the submit loop from its last look that an entry is still
    /// `QUEUED` until the broker's answer to its submit is stored, and by a
    /// withdrawal while it takes back a `QUEUED` entry: so that a message
    /// being submitted is never called withdrawn locally (it waits, then is
    /// withdrawn on the broker, with the broker's answer).
    submit_gate: tokio::sync::Mutex<()>,
    /// The inbox as of the last flush: its highest seq and its number of entries (wakes
    /// watchers). What is committed but not yet flushed is not in it, since a crash
    /// before the flush takes it back: watchers, listings and the status stop here.
    durable_inbox: watch::Sender<InboxMark>,
    /// The sends and withdrawals running in their tasks ([`detached`]), and whether new
    /// ones are taken: not once a shutdown has started, which waits for them.
    changes: watch::Sender<Changes>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    failpoint_inbox_after_store: bool,
    /// What was last said about the node certificate.
    notices: Mutex<CertNotices>,
    /// The broker did not accept the renewed certificate the link last tried
    /// (`link::certificate_loop`): the link stays on its connection with the old one, and
    /// presents the old one on its next connections too.
    move_refused: Mutex<Option<MoveRefused>>,
}

/// The sends and withdrawals running in tasks of their own (see [`detached`]).
#[derive(Debug, Default)]
struct Changes {
    /// How many run.
    running: usize,
    /// A shutdown has started: no new one is taken.
    closed: bool,
}

/// One of [`Changes::running`], until dropped with the task it runs in: when that ends,
/// or when the runtime cuts it.
#[derive(Debug)]
struct Running(Arc<Inner>);

impl Running {
    /// Counts one more change running, unless a shutdown has started (`None`).
    fn start(inner: &Arc<Inner>) -> Option<Running> {
        let taken = inner.changes.send_if_modified(|changes| {
            if changes.closed {
                return false;
            }
            changes.running += 1;
            true
        });
        taken.then(|| Running(Arc::clone(inner)))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .changes
            .send_modify(|changes| changes.running = changes.running.saturating_sub(1));
    }
}

/// A renewed certificate the broker did not accept (see `Inner::move_refused`).
#[derive(Debug, Clone)]
pub(crate) struct MoveRefused {
    /// The certificate the link's connection presents.
    pub(crate) connected: Option<trmx_certs::CertInfo>,
    /// Why, for `trmx-node status`.
    pub(crate) reason: String,
    /// The broker refused it, as opposed to not answering (in time, or at all): then
    /// the files' certificate may well be good.
    pub(crate) refused: bool,
}

/// The broker link of a node started online, for [`NodeCore::open`].
struct BrokerLink {
    channel: LinkChannel,
    /// What [`NodeCore::start`] said about the certificate.
    notices: CertNotices,
}

impl Inner {
    /// Runs store work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| NodeError::Store(format!("store task failed: {e}")))?
    }
}

impl Inner {
    /// The broker's participant registry as last fetched; `None` until a
    /// `GetInfo` answered.
    fn cached_participants(&self) -> Option<Vec<ParticipantInfo>> {
        self.link
            .participants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Runs `work`, a local API call that writes (`what`: `send`, `withdrawal`), in a task
/// of its own and waits for its result. The call's own future is dropped wherever it
/// awaits when its client gives up (a gRPC deadline, the CLI's `--timeout`, Ctrl-C):
/// a send would leave its entry stored without waking the submit loop, and a
/// withdrawal the message withdrawn on the broker but queued or submitted here (and
/// then submitted again). The task runs to its end either way (every step of it is
/// bounded), and the same call again finds what it did. [`NodeCore::shutdown`] waits
/// for it (within [`CoreConfig::shutdown_grace`]), and once a shutdown has started no
/// new one starts ([`NodeError::ShuttingDown`]).
async fn detached<T: Send + 'static, F>(
    inner: &Arc<Inner>,
    what: &str,
    work: impl FnOnce(Arc<Inner>) -> F,
) -> Result<T, NodeError>
where
    F: Future<Output = Result<T, NodeError>> + Send + 'static,
{
    let running = Running::start(inner).ok_or(NodeError::ShuttingDown)?;
    let work = work(Arc::clone(inner));
    tokio::spawn(async move {
        let _running = running;
        work.await
    })
    .await
    .map_err(|e| NodeError::Store(format!("{what} task failed: {e}")))?
}

/// Asks the broker for its participant registry (`GetInfo`, waiting at most
/// `wait`) and caches it.
async fn fetch_participants(
    inner: &Inner,
    wait: Duration,
) -> Result<Vec<ParticipantInfo>, NodeError> {
    let Some(mut client) = inner.client.clone() else {
        return Err(NodeError::BrokerUnavailable("the node runs offline".into()));
    };
    let info = tokio::time::timeout(wait, client.get_info(pb::GetInfoRequest {}))
        .await
        .map_err(|_| NodeError::BrokerUnavailable("GetInfo timed out".into()))?
        .map_err(|s| NodeError::BrokerUnavailable(link::status_text(&s)))?
        .into_inner();
    inner.cache_broker_info(&info);
    Ok(info
        .participants
        .iter()
        .filter_map(link::participant_info)
        .collect())
}

/// Longest wait for the broker's registry when a send names a recipient that
/// the cached registry refuses.
const REGISTRY_REFRESH_WAIT: Duration = Duration::from_secs(3);

/// Why the broker, by its registry `participants`, would refuse a `kind`
/// message to `recipient` (as `NOT_FOUND` or `FAILED_PRECONDITION`), if it would.
fn registry_refusal(
    participants: &[ParticipantInfo],
    recipient: &ParticipantId,
    kind: Kind,
) -> Option<ValidationError> {
    match participants.iter().find(|p| p.id == *recipient) {
        None => Some(ValidationError::new(
            "recipient",
            format!(
                "{recipient} is not a participant of the broker (trmx-node participants lists them)"
            ),
        )),
        Some(p) if !p.accepts.contains(&kind) => Some(ValidationError::new(
            "kind",
            format!(
                "{recipient} does not accept {kind} messages (trmx-node participants lists what each accepts)"
            ),
        )),
        Some(_) => None,
    }
}

/// Refuses up front a message that the broker's registry says it would
/// refuse, so that the caller is told now instead of a moment after "queued".
/// A node that never reached the broker knows no registry and queues (the
/// broker decides). A refusal by the cached registry is checked again with a
/// fresh one (a participant may have joined, or started to accept the kind,
/// since the last connect); when the broker cannot answer, the cached one
/// decides, and the refusal says so (the recipient may have joined since).
async fn check_recipient(
    inner: &Inner,
    recipient: &ParticipantId,
    kind: Kind,
) -> Result<(), NodeError> {
    // (read before the cache: a refresh done after this is one this send can take)
    let done = inner.link.registry_refreshes.load(Ordering::SeqCst);
    let Some(cached) = inner.cached_participants() else {
        return Ok(());
    };
    if registry_refusal(&cached, recipient, kind).is_none() {
        return Ok(());
    }
    // One refresh at a time: a local client sending many messages to a recipient the
    // registry refuses would otherwise have as many `GetInfo` calls made at once. A send
    // that waited while another refresh ran takes the registry that one left cached (the
    // fresh one, or the old one when the broker did not answer).
    let _one = inner.link.registry_refresh.lock().await;
    let refreshed = if inner.link.registry_refreshes.load(Ordering::SeqCst) == done {
        let fetched = fetch_participants(inner, REGISTRY_REFRESH_WAIT).await;
        inner
            .link
            .registry_refresh_failed
            .store(fetched.is_err(), Ordering::SeqCst);
        inner.link.registry_refreshes.fetch_add(1, Ordering::SeqCst);
        fetched.is_ok()
    } else {
        !inner.link.registry_refresh_failed.load(Ordering::SeqCst)
    };
    // The registry cached now decides, not the one read before the wait: a refresh that
    // answered cached its registry, and one that did not may have been outrun by the link
    // reconnecting, which caches the broker's registry too (the recipient may be in it).
    let current = inner.cached_participants().unwrap_or(cached);
    match registry_refusal(&current, recipient, kind) {
        None => Ok(()),
        Some(refusal) if refreshed => Err(NodeError::Invalid(refusal)),
        // (the caller is told what to do: a participant added to the broker since the
        // node last reached it is refused by the old registry only until it is reached)
        Some(refusal) => {
            // (a participant that does not accept the kind is there: what may have
            // changed since is what it accepts)
            let change = if refusal.field == "kind" {
                "if the participant has come to accept the kind since"
            } else {
                "if the participant joined since"
            };
            Err(NodeError::Invalid(ValidationError::new(
                refusal.field,
                format!(
                    "{}, by the registry the node fetched when it last reached the broker (the \
                     broker could not be asked again just now: {change}, send again once the \
                     node is connected)",
                    refusal.rule
                ),
            )))
        }
    }
}

/// Refuses up front an envelope larger than the broker's `max_envelope_bytes`, which
/// the broker would refuse a moment after "queued". As with the registry, a node that
/// never reached the broker does not know the limit and queues, and a refusal by the
/// limit last fetched is checked again against a fresh one (the broker's operators may
/// have raised it).
async fn check_envelope_size(inner: &Inner, envelope: &pb::Envelope) -> Result<(), NodeError> {
    let size = prost::Message::encoded_len(envelope) as u64;
    let limit = || inner.link.max_envelope_bytes.load(Ordering::SeqCst);
    let over = |limit: u64| limit != 0 && size > limit;
    if !over(limit()) {
        return Ok(());
    }
    // (when the broker cannot answer, the limit fetched before decides)
    if fetch_participants(inner, REGISTRY_REFRESH_WAIT)
        .await
        .is_ok()
        && !over(limit())
    {
        return Ok(());
    }
    Err(NodeError::Invalid(ValidationError::new(
        "body",
        format!(
            "makes an envelope of {size} bytes, and the broker accepts at most {} \
             (its limits.max_envelope_bytes): send fewer or smaller attachments",
            limit()
        ),
    )))
}

/// Refuses a reply that cannot answer the received message `answered` that
/// its `in_reply_to` names: sent to another participant than its sender (who
/// would get an answer to a message it never sent, while ours stays owed),
/// filed in another case, or an answer of the wrong kind. Participant IDs,
/// kinds and case references are not body values.
fn check_reply(req: &SendRequest, kind: Kind, answered: &InboxEntry) -> Result<(), NodeError> {
    let refuse =
        |field: &str, rule: String| Err(NodeError::Invalid(ValidationError::new(field, rule)));
    if answered.sender != req.recipient {
        return refuse(
            "in_reply_to",
            format!(
                "is a message from {}: a reply goes to the sender of the message it answers, not to {}",
                answered.sender, req.recipient
            ),
        );
    }
    if let Some(case) = req.case_ref
        && case != answered.case_ref
    {
        return refuse(
            "case_ref",
            format!(
                "is not the case of the message in_reply_to answers ({}): a reply belongs to that case",
                answered.case_ref
            ),
        );
    }
    if let Some(asks) = kind.answers()
        && answered.kind != asks
    {
        return refuse(
            "in_reply_to",
            format!("is a {}: a {kind} answers a {asks}", answered.kind),
        );
    }
    Ok(())
}

/// Checks an idempotency key: 1..=128 of `[A-Za-z0-9._:-]`.
fn check_idempotency_key(key: &str) -> Result<(), NodeError> {
    let ok = (1..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NodeError::Invalid(ValidationError::new(
            "idempotency_key",
            "must be 1-128 characters of A-Z a-z 0-9 . _ : -",
        )))
    }
}

fn check_config(config: &CoreConfig) -> Result<(), NodeError> {
    if config.max_in_flight == 0 {
        return Err(NodeError::Config("max_in_flight must be at least 1".into()));
    }
    if config.reconnect_min.is_zero() || config.reconnect_min > config.reconnect_max {
        return Err(NodeError::Config(
            "reconnect_min must be positive and at most reconnect_max".into(),
        ));
    }
    if config.retention_check_interval.is_zero() {
        return Err(NodeError::Config(
            "retention_check_interval must be positive".into(),
        ));
    }
    Ok(())
}

/// SHA-256 (hex) of what makes a send request what it is, to tell a retry
/// (same content) from a reuse of the key (different content).
fn fingerprint(req: &SendRequest, payload: &[u8]) -> String {
    let digest = trmx_proto::envelope::sha256(payload);
    let mut text = String::new();
    for part in [
        req.recipient.to_string(),
        req.case_ref.map(|c| c.to_string()).unwrap_or_default(),
        req.in_reply_to.map(|m| m.to_string()).unwrap_or_default(),
        format!("{:?}", req.priority),
        req.body.kind().name().to_owned(),
        req.expires_at
            .map(|t| to_millis(t).to_string())
            .unwrap_or_default(),
    ] {
        text.push_str(&part);
        text.push('\n');
    }
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(&digest);
    trmx_proto::envelope::sha256(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long before its end of validity the node certificate is warned about.
pub const CERT_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// How often a node certificate that expires soon, or has expired, is said again: a
/// node runs for months, and a warning at its start alone would be long scrolled away
/// when the date comes.
pub const CERT_EXPIRY_REPEAT: Duration = Duration::from_secs(86_400);

/// Checks the node certificate (`tls.cert`) against the config: it must be a
/// participant certificate for `config.participant` — the broker knows the node by its
/// certificate only, so with another participant's certificate the node would receive
/// that participant's messages into this one's database. Returns what it holds.
pub fn check_node_certificate(config: &CoreConfig) -> Result<trmx_certs::CertInfo, NodeError> {
    let path = config.tls.cert.display();
    let info = trmx_certs::CertInfo::from_pem_file(&config.tls.cert)
        .map_err(|e| NodeError::Config(format!("tls.cert: {e}")))?;
    let Some(certified) = info.identity.participant() else {
        return Err(NodeError::Config(format!(
            "tls.cert: {path} is a {} certificate, not a participant's node certificate",
            info.identity.role.kind()
        )));
    };
    if certified != config.participant.as_str() {
        return Err(NodeError::Config(format!(
            "participant: {} does not match the node certificate {path}, which is for {certified}",
            config.participant
        )));
    }
    Ok(info)
}

/// Something said about the node certificate: about what (a serial, a reason), and when.
#[derive(Debug)]
struct Said {
    about: String,
    at: SystemTime,
}

/// What was last said about the node certificate, so that it is said again once a
/// [`CERT_EXPIRY_REPEAT`] and not at every check.
#[derive(Debug, Default)]
struct CertNotices {
    /// Its expiry (about its serial).
    expiry: Option<Said>,
    /// A change of the TLS files that is not used (about the reason).
    refused: Option<Said>,
    /// The expiry of the broker's certificate (about its serial).
    broker_expiry: Option<Said>,
    /// The revocation of the certificate the link holds (about its serial).
    held_revoked: Option<Said>,
}

/// Whether `about` is to be said at `now`, given what `said` holds (then recorded): not
/// when it was said less than `every` before.
fn say_again(said: &mut Option<Said>, about: &str, now: SystemTime, every: Duration) -> bool {
    if let Some(last) = said.as_ref()
        && last.about == about
        && now.duration_since(last.at).is_ok_and(|ago| ago < every)
    {
        return false;
    }
    *said = Some(Said {
        about: about.to_owned(),
        at: now,
    });
    true
}

/// What is to be said at `now` of the expiry of the certificate `info`: `None` when
/// nothing (more than [`CERT_EXPIRY_WARNING`] left, or `said` says it was said of the
/// same certificate less than [`CERT_EXPIRY_REPEAT`] before, else recorded);
/// `Some(Err(_))` when it has expired, `Some(Ok(left))` when it expires soon. The node's
/// certificate and the broker's are warned of alike.
fn expiry_to_say(
    info: &trmx_certs::CertInfo,
    now: SystemTime,
    said: &mut Option<Said>,
) -> Option<Result<Duration, std::time::SystemTimeError>> {
    let left = info.not_after.duration_since(now);
    if left.as_ref().is_ok_and(|left| *left >= CERT_EXPIRY_WARNING) {
        return None;
    }
    say_again(said, &info.serial_hex, now, CERT_EXPIRY_REPEAT).then_some(left)
}

/// Says that the node certificate `info` has expired (ERROR) or expires within
/// [`CERT_EXPIRY_WARNING`] (WARN), unless `said` says so of the same certificate less
/// than [`CERT_EXPIRY_REPEAT`] before `now`.
fn note_certificate_expiry(
    config: &CoreConfig,
    info: &trmx_certs::CertInfo,
    now: SystemTime,
    said: &mut Option<Said>,
) {
    let Some(left) = expiry_to_say(info, now, said) else {
        return;
    };
    let path = config.tls.cert.display();
    let not_after = trmx_certs::format_time(info.not_after);
    match left {
        // Not refused: the node still serves what it stores (the referrals it received, to
        // the case workers) while the renewal comes; only the broker is out of reach.
        Err(_) => {
            error!(participant = %config.participant, cert = %path, not_after = %not_after, "the node certificate has expired: the broker refuses it, so nothing is sent or received until a renewed certificate is installed (the local store is still served)");
        }
        Ok(left) => {
            warn!(participant = %config.participant, cert = %path, not_after = %not_after, days_left = left.as_secs() / 86_400, "the node certificate expires soon: renew it");
        }
    }
}

/// Says that the broker's certificate `info` (as the last handshake saw it) has expired
/// on the node's clock (ERROR) or expires within [`CERT_EXPIRY_WARNING`] (WARN), as
/// [`note_certificate_expiry`] does of the node's. The node checks the broker's
/// certificate on its clock at each handshake: once it has expired, the next connection
/// fails, and nothing is sent or received until the broker presents a renewed one.
fn note_broker_certificate_expiry(
    config: &CoreConfig,
    info: &trmx_certs::CertInfo,
    now: SystemTime,
    said: &mut Option<Said>,
) {
    let Some(left) = expiry_to_say(info, now, said) else {
        return;
    };
    let broker = info.identity.to_string();
    let not_after = trmx_certs::format_time(info.not_after);
    match left {
        Err(_) => {
            error!(participant = %config.participant, broker = %broker, broker_serial = %info.serial_hex, not_after = %not_after, "the broker certificate has expired on the node's clock: the node refuses it at its next connection, so nothing is sent or received once the connection open now breaks, until the broker presents a renewed certificate (tell the broker's operator; if the broker's certificate is good, check this machine's clock)");
        }
        Ok(left) => {
            warn!(participant = %config.participant, broker = %broker, broker_serial = %info.serial_hex, not_after = %not_after, days_left = left.as_secs() / 86_400, "the broker certificate expires soon: the node cannot connect to the broker once it has, so tell the broker's operator to renew it");
        }
    }
}

impl Inner {
    /// Says, once a day at most, when the broker's certificate, as the link's last
    /// handshake saw it, expires soon or has expired.
    fn check_broker_certificate(&self) {
        let Some(seen) = self.link_tls().and_then(|tls| tls.server_certificate()) else {
            return;
        };
        let now = self.clock.now();
        let mut said = self
            .notices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        note_broker_certificate_expiry(&self.config, &seen, now, &mut said.broker_expiry);
    }

    /// Says at ERROR, once a day at most, when the link holds the old certificate (the
    /// broker did not take the renewed one of the files) and the node's CRL (`tls.crl`)
    /// lists it: the broker refuses it at the next connection, or as soon as it has that
    /// CRL too. What to do depends on why the renewed one was not taken: one the broker
    /// refused must be replaced by a certificate it accepts now, not once the broker has
    /// cut the node off; one the broker did not answer about may well be good (the link
    /// tries it again every minute and moves to it once the broker answers), so the
    /// broker's state is what to look at. The CRL is looked at when it changed (the
    /// channel keeps what it found) and is said of at once, and so is a change of why;
    /// the daily check says it again. `revoked` is what
    /// [`trmx_transport::ChannelTls::held_revoked`] found (it reads files: off the
    /// runtime).
    fn note_held_revocation(&self, revoked: Option<trmx_certs::CertInfo>) {
        // (not refused: held because the broker did not answer the proof of the renewed
        // one; with nothing recorded, as refused, the advice that is safe either way)
        let refused = self
            .move_refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_none_or(|moved| moved.refused);
        let now = self.clock.now();
        let mut said = self
            .notices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(held) = revoked else {
            said.held_revoked = None;
            return;
        };
        let about = format!("{} {refused}", held.serial_hex);
        if !say_again(&mut said.held_revoked, &about, now, CERT_EXPIRY_REPEAT) {
            return;
        }
        let crl = self
            .config
            .crl
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string());
        let (me, serial, not_after, cert) = (
            &self.config.participant,
            &held.serial_hex,
            trmx_certs::format_time(held.not_after),
            self.config.tls.cert.display(),
        );
        if refused {
            error!(participant = %me, serial = %serial, not_after = %not_after, crl = %crl, cert = %cert, "the old node certificate, which the node goes on presenting because the broker refused the renewed one in the certificate files, is revoked: the node's CRL (tls.crl) lists it, so the broker refuses it at the next connection, or as soon as it has this CRL, and then nothing is sent or received; install a certificate the broker accepts now");
        } else {
            error!(participant = %me, serial = %serial, not_after = %not_after, crl = %crl, cert = %cert, "the old node certificate, which the node goes on presenting because the broker did not answer when the renewed one in the certificate files was tried (it did not refuse it), is revoked: the node's CRL (tls.crl) lists it, so the broker refuses it at the next connection, or as soon as it has this CRL, and then nothing is sent or received until the link moves to the renewed one, which it tries again every minute and takes once the broker answers; check that the broker is up and answers (trmx-node status, its operator)");
        }
    }

    /// Records (or, with `None`, clears) a renewed certificate the broker did not accept.
    pub(crate) fn set_move_refused(&self, refused: Option<MoveRefused>) {
        *self
            .move_refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = refused;
    }

    /// The TLS files of the broker link, with the connection in use (`None`: offline,
    /// or a test link).
    fn link_tls(&self) -> Option<trmx_transport::ChannelTls> {
        self.channel.as_ref()?.tls()
    }

    /// Reads the TLS files of the broker link again (they may have been renewed) and
    /// says, once a day at most, when the certificate the link presents expires soon or
    /// has expired, and when a change of the files cannot be used (found now, not at
    /// the next connection, which may be weeks away); and of the broker's certificate
    /// ([`Inner::check_broker_certificate`]).
    fn recheck_certificate(&self) {
        let Some(tls) = self.link_tls() else {
            return;
        };
        // (and the broker's, as the last handshake saw it, and whether a held one is
        // revoked)
        self.check_broker_certificate();
        self.note_held_revocation(tls.held_revoked());
        let status = tls.status();
        let now = self.clock.now();
        let mut said = self
            .notices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // (the certificate the link presents: while it holds the old one, whose renewal
        // the broker refused, that one, not the files')
        let presents = if status.held {
            &status.connected
        } else {
            &status.presented
        };
        if let Some(info) = presents {
            note_certificate_expiry(&self.config, info, now, &mut said.expiry);
        }
        match &status.refused {
            // (the channel said it when it found it: this is the daily reminder)
            Some(why) if said.refused.as_ref().is_none_or(|s| s.about != *why) => {
                said.refused = Some(Said {
                    about: why.clone(),
                    at: now,
                });
            }
            Some(why) if say_again(&mut said.refused, why, now, CERT_EXPIRY_REPEAT) => {
                let serial = status.presented.as_ref().map(|i| i.serial_hex.as_str());
                warn!(participant = %self.config.participant, cert = %self.config.tls.cert.display(), serial = serial.unwrap_or("-"), reason = %why, "the TLS files changed but cannot be used: the node keeps presenting the certificate read before; fix the files");
            }
            Some(_) => {}
            None => said.refused = None,
        }
    }

    /// The certificate the broker link presents from its next connection, or the
    /// certificate file's when there is no link.
    fn certificate_status(&self) -> Option<CertificateStatus> {
        let move_refused = self
            .move_refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (info, refused) = match self.link_tls() {
            Some(tls) => {
                let status = tls.status();
                match (status.refused, move_refused) {
                    (Some(refused), _) => (status.presented, Some(refused)),
                    // (the broker did not accept the files' certificate: the link goes on
                    // with the one its connection presents)
                    (None, Some(moved)) => {
                        let reason = match tls.held_revoked() {
                            Some(held) => format!(
                                "{}; and the node's CRL (tls.crl) lists the old certificate \
                                 presented meanwhile (serial {}) as revoked: the broker \
                                 refuses it at the next connection",
                                moved.reason, held.serial_hex
                            ),
                            None => moved.reason,
                        };
                        (moved.connected, Some(reason))
                    }
                    (None, None) => (status.presented, None),
                }
            }
            None => (
                trmx_certs::CertInfo::from_pem_file(&self.config.tls.cert).ok(),
                None,
            ),
        };
        info.map(|info| CertificateStatus {
            serial_hex: info.serial_hex,
            not_after: info.not_after,
            refused,
        })
    }
}

/// The largest message the node takes from or sends to the broker: twice the
/// broker's default `limits.max_envelope_bytes`, so that a broker configured
/// higher still gets through; what is over the broker's limit it refuses. The
/// receive stream reads deliveries up to the broker's own limit when that is
/// higher (`link::delivery_limit`).
pub const MAX_DELIVERY_BYTES: usize = 16 << 20;

/// The `Exchange` client of the broker link over `channel`. A delivery is an
/// envelope of up to the broker's `max_envelope_bytes` (8 MiB by default):
/// with tonic's 4 MiB default a larger one broke the stream at every attempt
/// instead of being stored or rejected.
fn broker_client(channel: LinkChannel) -> ExchangeClient<LinkChannel> {
    ExchangeClient::new(channel)
        .max_decoding_message_size(MAX_DELIVERY_BYTES)
        .max_encoding_message_size(MAX_DELIVERY_BYTES)
}

impl NodeCore {
    /// Opens the store and starts the broker link and retention tasks.
    ///
    /// Reads `TRMX_FAILPOINT` once: `inbox-after-store` makes the receive
    /// loop abort the process after a delivery is stored and flushed, before
    /// it is acknowledged (test-only).
    ///
    /// Refuses a node certificate that is not `config.participant`'s (see
    /// [`check_node_certificate`]) before anything is opened or dialled. One that
    /// has expired is logged at ERROR (the node still serves its store), one that
    /// expires within [`CERT_EXPIRY_WARNING`] at WARN; both are said again once a
    /// day while the node runs.
    ///
    /// The broker's certificate is checked on `clock` too (its validity, at each
    /// handshake): a running node's clock holds its time through a jump of the system
    /// clock, so such a jump does not make the broker's certificate look expired (or
    /// not yet valid) and cut the node off.
    pub async fn start(config: CoreConfig, clock: Arc<dyn Clock>) -> Result<NodeCore, NodeError> {
        let info = check_node_certificate(&config)?;
        let mut notices = CertNotices::default();
        note_certificate_expiry(&config, &info, clock.now(), &mut notices.expiry);
        // (the broker's certificate is checked on the node's clock, which holds its time
        // through a jump of the system clock as retention does)
        let tls_clock = Arc::clone(&clock);
        let opts = trmx_transport::ClientOptions {
            server_name: config.broker_server_name.clone(),
            crl: config.crl.clone(),
            clock: trmx_transport::TlsClock::new(move || tls_clock.now()),
            ..trmx_transport::ClientOptions::default()
        };
        let (channel, tls) =
            trmx_transport::client_channel_with_tls(&config.broker_addr, &config.tls, &opts)
                .map_err(|e| NodeError::Config(format!("broker connection: {e}")))?;
        let failpoint = std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == "inbox-after-store");
        let link = BrokerLink {
            channel: LinkChannel::new(channel, Some(tls)),
            notices,
        };
        Self::open(config, clock, Some(link), failpoint).await
    }

    /// Opens the store without a broker link: nothing is submitted or
    /// received, everything else works (tests, offline inspection).
    pub async fn start_offline(
        config: CoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<NodeCore, NodeError> {
        Self::open(config, clock, None, false).await
    }

    async fn open(
        config: CoreConfig,
        clock: Arc<dyn Clock>,
        link: Option<BrokerLink>,
        failpoint_inbox_after_store: bool,
    ) -> Result<NodeCore, NodeError> {
        let (channel, notices) = match link {
            Some(link) => (Some(link.channel), link.notices),
            None => (None, CertNotices::default()),
        };
        let client = channel.clone().map(broker_client);
        check_config(&config)?;
        let dir = config.data_dir.clone();
        let cache = config.cache_capacity_bytes;
        let store = tokio::task::spawn_blocking(move || Store::open(&dir, cache))
            .await
            .map_err(|e| NodeError::Store(format!("store task failed: {e}")))??;
        let now = to_millis(clock.now());
        check_clock(store.last_running()?, now, config.clock_bounds)?;
        let marking = store.clone();
        tokio::task::spawn_blocking(move || marking.mark_running(now))
            .await
            .map_err(|e| NodeError::Store(format!("store task failed: {e}")))??;
        let mut last_run = LastRunWriter::new(config.data_dir.clone());
        last_run.record(now).await;
        // (what a store holds when it opens is what its last run flushed)
        let inbox = store.inbox_mark()?;
        let (shutdown, _) = watch::channel(false);
        let (durable_inbox, _) = watch::channel(inbox);
        let (changes, _) = watch::channel(Changes::default());
        let inner = Arc::new(Inner {
            config,
            clock,
            store,
            link: LinkState::default(),
            channel: channel.clone(),
            client,
            submit_wake: Notify::new(),
            submit_gate: tokio::sync::Mutex::new(()),
            durable_inbox,
            changes,
            shutdown,
            tasks: Mutex::new(Vec::new()),
            failpoint_inbox_after_store,
            notices: Mutex::new(notices),
            move_refused: Mutex::new(None),
        });
        let mut tasks = Vec::new();
        if let (Some(client), Some(channel)) = (inner.client.clone(), channel) {
            tasks.push(tokio::spawn(link::receive_loop(
                inner.clone(),
                client.clone(),
                channel.generation(),
                inner.shutdown.subscribe(),
            )));
            if channel.tls().is_some() {
                tasks.push(tokio::spawn(link::certificate_loop(
                    inner.clone(),
                    channel,
                    inner.shutdown.subscribe(),
                )));
            }
            if let Some(interval) = inner.config.outbox_check_interval {
                tasks.push(tokio::spawn(link::outbox_check_loop(
                    inner.clone(),
                    client.clone(),
                    interval,
                    inner.shutdown.subscribe(),
                )));
            }
            tasks.push(tokio::spawn(link::submit_loop(
                inner.clone(),
                client,
                inner.shutdown.subscribe(),
            )));
        }
        tasks.push(tokio::spawn(retention_loop(
            inner.clone(),
            inner.shutdown.subscribe(),
        )));
        tasks.push(tokio::spawn(running_mark_loop(
            inner.clone(),
            last_run,
            inner.shutdown.subscribe(),
        )));
        *inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tasks;
        info!(participant = %inner.config.participant, online = inner.client.is_some(), "node core started");
        Ok(NodeCore { inner })
    }

    /// Takes no new send or withdrawal ([`NodeError::ShuttingDown`]) and waits for those
    /// under way, at most [`CoreConfig::shutdown_grace`] (their callers may have gone, and
    /// what still runs when the process exits is cut as by a crash); then stops the link
    /// and retention tasks, and flushes the store.
    pub async fn shutdown(&self) {
        self.inner
            .changes
            .send_modify(|changes| changes.closed = true);
        self.wait_for_changes().await;
        self.inner.shutdown.send_replace(true);
        let tasks = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in tasks {
            if let Err(e) = task.await {
                warn!(error = %e, "node core task ended abnormally");
            }
        }
        if let Err(e) = self.inner.store.flush_async().await {
            warn!(error = %e, "final flush failed");
        }
        info!(participant = %self.inner.config.participant, "node core stopped");
    }

    /// Waits for the sends and withdrawals under way, at most
    /// [`CoreConfig::shutdown_grace`] (a broker that does not answer must not hold a
    /// shutdown up).
    async fn wait_for_changes(&self) {
        let me = &self.inner.config.participant;
        let running = self.inner.changes.borrow().running;
        if running == 0 {
            return;
        }
        let grace = self.inner.config.shutdown_grace;
        info!(participant = %me, running, grace = ?grace, "shutdown waits for the sends and withdrawals under way");
        let mut changes = self.inner.changes.subscribe();
        let ended = tokio::time::timeout(grace, changes.wait_for(|c| c.running == 0)).await;
        if ended.is_err() {
            let running = self.inner.changes.borrow().running;
            warn!(participant = %me, running, grace = ?grace, "sends or withdrawals did not end within the shutdown grace (a broker that does not answer?): they are cut at exit, as a crash would cut them; the same call again finds what was done");
        }
    }

    /// Validates and stores a message as `QUEUED` (flushed before this returns),
    /// then wakes the submit loop. A recipient that the broker's registry,
    /// once known, does not list, or that does not accept the kind, is
    /// refused here (`Invalid`, field `recipient` or `kind`), and so is a `case_ref`
    /// that names no case this node sent or received a message in (field
    /// `case_ref`). A retry with the same idempotency key and
    /// content returns the entry stored the first time. A reply to a message received
    /// but not yet flushed flushes it first (the listings do not show it until then), and
    /// is `Store` (`UNAVAILABLE`: retry in a moment) when that flush fails; so is a
    /// `case_ref` known only from such messages.
    ///
    /// Runs to its end in a task of its own (`detached`): a client that gives up
    /// (its deadline, Ctrl-C) does not leave its entry stored but not submitted; a
    /// shutdown waits for it. Once a shutdown has started, `ShuttingDown`.
    pub async fn send(&self, req: SendRequest) -> Result<OutboxEntry, NodeError> {
        detached(&self.inner, "send", |inner| Self::send_now(inner, req)).await
    }

    /// [`Self::send`], in the task it runs in.
    async fn send_now(inner: Arc<Inner>, req: SendRequest) -> Result<OutboxEntry, NodeError> {
        let inner = &inner;
        check_idempotency_key(&req.idempotency_key)?;
        let kind = req.body.kind();
        if kind.is_broker_made() {
            return Err(NodeError::Invalid(ValidationError::new(
                "kind",
                "receipts are made by the broker only",
            )));
        }
        if kind.is_answer() && req.in_reply_to.is_none() {
            return Err(NodeError::Invalid(ValidationError::new(
                "in_reply_to",
                format!("is required for a {kind}"),
            )));
        }
        // (it would come back with the id of its own outbox entry, which the
        // node refuses to store: one id, one message)
        if req.recipient == inner.config.participant {
            return Err(NodeError::Invalid(ValidationError::new(
                "recipient",
                "is this node's own participant ID: a message goes to another organisation",
            )));
        }
        let now = inner.clock.now();
        req.body
            .validate(&BodyContext {
                in_reply_to: req.in_reply_to,
                today: Date::of(now),
            })
            .map_err(NodeError::Invalid)?;
        let expires_at = req
            .expires_at
            .or_else(|| inner.config.default_lifetime.map(|d| now + d));
        // (a retry of a send stored before gets its entry, as it did the
        // first time, whatever the registry or the clock says now)
        let store = inner.store.clone();
        let key = req.idempotency_key.clone();
        let retry = inner
            .blocking(move || store.idempotency_key_used(&key))
            .await?;
        if !retry {
            if expires_at.is_some_and(|at| at <= now) {
                return Err(NodeError::Invalid(ValidationError::new(
                    "expires_at",
                    "must be in the future",
                )));
            }
            req.body
                .check_retention_ahead(Date::of(now))
                .map_err(NodeError::Invalid)?;
            check_recipient(inner, &req.recipient, kind).await?;
        }
        let answered = match req.in_reply_to {
            Some(id) => {
                let store = inner.store.clone();
                inner.blocking(move || store.inbox_entry(id)).await?
            }
            None => None,
        };
        // A received message counts here only once it is flushed, as the listings, `Watch`
        // and `message` hand it out: a crash before its flush takes it back, and a reply
        // queued meanwhile would answer a message the node no longer has, until the
        // broker delivers it again, and for ever if its sender withdrew it in between
        // (allowed until it is acknowledged, which waits for that flush). So the send
        // flushes it itself: the receive loop's flush may be under way, or may have
        // failed, and then only a redelivery flushes it, which never comes while the
        // broker is out of reach. A flush that fails here is `UNAVAILABLE` (via `Store`):
        // retry.
        if let Some(entry) = &answered
            && entry.seq > inner.durable_inbox.borrow().last_seq
            && let Err(e) = link::flush_inbox(inner).await
        {
            return Err(NodeError::Store(format!(
                "in_reply_to: message {} was received but is not on disk yet, and the \
                 node's store cannot flush it ({e}); retry in a moment",
                entry.message_id
            )));
        }
        match &answered {
            Some(answered) => check_reply(&req, kind, answered)?,
            // (a typo, or another node's id: sent, it would answer nothing, and the
            // request it was meant for would stay owed on both sides)
            None if kind.is_answer() => {
                return Err(NodeError::Invalid(ValidationError::new(
                    "in_reply_to",
                    format!(
                        "names no message this node received: a {kind} answers a request \
                         received here"
                    ),
                )));
            }
            None => {}
        }
        // (a made-up case, or a message id pasted for the case reference: filed
        // under it, the message would split the case's timeline on both sides. A
        // retry's case was known the first time, as the index keeps every case.)
        if !retry {
            match req.case_ref {
                Some(case) => {
                    let store = inner.store.clone();
                    // (a case known only from a received message not flushed yet is
                    // flushed first, as a reply to that message is, above, and for the
                    // same reason: a crash before the flush would leave the message
                    // filed under a case the node no longer knows)
                    let flushed = inner.durable_inbox.borrow().last_seq;
                    match inner
                        .blocking(move || store.case_known(case, flushed))
                        .await?
                    {
                        CaseKnown::Yes => {}
                        // (every inbox entry committed before the flush is durable after
                        // it, those of the case too)
                        CaseKnown::NotOnDiskYet => {
                            if let Err(e) = link::flush_inbox(inner).await {
                                return Err(NodeError::Store(format!(
                                    "case_ref: case {case} is known only from a message \
                                     that was received but is not on disk yet, and the \
                                     node's store cannot flush it ({e}); retry in a moment"
                                )));
                            }
                        }
                        CaseKnown::No => {
                            return Err(NodeError::Invalid(ValidationError::new(
                                "case_ref",
                                "names no case this node sent or received a message in; set \
                                 new_case to open one",
                            )));
                        }
                    }
                }
                // (a reply takes the case of the message it answers; one that names no
                // message received here has none to take, and opens none unasked)
                None if req.in_reply_to.is_some() && answered.is_none() => {
                    return Err(NodeError::Invalid(ValidationError::new(
                        "case_ref",
                        "is required: in_reply_to names no message this node received, \
                         whose case the reply would take",
                    )));
                }
                None => {}
            }
        }
        let payload = req.body.encode();
        let fingerprint = fingerprint(&req, &payload);
        let case_ref = req
            .case_ref
            .or(answered.map(|a| a.case_ref))
            .unwrap_or_else(CaseRef::new_random);
        let message_id = MessageId::new_v7();
        let envelope = pb::Envelope {
            message_id: message_id.to_string(),
            sender: String::new(),
            recipient: req.recipient.to_string(),
            kind: kind.to_pb() as i32,
            case_ref: case_ref.to_string(),
            in_reply_to: req.in_reply_to.map(|m| m.to_string()).unwrap_or_default(),
            priority: req.priority.to_pb() as i32,
            created_at: Some(to_timestamp(now)),
            expires_at: expires_at.map(to_timestamp),
            payload_sha256: trmx_proto::envelope::sha256(&payload).to_vec(),
            payload,
            content_type: kind.content_type(),
            accepted_at: None,
            broker_seq: 0,
        };
        if !retry {
            check_envelope_size(inner, &envelope).await?;
        }
        let new = NewOutgoing {
            idempotency_key: req.idempotency_key.clone(),
            fingerprint,
            envelope,
            message_id,
            recipient: req.recipient.clone(),
            kind,
            case_ref,
            in_reply_to: req.in_reply_to,
            priority: req.priority,
            created_at: to_millis(now),
            due: req
                .body
                .respond_by()
                .or_else(|| req.body.next_follow_up_due()),
            retain_until: req.body.retain_until(),
        };
        let store = inner.store.clone();
        let (entry, created) = inner.blocking(move || store.enqueue(&new)).await?;
        // Written, but maybe not durable: a crash takes it back, and the submit loop,
        // which submits only what is on disk, submits it once a flush succeeds. So it is
        // woken whenever the entry is still queued, also when this flush fails, or when
        // this is a retry of a send whose flush failed: idle, it would leave the entry
        // queued until some other send or a reconnect woke it.
        let flushed = inner.store.flush_async().await;
        if entry.state == OutboxState::Queued {
            inner.submit_wake.notify_one();
        }
        flushed.map_err(|e| {
            NodeError::Store(format!(
                "the node cannot write message {} to disk ({e}): it is not sent while the \
                 disk fails, and is sent once the disk works unless the node stops first; \
                 send it again with the same idempotency_key to be sure (it is sent once)",
                entry.message_id
            ))
        })?;
        if created {
            info!(participant = %inner.config.participant, message_id = %entry.message_id, recipient = %entry.recipient, kind = %entry.kind, "message queued");
        } else {
            info!(participant = %inner.config.participant, message_id = %entry.message_id, "send retried with the same idempotency key");
        }
        Ok(entry)
    }

    /// Takes back a message that has not been delivered yet. The entry becomes
    /// `FAILED` with outcome `withdrawn`.
    ///
    /// It is withdrawn on the broker first, since even a queued message may be there
    /// (a submit whose answer was lost, or a node killed before it recorded the
    /// answer). Out of the broker's reach, a submitted message cannot be withdrawn
    /// (`BrokerUnavailable`); a queued one is withdrawn here, and on the broker as soon
    /// as the node reaches it ([`Withdrawal::BrokerPending`]). A message the broker
    /// does not hold (it never arrived, or the broker lost it) is withdrawn here, and
    /// so never sent again. While this runs, neither the submit loop nor the outbox
    /// check sends the message (`submit_gate`).
    ///
    /// Runs to its end in a task of its own (`detached`): a client that gives up
    /// while the broker's answer is on its way does not leave the message withdrawn
    /// on the broker and queued or submitted here; a shutdown waits for it. Once a
    /// shutdown has started, `ShuttingDown`.
    pub async fn withdraw(&self, id: MessageId) -> Result<Withdrawal, NodeError> {
        detached(&self.inner, "withdrawal", |inner| {
            Self::withdraw_now(inner, id)
        })
        .await
    }

    /// [`Self::withdraw`], in the task it runs in.
    async fn withdraw_now(inner: Arc<Inner>, id: MessageId) -> Result<Withdrawal, NodeError> {
        let inner = &inner;
        let wait = inner.config.withdraw_timeout;
        // (bounded: a broker that never answers a submit must not hang the caller)
        let Ok(gate) = tokio::time::timeout(wait, inner.submit_gate.lock()).await else {
            return Err(NodeError::BrokerUnavailable(format!(
                "a submit to the broker has waited more than {}s for its answer, and \
                 message {id} may be in it: try again",
                wait.as_secs()
            )));
        };
        let store = inner.store.clone();
        let Some(entry) = inner.blocking(move || store.outbox_entry(id)).await? else {
            drop(gate);
            let store = inner.store.clone();
            return Err(match inner.blocking(move || store.inbox_entry(id)).await? {
                Some(_) => NodeError::FailedPrecondition(format!(
                    "message {id} was received by this node: only a message it sent can be withdrawn"
                )),
                None => NodeError::NotFound(id),
            });
        };
        match entry.state {
            OutboxState::Queued | OutboxState::Submitted => {}
            OutboxState::Delivered => {
                return Err(NodeError::FailedPrecondition(format!(
                    "message {id} was already delivered"
                )));
            }
            OutboxState::Failed
                if entry
                    .failure
                    .as_ref()
                    .is_some_and(|f| f.outcome == "withdrawn") =>
            {
                let store = inner.store.clone();
                let pending = inner.blocking(move || store.withdrawal_pending(id)).await?;
                // (a retry of a withdrawal whose flush failed finds it withdrawn, but only
                // written: a crash would take it back)
                inner.store.flush_async().await?;
                return Ok(if pending {
                    Withdrawal::BrokerPending
                } else {
                    Withdrawal::Done
                });
            }
            // (the broker keeps its payload for a redrive: withdrawn there, it is
            // deleted, and never redriven to a recipient it was not meant for)
            OutboxState::Failed if entry.failure.as_ref().is_some_and(store::kept_for_redrive) => {}
            OutboxState::Failed => {
                return Err(NodeError::FailedPrecondition(format!(
                    "message {id} has failed already (it was not delivered)"
                )));
            }
        }
        // (bounded: submits wait for the gate meanwhile)
        let at_broker = match inner.client.clone() {
            Some(mut client) => {
                let call = client.withdraw(pb::WithdrawRequest {
                    message_id: id.to_string(),
                });
                match tokio::time::timeout(wait, call).await {
                    Ok(answer) => answer.map(drop),
                    Err(_) => Err(tonic::Status::deadline_exceeded(
                        "the broker did not answer the withdrawal in time",
                    )),
                }
            }
            None => Err(tonic::Status::unavailable("the node runs offline")),
        };
        let how = match at_broker {
            Ok(()) => "withdrawn on the broker",
            // (a failed message the broker no longer holds: its payload is gone there
            // already, and its failure is kept as it was)
            Err(status)
                if status.code() == tonic::Code::NotFound && entry.state == OutboxState::Failed =>
            {
                return Err(NodeError::FailedPrecondition(format!(
                    "message {id} failed ({}) and the broker no longer holds it: there is \
                     nothing left to withdraw",
                    entry.failure.as_ref().map_or("", |f| f.outcome.as_str())
                )));
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                "the broker does not hold it (it never arrived, or the broker lost it): withdrawn here"
            }
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                // acknowledged, expired, dead-lettered or purged: the broker says which
                return Err(NodeError::FailedPrecondition(format!(
                    "the broker cannot withdraw it: {}",
                    link::broker_message(&status)
                )));
            }
            Err(status) if link::is_permanent(status.code()) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "the broker refused the withdrawal: {}",
                    link::status_text(&status)
                )));
            }
            // (queued, yet an earlier submit may have reached the broker: its answer
            // lost, or the node killed before it recorded the answer)
            Err(status) if entry.state == OutboxState::Queued => {
                let now = to_millis(inner.clock.now());
                let store = inner.store.clone();
                if !inner
                    .blocking(move || store.withdraw_here_then_at_broker(id, now))
                    .await?
                {
                    // (a receipt moved it meanwhile)
                    return Err(NodeError::FailedPrecondition(format!(
                        "message {id} changed state meanwhile: look at it and try again"
                    )));
                }
                inner.store.flush_async().await?;
                drop(gate);
                inner.submit_wake.notify_one();
                warn!(participant = %inner.config.participant, message_id = %id, error = %link::status_text(&status), "message withdrawn here while the broker is out of reach; in case an earlier submit reached it, it is withdrawn there too as soon as the broker can be reached");
                return Ok(Withdrawal::BrokerPending);
            }
            Err(status) => {
                return Err(NodeError::BrokerUnavailable(format!(
                    "message {id} is on the broker, so only the broker can withdraw it, and it \
                     cannot be reached ({}): try again",
                    link::status_text(&status)
                )));
            }
        };
        let now = to_millis(inner.clock.now());
        let store = inner.store.clone();
        inner
            .blocking(move || store.withdraw_local(id, now, true))
            .await?;
        inner.store.flush_async().await.map_err(|e| {
            NodeError::Store(format!(
                "message {id} is withdrawn ({how}), but the node cannot write that to disk                  ({e}): withdraw it again once the disk works"
            ))
        })?;
        drop(gate);
        info!(participant = %inner.config.participant, message_id = %id, how, "message withdrawn");
        Ok(Withdrawal::Done)
    }

    /// Outbox entries, newest first (the first page of [`Self::outbox_page`]).
    pub async fn outbox(&self, filter: &ListFilter) -> Result<Vec<OutboxEntry>, NodeError> {
        Ok(self.outbox_page(filter).await?.entries)
    }

    /// One page of outbox entries, newest first; answered only by an inbox entry already
    /// flushed, as [`Self::inbox_page`] lists them.
    pub async fn outbox_page(&self, filter: &ListFilter) -> Result<Page<OutboxEntry>, NodeError> {
        let store = self.inner.store.clone();
        let filter = filter.clone();
        let flushed = self.inner.durable_inbox.borrow().last_seq;
        self.inner
            .blocking(move || store.list_outbox(&filter, flushed))
            .await
    }

    /// Inbox entries, newest first (the first page of [`Self::inbox_page`]).
    pub async fn inbox(&self, filter: &ListFilter) -> Result<Vec<InboxEntry>, NodeError> {
        Ok(self.inbox_page(filter).await?.entries)
    }

    /// One page of inbox entries, newest first. Like [`Self::watch`], only
    /// entries already flushed: a crash before its flush would give the seq
    /// of one committed after to another message.
    pub async fn inbox_page(&self, filter: &ListFilter) -> Result<Page<InboxEntry>, NodeError> {
        let store = self.inner.store.clone();
        let mut filter = filter.clone();
        let durable = self.inner.durable_inbox.borrow().last_seq;
        filter.start = Some(filter.start.map_or(durable, |start| start.min(durable)));
        self.inner.blocking(move || store.list_inbox(&filter)).await
    }

    /// One message with its body (`None` when erased). A received message only once it
    /// is flushed, as [`Self::inbox_page`] lists it (`None` before: a crash before its
    /// flush would take it back, and give its seq to another message).
    pub async fn message(&self, id: MessageId) -> Result<Option<MessageView>, NodeError> {
        let store = self.inner.store.clone();
        let flushed = self.inner.durable_inbox.borrow().last_seq;
        self.inner
            .blocking(move || {
                if let Some(entry) = store.outbox_entry(id)? {
                    let entry = store.shown_outbox(entry, flushed)?;
                    let body = store
                        .outbox_body(id)?
                        .map(|b| store::decode_body(entry.kind, &b))
                        .transpose()?;
                    return Ok(Some(MessageView::Outbox(entry, body)));
                }
                if let Some(entry) = store.inbox_entry(id)?.filter(|e| e.seq <= flushed) {
                    let entry = store.shown_inbox(entry)?;
                    let body = store
                        .inbox_body(entry.seq)?
                        .map(|b| store::decode_body(entry.kind, &b))
                        .transpose()?;
                    return Ok(Some(MessageView::Inbox(entry, body)));
                }
                Ok(None)
            })
            .await
    }

    /// The messages of a case, sent and received, a page at a time, oldest first (by
    /// creation time, then message id): at most `limit` ([`CASE_PAGE_DEFAULT`] for 0, at
    /// most [`CASE_PAGE_MAX`]) from `start` (the [`Page::next`] of the page before;
    /// `None`: the first). An unknown case has no messages. Like [`Self::inbox_page`],
    /// only received messages already flushed, and only answers among them make a sent
    /// message answered: a crash before its flush would take a delivery back.
    pub async fn case_timeline(
        &self,
        case_ref: CaseRef,
        start: Option<CaseCursor>,
        limit: usize,
    ) -> Result<Page<TimelineEntry, CaseCursor>, NodeError> {
        let limit = case_page_limit(limit);
        let store = self.inner.store.clone();
        let flushed = self.inner.durable_inbox.borrow().last_seq;
        self.inner
            .blocking(move || store.timeline(case_ref, start, limit, flushed))
            .await
    }

    /// What is due on or before `today`: requests we sent whose `respond_by`
    /// is on or before it and that have no answer (and did not fail);
    /// requests we received with such a `respond_by` that we have not
    /// answered; follow-ups whose `next_follow_up_due` is on or before it
    /// with no later follow-up on the case from the same sender to the same
    /// recipient.
    ///
    /// A page at a time, oldest date first: at most `limit` items (0: 10,000) from
    /// `start` (the [`Page::next`] of the page before; `None`: the first).
    pub async fn due(
        &self,
        today: Date,
        start: Option<DueCursor>,
        limit: usize,
    ) -> Result<Page<DueItem, DueCursor>, NodeError> {
        let store = self.inner.store.clone();
        self.inner
            .blocking(move || store.due(today, start, limit))
            .await
    }

    /// The broker's participant registry (cached, refreshed on each connect).
    pub async fn participants(&self) -> Result<Vec<ParticipantInfo>, NodeError> {
        match self.inner.cached_participants() {
            Some(list) => Ok(list),
            None => fetch_participants(&self.inner, Duration::from_secs(10)).await,
        }
    }

    /// Connection state and queue sizes.
    pub fn status(&self) -> NodeStatus {
        let counts = self.inner.store.counts().unwrap_or_default();
        // the inbox as of the last flush, as `watch` hands it out: a cursor to start from
        // "now" must not name an entry a crash can take back, nor a count one it can
        // take away
        let inbox = *self.inner.durable_inbox.borrow();
        NodeStatus {
            participant: self.inner.config.participant.clone(),
            broker_connected: self
                .inner
                .link
                .connected
                .load(std::sync::atomic::Ordering::SeqCst),
            last_broker_error: self
                .inner
                .link
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            outbox_queued: counts.queued,
            outbox_submitted: counts.submitted,
            outbox_failed: counts.failed,
            inbox_total: inbox.total,
            last_inbox_seq: inbox.last_seq,
            certificate: self.inner.certificate_status(),
            broker_certificate_not_after: self
                .inner
                .link_tls()
                .and_then(|tls| tls.server_certificate())
                .map(|info| info.not_after),
            withdrawals_pending: counts.withdrawals_pending,
            store_error: self.inner.store.disk().failing(),
        }
    }

    /// The switch that makes this node's store flushes fail like a full disk, for
    /// storage-fault tests (as the broker's `SledStore::fault_switch`); nothing in the
    /// config sets it.
    pub fn store_faults(&self) -> StoreFaults {
        self.inner.store.disk().faults()
    }

    /// Erases now the bodies whose `retain_until` has passed (by the
    /// injected clock); the periodic retention task does the same. Returns
    /// how many bodies were erased.
    pub async fn run_retention(&self) -> Result<usize, NodeError> {
        run_retention(&self.inner).await
    }

    /// Every inbox entry with `seq > after_seq`, then new ones as they are
    /// stored; never misses one (entries are re-read from the store, so a
    /// slow subscriber only falls behind). Ends at shutdown or after an error.
    ///
    /// An `after_seq` past the inbox's last flushed seq is `FailedPrecondition`:
    /// no entry of this inbox gave it out (the store was replaced or restored
    /// from a backup, or the cursor is another node's), and waiting would
    /// silently skip every entry stored until the seqs catch up with it. The
    /// last flushed seq, not the last committed one: only flushed entries are
    /// handed out (here, in the listings, and as the status's `last_inbox_seq`),
    /// so a cursor that names a delivery whose flush is under way (or failed)
    /// comes from none of them, and a crash before that flush would give its
    /// seq to another message.
    pub async fn watch(
        &self,
        after_seq: u64,
    ) -> Result<impl Stream<Item = Result<InboxEntry, NodeError>> + Send + 'static, NodeError> {
        // (it only grows: a cursor handed out before is never refused)
        let last = self.inner.durable_inbox.borrow().last_seq;
        if after_seq > last {
            return Err(NodeError::FailedPrecondition(format!(
                "after_seq {after_seq} is past the last inbox seq of this node ({last}): \
                 the cursor does not come from this inbox (was the node's store replaced \
                 or restored?); resynchronise, e.g. with after_seq 0"
            )));
        }
        let state = WatchState {
            inner: self.inner.clone(),
            seq_rx: self.inner.durable_inbox.subscribe(),
            shutdown: self.inner.shutdown.subscribe(),
            cursor: after_seq,
            buffer: VecDeque::new(),
            done: false,
        };
        Ok(futures::stream::unfold(state, next_watched))
    }
}

/// Entries read from the store per round of a watch stream.
const WATCH_BATCH: usize = 256;

struct WatchState {
    inner: Arc<Inner>,
    seq_rx: watch::Receiver<InboxMark>,
    shutdown: watch::Receiver<bool>,
    cursor: u64,
    buffer: VecDeque<InboxEntry>,
    done: bool,
}

async fn next_watched(mut st: WatchState) -> Option<(Result<InboxEntry, NodeError>, WatchState)> {
    loop {
        if let Some(entry) = st.buffer.pop_front() {
            st.cursor = entry.seq;
            return Some((Ok(entry), st));
        }
        if st.done || *st.shutdown.borrow() {
            return None;
        }
        // Mark the current seq as seen before reading, so that an entry
        // stored after the read wakes us. It is the last one flushed: an
        // entry committed but not yet durable is not handed out, since a
        // crash before its flush would give its seq to another message and
        // a resuming application would skip that one.
        let durable = st.seq_rx.borrow_and_update().last_seq;
        let store = st.inner.store.clone();
        let cursor = st.cursor;
        let read = if cursor >= durable {
            Ok(Vec::new())
        } else {
            st.inner
                .blocking(move || store.inbox_after(cursor, WATCH_BATCH))
                .await
        };
        match read.map(|entries| {
            entries
                .into_iter()
                .take_while(|entry| entry.seq <= durable)
                .collect::<Vec<_>>()
        }) {
            Ok(entries) if !entries.is_empty() => st.buffer.extend(entries),
            Ok(_) => {
                tokio::select! {
                    changed = st.seq_rx.changed() => if changed.is_err() { return None; },
                    _ = st.shutdown.changed() => return None,
                }
            }
            Err(e) => {
                st.done = true;
                return Some((Err(e), st));
            }
        }
    }
}

impl std::fmt::Debug for WatchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchState")
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

async fn run_retention(inner: &Arc<Inner>) -> Result<usize, NodeError> {
    let today = Date::of(inner.clock.now());
    let store = inner.store.clone();
    // (no submit meanwhile: a queued message whose body is erased now fails, and must
    // not be on its way to the broker with the body read a moment before)
    let gate = inner.submit_gate.lock().await;
    let erased = inner.blocking(move || store.erase_expired(today)).await?;
    drop(gate);
    if !erased.is_empty() {
        inner.store.flush_async().await?;
        for id in &erased {
            info!(participant = %inner.config.participant, message_id = %id, "body erased (retention)");
        }
    }
    Ok(erased.len())
}

/// Erases expired bodies at start and then every `retention_check_interval`; a node
/// online also reads its certificate again then (see `Inner::recheck_certificate`).
/// Records `now` as the last run of the stopped node whose store is in `data_dir`, so
/// that its next start accepts the system clock (see [`ClockBounds`]). Returns the
/// instant recorded before, if any. Durable when it returns. Fails while a node runs on
/// the store (it holds the store's lock). The caller then writes the same instant to the
/// last-run file ([`last_run::write`]), as `trmx-node accept-clock` does.
pub fn accept_clock(
    data_dir: &std::path::Path,
    now: SystemTime,
) -> Result<Option<Millis>, NodeError> {
    // (never create a store where there is none: sled would)
    if !data_dir.join("conf").is_file() {
        return Err(NodeError::Store(format!(
            "no node store in {}: is data_dir right?",
            data_dir.display()
        )));
    }
    let store = Store::open(data_dir, 8 << 20)?;
    let before = store.last_running()?;
    store.mark_running(to_millis(now))?;
    Ok(before)
}

/// How often a running node records its time in its store (see [`check_clock`]), and
/// then in its last-run file ([`last_run`]).
const RUNNING_MARK_INTERVAL: Duration = Duration::from_secs(60);

/// Records the node's time in its store every [`RUNNING_MARK_INTERVAL`], and after each
/// success in the last-run file through `last_run` (the start recorded it first in both).
async fn running_mark_loop(
    inner: Arc<Inner>,
    mut last_run: LastRunWriter,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(RUNNING_MARK_INTERVAL) => {}
            _ = shutdown.changed() => break,
        }
        let now = to_millis(inner.clock.now());
        let store = inner.store.clone();
        match tokio::task::spawn_blocking(move || store.mark_running(now)).await {
            Ok(Ok(())) => last_run.record(now).await,
            // (a store that cannot write says so through everything else)
            Ok(Err(e)) => debug!(error = %e, "recording the node's time in its store failed"),
            Err(e) => debug!(error = %e, "recording the node's time in its store failed"),
        }
    }
}

/// What a start says (at WARN, with the fields `behind` and `last_run`) of a system clock
/// behind the store's last run, which it accepts; `check-config` says the same.
const CLOCK_BEHIND: &str = "the system clock is behind the last time the node ran on this \
     store: what it scheduled before comes that much later";

/// The start's clock check ([`judge_clock`]) against `last`, the last run its store
/// records: a clock a little behind is said at WARN.
fn check_clock(last: Option<Millis>, now: Millis, bounds: ClockBounds) -> Result<(), NodeError> {
    if let StartClock::Behind(by) = judge_clock(last, now, bounds)? {
        warn!(
            behind = %human_span(by),
            last_run = %format_millis(last.unwrap_or_default()),
            "{CLOCK_BEHIND}"
        );
    }
    Ok(())
}

/// The start's rule for the system clock at `now` against `last`, the last time a node ran
/// on the store (also what `check-config` applies, see [`last_run::check_clock_offline`]).
/// Refuses a clock further than `storage.max_downtime_secs` from `last`: a clock set ahead
/// by mistake would erase, at the first retention run, every body whose retention date it
/// passes (for good), and one set back to 1970 by a dead RTC battery would hold the node's
/// timers. A clock a little behind is accepted ([`StartClock::Behind`], which the caller
/// says). (While the node runs, the [`GuardedClock`] holds jumps.)
fn judge_clock(
    last: Option<Millis>,
    now: Millis,
    bounds: ClockBounds,
) -> Result<StartClock, NodeError> {
    use trmx_durable::clock::check_start;
    let verdict = check_start(last, now, bounds.max_step, bounds.max_downtime);
    let StartClock::TooFar { ahead, by } = verdict else {
        return Ok(verdict);
    };
    let (which, harm) = if ahead {
        (
            "after",
            "if the clock is wrong, a node started now would erase for good every \
             body whose retention date is before the clock's date",
        )
    } else {
        (
            "before",
            "a node started now would hold its timers until the clock caught up",
        )
    };
    Err(NodeError::ClockJump(format!(
        "the system clock reads {}, {} {which} the last time the node ran on this \
         store ({}), more than storage.max_downtime_secs ({}): {harm}. If the clock \
         is right, stop the node, run `trmx-node --config <its config> accept-clock` \
         once as the node's user, and start it; if not, set the clock right (is NTP \
         running?)",
        format_millis(now),
        human_span(by),
        format_millis(last.unwrap_or_default()),
        bounds.max_downtime.map_or(0, |longest| longest.as_secs()),
    )))
}

/// `2026-03-01T12:00:00Z`: an instant of the store's for a person.
fn format_millis(at: Millis) -> String {
    trmx_certs::format_time(trmx_proto::time::from_millis(at))
}

async fn retention_loop(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    loop {
        // (riding on the retention timer: an hourly read of four small files, off the
        // runtime)
        let checking = inner.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || checking.recheck_certificate()).await {
            warn!(participant = %inner.config.participant, error = %e, "certificate check failed");
        }
        if let Err(e) = run_retention(&inner).await {
            warn!(participant = %inner.config.participant, error = %e, "retention run failed");
        }
        tokio::select! {
            () = tokio::time::sleep(inner.config.retention_check_interval) => {}
            _ = shutdown.changed() => break,
        }
    }
}
