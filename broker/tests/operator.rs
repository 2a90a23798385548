//! Issue 6: the `Operator` service and `trmx-broker admin` against a real broker
//! over mutual TLS holding queued, in-flight, expired and dead-lettered messages;
//! redrive, purge, the audit log (tampering found online and offline), statistics
//! with small counts suppressed — and no operator output holding a payload byte.

use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tonic::Code;
use tonic::transport::Channel;
use trmx_broker::clock::Clock;
use trmx_broker::store::audit::{AuditEvent, OperatorAction};
use trmx_proto::pb::operator_client::OperatorClient;
use trmx_proto::time::to_timestamp;
use trmx_proto::{Kind, MessageId, pb};
use trmx_transport::{ClientOptions, TlsPaths, client_channel};

use crate::harness::*;

pub(crate) type Operator = OperatorClient<Channel>;

/// Every payload of these tests carries this marker; no operator output may.
const MARKER: &str = "PAYLOAD-MARKER-q7Zx";

fn payload(n: usize) -> Vec<u8> {
    format!("{MARKER} body {n} {MARKER}").into_bytes()
}

fn marked(to: &str, kind: Kind, n: usize) -> pb::Envelope {
    envelope(to, kind, &payload(n))
}

/// The operator certificate `alice` (issued once per test broker).
fn operator_paths(t: &TestBroker) -> anyhow::Result<TlsPaths> {
    let path = t.pki.federation.dir.join("alice.pem");
    let cert = if path.exists() {
        trmx_certs::CertPaths::for_cert(&path)
    } else {
        t.pki.federation.operator("alice")?
    };
    Ok(TlsPaths {
        ca: t.pki.federation.ca_cert_path(),
        cert: cert.cert,
        key: cert.key,
    })
}

pub(crate) fn operator(t: &TestBroker) -> anyhow::Result<Operator> {
    let channel = client_channel(
        &t.addr.to_string(),
        &operator_paths(t)?,
        &ClientOptions::default(),
    )?;
    Ok(OperatorClient::new(channel))
}

/// Fails if `bytes` hold the payload marker (raw or base64 in any alignment).
fn assert_no_payload(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    assert!(!text.contains(MARKER), "{what} holds a payload: {text}");
    for b64 in base64_forms(MARKER.as_bytes()) {
        assert!(
            !text.contains(&b64),
            "{what} holds a base64 payload: {text}"
        );
    }
}

/// The base64 text that any encoding of data containing `needle` must contain
/// (one per alignment), trimmed to whole characters.
fn base64_forms(needle: &[u8]) -> Vec<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..3)
        .map(|shift| {
            let mut data = vec![0u8; shift];
            data.extend_from_slice(needle);
            let mut out = String::new();
            for chunk in data.chunks(3) {
                if chunk.len() < 3 {
                    break;
                }
                let n =
                    (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]);
                for i in (0..4).rev() {
                    out.push(ALPHABET[((n >> (6 * i)) & 63) as usize] as char);
                }
            }
            // drop the characters that depend on the unknown leading bytes
            out.chars().skip(if shift == 0 { 0 } else { 4 }).collect()
        })
        .collect()
}

/// Runs `trmx-broker` with `args` (blocking, on a blocking thread).
async fn broker_cli(args: Vec<String>) -> anyhow::Result<Output> {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
            .args(&args)
            .env_remove("TRMX_BROKER_CONFIG")
            .output()
    })
    .await?
    .context("running trmx-broker")
}

/// `trmx-broker admin <connection flags> <args>`; output checked for payload bytes.
async fn admin(t: &TestBroker, args: &[&str]) -> anyhow::Result<Output> {
    let paths = operator_paths(t)?;
    let mut all = vec![
        "admin".to_owned(),
        "--broker".to_owned(),
        t.addr.to_string(),
        "--ca".to_owned(),
        paths.ca.display().to_string(),
        "--cert".to_owned(),
        paths.cert.display().to_string(),
        "--key".to_owned(),
        paths.key.display().to_string(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let output = broker_cli(all).await?;
    assert_no_payload(&format!("stdout of admin {args:?}"), &output.stdout);
    assert_no_payload(&format!("stderr of admin {args:?}"), &output.stderr);
    Ok(output)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(output.status.success(), "admin failed: {}", stderr(output));
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn encoded<M: prost::Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}

/// The broker of the scenario and the ids of its messages.
struct Scenario {
    t: TestBroker,
    nl: Client,
    /// BE-PAYOKE's open stream holding `in_flight`.
    _be_stream: tonic::Streaming<pb::Delivery>,
    /// dead-lettered after 3 attempts (NL → INT-IOM follow-up)
    dead: String,
    /// rejected by BE-PAYOKE
    rejected: String,
    /// expired (NL → BE-PAYOKE)
    expired: String,
    /// in flight to BE-PAYOKE
    in_flight: String,
    /// queued for BE-PAYOKE
    queued: Vec<String>,
}

/// Builds a broker holding: a message dead-lettered after too many attempts, one
/// rejected by its recipient, one expired, one in flight and two queued.
async fn scenario() -> anyhow::Result<Scenario> {
    let t = TestBroker::start().await?; // max_attempts 3, ack timeout 10s
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut iom = t.client("INT-IOM")?;

    // dead-lettered after 3 attempts
    let env = marked("INT-IOM", Kind::FollowUp, 1);
    let dead = env.message_id.clone();
    submit(&mut nl, env).await?;
    {
        let mut stream = receive(&mut iom, 1).await?;
        for attempt in 1..=3 {
            let delivery = next(&mut stream).await?;
            assert_eq!(
                (id_of(&delivery), delivery.attempt),
                (dead.clone(), attempt)
            );
            // past the ack timeout (10s) and the backoff (at most 2s)
            t.advance(Duration::from_secs(13));
        }
        // before the stream closes (which would release the lease)
        wait_state(&mut nl, &dead, pb::MessageState::DeadLettered).await?;
    }

    // rejected by the recipient
    let env = marked("BE-PAYOKE", Kind::Referral, 2);
    let rejected = env.message_id.clone();
    submit(&mut nl, env).await?;
    {
        let mut stream = receive(&mut be, 1).await?;
        assert_eq!(id_of(&next(&mut stream).await?), rejected);
        be.reject(pb::RejectRequest {
            message_id: rejected.clone(),
            reason_code: "INVALID_BODY".into(),
            field_path: "referral.consent".into(),
        })
        .await?;
    }
    wait_state(&mut nl, &rejected, pb::MessageState::DeadLettered).await?;

    // expired
    let mut env = marked("BE-PAYOKE", Kind::Referral, 3);
    env.expires_at = Some(to_timestamp(t.clock.now() + Duration::from_secs(1)));
    let expired = env.message_id.clone();
    submit(&mut nl, env).await?;
    t.advance(Duration::from_secs(2));
    wait_state(&mut nl, &expired, pb::MessageState::Expired).await?;

    // one in flight, two queued
    let mut ids = Vec::new();
    for n in 4..7 {
        let env = marked("BE-PAYOKE", Kind::Referral, n);
        ids.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    let mut be_stream = receive(&mut be, 1).await?;
    let in_flight = id_of(&next(&mut be_stream).await?);
    assert_eq!(in_flight, ids[0]);
    let queued = ids[1..].to_vec();
    Ok(Scenario {
        t,
        nl,
        _be_stream: be_stream,
        dead,
        rejected,
        expired,
        in_flight,
        queued,
    })
}

fn ids_of(messages: &[pb::MessageMetadata]) -> Vec<String> {
    messages.iter().map(|m| m.message_id.clone()).collect()
}

#[tokio::test]
async fn operators_see_queues_participants_messages_and_dead_letters() -> anyhow::Result<()> {
    let s = scenario().await?;
    let mut op = operator(&s.t)?;

    // (the scenario's earlier BE-PAYOKE stream, dropped, is counted until the broker has
    // released its leases, a moment after the end: waited for, not raced)
    let deadline = tokio::time::Instant::now() + WAIT;
    let queues = loop {
        let queues = op.list_queues(pb::ListQueuesRequest {}).await?.into_inner();
        let streams = queues
            .queues
            .iter()
            .find(|q| q.recipient == "BE-PAYOKE")
            .map(|q| q.connected_streams);
        if streams == Some(1) || tokio::time::Instant::now() >= deadline {
            break queues;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_no_payload("ListQueues", &encoded(&queues));
    let be = queues
        .queues
        .iter()
        .find(|q| q.recipient == "BE-PAYOKE")
        .context("no BE-PAYOKE queue")?;
    assert_eq!((be.depth, be.in_flight, be.connected_streams), (2, 1, 1));
    assert!(be.bytes > 0);
    assert!(be.oldest_accepted_at.is_some() && be.oldest_age.is_some());
    let iom = queues
        .queues
        .iter()
        .find(|q| q.recipient == "INT-IOM")
        .context("no INT-IOM")?;
    assert_eq!((iom.depth, iom.in_flight), (0, 0));

    let participants = op
        .list_participants(pb::OperatorListParticipantsRequest {})
        .await?
        .into_inner();
    assert_no_payload("ListParticipants", &encoded(&participants));
    assert_eq!(participants.participants.len(), 3);
    let be = participants
        .participants
        .iter()
        .find(|p| p.participant.as_ref().is_some_and(|e| e.id == "BE-PAYOKE"))
        .context("no BE-PAYOKE")?;
    assert_eq!(be.connected_streams, 1);
    assert!(be.last_seen.is_some());
    let not_after = be.certificate_not_after.context("no certificate expiry")?;
    assert!(not_after.seconds > to_timestamp(SystemTime::now()).seconds);

    // search: NL-NRM's dead letters (the rejected one and the one out of attempts)
    let found = op
        .search_messages(pb::SearchMessagesRequest {
            sender: "NL-NRM".into(),
            state: pb::MessageState::DeadLettered as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_no_payload("SearchMessages", &encoded(&found));
    let mut want = vec![s.dead.clone(), s.rejected.clone()];
    want.sort();
    let mut got = ids_of(&found.messages);
    got.sort();
    assert_eq!(got, want);
    let dead = found
        .messages
        .iter()
        .find(|m| m.message_id == s.dead)
        .context("dead")?;
    assert_eq!(dead.reason_code, "MAX_ATTEMPTS");
    assert!(dead.redrivable && dead.payload_kept);
    let rejected = found
        .messages
        .iter()
        .find(|m| m.message_id == s.rejected)
        .context("rej")?;
    assert_eq!(
        (rejected.reason_code.as_str(), rejected.field_path.as_str()),
        ("INVALID_BODY", "referral.consent")
    );
    assert!(!rejected.redrivable && !rejected.payload_kept);
    // by id, by recipient and state, by kind and time; a limit truncates
    let by_id = op
        .search_messages(pb::SearchMessagesRequest {
            message_id: s.in_flight.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(ids_of(&by_id.messages), vec![s.in_flight.clone()]);
    assert_eq!(by_id.messages[0].state, pb::MessageState::InFlight as i32);
    let queued = op
        .search_messages(pb::SearchMessagesRequest {
            recipient: "BE-PAYOKE".into(),
            state: pb::MessageState::Accepted as i32,
            kind: pb::MessageKind::Referral as i32,
            accepted_from: Some(to_timestamp(s.t.clock.now() - Duration::from_secs(3600))),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(ids_of(&queued.messages), s.queued);
    let limited = op
        .search_messages(pb::SearchMessagesRequest {
            sender: "NL-NRM".into(),
            limit: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(limited.messages.len(), 2);
    assert!(limited.truncated);
    // the next page goes on after the last message of this one, to the end
    let mut from_nl = ids_of(&limited.messages);
    let mut token = limited.next_page_token.clone();
    while !token.is_empty() {
        let page = op
            .search_messages(pb::SearchMessagesRequest {
                sender: "NL-NRM".into(),
                limit: 2,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(page.truncated, !page.next_page_token.is_empty());
        from_nl.extend(ids_of(&page.messages));
        token = page.next_page_token;
    }
    let everything = op
        .search_messages(pb::SearchMessagesRequest {
            sender: "NL-NRM".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!everything.truncated && everything.next_page_token.is_empty());
    assert_eq!(from_nl, ids_of(&everything.messages));
    for bad_token in ["12", "p1.zz", "p1."] {
        let bad = op
            .search_messages(pb::SearchMessagesRequest {
                page_token: bad_token.into(),
                ..Default::default()
            })
            .await;
        let status = assert_code(bad, Code::InvalidArgument, "a made-up page token");
        assert!(
            status.message().starts_with("page_token"),
            "{}",
            status.message()
        );
    }
    let bad = op
        .search_messages(pb::SearchMessagesRequest {
            sender: "nl-nrm".into(),
            ..Default::default()
        })
        .await;
    let status = assert_code(bad, Code::InvalidArgument, "lower-case sender");
    assert!(
        status.message().starts_with("sender"),
        "{}",
        status.message()
    );

    let dead_letters = op
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await?
        .into_inner();
    assert_no_payload("ListDeadLetters", &encoded(&dead_letters));
    assert_eq!(
        ids_of(&dead_letters.messages),
        vec![s.dead.clone(), s.rejected.clone(), s.expired.clone()]
    );
    let expired = &dead_letters.messages[2];
    assert_eq!(expired.state, pb::MessageState::Expired as i32);
    assert!(expired.redrivable);
    let first = op
        .list_dead_letters(pb::ListDeadLettersRequest {
            limit: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(first.truncated);
    let rest = op
        .list_dead_letters(pb::ListDeadLettersRequest {
            limit: 2,
            page_token: first.next_page_token,
        })
        .await?
        .into_inner();
    assert!(!rest.truncated && rest.next_page_token.is_empty());
    assert_eq!(
        [ids_of(&first.messages), ids_of(&rest.messages)].concat(),
        ids_of(&dead_letters.messages)
    );
    Ok(())
}

#[tokio::test]
async fn a_redriven_dead_letter_is_delivered_and_a_rejected_one_cannot_be() -> anyhow::Result<()> {
    let mut s = scenario().await?;
    let mut op = operator(&s.t)?;
    let refused = op
        .redrive(pb::RedriveRequest {
            message_id: s.rejected.clone(),
            ..Default::default()
        })
        .await;
    let status = assert_code(
        refused,
        Code::FailedPrecondition,
        "redrive of a rejected message",
    );
    assert!(
        status.message().contains("rejected"),
        "{}",
        status.message()
    );
    assert_eq!(
        state_of(&mut s.nl, &s.rejected).await?,
        pb::MessageState::DeadLettered
    );
    let refused = op
        .redrive(pb::RedriveRequest {
            message_id: s.in_flight.clone(),
            ..Default::default()
        })
        .await;
    assert_code(
        refused,
        Code::FailedPrecondition,
        "redrive of an in-flight message",
    );
    let unknown = op
        .redrive(pb::RedriveRequest {
            message_id: trmx_proto::MessageId::new_v7().to_string(),
            ..Default::default()
        })
        .await;
    assert_code(unknown, Code::NotFound, "redrive of an unknown id");

    let redriven = op
        .redrive(pb::RedriveRequest {
            message_id: s.dead.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_no_payload("Redrive", &encoded(&redriven));
    assert_eq!(redriven.message_id, s.dead);
    // its 3 attempts count no longer, and the answer says how many they were
    assert_eq!(redriven.attempts_before, 3);
    let st = crate::harness::status(&mut s.nl, &s.dead).await?;
    assert_eq!(
        (st.state, st.attempts),
        (pb::MessageState::Accepted as i32, 0)
    );
    // the recipient gets it again, from attempt 1, and acknowledges it
    let mut iom = s.t.client("INT-IOM")?;
    let mut stream = receive(&mut iom, 1).await?;
    let delivery = next(&mut stream).await?;
    assert_eq!((id_of(&delivery), delivery.attempt), (s.dead.clone(), 1));
    assert_eq!(
        delivery.envelope.as_ref().map(|e| e.payload.clone()),
        Some(payload(1))
    );
    assert_eq!(
        ack(&mut iom, [&s.dead]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    assert_eq!(
        state_of(&mut s.nl, &s.dead).await?,
        pb::MessageState::Acknowledged
    );
    // an expired message can be redriven too
    op.redrive(pb::RedriveRequest {
        message_id: s.expired.clone(),
        ..Default::default()
    })
    .await?;
    assert_eq!(
        state_of(&mut s.nl, &s.expired).await?,
        pb::MessageState::Accepted
    );
    Ok(())
}

/// A receipt its sender's node never took expires at the end of the metadata
/// retention and is listed among the dead letters, as not redrivable; a redrive of it
/// is refused with why, and changes nothing (the node repairs it by itself: it asks
/// about the message and submits again one the broker no longer knows).
#[tokio::test]
async fn an_expired_receipt_is_listed_as_not_redrivable_and_its_redrive_refused()
-> anyhow::Result<()> {
    let t = TestBroker::start_with_a_days_retention().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut op = operator(&t)?;
    let env = marked("BE-PAYOKE", Kind::Referral, 1);
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    {
        let mut stream = receive(&mut be, 1).await?;
        assert_eq!(id_of(&next(&mut stream).await?), id);
        assert_eq!(
            ack(&mut be, [&id]).await?,
            vec![pb::AckResult::Acknowledged]
        );
    }
    // NL's node is away for the whole metadata retention
    t.advance(t.config.lifecycle.metadata_retention + Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + WAIT;
    let listed = loop {
        let page = op
            .list_dead_letters(pb::ListDeadLettersRequest::default())
            .await?
            .into_inner();
        if let Some(m) = page.messages.into_iter().next() {
            break m;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the receipt never expired"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(listed.kind, pb::MessageKind::DeliveryReceipt as i32);
    assert_eq!(listed.state, pb::MessageState::Expired as i32);
    assert_eq!(listed.recipient, "NL-NRM");
    assert!(!listed.redrivable, "listed as redrivable: {listed:?}");
    assert!(!listed.payload_kept, "its payload kept: {listed:?}");

    let refused = assert_code(
        op.redrive(pb::RedriveRequest {
            message_id: listed.message_id.clone(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "redrive of an expired receipt",
    );
    assert!(
        refused.message().contains("a receipt is never redriven")
            && refused.message().contains("NL-NRM"),
        "{}",
        refused.message()
    );
    let page = op
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await?
        .into_inner();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].state, pb::MessageState::Expired as i32);
    assert_eq!(page.messages[0].state_changed_at, listed.state_changed_at);
    let mut nl_stream = receive(&mut nl, 0).await?;
    expect_quiet(&mut nl_stream).await?;
    Ok(())
}

/// Two senders used one message id, each to the other, and both messages were
/// delivered: each has a delivery receipt, under one id. The operator is told whom to
/// name, and names a receipt by the participant it goes to (its own sender being the
/// broker): a redrive of it is refused as that of a receipt, a purge takes that one
/// only.
#[tokio::test]
async fn a_receipt_id_two_participants_hold_is_named_by_its_participant() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut op = operator(&t)?;
    let ours = marked("BE-PAYOKE", Kind::Referral, 1);
    let mut theirs = marked("NL-NRM", Kind::Referral, 2);
    theirs.message_id = ours.message_id.clone();
    let id = ours.message_id.clone();
    submit(&mut nl, ours).await?;
    submit(&mut be, theirs).await?;
    for client in [&mut nl, &mut be] {
        let mut stream = receive(client, 1).await?;
        assert_eq!(id_of(&next(&mut stream).await?), id);
        assert_eq!(ack(client, [&id]).await?, vec![pb::AckResult::Acknowledged]);
    }
    let dr = MessageId::receipt_for(id.parse()?, pb::Outcome::Delivered).to_string();
    let purge = |sender: &str| pb::PurgeRequest {
        message_id: dr.clone(),
        reason: "stuck at the sender".into(),
        sender: sender.into(),
    };
    let both = assert_code(
        op.purge(purge("")).await,
        Code::FailedPrecondition,
        "purge of a receipt id two participants hold",
    );
    assert!(
        both.message().contains("NL-NRM") && both.message().contains("BE-PAYOKE"),
        "{}",
        both.message()
    );
    let refused = assert_code(
        op.redrive(pb::RedriveRequest {
            message_id: dr.clone(),
            sender: "BE-PAYOKE".into(),
        })
        .await,
        Code::FailedPrecondition,
        "redrive of BE-PAYOKE's receipt",
    );
    assert!(
        refused.message().contains("a receipt is never redriven")
            && refused.message().contains("BE-PAYOKE"),
        "{}",
        refused.message()
    );
    op.purge(purge("BE-PAYOKE")).await?;
    // NL-NRM's receipt is delivered as ever; BE-PAYOKE's is gone
    let mut nl_stream = receive(&mut nl, 10).await?;
    let delivery = next(&mut nl_stream).await?;
    assert_eq!(id_of(&delivery), dr);
    let (kind, report) = receipt(&delivery)?;
    assert_eq!(
        (kind, report.message_id.as_str()),
        (Kind::DeliveryReceipt, id.as_str())
    );
    expect_quiet(&mut nl_stream).await?;
    let mut be_stream = receive(&mut be, 10).await?;
    expect_quiet(&mut be_stream).await?;
    Ok(())
}

#[tokio::test]
async fn a_purge_needs_a_reason_and_leaves_a_report_and_an_audit_record() -> anyhow::Result<()> {
    let mut s = scenario().await?;
    let mut op = operator(&s.t)?;
    let target = s.queued[1].clone();
    for reason in ["", "  ", "ab", &"x".repeat(501)] {
        let refused = op
            .purge(pb::PurgeRequest {
                message_id: target.clone(),
                reason: reason.to_owned(),
                ..Default::default()
            })
            .await;
        let status = assert_code(refused, Code::InvalidArgument, "purge without a reason");
        assert!(
            status.message().starts_with("reason"),
            "{}",
            status.message()
        );
    }
    assert_eq!(
        state_of(&mut s.nl, &target).await?,
        pb::MessageState::Accepted
    );

    let purged = op
        .purge(pb::PurgeRequest {
            message_id: target.clone(),
            reason: "misaddressed, sender asked by phone".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(purged.message_id, target);
    assert_eq!(
        state_of(&mut s.nl, &target).await?,
        pb::MessageState::Purged
    );
    // purged again, it says it already was, when: nothing changes
    let again = op
        .purge(pb::PurgeRequest {
            message_id: target.clone(),
            reason: "twice".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(again.already_purged, "{again:?}");
    assert_eq!(again.purged_at, purged.purged_at);
    // one that no longer waits was not purged and cannot be
    let refused = op
        .purge(pb::PurgeRequest {
            message_id: s.expired.clone(),
            reason: "too late".into(),
            ..Default::default()
        })
        .await;
    assert_code(
        refused,
        Code::FailedPrecondition,
        "purge of an expired message",
    );
    // the in-flight one can be purged as well
    op.purge(pb::PurgeRequest {
        message_id: s.in_flight.clone(),
        reason: "duplicate of another referral".into(),
        ..Default::default()
    })
    .await?;

    // the sender gets a non-delivery report PURGED for it
    let mut stream = receive(&mut s.nl, 0).await?;
    let mut found = false;
    for _ in 0..10 {
        let (kind, report) = receipt(&next(&mut stream).await?)?;
        if report.message_id == target {
            assert_eq!(kind, Kind::NonDeliveryReport);
            assert_eq!(report.outcome, pb::Outcome::Purged as i32);
            assert!(!format!("{report:?}").contains("phone"), "reason leaked");
            found = true;
            break;
        }
    }
    assert!(found, "no non-delivery report for the purged message");

    // the audit log holds the purge with its reason and the operator, and the
    // lifecycle change — never a case reference
    let report = op
        .verify_audit(pb::VerifyAuditRequest {})
        .await?
        .into_inner();
    assert!(report.intact, "{report:?}");
    assert!(report.records > 10);
    let data_dir = s.t.config.data_dir.clone();
    let mut t = s.t;
    drop(stream);
    drop(s._be_stream);
    t.broker.shutdown().await?;
    let records = trmx_broker::store::audit_records_offline(&data_dir)?;
    let purge = records
        .iter()
        .find(|r| {
            matches!(&r.event, AuditEvent::Operator(OperatorAction::Purge { message_id, reason, operator })
                if message_id.to_string() == target && reason == "misaddressed, sender asked by phone" && operator == "alice")
        })
        .context("no audit record of the purge")?;
    let purged_change = records
        .iter()
        .find(|r| {
            matches!(&r.event, AuditEvent::Lifecycle { message_id, event, .. }
                if message_id.to_string() == target && event.name() == "PURGED")
        })
        .context("no lifecycle record of the purge")?;
    assert!(purged_change.seq > purge.seq);
    let text = format!("{records:?}");
    assert!(!text.contains(MARKER));
    t.restart().await?;
    Ok(())
}

/// A purge is answered from its own durable write. It used to read the message
/// again afterwards (to free its recipient's stream slot): when that read failed,
/// the operator got UNAVAILABLE for a purge that had happened, the slot stayed
/// taken, and the retry got only FAILED_PRECONDITION "is PURGED". Now the purge
/// answers OK, the next message is delivered, and a retry is told that it was
/// already purged, and when.
#[tokio::test]
async fn a_purge_is_answered_from_its_write_and_a_retry_says_it_was_already_purged()
-> anyhow::Result<()> {
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let first = marked("BE-PAYOKE", Kind::Referral, 1);
    let second = marked("BE-PAYOKE", Kind::Referral, 2);
    submit(&mut nl, first.clone()).await?;
    submit(&mut nl, second.clone()).await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), first.message_id);
    expect_quiet(&mut stream).await?;

    let mut op = operator(&t)?;
    store
        .fail_reads
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let request = pb::PurgeRequest {
        message_id: first.message_id.clone(),
        reason: "sent to the wrong organisation".into(),
        ..Default::default()
    };
    let purged = op
        .purge(request.clone())
        .await
        .context("a durable purge answered with an error")?
        .into_inner();
    assert!(!purged.already_purged, "{purged:?}");
    // the in-flight slot it held is free: the next message comes
    assert_eq!(id_of(&next(&mut stream).await?), second.message_id);
    store
        .fail_reads
        .store(false, std::sync::atomic::Ordering::SeqCst);

    let again = op.purge(request).await?.into_inner();
    assert!(again.already_purged, "{again:?}");
    assert_eq!(again.purged_at, purged.purged_at);
    assert_eq!(
        state_of(&mut nl, &first.message_id).await?,
        pb::MessageState::Purged
    );
    // one non-delivery report for it, not two
    let mut reports = receive(&mut nl, 0).await?;
    let (kind, report) = receipt(&next(&mut reports).await?)?;
    assert_eq!(kind, Kind::NonDeliveryReport);
    assert_eq!(report.message_id, first.message_id);
    expect_quiet(&mut reports).await?;
    Ok(())
}

/// A purge whose flush fails answers UNAVAILABLE, but its write stays and is made
/// durable by the next flush: the message is purged. The failing call itself drops the
/// message from its recipient's stream (a delivery waiting there would otherwise still be
/// sent, and its in-flight slot stay taken until the ack deadline, with or without an
/// operator's retry) and counts it in `trmx_messages_purged_total`; the retry, told it
/// was already purged, counts nothing.
#[tokio::test]
async fn a_purge_whose_flush_fails_frees_the_recipients_stream_and_is_counted_once()
-> anyhow::Result<()> {
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let first = marked("BE-PAYOKE", Kind::Referral, 1);
    let second = marked("BE-PAYOKE", Kind::Referral, 2);
    submit(&mut nl, first.clone()).await?;
    submit(&mut nl, second.clone()).await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), first.message_id);

    let mut op = operator(&t)?;
    let request = pb::PurgeRequest {
        message_id: first.message_id.clone(),
        reason: "sent to the wrong organisation".into(),
        ..Default::default()
    };
    store.faults().set_failing(true);
    assert_code(
        op.purge(request.clone()).await,
        Code::Unavailable,
        "purge, flush failing",
    );
    let admin = super::metrics::admin_addr(&t)?;
    let purged = |s: &super::metrics::Scrape| s.value("trmx_messages_purged_total");
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(purged(&scrape), 1.0, "the purge made by the failed call");
    stream_sees_the_slot_freed(&mut stream).await?;
    store.faults().set_failing(false);
    // no retry: the store writes again (an audited listing); the recipient comes back
    op.list_dead_letters(pb::ListDeadLettersRequest::default())
        .await?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), second.message_id);
    expect_quiet(&mut stream).await?;
    assert_eq!(
        state_of(&mut nl, &first.message_id).await?,
        pb::MessageState::Purged
    );
    let again = op.purge(request.clone()).await?.into_inner();
    assert!(again.already_purged, "{again:?}");
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(purged(&scrape), 1.0, "counted again by the retry");
    Ok(())
}

/// The recipient's stream (one slot, taken by a message just purged or withdrawn by a
/// call whose flush failed) has its slot freed at once, not at the ack deadline (10 s,
/// clock stopped): it wakes to lease the next message, which it cannot while the store
/// cannot write, and ends with UNAVAILABLE (the node reconnects).
async fn stream_sees_the_slot_freed(
    stream: &mut tonic::Streaming<pb::Delivery>,
) -> anyhow::Result<()> {
    let ended = match next(stream).await {
        Ok(delivery) => anyhow::bail!("delivered while the store cannot write: {delivery:?}"),
        Err(error) => format!("{error:#}"),
    };
    anyhow::ensure!(
        ended.contains("cannot store messages right now"),
        "the slot stayed taken: {ended}"
    );
    Ok(())
}

/// A withdrawal whose flush fails answers UNAVAILABLE, but its write stays and is made
/// durable by the next flush: the message is withdrawn. The failing call itself drops
/// it from its recipient's stream (its in-flight slot, and a copy waiting to be sent),
/// and counts it; the sender's retry finds it withdrawn already.
#[tokio::test]
async fn a_withdrawal_whose_flush_fails_frees_the_recipients_stream() -> anyhow::Result<()> {
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let first = marked("BE-PAYOKE", Kind::Referral, 1);
    let second = marked("BE-PAYOKE", Kind::Referral, 2);
    submit(&mut nl, first.clone()).await?;
    submit(&mut nl, second.clone()).await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), first.message_id);

    let request = pb::WithdrawRequest {
        message_id: first.message_id.clone(),
    };
    store.faults().set_failing(true);
    assert_code(
        nl.withdraw(request.clone()).await,
        Code::Unavailable,
        "withdraw, flush failing",
    );
    let admin = super::metrics::admin_addr(&t)?;
    let withdrawn = |s: &super::metrics::Scrape| s.value("trmx_messages_withdrawn_total");
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(
        withdrawn(&scrape),
        1.0,
        "the withdrawal made by the failed call"
    );
    stream_sees_the_slot_freed(&mut stream).await?;
    store.faults().set_failing(false);
    // no retry: the store writes again (an audited listing); the recipient comes back
    operator(&t)?
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), second.message_id);
    expect_quiet(&mut stream).await?;
    assert_eq!(
        state_of(&mut nl, &first.message_id).await?,
        pb::MessageState::Withdrawn
    );
    nl.withdraw(request).await?;
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(withdrawn(&scrape), 1.0, "counted again by the retry");
    Ok(())
}

/// The same for an ack whose flush fails: its write stays and is made durable by the next
/// flush, the message is acknowledged (its receipt on its way to the sender). The failing
/// call itself frees the recipient's stream slot and counts the ack in
/// `trmx_messages_acknowledged_total`: the node's retry is told the message was
/// acknowledged already, and counts nothing. (Acting on nothing of a failed ack, the
/// broker never counted it, and held the slot until the retry.)
#[tokio::test]
async fn an_ack_whose_flush_fails_frees_the_stream_and_is_counted_once() -> anyhow::Result<()> {
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let first = marked("BE-PAYOKE", Kind::Referral, 1);
    let second = marked("BE-PAYOKE", Kind::Referral, 2);
    submit(&mut nl, first.clone()).await?;
    submit(&mut nl, second.clone()).await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), first.message_id);

    let request = pb::AckRequest {
        message_ids: vec![first.message_id.clone()],
    };
    store.faults().set_failing(true);
    assert_code(
        be.ack(request.clone()).await,
        Code::Unavailable,
        "ack, flush failing",
    );
    let admin = super::metrics::admin_addr(&t)?;
    let acknowledged =
        |s: &super::metrics::Scrape| s.value("trmx_messages_acknowledged_total{kind=\"referral\"}");
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(
        acknowledged(&scrape),
        1.0,
        "the ack made by the failed call"
    );
    stream_sees_the_slot_freed(&mut stream).await?;
    store.faults().set_failing(false);
    // the node's retry
    let results = be.ack(request).await?.into_inner().results;
    assert_eq!(results[0].result, pb::AckResult::Acknowledged as i32);
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(acknowledged(&scrape), 1.0, "counted again by the retry");
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), second.message_id);
    assert_eq!(
        state_of(&mut nl, &first.message_id).await?,
        pb::MessageState::Acknowledged
    );
    Ok(())
}

/// The same for a reject whose flush fails: its write stays and is made durable by the
/// next flush, the message is dead-lettered (its non-delivery report on its way to the
/// sender). The failing call itself frees the recipient's stream slot and counts the dead
/// letter in `trmx_messages_dead_lettered_total{reason="rejected"}`: the node's retry is
/// told the message was rejected already, and counts nothing. (Acting on nothing of a
/// failed reject, the broker never counted it, and held the slot until the retry.)
#[tokio::test]
async fn a_reject_whose_flush_fails_frees_the_stream_and_is_counted_once() -> anyhow::Result<()> {
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let first = marked("BE-PAYOKE", Kind::Referral, 1);
    let second = marked("BE-PAYOKE", Kind::Referral, 2);
    submit(&mut nl, first.clone()).await?;
    submit(&mut nl, second.clone()).await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), first.message_id);

    let request = pb::RejectRequest {
        message_id: first.message_id.clone(),
        reason_code: "INVALID_BODY".into(),
        field_path: "referral.consent".into(),
    };
    store.faults().set_failing(true);
    assert_code(
        be.reject(request.clone()).await,
        Code::Unavailable,
        "reject, flush failing",
    );
    let admin = super::metrics::admin_addr(&t)?;
    let rejected = |s: &super::metrics::Scrape| {
        s.value("trmx_messages_dead_lettered_total{reason=\"rejected\"}")
    };
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(
        rejected(&scrape),
        1.0,
        "the dead letter made by the failed call"
    );
    stream_sees_the_slot_freed(&mut stream).await?;
    store.faults().set_failing(false);
    // the node's retry
    be.reject(request).await?;
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(rejected(&scrape), 1.0, "counted again by the retry");
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), second.message_id);
    assert_eq!(
        state_of(&mut nl, &first.message_id).await?,
        pb::MessageState::DeadLettered
    );
    Ok(())
}

/// A purge made and counted, then a second purge of the same message at the same instant
/// (the test's clock is stopped; two operators within one millisecond) answered with an
/// error: only its audit record was written, and its flush failed. It made nothing, so
/// its retry, told `already_purged` at that instant, must not count the purge again.
#[tokio::test]
async fn a_failed_purge_at_the_instant_another_made_it_is_not_counted() -> anyhow::Result<()> {
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let m = marked("BE-PAYOKE", Kind::Referral, 1);
    submit(&mut nl, m.clone()).await?;
    let mut op = operator(&t)?;
    let request = pb::PurgeRequest {
        message_id: m.message_id.clone(),
        reason: "sent to the wrong organisation".into(),
        ..Default::default()
    };
    assert!(!op.purge(request.clone()).await?.into_inner().already_purged);
    store.faults().set_failing(true);
    assert_code(
        op.purge(request.clone()).await,
        Code::Unavailable,
        "second purge, flush failing",
    );
    store.faults().set_failing(false);
    assert!(op.purge(request).await?.into_inner().already_purged);
    let admin = super::metrics::admin_addr(&t)?;
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    assert_eq!(
        scrape.value("trmx_messages_purged_total"),
        1.0,
        "one purge made, counted twice"
    );
    Ok(())
}

/// What the dead-letter list and a search by id say of message `id`'s `redrivable`.
async fn listed_redrivable(op: &mut Operator, id: &str) -> anyhow::Result<(bool, bool)> {
    let dead = op
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await?
        .into_inner();
    let in_list = dead
        .messages
        .iter()
        .find(|m| m.message_id == id)
        .context("not among the dead letters")?
        .redrivable;
    let found = op
        .search_messages(pb::SearchMessagesRequest {
            message_id: id.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(found.messages.len() == 1, "{found:?}");
    Ok((in_list, found.messages[0].redrivable))
}

/// A redrive to a recipient the broker no longer serves (taken out of the registry, or no
/// longer accepting the kind, since the message was accepted) is refused with what to do:
/// the message would never be taken, and its sender would get the same report again one
/// lifetime later. Nothing changes. The operator's list and search say so beforehand: not
/// redrivable (the same check).
#[tokio::test]
async fn a_redrive_to_a_recipient_no_longer_served_is_refused() -> anyhow::Result<()> {
    redrive_to_a_recipient_no_longer_served(false).await
}

/// As [`a_redrive_to_a_recipient_no_longer_served_is_refused`], with the registry changed
/// by a reload (SIGHUP) instead of a restart: the redrive and the listings ask the
/// registry in force.
#[tokio::test]
async fn a_redrive_to_a_recipient_a_reload_no_longer_serves_is_refused() -> anyhow::Result<()> {
    redrive_to_a_recipient_no_longer_served(true).await
}

/// The registry loses INT-IOM and BE-PAYOKE's referrals, by a reload or a restart.
async fn redrive_to_a_recipient_no_longer_served(reload: bool) -> anyhow::Result<()> {
    let mut s = scenario().await?;
    {
        let mut op = operator(&s.t)?;
        for id in [&s.dead, &s.expired] {
            assert_eq!(listed_redrivable(&mut op, id).await?, (true, true));
        }
    }
    // the operator takes INT-IOM out of the registry, and referrals from BE-PAYOKE's
    s.t.config.participants.retain(|p| p.id != "INT-IOM");
    for p in &mut s.t.config.participants {
        if p.id == "BE-PAYOKE" {
            p.accepts.retain(|kind| kind != "referral");
        }
    }
    if reload {
        s.t.broker.reload_registry(&s.t.config.participants)?;
    } else {
        s.t.restart().await?;
    }
    let mut nl = s.t.client("NL-NRM")?;
    let mut op = operator(&s.t)?;
    for (id, says, state) in [
        (
            &s.dead,
            "INT-IOM, which is no longer in this broker's registry",
            pb::MessageState::DeadLettered,
        ),
        (
            &s.expired,
            "a referral, which BE-PAYOKE no longer accepts",
            pb::MessageState::Expired,
        ),
    ] {
        let refused = op
            .redrive(pb::RedriveRequest {
                message_id: id.clone(),
                ..Default::default()
            })
            .await;
        let status = assert_code(refused, Code::FailedPrecondition, "redrive");
        assert!(status.message().contains(says), "{}", status.message());
        assert!(status.message().contains("purge"), "{}", status.message());
        assert_eq!(state_of(&mut nl, id).await?, state);
        assert_eq!(
            listed_redrivable(&mut op, id).await?,
            (false, false),
            "listed as redrivable, refused: {id}"
        );
    }
    Ok(())
}

/// A refused redrive changed nothing, and says so whatever happens after: the
/// record it reads again only to say why (failing here) must not turn its
/// FAILED_PRECONDITION into UNAVAILABLE, a "retry later" for what never will be.
#[tokio::test]
async fn a_refused_redrive_stays_refused_when_reading_why_fails() -> anyhow::Result<()> {
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let waiting = marked("BE-PAYOKE", Kind::Referral, 1);
    submit(&mut nl, waiting.clone()).await?;
    let mut op = operator(&t)?;
    let redrive = pb::RedriveRequest {
        message_id: waiting.message_id.clone(),
        ..Default::default()
    };
    let refused = assert_code(
        op.redrive(redrive.clone()).await,
        Code::FailedPrecondition,
        "redrive of a waiting message",
    );
    assert!(
        refused.message().contains("waits for delivery already"),
        "{}",
        refused.message()
    );
    // (the read before the redrive, of the recipient to check, still works)
    store
        .reads_passing
        .store(1, std::sync::atomic::Ordering::SeqCst);
    store
        .fail_reads
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_code(
        op.redrive(redrive).await,
        Code::FailedPrecondition,
        "redrive of a waiting message, reads failing",
    );
    Ok(())
}

/// A redrive goes only to a recipient the broker still serves, which it checks on the
/// message's record. When that read fails the redrive is refused (UNAVAILABLE, to retry),
/// not made unchecked: it used to go through, for a message the listings showed as not
/// redrivable, to a recipient no longer in the registry.
#[tokio::test]
async fn a_redrive_whose_recipient_cannot_be_read_is_refused() -> anyhow::Result<()> {
    use trmx_broker::store::{BrokerStore as _, NewMessage, SearchFilter, State};
    use trmx_proto::envelope::Priority;
    use trmx_proto::{CaseRef, ParticipantId};

    let (t, store) = TestBroker::start_with_faulty_store().await?;
    // accepted when XX-GONE was served; it is no longer in the registry
    let id = MessageId::new_v7();
    let now = t.clock.now_millis();
    let accepted = store
        .submit(
            NewMessage {
                message_id: id,
                sender: ParticipantId::parse("NL-NRM")?,
                recipient: ParticipantId::parse("XX-GONE")?,
                kind: Kind::Referral,
                case_ref: CaseRef::new_random(),
                in_reply_to: None,
                priority: Priority::Normal,
                created_at: now,
                expires_at: now + 1_000,
                content_type: "application/octet-stream".into(),
                payload: payload(1).into(),
                payload_sha256: [0; 32],
                fingerprint: [1; 32],
            },
            now,
        )
        .await?;
    anyhow::ensure!(
        matches!(accepted, trmx_broker::store::SubmitOutcome::Accepted(_)),
        "{accepted:?}"
    );
    t.advance(Duration::from_secs(2));
    assert_eq!(store.tick(t.clock.now_millis()).await?.expired, 1);

    let mut op = operator(&t)?;
    store
        .fail_reads
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_code(
        op.redrive(pb::RedriveRequest {
            message_id: id.to_string(),
            ..Default::default()
        })
        .await,
        Code::Unavailable,
        "redrive, the record unreadable",
    );
    store
        .fail_reads
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let page = store
        .search(SearchFilter {
            message_id: Some(id),
            ..SearchFilter::default()
        })
        .await?;
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].state, State::Expired, "redriven unchecked");
    Ok(())
}

/// A redrive whose flush fails answers UNAVAILABLE, but its write stays and is made
/// durable by the next flush: the message waits again, yet the wake-up of its
/// recipient's stream was lost with the flush, so a connected recipient with nothing
/// else coming would not be sent it. The operator's retry is refused (the message
/// waits already) and wakes that stream.
#[tokio::test]
async fn a_redrive_retried_after_a_failed_flush_is_delivered_to_a_waiting_stream()
-> anyhow::Result<()> {
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut env = marked("BE-PAYOKE", Kind::Referral, 1);
    env.expires_at = Some(to_timestamp(t.clock.now() + Duration::from_secs(1)));
    let expired = env.message_id.clone();
    submit(&mut nl, env).await?;
    t.advance(Duration::from_secs(2));
    // (this broker's timer loop ticks only when a timer is due, as it last saw)
    use trmx_broker::store::BrokerStore as _;
    assert_eq!(store.tick(t.clock.now_millis()).await?.expired, 1);
    wait_state(&mut nl, &expired, pb::MessageState::Expired).await?;
    // (its non-delivery report goes to NL-NRM; BE-PAYOKE's queue is empty)
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 1).await?;
    expect_quiet(&mut stream).await?;

    let mut op = operator(&t)?;
    let redrive = pb::RedriveRequest {
        message_id: expired.clone(),
        ..Default::default()
    };
    store.faults().set_failing(true);
    assert_code(
        op.redrive(redrive.clone()).await,
        Code::Unavailable,
        "redrive, flush failing",
    );
    store.faults().set_failing(false);
    let refused = assert_code(
        op.redrive(redrive).await,
        Code::FailedPrecondition,
        "redrive retried",
    );
    assert!(
        refused.message().contains("waits for delivery already"),
        "{}",
        refused.message()
    );
    let delivery = next(&mut stream)
        .await
        .context("the redriven message was not sent to its recipient's open stream")?;
    assert_eq!((id_of(&delivery), delivery.attempt), (expired, 1));
    Ok(())
}

/// A change whose flush fails keeps its write, made durable by the next flush, but
/// the wake-ups of the streams it concerned went with the failed flush: a submit
/// (its retry is a duplicate, which wakes nobody) would wait behind an idle
/// connected recipient until something else woke it. Once the store makes writes
/// durable again (the timer loop's next tick; here a tick and an operator read),
/// every stream looks.
#[tokio::test]
async fn a_submit_whose_flush_failed_is_delivered_once_the_store_recovers() -> anyhow::Result<()> {
    use trmx_broker::store::BrokerStore as _;
    let (t, store) = TestBroker::start_with_faulty_store().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 1).await?;
    expect_quiet(&mut stream).await?;

    let env = marked("BE-PAYOKE", Kind::Referral, 1);
    store.faults().set_failing(true);
    let failed = submit(&mut nl, env.clone()).await;
    assert_eq!(
        failed.as_ref().map_err(tonic::Status::code).err(),
        Some(Code::Unavailable),
        "{failed:?}"
    );
    store.faults().set_failing(false);
    // what the timer loop's next tick does: a write made durable, through `stored`
    store.tick(t.clock.now_millis()).await?;
    let mut op = operator(&t)?;
    op.list_queues(pb::ListQueuesRequest::default()).await?;
    let again = submit(&mut nl, env.clone()).await?;
    assert!(again.duplicate, "{again:?}");
    let delivery = next(&mut stream)
        .await
        .context("the message was not sent to its recipient's open stream")?;
    assert_eq!(id_of(&delivery), env.message_id);
    Ok(())
}

/// Message ids are unique per sender only. A purge of an id two senders used
/// changes nothing until the operator names the sender, and then touches only
/// that sender's message.
#[tokio::test]
async fn a_purge_of_an_id_two_senders_used_must_name_the_sender() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut iom = t.client("INT-IOM")?;
    let ours = marked("BE-PAYOKE", Kind::FollowUp, 1);
    let mut theirs = marked("NL-NRM", Kind::FollowUp, 2);
    theirs.message_id = ours.message_id.clone();
    let id = ours.message_id.clone();
    submit(&mut nl, ours).await?;
    submit(&mut iom, theirs).await?;

    let refused = admin(&t, &["purge", &id, "--reason", "misaddressed"]).await?;
    assert!(!refused.status.success());
    let said = stderr(&refused);
    assert!(
        said.contains("NL-NRM") && said.contains("INT-IOM") && said.contains("sender"),
        "{said}"
    );
    for client in [&mut nl, &mut iom] {
        assert_eq!(state_of(client, &id).await?, pb::MessageState::Accepted);
    }

    let purged = admin(
        &t,
        &[
            "purge",
            &id,
            "--reason",
            "misaddressed",
            "--sender",
            "INT-IOM",
        ],
    )
    .await?;
    assert!(purged.status.success(), "{}", stderr(&purged));
    assert_eq!(state_of(&mut iom, &id).await?, pb::MessageState::Purged);
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::Accepted);
    Ok(())
}

#[tokio::test]
async fn a_tampered_audit_log_is_found_at_the_right_record_offline_and_online() -> anyhow::Result<()>
{
    let mut t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    for n in 0..5 {
        submit(&mut nl, marked("BE-PAYOKE", Kind::Referral, n)).await?;
    }
    let mut op = operator(&t)?;
    op.search_messages(pb::SearchMessagesRequest {
        sender: "NL-NRM".into(),
        ..Default::default()
    })
    .await?;
    let intact = op
        .verify_audit(pb::VerifyAuditRequest {})
        .await?
        .into_inner();
    assert!(intact.intact && intact.records >= 6, "{intact:?}");
    drop(op);
    drop(nl);
    t.broker.shutdown().await?;
    let data_dir = t.config.data_dir.clone();

    // offline, intact
    let verified = broker_cli(vec![
        "audit".into(),
        "verify".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ])
    .await?;
    assert!(verified.status.success(), "{}", stderr(&verified));
    assert!(
        stdout(&verified).contains("intact"),
        "{}",
        stdout(&verified)
    );

    // change one byte of record 3 (a lifecycle record)
    let tampered =
        trmx_broker::store::tamper_audit_record(&data_dir, 3, |value| value[12] ^= 0x01)?;
    assert!(tampered);
    let report = trmx_broker::store::verify_audit_offline(&data_dir)?;
    assert_eq!(report.first_broken, Some(3), "{report:?}");
    let verified = broker_cli(vec![
        "audit".into(),
        "verify".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ])
    .await?;
    assert!(!verified.status.success());
    let line = stderr(&verified);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("broken at record 3"), "{line}");

    // online, after a restart: the same record, through the RPC and the CLI
    t.restart().await?;
    let mut op = operator(&t)?;
    let report = op
        .verify_audit(pb::VerifyAuditRequest {})
        .await?
        .into_inner();
    assert!(!report.intact);
    assert_eq!(report.first_broken, 3, "{report:?}");
    let cli = admin(&t, &["audit", "verify"]).await?;
    assert!(!cli.status.success());
    assert!(
        stderr(&cli).contains("broken at record 3"),
        "{}",
        stderr(&cli)
    );

    // offline while the broker runs: refused with one clear line
    let locked = broker_cli(vec![
        "audit".into(),
        "verify".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ])
    .await?;
    assert!(!locked.status.success());
    assert_eq!(stderr(&locked).lines().count(), 1, "{}", stderr(&locked));
    Ok(())
}

#[tokio::test]
async fn node_certificates_cannot_use_the_operator_service() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let paths = t.pki.participant("NL-NRM")?;
    let channel = client_channel(&t.addr.to_string(), &paths, &ClientOptions::default())?;
    let mut node = OperatorClient::new(channel);
    let status = assert_code(
        node.list_queues(pb::ListQueuesRequest {}).await,
        Code::PermissionDenied,
        "node certificate on Operator",
    );
    assert!(status.message().contains("operator certificate"));
    assert_code(
        node.purge(pb::PurgeRequest {
            message_id: trmx_proto::MessageId::new_v7().to_string(),
            reason: "because".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "node certificate purging",
    );
    // and operator certificates still cannot use Exchange
    let mut op_exchange = t.operator_client("bob")?;
    assert_code(
        submit(&mut op_exchange, referral("BE-PAYOKE")).await,
        Code::PermissionDenied,
        "operator certificate on Exchange",
    );
    Ok(())
}

#[tokio::test]
async fn every_admin_command_works_and_never_prints_a_payload() -> anyhow::Result<()> {
    let s = scenario().await?;
    let t = &s.t;

    let out = admin(t, &["queues"]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains("RECIPIENT") && table.contains("BE-PAYOKE"),
        "{table}"
    );
    let be_row = table
        .lines()
        .find(|l| l.starts_with("BE-PAYOKE"))
        .context("row")?;
    let cells: Vec<&str> = be_row.split_whitespace().collect();
    assert_eq!(&cells[1..3], ["2", "1"], "{be_row}");
    let queues = json(&admin(t, &["--json", "queues"]).await?)?;
    assert!(
        queues["queues"].as_array().is_some_and(|q| q.len() == 3),
        "{queues}"
    );

    let watched = admin(t, &["queues", "--watch", "1", "--count", "2"]).await?;
    assert!(watched.status.success(), "{}", stderr(&watched));
    let screen = stdout(&watched);
    assert_eq!(screen.matches("\x1b[2J\x1b[H").count(), 2, "{screen}");

    let out = admin(t, &["participants"]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("yes (1)"), "{}", stdout(&out));
    json(&admin(t, &["participants", "--json"]).await?)?;

    let out = admin(
        t,
        &["messages", "--sender", "NL-NRM", "--state", "dead-lettered"],
    )
    .await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains(&s.dead) && table.contains(&s.rejected),
        "{table}"
    );
    assert!(
        table.contains("MAX_ATTEMPTS") && table.contains("INVALID_BODY"),
        "{table}"
    );
    assert!(!table.contains(&s.in_flight));
    let found = json(&admin(t, &["--json", "messages", "--id", &s.in_flight]).await?)?;
    assert_eq!(
        found["messages"][0]["state"], "MESSAGE_STATE_IN_FLIGHT",
        "{found}"
    );
    let case = found["messages"][0]["caseRef"]
        .as_str()
        .context("caseRef")?
        .to_owned();
    let by_case = json(&admin(t, &["--json", "messages", "--case", &case]).await?)?;
    assert_eq!(by_case["messages"].as_array().map(Vec::len), Some(1));

    let out = admin(t, &["dead-letters"]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&s.expired), "{}", stdout(&out));
    // a page: the table says how to get the next one, and that works
    let out = admin(t, &["dead-letters", "--limit", "2"]).await?;
    let table = stdout(&out);
    let token = table
        .split("--page-token ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("the next page's token")?;
    let out = admin(t, &["dead-letters", "--page-token", token]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let rest = stdout(&out);
    assert!(
        rest.contains(&s.expired) && rest.contains("1 message(s)\n"),
        "{rest}"
    );
    let dead = json(&admin(t, &["dead-letters", "--json"]).await?)?;
    assert_eq!(dead["messages"].as_array().map(Vec::len), Some(3));

    let refused = admin(t, &["redrive", &s.rejected]).await?;
    assert!(!refused.status.success());
    let line = stderr(&refused);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.contains("FAILED_PRECONDITION") && line.contains("rejected"),
        "{line}"
    );
    let out = admin(t, &["redrive", &s.dead]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    // dead-lettered after its 3 attempts: the redrive says they count no longer
    assert!(
        stdout(&out).contains("redriven")
            && stdout(&out).contains("its attempts count from 0 again, 3 before"),
        "{}",
        stdout(&out)
    );

    let refused = admin(t, &["purge", &s.queued[0], "--reason", "no"]).await?;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("INVALID_ARGUMENT: reason"),
        "{}",
        stderr(&refused)
    );
    let missing = admin(t, &["purge", &s.queued[0]]).await?;
    assert!(
        !missing.status.success(),
        "a purge without --reason must fail"
    );
    let purged = json(
        &admin(
            t,
            &[
                "--json",
                "purge",
                &s.queued[0],
                "--reason",
                "wrong recipient",
            ],
        )
        .await?,
    )?;
    assert_eq!(purged["messageId"], s.queued[0].as_str());

    let out = admin(t, &["audit", "verify"]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("intact"), "{}", stdout(&out));

    let out = admin(t, &["stats"]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("messages per corridor"),
        "{}",
        stdout(&out)
    );
    let csv = admin(t, &["stats", "--csv"]).await?;
    assert!(csv.status.success(), "{}", stderr(&csv));
    assert!(
        stdout(&csv).starts_with("section,month,"),
        "{}",
        stdout(&csv)
    );
    json(&admin(t, &["stats", "--json"]).await?)?;

    // failures: one line, non-zero
    let bad = admin(t, &["messages", "--state", "lost"]).await?;
    assert!(!bad.status.success());
    assert_eq!(stderr(&bad).lines().count(), 1, "{}", stderr(&bad));
    let node = t.pki.participant("BE-PAYOKE")?;
    let denied = broker_cli(vec![
        "admin".into(),
        "--broker".into(),
        t.addr.to_string(),
        "--ca".into(),
        node.ca.display().to_string(),
        "--cert".into(),
        node.cert.display().to_string(),
        "--key".into(),
        node.key.display().to_string(),
        "queues".into(),
    ])
    .await?;
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&denied)
    );
    assert_eq!(stderr(&denied).lines().count(), 1);
    let unreachable = broker_cli(vec![
        "admin".into(),
        "--broker".into(),
        "127.0.0.1:1".into(),
        "--ca".into(),
        node.ca.display().to_string(),
        "--cert".into(),
        node.cert.display().to_string(),
        "--key".into(),
        node.key.display().to_string(),
        "queues".into(),
    ])
    .await?;
    assert!(!unreachable.status.success());
    assert_eq!(
        stderr(&unreachable).lines().count(),
        1,
        "{}",
        stderr(&unreachable)
    );
    Ok(())
}

/// A range that ends before it starts names the field the operator set: with `until`
/// unset (now), a `from` in the future is the bad one, not an `until` never given.
#[tokio::test]
async fn statistics_from_the_future_name_the_field_given() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut op = operator(&t)?;
    let refused = op
        .get_statistics(pb::GetStatisticsRequest {
            from: Some(to_timestamp(t.clock.now() + Duration::from_secs(86_400))),
            until: None,
        })
        .await;
    let status = assert_code(refused, Code::InvalidArgument, "statistics from tomorrow");
    assert!(
        status.message().starts_with("from:"),
        "{}",
        status.message()
    );
    Ok(())
}

#[tokio::test]
async fn statistics_come_from_metadata_and_suppress_small_counts() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    // 6 referrals NL → BE, each answered; 2 follow-ups NL → INT-IOM
    let mut referrals = Vec::new();
    for n in 0..6 {
        let env = marked("BE-PAYOKE", Kind::Referral, n);
        referrals.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    for n in 0..2 {
        submit(&mut nl, marked("INT-IOM", Kind::FollowUp, 10 + n)).await?;
    }
    t.advance(Duration::from_secs(3600));
    for (n, id) in referrals.iter().enumerate() {
        let mut answer = marked("NL-NRM", Kind::ReferralResponse, 20 + n);
        answer.in_reply_to = id.clone();
        submit(&mut be, answer).await?;
        t.advance(Duration::from_secs(60));
    }
    let mut op = operator(&t)?;
    let stats = op
        .get_statistics(pb::GetStatisticsRequest::default())
        .await?
        .into_inner();
    assert_no_payload("GetStatistics", &encoded(&stats));
    let corridor = |from: &str, to: &str, kind: pb::MessageKind| {
        stats
            .corridors
            .iter()
            .find(|c| {
                c.sender_country == from && c.recipient_country == to && c.kind == kind as i32
            })
            .and_then(|c| c.messages)
    };
    let nl_be = corridor("NL", "BE", pb::MessageKind::Referral).context("NL→BE")?;
    assert_eq!((nl_be.value, nl_be.suppressed), (6, false));
    let nl_int = corridor("NL", "INT", pb::MessageKind::FollowUp).context("NL→INT")?;
    assert_eq!((nl_int.value, nl_int.suppressed), (0, true));
    assert!(corridor("BE", "NL", pb::MessageKind::ReferralResponse).is_some());
    let times = stats
        .response_times
        .iter()
        .find(|r| r.request_kind == pb::MessageKind::Referral as i32)
        .context("no referral response times")?;
    assert_eq!(times.pairs.map(|p| p.value), Some(6));
    let median = times.median.context("median")?;
    assert!(
        (3600..3600 + 6 * 60).contains(&median.seconds),
        "{median:?}"
    );
    let p90 = times.p90.context("p90")?;
    assert!(p90.seconds >= median.seconds);

    let csv = admin(&t, &["stats", "--csv"]).await?;
    assert!(csv.status.success(), "{}", stderr(&csv));
    let text = stdout(&csv);
    assert!(text.contains(",NL,INT,follow-up,,messages,<5"), "{text}");
    assert!(text.contains(",NL,BE,referral,,messages,6"), "{text}");
    assert!(
        text.contains("referral,referral-response,median_seconds,"),
        "{text}"
    );
    let table = stdout(&admin(&t, &["stats"]).await?);
    assert!(
        table.contains("<5") && table.contains("NL -> BE"),
        "{table}"
    );

    // a range that ends before it starts is refused
    let bad = op
        .get_statistics(pb::GetStatisticsRequest {
            from: Some(to_timestamp(t.clock.now())),
            until: Some(to_timestamp(t.clock.now() - Duration::from_secs(1))),
        })
        .await;
    assert_code(bad, Code::InvalidArgument, "inverted range");
    Ok(())
}

/// Statistics are aggregates with counts under 5 suppressed, yet two ranges a
/// millisecond apart differ by exactly one message: its corridor, kind and
/// acceptance time. That is one referral's metadata, which a search gives only
/// with an audit record, so statistics are audited too, with their range.
#[tokio::test]
async fn statistics_can_single_out_one_message_so_they_are_audited() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut accepted = Vec::new();
    for n in 0..6 {
        let receipt = submit(&mut nl, marked("BE-PAYOKE", Kind::Referral, n)).await?;
        accepted.push(receipt.accepted_at.context("accepted_at")?);
        t.advance(Duration::from_secs(1));
    }
    let op = operator(&t)?;
    let last = trmx_proto::time::from_timestamp(&accepted[5])?;
    let count_until = |until: SystemTime| {
        let request = pb::GetStatisticsRequest {
            from: None,
            until: Some(to_timestamp(until)),
        };
        let mut op = op.clone();
        async move {
            let stats = op.get_statistics(request).await?.into_inner();
            let cell = stats
                .corridors
                .iter()
                .find(|c| c.kind == pb::MessageKind::Referral as i32)
                .and_then(|c| c.messages)
                .context("no NL → BE referrals")?;
            anyhow::ensure!(!cell.suppressed, "{cell:?}");
            anyhow::Ok(cell.value)
        }
    };
    let before = count_until(last).await?;
    let with = count_until(last + Duration::from_millis(1)).await?;
    assert_eq!((before, with), (5, 6), "one referral, accepted at that ms");

    let data_dir = t.config.data_dir.clone();
    drop(op);
    t.broker.shutdown().await?;
    let records = trmx_broker::store::audit_records_offline(&data_dir)?;
    let audited: Vec<(String, u64, u64)> = records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::Operator(OperatorAction::Statistics {
                operator,
                from,
                until,
            }) => Some((operator.clone(), *from, *until)),
            _ => None,
        })
        .collect();
    let last_ms = trmx_proto::time::to_millis(last);
    assert_eq!(
        audited,
        vec![
            ("alice".to_owned(), 0, last_ms),
            ("alice".to_owned(), 0, last_ms + 1),
        ]
    );
    t.restart().await?;
    Ok(())
}

#[tokio::test]
async fn store_compact_on_a_stopped_broker_keeps_its_messages() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let data_dir = t.config.data_dir.clone();
    let store = |command: &str| {
        broker_cli(vec![
            "store".into(),
            command.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ])
    };
    let compact = || store("compact");
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    // history for sled to keep: delivered and acknowledged 32 KiB messages
    let big = vec![0x5a_u8; 32 * 1024];
    let mut stream = receive(&mut be, 0).await?;
    for _ in 0..20 {
        let env = envelope("BE-PAYOKE", Kind::Referral, &big);
        submit(&mut nl, env).await?;
        let id = id_of(&next(&mut stream).await?);
        ack(&mut be, [&id]).await?;
    }
    drop(stream);
    let waiting = referral("BE-PAYOKE");
    submit(&mut nl, waiting.clone()).await?;

    // refused while the broker runs, with one line that says why
    for command in ["compact", "verify"] {
        let locked = store(command).await?;
        assert!(!locked.status.success());
        assert_eq!(stderr(&locked).lines().count(), 1, "{}", stderr(&locked));
        assert!(stderr(&locked).contains("locked"), "{}", stderr(&locked));
        // sled's own text carries the OS error in Rust's debug form
        assert!(!stderr(&locked).contains("Os {"), "{}", stderr(&locked));
    }
    let verify = || async {
        let out = store("verify").await?;
        assert!(out.status.success(), "{}", stdout(&out));
        anyhow::Ok(stdout(&out))
    };

    drop((nl, be));
    t.broker.shutdown().await?;
    let text = verify().await?;
    // 20 delivered messages, their 20 receipts, and the one waiting
    assert!(text.contains("records            41"), "{text}");
    let last_run = trmx_broker::last_run::read(&data_dir);
    assert!(
        matches!(last_run, trmx_broker::last_run::LastRun::At(_)),
        "{last_run:?}"
    );
    let out = compact().await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("compacted"), "{text}");
    assert!(text.contains("the original store is kept at"), "{text}");
    // the copy's indexes hold what its records imply
    let text = verify().await?;
    assert!(text.contains("the store is consistent"), "{text}");
    // the last-run file came along: check-config still checks the clock
    assert_eq!(trmx_broker::last_run::read(&data_dir), last_run);

    // the restarted broker has every message, and takes new ones
    t.restart().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), waiting.message_id);
    let mut nl = t.client("NL-NRM")?;
    let after = referral("BE-PAYOKE");
    submit(&mut nl, after.clone()).await?;
    assert_eq!(id_of(&next(&mut stream).await?), after.message_id);
    Ok(())
}

/// `trmx-broker store compact | head -0` (stdout closed before the tool writes) panicked
/// with exit status 101 after compacting: a script saw a failure and compacted again; and
/// `store accept-clock` panicked before it wrote the last-run file that `check-config`
/// checks the clock with. Each offline command now ends quietly, with success, when nobody
/// reads its report. (The pipe's reader is closed before the tool starts, so every write
/// meets it.)
#[tokio::test]
async fn offline_store_commands_whose_stdout_is_closed_are_no_panic() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let data_dir = t.config.data_dir.clone();
    let mut nl = t.client("NL-NRM")?;
    let waiting = referral("BE-PAYOKE");
    submit(&mut nl, waiting.clone()).await?;
    drop(nl);
    t.broker.shutdown().await?;
    std::fs::remove_file(trmx_broker::last_run::path(&data_dir))?;

    for command in ["verify", "accept-clock", "compact"] {
        let data_dir = data_dir.clone();
        let out = tokio::task::spawn_blocking(move || {
            let (reader, writer) = std::io::pipe()?;
            drop(reader);
            Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
                .args(["store", command, "--data-dir"])
                .arg(&data_dir)
                .env_remove("TRMX_BROKER_CONFIG")
                .env_remove("RUST_BACKTRACE")
                .stdout(writer)
                .output()
        })
        .await??;
        assert_eq!(out.status.code(), Some(0), "{command}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{command}");
    }
    assert!(
        matches!(
            trmx_broker::last_run::read(&data_dir),
            trmx_broker::last_run::LastRun::At(_)
        ),
        "accept-clock wrote no last-run file"
    );
    // the compacted store has the message
    t.restart().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), waiting.message_id);
    Ok(())
}

#[tokio::test]
async fn admin_by_ip_address_says_how_to_give_the_broker_name() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    // a broker certificate for its DNS name only, as most deployments have
    let spec = trmx_certs::IssueSpec::broker("test-1", vec!["localhost".into()], Vec::new());
    t.pki.federation.issue("broker-test-1", &spec)?;
    t.broker.reload_tls()?;

    let out = admin(&t, &["participants"]).await?;
    assert!(!out.status.success());
    let text = stderr(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("not valid for name"), "{text}");
    assert!(
        text.contains("--server-name") && text.contains("TRMX_ADMIN_SERVER_NAME"),
        "{text}"
    );

    let out = admin(&t, &["--server-name", "localhost", "participants"]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn admin_with_a_revoked_certificate_says_it_is_revoked() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let cert = t.pki.federation.operator("carol")?;
    let queues = || {
        broker_cli(
            [
                "admin",
                "--broker",
                &t.addr.to_string(),
                "--ca",
                &t.pki.federation.ca_cert_path().display().to_string(),
                "--cert",
                &cert.cert.display().to_string(),
                "--key",
                &cert.key.display().to_string(),
                "queues",
            ]
            .map(str::to_owned)
            .to_vec(),
        )
    };
    let out = queues().await?;
    assert!(out.status.success(), "{}", stderr(&out));
    t.pki.federation.revoke(&cert)?;
    t.broker.reload_tls()?;
    let out = queues().await?;
    assert!(!out.status.success());
    let text = stderr(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("Revoked"), "{text}");
    assert!(!text.contains("--server-name"), "{text}");
    Ok(())
}

#[tokio::test]
async fn offline_commands_on_a_missing_directory_say_so() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nonexistent").display().to_string();
    for command in [["store", "verify"], ["audit", "verify"]] {
        let mut args: Vec<String> = command.iter().map(|a| (*a).to_owned()).collect();
        args.extend(["--data-dir".to_owned(), missing.clone()]);
        let out = broker_cli(args).await?;
        assert!(!out.status.success());
        let text = stderr(&out);
        assert!(text.contains("does not exist"), "{command:?}: {text}");
        assert!(!text.contains("running"), "{command:?}: {text}");
    }
    Ok(())
}
