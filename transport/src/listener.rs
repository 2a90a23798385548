//! The accept loop ([`incoming`]) and the connection type it yields ([`TlsConn`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::server::{CloseSignal, Registration, ServerTls};

/// Bounds on the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Time a client has from TCP accept to a completed TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections (established or handshaking) beyond which new sockets are closed at once.
    pub max_connections: usize,
    /// TCP keepalive idle time set on accepted sockets; `None` leaves the OS default.
    pub tcp_keepalive: Option<Duration>,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            tcp_keepalive: Some(Duration::from_secs(60)),
        }
    }
}

/// One established, mutually authenticated TLS connection.
///
/// Implements tonic's [`Connected`] with the same connect info as
/// `tokio_rustls::server::TlsStream<TcpStream>`, so `Request::peer_certs()` and
/// [`crate::peer_identity`] work. Once [`ServerTls::reload`] orders it closed, every read
/// and write fails with [`io::ErrorKind::ConnectionAborted`] (a pending read is woken),
/// which makes hyper drop the connection.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    close: Arc<CloseSignal>,
    remote_addr: SocketAddr,
    _registration: Registration,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("remote_addr", &self.remote_addr)
            .field("closed", &self.close.is_closed())
            .finish_non_exhaustive()
    }
}

impl TlsConn {
    /// The peer's socket address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// The verified client certificate chain (leaf first).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.stream.get_ref().1.peer_certificates()
    }

    /// Whether a reload ordered this connection closed.
    pub fn is_closed(&self) -> bool {
        self.close.is_closed()
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "peer certificate no longer verifies",
    )
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.close.read_waker.register(cx.waker());
        if this.close.is_closed() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.close.write_waker.register(cx.waker());
        if this.close.is_closed() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.close.write_waker.register(cx.waker());
        if this.close.is_closed() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.close.write_waker.register(cx.waker());
        if this.close.is_closed() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.close.is_closed() {
            // Nothing more goes to a peer whose certificate no longer verifies.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

impl Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// Accepts TCP connections on `listener` and yields the ones that complete a mutual TLS
/// handshake with the current config of `tls`.
///
/// Handshakes run concurrently as tasks, each bounded by `limits.handshake_timeout`; a
/// failed or timed-out handshake is logged at debug level (peer address and reason) and
/// dropped without delaying the others. When `limits.max_connections` connections are
/// established or handshaking, new sockets are closed at once. The stream ends when
/// `shutdown` resolves (pending handshakes are abandoned) and never yields an `Err`:
/// accept errors are logged and retried after a short pause.
///
/// Must be polled inside a Tokio runtime. Feed it to
/// `tonic::transport::Server::serve_with_incoming_shutdown`.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    limits: ListenerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
    let state = AcceptState {
        listener,
        tls,
        limits,
        slots: Arc::new(Semaphore::new(
            limits.max_connections.min(Semaphore::MAX_PERMITS),
        )),
        handshakes: JoinSet::new(),
        shutdown: Box::pin(shutdown),
    };
    futures::stream::unfold(state, |mut state| async move {
        let conn = state.next().await?;
        Some((Ok(conn), state))
    })
}

struct AcceptState {
    listener: TcpListener,
    tls: ServerTls,
    limits: ListenerLimits,
    slots: Arc<Semaphore>,
    handshakes: JoinSet<Option<TlsConn>>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl AcceptState {
    /// The next established connection, or `None` once shutdown resolved.
    async fn next(&mut self) -> Option<TlsConn> {
        loop {
            tokio::select! {
                biased;
                () = &mut self.shutdown => {
                    self.handshakes.abort_all();
                    return None;
                }
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(conn)) = done {
                        return Some(conn);
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => self.start_handshake(tcp, peer),
                    Err(error) => {
                        tracing::warn!(%error, "tcp accept failed");
                        if !is_per_connection(&error) {
                            // e.g. out of file descriptors: do not spin.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                },
            }
        }
    }

    fn start_handshake(&mut self, tcp: TcpStream, peer: SocketAddr) {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(
                peer = %peer,
                max_connections = self.limits.max_connections,
                "connection limit reached, closing new connection"
            );
            return;
        };
        if let Err(error) = configure_socket(&tcp, self.limits.tcp_keepalive) {
            tracing::debug!(peer = %peer, %error, "cannot set socket options");
        }
        let tls = self.tls.clone();
        let timeout = self.limits.handshake_timeout;
        self.handshakes
            .spawn(handshake(tls, tcp, peer, timeout, permit));
    }
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

fn configure_socket(tcp: &TcpStream, keepalive: Option<Duration>) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    if let Some(idle) = keepalive {
        let params = socket2::TcpKeepalive::new().with_time(idle);
        socket2::SockRef::from(tcp).set_tcp_keepalive(&params)?;
    }
    Ok(())
}

async fn handshake(
    tls: ServerTls,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) -> Option<TlsConn> {
    let loaded = tls.current();
    let acceptor = TlsAcceptor::from(loaded.config.clone());
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(peer = %peer, %error, "tls handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "tls handshake timed out");
            return None;
        }
    };
    let Some(certs) = stream.get_ref().1.peer_certificates() else {
        // Unreachable with a verifier that requires client certificates; refuse anyway.
        tracing::debug!(peer = %peer, "tls handshake without client certificate");
        return None;
    };
    let certs = Arc::new(certs.to_vec());
    let (registration, close) = tls.register(certs, loaded.generation());
    tracing::debug!(peer = %peer, "tls connection established");
    Some(TlsConn {
        stream,
        close,
        remote_addr: peer,
        _registration: registration,
        _permit: permit,
    })
}
