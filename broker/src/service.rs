//! The `trmx.v1.Exchange` gRPC service (DESIGN.md §3): identity from the
//! client certificate, validation of every request, and the calls into the
//! [`BrokerStore`]. `Receive` streams run as tasks that lease from the store
//! and sleep on the participant's wake-up (see [`crate::streams`]).
//!
//! A handler that changes the store runs the change and what follows it (stream
//! slots freed, copies taken back dropped, counters, the sender's write permits) in a
//! task of its own (`to_completion`): a client whose deadline passes has its
//! handler dropped mid-await, and the change is made all the same.
//!
//! Handlers return [`BrokerError`]; the `tonic` wrappers convert it with the
//! one `From<BrokerError> for Status`. Logs carry participant and message ids,
//! never payloads or body fields.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, error, info, info_span, warn};
use trmx_certs::{CertInfo, Role};
use trmx_proto::envelope::SubmitEnvelope;
use trmx_proto::time::{from_millis, to_millis, to_timestamp};
use trmx_proto::{Kind, MessageId, ParticipantId, ValidationError, pb};

use crate::admin::{
    CertRole, DeadLetterReason, DropReason, ExchangeMethod, Metrics, RefusalReason,
    metrics::OpenStream,
};
use crate::admission::{self, Admission, RequestPermit, RequestSlots, SubmitSlots, Submitting};
use crate::clock::Clock;
use crate::config::{LifecycleConfig, LimitsConfig};
use crate::error::BrokerError;
use crate::outbound::{self, Outbound, Outbox, Outgoing};
use crate::registry::LiveRegistry;
use crate::store::{
    self, BrokerStore, Leased, Millis, NewMessage, StatusRecord, StoreError, StreamEnd, StreamId,
    SubmitOutcome,
};
use crate::streams::{Lease, StreamHandle, Streams};

/// Most ids one `Ack` may carry.
pub const MAX_ACK_IDS: usize = 1024;
/// Longest `field_path` of a `Reject`.
pub const MAX_FIELD_PATH_LEN: usize = 256;

/// State shared by every handler and stream task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn BrokerStore>,
    pub(crate) clock: Arc<dyn Clock>,
    /// The participants served, replaced whole by a reload (SIGHUP).
    pub(crate) registry: LiveRegistry,
    pub(crate) streams: Streams,
    pub(crate) admission: Admission,
    /// Per-sender slots for submits being written (fairness between senders).
    pub(crate) submit_slots: SubmitSlots,
    /// Per-participant slots for the other `Exchange` requests (fairness between
    /// participants on the store's one writer).
    pub(crate) request_slots: RequestSlots,
    /// The submits not yet written and the recent withdrawals, by message, for
    /// `Withdraw`.
    pub(crate) submitting: Submitting,
    pub(crate) limits: LimitsConfig,
    pub(crate) lifecycle: LifecycleConfig,
    pub(crate) broker_name: String,
    /// Becomes `true` when the broker shuts down: streams end, submits are refused.
    pub(crate) shutting_down: watch::Receiver<bool>,
    /// What `/metrics` serves.
    pub(crate) metrics: Arc<Metrics>,
    /// The participants' certificates last seen, for their expiry gauges.
    pub(crate) peer_certs: PeerCerts,
    /// The federation's trust domain, from the broker's own certificate: a
    /// client certificate of another one is refused, even if the CA signed it.
    pub(crate) trust_domain: Option<String>,
}

/// The leaf certificate each participant last connected with, so that a certificate is
/// parsed (for `trmx_certificate_expiry_seconds`) once, not on every RPC: a call only
/// compares bytes. Holds at most one entry per registry participant.
#[derive(Debug, Default)]
pub(crate) struct PeerCerts(Mutex<HashMap<ParticipantId, Vec<u8>>>);

impl PeerCerts {
    /// Records `participant`'s certificate expiry in `metrics` if `leaf_der` is new.
    fn note(&self, metrics: &Metrics, participant: &ParticipantId, leaf_der: &[u8]) {
        let known = |map: &HashMap<ParticipantId, Vec<u8>>| {
            map.get(participant).is_some_and(|der| der == leaf_der)
        };
        if known(&self.lock()) {
            return;
        }
        match CertInfo::from_der(leaf_der) {
            Ok(info) => {
                // (the gauge and the entry change under one lock, and the entry is kept
                // only when the gauge took the expiry: a call under way when a reload
                // removed its participant must not leave an entry whose gauge is gone,
                // or the participant, added back, would never have its gauge again)
                let mut map = self.lock();
                if metrics.set_cert_expiry(
                    CertRole::Participant,
                    participant.as_str(),
                    info.not_after,
                ) {
                    map.insert(participant.clone(), leaf_der.to_vec());
                } else {
                    map.remove(participant);
                }
            }
            Err(error) => debug!(%error, "cannot read the expiry of a client certificate"),
        }
    }

    /// Forgets the certificates of `participants`, who left the registry: one who comes
    /// back has its expiry recorded again at its first call. Called after
    /// [`Metrics::forget_participants`], so that a call under way records nothing that
    /// stays.
    pub(crate) fn forget(&self, participants: &[ParticipantId]) {
        let mut map = self.lock();
        for p in participants {
            map.remove(p);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ParticipantId, Vec<u8>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A refused `Submit`: the error the caller gets, and the reason it is counted under in
/// `trmx_submits_refused_total` (`None`: not a refusal, e.g. an internal error).
#[derive(Debug)]
pub(crate) struct Refused {
    error: BrokerError,
    reason: Option<RefusalReason>,
}

impl Refused {
    fn new(error: BrokerError, reason: RefusalReason) -> Self {
        Self {
            error,
            reason: Some(reason),
        }
    }
}

impl From<BrokerError> for Refused {
    /// The reason follows from the code, except `RESOURCE_EXHAUSTED`, whose sites say
    /// which limit it was ([`Refused::new`]).
    fn from(error: BrokerError) -> Self {
        use tonic::Code;
        let reason = match error.code() {
            Code::InvalidArgument => Some(RefusalReason::InvalidArgument),
            // a certificate that may not submit
            Code::PermissionDenied | Code::Unauthenticated => Some(RefusalReason::PermissionDenied),
            Code::NotFound => Some(RefusalReason::NotFound),
            Code::FailedPrecondition => Some(RefusalReason::FailedPrecondition),
            Code::AlreadyExists => Some(RefusalReason::AlreadyExists),
            Code::Unavailable => Some(RefusalReason::Unavailable),
            _ => None,
        };
        Self { error, reason }
    }
}

impl From<ValidationError> for Refused {
    fn from(error: ValidationError) -> Self {
        BrokerError::from(error).into()
    }
}

impl From<admission::Refusal> for Refused {
    fn from(refusal: admission::Refusal) -> Self {
        let reason = match refusal {
            admission::Refusal::StoreUnavailable => RefusalReason::Unavailable,
            admission::Refusal::LowDisk => RefusalReason::Disk,
            // (sending faster than the store writes)
            admission::Refusal::Rate { .. } | admission::Refusal::Waiting { .. } => {
                RefusalReason::Rate
            }
        };
        Refused::new(refusal.into_error(), reason)
    }
}

impl Shared {
    fn now(&self) -> Millis {
        self.clock.now_millis()
    }

    /// The verified caller's identity: `UNAUTHENTICATED` without one, and
    /// `PERMISSION_DENIED` for one of another trust domain than this broker's
    /// (a CA that signs for several federations must not let one into the
    /// other).
    pub(crate) fn identity<T>(
        &self,
        request: &Request<T>,
    ) -> Result<trmx_certs::Identity, BrokerError> {
        let identity = trmx_transport::peer_identity(request)
            .map_err(|status| BrokerError::Unauthenticated(status.message().to_string()))?;
        match &self.trust_domain {
            Some(ours) if identity.trust_domain != *ours => {
                Err(BrokerError::PermissionDenied(format!(
                    "the client certificate is of trust domain {}, this broker serves {ours}",
                    identity.trust_domain
                )))
            }
            _ => Ok(identity),
        }
    }

    /// Passes a store result through, latching "unavailable" on a failed
    /// flush and clearing it once the store makes writes durable again (a
    /// read that works does not clear it).
    pub(crate) fn stored<T>(&self, result: Result<T, StoreError>) -> Result<T, BrokerError> {
        match result {
            Ok(value) => {
                if self.admission.is_store_unavailable() && self.store.writes_durable() {
                    info!("store writable again, accepting submits");
                    self.admission.store_recovered();
                    self.update_store_writable();
                    // The writes whose flush failed were kept and are durable now,
                    // but the wake-ups of their recipients went with the failure
                    // (a retry finds them done: a duplicate submit, a refused
                    // redrive, wakes nobody): every stream looks once.
                    self.streams.wake_all();
                }
                Ok(value)
            }
            Err(error) => Err(self.store_failed(error)),
        }
    }

    /// The error of a store call that failed, latching "unavailable" on a failed flush
    /// (see [`Self::stored`]).
    pub(crate) fn store_failed(&self, error: StoreError) -> BrokerError {
        if matches!(error, StoreError::Unavailable(_)) {
            if !self.admission.is_store_unavailable() {
                tracing::error!(%error, "store cannot make writes durable, refusing submits");
            }
            self.admission.store_failed();
            self.update_store_writable();
        } else {
            tracing::error!(%error, "store error");
        }
        BrokerError::Store(error)
    }

    /// Publishes whether new submits can be stored: no failed flush latched, disk above
    /// the watermark, not shutting down.
    pub(crate) fn update_store_writable(&self) {
        let writable = self.admission.store_writable() && !*self.shutting_down.borrow();
        self.metrics.set_store_writable(writable);
    }
}

/// Runs `work` — a store change and what the broker does once it is made (free the
/// stream slots it settles, drop the copies it takes back from the recipients' channels,
/// count it) — in a task of its own, and waits for it. A client whose deadline passes,
/// or who hangs up, has its handler dropped wherever it awaits, which is mostly while
/// the store makes the change durable; the store finishes the change all the same
/// (`to_completion` in the sled store), but what came after it in the handler went
/// with the handler: a settled message held its recipient's stream slot until the ack
/// timeout, and a withdrawn or purged copy waiting in the recipient's channel was sent.
/// A panic of `work` is the caller's, as before.
pub(crate) async fn to_completion<T, E>(
    work: impl Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<BrokerError> + Send + 'static,
{
    match tokio::spawn(work.in_current_span()).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => {
            Err(BrokerError::Unavailable(format!("the broker is shutting down: {error}")).into())
        }
    }
}

/// The `Exchange` service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ExchangeService {
    shared: Arc<Shared>,
}

impl ExchangeService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The caller's participant id: from the verified client certificate,
    /// a participant role, and listed in the registry.
    fn caller<T>(&self, request: &Request<T>) -> Result<ParticipantId, BrokerError> {
        let identity = self.shared.identity(request)?;
        let id = match &identity.role {
            Role::Participant(id) => id,
            Role::Operator(_) => {
                return Err(BrokerError::PermissionDenied(
                    "operator certificates cannot use the Exchange service".into(),
                ));
            }
            Role::Broker(_) => {
                return Err(BrokerError::PermissionDenied(
                    "broker certificates cannot use the Exchange service".into(),
                ));
            }
        };
        let id = ParticipantId::parse(id).map_err(|_| {
            BrokerError::Unauthenticated("client certificate names no valid participant".into())
        })?;
        if self.shared.registry.current().get(&id).is_none() {
            return Err(not_in_registry(&id));
        }
        let metrics = &self.shared.metrics;
        metrics.seen(&id, self.shared.clock.now());
        if let Some(leaf) = request
            .peer_certs()
            .as_deref()
            .and_then(|certs| certs.first())
        {
            self.shared.peer_certs.note(metrics, &id, leaf.as_ref());
        }
        Ok(id)
    }

    /// A slot for one of `caller`'s `method` requests carrying `ack_ids` message ids (see
    /// [`RequestSlots`]), held while the request works on the store. A refusal is counted
    /// in `/metrics` and logged with the participant at most once per interval (a flood
    /// would otherwise flood the log too).
    async fn request_slot(
        &self,
        caller: &ParticipantId,
        method: ExchangeMethod,
        ack_ids: usize,
    ) -> Result<RequestPermit, BrokerError> {
        let slots = &self.shared.request_slots;
        match slots.acquire(caller, ack_ids).await {
            Ok(permit) => Ok(permit),
            Err(crowded) => {
                self.shared.metrics.refused_in_progress(method);
                if let Some(refused) = slots.refused(caller, crowded) {
                    warn!(
                        participant = %caller,
                        setting = crowded.setting(),
                        refused,
                        "requests of one participant in progress reached the limit, \
                         refusing its requests"
                    );
                }
                Err(crowded.into_error(caller))
            }
        }
    }

    /// [`Self::submit_inner`], counted: the latency of a durable receipt, or the refusal.
    async fn submit_counted(
        &self,
        caller: &ParticipantId,
        request: pb::SubmitRequest,
        started: Instant,
    ) -> Result<pb::SubmitReceipt, Refused> {
        match self.submit_inner(caller, request).await {
            Ok(receipt) => {
                self.shared.metrics.observe_submit(started.elapsed());
                Ok(receipt)
            }
            Err(refused) => {
                // A sender over its rate or quota waits for its answer: a
                // flooding client slows itself down (its concurrency is
                // bounded per connection) instead of taking the CPU that the
                // other participants' submits need.
                if matches!(
                    refused.reason,
                    Some(RefusalReason::Rate | RefusalReason::Quota)
                ) {
                    tokio::time::sleep(self.shared.limits.refusal_delay).await;
                }
                Err(refused)
            }
        }
    }

    async fn submit_inner(
        &self,
        caller: &ParticipantId,
        request: pb::SubmitRequest,
    ) -> Result<pb::SubmitReceipt, Refused> {
        let shared = &self.shared;
        if *shared.shutting_down.borrow() {
            return Err(BrokerError::Unavailable("the broker is shutting down".into()).into());
        }
        let mut envelope = request
            .envelope
            .ok_or_else(|| ValidationError::new("envelope", "is required"))?;
        let size = envelope.encoded_len() as u64;
        if size > shared.limits.max_envelope_bytes {
            return Err(ValidationError::new(
                "envelope",
                format!(
                    "must be at most {} bytes encoded, got {size}",
                    shared.limits.max_envelope_bytes
                ),
            )
            .into());
        }
        // Who may send this comes before whether it is well formed (DESIGN.md
        // §3): any sender but empty or the caller's own ID, and any
        // broker-made kind, are PERMISSION_DENIED, however the rest looks.
        if !envelope.sender.is_empty() && envelope.sender != caller.as_str() {
            return Err(BrokerError::PermissionDenied(
                "envelope.sender must be empty or the caller's own participant ID".into(),
            )
            .into());
        }
        if let Some(kind) = Kind::from_pb(envelope.kind)
            && kind.is_broker_made()
        {
            return Err(BrokerError::PermissionDenied(format!(
                "envelope.kind {kind} is made by the broker only"
            ))
            .into());
        }
        let checked = SubmitEnvelope::check(&envelope)?;
        tracing::Span::current().record("message_id", tracing::field::display(checked.message_id));
        let now = shared.now();
        let payload = bytes::Bytes::from(std::mem::take(&mut envelope.payload));
        let fingerprint = fingerprint(&envelope, caller, checked.priority);
        let expires_at = match self.admissible(&checked, now) {
            Ok(expires_at) => expires_at,
            // (not a refusal its node would take as final, even if its lifetime has
            // passed since or its recipient left the registry)
            Err(final_refusal) => {
                return self
                    .first_receipt_or(caller, checked.message_id, fingerprint, final_refusal)
                    .await;
            }
        };
        // Refusals to retry later. A retry of a message stored before asks for nothing
        // new, so a rate limit or the disk watermark gives it its first receipt all the
        // same (DESIGN.md §3; §7 refuses "new submits"); a store that cannot write
        // answers nothing, since its records may not be durable.
        match shared.admission.check(caller) {
            Ok(()) => {}
            Err(refusal @ (admission::Refusal::LowDisk | admission::Refusal::Rate { .. })) => {
                return self
                    .first_receipt_or(caller, checked.message_id, fingerprint, refusal)
                    .await;
            }
            Err(refusal) => return Err(refusal.into()),
        }

        let message = NewMessage {
            message_id: checked.message_id,
            sender: caller.clone(),
            recipient: checked.recipient.clone(),
            kind: checked.kind,
            case_ref: checked.case_ref,
            in_reply_to: checked.in_reply_to,
            priority: checked.priority,
            created_at: to_millis(checked.created_at),
            expires_at,
            content_type: checked.content_type,
            payload,
            payload_sha256: checked.payload_sha256,
            fingerprint,
        };
        let reserved = match shared.submit_slots.reserve(caller, size) {
            Ok(reserved) => reserved,
            Err(refusal) => {
                return self
                    .first_receipt_or(caller, checked.message_id, fingerprint, refusal)
                    .await;
            }
        };
        // (registered before it waits: a withdrawal of the message from here on
        // cancels it or comes after its write; see `Submitting`)
        let mut ticket = shared.submitting.enter(caller, checked.message_id);
        let slot = shared.submit_slots.acquire(caller).await;
        if ticket.start_writing().is_err() {
            return Err(BrokerError::FailedPrecondition(format!(
                "message {} was withdrawn by its sender while this submit was on its way; \
                 it is not written",
                checked.message_id
            ))
            .into());
        }
        // (counted with its write, and the sender's write slot and bytes held until it is
        // done, whether its caller waits or not: see `to_completion`)
        let outcome = {
            let (shared, recipient, kind) =
                (self.shared.clone(), checked.recipient.clone(), checked.kind);
            let held = (slot, reserved);
            to_completion(async move {
                let _held = held;
                let outcome = match shared.store.submit(message, now).await {
                    Ok(outcome) => shared.stored(Ok(outcome))?,
                    Err(failed) => {
                        // A message written whose flush failed is kept, durable with the
                        // next flush, and delivered: the sender's retry is a duplicate,
                        // which is not counted (the count would be short for ever). Its
                        // recipient's streams are woken once the store writes again
                        // (`Shared::stored`): none can lease before.
                        if let Some(SubmitOutcome::Accepted(_)) = failed.committed {
                            shared.metrics.accepted(kind);
                            debug!("message accepted, but not yet durable");
                        }
                        return Err(shared.store_failed(failed.error).into());
                    }
                };
                if matches!(outcome, SubmitOutcome::Accepted(_)) {
                    shared.metrics.accepted(kind);
                    shared.streams.wake(&recipient);
                }
                Ok::<_, Refused>(outcome)
            })
            .await?
        };
        drop(ticket);
        let (accepted, duplicate) = match outcome {
            SubmitOutcome::Accepted(accepted) => (accepted, false),
            SubmitOutcome::Duplicate(accepted) => (accepted, true),
            SubmitOutcome::IdTaken => {
                // (the other sender is not named: that would tell who writes to whom)
                return Err(BrokerError::AlreadyExists(format!(
                    "message_id {} is already used by another sender's message to {}; \
                     give each message a fresh UUIDv7",
                    checked.message_id, checked.recipient
                ))
                .into());
            }
            SubmitOutcome::Conflict => {
                return Err(BrokerError::AlreadyExists(format!(
                    "message_id {} was already used by {caller} for different content",
                    checked.message_id
                ))
                .into());
            }
            SubmitOutcome::QuotaExceeded => {
                return Err(Refused::new(
                    BrokerError::ResourceExhausted(format!(
                        "{caller} has more than {} bytes queued; retry when the recipients catch up",
                        shared.limits.max_queued_bytes_per_sender
                    )),
                    RefusalReason::Quota,
                ));
            }
        };
        debug!(
            recipient = %checked.recipient,
            kind = %checked.kind,
            broker_seq = accepted.broker_seq,
            duplicate,
            size,
            "message accepted"
        );
        Ok(receipt(checked.message_id, &accepted, duplicate))
    }

    /// The first receipt of `caller`'s message `id` when it is stored with `fingerprint`:
    /// a retry gets it (DESIGN.md §3) whatever refused a new submit. Else `refusal`. (A
    /// store failure here is `UNAVAILABLE`: retry.)
    async fn first_receipt_or(
        &self,
        caller: &ParticipantId,
        id: MessageId,
        fingerprint: [u8; 32],
        refusal: impl Into<Refused>,
    ) -> Result<pb::SubmitReceipt, Refused> {
        let shared = &self.shared;
        let first = shared.store.resubmitted(caller, id, fingerprint).await;
        match shared.stored(first)? {
            Some(accepted) => Ok(receipt(id, &accepted, true)),
            None => Err(refusal.into()),
        }
    }

    /// The checks of a new message against the registry and the clock, which
    /// a retry would fail again (final refusals); its expiry when it passes.
    fn admissible(&self, checked: &SubmitEnvelope, now: Millis) -> Result<Millis, BrokerError> {
        let shared = &self.shared;
        let registry = shared.registry.current();
        let recipient = registry.get(&checked.recipient).ok_or_else(|| {
            BrokerError::NotFound(format!("unknown recipient {}", checked.recipient))
        })?;
        if !recipient.accepts(checked.kind) {
            return Err(BrokerError::FailedPrecondition(format!(
                "recipient {} does not accept {} messages",
                recipient.id, checked.kind
            )));
        }
        let max_expiry = now.saturating_add(millis(shared.limits.max_lifetime));
        let expires_at = match checked.expires_at {
            Some(at) => {
                let at = to_millis(at);
                if at <= now {
                    return Err(BrokerError::FailedPrecondition(
                        "envelope.expires_at is already past".into(),
                    ));
                }
                at.min(max_expiry)
            }
            None => now.saturating_add(millis(shared.limits.default_lifetime)),
        };
        Ok(expires_at)
    }

    async fn receive_inner(
        &self,
        caller: ParticipantId,
        request: pb::ReceiveRequest,
    ) -> Result<Outbound, BrokerError> {
        let shared = &self.shared;
        if *shared.shutting_down.borrow() {
            return Err(BrokerError::Unavailable(
                "the broker is shutting down".into(),
            ));
        }
        // (held by the stream until its first lease: opening a stream costs the store
        // that lease, and its end a release, so a client reopening streams in a loop is
        // held to its share)
        let opening = self
            .request_slot(&caller, ExchangeMethod::Receive, 0)
            .await?;
        let max_in_flight = match request.max_in_flight {
            0 => shared.limits.default_max_in_flight,
            n => n.min(shared.limits.max_max_in_flight),
        } as usize;
        let (outbox, outbound) = outbound::channel(
            max_in_flight.clamp(1, 64),
            shared.limits.receive_buffer_bytes,
            shared.clock.clone(),
            Box::new(StreamReport {
                shared: self.shared.clone(),
                participant: caller.clone(),
            }),
        );
        let handle = shared
            .streams
            .open(&caller, outbox.dropper())
            .ok_or_else(|| {
                BrokerError::ResourceExhausted(format!(
                    "{caller} already has {} open Receive streams",
                    shared.limits.max_streams_per_participant
                ))
            })?;
        // (a reload that removed the caller after its identity was checked, and closed
        // its streams before this one was registered, would leave this one open: the
        // registry is asked again now that a reload's close would reach it)
        if shared.registry.current().get(&caller).is_none() {
            shared.streams.remove(&caller, handle.id);
            return Err(not_in_registry(&caller));
        }
        let span = info_span!(
            "receive_stream",
            participant = %caller,
            stream = handle.id.0,
            max_in_flight
        );
        tokio::spawn(
            run_stream(self.shared.clone(), handle, max_in_flight, outbox, opening)
                .instrument(span),
        );
        Ok(outbound)
    }

    async fn ack_inner(
        &self,
        caller: &ParticipantId,
        request: pb::AckRequest,
    ) -> Result<pb::AckResponse, BrokerError> {
        if request.message_ids.len() > MAX_ACK_IDS {
            return Err(ValidationError::new(
                "message_ids",
                format!("must hold at most {MAX_ACK_IDS} ids"),
            )
            .into());
        }
        let parsed: Vec<Option<MessageId>> = request
            .message_ids
            .iter()
            .map(|id| MessageId::parse(id).ok())
            .collect();
        let valid: Vec<MessageId> = parsed.iter().flatten().copied().collect();
        let results = if valid.is_empty() {
            Vec::new()
        } else {
            let slot = self
                .request_slot(caller, ExchangeMethod::Ack, valid.len())
                .await?;
            let (this, caller) = (self.clone(), caller.clone());
            to_completion(async move {
                let _slot = slot;
                this.acknowledge(&caller, &valid).await
            })
            .await?
        };
        let mut results = results.into_iter();
        let outcomes = request
            .message_ids
            .into_iter()
            .zip(parsed)
            .map(|(text, id)| {
                let result = match id {
                    None => pb::AckResult::InvalidId,
                    Some(_) => match results.next() {
                        Some(store::AckResult::Acknowledged { .. }) => pb::AckResult::Acknowledged,
                        _ => pb::AckResult::NotFound,
                    },
                };
                pb::AckOutcome {
                    message_id: text,
                    result: result as i32,
                }
            })
            .collect();
        Ok(pb::AckResponse { results: outcomes })
    }

    /// Acknowledges `ids` (none invalid) in the store, then frees their stream slots
    /// and counts them (in a task of its own: see [`to_completion`]).
    async fn acknowledge(
        &self,
        caller: &ParticipantId,
        ids: &[MessageId],
    ) -> Result<Vec<store::AckResult>, BrokerError> {
        let shared = &self.shared;
        let results = match shared.store.ack(caller, ids, shared.now()).await {
            Ok(results) => shared.stored(Ok(results))?,
            Err(failed) => {
                // What it applied before it failed (a later part, or the flush) is kept:
                // the node's repeat finds those acknowledged `already`, and would neither
                // count them nor, until then, free their slots.
                if let Some(committed) = failed.committed {
                    self.applied_acks(caller, ids, &committed);
                }
                return Err(shared.store_failed(failed.error));
            }
        };
        self.applied_acks(caller, ids, &results);
        Ok(results)
    }

    /// Counts the acks the store applied (`results`, for the first of `ids`), frees their
    /// stream slots and drops their copies still waiting to be sent.
    fn applied_acks(
        &self,
        caller: &ParticipantId,
        ids: &[MessageId],
        results: &[store::AckResult],
    ) {
        let shared = &self.shared;
        let (mut acknowledged, mut not_found) = (Vec::new(), Vec::new());
        for (id, result) in ids.iter().zip(results) {
            match result {
                store::AckResult::Acknowledged { kind, already } => {
                    // Counted from the store's answer, not from the stream table, which
                    // no longer holds the delivery after its ack deadline, after a
                    // reconnect or a restart; once, the call that acknowledged it.
                    if !already {
                        shared.metrics.acknowledged(*kind);
                    }
                    acknowledged.push(*id);
                }
                // (expired, withdrawn or purged while in flight: its stream slot is free)
                store::AckResult::NotFound => not_found.push(*id),
            }
        }
        self.settled(caller, &acknowledged);
        shared.streams.not_in_flight(caller, &not_found);
        debug!(acknowledged = acknowledged.len(), "ack");
    }

    /// Frees the stream slots of settled messages, and drops their copies still waiting
    /// to be sent.
    fn settled(&self, caller: &ParticipantId, ids: &[MessageId]) {
        if ids.is_empty() {
            return;
        }
        // The senders' streams need no wake-up from here: the store wakes the
        // recipient of every receipt it queues once it is durable. (Waking
        // every stream when an id was not in flight here let one client that
        // acks an old id over and over set every stream of every participant
        // leasing on the store's one writer thread.)
        self.shared.streams.settled(caller, ids);
    }

    async fn reject_inner(
        &self,
        caller: &ParticipantId,
        request: pb::RejectRequest,
    ) -> Result<pb::RejectResponse, BrokerError> {
        let id = parse_message_id(&request.message_id, "message_id")?;
        tracing::Span::current().record("message_id", tracing::field::display(id));
        check_reason_code(&request.reason_code)?;
        check_field_path(&request.field_path)?;
        let slot = self.request_slot(caller, ExchangeMethod::Reject, 0).await?;
        let (this, caller) = (self.clone(), caller.clone());
        to_completion(async move {
            let _slot = slot;
            this.dead_letter(&caller, id, &request).await
        })
        .await
    }

    /// Dead-letters `caller`'s delivery `id` in the store as `request` says, then frees
    /// its stream slot and counts it (in a task of its own: see [`to_completion`]).
    async fn dead_letter(
        &self,
        caller: &ParticipantId,
        id: MessageId,
        request: &pb::RejectRequest,
    ) -> Result<pb::RejectResponse, BrokerError> {
        let shared = &self.shared;
        let rejected = shared
            .store
            .reject(
                caller,
                id,
                &request.reason_code,
                &request.field_path,
                shared.now(),
            )
            .await;
        let result = match rejected {
            Ok(result) => shared.stored(Ok(result))?,
            Err(failed) => {
                // Its write is kept when only the flush failed, and becomes durable with
                // the next flush: the node's repeat finds it rejected `already`, and
                // would neither count it nor, until then, free its slot.
                if let Some(committed) = failed.committed {
                    self.applied_reject(caller, id, request, committed);
                }
                return Err(shared.store_failed(failed.error));
            }
        };
        self.applied_reject(caller, id, request, result);
        match result {
            store::RejectResult::Rejected { .. } => Ok(pb::RejectResponse {}),
            // (it may well have been delivered: say what is known)
            store::RejectResult::NotFound => Err(BrokerError::NotFound(format!(
                "message {id} is not in flight to {caller}: never delivered to it, or \
                 acknowledged, expired, dead-lettered, withdrawn or purged since"
            ))),
        }
    }

    /// Counts the dead letter of the reject the store applied (`result`, for `id`),
    /// frees its stream slot and drops its copies still waiting to be sent.
    fn applied_reject(
        &self,
        caller: &ParticipantId,
        id: MessageId,
        request: &pb::RejectRequest,
        result: store::RejectResult,
    ) {
        let shared = &self.shared;
        match result {
            store::RejectResult::Rejected { already } => {
                // (a repeat still frees what an earlier call whose answer was lost
                // may not have got to)
                self.settled(caller, &[id]);
                if already {
                    info!("message already rejected by recipient");
                } else {
                    shared.metrics.dead_lettered(DeadLetterReason::Rejected, 1);
                    info!(reason_code = %request.reason_code, "message rejected by recipient");
                }
            }
            store::RejectResult::NotFound => shared.streams.not_in_flight(caller, &[id]),
        }
    }

    async fn withdraw_inner(
        &self,
        caller: &ParticipantId,
        request: pb::WithdrawRequest,
    ) -> Result<pb::WithdrawResponse, BrokerError> {
        let id = parse_message_id(&request.message_id, "message_id")?;
        tracing::Span::current().record("message_id", tracing::field::display(id));
        let slot = self
            .request_slot(caller, ExchangeMethod::Withdraw, 0)
            .await?;
        let (this, caller) = (self.clone(), caller.clone());
        to_completion(async move {
            let _slot = slot;
            this.withdraw_stored(&caller, id).await
        })
        .await
    }

    /// Withdraws `caller`'s message `id` in the store, then frees its stream slot and
    /// drops the copies waiting in its recipient's channels (in a task of its own: see
    /// [`to_completion`]; a copy sent after the withdrawal is a referral in the hands of
    /// an organisation its sender took it back from).
    async fn withdraw_stored(
        &self,
        caller: &ParticipantId,
        id: MessageId,
    ) -> Result<pb::WithdrawResponse, BrokerError> {
        let shared = &self.shared;
        // An earlier submit of the message may still be on its way (its client gone):
        // it must not store the message after this withdrawal.
        let withdrawal = shared.submitting.withdraw(caller, id).await;
        let cancelled = withdrawal.waiting;
        if cancelled > 0 {
            info!(
                cancelled,
                "submits of the message on their way are not written"
            );
        }
        // (a store that fails keeps the refusal: the message's state is not known, unless
        // the store says what its withdrawal found before its flush failed)
        let result = match shared.store.withdraw(caller, id, shared.now()).await {
            Ok(result) => result,
            Err(failed) => {
                match &failed.committed {
                    // Its write is kept when only the flush failed, and becomes durable
                    // with the next flush: the copy waiting for the recipient is dropped
                    // now (a retry finds it withdrawn, and is not the one that withdrew it).
                    Some(store::WithdrawResult::Withdrawn {
                        recipient, already, ..
                    }) => {
                        shared.streams.withdrawn(recipient, caller, &id);
                        if !already {
                            shared.metrics.withdrawn();
                            info!("message withdrawn, but not yet durable");
                        }
                    }
                    // Refused as when the flush works: the message stays as it is, and
                    // the sender's retry of its submit gets its receipt, not "withdrawn".
                    Some(
                        store::WithdrawResult::AlreadyAcknowledged
                        | store::WithdrawResult::Final { .. },
                    ) => shared.submitting.withdrawal_refused(caller, id, withdrawal),
                    Some(store::WithdrawResult::NotFound) | None => {}
                }
                return Err(shared.store_failed(failed.error));
            }
        };
        if matches!(
            result,
            store::WithdrawResult::AlreadyAcknowledged | store::WithdrawResult::Final { .. }
        ) {
            shared.submitting.withdrawal_refused(caller, id, withdrawal);
        }
        match result {
            store::WithdrawResult::Withdrawn {
                at,
                recipient,
                already,
            } => {
                // (a repeat still frees what an earlier call whose answer was lost
                // may not have got to)
                shared.streams.withdrawn(&recipient, caller, &id);
                if already {
                    info!("message already withdrawn");
                } else {
                    shared.metrics.withdrawn();
                    info!("message withdrawn");
                }
                Ok(pb::WithdrawResponse {
                    withdrawn_at: Some(to_timestamp(from_millis(at))),
                })
            }
            store::WithdrawResult::NotFound => Err(BrokerError::NotFound(format!(
                "no message {id} from {caller}"
            ))),
            store::WithdrawResult::AlreadyAcknowledged => Err(BrokerError::FailedPrecondition(
                format!("message {id} was already acknowledged by its recipient"),
            )),
            store::WithdrawResult::Final { state } => {
                Err(BrokerError::FailedPrecondition(format!(
                    "message {id} is already {}",
                    state
                        .to_pb()
                        .as_str_name()
                        .trim_start_matches("MESSAGE_STATE_")
                )))
            }
        }
    }

    async fn get_status_inner(
        &self,
        caller: &ParticipantId,
        request: pb::GetStatusRequest,
    ) -> Result<pb::MessageStatus, BrokerError> {
        let shared = &self.shared;
        let id = parse_message_id(&request.message_id, "message_id")?;
        tracing::Span::current().record("message_id", tracing::field::display(id));
        let _slot = self
            .request_slot(caller, ExchangeMethod::GetStatus, 0)
            .await?;
        let record = shared
            .stored(shared.store.status(caller, id).await)?
            .ok_or_else(|| BrokerError::NotFound(format!("no message {id} from {caller}")))?;
        Ok(status_to_pb(&record))
    }

    fn get_info_inner(&self, caller: &ParticipantId) -> pb::BrokerInfo {
        let shared = &self.shared;
        let limits = &shared.limits;
        pb::BrokerInfo {
            broker_name: shared.broker_name.clone(),
            participants: shared
                .registry
                .current()
                .iter()
                .map(crate::registry::Participant::to_pb)
                .collect(),
            limits: Some(pb::BrokerLimits {
                max_envelope_bytes: limits.max_envelope_bytes,
                default_lifetime: Some(to_pb_duration(limits.default_lifetime)),
                max_lifetime: Some(to_pb_duration(limits.max_lifetime)),
                default_max_in_flight: limits.default_max_in_flight,
                max_max_in_flight: limits.max_max_in_flight,
                ack_timeout: Some(to_pb_duration(shared.lifecycle.ack_timeout)),
                max_attempts: shared.lifecycle.max_attempts,
                metadata_retention: Some(to_pb_duration(shared.lifecycle.metadata_retention)),
            }),
            caller: caller.to_string(),
        }
    }
}

/// Runs the RPC `body` inside a span naming the method and the caller, and
/// converts its error into a `Status` (logging refusals at debug level). The long
/// form names the body's error type and a hook that sees every [`Refused`].
macro_rules! rpc {
    ($self:ident, $request:ident, $method:literal, |$caller:ident, $inner:ident| $body:expr) => {
        rpc!($self, $request, $method, BrokerError, |_: &Refused| {}, |$caller, $inner| $body)
    };
    ($self:ident, $request:ident, $method:literal, $error:ty, $on_refused:expr,
     |$caller:ident, $inner:ident| $body:expr) => {{
        let span = info_span!(
            "rpc",
            method = $method,
            participant = tracing::field::Empty,
            message_id = tracing::field::Empty,
            remote = $request.remote_addr().map(tracing::field::display),
        );
        async {
            let $caller = $self.caller(&$request)?;
            tracing::Span::current().record("participant", tracing::field::display(&$caller));
            let $inner = $request.into_inner();
            $body
        }
        .instrument(span.clone())
        .await
        .map(Response::new)
        .map_err(|error: $error| {
            let refused = Refused::from(error);
            ($on_refused)(&refused);
            let _entered = span.enter();
            debug!(code = ?refused.error.code(), error = %refused.error, "request refused");
            Status::from(refused.error)
        })
    }};
}

#[tonic::async_trait]
impl pb::exchange_server::Exchange for ExchangeService {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReceipt>, Status> {
        let started = Instant::now();
        let count_refusal = |refused: &Refused| {
            if let Some(reason) = refused.reason {
                self.shared.metrics.refused(reason);
            }
        };
        rpc!(
            self,
            request,
            "Submit",
            Refused,
            count_refusal,
            |caller, inner| self.submit_counted(&caller, inner, started).await
        )
    }

    type ReceiveStream = Outbound;

    async fn receive(
        &self,
        request: Request<pb::ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        rpc!(self, request, "Receive", |caller, inner| self
            .receive_inner(caller, inner)
            .await)
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        rpc!(self, request, "Ack", |caller, inner| self
            .ack_inner(&caller, inner)
            .await)
    }

    async fn reject(
        &self,
        request: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::RejectResponse>, Status> {
        rpc!(self, request, "Reject", |caller, inner| self
            .reject_inner(&caller, inner)
            .await)
    }

    async fn withdraw(
        &self,
        request: Request<pb::WithdrawRequest>,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        rpc!(self, request, "Withdraw", |caller, inner| self
            .withdraw_inner(&caller, inner)
            .await)
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::MessageStatus>, Status> {
        rpc!(self, request, "GetStatus", |caller, inner| self
            .get_status_inner(&caller, inner)
            .await)
    }

    async fn get_info(
        &self,
        request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::BrokerInfo>, Status> {
        rpc!(self, request, "GetInfo", |caller, _inner| {
            let _slot = self
                .request_slot(&caller, ExchangeMethod::GetInfo, 0)
                .await?;
            Ok(self.get_info_inner(&caller))
        })
    }
}

/// One `Receive` stream: lease up to the free slots while little waits to be sent,
/// send, sleep until woken. On exit (client gone, shutdown, store failure) its leases
/// are released.
async fn run_stream(
    shared: Arc<Shared>,
    mut handle: StreamHandle,
    max_in_flight: usize,
    outbox: Outbox,
    opening: RequestPermit,
) {
    let mut opening = Some(opening);
    let participant = handle.participant.clone();
    let ack_timeout = millis(shared.lifecycle.ack_timeout);
    let recheck = shared.lifecycle.tick_interval;
    let mut shutting_down = shared.shutting_down.clone();
    let mut registered = Registered {
        shared: shared.clone(),
        participant: participant.clone(),
        id: handle.id,
        counted: Some(shared.metrics.stream_opened(&participant)),
        channel: outbox.dropper(),
        released: false,
    };
    debug!("receive stream opened");
    let end = 'stream: loop {
        // Register for wake-ups before looking for work, so none is lost.
        let mut notified = pin!(handle.notify.notified());
        notified.as_mut().enable();
        if *handle.close.borrow() || *shutting_down.borrow() {
            break 'stream Some(closing(&shared, &participant));
        }
        // (every delivery leased so far is in the channel, or sent)
        outbox.forget_taken_back();
        let now = shared.now();
        let free = shared
            .streams
            .free_slots(&participant, handle.id, max_in_flight, now);
        // The ack timeout runs from the lease: take only what can be sent soon.
        let room = outbox.room();
        if free > 0 && room > 0 {
            let leased = match shared.stored(
                shared
                    .store
                    .lease(&participant, handle.id, free, room, now)
                    .await,
            ) {
                Ok(leased) => leased,
                Err(error) => break 'stream Some(Status::from(error)),
            };
            drop(opening.take());
            if !leased.is_empty() {
                let deadline = now.saturating_add(ack_timeout);
                shared.streams.leased(
                    &participant,
                    handle.id,
                    leased.iter().map(|l| Lease {
                        message_id: l.message_id,
                        sender: l.sender.clone(),
                        deadline,
                    }),
                );
                for lease in leased {
                    debug!(message_id = %lease.message_id, attempt = lease.attempt, "delivering");
                    let outgoing = Outgoing {
                        message_id: lease.message_id,
                        kind: lease.kind,
                        expires_at: lease.expires_at,
                        lease_deadline: deadline,
                        delivery: delivery(lease),
                    };
                    // A recipient that stops reading blocks this send. A shutdown or
                    // a closing stream must still end it, so that its leases are
                    // released as the broker's doing (not failed attempts), and the
                    // store is not held open past the shutdown.
                    tokio::select! {
                        sent = outbox.send(outgoing) => if sent.is_err() {
                            break 'stream None;
                        },
                        Ok(_) = handle.close.wait_for(|closed| *closed) => break 'stream Some(closing(&shared, &participant)),
                        Ok(_) = shutting_down.wait_for(|down| *down) => break 'stream Some(closing(&shared, &participant)),
                    }
                }
                continue;
            }
        }
        drop(opening.take());
        tokio::select! {
            () = &mut notified => {}
            () = outbox.closed() => break 'stream None,
            // Slots free, but enough waits to be sent: look again when some is sent.
            () = outbox.room_made(), if free > 0 && room == 0 => {}
            _ = handle.close.changed() => {}
            _ = shutting_down.changed() => {}
            // At capacity: look again when a lease deadline may have passed.
            () = tokio::time::sleep(recheck), if free == 0 => {}
        }
    };
    // With a status the broker ended the stream; without one the recipient
    // went away, and its unacknowledged deliveries count as failed attempts.
    // During a shutdown the broker closes the connections itself, so a stream
    // that ends then is never the recipient's failure.
    let ended_by = if end.is_some() || *shutting_down.borrow() {
        StreamEnd::Broker
    } else {
        StreamEnd::Recipient
    };
    // (what still waits in the channel is not sent: the leases are released next)
    if let Some(status) = end {
        outbox.end_with(status);
    }
    drop(outbox);
    registered.released = true;
    release_stream(&shared, &participant, handle.id, ended_by, registered).await;
}

/// Releases the leases of `participant`'s stream `id` in the store, then (dropping
/// `registered`) its entry in the stream table and its count in the gauge.
async fn release_stream(
    shared: &Shared,
    participant: &ParticipantId,
    id: StreamId,
    ended_by: StreamEnd,
    registered: Registered,
) {
    let result = shared
        .store
        .release_stream(participant, id, ended_by, shared.now())
        .await;
    drop(registered);
    // A release that failed after it committed some of its changes (a later batch, or the
    // flush) has them acted on all the same: nothing releases those leases again, and the
    // dead letters' senders get their non-delivery reports once the store flushes.
    let (released, error) = match result {
        Ok(released) => (shared.stored(Ok(released)).ok(), None),
        Err(failed) => (failed.committed, Some(shared.store_failed(failed.error))),
    };
    if let Some(released) = &released {
        if released.requeued > 0 {
            shared.streams.wake(participant);
        }
        // This stream's channel is ended, but an earlier copy of such a message (its
        // lease timed out on another stream of the participant while it waited there)
        // must not reach the recipient: its sender is told it was not delivered.
        for lease in &released.dead_lettered_in_flight {
            shared
                .streams
                .dead_lettered(&lease.recipient, &lease.message_id, lease.deadline);
        }
        shared
            .metrics
            .dead_lettered(DeadLetterReason::MaxAttempts, released.dead_lettered);
    }
    let (requeued, dead_lettered) = released
        .as_ref()
        .map_or((0, 0), |r| (r.requeued, r.dead_lettered));
    match error {
        None => debug!(requeued, dead_lettered, ?ended_by, "receive stream closed"),
        Some(error) => warn!(
            %error,
            requeued,
            dead_lettered,
            "receive stream closed, its leases not all released (the others due again after \
             the ack timeout)"
        ),
    }
}

/// What a `Receive` stream holds in the broker's memory: its entry in the stream table
/// (one of its participant's `max_streams_per_participant`, and its deliveries' slots)
/// and its count in `trmx_participant_connected_streams`. Dropped, it gives both back.
///
/// A stream's task that panics (a bug) ends without its orderly close; left as they were,
/// its participant would be short one stream for good (refused `RESOURCE_EXHAUSTED` once
/// that happened `max_streams_per_participant` times), the gauge would count a stream that
/// is gone, and its deliveries would wait for the ack timeout. Dropped by the panic, this
/// also releases its leases in the store, from a task of its own, each a failed attempt
/// as when the recipient's node drops its stream (backoff, and dead-lettered once its
/// attempts are used up): a panic may be tripped by a delivery's content, and released as
/// the broker's doing (due again at once, no attempt counted) such a delivery would be
/// handed out, the task panicking, at every reconnect of its node, for ever, never
/// reported to its sender, ahead of the recipient's other messages.
struct Registered {
    shared: Arc<Shared>,
    participant: ParticipantId,
    id: StreamId,
    counted: Option<OpenStream>,
    /// The stream's channel, ended by a panic before the leases are released.
    channel: outbound::Dropper,
    /// The stream's leases are being released in order (no task needed).
    released: bool,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let panicked = !self.released && std::thread::panicking();
        if panicked {
            // (first: what waits in the channel must not be sent once its leases are due
            // again; the task's `Outbox` is dropped after this guard)
            self.channel.end(Status::unavailable(
                "the broker ended this Receive stream after an internal error: open it again",
            ));
        }
        if panicked && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            error!(
                "a Receive stream's task panicked: releasing its deliveries, each a failed attempt (due again after the backoff, dead-lettered once its attempts are used up)"
            );
            let registered = Registered {
                shared: self.shared.clone(),
                participant: self.participant.clone(),
                id: self.id,
                counted: self.counted.take(),
                channel: self.channel.clone(),
                released: true,
            };
            let releasing = async move {
                let shared = registered.shared.clone();
                let participant = registered.participant.clone();
                let id = registered.id;
                // (a failed attempt: see the type's doc)
                release_stream(&shared, &participant, id, StreamEnd::Recipient, registered).await;
            };
            runtime.spawn(releasing.in_current_span());
            return;
        }
        self.shared.streams.remove(&self.participant, self.id);
        if let Some(counted) = self.counted.take() {
            self.shared
                .metrics
                .stream_closed(&self.participant, counted);
        }
    }
}

/// What a `Receive` stream's connection end reports to: the metrics count a delivery
/// when it is handed to the connection, and one dropped from its channel unsent frees its
/// stream slot.
#[derive(Debug)]
struct StreamReport {
    shared: Arc<Shared>,
    participant: ParticipantId,
}

impl outbound::Report for StreamReport {
    fn sent(&self, outgoing: &Outgoing) {
        self.shared
            .metrics
            .delivered(outgoing.kind, outgoing.delivery.attempt);
    }

    fn dropped(&self, outgoing: &Outgoing, reason: DropReason) {
        self.shared.metrics.dropped(reason);
        debug!(
            participant = %self.participant,
            message_id = %outgoing.message_id,
            attempt = outgoing.delivery.attempt,
            reason = reason.as_str(),
            "delivery dropped, not sent"
        );
        self.shared.streams.dropped(
            &self.participant,
            &outgoing.message_id,
            outgoing.lease_deadline,
        );
    }

    fn settled(&self, outgoing: &Outgoing) {
        // (its settlement freed the slots of its leases and woke the streams)
        debug!(
            participant = %self.participant,
            message_id = %outgoing.message_id,
            attempt = outgoing.delivery.attempt,
            "delivery dropped, not sent: the recipient acknowledged or rejected the message"
        );
    }
}

/// Why a stream is ended: its participant left the registry (a reload), or the broker
/// is shutting down. A participant removed and added back by two reloads before its
/// stream saw the first has its stream ended all the same; it is told so, not that the
/// broker is shutting down (its node's log and status would say so while it runs on).
fn closing(shared: &Shared, participant: &ParticipantId) -> Status {
    if shared.registry.current().get(participant).is_none() {
        return Status::from(not_in_registry(participant));
    }
    if *shared.shutting_down.borrow() {
        return Status::unavailable("the broker is shutting down");
    }
    Status::unavailable(format!(
        "the broker's registry was reloaded without participant {participant} and then \
         with it again: open the stream again"
    ))
}

/// The refusal of a participant the registry does not list (any more).
fn not_in_registry(participant: &ParticipantId) -> BrokerError {
    BrokerError::PermissionDenied(format!(
        "participant {participant} is not in this broker's registry"
    ))
}

/// The envelope a recipient receives.
fn delivery(lease: Leased) -> pb::Delivery {
    pb::Delivery {
        envelope: Some(pb::Envelope {
            message_id: lease.message_id.to_string(),
            sender: lease.sender.map(|s| s.to_string()).unwrap_or_default(),
            recipient: lease.recipient.to_string(),
            kind: lease.kind.to_pb() as i32,
            case_ref: lease.case_ref.to_string(),
            in_reply_to: lease
                .in_reply_to
                .map(|id| id.to_string())
                .unwrap_or_default(),
            priority: lease.priority.to_pb() as i32,
            created_at: Some(to_timestamp(from_millis(lease.created_at))),
            expires_at: Some(to_timestamp(from_millis(lease.expires_at))),
            payload: lease.payload.to_vec(),
            content_type: lease.content_type,
            payload_sha256: lease.payload_sha256.to_vec(),
            accepted_at: Some(to_timestamp(from_millis(lease.accepted_at))),
            broker_seq: lease.broker_seq,
        }),
        attempt: lease.attempt,
    }
}

/// The answer to a submit of `id`.
fn receipt(id: MessageId, accepted: &store::Accepted, duplicate: bool) -> pb::SubmitReceipt {
    pb::SubmitReceipt {
        message_id: id.to_string(),
        accepted_at: Some(to_timestamp(from_millis(accepted.accepted_at))),
        broker_seq: accepted.broker_seq,
        expires_at: Some(to_timestamp(from_millis(accepted.expires_at))),
        duplicate,
    }
}

/// SHA-256 over the canonical encoding of the client-set fields: the envelope
/// with the broker-set fields cleared, the sender set to the caller, the
/// priority normalised, and the payload left out (its digest, already checked,
/// stands for it). Equal content gives equal fingerprints.
fn fingerprint(
    envelope_without_payload: &pb::Envelope,
    caller: &ParticipantId,
    priority: trmx_proto::envelope::Priority,
) -> [u8; 32] {
    let mut canonical = envelope_without_payload.clone();
    canonical.payload.clear();
    canonical.sender = caller.to_string();
    canonical.accepted_at = None;
    canonical.broker_seq = 0;
    canonical.priority = priority.to_pb() as i32;
    trmx_proto::envelope::sha256(&canonical.encode_to_vec())
}

fn status_to_pb(record: &StatusRecord) -> pb::MessageStatus {
    let ts = |millis: Millis| Some(to_timestamp(from_millis(millis)));
    pb::MessageStatus {
        message_id: record.message_id.to_string(),
        state: record.state.to_pb() as i32,
        attempts: record.attempts,
        accepted_at: ts(record.accepted_at),
        last_delivered_at: record.last_delivered_at.and_then(ts),
        state_changed_at: ts(record.state_changed_at),
        expires_at: ts(record.expires_at),
        recipient: record.recipient.to_string(),
        kind: record.kind.to_pb() as i32,
        reason_code: record.reason_code.clone(),
        field_path: record.field_path.clone(),
        payload_size: record.payload_size,
        next_attempt_at: record.next_attempt_at.and_then(ts),
    }
}

fn parse_message_id(value: &str, field: &str) -> Result<MessageId, BrokerError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "is required").into());
    }
    MessageId::parse(value).map_err(|e| BrokerError::InvalidArgument(e.within(field)))
}

/// The reason codes the broker gives a message itself (`store::sled::ops`): a recipient
/// rejecting with one would make its rejection look like the broker's dead letter, expiry
/// or purge to operators (search, dead letters, redrive) and in the sender's report.
const BROKER_REASON_CODES: [&str; 3] = ["EXPIRED", "MAX_ATTEMPTS", "PURGED"];

/// `reason_code` must match `[A-Z0-9_]{1,64}` and not be one of the broker's own.
fn check_reason_code(code: &str) -> Result<(), BrokerError> {
    let ok = (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(ValidationError::new("reason_code", "must match [A-Z0-9_]{1,64}").into());
    }
    if BROKER_REASON_CODES.contains(&code) {
        return Err(ValidationError::new(
            "reason_code",
            format!(
                "{code} is a reason the broker gives itself ({}); name why the recipient \
                 can never process the message, e.g. INVALID_BODY",
                BROKER_REASON_CODES.join(", ")
            ),
        )
        .into());
    }
    Ok(())
}

/// `field_path` is empty or a field path of the schema, at most 256 characters:
/// dotted segments, each a field or message name of `trmx.v1` with optional `[N]`
/// indexes (see [`trmx_proto::schema`]). Checking only the form let a recipient put
/// a body value into a segment (`referral.person.AminaBello`), which then reached
/// the sender's non-delivery report, `GetStatus`, dead letters and logs. The names
/// are those of the whole package, not of the rejected message's kind: that closes
/// the leak as well (no value fits unless it is a schema word) without reading the
/// record before refusing, or fixing which root each kind's paths must have.
fn check_field_path(path: &str) -> Result<(), BrokerError> {
    if path.is_empty()
        || (path.len() <= MAX_FIELD_PATH_LEN && trmx_proto::schema::is_field_path(path))
    {
        Ok(())
    } else {
        Err(ValidationError::new(
            "field_path",
            "must be a dotted path of trmx.v1 field names like referral.consent.basis \
             (indexes like needs[2] allowed), at most 256 characters",
        )
        .into())
    }
}

fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn to_pb_duration(duration: Duration) -> pb::Duration {
    pb::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// A broker's shared state for the unit tests of the services, and a switch that holds
/// its store's flushes (to cancel a handler while its change is being made durable).
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Condvar;

    use super::*;
    use crate::store::{FaultSwitch, FlushObserver};

    /// The shared state of a broker on a sled store in `dir`, with one submit slot per
    /// sender (so a test can hold a sender's submits by holding its slot).
    pub(crate) fn one_slot_broker(dir: &std::path::Path) -> Arc<Shared> {
        broker_with(dir, crate::store::SledOptions::default())
    }

    /// [`one_slot_broker`] whose store's flushes a [`FlushHold`] can hold.
    pub(crate) fn held_broker(dir: &std::path::Path) -> (FlushHold, Arc<Shared>) {
        let hold = FlushHold::default();
        let options = crate::store::SledOptions {
            flush_observer: Some(hold.observer()),
            ..Default::default()
        };
        (hold, broker_with(dir, options))
    }

    /// [`one_slot_broker`] whose store's flushes fail while its [`FaultSwitch`] is set.
    pub(crate) fn faulty_broker(dir: &std::path::Path) -> (FaultSwitch, Arc<Shared>) {
        let store = crate::store::SledStore::open(
            dir,
            crate::store::SledOptions::default(),
            crate::store::Lifecycle::default(),
        )
        .unwrap();
        (store.fault_switch(), broker_on(store))
    }

    /// [`one_slot_broker`] on a store opened with `options`.
    pub(crate) fn broker_with(
        dir: &std::path::Path,
        options: crate::store::SledOptions,
    ) -> Arc<Shared> {
        use crate::store::{Lifecycle, SledStore};
        broker_on(SledStore::open(dir, options, Lifecycle::default()).unwrap())
    }

    /// [`one_slot_broker`] on `store`.
    fn broker_on(store: crate::store::SledStore) -> Arc<Shared> {
        use crate::config::{OrganisationType, ParticipantConfig};
        let participant = |id: &str, country: &str| ParticipantConfig {
            id: id.into(),
            display_name: id.into(),
            country: country.into(),
            organisation_type: OrganisationType::Nrm,
            accepts: vec!["referral".into()],
        };
        let clock = crate::clock::ManualClock::new(std::time::SystemTime::now());
        let (_, shutting_down) = watch::channel(false);
        Arc::new(Shared {
            store: Arc::new(store),
            clock: Arc::new(clock),
            registry: LiveRegistry::new(
                crate::registry::Registry::from_config(&[
                    participant("NL-NRM", "NL"),
                    participant("BE-PAYOKE", "BE"),
                ])
                .unwrap(),
            ),
            streams: Streams::new(4, 1),
            admission: Admission::new(1000, 1000, 0),
            submit_slots: SubmitSlots::new(1, 1 << 20),
            request_slots: RequestSlots::new(16, 2048, Duration::ZERO),
            submitting: Submitting::new(Duration::from_secs(170)),
            limits: LimitsConfig::default(),
            lifecycle: LifecycleConfig::default(),
            broker_name: "test".into(),
            shutting_down,
            metrics: Arc::new(Metrics::new()),
            peer_certs: PeerCerts::default(),
            trust_domain: None,
        })
    }

    pub(crate) fn referral_to(recipient: &str) -> pb::Envelope {
        let payload = b"opaque referral body".to_vec();
        pb::Envelope {
            message_id: MessageId::new_v7().to_string(),
            recipient: recipient.into(),
            kind: pb::MessageKind::Referral as i32,
            case_ref: trmx_proto::CaseRef::new_random().to_string(),
            priority: pb::Priority::Normal as i32,
            created_at: Some(to_timestamp(std::time::SystemTime::now())),
            payload_sha256: trmx_proto::envelope::sha256(&payload).to_vec(),
            payload,
            content_type: Kind::Referral.content_type(),
            ..Default::default()
        }
    }

    /// A recipient's stream with one message of `sender`'s leased to it, registered in
    /// flight (`max_in_flight` 1: its one slot is taken), and its delivery waiting in the
    /// stream's channel to be sent.
    #[derive(Debug)]
    pub(crate) struct InFlight {
        pub(crate) id: MessageId,
        pub(crate) stream: StreamHandle,
        pub(crate) _outbox: Outbox,
        pub(crate) outbound: Outbound,
    }

    impl InFlight {
        pub(crate) async fn new(shared: &Arc<Shared>, sender: &str, recipient: &str) -> Self {
            let (sender, recipient) = (
                ParticipantId::parse(sender).unwrap(),
                ParticipantId::parse(recipient).unwrap(),
            );
            let service = ExchangeService::new(shared.clone());
            let envelope = referral_to(recipient.as_str());
            let id = MessageId::parse(&envelope.message_id).unwrap();
            service
                .submit_inner(
                    &sender,
                    pb::SubmitRequest {
                        envelope: Some(envelope),
                    },
                )
                .await
                .unwrap();
            let (outbox, outbound) = outbound::unreported(1, 1 << 20);
            let stream = shared.streams.open(&recipient, outbox.dropper()).unwrap();
            let now = shared.now();
            let mut leased = shared
                .store
                .lease(&recipient, stream.id, 1, u64::MAX, now)
                .await
                .unwrap();
            assert_eq!(leased.len(), 1);
            let lease = leased.remove(0);
            let deadline = now + 60_000;
            shared.streams.leased(
                &recipient,
                stream.id,
                [Lease {
                    message_id: id,
                    sender: Some(sender),
                    deadline,
                }],
            );
            outbox
                .send(Outgoing {
                    message_id: id,
                    kind: lease.kind,
                    expires_at: lease.expires_at,
                    lease_deadline: deadline,
                    delivery: delivery(lease),
                })
                .await
                .unwrap();
            assert_eq!(shared.streams.free_slots(&recipient, stream.id, 1, now), 0);
            Self {
                id,
                stream,
                _outbox: outbox,
                outbound,
            }
        }

        /// The stream's free slots now, of 1.
        pub(crate) fn free_slots(&self, shared: &Shared) -> usize {
            let participant = &self.stream.participant;
            shared
                .streams
                .free_slots(participant, self.stream.id, 1, shared.now())
        }

        /// The next delivery the connection sends at once, if any.
        pub(crate) fn sent_now(&mut self) -> Option<pb::Delivery> {
            use futures::StreamExt;
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            match self.outbound.poll_next_unpin(&mut cx) {
                std::task::Poll::Ready(Some(Ok(delivery))) => Some(delivery),
                _ => None,
            }
        }
    }

    /// Holds the store's flushes while set: a flush made then waits in the flusher until
    /// [`FlushHold::release`] (its change is applied, not yet durable).
    #[derive(Debug, Clone, Default)]
    pub(crate) struct FlushHold(Arc<(Mutex<(bool, u32)>, Condvar)>);

    impl FlushHold {
        /// The observer to open the store with.
        pub(crate) fn observer(&self) -> FlushObserver {
            let hold = self.clone();
            FlushObserver(Arc::new(move |_| {
                let (lock, changed) = &*hold.0;
                let mut state = lock.lock().unwrap();
                if state.0 {
                    state.1 += 1;
                    changed.notify_all();
                }
                while state.0 {
                    state = changed.wait(state).unwrap();
                }
            }))
        }

        /// Runs `work` (a handler) in a task, waits until a flush is held, and aborts the
        /// task there, like hyper dropping the handler of a client whose deadline passed
        /// while its change was being made durable; then lets the flush go on.
        pub(crate) async fn cancel_during_flush<F>(&self, work: F)
        where
            F: Future + Send + 'static,
            F::Output: Send + 'static,
        {
            self.cancel_while_held(work).await;
            self.release();
        }

        /// [`Self::cancel_during_flush`], but the flush stays held until
        /// [`Self::release`].
        pub(crate) async fn cancel_while_held<F>(&self, work: F)
        where
            F: Future + Send + 'static,
            F::Output: Send + 'static,
        {
            let (lock, changed) = &*self.0;
            *lock.lock().unwrap() = (true, 0);
            let task = tokio::spawn(work);
            {
                let state = lock.lock().unwrap();
                let (state, waited) = changed
                    .wait_timeout_while(state, Duration::from_secs(10), |s| s.1 == 0)
                    .unwrap();
                assert!(!waited.timed_out(), "no flush came: {:?}", *state);
            }
            task.abort();
            match task.await {
                Err(error) => assert!(error.is_cancelled(), "{error}"),
                Ok(_) => {
                    self.release();
                    panic!("the handler was done before its flush")
                }
            }
        }

        /// Lets the held flushes go on.
        pub(crate) fn release(&self) {
            let (lock, changed) = &*self.0;
            lock.lock().unwrap().0 = false;
            changed.notify_all();
        }
    }

    /// Waits (at most 5 s) until `done` holds.
    pub(crate) async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < until, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    /// A call under way when a reload removed its participant notes the certificate
    /// after the reload forgot it: nothing of it may stay, or the participant, added back,
    /// would never have its expiry gauge again (its certificate "known" already).
    #[test]
    fn a_certificate_noted_by_a_call_under_way_at_a_removal_is_gauged_again_when_added_back() {
        let dir = tempfile::tempdir().unwrap();
        let federation = trmx_certs::Federation::create(dir.path(), "trm.test").unwrap();
        let paths = federation.participant("BE-PAYOKE").unwrap();
        let leaf = trmx_certs::load_certs_pem(&paths.cert).unwrap().remove(0);
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let metrics = Metrics::new();
        let certs = PeerCerts::default();
        certs.note(&metrics, &be, leaf.as_ref());
        assert!(
            metrics
                .cert_expiry(CertRole::Participant, "BE-PAYOKE")
                .is_some()
        );
        // the reload that removes it, as `RunningBroker::reload_registry` does it ...
        metrics.forget_participants(std::slice::from_ref(&be));
        certs.forget(std::slice::from_ref(&be));
        // ... and a call that passed the registry before it
        certs.note(&metrics, &be, leaf.as_ref());
        assert_eq!(
            metrics.cert_expiry(CertRole::Participant, "BE-PAYOKE"),
            None
        );
        // added back: its first call records its certificate again
        metrics.register_participants([&be]);
        certs.note(&metrics, &be, leaf.as_ref());
        assert!(
            metrics
                .cert_expiry(CertRole::Participant, "BE-PAYOKE")
                .is_some(),
            "the certificate of a participant added back has no expiry gauge"
        );
    }

    #[test]
    fn reason_codes() {
        for good in ["INVALID_BODY", "UNKNOWN_SCHEMA", "X", &"A".repeat(64)] {
            check_reason_code(good).unwrap();
        }
        for bad in [
            "",
            "invalid",
            "BAD CODE",
            "É",
            &"A".repeat(65),
            "MAX_ATTEMPTS",
            "EXPIRED",
            "PURGED",
        ] {
            assert!(check_reason_code(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn field_paths() {
        for good in [
            "",
            "referral",
            "referral.consent.basis",
            "referral.consent.purposes[2]",
            "envelope.payload_sha256",
            "return_risk_assessment.findings[0].level",
            "payload",
            &format!("{}referral", "referral.".repeat(27)),
        ] {
            check_field_path(good).unwrap();
        }
        for bad in [
            ".a",
            "a.",
            "a..b",
            "a b",
            "a[x]",
            "a[]",
            "name=Jane",
            "referral.person.AminaBello",
            "referral.person.amina_bello",
            "a_b.c1",
            &format!("{}referral", "referral.".repeat(28)),
        ] {
            let err = check_field_path(bad).expect_err(bad).to_string();
            assert!(err.contains("field_path"), "{err}");
            assert!(!err.contains("Amina") && !err.contains("Jane"), "{err}");
        }
    }

    #[test]
    fn fingerprint_ignores_broker_fields_and_payload_bytes_but_not_content() {
        let caller = ParticipantId::parse("NL-NRM").unwrap();
        let base = pb::Envelope {
            message_id: MessageId::new_v7().to_string(),
            recipient: "BE-PAYOKE".into(),
            kind: pb::MessageKind::Referral as i32,
            payload_sha256: vec![1; 32],
            ..Default::default()
        };
        let normal = trmx_proto::envelope::Priority::Normal;
        let a = fingerprint(&base, &caller, normal);
        let mut b = base.clone();
        b.sender = "NL-NRM".into();
        b.priority = pb::Priority::Normal as i32;
        assert_eq!(a, fingerprint(&b, &caller, normal));
        let mut c = base.clone();
        c.payload_sha256 = vec![2; 32];
        assert_ne!(a, fingerprint(&c, &caller, normal));
        let other = ParticipantId::parse("BE-PAYOKE").unwrap();
        assert_ne!(a, fingerprint(&base, &other, normal));
    }

    /// A node whose submit went unanswered (its connection broke while the broker held
    /// the submit) withdraws the message. The submit still held, and a copy that reaches
    /// the service only later, must not store it afterwards, or "the broker never had
    /// it" would be followed by a delivery.
    #[tokio::test]
    async fn a_withdrawal_is_not_overtaken_by_an_earlier_submit_still_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let shared = one_slot_broker(dir.path());
        let service = Arc::new(ExchangeService::new(shared.clone()));
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let envelope = referral_to("BE-PAYOKE");
        let again = envelope.clone();
        let id = MessageId::parse(&envelope.message_id).unwrap();
        // the sender's one write slot is taken: its submit waits for it
        let slot = shared.submit_slots.acquire(&nl).await;
        let submit = tokio::spawn({
            let (service, nl) = (service.clone(), nl.clone());
            async move {
                let request = pb::SubmitRequest {
                    envelope: Some(envelope),
                };
                service.submit_inner(&nl, request).await
            }
        });
        // (the submit runs up to its wait for the slot)
        while shared.submitting.messages() == 0 {
            tokio::task::yield_now().await;
        }
        let withdrawn = service
            .withdraw_inner(
                &nl,
                pb::WithdrawRequest {
                    message_id: id.to_string(),
                },
            )
            .await;
        assert!(
            matches!(withdrawn, Err(BrokerError::NotFound(_))),
            "{withdrawn:?}"
        );
        drop(slot);
        let refused = submit.await.unwrap().unwrap_err();
        assert_eq!(
            refused.error.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(shared.store.status(&nl, id).await.unwrap().is_none());
        let queued: u64 = (shared.store.queue_stats().await.unwrap().iter())
            .map(|q| q.depth + q.in_flight)
            .sum();
        assert_eq!(queued, 0, "nothing queued for the recipient");
        // one more copy of the submit, that reaches the service only now (it was queued
        // on its connection), is refused as well
        let request = pb::SubmitRequest {
            envelope: Some(again),
        };
        let refused = service.submit_inner(&nl, request).await.unwrap_err();
        assert_eq!(refused.error.code(), tonic::Code::FailedPrecondition);
        assert!(shared.store.status(&nl, id).await.unwrap().is_none());
    }

    /// A withdrawal the store refuses (the recipient acknowledged the message already)
    /// refuses no submit: the sender's retry of the stored message (its first answer was
    /// lost) gets its receipt, not "withdrawn by its sender", which would make the
    /// sender's node mark a delivered message `rejected-by-broker`.
    #[tokio::test]
    async fn a_refused_withdrawal_does_not_refuse_the_retry_of_a_stored_message() {
        let dir = tempfile::tempdir().unwrap();
        let shared = one_slot_broker(dir.path());
        let service = Arc::new(ExchangeService::new(shared.clone()));
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let envelope = referral_to("BE-PAYOKE");
        let id = MessageId::parse(&envelope.message_id).unwrap();
        let submit = || pb::SubmitRequest {
            envelope: Some(envelope.clone()),
        };
        // stored; its receipt is lost on the way to the sender's node
        service.submit_inner(&nl, submit()).await.unwrap();
        // delivered and acknowledged by the recipient
        let leased = shared
            .store
            .lease(&be, crate::store::StreamId(1), 10, u64::MAX, shared.now())
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        shared.store.ack(&be, &[id], shared.now()).await.unwrap();
        // the user asks for a withdrawal: too late, the broker says so
        let withdrawn = service
            .withdraw_inner(
                &nl,
                pb::WithdrawRequest {
                    message_id: id.to_string(),
                },
            )
            .await;
        assert!(
            matches!(withdrawn, Err(BrokerError::FailedPrecondition(_))),
            "{withdrawn:?}"
        );
        // the node's submit loop retries the (still queued) message: it must get its
        // receipt (a duplicate), not a refusal that says it was withdrawn
        let retry = service.submit_inner(&nl, submit()).await;
        assert!(
            retry.as_ref().is_ok_and(|r| r.duplicate),
            "retry of a stored, acknowledged message refused: {:?}",
            retry.err().map(|r| r.error)
        );
    }

    /// A recipient's node that rejects a delivery again (its first answer was lost)
    /// gets the same answer, and the rejection is counted once: the dead-letter
    /// figures are what an operator watches for recipients refusing messages.
    #[tokio::test]
    async fn a_repeated_reject_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let shared = one_slot_broker(dir.path());
        let service = ExchangeService::new(shared.clone());
        let (nl, be) = (
            ParticipantId::parse("NL-NRM").unwrap(),
            ParticipantId::parse("BE-PAYOKE").unwrap(),
        );
        let envelope = referral_to("BE-PAYOKE");
        let id = MessageId::parse(&envelope.message_id).unwrap();
        let request = pb::SubmitRequest {
            envelope: Some(envelope),
        };
        service.submit_inner(&nl, request).await.unwrap();
        let leased = shared
            .store
            .lease(&be, crate::store::StreamId(1), 10, u64::MAX, shared.now())
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        let reject = pb::RejectRequest {
            message_id: id.to_string(),
            reason_code: "INVALID_BODY".into(),
            field_path: String::new(),
        };
        for _ in 0..2 {
            service.reject_inner(&be, reject.clone()).await.unwrap();
        }
        let rendered = shared.metrics.render();
        let line = rendered
            .lines()
            .find(|l| l.starts_with("trmx_messages_dead_lettered_total{reason=\"rejected\"}"))
            .unwrap_or_default();
        assert!(line.ends_with(" 1"), "{line:?}");
    }

    /// A recipient's `Ack` whose client goes away while the store makes it durable (its
    /// deadline passed on a slow flush): the message is acknowledged all the same, and
    /// its stream slot must be freed. Held, a stream with `max_in_flight` 1 got nothing
    /// more until the ack timeout, and the retried ack finds the message not in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_whose_caller_goes_away_during_its_flush_frees_the_stream_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (hold, shared) = held_broker(dir.path());
        let service = ExchangeService::new(shared.clone());
        let mut in_flight = InFlight::new(&shared, "NL-NRM", "BE-PAYOKE").await;
        assert!(in_flight.sent_now().is_some(), "delivered");
        let (be, id) = (in_flight.stream.participant.clone(), in_flight.id);
        let acked_before = shared.metrics.render();
        hold.cancel_during_flush(async move {
            let request = pb::AckRequest {
                message_ids: vec![id.to_string()],
            };
            service.ack_inner(&be, request).await
        })
        .await;
        eventually("the stream's slot is freed", || {
            in_flight.free_slots(&shared) == 1
        })
        .await;
        assert_ne!(shared.metrics.render(), acked_before, "the ack is counted");
    }

    /// A recipient's `Reject` whose client goes away during the flush frees the slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reject_whose_caller_goes_away_during_its_flush_frees_the_stream_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (hold, shared) = held_broker(dir.path());
        let service = ExchangeService::new(shared.clone());
        let mut in_flight = InFlight::new(&shared, "NL-NRM", "BE-PAYOKE").await;
        assert!(in_flight.sent_now().is_some(), "delivered");
        let (be, id) = (in_flight.stream.participant.clone(), in_flight.id);
        hold.cancel_during_flush(async move {
            let request = pb::RejectRequest {
                message_id: id.to_string(),
                reason_code: "INVALID_BODY".into(),
                field_path: "referral".into(),
            };
            service.reject_inner(&be, request).await
        })
        .await;
        eventually("the stream's slot is freed", || {
            in_flight.free_slots(&shared) == 1
        })
        .await;
    }

    /// A sender withdraws a misaddressed referral; its client goes away while the
    /// withdrawal is made durable. The message is WITHDRAWN all the same, so the copy
    /// waiting in the recipient's stream must not be sent: the wrong organisation would
    /// get a victim's referral that its sender took back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_withdrawal_whose_caller_goes_away_during_its_flush_still_stops_the_waiting_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (hold, shared) = held_broker(dir.path());
        let service = ExchangeService::new(shared.clone());
        let mut in_flight = InFlight::new(&shared, "NL-NRM", "BE-PAYOKE").await;
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let id = in_flight.id;
        hold.cancel_during_flush({
            let nl = nl.clone();
            async move {
                let request = pb::WithdrawRequest {
                    message_id: id.to_string(),
                };
                service.withdraw_inner(&nl, request).await
            }
        })
        .await;
        eventually("the stream's slot is freed", || {
            in_flight.free_slots(&shared) == 1
        })
        .await;
        let status = shared.store.status(&nl, id).await.unwrap().unwrap();
        assert_eq!(status.state, crate::store::State::Withdrawn);
        assert!(
            in_flight.sent_now().is_none(),
            "a withdrawn message was sent"
        );
    }

    /// A submit whose client goes away while the store makes it durable: the message is
    /// stored all the same, and counted in `trmx_messages_accepted_total` (its retry is a
    /// duplicate, which is not counted: the count would be short for ever).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_submit_whose_caller_goes_away_during_its_flush_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (hold, shared) = held_broker(dir.path());
        let service = ExchangeService::new(shared.clone());
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let envelope = referral_to("BE-PAYOKE");
        let id = MessageId::parse(&envelope.message_id).unwrap();
        hold.cancel_during_flush({
            let nl = nl.clone();
            async move {
                let request = pb::SubmitRequest {
                    envelope: Some(envelope),
                };
                service
                    .submit_inner(&nl, request)
                    .await
                    .map_err(|r| r.error)
            }
        })
        .await;
        let counted = "trmx_messages_accepted_total{kind=\"referral\"} 1";
        eventually("the accepted message is counted", || {
            shared.metrics.render().contains(counted)
        })
        .await;
        assert!(shared.store.status(&nl, id).await.unwrap().is_some());
    }

    /// The same for a withdrawal the store refuses whose flush then fails (answered
    /// `UNAVAILABLE`): the store found the message acknowledged, and the sender's retry of
    /// its submit gets its receipt, not "withdrawn by its sender", which would make the
    /// sender's node mark a delivered message `rejected-by-broker`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_withdrawal_whose_flush_fails_does_not_refuse_the_retry() {
        let dir = tempfile::tempdir().unwrap();
        let (faults, shared) = faulty_broker(dir.path());
        let service = Arc::new(ExchangeService::new(shared.clone()));
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let envelope = referral_to("BE-PAYOKE");
        let id = MessageId::parse(&envelope.message_id).unwrap();
        let submit = || pb::SubmitRequest {
            envelope: Some(envelope.clone()),
        };
        service.submit_inner(&nl, submit()).await.unwrap();
        let leased = shared
            .store
            .lease(&be, crate::store::StreamId(1), 10, u64::MAX, shared.now())
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        shared.store.ack(&be, &[id], shared.now()).await.unwrap();

        faults.set_failing(true);
        let withdrawn = service
            .withdraw_inner(
                &nl,
                pb::WithdrawRequest {
                    message_id: id.to_string(),
                },
            )
            .await;
        assert!(
            matches!(
                withdrawn,
                Err(BrokerError::Store(StoreError::Unavailable(_)))
            ),
            "{withdrawn:?}"
        );
        faults.set_failing(false);
        // (the timer loop's next write, which clears the latch that refuses submits)
        shared
            .stored(shared.store.mark_running(shared.now()).await)
            .unwrap();
        let retry = service.submit_inner(&nl, submit()).await;
        assert!(
            retry.as_ref().is_ok_and(|r| r.duplicate),
            "retry of a stored, acknowledged message refused: {:?}",
            retry.err().map(|r| r.error)
        );
    }

    /// A submit whose flush fails is answered `UNAVAILABLE`, but its write stays (durable
    /// with the next flush) and the message is delivered: the failing call counts it in
    /// `trmx_messages_accepted_total`, since the sender's retry, once the store writes
    /// again, is a duplicate (not `ALREADY_EXISTS`), which is not counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_submit_whose_flush_fails_is_counted_and_its_retry_is_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let (faults, shared) = faulty_broker(dir.path());
        let service = ExchangeService::new(shared.clone());
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let envelope = referral_to("BE-PAYOKE");
        let id = MessageId::parse(&envelope.message_id).unwrap();
        let request = pb::SubmitRequest {
            envelope: Some(envelope),
        };
        let counted = "trmx_messages_accepted_total{kind=\"referral\"} 1";

        faults.set_failing(true);
        let refused = service
            .submit_inner(&nl, request.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused.error,
                BrokerError::Store(StoreError::Unavailable(_))
            ),
            "{:?}",
            refused.error
        );
        assert!(
            shared.metrics.render().contains(counted),
            "the message stored by the failed call is counted"
        );
        faults.set_failing(false);
        // (the timer loop's next write, which clears the latch that refuses submits)
        shared
            .stored(shared.store.mark_running(shared.now()).await)
            .unwrap();
        let retried = service.submit_inner(&nl, request).await.unwrap();
        assert!(retried.duplicate, "{retried:?}");
        assert!(
            shared.metrics.render().contains(counted),
            "counted again by the retry"
        );
        let status = shared.store.status(&nl, id).await.unwrap().unwrap();
        assert_eq!(status.state, store::State::Accepted);
    }

    /// A submit whose client goes away while its write is made durable keeps its
    /// sender's write slot until the write is done: else a sender whose requests time out
    /// writes more at once than its slots allow (and holds more bytes in memory than its
    /// budget), ahead of the other senders.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_submit_whose_caller_goes_away_keeps_its_write_slot_until_written() {
        let dir = tempfile::tempdir().unwrap();
        let (hold, shared) = held_broker(dir.path());
        let service = ExchangeService::new(shared.clone());
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let envelope = referral_to("BE-PAYOKE");
        hold.cancel_while_held({
            let nl = nl.clone();
            async move {
                let request = pb::SubmitRequest {
                    envelope: Some(envelope),
                };
                service
                    .submit_inner(&nl, request)
                    .await
                    .map_err(|r| r.error)
            }
        })
        .await;
        let slot = shared.submit_slots.acquire(&nl);
        tokio::pin!(slot);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let free_while_writing = slot.as_mut().poll(&mut cx).is_ready();
        hold.release();
        assert!(
            !free_while_writing,
            "the sender's one slot is free while its write is under way"
        );
        tokio::time::timeout(Duration::from_secs(5), slot)
            .await
            .expect("the slot is freed once the write is done");
    }
}
