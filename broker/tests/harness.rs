//! Shared test harness: a federation CA in a temp dir, a real broker on
//! 127.0.0.1:0 with a manual clock, and mutual-TLS clients built from the
//! generated stubs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use trmx_broker::clock::ManualClock;
use trmx_broker::config::{OrganisationType, ParticipantConfig, TlsConfig};
use trmx_broker::{Broker, BrokerConfig, RunningBroker};
use trmx_certs::Federation;
use trmx_proto::envelope::sha256;
use trmx_proto::pb::exchange_client::ExchangeClient;
use trmx_proto::time::to_timestamp;
use trmx_proto::{CaseRef, Kind, MessageId, pb};
use trmx_transport::{ClientOptions, TlsPaths, client_channel};

pub(crate) type Client = ExchangeClient<Channel>;

/// How long a test waits for something that should happen.
pub(crate) const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure that something does NOT happen.
pub(crate) const QUIET: Duration = Duration::from_millis(400);

/// The test federation: NL-NRM accepts everything; BE-PAYOKE accepts no
/// return-risk-assessment requests; INT-IOM accepts follow-ups only.
pub(crate) fn participants() -> Vec<ParticipantConfig> {
    let all: Vec<String> = Kind::APPLICATION
        .iter()
        .map(|k| k.name().to_string())
        .collect();
    vec![
        ParticipantConfig {
            id: "NL-NRM".into(),
            display_name: "Dutch NRM".into(),
            country: "NL".into(),
            organisation_type: OrganisationType::Nrm,
            accepts: all,
        },
        ParticipantConfig {
            id: "BE-PAYOKE".into(),
            display_name: "Payoke".into(),
            country: "BE".into(),
            organisation_type: OrganisationType::Ngo,
            accepts: vec![
                "referral".into(),
                "referral-response".into(),
                "follow-up".into(),
            ],
        },
        ParticipantConfig {
            id: "INT-IOM".into(),
            display_name: "IOM".into(),
            country: "INT".into(),
            organisation_type: OrganisationType::InternationalOrganisation,
            accepts: vec!["follow-up".into()],
        },
    ]
}

/// A federation CA and the broker's certificate in `dir`.
pub(crate) struct Pki {
    pub(crate) federation: Federation,
    pub(crate) tls: TlsConfig,
}

impl Pki {
    pub(crate) fn create(dir: &Path) -> anyhow::Result<Self> {
        let federation = Federation::create(&dir.join("pki"), "trm.test")?;
        let broker = federation.broker("test-1")?;
        let tls = TlsConfig {
            ca: federation.ca_cert_path(),
            cert: broker.cert,
            key: broker.key,
            crl: Some(federation.crl_path()),
            crl_reload_interval: Duration::from_secs(3600),
            crl_policy: Default::default(),
        };
        Ok(Self { federation, tls })
    }

    /// Client TLS files of a participant (issued on first use).
    pub(crate) fn participant(&self, id: &str) -> anyhow::Result<TlsPaths> {
        let path = self.federation.dir.join(format!("{id}.pem"));
        let cert = if path.exists() {
            trmx_certs::CertPaths::for_cert(&path)
        } else {
            self.federation.participant(id)?
        };
        Ok(TlsPaths {
            ca: self.federation.ca_cert_path(),
            cert: cert.cert,
            key: cert.key,
        })
    }
}

/// A test config: fast timers, small envelopes, generous rates, no disk watermark.
pub(crate) fn test_config(data_dir: PathBuf, tls: TlsConfig) -> BrokerConfig {
    let mut config = BrokerConfig::new(data_dir, tls);
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.participants = participants();
    config.store.cache_capacity = 8 << 20;
    config.limits.max_envelope_bytes = 64 << 10;
    config.limits.min_free_disk_bytes = 0;
    config.limits.sender_rate_per_second = 100_000;
    config.limits.sender_rate_burst = 100_000;
    config.limits.max_streams_per_participant = 4;
    config.limits.shutdown_grace = Duration::from_secs(3);
    config.lifecycle.ack_timeout = Duration::from_secs(10);
    config.lifecycle.backoff_base = Duration::from_secs(1);
    config.lifecycle.backoff_max = Duration::from_secs(2);
    config.lifecycle.max_attempts = 3;
    config.lifecycle.tick_interval = Duration::from_millis(20);
    config
}

/// The message lifetime and metadata retention of
/// [`TestBroker::start_with_a_days_retention`].
pub(crate) const RETENTION_DAY: Duration = Duration::from_secs(86_400);

/// A running in-process broker with its PKI, data dir and manual clock.
pub(crate) struct TestBroker {
    pub(crate) _dir: TempDir,
    pub(crate) pki: Pki,
    pub(crate) clock: ManualClock,
    pub(crate) config: BrokerConfig,
    pub(crate) broker: RunningBroker,
    pub(crate) addr: SocketAddr,
}

impl TestBroker {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// A broker whose messages live at most [`RETENTION_DAY`] and whose metadata is kept
    /// as long: short enough for the test certificates to stay valid when a test moves the
    /// broker's clock past both.
    pub(crate) async fn start_with_a_days_retention() -> anyhow::Result<Self> {
        Self::start_with(|c| {
            c.limits.default_lifetime = RETENTION_DAY;
            c.limits.max_lifetime = RETENTION_DAY;
            c.lifecycle.metadata_retention = RETENTION_DAY;
        })
        .await
    }

    pub(crate) async fn start_with(adjust: impl FnOnce(&mut BrokerConfig)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::create(dir.path())?;
        let mut config = test_config(dir.path().join("data"), pki.tls.clone());
        adjust(&mut config);
        let clock = ManualClock::new(SystemTime::now());
        let broker = start_broker(&config, &clock).await?;
        let addr = broker.local_addr();
        Ok(Self {
            _dir: dir,
            pki,
            clock,
            config,
            broker,
            addr,
        })
    }

    /// Shuts the broker down in order and starts it again on the same data dir
    /// (new port).
    pub(crate) async fn restart(&mut self) -> anyhow::Result<()> {
        self.broker.shutdown().await?;
        self.broker = start_broker(&self.config, &self.clock).await?;
        self.addr = self.broker.local_addr();
        Ok(())
    }

    /// An `Exchange` client with `id`'s certificate.
    pub(crate) fn client(&self, id: &str) -> anyhow::Result<Client> {
        client(self.addr, &self.pki.participant(id)?)
    }

    /// A client with an operator certificate.
    pub(crate) fn operator_client(&self, name: &str) -> anyhow::Result<Client> {
        let cert = self.pki.federation.operator(name)?;
        let paths = TlsPaths {
            ca: self.pki.federation.ca_cert_path(),
            cert: cert.cert,
            key: cert.key,
        };
        client(self.addr, &paths)
    }

    pub(crate) fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

pub(crate) async fn start_broker(
    config: &BrokerConfig,
    clock: &ManualClock,
) -> anyhow::Result<RunningBroker> {
    // The previous broker on this data dir may still be letting go of its
    // files: retry briefly.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        match Broker::builder(config.clone())
            .clock(clock.clone())
            .start(listener)
            .await
        {
            Ok(broker) => return Ok(broker),
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("broker start failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("starting the broker"),
        }
    }
}

pub(crate) fn client(addr: SocketAddr, paths: &TlsPaths) -> anyhow::Result<Client> {
    let channel = client_channel(&addr.to_string(), paths, &ClientOptions::default())?;
    Ok(ExchangeClient::new(channel))
}

/// A valid envelope from the caller to `to`.
pub(crate) fn envelope(to: &str, kind: Kind, payload: &[u8]) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_v7().to_string(),
        recipient: to.into(),
        kind: kind.to_pb() as i32,
        case_ref: CaseRef::new_random().to_string(),
        priority: pb::Priority::Normal as i32,
        created_at: Some(to_timestamp(SystemTime::now())),
        payload_sha256: sha256(payload).to_vec(),
        payload: payload.to_vec(),
        content_type: kind.content_type(),
        ..Default::default()
    }
}

pub(crate) fn referral(to: &str) -> pb::Envelope {
    envelope(to, Kind::Referral, b"opaque referral body")
}

pub(crate) async fn submit(
    client: &mut Client,
    env: pb::Envelope,
) -> Result<pb::SubmitReceipt, tonic::Status> {
    client
        .submit(pb::SubmitRequest {
            envelope: Some(env),
        })
        .await
        .map(tonic::Response::into_inner)
}

pub(crate) async fn receive(
    client: &mut Client,
    max_in_flight: u32,
) -> anyhow::Result<Streaming<pb::Delivery>> {
    Ok(client
        .receive(pb::ReceiveRequest { max_in_flight })
        .await?
        .into_inner())
}

/// The next delivery, failing after [`WAIT`].
pub(crate) async fn next(stream: &mut Streaming<pb::Delivery>) -> anyhow::Result<pb::Delivery> {
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(Some(delivery))) => Ok(delivery),
        Ok(Ok(None)) => anyhow::bail!("stream ended"),
        Ok(Err(status)) => anyhow::bail!("stream failed: {status}"),
        Err(_) => anyhow::bail!("no delivery within {WAIT:?}"),
    }
}

/// The next delivery on whichever of `streams` (one participant's) gets one first,
/// failing after [`WAIT`]. A message that becomes due wakes all of its recipient's
/// streams, and any of them may lease it: a test cannot tell which.
pub(crate) async fn next_on_any(
    streams: &mut [Streaming<pb::Delivery>],
) -> anyhow::Result<pb::Delivery> {
    anyhow::ensure!(!streams.is_empty(), "no stream to read");
    let reads = streams.iter_mut().map(|s| Box::pin(s.message()));
    match tokio::time::timeout(WAIT, futures::future::select_all(reads)).await {
        Ok((Ok(Some(delivery)), _, _)) => Ok(delivery),
        Ok((Ok(None), n, _)) => anyhow::bail!("stream {n} ended"),
        Ok((Err(status), n, _)) => anyhow::bail!("stream {n} failed: {status}"),
        Err(_) => anyhow::bail!("no delivery on any of the streams within {WAIT:?}"),
    }
}

/// Asserts that no delivery arrives within [`QUIET`].
pub(crate) async fn expect_quiet(stream: &mut Streaming<pb::Delivery>) -> anyhow::Result<()> {
    match tokio::time::timeout(QUIET, stream.message()).await {
        Err(_) => Ok(()),
        Ok(Ok(Some(delivery))) => anyhow::bail!(
            "unexpected delivery of {}",
            delivery.envelope.map(|e| e.message_id).unwrap_or_default()
        ),
        Ok(other) => anyhow::bail!("stream ended unexpectedly: {other:?}"),
    }
}

pub(crate) fn id_of(delivery: &pb::Delivery) -> String {
    delivery
        .envelope
        .as_ref()
        .map(|e| e.message_id.clone())
        .unwrap_or_default()
}

pub(crate) async fn ack<S: ToString>(
    client: &mut Client,
    ids: impl IntoIterator<Item = S>,
) -> anyhow::Result<Vec<pb::AckResult>> {
    let response = client
        .ack(pb::AckRequest {
            message_ids: ids.into_iter().map(|id| id.to_string()).collect(),
        })
        .await?
        .into_inner();
    Ok(response
        .results
        .iter()
        .map(|r| pb::AckResult::try_from(r.result).unwrap_or(pb::AckResult::Unspecified))
        .collect())
}

pub(crate) async fn status(
    client: &mut Client,
    id: &str,
) -> Result<pb::MessageStatus, tonic::Status> {
    client
        .get_status(pb::GetStatusRequest {
            message_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

pub(crate) async fn state_of(client: &mut Client, id: &str) -> anyhow::Result<pb::MessageState> {
    let status = status(client, id).await?;
    Ok(pb::MessageState::try_from(status.state)?)
}

/// Waits up to [`WAIT`] until `id` is in `state` (the broker may record a change a
/// moment after a client sees its cause: a stream it ended releases its leases then).
pub(crate) async fn wait_state(
    client: &mut Client,
    id: &str,
    state: pb::MessageState,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = state_of(client, id).await?;
        if now == state {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{id} is {now:?}, never {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The receipt carried by a delivery of a broker-made kind.
pub(crate) fn receipt(delivery: &pb::Delivery) -> anyhow::Result<(Kind, pb::Receipt)> {
    use prost::Message;
    let env = delivery.envelope.as_ref().context("no envelope")?;
    let kind = Kind::from_pb(env.kind).context("bad kind")?;
    anyhow::ensure!(kind.is_broker_made(), "not a receipt: {kind}");
    anyhow::ensure!(env.sender.is_empty(), "receipt with a sender");
    Ok((kind, pb::Receipt::decode(env.payload.as_slice())?))
}

pub(crate) fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    context: &str,
) -> tonic::Status {
    match result {
        Ok(value) => panic!("{context}: expected {code:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{context}: {}", status.message());
            status
        }
    }
}

/// Moves the clock past a lease's ack timeout (10 s) and the longest backoff
/// (2 s) of [`TestBroker`], and waits until the broker's timers acted on it:
/// the message was handed out again (one more attempt) or left `IN_FLIGHT`
/// (dead-lettered after its last attempt). The backoff counts from the ack
/// deadline, so a due message may be leased again before any poll sees it
/// `ACCEPTED`: the attempt count is what tells.
pub(crate) async fn time_out_lease(
    t: &TestBroker,
    sender: &mut Client,
    id: &str,
) -> anyhow::Result<()> {
    let before = status(sender, id).await?.attempts;
    t.advance(Duration::from_secs(10 + 2 + 1));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = status(sender, id).await?;
        if st.state != pb::MessageState::InFlight as i32 || st.attempts > before {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "lease not timed out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl TestBroker {
    /// A broker on a [`FaultyStore`] over the sled store in its data dir.
    ///
    /// Its timer loop ticks at start and then only when a timer is due: every
    /// tick waits for a flush, so with flushes made to fail (`faults`) a tick
    /// every 20 ms would fail one first about a quarter of the time, and the
    /// write under test would be refused before it is made.
    pub(crate) async fn start_with_faulty_store()
    -> anyhow::Result<(Self, std::sync::Arc<FaultyStore>)> {
        Self::start_with_faulty_store_and(|c| c.lifecycle.tick_interval = Duration::from_secs(3600))
            .await
    }

    /// [`Self::start_with_faulty_store`] with `adjust` applied to the test config (its
    /// timer loop ticks every 20 ms unless `adjust` says otherwise).
    pub(crate) async fn start_with_faulty_store_and(
        adjust: impl FnOnce(&mut BrokerConfig),
    ) -> anyhow::Result<(Self, std::sync::Arc<FaultyStore>)> {
        use trmx_broker::store::{SledOptions, SledStore};

        let dir = tempfile::tempdir()?;
        let pki = Pki::create(dir.path())?;
        let mut config = test_config(dir.path().join("data"), pki.tls.clone());
        adjust(&mut config);
        let store = SledStore::open(
            &config.data_dir,
            SledOptions::default(),
            trmx_broker::server::lifecycle_of(&config),
        )?;
        let store = std::sync::Arc::new(FaultyStore {
            inner: store,
            fail_reads: std::sync::atomic::AtomicBool::new(false),
            reads_passing: std::sync::atomic::AtomicUsize::new(0),
            fail_ticks: std::sync::atomic::AtomicBool::new(false),
            lease_panics_after: std::sync::atomic::AtomicUsize::new(usize::MAX),
            release_panics: std::sync::atomic::AtomicBool::new(false),
            leased_panics: std::sync::atomic::AtomicBool::new(false),
            fail_releases: std::sync::atomic::AtomicBool::new(false),
        });
        let clock = ManualClock::new(SystemTime::now());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let broker = Broker::builder(config.clone())
            .clock(clock.clone())
            .store(store.clone())
            .start(listener)
            .await?;
        let addr = broker.local_addr();
        let t = Self {
            _dir: dir,
            pki,
            clock,
            config,
            broker,
            addr,
        };
        Ok((t, store))
    }
}

/// The sled store, whose operator reads (`search`, `dead_letters`,
/// `queue_stats`, `status`) fail like a failing disk while `fail_reads` is
/// set: what a read after a durable change meets when the disk goes bad.
/// While `fail_ticks` is set, every `tick` fails after applying its timers,
/// as one fails whose later batch cannot be written, reporting what it applied.
#[derive(Debug)]
pub(crate) struct FaultyStore {
    inner: trmx_broker::store::SledStore,
    pub(crate) fail_reads: std::sync::atomic::AtomicBool,
    /// While `fail_reads` is set, this many reads still succeed first.
    pub(crate) reads_passing: std::sync::atomic::AtomicUsize,
    pub(crate) fail_ticks: std::sync::atomic::AtomicBool,
    /// This many more `lease` calls pass, then each panics, as a bug in the broker
    /// would make a stream's task panic (`usize::MAX`: never).
    pub(crate) lease_panics_after: std::sync::atomic::AtomicUsize,
    /// While set, every `release_stream` panics, as a bug in the broker would make the
    /// release of a closed stream's leases panic.
    pub(crate) release_panics: std::sync::atomic::AtomicBool,
    /// While set, every `lease` that leases a message panics once the store made the
    /// lease, as a bug that a delivery's content trips would make its stream's task
    /// panic while it holds that delivery.
    pub(crate) leased_panics: std::sync::atomic::AtomicBool,
    /// While set, every `release_stream` fails after applying the release, as one fails
    /// whose later batch cannot be written, reporting what it committed.
    pub(crate) fail_releases: std::sync::atomic::AtomicBool,
}

impl FaultyStore {
    /// The switch that makes the store's flushes fail like a failing disk.
    pub(crate) fn faults(&self) -> trmx_broker::store::FaultSwitch {
        self.inner.fault_switch()
    }

    fn read_fault(&self) -> Result<(), trmx_broker::store::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let passing = || {
            self.reads_passing
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        if self.fail_reads.load(SeqCst) && !passing() {
            Err(trmx_broker::store::StoreError::Unavailable(
                "storage error: injected read fault".into(),
            ))
        } else {
            Ok(())
        }
    }
}

mod faulty {
    use trmx_broker::store::*;
    use trmx_proto::{MessageId, ParticipantId};

    use super::FaultyStore;

    #[tonic::async_trait]
    impl BrokerStore for FaultyStore {
        async fn submit(
            &self,
            msg: NewMessage,
            now: Millis,
        ) -> Result<SubmitOutcome, ChangeError<SubmitOutcome>> {
            self.inner.submit(msg, now).await
        }
        async fn resubmitted(
            &self,
            sender: &ParticipantId,
            id: MessageId,
            fingerprint: [u8; 32],
        ) -> Result<Option<Accepted>, StoreError> {
            self.inner.resubmitted(sender, id, fingerprint).await
        }
        async fn lease(
            &self,
            recipient: &ParticipantId,
            stream: StreamId,
            max: usize,
            max_bytes: u64,
            now: Millis,
        ) -> Result<Vec<Leased>, StoreError> {
            use std::sync::atomic::Ordering::SeqCst;
            let passing = self
                .lease_panics_after
                .fetch_update(SeqCst, SeqCst, |n| match n {
                    usize::MAX => Some(n),
                    n => n.checked_sub(1),
                })
                .is_ok();
            assert!(passing, "injected: a lease panics");
            let leased = self
                .inner
                .lease(recipient, stream, max, max_bytes, now)
                .await;
            let holding = leased.as_ref().is_ok_and(|l| !l.is_empty());
            assert!(
                !(holding && self.leased_panics.load(SeqCst)),
                "injected: handling a leased delivery panics"
            );
            leased
        }
        async fn ack(
            &self,
            recipient: &ParticipantId,
            ids: &[MessageId],
            now: Millis,
        ) -> Result<Vec<AckResult>, ChangeError<Vec<AckResult>>> {
            self.inner.ack(recipient, ids, now).await
        }
        async fn reject(
            &self,
            recipient: &ParticipantId,
            id: MessageId,
            reason_code: &str,
            field_path: &str,
            now: Millis,
        ) -> Result<RejectResult, ChangeError<RejectResult>> {
            self.inner
                .reject(recipient, id, reason_code, field_path, now)
                .await
        }
        async fn release_stream(
            &self,
            recipient: &ParticipantId,
            stream: StreamId,
            end: StreamEnd,
            now: Millis,
        ) -> Result<Released, ChangeError<Released>> {
            let panics = self
                .release_panics
                .load(std::sync::atomic::Ordering::SeqCst);
            assert!(!panics, "injected: a stream's release panics");
            let released = self
                .inner
                .release_stream(recipient, stream, end, now)
                .await?;
            if self.fail_releases.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(ChangeError {
                    committed: Some(released),
                    error: StoreError::Corrupt(
                        "injected: a later batch of the release failed".into(),
                    ),
                });
            }
            Ok(released)
        }
        async fn withdraw(
            &self,
            sender: &ParticipantId,
            id: MessageId,
            now: Millis,
        ) -> Result<WithdrawResult, ChangeError<WithdrawResult>> {
            self.inner.withdraw(sender, id, now).await
        }
        async fn status(
            &self,
            sender: &ParticipantId,
            id: MessageId,
        ) -> Result<Option<StatusRecord>, StoreError> {
            self.read_fault()?;
            self.inner.status(sender, id).await
        }
        async fn tick(&self, now: Millis) -> Result<TickReport, TickError> {
            let report = self.inner.tick(now).await?;
            if self.fail_ticks.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(TickError {
                    applied: Box::new(report),
                    error: StoreError::Corrupt("injected: a later batch of the tick failed".into()),
                });
            }
            Ok(report)
        }
        async fn next_timer(&self) -> Result<Option<Millis>, StoreError> {
            self.inner.next_timer().await
        }
        async fn recover(&self, now: Millis) -> Result<u64, StoreError> {
            self.inner.recover(now).await
        }
        async fn last_running(&self) -> Result<Option<Millis>, StoreError> {
            self.inner.last_running().await
        }
        async fn mark_running(&self, now: Millis) -> Result<(), StoreError> {
            self.inner.mark_running(now).await
        }
        async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
            self.read_fault()?;
            self.inner.queue_stats().await
        }
        async fn purge(
            &self,
            id: MessageId,
            sender: Option<&ParticipantId>,
            reason: &str,
            now: Millis,
        ) -> Result<PurgeResult, ChangeError<PurgeResult>> {
            self.inner.purge(id, sender, reason, now).await
        }
        async fn redrive(
            &self,
            id: MessageId,
            sender: Option<&ParticipantId>,
            now: Millis,
        ) -> Result<RedriveResult, ChangeError<RedriveResult>> {
            self.inner.redrive(id, sender, now).await
        }
        async fn dead_letters(
            &self,
            limit: usize,
            after_seq: Option<u64>,
        ) -> Result<SearchPage, StoreError> {
            self.read_fault()?;
            self.inner.dead_letters(limit, after_seq).await
        }
        async fn search(&self, filter: SearchFilter) -> Result<SearchPage, StoreError> {
            self.read_fault()?;
            self.inner.search(filter).await
        }
        async fn audit_append_operator(
            &self,
            action: OperatorAction,
            now: Millis,
        ) -> Result<(), StoreError> {
            self.inner.audit_append_operator(action, now).await
        }
        async fn audit_verify(&self) -> Result<AuditReport, StoreError> {
            self.inner.audit_verify().await
        }
        async fn operator_purge(
            &self,
            operator: &str,
            id: MessageId,
            sender: Option<&ParticipantId>,
            reason: &str,
            now: Millis,
        ) -> Result<PurgeResult, ChangeError<PurgeResult>> {
            self.inner
                .operator_purge(operator, id, sender, reason, now)
                .await
        }
        async fn operator_redrive(
            &self,
            operator: &str,
            id: MessageId,
            sender: Option<&ParticipantId>,
            now: Millis,
        ) -> Result<RedriveResult, ChangeError<RedriveResult>> {
            self.inner.operator_redrive(operator, id, sender, now).await
        }
        async fn save_presence(&self, seen: Vec<Presence>) -> Result<(), StoreError> {
            self.inner.save_presence(seen).await
        }
        async fn presence(&self) -> Result<Vec<Presence>, StoreError> {
            self.inner.presence().await
        }
        async fn close(&self) -> Result<(), StoreError> {
            self.inner.close().await
        }
        fn writes_durable(&self) -> bool {
            self.inner.writes_durable()
        }
        fn wakeups(&self) -> tokio::sync::broadcast::Receiver<ParticipantId> {
            self.inner.wakeups()
        }
    }
}
