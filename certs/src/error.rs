//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `trmx-certs`.
///
/// Every message is one line that names the file, field or value at fault (flags and file
/// names may be echoed; nothing here ever carries message payloads).
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read, written, renamed or created.
    #[error("cannot {action} {}: {}", path.display(), io_message(source))]
    Io {
        /// What was attempted, e.g. `read CA key`.
        action: String,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A participant id does not match `^(?:[A-Z]{2}|INT)-[A-Z0-9]{2,24}$`.
    #[error("participant id {id:?} is invalid: expected CC-ORG like NL-NRM")]
    InvalidParticipantId {
        /// The rejected id (it comes from a flag or a certificate, never from a body).
        id: String,
    },
    /// An operator or broker name is not a valid SPIFFE path segment.
    #[error("{what} name {name:?} is invalid: expected 1 to 64 of A-Z a-z 0-9 . _ -")]
    InvalidName {
        /// `operator` or `broker`.
        what: &'static str,
        /// The rejected name.
        name: String,
    },
    /// A trust domain is not a valid SPIFFE trust domain.
    #[error("trust domain {domain:?} is invalid: expected 1 to 255 of a-z 0-9 . _ -")]
    InvalidTrustDomain {
        /// The rejected trust domain.
        domain: String,
    },
    /// Some other argument is out of range (validity days, DNS name, ...).
    #[error("{field} is invalid: {problem}")]
    InvalidArgument {
        /// The flag or field at fault.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A certificate's SPIFFE identity is missing or malformed.
    #[error("certificate identity is invalid: {problem}")]
    InvalidIdentity {
        /// What is wrong.
        problem: String,
    },
    /// A private key file that other users may read, or its group change.
    #[error(
        "{what} {} has mode {mode:04o}, which lets other users read or change it: `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyExposed {
        /// What it is, e.g. `CA key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A PEM or DER document could not be parsed.
    #[error("cannot parse {what} {location}: {problem}")]
    Parse {
        /// `certificate`, `private key`, `CRL`, `CA index`, ...
        what: &'static str,
        /// The file it came from, or `(DER input)`.
        location: String,
        /// The parser's complaint.
        problem: String,
    },
    /// A directory given as a CA directory holds neither `ca.pem` nor `ca.key`.
    #[error(
        "no federation CA in {} (neither ca.pem nor ca.key is there): check --dir or TRMX_CA_DIR, or create one with `trmx-certs init`",
        dir.display()
    )]
    NoCa {
        /// The directory.
        dir: PathBuf,
    },
    /// A target file exists and `force` was not given.
    #[error("refusing to overwrite {} (use --force)", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// `init` without `force` in a directory that holds a CA already. "use --force" was the
    /// only hint, though `--force` puts a new CA in place of the one every certificate of
    /// the federation was issued by.
    #[error(
        "refusing to overwrite {}: {} holds a federation CA already. For a successor CA (a CA rollover), give another --dir and another --name. `--force` replaces this CA with a new one: its files, key included, are moved into {}/replaced-<unix seconds>/, and no certificate it issued is valid under the new CA, so every broker and node then needs the new ca.pem and a certificate issued again",
        path.display(),
        dir.display(),
        dir.display()
    )]
    CaExists {
        /// The existing file of the CA.
        path: PathBuf,
        /// The CA directory.
        dir: PathBuf,
    },
    /// `request` without `force` where its key or request file exists. "use --force" was
    /// the only hint, though `--force` replaces the key, which a certificate beside it may
    /// be using; a renewal wants its new key under another name.
    #[error(
        "refusing to overwrite {}: for a renewal, write the new key and request under another name with --out, leaving the key in use in place until the new certificate is back (`--out {}` names files that do not exist yet). `--force` replaces {} with a new key (after a key leak): a certificate in use with the old key cannot be used without it until a certificate for the new one is installed",
        path.display(),
        free_prefix.display(),
        key.display()
    )]
    RequestExists {
        /// The existing file.
        path: PathBuf,
        /// The key file `--force` would replace.
        key: PathBuf,
        /// A `--out` prefix whose key and request files do not exist.
        free_prefix: PathBuf,
    },
    /// An issue or renewal would write a certificate or key over one of the CA's own files.
    #[error(
        "refusing to write {}: it is the CA's own {} and would destroy the CA; choose another --out (or --key)",
        path.display(),
        ca_file.display()
    )]
    CaFileTarget {
        /// The path given.
        path: PathBuf,
        /// The CA file it names.
        ca_file: PathBuf,
    },
    /// A file to be replaced holds something else than what is written there: a key path
    /// naming a certificate, or a certificate path naming a key.
    #[error(
        "refusing to replace {}: it holds {found}, not {expected}; check {flag}",
        path.display()
    )]
    WrongFileKind {
        /// The file.
        path: PathBuf,
        /// What it holds, e.g. `a certificate`.
        found: String,
        /// What would be written there, e.g. `a private key`.
        expected: &'static str,
        /// Which flag or path to check.
        flag: &'static str,
    },
    /// The system clock is before the CA certificate's start: either this clock is behind
    /// or the CA was made on a clock that was ahead, which cannot be told from here (it
    /// blamed this clock alone).
    #[error(
        "this machine's clock says {}, before the start of the CA certificate {} ({}): either this clock is behind, or the CA was made on a clock that was ahead; what it signed now would be dated before the CA itself (nothing was changed). Compare this clock with a time source (`timedatectl`, `chronyc tracking`): if it is behind, set it right and run the command again; if it is right, the command works from {} on",
        crate::format_time(*now),
        ca_cert.display(),
        crate::format_time(*ca_not_before),
        crate::format_time(*ca_not_before)
    )]
    ClockBeforeCa {
        /// The system clock's time.
        now: std::time::SystemTime,
        /// The CA certificate's notBefore.
        ca_not_before: std::time::SystemTime,
        /// The CA certificate file.
        ca_cert: PathBuf,
    },
    /// A revocation is recorded in the index, but the CRL that carries it could not be
    /// written.
    #[error(
        "{cause}; the revocation of serial {serials} is recorded in the CA index but in no CRL yet, so no broker or node knows of it: once the cause is fixed, run `trmx-certs crl --dir {}` and install the new crl.pem",
        dir.display()
    )]
    CrlNotWritten {
        /// The serials revoked, comma-separated.
        serials: String,
        /// The CA directory.
        dir: PathBuf,
        /// Why the CRL could not be written.
        cause: Box<CertError>,
    },
    /// Another run, or a program using this library, held the CA directory's lock for
    /// longer than [`crate::ca::LOCK_WAIT`].
    #[error(
        "the CA directory is busy: {0} is locked by another trmx-certs run or a program using the trmx-certs library ({owner}; `fuser -v {0}` names the process that holds it); retry once it has finished",
        path.display()
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// What is known of its holder: what the lock file says (`pid 1234 since …`, the
        /// last run's to write it) and whether that process still runs.
        owner: String,
    },
    /// `init --force` failed part-way through moving the CA it replaces aside.
    #[error("{cause}; the replaced CA's files moved so far are in {}", moved_to.display())]
    ReplaceIncomplete {
        /// The directory the files were being moved into.
        moved_to: PathBuf,
        /// What failed.
        cause: Box<CertError>,
    },
    /// Replacing a key and its certificate failed after the key was renamed into place,
    /// and putting the key back failed too: the key file does not match the certificate.
    #[error(
        "{cause}; {} already holds the new {what} and could not be restored ({undo}): it does not match the certificate beside it; {}",
        path.display(),
        match (replaced, kept) {
            (false, _) => format!("there was no {what} there before: remove it by hand"),
            (true, Some(old)) => format!("the replaced {what} is kept in {}: move it back to {} by hand", old.display(), path.display()),
            (true, None) => format!("the replaced {what} could not be kept either"),
        }
    )]
    PairIncomplete {
        /// The file replaced first (the key).
        path: PathBuf,
        /// What it is, e.g. `private key`.
        what: String,
        /// Why it could not be restored.
        undo: String,
        /// Whether a file was replaced (else the new one was to be removed).
        replaced: bool,
        /// Where the replaced file is kept, to be moved back by hand.
        kept: Option<PathBuf>,
        /// What failed.
        cause: Box<CertError>,
    },
    /// Writing an issued certificate failed, and so did taking its entry out of the index
    /// again: the index lists a serial that was never installed.
    #[error(
        "{cause}; the CA index still lists serial {serial}, which was never installed ({undo}): revoke it with `trmx-certs revoke --serial {serial}` or ignore it"
    )]
    IndexNotUndone {
        /// The serial the index lists.
        serial: String,
        /// Why the entry could not be removed.
        undo: Box<CertError>,
        /// What failed.
        cause: Box<CertError>,
    },
    /// The CA directory holds another CA than the one this run opened (`init --force`
    /// replaced it meanwhile): nothing was changed.
    #[error(
        "the CA in {} was replaced (trmx-certs init --force) after this run opened it; nothing was changed: run the command again",
        dir.display()
    )]
    CaReplaced {
        /// The CA directory.
        dir: PathBuf,
    },
    /// A certificate was not issued by this federation CA.
    #[error("certificate {} was not issued by this CA ({problem})", path.display())]
    NotIssuedByCa {
        /// The certificate file.
        path: PathBuf,
        /// Why it was rejected.
        problem: String,
    },
    /// A serial to revoke is not in the CA's index.
    #[error("serial {serial} was not issued by this CA (it is not in {})", index.display())]
    UnknownSerial {
        /// The serial, normalised (lower-case hex).
        serial: String,
        /// The CA's index file.
        index: PathBuf,
    },
    /// The CA's index lists no certificate for an identity to revoke.
    #[error("this CA issued no certificate for {identity} (see `trmx-certs list`)")]
    UnknownIdentity {
        /// The SPIFFE URI looked for.
        identity: String,
    },
    /// A certificate's trust domain differs from the CA's.
    #[error("certificate trust domain {found:?} differs from the CA's {expected:?}")]
    TrustDomainMismatch {
        /// The CA's trust domain.
        expected: String,
        /// The certificate's.
        found: String,
    },
    /// rcgen refused to build or sign something.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

impl CertError {
    pub(crate) fn io(
        action: impl Into<String>,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        CertError::Io {
            action: action.into(),
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parse(
        what: &'static str,
        path: &std::path::Path,
        problem: impl ToString,
    ) -> Self {
        CertError::Parse {
            what,
            location: path.display().to_string(),
            problem: problem.to_string(),
        }
    }

    pub(crate) fn generate(what: &'static str) -> impl FnOnce(rcgen::Error) -> Self {
        move |source| CertError::Generate { what, source }
    }
}

/// `No such file or directory`, without the `(os error 2)` suffix.
pub(crate) fn io_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}
