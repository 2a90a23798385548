//! The accept loop ([`incoming`]) and the connection type it yields ([`TlsConn`]).
//!
//! # Admission
//! A socket is unauthenticated until its TLS handshake completes, and anyone who can reach
//! the port can open one, so pending handshakes and established connections are budgeted
//! apart: handshakes can never take the slots of authenticated connections.
//!
//! 1. On accept, the socket needs a place in the handshake budget:
//!    [`ListenerLimits::max_handshakes`] in progress at once, and at most
//!    [`ListenerLimits::max_handshakes_per_ip`] of them from one source (an IPv4 address or
//!    an IPv6 /64, so one host cannot take the whole budget). A source at its cap has its
//!    new socket closed at once.
//! 2. When the budget is full, the oldest pending handshake is closed to make room if it
//!    has been pending for [`ListenerLimits::handshake_eviction_age`] (a real client
//!    finishes well within it); otherwise the new socket is closed. Holding the budget then
//!    takes opening handshakes from many sources faster than that age, not once per
//!    [`ListenerLimits::handshake_timeout`].
//! 3. A completed mutual handshake takes one of [`ListenerLimits::max_connections_per_identity`]
//!    places of its certificate's identity (`participant NL-NRM`, `operator alice`; the
//!    subject for a certificate without one), then one of [`ListenerLimits::max_connections`]
//!    slots, both held until the connection is dropped; with either full it is closed at
//!    once. So one node that leaks channels, or one stolen certificate, cannot take every
//!    slot and shut the other participants out: it only shuts out itself.
//! 4. An established connection has [`ListenerLimits::handshake_timeout`] again to send the
//!    HTTP/2 connection preface; one that sends nothing is closed, so that it does not hold
//!    its places for ever (hyper's keepalive only starts after the preface).
//!
//! Every refusal and eviction is reported as a `warn` line (reason, peer address, the
//! identity once known, the limit, and how many there were since the previous line for that
//! reason), at most one line per reason every ten seconds, so a flood of sockets cannot
//! flood the log.
//!
//! # Failed handshakes
//! Each is counted by [`HandshakeFailure`] reason in the [`ServerTls`]
//! ([`ServerTls::handshake_failures`], the broker's `trmx_tls_handshake_failures_total`),
//! logged at debug, and at info at most once per reason a minute (peer address, rustls'
//! reason, and how many since the previous line), so that a client refused for a
//! revoked, expired or foreign certificate shows in a default log without flooding it.
//!
//! # Invariants
//! - A pending handshake is counted once in `Pending::by_age` and once in
//!   `Pending::per_source`, from admission until its task ends or it is evicted, whichever
//!   comes first; the counts never exceed the limits.
//! - An established connection is counted once in `Gate::per_identity` (by its
//!   `IdentitySlot`) from its handshake until it is dropped; an identity with no
//!   connection has no entry, so the map holds only identities connected now.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::server::{CloseSignal, Registration, ServerTls, peer_name};

/// Bounds on the accept loop (see the [module docs](self) for how they combine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Time a client has from TCP accept to a completed TLS handshake, and then again to
    /// send the HTTP/2 connection preface.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once (sockets not yet authenticated).
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one IPv4 address or IPv6 /64.
    pub max_handshakes_per_ip: usize,
    /// With `max_handshakes` in progress, a handshake pending at least this long is closed
    /// to make room for a new socket; younger ones are left alone and the new socket is
    /// closed instead.
    pub handshake_eviction_age: Duration,
    /// Established, authenticated connections; one that completes its handshake beyond it
    /// is closed at once. Pending handshakes do not count.
    pub max_connections: usize,
    /// Established connections of one certificate identity (a participant, an operator);
    /// one beyond it is closed at once, whatever `max_connections` has left. Keep it well
    /// below `max_connections`, so that one identity cannot take every slot.
    pub max_connections_per_identity: usize,
    /// TCP keepalive idle time set on accepted sockets; `None` leaves the OS default.
    pub tcp_keepalive: Option<Duration>,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_handshakes_per_ip: 8,
            handshake_eviction_age: Duration::from_secs(2),
            max_connections: 1024,
            max_connections_per_identity: 32,
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
    /// Until the peer has sent the HTTP/2 preface: when it must have, and how many of its
    /// bytes are still to come.
    preface: Option<PrefaceDeadline>,
    _registration: Registration,
    _permit: OwnedSemaphorePermit,
    identity: IdentitySlot,
}

/// The bound on a connection that completed TLS but has not sent the HTTP/2 preface.
struct PrefaceDeadline {
    deadline: Pin<Box<tokio::time::Sleep>>,
    remaining: usize,
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113 §3.4), what every HTTP/2 client sends first.
const HTTP2_PREFACE_LEN: usize = 24;

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
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(preface) = &mut this.preface {
            let got = buf.filled().len().saturating_sub(before);
            preface.remaining = preface.remaining.saturating_sub(got);
            if preface.remaining == 0 {
                this.preface = None;
            } else if read.is_pending() && preface.deadline.as_mut().poll(cx).is_ready() {
                let slot = &this.identity;
                slot.gate.refusals.report_identity(
                    Refusal::NoPreface,
                    this.remote_addr,
                    &slot.identity,
                    duration_secs(slot.gate.limits.handshake_timeout),
                );
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 connection preface in time",
                )));
            }
        }
        read
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
/// failed or timed-out handshake is counted and logged (see the [module docs](self)) and
/// dropped without delaying the others. Admission follows the [module docs](self): a
/// bounded handshake budget with a per-source cap, then a connection slot once
/// authenticated. The stream ends when `shutdown` resolves (pending handshakes are
/// abandoned) and never yields an `Err`: accept errors are logged and retried after a short
/// pause.
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
        gate: Arc::new(Gate::new(limits)),
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
    gate: Arc<Gate>,
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
        let Some(pending) = self.gate.admit_handshake(peer) else {
            return; // `tcp` is dropped: the socket is closed at once
        };
        if let Err(error) = configure_socket(&tcp, self.gate.limits.tcp_keepalive) {
            tracing::debug!(peer = %peer, %error, "cannot set socket options");
        }
        let id = pending.id;
        let task = handshake(self.tls.clone(), tcp, peer, self.gate.clone(), pending);
        let abort = self.handshakes.spawn(task);
        self.gate.pending().set_abort(id, abort);
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
    gate: Arc<Gate>,
    pending: PendingHandshake,
) -> Option<TlsConn> {
    let loaded = tls.current();
    let acceptor = TlsAcceptor::from(loaded.config.clone());
    let timeout = gate.limits.handshake_timeout;
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(peer = %peer, %error, "tls handshake failed");
            tls.failures()
                .record(HandshakeFailure::of(&error), peer, &error);
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "tls handshake timed out");
            tls.failures()
                .record(HandshakeFailure::Timeout, peer, &"timed out");
            return None;
        }
    };
    // Authenticated: its place in the handshake budget goes back before it takes a slot.
    drop(pending);
    let Some(certs) = stream.get_ref().1.peer_certificates() else {
        // Unreachable with a verifier that requires client certificates; refuse anyway.
        tracing::debug!(peer = %peer, "tls handshake without client certificate");
        return None;
    };
    // The identity's place first: one at its cap must not take a slot from the others.
    let identity = gate.take_identity_slot(peer_name(certs), peer)?;
    let permit = gate.take_slot(peer)?;
    let certs = Arc::new(certs.to_vec());
    let (registration, close) = tls.register(certs, loaded.generation(), peer);
    tracing::debug!(peer = %peer, identity = %identity.identity, "tls connection established");
    Some(TlsConn {
        stream,
        close,
        remote_addr: peer,
        preface: Some(PrefaceDeadline {
            deadline: Box::pin(tokio::time::sleep(timeout)),
            remaining: HTTP2_PREFACE_LEN,
        }),
        _registration: registration,
        _permit: permit,
        identity,
    })
}

/// Why a TLS handshake failed: the label `reason` of the broker's
/// `trmx_tls_handshake_failures_total`. A fixed set, so the metric's series are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The client presented no certificate: not a node or operator (a TLS health check of
    /// a load balancer, a probe), so apart from the others.
    NoCertificate,
    /// The client presented a certificate that does not verify for another reason than
    /// those below (wrong key usage, unknown revocation status, ...).
    BadCertificate,
    /// The client's certificate is on the CRL.
    Revoked,
    /// The client's certificate has expired or is not valid yet.
    Expired,
    /// The client's certificate is not issued by the federation CA (its issuer is unknown,
    /// or has the CA's name but not its key: the signature does not verify).
    UnknownCa,
    /// The CRL is past its `nextUpdate` under [`crate::CrlPolicy::Strict`]: every client is
    /// refused until a fresh CRL is loaded.
    StaleCrl,
    /// The client refused the server's certificate: its alert names a certificate problem
    /// (a name the certificate does not carry, a CA the client does not trust, revoked,
    /// expired). Other alerts (a client that gives up, `user_canceled`) are [`Self::Other`].
    ClientRefused,
    /// No completed handshake within [`ListenerLimits::handshake_timeout`].
    Timeout,
    /// Anything else: not TLS, a protocol error, a reset.
    Other,
}

impl HandshakeFailure {
    /// Every reason, in label order.
    pub const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::NoCertificate,
        HandshakeFailure::BadCertificate,
        HandshakeFailure::Revoked,
        HandshakeFailure::Expired,
        HandshakeFailure::UnknownCa,
        HandshakeFailure::StaleCrl,
        HandshakeFailure::ClientRefused,
        HandshakeFailure::Timeout,
        HandshakeFailure::Other,
    ];

    /// The label value, e.g. `bad_certificate`.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::Revoked => "revoked",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::StaleCrl => "stale_crl",
            HandshakeFailure::ClientRefused => "client_refused",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The reason of a failed `accept` (tokio-rustls carries rustls' error in the I/O error).
    fn of(error: &io::Error) -> HandshakeFailure {
        use rustls::CertificateError as C;
        let Some(tls) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return HandshakeFailure::Other;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => HandshakeFailure::NoCertificate,
            rustls::Error::InvalidCertificate(cert) => match cert {
                C::Revoked => HandshakeFailure::Revoked,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => HandshakeFailure::Expired,
                C::UnknownIssuer | C::BadSignature => HandshakeFailure::UnknownCa,
                C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => {
                    HandshakeFailure::StaleCrl
                }
                _ => HandshakeFailure::BadCertificate,
            },
            rustls::Error::AlertReceived(alert) => {
                use rustls::AlertDescription as A;
                match alert {
                    A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::BadCertificateStatusResponse
                    | A::AccessDenied => HandshakeFailure::ClientRefused,
                    _ => HandshakeFailure::Other,
                }
            }
            _ => HandshakeFailure::Other,
        }
    }
}

/// How often at most one reason's handshake failures are logged at info.
const HANDSHAKE_FAILURE_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Failed handshakes: counted by reason (for metrics), and logged at info at most once per
/// reason every [`HANDSHAKE_FAILURE_REPORT_INTERVAL`] with the peer's address (every one at
/// debug).
pub(crate) struct HandshakeFailures {
    counts: [AtomicU64; HandshakeFailure::ALL.len()],
    throttle: Throttle<{ HandshakeFailure::ALL.len() }>,
}

impl Default for HandshakeFailures {
    fn default() -> Self {
        HandshakeFailures {
            counts: Default::default(),
            throttle: Throttle::new(HANDSHAKE_FAILURE_REPORT_INTERVAL),
        }
    }
}

impl HandshakeFailures {
    pub(crate) fn record(
        &self,
        reason: HandshakeFailure,
        peer: SocketAddr,
        error: &dyn std::fmt::Display,
    ) {
        if let Some(count) = self.counts.get(reason.index()) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(failed) = self.throttle.count(reason.index()) {
            tracing::info!(
                peer = %peer.ip(),
                reason = %reason.as_str(),
                %error,
                failed,
                "tls handshake failed"
            );
        }
    }

    /// The failures so far, by reason.
    pub(crate) fn counts(&self) -> [(HandshakeFailure, u64); HandshakeFailure::ALL.len()] {
        HandshakeFailure::ALL.map(|reason| {
            let count = self
                .counts
                .get(reason.index())
                .map_or(0, |c| c.load(Ordering::Relaxed));
            (reason, count)
        })
    }
}

/// Who gets in: the handshake budget and the connection slots, shared by the accept loop
/// and the handshake tasks.
struct Gate {
    limits: ListenerLimits,
    pending: Mutex<Pending>,
    slots: Arc<Semaphore>,
    /// Established connections by certificate identity (see the module's `# Invariants`).
    per_identity: Mutex<HashMap<String, usize>>,
    refusals: Refusals,
}

impl Gate {
    fn new(limits: ListenerLimits) -> Gate {
        Gate {
            limits,
            pending: Mutex::new(Pending::default()),
            slots: Arc::new(Semaphore::new(
                limits.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            per_identity: Mutex::new(HashMap::new()),
            refusals: Refusals::default(),
        }
    }

    fn per_identity(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // Single increments and decrements: a poisoned lock still guards consistent counts.
        self.per_identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place among the connections of `identity`, which `peer` authenticated as; `None`
    /// (reported) when it has `max_connections_per_identity` open.
    fn take_identity_slot(
        self: &Arc<Self>,
        identity: String,
        peer: SocketAddr,
    ) -> Option<IdentitySlot> {
        let mut per_identity = self.per_identity();
        let open = per_identity.get(&identity).copied().unwrap_or(0);
        if open >= self.limits.max_connections_per_identity {
            drop(per_identity); // (not held while logging)
            self.refusals.report_identity(
                Refusal::IdentityLimit,
                peer,
                &identity,
                self.limits.max_connections_per_identity as u64,
            );
            return None;
        }
        per_identity.insert(identity.clone(), open + 1);
        drop(per_identity);
        Some(IdentitySlot {
            gate: self.clone(),
            identity,
        })
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Every change to `Pending` completes without a panic point in between, so a
        // poisoned lock still guards consistent counts.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place in the handshake budget for a new socket from `peer`, evicting the oldest
    /// pending handshake if the budget is full and it is old enough; `None` (reported) when
    /// the socket must be closed.
    fn admit_handshake(self: &Arc<Self>, peer: SocketAddr) -> Option<PendingHandshake> {
        let admitted = self.pending().admit(peer, Instant::now(), &self.limits);
        match admitted {
            Admitted::Yes { id, evicted } => {
                if let Some(evicted) = evicted {
                    // Outside the lock: the aborted task's guard takes it when dropped.
                    if let Some(abort) = evicted.abort {
                        abort.abort();
                    }
                    self.refusals.report(
                        Refusal::Evicted,
                        evicted.peer,
                        self.limits.max_handshakes,
                    );
                }
                Some(PendingHandshake {
                    gate: self.clone(),
                    id,
                })
            }
            Admitted::No(refusal) => {
                let limit = match refusal {
                    Refusal::SourceBusy => self.limits.max_handshakes_per_ip,
                    _ => self.limits.max_handshakes,
                };
                self.refusals.report(refusal, peer, limit);
                None
            }
        }
    }

    /// A connection slot for `peer`, which completed its handshake; `None` (reported) when
    /// every slot is taken.
    fn take_slot(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refusals
                .report(Refusal::ConnectionLimit, peer, self.limits.max_connections);
        }
        permit
    }
}

/// A connection's place among those of its identity, given back when dropped.
struct IdentitySlot {
    gate: Arc<Gate>,
    identity: String,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut per_identity = self.gate.per_identity();
        if let Entry::Occupied(mut open) = per_identity.entry(std::mem::take(&mut self.identity)) {
            *open.get_mut() -= 1;
            if *open.get() == 0 {
                open.remove();
            }
        }
    }
}

/// The answer of [`Pending::admit`].
enum Admitted {
    Yes {
        id: u64,
        /// The pending handshake removed to make room, for the caller to abort.
        evicted: Option<PendingEntry>,
    },
    No(Refusal),
}

/// The handshakes in progress, by start order and by source (see the module's
/// `# Invariants`).
#[derive(Default)]
struct Pending {
    next_id: u64,
    /// Ids grow with admission time, so the first entry is the oldest.
    by_age: BTreeMap<u64, PendingEntry>,
    per_source: HashMap<IpAddr, usize>,
}

struct PendingEntry {
    source: IpAddr,
    peer: SocketAddr,
    started: Instant,
    /// Set right after the task is spawned; `None` only in between.
    abort: Option<AbortHandle>,
}

impl Pending {
    fn admit(&mut self, peer: SocketAddr, now: Instant, limits: &ListenerLimits) -> Admitted {
        let source = source_of(peer.ip());
        if self.per_source.get(&source).copied().unwrap_or(0) >= limits.max_handshakes_per_ip {
            return Admitted::No(Refusal::SourceBusy);
        }
        let mut evicted = None;
        if self.by_age.len() >= limits.max_handshakes {
            let old_enough = self.by_age.first_key_value().is_some_and(|(_, oldest)| {
                now.saturating_duration_since(oldest.started) >= limits.handshake_eviction_age
            });
            if !old_enough {
                return Admitted::No(Refusal::HandshakesBusy);
            }
            evicted = self.remove_oldest();
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_age.insert(
            id,
            PendingEntry {
                source,
                peer,
                started: now,
                abort: None,
            },
        );
        *self.per_source.entry(source).or_insert(0) += 1;
        Admitted::Yes { id, evicted }
    }

    fn set_abort(&mut self, id: u64, abort: AbortHandle) {
        // Absent if the handshake already ended (or was evicted) before this call.
        if let Some(entry) = self.by_age.get_mut(&id) {
            entry.abort = Some(abort);
        }
    }

    fn remove_oldest(&mut self) -> Option<PendingEntry> {
        let (_, entry) = self.by_age.pop_first()?;
        self.forget_source(entry.source);
        Some(entry)
    }

    fn remove(&mut self, id: u64) {
        if let Some(entry) = self.by_age.remove(&id) {
            self.forget_source(entry.source);
        }
    }

    fn forget_source(&mut self, source: IpAddr) {
        if let Entry::Occupied(mut count) = self.per_source.entry(source) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

/// A handshake's place in the budget, given back when dropped (the task ended, or was
/// aborted).
struct PendingHandshake {
    gate: Arc<Gate>,
    id: u64,
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        self.gate.pending().remove(self.id);
    }
}

/// What a per-source cap counts by: an IPv4 address (also when mapped into IPv6), or the
/// /64 prefix of an IPv6 address, since one host usually holds a whole /64.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// Why a socket was closed without being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its source had `max_handshakes_per_ip` handshakes in progress.
    SourceBusy,
    /// `max_handshakes` were in progress, none old enough to evict.
    HandshakesBusy,
    /// A pending handshake closed to make room for a new one.
    Evicted,
    /// Authenticated, but all `max_connections` slots were taken.
    ConnectionLimit,
    /// Authenticated, but its identity had `max_connections_per_identity` open.
    IdentityLimit,
    /// Authenticated, but sent no HTTP/2 preface within `handshake_timeout`.
    NoPreface,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::SourceBusy,
        Refusal::HandshakesBusy,
        Refusal::Evicted,
        Refusal::ConnectionLimit,
        Refusal::IdentityLimit,
        Refusal::NoPreface,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Whole seconds of `d`, rounded up (a limit in a log line).
fn duration_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// How often at most one reason's refusals are logged.
pub(crate) const REFUSAL_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Counts refusals and logs them at most once per reason every
/// [`REFUSAL_REPORT_INTERVAL`]; each line carries the count since the previous one.
struct Refusals {
    throttle: Throttle<{ Refusal::ALL.len() }>,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            throttle: Throttle::new(REFUSAL_REPORT_INTERVAL),
        }
    }
}

/// Per-reason throttling of log lines: at most one line per reason every `interval`.
pub(crate) struct Throttle<const N: usize> {
    interval: Duration,
    tallies: Mutex<[Tally; N]>,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    last_report: Option<Instant>,
    unreported: u64,
}

impl<const N: usize> Throttle<N> {
    pub(crate) fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            tallies: Mutex::new([Tally::default(); N]),
        }
    }

    /// Counts one event of reason `index`; when a line is due, the events since the
    /// previous line (this one included).
    pub(crate) fn count(&self, index: usize) -> Option<u64> {
        let mut tallies = self
            .tallies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tally = tallies.get_mut(index)?;
        tally.unreported += 1;
        let now = Instant::now();
        let due = tally
            .last_report
            .is_none_or(|last| now.duration_since(last) >= self.interval);
        if !due {
            return None;
        }
        tally.last_report = Some(now);
        Some(std::mem::take(&mut tally.unreported))
    }
}

impl Refusals {
    fn report(&self, refusal: Refusal, peer: SocketAddr, limit: usize) {
        let Some(refused) = self.throttle.count(refusal.index()) else {
            return;
        };
        match refusal {
            Refusal::SourceBusy => tracing::warn!(
                peer = %peer.ip(),
                max_handshakes_per_ip = limit,
                refused,
                "too many handshakes from one address, closing new connection"
            ),
            Refusal::HandshakesBusy => tracing::warn!(
                peer = %peer.ip(),
                max_handshakes = limit,
                refused,
                "handshake limit reached, closing new connection"
            ),
            Refusal::Evicted => tracing::warn!(
                peer = %peer.ip(),
                max_handshakes = limit,
                refused,
                "handshake limit reached, closing the oldest pending handshake"
            ),
            Refusal::ConnectionLimit => tracing::warn!(
                peer = %peer.ip(),
                max_connections = limit,
                refused,
                "connection limit reached, closing new connection"
            ),
            // reported by `report_identity`, which names the identity
            Refusal::IdentityLimit | Refusal::NoPreface => {}
        }
    }

    /// A refusal of an authenticated connection: the line names its certificate's
    /// identity, since its address alone may be a shared NAT's. `limit` is
    /// `max_connections_per_identity`, or the seconds of `handshake_timeout`.
    fn report_identity(&self, refusal: Refusal, peer: SocketAddr, identity: &str, limit: u64) {
        let Some(refused) = self.throttle.count(refusal.index()) else {
            return;
        };
        match refusal {
            // a node leaking channels, or a certificate in the wrong hands
            Refusal::NoPreface => tracing::warn!(
                peer = %peer.ip(),
                identity,
                handshake_timeout_secs = limit,
                refused,
                "no http/2 preface within the handshake timeout after the tls handshake, \
                 closing connection"
            ),
            _ => tracing::warn!(
                peer = %peer.ip(),
                identity,
                max_connections_per_identity = limit,
                refused,
                "connection limit of one identity reached, closing its new connection"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_are_told_apart() {
        let of =
            |e: rustls::Error| HandshakeFailure::of(&io::Error::new(io::ErrorKind::InvalidData, e));
        assert_eq!(
            of(rustls::Error::NoCertificatesPresented),
            HandshakeFailure::NoCertificate
        );
        assert_eq!(
            of(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            )),
            HandshakeFailure::Revoked
        );
        // a client refusing the broker's certificate, and one that just gives up
        assert_eq!(
            of(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            )),
            HandshakeFailure::ClientRefused
        );
        assert_eq!(
            of(rustls::Error::AlertReceived(
                rustls::AlertDescription::UserCanceled
            )),
            HandshakeFailure::Other
        );
        assert_eq!(
            HandshakeFailure::of(&io::Error::from(io::ErrorKind::ConnectionReset)),
            HandshakeFailure::Other
        );
    }

    fn limits(max_handshakes: usize, per_ip: usize, eviction_age: Duration) -> ListenerLimits {
        ListenerLimits {
            max_handshakes,
            max_handshakes_per_ip: per_ip,
            handshake_eviction_age: eviction_age,
            ..ListenerLimits::default()
        }
    }

    fn peer(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    fn admitted(answer: Admitted) -> (u64, Option<SocketAddr>) {
        match answer {
            Admitted::Yes { id, evicted } => (id, evicted.map(|e| e.peer)),
            Admitted::No(refusal) => panic!("refused: {refusal:?}"),
        }
    }

    #[test]
    fn a_throttle_lets_one_line_per_reason_and_interval_through_with_the_count() {
        // (the first four counts must fall within one interval: long enough that a
        // thread descheduled on a loaded machine does not let the interval pass)
        let throttle = Throttle::<2>::new(Duration::from_millis(300));
        assert_eq!(throttle.count(0), Some(1));
        assert_eq!(throttle.count(0), None);
        assert_eq!(throttle.count(0), None);
        assert_eq!(throttle.count(1), Some(1), "reasons are throttled apart");
        std::thread::sleep(Duration::from_millis(310));
        assert_eq!(
            throttle.count(0),
            Some(3),
            "the two held back, and this one"
        );
        assert_eq!(throttle.count(5), None, "an index out of range is ignored");
    }

    #[test]
    fn sources_are_addresses_or_ipv6_prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            source_of(ip("2001:db8:1:2::1"))
        );
        assert_ne!(source_of(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn a_source_at_its_cap_is_refused_until_one_of_its_handshakes_ends() {
        let limits = limits(10, 2, Duration::from_secs(60));
        let now = Instant::now();
        let mut pending = Pending::default();
        let (first, _) = admitted(pending.admit(peer("192.0.2.1:1000"), now, &limits));
        admitted(pending.admit(peer("192.0.2.1:1001"), now, &limits));
        assert!(matches!(
            pending.admit(peer("192.0.2.1:1002"), now, &limits),
            Admitted::No(Refusal::SourceBusy)
        ));
        // the same /64 is the same source; another address is not
        assert!(matches!(
            pending.admit(peer("[2001:db8::1]:1"), now, &limits),
            Admitted::Yes { .. }
        ));
        assert!(matches!(
            pending.admit(peer("[2001:db8::2]:1"), now, &limits),
            Admitted::Yes { .. }
        ));
        assert!(matches!(
            pending.admit(peer("[2001:db8::3]:1"), now, &limits),
            Admitted::No(Refusal::SourceBusy)
        ));
        admitted(pending.admit(peer("192.0.2.2:1000"), now, &limits));
        pending.remove(first);
        pending.remove(first); // a second removal (eviction, then the guard) is harmless
        admitted(pending.admit(peer("192.0.2.1:1003"), now, &limits));
        assert_eq!(pending.by_age.len(), 5);
        assert_eq!(pending.per_source.values().sum::<usize>(), 5);
    }

    #[test]
    fn a_full_budget_evicts_the_oldest_only_once_it_is_old_enough() {
        let limits = limits(2, 8, Duration::from_secs(2));
        let start = Instant::now();
        let mut pending = Pending::default();
        admitted(pending.admit(peer("192.0.2.1:1"), start, &limits));
        let later = start + Duration::from_secs(1);
        admitted(pending.admit(peer("192.0.2.2:1"), later, &limits));
        assert!(matches!(
            pending.admit(peer("192.0.2.3:1"), later, &limits),
            Admitted::No(Refusal::HandshakesBusy)
        ));
        let (_, evicted) =
            admitted(pending.admit(peer("192.0.2.3:1"), start + Duration::from_secs(2), &limits));
        assert_eq!(evicted, Some(peer("192.0.2.1:1")));
        assert_eq!(pending.by_age.len(), 2);
        assert!(
            !pending
                .per_source
                .contains_key(&source_of(peer("192.0.2.1:1").ip()))
        );
    }
}
