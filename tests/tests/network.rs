//! Network faults (issue 7, item 2): a fault-injecting TCP proxy
//! (`trmx_tests::proxy::FaultProxy`) between both nodes and the broker cuts,
//! stalls, delays and refuses connections while messages flow. The nodes
//! reconnect on their own; every message arrives exactly once and its sender
//! holds the delivery receipt.

use std::collections::HashMap;
use std::time::Duration;

use trmx_proto::{Kind, pb};
use trmx_tests::harness::{
    Api, Harness, inbox, json_request, node_status, outbox, send, wait_until, watch_all,
};
use trmx_tests::proxy::{Fault, FaultProxy};
use trmx_tests::story::EXAMPLES;

type TestResult = anyhow::Result<()>;

const NL: &str = "NL-NRM";
const BE: &str = "BE-PAYOKE";
/// How long everything may take to arrive after the faults end.
const SETTLE: Duration = Duration::from_secs(20);

/// A broker, a proxy in front of it, and NL-NRM's and BE-PAYOKE's nodes
/// connected through the proxy.
async fn setup() -> anyhow::Result<(Harness, FaultProxy, Api, Api)> {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let proxy = FaultProxy::start(h.broker_addr()).await?;
    let nl = h.start_node_via(NL, proxy.addr()).await?;
    let be = h.start_node_via(BE, proxy.addr()).await?;
    Ok((h, proxy, nl, be))
}

/// Sends `n` referrals from `api` to BE-PAYOKE; returns their ids.
async fn send_referrals(api: &mut Api, prefix: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for k in 0..n {
        let request = json_request(&format!("{prefix}-{k}"), BE, Kind::Referral, EXAMPLES[0]);
        ids.push(send(api, request).await?.message_id);
    }
    Ok(ids)
}

/// Waits until every id is DELIVERED in `nl`'s outbox (fails if one FAILED),
/// then checks that BE-PAYOKE's inbox and its application stream hold
/// exactly these messages, each once.
async fn assert_delivered_once(nl: &Api, be: &mut Api, ids: &[String]) -> TestResult {
    wait_until(SETTLE, "every message delivered", || {
        let mut nl = nl.clone();
        async move {
            let entries = outbox(&mut nl).await?;
            let failed: Vec<_> = entries
                .iter()
                .filter(|e| e.state == pb::OutboxState::Failed as i32)
                .collect();
            anyhow::ensure!(failed.is_empty(), "failed: {failed:?}");
            let delivered = entries
                .iter()
                .filter(|e| e.state == pb::OutboxState::Delivered as i32)
                .count();
            Ok((delivered == ids.len()).then_some(()))
        }
    })
    .await?;
    let mut stored: Vec<String> = inbox(be).await?.into_iter().map(|e| e.message_id).collect();
    stored.sort();
    let mut expected = ids.to_vec();
    expected.sort();
    assert_eq!(
        stored, expected,
        "the inbox holds exactly the messages sent"
    );
    let mut copies: HashMap<String, usize> = HashMap::new();
    for entry in watch_all(be, ids.len()).await? {
        *copies.entry(entry.message_id).or_default() += 1;
    }
    assert_eq!(copies.len(), ids.len(), "the application saw every message");
    assert!(
        copies.values().all(|n| *n == 1),
        "the application saw a message twice: {copies:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_again_and_again_mid_stream_lose_and_double_nothing() -> TestResult {
    let (h, proxy, mut nl, mut be) = setup().await?;
    let first = proxy.connections_accepted();
    let mut ids = send_referrals(&mut nl, "cut-a", 30).await?;
    // Cut every connection over and over while the messages flow.
    for round in 0..12 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        proxy.cut();
        if round == 5 {
            ids.extend(send_referrals(&mut nl, "cut-b", 30).await?);
        }
    }
    assert_delivered_once(&nl, &mut be, &ids).await?;
    assert!(
        proxy.connections_accepted() > first + 2,
        "the nodes reconnected on their own ({} connections)",
        proxy.connections_accepted()
    );
    assert!(node_status(&mut nl).await?.broker_connected);
    assert!(node_status(&mut be).await?.broker_connected);
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_resumes_and_nothing_is_lost_or_doubled() -> TestResult {
    let (h, proxy, mut nl, mut be) = setup().await?;
    let mut ids = send_referrals(&mut nl, "stall-a", 20).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Mid-stream, nothing moves for a while (connections stay open).
    proxy.set(Fault::Stall);
    ids.extend(send_referrals(&mut nl, "stall-b", 20).await?);
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.set(Fault::None);
    // And a stall that ends with the connections cut.
    ids.extend(send_referrals(&mut nl, "stall-c", 10).await?);
    proxy.set(Fault::Stall);
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    proxy.set(Fault::None);
    assert_delivered_once(&nl, &mut be, &ids).await?;
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_network_and_refused_reconnects_lose_and_double_nothing() -> TestResult {
    let (h, proxy, mut nl, mut be) = setup().await?;
    // Every chunk delayed, mid-stream.
    proxy.set(Fault::Delay(Duration::from_millis(15)));
    let mut ids = send_referrals(&mut nl, "slow-a", 20).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The network goes down: connections closed, reconnects refused.
    proxy.set(Fault::Down);
    ids.extend(send_referrals(&mut nl, "slow-b", 20).await?);
    wait_until(SETTLE, "the nodes to notice the outage", || {
        let mut nl = nl.clone();
        async move { Ok((!node_status(&mut nl).await?.broker_connected).then_some(())) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Back, still slow.
    proxy.set(Fault::Delay(Duration::from_millis(5)));
    assert_delivered_once(&nl, &mut be, &ids).await?;
    proxy.set(Fault::None);
    h.shutdown().await
}
