//! The local API over its Unix socket, against a node whose broker is down.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use trmx_node::api::status::{invalid_field, to_status};
use trmx_node::connect_local;
use trmx_node::core::NodeError;
use trmx_proto::pb::node_api_client::NodeApiClient;
use trmx_proto::{MessageId, ValidationError, pb};

use super::harness::{LogCapture, REFERRAL_JSON, Sandbox, referral_without};

fn referral_request(key: &str, body_json: &str) -> pb::SendRequest {
    pb::SendRequest {
        kind: pb::MessageKind::Referral as i32,
        recipient: "BE-PAYOKE".to_owned(),
        new_case: true,
        priority: pb::Priority::Urgent as i32,
        idempotency_key: key.to_owned(),
        body: Some(pb::send_request::Body::BodyJson(body_json.to_owned())),
        ..Default::default()
    }
}

#[test]
fn every_node_error_maps_to_its_code_and_keeps_its_message() {
    let id = MessageId::new_v7();
    let cases = [
        (
            NodeError::Invalid(ValidationError::new(
                "referral.person.pseudonym",
                "is required",
            )),
            Code::InvalidArgument,
        ),
        (
            NodeError::IdempotencyConflict { key: "k1".into() },
            Code::AlreadyExists,
        ),
        (NodeError::NotFound(id), Code::NotFound),
        (
            NodeError::FailedPrecondition("already delivered".into()),
            Code::FailedPrecondition,
        ),
        (
            NodeError::BrokerUnavailable("connection refused".into()),
            Code::Unavailable,
        ),
        (NodeError::Store("flush failed".into()), Code::Unavailable),
        (NodeError::ShuttingDown, Code::Unavailable),
        (
            NodeError::LimitReached {
                what: "too many Watch streams open",
                key: "api.max_watch_streams",
                limit: 64,
            },
            Code::ResourceExhausted,
        ),
        (NodeError::Config("bad".into()), Code::Internal),
    ];
    for (error, code) in cases {
        let message = error.to_string();
        let status = to_status(error);
        assert_eq!(status.code(), code, "{message}");
        assert_eq!(status.message(), message);
    }
    let status = to_status(NodeError::Invalid(ValidationError::new(
        "referral.person.pseudonym",
        "is required",
    )));
    assert_eq!(status.message(), "referral.person.pseudonym: is required");
    assert_eq!(invalid_field(&status), Some("referral.person.pseudonym"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_and_messages_survive_the_socket() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");

    let unknown = MessageId::new_v7();
    let status = client
        .get_message(pb::GetMessageRequest {
            message_id: unknown.to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown id");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), NodeError::NotFound(unknown).to_string());

    let status = client
        .get_message(pb::GetMessageRequest {
            message_id: "not-a-uuid".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("malformed id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("message_id: "),
        "{}",
        status.message()
    );
    assert_eq!(invalid_field(&status), Some("message_id"));

    let status = client
        .send(referral_request(
            "k-invalid",
            &referral_without(&["person", "pseudonym"]),
        ))
        .await
        .expect_err("invalid body");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(invalid_field(&status), Some("referral.person.pseudonym"));
    assert!(
        status.message().starts_with("referral.person.pseudonym: "),
        "{}",
        status.message()
    );

    let status = client
        .send(pb::SendRequest {
            new_case: false,
            ..referral_request("k-nocase", REFERRAL_JSON)
        })
        .await
        .expect_err("no case");
    assert_eq!(invalid_field(&status), Some("case_ref"));

    // Nothing was queued by the refused sends.
    let outbox = client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .expect("outbox")
        .into_inner();
    assert!(outbox.entries.is_empty());
    node.stop().await.expect("stop");
}

/// A reply belongs to the case of the message it answers: `new_case` with
/// `in_reply_to` is refused on `new_case`, not ignored; and without `case_ref` a reply
/// must answer a message this node received, whose case it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_opens_no_new_case() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let answered = MessageId::new_v7().to_string();

    let status = client
        .send(pb::SendRequest {
            in_reply_to: answered.clone(),
            ..referral_request("k-new", REFERRAL_JSON)
        })
        .await
        .expect_err("new_case with in_reply_to");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(invalid_field(&status), Some("new_case"), "{status:?}");

    let status = client
        .send(pb::SendRequest {
            new_case: false,
            in_reply_to: answered,
            ..referral_request("k-unknown", REFERRAL_JSON)
        })
        .await
        .expect_err("no case to take");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(invalid_field(&status), Some("case_ref"), "{status:?}");

    let outbox = client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .expect("outbox")
        .into_inner();
    assert!(outbox.entries.is_empty());
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_queues_locally_while_the_broker_is_down_and_is_idempotent() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");

    let first = client
        .send(referral_request("cms:referral:4711", REFERRAL_JSON))
        .await
        .expect("send")
        .into_inner();
    assert_eq!(first.state, pb::OutboxState::Queued as i32);
    MessageId::parse(&first.message_id).expect("message id");
    trmx_proto::CaseRef::parse(&first.case_ref).expect("minted case ref");

    // Same key, same content: the same message.
    let again = client
        .send(referral_request("cms:referral:4711", REFERRAL_JSON))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.case_ref, first.case_ref);

    // Same key, different content: refused.
    let other = REFERRAL_JSON.replace("NRM-2026-0117-A", "NRM-2026-0117-B");
    let status = client
        .send(referral_request("cms:referral:4711", &other))
        .await
        .expect_err("conflict");
    assert_eq!(status.code(), Code::AlreadyExists);

    let outbox = client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .expect("outbox")
        .into_inner()
        .entries;
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].recipient, "BE-PAYOKE");
    assert_eq!(outbox[0].priority, pb::Priority::Urgent as i32);

    let shown = client
        .get_message(pb::GetMessageRequest {
            message_id: first.message_id.clone(),
            ..Default::default()
        })
        .await
        .expect("show")
        .into_inner();
    assert_eq!(shown.direction, pb::MessageDirection::Sent as i32);
    assert!(!shown.body_erased);
    assert!(shown.body_json.contains("NRM-2026-0117-A"));
    match shown.body {
        Some(pb::get_message_response::Body::Referral(r)) => {
            assert_eq!(
                r.person.map(|p| p.pseudonym).as_deref(),
                Some("NRM-2026-0117-A")
            );
        }
        other => panic!("expected a typed referral, got {other:?}"),
    }

    let case = client
        .get_case(pb::GetCaseRequest {
            case_ref: first.case_ref.clone(),
            ..Default::default()
        })
        .await
        .expect("case")
        .into_inner();
    assert_eq!(case.entries.len(), 1);
    assert_eq!(case.entries[0].message_id, first.message_id);
    assert_eq!(case.entries[0].direction, pb::MessageDirection::Sent as i32);

    let status = client
        .get_node_status(pb::GetNodeStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.participant, "NL-NRM");
    assert!(!status.broker_connected);
    assert_eq!(status.outbox_queued, 1);
    // the certificate file, for an operator checking a renewal
    assert!(
        status
            .certificate_serial
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
            && !status.certificate_serial.is_empty(),
        "{status:?}"
    );
    let not_after = status.certificate_not_after.expect("certificate expiry");
    assert!(
        not_after.seconds > 1_767_225_600,
        "after 2026-01-01: {not_after:?}"
    );
    // no handshake with the broker yet (core::tests: once there was one, it is set)
    assert_eq!(status.broker_certificate_not_after, None);
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_bodies_are_accepted() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let referral: pb::Referral = serde_json::from_str(REFERRAL_JSON).expect("referral");
    let response = client
        .send(pb::SendRequest {
            kind: pb::MessageKind::Unspecified as i32,
            body: Some(pb::send_request::Body::Referral(referral)),
            ..referral_request("typed-1", "")
        })
        .await
        .expect("typed send")
        .into_inner();
    let entry = response.entry.expect("entry");
    assert_eq!(entry.kind, pb::MessageKind::Referral as i32);
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_and_removed_on_stop() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_path_buf();
    assert_eq!(socket, sandbox.config.data_dir.join("node.sock"));
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    // No staging directory (`.t<pid in base 36>`) is left behind. (It was named
    // `.trmx-…` once; a check for that name found nothing whatever the node left.)
    let leftovers: Vec<_> = std::fs::read_dir(&sandbox.config.data_dir)
        .expect("data dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A second node on the same socket is refused while the first runs.
    let mut second = sandbox.config.clone();
    second.data_dir = sandbox.path().join("data2");
    second.api.socket = Some(socket.clone());
    let error =
        trmx_node::RunningNode::start(&second, std::sync::Arc::new(trmx_node::core::SystemClock))
            .await
            .expect_err("socket in use");
    assert!(error.to_string().contains("in use"), "{error}");
    // … before it opened a store (or dialled the broker to fill it)
    assert!(
        !second.data_dir.exists(),
        "the second node opened its store before it found the socket taken"
    );

    node.stop().await.expect("stop");
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "socket removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
    let sandbox = Sandbox::new();
    std::fs::create_dir_all(&sandbox.config.data_dir).expect("data dir");
    let socket = sandbox.config.data_dir.join("node.sock");
    // A socket file nobody listens on (as left by a crashed node).
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(std::fs::symlink_metadata(&socket).is_ok());
    let node = sandbox.start().await;
    connect_local(node.socket_path()).await.expect("connect");
    node.stop().await.expect("stop");

    std::fs::write(&socket, b"not a socket").expect("write");
    let error = trmx_node::RunningNode::start(
        &sandbox.config,
        std::sync::Arc::new(trmx_node::core::SystemClock),
    )
    .await
    .expect_err("regular file");
    assert!(error.to_string().contains("not a socket"), "{error}");
    assert_eq!(std::fs::read(&socket).expect("kept"), b"not a socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_open_watch_streams() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let mut stream = client
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), node.stop())
        .await
        .expect("stop does not wait for the watch stream")
        .expect("stop");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream ends");
    // UNAVAILABLE, the code a client retries on: a clean end would say "finished"
    let status = end
        .expect("an error, not a clean end")
        .expect_err("an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("after_seq"), "{status:?}");
}

/// Whether a connection to the local API at `socket` answers a call.
async fn answers(
    socket: &std::path::Path,
) -> Option<trmx_proto::pb::node_api_client::NodeApiClient<tonic::transport::Channel>> {
    let mut client = connect_local(socket).await.ok()?;
    client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .ok()?;
    Some(client)
}

/// An integration that leaked connections could take every file descriptor of the
/// node, and its broker link and store with them. One over `api.max_connections` is
/// closed at once, with a warning that names the limit; a connection closed gives its
/// slot back.
#[tokio::test]
async fn connections_over_the_cap_are_closed() {
    let logs = LogCapture::start();
    let mut sandbox = Sandbox::new();
    sandbox.config.api.max_connections = 2;
    let node = sandbox.start().await;
    let socket = node.socket_path().to_owned();
    let first = answers(&socket).await.expect("the first connection");
    let _second = answers(&socket).await.expect("the second connection");
    assert!(
        answers(&socket).await.is_none(),
        "a third connection answered"
    );
    let warned = logs.lines_with(&["WARN", "api.max_connections"]);
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(warned[0].contains("limit=2"), "{}", warned[0]);

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while answers(&socket).await.is_none() {
        assert!(Instant::now() < deadline, "the slot was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await.expect("stop");
}

/// Each `Watch` stream holds its entries and a task's worth of state until it ends;
/// leaked ones piled up. One over `api.max_watch_streams`, over all connections, is
/// RESOURCE_EXHAUSTED naming the key; the rest of the API still answers, and a stream
/// dropped gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_over_the_cap_are_refused() {
    let mut sandbox = Sandbox::new();
    sandbox.config.api.max_watch_streams = 2;
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let mut other = connect_local(node.socket_path()).await.expect("connect");
    let watch = pb::WatchRequest { after_seq: 0 };
    let first = client.watch(watch).await.expect("the first watch");
    let _second = other.watch(watch).await.expect("the second watch");
    let status = client.watch(watch).await.expect_err("a third watch");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("api.max_watch_streams = 2"),
        "{status:?}"
    );
    client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .expect("other calls still answer");

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.watch(watch).await {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
        assert!(Instant::now() < deadline, "the slot was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cursor_past_the_inbox_is_refused() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    // e.g. the integration's cursor from before the node's store was replaced
    let status = client
        .watch(pb::WatchRequest { after_seq: 7 })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("after_seq 7"), "{status:?}");
    // from the last seq (0 for an empty inbox) it is fine
    client
        .watch(pb::WatchRequest { after_seq: 0 })
        .await
        .expect("watch from the start");
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_and_what_is_due_are_listed_a_page_at_a_time() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let mut sent = Vec::new();
    for i in 0..3 {
        let response = client
            .send(referral_request(&format!("cms:page:{i}"), REFERRAL_JSON))
            .await
            .expect("send")
            .into_inner();
        sent.insert(0, response.message_id);
    }
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_outbox(pb::ListOutboxRequest {
                limit: 2,
                page_token,
                ..Default::default()
            })
            .await
            .expect("outbox")
            .into_inner();
        listed.extend(page.entries.into_iter().map(|e| e.message_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, sent, "every entry once, newest first");

    // what is due too, oldest date first (one date here: ordered by message id)
    // (the token carries its listing's `today`: the next pages ask without one)
    let mut due = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_due(pb::ListDueRequest {
                today: if pages == 0 { "2026-02-01" } else { "" }.to_owned(),
                limit: 2,
                page_token: page_token.clone(),
            })
            .await
            .expect("due")
            .into_inner();
        pages += 1;
        due.extend(page.items.into_iter().map(|e| e.message_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
        let status = client
            .list_due(pb::ListDueRequest {
                today: "2026-03-01".to_owned(),
                limit: 2,
                page_token: page_token.clone(),
            })
            .await
            .expect_err("a token of the listing by another day");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("2026-02-01"), "{status:?}");
    }
    assert_eq!(pages, 2);
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(due, expected, "every request awaiting an answer once");
    let status = client
        .list_due(pb::ListDueRequest {
            page_token: "outbox:3".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("a token of another listing");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(invalid_field(&status), Some("page_token"));

    let status = client
        .list_inbox(pb::ListInboxRequest {
            page_token: "garbage".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(invalid_field(&status), Some("page_token"));
    node.stop().await.expect("stop");
}

/// A message with the largest attachments a node sends takes about 5 MB with both forms
/// of its body, over the 4 MiB a default gRPC client accepts: each form alone fits, and
/// the metadata alone carries no body; an unknown form is refused.
#[tokio::test]
async fn a_message_with_the_largest_attachments_reads_in_one_form_with_a_default_client() {
    use trmx_node::core::{Body, Kind};
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let Ok(Body::Referral(mut referral)) = Body::from_json(Kind::Referral, REFERRAL_JSON) else {
        panic!("example referral");
    };
    for (i, byte) in [1u8, 2].into_iter().enumerate() {
        let content = vec![byte; 1024 * 1024];
        referral.attachments.push(pb::Attachment {
            file_name: format!("scan-{i}.pdf"),
            media_type: "application/pdf".into(),
            sha256: trmx_proto::envelope::sha256(&content).to_vec(),
            content,
        });
    }
    let sent = client
        .send(pb::SendRequest {
            kind: pb::MessageKind::Referral as i32,
            recipient: "BE-PAYOKE".to_owned(),
            new_case: true,
            idempotency_key: "big-1".to_owned(),
            body: Some(pb::send_request::Body::Referral(referral)),
            ..Default::default()
        })
        .await
        .expect("send accepts 2 MiB of attachments")
        .into_inner();
    // a client with gRPC's default receive limit (4 MiB)
    let mut default_client = client.clone().max_decoding_message_size(4 * 1024 * 1024);
    let read = |form: pb::BodyForm| pb::GetMessageRequest {
        message_id: sent.message_id.clone(),
        body_form: form as i32,
    };
    let both = default_client
        .get_message(read(pb::BodyForm::Unspecified))
        .await;
    assert_eq!(
        both.map(drop).expect_err("both forms").code(),
        Code::OutOfRange,
        "(if this passes, the note on BodyForm is out of date)"
    );
    let json = default_client
        .get_message(read(pb::BodyForm::Json))
        .await
        .expect("JSON alone")
        .into_inner();
    assert!(json.body.is_none() && !json.body_json.is_empty());
    let typed = default_client
        .get_message(read(pb::BodyForm::Typed))
        .await
        .expect("typed alone")
        .into_inner();
    assert!(typed.body.is_some() && typed.body_json.is_empty());
    let none = default_client
        .get_message(read(pb::BodyForm::None))
        .await
        .expect("metadata")
        .into_inner();
    assert!(none.body.is_none() && none.body_json.is_empty() && !none.body_erased);
    assert!(none.entry.is_some());
    let status = client
        .get_message(pb::GetMessageRequest {
            message_id: sent.message_id.clone(),
            body_form: 9,
        })
        .await
        .expect_err("unknown form");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("body_form"),
        "{}",
        status.message()
    );
    node.stop().await.expect("stop");
}

/// The follow-up example, to add messages to a case.
const FOLLOW_UP_JSON: &str = include_str!("../../../proto/examples/03-follow-up-training.json");

/// A case of `messages` messages (a referral, then follow-ups) sent from `client`'s node:
/// its case reference and the message ids.
async fn a_case_of(
    client: &mut NodeApiClient<Channel>,
    messages: usize,
    tag: &str,
) -> (String, Vec<String>) {
    let first = client
        .send(referral_request(&format!("{tag}:0"), REFERRAL_JSON))
        .await
        .expect("send the referral")
        .into_inner();
    let mut ids = vec![first.message_id];
    for i in 1..messages {
        let sent = client
            .send(pb::SendRequest {
                kind: pb::MessageKind::FollowUp as i32,
                recipient: "BE-PAYOKE".to_owned(),
                case_ref: first.case_ref.clone(),
                priority: pb::Priority::Normal as i32,
                idempotency_key: format!("{tag}:{i}"),
                body: Some(pb::send_request::Body::BodyJson(FOLLOW_UP_JSON.to_owned())),
                ..Default::default()
            })
            .await
            .expect("send a follow-up")
            .into_inner();
        ids.push(sent.message_id);
    }
    (first.case_ref, ids)
}

/// A long case (years of follow-ups) came back in one `GetCase` answer, which could
/// pass the gRPC message size. It now comes a page at a time, oldest first: the pages
/// hold every message once, in the order of the whole timeline; a request without the
/// paging fields gets the first page of the default size (here the whole case); a token
/// that is not one, or is another case's, is refused, as is a negative page size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_longer_than_a_page_is_read_a_page_at_a_time() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let (case_ref, sent) = a_case_of(&mut client, 5, "cms:long-case").await;
    let (other_case, _) = a_case_of(&mut client, 1, "cms:other-case").await;

    let get = |page_size: i32, page_token: &str| pb::GetCaseRequest {
        case_ref: case_ref.clone(),
        page_size,
        page_token: page_token.to_owned(),
    };
    // (as a client written before paging asks)
    let whole = client
        .get_case(pb::GetCaseRequest {
            case_ref: case_ref.clone(),
            ..Default::default()
        })
        .await
        .expect("the first page of the default size")
        .into_inner();
    assert_eq!(whole.next_page_token, "", "a short case is one page");
    let whole: Vec<String> = whole.entries.into_iter().map(|e| e.message_id).collect();
    let mut expected = sent.clone();
    expected.sort();
    let mut got = whole.clone();
    got.sort();
    assert_eq!(got, expected, "every message of the case, once");

    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .get_case(get(2, &page_token))
            .await
            .expect("a page")
            .into_inner();
        assert_eq!(page.case_ref, case_ref);
        pages.push(
            page.entries
                .into_iter()
                .map(|e| e.message_id)
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
        assert!(pages.len() < 10, "the pages never end");

        // a token of this case's timeline is not one of another case's
        let status = client
            .get_case(pb::GetCaseRequest {
                case_ref: other_case.clone(),
                page_size: 2,
                page_token: page_token.clone(),
            })
            .await
            .expect_err("another case's token");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(invalid_field(&status), Some("page_token"), "{status:?}");
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(
        pages.concat(),
        whole,
        "the pages in the order of the whole timeline"
    );

    for (request, field) in [
        (get(2, "garbage"), "page_token"),
        (get(2, "outbox:3"), "page_token"),
        (get(-1, ""), "page_size"),
    ] {
        let status = client.get_case(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(invalid_field(&status), Some(field), "{status:?}");
    }
    node.stop().await.expect("stop");
}
