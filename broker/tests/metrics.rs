//! Issue 6 items 4 and 5: the admin endpoint of a real broker — `/metrics` moves as
//! messages flow over real mutual TLS, `/healthz` and `/readyz` answer, refusals are
//! counted by reason, and the endpoint stops with the broker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use trmx_proto::pb::operator_client::OperatorClient;
use trmx_proto::{Kind, pb};
use trmx_transport::{ClientOptions, TlsPaths, client_channel};

use crate::harness::*;

/// One HTTP/1.1 GET on the admin endpoint: status and body.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    get_as(addr, &addr.to_string(), path).await
}

/// [`get`] with `host` as the `Host` header.
async fn get_as(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        anyhow::Ok(String::from_utf8(reply)?)
    };
    let reply = tokio::time::timeout(WAIT, exchange)
        .await
        .context("admin endpoint did not answer")??;
    let (head, body) = reply.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status")?;
    Ok((status, body.to_owned()))
}

/// The samples of one `/metrics` scrape, keyed by `name{labels}` as written.
pub(crate) struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    async fn take(addr: SocketAddr) -> anyhow::Result<Self> {
        let (status, body) = get(addr, "/metrics").await?;
        anyhow::ensure!(status == 200, "GET /metrics: {status}");
        let mut samples = BTreeMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').context("sample line")?;
            samples.insert(series.to_owned(), value.parse()?);
        }
        Ok(Self(samples))
    }

    /// The value of `series`, e.g. `trmx_queue_depth{recipient="BE-PAYOKE"}`.
    pub(crate) fn get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// Every series whose `name{labels}` starts with `prefix`.
    fn starting_with(&self, prefix: &str) -> Vec<&str> {
        self.0
            .keys()
            .filter(|series| series.starts_with(prefix))
            .map(String::as_str)
            .collect()
    }

    pub(crate) fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no series {series} in the scrape"))
    }
}

fn kind_series(family: &str, kind: Kind) -> String {
    format!("{family}{{kind=\"{}\"}}", kind.name())
}

fn refused(reason: &str) -> String {
    format!("trmx_submits_refused_total{{reason=\"{reason}\"}}")
}

fn queue(family: &str, recipient: &str) -> String {
    format!("trmx_queue_{family}{{recipient=\"{recipient}\"}}")
}

/// Scrapes until `check` holds (gauges refreshed by timers or streams), failing after [`WAIT`].
pub(crate) async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let scrape = Scrape::take(addr).await?;
        if check(&scrape) {
            return Ok(scrape);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn admin_addr(t: &TestBroker) -> anyhow::Result<SocketAddr> {
    t.broker.admin_addr().context("no admin endpoint")
}

#[tokio::test]
async fn metrics_move_as_messages_flow() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let admin = admin_addr(&t)?;
    assert!(admin.ip().is_loopback(), "{admin}");
    let accepted = kind_series("trmx_messages_accepted_total", Kind::Referral);
    let delivered = kind_series("trmx_messages_delivered_total", Kind::Referral);
    let acknowledged = kind_series("trmx_messages_acknowledged_total", Kind::Referral);

    // Before any traffic: every registry participant and counter is there, at 0.
    let before = Scrape::take(admin).await?;
    assert_eq!(before.value(&accepted), 0.0);
    for p in ["NL-NRM", "BE-PAYOKE", "INT-IOM"] {
        assert_eq!(before.value(&queue("depth", p)), 0.0);
        assert_eq!(
            before.value(&format!(
                "trmx_participant_connected_streams{{participant=\"{p}\"}}"
            )),
            0.0
        );
    }
    assert_eq!(before.value("trmx_store_writable"), 1.0);
    // the store's files exist from the start: an empty store has a size
    assert!(before.value("trmx_store_size_bytes") > 0.0);
    assert!(before.value("trmx_store_disk_free_bytes") > 0.0);
    assert_eq!(before.value("trmx_submit_duration_seconds_count"), 0.0);
    assert!(before.value("trmx_crl_next_update_seconds") > 0.0);
    let broker_cert =
        before.value("trmx_certificate_expiry_seconds{role=\"broker\",name=\"test-1\"}");
    assert!(broker_cert > 86_400.0, "{broker_cert}");
    assert!(
        before
            .0
            .iter()
            .any(|(k, v)| k.starts_with("trmx_certificate_expiry_seconds{role=\"ca\"") && *v > 0.0),
        "CA certificate expiry"
    );
    assert_eq!(get(admin, "/healthz").await?.0, 200);
    let (status, body) = get(admin, "/readyz").await?;
    assert_eq!((status, body.lines().next()), (200, Some("ready")));

    // A submit: accepted +1, one message queued for the recipient, one latency sample.
    let mut nl = t.client("NL-NRM")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env.clone()).await?;
    let after_submit = Scrape::take(admin).await?;
    assert_eq!(after_submit.value(&accepted), 1.0);
    assert_eq!(after_submit.value(&queue("depth", "BE-PAYOKE")), 1.0);
    assert!(after_submit.value(&queue("bytes", "BE-PAYOKE")) > 0.0);
    assert_eq!(after_submit.value(&queue("depth", "NL-NRM")), 0.0);
    assert_eq!(
        after_submit.value("trmx_submit_duration_seconds_count"),
        1.0
    );
    // The submit was answered after a flush, and the flush was timed.
    assert!(after_submit.value("trmx_store_flush_duration_seconds_count") >= 1.0);
    assert!(
        after_submit
            .get("trmx_participant_last_seen_timestamp_seconds{participant=\"NL-NRM\"}")
            .is_some(),
        "the sender was seen"
    );
    let nl_cert =
        after_submit.value("trmx_certificate_expiry_seconds{role=\"participant\",name=\"NL-NRM\"}");
    assert!(nl_cert > 86_400.0, "{nl_cert}");
    // A duplicate is not a new message.
    assert!(submit(&mut nl, env).await?.duplicate);
    assert_eq!(Scrape::take(admin).await?.value(&accepted), 1.0);

    // Received: delivered +1, in flight on a connected stream.
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    let in_flight = scrape_until(admin, "the delivery to be counted", |s| {
        s.get(&delivered) == Some(1.0)
    })
    .await?;
    assert_eq!(in_flight.value(&queue("in_flight", "BE-PAYOKE")), 1.0);
    assert_eq!(in_flight.value(&queue("depth", "BE-PAYOKE")), 0.0);
    assert_eq!(
        in_flight.value("trmx_participant_connected_streams{participant=\"BE-PAYOKE\"}"),
        1.0
    );
    assert_eq!(in_flight.value("trmx_connected_participants"), 1.0);
    assert_eq!(in_flight.value("trmx_messages_redelivered_total"), 0.0);

    // Acknowledged (twice: counted once): acknowledged +1, nothing left for the recipient.
    ack(&mut be, [&id]).await?;
    ack(&mut be, [&id]).await?;
    let settled = Scrape::take(admin).await?;
    assert_eq!(settled.value(&acknowledged), 1.0);
    assert_eq!(settled.value(&queue("depth", "BE-PAYOKE")), 0.0);
    assert_eq!(settled.value(&queue("in_flight", "BE-PAYOKE")), 0.0);
    assert_eq!(settled.value(&queue("bytes", "BE-PAYOKE")), 0.0);
    // the sender's delivery receipt now waits in its own queue
    assert_eq!(settled.value(&queue("depth", "NL-NRM")), 1.0);

    // The stream closes: no participant connected any more.
    drop(stream);
    drop(be);
    scrape_until(admin, "the stream to close", |s| {
        s.get("trmx_connected_participants") == Some(0.0)
    })
    .await?;
    // the handle's registry is the one served
    assert!(
        t.broker
            .metrics()
            .render()
            .contains("trmx_messages_acknowledged_total{kind=\"referral\"} 1\n")
    );
    Ok(())
}

/// `trmx_messages_acknowledged_total` counts every message the store acknowledges, by
/// its kind, once: also an ack whose delivery the broker's stream table no longer holds
/// (its stream dropped before the node's ack came, or the broker restarted since), which
/// it missed when it counted from that table.
#[tokio::test]
async fn acks_of_deliveries_no_stream_holds_are_counted_once() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let referrals = kind_series("trmx_messages_acknowledged_total", Kind::Referral);
    let receipts = kind_series("trmx_messages_acknowledged_total", Kind::DeliveryReceipt);
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let (first, second) = (referral("BE-PAYOKE"), referral("BE-PAYOKE"));
    let ids = [first.message_id.clone(), second.message_id.clone()];
    submit(&mut nl, first).await?;
    submit(&mut nl, second).await?;

    // BE-PAYOKE's node reads both; its stream drops before it acks (a flaky link)
    let mut stream = receive(&mut be, 0).await?;
    let mut got = vec![
        id_of(&next(&mut stream).await?),
        id_of(&next(&mut stream).await?),
    ];
    got.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(got, sorted);
    drop(stream);
    for id in &ids {
        let deadline = tokio::time::Instant::now() + WAIT;
        while state_of(&mut nl, id).await? != pb::MessageState::Accepted {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the stream's leases were never released"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // its ack comes on the connection it has left (the first id named twice), and again
    let admin = admin_addr(&t)?;
    assert_eq!(
        ack(&mut be, [&ids[0], &ids[0]]).await?,
        [pb::AckResult::Acknowledged; 2]
    );
    assert_eq!(
        ack(&mut be, [&ids[0]]).await?,
        [pb::AckResult::Acknowledged]
    );
    assert_eq!(Scrape::take(admin).await?.value(&referrals), 1.0);

    // the sender's node reads the delivery receipt, and the broker restarts before its ack
    let mut nl_stream = receive(&mut nl, 0).await?;
    let delivery = next(&mut nl_stream).await?;
    assert_eq!(receipt(&delivery)?.0, Kind::DeliveryReceipt);
    let receipt_id = id_of(&delivery);
    drop(nl_stream);
    drop((nl, be));
    t.restart().await?;
    let admin = admin_addr(&t)?;
    let (mut nl, mut be) = (t.client("NL-NRM")?, t.client("BE-PAYOKE")?);
    assert_eq!(
        ack(&mut be, [&ids[1]]).await?,
        [pb::AckResult::Acknowledged]
    );
    assert_eq!(
        ack(&mut nl, [&receipt_id]).await?,
        [pb::AckResult::Acknowledged]
    );
    let after = Scrape::take(admin).await?;
    // (this process counts from 0)
    assert_eq!(
        (after.value(&referrals), after.value(&receipts)),
        (1.0, 1.0)
    );
    Ok(())
}

#[tokio::test]
async fn refused_rejected_and_withdrawn_submits_are_counted_by_reason() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let admin = admin_addr(&t)?;
    let mut nl = t.client("NL-NRM")?;

    // one refusal of each kind the envelope and the registry decide
    assert_code(
        submit(&mut nl, referral("SE-NOBODY")).await,
        Code::NotFound,
        "unknown recipient",
    );
    assert_code(
        submit(&mut nl, envelope("INT-IOM", Kind::Referral, b"x")).await,
        Code::FailedPrecondition,
        "kind not accepted",
    );
    let mut bad = referral("BE-PAYOKE");
    bad.case_ref = "Jane Doe".into();
    assert_code(
        submit(&mut nl, bad).await,
        Code::InvalidArgument,
        "bad case_ref",
    );
    let mut foreign = referral("BE-PAYOKE");
    foreign.sender = "INT-IOM".into();
    assert_code(
        submit(&mut nl, foreign).await,
        Code::PermissionDenied,
        "foreign sender",
    );
    let mut operator = t.operator_client("night-shift")?;
    assert_code(
        submit(&mut operator, referral("BE-PAYOKE")).await,
        Code::PermissionDenied,
        "operator certificate",
    );
    let used = referral("BE-PAYOKE");
    submit(&mut nl, used.clone()).await?;
    let mut changed = used.clone();
    changed.priority = pb::Priority::Urgent as i32;
    assert_code(
        submit(&mut nl, changed).await,
        Code::AlreadyExists,
        "reused id",
    );

    let scrape = Scrape::take(admin).await?;
    for (reason, n) in [
        ("not_found", 1.0),
        ("failed_precondition", 1.0),
        ("invalid_argument", 1.0),
        ("permission_denied", 2.0),
        ("already_exists", 1.0),
        ("quota", 0.0),
        ("rate", 0.0),
        ("disk", 0.0),
        ("unavailable", 0.0),
    ] {
        assert_eq!(scrape.value(&refused(reason)), n, "{reason}");
    }
    // refusals store nothing and take no latency sample
    assert_eq!(
        scrape.value(&kind_series("trmx_messages_accepted_total", Kind::Referral)),
        1.0
    );
    assert_eq!(scrape.value("trmx_submit_duration_seconds_count"), 1.0);

    // withdrawn by the sender (and again, as a retry after a lost answer would: one
    // withdrawal, counted once); rejected by the recipient
    for _ in 0..2 {
        nl.withdraw(pb::WithdrawRequest {
            message_id: used.message_id.clone(),
        })
        .await?;
    }
    let rejected = referral("BE-PAYOKE");
    submit(&mut nl, rejected.clone()).await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), rejected.message_id);
    be.reject(pb::RejectRequest {
        message_id: rejected.message_id.clone(),
        reason_code: "INVALID_BODY".into(),
        field_path: "referral.consent".into(),
    })
    .await?;
    let scrape = Scrape::take(admin).await?;
    assert_eq!(scrape.value("trmx_messages_withdrawn_total"), 1.0);
    assert_eq!(
        scrape.value("trmx_messages_dead_lettered_total{reason=\"rejected\"}"),
        1.0
    );
    assert_eq!(
        scrape.value("trmx_messages_dead_lettered_total{reason=\"max_attempts\"}"),
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn rate_and_quota_refusals_are_told_apart() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|c| {
        c.limits.sender_rate_per_second = 1;
        c.limits.sender_rate_burst = 2;
        c.limits.max_queued_bytes_per_sender = c.limits.max_envelope_bytes;
    })
    .await?;
    let admin = admin_addr(&t)?;
    let mut nl = t.client("NL-NRM")?;
    let big = vec![7u8; 40 << 10];
    submit(&mut nl, envelope("BE-PAYOKE", Kind::Referral, &big)).await?;
    assert_code(
        submit(&mut nl, envelope("BE-PAYOKE", Kind::Referral, &big)).await,
        Code::ResourceExhausted,
        "quota",
    );
    assert_code(
        submit(&mut nl, referral("BE-PAYOKE")).await,
        Code::ResourceExhausted,
        "rate",
    );
    let scrape = Scrape::take(admin).await?;
    assert_eq!(scrape.value(&refused("quota")), 1.0);
    assert_eq!(scrape.value(&refused("rate")), 1.0);
    assert_eq!(scrape.value(&refused("disk")), 0.0);
    Ok(())
}

#[tokio::test]
async fn low_disk_makes_the_broker_not_ready_and_refusals_count_as_disk() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|c| c.limits.min_free_disk_bytes = u64::MAX).await?;
    let admin = admin_addr(&t)?;
    let mut nl = t.client("NL-NRM")?;
    assert_code(
        submit(&mut nl, referral("BE-PAYOKE")).await,
        Code::ResourceExhausted,
        "low disk",
    );
    let scrape = Scrape::take(admin).await?;
    assert_eq!(scrape.value(&refused("disk")), 1.0);
    assert_eq!(scrape.value("trmx_store_writable"), 0.0);
    // what an alert compares before refusals start
    assert_eq!(
        scrape.value("trmx_store_disk_free_min_bytes"),
        u64::MAX as f64
    );
    assert!(scrape.value("trmx_store_disk_free_bytes") > 0.0);
    let (status, body) = get(admin, "/readyz").await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store_writable false"), "{body}");
    // alive all the same
    assert_eq!(get(admin, "/healthz").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn a_failed_flush_shows_as_not_writable_until_the_store_writes_again() -> anyhow::Result<()> {
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
    let admin = broker.admin_addr().context("no admin endpoint")?;
    let mut nl = client(broker.local_addr(), &pki.participant("NL-NRM")?)?;
    assert_eq!(get(admin, "/readyz").await?.0, 200);
    let earlier = referral("BE-PAYOKE");
    let earlier_id = earlier.message_id.clone();
    submit(&mut nl, earlier).await?;

    faults.set_failing(true);
    assert_code(
        submit(&mut nl, referral("BE-PAYOKE")).await,
        Code::Unavailable,
        "failed flush",
    );
    assert_code(
        submit(&mut nl, referral("BE-PAYOKE")).await,
        Code::Unavailable,
        "latched",
    );
    // a read that works says nothing about writes: still not writable
    status(&mut nl, &earlier_id).await?;
    let scrape = Scrape::take(admin).await?;
    assert_eq!(scrape.value("trmx_store_writable"), 0.0);
    assert_eq!(scrape.value(&refused("unavailable")), 2.0);
    assert_eq!(get(admin, "/readyz").await?.0, 503);

    faults.set_failing(false);
    // the timer loop's next write clears the latch
    scrape_until(admin, "the store to be writable again", |s| {
        s.get("trmx_store_writable") == Some(1.0)
    })
    .await?;
    assert_eq!(get(admin, "/readyz").await?.0, 200);
    broker.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn expiry_is_counted_by_the_timer_loop() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let admin = admin_addr(&t)?;
    let mut nl = t.client("NL-NRM")?;
    submit(&mut nl, referral("BE-PAYOKE")).await?;
    t.advance(t.config.limits.default_lifetime + Duration::from_secs(1));
    let scrape = scrape_until(admin, "the expiry to be counted", |s| {
        s.get("trmx_messages_expired_total") == Some(1.0)
    })
    .await?;
    assert_eq!(scrape.value(&queue("depth", "BE-PAYOKE")), 0.0);
    Ok(())
}

#[tokio::test]
async fn the_admin_endpoint_stops_with_the_broker_and_can_be_off() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let admin = admin_addr(&t)?;
    assert_eq!(get(admin, "/healthz").await?.0, 200);
    t.broker.shutdown().await?;
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "admin port still open after shutdown"
    );

    let off = TestBroker::start_with(|c| c.admin_listen = None).await?;
    assert_eq!(off.broker.admin_addr(), None);
    // the broker itself works without it
    let mut nl = off.client("NL-NRM")?;
    submit(&mut nl, referral("BE-PAYOKE")).await?;
    Ok(())
}

/// DNS rebinding: a web page makes a browser on the broker host ask for
/// `http://attacker.example:PORT/metrics` with that name pointed at 127.0.0.1.
#[tokio::test]
async fn a_loopback_admin_endpoint_answers_only_addresses_localhost_and_listed_names()
-> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let admin = admin_addr(&t)?;
    let port = admin.port();
    let (status, body) = get_as(admin, &format!("attacker.example:{port}"), "/metrics").await?;
    assert_eq!(status, 421, "{body}");
    assert!(!body.contains("trmx_"), "{body}");
    assert_eq!(
        get_as(admin, &format!("localhost:{port}"), "/metrics")
            .await?
            .0,
        200
    );
    assert_eq!(get(admin, "/metrics").await?.0, 200);

    let t =
        TestBroker::start_with(|c| c.admin_allowed_hosts = vec!["broker.internal".into()]).await?;
    let admin = admin_addr(&t)?;
    let port = admin.port();
    assert_eq!(
        get_as(admin, &format!("broker.internal:{port}"), "/metrics")
            .await?
            .0,
        200
    );
    assert_eq!(
        get_as(admin, &format!("attacker.example:{port}"), "/readyz")
            .await?
            .0,
        421
    );
    Ok(())
}

#[tokio::test]
async fn a_taken_admin_port_fails_the_start() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let mut config = test_config(dir.path().join("data"), pki.tls.clone());
    config.admin_listen = Some(addr);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let err = trmx_broker::Broker::builder(config)
        .start(listener)
        .await
        .err()
        .context("started on a taken admin port")?;
    assert!(
        err.to_string().contains("admin_listen"),
        "the error names the setting: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn redeliveries_and_exhausted_attempts_are_counted() -> anyhow::Result<()> {
    let t = TestBroker::start().await?; // max_attempts = 3, ack_timeout 10s, backoff <= 2s
    let admin = admin_addr(&t)?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    let mut stream = receive(&mut be, 1).await?;
    for attempt in 1..=3 {
        let delivery = next(&mut stream).await?;
        assert_eq!((id_of(&delivery), delivery.attempt), (id.clone(), attempt));
        time_out_lease(&t, &mut nl, &id).await?;
    }
    let scrape = scrape_until(admin, "the dead letter to be counted", |s| {
        s.get("trmx_messages_dead_lettered_total{reason=\"max_attempts\"}") == Some(1.0)
    })
    .await?;
    assert_eq!(
        scrape.value(&kind_series(
            "trmx_messages_delivered_total",
            Kind::Referral
        )),
        3.0
    );
    assert_eq!(scrape.value("trmx_messages_redelivered_total"), 2.0);
    assert_eq!(
        scrape.value(&kind_series(
            "trmx_messages_acknowledged_total",
            Kind::Referral
        )),
        0.0
    );
    assert_eq!(scrape.value(&queue("in_flight", "BE-PAYOKE")), 0.0);
    Ok(())
}

#[tokio::test]
async fn a_stale_crl_makes_only_a_strict_broker_not_ready() -> anyhow::Result<()> {
    use trmx_broker::config::CrlPolicyConfig;

    for (policy, ready_when_stale) in [(CrlPolicyConfig::Warn, 200), (CrlPolicyConfig::Strict, 503)]
    {
        let t = TestBroker::start_with(|c| c.tls.crl_policy = policy).await?;
        let admin = admin_addr(&t)?;
        assert_eq!(get(admin, "/readyz").await?.0, 200, "{policy:?}, fresh CRL");
        // the CRL's nextUpdate is a week after it was written
        t.advance(Duration::from_secs(8 * 86_400));
        let scrape = Scrape::take(admin).await?;
        assert!(scrape.value("trmx_crl_next_update_seconds") < 0.0);
        let (status, body) = get(admin, "/readyz").await?;
        assert_eq!(status, ready_when_stale, "{policy:?}, stale CRL: {body}");
    }
    Ok(())
}

#[tokio::test]
async fn last_seen_and_certificate_expiry_survive_a_restart() -> anyhow::Result<()> {
    // Without them, a participant whose node died before a broker restart
    // would have no last-seen series, and TrmxParticipantNotSeen would never
    // fire for it.
    let mut t = TestBroker::start().await?;
    let seen = "trmx_participant_last_seen_timestamp_seconds{participant=\"NL-NRM\"}";
    let cert = "trmx_certificate_expiry_seconds{role=\"participant\",name=\"NL-NRM\"}";
    let mut nl = t.client("NL-NRM")?;
    nl.get_info(pb::GetInfoRequest {}).await?;
    let before = Scrape::take(admin_addr(&t)?).await?;
    let seen_at = before.value(seen);
    let cert_left = before.value(cert);
    assert!(cert_left > 86_400.0, "{cert_left}");
    assert_eq!(
        before.get("trmx_participant_last_seen_timestamp_seconds{participant=\"BE-PAYOKE\"}"),
        None,
        "never seen"
    );
    drop(nl);

    // A day later, after a restart, NL-NRM has not called again.
    t.clock.advance(Duration::from_secs(86_400));
    t.restart().await?;
    let after = Scrape::take(admin_addr(&t)?).await?;
    // (kept to the millisecond)
    assert!((after.value(seen) - seen_at).abs() < 0.002, "{seen_at}");
    let cert_after = after.value(cert);
    assert!(
        (cert_after - (cert_left - 86_400.0)).abs() < 0.002,
        "{cert_after} {cert_left}"
    );
    assert_eq!(
        after.get("trmx_participant_last_seen_timestamp_seconds{participant=\"BE-PAYOKE\"}"),
        None,
        "still never seen"
    );
    // The operator's participant list has both too.
    let alice = t.pki.federation.operator("alice")?;
    let paths = TlsPaths {
        ca: t.pki.federation.ca_cert_path(),
        cert: alice.cert,
        key: alice.key,
    };
    let channel = client_channel(&t.addr.to_string(), &paths, &ClientOptions::default())?;
    let listed = OperatorClient::new(channel)
        .list_participants(pb::OperatorListParticipantsRequest {})
        .await?
        .into_inner();
    let nl = listed
        .participants
        .iter()
        .find(|p| p.participant.as_ref().is_some_and(|e| e.id == "NL-NRM"))
        .context("NL-NRM listed")?;
    let listed_at = nl.last_seen.as_ref().context("NL-NRM's last seen")?;
    assert_eq!(listed_at.seconds as f64, seen_at.floor());
    assert!(nl.certificate_not_after.is_some());
    Ok(())
}

#[tokio::test]
async fn failed_handshakes_are_counted_by_reason() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let admin = admin_addr(&t)?;
    let series = |reason: &str| format!("trmx_tls_handshake_failures_total{{reason=\"{reason}\"}}");
    let before = Scrape::take(admin).await?;
    for reason in [
        "bad_certificate",
        "revoked",
        "expired",
        "unknown_ca",
        "stale_crl",
        "client_refused",
        "timeout",
        "other",
    ] {
        assert_eq!(before.value(&series(reason)), 0.0, "{reason}");
    }

    // a node of another federation, trusting this broker's CA
    let dir = tempfile::tempdir()?;
    let other = trmx_certs::Federation::create(dir.path(), "trm.other")?;
    let stranger = other.participant("NL-NRM")?;
    let paths = TlsPaths {
        ca: t.pki.federation.ca_cert_path(),
        cert: stranger.cert,
        key: stranger.key,
    };
    let channel = client_channel(&t.addr.to_string(), &paths, &ClientOptions::default())?;
    let mut client = trmx_proto::pb::exchange_client::ExchangeClient::new(channel);
    let refused = client.get_info(pb::GetInfoRequest {}).await;
    assert!(refused.is_err(), "{refused:?}");

    let after = scrape_until(admin, "the failed handshake to be counted", |s| {
        s.get(&series("unknown_ca")).is_some_and(|n| n >= 1.0)
    })
    .await?;
    assert_eq!(after.value(&series("revoked")), 0.0);
    Ok(())
}

/// A renewed broker certificate not valid yet (hours ahead) is refused by a reload, which
/// keeps the one in force; the broker certificate's expiry gauge was taken from the file
/// all the same, so `/metrics` showed the expiry of a certificate no peer sees, and the
/// alert on the one in force could stay silent until it expired. The gauge keeps the
/// certificate in force.
#[tokio::test]
async fn a_refused_renewal_leaves_the_expiry_gauge_on_the_certificate_in_force()
-> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let admin = admin_addr(&t)?;
    let series = "trmx_certificate_expiry_seconds{role=\"broker\",name=\"test-1\"}";
    let before = Scrape::take(admin).await?.value(series);
    let spec = trmx_certs::IssueSpec::broker(
        "test-1",
        vec!["localhost".to_owned()],
        vec![std::net::IpAddr::from([127, 0, 0, 1])],
    );
    let renewal = trmx_certs::CertPaths::from_prefix(&t.pki.tls.cert.with_extension("renewal"));
    let ahead = std::time::SystemTime::now() + Duration::from_secs(30 * 86_400);
    t.pki.federation.ca.issue_at(&spec, &renewal, true, ahead)?;
    std::fs::copy(&renewal.cert, &t.config.tls.cert)?;
    std::fs::copy(&renewal.key, &t.config.tls.key)?;
    let report = t.broker.reload_tls()?;
    assert!(report.certificate_refused.is_some(), "{report:?}");
    let after = Scrape::take(admin).await?.value(series);
    assert!(
        (after - before).abs() < 3_600.0,
        "the gauge moved from {before} to {after}: it shows the refused certificate"
    );
    Ok(())
}

/// The broker checks client certificates on its own time, as it makes every other
/// decision: that time holds through a jump of the system clock (see
/// `lifecycle::a_jump_of_the_system_clock_expires_nothing_until_a_restart`), so a clock
/// set a year ahead does not refuse every node as expired. Here the broker's (manual)
/// clock moves two years on, past the participants' certificates: a reload closes the
/// open connection, and a new one is refused, although the system clock says they are
/// valid.
#[tokio::test]
async fn client_certificates_are_checked_on_the_brokers_time() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    nl.get_info(pb::GetInfoRequest {}).await?;

    t.advance(Duration::from_secs(2 * 366 * 86_400));
    let report = t.broker.reload_tls()?;
    assert_eq!(
        report.closed,
        ["participant NL-NRM from 127.0.0.1"],
        "{report:?}"
    );
    let mut fresh = t.client("NL-NRM")?;
    let status = fresh
        .get_info(pb::GetInfoRequest {})
        .await
        .expect_err("a certificate expired on the broker's time accepted");
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ),
        "{status}"
    );
    scrape_until(
        admin_addr(&t)?,
        "the expired certificate to be counted",
        |s| {
            s.get("trmx_tls_handshake_failures_total{reason=\"expired\"}")
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await?;
    Ok(())
}

/// A CA taken out of `tls.ca` by a reload (the end of a CA rollover) stops counting. The
/// reload used to only add CA expiries, so the dropped CA's series stayed, and once that
/// CA expired `/readyz` answered 503 for good (until a restart) and its expiry alert
/// fired, although every certificate in force was valid.
#[tokio::test]
async fn a_ca_dropped_from_the_bundle_by_a_reload_does_not_make_the_broker_unready_when_it_expires()
-> anyhow::Result<()> {
    let extra = tempfile::tempdir()?;
    let old_ca = trmx_certs::Ca::init(
        &extra.path().join("old-ca"),
        &trmx_certs::CaOptions {
            validity_days: 30,
            ..trmx_certs::CaOptions::new("trm.test", "trm.test old CA")
        },
    )?;
    let bundle = extra.path().join("bundle.pem");
    let crls = extra.path().join("crls.pem");
    let (old_cert, old_crl) = (old_ca.ca_cert_path(), old_ca.crl_path());
    let (b, c) = (bundle.clone(), crls.clone());
    let t = TestBroker::start_with(move |config| {
        let cat = |out: &std::path::Path, parts: &[&std::path::Path]| {
            let text: String = parts
                .iter()
                .map(|p| std::fs::read_to_string(p).unwrap())
                .collect();
            std::fs::write(out, text).unwrap();
        };
        let crl = config.tls.crl.clone().unwrap();
        cat(&b, &[&config.tls.ca, &old_cert]);
        cat(&c, &[&crl, &old_crl]);
        config.tls.ca = b;
        config.tls.crl = Some(c);
    })
    .await?;
    let admin = admin_addr(&t)?;
    assert_eq!(get(admin, "/readyz").await?.0, 200);
    // the rollover ends: the old CA leaves the bundle and its CRL the CRL file
    std::fs::copy(t.pki.federation.ca_cert_path(), &bundle)?;
    std::fs::copy(t.pki.federation.crl_path(), &crls)?;
    t.broker.reload_tls()?;
    // a month on, the old CA (no longer trusted) has expired; the CA and broker
    // certificates in force are good for years / a year
    t.advance(Duration::from_secs(31 * 86_400));
    let scrape = Scrape::take(admin).await?;
    let dropped = "trmx_certificate_expiry_seconds{role=\"ca\",name=\"trm.test old CA\",";
    let (status, body) = get(admin, "/readyz").await?;
    assert_eq!(
        (status, scrape.starting_with(dropped).len()),
        (200, 0),
        "readyz: {body}; a CA no longer in tls.ca still exported"
    );
    Ok(())
}

/// The old and the new CA of a rollover often have the same name (no CRL configured, or a
/// CA certificate renewed with its key). Their expiries used to be one entry, keyed by the
/// name: the CA later in `tls.ca` hid the other, so the old CA could expire with no alert
/// and `/readyz` still 200 although a CA in the file had expired. Each is now a series of
/// its own, told apart by the `sha256` label.
#[tokio::test]
async fn two_cas_of_one_name_in_the_bundle_are_two_series_and_both_count_for_readiness()
-> anyhow::Result<()> {
    let extra = tempfile::tempdir()?;
    // the CA of the test federation is `trm.test federation CA` too
    let old_ca = trmx_certs::Ca::init(
        &extra.path().join("old-ca"),
        &trmx_certs::CaOptions {
            validity_days: 30,
            ..trmx_certs::CaOptions::new("trm.test", "trm.test federation CA")
        },
    )?;
    let bundle = extra.path().join("bundle.pem");
    let old_cert = old_ca.ca_cert_path();
    let b = bundle.clone();
    let t = TestBroker::start_with(move |config| {
        // the old CA first: the new one, good for years, used to hide it
        let text = [&old_cert, &config.tls.ca]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect::<String>();
        std::fs::write(&b, text).unwrap();
        config.tls.ca = b;
        // (two CAs of one name and different keys cannot share a CRL file)
        config.tls.crl = None;
    })
    .await?;
    let admin = admin_addr(&t)?;
    let series = |der: &[u8]| {
        format!(
            "trmx_certificate_expiry_seconds{{role=\"ca\",name=\"trm.test federation CA\",sha256=\"{}\"}}",
            trmx_broker::admin::sha256_label(der)
        )
    };
    let old = series(old_ca.ca_cert_der().as_ref());
    let new = series(t.pki.federation.ca.ca_cert_der().as_ref());
    assert_ne!(old, new);

    let scrape = Scrape::take(admin).await?;
    let named = "trmx_certificate_expiry_seconds{role=\"ca\",name=\"trm.test federation CA\"";
    let cas = scrape.starting_with(named);
    assert_eq!(cas.len(), 2, "{cas:?}");
    let days = |seconds: f64| (seconds / 86_400.0).round();
    assert_eq!(days(scrape.value(&old)), 30.0);
    assert!(days(scrape.value(&new)) > 365.0);
    assert_eq!(get(admin, "/readyz").await?.0, 200);

    // the rollover is not finished when the old CA expires
    t.advance(Duration::from_secs(31 * 86_400));
    let scrape = Scrape::take(admin).await?;
    assert!(scrape.value(&old) < 0.0);
    let (status, body) = get(admin, "/readyz").await?;
    assert_eq!(status, 503, "a CA in tls.ca has expired: {body}");
    Ok(())
}

/// `trmx_messages_delivered_total` counts the deliveries a `Receive` stream handed to its
/// connection. One dropped from the send buffer unsent (here withdrawn while it waited
/// behind a slow link) is not delivered: it is counted in `trmx_deliveries_dropped_total`,
/// by reason, instead.
#[tokio::test]
async fn a_delivery_dropped_unsent_is_not_counted_as_delivered() -> anyhow::Result<()> {
    let (t, mut nl, mut stream, fillers, misaddressed) =
        crate::exchange::stuck_stream(|_| {}, 50).await?;
    let admin = admin_addr(&t)?;
    nl.withdraw(pb::WithdrawRequest {
        message_id: misaddressed.clone(),
    })
    .await?;
    for id in &fillers {
        assert_eq!(&id_of(&next(&mut stream).await?), id);
    }
    expect_quiet(&mut stream).await?;

    let scrape = Scrape::take(admin).await?;
    let delivered = |kind| scrape.value(&kind_series("trmx_messages_delivered_total", kind));
    assert_eq!(delivered(Kind::FollowUp), fillers.len() as f64);
    assert_eq!(delivered(Kind::Referral), 0.0, "the withdrawn referral");
    let dropped = |reason| {
        scrape.value(&format!(
            "trmx_deliveries_dropped_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(dropped("withdrawn"), 1.0);
    assert_eq!(dropped("purged"), 0.0);
    assert_eq!(dropped("expired"), 0.0);
    Ok(())
}

/// BE-PAYOKE's entry of `ListQueues`.
async fn be_queue(op: &mut crate::operator::Operator) -> anyhow::Result<pb::QueueInfo> {
    op.list_queues(pb::ListQueuesRequest {})
        .await?
        .into_inner()
        .queues
        .into_iter()
        .find(|q| q.recipient == "BE-PAYOKE")
        .context("no queue of BE-PAYOKE")
}

/// The oldest-message age of a recipient (`ListQueues` and the gauge the
/// `TrmxQueueStuck` alert reads) is that of the oldest message it has not
/// acknowledged. It counted only messages due now, so a message held in flight
/// by a node that never acknowledges, or backing off before a redelivery, read
/// as "none waiting" (0 on the gauge) — the very messages an operator must see.
#[tokio::test]
async fn the_oldest_age_counts_messages_in_flight_and_backing_off() -> anyhow::Result<()> {
    let t = TestBroker::start().await?; // ack timeout 10 s, backoff 1 s to 2 s
    let admin = admin_addr(&t)?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut op = crate::operator::operator(&t)?;
    let age = queue("oldest_message_age_seconds", "BE-PAYOKE");
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    let accepted_at = submit(&mut nl, env).await?.accepted_at;

    // in flight for 9 s (the ack timeout is 10 s)
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    t.advance(Duration::from_secs(9));
    let q = be_queue(&mut op).await?;
    assert_eq!((q.depth, q.in_flight), (0, 1), "{q:?}");
    assert_eq!(q.oldest_accepted_at, accepted_at, "in flight: {q:?}");
    assert!(q.oldest_age.is_some_and(|a| a.seconds >= 9), "{q:?}");
    assert!(Scrape::take(admin).await?.value(&age) >= 9.0);

    // its node dropped the stream: ACCEPTED, backing off before the next attempt
    drop(stream);
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(&mut nl, &id).await?.next_attempt_at.is_none() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never backing off");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let q = be_queue(&mut op).await?;
    assert_eq!((q.depth, q.in_flight), (1, 0), "{q:?}");
    assert_eq!(q.oldest_accepted_at, accepted_at, "backing off: {q:?}");
    assert!(q.oldest_age.is_some_and(|a| a.seconds >= 9), "{q:?}");
    assert!(Scrape::take(admin).await?.value(&age) >= 9.0);

    // delivered again and acknowledged: nothing waits
    t.advance(Duration::from_secs(3));
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    ack(&mut be, [&id]).await?;
    let q = be_queue(&mut op).await?;
    assert_eq!((q.depth, q.in_flight), (0, 0), "{q:?}");
    assert_eq!((q.oldest_accepted_at, q.oldest_age), (None, None), "{q:?}");
    assert_eq!(Scrape::take(admin).await?.value(&age), 0.0);
    Ok(())
}
