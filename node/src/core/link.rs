//! The link to the broker: the receive loop (connect, `GetInfo`, one
//! `Receive` stream, store-then-ack) and the submit loop (queued entries in
//! order, retries with jittered exponential backoff).
//!
//! Both loops stop when the shutdown signal changes. Neither ever logs a
//! payload or a body field: only participants, message ids, kinds, states
//! and gRPC codes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt as _;
use prost::Message;
use tokio::sync::watch;
use tonic::Code;
use tracing::{debug, error, info, warn};
use trmx_proto::envelope::check_delivery;
use trmx_proto::pb::exchange_client::ExchangeClient;
use trmx_proto::time::{Date, from_timestamp, to_millis};
use trmx_proto::{Kind, MessageId, ParticipantId, ValidationError, pb};

use super::channel::{LinkChannel, Outdated};
use super::store::{Content, IdUse, Incoming, OtherAnswer, ReceiptEffect, Stored};
use super::{
    Body, BodyContext, Failure, Inner, Millis, MoveRefused, NodeError, OutboxState,
    ParticipantInfo, Said, say_again,
};

/// Queued entries read per round of the submit loop.
const SUBMIT_BATCH: usize = 32;

/// Jittered exponential backoff ("equal jitter": half fixed, half random).
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next wait: `min · 2^attempt` capped at `max`, of which a random
    /// half is dropped.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.attempt = self.attempt.saturating_add(1);
        let full = self.min.saturating_mul(factor).min(self.max);
        let half = full / 2;
        let random = uuid::Uuid::new_v4().as_u128();
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if nanos == 0 {
            0
        } else {
            u64::try_from(random % u128::from(nanos)).unwrap_or(0)
        };
        half + Duration::from_nanos(jitter)
    }
}

/// Waits `delay`; `false` when shutdown came first.
async fn pause(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = shutdown.changed() => false,
    }
}

/// A broker error for operators: the gRPC code, the message and every cause
/// under it (`Unknown: transport error: …: invalid peer certificate: …`):
/// tonic says only "transport error" for a connection that failed, and the
/// cause (refused, DNS, certificate) is in the source chain. A TLS error
/// that means the peer does not speak TLS gets [`NOT_TLS_HINT`].
pub(crate) fn status_text(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    push_causes(&mut text, status.source());
    broker_text(&text)
}

/// The message of a broker's `status`, as [`broker_text`] makes it fit for a log line,
/// a record and an API answer.
pub(crate) fn broker_message(status: &tonic::Status) -> String {
    broker_text(status.message())
}

/// The most of a broker's text (an error message, a name of its registry) that the
/// node keeps, logs or shows: bytes of the text as shown (escapes included), before the
/// note that says it was cut.
const MAX_BROKER_TEXT: usize = 1024;

/// Text the broker sent (a status message, its registry's names, an id in an answer),
/// made fit for a log line, an outbox record, an API answer and a terminal: a broken or
/// hostile broker must not forge log lines (a line break), drive the terminal of whoever
/// reads them (escape sequences), turn text around (bidirectional overrides), or fill the
/// log and the store (a message of megabytes). Control and bidirectional-formatting
/// characters are written as escapes (`\n`, `\u{1b}`), and the text is cut once what
/// is shown of it would pass [`MAX_BROKER_TEXT`] bytes, saying so. The bound is on what
/// is shown, not on what came: an escape takes up to ten bytes for one character, and a
/// bound of 1,024 characters let out some 10 KB.
pub(crate) fn broker_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_BROKER_TEXT));
    let mut buf = [0u8; 4];
    for (shown, c) in text.chars().enumerate() {
        // (Unicode's Bidi_Control characters, U+061C among them; and the line and
        // paragraph separators, which are no control characters but end a line in
        // editors, log viewers and JSON readers: a forged log line all the same)
        let bidi = matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        let breaks_line = matches!(c, '\u{2028}' | '\u{2029}');
        let escaped;
        let part: &str = if c.is_control() || bidi || breaks_line {
            escaped = c.escape_default().to_string();
            &escaped
        } else {
            c.encode_utf8(&mut buf)
        };
        if out.len() + part.len() > MAX_BROKER_TEXT {
            out.push_str(&format!(
                "… (cut: {} more characters)",
                text.chars().count() - shown
            ));
            break;
        }
        out.push_str(part);
    }
    out
}

/// Said after the TLS error of a peer that answered in plain text, such as
/// the broker's admin endpoint (HTTP).
const NOT_TLS_HINT: &str = "is broker.address the broker's gRPC/TLS port, not its admin port?";

/// Appends `cause` and each of its sources to `text`, each after `: `; one
/// whose text the line holds already (hyper, io and tonic repeat their inner
/// error) is left out.
fn push_causes(text: &mut String, mut cause: Option<&(dyn std::error::Error + 'static)>) {
    let mut not_tls = false;
    while let Some(error) = cause {
        not_tls |= is_not_tls(error);
        let part = error.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = error.source();
    }
    if not_tls {
        text.push_str(" (");
        text.push_str(NOT_TLS_HINT);
        text.push(')');
    }
}

/// Whether `error` is rustls' "received corrupt message of type
/// InvalidContentType": the first bytes the peer sent were not a TLS record.
fn is_not_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        rustls_error(error),
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
        ))
    )
}

/// `error` as a rustls error, bare or inside an `io::Error` (as tokio-rustls hands it on).
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    error.downcast_ref::<rustls::Error>().or_else(|| {
        error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })
}

/// Whether a call about one message (a submit, a withdrawal) refused with `code` can
/// never succeed: a bad field, an unknown recipient or message, a kind not accepted, an
/// expiry passed, an id used for other content, a size over the limits.
///
/// A refusal of the caller says nothing about the message: `PERMISSION_DENIED` (the
/// participant is not, or not yet, in the broker's registry; the node never sends what
/// only the broker may), `UNAUTHENTICATED`, or `UNIMPLEMENTED` (a proxy's answer, or not a
/// trmx broker at that address). Taken as final, it would fail every queued message
/// in turn, for good, for a registry entry deployed a little late. The node retries
/// those as for a broker out of reach, and its log says why.
pub(crate) fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
    )
}

/// The field path at the start of a broker error message (`field: rule`),
/// if it looks like one.
fn field_path_of(message: &str) -> String {
    match message.split_once(": ") {
        Some((path, _))
            if !path.is_empty()
                && path.len() <= MAX_RECEIPT_PATH
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._[]".contains(&b)) =>
        {
            path.to_owned()
        }
        _ => String::new(),
    }
}

impl Inner {
    pub(super) fn set_error(&self, error: String) {
        let mut last = self
            .link
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = Some(error);
    }

    /// Connected: the last error is over (a status read while connected must not
    /// report an outage that ended).
    fn set_connected(&self, connected: bool) {
        if connected {
            *self
                .link
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        self.link.connected.store(connected, Ordering::SeqCst);
    }

    /// Keeps the broker's registry and its envelope limit of a `GetInfo` answer.
    pub(super) fn cache_broker_info(&self, info: &pb::BrokerInfo) {
        let limit = info.limits.as_ref().map_or(0, |l| l.max_envelope_bytes);
        self.link.max_envelope_bytes.store(limit, Ordering::SeqCst);
        let list: Vec<ParticipantInfo> = info
            .participants
            .iter()
            .filter_map(participant_info)
            .collect();
        let mut cached = self
            .link
            .participants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *cached = Some(list);
    }
}

pub(crate) fn participant_info(p: &pb::Participant) -> Option<ParticipantInfo> {
    let id = ParticipantId::parse(&p.id).ok()?;
    let organisation_type = match pb::OrganisationType::try_from(p.organisation_type) {
        Ok(pb::OrganisationType::Nrm) => "nrm",
        Ok(pb::OrganisationType::Ngo) => "ngo",
        Ok(pb::OrganisationType::Authority) => "authority",
        Ok(pb::OrganisationType::InternationalOrganisation) => "international-organisation",
        Ok(pb::OrganisationType::ReturnCounselling) => "return-counselling",
        _ => "unspecified",
    };
    Some(ParticipantInfo {
        id,
        display_name: broker_text(&p.display_name),
        country: broker_text(&p.country),
        organisation_type: organisation_type.to_owned(),
        accepts: p.accepts.iter().filter_map(|k| Kind::from_pb(*k)).collect(),
    })
}

// ---- receive ----------------------------------------------------------------

/// How often a broker connection failure that persists is logged again.
pub(crate) const FAILURE_REPEAT: Duration = Duration::from_secs(300);

/// Which broker connection failures reach the log at WARN: the first, each
/// one that differs from the failure logged before (or is about another message:
/// [`FailureLog::failed_about`]), and the same one again every [`FAILURE_REPEAT`] —
/// enough for `journalctl` to show why the node is cut off without a line per
/// reconnect attempt. Every failure is counted, and the count is logged when the link
/// works again.
#[derive(Debug, Default)]
pub(crate) struct FailureLog {
    /// The failure logged last, and when.
    logged: Option<(String, Instant)>,
    /// Failures since the link last worked.
    failures: u64,
}

impl FailureLog {
    /// Counts a failure at `now`; `true` when it is to be logged. Failures that differ in
    /// their numbers only are the same one (rustls says how long ago a certificate expired,
    /// as of the attempt).
    pub(crate) fn failed(&mut self, error: &str, now: Instant) -> bool {
        self.failed_about("", error, now)
    }

    /// [`Self::failed`] of a failure about `subject` (the message a submit failed for):
    /// the same failure about another subject is a new one, to be logged (and the
    /// submit loop writes it to that message's record then).
    pub(crate) fn failed_about(&mut self, subject: &str, error: &str, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let digitless: String = error.chars().filter(|c| !c.is_ascii_digit()).collect();
        let key = format!("{subject}\n{digitless}");
        let due = match &self.logged {
            None => true,
            Some((last, at)) => *last != key || now.duration_since(*at) >= FAILURE_REPEAT,
        };
        if due {
            self.logged = Some((key, now));
        }
        due
    }

    /// Failures since the link last worked.
    pub(crate) fn failures(&self) -> u64 {
        self.failures
    }

    /// The link works: the failures before (0 if none), forgotten.
    pub(crate) fn recovered(&mut self) -> u64 {
        self.logged = None;
        std::mem::take(&mut self.failures)
    }
}

/// How long a `Receive` stream must last (or carry one delivery) before the link counts
/// as working again: the backoff starts over, and the failures before are logged as over.
/// (At most `reconnect_max`: a stream that outlasts the longest backoff is a working link.)
const STREAM_PROVEN: Duration = Duration::from_secs(10);

/// The receive stream has proved itself: the backoff starts over, and the failures
/// before it are over.
fn link_works(inner: &Inner, failures: &mut FailureLog, backoff: &mut Backoff) {
    backoff.reset();
    let failed = failures.recovered();
    if failed > 0 {
        info!(participant = %inner.config.participant, failures = failed, "connected to broker again");
    }
}

/// Records a broker connection failure for `status` and logs it as
/// [`FailureLog`] decides (every one at DEBUG).
fn link_failed(inner: &Inner, failures: &mut FailureLog, what: &'static str, error: String) {
    let me = &inner.config.participant;
    if failures.failed(&error, Instant::now()) {
        warn!(participant = %me, error = %error, failures = failures.failures(), "{what}");
    } else {
        debug!(participant = %me, error = %error, failures = failures.failures(), "{what}");
    }
    inner.set_error(error);
}

/// How a `Receive` stream ended.
enum StreamEnd {
    /// Shutdown.
    Stop,
    /// It broke, or the broker ended it: reconnect after the backoff.
    Failed,
    /// The link moved to a new connection (the node certificate changed): reopen
    /// at once on it.
    Moved,
    /// A delivery could not be stored: reconnect once the store can flush again.
    StoreFailed,
}

/// What the receive loop says when a delivery cannot be stored.
const STORE_FAILED: &str =
    "delivery not stored; receiving stops until the node's store can write again";

/// After a delivery could not be stored: waits, with the reconnect backoff, until a flush
/// of the store succeeds; `false` at shutdown. The receive stream stays closed meanwhile:
/// the broker counts every delivery a node's stream takes and does not acknowledge as a
/// failed attempt, so a node that reconnected while its disk fails would take each of
/// its messages through its attempts to a dead letter (and its sender a non-delivery
/// report) in minutes, though nothing is wrong with them. Closed, the stream costs each
/// delivery it held one attempt. What was committed before the flush failed is made
/// durable by the flush that succeeds, and its redelivery is acknowledged as a duplicate.
async fn wait_for_store(
    inner: &Inner,
    backoff: &mut Backoff,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        if !pause(backoff.next_delay(), shutdown).await {
            return false;
        }
        if inner.store.flush_async().await.is_ok() {
            debug!(participant = %inner.config.participant, "the node's store can write again: receiving again");
            return true;
        }
    }
}

/// Connects, refreshes the participant cache, then consumes one `Receive`
/// stream until it breaks; reconnects with backoff until shutdown. When the
/// link moves to a new connection (`moves` changes), the stream is ended
/// between two deliveries and opened again at once on the new one.
pub(crate) async fn receive_loop(
    inner: Arc<Inner>,
    mut client: ExchangeClient<LinkChannel>,
    mut moves: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = inner.config.participant.clone();
    let mut backoff = Backoff::new(inner.config.reconnect_min, inner.config.reconnect_max);
    let mut failures = FailureLog::default();
    loop {
        if *shutdown.borrow() {
            break;
        }
        // (a move from here on ends the stream opened below: it may be on the old
        // connection)
        let generation = *moves.borrow_and_update();
        let Some(info) = bounded(
            &inner,
            client.get_info(pb::GetInfoRequest {}),
            &mut shutdown,
        )
        .await
        else {
            break;
        };
        match info {
            Ok(info) => {
                let info = info.into_inner();
                if info.caller != me.as_str() {
                    warn!(participant = %me, broker_caller = %broker_text(&info.caller), "broker sees this node under another participant id");
                }
                inner.cache_broker_info(&info);
                let limit = info.limits.as_ref().map_or(0, |l| l.max_envelope_bytes);
                client = client.max_decoding_message_size(delivery_limit(limit));
                let receiving = client.receive(pb::ReceiveRequest {
                    max_in_flight: inner.config.max_in_flight,
                });
                let Some(receiving) = bounded(&inner, receiving, &mut shutdown).await else {
                    break;
                };
                match receiving {
                    Ok(stream) => {
                        inner.set_connected(true);
                        if failures.failures() == 0 {
                            info!(participant = %me, "connected to broker");
                        }
                        // The broker is reachable: let the submit loop retry now.
                        inner.submit_wake.notify_one();
                        // The link works once the stream has carried a delivery or lasted
                        // STREAM_PROVEN: a stream the broker (or this node's store) ends at
                        // once is a failure like any other, with the backoff growing and
                        // one WARN, not a reconnect and three log lines every half second.
                        let mut proven = false;
                        let proving =
                            tokio::time::sleep(STREAM_PROVEN.min(inner.config.reconnect_max));
                        tokio::pin!(proving);
                        let mut stream = stream.into_inner();
                        let end = loop {
                            tokio::select! {
                                _ = shutdown.changed() => break StreamEnd::Stop,
                                // (the watch's borrow ends here, not after the drain)
                                Ok(()) = moves.wait_for(|now| *now != generation).map(|moved| moved.map(drop)) => {
                                    // Drain: what has reached the node already is
                                    // stored and acknowledged before the stream ends
                                    // (the broker counts a delivery unacknowledged on
                                    // a closed stream as a failed attempt); the rest
                                    // is delivered again, and the inbox's dedup keeps
                                    // it once, as after any reconnect.
                                    let window = inner.config.max_in_flight;
                                    let mut end = StreamEnd::Moved;
                                    for _ in 0..window {
                                        let Some(Ok(Some(delivery))) = stream.message().now_or_never() else {
                                            break;
                                        };
                                        match handle_delivery(&inner, &mut client, delivery, &mut shutdown).await {
                                            Ok(Handled::Done) => {}
                                            Ok(Handled::NoAnswer) => {
                                                link_failed(&inner, &mut failures, NO_ANSWER, no_answer(&inner));
                                                break;
                                            }
                                            Ok(Handled::Stop) => {
                                                end = StreamEnd::Stop;
                                                break;
                                            }
                                            Err(e) => {
                                                link_failed(&inner, &mut failures, STORE_FAILED, format!("store: {e}"));
                                                end = StreamEnd::StoreFailed;
                                                break;
                                            }
                                        }
                                    }
                                    break end;
                                }
                                () = &mut proving, if !proven => {
                                    proven = true;
                                    link_works(&inner, &mut failures, &mut backoff);
                                }
                                item = stream.message() => match item {
                                    Ok(Some(delivery)) => {
                                        match handle_delivery(&inner, &mut client, delivery, &mut shutdown).await {
                                            Ok(Handled::Done) => {}
                                            Ok(Handled::NoAnswer) => {
                                                link_failed(&inner, &mut failures, NO_ANSWER, no_answer(&inner));
                                                break StreamEnd::Failed;
                                            }
                                            Ok(Handled::Stop) => break StreamEnd::Stop,
                                            Err(e) => {
                                                link_failed(&inner, &mut failures, STORE_FAILED, format!("store: {e}"));
                                                break StreamEnd::StoreFailed;
                                            }
                                        }
                                        if !proven {
                                            proven = true;
                                            link_works(&inner, &mut failures, &mut backoff);
                                        }
                                    }
                                    Ok(None) => {
                                        link_failed(&inner, &mut failures, "the broker ended the receive stream", "receive stream closed by the broker".into());
                                        break StreamEnd::Failed;
                                    }
                                    Err(status) => {
                                        link_failed(&inner, &mut failures, "connection to the broker broken", status_text(&status));
                                        break StreamEnd::Failed;
                                    }
                                },
                            }
                        };
                        drop(stream);
                        inner.set_connected(false);
                        match end {
                            StreamEnd::Stop => break,
                            StreamEnd::Moved => {
                                debug!(participant = %me, "receive stream ended: the link moved to a new connection");
                                continue;
                            }
                            StreamEnd::Failed if proven => {
                                info!(participant = %me, "disconnected from broker");
                            }
                            StreamEnd::Failed => {}
                            StreamEnd::StoreFailed => {
                                if !wait_for_store(&inner, &mut backoff, &mut shutdown).await {
                                    break;
                                }
                                continue;
                            }
                        }
                    }
                    Err(status) => link_failed(
                        &inner,
                        &mut failures,
                        "broker refused the receive stream",
                        status_text(&status),
                    ),
                }
            }
            Err(status) => link_failed(
                &inner,
                &mut failures,
                "cannot connect to the broker",
                status_text(&status),
            ),
        }
        if !pause(backoff.next_delay(), &mut shutdown).await {
            break;
        }
    }
    inner.set_connected(false);
}

/// Room for the rest of a `Delivery` besides its envelope's bytes (the attempt, the
/// framing of the fields).
const DELIVERY_OVERHEAD: usize = 64 << 10;

/// The most a delivery read from the broker may hold: its envelopes may be as large
/// as its `limits.max_envelope_bytes` (0: not said), which it may set above the node's
/// [`super::MAX_DELIVERY_BYTES`] (up to 64 MiB). Below that, every delivery over the
/// node's limit broke the stream without a word about which message: the broker gave
/// it again at once, and it held the queue up at every reconnect until its attempts
/// ran out. Read, it is checked and rejected with a reason like any other. (At most
/// [`MAX_DELIVERY_CEILING`]: a broker's limit says how much memory one delivery may
/// take here.)
pub(crate) fn delivery_limit(broker_max_envelope_bytes: u64) -> usize {
    usize::try_from(broker_max_envelope_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(DELIVERY_OVERHEAD)
        .clamp(super::MAX_DELIVERY_BYTES, MAX_DELIVERY_CEILING)
}

/// The largest delivery the node reads, whatever the broker's limit.
const MAX_DELIVERY_CEILING: usize = (64 << 20) + DELIVERY_OVERHEAD;

/// The link's error when the broker did not answer an ack or a reject.
fn no_answer(inner: &Inner) -> String {
    format!(
        "no answer to an ack or a reject within {} ms",
        inner.config.broker_answer_timeout.as_millis()
    )
}

/// Why a delivery is refused, as sent in `Reject`.
fn reject_reason(e: &ValidationError) -> &'static str {
    match e.field.as_str() {
        "envelope.payload_sha256" => "DIGEST_MISMATCH",
        "envelope.kind" | "envelope.content_type" => "UNKNOWN_SCHEMA",
        _ => "INVALID_ENVELOPE",
    }
}

/// How a delivery was dealt with ([`handle_delivery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Stored and acknowledged, or rejected (or the broker refused the call: it
    /// delivers the message again).
    Done,
    /// The broker did not answer the ack or the reject within
    /// `broker_answer_timeout`: the link is to reconnect.
    NoAnswer,
    /// The shutdown came while the node waited for the broker's answer.
    Stop,
}

/// What the receive loop says when the broker does not answer an ack or a reject.
const NO_ANSWER: &str = "the broker did not answer an ack or a reject in time; reconnecting";

/// Why a call to the broker ended without its answer at shutdown.
const SHUTTING_DOWN: &str = "the node is shutting down";

/// Why a call to the broker ended without its answer ([`within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// No answer within the time allowed.
    NoAnswer,
    /// The shutdown came first.
    Shutdown,
}

/// `call`, waited for at most `limit` (`None`: as long as it takes) and not past the
/// shutdown: a broker that takes a call and does not answer must not hold the loop
/// that made it, nor the shutdown (which waits for every loop).
async fn within<F: std::future::Future>(
    call: F,
    limit: Option<Duration>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<F::Output, Cut> {
    let answer = async {
        match limit {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| Cut::NoAnswer),
            None => Ok(call.await),
        }
    };
    tokio::select! {
        answer = answer => answer,
        Ok(_) = shutdown.wait_for(|down| *down) => Err(Cut::Shutdown),
    }
}

/// A call that opens the link (`GetInfo`, `Receive`) or that the submit loop and the
/// outbox check make on their own (`Withdraw` of a pending withdrawal, `GetStatus`),
/// [`within`] `broker_answer_timeout`: no answer is `DEADLINE_EXCEEDED`, a failure like
/// any other (the loop tries again later); `None` at shutdown.
async fn bounded<T>(
    inner: &Inner,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Result<tonic::Response<T>, tonic::Status>> {
    let limit = inner.config.broker_answer_timeout;
    match within(call, Some(limit), shutdown).await {
        Ok(answer) => Some(answer),
        Err(Cut::NoAnswer) => Some(Err(tonic::Status::deadline_exceeded(format!(
            "the broker did not answer within {} ms",
            limit.as_millis()
        )))),
        Err(Cut::Shutdown) => None,
    }
}

/// A call to the broker about one delivery (its ack or its reject), [`within`]
/// `broker_answer_timeout`.
async fn answer_of<T>(
    inner: &Inner,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Result<T, tonic::Status>, Handled> {
    within(call, Some(inner.config.broker_answer_timeout), shutdown)
        .await
        .map(|answer| answer.map(tonic::Response::into_inner))
        .map_err(|cut| match cut {
            Cut::NoAnswer => Handled::NoAnswer,
            Cut::Shutdown => Handled::Stop,
        })
}

async fn reject(
    client: &mut ExchangeClient<LinkChannel>,
    inner: &Inner,
    message_id: &str,
    reason_code: &str,
    field_path: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Handled {
    let me = &inner.config.participant;
    // (the id as delivered: one that is none, refused by `check_delivery`, is any text
    // that a broken broker relayed, and not for the log)
    let message_id_shown = shown_id(message_id);
    let message_id_shown = message_id_shown.as_str();
    warn!(participant = %me, message_id = %message_id_shown, reason_code, field_path, "rejecting delivery");
    let request = pb::RejectRequest {
        message_id: message_id.to_owned(),
        reason_code: reason_code.to_owned(),
        field_path: field_path.to_owned(),
    };
    let first = answer_with_room(inner, shutdown, || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.reject(request).await }
    })
    .await;
    let mut result = match first {
        Ok(result) => result,
        Err(handled) => return handled,
    };
    // A path the broker will not take must not leave the message in flight
    // (and its sender uninformed): reject it again without the path.
    if let Err(status) = &result
        && status.code() == tonic::Code::InvalidArgument
        && !request.field_path.is_empty()
    {
        warn!(participant = %me, message_id = %message_id_shown, "broker refused the field path, rejecting without it");
        let again = client.reject(pb::RejectRequest {
            field_path: String::new(),
            ..request
        });
        result = match answer_of(inner, again, shutdown).await {
            Ok(result) => result,
            Err(handled) => return handled,
        };
    }
    if let Err(status) = result {
        warn!(participant = %me, message_id = %message_id_shown, code = ?status.code(), "reject failed");
    }
    Handled::Done
}

/// The pauses before asking again for an ack or a reject the broker refused with
/// `RESOURCE_EXHAUSTED` (its limit of requests in progress per participant, whose wait
/// is 250 ms by default): about 3.5 s in all, well inside any ack timeout.
pub(crate) const ROOM_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// [`answer_of`] the call `call` makes, asked again after each of [`ROOM_RETRY_DELAYS`]
/// while the broker refuses it for want of room (the participant has its share of
/// requests in progress there). An ack or a reject left to the broker's redelivery after
/// the ack timeout would count an attempt towards dead-lettering the message (and a
/// rejected one would then reach its sender as `MAX_ATTEMPTS`, not with its reason).
async fn answer_with_room<T, F, Fut>(
    inner: &Inner,
    shutdown: &mut watch::Receiver<bool>,
    call: F,
) -> Result<Result<T, tonic::Status>, Handled>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut answer = answer_of(inner, call(), shutdown).await;
    for delay in ROOM_RETRY_DELAYS {
        if !matches!(&answer, Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted) {
            break;
        }
        if !pause(delay, shutdown).await {
            return Err(Handled::Stop);
        }
        answer = answer_of(inner, call(), shutdown).await;
    }
    answer
}

async fn ack(
    client: &mut ExchangeClient<LinkChannel>,
    inner: &Inner,
    message_id: MessageId,
    shutdown: &mut watch::Receiver<bool>,
) -> Handled {
    let me = &inner.config.participant;
    let request = pb::AckRequest {
        message_ids: vec![message_id.to_string()],
    };
    let answer = answer_with_room(inner, shutdown, || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.ack(request).await }
    })
    .await;
    match answer {
        Ok(Ok(response)) => {
            // (what the answer says of this id, and nothing else: a broken broker's
            // answer of a million outcomes must not become a million log lines)
            let asked = message_id.to_string();
            let result = response
                .results
                .iter()
                .find(|outcome| outcome.message_id == asked)
                .map(|outcome| outcome.result);
            match result.map(pb::AckResult::try_from) {
                Some(Ok(pb::AckResult::Acknowledged)) => {}
                // The broker's record of the message went final while this node stored
                // it: the node keeps what it stored (the broker's redrive of it would be
                // the same message), but the two sides now tell different stories, and
                // only an operator can square them with the sender.
                Some(Ok(pb::AckResult::NotFound)) => {
                    warn!(participant = %me, message_id = %message_id, "ack not applied: the broker no longer had this delivery in flight (it expired, or was dead-lettered, withdrawn or purged, while this node stored it); the message is kept here, though its sender may have been told it was not delivered");
                }
                _ => {
                    warn!(participant = %me, message_id = %message_id, result = ?result, outcomes = response.results.len(), "ack not applied");
                }
            }
        }
        Ok(Err(status)) => {
            // The broker redelivers; the dedup index makes that harmless.
            warn!(participant = %me, message_id = %message_id, code = ?status.code(), "ack failed");
        }
        Err(handled) => return handled,
    }
    Handled::Done
}

/// What to do with one delivery.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Refuse it for good (`Reject`); nothing is stored.
    Reject {
        /// The message id as delivered.
        message_id: String,
        /// `INVALID_BODY`, `UNKNOWN_SCHEMA`, `DIGEST_MISMATCH`, `INVALID_ENVELOPE`,
        /// `DUPLICATE_MESSAGE_ID`.
        reason_code: &'static str,
        /// The offending field path; never a value.
        field_path: String,
    },
    /// Stored before: acknowledge only.
    Duplicate(MessageId),
    /// A valid application message: store, then acknowledge.
    Store(Box<Incoming>),
    /// A receipt: apply to the outbox, then acknowledge.
    Receipt {
        /// The receipt's own id (what is acknowledged).
        receipt_id: MessageId,
        /// Its kind.
        kind: Kind,
        /// The original message.
        original: MessageId,
        /// `None` for a delivery receipt.
        failure: Option<Failure>,
        /// When the outcome happened.
        at: u64,
    },
    /// Nothing to act on (no envelope at all).
    Ignore,
}

/// The rejection of a delivery whose id is another message's here (see
/// [`IdUse::Taken`]): reason code and field path.
const ID_TAKEN: (&str, &str) = ("DUPLICATE_MESSAGE_ID", "envelope.message_id");

fn reject_verdict(message_id: &str, reason_code: &'static str, field_path: &str) -> Verdict {
    Verdict::Reject {
        message_id: message_id.to_owned(),
        reason_code,
        field_path: field_path.to_owned(),
    }
}

/// How far a delivery's `created_at` (the sender's clock) may be ahead of its
/// `accepted_at` (the broker's clock) and of its arrival here (this node's), whichever
/// is later. The broker does not check `created_at`, and the node
/// judges the body as of that day, files the message in its case's timeline by it, and
/// takes the follow-up made last by it: one made "in 2099" by a sender whose clock is
/// wrong would pass date rules it breaks, sort after every later message of its case,
/// and stand for ever as its sender's latest follow-up (the next ones never replacing
/// it, its `next_follow_up_due` due for good). It is rejected, and its sender learns
/// why (`envelope.created_at`).
const MAX_CREATED_AHEAD: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks one delivery (envelope, recipient, digest, body schema, dedup)
/// and says what to do with it. Errors are store failures.
pub(crate) async fn classify(
    inner: &Arc<Inner>,
    envelope: Option<pb::Envelope>,
) -> Result<Verdict, NodeError> {
    let me = inner.config.participant.clone();
    let Some(mut envelope) = envelope else {
        return Ok(Verdict::Ignore);
    };
    // `accepted_at` is the broker's to set: a delivery without it (or with one that is
    // no instant) is the broker's defect, not the sender's, and rejecting it would
    // dead-letter the sender's message and send it a non-delivery report for nothing.
    // It is taken as accepted on arrival here (which only the `created_at` check and
    // the inbox's record use), and the broker's defect is said.
    if envelope
        .accepted_at
        .as_ref()
        .is_none_or(|ts| from_timestamp(ts).is_err())
    {
        warn!(participant = %me, message_id = %shown_id(&envelope.message_id), "delivery without a valid accepted_at (a broker defect): taken as accepted on arrival");
        envelope.accepted_at = Some(trmx_proto::time::to_timestamp(inner.clock.now()));
    }
    // Stored before is checked first, before the envelope's checks too: a message this
    // node stored is acknowledged again whatever a check of this version (added or
    // tightened since it was stored) says of its envelope, or whatever a damaged
    // redelivery of it looks like; rejected, it would be dead-lettered and its sender
    // told that it never arrived. Its envelope's digest field says which content it is.
    if let Some(verdict) = stored_before(inner, &envelope).await? {
        return Ok(verdict);
    }
    let checked = match check_delivery(&envelope) {
        Ok(checked) => checked,
        Err(e) => {
            return Ok(reject_verdict(
                &envelope.message_id,
                reject_reason(&e),
                &e.field,
            ));
        }
    };
    let id = checked.message_id;
    if checked.recipient != me {
        return Ok(reject_verdict(
            &envelope.message_id,
            "INVALID_ENVELOPE",
            "envelope.recipient",
        ));
    }
    let Some(sender) = checked.sender.clone() else {
        return Ok(classify_receipt(inner, id, checked.kind, &envelope.payload));
    };

    // Stored before is checked first: a message this node stored (and acknowledged, or
    // meant to) is acknowledged again whatever a check added or tightened since says
    // of it; rejected, it would be dead-lettered and its sender told it never arrived.
    let digest = payload_digest(&envelope);
    let store = inner.store.clone();
    let dup_sender = sender.clone();
    let delivered = content_of(&envelope);
    match inner
        .blocking(move || store.id_use(&dup_sender, id, Content::of_envelope(&delivered)))
        .await?
    {
        IdUse::New => {}
        IdUse::Stored => return Ok(Verdict::Duplicate(id)),
        IdUse::Conflict => {
            conflict_said(inner, id, &sender);
            let (reason_code, field_path) = ID_TAKEN;
            return Ok(reject_verdict(
                &envelope.message_id,
                reason_code,
                field_path,
            ));
        }
        IdUse::Taken => {
            let (reason_code, field_path) = ID_TAKEN;
            return Ok(reject_verdict(
                &envelope.message_id,
                reason_code,
                field_path,
            ));
        }
    }

    // (a sender's clock a little ahead is fine; years ahead is not. Ahead of the
    // broker's and of this node's: a broker whose clock is behind must not make every
    // message look made in the future)
    if checked
        .accepted_at
        .max(inner.clock.now())
        .checked_add(MAX_CREATED_AHEAD)
        .is_some_and(|latest| checked.created_at > latest)
    {
        return Ok(reject_verdict(
            &envelope.message_id,
            "INVALID_ENVELOPE",
            "envelope.created_at",
        ));
    }

    // An answer to our request from its recipient belongs to the request's case (the
    // sender's node refuses any other, `check_reply`): filed in another case, it would
    // mark the request answered while the case's timeline shows no answer, and take
    // that other case's retention.
    if let (Some(answered), Some(asks)) = (checked.in_reply_to, checked.kind.answers()) {
        let store = inner.store.clone();
        let request = inner.blocking(move || store.outbox_entry(answered)).await?;
        if request.is_some_and(|r| {
            r.recipient == sender && r.kind == asks && r.case_ref != checked.case_ref
        }) {
            return Ok(reject_verdict(
                &envelope.message_id,
                "INVALID_ENVELOPE",
                "envelope.case_ref",
            ));
        }
    }

    // (the media type as `check_delivery` read it: before any `;`, trimmed)
    let media = envelope
        .content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    let body = if media == "application/json" {
        match std::str::from_utf8(&envelope.payload) {
            Ok(text) => Body::from_json(checked.kind, text),
            Err(_) => Err(ValidationError::new(
                Body::root(checked.kind),
                "is not UTF-8 JSON",
            )),
        }
    } else {
        Body::decode(checked.kind, &envelope.payload)
    };
    let body = match body.and_then(|body| {
        // Judge the body as of the day its sender made it, so that time
        // spent in the broker's queue does not make it invalid.
        let ctx = BodyContext {
            in_reply_to: checked.in_reply_to,
            today: Date::of(checked.created_at),
        };
        body.validate(&ctx).map(|()| body)
    }) {
        Ok(body) => body,
        Err(e) => {
            return Ok(reject_verdict(
                &envelope.message_id,
                "INVALID_BODY",
                &e.field,
            ));
        }
    };
    Ok(Verdict::Store(Box::new(Incoming {
        message_id: id,
        sender,
        kind: checked.kind,
        case_ref: checked.case_ref,
        in_reply_to: checked.in_reply_to,
        priority: checked.priority,
        created_at: to_millis(checked.created_at),
        accepted_at: to_millis(checked.accepted_at),
        received_at: to_millis(inner.clock.now()),
        body: body.encode(),
        due: body.respond_by().or_else(|| body.next_follow_up_due()),
        retain_until: body.retain_until(),
        payload_sha256: digest,
        content_type: envelope.content_type,
    })))
}

/// What to do with a delivery whose sender's message with its id this node stored
/// before, read from the envelope as delivered, before any check of it: acknowledge it
/// again when it is that message (`IdUse::Stored`: the same payload digest and every
/// other field [`Content`] names), reject it when it is other content under that id
/// (`IdUse::Conflict`, as a payload of another digest: the stored one is kept). `None`
/// for one whose sender or id is none, or that is not stored.
async fn stored_before(
    inner: &Arc<Inner>,
    envelope: &pb::Envelope,
) -> Result<Option<Verdict>, NodeError> {
    let (Ok(id), Ok(sender)) = (
        MessageId::parse(&envelope.message_id),
        ParticipantId::parse(&envelope.sender),
    ) else {
        return Ok(None);
    };
    let store = inner.store.clone();
    let delivered = content_of(envelope);
    let asked = sender.clone();
    let used = inner
        .blocking(move || store.id_use(&asked, id, Content::of_envelope(&delivered)))
        .await?;
    Ok(match used {
        IdUse::Stored => Some(Verdict::Duplicate(id)),
        IdUse::Conflict => {
            conflict_said(inner, id, &sender);
            let (reason_code, field_path) = ID_TAKEN;
            Some(reject_verdict(
                &envelope.message_id,
                reason_code,
                field_path,
            ))
        }
        IdUse::New | IdUse::Taken => None,
    })
}

/// The fields of `envelope` that [`Content::of_envelope`] reads, without its payload (a
/// copy to hand to the store's thread).
fn content_of(envelope: &pb::Envelope) -> pb::Envelope {
    pb::Envelope {
        payload_sha256: envelope.payload_sha256.clone(),
        kind: envelope.kind,
        case_ref: envelope.case_ref.clone(),
        in_reply_to: envelope.in_reply_to.clone(),
        priority: envelope.priority,
        created_at: envelope.created_at,
        content_type: envelope.content_type.clone(),
        ..Default::default()
    }
}

/// The payload digest of a delivery that `check_delivery` passed (its
/// `payload_sha256` is the payload's).
fn payload_digest(envelope: &pb::Envelope) -> [u8; trmx_proto::envelope::DIGEST_LEN] {
    <[u8; trmx_proto::envelope::DIGEST_LEN]>::try_from(envelope.payload_sha256.as_slice())
        .unwrap_or_else(|_| trmx_proto::envelope::sha256(&envelope.payload))
}

/// A message id as delivered, for the log: one that is none is any text a broken broker
/// relayed, and not for the log.
fn shown_id(message_id: &str) -> String {
    MessageId::parse(message_id)
        .map_or_else(|_| "(not a message id)".to_owned(), |id| id.to_string())
}

/// Says that `sender`'s message `id`, stored here, came again with other content (another
/// payload or any other field [`Content`] names; the log names none of them: a case
/// reference may be personal data): the
/// stored one is kept (the inbox, its answers and the application have it), the other
/// is rejected (`DUPLICATE_MESSAGE_ID`), so that its sender learns that it was not
/// taken rather than getting a delivery receipt for content never stored. No digest
/// and no content in the log: the id and the sender tell an operator which message.
fn conflict_said(inner: &Inner, id: MessageId, sender: &ParticipantId) {
    warn!(participant = %inner.config.participant, message_id = %id, sender = %sender, "a delivery under the id of a message of this sender stored here has other content: the stored message is kept, the delivery rejected (a sender reusing an id, or a broken broker)");
}

fn outcome_name(outcome: pb::Outcome) -> &'static str {
    match outcome {
        pb::Outcome::Unspecified => "unspecified",
        pb::Outcome::Delivered => "delivered",
        pb::Outcome::Expired => "expired",
        pb::Outcome::RejectedByRecipient => "rejected-by-recipient",
        pb::Outcome::DeadLettered => "dead-lettered",
        pb::Outcome::Purged => "purged",
    }
}

/// Checks a receipt (a broker-made delivery) and says what to do with it: its body must
/// decode, name a message and an outcome that agrees with its kind, and its own id must
/// be the one the broker derives from those two (UUIDv5 of the original id and the
/// outcome, DESIGN.md §3): a receipt under any other id is not one the broker made for
/// a message of this node (a broken broker's, or one relayed from elsewhere), and is
/// rejected before it moves an outbox entry. Its `at` is the broker's instant of the
/// outcome; one that is none, or further ahead than [`MAX_CREATED_AHEAD`] of this node's
/// clock, is taken as the arrival here (the outcome is true, its time is not), and said.
/// Not of the delivery's `accepted_at`, as a message's `created_at` is: the broker makes
/// a receipt's `at` and `accepted_at` from one reading of its clock, so a broker whose
/// clock is days ahead would pass such a bound with both.
fn classify_receipt(inner: &Inner, receipt_id: MessageId, kind: Kind, payload: &[u8]) -> Verdict {
    let rid = receipt_id.to_string();
    let Ok(receipt) = pb::Receipt::decode(payload) else {
        return reject_verdict(&rid, "INVALID_BODY", "receipt");
    };
    let Ok(original) = MessageId::parse(&receipt.message_id) else {
        return reject_verdict(&rid, "INVALID_BODY", "receipt.message_id");
    };
    let outcome = match pb::Outcome::try_from(receipt.outcome) {
        Ok(pb::Outcome::Unspecified) | Err(_) => {
            return reject_verdict(&rid, "INVALID_BODY", "receipt.outcome");
        }
        Ok(outcome) => outcome,
    };
    // (the envelope's kind and the receipt's outcome say the same, or the receipt
    // says nothing that can be trusted: a non-delivery report saying DELIVERED
    // must not mark the message delivered)
    if (kind == Kind::DeliveryReceipt) != (outcome == pb::Outcome::Delivered) {
        return reject_verdict(&rid, "INVALID_BODY", "receipt.outcome");
    }
    if MessageId::receipt_for(original, outcome) != receipt_id {
        warn!(participant = %inner.config.participant, receipt_id = %receipt_id, message_id = %original, receipt_kind = %kind, "a receipt whose id is not the one the broker derives from the message and outcome it names (a broken broker): rejected, the outbox unchanged");
        return reject_verdict(&rid, "INVALID_BODY", "receipt.message_id");
    }
    let failure = failure_of(inner, receipt_id, &receipt, outcome);
    let now = inner.clock.now();
    let latest = now.checked_add(MAX_CREATED_AHEAD);
    let at = match receipt.at.as_ref().map(from_timestamp) {
        Some(Ok(at)) if latest.is_some_and(|latest| at <= latest) => at,
        Some(_) => {
            warn!(participant = %inner.config.participant, receipt_id = %receipt_id, message_id = %original, receipt_kind = %kind, "a receipt whose time is no instant or far ahead of this node's clock: its outcome is taken as of its arrival");
            now
        }
        None => now,
    };
    Verdict::Receipt {
        receipt_id,
        kind,
        original,
        failure,
        at: to_millis(at),
    }
}

/// Longest field path kept from a receipt (the broker's limit on a `Reject`'s).
const MAX_RECEIPT_PATH: usize = 256;

/// Whether `code` is a reason code as the broker takes one in a `Reject`:
/// `[A-Z0-9_]{1,64}`.
fn is_reason_code(code: &str) -> bool {
    (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// What a report of `outcome` (a receipt, or the broker's status as one) makes of the
/// outbox entry: `None` for a delivery, else the failure with its checked reason.
fn failure_of(
    inner: &Inner,
    receipt_id: MessageId,
    receipt: &pb::Receipt,
    outcome: pb::Outcome,
) -> Option<Failure> {
    (outcome != pb::Outcome::Delivered).then(|| {
        let (reason_code, field_path) = receipt_reason(inner, receipt_id, receipt);
        Failure {
            outcome: outcome_name(outcome).to_owned(),
            reason_code,
            field_path,
        }
    })
}

/// The reason code and field path of a non-delivery report, as kept in the outbox
/// and logged: each only if it is what the contract says it is (a code, a path of
/// schema names), else left out. They come from the recipient's `Reject`, through
/// the broker; a broker that let other text through (a value of the body, a line
/// break) must not put it in this node's outbox, API answers and log.
fn receipt_reason(inner: &Inner, receipt_id: MessageId, receipt: &pb::Receipt) -> (String, String) {
    let code_ok = receipt.reason_code.is_empty() || is_reason_code(&receipt.reason_code);
    let path_ok = receipt.field_path.is_empty()
        || (receipt.field_path.len() <= MAX_RECEIPT_PATH
            && trmx_proto::schema::is_field_path(&receipt.field_path));
    if !code_ok || !path_ok {
        warn!(
            participant = %inner.config.participant,
            message_id = %receipt_id,
            reason_code_left_out = !code_ok,
            field_path_left_out = !path_ok,
            "non-delivery report with a reason code or field path that is none; left out"
        );
    }
    (
        if code_ok {
            receipt.reason_code.clone()
        } else {
            String::new()
        },
        if path_ok {
            receipt.field_path.clone()
        } else {
            String::new()
        },
    )
}

/// Stores a delivery (flushed) and wakes the watchers.
pub(crate) async fn store_delivery(
    inner: &Arc<Inner>,
    incoming: Incoming,
) -> Result<Stored, NodeError> {
    let store = inner.store.clone();
    let stored = inner
        .blocking(move || store.store_incoming(&incoming))
        .await?;
    flush_inbox(inner).await?;
    Ok(stored)
}

/// Flushes the store, then tells the watchers (and the listings and the status)
/// that every inbox entry committed before the flush is durable: also one whose
/// own flush failed earlier, which its redelivery finds stored. Without that it
/// would stay hidden, though acknowledged, until the next new delivery.
pub(crate) async fn flush_inbox(inner: &Arc<Inner>) -> Result<(), NodeError> {
    let store = inner.store.clone();
    let committed = inner.blocking(move || store.inbox_mark()).await?;
    inner.store.flush_async().await?;
    // (flushes run side by side: one that read an older mark must not take the
    // newer one back; inbox entries are never removed, so the count only grows
    // with the seq)
    inner.durable_inbox.send_if_modified(|durable| {
        let raised = committed.last_seq > durable.last_seq;
        if raised {
            *durable = committed;
        }
        raised
    });
    Ok(())
}

/// Applies a receipt to the outbox (flushed); one that contradicts the message's first
/// final report is said at WARN, the first time.
///
/// Said before the flush: the record of the contradiction is written (so that the same
/// receipt again is not said again) before it is durable, and said after, a flush that
/// failed (the receipt not acknowledged, and redelivered to find it recorded) or a crash
/// between the two would leave it never said. Said before, a crash before the flush says
/// it once more when the receipt comes again: at least once across a crash, once
/// otherwise.
pub(crate) async fn store_receipt(
    inner: &Arc<Inner>,
    original: MessageId,
    failure: Option<Failure>,
    at: u64,
) -> Result<ReceiptEffect, NodeError> {
    let me = &inner.config.participant;
    let outcome = failure
        .as_ref()
        .map_or_else(|| "delivered".to_owned(), |f| f.outcome.clone());
    let store = inner.store.clone();
    let effect = inner
        .blocking(move || store.apply_receipt(original, failure, at))
        .await?;
    // (said here, not by the caller: a receipt and a settle from the broker's status
    // both come this way)
    match effect {
        ReceiptEffect::DeliveredDespiteWithdrawal => {
            warn!(participant = %me, message_id = %original, "a message withdrawn here was delivered: its recipient's node stored it before the withdrawal took effect on the broker (or the broker's store was restored from before it); its entry shows delivered");
        }
        // (once per message and outcome: its record keeps that it was said)
        ReceiptEffect::Contradicted { state, first: true } => {
            warn!(participant = %me, message_id = %original, outcome = %outcome, state = %state, "a report of the broker (a receipt, or its status) contradicts the first final report of this message (a broken broker, or a damaged broker store): the first report stands and keeps the entry's state; the entry lists the contradiction (`trmx-node show`)");
        }
        ReceiptEffect::Contradicted {
            state,
            first: false,
        } => {
            debug!(participant = %me, message_id = %original, outcome = %outcome, state = %state, "a receipt contradicts the first final report of this message again");
        }
        _ => {}
    }
    inner.store.flush_async().await?;
    Ok(effect)
}

/// Checks, stores (flushed), then acknowledges one delivery; or rejects it.
/// Errors are store failures: the delivery is neither acked nor rejected,
/// and the broker will redeliver it.
async fn handle_delivery(
    inner: &Arc<Inner>,
    client: &mut ExchangeClient<LinkChannel>,
    delivery: pb::Delivery,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Handled, NodeError> {
    let me = inner.config.participant.clone();
    Ok(match classify(inner, delivery.envelope).await? {
        Verdict::Ignore => {
            warn!(participant = %me, "delivery without envelope ignored");
            Handled::Done
        }
        Verdict::Reject {
            message_id,
            reason_code,
            field_path,
        } => {
            reject(
                client,
                inner,
                &message_id,
                reason_code,
                &field_path,
                shutdown,
            )
            .await
        }
        Verdict::Duplicate(id) => {
            // stored before, but that store's flush may have failed: ack only
            // what is durable now, and show it from then on
            flush_inbox(inner).await?;
            info!(participant = %me, message_id = %id, "duplicate delivery acknowledged");
            ack(client, inner, id, shutdown).await
        }
        Verdict::Store(incoming) => {
            let id = incoming.message_id;
            let sender = incoming.sender.clone();
            match store_delivery(inner, *incoming).await? {
                Stored::New(entry) => {
                    info!(participant = %me, message_id = %id, sender = %sender, kind = %entry.kind, seq = entry.seq, attempt = delivery.attempt, "message stored");
                }
                Stored::Duplicate => {
                    info!(participant = %me, message_id = %id, sender = %sender, "duplicate delivery acknowledged");
                }
                taken @ (Stored::Conflict | Stored::IdTaken) => {
                    // (stored with other content, or the id taken, between the check and
                    // the store)
                    if matches!(taken, Stored::Conflict) {
                        conflict_said(inner, id, &sender);
                    }
                    let (reason_code, field_path) = ID_TAKEN;
                    return Ok(reject(
                        client,
                        inner,
                        &id.to_string(),
                        reason_code,
                        field_path,
                        shutdown,
                    )
                    .await);
                }
            }
            if inner.failpoint_inbox_after_store {
                warn!(participant = %me, message_id = %id, "fail point inbox-after-store: aborting");
                std::process::abort();
            }
            ack(client, inner, id, shutdown).await
        }
        Verdict::Receipt {
            receipt_id,
            kind,
            original,
            failure,
            at,
        } => {
            let reason_code = failure
                .as_ref()
                .map(|f| f.reason_code.clone())
                .unwrap_or_default();
            match store_receipt(inner, original, failure, at).await? {
                ReceiptEffect::Moved(state) => {
                    info!(participant = %me, message_id = %original, receipt_kind = %kind, state = %state, reason_code = %reason_code, "receipt applied");
                }
                // (said by `store_receipt`)
                ReceiptEffect::DeliveredDespiteWithdrawal | ReceiptEffect::Contradicted { .. } => {}
                ReceiptEffect::Ignored(state) => {
                    debug!(participant = %me, message_id = %original, receipt_kind = %kind, state = %state, "receipt does not change the state");
                }
                ReceiptEffect::Unknown => {
                    warn!(participant = %me, message_id = %original, receipt_kind = %kind, "receipt for an unknown message");
                }
            }
            ack(client, inner, receipt_id, shutdown).await
        }
    })
}

// ---- certificate ----------------------------------------------------------------

/// How long the call that proves a new connection may take: TCP connect (itself bounded
/// by the channel's connect timeout), the TLS handshake and a `GetInfo`. Not a multiple of
/// `certificate_check_interval`: the loop waits for the proof before its next check, so
/// checks do not pile up, and a handshake slowed by a loaded machine must not count as
/// a refusal and hold the move up for [`REFUSED_RETRY`].
const PROOF_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new certificate that the broker did not accept waits before it is tried
/// again while the files stay as they are (a change of the files is tried at once): a
/// broker that refused it will most likely refuse it again, and a doomed handshake at
/// every check would only load it.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// How often a new certificate that the broker does not accept is said again at ERROR
/// while it lasts.
const REFUSED_REPEAT: Duration = Duration::from_secs(15 * 60);

/// A new certificate that the broker did not accept: which, and when it was tried.
#[derive(Debug)]
struct Refused {
    cert: Option<trmx_certs::CertInfo>,
    at: SystemTime,
}

/// Whether the new certificate `cert` is to be tried at `now`: not when it is the one
/// `refused` holds and was tried less than [`REFUSED_RETRY`] before.
fn try_now(
    refused: Option<&Refused>,
    cert: Option<&trmx_certs::CertInfo>,
    now: SystemTime,
) -> bool {
    refused.is_none_or(|refused| {
        refused.cert.as_ref() != cert
            || !now
                .duration_since(refused.at)
                .is_ok_and(|ago| ago < REFUSED_RETRY)
    })
}

/// Why a new connection failed its proof.
#[derive(Debug)]
struct NotProven {
    /// The broker's reason, as [`status_text`] gives it.
    reason: String,
    /// The broker refused this node (a TLS alert in the handshake, `UNAUTHENTICATED`,
    /// `PERMISSION_DENIED`), as opposed to a broker out of reach.
    refused: bool,
}

/// Proves a new connection: one `GetInfo` through `channel`, which opens it.
async fn prove(channel: tonic::transport::Channel) -> Result<(), NotProven> {
    let mut client =
        ExchangeClient::new(channel).max_decoding_message_size(super::MAX_DELIVERY_BYTES);
    match tokio::time::timeout(PROOF_TIMEOUT, client.get_info(pb::GetInfoRequest {})).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(NotProven {
            reason: status_text(&status),
            refused: is_refusal(&status),
        }),
        Err(_) => Err(NotProven {
            reason: format!("no answer within {} s", PROOF_TIMEOUT.as_secs()),
            refused: false,
        }),
    }
}

/// Whether `status` says that the broker refused this node rather than that it could not
/// be reached: `UNAUTHENTICATED`, `PERMISSION_DENIED`, or a TLS alert it sent in the
/// handshake (a certificate of a CA it does not trust, revoked, not yet valid).
fn is_refusal(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    if matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied
    ) {
        return true;
    }
    let mut cause = status.source();
    while let Some(error) = cause {
        if matches!(rustls_error(error), Some(rustls::Error::AlertReceived(_))) {
            return true;
        }
        cause = error.source();
    }
    false
}

/// When the certificate the link's connection presents ends its validity, for the log.
fn old_not_after(outdated: &Outdated) -> String {
    outdated
        .old
        .as_ref()
        .map_or_else(|| "-".to_owned(), |i| trmx_certs::format_time(i.not_after))
}

/// Whether the certificate the link's connection presents has expired at `now` (the
/// node's clock, on which the broker's certificate is checked too).
fn old_expired(outdated: &Outdated, now: SystemTime) -> bool {
    outdated.old.as_ref().is_some_and(|i| i.not_after <= now)
}

/// Every `certificate_check_interval`, moves the link to a new connection when
/// the next one would present another certificate than the open one: after a
/// renewal (before the old certificate expires, or is revoked) the broker sees
/// the new certificate within seconds. The files are read off the runtime, and
/// only when they changed (the channel compares their digests).
///
/// The new connection is proven first (one `GetInfo`, at most [`PROOF_TIMEOUT`]), and
/// the link moves to it only when the broker answered: a certificate the broker refuses
/// (of a CA it does not trust, revoked, not yet valid) must not take the node off a
/// connection that works. The link then keeps the old connection, and its next
/// connections (once that one breaks) present the old certificate too
/// ([`super::channel::Outdated::hold`]), which the broker accepted: a network failure or
/// a broker restart must not cut the node off while the old certificate is still good.
/// An old certificate that has expired (on the node's clock) is not held when the broker
/// did not answer the proof of the new one (it did not refuse it): it would refuse the
/// old one for sure.
/// The refusal is logged at ERROR (again every [`REFUSED_REPEAT`] while it lasts), with
/// the old certificate's end of validity, by when a certificate the broker accepts must
/// be installed; and the new certificate is tried again after [`REFUSED_RETRY`], or at
/// once when the files change. A restart presents the files. Once the old certificate
/// has expired (on the node's clock), the refusal says so instead: the broker refuses
/// that one too.
///
/// When the old connection is down, a proof that could not reach the broker holds
/// nothing (the receive loop reports the broker's failures): the old channel's next
/// connection presents what it presented before, the old certificate if it was held,
/// else the files'. One the broker refused holds the old certificate as above, and is
/// logged at ERROR; one that could not reach the broker is not.
pub(crate) async fn certificate_loop(
    inner: Arc<Inner>,
    channel: LinkChannel,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = inner.config.participant.clone();
    let serial = |info: Option<&trmx_certs::CertInfo>| {
        info.map_or_else(|| "-".to_owned(), |i| i.serial_hex.clone())
    };
    let mut refused: Option<Refused> = None;
    let mut said: Option<Said> = None;
    while pause(inner.config.certificate_check_interval, &mut shutdown).await {
        // (the broker's certificate soon after the first handshake, and a held one that
        // the CRL lists soon after the CRL changed, not at the next daily check;
        // `held_revoked` reads the CA and CRL files when they changed)
        inner.check_broker_certificate();
        if let Some(tls) = channel.tls() {
            match tokio::task::spawn_blocking(move || tls.held_revoked()).await {
                Ok(revoked) => inner.note_held_revocation(revoked),
                Err(e) => warn!(participant = %me, error = %e, "certificate check failed"),
            }
        }
        let checking = channel.clone();
        let outdated = match tokio::task::spawn_blocking(move || checking.outdated()).await {
            Ok(outdated) => outdated,
            Err(e) => {
                warn!(participant = %me, error = %e, "certificate check failed");
                continue;
            }
        };
        let Some(outdated) = outdated else {
            // (the files present the connection's certificate again, or it moved: a
            // refusal from now on is a new one)
            (refused, said) = (None, None);
            inner.set_move_refused(None);
            channel.release();
            continue;
        };
        let now = inner.clock.now();
        if !try_now(refused.as_ref(), outdated.new.as_ref(), now) {
            continue;
        }
        let (old_serial, new_serial) =
            (serial(outdated.old.as_ref()), serial(outdated.new.as_ref()));
        debug!(participant = %me, old_serial = %old_serial, new_serial = %new_serial, "trying the new node certificate on a new connection before the link moves to it");
        let candidate = outdated.candidate();
        let proof = tokio::select! {
            proof = prove(candidate.channel.clone()) => proof,
            _ = shutdown.changed() => break,
        };
        let failed = match proof {
            Ok(()) => {
                channel.move_to(candidate);
                (refused, said) = (None, None);
                inner.set_move_refused(None);
                info!(participant = %me, old_serial = %old_serial, new_serial = %new_serial, "the node certificate changed: reconnecting to the broker to present the new one");
                continue;
            }
            Err(failed) => failed,
        };
        // (the candidate is dropped: its connection, if any, with it)
        refused = Some(Refused {
            cert: outdated.new.clone(),
            at: now,
        });
        let connected = inner.link.connected.load(Ordering::SeqCst);
        let expired = old_expired(&outdated, now);
        if failed.refused || (connected && !expired) {
            // (the broker accepted the old one: reconnect with it, not with one refused
            // or not proven)
            outdated.hold();
        } else if connected {
            // (not one that has expired, which the broker refuses for sure, for one it did
            // not refuse: the next connections present the files'; one held before is let
            // go)
            channel.release();
        }
        if connected || failed.refused {
            inner.set_move_refused(Some(MoveRefused {
                connected: outdated.old.clone(),
                reason: not_taken(&new_serial, &failed),
                refused: failed.refused,
            }));
        }
        // (a refusal after no answer, or the other way round, is said at once)
        let about = format!(
            "{new_serial} {}",
            if failed.refused {
                "refused"
            } else {
                "no answer"
            }
        );
        let old_not_after = old_not_after(&outdated);
        if !connected && !failed.refused {
            debug!(participant = %me, new_serial = %new_serial, reason = %failed.reason, "the broker cannot be reached to try the new node certificate; the link is down, and its next connection presents it (the old one, if the broker refused the new one before)");
        } else if !say_again(&mut said, &about, now, REFUSED_REPEAT) {
            if failed.refused {
                debug!(participant = %me, old_serial = %old_serial, new_serial = %new_serial, reason = %failed.reason, connected, "the broker did not accept the new node certificate (said before)");
            } else {
                debug!(participant = %me, old_serial = %old_serial, new_serial = %new_serial, reason = %failed.reason, "the broker did not answer on a new connection presenting the new node certificate (said before)");
            }
        } else if !failed.refused && expired {
            // (connected: the proof got no answer in time, or no connection, while the
            // link's connection is up)
            error!(participant = %me, old_serial = %old_serial, old_not_after = %old_not_after, new_serial = %new_serial, reason = %failed.reason, "the broker did not answer on a new connection presenting the new node certificate (no answer in time, or out of reach: it did not refuse it), and the old one has expired (old_not_after): the link keeps its connection, and its next connections present the new one; check that the broker is up and answers (its log, trmx-node status); the new one is tried again in a minute");
        } else if !failed.refused {
            warn!(participant = %me, old_serial = %old_serial, old_not_after = %old_not_after, new_serial = %new_serial, reason = %failed.reason, "the broker did not answer on a new connection presenting the new node certificate (no answer in time, or out of reach: it did not refuse it): the link keeps its connection, and its next connections present the old one, until the broker takes the new one (tried again in a minute), the old one expires (old_not_after) or the node restarts");
        } else if expired {
            // (the broker refuses the old one too at the next handshake: a held
            // connection goes on until it breaks, and is not opened again)
            error!(participant = %me, old_serial = %old_serial, old_not_after = %old_not_after, new_serial = %new_serial, reason = %failed.reason, connected, "the broker did not accept the new node certificate: it refused it, and the old one has expired (old_not_after): the broker refuses it too, so nothing is sent or received once the link's connection is down (connected says whether it is still up) until a certificate the broker accepts is installed");
        } else if connected {
            error!(participant = %me, old_serial = %old_serial, old_not_after = %old_not_after, new_serial = %new_serial, reason = %failed.reason, "the broker did not accept the new node certificate: it refused it; the link keeps its connection, and its next connections present the old one, until the old one expires (old_not_after) or the node restarts (a restart presents the certificate files); install a certificate the broker accepts");
        } else {
            error!(participant = %me, old_serial = %old_serial, old_not_after = %old_not_after, new_serial = %new_serial, reason = %failed.reason, "the broker did not accept the new node certificate: it refused it, and the link is down: its next connections present the old one, until the old one expires (old_not_after) or the node restarts (a restart presents the certificate files); install a certificate the broker accepts");
        }
    }
}

/// Why the link goes on with the old certificate after the proof of the new one
/// failed, for `trmx-node status`: the broker refused it, or did not answer (in time,
/// or at all: then it is not known to refuse it, and it is tried again).
fn not_taken(new_serial: &str, failed: &NotProven) -> String {
    if failed.refused {
        format!(
            "the broker did not accept the renewed certificate (serial {new_serial}): it \
             refused it: {}",
            failed.reason
        )
    } else {
        format!(
            "the broker did not answer on a new connection presenting the renewed \
             certificate (serial {new_serial}): {}; it did not refuse it, and it is tried \
             again in a minute",
            failed.reason
        )
    }
}

// ---- submit -------------------------------------------------------------------

/// Failed submit attempts of one outbox entry (the head of the queue, which the submit
/// loop tries until it leaves) that its record does not count yet.
#[derive(Debug, Default)]
struct UnrecordedAttempts(Option<(MessageId, u32)>);

impl UnrecordedAttempts {
    /// Counts `attempts` more of `id` (forgetting those of another entry, which left the
    /// queue: withdrawn).
    fn add(&mut self, id: MessageId, attempts: u32) {
        let before = self.take(id);
        self.0 = Some((id, before.saturating_add(attempts)));
    }

    /// The attempts of `id` not recorded, now to be; forgets them.
    fn take(&mut self, id: MessageId) -> u32 {
        match self.0.take() {
            Some((counted, attempts)) if counted == id => attempts,
            _ => 0,
        }
    }

    /// The entry and its attempts not recorded, unless it is `next` (`None`: whichever);
    /// forgets them.
    fn other_than(&mut self, next: Option<MessageId>) -> Option<(MessageId, u32)> {
        match self.0 {
            Some((counted, _)) if Some(counted) == next => None,
            _ => self.0.take(),
        }
    }
}

/// Writes to its record the failed attempts counted of an entry other than `next`, the
/// one the submit loop tries now (`None`: none, the queue is empty or the loop stops):
/// the entry it tried before left the queue (withdrawn, or moved on by a receipt), and
/// its record is to count every attempt, not only those written with a failure said
/// at WARN. One write, when the loop moves on from an entry; its error is left as it
/// is (a withdrawal writes its own).
async fn record_left(inner: &Inner, unrecorded: &mut UnrecordedAttempts, next: Option<MessageId>) {
    let Some((left, attempts)) = unrecorded.other_than(next).filter(|(_, n)| *n > 0) else {
        return;
    };
    let store = inner.store.clone();
    if let Err(e) = inner
        .blocking(move || store.note_submit_error(left, None, attempts))
        .await
    {
        warn!(participant = %inner.config.participant, message_id = %left, error = %e, "cannot record the failed submits");
    }
}

/// Submits `QUEUED` entries in creation order whenever the broker is
/// reachable; woken by each new send and by each (re)connect. When it stops, the failed
/// attempts it counted but did not write yet are written (the shutdown's flush makes
/// them durable).
pub(crate) async fn submit_loop(
    inner: Arc<Inner>,
    client: ExchangeClient<LinkChannel>,
    shutdown: watch::Receiver<bool>,
) {
    let mut unrecorded = UnrecordedAttempts::default();
    submit_rounds(&inner, client, shutdown, &mut unrecorded).await;
    record_left(&inner, &mut unrecorded, None).await;
}

/// The rounds of [`submit_loop`], until the shutdown.
async fn submit_rounds(
    inner: &Arc<Inner>,
    mut client: ExchangeClient<LinkChannel>,
    mut shutdown: watch::Receiver<bool>,
    unrecorded: &mut UnrecordedAttempts,
) {
    let inner = Arc::clone(inner);
    let me = inner.config.participant.clone();
    let mut backoff = Backoff::new(inner.config.reconnect_min, inner.config.reconnect_max);
    // (a submit refused again and again, while the receive stream is fine, must say so)
    let mut failures = FailureLog::default();
    loop {
        if *shutdown.borrow() {
            break;
        }
        if let Err(e) = withdraw_pending(&inner, &mut client, &mut shutdown).await {
            debug!(participant = %me, error = %e, "pending withdrawals will be retried");
            if !pause(backoff.next_delay(), &mut shutdown).await {
                break;
            }
            continue;
        }
        let store = inner.store.clone();
        let batch = match inner.blocking(move || store.queued(SUBMIT_BATCH)).await {
            Ok(batch) => batch,
            Err(e) => {
                warn!(participant = %me, error = %e, "cannot read the outbox queue");
                if !pause(backoff.next_delay(), &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        if batch.is_empty() {
            record_left(&inner, unrecorded, None).await;
            tokio::select! {
                () = inner.submit_wake.notified() => continue,
                _ = shutdown.changed() => break,
            }
        }
        // The entries are committed, but their enqueue's flush may still be
        // under way: a message the broker has must never be one that a crash
        // takes from the outbox (the application, unanswered, would send it
        // again under a new id, and the recipient would get both).
        if let Err(e) = inner.store.flush_async().await {
            warn!(participant = %me, error = %e, "cannot make the outbox durable before submitting");
            if !pause(backoff.next_delay(), &mut shutdown).await {
                break;
            }
            continue;
        }
        let mut transient = false;
        for (id, envelope) in batch {
            if *shutdown.borrow() {
                return;
            }
            // withdrawn since the batch was read: not sent at all; from here
            // until its answer is stored, a withdrawal waits (`submit_gate`)
            let gate = inner.submit_gate.lock().await;
            let store = inner.store.clone();
            let still_queued = inner
                .blocking(move || store.outbox_entry(id))
                .await
                .map(|entry| entry.is_some_and(|e| e.state == OutboxState::Queued));
            if matches!(still_queued, Ok(false)) {
                continue;
            }
            record_left(&inner, unrecorded, Some(id)).await;
            // A shutdown does not wait for a broker that does not answer: the entry
            // stays queued, and the broker's idempotency covers the submit next time.
            let attempts = unrecorded.take(id) + 1;
            let recording = AtomicBool::new(false);
            let submitted = tokio::select! {
                submitted = submit_one(&inner, &mut client, id, envelope, attempts, &recording) => submitted,
                Ok(_) = shutdown.wait_for(|down| *down) => {
                    // (the attempts before this one, cut, are still to be written, unless
                    // the broker's answer is being written with them)
                    if !recording.load(Ordering::Relaxed) {
                        unrecorded.add(id, attempts - 1);
                    }
                    return;
                }
            };
            drop(gate);
            match submitted {
                Ok(()) => {
                    backoff.reset();
                    let failed = failures.recovered();
                    if failed > 0 {
                        info!(participant = %me, failures = failed, "submits accepted again");
                    }
                }
                Err(NotSubmitted::NotRecorded { error, written }) => {
                    // The broker answered, but its answer could not be recorded or made
                    // durable: not a failed submit attempt, and no error of the broker's
                    // for the record. When the write is what failed the entry is still
                    // queued, and its next attempt records this one; when the flush is,
                    // the record counts it already (and the entry has left the queue).
                    let error = error.to_string();
                    if failures.failed(&error, Instant::now()) {
                        warn!(participant = %me, message_id = %id, error = %error, "cannot record the broker's answer to a submit in the node's store (check its disk); the outbox tries again");
                    } else {
                        debug!(participant = %me, message_id = %id, error = %error, "cannot record the broker's answer to a submit");
                    }
                    if !written {
                        unrecorded.add(id, attempts);
                    }
                    transient = true;
                    break;
                }
                Err(NotSubmitted::Transient(e)) => {
                    let error = e.to_string();
                    // A failure is written to the entry's record when it is said at WARN
                    // (the entry's first, a different one, the same one every
                    // FAILURE_REPEAT): a record write and a flush per attempt, for hours
                    // of broker outage, would say nothing new. The attempts in between
                    // are counted here and added at the next write, or when the loop
                    // moves on from the entry or stops (a crash forgets them). Keyed by
                    // the entry: one that fails with the error of the one before it (which
                    // was withdrawn meanwhile) shows its failure at once, not minutes later.
                    if failures.failed_about(&id.to_string(), &error, Instant::now()) {
                        warn!(participant = %me, message_id = %id, error = %error, failures = failures.failures(), "submit not accepted; the outbox waits and tries again");
                        let store = inner.store.clone();
                        let noted = error.clone();
                        let written = inner
                            .blocking(move || store.note_submit_error(id, Some(&noted), attempts))
                            .await;
                        if let Err(e) = written {
                            warn!(participant = %me, message_id = %id, error = %e, "cannot record the failed submit");
                            unrecorded.add(id, attempts);
                        }
                    } else {
                        debug!(participant = %me, message_id = %id, error = %error, "submit will be retried");
                        unrecorded.add(id, attempts);
                    }
                    transient = true;
                    break;
                }
            }
        }
        if transient {
            let delay = backoff.next_delay();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = inner.submit_wake.notified() => {}
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// Entries asked about per round of the outbox check: `SUBMITTED` ones first, then,
/// in the room they leave (at least [`FAILED_SHARE`]), `FAILED` ones an operator may
/// redrive ([`check_failed`]).
pub(crate) const CHECK_BATCH: usize = 100;

/// The part of a round of the outbox check kept for `FAILED` entries due to be asked
/// about, when there are: a node with a long outbox of `SUBMITTED` entries (a recipient
/// offline for days with hundreds waiting for it) would otherwise never ask about them
/// for as long as it lasts, and a redriven message's lost receipt would never be made
/// good. The `SUBMITTED` entries keep the rest, and all the room the `FAILED` ones leave.
pub(crate) const FAILED_SHARE: usize = CHECK_BATCH / 10;

/// How often, at most, the outbox check asks the broker about one entry `FAILED` by an
/// expiry or a dead-lettering ([`check_failed`]), or every round when the check runs
/// less often. These may be many (a recipient offline for weeks) and are watched for
/// long (`broker.redrive_watch_secs`), and a redrive is an operator's rare act: once
/// an hour costs a few calls a round where asking at every check (10 min by default)
/// would cost six times as many.
pub(crate) const REDRIVE_ASK_PERIOD: Duration = Duration::from_secs(3_600);

/// How many times, over its life, the outbox check submits an entry again after a status
/// answer about another message (a broken broker, or one whose store is damaged): a
/// broker that keeps answering so does not get it every check for ever (every 10 min by
/// default: about 1 h 40 min of tries). Past it, the entry stays `SUBMITTED`, its record
/// saying why, and the node says so at WARN once.
pub(crate) const MAX_RESUBMITS_ON_OTHER_ANSWERS: u32 = 10;

/// Every `interval`, asks the broker (`GetStatus`) about the entries that
/// were submitted at least `interval` ago and have no receipt yet. The
/// broker keeps every message it accepted until its receipt is acknowledged;
/// one it does not know was lost with its store (restored from a backup
/// taken before the submit). Such an entry is submitted again, byte for
/// byte, so that it still arrives; one whose body is already erased becomes
/// `FAILED` (`lost-by-broker`). Nothing is lost silently either way. One the broker
/// holds as withdrawn (a withdrawal whose answer never came back) is withdrawn here
/// too ([`withdrawn_on_broker`]); one it holds in another final state is settled as its
/// receipt would have settled it ([`settled_on_broker`]).
///
/// Each round asks about at most [`CHECK_BATCH`] entries, those checked
/// longest ago first, so that a long outbox (a recipient offline for days)
/// costs a few calls a round, not one per entry.
///
/// Entries `FAILED` as expired or dead-lettered are asked about too, in the room the
/// `SUBMITTED` ones leave in the round but never less than [`FAILED_SHARE`] of it,
/// each at most once per [`REDRIVE_ASK_PERIOD`],
/// for `redrive_watch` after they failed ([`check_failed`]): an operator may redrive
/// such a message, and when its delivery receipt is lost too, only the broker's status
/// tells that it was delivered.
///
/// A failed call stops the round. An error about the entry's message counts it as asked
/// about all the same, so that one message the broker keeps failing on does not stop every
/// round at itself; the broker out of reach ([`Unasked::Broker`]) leaves it in its place.
pub(crate) async fn outbox_check_loop(
    inner: Arc<Inner>,
    mut client: ExchangeClient<LinkChannel>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = inner.config.participant.clone();
    let mut checked: std::collections::HashMap<MessageId, Millis> = Default::default();
    while pause(interval, &mut shutdown).await {
        let now = to_millis(inner.clock.now());
        let before = now.saturating_sub(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX));
        let store = inner.store.clone();
        let due = inner
            .blocking(move || {
                if store.counts()?.submitted == 0 {
                    return Ok(Vec::new());
                }
                store.submitted_before(before)
            })
            .await;
        let mut due = match due {
            Ok(due) => due,
            Err(e) => {
                warn!(participant = %me, error = %e, "cannot read the outbox for the check");
                continue;
            }
        };
        // forget the entries no longer SUBMITTED (delivered, failed)
        let due_ids: std::collections::HashSet<MessageId> = due.iter().map(|(id, _)| *id).collect();
        checked.retain(|id, _| due_ids.contains(id));
        due.sort_by_key(|(id, submitted_at)| {
            (checked.get(id).copied().unwrap_or(0), *submitted_at)
        });
        let room = CHECK_BATCH - due.len().min(CHECK_BATCH - FAILED_SHARE);
        let watched = match redrive_due(&inner, now, room).await {
            Ok(watched) => watched,
            Err(e) => {
                warn!(participant = %me, error = %e, "cannot read the failed outbox entries for the check");
                Vec::new()
            }
        };
        // (the submitted ones asked about longest ago keep their place)
        due.truncate(CHECK_BATCH - watched.len());
        let next_ask = now.saturating_add(redrive_ask_every(interval));
        let asks = due
            .into_iter()
            .map(|(id, _)| (id, true))
            .chain(watched.into_iter().map(|id| (id, false)));
        for (id, submitted) in asks {
            if *shutdown.borrow() {
                return;
            }
            let asked = if submitted {
                check_one(&inner, &mut client, id, &mut shutdown).await
            } else {
                check_failed(&inner, &mut client, id, next_ask, &mut shutdown).await
            };
            let e = match asked {
                Ok(()) => {
                    if submitted {
                        checked.insert(id, now);
                    }
                    continue;
                }
                Err(Unasked::Broker(e)) => {
                    if *shutdown.borrow() {
                        return;
                    }
                    // (out of reach, the broker fails the next one just as well: the entry
                    // was not really asked, and keeps its place; the receive loop reports
                    // the broker's state)
                    debug!(participant = %me, message_id = %id, error = %e, "outbox check stopped for this round");
                    break;
                }
                Err(Unasked::Entry(e)) => e,
            };
            if *shutdown.borrow() {
                return;
            }
            // Asked about all the same, behind the others next time: an error about this
            // one message (a broker that cannot read its record) would otherwise stop
            // every round at it, first again each time, and no entry behind it would ever
            // be asked about.
            if submitted {
                checked.insert(id, now);
            } else {
                let store = inner.store.clone();
                if let Err(e) = inner
                    .blocking(move || store.redrive_asked(id, next_ask))
                    .await
                {
                    warn!(participant = %me, error = %e, "cannot record the outbox check's question about a failed entry");
                }
            }
            warn!(participant = %me, message_id = %id, error = %e, "outbox check stopped for this round");
            break;
        }
    }
}

/// How long after asking about a `FAILED` entry the outbox check asks again, in
/// milliseconds: [`REDRIVE_ASK_PERIOD`], or the check's `interval` when longer.
fn redrive_ask_every(interval: Duration) -> Millis {
    u64::try_from(REDRIVE_ASK_PERIOD.max(interval).as_millis()).unwrap_or(u64::MAX)
}

/// Up to `room` entries `FAILED` as expired or dead-lettered to ask the broker about
/// now ([`check_failed`]); those that failed longer than `redrive_watch` ago leave the
/// index on the way (all of them when it is off).
async fn redrive_due(
    inner: &Arc<Inner>,
    now: Millis,
    room: usize,
) -> Result<Vec<MessageId>, NodeError> {
    let since = match inner.config.redrive_watch {
        Some(window) => now.saturating_sub(u64::try_from(window.as_millis()).unwrap_or(u64::MAX)),
        None => Millis::MAX,
    };
    let store = inner.store.clone();
    inner
        .blocking(move || store.redrive_due(now, since, room))
        .await
}

/// Why the outbox check's question about one entry came to nothing: the round stops
/// either way.
#[derive(Debug)]
enum Unasked {
    /// The broker as a whole: out of reach, no answer in time, too busy, or the node shuts
    /// down. The entry keeps its place (and a `FAILED` one stays due): it was not really
    /// asked, and the next round asks it first.
    Broker(NodeError),
    /// This entry: the broker's error about its message (one whose record it cannot
    /// read), or this node's store. It goes behind the others, so that it does not stop
    /// every round at itself.
    Entry(NodeError),
}

impl From<NodeError> for Unasked {
    fn from(error: NodeError) -> Self {
        Unasked::Entry(error)
    }
}

/// What a broker's error status to a question of the outbox check says: about the broker
/// as a whole (`UNAVAILABLE`: down or unreachable; `DEADLINE_EXCEEDED`: no answer in
/// `broker_answer_timeout`; `RESOURCE_EXHAUSTED`: rate or requests in progress;
/// `CANCELLED`), or about the message asked about.
fn unasked(status: &tonic::Status) -> Unasked {
    let error = NodeError::BrokerUnavailable(status_text(status));
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Cancelled => {
            Unasked::Broker(error)
        }
        _ => Unasked::Entry(error),
    }
}

/// Asks the broker about one entry `FAILED` as expired or dead-lettered, which an
/// operator may have redriven since. Acknowledged: the redriven message was delivered,
/// and its receipt did not settle the entry (lost too: purged by an operator, or
/// expired unread in this node's queue); the entry is settled `DELIVERED` as that
/// receipt would have settled it ([`settled_on_broker`]). Accepted or in flight
/// (redriven, on its way), expired or dead-lettered (as the entry shows, or again):
/// asked again at `next`. Purged, withdrawn, rejected by the recipient, or unknown to
/// the broker (gone past its retention): it can never be redriven now, and is asked
/// about no more. The entry stays `FAILED` but for a delivery, and is never submitted
/// again from here. An answer about another message says nothing: asked again at `next`.
/// `Err` means no answer came: the round stops (see [`Unasked`]).
async fn check_failed(
    inner: &Arc<Inner>,
    client: &mut ExchangeClient<LinkChannel>,
    id: MessageId,
    next: Millis,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Unasked> {
    let asking = client.get_status(pb::GetStatusRequest {
        message_id: id.to_string(),
    });
    let Some(status) = bounded(inner, asking, shutdown).await else {
        return Err(Unasked::Broker(NodeError::BrokerUnavailable(
            SHUTTING_DOWN.into(),
        )));
    };
    let ask_again = match status {
        Ok(answer) => {
            let answer = answer.into_inner();
            if !MessageId::parse(&answer.message_id).is_ok_and(|said| said == id) {
                debug!(participant = %inner.config.participant, message_id = %id, "status answer about another message for a failed entry; asked again later");
                true
            } else {
                match pb::MessageState::try_from(answer.state) {
                    Ok(pb::MessageState::Acknowledged) => {
                        // (the settle takes the entry out of the watch)
                        return Ok(
                            settled_on_broker(inner, id, pb::Outcome::Delivered, &answer).await?,
                        );
                    }
                    Ok(pb::MessageState::Purged | pb::MessageState::Withdrawn) => false,
                    Ok(pb::MessageState::DeadLettered) => answer.reason_code == "MAX_ATTEMPTS",
                    // (a state this node does not know says nothing either way)
                    Ok(
                        pb::MessageState::Accepted
                        | pb::MessageState::InFlight
                        | pb::MessageState::Expired
                        | pb::MessageState::Unspecified,
                    )
                    | Err(_) => true,
                }
            }
        }
        Err(status) if status.code() == Code::NotFound => false,
        Err(status) => return Err(unasked(&status)),
    };
    // (not flushed: lost in a crash, the entry is only asked about again sooner)
    let store = inner.store.clone();
    if ask_again {
        inner
            .blocking(move || store.redrive_asked(id, next))
            .await?;
    } else {
        debug!(participant = %inner.config.participant, message_id = %id, "the broker can no longer redrive this failed message: no longer asked about");
        inner.blocking(move || store.redrive_unwatch(id)).await?;
    }
    Ok(())
}

/// Asks the broker about one `SUBMITTED` entry: settles it when the broker holds it
/// withdrawn or in another final state and, when the broker does not know it, submits
/// it again (or marks it `FAILED` when that is impossible). When the
/// broker answered about another message instead, it is submitted again too, but never
/// marked `FAILED`: the broker may hold it (a refusal of that submit is noted, and the
/// entry waits for its receipt).
/// `Err` means no answer came: the round stops (see [`Unasked`]).
async fn check_one(
    inner: &Arc<Inner>,
    client: &mut ExchangeClient<LinkChannel>,
    id: MessageId,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Unasked> {
    let me = inner.config.participant.clone();
    let asking = client.get_status(pb::GetStatusRequest {
        message_id: id.to_string(),
    });
    let Some(status) = bounded(inner, asking, shutdown).await else {
        return Err(Unasked::Broker(NodeError::BrokerUnavailable(
            SHUTTING_DOWN.into(),
        )));
    };
    // (an answer about another message says nothing of this one: a broken broker, or
    // one whose store is damaged. The message is submitted again, which the broker's
    // idempotency makes harmless if it has it; taken as "known", a message it lost would
    // stay SUBMITTED for good, never delivered and never reported)
    let answered_other = match status {
        Ok(answer) => {
            let answer = answer.into_inner();
            if !MessageId::parse(&answer.message_id).is_ok_and(|said| said == id) {
                true
            } else if answer.state == pb::MessageState::Withdrawn as i32 {
                return Ok(withdrawn_on_broker(inner, id).await?);
            } else if let Some(outcome) = final_outcome(&answer) {
                return Ok(settled_on_broker(inner, id, outcome, &answer).await?);
            } else {
                return Ok(());
            }
        }
        Err(status) if status.code() == Code::NotFound => false,
        Err(status) => return Err(unasked(&status)),
    };
    // From here until the outcome is stored, a withdrawal waits; one that came first
    // has made the entry FAILED, and it is not sent again.
    let _gate = inner.submit_gate.lock().await;
    let store = inner.store.clone();
    let still_submitted = inner
        .blocking(move || store.outbox_entry(id))
        .await?
        .is_some_and(|e| e.state == OutboxState::Submitted);
    if !still_submitted {
        return Ok(());
    }
    // (bounded over the entry's life, not only per round: a broken broker that keeps
    // answering about another message would otherwise have it submitted every check,
    // for ever)
    if answered_other {
        let store = inner.store.clone();
        match inner
            .blocking(move || store.count_other_answer(id, MAX_RESUBMITS_ON_OTHER_ANSWERS))
            .await?
        {
            OtherAnswer::Resubmit => {
                // The count on disk before the submit: a crash after a submit whose
                // count was not flushed would count it again from the number before,
                // one more resubmit per crash beyond the bound.
                count_flushed(inner, id).await?;
                warn!(participant = %me, message_id = %id, "the broker answered a status request about another message: submitting this one again (the broker keeps one copy of a message submitted twice)");
            }
            OtherAnswer::BoundReached => {
                count_flushed(inner, id).await?;
                warn!(participant = %me, message_id = %id, resubmits = MAX_RESUBMITS_ON_OTHER_ANSWERS, "the broker keeps answering status requests about this message with another message: it was submitted again as often as the node does, and stays submitted until its receipt comes (ask the broker's operator why)");
                return Ok(());
            }
            OtherAnswer::PastBound => {
                debug!(participant = %me, message_id = %id, "status answer about another message again; not submitted again");
                return Ok(());
            }
        }
    }
    let now = to_millis(inner.clock.now());
    let store = inner.store.clone();
    let envelope = inner.blocking(move || store.envelope(id)).await?;
    // what makes the entry FAILED (`lost-by-broker`), if it cannot be sent again
    let (reason_code, field_path, error) = match envelope {
        // (the broker may well have it: nothing to say)
        None if answered_other => return Ok(()),
        None => {
            warn!(participant = %me, message_id = %id, "the broker does not know this submitted message, and its body is erased: it cannot be sent again");
            let error = "the broker no longer knows this message".to_owned();
            ("NOT_FOUND".to_owned(), String::new(), error)
        }
        Some(envelope) => {
            if !answered_other {
                warn!(participant = %me, message_id = %id, "the broker does not know this submitted message (was its store restored from a backup?): submitting it again");
            }
            let submitting = client.submit(pb::SubmitRequest {
                envelope: Some(envelope),
            });
            // (bounded by submit_answer_timeout, not broker_answer_timeout: a large
            // envelope on a slow link takes its time)
            let limit = inner.config.submit_answer_timeout;
            let result = match within(submitting, Some(limit), shutdown).await {
                Ok(result) => result,
                Err(Cut::NoAnswer) => Err(no_submit_answer(limit)),
                Err(Cut::Shutdown) => {
                    return Err(Unasked::Broker(NodeError::BrokerUnavailable(
                        SHUTTING_DOWN.into(),
                    )));
                }
            };
            match result {
                Ok(_) => {
                    let store = inner.store.clone();
                    inner
                        .blocking(move || {
                            store.note_resubmitted(
                                id,
                                if answered_other {
                                    "the broker's status answer named another message; it \
                                     was submitted again"
                                } else {
                                    "the broker had lost this message; it was submitted again"
                                },
                            )
                        })
                        .await?;
                    return Ok(inner.store.flush_async().await?);
                }
                // The broker did not say that it does not hold the message (its status
                // answer named another one), and a refusal of a submit again says nothing
                // of a message it holds either (an expiry passed since, a registry
                // changed): FAILED would tell the user to send it again under a new id,
                // and the recipient could get both. It stays SUBMITTED, for its receipt
                // (or a later check) to settle, and its record says why.
                Err(status) if is_permanent(status.code()) && answered_other => {
                    warn!(participant = %me, message_id = %id, code = ?status.code(), reason = broker_message(&status).as_str(), "the broker refused the message submitted again after a status answer about another message; it may hold it, so it stays submitted");
                    let note = format!(
                        "the broker's status answer named another message, and it refused \
                         the message submitted again ({}); it may hold it, so it stays \
                         submitted until its receipt comes",
                        status_text(&status)
                    );
                    let store = inner.store.clone();
                    inner
                        .blocking(move || store.note_resubmitted(id, &note))
                        .await?;
                    return Ok(inner.store.flush_async().await?);
                }
                Err(status) if is_permanent(status.code()) => {
                    warn!(participant = %me, message_id = %id, code = ?status.code(), reason = broker_message(&status).as_str(), "the broker refused the message submitted again");
                    (
                        trmx_transport::code_name(status.code()).to_owned(),
                        field_path_of(status.message()),
                        status_text(&status),
                    )
                }
                Err(status) => return Err(unasked(&status)),
            }
        }
    };
    let failure = Failure {
        outcome: "lost-by-broker".into(),
        reason_code,
        field_path,
    };
    let store = inner.store.clone();
    inner
        .blocking(move || store.mark_lost(id, failure, &error, now))
        .await?;
    Ok(inner.store.flush_async().await?)
}

/// Flushes the count of resubmits after status answers about another message that
/// `count_other_answer` just raised for `id`; when the flush fails, takes the count back
/// (no resubmit, no WARN follows it): counted, every round of a disk that fails for a
/// while would use the bound up without a single submit, and the entry, perhaps lost by
/// the broker, would stay `SUBMITTED` for good once the disk is back.
async fn count_flushed(inner: &Arc<Inner>, id: MessageId) -> Result<(), NodeError> {
    let Err(e) = inner.store.flush_async().await else {
        return Ok(());
    };
    let store = inner.store.clone();
    inner
        .blocking(move || store.uncount_other_answer(id))
        .await?;
    Err(e)
}

/// The outcome a status answer's final state reports, as the broker's receipt of it
/// would name it; `None` for a state that is not final (or `WITHDRAWN`, which gets no
/// receipt: [`withdrawn_on_broker`]). A dead letter is the recipient's rejection unless
/// the attempts ran out (`MAX_ATTEMPTS`, as the broker writes it).
fn final_outcome(status: &pb::MessageStatus) -> Option<pb::Outcome> {
    match pb::MessageState::try_from(status.state).ok()? {
        pb::MessageState::Acknowledged => Some(pb::Outcome::Delivered),
        pb::MessageState::Expired => Some(pb::Outcome::Expired),
        pb::MessageState::Purged => Some(pb::Outcome::Purged),
        pb::MessageState::DeadLettered if status.reason_code == "MAX_ATTEMPTS" => {
            Some(pb::Outcome::DeadLettered)
        }
        pb::MessageState::DeadLettered => Some(pb::Outcome::RejectedByRecipient),
        pb::MessageState::Unspecified
        | pb::MessageState::Accepted
        | pb::MessageState::InFlight
        | pb::MessageState::Withdrawn => None,
    }
}

/// The broker reports `SUBMITTED` entry `id` in a final state, and its receipt has not
/// settled the entry: the receipt is late, or never comes as the node would take it (one
/// whose id is not the broker's derivation is rejected, `classify_receipt`). Left as it
/// is, the entry would show `SUBMITTED` for good, for a message the broker has long
/// finished: it is settled from the broker's status, as its receipt would have settled
/// it (the receipt coming after finds it settled; a contradiction of it is said).
async fn settled_on_broker(
    inner: &Arc<Inner>,
    id: MessageId,
    outcome: pb::Outcome,
    status: &pb::MessageStatus,
) -> Result<(), NodeError> {
    let report = pb::Receipt {
        message_id: id.to_string(),
        outcome: outcome as i32,
        reason_code: status.reason_code.clone(),
        field_path: status.field_path.clone(),
        ..Default::default()
    };
    let failure = failure_of(inner, id, &report, outcome);
    // (the broker's time of the state; a far-ahead or missing one is taken as now, as a
    // receipt's is)
    let now = inner.clock.now();
    let at = status
        .state_changed_at
        .as_ref()
        .and_then(|ts| from_timestamp(ts).ok())
        .filter(|at| now.checked_add(MAX_CREATED_AHEAD).is_some_and(|l| *at <= l))
        .unwrap_or(now);
    let effect = store_receipt(inner, id, failure, to_millis(at)).await?;
    if let ReceiptEffect::Moved(state) = effect {
        info!(participant = %inner.config.participant, message_id = %id, outcome = outcome_name(outcome), state = %state, "settled from the broker's status: its receipt had not come, or was not taken");
    }
    Ok(())
}

/// The broker holds `SUBMITTED` entry `id` as withdrawn: a withdrawal that it applied
/// and whose answer never came back (the connection broke, the answer came after the
/// node's `withdraw_timeout`), so the node told its caller to try again. A withdrawn
/// message gets no report, and the entry would stay `SUBMITTED` for good, asked about at
/// every check, while the broker will never deliver it: it is withdrawn here too.
async fn withdrawn_on_broker(inner: &Arc<Inner>, id: MessageId) -> Result<(), NodeError> {
    let _gate = inner.submit_gate.lock().await;
    let now = to_millis(inner.clock.now());
    let store = inner.store.clone();
    let updated = inner
        .blocking(move || store.withdrawn_by_broker(id, now))
        .await?;
    if updated.is_some_and(|u| u.changed) {
        inner.store.flush_async().await?;
        warn!(participant = %inner.config.participant, message_id = %id, "the broker holds this submitted message as withdrawn (a withdrawal whose answer was lost?): withdrawn here too");
    }
    Ok(())
}

/// Withdraws on the broker the messages withdrawn here while it could not be reached
/// (an earlier submit of theirs may have reached it). `Err` when the broker cannot be
/// reached: the rest wait for the next round.
async fn withdraw_pending(
    inner: &Arc<Inner>,
    client: &mut ExchangeClient<LinkChannel>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let me = &inner.config.participant;
    let store = inner.store.clone();
    let pending = inner
        .blocking(move || store.pending_withdrawals(SUBMIT_BATCH))
        .await?;
    for id in pending {
        let withdrawing = client.withdraw(pb::WithdrawRequest {
            message_id: id.to_string(),
        });
        let Some(answer) = bounded(inner, withdrawing, shutdown).await else {
            return Err(NodeError::BrokerUnavailable(SHUTTING_DOWN.into()));
        };
        let note = match answer {
            Ok(_) => {
                info!(participant = %me, message_id = %id, "message withdrawn on the broker too (an earlier submit had reached it)");
                "withdrawn on the broker too: an earlier submit had reached it".to_owned()
            }
            Err(status) if status.code() == Code::NotFound => {
                info!(participant = %me, message_id = %id, "the broker never had the withdrawn message");
                "withdrawn: the broker never had it".to_owned()
            }
            Err(status) if status.code() == Code::FailedPrecondition => {
                warn!(participant = %me, message_id = %id, reason = broker_message(&status).as_str(), "the broker could not withdraw a message withdrawn here while it was out of reach: it reached its recipient or failed first, as its receipt will tell");
                format!(
                    "the broker could not withdraw it: {}",
                    broker_message(&status)
                )
            }
            // (asking again would get the same answer, and hold up every submit behind it)
            Err(status) if is_permanent(status.code()) => {
                warn!(participant = %me, message_id = %id, code = ?status.code(), reason = broker_message(&status).as_str(), "the broker refused to withdraw a message withdrawn here while it was out of reach");
                format!(
                    "the broker refused the withdrawal: {}",
                    status_text(&status)
                )
            }
            Err(status) => return Err(NodeError::BrokerUnavailable(status_text(&status))),
        };
        let store = inner.store.clone();
        inner
            .blocking(move || store.withdrawal_done(id, &note))
            .await?;
        inner.store.flush_async().await?;
    }
    Ok(())
}

/// What a submit that got no answer within `limit` ([`super::CoreConfig::submit_answer_timeout`])
/// counts as: a transient failure, tried again after the backoff.
fn no_submit_answer(limit: Duration) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!(
        "the broker did not answer the submit within {} s",
        limit.as_secs_f64()
    ))
}

/// Withdraws on the broker message `id`, which its submit's answer found withdrawn here
/// (withdrawals wait for a submit in progress, `submit_gate`, so this should not happen;
/// if it does, the broker must not deliver it). Within `broker_answer_timeout`, as every
/// broker call but a submit: a broker that takes the call and never answers must not
/// hold the submit loop, and every message behind this one, for good (the loop runs it
/// while it holds the gate that withdrawals wait for, too). A withdrawal that got no
/// answer, or a transient failure, is left pending ([`Store::pend_withdrawal`]), for the
/// submit loop to ask again ([`withdraw_pending`]): said only at WARN, the broker would
/// deliver a message withdrawn here.
///
/// [`Store::pend_withdrawal`]: super::store::Store::pend_withdrawal
pub(crate) async fn withdraw_after_submit(
    inner: &Inner,
    client: &mut ExchangeClient<LinkChannel>,
    id: MessageId,
) -> Result<(), tonic::Status> {
    let limit = inner.config.broker_answer_timeout;
    let call = client.withdraw(pb::WithdrawRequest {
        message_id: id.to_string(),
    });
    let answer = match tokio::time::timeout(limit, call).await {
        Ok(answer) => answer.map(drop),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "the broker did not answer the withdrawal within {} ms",
            limit.as_millis()
        ))),
    };
    if let Err(status) = &answer
        && !is_permanent(status.code())
    {
        let store = inner.store.clone();
        let pended = match inner.blocking(move || store.pend_withdrawal(id)).await {
            Ok(_) => inner.store.flush_async().await,
            Err(e) => Err(e),
        };
        if let Err(e) = pended {
            warn!(participant = %inner.config.participant, message_id = %id, error = %e, "cannot record the withdrawal to ask the broker again");
        }
    }
    answer
}

/// Why [`submit_one`] did not end with the broker's answer on disk.
#[derive(Debug)]
enum NotSubmitted {
    /// A transient failure (`BrokerUnavailable`: retry later, in order), which the caller
    /// records or counts.
    Transient(NodeError),
    /// The broker answered, but its answer could not be recorded: the write failed
    /// (`written` false: the entry is as it was, its attempts not counted), or it was
    /// written, with the attempts, but not made durable.
    NotRecorded { error: NodeError, written: bool },
}

/// Submits one entry and records the outcome, counting `attempts` submit attempts on its
/// record (this one, and failed ones not recorded yet). `recording` is set once that
/// record is being written: the write runs to its end even if this future is dropped
/// then (a shutdown), and the attempts are on the record (unless that write fails).
async fn submit_one(
    inner: &Arc<Inner>,
    client: &mut ExchangeClient<LinkChannel>,
    id: MessageId,
    envelope: pb::Envelope,
    attempts: u32,
    recording: &AtomicBool,
) -> Result<(), NotSubmitted> {
    let not_written = |error| NotSubmitted::NotRecorded {
        error,
        written: false,
    };
    let not_flushed = |error| NotSubmitted::NotRecorded {
        error,
        written: true,
    };
    let me = inner.config.participant.clone();
    let kind = Kind::from_pb(envelope.kind).map_or("unspecified", Kind::name);
    let limit = inner.config.submit_answer_timeout;
    let result = tokio::time::timeout(
        limit,
        client.submit(pb::SubmitRequest {
            envelope: Some(envelope),
        }),
    )
    .await
    .unwrap_or_else(|_| Err(no_submit_answer(limit)));
    let now = to_millis(inner.clock.now());
    let store = inner.store.clone();
    match result {
        Ok(receipt) => {
            let duplicate = receipt.into_inner().duplicate;
            recording.store(true, Ordering::Relaxed);
            let updated = inner
                .blocking(move || store.mark_submitted_after(id, now, attempts))
                .await
                .map_err(not_written)?;
            inner.store.flush_async().await.map_err(not_flushed)?;
            info!(participant = %me, message_id = %id, kind = %kind, duplicate, "message submitted");
            let withdrawn = updated.as_ref().is_some_and(|u| {
                u.entry.state == OutboxState::Failed
                    && u.entry
                        .failure
                        .as_ref()
                        .is_some_and(|f| f.outcome == "withdrawn")
            });
            if withdrawn {
                // Withdrawn while it was being submitted: take it back on the broker too.
                if let Err(status) = withdraw_after_submit(inner, client, id).await {
                    warn!(participant = %me, message_id = %id, code = ?status.code(), "withdraw after submit failed (unless final, it is asked again with the pending withdrawals)");
                }
            }
            Ok(())
        }
        Err(status) if is_permanent(status.code()) => {
            let failure = Failure {
                outcome: "rejected-by-broker".into(),
                reason_code: trmx_transport::code_name(status.code()).to_owned(),
                field_path: field_path_of(status.message()),
            };
            let text = status_text(&status);
            // The broker's reason names a field path and rule, ids, kinds
            // or limits, never a value from the body (its error contract).
            warn!(participant = %me, message_id = %id, kind = %kind, code = ?status.code(), reason = broker_message(&status).as_str(), "broker refused message");
            recording.store(true, Ordering::Relaxed);
            inner
                .blocking(move || store.mark_refused(id, failure, &text, now, attempts))
                .await
                .map_err(not_written)?;
            inner.store.flush_async().await.map_err(not_flushed)?;
            Ok(())
        }
        Err(status) => {
            let text = status_text(&status);
            inner.set_error(text.clone());
            Err(NotSubmitted::Transient(NodeError::BrokerUnavailable(text)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        let d = b.next_delay();
        assert!(d >= Duration::from_millis(500), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn status_text_walks_the_source_chain() {
        #[derive(Debug)]
        struct Cause(&'static str, Option<Box<Cause>>);
        impl std::fmt::Display for Cause {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Cause {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|c| c as _)
            }
        }
        let io = Cause("invalid peer certificate: Expired", None);
        // hyper's connect error repeats its cause; it is said once
        let connect = Cause(
            "tcp connect error: invalid peer certificate: Expired",
            Some(Box::new(io)),
        );
        let mut status = tonic::Status::unknown("transport error");
        status.set_source(Arc::new(Cause(
            "client error (Connect)",
            Some(Box::new(connect)),
        )));
        assert_eq!(
            status_text(&status),
            "Unknown: transport error: client error (Connect): \
             tcp connect error: invalid peer certificate: Expired"
        );
        assert_eq!(
            status_text(&tonic::Status::not_found("unknown recipient XX-NOPE")),
            "NotFound: unknown recipient XX-NOPE"
        );
    }

    #[test]
    fn connection_failures_are_logged_when_new_changed_or_persisting() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let refused = "Unknown: transport error: Connection refused";
        assert!(log.failed(refused, t0), "the first failure");
        assert!(!log.failed(refused, t0 + Duration::from_secs(1)));
        assert!(!log.failed(refused, t0 + Duration::from_secs(60)));
        // the same failure, as of another moment
        let expired = |ago: u64| format!("invalid peer certificate: expired {ago} seconds ago");
        let mut log2 = FailureLog::default();
        assert!(log2.failed(&expired(5), t0));
        assert!(!log2.failed(&expired(65), t0 + Duration::from_secs(60)));
        let revoked = "Unknown: transport error: CertificateRevoked";
        assert!(log.failed(revoked, t0 + Duration::from_secs(61)), "changed");
        assert!(!log.failed(revoked, t0 + Duration::from_secs(62)));
        assert!(
            log.failed(revoked, t0 + Duration::from_secs(61) + FAILURE_REPEAT),
            "persisting"
        );
        assert_eq!(log.failures(), 6);
        assert_eq!(log.recovered(), 6);
        assert_eq!(log.recovered(), 0, "no failures since");
        assert!(
            log.failed(revoked, t0 + Duration::from_secs(70)),
            "after a recovery"
        );
    }

    /// A certificate the broker refused is not tried at every check (a doomed handshake
    /// every 5 s): again after a minute, or at once when the files hold another one.
    #[test]
    fn a_refused_certificate_is_tried_again_after_a_minute_or_when_the_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let federation = trmx_certs::Federation::create(dir.path(), "trmx.test").unwrap();
        let info = |id: &str| {
            let cert = federation.participant(id).unwrap();
            trmx_certs::CertInfo::from_pem_file(&cert.cert).unwrap()
        };
        let (bad, other) = (info("NL-NRM"), info("BE-PAYOKE"));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(try_now(None, Some(&bad), t0), "never refused");
        let refused = Refused {
            cert: Some(bad.clone()),
            at: t0,
        };
        let refused = Some(&refused);
        assert!(!try_now(refused, Some(&bad), t0));
        assert!(!try_now(
            refused,
            Some(&bad),
            t0 + REFUSED_RETRY - Duration::from_secs(1)
        ));
        assert!(try_now(refused, Some(&bad), t0 + REFUSED_RETRY));
        assert!(try_now(refused, Some(&other), t0), "the files changed");
        assert!(try_now(refused, None, t0), "the files changed");
        assert!(
            try_now(refused, Some(&bad), t0 - Duration::from_secs(1)),
            "a clock set back"
        );
    }

    #[test]
    fn refusals_of_the_node_are_told_from_a_broker_out_of_reach() {
        assert!(is_refusal(&tonic::Status::unauthenticated(
            "no client certificate"
        )));
        assert!(is_refusal(&tonic::Status::permission_denied(
            "NL-NRM is not in the registry"
        )));
        let mut alert = tonic::Status::unavailable("transport error");
        alert.set_source(Arc::new(std::io::Error::other(
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked),
        )));
        assert!(is_refusal(&alert));
        let mut refused = tonic::Status::unavailable("transport error");
        refused.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(!is_refusal(&refused));
        assert!(!is_refusal(&tonic::Status::unavailable("shutting down")));
    }

    /// The registry's names are shown by `trmx-node participants` on a terminal: a
    /// broker's line breaks and escape sequences in them are escaped, and a long one cut.
    #[test]
    fn registry_names_are_escaped_and_bounded() {
        let shown = participant_info(&pb::Participant {
            id: "BE-PAYOKE".into(),
            display_name: "Payoke\nFORGED\u{1b}[2J".into(),
            country: "B\u{202e}E".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(shown.display_name, "Payoke\\nFORGED\\u{1b}[2J");
        assert_eq!(shown.country, "B\\u{202e}E");
        let long = broker_text(&"z".repeat(5000));
        assert!(long.starts_with(&"z".repeat(MAX_BROKER_TEXT)), "{long}");
        assert!(long.ends_with("(cut: 3976 more characters)"), "{long}");
    }

    /// The bound is on the text as shown: a broker's text of control characters, each
    /// escaped to six bytes or more, or of characters of several bytes, is cut at
    /// [`MAX_BROKER_TEXT`] bytes too (plus the note of the cut), never some 10 KB.
    #[test]
    fn broker_text_is_bounded_as_shown_not_as_received() {
        for text in [
            "\u{1b}".repeat(5000),
            "\u{202e}".repeat(5000),
            "é".repeat(5000),
            "🙂".repeat(5000),
        ] {
            let shown = broker_text(&text);
            let (kept, note) = shown.rsplit_once("… (cut: ").unwrap();
            assert!(kept.len() <= MAX_BROKER_TEXT, "{}", kept.len());
            assert!(kept.len() > MAX_BROKER_TEXT - 10, "{}", kept.len());
            assert!(note.ends_with(" more characters)"), "{note}");
            assert!(shown.len() <= MAX_BROKER_TEXT + 40, "{}", shown.len());
        }
        // (one that fits is shown whole)
        assert_eq!(broker_text(&"\u{1b}".repeat(100)), "\\u{1b}".repeat(100));
    }

    /// A line separator (U+2028) or paragraph separator (U+2029) starts a new line in
    /// many log viewers and editors as a line feed does, and U+061C (Arabic letter
    /// mark) is a bidirectional control as U+200E is: a broker's text with them is
    /// escaped like one with a line feed or an override.
    #[test]
    fn separators_and_every_bidi_control_are_escaped() {
        assert_eq!(
            broker_text("a\u{2028}FORGED\u{2029}b\u{61c}c"),
            "a\\u{2028}FORGED\\u{2029}b\\u{61c}c"
        );
    }

    #[test]
    fn permanent_codes() {
        assert!(is_permanent(Code::InvalidArgument));
        assert!(is_permanent(Code::AlreadyExists));
        assert!(!is_permanent(Code::Unavailable));
        assert!(!is_permanent(Code::ResourceExhausted));
        // refusals of the caller, not of the message
        assert!(!is_permanent(Code::PermissionDenied));
        assert!(!is_permanent(Code::Unauthenticated));
        assert!(!is_permanent(Code::Unimplemented));
    }

    #[test]
    fn field_paths_from_broker_messages() {
        assert_eq!(
            field_path_of("envelope.recipient: unknown participant"),
            "envelope.recipient"
        );
        assert_eq!(field_path_of("recipient does not accept: x"), "");
        assert_eq!(field_path_of("no colon"), "");
    }

    /// The paths `classify` and `classify_receipt` reject with besides those of
    /// `check_delivery` and the body checks (whose own tests check theirs): the
    /// broker takes a `Reject`'s path only when it is made of schema names.
    #[test]
    fn the_paths_a_delivery_is_rejected_with_are_schema_paths() {
        let roots = Kind::ALL.map(trmx_proto::body::Body::root);
        for path in [
            "envelope.recipient",
            "envelope.case_ref",
            "envelope.created_at",
            ID_TAKEN.1,
            "receipt",
            "receipt.message_id",
            "receipt.outcome",
        ]
        .into_iter()
        .chain(roots)
        {
            assert!(trmx_proto::schema::is_field_path(path), "{path}");
        }
    }
}
