//! The `trmx-node` command line: `run` (the daemon) and the client commands
//! that talk to a running node over its local API socket.
//!
//! Every failure is one clear line on stderr and a non-zero exit
//! ([`CliError`]); output is human-readable by default, JSON Lines with
//! `--json` (one proto3-JSON object per line).
//!
//! The socket is found from `--socket` (or `TRMX_NODE_SOCKET`), else from the
//! config file given with `--config` (or `TRMX_NODE_CONFIG`).

mod format;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use trmx_proto::pb::node_api_client::NodeApiClient;
use trmx_proto::time::{Date, to_millis};
use trmx_proto::{Kind, MessageId, pb};

use crate::api::client::connect_local_with_timeout;
use crate::api::status::invalid_field;
use crate::config::NodeConfig;
use crate::core::{Body, BodyContext};
use crate::daemon::RunningNode;

/// Exit code of every failure (clap uses 2 for usage errors).
pub const EXIT_FAILURE: i32 = 1;

/// The trmx participant node: daemon and command line.
#[derive(Debug, Parser)]
#[command(name = "trmx-node", version, about, propagate_version = true)]
pub struct Cli {
    /// The node's local API socket (default: from the config file).
    #[arg(long, global = true, env = "TRMX_NODE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The node's config file (for `run`; for the other commands, to find the socket).
    #[arg(long, global = true, env = "TRMX_NODE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for the node's answer to a command (a stuck or stopped node
    /// still accepts connections); `watch` waits for new entries without limit.
    #[arg(long, global = true, default_value_t = 60, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon (needs --config).
    Run {
        /// Write the socket path to this file once the node accepts requests.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Check the config file (--config) and the TLS files it names as `run` would, and make
    /// the clock check of a start (refused: a system clock further than
    /// `storage.max_downtime_secs` from the store's last run), without starting anything:
    /// print what the node would use, exit 1 on a problem. The store is not opened: its
    /// last run is read from `last-run.json` in the data directory, which the node writes
    /// at start and every minute (so this works while the node runs too); without that
    /// file (a store of an older node), or with a damaged one, the clock check is skipped
    /// and said.
    CheckConfig,
    /// Accept the system clock as it is now (needs --config; the node stopped). A node
    /// does not start when the clock is further than `storage.max_downtime_secs` from
    /// its store's last run, ahead or behind, since a wrong clock would erase bodies
    /// before their retention date (or hold its timers). When the clock is right, this
    /// records it as the store's last run (in the store, and in the data directory's
    /// `last-run.json` that `check-config` reads), and the node starts. Run it as the
    /// node's user.
    AcceptClock,
    /// Send a document (proto3 JSON) to a participant; prints the message id.
    Send(SendArgs),
    /// List sent messages, newest first.
    Outbox {
        /// Filters.
        #[command(flatten)]
        filter: FilterArgs,
        /// Only messages in this state: queued, submitted (listed as "at the broker"),
        /// delivered, failed (withdrawn messages included).
        #[arg(long, value_parser = parse_state)]
        state: Option<pb::OutboxState>,
    },
    /// List received messages, newest first.
    Inbox {
        /// Filters.
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Show one message (sent or received) with its body.
    Show {
        /// The message id.
        id: String,
    },
    /// Show the timeline of a case: every message sent and received.
    Case {
        /// The case reference.
        case: String,
        /// Messages asked for per request (0: the node's default, 1,000); the whole case
        /// is shown either way.
        #[arg(long, default_value_t = 0, value_name = "N")]
        page_size: u32,
    },
    /// What is due: unanswered requests past their respond-by date, follow-ups past due.
    Due {
        /// Count as due on or before this date (YYYY-MM-DD; default: today, or with
        /// --page-token the date of the listing it continues).
        #[arg(long)]
        today: Option<String>,
        /// At most this many items, oldest date first (0: as many as a page holds, 10,000).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Continue a listing where the previous one stopped (it prints the token).
        #[arg(long, value_name = "TOKEN")]
        page_token: Option<String>,
    },
    /// Print new inbox entries as they arrive (resume with --after).
    Watch {
        /// Start after this inbox sequence number (0: from the first message).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Take back a sent message the recipient has not acknowledged: queued, on its way, or
    /// expired or dead-lettered (its payload is then deleted on the broker, ending an
    /// operator's redrive).
    Withdraw {
        /// The message id.
        id: String,
    },
    /// List the participants the broker routes for.
    Participants,
    /// Show the broker connection and queue sizes.
    Status,
}

/// Arguments of `send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The recipient's participant ID, e.g. BE-PAYOKE.
    #[arg(long, value_name = "PARTICIPANT")]
    pub to: String,
    /// referral, referral-response, return-risk-assessment-request,
    /// return-risk-assessment or follow-up.
    #[arg(long, value_parser = parse_kind)]
    pub kind: Kind,
    /// The case the message belongs to (with --reply-to it may be left out: the
    /// reply takes the case of the message it answers).
    #[arg(
        long,
        value_name = "CASE",
        required_unless_present_any = ["new_case", "reply_to"]
    )]
    pub case: Option<String>,
    /// Open a new case (the node mints the case reference and prints it); not with
    /// --reply-to, as a reply belongs to the case of the message it answers.
    #[arg(long, conflicts_with_all = ["case", "reply_to"])]
    pub new_case: bool,
    /// The message this one answers.
    #[arg(long, value_name = "ID")]
    pub reply_to: Option<String>,
    /// Deliver before normal messages (children, imminent return, safety risk).
    #[arg(long)]
    pub urgent: bool,
    /// Idempotency key (default: derived from the file, recipient, kind, case,
    /// --reply-to and --urgent, so that re-running the same command does not send
    /// twice).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// The document, in the proto3 JSON mapping of the kind's message.
    pub file: PathBuf,
}

/// Filters of `outbox` and `inbox`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only this case.
    #[arg(long)]
    pub case: Option<String>,
    /// Only messages to / from this participant.
    #[arg(long, value_name = "PARTICIPANT")]
    pub with: Option<String>,
    /// Only this kind (e.g. referral).
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<Kind>,
    /// At most this many entries (0: 100; more than 10,000: 10,000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Continue a listing where the previous one stopped (it prints the token).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

fn parse_kind(value: &str) -> Result<Kind, String> {
    Kind::from_name(&value.trim().to_ascii_lowercase().replace(['_', ' '], "-"))
        .or_else(|| Kind::from_name(value))
        .filter(|k| !k.is_broker_made())
        .ok_or_else(|| {
            "expected referral, referral-response, return-risk-assessment-request, return-risk-assessment or follow-up".to_owned()
        })
}

/// An outbox state as `--state` takes it: the API's names and the table's words
/// (`at the broker`), in any case, with spaces, `-` or `_` between words. A withdrawn
/// message is a failed one (the API filters by state, not by outcome): `withdrawn` is
/// answered with where to look.
fn parse_state(value: &str) -> Result<pb::OutboxState, String> {
    let words: Vec<String> = value
        .split(|c: char| c.is_whitespace() || c == '-' || c == '_')
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    match words.join(" ").as_str() {
        "queued" => Ok(pb::OutboxState::Queued),
        "submitted" | "at the broker" => Ok(pb::OutboxState::Submitted),
        "delivered" => Ok(pb::OutboxState::Delivered),
        "failed" => Ok(pb::OutboxState::Failed),
        "withdrawn" => Err(
            "withdrawn messages are failed ones (outcome withdrawn): use --state failed".to_owned(),
        ),
        _ => Err("expected queued, submitted (at-the-broker), delivered or failed".to_owned()),
    }
}

/// A failure of a command: one line for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

fn fail<T>(message: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(message.into()))
}

/// The whole `trmx-node` program: parses `args` (the first is the program
/// name), runs the command on a fresh runtime, prints a failure as one line
/// on stderr, and returns the exit code (0, [`EXIT_FAILURE`], or 2 for a
/// usage error). The binary is `std::process::exit(main_with_args(std::env::args_os()))`;
/// a test crate can build the same binary from this.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return code;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trmx-node: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            EXIT_FAILURE
        }
    }
}

/// Runs a parsed command line. `run` returns when the daemon stopped.
pub async fn execute(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Run { ready_file } => {
            run_daemon(cli.config.as_deref(), cli.socket, ready_file.as_deref()).await
        }
        Command::CheckConfig => check_config(cli.config.as_deref(), cli.socket, cli.json),
        Command::AcceptClock => accept_clock(cli.config.as_deref(), cli.socket),
        command => {
            let socket = socket_path(cli.socket, cli.config.as_deref())?;
            let out = Output { json: cli.json };
            let timeout = std::time::Duration::from_secs(cli.timeout);
            client_command(command, &socket, timeout, &out).await
        }
    }
}

/// The socket of a client command: `--socket`, else the config's.
fn socket_path(socket: Option<PathBuf>, config: Option<&Path>) -> Result<PathBuf, CliError> {
    if let Some(socket) = socket {
        return Ok(socket);
    }
    match config {
        Some(path) => NodeConfig::load(path)
            .map(|c| c.socket_path())
            .map_err(|e| CliError(e.to_string())),
        None => fail(
            "no node socket given: pass --socket PATH or --config FILE, or set TRMX_NODE_SOCKET \
             or TRMX_NODE_CONFIG",
        ),
    }
}

// ---------------------------------------------------------------------------
// run

/// Log filter for the daemon: `RUST_LOG` if set, else the config's `log_level`.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // (whatever the filter, sled's dumps of the bodies it stores are not logged)
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .finish()
        .with(trmx_durable::log_filter::NoStoredBytes)
        .try_init();
}

async fn run_daemon(
    config: Option<&Path>,
    socket: Option<PathBuf>,
    ready_file: Option<&Path>,
) -> Result<(), CliError> {
    let Some(config_path) = config else {
        return fail("run needs --config FILE (or TRMX_NODE_CONFIG)");
    };
    // (first of all: a supervisor may stop the node while it starts, a start that
    // builds a new index of a large store takes a while, and a SIGTERM that came before
    // the handler killed the node, not stopped it)
    let mut shutdown = std::pin::pin!(shutdown_signal()?);
    let config = load_config(config_path, socket)?;
    init_logging(&config.log_filter().map_err(|e| CliError(e.to_string()))?);
    if requested(shutdown.as_mut()) {
        tracing::info!("the node was asked to stop before it started: it does not start");
        return Ok(());
    }
    // A certificate not valid yet fails every handshake with the broker: the rule of
    // check-config (an error beyond minutes, a warning within). A config or certificate
    // that cannot be read is left to the start, which says what is wrong.
    if let Ok(core) = config.core_config()
        && let Ok(info) = trmx_certs::CertInfo::from_pem_file(&core.tls.cert)
        && let Some(warning) = not_valid_yet(&core.tls.cert, &info, std::time::SystemTime::now())?
    {
        tracing::warn!("{warning}");
    }
    let node = RunningNode::start(&config, config.clock())
        .await
        .map_err(|e| CliError(format!("cannot start the node: {e}")))?;
    if requested(shutdown.as_mut()) {
        tracing::info!("the node was asked to stop while it started: it stops");
        return node.stop().await.map_err(|e| CliError(e.to_string()));
    }
    let socket = node.socket_path().to_path_buf();
    if let Some(ready_file) = ready_file
        && let Err(e) = write_ready_file(ready_file, &socket)
    {
        let _ = node.stop().await;
        return fail(format!("cannot write {}: {e}", ready_file.display()));
    }
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "trmx-node ready: participant {} socket {}",
            config.participant,
            socket.display()
        );
        let _ = stdout.flush();
    }
    node.run_until(shutdown)
        .await
        .map_err(|e| CliError(e.to_string()))
}

/// The config file at `path`, with `--socket` in place of its socket when given.
fn load_config(path: &Path, socket: Option<PathBuf>) -> Result<NodeConfig, CliError> {
    let mut config = NodeConfig::load(path).map_err(|e| CliError(e.to_string()))?;
    if let Some(socket) = socket {
        config.api.socket = Some(socket);
        config.validate().map_err(|e| CliError(e.to_string()))?;
    }
    Ok(config)
}

/// `accept-clock`: records the system clock as the store's last run.
fn accept_clock(config: Option<&Path>, socket: Option<PathBuf>) -> Result<(), CliError> {
    let Some(config_path) = config else {
        return fail("accept-clock needs --config FILE (or TRMX_NODE_CONFIG)");
    };
    let config = load_config(config_path, socket)?;
    let now = std::time::SystemTime::now();
    let before = crate::core::accept_clock(&config.data_dir, now).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("store: cannot open") {
            // (sled's lock: the running node holds its store)
            CliError(format!(
                "{text} (the node must be stopped: it holds the store while it runs)"
            ))
        } else {
            CliError(text)
        }
    })?;
    let when = trmx_certs::format_time;
    let before = before.map_or_else(
        || "nothing".to_owned(),
        |at| when(trmx_proto::time::from_millis(at)),
    );
    println!(
        "recorded {} as the last run of the node on {} (it was {before}): the node starts \
         with this clock",
        when(now),
        config.data_dir.display()
    );
    // (the store's mark is what the start checks: done, whatever becomes of this)
    if let Err(e) = crate::core::last_run::write(&config.data_dir, to_millis(now)) {
        eprintln!(
            "warning: {e}; check-config cannot check the clock until the node has run and \
             written it"
        );
    }
    Ok(())
}

/// `check-config`: what `run` checks before it starts (the config, the node
/// certificate's identity, the CA, key and CRL files together), the certificate's expiry,
/// that this user can make and use the data directory and the socket's directory (and that
/// no other user owns or may write the latter, as `run` refuses that), and the
/// start's clock check against the last run in the data directory's last-run file
/// ([`crate::core::last_run::check_clock_offline`]); prints what the node would use, its
/// limits and intervals included, and what the clock check found (with `--json`, as one
/// object). It creates nothing and never opens, locks or copies the store, so it may run
/// beside a running node (whose socket and store it leaves alone). A problem, a clock the
/// start would refuse included, is one line on stderr and exit status 1, in both forms.
fn check_config(
    config: Option<&Path>,
    socket: Option<PathBuf>,
    json: bool,
) -> Result<(), CliError> {
    let Some(config_path) = config else {
        return fail("check-config needs --config FILE (or TRMX_NODE_CONFIG)");
    };
    let config = load_config(config_path, socket)?;
    let core = config.core_config().map_err(|e| CliError(e.to_string()))?;
    usable_dir("data_dir", &core.data_dir)?;
    let socket = config.socket_path();
    if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        usable_dir("api.socket", parent)?;
    }
    // (a directory other users may write, or another user's: `run` refuses it)
    crate::api::check_socket_dir_of(&socket).map_err(|e| {
        // (the node's own directory is another user's to root: the check is of the user
        // it runs as)
        if rustix::process::geteuid().is_root() && e.to_string().contains("another user") {
            CliError(format!(
                "{e} (check-config runs as root here: run it as the node's user, e.g. \
                 `sudo -u trmx trmx-node --config FILE check-config`)"
            ))
        } else {
            CliError(e.to_string())
        }
    })?;
    let info = crate::core::check_node_certificate(&core).map_err(|e| CliError(e.to_string()))?;
    let opts = trmx_transport::ClientOptions {
        server_name: core.broker_server_name.clone(),
        crl: core.crl.clone(),
        ..trmx_transport::ClientOptions::default()
    };
    // (builds the TLS config as `run` does: nothing is dialled)
    trmx_transport::client_channel_with_tls(&core.broker_addr, &core.tls, &opts)
        .map_err(|e| CliError(format!("broker connection: {e}")))?;
    let now = std::time::SystemTime::now();
    let mut warnings = Vec::new();
    // The clock first: the start refuses a clock too far from the last run (and never an
    // expired certificate), and a clock that jumped ahead also makes the certificate look
    // expired; the operator must hear of the clock. (A running node's clock starts as the
    // system clock.)
    let clock = crate::core::last_run::check_clock_offline(
        &core.data_dir,
        to_millis(now),
        core.clock_bounds,
    )
    .map_err(|e| CliError(e.to_string()))?;
    if let Some(warning) = crate::core::last_run::clock_warning(&clock) {
        eprintln!("warning: {warning}");
        warnings.push(warning);
    }
    let valid_until = trmx_certs::format_time(info.not_after);
    let left = match info.not_after.duration_since(now) {
        Err(_) => {
            return fail(format!(
                "tls.cert: {} expired {valid_until}: the node would start and serve its store, \
                 but the broker refuses the certificate; renew it",
                core.tls.cert.display()
            ));
        }
        Ok(left) => left,
    };
    let days_left = left.as_secs() / 86_400;
    if left < crate::core::CERT_EXPIRY_WARNING {
        let warning = format!(
            "tls.cert: {} expires {valid_until}, in {days_left} days: renew it",
            core.tls.cert.display()
        );
        eprintln!("warning: {warning}");
        warnings.push(warning);
    }
    if let Some(said) = not_valid_yet(&core.tls.cert, &info, now)? {
        eprintln!("warning: {said}");
        warnings.push(said);
    }
    let limits = config.limits();
    if json {
        // (paths as displayed: a path that is not UTF-8 must not fail the check)
        let report = serde_json::json!({
            "config": config_path.display().to_string(),
            "participant": core.participant.as_str(),
            "brokerAddr": core.broker_addr,
            "brokerServerName": core.broker_server_name,
            "certificate": {
                "path": core.tls.cert.display().to_string(),
                "serialHex": info.serial_hex,
                "notBefore": trmx_certs::format_time(info.not_before),
                "notAfter": valid_until,
                "daysLeft": days_left,
            },
            "key": core.tls.key.display().to_string(),
            "ca": core.tls.ca.display().to_string(),
            "crl": core.crl.as_ref().map(|p| p.display().to_string()),
            "dataDir": core.data_dir.display().to_string(),
            "socket": socket.display().to_string(),
            "logLevel": config.log_level,
            // (by config key, as in the file)
            "limits": limits
                .iter()
                .map(|&(key, value)| (key.to_owned(), value.into()))
                .collect::<serde_json::Map<_, _>>(),
            "clock": {
                "status": clock.status(),
                "lastRun": clock
                    .last_run()
                    .map(|at| trmx_certs::format_time(trmx_proto::time::from_millis(at))),
                "systemClock": trmx_certs::format_time(now),
                "detail": crate::core::last_run::clock_line(&clock),
            },
            "warnings": warnings,
            "ok": true,
        });
        return Output { json }.print(&(to_json(&report)? + "\n"));
    }
    let crl = core.crl.as_ref().map_or_else(
        || "not checked (tls.crl unset)".to_owned(),
        |p| p.display().to_string(),
    );
    let lines = [
        ("participant", core.participant.to_string()),
        (
            "broker",
            format!(
                "{} (its certificate must name {})",
                core.broker_addr, core.broker_server_name
            ),
        ),
        (
            "certificate",
            format!(
                "{} serial {}, valid until {valid_until} ({days_left} days left)",
                core.tls.cert.display(),
                info.serial_hex
            ),
        ),
        ("key", core.tls.key.display().to_string()),
        ("CA", core.tls.ca.display().to_string()),
        ("CRL", crl),
        ("data dir", core.data_dir.display().to_string()),
        ("socket", socket.display().to_string()),
        ("log level", config.log_level.clone()),
    ];
    let mut stdout = std::io::stdout().lock();
    for (what, value) in lines {
        let _ = writeln!(stdout, "{what:<12} {value}");
    }
    let _ = writeln!(
        stdout,
        "# limits and intervals in effect (config key = value)"
    );
    for (key, value) in &limits {
        let _ = writeln!(stdout, "{key} = {value}");
    }
    let _ = writeln!(
        stdout,
        "# clock: {}",
        crate::core::last_run::clock_line(&clock)
    );
    let _ = writeln!(stdout, "# config OK: {}", config_path.display());
    Ok(())
}

/// The node certificate (at `cert`) not valid yet by this clock, for `run` and
/// `check-config` alike: it passed in silence, though either this clock is behind or the
/// CA machine's was ahead at issue, and then the broker refuses the certificate until its
/// start. Which one cannot be told here: both are said. Within
/// [`trmx_certs::NOT_VALID_YET_WARN`] it is a warning (returned); further, an error.
fn not_valid_yet(
    cert: &Path,
    info: &trmx_certs::CertInfo,
    now: std::time::SystemTime,
) -> Result<Option<String>, CliError> {
    let Some(not_yet) = info.not_valid_yet(now, "the broker") else {
        return Ok(None);
    };
    let said = format!("tls.cert: {}: {}", cert.display(), not_yet.message);
    if !not_yet.warn_only {
        return fail(said);
    }
    Ok(Some(said))
}

/// Whether this user can make and use the directory `dir` (of the config's `field`): it
/// is a directory it may write and enter, or its nearest existing ancestor is.
fn usable_dir(field: &str, dir: &Path) -> Result<(), CliError> {
    use rustix::fs::Access;
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(meta) if meta.is_dir() => {
                return rustix::fs::access(at, Access::WRITE_OK | Access::EXEC_OK).map_err(|e| {
                    let what = if at == dir { "use" } else { "create" };
                    CliError(format!(
                        "{field}: this user cannot {what} {}: {} is not writable ({e})",
                        dir.display(),
                        at.display()
                    ))
                });
            }
            Ok(_) => {
                return fail(format!(
                    "{field}: {} is not a directory (needed for {})",
                    at.display(),
                    dir.display()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match at.parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(parent) => at = parent,
                    None => return Ok(()),
                }
            }
            Err(e) => return fail(format!("{field}: cannot read {}: {e}", at.display())),
        }
    }
}

/// Writes the socket path to `path` atomically (temp file + rename).
fn write_ready_file(path: &Path, socket: &Path) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{}\n", socket.display()))?;
    std::fs::rename(&tmp, path)
}

/// Whether `shutdown` has completed, without waiting for it.
fn requested(shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>) -> bool {
    let mut looking = std::task::Context::from_waker(std::task::Waker::noop());
    shutdown.poll(&mut looking).is_ready()
}

/// Completes on SIGTERM or SIGINT, whose handlers are installed at the call (a signal
/// before the first poll is not lost, nor does it kill the process).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, CliError> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| {
            CliError(format!(
                "cannot install the {name} handler: {e}; the node stops, as it could not \
                 be stopped in order"
            ))
        })
    };
    let mut terminate = install(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("shutdown requested");
    })
}

// ---------------------------------------------------------------------------
// client commands

/// Where output goes and in which form.
#[derive(Debug)]
struct Output {
    json: bool,
}

impl Output {
    /// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
    fn print(&self, text: &str) -> Result<(), CliError> {
        self.write(text).map(|_read| ())
    }

    /// Writes `text` to stdout: `false` when nobody reads it any more (a closed pipe,
    /// `| head -n 1` that has its line), which is not an error.
    fn write(&self, text: &str) -> Result<bool, CliError> {
        let mut stdout = std::io::stdout().lock();
        match stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => fail(format!("cannot write output: {e}")),
        }
    }

    /// One JSON object per line.
    fn json_lines<T: serde::Serialize>(&self, items: &[T]) -> Result<(), CliError> {
        let mut text = String::new();
        for item in items {
            text.push_str(&to_json(item)?);
            text.push('\n');
        }
        self.print(&text)
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CliError> {
    serde_json::to_string(value).map_err(|e| CliError(format!("cannot write JSON: {e}")))
}

async fn connect(
    socket: &Path,
    timeout: std::time::Duration,
) -> Result<NodeApiClient<Channel>, CliError> {
    // (the system's own word for it, "path must be shorter than SUN_LEN", says neither
    // the limit nor what to check)
    let len = socket.as_os_str().len();
    if len > crate::api::MAX_SOCKET_PATH_BYTES {
        return fail(format!(
            "cannot reach the trmx node at {}: the path is {len} bytes long, and a Unix \
             socket path holds at most {}, so no node listens there: check --socket (or \
             TRMX_NODE_SOCKET), or use --config",
            socket.display(),
            crate::api::MAX_SOCKET_PATH_BYTES
        ));
    }
    connect_local_with_timeout(socket, Some(timeout))
        .await
        .map_err(|e| unreachable_node(socket, io_cause(&e)))
}

/// Why the node's socket at `socket` could not be opened, and what to do.
fn unreachable_node(socket: &Path, cause: Option<&std::io::Error>) -> CliError {
    use std::io::ErrorKind;
    let at = socket.display();
    match cause.map(std::io::Error::kind) {
        // (the node may well be running: the socket is its user's only, mode 0600)
        Some(ErrorKind::PermissionDenied) => CliError(format!(
            "cannot reach the trmx node at {at}: permission denied (only the node's OS user \
             may open its socket): run the command as that user, e.g. `sudo -u trmx \
             trmx-node …`"
        )),
        Some(ErrorKind::NotFound | ErrorKind::ConnectionRefused) | None => CliError(format!(
            "cannot reach the trmx node at {at}: is `trmx-node run` running?"
        )),
        Some(_) => CliError(format!(
            "cannot reach the trmx node at {at} ({}): is `trmx-node run` running?",
            cause.map(ToString::to_string).unwrap_or_default()
        )),
    }
}

fn io_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// The flags of `send`, by the `SendRequest` field each sets.
const SEND_FLAGS: &[(&str, &str)] = &[
    ("recipient", "--to"),
    ("kind", "--kind"),
    ("case_ref", "--case"),
    ("new_case", "--new-case"),
    ("in_reply_to", "--reply-to"),
    ("priority", "--urgent"),
    ("idempotency_key", "--key"),
];

/// The flags of `outbox` and `inbox`, by the request field each sets.
const FILTER_FLAGS: &[(&str, &str)] = &[
    ("case_ref", "--case"),
    ("counterpart", "--with"),
    ("kind", "--kind"),
    ("state", "--state"),
    ("limit", "--limit"),
    ("page_token", "--page-token"),
];

/// The argument of `show` and `withdraw`, by the request field it sets.
const ID_ARG: &[(&str, &str)] = &[("message_id", "<ID>")];

/// The argument and flag of `case`, by the request field each sets.
const CASE_ARGS: &[(&str, &str)] = &[("case_ref", "<CASE>"), ("page_size", "--page-size")];

/// The flags of `due`, by the request field each sets.
const DUE_FLAGS: &[(&str, &str)] = &[
    ("today", "--today"),
    ("limit", "--limit"),
    ("page_token", "--page-token"),
];

/// A status from the node as one line, naming the flag the user typed where the
/// node names the request field it set (`--to: …`, not `recipient: …`): `flags`
/// maps the command's fields to its flags. The rule says the flags too in place of
/// the fields it mentions (`set --new-case to open one`).
fn command_error(status: &tonic::Status, socket: &Path, flags: &[(&str, &str)]) -> CliError {
    let flag_of = |field: &str| {
        flags
            .iter()
            .find(|(f, _)| *f == field)
            .map(|&(_, flag)| flag)
    };
    if let Some(field) = invalid_field(status)
        && let Some(flag) = flag_of(field)
        && let Some(rule) = status
            .message()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(": "))
    {
        // (only field names no sentence uses as a word: `kind` stays a word; `today`
        // is only ever ListDue's field in the node's answers)
        let rule = rule
            .split_inclusive(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|piece| {
                let word =
                    piece.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
                match flag_of(word) {
                    Some(flag) if word.contains('_') || word == "today" => {
                        format!("{flag}{}", &piece[word.len()..])
                    }
                    _ => piece.to_owned(),
                }
            })
            .collect::<String>();
        return CliError(format!("{flag}: {rule}"));
    }
    status_line(status, socket)
}

/// A status from the node as one line.
fn status_line(status: &tonic::Status, socket: &Path) -> CliError {
    // (tonic's own word for a lost connection; the node's `broker unavailable: …`
    // may quote the same word about the broker)
    if status.code() == Code::Unavailable && status.message().starts_with("transport error") {
        return CliError(format!(
            "lost the connection to the trmx node at {}: is `trmx-node run` running?",
            socket.display()
        ));
    }
    if timed_out(status) {
        return CliError(format!(
            "the trmx node at {} did not answer within --timeout: it accepts connections \
             but may be stuck or stopped; see its log (e.g. `journalctl -u trmx-node`), or \
             pass a longer --timeout",
            socket.display()
        ));
    }
    CliError(status.message().to_owned())
}

/// Whether `status` is the CLI's own `--timeout` giving up on the node's answer.
fn timed_out(status: &tonic::Status) -> bool {
    // (tonic's word for the channel's --timeout; the node itself never answers CANCELLED)
    status.code() == Code::Cancelled && status.message() == "Timeout expired"
}

/// A change (`send`, `withdraw`) cut by `--timeout`: a node that is only slow may have
/// made it all the same, `done` says what and `check` how to find out.
fn change_timed_out(socket: &Path, done: &str, check: &str) -> CliError {
    CliError(format!(
        "the trmx node at {} did not answer within --timeout, and may have {done} all the \
         same: {check}; the node may also be stuck or stopped: see its log (e.g. `journalctl \
         -u trmx-node`), or pass a longer --timeout",
        socket.display()
    ))
}

async fn client_command(
    command: Command,
    socket: &Path,
    timeout: std::time::Duration,
    out: &Output,
) -> Result<(), CliError> {
    // Read and check a file before contacting the node: a bad file is
    // reported even when the node is down.
    let prepared = match &command {
        Command::Send(args) => Some(prepare_send(args)?),
        _ => None,
    };
    let mut client = connect(socket, timeout).await?;
    let err = |s: tonic::Status| status_line(&s, socket);
    match command {
        Command::Run { .. } | Command::CheckConfig | Command::AcceptClock => Ok(()),
        Command::Send(args) => {
            let Some(request) = prepared else {
                return Ok(());
            };
            let response = client
                .send(request)
                .await
                .map_err(|s| send_error(&s, &args.file, socket))?
                .into_inner();
            let what = format!("{} for {}", format::kind(args.kind.to_pb() as i32), args.to);
            // A retry (the same key: by default the same command and file) returns the
            // message sent the first time, in its state now.
            let earlier = response
                .entry
                .as_ref()
                .filter(|e| e.state != pb::OutboxState::Queued as i32);
            let failed = earlier.is_some_and(|e| e.state == pb::OutboxState::Failed as i32);
            if out.json {
                out.json_lines(std::slice::from_ref(&response))?;
            } else if !failed {
                out.print(&format!("{}\n", response.message_id))?;
                match earlier {
                    None => eprintln!("{what} queued in case {}", response.case_ref),
                    Some(entry) => eprintln!(
                        "{what} was sent before with this key, in case {}: {} (nothing new sent)",
                        response.case_ref,
                        format::outbox_state(entry)
                    ),
                }
            }
            match earlier {
                Some(entry) if failed => fail(format!(
                    "{what} was sent before with this key as message {} and is {}: nothing was \
                     sent now; to send it again, pass a new --key",
                    response.message_id,
                    format::outbox_state(entry)
                )),
                _ => Ok(()),
            }
        }
        Command::Outbox { filter, state } => {
            let request = pb::ListOutboxRequest {
                case_ref: filter.case.unwrap_or_default(),
                counterpart: filter.with.unwrap_or_default(),
                kind: filter.kind.map(|k| k.to_pb() as i32).unwrap_or_default(),
                state: state.map(|s| s as i32).unwrap_or_default(),
                limit: filter.limit,
                page_token: filter.page_token.unwrap_or_default(),
            };
            let page = client
                .list_outbox(request)
                .await
                .map_err(|s| command_error(&s, socket, FILTER_FLAGS))?
                .into_inner();
            more(&page.next_page_token);
            if out.json {
                out.json_lines(&page.entries)
            } else {
                out.print(&format::outbox(&page.entries))
            }
        }
        Command::Inbox { filter } => {
            let request = pb::ListInboxRequest {
                case_ref: filter.case.unwrap_or_default(),
                counterpart: filter.with.unwrap_or_default(),
                kind: filter.kind.map(|k| k.to_pb() as i32).unwrap_or_default(),
                limit: filter.limit,
                page_token: filter.page_token.unwrap_or_default(),
            };
            let page = client
                .list_inbox(request)
                .await
                .map_err(|s| command_error(&s, socket, FILTER_FLAGS))?
                .into_inner();
            more(&page.next_page_token);
            if out.json {
                out.json_lines(&page.entries)
            } else {
                out.print(&format::inbox(&page.entries))
            }
        }
        Command::Show { id } => {
            // (the JSON form only: both forms of a message with large attachments
            // would take twice the size)
            let response = client
                .get_message(pb::GetMessageRequest {
                    message_id: id,
                    body_form: pb::BodyForm::Json as i32,
                })
                .await
                .map_err(|s| command_error(&s, socket, ID_ARG))?
                .into_inner();
            if out.json {
                out.print(&(show_json(response)? + "\n"))
            } else {
                out.print(&format::message(&response))
            }
        }
        Command::Case { case, page_size } => {
            let timeline = case_timeline(&mut client, case, page_size)
                .await
                .map_err(|s| command_error(&s, socket, CASE_ARGS))?;
            // (as `show` of an unknown id: a mistyped reference must not read as an
            // empty case to a script or a caseworker)
            if timeline.entries.is_empty() {
                return fail(format!(
                    "case {}: this node has sent or received no message in it: check the \
                     reference (`trmx-node outbox` and `trmx-node inbox` show the case of \
                     each message)",
                    timeline.case_ref
                ));
            }
            if out.json {
                out.json_lines(&timeline.entries)
            } else {
                out.print(&format::case(&timeline))
            }
        }
        Command::Due {
            today,
            limit,
            page_token,
        } => {
            let page = client
                .list_due(pb::ListDueRequest {
                    today: today.unwrap_or_default(),
                    limit,
                    page_token: page_token.unwrap_or_default(),
                })
                .await
                .map_err(|s| command_error(&s, socket, DUE_FLAGS))?
                .into_inner();
            more(&page.next_page_token);
            if out.json {
                out.json_lines(&page.items)
            } else {
                out.print(&format::due(&page.items))
            }
        }
        Command::Watch { after } => {
            // (the node's answer names the request field; the user typed --after)
            let watch_err = |s: tonic::Status| {
                let CliError(line) = status_line(&s, socket);
                CliError(line.replace("after_seq", "--after"))
            };
            let mut stream = client
                .watch(pb::WatchRequest { after_seq: after })
                .await
                .map_err(watch_err)?
                .into_inner();
            while let Some(item) = stream.next().await {
                let entry = item.map_err(watch_err)?;
                let text = if out.json {
                    to_json(&entry)? + "\n"
                } else {
                    format::watched(&entry)
                };
                // (its reader has gone, as `| head -n 1` does once it has its line: the
                // watch would otherwise hold the pipeline open for ever)
                if !out.write(&text)? {
                    return Ok(());
                }
            }
            fail("the trmx node closed the watch stream (did it stop?)")
        }
        Command::Withdraw { id } => {
            let withdrawn = client
                .withdraw(pb::WithdrawMessageRequest {
                    message_id: id.clone(),
                })
                .await
                .map_err(|s| {
                    if timed_out(&s) {
                        let check = format!("`trmx-node show {id}` tells");
                        change_timed_out(socket, "withdrawn the message", &check)
                    } else {
                        command_error(&s, socket, ID_ARG)
                    }
                })?
                .into_inner();
            if out.json {
                out.print(&format!(
                    "{}\n",
                    serde_json::json!({
                        "messageId": id,
                        "withdrawn": true,
                        "brokerPending": withdrawn.broker_pending,
                    })
                ))
            } else {
                if withdrawn.broker_pending {
                    eprintln!(
                        "note: the broker cannot be reached now; in case an earlier submit of \
                         {id} reached it, the node withdraws it there too as soon as it can \
                         (`trmx-node show {id}` tells; a delivery receipt would mean it arrived first)"
                    );
                }
                out.print(&format!("withdrew {id}\n"))
            }
        }
        Command::Participants => {
            let list = client
                .list_participants(pb::ListParticipantsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .participants;
            if out.json {
                out.json_lines(&list)
            } else {
                out.print(&format::participants(&list))
            }
        }
        Command::Status => {
            let status = client
                .get_node_status(pb::GetNodeStatusRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if out.json {
                out.json_lines(&[status])
            } else {
                out.print(&format::status(&status, std::time::SystemTime::now()))
            }
        }
    }
}

/// The whole timeline of `case`, read a page at a time (`page_size` messages per
/// request, 0: the node's default), in one response.
async fn case_timeline(
    client: &mut NodeApiClient<Channel>,
    case: String,
    page_size: u32,
) -> Result<pb::GetCaseResponse, tonic::Status> {
    let page_size = i32::try_from(page_size).unwrap_or(i32::MAX);
    let mut timeline = pb::GetCaseResponse {
        case_ref: case,
        ..Default::default()
    };
    let mut page_token = String::new();
    loop {
        let page = client
            .get_case(pb::GetCaseRequest {
                case_ref: timeline.case_ref.clone(),
                page_size,
                page_token: page_token.clone(),
            })
            .await?
            .into_inner();
        timeline.case_ref = page.case_ref;
        timeline.entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return Ok(timeline);
        }
        // (a node that gave the same token again would keep this loop going)
        if page.next_page_token == page_token {
            return Err(tonic::Status::internal(
                "the node gave the same page of the case twice; its timeline could not be read",
            ));
        }
        page_token = page.next_page_token;
    }
}

/// Tells on stderr (not in the listing a script reads) that older entries
/// match, and how to get them.
fn more(next_page_token: &str) {
    if !next_page_token.is_empty() {
        eprintln!("more entries match: add --page-token {next_page_token}");
    }
}

/// `show --json`: the response with `bodyJson` replaced by the parsed `body`.
fn show_json(response: pb::GetMessageResponse) -> Result<String, CliError> {
    let body_json = response.body_json.clone();
    let without_body = pb::GetMessageResponse {
        body: None,
        body_json: String::new(),
        ..response
    };
    let mut value = serde_json::to_value(&without_body)
        .map_err(|e| CliError(format!("cannot write JSON: {e}")))?;
    if let Some(map) = value.as_object_mut()
        && let Ok(body) = serde_json::from_str::<serde_json::Value>(&body_json)
    {
        map.insert("body".to_owned(), body);
    }
    to_json(&value)
}

/// Fields of `SendRequest` itself (errors on them are not about the file).
const REQUEST_FIELDS: [&str; 9] = [
    "kind",
    "recipient",
    "case_ref",
    "new_case",
    "in_reply_to",
    "priority",
    "idempotency_key",
    "expires_at",
    "body",
];

/// A `Send` error; body errors are prefixed with the file name, errors on a
/// request field name the flag that set it.
fn send_error(status: &tonic::Status, file: &Path, socket: &Path) -> CliError {
    if timed_out(status) {
        return change_timed_out(
            socket,
            "queued the message",
            "`trmx-node outbox` shows it if so, and the same command again does not send it \
             twice (it prints the message's id and state)",
        );
    }
    if status.code() == Code::AlreadyExists {
        return CliError(format!(
            "{}: to send this document as a new message, pass another --key",
            status.message()
        ));
    }
    match invalid_field(status) {
        Some(field) if !REQUEST_FIELDS.contains(&field) => {
            CliError(format!("{}: {}", file.display(), status.message()))
        }
        _ => command_error(status, socket, SEND_FLAGS),
    }
}

/// Largest document `send` reads: what the local API takes in one request, less
/// room for the request's other fields. A body within the rules is far smaller
/// (its attachments hold at most 2 MiB).
const MAX_DOCUMENT_BYTES: u64 = (crate::api::MAX_REQUEST_BYTES - 64 * 1024) as u64;

/// The document at `path`, read no further than [`MAX_DOCUMENT_BYTES`]: a wrong file
/// (a video, `/dev/zero`) is refused with its name, not read into memory whole, nor
/// sent to fail as an HTTP/2 error.
fn read_document(path: &Path) -> Result<Vec<u8>, CliError> {
    use std::io::Read;
    let file = path.display();
    let cannot_read = |e: std::io::Error| CliError(format!("{file}: cannot read: {e}"));
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(cannot_read)?
        .take(MAX_DOCUMENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
        return fail(format!(
            "{file}: is larger than {MAX_DOCUMENT_BYTES} bytes ({:.2} MiB), the most a document \
             can be (its attachments hold at most 2 MiB): is it the right file?",
            MAX_DOCUMENT_BYTES as f64 / (1024.0 * 1024.0)
        ));
    }
    Ok(bytes)
}

/// Reads and checks the document, and builds the request.
fn prepare_send(args: &SendArgs) -> Result<pb::SendRequest, CliError> {
    let file = args.file.display();
    let bytes = read_document(&args.file)?;
    let text =
        String::from_utf8(bytes).map_err(|_| CliError(format!("{file}: is not UTF-8 text")))?;
    // Syntax first, so that a broken file gets a line and column.
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&text) {
        return fail(format!("{file}: not valid JSON: {e}"));
    }
    let in_reply_to = match &args.reply_to {
        Some(id) => {
            Some(MessageId::parse(id).map_err(|e| CliError(format!("--reply-to: {}", e.rule)))?)
        }
        None => None,
    };
    let body = Body::from_json(args.kind, &text).map_err(|e| {
        // (a document of another kind, or --kind mistyped: say which kind it reads as)
        let hint = kind_hint(args.kind, &text, &e)
            .map(|kind| format!(" (the document reads as a {kind}: --kind {kind}?)"))
            .unwrap_or_default();
        CliError(format!("{file}: {e}{hint}"))
    })?;
    let context = BodyContext {
        in_reply_to,
        today: Date::of(SystemTime::now()),
    };
    body.validate(&context)
        .map_err(|e| CliError(format!("{file}: {e}")))?;
    let case = args.case.clone().unwrap_or_default();
    let key = match &args.key {
        Some(key) => key.clone(),
        None => default_idempotency_key(text.as_bytes(), args),
    };
    Ok(pb::SendRequest {
        kind: args.kind.to_pb() as i32,
        recipient: args.to.clone(),
        case_ref: case,
        new_case: args.new_case,
        in_reply_to: args.reply_to.clone().unwrap_or_default(),
        priority: if args.urgent {
            pb::Priority::Urgent
        } else {
            pb::Priority::Normal
        } as i32,
        idempotency_key: key,
        expires_at: None,
        body: Some(pb::send_request::Body::BodyJson(text)),
    })
}

/// The one other application kind that `text` parses as, when it does not parse as
/// `kind` for an unknown field (the mark of a document of another kind).
fn kind_hint(kind: Kind, text: &str, error: &trmx_proto::ValidationError) -> Option<&'static str> {
    if error.rule != "unknown field" {
        return None;
    }
    let mut others = Kind::APPLICATION
        .into_iter()
        .filter(|&other| other != kind && Body::from_json(other, text).is_ok());
    match (others.next(), others.next()) {
        (Some(other), None) => Some(other.name()),
        _ => None,
    }
}

/// `cli:` + hex SHA-256 of (recipient, kind, case, the message answered, priority, file
/// content): the same command run twice queues once, and a command that differs in any
/// of them is another message (the same file answering a second request, or sent again
/// as urgent).
pub fn default_idempotency_key(content: &[u8], args: &SendArgs) -> String {
    let case = match (&args.case, args.new_case) {
        (_, true) => "new-case",
        (Some(case), false) => case.as_str(),
        (None, false) => "",
    };
    let reply_to = args.reply_to.as_deref().unwrap_or("");
    let priority = if args.urgent { "urgent" } else { "normal" };
    let mut input = Vec::with_capacity(content.len() + 192);
    for part in [
        "trmx-cli-send-v2",
        &args.to,
        args.kind.name(),
        case,
        reply_to,
        priority,
    ] {
        input.extend_from_slice(part.as_bytes());
        input.push(0);
    }
    input.extend_from_slice(content);
    let digest = trmx_proto::envelope::sha256(&input);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("cli:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--state` takes the words the outbox table shows as well as the API's names, and
    /// tells where withdrawn messages are.
    #[test]
    fn the_state_filter_takes_the_table_s_words() {
        for said in [
            "submitted",
            "at the broker",
            "at-the-broker",
            " At_The_Broker ",
        ] {
            assert_eq!(parse_state(said), Ok(pb::OutboxState::Submitted), "{said}");
        }
        assert_eq!(parse_state("FAILED"), Ok(pb::OutboxState::Failed));
        let withdrawn = parse_state("withdrawn").unwrap_err();
        assert!(withdrawn.contains("--state failed"), "{withdrawn}");
        let wrong = parse_state("at broker").unwrap_err();
        assert!(wrong.contains("at-the-broker"), "{wrong}");
    }
}
