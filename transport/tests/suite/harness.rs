//! Shared set-up: a federation, a server on 127.0.0.1:0, raw and tonic clients.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::ServerName;
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tonic_health::pb::health_client::HealthClient;
use trmx_certs::{CertPaths, Federation, Identity};
use trmx_transport::{
    ClientOptions, CrlPolicy, ListenerLimits, ServerTls, TlsPaths, client_channel, peer_identity,
};

pub(crate) const TRUST_DOMAIN: &str = "trm.test";

/// A federation in a temp dir with a broker certificate and a CRL.
pub(crate) struct Fixture {
    pub(crate) dir: TempDir,
    pub(crate) fed: Federation,
    pub(crate) broker: CertPaths,
}

impl Fixture {
    pub(crate) fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let fed = Federation::create(dir.path(), TRUST_DOMAIN).unwrap();
        let broker = fed.broker("main").unwrap();
        Fixture { dir, fed, broker }
    }

    pub(crate) fn paths(&self, cert: &CertPaths) -> TlsPaths {
        TlsPaths {
            ca: self.fed.ca_cert_path(),
            cert: cert.cert.clone(),
            key: cert.key.clone(),
        }
    }

    pub(crate) fn crl(&self) -> PathBuf {
        self.fed.crl_path()
    }

    pub(crate) fn server_tls(&self, policy: CrlPolicy) -> ServerTls {
        ServerTls::load(&self.paths(&self.broker), Some(&self.crl()), policy).unwrap()
    }
}

/// A running health server.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: ServerTls,
    pub(crate) seen: Arc<Mutex<Vec<Identity>>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) async fn start(tls: ServerTls, limits: ListenerLimits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let interceptor = move |req: tonic::Request<()>| {
            let identity = peer_identity(&req)?;
            record.lock().unwrap().push(identity);
            Ok(req)
        };
        let incoming = trmx_transport::incoming(listener, tls.clone(), limits, async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move {
            // keep the reporter alive so Watch streams stay open
            let _reporter = _reporter;
            tonic::transport::Server::builder()
                .layer(tonic::service::InterceptorLayer::new(interceptor))
                .add_service(health)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        Server {
            addr,
            tls,
            seen,
            shutdown: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("server stops after shutdown")
                .unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub(crate) fn health(
    addr: SocketAddr,
    paths: &TlsPaths,
) -> HealthClient<tonic::transport::Channel> {
    let channel = client_channel(&addr.to_string(), paths, &ClientOptions::default()).unwrap();
    HealthClient::new(channel)
}

pub(crate) fn check_request() -> tonic_health::pb::HealthCheckRequest {
    tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }
}

/// Whether a raw TLS client with `config` gets a working connection: the handshake
/// completes and the server speaks first (its HTTP/2 SETTINGS frame). In TLS 1.3 a
/// refused client certificate shows up as an alert on the first read, not in `connect`.
pub(crate) async fn raw_accepted(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> anyhow::Result<bool> {
    raw_accepted_from(IpAddr::V4(Ipv4Addr::LOCALHOST), addr, config).await
}

/// [`raw_accepted`] from a chosen loopback source address (Linux routes all of 127/8 to
/// `lo`, so 127.0.0.2 is a second client host).
pub(crate) async fn raw_accepted_from(
    source: IpAddr,
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> anyhow::Result<bool> {
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = connect_from(source, addr).await?;
    let name = ServerName::try_from("localhost")?;
    let mut tls = match connector.connect(name, tcp).await {
        Ok(tls) => tls,
        Err(_) => return Ok(false),
    };
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .context("server neither spoke nor closed within 5 s")?;
    Ok(matches!(read, Ok(n) if n > 0))
}

/// A TCP connection to `addr` from `source` (an IPv4 loopback address).
pub(crate) async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Whether the server closes `tcp` (a client that sent nothing) within `within`.
pub(crate) async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 8];
    match tokio::time::timeout(within, tcp.read(&mut buf)).await {
        Ok(read) => matches!(read, Ok(0) | Err(_)),
        Err(_) => false,
    }
}

/// The failed handshakes `tls` counted for `reason`.
pub(crate) fn failures(tls: &ServerTls, reason: trmx_transport::HandshakeFailure) -> u64 {
    tls.handshake_failures()
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

/// Polls `cond` until it holds or `within` passes.
pub(crate) async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A call refused at the TLS layer. With TLS 1.3 the client's handshake completes before
/// the server checks the client certificate, so the server's alert arrives as a transport
/// error on the first read: tonic reports it as `UNKNOWN` ("transport error") rather than
/// `UNAVAILABLE`.
pub(crate) fn assert_refused(status: &tonic::Status) {
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        ),
        "{status:?}"
    );
}
