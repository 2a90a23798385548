//! The `trmx.v1.Operator` gRPC service (DESIGN.md §3, issue 6): queue figures,
//! participants, metadata search, dead letters, redrive, purge, audit verification
//! and federation statistics — for operator certificates only.
//!
//! - this file: the service — the caller's operator name from its certificate
//!   (node and broker certificates get `PERMISSION_DENIED`), request validation,
//!   the calls into the [`BrokerStore`](crate::store::BrokerStore), and the conversion
//!   of store records to [`pb::MessageMetadata`] (never a payload).
//! - [`stats`]: the federation statistics with small-count suppression.
//!
//! Handlers return [`BrokerError`]; the one `From<BrokerError> for Status` makes
//! the gRPC status. Every search, dead-letter listing, redrive, purge, statistics
//! request and audit verification is appended to the store's audit log with the
//! operator's name. Queue figures and the participant list are not: they hold no
//! message's or person's data (counts and bytes per participant, connection state).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span};
use trmx_certs::{CertInfo, Role};
use trmx_proto::time::{from_millis, from_timestamp, to_millis, to_timestamp};
use trmx_proto::{CaseRef, Kind, MessageId, ParticipantId, ValidationError, pb};

use crate::admin::CertRole;
use crate::error::BrokerError;
use crate::registry::Registry;
use crate::service::{Shared, to_completion};
use crate::store::{
    Millis, OperatorAction, PurgeResult, RedriveResult, SearchFilter, State, StatusRecord,
};

pub mod stats;

/// Results of a search or listing when the request asks for 0.
pub const DEFAULT_LIMIT: usize = 100;
/// Most results of one search or listing.
pub const MAX_LIMIT: usize = 1000;
/// Shortest purge reason, in characters.
pub const MIN_REASON_CHARS: usize = 3;
/// Longest purge reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Most message records one search call examines (about a second of reading
/// on the 2-core CI machine). A filter that matches little answers with what
/// it found so far and the `next_page_token` that continues it, so that one
/// call never reads a whole large store at once.
pub const SEARCH_SCAN_LIMIT: usize = 100_000;
/// Message records the statistics read per store call. The figures are
/// tallied page by page, so their memory does not grow with the store.
pub const STATISTICS_PAGE: usize = 5_000;

/// The `Operator` service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OperatorService {
    shared: Arc<Shared>,
}

impl OperatorService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The caller's operator name, from its verified client certificate. Node and
    /// broker certificates are refused.
    fn operator<T>(&self, request: &Request<T>) -> Result<String, BrokerError> {
        let identity = self.shared.identity(request)?;
        match identity.role {
            Role::Operator(name) => {
                if let Some(leaf) = request
                    .peer_certs()
                    .as_deref()
                    .and_then(|certs| certs.first())
                    && let Ok(info) = CertInfo::from_der(leaf.as_ref())
                {
                    self.shared
                        .metrics
                        .set_cert_expiry(CertRole::Operator, &name, info.not_after);
                }
                Ok(name)
            }
            Role::Participant(_) => Err(BrokerError::PermissionDenied(
                "node certificates cannot use the Operator service; use an operator certificate"
                    .into(),
            )),
            Role::Broker(_) => Err(BrokerError::PermissionDenied(
                "broker certificates cannot use the Operator service".into(),
            )),
        }
    }

    fn now(&self) -> Millis {
        self.shared.clock.now_millis()
    }

    /// Appends an operator action to the audit log (durable before the answer).
    async fn audit(&self, action: OperatorAction) -> Result<(), BrokerError> {
        let now = self.now();
        let shared = &self.shared;
        shared.stored(shared.store.audit_append_operator(action, now).await)
    }

    async fn list_queues(&self) -> Result<pb::ListQueuesResponse, BrokerError> {
        let shared = &self.shared;
        let now = self.now();
        let stats = shared.stored(shared.store.queue_stats().await)?;
        let mut queues: std::collections::BTreeMap<ParticipantId, pb::QueueInfo> = shared
            .registry
            .current()
            .iter()
            .map(|p| {
                (
                    p.id.clone(),
                    pb::QueueInfo {
                        recipient: p.id.to_string(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        for stat in stats {
            let entry = queues
                .entry(stat.recipient.clone())
                .or_insert_with(|| pb::QueueInfo {
                    recipient: stat.recipient.to_string(),
                    ..Default::default()
                });
            entry.depth = stat.depth;
            entry.in_flight = stat.in_flight;
            entry.bytes = stat.bytes;
            entry.oldest_accepted_at = stat.oldest_accepted_at.map(timestamp);
            entry.oldest_age = stat
                .oldest_accepted_at
                .map(|at| duration_ms(now.saturating_sub(at)));
        }
        let queues = queues
            .into_iter()
            .map(|(id, mut queue)| {
                queue.connected_streams =
                    u32::try_from(shared.streams.count(&id)).unwrap_or(u32::MAX);
                queue
            })
            .collect();
        Ok(pb::ListQueuesResponse {
            queues,
            at: Some(timestamp(now)),
        })
    }

    fn list_participants(&self) -> pb::OperatorListParticipantsResponse {
        let shared = &self.shared;
        let participants = shared
            .registry
            .current()
            .iter()
            .map(|p| pb::ParticipantInfo {
                participant: Some(p.to_pb()),
                connected_streams: u32::try_from(shared.streams.count(&p.id)).unwrap_or(u32::MAX),
                last_seen: shared.metrics.last_seen(&p.id).map(to_timestamp),
                certificate_not_after: shared
                    .metrics
                    .cert_expiry(CertRole::Participant, p.id.as_str())
                    .map(to_timestamp),
            })
            .collect();
        pb::OperatorListParticipantsResponse { participants }
    }

    async fn search_messages(
        &self,
        operator: &str,
        request: pb::SearchMessagesRequest,
    ) -> Result<pb::SearchMessagesResponse, BrokerError> {
        let shared = &self.shared;
        let filter = search_filter(&request)?;
        self.audit(OperatorAction::Search {
            operator: operator.to_owned(),
            filter: filter_summary(&filter),
        })
        .await?;
        let page = shared.stored(shared.store.search(filter).await)?;
        let truncated = page.resume_after.is_some();
        debug!(results = page.records.len(), truncated, "operator search");
        let registry = shared.registry.current();
        Ok(pb::SearchMessagesResponse {
            messages: page
                .records
                .iter()
                .map(|r| metadata(r, &registry))
                .collect(),
            truncated,
            next_page_token: page.resume_after.map(page_token).unwrap_or_default(),
        })
    }

    async fn list_dead_letters(
        &self,
        operator: &str,
        request: pb::ListDeadLettersRequest,
    ) -> Result<pb::ListDeadLettersResponse, BrokerError> {
        let shared = &self.shared;
        let limit = limit_of(request.limit);
        let after_seq = parse_page_token(&request.page_token)?;
        self.audit(OperatorAction::ListDeadLetters {
            operator: operator.to_owned(),
        })
        .await?;
        let page = shared.stored(shared.store.dead_letters(limit, after_seq).await)?;
        let registry = shared.registry.current();
        Ok(pb::ListDeadLettersResponse {
            messages: page
                .records
                .iter()
                .map(|r| metadata(r, &registry))
                .collect(),
            truncated: page.resume_after.is_some(),
            next_page_token: page.resume_after.map(page_token).unwrap_or_default(),
        })
    }

    /// The record of `sender`'s message `id`; without a sender, the first one with
    /// that id (purge and redrive have made sure it is the only one).
    async fn record(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
    ) -> Result<Option<StatusRecord>, BrokerError> {
        let shared = &self.shared;
        let found = shared.store.search(by_id(id, sender, 1)).await;
        Ok(shared.stored(found)?.records.into_iter().next())
    }

    async fn redrive(
        &self,
        operator: &str,
        request: pb::RedriveRequest,
    ) -> Result<pb::RedriveResponse, BrokerError> {
        let shared = &self.shared;
        let id = parse_message_id(&request.message_id)?;
        let sender = parse_sender(&request.sender)?;
        tracing::Span::current().record("message_id", tracing::field::display(id));
        self.check_redrive_recipient(id, sender.as_ref()).await?;
        // A redrive whose flush failed (its write kept) has nothing waiting in a stream
        // to drop, and no counter: the streams are woken when the store writes again.
        let result = shared.stored(
            shared
                .store
                .operator_redrive(operator, id, sender.as_ref(), self.now())
                .await
                .map_err(|failed| failed.error),
        )?;
        match result {
            RedriveResult::Redriven {
                accepted,
                attempts_before,
            } => {
                info!(%operator, attempts_before, "message redriven");
                Ok(pb::RedriveResponse {
                    message_id: id.to_string(),
                    broker_seq: accepted.broker_seq,
                    expires_at: Some(timestamp(accepted.expires_at)),
                    attempts_before,
                })
            }
            RedriveResult::NotFound => Err(not_found(id, sender.as_ref())),
            RedriveResult::Ambiguous { senders } => Err(ambiguous(id, &senders)),
            RedriveResult::NotRedrivable { state } => {
                // Only to say why: a failed read must not turn the store's answer
                // (nothing changed, and why) into UNAVAILABLE.
                let record = self.record(id, sender.as_ref()).await.ok().flatten();
                Err(BrokerError::FailedPrecondition(not_redrivable(
                    id,
                    state,
                    record.as_ref(),
                )))
            }
        }
    }

    /// A message is redriven only to a recipient this broker still serves for its kind
    /// ([`registry_refuses_redrive`], which the listings' `redrivable` reads too). An id
    /// two senders used is left to the store, which says so.
    async fn check_redrive_recipient(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
    ) -> Result<(), BrokerError> {
        let shared = &self.shared;
        // A failed read refuses the redrive (UNAVAILABLE, to retry): without the record
        // the registry cannot be asked, and a message the listings show as not
        // redrivable must not go to a recipient the broker no longer serves.
        let page = shared.stored(shared.store.search(by_id(id, sender, 2)).await)?;
        let [record] = page.records.as_slice() else {
            return Ok(());
        };
        match registry_refuses_redrive(&shared.registry.current(), record) {
            Some(why) => Err(BrokerError::FailedPrecondition(why)),
            None => Ok(()),
        }
    }

    async fn purge(
        &self,
        operator: &str,
        request: pb::PurgeRequest,
    ) -> Result<pb::PurgeResponse, BrokerError> {
        let id = parse_message_id(&request.message_id)?;
        let sender = parse_sender(&request.sender)?;
        tracing::Span::current().record("message_id", tracing::field::display(id));
        let reason = check_reason(&request.reason)?;
        let now = self.now();
        let (this, operator, reason) = (self.clone(), operator.to_owned(), reason.to_owned());
        to_completion(async move {
            this.purge_stored(&operator, id, sender.as_ref(), &reason, now)
                .await
        })
        .await
    }

    /// Purges message `id` in the store (audited in the same write), then drops it from
    /// its recipient's channels and frees its stream slot (in a task of its own: see
    /// [`to_completion`]; a copy sent after the purge reaches a recipient an operator
    /// removed it from).
    async fn purge_stored(
        &self,
        operator: &str,
        id: MessageId,
        sender: Option<&ParticipantId>,
        reason: &str,
        now: Millis,
    ) -> Result<pb::PurgeResponse, BrokerError> {
        let shared = &self.shared;
        let result = match shared
            .store
            .operator_purge(operator, id, sender, reason, now)
            .await
        {
            Ok(result) => result,
            Err(failed) => {
                // Its write is kept when only the flush failed, and becomes durable with
                // the next flush: the copy waiting for the recipient is dropped now (a
                // retry finds the message purged and is not the one that purged it).
                if let Some(PurgeResult::Purged {
                    recipient,
                    sender: message_sender,
                }) = &failed.committed
                {
                    shared.metrics.purged();
                    self.taken_back(recipient, id, message_sender.as_ref());
                    info!(%operator, "message purged, but not yet durable");
                }
                return Err(shared.store_failed(failed.error));
            }
        };
        // Answered from what the purge's transaction returned: once it is
        // durable nothing may turn the answer into an error (a retry would
        // then be told only that the message is PURGED).
        match result {
            PurgeResult::Purged {
                recipient,
                sender: message_sender,
            } => {
                shared.metrics.purged();
                self.taken_back(&recipient, id, message_sender.as_ref());
                info!(%operator, "message purged");
                Ok(pb::PurgeResponse {
                    message_id: id.to_string(),
                    purged_at: Some(timestamp(now)),
                    already_purged: false,
                })
            }
            PurgeResult::AlreadyPurged {
                at,
                recipient,
                sender: message_sender,
            } => {
                // (harmless: the purge that made it did this already, also one
                // answered with an error after its write)
                self.taken_back(&recipient, id, message_sender.as_ref());
                info!(%operator, "message already purged");
                Ok(pb::PurgeResponse {
                    message_id: id.to_string(),
                    purged_at: Some(timestamp(at)),
                    already_purged: true,
                })
            }
            PurgeResult::NotFound => Err(not_found(id, sender)),
            PurgeResult::Ambiguous { senders } => Err(ambiguous(id, &senders)),
            PurgeResult::NotPurgeable { state } => Err(BrokerError::FailedPrecondition(format!(
                "message {id} is {}; only ACCEPTED or IN_FLIGHT messages can be purged",
                state_name(state)
            ))),
        }
    }

    /// Message `id` of `recipient` was purged: free the recipient's stream slot if it
    /// was in flight, drop it from its stream's channel if it waits there to be sent,
    /// and wake its sender for the non-delivery report. Harmless when done before.
    fn taken_back(&self, recipient: &ParticipantId, id: MessageId, sender: Option<&ParticipantId>) {
        let streams = &self.shared.streams;
        streams.drop_waiting(recipient, &id);
        let settled = streams.settled(recipient, &[id]);
        for sender in settled.senders {
            streams.wake(&sender);
        }
        if let Some(sender) = sender {
            streams.wake(sender);
        }
    }

    async fn verify_audit(&self, operator: &str) -> Result<pb::AuditReport, BrokerError> {
        let shared = &self.shared;
        let report = shared.stored(shared.store.audit_verify().await)?;
        self.audit(OperatorAction::VerifyAudit {
            operator: operator.to_owned(),
            intact: report.first_broken.is_none(),
        })
        .await?;
        Ok(report.to_pb())
    }

    /// The statistics are aggregates with counts under 5 suppressed, and yet
    /// audited like a search: the range is the operator's to choose to the
    /// millisecond, so two ranges a moment apart differ by exactly one message
    /// (each count 5 or more), which tells its corridor, kind, acceptance time
    /// and whether it was delivered — metadata of one referral, which a search
    /// shows only with an audit record.
    async fn statistics(
        &self,
        operator: &str,
        request: pb::GetStatisticsRequest,
    ) -> Result<pb::Statistics, BrokerError> {
        let shared = &self.shared;
        let from = match &request.from {
            Some(ts) => to_millis(from_timestamp(ts).map_err(|e| e.within("from"))?),
            None => 0,
        };
        let until = match &request.until {
            Some(ts) => to_millis(from_timestamp(ts).map_err(|e| e.within("until"))?),
            None => self.now().saturating_add(1),
        };
        if until <= from {
            // name the field the operator gave: an unset `until` is now
            return Err(if request.until.is_some() {
                ValidationError::new("until", "must be after from")
            } else {
                ValidationError::new("from", "must be before now (until is unset)")
            }
            .into());
        }
        self.audit(OperatorAction::Statistics {
            operator: operator.to_owned(),
            from,
            until,
        })
        .await?;
        // Every record is read (answers may come after the range), metadata
        // only, a page at a time: the tally keeps only the figures and the
        // requests of the range, never the records.
        let mut tally = stats::Tally::new(from, until);
        let mut after_seq = None;
        loop {
            let filter = SearchFilter {
                limit: STATISTICS_PAGE,
                after_seq,
                ..SearchFilter::default()
            };
            let page = shared.stored(shared.store.search(filter).await)?;
            for record in &page.records {
                tally.add(record);
            }
            match page.resume_after {
                Some(seq) => after_seq = Some(seq),
                None => break,
            }
        }
        Ok(tally.finish())
    }
}

/// Runs the RPC `body` inside a span naming the method and the operator, and
/// converts its error into a `Status`.
macro_rules! operator_rpc {
    ($self:ident, $request:ident, $method:literal, |$operator:ident, $inner:ident| $body:expr) => {{
        let span = info_span!(
            "operator_rpc",
            method = $method,
            operator = tracing::field::Empty,
            message_id = tracing::field::Empty,
            remote = $request.remote_addr().map(tracing::field::display),
        );
        async {
            let $operator = $self.operator(&$request)?;
            tracing::Span::current().record("operator", tracing::field::display(&$operator));
            let $inner = $request.into_inner();
            $body
        }
        .instrument(span.clone())
        .await
        .map(Response::new)
        .map_err(|error: BrokerError| {
            let _entered = span.enter();
            debug!(code = ?error.code(), %error, "operator request refused");
            Status::from(error)
        })
    }};
}

#[tonic::async_trait]
impl pb::operator_server::Operator for OperatorService {
    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        operator_rpc!(self, request, "ListQueues", |_operator, _inner| self
            .list_queues()
            .await)
    }

    async fn list_participants(
        &self,
        request: Request<pb::OperatorListParticipantsRequest>,
    ) -> Result<Response<pb::OperatorListParticipantsResponse>, Status> {
        operator_rpc!(self, request, "ListParticipants", |_operator, _inner| Ok(
            self.list_participants()
        ))
    }

    async fn search_messages(
        &self,
        request: Request<pb::SearchMessagesRequest>,
    ) -> Result<Response<pb::SearchMessagesResponse>, Status> {
        operator_rpc!(self, request, "SearchMessages", |operator, inner| self
            .search_messages(&operator, inner)
            .await)
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        operator_rpc!(self, request, "ListDeadLetters", |operator, inner| self
            .list_dead_letters(&operator, inner)
            .await)
    }

    async fn redrive(
        &self,
        request: Request<pb::RedriveRequest>,
    ) -> Result<Response<pb::RedriveResponse>, Status> {
        operator_rpc!(self, request, "Redrive", |operator, inner| self
            .redrive(&operator, inner)
            .await)
    }

    async fn purge(
        &self,
        request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        operator_rpc!(self, request, "Purge", |operator, inner| self
            .purge(&operator, inner)
            .await)
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::AuditReport>, Status> {
        operator_rpc!(self, request, "VerifyAudit", |operator, _inner| self
            .verify_audit(&operator)
            .await)
    }

    async fn get_statistics(
        &self,
        request: Request<pb::GetStatisticsRequest>,
    ) -> Result<Response<pb::Statistics>, Status> {
        operator_rpc!(self, request, "GetStatistics", |operator, inner| self
            .statistics(&operator, inner)
            .await)
    }
}

/// `limit` of a request: 0 → [`DEFAULT_LIMIT`], capped at [`MAX_LIMIT`].
fn limit_of(requested: u32) -> usize {
    match usize::try_from(requested).unwrap_or(MAX_LIMIT) {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    }
}

fn parse_message_id(value: &str) -> Result<MessageId, BrokerError> {
    if value.is_empty() {
        return Err(ValidationError::new("message_id", "is required").into());
    }
    MessageId::parse(value).map_err(|e| BrokerError::InvalidArgument(e.within("message_id")))
}

/// The search for the messages with `id` (of `sender`, when given), at most `limit`.
/// A receipt's `sender` is the participant it goes to, as the store's purge and redrive
/// take it (its own sender is the broker).
fn by_id(id: MessageId, sender: Option<&ParticipantId>, limit: usize) -> SearchFilter {
    let (sender, recipient) = match sender {
        Some(p) if id.is_broker_made() => (None, Some(p.clone())),
        other => (other.cloned(), None),
    };
    SearchFilter {
        message_id: Some(id),
        sender,
        recipient,
        limit,
        ..SearchFilter::default()
    }
}

/// The optional `sender` of a purge or redrive.
fn parse_sender(value: &str) -> Result<Option<ParticipantId>, BrokerError> {
    if value.is_empty() {
        return Ok(None);
    }
    ParticipantId::parse(value)
        .map(Some)
        .map_err(|e| BrokerError::InvalidArgument(e.within("sender")))
}

fn not_found(id: MessageId, sender: Option<&ParticipantId>) -> BrokerError {
    BrokerError::NotFound(match sender {
        Some(sender) => format!("no message {id} from {sender}"),
        None => format!("no message {id}"),
    })
}

/// Two senders used `id`: the operator must say which message is meant.
fn ambiguous(id: MessageId, senders: &[Option<ParticipantId>]) -> BrokerError {
    let names: Vec<&str> = senders
        .iter()
        .map(|s| s.as_ref().map_or("the broker", ParticipantId::as_str))
        .collect();
    BrokerError::FailedPrecondition(format!(
        "{} messages have id {id} (senders: {}); name the sender (field `sender`)",
        senders.len(),
        names.join(", ")
    ))
}

/// The purge reason, trimmed: 3 to 500 characters.
fn check_reason(reason: &str) -> Result<&str, BrokerError> {
    let reason = reason.trim();
    let chars = reason.chars().count();
    if (MIN_REASON_CHARS..=MAX_REASON_CHARS).contains(&chars) {
        Ok(reason)
    } else {
        Err(ValidationError::new(
            "reason",
            format!(
                "is required: {MIN_REASON_CHARS} to {MAX_REASON_CHARS} characters, got {chars}"
            ),
        )
        .into())
    }
}

/// The `next_page_token` that continues a listing after `broker_seq`.
fn page_token(broker_seq: u64) -> String {
    format!("{PAGE_TOKEN_PREFIX}{broker_seq:x}")
}

/// The `after_seq` of a `page_token` (none for an empty one).
fn parse_page_token(token: &str) -> Result<Option<u64>, BrokerError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .map(Some)
        .ok_or_else(|| {
            ValidationError::new(
                "page_token",
                "is not a next_page_token of this broker: pass one unchanged, or none for the first page",
            )
            .into()
        })
}

/// Starts every page token (a version, should the format ever change).
const PAGE_TOKEN_PREFIX: &str = "p1.";

/// The store filter of a search request; every malformed field is `INVALID_ARGUMENT`
/// naming it.
fn search_filter(request: &pb::SearchMessagesRequest) -> Result<SearchFilter, BrokerError> {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let participant = |value: &str, field: &str| -> Result<Option<ParticipantId>, BrokerError> {
        non_empty(value)
            .map(|v| ParticipantId::parse(&v).map_err(|e| e.within(field)))
            .transpose()
            .map_err(BrokerError::from)
    };
    let instant =
        |ts: &Option<pb::Timestamp>, field: &str| -> Result<Option<Millis>, BrokerError> {
            ts.as_ref()
                .map(|ts| {
                    from_timestamp(ts)
                        .map(to_millis)
                        .map_err(|e| e.within(field))
                })
                .transpose()
                .map_err(BrokerError::from)
        };
    let message_id = non_empty(&request.message_id)
        .map(|v| MessageId::parse(&v).map_err(|e| e.within("message_id")))
        .transpose()?;
    let case_ref = non_empty(&request.case_ref)
        .map(|v| CaseRef::parse(&v).map_err(|e| e.within("case_ref")))
        .transpose()?;
    let state = match pb::MessageState::try_from(request.state) {
        Ok(pb::MessageState::Unspecified) => None,
        Ok(state) => Some(state_from_pb(state)),
        Err(_) => {
            return Err(ValidationError::new("state", "is not a MessageState value").into());
        }
    };
    let kind = match request.kind {
        0 => None,
        value => Some(
            Kind::from_pb(value)
                .ok_or_else(|| ValidationError::new("kind", "is not a MessageKind value"))?,
        ),
    };
    let accepted_from = instant(&request.accepted_from, "accepted_from")?;
    let accepted_until = instant(&request.accepted_until, "accepted_until")?;
    if let (Some(from), Some(until)) = (accepted_from, accepted_until)
        && until <= from
    {
        return Err(ValidationError::new("accepted_until", "must be after accepted_from").into());
    }
    Ok(SearchFilter {
        message_id,
        sender: participant(&request.sender, "sender")?,
        recipient: participant(&request.recipient, "recipient")?,
        case_ref,
        state,
        kind,
        accepted_from,
        accepted_until,
        limit: limit_of(request.limit),
        after_seq: parse_page_token(&request.page_token)?,
        scan_limit: SEARCH_SCAN_LIMIT,
    })
}

/// What the audit log records of a search: which fields were filtered on, with
/// ids and participants, but never the case reference's value.
fn filter_summary(filter: &SearchFilter) -> String {
    let mut parts = Vec::new();
    if let Some(id) = filter.message_id {
        parts.push(format!("message_id={id}"));
    }
    if filter.case_ref.is_some() {
        parts.push("case_ref=(set)".to_owned());
    }
    if let Some(sender) = &filter.sender {
        parts.push(format!("sender={sender}"));
    }
    if let Some(recipient) = &filter.recipient {
        parts.push(format!("recipient={recipient}"));
    }
    if let Some(state) = filter.state {
        parts.push(format!("state={}", state_name(state)));
    }
    if let Some(kind) = filter.kind {
        parts.push(format!("kind={kind}"));
    }
    if let Some(from) = filter.accepted_from {
        parts.push(format!("accepted_from={from}"));
    }
    if let Some(until) = filter.accepted_until {
        parts.push(format!("accepted_until={until}"));
    }
    if let Some(after) = filter.after_seq {
        parts.push(format!("after_seq={after}"));
    }
    parts.join(" ")
}

fn state_from_pb(state: pb::MessageState) -> State {
    match state {
        pb::MessageState::Unspecified | pb::MessageState::Accepted => State::Accepted,
        pb::MessageState::InFlight => State::InFlight,
        pb::MessageState::Acknowledged => State::Acknowledged,
        pb::MessageState::Expired => State::Expired,
        pb::MessageState::DeadLettered => State::DeadLettered,
        pb::MessageState::Withdrawn => State::Withdrawn,
        pb::MessageState::Purged => State::Purged,
    }
}

/// `ACCEPTED`, `DEAD_LETTERED`, ...
pub fn state_name(state: State) -> &'static str {
    let name = state.to_pb().as_str_name();
    name.strip_prefix("MESSAGE_STATE_").unwrap_or(name)
}

/// Whether the DEAD_LETTERED `r` was rejected by its recipient. Its reason code alone
/// does not tell: `Reject` refuses the broker's own codes now, but a broker before that
/// stored any code, `MAX_ATTEMPTS` too. One dead-lettered after too many attempts is
/// redrivable while its payload is kept.
fn was_rejected(r: &StatusRecord) -> bool {
    r.reason_code != "MAX_ATTEMPTS" || (r.payload_kept && !r.redrivable)
}

/// Why the registry refuses a redrive of `record`, if it does: a message is redriven only
/// to a recipient this broker still serves for its kind. One that left the registry (or
/// no longer accepts the kind) since the message was accepted would never take it, and
/// the redrive would only start a new lifetime at whose end its sender gets the same
/// non-delivery report. (The redrive asks the registry in force when it is made: a reload
/// may have changed it since the listing that showed the message. One that removes the
/// recipient while a redrive is being applied leaves that message to expire, with its
/// report, as it leaves the rest of the recipient's queue.) A receipt is never
/// redriven, whoever it is for: the store says why.
fn registry_refuses_redrive(registry: &Registry, record: &StatusRecord) -> Option<String> {
    if record.kind.is_broker_made() {
        return None;
    }
    let (id, to) = (record.message_id, &record.recipient);
    match registry.get(to) {
        None => Some(format!(
            "message {id} is for {to}, which is no longer in this broker's registry: it \
             would never be taken; add {to} back to the registry first, or purge the \
             message"
        )),
        Some(participant) if !participant.accepts(record.kind) => Some(format!(
            "message {id} is a {}, which {to} no longer accepts (its `accepts` in the \
             registry): it would be refused; add the kind back first, or purge the \
             message",
            record.kind.name()
        )),
        Some(_) => None,
    }
}

/// Why message `id` in `state` cannot be redriven.
fn not_redrivable(id: MessageId, state: State, record: Option<&StatusRecord>) -> String {
    match (state, record) {
        // (see the store's `Record::redrivable`)
        (_, Some(r)) if r.kind.is_broker_made() => format!(
            "message {id} is a {} the broker made for {}; a receipt is never redriven: it \
             is delivered until the metadata retention ends, and {}'s node asks the broker about \
             every message it has no receipt for and submits again one the broker no longer \
             knows, which gets a receipt of its own",
            r.kind.name(),
            r.recipient,
            r.recipient
        ),
        (State::DeadLettered, Some(r)) if was_rejected(r) => format!(
            "message {id} was rejected by its recipient ({}); a rejected message is never redriven",
            r.reason_code
        ),
        (State::Expired | State::DeadLettered, Some(r)) if !r.payload_kept => format!(
            "message {id} is {} and its payload was already deleted (dead-letter retention passed)",
            state_name(state)
        ),
        // e.g. a retry of a redrive whose answer was an error, though it took effect
        (State::Accepted | State::InFlight, Some(r)) => format!(
            "message {id} is {} since {}: it waits for delivery already (redriven then, if \
             that was a redrive); only EXPIRED messages and messages DEAD_LETTERED after too \
             many attempts can be redriven",
            state_name(state),
            crate::admin_cli::fmt_millis(r.state_changed_at)
        ),
        _ => format!(
            "message {id} is {}; only EXPIRED messages and messages DEAD_LETTERED after too many attempts can be redriven",
            state_name(state)
        ),
    }
}

fn timestamp(at: Millis) -> pb::Timestamp {
    to_timestamp(from_millis(at))
}

fn duration_ms(ms: Millis) -> pb::Duration {
    pb::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// The wire form of a store record: metadata only (there is no payload field). It is
/// `redrivable` when a redrive would be done now: the store's rule
/// ([`StatusRecord::redrivable`]) and the registry's: its recipient still in it, accepting
/// its kind (the check the redrive makes).
pub fn metadata(record: &StatusRecord, registry: &Registry) -> pb::MessageMetadata {
    pb::MessageMetadata {
        message_id: record.message_id.to_string(),
        sender: record
            .sender
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        recipient: record.recipient.to_string(),
        kind: record.kind.to_pb() as i32,
        case_ref: record.case_ref.to_string(),
        in_reply_to: record
            .in_reply_to
            .map(|id| id.to_string())
            .unwrap_or_default(),
        priority: record.priority.to_pb() as i32,
        state: record.state.to_pb() as i32,
        attempts: record.attempts,
        accepted_at: Some(timestamp(record.accepted_at)),
        expires_at: Some(timestamp(record.expires_at)),
        last_delivered_at: record.last_delivered_at.map(timestamp),
        state_changed_at: Some(timestamp(record.state_changed_at)),
        next_attempt_at: record.next_attempt_at.map(timestamp),
        reason_code: record.reason_code.clone(),
        field_path: record.field_path.clone(),
        payload_size: record.payload_size,
        payload_kept: record.payload_kept,
        broker_seq: record.broker_seq,
        redrivable: record.redrivable && registry_refuses_redrive(registry, record).is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        assert_eq!(check_reason("  spam ").unwrap(), "spam");
        for bad in ["", "  ", "ab", &"x".repeat(501)] {
            let error = check_reason(bad).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument);
            assert!(error.to_string().starts_with("reason:"), "{error}");
        }
        assert!(check_reason(&"é".repeat(500)).is_ok());
    }

    fn dead_letter(reason_code: &str, payload_kept: bool, redrivable: bool) -> StatusRecord {
        StatusRecord {
            message_id: MessageId::new_v7(),
            sender: Some(ParticipantId::parse("NL-NRM").unwrap()),
            recipient: ParticipantId::parse("BE-PAYOKE").unwrap(),
            kind: Kind::Referral,
            case_ref: CaseRef::new_random(),
            in_reply_to: None,
            priority: trmx_proto::envelope::Priority::Normal,
            state: State::DeadLettered,
            attempts: 1,
            accepted_at: 0,
            expires_at: 0,
            last_delivered_at: Some(0),
            state_changed_at: 0,
            next_attempt_at: None,
            reason_code: reason_code.to_owned(),
            field_path: String::new(),
            payload_size: 10,
            payload_kept,
            broker_seq: 1,
            redrivable,
        }
    }

    /// A broker before `Reject` refused the broker's own codes stored a rejection coded
    /// `MAX_ATTEMPTS` as any other: the refusal to redrive it says it was rejected, not
    /// that only messages dead-lettered after too many attempts can be (which the
    /// operator sees it as).
    #[test]
    fn a_rejection_coded_max_attempts_is_refused_as_rejected() {
        let why = |r: &StatusRecord| not_redrivable(r.message_id, r.state, Some(r));
        let rejected = dead_letter("MAX_ATTEMPTS", true, false);
        assert!(
            why(&rejected).contains("rejected by its recipient"),
            "{}",
            why(&rejected)
        );
        let rejected = dead_letter("INVALID_BODY", false, false);
        assert!(
            why(&rejected).contains("rejected by its recipient"),
            "{}",
            why(&rejected)
        );
        let deleted = dead_letter("MAX_ATTEMPTS", false, false);
        assert!(
            why(&deleted).contains("payload was already deleted"),
            "{}",
            why(&deleted)
        );
    }

    /// A redrive retried after an error that took effect is told the message waits
    /// already, and since when, not only that ACCEPTED cannot be redriven.
    #[test]
    fn a_waiting_message_is_refused_as_waiting_already() {
        let mut waiting = dead_letter("", true, false);
        waiting.state = State::Accepted;
        waiting.state_changed_at = 1_700_000_000_000;
        let why = not_redrivable(waiting.message_id, waiting.state, Some(&waiting));
        assert!(
            why.contains("is ACCEPTED since 2023-11-14 22:13:20Z: it waits for delivery already"),
            "{why}"
        );
    }

    #[test]
    fn limits() {
        assert_eq!(limit_of(0), DEFAULT_LIMIT);
        assert_eq!(limit_of(5), 5);
        assert_eq!(limit_of(1_000_000), MAX_LIMIT);
    }

    #[test]
    fn filters_name_the_bad_field() {
        let bad = |request: pb::SearchMessagesRequest, field: &str| {
            let error = search_filter(&request).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument);
            assert!(error.to_string().starts_with(field), "{error}");
        };
        bad(
            pb::SearchMessagesRequest {
                message_id: "nope".into(),
                ..Default::default()
            },
            "message_id",
        );
        bad(
            pb::SearchMessagesRequest {
                sender: "nl-nrm".into(),
                ..Default::default()
            },
            "sender",
        );
        bad(
            pb::SearchMessagesRequest {
                state: 99,
                ..Default::default()
            },
            "state",
        );
        let ok = search_filter(&pb::SearchMessagesRequest {
            sender: "NL-NRM".into(),
            state: pb::MessageState::DeadLettered as i32,
            case_ref: CaseRef::new_random().to_string(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.state, Some(State::DeadLettered));
        let summary = filter_summary(&ok);
        assert!(summary.contains("sender=NL-NRM") && summary.contains("case_ref=(set)"));
        assert!(!summary.contains(&ok.case_ref.unwrap().to_string()));
    }

    /// An operator purges a message; the operator's client goes away while the purge is
    /// made durable. The message is PURGED (and audited) all the same, so the copy waiting
    /// in the recipient's stream must not be sent, and its slot is freed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_whose_caller_goes_away_during_its_flush_still_stops_the_waiting_copy() {
        use crate::service::test_support::{InFlight, eventually, held_broker};
        let dir = tempfile::tempdir().unwrap();
        let (hold, shared) = held_broker(dir.path());
        let service = OperatorService::new(shared.clone());
        let mut in_flight = InFlight::new(&shared, "NL-NRM", "BE-PAYOKE").await;
        let id = in_flight.id;
        hold.cancel_during_flush(async move {
            let request = pb::PurgeRequest {
                message_id: id.to_string(),
                sender: String::new(),
                reason: "misaddressed, sender asked".into(),
            };
            service.purge("ops-alice", request).await
        })
        .await;
        eventually("the stream's slot is freed", || {
            in_flight.free_slots(&shared) == 1
        })
        .await;
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let status = shared.store.status(&nl, id).await.unwrap().unwrap();
        assert_eq!(status.state, State::Purged);
        assert!(in_flight.sent_now().is_none(), "a purged message was sent");
    }
}
