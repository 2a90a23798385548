//! A small hand-written Prometheus registry for the broker.
//!
//! The series names are a contract: `ops/grafana/trmx-broker.json` and
//! `ops/prometheus/alerts.yml` query exactly these, and `ops/check.sh scrape` proves it
//! against a real Prometheus. Labels are bounded: `kind` and every `reason` come from fixed
//! enums (all values are exported from the start, at 0, so `rate()` and `increase()` see the
//! first event), `recipient`/`participant` from the participant registry, `role`/`name` (and
//! `sha256` for a CA) from the certificates the broker holds or has seen.
//!
//! Counters and histograms are atomics (lock-free on the hot path); the per-participant
//! gauges sit behind one `std::sync::Mutex`, never held across an `.await`. Time-derived
//! gauges (oldest message age, seconds until a certificate or the CRL expires, last seen of
//! a connected participant) are stored as instants and computed at render time from the
//! injected [`Clock`], so they never go stale between refreshes.
//!
//! Text exposition format 0.0.4:
//! <https://prometheus.io/docs/instrumenting/exposition_formats/>.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use trmx_proto::{Kind, ParticipantId};
use trmx_transport::HandshakeFailure;

use crate::clock::{Clock, SystemClock};
use crate::store::{Millis, Presence, QueueStats, TickReport};

/// Upper bounds (seconds) of the `trmx_submit_duration_seconds` buckets.
pub const SUBMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Upper bounds (seconds) of the `trmx_store_flush_duration_seconds` buckets.
pub const FLUSH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Why a `Submit` was refused (label `reason` of `trmx_submits_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalReason {
    /// `INVALID_ARGUMENT`: the envelope failed validation.
    InvalidArgument,
    /// `PERMISSION_DENIED`: a foreign sender, a broker-made kind, an operator certificate.
    PermissionDenied,
    /// `NOT_FOUND`: unknown recipient.
    NotFound,
    /// `FAILED_PRECONDITION`: kind not accepted by the recipient, already expired.
    FailedPrecondition,
    /// `ALREADY_EXISTS`: a used message id with different content.
    AlreadyExists,
    /// `RESOURCE_EXHAUSTED`: the sender's queued-bytes quota.
    Quota,
    /// `RESOURCE_EXHAUSTED`: the sender's rate limit.
    Rate,
    /// `RESOURCE_EXHAUSTED`: free disk below the watermark.
    Disk,
    /// `UNAVAILABLE`: the store cannot make writes durable.
    Unavailable,
}

impl RefusalReason {
    /// Every reason, in label order.
    pub const ALL: [RefusalReason; 9] = [
        RefusalReason::InvalidArgument,
        RefusalReason::PermissionDenied,
        RefusalReason::NotFound,
        RefusalReason::FailedPrecondition,
        RefusalReason::AlreadyExists,
        RefusalReason::Quota,
        RefusalReason::Rate,
        RefusalReason::Disk,
        RefusalReason::Unavailable,
    ];

    /// The label value, e.g. `invalid_argument`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::InvalidArgument => "invalid_argument",
            RefusalReason::PermissionDenied => "permission_denied",
            RefusalReason::NotFound => "not_found",
            RefusalReason::FailedPrecondition => "failed_precondition",
            RefusalReason::AlreadyExists => "already_exists",
            RefusalReason::Quota => "quota",
            RefusalReason::Rate => "rate",
            RefusalReason::Disk => "disk",
            RefusalReason::Unavailable => "unavailable",
        }
    }
}

/// An `Exchange` request other than `Submit` (label `method` of
/// `trmx_requests_refused_in_progress_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExchangeMethod {
    /// `Receive` (opening the stream).
    Receive,
    /// `Ack`.
    Ack,
    /// `Reject`.
    Reject,
    /// `Withdraw`.
    Withdraw,
    /// `GetStatus`.
    GetStatus,
    /// `GetInfo`.
    GetInfo,
}

impl ExchangeMethod {
    /// Every method, in label order.
    pub const ALL: [ExchangeMethod; 6] = [
        ExchangeMethod::Receive,
        ExchangeMethod::Ack,
        ExchangeMethod::Reject,
        ExchangeMethod::Withdraw,
        ExchangeMethod::GetStatus,
        ExchangeMethod::GetInfo,
    ];

    /// The label value, e.g. `get_status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeMethod::Receive => "receive",
            ExchangeMethod::Ack => "ack",
            ExchangeMethod::Reject => "reject",
            ExchangeMethod::Withdraw => "withdraw",
            ExchangeMethod::GetStatus => "get_status",
            ExchangeMethod::GetInfo => "get_info",
        }
    }
}

/// Why a message was dead-lettered (label `reason` of `trmx_messages_dead_lettered_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadLetterReason {
    /// The recipient rejected it (never redrivable).
    Rejected,
    /// Delivery attempts exhausted.
    MaxAttempts,
}

impl DeadLetterReason {
    /// Every reason, in label order.
    pub const ALL: [DeadLetterReason; 2] =
        [DeadLetterReason::Rejected, DeadLetterReason::MaxAttempts];

    /// The label value: `rejected` or `max_attempts`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::MaxAttempts => "max_attempts",
        }
    }
}

/// Why a delivery waiting in a `Receive` stream's send buffer was dropped instead of sent
/// (see [`crate::outbound`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Its sender withdrew the message.
    Withdrawn,
    /// An operator purged the message.
    Purged,
    /// The message's lifetime ended (the broker expires it, if it has not yet).
    Expired,
    /// The ack deadline of the message's last attempt passed while the copy waited
    /// (`lifecycle.max_attempts`): dead-lettered, its sender has a non-delivery report.
    DeadLettered,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 4] = [
        DropReason::Withdrawn,
        DropReason::Purged,
        DropReason::Expired,
        DropReason::DeadLettered,
    ];

    /// The label value: `withdrawn`, `purged`, `expired` or `dead_lettered`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Withdrawn => "withdrawn",
            DropReason::Purged => "purged",
            DropReason::Expired => "expired",
            DropReason::DeadLettered => "dead_lettered",
        }
    }
}

/// Whose certificate (label `role` of `trmx_certificate_expiry_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CertRole {
    /// The federation CA.
    Ca,
    /// This broker's server certificate.
    Broker,
    /// A participant's node certificate (as seen on a connection).
    Participant,
    /// An operator's certificate (as seen on a connection).
    Operator,
}

impl CertRole {
    /// The label value: `ca`, `broker`, `participant` or `operator`.
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Ca => "ca",
            CertRole::Broker => "broker",
            CertRole::Participant => "participant",
            CertRole::Operator => "operator",
        }
    }
}

/// A certificate the broker holds itself (one of the CA file, or its own), for
/// [`Metrics::replace_cert_expiries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCert {
    /// Label `name`: the CA's common name (or subject), the broker's name.
    pub name: String,
    /// Label `sha256` ([`sha256_label`] of the certificate), set for CAs: the old and the
    /// new CA of a rollover often have the same name, and each needs a series of its own,
    /// or the one that comes last in the CA file hides the other's expiry.
    pub sha256: Option<String>,
    /// Its `notAfter`.
    pub not_after: SystemTime,
}

/// The `sha256` label of a certificate: the first 16 hex digits (lower case) of the SHA-256
/// of its DER, i.e. of what `openssl x509 -noout -fingerprint -sha256` prints, colons taken
/// out. Enough to tell the few CAs of one file apart, short enough for a dashboard.
pub fn sha256_label(der: &[u8]) -> String {
    trmx_proto::envelope::sha256(der)
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// What `/readyz` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The store makes writes durable (no failed flush latched, disk above the watermark).
    pub store_writable: bool,
    /// The CA and broker certificates are known and none of them has expired.
    pub certificates_valid: bool,
}

impl Readiness {
    /// Whether the broker can take work.
    pub fn is_ready(&self) -> bool {
        self.store_writable && self.certificates_valid
    }
}

/// The `step` labels of `trmx_timer_failures_total`.
const TIMER_STEPS: [&str; 2] = ["tick", "audit_retention"];

/// The broker's metrics. Cheap to update from any task; share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    clock: Arc<dyn Clock>,
    accepted: KindCounters,
    delivered: KindCounters,
    acknowledged: KindCounters,
    redelivered: AtomicU64,
    expired: AtomicU64,
    dead_lettered: [AtomicU64; DeadLetterReason::ALL.len()],
    withdrawn: AtomicU64,
    purged: AtomicU64,
    /// Deliveries dropped from a stream's send buffer unsent, by [`DropReason::ALL`].
    dropped: [AtomicU64; DropReason::ALL.len()],
    refused: [AtomicU64; RefusalReason::ALL.len()],
    /// Failed timer runs, by [`TIMER_STEPS`].
    timer_failures: [AtomicU64; TIMER_STEPS.len()],
    /// Copied from the transport's own counts at every scrape (see
    /// [`Self::set_tls_handshake_failures`]).
    tls_handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Copied from the transport's count at every scrape (see
    /// [`Self::set_request_bytes_refused`]).
    request_bytes_refused: AtomicU64,
    /// Requests refused for their participant's requests in progress, by
    /// [`ExchangeMethod::ALL`].
    in_progress_refused: [AtomicU64; ExchangeMethod::ALL.len()],
    submit_duration: Histogram,
    flush_duration: Histogram,
    store_writable: AtomicBool,
    gauges: Mutex<Gauges>,
}

#[derive(Debug, Default)]
struct KindCounters([AtomicU64; Kind::ALL.len()]);

impl KindCounters {
    fn inc(&self, kind: Kind) {
        if let Some(i) = Kind::ALL.iter().position(|k| *k == kind) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
struct Gauges {
    queues: BTreeMap<String, QueueGauge>,
    participants: BTreeMap<String, ParticipantGauge>,
    /// Participants that left the registry (a reload): a call or a stream's end that was
    /// under way then does not bring their series back.
    departed: BTreeSet<String>,
    /// How many times participants left the registry, and when each last left (that count
    /// then): a stream opened before its participant left ends without counting down the
    /// streams of the participant added back since (see [`OpenStream`]).
    removals: u64,
    removed_at: BTreeMap<String, u64>,
    certs: BTreeMap<CertKey, SystemTime>,
    crl_next_update: Option<SystemTime>,
    /// Whether the CRL record holds the CRL in force (`None`: no CRL).
    crl_recorded: Option<bool>,
    disk: Option<DiskGauge>,
}

/// One series of `trmx_certificate_expiry_seconds`: its labels `role`, `name` and, for a
/// CA, `sha256` (see [`HeldCert::sha256`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CertKey {
    role: CertRole,
    name: String,
    sha256: Option<String>,
}

impl CertKey {
    /// A certificate known by its role and name alone (participants, operators).
    fn named(role: CertRole, name: &str) -> CertKey {
        CertKey {
            role,
            name: name.to_owned(),
            sha256: None,
        }
    }
}

impl Gauges {
    /// The series of `participant`, made if new; `None` once it left the registry.
    fn participant(&mut self, participant: &str) -> Option<&mut ParticipantGauge> {
        if self.departed.contains(participant) {
            return None;
        }
        Some(self.participants.entry(participant.to_owned()).or_default())
    }

    /// Drops the operator certificates that expired more than
    /// [`OPERATOR_CERT_AFTERLIFE`] ago. An operator entry is recorded when an operator
    /// calls, so the one of someone who left (or who was given a certificate under a new
    /// name) would otherwise stay for good, its gauge negative and its expiry alert
    /// firing, with nobody left to renew it. The alert still fires for the 30 days before
    /// and the day after, so the expiry of an operator still at work is seen. (Operator
    /// certificates never count for `/readyz`: the broker serves without them.)
    fn forget_departed_operators(&mut self, now: SystemTime) {
        self.certs.retain(|key, not_after| {
            key.role != CertRole::Operator
                || not_after
                    .checked_add(OPERATOR_CERT_AFTERLIFE)
                    .is_none_or(|gone| now < gone)
        });
    }
}

/// How long the expiry of an operator certificate stays exported after its `not_after`
/// (see `Gauges::forget_departed_operators`).
pub const OPERATOR_CERT_AFTERLIFE: Duration = Duration::from_secs(86_400);

/// The store's disk, as last measured.
#[derive(Debug, Clone, Copy)]
struct DiskGauge {
    free: u64,
    min_free: u64,
    store: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct QueueGauge {
    depth: u64,
    in_flight: u64,
    oldest_accepted_at: Option<Millis>,
    bytes: u64,
}

/// A `Receive` stream counted in `trmx_participant_connected_streams` by
/// [`Metrics::stream_opened`], to be counted down by [`Metrics::stream_closed`].
#[derive(Debug)]
#[must_use = "give it to Metrics::stream_closed when the stream ends"]
pub struct OpenStream {
    /// [`Gauges::removals`] when the stream opened.
    after_removals: u64,
    /// Whether it was counted (not when its participant was out of the registry then).
    counted: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct ParticipantGauge {
    streams: u64,
    last_seen: Option<SystemTime>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every counter at 0, reading time from the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// A registry reading "now" from `clock` (the broker's clock; a manual clock in tests).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            accepted: KindCounters::default(),
            delivered: KindCounters::default(),
            acknowledged: KindCounters::default(),
            redelivered: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            dead_lettered: Default::default(),
            withdrawn: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            dropped: Default::default(),
            refused: Default::default(),
            timer_failures: Default::default(),
            tls_handshake_failures: Default::default(),
            request_bytes_refused: AtomicU64::new(0),
            in_progress_refused: Default::default(),
            submit_duration: Histogram::new(SUBMIT_BUCKETS),
            flush_duration: Histogram::new(FLUSH_BUCKETS),
            store_writable: AtomicBool::new(false),
            gauges: Mutex::new(Gauges::default()),
        }
    }

    /// A new message was made durable (not for a duplicate submit).
    pub fn accepted(&self, kind: Kind) {
        self.accepted.inc(kind);
    }

    /// A delivery was handed to a `Receive` stream's connection (taken from its send
    /// buffer, not dropped there); `attempt` > 1 also counts a redelivery.
    pub fn delivered(&self, kind: Kind, attempt: u32) {
        self.delivered.inc(kind);
        if attempt > 1 {
            self.redelivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The store recorded the recipient's ack of a message (not a repeated ack).
    pub fn acknowledged(&self, kind: Kind) {
        self.acknowledged.inc(kind);
    }

    /// `n` messages expired.
    pub fn expired(&self, n: u64) {
        self.expired.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` messages were dead-lettered for `reason`.
    pub fn dead_lettered(&self, reason: DeadLetterReason, n: u64) {
        let i = DeadLetterReason::ALL.iter().position(|r| *r == reason);
        if let Some(i) = i {
            self.dead_lettered[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The sender withdrew a message.
    pub fn withdrawn(&self) {
        self.withdrawn.fetch_add(1, Ordering::Relaxed);
    }

    /// An operator purged a message.
    pub fn purged(&self) {
        self.purged.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery was dropped from a `Receive` stream's send buffer for `reason`, never
    /// sent (not counted as delivered).
    pub fn dropped(&self, reason: DropReason) {
        let i = DropReason::ALL.iter().position(|r| *r == reason);
        if let Some(i) = i {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A `Submit` was refused for `reason` (nothing stored).
    pub fn refused(&self, reason: RefusalReason) {
        let i = RefusalReason::ALL.iter().position(|r| *r == reason);
        if let Some(i) = i {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A `method` request was refused because its participant's requests in progress
    /// held `limits.max_concurrent_requests_per_participant` or
    /// `limits.max_ack_ids_in_progress_per_participant`.
    pub fn refused_in_progress(&self, method: ExchangeMethod) {
        let i = ExchangeMethod::ALL.iter().position(|m| *m == method);
        if let Some(counter) = i.and_then(|i| self.in_progress_refused.get(i)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the failed TLS handshakes counted by the transport
    /// (`trmx_transport::ServerTls::handshake_failures`, totals since start).
    pub fn set_tls_handshake_failures(&self, counts: &[(HandshakeFailure, u64)]) {
        for (reason, count) in counts {
            let i = HandshakeFailure::ALL.iter().position(|r| r == reason);
            if let Some(counter) = i.and_then(|i| self.tls_handshake_failures.get(i)) {
                counter.store(*count, Ordering::Relaxed);
            }
        }
    }

    /// Takes the requests the transport refused because their identity's requests on
    /// their way in held `limits.max_incoming_request_bytes_per_identity`
    /// (`trmx_transport::RequestBytesLayer::refused`, total since start).
    pub fn set_request_bytes_refused(&self, count: u64) {
        self.request_bytes_refused.store(count, Ordering::Relaxed);
    }

    /// Counts what a store `tick` did: expiries and dead letters by exhausted attempts.
    /// (Redeliveries are counted when the message is handed out again, see [`Self::delivered`].)
    pub fn record_tick(&self, report: &TickReport) {
        self.expired(report.expired);
        self.dead_lettered(DeadLetterReason::MaxAttempts, report.dead_lettered);
        if report.audit_prune_error.is_some() {
            self.timer_failures[1].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A store `tick` failed: its timers (redelivery, expiry, retentions) may not have run.
    pub fn tick_failed(&self) {
        self.timer_failures[0].fetch_add(1, Ordering::Relaxed);
    }

    /// How long a `Submit` took, from request to durable receipt.
    pub fn observe_submit(&self, took: Duration) {
        self.submit_duration.observe(took.as_secs_f64());
    }

    /// How long one store flush (fsync) took.
    pub fn observe_flush(&self, took: Duration) {
        self.flush_duration.observe(took.as_secs_f64());
    }

    /// Whether the store currently makes writes durable (`trmx_store_writable`, `/readyz`).
    /// Starts `false`: the broker sets it once the store is open.
    pub fn set_store_writable(&self, writable: bool) {
        self.store_writable.store(writable, Ordering::Relaxed);
    }

    /// Replaces the per-recipient queue gauges with the store's `queue_stats()`. A recipient
    /// known before but absent now is reset to 0 (its series stays, never a stale value).
    pub fn set_queue(&self, stats: &[QueueStats]) {
        let mut gauges = self.lock();
        for gauge in gauges.queues.values_mut() {
            *gauge = QueueGauge::default();
        }
        for stat in stats {
            gauges.queues.insert(
                stat.recipient.as_str().to_owned(),
                QueueGauge {
                    depth: stat.depth,
                    in_flight: stat.in_flight,
                    oldest_accepted_at: stat.oldest_accepted_at,
                    bytes: stat.bytes,
                },
            );
        }
    }

    /// Exports 0-valued queue and stream series for these participants (the registry), so
    /// dashboards list every participant before its first message.
    pub fn register_participants<'a>(
        &self,
        participants: impl IntoIterator<Item = &'a ParticipantId>,
    ) {
        let mut gauges = self.lock();
        for p in participants {
            gauges.departed.remove(p.as_str());
            gauges.queues.entry(p.as_str().to_owned()).or_default();
            gauges
                .participants
                .entry(p.as_str().to_owned())
                .or_default();
        }
    }

    /// Drops the stream, last-contact and certificate series of `participants`, who left
    /// the registry: kept, a gone participant's "not seen for a day" and certificate
    /// expiry alerts would fire for good. Their queue series stay while messages wait
    /// there to expire.
    pub fn forget_participants(&self, participants: &[ParticipantId]) {
        let mut gauges = self.lock();
        gauges.removals += 1;
        let removal = gauges.removals;
        for p in participants {
            gauges.removed_at.insert(p.as_str().to_owned(), removal);
            gauges.participants.remove(p.as_str());
            gauges
                .certs
                .remove(&CertKey::named(CertRole::Participant, p.as_str()));
            gauges.departed.insert(p.as_str().to_owned());
        }
    }

    /// A `Receive` stream of `participant` opened; give what it returns to
    /// [`Self::stream_closed`] when it ends.
    pub fn stream_opened(&self, participant: &ParticipantId) -> OpenStream {
        let now = self.clock.now();
        let mut gauges = self.lock();
        let after_removals = gauges.removals;
        let counted = match gauges.participant(participant.as_str()) {
            Some(entry) => {
                entry.streams += 1;
                entry.last_seen = Some(entry.last_seen.map_or(now, |seen| seen.max(now)));
                true
            }
            None => false,
        };
        OpenStream {
            after_removals,
            counted,
        }
    }

    /// A `Receive` stream of `participant` closed (`opened`: what [`Self::stream_opened`]
    /// returned for it).
    pub fn stream_closed(&self, participant: &ParticipantId, opened: OpenStream) {
        let now = self.clock.now();
        let mut gauges = self.lock();
        // A stream opened before its participant left the registry was counted in the
        // series dropped then, and one opened while it was out was not counted at all;
        // counted down now, either would take one off the streams of the participant
        // added back since.
        if !opened.counted
            || gauges
                .removed_at
                .get(participant.as_str())
                .is_some_and(|removal| *removal > opened.after_removals)
        {
            return;
        }
        let Some(entry) = gauges.participant(participant.as_str()) else {
            return;
        };
        entry.streams = entry.streams.saturating_sub(1);
        entry.last_seen = Some(entry.last_seen.map_or(now, |seen| seen.max(now)));
    }

    /// `participant` made a call at `at` (last seen only moves forward). While it has an open
    /// stream, it counts as seen "now" at every scrape.
    pub fn seen(&self, participant: &ParticipantId, at: SystemTime) {
        let mut gauges = self.lock();
        let Some(entry) = gauges.participant(participant.as_str()) else {
            return;
        };
        entry.last_seen = Some(entry.last_seen.map_or(at, |seen| seen.max(at)));
    }

    /// When `participant` was last seen (a call, or a stream open or closing), if ever
    /// (read by the `Operator` service).
    pub fn last_seen(&self, participant: &ParticipantId) -> Option<SystemTime> {
        self.lock()
            .participants
            .get(participant.as_str())
            .and_then(|p| p.last_seen)
    }

    /// Every participant seen so far, as the store keeps it across restarts:
    /// seen "now" while it has a stream open, with the `not_after` of the
    /// certificate it last connected with.
    pub fn presence(&self) -> Vec<Presence> {
        let now = self.clock.now();
        let gauges = self.lock();
        gauges
            .participants
            .iter()
            .filter_map(|(name, p)| {
                let seen = if p.streams > 0 {
                    Some(now)
                } else {
                    p.last_seen
                }?;
                let participant = ParticipantId::parse(name).ok()?;
                let cert_not_after = gauges
                    .certs
                    .get(&CertKey::named(CertRole::Participant, name))
                    .map(|at| trmx_proto::time::to_millis(*at));
                Some(Presence {
                    participant,
                    last_seen: trmx_proto::time::to_millis(seen),
                    cert_not_after,
                })
            })
            .collect()
    }

    /// Takes back what [`Self::presence`] gave before a restart (last seen
    /// only moves forward; a certificate seen since is kept).
    pub fn restore_presence(&self, saved: &Presence) {
        let name = saved.participant.as_str();
        let mut gauges = self.lock();
        let entry = gauges.participants.entry(name.to_owned()).or_default();
        let at = trmx_proto::time::from_millis(saved.last_seen);
        entry.last_seen = Some(entry.last_seen.map_or(at, |seen| seen.max(at)));
        if let Some(not_after) = saved.cert_not_after {
            gauges
                .certs
                .entry(CertKey::named(CertRole::Participant, name))
                .or_insert_with(|| trmx_proto::time::from_millis(not_after));
        }
    }

    /// The recorded `not_after` of a certificate, if known (read by the `Operator` service);
    /// the earliest one when several of `role` have that name (CAs of one name).
    pub fn cert_expiry(&self, role: CertRole, name: &str) -> Option<SystemTime> {
        self.lock()
            .certs
            .iter()
            .filter(|(key, _)| key.role == role && key.name == name)
            .map(|(_, not_after)| *not_after)
            .min()
    }

    /// Records the `not_after` of a certificate; the gauge shows the seconds left at scrape time.
    /// `name` is the participant id, the operator or broker name, or the CA's name.
    /// Returns whether it was recorded: not for a participant that left the registry.
    pub fn set_cert_expiry(&self, role: CertRole, name: &str, not_after: SystemTime) -> bool {
        let mut gauges = self.lock();
        if role == CertRole::Participant && gauges.departed.contains(name) {
            return false;
        }
        gauges.certs.insert(CertKey::named(role, name), not_after);
        true
    }

    /// Replaces every certificate of `role` with `certs`: for the certificates the broker
    /// holds itself (the CA file, its own certificate), whose files say all there is. A CA
    /// taken out of the CA file at the end of a rollover, or a broker certificate renewed
    /// under another name, must stop counting: left in, its expiry would turn `/readyz` 503
    /// and raise an alert for a certificate no longer in use, until a restart. Each
    /// certificate is one series (two of one name apart by their `sha256`).
    pub fn replace_cert_expiries(&self, role: CertRole, certs: impl IntoIterator<Item = HeldCert>) {
        let mut gauges = self.lock();
        gauges.certs.retain(|key, _| key.role != role);
        for cert in certs {
            let key = CertKey {
                role,
                name: cert.name,
                sha256: cert.sha256,
            };
            gauges.certs.insert(key, cert.not_after);
        }
    }

    /// Records the store's disk: `free` bytes on its filesystem, the
    /// `min_free` watermark below which submits are refused, and the `store`
    /// bytes of its files.
    pub fn set_disk(&self, free: u64, min_free: u64, store: u64) {
        self.lock().disk = Some(DiskGauge {
            free,
            min_free,
            store,
        });
    }

    /// Records the CRL's `nextUpdate`; the gauge shows the seconds left (negative once stale).
    pub fn set_crl_next_update(&self, next_update: SystemTime) {
        self.lock().crl_next_update = Some(next_update);
    }

    /// Records whether the CRL record could be written at the last try
    /// (`trmx_crl_recorded`).
    pub fn set_crl_recorded(&self, recorded: bool) {
        self.lock().crl_recorded = Some(recorded);
    }

    /// Store writable, and the CA and broker certificates known and unexpired.
    pub fn readiness(&self) -> Readiness {
        let now = self.clock.now();
        let gauges = self.lock();
        let mut ca = false;
        let mut broker = false;
        let mut expired = false;
        for (key, not_after) in &gauges.certs {
            match key.role {
                CertRole::Ca => ca = true,
                CertRole::Broker => broker = true,
                CertRole::Participant | CertRole::Operator => continue,
            }
            expired |= *not_after <= now;
        }
        Readiness {
            store_writable: self.store_writable.load(Ordering::Relaxed),
            certificates_valid: ca && broker && !expired,
        }
    }

    /// The text exposition (format 0.0.4) of every series, as of the clock's now.
    pub fn render(&self) -> String {
        let now = self.clock.now();
        let mut w = Writer::default();

        self.render_kinds(
            &mut w,
            "trmx_messages_accepted_total",
            "Messages made durable on submit (duplicates not counted).",
            &self.accepted,
        );
        self.render_kinds(
            &mut w,
            "trmx_messages_delivered_total",
            "Deliveries handed to a Receive stream's connection (every attempt; not those dropped from its send buffer, see trmx_deliveries_dropped_total).",
            &self.delivered,
        );
        self.render_kinds(
            &mut w,
            "trmx_messages_acknowledged_total",
            "Messages acknowledged by their recipient, each once, when the store records the ack.",
            &self.acknowledged,
        );
        w.family(
            "trmx_messages_redelivered_total",
            "Deliveries after the first attempt.",
            "counter",
        );
        w.sample(
            "trmx_messages_redelivered_total",
            &[],
            load(&self.redelivered),
        );
        w.family(
            "trmx_messages_expired_total",
            "Messages whose lifetime ended before acknowledgement.",
            "counter",
        );
        w.sample("trmx_messages_expired_total", &[], load(&self.expired));
        w.family("trmx_messages_dead_lettered_total", "Messages dead-lettered, by reason (rejected by the recipient, max_attempts exhausted).", "counter");
        for (reason, count) in DeadLetterReason::ALL.iter().zip(&self.dead_lettered) {
            w.sample(
                "trmx_messages_dead_lettered_total",
                &[("reason", reason.as_str())],
                load(count),
            );
        }
        w.family(
            "trmx_messages_withdrawn_total",
            "Messages withdrawn by their sender.",
            "counter",
        );
        w.sample("trmx_messages_withdrawn_total", &[], load(&self.withdrawn));
        w.family(
            "trmx_messages_purged_total",
            "Messages purged by an operator.",
            "counter",
        );
        w.sample("trmx_messages_purged_total", &[], load(&self.purged));
        w.family(
            "trmx_deliveries_dropped_total",
            "Deliveries dropped from a Receive stream's send buffer, never sent, by reason: \
             the message was withdrawn, purged, expired or dead-lettered (its last attempt's \
             ack deadline passed) while they waited.",
            "counter",
        );
        for (reason, count) in DropReason::ALL.iter().zip(&self.dropped) {
            w.sample(
                "trmx_deliveries_dropped_total",
                &[("reason", reason.as_str())],
                load(count),
            );
        }
        w.family(
            "trmx_timer_failures_total",
            "Failed runs of the broker's timers, by step: tick (redeliveries, expiry, \
             retentions) or audit_retention.",
            "counter",
        );
        for (step, count) in TIMER_STEPS.iter().zip(&self.timer_failures) {
            w.sample("trmx_timer_failures_total", &[("step", step)], load(count));
        }
        w.family(
            "trmx_submits_refused_total",
            "Submits refused (nothing stored), by reason.",
            "counter",
        );
        for (reason, count) in RefusalReason::ALL.iter().zip(&self.refused) {
            w.sample(
                "trmx_submits_refused_total",
                &[("reason", reason.as_str())],
                load(count),
            );
        }

        w.family(
            "trmx_tls_handshake_failures_total",
            "TLS handshakes that failed, by reason (no_certificate, bad_certificate, revoked, expired, unknown_ca, stale_crl, client_refused, timeout, other).",
            "counter",
        );
        for (reason, count) in HandshakeFailure::ALL
            .iter()
            .zip(&self.tls_handshake_failures)
        {
            w.sample(
                "trmx_tls_handshake_failures_total",
                &[("reason", reason.as_str())],
                load(count),
            );
        }

        w.family(
            "trmx_requests_refused_request_bytes_total",
            "Requests refused because their identity's requests on their way in held limits.max_incoming_request_bytes_per_identity.",
            "counter",
        );
        w.sample(
            "trmx_requests_refused_request_bytes_total",
            &[],
            load(&self.request_bytes_refused),
        );

        w.family(
            "trmx_requests_refused_in_progress_total",
            "Exchange requests other than Submit refused because their participant's requests in progress held limits.max_concurrent_requests_per_participant or limits.max_ack_ids_in_progress_per_participant, by method.",
            "counter",
        );
        for (method, count) in ExchangeMethod::ALL.iter().zip(&self.in_progress_refused) {
            w.sample(
                "trmx_requests_refused_in_progress_total",
                &[("method", method.as_str())],
                load(count),
            );
        }

        self.submit_duration.render(
            &mut w,
            "trmx_submit_duration_seconds",
            "Time from Submit request to durable receipt.",
        );
        self.flush_duration.render(
            &mut w,
            "trmx_store_flush_duration_seconds",
            "Time of one store flush (fsync).",
        );

        let mut gauges = self.lock();
        gauges.forget_departed_operators(now);
        let now_millis = trmx_proto::time::to_millis(now);
        type QueueField = fn(&QueueGauge, Millis) -> f64;
        let queue_families: [(&str, &str, QueueField); 4] = [
            (
                "trmx_queue_depth",
                "Messages waiting for the recipient (ACCEPTED, due or backing off).",
                |q, _| q.depth as f64,
            ),
            (
                "trmx_queue_in_flight",
                "Messages on a recipient stream, not yet acknowledged.",
                |q, _| q.in_flight as f64,
            ),
            (
                "trmx_queue_oldest_message_age_seconds",
                "Age of the oldest message the recipient has not acknowledged (queued, backing off or in flight; 0 when none).",
                |q, now| {
                    q.oldest_accepted_at
                        .map_or(0.0, |at| now.saturating_sub(at) as f64 / 1000.0)
                },
            ),
            (
                "trmx_queue_bytes",
                "Payload bytes queued for the recipient (ACCEPTED and IN_FLIGHT).",
                |q, _| q.bytes as f64,
            ),
        ];
        for (name, help, field) in queue_families {
            w.family(name, help, "gauge");
            for (recipient, queue) in &gauges.queues {
                w.sample(name, &[("recipient", recipient)], field(queue, now_millis));
            }
        }

        w.family(
            "trmx_participant_connected_streams",
            "Open Receive streams of the participant.",
            "gauge",
        );
        for (participant, p) in &gauges.participants {
            w.sample(
                "trmx_participant_connected_streams",
                &[("participant", participant)],
                p.streams as f64,
            );
        }
        w.family(
            "trmx_participant_last_seen_timestamp_seconds",
            "When the participant last called the broker or had a stream open (Unix seconds).",
            "gauge",
        );
        for (participant, p) in &gauges.participants {
            let seen = if p.streams > 0 {
                Some(now)
            } else {
                p.last_seen
            };
            if let Some(seen) = seen {
                w.sample(
                    "trmx_participant_last_seen_timestamp_seconds",
                    &[("participant", participant)],
                    seconds_between(UNIX_EPOCH, seen),
                );
            }
        }
        w.family(
            "trmx_connected_participants",
            "Participants with at least one open Receive stream.",
            "gauge",
        );
        let connected = gauges
            .participants
            .values()
            .filter(|p| p.streams > 0)
            .count();
        w.sample("trmx_connected_participants", &[], connected as f64);

        w.family(
            "trmx_certificate_expiry_seconds",
            "Seconds until the certificate's not_after (negative once expired). A CA's series \
             also has sha256, the start of its fingerprint: two CAs may share a name.",
            "gauge",
        );
        for (key, not_after) in &gauges.certs {
            let mut labels = vec![("role", key.role.as_str()), ("name", key.name.as_str())];
            if let Some(sha256) = &key.sha256 {
                labels.push(("sha256", sha256));
            }
            w.sample(
                "trmx_certificate_expiry_seconds",
                &labels,
                seconds_between(now, *not_after),
            );
        }
        w.family(
            "trmx_crl_next_update_seconds",
            "Seconds until the loaded CRL's nextUpdate (negative once stale).",
            "gauge",
        );
        if let Some(next_update) = gauges.crl_next_update {
            w.sample(
                "trmx_crl_next_update_seconds",
                &[],
                seconds_between(now, next_update),
            );
        }
        w.family(
            "trmx_crl_recorded",
            "1 when the CRL record in the data directory holds the CRL in force; 0 when it \
             could not be written (after a restart an older CRL would not be refused).",
            "gauge",
        );
        if let Some(recorded) = gauges.crl_recorded {
            w.sample("trmx_crl_recorded", &[], f64::from(u8::from(recorded)));
        }
        for (name, help, value) in [
            (
                "trmx_store_disk_free_bytes",
                "Free bytes on the filesystem of the store (measured every few seconds).",
                gauges.disk.map(|d| d.free),
            ),
            (
                "trmx_store_disk_free_min_bytes",
                "limits.min_free_disk_bytes: below it, submits are refused (0: never).",
                gauges.disk.map(|d| d.min_free),
            ),
            (
                "trmx_store_size_bytes",
                "Bytes of the store's files on disk (shrunk by `trmx-broker store compact`).",
                gauges.disk.map(|d| d.store),
            ),
        ] {
            w.family(name, help, "gauge");
            if let Some(value) = value {
                w.sample(name, &[], value as f64);
            }
        }
        drop(gauges);

        w.family(
            "trmx_clock_offset_seconds",
            "While the broker keeps its own time after a jump of the system clock: how far the system clock is ahead of it (negative: behind). 0 while it follows the system clock.",
            "gauge",
        );
        // (`now` above was read from the clock, so the offset is current)
        let offset = self.clock.held_offset_millis().unwrap_or(0) as f64 / 1000.0;
        w.sample("trmx_clock_offset_seconds", &[], offset);
        w.family(
            "trmx_store_writable",
            "1 while the store makes writes durable, else 0.",
            "gauge",
        );
        w.sample(
            "trmx_store_writable",
            &[],
            f64::from(u8::from(self.store_writable.load(Ordering::Relaxed))),
        );
        w.family(
            "trmx_up",
            "1 while the broker process serves metrics.",
            "gauge",
        );
        w.sample("trmx_up", &[], 1.0);
        w.out
    }

    fn render_kinds(&self, w: &mut Writer, name: &str, help: &str, counters: &KindCounters) {
        w.family(name, help, "counter");
        for (kind, count) in Kind::ALL.iter().zip(&counters.0) {
            w.sample(name, &[("kind", kind.name())], load(count));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gauges> {
        self.gauges.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn load(counter: &AtomicU64) -> f64 {
    counter.load(Ordering::Relaxed) as f64
}

/// Signed seconds from `from` to `to`, rounded to milliseconds.
fn seconds_between(from: SystemTime, to: SystemTime) -> f64 {
    let secs = match to.duration_since(from) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    (secs * 1000.0).round() / 1000.0
}

/// A histogram with fixed upper bounds; bucket counts are kept per bucket (not cumulative)
/// and accumulated at render time.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus the `+Inf` overflow.
    counts: Box<[AtomicU64]>,
    /// `f64` bits of the sum of observations.
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get(i) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        // fetch_update retries until the add lands; the closure never returns None.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    fn render(&self, w: &mut Writer, name: &str, help: &str) {
        w.family(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| format_value(*b));
            w.sample(&bucket, &[("le", &le)], cumulative as f64);
        }
        w.sample(
            &format!("{name}_sum"),
            &[],
            f64::from_bits(self.sum.load(Ordering::Relaxed)),
        );
        // The count is the +Inf bucket, so the two always agree within one scrape.
        w.sample(&format!("{name}_count"), &[], cumulative as f64);
    }
}

/// Writes the text exposition format.
#[derive(Debug, Default)]
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label_value(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }
}

/// `# HELP` text: backslash and line feed escaped.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values: backslash, double quote and line feed escaped.
fn escape_label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value as Go's `strconv.ParseFloat` reads it (`+Inf`, `-Inf`, `NaN`).
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::collections::BTreeSet;

    const START: Millis = 1_750_000_000_000;

    fn registry() -> (Metrics, ManualClock) {
        let clock = ManualClock::at_millis(START);
        (Metrics::with_clock(Arc::new(clock.clone())), clock)
    }

    fn pid(s: &str) -> ParticipantId {
        ParticipantId::parse(s).unwrap()
    }

    /// The lines of `family` (its HELP/TYPE and samples) in the rendered text.
    fn family_lines(text: &str, family: &str) -> Vec<String> {
        text.lines()
            .filter(|line| {
                let name = line
                    .strip_prefix("# HELP ")
                    .or_else(|| line.strip_prefix("# TYPE "))
                    .unwrap_or(line);
                let name = name.split(['{', ' ']).next().unwrap();
                name == family
                    || name
                        .strip_prefix(family)
                        .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn exposition_text_of_a_small_registry_is_exact() {
        let mut w = Writer::default();
        w.family("demo_total", "Demo counter.", "counter");
        w.sample("demo_total", &[("kind", "referral")], 3.0);
        w.sample(
            "demo_total",
            &[("kind", "follow-up"), ("reason", "rate")],
            0.0,
        );
        w.family("demo_gauge", "A gauge.", "gauge");
        w.sample("demo_gauge", &[], -1.5);
        let histogram = Histogram::new(&[0.1, 1.0]);
        histogram.observe(0.05);
        histogram.observe(0.5);
        histogram.observe(2.0);
        histogram.render(&mut w, "demo_seconds", "A histogram.");
        assert_eq!(
            w.out,
            "# HELP demo_total Demo counter.\n\
             # TYPE demo_total counter\n\
             demo_total{kind=\"referral\"} 3\n\
             demo_total{kind=\"follow-up\",reason=\"rate\"} 0\n\
             # HELP demo_gauge A gauge.\n\
             # TYPE demo_gauge gauge\n\
             demo_gauge -1.5\n\
             # HELP demo_seconds A histogram.\n\
             # TYPE demo_seconds histogram\n\
             demo_seconds_bucket{le=\"0.1\"} 1\n\
             demo_seconds_bucket{le=\"1\"} 2\n\
             demo_seconds_bucket{le=\"+Inf\"} 3\n\
             demo_seconds_sum 2.55\n\
             demo_seconds_count 3\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut w = Writer::default();
        w.family("x", "back\\slash and\nnewline \"quoted\"", "gauge");
        w.sample("x", &[("name", "a\"b\\c\nd")], 1.0);
        assert_eq!(
            w.out,
            "# HELP x back\\\\slash and\\nnewline \"quoted\"\n# TYPE x gauge\nx{name=\"a\\\"b\\\\c\\nd\"} 1\n"
        );
        let (metrics, clock) = registry();
        metrics.set_cert_expiry(CertRole::Operator, "ops \"night\"", clock.now());
        assert!(
            metrics
                .render()
                .contains("{role=\"operator\",name=\"ops \\\"night\\\"\"}")
        );
    }

    #[test]
    fn special_values_use_prometheus_spelling() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(0.0005), "0.0005");
        assert_eq!(format_value(1.0), "1");
        assert_eq!(format_value(1e-7), "0.0000001");
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let (metrics, _) = registry();
        for ms in [0.2, 0.5, 0.7, 3.0, 40.0, 2000.0] {
            metrics.observe_submit(Duration::from_secs_f64(ms / 1000.0));
        }
        let lines = family_lines(&metrics.render(), "trmx_submit_duration_seconds");
        let bucket = |le: &str| {
            lines
                .iter()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "trmx_submit_duration_seconds_bucket{{le=\"{le}\"}} "
                    ))
                })
                .unwrap()
                .to_owned()
        };
        assert_eq!(bucket("0.0005"), "2"); // 0.2 ms and exactly 0.5 ms (le is inclusive)
        assert_eq!(bucket("0.001"), "3");
        assert_eq!(bucket("0.005"), "4");
        assert_eq!(bucket("0.05"), "5");
        assert_eq!(bucket("1"), "5");
        assert_eq!(bucket("+Inf"), "6");
        assert_eq!(
            lines.iter().filter(|l| l.contains("_bucket{")).count(),
            SUBMIT_BUCKETS.len() + 1
        );
        assert!(lines.contains(&"trmx_submit_duration_seconds_count 6".to_owned()));
        let sum: f64 = lines
            .iter()
            .find_map(|l| l.strip_prefix("trmx_submit_duration_seconds_sum "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 2.0444).abs() < 1e-9, "{sum}");
        // the buckets never decrease
        let counts: Vec<u64> = lines
            .iter()
            .filter(|l| l.contains("_bucket{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn counters_start_at_zero_for_every_label_value() {
        let (metrics, _) = registry();
        let text = metrics.render();
        for kind in Kind::ALL {
            for family in ["accepted", "delivered", "acknowledged"] {
                let line = format!("trmx_messages_{family}_total{{kind=\"{}\"}} 0", kind.name());
                assert!(text.contains(&line), "{line}");
            }
        }
        for reason in RefusalReason::ALL {
            assert!(text.contains(&format!(
                "trmx_submits_refused_total{{reason=\"{}\"}} 0",
                reason.as_str()
            )));
        }
        assert!(text.contains("trmx_messages_dead_lettered_total{reason=\"rejected\"} 0\n"));
        assert!(text.contains("trmx_messages_dead_lettered_total{reason=\"max_attempts\"} 0\n"));
        for reason in DropReason::ALL {
            assert!(text.contains(&format!(
                "trmx_deliveries_dropped_total{{reason=\"{}\"}} 0\n",
                reason.as_str()
            )));
        }
        for reason in HandshakeFailure::ALL {
            assert!(text.contains(&format!(
                "trmx_tls_handshake_failures_total{{reason=\"{}\"}} 0\n",
                reason.as_str()
            )));
        }
        assert!(text.contains("trmx_up 1\n"));
        assert!(text.contains("trmx_store_writable 0\n"));
        assert!(text.contains("trmx_clock_offset_seconds 0\n"));
        assert!(text.contains("trmx_connected_participants 0\n"));
        assert!(text.contains("trmx_requests_refused_request_bytes_total 0\n"));
        for method in ExchangeMethod::ALL {
            assert!(text.contains(&format!(
                "trmx_requests_refused_in_progress_total{{method=\"{}\"}} 0\n",
                method.as_str()
            )));
        }
        // every family has one HELP and one TYPE line
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, 32);
        assert_eq!(helps, types);
    }

    #[test]
    fn counters_move_as_events_are_recorded() {
        let (metrics, _) = registry();
        metrics.accepted(Kind::Referral);
        metrics.accepted(Kind::Referral);
        metrics.delivered(Kind::Referral, 1);
        metrics.delivered(Kind::Referral, 2);
        metrics.acknowledged(Kind::DeliveryReceipt);
        metrics.refused(RefusalReason::Quota);
        metrics.dead_lettered(DeadLetterReason::Rejected, 1);
        metrics.record_tick(&TickReport {
            expired: 3,
            dead_lettered: 2,
            audit_prune_error: Some("audit record: bad version".to_owned()),
            ..TickReport::default()
        });
        metrics.tick_failed();
        metrics.withdrawn();
        metrics.purged();
        metrics.purged();
        metrics.dropped(DropReason::Expired);
        metrics.dropped(DropReason::Withdrawn);
        metrics.dropped(DropReason::Withdrawn);
        metrics.set_tls_handshake_failures(&[
            (HandshakeFailure::Revoked, 4),
            (HandshakeFailure::Timeout, 1),
        ]);
        let text = metrics.render();
        for line in [
            "trmx_messages_accepted_total{kind=\"referral\"} 2",
            "trmx_messages_accepted_total{kind=\"follow-up\"} 0",
            "trmx_messages_delivered_total{kind=\"referral\"} 2",
            "trmx_messages_redelivered_total 1",
            "trmx_messages_acknowledged_total{kind=\"delivery-receipt\"} 1",
            "trmx_submits_refused_total{reason=\"quota\"} 1",
            "trmx_submits_refused_total{reason=\"rate\"} 0",
            "trmx_messages_dead_lettered_total{reason=\"rejected\"} 1",
            "trmx_messages_dead_lettered_total{reason=\"max_attempts\"} 2",
            "trmx_messages_expired_total 3",
            "trmx_messages_withdrawn_total 1",
            "trmx_messages_purged_total 2",
            "trmx_deliveries_dropped_total{reason=\"withdrawn\"} 2",
            "trmx_deliveries_dropped_total{reason=\"purged\"} 0",
            "trmx_deliveries_dropped_total{reason=\"expired\"} 1",
            "trmx_deliveries_dropped_total{reason=\"dead_lettered\"} 0",
            "trmx_timer_failures_total{step=\"tick\"} 1",
            "trmx_timer_failures_total{step=\"audit_retention\"} 1",
            "trmx_tls_handshake_failures_total{reason=\"revoked\"} 4",
            "trmx_tls_handshake_failures_total{reason=\"timeout\"} 1",
            "trmx_tls_handshake_failures_total{reason=\"unknown_ca\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
    }

    #[test]
    fn queue_gauges_follow_the_store_and_reset_vanished_recipients() {
        let (metrics, clock) = registry();
        metrics.set_queue(&[
            QueueStats {
                recipient: pid("NL-NRM"),
                depth: 3,
                in_flight: 1,
                oldest_accepted_at: Some(START - 90_000),
                bytes: 4096,
            },
            QueueStats {
                recipient: pid("BE-PAYOKE"),
                depth: 1,
                in_flight: 0,
                oldest_accepted_at: None,
                bytes: 10,
            },
        ]);
        clock.advance(Duration::from_millis(500));
        let text = metrics.render();
        assert_eq!(
            family_lines(&text, "trmx_queue_oldest_message_age_seconds")[2..],
            [
                "trmx_queue_oldest_message_age_seconds{recipient=\"BE-PAYOKE\"} 0",
                "trmx_queue_oldest_message_age_seconds{recipient=\"NL-NRM\"} 90.5",
            ]
        );
        assert!(text.contains("trmx_queue_depth{recipient=\"NL-NRM\"} 3\n"));
        assert!(text.contains("trmx_queue_in_flight{recipient=\"NL-NRM\"} 1\n"));
        assert!(text.contains("trmx_queue_bytes{recipient=\"NL-NRM\"} 4096\n"));

        // NL-NRM drained: its series stay, at 0
        metrics.set_queue(&[QueueStats {
            recipient: pid("BE-PAYOKE"),
            depth: 2,
            in_flight: 0,
            oldest_accepted_at: None,
            bytes: 20,
        }]);
        let text = metrics.render();
        for family in [
            "trmx_queue_depth",
            "trmx_queue_in_flight",
            "trmx_queue_oldest_message_age_seconds",
            "trmx_queue_bytes",
        ] {
            assert!(
                text.contains(&format!("{family}{{recipient=\"NL-NRM\"}} 0\n")),
                "{family}"
            );
        }
        assert!(text.contains("trmx_queue_depth{recipient=\"BE-PAYOKE\"} 2\n"));

        metrics.register_participants([&pid("INT-IOM")]);
        assert!(
            metrics
                .render()
                .contains("trmx_queue_depth{recipient=\"INT-IOM\"} 0\n")
        );
    }

    #[test]
    fn participants_streams_and_last_seen() {
        let (metrics, clock) = registry();
        let nl = pid("NL-NRM");
        let be = pid("BE-PAYOKE");
        metrics.seen(&be, trmx_proto::time::from_millis(START - 10_000));
        metrics.seen(&be, trmx_proto::time::from_millis(START - 20_000)); // older: ignored
        let first = metrics.stream_opened(&nl);
        let second = metrics.stream_opened(&nl);
        let third = metrics.stream_opened(&nl);
        metrics.stream_closed(&nl, third);
        clock.advance(Duration::from_secs(60));
        let text = metrics.render();
        let start_secs = START / 1000;
        assert!(text.contains("trmx_participant_connected_streams{participant=\"NL-NRM\"} 2\n"));
        assert!(text.contains("trmx_connected_participants 1\n"));
        // an open stream counts as seen now
        assert!(text.contains(&format!(
            "trmx_participant_last_seen_timestamp_seconds{{participant=\"NL-NRM\"}} {}\n",
            start_secs + 60
        )));
        assert!(text.contains(&format!(
            "trmx_participant_last_seen_timestamp_seconds{{participant=\"BE-PAYOKE\"}} {}\n",
            start_secs - 10
        )));
        assert!(text.contains("trmx_participant_connected_streams{participant=\"BE-PAYOKE\"} 0\n"));

        metrics.stream_closed(&nl, first);
        metrics.stream_closed(&nl, second);
        clock.advance(Duration::from_secs(60));
        let text = metrics.render();
        assert!(text.contains("trmx_participant_connected_streams{participant=\"NL-NRM\"} 0\n"));
        assert!(text.contains("trmx_connected_participants 0\n"));
        assert!(text.contains(&format!(
            "trmx_participant_last_seen_timestamp_seconds{{participant=\"NL-NRM\"}} {}\n",
            start_secs + 60
        )));
    }

    /// A participant removed from the registry with a stream open and added back at once:
    /// the old stream's end does not count down the new one's.
    #[test]
    fn a_stream_of_a_participant_removed_and_added_back_ends_without_counting_the_new_one() {
        let (metrics, _clock) = registry();
        let nl = pid("NL-NRM");
        let streams =
            |n: u64| format!("trmx_participant_connected_streams{{participant=\"NL-NRM\"}} {n}\n");
        metrics.register_participants([&nl]);
        let old = metrics.stream_opened(&nl);
        metrics.forget_participants(std::slice::from_ref(&nl));
        assert!(!metrics.render().contains("participant=\"NL-NRM\""));
        metrics.register_participants([&nl]);
        let new = metrics.stream_opened(&nl);
        assert!(metrics.render().contains(&streams(1)));
        metrics.stream_closed(&nl, old);
        let text = metrics.render();
        assert!(text.contains(&streams(1)), "{text}");
        assert!(text.contains("trmx_connected_participants 1\n"), "{text}");
        metrics.stream_closed(&nl, new);
        assert!(metrics.render().contains(&streams(0)));
        // one that opened while the participant was out of the registry is not counted,
        // so its end does not count down a stream opened after the participant came back
        metrics.forget_participants(std::slice::from_ref(&nl));
        let uncounted = metrics.stream_opened(&nl);
        metrics.register_participants([&nl]);
        let new = metrics.stream_opened(&nl);
        metrics.stream_closed(&nl, uncounted);
        assert!(metrics.render().contains(&streams(1)));
        metrics.stream_closed(&nl, new);
        assert!(metrics.render().contains(&streams(0)));
    }

    #[test]
    fn disk_gauges_appear_once_measured() {
        let (metrics, _) = registry();
        let text = metrics.render();
        assert!(text.contains("# TYPE trmx_store_disk_free_bytes gauge\n"));
        assert!(!text.contains("\ntrmx_store_disk_free_bytes "), "{text}");
        metrics.set_disk(5 << 30, 1 << 30, 123_456);
        let text = metrics.render();
        for line in [
            "trmx_store_disk_free_bytes 5368709120\n",
            "trmx_store_disk_free_min_bytes 1073741824\n",
            "trmx_store_size_bytes 123456\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn certificate_and_crl_gauges_count_down_and_drive_readiness() {
        let (metrics, clock) = registry();
        let now = clock.now();
        assert_eq!(
            metrics.readiness(),
            Readiness {
                store_writable: false,
                certificates_valid: false
            }
        );
        metrics.set_store_writable(true);
        metrics.set_cert_expiry(
            CertRole::Ca,
            "trmx-ca",
            now + Duration::from_secs(86_400 * 3650),
        );
        assert!(
            !metrics.readiness().certificates_valid,
            "no broker certificate yet"
        );
        metrics.set_cert_expiry(CertRole::Broker, "broker-1", now + Duration::from_secs(100));
        metrics.set_cert_expiry(
            CertRole::Participant,
            "NL-NRM",
            now - Duration::from_secs(5),
        );
        metrics.set_crl_next_update(now + Duration::from_secs(30));
        assert!(
            metrics.readiness().is_ready(),
            "an expired participant certificate does not matter"
        );

        clock.advance(Duration::from_secs(40));
        let text = metrics.render();
        assert_eq!(
            family_lines(&text, "trmx_certificate_expiry_seconds")[2..],
            [
                "trmx_certificate_expiry_seconds{role=\"ca\",name=\"trmx-ca\"} 315359960",
                "trmx_certificate_expiry_seconds{role=\"broker\",name=\"broker-1\"} 60",
                "trmx_certificate_expiry_seconds{role=\"participant\",name=\"NL-NRM\"} -45",
            ]
        );
        assert!(text.contains("trmx_crl_next_update_seconds -10\n"));
        assert!(
            !text.lines().any(|l| l.starts_with("trmx_crl_recorded ")),
            "no record state known yet"
        );
        metrics.set_crl_recorded(false);
        assert!(metrics.render().contains("trmx_crl_recorded 0\n"));
        assert!(text.contains("trmx_store_writable 1\n"));

        clock.advance(Duration::from_secs(60));
        assert_eq!(
            metrics.readiness(),
            Readiness {
                store_writable: true,
                certificates_valid: false
            }
        );
        metrics.set_cert_expiry(
            CertRole::Broker,
            "broker-1",
            clock.now() + Duration::from_secs(86_400),
        );
        assert!(
            metrics.readiness().is_ready(),
            "a renewed certificate replaces the old one"
        );
        metrics.set_store_writable(false);
        assert!(!metrics.readiness().is_ready());
    }
    fn held(name: &str, sha256: Option<&str>, not_after: SystemTime) -> HeldCert {
        HeldCert {
            name: name.to_owned(),
            sha256: sha256.map(str::to_owned),
            not_after,
        }
    }

    /// The old and the new CA of a rollover often have the same name. They used to share
    /// one series (and one readiness entry), so the one later in the CA file hid the other:
    /// the old CA could expire without an alert, and without `/readyz` saying so.
    #[test]
    fn two_cas_of_one_name_are_two_series() {
        let (metrics, clock) = registry();
        let now = clock.now();
        metrics.set_store_writable(true);
        metrics.replace_cert_expiries(
            CertRole::Broker,
            [held("broker-1", None, now + Duration::from_secs(86_400))],
        );
        metrics.replace_cert_expiries(
            CertRole::Ca,
            [
                held("trmx-ca", Some("00aa"), now + Duration::from_secs(60)),
                held("trmx-ca", Some("00bb"), now + Duration::from_secs(3600)),
            ],
        );
        let text = metrics.render();
        assert_eq!(
            family_lines(&text, "trmx_certificate_expiry_seconds")[2..],
            [
                "trmx_certificate_expiry_seconds{role=\"ca\",name=\"trmx-ca\",sha256=\"00aa\"} 60",
                "trmx_certificate_expiry_seconds{role=\"ca\",name=\"trmx-ca\",sha256=\"00bb\"} 3600",
                "trmx_certificate_expiry_seconds{role=\"broker\",name=\"broker-1\"} 86400",
            ]
        );
        assert_eq!(
            metrics.cert_expiry(CertRole::Ca, "trmx-ca"),
            Some(now + Duration::from_secs(60)),
            "the earlier of the two"
        );
        assert!(metrics.readiness().is_ready());
        clock.advance(Duration::from_secs(120));
        assert!(
            !metrics.readiness().certificates_valid,
            "the old CA, still in the CA file, has expired"
        );
    }

    #[test]
    fn the_sha256_label_is_the_start_of_the_fingerprint() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1
        assert_eq!(sha256_label(b"abc"), "ba7816bf8f01cfea");
    }

    #[test]
    fn a_replaced_set_of_certificates_forgets_the_ones_left_out() {
        let (metrics, clock) = registry();
        let now = clock.now();
        let years = |n: u64| now + Duration::from_secs(n * 365 * 86_400);
        metrics.set_store_writable(true);
        metrics.replace_cert_expiries(
            CertRole::Ca,
            [
                held("old CA", Some("0a"), now + Duration::from_secs(60)),
                held("new CA", Some("0b"), years(10)),
            ],
        );
        metrics.replace_cert_expiries(CertRole::Broker, [held("broker-1", None, years(1))]);
        // the rollover ends, and the broker's certificate is renewed under a new name
        metrics.replace_cert_expiries(CertRole::Ca, [held("new CA", Some("0b"), years(10))]);
        metrics.replace_cert_expiries(CertRole::Broker, [held("broker-2", None, years(1))]);
        clock.advance(Duration::from_secs(120));
        assert!(
            metrics.readiness().is_ready(),
            "the old CA no longer counts"
        );
        assert_eq!(metrics.cert_expiry(CertRole::Ca, "old CA"), None);
        assert_eq!(metrics.cert_expiry(CertRole::Broker, "broker-1"), None);
        assert!(metrics.cert_expiry(CertRole::Broker, "broker-2").is_some());
    }

    #[test]
    fn an_expired_operator_certificate_is_forgotten_a_day_after_and_never_blocks_readiness() {
        let (metrics, clock) = registry();
        let now = clock.now();
        metrics.set_store_writable(true);
        metrics.set_cert_expiry(
            CertRole::Ca,
            "trmx-ca",
            now + Duration::from_secs(86_400 * 3650),
        );
        metrics.set_cert_expiry(
            CertRole::Broker,
            "broker-1",
            now + Duration::from_secs(86_400 * 365),
        );
        metrics.set_cert_expiry(CertRole::Operator, "alice", now + Duration::from_secs(60));
        metrics.set_cert_expiry(
            CertRole::Participant,
            "NL-NRM",
            now + Duration::from_secs(60),
        );
        let series = |name: &str, role: &str| {
            format!("trmx_certificate_expiry_seconds{{role=\"{role}\",name=\"{name}\"}}")
        };

        clock.advance(Duration::from_secs(120));
        assert!(
            metrics.readiness().is_ready(),
            "an operator's certificate is not the broker's"
        );
        let text = metrics.render();
        assert!(
            text.contains(&format!("{} -60\n", series("alice", "operator"))),
            "{text}"
        );

        // alice left: a day after her certificate expired, it is no longer exported
        clock.advance(OPERATOR_CERT_AFTERLIFE);
        let text = metrics.render();
        assert!(!text.contains(&series("alice", "operator")), "{text}");
        assert_eq!(metrics.cert_expiry(CertRole::Operator, "alice"), None);
        // a participant stays in the registry: its expired certificate still alerts
        assert!(text.contains(&series("NL-NRM", "participant")), "{text}");
        assert!(metrics.readiness().is_ready());
    }

    /// The names in `text` that look like metric families (`trmx_…`), a histogram's
    /// series folded into their family, crate names (log targets) left out.
    fn metric_names(text: &str) -> BTreeSet<String> {
        const CRATES: [&str; 7] = [
            "trmx_broker",
            "trmx_node",
            "trmx_proto",
            "trmx_certs",
            "trmx_transport",
            "trmx_durable",
            "trmx_tests",
        ];
        let mut names = BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("trmx_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            let name = tail[..end].trim_end_matches('_');
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            if !CRATES.contains(&family) {
                names.insert(family.to_owned());
            }
            rest = &tail[end..];
        }
        names
    }

    /// ops/README.md's table is the operator's reference of what `/metrics` holds, and the
    /// alert rules and the dashboard are useless on a family the broker does not export (a
    /// rule on a missing series evaluates fine and never fires, so `ops/check.sh` cannot
    /// tell): the docs and the code must name the same families.
    #[test]
    fn every_exported_family_is_documented() {
        let (metrics, _clock) = registry();
        let exported: BTreeSet<String> = metrics
            .render()
            .lines()
            .filter_map(|line| line.strip_prefix("# HELP "))
            .filter_map(|line| line.split(' ').next())
            .map(str::to_owned)
            .collect();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let read = |path: &str| {
            std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let ops_readme = read("ops/README.md");
        let table: BTreeSet<String> = ops_readme
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|line| line.split('`').next())
            .filter(|name| name.starts_with("trmx_"))
            .map(str::to_owned)
            .collect();
        let undocumented: Vec<_> = exported.difference(&table).collect();
        assert!(
            undocumented.is_empty(),
            "exported but missing from ops/README.md's table of metrics: {undocumented:?}"
        );
        for path in [
            "ops/README.md",
            "ops/prometheus/alerts.yml",
            "ops/prometheus/alerts_test.yml",
            "ops/grafana/trmx-broker.json",
            "README.md",
            "ARCHITECTURE.md",
        ] {
            let missing: Vec<_> = metric_names(&read(path))
                .into_iter()
                .filter(|name| !exported.contains(name))
                .collect();
            assert!(
                missing.is_empty(),
                "{path} names metrics the broker does not export: {missing:?}"
            );
        }
    }
}
