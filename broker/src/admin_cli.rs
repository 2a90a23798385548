//! `trmx-broker admin …`: the operators' command line, a client of the `Operator`
//! gRPC service over mutual TLS with an operator certificate.
//!
//! Every command prints a table by default and the proto3 JSON mapping of the
//! answer with `--json` (for scripts); `stats --csv` prints CSV. A failure is one
//! line on stderr and a non-zero exit. No output ever holds a payload: the
//! service answers metadata only.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::operator::{DEFAULT_LIMIT, MAX_LIMIT};
use clap::{Args, Subcommand};
use tonic::transport::Channel;
use trmx_proto::pb::operator_client::OperatorClient;
use trmx_proto::time::{Date, from_millis, from_timestamp, to_millis, to_timestamp};
use trmx_proto::{Kind, pb};
use trmx_transport::{ClientOptions, TlsPaths, client_channel};

/// What `--timeout` is when not given: as the node's CLI.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;

/// Connection flags of `trmx-broker admin` and the command to run.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The broker's gRPC address, HOST:PORT.
    #[arg(long, env = "TRMX_ADMIN_BROKER")]
    pub broker: String,
    /// The federation CA certificate (PEM).
    #[arg(long, env = "TRMX_ADMIN_CA")]
    pub ca: PathBuf,
    /// The operator certificate (PEM).
    #[arg(long, env = "TRMX_ADMIN_CERT")]
    pub cert: PathBuf,
    /// The operator certificate's private key (PEM).
    #[arg(long, env = "TRMX_ADMIN_KEY")]
    pub key: PathBuf,
    /// Name the broker's certificate must carry (default: the host of --broker).
    #[arg(long, env = "TRMX_ADMIN_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Seconds to wait for each answer of the broker (each page of a long search, each
    /// refresh of `queues --watch`). A broker that takes the connection but answers nothing (its store
    /// stuck) is then reported instead of waited for.
    #[arg(long, env = "TRMX_ADMIN_TIMEOUT", default_value_t = DEFAULT_TIMEOUT_SECS, value_name = "SECS")]
    pub timeout: u64,
    /// Print the answer as JSON (proto3 JSON mapping) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The operator commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Per-recipient queue depth, in flight, oldest message age, bytes, streams.
    Queues {
        /// Refresh in place every SECS seconds (default 2) until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
        /// With --watch: stop after this many refreshes.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// The participants: connected streams, last seen, certificate expiry.
    Participants,
    /// Message metadata matching a filter (never payloads).
    Messages(MessageFilter),
    /// Expired and dead-lettered messages, oldest first.
    DeadLetters {
        /// At most this many: 100 when not given (or 0), never more than 1000.
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        limit: u32,
        /// Continue an earlier listing (the token it printed).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Put an expired or dead-lettered (after too many attempts) message back in its queue.
    Redrive {
        /// The message id.
        id: String,
        /// The message's sender (for a receipt, the participant it goes to); needed only
        /// when two senders used the id.
        #[arg(long)]
        sender: Option<String>,
    },
    /// Remove a waiting message; its sender gets a non-delivery report.
    Purge {
        /// The message id.
        id: String,
        /// Why (3 to 500 characters, recorded in the audit log; no personal data).
        #[arg(long)]
        reason: String,
        /// The message's sender (for a receipt, the participant it goes to); needed only
        /// when two senders used the id.
        #[arg(long)]
        sender: Option<String>,
    },
    /// The audit log.
    Audit {
        /// What to do with it.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Federation statistics from metadata only (counts under 5 shown as <5).
    Stats {
        /// Only messages accepted on or after this day (YYYY-MM-DD) or instant (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Only messages accepted before this day (YYYY-MM-DD) or instant (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Print CSV (one row per figure) instead of tables.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
}

/// `admin audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain on the running broker; reports the first broken record.
    Verify,
}

/// The filter of `admin messages`.
#[derive(Debug, Default, Args)]
pub struct MessageFilter {
    /// Only this message id.
    #[arg(long)]
    pub id: Option<String>,
    /// Only messages of this case reference.
    #[arg(long = "case")]
    pub case_ref: Option<String>,
    /// Only messages from this participant, e.g. NL-NRM.
    #[arg(long)]
    pub sender: Option<String>,
    /// Only messages to this participant.
    #[arg(long)]
    pub recipient: Option<String>,
    /// Only messages in this state: accepted, in-flight, acknowledged, expired,
    /// dead-lettered, withdrawn, purged.
    #[arg(long)]
    pub state: Option<String>,
    /// Only messages of this kind, e.g. referral, follow-up.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only messages accepted on or after this day (YYYY-MM-DD) or instant (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// Only messages accepted before this day (YYYY-MM-DD) or instant (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many: 100 when not given (or 0), never more than 1000.
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub limit: u32,
    /// Continue an earlier search with the same filter (the token it printed).
    #[arg(long)]
    pub page_token: Option<String>,
}

/// A failure of an admin command: one line for stderr.
#[derive(Debug)]
pub struct AdminError {
    message: String,
    /// The broker gave no answer to a call within `--timeout` ([`execute`] says what
    /// that means).
    unanswered: bool,
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<tonic::Status> for AdminError {
    /// The code, the message, and the causes: a failed connection's status says only
    /// "transport error", its causes say why (a revoked or expired operator certificate, a
    /// broker certificate without the name connected to, ...).
    fn from(status: tonic::Status) -> Self {
        // (tonic's per-request timeout: `ClientOptions::request_timeout`)
        let unanswered = status.code() == tonic::Code::Cancelled
            && status.message() == tonic::TimeoutExpired(()).to_string();
        let code = trmx_transport::code_name(status.code());
        let mut text = format!("{code}: {}", status.message());
        let mut cause = std::error::Error::source(&status);
        while let Some(error) = cause {
            let said = error.to_string();
            // wrappers often repeat their cause's text
            if !text.contains(&said) {
                text.push_str(": ");
                text.push_str(&said);
            }
            cause = error.source();
        }
        if std::error::Error::source(&status).is_some_and(trmx_transport::server_name_mismatch) {
            text.push_str(
                " (the broker's certificate does not carry the host of --broker: give a name \
                 it carries with --server-name NAME or TRMX_ADMIN_SERVER_NAME)",
            );
        } else if let Some(hint) = std::error::Error::source(&status).and_then(connection_hint) {
            text.push_str(" (");
            text.push_str(hint);
            text.push(')');
        }
        AdminError {
            message: one_line(&text),
            unanswered,
        }
    }
}

/// What to check when the connection to the broker failed, from the failure's causes: a
/// transport error alone (`Connection refused`, `UnknownIssuer`, `InvalidContentType`,
/// `deadline has elapsed`) does not tell an operator which flag is wrong.
fn connection_hint(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let mut current = Some(error);
    while let Some(error) = current {
        // tokio-rustls hands rustls' error over inside an I/O error
        let io = error.downcast_ref::<std::io::Error>();
        let tls = error
            .downcast_ref::<rustls::Error>()
            .or_else(|| io.and_then(|e| e.get_ref()?.downcast_ref::<rustls::Error>()));
        match tls {
            // (another CA of the same name, e.g. a staging CA made with the default name,
            // fails the signature check instead)
            Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
                return Some(
                    "the broker's certificate was not issued by the CA in --ca: check that --ca \
                     (TRMX_ADMIN_CA) is the federation's ca.pem, and --broker \
                     (TRMX_ADMIN_BROKER) this federation's broker",
                );
            }
            Some(rustls::Error::InvalidCertificate(
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. },
            )) => {
                return Some(
                    "the broker's certificate is not valid at this machine's time: check this \
                     clock (`date -u`) against the certificate's validity, and renew the \
                     broker's certificate if it has expired",
                );
            }
            Some(rustls::Error::AlertReceived(alert)) => {
                use rustls::AlertDescription as A;
                match alert {
                    A::CertificateRevoked => {
                        return Some(
                            "the broker refused the operator certificate (--cert) as revoked: \
                             ask the CA administrator for a new one",
                        );
                    }
                    A::CertificateExpired => {
                        return Some(
                            "the broker refused the operator certificate (--cert) as expired \
                             or not yet valid: renew it (`trmx-certs renew`), or check the \
                             broker's clock",
                        );
                    }
                    A::UnknownCA | A::BadCertificate | A::CertificateUnknown => {
                        return Some(
                            "the broker refused the operator certificate (--cert): check that \
                             this federation's CA issued it, and that --cert and --key are \
                             the operator's files",
                        );
                    }
                    _ => {}
                }
            }
            Some(rustls::Error::InvalidMessage(_)) => {
                return Some(
                    "the other end does not speak TLS: is --broker (TRMX_ADMIN_BROKER) the \
                     broker's gRPC address (`listen` in its config), not its admin port \
                     (`admin_listen`) or another service?",
                );
            }
            _ => {}
        }
        // (the resolver's failure is an I/O error known by its text)
        if io.is_some_and(|e| e.to_string().starts_with("failed to lookup address")) {
            return Some(
                "the host of --broker (TRMX_ADMIN_BROKER) does not resolve: check its spelling, \
                 or give the broker's IP address with --server-name set to its DNS name",
            );
        }
        if io.is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused) {
            return Some(
                "nothing listens there: is the broker running, and is --broker \
                 (TRMX_ADMIN_BROKER) its gRPC address (`listen` in its config)?",
            );
        }
        // (tonic's connect timeout is tower's `Elapsed`, known here by its text)
        if error.is::<tokio::time::error::Elapsed>() || error.to_string() == "deadline has elapsed"
        {
            return Some(
                "no answer in time: is the broker running and reachable from here (a \
                 firewall?), and is --broker (TRMX_ADMIN_BROKER) its gRPC address?",
            );
        }
        current = error.source();
    }
    None
}

/// Refuses connection flags that cannot work, before connecting: a `--broker` with a
/// scheme (`https://host:7443`, which read as the server name `https://host`), and a
/// `--ca` that holds a participant's, operator's or broker's certificate rather than the
/// CA's (every broker would then be refused with `UnknownIssuer`).
fn check_connection_flags(args: &AdminArgs) -> Result<(), AdminError> {
    if let Some((scheme, rest)) = args.broker.split_once("://") {
        return Err(fail(format!(
            "--broker {:?} has a scheme ({scheme}://): give HOST:PORT, e.g. --broker {rest}",
            args.broker
        )));
    }
    // (--cert and --key swapped: the transport would say "not a PEM certificate"; a file
    // holding both, a bundle some operators keep, is no swap)
    let key_only = |path: &std::path::Path| {
        trmx_certs::pem::read_regular_file(path, "certificate").is_ok_and(|bytes| {
            let text = String::from_utf8_lossy(&bytes);
            text.contains(" PRIVATE KEY-----") && !text.contains("-----BEGIN CERTIFICATE-----")
        })
    };
    if key_only(&args.cert) {
        return Err(fail(format!(
            "--cert {} holds a private key, not a certificate: are --cert and --key \
             (TRMX_ADMIN_CERT, TRMX_ADMIN_KEY) swapped?",
            args.cert.display()
        )));
    }
    // (a file that cannot be read or parsed is left to the connection, which names it)
    let Ok(certs) = trmx_certs::load_certs_pem(&args.ca) else {
        return Ok(());
    };
    for cert in certs {
        if let Ok(info) = trmx_certs::CertInfo::from_der(&cert) {
            return Err(fail(format!(
                "--ca {} holds the certificate of {} (serial {}), not a CA certificate: give \
                 the federation CA's certificate (ca.pem, as in the broker's tls.ca) with --ca \
                 or TRMX_ADMIN_CA",
                args.ca.display(),
                info.identity,
                info.serial_hex
            )));
        }
    }
    Ok(())
}

/// Joins the lines of `text` (error chains, transport details) into one.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn fail(message: impl Into<String>) -> AdminError {
    AdminError {
        message: one_line(&message.into()),
        unanswered: false,
    }
}

/// Runs `trmx-broker admin` and returns the exit code; prints the failure line.
pub fn run(args: AdminArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trmx-broker admin: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("trmx-broker admin: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `trmx-broker audit …`: offline work on a stopped broker's data directory.
#[derive(Debug, Args)]
pub struct OfflineAuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: OfflineAuditCommand,
}

/// The offline audit commands.
#[derive(Debug, Subcommand)]
pub enum OfflineAuditCommand {
    /// Verify the audit log's hash chain with the broker stopped; prints the
    /// first broken record.
    Verify {
        /// The broker's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `trmx-broker audit …` and returns the exit code; prints the failure line.
pub fn run_offline_audit(args: OfflineAuditArgs) -> ExitCode {
    let OfflineAuditCommand::Verify { data_dir, json } = args.command;
    // (the store's open error says when another process holds the directory's lock)
    let result = crate::store::verify_audit_offline(&data_dir)
        .map_err(|e| fail(e.to_string()))
        .and_then(|report| {
            let report = report.to_pb();
            emit(json, &report, audit_table)?;
            audit_verdict(&report)
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("trmx-broker audit: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `trmx-broker store …`: offline work on a stopped broker's store.
#[derive(Debug, Args)]
pub struct OfflineStoreArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: OfflineStoreCommand,
}

/// The offline store commands.
#[derive(Debug, Subcommand)]
pub enum OfflineStoreCommand {
    /// Give back the disk space sled keeps: copy the stopped broker's store
    /// into a fresh database, check the copy, and swap it in. The original is
    /// kept next to the data directory until you remove it.
    Compact {
        /// The broker's data directory (the broker must be stopped).
        #[arg(long)]
        data_dir: PathBuf,
        /// Write the compacted copy to this new directory and leave the data
        /// directory as it is (for a data directory that is a mount point).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Check that every index, timer and counter of the stopped broker's
    /// store holds what its message records imply (after a crash, a power
    /// cut, a restore or a compaction). Reads only; exit code 1 when the
    /// store is not consistent.
    Verify {
        /// The broker's data directory (the broker must be stopped).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Accept the system clock as it is now. A broker does not start when the clock
    /// is further than `lifecycle.max_downtime` from the store's last run, ahead or
    /// behind, since a wrong clock would expire every queued message at once (or hold
    /// every redelivery). When the clock is right, this records it as the store's last
    /// run (in the store, and in the data directory's `last-run.json` that `check-config`
    /// reads), and the broker starts. Run it as the broker's user. The audit log records
    /// it: the last run before and after, and who ran it (the operating-system user, and
    /// the user who ran it through `sudo`).
    AcceptClock {
        /// The broker's data directory (the broker must be stopped).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// Runs `trmx-broker store …` and returns the exit code; prints the failure line.
pub fn run_offline_store(args: OfflineStoreArgs) -> ExitCode {
    let (data_dir, output) = match args.command {
        OfflineStoreCommand::Compact { data_dir, output } => (data_dir, output),
        OfflineStoreCommand::Verify { data_dir } => return verify_store(&data_dir),
        OfflineStoreCommand::AcceptClock { data_dir } => return accept_clock(&data_dir),
    };
    match crate::store::compact_offline(&data_dir, output.as_deref()) {
        Ok(report) => {
            let kept = match &report.original_kept_at {
                Some(kept) => format!(
                    "the original store is kept at {}: remove it once the broker runs well on \
                     the compacted one",
                    kept.display()
                ),
                None => format!(
                    "{} is unchanged; stop using it before you move the copy into its place",
                    data_dir.display()
                ),
            };
            report_done(
                "compact",
                &format!(
                    "compacted {}: {} -> {} on disk ({} keys, {} of keys and values)\n{kept}\n",
                    report.compacted.display(),
                    fmt_bytes(report.bytes_before),
                    fmt_bytes(report.bytes_after),
                    report.keys,
                    fmt_bytes(report.key_value_bytes)
                ),
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "trmx-broker store compact: {}",
                one_line(&error.to_string())
            );
            ExitCode::FAILURE
        }
    }
}

/// `trmx-broker store accept-clock`.
fn accept_clock(data_dir: &std::path::Path) -> ExitCode {
    let now = to_millis(std::time::SystemTime::now());
    let operator = offline_operator();
    match crate::store::accept_clock_offline(data_dir, now, &operator) {
        Ok(before) => {
            let before = before.map_or_else(|| "nothing".to_owned(), fmt_millis);
            // (the store's mark is what the start checks: done, whatever becomes of this)
            let last_run = crate::last_run::write(data_dir, now);
            report_done(
                "accept-clock",
                &format!(
                    "recorded {} as the last run of the broker on {} (it was {before}): the \
                     broker starts with this clock; audited as done by {operator}\n",
                    fmt_millis(now),
                    data_dir.display()
                ),
            );
            if let Err(error) = last_run {
                eprintln!(
                    "trmx-broker store accept-clock: warning: {}; check-config cannot check \
                     the clock until the broker has run and written it",
                    one_line(&error.to_string())
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "trmx-broker store accept-clock: {}",
                one_line(&error.to_string())
            );
            ExitCode::FAILURE
        }
    }
}

/// Who runs an offline command that changes the store, for its audit record (offline
/// there is no operator certificate): the operating-system user, by name and uid, and
/// the user `sudo` names as the one who ran it as that user (`SUDO_USER`: the README has
/// operators run these commands with `sudo -u trmx`, so the uid alone would name the
/// broker's user every time). A record of who did it, not a proof: whoever can run this
/// as the broker's user can write its store.
pub fn offline_operator() -> String {
    let (uid, name) = os_user();
    let mut who = match name {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    let sudo_user = std::env::var("SUDO_USER").map(|user| printable(&user));
    if let Ok(by) = sudo_user.as_deref()
        && !by.is_empty()
    {
        let _ = write!(who, ", via sudo by {by}");
    }
    who
}

/// At most 64 printable ASCII characters of `text` (a user name from the environment or
/// the user database goes into the audit log as it is).
fn printable(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_graphic)
        .take(64)
        .collect()
}

/// The real uid of this process and its user name, if the user database has one.
#[allow(unsafe_code)]
fn os_user() -> (u32, Option<String>) {
    // SAFETY: getuid takes nothing, cannot fail and touches no memory of ours.
    let uid = unsafe { libc::getuid() };
    let mut entry = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r fills `entry`, with its strings in `buf` (whose length is
    // passed), and sets `found` to `entry` when the user exists, else to null; it keeps
    // no pointer to any of them. (A name longer than `buf` is ERANGE: no name.)
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            entry.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return (uid, None);
    }
    // SAFETY: `found` is `entry`, filled in; its pw_name is a NUL-terminated string in
    // `buf`, alive until the end of this function.
    let name = unsafe { std::ffi::CStr::from_ptr((*found).pw_name) };
    let name = printable(&name.to_string_lossy());
    (uid, Some(name).filter(|name| !name.is_empty()))
}

/// `trmx-broker store verify`.
fn verify_store(data_dir: &std::path::Path) -> ExitCode {
    match crate::store::verify_store_offline(data_dir) {
        Ok(report) => {
            if let Err(error) = print_out(&format!("{report}\n")) {
                eprintln!("trmx-broker store verify: {error}");
                return ExitCode::FAILURE;
            }
            if report.is_consistent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            // (the store's open error says when another process holds the directory's lock)
            eprintln!("trmx-broker store verify: {}", one_line(&error.to_string()));
            ExitCode::FAILURE
        }
    }
}

async fn connect(args: &AdminArgs) -> Result<OperatorClient<Channel>, AdminError> {
    check_connection_flags(args)?;
    let paths = TlsPaths {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    };
    let options = ClientOptions {
        server_name: args.server_name.clone().unwrap_or_default(),
        request_timeout: Some(answer_limit(args)),
        ..ClientOptions::default()
    };
    let channel =
        client_channel(&args.broker, &paths, &options).map_err(|e| fail(e.to_string()))?;
    Ok(OperatorClient::new(channel))
}

/// Runs one admin command (what [`run`] does, without printing the failure).
///
/// Gives up when one of its calls gets no answer within `--timeout` seconds (each call
/// has its own limit: the pages of a long search, each refresh of `queues --watch`),
/// saying what the silence means.
pub async fn execute(args: AdminArgs) -> Result<(), AdminError> {
    let limit = answer_limit(&args);
    let (broker, command) = (args.broker.clone(), command_name(&args.command));
    execute_unlimited(args).await.map_err(|error| {
        if error.unanswered {
            no_answer(&broker, limit, command)
        } else {
            error
        }
    })
}

/// How long each call waits for its answer (`--timeout`, at least a second).
fn answer_limit(args: &AdminArgs) -> Duration {
    Duration::from_secs(args.timeout.max(1))
}

/// The subcommand's name, for messages.
fn command_name(command: &AdminCommand) -> &'static str {
    match command {
        AdminCommand::Queues { .. } => "queues",
        AdminCommand::Participants => "participants",
        AdminCommand::Messages(_) => "messages",
        AdminCommand::DeadLetters { .. } => "dead-letters",
        AdminCommand::Redrive { .. } => "redrive",
        AdminCommand::Purge { .. } => "purge",
        AdminCommand::Audit { .. } => "audit",
        AdminCommand::Stats { .. } => "stats",
    }
}

/// The failure of a command the broker did not answer within `limit`.
fn no_answer(broker: &str, limit: Duration, command: &str) -> AdminError {
    let changed = if matches!(command, "redrive" | "purge") {
        " The command may still be carried out: look with `admin messages --id ID` before \
         trying again."
    } else {
        ""
    };
    fail(format!(
        "DEADLINE_EXCEEDED: no answer from the broker at {broker} within {} s (--timeout, \
         TRMX_ADMIN_TIMEOUT): it took the connection but answered nothing; check its log \
         (`journalctl -u trmx-broker`) and its /readyz on the admin port, or give it longer \
         with --timeout.{changed}",
        limit.as_secs()
    ))
}

/// [`execute`], with a call that timed out reported as tonic says it.
async fn execute_unlimited(args: AdminArgs) -> Result<(), AdminError> {
    let mut client = connect(&args).await?;
    let json = args.json;
    match &args.command {
        AdminCommand::Queues { watch, count } => match watch {
            None => {
                let queues = client
                    .list_queues(pb::ListQueuesRequest {})
                    .await?
                    .into_inner();
                emit(json, &queues, queues_table)
            }
            Some(secs) => {
                let every = Duration::from_secs(*secs);
                watch_queues(&mut client, json, every, *count).await
            }
        },
        AdminCommand::Participants => {
            let answer = client
                .list_participants(pb::OperatorListParticipantsRequest {})
                .await?
                .into_inner();
            emit(json, &answer, participants_table)
        }
        AdminCommand::Messages(filter) => {
            let answer = search_pages(&mut client, search_request(filter)?).await?;
            emit(json, &answer, |a| {
                messages_table(&a.messages, &a.next_page_token)
            })?;
            if answer.messages.is_empty() && answer.next_page_token.is_empty() {
                let named = [
                    ("--sender", &filter.sender),
                    ("--recipient", &filter.recipient),
                ];
                if named.iter().any(|(_, id)| id.is_some()) {
                    // Only to explain an empty answer: the search itself worked and was
                    // printed, so a registry that cannot be read now is a note, not a
                    // failure (it exited 1 after the answer, which read as a failed search).
                    let notes = match client
                        .list_participants(pb::OperatorListParticipantsRequest {})
                        .await
                    {
                        Ok(registry) => unknown_participants(&registry.into_inner(), &named),
                        Err(status) => vec![format!(
                            "the search worked, but whether {} is in the broker's \
                             participant registry could not be checked: {}",
                            named
                                .iter()
                                .filter_map(|(flag, id)| Some(format!("{flag} {}", id.as_deref()?)))
                                .collect::<Vec<_>>()
                                .join(" and "),
                            AdminError::from(status)
                        )],
                    };
                    for note in notes {
                        eprintln!("note: {note}");
                    }
                }
            }
            Ok(())
        }
        AdminCommand::DeadLetters { limit, page_token } => {
            let answer = client
                .list_dead_letters(pb::ListDeadLettersRequest {
                    limit: *limit,
                    page_token: page_token.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            emit(json, &answer, |a| {
                messages_table(&a.messages, &a.next_page_token)
            })
        }
        AdminCommand::Redrive { id, sender } => {
            let answer = client
                .redrive(pb::RedriveRequest {
                    message_id: id.clone(),
                    sender: sender.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            emit(json, &answer, |a| {
                format!(
                    "redriven {} (ACCEPTED again, expires {}; its attempts count from 0 \
                     again, {} before)\n",
                    a.message_id,
                    fmt_ts(a.expires_at.as_ref()),
                    a.attempts_before
                )
            })
        }
        AdminCommand::Purge { id, reason, sender } => {
            let answer = client
                .purge(pb::PurgeRequest {
                    message_id: id.clone(),
                    reason: reason.clone(),
                    sender: sender.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            emit(json, &answer, |a| {
                if a.already_purged {
                    format!(
                        "{} was already purged, at {}; nothing changed now\n",
                        a.message_id,
                        fmt_ts(a.purged_at.as_ref())
                    )
                } else {
                    format!(
                        "purged {} at {}; its sender gets a non-delivery report\n",
                        a.message_id,
                        fmt_ts(a.purged_at.as_ref())
                    )
                }
            })
        }
        AdminCommand::Audit {
            command: AuditCommand::Verify,
        } => {
            let report = client
                .verify_audit(pb::VerifyAuditRequest {})
                .await?
                .into_inner();
            emit(json, &report, audit_table)?;
            audit_verdict(&report)
        }
        AdminCommand::Stats { from, until, csv } => {
            let request = pb::GetStatisticsRequest {
                from: from
                    .as_deref()
                    .map(|v| parse_instant(v, "--from"))
                    .transpose()?,
                until: until
                    .as_deref()
                    .map(|v| parse_instant(v, "--until"))
                    .transpose()?,
            };
            let stats = client.get_statistics(request).await?.into_inner();
            if *csv {
                print_out(&stats_csv(&stats))
            } else {
                emit(json, &stats, stats_table)
            }
        }
    }
}

/// For a search that found nothing: each participant id of the filter (`--sender`,
/// `--recipient`) that the broker's registry does not hold, said as a likely typo (a
/// search for `NL-NMR` found nothing and said nothing else). A participant that left the
/// registry may still have messages on record, so this is a note, not a refusal.
fn unknown_participants(
    registry: &pb::OperatorListParticipantsResponse,
    named: &[(&str, &Option<String>)],
) -> Vec<String> {
    let known: Vec<&str> = registry
        .participants
        .iter()
        .filter_map(|p| p.participant.as_ref().map(|p| p.id.as_str()))
        .collect();
    named
        .iter()
        .filter_map(|(flag, id)| {
            let id = id.as_deref()?;
            (!known.contains(&id)).then(|| {
                format!(
                    "{flag} {id} is not in the broker's participant registry: a typo? \
                     `trmx-broker admin participants` lists them"
                )
            })
        })
        .collect()
}

/// An intact report is success; a broken chain is a failure line naming the record.
pub fn audit_verdict(report: &pb::AuditReport) -> Result<(), AdminError> {
    if report.intact {
        Ok(())
    } else {
        Err(fail(format!(
            "audit log broken at record {}: {}",
            report.first_broken, report.problem
        )))
    }
}

async fn watch_queues(
    client: &mut OperatorClient<Channel>,
    json: bool,
    every: Duration,
    count: Option<u64>,
) -> Result<(), AdminError> {
    let every = every.max(Duration::from_secs(1));
    let mut shown = 0u64;
    loop {
        let queues = client
            .list_queues(pb::ListQueuesRequest {})
            .await?
            .into_inner();
        // clear the screen, cursor home, redraw
        print_out("\x1b[2J\x1b[H")?;
        emit(json, &queues, queues_table)?;
        shown += 1;
        if count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Prints `value` as JSON, or as the table `table` makes of it.
fn emit<T: serde::Serialize>(
    json: bool,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), AdminError> {
    if json {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| fail(format!("cannot encode the answer as JSON: {e}")))?;
        print_out(&format!("{text}\n"))
    } else {
        print_out(&table(value))
    }
}

/// Prints what an offline `store` command did. It is done whatever becomes of the
/// report: a reader that went away (`store compact | head -0`) or a failed write is no
/// reason for a panic or a failure status (a script would do it again).
fn report_done(command: &str, text: &str) {
    if let Err(error) = print_out(text) {
        eprintln!("trmx-broker store {command}: done, but {error}");
    }
}

/// Writes `text` to stdout. A reader that went away (`admin messages | head`) is no
/// failure: it has what it wanted, and print! would panic with a backtrace there.
fn print_out(text: &str) -> Result<(), AdminError> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(fail(format!("cannot write the answer to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn search_request(filter: &MessageFilter) -> Result<pb::SearchMessagesRequest, AdminError> {
    let state = match &filter.state {
        None => 0,
        Some(name) => parse_state(name)? as i32,
    };
    let kind = match &filter.kind {
        None => 0,
        Some(name) => Kind::from_name(name)
            .ok_or_else(|| {
                fail(format!(
                    "--kind {name:?} is not a message kind (referral, referral-response, return-risk-assessment-request, return-risk-assessment, follow-up, delivery-receipt, non-delivery-report)"
                ))
            })?
            .to_pb() as i32,
    };
    Ok(pb::SearchMessagesRequest {
        message_id: filter.id.clone().unwrap_or_default(),
        case_ref: filter.case_ref.clone().unwrap_or_default(),
        sender: filter.sender.clone().unwrap_or_default(),
        recipient: filter.recipient.clone().unwrap_or_default(),
        state,
        kind,
        accepted_from: filter
            .from
            .as_deref()
            .map(|v| parse_instant(v, "--from"))
            .transpose()?,
        accepted_until: filter
            .until
            .as_deref()
            .map(|v| parse_instant(v, "--until"))
            .transpose()?,
        limit: filter.limit,
        page_token: filter.page_token.clone().unwrap_or_default(),
    })
}

/// Runs `request`, following the broker's pages until `limit` messages are
/// found or the search reaches the end. (The broker answers a call after
/// examining a bounded number of messages, so a filter that matches little
/// takes several calls over a large store.)
async fn search_pages(
    client: &mut OperatorClient<Channel>,
    mut request: pb::SearchMessagesRequest,
) -> Result<pb::SearchMessagesResponse, AdminError> {
    let wanted = match request.limit {
        0 => DEFAULT_LIMIT,
        n => usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
    };
    let mut all = pb::SearchMessagesResponse::default();
    loop {
        request.limit = u32::try_from(wanted - all.messages.len()).unwrap_or(u32::MAX);
        let page = client.search_messages(request.clone()).await?.into_inner();
        all.messages.extend(page.messages);
        all.truncated = page.truncated;
        all.next_page_token = page.next_page_token;
        if all.next_page_token.is_empty() || all.messages.len() >= wanted {
            return Ok(all);
        }
        request.page_token = all.next_page_token.clone();
    }
}

/// `dead-lettered`, `DEAD_LETTERED` or `MESSAGE_STATE_DEAD_LETTERED`.
fn parse_state(name: &str) -> Result<pb::MessageState, AdminError> {
    let wire = format!(
        "MESSAGE_STATE_{}",
        name.trim_start_matches("MESSAGE_STATE_")
            .replace('-', "_")
            .to_ascii_uppercase()
    );
    match pb::MessageState::from_str_name(&wire) {
        Some(pb::MessageState::Unspecified) | None => Err(fail(format!(
            "--state {name:?} is not a state (accepted, in-flight, acknowledged, expired, dead-lettered, withdrawn, purged)"
        ))),
        Some(state) => Ok(state),
    }
}

/// `YYYY-MM-DD` (midnight UTC) or an RFC 3339 instant.
fn parse_instant(value: &str, flag: &str) -> Result<pb::Timestamp, AdminError> {
    if let Ok(date) = Date::parse(value) {
        let text = format!("\"{date}T00:00:00Z\"");
        return serde_json::from_str(&text)
            .map_err(|_| fail(format!("{flag} {value:?} is not a valid date")));
    }
    serde_json::from_str::<pb::Timestamp>(&format!("\"{value}\"")).map_err(|_| {
        fail(format!(
            "{flag} {value:?} is not a date YYYY-MM-DD or an RFC 3339 instant like 2025-03-01T12:00:00Z"
        ))
    })
}

/// A plain-text table: a header row and rows, columns padded to the widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `2025-03-01 12:00:00Z` for milliseconds since the Unix epoch.
pub fn fmt_millis(at: u64) -> String {
    fmt_ts(Some(&to_timestamp(from_millis(at))))
}

/// `2025-03-01 12:00:00Z`, or `-` when unset.
pub fn fmt_ts(ts: Option<&pb::Timestamp>) -> String {
    let Some(ts) = ts else {
        return "-".to_owned();
    };
    let Ok(at) = from_timestamp(ts) else {
        return "?".to_owned();
    };
    let millis = to_millis(at);
    let secs_of_day = (millis / 1000) % 86_400;
    format!(
        "{} {:02}:{:02}:{:02}Z",
        Date::of(at),
        secs_of_day / 3600,
        (secs_of_day / 60) % 60,
        secs_of_day % 60
    )
}

/// `3d4h`, `5m12s`, `800ms`; `-` when unset.
pub fn fmt_duration(d: Option<&pb::Duration>) -> String {
    let Some(d) = d else {
        return "-".to_owned();
    };
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    if secs == 0 {
        let ms = u64::try_from(d.nanos).unwrap_or(0) / 1_000_000;
        return format!("{ms}ms");
    }
    let (days, hours, minutes, seconds) = (
        secs / 86_400,
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
    );
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn kind_name(value: i32) -> String {
    Kind::from_pb(value).map_or_else(|| "?".to_owned(), |k| k.name().to_owned())
}

fn state_name(value: i32) -> String {
    pb::MessageState::try_from(value).map_or_else(
        |_| "?".to_owned(),
        |s| {
            s.as_str_name()
                .trim_start_matches("MESSAGE_STATE_")
                .to_owned()
        },
    )
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

fn queues_table(answer: &pb::ListQueuesResponse) -> String {
    let rows: Vec<Vec<String>> = answer
        .queues
        .iter()
        .map(|q| {
            vec![
                q.recipient.clone(),
                q.depth.to_string(),
                q.in_flight.to_string(),
                fmt_duration(q.oldest_age.as_ref()),
                fmt_bytes(q.bytes),
                q.connected_streams.to_string(),
            ]
        })
        .collect();
    format!(
        "queues at {}\n{}",
        fmt_ts(answer.at.as_ref()),
        table(
            &[
                "RECIPIENT",
                "DEPTH",
                "IN FLIGHT",
                "OLDEST",
                "BYTES",
                "STREAMS"
            ],
            &rows
        )
    )
}

fn participants_table(answer: &pb::OperatorListParticipantsResponse) -> String {
    let rows: Vec<Vec<String>> = answer
        .participants
        .iter()
        .map(|p| {
            let entry = p.participant.clone().unwrap_or_default();
            vec![
                entry.id,
                entry.country,
                if p.connected_streams > 0 {
                    format!("yes ({})", p.connected_streams)
                } else {
                    "no".to_owned()
                },
                fmt_ts(p.last_seen.as_ref()),
                fmt_ts(p.certificate_not_after.as_ref()),
                entry.display_name,
            ]
        })
        .collect();
    table(
        &[
            "PARTICIPANT",
            "COUNTRY",
            "CONNECTED",
            "LAST SEEN",
            "CERT EXPIRES",
            "NAME",
        ],
        &rows,
    )
}

fn messages_table(messages: &[pb::MessageMetadata], next_page_token: &str) -> String {
    let rows: Vec<Vec<String>> = messages
        .iter()
        .map(|m| {
            vec![
                m.message_id.clone(),
                kind_name(m.kind),
                or_dash(&m.sender),
                m.recipient.clone(),
                state_name(m.state),
                m.attempts.to_string(),
                fmt_ts(m.accepted_at.as_ref()),
                fmt_ts(m.state_changed_at.as_ref()),
                or_dash(&m.reason_code),
                m.payload_size.to_string(),
                if m.redrivable { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "MESSAGE ID",
            "KIND",
            "SENDER",
            "RECIPIENT",
            "STATE",
            "ATTEMPTS",
            "ACCEPTED",
            "STATE SINCE",
            "REASON",
            "SIZE",
            "REDRIVABLE",
        ],
        &rows,
    );
    let _ = writeln!(
        out,
        "{} message(s){}",
        messages.len(),
        if next_page_token.is_empty() {
            String::new()
        } else {
            format!(" (more may match: add --page-token {next_page_token} for the next page)")
        }
    );
    out
}

fn audit_table(report: &pb::AuditReport) -> String {
    let hex = |bytes: &[u8]| -> String {
        if bytes.is_empty() {
            "-".to_owned()
        } else {
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let rows = vec![
        vec![
            "verdict".to_owned(),
            if report.intact { "intact" } else { "BROKEN" }.to_owned(),
        ],
        vec!["records checked".to_owned(), report.records.to_string()],
        vec![
            "first broken record".to_owned(),
            if report.intact {
                "-".to_owned()
            } else {
                format!("{} ({})", report.first_broken, report.problem)
            },
        ],
        vec!["first record kept".to_owned(), report.first_seq.to_string()],
        vec!["last record".to_owned(), report.last_seq.to_string()],
        vec!["head hash".to_owned(), hex(&report.head_hash)],
        vec!["anchor hash".to_owned(), hex(&report.anchor_hash)],
    ];
    table(&["AUDIT LOG", ""], &rows)
}

/// `6`, or `<5` for a suppressed count.
pub fn fmt_count(count: Option<&pb::StatisticCount>) -> String {
    match count {
        Some(c) if !c.suppressed => c.value.to_string(),
        _ => "<5".to_owned(),
    }
}

fn stats_table(stats: &pb::Statistics) -> String {
    // without --from the broker counts from the Unix epoch
    let from = match &stats.from {
        Some(from) if from.seconds > 0 => format!("from {}", fmt_ts(Some(from))),
        _ => "since the first message on record".to_owned(),
    };
    let mut out = format!(
        "federation statistics, messages accepted {from} to {} (counts under {} shown as <{})\n\n",
        fmt_ts(stats.until.as_ref()),
        stats.suppression_threshold,
        stats.suppression_threshold,
    );
    let corridors: Vec<Vec<String>> = stats
        .corridors
        .iter()
        .map(|c| {
            vec![
                c.month.clone(),
                format!("{} -> {}", c.sender_country, c.recipient_country),
                kind_name(c.kind),
                fmt_count(c.messages.as_ref()),
            ]
        })
        .collect();
    out.push_str("messages per corridor\n");
    out.push_str(&table(
        &["MONTH", "CORRIDOR", "KIND", "MESSAGES"],
        &corridors,
    ));
    let times: Vec<Vec<String>> = stats
        .response_times
        .iter()
        .map(|t| {
            vec![
                t.month.clone(),
                format!(
                    "{} -> {}",
                    kind_name(t.request_kind),
                    kind_name(t.answer_kind)
                ),
                fmt_count(t.pairs.as_ref()),
                fmt_duration(t.median.as_ref()),
                fmt_duration(t.p90.as_ref()),
            ]
        })
        .collect();
    out.push_str("\ntime from request to answer\n");
    out.push_str(&table(
        &["MONTH", "REQUEST -> ANSWER", "PAIRS", "MEDIAN", "P90"],
        &times,
    ));
    let non_delivery: Vec<Vec<String>> = stats
        .non_delivery
        .iter()
        .map(|n| {
            vec![
                n.month.clone(),
                fmt_count(n.delivered.as_ref()),
                fmt_count(n.not_delivered.as_ref()),
                if n.rate_suppressed {
                    "suppressed".to_owned()
                } else {
                    format!("{:.1}%", n.rate * 100.0)
                },
            ]
        })
        .collect();
    out.push_str("\nnon-delivery\n");
    out.push_str(&table(
        &["MONTH", "DELIVERED", "NOT DELIVERED", "RATE"],
        &non_delivery,
    ));
    out
}

/// Long-format CSV: `section,month,sender_country,recipient_country,kind,answer_kind,measure,value`.
pub fn stats_csv(stats: &pb::Statistics) -> String {
    let mut out = String::from(
        "section,month,sender_country,recipient_country,kind,answer_kind,measure,value\n",
    );
    let mut row = |fields: [&str; 8]| {
        out.push_str(&fields.map(csv_field).join(","));
        out.push('\n');
    };
    for c in &stats.corridors {
        row([
            "corridor",
            &c.month,
            &c.sender_country,
            &c.recipient_country,
            &kind_name(c.kind),
            "",
            "messages",
            &fmt_count(c.messages.as_ref()),
        ]);
    }
    for t in &stats.response_times {
        let (request, answer) = (kind_name(t.request_kind), kind_name(t.answer_kind));
        let secs = |d: Option<&pb::Duration>| {
            d.map_or_else(|| "suppressed".to_owned(), |d| d.seconds.to_string())
        };
        row([
            "response_time",
            &t.month,
            "",
            "",
            &request,
            &answer,
            "pairs",
            &fmt_count(t.pairs.as_ref()),
        ]);
        row([
            "response_time",
            &t.month,
            "",
            "",
            &request,
            &answer,
            "median_seconds",
            &secs(t.median.as_ref()),
        ]);
        row([
            "response_time",
            &t.month,
            "",
            "",
            &request,
            &answer,
            "p90_seconds",
            &secs(t.p90.as_ref()),
        ]);
    }
    for n in &stats.non_delivery {
        let rate = if n.rate_suppressed {
            "suppressed".to_owned()
        } else {
            format!("{:.4}", n.rate)
        };
        for (measure, value) in [
            ("delivered", fmt_count(n.delivered.as_ref())),
            ("not_delivered", fmt_count(n.not_delivered.as_ref())),
            ("rate", rate),
        ] {
            row(["non_delivery", &n.month, "", "", "", "", measure, &value]);
        }
    }
    out
}

/// Quotes a CSV field when it needs it.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A --broker host that does not resolve said only "failed to lookup address
    /// information: Name or service not known": the hint names the flag.
    #[test]
    fn a_broker_host_that_does_not_resolve_names_the_flag() {
        let error = std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        );
        let hint = connection_hint(&error).expect("a hint");
        assert!(
            hint.starts_with("the host of --broker (TRMX_ADMIN_BROKER) does not resolve"),
            "{hint}"
        );
        assert_eq!(
            connection_hint(&std::io::Error::other("something else")),
            None
        );
    }

    #[test]
    fn states_and_instants_parse() {
        assert_eq!(
            parse_state("dead-lettered").unwrap(),
            pb::MessageState::DeadLettered
        );
        assert_eq!(
            parse_state("IN_FLIGHT").unwrap(),
            pb::MessageState::InFlight
        );
        assert!(parse_state("lost").is_err());
        assert!(parse_state("unspecified").is_err());
        let day = parse_instant("2025-03-01", "--from").unwrap();
        assert_eq!(day.seconds, 1_740_787_200);
        let instant = parse_instant("2025-03-01T00:00:10Z", "--from").unwrap();
        assert_eq!(instant.seconds, 1_740_787_210);
        let error = parse_instant("yesterday", "--from").unwrap_err();
        assert!(error.message.starts_with("--from"));
    }

    #[test]
    fn formatting() {
        let ts = pb::Timestamp {
            seconds: 1_740_787_210,
            nanos: 0,
        };
        assert_eq!(fmt_ts(Some(&ts)), "2025-03-01 00:00:10Z");
        assert_eq!(fmt_ts(None), "-");
        let d = |seconds| pb::Duration { seconds, nanos: 0 };
        assert_eq!(fmt_duration(Some(&d(90))), "1m30s");
        assert_eq!(fmt_duration(Some(&d(2 * 86_400 + 3600))), "2d1h");
        assert_eq!(fmt_bytes(2048), "2.0 KiB");
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(
            fmt_count(Some(&pb::StatisticCount {
                value: 0,
                suppressed: true
            })),
            "<5"
        );
    }

    #[test]
    fn stats_without_from_count_since_the_first_message() {
        let until = pb::Timestamp {
            seconds: 1_740_787_210,
            nanos: 0,
        };
        let mut stats = pb::Statistics {
            from: Some(pb::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            until: Some(until),
            suppression_threshold: 5,
            ..Default::default()
        };
        let heading = |stats: &pb::Statistics| stats_table(stats).lines().next().map(str::to_owned);
        assert_eq!(
            heading(&stats).unwrap(),
            "federation statistics, messages accepted since the first message on record to \
             2025-03-01 00:00:10Z (counts under 5 shown as <5)"
        );
        stats.from = Some(pb::Timestamp {
            seconds: 1_740_700_800,
            nanos: 0,
        });
        assert!(
            heading(&stats)
                .unwrap()
                .contains("accepted from 2025-02-28 00:00:00Z to 2025-03-01 00:00:10Z"),
            "{:?}",
            heading(&stats)
        );
    }

    #[test]
    fn a_failed_call_shows_its_causes() {
        let cause = std::io::Error::other("received fatal alert: CertificateRevoked");
        let status = tonic::Status::from_error(Box::new(cause));
        let error = AdminError::from(status);
        assert!(
            error.message.contains("CertificateRevoked"),
            "{}",
            error.message
        );
        assert!(
            !error.message.contains("--server-name"),
            "{}",
            error.message
        );
    }

    #[test]
    fn errors_are_one_line() {
        let error = AdminError::from(tonic::Status::permission_denied("no\nway"));
        assert_eq!(error.message, "PERMISSION_DENIED: no; way");
    }
}
