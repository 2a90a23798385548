//! Wiring: open the store, recover, start the timer loop and the CRL reloads,
//! serve tonic over `trmx_transport::incoming`, and shut down in order.
//!
//! [`serve`] is the simple entry point; [`Broker::builder`] lets tests inject a
//! clock (or a store), read the bound address, reload TLS and shut down.
//!
//! The admin endpoint (`admin_listen`: `/metrics`, `/healthz`, `/readyz`) is bound
//! before the store opens (a taken port fails the start at once) and served once the
//! store is open; `BrokerAdminHooks` refreshes the queue gauges from the store on
//! every scrape.
//!
//! Shutdown order: stop accepting connections and refuse new submits (`/readyz` turns
//! 503); end the `Receive` streams (their leases are released); let open RPCs finish
//! within `limits.shutdown_grace`; stop the timers; flush and close the store; stop the
//! admin endpoint last.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tracing::{Instrument, debug, error, info, info_span, warn};
pub use trmx_durable::last_run::ClockCheck;
use trmx_proto::pb::exchange_server::ExchangeServer;
use trmx_proto::pb::operator_server::OperatorServer;
use trmx_transport::{
    CrlPolicy, CrlRecord, ListenerLimits, ReloadReport, RequestBytesLayer, ServerTls, TlsClock,
    TlsPaths,
};

use crate::admin::{
    AdminHooks, AdminState, CertRole, HeldCert, HostCheck, Metrics, Readiness, serve_admin,
    sha256_label,
};
use crate::admin_cli::fmt_millis;
use crate::admission::{Admission, RequestSlots, SubmitSlots, Submitting, free_disk_bytes};
use crate::clock::{self, Clock, StartClock, broker_clock, human_span};
use crate::config::{BrokerConfig, CrlPolicyConfig, REQUEST_MARGIN_BYTES};
use crate::error::BrokerError;
use crate::last_run;
use crate::operator::OperatorService;
use crate::registry::{LiveRegistry, Registry, RegistryChange};
use crate::service::{ExchangeService, PeerCerts, Shared};
use crate::store::{
    BrokerStore, FlushObserver, Lifecycle, Millis, Presence, SledOptions, SledStore, TickError,
    TickReport,
};
use crate::streams::Streams;
use crate::units::format_duration;

/// Streams a connection may make the broker reset (stream errors, refused streams) before
/// it is closed: hyper's own default, which tonic does not pass on.
const LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// How often the free space of the data directory is measured.
const DISK_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How often the refusals of participants' requests not logged yet are looked for
/// ([`refusal_log_loop`]): on its own, not with the timers, whose loop may wait as long as
/// `lifecycle.tick_interval`.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(2);
/// How often the broker records in its store that it runs (see `check_clock`), and then
/// in the last-run file ([`crate::last_run`]).
const RUNNING_MARK_INTERVAL: Duration = Duration::from_secs(60);

/// The file in `data_dir` that records the newest CRL of each CA the broker has accepted
/// ([`CrlRecord`]), so that a `tls.crl` older than it (or another CRL under its
/// crlNumber, from a CA restored from a backup) is refused at start, as a reload refuses
/// one older than the CRL in force: a crl.pem restored from a backup must not un-revoke
/// certificates, restart or not.
///
/// Read at start when `tls.crl` is set (and by `check-config`); read again once the store
/// holds the data directory (a broker still stopping when this one started may have
/// recorded a newer CRL meanwhile: a `tls.crl` older than that stops the start too), and
/// written, the newer entry of each CA kept; written again by every reload that loads a
/// newer CRL. A missing file is a first start (or a record deleted on purpose to go back to
/// an older CRL): the CRLs of `tls.crl` are taken as the newest. A damaged one stops the
/// start with an error that names it, never a silent reset. `trmx-broker store compact`
/// carries it over.
pub const CRL_RECORD_FILE: &str = "crl-record.json";

/// Runs a broker on `listener` until `shutdown` resolves, then shuts down in
/// order. The simple entry point; see [`Broker::builder`] for more control.
pub async fn serve(
    listener: TcpListener,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BrokerError> {
    let mut running = Broker::builder(config).start(listener).await?;
    tokio::select! {
        () = shutdown => running.shutdown().await,
        result = running.wait_stopped() => result,
    }
}

/// Namespace of [`Broker::builder`].
#[derive(Debug)]
pub struct Broker;

impl Broker {
    /// A builder for a broker with `config`, the system clock (guarded
    /// against jumps of more than `lifecycle.max_clock_step`) and the sled store.
    pub fn builder(config: BrokerConfig) -> BrokerBuilder {
        let clock = broker_clock(config.lifecycle.max_clock_step);
        BrokerBuilder {
            config,
            clock: Arc::new(clock),
            store: None,
        }
    }
}

/// Configures and starts a broker.
#[derive(Debug)]
pub struct BrokerBuilder {
    config: BrokerConfig,
    clock: Arc<dyn Clock>,
    store: Option<Arc<dyn BrokerStore>>,
}

impl BrokerBuilder {
    /// Uses `clock` for every lifecycle decision (tests pass a `ManualClock`).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Uses `store` instead of opening the sled store in `data_dir`.
    #[must_use]
    pub fn store(mut self, store: Arc<dyn BrokerStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Validates the config, loads TLS, opens and recovers the store, and
    /// starts serving on `listener`. Returns once the broker accepts connections.
    pub async fn start(self, listener: TcpListener) -> Result<RunningBroker, BrokerError> {
        let BrokerBuilder {
            config,
            clock,
            store,
        } = self;
        config.validate()?;
        warn_about(&config);
        let addr = listener.local_addr().map_err(|error| BrokerError::Io {
            context: "reading the listener's address".into(),
            error,
        })?;
        let registry = Registry::from_config(&config.participants)?;
        // TLS checks client certificates on the broker's time, which holds through a
        // jump of the system clock (see `clock::GuardedClock`), like every other
        // decision: a clock set a year ahead must not refuse every certificate as expired
        let tls_clock = clock.clone();
        let tls = load_tls_at(&config, TlsClock::new(move || tls_clock.now()))?;
        let own = own_identity(&config);
        let broker_name = match (&config.name, &own) {
            (Some(name), _) => name.clone(),
            (None, Some(identity)) => identity.broker().unwrap_or("broker").to_owned(),
            (None, None) => "broker".to_owned(),
        };
        let trust_domain = own.map(|identity| identity.trust_domain);
        if trust_domain.is_none() {
            warn!(
                cert = %config.tls.cert.display(),
                "the broker's certificate names no trmx identity: clients of every trust \
                 domain the CA signs for are accepted"
            );
        }
        let admin_listener = match config.admin_listen {
            Some(admin) => Some(bind_admin(admin).await?),
            None => None,
        };
        let admin_addr = admin_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok());
        let metrics = Arc::new(Metrics::with_clock(clock.clone()));
        metrics.register_participants(registry.iter().map(|p| &p.id));
        let certs = CertWatch {
            metrics: metrics.clone(),
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            broker_name: broker_name.clone(),
        };
        certs.record(&tls, false);
        let store = match store {
            Some(store) => store,
            None => open_store(&config, &metrics).await?,
        };
        let now = clock.now_millis();
        check_clock(store.as_ref(), now, &config).await?;
        save_crl_record(&config, &tls).await?;
        store.mark_running(now).await?;
        let mut last_run_failing = Recurring::default();
        record_last_run(&config.data_dir, now, &mut last_run_failing).await;
        let recovered = store.recover(now).await?;
        restore_presence(store.as_ref(), &metrics, &registry).await;
        info!(
            data_dir = %config.data_dir.display(),
            recovered_leases = recovered,
            participants = registry.len(),
            "store opened"
        );

        let limits = &config.limits;
        let admission = Admission::new(
            limits.sender_rate_per_second,
            limits.sender_rate_burst,
            limits.min_free_disk_bytes,
        );
        measure_disk(&config, &admission, &metrics).await;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            store: store.clone(),
            clock,
            registry: LiveRegistry::new(registry),
            streams: Streams::new(limits.max_streams_per_participant, 1),
            admission,
            submit_slots: SubmitSlots::new(
                limits.max_concurrent_submits_per_sender as usize,
                // (validated to fit)
                u32::try_from(limits.max_waiting_submit_bytes_per_sender).unwrap_or(u32::MAX),
            ),
            request_slots: RequestSlots::new(
                limits.max_concurrent_requests_per_participant as usize,
                limits.max_ack_ids_in_progress_per_participant,
                limits.refusal_delay,
            ),
            // (longer than any request can still be on its way: its timeout, twice, and
            // the time the keepalive takes to close a dead connection)
            submitting: Submitting::new(
                limits.request_timeout * 2
                    + limits.http2_keepalive_interval
                    + limits.http2_keepalive_timeout,
            ),
            limits: limits.clone(),
            lifecycle: config.lifecycle.clone(),
            broker_name,
            shutting_down: shutdown_rx.clone(),
            metrics: metrics.clone(),
            peer_certs: PeerCerts::default(),
            trust_domain,
        });
        // the store is open: writable unless the disk is already below the watermark
        shared.update_store_writable();
        let incoming_bytes = RequestBytesLayer::new(limits.max_incoming_request_bytes_per_identity);
        let (admin_stop, admin_stopped) = oneshot::channel::<()>();
        let admin = admin_listener.map(|listener| {
            let hooks = Arc::new(BrokerAdminHooks {
                shared: shared.clone(),
                tls: tls.clone(),
                incoming_bytes: incoming_bytes.clone(),
            });
            let state = AdminState::new(metrics.clone())
                .with_hooks(hooks)
                .with_host_check(HostCheck::names(&config.admin_allowed_hosts));
            let stopped = async {
                let _ = admin_stopped.await;
            };
            tokio::spawn(serve_admin(listener, state, stopped).instrument(info_span!("admin")))
        });

        let timers = tokio::spawn(
            timer_loop(
                shared.clone(),
                config.clone(),
                last_run_failing,
                shutdown_rx.clone(),
            )
            .instrument(info_span!("timers")),
        );
        let wakeups = tokio::spawn(
            forward_wakeups(shared.clone(), shutdown_rx.clone()).instrument(info_span!("wakeups")),
        );
        let presence = tokio::spawn(
            presence_loop(
                shared.store.clone(),
                shared.metrics.clone(),
                PRESENCE_SAVE_INTERVAL,
                shutdown_rx.clone(),
            )
            .instrument(info_span!("presence")),
        );
        let refusal_logs = tokio::spawn(
            refusal_log_loop(shared.clone(), REFUSAL_LOG_INTERVAL)
                .instrument(info_span!("refusals")),
        );
        let crl_reloads = tokio::spawn(
            crl_reload_loop(
                tls.clone(),
                certs.clone(),
                config.tls.crl_reload_interval,
                shutdown_rx.clone(),
            )
            .instrument(info_span!("crl_reload")),
        );

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<ExchangeServer<ExchangeService>>()
            .await;
        let max_message = usize::try_from(
            limits
                .max_envelope_bytes
                .saturating_add(REQUEST_MARGIN_BYTES),
        )
        .unwrap_or(usize::MAX);
        let exchange = ExchangeServer::new(ExchangeService::new(shared.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        health
            .set_serving::<OperatorServer<OperatorService>>()
            .await;
        let operator = OperatorServer::new(OperatorService::new(shared.clone()));
        let listener_limits = ListenerLimits {
            handshake_timeout: limits.handshake_timeout,
            max_handshakes: limits.max_handshakes,
            max_handshakes_per_ip: limits.max_handshakes_per_ip,
            max_connections: limits.max_connections,
            max_connections_per_identity: limits.max_connections_per_identity,
            tcp_keepalive: Some(limits.tcp_keepalive),
            ..ListenerLimits::default()
        };
        let incoming = trmx_transport::incoming(
            listener,
            tls.clone(),
            listener_limits,
            wait_true(shutdown_rx.clone()),
        );
        // No `concurrency_limit_per_connection`: tonic puts its queue outside the request
        // timeout. A connection gets no more streams than are served at once instead.
        let streams = limits.streams_per_connection();
        if streams < limits.max_concurrent_streams {
            info!(
                streams,
                "HTTP/2 streams per connection: limits.concurrency_per_connection, below \
                 limits.max_concurrent_streams"
            );
        }
        let router = Server::builder()
            .layer(incoming_bytes)
            .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
            .max_concurrent_streams(streams)
            // tonic 0.14 hands hyper `None` here unless it is set, which turns hyper's
            // default limit off: a client could make the broker reset stream after stream
            // (each reset frees its place among the connection's streams) and have
            // request after request dispatched for as long as it liked (CVE-2025-8671,
            // RUSTSEC-2024-0003). Past this many, the connection gets GOAWAY.
            .http2_max_local_error_reset_streams(Some(LOCAL_ERROR_RESET_STREAMS))
            .timeout(limits.request_timeout)
            .add_service(health_service)
            .add_service(exchange)
            .add_service(operator);
        let server = tokio::spawn(
            router
                .serve_with_incoming_shutdown(incoming, wait_true(shutdown_rx.clone()))
                .instrument(info_span!("grpc", %addr)),
        );
        info!(
            %addr,
            admin = %admin_addr.map_or_else(|| "off".to_owned(), |admin| admin.to_string()),
            broker = %shared.broker_name,
            "broker listening"
        );

        let grace = limits.shutdown_grace;
        let reloads = Arc::downgrade(&shared);
        let main = tokio::spawn(async move {
            let stopped = run_until_stopped(server, shutdown_rx, &shared, grace).await;
            shared.update_store_writable(); // not ready while shutting down
            health
                .set_not_serving::<ExchangeServer<ExchangeService>>()
                .await;
            health
                .set_not_serving::<OperatorServer<OperatorService>>()
                .await;
            let _ = timers.await;
            crl_reloads.abort();
            refusal_logs.abort();
            wakeups.abort();
            presence.abort();
            save_presence(shared.store.as_ref(), &shared.metrics, None).await;
            let closed = shared.store.close().await.map_err(BrokerError::from);
            shared.metrics.set_store_writable(false);
            let _ = admin_stop.send(());
            if let Some(admin) = admin {
                let _ = admin.await;
            }
            info!("broker stopped");
            stopped.and(closed)
        });
        Ok(RunningBroker {
            addr,
            admin_addr,
            tls,
            certs,
            shared: reloads,
            shutdown: shutdown_tx,
            main: Some(main),
        })
    }
}

/// A started broker.
#[derive(Debug)]
pub struct RunningBroker {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    tls: ServerTls,
    certs: CertWatch,
    /// What a reload of the registry replaces ([`Self::reload_registry`]). Weak: a
    /// stopped broker's handle must not keep its store (and the data directory's lock).
    shared: std::sync::Weak<Shared>,
    shutdown: watch::Sender<bool>,
    main: Option<JoinHandle<Result<(), BrokerError>>>,
}

impl RunningBroker {
    /// The address the broker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the admin endpoint (`/metrics`, `/healthz`, `/readyz`);
    /// `None` when `admin_listen` is `"off"`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The broker's metrics (what `/metrics` serves).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.certs.metrics
    }

    /// Re-reads the CRL (and certificate and key) now, and closes connections
    /// whose certificate no longer verifies (what SIGHUP does).
    pub fn reload_tls(&self) -> Result<ReloadReport, BrokerError> {
        let report = self.tls.reload().map_err(BrokerError::tls)?;
        self.certs
            .record(&self.tls, report.certificate_refused.is_some());
        Ok(report)
    }

    /// Puts the registry of `participants` (the config file's, read again: SIGHUP) in
    /// force, and returns what changed. A participant added is served from its next
    /// request; one removed is refused from its next, and its `Receive` streams are ended
    /// (`PERMISSION_DENIED`), its deliveries in flight due again. What is queued for it
    /// stays, to expire with its report to its sender unless it comes back; what it sent
    /// is delivered as accepted. Its gauges of streams, last contact and certificate go
    /// (its "not seen" and expiry alerts would fire for good); its queue's stay.
    pub fn reload_registry(
        &self,
        participants: &[crate::config::ParticipantConfig],
    ) -> Result<RegistryChange, BrokerError> {
        let registry = Registry::from_config(participants)?;
        let shared = self
            .shared
            .upgrade()
            .ok_or_else(|| BrokerError::Unavailable("the broker has stopped".to_owned()))?;
        shared
            .metrics
            .register_participants(registry.iter().map(|p| &p.id));
        let change = shared.registry.replace(registry);
        shared.metrics.forget_participants(&change.removed);
        shared.peer_certs.forget(&change.removed);
        for removed in &change.removed {
            shared.streams.close_participant(removed);
        }
        Ok(change)
    }

    /// Starts the orderly shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Shuts down in order and waits until the store is closed.
    pub async fn shutdown(&mut self) -> Result<(), BrokerError> {
        self.begin_shutdown();
        self.wait_stopped().await
    }

    /// Waits until the broker has stopped (after a shutdown, or a fatal
    /// server error). Returns at once if it was already awaited.
    pub async fn wait_stopped(&mut self) -> Result<(), BrokerError> {
        let Some(main) = self.main.as_mut() else {
            return Ok(());
        };
        let result = main.await;
        self.main = None;
        match result {
            Ok(result) => result,
            Err(join) => Err(BrokerError::Unavailable(format!(
                "broker task failed: {join}"
            ))),
        }
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        // A dropped handle still stops the broker in order (in the background).
        let _ = self.shutdown.send(true);
    }
}

/// Waits for the server to end or the shutdown signal; then ends the streams
/// and gives open RPCs `grace` to finish.
async fn run_until_stopped(
    mut server: JoinHandle<Result<(), tonic::transport::Error>>,
    shutdown: watch::Receiver<bool>,
    shared: &Shared,
    grace: Duration,
) -> Result<(), BrokerError> {
    tokio::select! {
        result = &mut server => {
            // The server saw the shutdown signal first and finished cleanly:
            // that is the orderly path, not a failure.
            if matches!(result, Ok(Ok(()))) && *shutdown.borrow() {
                info!("shutting down: no new connections, ending receive streams");
                shared.streams.close_all();
                return Ok(());
            }
            // The server stopped on its own: a fatal transport error.
            let error = match result {
                Ok(Ok(())) => "the gRPC server stopped unexpectedly".to_string(),
                Ok(Err(e)) => format!("the gRPC server failed: {e}"),
                Err(e) => format!("the gRPC server task failed: {e}"),
            };
            error!(%error, "broker stopping");
            shared.streams.close_all();
            return Err(BrokerError::Unavailable(error));
        }
        () = wait_true(shutdown.clone()) => {}
    }
    info!("shutting down: no new connections, ending receive streams");
    shared.streams.close_all();
    let deadline = Instant::now() + grace;
    match tokio::time::timeout(grace, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "grpc server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "grpc server task failed"),
        Err(_) => {
            warn!(grace = ?grace, "open requests did not finish in time, closing them");
            server.abort();
        }
    }
    // Stream tasks release their leases before they unregister.
    while shared.streams.total() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Puts back the last-seen times and certificate expiries the store kept
/// for the registry's participants, so that the "not seen for a day" and
/// certificate alerts still fire for a participant that does not come back
/// after the broker restarted. Failing to read them is logged, not fatal: they
/// only feed gauges.
async fn restore_presence(store: &dyn BrokerStore, metrics: &Metrics, registry: &Registry) {
    match store.presence().await {
        Ok(saved) => {
            for p in saved
                .iter()
                .filter(|p| registry.get(&p.participant).is_some())
            {
                metrics.restore_presence(p);
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot read the participants' last-seen times; the gauges start empty")
        }
    }
}

/// How often the participants' last-seen times are saved (and at shutdown).
/// After a crash, a last-seen time is at most this old.
const PRESENCE_SAVE_INTERVAL: Duration = Duration::from_secs(60);

/// Saves the participants' presence every `interval` ([`PRESENCE_SAVE_INTERVAL`]).
async fn presence_loop(
    store: Arc<dyn BrokerStore>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut saved = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate: nothing seen yet
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        saved = save_presence(store.as_ref(), &metrics, Some(saved)).await;
    }
}

/// Saves what changed since `saved` (everything when `None`); returns what
/// is saved now (`saved` again when the save failed, to retry next time).
async fn save_presence(
    store: &dyn BrokerStore,
    metrics: &Metrics,
    saved: Option<Vec<Presence>>,
) -> Vec<Presence> {
    let now = metrics.presence();
    let changed: Vec<Presence> = match &saved {
        Some(saved) => now.iter().filter(|p| !saved.contains(p)).cloned().collect(),
        None => now.clone(),
    };
    match store.save_presence(changed).await {
        Ok(()) => now,
        Err(e) => {
            warn!(error = %e, "cannot save the participants' last-seen times");
            saved.unwrap_or_default()
        }
    }
}

/// Calls `store.tick` when a timer is due, and at least every `tick_interval`
/// of real time (so a manual clock moved by a test takes effect quickly);
/// wakes the streams whose recipients have new due messages; measures the
/// free disk space; records the broker's time in the store and the last-run file
/// (`last_run_failing`: the start's failures to write that file).
async fn timer_loop(
    shared: Arc<Shared>,
    config: BrokerConfig,
    mut last_run_failing: Recurring,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = config.lifecycle.tick_interval;
    let mut disk_checked = Instant::now();
    // (the start recorded it)
    let mut marked = Instant::now();
    let mut tick_failing = Recurring::default();
    let mut prune_failing = Recurring::default();
    loop {
        let now = shared.clock.now_millis();
        // A tick that fails may have committed some of its timers first: what
        // they did is acted on all the same (no later tick reports it again;
        // the slots of deliveries that expired in flight would be held until
        // their ack deadlines).
        let (report, failed) = match shared.store.tick(now).await {
            Ok(report) => (report, None),
            Err(TickError { applied, error }) => (*applied, Some(error)),
        };
        act_on_tick(&shared, &report);
        match shared.stored(failed.map_or(Ok(()), Err)) {
            Ok(()) => {
                if tick_failing.ended() {
                    info!("timers are applied again");
                }
                match &report.audit_prune_error {
                    Some(error) => {
                        if let Some(repeated) = prune_failing.failed(error) {
                            error!(
                                %error,
                                repeated,
                                "the audit log's retention cannot run: old audit records are \
                                 kept (check with `trmx-broker admin audit verify`)"
                            );
                        }
                    }
                    None => {
                        if prune_failing.ended() {
                            info!("the audit log's retention runs again");
                        }
                    }
                }
            }
            Err(error) => {
                // The wake-ups of timers applied before the failure may have
                // gone with it (a failed flush sends none): let every stream look.
                shared.streams.wake_all();
                shared.metrics.tick_failed();
                if let Some(repeated) = tick_failing.failed(&error.to_string()) {
                    warn!(%error, repeated, "applying the timers failed (redeliveries, expiry, retention wait)");
                }
            }
        }
        if disk_checked.elapsed() >= DISK_CHECK_INTERVAL {
            measure_disk(&config, &shared.admission, &shared.metrics).await;
            shared.update_store_writable();
            disk_checked = Instant::now();
        }
        if marked.elapsed() >= RUNNING_MARK_INTERVAL {
            // (a store that cannot write says so through the submits and the tick)
            match shared.store.mark_running(now).await {
                Ok(()) => record_last_run(&config.data_dir, now, &mut last_run_failing).await,
                Err(error) => debug!(%error, "recording the broker's time in the store failed"),
            }
            marked = Instant::now();
        }
        let wait = match shared.store.next_timer().await {
            Ok(Some(at)) => {
                let now = shared.clock.now_millis();
                Duration::from_millis(at.saturating_sub(now))
                    .clamp(Duration::from_millis(5), interval)
            }
            Ok(None) | Err(_) => interval,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
    debug!("timer loop stopped");
}

/// Acts on what a tick applied (all of it, or the part committed before it failed):
/// metrics, a log line, the slots and waiting copies of deliveries that expired or were
/// dead-lettered in flight, wake-ups. (The audit log's retention runs only in a tick that
/// succeeds.)
fn act_on_tick(shared: &Shared, report: &TickReport) {
    shared.metrics.record_tick(report);
    let changed = report.redelivery_due
        + report.dead_lettered
        + report.expired
        + report.payloads_deleted
        + report.metadata_deleted;
    if changed > 0 {
        info!(
            redelivery_due = report.redelivery_due,
            dead_lettered = report.dead_lettered,
            expired = report.expired,
            payloads_deleted = report.payloads_deleted,
            metadata_deleted = report.metadata_deleted,
            "timers applied"
        );
    }
    // (the node may still ack one: `NOT_FOUND` for its id, nothing changes)
    for lease in &report.expired_in_flight {
        shared
            .streams
            .dropped(&lease.recipient, &lease.message_id, lease.deadline);
    }
    // Its sender is told it was not delivered (`MAX_ATTEMPTS`): a copy still waiting in
    // a send buffer must not reach the recipient. (One already sent is acked `NOT_FOUND`.)
    for lease in &report.dead_lettered_in_flight {
        shared
            .streams
            .dead_lettered(&lease.recipient, &lease.message_id, lease.deadline);
    }
    if report.dead_lettered + report.expired > 0 {
        // non-delivery reports went to the senders
        shared.streams.wake_all();
    } else {
        for participant in &report.woken {
            shared.streams.wake(participant);
        }
    }
}

/// Refuses to start when the system clock is further than `lifecycle.max_downtime` from
/// the last time a broker ran on the store (what [`BrokerStore::mark_running`] recorded):
/// a clock set a year ahead by mistake would expire every queued message at the first
/// tick, and one set back to 1970 by a dead RTC battery would hold every redelivery. A
/// clock a little behind is accepted, and said. (While the broker runs, the
/// [`crate::clock::GuardedClock`] holds jumps; across a restart nothing else would see one.)
async fn check_clock(
    store: &dyn BrokerStore,
    now: Millis,
    config: &BrokerConfig,
) -> Result<(), BrokerError> {
    judge_clock(store.last_running().await?, now, config).map(|_| ())
}

/// [`check_clock`]'s rule, for a store whose last run is `last` (also what `check-config`
/// runs): logs the warning of a clock behind, refuses one too far either way.
fn judge_clock(
    last: Option<Millis>,
    now: Millis,
    config: &BrokerConfig,
) -> Result<StartClock, BrokerError> {
    let lifecycle = &config.lifecycle;
    let max_downtime = Some(lifecycle.max_downtime).filter(|d| !d.is_zero());
    let verdict = clock::check_start(last, now, lifecycle.max_clock_step, max_downtime);
    match verdict {
        StartClock::Fine => Ok(verdict),
        StartClock::Behind(by) => {
            warn!(
                behind = %human_span(by),
                last_run = %fmt_millis(last.unwrap_or_default()),
                "the system clock is behind the last time a broker ran on this store: \
                 redeliveries and expiries scheduled before come that much later"
            );
            Ok(verdict)
        }
        StartClock::TooFar { ahead, by } => {
            let (which, harm) = if ahead {
                (
                    "after",
                    "if the clock is wrong, a broker started now would expire and \
                     dead-letter every message whose lifetime ends before the clock's \
                     date, and send each sender a non-delivery report",
                )
            } else {
                (
                    "before",
                    "a broker started now would hold every redelivery until the clock \
                     caught up",
                )
            };
            Err(BrokerError::ClockJump(format!(
                "the system clock reads {}, {} {which} the last time a broker ran on this \
                 store ({}), more than lifecycle.max_downtime ({}): {harm}. If the clock is \
                 right, stop the broker, run `trmx-broker store accept-clock --data-dir {}` \
                 once as the broker's user, and start it; if not, set the clock right (is \
                 NTP running?)",
                fmt_millis(now),
                human_span(by),
                fmt_millis(last.unwrap_or_default()),
                format_duration(lifecycle.max_downtime),
                config.data_dir.display(),
            )))
        }
    }
}

/// Writes `now`, which the store has just recorded as the broker's last run, to the
/// last-run file ([`crate::last_run`]), which `check-config` reads. A failure is logged
/// (through `failing`: once, then every [`RECURRING_REPORT_INTERVAL`] while it lasts) and
/// nothing else: the start checks the clock against the store, not the file.
async fn record_last_run(data_dir: &Path, now: Millis, failing: &mut Recurring) {
    let dir = data_dir.to_owned();
    let written = tokio::task::spawn_blocking(move || last_run::write(&dir, now)).await;
    let error = match written {
        Ok(Ok(())) => {
            if failing.ended() {
                info!("the last-run file is written again");
            }
            return;
        }
        Ok(Err(error)) => error.to_string(),
        Err(error) => format!("the task writing it failed: {error}"),
    };
    if let Some(repeated) = failing.failed(&error) {
        warn!(
            %error,
            repeated,
            "cannot write the last-run file: check-config cannot check the clock against \
             the broker's last run (the broker goes on; its start checks the store)"
        );
    }
}

/// A failure that may recur on every tick (many a second): logged when it starts
/// or its text changes, then once per [`RECURRING_REPORT_INTERVAL`] with the count
/// of failures since the last line.
#[derive(Debug, Default)]
struct Recurring {
    last: Option<(String, Instant)>,
    unreported: u64,
}

const RECURRING_REPORT_INTERVAL: Duration = Duration::from_secs(300);

impl Recurring {
    /// Counts a failure; `Some(failures since the last line)` when a line is due.
    fn failed(&mut self, error: &str) -> Option<u64> {
        self.unreported += 1;
        let due = match &self.last {
            Some((text, at)) => text != error || at.elapsed() >= RECURRING_REPORT_INTERVAL,
            None => true,
        };
        if !due {
            return None;
        }
        self.last = Some((error.to_owned(), Instant::now()));
        Some(std::mem::take(&mut self.unreported))
    }

    /// The failure is over; whether there was one.
    fn ended(&mut self) -> bool {
        self.unreported = 0;
        self.last.take().is_some()
    }
}

/// Wakes the streams of every recipient the store reports newly due messages for.
async fn forward_wakeups(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut wakeups = shared.store.wakeups();
    loop {
        tokio::select! {
            received = wakeups.recv() => match received {
                Ok(participant) => shared.streams.wake(&participant),
                Err(RecvError::Lagged(_)) => shared.streams.wake_all(),
                Err(RecvError::Closed) => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Re-reads the CRL every `interval`.
async fn crl_reload_loop(
    tls: ServerTls,
    certs: CertWatch,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate: the CRL was just loaded
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (tls, certs) = (tls.clone(), certs.clone());
        let reloaded = tokio::task::spawn_blocking(move || {
            let report = tls.reload();
            if let Ok(report) = &report {
                certs.record(&tls, report.certificate_refused.is_some());
            }
            report
        });
        match reloaded.await {
            Ok(Ok(report)) => debug!(
                closed_connections = report.closed_connections,
                closed = %report.closed.join(", "),
                crl_stale = report.crl.stale,
                "crl reloaded"
            ),
            Ok(Err(error)) => warn!(%error, "crl reload failed, keeping the previous one"),
            Err(error) => warn!(%error, "crl reload task failed"),
        }
    }
}

/// Writes the CRL record ([`CRL_RECORD_FILE`]) once the store holds the data directory's
/// lock, so that a second broker started on the same directory by mistake never writes it.
///
/// `load_tls` read the record before the lock was held, and the broker that held it
/// until then may have recorded a newer CRL since (a start that overlapped its stop): the
/// record is read again, and a CRL loaded that is older than it stops the start with the
/// error `load_tls` gives (the broker must not serve it); otherwise the newer entry of
/// each CA is kept, never written over.
async fn save_crl_record(config: &BrokerConfig, tls: &ServerTls) -> Result<(), BrokerError> {
    if config.tls.crl.is_none() {
        return Ok(());
    }
    let dir = config.data_dir.clone();
    let tls = tls.clone();
    tokio::task::spawn_blocking(move || {
        // (made by the sled store; not by a store given to the builder)
        trmx_durable::private_dir(&dir).map_err(|error| BrokerError::Io {
            context: format!("creating data_dir {}", dir.display()),
            error,
        })?;
        tls.save_crl_record().map_err(BrokerError::tls)
    })
    .await
    .map_err(|e| BrokerError::Unavailable(format!("crl record task failed: {e}")))?
}

async fn measure_disk(config: &BrokerConfig, admission: &Admission, metrics: &Metrics) {
    let dir = config.data_dir.clone();
    let measured = tokio::task::spawn_blocking(move || {
        free_disk_bytes(&dir).map(|free| (free, crate::store::dir_bytes(&dir)))
    })
    .await;
    match measured {
        Ok(Ok((free, store))) => {
            if free < config.limits.min_free_disk_bytes {
                warn!(
                    free_bytes = free,
                    min_free_disk_bytes = config.limits.min_free_disk_bytes,
                    "low disk space, refusing new submits"
                );
            }
            admission.set_free_disk_bytes(free);
            metrics.set_disk(free, config.limits.min_free_disk_bytes, store);
        }
        Ok(Err(error)) => warn!(%error, "cannot measure free disk space"),
        Err(error) => warn!(%error, "disk measurement task failed"),
    }
}

/// Binds the admin endpoint's address.
async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, BrokerError> {
    if !addr.ip().is_loopback() {
        warn!(%addr, "admin endpoint (metrics, health) is not on loopback: keep it on a management network");
    }
    TcpListener::bind(addr)
        .await
        .map_err(|error| BrokerError::Io {
            context: format!("binding admin_listen {addr}"),
            error,
        })
}

/// What the admin endpoint asks the broker: the queue gauges from the store, and the
/// transport's failed-handshake and request-bytes refusal counts, before each scrape; and readiness: [`Metrics::readiness`] (store writable — kept up to date by the
/// service and the timer loop — and the CA and broker certificates valid), and under
/// `crl_policy = "strict"` a CRL not past its `nextUpdate` (a strict broker refuses every
/// connection with a stale CRL).
#[derive(Debug)]
struct BrokerAdminHooks {
    shared: Arc<Shared>,
    tls: ServerTls,
    incoming_bytes: RequestBytesLayer,
}

#[tonic::async_trait]
impl AdminHooks for BrokerAdminHooks {
    async fn refresh(&self, metrics: &Metrics) {
        metrics.set_tls_handshake_failures(&self.tls.handshake_failures());
        metrics.set_request_bytes_refused(self.incoming_bytes.refused());
        match self.shared.store.queue_stats().await {
            Ok(stats) => metrics.set_queue(&stats),
            Err(error) => warn!(%error, "cannot read queue statistics for metrics"),
        }
    }

    fn readiness(&self, metrics: &Metrics) -> Readiness {
        let mut readiness = metrics.readiness();
        if self.tls.crl_policy() == CrlPolicy::Strict
            && self.tls.crl_status_at(self.shared.clock.now()).stale
        {
            readiness.certificates_valid = false;
        }
        readiness
    }
}

/// Keeps the certificate and CRL gauges in step with the TLS material: at start and
/// after every reload (a renewed broker certificate or a fresh CRL shows at once).
#[derive(Debug, Clone)]
struct CertWatch {
    metrics: Arc<Metrics>,
    ca: PathBuf,
    cert: PathBuf,
    broker_name: String,
}

impl CertWatch {
    /// Reads the CA and broker certificates' `not_after` and the loaded CRL's
    /// `nextUpdate`. Reads small files: from async code, call it on a blocking thread
    /// (start-up and `reload_tls` already read the same files synchronously).
    ///
    /// The CA and broker entries are replaced with what the files hold now, not added to:
    /// a CA dropped from `tls.ca` at the end of a rollover (or a broker certificate renewed
    /// under another name) must not keep `/readyz` 503 once it expires. A file that cannot
    /// be read leaves its entries as they were (the reload that just succeeded read it).
    ///
    /// `own_refused`: the reload kept the broker certificate in force and refused the
    /// file's (not valid yet, [`ReloadReport::certificate_refused`]); its entry stays
    /// the one in force, since the file's is not what peers see.
    fn record(&self, tls: &ServerTls, own_refused: bool) {
        match ca_expiries(&self.ca) {
            Ok(cas) => self.metrics.replace_cert_expiries(CertRole::Ca, cas),
            Err(error) => warn!(%error, "cannot read the CA certificate's expiry"),
        }
        match trmx_certs::CertInfo::from_pem_file(&self.cert) {
            Ok(_) if own_refused => {}
            Ok(info) => {
                let name = info.identity.broker().unwrap_or(&self.broker_name);
                let held = HeldCert {
                    name: name.to_owned(),
                    sha256: None,
                    not_after: info.not_after,
                };
                self.metrics.replace_cert_expiries(CertRole::Broker, [held]);
            }
            Err(error) => warn!(%error, "cannot read the broker certificate's expiry"),
        }
        if let Some(next_update) = tls.crl_status().next_update {
            self.metrics.set_crl_next_update(next_update);
            self.metrics.set_crl_recorded(tls.crl_record_saved());
        }
    }
}

/// Every certificate in the CA file: its common name (or subject), the start of its
/// fingerprint (two CAs of one name, the old and the new of a rollover, are two entries)
/// and its `not_after`.
fn ca_expiries(path: &std::path::Path) -> Result<Vec<HeldCert>, BrokerError> {
    let certs = trmx_certs::load_certs_pem(path)
        .map_err(|e| BrokerError::transport("reading the CA certificate", e))?;
    let mut out = Vec::with_capacity(certs.len());
    for der in &certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| BrokerError::transport("parsing the CA certificate", e.to_string()))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map_or_else(|| cert.subject().to_string(), str::to_owned);
        let secs = cert.validity().not_after.timestamp();
        let not_after = match u64::try_from(secs) {
            Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            Err(_) => SystemTime::UNIX_EPOCH,
        };
        out.push(HeldCert {
            name,
            sha256: Some(sha256_label(der.as_ref())),
            not_after,
        });
    }
    Ok(out)
}

/// Resolves when the watch holds `true` (or its sender is gone).
async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// What `trmx-broker check-config` checks, binding nothing: the config's rules, the
/// participant registry, the TLS material loaded exactly as at start, a data directory
/// the broker can write in, or create, and the clock check of a start ([`ClockCheck`])
/// against the last run kept in the data directory's last-run file ([`crate::last_run`]).
/// The store is never opened, locked or copied (opening a sled store writes to it, a
/// running broker holds its lock, and it holds the payloads), so this runs beside a
/// running broker too, and what only sled can tell (a store of another version, a corrupt
/// one) shows at start.
pub fn check_config(config: &BrokerConfig) -> Result<ConfigCheck, BrokerError> {
    config.validate()?;
    warn_about(config);
    Registry::from_config(&config.participants)?;
    load_tls(config)?;
    check_data_dir(&config.data_dir)?;
    // (a running broker's clock starts as the system clock)
    let now = clock::SystemClock.now_millis();
    Ok(ConfigCheck {
        clock: check_clock_offline(config, now)?,
    })
}

/// Logs the refusals that no warning counted yet every `every` ([`REFUSAL_LOG_INTERVAL`]),
/// until aborted: the line for the last ones of a flood then comes at most that long after
/// their warning interval has passed, whatever `lifecycle.tick_interval` is.
async fn refusal_log_loop(shared: Arc<Shared>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        log_unlogged_refusals(&shared);
    }
}

/// Logs the refusals of participants' requests that no warning counted yet, once their
/// interval has passed ([`crate::admission::RequestSlots::unlogged`]): the last ones of a
/// flood that stopped would otherwise be only in `/metrics`.
fn log_unlogged_refusals(shared: &Shared) {
    for unlogged in shared.request_slots.unlogged() {
        warn!(
            participant = %unlogged.participant,
            setting = unlogged.setting,
            refused = unlogged.refused,
            "requests of one participant refused since the last warning (limit reached)"
        );
    }
}

/// Logs what the valid `config` probably did not mean ([`BrokerConfig::warnings`]): at
/// start, and in `check-config`, which logs to stderr.
fn warn_about(config: &BrokerConfig) {
    for warning in config.warnings() {
        warn!("config: {warning}");
    }
}

/// What [`check_config`] found besides the refusals it returns as errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigCheck {
    /// The clock check a start would make.
    pub clock: ClockCheck,
}

impl ConfigCheck {
    /// The clock check as `check-config` says it.
    pub fn clock_line(&self) -> String {
        self.clock
            .describe("broker", "trmx-broker store accept-clock", fmt_millis)
    }
}

/// The clock check of a start against the last run kept in `data_dir`'s last-run file
/// ([`crate::last_run`]), with the start's rule ([`judge_clock`]). Looks up whether there
/// is a store (a start without one is a first start, whatever a file left behind says),
/// and reads nothing of it ([`trmx_durable::last_run::beside_store`]).
fn check_clock_offline(config: &BrokerConfig, now: Millis) -> Result<ClockCheck, BrokerError> {
    let data_dir = &config.data_dir;
    ClockCheck::beside_store(
        data_dir,
        now,
        |last_run| judge_clock(Some(last_run), now, config),
        |error| BrokerError::Io {
            context: format!("looking for a store in data_dir {}", data_dir.display()),
            error,
        },
    )
}

/// `dir` is a directory this user can create files in, or does not exist yet and its
/// nearest existing ancestor is one (the broker creates it at start). Creates nothing
/// but a probe file, removed at once.
fn check_data_dir(dir: &Path) -> Result<(), BrokerError> {
    let problem = |problem: String| BrokerError::config("data_dir", problem);
    let mut existing = dir;
    loop {
        match std::fs::metadata(existing) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Err(problem(format!(
                    "{}: {} is not a directory",
                    dir.display(),
                    existing.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                existing = match existing.parent() {
                    Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
                    Some(parent) => parent,
                    None => return Err(problem(format!("{}: {e}", existing.display()))),
                };
            }
            Err(e) => return Err(problem(format!("{}: {e}", existing.display()))),
        }
    }
    // (a random name: one left behind by a killed check, under the same pid in a
    // container, must not fail the next)
    let probe = existing.join(format!(
        ".trmx-check-config-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| {
            let what = if existing == dir {
                "cannot create files in it".to_owned()
            } else {
                format!(
                    "does not exist and cannot be created in {}",
                    existing.display()
                )
            };
            problem(format!("{} {what}: {e}", dir.display()))
        })?;
    // best effort: a probe left behind is an empty file with a telling name
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Loads the TLS files as at start, refusing a CRL older than the CRL record
/// ([`CRL_RECORD_FILE`]) holds; also what `check-config` runs, so that its warnings and
/// refusals show there too. Writes nothing.
fn load_tls(config: &BrokerConfig) -> Result<ServerTls, BrokerError> {
    load_tls_at(config, TlsClock::system())
}

/// [`load_tls`], with client certificates and the CRL's freshness checked on `clock`.
fn load_tls_at(config: &BrokerConfig, clock: TlsClock) -> Result<ServerTls, BrokerError> {
    if config.tls.crl.is_none() {
        // Allowed (a test federation, a first set-up), but never silently: a certificate
        // revoked because its key leaked would still get in.
        warn!(
            "no tls.crl configured: revocation is not checked, a revoked certificate is \
             accepted; set tls.crl to the federation CA's CRL file"
        );
    }
    let paths = TlsPaths {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
    };
    let policy = match config.tls.crl_policy {
        CrlPolicyConfig::Warn => CrlPolicy::Warn,
        CrlPolicyConfig::Strict => CrlPolicy::Strict,
    };
    match config.tls.crl.as_deref() {
        Some(crl) => {
            let record = CrlRecord::read(&config.data_dir.join(CRL_RECORD_FILE))
                .map_err(BrokerError::tls)?;
            ServerTls::load_with_clock(&paths, Some(crl), policy, Some(record), clock)
        }
        None => ServerTls::load_with_clock(&paths, None, policy, None, clock),
    }
    .map_err(BrokerError::tls)
}

/// The broker name in the certificate's URI SAN, or `broker`.
/// The identity in the broker's own certificate (its name and the
/// federation's trust domain), if it carries one.
fn own_identity(config: &BrokerConfig) -> Option<trmx_certs::Identity> {
    trmx_certs::load_certs_pem(&config.tls.cert)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .and_then(|leaf| trmx_certs::Identity::from_der(leaf.as_ref()).ok())
}

/// The store's lifecycle parameters from the config.
pub fn lifecycle_of(config: &BrokerConfig) -> Lifecycle {
    let c = &config.lifecycle;
    Lifecycle {
        ack_timeout: c.ack_timeout,
        max_attempts: c.max_attempts,
        redelivery_backoff_base: c.backoff_base,
        redelivery_backoff_max: c.backoff_max,
        dead_letter_retention: c.dead_letter_retention,
        metadata_retention: c.metadata_retention,
        max_queued_bytes_per_sender: config.limits.max_queued_bytes_per_sender,
        // the audit log outlives the metadata it speaks of
        audit_retention: c.metadata_retention.saturating_mul(2),
        max_lifetime: config.limits.max_lifetime,
    }
}

/// Opens the sled store in `data_dir` (created if missing, only its owner may
/// enter it); every flush is
/// timed into `metrics` (`trmx_store_flush_duration_seconds`).
async fn open_store(
    config: &BrokerConfig,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn BrokerStore>, BrokerError> {
    // (the store creates it, private to this user)
    let dir = config.data_dir.clone();
    let flushes = Arc::clone(metrics);
    let options = SledOptions {
        cache_capacity_bytes: config.store.cache_capacity,
        writer_nice: config.store.writer_nice,
        flush_observer: Some(FlushObserver(Arc::new(move |took| {
            flushes.observe_flush(took);
        }))),
    };
    let lifecycle = lifecycle_of(config);
    let store = tokio::task::spawn_blocking(move || SledStore::open(&dir, options, lifecycle))
        .await
        .map_err(|e| BrokerError::Unavailable(format!("store open task failed: {e}")))??;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trmx_proto::ParticipantId;

    /// The last refusals of a flood are logged within [`REFUSAL_LOG_INTERVAL`] of their
    /// warning interval's end by a task of their own: they used to be looked for in the
    /// timer loop, which waits up to `lifecycle.tick_interval` (here an hour) when no
    /// timer is due, so the line came that late.
    #[tokio::test(start_paused = true)]
    async fn the_last_refusals_of_a_flood_are_logged_whatever_the_tick_interval() {
        use crate::admission::{CROWDED_WARN_INTERVAL, Crowded};
        let dir = tempfile::tempdir().unwrap();
        let (_hold, shared) = crate::service::test_support::held_broker(dir.path());
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let crowded = Crowded::Requests { limit: 16 };
        let _held = shared.request_slots.acquire(&nl, 0).await.unwrap();
        assert_eq!(shared.request_slots.refused(&nl, crowded), Some(1));
        assert_eq!(shared.request_slots.refused(&nl, crowded), None, "unlogged");
        let sweeps = tokio::spawn(refusal_log_loop(shared.clone(), REFUSAL_LOG_INTERVAL));
        tokio::time::sleep(CROWDED_WARN_INTERVAL + REFUSAL_LOG_INTERVAL).await;
        assert_eq!(
            shared.request_slots.unlogged(),
            vec![],
            "not logged by the sweep"
        );
        sweeps.abort();
    }

    /// A failure on every tick is one line, again when its text changes, and
    /// the line after a pause counts the failures it stands for.
    #[test]
    fn a_recurring_failure_is_logged_when_it_starts_or_changes() {
        let mut failing = Recurring::default();
        assert_eq!(failing.failed("disk"), Some(1));
        assert_eq!(failing.failed("disk"), None);
        assert_eq!(failing.failed("disk"), None);
        assert_eq!(
            failing.failed("corrupt"),
            Some(3),
            "two unlogged, and this one"
        );
        let Some((_, at)) = failing.last.as_mut() else {
            panic!("no failure recorded")
        };
        *at = at.checked_sub(RECURRING_REPORT_INTERVAL).unwrap_or(*at);
        assert_eq!(failing.failed("corrupt"), Some(1));
        assert!(failing.ended());
        assert!(!failing.ended());
        assert_eq!(failing.failed("corrupt"), Some(1));
    }

    /// Polls `store` until its saved presence is `want` (or fails after 10 s).
    async fn until_saved(store: &dyn BrokerStore, want: &[Presence]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let saved = store.presence().await.expect("presence");
            if saved == want {
                return;
            }
            assert!(Instant::now() < deadline, "saved {saved:?}, want {want:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn presence_is_saved_every_interval_until_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn BrokerStore> = Arc::new(
            SledStore::open(dir.path(), SledOptions::default(), Lifecycle::default())
                .expect("open"),
        );
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = watch::channel(false);
        let saving = tokio::spawn(presence_loop(
            Arc::clone(&store),
            Arc::clone(&metrics),
            Duration::from_millis(20),
            stopped,
        ));
        let nl = ParticipantId::parse("NL-NRM").expect("id");
        let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let saved = |secs: u64| Presence {
            participant: nl.clone(),
            last_seen: secs * 1000,
            cert_not_after: None,
        };

        metrics.seen(&nl, at(1_700_000_000));
        until_saved(store.as_ref(), &[saved(1_700_000_000)]).await;
        // a later sighting is saved at the next interval, not only at shutdown
        metrics.seen(&nl, at(1_700_000_060));
        until_saved(store.as_ref(), &[saved(1_700_000_060)]).await;

        stop.send(true).expect("loop running");
        tokio::time::timeout(Duration::from_secs(5), saving)
            .await
            .expect("the loop ends at shutdown")
            .expect("no panic");
        store.close().await.expect("close");
    }
}
