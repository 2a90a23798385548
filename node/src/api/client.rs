//! The client side of the local API: a tonic channel over the node's Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use trmx_proto::pb::node_api_client::NodeApiClient;

/// How long connecting to the local socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to a node's local API socket. Fails at once when nothing listens
/// on `socket` (missing file, refused connection, permission denied).
pub async fn connect_local(
    socket: &Path,
) -> Result<NodeApiClient<Channel>, tonic::transport::Error> {
    connect_local_with_timeout(socket, None).await
}

/// [`connect_local`], where a call whose answer has not begun within `timeout` (a node
/// that is stuck or stopped: the kernel still accepts its connections) fails with
/// `CANCELLED`. A stream's answer begins with its first message or its headers: a
/// `Watch` that waits for new entries is not cut.
pub async fn connect_local_with_timeout(
    socket: &Path,
    timeout: Option<Duration>,
) -> Result<NodeApiClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector below ignores it.
    let mut endpoint = Endpoint::from_static("http://[::]:50051").connect_timeout(CONNECT_TIMEOUT);
    if let Some(timeout) = timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(NodeApiClient::new(channel)
        .max_decoding_message_size(16 * 1024 * 1024)
        .max_encoding_message_size(16 * 1024 * 1024))
}
