//! Resource bounds (issue 7, item 5), beyond the broker's own limit tests:
//! a recipient that never acknowledges, a client that opens too many
//! `Receive` streams, a flooding sender, and free disk under the watermark —
//! each refused or bounded while another participant keeps working. The
//! ratio measurements (RSS with a 100,000- vs a 10,000-message backlog,
//! p99 latency during a flood) are long: `trmx-chaos bounds`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Code;
use trmx_proto::body::Body;
use trmx_proto::{Kind, pb};
use trmx_tests::harness::{
    Exchange, Harness, WAIT, broker_status, envelope, expect_quiet, inbox, next_item, wait_until,
};
use trmx_tests::story::EXAMPLES;

type TestResult = anyhow::Result<()>;

const NL: &str = "NL-NRM";
const BE: &str = "BE-PAYOKE";
const NG: &str = "NG-NAPTIP";

async fn submit(client: &mut Exchange, env: pb::Envelope) -> Result<String, tonic::Status> {
    let id = env.message_id.clone();
    client
        .submit(pb::SubmitRequest {
            envelope: Some(env),
        })
        .await?;
    Ok(id)
}

/// A referral with a valid body (the demo's example document).
fn referral(to: &str) -> pb::Envelope {
    let body = Body::from_json(Kind::Referral, EXAMPLES[0]).expect("the example is valid");
    envelope(to, Kind::Referral, body.encode())
}

async fn receive(
    client: &mut Exchange,
    max_in_flight: u32,
) -> Result<tonic::Streaming<pb::Delivery>, tonic::Status> {
    Ok(client
        .receive(pb::ReceiveRequest { max_in_flight })
        .await?
        .into_inner())
}

fn id_of(delivery: &pb::Delivery) -> String {
    delivery
        .envelope
        .as_ref()
        .map(|e| e.message_id.clone())
        .unwrap_or_default()
}

async fn ack(client: &mut Exchange, ids: &[String]) -> anyhow::Result<()> {
    let results = client
        .ack(pb::AckRequest {
            message_ids: ids.to_vec(),
        })
        .await?
        .into_inner()
        .results;
    anyhow::ensure!(
        results
            .iter()
            .all(|r| r.result == pb::AckResult::Acknowledged as i32),
        "{results:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_that_never_acknowledges_holds_its_window_and_gets_bounded_redeliveries()
-> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.exchange(NL)?;
    let mut sent = HashSet::new();
    for _ in 0..3 {
        sent.insert(submit(&mut nl, referral(BE)).await?);
    }
    // The stream holds max_in_flight unacknowledged deliveries, then nothing more.
    let mut be = h.exchange(BE)?;
    let mut stream = receive(&mut be, 2).await?;
    let first = [
        id_of(&next_item(&mut stream).await?),
        id_of(&next_item(&mut stream).await?),
    ];
    expect_quiet(&mut stream).await?;
    drop(stream);

    // The shortest ack timeout and two attempts: a recipient that never
    // acknowledges sees each message twice, with backoff, then never again;
    // the sender gets a non-delivery report for each.
    h.stop_broker().await?;
    {
        let config = h.broker_config_mut();
        config.lifecycle.ack_timeout = Duration::from_secs(1);
        config.lifecycle.max_attempts = 2;
        config.lifecycle.backoff_base = Duration::from_millis(50);
        config.lifecycle.backoff_max = Duration::from_millis(100);
    }
    h.start_broker().await?;
    let mut be = h.exchange(BE)?;
    let mut stream = receive(&mut be, 8).await?;
    let mut attempts: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    // the two held before: their 2nd attempt; the third: its 1st and 2nd
    for _ in 0..4 {
        let delivery = next_item(&mut stream).await?;
        attempts
            .entry(id_of(&delivery))
            .or_default()
            .push(delivery.attempt);
    }
    let mut nl_reports = receive(&mut nl, 8).await?;
    let mut reported = HashSet::new();
    while reported.len() < sent.len() {
        let report = next_item(&mut nl_reports).await?;
        let env = report.envelope.unwrap();
        assert_eq!(env.kind, pb::MessageKind::NonDeliveryReport as i32);
        ack(&mut nl, std::slice::from_ref(&env.message_id)).await?;
        reported.insert(env.message_id);
    }
    // No redelivery storm: nothing more arrives once the attempts are spent.
    expect_quiet(&mut stream).await?;
    for id in &sent {
        let status = broker_status(&mut nl, id).await?;
        assert_eq!(
            status.state,
            pb::MessageState::DeadLettered as i32,
            "{status:?}"
        );
        assert_eq!(status.attempts, 2, "{status:?}");
        let seen = attempts.get(id).cloned().unwrap_or_default();
        let expected: Vec<u32> = if first.contains(id) {
            vec![2]
        } else {
            vec![1, 2]
        };
        assert_eq!(seen, expected, "{id}: {attempts:?}");
    }
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opening_too_many_streams_is_refused_and_nobody_else_is_affected() -> TestResult {
    let mut h = Harness::new().await?;
    h.broker_config_mut().limits.max_streams_per_participant = 3;
    h.start_broker().await?;
    let mut be = h.exchange(BE)?;
    let (tx, mut deliveries) = mpsc::channel(16);
    for _ in 0..3 {
        let mut stream = receive(&mut be, 1).await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(delivery)) = stream.message().await {
                if tx.send(id_of(&delivery)).await.is_err() {
                    break;
                }
            }
        });
    }
    for _ in 0..5 {
        let refused = receive(&mut be, 1).await.map(drop).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    // Its open streams still work, and so does everybody else.
    let mut ng = h.exchange(NG)?;
    let mut ng_stream = receive(&mut ng, 4).await?;
    let mut nl = h.exchange(NL)?;
    let mut to_be = HashSet::new();
    for _ in 0..3 {
        to_be.insert(submit(&mut nl, referral(BE)).await?);
    }
    let to_ng = submit(&mut nl, referral(NG)).await?;
    let mut got = HashSet::new();
    while got.len() < 3 {
        let id = tokio::time::timeout(WAIT, deliveries.recv())
            .await?
            .expect("delivery");
        got.insert(id);
    }
    assert_eq!(got, to_be);
    assert_eq!(id_of(&next_item(&mut ng_stream).await?), to_ng);
    let got: Vec<String> = got.into_iter().collect();
    ack(&mut be, &got).await?;
    ack(&mut ng, std::slice::from_ref(&to_ng)).await?;
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_sender_gets_resource_exhausted_while_another_keeps_submitting() -> TestResult {
    let mut h = Harness::new().await?;
    {
        let limits = &mut h.broker_config_mut().limits;
        limits.sender_rate_per_second = 40;
        limits.sender_rate_burst = 20;
        limits.max_envelope_bytes = 64 << 10;
        limits.max_queued_bytes_per_sender = 64 << 10;
        // Answer refusals at once: this test counts them (the held-back
        // refusal has a test of its own in the broker's suite).
        limits.refusal_delay = Duration::ZERO;
    }
    h.start_broker().await?;
    let flooder = h.exchange(NL)?;
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (mut client, counts) = (flooder.clone(), Arc::clone(&counts));
        flood.spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_millis(1500);
            while tokio::time::Instant::now() < end {
                let slot = match submit(&mut client, referral(NG)).await {
                    Ok(_) => 0,
                    Err(s) if s.code() == Code::ResourceExhausted => 1,
                    Err(_) => 2,
                };
                counts[slot].fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    // Meanwhile another participant submits at its own modest pace.
    let mut other = h.exchange(BE)?;
    let mut other_sent = Vec::new();
    for _ in 0..15 {
        other_sent.push(submit(&mut other, referral(NG)).await?);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    while flood.join_next().await.is_some() {}
    let [accepted, exhausted, other_errors] = [0, 1, 2].map(|i| counts[i].load(Ordering::SeqCst));
    assert!(exhausted > 0, "the flooder was never refused");
    assert_eq!(other_errors, 0, "the flooder saw other errors");
    // Its burst and its rate (or its queued-bytes quota), nothing more.
    assert!(accepted <= 20 + 40 * 2, "{accepted} flood submits accepted");
    // The other participant's messages are all there.
    for id in &other_sent {
        assert_eq!(
            broker_status(&mut other, id).await?.state,
            pb::MessageState::Accepted as i32
        );
    }

    // The quota: with the rate refilled, the flooder is still refused while its
    // queued bytes are over the quota, and accepted again once NG catches up.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut flooder = flooder;
    let mut refused = None;
    for _ in 0..200 {
        match submit(
            &mut flooder,
            envelope(NG, Kind::Referral, vec![7; 16 << 10]),
        )
        .await
        {
            Ok(_) => {}
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let refused = refused.expect("the quota refuses at last");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("bytes queued"), "{refused:?}");
    let mut ng = h.exchange(NG)?;
    let mut stream = receive(&mut ng, 64).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let big = envelope(NG, Kind::Referral, vec![7; 16 << 10]);
        if submit(&mut flooder, big).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flooder was not accepted again"
        );
        let delivery = next_item(&mut stream).await?;
        ack(&mut ng, &[id_of(&delivery)]).await?;
    }
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_disk_watermark_submits_are_refused_and_deliveries_continue() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.exchange(NL)?;
    let mut queued = Vec::new();
    for _ in 0..5 {
        queued.push(submit(&mut nl, referral(BE)).await?);
    }
    // The disk "fills up": no volume has this much free space.
    h.stop_broker().await?;
    h.broker_config_mut().limits.min_free_disk_bytes = 1 << 60;
    h.start_broker().await?;
    let mut nl = h.exchange(NL)?;
    let refused = submit(&mut nl, referral(BE)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("disk"), "{refused:?}");

    // The recipient's node still gets everything already accepted, and
    // acknowledges it; the sender's receipts still come.
    let be = h.start_node(BE).await?;
    wait_until(WAIT, "the queued messages delivered", || {
        let mut be = be.clone();
        let expected = queued.len();
        async move { Ok((inbox(&mut be).await?.len() == expected).then_some(())) }
    })
    .await?;
    for id in &queued {
        let status = wait_until(WAIT, "acknowledged", || {
            let mut nl = nl.clone();
            async move {
                let status = broker_status(&mut nl, id).await?;
                Ok((status.state == pb::MessageState::Acknowledged as i32).then_some(status))
            }
        })
        .await?;
        assert_eq!(status.attempts, 1);
    }
    let mut receipts = receive(&mut nl, 8).await?;
    for _ in 0..queued.len() {
        let receipt = next_item(&mut receipts).await?.envelope.unwrap();
        assert_eq!(receipt.kind, pb::MessageKind::DeliveryReceipt as i32);
        ack(&mut nl, &[receipt.message_id]).await?;
    }
    let again = submit(&mut nl, referral(BE)).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");

    // Space again: submits are accepted.
    h.stop_node(BE).await?;
    h.stop_broker().await?;
    h.broker_config_mut().limits.min_free_disk_bytes = 0;
    h.start_broker().await?;
    let mut nl = h.exchange(NL)?;
    submit(&mut nl, referral(BE)).await?;
    h.shutdown().await
}
