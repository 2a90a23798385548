//! DESIGN.md §4 lifecycle, driven by the manual clock: redelivery after the
//! ack timeout, dead-lettering after max attempts, expiry, restarts.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use tonic::Code;
use trmx_proto::time::{to_millis, to_timestamp};
use trmx_proto::{Kind, pb};

use crate::harness::*;

#[tokio::test]
async fn an_unacknowledged_delivery_comes_again_after_the_ack_timeout() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    let mut stream = receive(&mut be, 1).await?;
    let first = next(&mut stream).await?;
    assert_eq!((id_of(&first), first.attempt), (id.clone(), 1));
    expect_quiet(&mut stream).await?;

    // ack timeout (10s), then the backoff: due again, on the same stream,
    // although the stream's only slot was taken by the unacknowledged lease.
    time_out_lease(&t, &mut nl, &id).await?;
    let second = next(&mut stream).await?;
    assert_eq!((id_of(&second), second.attempt), (id.clone(), 2));
    let st = status(&mut nl, &id).await?;
    assert_eq!(st.attempts, 2);
    assert_eq!(st.state, pb::MessageState::InFlight as i32);

    // an ack of the redelivered message settles it
    assert_eq!(
        ack(&mut be, [&id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    assert_eq!(
        state_of(&mut nl, &id).await?,
        pb::MessageState::Acknowledged
    );
    Ok(())
}

#[tokio::test]
async fn too_many_attempts_dead_letter_with_a_report() -> anyhow::Result<()> {
    let t = TestBroker::start().await?; // max_attempts = 3
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
    let mut nl_stream = receive(&mut nl, 0).await?;
    let (kind, report) = receipt(&next(&mut nl_stream).await?)?;
    assert_eq!(kind, Kind::NonDeliveryReport);
    assert_eq!(report.message_id, id);
    assert_eq!(report.outcome, pb::Outcome::DeadLettered as i32);
    assert_eq!(report.attempts, 3);
    assert!(report.last_delivered_at.is_some());
    assert_eq!(
        state_of(&mut nl, &id).await?,
        pb::MessageState::DeadLettered
    );
    expect_quiet(&mut stream).await?;
    Ok(())
}

#[tokio::test]
async fn an_expired_message_produces_a_non_delivery_report() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    // (the broker's clock: it stood still while the broker started)
    let now = trmx_broker::clock::Clock::now(&t.clock);
    env.created_at = Some(to_timestamp(now));
    env.expires_at = Some(to_timestamp(now + Duration::from_secs(60)));
    let receipt1 = submit(&mut nl, env).await?;
    assert!(receipt1.expires_at.is_some());

    t.advance(Duration::from_secs(61));
    let mut nl_stream = receive(&mut nl, 0).await?;
    let (kind, report) = receipt(&next(&mut nl_stream).await?)?;
    assert_eq!(kind, Kind::NonDeliveryReport);
    assert_eq!(report.message_id, id);
    assert_eq!(report.outcome, pb::Outcome::Expired as i32);
    assert_eq!(report.attempts, 0, "never delivered");
    assert!(report.last_delivered_at.is_none());
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::Expired);

    // the recipient never gets it
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    expect_quiet(&mut stream).await?;

    // its sender can still take it back, and its payload with it
    nl.withdraw(pb::WithdrawRequest {
        message_id: id.clone(),
    })
    .await?;
    let st = status(&mut nl, &id).await?;
    assert_eq!(st.state, pb::MessageState::Withdrawn as i32);
    Ok(())
}

#[tokio::test]
async fn lifetimes_are_defaulted_and_capped() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let now = trmx_proto::time::to_millis(SystemTime::now());
    let seconds = |ts: Option<pb::Timestamp>| ts.map(|t| t.seconds).unwrap_or_default();
    let defaulted = submit(&mut nl, referral("BE-PAYOKE")).await?;
    let lifetime = seconds(defaulted.expires_at) - seconds(defaulted.accepted_at);
    assert_eq!(lifetime, 30 * 86_400);
    let mut far = referral("BE-PAYOKE");
    far.expires_at = Some(to_timestamp(
        trmx_proto::time::from_millis(now) + Duration::from_secs(400 * 86_400),
    ));
    let capped = submit(&mut nl, far).await?;
    let lifetime = seconds(capped.expires_at) - seconds(capped.accepted_at);
    assert_eq!(lifetime, 90 * 86_400);
    Ok(())
}

#[tokio::test]
async fn a_restart_keeps_queues_in_flight_deliveries_and_status() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let queued = referral("BE-PAYOKE");
    let in_flight = referral("BE-PAYOKE");
    submit(&mut nl, in_flight.clone()).await?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), in_flight.message_id);
    submit(&mut nl, queued.clone()).await?;

    t.restart().await?;
    // the open stream was ended by the shutdown
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(None)) | Ok(Err(_)) => {}
        other => anyhow::bail!("stream not ended by shutdown: {other:?}"),
    }

    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    assert_eq!(
        state_of(&mut nl, &queued.message_id).await?,
        pb::MessageState::Accepted
    );
    let mut stream = receive(&mut be, 10).await?;
    let mut got = [next(&mut stream).await?, next(&mut stream).await?];
    got.sort_by_key(|d| d.envelope.as_ref().map(|e| e.broker_seq));
    assert_eq!(id_of(&got[0]), in_flight.message_id);
    assert_eq!(
        got[0].attempt, 2,
        "the lease of the old process became due again"
    );
    assert_eq!(id_of(&got[1]), queued.message_id);
    // the duplicate check survives the restart too
    assert!(submit(&mut nl, queued.clone()).await?.duplicate);
    Ok(())
}

#[tokio::test]
async fn shutdown_refuses_new_work_and_ends_streams() -> anyhow::Result<()> {
    // A long grace: a shutdown that waits for the open stream is told apart from one
    // that ends it at once, even on a slow machine.
    let grace = Duration::from_secs(60);
    let mut t = TestBroker::start_with(|c| c.limits.shutdown_grace = grace).await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    let started = std::time::Instant::now();
    t.broker.shutdown().await?;
    assert!(
        started.elapsed() < grace / 2,
        "shutdown took {:?}: it waited for the open stream",
        started.elapsed()
    );
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Err(status)) => assert_eq!(status.code(), Code::Unavailable),
        Ok(Ok(None)) => {}
        other => anyhow::bail!("stream not ended: {other:?}"),
    }
    let mut nl = t.client("NL-NRM")?;
    assert!(submit(&mut nl, referral("BE-PAYOKE")).await.is_err());
    Ok(())
}

/// A recipient that stops reading fills its stream until the broker's send
/// blocks. A shutdown then ends that stream: the broker cut those deliveries
/// short, so none of them is a failed attempt, even when the recipient goes
/// away before the shutdown is over (with `max_attempts = 1` a failed attempt
/// would dead-letter the message).
#[tokio::test]
async fn a_shutdown_counts_no_attempt_against_a_stream_blocked_in_a_send() -> anyhow::Result<()> {
    let mut t = TestBroker::start_with(|c| {
        c.lifecycle.max_attempts = 1;
        c.limits.shutdown_grace = Duration::from_millis(500);
    })
    .await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    // more than the stream's channel and both HTTP/2 windows hold
    let payload = vec![7u8; 60 << 10];
    let mut ids = Vec::new();
    for _ in 0..400 {
        let env = envelope("BE-PAYOKE", Kind::FollowUp, &payload);
        ids.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    let stream = receive(&mut be, 256).await?;
    // the stream is never read: wait until the broker stops leasing
    let leased = leased_when_leasing_stops(&mut nl, &ids).await?;
    assert!(
        leased > 0 && leased < ids.len(),
        "the stream should block part-way, {leased} of {} leased",
        ids.len()
    );

    // The recipient gives up during the shutdown's grace period. Its stream
    // was already ended by the broker, which had stopped waiting on the send.
    t.broker.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop((stream, be));
    t.broker.wait_stopped().await?;
    t.restart().await?;
    let mut nl = t.client("NL-NRM")?;
    for id in &ids {
        assert_eq!(
            state_of(&mut nl, id).await?,
            pb::MessageState::Accepted,
            "{id} after the shutdown"
        );
    }
    Ok(())
}

/// A delivery's ack timeout runs from its lease. On a slow link (here: a stream its
/// recipient does not read) the stream leases only what the connection can take
/// soon, `limits.receive_buffer_bytes` beyond what HTTP/2 flow control lets through,
/// so that deliveries waiting behind others are not timed out and sent again: the
/// messages still queued count no attempt. Read, every message then comes, once.
#[tokio::test]
async fn a_slow_link_gets_only_what_it_can_take_soon() -> anyhow::Result<()> {
    const SIZE: usize = 256 << 10;
    let t = TestBroker::start_with(|c| {
        c.limits.max_envelope_bytes = 2 * SIZE as u64;
        c.limits.receive_buffer_bytes = SIZE as u64;
    })
    .await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let payload = vec![7u8; SIZE];
    let mut ids = Vec::new();
    for _ in 0..80 {
        let env = envelope("BE-PAYOKE", Kind::FollowUp, &payload);
        ids.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    let mut stream = receive(&mut be, 100).await?;
    // the stream is not read: wait until the broker stops leasing
    let leased = leased_when_leasing_stops(&mut nl, &ids).await?;
    // The client's HTTP/2 stream window (2 MiB) holds 8 of them, the broker's
    // buffer 1, HTTP/2 and gRPC framing a few more: not the 64 its channel holds.
    assert!(
        leased > 0 && leased <= 20,
        "{leased} of {} leased for a stream that reads nothing",
        ids.len()
    );
    for id in &ids[leased..] {
        let st = status(&mut nl, id).await?;
        assert_eq!(
            (st.state, st.attempts),
            (pb::MessageState::Accepted as i32, 0),
            "{id}, queued behind the leased ones"
        );
    }

    // the link moves again: every message comes once, in order
    for id in &ids {
        let delivery = next(&mut stream).await?;
        assert_eq!((&id_of(&delivery), delivery.attempt), (id, 1));
        ack(&mut be, [id]).await?;
    }
    for id in &ids {
        assert_eq!(state_of(&mut nl, id).await?, pb::MessageState::Acknowledged);
    }
    Ok(())
}

/// What `lifecycle.ack_timeout` must allow for on a slow link (node.example.toml,
/// broker.example.toml): the bytes that cross the link ahead of a delivery, counted from
/// its lease. The recipient here reads nothing, so the stream stops leasing once every
/// buffer on the way is full; the bytes leased ahead of its last lease are then all in
/// those buffers. The examples said "limits.receive_buffer_bytes and the node's HTTP/2
/// window (2 MiB)", about 3 MiB: with the examples' 2 MiB referrals, 4 MiB were ahead
/// (3 leased), since hyper on the broker's side queues one message beyond the window
/// and holds the next. (On a link that moves, the window is in transit with a whole
/// message queued behind it: some 5.5 MiB ahead, measured through a throttling proxy.)
#[tokio::test]
async fn the_bytes_ahead_of_a_delivery_are_within_what_the_ack_timeout_allows_for()
-> anyhow::Result<()> {
    const SIZE: usize = 2 << 20;
    const WINDOW: usize = 2 << 20;
    let buffer = 1 << 20;
    let t = TestBroker::start_with(|c| {
        c.limits.max_envelope_bytes = 2 * SIZE as u64;
        c.limits.receive_buffer_bytes = buffer as u64;
    })
    .await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let payload = vec![7u8; SIZE];
    let mut ids = Vec::new();
    for _ in 0..6 {
        let env = envelope("BE-PAYOKE", Kind::FollowUp, &payload);
        ids.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    let _stream = receive(&mut be, 100).await?;
    let leased = leased_when_leasing_stops(&mut nl, &ids).await?;
    let ahead = (leased - 1) * SIZE;
    // as the examples say it now: the broker's buffer, the node's window, and two
    // messages in HTTP/2 on the broker's side
    assert!(
        leased > 0 && ahead <= buffer + WINDOW + 2 * SIZE,
        "{leased} messages of {SIZE} bytes leased to a stream that reads nothing: \
         {ahead} bytes ahead of the last"
    );
    Ok(())
}

/// How many of `ids` are IN_FLIGHT once the broker stops leasing them (to a stream that
/// is not read): the same count twice, 50 ms apart.
async fn leased_when_leasing_stops(client: &mut Client, ids: &[String]) -> anyhow::Result<usize> {
    let mut leased = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = in_flight(client, ids).await?;
        if now > 0 && now == leased {
            break;
        }
        leased = now;
    }
    Ok(leased)
}

/// How many of `ids` are IN_FLIGHT.
async fn in_flight(client: &mut Client, ids: &[String]) -> anyhow::Result<usize> {
    let mut n = 0;
    for id in ids {
        if state_of(client, id).await? == pb::MessageState::InFlight {
            n += 1;
        }
    }
    Ok(n)
}

/// A wall clock the test sets and a real-time clock that moves with it
/// (the operating system's two clocks, as [`GuardedClock`] reads them).
#[derive(Debug, Clone)]
struct SettableTime(std::sync::Arc<std::sync::Mutex<(SystemTime, Duration)>>);

impl SettableTime {
    fn now() -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new((
            SystemTime::now(),
            Duration::ZERO,
        ))))
    }
    /// Someone sets the system clock: only the wall clock moves.
    fn set_wall_ahead(&self, by: Duration) {
        self.0.lock().expect("time lock").0 += by;
    }
}

impl trmx_broker::clock::TimeSource for SettableTime {
    fn wall(&self) -> SystemTime {
        self.0.lock().expect("time lock").0
    }
    fn elapsed(&self) -> Duration {
        self.0.lock().expect("time lock").1
    }
}

/// A wall clock set a year ahead while the broker runs (a mistyped date)
/// must not expire every queued message: the broker holds its own time and
/// reports the offset; only a restart, the operator's acceptance, moves it on
/// (and for a jump that large, `trmx-broker store accept-clock` before it).
#[tokio::test]
async fn a_jump_of_the_system_clock_expires_nothing_until_a_restart() -> anyhow::Result<()> {
    use trmx_broker::clock::GuardedClock;
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    let time = SettableTime::now();
    let start = |config: trmx_broker::BrokerConfig| {
        let clock = GuardedClock::new(time.clone(), config.lifecycle.max_clock_step, "restart");
        async move {
            trmx_broker::Broker::builder(config)
                .clock(clock)
                .start(tokio::net::TcpListener::bind("127.0.0.1:0").await?)
                .await
                .map_err(anyhow::Error::from)
        }
    };
    let mut broker = start(config.clone()).await?;
    let mut nl = client(broker.local_addr(), &pki.participant("NL-NRM")?)?;
    let mut env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    env.expires_at = Some(to_timestamp(SystemTime::now() + Duration::from_secs(3600)));
    submit(&mut nl, env).await?;

    let year = Duration::from_secs(365 * 86_400);
    time.set_wall_ahead(year);
    let mut nl_stream = receive(&mut nl, 0).await?;
    // ticks run every 20 ms: none of them expires the message
    expect_quiet(&mut nl_stream).await?;
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::Accepted);
    let metrics = broker.metrics().render();
    assert!(
        metrics.contains(&format!("trmx_clock_offset_seconds {}\n", year.as_secs())),
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("trmx_clock"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // the operator says the new time is right and restarts the broker: a year is
    // more than `lifecycle.max_downtime`, so the start asks for the clock to be
    // accepted first (`trmx-broker store accept-clock`); then the message expires
    drop(nl_stream);
    broker.shutdown().await?;
    let refused = start(config.clone())
        .await
        .err()
        .context("the broker started")?;
    assert!(
        refused.to_string().contains("lifecycle.max_downtime"),
        "{refused:#}"
    );
    let wall = trmx_broker::clock::TimeSource::wall(&time);
    trmx_broker::store::accept_clock_offline(&config.data_dir, to_millis(wall), "test")?;
    let mut broker = start(config).await?;
    let mut nl = client(broker.local_addr(), &pki.participant("NL-NRM")?)?;
    let mut nl_stream = receive(&mut nl, 0).await?;
    let (kind, report) = receipt(&next(&mut nl_stream).await?)?;
    assert_eq!(kind, Kind::NonDeliveryReport);
    assert_eq!(report.message_id, id);
    assert_eq!(report.outcome, pb::Outcome::Expired as i32);
    assert!(
        broker
            .metrics()
            .render()
            .contains("trmx_clock_offset_seconds 0\n")
    );
    drop(nl_stream);
    broker.shutdown().await?;
    Ok(())
}

/// A sender's node that does not acknowledge its delivery receipt in time (its ack
/// lost, or its stream dropped on a flaky link) gets it again past the attempt limit:
/// a receipt is never dead-lettered, for no report could tell its sender, whose
/// outbox would wait for the outcome of its referral for good.
#[tokio::test]
async fn a_receipt_comes_again_past_the_attempt_limit() -> anyhow::Result<()> {
    let t = TestBroker::start().await?; // max_attempts = 3
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    let mut be_stream = receive(&mut be, 1).await?;
    next(&mut be_stream).await?;
    assert_eq!(
        ack(&mut be, [&id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    let mut nl_stream = receive(&mut nl, 1).await?;
    let mut receipt_id = String::new();
    for attempt in 1..=4 {
        let delivery = next(&mut nl_stream).await?;
        let (kind, report) = receipt(&delivery)?;
        assert_eq!(
            (kind, report.message_id.as_str(), delivery.attempt),
            (Kind::DeliveryReceipt, id.as_str(), attempt)
        );
        receipt_id = id_of(&delivery);
        if attempt < 4 {
            // past the ack timeout (10 s) and the longest backoff (2 s)
            t.advance(Duration::from_secs(13));
        }
    }
    assert_eq!(
        ack(&mut nl, [&receipt_id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    expect_quiet(&mut nl_stream).await?;
    Ok(())
}

/// A delivery that expires before its recipient's node rejects it: the reject is
/// `NOT_FOUND`, and its message does not claim the message was never delivered (the
/// node has it; whoever reads the answer must not conclude otherwise). The sender has
/// the one report of the expiry, which says it was delivered.
#[tokio::test]
async fn a_reject_after_the_expiry_is_not_found_without_denying_the_delivery() -> anyhow::Result<()>
{
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    let now = trmx_broker::clock::Clock::now(&t.clock);
    env.expires_at = Some(to_timestamp(now + Duration::from_secs(5)));
    submit(&mut nl, env).await?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    t.advance(Duration::from_secs(6));
    let mut nl_stream = receive(&mut nl, 0).await?;
    let (_, report) = receipt(&next(&mut nl_stream).await?)?;
    assert_eq!(report.outcome, pb::Outcome::Expired as i32);
    assert_eq!(report.attempts, 1);
    let refused = assert_code(
        be.reject(pb::RejectRequest {
            message_id: id.clone(),
            reason_code: "INVALID_BODY".into(),
            field_path: String::new(),
        })
        .await,
        Code::NotFound,
        "reject after the expiry",
    );
    assert!(
        refused.message().contains("not in flight") && refused.message().contains("expired"),
        "{}",
        refused.message()
    );
    expect_quiet(&mut nl_stream).await?;
    Ok(())
}

/// A delivery that expires before its recipient's node acks it gives its stream slot
/// back at the expiry, not at its ack deadline: the messages queued behind it are
/// delivered at once. The node may still ack it: that ack is `NOT_FOUND` for its id
/// and changes nothing (the message stays `EXPIRED`, its sender has the one report),
/// while the ack of the next delivery in the same call counts.
#[tokio::test]
async fn an_expired_delivery_frees_its_stream_slot_and_a_late_ack_changes_nothing()
-> anyhow::Result<()> {
    let t = TestBroker::start().await?; // ack timeout 10 s
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let now = trmx_broker::clock::Clock::now(&t.clock);
    let mut short = referral("BE-PAYOKE");
    short.expires_at = Some(to_timestamp(now + Duration::from_secs(5)));
    let short_id = short.message_id.clone();
    let behind = referral("BE-PAYOKE");
    let behind_id = behind.message_id.clone();
    submit(&mut nl, short).await?;
    submit(&mut nl, behind).await?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), short_id);
    expect_quiet(&mut stream).await?;

    // expired in flight, 4 s before its ack deadline: the slot is free again
    t.advance(Duration::from_secs(6));
    let delivery = next(&mut stream).await?;
    assert_eq!((id_of(&delivery), delivery.attempt), (behind_id.clone(), 1));
    assert_eq!(
        state_of(&mut nl, &short_id).await?,
        pb::MessageState::Expired
    );

    assert_eq!(
        ack(&mut be, [&short_id, &behind_id]).await?,
        vec![pb::AckResult::NotFound, pb::AckResult::Acknowledged]
    );
    let st = status(&mut nl, &short_id).await?;
    assert_eq!(st.state, pb::MessageState::Expired as i32);
    assert_eq!(st.attempts, 1);
    let mut nl_stream = receive(&mut nl, 0).await?;
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let (_, report) = receipt(&next(&mut nl_stream).await?)?;
        outcomes.push((report.message_id, report.outcome));
    }
    outcomes.sort();
    let mut want = vec![
        (short_id.clone(), pb::Outcome::Expired as i32),
        (behind_id.clone(), pb::Outcome::Delivered as i32),
    ];
    want.sort();
    assert_eq!(outcomes, want);
    expect_quiet(&mut nl_stream).await?;
    expect_quiet(&mut stream).await?;
    Ok(())
}

/// A tick that fails after committing some of its timers (a later batch that cannot be
/// written) still frees the stream slots of the deliveries those expired: no later tick
/// reports them again, and the messages queued behind would wait for the ack deadline.
#[tokio::test]
async fn a_tick_failing_after_an_expiry_still_frees_the_expired_deliverys_slot()
-> anyhow::Result<()> {
    use std::sync::atomic::Ordering;

    // (its flushes never fail here: a tick every 20 ms, ack timeout 10 s)
    let (t, store) = TestBroker::start_with_faulty_store_and(|_| {}).await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut short = referral("BE-PAYOKE");
    short.expires_at = Some(to_timestamp(
        trmx_broker::clock::Clock::now(&t.clock) + Duration::from_secs(5),
    ));
    let short_id = short.message_id.clone();
    let behind = referral("BE-PAYOKE");
    let behind_id = behind.message_id.clone();
    submit(&mut nl, short).await?;
    submit(&mut nl, behind).await?;
    let mut stream = receive(&mut be, 1).await?;
    assert_eq!(id_of(&next(&mut stream).await?), short_id);
    expect_quiet(&mut stream).await?;

    store.fail_ticks.store(true, Ordering::SeqCst);
    t.advance(Duration::from_secs(6));
    let delivery = next(&mut stream).await?;
    assert_eq!((id_of(&delivery), delivery.attempt), (behind_id.clone(), 1));
    store.fail_ticks.store(false, Ordering::SeqCst);
    assert_eq!(
        state_of(&mut nl, &short_id).await?,
        pb::MessageState::Expired
    );
    assert_eq!(
        ack(&mut be, [&short_id, &behind_id]).await?,
        vec![pb::AckResult::NotFound, pb::AckResult::Acknowledged]
    );
    Ok(())
}
