//! Hostile and hand-made clients for the certificate and bad-input tests
//! (issue 7 items 3 and 4).
//!
//! - [`client_tls`] builds a rustls client config the way an attacker or a
//!   misconfigured client might: any trust anchor, any (or no) client
//!   certificate, any protocol versions.
//! - [`channel`] turns such a config into a tonic channel (the same connector
//!   as `trmx_transport::client_channel`), [`exchange_over`] into an
//!   `Exchange` client, so the refused client and its positive control run
//!   the very same code.
//! - [`handshake`] performs a bare TLS handshake plus the HTTP/2 preface and
//!   reports whether the server accepted it, or the TLS alert it refused it
//!   with — so a test can tell *why* a connection was refused.
//! - [`issue_with_usages`] signs a participant certificate with the
//!   federation CA's key directly through rcgen, with extended key usages
//!   that `trmx-certs` never issues (e.g. serverAuth only).
//! - [`RawCodec`] and [`raw_unary`] send arbitrary bytes as the body of a
//!   gRPC request (`/trmx.v1.Exchange/Submit`), bypassing prost encoding.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::{Buf, BufMut};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};
use trmx_certs::CertPaths;
use trmx_proto::pb::exchange_client::ExchangeClient;
use trmx_transport::TlsPaths;

use crate::harness::{Exchange, WAIT};

/// The gRPC path of `Exchange.Submit`.
pub const SUBMIT_PATH: &str = "/trmx.v1.Exchange/Submit";

/// TLS 1.3 only (what every trmx party speaks).
pub const TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
/// TLS 1.2 only (what an old client might speak).
pub const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config trusting only the CA certificate at `ca`,
/// presenting `identity` (certificate and key files) or no client
/// certificate at all, speaking only `versions`, with ALPN `h2`.
pub fn client_tls(
    ca: &Path,
    identity: Option<&CertPaths>,
    versions: &[&'static SupportedProtocolVersion],
) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in trmx_certs::load_certs_pem(ca)? {
        roots.add(cert)?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(paths) => builder.with_client_auth_cert(
            trmx_certs::load_certs_pem(&paths.cert)?,
            trmx_certs::load_key_pem(&paths.key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// [`client_tls`] for TLS files as a node holds them (TLS 1.3 only).
pub fn tls_of(paths: &TlsPaths) -> anyhow::Result<ClientConfig> {
    let identity = CertPaths {
        cert: paths.cert.clone(),
        key: paths.key.clone(),
    };
    client_tls(&paths.ca, Some(&identity), TLS13_ONLY)
}

/// A lazily connecting tonic channel to `addr` over `config`, checking the
/// server certificate for `server_name`.
pub fn channel(
    addr: SocketAddr,
    config: ClientConfig,
    server_name: &str,
) -> anyhow::Result<Channel> {
    let name = ServerName::try_from(server_name.to_owned())
        .with_context(|| format!("server name {server_name:?}"))?;
    let connector = TlsConnector::from(Arc::new(config));
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(WAIT);
    let connect = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let name = name.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}

/// An `Exchange` client over [`channel`].
pub fn exchange_over(
    addr: SocketAddr,
    config: ClientConfig,
    server_name: &str,
) -> anyhow::Result<Exchange> {
    Ok(ExchangeClient::new(channel(addr, config, server_name)?))
}

/// How a bare TLS handshake with a server ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// The handshake completed and the server answered the HTTP/2 preface.
    Accepted,
    /// The server (or our own side) refused the connection.
    Refused {
        /// The TLS alert the server sent, if it sent one.
        alert: Option<AlertDescription>,
        /// The error as the client saw it.
        error: String,
    },
}

/// The client connection preface of HTTP/2 followed by an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Connects to `addr`, performs a TLS handshake with `config` for
/// `server_name`, sends the HTTP/2 preface and waits for the server's first
/// bytes. In TLS 1.3 a server refuses a client certificate only after the
/// client considers the handshake done, so the refusal shows on that read.
pub async fn handshake(
    addr: SocketAddr,
    config: ClientConfig,
    server_name: &str,
) -> anyhow::Result<Handshake> {
    let name = ServerName::try_from(server_name.to_owned())
        .with_context(|| format!("server name {server_name:?}"))?;
    let tcp = TcpStream::connect(addr).await?;
    let attempt = async {
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        tls.write_all(H2_PREFACE).await?;
        tls.flush().await?;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    };
    let outcome = tokio::time::timeout(WAIT, attempt)
        .await
        .context("the TLS handshake neither completed nor failed")?;
    Ok(match outcome {
        Ok(n) if n > 0 => Handshake::Accepted,
        Ok(_) => Handshake::Refused {
            alert: None,
            error: "connection closed without a word".into(),
        },
        Err(e) => Handshake::Refused {
            alert: alert_of(&e),
            error: e.to_string(),
        },
    })
}

/// The TLS alert received, if `error` is one.
fn alert_of(error: &std::io::Error) -> Option<AlertDescription> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// Signs a certificate for participant `id` of `trust_domain` with the CA in
/// `ca_dir` (`ca.pem`, `ca.key`), valid now, with exactly the extended key
/// usages `ekus` (none: no EKU extension at all), and writes it to
/// `<out_prefix>.pem` / `.key`.
pub fn issue_with_usages(
    ca_dir: &Path,
    trust_domain: &str,
    id: &str,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    out_prefix: &Path,
) -> anyhow::Result<CertPaths> {
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key"))?)?;
    let ca_cert = trmx_certs::load_certs_pem(&ca_dir.join("ca.pem"))?
        .into_iter()
        .next()
        .context("no CA certificate")?;
    let issuer = Issuer::from_ca_cert_der(&ca_cert, &ca_key)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, id);
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}/participant/{id}").try_into()?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(24 * 3600)).into();
    let cert = params.signed_by(&key, &issuer)?;

    let paths = CertPaths::from_prefix(out_prefix);
    std::fs::write(&paths.key, key.serialize_pem())?;
    // (a key other users may read is refused)
    std::fs::set_permissions(
        &paths.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    std::fs::write(&paths.cert, cert.pem())?;
    Ok(paths)
}

// ---- raw gRPC --------------------------------------------------------------------

/// A gRPC codec that passes request and response bodies through as bytes,
/// so a test can send what no protobuf encoder would produce.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len).to_vec()))
    }
}

/// Sends `body` as the request message of the unary method at `path`
/// (e.g. [`SUBMIT_PATH`]) and returns the response message's bytes.
pub async fn raw_unary(
    channel: Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    grpc.unary(
        Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(Response::into_inner)
}
