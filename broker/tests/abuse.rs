//! A client with a valid certificate that misuses HTTP/2 and gRPC: what one bad (buggy or
//! hostile) client can do must stay its own problem. The other participants keep being
//! served, the broker's memory stays bounded, nothing is stored, and the abuser gets a
//! clear error or is disconnected.
//!
//! The probes speak HTTP/2 themselves: with the `h2` crate where it sends what a client
//! may send, and in raw frames where it would refuse to.

use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::Code;

use crate::harness::*;

/// A TLS connection to the broker with `id`'s certificate, before any HTTP/2.
async fn tls_to(t: &TestBroker, id: &str) -> anyhow::Result<TlsStream<tokio::net::TcpStream>> {
    let tls = trmx_transport::client_config(&t.pki.participant(id)?)?;
    let name = ServerName::try_from("127.0.0.1")?;
    let tcp = tokio::net::TcpStream::connect(t.addr).await?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await?)
}

/// HTTP/2 frame types and flags the raw probes use (RFC 9113 §6).
mod frame {
    pub(super) const HEADERS: u8 = 0x1;
    pub(super) const SETTINGS: u8 = 0x4;
    pub(super) const GOAWAY: u8 = 0x7;
    pub(super) const WINDOW_UPDATE: u8 = 0x8;
    pub(super) const END_HEADERS: u8 = 0x4;
    /// `GOAWAY`'s error code for a peer that misbehaves (RFC 9113 §7).
    pub(super) const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// The client's connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame: its 9-byte header, then `payload`.
fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes();
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&length[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block for a gRPC request to `path`: literals without indexing or Huffman, so
/// that it needs no encoder state (RFC 7541 §6.2.2).
fn request_headers(path: &str) -> Vec<u8> {
    let mut block = vec![
        0x83, // :method POST (static table 3)
        0x87, // :scheme https (static table 7)
    ];
    let mut literal = |name: &str, value: &str| {
        block.push(0x00);
        for text in [name, value] {
            block.push(u8::try_from(text.len()).unwrap_or(u8::MAX));
            block.extend_from_slice(text.as_bytes());
        }
    };
    literal(":path", path);
    literal(":authority", "127.0.0.1");
    literal("content-type", "application/grpc");
    literal("te", "trailers");
    block
}

/// Reads frames from the server until a `GOAWAY` (its error code) or the end of the
/// connection (`None`); the type of every frame read is counted in `seen`.
async fn until_goaway(
    mut read: impl tokio::io::AsyncRead + Unpin,
    seen: &mut [u64; 256],
) -> anyhow::Result<Option<u32>> {
    let mut header = [0u8; 9];
    loop {
        if let Err(error) = read.read_exact(&mut header).await {
            return match error.kind() {
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => Ok(None),
                _ => Err(error.into()),
            };
        }
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; length];
        read.read_exact(&mut payload).await?;
        seen[usize::from(header[3])] += 1;
        if header[3] == frame::GOAWAY && payload.len() >= 8 {
            return Ok(Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ])));
        }
    }
}

/// A client that makes the broker reset stream after stream (each request followed by a
/// `WINDOW_UPDATE` that overflows its stream's window, a stream error the broker answers
/// with `RST_STREAM`, "MadeYouReset", CVE-2025-8671) is sent away with `GOAWAY
/// ENHANCE_YOUR_CALM`, as hyper does by default after 1024 such resets: tonic 0.14 turned
/// that limit off unless it is configured, so the broker dispatched request after request
/// (each reset stream frees its place in `max_concurrent_streams`) for as long as the
/// client liked. Another participant is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_makes_the_broker_reset_its_streams_is_sent_away() -> anyhow::Result<()> {
    /// More than hyper's default limit (1024) of streams a connection may have reset.
    const STREAMS: u32 = 1500;
    let t = TestBroker::start().await?;
    let (read, mut write) = tokio::io::split(tls_to(&t, "NL-NRM").await?);
    let reader = tokio::spawn(async move {
        let mut seen = [0u64; 256];
        let goaway = until_goaway(read, &mut seen).await;
        (goaway, seen)
    });
    write.write_all(PREFACE).await?;
    write
        .write_all(&raw_frame(frame::SETTINGS, 0, 0, &[]))
        .await?;
    let headers = request_headers("/trmx.v1.Exchange/GetStatus");
    let overflow = 0x7fff_ffffu32.to_be_bytes();
    let mut sent = 0;
    for i in 0..STREAMS {
        let stream = 2 * i + 1;
        let mut burst = raw_frame(frame::HEADERS, frame::END_HEADERS, stream, &headers);
        burst.extend(raw_frame(frame::WINDOW_UPDATE, 0, stream, &overflow));
        if write.write_all(&burst).await.is_err() {
            break; // (the broker closed the connection)
        }
        sent += 1;
    }
    let _ = write.flush().await;
    let (goaway, seen) = tokio::time::timeout(WAIT, reader).await.map_err(|_| {
        anyhow::anyhow!("the connection is still open after {sent} streams the broker reset")
    })??;
    assert_eq!(
        goaway?,
        Some(frame::ENHANCE_YOUR_CALM),
        "GOAWAY's code after {sent} streams ({} RST_STREAM seen)",
        seen[3]
    );

    // the others are served
    let mut be = t.client("BE-PAYOKE")?;
    submit(&mut be, referral("NL-NRM")).await?;
    Ok(())
}

/// An HTTP/2 connection to the broker with `id`'s certificate, through the `h2` crate.
async fn h2_to(
    t: &TestBroker,
    id: &str,
    builder: &h2::client::Builder,
) -> anyhow::Result<h2::client::SendRequest<bytes::Bytes>> {
    let (sender, connection) = builder.handshake(tls_to(t, id).await?).await?;
    tokio::spawn(connection);
    Ok(sender.ready().await?)
}

/// A gRPC request to `path` (no body yet).
fn grpc_request(t: &TestBroker, path: &str) -> anyhow::Result<tonic::codegen::http::Request<()>> {
    Ok(
        tonic::codegen::http::Request::post(format!("https://{}{path}", t.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?,
    )
}

/// The gRPC status code of a response (from its headers when trailers-only, else from its
/// trailers), failing after [`WAIT`].
async fn grpc_code(response: h2::client::ResponseFuture) -> anyhow::Result<tonic::Code> {
    let status = |headers: &tonic::codegen::http::HeaderMap| {
        headers
            .get("grpc-status")
            .and_then(|code| code.to_str().ok()?.parse::<i32>().ok())
            .map(tonic::Code::from_i32)
    };
    tokio::time::timeout(WAIT, async {
        let response = response.await?;
        if let Some(code) = status(response.headers()) {
            return Ok(code); // (trailers only)
        }
        let mut body = response.into_body();
        while let Some(data) = body.data().await {
            let data = data?;
            let _ = body.flow_control().release_capacity(data.len());
        }
        let trailers = body.trailers().await?.unwrap_or_default();
        status(&trailers).ok_or_else(|| anyhow::anyhow!("no grpc-status in {trailers:?}"))
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer within {WAIT:?}"))?
}

/// A gRPC message frame that announces `declared` bytes and carries the first `sent` of
/// them (zeros).
fn partial_message(declared: u32, sent: usize) -> bytes::Bytes {
    let mut framed = Vec::with_capacity(5 + sent);
    framed.push(0); // uncompressed
    framed.extend_from_slice(&declared.to_be_bytes());
    framed.resize(5 + sent, 0);
    framed.into()
}

/// A client that sends most of a large message on stream after stream and never the rest
/// holds no more than `limits.max_incoming_request_bytes_per_identity` of the broker's
/// memory: tonic keeps each message until all of it has come, so without the budget one
/// connection held up to its streams times the largest message (128 × 9 MiB by default)
/// until the request timeout, and an identity 32 such connections. Past the budget a
/// request is answered `RESOURCE_EXHAUSTED` at once; another participant is served, and
/// the budget comes back when the stalled requests go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_stall_mid_message_hold_no_more_than_their_identitys_budget()
-> anyhow::Result<()> {
    const BUDGET: u64 = 2 << 20;
    const STREAMS: usize = 6;
    /// Of a message of 1 MiB (more than the test's envelopes, less than the decoder takes).
    const SENT: usize = 768 << 10;
    let t = TestBroker::start_with(|c| {
        c.limits.max_incoming_request_bytes_per_identity = BUDGET;
    })
    .await?;
    let mut sender = h2_to(&t, "NL-NRM", &h2::client::Builder::new()).await?;
    let mut answers = futures::stream::FuturesUnordered::new();
    let mut bodies = Vec::new();
    for i in 0..STREAMS {
        let (response, mut body) =
            sender.send_request(grpc_request(&t, "/trmx.v1.Exchange/Submit")?, false)?;
        body.send_data(partial_message(1 << 20, SENT), false)?;
        bodies.push(body);
        answers.push(async move { (i, grpc_code(response).await) });
        sender = sender.ready().await?;
    }
    // at most BUDGET / SENT = 2 of them can have all their bytes taken: the others are
    // refused as soon as their next bytes would go past the budget
    let mut refused = Vec::new();
    while refused.len() < STREAMS - 2 {
        let Some((i, code)) = futures::StreamExt::next(&mut answers).await else {
            break;
        };
        let code = code.map_err(|e| anyhow::anyhow!("stream {i}: {e}"))?;
        assert_eq!(code, Code::ResourceExhausted, "stream {i}");
        refused.push(i);
    }
    // the two within the budget still wait for the rest of their message
    let quiet = tokio::time::timeout(QUIET, futures::StreamExt::next(&mut answers)).await;
    assert!(quiet.is_err(), "answered: {quiet:?} (refused {refused:?})");

    // another identity's budget is its own
    let mut be = t.client("BE-PAYOKE")?;
    submit(&mut be, referral("NL-NRM")).await?;
    // the stalled requests go (RST_STREAM): their bytes come back to NL-NRM
    drop((answers, bodies, sender));
    let mut nl = t.client("NL-NRM")?;
    let big = envelope("BE-PAYOKE", trmx_proto::Kind::Referral, &[7u8; 60 << 10]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match submit(&mut nl, big.clone()).await {
            Ok(_) => break,
            Err(status)
                if status.code() == Code::ResourceExhausted
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => anyhow::bail!("NL-NRM's submit after its stalled requests: {status}"),
        }
    }
    Ok(())
}
