//! The `trmx-broker` command line: parses flags, loads the config, binds, and
//! runs the broker until SIGTERM/SIGINT. SIGHUP reloads the CRL.
//!
//! It lives in the library so that other executables (the demo's multi-call
//! binary, process-level tests) run exactly what `trmx-broker` runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::{Broker, BrokerConfig};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// Threads for blocking store work (tokio's default is 512).
const MAX_BLOCKING_THREADS: usize = 16;

/// The trmx store-and-forward broker.
#[derive(Debug, Parser)]
#[command(name = "trmx-broker", version)]
struct Cli {
    /// The broker's TOML config file (see broker.example.toml); required to run the
    /// broker or check its config.
    #[arg(long, short, env = "TRMX_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address; overrides `listen` in the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory; overrides `data_dir` in the config.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `info,trmx_broker=debug` (RUST_LOG syntax).
    #[arg(long, env = "TRMX_LOG", default_value = "info")]
    log_level: String,
    /// Write the bound address to this file once the broker accepts connections.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default).
    Run,
    /// Load and validate the config, print the effective config, and exit.
    CheckConfig,
    /// Operator commands against a running broker, with an operator certificate
    /// (queues, participants, messages, dead letters, redrive, purge, audit, stats).
    Admin(Box<crate::admin_cli::AdminArgs>),
    /// Offline audit-log work on a stopped broker's data directory (`audit verify`).
    Audit(crate::admin_cli::OfflineAuditArgs),
    /// Offline work on a stopped broker's store (`store compact`, `store verify`).
    Store(crate::admin_cli::OfflineStoreArgs),
}

/// Runs `trmx-broker` with `args` (the first is the program name) and returns
/// its exit code.
pub fn main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let cli = match cli.command {
        Some(Command::Admin(args)) => return crate::admin_cli::run(*args),
        Some(Command::Audit(args)) => return crate::admin_cli::run_offline_audit(args),
        Some(Command::Store(args)) => return crate::admin_cli::run_offline_store(args),
        command => Cli { command, ..cli },
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("trmx-broker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(config_path) = &cli.config else {
        anyhow::bail!("--config FILE (or TRMX_BROKER_CONFIG) is required to run the broker");
    };
    let mut config = BrokerConfig::load(config_path)?;
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(data_dir) = &cli.data_dir {
        config.data_dir = data_dir.clone();
    }
    config.validate()?;
    if matches!(cli.command, Some(Command::CheckConfig)) {
        print!("{}", config.to_toml()?);
        println!("# config OK: {}", config_path.display());
        return Ok(());
    }
    init_tracing(&cli.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Store operations run on blocking threads; a few are enough, and each
        // extra thread costs memory (stack, malloc arena) under load.
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_broker(config, cli.ready_file))
}

fn init_tracing(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("--log-level {filter:?} is not a valid log filter"))?;
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))
}

async fn run_broker(config: BrokerConfig, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let mut broker = Broker::builder(config).start(listener).await?;
    let addr = broker.local_addr();
    println!("trmx-broker listening on {addr}");
    if let Some(path) = &ready_file {
        write_ready_file(path, addr)?;
    }
    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM received"); break; }
            _ = interrupt.recv() => { info!("SIGINT received"); break; }
            _ = hangup.recv() => {
                info!("SIGHUP received, reloading TLS material and CRL");
                // file reads, and maybe a wait for an interval reload under
                // way: off the async workers' backs (the runtime is multi-thread)
                match tokio::task::block_in_place(|| broker.reload_tls()) {
                    Ok(report) => info!(
                        closed_connections = report.closed_connections,
                        crl_stale = report.crl.stale,
                        "tls reloaded"
                    ),
                    Err(e) => warn!(error = %e, "tls reload failed, keeping the previous config"),
                }
            }
            result = broker.wait_stopped() => {
                if let Err(e) = &result {
                    error!(error = %e, "broker stopped");
                }
                return result.map_err(Into::into);
            }
        }
    }
    broker.shutdown().await?;
    Ok(())
}

/// Writes `addr` to `path` atomically (temp file + rename), so a reader never
/// sees a half-written file.
fn write_ready_file(path: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
