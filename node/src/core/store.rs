//! The node's sled database: outbox, inbox and their indexes.
//!
//! Every method is synchronous (sled does disk I/O); the async callers run
//! them in `spawn_blocking`. Every logical change is one sled transaction
//! over all trees; nothing is durable before [`Store::flush_async`].
//!
//! # Trees
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | counter name | u64 BE (`out_seq`, `inbox_seq`, `n_queued`, …) |
//! | `outbox` | message id (16) | [`OutRec`] (JSON) |
//! | `out_env` | message id | the envelope to submit, payload cleared (protobuf) |
//! | `out_body` | message id | the payload (protobuf body) — erased by retention |
//! | `out_order` | out seq (8 BE) | message id — every outbox entry, in creation order |
//! | `queued` | out seq | message id — entries still `QUEUED`, in creation order |
//! | `submitted` | submitted at (8 BE) + out seq | message id — entries `SUBMITTED`, oldest submit first |
//! | `idem` | idempotency key | [`IdemRec`] (JSON) |
//! | `inbox` | inbox seq (8 BE) | [`InRec`] (JSON) |
//! | `dedup` | message id + sender | inbox seq — every (sender, id) ever stored |
//! | `inbox_mid` | message id | inbox seq of the message with that id |
//! | `in_body` | inbox seq | the payload (protobuf body) — erased by retention |
//! | `cases` | case (16) + at (8 BE) + message id | direction (1) + kind (1) |
//! | `due` | date (4) + message id | direction (1) |
//! | `retention` | date (4) + direction (1) + message id | empty |
//! | `redrive_watch` | next ask at (8 BE) + out seq | message id (16) + outcome at (8 BE) — entries `FAILED` as `expired` or `dead-lettered` that the outbox check still asks the broker about |
//!
//! # Invariants
//! - An outbox entry is in `queued` iff its state is `QUEUED`, and in
//!   `submitted` iff its state is `SUBMITTED` (stores written before that
//!   index get it at open: [`Store::open`]); its body is in `out_body`
//!   unless `body_erased`.
//! - An outbox entry is in `redrive_watch` iff its `redrive_ask_at` is set, under that
//!   instant and with its `outcome_at`; it is set when the entry becomes `FAILED` as
//!   `expired` or `dead-lettered` (or another such report replaces its outcome), and
//!   cleared when it leaves that ([`watched_outcome`], kept by [`Store::update_out`]),
//!   when the outbox check stops asking ([`Store::redrive_unwatch`]) and for stores
//!   written before that index at open.
//! - Outbox states only move forward (`QUEUED → SUBMITTED → DELIVERED |
//!   FAILED`), except `FAILED → DELIVERED` ([`can_move`]).
//! - Inbox `seq`s are strictly increasing and never reused; a (sender,
//!   message id) is stored at most once (`dedup` is never pruned), and never
//!   replaced: a delivery of it with another payload digest (kept in
//!   [`InRec`] since this version), kind, case or message answered changes
//!   nothing ([`IdUse::Conflict`]).
//! - A message id names one message here: a delivery with the id of an
//!   outbox entry or of another sender's inbox entry is not stored (the
//!   node rejects it, `DUPLICATE_MESSAGE_ID`), since the inbox's lookups,
//!   due dates and retention go by id.
//! - The `n_*` counters in `meta` equal the number of entries in each state.

use std::collections::BTreeSet;
use std::path::Path;

use prost::Message;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};
use trmx_proto::envelope::Priority;
use trmx_proto::time::Date;
use trmx_proto::{CaseRef, Kind, MessageId, ParticipantId, pb};

use super::{
    Body, CaseCursor, Direction, DueCursor, DueItem, DueKind, Failure, InboxEntry, ListFilter,
    Millis, NodeError, OutboxEntry, OutboxState, Page, TimelineEntry,
};

const META: usize = 0;
const OUTBOX: usize = 1;
const OUT_ENV: usize = 2;
const OUT_BODY: usize = 3;
const OUT_ORDER: usize = 4;
const QUEUED: usize = 5;
const IDEM: usize = 6;
const INBOX: usize = 7;
const DEDUP: usize = 8;
const INBOX_MID: usize = 9;
const IN_BODY: usize = 10;
const CASES: usize = 11;
const DUE: usize = 12;
const RETENTION: usize = 13;
const SUBMITTED: usize = 14;
const WITHDRAW_PENDING: usize = 15;
const QUEUED_URGENT: usize = 16;
const REDRIVE_WATCH: usize = 17;
const TREE_NAMES: [&str; 18] = [
    "meta",
    "outbox",
    "out_env",
    "out_body",
    "out_order",
    "queued",
    "idem",
    "inbox",
    "dedup",
    "inbox_mid",
    "in_body",
    "cases",
    "due",
    "retention",
    "submitted",
    "withdraw_pending",
    "queued_urgent",
    "redrive_watch",
];

/// `meta` key of the instant the node last recorded that it runs ([`Store::mark_running`];
/// 8 bytes, big-endian milliseconds).
const RUNNING_AT: &str = "running_at";
/// `meta` key set once `submitted` holds every `SUBMITTED` entry.
const SUBMITTED_INDEXED: &str = "submitted_indexed";
/// `meta` key set once a store written before them has `queued_urgent`, and `due` and
/// `retention` keys for what those indexes lacked ([`Store::index_v2`]).
const V2_INDEXED: &str = "v2_indexed";
/// `meta` key set once `redrive_watch` holds every entry it is to hold ([`Store::index_redrive`]).
const REDRIVE_INDEXED: &str = "redrive_indexed";

const DIR_SENT: u8 = 1;
const DIR_RECEIVED: u8 = 2;

/// Page size of a listing asked with limit 0.
const DEFAULT_LIMIT: usize = 100;

/// Whether a later follow-up replaced one ([`Store::later_follow_up`]).
enum Replaced {
    No,
    /// One of ours on its way: it may still fail.
    Pending,
    Yes,
}

/// What one entry of the due index is now ([`Store::due_state`]).
enum DueState {
    Due(DueItem),
    /// Not due now, but it may be again.
    NotNow,
    /// Never due again: the entry can go.
    Never,
}

/// Page size of `due` asked with limit 0: large, since `ListDue` had no pages before and
/// its callers may not read `next_page_token`, but bounded (10,000 items are about
/// 1.5 MB on the wire).
pub(crate) const DUE_DEFAULT_LIMIT: usize = 10_000;

/// One page of a listing over `tree` (keyed by big-endian seq), newest first
/// from `filter.start`: the entries `read` makes of its values (`None`: gone,
/// skipped) that `keep` accepts, at most `filter.limit` (0: 100), and the
/// seq the next page starts at.
fn page_of<T>(
    tree: &sled::Tree,
    filter: &ListFilter,
    read: impl Fn(&[u8]) -> Result<Option<T>, NodeError>,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<T>, NodeError> {
    let limit = if filter.limit == 0 {
        DEFAULT_LIMIT
    } else {
        filter.limit
    };
    let mut entries = Vec::new();
    let end = be(filter.start.unwrap_or(u64::MAX));
    for item in tree.range(..=end).rev() {
        let (seq, value) = item.map_err(store_err)?;
        let Some(entry) = read(&value)? else {
            continue;
        };
        if keep(&entry) {
            if entries.len() == limit {
                return Ok(Page {
                    entries,
                    next: Some(read_u64(&seq)),
                });
            }
            entries.push(entry);
        }
    }
    Ok(Page {
        entries,
        next: None,
    })
}

type TxResult<T> = ConflictableTransactionResult<T, NodeError>;

/// The sled database of one node.
///
/// Its `Debug` shows no content: sled's own `Debug` of a database prints every key and
/// value it holds (the bodies), and a `Store` is inside every `NodeCore` and `RunningNode`.
#[derive(Clone)]
pub(crate) struct Store {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// Completes sled's flushes against a power cut (`trmx_durable`).
    sync: std::sync::Arc<std::sync::Mutex<trmx_durable::DiskSync>>,
    /// Whether the flushes fail, and the switch that makes them fail.
    disk: super::disk::Disk,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("trees", &self.trees.len())
            .finish_non_exhaustive()
    }
}

/// An outbox entry as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutRec {
    seq: u64,
    message_id: String,
    idempotency_key: String,
    recipient: String,
    kind: String,
    case_ref: String,
    in_reply_to: Option<String>,
    priority: String,
    state: OutboxState,
    answered_by: Option<String>,
    created_at: Millis,
    submitted_at: Option<Millis>,
    outcome_at: Option<Millis>,
    failure: Option<Failure>,
    submit_attempts: u32,
    last_error: Option<String>,
    body_erased: bool,
    due: Option<String>,
    retain_until: Option<String>,
    /// The outcomes of the receipts that contradicted the first final report of this
    /// message (a delivery receipt after `rejected-by-recipient` or `purged`, one of these
    /// reports after a delivery receipt): that report stands, and each is said at WARN the first
    /// time it comes only ([`ReceiptEffect::Contradicted`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    contradicted_by: Vec<String>,
    /// How many times the outbox check got a status answer about another message for
    /// this entry ([`Store::count_other_answer`]), over its life.
    #[serde(default, skip_serializing_if = "is_zero")]
    other_answers: u32,
    /// When the outbox check next asks the broker about this entry, `FAILED` by an
    /// expiry or a dead-lettering that an operator may redrive ([`watched_outcome`]);
    /// its key in `redrive_watch`. `None`: not asked about (any more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    redrive_ask_at: Option<Millis>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl OutRec {
    /// Whether this message of ours certainly never reached its recipient: it failed
    /// before the broker took it (refused at submit, withdrawn while queued, erased
    /// unsent), and nothing answered it.
    fn never_arrived(&self) -> bool {
        self.state == OutboxState::Failed
            && self.submitted_at.is_none()
            && self.answered_by.is_none()
    }
}

/// An inbox entry as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InRec {
    seq: u64,
    message_id: String,
    sender: String,
    kind: String,
    case_ref: String,
    in_reply_to: Option<String>,
    priority: String,
    created_at: Millis,
    accepted_at: Millis,
    received_at: Millis,
    answered_by: Option<String>,
    body_erased: bool,
    due: Option<String>,
    retain_until: Option<String>,
    /// The envelope's `payload_sha256` (hex): a redelivery under this (sender, id) with
    /// another digest is other content, not this message again. `None` in entries
    /// stored before the node kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_sha256: Option<String>,
    /// The envelope's `content_type`, as delivered: the same payload under another
    /// (JSON for protobuf) is other content. `None` in entries stored before the node
    /// kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
}

/// Lower-case hex of a digest, as [`InRec::payload_sha256`] keeps it.
fn digest_hex(digest: &[u8]) -> String {
    use std::fmt::Write as _;
    digest.iter().fold(String::with_capacity(64), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// What a delivery says about the message it carries, beyond its sender and id, as
/// delivered (raw envelope fields: [`Store::id_use`] also runs before the envelope is
/// checked): every field the sender set that the broker stores and redelivers unchanged.
/// Not `expires_at`: an operator's redrive gives the message a new one, and the redriven
/// message may be one this node stored (its acknowledgement lost); nor `accepted_at` or
/// `broker_seq`, the broker's own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Content<'a> {
    /// The envelope's `payload_sha256`.
    pub(crate) digest: &'a [u8],
    /// The kind's name ([`Kind::name`]); `None` for a kind that is none.
    pub(crate) kind: Option<&'a str>,
    /// The envelope's `case_ref`, as delivered.
    pub(crate) case_ref: &'a str,
    /// The envelope's `in_reply_to`, as delivered (empty: none).
    pub(crate) in_reply_to: &'a str,
    /// The priority's name as the inbox keeps it; `None` for a priority that is none.
    pub(crate) priority: Option<&'static str>,
    /// The envelope's `created_at` in milliseconds, as the inbox keeps it (the broker
    /// keeps milliseconds too); `None` for one that is missing or no instant.
    pub(crate) created_at: Option<Millis>,
    /// The envelope's `content_type`, as delivered.
    pub(crate) content_type: &'a str,
}

impl<'a> Content<'a> {
    /// The content of an envelope as delivered.
    pub(crate) fn of_envelope(envelope: &'a pb::Envelope) -> Content<'a> {
        Content {
            digest: &envelope.payload_sha256,
            kind: Kind::from_pb(envelope.kind).map(Kind::name),
            case_ref: &envelope.case_ref,
            in_reply_to: &envelope.in_reply_to,
            priority: Priority::from_pb(envelope.priority).ok().map(priority_name),
            created_at: envelope
                .created_at
                .as_ref()
                .and_then(|ts| trmx_proto::time::from_timestamp(ts).ok())
                .map(trmx_proto::time::to_millis),
            content_type: &envelope.content_type,
        }
    }
}

/// Whether a delivery with `content` is the message `rec` stored: the same payload
/// digest and content type (an entry stored before the node kept them is taken to have
/// them: nothing tells otherwise), and the same kind, case, message answered, priority
/// and creation instant. A redelivery that differs in any of them is other content under
/// a used id, not this message again: acknowledged, the difference would be dropped
/// unseen (the real broker refuses such a submit, `ALREADY_EXISTS`, but the node does
/// not take a broker's word for it). Ids are lower-case UUIDs, one text per value, so
/// the texts compare as the values do.
fn same_content(rec: &InRec, content: Content<'_>) -> bool {
    rec.payload_sha256
        .as_deref()
        .is_none_or(|stored| stored == digest_hex(content.digest))
        && rec
            .content_type
            .as_deref()
            .is_none_or(|stored| stored == content.content_type)
        && content.kind == Some(rec.kind.as_str())
        && content.case_ref == rec.case_ref
        && content.in_reply_to == rec.in_reply_to.as_deref().unwrap_or("")
        && content.priority == Some(rec.priority.as_str())
        && content.created_at == Some(rec.created_at)
}

/// An idempotency key's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdemRec {
    message_id: String,
    fingerprint: String,
}

/// A message to queue (already validated).
#[derive(Debug, Clone)]
pub(crate) struct NewOutgoing {
    pub(crate) idempotency_key: String,
    /// SHA-256 (hex) of the request's content, to tell a retry from a reuse.
    pub(crate) fingerprint: String,
    /// The complete envelope to submit, payload included.
    pub(crate) envelope: pb::Envelope,
    pub(crate) message_id: MessageId,
    pub(crate) recipient: ParticipantId,
    pub(crate) kind: Kind,
    pub(crate) case_ref: CaseRef,
    pub(crate) in_reply_to: Option<MessageId>,
    pub(crate) priority: Priority,
    pub(crate) created_at: Millis,
    pub(crate) due: Option<Date>,
    pub(crate) retain_until: Option<Date>,
}

/// What a delivery's message id is to this node ([`Store::id_use`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdUse {
    /// Not seen before.
    New,
    /// This sender's message with this id is stored, with this content.
    Stored,
    /// This sender's message with this id is stored with another payload digest, kind,
    /// case, message answered, priority, creation instant or content type ([`Content`]):
    /// the delivery is other content under a used id (a sender reusing an id, a broker
    /// restored from a backup or broken); the first is kept, the delivery rejected.
    Conflict,
    /// The id is another message's: one this node sent, or another
    /// sender's. A broken peer; the delivery is rejected.
    Taken,
}

/// What a case reference is to this node ([`Store::case_known`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaseKnown {
    /// This node sent a message in the case, or received one that is on disk.
    Yes,
    /// Known only from messages received and not flushed yet.
    NotOnDiskYet,
    /// No message of the case is here.
    No,
}

/// What [`Store::store_incoming`] did.
#[derive(Debug)]
pub(crate) enum Stored {
    /// Stored with the next inbox seq.
    New(InboxEntry),
    /// Stored before; nothing changed.
    Duplicate,
    /// Stored before with other content ([`IdUse::Conflict`]); nothing changed.
    Conflict,
    /// The id is another message's ([`IdUse::Taken`]); nothing changed.
    IdTaken,
}

/// A validated delivery to store.
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    pub(crate) message_id: MessageId,
    pub(crate) sender: ParticipantId,
    pub(crate) kind: Kind,
    pub(crate) case_ref: CaseRef,
    pub(crate) in_reply_to: Option<MessageId>,
    pub(crate) priority: Priority,
    pub(crate) created_at: Millis,
    pub(crate) accepted_at: Millis,
    pub(crate) received_at: Millis,
    /// The body, protobuf-encoded.
    pub(crate) body: Vec<u8>,
    pub(crate) due: Option<Date>,
    pub(crate) retain_until: Option<Date>,
    /// The envelope's `payload_sha256` (checked against the payload).
    pub(crate) payload_sha256: [u8; trmx_proto::envelope::DIGEST_LEN],
    /// The envelope's `content_type`, as delivered (checked against the kind).
    pub(crate) content_type: String,
}

/// The effect of a receipt on the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReceiptEffect {
    /// No outbox entry has that id.
    Unknown,
    /// The entry moved to this state.
    Moved(OutboxState),
    /// The entry's state does not allow the move (already further).
    Ignored(OutboxState),
    /// A delivery receipt for an entry withdrawn here: it moved to `DELIVERED`, its
    /// record saying so ([`DELIVERED_DESPITE_WITHDRAWAL`]).
    DeliveredDespiteWithdrawal,
    /// The receipt contradicts the entry's first final report ([`contradicts`]): the
    /// entry stays in `state`, as that report left it. `first`: this outcome
    /// contradicts it for the first time (a repeat is not said again).
    Contradicted {
        /// The entry's state, unchanged.
        state: OutboxState,
        /// The first receipt with this outcome to contradict it.
        first: bool,
    },
}

/// Whether a receipt that makes an entry `target` (with `failure`, for a non-delivery
/// report) contradicts the final report the entry has from the broker: every exit of a
/// message on the broker is final (DESIGN.md §4) but for a redrive of one expired or
/// dead-lettered (not rejected), which may then be acknowledged (`FAILED → DELIVERED`).
/// So a report that the recipient rejected it or an operator purged it, and a delivery
/// receipt, say together what cannot have happened, in either order (a broken broker, or
/// one whose store was damaged): the first report wins. An expiry's or a dead-lettering's
/// report after the delivery receipt is none: a redriven message has both, and the
/// report, made first, comes again after the receipt when its ack was lost (it is
/// ignored, as any report after the entry settled). The node's own conclusions
/// (withdrawn here, lost by the broker, refused at submit) are no report: a delivery
/// receipt after them is news, and is taken.
fn contradicts(rec: &OutRec, target: OutboxState, failure: Option<&Failure>, at: Millis) -> bool {
    let final_report =
        |f: &Failure| matches!(f.outcome.as_str(), "rejected-by-recipient" | "purged");
    match (rec.state, target) {
        (OutboxState::Delivered, OutboxState::Failed) => failure.is_some_and(final_report),
        (OutboxState::Failed, OutboxState::Delivered) => {
            rec.failure.as_ref().is_some_and(final_report)
        }
        // (a rejected or purged message is never redriven: another non-delivery report
        // of it cannot be true either; but for an expiry's or a dead-lettering's made
        // before it, the report of a redriven message's earlier end coming late or again)
        (OutboxState::Failed, OutboxState::Failed) => rec.failure.as_ref().is_some_and(|first| {
            final_report(first)
                && failure.is_some_and(|f| {
                    f.outcome != first.outcome
                        && !(matches!(f.outcome.as_str(), "expired" | "dead-lettered")
                            && rec.outcome_at.is_some_and(|shown| at <= shown))
                })
        }),
        _ => false,
    }
}

/// Whether a non-delivery report is news about an entry `FAILED` by an expiry or a
/// dead-lettering: the broker redrove the message since, and this is what became of it
/// then (another outcome, made after the one shown). One made before it (a report
/// redelivered, its ack lost) is not: the entry shows the latest.
fn after_redrive(rec: &OutRec, failure: Option<&Failure>, at: Millis) -> bool {
    rec.state == OutboxState::Failed
        && rec
            .failure
            .as_ref()
            .is_some_and(|first| matches!(first.outcome.as_str(), "expired" | "dead-lettered"))
        && failure.is_some_and(|f| {
            rec.failure
                .as_ref()
                .is_some_and(|first| first.outcome != f.outcome)
        })
        && rec.outcome_at.is_some_and(|shown| at > shown)
}

/// `last_error` of an entry withdrawn here whose delivery receipt came after: its
/// recipient's node stored it before the withdrawal reached the broker, or the broker's
/// store was restored from before the withdrawal. The entry shows `DELIVERED` (what
/// happened), and this says that the withdrawal came too late.
pub(crate) const DELIVERED_DESPITE_WITHDRAWAL: &str = "withdrawn here, but delivered: the \
    recipient's node stored it before the withdrawal took effect on the broker (or the \
    broker's store was restored from before it)";

/// `last_error` of a `SUBMITTED` entry that the outbox check found withdrawn on the
/// broker. The node cannot tell a withdrawal asked for here whose answer was lost from a
/// broker's mistake, and a caseworker who never withdrew the message must not read the
/// entry as their own withdrawal.
pub(crate) const WITHDRAWN_BY_BROKER_NOTE: &str = "the broker reported this message \
    withdrawn (a withdrawal whose answer was lost?); it was not delivered: if nobody here \
    withdrew it, send it again and ask the broker's operator why";

/// What [`Store::count_other_answer`] makes of one more status answer about another
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OtherAnswer {
    /// Within the bound: submit the entry again.
    Resubmit,
    /// This answer passed the bound: no more submits again (say it, once).
    BoundReached,
    /// Past the bound before: nothing to do.
    PastBound,
}

/// `last_error` of a `SUBMITTED` entry that the outbox check stopped submitting again,
/// the broker having answered about another message more often than the bound.
pub(crate) const OTHER_ANSWERS_NOTE: &str = "the broker's status answers named another \
    message again and again, and it was submitted again as often as the node does: it \
    stays submitted until its receipt comes; ask the broker's operator why its status \
    answers name another message";

/// The result of changing an outbox entry.
#[derive(Debug, Clone)]
pub(crate) struct Updated {
    /// The entry afterwards.
    pub(crate) entry: OutboxEntry,
    /// Whether anything changed.
    pub(crate) changed: bool,
}

/// Keeps `queued`, `submitted` and the counters in step with a state move
/// of `rec` (as it is after the move). `submitted_at` is set once, with or
/// before the move to `SUBMITTED`, so the `submitted` key of `rec` is the
/// one it had before the move too.
fn t_move_state(t: &[TransactionalTree], rec: &OutRec, before: OutboxState) -> TxResult<()> {
    tadd(&t[META], state_counter(before), -1)?;
    tadd(&t[META], state_counter(rec.state), 1)?;
    if before == OutboxState::Queued {
        t[QUEUED].remove(&be(rec.seq))?;
        t[QUEUED_URGENT].remove(&be(rec.seq))?;
    }
    if before == OutboxState::Submitted {
        t[SUBMITTED].remove(submitted_key(rec))?;
    }
    if rec.state == OutboxState::Submitted {
        let id = parse_mid(&rec.message_id).map_err(ConflictableTransactionError::Abort)?;
        t[SUBMITTED].insert(submitted_key(rec), &id.as_bytes()[..])?;
    }
    Ok(())
}

/// The `submitted` key of `rec`: when it was submitted, then its out seq.
fn submitted_key(rec: &OutRec) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&be(rec.submitted_at.unwrap_or(0)));
    key.extend_from_slice(&be(rec.seq));
    key
}

/// The outcome and its time of an entry `FAILED` in a way the broker may undo by a
/// redrive (`expired`, `dead-lettered`: not `rejected-by-recipient`, which the broker does
/// not redrive, nor the node's own conclusions): what the outbox check watches
/// ([`Store::redrive_due`]). `None` for any other entry.
fn watched_outcome(rec: &OutRec) -> Option<(&str, Millis)> {
    let failure = rec.failure.as_ref()?;
    (rec.state == OutboxState::Failed
        && matches!(failure.outcome.as_str(), "expired" | "dead-lettered"))
    .then_some((failure.outcome.as_str(), rec.outcome_at?))
}

/// The `redrive_watch` key of `rec` asked about next at `ask_at`.
fn redrive_key(ask_at: Millis, rec: &OutRec) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&be(ask_at));
    key.extend_from_slice(&be(rec.seq));
    key
}

/// Puts `rec` in `redrive_watch` under `ask_at` (out of the key it had), or, with
/// `None`, takes it out; `rec` is written by the caller.
fn t_watch_at(t: &[TransactionalTree], rec: &mut OutRec, ask_at: Option<Millis>) -> TxResult<()> {
    if let Some(old) = rec.redrive_ask_at.take() {
        t[REDRIVE_WATCH].remove(redrive_key(old, rec))?;
    }
    let Some(ask_at) = ask_at else {
        return Ok(());
    };
    let Some((_, outcome_at)) = watched_outcome(rec) else {
        return Ok(());
    };
    let id = parse_mid(&rec.message_id).map_err(ConflictableTransactionError::Abort)?;
    let mut value = Vec::with_capacity(24);
    value.extend_from_slice(id.as_bytes());
    value.extend_from_slice(&be(outcome_at));
    t[REDRIVE_WATCH].insert(redrive_key(ask_at, rec), value)?;
    rec.redrive_ask_at = Some(ask_at);
    Ok(())
}

/// Keeps `redrive_watch` in step with a change of `rec` that had `before` as its
/// [`watched_outcome`]: an entry that became watched (or whose outcome or its time
/// changed: the broker redrove it, and it ended again) is asked about at the next check
/// (key 0); one that no longer is leaves the index. An unchanged one keeps its key, or
/// none if the check stopped asking about it.
fn t_rewatch(
    t: &[TransactionalTree],
    before: Option<(String, Millis)>,
    rec: &mut OutRec,
) -> TxResult<()> {
    let now = watched_outcome(rec).map(|(outcome, at)| (outcome.to_owned(), at));
    if now == before {
        return Ok(());
    }
    t_watch_at(t, rec, now.map(|_| 0))
}

/// Entry counts by state (the inbox's is in [`InboxMark`]: it is shown as of the last flush).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    pub(crate) queued: u64,
    pub(crate) submitted: u64,
    pub(crate) failed: u64,
    pub(crate) withdrawals_pending: u64,
}

/// Where the inbox stands: its highest seq and how many entries it holds, read together
/// ([`Store::inbox_mark`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct InboxMark {
    /// The highest inbox seq.
    pub(crate) last_seq: u64,
    /// The number of inbox entries.
    pub(crate) total: u64,
}

/// Whether an outbox entry may move from `from` to `to` (DESIGN.md §4).
pub(crate) fn can_move(from: OutboxState, to: OutboxState) -> bool {
    use OutboxState::{Delivered, Failed, Queued, Submitted};
    matches!(
        (from, to),
        (Queued, Submitted | Delivered | Failed)
            | (Submitted, Delivered | Failed)
            | (Failed, Delivered)
    )
}

/// `last_error` of an entry withdrawn here while the broker may hold it.
const WITHDRAW_PENDING_NOTE: &str = "withdrawn here while the broker was out of reach; an \
    earlier submit may have reached it, so the node withdraws it there as soon as it can";

/// Whether a message that failed this way is still on the broker with its payload,
/// for an operator's redrive (expired, dead-lettered or rejected): its sender can
/// still withdraw it there, and so delete that payload.
pub(crate) fn kept_for_redrive(failure: &Failure) -> bool {
    matches!(
        failure.outcome.as_str(),
        "expired" | "dead-lettered" | "rejected-by-recipient"
    )
}

/// Makes `rec` `FAILED` with outcome `withdrawn` at `at` (the caller moves the state
/// counters).
fn withdraw_rec(rec: &mut OutRec, at: Millis) {
    rec.state = OutboxState::Failed;
    rec.failure = Some(Failure {
        outcome: "withdrawn".into(),
        reason_code: "WITHDRAWN".into(),
        field_path: String::new(),
    });
    rec.outcome_at = Some(at);
}

fn store_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Store(e.to_string())
}

fn abort<T>(e: NodeError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_err(e: TransactionError<NodeError>) -> NodeError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => store_err(e),
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, NodeError> {
    serde_json::to_vec(value).map_err(store_err)
}

fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, NodeError> {
    serde_json::from_slice(bytes).map_err(|e| NodeError::Store(format!("corrupt record: {e}")))
}

fn tget<T: DeserializeOwned>(tree: &TransactionalTree, key: &[u8]) -> TxResult<Option<T>> {
    match tree.get(key)? {
        Some(bytes) => match from_json(&bytes) {
            Ok(value) => Ok(Some(value)),
            Err(e) => abort(e),
        },
        None => Ok(None),
    }
}

fn tput<T: Serialize>(tree: &TransactionalTree, key: &[u8], value: &T) -> TxResult<()> {
    match to_json(value) {
        Ok(bytes) => {
            tree.insert(key, bytes)?;
            Ok(())
        }
        Err(e) => abort(e),
    }
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn read_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or_default()
}

fn tcounter(meta: &TransactionalTree, name: &str) -> TxResult<u64> {
    Ok(meta.get(name)?.map(|v| read_u64(&v)).unwrap_or(0))
}

fn tadd(meta: &TransactionalTree, name: &str, delta: i64) -> TxResult<u64> {
    let now = tcounter(meta, name)?;
    let next = now.saturating_add_signed(delta);
    meta.insert(name, &be(next))?;
    Ok(next)
}

fn state_counter(state: OutboxState) -> &'static str {
    match state {
        OutboxState::Queued => "n_queued",
        OutboxState::Submitted => "n_submitted",
        OutboxState::Delivered => "n_delivered",
        OutboxState::Failed => "n_failed",
    }
}

fn date_key(date: Date) -> [u8; 4] {
    let [y0, y1] = date.year.to_be_bytes();
    [y0, y1, date.month, date.day]
}

fn case_key(case: CaseRef, at: Millis, id: MessageId) -> Vec<u8> {
    let mut key = Vec::with_capacity(40);
    key.extend_from_slice(case.as_bytes());
    key.extend_from_slice(&be(at));
    key.extend_from_slice(id.as_bytes());
    key
}

/// The message id of a [`case_key`].
fn case_key_id(key: &[u8]) -> Result<MessageId, NodeError> {
    key.get(24..40)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(MessageId::from_bytes)
        .ok_or_else(|| NodeError::Store("corrupt case index".into()))
}

/// The message id an entry's stored `answered_by` names.
fn stored_answer(answered_by: &str) -> TxResult<MessageId> {
    MessageId::parse(answered_by).map_err(|_| {
        ConflictableTransactionError::Abort(NodeError::Store("corrupt answered_by".into()))
    })
}

fn due_key(date: Date, id: MessageId) -> Vec<u8> {
    let mut key = date_key(date).to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn retention_key(date: Date, dir: u8, id: MessageId) -> Vec<u8> {
    let mut key = date_key(date).to_vec();
    key.push(dir);
    key.extend_from_slice(id.as_bytes());
    key
}

fn dedup_key(id: MessageId, sender: &ParticipantId) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.extend_from_slice(sender.as_str().as_bytes());
    key
}

fn kind_byte(kind: Kind) -> u8 {
    u8::try_from(kind.to_pb() as i32).unwrap_or(0)
}

fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Urgent => "urgent",
        Priority::Normal => "normal",
    }
}

fn parse_priority(s: &str) -> Result<Priority, NodeError> {
    match s {
        "urgent" => Ok(Priority::Urgent),
        "normal" => Ok(Priority::Normal),
        _ => Err(NodeError::Store("corrupt record: priority".into())),
    }
}

fn corrupt(what: &str) -> impl FnOnce(trmx_proto::ValidationError) -> NodeError + '_ {
    move |_| NodeError::Store(format!("corrupt record: {what}"))
}

fn parse_mid(s: &str) -> Result<MessageId, NodeError> {
    MessageId::parse(s).map_err(corrupt("message id"))
}

fn parse_opt_mid(s: Option<&String>) -> Result<Option<MessageId>, NodeError> {
    s.map(|s| parse_mid(s)).transpose()
}

fn parse_kind(s: &str) -> Result<Kind, NodeError> {
    Kind::from_name(s).ok_or_else(|| NodeError::Store("corrupt record: kind".into()))
}

impl OutRec {
    pub(crate) fn to_entry(&self) -> Result<OutboxEntry, NodeError> {
        Ok(OutboxEntry {
            message_id: parse_mid(&self.message_id)?,
            idempotency_key: self.idempotency_key.clone(),
            recipient: ParticipantId::parse(&self.recipient).map_err(corrupt("recipient"))?,
            kind: parse_kind(&self.kind)?,
            case_ref: CaseRef::parse(&self.case_ref).map_err(corrupt("case"))?,
            in_reply_to: parse_opt_mid(self.in_reply_to.as_ref())?,
            priority: parse_priority(&self.priority)?,
            state: self.state,
            answered_by: parse_opt_mid(self.answered_by.as_ref())?,
            created_at: self.created_at,
            submitted_at: self.submitted_at,
            outcome_at: self.outcome_at,
            failure: self.failure.clone(),
            submit_attempts: self.submit_attempts,
            last_error: self.last_error.clone(),
            body_erased: self.body_erased,
            contradicted_by: self.contradicted_by.clone(),
        })
    }
}

impl InRec {
    pub(crate) fn to_entry(&self) -> Result<InboxEntry, NodeError> {
        Ok(InboxEntry {
            seq: self.seq,
            message_id: parse_mid(&self.message_id)?,
            sender: ParticipantId::parse(&self.sender).map_err(corrupt("sender"))?,
            kind: parse_kind(&self.kind)?,
            case_ref: CaseRef::parse(&self.case_ref).map_err(corrupt("case"))?,
            in_reply_to: parse_opt_mid(self.in_reply_to.as_ref())?,
            priority: parse_priority(&self.priority)?,
            created_at: self.created_at,
            accepted_at: self.accepted_at,
            received_at: self.received_at,
            answered_by: parse_opt_mid(self.answered_by.as_ref())?,
            body_erased: self.body_erased,
        })
    }
}

impl Store {
    /// Opens (or creates) the database in `dir` with a page cache of
    /// `cache_capacity` bytes.
    pub(crate) fn open(dir: &Path, cache_capacity: u64) -> Result<Store, NodeError> {
        // personal data: only the node's user may enter (sled's files are 0644)
        trmx_durable::private_dir(dir)
            .map_err(|e| NodeError::Store(format!("cannot open {}: {e}", dir.display())))?;
        let config = sled::Config::new().path(dir).cache_capacity(cache_capacity);
        let db = trmx_durable::open_sled(&config).map_err(|e| {
            let why = if trmx_durable::sled_locked(&e) {
                "it is locked by another process (is another node running on it?)".to_owned()
            } else {
                e.to_string()
            };
            NodeError::Store(format!("cannot open {}: {why}", dir.display()))
        })?;
        let trees = TREE_NAMES
            .iter()
            .map(|name| db.open_tree(name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_err)?;
        let sync = trmx_durable::DiskSync::open(dir)
            .map_err(|e| NodeError::Store(format!("cannot sync {}: {e}", dir.display())))?;
        let store = Store {
            db,
            trees,
            sync: std::sync::Arc::new(std::sync::Mutex::new(sync)),
            disk: super::disk::Disk::default(),
        };
        store.once(
            SUBMITTED_INDEXED,
            "the submitted outbox entries",
            Self::index_submitted,
        )?;
        store.once(
            V2_INDEXED,
            "due dates, retention and urgent messages",
            Self::index_v2,
        )?;
        store.once(
            REDRIVE_INDEXED,
            "the expired and dead-lettered outbox entries",
            Self::index_redrive,
        )?;
        Ok(store)
    }

    /// Fills what a store written before these indexes lacks (see [`Self::once`]; every
    /// step may be done twice):
    /// - `queued_urgent` with the urgent messages still queued;
    /// - `due` with every request and follow-up that has a date: a follow-up replaced by
    ///   another participant's was forgotten under the earlier rule, and may be due
    ///   again ([`Self::due`] forgets again what can never be due);
    /// - `retention` with every message kept without a date of its own, under its case's
    ///   latest date, even a past one: the next run erases it or waits for the case.
    fn index_v2(&self) -> Result<u64, NodeError> {
        let mut indexed = 0u64;
        for item in self.trees[OUTBOX].iter() {
            let (key, value) = item.map_err(store_err)?;
            let rec: OutRec = from_json(&value)?;
            let id = parse_mid(&rec.message_id)?;
            if rec.state == OutboxState::Queued && rec.priority == priority_name(Priority::Urgent) {
                self.trees[QUEUED_URGENT]
                    .insert(be(rec.seq), key)
                    .map_err(store_err)?;
            }
            indexed += self.index_dates(DIR_SENT, id, &rec.case_ref, rec.due.as_deref(), {
                rec.retain_until.is_none() && !rec.body_erased
            })?;
        }
        for item in self.trees[INBOX].iter() {
            let (_, value) = item.map_err(store_err)?;
            let rec: InRec = from_json(&value)?;
            let id = parse_mid(&rec.message_id)?;
            indexed += self.index_dates(DIR_RECEIVED, id, &rec.case_ref, rec.due.as_deref(), {
                rec.retain_until.is_none() && !rec.body_erased
            })?;
        }
        Ok(indexed)
    }

    /// [`Self::index_v2`] for one message: its due date, and, when `takes_case_date`, its
    /// case's retention date. How many keys it wrote.
    fn index_dates(
        &self,
        dir: u8,
        id: MessageId,
        case_ref: &str,
        due: Option<&str>,
        takes_case_date: bool,
    ) -> Result<u64, NodeError> {
        let mut written = 0;
        if let Some(due) = due {
            let due = Date::parse(due).map_err(|_| NodeError::Store("corrupt due".into()))?;
            self.trees[DUE]
                .insert(due_key(due, id), &[dir])
                .map_err(store_err)?;
            written += 1;
        }
        if takes_case_date {
            let case = CaseRef::parse(case_ref)
                .map_err(|_| NodeError::Store("corrupt case_ref".into()))?;
            if let Some(until) = self.case_retain_until(case)? {
                self.trees[RETENTION]
                    .insert(retention_key(until, dir, id), &[])
                    .map_err(store_err)?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Fills `submitted` from the outbox, for a store written before that index (it is
    /// empty then: nothing else writes it before this runs); see [`Self::once`].
    fn index_submitted(&self) -> Result<u64, NodeError> {
        let mut indexed = 0u64;
        for item in self.trees[OUTBOX].iter() {
            let (key, value) = item.map_err(store_err)?;
            let rec: OutRec = from_json(&value)?;
            if rec.state == OutboxState::Submitted {
                self.trees[SUBMITTED]
                    .insert(submitted_key(&rec), key)
                    .map_err(store_err)?;
                indexed += 1;
            }
        }
        Ok(indexed)
    }

    /// Fills `redrive_watch` from the outbox, for a store written before that index
    /// (nothing else writes it before this runs), each entry asked about at the next
    /// check; see [`Self::once`]. One already past the watch window is dropped by the
    /// check without a call ([`Self::redrive_due`]).
    fn index_redrive(&self) -> Result<u64, NodeError> {
        let mut indexed = 0u64;
        for item in self.trees[OUTBOX].iter() {
            let (key, value) = item.map_err(store_err)?;
            // (one transaction for each entry to index, not for every entry)
            if watched_outcome(&from_json::<OutRec>(&value)?).is_none() {
                continue;
            }
            indexed += self.tx(|t| {
                let Some(mut rec) = tget::<OutRec>(&t[OUTBOX], &key)? else {
                    return Ok(0);
                };
                if watched_outcome(&rec).is_none() || rec.redrive_ask_at.is_some() {
                    return Ok(0);
                }
                t_watch_at(t, &mut rec, Some(0))?;
                tput(&t[OUTBOX], &key, &rec)?;
                Ok(1)
            })?;
        }
        Ok(indexed)
    }

    /// Runs `fill` once for this store: unless the `meta` key `flag` says it ran, then
    /// sets it, durably. `fill` writes the index keys that a store written before lacks
    /// and says how many; interrupted, it runs again at the next open.
    fn once(
        &self,
        flag: &str,
        what: &str,
        fill: impl FnOnce(&Self) -> Result<u64, NodeError>,
    ) -> Result<(), NodeError> {
        if self.trees[META].get(flag).map_err(store_err)?.is_some() {
            return Ok(());
        }
        let indexed = fill(self)?;
        self.trees[META].insert(flag, &[1]).map_err(store_err)?;
        self.flush_db()?;
        self.sync_files()?;
        if indexed > 0 {
            tracing::info!(entries = indexed, "indexed {what}");
        }
        Ok(())
    }

    /// The instant a node last recorded with [`Self::mark_running`] (`None` for a store
    /// never marked): read at start, to catch a system clock that jumped while the node
    /// was down, since retention erases bodies for good.
    pub(crate) fn last_running(&self) -> Result<Option<Millis>, NodeError> {
        let Some(value) = self.trees[META].get(RUNNING_AT).map_err(store_err)? else {
            return Ok(None);
        };
        let bytes = <[u8; 8]>::try_from(value.as_ref())
            .map_err(|_| NodeError::Store("meta: running_at is not 8 bytes".to_owned()))?;
        Ok(Some(Millis::from_be_bytes(bytes)))
    }

    /// Records, durably, that a node runs on this store at `now`.
    pub(crate) fn mark_running(&self, now: Millis) -> Result<(), NodeError> {
        self.trees[META]
            .insert(RUNNING_AT, &now.to_be_bytes()[..])
            .map_err(store_err)?;
        let flushed = self.disk.check().and_then(|()| {
            self.flush_db()?;
            self.sync_files()
        });
        self.disk.note(&flushed);
        flushed
    }

    /// sled's flush, in the process's one turn ([`trmx_durable::flush_sled`]): every flush
    /// of the node's store goes through here. Blocks: off the runtime.
    fn flush_db(&self) -> Result<(), NodeError> {
        trmx_durable::flush_sled(&self.db).map_err(store_err)?;
        Ok(())
    }

    fn tx<A>(&self, f: impl Fn(&Vec<TransactionalTree>) -> TxResult<A>) -> Result<A, NodeError> {
        self.trees[..].transaction(f).map_err(tx_err)
    }

    /// Makes everything written so far durable, also against a power cut.
    ///
    /// One sled flush at a time ([`Self::flush_db`]). A sled 0.34 flush holds sled's
    /// concurrency-control read lock while it waits for the log to be stable, and a
    /// transaction waiting for the write lock keeps every later reader out. With several
    /// flushes under way (concurrent sends), the store, and with it the node, hung for
    /// good now and then: flushes holding the lock waited for the log, a transaction
    /// waited for them, and the other flushes and sled's own log flusher waited behind
    /// it (sled issues #1241, #1308: concurrent `flush_async` deadlocks; fixed on
    /// sled's main branch, not in 0.34.7). A flush waiting its turn finds less to write.
    /// The turn is taken and sled's flush made on a blocking thread ([`Self::flush_db`],
    /// which the flushes made off the runtime take too): a caller that goes away (a
    /// client's deadline), or a runtime that shuts down, does not give up the turn while
    /// sled's flush still runs.
    ///
    /// Fails while the [`super::StoreFaults`] switch is set; its outcome is the store's
    /// health in the status ([`Self::disk`]).
    pub(crate) async fn flush_async(&self) -> Result<(), NodeError> {
        let flushed = async {
            self.disk.check()?;
            let store = self.clone();
            tokio::task::spawn_blocking(move || {
                store.flush_db()?;
                store.sync_files()
            })
            .await
            .map_err(store_err)?
        }
        .await;
        self.disk.note(&flushed);
        flushed
    }

    /// What the flushes met, and the switch that makes them fail.
    pub(crate) fn disk(&self) -> &super::disk::Disk {
        &self.disk
    }

    /// Holds every flush of this store at its last step (the sync against a power cut)
    /// until the returned sender is dropped: a test's "held flush", to drop a call that
    /// awaits one. The hold is taken when this returns.
    #[cfg(test)]
    pub(crate) fn hold_flushes(&self) -> std::sync::mpsc::Sender<()> {
        let sync = self.sync.clone();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _held = sync.lock().unwrap_or_else(|poison| poison.into_inner());
            let _ = held_tx.send(());
            // (until the sender is dropped)
            let _ = release_rx.recv();
        });
        held_rx.recv().expect("the hold thread runs");
        release_tx
    }

    /// Completes a sled flush so that it survives a power cut (blocking).
    fn sync_files(&self) -> Result<(), NodeError> {
        self.sync
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .sync()
            .map(drop)
            .map_err(|e| NodeError::Store(format!("cannot sync the node's store: {e}")))
    }

    fn counter(&self, name: &str) -> Result<u64, NodeError> {
        Ok(self.trees[META]
            .get(name)
            .map_err(store_err)?
            .map(|v| read_u64(&v))
            .unwrap_or(0))
    }

    /// Entry counts (from the counters, O(1)).
    pub(crate) fn counts(&self) -> Result<Counts, NodeError> {
        Ok(Counts {
            queued: self.counter("n_queued")?,
            submitted: self.counter("n_submitted")?,
            failed: self.counter("n_failed")?,
            // (a handful at most: each waits only for the broker to be reachable)
            withdrawals_pending: self.trees[WITHDRAW_PENDING].len() as u64,
        })
    }

    /// The highest inbox seq and the number of inbox entries, as one commit left them
    /// (both are written in the transaction that stores an entry, so they never disagree
    /// on disk, before or after a crash; read apart, a commit could fall between).
    pub(crate) fn inbox_mark(&self) -> Result<InboxMark, NodeError> {
        self.trees[META]
            .transaction(|meta| -> TxResult<InboxMark> {
                Ok(InboxMark {
                    last_seq: tcounter(meta, "inbox_seq")?,
                    total: tcounter(meta, "n_inbox")?,
                })
            })
            .map_err(tx_err)
    }

    // ---- outbox -------------------------------------------------------

    /// Whether a send used the idempotency key `key` before.
    pub(crate) fn idempotency_key_used(&self, key: &str) -> Result<bool, NodeError> {
        self.trees[IDEM]
            .contains_key(key.as_bytes())
            .map_err(store_err)
    }

    /// Stores a new outbox entry as `QUEUED`, or returns the entry already
    /// stored under the same idempotency key and content (`false`).
    /// Different content under a used key is `IdempotencyConflict`.
    pub(crate) fn enqueue(&self, new: &NewOutgoing) -> Result<(OutboxEntry, bool), NodeError> {
        let mut env = new.envelope.clone();
        let payload = std::mem::take(&mut env.payload);
        let env_bytes = env.encode_to_vec();
        let mid = new.message_id;
        let until = self.retention_of(new.retain_until, new.case_ref)?;
        let rec = self.tx(|t| {
            if let Some(idem) = tget::<IdemRec>(&t[IDEM], new.idempotency_key.as_bytes())? {
                if idem.fingerprint != new.fingerprint {
                    return abort(NodeError::IdempotencyConflict {
                        key: new.idempotency_key.clone(),
                    });
                }
                let existing = match MessageId::parse(&idem.message_id) {
                    Ok(id) => id,
                    Err(_) => return abort(NodeError::Store("corrupt idempotency entry".into())),
                };
                return match tget::<OutRec>(&t[OUTBOX], existing.as_bytes())? {
                    Some(rec) => Ok((rec, false)),
                    None => abort(NodeError::Store("idempotency entry without message".into())),
                };
            }
            let seq = tadd(&t[META], "out_seq", 1)?;
            let rec = OutRec {
                seq,
                message_id: mid.to_string(),
                idempotency_key: new.idempotency_key.clone(),
                recipient: new.recipient.to_string(),
                kind: new.kind.name().to_owned(),
                case_ref: new.case_ref.to_string(),
                in_reply_to: new.in_reply_to.map(|id| id.to_string()),
                priority: priority_name(new.priority).to_owned(),
                state: OutboxState::Queued,
                answered_by: None,
                created_at: new.created_at,
                submitted_at: None,
                outcome_at: None,
                failure: None,
                submit_attempts: 0,
                last_error: None,
                body_erased: false,
                due: new.due.map(|d| d.to_string()),
                retain_until: new.retain_until.map(|d| d.to_string()),
                contradicted_by: Vec::new(),
                other_answers: 0,
                redrive_ask_at: None,
            };
            tput(&t[OUTBOX], mid.as_bytes(), &rec)?;
            t[OUT_ENV].insert(&mid.as_bytes()[..], env_bytes.as_slice())?;
            t[OUT_BODY].insert(&mid.as_bytes()[..], payload.as_slice())?;
            t[OUT_ORDER].insert(&be(seq), &mid.as_bytes()[..])?;
            t[QUEUED].insert(&be(seq), &mid.as_bytes()[..])?;
            if new.priority == Priority::Urgent {
                t[QUEUED_URGENT].insert(&be(seq), &mid.as_bytes()[..])?;
            }
            tput(
                &t[IDEM],
                new.idempotency_key.as_bytes(),
                &IdemRec {
                    message_id: mid.to_string(),
                    fingerprint: new.fingerprint.clone(),
                },
            )?;
            t[CASES].insert(
                case_key(new.case_ref, new.created_at, mid),
                &[DIR_SENT, kind_byte(new.kind)],
            )?;
            if let Some(due) = new.due {
                t[DUE].insert(due_key(due, mid), &[DIR_SENT])?;
            }
            if let Some(until) = until {
                t[RETENTION].insert(retention_key(until, DIR_SENT, mid), &[])?;
            }
            tadd(&t[META], state_counter(OutboxState::Queued), 1)?;
            // An answer marks the received request it answers (in place of
            // an earlier answer that failed: that one answered nothing). Another
            // message naming it in `in_reply_to` (a follow-up) answers nothing:
            // the request stays owed.
            if let Some(answered) = new.in_reply_to
                && let Some(asks) = new.kind.answers()
                && let Some(seq) = t[INBOX_MID].get(answered.as_bytes())?
                && let Some(mut inrec) = tget::<InRec>(&t[INBOX], &seq)?
                && inrec.sender == new.recipient.as_str()
                && inrec.kind == asks.name()
                && match &inrec.answered_by {
                    None => true,
                    Some(earlier) => {
                        let earlier = stored_answer(earlier)?;
                        // (a store written before may name a follow-up there)
                        tget::<OutRec>(&t[OUTBOX], earlier.as_bytes())?.is_none_or(|r| {
                            r.state == OutboxState::Failed || r.kind != new.kind.name()
                        })
                    }
                }
            {
                inrec.answered_by = Some(mid.to_string());
                tput(&t[INBOX], &seq, &inrec)?;
            }
            Ok((rec, true))
        })?;
        Ok((rec.0.to_entry()?, rec.1))
    }

    /// Up to `limit` `QUEUED` entries in creation order, with the envelope
    /// to submit (byte-identical each time).
    /// Urgent ones come first: after an outage, an urgent referral (a child, an
    /// imminent return) must not wait behind every normal message queued before it.
    pub(crate) fn queued(&self, limit: usize) -> Result<Vec<(MessageId, pb::Envelope)>, NodeError> {
        let mut out: Vec<(MessageId, pb::Envelope)> = Vec::new();
        let urgent = self.trees[QUEUED_URGENT].iter();
        for item in urgent.chain(self.trees[QUEUED].iter()) {
            if out.len() >= limit {
                break;
            }
            let (_, mid) = item.map_err(store_err)?;
            let id = <[u8; 16]>::try_from(mid.as_ref())
                .map(MessageId::from_bytes)
                .map_err(|_| NodeError::Store("corrupt queue key".into()))?;
            if out.iter().any(|(taken, _)| *taken == id) {
                continue;
            }
            if let Some(env) = self.envelope(id)? {
                out.push((id, env));
            }
        }
        Ok(out)
    }

    /// The envelope of outbox entry `id` as it is submitted (byte-identical
    /// each time), while its body is kept.
    pub(crate) fn envelope(&self, id: MessageId) -> Result<Option<pb::Envelope>, NodeError> {
        let Some(env_bytes) = self.trees[OUT_ENV].get(id.as_bytes()).map_err(store_err)? else {
            return Ok(None);
        };
        let mut env = pb::Envelope::decode(env_bytes.as_ref()).map_err(store_err)?;
        let Some(payload) = self.trees[OUT_BODY].get(id.as_bytes()).map_err(store_err)? else {
            return Ok(None);
        };
        env.payload = payload.to_vec();
        Ok(Some(env))
    }

    /// `SUBMITTED` entries submitted at or before `before`, with when they
    /// were submitted, oldest first (reads only those entries' index keys).
    pub(crate) fn submitted_before(
        &self,
        before: Millis,
    ) -> Result<Vec<(MessageId, Millis)>, NodeError> {
        let mut out = Vec::new();
        for item in self.trees[SUBMITTED].range(..be(before.saturating_add(1))) {
            let (key, mid) = item.map_err(store_err)?;
            let at = key.get(..8).map(read_u64);
            let id = <[u8; 16]>::try_from(mid.as_ref()).map(MessageId::from_bytes);
            let (Some(at), Ok(id)) = (at, id) else {
                return Err(NodeError::Store("corrupt submitted index".into()));
            };
            out.push((id, at));
        }
        Ok(out)
    }

    /// Up to `limit` entries `FAILED` as expired or dead-lettered ([`watched_outcome`])
    /// that are due to be asked about at `now`, those due longest first. An entry that
    /// failed before `since` (past the watch window) is taken out of the index instead,
    /// without counting in `limit`.
    pub(crate) fn redrive_due(
        &self,
        now: Millis,
        since: Millis,
        limit: usize,
    ) -> Result<Vec<MessageId>, NodeError> {
        let mut out = Vec::new();
        for item in self.trees[REDRIVE_WATCH].range(..be(now.saturating_add(1))) {
            if out.len() >= limit {
                break;
            }
            let (_, value) = item.map_err(store_err)?;
            let id = value
                .get(..16)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(MessageId::from_bytes);
            let (Some(id), Some(outcome_at)) = (id, value.get(16..24).map(read_u64)) else {
                return Err(NodeError::Store("corrupt redrive_watch index".into()));
            };
            if outcome_at < since {
                self.redrive_unwatch(id)?;
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The outbox check asked the broker about watched entry `id` and is to ask again
    /// at `next` (nothing happens to an entry no longer watched).
    pub(crate) fn redrive_asked(&self, id: MessageId, next: Millis) -> Result<(), NodeError> {
        self.redrive_rekey(id, Some(next))
    }

    /// The outbox check asks the broker about entry `id` no more: it is out of the watch
    /// window, or the broker can no longer redrive it.
    pub(crate) fn redrive_unwatch(&self, id: MessageId) -> Result<(), NodeError> {
        self.redrive_rekey(id, None)
    }

    fn redrive_rekey(&self, id: MessageId, next: Option<Millis>) -> Result<(), NodeError> {
        self.tx(|t| {
            let Some(mut rec) = tget::<OutRec>(&t[OUTBOX], id.as_bytes())? else {
                return Ok(());
            };
            if rec.redrive_ask_at.is_none() {
                return Ok(());
            }
            t_watch_at(t, &mut rec, next)?;
            tput(&t[OUTBOX], id.as_bytes(), &rec)
        })
    }

    /// The broker no longer knows a `SUBMITTED` entry and it cannot be
    /// submitted again: `SUBMITTED → FAILED` with `failure`.
    pub(crate) fn mark_lost(
        &self,
        id: MessageId,
        failure: Failure,
        error: &str,
        at: Millis,
    ) -> Result<Option<Updated>, NodeError> {
        self.update_out(id, |rec| {
            if rec.state != OutboxState::Submitted {
                return Ok(false);
            }
            rec.last_error = Some(error.to_owned());
            rec.state = OutboxState::Failed;
            rec.failure = Some(failure.clone());
            rec.outcome_at = Some(at);
            Ok(true)
        })
    }

    /// Counts one more status answer about another message for entry `id` (the outbox
    /// check asked about it), unless it has had more than `bound` already: whether it
    /// is to be submitted again (at most `bound` times over its life), or reached the
    /// bound now (its record says so, [`OTHER_ANSWERS_NOTE`]), or before.
    pub(crate) fn count_other_answer(
        &self,
        id: MessageId,
        bound: u32,
    ) -> Result<OtherAnswer, NodeError> {
        let verdict = std::cell::Cell::new(OtherAnswer::PastBound);
        self.update_out(id, |rec| {
            if rec.other_answers > bound {
                verdict.set(OtherAnswer::PastBound);
                return Ok(false);
            }
            rec.other_answers += 1;
            if rec.other_answers > bound {
                rec.last_error = Some(OTHER_ANSWERS_NOTE.to_owned());
                verdict.set(OtherAnswer::BoundReached);
            } else {
                verdict.set(OtherAnswer::Resubmit);
            }
            Ok(true)
        })?;
        Ok(verdict.get())
    }

    /// Takes back the last [`Self::count_other_answer`] of `id`, whose count could not
    /// be flushed: its resubmit (or the WARN that the bound is reached) did not follow.
    pub(crate) fn uncount_other_answer(&self, id: MessageId) -> Result<(), NodeError> {
        self.update_out(id, |rec| {
            rec.other_answers = rec.other_answers.saturating_sub(1);
            Ok(true)
        })?;
        Ok(())
    }

    /// Records that a `SUBMITTED` entry was submitted again (the broker had
    /// lost it); the state stays `SUBMITTED`.
    pub(crate) fn note_resubmitted(&self, id: MessageId, note: &str) -> Result<(), NodeError> {
        self.update_out(id, |rec| {
            rec.submit_attempts = rec.submit_attempts.saturating_add(1);
            rec.last_error = Some(note.to_owned());
            Ok(true)
        })?;
        Ok(())
    }

    /// Changes one outbox entry in a transaction. `f` gets the record and
    /// returns whether it changed it; states moves keep `queued`, `submitted`,
    /// `redrive_watch` and the counters in step. `None` when there is no such entry.
    fn update_out(
        &self,
        id: MessageId,
        f: impl Fn(&mut OutRec) -> Result<bool, NodeError>,
    ) -> Result<Option<Updated>, NodeError> {
        let rec = self.tx(|t| {
            let Some(mut rec) = tget::<OutRec>(&t[OUTBOX], id.as_bytes())? else {
                return Ok(None);
            };
            let before = rec.state;
            let watched = watched_outcome(&rec).map(|(outcome, at)| (outcome.to_owned(), at));
            match f(&mut rec) {
                Ok(false) => return Ok(Some((rec, false))),
                Ok(true) => {}
                Err(e) => return abort(e),
            }
            if rec.state != before {
                t_move_state(t, &rec, before)?;
            }
            t_rewatch(t, watched, &mut rec)?;
            tput(&t[OUTBOX], id.as_bytes(), &rec)?;
            Ok(Some((rec, true)))
        })?;
        rec.map(|(r, changed)| {
            Ok(Updated {
                entry: r.to_entry()?,
                changed,
            })
        })
        .transpose()
    }

    /// Records `attempts` failed submit attempts (transient errors), the last with
    /// `error`; the state does not change. The error is kept only while the entry is
    /// queued: one that has left the queue meanwhile (a withdrawal between the failed
    /// attempt and this note, which the submit loop writes after letting withdrawals
    /// in again) keeps the last error it had, since it no longer waits for a submit.
    pub(crate) fn note_submit_error(
        &self,
        id: MessageId,
        error: Option<&str>,
        attempts: u32,
    ) -> Result<(), NodeError> {
        self.update_out(id, |rec| {
            rec.submit_attempts = rec.submit_attempts.saturating_add(attempts);
            if let Some(error) = error
                && rec.state == OutboxState::Queued
            {
                rec.last_error = Some(error.to_owned());
            }
            Ok(true)
        })?;
        Ok(())
    }

    /// The broker accepted the entry at its first attempt (tests): see
    /// [`Self::mark_submitted_after`].
    #[cfg(test)]
    pub(crate) fn mark_submitted(
        &self,
        id: MessageId,
        at: Millis,
    ) -> Result<Option<Updated>, NodeError> {
        self.mark_submitted_after(id, at, 1)
    }

    /// The broker accepted the entry: `QUEUED → SUBMITTED` (if a receipt did
    /// not already move it further), after `attempts` submit attempts (this one, and
    /// failed ones not recorded yet).
    pub(crate) fn mark_submitted_after(
        &self,
        id: MessageId,
        at: Millis,
        attempts: u32,
    ) -> Result<Option<Updated>, NodeError> {
        self.update_out(id, |rec| {
            rec.submit_attempts = rec.submit_attempts.saturating_add(attempts);
            rec.last_error = None;
            if rec.submitted_at.is_none() {
                rec.submitted_at = Some(at);
            }
            if rec.state == OutboxState::Queued {
                rec.state = OutboxState::Submitted;
            }
            Ok(true)
        })
    }

    /// The broker refused the entry for good: `QUEUED → FAILED`, after `attempts` submit
    /// attempts (this one, and failed ones not recorded yet).
    pub(crate) fn mark_refused(
        &self,
        id: MessageId,
        failure: Failure,
        error: &str,
        at: Millis,
        attempts: u32,
    ) -> Result<Option<Updated>, NodeError> {
        self.update_out(id, |rec| {
            rec.submit_attempts = rec.submit_attempts.saturating_add(attempts);
            rec.last_error = Some(error.to_owned());
            if rec.state == OutboxState::Queued {
                rec.state = OutboxState::Failed;
                rec.failure = Some(failure.clone());
                rec.outcome_at = Some(at);
            }
            Ok(true)
        })
    }

    /// Applies a receipt: `DELIVERED` for a delivery receipt, `FAILED` with
    /// `failure` for a non-delivery report; only forward moves (and
    /// `FAILED → DELIVERED`, but not against a final report, [`contradicts`]: then only
    /// the contradiction is recorded). An entry without `submitted_at` (the receipt came
    /// first) takes the receipt's time, `at` (not before the entry was queued).
    pub(crate) fn apply_receipt(
        &self,
        id: MessageId,
        failure: Option<Failure>,
        at: Millis,
    ) -> Result<ReceiptEffect, NodeError> {
        let target = if failure.is_some() {
            OutboxState::Failed
        } else {
            OutboxState::Delivered
        };
        let outcome = failure.as_ref().map_or("delivered", |f| f.outcome.as_str());
        // (whether the receipt contradicts the entry's first report for the first time,
        // read in the transaction that records it)
        let contradiction = std::cell::Cell::new(None);
        let updated = self.update_out(id, |rec| {
            contradiction.set(None);
            if contradicts(rec, target, failure.as_ref(), at) {
                let first = !rec.contradicted_by.iter().any(|o| o == outcome);
                contradiction.set(Some(first));
                if first {
                    rec.contradicted_by.push(outcome.to_owned());
                }
                return Ok(first);
            }
            if after_redrive(rec, failure.as_ref(), at) {
                rec.failure = failure.clone();
                rec.outcome_at = Some(at);
                return Ok(true);
            }
            if !can_move(rec.state, target) {
                return Ok(false);
            }
            // (the outcome cannot come before the message was queued here: a broker
            // clock behind this node's would put it there)
            let at = at.max(rec.created_at);
            // (a receipt proves that the broker took it: one that comes before the
            // submit's answer is recorded, or instead of it, must not leave the entry
            // looking as if it never left, `OutRec::never_arrived`)
            if rec.submitted_at.is_none() {
                rec.submitted_at = Some(at);
            }
            // (a caseworker who withdrew a misaddressed message must learn that it
            // arrived all the same: the record keeps that it was withdrawn)
            if target == OutboxState::Delivered
                && rec
                    .failure
                    .as_ref()
                    .is_some_and(|f| f.outcome == "withdrawn")
            {
                rec.last_error = Some(DELIVERED_DESPITE_WITHDRAWAL.to_owned());
            }
            rec.state = target;
            rec.failure = failure.clone();
            rec.outcome_at = Some(at);
            Ok(true)
        })?;
        Ok(match (updated, contradiction.get()) {
            (None, _) => ReceiptEffect::Unknown,
            (Some(u), Some(first)) => ReceiptEffect::Contradicted {
                state: u.entry.state,
                first,
            },
            (Some(u), None)
                if u.changed
                    && u.entry.last_error.as_deref() == Some(DELIVERED_DESPITE_WITHDRAWAL) =>
            {
                ReceiptEffect::DeliveredDespiteWithdrawal
            }
            (Some(u), None) if u.changed => ReceiptEffect::Moved(target),
            (Some(u), None) => ReceiptEffect::Ignored(u.entry.state),
        })
    }

    /// Withdraws a `QUEUED` entry locally (`FAILED`, outcome `withdrawn`). With
    /// `broker_done` (the broker withdrew it, or does not hold it) also a `SUBMITTED`
    /// one, and a `FAILED` one whose payload the broker kept for a redrive
    /// ([`kept_for_redrive`]). Returns the entry as it is afterwards.
    pub(crate) fn withdraw_local(
        &self,
        id: MessageId,
        at: Millis,
        broker_done: bool,
    ) -> Result<Option<Updated>, NodeError> {
        self.update_out(id, |rec| {
            let allowed = rec.state == OutboxState::Queued
                || (broker_done
                    && (rec.state == OutboxState::Submitted
                        || (rec.state == OutboxState::Failed
                            && rec.failure.as_ref().is_some_and(kept_for_redrive))));
            if !allowed {
                return Ok(false);
            }
            withdraw_rec(rec, at);
            Ok(true)
        })
    }

    /// Withdraws a `SUBMITTED` entry that the broker holds as withdrawn (found by the
    /// outbox check): `FAILED`, outcome `withdrawn`, its record saying that the broker
    /// reported it so ([`WITHDRAWN_BY_BROKER_NOTE`]). Returns the entry as it is afterwards.
    pub(crate) fn withdrawn_by_broker(
        &self,
        id: MessageId,
        at: Millis,
    ) -> Result<Option<Updated>, NodeError> {
        self.update_out(id, |rec| {
            if rec.state != OutboxState::Submitted {
                return Ok(false);
            }
            withdraw_rec(rec, at);
            rec.last_error = Some(WITHDRAWN_BY_BROKER_NOTE.to_owned());
            Ok(true)
        })
    }

    /// Withdraws a `QUEUED` entry that an earlier submit may have brought to the broker
    /// (its answer was lost), while the broker cannot be reached: `FAILED`, outcome
    /// `withdrawn`, and listed for the broker's `Withdraw` ([`Self::pending_withdrawals`]).
    /// `false` when the entry is not `QUEUED` (any more).
    pub(crate) fn withdraw_here_then_at_broker(
        &self,
        id: MessageId,
        at: Millis,
    ) -> Result<bool, NodeError> {
        self.tx(|t| {
            let Some(mut rec) = tget::<OutRec>(&t[OUTBOX], id.as_bytes())? else {
                return Ok(false);
            };
            if rec.state != OutboxState::Queued {
                return Ok(false);
            }
            withdraw_rec(&mut rec, at);
            rec.last_error = Some(WITHDRAW_PENDING_NOTE.to_owned());
            t_move_state(t, &rec, OutboxState::Queued)?;
            tput(&t[OUTBOX], id.as_bytes(), &rec)?;
            t[WITHDRAW_PENDING].insert(&id.as_bytes()[..], &[][..])?;
            Ok(true)
        })
    }

    /// Lists an entry withdrawn here for the broker's `Withdraw` ([`Self::pending_withdrawals`]),
    /// when the call made at once got no answer. `false` (nothing changes) when the entry
    /// is not withdrawn here (any more: a delivery receipt came first).
    pub(crate) fn pend_withdrawal(&self, id: MessageId) -> Result<bool, NodeError> {
        self.tx(|t| {
            let Some(mut rec) = tget::<OutRec>(&t[OUTBOX], id.as_bytes())? else {
                return Ok(false);
            };
            let withdrawn = rec.state == OutboxState::Failed
                && rec
                    .failure
                    .as_ref()
                    .is_some_and(|f| f.outcome == "withdrawn");
            if !withdrawn {
                return Ok(false);
            }
            rec.last_error = Some(WITHDRAW_PENDING_NOTE.to_owned());
            tput(&t[OUTBOX], id.as_bytes(), &rec)?;
            t[WITHDRAW_PENDING].insert(&id.as_bytes()[..], &[][..])?;
            Ok(true)
        })
    }

    /// Up to `limit` messages withdrawn here that are still to be withdrawn on the
    /// broker.
    pub(crate) fn pending_withdrawals(&self, limit: usize) -> Result<Vec<MessageId>, NodeError> {
        self.trees[WITHDRAW_PENDING]
            .iter()
            .keys()
            .take(limit)
            .map(|key| {
                let key = key.map_err(store_err)?;
                <[u8; 16]>::try_from(key.as_ref())
                    .map(MessageId::from_bytes)
                    .map_err(|_| NodeError::Store("corrupt withdraw_pending key".into()))
            })
            .collect()
    }

    /// Whether message `id` is still to be withdrawn on the broker.
    pub(crate) fn withdrawal_pending(&self, id: MessageId) -> Result<bool, NodeError> {
        self.trees[WITHDRAW_PENDING]
            .contains_key(id.as_bytes())
            .map_err(store_err)
    }

    /// The broker answered the `Withdraw` of a pending withdrawal: `note` says how. An
    /// entry whose delivery receipt came meanwhile keeps its note that it was delivered
    /// despite the withdrawal ([`DELIVERED_DESPITE_WITHDRAWAL`]): the broker's answer (it
    /// could not withdraw it) says less, and the caseworker must learn that it arrived.
    pub(crate) fn withdrawal_done(&self, id: MessageId, note: &str) -> Result<(), NodeError> {
        self.tx(|t| {
            t[WITHDRAW_PENDING].remove(&id.as_bytes()[..])?;
            if let Some(mut rec) = tget::<OutRec>(&t[OUTBOX], id.as_bytes())?
                && rec.last_error.as_deref() != Some(DELIVERED_DESPITE_WITHDRAWAL)
            {
                rec.last_error = Some(note.to_owned());
                tput(&t[OUTBOX], id.as_bytes(), &rec)?;
            }
            Ok(())
        })
    }

    fn out_rec(&self, id: MessageId) -> Result<Option<OutRec>, NodeError> {
        self.trees[OUTBOX]
            .get(id.as_bytes())
            .map_err(store_err)?
            .map(|b| from_json(&b))
            .transpose()
    }

    /// One outbox entry.
    pub(crate) fn outbox_entry(&self, id: MessageId) -> Result<Option<OutboxEntry>, NodeError> {
        self.out_rec(id)?.map(|r| r.to_entry()).transpose()
    }

    /// Outbox entries matching `filter`, newest first, from `filter.start`, answered only
    /// by an inbox entry up to seq `flushed` (see [`Self::shown_outbox`]).
    pub(crate) fn list_outbox(
        &self,
        filter: &ListFilter,
        flushed: u64,
    ) -> Result<Page<OutboxEntry>, NodeError> {
        let read = |mid: &[u8]| match self.trees[OUTBOX].get(mid).map_err(store_err)? {
            Some(bytes) => from_json::<OutRec>(&bytes)?.to_entry().map(Some),
            None => Ok(None),
        };
        page_of(
            &self.trees[OUT_ORDER],
            filter,
            read,
            |entry: &OutboxEntry| {
                filter.case_ref.is_none_or(|c| c == entry.case_ref)
                    && filter
                        .counterpart
                        .as_ref()
                        .is_none_or(|p| *p == entry.recipient)
                    && filter.kind.is_none_or(|k| k == entry.kind)
                    && filter.state.is_none_or(|s| s == entry.state)
            },
        )?
        .try_map(|e| self.shown_outbox(e, flushed))
    }

    /// `entry` as it is shown: `answered_by` only if it names an answer of the kind
    /// the message asks for (a store written before may name a follow-up there) that
    /// is shown, i.e. an inbox entry with a seq up to `flushed`, the inbox's last flushed
    /// seq (a crash before its flush would take the answer back).
    pub(crate) fn shown_outbox(
        &self,
        mut entry: OutboxEntry,
        flushed: u64,
    ) -> Result<OutboxEntry, NodeError> {
        if !self.answered_by_answer(entry.answered_by, entry.kind, flushed)? {
            entry.answered_by = None;
        }
        Ok(entry)
    }

    /// The body of an outbox entry (`None` when erased).
    pub(crate) fn outbox_body(&self, id: MessageId) -> Result<Option<Vec<u8>>, NodeError> {
        Ok(self.trees[OUT_BODY]
            .get(id.as_bytes())
            .map_err(store_err)?
            .map(|b| b.to_vec()))
    }

    // ---- inbox --------------------------------------------------------

    /// Whether `sender`'s message `id` was stored before (with `content`, or other
    /// content), or its id is another message's here.
    pub(crate) fn id_use(
        &self,
        sender: &ParticipantId,
        id: MessageId,
        content: Content<'_>,
    ) -> Result<IdUse, NodeError> {
        let t = &self.trees;
        if let Some(seq) = t[DEDUP].get(dedup_key(id, sender)).map_err(store_err)? {
            let same = self
                .inbox_rec(read_u64(&seq))?
                .is_none_or(|rec| same_content(&rec, content));
            return Ok(if same { IdUse::Stored } else { IdUse::Conflict });
        }
        let taken = t[OUTBOX].contains_key(id.as_bytes()).map_err(store_err)?
            || t[INBOX_MID]
                .contains_key(id.as_bytes())
                .map_err(store_err)?;
        Ok(if taken { IdUse::Taken } else { IdUse::New })
    }

    /// Stores a delivery in the inbox with the next seq, with its case, due
    /// and retention index entries; marks the outbox entry it answers.
    /// Nothing changes when (sender, id) was stored before, or the id is
    /// another message's ([`Self::id_use`]).
    pub(crate) fn store_incoming(&self, msg: &Incoming) -> Result<Stored, NodeError> {
        let mid = msg.message_id;
        let dkey = dedup_key(mid, &msg.sender);
        let until = self.retention_of(msg.retain_until, msg.case_ref)?;
        let case_ref = msg.case_ref.to_string();
        let in_reply_to = msg.in_reply_to.map(|id| id.to_string()).unwrap_or_default();
        let content = Content {
            digest: &msg.payload_sha256,
            kind: Some(msg.kind.name()),
            case_ref: &case_ref,
            in_reply_to: &in_reply_to,
            priority: Some(priority_name(msg.priority)),
            created_at: Some(msg.created_at),
            content_type: &msg.content_type,
        };
        let rec = self.tx(|t| {
            if let Some(seq) = t[DEDUP].get(&dkey)? {
                let same =
                    tget::<InRec>(&t[INBOX], &seq)?.is_none_or(|rec| same_content(&rec, content));
                return Ok(Err(if same { IdUse::Stored } else { IdUse::Conflict }));
            }
            // The inbox's lookups, due dates and retention go by message id
            // alone, so a second message with an id already here (a broken
            // peer reusing the id of the message it answers, or of another
            // sender's) would share them: the retention would erase one body
            // and keep the other's for ever.
            if t[OUTBOX].get(mid.as_bytes())?.is_some()
                || t[INBOX_MID].get(mid.as_bytes())?.is_some()
            {
                return Ok(Err(IdUse::Taken));
            }
            let seq = tadd(&t[META], "inbox_seq", 1)?;
            tadd(&t[META], "n_inbox", 1)?;
            let rec = InRec {
                seq,
                message_id: mid.to_string(),
                sender: msg.sender.to_string(),
                kind: msg.kind.name().to_owned(),
                case_ref: msg.case_ref.to_string(),
                in_reply_to: msg.in_reply_to.map(|id| id.to_string()),
                priority: priority_name(msg.priority).to_owned(),
                created_at: msg.created_at,
                accepted_at: msg.accepted_at,
                received_at: msg.received_at,
                answered_by: None,
                body_erased: false,
                due: msg.due.map(|d| d.to_string()),
                retain_until: msg.retain_until.map(|d| d.to_string()),
                payload_sha256: Some(digest_hex(&msg.payload_sha256)),
                content_type: Some(msg.content_type.clone()),
            };
            tput(&t[INBOX], &be(seq), &rec)?;
            t[DEDUP].insert(dkey.as_slice(), &be(seq))?;
            t[INBOX_MID].insert(&mid.as_bytes()[..], &be(seq))?;
            t[IN_BODY].insert(&be(seq), msg.body.as_slice())?;
            t[CASES].insert(
                case_key(msg.case_ref, msg.created_at, mid),
                &[DIR_RECEIVED, kind_byte(msg.kind)],
            )?;
            if let Some(due) = msg.due {
                t[DUE].insert(due_key(due, mid), &[DIR_RECEIVED])?;
            }
            if let Some(until) = until {
                t[RETENTION].insert(retention_key(until, DIR_RECEIVED, mid), &[])?;
            }
            // (only an answer of the kind the request asks for answers it; a store
            // written before may name a follow-up in `answered_by`, which the answer
            // replaces)
            if let Some(answered) = msg.in_reply_to
                && let Some(asks) = msg.kind.answers()
                && let Some(mut out) = tget::<OutRec>(&t[OUTBOX], answered.as_bytes())?
                && out.recipient == msg.sender.as_str()
                && out.kind == asks.name()
                && match &out.answered_by {
                    None => true,
                    Some(earlier) => {
                        let earlier = stored_answer(earlier)?;
                        match t[INBOX_MID].get(earlier.as_bytes())? {
                            Some(seq) => tget::<InRec>(&t[INBOX], &seq)?
                                .is_none_or(|r| r.kind != msg.kind.name()),
                            None => true,
                        }
                    }
                }
            {
                out.answered_by = Some(mid.to_string());
                tput(&t[OUTBOX], answered.as_bytes(), &out)?;
            }
            Ok(Ok(rec))
        })?;
        match rec {
            Ok(rec) => Ok(Stored::New(rec.to_entry()?)),
            Err(IdUse::Taken) => Ok(Stored::IdTaken),
            Err(IdUse::Conflict) => Ok(Stored::Conflict),
            Err(IdUse::Stored | IdUse::New) => Ok(Stored::Duplicate),
        }
    }

    fn inbox_rec(&self, seq: u64) -> Result<Option<InRec>, NodeError> {
        self.trees[INBOX]
            .get(be(seq))
            .map_err(store_err)?
            .map(|b| from_json(&b))
            .transpose()
    }

    fn inbox_rec_by_mid(&self, id: MessageId) -> Result<Option<InRec>, NodeError> {
        match self.trees[INBOX_MID]
            .get(id.as_bytes())
            .map_err(store_err)?
        {
            Some(seq) => self.inbox_rec(read_u64(&seq)),
            None => Ok(None),
        }
    }

    /// One inbox entry by message id.
    pub(crate) fn inbox_entry(&self, id: MessageId) -> Result<Option<InboxEntry>, NodeError> {
        self.inbox_rec_by_mid(id)?.map(|r| r.to_entry()).transpose()
    }

    /// The body of an inbox entry (`None` when erased).
    pub(crate) fn inbox_body(&self, seq: u64) -> Result<Option<Vec<u8>>, NodeError> {
        Ok(self.trees[IN_BODY]
            .get(be(seq))
            .map_err(store_err)?
            .map(|b| b.to_vec()))
    }

    /// Up to `limit` inbox entries with `seq > after`, in seq order.
    pub(crate) fn inbox_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, NodeError> {
        let start = after.saturating_add(1);
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        self.trees[INBOX]
            .range(be(start)..)
            .take(limit)
            .map(|item| {
                let (_, bytes) = item.map_err(store_err)?;
                self.shown_inbox(from_json::<InRec>(&bytes)?.to_entry()?)
            })
            .collect()
    }

    /// `entry` as it is shown: `answered_by` names the answer of ours that has not
    /// failed (see [`Self::answer_to`]), empty when every answer failed.
    pub(crate) fn shown_inbox(&self, mut entry: InboxEntry) -> Result<InboxEntry, NodeError> {
        entry.answered_by = self.answer_to(&entry)?.map(|(id, _)| id);
        Ok(entry)
    }

    /// Inbox entries matching `filter`, newest first, from `filter.start`.
    pub(crate) fn list_inbox(&self, filter: &ListFilter) -> Result<Page<InboxEntry>, NodeError> {
        let read = |bytes: &[u8]| from_json::<InRec>(bytes)?.to_entry().map(Some);
        page_of(&self.trees[INBOX], filter, read, |entry: &InboxEntry| {
            filter.case_ref.is_none_or(|c| c == entry.case_ref)
                && filter
                    .counterpart
                    .as_ref()
                    .is_none_or(|p| *p == entry.sender)
                && filter.kind.is_none_or(|k| k == entry.kind)
        })?
        .try_map(|e| self.shown_inbox(e))
    }

    // ---- cases and due --------------------------------------------------

    /// Whether this node sent or received a message in `case`, a received one counting
    /// only once it is flushed (inbox seq up to `flushed`), as the listings, `Watch` and
    /// the case timeline show it: a crash before its flush takes it back.
    pub(crate) fn case_known(&self, case: CaseRef, flushed: u64) -> Result<CaseKnown, NodeError> {
        let mut pending = false;
        for item in self.trees[CASES].scan_prefix(case.as_bytes()) {
            let (key, value) = item.map_err(store_err)?;
            if value.first() == Some(&DIR_RECEIVED) {
                let id = case_key_id(&key)?;
                let seq = self.trees[INBOX_MID]
                    .get(id.as_bytes())
                    .map_err(store_err)?
                    .map(|seq| read_u64(&seq));
                if seq.is_some_and(|seq| seq > flushed) {
                    pending = true;
                    continue;
                }
            }
            return Ok(CaseKnown::Yes);
        }
        Ok(if pending {
            CaseKnown::NotOnDiskYet
        } else {
            CaseKnown::No
        })
    }

    /// One page of the messages of a case, sent and received, oldest first (in the order
    /// of the `cases` index: creation time, then message id, which never changes): at
    /// most `limit` (at least one) from `start` (the [`Page::next`] of the page before;
    /// `None`: the first). Received messages only up to inbox seq `flushed`, the inbox's
    /// last flushed seq, as the inbox listing shows them (a crash before its flush would
    /// take a later one back), and an answer only from those (see [`Self::shown_outbox`]).
    pub(crate) fn timeline(
        &self,
        case: CaseRef,
        start: Option<CaseCursor>,
        limit: usize,
        flushed: u64,
    ) -> Result<Page<TimelineEntry, CaseCursor>, NodeError> {
        let limit = limit.max(1);
        let begin = start.map_or_else(
            || case.as_bytes().to_vec(),
            |c| case_key(case, c.at, c.message_id),
        );
        let mut out = Vec::new();
        let mut next = None;
        for item in self.trees[CASES].range(begin..) {
            let (key, value) = item.map_err(store_err)?;
            if !key.starts_with(case.as_bytes()) {
                break;
            }
            let id = case_key_id(&key)?;
            let (Some(at), Some(&dir)) = (key.get(16..24).map(read_u64), value.first()) else {
                return Err(NodeError::Store("corrupt case index".into()));
            };
            // (the next page starts here even if this one is not shown yet: by then it may
            // be flushed)
            if out.len() == limit {
                next = Some(CaseCursor { at, message_id: id });
                break;
            }
            out.extend(self.timeline_entry(id, at, dir, flushed)?);
        }
        Ok(Page { entries: out, next })
    }

    /// Message `id` of a case's index entry (made at `at`, in direction `dir`) as the
    /// case shows it, `None` when it is not shown: gone, or received after inbox seq
    /// `flushed`.
    fn timeline_entry(
        &self,
        id: MessageId,
        at: Millis,
        dir: u8,
        flushed: u64,
    ) -> Result<Option<TimelineEntry>, NodeError> {
        if dir == DIR_SENT {
            let Some(e) = self.outbox_entry(id)? else {
                return Ok(None);
            };
            let e = self.shown_outbox(e, flushed)?;
            let mut state = e.state.name().to_owned();
            if e.answered_by.is_some() {
                state.push_str("+answered");
            }
            return Ok(Some(TimelineEntry {
                at,
                direction: Direction::Sent,
                message_id: id,
                kind: e.kind,
                counterpart: e.recipient,
                in_reply_to: e.in_reply_to,
                state,
            }));
        }
        let Some(e) = self.inbox_entry(id)?.filter(|e| e.seq <= flushed) else {
            return Ok(None);
        };
        let e = self.shown_inbox(e)?;
        let state = if e.answered_by.is_some() {
            "received+answered"
        } else {
            "received"
        };
        Ok(Some(TimelineEntry {
            at,
            direction: Direction::Received,
            message_id: id,
            kind: e.kind,
            counterpart: e.sender,
            in_reply_to: e.in_reply_to,
            state: state.to_owned(),
        }))
    }

    /// Whether a later follow-up replaced the follow-up made at `at` on `case` in
    /// direction `dir` with `counterpart` (its `next_follow_up_due` no longer counts).
    /// The date is the sender's promise to the recipient, so only a later follow-up
    /// of the same sender to the same recipient keeps it; one between other
    /// participants of the case (a case may have three), or the other way round,
    /// does not. (Both follow-ups are then dated by one clock, the sender's.) A
    /// received one replaces it for good, as does one of ours delivered; one of ours
    /// on its way may yet fail; one of ours that failed replaces nothing (unless it is
    /// found and delivered after all).
    fn later_follow_up(
        &self,
        case: CaseRef,
        at: Millis,
        dir: u8,
        counterpart: &ParticipantId,
    ) -> Result<Replaced, NodeError> {
        let mut start = case.as_bytes().to_vec();
        start.extend_from_slice(&be(at.saturating_add(1)));
        let mut end = case.as_bytes().to_vec();
        end.extend_from_slice(&be(u64::MAX));
        let mut pending = false;
        for item in self.trees[CASES].range(start..=end) {
            let (key, value) = item.map_err(store_err)?;
            if value.get(1) != Some(&kind_byte(Kind::FollowUp)) || value.first() != Some(&dir) {
                continue;
            }
            let id = case_key_id(&key)?;
            if dir == DIR_RECEIVED {
                if self
                    .inbox_entry(id)?
                    .is_some_and(|e| e.sender == *counterpart)
                {
                    return Ok(Replaced::Yes);
                }
                continue;
            }
            match self.outbox_entry(id)? {
                Some(e) if e.recipient == *counterpart => match e.state {
                    OutboxState::Delivered => return Ok(Replaced::Yes),
                    OutboxState::Queued | OutboxState::Submitted => pending = true,
                    OutboxState::Failed => {}
                },
                _ => {}
            }
        }
        Ok(if pending {
            Replaced::Pending
        } else {
            Replaced::No
        })
    }

    /// What is due on or before `today` (see [`DueKind`]), oldest date first, from
    /// `start` (a [`Page::next`] of an earlier page; `None`: the first), at most `limit`
    /// items (0: [`DUE_DEFAULT_LIMIT`]).
    pub(crate) fn due(
        &self,
        today: Date,
        start: Option<DueCursor>,
        limit: usize,
    ) -> Result<Page<DueItem, DueCursor>, NodeError> {
        let limit = if limit == 0 { DUE_DEFAULT_LIMIT } else { limit };
        let mut end = date_key(today).to_vec();
        end.extend_from_slice(&[0xff; 16]);
        let begin = start.map_or_else(Vec::new, |c| due_key(c.due, c.message_id));
        let mut out = Vec::new();
        if begin > end {
            return Ok(Page {
                entries: out,
                next: None,
            });
        }
        let mut next = None;
        // entries that can never be due again, forgotten after the scan so that the
        // index holds what may still be due, not every request ever exchanged
        let mut forgotten = Vec::new();
        for item in self.trees[DUE].range(begin..=end) {
            let (key, value) = item.map_err(store_err)?;
            let (Some(date), Some(id)) = (
                key.get(0..4).and_then(|b| {
                    let year = u16::from_be_bytes([b[0], b[1]]);
                    Date::parse(&format!("{year:04}-{:02}-{:02}", b[2], b[3])).ok()
                }),
                key.get(4..20)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(MessageId::from_bytes),
            ) else {
                return Err(NodeError::Store("corrupt due index".into()));
            };
            match self.due_state(value.first().copied(), id, date)? {
                DueState::Never => forgotten.push(key),
                DueState::NotNow => {}
                DueState::Due(_) if out.len() == limit => {
                    next = Some(DueCursor {
                        due: date,
                        message_id: id,
                    });
                    break;
                }
                DueState::Due(item) => out.push(item),
            }
        }
        for key in forgotten {
            // (not flushed: an entry a crash brings back is forgotten again)
            if let Err(e) = self.trees[DUE].remove(key) {
                tracing::debug!(error = %e, "a due entry could not be forgotten");
            }
        }
        Ok(Page { entries: out, next })
    }

    /// A subscriber to every write to the store, but for its `meta` tree, where the node
    /// records its time every minute whatever it does (tests: writes are counted).
    #[cfg(test)]
    pub(crate) fn watch_writes(&self) -> Vec<sled::Subscriber> {
        self.trees
            .iter()
            .skip(META + 1)
            .map(|tree| tree.watch_prefix(Vec::<u8>::new()))
            .collect()
    }

    /// Entries in the due index (tests).
    #[cfg(test)]
    pub(crate) fn due_index_len(&self) -> usize {
        self.trees[DUE].len()
    }

    /// Whether the message `id` (sent or received, by `dir`) with the date `date` in the
    /// due index is due now, or not now, or never again: a request answered (its answer
    /// arrived, or ours was delivered), a follow-up that a later one on its case replaced
    /// for good, a message gone. A request whose answer failed, or ours that failed, is
    /// not due now but may be again (a lost message found, a new answer).
    fn due_state(&self, dir: Option<u8>, id: MessageId, date: Date) -> Result<DueState, NodeError> {
        let follow_up = |case_ref, created_at, dir, counterpart: &ParticipantId| {
            Ok::<_, NodeError>(
                match self.later_follow_up(case_ref, created_at, dir, counterpart)? {
                    Replaced::Yes => Some(DueState::Never),
                    Replaced::Pending => Some(DueState::NotNow),
                    Replaced::No => None,
                },
            )
        };
        if dir == Some(DIR_SENT) {
            let Some(e) = self.outbox_entry(id)? else {
                return Ok(DueState::Never);
            };
            let what = if e.kind == Kind::FollowUp {
                if let Some(state) = follow_up(e.case_ref, e.created_at, DIR_SENT, &e.recipient)? {
                    return Ok(state);
                }
                DueKind::FollowUpDue
            // (what is due reads the inbox as committed, not as last flushed)
            } else if self.answered_by_answer(e.answered_by, e.kind, u64::MAX)? {
                return Ok(DueState::Never);
            } else if e.state == OutboxState::Failed {
                // (a message found after all moves on to delivered)
                return Ok(DueState::NotNow);
            } else {
                DueKind::AwaitingAnswer
            };
            return Ok(DueState::Due(DueItem {
                message_id: id,
                case_ref: e.case_ref,
                kind: e.kind,
                counterpart: e.recipient,
                due: date,
                what,
            }));
        }
        let Some(e) = self.inbox_entry(id)? else {
            return Ok(DueState::Never);
        };
        let what = if e.kind == Kind::FollowUp {
            if let Some(state) = follow_up(e.case_ref, e.created_at, DIR_RECEIVED, &e.sender)? {
                return Ok(state);
            }
            DueKind::FollowUpDue
        } else {
            match self.answer_to(&e)? {
                Some((_, None | Some(OutboxState::Delivered))) => return Ok(DueState::Never),
                Some((_, Some(_))) => return Ok(DueState::NotNow),
                None => DueKind::AnswerOwed,
            }
        };
        Ok(DueState::Due(DueItem {
            message_id: id,
            case_ref: e.case_ref,
            kind: e.kind,
            counterpart: e.sender,
            due: date,
            what,
        }))
    }

    /// The answer of ours to the received `request` that counts, with its state: the
    /// recorded one unless it failed (the broker refused it, or it was withdrawn or
    /// expired: it answers nothing, and another may follow), or else another one
    /// found in the case. `None` for the state when the recorded answer is gone from
    /// the outbox: it was sent, so it still answers.
    fn answer_to(
        &self,
        request: &InboxEntry,
    ) -> Result<Option<(MessageId, Option<OutboxState>)>, NodeError> {
        let Some(recorded) = request.answered_by else {
            return Ok(None);
        };
        match self.outbox_entry(recorded)? {
            None => Ok(Some((recorded, None))),
            // (a store written before may name a follow-up there)
            Some(r) if r.kind.answers() != Some(request.kind) => self.other_answer(request),
            Some(r) if r.state == OutboxState::Failed => self.other_answer(request),
            Some(r) => Ok(Some((recorded, Some(r.state)))),
        }
    }

    /// The best answer of ours to the received `request` that has not failed, found
    /// in its case: delivered before on its way; `None` when there is none. (An
    /// answer sent while the recorded one was on its way, which then failed, is not
    /// recorded.)
    fn other_answer(
        &self,
        request: &InboxEntry,
    ) -> Result<Option<(MessageId, Option<OutboxState>)>, NodeError> {
        let Some(answer_kind) = Kind::APPLICATION
            .iter()
            .copied()
            .find(|k| k.answers() == Some(request.kind))
        else {
            return Ok(None);
        };
        let mut best = None;
        for item in self.trees[CASES].scan_prefix(request.case_ref.as_bytes()) {
            let (key, value) = item.map_err(store_err)?;
            if value.first() != Some(&DIR_SENT) || value.get(1) != Some(&kind_byte(answer_kind)) {
                continue;
            }
            let id = case_key_id(&key)?;
            match self.outbox_entry(id)? {
                Some(r) if r.in_reply_to == Some(request.message_id) => match r.state {
                    OutboxState::Delivered => return Ok(Some((id, Some(OutboxState::Delivered)))),
                    OutboxState::Failed => {}
                    state => best = Some((id, Some(state))),
                },
                _ => {}
            }
        }
        Ok(best)
    }

    /// Whether `answered_by` of a sent request of kind `asked` names a received answer of
    /// the kind it asks for, with an inbox seq up to `flushed`. (Stores written before
    /// answers were told from other replies may name a follow-up there: that answers
    /// nothing.)
    fn answered_by_answer(
        &self,
        answered_by: Option<MessageId>,
        asked: Kind,
        flushed: u64,
    ) -> Result<bool, NodeError> {
        let Some(answer) = answered_by else {
            return Ok(false);
        };
        Ok(self
            .inbox_entry(answer)?
            .is_some_and(|a| a.seq <= flushed && a.kind.answers() == Some(asked)))
    }

    // ---- retention ------------------------------------------------------

    /// Erases the bodies whose retention ended before `today`; the entries keep their
    /// metadata and say `body_erased`. Returns the messages erased.
    ///
    /// A message's retention is its own `handling.retain_until` (referrals and
    /// assessment requests), or else its case's: the latest `retain_until` of the
    /// case's messages that carry one ([`Self::case_retain_until`]). The answers and
    /// follow-ups of a case are about the same person, so they go when the case's
    /// data goes, and not before: a case whose retention a later request extended
    /// keeps them until then. A message of ours still on its way is erased once it
    /// has arrived or failed. A case in which no message carries a `retain_until`
    /// keeps its bodies.
    pub(crate) fn erase_expired(&self, today: Date) -> Result<Vec<MessageId>, NodeError> {
        let end = date_key(today);
        let keys: Vec<sled::IVec> = self.trees[RETENTION]
            .range(..end.to_vec())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(store_err)?;
        let mut erased = Vec::new();
        let mut ended_cases = BTreeSet::new();
        for key in keys {
            let (Some(&dir), Some(id)) = (
                key.get(4),
                key.get(5..21)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(MessageId::from_bytes),
            ) else {
                return Err(NodeError::Store("corrupt retention index".into()));
            };
            let Some(kept) = self.kept(dir, id)? else {
                self.rekey_retention(&key, None)?;
                continue;
            };
            if kept.own_retention {
                // its own date passed: erased, and its case's may have ended with it
                if self.erase_body(dir, id, Some(&key))? {
                    erased.push(id);
                }
                ended_cases.insert(kept.case_ref);
                continue;
            }
            match self.case_retain_until(kept.case_ref)? {
                Some(until) if until >= today => {
                    // a later request extended the case's retention
                    self.rekey_retention(&key, Some(retention_key(until, dir, id)))?;
                }
                _ if !kept.settled => {
                    // still on its way: looked at again tomorrow
                    self.rekey_retention(&key, Some(retention_key(today, dir, id)))?;
                }
                _ => {
                    if self.erase_body(dir, id, Some(&key))? {
                        erased.push(id);
                    }
                }
            }
        }
        // messages of an ended case that no retention key names (stored before any
        // message of the case carried a date, or by an older version of the node)
        for case in ended_cases {
            if self
                .case_retain_until(case)?
                .is_some_and(|until| until >= today)
            {
                continue;
            }
            for item in self.trees[CASES].scan_prefix(case.as_bytes()) {
                let (key, value) = item.map_err(store_err)?;
                let (id, Some(&dir)) = (case_key_id(&key)?, value.first()) else {
                    return Err(NodeError::Store("corrupt case index".into()));
                };
                let Some(kept) = self.kept(dir, id)? else {
                    continue;
                };
                if kept.own_retention {
                    continue;
                }
                if !kept.settled {
                    self.rekey_retention(&[], Some(retention_key(today, dir, id)))?;
                } else if self.erase_body(dir, id, None)? {
                    erased.push(id);
                }
            }
        }
        Ok(erased)
    }

    /// The retention date a new message is indexed under: its own, or else its case's
    /// as known now (checked again when it passes: a later request may extend it).
    fn retention_of(&self, own: Option<Date>, case: CaseRef) -> Result<Option<Date>, NodeError> {
        match own {
            Some(until) => Ok(Some(until)),
            None => self.case_retain_until(case),
        }
    }

    /// The latest `retain_until` of the messages of `case` that carry one, as this node
    /// knows them; `None` when none does. A message of ours that certainly never reached
    /// its recipient ([`OutRec::never_arrived`]) does not count, so that the case's other
    /// bodies do not outlive the dates the partners know; it keeps its own body until its
    /// own date. One that failed after the broker took it (expired, dead-lettered,
    /// withdrawn, purged) still counts: its recipient may have stored it, and a redrive
    /// may yet deliver it.
    fn case_retain_until(&self, case: CaseRef) -> Result<Option<Date>, NodeError> {
        let mut latest = None;
        for item in self.trees[CASES].scan_prefix(case.as_bytes()) {
            let (key, value) = item.map_err(store_err)?;
            let id = case_key_id(&key)?;
            let until = if value.first() == Some(&DIR_SENT) {
                self.out_rec(id)?
                    .filter(|r| !r.never_arrived())
                    .and_then(|r| r.retain_until)
            } else {
                self.inbox_rec_by_mid(id)?.and_then(|r| r.retain_until)
            };
            if let Some(until) = until {
                let until = Date::parse(&until)
                    .map_err(|_| NodeError::Store("corrupt retain_until".into()))?;
                latest = latest.max(Some(until));
            }
        }
        Ok(latest)
    }

    /// What retention needs to know of message `id` in direction `dir`; `None` when it
    /// is gone, or its body was erased already.
    fn kept(&self, dir: u8, id: MessageId) -> Result<Option<Kept>, NodeError> {
        let (case_ref, own_retention, settled) = if dir == DIR_SENT {
            match self.out_rec(id)? {
                Some(r) if !r.body_erased => (
                    r.case_ref,
                    r.retain_until.is_some(),
                    matches!(r.state, OutboxState::Delivered | OutboxState::Failed),
                ),
                _ => return Ok(None),
            }
        } else {
            match self.inbox_rec_by_mid(id)? {
                Some(r) if !r.body_erased => (r.case_ref, r.retain_until.is_some(), true),
                _ => return Ok(None),
            }
        };
        let case_ref =
            CaseRef::parse(&case_ref).map_err(|_| NodeError::Store("corrupt case_ref".into()))?;
        Ok(Some(Kept {
            case_ref,
            own_retention,
            settled,
        }))
    }

    /// Replaces the retention key `old` (none when empty) with `new` (none: dropped).
    fn rekey_retention(&self, old: &[u8], new: Option<Vec<u8>>) -> Result<(), NodeError> {
        self.tx(|t| {
            if !old.is_empty() {
                t[RETENTION].remove(old)?;
            }
            if let Some(new) = &new {
                t[RETENTION].insert(new.as_slice(), &[][..])?;
            }
            Ok(())
        })
    }

    /// Erases the body of message `id` (direction `dir`) and drops its retention key
    /// `key`, if given; whether a body was erased now. A queued message of ours is
    /// never submitted after that: it fails with outcome `erased`.
    fn erase_body(&self, dir: u8, id: MessageId, key: Option<&[u8]>) -> Result<bool, NodeError> {
        self.tx(|t| {
            if let Some(key) = key {
                t[RETENTION].remove(key)?;
            }
            if dir == DIR_SENT {
                let Some(mut rec) = tget::<OutRec>(&t[OUTBOX], id.as_bytes())? else {
                    return Ok(false);
                };
                if rec.body_erased {
                    return Ok(false);
                }
                rec.body_erased = true;
                if rec.state == OutboxState::Queued {
                    // Never submitted and now it cannot be.
                    rec.state = OutboxState::Failed;
                    rec.failure = Some(Failure {
                        outcome: "erased".into(),
                        reason_code: "BODY_ERASED".into(),
                        field_path: String::new(),
                    });
                    t_move_state(t, &rec, OutboxState::Queued)?;
                }
                tput(&t[OUTBOX], id.as_bytes(), &rec)?;
                t[OUT_BODY].remove(&id.as_bytes()[..])?;
                return Ok(true);
            }
            let Some(seq) = t[INBOX_MID].get(id.as_bytes())? else {
                return Ok(false);
            };
            let Some(mut rec) = tget::<InRec>(&t[INBOX], &seq)? else {
                return Ok(false);
            };
            if rec.body_erased {
                return Ok(false);
            }
            rec.body_erased = true;
            tput(&t[INBOX], &seq, &rec)?;
            t[IN_BODY].remove(&seq)?;
            Ok(true)
        })
    }
}

/// What [`Store::erase_expired`] needs to know of a message whose body is kept
/// ([`Store::kept`]).
struct Kept {
    /// Its case.
    case_ref: CaseRef,
    /// It carries its own `retain_until`.
    own_retention: bool,
    /// Ours has arrived or failed; received ones always are.
    settled: bool,
}

/// Decodes a stored body (always protobuf).
pub(crate) fn decode_body(kind: Kind, bytes: &[u8]) -> Result<Body, NodeError> {
    Body::decode(kind, bytes).map_err(|e| NodeError::Store(format!("stored body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(key: &str) -> NewOutgoing {
        NewOutgoing {
            idempotency_key: key.to_owned(),
            fingerprint: key.to_owned(),
            envelope: pb::Envelope::default(),
            message_id: MessageId::new_v7(),
            recipient: ParticipantId::parse("BE-PAYOKE").unwrap(),
            kind: Kind::Referral,
            case_ref: CaseRef::new_random(),
            in_reply_to: None,
            priority: Priority::Normal,
            created_at: 1_000,
            due: None,
            retain_until: None,
        }
    }

    fn lost() -> Failure {
        Failure {
            outcome: "lost-by-broker".into(),
            reason_code: "NOT_FOUND".into(),
            field_path: String::new(),
        }
    }

    /// Queues `n` entries and submits them at 2000, 3000, …
    fn submitted(store: &Store, n: u64) -> Vec<MessageId> {
        (0..n)
            .map(|i| {
                let (entry, _) = store.enqueue(&outgoing(&format!("k-{i}"))).unwrap();
                store
                    .mark_submitted(entry.message_id, 2_000 + i * 1_000)
                    .unwrap();
                entry.message_id
            })
            .collect()
    }

    /// A store reopened right after it was closed waits for sled to let go of its lock;
    /// one that stays open (another node on the directory) is named as such.
    #[test]
    fn a_store_just_closed_reopens_and_one_still_open_is_named() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            drop(store);
        }
        let _open = Store::open(dir.path(), 1 << 20).unwrap();
        let error = Store::open(dir.path(), 1 << 20).err().unwrap().to_string();
        assert!(error.contains("is another node running on it?"), "{error}");
    }

    /// After an outage, an urgent message is submitted before the normal ones queued
    /// before it; the others keep their order, and a submitted one leaves both queues.
    #[test]
    fn urgent_messages_are_submitted_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let mut ids = Vec::new();
        for (key, priority) in [
            ("n-1", Priority::Normal),
            ("n-2", Priority::Normal),
            ("u-1", Priority::Urgent),
            ("n-3", Priority::Normal),
            ("u-2", Priority::Urgent),
        ] {
            let (entry, _) = store
                .enqueue(&NewOutgoing {
                    priority,
                    ..outgoing(key)
                })
                .unwrap();
            ids.push(entry.message_id);
        }
        let order = |store: &Store, limit| -> Vec<MessageId> {
            store
                .queued(limit)
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        };
        assert_eq!(order(&store, 3), [ids[2], ids[4], ids[0]]);
        assert_eq!(order(&store, 10), [ids[2], ids[4], ids[0], ids[1], ids[3]]);
        store.mark_submitted(ids[2], 2_000).unwrap();
        store.mark_submitted(ids[0], 2_000).unwrap();
        assert_eq!(order(&store, 10), [ids[4], ids[1], ids[3]]);
    }

    /// The due index forgets only what can never be due again: a request of ours that
    /// failed is not due now, but a receipt may still deliver it (lost, then found).
    #[test]
    fn a_failed_request_stays_in_the_due_index_until_it_can_never_be_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let today = Date::parse("2026-02-01").unwrap();
        let mut request = outgoing("k-1");
        request.due = Some(Date::parse("2026-01-21").unwrap());
        let (entry, _) = store.enqueue(&request).unwrap();
        let id = entry.message_id;
        assert_eq!(store.due(today, None, 0).unwrap().entries.len(), 1);
        store.mark_submitted(id, 2_000).unwrap();
        store.mark_lost(id, lost(), "lost", 3_000).unwrap();
        assert!(store.due(today, None, 0).unwrap().entries.is_empty());
        assert_eq!(store.due_index_len(), 1, "kept: it may be found");
        store.apply_receipt(id, None, 4_000).unwrap();
        let due = store.due(today, None, 0).unwrap().entries;
        assert_eq!(
            due.len(),
            1,
            "found and delivered: an answer is awaited again"
        );
        assert_eq!(due[0].what, DueKind::AwaitingAnswer);
        assert_eq!(store.due_index_len(), 1);
    }

    /// A store written before answers were told from other replies may name a
    /// follow-up as what answered a request: the request is still awaited, and the
    /// answer that then arrives takes its place.
    #[test]
    fn an_answer_replaces_a_follow_up_that_an_older_store_took_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let today = Date::parse("2026-02-01").unwrap();
        let mut request = outgoing("k-1");
        request.due = Some(Date::parse("2026-01-21").unwrap());
        let (entry, _) = store.enqueue(&request).unwrap();
        let id = entry.message_id;
        let incoming = |kind: Kind| Incoming {
            message_id: MessageId::new_v7(),
            sender: ParticipantId::parse("BE-PAYOKE").unwrap(),
            kind,
            case_ref: entry.case_ref,
            in_reply_to: Some(id),
            priority: Priority::Normal,
            created_at: 5_000,
            accepted_at: 5_000,
            received_at: 5_000,
            body: Vec::new(),
            due: None,
            retain_until: None,
            payload_sha256: [0; 32],
            content_type: kind.content_type(),
        };
        let follow_up = incoming(Kind::FollowUp);
        store.store_incoming(&follow_up).unwrap();
        assert_eq!(store.outbox_entry(id).unwrap().unwrap().answered_by, None);
        // (what the older store wrote)
        store
            .tx(|t| {
                let mut out = tget::<OutRec>(&t[OUTBOX], id.as_bytes())?.unwrap();
                out.answered_by = Some(follow_up.message_id.to_string());
                tput(&t[OUTBOX], id.as_bytes(), &out)
            })
            .unwrap();
        let due = store.due(today, None, 0).unwrap().entries;
        assert_eq!(due.len(), 1, "still awaited");
        assert_eq!(due[0].what, DueKind::AwaitingAnswer);
        let listed = store
            .list_outbox(&ListFilter::default(), u64::MAX)
            .unwrap()
            .entries;
        assert_eq!(listed[0].answered_by, None, "not shown as answered");

        let answer = incoming(Kind::ReferralResponse);
        store.store_incoming(&answer).unwrap();
        assert_eq!(
            store.outbox_entry(id).unwrap().unwrap().answered_by,
            Some(answer.message_id)
        );
        assert!(store.due(today, None, 0).unwrap().entries.is_empty());
        assert_eq!(store.due_index_len(), 0, "answered for good");
        // a second answer does not take the first one's place
        store
            .store_incoming(&incoming(Kind::ReferralResponse))
            .unwrap();
        assert_eq!(
            store.outbox_entry(id).unwrap().unwrap().answered_by,
            Some(answer.message_id)
        );
    }

    /// The mirror of the above for a request we received: our answer takes the place of
    /// a follow-up of ours that an older store named, and a second answer does not take
    /// the place of the first while that one may still arrive.
    #[test]
    fn our_answer_replaces_a_follow_up_that_an_older_store_took_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let request = Incoming {
            message_id: MessageId::new_v7(),
            sender: ParticipantId::parse("BE-PAYOKE").unwrap(),
            kind: Kind::Referral,
            case_ref: CaseRef::new_random(),
            in_reply_to: None,
            priority: Priority::Normal,
            created_at: 1_000,
            accepted_at: 1_000,
            received_at: 1_000,
            body: Vec::new(),
            due: Some(Date::parse("2026-01-21").unwrap()),
            retain_until: None,
            payload_sha256: [0; 32],
            content_type: Kind::Referral.content_type(),
        };
        store.store_incoming(&request).unwrap();
        let id = request.message_id;
        let reply = |key: &str, kind: Kind| NewOutgoing {
            kind,
            in_reply_to: Some(id),
            case_ref: request.case_ref,
            ..outgoing(key)
        };
        let (follow_up, _) = store.enqueue(&reply("f-1", Kind::FollowUp)).unwrap();
        assert_eq!(store.inbox_entry(id).unwrap().unwrap().answered_by, None);
        // (what the older store wrote)
        store
            .tx(|t| {
                let seq = t[INBOX_MID].get(id.as_bytes())?.unwrap();
                let mut inrec = tget::<InRec>(&t[INBOX], &seq)?.unwrap();
                inrec.answered_by = Some(follow_up.message_id.to_string());
                tput(&t[INBOX], &seq, &inrec)
            })
            .unwrap();
        let (answer, _) = store
            .enqueue(&reply("r-1", Kind::ReferralResponse))
            .unwrap();
        assert_eq!(
            store.inbox_entry(id).unwrap().unwrap().answered_by,
            Some(answer.message_id)
        );
        let (second, _) = store
            .enqueue(&reply("r-2", Kind::ReferralResponse))
            .unwrap();
        assert_eq!(
            store.inbox_entry(id).unwrap().unwrap().answered_by,
            Some(answer.message_id),
            "the first answer, on its way, stays"
        );

        // the first answer fails, the second is on its way: not owed now; once the
        // second is delivered, never again
        let today = Date::parse("2026-02-01").unwrap();
        store.mark_submitted(answer.message_id, 2_000).unwrap();
        store
            .mark_lost(answer.message_id, lost(), "lost", 3_000)
            .unwrap();
        assert!(store.due(today, None, 0).unwrap().entries.is_empty());
        assert_eq!(store.due_index_len(), 1);
        let shown = |store: &Store| {
            let entry = store.inbox_entry(id).unwrap().unwrap();
            store.shown_inbox(entry).unwrap().answered_by
        };
        assert_eq!(shown(&store), Some(second.message_id), "the live answer");
        store.mark_submitted(second.message_id, 2_000).unwrap();
        store.apply_receipt(second.message_id, None, 4_000).unwrap();
        assert!(store.due(today, None, 0).unwrap().entries.is_empty());
        assert_eq!(store.due_index_len(), 0, "answered for good");
        assert_eq!(shown(&store), Some(second.message_id));
    }

    #[test]
    fn the_data_directory_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = Store::open(&dir, 1 << 20).unwrap();
        drop(store);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn the_submitted_index_follows_every_state_move() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let ids = submitted(&store, 4);
        let (queued, _) = store.enqueue(&outgoing("still-queued")).unwrap();
        assert_eq!(
            store.submitted_before(u64::MAX).unwrap(),
            vec![
                (ids[0], 2_000),
                (ids[1], 3_000),
                (ids[2], 4_000),
                (ids[3], 5_000)
            ],
            "oldest submit first, never the QUEUED entry {}",
            queued.message_id
        );
        assert_eq!(
            store.submitted_before(3_000).unwrap(),
            vec![(ids[0], 2_000), (ids[1], 3_000)],
            "up to and including `before`"
        );
        // a second submit (the broker answered `duplicate`) keeps the first time
        store.mark_submitted(ids[0], 9_000).unwrap();
        assert_eq!(
            store.submitted_before(2_000).unwrap(),
            vec![(ids[0], 2_000)]
        );

        store.apply_receipt(ids[0], None, 10_000).unwrap();
        store.mark_lost(ids[1], lost(), "lost", 10_000).unwrap();
        store.withdraw_local(ids[2], 10_000, true).unwrap();
        assert_eq!(
            store.submitted_before(u64::MAX).unwrap(),
            vec![(ids[3], 5_000)]
        );
        // a failed entry a receipt then delivers does not come back
        store.apply_receipt(ids[1], None, 11_000).unwrap();
        assert_eq!(
            store.submitted_before(u64::MAX).unwrap(),
            vec![(ids[3], 5_000)]
        );
        assert_eq!(store.counts().unwrap().submitted, 1);
    }

    #[test]
    fn a_failed_submit_noted_after_a_withdrawal_leaves_the_withdrawn_entry_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (entry, _) = store.enqueue(&outgoing("withdrawn-meanwhile")).unwrap();
        let id = entry.message_id;
        store
            .note_submit_error(id, Some("broker unavailable"), 1)
            .unwrap();
        store.withdraw_local(id, 10_000, false).unwrap();
        // the submit loop's note of a later attempt, written after the withdrawal
        store
            .note_submit_error(id, Some("deadline exceeded"), 2)
            .unwrap();
        let after = store.outbox_entry(id).unwrap().unwrap();
        assert_eq!(after.state, OutboxState::Failed);
        assert_eq!(after.failure.unwrap().outcome, "withdrawn");
        assert_eq!(after.last_error.as_deref(), Some("broker unavailable"));
        assert_eq!(after.submit_attempts, 3, "the attempts happened");
    }

    #[tokio::test]
    async fn a_flush_leaves_no_large_body_unsynced() {
        // sled keeps a value over 128 KiB in a file its flush never syncs
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let mut large = outgoing("attachment");
        large.envelope.payload = vec![7; 300 << 10];
        store.enqueue(&large).unwrap();
        store.flush_async().await.unwrap();
        let left = store.sync.lock().unwrap().sync().unwrap();
        assert_eq!(left, trmx_durable::Synced::default());
        // (the check itself sees the blob files when nothing synced them)
        let mut other = outgoing("second");
        other.envelope.payload = vec![8; 300 << 10];
        store.enqueue(&other).unwrap();
        store.db.flush().unwrap();
        assert!(store.sync.lock().unwrap().sync().unwrap().blob_files >= 1);
    }

    /// The flushes sled makes without `flush_async` (the running mark every minute, the
    /// index fills at open) wait for the turn of the flush under way too: two sled 0.34
    /// flushes at once can hang the store for good (see `Store::flush_async`).
    #[test]
    fn a_flush_outside_flush_async_waits_for_the_one_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let turn = trmx_durable::hold_flush_turn();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let marking = store.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(marking.mark_running(1_000));
        });
        assert!(
            done_rx
                .recv_timeout(std::time::Duration::from_millis(500))
                .is_err(),
            "the running mark flushed while another flush had the turn"
        );
        drop(turn);
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("flushes once the turn is free")
            .unwrap();
    }

    #[test]
    fn a_store_written_before_the_submitted_index_gets_it_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let ids = submitted(&store, 3);
            store.apply_receipt(ids[1], None, 10_000).unwrap();
            store.enqueue(&outgoing("still-queued")).unwrap();
            // what a store of an older version looks like
            store.trees[SUBMITTED].clear().unwrap();
            store.trees[META].remove(SUBMITTED_INDEXED).unwrap();
            store.db.flush().unwrap();
            assert!(store.submitted_before(u64::MAX).unwrap().is_empty());
            ids
        };
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            store.submitted_before(u64::MAX).unwrap(),
            vec![(ids[0], 2_000), (ids[2], 4_000)]
        );
        // and it is not rebuilt (nor duplicated) at the next open
        store.apply_receipt(ids[0], None, 11_000).unwrap();
        drop(store);
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            store.submitted_before(u64::MAX).unwrap(),
            vec![(ids[2], 4_000)]
        );
    }

    fn report(outcome: &str) -> Failure {
        Failure {
            outcome: outcome.into(),
            reason_code: "MAX_ATTEMPTS".into(),
            field_path: String::new(),
        }
    }

    /// Every entry in `redrive_watch`, due or not.
    fn watched(store: &Store) -> Vec<MessageId> {
        store.redrive_due(u64::MAX, 0, usize::MAX).unwrap()
    }

    /// `redrive_watch` holds exactly the entries `FAILED` by an expiry or a
    /// dead-lettering, through every move in and out of that: a report of those, a
    /// redriven message's next report, a delivery, a withdrawal; and each is due when the
    /// check last said, until it stops asking.
    #[test]
    fn the_redrive_watch_follows_every_failure_the_broker_may_undo() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let ids = submitted(&store, 6);
        store
            .apply_receipt(ids[0], Some(report("expired")), 10_000)
            .unwrap();
        store
            .apply_receipt(ids[1], Some(report("dead-lettered")), 11_000)
            .unwrap();
        store
            .apply_receipt(ids[2], Some(report("rejected-by-recipient")), 12_000)
            .unwrap();
        store.mark_lost(ids[3], lost(), "lost", 13_000).unwrap();
        store
            .apply_receipt(ids[4], Some(report("expired")), 14_000)
            .unwrap();
        store
            .apply_receipt(ids[5], Some(report("expired")), 15_000)
            .unwrap();
        assert_eq!(watched(&store), [ids[0], ids[1], ids[4], ids[5]]);

        // delivered after a redrive; withdrawn
        store.apply_receipt(ids[0], None, 20_000).unwrap();
        store.withdraw_local(ids[4], 21_000, true).unwrap();
        assert_eq!(watched(&store), [ids[1], ids[5]]);
        // redriven, and expired this time: watched from that end on
        store
            .apply_receipt(ids[1], Some(report("expired")), 30_000)
            .unwrap();
        assert_eq!(store.redrive_due(u64::MAX, 20_000, 10).unwrap(), [ids[1]]);
        assert_eq!(
            watched(&store),
            [ids[1]],
            "ids[5] failed before the window: dropped"
        );
        // asked about, then redriven again and rejected by the recipient: the broker
        // never redrives it
        store.redrive_asked(ids[1], 50_000).unwrap();
        assert_eq!(store.redrive_due(49_999, 0, 10).unwrap(), []);
        assert_eq!(store.redrive_due(50_000, 0, 10).unwrap(), [ids[1]]);
        store
            .apply_receipt(ids[1], Some(report("rejected-by-recipient")), 41_000)
            .unwrap();
        assert_eq!(
            store
                .outbox_entry(ids[1])
                .unwrap()
                .unwrap()
                .failure
                .unwrap()
                .outcome,
            "rejected-by-recipient"
        );
        assert_eq!(watched(&store), []);

        // asked about no more: another change of the entry does not bring it back
        let (entry, _) = store.enqueue(&outgoing("k-last")).unwrap();
        store.mark_submitted(entry.message_id, 2_000).unwrap();
        store
            .apply_receipt(entry.message_id, Some(report("expired")), 60_000)
            .unwrap();
        store.redrive_unwatch(entry.message_id).unwrap();
        store
            .note_submit_error(entry.message_id, Some("refused"), 1)
            .unwrap();
        assert_eq!(watched(&store), []);
        assert!(store.trees[REDRIVE_WATCH].is_empty(), "no key left behind");
    }

    #[test]
    fn a_store_written_before_the_redrive_watch_gets_it_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let ids = submitted(&store, 4);
            store
                .apply_receipt(ids[0], Some(report("expired")), 10_000)
                .unwrap();
            store
                .apply_receipt(ids[1], Some(report("rejected-by-recipient")), 10_000)
                .unwrap();
            store
                .apply_receipt(ids[2], Some(report("dead-lettered")), 10_000)
                .unwrap();
            // what a store of an older version looks like: no index, no flag, records
            // without `redrive_ask_at`
            store.trees[REDRIVE_WATCH].clear().unwrap();
            store.trees[META].remove(REDRIVE_INDEXED).unwrap();
            for id in &ids {
                let mut rec = store.out_rec(*id).unwrap().unwrap();
                rec.redrive_ask_at = None;
                let json = to_json(&rec).unwrap();
                assert!(!String::from_utf8_lossy(&json).contains("redrive"));
                store.trees[OUTBOX].insert(id.as_bytes(), json).unwrap();
            }
            store.db.flush().unwrap();
            assert_eq!(watched(&store), []);
            ids
        };
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(watched(&store), [ids[0], ids[2]]);
        // each due at the next check, and kept in step from then on
        assert_eq!(store.redrive_due(0, 0, 10).unwrap(), [ids[0], ids[2]]);
        store.apply_receipt(ids[0], None, 11_000).unwrap();
        drop(store);
        // not rebuilt at the next open
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        store.redrive_unwatch(ids[2]).unwrap();
        drop(store);
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(watched(&store), []);
    }

    // ---- stores written before `index_v2` ------------------------------------

    /// Makes `store` look like one written before [`Store::index_v2`].
    fn as_before_v2(store: &Store) {
        store.trees[META].remove(V2_INDEXED).unwrap();
        store.db.flush().unwrap();
    }

    /// An urgent message queued by an older node (no `queued_urgent` tree) is still
    /// submitted first after the upgrade.
    #[test]
    fn an_urgent_message_queued_before_the_upgrade_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let (normal, urgent) = {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let (n, _) = store.enqueue(&outgoing("n-1")).unwrap();
            let (u, _) = store
                .enqueue(&NewOutgoing {
                    priority: Priority::Urgent,
                    ..outgoing("u-1")
                })
                .unwrap();
            // what a store of an older version looks like
            store.trees[QUEUED_URGENT].clear().unwrap();
            as_before_v2(&store);
            (n.message_id, u.message_id)
        };
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let order: Vec<MessageId> = store
            .queued(10)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(order, [urgent, normal], "urgent first after the upgrade");
    }

    /// An inbox entry stored by the version before payload digests were kept (no
    /// `payload_sha256` in its record) still loads after the upgrade, and a redelivery
    /// of its message, whatever its digest, is a duplicate (nothing tells that it is
    /// other content), not a conflict that would reject a message stored here.
    #[test]
    fn an_inbox_entry_stored_without_a_digest_is_still_a_duplicate_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let msg = incoming(CaseRef::new_random(), Kind::Referral, None);
        let seq = {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let Stored::New(entry) = store.store_incoming(&msg).unwrap() else {
                panic!("stored");
            };
            // what the older version wrote: the record without the digest
            let mut rec = store.inbox_rec(entry.seq).unwrap().unwrap();
            rec.payload_sha256 = None;
            let json = to_json(&rec).unwrap();
            assert!(!String::from_utf8_lossy(&json).contains("payload_sha256"));
            store.trees[INBOX].insert(be(entry.seq), json).unwrap();
            store.db.flush().unwrap();
            entry.seq
        };
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.inbox_body(seq).unwrap(), Some(msg.body.clone()));
        let redelivered = Incoming {
            payload_sha256: [7; 32],
            ..msg.clone()
        };
        let case_ref = msg.case_ref.to_string();
        for digest in [msg.payload_sha256, redelivered.payload_sha256] {
            let content = Content {
                digest: &digest,
                kind: Some(msg.kind.name()),
                case_ref: &case_ref,
                in_reply_to: "",
                priority: Some("normal"),
                created_at: Some(msg.created_at),
                content_type: &msg.content_type,
            };
            assert!(matches!(
                store.id_use(&msg.sender, msg.message_id, content).unwrap(),
                IdUse::Stored
            ));
        }
        assert!(matches!(
            store.store_incoming(&redelivered).unwrap(),
            Stored::Duplicate
        ));
    }

    /// An outbox entry stored by the version before receipts' contradictions and status
    /// answers about another message were counted (its record as that version encoded
    /// it: no `contradicted_by`, no `other_answers`) loads after the upgrade, counts those
    /// answers from zero (10 resubmits, then the bound), and records a contradiction; a
    /// record without either still encodes as that version wrote it, so that a node
    /// moved back to it reads what this one wrote.
    #[test]
    fn an_outbox_entry_stored_before_the_counters_is_read_and_counted_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let ids = submitted(&store, 2);
            for &id in &ids {
                let old = serde_json::json!({
                    "seq": 1, "message_id": id.to_string(), "idempotency_key": "k-old",
                    "recipient": "BE-PAYOKE", "kind": "referral",
                    "case_ref": CaseRef::new_random().to_string(), "in_reply_to": null,
                    "priority": "normal", "state": "Submitted", "answered_by": null,
                    "created_at": 1_000, "submitted_at": 2_000, "outcome_at": null,
                    "failure": null, "submit_attempts": 1, "last_error": null,
                    "body_erased": false, "due": null, "retain_until": null,
                });
                store.trees[OUTBOX]
                    .insert(id.as_bytes(), serde_json::to_vec(&old).unwrap())
                    .unwrap();
            }
            store.db.flush().unwrap();
            ids
        };
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (counted, reported) = (ids[0], ids[1]);
        let answers: Vec<OtherAnswer> = (0..12)
            .map(|_| store.count_other_answer(counted, 10).unwrap())
            .collect();
        assert_eq!(answers[..10], [OtherAnswer::Resubmit; 10]);
        assert_eq!(
            answers[10..],
            [OtherAnswer::BoundReached, OtherAnswer::PastBound]
        );
        assert_eq!(
            store
                .outbox_entry(counted)
                .unwrap()
                .unwrap()
                .last_error
                .as_deref(),
            Some(OTHER_ANSWERS_NOTE)
        );
        let purged = Failure {
            outcome: "purged".into(),
            reason_code: "PURGED".into(),
            field_path: String::new(),
        };
        assert!(matches!(
            store.apply_receipt(reported, None, 3_000).unwrap(),
            ReceiptEffect::Moved(OutboxState::Delivered)
        ));
        for first in [true, false] {
            assert!(matches!(
                store.apply_receipt(reported, Some(purged.clone()), 4_000).unwrap(),
                ReceiptEffect::Contradicted { state: OutboxState::Delivered, first: f } if f == first
            ));
        }
        // (the fields are written only once they say something)
        let (untouched, _) = store.enqueue(&outgoing("k-new")).unwrap();
        let json = store.trees[OUTBOX]
            .get(untouched.message_id.as_bytes())
            .unwrap()
            .unwrap();
        let json = String::from_utf8_lossy(&json);
        assert!(
            !json.contains("contradicted_by") && !json.contains("other_answers"),
            "{json}"
        );
    }

    fn incoming(case_ref: CaseRef, kind: Kind, reply: Option<MessageId>) -> Incoming {
        Incoming {
            message_id: MessageId::new_v7(),
            sender: ParticipantId::parse("BE-PAYOKE").unwrap(),
            kind,
            case_ref,
            in_reply_to: reply,
            priority: Priority::Normal,
            created_at: 5_000,
            accepted_at: 5_000,
            received_at: 5_000,
            body: vec![1, 2, 3],
            due: None,
            retain_until: None,
            payload_sha256: [0; 32],
            content_type: kind.content_type(),
        }
    }

    /// A case whose referral's retention ended while an older node ran (it erased the referral's body only, and indexed no answer by the case's
    /// date) has its answer erased by the upgraded node.
    #[test]
    fn the_answer_of_a_case_that_ended_before_the_upgrade_is_erased() {
        let dir = tempfile::tempdir().unwrap();
        let until = Date::parse("2030-01-01").unwrap();
        let answer = {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let mut referral = outgoing("k-1");
            referral.retain_until = Some(until);
            let (referral, _) = store.enqueue(&referral).unwrap();
            let rid = referral.message_id;
            store.mark_submitted(rid, 2_000).unwrap();
            store.apply_receipt(rid, None, 3_000).unwrap();
            let answer = incoming(referral.case_ref, Kind::ReferralResponse, Some(rid));
            store.store_incoming(&answer).unwrap();
            // what the older node wrote: no retention key for the answer...
            store.trees[RETENTION]
                .remove(retention_key(until, DIR_RECEIVED, answer.message_id))
                .unwrap();
            // ...and what its retention run on 2030-01-02 did: the referral's body only
            assert!(
                store
                    .erase_body(DIR_SENT, rid, Some(&retention_key(until, DIR_SENT, rid)))
                    .unwrap()
            );
            as_before_v2(&store);
            answer.message_id
        };
        // the upgraded node
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        store
            .erase_expired(Date::parse("2030-02-01").unwrap())
            .unwrap();
        let entry = store.inbox_entry(answer).unwrap().unwrap();
        assert!(
            entry.body_erased,
            "the answer of a case whose retention ended keeps its body"
        );
    }

    /// A received follow-up that an older node took as replaced by a
    /// later follow-up of ours (any later follow-up on the case did) was forgotten from
    /// the due index; under the new rule (only the same sender's next one replaces it)
    /// it is due, and must be listed after the upgrade.
    #[test]
    fn a_follow_up_forgotten_by_an_older_node_is_due_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let today = Date::parse("2026-08-01").unwrap();
        let awaited = {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let case = CaseRef::new_random();
            let mut from_be = incoming(case, Kind::FollowUp, None);
            from_be.due = Some(Date::parse("2026-07-20").unwrap());
            store.store_incoming(&from_be).unwrap();
            // our own follow-up to NG on the case, later, delivered
            let mut ours = outgoing("f-1");
            ours.kind = Kind::FollowUp;
            ours.case_ref = case;
            ours.created_at = 6_000;
            ours.recipient = ParticipantId::parse("NG-NAPTIP").unwrap();
            let (ours, _) = store.enqueue(&ours).unwrap();
            store.mark_submitted(ours.message_id, 7_000).unwrap();
            store.apply_receipt(ours.message_id, None, 8_000).unwrap();
            // the older node's due() found BE's follow-up replaced and forgot it
            store.trees[DUE]
                .remove(due_key(
                    Date::parse("2026-07-20").unwrap(),
                    from_be.message_id,
                ))
                .unwrap();
            as_before_v2(&store);
            from_be.message_id
        };
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let due = store.due(today, None, 0).unwrap().entries;
        assert!(
            due.iter().any(|d| d.message_id == awaited),
            "BE's follow-up is due again under the new rule: {due:?}"
        );
    }
}
