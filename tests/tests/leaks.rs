//! Probes of the promise that no personal data leaves its organisation through an error:
//! what a recipient's node says about a body it refuses travels to others (the `Reject`
//! becomes the sender's `NON_DELIVERY_REPORT`, the sender's `GetStatus`, the operator's
//! dead-letter record) and into the recipient's log. Markers (`piimark…`, lower case so
//! that no snake-casing of a key hides them) are put where a sender's software could
//! put a value, and must come back nowhere.
//!
//! Each test runs on one thread (`#[tokio::test]`), so that every task of the in-process
//! broker and node logs into its [`LogCapture`]. A test binary of its own: beside the
//! nodes of the other end-to-end tests in one process, the capture missed the node's
//! lines (every time, with a test rejecting deliveries at the same moment).

// Test code: a broken fixture should fail the test loudly, wherever it is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Context;
use trmx_proto::body::Body;
use trmx_proto::{Kind, pb};
use trmx_tests::harness::{Exchange, Harness, broker_status, envelope, inbox, next_item};
use trmx_tests::logs::LogCapture;
use trmx_tests::story::EXAMPLES;

const BE: &str = "BE-PAYOKE";
const NG: &str = "NG-NAPTIP";
/// What every marker starts with.
const MARK: &str = "piimark";

/// The example referral as proto3 JSON with `key: 1` added to the object at `pointer`.
fn referral_with_key(pointer: &str, key: &str) -> String {
    let mut body: serde_json::Value = serde_json::from_str(EXAMPLES[0]).expect("example");
    body.pointer_mut(pointer)
        .and_then(serde_json::Value::as_object_mut)
        .expect("an object at the pointer")
        .insert(key.to_owned(), 1.into());
    body.to_string()
}

/// Submits `json` as a JSON referral from `ng` to BE-PAYOKE, and returns the message id
/// and the non-delivery report that comes back (acknowledged).
async fn refused_by_be(
    ng: &mut Exchange,
    reports: &mut tonic::Streaming<pb::Delivery>,
    json: String,
) -> anyhow::Result<(String, pb::Receipt)> {
    let kind = Kind::Referral;
    let mut env = envelope(BE, kind, json.into_bytes());
    env.content_type = format!("application/json; proto={}", kind.body_message());
    let id = env.message_id.clone();
    ng.submit(pb::SubmitRequest {
        envelope: Some(env),
    })
    .await?;
    let delivery = next_item(reports)
        .await
        .context("the non-delivery report")?;
    let report = delivery.envelope.unwrap_or_default();
    ng.ack(pb::AckRequest {
        message_ids: vec![report.message_id.clone()],
    })
    .await?;
    anyhow::ensure!(
        report.kind == pb::MessageKind::NonDeliveryReport as i32,
        "{report:?}"
    );
    let Body::Receipt(receipt) = Body::decode(Kind::NonDeliveryReport, &report.payload)? else {
        anyhow::bail!("a report carries a receipt");
    };
    anyhow::ensure!(receipt.message_id == id, "{receipt:?}");
    Ok((id, receipt))
}

/// A JSON body whose keys no schema knows (a sender's software that wrote a value where a
/// key goes: `"bello": true`) is refused by the recipient's node; the field path of its
/// refusal ends at the object that holds the key and never repeats it: not in the
/// sender's report or status, not in the operator's dead letters or search, not in the
/// recipient's log. (The unknown key was named in the path while it looked like a field
/// name, so it crossed to the sender, the broker's operator and the recipient's log.)
#[tokio::test]
async fn an_unknown_json_key_is_named_nowhere_beyond_its_refusal() -> anyhow::Result<()> {
    let logs = LogCapture::start();
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut be_api = h.start_node(BE).await?;
    let mut ng = h.exchange(NG)?;
    let mut reports = ng
        .receive(pb::ReceiveRequest { max_in_flight: 8 })
        .await?
        .into_inner();
    let mut ops = h.operator("leak-probe")?;

    let cases = [
        ("", "piimarkroot", "referral"),
        ("/person", "piimarkamina", "referral.person"),
        ("/person", "piimark_bello_1990", "referral.person"),
        ("/notes", "piimarknotes", "referral.notes"),
    ];
    let mut refused = Vec::new();
    for (pointer, key, path) in cases {
        let json = referral_with_key(pointer, key);
        let (id, receipt) = refused_by_be(&mut ng, &mut reports, json).await?;
        assert_eq!(
            receipt.outcome,
            pb::Outcome::RejectedByRecipient as i32,
            "{key}: {receipt:?}"
        );
        assert_eq!(receipt.reason_code, "INVALID_BODY", "{key}: {receipt:?}");
        assert_eq!(receipt.field_path, path, "{key}: {receipt:?}");
        let status = broker_status(&mut ng, &id).await?;
        assert!(!format!("{status:?}").contains(MARK), "{key}: {status:?}");
        refused.push(id);
    }

    // The operator sees the dead letters, with their reason, never a key.
    let dead = ops
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await?
        .into_inner();
    let shown = format!("{dead:?}");
    for id in &refused {
        assert!(shown.contains(id.as_str()), "{id} among the dead letters");
    }
    assert!(!shown.contains(MARK), "{shown}");
    for id in &refused {
        let found = ops
            .search_messages(pb::SearchMessagesRequest {
                message_id: id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(!format!("{found:?}").contains(MARK), "{found:?}");
    }
    // The recipient stored none of them.
    assert!(inbox(&mut be_api).await?.is_empty());
    h.shutdown().await?;

    let text = logs.text();
    assert!(
        text.contains("rejecting delivery") && text.contains("message rejected by recipient"),
        "logs too thin to check"
    );
    let leaked: Vec<&str> = text.lines().filter(|l| l.contains(MARK)).collect();
    assert!(leaked.is_empty(), "unknown keys in the log: {leaked:#?}");
    Ok(())
}

/// Values that break a rule of the body, each holding a marker, delivered to a node as
/// proto3 JSON and as protobuf: the recipient refuses each with the field path and the
/// rule, and the marker reaches neither its sender (report, status), nor the broker's
/// operator (dead letters, search), nor any log line at trace. (A guard: this passed
/// when written; it covers the path of a delivered body, which `bad_input` only checks
/// for its reason code.)
#[tokio::test]
async fn a_refused_body_value_is_named_nowhere_beyond_its_refusal() -> anyhow::Result<()> {
    use serde_json::json;
    let logs = LogCapture::start();
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut be_api = h.start_node(BE).await?;
    let mut ng = h.exchange(NG)?;
    let mut reports = ng
        .receive(pb::ReceiveRequest { max_in_flight: 8 })
        .await?
        .into_inner();
    let mut ops = h.operator("leak-probe")?;

    let long = format!("{MARK}{}", "x".repeat(20_000));
    let json_cases = [
        (
            "/person/familyName",
            json!(format!("{MARK}bello\u{7}")),
            "referral.person.family_name",
        ),
        (
            "/person/givenNames",
            json!(long),
            "referral.person.given_names",
        ),
        (
            "/person/dateOfBirth",
            json!(format!("{MARK}-01-01")),
            "referral.person.date_of_birth",
        ),
        (
            "/person/ageBand",
            json!(format!("{MARK}band")),
            "referral.person.age_band",
        ),
        (
            "/person/interpreterNeeded",
            json!(format!("{MARK}yes")),
            "referral.person.interpreter_needed",
        ),
        (
            "/person/nationalities/0",
            json!(format!("{MARK}")),
            "referral.person.nationalities[0]",
        ),
        (
            "/consent/givenAt",
            json!(format!("{MARK}o'clock")),
            "referral.consent.given_at",
        ),
        ("/notes/text", json!(long), "referral.notes.text"),
        (
            "/respondBy",
            json!(format!("{MARK}")),
            "referral.respond_by",
        ),
        (
            "/contact",
            json!(format!("{MARK}@example.org")),
            "referral.contact",
        ),
    ];
    let mut refused = Vec::new();
    for (pointer, value, path) in json_cases {
        let mut body: serde_json::Value = serde_json::from_str(EXAMPLES[0])?;
        let (parent, key) = pointer.rsplit_once('/').context(pointer)?;
        match body.pointer_mut(parent).context(pointer)? {
            serde_json::Value::Object(object) => {
                object.insert(key.to_owned(), value);
            }
            serde_json::Value::Array(items) => {
                *items.get_mut(key.parse::<usize>()?).context(pointer)? = value
            }
            other => anyhow::bail!("{pointer}: {other:?}"),
        }
        let (id, receipt) = refused_by_be(&mut ng, &mut reports, body.to_string()).await?;
        assert_eq!(
            receipt.outcome,
            pb::Outcome::RejectedByRecipient as i32,
            "{pointer}: {receipt:?}"
        );
        assert_eq!(receipt.field_path, path, "{pointer}: {receipt:?}");
        assert!(!format!("{receipt:?}").contains(MARK), "{receipt:?}");
        let status = broker_status(&mut ng, &id).await?;
        assert!(
            !format!("{status:?}").contains(MARK),
            "{pointer}: {status:?}"
        );
        refused.push(id);
    }
    // The same rules broken in a protobuf body.
    let Body::Referral(valid) = Body::from_json(Kind::Referral, EXAMPLES[0])? else {
        anyhow::bail!("the example is a referral");
    };
    let mut bad_name = valid.clone();
    bad_name.person.as_mut().context("person")?.family_name = format!("{MARK}\u{1b}");
    let mut bad_notes = valid.clone();
    bad_notes.notes.as_mut().context("notes")?.text = long.clone();
    let mut bad_pseudonym = valid;
    bad_pseudonym.person.as_mut().context("person")?.pseudonym = long.clone();
    for (referral, path) in [
        (bad_name, "referral.person.family_name"),
        (bad_notes, "referral.notes.text"),
        (bad_pseudonym, "referral.person.pseudonym"),
    ] {
        let payload = Body::Referral(referral).encode();
        let mut env = envelope(BE, Kind::Referral, payload);
        let id = env.message_id.clone();
        ng.submit(pb::SubmitRequest {
            envelope: Some(std::mem::take(&mut env)),
        })
        .await?;
        let report = next_item(&mut reports).await?.envelope.unwrap_or_default();
        ng.ack(pb::AckRequest {
            message_ids: vec![report.message_id.clone()],
        })
        .await?;
        let Body::Receipt(receipt) = Body::decode(Kind::NonDeliveryReport, &report.payload)? else {
            anyhow::bail!("a report carries a receipt");
        };
        assert_eq!(receipt.message_id, id);
        assert_eq!(receipt.field_path, path, "{receipt:?}");
        refused.push(id);
    }

    let dead = format!(
        "{:?}",
        ops.list_dead_letters(pb::ListDeadLettersRequest::default())
            .await?
            .into_inner()
    );
    for id in &refused {
        assert!(dead.contains(id.as_str()), "{id} among the dead letters");
        let found = ops
            .search_messages(pb::SearchMessagesRequest {
                message_id: id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(!format!("{found:?}").contains(MARK), "{found:?}");
    }
    assert!(!dead.contains(MARK), "{dead}");
    assert!(inbox(&mut be_api).await?.is_empty());
    h.shutdown().await?;

    let text = logs.text();
    assert!(
        text.contains("rejecting delivery"),
        "logs too thin to check"
    );
    let leaked: Vec<&str> = text.lines().filter(|l| l.contains(MARK)).collect();
    assert!(leaked.is_empty(), "body values in the log: {leaked:#?}");
    Ok(())
}

/// Markers in every id-like or free-text field a participant or an operator can send
/// outside a body: the envelope's ids, case reference, content type and sender, the ids
/// of `Ack`, `Reject`, `Withdraw` and `GetStatus`, a `Reject`'s reason code, an
/// operator's search filter and purge reason, and the fields of a local API `Send`.
/// Each refusal, and a purge, is answered; no log line of the broker or of the node at
/// trace holds a marker, and the purge reason does not reach the sender's report. (A
/// guard: this passed when written.)
#[tokio::test]
async fn markers_outside_a_body_reach_no_log_and_no_other_party() -> anyhow::Result<()> {
    let logs = LogCapture::start();
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    h.start_node(BE).await?;
    let mut ng = h.exchange(NG)?;
    let mut reports = ng
        .receive(pb::ReceiveRequest { max_in_flight: 8 })
        .await?
        .into_inner();
    let mut ops = h.operator("leak-probe")?;
    let payload = Body::from_json(Kind::Referral, EXAMPLES[0])?.encode();
    let valid = || envelope(BE, Kind::Referral, payload.clone());
    let marked = |suffix: &str| format!("{MARK}-{suffix}-amina-bello");

    // Submits refused for a marked field.
    let mut broken = Vec::new();
    for field in [
        "message_id",
        "recipient",
        "case_ref",
        "in_reply_to",
        "sender",
    ] {
        let mut env = valid();
        let value = marked(field);
        match field {
            "message_id" => env.message_id = value,
            "recipient" => env.recipient = value,
            "case_ref" => env.case_ref = value,
            "in_reply_to" => env.in_reply_to = value,
            _ => env.sender = value,
        }
        broken.push((field, env));
    }
    let mut env = valid();
    env.content_type = marked("content-type");
    broken.push(("content_type", env));
    let mut env = valid();
    env.content_type = format!("{}; x={}", Kind::Referral.content_type(), "y".repeat(300));
    broken.push(("content_type (long)", env));
    for (field, env) in broken {
        let status = ng
            .submit(pb::SubmitRequest {
                envelope: Some(env),
            })
            .await
            .expect_err(field);
        assert!(
            matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
            ),
            "{field}: {status:?}"
        );
        assert!(!status.message().contains(MARK), "{field}: {status:?}");
    }
    // Requests naming a marked message id.
    let id = marked("id");
    // (an ack answers per id, each as the caller wrote it: its own input, to itself)
    ng.ack(pb::AckRequest {
        message_ids: vec![id.clone()],
    })
    .await?;
    let rejected = ng
        .reject(pb::RejectRequest {
            message_id: id.clone(),
            reason_code: marked("code"),
            field_path: marked("path"),
        })
        .await
        .expect_err("refused");
    assert!(!rejected.message().contains(MARK), "{rejected:?}");
    let withdrawn = ng
        .withdraw(pb::WithdrawRequest {
            message_id: id.clone(),
        })
        .await
        .expect_err("refused");
    assert!(!withdrawn.message().contains(MARK), "{withdrawn:?}");
    let status = ng
        .get_status(pb::GetStatusRequest {
            message_id: id.clone(),
        })
        .await
        .expect_err("refused");
    assert!(!status.message().contains(MARK), "{status:?}");

    // The operator: a search by a marked case reference, a purge with a marked reason.
    let search = ops
        .search_messages(pb::SearchMessagesRequest {
            case_ref: marked("case"),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert!(!search.message().contains(MARK), "{search:?}");
    h.stop_node(BE).await?;
    let queued = valid();
    let queued_id = queued.message_id.clone();
    ng.submit(pb::SubmitRequest {
        envelope: Some(queued),
    })
    .await?;
    ops.purge(pb::PurgeRequest {
        message_id: queued_id.clone(),
        reason: format!("misaddressed, {MARK} says so"),
        sender: String::new(),
    })
    .await?;
    let report = next_item(&mut reports).await?.envelope.unwrap_or_default();
    ng.ack(pb::AckRequest {
        message_ids: vec![report.message_id.clone()],
    })
    .await?;
    let Body::Receipt(receipt) = Body::decode(Kind::NonDeliveryReport, &report.payload)? else {
        anyhow::bail!("a report carries a receipt");
    };
    assert_eq!(receipt.message_id, queued_id);
    assert!(
        !format!("{report:?}{receipt:?}").contains(MARK),
        "{receipt:?}"
    );
    let status = broker_status(&mut ng, &queued_id).await?;
    assert!(!format!("{status:?}").contains(MARK), "{status:?}");

    // The local API: marked ids of a Send.
    let mut be_api = h.start_node(BE).await?;
    for (field, request) in [
        (
            "recipient",
            pb::SendRequest {
                recipient: marked("to"),
                ..trmx_tests::harness::json_request("k", "NL-NRM", Kind::Referral, EXAMPLES[0])
            },
        ),
        (
            "case_ref",
            pb::SendRequest {
                case_ref: marked("case"),
                new_case: false,
                ..trmx_tests::harness::json_request("k", "NL-NRM", Kind::Referral, EXAMPLES[0])
            },
        ),
        (
            "in_reply_to",
            pb::SendRequest {
                in_reply_to: marked("reply"),
                ..trmx_tests::harness::json_request(
                    "k",
                    "NL-NRM",
                    Kind::ReferralResponse,
                    EXAMPLES[1],
                )
            },
        ),
    ] {
        let status = be_api.send(request).await.expect_err(field);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
    }
    let key = marked("key");
    let sent = be_api
        .send(trmx_tests::harness::json_request(
            &key,
            "NL-NRM",
            Kind::Referral,
            EXAMPLES[0],
        ))
        .await?
        .into_inner();
    assert!(!sent.message_id.is_empty());
    h.shutdown().await?;

    let text = logs.text();
    assert!(
        text.contains("request refused") && text.contains("message purged"),
        "logs too thin to check"
    );
    let leaked: Vec<&str> = text.lines().filter(|l| l.contains(MARK)).collect();
    assert!(leaked.is_empty(), "markers in the log: {leaked:#?}");
    Ok(())
}
