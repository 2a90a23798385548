//! `trmx-chaos`: the long runs of the fault suite (issue 7), with figures.
//!
//! ```text
//! # crash safety: senders → broker → recipient, all real processes, while the
//! # broker is SIGKILLed at random moments and aborted at each fail point, and
//! # the recipient's and senders' nodes are SIGKILLed
//! cargo run --release -p trmx-tests --bin trmx-chaos -- --messages 5000 --senders 4 --kills 10 [--seed N]
//!
//! # resource bounds: broker RSS with a 100,000- vs a 10,000-message backlog
//! # (≤ 1.5×), another participant's p99 submit latency during a flood (≤ 3×)
//! cargo run --release -p trmx-tests --bin trmx-chaos -- bounds
//! ```
//!
//! Exits non-zero when a message is lost or doubled, or a ratio is exceeded.
//! The broker and the nodes are this same executable started as
//! `trmx-chaos broker …` / `trmx-chaos node …` (exactly what the `trmx-broker`
//! and `trmx-node` binaries run).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trmx_tests::chaos::{self, ChaosPlan, SEED_ENV};

/// Long crash-safety and resource-bound runs against real processes.
#[derive(Debug, Parser)]
#[command(name = "trmx-chaos", version)]
struct Args {
    /// Messages in all, spread over the senders.
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// Sender nodes (1–8).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Broker kills: one at each of the three fail points, the rest SIGKILL at random moments.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// SIGKILLs of the recipient's node mid-stream.
    #[arg(long, default_value_t = 2)]
    recipient_kills: usize,
    /// SIGKILLs of a sender's node with messages in its outbox.
    #[arg(long, default_value_t = 2)]
    sender_kills: usize,
    /// Every this many messages of a sender, one carries a 200 KiB attachment, which the
    /// broker and the nodes store in a file of its own (sled's blobs); 0: none.
    #[arg(long, default_value_t = 25)]
    attachment_every: usize,
    /// Seed of every random choice (default: TRMX_CHAOS_SEED, else a fresh one).
    #[arg(long)]
    seed: Option<u64>,
    /// Working directory (default: a temp dir, removed unless the run fails or --keep).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Keep the working directory.
    #[arg(long, global = true)]
    keep: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Resource bounds: RSS with a small and a large backlog, latency during a flood.
    Bounds {
        /// The small backlog.
        #[arg(long, default_value_t = 10_000)]
        small: usize,
        /// The large backlog.
        #[arg(long, default_value_t = 100_000)]
        large: usize,
        /// Payload bytes per backlog message.
        #[arg(long, default_value_t = 1024)]
        payload: usize,
        /// Seconds of baseline, then of flood.
        #[arg(long, default_value_t = 5)]
        flood_seconds: u64,
        /// Flood submits in flight at once.
        #[arg(long, default_value_t = 64)]
        flood_concurrency: usize,
        /// The broker's sled page cache in MiB for the backlog measurement
        /// (default: the broker's default).
        #[arg(long)]
        cache_mib: Option<u64>,
    },
}

fn main() -> ExitCode {
    // Multi-call: `trmx-chaos broker …` / `trmx-chaos node …` are the daemons.
    if let Some(code) = trmx_tests::process::run_as_daemon() {
        return code;
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trmx-chaos: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("trmx-chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(args: Args) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("locating the trmx-chaos executable")?;
    let (temp, dir) = match &args.dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let temp = tempfile::Builder::new().prefix("trmx-chaos-").tempdir()?;
            let dir = temp.path().to_owned();
            (Some(temp), dir)
        }
    };
    let result = match &args.command {
        None => crash(&exe, &dir, &args).await,
        Some(Command::Bounds {
            small,
            large,
            payload,
            flood_seconds,
            flood_concurrency,
            cache_mib,
        }) => {
            let sizes = Sizes {
                small: *small,
                large: *large,
                payload: *payload,
                cache_bytes: cache_mib.map(|mib| mib << 20),
            };
            bounds(&exe, &dir, &sizes, *flood_seconds, *flood_concurrency).await
        }
    };
    let keep = args.keep || !matches!(result, Ok(true));
    match temp {
        Some(temp) if keep => println!("working files kept in {}", temp.keep().display()),
        Some(temp) => drop(temp),
        None => println!("working files kept in {}", dir.display()),
    }
    result
}

async fn crash(exe: &Path, dir: &Path, args: &Args) -> anyhow::Result<bool> {
    let seed = match args.seed {
        Some(seed) => seed,
        None => chaos::seed_from_env()?,
    };
    println!(
        "trmx-chaos: {} messages from {} senders, {} broker kills, {} recipient kills, {} sender kills; seed {seed} (replay: --seed {seed} or {SEED_ENV}={seed})",
        args.messages, args.senders, args.kills, args.recipient_kills, args.sender_kills
    );
    let plan = ChaosPlan {
        attachment_every: args.attachment_every,
        ..ChaosPlan::mixed(
            args.senders,
            args.messages,
            args.kills,
            args.recipient_kills,
            args.sender_kills,
            seed,
        )
    };
    let report = chaos::run(exe, dir, &plan).await?;
    println!();
    println!("{report}");
    println!();
    let ok = report.ok();
    println!(
        "{}",
        if ok {
            "PASS: nothing lost, nothing doubled"
        } else {
            "FAIL"
        }
    );
    Ok(ok)
}

/// The backlog measurement's parameters.
#[derive(Debug)]
struct Sizes {
    small: usize,
    large: usize,
    payload: usize,
    cache_bytes: Option<u64>,
}

async fn bounds(
    exe: &Path,
    dir: &Path,
    sizes: &Sizes,
    flood_seconds: u64,
    flood_concurrency: usize,
) -> anyhow::Result<bool> {
    let Sizes {
        small,
        large,
        payload,
        cache_bytes,
    } = *sizes;
    anyhow::ensure!(small > 0 && large > small, "--large must exceed --small");
    println!("trmx-chaos bounds: broker RSS with a {small} and a {large} message backlog");
    let backlog = chaos::measure_backlog(
        exe,
        &dir.join("backlog"),
        small,
        large,
        payload,
        cache_bytes,
    )
    .await?;
    println!("{backlog}");
    println!();
    println!(
        "trmx-chaos bounds: another participant's submit latency, {flood_seconds} s without and {flood_seconds} s with a flood"
    );
    let flood =
        chaos::measure_flood(exe, &dir.join("flood"), flood_seconds, flood_concurrency).await?;
    println!("{flood}");
    println!();
    let mut ok = true;
    if backlog.ratio() > 1.5 {
        println!("FAIL: peak RSS ratio {:.2} > 1.5", backlog.ratio());
        ok = false;
    }
    if flood.ratio() > 3.0 {
        println!("FAIL: p99 latency ratio {:.2} > 3", flood.ratio());
        ok = false;
    }
    if flood.flood_exhausted == 0 {
        println!("FAIL: the flooder was never refused with RESOURCE_EXHAUSTED");
        ok = false;
    }
    if flood.during.errors > 0 || flood.baseline.errors > 0 {
        println!("FAIL: the other participant's submits failed");
        ok = false;
    }
    if ok {
        println!("PASS: both ratios within their limits");
    }
    Ok(ok)
}
