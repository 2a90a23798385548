//! Adversarial probes of the local API and the CLI: what a buggy case-management
//! system or a tired caseworker sends, and what the node must answer.

use prost::Message;
use tonic::Code;
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
