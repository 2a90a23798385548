//! Issue 3 item 7: every bad input gets its code, and nothing is stored.

use std::time::{Duration, SystemTime};

use tonic::Code;
use trmx_proto::time::to_timestamp;
use trmx_proto::{Kind, pb};

use crate::harness::*;

#[tokio::test]
async fn every_bad_submit_gets_its_code_and_stores_nothing() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;

    type Mutation = Box<dyn Fn(&mut pb::Envelope)>;
    let cases: Vec<(&str, Mutation, Code, &str)> = vec![
        (
            "foreign sender",
            Box::new(|e| e.sender = "INT-IOM".into()),
            Code::PermissionDenied,
            "envelope.sender",
        ),
        (
            "malformed sender",
            Box::new(|e| e.sender = "nl-nrm".into()),
            Code::PermissionDenied,
            "envelope.sender",
        ),
        (
            "broker-made kind",
            Box::new(|e| {
                e.kind = pb::MessageKind::DeliveryReceipt as i32;
                e.content_type = Kind::DeliveryReceipt.content_type();
            }),
            Code::PermissionDenied,
            "broker",
        ),
        (
            "broker-made kind, a referral's content type",
            Box::new(|e| e.kind = pb::MessageKind::NonDeliveryReport as i32),
            Code::PermissionDenied,
            "broker",
        ),
        (
            "missing recipient",
            Box::new(|e| e.recipient.clear()),
            Code::InvalidArgument,
            "envelope.recipient",
        ),
        (
            "an id of the broker's receipt space (UUIDv5)",
            Box::new(|e| {
                let original = trmx_proto::MessageId::new_v7();
                e.message_id = trmx_proto::MessageId::receipt_id(original, "DELIVERED").to_string();
            }),
            Code::InvalidArgument,
            "envelope.message_id",
        ),
        (
            "malformed case_ref",
            Box::new(|e| e.case_ref = "Jane Doe".into()),
            Code::InvalidArgument,
            "envelope.case_ref",
        ),
        (
            "bad digest",
            Box::new(|e| e.payload.push(b'!')),
            Code::InvalidArgument,
            "envelope.payload_sha256",
        ),
        (
            "broker-set accepted_at",
            Box::new(|e| e.accepted_at = Some(to_timestamp(SystemTime::now()))),
            Code::InvalidArgument,
            "envelope.accepted_at",
        ),
        (
            "broker-set broker_seq",
            Box::new(|e| e.broker_seq = 42),
            Code::InvalidArgument,
            "envelope.broker_seq",
        ),
        (
            "oversize envelope",
            Box::new(|e| {
                e.payload = vec![7; (64 << 10) + 1];
                e.payload_sha256 = trmx_proto::envelope::sha256(&e.payload).to_vec();
            }),
            Code::InvalidArgument,
            "envelope: must be at most",
        ),
        (
            "unknown recipient",
            Box::new(|e| e.recipient = "DE-NOBODY".into()),
            Code::NotFound,
            "DE-NOBODY",
        ),
        (
            "kind not accepted",
            Box::new(|e| {
                e.recipient = "INT-IOM".into();
            }),
            Code::FailedPrecondition,
            "does not accept",
        ),
        (
            "expires_at already past",
            Box::new(|e| {
                let now = SystemTime::now();
                e.created_at = Some(to_timestamp(now - Duration::from_secs(20)));
                e.expires_at = Some(to_timestamp(now - Duration::from_secs(10)));
            }),
            Code::FailedPrecondition,
            "expires_at",
        ),
    ];
    let mut refused_ids = Vec::new();
    for (what, mutate, code, needle) in &cases {
        let mut env = referral("BE-PAYOKE");
        mutate(&mut env);
        refused_ids.push(env.message_id.clone());
        let status = assert_code(submit(&mut nl, env).await, *code, what);
        assert!(
            status.message().contains(needle),
            "{what}: message {:?} should name {needle:?}",
            status.message()
        );
    }
    let missing = nl.submit(pb::SubmitRequest { envelope: None }).await;
    assert_code(missing, Code::InvalidArgument, "no envelope");

    // A reused id with different content: the first stays as it was.
    let first = referral("BE-PAYOKE");
    let receipt1 = submit(&mut nl, first.clone()).await?;
    let mut reused = referral("BE-PAYOKE");
    reused.message_id = first.message_id.clone();
    assert_code(
        submit(&mut nl, reused).await,
        Code::AlreadyExists,
        "reused id",
    );
    // The same id from another sender to the same recipient: its node acks by id.
    let mut iom = t.client("INT-IOM")?;
    let mut taken = envelope("BE-PAYOKE", Kind::FollowUp, b"follow-up");
    taken.message_id = first.message_id.clone();
    let refused = assert_code(
        submit(&mut iom, taken).await,
        Code::AlreadyExists,
        "an id another sender used for the same recipient",
    );
    assert!(
        refused.message().contains("another sender") && !refused.message().contains("NL-NRM"),
        "{}",
        refused.message()
    );
    assert_code(
        status(&mut iom, &first.message_id).await,
        Code::NotFound,
        "the refused id stored for its second sender",
    );

    // Operators and unregistered participants may not use Exchange at all.
    let mut operator = t.operator_client("alice")?;
    assert_code(
        submit(&mut operator, referral("BE-PAYOKE")).await,
        Code::PermissionDenied,
        "operator submit",
    );
    assert_code(
        operator
            .receive(pb::ReceiveRequest { max_in_flight: 1 })
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "operator receive",
    );
    let mut stranger = t.client("FR-OFII")?;
    assert_code(
        submit(&mut stranger, referral("BE-PAYOKE")).await,
        Code::PermissionDenied,
        "unregistered participant",
    );

    // Nothing of the refused submits was stored...
    for id in &refused_ids {
        assert_code(
            status(&mut nl, id).await,
            Code::NotFound,
            "refused id stored",
        );
    }
    // ...and the recipients' queues hold only the one good message.
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    let delivery = next(&mut stream).await?;
    assert_eq!(id_of(&delivery), first.message_id);
    assert_eq!(
        delivery.envelope.map(|e| e.broker_seq),
        Some(receipt1.broker_seq)
    );
    expect_quiet(&mut stream).await?;
    let mut iom = t.client("INT-IOM")?;
    let mut stream = receive(&mut iom, 0).await?;
    expect_quiet(&mut stream).await?;
    // and the broker still serves everybody
    let info = nl.get_info(pb::GetInfoRequest {}).await?.into_inner();
    assert_eq!(info.caller, "NL-NRM");
    Ok(())
}

#[tokio::test]
async fn the_sender_rate_limit_refuses_with_resource_exhausted() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|c| {
        c.limits.sender_rate_per_second = 1;
        c.limits.sender_rate_burst = 3;
    })
    .await?;
    let mut nl = t.client("NL-NRM")?;
    nl.get_info(pb::GetInfoRequest {}).await?; // (connected before the clock starts)
    // The bucket runs on real time: eight submits sent together, so that a slow
    // machine (a flush taking a second) cannot refill it between them.
    let envelopes: Vec<pb::Envelope> = (0..8).map(|_| referral("BE-PAYOKE")).collect();
    let started = std::time::Instant::now();
    let results = futures::future::join_all(envelopes.iter().map(|env| {
        let (mut nl, env) = (nl.clone(), env.clone());
        async move { submit(&mut nl, env).await }
    }))
    .await;
    let elapsed = started.elapsed();
    let mut accepted = 0;
    let mut refused = Vec::new();
    for (env, result) in envelopes.iter().zip(results) {
        match result {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "rate: {status:?}");
                refused.push(env.message_id.clone());
            }
        }
    }
    // the burst, and at most one more per second that passed
    assert!(
        accepted >= 3 && accepted as f64 <= 3.0 + elapsed.as_secs_f64().floor(),
        "{accepted} of 8 accepted in {elapsed:?}"
    );
    assert!(!refused.is_empty(), "none of 8 submits refused");
    for id in &refused {
        assert_code(
            status(&mut nl, id).await,
            Code::NotFound,
            "rate-limited id stored",
        );
    }
    // another sender has its own bucket
    let mut iom = t.client("INT-IOM")?;
    submit(&mut iom, referral("BE-PAYOKE")).await?;
    Ok(())
}

#[tokio::test]
async fn a_refusal_for_rate_is_held_back_so_a_flooder_slows_itself_down() -> anyhow::Result<()> {
    let delay = Duration::from_millis(300);
    let t = TestBroker::start_with(|c| {
        c.limits.sender_rate_per_second = 1;
        c.limits.sender_rate_burst = 1;
        c.limits.refusal_delay = delay;
    })
    .await?;
    let mut nl = t.client("NL-NRM")?;
    nl.get_info(pb::GetInfoRequest {}).await?; // (connected before the clock starts)
    // Nine submits sent together (the bucket runs on real time: one at a time, a slow
    // machine could refill it in between): one takes the token, and the refusals each
    // wait the delay (they overlap, so the flooder gets at most concurrency / delay
    // answers per second) ...
    let started = std::time::Instant::now();
    let answers = futures::future::join_all((0..9).map(|_| {
        let mut nl = nl.clone();
        async move {
            let sent = tokio::time::Instant::now();
            let answer = submit(&mut nl, referral("BE-PAYOKE")).await;
            (answer, sent.elapsed())
        }
    }))
    .await;
    let refill = started.elapsed().as_secs_f64().floor() as usize;
    let mut accepted = 0;
    for (answer, took) in answers {
        match answer {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "rate: {status:?}");
                assert!(took >= delay, "a refusal answered after {took:?}");
            }
        }
    }
    assert!(
        (1..=1 + refill).contains(&accepted),
        "{accepted} of 9 accepted"
    );
    assert!(accepted < 9, "none refused");
    // ... while another sender is answered at once, within its own bucket.
    let mut iom = t.client("INT-IOM")?;
    submit(&mut iom, referral("BE-PAYOKE")).await?;
    Ok(())
}

#[tokio::test]
async fn the_free_disk_watermark_refuses_submits_but_delivery_goes_on() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|c| {
        c.limits.min_free_disk_bytes = u64::MAX / 2;
    })
    .await?;
    let mut nl = t.client("NL-NRM")?;
    assert_code(
        submit(&mut nl, referral("BE-PAYOKE")).await,
        Code::ResourceExhausted,
        "low disk",
    );
    let mut be = t.client("BE-PAYOKE")?;
    receive(&mut be, 0).await?;
    Ok(())
}

#[tokio::test]
async fn a_failed_flush_refuses_submits_until_the_store_writes_again() -> anyhow::Result<()> {
    use std::sync::Arc;
    use trmx_broker::store::{SledOptions, SledStore};

    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    let store = SledStore::open(
        &config.data_dir,
        SledOptions::default(),
        trmx_broker::server::lifecycle_of(&config),
    )?;
    let faults = store.fault_switch();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut broker = trmx_broker::Broker::builder(config)
        .store(Arc::new(store))
        .start(listener)
        .await?;
    let mut nl = client(broker.local_addr(), &pki.participant("NL-NRM")?)?;
    let kept = referral("BE-PAYOKE");
    submit(&mut nl, kept.clone()).await?;

    faults.set_failing(true);
    // (its write is applied, its flush fails)
    let mut lost = referral("BE-PAYOKE");
    // (long enough that this first submit reaches the broker well before it, on a
    // slow machine too: then it would be refused as expired, not for the flush)
    let expires_at = SystemTime::now() + Duration::from_secs(2);
    lost.expires_at = Some(to_timestamp(expires_at));
    assert_code(
        submit(&mut nl, lost.clone()).await,
        Code::Unavailable,
        "failed flush",
    );
    // still refused: the broker does not try to acknowledge what it cannot make durable
    assert_code(
        submit(&mut nl, referral("BE-PAYOKE")).await,
        Code::Unavailable,
        "latched",
    );
    // The message whose flush failed, retried once its lifetime has passed:
    // "retry later", not the final "expires_at is already past" that would
    // make its node give up on a message the broker may still hold.
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    assert_code(
        submit(&mut nl, lost.clone()).await,
        Code::Unavailable,
        "a retry after the lifetime, store failing",
    );

    faults.set_failing(false);
    let deadline = tokio::time::Instant::now() + WAIT;
    let accepted = loop {
        match submit(&mut nl, referral("BE-PAYOKE")).await {
            Ok(receipt) => break receipt,
            Err(s) if s.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => anyhow::bail!("submits not accepted again: {s}"),
        }
    };
    assert!(!accepted.duplicate);
    assert_eq!(
        state_of(&mut nl, &kept.message_id).await?,
        pb::MessageState::Accepted
    );
    broker.shutdown().await?;
    Ok(())
}

/// One participant's connections could take every one of `limits.max_connections`: a node
/// that leaks channels, or one stolen certificate, shut every other participant out (their
/// handshakes completed and were closed at once, "peer closed connection without sending
/// TLS close_notify"). Now an identity holds at most `limits.max_connections_per_identity`.
#[tokio::test]
async fn one_participant_at_its_connection_cap_cannot_shut_the_others_out() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|c| {
        c.limits.max_connections = 3;
        c.limits.max_connections_per_identity = 2;
    })
    .await?;
    let mut hog = Vec::new();
    for _ in 0..2 {
        let mut nl = t.client("NL-NRM")?; // a channel of its own: a connection of its own
        nl.get_info(pb::GetInfoRequest {}).await?;
        hog.push(nl);
    }
    // NL-NRM's third connection is refused, though a slot is free
    let mut third = t.client("NL-NRM")?;
    let refused = tokio::time::timeout(WAIT, third.get_info(pb::GetInfoRequest {})).await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "NL-NRM got a third connection over its cap of 2: {refused:?}"
    );
    let mut be = t.client("BE-PAYOKE")?;
    let answer = tokio::time::timeout(WAIT, be.get_info(pb::GetInfoRequest {})).await;
    assert!(
        matches!(answer, Ok(Ok(_))),
        "BE-PAYOKE shut out by NL-NRM's idle connections: {answer:?}"
    );
    drop(hog);
    Ok(())
}

/// A `Reject` whose field path holds a value from the body (here a name put in
/// where a field name goes, as a recipient's JSON decoder did with an unknown key)
/// is refused without echoing it, and changes nothing: the message stays in flight,
/// is delivered again, and no non-delivery report or dead letter carries the value.
#[tokio::test]
async fn a_reject_with_a_value_in_its_field_path_is_refused_and_changes_nothing()
-> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    let mut stream = receive(&mut be, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);

    for path in [
        "referral.person.AminaBello",
        "referral.person.amina_bello",
        "AminaBello.person",
        "referral.person[0].AminaBello",
    ] {
        let status = assert_code(
            be.reject(pb::RejectRequest {
                message_id: id.clone(),
                reason_code: "INVALID_BODY".into(),
                field_path: path.into(),
            })
            .await,
            Code::InvalidArgument,
            path,
        );
        assert!(status.message().contains("field_path"), "{status:?}");
        assert!(
            !status.message().contains("Amina") && !status.message().contains("amina"),
            "{status:?}"
        );
    }

    let st = status(&mut nl, &id).await?;
    assert_eq!(st.state, pb::MessageState::InFlight as i32);
    assert_eq!((st.attempts, st.reason_code.as_str()), (1, ""));
    assert_eq!(st.field_path, "");
    let dead = crate::operator::operator(&t)?
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await?
        .into_inner();
    assert!(dead.messages.is_empty(), "{dead:?}");

    // still the recipient's to process: delivered again after the ack timeout
    time_out_lease(&t, &mut nl, &id).await?;
    let again = next(&mut stream).await?;
    assert_eq!((id_of(&again), again.attempt), (id.clone(), 2));
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::InFlight);
    Ok(())
}
