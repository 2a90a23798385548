//! Conversions between the generated `trmx.v1` NodeApi messages and the core's
//! domain types. Request conversions validate and name the offending field;
//! response conversions cannot fail.

use std::time::SystemTime;

use prost::Message;

use trmx_proto::envelope::Priority;
use trmx_proto::time::{Date, from_millis, from_timestamp, to_timestamp};
use trmx_proto::{CaseRef, Kind, MessageId, ParticipantId, ValidationError, pb};

use crate::core::{
    Body, CASE_PAGE_DEFAULT, CaseCursor, Direction, DueCursor, DueItem, DueKind, Failure,
    InboxEntry, ListFilter, Millis, NodeError, NodeStatus, OutboxEntry, OutboxState,
    ParticipantInfo, SendRequest, TimelineEntry,
};

fn invalid(field: &str, rule: &str) -> NodeError {
    NodeError::Invalid(ValidationError::new(field, rule))
}

fn timestamp(millis: Millis) -> pb::Timestamp {
    to_timestamp(from_millis(millis))
}

fn id_string(id: Option<MessageId>) -> String {
    id.map(|id| id.to_string()).unwrap_or_default()
}

/// An optional message id field (`""` = none).
pub(crate) fn optional_message_id(
    value: &str,
    field: &str,
) -> Result<Option<MessageId>, NodeError> {
    if value.is_empty() {
        return Ok(None);
    }
    MessageId::parse(value)
        .map(Some)
        .map_err(|e| NodeError::Invalid(e.within(field)))
}

/// A required message id field.
pub(crate) fn message_id(value: &str, field: &str) -> Result<MessageId, NodeError> {
    optional_message_id(value, field)?.ok_or_else(|| invalid(field, "is required"))
}

fn optional_case_ref(value: &str, field: &str) -> Result<Option<CaseRef>, NodeError> {
    if value.is_empty() {
        return Ok(None);
    }
    CaseRef::parse(value)
        .map(Some)
        .map_err(|e| NodeError::Invalid(e.within(field)))
}

/// A required case reference field.
pub(crate) fn case_ref(value: &str, field: &str) -> Result<CaseRef, NodeError> {
    optional_case_ref(value, field)?.ok_or_else(|| invalid(field, "is required"))
}

fn optional_participant(value: &str, field: &str) -> Result<Option<ParticipantId>, NodeError> {
    if value.is_empty() {
        return Ok(None);
    }
    ParticipantId::parse(value)
        .map(Some)
        .map_err(|e| NodeError::Invalid(e.within(field)))
}

/// An optional kind field (`UNSPECIFIED` = none).
fn optional_kind(value: i32, field: &str) -> Result<Option<Kind>, NodeError> {
    if value == 0 {
        return Ok(None);
    }
    Kind::from_pb(value)
        .map(Some)
        .ok_or_else(|| invalid(field, "must be a known MessageKind"))
}

fn optional_state(value: i32, field: &str) -> Result<Option<OutboxState>, NodeError> {
    match pb::OutboxState::try_from(value) {
        Ok(pb::OutboxState::Unspecified) => Ok(None),
        Ok(pb::OutboxState::Queued) => Ok(Some(OutboxState::Queued)),
        Ok(pb::OutboxState::Submitted) => Ok(Some(OutboxState::Submitted)),
        Ok(pb::OutboxState::Delivered) => Ok(Some(OutboxState::Delivered)),
        Ok(pb::OutboxState::Failed) => Ok(Some(OutboxState::Failed)),
        Err(_) => Err(invalid(field, "must be a known OutboxState")),
    }
}

/// The body of a `Send`, checked against `kind`.
fn send_body(req: &pb::SendRequest) -> Result<Body, NodeError> {
    use pb::send_request::Body as B;
    fn typed(kind: Kind, message: &impl Message) -> Result<Body, NodeError> {
        Body::decode(kind, &message.encode_to_vec()).map_err(NodeError::Invalid)
    }
    let kind = optional_kind(req.kind, "kind")?;
    let body = match &req.body {
        Some(B::BodyJson(json)) => {
            let kind = kind.ok_or_else(|| invalid("kind", "is required with body_json"))?;
            application_kind(kind)?;
            Body::from_json(kind, json).map_err(NodeError::Invalid)?
        }
        Some(B::Referral(m)) => typed(Kind::Referral, m)?,
        Some(B::ReferralResponse(m)) => typed(Kind::ReferralResponse, m)?,
        Some(B::ReturnRiskAssessmentRequest(m)) => typed(Kind::ReturnRiskAssessmentRequest, m)?,
        Some(B::ReturnRiskAssessment(m)) => typed(Kind::ReturnRiskAssessment, m)?,
        Some(B::FollowUp(m)) => typed(Kind::FollowUp, m)?,
        None => return Err(invalid("body", "is required (body_json or a typed body)")),
    };
    if let Some(kind) = kind
        && kind != body.kind()
    {
        return Err(invalid("kind", "does not match the body"));
    }
    Ok(body)
}

/// A stored body as the typed `GetMessage` field (`None` if it does not decode).
pub(crate) fn typed_message_body(body: &Body) -> Option<pb::get_message_response::Body> {
    use pb::get_message_response::Body as B;
    let bytes = body.encode();
    let bytes = bytes.as_slice();
    Some(match body.kind() {
        Kind::Referral => B::Referral(pb::Referral::decode(bytes).ok()?),
        Kind::ReferralResponse => B::ReferralResponse(pb::ReferralResponse::decode(bytes).ok()?),
        Kind::ReturnRiskAssessmentRequest => {
            B::ReturnRiskAssessmentRequest(pb::ReturnRiskAssessmentRequest::decode(bytes).ok()?)
        }
        Kind::ReturnRiskAssessment => {
            B::ReturnRiskAssessment(pb::ReturnRiskAssessment::decode(bytes).ok()?)
        }
        Kind::FollowUp => B::FollowUp(pb::FollowUp::decode(bytes).ok()?),
        Kind::DeliveryReceipt | Kind::NonDeliveryReport => {
            B::Receipt(pb::Receipt::decode(bytes).ok()?)
        }
    })
}

fn application_kind(kind: Kind) -> Result<(), NodeError> {
    if kind.is_broker_made() {
        Err(invalid(
            "kind",
            "must be an application kind (receipts are made by the broker)",
        ))
    } else {
        Ok(())
    }
}

/// Validates a `Send` and builds the core's request.
pub(crate) fn send_request(req: pb::SendRequest) -> Result<SendRequest, NodeError> {
    let recipient = optional_participant(&req.recipient, "recipient")?
        .ok_or_else(|| invalid("recipient", "is required"))?;
    let in_reply_to = optional_message_id(&req.in_reply_to, "in_reply_to")?;
    // (`None` to the core: a new case, or the case of the message a reply answers)
    let case_ref = match (optional_case_ref(&req.case_ref, "case_ref")?, req.new_case) {
        (Some(_), true) => {
            return Err(invalid(
                "new_case",
                "must not be set together with case_ref",
            ));
        }
        (None, true) if in_reply_to.is_some() => {
            return Err(invalid(
                "new_case",
                "must not be set together with in_reply_to: a reply belongs to the case of \
                 the message it answers (leave case_ref empty to take that case)",
            ));
        }
        (None, false) if in_reply_to.is_none() => {
            return Err(invalid(
                "case_ref",
                "is required (or set new_case to open a new case)",
            ));
        }
        (case_ref, _) => case_ref,
    };
    let priority = Priority::from_pb(req.priority)
        .map_err(|_| invalid("priority", "must be a known Priority"))?;
    let expires_at: Option<SystemTime> = req
        .expires_at
        .as_ref()
        .map(|ts| from_timestamp(ts).map_err(|e| NodeError::Invalid(e.within("expires_at"))))
        .transpose()?;
    let body = send_body(&req)?;
    Ok(SendRequest {
        idempotency_key: req.idempotency_key,
        recipient,
        case_ref,
        in_reply_to,
        priority,
        body,
        expires_at,
    })
}

/// Filter of `ListOutbox`.
pub(crate) fn outbox_filter(req: &pb::ListOutboxRequest) -> Result<ListFilter, NodeError> {
    Ok(ListFilter {
        case_ref: optional_case_ref(&req.case_ref, "case_ref")?,
        counterpart: optional_participant(&req.counterpart, "counterpart")?,
        kind: optional_kind(req.kind, "kind")?,
        state: optional_state(req.state, "state")?,
        limit: list_limit(req.limit),
        start: page_start(&req.page_token, OUTBOX_PAGE)?,
    })
}

/// Filter of `ListInbox`.
pub(crate) fn inbox_filter(req: &pb::ListInboxRequest) -> Result<ListFilter, NodeError> {
    Ok(ListFilter {
        case_ref: optional_case_ref(&req.case_ref, "case_ref")?,
        counterpart: optional_participant(&req.counterpart, "counterpart")?,
        kind: optional_kind(req.kind, "kind")?,
        state: None,
        limit: list_limit(req.limit),
        start: page_start(&req.page_token, INBOX_PAGE)?,
    })
}

/// Prefix of the page tokens of `ListOutbox`.
pub(crate) const OUTBOX_PAGE: &str = "outbox:";
/// Prefix of the page tokens of `ListInbox`.
pub(crate) const INBOX_PAGE: &str = "inbox:";

/// Where a page token says the listing continues (`""`: the newest).
fn page_start(token: &str, prefix: &str) -> Result<Option<u64>, NodeError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(prefix)
        .and_then(|seq| seq.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            invalid(
                "page_token",
                "is not a next_page_token of this listing (leave it empty for the first page)",
            )
        })
}

/// The `next_page_token` of a page.
pub(crate) fn next_page_token(next: Option<u64>, prefix: &str) -> String {
    next.map(|seq| format!("{prefix}{seq}")).unwrap_or_default()
}

/// Prefix of the page tokens of `ListDue`.
const DUE_PAGE: &str = "due:";

/// The `today` of a `ListDue` request and where its page token says the listing
/// continues (`None`: the first item). The token carries the `today` of its listing: a
/// request without one continues that listing, a request with another is refused (its
/// pages would skip or repeat items).
pub(crate) fn due_page(
    today: Option<Date>,
    token: &str,
) -> Result<(Option<Date>, Option<DueCursor>), NodeError> {
    if token.is_empty() {
        return Ok((today, None));
    }
    let parse = |token: &str| {
        let mut parts = token.strip_prefix(DUE_PAGE)?.splitn(3, ':');
        let listed = Date::parse(parts.next()?).ok()?;
        let due = Date::parse(parts.next()?).ok()?;
        let message_id = MessageId::parse(parts.next()?).ok()?;
        Some((listed, DueCursor { due, message_id }))
    };
    let (listed, cursor) = parse(token).ok_or_else(|| {
        invalid(
            "page_token",
            "is not a next_page_token of ListDue (leave it empty for the first page)",
        )
    })?;
    match today {
        Some(today) if today != listed => Err(NodeError::Invalid(ValidationError::new(
            "page_token",
            format!(
                "continues the listing of what is due by {listed}, not by {today}: ask with today {listed} or without today"
            ),
        ))),
        _ => Ok((Some(listed), Some(cursor))),
    }
}

/// The `next_page_token` of a page of what is due by `today`.
pub(crate) fn due_page_token(today: Date, next: Option<DueCursor>) -> String {
    next.map(|c| format!("{DUE_PAGE}{today}:{}:{}", c.due, c.message_id))
        .unwrap_or_default()
}

/// Prefix of the page tokens of `GetCase`.
const CASE_PAGE: &str = "case:";

/// Where the page token of a `GetCase` request for `case` says the timeline continues
/// (`None`: the first message). The token carries its case: one of another case's
/// timeline is refused (it would start that timeline at a made-up place).
pub(crate) fn case_page(case: CaseRef, token: &str) -> Result<Option<CaseCursor>, NodeError> {
    if token.is_empty() {
        return Ok(None);
    }
    let parse = |token: &str| {
        let mut parts = token.strip_prefix(CASE_PAGE)?.splitn(3, ':');
        let listed = CaseRef::parse(parts.next()?).ok()?;
        let at = parts.next()?.parse().ok()?;
        let message_id = MessageId::parse(parts.next()?).ok()?;
        Some((listed, CaseCursor { at, message_id }))
    };
    let (listed, cursor) = parse(token).ok_or_else(|| {
        invalid(
            "page_token",
            "is not a next_page_token of GetCase (leave it empty for the first page)",
        )
    })?;
    if listed != case {
        return Err(invalid(
            "page_token",
            "continues the timeline of another case: ask with the case_ref it was given for",
        ));
    }
    Ok(Some(cursor))
}

/// The `next_page_token` of a page of the timeline of `case`.
pub(crate) fn case_page_token(case: CaseRef, next: Option<CaseCursor>) -> String {
    next.map(|c| format!("{CASE_PAGE}{case}:{}:{}", c.at, c.message_id))
        .unwrap_or_default()
}

/// `GetCase`'s `page_size` as the core takes it (0: the default page; the core caps
/// it); a negative one is refused.
pub(crate) fn case_page_size(page_size: i32) -> Result<usize, NodeError> {
    usize::try_from(page_size).map_err(|_| {
        NodeError::Invalid(ValidationError::new(
            "page_size",
            format!("must not be negative (0 for the default, {CASE_PAGE_DEFAULT} messages)"),
        ))
    })
}

/// `ListDue`'s `limit`: 0 is the largest page (see `DUE_DEFAULT_LIMIT`).
pub(crate) fn due_limit(limit: u32) -> usize {
    usize::try_from(limit.min(MAX_LIST_LIMIT)).unwrap_or(0)
}

/// Largest page the API returns at once.
const MAX_LIST_LIMIT: u32 = 10_000;

fn list_limit(limit: u32) -> usize {
    usize::try_from(limit.min(MAX_LIST_LIMIT)).unwrap_or(100)
}

/// The wire form of an outbox state.
pub(crate) fn outbox_state(state: OutboxState) -> pb::OutboxState {
    match state {
        OutboxState::Queued => pb::OutboxState::Queued,
        OutboxState::Submitted => pb::OutboxState::Submitted,
        OutboxState::Delivered => pb::OutboxState::Delivered,
        OutboxState::Failed => pb::OutboxState::Failed,
    }
}

fn failure(failure: Failure) -> pb::DeliveryFailure {
    pb::DeliveryFailure {
        outcome: failure.outcome,
        reason_code: failure.reason_code,
        field_path: failure.field_path,
    }
}

/// The wire form of an outbox entry.
pub(crate) fn outbox_entry(entry: OutboxEntry) -> pb::OutboxEntry {
    pb::OutboxEntry {
        message_id: entry.message_id.to_string(),
        idempotency_key: entry.idempotency_key,
        recipient: entry.recipient.to_string(),
        kind: entry.kind.to_pb() as i32,
        case_ref: entry.case_ref.to_string(),
        in_reply_to: id_string(entry.in_reply_to),
        priority: entry.priority.to_pb() as i32,
        state: outbox_state(entry.state) as i32,
        answered_by: id_string(entry.answered_by),
        created_at: Some(timestamp(entry.created_at)),
        submitted_at: entry.submitted_at.map(timestamp),
        outcome_at: entry.outcome_at.map(timestamp),
        failure: entry.failure.map(failure),
        submit_attempts: entry.submit_attempts,
        last_error: entry.last_error.unwrap_or_default(),
        body_erased: entry.body_erased,
        contradicted_by: entry.contradicted_by,
    }
}

/// The wire form of an inbox entry.
pub(crate) fn inbox_entry(entry: InboxEntry) -> pb::InboxEntry {
    pb::InboxEntry {
        seq: entry.seq,
        message_id: entry.message_id.to_string(),
        sender: entry.sender.to_string(),
        kind: entry.kind.to_pb() as i32,
        case_ref: entry.case_ref.to_string(),
        in_reply_to: id_string(entry.in_reply_to),
        priority: entry.priority.to_pb() as i32,
        created_at: Some(timestamp(entry.created_at)),
        accepted_at: Some(timestamp(entry.accepted_at)),
        received_at: Some(timestamp(entry.received_at)),
        answered_by: id_string(entry.answered_by),
        body_erased: entry.body_erased,
    }
}

fn direction(direction: Direction) -> pb::MessageDirection {
    match direction {
        Direction::Sent => pb::MessageDirection::Sent,
        Direction::Received => pb::MessageDirection::Received,
    }
}

/// The wire form of a timeline entry.
pub(crate) fn timeline_entry(entry: TimelineEntry) -> pb::TimelineEntry {
    pb::TimelineEntry {
        at: Some(timestamp(entry.at)),
        direction: direction(entry.direction) as i32,
        message_id: entry.message_id.to_string(),
        kind: entry.kind.to_pb() as i32,
        counterpart: entry.counterpart.to_string(),
        in_reply_to: id_string(entry.in_reply_to),
        state: entry.state,
    }
}

/// The wire form of a due item.
pub(crate) fn due_item(item: DueItem) -> pb::DueItem {
    pb::DueItem {
        message_id: item.message_id.to_string(),
        case_ref: item.case_ref.to_string(),
        kind: item.kind.to_pb() as i32,
        counterpart: item.counterpart.to_string(),
        due: item.due.to_string(),
        what: match item.what {
            DueKind::AwaitingAnswer => pb::DueKind::AwaitingAnswer,
            DueKind::AnswerOwed => pb::DueKind::AnswerOwed,
            DueKind::FollowUpDue => pb::DueKind::FollowUpDue,
        } as i32,
    }
}

/// The wire form of a registry entry.
pub(crate) fn participant(info: ParticipantInfo) -> pb::Participant {
    pb::Participant {
        id: info.id.to_string(),
        display_name: info.display_name,
        country: info.country,
        organisation_type: organisation_type(&info.organisation_type) as i32,
        accepts: info.accepts.iter().map(|k| k.to_pb() as i32).collect(),
    }
}

/// Accepts the core's short names (`nrm`, `international-organisation`) and
/// the wire names (`ORGANISATION_TYPE_NRM`).
fn organisation_type(name: &str) -> pb::OrganisationType {
    if let Some(t) = pb::OrganisationType::from_str_name(name) {
        return t;
    }
    let wire = format!(
        "ORGANISATION_TYPE_{}",
        name.trim().replace(['-', ' '], "_").to_ascii_uppercase()
    );
    pb::OrganisationType::from_str_name(&wire).unwrap_or(pb::OrganisationType::Unspecified)
}

/// The wire form of the node's status.
pub(crate) fn node_status(status: NodeStatus) -> pb::NodeStatus {
    pb::NodeStatus {
        participant: status.participant.to_string(),
        broker_connected: status.broker_connected,
        last_broker_error: status.last_broker_error.unwrap_or_default(),
        outbox_queued: status.outbox_queued,
        outbox_submitted: status.outbox_submitted,
        outbox_failed: status.outbox_failed,
        inbox_total: status.inbox_total,
        last_inbox_seq: status.last_inbox_seq,
        certificate_serial: status
            .certificate
            .as_ref()
            .map(|c| c.serial_hex.clone())
            .unwrap_or_default(),
        certificate_not_after: status
            .certificate
            .as_ref()
            .map(|c| to_timestamp(c.not_after)),
        certificate_refused: status
            .certificate
            .and_then(|c| c.refused)
            .unwrap_or_default(),
        withdrawals_pending: status.withdrawals_pending,
        broker_certificate_not_after: status.broker_certificate_not_after.map(to_timestamp),
        store_error: status.store_error.unwrap_or_default(),
    }
}
