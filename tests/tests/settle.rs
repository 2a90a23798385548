//! A sending node settles an outbox entry from the broker's status when the broker's
//! report of it never comes: real broker, real nodes, real mutual TLS. The report is
//! made not to come the way the product allows: the sender's node is down when the
//! message ends, and an operator purges the report waiting in its queue (a receipt is
//! purged like any message, named by the participant it goes to). The restarted node's
//! outbox check (`broker.outbox_check_interval_secs`) asks the broker `GetStatus` and
//! must settle the entry as the report would have: a twin message whose report does
//! arrive shows what that is.
//!
//! Each test runs on one thread ([`run_captured`]) so that the broker's and the
//! nodes' log lines all reach its [`LogCapture`]: nothing may be logged at ERROR, and
//! no contradiction may be said.

use std::time::{Duration, SystemTime};

use anyhow::{Context, bail, ensure};
use trmx_broker::clock::ManualClock;
use trmx_proto::{Kind, MessageId, pb};
use trmx_tests::harness::{
    Exchange, Harness, WAIT, broker_status, json_request, next_item, outbox_entry, reply_request,
    send, wait_outbox, wait_received, wait_until,
};
use trmx_tests::logs::{LogCapture, run_captured};
use trmx_tests::proxy::{Fault, FaultProxy};
use trmx_tests::story::EXAMPLES;

type TestResult = anyhow::Result<()>;

const NL: &str = "NL-NRM";
const BE: &str = "BE-PAYOKE";

/// The reason and field path the recipient's software rejects with.
const REASON_CODE: &str = "INVALID_BODY";
const FIELD_PATH: &str = "referral.person.family_name";

/// The log line of a settle from the broker's status (`settled_on_broker`).
const SETTLED_LINE: &str = "settled from the broker's status";

/// How the broker finishes the two messages while their sender's node is down.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// The recipient's node stores and acknowledges them.
    Delivered,
    /// The recipient's software rejects them (reason code and field path).
    Rejected,
    /// Their lifetime ends on the broker (its clock moved past their `expires_at`).
    Expired,
    /// An operator purges them.
    Purged,
    /// Their only delivery attempt (`lifecycle.max_attempts = 1`) is never acknowledged.
    AttemptsExhausted,
}

impl Ending {
    /// The broker's final state of the message.
    fn state(self) -> pb::MessageState {
        match self {
            Ending::Delivered => pb::MessageState::Acknowledged,
            Ending::Rejected | Ending::AttemptsExhausted => pb::MessageState::DeadLettered,
            Ending::Expired => pb::MessageState::Expired,
            Ending::Purged => pb::MessageState::Purged,
        }
    }

    /// The outcome of the broker's report (names the report's id).
    fn outcome(self) -> pb::Outcome {
        match self {
            Ending::Delivered => pb::Outcome::Delivered,
            Ending::Rejected => pb::Outcome::RejectedByRecipient,
            Ending::Expired => pb::Outcome::Expired,
            Ending::Purged => pb::Outcome::Purged,
            Ending::AttemptsExhausted => pb::Outcome::DeadLettered,
        }
    }

    /// The outbox state and failure outcome the report gives the entry.
    fn settled(self) -> (pb::OutboxState, Option<&'static str>) {
        match self {
            Ending::Delivered => (pb::OutboxState::Delivered, None),
            Ending::Rejected => (pb::OutboxState::Failed, Some("rejected-by-recipient")),
            Ending::Expired => (pb::OutboxState::Failed, Some("expired")),
            Ending::Purged => (pb::OutboxState::Failed, Some("purged")),
            Ending::AttemptsExhausted => (pb::OutboxState::Failed, Some("dead-lettered")),
        }
    }
}

/// A referral to BE-PAYOKE.
fn referral(key: &str) -> pb::SendRequest {
    json_request(key, BE, Kind::Referral, EXAMPLES[0])
}

fn is_settled(entry: &pb::OutboxEntry) -> bool {
    entry.state == pb::OutboxState::Delivered as i32
        || entry.state == pb::OutboxState::Failed as i32
}

/// Waits until the broker holds `id` (sent by NL-NRM) in `state`.
async fn wait_broker_state(
    nl: &Exchange,
    id: &str,
    state: pb::MessageState,
) -> anyhow::Result<pb::MessageStatus> {
    wait_until(WAIT, &format!("{id} {state:?} on the broker"), || {
        let mut nl = nl.clone();
        async move {
            let status = broker_status(&mut nl, id).await?;
            Ok((status.state == state as i32).then_some(status))
        }
    })
    .await
}

/// Purges the report of `outcome` about NL-NRM's message `id`, waiting in NL-NRM's
/// queue: the report never reaches its node.
async fn purge_report(h: &Harness, id: &str, outcome: pb::Outcome) -> TestResult {
    let report = MessageId::receipt_for(MessageId::parse(id)?, outcome);
    let purged = h
        .operator("settle-probe")?
        .purge(pb::PurgeRequest {
            message_id: report.to_string(),
            reason: "report dropped by the settle test".to_owned(),
            sender: NL.to_owned(),
        })
        .await
        .with_context(|| format!("purging the report {report} of {id}"))?
        .into_inner();
    ensure!(!purged.already_purged, "{purged:?}");
    Ok(())
}

/// Finishes messages `ids` of NL-NRM on the broker as `ending` says (NL-NRM's node is
/// down), and waits until the broker holds each in its final state.
async fn finish(h: &mut Harness, ending: Ending, clock: &ManualClock, ids: &[&str]) -> TestResult {
    match ending {
        Ending::Delivered => {
            let be = h.start_node(BE).await?;
            for id in ids {
                wait_received(&be, id).await?;
            }
        }
        Ending::Rejected | Ending::AttemptsExhausted => {
            // the recipient's own software, not a node: it takes both, then rejects
            // them, or goes away without an answer
            let mut be = h.exchange(BE)?;
            let mut deliveries = be
                .receive(pb::ReceiveRequest { max_in_flight: 8 })
                .await?
                .into_inner();
            let mut delivered = Vec::new();
            for _ in ids {
                let delivery = next_item(&mut deliveries).await?;
                delivered.push(
                    delivery
                        .envelope
                        .context("a delivery's envelope")?
                        .message_id,
                );
            }
            delivered.sort();
            let mut expected: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
            expected.sort();
            ensure!(delivered == expected, "{delivered:?}");
            if let Ending::Rejected = ending {
                for id in ids {
                    be.reject(pb::RejectRequest {
                        message_id: (*id).to_owned(),
                        reason_code: REASON_CODE.to_owned(),
                        field_path: FIELD_PATH.to_owned(),
                    })
                    .await?;
                }
            }
            // (a closed stream releases its deliveries at once: with one attempt
            // allowed, they are dead-lettered)
            drop(deliveries);
        }
        Ending::Expired => clock.advance(Duration::from_secs(120)),
        Ending::Purged => {
            let mut operator = h.operator("settle-purger")?;
            for id in ids {
                operator
                    .purge(pb::PurgeRequest {
                        message_id: (*id).to_owned(),
                        reason: "misaddressed, purged by the settle test".to_owned(),
                        sender: NL.to_owned(),
                    })
                    .await?;
            }
        }
    }
    let nl = h.exchange(NL)?;
    for id in ids {
        wait_broker_state(&nl, id, ending.state()).await?;
    }
    Ok(())
}

/// The checks every test makes of the log: lines were captured, none at ERROR, no
/// contradiction said, and the entry `id` was settled from the broker's status.
fn check_log(logs: &LogCapture, id: &str) -> TestResult {
    let text = logs.text();
    ensure!(text.contains("message accepted"), "logs too thin to check");
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    ensure!(errors.is_empty(), "lines at ERROR: {errors:#?}");
    let contradictions: Vec<&str> = text.lines().filter(|l| l.contains("contradicts")).collect();
    ensure!(
        contradictions.is_empty(),
        "contradictions: {contradictions:#?}"
    );
    ensure!(
        text.lines()
            .any(|l| l.contains(SETTLED_LINE) && l.contains(id)),
        "no '{SETTLED_LINE}' line for {id}"
    );
    Ok(())
}

/// Two messages to BE-PAYOKE, finished on the broker as `ending` says while NL-NRM's
/// node is down; the report of one waits for the node, the other's is purged. The node, started with its check practically off,
/// takes the first report; restarted with a check every second it settles the second
/// from the broker's status exactly as the first report settled its twin.
async fn settles_as_its_report_would(logs: &LogCapture, ending: Ending) -> TestResult {
    let mut h = Harness::new().await?;
    // (for an expiry, a broker clock the test moves: the expiry races nothing, such as
    // the stop of the sender's node; the other endings run on the system's clock)
    let clock = ManualClock::new(SystemTime::now());
    if let Ending::Expired = ending {
        h.set_broker_clock(clock.clone());
    }
    if let Ending::AttemptsExhausted = ending {
        h.broker_config_mut().lifecycle.max_attempts = 1;
    }
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let expires_at = SystemTime::now() + Duration::from_secs(60);
    let mut ids = Vec::new();
    for key in ["reported", "unreported"] {
        let request = pb::SendRequest {
            expires_at: Some(trmx_proto::time::to_timestamp(expires_at)),
            ..referral(key)
        };
        ids.push(send(&mut nl, request).await?.message_id);
    }
    let [reported, unreported] = [ids[0].as_str(), ids[1].as_str()];
    for id in [reported, unreported] {
        wait_outbox(&nl, id, "the broker to accept it", |e| {
            e.state == pb::OutboxState::Submitted as i32
        })
        .await?;
    }
    h.stop_node(NL).await?;

    finish(&mut h, ending, &clock, &[reported, unreported]).await?;
    purge_report(&h, unreported, ending.outcome()).await?;

    // The report settles its entry; the other waits (the default check interval, 10 min,
    // does not come within the test).
    let nl = h.start_node(NL).await?;
    let by_report = wait_outbox(&nl, reported, "its report", is_settled).await?;
    let waiting = outbox_entry(&mut nl.clone(), unreported)
        .await?
        .context("the unreported entry")?;
    ensure!(
        waiting.state == pb::OutboxState::Submitted as i32,
        "settled without its report or a check: {waiting:?}"
    );
    h.stop_node(NL).await?;

    let nl = h
        .start_node_with(NL, |c| c.broker.outbox_check_interval_secs = 1)
        .await?;
    let by_status = wait_outbox(
        &nl,
        unreported,
        "a settle from the broker's status",
        is_settled,
    )
    .await?;
    let (state, outcome) = ending.settled();
    for entry in [&by_report, &by_status] {
        assert_eq!(entry.state, state as i32, "{ending:?}: {entry:?}");
        assert_eq!(
            entry.failure.as_ref().map(|f| f.outcome.as_str()),
            outcome,
            "{ending:?}: {entry:?}"
        );
        assert!(entry.contradicted_by.is_empty(), "{ending:?}: {entry:?}");
        assert!(entry.outcome_at.is_some(), "{ending:?}: {entry:?}");
    }
    assert_eq!(by_status.failure, by_report.failure, "{ending:?}");
    if let Ending::Rejected = ending {
        let failure = by_status.failure.as_ref().context("a failure")?;
        assert_eq!(failure.reason_code, REASON_CODE, "{failure:?}");
        assert_eq!(failure.field_path, FIELD_PATH, "{failure:?}");
    }
    h.shutdown().await?;
    check_log(logs, unreported)
}

/// A delivery receipt that never reaches its sender (purged from its queue while its
/// node was down): the entry ends `DELIVERED`, as the receipt would have said.
#[test]
fn a_delivery_whose_receipt_never_comes_is_settled_delivered_from_the_status() -> TestResult {
    run_captured(async |logs| settles_as_its_report_would(logs, Ending::Delivered).await)
}

/// A rejection whose non-delivery report never comes: the entry ends `FAILED`
/// (`rejected-by-recipient`) with the recipient's reason code and field path.
#[test]
fn a_rejection_whose_report_never_comes_is_settled_with_its_reason_from_the_status() -> TestResult {
    run_captured(async |logs| settles_as_its_report_would(logs, Ending::Rejected).await)
}

/// An expiry whose report never comes: `FAILED` (`expired`).
#[test]
fn an_expiry_whose_report_never_comes_is_settled_from_the_status() -> TestResult {
    run_captured(async |logs| settles_as_its_report_would(logs, Ending::Expired).await)
}

/// An operator's purge whose report never comes: `FAILED` (`purged`).
#[test]
fn a_purge_whose_report_never_comes_is_settled_from_the_status() -> TestResult {
    run_captured(async |logs| settles_as_its_report_would(logs, Ending::Purged).await)
}

/// Attempts exhausted (dead-lettered by the broker, not rejected) and the report never
/// comes: `FAILED` (`dead-lettered`), not a rejection by the recipient.
#[test]
fn exhausted_attempts_whose_report_never_comes_are_settled_from_the_status() -> TestResult {
    run_captured(async |logs| settles_as_its_report_would(logs, Ending::AttemptsExhausted).await)
}

/// A withdrawal that reached the broker but whose answer never reached the node (here:
/// made with the node's certificate while the node is down, as its own call would have
/// been): the broker holds the message `WITHDRAWN`, which gets no report, and the node
/// still shows it `SUBMITTED`. Its check withdraws it here too, as a withdrawal
/// answered would have (a twin withdrawn through the node's API shows that).
#[test]
fn a_withdrawal_whose_answer_was_lost_is_settled_withdrawn_from_the_status() -> TestResult {
    run_captured(withdrawal_whose_answer_was_lost)
}

async fn withdrawal_whose_answer_was_lost(logs: &LogCapture) -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let answered = send(&mut nl, referral("answered")).await?.message_id;
    let lost = send(&mut nl, referral("lost")).await?.message_id;
    for id in [&answered, &lost] {
        wait_outbox(&nl, id, "the broker to accept it", |e| {
            e.state == pb::OutboxState::Submitted as i32
        })
        .await?;
    }
    let answer = nl
        .withdraw(pb::WithdrawMessageRequest {
            message_id: answered.clone(),
        })
        .await?
        .into_inner();
    ensure!(!answer.broker_pending, "{answer:?}");
    let by_answer = outbox_entry(&mut nl, &answered)
        .await?
        .context("the withdrawn entry")?;
    h.stop_node(NL).await?;

    let mut nl_exchange = h.exchange(NL)?;
    nl_exchange
        .withdraw(pb::WithdrawRequest {
            message_id: lost.clone(),
        })
        .await?;
    wait_broker_state(&nl_exchange, &lost, pb::MessageState::Withdrawn).await?;

    let nl = h
        .start_node_with(NL, |c| c.broker.outbox_check_interval_secs = 1)
        .await?;
    let by_status =
        wait_outbox(&nl, &lost, "a settle from the broker's status", is_settled).await?;
    for entry in [&by_answer, &by_status] {
        assert_eq!(entry.state, pb::OutboxState::Failed as i32, "{entry:?}");
        assert!(entry.contradicted_by.is_empty(), "{entry:?}");
    }
    assert_eq!(by_status.failure, by_answer.failure);
    assert_eq!(
        by_status.failure.as_ref().map(|f| f.outcome.as_str()),
        Some("withdrawn")
    );
    h.shutdown().await?;

    let text = logs.text();
    ensure!(text.contains("message accepted"), "logs too thin to check");
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    ensure!(errors.is_empty(), "lines at ERROR: {errors:#?}");
    if !text
        .lines()
        .any(|l| l.contains("holds this submitted message as withdrawn") && l.contains(&lost))
    {
        bail!("no line of the withdrawal found on the broker for {lost}");
    }
    Ok(())
}

/// The broker's metadata of the report of `outcome` about NL-NRM's message `id`.
async fn report_state(h: &Harness, id: &str, outcome: pb::Outcome) -> anyhow::Result<i32> {
    let report = MessageId::receipt_for(MessageId::parse(id)?, outcome);
    let found = h
        .operator("settle-probe")?
        .search_messages(pb::SearchMessagesRequest {
            message_id: report.to_string(),
            recipient: NL.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    match found.messages.as_slice() {
        [report] => Ok(report.state),
        other => bail!("{} reports of {id}: {other:?}", other.len()),
    }
}

/// The report is late, not lost: a stream of NL-NRM's left over from before (a
/// connection of the node's last run that the broker has not yet seen die) holds it in
/// flight while the restarted node settles the entry from the broker's status. When
/// that stream ends, the report reaches the node, which takes it for what it already
/// shows: acknowledged, the entry unchanged, no contradiction said.
async fn a_late_report_finds_its_entry_settled(logs: &LogCapture, ending: Ending) -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let id = send(&mut nl, referral("late")).await?.message_id;
    wait_outbox(&nl, &id, "the broker to accept it", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    h.stop_node(NL).await?;
    finish(&mut h, ending, &ManualClock::new(SystemTime::now()), &[&id]).await?;

    // the stream left over takes the report, and never answers
    let mut stale = h.exchange(NL)?;
    let mut held = stale
        .receive(pb::ReceiveRequest { max_in_flight: 8 })
        .await?
        .into_inner();
    let report = next_item(&mut held)
        .await?
        .envelope
        .context("the report's envelope")?;
    let report_id = MessageId::receipt_for(MessageId::parse(&id)?, ending.outcome());
    ensure!(report.message_id == report_id.to_string(), "{report:?}");

    let nl = h
        .start_node_with(NL, |c| c.broker.outbox_check_interval_secs = 1)
        .await?;
    let settled = wait_outbox(&nl, &id, "a settle from the broker's status", is_settled).await?;
    let (state, outcome) = ending.settled();
    assert_eq!(settled.state, state as i32, "{settled:?}");
    assert_eq!(
        settled.failure.as_ref().map(|f| f.outcome.as_str()),
        outcome,
        "{settled:?}"
    );
    if let Ending::Rejected = ending {
        let failure = settled.failure.as_ref().context("a failure")?;
        assert_eq!(failure.reason_code, REASON_CODE, "{failure:?}");
        assert_eq!(failure.field_path, FIELD_PATH, "{failure:?}");
    }

    drop(held);
    wait_until(WAIT, "the node to acknowledge the late report", || {
        let h = &h;
        let id = &id;
        async move {
            let state = report_state(h, id, ending.outcome()).await?;
            Ok((state == pb::MessageState::Acknowledged as i32).then_some(()))
        }
    })
    .await?;
    let after = outbox_entry(&mut nl.clone(), &id)
        .await?
        .context("the entry")?;
    assert_eq!(after, settled, "the late report changed the entry");
    h.shutdown().await?;
    check_log(logs, &id)
}

/// A delivery receipt that comes after the entry was settled `DELIVERED` from the
/// broker's status.
#[test]
fn a_receipt_that_comes_after_a_settle_from_the_status_changes_nothing() -> TestResult {
    run_captured(async |logs| a_late_report_finds_its_entry_settled(logs, Ending::Delivered).await)
}

/// A rejection's report that comes after the entry was settled from the broker's status
/// (with the reason code and field path that the report carries too).
#[test]
fn a_rejection_report_that_comes_after_a_settle_from_the_status_changes_nothing() -> TestResult {
    run_captured(async |logs| a_late_report_finds_its_entry_settled(logs, Ending::Rejected).await)
}

/// The sender's node keeps running: its connection to the broker is down (a network
/// outage) while the recipient acknowledges the message and an operator purges the
/// receipt. Once the network is back the running node's check, through the
/// connection it made again, settles the entry `DELIVERED`.
#[test]
fn a_running_node_settles_from_the_status_after_an_outage_that_lost_the_receipt() -> TestResult {
    run_captured(a_running_node_settles_after_an_outage)
}

async fn a_running_node_settles_after_an_outage(logs: &LogCapture) -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let proxy = FaultProxy::start(h.broker_addr()).await?;
    let via = proxy.addr().to_string();
    let mut nl = h
        .start_node_with(NL, |c| {
            c.broker.address = via;
            c.broker.outbox_check_interval_secs = 1;
        })
        .await?;
    let id = send(&mut nl, referral("outage")).await?.message_id;
    wait_outbox(&nl, &id, "the broker to accept it", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    proxy.set(Fault::Down);
    let clock = ManualClock::new(SystemTime::now());
    finish(&mut h, Ending::Delivered, &clock, &[&id]).await?;
    purge_report(&h, &id, pb::Outcome::Delivered).await?;
    let waiting = outbox_entry(&mut nl, &id).await?.context("the entry")?;
    ensure!(
        waiting.state == pb::OutboxState::Submitted as i32,
        "settled during the outage: {waiting:?}"
    );

    proxy.set(Fault::None);
    let settled = wait_outbox(&nl, &id, "a settle from the broker's status", is_settled).await?;
    assert_eq!(
        settled.state,
        pb::OutboxState::Delivered as i32,
        "{settled:?}"
    );
    assert!(settled.failure.is_none(), "{settled:?}");
    assert!(settled.contradicted_by.is_empty(), "{settled:?}");
    h.shutdown().await?;
    check_log(logs, &id)
}

/// The recipient answers the referral while the sender's node is down, and the delivery
/// receipt is purged: the restarted node takes the answer, and its check settles the
/// entry `DELIVERED`, still answered.
#[test]
fn an_answered_message_whose_receipt_never_comes_is_settled_delivered_and_stays_answered()
-> TestResult {
    run_captured(an_answered_message_whose_receipt_never_comes)
}

async fn an_answered_message_whose_receipt_never_comes(logs: &LogCapture) -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl = h.start_node(NL).await?;
    let sent = send(&mut nl, referral("answered")).await?;
    let id = sent.message_id.clone();
    wait_outbox(&nl, &id, "the broker to accept it", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    h.stop_node(NL).await?;
    let mut be = h.start_node(BE).await?;
    let received = wait_received(&be, &id).await?;
    let answer = send(
        &mut be,
        reply_request(
            "answer",
            NL,
            Kind::ReferralResponse,
            EXAMPLES[1],
            &received.case_ref,
            &id,
        ),
    )
    .await?
    .message_id;
    let nl_exchange = h.exchange(NL)?;
    wait_broker_state(&nl_exchange, &id, pb::MessageState::Acknowledged).await?;
    purge_report(&h, &id, pb::Outcome::Delivered).await?;

    let nl = h
        .start_node_with(NL, |c| c.broker.outbox_check_interval_secs = 1)
        .await?;
    wait_received(&nl, &answer).await?;
    let settled = wait_outbox(&nl, &id, "a settle from the broker's status", is_settled).await?;
    assert_eq!(
        settled.state,
        pb::OutboxState::Delivered as i32,
        "{settled:?}"
    );
    assert_eq!(settled.answered_by, answer, "{settled:?}");
    assert!(settled.failure.is_none(), "{settled:?}");
    assert!(settled.contradicted_by.is_empty(), "{settled:?}");
    h.shutdown().await?;
    check_log(logs, &id)
}

/// A message expires on the broker and its sender's node takes the report (`FAILED`,
/// `expired`); an operator redrives it and the recipient's node acknowledges it, and the
/// delivery receipt is purged from the sender's queue while the sender's node is down.
/// The entry stayed `FAILED` for good, the check asking about `SUBMITTED` entries only:
/// the restarted node's check asks about it too and settles it `DELIVERED`.
#[test]
fn a_redriven_message_whose_receipt_never_comes_is_settled_delivered_from_the_status() -> TestResult
{
    run_captured(a_redriven_message_whose_receipt_never_comes)
}

async fn a_redriven_message_whose_receipt_never_comes(logs: &LogCapture) -> TestResult {
    let mut h = Harness::new().await?;
    // (the broker's clock ends the message's lifetime when the test says)
    let clock = ManualClock::new(SystemTime::now());
    h.set_broker_clock(clock.clone());
    h.start_broker().await?;
    // (the default check interval, 10 min, does not come within the test)
    let mut nl = h.start_node(NL).await?;
    let request = pb::SendRequest {
        expires_at: Some(trmx_proto::time::to_timestamp(
            SystemTime::now() + Duration::from_secs(60),
        )),
        ..referral("redriven")
    };
    let id = send(&mut nl, request).await?.message_id;
    wait_outbox(&nl, &id, "the broker to accept it", |e| {
        e.state == pb::OutboxState::Submitted as i32
    })
    .await?;
    finish(&mut h, Ending::Expired, &clock, &[&id]).await?;
    let failed = wait_outbox(&nl, &id, "its expiry's report", |e| {
        e.state == pb::OutboxState::Failed as i32
    })
    .await?;
    assert_eq!(
        failed.failure.as_ref().map(|f| f.outcome.as_str()),
        Some("expired"),
        "{failed:?}"
    );
    h.stop_node(NL).await?;

    h.operator("settle-redriver")?
        .redrive(pb::RedriveRequest {
            message_id: id.clone(),
            sender: NL.to_owned(),
        })
        .await
        .context("redriving the expired message")?;
    let be = h.start_node(BE).await?;
    wait_received(&be, &id).await?;
    wait_broker_state(&h.exchange(NL)?, &id, pb::MessageState::Acknowledged).await?;
    purge_report(&h, &id, pb::Outcome::Delivered).await?;

    let nl = h
        .start_node_with(NL, |c| c.broker.outbox_check_interval_secs = 1)
        .await?;
    let settled = wait_outbox(&nl, &id, "a settle from the broker's status", |e| {
        e.state == pb::OutboxState::Delivered as i32
    })
    .await?;
    assert!(settled.failure.is_none(), "{settled:?}");
    assert!(settled.contradicted_by.is_empty(), "{settled:?}");
    h.shutdown().await?;
    check_log(logs, &id)
}
