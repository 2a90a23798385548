//! The in-process harness of the node tests: a [`LocalFederation`] in a temp
//! dir, a real broker started, stopped and restarted in this process on one
//! fixed loopback address (same data dir every time), nodes started and
//! stopped in this process with [`RunningNode`], a local API client per node,
//! hand-made `Exchange` clients with a participant's certificate, and
//! [`wait_until`] to poll for an outcome with a deadline (never a fixed sleep).
//!
//! Everything talks real mutual TLS over 127.0.0.1; every certificate is made
//! at run time.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use trmx_broker::clock::ManualClock;
use trmx_broker::{Broker, BrokerConfig, RunningBroker};
use trmx_certs::CertPaths;
use trmx_node::core::SystemClock;
use trmx_node::{NodeConfig, RunningNode};
use trmx_proto::envelope::sha256;
use trmx_proto::pb::exchange_client::ExchangeClient;
use trmx_proto::pb::node_api_client::NodeApiClient;
use trmx_proto::pb::operator_client::OperatorClient;
use trmx_proto::pb::{self, send_request};
use trmx_proto::time::to_timestamp;
use trmx_proto::{CaseRef, Kind, MessageId};
use trmx_transport::{ClientOptions, TlsPaths, client_channel};

use crate::federation::{LocalFederation, STORY_MEMBERS};
use crate::process::ReservedPort;

/// A node's local API client.
pub type Api = NodeApiClient<Channel>;
/// A broker `Exchange` client (a hand-made participant, not a node).
pub type Exchange = ExchangeClient<Channel>;
/// A broker `Operator` client (an operator's certificate).
pub type Operator = OperatorClient<Channel>;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a test watches to be sure that something does NOT happen.
pub const QUIET: Duration = Duration::from_millis(400);
/// How often [`wait_until`] polls.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// The name in the broker's certificate that nodes check.
const BROKER_SERVER_NAME: &str = "localhost";

/// A federation of the story's three participants (`NL-NRM`, `BE-PAYOKE`,
/// `NG-NAPTIP`) in a temp dir: one broker and any number of nodes, all in
/// this process. Dropping it drops the temp dir; call [`Harness::shutdown`]
/// to stop everything in order first.
#[derive(Debug)]
pub struct Harness {
    dir: TempDir,
    /// Certificates and config files.
    pub federation: LocalFederation,
    broker_config: BrokerConfig,
    /// The broker's address, held while the broker is down (see [`ReservedPort`]).
    broker_port: ReservedPort,
    broker: Option<RunningBroker>,
    /// The clock the broker runs on, when a test set one ([`Harness::set_broker_clock`]).
    broker_clock: Option<ManualClock>,
    nodes: BTreeMap<String, (RunningNode, Api)>,
}

impl Harness {
    /// Creates the PKI and the broker config, and picks the broker's address
    /// (127.0.0.1 and a free port, kept across broker restarts). Starts nothing.
    pub async fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("trmx-node-").tempdir()?;
        let root = dir.path().to_owned();
        let federation =
            tokio::task::spawn_blocking(move || LocalFederation::create(&root, &STORY_MEMBERS))
                .await??;
        let path = federation.write_broker_config("")?;
        let mut broker_config = BrokerConfig::load(&path)?;
        // Fast timers so that redeliveries happen within a test's time.
        broker_config.store.cache_capacity = 8 << 20;
        broker_config.limits.min_free_disk_bytes = 0;
        broker_config.limits.shutdown_grace = Duration::from_millis(500);
        broker_config.lifecycle.backoff_base = Duration::from_millis(50);
        broker_config.lifecycle.backoff_max = Duration::from_millis(200);
        broker_config.lifecycle.tick_interval = Duration::from_millis(20);
        broker_config.validate()?;
        Ok(Self {
            dir,
            federation,
            broker_config,
            broker_port: ReservedPort::new()?,
            broker: None,
            broker_clock: None,
            nodes: BTreeMap::new(),
        })
    }

    /// The root of the temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's address (the same across restarts, whether it runs or not).
    pub fn broker_addr(&self) -> SocketAddr {
        self.broker_port.addr()
    }

    /// Starts the broker on [`Harness::broker_addr`] with its data dir.
    pub async fn start_broker(&mut self) -> anyhow::Result<()> {
        if self.broker.is_some() {
            bail!("the broker is already running");
        }
        // The port may still be held briefly by the previous broker's sockets,
        // and its store by the previous broker's last tasks: retry.
        let deadline = Instant::now() + WAIT;
        loop {
            let attempt = async {
                let addr = self.broker_addr();
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let mut builder = Broker::builder(self.broker_config.clone());
                if let Some(clock) = &self.broker_clock {
                    builder = builder.clock(clock.clone());
                }
                builder.start(listener).await.context("starting the broker")
            };
            match attempt.await {
                Ok(broker) => {
                    self.broker = Some(broker);
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("broker start failed, retrying: {e:#}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops the broker in order (its store is flushed and closed).
    pub async fn stop_broker(&mut self) -> anyhow::Result<()> {
        let mut broker = self.broker.take().context("the broker is not running")?;
        broker.shutdown().await?;
        Ok(())
    }

    /// Stops the broker and starts it again on the same address and data dir.
    pub async fn restart_broker(&mut self) -> anyhow::Result<()> {
        self.stop_broker().await?;
        self.start_broker().await
    }

    /// The broker's data directory.
    pub fn broker_data_dir(&self) -> &Path {
        &self.broker_config.data_dir
    }

    /// TLS files of participant `id`.
    pub fn tls(&self, id: &str) -> TlsPaths {
        let cert = CertPaths::from_prefix(&self.federation.pki.dir.join(id));
        TlsPaths {
            ca: self.federation.pki.ca_cert_path(),
            cert: cert.cert,
            key: cert.key,
        }
    }

    /// Writes `<dir>/<id>/node.toml` (the config a node daemon process runs
    /// with) and returns its path.
    pub fn node_config_file(&self, id: &str) -> anyhow::Result<PathBuf> {
        self.federation.write_node_config(id, self.broker_addr())
    }

    /// The config of `id`'s node (the file's, with quick reconnects).
    pub fn node_config(&self, id: &str) -> anyhow::Result<NodeConfig> {
        let mut config = NodeConfig::load(&self.node_config_file(id)?)?;
        config.broker.reconnect_min_ms = 50;
        config.broker.reconnect_max_ms = 250;
        Ok(config)
    }

    /// Starts `id`'s node in this process (the broker may be down) and
    /// returns a client of its local API.
    pub async fn start_node(&mut self, id: &str) -> anyhow::Result<Api> {
        self.start_node_with(id, |_| {}).await
    }

    /// [`Harness::start_node`] with the config changed by `adjust`.
    pub async fn start_node_with(
        &mut self,
        id: &str,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> anyhow::Result<Api> {
        if self.nodes.contains_key(id) {
            bail!("{id}'s node is already running");
        }
        let mut config = self.node_config(id)?;
        adjust(&mut config);
        // A node stopped a moment ago may still be letting go of its store: retry.
        let deadline = Instant::now() + WAIT;
        let node = loop {
            match RunningNode::start(&config, Arc::new(SystemClock)).await {
                Ok(node) => break node,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("{id}'s node start failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("starting {id}'s node")),
            }
        };
        let api = trmx_node::connect_local(node.socket_path())
            .await
            .with_context(|| format!("connecting to {id}'s local API"))?;
        self.nodes.insert(id.to_owned(), (node, api.clone()));
        Ok(api)
    }

    /// Stops `id`'s node in order (API, link, store flushed and closed).
    pub async fn stop_node(&mut self, id: &str) -> anyhow::Result<()> {
        let (node, _) = self
            .nodes
            .remove(id)
            .with_context(|| format!("{id}'s node is not running"))?;
        node.stop().await?;
        Ok(())
    }

    /// Stops `id`'s node and starts it again on the same data dir; returns a
    /// new local API client.
    pub async fn restart_node(&mut self, id: &str) -> anyhow::Result<Api> {
        self.stop_node(id).await?;
        self.start_node(id).await
    }

    /// A local API client of `id`'s running node.
    pub fn api(&self, id: &str) -> anyhow::Result<Api> {
        self.nodes
            .get(id)
            .map(|(_, api)| api.clone())
            .with_context(|| format!("{id}'s node is not running"))
    }

    /// The switch that makes the flushes of `id`'s running node's store fail like a
    /// full disk ([`trmx_node::core::NodeCore::store_faults`]).
    pub fn node_store_faults(&self, id: &str) -> anyhow::Result<trmx_node::core::StoreFaults> {
        self.nodes
            .get(id)
            .map(|(node, _)| node.core().store_faults())
            .with_context(|| format!("{id}'s node is not running"))
    }

    /// An `Exchange` client that talks to the broker directly with `id`'s
    /// certificate (a hand-made participant instead of a node).
    pub fn exchange(&self, id: &str) -> anyhow::Result<Exchange> {
        let options = ClientOptions {
            server_name: BROKER_SERVER_NAME.to_owned(),
            ..ClientOptions::default()
        };
        let channel = client_channel(&self.broker_addr().to_string(), &self.tls(id), &options)?;
        Ok(ExchangeClient::new(channel))
    }

    /// Stops every node, then the broker.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for id in ids {
            self.stop_node(&id).await?;
        }
        if self.broker.is_some() {
            self.stop_broker().await?;
        }
        Ok(())
    }
}

/// Calls `check` until it returns `Some` (or fails), for at most `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

// ---- local API helpers ----------------------------------------------------------

/// A `Send` of `json` as `kind` to `to` that opens a new case.
pub fn json_request(key: &str, to: &str, kind: Kind, json: &str) -> pb::SendRequest {
    pb::SendRequest {
        kind: kind.to_pb() as i32,
        recipient: to.to_owned(),
        new_case: true,
        priority: pb::Priority::Normal as i32,
        idempotency_key: key.to_owned(),
        body: Some(send_request::Body::BodyJson(json.to_owned())),
        ..Default::default()
    }
}

/// A `Send` of `json` as `kind` to `to`, answering `in_reply_to` in `case_ref`.
pub fn reply_request(
    key: &str,
    to: &str,
    kind: Kind,
    json: &str,
    case_ref: &str,
    in_reply_to: &str,
) -> pb::SendRequest {
    pb::SendRequest {
        new_case: false,
        case_ref: case_ref.to_owned(),
        in_reply_to: in_reply_to.to_owned(),
        ..json_request(key, to, kind, json)
    }
}

/// Sends and returns the response.
pub async fn send(
    api: &mut Api,
    request: pb::SendRequest,
) -> Result<pb::SendResponse, tonic::Status> {
    api.send(request).await.map(tonic::Response::into_inner)
}

/// The outbox entry of `id`, if the node sent it.
pub async fn outbox_entry(api: &mut Api, id: &str) -> anyhow::Result<Option<pb::OutboxEntry>> {
    Ok(match message(api, id).await?.and_then(|m| m.entry) {
        Some(pb::get_message_response::Entry::Outbox(entry)) => Some(entry),
        _ => None,
    })
}

/// The inbox entry of `id`, if the node received it.
pub async fn inbox_entry(api: &mut Api, id: &str) -> anyhow::Result<Option<pb::InboxEntry>> {
    Ok(match message(api, id).await?.and_then(|m| m.entry) {
        Some(pb::get_message_response::Entry::Inbox(entry)) => Some(entry),
        _ => None,
    })
}

/// `GetMessage`; `None` for `NOT_FOUND`.
pub async fn message(api: &mut Api, id: &str) -> anyhow::Result<Option<pb::GetMessageResponse>> {
    match api
        .get_message(pb::GetMessageRequest {
            message_id: id.to_owned(),
            ..Default::default()
        })
        .await
    {
        Ok(response) => Ok(Some(response.into_inner())),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(status.into()),
    }
}

/// Every outbox entry (newest first), a page at a time.
pub async fn outbox(api: &mut Api) -> anyhow::Result<Vec<pb::OutboxEntry>> {
    every_page(async |page_token| {
        let page = api
            .list_outbox(pb::ListOutboxRequest {
                limit: 1_000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok((page.entries, page.next_page_token))
    })
    .await
}

/// Every inbox entry (newest first), a page at a time.
pub async fn inbox(api: &mut Api) -> anyhow::Result<Vec<pb::InboxEntry>> {
    every_page(async |page_token| {
        let page = api
            .list_inbox(pb::ListInboxRequest {
                limit: 1_000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok((page.entries, page.next_page_token))
    })
    .await
}

/// The entries of every page `fetch(page_token)` returns with its next token,
/// until that token is empty.
async fn every_page<T>(
    mut fetch: impl AsyncFnMut(String) -> anyhow::Result<(Vec<T>, String)>,
) -> anyhow::Result<Vec<T>> {
    let mut entries = Vec::new();
    let mut page_token = String::new();
    loop {
        let (page, next) = fetch(page_token).await?;
        entries.extend(page);
        if next.is_empty() {
            return Ok(entries);
        }
        page_token = next;
    }
}

/// The node's status.
pub async fn node_status(api: &mut Api) -> anyhow::Result<pb::NodeStatus> {
    Ok(api
        .get_node_status(pb::GetNodeStatusRequest {})
        .await?
        .into_inner())
}

/// A case timeline (oldest first), a page at a time.
pub async fn timeline(api: &mut Api, case_ref: &str) -> anyhow::Result<Vec<pb::TimelineEntry>> {
    every_page(async |page_token| {
        let page = api
            .get_case(pb::GetCaseRequest {
                case_ref: case_ref.to_owned(),
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok((page.entries, page.next_page_token))
    })
    .await
}

/// Waits until the outbox entry of `id` satisfies `done`.
pub async fn wait_outbox(
    api: &Api,
    id: &str,
    what: &str,
    done: impl Fn(&pb::OutboxEntry) -> bool,
) -> anyhow::Result<pb::OutboxEntry> {
    let done = &done;
    wait_until(WAIT, what, || {
        let mut api = api.clone();
        async move { Ok(outbox_entry(&mut api, id).await?.filter(|e| done(e))) }
    })
    .await
}

/// Waits until the outbox shows `id` delivered; fails at once if it failed.
pub async fn wait_delivered(api: &Api, id: &str) -> anyhow::Result<pb::OutboxEntry> {
    let entry = wait_outbox(api, id, &format!("{id} delivered or failed"), |e| {
        e.state == pb::OutboxState::Delivered as i32 || e.state == pb::OutboxState::Failed as i32
    })
    .await?;
    if entry.state != pb::OutboxState::Delivered as i32 {
        bail!("{id} failed: {:?}", entry.failure);
    }
    Ok(entry)
}

/// Waits until the inbox has `id`.
pub async fn wait_received(api: &Api, id: &str) -> anyhow::Result<pb::InboxEntry> {
    wait_until(WAIT, &format!("{id} in the inbox"), || {
        let mut api = api.clone();
        async move { inbox_entry(&mut api, id).await }
    })
    .await
}

/// Opens a `Watch` stream after `after_seq`.
pub async fn watch(api: &mut Api, after_seq: u64) -> anyhow::Result<Streaming<pb::InboxEntry>> {
    Ok(api
        .watch(pb::WatchRequest { after_seq })
        .await?
        .into_inner())
}

/// The next item of a stream, failing after [`WAIT`].
pub async fn next_item<T>(stream: &mut Streaming<T>) -> anyhow::Result<T> {
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(Some(item))) => Ok(item),
        Ok(Ok(None)) => bail!("stream ended"),
        Ok(Err(status)) => bail!("stream failed: {status}"),
        Err(_) => bail!("nothing on the stream within {WAIT:?}"),
    }
}

/// Checks that nothing arrives on a stream for [`QUIET`].
pub async fn expect_quiet<T: std::fmt::Debug>(stream: &mut Streaming<T>) -> anyhow::Result<()> {
    match tokio::time::timeout(QUIET, stream.message()).await {
        Err(_) => Ok(()),
        Ok(Ok(Some(item))) => bail!("unexpected item on the stream: {item:?}"),
        Ok(other) => bail!("stream ended unexpectedly: {other:?}"),
    }
}

// ---- hand-made Exchange helpers ----------------------------------------------------

/// A valid envelope to `to` carrying `payload` as a body of `kind` (digest
/// and content type right, whatever the payload is), in a new case.
pub fn envelope(to: &str, kind: Kind, payload: Vec<u8>) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_v7().to_string(),
        recipient: to.to_owned(),
        kind: kind.to_pb() as i32,
        case_ref: CaseRef::new_random().to_string(),
        priority: pb::Priority::Normal as i32,
        created_at: Some(to_timestamp(SystemTime::now())),
        payload_sha256: sha256(&payload).to_vec(),
        payload,
        content_type: kind.content_type(),
        ..Default::default()
    }
}

/// The broker's status of a message the caller sent.
pub async fn broker_status(exchange: &mut Exchange, id: &str) -> anyhow::Result<pb::MessageStatus> {
    Ok(exchange
        .get_status(pb::GetStatusRequest {
            message_id: id.to_owned(),
        })
        .await?
        .into_inner())
}

// ---- additions for the adversarial tests -------------------------------------------

impl Harness {
    /// The config the broker starts with: adjust it before
    /// [`Harness::start_broker`] (a running broker keeps its old config).
    pub fn broker_config_mut(&mut self) -> &mut BrokerConfig {
        &mut self.broker_config
    }

    /// Re-reads the broker's CRL, certificate and key now and closes the
    /// connections whose certificate no longer verifies (what SIGHUP does).
    pub fn reload_broker_tls(&self) -> anyhow::Result<trmx_transport::ReloadReport> {
        let broker = self.broker.as_ref().context("the broker is not running")?;
        Ok(broker.reload_tls()?)
    }
}

// ---- additions for the network-fault and resource-bound tests ------------------------

impl Harness {
    /// Starts `id`'s node in this process talking to the broker through
    /// `broker` instead of the broker's own address (e.g. a
    /// [`crate::proxy::FaultProxy`] in front of it); returns its local API.
    pub async fn start_node_via(&mut self, id: &str, broker: SocketAddr) -> anyhow::Result<Api> {
        if self.nodes.contains_key(id) {
            bail!("{id}'s node is already running");
        }
        let mut config = self.node_config(id)?;
        config.broker.address = broker.to_string();
        let node = RunningNode::start(&config, Arc::new(SystemClock))
            .await
            .with_context(|| format!("starting {id}'s node"))?;
        let api = trmx_node::connect_local(node.socket_path())
            .await
            .with_context(|| format!("connecting to {id}'s local API"))?;
        self.nodes.insert(id.to_owned(), (node, api.clone()));
        Ok(api)
    }
}

/// Every entry a `Watch` from the start streams: at least `expected`, then
/// whatever else arrives within [`QUIET`] (a duplicate would).
pub async fn watch_all(api: &mut Api, expected: usize) -> anyhow::Result<Vec<pb::InboxEntry>> {
    let mut stream = watch(api, 0).await?;
    let mut seen = Vec::with_capacity(expected);
    loop {
        let wait = if seen.len() >= expected { QUIET } else { WAIT };
        match tokio::time::timeout(wait, stream.message()).await {
            Ok(Ok(Some(entry))) => seen.push(entry),
            Ok(Ok(None)) | Err(_) => return Ok(seen),
            Ok(Err(status)) => bail!("watch failed: {status}"),
        }
    }
}

// ---- additions for the tests of a settle from the broker's status ---------------------

impl Harness {
    /// Runs the broker started next on `clock` instead of the system's: a
    /// [`ManualClock`] that a test moves on (a message's expiry) while a node is down,
    /// so that nothing races the clock.
    pub fn set_broker_clock(&mut self, clock: ManualClock) {
        self.broker_clock = Some(clock);
    }

    /// An `Operator` client with a fresh operator certificate `name` of this federation.
    pub fn operator(&self, name: &str) -> anyhow::Result<Operator> {
        let cert = self.federation.pki.operator(name)?;
        let tls = TlsPaths {
            ca: self.federation.pki.ca_cert_path(),
            cert: cert.cert,
            key: cert.key,
        };
        let options = ClientOptions {
            server_name: BROKER_SERVER_NAME.to_owned(),
            ..ClientOptions::default()
        };
        let channel = client_channel(&self.broker_addr().to_string(), &tls, &options)?;
        Ok(OperatorClient::new(channel))
    }
}
