//! `trmx-certs`: the federation CA tool. A thin clap front end over `trmx_certs::Ca`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use trmx_certs::{
    Ca, CaOptions, CaView, CertError, CertInfo, CertPaths, CertRequest, DEFAULT_CA_VALIDITY_DAYS,
    DEFAULT_VALIDITY_DAYS, IssueSpec, IssuedCert, Renewal, RequestPaths, Revocation, Role,
    format_time, from_unix_seconds, validate_name, validate_participant_id,
};

/// Federation PKI for trmx: create the CA, issue broker, node and operator certificates,
/// revoke them (CRL), renew, list and inspect them.
///
/// Every certificate carries one SPIFFE URI SAN: spiffe://<trust-domain>/participant/<ID>,
/// /operator/<name> or /broker/<name>. Keys are ECDSA P-256, written with mode 0600, and
/// never overwritten without --force.
#[derive(Debug, Parser)]
#[command(name = "trmx-certs", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a federation CA in a directory: ca.pem, ca.key (0600), crl.pem, index.json.
    Init {
        #[command(flatten)]
        ca: CaDir,
        /// SPIFFE trust domain of the federation, e.g. trm.example.
        #[arg(long)]
        trust_domain: String,
        /// Common name of the CA certificate. A successor CA (a CA rollover) needs a name
        /// other than its predecessor's: brokers refuse two CAs of one name with CRLs.
        #[arg(long, default_value = "TRM Federation CA")]
        name: String,
        /// Validity of the CA certificate in days.
        #[arg(long, default_value_t = DEFAULT_CA_VALIDITY_DAYS)]
        validity_days: u32,
        /// Replace an existing CA in the directory (every certificate it issued becomes
        /// untrusted). Its files (key, certificate, index, CRL) are moved into a new
        /// `replaced-<unix seconds>` directory beside them, never deleted.
        #[arg(long)]
        force: bool,
    },
    /// Make a key pair and a certificate request (PEM) for the CA, on the organisation's
    /// own machine: PREFIX.key (0600) stays there, only PREFIX.csr goes to the CA, which
    /// issues the certificate with `issue ... --csr`. Needs no CA directory.
    Request {
        /// A label for the CA administrator, e.g. the participant id; the CA decides the
        /// certificate's identity.
        #[arg(long)]
        name: String,
        /// Output path prefix: writes PREFIX.key and PREFIX.csr [default: the name]. Ending in
        /// / it is a directory (made if missing) that gets NAME.key and NAME.csr inside it. An
        /// existing directory or file without the / is refused as ambiguous.
        #[arg(long, value_name = "PREFIX")]
        out: Option<PathBuf>,
        /// Overwrite existing files. A key whose certificate beside it (PREFIX.pem) is still
        /// in date, revoked or not, is replaced too but kept as
        /// PREFIX.key.replaced-<unix seconds>, in case that certificate is still in use.
        #[arg(long)]
        force: bool,
    },
    /// Issue a broker, node or operator certificate signed by the CA.
    Issue {
        #[command(subcommand)]
        what: IssueCommand,
    },
    /// Revoke a certificate, given as a PEM file, by serial, or every certificate of a
    /// participant or operator, and rewrite the CRL.
    ///
    /// A certificate replaced by `renew` or `issue --force` no longer has a file: revoke it
    /// by the serial those commands print (`list` shows every serial the CA issued), or
    /// revoke all of a participant's certificates with --participant (after a key
    /// compromise, or when it leaves the federation). Revoking a revoked certificate only
    /// rewrites the CRL.
    Revoke {
        #[command(flatten)]
        ca: CaDir,
        #[command(flatten)]
        target: RevokeTarget,
    },
    /// Rewrite the CRL with a new nextUpdate.
    ///
    /// Run it (e.g. daily from cron) before the current CRL's nextUpdate passes: brokers
    /// configured strict refuse connections once their CRL is out of date.
    Crl {
        #[command(flatten)]
        ca: CaDir,
        /// Days until the CRL's nextUpdate; also used by later revocations. It may not pass
        /// the CA certificate's expiry.
        #[arg(long, default_value_t = 7)]
        next_update_days: u32,
    },
    /// Renew a certificate: same identity, new key and validity, files replaced.
    ///
    /// Issues a new certificate with the same identity (and DNS/IP names), a new key and a
    /// new validity, replacing the certificate and key files. The old certificate is not
    /// revoked and stays valid until it expires: once the new one is deployed, run the
    /// `trmx-certs revoke --serial <old serial>` command that renew prints. Renewing a
    /// revoked certificate (after a key leak) is allowed, with a note on stderr.
    Renew {
        #[command(flatten)]
        ca: CaDir,
        /// The certificate to renew (PEM); it is replaced.
        cert: PathBuf,
        /// The key file to replace [default: the certificate's path with extension .key].
        #[arg(long, conflicts_with = "csr")]
        key: Option<PathBuf>,
        /// Certify the organisation's new key from its request (`trmx-certs request`)
        /// instead of making one: only the certificate is replaced.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
        /// Validity of the new certificate in days.
        #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
        validity_days: u32,
    },
    /// Show a certificate: identity, role, serial, validity, issuer, revoked or not.
    ///
    /// With --dir (or TRMX_CA_DIR), also says whether this CA issued it and whether it is
    /// revoked; that reads ca.pem and index.json, never ca.key.
    Show {
        /// The CA directory (to report revocation).
        #[arg(long, env = "TRMX_CA_DIR")]
        dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The certificate (PEM).
        cert: PathBuf,
    },
    /// List the certificates the CA issued: serial, identity, expiry, revocation, renewal.
    ///
    /// Read from the CA's index.json, oldest first; needs no copy of the certificates, and
    /// no access to ca.key (ca.pem and index.json are enough).
    List {
        #[command(flatten)]
        ca: CaDir,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// What `revoke` revokes: exactly one of a certificate file, a serial, a participant and
/// an operator.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct RevokeTarget {
    /// The certificate to revoke (PEM).
    cert: Option<PathBuf>,
    /// The serial to revoke (hex, as `list`, `show`, `renew` and `issue` print it).
    #[arg(long, value_name = "HEX")]
    serial: Option<String>,
    /// Revoke every certificate this CA issued for the participant, e.g. NL-NRM.
    #[arg(long, value_name = "ID")]
    participant: Option<String>,
    /// Revoke every certificate this CA issued for the operator.
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
}

#[derive(Debug, Subcommand)]
enum IssueCommand {
    /// A broker (server) certificate: URI SAN spiffe://<td>/broker/<name> plus DNS names and
    /// IPs; serverAuth and clientAuth. Written to ./broker-<name>.pem/.key unless --out.
    Broker {
        #[command(flatten)]
        common: IssueArgs,
        /// Broker name (A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
        /// DNS name clients use to reach the broker (repeatable; no port or scheme). At least
        /// one --dns or --ip is required.
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// IP address clients use to reach the broker (repeatable).
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
    },
    /// A participant's node certificate: URI SAN spiffe://<td>/participant/<ID>;
    /// clientAuth. Written to ./<ID>.pem/.key unless --out.
    Node {
        #[command(flatten)]
        common: IssueArgs,
        /// Participant id, e.g. NL-NRM (country code or INT, dash, organisation code).
        #[arg(long)]
        participant: String,
    },
    /// An operator certificate: URI SAN spiffe://<td>/operator/<name>; clientAuth.
    /// Written to ./operator-<name>.pem/.key unless --out.
    Operator {
        #[command(flatten)]
        common: IssueArgs,
        /// Operator name (A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Args)]
struct CaDir {
    /// The CA directory.
    #[arg(long, env = "TRMX_CA_DIR")]
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct IssueArgs {
    #[command(flatten)]
    ca: CaDir,
    /// Output path prefix: writes PREFIX.pem and PREFIX.key (only PREFIX.pem with --csr).
    /// Ending in / it is a directory (made if missing) that gets the default names inside
    /// it. An existing directory or file without the / is refused as ambiguous.
    #[arg(long, value_name = "PREFIX")]
    out: Option<PathBuf>,
    /// Certify the key of this certificate request (`trmx-certs request`, made by the
    /// organisation, which keeps its key) instead of making a key here. Only its public
    /// key is used: identity, names and validity come from this command. Compare the
    /// fingerprint printed with the one the organisation reads out before you send the
    /// certificate.
    #[arg(long, value_name = "FILE")]
    csr: Option<PathBuf>,
    /// Validity in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    validity_days: u32,
    /// Overwrite existing certificate and key files. A replaced certificate stays valid
    /// until it expires: issue prints its serial and the revoke command to run.
    #[arg(long)]
    force: bool,
}

/// `println!` for what a command did: a reader that went away (`trmx-certs issue … |
/// head -1`, a closed stdout) is no panic with exit status 101 after the certificate was
/// issued and recorded, which read as a failure to retry. Another write error is said on
/// stderr; what was done stays done.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("warning: cannot write to stdout: {e}");
            }
        }
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), CertError> {
    match cli.command {
        Command::Init {
            ca,
            trust_domain,
            name,
            validity_days,
            force,
        } => {
            let opts = CaOptions {
                trust_domain,
                name,
                validity_days,
                force,
            };
            let ca = Ca::init(&ca.dir, &opts)?;
            outln!(
                "created CA for trust domain {} in {}",
                ca.trust_domain(),
                ca.dir().display()
            );
            outln!("  certificate: {}", ca.ca_cert_path().display());
            outln!("  CRL:         {}", ca.crl_path().display());
            if let Some(previous) = ca.replaced() {
                outln!(
                    "  the CA it replaced (key included): {}",
                    previous.display()
                );
            }
            Ok(())
        }
        Command::Issue { what } => issue(what),
        Command::Revoke { ca, target } => {
            let ca = open_ca(&ca.dir)?;
            let revocations = match target {
                RevokeTarget {
                    serial: Some(serial),
                    ..
                } => vec![ca.revoke_serial_hex(&serial)?],
                RevokeTarget {
                    participant: Some(id),
                    ..
                } => ca.revoke_role(&Role::Participant(id))?,
                RevokeTarget {
                    operator: Some(name),
                    ..
                } => ca.revoke_role(&Role::Operator(name))?,
                RevokeTarget {
                    cert: Some(cert), ..
                } => vec![ca.revoke(&cert)?],
                RevokeTarget { .. } => {
                    return Err(CertError::InvalidArgument {
                        field: "revoke",
                        problem: "give a certificate file, --serial, --participant or --operator"
                            .to_string(),
                    });
                }
            };
            for revocation in &revocations {
                print_revoked(revocation);
            }
            outln!("CRL rewritten: {}", ca.crl_path().display());
            Ok(())
        }
        Command::Crl {
            ca,
            next_update_days,
        } => {
            if next_update_days == 0 {
                return Err(CertError::InvalidArgument {
                    field: "--next-update-days",
                    problem: "must be at least 1".to_string(),
                });
            }
            let ca = open_ca(&ca.dir)?;
            let next = Duration::from_secs(u64::from(next_update_days) * 24 * 3600);
            ca.write_crl(next)?;
            outln!(
                "CRL written: {} (next update {})",
                ca.crl_path().display(),
                format_time(SystemTime::now() + next)
            );
            Ok(())
        }
        Command::Request { name, out, force } => {
            let prefix = out_prefix(out, &name)?;
            let paths = RequestPaths::from_prefix(&prefix);
            let request = CertRequest::create(&name, &paths, force)?;
            outln!("request for {name}");
            outln!(
                "  request:     {} (send it to the CA)",
                paths.request.display()
            );
            outln!(
                "  key:         {} (keep it here, mode 0600)",
                paths.key.display()
            );
            outln!("  fingerprint: {}", request.fingerprint());
            outln!(
                "read the fingerprint out to the CA administrator, who checks it before issuing"
            );
            if let Some(kept) = request.kept_key() {
                note_kept_key(kept, &paths.request);
            }
            Ok(())
        }
        Command::Renew {
            ca,
            cert,
            key,
            csr,
            validity_days,
        } => {
            let ca = open_ca(&ca.dir)?;
            let (renewal, key) = match csr {
                Some(csr) => {
                    let request = CertRequest::from_pem_file(&csr)?;
                    print_request(&request);
                    let renewal = ca.renew_for_request(&cert, &request, validity_days)?;
                    let key = CertPaths::for_cert(&cert).key;
                    warn_stale_key(&key, &cert, &renewal.new, true);
                    (renewal, None)
                }
                None => {
                    let paths = match key {
                        Some(key) => CertPaths {
                            cert: cert.clone(),
                            key,
                        },
                        None => CertPaths::for_cert(&cert),
                    };
                    (ca.renew(&paths, validity_days)?, Some(paths.key))
                }
            };
            print_written(&cert, key.as_deref(), &renewal.new);
            print_replaced(&ca, &renewal.old);
            note_others_valid(&ca, &renewal.new, Some(&renewal.old.serial_hex));
            if let Some(revoked_at) = renewal.old_revoked_at {
                note_renewed_revoked(&ca, &renewal, revoked_at);
            }
            Ok(())
        }
        Command::Show { dir, json, cert } => show(dir.as_deref(), json, &cert),
        Command::List { ca, json } => list(&open_ca_view(&ca.dir)?, json),
    }
}

fn issue(what: IssueCommand) -> Result<(), CertError> {
    let (common, spec, default_stem) = match what {
        IssueCommand::Broker {
            common,
            name,
            dns,
            ips,
        } => {
            validate_name("broker", &name)?;
            let stem = format!("broker-{name}");
            (common, IssueSpec::broker(&name, dns, ips), stem)
        }
        IssueCommand::Node {
            common,
            participant,
        } => {
            validate_participant_id(&participant)?;
            let stem = participant.clone();
            (common, IssueSpec::participant(&participant), stem)
        }
        IssueCommand::Operator { common, name } => {
            validate_name("operator", &name)?;
            let stem = format!("operator-{name}");
            (common, IssueSpec::operator(&name), stem)
        }
    };
    let spec = IssueSpec {
        validity_days: common.validity_days,
        ..spec
    };
    // (read first: a request that is not one is refused before the CA is opened)
    let request = common
        .csr
        .as_deref()
        .map(CertRequest::from_pem_file)
        .transpose()?;
    let prefix = out_prefix(common.out, &default_stem)?;
    let ca = open_ca(&common.ca.dir)?;
    let paths = CertPaths::from_prefix(&prefix);
    if let Some(request) = &request {
        print_request(request);
    }
    // (what it replaced is read under the CA lock: its serial is all that is left to
    // revoke it by)
    let issued = ca.issue_with(&spec, &paths, request.as_ref(), common.force)?;
    let (info, replaced) = (issued.cert, issued.replaced);
    let key = request.is_none().then_some(paths.key.as_path());
    print_written(&paths.cert, key, &info);
    if request.is_some() {
        warn_stale_key(&paths.key, &paths.cert, &info, replaced.is_some());
    }
    if let Some(old) = &replaced {
        print_replaced(&ca, old);
    }
    let replaced = replaced.map(|old| old.serial_hex);
    note_others_valid(&ca, &info, replaced.as_deref());
    Ok(())
}

/// Says on stderr which other certificates of the identity just issued stay valid: a
/// second `issue` for a participant (to another `--out`) replaces nothing, and the first
/// certificate, wherever its files went, is as good as the new one until it expires or is
/// revoked. `replaced` is the certificate already reported as replaced.
fn note_others_valid(ca: &Ca, new: &CertInfo, replaced: Option<&str>) {
    let identity = new.identity.spiffe_uri();
    let now = SystemTime::now();
    let others: Vec<IssuedCert> = ca
        .issued()
        .into_iter()
        .filter(|c| {
            c.identity == identity
                && c.serial != new.serial_hex
                && Some(c.serial.as_str()) != replaced
                && c.revoked_at.is_none()
                && from_unix_seconds(c.not_after) > now
        })
        .collect();
    if others.is_empty() {
        return;
    }
    let listed: Vec<String> = others
        .iter()
        .map(|c| {
            format!(
                "serial {} (not after {})",
                c.serial,
                format_unix(c.not_after)
            )
        })
        .collect();
    let dir = shell_word(&ca.dir().display().to_string());
    let (count, what_now) = match others.as_slice() {
        [one] => (
            "another valid certificate".to_string(),
            format!(
                "it stays valid until it expires or is revoked; once it is no longer in use: \
                 `trmx-certs revoke --dir {dir} --serial {}`",
                one.serial
            ),
        ),
        _ => (
            format!("{} other valid certificates", others.len()),
            format!(
                "they stay valid until they expire or are revoked; revoke each one no longer \
                 in use: `trmx-certs revoke --dir {dir} --serial SERIAL`"
            ),
        ),
    };
    eprintln!(
        "note: {identity} has {count}, which this one does not replace: {}; {what_now}",
        listed.join(", "),
    );
}

/// The path prefix the files go to: `--out`, else `stem` in the working directory.
///
/// `--out` is a path prefix (`--out certs/NL-NRM` writes `certs/NL-NRM.pem` and `.key`),
/// or a directory when written as one: ending in `/` (or `.`, `..`), which gets `stem`
/// inside it (`--out certs/` wrote the hidden files `certs/.pem` and `certs/.key`). What is
/// ambiguous is refused, naming both readings: a `--out` that is an existing directory
/// without the `/` (it wrote inside it, where the prefix reading writes beside it), one
/// that is an existing file (taken for the file to write), and one ending in a file
/// extension of ours (`--out NL.pem` wrote `NL.pem.pem` and `NL.pem.key`).
fn out_prefix(out: Option<PathBuf>, stem: &str) -> Result<PathBuf, CertError> {
    let Some(out) = out else {
        return Ok(PathBuf::from(stem));
    };
    let text = out.to_string_lossy();
    let invalid = |problem: String| CertError::InvalidArgument {
        field: "--out",
        problem,
    };
    let last = out.components().next_back();
    // (`components` drops a trailing `.`: `d/.` ends in `Normal("d")`)
    let names_dir = !matches!(last, Some(std::path::Component::Normal(_))) || text.ends_with("/.");
    if text.ends_with('/') || names_dir {
        out_dir_usable(&out).map_err(invalid)?;
        return Ok(out.join(stem));
    }
    let extension = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if let Some(ext) = extension.filter(|e| ["pem", "key", "csr", "crt"].contains(&e.as_str())) {
        return Err(invalid(format!(
            "{} ends in .{ext}, but --out is a path prefix that .pem, .key or .csr is added to: \
             give --out {}",
            out.display(),
            shell_word(&out.with_extension("").display().to_string())
        )));
    }
    match std::fs::metadata(&out) {
        Ok(meta) if meta.is_dir() => Err(invalid(format!(
            "{0} is an existing directory: give --out {1}/ to write the files inside it as \
             {2}.*, or a path prefix that names no directory (e.g. --out {1}/{2})",
            out.display(),
            shell_word(&text),
            stem
        ))),
        Ok(_) => Err(invalid(format!(
            "{} is an existing file, but --out is a path prefix that .pem, .key or .csr is \
             added to (beside that file, which stays as it is): give a prefix that names no \
             file, or a directory ending in /",
            out.display()
        ))),
        Err(_) => Ok(out),
    }
}

/// Why `out`, a `--out` naming a directory, cannot be one to write the files in, if it
/// cannot: a file there said "Not a directory", a dangling symbolic link "File exists"
/// (when the directory was made). A directory that does not exist yet is made.
fn out_dir_usable(out: &Path) -> Result<(), String> {
    // (without its trailing `/` and `/.`: `afile/` is "Not a directory" to the system,
    // and `dangling/.` no symbolic link, so that it said "File exists" when it was made)
    let text = out.to_string_lossy();
    let mut bare = text.as_ref();
    loop {
        bare = bare.trim_end_matches('/');
        match bare.strip_suffix("/.") {
            Some(rest) => bare = rest,
            None => break,
        }
    }
    let bare = match bare {
        "" => return Ok(()),
        bare => Path::new(bare),
    };
    let error = match std::fs::metadata(bare) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(format!(
                "{} names a directory to write the files in, but it is a file (left as it \
                 is): give a directory, or a path prefix that names no file",
                out.display()
            ));
        }
        Err(error) => error,
    };
    if error.kind() == std::io::ErrorKind::NotFound {
        return match std::fs::read_link(bare) {
            Ok(target) => {
                // (a relative target is taken from the link's directory)
                let at = match bare.parent() {
                    Some(parent) if target.is_relative() => parent.join(&target),
                    _ => target.clone(),
                };
                Err(format!(
                    "{} is a symbolic link to {}, which does not exist: make that directory \
                     (`mkdir -p {}`) or give another --out",
                    out.display(),
                    target.display(),
                    shell_word(&at.display().to_string())
                ))
            }
            // (made when the files are written)
            Err(_) => Ok(()),
        };
    }
    let why = if error.kind() == std::io::ErrorKind::NotADirectory {
        "a part of its path is a file, not a directory".to_owned()
    } else {
        error.to_string()
    };
    Err(format!(
        "cannot use {} as the directory to write the files in: {why}; give a directory that \
         exists or can be made",
        out.display()
    ))
}

/// Opens the CA directory, key included, and warns if the CA nears its expiry.
fn open_ca(dir: &Path) -> Result<Ca, CertError> {
    let ca = Ca::open(dir)?;
    warn_ca_expiry(ca.not_after());
    warn_clock_behind(ca.latest_record());
    Ok(ca)
}

/// Warns on stderr when the clock is more than a day behind the latest issue or
/// revocation the index records: it was probably set back, and what the CA signs now is
/// dated by it (a certificate that expires early, a CRL whose nextUpdate may have passed
/// already). Only a warning: the record itself may have been made with a clock ahead.
/// (A clock before the CA certificate's start is refused by the library.)
fn warn_clock_behind(latest: Option<SystemTime>) {
    let Some(latest) = latest else {
        return;
    };
    let now = SystemTime::now();
    if now + Duration::from_secs(24 * 3600) >= latest {
        return;
    }
    eprintln!(
        "warning: this machine's clock says {}, but the CA index records an issue or \
         revocation at {}: if the clock was set back, what is signed now is dated wrong (a \
         CRL may be past its nextUpdate at once); check the clock (`date -u`) first",
        format_time(now),
        format_time(latest)
    );
}

/// Opens the CA directory read-only (never `ca.key`: an auditor without access to it can
/// run `list` and `show --dir`), and warns if the CA nears its expiry.
fn open_ca_view(dir: &Path) -> Result<CaView, CertError> {
    let ca = CaView::open(dir)?;
    warn_ca_expiry(ca.not_after());
    Ok(ca)
}

/// Warns on stderr when the CA certificate expires within a default certificate validity:
/// from then on no default-length certificate can be issued, and every certificate it
/// issued dies with it, so its successor must be set up and its `ca.pem` distributed
/// before then.
fn warn_ca_expiry(not_after: SystemTime) {
    let expires = format_time(not_after);
    match not_after.duration_since(SystemTime::now()) {
        Err(_) => eprintln!(
            "warning: the CA certificate expired on {expires}: every certificate it issued is \
             invalid; set up a new CA"
        ),
        Ok(left) if left < Duration::from_secs(u64::from(DEFAULT_VALIDITY_DAYS) * 24 * 3600) => {
            eprintln!(
                "warning: the CA certificate expires on {expires} (in {} days): no certificate \
                 can outlive it; set up its successor and distribute its ca.pem before then",
                left.as_secs() / (24 * 3600)
            )
        }
        Ok(_) => {}
    }
}

/// What `issue`/`renew` wrote: the certificate, and the key unless it came from a request.
fn print_written(cert: &Path, key: Option<&Path>, info: &CertInfo) {
    outln!("issued {} (serial {})", info.identity, info.serial_hex);
    outln!("  certificate: {}", cert.display());
    match key {
        Some(key) => outln!("  key:         {}", key.display()),
        None => outln!("  key:         the organisation's own (from its request)"),
    }
    outln!("  not after:   {}", format_time(info.not_after));
}

/// After a certificate issued to a request was written to `cert`: a key file beside it
/// (`key`) that is not the request's key does not belong to it, and a node given the two
/// together cannot start. It warned whenever the file was there, saying it was the key of a
/// replaced certificate: also when the request had been made in that directory (the key
/// is the certificate's own) and when nothing was replaced. It warns only on a key that
/// does not match, and says the replacement only when there was one (`replaced`).
fn warn_stale_key(key: &Path, cert: &Path, info: &CertInfo, replaced: bool) {
    let matches = match key_file_fingerprint(key) {
        None => return,
        Some(Ok(fingerprint)) => fingerprint == info.key_fingerprint,
        Some(Err(why)) => {
            eprintln!(
                "warning: {} is beside the certificate just written to {} and could not be \
                 compared with it ({why}): the certificate is for the key of the request; a \
                 node needs that key, not this file",
                key.display(),
                cert.display()
            );
            return;
        }
    };
    if matches {
        return;
    }
    let whose = if replaced {
        "most likely the key of the certificate this one replaced"
    } else {
        "the key of no certificate written here (this issue replaced none)"
    };
    eprintln!(
        "warning: {} does not match the certificate just written to {}, which is for the key \
         of the request: it is {whose}, and a node given the two together cannot start; \
         delete it unless another certificate uses it, and do not send it anywhere",
        key.display(),
        cert.display()
    );
}

/// The fingerprint of the public key of the private key file at `key` (as
/// [`CertInfo::key_fingerprint`] has it), `None` when there is no file there, an error
/// saying why when it cannot be read as a key.
fn key_file_fingerprint(key: &Path) -> Option<Result<String, String>> {
    // (not a regular file, e.g. a FIFO, is not opened: it could block)
    match std::fs::metadata(key) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(e.to_string())),
        Ok(meta) if !meta.is_file() => return Some(Err("not a regular file".to_string())),
        Ok(_) => {}
    }
    let pem = match std::fs::read_to_string(key) {
        Ok(pem) => pem,
        Err(e) => return Some(Err(e.to_string())),
    };
    Some(
        rcgen::KeyPair::from_pem(&pem)
            .map(|pair| {
                trmx_certs::key_fingerprint(&rcgen::PublicKeyData::subject_public_key_info(&pair))
            })
            .map_err(|_| "not a private key in PEM".to_string()),
    )
}

/// After `request --force` replaced the key of a certificate still in date: which
/// certificate lost its key, where the old key was kept, and what to do in each of the two
/// cases the tool cannot tell apart (it has no CRL).
fn note_kept_key(kept: &trmx_certs::KeptKey, request: &Path) {
    let key = kept.cert.with_extension("key");
    let kept_path = kept.path.display().to_string();
    eprintln!(
        "note: {} was the key of {} ({}, valid until {}), which cannot be used without it; \
         the old key is kept as {kept_path}. If that certificate was revoked (a key leak), \
         delete {kept_path}. If it is still in use, its node cannot restart until the \
         certificate issued to {} is installed as {}; to go back instead: `mv {} {}` (the new \
         request is then of no use)",
        key.display(),
        kept.cert.display(),
        kept.identity,
        format_time(kept.not_after),
        request.display(),
        kept.cert.display(),
        shell_word(&kept_path),
        shell_word(&key.display().to_string()),
    );
}

/// The request being certified, with the fingerprint to compare.
fn print_request(request: &CertRequest) {
    outln!(
        "certifying the key of {}: fingerprint {}",
        request.path().display(),
        request.fingerprint()
    );
}

/// Tells the operator that `old` was replaced and, unless it is revoked already, the
/// command that revokes it.
fn print_replaced(ca: &Ca, old: &CertInfo) {
    if ca.is_revoked(&old.serial_hex) {
        outln!(
            "replaced {} (serial {}), which is already revoked",
            old.identity,
            old.serial_hex
        );
        return;
    }
    outln!(
        "replaced {} (serial {}): it stays valid until {} unless revoked",
        old.identity,
        old.serial_hex,
        format_time(old.not_after)
    );
    outln!("once the new certificate is deployed, revoke the old one:");
    outln!(
        "  trmx-certs revoke --dir {} --serial {}",
        shell_word(&ca.dir().display().to_string()),
        old.serial_hex
    );
}

/// Renewing a revoked certificate is allowed (after a key leak: revoke, then renew to a new
/// key), but it gives a revoked identity a valid certificate again: say so on stderr, with
/// the command that undoes it, so that it never happens by accident.
fn note_renewed_revoked(ca: &Ca, renewal: &Renewal, revoked_at: SystemTime) {
    eprintln!(
        "note: the certificate renewed, {} (serial {}), was revoked on {}; the new certificate \
         (serial {}) is valid for the same identity: if it must not be, revoke it with \
         `trmx-certs revoke --dir {} --serial {}`",
        renewal.old.identity,
        renewal.old.serial_hex,
        format_time(revoked_at),
        renewal.new.serial_hex,
        shell_word(&ca.dir().display().to_string()),
        renewal.new.serial_hex,
    );
}

fn print_revoked(r: &Revocation) {
    let what = format!("{} (serial {})", r.cert.identity, r.cert.serial);
    match (r.already_revoked, r.cert.revoked_at) {
        (true, Some(at)) => outln!("{what} was already revoked on {}", format_unix(at)),
        _ => outln!("revoked {what}"),
    }
}

/// `s` quoted for a POSIX shell when it needs to be, so printed commands can be pasted.
fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:@,%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn format_unix(secs: i64) -> String {
    format_time(from_unix_seconds(secs))
}

fn list(ca: &CaView, json: bool) -> Result<(), CertError> {
    let certs = ca.issued();
    let now = SystemTime::now();
    let expired = |c: &IssuedCert| from_unix_seconds(c.not_after) <= now;
    if json {
        let v: Vec<serde_json::Value> = certs
            .iter()
            .map(|c| {
                serde_json::json!({
                    "serial": c.serial,
                    "identity": c.identity,
                    "issued_at": format_unix(c.issued_at),
                    "not_after": format_unix(c.not_after),
                    "expired": expired(c),
                    "revoked": c.revoked_at.is_some(),
                    "revoked_at": c.revoked_at.map(format_unix),
                    "renewed_by": c.renewed_by,
                })
            })
            .collect();
        return print_json(&v);
    }
    if certs.is_empty() {
        return print_out("no certificates issued by this CA yet\n");
    }
    let mut out = String::new();
    let width = certs
        .iter()
        .map(|c| c.identity.len())
        .max()
        .unwrap_or(0)
        .max("IDENTITY".len());
    let _ = writeln!(
        out,
        "{:<32}  {:<width$}  {:<20}  {:<28}  RENEWED BY",
        "SERIAL", "IDENTITY", "NOT AFTER", "STATUS"
    );
    for c in &certs {
        let status = match c.revoked_at {
            Some(at) => format!("revoked {}", format_unix(at)),
            None if expired(c) => "expired".to_string(),
            None => "valid".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<32}  {:<width$}  {:<20}  {:<28}  {}",
            c.serial,
            c.identity,
            format_unix(c.not_after),
            status,
            c.renewed_by.as_deref().unwrap_or("-"),
        );
    }
    print_out(&out)
}

fn show(dir: Option<&Path>, json: bool, cert: &Path) -> Result<(), CertError> {
    let info = CertInfo::from_pem_file(cert)?;
    // (issued by this CA, revoked) when a CA directory is given
    let status = match dir {
        Some(dir) => {
            let ca = open_ca_view(dir)?;
            let issued = match ca.verify_issued(cert) {
                Ok(_) => true,
                Err(CertError::NotIssuedByCa { .. } | CertError::TrustDomainMismatch { .. }) => {
                    false
                }
                Err(e) => return Err(e),
            };
            Some((issued, issued && ca.is_revoked(&info.serial_hex)))
        }
        None => None,
    };
    let now = SystemTime::now();
    let mut usages = Vec::new();
    if info.server_auth {
        usages.push("serverAuth");
    }
    if info.client_auth {
        usages.push("clientAuth");
    }
    if json {
        let mut v = serde_json::json!({
            "identity": info.identity.spiffe_uri(),
            "trust_domain": info.identity.trust_domain,
            "role": info.identity.role.kind(),
            "name": info.identity.role.name(),
            "participant": info.identity.participant(),
            "serial": info.serial_hex,
            "not_before": format_time(info.not_before),
            "not_after": format_time(info.not_after),
            "expired": now > info.not_after,
            "issuer": info.issuer,
            "subject": info.subject,
            "dns_names": info.dns_names,
            "ips": info.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "extended_key_usage": usages,
            "key_fingerprint": info.key_fingerprint,
        });
        if let (Some((issued, revoked)), Some(obj)) = (status, v.as_object_mut()) {
            obj.insert("issued_by_ca".to_string(), issued.into());
            obj.insert("revoked".to_string(), revoked.into());
        }
        return print_json(&v);
    }
    let role = match &info.identity.role {
        Role::Participant(_) => "participant (node)",
        Role::Operator(_) => "operator",
        Role::Broker(_) => "broker",
    };
    let mut out = String::new();
    let _ = writeln!(out, "identity:    {}", info.identity);
    let _ = writeln!(out, "role:        {role}");
    let _ = writeln!(out, "name:        {}", info.identity.role.name());
    let _ = writeln!(out, "serial:      {}", info.serial_hex);
    let _ = writeln!(out, "not before:  {}", format_time(info.not_before));
    let expired = if now > info.not_after {
        " (expired)"
    } else {
        ""
    };
    let _ = writeln!(out, "not after:   {}{expired}", format_time(info.not_after));
    let _ = writeln!(out, "issuer:      {}", info.issuer);
    let _ = writeln!(out, "subject:     {}", info.subject);
    if !info.dns_names.is_empty() {
        let _ = writeln!(out, "dns names:   {}", info.dns_names.join(", "));
    }
    if !info.ips.is_empty() {
        let ips: Vec<String> = info.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "ips:         {}", ips.join(", "));
    }
    let _ = writeln!(out, "usage:       {}", usages.join(", "));
    let _ = writeln!(out, "key:         SHA-256 {}", info.key_fingerprint);
    if let Some((issued, revoked)) = status {
        let _ = writeln!(out, "issued here: {}", if issued { "yes" } else { "no" });
        let _ = writeln!(out, "revoked:     {}", if revoked { "yes" } else { "no" });
    }
    print_out(&out)
}

/// Prints `value` as pretty JSON (`--json`).
fn print_json(value: &impl serde::Serialize) -> Result<(), CertError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CertError::InvalidArgument {
        field: "--json",
        problem: e.to_string(),
    })?;
    print_out(&format!("{text}\n"))
}

/// Writes `text` to stdout. A reader that went away (`trmx-certs list | head`) is no
/// failure: it has what it wanted, and println! would panic with a backtrace there.
fn print_out(text: &str) -> Result<(), CertError> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CertError::InvalidArgument {
            field: "output",
            problem: format!("cannot write to stdout: {e}"),
        }),
        _ => Ok(()),
    }
}
