//! Conformance suite of [`BrokerStore`]: the behaviour every implementation
//! must show (DESIGN.md §3 receipts, §4 lifecycle, §6 storage). Each check is
//! a generic `async fn` over `S: BrokerStore`; the `sled` module at the end
//! runs them against [`SledStore`] in a temporary directory, plus the checks
//! that need a real directory (reopen, storage faults, locking).
//!
//! Time is a [`ManualClock`]: nothing sleeps.

use std::time::Duration;

use prost::Message as _;
use trmx_proto::envelope::{Priority, sha256};
use trmx_proto::{CaseRef, Kind, MessageId, ParticipantId, pb};

use super::*;
use crate::clock::{Clock, ManualClock};

pub(super) const NL: &str = "NL-NRM";
pub(super) const BE: &str = "BE-PAYOKE";
pub(super) const NG: &str = "NG-NAPTIP";

pub(super) fn pid(s: &str) -> ParticipantId {
    ParticipantId::parse(s).unwrap()
}

/// The answer to an ack of one of the suite's referrals that acknowledges it now.
pub(super) const ACKED: AckResult = AckResult::Acknowledged {
    kind: Kind::Referral,
    already: false,
};

/// The answer to an ack of a referral acknowledged before (a repeat: not counted again).
pub(super) const ACKED_BEFORE: AckResult = AckResult::Acknowledged {
    kind: Kind::Referral,
    already: true,
};

/// The answer to an ack of a receipt that acknowledges it now.
pub(super) const RECEIPT_ACKED: AckResult = AckResult::Acknowledged {
    kind: Kind::DeliveryReceipt,
    already: false,
};

/// The lifecycle used by the suite.
pub(super) fn lifecycle() -> Lifecycle {
    Lifecycle {
        ack_timeout: Duration::from_secs(30),
        max_attempts: 3,
        redelivery_backoff_base: Duration::from_secs(2),
        redelivery_backoff_max: Duration::from_secs(10),
        dead_letter_retention: Duration::from_secs(3600),
        metadata_retention: Duration::from_secs(2 * 3600),
        max_queued_bytes_per_sender: 64 * 1024,
        audit_retention: Duration::from_secs(4 * 3600),
        max_lifetime: Duration::from_secs(3 * 3600),
    }
}

pub(super) fn clock() -> ManualClock {
    ManualClock::at_millis(1_700_000_000_000)
}

pub(super) fn message(
    from: &str,
    to: &str,
    priority: Priority,
    size: usize,
    now: Millis,
) -> NewMessage {
    let message_id = MessageId::new_v7();
    let payload = bytes::Bytes::from(vec![7u8; size]);
    let payload_sha256 = sha256(&payload);
    let mut fp = message_id.as_bytes().to_vec();
    fp.extend_from_slice(&payload_sha256);
    NewMessage {
        message_id,
        sender: pid(from),
        recipient: pid(to),
        kind: Kind::Referral,
        case_ref: CaseRef::new_random(),
        in_reply_to: None,
        priority,
        created_at: now,
        expires_at: now + 24 * 3600 * 1000,
        content_type: Kind::Referral.content_type(),
        payload,
        payload_sha256,
        fingerprint: sha256(&fp),
    }
}

pub(super) async fn submit_ok<S: BrokerStore>(s: &S, msg: &NewMessage, now: Millis) -> Accepted {
    match s.submit(msg.clone(), now).await.unwrap() {
        SubmitOutcome::Accepted(a) => a,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

pub(super) async fn lease_ids<S: BrokerStore>(
    s: &S,
    to: &str,
    stream: u64,
    max: usize,
    now: Millis,
) -> Vec<MessageId> {
    s.lease(&pid(to), StreamId(stream), max, u64::MAX, now)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message_id)
        .collect()
}

async fn state_of<S: BrokerStore>(s: &S, msg: &NewMessage) -> State {
    s.status(&msg.sender, msg.message_id)
        .await
        .unwrap()
        .unwrap()
        .state
}

/// Leases everything in `who`'s queue and returns the receipts among it, decoded.
async fn receipts<S: BrokerStore>(s: &S, who: &str, now: Millis) -> Vec<(Leased, pb::Receipt)> {
    s.lease(&pid(who), StreamId(999), 1000, u64::MAX, now)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.kind.is_broker_made())
        .map(|l| {
            let r = pb::Receipt::decode(l.payload.as_ref()).unwrap();
            (l, r)
        })
        .collect()
}

/// Applies timers until nothing is due at `now` (one `tick` applies a bounded number).
async fn tick<S: BrokerStore>(s: &S, now: Millis) -> TickReport {
    let mut total = TickReport::default();
    for _ in 0..10_000 {
        let report = s.tick(now).await.unwrap();
        total.redelivery_due += report.redelivery_due;
        total.dead_lettered += report.dead_lettered;
        total.expired += report.expired;
        total.payloads_deleted += report.payloads_deleted;
        total.metadata_deleted += report.metadata_deleted;
        total.expired_in_flight.extend(report.expired_in_flight);
        total
            .dead_lettered_in_flight
            .extend(report.dead_lettered_in_flight);
        for woken in report.woken {
            if !total.woken.contains(&woken) {
                total.woken.push(woken);
            }
        }
        total.audit_prune_error = total.audit_prune_error.or(report.audit_prune_error);
        if s.next_timer().await.unwrap().is_none_or(|at| at > now) {
            return total;
        }
    }
    panic!("timers still due at {now} after 10,000 ticks");
}

pub(super) async fn submit_then_lease_in_priority_and_seq_order<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let n1 = message(NL, BE, Priority::Normal, 100, now);
    let n2 = message(NL, BE, Priority::Normal, 100, now);
    let u1 = message(NG, BE, Priority::Urgent, 100, now);
    let other = message(NL, NG, Priority::Urgent, 100, now);
    let a1 = submit_ok(s, &n1, now).await;
    let a2 = submit_ok(s, &n2, now).await;
    submit_ok(s, &u1, now).await;
    submit_ok(s, &other, now).await;
    assert!(a2.broker_seq > a1.broker_seq);
    assert_eq!(a1.accepted_at, now);
    assert_eq!(a1.expires_at, n1.expires_at);
    assert_eq!(state_of(s, &n1).await, State::Accepted);

    let leased = s
        .lease(&pid(BE), StreamId(1), 10, u64::MAX, now)
        .await
        .unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.message_id).collect();
    assert_eq!(ids, vec![u1.message_id, n1.message_id, n2.message_id]);
    let first = &leased[1];
    assert_eq!(first.payload, n1.payload);
    assert_eq!(first.payload_sha256, n1.payload_sha256);
    assert_eq!(first.sender, Some(pid(NL)));
    assert_eq!(first.case_ref, n1.case_ref);
    assert_eq!(first.attempt, 1);
    assert_eq!(first.broker_seq, a1.broker_seq);
    assert_eq!(state_of(s, &n1).await, State::InFlight);
    // nothing more for BE; NG's message untouched
    assert!(lease_ids(s, BE, 2, 10, now).await.is_empty());
    assert_eq!(lease_ids(s, NG, 3, 10, now).await, vec![other.message_id]);
}

pub(super) async fn idempotent_duplicate_and_conflict<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 100, now);
    let first = submit_ok(s, &m, now).await;
    c.advance(Duration::from_secs(5));
    let later = c.now_millis();
    assert_eq!(
        s.submit(m.clone(), later).await.unwrap(),
        SubmitOutcome::Duplicate(first.clone())
    );
    let mut changed = m.clone();
    changed.fingerprint = [1; 32];
    assert_eq!(
        s.submit(changed, later).await.unwrap(),
        SubmitOutcome::Conflict
    );
    // the same id from another sender to the same recipient is refused: the
    // recipient acks by id, and an ack of one would settle both
    let mut from_other = m.clone();
    from_other.sender = pid(NG);
    assert_eq!(
        s.submit(from_other.clone(), later).await.unwrap(),
        SubmitOutcome::IdTaken
    );
    assert!(s.status(&pid(NG), m.message_id).await.unwrap().is_none());
    // to another recipient it is another message
    from_other.recipient = pid(NL);
    submit_ok(s, &from_other, later).await;
    assert_eq!(lease_ids(s, BE, 1, 10, later).await, vec![m.message_id]);
    assert_eq!(lease_ids(s, NL, 2, 10, later).await, vec![m.message_id]);
}

pub(super) async fn quota<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let big = message(NL, BE, Priority::Normal, 40 * 1024, now);
    submit_ok(s, &big, now).await;
    let second = message(NL, BE, Priority::Normal, 40 * 1024, now);
    assert_eq!(
        s.submit(second.clone(), now).await.unwrap(),
        SubmitOutcome::QuotaExceeded
    );
    assert!(
        s.status(&second.sender, second.message_id)
            .await
            .unwrap()
            .is_none()
    );
    // another sender has its own quota
    submit_ok(s, &message(NG, BE, Priority::Normal, 40 * 1024, now), now).await;
    // in flight still counts; acknowledged frees it
    lease_ids(s, BE, 1, 10, now).await;
    assert_eq!(
        s.submit(second.clone(), now).await.unwrap(),
        SubmitOutcome::QuotaExceeded
    );
    s.ack(&pid(BE), &[big.message_id], now).await.unwrap();
    submit_ok(s, &second, now).await;
}

pub(super) async fn lease_max_and_one_stream_per_message<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let mut all = Vec::new();
    for _ in 0..10 {
        let m = message(NL, BE, Priority::Normal, 10, now);
        submit_ok(s, &m, now).await;
        all.push(m.message_id);
    }
    assert!(lease_ids(s, BE, 1, 0, now).await.is_empty());
    let a = lease_ids(s, BE, 1, 4, now).await;
    assert_eq!(a, all[..4].to_vec());
    // concurrent leases on two streams never share a message
    let (b, c2) = tokio::join!(lease_ids(s, BE, 2, 4, now), lease_ids(s, BE, 3, 4, now));
    let mut seen: Vec<_> = a.iter().chain(&b).chain(&c2).copied().collect();
    assert_eq!(b.len() + c2.len(), 6);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 10);
    assert!(lease_ids(s, BE, 4, 4, now).await.is_empty());
}

/// A lease takes messages in lease order while their payloads fit its byte budget,
/// and stops (never skips ahead to a smaller one); a message larger than the budget
/// is leased alone.
pub(super) async fn lease_stops_at_its_byte_budget<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let mut all = Vec::new();
    for size in [400, 400, 900, 100, 100] {
        let m = message(NL, BE, Priority::Normal, size, now);
        submit_ok(s, &m, now).await;
        all.push(m.message_id);
    }
    let lease = |max_bytes: u64| async move {
        s.lease(&pid(BE), StreamId(1), 10, max_bytes, now)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.message_id)
            .collect::<Vec<_>>()
    };
    // 400 + 400 fit in 1000; the 900 would go over, and the 100s behind it wait
    assert_eq!(lease(1000).await, all[..2].to_vec());
    // the 900 alone is over 500, and is leased all the same: nothing else would ever be
    assert_eq!(lease(500).await, vec![all[2]]);
    assert_eq!(lease(200).await, all[3..].to_vec());
    for id in &all {
        let status = s.status(&pid(NL), *id).await.unwrap().unwrap();
        assert_eq!((status.state, status.attempts), (State::InFlight, 1));
    }
}

pub(super) async fn ack_queues_delivery_receipt<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Urgent, 100, now);
    submit_ok(s, &m, now).await;
    // not yet delivered: ack is NotFound
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], now).await.unwrap(),
        vec![AckResult::NotFound]
    );
    lease_ids(s, BE, 1, 10, now).await;
    // someone else's ack never applies
    assert_eq!(
        s.ack(&pid(NG), &[m.message_id], now).await.unwrap(),
        vec![AckResult::NotFound]
    );
    assert_eq!(
        s.ack(&pid(NL), &[m.message_id], now).await.unwrap(),
        vec![AckResult::NotFound]
    );
    assert_eq!(state_of(s, &m).await, State::InFlight);
    c.advance(Duration::from_secs(1));
    let at = c.now_millis();
    let unknown = MessageId::new_v7();
    let mut wake = s.wakeups();
    // (named twice: acknowledged once, with its kind, for the service's counter)
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id, unknown, m.message_id], at)
            .await
            .unwrap(),
        vec![ACKED, AckResult::NotFound, ACKED_BEFORE]
    );
    // the receipt is due to the sender: its streams are woken, and nobody else's
    assert_eq!(wake.try_recv().ok(), Some(pid(NL)));
    assert!(wake.try_recv().is_err(), "one wake-up, for the sender");
    let status = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!(status.state, State::Acknowledged);
    assert!(!status.payload_kept);
    assert_eq!(status.attempts, 1);
    assert_eq!(status.state_changed_at, at);
    // twice is harmless, makes no second receipt and wakes no stream (an old
    // ack repeated in a loop must not wake every stream of the sender)
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], at).await.unwrap(),
        vec![ACKED_BEFORE]
    );
    assert!(wake.try_recv().is_err(), "a repeated ack woke a stream");

    let got = receipts(s, NL, at).await;
    assert_eq!(got.len(), 1);
    let (env, body) = &got[0];
    assert_eq!(
        env.message_id,
        MessageId::receipt_id(m.message_id, "DELIVERED")
    );
    assert_eq!(
        env.message_id,
        MessageId::receipt_for(m.message_id, pb::Outcome::Delivered)
    );
    assert_eq!(env.kind, Kind::DeliveryReceipt);
    assert_eq!(env.sender, None);
    assert_eq!(env.recipient, pid(NL));
    assert_eq!(env.in_reply_to, None);
    assert_eq!(env.case_ref, m.case_ref);
    assert_eq!(env.priority, Priority::Urgent);
    assert_eq!(env.content_type, Kind::DeliveryReceipt.content_type());
    assert_eq!(env.payload_sha256, sha256(&env.payload));
    assert_eq!(
        env.expires_at,
        at + lifecycle().metadata_retention.as_millis() as u64
    );
    assert_eq!(body.message_id, m.message_id.to_string());
    assert_eq!(body.outcome, pb::Outcome::Delivered as i32);
    assert_eq!(body.attempts, 1);
    assert_eq!(
        body.at,
        Some(trmx_proto::time::to_timestamp(
            trmx_proto::time::from_millis(at)
        ))
    );
    assert_eq!(
        body.last_delivered_at,
        Some(trmx_proto::time::to_timestamp(
            trmx_proto::time::from_millis(now)
        ))
    );

    // acking the receipt makes no receipt
    assert_eq!(
        s.ack(&pid(NL), &[env.message_id], at).await.unwrap(),
        vec![RECEIPT_ACKED]
    );
    assert!(receipts(s, BE, at).await.is_empty());
    assert!(receipts(s, NL, at).await.is_empty());
}

pub(super) async fn reject_dead_letters_with_ndr<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 100, now);
    submit_ok(s, &m, now).await;
    assert_eq!(
        s.reject(
            &pid(BE),
            m.message_id,
            "INVALID_BODY",
            "referral.consent",
            now
        )
        .await
        .unwrap(),
        RejectResult::NotFound
    );
    lease_ids(s, BE, 1, 10, now).await;
    assert_eq!(
        s.reject(
            &pid(NG),
            m.message_id,
            "INVALID_BODY",
            "referral.consent",
            now
        )
        .await
        .unwrap(),
        RejectResult::NotFound
    );
    assert_eq!(
        s.reject(
            &pid(BE),
            m.message_id,
            "INVALID_BODY",
            "referral.consent.basis",
            now
        )
        .await
        .unwrap(),
        RejectResult::Rejected { already: false }
    );
    // again (a retry after a lost answer): harmless, and said to be a repeat
    assert_eq!(
        s.reject(&pid(BE), m.message_id, "INVALID_BODY", "", now)
            .await
            .unwrap(),
        RejectResult::Rejected { already: true }
    );
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!(st.state, State::DeadLettered);
    assert_eq!(st.reason_code, "INVALID_BODY");
    assert_eq!(st.field_path, "referral.consent.basis");
    // (never redriven: its payload is deleted at once, as an acknowledged one's)
    assert!(!st.payload_kept);
    assert!(!st.redrivable);
    // the recipient's ack after the reject does nothing
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], now).await.unwrap(),
        vec![AckResult::NotFound]
    );
    let got = receipts(s, NL, now).await;
    assert_eq!(got.len(), 1);
    let (env, body) = &got[0];
    assert_eq!(env.kind, Kind::NonDeliveryReport);
    assert_eq!(
        env.message_id,
        MessageId::receipt_id(m.message_id, "REJECTED_BY_RECIPIENT")
    );
    assert_eq!(body.outcome, pb::Outcome::RejectedByRecipient as i32);
    assert_eq!(body.reason_code, "INVALID_BODY");
    assert_eq!(body.field_path, "referral.consent.basis");
    assert_eq!(body.attempts, 1);
    // never redrivable
    assert_eq!(
        s.redrive(m.message_id, None, now).await.unwrap(),
        RedriveResult::NotRedrivable {
            state: State::DeadLettered
        }
    );
    let dead = s.dead_letters(10, None).await.unwrap().records;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, m.message_id);
}

pub(super) async fn ack_timeout_redelivers_after_backoff<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 100, now);
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    assert_eq!(s.next_timer().await.unwrap(), Some(now + 30_000));
    c.advance(Duration::from_secs(29));
    assert_eq!(tick(s, c.now_millis()).await, TickReport::default());
    c.advance(Duration::from_secs(1));
    let timeout_at = c.now_millis();
    let report = tick(s, timeout_at).await;
    assert_eq!(report.redelivery_due, 1);
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!(st.state, State::Accepted);
    assert_eq!(st.next_attempt_at, Some(timeout_at + 2_000)); // base * 2^0
    // backing off: not leased yet
    assert!(lease_ids(s, BE, 2, 10, timeout_at).await.is_empty());
    assert_eq!(s.next_timer().await.unwrap(), Some(timeout_at + 2_000));
    c.advance(Duration::from_secs(2));
    let report = tick(s, c.now_millis()).await;
    assert_eq!(report.woken, vec![pid(BE)]);
    let again = s
        .lease(&pid(BE), StreamId(2), 10, u64::MAX, c.now_millis())
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    // a delivered message back in ACCEPTED may still be acknowledged
    c.advance(Duration::from_secs(30));
    tick(s, c.now_millis()).await;
    assert_eq!(state_of(s, &m).await, State::Accepted);
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!(st.next_attempt_at, Some(c.now_millis() + 4_000)); // base * 2^1
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], c.now_millis())
            .await
            .unwrap(),
        vec![ACKED]
    );
    // and its backoff timer is gone
    c.advance(Duration::from_secs(5));
    assert!(lease_ids(s, BE, 3, 10, c.now_millis()).await.is_empty());
}

/// A message with an empty payload (a protobuf body whose fields are all
/// defaults encodes to 0 bytes) is delivered like any other, also again after
/// its ack deadline, and does not hold up the messages behind it.
pub(super) async fn an_empty_payload_is_delivered<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let empty = message(NL, BE, Priority::Normal, 0, now);
    let after = message(NL, BE, Priority::Normal, 100, now);
    submit_ok(s, &empty, now).await;
    submit_ok(s, &after, now).await;
    let leased = s
        .lease(&pid(BE), StreamId(1), 10, u64::MAX, now)
        .await
        .unwrap();
    let ids: Vec<MessageId> = leased.iter().map(|l| l.message_id).collect();
    assert_eq!(ids, vec![empty.message_id, after.message_id]);
    assert!(leased[0].payload.is_empty());
    assert_eq!(leased[0].payload_sha256, empty.payload_sha256);
    // again after the ack deadline and the backoff
    c.advance(Duration::from_secs(30));
    tick(s, c.now_millis()).await;
    c.advance(Duration::from_secs(2));
    tick(s, c.now_millis()).await;
    let again = s
        .lease(&pid(BE), StreamId(2), 10, u64::MAX, c.now_millis())
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
    assert!(
        again
            .iter()
            .any(|l| l.message_id == empty.message_id && l.payload.is_empty())
    );
    assert_eq!(
        s.ack(&pid(BE), &[empty.message_id], c.now_millis())
            .await
            .unwrap(),
        vec![ACKED]
    );
}

/// A broker that was down past both an ack deadline and the later expiry
/// of a message applies them in time order: the lease times out first.
pub(super) async fn overdue_deadlines_fire_in_time_order<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let mut m = message(NL, BE, Priority::Normal, 100, now);
    m.expires_at = now + 60_000;
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    let report = tick(s, now + 120_000).await;
    assert_eq!((report.redelivery_due, report.expired), (1, 1));
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!((st.state, st.attempts), (State::Expired, 1));
    assert_eq!(
        s.next_timer().await.unwrap(),
        Some(now + 120_000 + 3600 * 1000)
    );
}

/// More leases time out at once than one tick transaction applies: all of
/// them come back, each once.
pub(super) async fn many_leases_time_out_in_one_tick<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    for _ in 0..300 {
        submit_ok(s, &message(NL, BE, Priority::Normal, 10, now), now).await;
    }
    assert_eq!(lease_ids(s, BE, 1, 1000, now).await.len(), 300);
    let report = tick(s, now + 30_000).await;
    assert_eq!(report.redelivery_due, 300);
    assert_eq!(tick(s, now + 30_000).await.redelivery_due, 0);
    // due again after the backoff (base 2 s)
    tick(s, now + 32_000).await;
    assert_eq!(lease_ids(s, BE, 2, 1000, now + 32_000).await.len(), 300);
}

pub(super) async fn backoff_runs_from_the_ack_deadline<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 100, now);
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 1, now).await;
    let deadline = now + 30_000;
    // a late tick: the backoff (2 s) still counts from the deadline
    assert_eq!(tick(s, deadline + 1_500).await.redelivery_due, 1);
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!(st.next_attempt_at, Some(deadline + 2_000));
    assert_eq!(tick(s, deadline + 2_000).await.woken, vec![pid(BE)]);
    // a very late tick: due at once
    let leased = s
        .lease(&pid(BE), StreamId(1), 1, u64::MAX, deadline + 2_000)
        .await
        .unwrap();
    assert_eq!(leased[0].attempt, 2);
    let report = tick(s, deadline + 2_000 + 30_000 + 60_000).await;
    assert_eq!(report.redelivery_due, 1);
    assert_eq!(report.woken, vec![pid(BE)]);
    assert_eq!(
        lease_ids(s, BE, 1, 1, deadline + 92_000).await,
        vec![m.message_id]
    );
}

pub(super) async fn max_attempts_dead_letters_with_ndr<S: BrokerStore>(s: &S, c: &ManualClock) {
    let m = message(NL, BE, Priority::Normal, 100, c.now_millis());
    submit_ok(s, &m, c.now_millis()).await;
    for attempt in 1..=3u32 {
        let leased = s
            .lease(&pid(BE), StreamId(1), 10, u64::MAX, c.now_millis())
            .await
            .unwrap();
        assert_eq!(leased.len(), 1, "attempt {attempt}");
        assert_eq!(leased[0].attempt, attempt);
        let deadline = c.now_millis() + lifecycle().ack_timeout.as_millis() as Millis;
        c.advance(Duration::from_secs(30));
        let report = tick(s, c.now_millis()).await;
        // the lease that used up the attempts is named, so that a copy of it still
        // waiting in a stream's send buffer is dropped, not sent after the sender was
        // told the message was not delivered; one put back for a redelivery is not
        let ended = (attempt == 3)
            .then(|| ExpiredLease {
                recipient: pid(BE),
                message_id: m.message_id,
                deadline,
            })
            .into_iter()
            .collect::<Vec<_>>();
        assert_eq!(report.dead_lettered_in_flight, ended, "attempt {attempt}");
        assert_eq!(report.dead_lettered, u64::from(attempt == 3));
        assert!(report.expired_in_flight.is_empty(), "{report:?}");
        c.advance(Duration::from_secs(10)); // past any backoff
        tick(s, c.now_millis()).await;
    }
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!(st.state, State::DeadLettered);
    assert_eq!(st.reason_code, "MAX_ATTEMPTS");
    assert_eq!(st.attempts, 3);
    assert!(st.redrivable);
    assert!(lease_ids(s, BE, 1, 10, c.now_millis()).await.is_empty());
    let got = receipts(s, NL, c.now_millis()).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].0.message_id,
        MessageId::receipt_id(m.message_id, "DEAD_LETTERED")
    );
    assert_eq!(got[0].1.outcome, pb::Outcome::DeadLettered as i32);
    assert_eq!(got[0].1.reason_code, "MAX_ATTEMPTS");
    assert_eq!(got[0].1.attempts, 3);
    // operator redrive: ACCEPTED again, attempts from scratch (and it says how many
    // no longer count)
    let redriven = s.redrive(m.message_id, None, c.now_millis()).await.unwrap();
    assert!(
        matches!(
            redriven,
            RedriveResult::Redriven {
                attempts_before: 3,
                ..
            }
        ),
        "{redriven:?}"
    );
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!((st.state, st.attempts), (State::Accepted, 0));
    // (the recipient's node was handed it before: that stays said)
    assert!(st.last_delivered_at.is_some());
    let leased = s
        .lease(&pid(BE), StreamId(1), 10, u64::MAX, c.now_millis())
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].attempt, 1);
    assert_eq!(leased[0].payload, m.payload);
    assert!(s.dead_letters(10, None).await.unwrap().records.is_empty());
}

pub(super) async fn release_stream_makes_due_at_once<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m1 = message(NL, BE, Priority::Normal, 100, now);
    let m2 = message(NL, BE, Priority::Normal, 100, now);
    submit_ok(s, &m1, now).await;
    submit_ok(s, &m2, now).await;
    assert_eq!(lease_ids(s, BE, 1, 1, now).await, vec![m1.message_id]);
    assert_eq!(lease_ids(s, BE, 2, 1, now).await, vec![m2.message_id]);
    let mut wake = s.wakeups();
    let be = pid(BE);
    let released = |stream| s.release_stream(&be, StreamId(stream), StreamEnd::Broker, now);
    assert_eq!(
        released(1).await.unwrap(),
        Released {
            requeued: 1,
            dead_lettered: 0,
            dead_lettered_in_flight: Vec::new(),
        }
    );
    assert_eq!(wake.try_recv().ok(), Some(pid(BE)));
    assert_eq!(released(1).await.unwrap(), Released::default());
    assert_eq!(state_of(s, &m2).await, State::InFlight);
    let again = s
        .lease(&pid(BE), StreamId(3), 10, u64::MAX, now)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message_id, m1.message_id);
    assert_eq!(again[0].attempt, 2);
}

/// A recipient whose stream ends with a delivery unacknowledged (its node
/// crashed on the message, say) failed that attempt: due again after the
/// backoff, and dead-lettered with a report once the attempts are used up,
/// never handed to it forever.
pub(super) async fn a_stream_closed_by_its_recipient_is_a_failed_attempt<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let life = lifecycle();
    let m = message(NL, BE, Priority::Normal, 100, c.now_millis());
    submit_ok(s, &m, c.now_millis()).await;
    for attempt in 1..=life.max_attempts {
        let now = c.now_millis();
        assert_eq!(lease_ids(s, BE, 1, 10, now).await, vec![m.message_id]);
        let released = s
            .release_stream(&pid(BE), StreamId(1), StreamEnd::Recipient, now)
            .await
            .unwrap();
        if attempt < life.max_attempts {
            assert_eq!(released.requeued, 1, "attempt {attempt}");
            // put back for a redelivery, not dead-lettered: none named
            assert!(
                released.dead_lettered_in_flight.is_empty(),
                "attempt {attempt}: {released:?}"
            );
            // backing off: not due yet
            assert!(lease_ids(s, BE, 2, 10, now).await.is_empty());
            let status = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
            assert_eq!(status.state, State::Accepted);
            let due = status.next_attempt_at.expect("backing off");
            // base 2 s, doubling per attempt (capped at 10 s)
            let backoff = (2_000u64 << (attempt - 1)).min(10_000);
            assert_eq!(due, now + backoff, "attempt {attempt}");
            c.advance(Duration::from_millis(backoff));
            tick(s, due).await;
        } else {
            // the lease that used up the attempts is named, with its ack deadline, so
            // that an earlier copy still waiting in another stream's send buffer is
            // dropped, not sent after the sender was told it was not delivered
            assert_eq!(
                released,
                Released {
                    requeued: 0,
                    dead_lettered: 1,
                    dead_lettered_in_flight: vec![ExpiredLease {
                        recipient: pid(BE),
                        message_id: m.message_id,
                        deadline: now + life.ack_timeout.as_millis() as Millis,
                    }],
                }
            );
        }
    }
    assert_eq!(state_of(s, &m).await, State::DeadLettered);
    let reports = receipts(s, NL, c.now_millis()).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].1.outcome, pb::Outcome::DeadLettered as i32);
    assert_eq!(reports[0].1.reason_code, "MAX_ATTEMPTS");
}

/// An expired message redriven again and again never gets a lifetime longer
/// than the longest any message gets (the nodes' duplicate windows rely on
/// it); its first lifetime is kept as long as that is shorter.
pub(super) async fn repeated_redrives_stay_within_the_longest_lifetime<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    const HOUR: Millis = 3_600_000;
    let longest = lifecycle().max_lifetime.as_millis() as Millis;
    let now = c.now_millis();
    let mut m = message(NL, BE, Priority::Normal, 10, now);
    m.expires_at = now + HOUR;
    submit_ok(s, &m, now).await;
    let mut expires_at = m.expires_at;
    for round in 1..=4 {
        c.advance(Duration::from_millis(expires_at - c.now_millis()));
        tick(s, expires_at).await;
        assert_eq!(state_of(s, &m).await, State::Expired, "round {round}");
        // within the dead-letter retention (1 h): the payload is kept
        c.advance(Duration::from_secs(1800));
        let at = c.now_millis();
        match s.redrive(m.message_id, None, at).await.unwrap() {
            RedriveResult::Redriven { accepted, .. } => {
                assert!(accepted.expires_at <= at + longest, "round {round}");
                if round == 1 {
                    assert_eq!(accepted.expires_at, at + HOUR, "the first lifetime");
                }
                expires_at = accepted.expires_at;
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
}

pub(super) async fn expiry_from_accepted_and_in_flight<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let mut waiting = message(NL, BE, Priority::Normal, 100, now);
    waiting.expires_at = now + 60_000;
    let mut flying = message(NL, NG, Priority::Normal, 100, now);
    flying.expires_at = now + 60_000;
    submit_ok(s, &waiting, now).await;
    submit_ok(s, &flying, now).await;
    assert_eq!(lease_ids(s, NG, 1, 10, now).await.len(), 1);
    c.set(trmx_proto::time::from_millis(now + 60_000));
    let report = tick(s, c.now_millis()).await;
    // NG's lease (deadline now+30 s) timed out first, then both expired
    assert_eq!(report.redelivery_due, 1);
    assert_eq!(report.expired, 2);
    assert!(report.woken.contains(&pid(NL)));
    for m in [&waiting, &flying] {
        let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
        assert_eq!(st.state, State::Expired);
        assert!(st.payload_kept);
        assert!(st.redrivable);
    }
    let got = receipts(s, NL, c.now_millis()).await;
    assert_eq!(got.len(), 2);
    for (env, body) in &got {
        assert_eq!(env.kind, Kind::NonDeliveryReport);
        assert_eq!(body.outcome, pb::Outcome::Expired as i32);
        assert_eq!(body.reason_code, "EXPIRED");
    }
    let flying_ndr = got
        .iter()
        .find(|(_, b)| b.message_id == flying.message_id.to_string())
        .unwrap();
    assert_eq!(flying_ndr.1.attempts, 1);
    assert!(flying_ndr.1.last_delivered_at.is_some());
    let waiting_ndr = got
        .iter()
        .find(|(_, b)| b.message_id == waiting.message_id.to_string())
        .unwrap();
    assert_eq!(waiting_ndr.1.attempts, 0);
    assert!(waiting_ndr.1.last_delivered_at.is_none());
    assert!(lease_ids(s, BE, 2, 10, c.now_millis()).await.is_empty());
    // an expired receipt makes no NDR
    let later = c.now_millis() + lifecycle().metadata_retention.as_millis() as u64;
    tick(s, later).await;
    assert!(receipts(s, NL, later).await.is_empty());
    assert!(receipts(s, BE, later).await.is_empty());
}

pub(super) async fn expired_but_not_ticked_is_not_leased<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let mut m = message(NL, BE, Priority::Normal, 100, now);
    m.expires_at = now + 1_000;
    submit_ok(s, &m, now).await;
    assert!(lease_ids(s, BE, 1, 10, now + 1_000).await.is_empty());
}

pub(super) async fn withdraw_before_ack_refused_after<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let queued = message(NL, BE, Priority::Normal, 100, now);
    let flying = message(NL, BE, Priority::Normal, 100, now);
    let done = message(NL, BE, Priority::Normal, 100, now);
    submit_ok(s, &flying, now).await;
    submit_ok(s, &done, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    submit_ok(s, &queued, now).await;
    s.ack(&pid(BE), &[done.message_id], now).await.unwrap();

    // only the sender may withdraw
    assert_eq!(
        s.withdraw(&pid(BE), queued.message_id, now).await.unwrap(),
        WithdrawResult::NotFound
    );
    assert_eq!(
        s.withdraw(&pid(NL), queued.message_id, now).await.unwrap(),
        WithdrawResult::Withdrawn {
            at: now,
            recipient: pid(BE),
            already: false,
        }
    );
    assert_eq!(
        s.withdraw(&pid(NL), flying.message_id, now).await.unwrap(),
        WithdrawResult::Withdrawn {
            at: now,
            recipient: pid(BE),
            already: false,
        }
    );
    assert_eq!(
        s.withdraw(&pid(NL), done.message_id, now).await.unwrap(),
        WithdrawResult::AlreadyAcknowledged
    );
    c.advance(Duration::from_secs(1));
    assert_eq!(
        s.withdraw(&pid(NL), queued.message_id, c.now_millis())
            .await
            .unwrap(),
        WithdrawResult::Withdrawn {
            at: now,
            recipient: pid(BE),
            already: true,
        }
    );
    let st = s
        .status(&queued.sender, queued.message_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.state, State::Withdrawn);
    assert!(!st.payload_kept);
    // the recipient never sees them again, its ack of the withdrawn in-flight one is NotFound
    assert!(lease_ids(s, BE, 2, 10, c.now_millis()).await.is_empty());
    assert_eq!(
        s.ack(&pid(BE), &[flying.message_id], c.now_millis())
            .await
            .unwrap(),
        vec![AckResult::NotFound]
    );
    // no NDR for a withdrawal (only the delivery receipt of `done`)
    let got = receipts(s, NL, c.now_millis()).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.outcome, pb::Outcome::Delivered as i32);
}

/// A misaddressed message that expired keeps its payload for a redrive; its sender
/// can still take it back, and then it is gone and never redriven.
pub(super) async fn an_expired_message_can_be_withdrawn<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let mut m = message(NL, BE, Priority::Normal, 100, now);
    m.expires_at = now + 600_000;
    submit_ok(s, &m, now).await;
    let later = now + 600_001;
    assert_eq!(tick(s, later).await.expired, 1);
    assert!(
        s.status(&pid(NL), m.message_id)
            .await
            .unwrap()
            .unwrap()
            .payload_kept
    );
    assert_eq!(
        s.withdraw(&pid(NL), m.message_id, later).await.unwrap(),
        WithdrawResult::Withdrawn {
            at: later,
            recipient: pid(BE),
            already: false,
        }
    );
    let st = s.status(&pid(NL), m.message_id).await.unwrap().unwrap();
    assert_eq!(st.state, State::Withdrawn);
    assert!(!st.payload_kept);
    assert_eq!(
        s.redrive(m.message_id, None, later).await.unwrap(),
        RedriveResult::NotRedrivable {
            state: State::Withdrawn
        }
    );
    assert!(s.dead_letters(0, None).await.unwrap().records.is_empty());
    // the expiry's report only
    let got = receipts(s, NL, later).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.outcome, pb::Outcome::Expired as i32);
    // a purged message stays purged
    let purged = message(NL, BE, Priority::Normal, 100, later);
    submit_ok(s, &purged, later).await;
    s.purge(purged.message_id, None, "misaddressed", later)
        .await
        .unwrap();
    assert_eq!(
        s.withdraw(&pid(NL), purged.message_id, later)
            .await
            .unwrap(),
        WithdrawResult::Final {
            state: State::Purged
        }
    );
}

pub(super) async fn status_only_for_the_sender<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Urgent, 123, now);
    let a = submit_ok(s, &m, now).await;
    let st = s.status(&pid(NL), m.message_id).await.unwrap().unwrap();
    assert_eq!(st.message_id, m.message_id);
    assert_eq!(st.sender, Some(pid(NL)));
    assert_eq!(st.recipient, pid(BE));
    assert_eq!(st.kind, Kind::Referral);
    assert_eq!(st.priority, Priority::Urgent);
    assert_eq!(st.payload_size, 123);
    assert_eq!(st.broker_seq, a.broker_seq);
    assert_eq!(st.attempts, 0);
    assert_eq!(st.last_delivered_at, None);
    assert!(s.status(&pid(BE), m.message_id).await.unwrap().is_none());
    assert!(s.status(&pid(NG), m.message_id).await.unwrap().is_none());
    assert!(
        s.status(&pid(NL), MessageId::new_v7())
            .await
            .unwrap()
            .is_none()
    );
}

pub(super) async fn retentions_delete_payload_then_metadata<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let mut m = message(NL, BE, Priority::Normal, 100, now);
    m.expires_at = now + 1_000;
    let acked = message(NL, NG, Priority::Normal, 100, now);
    submit_ok(s, &m, now).await;
    submit_ok(s, &acked, now).await;
    lease_ids(s, NG, 1, 10, now).await;
    s.ack(&pid(NG), &[acked.message_id], now).await.unwrap();
    c.advance(Duration::from_secs(1));
    let expired_at = c.now_millis();
    assert_eq!(tick(s, expired_at).await.expired, 1);
    // payload kept for the dead-letter retention (1 h)
    let dlr = lifecycle().dead_letter_retention.as_millis() as u64;
    let mr = lifecycle().metadata_retention.as_millis() as u64;
    let report = tick(s, expired_at + dlr - 1).await;
    assert_eq!(report.payloads_deleted, 0);
    let report = tick(s, expired_at + dlr).await;
    assert_eq!(report.payloads_deleted, 1);
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert!(!st.payload_kept);
    assert!(!st.redrivable);
    assert_eq!(
        s.redrive(m.message_id, None, expired_at + dlr)
            .await
            .unwrap(),
        RedriveResult::NotRedrivable {
            state: State::Expired
        }
    );
    // the acknowledged message's metadata goes after the metadata retention (2 h)
    let report = tick(s, now + mr).await;
    assert_eq!(report.metadata_deleted, 1);
    assert!(
        s.status(&acked.sender, acked.message_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(s.status(&m.sender, m.message_id).await.unwrap().is_some());
    let report = tick(s, expired_at + mr).await;
    // the expired message, and the two receipts (acked/expired at +2 h after their expiry) not yet
    assert!(report.metadata_deleted >= 1);
    assert!(s.status(&m.sender, m.message_id).await.unwrap().is_none());
    // everything is gone eventually; no timer left
    tick(s, expired_at + 10 * mr).await;
    assert_eq!(s.next_timer().await.unwrap(), None);
    assert!(
        s.search(SearchFilter::default())
            .await
            .unwrap()
            .records
            .is_empty()
    );
    for q in s.queue_stats().await.unwrap() {
        assert_eq!((q.depth, q.in_flight, q.bytes), (0, 0, 0), "{q:?}");
    }
    // metadata gone: the same id is a new message now
    let mut again = m.clone();
    again.expires_at = expired_at + 20 * mr;
    submit_ok(s, &again, expired_at + 10 * mr).await;
}

/// Message ids are unique per sender only. An operator's purge or redrive acts on one
/// message: the named sender's, or the only one with the id. Never on another
/// organisation's message that carries the same id.
pub(super) async fn operator_actions_name_one_message<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let ours = message(NL, BE, Priority::Normal, 100, now);
    let mut theirs = message(NG, NL, Priority::Normal, 100, now);
    theirs.message_id = ours.message_id;
    submit_ok(s, &ours, now).await;
    submit_ok(s, &theirs, now).await;
    let id = ours.message_id;
    let both = PurgeResult::Ambiguous {
        senders: vec![Some(pid(NL)), Some(pid(NG))],
    };
    assert_eq!(s.purge(id, None, "misaddressed", now).await.unwrap(), both);
    assert_eq!(
        s.redrive(id, None, now).await.unwrap(),
        RedriveResult::Ambiguous {
            senders: vec![Some(pid(NL)), Some(pid(NG))],
        }
    );
    assert_eq!(
        s.purge(id, Some(&pid(BE)), "misaddressed", now)
            .await
            .unwrap(),
        PurgeResult::NotFound
    );
    for m in [&ours, &theirs] {
        assert_eq!(state_of(s, m).await, State::Accepted, "nothing changed yet");
    }
    assert_eq!(
        s.purge(id, Some(&pid(NG)), "misaddressed", now)
            .await
            .unwrap(),
        PurgeResult::Purged {
            recipient: pid(NL),
            sender: Some(pid(NG)),
        }
    );
    assert_eq!(state_of(s, &theirs).await, State::Purged);
    assert_eq!(state_of(s, &ours).await, State::Accepted);
    assert_eq!(lease_ids(s, BE, 1, 10, now).await, vec![id]);
    // only NG has a non-delivery report
    assert!(receipts(s, NL, now).await.is_empty());
    assert_eq!(receipts(s, NG, now).await.len(), 1);
}

pub(super) async fn purge_queues_ndr<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 100, now);
    submit_ok(s, &m, now).await;
    assert_eq!(
        s.purge(MessageId::new_v7(), None, "test", now)
            .await
            .unwrap(),
        PurgeResult::NotFound
    );
    assert_eq!(
        s.purge(m.message_id, None, "court order 12", now)
            .await
            .unwrap(),
        PurgeResult::Purged {
            recipient: m.recipient.clone(),
            sender: Some(m.sender.clone()),
        }
    );
    // a retry (its first answer lost) is told when it was purged; nothing changes
    assert_eq!(
        s.purge(m.message_id, None, "again", now + 5_000)
            .await
            .unwrap(),
        PurgeResult::AlreadyPurged {
            at: now,
            recipient: m.recipient.clone(),
            sender: Some(m.sender.clone()),
        }
    );
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    assert_eq!(st.state, State::Purged);
    assert!(!st.payload_kept);
    assert!(lease_ids(s, BE, 1, 10, now).await.is_empty());
    let got = receipts(s, NL, now).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.outcome, pb::Outcome::Purged as i32);
    assert_eq!(
        got[0].0.message_id,
        MessageId::receipt_id(m.message_id, "PURGED")
    );
}

/// The oldest message of a queue is the oldest its recipient has not acknowledged: one
/// in flight, or backing off before a redelivery, counts as much as one due now.
pub(super) async fn oldest_counts_in_flight_and_backing_off<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let oldest = |stats: Vec<QueueStats>| {
        stats
            .into_iter()
            .find(|q| q.recipient == pid(BE))
            .and_then(|q| q.oldest_accepted_at)
    };
    let first = message(NL, BE, Priority::Normal, 10, now);
    let second = message(NL, BE, Priority::Normal, 10, now + 1);
    submit_ok(s, &first, now).await;
    submit_ok(s, &second, now + 1).await;
    assert_eq!(
        lease_ids(s, BE, 1, 1, now + 2).await,
        vec![first.message_id]
    );
    assert_eq!(
        oldest(s.queue_stats().await.unwrap()),
        Some(now),
        "in flight"
    );
    // its stream closed by the recipient: backing off
    s.release_stream(&pid(BE), StreamId(1), StreamEnd::Recipient, now + 3)
        .await
        .unwrap();
    let st = s.status(&first.sender, first.message_id).await.unwrap();
    assert!(st.is_some_and(|st| st.next_attempt_at.is_some()));
    assert_eq!(
        oldest(s.queue_stats().await.unwrap()),
        Some(now),
        "backing off"
    );
    // the younger one delivered and acknowledged: the older one still waits
    assert_eq!(
        lease_ids(s, BE, 2, 10, now + 4).await,
        vec![second.message_id]
    );
    s.ack(&pid(BE), &[second.message_id], now + 4)
        .await
        .unwrap();
    assert_eq!(oldest(s.queue_stats().await.unwrap()), Some(now));
    // and once it is acknowledged too, none waits
    let later = now + 3_600_000;
    s.tick(later).await.unwrap();
    assert_eq!(lease_ids(s, BE, 3, 10, later).await, vec![first.message_id]);
    s.ack(&pid(BE), &[first.message_id], later).await.unwrap();
    assert_eq!(oldest(s.queue_stats().await.unwrap()), None);
}

/// A message backing off counts for its queue's oldest message from its ack
/// timeout until it is due again, and no longer once it expired while backing
/// off; one delivered again counts while in flight. (The conformance run
/// ends with store verify: every index, the one of messages backing off too,
/// is what the records imply.)
pub(super) async fn oldest_follows_timeouts_redeliveries_and_expiry<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let t0 = c.now_millis();
    let oldest = |stats: Vec<QueueStats>| {
        stats
            .into_iter()
            .find(|q| q.recipient == pid(BE))
            .and_then(|q| q.oldest_accepted_at)
    };
    let mut expiring = message(NL, BE, Priority::Normal, 10, t0);
    expiring.expires_at = t0 + 31_000; // during its backoff after the ack timeout
    let redelivered = message(NL, BE, Priority::Normal, 10, t0 + 1);
    submit_ok(s, &expiring, t0).await;
    submit_ok(s, &redelivered, t0 + 1).await;
    assert_eq!(lease_ids(s, BE, 1, 10, t0 + 1).await.len(), 2);
    // both ack deadlines pass (30 s): both back off until t0 + 32 s
    c.set(trmx_proto::time::from_millis(t0 + 30_001));
    assert_eq!(tick(s, c.now_millis()).await.redelivery_due, 2);
    for m in [&expiring, &redelivered] {
        let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
        assert_eq!(st.state, State::Accepted);
        assert!(st.next_attempt_at.is_some(), "backing off");
    }
    assert_eq!(oldest(s.queue_stats().await.unwrap()), Some(t0));
    // the older one expires while backing off
    c.set(trmx_proto::time::from_millis(t0 + 31_000));
    assert_eq!(tick(s, c.now_millis()).await.expired, 1);
    assert_eq!(state_of(s, &expiring).await, State::Expired);
    assert_eq!(oldest(s.queue_stats().await.unwrap()), Some(t0 + 1));
    // the younger one is due again, then delivered again
    c.set(trmx_proto::time::from_millis(t0 + 32_001));
    assert_eq!(tick(s, c.now_millis()).await.woken, vec![pid(BE)]);
    assert_eq!(oldest(s.queue_stats().await.unwrap()), Some(t0 + 1));
    let again = s
        .lease(&pid(BE), StreamId(2), 10, u64::MAX, c.now_millis())
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message_id, redelivered.message_id);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(oldest(s.queue_stats().await.unwrap()), Some(t0 + 1));
    // and acknowledged: none waits
    s.ack(&pid(BE), &[redelivered.message_id], c.now_millis())
        .await
        .unwrap();
    assert_eq!(oldest(s.queue_stats().await.unwrap()), None);
}

pub(super) async fn stats_and_search<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let m1 = message(NL, BE, Priority::Normal, 100, now);
    let m2 = message(NG, BE, Priority::Urgent, 50, now + 1);
    let m3 = message(NL, NG, Priority::Normal, 10, now + 2);
    submit_ok(s, &m1, now).await;
    submit_ok(s, &m2, now + 1).await;
    submit_ok(s, &m3, now + 2).await;
    lease_ids(s, BE, 1, 1, now + 3).await; // m2 (urgent)
    let mut stats = s.queue_stats().await.unwrap();
    stats.sort_by(|a, b| a.recipient.cmp(&b.recipient));
    assert_eq!(
        stats,
        vec![
            QueueStats {
                recipient: pid(BE),
                depth: 1,
                in_flight: 1,
                oldest_accepted_at: Some(now),
                bytes: 150
            },
            QueueStats {
                recipient: pid(NG),
                depth: 1,
                in_flight: 0,
                oldest_accepted_at: Some(now + 2),
                bytes: 10
            },
        ]
    );
    let search = |filter: SearchFilter| async move { s.search(filter).await.unwrap().records };
    let from_nl = search(SearchFilter {
        sender: Some(pid(NL)),
        ..SearchFilter::default()
    })
    .await;
    assert_eq!(
        from_nl.iter().map(|r| r.message_id).collect::<Vec<_>>(),
        vec![m1.message_id, m3.message_id]
    );
    let in_flight = search(SearchFilter {
        state: Some(State::InFlight),
        ..SearchFilter::default()
    })
    .await;
    assert_eq!(in_flight.len(), 1);
    assert_eq!(in_flight[0].message_id, m2.message_id);
    let by_case = search(SearchFilter {
        case_ref: Some(m3.case_ref),
        ..SearchFilter::default()
    })
    .await;
    assert_eq!(by_case.len(), 1);
    let by_id = search(SearchFilter {
        message_id: Some(m1.message_id),
        ..SearchFilter::default()
    })
    .await;
    assert_eq!(by_id.len(), 1);
    let limited = search(SearchFilter {
        limit: 2,
        ..SearchFilter::default()
    })
    .await;
    assert_eq!(limited.len(), 2);
}

/// Every page of `filter`, following `resume_after` to the end: the ids found
/// and the number of calls.
async fn all_pages<S: BrokerStore>(s: &S, filter: SearchFilter) -> (Vec<MessageId>, usize) {
    let mut filter = filter;
    let mut ids = Vec::new();
    let mut calls = 0;
    loop {
        let page = s.search(filter.clone()).await.unwrap();
        calls += 1;
        assert!(page.records.len() <= filter.limit.max(1), "{page:?}");
        ids.extend(page.records.iter().map(|r| r.message_id));
        match page.resume_after {
            Some(seq) => filter.after_seq = Some(seq),
            None => return (ids, calls),
        }
        assert!(calls < 100, "the pages never end");
    }
}

pub(super) async fn search_and_dead_letters_page<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    let mut from_nl = Vec::new();
    for i in 0..5 {
        let mut m = message(NL, BE, Priority::Normal, 10, now + i);
        m.expires_at = now + 60_000;
        submit_ok(s, &m, now + i).await;
        from_nl.push(m.message_id);
    }
    let ng = message(NG, BE, Priority::Normal, 10, now + 5);
    submit_ok(s, &ng, now + 5).await;
    let nl = |limit: usize| SearchFilter {
        sender: Some(pid(NL)),
        limit,
        ..SearchFilter::default()
    };

    // pages of 2: [0, 1] [2, 3] [4], each saying where the next starts
    let first = s.search(nl(2)).await.unwrap();
    let ids: Vec<_> = first.records.iter().map(|r| r.message_id).collect();
    assert_eq!(ids, from_nl[..2]);
    assert_eq!(first.resume_after, Some(first.records[1].broker_seq));
    assert_eq!(all_pages(s, nl(2)).await, (from_nl.clone(), 3));
    // exactly `limit` matches: no page after the last one
    let whole = s.search(nl(5)).await.unwrap();
    assert_eq!(whole.records.len(), 5);
    assert_eq!(whole.resume_after, None);
    // a filter that matches little stops at the scan limit and goes on from there
    let only_ng = SearchFilter {
        sender: Some(pid(NG)),
        scan_limit: 2,
        ..SearchFilter::default()
    };
    let stopped = s.search(only_ng.clone()).await.unwrap();
    assert!(stopped.records.is_empty());
    assert!(stopped.resume_after.is_some());
    let (ids, calls) = all_pages(s, only_ng).await;
    assert_eq!(ids, vec![ng.message_id]);
    assert!(calls >= 3, "{calls} calls");
    // the id index honours the page too
    let by_id = |after_seq| SearchFilter {
        message_id: Some(from_nl[0]),
        after_seq,
        ..SearchFilter::default()
    };
    let found = s.search(by_id(None)).await.unwrap().records;
    assert_eq!(found.len(), 1);
    assert!(
        s.search(by_id(Some(found[0].broker_seq)))
            .await
            .unwrap()
            .records
            .is_empty()
    );

    // the five expire: dead letters come in pages too
    c.advance(Duration::from_secs(61));
    assert_eq!(tick(s, c.now_millis()).await.expired, 5);
    let page = s.dead_letters(2, None).await.unwrap();
    assert_eq!(page.records.len(), 2);
    let mut dead: Vec<_> = page.records.iter().map(|r| r.message_id).collect();
    let mut after = page.resume_after;
    while let Some(seq) = after {
        let page = s.dead_letters(2, Some(seq)).await.unwrap();
        dead.extend(page.records.iter().map(|r| r.message_id));
        after = page.resume_after;
    }
    assert_eq!(dead, from_nl);
}

pub(super) async fn presence_moves_forward_only<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    assert_eq!(s.presence().await.unwrap(), vec![]);
    let seen = |who: &str, at: Millis, cert: Option<Millis>| Presence {
        participant: pid(who),
        last_seen: at,
        cert_not_after: cert,
    };
    s.save_presence(vec![
        seen(NL, now, Some(now + 1000)),
        seen(BE, now - 5, None),
    ])
    .await
    .unwrap();
    // an older sighting does not undo a newer one; a newer one replaces it
    s.save_presence(vec![
        seen(NL, now - 60_000, None),
        seen(BE, now + 10, Some(now + 99)),
    ])
    .await
    .unwrap();
    s.save_presence(vec![]).await.unwrap();
    assert_eq!(
        s.presence().await.unwrap(),
        vec![
            seen(BE, now + 10, Some(now + 99)),
            seen(NL, now, Some(now + 1000))
        ]
    );
    // a renewed certificate seen in the same millisecond is kept
    s.save_presence(vec![seen(NL, now, Some(now + 5000))])
        .await
        .unwrap();
    assert_eq!(
        s.presence().await.unwrap()[1],
        seen(NL, now, Some(now + 5000))
    );
}

pub(super) async fn the_last_run_is_recorded<S: BrokerStore>(s: &S, c: &ManualClock) {
    let now = c.now_millis();
    assert_eq!(s.last_running().await.unwrap(), None, "a new store");
    s.mark_running(now).await.unwrap();
    assert_eq!(s.last_running().await.unwrap(), Some(now));
    // the last mark counts, also one earlier than the one before (an accepted clock)
    s.mark_running(now - 5_000).await.unwrap();
    assert_eq!(s.last_running().await.unwrap(), Some(now - 5_000));
}

pub(super) async fn concurrent_submits_share_flushes<S: BrokerStore>(
    s: &std::sync::Arc<S>,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = std::sync::Arc::clone(s);
        let from = if i % 2 == 0 { NL } else { NG };
        let m = message(from, BE, Priority::Normal, 100, now);
        tasks.push(tokio::spawn(async move { s.submit(m, now).await }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.unwrap().unwrap(),
            SubmitOutcome::Accepted(_)
        ));
    }
    assert_eq!(lease_ids(&**s, BE, 1, 100, now).await.len(), 64);
}

/// An ack that arrives at the very instant of the expiry, before the tick applied it:
/// the recipient stored the message, so it is ACKNOWLEDGED with one DELIVERED receipt,
/// and the expiry then finds nothing to do (no non-delivery report besides).
pub(super) async fn an_ack_at_the_instant_of_expiry_is_one_delivery<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let mut m = message(NL, BE, Priority::Normal, 10, now);
    m.expires_at = now + 10_000;
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], m.expires_at)
            .await
            .unwrap(),
        vec![ACKED]
    );
    assert_eq!(tick(s, m.expires_at).await.expired, 0);
    let got = receipts(s, NL, m.expires_at).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.outcome, pb::Outcome::Delivered as i32);
}

/// A message whose lifetime (one millisecond) ends while it is in flight: EXPIRED with
/// one report that says it was delivered once; the recipient's late ack and reject are
/// NOT_FOUND, and neither its ack deadline nor the end of its stream adds a report.
pub(super) async fn a_message_expiring_in_flight_gets_one_report<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let mut m = message(NL, BE, Priority::Normal, 10, now);
    m.expires_at = now + 1;
    submit_ok(s, &m, now).await;
    assert_eq!(lease_ids(s, BE, 1, 10, now).await, vec![m.message_id]);
    // (one that expires queued holds no stream slot)
    let mut queued = message(NL, BE, Priority::Normal, 10, now);
    queued.expires_at = now + 1;
    submit_ok(s, &queued, now).await;
    let report = tick(s, now + 1).await;
    assert_eq!(report.expired, 2);
    // the stream's slot is given back now, not at the ack deadline
    assert_eq!(
        report.expired_in_flight,
        vec![ExpiredLease {
            recipient: pid(BE),
            message_id: m.message_id,
            deadline: now + lifecycle().ack_timeout.as_millis() as u64,
        }]
    );
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], now + 2).await.unwrap(),
        vec![AckResult::NotFound]
    );
    assert_eq!(
        s.reject(&pid(BE), m.message_id, "INVALID_BODY", "", now + 2)
            .await
            .unwrap(),
        RejectResult::NotFound
    );
    let after_deadline = now + 60_000;
    let report = tick(s, after_deadline).await;
    assert_eq!(
        (report.redelivery_due, report.dead_lettered, report.expired),
        (0, 0, 0)
    );
    let released = s
        .release_stream(&pid(BE), StreamId(1), StreamEnd::Recipient, after_deadline)
        .await
        .unwrap();
    assert_eq!(released, Released::default());
    let st = s.status(&pid(NL), m.message_id).await.unwrap().unwrap();
    assert_eq!((st.state, st.attempts), (State::Expired, 1));
    let got: Vec<_> = receipts(s, NL, after_deadline)
        .await
        .into_iter()
        .filter(|(_, body)| body.message_id == m.message_id.to_string())
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.outcome, pb::Outcome::Expired as i32);
    assert_eq!(got[0].1.attempts, 1);
    assert!(got[0].1.last_delivered_at.is_some());
}

/// The ack deadline of the last allowed attempt falls on the very millisecond of the
/// expiry: the deadline goes first (DEAD_LETTERED, MAX_ATTEMPTS), and the sender gets
/// that one report, not a second for the expiry.
pub(super) async fn a_last_ack_deadline_at_the_expiry_makes_one_report<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let t0 = c.now_millis();
    // attempts 1 and 2 take 30 s each plus a backoff of 2 s and 4 s; the third is
    // leased at +70 s, its deadline is +100 s
    let mut m = message(NL, BE, Priority::Normal, 10, t0);
    m.expires_at = t0 + 100_000;
    submit_ok(s, &m, t0).await;
    for (attempt, at) in [(1, t0), (2, t0 + 32_000), (3, t0 + 70_000)] {
        tick(s, at).await;
        let leased = s
            .lease(&pid(BE), StreamId(attempt), 10, u64::MAX, at)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1, "attempt {attempt}");
        assert_eq!(leased[0].attempt, attempt as u32);
    }
    let report = tick(s, m.expires_at).await;
    assert_eq!((report.dead_lettered, report.expired), (1, 0));
    let st = s.status(&pid(NL), m.message_id).await.unwrap().unwrap();
    assert_eq!(
        (st.state, st.reason_code.as_str()),
        (State::DeadLettered, "MAX_ATTEMPTS")
    );
    let got = receipts(s, NL, m.expires_at).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.outcome, pb::Outcome::DeadLettered as i32);
    assert_eq!(got[0].1.attempts, 3);
}

/// A lease that timed out and whose message was leased again to another stream of the
/// recipient: the end of the first stream neither releases it nor counts a failed
/// attempt, and the recipient's ack (from either stream) still counts, once.
pub(super) async fn a_re_leased_message_is_not_released_by_its_old_stream<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 10, now);
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    tick(s, now + 30_000).await;
    tick(s, now + 32_000).await;
    assert_eq!(
        lease_ids(s, BE, 2, 10, now + 32_000).await,
        vec![m.message_id]
    );
    let released = s
        .release_stream(&pid(BE), StreamId(1), StreamEnd::Recipient, now + 33_000)
        .await
        .unwrap();
    assert_eq!(released, Released::default());
    let st = s.status(&pid(NL), m.message_id).await.unwrap().unwrap();
    assert_eq!((st.state, st.attempts), (State::InFlight, 2));
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], now + 33_000)
            .await
            .unwrap(),
        vec![ACKED]
    );
    assert_eq!(receipts(s, NL, now + 33_000).await.len(), 1);
}

/// A message dead-lettered after its attempts, then withdrawn by its sender: the
/// recipient's late reject and ack are NOT_FOUND. Its report, never read by the
/// sender, expires when the metadata retention ends and causes no report of its own
/// (nor can it be acknowledged then); in the end no timer is left.
pub(super) async fn a_withdrawn_dead_letter_and_its_unread_report_end_quietly<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 10, now);
    submit_ok(s, &m, now).await;
    let mut t = now;
    for _ in 0..3 {
        assert_eq!(lease_ids(s, BE, 1, 10, t).await.len(), 1);
        t += 30_000;
        tick(s, t).await;
        t += 10_000;
        tick(s, t).await;
    }
    assert_eq!(state_of(s, &m).await, State::DeadLettered);
    assert!(matches!(
        s.withdraw(&pid(NL), m.message_id, t).await.unwrap(),
        WithdrawResult::Withdrawn { already: false, .. }
    ));
    assert_eq!(
        s.reject(&pid(BE), m.message_id, "INVALID_BODY", "", t)
            .await
            .unwrap(),
        RejectResult::NotFound
    );
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], t).await.unwrap(),
        vec![AckResult::NotFound]
    );
    let ndr = MessageId::receipt_for(m.message_id, pb::Outcome::DeadLettered);
    let mr = lifecycle().metadata_retention.as_millis() as u64;
    // the report's lifetime is the metadata retention (it was made at t - 10 s)
    assert_eq!(tick(s, t - 10_000 + mr - 1).await.expired, 0);
    assert_eq!(tick(s, t - 10_000 + mr).await.expired, 1);
    assert_eq!(
        s.ack(&pid(NL), &[ndr], t + mr).await.unwrap(),
        vec![AckResult::NotFound]
    );
    assert!(receipts(s, NL, t + mr).await.is_empty());
    assert!(receipts(s, BE, t + mr).await.is_empty());
    tick(s, t + 100 * mr).await;
    assert_eq!(s.next_timer().await.unwrap(), None);
}

/// A message that expired in flight and was redriven counts only its new deliveries:
/// the ack of the delivery before the redrive is NOT_FOUND (the recipient gets it
/// again), the new one's counts; the sender gets the expiry's report, then the
/// delivery receipt.
pub(super) async fn a_redriven_message_counts_only_its_new_deliveries<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let mut m = message(NL, BE, Priority::Normal, 10, now);
    m.expires_at = now + 1_000;
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    tick(s, now + 1_000).await;
    let at = now + 2_000;
    assert!(matches!(
        s.redrive(m.message_id, None, at).await.unwrap(),
        RedriveResult::Redriven { .. }
    ));
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], at).await.unwrap(),
        vec![AckResult::NotFound]
    );
    let leased = s
        .lease(&pid(BE), StreamId(2), 10, u64::MAX, at)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].attempt, 1);
    assert_eq!(
        s.ack(&pid(BE), &[m.message_id], at).await.unwrap(),
        vec![ACKED]
    );
    let outcomes: Vec<i32> = receipts(s, NL, at)
        .await
        .iter()
        .map(|(_, body)| body.outcome)
        .collect();
    assert_eq!(
        outcomes,
        vec![pb::Outcome::Expired as i32, pb::Outcome::Delivered as i32]
    );
}

async fn due_at<S: BrokerStore>(s: &S, m: &NewMessage) -> Option<Millis> {
    let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
    st.next_attempt_at
}

/// A restart whose clock is behind the previous run's (a start accepts that, and says
/// so): a message backing off is due at the latest its backoff after the restart, not
/// as much later as the clock went back. One whose due instant is within its backoff
/// keeps it.
pub(super) async fn a_clock_set_back_across_a_restart_holds_no_redelivery<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 10, now);
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 1, now).await;
    // the ack deadline passes: due again after the backoff of 2 s
    tick(s, now + 30_000).await;
    assert_eq!(due_at(s, &m).await, Some(now + 32_000));
    // restarted a second later: unchanged
    s.recover(now + 31_000).await.unwrap();
    assert_eq!(due_at(s, &m).await, Some(now + 32_000));
    // restarted with the clock three hours behind: due 2 s after the restart
    let back = now - 3 * 3_600_000;
    s.recover(back).await.unwrap();
    assert_eq!(due_at(s, &m).await, Some(back + 2_000));
    tick(s, back + 1_999).await;
    assert!(lease_ids(s, BE, 2, 1, back + 1_999).await.is_empty());
    tick(s, back + 2_000).await;
    let leased = s
        .lease(&pid(BE), StreamId(2), 1, u64::MAX, back + 2_000)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].attempt, 2);
}

/// A receipt is never dead-lettered for its attempts: no report can be made of a
/// receipt (DESIGN.md §3), so its sender would never learn what became of its message,
/// which §4's guarantee (delivered, or a report to the sender) forbids. A sender's node
/// whose deliveries keep failing (ack timeouts, a stream it keeps dropping: a flaky
/// link, or a crash on a referral in the same window) gets its receipts again, at the
/// longest backoff, until they expire at the end of the metadata retention.
pub(super) async fn a_receipt_is_tried_again_past_the_attempt_limit<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 10, now);
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    s.ack(&pid(BE), &[m.message_id], now).await.unwrap();
    let dr = MessageId::receipt_for(m.message_id, pb::Outcome::Delivered);
    let max = lifecycle().max_attempts;
    let mut t = now;
    for attempt in 1..=max + 2 {
        tick(s, t).await;
        let leased = s
            .lease(&pid(NL), StreamId(u64::from(attempt)), 10, u64::MAX, t)
            .await
            .unwrap();
        let got: Vec<(MessageId, u32)> = leased.iter().map(|l| (l.message_id, l.attempt)).collect();
        assert_eq!(got, vec![(dr, attempt)], "attempt {attempt}");
        // failed: by turns an ack timeout and a stream its node closed
        if attempt % 2 == 0 {
            s.release_stream(
                &pid(NL),
                StreamId(u64::from(attempt)),
                StreamEnd::Recipient,
                t,
            )
            .await
            .unwrap();
        } else {
            t += 30_000;
            tick(s, t).await;
        }
        // past the longest backoff (10 s)
        t += 10_000;
    }
    assert!(s.dead_letters(0, None).await.unwrap().records.is_empty());
    tick(s, t).await;
    assert_eq!(lease_ids(s, NL, 99, 10, t).await, vec![dr]);
    assert_eq!(
        s.ack(&pid(NL), &[dr], t).await.unwrap(),
        vec![RECEIPT_ACKED]
    );
    // and no receipt of the receipt
    assert!(receipts(s, NL, t).await.is_empty());
    assert!(receipts(s, BE, t).await.is_empty());
}

/// A message id used again once the broker has deleted its first message's metadata
/// (the metadata retention passed) is a new message: its sender gets that message's
/// receipt, although the receipt of the first one is still on record, with the same id
/// (a UUIDv5 of the message id and the outcome). It is: the sender's node acked that
/// receipt later than the message was acked, or never (it expired, and stays a dead
/// letter). A node whose receipt expired unread asks the broker about the message,
/// finds it unknown and submits it again byte for byte: this is that submit. The old
/// receipt stays as it was.
pub(super) async fn a_message_id_used_again_gets_its_own_receipt<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let mr = lifecycle().metadata_retention.as_millis() as u64;
    let now = c.now_millis();
    // `late`: the sender acks its receipt an hour after the message was acked;
    // `unread`: the sender never takes its receipt, which expires
    let late = message(NL, BE, Priority::Normal, 10, now);
    let unread = message(NL, NG, Priority::Normal, 10, now);
    submit_ok(s, &late, now).await;
    submit_ok(s, &unread, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    lease_ids(s, NG, 2, 10, now).await;
    s.ack(&pid(BE), &[late.message_id], now).await.unwrap();
    s.ack(&pid(NG), &[unread.message_id], now).await.unwrap();
    let late_dr = MessageId::receipt_for(late.message_id, pb::Outcome::Delivered);
    let unread_dr = MessageId::receipt_for(unread.message_id, pb::Outcome::Delivered);
    let hour = 3_600_000;
    tick(s, now + hour).await;
    let leased = lease_ids(s, NL, 3, 10, now + hour).await;
    assert_eq!(leased.len(), 2);
    assert_eq!(
        s.ack(&pid(NL), &[late_dr], now + hour).await.unwrap(),
        vec![RECEIPT_ACKED]
    );
    // the metadata retention of both messages passes; the receipts stay on record
    tick(s, now + mr).await;
    for m in [&late, &unread] {
        assert!(s.status(&m.sender, m.message_id).await.unwrap().is_none());
    }
    let on_record = |id: MessageId| SearchFilter {
        message_id: Some(id),
        ..SearchFilter::default()
    };
    let mut old: Vec<(u64, State)> = Vec::new();
    for id in [late_dr, unread_dr] {
        let records = s.search(on_record(id)).await.unwrap().records;
        assert_eq!(records.len(), 1, "{records:?}");
        old.push((records[0].broker_seq, records[0].state));
    }
    assert_eq!(old[0].1, State::Acknowledged);
    assert_eq!(old[1].1, State::Expired);

    // both sent again, under their ids: new messages, delivered, each with its receipt
    let t = now + mr + 1_000;
    let mut again_late = late.clone();
    again_late.expires_at = t + hour;
    let mut again_unread = unread.clone();
    again_unread.expires_at = t + hour;
    submit_ok(s, &again_late, t).await;
    submit_ok(s, &again_unread, t).await;
    assert_eq!(lease_ids(s, BE, 4, 10, t).await, vec![late.message_id]);
    assert_eq!(lease_ids(s, NG, 5, 10, t).await, vec![unread.message_id]);
    s.ack(&pid(BE), &[late.message_id], t).await.unwrap();
    s.ack(&pid(NG), &[unread.message_id], t).await.unwrap();
    let got = receipts(s, NL, t).await;
    let mut about: Vec<(MessageId, String, i32)> = got
        .iter()
        .map(|(l, body)| (l.message_id, body.message_id.clone(), body.outcome))
        .collect();
    about.sort();
    let mut want = vec![
        (
            late_dr,
            late.message_id.to_string(),
            pb::Outcome::Delivered as i32,
        ),
        (
            unread_dr,
            unread.message_id.to_string(),
            pb::Outcome::Delivered as i32,
        ),
    ];
    want.sort();
    assert_eq!(
        about, want,
        "the sender gets the receipt of each new message"
    );
    for (_, body) in &got {
        assert_eq!(
            body.at,
            Some(trmx_proto::time::to_timestamp(
                trmx_proto::time::from_millis(t)
            ))
        );
    }
    // the sender's ack settles the new receipts; the old ones stay as they were
    assert_eq!(
        s.ack(&pid(NL), &[late_dr, unread_dr], t).await.unwrap(),
        vec![RECEIPT_ACKED; 2]
    );
    for (id, (seq, state)) in [late_dr, unread_dr].into_iter().zip(old.iter().copied()) {
        let records = s.search(on_record(id)).await.unwrap().records;
        assert_eq!(records.len(), 2, "{records:?}");
        let first = records.iter().find(|r| r.broker_seq == seq).unwrap();
        assert_eq!(first.state, state);
        let second = records.iter().find(|r| r.broker_seq != seq).unwrap();
        assert_eq!(second.state, State::Acknowledged);
    }
    // the old expired receipt is still the only dead letter
    let dead: Vec<MessageId> = s
        .dead_letters(0, None)
        .await
        .unwrap()
        .records
        .iter()
        .map(|r| r.message_id)
        .collect();
    assert_eq!(dead, vec![unread_dr]);
}

/// A receipt that expired unread (its sender's node did not take it for the whole
/// metadata retention) is listed as a dead letter, but not as redrivable, and a redrive
/// of it changes nothing: a redrive gives a recipient's failed delivery another
/// lifetime, and a receipt has had the longest one there is. Its sender's node finds
/// out by itself: it asks about every message it has no receipt for, and submits again
/// one the broker no longer knows (the receipt of that one is its own).
pub(super) async fn an_expired_receipt_is_listed_but_not_redrivable<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let mr = lifecycle().metadata_retention.as_millis() as u64;
    let dlr = lifecycle().dead_letter_retention.as_millis() as u64;
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 10, now);
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    s.ack(&pid(BE), &[m.message_id], now).await.unwrap();
    let dr = MessageId::receipt_for(m.message_id, pb::Outcome::Delivered);
    assert_eq!(tick(s, now + mr).await.expired, 1);
    let dead = s.dead_letters(0, None).await.unwrap().records;
    assert_eq!(dead.len(), 1);
    let listed = &dead[0];
    assert_eq!((listed.message_id, listed.state), (dr, State::Expired));
    assert_eq!(listed.sender, None);
    // never redriven, so nothing may keep its payload (data minimisation)
    assert!(
        !listed.payload_kept,
        "an expired receipt's payload kept: {listed:?}"
    );
    assert!(!listed.redrivable, "listed as redrivable: {listed:?}");
    let at = now + mr + 1_000;
    assert_eq!(
        s.redrive(dr, None, at).await.unwrap(),
        RedriveResult::NotRedrivable {
            state: State::Expired
        }
    );
    let after = s.dead_letters(0, None).await.unwrap().records;
    assert_eq!(after.len(), 1);
    assert_eq!(
        (after[0].state, after[0].state_changed_at, after[0].attempts),
        (State::Expired, listed.state_changed_at, listed.attempts)
    );
    assert!(lease_ids(s, NL, 2, 10, at).await.is_empty());
    // the dead-letter retention finds no payload; the metadata stays as an
    // expired message's, then goes
    let retained = tick(s, now + mr + dlr).await;
    assert_eq!(retained.payloads_deleted, 0, "{retained:?}");
    assert_eq!(s.dead_letters(0, None).await.unwrap().records.len(), 1);
    let gone = tick(s, now + mr + mr.max(dlr)).await;
    assert_eq!(gone.metadata_deleted, 1, "{gone:?}");
    assert!(s.dead_letters(0, None).await.unwrap().records.is_empty());
}

/// A receipt handed to its addressee's stream when it expires (its node took it in the
/// last seconds of the metadata retention): the delivery already carries its payload, so
/// deleting the payload at the expiry takes nothing from it; the lease is reported for
/// the stream to free its slot, the late ack changes nothing, and the store keeps the
/// metadata without the payload, as for one that expired queued.
pub(super) async fn a_receipt_expiring_in_flight_keeps_its_delivery_and_drops_its_payload<
    S: BrokerStore,
>(
    s: &S,
    c: &ManualClock,
) {
    let mr = lifecycle().metadata_retention.as_millis() as u64;
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 10, now);
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    s.ack(&pid(BE), &[m.message_id], now).await.unwrap();
    let dr = MessageId::receipt_for(m.message_id, pb::Outcome::Delivered);
    let leased_at = now + mr - 1_000;
    let delivered = receipts(s, NL, leased_at).await;
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    let (lease, body) = &delivered[0];
    assert_eq!(lease.message_id, dr);
    assert_eq!(body.outcome, pb::Outcome::Delivered as i32);
    let report = tick(s, now + mr).await;
    assert_eq!(report.expired, 1, "{report:?}");
    assert_eq!(
        report
            .expired_in_flight
            .iter()
            .map(|l| (l.recipient.clone(), l.message_id))
            .collect::<Vec<_>>(),
        vec![(pid(NL), dr)],
        "{report:?}"
    );
    assert_eq!(
        s.ack(&pid(NL), &[dr], now + mr + 1).await.unwrap(),
        vec![AckResult::NotFound]
    );
    let dead = s.dead_letters(0, None).await.unwrap().records;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].message_id, dead[0].state), (dr, State::Expired));
    assert!(
        !dead[0].payload_kept && !dead[0].redrivable,
        "{:?}",
        dead[0]
    );
    assert!(lease_ids(s, NL, 2, 10, now + mr + 2).await.is_empty());
}

/// An operator names a receipt by its id alone (a receipt has no sender to name): when
/// a message id was used again after its first message's metadata went, the receipt of
/// the first is still on record under the same id, and the operator's purge or redrive
/// acts on the newest, never answering that the broker sent two messages with that id.
pub(super) async fn an_operator_names_a_receipt_by_its_id_alone<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let mr = lifecycle().metadata_retention.as_millis() as u64;
    let now = c.now_millis();
    let m = message(NL, BE, Priority::Normal, 10, now);
    submit_ok(s, &m, now).await;
    lease_ids(s, BE, 1, 10, now).await;
    s.ack(&pid(BE), &[m.message_id], now).await.unwrap();
    let dr = MessageId::receipt_for(m.message_id, pb::Outcome::Delivered);
    // unread: it expires as the message's metadata goes
    tick(s, now + mr).await;
    let t = now + mr + 1_000;
    let mut again = m.clone();
    again.expires_at = t + 60_000;
    submit_ok(s, &again, t).await;
    lease_ids(s, BE, 2, 10, t).await;
    s.ack(&pid(BE), &[m.message_id], t).await.unwrap();
    assert_eq!(
        s.purge(dr, None, "stuck at the sender", t).await.unwrap(),
        PurgeResult::Purged {
            recipient: pid(NL),
            sender: None
        }
    );
    assert_eq!(
        s.redrive(dr, None, t).await.unwrap(),
        RedriveResult::NotRedrivable {
            state: State::Purged
        }
    );
    // the first one's receipt is as it was
    let dead = s.dead_letters(0, None).await.unwrap().records;
    assert_eq!(
        dead.iter()
            .map(|r| (r.message_id, r.state, r.state_changed_at))
            .collect::<Vec<_>>(),
        vec![(dr, State::Expired, now + mr)]
    );
    assert!(lease_ids(s, NL, 3, 10, t).await.is_empty());
}

/// Two receipts of one participant share an id once a message id was used again after
/// its first message's metadata went (see `a_message_id_used_again_gets_its_own_receipt`).
/// Everything that finds a receipt by id acts on the one it means: the sender's reject
/// dead-letters the new one and leaves the old one's dead letter as it was; the old one's
/// metadata retention deletes it alone, and the new one, still waiting, is found by its
/// id and acknowledged afterwards.
pub(super) async fn receipts_sharing_an_id_are_settled_and_deleted_apart<S: BrokerStore>(
    s: &S,
    c: &ManualClock,
) {
    let mr = lifecycle().metadata_retention.as_millis() as u64;
    let dl = lifecycle().dead_letter_retention.as_millis() as u64;
    let now = c.now_millis();
    // `kept`: its new receipt is acknowledged after the old one's record went;
    // `refused`: its new receipt is rejected by the sender's node
    let kept = message(NL, BE, Priority::Normal, 10, now);
    let refused = message(NL, NG, Priority::Normal, 10, now);
    for (m, to) in [(&kept, BE), (&refused, NG)] {
        submit_ok(s, m, now).await;
        lease_ids(s, to, 1, 10, now).await;
        s.ack(&pid(to), &[m.message_id], now).await.unwrap();
    }
    // NL's node takes neither receipt: both expire as the messages' metadata goes
    tick(s, now + mr).await;
    let t = now + mr + 1_000;
    for (m, to) in [(&kept, BE), (&refused, NG)] {
        let mut again = (*m).clone();
        again.expires_at = t + 60_000;
        submit_ok(s, &again, t).await;
        lease_ids(s, to, 2, 10, t).await;
        s.ack(&pid(to), &[m.message_id], t).await.unwrap();
    }
    let kept_dr = MessageId::receipt_for(kept.message_id, pb::Outcome::Delivered);
    let refused_dr = MessageId::receipt_for(refused.message_id, pb::Outcome::Delivered);
    let records = |id: MessageId| async move {
        let filter = SearchFilter {
            message_id: Some(id),
            ..SearchFilter::default()
        };
        let mut found: Vec<(u64, State, bool)> = s
            .search(filter)
            .await
            .unwrap()
            .records
            .iter()
            .map(|r| (r.broker_seq, r.state, r.payload_kept))
            .collect();
        found.sort_by_key(|(seq, _, _)| *seq);
        found
    };
    let old_refused = records(refused_dr).await[0];
    assert_eq!(old_refused.1, State::Expired);

    let mut leased = lease_ids(s, NL, 3, 10, t).await;
    leased.sort();
    let mut want = vec![kept_dr, refused_dr];
    want.sort();
    assert_eq!(leased, want, "the new receipts only");
    assert_eq!(
        s.reject(&pid(NL), refused_dr, "INVALID_BODY", "receipt", t)
            .await
            .unwrap(),
        RejectResult::Rejected { already: false }
    );
    let after_reject = records(refused_dr).await;
    assert_eq!(after_reject.len(), 2, "{after_reject:?}");
    assert_eq!(after_reject[0], old_refused, "the old receipt is as it was");
    assert_eq!(after_reject[1].1, State::DeadLettered);
    assert!(!after_reject[1].2, "a rejected receipt keeps no payload");

    // the old receipts' metadata goes (the new `kept` one still waits: its lease timed
    // out, and it expires a second later)
    let gone = now + mr + mr.max(dl);
    tick(s, gone).await;
    let left = records(kept_dr).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].1, State::Accepted);
    assert_eq!(
        s.ack(&pid(NL), &[kept_dr], gone).await.unwrap(),
        vec![RECEIPT_ACKED]
    );
    assert_eq!(records(kept_dr).await[0].1, State::Acknowledged);
    assert_eq!(records(refused_dr).await.len(), 1);
    assert!(s.dead_letters(0, None).await.unwrap().records.len() == 1);
}

/// Two senders used one message id (to different recipients) and both messages were
/// delivered: each sender has a delivery receipt, under one id. An operator who names
/// neither is told which participants to choose from, and names one receipt by the
/// participant it goes to (the sender of the message it reports on), as `sender`: a
/// receipt has no other sender to name.
pub(super) async fn a_receipt_id_two_participants_hold_is_named_by_its_participant<
    S: BrokerStore,
>(
    s: &S,
    c: &ManualClock,
) {
    let now = c.now_millis();
    let ours = message(NL, BE, Priority::Normal, 10, now);
    let mut theirs = message(NG, NL, Priority::Normal, 10, now);
    theirs.message_id = ours.message_id;
    for (m, to) in [(&ours, BE), (&theirs, NL)] {
        submit_ok(s, m, now).await;
        assert_eq!(lease_ids(s, to, 1, 10, now).await, vec![m.message_id]);
    }
    for (m, to) in [(&ours, BE), (&theirs, NL)] {
        s.ack(&pid(to), &[m.message_id], now).await.unwrap();
    }
    let dr = MessageId::receipt_for(ours.message_id, pb::Outcome::Delivered);
    assert_eq!(
        s.purge(dr, None, "stuck at the sender", now).await.unwrap(),
        PurgeResult::Ambiguous {
            senders: vec![Some(pid(NL)), Some(pid(NG))]
        }
    );
    assert_eq!(
        s.redrive(dr, None, now).await.unwrap(),
        RedriveResult::Ambiguous {
            senders: vec![Some(pid(NL)), Some(pid(NG))]
        }
    );
    assert_eq!(
        s.purge(dr, Some(&pid(BE)), "stuck at the sender", now)
            .await
            .unwrap(),
        PurgeResult::NotFound
    );
    assert_eq!(
        s.purge(dr, Some(&pid(NG)), "stuck at the sender", now)
            .await
            .unwrap(),
        PurgeResult::Purged {
            recipient: pid(NG),
            sender: None
        }
    );
    assert_eq!(
        s.redrive(dr, Some(&pid(NL)), now).await.unwrap(),
        RedriveResult::NotRedrivable {
            state: State::Accepted
        }
    );
    // NL's receipt is as it was; NG's is gone from its queue
    assert_eq!(lease_ids(s, NL, 2, 10, now).await, vec![dr]);
    assert!(lease_ids(s, NG, 3, 10, now).await.is_empty());
}

mod sled {
    use std::sync::Arc;

    use super::*;

    fn open(dir: &std::path::Path) -> SledStore {
        SledStore::open(
            dir,
            SledOptions {
                cache_capacity_bytes: 8 * 1024 * 1024,
                flush_observer: None,
                writer_nice: 0,
            },
            lifecycle(),
        )
        .unwrap()
    }

    macro_rules! conformance {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                let store = open(dir.path());
                super::$name(&store, &clock()).await;
                store.close().await.unwrap();
                drop(store);
                // and every index still holds what the records imply
                let report = crate::store::verify_store_offline(dir.path()).unwrap();
                assert!(report.is_consistent(), "{report}");
            }
        )*};
    }

    conformance!(
        submit_then_lease_in_priority_and_seq_order,
        idempotent_duplicate_and_conflict,
        quota,
        lease_max_and_one_stream_per_message,
        lease_stops_at_its_byte_budget,
        ack_queues_delivery_receipt,
        reject_dead_letters_with_ndr,
        ack_timeout_redelivers_after_backoff,
        an_empty_payload_is_delivered,
        backoff_runs_from_the_ack_deadline,
        overdue_deadlines_fire_in_time_order,
        many_leases_time_out_in_one_tick,
        max_attempts_dead_letters_with_ndr,
        release_stream_makes_due_at_once,
        repeated_redrives_stay_within_the_longest_lifetime,
        a_stream_closed_by_its_recipient_is_a_failed_attempt,
        expiry_from_accepted_and_in_flight,
        expired_but_not_ticked_is_not_leased,
        withdraw_before_ack_refused_after,
        an_expired_message_can_be_withdrawn,
        status_only_for_the_sender,
        retentions_delete_payload_then_metadata,
        purge_queues_ndr,
        operator_actions_name_one_message,
        stats_and_search,
        oldest_counts_in_flight_and_backing_off,
        oldest_follows_timeouts_redeliveries_and_expiry,
        search_and_dead_letters_page,
        presence_moves_forward_only,
        the_last_run_is_recorded,
        an_ack_at_the_instant_of_expiry_is_one_delivery,
        a_message_expiring_in_flight_gets_one_report,
        a_last_ack_deadline_at_the_expiry_makes_one_report,
        a_re_leased_message_is_not_released_by_its_old_stream,
        a_withdrawn_dead_letter_and_its_unread_report_end_quietly,
        a_redriven_message_counts_only_its_new_deliveries,
        a_clock_set_back_across_a_restart_holds_no_redelivery,
        a_receipt_is_tried_again_past_the_attempt_limit,
        a_message_id_used_again_gets_its_own_receipt,
        an_expired_receipt_is_listed_but_not_redrivable,
        a_receipt_expiring_in_flight_keeps_its_delivery_and_drops_its_payload,
        an_operator_names_a_receipt_by_its_id_alone,
        receipts_sharing_an_id_are_settled_and_deleted_apart,
        a_receipt_id_two_participants_hold_is_named_by_its_participant,
    );

    /// A clock far ahead (a start after days down) makes every timer due at once: one
    /// `tick` applies a bounded number of them, for it runs alone on the writer thread,
    /// which serves no submit, lease or ack meanwhile; the rest stays due (`next_timer`
    /// says so, and the timer loop calls again). In the end each is applied once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timers_due_all_at_once_are_applied_a_bounded_number_per_tick() {
        use crate::store::sled::MAX_TIMERS_PER_TICK;
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(dir.path()));
        let now = clock().now_millis();
        let expires_at = now + 1_000;
        let n = MAX_TIMERS_PER_TICK + 100;
        let mut submits = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Arc::clone(&s);
            let mut m = message(NL, BE, Priority::Normal, 10, now);
            m.expires_at = expires_at;
            submits.push(tokio::spawn(async move { s.submit(m, now).await }));
        }
        for submit in submits {
            assert!(matches!(
                submit.await.unwrap().unwrap(),
                SubmitOutcome::Accepted(_)
            ));
        }
        let at = expires_at + 7 * 86_400_000;
        let first = s.tick(at).await.unwrap();
        assert!(first.expired > 0, "{first:?}");
        assert!(first.expired as usize <= MAX_TIMERS_PER_TICK, "{first:?}");
        assert!(s.next_timer().await.unwrap().is_some_and(|t| t <= at));
        let rest = tick(&*s, at).await;
        assert_eq!((first.expired + rest.expired) as usize, n);
        // one report each
        let stats = s.queue_stats().await.unwrap();
        let to_sender = stats.iter().find(|q| q.recipient == pid(NL)).unwrap();
        assert_eq!(to_sender.depth as usize, n);
        s.close().await.unwrap();
    }

    /// A message's whole life with the broker down across every timer: each reopen
    /// finds the timers that came due meanwhile and applies them in order — the lease
    /// released, the expiry with one report, the payload deleted after the dead-letter
    /// retention, the metadata after the metadata retention — and status says so after
    /// each step.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_timer_due_while_down_is_applied_once_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let life = lifecycle();
        let (dlr, mr) = (
            life.dead_letter_retention.as_millis() as Millis,
            life.metadata_retention.as_millis() as Millis,
        );
        let now = clock().now_millis();
        let mut m = message(NL, BE, Priority::Normal, 10, now);
        m.expires_at = now + 60_000;
        let restart = |at: Millis| {
            let s = open(dir.path());
            async move {
                s.recover(at).await.unwrap();
                tick(&s, at).await;
                s
            }
        };
        let s = open(dir.path());
        submit_ok(&s, &m, now).await;
        assert_eq!(lease_ids(&s, BE, 1, 1, now).await, vec![m.message_id]);
        s.close().await.unwrap();
        drop(s);
        // down past the ack deadline and the expiry
        let expired_at = now + 120_000;
        let s = restart(expired_at).await;
        let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
        assert_eq!((st.state, st.attempts), (State::Expired, 1));
        assert!(st.payload_kept && st.redrivable);
        s.close().await.unwrap();
        drop(s);
        // down past the dead-letter retention
        let s = restart(expired_at + dlr).await;
        let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
        assert_eq!(st.state, State::Expired);
        assert!(!st.payload_kept && !st.redrivable);
        // the one report, still waiting for its reader
        let got = receipts(&s, NL, expired_at + dlr).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.outcome, pb::Outcome::Expired as i32);
        s.close().await.unwrap();
        drop(s);
        // down past the metadata retention: the message is gone, its report expired
        let s = restart(expired_at + mr.max(dlr)).await;
        assert!(s.status(&m.sender, m.message_id).await.unwrap().is_none());
        assert!(receipts(&s, NL, expired_at + mr.max(dlr)).await.is_empty());
        s.close().await.unwrap();
        drop(s);
        let s = restart(expired_at + 10 * mr).await;
        assert_eq!(s.next_timer().await.unwrap(), None);
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_run_survives_a_reopen_and_can_be_accepted_offline() {
        let dir = tempfile::tempdir().unwrap();
        let now = clock().now_millis();
        let s = open(dir.path());
        s.mark_running(now).await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let later = now + 30 * 86_400_000;
        let before = crate::store::accept_clock_offline(dir.path(), later, "test").unwrap();
        assert_eq!(before, Some(now));
        let s = open(dir.path());
        assert_eq!(s.last_running().await.unwrap(), Some(later));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submits_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        super::concurrent_submits_share_flushes(&store, &clock()).await;
    }

    /// Closes `s`, checks that every index holds what the records imply (`store
    /// verify`), and opens the store again.
    async fn verified_reopen(s: SledStore, dir: &std::path::Path) -> SledStore {
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir).unwrap();
        assert!(report.is_consistent(), "{report}");
        open(dir)
    }

    /// Restarts between the steps of this stop's lifecycle flows leave a consistent
    /// store and change none of them: a delivery that expired in flight, its redrive
    /// and delivery, a receipt that expired unread, and its message's id used again
    /// after its metadata went (whose new receipt is made, beside the old one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restarts_amid_expiry_redrive_and_a_reused_id_keep_the_store_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let mr = lifecycle().metadata_retention.as_millis() as u64;
        let now = clock().now_millis();
        let acked = message(NL, BE, Priority::Normal, 10, now);
        let mut short = message(NL, NG, Priority::Normal, 10, now);
        short.expires_at = now + 1_000;
        let s = open(dir.path());
        submit_ok(&s, &acked, now).await;
        submit_ok(&s, &short, now).await;
        lease_ids(&s, BE, 1, 10, now).await;
        lease_ids(&s, NG, 2, 10, now).await;
        s.ack(&pid(BE), &[acked.message_id], now).await.unwrap();
        // expired in flight
        let report = tick(&s, now + 1_000).await;
        assert_eq!(report.expired_in_flight.len(), 1);
        let s = verified_reopen(s, dir.path()).await;
        assert_eq!(s.recover(now + 1_000).await.unwrap(), 0, "no lease left");
        assert_eq!(state_of(&s, &short).await, State::Expired);

        // redriven, then delivered after a restart
        assert!(matches!(
            s.redrive(short.message_id, None, now + 2_000)
                .await
                .unwrap(),
            RedriveResult::Redriven {
                attempts_before: 1,
                ..
            }
        ));
        let s = verified_reopen(s, dir.path()).await;
        s.recover(now + 2_000).await.unwrap();
        let leased = s
            .lease(&pid(NG), StreamId(3), 10, u64::MAX, now + 2_000)
            .await
            .unwrap();
        assert_eq!(
            leased
                .iter()
                .map(|l| (l.message_id, l.attempt))
                .collect::<Vec<_>>(),
            vec![(short.message_id, 1)]
        );
        s.ack(&pid(NG), &[short.message_id], now + 2_000)
            .await
            .unwrap();

        // NL takes no receipt for the whole metadata retention: its receipts expire,
        // the messages' metadata goes
        tick(&s, now + 2_000 + mr).await;
        let s = verified_reopen(s, dir.path()).await;
        assert!(
            s.status(&acked.sender, acked.message_id)
                .await
                .unwrap()
                .is_none()
        );
        // (the delivery receipts of both, and the report of the expiry)
        let dead = s.dead_letters(0, None).await.unwrap().records;
        assert_eq!(dead.len(), 3, "{dead:?}");
        assert!(dead.iter().all(|r| r.sender.is_none() && !r.redrivable));

        // the same message again: a new one, whose receipt NL gets
        let t = now + 3_000 + mr;
        let mut again = acked.clone();
        again.expires_at = t + 60_000;
        submit_ok(&s, &again, t).await;
        let s = verified_reopen(s, dir.path()).await;
        s.recover(t).await.unwrap();
        assert_eq!(lease_ids(&s, BE, 4, 10, t).await, vec![acked.message_id]);
        s.ack(&pid(BE), &[acked.message_id], t).await.unwrap();
        let s = verified_reopen(s, dir.path()).await;
        let got = receipts(&s, NL, t).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            got[0].0.message_id,
            MessageId::receipt_for(acked.message_id, pb::Outcome::Delivered)
        );
        assert_eq!(got[0].1.outcome, pb::Outcome::Delivered as i32);
        assert_eq!(
            got[0].1.at,
            Some(trmx_proto::time::to_timestamp(
                trmx_proto::time::from_millis(t)
            ))
        );
        // the old receipts are as they were
        let still = s.dead_letters(0, None).await.unwrap().records;
        assert_eq!(
            still
                .iter()
                .map(|r| (r.broker_seq, r.state, r.state_changed_at))
                .collect::<Vec<_>>(),
            dead.iter()
                .map(|r| (r.broker_seq, r.state, r.state_changed_at))
                .collect::<Vec<_>>()
        );
        let s = verified_reopen(s, dir.path()).await;
        s.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_restores_queues_in_flight_statuses_and_timers() {
        let dir = tempfile::tempdir().unwrap();
        let c = clock();
        let now = c.now_millis();
        let queued = message(NL, BE, Priority::Normal, 100, now);
        let flying = message(NL, BE, Priority::Urgent, 100, now);
        let mut short = message(NG, BE, Priority::Normal, 100, now);
        short.expires_at = now + 600_000;
        let acked = message(NG, NL, Priority::Normal, 100, now);
        let s = open(dir.path());
        submit_ok(&s, &flying, now).await;
        assert_eq!(lease_ids(&s, BE, 1, 1, now).await, vec![flying.message_id]);
        submit_ok(&s, &queued, now).await;
        submit_ok(&s, &short, now).await;
        submit_ok(&s, &acked, now).await;
        lease_ids(&s, NL, 1, 1, now).await;
        s.ack(&pid(NL), &[acked.message_id], now).await.unwrap();
        let before = s.queue_stats().await.unwrap();
        s.close().await.unwrap();
        assert!(matches!(
            s.submit(message(NL, BE, Priority::Normal, 1, now), now)
                .await,
            Err(ChangeError {
                error: StoreError::Unavailable(_),
                committed: None,
            })
        ));
        drop(s);

        let s = open(dir.path());
        assert_eq!(s.queue_stats().await.unwrap(), before);
        assert_eq!(state_of(&s, &flying).await, State::InFlight);
        assert_eq!(state_of(&s, &acked).await, State::Acknowledged);
        // the lease of the previous process is due again at once
        assert_eq!(s.recover(now).await.unwrap(), 1);
        let leased = s
            .lease(&pid(BE), StreamId(7), 10, u64::MAX, now)
            .await
            .unwrap();
        let ids: Vec<_> = leased.iter().map(|l| l.message_id).collect();
        assert_eq!(
            ids,
            vec![flying.message_id, queued.message_id, short.message_id]
        );
        assert_eq!(leased[0].attempt, 2);
        assert_eq!(leased[1].payload, queued.payload);
        // the receipt of the ack survived
        let got = receipts(&s, NG, now).await;
        assert_eq!(got.len(), 1);
        // timers survived: the expiry of `short` and the ack deadlines
        assert_eq!(s.next_timer().await.unwrap(), Some(now + 30_000));
        // idempotency survived
        assert!(matches!(
            s.submit(queued.clone(), now).await.unwrap(),
            SubmitOutcome::Duplicate(_)
        ));
        let sighting = Presence {
            participant: pid(BE),
            last_seen: now,
            cert_not_after: Some(now + 86_400_000),
        };
        s.save_presence(vec![sighting.clone()]).await.unwrap();
        s.close().await.unwrap();
        drop(s);

        let s = open(dir.path());
        assert_eq!(s.presence().await.unwrap(), vec![sighting]);
        let report = s.tick(now + 600_000).await.unwrap();
        assert_eq!(report.expired, 1);
        assert_eq!(state_of(&s, &short).await, State::Expired);
        s.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_message_is_on_disk_when_its_submit_is_answered() {
        // sled keeps a value over a quarter of a segment (128 KiB) in a file
        // of its own, which its flush never syncs: the store's flush must.
        let dir = tempfile::tempdir().unwrap();
        let now = clock().now_millis();
        let life = Lifecycle {
            max_queued_bytes_per_sender: 4 << 20,
            ..lifecycle()
        };
        let s = SledStore::open(dir.path(), SledOptions::default(), life).unwrap();
        submit_ok(&s, &message(NL, BE, Priority::Normal, 4096, now), now).await;
        assert_eq!(s.blob_files_synced(), 0);
        let large = message(NL, BE, Priority::Normal, 1 << 20, now);
        submit_ok(&s, &large, now).await;
        assert!(s.blob_files_synced() >= 1);
        s.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_whose_files_cannot_be_synced_refuses_work() {
        let dir = tempfile::tempdir().unwrap();
        let now = clock().now_millis();
        let s = open(dir.path());
        let before = message(NL, BE, Priority::Normal, 100, now);
        submit_ok(&s, &before, now).await;
        // (what an operator's clean-up of the data directory could do)
        std::fs::remove_dir_all(dir.path().join("blobs")).unwrap();
        let err = s
            .submit(message(NL, BE, Priority::Normal, 100, now), now)
            .await
            .expect_err("not durable");
        assert!(
            matches!(&err.error, StoreError::Unavailable(why) if why.contains("blobs")),
            "{err:?}"
        );
        // and it stays so: a new blob directory would not be watched
        assert!(matches!(
            s.submit(message(NG, BE, Priority::Normal, 100, now), now)
                .await,
            Err(ChangeError {
                error: StoreError::Unavailable(_),
                committed: None,
            })
        ));
        assert_eq!(state_of(&s, &before).await, State::Accepted);
    }

    /// The store holds personal data: its directory is its owner's only,
    /// made so or narrowed when it was open to others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_data_directory_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = root.path().join("fresh");
        let open_dir = root.path().join("open");
        std::fs::create_dir(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for dir in [&fresh, &open_dir] {
            let s = open(dir);
            submit_ok(&s, &message(NL, BE, Priority::Normal, 10, 0), 0).await;
            s.close().await.unwrap();
            assert_eq!(mode(dir), 0o700, "{}", dir.display());
        }
    }

    /// A panic on the flusher thread (in sled, say) is a failed flush for
    /// everybody waiting and every later write, not a hang.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flusher_that_panics_fails_the_writes_instead_of_hanging_them() {
        let dir = tempfile::tempdir().unwrap();
        let c = clock();
        let now = c.now_millis();
        let s = SledStore::open(
            dir.path(),
            SledOptions {
                cache_capacity_bytes: 8 * 1024 * 1024,
                flush_observer: Some(FlushObserver(Arc::new(|_| {
                    panic!("the flush went wrong (test)")
                }))),
                writer_nice: 0,
            },
            lifecycle(),
        )
        .unwrap();
        for _ in 0..2 {
            let m = message(NL, BE, Priority::Normal, 100, now);
            let answer = tokio::time::timeout(Duration::from_secs(10), s.submit(m, now))
                .await
                .expect("answered, not hung");
            assert!(
                matches!(
                    answer,
                    Err(ChangeError {
                        error: StoreError::Unavailable(_),
                        ..
                    })
                ),
                "{answer:?}"
            );
        }
        tokio::time::timeout(Duration::from_secs(10), s.close())
            .await
            .expect("closed, not hung")
            .ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_flush_is_unavailable_until_a_flush_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let c = clock();
        let now = c.now_millis();
        let s = open(dir.path());
        let faults = s.fault_switch();
        let before = message(NL, BE, Priority::Normal, 100, now);
        submit_ok(&s, &before, now).await;

        faults.set_failing(true);
        let m = message(NL, BE, Priority::Normal, 100, now);
        let failed = s.submit(m.clone(), now).await.unwrap_err();
        assert!(
            matches!(failed.error, StoreError::Unavailable(_)),
            "{failed:?}"
        );
        // every later write is refused without being attempted
        let other = message(NG, BE, Priority::Normal, 100, now);
        assert!(matches!(
            s.submit(other.clone(), now).await,
            Err(ChangeError {
                error: StoreError::Unavailable(_),
                committed: None,
            })
        ));
        assert!(
            s.status(&other.sender, other.message_id)
                .await
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            s.lease(&pid(BE), StreamId(1), 10, u64::MAX, now).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            s.ack(&pid(BE), &[before.message_id], now).await,
            Err(ChangeError {
                error: StoreError::Unavailable(_),
                committed: None,
            })
        ));
        assert!(matches!(
            s.tick(now).await,
            Err(TickError {
                error: StoreError::Unavailable(_),
                ..
            })
        ));
        // reads still work
        assert_eq!(state_of(&s, &before).await, State::Accepted);

        faults.set_failing(false);
        // the write answered Unavailable may or may not have happened (it says which);
        // a retry is idempotent: a duplicate of the message it stored
        let retried = s.submit(m.clone(), now).await.unwrap();
        match failed.committed {
            Some(SubmitOutcome::Accepted(first)) => {
                assert_eq!(retried, SubmitOutcome::Duplicate(first));
            }
            None => assert!(matches!(retried, SubmitOutcome::Accepted(_)), "{retried:?}"),
            Some(other) => panic!("a fresh message's submit committed {other:?}"),
        }
        submit_ok(&s, &other, now).await;
        assert_eq!(lease_ids(&s, BE, 1, 10, now).await.len(), 3);
        s.close().await.unwrap();
    }

    /// A store with messages in every kind of state, and garbage for sled
    /// to drop (acknowledged 4 KiB messages). Returns the highest seq given.
    async fn store_with_history(
        path: &std::path::Path,
        now: Millis,
        flying: &NewMessage,
        queued: &NewMessage,
        acked: &NewMessage,
    ) -> u64 {
        let s = open(path);
        let mut last = submit_ok(&s, flying, now).await.broker_seq;
        assert_eq!(lease_ids(&s, BE, 1, 1, now).await, vec![flying.message_id]);
        last = last.max(submit_ok(&s, queued, now).await.broker_seq);
        last = last.max(submit_ok(&s, acked, now).await.broker_seq);
        // (in rounds: the suite's sender quota is 64 KiB)
        for round in 0..30 {
            for _ in 0..10 {
                let m = message(NG, NL, Priority::Normal, 4096, now);
                last = last.max(submit_ok(&s, &m, now).await.broker_seq);
            }
            let ids = lease_ids(&s, NL, 2, 1000, now).await;
            assert_eq!(ids.len(), if round == 0 { 11 } else { 10 });
            s.ack(&pid(NL), &ids, now).await.unwrap();
        }
        s.close().await.unwrap();
        last
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_keeps_every_message_and_new_seqs_stay_above_the_old() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("data");
        let now = clock().now_millis();
        let flying = message(NL, BE, Priority::Urgent, 100, now);
        let queued = message(NL, BE, Priority::Normal, 100, now);
        let acked = message(NG, NL, Priority::Normal, 100, now);
        let last = store_with_history(&path, now, &flying, &queued, &acked).await;
        let s = open(&path);
        let stats = s.queue_stats().await.unwrap();
        let audit = s.audit_verify().await.unwrap();
        // refused while a store runs on the directory
        match compact_offline(&path, None) {
            Err(StoreError::Open { reason, .. }) => assert!(reason.contains("locked"), "{reason}"),
            other => panic!("expected a locked directory, got {other:?}"),
        }
        s.close().await.unwrap();
        drop(s);

        let report = compact_offline(&path, None).unwrap();
        assert_eq!(report.compacted, path);
        assert!(report.bytes_after < report.bytes_before, "{report:?}");
        let kept = report.original_kept_at.clone().unwrap();
        assert!(kept.join("db").exists(), "the original is kept: {report:?}");
        assert!(!path.with_file_name("data.compacting").exists());

        let s = open(&path);
        assert_eq!(s.queue_stats().await.unwrap(), stats);
        assert_eq!(state_of(&s, &flying).await, State::InFlight);
        assert_eq!(state_of(&s, &acked).await, State::Acknowledged);
        let verified = s.audit_verify().await.unwrap();
        assert_eq!(verified.first_broken, None, "{verified:?}");
        assert_eq!(
            (verified.records, verified.head_hash),
            (audit.records, audit.head_hash)
        );
        // a new message gets a seq above every old one, and queues behind them
        let fresh = message(NL, BE, Priority::Normal, 100, now);
        let fresh_seq = submit_ok(&s, &fresh, now).await.broker_seq;
        assert!(fresh_seq > last, "{fresh_seq} <= {last}");
        assert_eq!(s.recover(now).await.unwrap(), 1);
        assert_eq!(
            lease_ids(&s, BE, 3, 10, now).await,
            vec![flying.message_id, queued.message_id, fresh.message_id]
        );
        s.close().await.unwrap();
        drop(s);

        // compacted again: the floor keeps growing
        compact_offline(&path, None).unwrap();
        let s = open(&path);
        let later = message(NG, BE, Priority::Normal, 100, now);
        assert!(submit_ok(&s, &later, now).await.broker_seq > fresh_seq);
        assert_eq!(state_of(&s, &fresh).await, State::InFlight);
        s.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_through_a_symlink_swaps_the_directory_it_points_at() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        let link = root.path().join("link");
        let now = clock().now_millis();
        let flying = message(NL, BE, Priority::Urgent, 100, now);
        let queued = message(NL, BE, Priority::Normal, 100, now);
        let acked = message(NG, NL, Priority::Normal, 100, now);
        store_with_history(&real, now, &flying, &queued, &acked).await;
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let report = compact_offline(&link, None).unwrap();
        assert_eq!(report.compacted, real.canonicalize().unwrap());
        let kept = report.original_kept_at.unwrap();
        assert_eq!(kept.parent(), real.canonicalize().unwrap().parent());
        assert!(link.is_symlink() && kept.join("db").exists());
        let s = open(&link);
        assert_eq!(state_of(&s, &queued).await, State::Accepted);
        s.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_to_an_output_directory_leaves_the_original_alone() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("data");
        let out = root.path().join("copy");
        let now = clock().now_millis();
        let flying = message(NL, BE, Priority::Urgent, 100, now);
        let queued = message(NL, BE, Priority::Normal, 100, now);
        let acked = message(NG, NL, Priority::Normal, 100, now);
        let last = store_with_history(&path, now, &flying, &queued, &acked).await;
        // a directory left by an interrupted run is not overwritten
        let leftover = root.path().join("data.compacting");
        std::fs::create_dir(&leftover).unwrap();
        match compact_offline(&path, None) {
            Err(StoreError::Open { path, reason }) => {
                assert_eq!(path, leftover.display().to_string());
                assert!(reason.contains("already exists"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let report = compact_offline(&path, Some(&out)).unwrap();
        assert_eq!(
            (report.compacted.clone(), report.original_kept_at),
            (out.clone(), None)
        );
        for dir in [&path, &out] {
            let s = open(dir);
            assert_eq!(state_of(&s, &queued).await, State::Accepted);
            assert_eq!(state_of(&s, &acked).await, State::Acknowledged);
            let next = message(NL, NG, Priority::Normal, 1, now);
            assert!(submit_ok(&s, &next, now).await.broker_seq > last);
            s.close().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_errors_name_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        match SledStore::open(dir.path(), SledOptions::default(), lifecycle()) {
            Err(StoreError::Open { path, reason }) => {
                assert_eq!(path, dir.path().display().to_string());
                assert!(reason.contains("locked"), "{reason}");
            }
            other => panic!("expected Open error, got {other:?}"),
        }
        s.close().await.unwrap();
        drop(s);
        // a file where the directory should be
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            SledStore::open(&file, SledOptions::default(), lifecycle()),
            Err(StoreError::Open { .. })
        ));
    }
}
