//! The `trmx-broker` command line: parses flags, loads the config, binds, and
//! runs the broker until SIGTERM/SIGINT. SIGHUP reloads the TLS material, the CRL
//! and the participants, and warns when the config file says otherwise of the rest.
//!
//! It lives in the library so that other executables (the demo's multi-call
//! binary, process-level tests) run exactly what `trmx-broker` runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::ParticipantConfig;
use crate::server::RunningBroker;
use crate::{Broker, BrokerConfig};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use trmx_proto::ParticipantId;

/// Threads for blocking store work (tokio's default is 512).
const MAX_BLOCKING_THREADS: usize = 16;

/// The trmx store-and-forward broker.
///
/// The broker's flags go before or after `run`/`check-config`: `trmx-broker --config F run`
/// and `trmx-broker run --config F` are the same (the node's form). The operator and
/// offline commands (`admin`, `audit`, `store`) take their own flags.
#[derive(Debug, Parser)]
#[command(name = "trmx-broker", version)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Flags of `run` and `check-config` (also accepted before the command).
///
/// Environment variables, read when the flag is given nowhere: `TRMX_BROKER_CONFIG` for
/// `--config`, `TRMX_LOG` for `--log-level`. They are not clap `env` attributes, since
/// those would fill the command's copy of a flag and hide the same flag given before it.
#[derive(Debug, Clone, Default, clap::Args)]
struct ServerArgs {
    /// The broker's TOML config file (see broker.example.toml); required to run the
    /// broker or check its config. [env: TRMX_BROKER_CONFIG]
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address; overrides `listen` in the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory; overrides `data_dir` in the config.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `info,trmx_broker=debug` (RUST_LOG syntax); each part
    /// must be a level or target=level, as must TRMX_LOG's. [env: TRMX_LOG] [default: info]
    #[arg(long)]
    log_level: Option<String>,
    /// Write the bound address to this file once the broker accepts connections.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

impl ServerArgs {
    /// These flags as given after the command, else before it.
    fn or(self, before: Self) -> Self {
        Self {
            config: self.config.or(before.config),
            listen: self.listen.or(before.listen),
            data_dir: self.data_dir.or(before.data_dir),
            log_level: self.log_level.or(before.log_level),
            ready_file: self.ready_file.or(before.ready_file),
        }
    }

    /// The first flag given, by name (to refuse it where it means nothing).
    fn first_given(&self) -> Option<&'static str> {
        [
            ("--config", self.config.is_some()),
            ("--listen", self.listen.is_some()),
            ("--data-dir", self.data_dir.is_some()),
            ("--log-level", self.log_level.is_some()),
            ("--ready-file", self.ready_file.is_some()),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }

    fn config_path(&self) -> Option<PathBuf> {
        self.config
            .clone()
            .or_else(|| std::env::var_os("TRMX_BROKER_CONFIG").map(PathBuf::from))
    }

    /// The log filter to give tracing: `--log-level`, else `trmx_log` (the `TRMX_LOG`
    /// variable), else `info`, without the whitespace around its parts. A filter is refused, naming where it came from, when tracing cannot parse it
    /// or when a directive is neither a level nor `target=level`: tracing reads a bare word
    /// such as a mistyped `debgu` as a target, and the broker would run and log nothing,
    /// its errors included. `TRMX_LOG` is held to the same rule as the flag: it is how
    /// operators set the level (a unit file's `Environment=`), so a typo there silences a
    /// production broker just the same; a developer loses nothing, `target=trace` says
    /// what a bare `target` did.
    fn log_filter(&self, trmx_log: Option<std::ffi::OsString>) -> anyhow::Result<String> {
        let (source, filter) = match (&self.log_level, trmx_log) {
            (Some(flag), _) => ("--log-level", flag.clone()),
            (None, Some(env)) => match env.into_string() {
                Ok(filter) => ("TRMX_LOG", filter),
                Err(_) => anyhow::bail!("TRMX_LOG is not UTF-8"),
            },
            (None, None) => return Ok("info".to_owned()),
        };
        // (the filter as tracing must be given it: the whitespace around a directive
        // would be part of a target to tracing, `info ` a silent broker)
        let checked = trmx_durable::log_filter::check_log_filter(&filter)
            .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        if checked.is_empty() {
            anyhow::bail!("{source} must not be empty (a level such as info, or target=level)");
        }
        tracing_subscriber::EnvFilter::try_new(&checked)
            .map_err(|e| anyhow::anyhow!("{source} {filter:?} is not a valid log filter: {e}"))?;
        Ok(checked)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default).
    Run(ServerArgs),
    /// Load and validate the config, load the TLS material as `run` does, check that the
    /// data directory is writable, make the clock check of a start (refused: a system
    /// clock further than `lifecycle.max_downtime` from the store's last run), print the
    /// effective config, and exit. The store is not opened: its last run is read from
    /// `last-run.json` in the data directory, which the broker writes at start and every
    /// minute (so this works while the broker runs too); without that file (a store of an
    /// older broker), or with a damaged one, the clock check is skipped and said.
    CheckConfig(ServerArgs),
    /// Operator commands against a running broker, with an operator certificate
    /// (queues, participants, messages, dead letters, redrive, purge, audit, stats).
    Admin(Box<crate::admin_cli::AdminArgs>),
    /// Offline audit-log work on a stopped broker's data directory (`audit verify`).
    Audit(crate::admin_cli::OfflineAuditArgs),
    /// Offline work on a stopped broker's store (`store compact`, `store verify`,
    /// `store accept-clock`).
    Store(crate::admin_cli::OfflineStoreArgs),
}

/// What the command line asks for.
#[derive(Debug)]
enum Invocation {
    /// Run the broker, or only check its config.
    Serve {
        args: ServerArgs,
        check_only: bool,
    },
    Admin(Box<crate::admin_cli::AdminArgs>),
    Audit(crate::admin_cli::OfflineAuditArgs),
    Store(crate::admin_cli::OfflineStoreArgs),
}

impl Cli {
    fn invocation(self) -> Result<Invocation, String> {
        let before = self.server;
        let (name, offline) = match self.command {
            None => {
                return Ok(Invocation::Serve {
                    args: before,
                    check_only: false,
                });
            }
            Some(Command::Run(args)) => {
                return Ok(Invocation::Serve {
                    args: args.or(before),
                    check_only: false,
                });
            }
            Some(Command::CheckConfig(args)) => {
                return Ok(Invocation::Serve {
                    args: args.or(before),
                    check_only: true,
                });
            }
            Some(Command::Admin(args)) => ("admin", Invocation::Admin(args)),
            Some(Command::Audit(args)) => ("audit", Invocation::Audit(args)),
            Some(Command::Store(args)) => ("store", Invocation::Store(args)),
        };
        // silently ignoring e.g. `--data-dir` before `store verify` would verify the
        // wrong directory's neighbour, or nothing the operator meant
        match before.first_given() {
            Some(flag) => Err(format!(
                "{flag} is a flag of `run` and `check-config`; `{name}` takes its own flags \
                 (see `trmx-broker {name} --help`)"
            )),
            None => Ok(offline),
        }
    }
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
    let (args, check_only) = match cli.invocation() {
        Ok(Invocation::Serve { args, check_only }) => (args, check_only),
        Ok(Invocation::Admin(args)) => return crate::admin_cli::run(*args),
        Ok(Invocation::Audit(args)) => return crate::admin_cli::run_offline_audit(args),
        Ok(Invocation::Store(args)) => return crate::admin_cli::run_offline_store(args),
        Err(message) => {
            eprintln!("trmx-broker: {message}");
            return ExitCode::from(2);
        }
    };
    match run(args, check_only) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("trmx-broker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: ServerArgs, check_only: bool) -> anyhow::Result<()> {
    let Some(config_path) = args.config_path() else {
        let what = if check_only {
            "to check a config"
        } else {
            "to run the broker"
        };
        anyhow::bail!("--config FILE (or TRMX_BROKER_CONFIG) is required {what}");
    };
    let source = ConfigSource {
        path: config_path,
        listen: args.listen,
        data_dir: args.data_dir.clone(),
    };
    let config_path = source.path.as_path();
    let config = source.read()?;
    // (a --data-dir is the operator's own, given where they stand)
    refuse_paths_beside_the_config(&config, config_path, source.data_dir.is_some())?;
    // (check-config refuses it too: a typo is a silent broker)
    let log_filter = args.log_filter(std::env::var_os("TRMX_LOG"))?;
    if check_only {
        // what loading only warns about (the broker's own certificate revoked, a CRL past
        // its nextUpdate) goes to stderr as at a start; a logger set up already is kept
        let _ = init_tracing(&log_filter);
        let checked = crate::check_config(&config)?;
        let now = std::time::SystemTime::now();
        let certificate = certificate_validity(&config, now)?;
        let crl = crl_freshness(&config, now)?;
        let mut out = config.to_toml()?;
        out.push_str(&format!("# clock: {}\n", checked.clock_line()));
        out.push_str(&format!("# certificate: {certificate}\n"));
        if let Some(crl) = crl {
            out.push_str(&format!("# crl: {crl}\n"));
        }
        out.push_str(&format!("# config OK: {}\n", config_path.display()));
        // (a reader that went away, `check-config | grep -q …`, is no panic with exit
        // status 101 for a config that passed)
        use std::io::Write as _;
        return match std::io::stdout().lock().write_all(out.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(anyhow::anyhow!("cannot write to stdout: {e}"))
            }
            _ => Ok(()),
        };
    }
    config.validate()?;
    init_tracing(&log_filter)?;
    // A certificate not valid yet fails every handshake with the nodes: the rule of
    // check-config (an error beyond minutes, a warning within). A certificate that cannot
    // be read is left to the start, which names the file and the problem.
    // An expired one is check-config's error too, but the broker starts all the same and
    // says it at ERROR: a renewed certificate installed then is taken up by a reload
    // (SIGHUP), and the admin endpoint keeps the expiry on the dashboard meanwhile.
    if let Ok(info) = trmx_certs::CertInfo::from_pem_file(&config.tls.cert) {
        let now = std::time::SystemTime::now();
        if let Some((warning, _)) = not_valid_yet(&config, &info, now)? {
            tracing::warn!("{warning}");
        }
        if let Some(expired) = expired(&config, &info, now) {
            tracing::error!("{expired}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Store operations run on blocking threads; a few are enough, and each
        // extra thread costs memory (stack, malloc arena) under load.
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_broker(config, source, args.ready_file))
}

/// Where the running config came from: the file and the flags that override it, so that
/// a SIGHUP can read the file again as the start did ([`ConfigSource::load`]).
struct ConfigSource {
    path: PathBuf,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
}

impl ConfigSource {
    /// The file's config with the flags applied, as the start reads it.
    fn read(&self) -> anyhow::Result<BrokerConfig> {
        let mut config = BrokerConfig::load(&self.path)?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(data_dir) = &self.data_dir {
            config.data_dir = data_dir.clone();
        }
        Ok(config)
    }

    /// The config the broker would start with now: [`Self::read`], validated.
    fn load(&self) -> anyhow::Result<BrokerConfig> {
        let config = self.read()?;
        config.validate()?;
        Ok(config)
    }
}

/// At a SIGHUP, the config file read again as the start read it, with what the operator
/// who edited it must know of the settings a SIGHUP does not apply. A SIGHUP applies the
/// participants (`[[participants]]`, a new organisation above all) and the TLS material
/// and CRL at the paths the broker started with; an edit of anything else would otherwise
/// be ignored without a word until the next restart. `Err` (what to say) when the file no
/// longer loads: the broker goes on as it runs, and its next start would fail.
fn reread_config(
    running: &BrokerConfig,
    source: &ConfigSource,
) -> Result<(BrokerConfig, Option<String>), String> {
    let on_disk = source.load().map_err(|e| {
        format!(
            "the config file {} no longer loads ({e:#}): the broker goes on with the \
             config it runs (its participants unchanged), but its next start will fail; fix \
             the file (`trmx-broker check-config --config {}` checks it)",
            source.path.display(),
            source.path.display()
        )
    })?;
    let changed = changed_settings(running, &on_disk);
    let drift = (!changed.is_empty()).then(|| {
        format!(
            "the config file {} differs from the running config ({}): a SIGHUP applies the \
             participants, and the TLS material and the CRL at the paths the broker started \
             with, not these; restart the broker to apply them (`systemctl restart \
             trmx-broker`)",
            source.path.display(),
            changed.join("; ")
        )
    });
    Ok((on_disk, drift))
}

/// The settings whose values differ between `running` and `on_disk`, as `section.key`
/// names; empty when none does. The participants are not compared: a SIGHUP applies
/// them, and `RunningBroker::reload_registry` says what changed.
fn changed_settings(running: &BrokerConfig, on_disk: &BrokerConfig) -> Vec<String> {
    let mut changed = Vec::new();
    // by its name in the file (both serialise as check-config prints them; one that
    // cannot is named whole rather than missed)
    let without_participants = |config: &BrokerConfig| {
        let mut config = config.clone();
        config.participants.clear();
        config
    };
    let (running, on_disk) = (without_participants(running), without_participants(on_disk));
    let as_table = |config: &BrokerConfig| {
        let text = config.to_toml().ok()?;
        toml::from_str::<toml::Table>(&text).ok()
    };
    let (Some(before), Some(after)) = (as_table(&running), as_table(&on_disk)) else {
        if running != on_disk {
            changed.push("settings that cannot be compared one by one".to_owned());
        }
        return changed;
    };
    let mut names: Vec<String> = Vec::new();
    for key in before.keys().chain(after.keys()) {
        match (before.get(key), after.get(key)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                for inner in a.keys().chain(b.keys()) {
                    if a.get(inner) != b.get(inner) {
                        names.push(format!("{key}.{inner}"));
                    }
                }
            }
            _ => names.push(key.clone()),
        }
    }
    names.sort();
    names.dedup();
    changed.extend(names);
    changed
}

/// Refuses a relative path of the config that names nothing from the working directory
/// but something beside the config file: the broker takes relative paths from its working
/// directory (README), so run from elsewhere it said only "No such file" for a TLS file,
/// and, worse, made a new empty store for a relative `data_dir` while the real one, with
/// every queued message, sat beside the config.
fn refuse_paths_beside_the_config(
    config: &BrokerConfig,
    config_path: &Path,
    data_dir_given: bool,
) -> anyhow::Result<()> {
    let Some(config_dir) = config_path.parent() else {
        return Ok(());
    };
    let tls = &config.tls;
    let mut paths = vec![
        ("tls.ca", tls.ca.as_path()),
        ("tls.cert", tls.cert.as_path()),
        ("tls.key", tls.key.as_path()),
    ];
    paths.extend(tls.crl.as_deref().map(|crl| ("tls.crl", crl)));
    if !data_dir_given {
        paths.push(("data_dir", config.data_dir.as_path()));
    }
    for (field, path) in paths {
        let beside = config_dir.join(path);
        if path.is_absolute() || path.exists() || !beside.exists() {
            continue;
        }
        let cwd = std::env::current_dir().map_or_else(
            |_| "the working directory".to_owned(),
            |d| d.display().to_string(),
        );
        let what = if field == "data_dir" {
            "a new, empty store would be made there"
        } else {
            "it would not be found"
        };
        anyhow::bail!(
            "config: {field} = {:?} is a relative path, which the broker takes from its working \
             directory ({cwd}), where there is none ({what}), while {} is beside the config \
             file: write absolute paths in {} (as broker.example.toml does), or run from {}",
            path.display().to_string(),
            beside.display(),
            config_path.display(),
            config_dir.display()
        );
    }
    Ok(())
}

/// Below this many days left, `check-config` warns of the broker certificate's expiry.
const CERT_WARN_DAYS: u64 = 30;

/// The `# certificate:` line of `check-config`: the broker certificate's identity, serial
/// and expiry. A certificate that has expired passed the check with "config OK", though
/// every node refuses the broker then; that is an error here, saying what to do. One that
/// expires within [`CERT_WARN_DAYS`] is warned about on stderr. Every warning that applies
/// is given (one not valid yet by minutes did not hide that it expires soon).
fn certificate_validity(
    config: &BrokerConfig,
    now: std::time::SystemTime,
) -> anyhow::Result<String> {
    let path = &config.tls.cert;
    let info = trmx_certs::CertInfo::from_pem_file(path)?;
    let until = trmx_certs::format_time(info.not_after);
    let what = certificate_named(config, &info);
    let not_yet = not_valid_yet(config, &info, now)?;
    if let Some((warning, _)) = &not_yet {
        eprintln!("warning: {warning}");
    }
    if let Some(expired) = expired(config, &info, now) {
        anyhow::bail!("config: {expired}");
    }
    let left = info.not_after.duration_since(now).unwrap_or_default();
    let days = left.as_secs() / 86_400;
    if days < CERT_WARN_DAYS {
        eprintln!(
            "warning: {what} expires on {until}, in {days} days: every node refuses the broker \
             after that; renew it at the CA (`trmx-certs renew`), install it here and reload"
        );
    }
    let from = match not_yet {
        Some((_, span)) => format!(
            ", not valid before {} (in {span})",
            trmx_certs::format_time(info.not_before)
        ),
        None => String::new(),
    };
    Ok(format!(
        "{}, serial {}{from}, expires {until} (in {days} days)",
        info.identity, info.serial_hex
    ))
}

/// The broker certificate expired by this machine's clock, told with what to do: every
/// node refuses the broker until a renewed one is installed.
fn expired(
    config: &BrokerConfig,
    info: &trmx_certs::CertInfo,
    now: std::time::SystemTime,
) -> Option<String> {
    (info.not_after < now).then(|| {
        format!(
            "{} expired on {}: every node refuses the broker; renew it at the CA (`trmx-certs \
             renew`), install it here and reload (`systemctl reload trmx-broker`)",
            certificate_named(config, info),
            trmx_certs::format_time(info.not_after)
        )
    })
}

/// `tls.cert: the broker certificate PATH (IDENTITY, serial SERIAL)`.
fn certificate_named(config: &BrokerConfig, info: &trmx_certs::CertInfo) -> String {
    format!(
        "tls.cert: the broker certificate {} ({}, serial {})",
        config.tls.cert.display(),
        info.identity,
        info.serial_hex
    )
}

/// The broker certificate not valid yet by this machine's clock, for `run` and
/// `check-config` alike: every node refuses the broker until then. It is told with what
/// is known: its `notBefore` (the CA machine's clock at issue, less 5 minutes) and this
/// clock, one of which is off, and what each case means and needs (it blamed the
/// certificate when only this clock was behind, where nodes with a right clock accept
/// it). Within [`trmx_certs::NOT_VALID_YET_WARN`] it is a warning (returned, with the
/// time left, as `3 second(s)` or `4 minute(s)`); further, an error.
fn not_valid_yet(
    config: &BrokerConfig,
    info: &trmx_certs::CertInfo,
    now: std::time::SystemTime,
) -> anyhow::Result<Option<(String, String)>> {
    let Some(not_yet) = info.not_valid_yet(now, "nodes") else {
        return Ok(None);
    };
    let said = format!("{}: {}", certificate_named(config, info), not_yet.message);
    if !not_yet.warn_only {
        anyhow::bail!("config: {said}");
    }
    Ok(Some((said, not_yet.span)))
}

/// The `# crl:` line of `check-config`: when the earliest nextUpdate of the CRLs in
/// `tls.crl` is, or that it has passed. A CRL past its nextUpdate passed the check with
/// "config OK" and a log line at WARN: under `crl_policy = "strict"` the broker then
/// refuses every connection, so that is an error here, saying what to do; under "warn"
/// the line says it and so does stderr. `None` without a `tls.crl`. (The files were
/// loaded, and refused if damaged, by the check before this.)
fn crl_freshness(
    config: &BrokerConfig,
    now: std::time::SystemTime,
) -> anyhow::Result<Option<String>> {
    use x509_parser::prelude::FromDer as _;
    use x509_parser::revocation_list::CertificateRevocationList;
    let Some(path) = config.tls.crl.as_deref() else {
        return Ok(None);
    };
    let mut earliest: Option<(std::time::SystemTime, String)> = None;
    for der in trmx_certs::load_crls_pem(path)? {
        let Ok((_, crl)) = CertificateRevocationList::from_der(der.as_ref()) else {
            continue;
        };
        let Some(next) = crl.next_update() else {
            continue;
        };
        let next = trmx_certs::from_unix_seconds(next.timestamp());
        if earliest.as_ref().is_none_or(|(at, _)| next < *at) {
            earliest = Some((next, crl.issuer().to_string()));
        }
    }
    let Some((next, issuer)) = earliest else {
        return Ok(Some("no nextUpdate".to_owned()));
    };
    let when = trmx_certs::format_time(next);
    let Err(late) = next.duration_since(now) else {
        let days = next.duration_since(now).unwrap_or_default().as_secs() / 86_400;
        return Ok(Some(format!("next update {when} (in {days} days)")));
    };
    let what = format!(
        "tls.crl: the CRL of {issuer} in {} is past its nextUpdate ({when}, {} hours ago)",
        path.display(),
        late.duration().as_secs() / 3600
    );
    let fix = "at the CA, run `trmx-certs crl` and install its crl.pem here, then `systemctl \
               reload trmx-broker` (or SIGHUP)";
    if config.tls.crl_policy == crate::config::CrlPolicyConfig::Strict {
        anyhow::bail!(
            "config: {what}: with crl_policy = \"strict\" the broker refuses every \
             connection; {fix}"
        );
    }
    eprintln!("warning: {what}: revocations made after it are not known here; {fix}");
    Ok(Some(format!("past its nextUpdate {when}: {fix}")))
}

fn init_tracing(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("{filter:?} is not a valid log filter"))?;
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // (whatever the filter, sled's dumps of the payloads it stores are not logged)
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .finish()
        .with(trmx_durable::log_filter::NoStoredBytes);
    subscriber
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))
}

async fn run_broker(
    config: BrokerConfig,
    source: ConfigSource,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| bind_error(config.listen, &e))?;
    let mut running = config.clone();
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
                info!("SIGHUP received, reloading TLS material, CRL and participants");
                // file reads, and maybe a wait for an interval reload under
                // way: off the async workers' backs (the runtime is multi-thread)
                match tokio::task::block_in_place(|| broker.reload_tls()) {
                    Ok(report) => info!(
                        closed_connections = report.closed_connections,
                        closed = %report.closed.join(", "),
                        crl_stale = report.crl.stale,
                        // (why is the WARN just before: not valid yet)
                        certificate_refused = report.certificate_refused.is_some(),
                        "tls reloaded"
                    ),
                    Err(e) => warn!(error = %e, "tls reload failed, keeping the previous config"),
                }
                match tokio::task::block_in_place(|| reread_config(&running, &source)) {
                    Ok((on_disk, drift)) => {
                        reload_participants(&broker, &mut running, on_disk.participants);
                        if let Some(drift) = drift {
                            warn!("{drift}");
                        }
                    }
                    Err(said) => warn!("{said}"),
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

/// Puts `participants` (the config file's, read again) in force, and says what changed.
fn reload_participants(
    broker: &RunningBroker,
    running: &mut BrokerConfig,
    participants: Vec<ParticipantConfig>,
) {
    match broker.reload_registry(&participants) {
        Ok(change) => {
            running.participants = participants;
            if !change.is_empty() {
                let ids = |ids: &[ParticipantId]| {
                    ids.iter()
                        .map(ParticipantId::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                info!(
                    added = %ids(&change.added),
                    removed = %ids(&change.removed),
                    changed = %ids(&change.changed),
                    "participants reloaded: the added are served from their next request; \
                     the removed are refused from theirs, their streams ended, what is queued \
                     for them left to expire"
                );
            }
        }
        // (the file was validated as a start validates it: not expected)
        Err(e) => {
            warn!(error = %e, "participants not reloaded: the broker goes on with those it runs")
        }
    }
}

/// The failure to listen on `listen`, naming the setting and, when the address is taken,
/// what may hold it and how to find out (a broker already running, started a second time
/// by hand beside its service, is the usual cause).
fn bind_error(listen: SocketAddr, error: &std::io::Error) -> anyhow::Error {
    let what = format!("cannot listen on {listen} (`listen` in the config, or --listen)");
    match error.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "{what}: the address is in use: is a broker already running (`systemctl status \
             trmx-broker`)? `ss -ltnp 'sport = :{}'` shows what holds it",
            listen.port()
        ),
        std::io::ErrorKind::PermissionDenied if listen.port() < 1024 => anyhow::anyhow!(
            "{what}: permission denied: port {} is below 1024; use a port of 1024 or more, as \
             the example's 7443",
            listen.port()
        ),
        _ => anyhow::anyhow!("{what}: {error}"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use trmx_certs::{CertPaths, Federation};

    use crate::config::{OrganisationType, ParticipantConfig, TlsConfig};

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn broker_flags_go_before_or_after_the_command() {
        for args in [
            [
                "trmx-broker",
                "--config",
                "b.toml",
                "--data-dir",
                "d",
                "--listen",
                "127.0.0.1:1",
                "run",
            ],
            [
                "trmx-broker",
                "run",
                "--config",
                "b.toml",
                "--data-dir",
                "d",
                "--listen",
                "127.0.0.1:1",
            ],
            [
                "trmx-broker",
                "check-config",
                "--config",
                "b.toml",
                "--data-dir",
                "d",
                "--listen",
                "127.0.0.1:1",
            ],
            [
                "trmx-broker",
                "--config",
                "b.toml",
                "check-config",
                "--data-dir",
                "d",
                "--listen",
                "127.0.0.1:1",
            ],
        ] {
            let Ok(Invocation::Serve { args: server, .. }) = parse(&args).invocation() else {
                panic!("{args:?} serves");
            };
            assert_eq!(
                server.config.as_deref(),
                Some(Path::new("b.toml")),
                "{args:?}"
            );
            assert_eq!(server.data_dir.as_deref(), Some(Path::new("d")), "{args:?}");
            assert_eq!(
                server.listen,
                Some(SocketAddr::from(([127, 0, 0, 1], 1))),
                "{args:?}"
            );
        }
        // given twice, the flag after the command wins
        let Ok(Invocation::Serve { args: server, .. }) = parse(&[
            "trmx-broker",
            "--log-level",
            "warn",
            "run",
            "--log-level",
            "debug",
        ])
        .invocation() else {
            panic!("serves");
        };
        assert_eq!(server.log_level.as_deref(), Some("debug"));
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("run")
            .expect("run")
            .render_help()
            .to_string();
        for flag in ["--config", "--data-dir", "--listen", "--log-level"] {
            assert!(help.contains(flag), "{flag} in {help}");
        }
    }

    #[test]
    fn operator_and_offline_commands_neither_list_nor_ignore_the_broker_flags() {
        let mut command = Cli::command();
        for name in ["admin", "audit", "store"] {
            let help = command
                .find_subcommand_mut(name)
                .expect(name)
                .render_help()
                .to_string();
            for flag in ["--config", "--listen", "--ready-file", "--log-level"] {
                assert!(!help.contains(flag), "{flag} listed by {name}: {help}");
            }
        }
        // the offline commands keep their own --data-dir
        let Ok(Invocation::Store(_)) =
            parse(&["trmx-broker", "store", "verify", "--data-dir", "/x"]).invocation()
        else {
            panic!("store verify");
        };
        // a broker flag before them is refused, not silently dropped
        for args in [
            &[
                "trmx-broker",
                "--data-dir",
                "/x",
                "store",
                "verify",
                "--data-dir",
                "/y",
            ][..],
            &[
                "trmx-broker",
                "--config",
                "b.toml",
                "audit",
                "verify",
                "--data-dir",
                "/y",
            ],
            &[
                "trmx-broker",
                "--listen",
                "127.0.0.1:1",
                "admin",
                "--broker",
                "h:1",
                "queues",
            ],
        ] {
            let Ok(cli) = Cli::try_parse_from(args) else {
                continue; // refused by clap already
            };
            let error = cli.invocation().expect_err("refused");
            assert!(error.contains("takes its own flags"), "{args:?}: {error}");
        }
    }

    /// What a SIGHUP says of the config file: nothing when it says what runs, the flags
    /// that override it included; the settings by name and the participants by id when
    /// not.
    #[test]
    fn a_sighup_names_the_settings_the_file_changed_and_not_the_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, path, _federation) = valid_config(dir.path());
        let flagged: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let source = ConfigSource {
            path: path.clone(),
            listen: Some(flagged),
            data_dir: Some(dir.path().join("elsewhere")),
        };
        let running = source.load().expect("loads");
        assert_eq!(running.listen, flagged);
        assert_eq!(drift(&running, &source), None);

        let mut edited = config.clone();
        edited.participants[0].accepts.push("follow-up".into());
        edited.lifecycle.ack_timeout += Duration::from_secs(1);
        edited.limits.max_envelope_bytes += 1;
        write_config(dir.path(), &edited);
        let said = drift(&running, &source).expect("drift");
        // (the participants are applied by the SIGHUP: they are no drift)
        assert!(
            said.contains("(lifecycle.ack_timeout; limits.max_envelope_bytes)"),
            "{said}"
        );
        assert!(
            !said.contains("listen") && !said.contains("data_dir"),
            "{said}"
        );
        // (nor are they among the settings compared)
        let mut without = edited.clone();
        without.participants.clear();
        assert_eq!(changed_settings(&without, &edited), Vec::<String>::new());
    }

    /// A file that leaves most settings to their defaults (the request-bytes budget among
    /// them, which `from_toml` derives from `max_envelope_bytes`), written with units and
    /// its participants in another order than the running config's: a SIGHUP finds
    /// nothing changed, for every reload (logrotate's included) would otherwise warn. A
    /// file replaced by a rename is read anew.
    #[test]
    fn a_sighup_finds_a_file_of_defaults_unchanged_and_reads_a_renamed_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, path, _federation) = valid_config(dir.path());
        let participant = |id: &str, country: &str| {
            format!(
                "[[participants]]\nid = \"{id}\"\ndisplay_name = \"{id}\"\ncountry = \
                 \"{country}\"\norganisation_type = \"ngo\"\naccepts = [\"referral\"]\n"
            )
        };
        let text = |participants: &[(&str, &str)]| {
            let mut text = format!(
                "data_dir = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[limits]\n\
                 max_envelope_bytes = \"32MiB\"\n[lifecycle]\nack_timeout = \"90s\"\n",
                config.data_dir, config.tls.ca, config.tls.cert, config.tls.key
            );
            for (id, country) in participants {
                text.push_str(&participant(id, country));
            }
            text
        };
        std::fs::write(&path, text(&[("NL-NRM", "NL"), ("BE-PAYOKE", "BE")])).expect("write");
        let source = ConfigSource {
            path: path.clone(),
            listen: None,
            data_dir: None,
        };
        let running = source.load().expect("loads");
        assert!(
            running.limits.max_incoming_request_bytes_per_identity
                > running.limits.max_envelope_bytes,
            "{:?}",
            running.limits
        );
        std::fs::write(&path, text(&[("BE-PAYOKE", "BE"), ("NL-NRM", "NL")])).expect("write");
        assert_eq!(drift(&running, &source), None);

        let next = dir.path().join("broker.toml.new");
        std::fs::write(
            &next,
            text(&[("BE-PAYOKE", "BE"), ("NL-NRM", "NL"), ("DE-KOK", "DE")]),
        )
        .expect("write");
        std::fs::rename(&next, &path).expect("rename");
        let (on_disk, said) = reread_config(&running, &source).expect("loads");
        assert_eq!(said, None);
        assert_eq!(on_disk.participants.len(), 3, "{:?}", on_disk.participants);
    }

    /// What a SIGHUP warns of the config file `source` against `running`: the settings it
    /// does not apply, or that the file no longer loads.
    fn drift(running: &BrokerConfig, source: &ConfigSource) -> Option<String> {
        match reread_config(running, source) {
            Ok((_, drift)) => drift,
            Err(said) => Some(said),
        }
    }

    /// A federation and a valid config file in `dir`; returns the config, its file, and
    /// the federation.
    fn valid_config(dir: &Path) -> (BrokerConfig, PathBuf, Federation) {
        let federation = Federation::create(&dir.join("pki"), "trm.test").expect("federation");
        let broker = federation.broker("test-1").expect("broker certificate");
        let tls = TlsConfig {
            ca: federation.ca_cert_path(),
            cert: broker.cert,
            key: broker.key,
            crl: Some(federation.crl_path()),
            crl_reload_interval: Duration::from_secs(3600),
            crl_policy: Default::default(),
        };
        let mut config = BrokerConfig::new(dir.join("data"), tls);
        config.participants = vec![ParticipantConfig {
            id: "NL-NRM".into(),
            display_name: "Dutch NRM".into(),
            country: "NL".into(),
            organisation_type: OrganisationType::Nrm,
            accepts: vec!["referral".into()],
        }];
        let path = write_config(dir, &config);
        (config, path, federation)
    }

    fn write_config(dir: &Path, config: &BrokerConfig) -> PathBuf {
        let path = dir.join("broker.toml");
        std::fs::write(&path, config.to_toml().expect("toml")).expect("write config");
        path
    }

    /// `trmx-broker check-config --config FILE` (the node's order): the error as printed.
    fn check_config(path: &Path) -> Result<(), String> {
        let config = path.to_str().expect("utf-8 path");
        let Ok(Invocation::Serve { args, check_only }) =
            parse(&["trmx-broker", "check-config", "--config", config]).invocation()
        else {
            panic!("check-config serves");
        };
        assert!(check_only);
        run(args, check_only).map_err(|e| format!("{e:#}"))
    }

    use std::time::Duration;

    #[test]
    fn check_config_accepts_a_good_config_and_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, path, _federation) = valid_config(dir.path());
        check_config(&path).expect("a good config");
        assert!(
            !config.data_dir.exists(),
            "check-config created the data directory"
        );
    }

    #[test]
    fn check_config_loads_the_tls_material_as_the_broker_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (good, _, federation) = valid_config(dir.path());
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = Federation::create(other_dir.path(), "trm.other").expect("federation");
        let stranger = other.broker("test-1").expect("certificate");
        let node = federation.participant("NL-NRM").expect("certificate");
        let key_of = |cert: &CertPaths| cert.key.clone();
        let garbage = dir.path().join("garbage.crl");
        std::fs::write(&garbage, "not a crl").expect("write");

        type Breakage = Box<dyn Fn(&mut TlsConfig)>;
        let missing = dir.path().join("nope.pem");
        let cases: Vec<(&str, Breakage, &str)> = vec![
            (
                "a missing certificate",
                Box::new({
                    let missing = missing.clone();
                    move |tls| tls.cert = missing.clone()
                }),
                "config: tls.cert: cannot read certificate",
            ),
            (
                "the key of another certificate",
                Box::new({
                    let key = key_of(&node);
                    move |tls| tls.key = key.clone()
                }),
                "config: tls.key and tls.cert: private key",
            ),
            (
                "a CRL that does not parse",
                Box::new({
                    let garbage = garbage.clone();
                    move |tls| tls.crl = Some(garbage.clone())
                }),
                "config: tls.crl: CRL",
            ),
            (
                "a certificate of another CA",
                Box::new({
                    let stranger = stranger.clone();
                    move |tls| {
                        tls.cert = stranger.cert.clone();
                        tls.key = stranger.key.clone();
                    }
                }),
                "config: tls.cert and tls.ca: certificate",
            ),
            (
                "a node certificate",
                Box::new({
                    let node = node.clone();
                    move |tls| {
                        tls.cert = node.cert.clone();
                        tls.key = node.key.clone();
                    }
                }),
                "not a server certificate",
            ),
            (
                "a participant's certificate as the CA",
                Box::new({
                    let node = node.clone();
                    move |tls| tls.ca = node.cert.clone()
                }),
                "config: tls.ca: CA certificate",
            ),
            (
                "another CA's CRL",
                Box::new({
                    let crl = other.crl_path();
                    move |tls| tls.crl = Some(crl.clone())
                }),
                "config: tls.crl and tls.ca: CRL",
            ),
        ];
        for (what, breakage, expected) in cases {
            let mut config = good.clone();
            breakage(&mut config.tls);
            let path = write_config(dir.path(), &config);
            let error = check_config(&path).expect_err(what);
            assert!(error.contains(expected), "{what}: {error}");
        }
        // each cause once
        let mut config = good.clone();
        config.tls.cert = missing.clone();
        let error = check_config(&write_config(dir.path(), &config)).expect_err("missing");
        assert_eq!(
            error.matches(&*missing.to_string_lossy()).count(),
            1,
            "{error}"
        );
        assert_eq!(error.matches("No such file").count(), 1, "{error}");
    }

    #[test]
    fn check_config_wants_a_data_dir_it_can_write_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut config, _, _federation) = valid_config(dir.path());
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").expect("write");
        config.data_dir = file.clone();
        let error = check_config(&write_config(dir.path(), &config)).expect_err("a file");
        assert!(
            error.contains("data_dir") && error.contains("not a directory"),
            "{error}"
        );
        config.data_dir = file.join("below");
        let error = check_config(&write_config(dir.path(), &config)).expect_err("under a file");
        assert!(
            error.contains("data_dir") && error.contains("ot a directory"),
            "{error}"
        );
        // an existing directory is fine
        config.data_dir = dir.path().to_owned();
        check_config(&write_config(dir.path(), &config)).expect("existing directory");
    }

    /// `--log-level debgu` (a typo) was a valid filter to tracing, one that shows only a
    /// target of that name: the broker ran and logged nothing, its errors included. It is
    /// refused, naming the flag or `TRMX_LOG` and what is allowed, by `check-config` too;
    /// levels, `target=level` lists and span filters still load.
    #[test]
    fn a_mistyped_log_level_is_refused_not_a_silent_broker() {
        let no_flag = ServerArgs::default();
        for typo in ["debgu", "Info,trmx_broke", "warn,debgu"] {
            let flag = ServerArgs {
                log_level: Some(typo.to_owned()),
                ..ServerArgs::default()
            };
            let error = format!("{:#}", flag.log_filter(None).expect_err(typo));
            assert!(error.starts_with("--log-level: "), "{error}");
            assert!(
                error.contains("is not a level (off, error, warn"),
                "{error}"
            );
            let error = format!(
                "{:#}",
                no_flag.log_filter(Some(typo.into())).expect_err(typo)
            );
            assert!(error.starts_with("TRMX_LOG: "), "{error}");
            assert!(error.contains("is not a level"), "{error}");
        }
        for empty in ["", " "] {
            let error = format!(
                "{:#}",
                no_flag.log_filter(Some(empty.into())).expect_err("empty")
            );
            assert!(error.starts_with("TRMX_LOG must not be empty"), "{error}");
        }
        for fine in [
            "debug",
            "WARN",
            "info,trmx_broker=debug",
            "warn,trmx_broker::service=trace,h2=off",
            "info,trmx_broker[rpc]=debug",
        ] {
            let flag = ServerArgs {
                log_level: Some(fine.to_owned()),
                ..ServerArgs::default()
            };
            assert_eq!(flag.log_filter(Some("debgu".into())).expect(fine), fine);
            assert_eq!(no_flag.log_filter(Some(fine.into())).expect(fine), fine);
        }
        assert_eq!(no_flag.log_filter(None).expect("default"), "info");

        let dir = tempfile::tempdir().expect("tempdir");
        let (_, path, _federation) = valid_config(dir.path());
        let config = path.to_str().expect("utf-8 path");
        let Ok(Invocation::Serve { args, check_only }) = parse(&[
            "trmx-broker",
            "check-config",
            "--config",
            config,
            "--log-level",
            "debgu",
        ])
        .invocation() else {
            panic!("check-config serves");
        };
        let error = format!("{:#}", run(args, check_only).expect_err("a typo"));
        assert!(
            error.starts_with("--log-level: \"debgu\" is not a level"),
            "{error}"
        );
    }
    /// A layer that counts the events it sees.
    struct CountEvents(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountEvents {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether a broker logging with `filter` logs an error of `trmx_broker` and one of
    /// `trmx_durable` (its store).
    fn logs_errors(filter: &str) -> bool {
        use tracing_subscriber::layer::SubscriberExt;
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::try_new(filter).expect("a checked filter"))
            .with(CountEvents(std::sync::Arc::clone(&count)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "trmx_broker::service", "probe");
            tracing::error!(target: "trmx_durable::flush", "probe");
        });
        count.load(std::sync::atomic::Ordering::SeqCst) == 2
    }

    /// tracing keeps the whitespace around a directive in it: `info ` (a space typed
    /// after the level, or a newline from a file), or the ` info` of
    /// `trmx_broker=debug, info`, was a target of that name, and `debug=` the target
    /// `debug`: the check passed them and the broker logged no error. The filter given to
    /// tracing is now the checked one, without that whitespace, and `target=` is refused.
    #[test]
    fn a_log_filter_with_spaces_logs_the_errors_it_says() {
        for written in [
            "info",
            "info ",
            " info",
            "debug\n",
            "INFO",
            "3",
            "info, trmx_broker=debug",
            "trmx_broker=debug, info",
            "info,trmx_broker=debug,",
            "info, h2 = off",
            "warn, trmx_broker[stream{participant=X}]=debug",
        ] {
            let flag = ServerArgs {
                log_level: Some(written.to_owned()),
                ..ServerArgs::default()
            };
            let used = flag
                .log_filter(None)
                .unwrap_or_else(|e| panic!("{written:?}: {e:#}"));
            assert!(logs_errors(&used), "{written:?}, given tracing as {used:?}");
            let used = ServerArgs::default()
                .log_filter(Some(written.into()))
                .unwrap_or_else(|e| panic!("TRMX_LOG={written:?}: {e:#}"));
            assert!(
                logs_errors(&used),
                "TRMX_LOG={written:?}, given as {used:?}"
            );
        }
        for typo in ["debug=", "info,trmx_broker= "] {
            let flag = ServerArgs {
                log_level: Some(typo.to_owned()),
                ..ServerArgs::default()
            };
            let error = format!("{:#}", flag.log_filter(None).expect_err(typo));
            assert!(error.starts_with("--log-level: "), "{error}");
            assert!(error.contains("is not a level"), "{error}");
        }
        let error = format!(
            "{:#}",
            ServerArgs::default()
                .log_filter(Some(" , ".into()))
                .expect_err("only commas")
        );
        assert!(error.starts_with("TRMX_LOG must not be empty"), "{error}");
    }
}
