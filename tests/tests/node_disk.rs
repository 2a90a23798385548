//! The node when its own disk fails: a real broker, real nodes in this process over
//! real mutual TLS, and the node store's fault switch
//! ([`trmx_node::core::NodeCore::store_faults`]: every flush fails, as on a full disk,
//! until it is cleared). What a node has not made durable it must never acknowledge
//! to the broker (which would delete it), nor lose once the disk works again.

use std::time::Duration;

use tonic::Code;
use trmx_proto::Kind;
use trmx_proto::pb;
use trmx_tests::harness::{
    Api, Exchange, Harness, QUIET, WAIT, broker_status, inbox, json_request, node_status, outbox,
    send, wait_delivered, wait_outbox, wait_until, watch_all,
};
use trmx_tests::story::EXAMPLES;

type TestResult = anyhow::Result<()>;

const NL: &str = "NL-NRM";
const BE: &str = "BE-PAYOKE";

/// How long a test keeps a node's disk failing: long enough for a node that reconnects
/// at its quick test backoff to wear a message's attempts out several times over.
const OUTAGE: Duration = Duration::from_secs(3);

/// Attempts before the broker dead-letters a message, for these tests.
const MAX_ATTEMPTS: u32 = 3;

fn referral(key: &str, to: &str) -> pb::SendRequest {
    json_request(key, to, Kind::Referral, EXAMPLES[0])
}

fn broker_state(status: &pb::MessageStatus) -> pb::MessageState {
    pb::MessageState::try_from(status.state).unwrap()
}

/// A broker with few attempts per message, running.
async fn broker() -> anyhow::Result<Harness> {
    let mut h = Harness::new().await?;
    h.broker_config_mut().lifecycle.max_attempts = MAX_ATTEMPTS;
    h.start_broker().await?;
    Ok(h)
}

/// Waits until the node's receive stream is open.
async fn connected(api: &Api) -> anyhow::Result<()> {
    wait_until(WAIT, "the node connected", || {
        let mut api = api.clone();
        async move { Ok(node_status(&mut api).await?.broker_connected.then_some(())) }
    })
    .await
}

/// Waits until the node's status says its store fails; returns what it says.
async fn store_failing(api: &Api) -> anyhow::Result<String> {
    wait_until(WAIT, "the status to say the store fails", || {
        let mut api = api.clone();
        async move {
            let error = node_status(&mut api).await?.store_error;
            Ok((!error.is_empty()).then_some(error))
        }
    })
    .await
}

/// The broker's status of `id`, which `direct` (its sender) sent.
async fn on_broker(direct: &Exchange, id: &str) -> anyhow::Result<pb::MessageStatus> {
    broker_status(&mut direct.clone(), id).await
}

/// A delivery that comes while the recipient's disk fails is not acknowledged (the
/// broker would delete it), and is not worn out either: the node reconnected at once
/// after each failed store, and the broker counts each delivery a stream takes and does
/// not acknowledge as a failed attempt, so a disk that failed for a few minutes
/// dead-lettered the node's messages, and their senders got non-delivery reports. Once
/// the disk works, without a restart, the message arrives, once, and the status, which
/// said the store fails, says nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_while_the_recipients_disk_fails_waits_and_arrives_once_after() -> TestResult {
    let mut h = broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;
    connected(&be).await?;
    let faults = h.node_store_faults(BE)?;
    faults.set_failing(true);
    let id = send(&mut nl, referral("disk-1", BE)).await?.message_id;
    let direct = h.exchange(NL)?;
    wait_until(WAIT, "the message delivered to BE", || {
        let direct = direct.clone();
        let id = id.clone();
        async move {
            // (not found until the node's submit reaches the broker)
            let status = on_broker(&direct, &id).await.ok();
            Ok(status.filter(|s| s.attempts >= 1).map(drop))
        }
    })
    .await?;
    let said = store_failing(&be).await?;
    assert!(said.contains("disk"), "{said}");

    tokio::time::sleep(OUTAGE).await;
    let status = on_broker(&direct, &id).await?;
    assert!(
        matches!(
            broker_state(&status),
            pb::MessageState::Accepted | pb::MessageState::InFlight
        ),
        "acknowledged or worn out while the recipient's disk fails: {status:?}"
    );
    assert!(
        status.attempts < MAX_ATTEMPTS,
        "the failing disk used the message's attempts up: {status:?}"
    );
    assert!(inbox(&mut be).await?.is_empty(), "listed, not on disk");

    faults.set_failing(false);
    wait_delivered(&nl, &id).await?;
    let got = watch_all(&mut be, 1).await?;
    assert_eq!(
        got.iter()
            .map(|e| e.message_id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    let status = node_status(&mut be).await?;
    assert!(status.store_error.is_empty(), "{status:?}");
    h.shutdown().await
}

/// A send while the sender's disk fails is `UNAVAILABLE`, naming the message and
/// saying to send it again with the same idempotency key; nothing reaches the broker
/// meanwhile. The message was written, not made durable: once the disk works it goes,
/// and the retry gets it, sent once. It stayed queued, untold, until some other send or
/// a reconnect woke the node's submits, even after a retry that answered it queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_while_the_disk_fails_is_unavailable_and_goes_once_when_it_works() -> TestResult {
    let mut h = broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;
    connected(&nl).await?;
    let faults = h.node_store_faults(NL)?;
    faults.set_failing(true);
    let refused = send(&mut nl, referral("disk-s", BE))
        .await
        .expect_err("answered although not on disk");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    for part in ["disk", "same idempotency_key"] {
        assert!(refused.message().contains(part), "{part}: {refused:?}");
    }
    assert!(!store_failing(&nl).await?.is_empty());
    tokio::time::sleep(QUIET * 2).await;
    // written, not on disk: the outbox shows it queued, the broker does not have it
    let written = outbox(&mut nl).await?;
    let [entry] = written.as_slice() else {
        panic!("one entry written: {written:?}");
    };
    let id = entry.message_id.clone();
    assert!(refused.message().contains(&id), "{refused:?}");
    assert_eq!(entry.state, pb::OutboxState::Queued as i32, "{entry:?}");
    let asked = broker_status(&mut h.exchange(NL)?, &id).await;
    assert!(
        asked.as_ref().is_err_and(|e| e
            .downcast_ref::<tonic::Status>()
            .is_some_and(|s| s.code() == Code::NotFound)),
        "submitted while not on disk: {asked:?}"
    );

    faults.set_failing(false);
    wait_delivered(&nl, &id).await?;
    let retried = send(&mut nl, referral("disk-s", BE)).await?;
    assert_eq!(retried.message_id, id);
    assert_eq!(outbox(&mut nl).await?.len(), 1);
    let got = watch_all(&mut be, 1).await?;
    assert_eq!(
        got.iter()
            .map(|e| e.message_id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    assert!(node_status(&mut nl).await?.store_error.is_empty());
    h.shutdown().await
}

/// A delivery receipt that comes while the sender's disk fails is not acknowledged
/// (the broker would delete it) nor worn out: once the disk works, the outbox shows
/// the message delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_while_the_senders_disk_fails_is_applied_after() -> TestResult {
    let mut h = broker().await?;
    let mut nl = h.start_node(NL).await?;
    let id = send(&mut nl, referral("disk-r", BE)).await?.message_id;
    wait_outbox(&nl, &id, "submitted", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    let faults = h.node_store_faults(NL)?;
    faults.set_failing(true);
    let mut be = h.start_node(BE).await?;
    let direct = h.exchange(NL)?;
    wait_until(WAIT, "BE acknowledged it", || {
        let direct = direct.clone();
        let id = id.clone();
        async move {
            let status = on_broker(&direct, &id).await.ok();
            Ok(status
                .filter(|s| broker_state(s) == pb::MessageState::Acknowledged)
                .map(drop))
        }
    })
    .await?;
    store_failing(&nl).await?;
    tokio::time::sleep(OUTAGE).await;

    faults.set_failing(false);
    wait_delivered(&nl, &id).await?;
    assert_eq!(watch_all(&mut be, 1).await?.len(), 1);
    let status = node_status(&mut nl).await?;
    assert!(status.store_error.is_empty(), "{status:?}");
    h.shutdown().await
}

/// A withdrawal while the sender's disk fails is `UNAVAILABLE`, and so is its retry:
/// the retry found the entry withdrawn in memory (the broker had withdrawn it, the
/// record was written, not flushed) and answered "withdrawn", though a crash would take
/// that record back. Once the disk works the retry answers withdrawn, and the recipient
/// never gets the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_while_the_disk_fails_is_answered_only_once_on_disk() -> TestResult {
    let mut h = broker().await?;
    let mut nl = h.start_node(NL).await?;
    let id = send(&mut nl, referral("disk-w", BE)).await?.message_id;
    wait_outbox(&nl, &id, "submitted", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    let faults = h.node_store_faults(NL)?;
    faults.set_failing(true);
    let withdraw = |mut api: Api| {
        let id = id.clone();
        async move {
            api.withdraw(pb::WithdrawMessageRequest { message_id: id })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = withdraw(nl.clone()).await;
    assert!(
        first.as_ref().is_err_and(|s| s.code() == Code::Unavailable
            && s.message()
                .contains("withdraw it again once the disk works")),
        "{first:?}"
    );
    let retry = withdraw(nl.clone()).await;
    assert!(
        retry.as_ref().is_err_and(|s| s.code() == Code::Unavailable),
        "answered withdrawn, not on disk: {retry:?}"
    );
    let on_broker = on_broker(&h.exchange(NL)?, &id).await?;
    assert_eq!(broker_state(&on_broker), pb::MessageState::Withdrawn);

    faults.set_failing(false);
    let answer = withdraw(nl.clone()).await?;
    assert!(!answer.broker_pending, "{answer:?}");
    let mut be = h.start_node(BE).await?;
    connected(&be).await?;
    tokio::time::sleep(QUIET).await;
    assert!(inbox(&mut be).await?.is_empty());
    h.shutdown().await
}

/// A node stopped while its disk fails stops at once (its receive loop, waiting for the
/// disk, ends at the shutdown), and started again on a working disk it gets the message
/// that came meanwhile, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_while_its_disk_fails_stops_and_gets_the_message_after_a_restart()
-> TestResult {
    let mut h = broker().await?;
    let mut nl = h.start_node(NL).await?;
    let be = h.start_node(BE).await?;
    connected(&be).await?;
    h.node_store_faults(BE)?.set_failing(true);
    let id = send(&mut nl, referral("disk-stop", BE)).await?.message_id;
    store_failing(&be).await?;
    tokio::time::timeout(WAIT, h.stop_node(BE)).await??;

    let mut be = h.start_node(BE).await?;
    wait_delivered(&nl, &id).await?;
    let got = watch_all(&mut be, 1).await?;
    assert_eq!(
        got.iter()
            .map(|e| e.message_id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    h.shutdown().await
}
