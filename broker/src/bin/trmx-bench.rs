//! `trmx-bench`: load benchmark of the broker (issue 3 item 8). Not a test.
//!
//! Runs the real `trmx-broker` binary as a child process (so its RSS is its
//! own), with a fresh federation CA and data directory in a temp dir, and
//! drives it over mutual TLS from this process:
//!
//! 1. throughput: S senders → broker → 1 receiver, `--messages` messages of
//!    `--payload` bytes, each submitted (pipelined, `--pipeline` in flight per
//!    sender), received and acknowledged. Prints submit msgs/s and MiB/s and
//!    end-to-end msgs/s.
//! 2. latency: an open-loop sender at `--rate` msgs/s for `--seconds`;
//!    submit→delivery latency p50/p99/max measured from each message's
//!    scheduled send time.
//! 3. backlog: `--backlog` messages queued for an offline recipient, then
//!    drained; prints the drain rate and the broker's RSS during the backlog.
//!
//! 4. operator reads (`--operator-reads`): with every message of the run on
//!    record, an operator's `GetStatistics` and a `SearchMessages` that
//!    matches nothing (so it reads every record), each with its time and
//!    the broker's RSS while it runs.
//!
//! Then the broker's peak RSS (VmHWM) and the bytes of its data directory.
//!
//! The throughput, fill and drain phases also print the CPU time per message
//! of the broker and of this load generator, and how many cores the two kept
//! busy: on one machine they share the cores, so `cores / (broker + load
//! generator)` bounds the rate, and fill (submit only) plus drain (deliver
//! and ack only) add up to about the end-to-end cost per message.
//!
//! The broker runs with its defaults except the per-sender fairness limits
//! that four senders would hit first — rate, queued-bytes quota, concurrent
//! submits (`--submit-slots`, the pipeline depth by default) — the ceiling
//! of a receiver's window (1024; the receiver asks for `--max-in-flight`)
//! and the sled cache (`--cache-mib`). The header line prints them.
//! `--submit-slots 16 --max-in-flight 256` runs with the broker's default
//! fairness limits and a smaller receiver window.
//!
//! Build and run (release!):
//!
//! ```text
//! cargo build --release -p trmx-broker --bins
//! target/release/trmx-bench                                # full run
//! target/release/trmx-bench --messages 5000 --seconds 2 --backlog 10000   # quick run
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use trmx_broker::BrokerConfig;
use trmx_broker::config::{OrganisationType, ParticipantConfig, TlsConfig};
use trmx_certs::Federation;
use trmx_proto::envelope::sha256;
use trmx_proto::pb::exchange_client::ExchangeClient;
use trmx_proto::pb::operator_client::OperatorClient;
use trmx_proto::time::to_timestamp;
use trmx_proto::{CaseRef, Kind, MessageId, pb};
use trmx_transport::{ClientOptions, TlsPaths, client_channel};

type Client = ExchangeClient<Channel>;

/// Broker load benchmark.
#[derive(Debug, Parser)]
#[command(name = "trmx-bench")]
struct Args {
    /// Concurrent senders (each its own participant and connection).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Messages in the throughput phase (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 4096)]
    payload: usize,
    /// Submits in flight per sender in the throughput and backlog phases.
    #[arg(long, default_value_t = 64)]
    pipeline: usize,
    /// Receiver's max_in_flight: how many unacknowledged deliveries its
    /// stream may hold (the bench allows up to 1024, the broker's ceiling
    /// for this setting). With 256 the deliveries fell behind the submits:
    /// each lease and ack waited behind a queue of submits on the store writer.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: u32,
    /// Open-loop rate of the latency phase, msgs/s (0 skips it).
    #[arg(long, default_value_t = 5_000)]
    rate: u32,
    /// Duration of the latency phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Messages of the backlog phase (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// sled cache size of the broker, MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
    /// The broker's `limits.max_concurrent_submits_per_sender` (default: the
    /// pipeline depth, so that every pipelined submit is admitted). A
    /// fairness limit between participants, which the bench lifts like the
    /// rate and quota limits: it measures what the broker can carry. With the
    /// broker's default (16) and a receiver window of 256, end to end was
    /// 9-19% lower in alternating runs (6,004/6,477/7,429 vs
    /// 6,893/7,682/8,112 msgs/s).
    #[arg(long)]
    submit_slots: Option<u32>,
    /// The broker's `store.writer_nice` (default: the broker's default, -8;
    /// 0 runs the store threads like the rest of the broker).
    #[arg(long, allow_hyphen_values = true)]
    writer_nice: Option<i32>,
    /// The broker binary (default: `trmx-broker` next to this one).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// Keep the work directory (data, certificates, broker log) and print its path.
    #[arg(long)]
    keep: bool,
    /// After the other phases, time an operator's `GetStatistics` and a
    /// `SearchMessages` over every record of the run, with the broker's RSS.
    #[arg(long)]
    operator_reads: bool,
}

/// The same allocator as the broker binary (see `broker/src/main.rs`): the
/// load generator's allocations cost the shared cores less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.senders >= 1, "--senders must be at least 1");
    let work = std::env::temp_dir().join(format!("trmx-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let bench = Bench::start(&args, &work)?;
    println!(
        "trmx-bench: broker pid {} on {}, {} senders, {} B payloads, sled cache {} MiB, {} submits at once per sender, receiver window {}, store writer nice {}",
        bench.child.id(),
        bench.addr,
        args.senders,
        args.payload,
        args.cache_mib,
        submit_slots(&args),
        args.max_in_flight,
        args.writer_nice
            .unwrap_or_else(|| trmx_broker::config::StoreConfig::default().writer_nice),
    );
    let result = phases(&args, &bench).await;
    let hwm = proc_status_kib(bench.child.id(), "VmHWM:").unwrap_or(0);
    let cpu = proc_cpu_seconds(bench.child.id()).unwrap_or(0.0);
    let disk = trmx_broker::store::dir_bytes(&bench.data_dir);
    bench.stop();
    result?;
    println!("broker peak RSS (VmHWM): {:.1} MiB", hwm as f64 / 1024.0);
    println!("broker CPU time: {cpu:.1} s (user + system)");
    println!(
        "bytes on disk after the run: {:.1} MiB",
        disk as f64 / (1 << 20) as f64
    );
    if args.keep {
        println!("work directory kept: {}", work.display());
    } else {
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}

/// The broker's concurrent submits per sender for this run.
fn submit_slots(args: &Args) -> u32 {
    args.submit_slots
        .unwrap_or_else(|| u32::try_from(args.pipeline).unwrap_or(u32::MAX))
}

async fn phases(args: &Args, bench: &Bench) -> anyhow::Result<()> {
    let payload = Payload::new(args.payload);
    if args.messages > 0 {
        throughput(args, bench, &payload).await?;
    }
    if args.rate > 0 && args.seconds > 0 {
        latency(args, bench, &payload).await?;
    }
    if args.backlog > 0 {
        backlog(args, bench, &payload).await?;
    }
    if args.operator_reads {
        operator_reads(bench).await?;
    }
    Ok(())
}

/// Phase 1: saturation throughput.
async fn throughput(args: &Args, bench: &Bench, payload: &Payload) -> anyhow::Result<()> {
    let sent_at = Arc::new(Mutex::new(HashMap::<String, Instant>::new()));
    let receiver = Receiver::start(bench.receiver()?, args.max_in_flight, sent_at.clone()).await?;
    let start = Instant::now();
    let cpu = CpuMeter::start(bench);
    submit_all(bench, args, payload, args.messages, Some(sent_at)).await?;
    let submit_secs = start.elapsed().as_secs_f64();
    let latencies = receiver
        .wait_for(args.messages, Duration::from_secs(600))
        .await?;
    let e2e_secs = start.elapsed().as_secs_f64();
    let n = args.messages as f64;
    println!(
        "-- throughput: {} messages, {} senders x {} pipelined",
        args.messages, args.senders, args.pipeline
    );
    println!(
        "submit:      {:>9.0} msgs/s  {:>7.1} MiB/s  (durable, fsynced)",
        n / submit_secs,
        n * args.payload as f64 / (1 << 20) as f64 / submit_secs
    );
    println!(
        "end to end:  {:>9.0} msgs/s  (submitted, delivered and acknowledged)",
        n / e2e_secs
    );
    print_latency("latency at saturation", latencies);
    cpu.print(args.messages);
    Ok(())
}

/// Phase 2: open-loop latency at a fixed rate.
async fn latency(args: &Args, bench: &Bench, payload: &Payload) -> anyhow::Result<()> {
    let total = (u64::from(args.rate) * args.seconds) as usize;
    let sent_at = Arc::new(Mutex::new(HashMap::<String, Instant>::new()));
    let receiver = Receiver::start(bench.receiver()?, args.max_in_flight, sent_at.clone()).await?;
    let clients = bench.senders()?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let outstanding = Arc::new(Semaphore::new(4096));
    let start = tokio::time::Instant::now();
    let mut late = 0usize;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        if tokio::time::Instant::now() > scheduled + Duration::from_millis(5) {
            late += 1;
        }
        let permit = outstanding.clone().acquire_owned().await?;
        let mut client = clients[i % clients.len()].clone();
        let env = envelope(payload);
        sent_at
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .insert(env.message_id.clone(), scheduled.into_std());
        tasks.spawn(async move {
            let result = client
                .submit(pb::SubmitRequest {
                    envelope: Some(env),
                })
                .await;
            drop(permit);
            result.map(|_| ())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let latencies = receiver.wait_for(total, Duration::from_secs(120)).await?;
    println!(
        "-- latency: open loop at {} msgs/s for {} s ({} messages, {} sent >5 ms late)",
        args.rate, args.seconds, total, late
    );
    print_latency("submit→delivery", latencies);
    Ok(())
}

/// Phase 3: a backlog for an offline recipient, then drained.
async fn backlog(args: &Args, bench: &Bench, payload: &Payload) -> anyhow::Result<()> {
    let pid = bench.child.id();
    let rss_before = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let start = Instant::now();
    let sampler = RssSampler::start(pid);
    let fill_cpu = CpuMeter::start(bench);
    submit_all(bench, args, payload, args.backlog, None).await?;
    let fill_secs = start.elapsed().as_secs_f64();
    let fill_cpu = fill_cpu.stop();
    let rss_full = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let start = Instant::now();
    let drain_cpu = CpuMeter::start(bench);
    let receiver = Receiver::start(
        bench.receiver()?,
        args.max_in_flight,
        Arc::new(Mutex::new(HashMap::new())),
    )
    .await?;
    receiver
        .wait_for(args.backlog, Duration::from_secs(900))
        .await?;
    let drain_secs = start.elapsed().as_secs_f64();
    let drain_cpu = drain_cpu.stop();
    let rss_max = sampler.stop().await;
    println!(
        "-- backlog: {} messages queued for an offline recipient",
        args.backlog
    );
    println!(
        "fill:        {:>9.0} msgs/s  ({:.1} s)",
        args.backlog as f64 / fill_secs,
        fill_secs
    );
    println!(
        "drain:       {:>9.0} msgs/s  ({:.1} s, delivered and acknowledged)",
        args.backlog as f64 / drain_secs,
        drain_secs
    );
    fill_cpu.print("fill", args.backlog);
    drain_cpu.print("drain", args.backlog);
    println!(
        "broker RSS:  {:.1} MiB before, {:.1} MiB with the backlog queued, {:.1} MiB max during fill and drain",
        rss_before as f64 / 1024.0,
        rss_full as f64 / 1024.0,
        rss_max as f64 / 1024.0
    );
    Ok(())
}

/// Phase 4: the operator reads that go through every record.
async fn operator_reads(bench: &Bench) -> anyhow::Result<()> {
    let pid = bench.child.id();
    let mut operator = bench.operator()?;
    println!("-- operator reads over every record of the run");
    let rss_before = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let sampler = RssSampler::start(pid);
    let start = Instant::now();
    let stats = operator
        .get_statistics(pb::GetStatisticsRequest::default())
        .await?
        .into_inner();
    let stats_secs = start.elapsed().as_secs_f64();
    let stats_rss = sampler.stop().await;
    let messages: u64 = stats
        .corridors
        .iter()
        .filter_map(|c| c.messages.map(|m| m.value))
        .sum();
    println!(
        "statistics:  {stats_secs:.2} s, {messages} messages counted; broker RSS {:.1} MiB before, {:.1} MiB max",
        rss_before as f64 / 1024.0,
        stats_rss as f64 / 1024.0
    );
    let sampler = RssSampler::start(pid);
    let start = Instant::now();
    let mut pages = 0;
    let mut page_token = String::new();
    loop {
        // a case nobody wrote about: every record is read, none matches
        let answer = operator
            .search_messages(pb::SearchMessagesRequest {
                case_ref: CaseRef::new_random().to_string(),
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        pages += 1;
        if answer.next_page_token.is_empty() {
            break;
        }
        page_token = answer.next_page_token;
    }
    let search_secs = start.elapsed().as_secs_f64();
    let search_rss = sampler.stop().await;
    println!(
        "search:      {search_secs:.2} s for a filter that matches nothing, in {pages} call(s); broker RSS {:.1} MiB max",
        search_rss as f64 / 1024.0
    );
    Ok(())
}

/// Submits `total` messages spread over the senders, `pipeline` in flight per sender.
async fn submit_all(
    bench: &Bench,
    args: &Args,
    payload: &Payload,
    total: usize,
    sent_at: Option<Arc<Mutex<HashMap<String, Instant>>>>,
) -> anyhow::Result<()> {
    let clients = bench.senders()?;
    let per_task = total.div_ceil(clients.len() * args.pipeline);
    let mut remaining = total;
    let mut tasks = tokio::task::JoinSet::new();
    for client in &clients {
        for _ in 0..args.pipeline {
            let count = per_task.min(remaining);
            remaining -= count;
            let mut client = client.clone();
            let payload = payload.clone();
            let sent_at = sent_at.clone();
            tasks.spawn(async move {
                for _ in 0..count {
                    let env = envelope(&payload);
                    if let Some(map) = &sent_at {
                        map.lock()
                            .map_err(|_| anyhow::anyhow!("lock"))?
                            .insert(env.message_id.clone(), Instant::now());
                    }
                    client
                        .submit(pb::SubmitRequest {
                            envelope: Some(env),
                        })
                        .await
                        .context("submit")?;
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

/// The payload every message carries, with its digest computed once: the
/// load generator shares the machine with the broker, so it spends as
/// little CPU per message as it can.
#[derive(Clone)]
struct Payload {
    bytes: Vec<u8>,
    sha256: [u8; 32],
}

impl Payload {
    fn new(len: usize) -> Self {
        let bytes = vec![0x5a_u8; len];
        let sha256 = sha256(&bytes);
        Self { bytes, sha256 }
    }
}

fn envelope(payload: &Payload) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_v7().to_string(),
        recipient: RECEIVER.into(),
        kind: pb::MessageKind::Referral as i32,
        case_ref: CaseRef::new_random().to_string(),
        priority: pb::Priority::Normal as i32,
        created_at: Some(to_timestamp(SystemTime::now())),
        payload_sha256: payload.sha256.to_vec(),
        payload: payload.bytes.clone(),
        content_type: Kind::Referral.content_type(),
        ..Default::default()
    }
}

/// A `Receive` stream that acknowledges everything it gets, in batches.
struct Receiver {
    received: mpsc::UnboundedReceiver<Option<Duration>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Receiver {
    async fn start(
        mut client: Client,
        max_in_flight: u32,
        sent_at: Arc<Mutex<HashMap<String, Instant>>>,
    ) -> anyhow::Result<Self> {
        let mut stream = client
            .receive(pb::ReceiveRequest { max_in_flight })
            .await?
            .into_inner();
        let (ids_tx, mut ids_rx) = mpsc::unbounded_channel::<String>();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(delivery) = stream.message().await? {
                let Some(env) = delivery.envelope else {
                    continue;
                };
                let now = Instant::now();
                let latency = sent_at
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock"))?
                    .remove(&env.message_id)
                    .map(|at| now.saturating_duration_since(at));
                if ids_tx.send(env.message_id).is_err() {
                    break;
                }
                if done_tx.send(latency).is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        });
        let acker = tokio::spawn(async move {
            while let Some(first) = ids_rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match ids_rx.try_recv() {
                        Ok(id) => batch.push(id),
                        Err(_) => break,
                    }
                }
                client
                    .ack(pb::AckRequest { message_ids: batch })
                    .await
                    .context("ack")?;
            }
            anyhow::Ok(())
        });
        Ok(Self {
            received: done_rx,
            tasks: vec![reader, acker],
        })
    }

    /// Waits until `count` deliveries arrived; returns their latencies (if known).
    async fn wait_for(mut self, count: usize, limit: Duration) -> anyhow::Result<Vec<Duration>> {
        let mut latencies = Vec::with_capacity(count);
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + limit;
        while got < count {
            match tokio::time::timeout_at(deadline, self.received.recv()).await {
                Ok(Some(latency)) => {
                    got += 1;
                    latencies.extend(latency);
                }
                Ok(None) => bail!("receive stream ended after {got} of {count} deliveries"),
                Err(_) => bail!("only {got} of {count} deliveries within {limit:?}"),
            }
        }
        // Let the last acks go out before the stream is dropped.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for task in self.tasks {
            task.abort();
        }
        Ok(latencies)
    }
}

fn print_latency(label: &str, mut latencies: Vec<Duration>) {
    if latencies.is_empty() {
        return;
    }
    latencies.sort();
    let pick = |q: f64| {
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[i.min(latencies.len() - 1)].as_secs_f64() * 1000.0
    };
    println!(
        "{label}: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} samples)",
        pick(0.5),
        pick(0.99),
        pick(1.0),
        latencies.len()
    );
}

const RECEIVER: &str = "BE-RECEIVER";

/// The broker child process and the TLS material of its clients.
struct Bench {
    child: Child,
    addr: std::net::SocketAddr,
    data_dir: PathBuf,
    federation: Federation,
    senders: Vec<String>,
}

impl Bench {
    fn start(args: &Args, work: &Path) -> anyhow::Result<Self> {
        let federation = Federation::create(&work.join("pki"), "bench.test")?;
        let broker_cert = federation.broker("bench")?;
        let senders: Vec<String> = (1..=args.senders)
            .map(|i| format!("NL-SENDER{i}"))
            .collect();
        let mut participants: Vec<ParticipantConfig> =
            senders.iter().map(|id| participant(id, "NL")).collect();
        participants.push(participant(RECEIVER, "BE"));
        let data_dir = work.join("data");
        let mut config = BrokerConfig::new(
            &data_dir,
            TlsConfig {
                ca: federation.ca_cert_path(),
                cert: broker_cert.cert,
                key: broker_cert.key,
                crl: Some(federation.crl_path()),
                crl_reload_interval: Duration::from_secs(300),
                crl_policy: Default::default(),
            },
        );
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.participants = participants;
        config.store.cache_capacity = args.cache_mib << 20;
        config.limits.sender_rate_per_second = 1_000_000;
        config.limits.sender_rate_burst = 1_000_000;
        config.limits.max_queued_bytes_per_sender = 64 << 30;
        config.limits.min_free_disk_bytes = 64 << 20;
        config.limits.max_max_in_flight = 1024;
        config.limits.max_concurrent_submits_per_sender = submit_slots(args);
        if let Some(nice) = args.writer_nice {
            config.store.writer_nice = nice;
        }
        let config_path = work.join("broker.toml");
        std::fs::write(&config_path, config.to_toml()?)?;
        let ready = work.join("ready");
        let bin = match &args.broker_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()?.with_file_name("trmx-broker"),
        };
        let log = std::fs::File::create(work.join("broker.log"))?;
        let mut child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--log-level")
            .arg("warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with: cargo build --release -p trmx-broker --bins)",
                    bin.display()
                )
            })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                break text.trim().parse()?;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "broker exited at start: {status}; see {}",
                    work.join("broker.log").display()
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "broker not ready within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Self {
            child,
            addr,
            data_dir,
            federation,
            senders,
        })
    }

    fn client(&self, id: &str) -> anyhow::Result<Client> {
        let cert = self.federation.dir.join(format!("{id}.pem"));
        let cert = if cert.exists() {
            trmx_certs::CertPaths::for_cert(&cert)
        } else {
            self.federation.participant(id)?
        };
        let paths = TlsPaths {
            ca: self.federation.ca_cert_path(),
            cert: cert.cert,
            key: cert.key,
        };
        let channel = client_channel(&self.addr.to_string(), &paths, &ClientOptions::default())?;
        Ok(ExchangeClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20))
    }

    fn operator(&self) -> anyhow::Result<OperatorClient<Channel>> {
        let cert = self.federation.operator("bench")?;
        let paths = TlsPaths {
            ca: self.federation.ca_cert_path(),
            cert: cert.cert,
            key: cert.key,
        };
        let channel = client_channel(&self.addr.to_string(), &paths, &ClientOptions::default())?;
        Ok(OperatorClient::new(channel).max_decoding_message_size(16 << 20))
    }

    fn senders(&self) -> anyhow::Result<Vec<Client>> {
        self.senders.iter().map(|id| self.client(id)).collect()
    }

    fn receiver(&self) -> anyhow::Result<Client> {
        self.client(RECEIVER)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn participant(id: &str, country: &str) -> ParticipantConfig {
    ParticipantConfig {
        id: id.into(),
        display_name: id.into(),
        country: country.into(),
        organisation_type: OrganisationType::Nrm,
        accepts: vec!["referral".into()],
    }
}

/// CPU time of the broker and of this load generator over one phase. On one
/// machine the two share the cores, so the sum per message bounds the rate:
/// `cores / (broker + load generator)` messages per second at best.
struct CpuMeter {
    broker_pid: u32,
    broker: f64,
    client: f64,
    wall: Instant,
}

/// What a [`CpuMeter`] measured over its phase.
struct CpuUse {
    broker: f64,
    client: f64,
    wall: f64,
}

impl CpuMeter {
    fn start(bench: &Bench) -> Self {
        let broker_pid = bench.child.id();
        Self {
            broker_pid,
            broker: proc_cpu_seconds(broker_pid).unwrap_or(0.0),
            client: proc_cpu_seconds(std::process::id()).unwrap_or(0.0),
            wall: Instant::now(),
        }
    }

    fn stop(self) -> CpuUse {
        CpuUse {
            broker: proc_cpu_seconds(self.broker_pid).unwrap_or(0.0) - self.broker,
            client: proc_cpu_seconds(std::process::id()).unwrap_or(0.0) - self.client,
            wall: self.wall.elapsed().as_secs_f64(),
        }
    }

    fn print(self, messages: usize) {
        self.stop().print("throughput", messages);
    }
}

impl CpuUse {
    fn print(&self, phase: &str, messages: usize) {
        let per_msg = |secs: f64| secs * 1e6 / messages.max(1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        println!(
            "CPU ({phase}): broker {:.0} µs/msg, load generator {:.0} µs/msg; {:.2} of {cores} cores busy",
            per_msg(self.broker),
            per_msg(self.client),
            (self.broker + self.client) / self.wall.max(f64::EPSILON),
        );
    }
}

/// A `VmRSS:`/`VmHWM:` line of /proc/PID/status, in KiB.
fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// User + system CPU seconds of a process (/proc/PID/stat, 100 ticks/s).
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the parenthesised command name; utime and stime are the 12th and 13th
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Samples the broker's RSS every 100 ms and keeps the maximum.
struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut max = 0;
            loop {
                max = max.max(proc_status_kib(pid, "VmRSS:").unwrap_or(0));
                tokio::select! {
                    _ = &mut stopped => return max,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0)
    }
}
