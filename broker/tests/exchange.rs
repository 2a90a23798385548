//! The `Exchange` semantics of DESIGN.md §3 over real mutual TLS.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tonic::Code;
use trmx_proto::envelope::check_delivery;
use trmx_proto::time::to_timestamp;
use trmx_proto::{Kind, MessageId, pb};

use crate::harness::*;

#[tokio::test]
async fn offline_recipient_receives_on_connect_and_the_sender_gets_a_receipt() -> anyhow::Result<()>
{
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;

    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    let receipt1 = submit(&mut nl, env.clone()).await?;
    assert_eq!(receipt1.message_id, id);
    assert!(!receipt1.duplicate);
    assert!(receipt1.accepted_at.is_some() && receipt1.expires_at.is_some());
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::Accepted);

    // Same content again: the first receipt, marked duplicate.
    let again = submit(&mut nl, env.clone()).await?;
    assert!(again.duplicate);
    assert_eq!(again.broker_seq, receipt1.broker_seq);
    assert_eq!(again.accepted_at, receipt1.accepted_at);
    // The sender may name itself.
    let mut named = env.clone();
    named.sender = "NL-NRM".into();
    assert!(submit(&mut nl, named).await?.duplicate);
    // Different content under the same id.
    let mut changed = env.clone();
    changed.priority = pb::Priority::Urgent as i32;
    assert_code(
        submit(&mut nl, changed).await,
        Code::AlreadyExists,
        "reused id",
    );

    // The recipient connects and gets it, with the broker-set fields filled in.
    let mut stream = receive(&mut be, 0).await?;
    let delivery = next(&mut stream).await?;
    assert_eq!(delivery.attempt, 1);
    let got = delivery.envelope.clone().expect("envelope");
    assert_eq!(got.message_id, id);
    assert_eq!(got.sender, "NL-NRM");
    assert_eq!(got.payload, env.payload);
    assert_eq!(got.broker_seq, receipt1.broker_seq);
    assert_eq!(got.accepted_at, receipt1.accepted_at);
    check_delivery(&got)?;
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::InFlight);
    expect_quiet(&mut stream).await?; // exactly once

    assert_eq!(
        ack(&mut be, [&id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    // acknowledging twice is harmless
    assert_eq!(
        ack(&mut be, [&id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    let st = status(&mut nl, &id).await?;
    assert_eq!(st.state, pb::MessageState::Acknowledged as i32);
    assert_eq!(st.attempts, 1);
    assert!(st.last_delivered_at.is_some());

    // The sender's delivery receipt.
    let mut nl_stream = receive(&mut nl, 0).await?;
    let delivery = next(&mut nl_stream).await?;
    let (kind, receipt) = receipt(&delivery)?;
    assert_eq!(kind, Kind::DeliveryReceipt);
    assert_eq!(receipt.message_id, id);
    assert_eq!(receipt.outcome, pb::Outcome::Delivered as i32);
    assert_eq!(receipt.attempts, 1);
    let receipt_id = id_of(&delivery);
    assert_eq!(
        receipt_id,
        MessageId::receipt_id(MessageId::parse(&id)?, "DELIVERED").to_string()
    );
    assert_eq!(
        delivery.envelope.as_ref().map(|e| e.case_ref.clone()),
        Some(env.case_ref)
    );
    // acknowledging a receipt causes no receipt
    assert_eq!(
        ack(&mut nl, &[receipt_id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    let mut be_again = receive(&mut be, 0).await?;
    expect_quiet(&mut be_again).await?;
    expect_quiet(&mut nl_stream).await?;
    Ok(())
}

#[tokio::test]
async fn urgent_first_then_acceptance_order() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut expected_normal = Vec::new();
    for _ in 0..3 {
        let env = referral("BE-PAYOKE");
        expected_normal.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    let mut urgent = referral("BE-PAYOKE");
    urgent.priority = pb::Priority::Urgent as i32;
    let urgent_id = urgent.message_id.clone();
    submit(&mut nl, urgent).await?;

    let mut stream = receive(&mut be, 10).await?;
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(id_of(&next(&mut stream).await?));
    }
    assert_eq!(order[0], urgent_id);
    assert_eq!(order[1..], expected_normal[..]);
    Ok(())
}

#[tokio::test]
async fn max_in_flight_is_respected_and_two_streams_never_share_a_message() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut be2 = t.client("BE-PAYOKE")?;
    let mut all = HashSet::new();
    for _ in 0..10 {
        let env = referral("BE-PAYOKE");
        all.insert(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    let mut a = receive(&mut be, 3).await?;
    let mut b = receive(&mut be2, 3).await?;
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..3 {
        got_a.push(id_of(&next(&mut a).await?));
        got_b.push(id_of(&next(&mut b).await?));
    }
    expect_quiet(&mut a).await?;
    expect_quiet(&mut b).await?;
    let set_a: HashSet<_> = got_a.iter().cloned().collect();
    let set_b: HashSet<_> = got_b.iter().cloned().collect();
    assert_eq!(set_a.len(), 3);
    assert!(
        set_a.is_disjoint(&set_b),
        "a message was in flight on two streams"
    );

    // Acknowledging frees slots on that stream only.
    assert!(
        ack(&mut be, &got_a)
            .await?
            .iter()
            .all(|r| *r == pb::AckResult::Acknowledged)
    );
    let mut more_a = HashSet::new();
    for _ in 0..3 {
        more_a.insert(id_of(&next(&mut a).await?));
    }
    expect_quiet(&mut b).await?;
    assert!(more_a.is_disjoint(&set_a) && more_a.is_disjoint(&set_b));

    // Closing stream b with its three unacknowledged: a failed attempt each
    // (DESIGN.md §4), due again after the backoff (1 s here), then delivered
    // on stream a's free slots. Meanwhile a gets the one never leased.
    drop(b);
    let acked: Vec<String> = more_a.iter().cloned().collect();
    ack(&mut be, &acked).await?;
    let never_leased = id_of(&next(&mut a).await?);
    assert!(!set_b.contains(&never_leased));
    expect_quiet(&mut a).await?;
    t.advance(std::time::Duration::from_secs(1));
    let mut released = HashSet::new();
    for _ in 0..2 {
        let delivery = next(&mut a).await?;
        assert_eq!(delivery.attempt, 2, "delivered before, on stream b");
        released.insert(id_of(&delivery));
    }
    assert!(released.is_subset(&set_b));
    let seen: HashSet<_> = set_a
        .iter()
        .chain(&more_a)
        .chain(&released)
        .chain([&never_leased])
        .cloned()
        .collect();
    assert!(seen.is_subset(&all));
    assert_eq!(seen.len(), 9);
    Ok(())
}

#[tokio::test]
async fn ack_reports_per_id_and_never_touches_anothers_message() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut iom = t.client("INT-IOM")?;

    let to_be = referral("BE-PAYOKE");
    let to_iom = envelope("INT-IOM", Kind::FollowUp, b"follow up");
    submit(&mut nl, to_be.clone()).await?;
    submit(&mut nl, to_iom.clone()).await?;
    let mut be_stream = receive(&mut be, 0).await?;
    let mut iom_stream = receive(&mut iom, 0).await?;
    assert_eq!(id_of(&next(&mut be_stream).await?), to_be.message_id);
    assert_eq!(id_of(&next(&mut iom_stream).await?), to_iom.message_id);

    let results = ack(
        &mut be,
        &[
            to_be.message_id.clone(),
            to_iom.message_id.clone(),
            MessageId::new_v7().to_string(),
            "not-an-id".into(),
        ],
    )
    .await?;
    assert_eq!(
        results,
        vec![
            pb::AckResult::Acknowledged,
            pb::AckResult::NotFound,
            pb::AckResult::NotFound,
            pb::AckResult::InvalidId
        ]
    );
    assert_eq!(
        state_of(&mut nl, &to_be.message_id).await?,
        pb::MessageState::Acknowledged
    );
    assert_eq!(
        state_of(&mut nl, &to_iom.message_id).await?,
        pb::MessageState::InFlight
    );
    assert_eq!(
        ack(&mut iom, [&to_iom.message_id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    Ok(())
}

#[tokio::test]
async fn get_status_is_for_the_sender_only() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    submit(&mut nl, env.clone()).await?;
    let st = status(&mut nl, &env.message_id).await?;
    assert_eq!(st.recipient, "BE-PAYOKE");
    assert_eq!(st.kind, pb::MessageKind::Referral as i32);
    assert_eq!(st.payload_size, env.payload.len() as u64);
    // not even the recipient sees the sender's status
    assert_code(
        status(&mut be, &env.message_id).await,
        Code::NotFound,
        "recipient asks",
    );
    assert_code(
        status(&mut nl, &MessageId::new_v7().to_string()).await,
        Code::NotFound,
        "unknown id",
    );
    assert_code(status(&mut nl, "x").await, Code::InvalidArgument, "bad id");
    Ok(())
}

#[tokio::test]
async fn reject_dead_letters_and_reports_the_reason_to_the_sender() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    let mut stream = receive(&mut be, 0).await?;
    next(&mut stream).await?;

    let reject = |code: &str, path: &str, id: &str| pb::RejectRequest {
        message_id: id.into(),
        reason_code: code.into(),
        field_path: path.into(),
    };
    for (request, what) in [
        (
            reject("invalid body", "referral.consent", &id),
            "reason code",
        ),
        (
            reject("INVALID_BODY", "referral..consent", &id),
            "field path",
        ),
        (
            reject("INVALID_BODY", "name=Jane Doe", &id),
            "field path with a value",
        ),
        (reject("INVALID_BODY", "", "nope"), "message id"),
        (
            reject("MAX_ATTEMPTS", "referral.consent", &id),
            "the broker's own reason code",
        ),
    ] {
        assert_code(be.reject(request).await, Code::InvalidArgument, what);
    }
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::InFlight);
    // someone else cannot reject it
    let mut iom = t.client("INT-IOM")?;
    assert_code(
        iom.reject(reject("INVALID_BODY", "", &id)).await,
        Code::NotFound,
        "foreign reject",
    );

    be.reject(reject("INVALID_BODY", "referral.consent.basis", &id))
        .await?;
    let st = status(&mut nl, &id).await?;
    assert_eq!(st.state, pb::MessageState::DeadLettered as i32);
    assert_eq!(st.field_path, "referral.consent.basis");

    let mut nl_stream = receive(&mut nl, 0).await?;
    let (kind, receipt) = receipt(&next(&mut nl_stream).await?)?;
    assert_eq!(kind, Kind::NonDeliveryReport);
    assert_eq!(receipt.message_id, id);
    assert_eq!(receipt.outcome, pb::Outcome::RejectedByRecipient as i32);
    assert!(
        receipt.reason_code.contains("INVALID_BODY"),
        "{}",
        receipt.reason_code
    );
    assert_eq!(receipt.field_path, "referral.consent.basis");
    assert_eq!(receipt.attempts, 1);
    Ok(())
}

#[tokio::test]
async fn withdrawn_messages_never_reach_the_recipient() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    let withdraw = |id: &str| pb::WithdrawRequest {
        message_id: id.into(),
    };
    // only the sender can withdraw it
    assert_code(
        be.withdraw(withdraw(&id)).await,
        Code::NotFound,
        "foreign withdraw",
    );
    let withdrawn = nl.withdraw(withdraw(&id)).await?.into_inner();
    assert!(withdrawn.withdrawn_at.is_some());
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::Withdrawn);
    let mut stream = receive(&mut be, 0).await?;
    expect_quiet(&mut stream).await?;
    // no receipt for a withdrawal
    let mut nl_stream = receive(&mut nl, 0).await?;
    expect_quiet(&mut nl_stream).await?;

    // an acknowledged message cannot be withdrawn any more
    let env = referral("BE-PAYOKE");
    let acked = env.message_id.clone();
    submit(&mut nl, env).await?;
    assert_eq!(id_of(&next(&mut stream).await?), acked);
    ack(&mut be, [&acked]).await?;
    assert_code(
        nl.withdraw(withdraw(&acked)).await,
        Code::FailedPrecondition,
        "after ack",
    );
    assert_code(
        nl.withdraw(withdraw(&MessageId::new_v7().to_string()))
            .await,
        Code::NotFound,
        "unknown",
    );

    // an in-flight message withdrawn: the recipient cannot ack it
    let env = referral("BE-PAYOKE");
    let in_flight = env.message_id.clone();
    submit(&mut nl, env).await?;
    assert_eq!(id_of(&next(&mut stream).await?), in_flight);
    nl.withdraw(withdraw(&in_flight)).await?;
    assert_eq!(
        ack(&mut be, [&in_flight]).await?,
        vec![pb::AckResult::NotFound]
    );
    assert_eq!(
        state_of(&mut nl, &in_flight).await?,
        pb::MessageState::Withdrawn
    );
    Ok(())
}

/// A message withdrawn by its sender, or purged by an operator, while its delivery waits
/// in the broker's send buffer (a slow link: the recipient's HTTP/2 window is full) is
/// dropped there, never sent: the recipient gets everything else, in order, and not it.
#[tokio::test]
async fn a_message_withdrawn_while_waiting_to_be_sent_is_not_sent() -> anyhow::Result<()> {
    taken_back_while_waiting_to_be_sent(false).await
}

#[tokio::test]
async fn a_message_purged_while_waiting_to_be_sent_is_not_sent() -> anyhow::Result<()> {
    taken_back_while_waiting_to_be_sent(true).await
}

/// See [`a_message_withdrawn_while_waiting_to_be_sent_is_not_sent`]: withdrawn by its
/// sender, or with `purge` purged by an operator.
async fn taken_back_while_waiting_to_be_sent(purge: bool) -> anyhow::Result<()> {
    // the stream takes everything, and is not read
    let (t, mut nl, mut stream, fillers, misaddressed) = stuck_stream(|_| {}, 50).await?;
    let gone = if purge {
        crate::operator::operator(&t)?
            .purge(pb::PurgeRequest {
                message_id: misaddressed.clone(),
                reason: "misaddressed, sender asked by phone".into(),
                ..Default::default()
            })
            .await?;
        pb::MessageState::Purged
    } else {
        nl.withdraw(pb::WithdrawRequest {
            message_id: misaddressed.clone(),
        })
        .await?;
        pb::MessageState::Withdrawn
    };

    for id in &fillers {
        assert_eq!(&id_of(&next(&mut stream).await?), id, "purge: {purge}");
    }
    expect_quiet(&mut stream).await?;
    assert_eq!(state_of(&mut nl, &misaddressed).await?, gone);
    Ok(())
}

/// A stuck stream (its HTTP/2 window full: more than the client's stream window of 2 MiB
/// and what HTTP/2 holds beside it) with `messages` filler follow-ups and one referral to
/// BE-PAYOKE, all leased into it: the broker, the sender's client, the stream, the
/// fillers' ids and the referral's.
pub(crate) async fn stuck_stream(
    adjust: impl FnOnce(&mut trmx_broker::config::BrokerConfig),
    messages: usize,
) -> anyhow::Result<StuckStream> {
    stuck_stream_with(adjust, messages, 64, |_, _| {}).await
}

/// What [`stuck_stream`] gives.
pub(crate) type StuckStream = (
    TestBroker,
    Client,
    tonic::Streaming<pb::Delivery>,
    Vec<String>,
    String,
);

/// [`stuck_stream`], the recipient asking for `max_in_flight`, with the referral adjusted
/// by `referral_adjust` (given the broker's clock's now) before it is submitted.
async fn stuck_stream_with(
    adjust: impl FnOnce(&mut trmx_broker::config::BrokerConfig),
    messages: usize,
    max_in_flight: u32,
    referral_adjust: impl FnOnce(&mut pb::Envelope, SystemTime),
) -> anyhow::Result<StuckStream> {
    let t = TestBroker::start_with(|c| {
        c.limits.receive_buffer_bytes = 16 << 20;
        adjust(c);
    })
    .await?;
    stuck_on(t, messages, max_in_flight, referral_adjust).await
}

/// [`stuck_stream_with`] on the broker `t`, started with `limits.receive_buffer_bytes`
/// of 16 MiB.
async fn stuck_on(
    t: TestBroker,
    messages: usize,
    max_in_flight: u32,
    referral_adjust: impl FnOnce(&mut pb::Envelope, SystemTime),
) -> anyhow::Result<StuckStream> {
    stuck_on_with(t, messages, 60 << 10, max_in_flight, referral_adjust).await
}

/// [`stuck_on`] with fillers of `filler_bytes` each (within the broker's
/// `limits.max_envelope_bytes`).
async fn stuck_on_with(
    t: TestBroker,
    messages: usize,
    filler_bytes: usize,
    max_in_flight: u32,
    referral_adjust: impl FnOnce(&mut pb::Envelope, SystemTime),
) -> anyhow::Result<StuckStream> {
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let filler = vec![7u8; filler_bytes];
    let mut fillers = Vec::new();
    for _ in 0..messages {
        let env = envelope("BE-PAYOKE", Kind::FollowUp, &filler);
        fillers.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    let mut env = referral("BE-PAYOKE");
    referral_adjust(&mut env, trmx_broker::clock::Clock::now(&t.clock));
    let misaddressed = env.message_id.clone();
    submit(&mut nl, env).await?;
    let stream = receive(&mut be, max_in_flight).await?;
    until_state(
        &mut nl,
        &misaddressed,
        pb::MessageState::InFlight,
        "never leased",
    )
    .await?;
    Ok((t, nl, stream, fillers, misaddressed))
}

/// Waits (at most [`WAIT`]) until the sender's message `id` is in `state`; fails saying
/// what did not happen (`what`).
async fn until_state(
    client: &mut Client,
    id: &str,
    state: pb::MessageState,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while state_of(client, id).await? != state {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Every delivery until the stream is quiet.
async fn read_until_quiet(stream: &mut tonic::Streaming<pb::Delivery>) -> Vec<String> {
    let mut ids = Vec::new();
    while let Ok(Ok(Some(delivery))) = tokio::time::timeout(QUIET, stream.message()).await {
        ids.push(id_of(&delivery));
    }
    ids
}

/// How a stream ends on the broker's side in
/// [`a_stream_ended_by_the_broker_sends_nothing_after_its_leases_are_released`].
#[derive(Debug, Clone, Copy)]
enum BrokerEnds {
    /// Its participant leaves the registry (a reload).
    Reload,
    /// Its task panics (a bug), in a lease.
    Panic,
}

/// A stream that the broker ends (its participant left the registry, its task panicked)
/// while deliveries wait in its send buffer (a slow link) has its leases released: due
/// again at once, and no longer reachable through the stream, which is gone from the
/// broker's table. What waited in the buffer must not be sent after that, as the node reads
/// on: a message withdrawn since would reach the organisation its sender took it back from
/// (as here), and one leased again to another stream would be in flight on two at once. The
/// stream ends with its status once what was already handed to the connection is read.
#[tokio::test]
async fn a_stream_ended_by_a_reload_sends_nothing_after_its_leases_are_released()
-> anyhow::Result<()> {
    a_stream_ended_by_the_broker_sends_nothing_after_its_leases_are_released(BrokerEnds::Reload)
        .await
}

#[tokio::test]
async fn a_stream_whose_task_panics_sends_nothing_after_its_leases_are_released()
-> anyhow::Result<()> {
    a_stream_ended_by_the_broker_sends_nothing_after_its_leases_are_released(BrokerEnds::Panic)
        .await
}

/// See [`a_stream_ended_by_a_reload_sends_nothing_after_its_leases_are_released`].
async fn a_stream_ended_by_the_broker_sends_nothing_after_its_leases_are_released(
    how: BrokerEnds,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;

    let (t, store) = TestBroker::start_with_faulty_store_and(|c| {
        c.limits.receive_buffer_bytes = 16 << 20;
    })
    .await?;
    let (t, mut nl, mut stream, fillers, misaddressed) = stuck_on(t, 50, 64, |_, _| {}).await?;
    let expected = match how {
        BrokerEnds::Reload => {
            let others: Vec<_> = t
                .config
                .participants
                .iter()
                .filter(|p| p.id != "BE-PAYOKE")
                .cloned()
                .collect();
            t.broker.reload_registry(&others)?;
            Code::PermissionDenied
        }
        BrokerEnds::Panic => {
            // the stream has slots free and room: a new message makes it lease
            store.lease_panics_after.store(0, SeqCst);
            submit(&mut nl, envelope("BE-PAYOKE", Kind::FollowUp, b"nudge")).await?;
            Code::Unavailable
        }
    };
    // released, and the stream gone from the broker's table
    until_state(
        &mut nl,
        &misaddressed,
        pb::MessageState::Accepted,
        "the stream's leases were never released",
    )
    .await?;
    let mut op = crate::operator::operator(&t)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let queues = op.list_queues(pb::ListQueuesRequest {}).await?.into_inner();
        let be = queues.queues.iter().find(|q| q.recipient == "BE-PAYOKE");
        if be.is_some_and(|q| q.connected_streams == 0) {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "stream never gone");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nl.withdraw(pb::WithdrawRequest {
        message_id: misaddressed.clone(),
    })
    .await?;

    let mut got = Vec::new();
    let end = loop {
        match tokio::time::timeout(WAIT, stream.message()).await? {
            Ok(Some(delivery)) => got.push(id_of(&delivery)),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert!(
        !got.contains(&misaddressed),
        "the withdrawn message reached the recipient after the stream's end ({how:?}, {} \
         of {} fillers before it)",
        got.iter().filter(|id| fillers.contains(id)).count(),
        fillers.len()
    );
    let status = end.context("the stream ended without its status")?;
    assert_eq!(status.code(), expected, "{status}");
    assert_eq!(
        state_of(&mut nl, &misaddressed).await?,
        pb::MessageState::Withdrawn
    );
    Ok(())
}

/// The ack deadline of a delivery's last attempt (`lifecycle.max_attempts`) passes while
/// it waits in the send buffer of a stuck stream: the message is dead-lettered and its
/// sender gets a `MAX_ATTEMPTS` non-delivery report. The waiting copy must not be sent
/// when the link moves again: the recipient's node would store a message its sender was
/// told was not delivered (and may send again under a new id), and its ack would be
/// answered `NOT_FOUND`.
#[tokio::test]
async fn a_copy_waiting_when_its_last_attempt_times_out_is_not_sent() -> anyhow::Result<()> {
    let (t, mut nl, mut stream, fillers, misaddressed) =
        stuck_stream(|c| c.lifecycle.max_attempts = 1, 50).await?;
    time_out_lease(&t, &mut nl, &misaddressed).await?;
    assert_eq!(
        state_of(&mut nl, &misaddressed).await?,
        pb::MessageState::DeadLettered
    );
    let mut nl_stream = receive(&mut nl, 0).await?;
    let (kind, report) = receipt(&next(&mut nl_stream).await?)?;
    assert_eq!(
        (kind, report.outcome, report.reason_code.as_str()),
        (
            Kind::NonDeliveryReport,
            pb::Outcome::DeadLettered as i32,
            "MAX_ATTEMPTS"
        )
    );
    // The store's change is seen before the timer loop has its tick's report (the tick
    // waits for its flush): the link moves once the loop has acted on the report, which
    // it counts first. (Every delivery was leased, and dead-lettered, with the referral.)
    let all = format!(
        "trmx_messages_dead_lettered_total{{reason=\"max_attempts\"}} {}\n",
        fillers.len() + 1
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while !t.broker.metrics().render().contains(&all) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the timer loop never counted the dead letters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // the link moves again
    let got = read_until_quiet(&mut stream).await;
    assert!(
        !got.contains(&misaddressed),
        "the message reported dead-lettered reached the recipient ({} of {} fillers \
         before it)",
        got.iter().filter(|id| fillers.contains(id)).count(),
        fillers.len()
    );
    let metrics = t.broker.metrics().render();
    assert!(
        !metrics.contains("trmx_deliveries_dropped_total{reason=\"dead_lettered\"} 0\n"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("trmx_deliveries_dropped_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// A message dead-lettered while its copy waits in a stuck stream's send buffer is
/// redriven by an operator: the redrive's lease goes onto the same stream, behind the dead
/// copy (the buffer has room). The dead copy is dropped; the redriven one is sent. Marked
/// dropped by message id alone, it was dropped too, unsent, its lease holding no slot: the
/// operator's redrive came to nothing, the message dead-lettered again at its ack deadline.
#[tokio::test]
async fn a_message_redriven_while_its_dead_lettered_copy_waits_is_sent() -> anyhow::Result<()> {
    let (t, mut nl, mut stream, fillers, misaddressed) =
        stuck_stream(|c| c.lifecycle.max_attempts = 1, 50).await?;
    time_out_lease(&t, &mut nl, &misaddressed).await?;
    // (the timer loop acted on the tick's report once it counted the dead letters)
    let all = format!(
        "trmx_messages_dead_lettered_total{{reason=\"max_attempts\"}} {}\n",
        fillers.len() + 1
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while !t.broker.metrics().render().contains(&all) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the timer loop never counted the dead letters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crate::operator::operator(&t)?
        .redrive(pb::RedriveRequest {
            message_id: misaddressed.clone(),
            ..Default::default()
        })
        .await?;
    until_state(
        &mut nl,
        &misaddressed,
        pb::MessageState::InFlight,
        "the redriven message was never leased",
    )
    .await?;

    // the link moves again: the dead copies are dropped, the redriven one is sent
    let got = read_until_quiet(&mut stream).await;
    assert_eq!(
        got.iter().filter(|id| **id == misaddressed).count(),
        1,
        "the redriven message reached the recipient once ({} deliveries)",
        got.len()
    );
    Ok(())
}

/// A delivery's ack timeout passes while its copy waits in the send buffer of a stuck
/// stream B; the message is leased again onto the recipient's other stream A (B's buffer
/// is full, so B leases nothing more), and A ends, its node gone, with that last attempt
/// unacknowledged: the release dead-letters the message and its sender gets a
/// `MAX_ATTEMPTS` non-delivery report. The stale copy still waiting on B must not be sent
/// when B's link moves again: the recipient's node would store a message its sender was
/// told was not delivered.
#[tokio::test]
async fn a_stale_copy_on_another_stream_is_not_sent_after_a_release_dead_letters_its_message()
-> anyhow::Result<()> {
    stale_copy_after_a_release_dead_letters_its_message(false).await
}

/// [`a_stale_copy_on_another_stream_is_not_sent_after_a_release_dead_letters_its_message`],
/// with the release failing after it dead-lettered the message (a later batch, or its flush,
/// failed): what it committed is kept, nothing releases that lease again, and the sender
/// gets its non-delivery report all the same. Acting on nothing of a failed release, the
/// broker sent the stale copy and never counted the dead letter.
#[tokio::test]
async fn a_stale_copy_is_not_sent_after_a_failing_release_dead_letters_its_message()
-> anyhow::Result<()> {
    stale_copy_after_a_release_dead_letters_its_message(true).await
}

/// See [`a_stale_copy_on_another_stream_is_not_sent_after_a_release_dead_letters_its_message`];
/// with `release_fails`, stream A's release fails after it applied.
async fn stale_copy_after_a_release_dead_letters_its_message(
    release_fails: bool,
) -> anyhow::Result<()> {
    // 50 fillers of 256 KiB (12.5 MiB) and the referral all go into B in its first lease
    // (the buffer is 16 MiB); HTTP/2 takes the client's stream window of 2 MiB and what it
    // holds beside it, well under 4 MiB, so more than half the buffer still waits in B
    // when they are due again: B leases nothing, and the redelivery goes to A. (Fillers
    // of 60 KiB in a 2 MiB buffer, leased as HTTP/2 took them, left B room or stopped it
    // before the referral within a few fillers either side: 52 failed 5 runs in 32.)
    let adjust = |c: &mut trmx_broker::config::BrokerConfig| {
        c.lifecycle.max_attempts = 2;
        c.limits.receive_buffer_bytes = 16 << 20;
        c.limits.max_envelope_bytes = 512 << 10;
    };
    let (t, store) = TestBroker::start_with_faulty_store_and(adjust).await?;
    let (t, mut nl, mut b, fillers, misaddressed) =
        stuck_on_with(t, 50, 256 << 10, 64, |_, _| {}).await?;
    time_out_lease(&t, &mut nl, &misaddressed).await?;

    // stream A takes the second (last) attempt
    let mut be = t.client("BE-PAYOKE")?;
    let mut a = receive(&mut be, 64).await?;
    let mut read = Vec::new();
    loop {
        let delivery = next(&mut a)
            .await
            .context("the referral was never sent on stream A (leased again on B?)")?;
        let id = id_of(&delivery);
        if id == misaddressed {
            break;
        }
        read.push(id);
    }
    assert_eq!(status(&mut nl, &misaddressed).await?.attempts, 2);
    // (acknowledged, the fillers leave the release only the referral to dead-letter)
    ack(&mut be, &read).await?;
    store
        .fail_releases
        .store(release_fails, std::sync::atomic::Ordering::SeqCst);
    drop(a);
    until_state(
        &mut nl,
        &misaddressed,
        pb::MessageState::DeadLettered,
        "the release of stream A never dead-lettered the referral",
    )
    .await?;
    // The store's change is seen before the release has acted on it: it counts the dead
    // letter after it marked the waiting copies.
    let counted = "trmx_messages_dead_lettered_total{reason=\"max_attempts\"} 1\n";
    let deadline = tokio::time::Instant::now() + WAIT;
    while !t.broker.metrics().render().contains(counted) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the release never counted the dead letter"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // B's link moves again
    let got = read_until_quiet(&mut b).await;
    assert!(
        !got.contains(&misaddressed),
        "the message reported dead-lettered reached the recipient on stream B ({} of {} \
         fillers before it)",
        got.iter().filter(|id| fillers.contains(id)).count(),
        fillers.len()
    );
    Ok(())
}

/// The ack timeout of a delivery stuck in the send buffer passes and the message is
/// leased again onto the same stream, behind its first copy; the node reads the first copy
/// and acknowledges it: the second, still waiting, is not sent (the node holds the message;
/// it would only come twice, after its acknowledgement).
#[tokio::test]
async fn a_copy_waiting_behind_one_the_node_acknowledged_is_not_sent() -> anyhow::Result<()> {
    let (t, mut nl, mut stream, fillers, misaddressed) = stuck_stream(|_| {}, 50).await?;
    let mut be = t.client("BE-PAYOKE")?;
    time_out_lease(&t, &mut nl, &misaddressed).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(&mut nl, &misaddressed).await?.attempts < 2 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never leased again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the first copies come, the fillers' and then the referral's
    loop {
        let delivery = next(&mut stream).await?;
        if id_of(&delivery) == misaddressed {
            assert_eq!(delivery.attempt, 1, "the first copy comes first");
            break;
        }
    }
    assert_eq!(
        ack(&mut be, [&misaddressed]).await?,
        [pb::AckResult::Acknowledged]
    );

    let got = read_until_quiet(&mut stream).await;
    assert!(
        !got.contains(&misaddressed),
        "the acknowledged message came again ({} deliveries after its ack)",
        got.len()
    );
    for id in &fillers {
        assert!(got.contains(id), "a filler's second copy never came");
    }
    Ok(())
}

/// The ack timeout of a delivery stuck in the send buffer passes, the message is leased
/// again onto the same stream (two copies of it are then on their way there), and its
/// sender withdraws it: neither copy may reach the recipient.
#[tokio::test]
async fn a_message_leased_twice_while_waiting_and_then_withdrawn_is_not_sent() -> anyhow::Result<()>
{
    let (t, mut nl, mut stream, fillers, misaddressed) = stuck_stream(|_| {}, 50).await?;
    // past the ack timeout and the backoff: everything is leased again, onto the one
    // stream of the recipient, behind the first copies still waiting to be sent
    time_out_lease(&t, &mut nl, &misaddressed).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(&mut nl, &misaddressed).await?.attempts < 2 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never leased again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nl.withdraw(pb::WithdrawRequest {
        message_id: misaddressed.clone(),
    })
    .await?;

    let got = read_until_quiet(&mut stream).await;
    assert!(
        !got.contains(&misaddressed),
        "the withdrawn message reached the recipient ({} deliveries)",
        got.len()
    );
    for id in &fillers {
        assert!(got.contains(id), "a filler never came");
    }
    assert_eq!(
        state_of(&mut nl, &misaddressed).await?,
        pb::MessageState::Withdrawn
    );
    Ok(())
}

/// The ack timeout of a delivery stuck in the send buffer passes (the message is due
/// again, in an hour), the stream looks for work again (a new message comes), and the
/// sender withdraws it: the copy still waiting to be sent must not reach the recipient.
#[tokio::test]
async fn a_message_withdrawn_after_its_ack_timeout_while_waiting_is_not_sent() -> anyhow::Result<()>
{
    let (t, mut nl, mut stream, fillers, misaddressed) = stuck_stream(
        |c| {
            c.lifecycle.backoff_base = Duration::from_secs(3600);
            c.lifecycle.backoff_max = Duration::from_secs(3600);
        },
        50,
    )
    .await?;
    t.advance(Duration::from_secs(11));
    until_state(
        &mut nl,
        &misaddressed,
        pb::MessageState::Accepted,
        "lease not timed out",
    )
    .await?;
    // a new message makes the stream look for work (and let go of the timed-out leases)
    let nudge = referral("BE-PAYOKE");
    let nudge_id = nudge.message_id.clone();
    submit(&mut nl, nudge).await?;
    until_state(
        &mut nl,
        &nudge_id,
        pb::MessageState::InFlight,
        "new message never leased",
    )
    .await?;
    nl.withdraw(pb::WithdrawRequest {
        message_id: misaddressed.clone(),
    })
    .await?;

    let got = read_until_quiet(&mut stream).await;
    assert!(
        !got.contains(&misaddressed),
        "the withdrawn message reached the recipient ({} deliveries)",
        got.len()
    );
    assert!(got.contains(&nudge_id), "the new message never came");
    for id in &fillers {
        assert!(got.contains(id), "a filler never came");
    }
    Ok(())
}

/// A message whose lifetime ends while its delivery waits in the broker's send buffer (a
/// slow link) is EXPIRED and its sender gets a non-delivery report: the recipient must not
/// get it after that. The buffer drops it when its turn comes, sends everything else in
/// order, and frees its stream slot (the recipient will never ack it): here every other
/// slot is held by an unacknowledged filler, and a new message still comes.
#[tokio::test]
async fn a_message_that_expires_while_waiting_to_be_sent_is_not_sent() -> anyhow::Result<()> {
    const FILLERS: usize = 50;
    let (t, mut nl, mut stream, fillers, short_lived) = stuck_stream_with(
        |_| {},
        FILLERS,
        FILLERS as u32 + 1,
        |referral, now| {
            referral.created_at = Some(to_timestamp(now));
            referral.expires_at = Some(to_timestamp(now + Duration::from_secs(5)));
        },
    )
    .await?;
    // its lifetime ends inside the 10 s ack timeout: no lease times out
    t.advance(Duration::from_secs(6));
    until_state(
        &mut nl,
        &short_lived,
        pb::MessageState::Expired,
        "not expired",
    )
    .await?;
    let mut reports = receive(&mut nl, 0).await?;
    let (kind, report) = receipt(&next(&mut reports).await?)?;
    assert_eq!(kind, Kind::NonDeliveryReport);
    assert_eq!(report.message_id, short_lived);
    assert_eq!(report.outcome, pb::Outcome::Expired as i32);

    for id in &fillers {
        assert_eq!(&id_of(&next(&mut stream).await?), id);
    }
    // every slot but the dropped one's holds an unacknowledged filler
    let mut after = referral("BE-PAYOKE");
    after.created_at = Some(to_timestamp(trmx_broker::clock::Clock::now(&t.clock)));
    let after_id = after.message_id.clone();
    submit(&mut nl, after).await?;
    let delivered = next(&mut stream).await.map(|d| id_of(&d));
    assert!(
        delivered.as_ref().is_ok_and(|id| *id == after_id),
        "expected the new message (the expired one's slot free), got {delivered:?} \
         (the expired one is {short_lived})"
    );
    expect_quiet(&mut stream).await?;
    // counted as dropped, not delivered: the one referral delivered is the new one
    let metrics = t.broker.metrics().render();
    for line in [
        "trmx_deliveries_dropped_total{reason=\"expired\"} 1",
        "trmx_messages_delivered_total{kind=\"referral\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line}");
    }
    Ok(())
}

/// [`a_message_that_expires_while_waiting_to_be_sent_is_not_sent`], one queue earlier: the
/// stream leases more than its channel holds (64 deliveries), so the last leased wait in
/// the stream task itself, behind a full channel, when their message expires. They too
/// pass the channel's check when their turn comes: the recipient never gets the message
/// its sender was told had expired.
#[tokio::test]
async fn a_message_that_expires_before_it_enters_the_send_buffer_is_not_sent() -> anyhow::Result<()>
{
    // 60 KiB each: the client's 2 MiB window and hyper take about 36, the channel 64
    const FILLERS: usize = 130;
    let (t, mut nl, mut stream, fillers, short_lived) = stuck_stream_with(
        |_| {},
        FILLERS,
        FILLERS as u32 + 1,
        |referral, now| {
            referral.created_at = Some(to_timestamp(now));
            referral.expires_at = Some(to_timestamp(now + Duration::from_secs(5)));
        },
    )
    .await?;
    t.advance(Duration::from_secs(6));
    until_state(
        &mut nl,
        &short_lived,
        pb::MessageState::Expired,
        "not expired",
    )
    .await?;
    for id in &fillers {
        assert_eq!(&id_of(&next(&mut stream).await?), id);
    }
    expect_quiet(&mut stream).await?;
    let metrics = t.broker.metrics().render();
    let line = "trmx_deliveries_dropped_total{reason=\"expired\"} 1";
    assert!(metrics.lines().any(|l| l == line), "missing {line}");
    Ok(())
}

#[tokio::test]
async fn get_info_lists_the_registry_and_limits() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let info = be.get_info(pb::GetInfoRequest {}).await?.into_inner();
    assert_eq!(info.caller, "BE-PAYOKE");
    assert_eq!(info.broker_name, "test-1");
    let ids: Vec<_> = info.participants.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["BE-PAYOKE", "INT-IOM", "NL-NRM"]);
    let iom = &info.participants[1];
    assert_eq!(iom.accepts, vec![pb::MessageKind::FollowUp as i32]);
    assert_eq!(
        iom.organisation_type,
        pb::OrganisationType::InternationalOrganisation as i32
    );
    let limits = info.limits.expect("limits");
    assert_eq!(limits.max_envelope_bytes, 64 << 10);
    assert_eq!(limits.default_max_in_flight, 32);
    assert_eq!(limits.max_attempts, 3);
    assert_eq!(limits.ack_timeout.map(|d| d.seconds), Some(10));
    Ok(())
}

#[tokio::test]
async fn streams_per_participant_are_limited() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(receive(&mut be, 1).await?);
    }
    let refused = be.receive(pb::ReceiveRequest { max_in_flight: 1 }).await;
    assert_code(refused.map(|_| ()), Code::ResourceExhausted, "fifth stream");
    // another participant is unaffected
    let mut nl = t.client("NL-NRM")?;
    receive(&mut nl, 1).await?;
    // closing one makes room (the broker notices the close asynchronously)
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match be.receive(pb::ReceiveRequest { max_in_flight: 1 }).await {
            Ok(_) => break,
            Err(s)
                if s.code() == Code::ResourceExhausted
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(s) => anyhow::bail!("stream not freed: {s}"),
        }
    }
    Ok(())
}

/// A `Receive` stream whose task panics (a bug) gives back what it held: its deliveries are
/// due again after their backoff, its participant can open as many streams as before, and the stream
/// gauge does not count it.
#[tokio::test]
async fn a_stream_whose_task_panics_gives_back_its_deliveries_and_its_slot() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;

    let (t, store) = TestBroker::start_with_faulty_store_and(|_| {}).await?;
    let admin = crate::metrics::admin_addr(&t)?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;

    // Its first lease takes the message; the next, at once, panics. (Its delivery reaches
    // the node only if the connection took it before: what still waits in the stream's
    // buffer is not sent once the stream ended, its leases released.)
    store.lease_panics_after.store(1, SeqCst);
    let mut doomed = receive(&mut be, 2).await?;
    let end = loop {
        match tokio::time::timeout(WAIT, doomed.message()).await? {
            Ok(Some(first)) => assert_eq!((id_of(&first), first.attempt), (id.clone(), 1)),
            end => break end,
        }
    };
    let status = end.expect_err("the stream ended without its status");
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    store.lease_panics_after.store(usize::MAX, SeqCst);

    // (the broker's clock stands still: without the release the delivery would wait
    // for an ack timeout that never comes; released, it backs off, a failed attempt)
    wait_state(&mut nl, &id, pb::MessageState::Accepted).await?;
    t.advance(Duration::from_secs(3));
    crate::metrics::scrape_until(admin, "the panicked stream to be counted down", |s| {
        s.get("trmx_participant_connected_streams{participant=\"BE-PAYOKE\"}") == Some(0.0)
    })
    .await?;
    let mut open = Vec::new();
    for n in 1..=4 {
        let opened = be.receive(pb::ReceiveRequest { max_in_flight: 1 }).await;
        open.push(
            opened
                .map_err(|s| anyhow::anyhow!("stream {n} of 4 refused: {s}"))?
                .into_inner(),
        );
    }
    // (on whichever of the streams leases it: the tick that ends its backoff may come
    // after the first stream looked, and wakes them all)
    let again = next_on_any(&mut open).await?;
    assert_eq!((id_of(&again), again.attempt), (id.clone(), 2));
    assert_eq!(
        ack(&mut be, [&id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    Ok(())
}

/// A delivery whose handling makes its stream's task panic each time (a bug that its
/// content trips) counts as a failed attempt, as one whose node drops its stream does:
/// it backs off, and is dead-lettered once its attempts (3) are used up, its sender
/// told. Released as the broker's doing, it was due again at once, handed out (and the
/// task panicking) at every reconnect of its node, for ever, with no attempt limit and
/// no report, ahead of the recipient's other messages.
#[tokio::test]
async fn a_delivery_whose_stream_panics_each_time_is_dead_lettered_after_its_attempts()
-> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;

    let (t, store) = TestBroker::start_with_faulty_store_and(|_| {}).await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    store.leased_panics.store(true, SeqCst);
    for attempt in 1..=3 {
        let mut doomed = receive(&mut be, 1).await?;
        let end = tokio::time::timeout(WAIT, doomed.message()).await?;
        assert!(!matches!(end, Ok(Some(_))), "attempt {attempt}: {end:?}");
        // (released, and past its backoff for the next stream to lease it)
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let st = status(&mut nl, &id).await?;
            if st.state != pb::MessageState::InFlight as i32 {
                anyhow::ensure!(st.attempts == attempt, "{st:?}");
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "never released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        t.advance(Duration::from_secs(3));
    }
    let st = status(&mut nl, &id).await?;
    assert_eq!(
        (
            pb::MessageState::try_from(st.state)?,
            st.reason_code.as_str()
        ),
        (pb::MessageState::DeadLettered, "MAX_ATTEMPTS"),
        "{st:?}"
    );
    Ok(())
}

/// The release of a closed stream's leases panics (a bug), in the stream's orderly close
/// (its node went away) or in the release spawned for a stream whose task panicked: the
/// stream still gives back its slot and its gauge count, and its delivery is due again
/// after the ack timeout, as after any lease the broker lost track of.
#[tokio::test]
async fn a_stream_whose_release_panics_gives_back_its_slot() -> anyhow::Result<()> {
    for task_panics in [false, true] {
        a_stream_whose_release_panics(task_panics).await?;
    }
    Ok(())
}

async fn a_stream_whose_release_panics(task_panics: bool) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;

    let (t, store) = TestBroker::start_with_faulty_store_and(|_| {}).await?;
    let admin = crate::metrics::admin_addr(&t)?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;

    store.release_panics.store(true, SeqCst);
    if task_panics {
        // its first lease takes the message, the next panics
        store.lease_panics_after.store(1, SeqCst);
    }
    let mut doomed = receive(&mut be, 2).await?;
    wait_state(&mut nl, &id, pb::MessageState::InFlight).await?;
    if task_panics {
        while let Ok(Some(_)) = tokio::time::timeout(WAIT, doomed.message()).await? {}
    }
    drop(doomed);
    crate::metrics::scrape_until(admin, "the stream to be counted down", |s| {
        s.get("trmx_participant_connected_streams{participant=\"BE-PAYOKE\"}") == Some(0.0)
    })
    .await?;
    store.release_panics.store(false, SeqCst);
    store.lease_panics_after.store(usize::MAX, SeqCst);

    let mut open = Vec::new();
    for n in 1..=4 {
        let opened = be.receive(pb::ReceiveRequest { max_in_flight: 1 }).await;
        open.push(
            opened
                .map_err(|s| anyhow::anyhow!("stream {n} of 4 refused: {s}"))?
                .into_inner(),
        );
    }
    assert_eq!(
        state_of(&mut nl, &id).await?,
        pb::MessageState::InFlight,
        "task panics: {task_panics}"
    );
    time_out_lease(&t, &mut nl, &id).await?;
    t.advance(Duration::from_secs(2));
    // (on whichever of the streams leases it)
    let again = next_on_any(&mut open).await?;
    assert_eq!((id_of(&again), again.attempt), (id.clone(), 2));
    Ok(())
}

#[tokio::test]
async fn the_health_service_reports_serving() -> anyhow::Result<()> {
    use tonic_health::pb::health_client::HealthClient;
    let t = TestBroker::start().await?;
    let channel = trmx_transport::client_channel(
        &t.addr.to_string(),
        &t.pki.participant("NL-NRM")?,
        &Default::default(),
    )?;
    let mut health = HealthClient::new(channel);
    let response = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "trmx.v1.Exchange".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        response.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    Ok(())
}

/// DESIGN.md §3: the same envelope again gets the first receipt. A retry
/// after a lost answer may come when the message's lifetime has passed: it
/// still gets its receipt (not FAILED_PRECONDITION, which a node takes as a
/// final refusal of a message the broker holds). A new message with that
/// lifetime is refused.
#[tokio::test]
async fn a_retry_after_its_lifetime_passed_still_gets_the_first_receipt() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut env = referral("BE-PAYOKE");
    let expires_at = trmx_broker::clock::Clock::now(&t.clock) + std::time::Duration::from_secs(60);
    env.expires_at = Some(trmx_proto::time::to_timestamp(expires_at));
    let first = submit(&mut nl, env.clone()).await?;
    t.advance(std::time::Duration::from_secs(120));
    let again = submit(&mut nl, env.clone()).await?;
    assert!(again.duplicate);
    assert_eq!(again.broker_seq, first.broker_seq);
    assert_eq!(again.accepted_at, first.accepted_at);

    let mut fresh = env.clone();
    fresh.message_id = MessageId::new_v7().to_string();
    assert_code(
        submit(&mut nl, fresh).await,
        Code::FailedPrecondition,
        "a new message whose lifetime has passed",
    );
    // other content under the first id: refused too, and not as a duplicate
    let mut changed = env;
    changed.priority = pb::Priority::Urgent as i32;
    assert_code(
        submit(&mut nl, changed).await,
        Code::FailedPrecondition,
        "other content, lifetime passed",
    );
    Ok(())
}

/// DESIGN.md §3: "Idempotent on (sender, message_id): an envelope whose
/// client-set fields equal the first one's returns the first receipt with
/// `duplicate = true`". A node whose answer was lost retries; the retry is
/// not a new submit, so the rate limit (and the disk watermark, §7: "refuses
/// new submits") should not refuse it. `BrokerStore::resubmitted` says so too
/// ("a rate limit ... must still get the first receipt").
#[tokio::test]
async fn a_retry_at_the_rate_limit_gets_its_first_receipt() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|c| {
        c.limits.sender_rate_per_second = 1;
        c.limits.sender_rate_burst = 1;
        c.limits.refusal_delay = Duration::from_millis(10);
    })
    .await?;
    let mut nl = t.client("NL-NRM")?;
    // The retry must meet an empty bucket: both submits within the second the one
    // token takes to come back. A slower moment of the machine proves nothing, and
    // is tried again once the token is back.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let env = referral("BE-PAYOKE");
        let first = submit(&mut nl, env.clone()).await?;
        // the answer was lost: the node sends the same envelope again at once
        let again = submit(&mut nl, env).await;
        let again = match again {
            Ok(receipt) => receipt,
            Err(status) => panic!(
                "retry of a stored message refused with {:?}: {}",
                status.code(),
                status.message()
            ),
        };
        assert!(again.duplicate);
        assert_eq!(again.broker_seq, first.broker_seq);
        if started.elapsed() < Duration::from_millis(900) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    anyhow::bail!("no two submits within a second in five tries: the machine was too slow")
}

/// A node that was away for the whole metadata retention never took its delivery
/// receipt (it expired), and the broker has deleted the message's metadata: the node's
/// outbox check finds the message unknown and submits it again, byte for byte. That is
/// a new message, delivered again, and its sender gets its receipt, although the
/// expired one of the first message, with the same id, is still on record.
#[tokio::test]
async fn a_message_submitted_again_after_its_metadata_went_gets_its_own_receipt()
-> anyhow::Result<()> {
    let day = RETENTION_DAY;
    let t = TestBroker::start_with_a_days_retention().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env.clone()).await?;
    {
        let mut stream = receive(&mut be, 1).await?;
        assert_eq!(id_of(&next(&mut stream).await?), id);
        assert_eq!(
            ack(&mut be, [&id]).await?,
            vec![pb::AckResult::Acknowledged]
        );
    }
    t.advance(day + Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(&mut nl, &id).await.is_ok() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the metadata was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let again = submit(&mut nl, env).await?;
    assert!(!again.duplicate, "a new message");
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    assert_eq!(
        ack(&mut be, [&id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    let mut nl_stream = receive(&mut nl, 1).await?;
    let delivery = next(&mut nl_stream).await?;
    let (kind, report) = receipt(&delivery)?;
    assert_eq!(
        (kind, report.message_id.as_str(), report.outcome),
        (
            Kind::DeliveryReceipt,
            id.as_str(),
            pb::Outcome::Delivered as i32
        )
    );
    assert_eq!(
        ack(&mut nl, [id_of(&delivery)]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    expect_quiet(&mut nl_stream).await?;
    Ok(())
}

/// DESIGN.md §3: "At most `max_in_flight` unacknowledged deliveries per
/// stream". A delivery whose message expired while in flight is no longer in
/// flight (EXPIRED, its NDR sent), and the recipient's ack of it is answered
/// NOT_FOUND; it holds no stream slot, so the next message (here an urgent one)
/// does not wait for its ack deadline. (Without the ack too: see
/// `lifecycle::an_expired_delivery_frees_its_stream_slot_and_a_late_ack_changes_nothing`.)
#[tokio::test]
async fn an_expired_delivery_frees_its_stream_slot() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut short = referral("BE-PAYOKE");
    // (the broker's clock: it stood still while the broker started)
    let now = trmx_broker::clock::Clock::now(&t.clock);
    short.created_at = Some(to_timestamp(now));
    short.expires_at = Some(to_timestamp(now + Duration::from_secs(5)));
    let short_id = short.message_id.clone();
    submit(&mut nl, short).await?;
    let mut urgent = referral("BE-PAYOKE");
    urgent.priority = pb::Priority::Urgent as i32;
    urgent.created_at = Some(to_timestamp(SystemTime::now()));
    let urgent_id = urgent.message_id.clone();

    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), short_id);
    submit(&mut nl, urgent).await?;
    // its lifetime ends 6 s later, well inside the 10 s ack timeout
    t.advance(Duration::from_secs(6));
    until_state(&mut nl, &short_id, pb::MessageState::Expired, "not expired").await?;
    // the recipient's node acks it (it had stored it): not in flight any more
    assert_eq!(
        ack(&mut be, [&short_id]).await?,
        vec![pb::AckResult::NotFound]
    );
    // nothing is in flight on the stream: the urgent message is due now
    let delivered = next(&mut stream).await;
    assert!(
        delivered.as_ref().is_ok_and(|d| id_of(d) == urgent_id),
        "urgent message not delivered while the stream holds no message in flight: {delivered:?}"
    );
    Ok(())
}

/// A `Withdraw` answered `NOT_FOUND` means the message will not be stored either, also
/// when a submit of it was already on its way but had not reached the service: here the
/// broker has the submit's request but not yet all of its body (a slow link) when the
/// withdrawal comes on another connection. The submit, complete after it, is refused and
/// stores nothing. (A submit cannot wait for a slot inside the broker instead: see
/// `a_connection_is_offered_no_more_streams_than_it_is_served_at_once`.)
#[tokio::test]
async fn a_submit_on_its_way_when_its_message_is_withdrawn_is_not_stored() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut new_connection = t.client("NL-NRM")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    let on_its_way = PartialSubmit::send(&t, env).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let withdrawn = new_connection
        .withdraw(pb::WithdrawRequest {
            message_id: id.clone(),
        })
        .await;
    assert_code(
        withdrawn,
        Code::NotFound,
        "withdrawal of the message on its way",
    );

    assert_eq!(
        on_its_way.finish().await?,
        Code::FailedPrecondition,
        "the submit that was on its way"
    );
    assert_code(
        status(&mut new_connection, &id).await,
        Code::NotFound,
        "the withdrawn message's status",
    );
    Ok(())
}

/// A `Submit` sent over a bare HTTP/2 connection with all of its body but the last bytes.
struct PartialSubmit {
    body: h2::SendStream<bytes::Bytes>,
    rest: bytes::Bytes,
    response: h2::client::ResponseFuture,
}

impl PartialSubmit {
    async fn send(t: &TestBroker, env: pb::Envelope) -> anyhow::Result<Self> {
        use prost::Message as _;
        use tonic::codegen::http;

        let message = pb::SubmitRequest {
            envelope: Some(env),
        }
        .encode_to_vec();
        // a gRPC message: uncompressed, its length, its bytes
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
        framed.extend_from_slice(&message);
        let mut framed = bytes::Bytes::from(framed);
        let rest = framed.split_off(framed.len() - 8);

        let tls = trmx_transport::client_config(&t.pki.participant("NL-NRM")?)?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1")?;
        let tcp = tokio::net::TcpStream::connect(t.addr).await?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(name, tcp)
            .await?;
        let (sender, connection) = h2::client::handshake(tls).await?;
        tokio::spawn(connection);
        let mut sender = sender.ready().await?;
        let request = http::Request::post(format!("https://{}/trmx.v1.Exchange/Submit", t.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut body) = sender.send_request(request, false)?;
        body.send_data(framed, false)?;
        Ok(Self {
            body,
            rest,
            response,
        })
    }

    /// Sends the rest of the body; the answer's gRPC status code.
    async fn finish(mut self) -> anyhow::Result<Code> {
        self.body.send_data(self.rest, true)?;
        let response = tokio::time::timeout(WAIT, self.response).await??;
        let status = |headers: &tonic::codegen::http::HeaderMap| {
            headers
                .get("grpc-status")
                .and_then(|code| code.to_str().ok()?.parse::<i32>().ok())
                .map(Code::from_i32)
        };
        if let Some(code) = status(response.headers()) {
            return Ok(code); // (trailers only)
        }
        let mut body = response.into_body();
        while let Some(data) = body.data().await {
            data?;
        }
        let trailers = body.trailers().await?.unwrap_or_default();
        status(&trailers).ok_or_else(|| anyhow::anyhow!("no grpc-status in {trailers:?}"))
    }
}

/// A connection is offered no more HTTP/2 streams than the broker serves at once on it
/// (`limits.concurrency_per_connection`, here below `max_concurrent_streams`): a client
/// with more requests keeps them on its side, under its own deadline. tonic's own
/// per-connection limit queued them inside the broker, outside the request timeout, so a
/// submit could wait there past the time for which its message's withdrawal refuses its
/// submits, and then store the withdrawn message.
#[tokio::test]
async fn a_connection_is_offered_no_more_streams_than_it_is_served_at_once() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    /// The client's connection preface, then its (empty) SETTINGS frame.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    const SETTINGS: u8 = 0x4;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;

    let t = TestBroker::start_with(|c| {
        c.limits.max_concurrent_streams = 128;
        c.limits.concurrency_per_connection = 3;
    })
    .await?;
    let tls = trmx_transport::client_config(&t.pki.participant("NL-NRM")?)?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let tcp = tokio::net::TcpStream::connect(t.addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await?;
    tls.write_all(PREFACE).await?;
    tls.flush().await?;
    // the server's first frame is its SETTINGS: 9 bytes of header, then 6 per setting
    let mut header = [0u8; 9];
    tokio::time::timeout(WAIT, tls.read_exact(&mut header)).await??;
    assert_eq!(header[3], SETTINGS, "first frame {header:?}");
    let length =
        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; length];
    tokio::time::timeout(WAIT, tls.read_exact(&mut payload)).await??;
    let streams = payload.chunks_exact(6).find_map(|setting| {
        (u16::from_be_bytes([setting[0], setting[1]]) == MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
    });
    assert_eq!(streams, Some(3), "SETTINGS_MAX_CONCURRENT_STREAMS");
    Ok(())
}

/// A node holds its `Receive` stream open on the connection it submits and acknowledges
/// on. Whatever per-connection limits the broker accepts, its requests there are served
/// beside the stream, not held behind it (an ack held there would let every delivery time
/// out and be dead-lettered, and the node's outbox would stall, with no error anywhere).
#[tokio::test]
async fn a_node_submits_and_acks_beside_its_receive_stream_at_any_accepted_limit()
-> anyhow::Result<()> {
    type Adjust = fn(&mut trmx_broker::BrokerConfig);
    let limits: [(&str, Adjust); 4] = [
        ("limits.concurrency_per_connection", |c| {
            c.limits.concurrency_per_connection = 1;
        }),
        ("limits.max_concurrent_streams", |c| {
            c.limits.max_concurrent_streams = 1;
        }),
        ("limits.concurrency_per_connection", |c| {
            c.limits.concurrency_per_connection = 2;
        }),
        ("limits.max_concurrent_streams", |c| {
            c.limits.max_concurrent_streams = 2;
        }),
    ];
    let mut served = 0;
    for (field, adjust) in limits {
        let dir = tempfile::tempdir()?;
        let mut config = test_config(dir.path().join("data"), Pki::create(dir.path())?.tls);
        adjust(&mut config);
        if let Err(error) = config.validate() {
            assert!(error.to_string().contains(field), "{error}");
            continue;
        }
        let t = TestBroker::start_with(adjust).await?;
        let mut nl = t.client("NL-NRM")?;
        let mut be = t.client("BE-PAYOKE")?;
        let mut stream = receive(&mut be, 8).await?;
        // on the stream's own connection
        let reply = referral("NL-NRM");
        tokio::time::timeout(WAIT, submit(&mut be, reply))
            .await
            .map_err(|_| anyhow::anyhow!("{field}: a submit waited behind the stream"))??;
        let env = referral("BE-PAYOKE");
        let id = env.message_id.clone();
        submit(&mut nl, env).await?;
        assert_eq!(id_of(&next(&mut stream).await?), id);
        let acked = tokio::time::timeout(WAIT, ack(&mut be, [&id]))
            .await
            .map_err(|_| anyhow::anyhow!("{field}: an ack waited behind the stream"))??;
        assert_eq!(acked, [pb::AckResult::Acknowledged], "{field}");
        served += 1;
    }
    assert!(served > 0, "no small limit is accepted");
    Ok(())
}
