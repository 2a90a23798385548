//! Node behaviour against a real broker (issue 4, "Done when"): every test
//! builds its own federation in a temp dir, runs a real broker and real node
//! daemons (in this process through `RunningNode`, or as child processes of
//! the `trmx-demo` multi-call binary where a crash is needed), and talks to
//! the nodes only through their local API sockets.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use tonic::Code;
use trmx_node::core::FAILPOINT_ENV;
use trmx_proto::Kind;
use trmx_proto::body::Body;
use trmx_proto::pb;
use trmx_tests::harness::{
    Api, Exchange, Harness, QUIET, WAIT, broker_status, envelope, expect_quiet, inbox, inbox_entry,
    json_request, next_item, node_status, outbox, outbox_entry, reply_request, send, timeline,
    wait_delivered, wait_outbox, wait_received, wait_until, watch, watch_all,
};
use trmx_tests::process::Process;
use trmx_tests::story::EXAMPLES;

type TestResult = anyhow::Result<()>;

const NL: &str = "NL-NRM";
const BE: &str = "BE-PAYOKE";
const NG: &str = "NG-NAPTIP";

/// The demo's valid documents.
const REFERRAL: &str = EXAMPLES[0];
const REFERRAL_RESPONSE: &str = EXAMPLES[1];
const FOLLOW_UP: &str = EXAMPLES[2];

const DEMO: &str = env!("CARGO_BIN_EXE_trmx-demo");
const SIGABRT: i32 = 6;

fn referral(key: &str, to: &str) -> pb::SendRequest {
    json_request(key, to, Kind::Referral, REFERRAL)
}

/// The example referral JSON with one field (a path of object keys) removed.
fn referral_json_without(path: &[&str]) -> String {
    let mut value: serde_json::Value = serde_json::from_str(REFERRAL).unwrap();
    let (last, parents) = path.split_last().unwrap();
    let mut node = &mut value;
    for key in parents {
        node = node.get_mut(*key).unwrap();
    }
    node.as_object_mut().unwrap().remove(*last).unwrap();
    value.to_string()
}

fn state(entry: &pb::OutboxEntry) -> pb::OutboxState {
    pb::OutboxState::try_from(entry.state).unwrap()
}

fn broker_state(status: &pb::MessageStatus) -> pb::MessageState {
    pb::MessageState::try_from(status.state).unwrap()
}

/// Inbox message ids, oldest first.
async fn inbox_ids(api: &mut Api) -> anyhow::Result<Vec<String>> {
    let mut entries = inbox(api).await?;
    entries.sort_by_key(|e| e.seq);
    Ok(entries.into_iter().map(|e| e.message_id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_while_the_broker_is_down_is_delivered_after_it_comes_up() -> TestResult {
    let mut h = Harness::new().await?;
    // Both nodes start while the broker has never run.
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;

    let first = send(&mut nl, referral("down-1", BE)).await?;
    assert_eq!(first.state, pb::OutboxState::Queued as i32);
    // The node tries, fails, and keeps the message queued.
    let entry = wait_outbox(&nl, &first.message_id, "a failed submit attempt", |e| {
        e.submit_attempts >= 1
    })
    .await?;
    assert_eq!(state(&entry), pb::OutboxState::Queued, "{entry:?}");
    assert!(!entry.last_error.is_empty(), "{entry:?}");
    assert!(!node_status(&mut nl).await?.broker_connected);

    h.start_broker().await?;
    wait_delivered(&nl, &first.message_id).await?;
    wait_received(&be, &first.message_id).await?;

    // Down again (stopped in order, with both nodes connected), and back.
    h.stop_broker().await?;
    let second = send(&mut nl, referral("down-2", BE)).await?;
    assert_eq!(second.state, pb::OutboxState::Queued as i32);
    wait_outbox(&nl, &second.message_id, "a failed submit attempt", |e| {
        e.submit_attempts >= 1
    })
    .await?;
    assert_eq!(
        state(&outbox_entry(&mut nl, &second.message_id).await?.unwrap()),
        pb::OutboxState::Queued
    );
    h.start_broker().await?;
    wait_delivered(&nl, &second.message_id).await?;
    wait_received(&be, &second.message_id).await?;

    assert_eq!(
        inbox_ids(&mut be).await?,
        [first.message_id, second.message_id]
    );
    h.shutdown().await
}

/// Copies the directory tree `from` to `to` (a backup of a stopped broker).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_lost_when_the_broker_is_restored_from_an_older_backup_still_arrives()
-> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let check_every_second = |c: &mut trmx_node::NodeConfig| {
        c.broker.outbox_check_interval_secs = 1;
    };
    let mut nl = h.start_node_with(NL, check_every_second).await?;
    let before = send(&mut nl, referral("restore-1", BE)).await?;
    wait_outbox(&nl, &before.message_id, "submitted", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    // The operator's backup: broker stopped, data directory copied.
    h.stop_broker().await?;
    let data_dir = h.broker_data_dir().to_owned();
    let backup = h.dir().join("broker-backup");
    copy_dir(&data_dir, &backup)?;
    h.start_broker().await?;
    let after = send(&mut nl, referral("restore-2", BE)).await?;
    wait_outbox(&nl, &after.message_id, "submitted", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;

    // The broker's disk dies; its store comes back from the backup, which
    // does not have the second message, accepted after it was taken.
    h.stop_broker().await?;
    std::fs::remove_dir_all(&data_dir)?;
    copy_dir(&backup, &data_dir)?;
    h.start_broker().await?;

    // NL's node finds out and submits it again: BE gets both, once each.
    let be = h.start_node(BE).await?;
    wait_delivered(&nl, &after.message_id).await?;
    wait_delivered(&nl, &before.message_id).await?;
    let mut be = be;
    let mut ids = inbox_ids(&mut be).await?;
    ids.sort();
    let mut expected = vec![before.message_id.clone(), after.message_id.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    let entry = outbox_entry(&mut nl, &after.message_id).await?.unwrap();
    assert!(entry.last_error.contains("lost"), "{entry:?}");
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_to_an_offline_node_arrives_when_that_node_starts() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;

    let sent = send(&mut nl, referral("offline-1", BE)).await?;
    wait_outbox(&nl, &sent.message_id, "the broker to accept it", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    // The broker holds it: accepted, never handed to anyone.
    let mut nl_exchange = h.exchange(NL)?;
    let held = broker_status(&mut nl_exchange, &sent.message_id).await?;
    assert_eq!(broker_state(&held), pb::MessageState::Accepted, "{held:?}");
    assert_eq!(held.attempts, 0);

    let mut be = h.start_node(BE).await?;
    let received = wait_received(&be, &sent.message_id).await?;
    assert_eq!(received.sender, NL);
    assert_eq!(received.case_ref, sent.case_ref);
    wait_delivered(&nl, &sent.message_id).await?;
    assert_eq!(inbox_ids(&mut be).await?, [sent.message_id]);
    h.shutdown().await
}

async fn withdraw(api: &mut Api, id: &str) -> anyhow::Result<pb::WithdrawMessageResponse> {
    Ok(api
        .withdraw(pb::WithdrawMessageRequest {
            message_id: id.to_owned(),
        })
        .await?
        .into_inner())
}

/// A withdrawal through a real broker: a message on the broker is withdrawn there, and
/// its recipient never gets it; one queued while the broker is down is withdrawn on
/// the node at once, and on the broker once the node reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_message_never_reaches_its_recipient() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;

    let on_broker = send(&mut nl, referral("withdraw-1", BE)).await?;
    wait_outbox(&nl, &on_broker.message_id, "the broker to accept it", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    let answer = withdraw(&mut nl, &on_broker.message_id).await?;
    assert!(!answer.broker_pending);
    let mut nl_exchange = h.exchange(NL)?;
    let status = broker_status(&mut nl_exchange, &on_broker.message_id).await?;
    assert_eq!(
        broker_state(&status),
        pb::MessageState::Withdrawn,
        "{status:?}"
    );
    let entry = outbox_entry(&mut nl, &on_broker.message_id).await?.unwrap();
    assert_eq!(state(&entry), pb::OutboxState::Failed);
    assert_eq!(
        entry.failure.map(|f| f.outcome).as_deref(),
        Some("withdrawn")
    );
    assert!(
        !withdraw(&mut nl, &on_broker.message_id)
            .await?
            .broker_pending
    );

    // queued while the broker is down
    h.stop_broker().await?;
    let queued = send(&mut nl, referral("withdraw-2", BE)).await?;
    wait_outbox(&nl, &queued.message_id, "a failed submit attempt", |e| {
        e.submit_attempts >= 1
    })
    .await?;
    assert!(withdraw(&mut nl, &queued.message_id).await?.broker_pending);
    assert_eq!(node_status(&mut nl).await?.withdrawals_pending, 1);
    h.start_broker().await?;
    let entry = wait_outbox(&nl, &queued.message_id, "the broker's part done", |e| {
        e.last_error.contains("the broker never had it")
    })
    .await?;
    assert_eq!(state(&entry), pb::OutboxState::Failed);
    assert_eq!(node_status(&mut nl).await?.withdrawals_pending, 0);

    // a message sent after both still goes; the recipient gets only that one
    let after = send(&mut nl, referral("withdraw-3", BE)).await?;
    let mut be = h.start_node(BE).await?;
    wait_received(&be, &after.message_id).await?;
    tokio::time::sleep(QUIET).await;
    assert_eq!(inbox_ids(&mut be).await?, [after.message_id]);
    h.shutdown().await
}

/// Starts `id`'s node as a `trmx-node run` daemon process (through the
/// `trmx-demo` multi-call binary) with `env`, and connects to its local API.
async fn start_node_process(
    h: &Harness,
    id: &str,
    env: &[(&'static str, &'static str)],
) -> anyhow::Result<(Process, Api)> {
    let config = h.node_config_file(id)?;
    let node_dir = h.dir().join(id);
    let ready = node_dir.join("ready");
    let log = node_dir.join("node.log");
    let args: Vec<OsString> = vec![
        "node".into(),
        "--config".into(),
        config.into(),
        "run".into(),
        "--ready-file".into(),
        ready.clone().into(),
    ];
    let name = format!("{id} node");
    let env = env.to_vec();
    let (process, socket) = tokio::task::spawn_blocking(move || {
        Process::start_with_env(&name, Path::new(DEMO), &args, &env, &log, &ready, WAIT)
    })
    .await??;
    let api = trmx_node::connect_local(Path::new(&socket)).await?;
    Ok((process, api))
}

/// Stops a process (SIGTERM, then SIGKILL) off the async runtime.
async fn stop_process(mut process: Process) -> anyhow::Result<bool> {
    Ok(tokio::task::spawn_blocking(move || process.stop(Duration::from_secs(5))).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_killed_between_storing_and_acknowledging_shows_the_message_once()
-> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let (mut be_process, _) =
        start_node_process(&h, BE, &[(FAILPOINT_ENV, "inbox-after-store")]).await?;

    let sent = send(&mut nl, referral("crash-1", BE)).await?;
    let id = sent.message_id.clone();

    // The recipient's node stores the delivery, then dies before its Ack.
    let (be_process_after, exit) = tokio::task::spawn_blocking(move || {
        let exit = be_process.wait_exit(WAIT);
        (be_process, exit)
    })
    .await?;
    drop(be_process_after);
    let exit = exit?;
    assert_eq!(
        exit.signal(),
        Some(SIGABRT),
        "the node must die at the fail point: {exit:?}"
    );
    let log = std::fs::read_to_string(h.dir().join(BE).join("node.log"))?;
    assert!(
        log.contains("inbox-after-store"),
        "the node died elsewhere than at the fail point:\n{log}"
    );
    // Not acknowledged: the broker has no receipt for it, the sender no DELIVERED.
    let mut nl_exchange = h.exchange(NL)?;
    let status = broker_status(&mut nl_exchange, &id).await?;
    assert_ne!(
        broker_state(&status),
        pb::MessageState::Acknowledged,
        "{status:?}"
    );
    assert_eq!(status.attempts, 1, "{status:?}");
    assert_eq!(
        state(&outbox_entry(&mut nl, &id).await?.unwrap()),
        pb::OutboxState::Submitted
    );

    // Restarted without the fail point: the broker redelivers, the node
    // recognises the stored message, acknowledges it and keeps one copy.
    let (be_process, mut be) = start_node_process(&h, BE, &[]).await?;
    wait_delivered(&nl, &id).await?;
    let status = broker_status(&mut nl_exchange, &id).await?;
    assert_eq!(
        broker_state(&status),
        pb::MessageState::Acknowledged,
        "{status:?}"
    );
    assert_eq!(
        status.attempts, 2,
        "redelivered once after the crash: {status:?}"
    );
    assert_eq!(inbox_ids(&mut be).await?, [id.as_str()]);
    let watched = watch_all(&mut be, 1).await?;
    assert_eq!(
        watched
            .iter()
            .map(|e| e.message_id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()],
        "the application sees it exactly once"
    );
    assert!(stop_process(be_process).await?, "node stops cleanly");
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_survives_a_sigkill_of_the_sending_node_process() -> TestResult {
    let mut h = Harness::new().await?;
    // The broker is down: the message can only live in the node's outbox.
    let (mut nl_process, mut nl) = start_node_process(&h, NL, &[]).await?;
    let sent = send(&mut nl, referral("killed-1", BE)).await?;
    assert_eq!(sent.state, pb::OutboxState::Queued as i32);
    // SIGKILL as soon as Send answered: nothing is flushed on the way out.
    tokio::task::spawn_blocking(move || nl_process.kill()).await?;

    let (nl_process, mut nl) = start_node_process(&h, NL, &[]).await?;
    let kept = outbox_entry(&mut nl, &sent.message_id).await?.unwrap();
    assert_eq!(state(&kept), pb::OutboxState::Queued, "{kept:?}");
    h.start_broker().await?;
    let be = h.start_node(BE).await?;
    wait_delivered(&nl, &sent.message_id).await?;
    wait_received(&be, &sent.message_id).await?;
    assert_eq!(outbox(&mut nl).await?.len(), 1);
    assert!(stop_process(nl_process).await?, "node stops cleanly");
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_with_after_seq_misses_nothing_and_repeats_nothing() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;

    let mut sent = Vec::new();
    for n in 1..=2 {
        sent.push(
            send(&mut nl, referral(&format!("watch-{n}"), BE))
                .await?
                .message_id,
        );
    }
    let mut stream = watch(&mut be, 0).await?;
    let mut first = Vec::new();
    for _ in 0..2 {
        first.push(next_item(&mut stream).await?);
    }
    drop(stream);
    assert_eq!(
        first.iter().map(|e| &e.message_id).collect::<Vec<_>>(),
        sent.iter().collect::<Vec<_>>()
    );
    let last_seq = first[1].seq;
    assert!(first[0].seq < last_seq);

    // While nobody watches, three more arrive.
    for n in 3..=5 {
        let id = send(&mut nl, referral(&format!("watch-{n}"), BE))
            .await?
            .message_id;
        wait_received(&be, &id).await?;
        sent.push(id);
    }
    let mut stream = watch(&mut be, last_seq).await?;
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(next_item(&mut stream).await?);
    }
    // And one more while the resumed stream is open.
    let live = send(&mut nl, referral("watch-6", BE)).await?.message_id;
    sent.push(live);
    rest.push(next_item(&mut stream).await?);
    expect_quiet(&mut stream).await?;

    assert_eq!(
        rest.iter().map(|e| &e.message_id).collect::<Vec<_>>(),
        sent[2..].iter().collect::<Vec<_>>(),
        "exactly the rest, in order"
    );
    let mut seq = last_seq;
    for entry in &rest {
        assert!(entry.seq > seq, "seq must increase: {rest:?}");
        seq = entry.seq;
    }
    // No gap: the inbox holds nothing after last_seq that the stream skipped.
    let mut stored: Vec<u64> = inbox(&mut be)
        .await?
        .iter()
        .map(|e| e.seq)
        .filter(|s| *s > last_seq)
        .collect();
    stored.sort_unstable();
    assert_eq!(stored, rest.iter().map(|e| e.seq).collect::<Vec<_>>());
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_retried_with_the_same_idempotency_key_queues_once() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;
    let key = "cms:referral:4711:v1";

    // A client that times out and retries may have several attempts in
    // flight at once: they all get the same message.
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let mut nl = nl.clone();
            tokio::spawn(async move { send(&mut nl, referral(key, BE)).await })
        })
        .collect();
    let mut answers = Vec::new();
    for attempt in attempts {
        answers.push(attempt.await??);
    }
    let first = answers[0].clone();
    for again in &answers {
        assert_eq!(again.message_id, first.message_id);
        assert_eq!(again.case_ref, first.case_ref);
    }
    let again = send(&mut nl, referral(key, BE)).await?;
    assert_eq!(again.message_id, first.message_id);

    // The same key for a different document is refused, not queued.
    let other = REFERRAL.replace("Prenatal care", "Antenatal care");
    assert_ne!(other, REFERRAL);
    let status = send(&mut nl, json_request(key, BE, Kind::Referral, &other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    wait_delivered(&nl, &first.message_id).await?;
    let late = send(&mut nl, referral(key, BE)).await?;
    assert_eq!(late.message_id, first.message_id);
    assert_eq!(late.state, pb::OutboxState::Delivered as i32);

    // Also after the sending node restarted.
    let mut nl = h.restart_node(NL).await?;
    let after_restart = send(&mut nl, referral(key, BE)).await?;
    assert_eq!(after_restart.message_id, first.message_id);

    let entries = outbox(&mut nl).await?;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].idempotency_key, key);
    let watched = watch_all(&mut be, 1).await?;
    assert_eq!(
        watched
            .iter()
            .map(|e| e.message_id.as_str())
            .collect::<Vec<_>>(),
        [first.message_id.as_str()],
        "the recipient gets it once"
    );
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_json_body_is_refused_at_send_with_the_field_path_and_nothing_is_queued()
-> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;
    let key = "cms:referral:9:v1";

    let invalid = referral_json_without(&["person", "pseudonym"]);
    let status = send(&mut nl, json_request(key, BE, Kind::Referral, &invalid))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("referral.person.pseudonym: "),
        "{status:?}"
    );
    // Not JSON at all: refused at the document's root.
    let status = send(
        &mut nl,
        json_request(key, BE, Kind::Referral, "{\"purpose\": "),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("referral"), "{status:?}");

    assert!(outbox(&mut nl).await?.is_empty());
    let node = node_status(&mut nl).await?;
    assert_eq!((node.outbox_queued, node.outbox_submitted), (0, 0));

    // The key was not used up, and only the valid document travels.
    let valid = send(&mut nl, referral(key, BE)).await?;
    wait_delivered(&nl, &valid.message_id).await?;
    assert_eq!(outbox(&mut nl).await?.len(), 1);
    let watched = watch_all(&mut be, 1).await?;
    assert_eq!(
        watched
            .iter()
            .map(|e| e.message_id.as_str())
            .collect::<Vec<_>>(),
        [valid.message_id.as_str()]
    );
    h.shutdown().await
}

/// Submits `env` through a hand-made client.
/// A stored message that the real broker delivers again, after a restart of the broker,
/// compares equal field for field with what the recipient's node stored: a JSON body
/// under a content type with spaces and another parameter, `PRIORITY_UNSPECIFIED` (the
/// broker hands it out as `NORMAL`) and a `created_at` finer than the millisecond (the
/// broker keeps milliseconds). Taken for other content, it would be rejected
/// (`DUPLICATE_MESSAGE_ID`) and dead-lettered, its sender told that a message stored
/// here never arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_redelivered_by_a_restarted_broker_is_the_same_field_for_field()
-> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let (mut be_process, _) =
        start_node_process(&h, BE, &[(FAILPOINT_ENV, "inbox-after-store")]).await?;
    // NG-NAPTIP runs no node: a hand-made client with its certificate.
    let mut ng = h.exchange(NG)?;
    let mut env = envelope(BE, Kind::Referral, REFERRAL.as_bytes().to_vec());
    env.content_type = "application/json ;  proto=trmx.v1.Referral ; charset=utf-8".to_owned();
    env.priority = pb::Priority::Unspecified as i32;
    if let Some(created) = env.created_at.as_mut() {
        created.nanos = 123_456_789;
    }
    let id = submit(&mut ng, env).await?;
    let (be_process_after, exit) = tokio::task::spawn_blocking(move || {
        let exit = be_process.wait_exit(WAIT);
        (be_process, exit)
    })
    .await?;
    drop(be_process_after);
    assert_eq!(
        exit?.signal(),
        Some(SIGABRT),
        "the node must die at the fail point"
    );
    h.restart_broker().await?;
    let ng = h.exchange(NG)?;
    let (be_process, mut be) = start_node_process(&h, BE, &[]).await?;
    let status = wait_until(WAIT, "the broker to have it acknowledged", || {
        let mut ng = ng.clone();
        let id = id.clone();
        async move {
            let status = broker_status(&mut ng, &id).await?;
            Ok((broker_state(&status) != pb::MessageState::InFlight
                && broker_state(&status) != pb::MessageState::Accepted)
                .then_some(status))
        }
    })
    .await?;
    assert_eq!(
        broker_state(&status),
        pb::MessageState::Acknowledged,
        "{status:?}"
    );
    assert_eq!(status.attempts, 2, "{status:?}");
    assert_eq!(inbox_ids(&mut be).await?, [id.as_str()]);
    assert!(stop_process(be_process).await?, "node stops cleanly");
    h.shutdown().await
}

async fn submit(exchange: &mut Exchange, env: pb::Envelope) -> anyhow::Result<String> {
    let id = env.message_id.clone();
    exchange
        .submit(pb::SubmitRequest {
            envelope: Some(env),
        })
        .await?;
    Ok(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_body_from_a_hand_made_client_is_rejected_and_its_sender_told_why() -> TestResult
{
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut be = h.start_node(BE).await?;
    // NG-NAPTIP runs no node: a hand-made client with its certificate.
    let mut ng = h.exchange(NG)?;
    let mut reports = ng
        .receive(pb::ReceiveRequest { max_in_flight: 8 })
        .await?
        .into_inner();

    // A well-formed referral that breaks a rule (no pseudonym), and bytes
    // that are no referral at all; both with a correct envelope and digest.
    let Body::Referral(mut document) = Body::from_json(Kind::Referral, REFERRAL)? else {
        panic!("the example is a referral");
    };
    document.person.as_mut().unwrap().pseudonym.clear();
    let rule_breaking = submit(
        &mut ng,
        envelope(BE, Kind::Referral, Body::Referral(document).encode()),
    )
    .await?;
    let garbage = submit(
        &mut ng,
        envelope(BE, Kind::Referral, vec![0x0a, 0x7f, b'x', b'y']),
    )
    .await?;

    let mut paths = Vec::new();
    for id in [&rule_breaking, &garbage] {
        let status = wait_until(WAIT, "the broker to dead-letter it", || {
            let mut ng = ng.clone();
            async move {
                let status = broker_status(&mut ng, id).await?;
                Ok((broker_state(&status) == pb::MessageState::DeadLettered).then_some(status))
            }
        })
        .await?;
        assert!(status.reason_code.contains("INVALID_BODY"), "{status:?}");
        paths.push(status.field_path);
    }
    // The rule broken is named by its field path; undecodable bytes by the payload.
    assert_eq!(paths, ["referral.person.pseudonym", "payload"]);

    // Its sender receives a non-delivery report for each, with the reason.
    let mut reported = Vec::new();
    for _ in 0..2 {
        let delivery = next_item(&mut reports).await?;
        let env = delivery.envelope.unwrap();
        assert_eq!(env.kind, pb::MessageKind::NonDeliveryReport as i32);
        assert!(env.sender.is_empty(), "made by the broker");
        let Body::Receipt(report) = Body::decode(Kind::NonDeliveryReport, &env.payload)? else {
            panic!("a report carries a receipt");
        };
        assert_eq!(report.outcome, pb::Outcome::RejectedByRecipient as i32);
        assert!(report.reason_code.contains("INVALID_BODY"), "{report:?}");
        ng.ack(pb::AckRequest {
            message_ids: vec![env.message_id],
        })
        .await?;
        reported.push((report.message_id, report.field_path));
    }
    reported.sort();
    let mut expected = vec![
        (rule_breaking.clone(), paths[0].clone()),
        (garbage.clone(), paths[1].clone()),
    ];
    expected.sort();
    assert_eq!(reported, expected);

    // The recipient's node stored neither.
    assert!(inbox(&mut be).await?.is_empty());
    assert!(inbox_entry(&mut be, &rule_breaking).await?.is_none());
    assert!(watch_all(&mut be, 0).await?.is_empty());
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_its_recipient_rejects_shows_failed_with_the_reason_at_the_sending_node()
-> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    // BE-PAYOKE runs no node: a hand-made recipient that rejects.
    let mut be = h.exchange(BE)?;
    let mut deliveries = be
        .receive(pb::ReceiveRequest { max_in_flight: 8 })
        .await?
        .into_inner();

    let sent = send(&mut nl, referral("rejected-1", BE)).await?;
    let delivery = next_item(&mut deliveries).await?;
    assert_eq!(delivery.envelope.unwrap().message_id, sent.message_id);
    be.reject(pb::RejectRequest {
        message_id: sent.message_id.clone(),
        reason_code: "INVALID_BODY".into(),
        field_path: "referral.consent.basis".into(),
    })
    .await?;

    let entry = wait_outbox(&nl, &sent.message_id, "the non-delivery report", |e| {
        e.state == pb::OutboxState::Failed as i32
    })
    .await?;
    let failure = entry.failure.unwrap();
    assert_eq!(failure.outcome, "rejected-by-recipient");
    assert!(failure.reason_code.contains("INVALID_BODY"), "{failure:?}");
    assert_eq!(failure.field_path, "referral.consent.basis");
    let case = timeline(&mut nl, &sent.case_ref).await?;
    assert_eq!(case.len(), 1);
    assert_eq!(case[0].state, "failed");
    h.shutdown().await
}

/// NL-NRM refers a case to BE-PAYOKE and waits until BE-PAYOKE has it;
/// returns (referral id, case ref).
async fn refer(nl: &mut Api, be: &Api, key: &str) -> anyhow::Result<(String, String)> {
    let sent = send(nl, referral(key, BE)).await?;
    wait_received(be, &sent.message_id).await?;
    wait_delivered(nl, &sent.message_id).await?;
    Ok((sent.message_id, sent.case_ref))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_marks_the_request_answered() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;

    let (request, case_ref) = refer(&mut nl, &be, "answered-1").await?;
    let before = outbox_entry(&mut nl, &request).await?.unwrap();
    assert!(before.answered_by.is_empty(), "{before:?}");

    // (no case_ref: a reply takes the case of the message it answers)
    let reply = send(
        &mut be,
        reply_request(
            "answered-1-response",
            NL,
            Kind::ReferralResponse,
            REFERRAL_RESPONSE,
            "",
            &request,
        ),
    )
    .await?;
    assert_eq!(reply.case_ref, case_ref);
    let answered = wait_outbox(&nl, &request, "the request marked answered", |e| {
        !e.answered_by.is_empty()
    })
    .await?;
    assert_eq!(answered.answered_by, reply.message_id);
    assert_eq!(
        state(&answered),
        pb::OutboxState::Delivered,
        "ANSWERED on top"
    );
    let received = wait_received(&nl, &reply.message_id).await?;
    assert_eq!(received.in_reply_to, request);
    // The answering side marks the request it answered, too.
    let theirs = inbox_entry(&mut be, &request).await?.unwrap();
    assert_eq!(theirs.answered_by, reply.message_id);
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_case_timeline_lists_every_message_of_the_case_from_both_sides() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;

    let (request, case_ref) = refer(&mut nl, &be, "case-1").await?;
    let response = send(
        &mut be,
        reply_request(
            "case-1-response",
            NL,
            Kind::ReferralResponse,
            REFERRAL_RESPONSE,
            &case_ref,
            &request,
        ),
    )
    .await?
    .message_id;
    wait_delivered(&be, &response).await?;
    let follow_up = send(
        &mut be,
        reply_request(
            "case-1-follow-up",
            NL,
            Kind::FollowUp,
            FOLLOW_UP,
            &case_ref,
            "",
        ),
    )
    .await?
    .message_id;
    wait_delivered(&be, &follow_up).await?;
    wait_received(&nl, &follow_up).await?;
    // Another case between the same two: not part of this timeline.
    refer(&mut nl, &be, "case-2").await?;

    let sent = pb::MessageDirection::Sent as i32;
    let received = pb::MessageDirection::Received as i32;
    let referral = Kind::Referral.to_pb() as i32;
    let answer = Kind::ReferralResponse.to_pb() as i32;
    let follow = Kind::FollowUp.to_pb() as i32;
    let expected_nl = [
        (
            sent,
            request.as_str(),
            referral,
            BE,
            "",
            "delivered+answered",
        ),
        (
            received,
            response.as_str(),
            answer,
            BE,
            request.as_str(),
            "received",
        ),
        (received, follow_up.as_str(), follow, BE, "", "received"),
    ];
    let expected_be = [
        (
            received,
            request.as_str(),
            referral,
            NL,
            "",
            "received+answered",
        ),
        (
            sent,
            response.as_str(),
            answer,
            NL,
            request.as_str(),
            "delivered",
        ),
        (sent, follow_up.as_str(), follow, NL, "", "delivered"),
    ];
    for (api, expected) in [(&mut nl, &expected_nl), (&mut be, &expected_be)] {
        let entries = timeline(api, &case_ref).await?;
        let got: Vec<_> = entries
            .iter()
            .map(|e| {
                (
                    e.direction,
                    e.message_id.as_str(),
                    e.kind,
                    e.counterpart.as_str(),
                    e.in_reply_to.as_str(),
                    e.state.as_str(),
                )
            })
            .collect();
        assert_eq!(got, expected.to_vec());
        let times: Vec<_> = entries
            .iter()
            .map(|e| {
                let at = e.at.unwrap();
                (at.seconds, at.nanos)
            })
            .collect();
        assert!(times.is_sorted(), "oldest first: {entries:?}");
    }
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_outbox_and_inbox_and_does_not_redeliver() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut be = h.start_node(BE).await?;

    let (first, case_ref) = refer(&mut nl, &be, "restart-1").await?;
    let seen = watch_all(&mut be, 1).await?;
    assert_eq!(seen.len(), 1);
    let last_seq = seen[0].seq;

    let mut nl = h.restart_node(NL).await?;
    let mut be = h.restart_node(BE).await?;

    let kept = outbox_entry(&mut nl, &first).await?.unwrap();
    assert_eq!(state(&kept), pb::OutboxState::Delivered);
    assert_eq!(kept.case_ref, case_ref);
    let stored = inbox(&mut be).await?;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(
        (stored[0].message_id.as_str(), stored[0].seq),
        (first.as_str(), last_seq)
    );
    let status = node_status(&mut be).await?;
    assert_eq!((status.inbox_total, status.last_inbox_seq), (1, last_seq));

    // Resuming after the last processed entry brings nothing old back...
    let mut stream = watch(&mut be, last_seq).await?;
    expect_quiet(&mut stream).await?;
    // ...and the next new message, once.
    let second = send(&mut nl, referral("restart-2", BE)).await?.message_id;
    let next = next_item(&mut stream).await?;
    assert_eq!(next.message_id, second);
    assert!(next.seq > last_seq);
    expect_quiet(&mut stream).await?;
    assert_eq!(inbox_ids(&mut be).await?, [first, second]);
    h.shutdown().await
}

/// A message the recipient's node stored but never acknowledged (killed between the two),
/// that expired on the broker and was redriven by an operator, comes again with a new
/// `expires_at` (the redrive's lifetime) and every other field as the first delivery had
/// it: the node takes it for the message it stored (no `DUPLICATE_MESSAGE_ID`), acknowledges
/// it and keeps one copy, and the sender's entry ends `DELIVERED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_redriven_after_its_expiry_is_acknowledged_as_the_same() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut operator = h.operator("receipt-probe")?;
    let (mut be_process, _) =
        start_node_process(&h, BE, &[(FAILPOINT_ENV, "inbox-after-store")]).await?;
    // (long enough for the delivery to reach the node first: if it did not, the node
    // does not die at the fail point, and the test says so)
    let lifetime = Duration::from_secs(15);
    let expiry = tokio::time::Instant::now() + lifetime;
    let short = pb::SendRequest {
        expires_at: Some(trmx_proto::time::to_timestamp(
            std::time::SystemTime::now() + lifetime,
        )),
        ..referral("redriven", BE)
    };
    let sent = send(&mut nl, short).await?;
    let id = sent.message_id.clone();
    let (be_process_after, exit) = tokio::task::spawn_blocking(move || {
        let exit = be_process.wait_exit(WAIT);
        (be_process, exit)
    })
    .await?;
    drop(be_process_after);
    assert_eq!(
        exit?.signal(),
        Some(SIGABRT),
        "the node must die at the fail point"
    );
    tokio::time::sleep_until(expiry).await;
    let entry = wait_outbox(&nl, &id, "its expiry report", |e| {
        e.state == pb::OutboxState::Failed as i32
    })
    .await?;
    assert_eq!(entry.failure.map(|f| f.outcome).as_deref(), Some("expired"));

    operator
        .redrive(pb::RedriveRequest {
            message_id: id.clone(),
            sender: NL.to_owned(),
        })
        .await?;
    let (be_process, mut be) = start_node_process(&h, BE, &[]).await?;
    let entry = wait_outbox(&nl, &id, "its delivery receipt", |e| {
        e.state == pb::OutboxState::Delivered as i32
    })
    .await?;
    assert!(entry.failure.is_none(), "{entry:?}");
    let mut nl_exchange = h.exchange(NL)?;
    let status = broker_status(&mut nl_exchange, &id).await?;
    assert_eq!(
        broker_state(&status),
        pb::MessageState::Acknowledged,
        "{status:?}"
    );
    assert_eq!(inbox_ids(&mut be).await?, [id.as_str()]);
    assert!(stop_process(be_process).await?, "node stops cleanly");
    h.shutdown().await
}

/// The real broker's reports of an expiry, a purge and, after an operator's redrive, a
/// delivery pass the sending node's checks of a receipt (its id derived from the message
/// and the outcome, its time), and settle the entries: the expired one `FAILED`, then
/// `DELIVERED` once redriven and stored (the one way back); the purged one `FAILED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_s_reports_of_expiry_purge_and_a_redrive_settle_the_sender_s_entries()
-> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let mut operator = h.operator("receipt-probe")?;

    // BE is offline: one message expires on the broker, one is purged there
    let short = pb::SendRequest {
        expires_at: Some(trmx_proto::time::to_timestamp(
            std::time::SystemTime::now() + Duration::from_secs(2),
        )),
        ..referral("expires", BE)
    };
    let expiring = send(&mut nl, short).await?;
    let purged = send(&mut nl, referral("purged", BE)).await?;
    wait_outbox(&nl, &purged.message_id, "the broker to accept it", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    operator
        .purge(pb::PurgeRequest {
            message_id: purged.message_id.clone(),
            reason: "receipt probe".to_owned(),
            sender: NL.to_owned(),
        })
        .await?;
    for (id, outcome) in [
        (&expiring.message_id, "expired"),
        (&purged.message_id, "purged"),
    ] {
        let entry = wait_outbox(&nl, id, "its non-delivery report", |e| {
            e.state == pb::OutboxState::Failed as i32
        })
        .await?;
        assert_eq!(
            entry.failure.map(|f| f.outcome).as_deref(),
            Some(outcome),
            "{id}"
        );
    }

    operator
        .redrive(pb::RedriveRequest {
            message_id: expiring.message_id.clone(),
            sender: NL.to_owned(),
        })
        .await?;
    let be = h.start_node(BE).await?;
    wait_received(&be, &expiring.message_id).await?;
    let entry = wait_outbox(&nl, &expiring.message_id, "its delivery receipt", |e| {
        e.state == pb::OutboxState::Delivered as i32
    })
    .await?;
    assert!(entry.failure.is_none(), "{entry:?}");
    let entry = outbox_entry(&mut nl, &purged.message_id).await?.unwrap();
    assert_eq!(state(&entry), pb::OutboxState::Failed);
    h.shutdown().await
}
