//! The admin HTTP server: `GET /metrics`, `/healthz`, `/readyz` over plain HTTP/1.1.
//!
//! It listens on its own port, which the broker binds to loopback unless configured
//! otherwise (it carries no message data, but queue names and certificate names are
//! operational information). Bounded like the gRPC side: at most
//! [`AdminLimits::max_connections`] connections at once (further ones wait in the kernel's
//! accept backlog), a request-header timeout, a maximum connection age, a deadline on the
//! store refresh behind `/metrics`, and an orderly shutdown that stops accepting, lets
//! running requests finish within [`AdminLimits::drain_timeout`], then stops.

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HOST, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::metrics::{Metrics, Readiness};

/// The Prometheus text exposition content type.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the broker plugs into the admin server.
#[tonic::async_trait]
pub trait AdminHooks: Send + Sync + Debug + 'static {
    /// Brings gauges up to date just before `/metrics` is rendered, e.g.
    /// `metrics.set_queue(&store.queue_stats().await?)`. Bounded by
    /// [`AdminLimits::refresh_timeout`]; on timeout the last values are served. Default:
    /// nothing.
    async fn refresh(&self, _metrics: &Metrics) {}

    /// What `/readyz` answers. Default: [`Metrics::readiness`] (store writable, CA and
    /// broker certificates recorded and unexpired).
    fn readiness(&self, metrics: &Metrics) -> Readiness {
        metrics.readiness()
    }
}

/// Hooks that do nothing beyond the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl AdminHooks for NoHooks {}

/// Limits of the admin server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time allowed for a request's headers to arrive; also how long an idle keep-alive
    /// connection is kept (hyper restarts the timer while waiting for the next request).
    pub header_read_timeout: Duration,
    /// A keep-alive connection is closed (gracefully) after this long.
    pub max_connection_age: Duration,
    /// Deadline of [`AdminHooks::refresh`] on a scrape.
    pub refresh_timeout: Duration,
    /// On shutdown, how long running requests may take to finish.
    pub drain_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(120),
            refresh_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Which `Host` headers the admin endpoint answers (a defence against DNS
/// rebinding: a web page opened on the broker host can make the browser
/// fetch `http://attacker.example:9464/metrics` after pointing that name at
/// 127.0.0.1; the browser then sends the attacker's name as `Host`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostCheck {
    /// Every host.
    #[default]
    Any,
    /// IP addresses, `localhost`, and these names (lower case, without a
    /// trailing dot).
    Names(Vec<String>),
}

impl HostCheck {
    /// IP addresses, `localhost` and the `allowed` names. (On every address:
    /// an endpoint on `0.0.0.0` answers on 127.0.0.1 too, and one on a
    /// management network answers every browser that reaches it.)
    pub fn names(allowed: &[String]) -> Self {
        HostCheck::Names(allowed.iter().map(|h| normalise_host(h)).collect())
    }

    /// Whether a request with this `Host` header (`None`: without one) is
    /// answered.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let HostCheck::Names(names) = self else {
            return true;
        };
        // a browser always sends one; an HTTP/1.0 tool may not
        let Some(host) = host else {
            return true;
        };
        let name = match host.strip_prefix('[') {
            // "[::1]:9464"
            Some(v6) => {
                return v6
                    .split(']')
                    .next()
                    .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
            }
            None => match host.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => host,
            },
        };
        let name = normalise_host(name);
        name.parse::<std::net::Ipv4Addr>().is_ok() || name == "localhost" || names.contains(&name)
    }
}

fn normalise_host(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Everything the admin server needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminState {
    metrics: Arc<Metrics>,
    hooks: Arc<dyn AdminHooks>,
    limits: AdminLimits,
    hosts: Arc<HostCheck>,
}

impl AdminState {
    /// Serves `metrics` with [`NoHooks`] and default limits.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            hooks: Arc::new(NoHooks),
            limits: AdminLimits::default(),
            hosts: Arc::new(HostCheck::Any),
        }
    }

    /// Answers only the hosts `hosts` allows (default: any).
    pub fn with_host_check(mut self, hosts: HostCheck) -> Self {
        self.hosts = Arc::new(hosts);
        self
    }

    /// Uses `hooks` for the scrape refresh and `/readyz`.
    pub fn with_hooks(mut self, hooks: Arc<dyn AdminHooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Uses `limits`.
    pub fn with_limits(mut self, limits: AdminLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The registry served.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` completes, then stops accepting,
/// lets running requests finish (within [`AdminLimits::drain_timeout`]) and returns.
/// Accept errors are logged and retried; they never end the server.
pub async fn serve_admin(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()>,
) {
    let limits = state.limits;
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin server listening");
    }
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // e.g. EMFILE: back off briefly instead of spinning
                    warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        debug!(%peer, "admin connection");
        connections.spawn(serve_connection(
            stream,
            state.clone(),
            stop_rx.clone(),
            permit,
        ));
    }
    drop(listener);
    drop(stop_tx);
    let drained = tokio::time::timeout(limits.drain_timeout + Duration::from_secs(1), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.shutdown().await;
    }
    info!("admin server stopped");
}

async fn serve_connection(
    stream: TcpStream,
    state: AdminState,
    mut stop: watch::Receiver<()>,
    _permit: OwnedSemaphorePermit,
) {
    let limits = state.limits;
    let service = service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(respond(&state, &request).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(16 * 1024);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let age = tokio::time::sleep(limits.max_connection_age);
    tokio::pin!(age);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(%error, "admin connection ended with an error");
            }
            return;
        }
        // the sender is dropped on shutdown: changed() returns Err
        _ = stop.changed() => {}
        () = &mut age => {}
    }
    connection.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.drain_timeout, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%error, "admin connection ended with an error"),
        Err(_) => debug!("admin connection dropped after the drain timeout"),
    }
}

async fn respond(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let host = match request.headers().get(HOST) {
        Some(value) => Some(value.to_str().unwrap_or("\u{fffd}")),
        None => request.uri().host(),
    };
    if !state.hosts.allows(host) {
        // (debug: a web page can send these in a loop; the name is the
        // requester's, not the broker's data, and cut short)
        let host: String = host.unwrap_or_default().chars().take(64).collect();
        debug!(
            %host,
            "admin request for a host name that is not allowed refused (DNS rebinding?)"
        );
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "this host name is not allowed: use the IP address or localhost, \
             or add the name to admin_allowed_hosts in the broker's config\n"
                .to_owned(),
        );
    }
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n".to_owned());
    }
    if request.method() != Method::GET {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        "/metrics" => {
            let refreshed = tokio::time::timeout(
                state.limits.refresh_timeout,
                state.hooks.refresh(&state.metrics),
            )
            .await;
            if refreshed.is_err() {
                warn!(
                    timeout_ms = state.limits.refresh_timeout.as_millis() as u64,
                    "metrics refresh timed out, serving the last values"
                );
            }
            let mut response = text(StatusCode::OK, state.metrics.render());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        "/readyz" => {
            let readiness = state.hooks.readiness(&state.metrics);
            let status = if readiness.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = format!(
                "{}\nstore_writable {}\ncertificates_valid {}\n",
                if readiness.is_ready() {
                    "ready"
                } else {
                    "not ready"
                },
                readiness.store_writable,
                readiness.certificates_valid,
            );
            text(status, body)
        }
        _ => text(StatusCode::OK, "ok\n".to_owned()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::SystemTime;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::admin::metrics::CertRole;
    use crate::store::QueueStats;

    const DEADLINE: Duration = Duration::from_secs(5);

    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<()>,
    }

    async fn start(state: AdminState) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_admin(listener, state, async {
            let _ = stopped.await;
        }));
        Server { addr, stop, task }
    }

    impl Server {
        async fn shutdown(self) {
            let _ = self.stop.send(());
            tokio::time::timeout(DEADLINE, self.task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    /// One request on a fresh connection (`Connection: close`), read to the end.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        request_for(addr, "localhost", method, path).await
    }

    /// [`request`] with `host` as the `Host` header.
    async fn request_for(addr: SocketAddr, host: &str, method: &str, path: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        parse(&raw)
    }

    fn parse(raw: &[u8]) -> Reply {
        let text = String::from_utf8(raw.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Reply {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    #[derive(Debug)]
    struct StoreHooks;

    #[tonic::async_trait]
    impl AdminHooks for StoreHooks {
        async fn refresh(&self, metrics: &Metrics) {
            let recipient = trmx_proto::ParticipantId::parse("NL-NRM").unwrap();
            metrics.set_queue(&[QueueStats {
                recipient,
                depth: 7,
                in_flight: 2,
                oldest_accepted_at: None,
                bytes: 99,
            }]);
        }
    }

    fn ready_metrics() -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::new());
        let later = SystemTime::now() + Duration::from_secs(86_400);
        metrics.set_cert_expiry(CertRole::Ca, "ca", later);
        metrics.set_cert_expiry(CertRole::Broker, "broker", later);
        metrics.set_store_writable(true);
        metrics
    }

    #[test]
    fn host_checks_allow_addresses_localhost_and_the_configured_names() {
        let strict = HostCheck::names(&[]);
        for host in [
            "127.0.0.1:9464",
            "127.0.0.1",
            "[::1]:9464",
            "10.1.2.3:9464",
            "localhost:9464",
            "LOCALHOST",
            "localhost.",
        ] {
            assert!(strict.allows(Some(host)), "{host}");
        }
        assert!(strict.allows(None), "no Host header (HTTP/1.0)");
        for host in [
            "attacker.example:9464",
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.attacker.example",
            "[not-an-address]:9464",
            "",
        ] {
            assert!(!strict.allows(Some(host)), "{host}");
        }
        assert!(!strict.allows(Some("broker.internal:9464")));
        // configured names
        let named = HostCheck::names(&["Broker.Internal.".to_owned()]);
        assert!(named.allows(Some("broker.internal:9464")));
        assert!(named.allows(Some("10.1.2.3:9464")));
        assert!(!named.allows(Some("attacker.example:9464")));
    }

    #[tokio::test]
    async fn a_request_for_a_host_not_allowed_is_refused() {
        let state = AdminState::new(ready_metrics()).with_host_check(HostCheck::names(&[]));
        let server = start(state).await;
        let rebound = request_for(server.addr, "attacker.example:9464", "GET", "/metrics").await;
        assert_eq!(rebound.status, 421);
        assert!(
            rebound.body.contains("admin_allowed_hosts"),
            "{}",
            rebound.body
        );
        assert!(
            !rebound.body.contains("trmx_"),
            "no metrics: {}",
            rebound.body
        );
        let by_address =
            request_for(server.addr, &server.addr.to_string(), "GET", "/metrics").await;
        assert_eq!(by_address.status, 200);
        assert!(by_address.body.contains("trmx_up 1"));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn metrics_are_refreshed_and_served_as_prometheus_text() {
        let server = start(AdminState::new(ready_metrics()).with_hooks(Arc::new(StoreHooks))).await;
        let reply = request(server.addr, "GET", "/metrics").await;
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .head
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{}",
            reply.head
        );
        assert!(
            reply
                .body
                .contains("trmx_queue_depth{recipient=\"NL-NRM\"} 7\n"),
            "refresh ran before render"
        );
        assert!(reply.body.contains("trmx_up 1\n"));
        // a query string does not change the route
        assert_eq!(
            request(server.addr, "GET", "/metrics?x=1").await.status,
            200
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn health_readiness_not_found_and_method_not_allowed() {
        let metrics = ready_metrics();
        let server = start(AdminState::new(Arc::clone(&metrics))).await;
        let health = request(server.addr, "GET", "/healthz").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
        let ready = request(server.addr, "GET", "/readyz").await;
        assert_eq!(ready.status, 200, "{}", ready.body);

        metrics.set_store_writable(false);
        let not_ready = request(server.addr, "GET", "/readyz").await;
        assert_eq!(not_ready.status, 503);
        assert!(
            not_ready.body.contains("store_writable false"),
            "{}",
            not_ready.body
        );
        assert_eq!(
            request(server.addr, "GET", "/healthz").await.status,
            200,
            "alive while not ready"
        );

        assert_eq!(request(server.addr, "GET", "/").await.status, 404);
        assert_eq!(request(server.addr, "GET", "/metricsx").await.status, 404);
        assert_eq!(request(server.addr, "DELETE", "/nope").await.status, 404);
        let post = request(server.addr, "POST", "/metrics").await;
        assert_eq!(post.status, 405);
        assert!(post.head.contains("allow: get"), "{}", post.head);
        assert_eq!(request(server.addr, "HEAD", "/healthz").await.status, 405);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_slow_client_is_cut_off_by_the_header_timeout() {
        let limits = AdminLimits {
            header_read_timeout: Duration::from_millis(200),
            ..AdminLimits::default()
        };
        let server = start(AdminState::new(ready_metrics()).with_limits(limits)).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        let mut raw = Vec::new();
        // the server closes the connection (possibly after a 408) instead of waiting forever
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains(" 200 "));
        // an idle keep-alive connection is closed the same way, so it never pins a slot
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(DEADLINE, idle.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_free_slot() {
        let limits = AdminLimits {
            max_connections: 1,
            ..AdminLimits::default()
        };
        let server = start(AdminState::new(ready_metrics()).with_limits(limits)).await;
        // first connection: a keep-alive request, answered, connection held open
        let mut first = TcpStream::connect(server.addr).await.unwrap();
        first
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(DEADLINE, first.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

        // second connection: not served while the first holds the only slot
        let second = tokio::spawn(request(server.addr, "GET", "/healthz"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "served beyond the connection limit");
        drop(first);
        let reply = tokio::time::timeout(DEADLINE, second)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_idle_keep_alive_connections_and_stops_accepting() {
        let server = start(AdminState::new(ready_metrics())).await;
        let addr = server.addr;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(DEADLINE, idle.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        server.shutdown().await;
        let mut rest = Vec::new();
        // the idle connection ends (EOF or reset) instead of outliving the server
        let _ = tokio::time::timeout(DEADLINE, idle.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port no longer accepts"
        );
    }
}
