//! Crash safety under chaos (issue 7, item 1): real broker and node PROCESSES,
//! killed with SIGKILL (or aborted at a named fail point of the broker's store)
//! while messages flow, and a checker that compares what the senders were
//! promised with what the recipient's application saw.
//!
//! - [`Fleet`]: a local federation on disk (S senders `NL-S1`…, one recipient
//!   [`RECIPIENT`]) whose broker and nodes are child processes ([`Daemon`]) of a
//!   multi-call executable (`<exe> broker …`, `<exe> node …`: `trmx-demo` in the
//!   tests, `trmx-chaos` in the long run). The broker listens on a fixed loopback
//!   port, held by the fleet while the broker is down ([`ReservedPort`]), so that a
//!   restarted broker is found by the nodes again.
//! - [`run`]: the chaos run of a [`ChaosPlan`]: every sender's application submits
//!   its share through its node's local API (with an idempotency key, retrying
//!   while its node is down); at evenly spread points of the run each planned
//!   [`Fault`] happens — the broker SIGKILLed at a random moment, the broker
//!   aborting at a fail point (`TRMX_BROKER_FAILPOINT=<point>:N`, N drawn so that
//!   it fires near its turn), the recipient's node or a sender's node SIGKILLed;
//!   each is restarted at once. Then it waits until everything settles and checks:
//!   every message a sender's API accepted is DELIVERED in its outbox and in the
//!   recipient's inbox exactly once (lost = 0), the application's inbox stream
//!   (`Watch` from the start) shows each message once (duplicates = 0); it counts
//!   redeliveries (the broker's `GetStatus` attempts beyond the first, and the
//!   duplicate deliveries the recipient's node dropped) and node resubmits, and
//!   samples the broker's peak RSS (`VmHWM`) of every incarnation.
//! - [`Rng`]: a small seeded generator (SplitMix64); the seed comes from
//!   `TRMX_CHAOS_SEED` ([`seed_from_env`]) so that a failing schedule can be
//!   replayed (the timing of a real system is never exactly the same).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic::Code;
use trmx_broker::BrokerConfig;
pub use trmx_broker::store::sled::failpoint::{FAILPOINT_ENV, FAULT_FILE_ENV, Point};
use trmx_certs::CertPaths;
use trmx_proto::body::Body;
use trmx_proto::envelope::sha256;
use trmx_proto::{Kind, pb};
use trmx_transport::{ClientOptions, TlsPaths, client_channel};

use crate::federation::{LocalFederation, Member};
use crate::harness::{Api, Exchange, json_request};
use crate::process::{Process, ReservedPort};
use crate::story::EXAMPLES;

/// The environment variable that replays a chaos schedule.
pub const SEED_ENV: &str = "TRMX_CHAOS_SEED";
/// The participant every sender writes to.
pub const RECIPIENT: &str = "BE-RCPT";
/// Sender participant ids, in order.
const SENDER_IDS: [&str; 8] = [
    "NL-S1", "NL-S2", "NL-S3", "NL-S4", "NL-S5", "NL-S6", "NL-S7", "NL-S8",
];
/// Most senders a fleet can have.
pub const MAX_SENDERS: usize = SENDER_IDS.len();
/// How long a broker or node may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Starts tried before a daemon counts as broken.
const START_ATTEMPTS: usize = 3;
/// How often the driver looks at progress and at the processes.
const POLL: Duration = Duration::from_millis(5);
/// How often the broker's VmHWM is sampled.
const RSS_SAMPLE: Duration = Duration::from_millis(50);
/// Longest random wait between reaching a fault's turn and the fault.
const JITTER_MS: u64 = 150;
/// SIGABRT, what a fail point dies of.
const SIGABRT: i32 = 6;
/// The document every chaos message carries (a valid referral).
const REFERRAL: &str = EXAMPLES[0];
/// The attachment every [`ChaosPlan::attachment_every`]-th message adds to
/// it: over sled's 128 KiB blob threshold, so that the broker and the nodes
/// keep that message in a file of its own (`blobs/`).
const ATTACHMENT_BYTES: usize = 200 << 10;

// ---- seeded randomness --------------------------------------------------------------

/// SplitMix64: small, seedable, good enough to schedule faults.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi` (`lo` when `hi < lo`).
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = usize::try_from(self.between(0, i as u64)).unwrap_or(0);
            items.swap(i, j);
        }
    }
}

/// The seed in [`SEED_ENV`], or a fresh one from the clock and the process id.
pub fn seed_from_env() -> anyhow::Result<u64> {
    match std::env::var(SEED_ENV) {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("{SEED_ENV}={text:?} is not a number")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let mut rng = Rng::new((nanos as u64) ^ u64::from(std::process::id()).rotate_left(32));
            Ok(rng.next_u64() >> 1)
        }
    }
}

// ---- daemons ------------------------------------------------------------------------

/// A broker or node process that can be killed and started again with the
/// same arguments; its output is appended to one log across incarnations.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    exe: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    ready: PathBuf,
    process: Option<Process>,
    pid: Arc<AtomicU32>,
    starts: u32,
}

impl Daemon {
    fn new(name: &str, exe: &Path, args: Vec<OsString>, dir: &Path, log: &str) -> Self {
        Self {
            name: name.to_owned(),
            exe: exe.to_owned(),
            args,
            log: dir.join(log),
            ready: dir.join("ready"),
            process: None,
            pid: Arc::default(),
            starts: 0,
        }
    }

    /// Starts the process with the extra environment `env` and waits for its
    /// ready file; returns the file's content (the broker's address, the
    /// node's socket path).
    pub async fn start(&mut self, env: &[(String, String)]) -> anyhow::Result<String> {
        if self.process.is_some() {
            bail!("{} is already running", self.name);
        }
        let mut failure = None;
        for _ in 0..START_ATTEMPTS {
            let (name, exe, args, log, ready, env) = (
                self.name.clone(),
                self.exe.clone(),
                self.args.clone(),
                self.log.clone(),
                self.ready.clone(),
                env.to_vec(),
            );
            let started = tokio::task::spawn_blocking(move || {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Process::start_with_env(&name, &exe, &args, &env, &log, &ready, START_TIMEOUT)
            })
            .await?;
            match started {
                Ok((process, text)) => {
                    self.pid.store(process.pid().unwrap_or(0), Ordering::SeqCst);
                    self.process = Some(process);
                    self.starts += 1;
                    return Ok(text);
                }
                Err(e) => {
                    failure = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(failure.unwrap_or_else(|| anyhow::anyhow!("{} did not start", self.name)))
    }

    /// Kills the process with SIGKILL (a crash) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
        self.pid.store(0, Ordering::SeqCst);
    }

    /// Stops the process in order (SIGTERM); whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        self.pid.store(0, Ordering::SeqCst);
        match self.process.take() {
            Some(mut process) => process.stop(Duration::from_secs(10)),
            None => true,
        }
    }

    /// The exit status if the process ended on its own (then it counts as down).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.process.as_mut()?.try_exit()?;
        self.process = None;
        self.pid.store(0, Ordering::SeqCst);
        Some(status)
    }

    /// Waits (at most `timeout`) until the process exits on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if self.process.is_none() || Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether the process runs (as far as we know).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// The process id of the running incarnation.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::pid)
    }

    /// The log of every incarnation.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }
}

// ---- the fleet ----------------------------------------------------------------------

/// A federation of `senders` senders and one recipient whose broker and
/// nodes run as processes of a multi-call executable.
#[derive(Debug)]
pub struct Fleet {
    /// Root directory.
    pub dir: PathBuf,
    /// PKI and config files.
    pub federation: LocalFederation,
    /// The broker's fixed address.
    pub broker_addr: SocketAddr,
    /// The broker's admin endpoint (`/metrics`, `/readyz`).
    pub admin_addr: SocketAddr,
    /// The two ports, held while the broker is down.
    _ports: [ReservedPort; 2],
    /// The broker's config file.
    pub broker_config: PathBuf,
    /// The broker's data directory.
    pub broker_data_dir: PathBuf,
    /// The broker process.
    pub broker: Daemon,
    /// Node processes by participant id.
    pub nodes: BTreeMap<String, Daemon>,
    /// Sender participant ids.
    pub senders: Vec<String>,
}

fn members(senders: usize) -> Vec<Member> {
    let mut members = vec![Member {
        id: RECIPIENT,
        display_name: "Chaos recipient",
        organisation_type: "ngo",
    }];
    members.extend(SENDER_IDS[..senders].iter().map(|id| Member {
        id,
        display_name: "Chaos sender",
        organisation_type: "nrm",
    }));
    members
}

impl Fleet {
    /// Writes the PKI and every config under `dir`. The broker config gets a
    /// fixed loopback port, an admin port, limits that do not throttle the run
    /// and fast redelivery timers; `tune` adjusts it further. Starts nothing.
    pub async fn create(
        dir: &Path,
        exe: &Path,
        senders: usize,
        tune: impl FnOnce(&mut BrokerConfig),
    ) -> anyhow::Result<Self> {
        if senders == 0 || senders > MAX_SENDERS {
            bail!("senders must be 1..={MAX_SENDERS}, got {senders}");
        }
        let all = members(senders);
        let root = dir.to_owned();
        let federation =
            tokio::task::spawn_blocking(move || LocalFederation::create(&root, &all)).await??;
        let ports = [ReservedPort::new()?, ReservedPort::new()?];
        let (broker_addr, admin_addr) = (ports[0].addr(), ports[1].addr());
        let broker_config = federation.write_broker_config("")?;
        let mut config = BrokerConfig::load(&broker_config)?;
        config.listen = broker_addr;
        config.admin_listen = Some(admin_addr);
        config.store.cache_capacity = 32 << 20;
        config.limits.sender_rate_per_second = 100_000;
        config.limits.sender_rate_burst = 100_000;
        config.limits.shutdown_grace = Duration::from_secs(2);
        config.lifecycle.ack_timeout = Duration::from_secs(10);
        config.lifecycle.backoff_base = Duration::from_millis(50);
        config.lifecycle.backoff_max = Duration::from_millis(500);
        config.lifecycle.tick_interval = Duration::from_millis(50);
        tune(&mut config);
        config.validate()?;
        std::fs::write(&broker_config, config.to_toml()?)?;
        let broker_data_dir = config.data_dir.clone();
        let broker_dir = dir.join("broker");
        let broker = Daemon::new(
            "broker",
            exe,
            vec![
                "broker".into(),
                "--config".into(),
                broker_config.clone().into(),
                "--ready-file".into(),
                broker_dir.join("ready").into(),
            ],
            &broker_dir,
            "broker.log",
        );
        let mut nodes = BTreeMap::new();
        for member in members(senders) {
            let config = federation.write_node_config(member.id, broker_addr)?;
            let text = std::fs::read_to_string(&config)?
                .replace("reconnect_max_ms = 1000", "reconnect_max_ms = 400");
            std::fs::write(&config, text)?;
            let node_dir = dir.join(member.id);
            let daemon = Daemon::new(
                &format!("{} node", member.id),
                exe,
                vec![
                    "node".into(),
                    "--config".into(),
                    config.into(),
                    "run".into(),
                    "--ready-file".into(),
                    node_dir.join("ready").into(),
                ],
                &node_dir,
                "node.log",
            );
            nodes.insert(member.id.to_owned(), daemon);
        }
        Ok(Self {
            dir: dir.to_owned(),
            federation,
            broker_addr,
            admin_addr,
            _ports: ports,
            broker_config,
            broker_data_dir,
            broker,
            nodes,
            senders: SENDER_IDS[..senders]
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        })
    }

    /// Starts the broker with the extra environment `env` (e.g. a fail point).
    pub async fn start_broker(&mut self, env: &[(String, String)]) -> anyhow::Result<()> {
        let addr = self.broker.start(env).await?;
        if addr != self.broker_addr.to_string() {
            bail!("the broker listens on {addr}, not {}", self.broker_addr);
        }
        Ok(())
    }

    /// The node process of `id`.
    pub fn node(&mut self, id: &str) -> anyhow::Result<&mut Daemon> {
        self.nodes
            .get_mut(id)
            .with_context(|| format!("no node {id} in the fleet"))
    }

    /// Starts `id`'s node and connects to its local API.
    pub async fn start_node(&mut self, id: &str) -> anyhow::Result<Api> {
        let socket = self.node(id)?.start(&[]).await?;
        connect(Path::new(&socket)).await
    }

    /// The local API socket of `id`'s node (the same across restarts).
    pub fn socket(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("node.sock")
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

    /// An `Exchange` client straight to the broker with `id`'s certificate.
    pub fn exchange(&self, id: &str) -> anyhow::Result<Exchange> {
        let options = ClientOptions {
            server_name: "localhost".to_owned(),
            ..ClientOptions::default()
        };
        let channel = client_channel(&self.broker_addr.to_string(), &self.tls(id), &options)?;
        Ok(pb::exchange_client::ExchangeClient::new(channel))
    }

    /// Stops the nodes, then the broker, in order; whether all exited cleanly.
    pub async fn stop_all(mut self) -> anyhow::Result<bool> {
        Ok(tokio::task::spawn_blocking(move || {
            let mut clean = true;
            for node in self.nodes.values_mut() {
                clean &= node.stop();
            }
            clean & self.broker.stop()
        })
        .await?)
    }
}

/// Connects to a node's local API (responses of any size: whole outboxes).
pub async fn connect(socket: &Path) -> anyhow::Result<Api> {
    Ok(trmx_node::connect_local(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?
        .max_decoding_message_size(256 << 20))
}

/// `VmHWM` (peak resident set) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// `VmRSS` (resident set now) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Samples the peak RSS of whatever process `pid` names, per pid, until stopped.
#[derive(Debug)]
pub struct RssSampler {
    peaks: Arc<Mutex<BTreeMap<u32, u64>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    /// Starts sampling the process whose id is in `pid` (0: none).
    pub fn start(pid: Arc<AtomicU32>) -> Self {
        let peaks: Arc<Mutex<BTreeMap<u32, u64>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (peaks, stop) = (Arc::clone(&peaks), Arc::clone(&stop));
            async move {
                while !stop.load(Ordering::SeqCst) {
                    let current = pid.load(Ordering::SeqCst);
                    if current != 0
                        && let Some(kib) = peak_rss_kib(current)
                        && let Ok(mut peaks) = peaks.lock()
                    {
                        let peak = peaks.entry(current).or_default();
                        *peak = (*peak).max(kib);
                    }
                    tokio::time::sleep(RSS_SAMPLE).await;
                }
            }
        });
        Self { peaks, stop, task }
    }

    /// The peak of every process seen, in KiB.
    pub async fn finish(self) -> BTreeMap<u32, u64> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.peaks.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

// ---- the plan and the report ----------------------------------------------------------

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the broker at a random moment, restart it.
    BrokerKill,
    /// Make the broker abort at this fail point, restart it.
    BrokerAt(Point),
    /// SIGKILL the recipient's node mid-stream, restart it.
    RecipientKill,
    /// SIGKILL a sender's node (with messages in its outbox), restart it.
    SenderKill,
}

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosPlan {
    /// Number of senders (1..=[`MAX_SENDERS`]).
    pub senders: usize,
    /// Messages in all, spread over the senders.
    pub messages: usize,
    /// The faults, in the order they happen, spread evenly over the run.
    pub faults: Vec<Fault>,
    /// The seed of every random choice.
    pub seed: u64,
    /// Most messages a sender's application lets wait in its node's outbox
    /// (so that the run lasts and the outboxes are never empty).
    pub window: u64,
    /// How long the run may take to settle after the last send.
    pub settle: Duration,
    /// Every this many messages of a sender, one carries a 200 KiB
    /// attachment (0: none).
    pub attachment_every: usize,
    /// Narrate every fault on stderr.
    pub verbose: bool,
}

impl ChaosPlan {
    /// A plan with `broker_kills` broker faults (one per fail point first,
    /// the rest random SIGKILLs), `recipient_kills` and `sender_kills`, in
    /// an order shuffled by `seed`.
    pub fn mixed(
        senders: usize,
        messages: usize,
        broker_kills: usize,
        recipient_kills: usize,
        sender_kills: usize,
        seed: u64,
    ) -> Self {
        let mut faults: Vec<Fault> = Point::ALL
            .into_iter()
            .map(Fault::BrokerAt)
            .chain(std::iter::repeat(Fault::BrokerKill))
            .take(broker_kills)
            .collect();
        faults.extend(std::iter::repeat_n(Fault::RecipientKill, recipient_kills));
        faults.extend(std::iter::repeat_n(Fault::SenderKill, sender_kills));
        Rng::new(seed ^ 0x5eed).shuffle(&mut faults);
        Self {
            senders,
            messages,
            faults,
            seed,
            window: 64,
            settle: Duration::from_secs(120),
            attachment_every: 0,
            verbose: true,
        }
    }
}

/// The figures of a chaos run.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    /// The seed (replay with `TRMX_CHAOS_SEED`).
    pub seed: u64,
    /// Senders.
    pub senders: usize,
    /// Messages the senders' node APIs accepted.
    pub messages_sent: usize,
    /// Broker SIGKILLs at random moments.
    pub broker_kills_random: usize,
    /// Broker aborts per fail point.
    pub broker_kills_at: BTreeMap<&'static str, usize>,
    /// Fail points planned but not reached (the broker was SIGKILLed instead).
    pub fail_points_missed: Vec<&'static str>,
    /// SIGKILLs of the recipient's node.
    pub recipient_kills: usize,
    /// SIGKILLs of a sender's node, with the number of messages queued in its outbox at the time.
    pub sender_kills: Vec<u64>,
    /// Processes that died without being killed (each is a bug).
    pub unexpected_exits: Vec<String>,
    /// Outbox entries DELIVERED (delivery receipt received).
    pub delivered: usize,
    /// Outbox entries FAILED (should be none).
    pub failed: usize,
    /// Accepted messages never in the recipient's inbox.
    pub lost: usize,
    /// Extra copies the application saw (inbox listing and `Watch` stream).
    pub duplicates: usize,
    /// Inbox messages from the senders that no sender's API accepted.
    pub unexpected: usize,
    /// Deliveries beyond the first, per the broker's `GetStatus` attempts.
    pub redeliveries: u64,
    /// Deliveries the recipient's node recognised as already stored (from its log).
    pub duplicate_deliveries_dropped: usize,
    /// Submits beyond the first per message (node outbox `submit_attempts`).
    pub resubmits: u64,
    /// Broker processes started.
    pub broker_incarnations: u32,
    /// Peak RSS (VmHWM) of each broker incarnation that was sampled, in KiB.
    pub broker_peak_rss_kib: Vec<u64>,
    /// Whether everything settled (every message delivered) in time.
    pub settled: bool,
    /// Whether every process stopped cleanly at the end.
    pub clean_stop: bool,
    /// What `trmx-broker store verify` found in the broker's store after
    /// the stop (`None`: not checked, the broker did not stop cleanly).
    pub store_check: Option<String>,
    /// Whether that check found the store consistent.
    pub store_consistent: bool,
    /// Wall time of the run.
    pub wall: Duration,
}

impl ChaosReport {
    /// No loss, no duplicate, nothing unexpected, every fault as planned.
    pub fn ok(&self) -> bool {
        self.settled
            && self.lost == 0
            && self.duplicates == 0
            && self.unexpected == 0
            && self.failed == 0
            && self.unexpected_exits.is_empty()
            && self.delivered == self.messages_sent
            && (self.store_check.is_none() || self.store_consistent)
    }

    /// Total kills of every kind.
    pub fn kills(&self) -> usize {
        self.broker_kills_random
            + self.broker_kills_at.values().sum::<usize>()
            + self.recipient_kills
            + self.sender_kills.len()
    }

    /// The highest broker peak RSS, in KiB.
    pub fn max_broker_rss_kib(&self) -> u64 {
        self.broker_peak_rss_kib.iter().copied().max().unwrap_or(0)
    }
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at: Vec<String> = self
            .broker_kills_at
            .iter()
            .map(|(point, n)| format!("{point} {n}"))
            .collect();
        writeln!(
            f,
            "seed                      {} (replay: {SEED_ENV}={})",
            self.seed, self.seed
        )?;
        writeln!(f, "senders                   {}", self.senders)?;
        writeln!(f, "messages sent             {}", self.messages_sent)?;
        writeln!(f, "kills                     {}", self.kills())?;
        writeln!(f, "  broker, random moment   {}", self.broker_kills_random)?;
        writeln!(
            f,
            "  broker, at fail point   {}",
            if at.is_empty() {
                "0".to_owned()
            } else {
                at.join(", ")
            }
        )?;
        if !self.fail_points_missed.is_empty() {
            writeln!(
                f,
                "  fail points not reached {}",
                self.fail_points_missed.join(", ")
            )?;
        }
        writeln!(f, "  recipient node          {}", self.recipient_kills)?;
        writeln!(
            f,
            "  sender node             {} (outbox queued at kill: {:?})",
            self.sender_kills.len(),
            self.sender_kills
        )?;
        writeln!(f, "delivered (receipts)      {}", self.delivered)?;
        writeln!(f, "failed                    {}", self.failed)?;
        writeln!(f, "lost                      {}", self.lost)?;
        writeln!(f, "duplicates (application)  {}", self.duplicates)?;
        writeln!(f, "unexpected messages       {}", self.unexpected)?;
        writeln!(f, "redeliveries (broker)     {}", self.redeliveries)?;
        writeln!(
            f,
            "duplicates dropped (node) {}",
            self.duplicate_deliveries_dropped
        )?;
        writeln!(f, "resubmits (nodes)         {}", self.resubmits)?;
        writeln!(f, "broker incarnations       {}", self.broker_incarnations)?;
        writeln!(
            f,
            "broker peak RSS           {:.1} MiB (per incarnation, MiB: {:?})",
            self.max_broker_rss_kib() as f64 / 1024.0,
            self.broker_peak_rss_kib
                .iter()
                .map(|k| (*k as f64 / 102.4).round() / 10.0)
                .collect::<Vec<_>>()
        )?;
        if !self.unexpected_exits.is_empty() {
            writeln!(f, "UNEXPECTED EXITS          {:?}", self.unexpected_exits)?;
        }
        writeln!(f, "settled                   {}", self.settled)?;
        writeln!(f, "clean stop                {}", self.clean_stop)?;
        match &self.store_check {
            Some(_) if self.store_consistent => {
                writeln!(f, "broker store              consistent (store verify)")?;
            }
            Some(check) => writeln!(f, "BROKER STORE NOT CONSISTENT\n{check}")?,
            None => writeln!(f, "broker store              not checked")?,
        }
        write!(
            f,
            "wall time                 {:.1} s",
            self.wall.as_secs_f64()
        )
    }
}

// ---- the run ------------------------------------------------------------------------

/// Runs `plan` with the daemons of the multi-call executable `exe` in `dir`.
/// Returns the figures; check [`ChaosReport::ok`]. Errors are failures of
/// the harness itself (a process that cannot start, a node API that breaks).
pub async fn run(exe: &Path, dir: &Path, plan: &ChaosPlan) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let fleet = Fleet::create(dir, exe, plan.senders, |_| {}).await?;
    let mut driver = Driver::new(fleet, plan);
    let result = driver.run().await;
    let Driver {
        fleet,
        mut report,
        sampler,
        ..
    } = driver;
    if let Some(sampler) = sampler {
        report.broker_peak_rss_kib = sampler.finish().await.into_values().collect();
    }
    report.broker_incarnations = fleet.broker.starts();
    let data_dir = fleet.broker_data_dir.clone();
    report.clean_stop = fleet.stop_all().await?;
    if report.clean_stop {
        // every index of the broker's store still holds what its records imply
        let check = tokio::task::spawn_blocking(move || {
            trmx_broker::store::verify_store_offline(&data_dir)
        })
        .await??;
        report.store_consistent = check.is_consistent();
        report.store_check = Some(check.to_string());
    }
    report.wall = started.elapsed();
    result.map(|()| report)
}

/// A sender's application task: its id and the message ids its node accepted.
type SenderTask = tokio::task::JoinHandle<anyhow::Result<(String, Vec<String>)>>;

struct Driver<'p> {
    fleet: Fleet,
    plan: &'p ChaosPlan,
    rng: Rng,
    report: ChaosReport,
    done: Vec<bool>,
    /// The fail point the running broker is armed with, and for which fault.
    armed: Option<(Point, usize)>,
    accepted: Arc<AtomicUsize>,
    sampler: Option<RssSampler>,
}

impl<'p> Driver<'p> {
    fn new(fleet: Fleet, plan: &'p ChaosPlan) -> Self {
        Self {
            fleet,
            plan,
            rng: Rng::new(plan.seed),
            report: ChaosReport {
                seed: plan.seed,
                senders: plan.senders,
                ..ChaosReport::default()
            },
            done: vec![false; plan.faults.len()],
            armed: None,
            accepted: Arc::default(),
            sampler: None,
        }
    }

    fn say(&self, line: &str) {
        if self.plan.verbose {
            eprintln!(
                "chaos [{:>6} sent] {line}",
                self.accepted.load(Ordering::SeqCst)
            );
        }
    }

    /// The progress (messages accepted) at which fault `i` happens.
    fn turn(&self, i: usize) -> usize {
        self.plan.messages * (i + 1) / (self.plan.faults.len() + 1)
    }

    /// Starts the broker, armed with the fail point of the next pending
    /// broker fault after `from` if that is a fail-point fault.
    async fn start_broker(&mut self, from: usize) -> anyhow::Result<()> {
        self.armed = None;
        let next = (from..self.plan.faults.len()).find(|&i| {
            !self.done[i] && matches!(self.plan.faults[i], Fault::BrokerKill | Fault::BrokerAt(_))
        });
        let mut env = Vec::new();
        if let Some(i) = next
            && let Fault::BrokerAt(point) = self.plan.faults[i]
        {
            let now = self.accepted.load(Ordering::SeqCst);
            let gap = self.turn(i).saturating_sub(now).max(1) as u64;
            let hits = self.rng.between((gap / 2).max(1), gap);
            env.push((FAILPOINT_ENV.to_owned(), format!("{}:{hits}", point.name())));
            self.armed = Some((point, i));
            self.say(&format!("broker starts armed with {}:{hits}", point.name()));
        }
        self.fleet.start_broker(&env).await
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        self.start_broker(0).await?;
        self.sampler = Some(RssSampler::start(Arc::clone(&self.fleet.broker.pid)));
        let ids: Vec<String> = self.fleet.nodes.keys().cloned().collect();
        for id in &ids {
            self.fleet.start_node(id).await?;
        }
        let deadline = Instant::now() + self.plan.settle + Duration::from_secs(600);
        let per_sender = self.plan.messages / self.plan.senders;
        let extra = self.plan.messages % self.plan.senders;
        let mut tasks = Vec::new();
        for (n, sender) in self.fleet.senders.clone().into_iter().enumerate() {
            let job = SenderJob {
                socket: self.fleet.socket(&sender),
                sender,
                count: per_sender + usize::from(n < extra),
                window: self.plan.window,
                attachment_every: self.plan.attachment_every,
                accepted: Arc::clone(&self.accepted),
                deadline,
            };
            tasks.push(tokio::spawn(job.run()));
        }

        for i in 0..self.plan.faults.len() {
            self.fault(i, &tasks).await?;
        }
        // The last sends, then everything delivered.
        while !tasks.iter().all(tokio::task::JoinHandle::is_finished) {
            self.watch_processes(self.plan.faults.len()).await?;
            tokio::time::sleep(POLL).await;
        }
        let mut sent = Vec::new();
        for task in tasks {
            sent.push(task.await??);
        }
        self.report.messages_sent = sent.iter().map(|(_, ids)| ids.len()).sum();
        self.say("every message sent; waiting until everything is delivered");
        self.report.settled = self.settle().await?;
        self.check(&sent).await
    }

    /// Waits for fault `i`'s turn, then makes it happen.
    async fn fault(&mut self, i: usize, tasks: &[SenderTask]) -> anyhow::Result<()> {
        let turn = self.turn(i);
        loop {
            self.watch_processes(i).await?;
            if self.done[i]
                || self.accepted.load(Ordering::SeqCst) >= turn
                || tasks.iter().all(tokio::task::JoinHandle::is_finished)
            {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        if self.done[i] {
            return Ok(());
        }
        let jitter = self.rng.between(0, JITTER_MS);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        match self.plan.faults[i] {
            Fault::BrokerKill => {
                self.say("SIGKILL broker");
                self.fleet.broker.kill();
                self.report.broker_kills_random += 1;
                self.done[i] = true;
                self.start_broker(i + 1).await?;
            }
            Fault::BrokerAt(point) => {
                // Armed when the broker started; wait for it to fire.
                let give_up = Instant::now() + Duration::from_secs(20);
                while !self.done[i] {
                    self.watch_processes(i).await?;
                    if Instant::now() > give_up {
                        self.say(&format!(
                            "fail point {} not reached: SIGKILL broker",
                            point.name()
                        ));
                        self.fleet.broker.kill();
                        self.report.fail_points_missed.push(point.name());
                        self.done[i] = true;
                        self.start_broker(i + 1).await?;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            Fault::RecipientKill => {
                self.say("SIGKILL recipient node");
                let node = self.fleet.node(RECIPIENT)?;
                node.kill();
                self.report.recipient_kills += 1;
                self.done[i] = true;
                self.fleet.node(RECIPIENT)?.start(&[]).await?;
            }
            Fault::SenderKill => {
                let n = self.rng.between(0, self.plan.senders as u64 - 1) as usize;
                let sender = self.fleet.senders[n].clone();
                let queued = match connect(&self.fleet.socket(&sender)).await {
                    Ok(mut api) => api
                        .get_node_status(pb::GetNodeStatusRequest {})
                        .await
                        .map(|s| s.into_inner().outbox_queued)
                        .unwrap_or(0),
                    Err(_) => 0,
                };
                self.say(&format!(
                    "SIGKILL {sender} node ({queued} queued in its outbox)"
                ));
                self.fleet.node(&sender)?.kill();
                self.report.sender_kills.push(queued);
                self.done[i] = true;
                self.fleet.node(&sender)?.start(&[]).await?;
            }
        }
        Ok(())
    }

    /// Notices processes that exited on their own: an armed broker at its
    /// fail point (the fault is done), anything else is unexpected. Restarts them.
    async fn watch_processes(&mut self, current: usize) -> anyhow::Result<()> {
        if let Some(status) = self.fleet.broker.try_exit() {
            let next = match self.armed.take() {
                Some((point, i)) if status.signal() == Some(SIGABRT) => {
                    self.say(&format!("broker aborted at fail point {}", point.name()));
                    *self.report.broker_kills_at.entry(point.name()).or_default() += 1;
                    self.done[i] = true;
                    i + 1
                }
                _ => {
                    self.say(&format!("broker exited unexpectedly: {status}"));
                    self.report
                        .unexpected_exits
                        .push(format!("broker: {status}"));
                    current
                }
            };
            self.start_broker(next).await?;
        }
        let ids: Vec<String> = self.fleet.nodes.keys().cloned().collect();
        for id in ids {
            let node = self.fleet.node(&id)?;
            if let Some(status) = node.try_exit() {
                self.say(&format!("{id} node exited unexpectedly: {status}"));
                self.report
                    .unexpected_exits
                    .push(format!("{id} node: {status}"));
                self.fleet.node(&id)?.start(&[]).await?;
            }
        }
        Ok(())
    }

    /// Waits until no sender has anything queued or submitted and the
    /// recipient holds every message; `false` after `plan.settle`.
    async fn settle(&mut self) -> anyhow::Result<bool> {
        let deadline = Instant::now() + self.plan.settle;
        let expected = self.report.messages_sent as u64;
        loop {
            self.watch_processes(self.plan.faults.len()).await?;
            let mut pending = 0;
            for sender in self.fleet.senders.clone() {
                match node_status(&self.fleet.socket(&sender)).await {
                    Some(s) => pending += s.outbox_queued + s.outbox_submitted,
                    None => pending += 1,
                }
            }
            let received = node_status(&self.fleet.socket(RECIPIENT))
                .await
                .map_or(0, |s| s.inbox_total);
            if pending == 0 && received >= expected {
                return Ok(true);
            }
            if Instant::now() > deadline {
                self.say(&format!(
                    "not settled: {pending} outbox entries pending, {received} of {expected} received"
                ));
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Compares what the senders were promised with what the recipient has.
    async fn check(&mut self, sent: &[(String, Vec<String>)]) -> anyhow::Result<()> {
        let mut recipient = connect(&self.fleet.socket(RECIPIENT)).await?;
        // (every page: a run of more than one page's worth once counted half as lost)
        let listed = crate::harness::inbox(&mut recipient).await?;
        let watched = watch_all(&mut recipient, listed.len()).await?;
        let mut copies: HashMap<&str, usize> = HashMap::new();
        for entry in &listed {
            *copies.entry(entry.message_id.as_str()).or_default() += 1;
        }
        let distinct = copies.len();
        let mut duplicates = listed.len() - distinct;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for id in &watched {
            *seen.entry(id.as_str()).or_default() += 1;
        }
        duplicates += watched.len() - seen.len();
        let promised: HashSet<&str> = sent
            .iter()
            .flat_map(|(_, ids)| ids.iter().map(String::as_str))
            .collect();
        let in_inbox: HashSet<&str> = copies.keys().copied().collect();
        let in_stream: HashSet<&str> = seen.keys().copied().collect();
        self.report.duplicates = duplicates;
        self.report.lost = promised
            .iter()
            .filter(|id| !in_inbox.contains(*id) || !in_stream.contains(*id))
            .count();
        self.report.unexpected = in_inbox.difference(&promised).count();

        for (sender, ids) in sent {
            let mut api = connect(&self.fleet.socket(sender)).await?;
            let entries = crate::harness::outbox(&mut api).await?;
            let mine: HashSet<&str> = ids.iter().map(String::as_str).collect();
            for entry in &entries {
                if !mine.contains(entry.message_id.as_str()) {
                    continue;
                }
                match pb::OutboxState::try_from(entry.state) {
                    Ok(pb::OutboxState::Delivered) => self.report.delivered += 1,
                    Ok(pb::OutboxState::Failed) => self.report.failed += 1,
                    _ => {}
                }
                self.report.resubmits += u64::from(entry.submit_attempts.saturating_sub(1));
            }
            let mut exchange = self.fleet.exchange(sender)?;
            for id in ids {
                let status = exchange
                    .get_status(pb::GetStatusRequest {
                        message_id: id.clone(),
                    })
                    .await;
                match status {
                    Ok(status) => {
                        self.report.redeliveries +=
                            u64::from(status.into_inner().attempts.saturating_sub(1));
                    }
                    Err(status) if status.code() == Code::NotFound => {}
                    Err(status) => return Err(status.into()),
                }
            }
        }
        let log = std::fs::read_to_string(self.fleet.node(RECIPIENT)?.log()).unwrap_or_default();
        self.report.duplicate_deliveries_dropped = log
            .lines()
            .filter(|line| line.contains("duplicate delivery acknowledged"))
            .count();
        Ok(())
    }
}

/// A node's status, or `None` while it cannot be reached.
async fn node_status(socket: &Path) -> Option<pb::NodeStatus> {
    let mut api = connect(socket).await.ok()?;
    api.get_node_status(pb::GetNodeStatusRequest {})
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// Every entry a `Watch` from the start streams: at least `expected`, then
/// whatever else comes within a short quiet period.
async fn watch_all(api: &mut Api, expected: usize) -> anyhow::Result<Vec<String>> {
    let mut stream = api
        .watch(pb::WatchRequest { after_seq: 0 })
        .await?
        .into_inner();
    let mut ids = Vec::with_capacity(expected);
    loop {
        let wait = if ids.len() >= expected {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(10)
        };
        match tokio::time::timeout(wait, stream.message()).await {
            Ok(Ok(Some(entry))) => ids.push(entry.message_id),
            Ok(Ok(None)) | Err(_) => return Ok(ids),
            Ok(Err(status)) => bail!("watch failed: {status}"),
        }
    }
}

/// The chaos message with idempotency key `key`: the referral, with a
/// [`ATTACHMENT_BYTES`] attachment when `attach`.
fn chaos_request(key: &str, attach: bool) -> anyhow::Result<pb::SendRequest> {
    let mut request = json_request(key, RECIPIENT, Kind::Referral, REFERRAL);
    if attach {
        let Body::Referral(mut referral) = Body::from_json(Kind::Referral, REFERRAL)? else {
            bail!("the chaos document is not a referral");
        };
        let content: Vec<u8> = (0..ATTACHMENT_BYTES).map(|i| (i % 251) as u8).collect();
        referral.attachments.push(pb::Attachment {
            file_name: "consent-form.pdf".to_owned(),
            media_type: "application/pdf".to_owned(),
            sha256: sha256(&content).to_vec(),
            content,
        });
        request.body = Some(pb::send_request::Body::Referral(referral));
    }
    Ok(request)
}

/// One sender's application: sends `count` referrals through its node's
/// local API with idempotency keys, keeping at most `window` queued, and
/// retrying (same key) while its node is down.
struct SenderJob {
    sender: String,
    socket: PathBuf,
    count: usize,
    window: u64,
    attachment_every: usize,
    accepted: Arc<AtomicUsize>,
    deadline: Instant,
}

impl SenderJob {
    async fn run(self) -> anyhow::Result<(String, Vec<String>)> {
        let mut api: Option<Api> = None;
        let mut ids = Vec::with_capacity(self.count);
        for k in 0..self.count {
            let key = format!("chaos:{}:{k}", self.sender);
            loop {
                if Instant::now() > self.deadline {
                    bail!("{} could not send message {k} in time", self.sender);
                }
                let client = match api.as_mut() {
                    Some(client) => client,
                    None => match connect(&self.socket).await {
                        Ok(client) => api.insert(client),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                match client.get_node_status(pb::GetNodeStatusRequest {}).await {
                    Ok(status) if status.get_ref().outbox_queued >= self.window => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        api = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
                let attach = self.attachment_every > 0 && k % self.attachment_every == 0;
                let request = chaos_request(&key, attach)?;
                match client.send(request).await {
                    Ok(response) => {
                        ids.push(response.into_inner().message_id);
                        self.accepted.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    Err(status)
                        if matches!(
                            status.code(),
                            Code::InvalidArgument | Code::AlreadyExists | Code::PermissionDenied
                        ) =>
                    {
                        bail!("{}'s node refused message {k}: {status}", self.sender);
                    }
                    Err(_) => {
                        // the node is down or going down: same key again
                        api = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        Ok((self.sender, ids))
    }
}

// ---- resource bounds (issue 7, item 5): the long measurements ----------------------------

/// Broker memory with a small and a large backlog (nobody receiving).
#[derive(Debug, Clone, Default)]
pub struct BacklogFigures {
    /// The small backlog, in messages.
    pub small: usize,
    /// The large backlog, in messages.
    pub large: usize,
    /// Payload bytes per message.
    pub payload_bytes: usize,
    /// The broker's sled page cache (`store.cache_capacity`).
    pub cache_bytes: u64,
    /// Broker RSS with the small backlog, KiB.
    pub rss_small_kib: u64,
    /// Broker RSS with the large backlog, KiB.
    pub rss_large_kib: u64,
    /// Broker peak RSS (VmHWM) up to the small backlog, KiB.
    pub peak_small_kib: u64,
    /// Broker peak RSS (VmHWM) up to the large backlog, KiB.
    pub peak_large_kib: u64,
    /// Submits per second while filling.
    pub fill_rate: f64,
}

impl BacklogFigures {
    /// Peak RSS (VmHWM) up to the large backlog over peak RSS up to the small
    /// one: the judged ratio. The peak is what a machine must provide, and it
    /// does not depend on when the allocator happens to hand freed memory back
    /// to the system, which makes the settled RSS of a ~30 MiB process swing
    /// by a fifth between identical runs.
    pub fn ratio(&self) -> f64 {
        self.peak_large_kib as f64 / self.peak_small_kib.max(1) as f64
    }

    /// Settled RSS with the large backlog over settled RSS with the small one
    /// (printed for information).
    pub fn settled_ratio(&self) -> f64 {
        self.rss_large_kib as f64 / self.rss_small_kib.max(1) as f64
    }
}

impl fmt::Display for BacklogFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |kib: u64| kib as f64 / 1024.0;
        writeln!(
            f,
            "backlog {:>7} messages: broker RSS {:6.1} MiB (peak {:6.1} MiB)",
            self.small,
            mib(self.rss_small_kib),
            mib(self.peak_small_kib)
        )?;
        writeln!(
            f,
            "backlog {:>7} messages: broker RSS {:6.1} MiB (peak {:6.1} MiB)",
            self.large,
            mib(self.rss_large_kib),
            mib(self.peak_large_kib)
        )?;
        writeln!(
            f,
            "payload {} bytes, sled page cache {} MiB, filled at {:.0} submits/s",
            self.payload_bytes,
            self.cache_bytes >> 20,
            self.fill_rate
        )?;
        write!(
            f,
            "RSS ratio {:.2} peak to peak (limit 1.5); settled RSS ratio {:.2}",
            self.ratio(),
            self.settled_ratio()
        )
    }
}

/// Fills an offline recipient's queue on a broker process to `small`, then
/// to `large` messages, and measures the broker's RSS at both.
pub async fn measure_backlog(
    exe: &Path,
    dir: &Path,
    small: usize,
    large: usize,
    payload_bytes: usize,
    cache_bytes: Option<u64>,
) -> anyhow::Result<BacklogFigures> {
    // The production defaults (page cache unless `cache_bytes`, limits)
    // except the submit rate, which would make filling take hours.
    let mut cache = 0;
    let mut fleet = Fleet::create(dir, exe, 2, |c| {
        let defaults = BrokerConfig::new(c.data_dir.clone(), c.tls.clone());
        c.store = defaults.store;
        c.lifecycle = defaults.lifecycle;
        if let Some(bytes) = cache_bytes {
            c.store.cache_capacity = bytes;
        }
        cache = c.store.cache_capacity;
    })
    .await?;
    fleet.start_broker(&[]).await?;
    let pid = fleet.broker.pid().context("the broker is not running")?;
    let clients = vec![
        fleet.exchange(&fleet.senders[0])?,
        fleet.exchange(&fleet.senders[1])?,
    ];
    let started = Instant::now();
    fill(&clients, small, payload_bytes).await?;
    let rss_small_kib = settled_rss(pid).await?;
    let peak_small_kib = peak_rss_kib(pid).unwrap_or(0);
    fill(&clients, large - small, payload_bytes).await?;
    let fill_rate = large as f64 / started.elapsed().as_secs_f64();
    let rss_large_kib = settled_rss(pid).await?;
    let peak_large_kib = peak_rss_kib(pid).unwrap_or(0);
    fleet.stop_all().await?;
    Ok(BacklogFigures {
        small,
        large,
        payload_bytes,
        cache_bytes: cache,
        rss_small_kib,
        rss_large_kib,
        peak_small_kib,
        peak_large_kib,
        fill_rate,
    })
}

/// The RSS once the broker has been idle for a moment.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_kib(pid).context("cannot read the broker's RSS")
}

/// Submits `count` messages to [`RECIPIENT`] through `clients`, 32 at a time each.
async fn fill(clients: &[Exchange], count: usize, payload_bytes: usize) -> anyhow::Result<()> {
    const IN_FLIGHT: usize = 32;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        for _ in 0..IN_FLIGHT {
            let (mut client, next) = (client.clone(), Arc::clone(&next));
            tasks.spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < count {
                    let env = crate::harness::envelope(
                        RECIPIENT,
                        Kind::Referral,
                        vec![0x5a; payload_bytes],
                    );
                    client
                        .submit(pb::SubmitRequest {
                            envelope: Some(env),
                        })
                        .await?;
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Submit latencies of one participant, in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    /// Every successful submit's latency.
    pub micros: Vec<u64>,
    /// Submits refused or failed.
    pub errors: usize,
}

impl Latencies {
    /// The `q`-quantile (0..=1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        let mut sorted = self.micros.clone();
        sorted.sort_unstable();
        let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64 / 1000.0
    }
}

/// Another participant's submit latency before and during a flood.
#[derive(Debug, Clone, Default)]
pub struct FloodFigures {
    /// Seconds each phase lasted.
    pub seconds: u64,
    /// The other participant, no flood.
    pub baseline: Latencies,
    /// The other participant, during the flood.
    pub during: Latencies,
    /// Flood submits accepted.
    pub flood_accepted: usize,
    /// Flood submits refused with RESOURCE_EXHAUSTED.
    pub flood_exhausted: usize,
    /// Flood submits that failed otherwise.
    pub flood_other: usize,
    /// The limits in force: rate per second, burst.
    pub rate: (u32, u32),
    /// Flood submits in flight at once.
    pub concurrency: usize,
}

impl FloodFigures {
    /// p99 during the flood over the p99 of the baseline.
    pub fn ratio(&self) -> f64 {
        self.during.quantile_ms(0.99) / self.baseline.quantile_ms(0.99).max(0.001)
    }
}

impl fmt::Display for FloodFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |l: &Latencies| {
            format!(
                "{} submits, {} errors, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                l.micros.len(),
                l.errors,
                l.quantile_ms(0.5),
                l.quantile_ms(0.9),
                l.quantile_ms(0.99),
                l.quantile_ms(1.0)
            )
        };
        writeln!(
            f,
            "other participant, baseline:     {}",
            line(&self.baseline)
        )?;
        writeln!(f, "other participant, during flood: {}", line(&self.during))?;
        writeln!(
            f,
            "flooder ({} s, {} in flight, limit {}/s burst {}): {} accepted, {} RESOURCE_EXHAUSTED, {} other errors",
            self.seconds,
            self.concurrency,
            self.rate.0,
            self.rate.1,
            self.flood_accepted,
            self.flood_exhausted,
            self.flood_other
        )?;
        write!(f, "p99 ratio {:.2} (limit 3.0)", self.ratio())
    }
}

/// With the default limits, one participant floods `Submit` (`concurrency` at a time)
/// while another submits at a steady pace; the other's latency is measured
/// for `seconds` without and then with the flood.
pub async fn measure_flood(
    exe: &Path,
    dir: &Path,
    seconds: u64,
    concurrency: usize,
) -> anyhow::Result<FloodFigures> {
    let mut rate = (0, 0);
    let mut fleet = Fleet::create(dir, exe, 2, |c| {
        let defaults = BrokerConfig::new(c.data_dir.clone(), c.tls.clone());
        c.store = defaults.store;
        c.limits = defaults.limits;
        c.lifecycle = defaults.lifecycle;
        rate = (c.limits.sender_rate_per_second, c.limits.sender_rate_burst);
    })
    .await?;
    fleet.start_broker(&[]).await?;
    let flooder = fleet.exchange(&fleet.senders[0])?;
    let other = fleet.exchange(&fleet.senders[1])?;
    let phase = Duration::from_secs(seconds);
    // warm up the connection
    probe(other.clone(), Duration::from_millis(500)).await?;
    let baseline = probe(other.clone(), phase).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (mut client, stop, counts) = (flooder.clone(), Arc::clone(&stop), Arc::clone(&counts));
        tasks.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let env = crate::harness::envelope(RECIPIENT, Kind::Referral, vec![0x5a; 1024]);
                let slot = match client
                    .submit(pb::SubmitRequest {
                        envelope: Some(env),
                    })
                    .await
                {
                    Ok(_) => 0,
                    Err(status) if status.code() == Code::ResourceExhausted => 1,
                    Err(_) => 2,
                };
                counts[slot].fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let during = probe(other, phase).await;
    stop.store(true, Ordering::SeqCst);
    while tasks.join_next().await.is_some() {}
    let during = during?;
    fleet.stop_all().await?;
    Ok(FloodFigures {
        seconds,
        baseline,
        during,
        flood_accepted: counts[0].load(Ordering::SeqCst),
        flood_exhausted: counts[1].load(Ordering::SeqCst),
        flood_other: counts[2].load(Ordering::SeqCst),
        rate,
        concurrency,
    })
}

/// Submits one message every 20 ms for `phase` on a thread and runtime of
/// its own (so that a busy runtime elsewhere does not delay its clock).
async fn probe(client: Exchange, phase: Duration) -> anyhow::Result<Latencies> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("latency-probe".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let outcome = match runtime {
                Ok(runtime) => runtime.block_on(async move {
                    let mut client = client;
                    let mut latencies = Latencies::default();
                    let end = Instant::now() + phase;
                    let mut tick = tokio::time::interval(Duration::from_millis(20));
                    while Instant::now() < end {
                        tick.tick().await;
                        let env =
                            crate::harness::envelope(RECIPIENT, Kind::Referral, vec![0x33; 1024]);
                        let started = Instant::now();
                        match client
                            .submit(pb::SubmitRequest {
                                envelope: Some(env),
                            })
                            .await
                        {
                            Ok(_) => latencies.micros.push(started.elapsed().as_micros() as u64),
                            Err(_) => latencies.errors += 1,
                        }
                    }
                    latencies
                }),
                Err(e) => {
                    let _ = done.send(Err(anyhow::anyhow!("probe runtime: {e}")));
                    return;
                }
            };
            let _ = done.send(Ok(outcome));
        })?;
    result.await?
}
