//! Adversarial probes of the local API and the CLI: what a buggy case-management
//! system or a tired caseworker sends, and what the node must answer.

use prost::Message;
use tonic::Code;
use trmx_node::api::status::invalid_field;
use trmx_node::connect_local;
use trmx_proto::pb;

use super::harness::{REFERRAL_JSON, Sandbox};

/// A `SendRequest` as a client without a generated encoder may send it: `body_json`
/// (field 20) as raw bytes, which may not be UTF-8.
#[derive(Clone, PartialEq, Message)]
struct RawSendRequest {
    #[prost(int32, tag = "1")]
    kind: i32,
    #[prost(string, tag = "2")]
    recipient: String,
    #[prost(bool, tag = "4")]
    new_case: bool,
    #[prost(string, tag = "7")]
    idempotency_key: String,
    #[prost(bytes = "vec", tag = "20")]
    body_json: Vec<u8>,
}

/// Sends `request` as the body of `NodeApi/Send` and returns the status of the answer.
async fn raw_send(socket: &std::path::Path, request: RawSendRequest) -> tonic::Status {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/trmx.v1.NodeApi/Send");
    let codec = tonic_prost::ProstCodec::<RawSendRequest, pb::SendResponse>::default();
    grpc.unary(tonic::Request::new(request), path, codec)
        .await
        .expect_err("refused")
}

/// A body that is not UTF-8 is a bad argument naming the field, not an internal error
/// of the node (a client would retry that, or page an operator), and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_utf8_is_an_invalid_argument() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut body = REFERRAL_JSON
        .replace("NRM-2026-0117-A", "Jane\u{1}")
        .into_bytes();
    let at = body.iter().position(|&b| b == 1).expect("marker");
    body[at] = 0xff;
    let status = raw_send(
        node.socket_path(),
        RawSendRequest {
            kind: pb::MessageKind::Referral as i32,
            recipient: "BE-PAYOKE".to_owned(),
            new_case: true,
            idempotency_key: "k-utf8".to_owned(),
            body_json: body,
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(!status.message().contains("Jane"), "{status:?}");
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let outbox = client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .expect("outbox")
        .into_inner();
    assert!(outbox.entries.is_empty(), "{outbox:?}");
    node.stop().await.expect("stop");
}

/// `len` bytes of path: `base`, then a directory of `d`s, then `/` + `name`.
fn path_of_len(base: &std::path::Path, len: usize, name: &str) -> std::path::PathBuf {
    let base_len = base.as_os_str().len();
    let dir = base.join("d".repeat(len - base_len - 2 - name.len()));
    let path = dir.join(name);
    assert_eq!(path.as_os_str().len(), len);
    path
}

/// Every socket path the config accepts (at most 107 bytes, and for the default name
/// a data directory of at most 97) can be bound: the node binds it first in a private
/// directory beside it, which must not make the path too long for a Unix socket.
/// (It did: `.trmx-<pid>/s` made a 103-byte path with a short name, or the default
/// socket in a 95-byte data directory, fail with "path must be shorter than SUN_LEN".)
#[tokio::test]
async fn every_socket_path_the_config_accepts_can_be_bound() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (len, name) in [(107, "node.sock"), (105, "node.sock"), (106, "api.sock")] {
        let path = path_of_len(dir.path(), len, name);
        let socket = trmx_node::api::bind_local_socket(&path)
            .unwrap_or_else(|e| panic!("{len} bytes, {name}: {e}"));
        std::os::unix::net::UnixStream::connect(&path).expect("connects");
        drop(socket);
    }
}

/// A socket path whose staged form is too long is refused by the config, naming
/// `api.socket` and the limit, and the bind refuses it before creating anything;
/// neither answer is the system's "path must be shorter than SUN_LEN".
#[tokio::test]
async fn a_socket_path_too_long_to_bind_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = path_of_len(dir.path(), 103, "s");
    let sandbox = Sandbox::new();
    let mut config = sandbox.config.clone();
    config.api.socket = Some(path.clone());
    let message = config.validate().expect_err("refused").to_string();
    assert!(
        message.contains("api.socket: must be in a directory of at most 97 bytes"),
        "{message}"
    );
    let message = trmx_node::api::bind_local_socket(&path)
        .expect_err("refused")
        .to_string();
    assert!(
        message.contains("api.socket:") && message.contains("directory is at most 97 bytes"),
        "{message}"
    );
    assert!(!message.contains("SUN_LEN"), "{message}");
    assert!(
        !path.parent().expect("dir").exists(),
        "nothing was created for a path that cannot be bound"
    );
}

/// The referral request of these probes: valid, to `BE-PAYOKE`, in a new case.
fn referral() -> pb::SendRequest {
    pb::SendRequest {
        kind: pb::MessageKind::Referral as i32,
        recipient: "BE-PAYOKE".to_owned(),
        new_case: true,
        idempotency_key: "k-probe".to_owned(),
        body: Some(pb::send_request::Body::BodyJson(REFERRAL_JSON.to_owned())),
        ..Default::default()
    }
}

/// The referral JSON with the value at `pointer` (a JSON pointer) replaced.
fn referral_with(pointer: &str, value: serde_json::Value) -> String {
    let mut json: serde_json::Value = serde_json::from_str(REFERRAL_JSON).expect("example");
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    match json.pointer_mut(parent).expect("parent") {
        serde_json::Value::Array(items) => items[key.parse::<usize>().expect("index")] = value,
        object => {
            object
                .as_object_mut()
                .expect("object")
                .insert(key.to_owned(), value);
        }
    }
    json.to_string()
}

/// Every field of a `Send` broken the ways a buggy integration breaks it: each is
/// `INVALID_ARGUMENT` naming the field (in the message and in `trmx-field`), never
/// quoting the value, and queues nothing. (A guard: these passed when written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broken_send_field_is_named_and_changes_nothing() {
    use serde_json::json;
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let body = |json: String| Some(pb::send_request::Body::BodyJson(json));
    let cases: Vec<(&str, pb::SendRequest)> = vec![
        (
            "kind",
            pb::SendRequest {
                kind: 99,
                ..referral()
            },
        ),
        (
            "kind",
            pb::SendRequest {
                kind: 0,
                ..referral()
            },
        ),
        (
            "kind",
            pb::SendRequest {
                kind: pb::MessageKind::DeliveryReceipt as i32,
                ..referral()
            },
        ),
        (
            // (the referral's `purpose` is no field of a follow-up: an unknown key, not
            // repeated)
            "follow_up",
            pb::SendRequest {
                kind: pb::MessageKind::FollowUp as i32,
                ..referral()
            },
        ),
        (
            "recipient",
            pb::SendRequest {
                recipient: String::new(),
                ..referral()
            },
        ),
        (
            "recipient",
            pb::SendRequest {
                recipient: "Jane Doe".into(),
                ..referral()
            },
        ),
        (
            "recipient",
            pb::SendRequest {
                recipient: "NL-NRM".into(),
                ..referral()
            },
        ),
        (
            "case_ref",
            pb::SendRequest {
                new_case: false,
                case_ref: "Jane Doe".into(),
                ..referral()
            },
        ),
        (
            "new_case",
            pb::SendRequest {
                case_ref: uuid::Uuid::nil().to_string(),
                ..referral()
            },
        ),
        (
            "in_reply_to",
            pb::SendRequest {
                in_reply_to: "Jane Doe".into(),
                ..referral()
            },
        ),
        (
            "priority",
            pb::SendRequest {
                priority: 99,
                ..referral()
            },
        ),
        (
            "idempotency_key",
            pb::SendRequest {
                idempotency_key: String::new(),
                ..referral()
            },
        ),
        (
            "idempotency_key",
            pb::SendRequest {
                idempotency_key: "Jane Doe".into(),
                ..referral()
            },
        ),
        (
            "idempotency_key",
            pb::SendRequest {
                idempotency_key: "k".repeat(129),
                ..referral()
            },
        ),
        (
            "expires_at",
            pb::SendRequest {
                expires_at: Some(pb::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: -1,
                }),
                ..referral()
            },
        ),
        (
            "expires_at",
            pb::SendRequest {
                expires_at: Some(pb::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..referral()
            },
        ),
        (
            "expires_at",
            pb::SendRequest {
                expires_at: Some(pb::Timestamp {
                    seconds: 1_000_000_000,
                    nanos: 0,
                }),
                ..referral()
            },
        ),
        (
            "body",
            pb::SendRequest {
                body: None,
                ..referral()
            },
        ),
        (
            "referral",
            pb::SendRequest {
                body: body("Jane Doe".into()),
                ..referral()
            },
        ),
        (
            "referral",
            pb::SendRequest {
                body: body(String::new()),
                ..referral()
            },
        ),
        (
            "referral",
            pb::SendRequest {
                body: body("[\"Jane Doe\"]".into()),
                ..referral()
            },
        ),
        (
            "referral",
            pb::SendRequest {
                body: body(format!("{REFERRAL_JSON} \"Jane Doe\"")),
                ..referral()
            },
        ),
        (
            "referral.person.pseudonym",
            pb::SendRequest {
                body: body(referral_with("/person/pseudonym", json!(""))),
                ..referral()
            },
        ),
        (
            "referral.person.pseudonym",
            pb::SendRequest {
                body: body(referral_with("/person/pseudonym", json!("Jane\u{7}Doe"))),
                ..referral()
            },
        ),
        (
            "referral.person.pseudonym",
            pb::SendRequest {
                body: body(referral_with("/person/pseudonym", json!(["Jane Doe"]))),
                ..referral()
            },
        ),
        (
            "referral.person.family_name",
            pb::SendRequest {
                body: body(referral_with(
                    "/person/familyName",
                    json!("Jane Doe ".repeat(100)),
                )),
                ..referral()
            },
        ),
        (
            "referral.person.date_of_birth",
            pb::SendRequest {
                body: body(referral_with("/person/dateOfBirth", json!("1990-02-30"))),
                ..referral()
            },
        ),
        (
            "referral.person.date_of_birth",
            pb::SendRequest {
                body: body(referral_with("/person/dateOfBirth", json!("2990-01-01"))),
                ..referral()
            },
        ),
        (
            "referral.person.date_of_birth",
            pb::SendRequest {
                body: body(referral_with("/person/dateOfBirth", json!("Jane Doe"))),
                ..referral()
            },
        ),
        (
            "referral.person.age_band",
            pb::SendRequest {
                body: body(referral_with("/person/ageBand", json!("AGE_BAND_JANE_DOE"))),
                ..referral()
            },
        ),
        (
            "referral.person.age_band",
            pb::SendRequest {
                body: body(referral_with("/person/ageBand", json!(4711))),
                ..referral()
            },
        ),
        (
            "referral.person.nationalities[0]",
            pb::SendRequest {
                body: body(referral_with("/person/nationalities/0", json!("Jane Doe"))),
                ..referral()
            },
        ),
        (
            "referral.consent.given_at",
            pb::SendRequest {
                body: body(referral_with("/consent/givenAt", json!("Jane Doe"))),
                ..referral()
            },
        ),
        (
            "referral.handling.retain_until",
            pb::SendRequest {
                body: body(referral_with("/handling/retainUntil", json!("2031-13-01"))),
                ..referral()
            },
        ),
        (
            "referral.person",
            pb::SendRequest {
                body: body(referral_with("/person", json!({"Jane Doe": "x"}))),
                ..referral()
            },
        ),
    ];
    for (field, request) in cases {
        let what = format!("{field}: {request:?}");
        let status = client.send(request).await.expect_err(&what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}\n{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{what}\n{status:?}"
        );
        assert_eq!(invalid_field(&status), Some(field), "{what}\n{status:?}");
        assert!(!status.message().contains("Jane"), "{what}\n{status:?}");
    }
    let outbox = client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .expect("outbox")
        .into_inner();
    assert!(outbox.entries.is_empty(), "{outbox:?}");
    node.stop().await.expect("stop");
}

/// Listing requests with bad filters, limits and forged page tokens: each is
/// `INVALID_ARGUMENT` naming the field. (A guard: these passed when written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_listing_requests_are_named() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let case = trmx_proto::CaseRef::new_random().to_string();
    let other_case = trmx_proto::CaseRef::new_random().to_string();
    let id = trmx_proto::MessageId::new_v7().to_string();
    let check = |field: &str, result: Result<(), tonic::Status>| {
        let status = result.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(invalid_field(&status), Some(field), "{status:?}");
    };
    let shared = client.clone();
    let outbox = |request: pb::ListOutboxRequest| {
        let mut client = shared.clone();
        async move { client.list_outbox(request).await.map(drop) }
    };
    check(
        "state",
        outbox(pb::ListOutboxRequest {
            state: 99,
            ..Default::default()
        })
        .await,
    );
    check(
        "kind",
        outbox(pb::ListOutboxRequest {
            kind: 99,
            ..Default::default()
        })
        .await,
    );
    check(
        "counterpart",
        outbox(pb::ListOutboxRequest {
            counterpart: "nl-nrm".into(),
            ..Default::default()
        })
        .await,
    );
    check(
        "case_ref",
        outbox(pb::ListOutboxRequest {
            case_ref: id.to_uppercase(),
            ..Default::default()
        })
        .await,
    );
    for token in [
        "inbox:3",
        "outbox:-1",
        "outbox:",
        "outbox:1:2",
        "outbox:99999999999999999999",
    ] {
        check(
            "page_token",
            outbox(pb::ListOutboxRequest {
                page_token: token.into(),
                ..Default::default()
            })
            .await,
        );
    }
    check(
        "page_token",
        client
            .list_inbox(pb::ListInboxRequest {
                page_token: "outbox:1".into(),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    let get_case = |page_size: i32, page_token: String| {
        let mut client = shared.clone();
        let case = case.clone();
        async move {
            client
                .get_case(pb::GetCaseRequest {
                    case_ref: case,
                    page_size,
                    page_token,
                })
                .await
                .map(drop)
        }
    };
    check("page_size", get_case(-1, String::new()).await);
    check(
        "page_token",
        get_case(0, format!("case:{other_case}:0:{id}")).await,
    );
    check(
        "page_token",
        get_case(0, format!("case:{case}:x:{id}")).await,
    );
    check(
        "page_token",
        get_case(0, "due:2026-01-01:2026-01-01:x".into()).await,
    );
    check(
        "page_token",
        client
            .list_due(pb::ListDueRequest {
                today: "2026-03-01".into(),
                page_token: format!("due:2026-02-01:2026-01-01:{id}"),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    check(
        "today",
        client
            .list_due(pb::ListDueRequest {
                today: "2026-02-30".into(),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    check(
        "body_form",
        client
            .get_message(pb::GetMessageRequest {
                message_id: id.clone(),
                body_form: 99,
            })
            .await
            .map(drop),
    );
    check(
        "message_id",
        client
            .withdraw(pb::WithdrawMessageRequest {
                message_id: String::new(),
            })
            .await
            .map(drop),
    );
    // A huge limit or page size is capped, not refused, nor a reason to fail.
    outbox(pb::ListOutboxRequest {
        limit: u32::MAX,
        ..Default::default()
    })
    .await
    .expect("a huge limit is capped");
    get_case(i32::MAX, String::new())
        .await
        .expect("a huge page size is capped");
    node.stop().await.expect("stop");
}

/// A socket path under a file (a typo in `api.socket`) is said to be one, with what to
/// do, not "cannot create …: File exists"; a file at the path itself is kept, with what
/// to do.
#[tokio::test]
async fn a_socket_path_under_a_file_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "x").expect("write");
    let message = trmx_node::api::bind_local_socket(&file.join("node.sock"))
        .expect_err("refused")
        .to_string();
    assert_eq!(
        message,
        format!(
            "config: api.socket: {} is not a directory, so the socket {} cannot be made in \
             it: set api.socket to a path in a directory",
            file.display(),
            file.join("node.sock").display()
        )
    );
    let message = trmx_node::api::bind_local_socket(&file)
        .expect_err("refused")
        .to_string();
    assert!(
        message.ends_with("exists and is not a socket: set api.socket to another path (the node replaces only a socket left by a node that stopped)"),
        "{message}"
    );
    assert_eq!(std::fs::read(&file).expect("kept"), b"x");
}

/// An integration that retries a send before the first answer came (or two workers
/// that share a key): however many arrive at once, one message is queued, every
/// retry with the same content gets it, and a different document under the key is
/// `ALREADY_EXISTS`. (A guard: this passed when written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_with_one_key_queue_one_message() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let client = connect_local(node.socket_path()).await.expect("connect");
    let other = REFERRAL_JSON.replace("NRM-2026-0117-A", "NRM-2026-0118-B");
    let mut tasks = Vec::new();
    for i in 0..24 {
        let mut client = client.clone();
        let body = if i % 3 == 2 {
            other.clone()
        } else {
            REFERRAL_JSON.to_owned()
        };
        tasks.push(tokio::spawn(async move {
            let request = pb::SendRequest {
                body: Some(pb::send_request::Body::BodyJson(body.clone())),
                ..referral()
            };
            (body, client.send(request).await)
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut winner: Option<String> = None;
    let mut refused = 0;
    for task in tasks {
        let (body, result) = task.await.expect("join");
        match result {
            Ok(response) => {
                ids.insert(response.into_inner().message_id);
                assert!(
                    winner.as_ref().is_none_or(|w: &String| *w == body),
                    "two documents queued"
                );
                winner.get_or_insert(body);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(refused >= 8, "every other document was refused: {refused}");
    let mut client = client.clone();
    let outbox = client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .expect("outbox")
        .into_inner();
    assert_eq!(outbox.entries.len(), 1, "{outbox:?}");
    node.stop().await.expect("stop");
}

/// At the most verbose level, the node's log of its local API (tonic, h2 and hyper
/// included) holds no body value: not of a message queued, shown or listed, nor of one
/// refused for a bad field. (A guard: this passed when written.)
#[tokio::test]
async fn no_body_value_reaches_the_log_at_trace() {
    use serde_json::json;
    let logs = super::harness::LogCapture::start_at("trace");
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    let marked = [
        ("/person/pseudonym", json!("PSEUDOMARKQX")),
        ("/person/givenNames", json!("GIVENMARKQX")),
        ("/person/familyName", json!("FAMILYMARKQX")),
        ("/notes", json!({"language": "en", "text": "NOTESMARKQX"})),
    ];
    let mut body: serde_json::Value = serde_json::from_str(REFERRAL_JSON).expect("example");
    for (pointer, value) in &marked {
        let (parent, key) = pointer.rsplit_once('/').expect("pointer");
        body.pointer_mut(parent)
            .and_then(serde_json::Value::as_object_mut)
            .expect("object")
            .insert(key.to_owned(), value.clone());
    }
    let sent = client
        .send(pb::SendRequest {
            body: Some(pb::send_request::Body::BodyJson(body.to_string())),
            ..referral()
        })
        .await
        .expect("queued")
        .into_inner();
    client
        .get_message(pb::GetMessageRequest {
            message_id: sent.message_id,
            body_form: 0,
        })
        .await
        .expect("shown");
    client
        .list_outbox(pb::ListOutboxRequest::default())
        .await
        .expect("listed");
    // refused ones: a value breaking a rule, a wrong type, an unknown field holding it
    for (pointer, value) in [
        ("/person/familyName", json!("BADMARKQX\u{7}")),
        ("/person/ageBand", json!("BADMARKQX")),
        ("/person/BADMARKQX", json!("BADMARKQX")),
        ("/handling/retainUntil", json!("BADMARKQX")),
    ] {
        let status = client
            .send(pb::SendRequest {
                idempotency_key: "k-bad".to_owned(),
                body: Some(pb::send_request::Body::BodyJson(referral_with(
                    pointer, value,
                ))),
                ..referral()
            })
            .await
            .expect_err("refused");
        assert!(!status.message().contains("MARKQX"), "{status:?}");
    }
    node.stop().await.expect("stop");
    let text = logs.text();
    assert!(
        text.contains("TRACE") && text.contains("message queued"),
        "logs too thin"
    );
    let leaked: Vec<&str> = text.lines().filter(|l| l.contains("MARKQX")).collect();
    assert!(leaked.is_empty(), "body values in the log: {leaked:#?}");
}

/// A mistyped `log_level` (`debgu`) is a valid filter to tracing, one that shows only a
/// target of that name: the node ran and logged nothing, its errors included. It is
/// refused, naming the key; levels, `target=level` lists and span filters still load.
#[test]
fn a_mistyped_log_level_is_refused_not_a_silent_node() {
    let sandbox = Sandbox::new();
    for typo in ["debgu", "Info,trmx_nod", "warn,debgu"] {
        let mut config = sandbox.config.clone();
        config.log_level = typo.to_owned();
        let message = config.validate().expect_err(typo).to_string();
        assert!(message.starts_with("config: log_level: "), "{message}");
        assert!(message.contains("is not a level"), "{message}");
    }
    for fine in [
        "debug",
        "WARN",
        "info,trmx_node=debug",
        "warn,trmx_node::core=trace,h2=off",
        "info,trmx_node[send]=debug",
    ] {
        let mut config = sandbox.config.clone();
        config.log_level = fine.to_owned();
        config.validate().unwrap_or_else(|e| panic!("{fine}: {e}"));
    }
    // tracing keeps the whitespace around a directive: `info ` was the target `info `,
    // and `debug=` the target `debug`, a silent node; the node gives tracing the filter
    // without that whitespace, and refuses a `target=` without a level
    for (written, used) in [
        ("info ", "info"),
        (" debug\n", "debug"),
        ("trmx_node=debug, info", "trmx_node=debug,info"),
    ] {
        let mut config = sandbox.config.clone();
        config.log_level = written.to_owned();
        config
            .validate()
            .unwrap_or_else(|e| panic!("{written:?}: {e}"));
        assert_eq!(config.log_filter().expect(written), used);
    }
    for typo in ["debug=", "info,trmx_node="] {
        let mut config = sandbox.config.clone();
        config.log_level = typo.to_owned();
        let message = config.validate().expect_err(typo).to_string();
        assert!(message.starts_with("config: log_level: "), "{message}");
    }
}

/// A socket directory of the node's own under a directory every user can write (no
/// sticky bit) is refused, naming that directory: another user could rename the node's
/// directory away and put one with their own socket in its place. The same through a
/// symbolic link, by `check-config`'s check too; under a sticky `/tmp`-like directory,
/// where only an entry's owner may rename it, the socket binds.
#[tokio::test]
async fn a_socket_directory_under_one_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("dir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let ours = open.join("node");
    std::fs::create_dir(&ours).expect("dir");
    std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let expected = |dir: &std::path::Path| {
        format!(
            "config: api.socket: the directory {}, above the socket's directory {}, can be \
             written by other users (mode 777), who could move the socket's directory away \
             and put their own in its place: use a directory whose every parent only root or \
             the node's user can write (e.g. /run/trmx-node), or `chmod o-w` that one",
            open.display(),
            dir.display()
        )
    };
    let socket = ours.join("node.sock");
    let message = trmx_node::api::bind_local_socket(&socket)
        .expect_err("refused")
        .to_string();
    assert_eq!(message, expected(&ours));
    assert_eq!(std::fs::read_dir(&ours).expect("read").count(), 0);
    let checked = trmx_node::api::check_socket_dir_of(&socket)
        .expect_err("refused by check-config too")
        .to_string();
    assert_eq!(checked, expected(&ours));
    // through a symbolic link in a safe directory, to the directory under `open`
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&ours, &link).expect("symlink");
    let message = trmx_node::api::bind_local_socket(&link.join("node.sock"))
        .expect_err("refused through the link")
        .to_string();
    assert_eq!(message, expected(&link));
    // with the sticky bit, only the owner of `node` may rename it: fine
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let bound = trmx_node::api::bind_local_socket(&socket).expect("binds under a sticky dir");
    drop(bound);
    // (as root, the test can give a directory above to another user)
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    if root {
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).expect("dir");
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let ours = theirs.join("node");
        std::fs::create_dir(&ours).expect("dir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        let message = trmx_node::api::bind_local_socket(&ours.join("node.sock"))
            .expect_err("refused")
            .to_string();
        assert!(
            message.contains(&format!(
                "the directory {}, above the socket's directory {}, belongs to another user \
                 (uid 65534)",
                theirs.display(),
                ours.display()
            )),
            "{message}"
        );
    }
}

/// A socket directory every user can write (a shared `/tmp`-like directory) is refused, naming `api.socket` and what to do: another user
/// could put their own socket in place of the node's and receive what the CLI and
/// case-management systems send. Nothing is left in it.
#[tokio::test]
async fn a_socket_directory_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    for mode in [0o777, 0o1777, 0o703] {
        let shared = dir.path().join(format!("shared-{mode:o}"));
        std::fs::create_dir(&shared).expect("dir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let message = trmx_node::api::bind_local_socket(&shared.join("node.sock"))
            .expect_err("refused")
            .to_string();
        assert_eq!(
            message,
            format!(
                "config: api.socket: the directory {} can be written by other users (mode \
                 {mode:o}), who could put their own socket in place of the node's: use a \
                 directory only the node's user can write (e.g. /run/trmx-node, mode 0700), \
                 or `chmod o-w` this one",
                shared.display()
            )
        );
        assert_eq!(
            std::fs::read_dir(&shared).expect("read").count(),
            0,
            "{mode:o}"
        );
    }
    // (as root, the test can give a directory to another user)
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    if root {
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).expect("dir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        let message = trmx_node::api::bind_local_socket(&theirs.join("node.sock"))
            .expect_err("refused")
            .to_string();
        assert!(
            message.contains("belongs to another user (uid 65534)"),
            "{message}"
        );
    }
    // the refusal comes before the node touches anything there: a `.t<pid>` it would have
    // removed (another user's, in a shared directory) stays, and the error is the refusal
    let shared = dir.path().join("shared-with-leftover");
    std::fs::create_dir(&shared).expect("dir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let staging = shared.join(staging_name());
    std::fs::write(&staging, "theirs").expect("a file at the staging name");
    let message = trmx_node::api::bind_local_socket(&shared.join("node.sock"))
        .expect_err("refused")
        .to_string();
    assert!(
        message.contains("can be written by other users (mode 777)"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_to_string(&staging).expect("left alone"),
        "theirs"
    );
    // the node's own directory, readable by others or not, is fine, and so is one its
    // group may write (a umask of 002)
    for mode in [0o700, 0o755, 0o775] {
        let own = dir.path().join(format!("own-{mode:o}"));
        std::fs::create_dir(&own).expect("dir");
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(mode)).expect("chmod");
        drop(trmx_node::api::bind_local_socket(&own.join("node.sock")).expect("bound"));
    }
}

/// A node killed between making its staging directory and removing it leaves
/// `.t<pid>/s` behind; a restart that gets the same pid (a container's pid 1) binds all
/// the same, and leaves nothing there.
#[tokio::test]
async fn a_staging_directory_left_by_a_crash_does_not_stop_a_restart_with_its_pid() {
    let dir = tempfile::tempdir().expect("temp dir");
    let staging = dir.path().join(staging_name());
    std::fs::create_dir(&staging).expect("staging");
    drop(std::os::unix::net::UnixListener::bind(staging.join("s")).expect("bind"));
    let socket = trmx_node::api::bind_local_socket(&dir.path().join("node.sock")).expect("bound");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["node.sock"]);
    drop(socket);
}

/// The name of the directory in which this process stages a socket: `.t` and its pid in
/// base 36.
fn staging_name() -> String {
    let mut pid = std::process::id();
    let mut digits = Vec::new();
    loop {
        digits.push(char::from(
            b"0123456789abcdefghijklmnopqrstuvwxyz"[(pid % 36) as usize],
        ));
        pid /= 36;
        if pid == 0 {
            break;
        }
    }
    format!(".t{}", digits.iter().rev().collect::<String>())
}

/// `{:?}` of a running node (a `RunningNode`, or the `NodeCore` inside it) holds none of
/// the bodies its store keeps: not as text, nor as the byte array sled's own `Debug`
/// prints. That `Debug` printed the node's whole sled database, every key and value, so
/// an integration that logged its node with `?node`, or a test that failed showing it,
/// wrote every body the node held.
#[tokio::test]
async fn the_debug_of_a_running_node_holds_no_body() {
    use serde_json::json;
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    client
        .send(pb::SendRequest {
            body: Some(pb::send_request::Body::BodyJson(referral_with(
                "/notes",
                json!({"language": "en", "text": "NOTESMARKQX"}),
            ))),
            ..referral()
        })
        .await
        .expect("queued");
    let shown = format!("{node:?}");
    node.stop().await.expect("stop");
    let as_bytes = format!("{:?}", "NOTESMARKQX".as_bytes());
    let inner = as_bytes.trim_start_matches('[').trim_end_matches(']');
    assert!(
        !shown.contains("NOTESMARKQX") && !shown.contains(inner),
        "a body in the node's Debug: {} bytes",
        shown.len()
    );
}

/// Raw HTTP/2 for [`a_client_that_makes_the_local_api_reset_its_streams_is_sent_away`]:
/// what a client may not send, which no HTTP/2 library sends (RFC 9113 §4, §6).
mod raw_h2 {
    use tokio::io::AsyncReadExt as _;

    pub(super) const HEADERS: u8 = 0x1;
    pub(super) const SETTINGS: u8 = 0x4;
    pub(super) const GOAWAY: u8 = 0x7;
    pub(super) const WINDOW_UPDATE: u8 = 0x8;
    pub(super) const END_HEADERS: u8 = 0x4;
    /// `GOAWAY`'s error code for a peer that misbehaves (RFC 9113 §7).
    pub(super) const ENHANCE_YOUR_CALM: u32 = 0xb;
    /// The client's connection preface.
    pub(super) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// One frame: its 9-byte header, then `payload`.
    pub(super) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(payload.len()).expect("small").to_be_bytes();
        let mut out = Vec::with_capacity(9 + payload.len());
        out.extend_from_slice(&length[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// An HPACK block for a gRPC request to `path`: literals without indexing or
    /// Huffman, so that it needs no encoder state (RFC 7541 §6.2.2).
    pub(super) fn request_headers(path: &str) -> Vec<u8> {
        let mut block = vec![
            0x83, // :method POST (static table 3)
            0x86, // :scheme http (static table 6)
        ];
        for (name, value) in [
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            block.push(0x00);
            for text in [name, value] {
                block.push(u8::try_from(text.len()).expect("short"));
                block.extend_from_slice(text.as_bytes());
            }
        }
        block
    }

    /// Reads frames until a `GOAWAY` (its error code) or the end of the connection
    /// (`None`).
    pub(super) async fn until_goaway(
        mut read: impl tokio::io::AsyncRead + Unpin,
    ) -> std::io::Result<Option<u32>> {
        let mut header = [0u8; 9];
        loop {
            if let Err(error) = read.read_exact(&mut header).await {
                return match error.kind() {
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                        Ok(None)
                    }
                    _ => Err(error),
                };
            }
            let length =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let mut payload = vec![0u8; length];
            read.read_exact(&mut payload).await?;
            if header[3] == GOAWAY && payload.len() >= 8 {
                return Ok(Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ])));
            }
        }
    }
}

/// A local client that makes the node reset stream after stream (each request followed
/// by a `WINDOW_UPDATE` that overflows its stream's window, a stream error the server
/// answers with `RST_STREAM`: "MadeYouReset", CVE-2025-8671) is sent away with `GOAWAY
/// ENHANCE_YOUR_CALM` after hyper's 1024, as the broker does: tonic 0.14 turns that limit
/// off unless it is set, and the node dispatched request after request for as long as the
/// client liked. Other clients are served meanwhile and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_makes_the_local_api_reset_its_streams_is_sent_away() {
    use tokio::io::AsyncWriteExt as _;
    /// More than hyper's default limit (1024) of streams a connection may have reset.
    const STREAMS: u32 = 1500;
    /// How long the probe waits for the node to close the connection: without the limit
    /// it never does (a bound on a hang, not on speed).
    const HANG: std::time::Duration = std::time::Duration::from_secs(60);
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let unix = tokio::net::UnixStream::connect(node.socket_path())
        .await
        .expect("connect");
    let (read, mut write) = tokio::io::split(unix);
    let reader = tokio::spawn(raw_h2::until_goaway(read));
    write.write_all(raw_h2::PREFACE).await.expect("preface");
    write
        .write_all(&raw_h2::frame(raw_h2::SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    let headers = raw_h2::request_headers("/trmx.v1.NodeApi/GetNodeStatus");
    let overflow = 0x7fff_ffffu32.to_be_bytes();
    let mut sent = 0;
    for i in 0..STREAMS {
        let stream = 2 * i + 1;
        let mut burst = raw_h2::frame(raw_h2::HEADERS, raw_h2::END_HEADERS, stream, &headers);
        burst.extend(raw_h2::frame(raw_h2::WINDOW_UPDATE, 0, stream, &overflow));
        if write.write_all(&burst).await.is_err() {
            break; // (the node closed the connection)
        }
        sent += 1;
    }
    let _ = write.flush().await;
    let goaway = tokio::time::timeout(HANG, reader)
        .await
        .unwrap_or_else(|_| panic!("the connection is still open after {sent} streams reset"))
        .expect("reader")
        .expect("read");
    // (GOAWAY, or the connection closed so fast that the frame was lost with it)
    assert!(
        matches!(goaway, Some(raw_h2::ENHANCE_YOUR_CALM) | None),
        "GOAWAY's code {goaway:?} after {sent} streams"
    );

    // another client is served
    let mut client = connect_local(node.socket_path()).await.expect("connect");
    client
        .get_node_status(pb::GetNodeStatusRequest {})
        .await
        .expect("status");
    node.stop().await.expect("stop");
}
