//! Unit tests of the node core without a broker: two offline nodes, with
//! the "network" simulated by handing one node's queued envelope to the
//! other's delivery checks, as the broker would.

use std::path::Path;

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

use futures::StreamExt;
use trmx_proto::time::{from_timestamp, to_timestamp};

use super::link::{Verdict, classify, flush_inbox, store_delivery, store_receipt};
use super::store::{Content, IdUse, InboxMark, Incoming, ReceiptEffect, Stored, can_move};
use super::*;

const DAY: Duration = Duration::from_secs(86_400);
/// 2026-12-01T00:00:00Z: after every date in the example bodies. The tests run on a
/// manual clock that starts here, never on the system clock's date: they pass with
/// `START` in the past or far in the future (checked with 2026-09-01 and 2031-06-01). The
/// TLS tests, whose certificates are made at test time, start their clock at the system
/// time instead (see `started`).
const START: u64 = 1_796_083_200;
/// 2037-02-09T00:00:00Z: past the examples' `retain_until` (2036-12-31), before
/// 2038-12-31. A date rather than a step from [`START`], so that `START` can move.
const INTO_2037: u64 = 2_117_750_400;
/// 2039-02-09T00:00:00Z: past 2038-12-31.
const INTO_2039: u64 = 2_180_822_400;

fn body(kind: Kind, json: &str) -> Body {
    Body::from_json(kind, json).unwrap()
}

fn referral() -> Body {
    body(
        Kind::Referral,
        include_str!("../../../proto/examples/01-referral.json"),
    )
}

fn response() -> Body {
    body(
        Kind::ReferralResponse,
        include_str!("../../../proto/examples/02-referral-response.json"),
    )
}

fn follow_up() -> Body {
    body(
        Kind::FollowUp,
        include_str!("../../../proto/examples/03-follow-up-training.json"),
    )
}

/// Everything due on `today` at `node` (one page holds it in these tests).
async fn due_on(node: &NodeCore, today: Date) -> Vec<DueItem> {
    let page = node.due(today, None, 0).await.unwrap();
    assert!(page.next.is_none());
    page.entries
}

fn pid(s: &str) -> ParticipantId {
    ParticipantId::parse(s).unwrap()
}

fn date(s: &str) -> Date {
    Date::parse(s).unwrap()
}

fn config(dir: &Path, me: &str) -> CoreConfig {
    CoreConfig {
        participant: pid(me),
        data_dir: dir.join(me),
        broker_addr: "127.0.0.1:1".into(),
        broker_server_name: "localhost".into(),
        tls: trmx_transport::TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        },
        crl: None,
        max_in_flight: 8,
        reconnect_min: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(100),
        default_lifetime: None,
        retention_check_interval: Duration::from_secs(3600),
        outbox_check_interval: None,
        redrive_watch: Some(Duration::from_secs(30 * 86_400)),
        cache_capacity_bytes: 8 << 20,
        withdraw_timeout: Duration::from_secs(2),
        broker_answer_timeout: Duration::from_secs(10),
        submit_answer_timeout: Duration::from_secs(60),
        certificate_check_interval: Duration::from_millis(50),
        clock_bounds: ClockBounds::default(),
        shutdown_grace: SHUTDOWN_GRACE,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    nl: NodeCore,
    be: NodeCore,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
    let nl = NodeCore::start_offline(config(dir.path(), "NL-NRM"), clock.clone())
        .await
        .unwrap();
    let be = NodeCore::start_offline(config(dir.path(), "BE-PAYOKE"), clock.clone())
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        clock,
        nl,
        be,
    }
}

/// The log lines written on this thread (the `#[tokio::test]` runtime and
/// its tasks) while it lives: INFO and above, and DEBUG of this crate.
struct LogCapture {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn start() -> LogCapture {
        // tracing caches, for the whole process, whether a log line's callsite interests
        // any subscriber, the first time a thread reaches it; a test thread without a
        // capture (no subscriber) cached "never", and a capture running beside it lost
        // that line (now and then "submits accepted again"). A global subscriber that
        // takes every line (and drops it) keeps every callsite interesting; installing
        // it re-asks the callsites cached before.
        static ANCHOR: std::sync::Once = std::sync::Once::new();
        ANCHOR.call_once(|| {
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info,trmx_node=debug")
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        LogCapture {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// The lines that contain every one of `parts`.
    fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        String::from_utf8_lossy(&self.lines.lock().unwrap())
            .lines()
            .filter(|line| parts.iter().all(|p| line.contains(p)))
            .map(str::to_owned)
            .collect()
    }
}

fn request(key: &str, to: &str, body: Body) -> SendRequest {
    SendRequest {
        idempotency_key: key.into(),
        recipient: pid(to),
        case_ref: None,
        in_reply_to: None,
        priority: Priority::Normal,
        body,
        expires_at: None,
    }
}

/// The envelope `from` would submit for `id`, as the broker hands it on.
fn in_transit(from: &NodeCore, id: MessageId) -> pb::Envelope {
    let queued = from.inner.store.queued(1000).unwrap();
    let (_, mut env) = queued.into_iter().find(|(m, _)| *m == id).unwrap();
    env.sender = from.inner.config.participant.to_string();
    env.accepted_at = Some(to_timestamp(from.inner.clock.now()));
    env.broker_seq = 1;
    env
}

/// Hands `id` from `from` to `to`, as a broker would; `to` must store it.
async fn transfer(from: &NodeCore, to: &NodeCore, id: MessageId) -> InboxEntry {
    let env = in_transit(from, id);
    match classify(&to.inner, Some(env)).await.unwrap() {
        Verdict::Store(incoming) => match store_delivery(&to.inner, *incoming).await.unwrap() {
            Stored::New(entry) => entry,
            other => panic!("expected a new entry, got {other:?}"),
        },
        other => panic!("expected store, got {other:?}"),
    }
}

fn receipt_envelope(
    to: &str,
    original: MessageId,
    outcome: pb::Outcome,
    reason: &str,
) -> pb::Envelope {
    let receipt = pb::Receipt {
        message_id: original.to_string(),
        outcome: outcome as i32,
        at: Some(to_timestamp(UNIX_EPOCH + Duration::from_secs(START + 60))),
        attempts: 1,
        last_delivered_at: None,
        reason_code: reason.into(),
        field_path: if reason.is_empty() {
            String::new()
        } else {
            "referral.consent.basis".into()
        },
    };
    let payload = prost::Message::encode_to_vec(&receipt);
    let kind = if outcome == pb::Outcome::Delivered {
        Kind::DeliveryReceipt
    } else {
        Kind::NonDeliveryReport
    };
    pb::Envelope {
        message_id: MessageId::receipt_for(original, outcome).to_string(),
        sender: String::new(),
        recipient: to.into(),
        kind: kind.to_pb() as i32,
        case_ref: CaseRef::new_random().to_string(),
        in_reply_to: String::new(),
        priority: pb::Priority::Normal as i32,
        created_at: Some(to_timestamp(UNIX_EPOCH + Duration::from_secs(START))),
        expires_at: None,
        payload_sha256: trmx_proto::envelope::sha256(&payload).to_vec(),
        payload,
        content_type: kind.content_type(),
        accepted_at: Some(to_timestamp(UNIX_EPOCH + Duration::from_secs(START))),
        broker_seq: 2,
    }
}

async fn apply(node: &NodeCore, env: pb::Envelope) -> ReceiptEffect {
    match classify(&node.inner, Some(env)).await.unwrap() {
        Verdict::Receipt {
            original,
            failure,
            at,
            ..
        } => store_receipt(&node.inner, original, failure, at)
            .await
            .unwrap(),
        other => panic!("expected a receipt, got {other:?}"),
    }
}

#[tokio::test]
async fn send_queues_once_per_idempotency_key_and_survives_restart() {
    let f = fixture().await;
    let first =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    assert_eq!(first.state, OutboxState::Queued);
    assert_eq!(first.kind, Kind::Referral);
    assert_eq!(first.message_id.uuid().get_version_num(), 7);

    let again =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.case_ref, first.case_ref);
    assert_eq!(f.nl.status().outbox_queued, 1);

    let mut other = request("k-1", "BE-PAYOKE", referral());
    other.priority = Priority::Urgent;
    assert!(matches!(
        f.nl.send(other).await,
        Err(NodeError::IdempotencyConflict { key }) if key == "k-1"
    ));
    assert_eq!(f.nl.outbox(&ListFilter::default()).await.unwrap().len(), 1);

    // The envelope to submit is stored: identical bytes every time.
    let a = f.nl.inner.store.queued(10).unwrap();
    let b = f.nl.inner.store.queued(10).unwrap();
    assert_eq!(a[0].1, b[0].1);
    assert!(trmx_proto::envelope::SubmitEnvelope::check(&a[0].1).is_ok());

    // Restart: the entry is still there, still queued.
    let cfg = f.nl.inner.config.clone();
    f.nl.shutdown().await;
    drop(f.nl);
    let nl = NodeCore::start_offline(cfg, f.clock.clone()).await.unwrap();
    let list = nl.outbox(&ListFilter::default()).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].message_id, first.message_id);
    assert_eq!(list[0].state, OutboxState::Queued);
    assert_eq!(nl.status().outbox_queued, 1);
}

/// A retry after the message's own expires_at passed (the first answer was
/// lost, the application retried later) still gets the first entry, as
/// the API promises for the same key and content.
#[tokio::test]
async fn a_retry_after_its_expires_at_passed_gets_the_first_entry() {
    let f = fixture().await;
    let mut req = request("k-1", "BE-PAYOKE", referral());
    req.expires_at = Some(f.clock.now() + Duration::from_secs(60));
    let first = f.nl.send(req.clone()).await.unwrap();
    f.clock.advance(Duration::from_secs(120));
    let again = f.nl.send(req.clone()).await.unwrap();
    assert_eq!(again.message_id, first.message_id);
    // a new message with that expires_at is refused
    req.idempotency_key = "k-2".into();
    let err = f.nl.send(req).await.unwrap_err();
    assert!(
        matches!(&err, NodeError::Invalid(e) if e.field == "expires_at"),
        "{err:?}"
    );
}

/// A body whose `handling.retain_until` has passed (a typo in the year) would be
/// erased by both nodes' retention, perhaps before anyone read it: refused, and
/// nothing stored. Its last day is still ahead; a retry of a message stored before
/// its date passed gets its entry.
#[tokio::test]
async fn a_body_whose_retention_has_passed_is_refused_and_nothing_is_stored() {
    let f = fixture().await;
    // START is 2026-12-01
    let with_retention = |example: &str, until: &str| example.replace("2036-12-31", until);
    let referral_until = |until: &str| {
        body(
            Kind::Referral,
            &with_retention(
                include_str!("../../../proto/examples/01-referral.json"),
                until,
            ),
        )
    };
    for (kind, json, field) in [
        (
            Kind::Referral,
            include_str!("../../../proto/examples/01-referral.json"),
            "referral.handling.retain_until",
        ),
        (
            Kind::ReturnRiskAssessmentRequest,
            include_str!("../../../proto/examples/04-return-risk-assessment-request.json"),
            "return_risk_assessment_request.handling.retain_until",
        ),
    ] {
        let past = body(kind, &with_retention(json, "2026-11-30"));
        let err =
            f.nl.send(request("k-past", "BE-PAYOKE", past))
                .await
                .unwrap_err();
        let NodeError::Invalid(e) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(e.field, field);
        assert!(e.rule.contains("has passed"), "{}", e.rule);
    }
    assert!(
        f.nl.outbox(&ListFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(f.nl.status().outbox_queued, 0);

    // its last day is today: sent
    let today =
        f.nl.send(request(
            "k-today",
            "BE-PAYOKE",
            referral_until("2026-12-01"),
        ))
        .await
        .unwrap();
    // a retry after the date passed gets the entry stored before
    f.clock.advance(2 * DAY);
    let again =
        f.nl.send(request(
            "k-today",
            "BE-PAYOKE",
            referral_until("2026-12-01"),
        ))
        .await
        .unwrap();
    assert_eq!(again.message_id, today.message_id);
}

#[tokio::test]
async fn invalid_requests_are_refused_and_nothing_is_stored() {
    let f = fixture().await;
    let Body::Referral(mut r) = referral() else {
        unreachable!()
    };
    r.person = None;
    let err =
        f.nl.send(request("k-1", "BE-PAYOKE", Body::Referral(r)))
            .await
            .unwrap_err();
    let NodeError::Invalid(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!(e.field, "referral.person");

    // An answer needs in_reply_to.
    let err =
        f.nl.send(request("k-2", "BE-PAYOKE", response()))
            .await
            .unwrap_err();
    assert!(
        matches!(err, NodeError::Invalid(ref e) if e.field == "in_reply_to"),
        "{err:?}"
    );

    // Not to itself.
    let err =
        f.nl.send(request("k-3", "NL-NRM", referral()))
            .await
            .unwrap_err();
    assert!(
        matches!(err, NodeError::Invalid(ref e) if e.field == "recipient"),
        "{err:?}"
    );

    // A bad idempotency key.
    let err =
        f.nl.send(request("has space", "BE-PAYOKE", referral()))
            .await
            .unwrap_err();
    assert!(matches!(err, NodeError::Invalid(ref e) if e.field == "idempotency_key"));

    // Receipts are made by the broker only.
    let receipt = Body::Receipt(pb::Receipt {
        message_id: MessageId::new_v7().to_string(),
        outcome: pb::Outcome::Delivered as i32,
        ..Default::default()
    });
    assert!(matches!(
        f.nl.send(request("k-3", "BE-PAYOKE", receipt)).await,
        Err(NodeError::Invalid(_))
    ));

    assert!(
        f.nl.outbox(&ListFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(f.nl.status().outbox_queued, 0);
    // The key of a refused request is still free.
    assert!(
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .is_ok()
    );
}

#[test]
fn outbox_states_only_move_forward() {
    use OutboxState::*;
    let all = [Queued, Submitted, Delivered, Failed];
    let allowed = [
        (Queued, Submitted),
        (Queued, Delivered),
        (Queued, Failed),
        (Submitted, Delivered),
        (Submitted, Failed),
        (Failed, Delivered),
    ];
    for from in all {
        for to in all {
            assert_eq!(
                can_move(from, to),
                allowed.contains(&(from, to)),
                "{from} -> {to}"
            );
        }
    }
}

#[tokio::test]
async fn receipts_move_the_outbox_forward_only() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let id = sent.message_id;
    let store = f.nl.inner.store.clone();
    let updated = store.mark_submitted(id, 1).unwrap().unwrap();
    assert_eq!(updated.entry.state, OutboxState::Submitted);
    assert_eq!(f.nl.status().outbox_queued, 0);
    assert_eq!(f.nl.status().outbox_submitted, 1);
    assert!(store.queued(10).unwrap().is_empty());

    // A non-delivery report (rejected by the recipient) → FAILED with the reason.
    let effect = apply(
        &f.nl,
        receipt_envelope(
            "NL-NRM",
            id,
            pb::Outcome::RejectedByRecipient,
            "INVALID_BODY",
        ),
    )
    .await;
    assert_eq!(effect, ReceiptEffect::Moved(OutboxState::Failed));
    let entry = f.nl.outbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(entry.state, OutboxState::Failed);
    let failure = entry.failure.unwrap();
    assert_eq!(failure.outcome, "rejected-by-recipient");
    assert_eq!(failure.reason_code, "INVALID_BODY");
    assert_eq!(failure.field_path, "referral.consent.basis");
    assert_eq!(f.nl.status().outbox_failed, 1);

    // A late submit answer does not move it back.
    store.mark_submitted(id, 2).unwrap();
    assert_eq!(
        f.nl.outbox(&ListFilter::default()).await.unwrap()[0].state,
        OutboxState::Failed
    );

    // FAILED → DELIVERED is the one way back (a redriven message: one that expired or
    // was dead-lettered, not one its recipient rejected).
    let effect = apply(
        &f.nl,
        receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, ""),
    )
    .await;
    assert_eq!(
        effect,
        ReceiptEffect::Contradicted {
            state: OutboxState::Failed,
            first: true
        }
    );
    assert_eq!(state(&f.nl, id).await.state, OutboxState::Failed);
    let sent2 =
        f.nl.send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let id = sent2.message_id;
    store.mark_submitted(id, 1).unwrap();
    let effect = apply(
        &f.nl,
        receipt_envelope("NL-NRM", id, pb::Outcome::DeadLettered, "DEAD_LETTERED"),
    )
    .await;
    assert_eq!(effect, ReceiptEffect::Moved(OutboxState::Failed));
    let effect = apply(
        &f.nl,
        receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, ""),
    )
    .await;
    assert_eq!(effect, ReceiptEffect::Moved(OutboxState::Delivered));
    // Nothing moves a delivered message (an expiry's report after it is no contradiction
    // either: a message expired, redriven, then delivered has both, in either order).
    let effect = apply(
        &f.nl,
        receipt_envelope("NL-NRM", id, pb::Outcome::Expired, "EXPIRED"),
    )
    .await;
    assert_eq!(effect, ReceiptEffect::Ignored(OutboxState::Delivered));
    let entry = state(&f.nl, id).await;
    assert_eq!(entry.state, OutboxState::Delivered);
    assert!(entry.failure.is_none());
    let status = f.nl.status();
    assert_eq!((status.outbox_failed, status.outbox_submitted), (1, 0));

    // A receipt for a message we never sent.
    let effect = apply(
        &f.nl,
        receipt_envelope("NL-NRM", MessageId::new_v7(), pb::Outcome::Delivered, ""),
    )
    .await;
    assert_eq!(effect, ReceiptEffect::Unknown);
}

/// A receipt that contradicts the first final report of a message (a delivery receipt
/// after the recipient rejected it or an operator purged it, a non-delivery report after
/// its delivery receipt: what a broken broker sends) leaves the entry as the first report
/// left it, and is said at WARN the first time only, without the case reference.
#[tokio::test]
async fn a_contradictory_receipt_leaves_the_first_report_and_is_said_once() {
    let logs = LogCapture::start();
    let f = fixture().await;
    let rejected =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let delivered =
        f.nl.send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    for id in [rejected.message_id, delivered.message_id] {
        f.nl.inner.store.mark_submitted(id, 1).unwrap();
    }
    let report = |id, outcome, reason| receipt_envelope("NL-NRM", id, outcome, reason);
    assert_eq!(
        apply(
            &f.nl,
            report(
                rejected.message_id,
                pb::Outcome::RejectedByRecipient,
                "INVALID_BODY"
            )
        )
        .await,
        ReceiptEffect::Moved(OutboxState::Failed)
    );
    assert_eq!(
        apply(
            &f.nl,
            report(delivered.message_id, pb::Outcome::Delivered, "")
        )
        .await,
        ReceiptEffect::Moved(OutboxState::Delivered)
    );
    for round in [true, false] {
        assert_eq!(
            apply(
                &f.nl,
                report(rejected.message_id, pb::Outcome::Delivered, "")
            )
            .await,
            ReceiptEffect::Contradicted {
                state: OutboxState::Failed,
                first: round
            }
        );
        assert_eq!(
            apply(
                &f.nl,
                report(delivered.message_id, pb::Outcome::Purged, "PURGED")
            )
            .await,
            ReceiptEffect::Contradicted {
                state: OutboxState::Delivered,
                first: round
            }
        );
    }
    let entry = state(&f.nl, rejected.message_id).await;
    assert_eq!(entry.state, OutboxState::Failed);
    assert_eq!(
        entry.failure.as_ref().map(|f| f.outcome.as_str()),
        Some("rejected-by-recipient")
    );
    // (shown with the entry, as the local API and the CLI show it)
    assert_eq!(entry.contradicted_by, ["delivered"]);
    let entry = state(&f.nl, delivered.message_id).await;
    assert_eq!(entry.contradicted_by, ["purged"]);
    assert_eq!((entry.state, entry.failure), (OutboxState::Delivered, None));
    let status = f.nl.status();
    assert_eq!((status.outbox_failed, status.outbox_submitted), (1, 0));
    for (id, case) in [
        (rejected.message_id, rejected.case_ref),
        (delivered.message_id, delivered.case_ref),
    ] {
        let said = logs.lines_with(&["WARN", "contradicts", &id.to_string()]);
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(!said[0].contains(&case.to_string()), "{}", said[0]);
    }
}

/// A receipt contradicting the first final report is said at WARN even when the flush
/// of its record fails: the record is written, so the same receipt again (the first not
/// acknowledged) is taken as said before; said only after the flush, it was never said.
#[tokio::test]
async fn a_contradiction_whose_record_cannot_be_flushed_is_still_said() {
    let logs = LogCapture::start();
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    f.nl.inner.store.mark_submitted(sent.message_id, 1).unwrap();
    let report = |outcome, reason| receipt_envelope("NL-NRM", sent.message_id, outcome, reason);
    assert_eq!(
        apply(&f.nl, report(pb::Outcome::Delivered, "")).await,
        ReceiptEffect::Moved(OutboxState::Delivered)
    );
    // every flush of NL's store fails from now on
    std::fs::remove_dir_all(f._dir.path().join("NL-NRM").join("blobs")).unwrap();
    for _ in 0..2 {
        let Verdict::Receipt {
            original,
            failure,
            at,
            ..
        } = classify(&f.nl.inner, Some(report(pb::Outcome::Purged, "PURGED")))
            .await
            .unwrap()
        else {
            panic!("a receipt");
        };
        assert!(
            store_receipt(&f.nl.inner, original, failure, at)
                .await
                .is_err()
        );
    }
    let said = logs.lines_with(&["WARN", "contradicts", &sent.message_id.to_string()]);
    assert_eq!(said.len(), 1, "{said:#?}");
}

/// A non-delivery report with another outcome after a rejection or a purge (never
/// redriven: it cannot be true) is a contradiction as the others are: the first report
/// stands, the entry lists it (`contradicted_by`, shown by the local API and the CLI), and
/// it is said at WARN once. After an expiry or a dead-lettering, another outcome reported
/// later is what became of the redriven message: the entry shows it; one reported before
/// (redelivered, its ack lost) changes nothing.
#[tokio::test]
async fn a_second_non_delivery_report_is_a_contradiction_unless_after_a_redrive() {
    let logs = LogCapture::start();
    let f = fixture().await;
    let mut ids = Vec::new();
    for key in ["k-1", "k-2"] {
        let sent =
            f.nl.send(request(key, "BE-PAYOKE", referral()))
                .await
                .unwrap();
        f.nl.inner.store.mark_submitted(sent.message_id, 1).unwrap();
        ids.push(sent.message_id);
    }
    let (rejected, expired) = (ids[0], ids[1]);
    let report = |outcome: &str, reason: &str| {
        Some(Failure {
            outcome: outcome.to_owned(),
            reason_code: reason.to_owned(),
            field_path: String::new(),
        })
    };
    let t = START * 1000;
    let apply_at = |id, failure, at| store_receipt(&f.nl.inner, id, failure, at);
    assert_eq!(
        apply_at(rejected, report("rejected-by-recipient", "INVALID_BODY"), t)
            .await
            .unwrap(),
        ReceiptEffect::Moved(OutboxState::Failed)
    );
    for (outcome, reason, first) in [
        ("purged", "PURGED", true),
        ("purged", "PURGED", false),
        ("expired", "EXPIRED", true),
    ] {
        assert_eq!(
            apply_at(rejected, report(outcome, reason), t + 1000)
                .await
                .unwrap(),
            ReceiptEffect::Contradicted {
                state: OutboxState::Failed,
                first
            },
            "{outcome}"
        );
    }
    let entry = state(&f.nl, rejected).await;
    assert_eq!(
        entry.failure.as_ref().map(|f| f.outcome.as_str()),
        Some("rejected-by-recipient")
    );
    assert_eq!(entry.contradicted_by, ["purged", "expired"]);
    let said = logs.lines_with(&["WARN", "contradicts", &rejected.to_string()]);
    assert_eq!(said.len(), 2, "{said:#?}");

    assert_eq!(
        apply_at(expired, report("expired", "EXPIRED"), t)
            .await
            .unwrap(),
        ReceiptEffect::Moved(OutboxState::Failed)
    );
    // redriven, then rejected by its recipient
    assert_eq!(
        apply_at(
            expired,
            report("rejected-by-recipient", "INVALID_BODY"),
            t + 1000
        )
        .await
        .unwrap(),
        ReceiptEffect::Moved(OutboxState::Failed)
    );
    // the expiry's report again: older than the rejection, no contradiction
    assert_eq!(
        apply_at(expired, report("expired", "EXPIRED"), t)
            .await
            .unwrap(),
        ReceiptEffect::Ignored(OutboxState::Failed)
    );
    let entry = state(&f.nl, expired).await;
    assert_eq!(
        entry.failure.as_ref().map(|f| f.outcome.as_str()),
        Some("rejected-by-recipient")
    );
    assert_eq!(entry.outcome_at, Some(t + 1000));
    assert!(entry.contradicted_by.is_empty(), "{entry:?}");
    let said = logs.lines_with(&["WARN", "contradicts", &expired.to_string()]);
    assert!(said.is_empty(), "{said:#?}");
}

/// A redriven message gets two true reports from the real broker: the non-delivery
/// report of its expiry (or dead-lettering), then the delivery receipt once its recipient
/// stores it. A report redelivered (its ack lost) comes again after the receipt: it says
/// nothing new, and nothing wrong of the broker. The entry stays `DELIVERED`, and no
/// WARN calls the broker broken (an operator would hunt a fault that is not there), nor
/// is a contradiction recorded.
#[tokio::test]
async fn a_redriven_message_s_earlier_report_coming_again_is_no_contradiction() {
    let logs = LogCapture::start();
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let id = sent.message_id;
    f.nl.inner.store.mark_submitted(id, 1).unwrap();
    for (outcome, reason) in [
        (pb::Outcome::Expired, ""),
        (pb::Outcome::DeadLettered, "MAX_ATTEMPTS"),
    ] {
        let report = receipt_envelope("NL-NRM", id, outcome, reason);
        let first = apply(&f.nl, report.clone()).await;
        if outcome == pb::Outcome::Expired {
            assert_eq!(first, ReceiptEffect::Moved(OutboxState::Failed));
            // the operator's redrive: delivered after all
            assert_eq!(
                apply(
                    &f.nl,
                    receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, "")
                )
                .await,
                ReceiptEffect::Moved(OutboxState::Delivered)
            );
        }
        // the report again, after the delivery receipt
        assert_eq!(
            apply(&f.nl, report).await,
            ReceiptEffect::Ignored(OutboxState::Delivered)
        );
    }
    let entry = state(&f.nl, id).await;
    assert_eq!((entry.state, entry.failure), (OutboxState::Delivered, None));
    let said = logs.lines_with(&["WARN", "contradicts", &id.to_string()]);
    assert!(said.is_empty(), "{said:#?}");
}

/// A receipt names the message it reports on in its body, and the broker derives the
/// receipt's own id from that message's id and the outcome (DESIGN.md §3): a receipt
/// under any other id (another message's receipt id, the id of another outcome's, a
/// random one) is no receipt the broker made for this node's message, and is rejected
/// before it moves anything.
#[tokio::test]
async fn a_receipt_whose_id_is_not_derived_from_its_message_is_rejected() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let id = sent.message_id;
    f.nl.inner.store.mark_submitted(id, 1).unwrap();
    let good = receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, "");
    let mut others = Vec::new();
    for forged in [
        MessageId::receipt_id(MessageId::new_v7(), "DELIVERED"),
        MessageId::receipt_id(id, "EXPIRED"),
        MessageId::receipt_id(id, "OUTCOME_DELIVERED"),
        MessageId::new_v7(),
    ] {
        let mut env = good.clone();
        env.message_id = forged.to_string();
        others.push(env);
    }
    for env in others {
        match classify(&f.nl.inner, Some(env)).await.unwrap() {
            Verdict::Reject {
                reason_code,
                field_path,
                ..
            } => assert_eq!(
                (reason_code, field_path.as_str()),
                ("INVALID_BODY", "receipt.message_id")
            ),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    assert_eq!(state(&f.nl, id).await.state, OutboxState::Submitted);
    assert_eq!(
        apply(&f.nl, good).await,
        ReceiptEffect::Moved(OutboxState::Delivered)
    );
}

/// A receipt's `at` is the broker's: one far ahead of this node's clock (a day and more)
/// is taken as the receipt's arrival, and one before the message was queued here as that
/// instant, so that an entry never shows an outcome before it was sent or years ahead.
#[tokio::test]
async fn a_receipt_time_far_ahead_or_before_the_message_is_not_taken() {
    let f = fixture().await;
    let mut ids = Vec::new();
    for key in ["k-1", "k-2"] {
        let sent =
            f.nl.send(request(key, "BE-PAYOKE", referral()))
                .await
                .unwrap();
        f.nl.inner.store.mark_submitted(sent.message_id, 1).unwrap();
        ids.push(sent.message_id);
    }
    let queued_at = state(&f.nl, ids[0]).await.created_at;
    f.clock.advance(Duration::from_secs(600));
    let now = to_millis(f.clock.now());
    for (id, at) in [
        (ids[0], UNIX_EPOCH + Duration::from_secs(START) + 3 * DAY),
        (ids[1], UNIX_EPOCH + Duration::from_secs(START) - DAY),
    ] {
        let mut env = receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, "");
        let mut receipt: pb::Receipt = prost::Message::decode(env.payload.as_slice()).unwrap();
        receipt.at = Some(to_timestamp(at));
        env.payload = prost::Message::encode_to_vec(&receipt);
        env.payload_sha256 = trmx_proto::envelope::sha256(&env.payload).to_vec();
        assert_eq!(
            apply(&f.nl, env).await,
            ReceiptEffect::Moved(OutboxState::Delivered)
        );
    }
    assert_eq!(state(&f.nl, ids[0]).await.outcome_at, Some(now));
    assert_eq!(
        state(&f.nl, ids[1]).await.outcome_at,
        Some(state(&f.nl, ids[1]).await.created_at)
    );
    assert!(queued_at < now);
}

/// The broker makes a receipt's `at`, `created_at` and `accepted_at` from one reading of
/// its own clock (`tx.rs`, `receipt`): a broker whose clock is days ahead sends all three
/// days ahead, and `accepted_at` vouches for nothing. Its `at` is bounded by this node's
/// clock, the only other one there is: taken as the arrival here.
#[tokio::test]
async fn a_receipt_from_a_broker_whose_clock_is_days_ahead_is_taken_as_of_its_arrival() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    f.nl.inner.store.mark_submitted(sent.message_id, 1).unwrap();
    let now = to_millis(f.clock.now());
    let ahead = to_timestamp(f.clock.now() + 3 * DAY);
    let mut env = receipt_envelope("NL-NRM", sent.message_id, pb::Outcome::Delivered, "");
    let mut receipt: pb::Receipt = prost::Message::decode(env.payload.as_slice()).unwrap();
    receipt.at = Some(ahead);
    env.payload = prost::Message::encode_to_vec(&receipt);
    env.payload_sha256 = trmx_proto::envelope::sha256(&env.payload).to_vec();
    env.created_at = Some(ahead);
    env.accepted_at = Some(ahead);
    assert_eq!(
        apply(&f.nl, env).await,
        ReceiptEffect::Moved(OutboxState::Delivered)
    );
    assert_eq!(state(&f.nl, sent.message_id).await.outcome_at, Some(now));
}

/// A delivery receipt for a message withdrawn here (the withdrawal came too late on
/// the broker, or the broker's store was restored from before it) moves the entry to
/// DELIVERED, which is what happened, and its record keeps that it had been withdrawn:
/// a caseworker who withdrew a misaddressed message learns that it arrived all the same.
#[tokio::test]
async fn a_withdrawn_message_that_was_delivered_says_so() {
    let logs = LogCapture::start();
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let id = sent.message_id;
    let store = f.nl.inner.store.clone();
    store.mark_submitted(id, 1).unwrap();
    store.withdraw_local(id, 2, true).unwrap();
    let effect = apply(
        &f.nl,
        receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, ""),
    )
    .await;
    assert_eq!(effect, ReceiptEffect::DeliveredDespiteWithdrawal);
    let id_text = id.to_string();
    let told = logs.lines_with(&["withdrawn here was delivered", &id_text]);
    assert_eq!(told.len(), 1, "{told:?}");
    let entry = f.nl.outbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(entry.state, OutboxState::Delivered);
    assert!(
        entry
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("withdrawn here, but delivered")),
        "{entry:?}"
    );
    // (said once: the same receipt again changes nothing)
    let effect = apply(
        &f.nl,
        receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, ""),
    )
    .await;
    assert_eq!(effect, ReceiptEffect::Ignored(OutboxState::Delivered));
    assert_eq!(
        logs.lines_with(&["withdrawn here was delivered", &id_text])
            .len(),
        1
    );
}

/// A message withdrawn here while the broker was out of reach, whose delivery receipt
/// comes before the node reaches the broker with the withdrawal: the broker's answer to
/// that withdrawal (it could not withdraw a message acknowledged) does not replace the
/// note that it was delivered despite the withdrawal; the state stays DELIVERED.
#[tokio::test]
async fn a_pending_withdrawal_answered_after_the_delivery_keeps_the_delivered_note() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let id = sent.message_id;
    let store = f.nl.inner.store.clone();
    assert!(store.withdraw_here_then_at_broker(id, 2).unwrap());
    assert_eq!(
        apply(
            &f.nl,
            receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, "")
        )
        .await,
        ReceiptEffect::DeliveredDespiteWithdrawal
    );
    assert!(store.withdrawal_pending(id).unwrap());
    store
        .withdrawal_done(
            id,
            "the broker could not withdraw it: message is ACKNOWLEDGED",
        )
        .unwrap();
    assert!(!store.withdrawal_pending(id).unwrap());
    let entry = state(&f.nl, id).await;
    assert_eq!(entry.state, OutboxState::Delivered);
    assert_eq!(
        entry.last_error.as_deref(),
        Some(store::DELIVERED_DESPITE_WITHDRAWAL)
    );
    assert_eq!(f.nl.status().withdrawals_pending, 0);
}

/// A non-delivery report that comes before the submit's answer is recorded (that
/// answer lost, the node restarted) proves that the broker took the message: the
/// entry does not look like one that never left, which its case's retention leaves
/// out (`never_arrived`), so that the case's other bodies would go before the date
/// its recipient knows.
#[tokio::test]
async fn a_report_before_the_submits_answer_counts_the_message_as_submitted() {
    let f = fixture().await;
    let longer = body(
        Kind::ReturnRiskAssessmentRequest,
        &include_str!("../../../proto/examples/04-return-risk-assessment-request.json")
            .replace("2036-12-31", "2038-12-31"),
    );
    // a referral kept until 2036-12-31, a follow-up about the same person, and a
    // request that keeps the case until 2038-12-31
    let referral =
        f.nl.send(request("r-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    deliver(&f.nl, &f.be, referral.message_id).await;
    let mut news = request("n-1", "NL-NRM", follow_up());
    news.case_ref = Some(referral.case_ref);
    let news = f.be.send(news).await.unwrap();
    deliver(&f.be, &f.nl, news.message_id).await;
    let mut late = request("l-1", "BE-PAYOKE", longer);
    late.case_ref = Some(referral.case_ref);
    let late = f.nl.send(late).await.unwrap();
    // its report comes before the submit's answer is recorded
    let effect = apply(
        &f.nl,
        receipt_envelope("NL-NRM", late.message_id, pb::Outcome::Expired, "EXPIRED"),
    )
    .await;
    assert_eq!(effect, ReceiptEffect::Moved(OutboxState::Failed));
    let entry = state(&f.nl, late.message_id).await;
    assert!(entry.submitted_at.is_some(), "{entry:?}");

    f.clock.set(UNIX_EPOCH + Duration::from_secs(INTO_2037));
    f.nl.run_retention().await.unwrap();
    assert_eq!(
        bodies_kept(&f.nl, &[news.message_id]).await,
        [news.message_id],
        "the case goes on until 2038-12-31"
    );
}

async fn state(node: &NodeCore, id: MessageId) -> OutboxEntry {
    node.outbox(&ListFilter::default())
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.message_id == id)
        .unwrap()
}

/// A receipt whose kind and outcome disagree (a delivery receipt saying EXPIRED, a
/// non-delivery report saying DELIVERED: a broken broker) is rejected and changes
/// nothing.
#[tokio::test]
async fn a_receipt_whose_kind_and_outcome_disagree_is_rejected() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    f.nl.inner.store.mark_submitted(sent.message_id, 1).unwrap();
    let mut delivered = receipt_envelope("NL-NRM", sent.message_id, pb::Outcome::Delivered, "");
    delivered.kind = Kind::NonDeliveryReport.to_pb() as i32;
    delivered.content_type = Kind::NonDeliveryReport.content_type();
    let mut expired = receipt_envelope("NL-NRM", sent.message_id, pb::Outcome::Expired, "");
    expired.kind = Kind::DeliveryReceipt.to_pb() as i32;
    expired.content_type = Kind::DeliveryReceipt.content_type();
    for env in [delivered, expired] {
        match classify(&f.nl.inner, Some(env)).await.unwrap() {
            Verdict::Reject {
                reason_code,
                field_path,
                ..
            } => assert_eq!(
                (reason_code, field_path.as_str()),
                ("INVALID_BODY", "receipt.outcome")
            ),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    let entry = f.nl.outbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(entry.state, OutboxState::Submitted);
}

#[tokio::test]
async fn withdraw_a_queued_message() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    f.nl.withdraw(sent.message_id).await.unwrap();
    let entry = f.nl.outbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(entry.state, OutboxState::Failed);
    assert_eq!(entry.failure.unwrap().outcome, "withdrawn");
    assert!(f.nl.inner.store.queued(10).unwrap().is_empty());
    // Twice is harmless; an unknown id is NOT_FOUND.
    f.nl.withdraw(sent.message_id).await.unwrap();
    assert!(matches!(
        f.nl.withdraw(MessageId::new_v7()).await,
        Err(NodeError::NotFound(_))
    ));
    // A received message is not ours to take back: the answer says so
    // (GetMessage finds it, so NOT_FOUND would be a puzzle).
    let other =
        f.nl.send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, other.message_id).await;
    let err = f.be.withdraw(other.message_id).await.unwrap_err();
    assert!(
        matches!(&err, NodeError::FailedPrecondition(m) if m.contains("received")),
        "{err:?}"
    );
}

/// The inbox's lookups, due dates and retention go by message id: a
/// delivery reusing the id of a message here (one this node sent, or one of
/// another sender) is rejected, and nothing is stored.
#[tokio::test]
async fn a_delivery_reusing_another_messages_id_is_rejected() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;
    let rejected = |verdict: Verdict| match verdict {
        Verdict::Reject {
            message_id,
            reason_code,
            field_path,
        } => {
            assert_eq!(message_id, sent.message_id.to_string());
            assert_eq!(reason_code, "DUPLICATE_MESSAGE_ID");
            assert_eq!(field_path, "envelope.message_id");
        }
        other => panic!("expected a rejection, got {other:?}"),
    };

    // a broken BE sends a follow-up under the id of the referral it had
    let mut follow = request("f-1", "NL-NRM", follow_up());
    follow.case_ref = Some(sent.case_ref);
    let reply = f.be.send(follow).await.unwrap();
    let mut env = in_transit(&f.be, reply.message_id);
    env.message_id = sent.message_id.to_string();
    rejected(classify(&f.nl.inner, Some(env)).await.unwrap());

    // another sender uses the id of the message BE has from NL
    let mut env = in_transit(&f.nl, sent.message_id);
    env.sender = "INT-IOM".into();
    let verdict = classify(&f.be.inner, Some(env.clone())).await.unwrap();
    rejected(verdict);
    // (and between the check and the store, the store refuses it too)
    env.message_id = MessageId::new_v7().to_string();
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(env)).await.unwrap() else {
        panic!("a fresh id is stored");
    };
    let mut taken = *incoming;
    taken.message_id = sent.message_id;
    assert!(matches!(
        f.be.inner.store.store_incoming(&taken).unwrap(),
        Stored::IdTaken
    ));
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
    assert_eq!(f.nl.inbox(&ListFilter::default()).await.unwrap().len(), 0);
}

#[tokio::test]
async fn deliveries_are_stored_once_and_replies_mark_answered() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let received = transfer(&f.nl, &f.be, sent.message_id).await;
    assert_eq!(received.seq, 1);
    assert_eq!(received.sender, pid("NL-NRM"));
    assert_eq!(received.case_ref, sent.case_ref);

    // The same delivery again (at-least-once from the broker): not stored twice.
    let again = classify(&f.be.inner, Some(in_transit(&f.nl, sent.message_id)))
        .await
        .unwrap();
    assert!(matches!(again, Verdict::Duplicate(id) if id == sent.message_id));
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
    assert_eq!(f.be.status().inbox_total, 1);

    // The body is shown decoded.
    let Some(MessageView::Inbox(entry, Some(shown))) = f.be.message(sent.message_id).await.unwrap()
    else {
        panic!("expected the inbox entry with its body")
    };
    assert_eq!(entry.seq, 1);
    assert_eq!(shown, referral());

    // BE answers; the case follows the request without being named.
    let mut reply = request("r-1", "NL-NRM", response());
    reply.in_reply_to = Some(sent.message_id);
    let reply = f.be.send(reply).await.unwrap();
    assert_eq!(reply.case_ref, sent.case_ref);
    let be_entry = f.be.inbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(be_entry.answered_by, Some(reply.message_id));

    f.clock.advance(Duration::from_secs(60));
    transfer(&f.be, &f.nl, reply.message_id).await;
    let nl_entry = f.nl.outbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(nl_entry.answered_by, Some(reply.message_id));

    // Both timelines list both messages, in order.
    for (node, first, second) in [
        (&f.nl, Direction::Sent, Direction::Received),
        (&f.be, Direction::Received, Direction::Sent),
    ] {
        let timeline = node
            .case_timeline(sent.case_ref, None, 0)
            .await
            .unwrap()
            .entries;
        assert_eq!(timeline.len(), 2);
        assert_eq!(timeline[0].message_id, sent.message_id);
        assert_eq!(timeline[0].direction, first);
        assert!(
            timeline[0].state.ends_with("+answered"),
            "{}",
            timeline[0].state
        );
        assert_eq!(timeline[1].message_id, reply.message_id);
        assert_eq!(timeline[1].direction, second);
        assert_eq!(timeline[1].in_reply_to, Some(sent.message_id));
    }
    assert!(
        f.nl.case_timeline(CaseRef::new_random(), None, 0)
            .await
            .unwrap()
            .entries
            .is_empty()
    );

    // Filters.
    let by_case = ListFilter {
        case_ref: Some(sent.case_ref),
        ..ListFilter::default()
    };
    assert_eq!(f.be.outbox(&by_case).await.unwrap().len(), 1);
    let by_kind = ListFilter {
        kind: Some(Kind::FollowUp),
        ..ListFilter::default()
    };
    assert!(f.be.inbox(&by_kind).await.unwrap().is_empty());
}

/// A page of a case timeline is bounded whatever is asked: 0 gets the default page,
/// more than the largest page gets the largest.
#[test]
fn case_pages_are_bounded() {
    assert_eq!(case_page_limit(0), CASE_PAGE_DEFAULT);
    assert_eq!(case_page_limit(7), 7);
    assert_eq!(case_page_limit(usize::MAX), CASE_PAGE_MAX);
}

#[tokio::test]
async fn bad_deliveries_are_rejected_with_a_reason_and_not_stored() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let good = in_transit(&f.nl, sent.message_id);

    let verdict_of = |env: pb::Envelope| {
        let be = f.be.clone();
        async move {
            match classify(&be.inner, Some(env)).await.unwrap() {
                Verdict::Reject {
                    reason_code,
                    field_path,
                    ..
                } => {
                    // the broker takes it: a path of schema names (or none)
                    assert!(
                        field_path.is_empty() || trmx_proto::schema::is_field_path(&field_path),
                        "{field_path}"
                    );
                    (reason_code, field_path)
                }
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
    };

    // A body that breaks a DOMAIN.md rule (sent by a hand-made client).
    let Body::Referral(mut r) = referral() else {
        unreachable!()
    };
    r.consent = None;
    let mut env = good.clone();
    env.payload = Body::Referral(r).encode();
    env.payload_sha256 = trmx_proto::envelope::sha256(&env.payload).to_vec();
    assert_eq!(
        verdict_of(env).await,
        ("INVALID_BODY", "referral.consent".to_owned())
    );

    // Bytes that are no body at all.
    let mut env = good.clone();
    env.payload = vec![0xff, 0xff, 0xff];
    env.payload_sha256 = trmx_proto::envelope::sha256(&env.payload).to_vec();
    assert_eq!(
        verdict_of(env).await,
        ("INVALID_BODY", "payload".to_owned())
    );

    // A digest that does not match.
    let mut env = good.clone();
    env.payload.push(0);
    assert_eq!(
        verdict_of(env).await,
        ("DIGEST_MISMATCH", "envelope.payload_sha256".to_owned())
    );

    // Addressed to someone else.
    let mut env = good.clone();
    env.recipient = "DE-BKA".into();
    assert_eq!(
        verdict_of(env).await,
        ("INVALID_ENVELOPE", "envelope.recipient".to_owned())
    );

    // An unknown kind.
    let mut env = good.clone();
    env.kind = 42;
    assert_eq!(verdict_of(env).await.0, "UNKNOWN_SCHEMA");

    assert!(f.be.inbox(&ListFilter::default()).await.unwrap().is_empty());
    assert_eq!(f.be.status().last_inbox_seq, 0);
    // The good one is still accepted afterwards.
    assert_eq!(transfer(&f.nl, &f.be, sent.message_id).await.seq, 1);
}

#[tokio::test]
async fn retention_erases_bodies_and_keeps_metadata() {
    let f = fixture().await;
    // The example referral is kept until 2036-12-31; the follow-up has no date.
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let kept =
        f.nl.send(request("k-2", "BE-PAYOKE", follow_up()))
            .await
            .unwrap();
    f.nl.inner.store.mark_submitted(sent.message_id, 1).unwrap();

    assert_eq!(f.nl.run_retention().await.unwrap(), 0);
    f.clock.set(UNIX_EPOCH + Duration::from_secs(INTO_2037));
    assert_eq!(f.nl.run_retention().await.unwrap(), 1);
    match f.nl.message(sent.message_id).await.unwrap() {
        Some(MessageView::Outbox(entry, body)) => {
            assert!(entry.body_erased);
            assert!(body.is_none());
            assert_eq!(entry.state, OutboxState::Submitted);
        }
        other => panic!("{other:?}"),
    }
    // The follow-up keeps its body.
    match f.nl.message(kept.message_id).await.unwrap() {
        Some(MessageView::Outbox(entry, body)) => {
            assert!(!entry.body_erased);
            assert!(body.is_some());
        }
        other => panic!("{other:?}"),
    }
    // Erasure is done once.
    assert_eq!(f.nl.run_retention().await.unwrap(), 0);
}

/// `transfer`, and the sender's delivery receipt.
async fn deliver(from: &NodeCore, to: &NodeCore, id: MessageId) {
    transfer(from, to, id).await;
    from.inner.store.mark_submitted(id, 1).unwrap();
    let me = from.inner.config.participant.to_string();
    apply(from, receipt_envelope(&me, id, pb::Outcome::Delivered, "")).await;
}

/// Which of `ids` (on `node`) still have their body.
async fn bodies_kept(node: &NodeCore, ids: &[MessageId]) -> Vec<MessageId> {
    let mut kept = Vec::new();
    for &id in ids {
        let erased = match node.message(id).await.unwrap().unwrap() {
            MessageView::Outbox(e, body) => e.body_erased && body.is_none(),
            MessageView::Inbox(e, body) => e.body_erased && body.is_none(),
        };
        if !erased {
            kept.push(id);
        }
    }
    kept
}

/// The answers and follow-ups of a case (about the same person) are erased when the
/// case's retention ends, on both sides: the latest `retain_until` of its requests.
/// A later request that extends it keeps them until its own date; a message of ours
/// still on its way is erased once it has arrived.
#[tokio::test]
async fn retention_erases_a_cases_answers_and_follow_ups_with_it() {
    let f = fixture().await;
    let in_case = |key: &str, to: &str, body: Body, case: CaseRef, reply: Option<MessageId>| {
        let mut req = request(key, to, body);
        req.case_ref = Some(case);
        req.in_reply_to = reply;
        req
    };
    // case A: a referral (kept until 2036-12-31), its answer and a follow-up
    let a =
        f.nl.send(request("a-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    deliver(&f.nl, &f.be, a.message_id).await;
    let a_answer =
        f.be.send(in_case(
            "a-2",
            "NL-NRM",
            response(),
            a.case_ref,
            Some(a.message_id),
        ))
        .await
        .unwrap();
    deliver(&f.be, &f.nl, a_answer.message_id).await;
    let a_news =
        f.be.send(in_case("a-3", "NL-NRM", follow_up(), a.case_ref, None))
            .await
            .unwrap();
    deliver(&f.be, &f.nl, a_news.message_id).await;
    // ours, still queued when the case's retention ends
    let a_late =
        f.nl.send(in_case("a-4", "BE-PAYOKE", follow_up(), a.case_ref, None))
            .await
            .unwrap();
    // case B: the same, and a request that keeps the case until 2038-12-31
    let b =
        f.nl.send(request("b-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    deliver(&f.nl, &f.be, b.message_id).await;
    let b_news =
        f.be.send(in_case("b-2", "NL-NRM", follow_up(), b.case_ref, None))
            .await
            .unwrap();
    deliver(&f.be, &f.nl, b_news.message_id).await;
    let longer = body(
        Kind::ReturnRiskAssessmentRequest,
        &include_str!("../../../proto/examples/04-return-risk-assessment-request.json")
            .replace("2036-12-31", "2038-12-31"),
    );
    let b_request =
        f.nl.send(in_case("b-3", "BE-PAYOKE", longer, b.case_ref, None))
            .await
            .unwrap();
    deliver(&f.nl, &f.be, b_request.message_id).await;

    let case_a = [a.message_id, a_answer.message_id, a_news.message_id];
    let case_b = [b.message_id, b_news.message_id, b_request.message_id];
    f.clock.set(UNIX_EPOCH + Duration::from_secs(INTO_2037));
    f.nl.run_retention().await.unwrap();
    f.be.run_retention().await.unwrap();
    for node in [&f.nl, &f.be] {
        assert_eq!(bodies_kept(node, &case_a).await, [], "case A ended");
        assert_eq!(
            bodies_kept(node, &case_b).await,
            [b_news.message_id, b_request.message_id],
            "case B goes on until 2038-12-31, but the referral's own date passed"
        );
    }
    assert_eq!(
        bodies_kept(&f.nl, &[a_late.message_id]).await,
        [a_late.message_id],
        "on its way"
    );
    // it arrives; the next day's run erases it
    deliver(&f.nl, &f.be, a_late.message_id).await;
    f.clock.advance(DAY);
    assert_eq!(f.nl.run_retention().await.unwrap(), 1);
    assert_eq!(bodies_kept(&f.nl, &[a_late.message_id]).await, []);
    // and what arrives in an ended case goes at the next run
    assert_eq!(f.be.run_retention().await.unwrap(), 1);
    assert_eq!(bodies_kept(&f.be, &[a_late.message_id]).await, []);

    f.clock.set(UNIX_EPOCH + Duration::from_secs(INTO_2039));
    f.nl.run_retention().await.unwrap();
    f.be.run_retention().await.unwrap();
    for node in [&f.nl, &f.be] {
        assert_eq!(bodies_kept(node, &case_b).await, [], "case B ended");
    }
}

/// A request of ours that certainly never reached its recipient (withdrawn while
/// still queued) does not extend its case: the case's other bodies go when the dates
/// the partners know have passed. One that expired after the broker took it still
/// counts: its recipient may have stored it, and a redrive may yet deliver it.
#[tokio::test]
async fn a_request_that_never_left_does_not_extend_its_cases_retention() {
    let f = fixture().await;
    let longer = || {
        body(
            Kind::ReturnRiskAssessmentRequest,
            &include_str!("../../../proto/examples/04-return-risk-assessment-request.json")
                .replace("2036-12-31", "2038-12-31"),
        )
    };
    // Two cases, each with a referral kept until 2036-12-31, a follow-up about the
    // same person, and a request that would keep the case until 2038-12-31.
    let mut cases = Vec::new();
    for n in 0..2 {
        let referral =
            f.nl.send(request(&format!("r-{n}"), "BE-PAYOKE", referral()))
                .await
                .unwrap();
        deliver(&f.nl, &f.be, referral.message_id).await;
        let mut news = request(&format!("n-{n}"), "NL-NRM", follow_up());
        news.case_ref = Some(referral.case_ref);
        let news = f.be.send(news).await.unwrap();
        deliver(&f.be, &f.nl, news.message_id).await;
        let mut late = request(&format!("l-{n}"), "BE-PAYOKE", longer());
        late.case_ref = Some(referral.case_ref);
        let late = f.nl.send(late).await.unwrap();
        cases.push((referral, news, late));
    }
    // case 0: the request is withdrawn before it ever left the node
    let (_, never_news, never) = &cases[0];
    assert!(matches!(
        f.nl.withdraw(never.message_id).await.unwrap(),
        Withdrawal::BrokerPending
    ));
    // case 1: the request expired after the broker took it
    let (_, expired_news, expired) = &cases[1];
    f.nl.inner
        .store
        .mark_submitted(expired.message_id, 1)
        .unwrap();
    let report = receipt_envelope(
        "NL-NRM",
        expired.message_id,
        pb::Outcome::Expired,
        "EXPIRED",
    );
    assert_eq!(
        apply(&f.nl, report).await,
        ReceiptEffect::Moved(OutboxState::Failed)
    );

    f.clock.set(UNIX_EPOCH + Duration::from_secs(INTO_2037));
    f.nl.run_retention().await.unwrap();
    assert_eq!(
        bodies_kept(&f.nl, &[never_news.message_id, never.message_id]).await,
        [never.message_id],
        "case 0 ended with its referral; the withdrawn request keeps only its own body"
    );
    assert_eq!(
        bodies_kept(&f.nl, &[expired_news.message_id]).await,
        [expired_news.message_id],
        "case 1 goes on until 2038-12-31"
    );
}

#[test]
fn a_start_refuses_a_clock_far_from_the_last_run() {
    let bounds = ClockBounds::default();
    let last = START * 1000;
    let week = 7 * 86_400_000;
    // a new store, or a clock within the bounds (a little behind: said, not refused)
    check_clock(None, 0, bounds).unwrap();
    check_clock(Some(last), last - 3_600_000, bounds).unwrap();
    check_clock(Some(last), last + week, bounds).unwrap();
    // further than max_downtime_secs, either way
    for now in [last + week + 1, last - week - 1] {
        let refused = check_clock(Some(last), now, bounds).unwrap_err();
        assert!(matches!(refused, NodeError::ClockJump(_)), "{refused}");
        assert!(
            refused
                .to_string()
                .contains("more than storage.max_downtime_secs (604800)"),
            "{refused}"
        );
    }
    // max_downtime_secs = 0 turns the check off
    let off = ClockBounds {
        max_downtime: None,
        ..bounds
    };
    check_clock(Some(last), last + 3650 * 86_400_000, off).unwrap();
    check_clock(Some(last), 0, off).unwrap();
}

/// A wall clock set years ahead while the node runs (a mistyped date)
/// erases no body before its retention date; restarting the node is what
/// accepts the new time (and for a jump that large, `trmx-node accept-clock`
/// before it).
#[tokio::test]
async fn a_jump_of_the_system_clock_erases_no_body_until_a_restart() {
    #[derive(Debug, Clone)]
    struct Settable(Arc<Mutex<SystemTime>>);
    impl TimeSource for Settable {
        fn wall(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
        fn elapsed(&self) -> Duration {
            Duration::ZERO
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let time = Settable(Arc::new(Mutex::new(
        UNIX_EPOCH + Duration::from_secs(START),
    )));
    let clock = || {
        Arc::new(GuardedClock::new(
            time.clone(),
            Duration::from_secs(60),
            "restart",
        ))
    };
    let nl = NodeCore::start_offline(config(dir.path(), "NL-NRM"), clock())
        .await
        .unwrap();
    // the example referral is kept until 2036-12-31
    let sent = nl
        .send(request("k-1", "BE-PAYOKE", referral()))
        .await
        .unwrap();
    *time.0.lock().unwrap() += DAY * 365 * 11;
    assert_eq!(nl.run_retention().await.unwrap(), 0);
    assert!(!nl.outbox(&ListFilter::default()).await.unwrap()[0].body_erased);
    nl.shutdown().await;
    drop(nl);

    // Eleven years is more than `storage.max_downtime_secs`: the start asks for the
    // clock to be accepted first (`trmx-node accept-clock`), and erases nothing.
    // (the old core's tasks may still be letting go of the database)
    let mut tries = 0;
    let refused = loop {
        match NodeCore::start_offline(config(dir.path(), "NL-NRM"), clock()).await {
            Ok(_) => panic!("the node started"),
            Err(NodeError::Store(e)) if tries < 100 => {
                tries += 1;
                eprintln!("restart: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, NodeError::ClockJump(_)), "{refused}");
    for part in [
        "after the last time the node ran on this store",
        "4015.0 days after",
        "storage.max_downtime_secs (604800)",
        "trmx-node --config <its config> accept-clock` once as the node's user",
    ] {
        assert!(refused.to_string().contains(part), "{part:?}: {refused}");
    }
    let cfg = config(dir.path(), "NL-NRM");
    let wall = *time.0.lock().unwrap();
    let before = accept_clock(&cfg.data_dir, wall).unwrap();
    assert_eq!(before, Some(START * 1000), "the last run was at the start");
    let nl = NodeCore::start_offline(cfg, clock()).await.unwrap();
    nl.run_retention().await.unwrap(); // (or the run at start did it)
    match nl.message(sent.message_id).await.unwrap() {
        Some(MessageView::Outbox(entry, None)) => assert!(entry.body_erased),
        other => panic!("{other:?}"),
    }
}

/// `check-config` checks the clock against the last-run file, never the store: the node
/// writes there the instant it records in its store, at start and then every minute.
#[tokio::test(start_paused = true)]
async fn the_last_run_file_follows_the_running_mark() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
    let cfg = config(dir.path(), "NL-NRM");
    let nl = NodeCore::start_offline(cfg.clone(), clock.clone())
        .await
        .unwrap();
    let file = |at: u64| last_run::LastRun::At(at);
    assert_eq!(last_run::read(&cfg.data_dir), file(START * 1000));
    let mode = std::fs::metadata(last_run::path(&cfg.data_dir))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    clock.advance(Duration::from_secs(3600));
    let marked = (START + 3600) * 1000;
    // (the paused runtime's time moves on when it waits)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while last_run::read(&cfg.data_dir) != file(marked) {
        assert!(std::time::Instant::now() < deadline, "not written");
        tokio::time::sleep(RUNNING_MARK_INTERVAL).await;
    }
    assert_eq!(nl.inner.store.last_running().unwrap(), Some(marked));
    nl.shutdown().await;
}

/// The last-run file only serves `check-config`; the store's mark is what the start
/// checks. A node that cannot write the file (here a directory where its temporary file
/// goes) starts and works all the same, and says why at WARN.
#[tokio::test]
async fn a_last_run_file_that_cannot_be_written_does_not_stop_the_node() {
    let logs = LogCapture::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "NL-NRM");
    std::fs::create_dir_all(cfg.data_dir.join("last-run.json.tmp")).unwrap();
    let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
    let nl = NodeCore::start_offline(cfg.clone(), clock).await.unwrap();
    nl.send(request("k-1", "BE-PAYOKE", referral()))
        .await
        .unwrap();
    assert_eq!(last_run::read(&cfg.data_dir), last_run::LastRun::Missing);
    assert_eq!(
        logs.lines_with(&["WARN", "cannot write the last-run file", "failures=1"])
            .len(),
        1,
        "{:?}",
        logs.lines_with(&["last-run"])
    );
    nl.shutdown().await;
}

#[tokio::test]
async fn received_bodies_are_erased_too() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;
    f.clock.set(UNIX_EPOCH + Duration::from_secs(INTO_2037));
    assert_eq!(f.be.run_retention().await.unwrap(), 1);
    match f.be.message(sent.message_id).await.unwrap() {
        Some(MessageView::Inbox(entry, None)) => assert!(entry.body_erased),
        other => panic!("{other:?}"),
    }
    let listed = f.be.inbox(&ListFilter::default()).await.unwrap();
    assert!(listed[0].body_erased);
}

/// The answer that the received request `id` shows in every view: its inbox
/// listing, the message itself, and the case timeline ("received+answered").
async fn shown_answer(node: &NodeCore, id: MessageId) -> Option<MessageId> {
    let listed = node.inbox(&ListFilter::default()).await.unwrap();
    let listed = listed.iter().find(|e| e.message_id == id).unwrap();
    let Some(MessageView::Inbox(entry, _)) = node.message(id).await.unwrap() else {
        panic!("{id} is not in the inbox");
    };
    let timeline = node
        .case_timeline(entry.case_ref, None, 0)
        .await
        .unwrap()
        .entries;
    let row = timeline.iter().find(|e| e.message_id == id).unwrap();
    assert_eq!(listed.answered_by, entry.answered_by);
    assert_eq!(
        row.state == "received+answered",
        entry.answered_by.is_some(),
        "{row:?}"
    );
    entry.answered_by
}

/// A reply that failed (withdrawn, or refused by the broker) answers
/// nothing: the request is owed an answer again, and no view calls it
/// answered.
#[tokio::test]
async fn a_reply_that_failed_leaves_the_answer_owed() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;
    let mut reply = request("r-1", "NL-NRM", response());
    reply.in_reply_to = Some(sent.message_id);
    let reply = f.be.send(reply).await.unwrap();
    assert!(due_on(&f.be, date("2026-02-01")).await.is_empty());
    assert_eq!(
        shown_answer(&f.be, sent.message_id).await,
        Some(reply.message_id)
    );
    f.be.withdraw(reply.message_id).await.unwrap();
    let owed = due_on(&f.be, date("2026-02-01")).await;
    assert_eq!(owed.len(), 1, "{owed:?}");
    assert_eq!(owed[0].what, DueKind::AnswerOwed);
    assert_eq!(owed[0].message_id, sent.message_id);
    assert_eq!(shown_answer(&f.be, sent.message_id).await, None);
    // a second reply answers it
    let mut again = request("r-2", "NL-NRM", response());
    again.in_reply_to = Some(sent.message_id);
    let again = f.be.send(again).await.unwrap();
    assert!(due_on(&f.be, date("2026-02-01")).await.is_empty());
    assert_eq!(
        shown_answer(&f.be, sent.message_id).await,
        Some(again.message_id)
    );
    // a third, sent while the second is on its way, is not recorded; when the
    // second fails, the third is the answer shown
    let mut third = request("r-3", "NL-NRM", response());
    third.in_reply_to = Some(sent.message_id);
    let third = f.be.send(third).await.unwrap();
    f.be.withdraw(again.message_id).await.unwrap();
    assert!(due_on(&f.be, date("2026-02-01")).await.is_empty());
    assert_eq!(
        shown_answer(&f.be, sent.message_id).await,
        Some(third.message_id)
    );
}

/// A reply that cannot answer the message its in_reply_to names is refused,
/// naming the field, and changes nothing: the request stays owed.
#[tokio::test]
async fn a_reply_to_the_wrong_participant_case_or_kind_is_refused() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;

    let assessment = body(
        Kind::ReturnRiskAssessment,
        include_str!("../../../proto/examples/05-return-risk-assessment.json"),
    );
    let other_case = CaseRef::new_random();
    let cases = [
        ("r-to", "NG-NAPTIP", response(), None, "in_reply_to"),
        ("r-case", "NL-NRM", response(), Some(other_case), "case_ref"),
        ("r-kind", "NL-NRM", assessment, None, "in_reply_to"),
    ];
    for (key, to, reply, case_ref, field) in cases {
        let mut reply = request(key, to, reply);
        reply.in_reply_to = Some(sent.message_id);
        reply.case_ref = case_ref;
        let err = f.be.send(reply).await.unwrap_err();
        assert!(
            matches!(&err, NodeError::Invalid(e) if e.field == field),
            "{key}: {err:?}"
        );
    }
    assert!(
        f.be.outbox(&ListFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    let owed = due_on(&f.be, date("2026-02-01")).await;
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].what, DueKind::AnswerOwed);

    // the reply to its sender, in its case (given or taken from it), is fine
    let mut reply = request("r-ok", "NL-NRM", response());
    reply.in_reply_to = Some(sent.message_id);
    let reply = f.be.send(reply).await.unwrap();
    assert_eq!(reply.case_ref, sent.case_ref);
    assert!(due_on(&f.be, date("2026-02-01")).await.is_empty());
}

/// The broker does not check a message's `created_at` (its sender's clock), and the
/// node dates the body, the case timeline and the latest follow-up by it: one made
/// more than a day after the broker accepted it and after it arrived here is
/// rejected; a clock a little ahead is fine.
#[tokio::test]
async fn a_delivery_made_after_the_broker_accepted_it_is_rejected() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let good = in_transit(&f.nl, sent.message_id);
    let accepted = from_timestamp(good.accepted_at.as_ref().unwrap()).unwrap();
    let mut env = good.clone();
    env.created_at = Some(to_timestamp(accepted + 2 * DAY));
    match classify(&f.be.inner, Some(env)).await.unwrap() {
        Verdict::Reject {
            reason_code,
            field_path,
            ..
        } => assert_eq!(
            (reason_code, field_path.as_str()),
            ("INVALID_ENVELOPE", "envelope.created_at")
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(f.be.inbox(&ListFilter::default()).await.unwrap().is_empty());
    let mut env = good.clone();
    env.created_at = Some(to_timestamp(accepted + Duration::from_secs(3600)));
    assert!(matches!(
        classify(&f.be.inner, Some(env)).await.unwrap(),
        Verdict::Store(_)
    ));
    // a broker whose clock is far behind does not make it one made in the future
    let mut env = good;
    env.accepted_at = Some(to_timestamp(accepted - 400 * DAY));
    assert!(matches!(
        classify(&f.be.inner, Some(env)).await.unwrap(),
        Verdict::Store(_)
    ));
}

/// A message stored here that comes again is acknowledged as a duplicate whatever the
/// checks of new messages say of it now: one stored while this node's clock was ahead
/// (or by a version without the `created_at` check) and delivered again after the clock
/// was set right is not rejected, which would dead-letter it on the broker and tell its
/// sender that a message stored here never arrived.
#[tokio::test]
async fn a_stored_message_delivered_again_is_a_duplicate_whatever_its_created_at() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let mut env = in_transit(&f.nl, sent.message_id);
    let accepted = from_timestamp(env.accepted_at.as_ref().unwrap()).unwrap();
    env.created_at = Some(to_timestamp(accepted + 2 * DAY));
    f.clock.set(accepted + 3 * DAY);
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(env.clone())).await.unwrap() else {
        panic!("stored while the clock was ahead");
    };
    store_delivery(&f.be.inner, *incoming).await.unwrap();
    f.clock.set(accepted);
    match classify(&f.be.inner, Some(env)).await.unwrap() {
        Verdict::Duplicate(id) => assert_eq!(id, sent.message_id),
        other => panic!("expected a duplicate, got {other:?}"),
    }
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
}

/// A stored message is a duplicate before its envelope is checked as well: a redelivery
/// whose envelope a check of a newer version refuses (here a content type it no longer
/// takes for the kind, stored by a version that took it), or whose payload came damaged
/// while its digest field is that of the stored message, is acknowledged, not rejected,
/// which would dead-letter a message stored here and tell its sender that it never
/// arrived. A message never stored is checked as ever.
#[tokio::test]
async fn a_stored_message_delivered_again_is_a_duplicate_before_the_envelope_checks() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let good = in_transit(&f.nl, sent.message_id);
    let never_stored = good.clone();
    let Verdict::Store(mut incoming) = classify(&f.be.inner, Some(good.clone())).await.unwrap()
    else {
        panic!("stored");
    };
    // (as a version that took that content type stored it)
    incoming.content_type = "text/plain".into();
    store_delivery(&f.be.inner, *incoming).await.unwrap();
    let mut refused_now = good;
    refused_now.content_type = "text/plain".into();
    let mut damaged = refused_now.clone();
    damaged.payload.push(0);
    for env in [refused_now, damaged.clone()] {
        match classify(&f.be.inner, Some(env)).await.unwrap() {
            Verdict::Duplicate(id) => assert_eq!(id, sent.message_id),
            other => panic!("expected a duplicate, got {other:?}"),
        }
    }
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
    // (the same damage to a message not stored here is refused)
    let mut damaged = never_stored;
    damaged.message_id = MessageId::new_v7().to_string();
    damaged.payload.push(0);
    match classify(&f.be.inner, Some(damaged)).await.unwrap() {
        Verdict::Reject { field_path, .. } => assert_eq!(field_path, "envelope.payload_sha256"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// `accepted_at` is the broker's field: a delivery without it, or with one that is no
/// instant, is the broker's defect, and the sender's message is not rejected for it
/// (that would dead-letter it and send its sender a non-delivery report). It is stored,
/// as accepted when it arrived here.
#[tokio::test]
async fn a_delivery_without_accepted_at_is_stored_not_blamed_on_its_sender() {
    let logs = LogCapture::start();
    let f = fixture().await;
    for (key, broken) in [
        ("k-1", None),
        (
            "k-2",
            Some(pb::Timestamp {
                seconds: 1,
                nanos: -5,
            }),
        ),
    ] {
        let sent =
            f.nl.send(request(key, "BE-PAYOKE", referral()))
                .await
                .unwrap();
        let mut env = in_transit(&f.nl, sent.message_id);
        env.accepted_at = broken;
        let incoming = match classify(&f.be.inner, Some(env)).await.unwrap() {
            Verdict::Store(incoming) => incoming,
            other => panic!("expected it stored, got {other:?}"),
        };
        assert_eq!(incoming.accepted_at, to_millis(f.clock.now()));
        store_delivery(&f.be.inner, *incoming).await.unwrap();
        let said = logs.lines_with(&["WARN", "broker defect", &sent.message_id.to_string()]);
        assert_eq!(said.len(), 1, "{said:#?}");
    }
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 2);
}

/// Receipts are made by the broker and are not deduplicated by their id: a second
/// receipt under the id of one applied before (the broker makes one anew when a
/// message id is used again after its metadata was deleted, `Tx::receipt`), with other
/// content (another `at`, other attempts), is applied and acknowledged like the first,
/// not rejected as other content under a used id, which would dead-letter it on the
/// broker; and a message stored from another sender under that id changes nothing.
#[tokio::test]
async fn a_second_receipt_under_the_same_id_is_applied_not_rejected() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let id = sent.message_id;
    f.nl.inner.store.mark_submitted(id, 1).unwrap();
    let first = receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, "");
    assert_eq!(
        apply(&f.nl, first.clone()).await,
        ReceiptEffect::Moved(OutboxState::Delivered)
    );
    let mut second = first.clone();
    let body = pb::Receipt {
        message_id: id.to_string(),
        outcome: pb::Outcome::Delivered as i32,
        at: Some(to_timestamp(UNIX_EPOCH + Duration::from_secs(START + 7200))),
        attempts: 3,
        ..Default::default()
    };
    second.payload = prost::Message::encode_to_vec(&body);
    second.payload_sha256 = trmx_proto::envelope::sha256(&second.payload).to_vec();
    assert_ne!(second.payload, first.payload);
    assert_eq!(second.message_id, first.message_id);
    match classify(&f.nl.inner, Some(second.clone())).await.unwrap() {
        Verdict::Receipt { original, .. } => assert_eq!(original, id),
        other => panic!("expected the receipt applied, got {other:?}"),
    }
    assert_eq!(
        apply(&f.nl, second).await,
        ReceiptEffect::Ignored(OutboxState::Delivered)
    );
    let entry = f.nl.outbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(entry.state, OutboxState::Delivered);
    assert!(f.nl.inbox(&ListFilter::default()).await.unwrap().is_empty());
}

/// A delivery without `accepted_at` is stored as accepted when it arrived; when it
/// comes again later (its ack lost, a restart), still without one, it is a duplicate,
/// and the stored entry keeps the time of its first arrival: "on arrival" is taken once.
#[tokio::test]
async fn a_redelivery_without_accepted_at_keeps_the_first_arrival() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let mut env = in_transit(&f.nl, sent.message_id);
    env.accepted_at = None;
    let first = to_millis(f.clock.now());
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(env.clone())).await.unwrap() else {
        panic!("stored");
    };
    store_delivery(&f.be.inner, *incoming).await.unwrap();
    f.clock.advance(Duration::from_secs(3600));
    assert!(matches!(
        classify(&f.be.inner, Some(env)).await.unwrap(),
        Verdict::Duplicate(id) if id == sent.message_id
    ));
    let inbox = f.be.inbox(&ListFilter::default()).await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].accepted_at, first);
}

/// A delivery with the sender and id of a message stored here but another payload is
/// not that message again: the stored one is kept as it is, and the delivery is
/// rejected (`DUPLICATE_MESSAGE_ID`) rather than acknowledged, which would tell its
/// sender that content never stored was delivered. The same message again is still a
/// duplicate.
#[tokio::test]
async fn a_redelivery_with_other_content_is_rejected_and_the_first_kept() {
    let logs = LogCapture::start();
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let good = in_transit(&f.nl, sent.message_id);
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(good.clone())).await.unwrap() else {
        panic!("the first is stored");
    };
    let mut other_incoming = (*incoming).clone();
    let entry = match store_delivery(&f.be.inner, *incoming).await.unwrap() {
        Stored::New(entry) => entry,
        other => panic!("expected a new entry, got {other:?}"),
    };
    let first_body = f.be.inner.store.inbox_body(entry.seq).unwrap();

    let mut other = good.clone();
    other.payload = b"other content".to_vec();
    other.payload_sha256 = trmx_proto::envelope::sha256(&other.payload).to_vec();
    match classify(&f.be.inner, Some(other)).await.unwrap() {
        Verdict::Reject {
            message_id,
            reason_code,
            field_path,
        } => assert_eq!(
            (message_id, reason_code, field_path.as_str()),
            (
                sent.message_id.to_string(),
                "DUPLICATE_MESSAGE_ID",
                "envelope.message_id"
            )
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    let said = logs.lines_with(&["WARN", "other content", &sent.message_id.to_string()]);
    assert_eq!(said.len(), 1, "{said:#?}");
    assert!(!said[0].contains("other content\""), "{}", said[0]);

    // (the same, found by the store's own check: stored between the two)
    other_incoming.payload_sha256 = trmx_proto::envelope::sha256(b"other content");
    other_incoming.body = b"other content".to_vec();
    assert!(matches!(
        f.be.inner.store.store_incoming(&other_incoming).unwrap(),
        Stored::Conflict
    ));

    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
    assert_eq!(f.be.inner.store.inbox_body(entry.seq).unwrap(), first_body);
    assert!(matches!(
        classify(&f.be.inner, Some(good)).await.unwrap(),
        Verdict::Duplicate(id) if id == sent.message_id
    ));
}

/// A redelivery with the sender, id and payload of a message stored here but another
/// case, kind or message answered (only a broken broker sends one: the real one refuses
/// such a submit, `ALREADY_EXISTS`) is not that message again either: the stored one is
/// kept as it is and the delivery rejected (`DUPLICATE_MESSAGE_ID`), not acknowledged
/// with its difference dropped unseen. The log names neither case reference.
#[tokio::test]
async fn a_redelivery_with_another_case_kind_or_reply_is_rejected_and_the_first_kept() {
    let logs = LogCapture::start();
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let good = in_transit(&f.nl, sent.message_id);
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(good.clone())).await.unwrap() else {
        panic!("the first is stored");
    };
    let stored_incoming = (*incoming).clone();
    let Stored::New(entry) = store_delivery(&f.be.inner, *incoming).await.unwrap() else {
        panic!("a new entry");
    };

    let other_case = CaseRef::new_random();
    let mut other_case_env = good.clone();
    other_case_env.case_ref = other_case.to_string();
    let mut other_kind_env = good.clone();
    other_kind_env.kind = Kind::FollowUp.to_pb() as i32;
    let mut a_reply_env = good.clone();
    a_reply_env.in_reply_to = MessageId::new_v7().to_string();
    for (what, env) in [
        ("case", other_case_env),
        ("kind", other_kind_env),
        ("in_reply_to", a_reply_env),
    ] {
        match classify(&f.be.inner, Some(env)).await.unwrap() {
            Verdict::Reject {
                message_id,
                reason_code,
                field_path,
            } => assert_eq!(
                (message_id, reason_code, field_path.as_str()),
                (
                    sent.message_id.to_string(),
                    "DUPLICATE_MESSAGE_ID",
                    "envelope.message_id"
                ),
                "{what}"
            ),
            other => panic!("{what}: expected a rejection, got {other:?}"),
        }
    }
    let said = logs.lines_with(&["WARN", "other content", &sent.message_id.to_string()]);
    assert_eq!(said.len(), 3, "{said:#?}");
    for line in &said {
        assert!(!line.contains(&other_case.to_string()), "{line}");
        assert!(!line.contains(&entry.case_ref.to_string()), "{line}");
    }

    // (the same, found by the store's own check: stored between the check and the store)
    for changed in [
        Incoming {
            case_ref: other_case,
            ..stored_incoming.clone()
        },
        Incoming {
            kind: Kind::FollowUp,
            ..stored_incoming.clone()
        },
        Incoming {
            in_reply_to: Some(MessageId::new_v7()),
            ..stored_incoming.clone()
        },
    ] {
        assert!(matches!(
            f.be.inner.store.store_incoming(&changed).unwrap(),
            Stored::Conflict
        ));
    }

    let inbox = f.be.inbox(&ListFilter::default()).await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(
        (inbox[0].case_ref, inbox[0].kind, inbox[0].in_reply_to),
        (entry.case_ref, Kind::Referral, None)
    );
    assert!(matches!(
        classify(&f.be.inner, Some(good)).await.unwrap(),
        Verdict::Duplicate(id) if id == sent.message_id
    ));
}

/// A redelivery with the sender, id, payload, case, kind and message answered of a message
/// stored here but another priority, creation instant or content type (the same bytes
/// read as JSON rather than protobuf) is not that message again either: rejected
/// (`DUPLICATE_MESSAGE_ID`) and the stored one kept, by the early check and by the
/// store's own. One with another `expires_at` only is that message again: an operator's
/// redrive gives a message a new one, and the message may be one this node stored.
#[tokio::test]
async fn a_redelivery_with_another_priority_creation_or_content_type_is_rejected() {
    let logs = LogCapture::start();
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let good = in_transit(&f.nl, sent.message_id);
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(good.clone())).await.unwrap() else {
        panic!("the first is stored");
    };
    let stored_incoming = (*incoming).clone();
    let Stored::New(entry) = store_delivery(&f.be.inner, *incoming).await.unwrap() else {
        panic!("a new entry");
    };

    let mut urgent = good.clone();
    urgent.priority = pb::Priority::Urgent as i32;
    let mut earlier = good.clone();
    let created = from_timestamp(good.created_at.as_ref().unwrap()).unwrap();
    earlier.created_at = Some(to_timestamp(created - Duration::from_secs(1)));
    let mut as_json = good.clone();
    as_json.content_type = "application/json; proto=trmx.v1.Referral".to_owned();
    for (what, env) in [
        ("priority", urgent),
        ("created_at", earlier),
        ("content_type", as_json),
    ] {
        match classify(&f.be.inner, Some(env)).await.unwrap() {
            Verdict::Reject {
                message_id,
                reason_code,
                field_path,
            } => assert_eq!(
                (message_id, reason_code, field_path.as_str()),
                (
                    sent.message_id.to_string(),
                    "DUPLICATE_MESSAGE_ID",
                    "envelope.message_id"
                ),
                "{what}"
            ),
            other => panic!("{what}: expected a rejection, got {other:?}"),
        }
    }
    let said = logs.lines_with(&["WARN", "other content", &sent.message_id.to_string()]);
    assert_eq!(said.len(), 3, "{said:#?}");

    // (the same, found by the store's own check: stored between the check and the store)
    for (what, changed) in [
        (
            "priority",
            Incoming {
                priority: Priority::Urgent,
                ..stored_incoming.clone()
            },
        ),
        (
            "created_at",
            Incoming {
                created_at: stored_incoming.created_at - 1,
                ..stored_incoming.clone()
            },
        ),
        (
            "content_type",
            Incoming {
                content_type: "application/json; proto=trmx.v1.Referral".to_owned(),
                ..stored_incoming.clone()
            },
        ),
    ] {
        let stored = f.be.inner.store.store_incoming(&changed).unwrap();
        assert!(matches!(stored, Stored::Conflict), "{what}: {stored:?}");
    }

    let inbox = f.be.inbox(&ListFilter::default()).await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(
        (inbox[0].priority, inbox[0].created_at),
        (entry.priority, entry.created_at)
    );
    // a redrive's new lifetime, and the message as it was delivered: the same message
    let mut redriven = good.clone();
    redriven.expires_at = Some(to_timestamp(created + Duration::from_secs(3 * 24 * 3600)));
    for env in [redriven, good] {
        assert!(matches!(
            classify(&f.be.inner, Some(env)).await.unwrap(),
            Verdict::Duplicate(id) if id == sent.message_id
        ));
    }
}

/// A JSON body is read as JSON whenever the envelope check took its content type for
/// JSON: with spaces around the media type too, as another organisation's software may
/// write it.
#[tokio::test]
async fn a_json_body_is_read_as_json_however_its_content_type_is_spaced() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let mut env = in_transit(&f.nl, sent.message_id);
    env.payload = referral().to_json().into_bytes();
    env.payload_sha256 = trmx_proto::envelope::sha256(&env.payload).to_vec();
    for content_type in [
        "application/json; proto=trmx.v1.Referral",
        " application/json ;proto=trmx.v1.Referral",
    ] {
        env.content_type = content_type.into();
        let verdict = classify(&f.be.inner, Some(env.clone())).await.unwrap();
        assert!(
            matches!(&verdict, Verdict::Store(_)),
            "{content_type:?}: {verdict:?}"
        );
    }
}

/// An answer to our request, from its recipient, filed in another case (a broken
/// node; ours refuses to send one, `check_reply`) is rejected: stored, it would mark
/// the request answered while the request's case shows no answer.
#[tokio::test]
async fn an_answer_filed_in_another_case_is_rejected() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;
    let mut reply = request("r-1", "NL-NRM", response());
    reply.in_reply_to = Some(sent.message_id);
    let reply = f.be.send(reply).await.unwrap();
    let good = in_transit(&f.be, reply.message_id);
    let mut env = good.clone();
    env.case_ref = CaseRef::new_random().to_string();
    match classify(&f.nl.inner, Some(env)).await.unwrap() {
        Verdict::Reject {
            reason_code,
            field_path,
            ..
        } => assert_eq!(
            (reason_code, field_path.as_str()),
            ("INVALID_ENVELOPE", "envelope.case_ref")
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(f.nl.inbox(&ListFilter::default()).await.unwrap().is_empty());
    let entry = f.nl.outbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(entry.answered_by, None);

    // in its case, it answers
    let stored = match classify(&f.nl.inner, Some(good)).await.unwrap() {
        Verdict::Store(incoming) => store_delivery(&f.nl.inner, *incoming).await.unwrap(),
        other => panic!("expected store, got {other:?}"),
    };
    assert!(matches!(stored, Stored::New(_)));
    let entry = f.nl.outbox(&ListFilter::default()).await.unwrap().remove(0);
    assert_eq!(entry.answered_by, Some(reply.message_id));
}

/// An answer whose in_reply_to names no message this node received (a typo,
/// another node's id) is refused: sent, it would answer nothing.
#[tokio::test]
async fn an_answer_to_a_message_never_received_is_refused() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;
    let mut typo = request("r-1", "NL-NRM", response());
    typo.in_reply_to = Some(MessageId::new_v7());
    typo.case_ref = Some(sent.case_ref);
    let err = f.be.send(typo).await.unwrap_err();
    assert!(
        matches!(&err, NodeError::Invalid(e) if e.field == "in_reply_to"),
        "{err:?}"
    );
    // NL's own referral is no message NL received either
    let mut own = request("r-2", "BE-PAYOKE", response());
    own.in_reply_to = Some(sent.message_id);
    let err = f.nl.send(own).await.unwrap_err();
    assert!(
        matches!(&err, NodeError::Invalid(e) if e.field == "in_reply_to"),
        "{err:?}"
    );
    assert!(
        f.be.outbox(&ListFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        due_on(&f.be, date("2026-02-01")).await.len(),
        1,
        "still owed"
    );
}

/// A `case_ref` that names no case this node sent or received a message in (here:
/// the referral's message id pasted where its case reference belongs, both
/// lower-case UUIDs) is refused on `case_ref` and stores nothing: filed under it, the
/// message would split the case's timeline on both sides. The cases the node knows,
/// sent or received, take new messages, and a retry gets its first message.
#[tokio::test]
async fn a_case_ref_naming_no_known_case_is_refused() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;

    let pasted_id = CaseRef::parse(&sent.message_id.to_string()).unwrap();
    for (key, case) in [("k-2", pasted_id), ("k-3", CaseRef::new_random())] {
        let mut follow = request(key, "BE-PAYOKE", follow_up());
        follow.case_ref = Some(case);
        let err = f.nl.send(follow).await.unwrap_err();
        assert!(
            matches!(&err, NodeError::Invalid(e) if e.field == "case_ref"
                && e.rule.contains("new_case")),
            "{key}: {err:?}"
        );
    }
    let stored = f.nl.outbox(&ListFilter::default()).await.unwrap();
    assert_eq!(stored.len(), 1, "nothing stored");
    assert!(
        f.nl.case_timeline(pasted_id, None, 0)
            .await
            .unwrap()
            .entries
            .is_empty()
    );

    // the case of a message sent, and of one received, take new messages
    let mut follow = request("k-2", "BE-PAYOKE", follow_up());
    follow.case_ref = Some(sent.case_ref);
    let first = f.nl.send(follow.clone()).await.unwrap();
    assert_eq!(first.case_ref, sent.case_ref);
    let again = f.nl.send(follow).await.unwrap();
    assert_eq!(again.message_id, first.message_id, "a retry gets its first");
    let mut back = request("b-1", "NL-NRM", follow_up());
    back.case_ref = Some(sent.case_ref);
    assert_eq!(f.be.send(back).await.unwrap().case_ref, sent.case_ref);
}

/// A reply without a `case_ref` takes the case of the message it answers; one
/// whose in_reply_to names no message this node received has no case to take, and is
/// refused on `case_ref` rather than filed under a new case nobody asked for.
#[tokio::test]
async fn a_reply_without_case_ref_takes_the_case_of_the_message_it_answers() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;

    for (key, reply) in [("r-1", response()), ("r-2", follow_up())] {
        let mut reply = request(key, "NL-NRM", reply);
        reply.in_reply_to = Some(sent.message_id);
        let reply = f.be.send(reply).await.unwrap();
        assert_eq!(reply.case_ref, sent.case_ref, "{key}");
    }

    // NL's own referral is no message NL received
    let mut own = request("f-1", "BE-PAYOKE", follow_up());
    own.in_reply_to = Some(sent.message_id);
    let err = f.nl.send(own).await.unwrap_err();
    assert!(
        matches!(&err, NodeError::Invalid(e) if e.field == "case_ref"),
        "{err:?}"
    );
    assert_eq!(f.nl.outbox(&ListFilter::default()).await.unwrap().len(), 1);
}

/// A follow-up's next date is its sender's promise to its recipient: in a case of
/// three (the demo's), BE's own follow-up to NL-NRM does not keep the follow-up BE
/// awaits from NG-NAPTIP, and neither does a follow-up BE sends to NG-NAPTIP; the
/// next one from NG-NAPTIP does.
#[tokio::test]
async fn only_the_next_follow_up_of_the_same_sender_replaces_an_awaited_one() {
    let f = fixture().await;
    let ng = NodeCore::start_offline(config(f._dir.path(), "NG-NAPTIP"), f.clock.clone())
        .await
        .unwrap();
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;
    // BE asks NG for a return risk assessment on the case
    let mut ask = request(
        "a-1",
        "NG-NAPTIP",
        body(
            Kind::ReturnRiskAssessmentRequest,
            include_str!("../../../proto/examples/04-return-risk-assessment-request.json"),
        ),
    );
    ask.case_ref = Some(sent.case_ref);
    let ask = f.be.send(ask).await.unwrap();
    transfer(&f.be, &ng, ask.message_id).await;
    // NG reports to BE on the case; its next follow-up is due 2026-07-20
    f.clock.advance(Duration::from_secs(60));
    let mut from_ng = request("n-1", "BE-PAYOKE", follow_up());
    from_ng.case_ref = Some(sent.case_ref);
    let from_ng = ng.send(from_ng).await.unwrap();
    transfer(&ng, &f.be, from_ng.message_id).await;
    let awaited = |due: &[DueItem]| {
        due.iter()
            .any(|d| d.message_id == from_ng.message_id && d.what == DueKind::FollowUpDue)
    };
    assert!(awaited(&due_on(&f.be, date("2026-08-01")).await));
    // BE reports to NL and to NG on the same case, both delivered
    for (key, to) in [("f-nl", "NL-NRM"), ("f-ng", "NG-NAPTIP")] {
        f.clock.advance(Duration::from_secs(60));
        let mut report = request(key, to, follow_up());
        report.case_ref = Some(sent.case_ref);
        let report = f.be.send(report).await.unwrap();
        f.be.inner
            .store
            .mark_submitted(report.message_id, 1)
            .unwrap();
        apply(
            &f.be,
            receipt_envelope("BE-PAYOKE", report.message_id, pb::Outcome::Delivered, ""),
        )
        .await;
        let due = due_on(&f.be, date("2026-08-01")).await;
        assert!(awaited(&due), "after BE's follow-up to {to}: {due:?}");
    }
    // NG's next report keeps it
    f.clock.advance(Duration::from_secs(60));
    let mut again = request("n-2", "BE-PAYOKE", follow_up());
    again.case_ref = Some(sent.case_ref);
    let again = ng.send(again).await.unwrap();
    transfer(&ng, &f.be, again.message_id).await;
    let due = due_on(&f.be, date("2026-08-01")).await;
    assert!(!awaited(&due), "{due:?}");
    ng.shutdown().await;
}

#[tokio::test]
async fn due_lists_unanswered_requests_and_follow_ups() {
    let f = fixture().await;
    // The example referral asks for an answer by 2026-01-21.
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;

    assert!(due_on(&f.nl, date("2026-01-20")).await.is_empty());
    let due = due_on(&f.nl, date("2026-01-21")).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].what, DueKind::AwaitingAnswer);
    assert_eq!(due[0].message_id, sent.message_id);
    assert_eq!(due[0].counterpart, pid("BE-PAYOKE"));
    assert_eq!(due[0].due, date("2026-01-21"));
    let owed = due_on(&f.be, date("2026-02-01")).await;
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].what, DueKind::AnswerOwed);
    assert_eq!(owed[0].counterpart, pid("NL-NRM"));

    // BE answers: nothing is due on either side any more.
    let mut reply = request("r-1", "NL-NRM", response());
    reply.in_reply_to = Some(sent.message_id);
    let reply = f.be.send(reply).await.unwrap();
    transfer(&f.be, &f.nl, reply.message_id).await;
    assert!(due_on(&f.be, date("2026-02-01")).await.is_empty());
    assert!(due_on(&f.nl, date("2026-02-01")).await.is_empty());
    // NL's request is answered for good: its entry is gone from the due index; BE's
    // answer is on its way and may still fail, so BE's entry stays
    assert_eq!(f.nl.inner.store.due_index_len(), 0);
    assert_eq!(f.be.inner.store.due_index_len(), 1);

    // A follow-up (next due 2026-07-20) on the case is due from that day…
    f.clock.advance(Duration::from_secs(60));
    let mut fu = request("f-1", "NL-NRM", follow_up());
    fu.case_ref = Some(sent.case_ref);
    let fu = f.be.send(fu).await.unwrap();
    transfer(&f.be, &f.nl, fu.message_id).await;
    assert!(due_on(&f.nl, date("2026-07-19")).await.is_empty());
    for node in [&f.nl, &f.be] {
        let due = due_on(node, date("2026-07-20")).await;
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].what, DueKind::FollowUpDue);
        assert_eq!(due[0].message_id, fu.message_id);
    }

    // …until a later follow-up on the case (its own next date is 2026-11-10).
    f.clock.advance(Duration::from_secs(60));
    let mut later = request(
        "f-2",
        "NL-NRM",
        body(
            Kind::FollowUp,
            include_str!("../../../proto/examples/06-follow-up-arrived.json"),
        ),
    );
    later.case_ref = Some(sent.case_ref);
    let later = f.be.send(later).await.unwrap();
    let before = f.be.inner.store.due_index_len();
    let due = due_on(&f.be, date("2026-08-01")).await;
    assert!(due.is_empty(), "{due:?}");
    assert_eq!(
        f.be.inner.store.due_index_len(),
        before,
        "kept while the later one is on its way: it may still fail"
    );
    f.be.inner
        .store
        .mark_submitted(later.message_id, 1)
        .unwrap();
    apply(
        &f.be,
        receipt_envelope("BE-PAYOKE", later.message_id, pb::Outcome::Delivered, ""),
    )
    .await;
    assert!(due_on(&f.be, date("2026-08-01")).await.is_empty());
    assert_eq!(
        f.be.inner.store.due_index_len(),
        before - 1,
        "the follow-up replaced for good is forgotten"
    );
    let due = due_on(&f.be, date("2026-11-10")).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].message_id, later.message_id);
}

/// Only an answer of the kind a request asks for answers it: a follow-up that names the
/// referral in `in_reply_to` (an acknowledgement) leaves the response owed and awaited,
/// on both sides, and a follow-up of ours that failed replaces no earlier one.
#[tokio::test]
async fn a_reply_that_is_no_answer_leaves_the_request_due() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;
    let mut ack = request("a-1", "NL-NRM", follow_up());
    ack.in_reply_to = Some(sent.message_id);
    ack.case_ref = Some(sent.case_ref);
    let ack = f.be.send(ack).await.unwrap();
    transfer(&f.be, &f.nl, ack.message_id).await;
    f.be.inner.store.mark_submitted(ack.message_id, 1).unwrap();
    apply(
        &f.be,
        receipt_envelope("BE-PAYOKE", ack.message_id, pb::Outcome::Delivered, ""),
    )
    .await;
    let kinds = |due: Vec<DueItem>| {
        due.into_iter()
            .map(|d| (d.message_id, d.what))
            .collect::<Vec<_>>()
    };
    assert!(
        kinds(due_on(&f.be, date("2026-02-01")).await)
            .contains(&(sent.message_id, DueKind::AnswerOwed))
    );
    assert!(
        kinds(due_on(&f.nl, date("2026-02-01")).await)
            .contains(&(sent.message_id, DueKind::AwaitingAnswer))
    );
    let listed = f.nl.outbox(&ListFilter::default()).await.unwrap();
    let ours = listed
        .iter()
        .find(|e| e.message_id == sent.message_id)
        .unwrap();
    assert_eq!(ours.answered_by, None, "a follow-up answers nothing");

    // the follow-up's own next date (2026-07-20): a later one of ours that failed
    // replaces nothing
    f.clock.advance(Duration::from_secs(60));
    let mut later = request("f-2", "NL-NRM", follow_up());
    later.case_ref = Some(sent.case_ref);
    let later = f.be.send(later).await.unwrap();
    f.be.inner
        .store
        .mark_submitted(later.message_id, 2)
        .unwrap();
    apply(
        &f.be,
        receipt_envelope(
            "BE-PAYOKE",
            later.message_id,
            pb::Outcome::Expired,
            "EXPIRED",
        ),
    )
    .await;
    let due = kinds(due_on(&f.be, date("2026-07-20")).await);
    assert!(
        due.contains(&(ack.message_id, DueKind::FollowUpDue)),
        "{due:?}"
    );
}

#[tokio::test]
async fn watch_streams_from_after_seq_and_then_live() {
    let f = fixture().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let sent =
            f.nl.send(request(&format!("k-{i}"), "BE-PAYOKE", follow_up()))
                .await
                .unwrap();
        transfer(&f.nl, &f.be, sent.message_id).await;
        ids.push(sent.message_id);
    }
    let all: Vec<u64> =
        f.be.watch(0)
            .await
            .unwrap()
            .take(3)
            .map(|e| e.unwrap().seq)
            .collect()
            .await;
    assert_eq!(all, vec![1, 2, 3]);

    // Resumed after seq 2: only 3, then a live one.
    let mut stream = Box::pin(f.be.watch(2).await.unwrap());
    let next = stream.next().await.unwrap().unwrap();
    assert_eq!((next.seq, next.message_id), (3, ids[2]));

    let sent =
        f.nl.send(request("k-9", "BE-PAYOKE", follow_up()))
            .await
            .unwrap();
    let be = f.be.clone();
    let nl = f.nl.clone();
    let id = sent.message_id;
    let producer = tokio::spawn(async move { transfer(&nl, &be, id).await });
    let live = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((live.seq, live.message_id), (4, sent.message_id));
    producer.await.unwrap();

    // Shutdown ends the stream.
    f.be.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    assert!(end.is_none());
}

/// Pages of a listing, newest first, hold every matching entry once: none
/// is out of reach behind the page size.
#[tokio::test]
async fn listings_page_through_every_matching_entry() {
    let f = fixture().await;
    let mut sent = Vec::new();
    for i in 0..7 {
        let body = if i % 2 == 0 { follow_up() } else { referral() };
        let entry =
            f.nl.send(request(&format!("k-{i}"), "BE-PAYOKE", body))
                .await
                .unwrap();
        transfer(&f.nl, &f.be, entry.message_id).await;
        sent.push(entry.message_id);
    }
    let newest_first: Vec<MessageId> = sent.iter().rev().copied().collect();
    let follow_ups: Vec<MessageId> = newest_first.iter().step_by(2).copied().collect();

    for (kind, expected) in [(None, &newest_first), (Some(Kind::FollowUp), &follow_ups)] {
        let mut filter = ListFilter {
            kind,
            limit: 2,
            ..ListFilter::default()
        };
        let (mut outbox, mut inbox) = (Vec::new(), Vec::new());
        loop {
            let page = f.nl.outbox_page(&filter).await.unwrap();
            assert!(page.entries.len() <= 2);
            outbox.extend(page.entries.iter().map(|e| e.message_id));
            match page.next {
                Some(next) => filter.start = Some(next),
                None => break,
            }
        }
        filter.start = None;
        loop {
            let page = f.be.inbox_page(&filter).await.unwrap();
            inbox.extend(page.entries.iter().map(|e| e.message_id));
            match page.next {
                Some(next) => filter.start = Some(next),
                None => break,
            }
        }
        assert_eq!(&outbox, expected, "outbox, kind {kind:?}");
        assert_eq!(&inbox, expected, "inbox, kind {kind:?}");
    }
    // a page that holds the last match says there is no more
    let filter = ListFilter {
        limit: 7,
        ..ListFilter::default()
    };
    assert_eq!(f.nl.outbox_page(&filter).await.unwrap().next, None);
}

/// A cursor this inbox never gave out (its store was replaced, or restored
/// from an older backup) is refused: a watcher waiting on it would skip every
/// entry stored until the seqs caught up with it.
#[tokio::test]
async fn watch_refuses_a_cursor_past_the_last_seq() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", follow_up()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;

    // the last seq itself is a fine cursor: nothing yet, then what comes
    let mut at_end = Box::pin(f.be.watch(1).await.unwrap());
    let early = tokio::time::timeout(Duration::from_millis(200), at_end.next()).await;
    assert!(early.is_err(), "{early:?}");

    let Err(err) = f.be.watch(5).await else {
        panic!("a cursor past the last seq was accepted");
    };
    assert!(
        matches!(&err, NodeError::FailedPrecondition(m) if m.contains("after_seq 5") && m.contains("(1)")),
        "{err}"
    );
}

/// A delivery committed but not yet flushed is not handed to a watcher (nor
/// listed, nor reported as the last seq): a
/// crash before its flush would give its seq to another message, which a
/// watcher resuming after that seq would never see.
#[tokio::test]
async fn watch_hands_out_only_what_is_flushed() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", follow_up()))
            .await
            .unwrap();
    let env = in_transit(&f.nl, sent.message_id);
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(env)).await.unwrap() else {
        panic!("expected store");
    };
    let store = f.be.inner.store.clone();
    let Stored::New(entry) = store.store_incoming(&incoming).unwrap() else {
        panic!("expected a new entry");
    };
    let mut stream = Box::pin(f.be.watch(0).await.unwrap());
    let early = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(early.is_err(), "handed out before its flush: {early:?}");
    // nor listed, nor counted as the last seq to watch from
    assert!(
        f.be.inbox(&ListFilter::default()).await.unwrap().is_empty(),
        "listed before its flush"
    );
    assert_eq!(f.be.status().last_inbox_seq, 0);
    // flushed, and the watchers told: now it comes
    f.be.inner.store.flush_async().await.unwrap();
    f.be.inner.durable_inbox.send_replace(InboxMark {
        last_seq: entry.seq,
        total: 1,
    });
    let got = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((got.seq, got.message_id), (entry.seq, sent.message_id));
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
    assert_eq!(f.be.status().last_inbox_seq, entry.seq);
}

/// A cursor is checked against the last seq flushed, the last one a watcher, a listing
/// or the status can have handed out, not against the last one committed: a cursor that
/// names a delivery whose flush is still under way (or failed) comes from no entry of
/// this inbox, and a crash before the flush gives that seq to another message, which a
/// watcher resuming after it would never see.
#[tokio::test]
async fn watch_refuses_a_cursor_past_the_last_flushed_seq() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", follow_up()))
            .await
            .unwrap();
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(in_transit(&f.nl, sent.message_id)))
        .await
        .unwrap()
    else {
        panic!("expected store");
    };
    let Stored::New(entry) = f.be.inner.store.store_incoming(&incoming).unwrap() else {
        panic!("expected a new entry");
    };
    assert_eq!(f.be.status().last_inbox_seq, 0);
    let Err(err) = f.be.watch(entry.seq).await else {
        panic!("a cursor naming a delivery not yet flushed was accepted");
    };
    assert!(
        matches!(&err, NodeError::FailedPrecondition(m) if m.contains("after_seq 1") && m.contains("(0)")),
        "{err}"
    );

    // flushed as the receive loop does: a cursor from now on, and from 0 the entry
    flush_inbox(&f.be.inner).await.unwrap();
    let mut at_end = Box::pin(f.be.watch(entry.seq).await.unwrap());
    let early = tokio::time::timeout(Duration::from_millis(200), at_end.next()).await;
    assert!(early.is_err(), "{early:?}");
    let mut from_start = Box::pin(f.be.watch(0).await.unwrap());
    let got = tokio::time::timeout(Duration::from_secs(5), from_start.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((got.seq, got.message_id), (entry.seq, sent.message_id));
}

/// `inbox_total` in the status counts what is durably stored, as `last_inbox_seq` does:
/// a delivery committed but not flushed (its flush under way, or failed) was counted, so
/// the status could show one message more than a listing, and a crash took the count
/// back down.
#[tokio::test]
async fn the_inbox_total_counts_only_what_is_flushed() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", follow_up()))
            .await
            .unwrap();
    let env = in_transit(&f.nl, sent.message_id);
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(env)).await.unwrap() else {
        panic!("expected store");
    };
    let Stored::New(entry) = f.be.inner.store.store_incoming(&incoming).unwrap() else {
        panic!("expected a new entry");
    };
    let status = f.be.status();
    assert_eq!(
        (status.inbox_total, status.last_inbox_seq),
        (0, 0),
        "counted before its flush"
    );
    // flushed as the receive loop does: counted, with its seq
    flush_inbox(&f.be.inner).await.unwrap();
    let status = f.be.status();
    assert_eq!((status.inbox_total, status.last_inbox_seq), (1, entry.seq));
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
}

/// A case shows what its inbox listing shows: a delivery committed but not yet flushed
/// (its flush under way, or failed) was in the case view, and so was the "answered" that
/// it makes of the request it answers, though a crash before the flush takes both back.
/// One message shows it the same way (it carries the seq a watcher resumes after).
#[tokio::test]
async fn a_case_shows_only_what_is_flushed() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    transfer(&f.nl, &f.be, sent.message_id).await;
    let mut reply = request("r-1", "NL-NRM", response());
    reply.in_reply_to = Some(sent.message_id);
    let reply = f.be.send(reply).await.unwrap();
    f.clock.advance(Duration::from_secs(60));
    // the answer reaches NL: committed, not flushed
    let Verdict::Store(incoming) = classify(&f.nl.inner, Some(in_transit(&f.be, reply.message_id)))
        .await
        .unwrap()
    else {
        panic!("expected store");
    };
    let Stored::New(entry) = f.nl.inner.store.store_incoming(&incoming).unwrap() else {
        panic!("expected a new entry");
    };
    let case = |node: &NodeCore| {
        let node = node.clone();
        async move {
            node.case_timeline(sent.case_ref, None, 0)
                .await
                .unwrap()
                .entries
                .into_iter()
                .map(|e| (e.message_id, e.state))
                .collect::<Vec<_>>()
        }
    };
    assert!(f.nl.inbox(&ListFilter::default()).await.unwrap().is_empty());
    assert_eq!(
        case(&f.nl).await,
        [(sent.message_id, "queued".to_owned())],
        "the case shows a delivery not yet flushed"
    );
    let outbox = f.nl.outbox(&ListFilter::default()).await.unwrap();
    assert_eq!(
        outbox[0].answered_by, None,
        "answered by what is not flushed"
    );
    assert!(
        f.nl.message(reply.message_id).await.unwrap().is_none(),
        "one message shows a delivery not yet flushed"
    );

    // flushed as the receive loop does: shown everywhere
    flush_inbox(&f.nl.inner).await.unwrap();
    assert_eq!(
        case(&f.nl).await,
        [
            (sent.message_id, "queued+answered".to_owned()),
            (reply.message_id, "received".to_owned())
        ]
    );
    let outbox = f.nl.outbox(&ListFilter::default()).await.unwrap();
    assert_eq!(outbox[0].answered_by, Some(reply.message_id));
    let Some(MessageView::Inbox(shown, _)) = f.nl.message(reply.message_id).await.unwrap() else {
        panic!("the flushed delivery is not shown");
    };
    assert_eq!(shown.seq, entry.seq);
}

/// Stores the referral `id` of NL at BE as the receive loop does, but for its flush
/// (under way, or failed): committed, not on disk.
async fn committed_at_be(f: &Fixture, id: MessageId) {
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(in_transit(&f.nl, id)))
        .await
        .unwrap()
    else {
        panic!("expected store");
    };
    let Stored::New(_) = f.be.inner.store.store_incoming(&incoming).unwrap() else {
        panic!("expected a new entry");
    };
}

/// A reply named a received message that was stored but not yet flushed, which no
/// listing, watch or `show` hands out yet: after a crash before that flush, the reply
/// would be queued (or on its way) for a message the node no longer has, until a
/// redelivery, and for ever if the sender withdrew it meanwhile. When the node cannot
/// flush it, the send is refused with `UNAVAILABLE` and a message that says to retry,
/// and nothing is queued.
#[tokio::test]
async fn a_reply_to_a_message_not_yet_on_disk_is_refused_while_it_cannot_be_flushed() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    committed_at_be(&f, sent.message_id).await;
    // every flush of BE's store fails from now on
    std::fs::remove_dir_all(f._dir.path().join("BE-PAYOKE").join("blobs")).unwrap();
    let mut reply = request("r-1", "NL-NRM", response());
    reply.in_reply_to = Some(sent.message_id);
    let error = f.be.send(reply).await.unwrap_err();
    let status = crate::api::status::to_status(error);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    for part in [
        "in_reply_to",
        sent.message_id.to_string().as_str(),
        "not on disk yet",
        "retry",
    ] {
        assert!(status.message().contains(part), "{part}: {status:?}");
    }
    assert!(
        f.be.outbox(&ListFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
}

/// A message filed under a case known here only from a received message stored but not
/// yet flushed: after a crash before that flush, it would be queued (or on its way)
/// under a case the node no longer knows, the gap a reply to that message had. When the
/// node cannot flush it, the send is refused with `UNAVAILABLE`, worded as that reply's
/// refusal, and nothing is queued; a case the node has never seen is still no case.
#[tokio::test]
async fn a_message_in_a_case_known_only_from_a_message_not_yet_on_disk_is_refused_while_it_cannot_be_flushed()
 {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    committed_at_be(&f, sent.message_id).await;
    std::fs::remove_dir_all(f._dir.path().join("BE-PAYOKE").join("blobs")).unwrap();
    let follow = || {
        let mut follow = request("f-1", "NL-NRM", follow_up());
        follow.case_ref = Some(sent.case_ref);
        follow
    };
    let error = f.be.send(follow()).await.unwrap_err();
    let status = crate::api::status::to_status(error);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    for part in [
        "case_ref",
        sent.case_ref.to_string().as_str(),
        "not on disk yet",
        "retry in a moment",
    ] {
        assert!(status.message().contains(part), "{part}: {status:?}");
    }
    assert!(
        f.be.outbox(&ListFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    // a case the node has never seen is still no case, not one to wait for
    let mut made_up = follow();
    made_up.case_ref = Some(CaseRef::new_random());
    let error = f.be.send(made_up).await.unwrap_err();
    assert!(
        matches!(&error, NodeError::Invalid(e) if e.field == "case_ref"),
        "{error:?}"
    );
}

/// A delivery committed whose flush failed is flushed again by its redelivery only: with
/// the broker out of reach (here, no broker at all), a reply to it, or a message in its
/// case, was refused with `UNAVAILABLE` "retry in a moment" for as long as the outage
/// lasted, however often retried. The send flushes it itself and goes through, in the
/// case of the message answered; the delivery is listed from then on.
#[tokio::test]
async fn a_reply_to_a_message_not_yet_on_disk_goes_through_with_the_broker_out_of_reach() {
    let f = fixture().await;
    let first =
        f.nl.send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
    let second =
        f.nl.send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();

    // a message in the case of a delivery not on disk
    committed_at_be(&f, first.message_id).await;
    let mut follow = request("f-1", "NL-NRM", follow_up());
    follow.case_ref = Some(first.case_ref);
    let filed = f.be.send(follow).await;
    assert!(
        filed.is_ok(),
        "refused, with nothing to wait for: {filed:?}"
    );
    let listed = f.be.inbox(&ListFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 1, "on disk and listed: {listed:?}");

    // a reply to a delivery not on disk
    committed_at_be(&f, second.message_id).await;
    let mut reply = request("r-1", "NL-NRM", response());
    reply.in_reply_to = Some(second.message_id);
    let answer = f.be.send(reply).await.unwrap();
    assert_eq!(answer.case_ref, second.case_ref);
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 2);
    assert_eq!(f.be.outbox(&ListFilter::default()).await.unwrap().len(), 2);
}

/// A delivery committed but whose flush failed is not acknowledged; its
/// redelivery finds it stored (a duplicate), flushes and acknowledges it.
/// From then on it is durable, so it must be watched, listed and counted
/// at once, not only when some later delivery happens to arrive.
#[tokio::test]
async fn a_redelivery_found_stored_is_shown_once_flushed() {
    let f = fixture().await;
    let sent =
        f.nl.send(request("k-1", "BE-PAYOKE", follow_up()))
            .await
            .unwrap();
    let env = in_transit(&f.nl, sent.message_id);
    let Verdict::Store(incoming) = classify(&f.be.inner, Some(env.clone())).await.unwrap() else {
        panic!("expected store");
    };
    // committed; the flush of store_delivery failed, so no ack and no wake
    let Stored::New(entry) = f.be.inner.store.store_incoming(&incoming).unwrap() else {
        panic!("expected a new entry");
    };
    let mut stream = Box::pin(f.be.watch(0).await.unwrap());

    // the redelivery: a duplicate, flushed (as handle_delivery does) before its ack
    let again = classify(&f.be.inner, Some(env)).await.unwrap();
    assert!(matches!(again, Verdict::Duplicate(id) if id == sent.message_id));
    flush_inbox(&f.be.inner).await.unwrap();

    let got = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
    let got = got
        .expect("acknowledged but never watched")
        .unwrap()
        .unwrap();
    assert_eq!((got.seq, got.message_id), (entry.seq, sent.message_id));
    assert_eq!(f.be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
    assert_eq!(f.be.status().last_inbox_seq, entry.seq);
}

#[tokio::test]
async fn status_counts_and_participants_offline() {
    let f = fixture().await;
    let status = f.nl.status();
    assert_eq!(status.participant, pid("NL-NRM"));
    assert!(!status.broker_connected);
    assert_eq!(status.outbox_queued, 0);
    assert!(matches!(
        f.nl.participants().await,
        Err(NodeError::BrokerUnavailable(_))
    ));
}

// ---- the broker link, against the in-memory fake broker ----------------------

mod link {
    use std::future::Future;
    use std::net::SocketAddr;

    use super::super::fake_broker::{FakeBroker, Relay, listener, reserved_port};
    use super::*;

    /// Polls `check` until it is true or 10 s passed.
    async fn until<F, Fut>(what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = bool>,
    {
        until_within(Duration::from_secs(10), what, check).await;
    }

    /// Polls `check` until it is true or `limit` passed.
    async fn until_within<F, Fut>(limit: Duration, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn online(dir: &Path, me: &str, addr: SocketAddr, clock: Arc<ManualClock>) -> NodeCore {
        online_with(config(dir, me), addr, clock).await
    }

    async fn online_with(
        config: CoreConfig,
        addr: SocketAddr,
        clock: Arc<ManualClock>,
    ) -> NodeCore {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        let link = BrokerLink {
            channel: LinkChannel::new(channel, None),
            notices: CertNotices::default(),
        };
        NodeCore::open(config, clock, Some(link), false)
            .await
            .unwrap()
    }

    /// A fake broker, and NL-NRM and BE-PAYOKE online against it.
    struct Pair {
        dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        broker: FakeBroker,
        nl: NodeCore,
        be: NodeCore,
        /// Dropped: the broker stops serving.
        _serving: [tokio::sync::oneshot::Sender<()>; 2],
    }

    async fn online_pair() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (nl_l, nl_addr) = listener().await;
        let (be_l, be_addr) = listener().await;
        let serving = [
            broker.serve("NL-NRM", nl_l),
            broker.serve("BE-PAYOKE", be_l),
        ];
        let nl = online(dir.path(), "NL-NRM", nl_addr, clock.clone()).await;
        let be = online(dir.path(), "BE-PAYOKE", be_addr, clock.clone()).await;
        Pair {
            dir,
            clock,
            broker,
            nl,
            be,
            _serving: serving,
        }
    }

    /// A fake broker and `me` alone online against it: the temp directory,
    /// the broker, the node, and the handle that keeps the broker serving.
    async fn online_alone(
        me: &str,
    ) -> (
        tempfile::TempDir,
        FakeBroker,
        NodeCore,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let serving = broker.serve(me, l);
        let node = online(dir.path(), me, addr, clock).await;
        (dir, broker, node, serving)
    }

    async fn state_of(node: &NodeCore, id: MessageId) -> Option<OutboxEntry> {
        match node.message(id).await.unwrap() {
            Some(MessageView::Outbox(entry, _)) => Some(entry),
            _ => None,
        }
    }

    #[tokio::test]
    async fn messages_receipts_and_replies_flow_through_a_broker() {
        let Pair {
            dir: _dir,
            clock: _clock,
            broker,
            nl,
            be,
            _serving,
        } = online_pair().await;

        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("BE stores the referral", || async {
            be.inbox(&ListFilter::default()).await.unwrap().len() == 1
        })
        .await;
        until("NL sees DELIVERED", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Delivered)
        })
        .await;
        assert!(nl.status().broker_connected);
        let participants = nl.participants().await.unwrap();
        assert_eq!(participants.len(), 2);
        assert!(participants[0].accepts.contains(&Kind::Referral));

        let mut reply = request("r-1", "NL-NRM", response());
        reply.in_reply_to = Some(sent.message_id);
        let reply = be.send(reply).await.unwrap();
        until("NL's referral is ANSWERED", || async {
            state_of(&nl, sent.message_id)
                .await
                .and_then(|e| e.answered_by)
                == Some(reply.message_id)
        })
        .await;
        until("BE's reply is DELIVERED", || async {
            state_of(&be, reply.message_id).await.map(|e| e.state) == Some(OutboxState::Delivered)
        })
        .await;
        assert_eq!(
            nl.case_timeline(sent.case_ref, None, 0)
                .await
                .unwrap()
                .entries
                .len(),
            2
        );
        assert_eq!(
            be.case_timeline(sent.case_ref, None, 0)
                .await
                .unwrap()
                .entries
                .len(),
            2
        );
        // Every delivery (2 messages + 2 receipts) is acknowledged once. (The
        // node records a receipt before it acknowledges it, so the last ack
        // may still be on its way when the state shows.)
        until("every delivery is acknowledged", || async {
            broker.lock().acked.len() >= 4
        })
        .await;
        assert_eq!(broker.lock().acked.len(), 4);
        nl.shutdown().await;
        be.shutdown().await;
    }

    /// NL's node on a fake broker, checking its outbox every 20 ms.
    struct Checking {
        dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        broker: FakeBroker,
        nl: NodeCore,
        _serving: tokio::sync::oneshot::Sender<()>,
    }

    async fn checking() -> Checking {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (nl_l, nl_addr) = listener().await;
        let serving = broker.serve("NL-NRM", nl_l);
        let mut cfg = config(dir.path(), "NL-NRM");
        cfg.outbox_check_interval = Some(Duration::from_millis(20));
        let nl = online_with(cfg, nl_addr, clock.clone()).await;
        Checking {
            dir,
            clock,
            broker,
            nl,
            _serving: serving,
        }
    }

    /// A broker that does not answer the outbox check's `GetStatus` does not hold the
    /// shutdown up (the check loop makes that call on its own, and a shutdown waits for
    /// the loop).
    #[tokio::test]
    async fn an_outbox_check_the_broker_does_not_answer_holds_no_shutdown_up() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("NL submits", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let held = broker.status_hold.clone().lock_owned().await;
        clock.advance(Duration::from_secs(1));
        until("NL asks about it", || async {
            !broker.lock().status_asked.is_empty()
        })
        .await;
        tokio::time::timeout(Duration::from_secs(10), nl.shutdown())
            .await
            .expect("the shutdown waits for a GetStatus the broker does not answer");
        drop(held);
    }

    /// Nor does one that does not answer the submit of a message it lost.
    #[tokio::test]
    async fn a_resubmit_the_broker_does_not_answer_holds_no_shutdown_up() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("NL submits", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        broker.lose(&sent.message_id.to_string());
        let held = broker.submit_hold.clone().lock_owned().await;
        let arrived = broker.lock().submits_arrived;
        clock.advance(Duration::from_secs(1));
        until("NL submits it again", || async {
            broker.lock().submits_arrived > arrived
        })
        .await;
        tokio::time::timeout(Duration::from_secs(10), nl.shutdown())
            .await
            .expect("the shutdown waits for a Submit the broker does not answer");
        drop(held);
    }

    #[tokio::test]
    async fn a_message_the_broker_lost_is_submitted_again() {
        let Checking {
            dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let kept = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let lost = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        for id in [kept.message_id, lost.message_id] {
            until("NL submits", || async {
                state_of(&nl, id).await.map(|e| e.state) == Some(OutboxState::Submitted)
            })
            .await;
        }
        // Not asked about before the interval has passed since the submit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(broker.lock().status_asked.is_empty());

        // The broker's store is restored from a backup without `lost`.
        broker.lose(&lost.message_id.to_string());
        clock.advance(Duration::from_secs(1));
        until("NL submits the lost message again", || async {
            broker
                .lock()
                .accepted
                .contains_key(&lost.message_id.to_string())
        })
        .await;
        {
            let st = broker.lock();
            assert!(st.status_asked.contains(&kept.message_id.to_string()));
            assert_eq!(st.queues["BE-PAYOKE"].len(), 2, "each message once");
        }
        // (the broker has it before the node has its answer on record)
        until("NL records the submit again", || async {
            state_of(&nl, lost.message_id)
                .await
                .and_then(|e| e.last_error)
                .is_some_and(|e| e.contains("lost"))
        })
        .await;
        let entry = state_of(&nl, lost.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Submitted);
        // The recipient gets it, and the sender its receipt.
        let (be_l, be_addr) = listener().await;
        let _s2 = broker.serve("BE-PAYOKE", be_l);
        let be = online(dir.path(), "BE-PAYOKE", be_addr, clock.clone()).await;
        until("NL sees both DELIVERED", || async {
            state_of(&nl, lost.message_id).await.map(|e| e.state) == Some(OutboxState::Delivered)
                && state_of(&nl, kept.message_id).await.map(|e| e.state)
                    == Some(OutboxState::Delivered)
        })
        .await;
        nl.shutdown().await;
        be.shutdown().await;
    }

    /// A withdrawal that the broker applied but whose answer never came back (past the
    /// node's `withdraw_timeout`: its caller was told to try again, and did not) leaves
    /// no entry `SUBMITTED` for good: a withdrawn message gets no report, and the outbox
    /// check, which finds the broker holding it as withdrawn, withdraws it here too.
    #[tokio::test]
    async fn a_withdrawal_whose_answer_was_lost_is_found_by_the_outbox_check() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        let held = broker.withdraw_hold.lock().await;
        let withdrew = nl.withdraw(sent.message_id).await;
        assert!(
            matches!(&withdrew, Err(NodeError::BrokerUnavailable(_))),
            "{withdrew:?}"
        );
        assert!(
            broker
                .lock()
                .withdrawn
                .contains(&sent.message_id.to_string())
        );
        drop(held);
        assert_eq!(
            state_of(&nl, sent.message_id).await.unwrap().state,
            OutboxState::Submitted
        );
        clock.advance(Duration::from_secs(1));
        until("the check withdraws it here too", || async {
            state_of(&nl, sent.message_id)
                .await
                .and_then(|e| e.failure)
                .is_some_and(|f| f.outcome == "withdrawn")
        })
        .await;
        nl.shutdown().await;
    }

    /// The outbox check takes the broker's word that it holds a message as withdrawn,
    /// also when no withdrawal was asked for here (a broken broker, or one whose store
    /// mixed messages up): the node cannot tell that from a withdrawal whose answer was
    /// lost. But a caseworker who never withdrew it must not read the entry as their
    /// own withdrawal: its record says that the broker reported it withdrawn.
    #[tokio::test]
    async fn a_message_the_broker_says_is_withdrawn_says_so_in_its_record() {
        let logs = LogCapture::start();
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        // (no withdrawal asked for by this node)
        broker.lock().withdrawn.push(sent.message_id.to_string());
        clock.advance(Duration::from_secs(1));
        until("the check withdraws it here", || async {
            state_of(&nl, sent.message_id)
                .await
                .and_then(|e| e.failure)
                .is_some_and(|f| f.outcome == "withdrawn")
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Failed);
        let said = entry.last_error.unwrap_or_default();
        assert!(said.contains("the broker"), "{said:?}");
        assert!(said.contains("withdrawn"), "{said:?}");
        // (said once the withdrawal is on disk, after the entry shows it)
        until("the node says so", || async {
            !logs
                .lines_with(&["WARN", "withdrawn here too", &sent.message_id.to_string()])
                .is_empty()
        })
        .await;
        nl.shutdown().await;
    }

    /// A status answer about another message says nothing of the one asked about: a
    /// broker (broken, its store damaged) that lost a message and answers the check with
    /// another message's status does not leave it SUBMITTED for good, never delivered and
    /// never reported; it is submitted again, and the broker keeps one copy.
    #[tokio::test]
    async fn a_status_answer_about_another_message_does_not_hide_a_lost_one() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        let id = sent.message_id.to_string();
        broker.lose(&id);
        broker.lock().status_answers_for = Some(MessageId::new_v7().to_string());
        clock.advance(Duration::from_secs(1));
        until("NL submits the lost message again", || async {
            broker.lock().accepted.contains_key(&id)
        })
        .await;
        until("the resubmit is recorded", || async {
            state_of(&nl, sent.message_id)
                .await
                .and_then(|e| e.last_error)
                .is_some_and(|e| e.contains("another message"))
        })
        .await;
        assert_eq!(
            queued_at(&broker, "BE-PAYOKE")
                .iter()
                .filter(|queued| **queued == id)
                .count(),
            1
        );
        nl.shutdown().await;
    }

    /// A receipt the node does not take (its id not the one the broker derives: a broken
    /// broker) left its entry SUBMITTED for good, the outbox check taking any state the
    /// broker knows as fine. The check settles it from the broker's status when that is
    /// final, as the receipt would have: delivered, or failed with the broker's reason.
    #[tokio::test]
    async fn an_entry_whose_receipt_was_not_taken_is_settled_from_the_broker_s_status() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let delivered = submitted_referral(&nl).await;
        let rejected = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the second is submitted", || async {
            state_of(&nl, rejected.message_id).await.map(|e| e.state)
                == Some(OutboxState::Submitted)
        })
        .await;
        let mut receipt =
            receipt_envelope("NL-NRM", delivered.message_id, pb::Outcome::Delivered, "");
        receipt.message_id = MessageId::new_v7().to_string();
        assert!(matches!(
            classify(&nl.inner, Some(receipt)).await.unwrap(),
            Verdict::Reject { .. }
        ));
        {
            let mut st = broker.lock();
            st.status_of.insert(
                delivered.message_id.to_string(),
                pb::MessageStatus {
                    message_id: delivered.message_id.to_string(),
                    state: pb::MessageState::Acknowledged as i32,
                    ..Default::default()
                },
            );
            st.status_of.insert(
                rejected.message_id.to_string(),
                pb::MessageStatus {
                    message_id: rejected.message_id.to_string(),
                    state: pb::MessageState::DeadLettered as i32,
                    reason_code: "INVALID_BODY".to_owned(),
                    ..Default::default()
                },
            );
        }
        clock.advance(Duration::from_secs(1));
        until("both are settled", || async {
            state_of(&nl, delivered.message_id).await.map(|e| e.state)
                == Some(OutboxState::Delivered)
                && state_of(&nl, rejected.message_id).await.map(|e| e.state)
                    == Some(OutboxState::Failed)
        })
        .await;
        let failure = state_of(&nl, rejected.message_id)
            .await
            .unwrap()
            .failure
            .unwrap();
        assert_eq!(
            (failure.outcome.as_str(), failure.reason_code.as_str()),
            ("rejected-by-recipient", "INVALID_BODY")
        );
        assert_eq!(nl.status().outbox_submitted, 0);
        nl.shutdown().await;
    }

    /// An entry settled from the broker's status while its receipt was merely late: the
    /// receipt, when it comes, finds the entry as it would have left it, changes nothing
    /// and is no contradiction (no WARN, no `contradicted_by`), whatever the final state;
    /// and an expired or dead-lettered one the operator redrives since is still moved to
    /// `DELIVERED` by its delivery receipt.
    #[tokio::test]
    async fn a_late_receipt_after_a_settle_from_the_status_is_no_contradiction() {
        let logs = LogCapture::start();
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        // (the broker's state, its reason code, the receipt its sender gets)
        let cases = [
            (pb::MessageState::Acknowledged, "", pb::Outcome::Delivered),
            (pb::MessageState::Expired, "EXPIRED", pb::Outcome::Expired),
            (
                pb::MessageState::DeadLettered,
                "MAX_ATTEMPTS",
                pb::Outcome::DeadLettered,
            ),
            (
                pb::MessageState::DeadLettered,
                "INVALID_BODY",
                pb::Outcome::RejectedByRecipient,
            ),
            (pb::MessageState::Purged, "PURGED", pb::Outcome::Purged),
        ];
        let mut sent = Vec::new();
        for (n, _) in cases.iter().enumerate() {
            let entry = nl
                .send(request(&format!("k-{n}"), "BE-PAYOKE", referral()))
                .await
                .unwrap();
            until("it is submitted", || async {
                state_of(&nl, entry.message_id).await.map(|e| e.state)
                    == Some(OutboxState::Submitted)
            })
            .await;
            sent.push(entry.message_id);
        }
        // (the broker's time of the final state, as its receipt carries it)
        let changed_at = to_timestamp(UNIX_EPOCH + Duration::from_secs(START + 60));
        {
            let mut st = broker.lock();
            for (id, (state, reason, _)) in sent.iter().zip(&cases) {
                st.status_of.insert(
                    id.to_string(),
                    pb::MessageStatus {
                        message_id: id.to_string(),
                        state: *state as i32,
                        reason_code: (*reason).to_owned(),
                        state_changed_at: Some(changed_at),
                        ..Default::default()
                    },
                );
            }
        }
        clock.advance(Duration::from_secs(1));
        until("all are settled from the status", || async {
            let mut settled = true;
            for id in &sent {
                settled &=
                    state_of(&nl, *id).await.map(|e| e.state) != Some(OutboxState::Submitted);
            }
            settled
        })
        .await;
        for (id, (_, reason, outcome)) in sent.iter().zip(&cases) {
            let before = state_of(&nl, *id).await.unwrap();
            let late = receipt_envelope("NL-NRM", *id, *outcome, reason);
            let effect = apply(&nl, late).await;
            assert!(
                matches!(effect, ReceiptEffect::Ignored(_)),
                "{outcome:?}: {effect:?}"
            );
            let after = state_of(&nl, *id).await.unwrap();
            assert_eq!(after.state, before.state, "{outcome:?}");
            assert_eq!(
                after.failure.as_ref().map(|f| f.outcome.clone()),
                before.failure.as_ref().map(|f| f.outcome.clone()),
                "{outcome:?}"
            );
            assert!(after.contradicted_by.is_empty(), "{outcome:?}: {after:?}");
            if matches!(outcome, pb::Outcome::Expired | pb::Outcome::DeadLettered) {
                // (redriven by an operator since, and delivered)
                let receipt = receipt_envelope("NL-NRM", *id, pb::Outcome::Delivered, "");
                let effect = apply(&nl, receipt).await;
                assert!(
                    matches!(effect, ReceiptEffect::Moved(OutboxState::Delivered)),
                    "{outcome:?}: {effect:?}"
                );
            }
        }
        let warned = logs.lines_with(&["WARN"]);
        assert!(
            sent.iter()
                .all(|id| !warned.iter().any(|l| l.contains(&id.to_string()))),
            "{warned:#?}"
        );
        nl.shutdown().await;
    }

    /// A broker that keeps answering the outbox check about another message gets the
    /// entry submitted again a bounded number of times over the entry's life, not at
    /// every check for ever; then the entry stays SUBMITTED, its record says why, and the
    /// node says so at WARN once.
    #[tokio::test]
    async fn resubmits_after_status_answers_about_another_message_are_bounded_over_the_life() {
        let logs = LogCapture::start();
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        let submits = broker.lock().submits_arrived;
        broker.lock().status_answers_for = Some(MessageId::new_v7().to_string());
        clock.advance(Duration::from_secs(1));
        until("the bound is reached", || async {
            state_of(&nl, sent.message_id)
                .await
                .and_then(|e| e.last_error)
                .is_some_and(|e| e.contains("again and again"))
        })
        .await;
        // the check goes on asking, and submits it no more
        let asked = broker.lock().status_asked.len();
        until("the check asked again", || async {
            broker.lock().status_asked.len() > asked + 3
        })
        .await;
        let max = super::super::link::MAX_RESUBMITS_ON_OTHER_ANSWERS;
        assert_eq!(broker.lock().submits_arrived, submits + max as usize);
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Submitted);
        assert_eq!(entry.submit_attempts, 1 + max);
        let said = logs.lines_with(&["WARN", "keeps answering", &sent.message_id.to_string()]);
        assert_eq!(said.len(), 1, "{said:#?}");
        nl.shutdown().await;
    }

    /// The count of resubmits after status answers about another message is on disk
    /// before the submit it allows: one whose count cannot be flushed is not submitted
    /// (a crash after it would have counted it again from the number before, one more
    /// resubmit per crash beyond [`MAX_RESUBMITS_ON_OTHER_ANSWERS`]).
    ///
    /// [`MAX_RESUBMITS_ON_OTHER_ANSWERS`]: super::super::link::MAX_RESUBMITS_ON_OTHER_ANSWERS
    #[tokio::test]
    async fn a_resubmit_after_an_answer_about_another_message_waits_for_its_count_on_disk() {
        let logs = LogCapture::start();
        let Checking {
            dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        let submits = broker.lock().submits_arrived;
        // every flush of NL's store fails from now on
        std::fs::remove_dir_all(dir.path().join("NL-NRM").join("blobs")).unwrap();
        broker.lock().status_answers_for = Some(MessageId::new_v7().to_string());
        clock.advance(Duration::from_secs(1));
        until("the check stops at the flush", || async {
            !logs
                .lines_with(&["WARN", "outbox check stopped", &sent.message_id.to_string()])
                .is_empty()
        })
        .await;
        assert_eq!(
            broker.lock().submits_arrived,
            submits,
            "submitted again before its count was on disk"
        );
        nl.shutdown().await;
    }

    /// A check whose count of resubmits cannot be flushed submits nothing, and counts
    /// nothing either: once the store can be flushed again, the entry is submitted again
    /// as the bound allows. Counted, the rounds of a disk failing for a while (10 rounds:
    /// 100 min at the default interval) would use the bound up without a single submit,
    /// and the entry, perhaps lost by the broker, would stay `SUBMITTED` for good, its
    /// record saying that it was submitted again and again.
    #[tokio::test]
    async fn a_resubmit_whose_count_could_not_be_flushed_is_not_counted() {
        let logs = LogCapture::start();
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        let submits = broker.lock().submits_arrived;
        let faults = nl.store_faults();
        faults.set_failing(true);
        broker.lock().status_answers_for = Some(MessageId::new_v7().to_string());
        clock.advance(Duration::from_secs(1));
        let max = super::super::link::MAX_RESUBMITS_ON_OTHER_ANSWERS as usize;
        until(
            "more rounds stop at the flush than the bound allows resubmits",
            || async {
                logs.lines_with(&["WARN", "outbox check stopped", &sent.message_id.to_string()])
                    .len()
                    > max + 2
            },
        )
        .await;
        assert_eq!(broker.lock().submits_arrived, submits);
        faults.set_failing(false);
        until(
            "it is submitted again once the store can be flushed",
            || async { broker.lock().submits_arrived > submits },
        )
        .await;
        // The next rounds (every 20 ms) submit it again up to the bound: a count of the
        // resubmits is taken once they have stopped, not while one more may come. None
        // of the rounds that stopped at the flush used the bound up.
        until("the bound is reached", || async {
            state_of(&nl, sent.message_id)
                .await
                .and_then(|e| e.last_error)
                .is_some_and(|e| e.contains("again and again"))
        })
        .await;
        assert_eq!(broker.lock().submits_arrived, submits + max);
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Submitted);
        assert_eq!(entry.submit_attempts as usize, 1 + max, "{entry:?}");
        nl.shutdown().await;
    }

    /// A resubmit after a status answer about another message that the broker refuses
    /// for good (here: its expiry passed) does not end the entry FAILED: the broker never
    /// said it does not hold the message, and FAILED would have the user send it again
    /// under a new id, the recipient getting both. It stays SUBMITTED for its receipt,
    /// and its record says why.
    #[tokio::test]
    async fn a_resubmit_refused_after_a_status_answer_about_another_message_stays_submitted() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        {
            let mut st = broker.lock();
            st.status_answers_for = Some(MessageId::new_v7().to_string());
            st.submit_refusal = Some((
                tonic::Code::FailedPrecondition,
                "envelope.expires_at: has passed".into(),
            ));
        }
        clock.advance(Duration::from_secs(1));
        until("the refusal is recorded", || async {
            state_of(&nl, sent.message_id)
                .await
                .is_some_and(|e| e.last_error.is_some())
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Submitted, "{entry:?}");
        let said = entry.last_error.as_deref().unwrap_or_default();
        assert!(said.contains("another message"), "{said}");
        assert!(said.contains("refused"), "{said}");
        assert!(entry.failure.is_none(), "{entry:?}");
        // the receipt settles it
        broker.lock().submit_refusal = None;
        let receipt = receipt_envelope("NL-NRM", sent.message_id, pb::Outcome::Delivered, "");
        assert_eq!(
            apply(&nl, receipt).await,
            ReceiptEffect::Moved(OutboxState::Delivered)
        );
        nl.shutdown().await;
    }

    #[tokio::test]
    async fn a_lost_message_whose_body_is_erased_fails_with_the_reason() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        // past the referral's handling.retain_until (2036-12-31): body erased
        clock.advance(Duration::from_secs(11 * 365 * 86_400));
        assert_eq!(nl.run_retention().await.unwrap(), 1);
        broker.lose(&sent.message_id.to_string());
        until("NL gives the lost message up", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Failed)
        })
        .await;
        let failure = state_of(&nl, sent.message_id)
            .await
            .unwrap()
            .failure
            .unwrap();
        assert_eq!(
            (failure.outcome.as_str(), failure.reason_code.as_str()),
            ("lost-by-broker", "NOT_FOUND")
        );
        assert!(
            !broker
                .lock()
                .accepted
                .contains_key(&sent.message_id.to_string())
        );
        nl.shutdown().await;
    }

    #[tokio::test]
    async fn a_message_sent_while_the_broker_is_down_is_delivered_when_it_comes_up() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let (_nl_port, nl_addr) = reserved_port(); // nothing listens yet
        let nl = online(dir.path(), "NL-NRM", nl_addr, clock.clone()).await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("NL notices the broker is down", || async {
            nl.status().last_broker_error.is_some()
        })
        .await;
        assert!(!nl.status().broker_connected);
        assert_eq!(
            state_of(&nl, sent.message_id).await.unwrap().state,
            OutboxState::Queued
        );

        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let _s1 = broker.serve("NL-NRM", TcpListener::bind(nl_addr).await.unwrap());
        until("NL submits after the broker came up", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        assert!(broker.lock().queues["BE-PAYOKE"].len() == 1);
        until("NL is connected", || async { nl.status().broker_connected }).await;
        assert_eq!(
            nl.status().last_broker_error,
            None,
            "the error of the outage is over"
        );

        // BE comes online later and gets it.
        let (be_l, be_addr) = listener().await;
        let _s2 = broker.serve("BE-PAYOKE", be_l);
        let be = online(dir.path(), "BE-PAYOKE", be_addr, clock.clone()).await;
        until("BE stores it", || async {
            be.inbox(&ListFilter::default()).await.unwrap().len() == 1
        })
        .await;
        until("NL sees DELIVERED", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Delivered)
        })
        .await;
        nl.shutdown().await;
        be.shutdown().await;
    }

    #[tokio::test]
    async fn refusals_and_rejections_end_in_failed_with_the_reason() {
        let logs = LogCapture::start();
        let Pair {
            dir: _dir,
            clock: _clock,
            broker,
            nl,
            be,
            _serving,
        } = online_pair().await;

        // Refused at submit (a recipient that left the registry after the
        // node last fetched it): FAILED with the gRPC code, and the
        // broker's reason in the log.
        broker.lock().participants.push("DE-GONE".into());
        broker.lock().gone.push("DE-GONE".into());
        let lost = nl
            .send(request("k-1", "DE-GONE", referral()))
            .await
            .unwrap();
        until("the broker refusal is recorded", || async {
            state_of(&nl, lost.message_id).await.map(|e| e.state) == Some(OutboxState::Failed)
        })
        .await;
        let failure = state_of(&nl, lost.message_id)
            .await
            .unwrap()
            .failure
            .unwrap();
        assert_eq!(failure.outcome, "rejected-by-broker");
        assert_eq!(failure.reason_code, "NOT_FOUND");
        assert_eq!(failure.field_path, "envelope.recipient");
        let warned = logs.lines_with(&[
            "WARN",
            "broker refused message",
            &lost.message_id.to_string(),
        ]);
        assert_eq!(warned.len(), 1, "{warned:#?}");
        assert!(
            warned[0].contains("kind=referral ")
                && warned[0].contains(r#"reason="envelope.recipient: unknown participant""#),
            "{}",
            warned[0]
        );

        // An invalid body from a hand-made client: BE rejects it with the
        // reason and the field path, and stores nothing. (How a known
        // sender's outbox turns FAILED from the resulting non-delivery
        // report is covered by `receipts_move_the_outbox_forward_only`.)
        let sent = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("submitted or delivered", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) != Some(OutboxState::Queued)
        })
        .await;
        until("BE stores the good one", || async {
            be.inbox(&ListFilter::default()).await.unwrap().len() == 1
        })
        .await;
        let Body::Referral(mut r) = referral() else {
            unreachable!()
        };
        r.consent = None;
        let payload = Body::Referral(r).encode();
        let bad_id = MessageId::new_v7();
        let mut env = broker.lock().accepted[&sent.message_id.to_string()].clone();
        env.message_id = bad_id.to_string();
        env.payload_sha256 = trmx_proto::envelope::sha256(&payload).to_vec();
        env.payload = payload;
        broker.enqueue(env, "NL-NRM");
        until("BE rejects it", || async {
            !broker.lock().rejected.is_empty()
        })
        .await;
        let (id, code, field) = broker.lock().rejected[0].clone();
        assert_eq!(
            (id.as_str(), code.as_str(), field.as_str()),
            (
                bad_id.to_string().as_str(),
                "INVALID_BODY",
                "referral.consent"
            )
        );
        assert_eq!(be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
        nl.shutdown().await;
        be.shutdown().await;
    }

    /// A non-delivery report's reason code and field path come from the recipient's
    /// `Reject`, through the broker: text that is neither a code nor a path of schema
    /// names (a broker that let a body value through) reaches neither the outbox nor
    /// the log; the outcome still applies.
    #[tokio::test]
    async fn a_receipt_reason_that_is_no_code_or_path_is_left_out() {
        let logs = LogCapture::start();
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let mut env = receipt_envelope(
            "NL-NRM",
            sent.message_id,
            pb::Outcome::RejectedByRecipient,
            "Maria Gonzalez\nINFO forged line",
        );
        let mut receipt: pb::Receipt = prost::Message::decode(env.payload.as_slice()).unwrap();
        receipt.field_path = "referral.person.given_names=Maria".into();
        env.payload = prost::Message::encode_to_vec(&receipt);
        env.payload_sha256 = trmx_proto::envelope::sha256(&env.payload).to_vec();
        let receipt_id = env.message_id.clone();
        broker.enqueue(env, "");
        until("the report is applied and acknowledged", || async {
            broker.lock().acked.contains(&receipt_id)
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Failed);
        let failure = entry.failure.unwrap();
        assert_eq!(failure.outcome, "rejected-by-recipient");
        assert_eq!(
            (failure.reason_code.as_str(), failure.field_path.as_str()),
            ("", "")
        );
        assert!(logs.lines_with(&["Maria"]).is_empty());
        assert_eq!(logs.lines_with(&["forged line"]).len(), 0);
        assert_eq!(
            logs.lines_with(&["WARN", "reason code or field path", &receipt_id])
                .len(),
            1
        );
        nl.shutdown().await;
    }

    /// A referral envelope from the fake broker to BE-PAYOKE, made at `START`, under
    /// `message_id` and carrying `payload` as it is (a test decides whether it is a
    /// valid referral).
    fn referral_to_be(message_id: impl Into<String>, payload: Vec<u8>) -> pb::Envelope {
        pb::Envelope {
            message_id: message_id.into(),
            recipient: "BE-PAYOKE".into(),
            kind: Kind::Referral.to_pb() as i32,
            case_ref: trmx_proto::CaseRef::new_random().to_string(),
            priority: pb::Priority::Normal as i32,
            created_at: Some(to_timestamp(UNIX_EPOCH + Duration::from_secs(START))),
            content_type: Kind::Referral.content_type(),
            payload_sha256: trmx_proto::envelope::sha256(&payload).to_vec(),
            payload,
            ..Default::default()
        }
    }

    /// A delivery whose message id is none (a broken broker) is rejected, and the
    /// text in its place, which could be anything, stays out of the log.
    #[tokio::test]
    async fn a_delivery_whose_id_is_none_is_rejected_without_logging_it() {
        let logs = LogCapture::start();
        let (_dir, broker, be, _serving) = online_alone("BE-PAYOKE").await;
        let payload = referral().encode();
        let env = referral_to_be("Maria Gonzalez\nINFO forged line", payload);
        broker.enqueue(env, "NL-NRM");
        until("BE rejects it", || async {
            !broker.lock().rejected.is_empty()
        })
        .await;
        let (_, code, field) = broker.lock().rejected[0].clone();
        assert_eq!(
            (code.as_str(), field.as_str()),
            ("INVALID_ENVELOPE", "envelope.message_id")
        );
        assert_eq!(
            logs.lines_with(&["WARN", "rejecting delivery", "(not a message id)"])
                .len(),
            1
        );
        assert!(logs.lines_with(&["Maria"]).is_empty());
        assert!(logs.lines_with(&["forged line"]).is_empty());
        assert!(be.inbox(&ListFilter::default()).await.unwrap().is_empty());
        be.shutdown().await;
    }

    /// BE-PAYOKE online against a fake broker that holds every ack and reject, with
    /// `broker_answer_timeout` of `answer`, and a referral from NL-NRM stored: its
    /// ack is on its way. The lock guard releases the acks.
    async fn an_ack_held(
        answer: Duration,
    ) -> (
        tempfile::TempDir,
        FakeBroker,
        NodeCore,
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::OwnedMutexGuard<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let serving = broker.serve("BE-PAYOKE", l);
        let mut cfg = config(dir.path(), "BE-PAYOKE");
        cfg.broker_answer_timeout = answer;
        let be = online_with(cfg, addr, clock).await;
        let held = broker.ack_hold.clone().lock_owned().await;
        let payload = referral().encode();
        let env = referral_to_be(MessageId::new_v7().to_string(), payload);
        broker.enqueue(env, "NL-NRM");
        until("the message is stored", || async {
            be.inbox(&ListFilter::default()).await.unwrap().len() == 1
        })
        .await;
        (dir, broker, be, serving, held)
    }

    /// A referral from NL-NRM that `broker` delivers, once the node acknowledged it.
    async fn referral_from_nl_acked(broker: &FakeBroker) -> MessageId {
        let id = MessageId::new_v7();
        broker.enqueue(
            referral_to_be(id.to_string(), referral().encode()),
            "NL-NRM",
        );
        until("the message is stored and acknowledged", || async {
            broker.lock().acked.contains(&id.to_string())
        })
        .await;
        id
    }

    /// An ack's answer is read for the id acknowledged only: a broker that answers with
    /// outcomes for ids never acknowledged (thousands of them, their ids any text) gets
    /// one WARN line for the ack they make look not applied, not one per outcome, and
    /// none of its text in the log.
    #[tokio::test]
    async fn an_ack_answer_about_other_ids_is_one_log_line() {
        let logs = LogCapture::start();
        let (_dir, broker, be, _serving) = online_alone("BE-PAYOKE").await;
        broker.lock().ack_answer_junk = 5000;
        referral_from_nl_acked(&broker).await;
        be.shutdown().await;
        assert!(logs.lines_with(&["FORGED"]).is_empty());
        assert!(logs.lines_with(&["junk-"]).is_empty());
        assert!(logs.lines_with(&["ack not applied"]).len() <= 1);
    }

    /// An ack the broker answers `NOT_FOUND` (the delivery went final there while the
    /// node stored it) is told as what it means: the message is kept, and the sender may
    /// have been told otherwise.
    #[tokio::test]
    async fn an_ack_answered_not_found_says_the_message_is_kept_but_went_final_there() {
        let logs = LogCapture::start();
        let (_dir, broker, be, _serving) = online_alone("BE-PAYOKE").await;
        broker.lock().ack_not_found = true;
        referral_from_nl_acked(&broker).await;
        until("the ack's answer is logged", || async {
            !logs.lines_with(&["ack not applied"]).is_empty()
        })
        .await;
        let told = logs.lines_with(&["ack not applied"]);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(
            told[0].contains("no longer had this delivery in flight")
                // (a lifetime passing while the delivery is in flight is an end too: the
                // broker's answer to a late ack of an expired message)
                && told[0].contains("expired")
                && told[0].contains("the message is kept here"),
            "{}",
            told[0]
        );
        assert_eq!(be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
        be.shutdown().await;
    }

    /// An ack the broker refused for want of room (the participant had its share of
    /// requests in progress there) was left to the redelivery after the ack timeout,
    /// which counts an attempt towards dead-lettering a message stored here. The node now
    /// asks again a few times, and the ack lands; past that it still leaves it to the
    /// redelivery.
    #[tokio::test]
    async fn an_ack_refused_for_want_of_room_is_asked_again() {
        let (_dir, broker, be, _serving) = online_alone("BE-PAYOKE").await;
        broker.lock().ack_refusals = 2;
        let id = MessageId::new_v7();
        broker.enqueue(
            referral_to_be(id.to_string(), referral().encode()),
            "NL-NRM",
        );
        until("the ack lands after two refusals", || async {
            broker.lock().acked.contains(&id.to_string())
        })
        .await;
        assert_eq!(broker.lock().ack_calls, 3);

        // refused more times than the node asks: it stops asking
        broker.lock().ack_refusals = usize::MAX;
        let calls_before = broker.lock().ack_calls;
        let other = MessageId::new_v7();
        broker.enqueue(
            referral_to_be(other.to_string(), referral().encode()),
            "NL-NRM",
        );
        until("the node gives up asking", || async {
            broker.lock().ack_calls
                == calls_before + 1 + super::super::link::ROOM_RETRY_DELAYS.len()
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            broker.lock().ack_calls,
            calls_before + 1 + super::super::link::ROOM_RETRY_DELAYS.len()
        );
        be.shutdown().await;
    }

    /// A reject refused for want of room is asked again as an ack is: left to the
    /// redelivery, it would count attempts until the broker dead-lettered the message as
    /// `MAX_ATTEMPTS`, and its sender would not learn why it was refused.
    #[tokio::test]
    async fn a_reject_refused_for_want_of_room_is_asked_again() {
        let (_dir, broker, be, _serving) = online_alone("BE-PAYOKE").await;
        broker.lock().reject_refusals = 2;
        let id = MessageId::new_v7();
        let mut damaged = referral_to_be(id.to_string(), referral().encode());
        damaged.payload_sha256 = vec![0; 32];
        broker.enqueue(damaged, "NL-NRM");
        until("the reject lands after two refusals", || async {
            !broker.lock().rejected.is_empty()
        })
        .await;
        assert_eq!(broker.lock().reject_calls, 3);
        let (rejected, code, _) = broker.lock().rejected[0].clone();
        assert_eq!(
            (rejected, code.as_str()),
            (id.to_string(), "DIGEST_MISMATCH")
        );
        be.shutdown().await;
    }

    /// A broker that does not answer an ack (or a reject) does not stall the receive
    /// loop for good: the link gives up on it after `broker_answer_timeout` and
    /// reconnects (the broker delivers the message again, and the inbox keeps it
    /// once).
    #[tokio::test]
    async fn an_ack_the_broker_does_not_answer_does_not_stall_receiving() {
        let logs = LogCapture::start();
        let (_dir, _broker, be, _serving, held) = an_ack_held(Duration::from_millis(500)).await;
        until("the link gives up on the ack", || async {
            !logs
                .lines_with(&["WARN", "the broker did not answer"])
                .is_empty()
        })
        .await;
        be.shutdown().await;
        drop(held);
    }

    /// A broker that takes the connection but does not answer `GetInfo` holds neither
    /// the receive loop (it tries again) nor a shutdown up.
    #[tokio::test]
    async fn a_broker_that_does_not_answer_get_info_holds_no_shutdown_up() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let held = broker.get_info_hold.clone().lock_owned().await;
        let (l, addr) = listener().await;
        let _serving = broker.serve("BE-PAYOKE", l);
        let mut cfg = config(dir.path(), "BE-PAYOKE");
        cfg.broker_answer_timeout = Duration::from_millis(300);
        let be = online_with(cfg, addr, clock).await;
        until("GetInfo is asked again after no answer", || async {
            broker.lock().get_info_arrived >= 2
        })
        .await;
        tokio::time::timeout(Duration::from_secs(10), be.shutdown())
            .await
            .expect("the shutdown waits for a GetInfo the broker does not answer");
        drop(held);
    }

    /// Nor does it hold a shutdown up while the node waits for that answer.
    #[tokio::test]
    async fn a_shutdown_does_not_wait_for_an_ack_the_broker_does_not_answer() {
        let (_dir, _broker, be, _serving, held) = an_ack_held(Duration::from_secs(600)).await;
        tokio::time::timeout(Duration::from_secs(10), be.shutdown())
            .await
            .expect("the shutdown waits for an ack the broker does not answer");
        drop(held);
    }

    /// A delivery over tonic's default 4 MiB (the broker takes envelopes of
    /// up to 8 MiB) reaches the node's checks: this one, no valid referral,
    /// is rejected with a reason, not a broken stream at every attempt.
    #[tokio::test]
    async fn a_delivery_over_four_mebibytes_is_checked_not_a_broken_stream() {
        let (_dir, broker, be, _serving) = online_alone("BE-PAYOKE").await;
        let payload = vec![0x5a; 5 << 20];
        let id = MessageId::new_v7();
        let env = referral_to_be(id.to_string(), payload);
        broker.enqueue(env, "NL-NRM");
        until("BE rejects it", || async {
            !broker.lock().rejected.is_empty()
        })
        .await;
        assert_eq!(broker.lock().rejected[0].0, id.to_string());
        assert_eq!(be.status().last_broker_error, None);
        be.shutdown().await;
    }

    /// A broker may take envelopes larger than the node's own limit (its
    /// `limits.max_envelope_bytes`, up to 64 MiB): one such delivery is read and
    /// checked (this one, no valid referral, is rejected with a reason), not a stream
    /// broken at every attempt.
    #[tokio::test]
    async fn a_delivery_over_the_nodes_limit_within_the_brokers_is_checked() {
        let (_dir, broker, be, _serving) = online_alone("BE-PAYOKE").await;
        broker.lock().max_envelope_bytes = 32 << 20;
        // (the limits are read at each connection: one made after the broker's change)
        broker.lock().end_streams = Some((tonic::Code::Unavailable, "restarting".into()));
        let asked = broker.lock().get_info_calls;
        until("the node connected again", || async {
            broker.lock().get_info_calls > asked
        })
        .await;
        broker.lock().end_streams = None;
        let payload = vec![0x5a; super::super::MAX_DELIVERY_BYTES + (1 << 20)];
        let id = MessageId::new_v7();
        let env = referral_to_be(id.to_string(), payload);
        broker.enqueue(env, "NL-NRM");
        until("BE rejects it", || async {
            !broker.lock().rejected.is_empty()
        })
        .await;
        assert_eq!(broker.lock().rejected[0].0, id.to_string());
        be.shutdown().await;
    }

    #[test]
    fn the_delivery_limit_follows_the_brokers_within_bounds() {
        use super::super::MAX_DELIVERY_BYTES;
        assert_eq!(super::super::link::delivery_limit(0), MAX_DELIVERY_BYTES);
        assert_eq!(
            super::super::link::delivery_limit(8 << 20),
            MAX_DELIVERY_BYTES
        );
        assert!(super::super::link::delivery_limit(32 << 20) > 32 << 20);
        assert!(super::super::link::delivery_limit(64 << 20) > 64 << 20);
        assert_eq!(
            super::super::link::delivery_limit(u64::MAX),
            super::super::link::delivery_limit(64 << 20)
        );
    }

    /// A message in the outbox that is not durable (its flush failed) is
    /// never submitted: the broker must not hold a message that a crash
    /// would take from the outbox.
    #[tokio::test]
    async fn an_outbox_entry_not_on_disk_is_not_submitted() {
        let logs = LogCapture::start();
        let (dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        // every flush of NL's store fails from now on
        std::fs::remove_dir_all(dir.path().join("NL-NRM").join("blobs")).unwrap();
        let sent = nl.send(request("k-1", "BE-PAYOKE", referral())).await;
        assert!(sent.is_err(), "answered although not durable: {sent:?}");
        let store = nl.inner.store.clone();
        let queued = store.queued(10).unwrap();
        assert_eq!(queued.len(), 1, "committed, not flushed");
        nl.inner.submit_wake.notify_one();
        // the submit loop tried, and stopped at the flush
        until("the submit loop found the outbox not durable", || async {
            !logs
                .lines_with(&["cannot make the outbox durable before submitting"])
                .is_empty()
        })
        .await;
        assert!(
            broker.lock().accepted.is_empty(),
            "submitted before it was durable"
        );
        nl.shutdown().await;
    }

    /// A submit the broker accepted, whose record was written but could not be flushed,
    /// was noted as a failed submit attempt too: the `SUBMITTED` entry counted the
    /// attempt twice and showed the store's error as its `last_error`, as if the broker
    /// had not taken it. The broker's answer is what the record says.
    #[tokio::test]
    async fn a_submit_whose_record_cannot_be_flushed_is_not_noted_as_failed() {
        let logs = LogCapture::start();
        let (dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let held = broker.submit_hold.lock().await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the submit reaches the broker", || async {
            broker.lock().submits_arrived > 0
        })
        .await;
        // every flush of NL's store fails from now on: the record of the broker's
        // answer is written, not flushed
        std::fs::remove_dir_all(dir.path().join("NL-NRM").join("blobs")).unwrap();
        drop(held);
        until("the failed flush is said", || async {
            !logs
                .lines_with(&["WARN", &sent.message_id.to_string()])
                .is_empty()
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Submitted, "{entry:?}");
        assert_eq!(entry.submit_attempts, 1, "{entry:?}");
        assert_eq!(entry.last_error, None, "{entry:?}");
        nl.shutdown().await;
    }

    /// A delivery whose store's flush failed is not acknowledged, and the node takes no
    /// delivery again while its disk fails: it reconnected at once, and the broker counts
    /// every delivery a stream takes and does not acknowledge as a failed attempt, so a
    /// failing disk took the node's messages to a dead letter within minutes. Once a
    /// flush succeeds, the copy comes again, is found stored, and is acknowledged: on
    /// disk, once.
    #[tokio::test]
    async fn a_delivery_not_on_disk_is_not_acknowledged_nor_taken_again_until_the_disk_works() {
        let logs = LogCapture::start();
        let Pair {
            dir: _dir,
            clock: _clock,
            broker,
            nl,
            be,
            _serving,
        } = online_pair().await;
        let faults = be.store_faults();
        faults.set_failing(true);
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let envelope = nl.inner.store.envelope(sent.message_id).unwrap().unwrap();
        until("BE stored it (not durably)", || async {
            be.inner
                .store
                .id_use(
                    &pid("NL-NRM"),
                    sent.message_id,
                    Content::of_envelope(&envelope),
                )
                .unwrap()
                == IdUse::Stored
        })
        .await;
        // delivered again, as the broker does after the stream closed (once it is: a
        // copy queued before would go down the stream still open, never read)
        until("BE's stream closed", || async {
            let status = be.status();
            !status.broker_connected && status.store_error.is_some()
        })
        .await;
        // (closed at the broker too: on a loaded host the server sees the node drop its
        // stream a moment later, and a copy queued before would go down it, unread)
        until("BE's stream closed at the broker", || async {
            broker.lock().open_streams.get("BE-PAYOKE") == Some(&0)
        })
        .await;
        let id = sent.message_id.to_string();
        broker.lose(&id);
        let env = nl.inner.store.envelope(sent.message_id).unwrap().unwrap();
        broker.enqueue(env, "NL-NRM");
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            !broker.lock().acked.contains(&id),
            "acked a copy not on disk"
        );
        assert_eq!(
            queued_at(&broker, "BE-PAYOKE"),
            std::slice::from_ref(&id),
            "taken again while the disk fails"
        );
        assert!(be.status().store_error.is_some(), "{:?}", be.status());
        faults.set_failing(false);
        until("acknowledged once the disk works", || async {
            broker.lock().acked.contains(&id)
        })
        .await;
        assert_eq!(be.inbox(&ListFilter::default()).await.unwrap().len(), 1);
        assert_eq!(be.status().store_error, None);
        // said once at ERROR, with what to do, however often it failed; and the recovery
        let said = logs.lines_with(&["ERROR", "cannot write to disk"]);
        assert_eq!(said.len(), 1, "{said:?}");
        for part in ["free disk space", "restart the node"] {
            assert!(said[0].contains(part), "{part}: {said:?}");
        }
        assert_eq!(logs.lines_with(&["can write to disk again"]).len(), 1);
        nl.shutdown().await;
        be.shutdown().await;
    }

    /// A withdrawal of a message whose submit is in flight waits for the
    /// broker's answer and then withdraws it there: it never says
    /// "withdrawn" for a message the broker goes on to deliver.
    #[tokio::test]
    async fn withdrawing_a_message_being_submitted_answers_what_the_broker_did() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let held = broker.submit_hold.lock().await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        // the submit is in flight (held by the broker) when the withdrawal comes
        until("the submit reaches the broker", || async {
            broker.lock().submits_arrived > 0
        })
        .await;
        let withdrawing = tokio::spawn({
            let nl = nl.clone();
            async move { nl.withdraw(sent.message_id).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !withdrawing.is_finished(),
            "answered before the submit's outcome"
        );
        drop(held);
        withdrawing.await.unwrap().unwrap();
        assert_eq!(broker.lock().withdrawn, [sent.message_id.to_string()]);
        assert!(queued_at(&broker, "BE-PAYOKE").is_empty());
        assert_withdrawn(&nl, sent.message_id).await;
        nl.shutdown().await;
    }

    /// Sends a referral to BE-PAYOKE (key `k-1`) and waits until the broker took it.
    async fn submitted_referral(nl: &NodeCore) -> OutboxEntry {
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the referral is submitted", || async {
            state_of(nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        sent
    }

    /// The ids the fake broker holds for `recipient`.
    fn queued_at(broker: &FakeBroker, recipient: &str) -> Vec<String> {
        broker
            .lock()
            .queues
            .get(recipient)
            .map(|q| q.iter().map(|e| e.message_id.clone()).collect())
            .unwrap_or_default()
    }

    async fn assert_withdrawn(nl: &NodeCore, id: MessageId) {
        let entry = state_of(nl, id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Failed, "{entry:?}");
        assert_eq!(
            entry.failure.map(|f| f.outcome).as_deref(),
            Some("withdrawn")
        );
    }

    /// A submit whose answer was lost on the way back leaves the entry queued while
    /// the broker holds the message: a withdrawal asks the broker. Out of the
    /// broker's reach, the message is withdrawn here, and the answer says that the
    /// broker's part is pending; the node withdraws it on the broker once it
    /// reaches it.
    #[tokio::test]
    async fn a_withdrawal_after_a_lost_submit_answer_withdraws_on_the_broker() {
        let (_dir, broker, nl, serving) = online_alone("NL-NRM").await;
        broker.lock().lose_submit_answers = true;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the broker holds it", || async {
            queued_at(&broker, "BE-PAYOKE").contains(&sent.message_id.to_string())
        })
        .await;
        until("NL saw the lost answer", || async {
            state_of(&nl, sent.message_id)
                .await
                .is_some_and(|e| e.submit_attempts > 0)
        })
        .await;
        assert_eq!(
            state_of(&nl, sent.message_id).await.unwrap().state,
            OutboxState::Queued
        );
        // the broker out of reach: withdrawn here, the broker's part pending
        broker.lock().withdraw_refusal = Some((tonic::Code::Unavailable, "down".into()));
        assert_eq!(
            nl.withdraw(sent.message_id).await.unwrap(),
            Withdrawal::BrokerPending
        );
        assert_withdrawn(&nl, sent.message_id).await;
        assert_eq!(nl.status().withdrawals_pending, 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            queued_at(&broker, "BE-PAYOKE").contains(&sent.message_id.to_string()),
            "still at the broker while it cannot be reached"
        );
        // reachable again: the node withdraws it there
        broker.lock().withdraw_refusal = None;
        until("withdrawn on the broker", || async {
            queued_at(&broker, "BE-PAYOKE").is_empty()
        })
        .await;
        assert_eq!(broker.lock().withdrawn, [sent.message_id.to_string()]);
        until("the status says so", || async {
            nl.status().withdrawals_pending == 0
        })
        .await;
        until("the entry says so", || async {
            state_of(&nl, sent.message_id)
                .await
                .and_then(|e| e.last_error)
                .is_some_and(|e| e.contains("withdrawn on the broker too"))
        })
        .await;
        assert_withdrawn(&nl, sent.message_id).await;
        assert_eq!(
            nl.withdraw(sent.message_id).await.unwrap(),
            Withdrawal::Done,
            "withdrawing again is harmless"
        );
        drop(serving);
        nl.shutdown().await;
    }

    /// A broker that does not answer the `Withdraw` of a pending withdrawal does not
    /// hold the shutdown up (the submit loop makes that call on its own, and a
    /// shutdown waits for the loop).
    #[tokio::test]
    async fn a_pending_withdrawal_the_broker_does_not_answer_holds_no_shutdown_up() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        broker.lock().lose_submit_answers = true;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("NL saw the lost answer", || async {
            state_of(&nl, sent.message_id)
                .await
                .is_some_and(|e| e.submit_attempts > 0)
        })
        .await;
        broker.lock().withdraw_refusal = Some((tonic::Code::Unavailable, "down".into()));
        assert_eq!(
            nl.withdraw(sent.message_id).await.unwrap(),
            Withdrawal::BrokerPending
        );
        let held = broker.withdraw_hold.clone().lock_owned().await;
        let arrived = broker.lock().withdraws_arrived;
        broker.lock().withdraw_refusal = None;
        until("the submit loop's withdrawal is on its way", || async {
            broker.lock().withdraws_arrived > arrived
        })
        .await;
        tokio::time::timeout(Duration::from_secs(10), nl.shutdown())
            .await
            .expect("the shutdown waits for a Withdraw the broker does not answer");
        drop(held);
    }

    /// A pending withdrawal that the broker refuses for good is recorded as such, and
    /// does not hold up the messages sent after it.
    #[tokio::test]
    async fn a_pending_withdrawal_the_broker_refuses_does_not_hold_up_the_outbox() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        broker.lock().lose_submit_answers = true;
        let first = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("NL saw the lost answer", || async {
            state_of(&nl, first.message_id)
                .await
                .is_some_and(|e| e.submit_attempts > 0)
        })
        .await;
        broker.lock().withdraw_refusal = Some((tonic::Code::Unavailable, "down".into()));
        assert_eq!(
            nl.withdraw(first.message_id).await.unwrap(),
            Withdrawal::BrokerPending
        );
        {
            let mut st = broker.lock();
            st.withdraw_refusal = Some((tonic::Code::InvalidArgument, "no".into()));
            st.lose_submit_answers = false;
        }
        let second = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the next message is submitted", || async {
            state_of(&nl, second.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let entry = state_of(&nl, first.message_id).await.unwrap();
        assert!(
            entry
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused the withdrawal")),
            "{entry:?}"
        );
        nl.shutdown().await;
    }

    /// A submitted message cannot be withdrawn while the broker is out of reach:
    /// only the broker can take it back, so the caller is told to try again.
    #[tokio::test]
    async fn a_submitted_message_is_not_withdrawn_while_the_broker_is_out_of_reach() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let sent = submitted_referral(&nl).await;
        broker.lock().withdraw_refusal = Some((tonic::Code::Unavailable, "down".into()));
        let err = nl.withdraw(sent.message_id).await.unwrap_err();
        assert!(
            matches!(&err, NodeError::BrokerUnavailable(m) if m.contains("try again")),
            "{err:?}"
        );
        assert_eq!(
            state_of(&nl, sent.message_id).await.unwrap().state,
            OutboxState::Submitted
        );
        nl.shutdown().await;
    }

    /// A submitted message the broker no longer holds (its store restored from a
    /// backup) is withdrawn here, and the outbox check never submits it again.
    #[tokio::test]
    async fn a_message_the_broker_lost_is_withdrawn_here_and_never_sent_again() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sent = submitted_referral(&nl).await;
        // another message on its way, which the outbox check asks about: the sign
        // that a check ran
        let witness = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the witness is submitted", || async {
            state_of(&nl, witness.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        broker.lose(&sent.message_id.to_string());
        nl.withdraw(sent.message_id).await.unwrap();
        assert_withdrawn(&nl, sent.message_id).await;
        // the outbox check runs: it looks after the witness only
        broker.lock().status_asked.clear();
        clock.advance(Duration::from_secs(3600));
        until("the outbox check ran", || async {
            broker
                .lock()
                .status_asked
                .contains(&witness.message_id.to_string())
        })
        .await;
        assert!(
            !broker
                .lock()
                .status_asked
                .contains(&sent.message_id.to_string()),
            "asked about the withdrawn message"
        );
        assert!(
            !broker
                .lock()
                .accepted
                .contains_key(&sent.message_id.to_string()),
            "submitted again"
        );
        assert_withdrawn(&nl, sent.message_id).await;
        nl.shutdown().await;
    }

    /// A retention run waits for a submit in flight: a message whose body it erases is
    /// either failed before it is sent (never sent) or on the broker (and shown so),
    /// never failed "erased" while the broker delivers it.
    #[tokio::test]
    async fn retention_waits_for_a_submit_in_flight() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let held = broker.submit_hold.lock().await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the submit reaches the broker", || async {
            broker.lock().submits_arrived > 0
        })
        .await;
        // the submit is in flight; the referral's retain_until (2036-12-31) passes
        clock.set(UNIX_EPOCH + Duration::from_secs(INTO_2037));
        let retention = tokio::spawn({
            let nl = nl.clone();
            async move { nl.run_retention().await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!retention.is_finished(), "it waits for the submit");
        drop(held);
        assert_eq!(retention.await.unwrap().unwrap(), 1);
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert!(
            broker
                .lock()
                .accepted
                .contains_key(&sent.message_id.to_string())
        );
        assert_eq!(entry.state, OutboxState::Submitted, "{entry:?}");
        assert!(entry.body_erased);
        nl.shutdown().await;
    }

    /// A message that expired on its way keeps its payload on the broker for a
    /// redrive. Its sender can still withdraw it there, which deletes it; one that
    /// failed for good (purged) is refused without asking.
    #[tokio::test]
    async fn an_expired_message_can_still_be_withdrawn_on_the_broker() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let sent = submitted_referral(&nl).await;
        let expired = receipt_envelope("NL-NRM", sent.message_id, pb::Outcome::Expired, "EXPIRED");
        assert_eq!(
            apply(&nl, expired).await,
            ReceiptEffect::Moved(OutboxState::Failed)
        );
        assert!(matches!(
            nl.withdraw(sent.message_id).await.unwrap(),
            Withdrawal::Done
        ));
        assert_eq!(broker.lock().withdrawn, vec![sent.message_id.to_string()]);
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Failed);
        assert_eq!(
            entry.failure.map(|f| f.outcome).as_deref(),
            Some("withdrawn")
        );

        let other = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("it is submitted", || async {
            state_of(&nl, other.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let purged = receipt_envelope("NL-NRM", other.message_id, pb::Outcome::Purged, "PURGED");
        apply(&nl, purged).await;
        let err = nl.withdraw(other.message_id).await.unwrap_err();
        assert!(err.to_string().contains("failed already"), "{err}");
        assert_eq!(broker.lock().withdrawn.len(), 1, "the broker was not asked");

        // one the broker no longer holds (its retention passed) keeps its failure
        let old = nl
            .send(request("k-3", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("it is submitted", || async {
            state_of(&nl, old.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let rejected = receipt_envelope(
            "NL-NRM",
            old.message_id,
            pb::Outcome::RejectedByRecipient,
            "INVALID_BODY",
        );
        apply(&nl, rejected).await;
        broker.lock().accepted.remove(&old.message_id.to_string());
        let err = nl.withdraw(old.message_id).await.unwrap_err();
        assert!(
            err.to_string().contains("nothing left to withdraw"),
            "{err}"
        );
        let entry = state_of(&nl, old.message_id).await.unwrap();
        assert_eq!(
            entry.failure.map(|f| f.outcome).as_deref(),
            Some("rejected-by-recipient")
        );
        nl.shutdown().await;
    }

    /// A message that was purged before its report arrived is not called
    /// delivered: the broker's own words are passed on.
    #[tokio::test]
    async fn a_withdrawal_the_broker_refuses_says_why() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let sent = submitted_referral(&nl).await;
        broker.lock().withdraw_refusal = Some((
            tonic::Code::FailedPrecondition,
            format!("message {} is already PURGED", sent.message_id),
        ));
        let err = nl.withdraw(sent.message_id).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("already PURGED"), "{text}");
        assert!(!text.contains("delivered"), "{text}");
        // a refusal for good is not taken for a broker out of reach
        broker.lock().withdraw_refusal = Some((tonic::Code::InvalidArgument, "no".into()));
        let err = nl.withdraw(sent.message_id).await.unwrap_err();
        assert!(
            matches!(&err, NodeError::FailedPrecondition(m) if m.contains("refused the withdrawal")),
            "{err:?}"
        );
        assert_eq!(
            state_of(&nl, sent.message_id).await.unwrap().state,
            OutboxState::Submitted
        );
        nl.shutdown().await;
    }

    // ---- connection failures, as the operator sees them -----------------------

    /// A federation in `<dir>/pki` with a broker certificate for localhost.
    fn federation(dir: &Path) -> trmx_certs::Federation {
        trmx_certs::Federation::create(&dir.join("pki"), "trmx.test").unwrap()
    }

    /// The broker's TLS config from `federation` (its CRL checked).
    fn broker_tls(federation: &trmx_certs::Federation) -> trmx_transport::ServerTls {
        broker_tls_with(federation, federation.broker("test").unwrap())
    }

    /// [`broker_tls`] with the broker certificate `cert`.
    fn broker_tls_with(
        federation: &trmx_certs::Federation,
        cert: trmx_certs::CertPaths,
    ) -> trmx_transport::ServerTls {
        let paths = trmx_transport::TlsPaths {
            ca: federation.ca_cert_path(),
            cert: cert.cert,
            key: cert.key,
        };
        trmx_transport::ServerTls::load(
            &paths,
            Some(&federation.crl_path()),
            trmx_transport::CrlPolicy::Warn,
        )
        .unwrap()
    }

    /// `me` as the daemon starts it (`NodeCore::start`: mutual TLS with the
    /// certificate `cert` of `federation`) against the broker at `addr`.
    async fn started(
        dir: &Path,
        me: &str,
        federation: &trmx_certs::Federation,
        cert: &trmx_certs::CertPaths,
        addr: SocketAddr,
    ) -> Result<NodeCore, NodeError> {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        started_on(dir, me, federation, cert, addr, clock).await
    }

    /// [`started`] on `clock`.
    async fn started_on(
        dir: &Path,
        me: &str,
        federation: &trmx_certs::Federation,
        cert: &trmx_certs::CertPaths,
        addr: SocketAddr,
        clock: Arc<ManualClock>,
    ) -> Result<NodeCore, NodeError> {
        NodeCore::start(tls_config(dir, me, federation, cert, addr), clock).await
    }

    /// The config of `me` with the certificate `cert` of `federation`, against the
    /// broker at `addr` (no CRL).
    fn tls_config(
        dir: &Path,
        me: &str,
        federation: &trmx_certs::Federation,
        cert: &trmx_certs::CertPaths,
        addr: SocketAddr,
    ) -> CoreConfig {
        let mut cfg = config(dir, me);
        cfg.broker_addr = addr.to_string();
        cfg.tls = trmx_transport::TlsPaths {
            ca: federation.ca_cert_path(),
            cert: cert.cert.clone(),
            key: cert.key.clone(),
        };
        cfg
    }

    /// The last broker error once there is one.
    async fn broker_error(node: &NodeCore) -> String {
        until("a broker error", || async {
            node.status().last_broker_error.is_some()
        })
        .await;
        node.status().last_broker_error.unwrap()
    }

    /// After a renewal, a node went on presenting its old certificate on the open
    /// HTTP/2 connection until that broke, which could be weeks away (or until the
    /// broker cut it off for the revocation of the old one). Now it moves to a new
    /// connection within seconds; the submit in flight then ends on the old
    /// connection (submitted once, not abandoned and sent again), the old connection
    /// closes, and messages flow both ways on the new one.
    #[tokio::test]
    async fn a_renewed_certificate_is_presented_on_a_new_connection() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let cert = federation.participant("NL-NRM").unwrap();
        let first = trmx_certs::CertInfo::from_pem_file(&cert.cert).unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let server = broker_tls(&federation);
        let _serving = broker.serve_tls("NL-NRM", l, server.clone());
        let nl = started(dir.path(), "NL-NRM", &federation, &cert, addr)
            .await
            .unwrap();
        let serials = || broker.lock().receive_serials.clone();
        until("NL receives with its first certificate", || async {
            serials() == [first.serial_hex.clone()]
        })
        .await;
        assert_eq!(server.open_connections(), 1);

        // a submit in flight when the certificate changes
        let held = broker.submit_hold.lock().await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the submit reaches the broker", || async {
            broker.lock().submits_arrived == 1
        })
        .await;
        let renewed = federation.ca.renew(&cert, 30).unwrap().new;
        assert_ne!(renewed.serial_hex, first.serial_hex);
        until("NL receives with its renewed certificate", || async {
            serials().last() == Some(&renewed.serial_hex)
        })
        .await;
        assert_eq!(
            server.open_connections(),
            2,
            "the old connection waits for the submit in flight"
        );
        // the node's view of its link moved too: the connection in use presents the
        // renewed certificate, which is not outdated (the TLS handle of the first
        // channel, kept beside the link, said for ever that it was)
        let link = nl.inner.link_tls().unwrap().status();
        assert_eq!(
            link.connected.map(|c| c.serial_hex),
            Some(renewed.serial_hex.clone())
        );
        assert!(!link.outdated, "the link's TLS handle says it is outdated");
        // and the status shows the renewed certificate, in force
        let shown = nl.status().certificate.unwrap();
        assert_eq!(
            (shown.serial_hex, shown.refused),
            (renewed.serial_hex.clone(), None)
        );
        drop(held);
        until("the submit in flight is answered", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        until("the old connection is closed", || async {
            server.open_connections() == 1
        })
        .await;
        assert_eq!(broker.lock().submits_arrived, 1, "submitted once");
        assert_eq!(
            serials(),
            [first.serial_hex.clone(), renewed.serial_hex.clone()],
            "one move"
        );

        // messages flow both ways on the new connection
        let again = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("a new message is submitted", || async {
            state_of(&nl, again.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let be = NodeCore::start_offline(config(dir.path(), "BE-PAYOKE"), clock)
            .await
            .unwrap();
        let incoming = be.send(request("k-1", "NL-NRM", referral())).await.unwrap();
        let envelope = be
            .inner
            .store
            .envelope(incoming.message_id)
            .unwrap()
            .unwrap();
        broker.enqueue(envelope, "BE-PAYOKE");
        until("NL stores and acknowledges a delivery", || async {
            broker.lock().acked == [incoming.message_id.to_string()]
        })
        .await;
        assert_eq!(nl.inbox(&ListFilter::default()).await.unwrap().len(), 1);
        assert_eq!(server.open_connections(), 1);

        let told = logs.lines_with(&["INFO", "the node certificate changed"]);
        assert_eq!(told.len(), 1, "{told:#?}");
        for part in [&first.serial_hex, &renewed.serial_hex] {
            assert!(told[0].contains(part.as_str()), "{part}: {}", told[0]);
        }
        be.shutdown().await;
        nl.shutdown().await;
    }

    /// Copies the certificate and key of `from` over those of `to`, as an operator
    /// deploys new files (the pair does not match for a moment: the node waits for it).
    fn install(from: &trmx_certs::CertPaths, to: &trmx_certs::CertPaths) {
        std::fs::copy(&from.cert, &to.cert).unwrap();
        std::fs::copy(&from.key, &to.key).unwrap();
    }

    /// NL-NRM's certificate, and a renewal the broker refuses.
    struct Renewal {
        /// NL-NRM's certificate files (the broker's CA issued them).
        cert: trmx_certs::CertPaths,
        /// What they hold.
        first: trmx_certs::CertInfo,
        /// NL-NRM's identity, issued by a CA the broker does not trust.
        foreign: trmx_certs::CertPaths,
        /// What that holds.
        bad: trmx_certs::CertInfo,
    }

    /// NL-NRM's certificate `cert`, and one of its identity from another CA (under
    /// `dir`) as a file from the wrong federation would be.
    fn renewal_from_a_stranger(dir: &Path, cert: trmx_certs::CertPaths) -> Renewal {
        let first = trmx_certs::CertInfo::from_pem_file(&cert.cert).unwrap();
        let stranger = trmx_certs::Federation::create(&dir.join("other-pki"), "trmx.test").unwrap();
        let foreign = stranger.participant("NL-NRM").unwrap();
        let bad = trmx_certs::CertInfo::from_pem_file(&foreign.cert).unwrap();
        assert_eq!(bad.identity, first.identity);
        Renewal {
            cert,
            first,
            foreign,
            bad,
        }
    }

    /// A referral from `be` (offline) to NL-NRM, queued at the fake `broker` for NL-NRM
    /// as the broker would: its message id.
    async fn referral_for_nl(be: &NodeCore, broker: &FakeBroker, key: &str) -> MessageId {
        let incoming = be.send(request(key, "NL-NRM", referral())).await.unwrap();
        let envelope = be
            .inner
            .store
            .envelope(incoming.message_id)
            .unwrap()
            .unwrap();
        broker.enqueue(envelope, "BE-PAYOKE");
        incoming.message_id
    }

    /// A certificate the broker refuses (here issued by another CA, as a file from the
    /// wrong federation would be; also one revoked or not yet valid) took the node off
    /// its working connection within seconds: the link moved to a new connection that
    /// the broker would not open. Now the new certificate is tried on the new
    /// connection first: refused, the link stays on the old one (messages flow both
    /// ways, the broker never sees a `Receive` with it), the refusal is said at ERROR
    /// with both serials and the broker's reason, tried again once a minute and said
    /// again every 15 minutes while the files stay; a good certificate then moves the
    /// link as before.
    #[tokio::test]
    async fn a_certificate_the_broker_refuses_leaves_the_link_on_its_connection() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let Renewal {
            cert,
            first,
            foreign,
            bad,
        } = renewal_from_a_stranger(dir.path(), federation.participant("NL-NRM").unwrap());
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let server = broker_tls(&federation);
        let _serving = broker.serve_tls("NL-NRM", l, server.clone());
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let nl = started_on(
            dir.path(),
            "NL-NRM",
            &federation,
            &cert,
            addr,
            clock.clone(),
        )
        .await
        .unwrap();
        let serials = || broker.lock().receive_serials.clone();
        until("NL receives with its first certificate", || async {
            serials() == [first.serial_hex.clone()] && nl.status().broker_connected
        })
        .await;

        // the handshakes the broker refused for an unknown CA
        let doomed = || {
            server
                .handshake_failures()
                .iter()
                .find(|(why, _)| *why == trmx_transport::HandshakeFailure::UnknownCa)
                .map_or(0, |(_, count)| *count)
        };
        assert_eq!(doomed(), 0);
        install(&foreign, &cert);
        let refusals = || logs.lines_with(&["ERROR", "the broker did not accept"]);
        until("the new certificate is tried", || async {
            !refusals().is_empty() || !nl.status().broker_connected
        })
        .await;
        assert!(
            nl.status().broker_connected,
            "the link left its working connection for a certificate the broker refuses: {:?}",
            nl.status().last_broker_error
        );
        until("the broker counts the refused handshake", || async {
            doomed() >= 1
        })
        .await;
        let told = refusals();
        assert_eq!(told.len(), 1, "{told:#?}");
        // (the broker's reason: its TLS alert; the other CA has the same name, so its
        // signature is what fails)
        for part in [
            &first.serial_hex,
            &bad.serial_hex,
            "received fatal alert",
            "it refused it",
        ] {
            assert!(told[0].contains(part), "{part}: {}", told[0]);
        }
        assert!(!told[0].contains("did not answer"), "{}", told[0]);
        // `trmx-node status` says so: the certificate in use is the first, and why the
        // files' is not
        let shown = nl.status().certificate.unwrap();
        assert_eq!(shown.serial_hex, first.serial_hex);
        let why = shown.refused.unwrap_or_default();
        for part in [
            "the broker did not accept the renewed certificate",
            "it refused it",
            bad.serial_hex.as_str(),
        ] {
            assert!(why.contains(part), "{part}: {why}");
        }
        assert!(!why.contains("did not answer"), "{why}");

        // messages flow both ways on the old connection
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("a message is submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let be = NodeCore::start_offline(config(dir.path(), "BE-PAYOKE"), clock.clone())
            .await
            .unwrap();
        let deliver = |key: &'static str| referral_for_nl(&be, &broker, key);
        let incoming = deliver("k-1").await;
        until("NL stores and acknowledges a delivery", || async {
            broker.lock().acked == [incoming.to_string()]
        })
        .await;
        assert!(nl.status().broker_connected);
        assert_eq!(
            serials(),
            std::slice::from_ref(&first.serial_hex),
            "no Receive with the refused certificate"
        );
        assert_eq!(server.open_connections(), 1);
        assert_eq!(doomed(), 1, "tried once");

        // tried again a minute later, still refused, not said again
        let outcomes = || logs.lines_with(&["the broker did not accept the new node certificate"]);
        clock.advance(Duration::from_secs(61));
        until("the refused certificate is tried again", || async {
            outcomes().len() == 2 && doomed() >= 2
        })
        .await;
        assert_eq!(doomed(), 2);
        assert_eq!(refusals().len(), 1, "{:#?}", outcomes());
        // said again after 15 minutes
        clock.advance(Duration::from_secs(15 * 60));
        until("the refusal is said again", || async {
            refusals().len() == 2 && doomed() >= 3
        })
        .await;
        assert_eq!(doomed(), 3);
        assert!(nl.status().broker_connected);
        assert_eq!(serials(), std::slice::from_ref(&first.serial_hex));

        // a good certificate moves the link, at once (the files changed)
        let good = federation
            .issue("NL-NRM-2", &trmx_certs::IssueSpec::participant("NL-NRM"))
            .unwrap();
        let renewed = trmx_certs::CertInfo::from_pem_file(&good.cert).unwrap();
        install(&good, &cert);
        until("NL receives with its renewed certificate", || async {
            serials().last() == Some(&renewed.serial_hex)
        })
        .await;
        assert_eq!(
            serials(),
            [first.serial_hex.clone(), renewed.serial_hex.clone()],
            "one move"
        );
        let incoming = deliver("k-2").await;
        until(
            "NL stores and acknowledges a delivery on the new connection",
            || async { broker.lock().acked.last() == Some(&incoming.to_string()) },
        )
        .await;
        until("the old connection is closed", || async {
            server.open_connections() == 1
        })
        .await;
        let moved = logs.lines_with(&["INFO", "the node certificate changed"]);
        assert_eq!(moved.len(), 1, "{moved:#?}");
        for part in [&first.serial_hex, &renewed.serial_hex] {
            assert!(moved[0].contains(part.as_str()), "{part}: {}", moved[0]);
        }
        assert_eq!(nl.inbox(&ListFilter::default()).await.unwrap().len(), 2);
        assert_eq!(broker.lock().submits_arrived, 1, "submitted once");
        assert_eq!(doomed(), 3, "the renewed certificate was accepted");
        let shown = nl.status().certificate.unwrap();
        assert_eq!(
            (shown.serial_hex, shown.refused),
            (renewed.serial_hex.clone(), None)
        );
        be.shutdown().await;
        nl.shutdown().await;
    }

    /// A renewed certificate that the broker refused left the link on its connection,
    /// but only until that broke: the next connection presented the files as they were,
    /// which the broker refused, and a network failure or a broker restart cut the node
    /// off while the certificate the broker had accepted was still good. Now the link's
    /// next connections present that one again, until a certificate the broker accepts
    /// is installed (the link then moves to it, as before), and the ERROR says so.
    #[tokio::test]
    async fn a_refused_renewal_leaves_the_old_certificate_for_the_next_connections() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let Renewal {
            cert,
            first,
            foreign,
            bad,
        } = renewal_from_a_stranger(dir.path(), federation.participant("NL-NRM").unwrap());
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, broker_addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls(&federation));
        let relay = Relay::start(broker_addr).await;
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let nl = started_on(
            dir.path(),
            "NL-NRM",
            &federation,
            &cert,
            relay.addr,
            clock.clone(),
        )
        .await
        .unwrap();
        let serials = || broker.lock().receive_serials.clone();
        until("NL receives with its first certificate", || async {
            serials() == [first.serial_hex.clone()] && nl.status().broker_connected
        })
        .await;
        install(&foreign, &cert);
        let refusals = || logs.lines_with(&["ERROR", "the broker did not accept"]);
        until("the new certificate is refused", || async {
            !refusals().is_empty()
        })
        .await;

        // the connection breaks: the next one presents the certificate the broker accepts
        relay.cut();
        until("NL receives again with its first certificate", || async {
            serials().len() == 2 && nl.status().broker_connected
        })
        .await;
        assert_eq!(
            serials(),
            [first.serial_hex.clone(), first.serial_hex.clone()]
        );
        let be = NodeCore::start_offline(config(dir.path(), "BE-PAYOKE"), clock.clone())
            .await
            .unwrap();
        let deliver = |key: &'static str| referral_for_nl(&be, &broker, key);
        let incoming = deliver("k-1").await;
        until("NL stores and acknowledges a delivery", || async {
            broker.lock().acked == [incoming.to_string()]
        })
        .await;
        let shown = nl.status().certificate.unwrap();
        assert_eq!(shown.serial_hex, first.serial_hex);
        let why = shown.refused.unwrap_or_default();
        assert!(why.contains(bad.serial_hex.as_str()), "{why}");
        // said at ERROR: which certificate the node goes on presenting, until when, and
        // what to do
        let told = refusals();
        assert_eq!(told.len(), 1, "{told:#?}");
        let until_when = trmx_certs::format_time(first.not_after);
        for part in [
            first.serial_hex.as_str(),
            bad.serial_hex.as_str(),
            until_when.as_str(),
            "its next connections present the old one",
            "install a certificate the broker accepts",
        ] {
            assert!(told[0].contains(part), "{part}: {}", told[0]);
        }

        // a good certificate moves the link, at once, and is presented from then on
        let good = federation
            .issue("NL-NRM-2", &trmx_certs::IssueSpec::participant("NL-NRM"))
            .unwrap();
        let renewed = trmx_certs::CertInfo::from_pem_file(&good.cert).unwrap();
        install(&good, &cert);
        until("NL receives with its renewed certificate", || async {
            serials().last() == Some(&renewed.serial_hex)
        })
        .await;
        relay.cut();
        until("NL receives again with its renewed certificate", || async {
            serials().len() == 4 && nl.status().broker_connected
        })
        .await;
        assert_eq!(serials()[3], renewed.serial_hex);
        let incoming = deliver("k-2").await;
        until("NL stores and acknowledges a delivery", || async {
            broker.lock().acked.last() == Some(&incoming.to_string())
        })
        .await;
        let shown = nl.status().certificate.unwrap();
        assert_eq!(
            (shown.serial_hex, shown.refused),
            (renewed.serial_hex.clone(), None)
        );
        be.shutdown().await;
        nl.shutdown().await;
    }

    /// While the link holds the old certificate (the broker refused the renewal in the
    /// files), the old one is what the broker sees, and what must be renewed before it
    /// expires; but the daily expiry check read the files' certificate, valid for a year,
    /// and said nothing as the one presented ran out, nor when it expired. Now it checks
    /// the certificate the link presents. And the refusal, said again every 15 minutes,
    /// went on saying that the next connections present the old one "until the old one
    /// expires" once it had: now it says that the old one has expired.
    #[tokio::test]
    async fn the_expiry_of_a_held_certificate_is_said() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let Renewal {
            cert,
            first,
            foreign,
            ..
        } = renewal_from_a_stranger(dir.path(), issued(&federation, "NL-NRM", 0, 40));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls(&federation));
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let nl = started_on(
            dir.path(),
            "NL-NRM",
            &federation,
            &cert,
            addr,
            clock.clone(),
        )
        .await
        .unwrap();
        until("NL is connected with its first certificate", || async {
            nl.status().broker_connected
        })
        .await;
        install(&foreign, &cert);
        until("the new certificate is refused", || async {
            !logs
                .lines_with(&["ERROR", "the broker did not accept"])
                .is_empty()
        })
        .await;
        assert!(nl.inner.link_tls().unwrap().status().held);

        // 25 days left on the certificate presented
        clock.advance(DAY * 15);
        nl.inner.recheck_certificate();
        let warned = logs.lines_with(&["WARN", "the node certificate expires soon"]);
        assert_eq!(warned.len(), 1, "{warned:#?}");
        let until_when = trmx_certs::format_time(first.not_after);
        assert!(warned[0].contains(until_when.as_str()), "{}", warned[0]);
        // and once it has expired
        clock.advance(DAY * 30);
        nl.inner.recheck_certificate();
        let expired = logs.lines_with(&["ERROR", "the node certificate has expired"]);
        assert_eq!(expired.len(), 1, "{expired:#?}");
        assert!(expired[0].contains(until_when.as_str()), "{}", expired[0]);
        // and the refusal, said again, no longer says the old one is good until then
        until("the refusal is said again", || async {
            logs.lines_with(&["ERROR", "the broker did not accept"])
                .len()
                == 2
        })
        .await;
        let told = logs.lines_with(&["ERROR", "the broker did not accept"]);
        assert!(
            told[1].contains("the old one has expired")
                && !told[1].contains("until the old one expires"),
            "{}",
            told[1]
        );
        nl.shutdown().await;
    }

    /// A renewal whose proof on a new connection got no answer in time (a slow broker,
    /// not a refusal) was said as "the broker did not accept" it, at ERROR and in the
    /// status, as if the broker had refused the certificate. Now both say that the
    /// broker did not answer, at WARN while the old certificate is good; the link keeps
    /// the old one meanwhile, and moves once the broker answers.
    #[tokio::test]
    async fn a_renewal_the_broker_did_not_answer_in_time_is_not_called_refused() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let cert = federation.participant("NL-NRM").unwrap();
        let first = trmx_certs::CertInfo::from_pem_file(&cert.cert).unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls(&federation));
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let nl = started_on(
            dir.path(),
            "NL-NRM",
            &federation,
            &cert,
            addr,
            clock.clone(),
        )
        .await
        .unwrap();
        let serials = || broker.lock().receive_serials.clone();
        until("NL receives with its first certificate", || async {
            serials() == [first.serial_hex.clone()] && nl.status().broker_connected
        })
        .await;

        // the broker answers no GetInfo for now: the proof of the renewal times out
        let silent = broker.get_info_hold.lock().await;
        let renewed = federation.ca.renew(&cert, 30).unwrap().new;
        let unanswered = || logs.lines_with(&["the broker did not answer"]);
        until_within(
            Duration::from_secs(30),
            "the proof of the renewal times out",
            || async { !unanswered().is_empty() },
        )
        .await;
        let told = unanswered();
        assert_eq!(told.len(), 1, "{told:#?}");
        assert!(told[0].contains(" WARN "), "{}", told[0]);
        for part in [
            first.serial_hex.as_str(),
            renewed.serial_hex.as_str(),
            "no answer within",
            "did not refuse it",
        ] {
            assert!(told[0].contains(part), "{part}: {}", told[0]);
        }
        assert!(
            logs.lines_with(&["did not accept"]).is_empty(),
            "{:#?}",
            logs.lines_with(&["did not accept"])
        );
        let shown = nl.status().certificate.unwrap();
        assert_eq!(shown.serial_hex, first.serial_hex, "the old one, held");
        let why = shown.refused.unwrap_or_default();
        assert!(
            why.contains("the broker did not answer")
                && why.contains(renewed.serial_hex.as_str())
                && !why.contains("did not accept"),
            "{why}"
        );
        assert!(nl.status().broker_connected);

        // the broker answers again: the renewal is tried a minute later, and the link moves
        drop(silent);
        clock.advance(Duration::from_secs(61));
        until("NL receives with its renewed certificate", || async {
            serials().last() == Some(&renewed.serial_hex)
        })
        .await;
        let shown = nl.status().certificate.unwrap();
        assert_eq!(
            (shown.serial_hex, shown.refused),
            (renewed.serial_hex.clone(), None)
        );
        nl.shutdown().await;
    }

    /// A renewal whose proof got no answer in time, while the link's connection is up,
    /// made the link hold the old certificate for its next connections even when that
    /// one had expired: once the connection broke, the link presented a certificate the
    /// broker surely refuses, instead of the renewed one it never refused, until a
    /// proof went through. An expired old certificate is not held: the next connections
    /// present the files'.
    #[tokio::test]
    async fn an_expired_certificate_is_not_held_after_a_renewal_got_no_answer() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let cert = issued(&federation, "NL-NRM", 0, 2);
        let first = trmx_certs::CertInfo::from_pem_file(&cert.cert).unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, broker_addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls(&federation));
        let relay = Relay::start(broker_addr).await;
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let nl = started_on(
            dir.path(),
            "NL-NRM",
            &federation,
            &cert,
            relay.addr,
            clock.clone(),
        )
        .await
        .unwrap();
        let serials = || broker.lock().receive_serials.clone();
        until("NL receives with its first certificate", || async {
            serials() == [first.serial_hex.clone()] && nl.status().broker_connected
        })
        .await;

        // the old certificate expires on the node's clock, and the broker does not answer
        // the proof of its renewal
        let silent = broker.get_info_hold.lock().await;
        clock.advance(DAY * 3);
        let renewed = federation.ca.renew(&cert, 30).unwrap().new;
        until_within(
            Duration::from_secs(30),
            "the proof of the renewal times out",
            || async {
                !logs
                    .lines_with(&["ERROR", "the broker did not answer"])
                    .is_empty()
            },
        )
        .await;
        assert!(nl.status().broker_connected, "the connection is kept");

        // the connection breaks: the next one presents the renewed certificate (the
        // broker here, on the system's clock, would take the old one too), without
        // waiting for the next proof, a minute later on the node's clock
        drop(silent);
        relay.cut();
        until("NL receives again", || async {
            serials().len() == 2 && nl.status().broker_connected
        })
        .await;
        assert_eq!(
            serials(),
            [first.serial_hex.clone(), renewed.serial_hex.clone()]
        );
        nl.shutdown().await;
    }

    /// While the link holds the old certificate (the broker did not take the renewal in
    /// the files), a revocation of that old one went unsaid on the node until the broker
    /// refused it, at its next CRL reload or handshake, and cut the node off. Now the
    /// node finds it in its own CRL (`tls.crl`) when that changes, says so at ERROR with
    /// what to do (again once a day), and its status says it.
    #[tokio::test]
    async fn a_held_certificate_that_the_crl_lists_is_said_revoked() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let Renewal {
            cert,
            first,
            foreign,
            ..
        } = renewal_from_a_stranger(dir.path(), federation.participant("NL-NRM").unwrap());
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls(&federation));
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let mut cfg = tls_config(dir.path(), "NL-NRM", &federation, &cert, addr);
        cfg.crl = Some(federation.crl_path());
        let nl = NodeCore::start(cfg, clock.clone()).await.unwrap();
        until("NL is connected with its first certificate", || async {
            nl.status().broker_connected
        })
        .await;
        install(&foreign, &cert);
        until("the new certificate is refused", || async {
            !logs
                .lines_with(&["ERROR", "the broker did not accept"])
                .is_empty()
        })
        .await;
        assert!(nl.inner.link_tls().unwrap().status().held);
        let revoked = || logs.lines_with(&["ERROR", "is revoked"]);
        nl.inner.recheck_certificate();
        assert!(revoked().is_empty(), "{:#?}", revoked());

        // the CA revokes the old certificate, and the node gets the new CRL
        federation.ca.revoke_serial_hex(&first.serial_hex).unwrap();
        until("the revocation is said", || async { !revoked().is_empty() }).await;
        let said = revoked();
        assert_eq!(said.len(), 1, "{said:#?}");
        for part in [
            first.serial_hex.as_str(),
            "tls.crl",
            "the broker refused the renewed one",
            "install a certificate the broker accepts",
        ] {
            assert!(said[0].contains(part), "{part}: {}", said[0]);
        }
        assert!(!said[0].contains("did not answer"), "{}", said[0]);
        let why = nl.status().certificate.unwrap().refused.unwrap_or_default();
        assert!(
            why.contains("revoked") && why.contains(first.serial_hex.as_str()),
            "{why}"
        );
        // not again within a day; again the next day
        nl.inner.recheck_certificate();
        assert_eq!(revoked().len(), 1, "{:#?}", revoked());
        clock.advance(DAY);
        nl.inner.recheck_certificate();
        assert_eq!(revoked().len(), 2, "{:#?}", revoked());
        nl.shutdown().await;
    }

    /// A held certificate that the CRL lists was said revoked with the advice "install a
    /// certificate the broker accepts" also when the link held it only because the
    /// broker did not answer the proof of the renewal: the renewed certificate in the
    /// files may well be good, and the operator was sent to replace it. Now the ERROR
    /// says that the broker did not answer (it did not refuse the renewed one), that the
    /// link tries that one again, and to look at the broker.
    #[tokio::test]
    async fn a_held_certificate_the_crl_lists_after_no_answer_does_not_blame_the_files() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let cert = federation.participant("NL-NRM").unwrap();
        let first = trmx_certs::CertInfo::from_pem_file(&cert.cert).unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls(&federation));
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let mut cfg = tls_config(dir.path(), "NL-NRM", &federation, &cert, addr);
        cfg.crl = Some(federation.crl_path());
        let nl = NodeCore::start(cfg, clock.clone()).await.unwrap();
        until("NL is connected with its first certificate", || async {
            nl.status().broker_connected
        })
        .await;
        // the broker answers no GetInfo for now: the proof of the renewal times out, and
        // the link holds the old certificate
        let silent = broker.get_info_hold.lock().await;
        federation.ca.renew(&cert, 30).unwrap();
        until_within(
            Duration::from_secs(30),
            "the proof of the renewal times out",
            || async { !logs.lines_with(&["the broker did not answer"]).is_empty() },
        )
        .await;
        assert!(nl.inner.link_tls().unwrap().status().held);

        // the CA revokes the old certificate, and the node gets the new CRL
        federation.ca.revoke_serial_hex(&first.serial_hex).unwrap();
        let revoked = || logs.lines_with(&["ERROR", "is revoked"]);
        until("the revocation is said", || async { !revoked().is_empty() }).await;
        let said = revoked();
        assert_eq!(said.len(), 1, "{said:#?}");
        for part in [
            first.serial_hex.as_str(),
            "tls.crl",
            "the broker did not answer",
            "did not refuse it",
            "tries again every minute",
            "check that the broker is up",
        ] {
            assert!(said[0].contains(part), "{part}: {}", said[0]);
        }
        assert!(!said[0].contains("install a certificate"), "{}", said[0]);
        drop(silent);
        nl.shutdown().await;
    }

    /// `trmx-node status` said "Unknown: transport error" for a revoked
    /// certificate: the certificate error is in the error's source chain.
    #[tokio::test]
    async fn status_shows_why_the_broker_refused_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let cert = federation.participant("NL-NRM").unwrap();
        federation.revoke(&cert).unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls(&federation));
        let nl = started(dir.path(), "NL-NRM", &federation, &cert, addr)
            .await
            .unwrap();
        let error = broker_error(&nl).await;
        assert!(error.contains("CertificateRevoked"), "{error}");
        assert!(!nl.status().broker_connected);
        nl.shutdown().await;
    }

    /// The node checked the broker's certificate on the system clock, while all else
    /// it does runs on its own clock, which holds its time through a jump of the system
    /// clock: a jump past the broker certificate's validity cut the node off until the
    /// clock was put right. Now it is checked on the node's clock: a node whose clock
    /// stands past the certificate's notAfter, or before its notBefore, is refused the
    /// broker, with an error that names the validity and the node's time, though the
    /// system clock is right; and a node whose clock is right connects.
    #[tokio::test]
    async fn the_brokers_certificate_is_checked_on_the_nodes_clock() {
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls(&federation));
        let brokers =
            trmx_certs::CertInfo::from_pem_file(&federation.dir.join("broker-test.pem")).unwrap();
        let cert = federation.participant("NL-NRM").unwrap();
        for (case, at, says) in [
            ("ahead", brokers.not_after + DAY, "certificate expired"),
            (
                "behind",
                brokers.not_before - DAY,
                "certificate not valid yet",
            ),
        ] {
            let clock = Arc::new(ManualClock::new(at));
            let nl = started_on(
                &dir.path().join(case),
                "NL-NRM",
                &federation,
                &cert,
                addr,
                clock,
            )
            .await
            .unwrap();
            let error = broker_error(&nl).await;
            let secs = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
            for part in [says, &format!("verification time {secs} (UNIX)")] {
                assert!(error.contains(part), "{case}: {part}: {error}");
            }
            assert!(!nl.status().broker_connected, "{case}");
            nl.shutdown().await;
        }
        assert!(broker.lock().receive_serials.is_empty());

        let nl = started(
            &dir.path().join("right"),
            "NL-NRM",
            &federation,
            &cert,
            addr,
        )
        .await
        .unwrap();
        until("NL receives", || async {
            broker.lock().receive_serials.len() == 1 && nl.status().broker_connected
        })
        .await;
        nl.shutdown().await;
    }

    /// A node pointed at the broker's admin port (plain HTTP) got
    /// "received corrupt message of type InvalidContentType" and no clue.
    #[tokio::test]
    async fn a_plain_http_port_gets_a_hint_about_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let cert = federation.participant("NL-NRM").unwrap();
        let (l, addr) = listener().await;
        // what an HTTP/1 server answers to a TLS ClientHello
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let nl = started(dir.path(), "NL-NRM", &federation, &cert, addr)
            .await
            .unwrap();
        let error = broker_error(&nl).await;
        assert!(error.contains("InvalidContentType"), "{error}");
        assert!(
            error.ends_with("(is broker.address the broker's gRPC/TLS port, not its admin port?)"),
            "{error}"
        );
        nl.shutdown().await;
    }

    /// A node that could not reach the broker logged nothing at INFO, and
    /// journalctl looked healthy: the first failure is a WARN with its
    /// cause, the same failure again is not (DEBUG only), and the return of
    /// the broker is an INFO.
    #[tokio::test]
    async fn connection_failures_are_warned_once_and_the_recovery_told() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let (_port, addr) = reserved_port(); // nothing listens yet
        let nl = online(dir.path(), "NL-NRM", addr, clock).await;
        until("two failed attempts after the first", || async {
            logs.lines_with(&["DEBUG", "cannot connect to the broker"])
                .len()
                >= 2
        })
        .await;
        let warned = logs.lines_with(&["WARN", "cannot connect to the broker"]);
        assert_eq!(warned.len(), 1, "{warned:#?}");
        assert!(warned[0].contains("Connection refused"), "{}", warned[0]);

        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let _serving = broker.serve("NL-NRM", TcpListener::bind(addr).await.unwrap());
        until("NL is connected", || async { nl.status().broker_connected }).await;
        // (told once the stream has lasted: one the broker ends at once is no recovery)
        until("the recovery is told", || async {
            !logs
                .lines_with(&["INFO", "connected to broker again"])
                .is_empty()
        })
        .await;
        let back = logs.lines_with(&["INFO", "connected to broker again"]);
        assert_eq!(back.len(), 1, "{back:#?}");
        assert!(back[0].contains("failures="), "{}", back[0]);
        nl.shutdown().await;
    }

    /// While the broker was out of reach, each submit attempt (one every
    /// `reconnect_max` at most, a minute by default) wrote the queued entry's record,
    /// its attempts and last error, and flushed the store: hours of outage were hours of
    /// store writes that said nothing new. The record is now written when the failure is
    /// said at WARN (the first, a different one, the same one every `FAILURE_REPEAT`);
    /// the attempts in between are counted and added to the record with the outcome.
    #[tokio::test]
    async fn a_broker_out_of_reach_costs_no_store_write_per_attempt() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let (_port, addr) = reserved_port(); // nothing listens yet
        let nl = online(dir.path(), "NL-NRM", addr, clock).await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let warned = || logs.lines_with(&["WARN", "submit not accepted"]);
        let retried = || logs.lines_with(&["DEBUG", "submit will be retried"]);
        until("the first failed submit is said", || async {
            !warned().is_empty()
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.submit_attempts, 1, "the first failure is recorded");
        assert!(entry.last_error.is_some(), "{entry:?}");

        let writes = nl.inner.store.watch_writes();
        let seen = retried().len();
        until("five more failed attempts", || async {
            retried().len() >= seen + 5
        })
        .await;
        let written: usize = writes
            .into_iter()
            .map(|mut w| std::iter::from_fn(|| w.next_timeout(Duration::ZERO).ok()).count())
            .sum();
        assert_eq!(written, 0, "store writes during the outage");
        assert_eq!(warned().len(), 1, "said once: {:#?}", warned());
        assert_eq!(
            state_of(&nl, sent.message_id)
                .await
                .unwrap()
                .submit_attempts,
            1
        );

        // the broker comes back: every attempt is counted, the successful one too
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let _serving = broker.serve("NL-NRM", TcpListener::bind(addr).await.unwrap());
        until("submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) != Some(OutboxState::Queued)
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        let failed = warned().len() + retried().len();
        assert_eq!(
            usize::try_from(entry.submit_attempts).unwrap(),
            failed + 1,
            "{entry:?}"
        );
        nl.shutdown().await;
    }

    // ---- the node certificate at start ------------------------------------------

    /// With participant = "NL-NRM" and BE-PAYOKE's certificate the node ran
    /// and would have stored BE-PAYOKE's deliveries as NL-NRM's.
    #[tokio::test]
    async fn a_certificate_of_another_participant_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let cert = federation.participant("BE-PAYOKE").unwrap();
        let (l, addr) = listener().await;
        let error = started(dir.path(), "NL-NRM", &federation, &cert, addr)
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, NodeError::Config(_)), "{error:?}");
        for part in ["NL-NRM", "BE-PAYOKE", &cert.cert.display().to_string()] {
            assert!(text.contains(part), "{part} missing: {text}");
        }
        assert!(!dir.path().join("NL-NRM").exists(), "store opened");
        let dialled = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
        assert!(dialled.is_err(), "the broker was dialled");

        // an operator's certificate is no node certificate either
        let operator = federation.operator("alice").unwrap();
        let error = started(dir.path(), "NL-NRM", &federation, &operator, addr)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("operator certificate"),
            "{error}"
        );
    }

    /// The certificate `id` of `federation`, issued `issued_days_ago` days
    /// ago and valid for `validity_days`.
    fn issued(
        federation: &trmx_certs::Federation,
        id: &str,
        issued_days_ago: u64,
        validity_days: u32,
    ) -> trmx_certs::CertPaths {
        let spec = trmx_certs::IssueSpec {
            validity_days,
            ..trmx_certs::IssueSpec::participant(id)
        };
        let paths = trmx_certs::CertPaths::from_prefix(&federation.dir.join(id));
        let at = SystemTime::now() - DAY * u32::try_from(issued_days_ago).unwrap();
        federation.ca.issue_at(&spec, &paths, true, at).unwrap();
        paths
    }

    /// A node runs for months: a warning at its start alone would be long scrolled
    /// away when the certificate expires. It is said again once a day, from the file
    /// as it is then (a renewal ends it).
    #[tokio::test]
    async fn an_expiring_certificate_is_said_again_once_a_day_until_renewed() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let (_l, addr) = listener().await;
        let expiring = issued(&federation, "NL-NRM", 0, 10);
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let nl = started_on(
            dir.path(),
            "NL-NRM",
            &federation,
            &expiring,
            addr,
            clock.clone(),
        )
        .await
        .unwrap();
        let warned = || logs.lines_with(&["WARN", "the node certificate expires soon"]);
        assert_eq!(warned().len(), 1, "at start");

        clock.advance(Duration::from_secs(3600));
        nl.inner.recheck_certificate();
        assert_eq!(warned().len(), 1, "not again within a day");
        clock.advance(DAY);
        nl.inner.recheck_certificate();
        let said = warned();
        assert_eq!(said.len(), 2, "{said:#?}");
        assert!(said[1].contains("days_left=8"), "{}", said[1]);

        // renewed in place: nothing more to say, however many days pass
        let renewed = issued(&federation, "NL-NRM", 0, 365);
        assert_eq!(renewed.cert, expiring.cert);
        clock.advance(DAY * 2);
        nl.inner.recheck_certificate();
        assert_eq!(warned().len(), 2);

        // until that one expires, without a restart
        clock.advance(DAY * 400);
        nl.inner.recheck_certificate();
        let expired = logs.lines_with(&["ERROR", "the node certificate has expired"]);
        assert_eq!(expired.len(), 1, "{expired:#?}");
        nl.inner.recheck_certificate();
        assert_eq!(
            logs.lines_with(&["ERROR", "the node certificate has expired"])
                .len(),
            1
        );
        nl.shutdown().await;
    }

    /// A renewal whose key copy failed: the node keeps presenting the certificate
    /// read before, and says so in its status and once a day, instead of showing the
    /// new file as if it were in force until the old certificate expires.
    #[tokio::test]
    async fn a_change_of_the_tls_files_that_cannot_be_used_is_shown_and_said_daily() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let (_l, addr) = listener().await;
        let cert = issued(&federation, "NL-NRM", 0, 365);
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let nl = started_on(
            dir.path(),
            "NL-NRM",
            &federation,
            &cert,
            addr,
            clock.clone(),
        )
        .await
        .unwrap();
        let first = nl.status().certificate.unwrap();
        assert_eq!(first.refused, None);

        // the renewed certificate arrives, its key does not
        let key = std::fs::read(&cert.key).unwrap();
        issued(&federation, "NL-NRM", 0, 365);
        std::fs::write(&cert.key, &key).unwrap();
        let shown = nl.status().certificate.unwrap();
        assert_eq!(
            shown.serial_hex, first.serial_hex,
            "still the one read before"
        );
        assert!(shown.refused.is_some(), "{shown:?}");
        let said = || {
            logs.lines_with(&[
                "WARN",
                "the TLS files changed but cannot be used: the node keeps presenting",
            ])
        };
        // said once when found (by the channel), then once a day (by the node)
        let found = || {
            logs.lines_with(&[
                "WARN",
                "the TLS files changed but cannot be used: connecting with",
            ])
        };
        nl.inner.recheck_certificate();
        nl.inner.recheck_certificate();
        assert_eq!(found().len(), 1, "{:#?}", found());
        assert!(said().is_empty(), "{:#?}", said());
        clock.advance(DAY);
        nl.inner.recheck_certificate();
        nl.inner.recheck_certificate();
        assert_eq!(said().len(), 1, "{:#?}", said());
        assert!(said()[0].contains(&first.serial_hex), "{}", said()[0]);
        assert_eq!(found().len(), 1);

        // the right key follows: in force, nothing more to say
        issued(&federation, "NL-NRM", 0, 365);
        let renewed = nl.status().certificate.unwrap();
        assert_ne!(renewed.serial_hex, first.serial_hex);
        assert_eq!(renewed.refused, None);
        clock.advance(DAY);
        nl.inner.recheck_certificate();
        assert_eq!(said().len(), 1);
        nl.shutdown().await;
    }

    #[tokio::test]
    async fn an_expired_certificate_is_an_error_and_one_expiring_is_warned() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let (_l, addr) = listener().await;

        // expired: said at ERROR, but the node starts (its store is still served)
        let expired = issued(&federation, "DE-KOK", 20, 10);
        let not_after = trmx_certs::CertInfo::from_pem_file(&expired.cert)
            .unwrap()
            .not_after;
        let de = started(dir.path(), "DE-KOK", &federation, &expired, addr)
            .await
            .unwrap();
        assert!(de.inbox(&ListFilter::default()).await.unwrap().is_empty());
        let said = logs.lines_with(&["ERROR", "the node certificate has expired"]);
        assert_eq!(said.len(), 1, "{said:#?}");
        for part in [
            expired.cert.display().to_string(),
            trmx_certs::format_time(not_after),
        ] {
            assert!(said[0].contains(&part), "{part} missing: {}", said[0]);
        }
        de.shutdown().await;

        let expiring = issued(&federation, "NL-NRM", 0, 10);
        let nl = started(dir.path(), "NL-NRM", &federation, &expiring, addr)
            .await
            .unwrap();
        let warned = logs.lines_with(&["WARN", "the node certificate expires soon"]);
        assert_eq!(warned.len(), 1, "{warned:#?}");
        assert!(warned[0].contains("days_left=9"), "{}", warned[0]);
        nl.shutdown().await;

        // (another participant: NL-NRM's store stays locked while `nl` lives)
        let fresh = issued(&federation, "BE-PAYOKE", 0, 365);
        let be = started(dir.path(), "BE-PAYOKE", &federation, &fresh, addr)
            .await
            .unwrap();
        assert_eq!(logs.lines_with(&["expires soon"]).len(), 1, "warned again");
        be.shutdown().await;
    }

    /// The node warned of its own certificate's end, never of the broker's: a broker
    /// whose operator forgot its renewal cut every node off on the day, without a word
    /// on the nodes before. Now the node says, from the broker certificate it saw in its
    /// last handshake, when that one expires within 30 days (WARN, again once a day) and
    /// once it has expired on the node's clock (ERROR); its status shows the end too.
    #[tokio::test]
    async fn the_expiry_of_the_brokers_certificate_is_said() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let spec = trmx_certs::IssueSpec {
            validity_days: 40,
            ..trmx_certs::IssueSpec::broker(
                "test",
                vec!["localhost".into()],
                vec![std::net::Ipv4Addr::LOCALHOST.into()],
            )
        };
        let broker_cert = federation.issue("broker-short", &spec).unwrap();
        let seen = trmx_certs::CertInfo::from_pem_file(&broker_cert.cert).unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve_tls("NL-NRM", l, broker_tls_with(&federation, broker_cert));
        let cert = federation.participant("NL-NRM").unwrap();
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let nl = started_on(
            dir.path(),
            "NL-NRM",
            &federation,
            &cert,
            addr,
            clock.clone(),
        )
        .await
        .unwrap();
        until("NL is connected", || async { nl.status().broker_connected }).await;
        assert_eq!(
            nl.status().broker_certificate_not_after,
            Some(seen.not_after),
            "the status shows the end of the broker's certificate"
        );
        let warned = || logs.lines_with(&["WARN", "the broker certificate expires soon"]);
        let expired = || logs.lines_with(&["ERROR", "the broker certificate has expired"]);
        nl.inner.recheck_certificate();
        assert!(warned().is_empty(), "40 days left: {:#?}", warned());

        // 25 days left: warned, with its end and the days left, once a day
        clock.advance(DAY * 15);
        nl.inner.recheck_certificate();
        let said = warned();
        assert_eq!(said.len(), 1, "{said:#?}");
        let not_after = trmx_certs::format_time(seen.not_after);
        for part in [not_after.as_str(), "days_left=24", seen.serial_hex.as_str()] {
            assert!(said[0].contains(part), "{part}: {}", said[0]);
        }
        clock.advance(Duration::from_secs(3600));
        nl.inner.recheck_certificate();
        assert_eq!(warned().len(), 1, "not again within a day");
        clock.advance(DAY);
        nl.inner.recheck_certificate();
        assert_eq!(warned().len(), 2, "{:#?}", warned());

        // expired on the node's clock: an error, once a day too
        assert!(expired().is_empty());
        clock.advance(DAY * 30);
        nl.inner.recheck_certificate();
        nl.inner.recheck_certificate();
        let said = expired();
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(said[0].contains(not_after.as_str()), "{}", said[0]);
        nl.shutdown().await;
    }

    /// The node knew the end of the broker's certificate from its last handshake, but its
    /// Status RPC did not say it: an operator asking `trmx-node status` why the node
    /// cannot connect, or whether it soon will not, had to read the log. The local API
    /// now answers it (unset before the first handshake).
    #[tokio::test]
    async fn the_status_rpc_shows_the_end_of_the_brokers_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let federation = federation(dir.path());
        let broker_cert = federation.broker("test").unwrap();
        let seen = trmx_certs::CertInfo::from_pem_file(&broker_cert.cert).unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let cert = federation.participant("NL-NRM").unwrap();
        let nl = started(dir.path(), "NL-NRM", &federation, &cert, addr)
            .await
            .unwrap();
        let socket = dir.path().join("node.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let api = tokio::spawn({
            let (nl, socket) = (nl.clone(), socket.clone());
            async move {
                let stopped = async {
                    let _ = stopped.await;
                };
                crate::api::serve_local_api(nl, &socket, stopped).await
            }
        });
        let status = || async {
            let mut client = loop {
                match crate::api::client::connect_local(&socket).await {
                    Ok(client) => break client,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            client
                .get_node_status(pb::GetNodeStatusRequest {})
                .await
                .unwrap()
                .into_inner()
        };
        let before = status().await;
        assert!(!before.broker_connected);
        assert_eq!(
            before.broker_certificate_not_after, None,
            "no handshake yet"
        );

        let _serving = broker.serve_tls("NL-NRM", l, broker_tls_with(&federation, broker_cert));
        until("NL is connected", || async { nl.status().broker_connected }).await;
        assert_eq!(
            status().await.broker_certificate_not_after,
            Some(trmx_proto::time::to_timestamp(seen.not_after))
        );
        let _ = stop.send(());
        api.await.unwrap().unwrap();
        nl.shutdown().await;
    }

    // ---- the envelope, checked against the broker's limit ----------------------

    /// A message over the broker's `max_envelope_bytes` said "queued" and was refused
    /// by the broker a moment later: a node that knows the limit says so now, and asks
    /// again before it refuses (the limit may have been raised).
    #[tokio::test]
    async fn an_envelope_over_the_brokers_limit_is_refused_at_send() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        // (the example referral makes an envelope of 512 to 1024 bytes)
        broker.lock().max_envelope_bytes = 512;
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        let nl = online(dir.path(), "NL-NRM", addr, clock.clone()).await;
        until("NL is connected", || async { nl.status().broker_connected }).await;

        match nl.send(request("k-1", "BE-PAYOKE", referral())).await {
            Err(NodeError::Invalid(e)) => {
                assert_eq!(e.field, "body", "{e}");
                let text = e.to_string();
                assert!(text.contains("at most 512"), "{text}");
                assert!(text.contains("max_envelope_bytes"), "{text}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(nl.outbox(&ListFilter::default()).await.unwrap().is_empty());

        // the broker's operators raise the limit: the same send now goes
        broker.lock().max_envelope_bytes = 1 << 20;
        let sent = submitted_referral(&nl).await;
        // a retry of a send stored before gets its entry, whatever the limit says now
        broker.lock().max_envelope_bytes = 512;
        let retried = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        assert_eq!(retried.message_id, sent.message_id);
        nl.shutdown().await;
    }

    // ---- the recipient, checked against the broker's registry -------------------

    /// `trmx-node send --to XX-NOPE` said "queued" and failed a moment later
    /// as rejected by the broker: a node that knows the registry says so now.
    #[tokio::test]
    async fn a_recipient_the_registry_refuses_is_refused_at_send() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE", "DE-KOK"]);
        broker
            .lock()
            .accepts
            .insert("DE-KOK".into(), vec![Kind::FollowUp]);
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        let nl = online(dir.path(), "NL-NRM", addr, clock.clone()).await;
        until("NL is connected", || async { nl.status().broker_connected }).await;

        let refused =
            |result: Result<OutboxEntry, NodeError>, field: &str, parts: &[&str]| match result {
                Err(NodeError::Invalid(e)) => {
                    assert_eq!(e.field, field, "{e}");
                    for part in parts {
                        assert!(e.to_string().contains(part), "{part} missing: {e}");
                    }
                }
                other => panic!("expected a refusal, got {other:?}"),
            };
        refused(
            nl.send(request("k-1", "XX-NOPE", referral())).await,
            "recipient",
            &["XX-NOPE", "not a participant"],
        );
        refused(
            nl.send(request("k-2", "DE-KOK", referral())).await,
            "kind",
            &["DE-KOK", "does not accept referral"],
        );
        assert!(nl.outbox(&ListFilter::default()).await.unwrap().is_empty());

        // a participant that joined after the node connected is asked for again
        broker.lock().participants.push("FR-NEW".into());
        let sent = nl.send(request("k-3", "FR-NEW", referral())).await.unwrap();
        until("FR-NEW's message is submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        // FR-NEW leaves the registry: a retry of that send still gets its
        // entry, as the first try did
        broker.lock().participants.retain(|p| p != "FR-NEW");
        refused(
            nl.send(request("k-4", "XX-OTHER", referral())).await,
            "recipient",
            &["XX-OTHER"],
        ); // (which fetched the registry without FR-NEW)
        let retried = nl.send(request("k-3", "FR-NEW", referral())).await.unwrap();
        assert_eq!(retried.message_id, sent.message_id);

        // a node that never reached the broker knows no registry: it queues
        let (_down_port, down_addr) = reserved_port();
        let be = online(dir.path(), "BE-PAYOKE", down_addr, clock).await;
        let queued = be
            .send(request("k-1", "XX-NOPE", referral()))
            .await
            .unwrap();
        assert_eq!(queued.state, OutboxState::Queued);
        nl.shutdown().await;
        be.shutdown().await;
    }

    /// NL's node, online at `broker`, once it holds the broker's registry (and what it
    /// needs kept alive).
    struct KnowingTheRegistry {
        nl: NodeCore,
        _dir: tempfile::TempDir,
        _serving: tokio::sync::oneshot::Sender<()>,
    }

    async fn knowing_the_registry(broker: &FakeBroker) -> KnowingTheRegistry {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let (l, addr) = listener().await;
        let serving = broker.serve("NL-NRM", l);
        let nl = online(dir.path(), "NL-NRM", addr, clock).await;
        until("NL knows the registry", || async {
            nl.inner.cached_participants().is_some()
        })
        .await;
        KnowingTheRegistry {
            nl,
            _dir: dir,
            _serving: serving,
        }
    }

    /// Sends to a recipient that the cached registry refuses each asked the broker for
    /// its registry again (`GetInfo`), all at once: a local client sending many made as
    /// many concurrent calls. One refresh runs at a time, and the sends that waited for it
    /// take what it found.
    #[tokio::test]
    async fn sends_the_registry_refuses_share_one_registry_refresh() {
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let knowing = knowing_the_registry(&broker).await;
        let nl = &knowing.nl;
        until("NL is connected", || async { nl.status().broker_connected }).await;
        let before = broker.lock().get_info_arrived;
        let held = broker.get_info_hold.lock().await;
        let sends: Vec<_> = (0..8)
            .map(|n| {
                let nl = nl.clone();
                tokio::spawn(async move {
                    nl.send(request(&format!("k-{n}"), "XX-NOPE", referral()))
                        .await
                })
            })
            .collect();
        until("the first refresh reaches the broker", || async {
            broker.lock().get_info_arrived > before
        })
        .await;
        // (time for the other sends to ask too, as they did)
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            broker.lock().get_info_arrived,
            before + 1,
            "more than one GetInfo at once"
        );
        drop(held);
        for send in sends {
            match send.await.unwrap() {
                Err(NodeError::Invalid(e)) => assert_eq!(e.field, "recipient", "{e}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert!(nl.outbox(&ListFilter::default()).await.unwrap().is_empty());
        nl.shutdown().await;
    }

    /// A registry refresh the broker never answers holds no send for good: the one refresh
    /// gives up at its bound, and it and the sends that waited for it answer with the
    /// cached registry's refusal, one `GetInfo` made for all of them.
    #[tokio::test]
    async fn sends_waiting_for_a_registry_refresh_the_broker_never_answers_are_answered() {
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let knowing = knowing_the_registry(&broker).await;
        let nl = &knowing.nl;
        let before = broker.lock().get_info_arrived;
        // (held to the end: the broker never answers)
        let _held = broker.get_info_hold.lock().await;
        let sends: Vec<_> = (0..4)
            .map(|n| {
                let nl = nl.clone();
                tokio::spawn(async move {
                    nl.send(request(&format!("k-{n}"), "XX-NOPE", referral()))
                        .await
                })
            })
            .collect();
        for send in sends {
            match send.await.unwrap() {
                Err(NodeError::Invalid(e)) => {
                    assert_eq!(e.field, "recipient", "{e}");
                    // each says the registry it was refused by is the old one
                    assert!(
                        e.rule
                            .starts_with("XX-NOPE is not a participant of the broker")
                            && e.rule.contains(
                                "the registry the node fetched when it last reached the broker"
                            )
                            && e.rule.contains("send again once the node is connected"),
                        "{e}"
                    );
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(broker.lock().get_info_arrived, before + 1);
        assert!(nl.outbox(&ListFilter::default()).await.unwrap().is_empty());
        nl.shutdown().await;
    }

    /// A kind the cached registry says its recipient does not accept, and a refresh the
    /// broker does not answer: the refusal says what may have changed since, what the
    /// recipient accepts (it said "if the participant joined since" of one that is there).
    #[tokio::test]
    async fn a_kind_refused_by_the_cached_registry_says_what_may_have_changed() {
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE", "DE-KOK"]);
        broker
            .lock()
            .accepts
            .insert("DE-KOK".into(), vec![Kind::FollowUp]);
        let knowing = knowing_the_registry(&broker).await;
        let nl = &knowing.nl;
        // (held to the end: the refresh is never answered)
        let _held = broker.get_info_hold.lock().await;
        match nl.send(request("k-1", "DE-KOK", referral())).await {
            Err(NodeError::Invalid(e)) => {
                assert_eq!(e.field, "kind", "{e}");
                assert!(
                    e.rule.starts_with("DE-KOK does not accept referral")
                        && e.rule
                            .contains("if the participant has come to accept the kind since")
                        && !e.rule.contains("joined"),
                    "{e}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        nl.shutdown().await;
    }

    /// A registry refresh the broker does not answer, while the link, reconnecting,
    /// fetches the broker's registry, which now lists the recipient: the sends (the one
    /// that refreshed and the one that waited for it) are decided by the registry the node
    /// holds when the refresh ends, not the one read before; they were refused as if the
    /// recipient were still unknown.
    #[tokio::test]
    async fn sends_after_an_unanswered_refresh_take_the_registry_cached_meanwhile() {
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let knowing = knowing_the_registry(&broker).await;
        let nl = &knowing.nl;
        let before = broker.lock().get_info_arrived;
        // (held to the end: the refreshes are never answered)
        let _held = broker.get_info_hold.lock().await;
        let send = |key: &'static str| {
            let nl = nl.clone();
            tokio::spawn(async move { nl.send(request(key, "XX-NEW", referral())).await })
        };
        let refreshing = send("k-1");
        until("the refresh reaches the broker", || async {
            broker.lock().get_info_arrived > before
        })
        .await;
        let waiting = send("k-2");
        // XX-NEW joins the broker, and the node caches its registry as its link does on
        // reconnecting (the `GetInfo` of the link, answered where the refresh's is not)
        broker.lock().participants.push("XX-NEW".to_owned());
        let participant = |id: &str| pb::Participant {
            id: id.to_owned(),
            display_name: format!("{id} (test)"),
            country: id[..2].to_owned(),
            organisation_type: pb::OrganisationType::Ngo as i32,
            accepts: Kind::APPLICATION.iter().map(|k| k.to_pb() as i32).collect(),
        };
        nl.inner.cache_broker_info(&pb::BrokerInfo {
            broker_name: "fake".into(),
            participants: ["NL-NRM", "BE-PAYOKE", "XX-NEW"]
                .into_iter()
                .map(participant)
                .collect(),
            limits: None,
            caller: "NL-NRM".into(),
        });
        for send in [refreshing, waiting] {
            match send.await.unwrap() {
                Ok(sent) => assert_eq!(sent.state, OutboxState::Queued),
                other => panic!("expected the send queued, got {other:?}"),
            }
        }
        nl.shutdown().await;
    }

    /// A node killed after the broker accepted a submit but before it recorded the
    /// answer (submit_attempts still 0, the entry QUEUED) restarts while the broker is
    /// out of reach. Withdrawing does not say "done" while the broker may hold the
    /// message (asked again, it still says so); it is withdrawn there once the broker
    /// is reachable.
    #[tokio::test]
    async fn a_withdrawal_after_a_crash_mid_submit_reaches_the_broker() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        // the earlier run: queued, submitted, the broker made it durable, then kill -9
        let first = NodeCore::start_offline(config(dir.path(), "NL-NRM"), clock.clone())
            .await
            .unwrap();
        let sent = first
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let envelope = first
            .inner
            .store
            .envelope(sent.message_id)
            .unwrap()
            .unwrap();
        broker.enqueue(envelope, "NL-NRM");
        // (read before the restart: the restarted node's submit loop records its attempts
        // at the broker out of reach from its start on)
        let entry = state_of(&first, sent.message_id).await.unwrap();
        assert_eq!(
            (entry.state, entry.submit_attempts),
            (OutboxState::Queued, 0)
        );
        first.shutdown().await;
        drop(first);
        // restarted while the broker cannot be reached
        let (_down_port, down_addr) = reserved_port();
        let nl = online(dir.path(), "NL-NRM", down_addr, clock).await;
        let how = nl.withdraw(sent.message_id).await.unwrap();
        assert_eq!(how, Withdrawal::BrokerPending);
        assert_eq!(
            nl.inner.store.pending_withdrawals(10).unwrap(),
            [sent.message_id]
        );
        assert_eq!(
            nl.withdraw(sent.message_id).await.unwrap(),
            Withdrawal::BrokerPending,
            "asked again"
        );
        // the broker comes up: the node withdraws it there
        let _serving = broker.serve("NL-NRM", TcpListener::bind(down_addr).await.unwrap());
        until("withdrawn on the broker", || async {
            broker.lock().withdrawn == [sent.message_id.to_string()]
        })
        .await;
        // (the broker records the withdrawal before it answers; the node settles its
        // pending one when the answer has come)
        until("the node's pending withdrawal settled", || async {
            nl.inner.store.pending_withdrawals(10).unwrap().is_empty()
        })
        .await;
        assert_eq!(
            nl.withdraw(sent.message_id).await.unwrap(),
            Withdrawal::Done
        );
        nl.shutdown().await;
    }

    // ---- how the link treats a broker that refuses or hangs ---------------------

    /// A broker that refuses the *caller* (its participant not, or not yet, in the
    /// broker's registry: `PERMISSION_DENIED`; also tonic's mapping of a proxy's HTTP 403)
    /// says nothing about the message. The outbox waits and tries again, and says why;
    /// no message becomes FAILED, and all go once the registry is fixed.
    #[tokio::test]
    async fn a_refused_caller_is_retried_and_fails_no_message() {
        let logs = LogCapture::start();
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        broker.lock().submit_refusal = Some((
            tonic::Code::PermissionDenied,
            "participant NL-NRM is not in this broker's registry".into(),
        ));
        let first = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let second = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        // (a failure said before is counted, not written, until the outcome)
        until("tried again", || async {
            !logs
                .lines_with(&["submit will be retried", &first.message_id.to_string()])
                .is_empty()
        })
        .await;
        for id in [first.message_id, second.message_id] {
            let entry = state_of(&nl, id).await.unwrap();
            assert_eq!(entry.state, OutboxState::Queued, "{entry:?}");
        }
        let warned = logs.lines_with(&["WARN", "not in this broker's registry"]);
        assert_eq!(warned.len(), 1, "{warned:#?}");
        // the operator adds NL-NRM to the registry
        broker.lock().submit_refusal = None;
        for id in [first.message_id, second.message_id] {
            until("submitted", || async {
                state_of(&nl, id).await.map(|e| e.state) == Some(OutboxState::Submitted)
            })
            .await;
        }
        nl.shutdown().await;
    }

    /// A broker that opens the `Receive` stream and ends it at once (its store cannot
    /// lease) is a failure like any other: the backoff grows and the log has one WARN,
    /// not a reconnect and three lines every `reconnect_min`.
    #[tokio::test]
    async fn a_stream_ended_at_once_is_reopened_with_backoff_and_warned_once() {
        let logs = LogCapture::start();
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        broker.lock().end_streams = Some((
            tonic::Code::Unavailable,
            "the broker cannot store messages right now; retry later".into(),
        ));
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        // reconnect_min 10 ms, reconnect_max 100 ms
        let nl = online(dir.path(), "NL-NRM", addr, clock).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let connects = broker.lock().get_info_calls;
        let warned = logs.lines_with(&["WARN", "connection to the broker broken"]);
        let back = logs.lines_with(&["INFO", "connected to broker again"]);
        nl.shutdown().await;
        // with the backoff at its 100 ms cap: about 25 attempts in 2 s (200 without)
        assert!(
            connects <= 40 && warned.len() == 1 && back.is_empty(),
            "{connects} connects, {} WARN and {} INFO lines for one persisting failure in 2 s",
            warned.len(),
            back.len()
        );
    }

    /// A submit refused again and again with a code that is not final (the sender's
    /// quota, the broker's disk watermark), while the receive stream is fine, is
    /// warned about once: the message waits QUEUED, and the log says why.
    #[tokio::test]
    async fn a_persisting_submit_refusal_is_warned_once() {
        let logs = LogCapture::start();
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        broker.lock().submit_refusal = Some((
            tonic::Code::ResourceExhausted,
            "NL-NRM's queued messages are over its quota".into(),
        ));
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        // (a failure said before is counted, not written, until the outcome)
        until("refused several times", || async {
            logs.lines_with(&["submit will be retried", &sent.message_id.to_string()])
                .len()
                >= 4
        })
        .await;
        let warned = logs.lines_with(&["WARN", "over its quota"]);
        assert_eq!(warned.len(), 1, "{warned:#?}");
        assert!(
            warned[0].contains(&sent.message_id.to_string()),
            "{}",
            warned[0]
        );
        broker.lock().submit_refusal = None;
        until("accepted", || async {
            !logs
                .lines_with(&["INFO", "submits accepted again"])
                .is_empty()
        })
        .await;
        nl.shutdown().await;
    }

    /// The failed submit attempts of a queued message are written to its record when
    /// the failure is said at WARN, and counted in memory in between; but the WARN's
    /// repeat limiter was keyed on the error text alone: a message that failed with the
    /// error of the one before it (withdrawn meanwhile) showed no attempt and no error
    /// in the outbox for up to 5 minutes, and the withdrawn one lost the attempts
    /// counted since its last WARN, as did the head of the queue at a shutdown. Now a
    /// message's first failure is said and written at once, and the attempts counted
    /// are written when the loop moves on from a message and when it stops.
    #[tokio::test]
    async fn every_failed_submit_attempt_reaches_the_outbox() {
        let logs = LogCapture::start();
        let (dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        broker.lock().submit_refusal = Some((
            tonic::Code::ResourceExhausted,
            "NL-NRM's queued messages are over its quota".into(),
        ));
        let first = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let second = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let failed = |id: MessageId| {
            logs.lines_with(&["submit not accepted", &id.to_string()])
                .len()
                + logs
                    .lines_with(&["submit will be retried", &id.to_string()])
                    .len()
        };
        until("the first message is refused several times", || async {
            failed(first.message_id) >= 3
        })
        .await;
        assert_eq!(failed(second.message_id), 0, "only the head is tried");
        // (the broker never had it: withdrawn here, and the second one is tried)
        assert_eq!(
            nl.withdraw(first.message_id).await.unwrap(),
            Withdrawal::Done
        );
        until("the second message's failure is on its record", || async {
            state_of(&nl, second.message_id)
                .await
                .is_some_and(|e| e.last_error.is_some())
        })
        .await;
        let entry = state_of(&nl, second.message_id).await.unwrap();
        assert!(
            entry.last_error.as_deref().unwrap().contains("quota"),
            "{entry:?}"
        );
        assert!(entry.submit_attempts >= 1, "{entry:?}");
        assert_eq!(
            logs.lines_with(&[
                "WARN",
                "submit not accepted",
                &second.message_id.to_string()
            ])
            .len(),
            1,
            "said at WARN, as the first message's failure was"
        );
        let withdrawn = state_of(&nl, first.message_id).await.unwrap();
        assert_eq!(
            usize::try_from(withdrawn.submit_attempts).unwrap(),
            failed(first.message_id),
            "every attempt of the withdrawn message: {withdrawn:?}"
        );

        // the attempts of the second one counted since, at a shutdown
        let seen = failed(second.message_id);
        until("the second message is refused again", || async {
            failed(second.message_id) >= seen + 2
        })
        .await;
        nl.shutdown().await;
        let tried = failed(second.message_id);
        drop(nl);
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let nl = NodeCore::start_offline(config(dir.path(), "NL-NRM"), clock)
            .await
            .unwrap();
        let entry = state_of(&nl, second.message_id).await.unwrap();
        assert_eq!(
            usize::try_from(entry.submit_attempts).unwrap(),
            tried,
            "every attempt, after a restart: {entry:?}"
        );
        nl.shutdown().await;
    }

    /// A shutdown that comes while the submit loop records the broker's acceptance of a
    /// message that failed before (its flush under way) counts each attempt once: the
    /// record written with the acceptance already holds the failed attempts counted in
    /// memory, and the loop, cut, wrote them a second time when it stopped.
    #[tokio::test]
    async fn a_shutdown_while_an_acceptance_is_recorded_counts_each_attempt_once() {
        let logs = LogCapture::start();
        let (dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        broker.lock().submit_refusal = Some((
            tonic::Code::Unavailable,
            "the broker's store is busy".into(),
        ));
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let id = sent.message_id.to_string();
        let failed = || {
            logs.lines_with(&["submit not accepted", &id]).len()
                + logs.lines_with(&["submit will be retried", &id]).len()
        };
        until("the message is refused several times", || async {
            failed() >= 3
        })
        .await;
        // the next submit waits in the broker, the ones before it answered
        let answer = broker.submit_hold.lock().await;
        loop {
            until("a submit waits in the broker", || async {
                broker.lock().submits_arrived == failed() + 1
            })
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if broker.lock().submits_arrived == failed() + 1 {
                break;
            }
        }
        broker.lock().submit_refusal = None;
        let flushes = nl.inner.store.hold_flushes();
        drop(answer);
        until("the acceptance is written, its flush held", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let stopping = tokio::spawn({
            let nl = nl.clone();
            async move { nl.shutdown().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(flushes);
        stopping.await.unwrap();
        let tried = broker.lock().submits_arrived;
        drop(nl);
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let nl = NodeCore::start_offline(config(dir.path(), "NL-NRM"), clock)
            .await
            .unwrap();
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Submitted);
        assert_eq!(
            usize::try_from(entry.submit_attempts).unwrap(),
            tried,
            "each attempt once: {entry:?}"
        );
        nl.shutdown().await;
    }

    /// A broker that never answers a `Submit` (alive, its store stalled) holds up
    /// neither a withdrawal (UNAVAILABLE after `withdraw_timeout`: try again) nor the
    /// node's shutdown; the message stays QUEUED for the next submit.
    #[tokio::test]
    async fn an_unanswered_submit_blocks_neither_withdraw_nor_shutdown() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let held = broker.submit_hold.lock().await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the submit reaches the broker", || async {
            broker.lock().submits_arrived > 0
        })
        .await;
        // withdraw_timeout is 2 s in these tests
        let withdrew = tokio::time::timeout(Duration::from_secs(5), nl.withdraw(sent.message_id))
            .await
            .expect("the withdrawal answered");
        assert!(
            matches!(&withdrew, Err(NodeError::BrokerUnavailable(m)) if m.contains("try again")),
            "{withdrew:?}"
        );
        let stopped = tokio::time::timeout(Duration::from_secs(5), nl.shutdown()).await;
        assert!(stopped.is_ok(), "the shutdown waited for the broker");
        drop(held);
        let entry = nl
            .inner
            .store
            .outbox_entry(sent.message_id)
            .unwrap()
            .unwrap();
        assert_eq!(entry.state, OutboxState::Queued);
    }

    /// Every gRPC code a broker may answer a `Submit` with: those that say the message
    /// can never be accepted (a bad field, an unknown recipient, a kind not accepted or an
    /// expiry past, its id used for other content, a size over a limit) end the entry in
    /// FAILED (`rejected-by-broker`, the code as its reason); every other one (the
    /// broker busy, out of space, cut off, broken, or refusing the caller rather than
    /// the message) leaves it QUEUED, tried again until the broker takes it, and none
    /// is taken for an acceptance.
    #[tokio::test]
    async fn every_submit_refusal_code_is_final_or_retried_as_it_says() {
        use tonic::Code;
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let finals = [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::OutOfRange,
        ];
        let retried = [
            Code::Cancelled,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ];
        for (i, code) in finals.into_iter().chain(retried).enumerate() {
            broker.lock().submit_refusal = Some((code, format!("refused with {code:?}")));
            let arrived = broker.lock().submits_arrived;
            let sent = nl
                .send(request(&format!("k-{i}"), "BE-PAYOKE", referral()))
                .await
                .unwrap();
            if finals.contains(&code) {
                until("FAILED", || async {
                    state_of(&nl, sent.message_id).await.map(|e| e.state)
                        == Some(OutboxState::Failed)
                })
                .await;
                let failure = state_of(&nl, sent.message_id)
                    .await
                    .unwrap()
                    .failure
                    .unwrap();
                assert_eq!(failure.outcome, "rejected-by-broker", "{code:?}");
                assert_eq!(
                    failure.reason_code,
                    trmx_transport::code_name(code),
                    "{code:?}"
                );
            } else {
                until("tried again", || async {
                    broker.lock().submits_arrived >= arrived + 2
                })
                .await;
                let entry = state_of(&nl, sent.message_id).await.unwrap();
                assert_eq!(entry.state, OutboxState::Queued, "{code:?}");
                assert!(entry.last_error.is_some(), "{code:?}: {entry:?}");
                broker.lock().submit_refusal = None;
                until("SUBMITTED once the broker takes it", || async {
                    state_of(&nl, sent.message_id).await.map(|e| e.state)
                        == Some(OutboxState::Submitted)
                })
                .await;
            }
            assert!(
                !broker
                    .lock()
                    .accepted
                    .contains_key(&sent.message_id.to_string())
                    || !finals.contains(&code),
                "{code:?}"
            );
        }
        nl.shutdown().await;
    }

    /// Text the broker sends is not trusted with the node's log, records and terminal: a
    /// status message with a line break (a forged log line), an escape sequence (that
    /// drives the terminal of whoever reads the log), a bidirectional override, or of
    /// thousands of characters reaches the log, the outbox record and the status
    /// escaped and cut, for a transient refusal and a final one.
    #[tokio::test]
    async fn text_from_the_broker_is_escaped_and_bounded_in_logs_and_records() {
        let logs = LogCapture::start();
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let hostile = format!(
            "busy\nWARN trmx_node: FORGED line\u{1b}[2J\u{202e}{}",
            "x".repeat(4000)
        );
        broker.lock().submit_refusal = Some((tonic::Code::Internal, hostile.clone()));
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the refusal is recorded", || async {
            state_of(&nl, sent.message_id)
                .await
                .is_some_and(|e| e.last_error.is_some())
        })
        .await;
        broker.lock().submit_refusal = Some((
            tonic::Code::InvalidArgument,
            format!("envelope.kind: bad\nFORGED\u{1b}[31m{}", "y".repeat(4000)),
        ));
        until("the final refusal is recorded", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Failed)
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        let recorded = entry.last_error.clone().unwrap();
        let status_error = nl.status().last_broker_error.unwrap_or_default();
        for text in [recorded.as_str(), status_error.as_str()] {
            assert!(!text.chars().any(char::is_control), "{text:?}");
            assert!(text.chars().count() < 1200, "{} characters", text.len());
        }
        assert!(recorded.contains("FORGED\\u{1b}[31m"), "{recorded}");
        assert_eq!(entry.failure.unwrap().field_path, "envelope.kind");
        let captured = String::from_utf8_lossy(&logs.lines.lock().unwrap()).into_owned();
        assert!(!captured.contains('\u{1b}') && !captured.contains('\u{202e}'));
        let id = sent.message_id.to_string();
        for line in captured.lines().filter(|l| l.contains("FORGED")) {
            assert!(line.contains(&id), "a line the broker forged: {line}");
            assert!(line.len() < 1500, "{} bytes", line.len());
        }
        assert!(!logs.lines_with(&["FORGED", &id]).is_empty());

        nl.shutdown().await;
    }

    /// A node restarted after its submit's answer was lost (the broker has the message,
    /// the node's record says QUEUED), an hour later, submits the same envelope again,
    /// byte for byte, not one made anew: the broker takes it for the same message (other
    /// content under the id would be ALREADY_EXISTS, and the entry FAILED), holds one
    /// copy, and the entry is SUBMITTED.
    #[tokio::test]
    async fn a_restart_after_a_lost_submit_answer_sends_the_same_message_once() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        broker.lock().lose_submit_answers = true;
        let nl = online_with(config(dir.path(), "NL-NRM"), addr, clock.clone()).await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let id = sent.message_id.to_string();
        until("the broker has it", || async {
            broker.lock().accepted.contains_key(&id)
        })
        .await;
        let first = broker.lock().accepted[&id].clone();
        assert_eq!(
            state_of(&nl, sent.message_id).await.map(|e| e.state),
            Some(OutboxState::Queued)
        );
        nl.shutdown().await;
        drop(nl);
        broker.lock().lose_submit_answers = false;
        clock.advance(Duration::from_secs(3600));
        let nl = online_with(config(dir.path(), "NL-NRM"), addr, clock).await;
        until("the message is submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        assert_eq!(broker.lock().accepted[&id], first, "the same envelope");
        assert_eq!(
            queued_at(&broker, "BE-PAYOKE")
                .iter()
                .filter(|queued| **queued == id)
                .count(),
            1
        );
        nl.shutdown().await;
    }

    /// A broker that takes a `Submit` and never answers it, on a connection that stays
    /// up (its store stalled, a proxy holding the stream), does not hold the outbox for
    /// good: past `submit_answer_timeout` the submit counts as failed, which the entry's
    /// record says, and is tried again; once the broker answers, the message is
    /// SUBMITTED, and the broker holds it once.
    #[tokio::test]
    async fn a_submit_the_broker_never_answers_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        let mut cfg = config(dir.path(), "NL-NRM");
        cfg.submit_answer_timeout = Duration::from_millis(300);
        let nl = online_with(cfg, addr, clock).await;
        let held = broker.submit_hold.lock().await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the submit is given up and tried again", || async {
            broker.lock().submits_arrived >= 2
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Queued);
        assert!(
            entry
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("did not answer the submit")),
            "{entry:?}"
        );
        drop(held);
        until("the message is submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let copies = queued_at(&broker, "BE-PAYOKE")
            .iter()
            .filter(|id| **id == sent.message_id.to_string())
            .count();
        assert_eq!(copies, 1);
        nl.shutdown().await;
    }

    /// The local API's handler futures are dropped wherever they await when the client
    /// gives up (a gRPC deadline, the CLI's `--timeout`, Ctrl-C). A send given up once
    /// its entry is stored, while the flush after it is under way, is still submitted,
    /// once, with nothing else to wake the submit loop; the same send again gets the same
    /// entry.
    #[tokio::test]
    async fn a_send_given_up_after_its_entry_is_stored_is_still_submitted() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        // (the submit loop idle: a first message submitted, nothing left to do)
        let first = nl
            .send(request("k-0", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the first message is submitted", || async {
            state_of(&nl, first.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let held = nl.inner.store.hold_flushes();
        let sending = tokio::spawn({
            let nl = nl.clone();
            async move { nl.send(request("k-1", "BE-PAYOKE", referral())).await }
        });
        until("the entry is stored", || async {
            nl.inner.store.idempotency_key_used("k-1").unwrap()
        })
        .await;
        // the client gives up
        sending.abort();
        assert!(sending.await.unwrap_err().is_cancelled());
        drop(held);
        until_within(Duration::from_secs(3), "the broker has it", || async {
            broker.lock().accepted.len() == 2
        })
        .await;
        let again = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        assert_ne!(again.message_id, first.message_id);
        until("the retry's entry is submitted", || async {
            state_of(&nl, again.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        assert_eq!(
            queued_at(&broker, "BE-PAYOKE"),
            [first.message_id.to_string(), again.message_id.to_string()],
            "each message once"
        );
        assert_eq!(nl.outbox(&ListFilter::default()).await.unwrap().len(), 2);
        nl.shutdown().await;
    }

    /// Stops `node` and starts it again on its store, online against the broker at
    /// `addr`.
    async fn restart(node: NodeCore, addr: SocketAddr, clock: Arc<ManualClock>) -> NodeCore {
        let cfg = node.inner.config.clone();
        node.shutdown().await;
        drop(node);
        online_with(cfg, addr, clock).await
    }

    /// A delivery receipt across restarts of its sender's node: the node stopped before
    /// it came gets it once started again; stopped after it applied it, and handed it
    /// again (its ack lost on the way), it acknowledges it again and applies nothing
    /// twice (the entry's time of delivery stays the first receipt's).
    #[tokio::test]
    async fn a_receipt_across_restarts_is_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (nl_l, nl_addr) = listener().await;
        let _nl_serving = broker.serve("NL-NRM", nl_l);
        let nl = online(dir.path(), "NL-NRM", nl_addr, clock.clone()).await;
        let sent = submitted_referral(&nl).await;
        let id = sent.message_id;
        // NL stops before the receipt comes
        let cfg = nl.inner.config.clone();
        nl.shutdown().await;
        drop(nl);
        let (be_l, be_addr) = listener().await;
        let _be_serving = broker.serve("BE-PAYOKE", be_l);
        let be = online(dir.path(), "BE-PAYOKE", be_addr, clock.clone()).await;
        until("BE stored and acknowledged it", || async {
            broker.lock().acked.contains(&id.to_string())
        })
        .await;
        let nl = online_with(cfg, nl_addr, clock.clone()).await;
        until("the receipt is applied", || async {
            state_of(&nl, id).await.map(|e| e.state) == Some(OutboxState::Delivered)
        })
        .await;
        let first = state_of(&nl, id).await.unwrap();
        let receipt_id = MessageId::receipt_id(id, "DELIVERED").to_string();
        until("the receipt is acknowledged", || async {
            broker.lock().acked.contains(&receipt_id)
        })
        .await;
        // NL stops after it applied and acknowledged it; the broker (its ack lost) hands
        // it again
        let nl = restart(nl, nl_addr, clock.clone()).await;
        broker.enqueue(
            receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, ""),
            "",
        );
        until("the receipt is acknowledged again", || async {
            broker
                .lock()
                .acked
                .iter()
                .filter(|a| **a == receipt_id)
                .count()
                == 2
        })
        .await;
        let nl = restart(nl, nl_addr, clock.clone()).await;
        let again = state_of(&nl, id).await.unwrap();
        assert_eq!(again.state, OutboxState::Delivered);
        assert_eq!(again.outcome_at, first.outcome_at, "applied once");
        assert_eq!(again.submit_attempts, first.submit_attempts);
        assert!(again.failure.is_none());
        let status = nl.status();
        assert_eq!(
            (
                status.outbox_queued,
                status.outbox_submitted,
                status.outbox_failed
            ),
            (0, 0, 0)
        );
        assert_eq!(
            broker.lock().accepted.len(),
            2,
            "the message and its receipt"
        );
        nl.shutdown().await;
        be.shutdown().await;
    }

    /// A contradicting receipt is said once over the node's life, not once per run: its
    /// record keeps that it was said, across a restart.
    #[tokio::test]
    async fn a_contradicting_receipt_is_said_once_across_a_restart() {
        let f = fixture().await;
        let sent =
            f.nl.send(request("k-1", "BE-PAYOKE", referral()))
                .await
                .unwrap();
        let id = sent.message_id;
        f.nl.inner.store.mark_submitted(id, 1).unwrap();
        let report = |outcome, reason| receipt_envelope("NL-NRM", id, outcome, reason);
        apply(
            &f.nl,
            report(pb::Outcome::RejectedByRecipient, "INVALID_BODY"),
        )
        .await;
        assert_eq!(
            apply(&f.nl, report(pb::Outcome::Delivered, "")).await,
            ReceiptEffect::Contradicted {
                state: OutboxState::Failed,
                first: true
            }
        );
        let cfg = f.nl.inner.config.clone();
        f.nl.shutdown().await;
        drop(f.nl);
        let nl = NodeCore::start_offline(cfg, f.clock.clone()).await.unwrap();
        assert_eq!(
            apply(&nl, report(pb::Outcome::Delivered, "")).await,
            ReceiptEffect::Contradicted {
                state: OutboxState::Failed,
                first: false
            }
        );
        assert_eq!(state(&nl, id).await.state, OutboxState::Failed);
    }

    /// A withdrawal pending on the broker across restarts: stopped while the broker is
    /// out of reach, the node still has it pending when it starts again, does not submit
    /// the message again, and withdraws it on the broker once it can, once; started
    /// again after that, it withdraws nothing twice.
    #[tokio::test]
    async fn a_pending_withdrawal_across_restarts_is_done_once() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        let nl = online(dir.path(), "NL-NRM", addr, clock.clone()).await;
        broker.lock().lose_submit_answers = true;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        let id = sent.message_id;
        until("the broker holds it", || async {
            queued_at(&broker, "BE-PAYOKE").contains(&id.to_string())
        })
        .await;
        until("NL saw the lost answer", || async {
            state_of(&nl, id)
                .await
                .is_some_and(|e| e.submit_attempts > 0)
        })
        .await;
        broker.lock().withdraw_refusal = Some((tonic::Code::Unavailable, "down".into()));
        assert_eq!(nl.withdraw(id).await.unwrap(), Withdrawal::BrokerPending);
        // stopped with the withdrawal pending, started again: still pending
        let nl = restart(nl, addr, clock.clone()).await;
        assert_eq!(nl.status().withdrawals_pending, 1);
        assert_withdrawn(&nl, id).await;
        let submits = broker.lock().submits_arrived;
        broker.lock().withdraw_refusal = None;
        until("withdrawn on the broker", || async {
            nl.status().withdrawals_pending == 0
        })
        .await;
        assert!(queued_at(&broker, "BE-PAYOKE").is_empty());
        assert_eq!(broker.lock().withdrawn, [id.to_string()]);
        // started again after it: nothing withdrawn twice, and the next message goes out
        // (after the pending withdrawals, which the submit loop takes first)
        let nl = restart(nl, addr, clock.clone()).await;
        broker.lock().lose_submit_answers = false;
        let next = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the next message is submitted", || async {
            state_of(&nl, next.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        assert_eq!(broker.lock().withdrawn, [id.to_string()]);
        assert_eq!(
            broker.lock().submits_arrived,
            submits + 1,
            "only the next message was submitted"
        );
        assert_withdrawn(&nl, id).await;
        let said = state_of(&nl, id)
            .await
            .unwrap()
            .last_error
            .unwrap_or_default();
        assert!(said.contains("withdrawn on the broker too"), "{said}");
        assert_eq!(nl.status().withdrawals_pending, 0);
        nl.shutdown().await;
    }

    /// A message the broker lost, across restarts: stopped before the outbox check
    /// found it lost, the node submits it again once started; stopped after that, it
    /// does not submit it a third time (the broker knows it), and the broker holds one
    /// copy.
    #[tokio::test]
    async fn a_resubmit_after_not_found_across_restarts_is_done_once() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        let mut cfg = config(dir.path(), "NL-NRM");
        cfg.outbox_check_interval = Some(Duration::from_millis(20));
        let nl = online_with(cfg, addr, clock.clone()).await;
        let sent = submitted_referral(&nl).await;
        let id = sent.message_id.to_string();
        broker.lose(&id);
        // stopped before the check found it lost
        let nl = restart(nl, addr, clock.clone()).await;
        clock.advance(Duration::from_secs(1));
        until("submitted again", || async {
            state_of(&nl, sent.message_id)
                .await
                .and_then(|e| e.last_error)
                .is_some_and(|e| e.contains("had lost"))
        })
        .await;
        let resubmitted = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(resubmitted.state, OutboxState::Submitted);
        assert_eq!(resubmitted.submit_attempts, 2);
        // stopped after it; the check asks again, and the broker knows it
        let nl = restart(nl, addr, clock.clone()).await;
        let asked = broker.lock().status_asked.len();
        clock.advance(Duration::from_secs(1));
        until("the check asked again", || async {
            broker.lock().status_asked.len() > asked + 1
        })
        .await;
        let entry = state_of(&nl, sent.message_id).await.unwrap();
        assert_eq!(entry.state, OutboxState::Submitted);
        assert_eq!(entry.submit_attempts, 2, "not submitted a third time");
        assert_eq!(
            queued_at(&broker, "BE-PAYOKE")
                .iter()
                .filter(|queued| **queued == id)
                .count(),
            1
        );
        nl.shutdown().await;
    }

    /// The withdrawal that the submit loop makes of a message found withdrawn once its
    /// submit's answer is recorded waits for the broker's answer at most
    /// `broker_answer_timeout`, as every other call but a submit: a broker that takes it
    /// and never answers does not hold the loop (and every message behind) for good; the
    /// withdrawal is left pending, and asked again.
    #[tokio::test]
    async fn the_withdrawal_after_a_submit_waits_for_the_broker_within_the_answer_limit() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        let mut cfg = config(dir.path(), "NL-NRM");
        cfg.broker_answer_timeout = Duration::from_millis(300);
        let nl = online_with(cfg, addr, clock).await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        // (as the submit loop finds it: withdrawn here once the submit's answer is stored)
        nl.inner
            .store
            .withdraw_local(sent.message_id, 2, true)
            .unwrap();
        let held = broker.withdraw_hold.lock().await;
        let mut client = nl.inner.client.clone().unwrap();
        // (the guard only ends a test that would hang: no time is asserted)
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            super::super::link::withdraw_after_submit(&nl.inner, &mut client, sent.message_id),
        )
        .await
        .expect("the withdrawal after a submit waited for the broker without limit");
        assert_eq!(answer.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(broker.lock().withdraws_arrived, 1);
        // not answered: left pending, and asked again
        assert!(nl.inner.store.withdrawal_pending(sent.message_id).unwrap());
        drop(held);
        // (the submit loop, which made the call, goes on to its next round)
        nl.inner.submit_wake.notify_one();
        until("asked again and answered", || async {
            nl.status().withdrawals_pending == 0
        })
        .await;
        assert_withdrawn(&nl, sent.message_id).await;
        nl.shutdown().await;
    }

    /// A withdrawal given up while the broker's answer is on its way (the broker has
    /// withdrawn the message) is recorded here all the same, without another call; the
    /// same withdrawal again says done, and the outbox goes on.
    #[tokio::test]
    async fn a_withdrawal_given_up_while_the_brokers_answer_is_on_its_way_is_recorded() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        let held = broker.withdraw_hold.lock().await;
        let withdrawing = tokio::spawn({
            let nl = nl.clone();
            async move { nl.withdraw(sent.message_id).await }
        });
        until("the broker has withdrawn it", || async {
            broker.lock().withdraws_arrived == 1
        })
        .await;
        // the client gives up
        withdrawing.abort();
        assert!(withdrawing.await.unwrap_err().is_cancelled());
        drop(held);
        until_within(Duration::from_secs(3), "withdrawn here too", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Failed)
        })
        .await;
        assert_withdrawn(&nl, sent.message_id).await;
        assert_eq!(broker.lock().withdrawn, [sent.message_id.to_string()]);
        assert_eq!(
            nl.withdraw(sent.message_id).await.unwrap(),
            Withdrawal::Done
        );
        // nothing left held: the next message goes out
        let next = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the next message is submitted", || async {
            state_of(&nl, next.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        assert_eq!(
            queued_at(&broker, "BE-PAYOKE"),
            [next.message_id.to_string()]
        );
        nl.shutdown().await;
    }

    /// A queued message that an earlier submit brought to the broker (its answer lost),
    /// withdrawn, the client giving up while the broker's answer is on its way: the
    /// broker has withdrawn it, and the node must not submit it again and call it
    /// submitted (no receipt would ever come); it records the withdrawal.
    #[tokio::test]
    async fn a_queued_message_whose_withdrawal_was_given_up_is_not_submitted_again() {
        let (_dir, broker, nl, _serving) = online_alone("NL-NRM").await;
        broker.lock().lose_submit_answers = true;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("the broker holds it", || async {
            queued_at(&broker, "BE-PAYOKE").contains(&sent.message_id.to_string())
        })
        .await;
        let held = broker.withdraw_hold.lock().await;
        let withdrawing = tokio::spawn({
            let nl = nl.clone();
            async move { nl.withdraw(sent.message_id).await }
        });
        until("the broker has withdrawn it", || async {
            broker.lock().withdraws_arrived == 1
        })
        .await;
        // the submit answers get through again, and the client gives up
        broker.lock().lose_submit_answers = false;
        withdrawing.abort();
        assert!(withdrawing.await.unwrap_err().is_cancelled());
        drop(held);
        until_within(Duration::from_secs(3), "withdrawn here too", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) != Some(OutboxState::Queued)
        })
        .await;
        assert_withdrawn(&nl, sent.message_id).await;
        assert!(queued_at(&broker, "BE-PAYOKE").is_empty());
        nl.shutdown().await;
    }

    // ---- shutdown ---------------------------------------------------------------------

    /// A send runs in a task of its own, so that a client that gives up does not cut it;
    /// but a shutdown did not wait for that task, and the exit that follows a shutdown
    /// (SIGTERM) cut a send under way as a crash would: its message, which the caller
    /// may have been told nothing about, was gone. Now a shutdown waits for the sends
    /// under way: one that waits for the broker's registry when the shutdown starts is
    /// stored, and is in the outbox when the node opens its store again.
    #[tokio::test]
    async fn a_send_under_way_when_the_shutdown_starts_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        let cfg = config(dir.path(), "NL-NRM");
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        // The node runs on a runtime of its own, dropped after the shutdown as the
        // binary's is when it exits: what still runs then is cut.
        let node_run = tokio::task::spawn_blocking({
            let (broker, cfg, clock) = (broker.clone(), cfg.clone(), clock.clone());
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                // (this thread's lines: the node's runtime runs on it)
                let logs = LogCapture::start();
                let (sent, silent) = runtime.block_on(async {
                    let nl = online_with(cfg, addr, clock).await;
                    until("the registry is fetched", || async {
                        nl.inner.cached_participants().is_some()
                    })
                    .await;
                    // NG-NAPTIP joined the broker since: a send to it asks the broker for
                    // its registry again, and the broker does not answer for now
                    broker.lock().participants.push("NG-NAPTIP".into());
                    let silent = broker.get_info_hold.clone().lock_owned().await;
                    let asked = broker.lock().get_info_arrived;
                    let sending = tokio::spawn({
                        let nl = nl.clone();
                        async move { nl.send(request("k-1", "NG-NAPTIP", referral())).await }
                    });
                    until("the send asks the broker", || async {
                        broker.lock().get_info_arrived > asked
                    })
                    .await;
                    let mut stopping = tokio::spawn({
                        let nl = nl.clone();
                        async move { nl.shutdown().await }
                    });
                    tokio::select! {
                        // (it did not wait: the send is cut when the runtime is dropped)
                        _ = &mut stopping => return (None, Some(silent)),
                        () = until("the shutdown waits for the send", || async {
                            !logs.lines_with(&["shutdown waits"]).is_empty()
                        }) => {}
                    }
                    drop(silent);
                    stopping.await.unwrap();
                    let sent = sending.await.unwrap().unwrap();
                    (Some(sent), None)
                });
                drop(runtime);
                drop(silent);
                sent
            }
        });
        let sent = node_run.await.unwrap();
        let nl = NodeCore::start_offline(cfg, clock).await.unwrap();
        let outbox = nl.outbox(&ListFilter::default()).await.unwrap();
        let stored: Vec<_> = outbox
            .iter()
            .map(|e| (e.recipient.to_string(), e.state))
            .collect();
        assert_eq!(
            stored,
            [("NG-NAPTIP".to_owned(), OutboxState::Queued)],
            "the send under way when the shutdown started"
        );
        let sent = sent.expect("the send answered");
        assert_eq!(sent.message_id, outbox[0].message_id);
        nl.shutdown().await;
    }

    /// A shutdown waits for the sends and withdrawals under way, but not for ever: a
    /// withdrawal whose broker does not answer holds it up for `shutdown_grace`, not for
    /// its `withdraw_timeout`. Meanwhile no new send is taken (it would be stored after
    /// the last flush, and never submitted by this run).
    #[tokio::test]
    async fn a_shutdown_waits_for_a_stuck_withdrawal_no_longer_than_its_grace() {
        let dir = tempfile::tempdir().unwrap();
        let broker = FakeBroker::new(&["NL-NRM", "BE-PAYOKE"]);
        let (l, addr) = listener().await;
        let _serving = broker.serve("NL-NRM", l);
        let mut cfg = config(dir.path(), "NL-NRM");
        cfg.withdraw_timeout = Duration::from_secs(60);
        cfg.shutdown_grace = Duration::from_millis(300);
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(START)));
        let nl = online_with(cfg, addr, clock).await;
        let sent = nl
            .send(request("k-1", "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("submitted", || async {
            state_of(&nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        // the broker withdraws it, and its answer never comes back
        let held = broker.withdraw_hold.lock().await;
        let withdrawing = tokio::spawn({
            let nl = nl.clone();
            async move { nl.withdraw(sent.message_id).await }
        });
        until("the broker has the withdrawal", || async {
            broker.lock().withdraws_arrived == 1
        })
        .await;
        let started = std::time::Instant::now();
        // (the shutdown is polled first: it has started when the send comes)
        let (stopped, refused) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(10), nl.shutdown()),
            nl.send(request("k-2", "BE-PAYOKE", referral())),
        );
        assert!(
            matches!(refused, Err(NodeError::ShuttingDown)),
            "{refused:?}"
        );
        assert!(stopped.is_ok(), "the shutdown waited for the withdrawal");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "it waited its grace"
        );
        assert!(!withdrawing.is_finished(), "the withdrawal still waits");
        drop(held);
    }

    // ---- failed entries an operator may redrive ----------------------------------

    /// How many times the fake broker was asked about `id`.
    fn asked_about(broker: &FakeBroker, id: MessageId) -> usize {
        let id = id.to_string();
        broker
            .lock()
            .status_asked
            .iter()
            .filter(|asked| **asked == id)
            .count()
    }

    /// Has the fake broker answer `GetStatus` about `id` with `state` (and `reason`).
    fn status_is(broker: &FakeBroker, id: MessageId, state: pb::MessageState, reason: &str) {
        broker.lock().status_of.insert(
            id.to_string(),
            pb::MessageStatus {
                message_id: id.to_string(),
                state: state as i32,
                reason_code: reason.to_owned(),
                state_changed_at: Some(to_timestamp(UNIX_EPOCH + Duration::from_secs(START + 120))),
                ..Default::default()
            },
        );
    }

    /// A referral of NL's, submitted, that the broker then holds as `state` (`reason`)
    /// and reported to NL as `outcome`: its entry is `FAILED`.
    async fn failed_referral(
        nl: &NodeCore,
        broker: &FakeBroker,
        key: &str,
        (state, reason, outcome): (pb::MessageState, &str, pb::Outcome),
    ) -> MessageId {
        let sent = nl
            .send(request(key, "BE-PAYOKE", referral()))
            .await
            .unwrap();
        until("it is submitted", || async {
            state_of(nl, sent.message_id).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        status_is(broker, sent.message_id, state, reason);
        let report = receipt_envelope("NL-NRM", sent.message_id, outcome, reason);
        assert!(matches!(
            apply(nl, report).await,
            ReceiptEffect::Moved(OutboxState::Failed)
        ));
        sent.message_id
    }

    const EXPIRED: (pb::MessageState, &str, pb::Outcome) =
        (pb::MessageState::Expired, "EXPIRED", pb::Outcome::Expired);
    const DEAD_LETTERED: (pb::MessageState, &str, pb::Outcome) = (
        pb::MessageState::DeadLettered,
        "MAX_ATTEMPTS",
        pb::Outcome::DeadLettered,
    );
    const REJECTED: (pb::MessageState, &str, pb::Outcome) = (
        pb::MessageState::DeadLettered,
        "INVALID_BODY",
        pb::Outcome::RejectedByRecipient,
    );

    /// The entries the outbox check still asks the broker about, due or not.
    fn watched(nl: &NodeCore) -> Vec<MessageId> {
        nl.inner.store.redrive_due(u64::MAX, 0, usize::MAX).unwrap()
    }

    /// Waits for `rounds` more rounds of the outbox check: `sentinel`, a `SUBMITTED`
    /// entry the fake broker holds as accepted, is asked about once a round.
    async fn rounds(broker: &FakeBroker, sentinel: MessageId, rounds: usize) {
        let asked = asked_about(broker, sentinel);
        until("the check made more rounds", || async {
            asked_about(broker, sentinel) >= asked + rounds
        })
        .await;
    }

    /// An expired or dead-lettered message that an operator redrove and its recipient
    /// then acknowledged, whose delivery receipt was lost too (purged, or expired unread
    /// in the sender's queue), stayed `FAILED` for good at its sender: the outbox check
    /// asked about `SUBMITTED` entries only. It asks about such entries too, at most once
    /// an hour, and settles them `DELIVERED` from the broker's status as the receipt
    /// would have (said at INFO); the receipt coming after all changes nothing and is no
    /// contradiction. A message rejected by its recipient, which the broker never
    /// redrives, is never asked about; none is submitted again.
    #[tokio::test]
    async fn a_failed_entry_redriven_and_acknowledged_is_settled_delivered_from_the_status() {
        let logs = LogCapture::start();
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sentinel = submitted_referral(&nl).await.message_id;
        let expired = failed_referral(&nl, &broker, "k-2", EXPIRED).await;
        let dead = failed_referral(&nl, &broker, "k-3", DEAD_LETTERED).await;
        let rejected = failed_referral(&nl, &broker, "k-4", REJECTED).await;
        let submits = broker.lock().submits_arrived;
        clock.advance(Duration::from_secs(1));
        until(
            "the check asks about the expired and the dead-lettered one",
            || async { asked_about(&broker, expired) == 1 && asked_about(&broker, dead) == 1 },
        )
        .await;
        rounds(&broker, sentinel, 3).await;
        assert_eq!(
            asked_about(&broker, expired),
            1,
            "asked once an hour at most"
        );
        assert_eq!(asked_about(&broker, dead), 1, "asked once an hour at most");
        for id in [expired, dead, rejected] {
            assert_eq!(state_of(&nl, id).await.unwrap().state, OutboxState::Failed);
        }

        // redriven by an operator, acknowledged by the recipient; both receipts lost
        status_is(&broker, expired, pb::MessageState::Acknowledged, "");
        status_is(&broker, dead, pb::MessageState::Acknowledged, "");
        clock.advance(super::super::link::REDRIVE_ASK_PERIOD);
        until("both are settled delivered", || async {
            state_of(&nl, expired).await.map(|e| e.state) == Some(OutboxState::Delivered)
                && state_of(&nl, dead).await.map(|e| e.state) == Some(OutboxState::Delivered)
        })
        .await;
        for id in [expired, dead] {
            let entry = state_of(&nl, id).await.unwrap();
            assert_eq!(entry.failure, None);
            assert_eq!(
                entry.outcome_at,
                Some((START + 120) * 1_000),
                "the broker's time of the ack"
            );
            // (said once the store took the settle, which the state above may show first)
            until("the settle is said at INFO", || async {
                !logs
                    .lines_with(&["INFO", &id.to_string(), "settled from the broker's status"])
                    .is_empty()
            })
            .await;
        }
        assert!(watched(&nl).is_empty(), "{:?}", watched(&nl));
        let entry = state_of(&nl, rejected).await.unwrap();
        assert_eq!(entry.state, OutboxState::Failed);
        assert_eq!(
            asked_about(&broker, rejected),
            0,
            "never redriven: never asked"
        );

        // the receipts come after all, and the reports of the first ends again
        for (id, (_, reason, outcome)) in [(expired, EXPIRED), (dead, DEAD_LETTERED)] {
            let before = state_of(&nl, id).await.unwrap();
            for late in [
                receipt_envelope("NL-NRM", id, pb::Outcome::Delivered, ""),
                receipt_envelope("NL-NRM", id, outcome, reason),
            ] {
                let effect = apply(&nl, late).await;
                assert!(
                    matches!(effect, ReceiptEffect::Ignored(OutboxState::Delivered)),
                    "{effect:?}"
                );
            }
            let after = state_of(&nl, id).await.unwrap();
            assert_eq!(after.outcome_at, before.outcome_at);
            assert!(after.contradicted_by.is_empty(), "{after:?}");
        }
        let warned = logs.lines_with(&["WARN"]);
        assert!(
            [expired, dead, rejected]
                .iter()
                .all(|id| !warned.iter().any(|l| l.contains(&id.to_string()))),
            "{warned:#?}"
        );
        assert_eq!(
            broker.lock().submits_arrived,
            submits,
            "nothing submitted again"
        );
        nl.shutdown().await;
    }

    /// The outbox check stops asking about a failed entry once `redrive_watch` has
    /// passed since it failed, and about one the broker no longer knows (gone past its
    /// retention): both leave the index, stay `FAILED`, and are not submitted again (a
    /// `SUBMITTED` entry the broker does not know is).
    #[tokio::test]
    async fn failed_entries_are_asked_about_no_more_past_the_window_or_once_the_broker_forgot_them()
    {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let sentinel = submitted_referral(&nl).await.message_id;
        let old = failed_referral(&nl, &broker, "k-2", EXPIRED).await;
        let forgotten = nl
            .send(request("k-3", "BE-PAYOKE", referral()))
            .await
            .unwrap()
            .message_id;
        until("it is submitted", || async {
            state_of(&nl, forgotten).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        broker.lose(&forgotten.to_string());
        apply(
            &nl,
            receipt_envelope(
                "NL-NRM",
                forgotten,
                pb::Outcome::DeadLettered,
                "MAX_ATTEMPTS",
            ),
        )
        .await;
        let submits = broker.lock().submits_arrived;
        until(
            "the broker's NOT_FOUND takes it out of the watch",
            || async { watched(&nl) == [old] },
        )
        .await;
        assert_eq!(asked_about(&broker, forgotten), 1);
        until("the expired one is asked about", || async {
            asked_about(&broker, old) == 1
        })
        .await;

        // 30 days (the window) and more after it failed
        clock.advance(Duration::from_secs(31 * 86_400));
        until("the window's end takes it out of the watch", || async {
            watched(&nl).is_empty()
        })
        .await;
        rounds(&broker, sentinel, 3).await;
        assert_eq!(asked_about(&broker, old), 1, "not asked past the window");
        assert_eq!(
            asked_about(&broker, forgotten),
            1,
            "not asked once forgotten"
        );
        for id in [old, forgotten] {
            assert_eq!(state_of(&nl, id).await.unwrap().state, OutboxState::Failed);
        }
        assert_eq!(
            broker.lock().submits_arrived,
            submits,
            "nothing submitted again"
        );
        nl.shutdown().await;
    }

    /// Failed entries share the outbox check's round of `CHECK_BATCH` calls with the
    /// `SUBMITTED` ones, which go first. They were asked about only in the room the
    /// submitted ones left: a node with a full round of submitted entries (a recipient
    /// offline with hundreds waiting) never asked about a failed one for as long as that
    /// lasted. They get `FAILED_SHARE` of a full round (the rest waiting for the next),
    /// the submitted ones the rest, and all of a round that has room.
    #[tokio::test]
    async fn failed_entries_get_their_share_of_a_full_round() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let batch = super::super::link::CHECK_BATCH;
        let share = super::super::link::FAILED_SHARE;
        let mut failed = Vec::new();
        for n in 0..=share {
            failed.push(failed_referral(&nl, &broker, &format!("k-failed-{n}"), EXPIRED).await);
        }
        until("each failed one is asked about", || async {
            failed.iter().all(|id| asked_about(&broker, *id) == 1)
        })
        .await;
        let mut submitted = Vec::new();
        for n in 0..batch {
            let sent = nl
                .send(request(&format!("k-{n}"), "BE-PAYOKE", referral()))
                .await
                .unwrap();
            submitted.push(sent.message_id);
        }
        until("all are submitted", || async {
            nl.status().outbox_submitted == batch as u64
        })
        .await;
        // the failed ones are due again, and a full batch of submitted ones with them
        let mark = broker.lock().status_asked.len();
        clock.advance(super::super::link::REDRIVE_ASK_PERIOD);
        until("every failed one is asked about again", || async {
            failed.iter().all(|id| asked_about(&broker, *id) == 2)
        })
        .await;
        // the first round after the advance: submitted ones first, then the share
        let failed_ids: Vec<String> = failed.iter().map(ToString::to_string).collect();
        let asked = broker.lock().status_asked[mark..].to_vec();
        let first_failed = asked.iter().position(|id| failed_ids.contains(id)).unwrap();
        let run = asked[first_failed..]
            .iter()
            .take_while(|id| failed_ids.contains(id))
            .count();
        assert_eq!(
            (first_failed, run),
            (batch - share, share),
            "submitted ones asked about before the failed ones, and failed ones asked in a row"
        );
        until("every submitted one is asked about again", || async {
            submitted.iter().all(|id| asked_about(&broker, *id) >= 2)
        })
        .await;
        nl.shutdown().await;
    }

    /// Has the fake broker answer `GetStatus` about `id` with `INTERNAL`, as one whose
    /// record of that message is damaged does.
    fn status_fails(broker: &FakeBroker, id: MessageId) {
        broker.lock().status_errors.insert(
            id.to_string(),
            (
                tonic::Code::Internal,
                "cannot read the message's record".to_owned(),
            ),
        );
    }

    /// A `SUBMITTED` entry the broker cannot answer about (an error for that message,
    /// not the broker gone) stopped every round of the outbox check at itself, and
    /// stayed first in the next (asked about longest ago, never counted as asked): no
    /// other entry was ever asked about. It goes behind the others.
    #[tokio::test]
    async fn a_submitted_entry_the_broker_errors_on_holds_up_no_other() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        // (no status answered before the broker is set up)
        let held = broker.status_hold.clone().lock_owned().await;
        let bad = submitted_referral(&nl).await.message_id;
        let good = nl
            .send(request("k-2", "BE-PAYOKE", referral()))
            .await
            .unwrap()
            .message_id;
        until("the second is submitted", || async {
            state_of(&nl, good).await.map(|e| e.state) == Some(OutboxState::Submitted)
        })
        .await;
        status_fails(&broker, bad);
        status_is(&broker, good, pb::MessageState::Acknowledged, "");
        drop(held);
        clock.advance(Duration::from_secs(1));
        until(
            "the broker is asked about the failing one twice",
            || async { asked_about(&broker, bad) >= 2 },
        )
        .await;
        until("the other one is asked about, and settled", || async {
            state_of(&nl, good).await.map(|e| e.state) == Some(OutboxState::Delivered)
        })
        .await;
        assert_eq!(
            state_of(&nl, bad).await.unwrap().state,
            OutboxState::Submitted
        );
        nl.shutdown().await;
    }

    /// The same for a `FAILED` entry the outbox check watches: one the broker cannot
    /// answer about stayed at the head of the watch, due, and stopped every round at
    /// itself for the whole window. It is asked again a `REDRIVE_ASK_PERIOD` later.
    #[tokio::test]
    async fn a_failed_entry_the_broker_errors_on_holds_up_no_other() {
        let Checking {
            dir: _dir,
            clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let held = broker.status_hold.clone().lock_owned().await;
        let bad = failed_referral(&nl, &broker, "k-bad", EXPIRED).await;
        let good = failed_referral(&nl, &broker, "k-good", EXPIRED).await;
        status_fails(&broker, bad);
        status_is(&broker, good, pb::MessageState::Acknowledged, "");
        drop(held);
        until("the redriven one is settled delivered", || async {
            state_of(&nl, good).await.map(|e| e.state) == Some(OutboxState::Delivered)
        })
        .await;
        assert_eq!(watched(&nl), [bad], "still watched");
        let asked = asked_about(&broker, bad);
        assert!(asked >= 1);
        clock.advance(super::super::link::REDRIVE_ASK_PERIOD);
        until("asked again a period later", || async {
            asked_about(&broker, bad) > asked
        })
        .await;
        assert_eq!(state_of(&nl, bad).await.unwrap().state, OutboxState::Failed);
        nl.shutdown().await;
    }

    /// The broker out of reach (`UNAVAILABLE`) stops the round as ever, but is no error
    /// about the entry asked about: a `FAILED` one stays due, asked again the next round,
    /// not a `REDRIVE_ASK_PERIOD` later (counted as asked, each round of a broker down
    /// pushed the first entry of the watch a period back, though it was never answered).
    #[tokio::test]
    async fn a_failed_entry_asked_while_the_broker_is_down_stays_due() {
        let Checking {
            dir: _dir,
            clock: _clock,
            broker,
            nl,
            _serving,
        } = checking().await;
        let held = broker.status_hold.clone().lock_owned().await;
        let entry = failed_referral(&nl, &broker, "k-1", EXPIRED).await;
        broker.lock().status_errors.insert(
            entry.to_string(),
            (
                tonic::Code::Unavailable,
                "the broker is shutting down".to_owned(),
            ),
        );
        drop(held);
        until("the broker is asked about it", || async {
            asked_about(&broker, entry) >= 1
        })
        .await;
        // the broker is back, and the message was redriven and delivered meanwhile
        {
            let mut state = broker.lock();
            state.status_errors.clear();
        }
        status_is(&broker, entry, pb::MessageState::Acknowledged, "");
        // (the node's clock stands still: a period later never comes)
        until(
            "asked again the next round, and settled delivered",
            || async {
                state_of(&nl, entry).await.map(|e| e.state) == Some(OutboxState::Delivered)
            },
        )
        .await;
        nl.shutdown().await;
    }
}
