//! Probes of the promise that no personal data leaves its organisation through an error:
//! what a recipient's node says about a body it refuses travels to others (the `Reject`
//! becomes the sender's `NON_DELIVERY_REPORT`, the sender's `GetStatus`, the operator's
//! dead-letter record) and into the recipient's log. Markers (`piimark…`, lower case so
//! that no snake-casing of a key hides them) are put where a sender's software could
//! put a value, and must come back nowhere.
//!
//! Each test runs on one thread (`#[tokio::test]`), so that every task of the in-process
//! broker and node logs into its [`LogCapture`].

use std::sync::{Arc, Mutex};

use anyhow::Context;
use trmx_proto::body::Body;
use trmx_proto::pb::operator_client::OperatorClient;
use trmx_proto::{Kind, pb};
use trmx_tests::harness::{Exchange, Harness, broker_status, envelope, inbox, next_item};
use trmx_tests::story::EXAMPLES;
use trmx_transport::{ClientOptions, TlsPaths, client_channel};

const BE: &str = "BE-PAYOKE";
const NG: &str = "NG-NAPTIP";
/// What every marker starts with.
const MARK: &str = "piimark";

/// Every log line of this thread at `trace`, while it lives.
struct LogCapture {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn start() -> LogCapture {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&lines);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .finish();
        LogCapture {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().expect("log lock")).into_owned()
    }
}

/// An `Operator` client with a fresh operator certificate of the harness's federation.
fn operator(h: &Harness) -> anyhow::Result<OperatorClient<tonic::transport::Channel>> {
    let cert = h.federation.pki.operator("leak-probe")?;
    let tls = TlsPaths {
        ca: h.federation.pki.ca_cert_path(),
        cert: cert.cert,
        key: cert.key,
    };
    let options = ClientOptions {
        server_name: "localhost".to_owned(),
        ..ClientOptions::default()
    };
    let channel = client_channel(&h.broker_addr().to_string(), &tls, &options)?;
    Ok(OperatorClient::new(channel))
}

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
    let mut ops = operator(&h)?;

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
