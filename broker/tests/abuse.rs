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
use trmx_proto::pb;

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
    // (GOAWAY, or the connection closed so fast that a TCP reset took the frame with it)
    let goaway = goaway?;
    assert!(
        matches!(goaway, Some(frame::ENHANCE_YOUR_CALM) | None),
        "GOAWAY's code {goaway:?} after {sent} streams ({} RST_STREAM seen)",
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
    // the operator sees the refusals
    let admin = super::metrics::admin_addr(&t)?;
    let refusals = "trmx_requests_refused_request_bytes_total";
    super::metrics::scrape_until(admin, "the refusals in /metrics", |s| {
        s.value(refusals) == refused.len() as f64
    })
    .await?;

    // another identity's budget is its own
    let mut be = t.client("BE-PAYOKE")?;
    submit(&mut be, referral("NL-NRM")).await?;
    // the stalled requests go (RST_STREAM): their bytes come back to NL-NRM
    drop((answers, bodies, sender));
    let mut nl = t.client("NL-NRM")?;
    let big = envelope("BE-PAYOKE", trmx_proto::Kind::Referral, &[7u8; 60 << 10]);
    accepted_once_the_stalled_bytes_are_back(&mut nl, big).await
}

/// Submits `envelope` as NL-NRM until the broker takes it: its stalled requests were
/// just dropped, and their bytes come back to its budget once the broker has seen
/// their streams reset (within [`WAIT`]).
async fn accepted_once_the_stalled_bytes_are_back(
    nl: &mut Client,
    envelope: pb::Envelope,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match submit(nl, envelope.clone()).await {
            Ok(_) => return Ok(()),
            Err(status)
                if status.code() == Code::ResourceExhausted
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => anyhow::bail!("NL-NRM's submit after its stalled requests: {status}"),
        }
    }
}

/// `message` as the body of a unary gRPC request: uncompressed, its length, its bytes.
fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut framed = partial_message(u32::try_from(message.len()).unwrap_or(u32::MAX), 0).to_vec();
    framed.extend_from_slice(message);
    framed
}

/// A gRPC request the decoder cannot take gets a code that says why, at once, and stores
/// nothing: a length prefix of 4 GiB, a compressed message without compression, an
/// encoding the broker does not speak, bytes that are no protobuf, a method it does not
/// have. Headers past HTTP/2's header list limit close the connection. Another
/// participant is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_gets_a_clear_code_and_stores_nothing() -> anyhow::Result<()> {
    use prost::Message as _;
    let t = TestBroker::start().await?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    let valid = grpc_message(
        &pb::SubmitRequest {
            envelope: Some(env),
        }
        .encode_to_vec(),
    );
    let mut compressed = valid.clone();
    compressed[0] = 1;
    let mut four_gib = vec![0u8, 0xff, 0xff, 0xff, 0xff];
    four_gib.resize(1024, 0);
    let submit_path = "/trmx.v1.Exchange/Submit";
    /// What is sent, to which method, with which `grpc-encoding`, and the code it gets.
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        Vec<u8>,
        Code,
    );
    let cases: [Case; 5] = [
        (
            "4 GiB length prefix",
            submit_path,
            None,
            four_gib,
            Code::OutOfRange,
        ),
        (
            "compressed, no grpc-encoding",
            submit_path,
            None,
            compressed.clone(),
            Code::Internal,
        ),
        (
            "grpc-encoding gzip",
            submit_path,
            Some("gzip"),
            compressed,
            Code::Unimplemented,
        ),
        (
            "no protobuf",
            submit_path,
            None,
            grpc_message(&[0xff; 8]),
            Code::InvalidArgument,
        ),
        (
            "unknown method",
            "/trmx.v1.Exchange/Publish",
            None,
            valid,
            Code::Unimplemented,
        ),
    ];
    let mut sender = h2_to(&t, "NL-NRM", &h2::client::Builder::new()).await?;
    for (what, path, encoding, body, code) in cases {
        let mut request = grpc_request(&t, path)?;
        if let Some(encoding) = encoding {
            request
                .headers_mut()
                .insert("grpc-encoding", encoding.parse()?);
        }
        let (response, mut stream) = sender.send_request(request, false)?;
        // (the broker may answer on the headers alone, an unknown method at once, and
        // end the stream before its body is sent: "inactive stream"; the answer counts)
        let _ = stream.send_data(body.into(), true);
        assert_eq!(grpc_code(response).await?, code, "{what}");
        sender = sender.ready().await?;
    }
    let mut request = grpc_request(&t, submit_path)?;
    request
        .headers_mut()
        .insert("x-padding", "a".repeat(64 << 10).parse()?);
    let refused = match sender.send_request(request, true) {
        Ok((response, _)) => tokio::time::timeout(WAIT, response).await?.err(),
        Err(error) => Some(error),
    };
    assert!(
        refused
            .as_ref()
            .is_some_and(|e| e.is_go_away() || e.is_io()),
        "64 KiB of headers: {refused:?}"
    );

    let mut nl = t.client("NL-NRM")?;
    assert_code(
        status(&mut nl, &id).await,
        Code::NotFound,
        "the envelope sent compressed",
    );
    let mut be = t.client("BE-PAYOKE")?;
    submit(&mut be, referral("NL-NRM")).await?;
    Ok(())
}

/// HTTP/2 rapid reset (CVE-2023-44487): a client that opens stream after stream and
/// cancels each at once is sent away (`GOAWAY`) long before it has made the broker start
/// thousands of requests, and another participant is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cancels_every_stream_at_once_is_sent_away() -> anyhow::Result<()> {
    const STREAMS: usize = 10_000;
    let t = TestBroker::start().await?;
    let mut sender = h2_to(&t, "NL-NRM", &h2::client::Builder::new()).await?;
    let mut cancelled = 0;
    let error = loop {
        anyhow::ensure!(
            cancelled < STREAMS,
            "still open after {STREAMS} cancelled streams"
        );
        let request = grpc_request(&t, "/trmx.v1.Exchange/GetInfo")?;
        match sender.send_request(request, false) {
            // (dropping both halves sends RST_STREAM)
            Ok(stream) => drop(stream),
            Err(error) => break error,
        }
        cancelled += 1;
        sender = match tokio::time::timeout(WAIT, sender.ready()).await? {
            Ok(sender) => sender,
            Err(error) => break error,
        };
    };
    // (the broker closes the connection right after its GOAWAY: the client may meet the
    // closed socket before it reads the frame)
    assert!(
        error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || error.is_io(),
        "after {cancelled} cancelled streams: {error:?}"
    );
    let mut be = t.client("BE-PAYOKE")?;
    submit(&mut be, referral("NL-NRM")).await?;
    Ok(())
}

/// A recipient whose connection never lets the broker send (its HTTP/2 window is zero)
/// holds only what its `Receive` stream leased: the participant's other stream gets every
/// other message, and when the stuck connection is cut its deliveries come back (after the
/// backoff, as for any closed stream) to the stream that reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_connection_that_never_reads_holds_only_its_leases() -> anyhow::Result<()> {
    use prost::Message as _;
    let t = TestBroker::start().await?;
    let mut nl = t.client("NL-NRM")?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let env = referral("BE-PAYOKE");
        ids.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }

    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tls_to(&t, "BE-PAYOKE").await?)
        .await?;
    let stuck = tokio::spawn(connection);
    let mut sender = sender.ready().await?;
    let (response, mut body) =
        sender.send_request(grpc_request(&t, "/trmx.v1.Exchange/Receive")?, false)?;
    let request = pb::ReceiveRequest { max_in_flight: 2 }.encode_to_vec();
    let mut framed = partial_message(u32::try_from(request.len())?, 0).to_vec();
    framed.extend_from_slice(&request);
    body.send_data(framed.into(), true)?;
    let response = tokio::time::timeout(WAIT, response).await??;
    assert_eq!(response.status(), 200);

    // the stuck stream leases two, which wait there unsent
    let in_flight = |states: &[pb::MessageState]| {
        states
            .iter()
            .filter(|s| **s == pb::MessageState::InFlight)
            .count()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut states = Vec::new();
        for id in &ids {
            states.push(state_of(&mut nl, id).await?);
        }
        if in_flight(&states) == 2 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the stuck stream leased {} messages: {states:?}",
            in_flight(&states)
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // the participant's stream that reads gets the two others, and nothing more
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 8).await?;
    let mut read = vec![
        id_of(&next(&mut stream).await?),
        id_of(&next(&mut stream).await?),
    ];
    expect_quiet(&mut stream).await?;
    assert_eq!(ack(&mut be, &read).await?, [pb::AckResult::Acknowledged; 2]);

    // the stuck connection is cut: its two come back after the backoff
    stuck.abort();
    drop((response, body, sender));
    let _ = stuck.await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while read.len() < 4 {
        t.advance(std::time::Duration::from_secs(1));
        match tokio::time::timeout(QUIET, stream.message()).await {
            Ok(delivery) => {
                let delivery = delivery?.ok_or_else(|| anyhow::anyhow!("stream ended"))?;
                assert_eq!(delivery.attempt, 2, "a delivery the stuck stream held");
                read.push(id_of(&delivery));
            }
            Err(_) => anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the stuck stream's deliveries did not come back"
            ),
        }
    }
    read.sort();
    ids.sort();
    assert_eq!(read, ids);
    Ok(())
}

/// A header block without end, in empty `CONTINUATION` frames (RUSTSEC-2024-0332): the
/// broker sends the client away instead of reading frames for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_that_never_ends_is_sent_away() -> anyhow::Result<()> {
    const CONTINUATION: u8 = 0x9;
    let t = TestBroker::start().await?;
    let (read, mut write) = tokio::io::split(tls_to(&t, "NL-NRM").await?);
    let reader = tokio::spawn(async move { until_goaway(read, &mut [0; 256]).await });
    write.write_all(PREFACE).await?;
    write
        .write_all(&raw_frame(frame::SETTINGS, 0, 0, &[]))
        .await?;
    let headers = request_headers("/trmx.v1.Exchange/GetStatus");
    write
        .write_all(&raw_frame(frame::HEADERS, 0, 1, &headers))
        .await?;
    let burst = raw_frame(CONTINUATION, 0, 1, &[]).repeat(1000);
    for _ in 0..1000 {
        if reader.is_finished() || write.write_all(&burst).await.is_err() {
            break;
        }
    }
    let goaway = tokio::time::timeout(WAIT, reader)
        .await
        .map_err(|_| anyhow::anyhow!("the connection is still open"))???;
    // (GOAWAY, or the connection closed so fast that a TCP reset took the frame with it)
    assert!(
        matches!(goaway, Some(frame::ENHANCE_YOUR_CALM) | None),
        "GOAWAY's code {goaway:?}"
    );
    Ok(())
}

/// A node's submit refused mid-body by its identity's request-bytes budget gets
/// `RESOURCE_EXHAUSTED` through tonic's own client (a code the node retries, not a
/// transport error), and its connection stays up: more refusals than
/// `LOCAL_ERROR_RESET_STREAMS` on one connection, each leaving a request body unread, do
/// not get it sent away, and the same client is served once the budget is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_refused_mid_body_gets_resource_exhausted_and_keeps_its_connection()
-> anyhow::Result<()> {
    const BUDGET: u64 = 2 << 20;
    /// More than the broker's `LOCAL_ERROR_RESET_STREAMS` (1024).
    const REFUSALS: usize = 1100;
    let t = TestBroker::start_with(|c| {
        c.limits.max_incoming_request_bytes_per_identity = BUDGET;
    })
    .await?;
    // two stalled requests of NL-NRM hold all but 48 KiB of its budget
    let mut sender = h2_to(&t, "NL-NRM", &h2::client::Builder::new()).await?;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let (response, mut body) =
            sender.send_request(grpc_request(&t, "/trmx.v1.Exchange/Submit")?, false)?;
        body.send_data(partial_message(1 << 20, 1000 << 10), false)?;
        stalled.push((response, body));
        sender = sender.ready().await?;
    }
    let mut nl = t.client("NL-NRM")?;
    let big = envelope("BE-PAYOKE", trmx_proto::Kind::Referral, &[7u8; 60 << 10]);
    // (their bytes are held once the broker has read them: until then a submit fits)
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match submit(&mut nl, big.clone()).await {
            Err(status) if status.code() == Code::ResourceExhausted => break,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => anyhow::bail!("submit beside the stalled requests: {other:?}"),
        }
    }
    for i in 0..REFUSALS {
        match submit(&mut nl, big.clone()).await {
            Err(status) if status.code() == Code::ResourceExhausted => {}
            other => anyhow::bail!("submit {i} past the budget: {other:?}"),
        }
    }
    drop((stalled, sender));
    accepted_once_the_stalled_bytes_are_back(&mut nl, big).await
}

/// `Ack` requests of 1,024 made-up ids each, the most one may carry.
fn made_up_ack() -> pb::AckRequest {
    pb::AckRequest {
        message_ids: (0..1024)
            .map(|_| trmx_proto::MessageId::new_v7().to_string())
            .collect(),
    }
}

/// What a flood of `Ack`s got: answered, and refused `RESOURCE_EXHAUSTED`.
#[derive(Debug, Default)]
struct Flooded {
    answered: usize,
    refused: usize,
}

/// Sends `concurrent` `Ack`s of 1,024 made-up ids at once on `client`'s connection,
/// each again as soon as it is answered, until `stop` is set (at least one round each).
/// `answers` counts the answers and refusals as they come.
async fn flood_acks(
    client: &Client,
    concurrent: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    answers: Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<Flooded> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrent {
        let (mut client, stop, answers) = (client.clone(), stop.clone(), answers.clone());
        tasks.spawn(async move {
            let mut flooded = Flooded::default();
            // (made once: the flooder's own work runs on the test's runtime, beside the
            // broker's)
            let request = made_up_ack();
            loop {
                match client.ack(request.clone()).await {
                    Ok(response) => {
                        let results = response.into_inner().results;
                        anyhow::ensure!(
                            results
                                .iter()
                                .all(|r| r.result == pb::AckResult::NotFound as i32),
                            "a made-up id was acknowledged"
                        );
                        flooded.answered += 1;
                    }
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        anyhow::ensure!(
                            status.message().contains("limits.max_"),
                            "the refusal names no setting: {status}"
                        );
                        flooded.refused += 1;
                    }
                    Err(status) => anyhow::bail!("flooding ack: {status}"),
                }
                answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if *stop.borrow() {
                    return Ok(flooded);
                }
            }
        });
    }
    let mut total = Flooded::default();
    while let Some(done) = tasks.join_next().await {
        let done = done??;
        total.answered += done.answered;
        total.refused += done.refused;
    }
    Ok(total)
}

/// A participant that sends many `Ack`s at once (64 of 1,024 made-up ids each, again and
/// again) has at most `limits.max_concurrent_requests_per_participant` of its requests,
/// and `limits.max_ack_ids_in_progress_per_participant` of their ids, on the store at
/// once: the rest are refused `RESOURCE_EXHAUSTED` (counted in `/metrics`). Without the
/// limit they all went to the store's one writer, ahead of every other participant's
/// work. Another participant is served meanwhile, and the flooder's real ack goes
/// through once its flood ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_acks_is_held_to_its_participants_share() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|c| {
        c.limits.max_concurrent_requests_per_participant = 2;
        c.limits.max_ack_ids_in_progress_per_participant = 1024;
        // (refused at once: what is counted does not depend on how fast the host is)
        c.limits.refusal_delay = std::time::Duration::ZERO;
    })
    .await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut nl = t.client("NL-NRM")?;
    // NL-NRM has a real delivery in hand before it floods
    let real = submit(&mut be, referral("NL-NRM")).await?;
    let mut deliveries = receive(&mut nl, 8).await?;
    let delivery = next(&mut deliveries).await?;
    assert_eq!(id_of(&delivery), real.message_id);

    let flooder = t.client("NL-NRM")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let answers = Arc::default();
    let flood = tokio::spawn(async move { flood_acks(&flooder, 64, stopped, answers).await });
    // another participant's submits and reads are served during the flood
    let mut during = Vec::new();
    for _ in 0..5 {
        let receipt = submit(&mut be, referral("NL-NRM")).await?;
        status(&mut be, &receipt.message_id).await?;
        during.push(receipt.message_id);
    }
    stop.send(true)?;
    let flooded = flood.await??;
    eprintln!("flood of acks: {flooded:?}");
    assert!(flooded.refused > 0, "nothing refused: {flooded:?}");

    // the operator sees each refusal, under its method
    let admin = super::metrics::admin_addr(&t)?;
    super::metrics::scrape_until(admin, "the refused acks in /metrics", |s| {
        s.value("trmx_requests_refused_in_progress_total{method=\"ack\"}") == flooded.refused as f64
    })
    .await?;
    // once the flood is over, NL-NRM's own work goes through: its ack, its stream
    assert_eq!(
        ack(&mut nl, [&real.message_id]).await?,
        vec![pb::AckResult::Acknowledged]
    );
    for id in &during {
        let delivery = next(&mut deliveries).await?;
        assert_eq!(&id_of(&delivery), id);
        assert_eq!(ack(&mut nl, [id]).await?, vec![pb::AckResult::Acknowledged]);
    }
    assert_eq!(
        state_of(&mut be, &real.message_id).await?,
        pb::MessageState::Acknowledged
    );
    Ok(())
}

/// The median of `samples` (sorted in place).
fn median(samples: &mut [std::time::Duration]) -> std::time::Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// Another participant's submit latency, alone and while NL-NRM floods 64 `Ack`s of
/// 1,024 made-up ids at once, on a broker with `adjust`ed limits: the medians alone and
/// during the flood, and what the flood got.
async fn submit_latency_under_an_ack_flood(
    adjust: impl FnOnce(&mut trmx_broker::config::BrokerConfig),
) -> anyhow::Result<(std::time::Duration, std::time::Duration, Flooded)> {
    const SUBMITS: usize = 40;
    let t = TestBroker::start_with(adjust).await?;
    let mut be = t.client("BE-PAYOKE")?;
    let timed = async |be: &mut Client| -> anyhow::Result<Vec<std::time::Duration>> {
        let mut took = Vec::with_capacity(SUBMITS);
        for _ in 0..SUBMITS {
            let started = std::time::Instant::now();
            submit(be, referral("NL-NRM")).await?;
            took.push(started.elapsed());
        }
        Ok(took)
    };
    let alone = median(&mut timed(&mut be).await?);
    let flooder = t.client("NL-NRM")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood = tokio::spawn({
        let answers = answers.clone();
        async move { flood_acks(&flooder, 64, stopped, answers).await }
    });
    // (measured once the flood is under way: each of its 64 acks answered or refused)
    while answers.load(std::sync::atomic::Ordering::Relaxed) < 64 {
        anyhow::ensure!(!flood.is_finished(), "the flood ended early");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let during = median(&mut timed(&mut be).await?);
    stop.send(true)?;
    let flooded = flood.await??;
    Ok((alone, during, flooded))
}

/// Measures what the limits are for: another participant's submit latency while one
/// participant floods acks, with the limits at their defaults and at their largest
/// (nearly none). Prints the figures; asserts only that every submit was answered (the
/// host is noisy: timing goals live in the benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_participants_submits_during_an_ack_flood_measured() -> anyhow::Result<()> {
    let (alone, during, flooded) = submit_latency_under_an_ack_flood(|c| {
        c.limits.max_concurrent_requests_per_participant = 1024;
        c.limits.max_ack_ids_in_progress_per_participant = 1 << 20;
    })
    .await?;
    eprintln!(
        "limits at their largest: BE-PAYOKE submit median {alone:?} alone, {during:?} during \
         NL-NRM's flood of acks ({flooded:?})"
    );
    let (alone, during, flooded) = submit_latency_under_an_ack_flood(|_| {}).await?;
    eprintln!(
        "limits at their defaults: BE-PAYOKE submit median {alone:?} alone, {during:?} during \
         NL-NRM's flood of acks ({flooded:?})"
    );
    Ok(())
}

/// One `Exchange` request of NL-NRM of kind `n % 6`, about made-up ids (a `Receive` stream
/// is opened and read from until the caller drops it).
async fn some_request(mut client: Client, n: usize) {
    let made_up = || trmx_proto::MessageId::new_v7().to_string();
    // (answers do not matter: the request is cancelled at a random point)
    let _ = match n % 6 {
        0 => client.ack(made_up_ack()).await.map(drop),
        1 => client
            .get_status(pb::GetStatusRequest {
                message_id: made_up(),
            })
            .await
            .map(drop),
        2 => client
            .withdraw(pb::WithdrawRequest {
                message_id: made_up(),
            })
            .await
            .map(drop),
        3 => client
            .reject(pb::RejectRequest {
                message_id: made_up(),
                reason_code: "INVALID_ENVELOPE".into(),
                field_path: String::new(),
            })
            .await
            .map(drop),
        4 => client.get_info(pb::GetInfoRequest {}).await.map(drop),
        _ => match client
            .receive(pb::ReceiveRequest { max_in_flight: 8 })
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Ok(Some(_)) = stream.message().await {}
                Ok(())
            }
            Err(status) => Err(status),
        },
    };
}

/// Requests of every kind cancelled by their client at random points (waiting for a
/// slot, on the store, a `Receive` stream before or after its first lease) give back
/// their request slot and their ack ids: with two slots and 1,024 ack ids for NL-NRM (so
/// that an `Ack` also waits for ids, holding its slot), after hundreds of them it is still
/// served every kind of request, and none of the cancelled ones was counted as refused.
/// Slots left behind would lock NL-NRM out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cancelled_at_random_points_leave_no_request_slot_behind() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|c| {
        c.limits.max_concurrent_requests_per_participant = 2;
        c.limits.max_ack_ids_in_progress_per_participant = 1024;
        // (longer than any cancelled request's work can take: a slot still held after
        // the storm is one left behind, not one still in use)
        c.limits.refusal_delay = std::time::Duration::from_secs(5);
    })
    .await?;
    let mut be = t.client("BE-PAYOKE")?;
    // something to lease, so that some streams are cancelled after their first lease
    for _ in 0..4 {
        submit(&mut be, referral("NL-NRM")).await?;
    }
    let nl = t.client("NL-NRM")?;
    // (a fixed pseudo-random sequence: the same storm on every run)
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move |below: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % below
    };
    for _wave in 0..20 {
        let mut wave = tokio::task::JoinSet::new();
        for n in 0..24 {
            let cancel_after = std::time::Duration::from_micros(random(30_000));
            // (half of them Acks, which also wait for ids)
            let kind = match random(2) {
                0 => 0,
                _ => usize::try_from(random(6))? + n,
            };
            let client = nl.clone();
            wave.spawn(async move {
                let _ = tokio::time::timeout(cancel_after, some_request(client, kind)).await;
            });
        }
        while let Some(done) = wave.join_next().await {
            done?;
        }
    }

    // every kind is served (slots left behind: refused after refusal_delay; a whole Ack
    // needs every id)
    let mut nl = t.client("NL-NRM")?;
    let info = nl.get_info(pb::GetInfoRequest {}).await?.into_inner();
    assert_eq!(info.caller, "NL-NRM");
    let unknown = trmx_proto::MessageId::new_v7().to_string();
    let status = status(&mut nl, &unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status}");
    let answer = nl.ack(made_up_ack()).await?.into_inner();
    assert_eq!(answer.results.len(), 1024);
    let withdrawn = nl
        .withdraw(pb::WithdrawRequest {
            message_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(withdrawn.code(), Code::NotFound, "{withdrawn}");
    let rejected = nl
        .reject(pb::RejectRequest {
            message_id: unknown,
            reason_code: "INVALID_ENVELOPE".into(),
            field_path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(rejected.code(), Code::NotFound, "{rejected}");
    // and a stream gets a new message, whose ack goes through (once the cancelled
    // streams are closed: max_streams_per_participant counts them until then)
    let mut tries = 0;
    let mut deliveries = loop {
        tries += 1;
        match nl.receive(pb::ReceiveRequest { max_in_flight: 64 }).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.message().contains("open Receive streams") && tries < 500 => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => anyhow::bail!("receive after the storm: {status}"),
        }
    };
    let fresh = submit(&mut be, referral("NL-NRM")).await?;
    loop {
        let delivery = next(&mut deliveries).await?;
        let id = id_of(&delivery);
        assert_eq!(
            ack(&mut nl, [&id]).await?,
            vec![pb::AckResult::Acknowledged]
        );
        if id == fresh.message_id {
            break;
        }
    }
    // a cancelled request is not a refused one
    let admin = super::metrics::admin_addr(&t)?;
    let scrape = super::metrics::scrape_until(admin, "a scrape", |_| true).await?;
    for method in [
        "receive",
        "ack",
        "reject",
        "withdraw",
        "get_status",
        "get_info",
    ] {
        assert_eq!(
            scrape.value(&format!(
                "trmx_requests_refused_in_progress_total{{method=\"{method}\"}}"
            )),
            0.0,
            "{method}"
        );
    }
    Ok(())
}

/// One call of a node, `what` (0: an `Ack` of one id, as its receive loop makes; 1: a
/// `GetStatus`, as its outbox check; 2: a `Withdraw`; 3: a `GetInfo`, as it connects or
/// proves a new certificate), about made-up ids: whether the broker refused it
/// `RESOURCE_EXHAUSTED`. Any other failure is the test's.
async fn node_call(client: &mut Client, what: usize) -> anyhow::Result<bool> {
    let made_up = || trmx_proto::MessageId::new_v7().to_string();
    let answer = match what {
        0 => client
            .ack(pb::AckRequest {
                message_ids: vec![made_up()],
            })
            .await
            .map(drop),
        1 => client
            .get_status(pb::GetStatusRequest {
                message_id: made_up(),
            })
            .await
            .map(drop),
        2 => client
            .withdraw(pb::WithdrawRequest {
                message_id: made_up(),
            })
            .await
            .map(drop),
        _ => client.get_info(pb::GetInfoRequest {}).await.map(drop),
    };
    match answer {
        Ok(()) => Ok(false),
        Err(status) if status.code() == Code::NotFound => Ok(false),
        Err(status) if status.code() == Code::ResourceExhausted => Ok(true),
        Err(status) => anyhow::bail!("node call {what}: {status}"),
    }
}

/// A participant may run `limits.max_streams_per_participant` nodes (each with its
/// `Receive` stream). A node makes up to four `Exchange` calls other than `Submit` at once:
/// its receive loop's ack or reject, its outbox check's `GetStatus`, a withdrawal (one at a
/// time), and a `GetInfo` (when it connects, proves a new certificate or looks up a
/// recipient). With the broker's defaults, that many nodes each making all four at full
/// speed are never refused, even with `limits.refusal_delay = "0s"` (a request past the
/// limit refused at once, however fast the host). With the limit at 16 for 8 nodes
/// (32 calls at once) they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participants_nodes_at_full_speed_are_never_refused() -> anyhow::Result<()> {
    const ROUNDS: usize = 40;
    let defaults = trmx_broker::config::LimitsConfig::default();
    let nodes = defaults.max_streams_per_participant;
    let t = TestBroker::start_with(|c| {
        c.limits.max_streams_per_participant = defaults.max_streams_per_participant;
        c.limits.max_concurrent_requests_per_participant =
            defaults.max_concurrent_requests_per_participant;
        c.limits.max_ack_ids_in_progress_per_participant =
            defaults.max_ack_ids_in_progress_per_participant;
        c.limits.refusal_delay = std::time::Duration::ZERO;
    })
    .await?;
    let mut be = t.client("BE-PAYOKE")?;
    // each node on its own connection with its stream open, past its first lease (a
    // delivery in hand, unacknowledged, so that the next goes to the next stream)
    let mut streams = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..nodes {
        let mut node = t.client("NL-NRM")?;
        let mut deliveries = receive(&mut node, 1).await?;
        let sent = submit(&mut be, referral("NL-NRM")).await?;
        assert_eq!(id_of(&next(&mut deliveries).await?), sent.message_id);
        streams.push(deliveries);
        clients.push(node);
    }
    let mut calls = tokio::task::JoinSet::new();
    for node in &clients {
        for what in 0..4 {
            let mut client = node.clone();
            calls.spawn(async move {
                let mut refused = 0;
                for _ in 0..ROUNDS {
                    refused += usize::from(node_call(&mut client, what).await?);
                }
                anyhow::Ok(refused)
            });
        }
    }
    let mut refused = 0;
    while let Some(done) = calls.join_next().await {
        refused += done??;
    }
    assert_eq!(
        refused,
        0,
        "{refused} of {} calls of {nodes} nodes refused",
        nodes * 4 * ROUNDS
    );
    drop(streams);
    Ok(())
}

/// A sender that acks the ids of its own large messages in flight to their recipient
/// (it knows them), and a third participant that names them too, get `NOT_FOUND` for
/// each and change nothing: the store no longer reads those messages whole, all at once,
/// in the ack's transaction. The recipient's own ack then applies to every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_anothers_large_messages_is_not_found_and_changes_nothing() -> anyhow::Result<()>
{
    const LARGE: usize = 1 << 20;
    let t = TestBroker::start_with(|c| c.limits.max_envelope_bytes = 2 * LARGE as u64).await?;
    let mut nl = t.client("NL-NRM")?;
    let mut ids = Vec::new();
    for n in 0..4u8 {
        let env = envelope("BE-PAYOKE", trmx_proto::Kind::Referral, &vec![n; LARGE]);
        ids.push(env.message_id.clone());
        submit(&mut nl, env).await?;
    }
    let mut be = t.client("BE-PAYOKE")?;
    let mut stream = receive(&mut be, 8).await?;
    let mut delivered = Vec::new();
    for _ in 0..ids.len() {
        delivered.push(id_of(&next(&mut stream).await?));
    }
    delivered.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(delivered, sorted);

    let mut iom = t.client("INT-IOM")?;
    for client in [&mut nl, &mut iom] {
        assert_eq!(
            ack(client, &ids).await?,
            vec![pb::AckResult::NotFound; ids.len()]
        );
    }
    for id in &ids {
        assert_eq!(state_of(&mut nl, id).await?, pb::MessageState::InFlight);
    }
    assert_eq!(
        ack(&mut be, &ids).await?,
        vec![pb::AckResult::Acknowledged; ids.len()]
    );
    for id in &ids {
        assert_eq!(state_of(&mut nl, id).await?, pb::MessageState::Acknowledged);
    }
    Ok(())
}
