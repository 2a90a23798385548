//! The participant registry reloaded (SIGHUP): an organisation added is served without
//! a restart; one removed is refused, its open stream ended, what it was sent kept.

use tonic::Code;
use trmx_broker::config::{OrganisationType, ParticipantConfig};

use crate::harness::*;

fn kok() -> ParticipantConfig {
    ParticipantConfig {
        id: "DE-KOK".into(),
        display_name: "KOK".into(),
        country: "DE".into(),
        organisation_type: OrganisationType::Ngo,
        accepts: vec!["referral".into()],
    }
}

/// `t`'s participants but `id`.
fn without(t: &TestBroker, id: &str) -> Vec<ParticipantConfig> {
    t.config
        .participants
        .iter()
        .filter(|p| p.id != id)
        .cloned()
        .collect()
}

/// A participant added to the registry by a reload is served at once: its node was
/// refused until then, and so were the messages sent to it.
#[tokio::test]
async fn a_participant_added_by_a_reload_is_served_without_a_restart() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut kok_client = t.client("DE-KOK")?;
    let refused = kok_client
        .get_info(trmx_proto::pb::GetInfoRequest {})
        .await
        .expect_err("a participant not in the registry was served");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    let unknown = submit(&mut nl, referral("DE-KOK"))
        .await
        .expect_err("a message to a participant not in the registry was taken");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");

    let mut participants = t.config.participants.clone();
    participants.push(kok());
    let change = t.broker.reload_registry(&participants)?;
    assert_eq!(change.added, [trmx_proto::ParticipantId::parse("DE-KOK")?]);
    assert!(
        change.removed.is_empty() && change.changed.is_empty(),
        "{change:?}"
    );

    let info = nl
        .get_info(trmx_proto::pb::GetInfoRequest {})
        .await?
        .into_inner();
    assert!(
        info.participants.iter().any(|p| p.id == "DE-KOK"),
        "{info:?}"
    );
    let sent = referral("DE-KOK");
    let id = sent.message_id.clone();
    submit(&mut nl, sent).await?;
    let mut stream = receive(&mut kok_client, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    // (and the kinds it accepts are the new entry's)
    let refused = submit(
        &mut nl,
        envelope("DE-KOK", trmx_proto::Kind::FollowUp, b"x"),
    )
    .await
    .expect_err("a kind DE-KOK does not accept was taken");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    let text = t.broker.metrics().render();
    assert!(
        text.contains("trmx_participant_connected_streams{participant=\"DE-KOK\"} 1"),
        "{text}"
    );
    Ok(())
}

/// A participant removed by a reload is refused from its next request, and its open
/// `Receive` stream is ended with the reason; the message in flight to it is due again
/// (kept, to expire with its report unless it comes back), others are unaffected, and its
/// gauges of contact go (its "not seen" alert would fire for good).
#[tokio::test]
async fn a_participant_removed_by_a_reload_is_refused_and_its_stream_ended() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    let sent = referral("BE-PAYOKE");
    let id = sent.message_id.clone();
    submit(&mut nl, sent).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);

    let change = t.broker.reload_registry(&without(&t, "BE-PAYOKE"))?;
    assert_eq!(
        change.removed,
        [trmx_proto::ParticipantId::parse("BE-PAYOKE")?]
    );

    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Err(status)) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status}");
            assert!(
                status
                    .message()
                    .contains("BE-PAYOKE is not in this broker's registry"),
                "{status}"
            );
        }
        other => anyhow::bail!("the removed participant's stream: {other:?}"),
    }
    let refused = be
        .get_info(trmx_proto::pb::GetInfoRequest {})
        .await
        .expect_err("a removed participant was served");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    let refused = receive(&mut be, 0).await.expect_err("a stream was opened");
    assert!(
        refused
            .to_string()
            .contains("not in this broker's registry"),
        "{refused}"
    );
    let unknown = submit(&mut nl, referral("BE-PAYOKE"))
        .await
        .expect_err("a message to a removed participant was taken");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");
    // what was in flight to it is kept, due again (its lease is released after the
    // stream's end is sent)
    wait_state(&mut nl, &id, trmx_proto::pb::MessageState::Accepted).await?;
    // others go on
    nl.get_info(trmx_proto::pb::GetInfoRequest {}).await?;
    let text = t.broker.metrics().render();
    assert!(
        !text.contains("trmx_participant_connected_streams{participant=\"BE-PAYOKE\"}")
            && !text.contains(
                "trmx_participant_last_seen_timestamp_seconds{participant=\"BE-PAYOKE\"}"
            ),
        "{text}"
    );
    assert!(
        text.contains("trmx_participant_connected_streams{participant=\"NL-NRM\"}"),
        "{text}"
    );

    // back again: served, and what waited for it delivered
    t.broker.reload_registry(&t.config.participants)?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    Ok(())
}

/// A participant removed and added back by two reloads before its stream saw the first
/// has that stream ended (the removal's close was sent), but told why and to open it
/// again, not that the broker is shutting down: it runs on, and the node's log and status
/// would say otherwise. Its next stream is served.
#[tokio::test]
async fn a_participant_removed_and_added_back_at_once_is_not_told_the_broker_shuts_down()
-> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    // (no await between the two: the stream's task does not run in between)
    t.broker.reload_registry(&without(&t, "BE-PAYOKE"))?;
    t.broker.reload_registry(&t.config.participants)?;
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Err(status)) => {
            assert_eq!(status.code(), Code::Unavailable, "{status}");
            assert!(
                !status.message().contains("shutting down")
                    && status.message().contains("open the stream again"),
                "{status}"
            );
        }
        other => anyhow::bail!("the stream of a participant removed and added back: {other:?}"),
    }
    let mut nl = t.client("NL-NRM")?;
    let sent = referral("BE-PAYOKE");
    let id = sent.message_id.clone();
    submit(&mut nl, sent).await?;
    let mut stream = receive(&mut be, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    Ok(())
}

/// A participant whose accepted kinds a reload narrows is still delivered what was
/// accepted for it before (README §3): the kinds are checked when a message is accepted;
/// a new message of the kind is refused.
#[tokio::test]
async fn a_reload_narrowing_the_kinds_delivers_what_was_queued_and_refuses_new_ones()
-> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let queued = referral("BE-PAYOKE");
    let id = queued.message_id.clone();
    submit(&mut nl, queued).await?;
    let mut narrowed = t.config.participants.clone();
    for p in &mut narrowed {
        if p.id == "BE-PAYOKE" {
            p.accepts.retain(|kind| kind != "referral");
        }
    }
    let change = t.broker.reload_registry(&narrowed)?;
    assert_eq!(
        change.changed,
        [trmx_proto::ParticipantId::parse("BE-PAYOKE")?]
    );
    let refused = submit(&mut nl, referral("BE-PAYOKE"))
        .await
        .expect_err("a kind no longer accepted was taken");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 0).await?;
    assert_eq!(id_of(&next(&mut stream).await?), id);
    Ok(())
}
