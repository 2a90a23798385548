//! A broker PROCESS aborted between the parts of ONE `Ack` (the real
//! `trmx-demo broker` executable, raw `Exchange` clients over mutual TLS).
//!
//! The broker applies an `Ack` whose records together pass the store's read
//! budget of one transaction (`BATCH_READ_BYTES` in
//! `broker/src/store/sled/ops.rs`) in parts, each its own sled transaction, and
//! flushes once, after the last. The test fail point `during-ack:N` aborts the
//! process after the N-th part of an `Ack` is applied, before any flush. Here the
//! `Ack` names three messages that each fill a part, so the process dies with the
//! earlier parts applied but not flushed (sled may or may not have written them
//! by then) and the later ones never run. The chaos runs (`chaos.rs`) cannot get
//! there: their messages are small, and the point fires after the only part.
//!
//! What must hold, seen through the wire: the store verifies offline between the
//! abort and the restart; after it each message is ACKNOWLEDGED (its part survived)
//! or due again, and then delivered again whole; the parts after the abort changed
//! nothing; the recipient's repeat of its unanswered `Ack` (before or after the
//! redeliveries) acknowledges each message; in the end every message is
//! ACKNOWLEDGED, delivered no more, and its sender holds exactly one
//! `DELIVERY_RECEIPT` for it. Two rounds on one store: `during-ack:2` (whose abort
//! proves that the `Ack` has a second part) and `during-ack:1`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use prost::Message;
use tonic::Streaming;
use trmx_proto::envelope::sha256;
use trmx_proto::{Kind, pb};
use trmx_tests::chaos::{FAILPOINT_ENV, Fleet, Point, RECIPIENT};
use trmx_tests::harness::{Exchange, QUIET, WAIT, envelope, next_item};

const DEMO: &str = env!("CARGO_BIN_EXE_trmx-demo");

/// The store's read budget of one transaction: `BATCH_READ_BYTES` in
/// `broker/src/store/sled/ops.rs` (private to the broker, hence repeated here).
/// Should it grow past what [`PAYLOAD_BYTES`] assumes, the `during-ack:2` round
/// fails (the broker answers the `Ack` instead of aborting): the test cannot pass
/// without an `Ack` applied in parts.
const BATCH_READ_BYTES: usize = 16 << 20;
/// One message's payload: more than half the budget, so no two messages share
/// a part and an `Ack` of [`MESSAGES`] of them is applied in [`MESSAGES`] parts.
const PAYLOAD_BYTES: usize = BATCH_READ_BYTES / 2 + (1 << 20);
/// Messages in the `Ack`, one part each.
const MESSAGES: usize = 3;
/// What the clients accept in one gRPC message (a delivery of [`PAYLOAD_BYTES`]
/// with its envelope; tonic's default is 4 MiB).
const MAX_GRPC_MESSAGE: usize = 2 * PAYLOAD_BYTES;
/// SIGABRT, what a fail point dies of (`std::process::abort`).
const SIGABRT: i32 = 6;

/// What the recipient does first after the restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// Repeats its unanswered `Ack` (what a node does).
    RepeatAck,
    /// Receives what is due again, and acknowledges it.
    ReceiveFirst,
}

/// A message sent, and by whom.
#[derive(Debug, Clone)]
struct Sent {
    sender: String,
    id: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_aborted_between_the_parts_of_one_ack_loses_nothing_and_doubles_nothing()
-> anyhow::Result<()> {
    let temp = tempfile::Builder::new()
        .prefix("trmx-ack-parts-")
        .tempdir()?;
    let mut fleet = Fleet::create(temp.path(), Path::new(DEMO), 2, |c| {
        c.limits.max_envelope_bytes = (PAYLOAD_BYTES + (1 << 20)) as u64;
        // No redelivery before the `Ack`, however slow the host: the first
        // deliveries must all be in flight when it comes.
        c.lifecycle.ack_timeout = Duration::from_secs(120);
    })
    .await?;
    // `during-ack:2` first: that it aborts at all proves the `Ack` reached a
    // second part (an `Ack` applied whole passes the point once, and is answered);
    // it dies between the second part and the third. Then `during-ack:1`, between
    // the first and the second, with an `Ack` of the same shape. The recipient
    // resumes one way in each.
    for (hit, resume) in [(2, Resume::ReceiveFirst), (1, Resume::RepeatAck)] {
        let outcome = crash_between_parts(&mut fleet, hit, resume).await;
        if let Err(e) = &outcome {
            eprintln!(
                "round during-ack:{hit} failed: {e:#}\nbroker log kept in {}",
                fleet.broker.log().display()
            );
            drop(temp.keep());
            return outcome;
        }
    }
    assert!(fleet.stop_all().await?, "clean stop");
    Ok(())
}

/// One round: [`MESSAGES`] large messages sent and received, acknowledged in
/// one `Ack` that aborts the broker after part `hit`; then the restart, the
/// recipient resuming as `resume` says, and the checks.
async fn crash_between_parts(fleet: &mut Fleet, hit: usize, resume: Resume) -> anyhow::Result<()> {
    ensure!(hit < MESSAGES, "the abort must come before the last part");
    fleet
        .start_broker(&[(
            FAILPOINT_ENV.to_owned(),
            format!("{}:{hit}", Point::DuringAck.name()),
        )])
        .await?;
    let mut senders = BTreeMap::new();
    for id in fleet.senders.clone() {
        senders.insert(id.clone(), exchange(fleet, &id)?);
    }
    // The `Ack` names them in this order: the one at index `i` is in its part
    // `i + 1`, and the parts run in order, so the abort after part `hit` leaves
    // those at indexes `hit..` untouched.
    let mut sent = Vec::new();
    for i in 0..MESSAGES {
        let sender = &fleet.senders[i % fleet.senders.len()];
        let env = envelope(RECIPIENT, Kind::Referral, vec![0x5a; PAYLOAD_BYTES]);
        let id = env.message_id.clone();
        let client = senders.get_mut(sender).context("sender client")?;
        client
            .submit(pb::SubmitRequest {
                envelope: Some(env),
            })
            .await
            .with_context(|| format!("submitting message {i}"))?;
        sent.push(Sent {
            sender: sender.clone(),
            id,
        });
    }
    let ids: Vec<String> = sent.iter().map(|s| s.id.clone()).collect();

    // The recipient holds them all in flight on one stream ...
    let mut recipient = exchange(fleet, RECIPIENT)?;
    let mut stream = receive(&mut recipient).await?;
    let mut delivered = BTreeSet::new();
    while delivered.len() < MESSAGES {
        let delivery = next_item(&mut stream).await?;
        let id = id_of(&delivery)?;
        ensure!(ids.contains(&id), "delivery of an unknown message {id}");
        ensure!(delivered.insert(id.clone()), "{id} delivered twice");
        intact(&delivery)?;
    }
    // ... and acknowledges them in ONE `Ack`, in the order sent: the broker
    // aborts after part `hit`, before answering.
    let answer = tokio::time::timeout(
        3 * WAIT,
        recipient.ack(pb::AckRequest {
            message_ids: ids.clone(),
        }),
    )
    .await
    .context("the Ack was neither answered nor broken off")?;
    let broken = match answer {
        Err(status) => status,
        Ok(response) => bail!(
            "the broker answered the Ack instead of aborting after its part {hit} (an Ack of \
             {MESSAGES} messages of {PAYLOAD_BYTES} bytes was not applied in {MESSAGES} parts?): \
             {:?}",
            response.into_inner()
        ),
    };
    drop(stream);
    let exit = fleet.broker.wait_exit(3 * WAIT).await.with_context(|| {
        format!(
            "the Ack failed ({broken}), but the broker that should have aborted in it still runs"
        )
    })?;
    ensure!(
        exit.signal() == Some(SIGABRT),
        "the broker ended with {exit}, not by the fail point's abort"
    );

    // Between the crash and the restart: the store verifies offline.
    let data_dir = fleet.broker_data_dir.clone();
    let check =
        tokio::task::spawn_blocking(move || trmx_broker::store::verify_store_offline(&data_dir))
            .await??;
    ensure!(
        check.is_consistent(),
        "store verify after the abort: {check}"
    );

    fleet.start_broker(&[]).await?;
    let mut senders = BTreeMap::new();
    for id in fleet.senders.clone() {
        senders.insert(id.clone(), exchange(fleet, &id)?);
    }
    let mut recipient = exchange(fleet, RECIPIENT)?;

    // Each message is ACKNOWLEDGED (a part applied before the abort survived)
    // or due again; the parts after the abort never ran.
    let mut acknowledged = BTreeSet::new();
    let mut due = Vec::new();
    let mut handed_over = BTreeSet::new();
    for (i, message) in sent.iter().enumerate() {
        let client = senders.get_mut(&message.sender).context("sender client")?;
        let status = status(client, &message.id).await?;
        match pb::MessageState::try_from(status.state)? {
            pb::MessageState::Acknowledged => {
                ensure!(
                    i < hit,
                    "message {i} is ACKNOWLEDGED, but its part (after the abort) never ran"
                );
                acknowledged.insert(message.id.clone());
            }
            pb::MessageState::Accepted => {
                due.push(message.id.clone());
                // (a lease is not flushed before its delivery: a crash can undo it)
                if status.attempts > 0 {
                    handed_over.insert(message.id.clone());
                }
            }
            other => bail!("message {i} is {other:?} after the restart"),
        }
    }
    eprintln!(
        "during-ack:{hit}: {} of the {hit} parts applied before the abort survived it; \
         {} of the {} due again still counted as delivered",
        acknowledged.len(),
        handed_over.len(),
        due.len()
    );

    // The recipient had no answer to its `Ack`. Either it receives first:
    // exactly the messages due again come, once each and whole, and it
    // acknowledges them; its repeat of the whole `Ack` after that finds each
    // ACKNOWLEDGED. Or it repeats the `Ack` first (as a node does that had no
    // answer): that acknowledges again those ACKNOWLEDGED (harmless) and those
    // due again that still count as delivered to it (a late ack is applied);
    // the others (a delivery the crash undid) are NOT_FOUND, and come again.
    let mut stream = match resume {
        Resume::ReceiveFirst => {
            let stream = redeliver(&mut recipient, &due).await?;
            ack_all(&mut recipient, &ids)
                .await
                .context("the repeat of the unanswered Ack")?;
            stream
        }
        Resume::RepeatAck => {
            let results = recipient
                .ack(pb::AckRequest {
                    message_ids: ids.clone(),
                })
                .await?
                .into_inner()
                .results;
            ensure!(results.len() == ids.len(), "{results:?}");
            let mut not_found = Vec::new();
            for (id, outcome) in ids.iter().zip(&results) {
                let expected = if acknowledged.contains(id) || handed_over.contains(id) {
                    pb::AckResult::Acknowledged
                } else {
                    not_found.push(id.clone());
                    pb::AckResult::NotFound
                };
                ensure!(
                    outcome.message_id == *id && outcome.result == expected as i32,
                    "repeat of the unanswered Ack: {outcome:?}, expected {id} {expected:?}"
                );
            }
            redeliver(&mut recipient, &not_found).await?
        }
    };
    // Nothing more for the recipient: every message is acknowledged (not
    // `expect_quiet`, which would print a delivery's payload, megabytes).
    match tokio::time::timeout(QUIET, stream.message()).await {
        Err(_) => {}
        Ok(Ok(Some(delivery))) => bail!("{} delivered again after its ack", id_of(&delivery)?),
        Ok(Ok(None)) => bail!("the recipient's stream ended"),
        Ok(Err(status)) => bail!("the recipient's stream failed: {status}"),
    }
    drop(stream);

    // Every message ACKNOWLEDGED, with exactly one receipt at its sender.
    for (i, message) in sent.iter().enumerate() {
        let client = senders.get_mut(&message.sender).context("sender client")?;
        let state = pb::MessageState::try_from(status(client, &message.id).await?.state)?;
        ensure!(
            state == pb::MessageState::Acknowledged,
            "message {i} is {state:?} at the end"
        );
    }
    for (sender, client) in &mut senders {
        let mine: BTreeSet<String> = sent
            .iter()
            .filter(|s| s.sender == *sender)
            .map(|s| s.id.clone())
            .collect();
        let receipts = receipts(client, &mine).await?;
        for id in &mine {
            ensure!(
                receipts.get(id) == Some(&1),
                "{sender} holds {} receipts for {id}",
                receipts.get(id).copied().unwrap_or(0)
            );
        }
    }

    ensure!(
        tokio::task::block_in_place(|| fleet.broker.stop()),
        "the restarted broker stops cleanly"
    );
    Ok(())
}

/// The recipient's deliveries, all [`MESSAGES`] at once.
async fn receive(recipient: &mut Exchange) -> anyhow::Result<Streaming<pb::Delivery>> {
    Ok(recipient
        .receive(pb::ReceiveRequest {
            max_in_flight: MESSAGES as u32,
        })
        .await?
        .into_inner())
}

/// Opens the recipient's stream, expects exactly `due` on it, once each and
/// whole, and acknowledges them in one `Ack`; returns the stream.
async fn redeliver(
    recipient: &mut Exchange,
    due: &[String],
) -> anyhow::Result<Streaming<pb::Delivery>> {
    let mut stream = receive(recipient).await?;
    let mut redelivered = BTreeSet::new();
    while redelivered.len() < due.len() {
        let delivery = next_item(&mut stream)
            .await
            .with_context(|| format!("waiting for {due:?} to come again"))?;
        let id = id_of(&delivery)?;
        ensure!(
            due.contains(&id),
            "{id} delivered again although it was ACKNOWLEDGED"
        );
        ensure!(redelivered.insert(id.clone()), "{id} redelivered twice");
        intact(&delivery)?;
    }
    if !due.is_empty() {
        ack_all(recipient, due)
            .await
            .context("the Ack of the redelivered messages")?;
    }
    Ok(stream)
}

/// Acknowledges `ids` in one `Ack` and expects each ACKNOWLEDGED.
async fn ack_all(recipient: &mut Exchange, ids: &[String]) -> anyhow::Result<()> {
    let results = recipient
        .ack(pb::AckRequest {
            message_ids: ids.to_vec(),
        })
        .await?
        .into_inner()
        .results;
    ensure!(results.len() == ids.len(), "{results:?}");
    for (id, outcome) in ids.iter().zip(&results) {
        ensure!(
            outcome.message_id == *id && outcome.result == pb::AckResult::Acknowledged as i32,
            "{outcome:?}, expected {id} ACKNOWLEDGED"
        );
    }
    Ok(())
}

/// An `Exchange` client of participant `id` that takes large deliveries.
fn exchange(fleet: &Fleet, id: &str) -> anyhow::Result<Exchange> {
    Ok(fleet
        .exchange(id)?
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE))
}

fn id_of(delivery: &pb::Delivery) -> anyhow::Result<String> {
    Ok(delivery
        .envelope
        .as_ref()
        .context("a delivery without an envelope")?
        .message_id
        .clone())
}

/// Checks that `delivery` carries the whole payload it was sent with.
fn intact(delivery: &pb::Delivery) -> anyhow::Result<()> {
    let env = delivery
        .envelope
        .as_ref()
        .context("a delivery without an envelope")?;
    ensure!(
        env.payload.len() == PAYLOAD_BYTES && sha256(&env.payload).as_slice() == env.payload_sha256,
        "{} delivered with {} payload bytes that do not match its digest (sent: {PAYLOAD_BYTES})",
        env.message_id,
        env.payload.len()
    );
    Ok(())
}

/// The broker's status of message `id`, asked by its sender.
async fn status(client: &mut Exchange, id: &str) -> anyhow::Result<pb::MessageStatus> {
    Ok(client
        .get_status(pb::GetStatusRequest {
            message_id: id.to_owned(),
        })
        .await?
        .into_inner())
}

/// Receives and acknowledges the sender's receipts until each of `ids` has
/// one, and then for [`QUIET`] more (every ack happened before, so a second
/// receipt of any would be queued already); returns how many came per
/// original message.
async fn receipts(
    client: &mut Exchange,
    ids: &BTreeSet<String>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut stream = client
        .receive(pb::ReceiveRequest { max_in_flight: 16 })
        .await?
        .into_inner();
    let mut count = BTreeMap::<String, usize>::new();
    loop {
        let missing: Vec<&String> = ids.iter().filter(|id| !count.contains_key(*id)).collect();
        let delivery = if missing.is_empty() {
            match tokio::time::timeout(QUIET, stream.message()).await {
                Err(_) => return Ok(count),
                Ok(item) => item?.context("the sender's stream ended")?,
            }
        } else {
            next_item(&mut stream)
                .await
                .with_context(|| format!("no DELIVERY_RECEIPT for {missing:?}"))?
        };
        let env = delivery
            .envelope
            .context("a delivery without an envelope")?;
        ensure!(
            env.kind == Kind::DeliveryReceipt.to_pb() as i32,
            "a sender got a delivery of kind {} (only receipts expected)",
            env.kind
        );
        let receipt = pb::Receipt::decode(env.payload.as_slice())?;
        ensure!(
            receipt.outcome == pb::Outcome::Delivered as i32,
            "receipt for {}: {receipt:?}",
            receipt.message_id
        );
        ensure!(
            ids.contains(&receipt.message_id),
            "receipt for a message of someone else: {}",
            receipt.message_id
        );
        *count.entry(receipt.message_id).or_default() += 1;
        let acked = client
            .ack(pb::AckRequest {
                message_ids: vec![env.message_id.clone()],
            })
            .await?
            .into_inner();
        ensure!(
            acked.results.len() == 1
                && acked.results[0].result == pb::AckResult::Acknowledged as i32,
            "ack of receipt {}: {acked:?}",
            env.message_id
        );
    }
}
