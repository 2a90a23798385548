//! The crate's one error type.
//!
//! # One rule for causes
//! A message carries the text of its cause (`cannot read ca.pem: No such file or directory
//! (os error 2)`), and no variant returns that cause from `source()`. So `%error` in a log
//! line is complete, and `anyhow`'s `{:#}`, which appends every `source()`, prints each
//! cause once. (The broker's `BrokerError` follows the same rule.)

use std::fmt;
use std::path::PathBuf;

/// Which of a party's TLS files an error is about (callers map it to their own config
/// field, e.g. the broker's `tls.key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFile {
    /// The federation CA certificate ([`crate::TlsPaths::ca`]).
    Ca,
    /// This party's certificate ([`crate::TlsPaths::cert`]).
    Cert,
    /// This party's private key ([`crate::TlsPaths::key`]).
    Key,
    /// The CRL file.
    Crl,
}

impl fmt::Display for TlsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFile::Ca => "CA certificate",
            TlsFile::Cert => "certificate",
            TlsFile::Key => "private key",
            TlsFile::Crl => "CRL",
        })
    }
}

/// The step of reading or writing the CRL record ([`crate::CrlRecord`]) that failed,
/// with the file it failed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrlRecordStep {
    /// Reading the record.
    Read,
    /// Encoding the new record.
    Encode,
    /// Writing the new record to this temporary file, beside the record.
    Write(PathBuf),
    /// Renaming this temporary file over the record.
    Rename(PathBuf),
    /// Syncing this directory (the record's) after the rename.
    SyncDir(PathBuf),
}

impl CrlRecordStep {
    /// What to check when this step failed on the record at `record`.
    fn advice(&self, record: &std::path::Path) -> String {
        let dir = match record.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => std::path::Path::new("."),
        };
        match self {
            CrlRecordStep::Read => format!(
                "check that it is a regular file that the server's user may read (and enter {})",
                dir.display()
            ),
            CrlRecordStep::Encode => "please report this as a bug".to_owned(),
            CrlRecordStep::Write(_) | CrlRecordStep::Rename(_) | CrlRecordStep::SyncDir(_) => {
                format!(
                    "check that the server's user may create and rename files in {} (its \
                     data directory) and that its file system has space left",
                    dir.display()
                )
            }
        }
    }
}

impl fmt::Display for CrlRecordStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrlRecordStep::Read => f.write_str("cannot read it"),
            CrlRecordStep::Encode => f.write_str("cannot encode the new record"),
            CrlRecordStep::Write(tmp) => {
                write!(f, "cannot write the new record to {}", tmp.display())
            }
            CrlRecordStep::Rename(tmp) => write!(f, "cannot rename {} over it", tmp.display()),
            CrlRecordStep::SyncDir(dir) => write!(f, "cannot sync its directory {}", dir.display()),
        }
    }
}

/// Everything that can go wrong while loading TLS material or building a channel.
///
/// Messages are one line and name the file (or address) and the problem; they never
/// contain key material.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A file could not be read.
    #[error("cannot read {file} {}: {error}", path.display())]
    Read {
        /// Which file.
        file: TlsFile,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// A file is not valid PEM, or holds no object of the expected kind.
    #[error("{file} {}: not a PEM {file}: {error}", path.display())]
    Pem {
        /// Which file (and so what was expected in it).
        file: TlsFile,
        /// The file.
        path: PathBuf,
        /// The PEM decoder's complaint.
        error: rustls::pki_types::pem::Error,
    },
    /// A file holds PEM but not a usable object (bad DER, unsupported CRL, …).
    #[error("{file} {}: invalid: {reason}", path.display())]
    Invalid {
        /// Which file.
        file: TlsFile,
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The private key is not the one of the certificate.
    #[error(
        "private key {} does not match certificate {} (the key of another certificate?)",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The server's own certificate does not chain to the CA.
    #[error(
        "certificate {} is not issued by the CA in {} ({reason})",
        cert.display(),
        ca.display()
    )]
    NotIssuedByCa {
        /// The certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// What the path check said.
        reason: String,
    },
    /// The server's own certificate is not meant for a TLS server.
    #[error(
        "certificate {} is not a server certificate: its extended key usage lacks serverAuth \
         (a node or operator certificate?)",
        cert.display()
    )]
    NotServerCertificate {
        /// The certificate file.
        cert: PathBuf,
    },
    /// A renewed certificate of this party's own that is not valid yet by more than
    /// [`trmx_certs::NOT_VALID_YET_WARN`]: a reload refuses it (the one in force stays),
    /// since every peer with a right clock would refuse it until then.
    #[error(
        "certificate {}, {reason}; not taken up: the certificate in force stays until this \
         one is at most 10 minutes from valid here (a broker then takes it up at its next \
         reload, SIGHUP or `tls.crl_reload_interval`; a node at its next connection)",
        cert.display()
    )]
    NotValidYet {
        /// The certificate file.
        cert: PathBuf,
        /// What is known and what to do ([`trmx_certs::NotValidYet::message`]).
        reason: String,
    },
    /// The CRL is not one the CA issued, or the CRL file lacks the CRL of one of the CAs in
    /// the CA file: the clients of that CA could not be checked (every one would be refused).
    #[error("CRL {} is not issued by the CA in {}: {reason}", crl.display(), ca.display())]
    CrlNotFromCa {
        /// The CRL file.
        crl: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A reload found a CRL older than the one in force for the same CA (a lower
    /// `crlNumber`, or without one an earlier `thisUpdate`): loading it would un-revoke the
    /// certificates revoked since.
    #[error(
        "CRL {}: the CRL of {issuer} is older than the one in force ({comparison}), a copy \
         restored from a backup? Loading it would un-revoke certificates, so the CRL in force \
         stays; install the CA's current CRL (trmx-certs crl rewrites it) and reload",
        path.display()
    )]
    CrlOlder {
        /// The CRL file.
        path: PathBuf,
        /// The CA whose CRL it is (its subject).
        issuer: String,
        /// The file's CRL against the one in force: `crlNumber 6 < crlNumber 7`, or their
        /// `thisUpdate`s without a number.
        comparison: String,
    },
    /// A CRL older than the newest of its CA accepted before, as the CRL record keeps it
    /// ([`crate::CrlRecord`]): after a restart there is no CRL in force to compare with, and
    /// a crl.pem restored from a backup would un-revoke the certificates revoked since.
    #[error(
        "CRL {}: the CRL of {issuer} is older than the newest one accepted before \
         ({comparison}, recorded in {}), a copy restored from a backup? Loading it would \
         un-revoke the certificates revoked since; install the CA's current CRL (trmx-certs \
         crl rewrites it), or delete {} and start again if you really mean to go back",
        path.display(),
        record.display(),
        record.display()
    )]
    CrlOlderThanRecorded {
        /// The CRL file.
        path: PathBuf,
        /// The CRL record.
        record: PathBuf,
        /// The CA whose CRL it is (its subject).
        issuer: Box<str>,
        /// The file's CRL against the recorded one: `crlNumber 1 < crlNumber 2`, or their
        /// `thisUpdate`s without a number. (Boxed, like `issuer`, to keep the error small.)
        comparison: Box<str>,
    },
    /// A CRL in the place of the one accepted before for its CA (in force, or recorded in
    /// the [`crate::CrlRecord`]): the same `crlNumber` (or without one the same
    /// `thisUpdate`), other content. A CA restored from a backup issues a number again,
    /// without the revocations made since the backup: taking its CRL would un-revoke them.
    #[error(
        "CRL {}: the CA {issuer} issued two different CRLs with {version}: this one and {}, a CA \
         restored from a backup? This one may lack revocations of the other, so it is \
         refused{}; install the newest CRL from the CA, and check the CA's own state first: a \
         CA restored from a backup has lost the revocations made since, and every CRL it \
         issues lacks them until they are made again",
        path.display(),
        match record {
            Some(record) => format!("the one accepted before (recorded in {})", record.display()),
            None => "the one in force".to_owned(),
        },
        if record.is_none() { " and the one in force stays" } else { "" }
    )]
    CrlReissued {
        /// The CRL file.
        path: PathBuf,
        /// The CA whose CRL it is (its subject).
        issuer: Box<str>,
        /// The place both CRLs claim: `crlNumber 7`, or `thisUpdate …` without a number.
        version: Box<str>,
        /// The CRL record, when the other CRL is the one recorded there; `None` when it is
        /// the one in force.
        record: Option<PathBuf>,
    },
    /// A CRL file that holds two CRLs of one CA (a new CRL appended to the file instead of
    /// replacing it): webpki checks a certificate against the first CRL of its issuer only,
    /// so the revocations of the other would silently not be in force.
    #[error(
        "CRL {}: it holds two CRLs of {issuer}; certificates are checked against the first \
         one only, so the revocations of the other would not be in force. Keep only that CA's \
         newest CRL in the file (`trmx-certs crl` rewrites it; do not append a new CRL to the \
         file)",
        path.display()
    )]
    CrlTwoOfOneCa {
        /// The CRL file.
        path: PathBuf,
        /// The CA (its subject).
        issuer: Box<str>,
    },
    /// The CRL record does not parse. Never taken for an empty record: that would accept
    /// any CRL.
    #[error(
        "CRL record {} is damaged ({reason}): it keeps the newest CRL accepted of each CA, so \
         that an older one is refused after a restart; restore it, or delete it to take the \
         CRLs of the CRL file as the newest",
        path.display()
    )]
    CrlRecordDamaged {
        /// The CRL record.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CRL record could not be read or written.
    #[error("CRL record {}: {step}: {error}; {}", path.display(), step.advice(path))]
    CrlRecordIo {
        /// The CRL record.
        path: PathBuf,
        /// What failed, naming the file it failed on (the record, or the temporary file a
        /// new record is written to first).
        step: CrlRecordStep,
        /// What the OS said.
        error: std::io::Error,
    },
    /// rustls refused the assembled configuration.
    #[error("{file} {}: {error}", path.display())]
    Config {
        /// The file the problem is most likely in.
        file: TlsFile,
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        error: rustls::Error,
    },
    /// The certificate verifier could not be built from the CA and CRLs.
    #[error("{file} {}: cannot build the certificate verifier: {error}", path.display())]
    Verifier {
        /// The CA or CRL.
        file: TlsFile,
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        error: rustls::server::VerifierBuilderError,
    },
    /// An address given to [`crate::client_channel`] is not `host:port`.
    #[error("address {addr:?}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The name the server certificate is checked against is not a DNS name or IP.
    #[error("server name {name:?} is not a valid DNS name or IP address")]
    ServerName {
        /// The name as given.
        name: String,
    },
    /// tonic refused the endpoint (its own text is only "invalid URI": the detail is in its
    /// source, said here too).
    #[error("endpoint {addr}: {error}{}", std::error::Error::source(error).map(|s| format!(": {s}")).unwrap_or_default())]
    Endpoint {
        /// The address as given.
        addr: String,
        /// tonic's reason.
        error: tonic::transport::Error,
    },
}

impl TransportError {
    /// The files the problem is in, the one to fix first (empty for address errors).
    pub fn files(&self) -> &'static [TlsFile] {
        fn one(file: TlsFile) -> &'static [TlsFile] {
            match file {
                TlsFile::Ca => &[TlsFile::Ca],
                TlsFile::Cert => &[TlsFile::Cert],
                TlsFile::Key => &[TlsFile::Key],
                TlsFile::Crl => &[TlsFile::Crl],
            }
        }
        match self {
            TransportError::Read { file, .. }
            | TransportError::Pem { file, .. }
            | TransportError::Invalid { file, .. }
            | TransportError::Config { file, .. }
            | TransportError::Verifier { file, .. } => one(*file),
            TransportError::CrlOlder { .. }
            | TransportError::CrlOlderThanRecorded { .. }
            | TransportError::CrlReissued { .. }
            | TransportError::CrlTwoOfOneCa { .. } => &[TlsFile::Crl],
            // (a file of the server's own, not one of its TLS files)
            TransportError::CrlRecordDamaged { .. } | TransportError::CrlRecordIo { .. } => &[],
            TransportError::KeyMismatch { .. } => &[TlsFile::Key, TlsFile::Cert],
            TransportError::NotIssuedByCa { .. } => &[TlsFile::Cert, TlsFile::Ca],
            TransportError::NotServerCertificate { .. } => &[TlsFile::Cert],
            TransportError::NotValidYet { .. } => &[TlsFile::Cert],
            TransportError::CrlNotFromCa { .. } => &[TlsFile::Crl, TlsFile::Ca],
            TransportError::Address { .. }
            | TransportError::ServerName { .. }
            | TransportError::Endpoint { .. } => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_error_says_what_tonic_keeps_in_its_source() {
        let error = tonic::transport::Endpoint::from_shared("http://a b:1".to_owned()).unwrap_err();
        let text = TransportError::Endpoint {
            addr: "a b:1".to_owned(),
            error,
        }
        .to_string();
        assert!(text.starts_with("endpoint a b:1: "), "{text}");
        let parts = text.split(": ").count();
        assert!(parts >= 3, "the source's detail is missing: {text}");
    }

    #[test]
    fn a_cause_is_in_the_message_and_not_repeated_as_source() {
        let error = TransportError::Read {
            file: TlsFile::Cert,
            path: "/x/nope.pem".into(),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(
            error.to_string(),
            "cannot read certificate /x/nope.pem: entity not found"
        );
        assert!(std::error::Error::source(&error).is_none());
        let error = TransportError::Config {
            file: TlsFile::Cert,
            path: "/x/c.pem".into(),
            error: rustls::Error::General("boom".into()),
        };
        assert!(std::error::Error::source(&error).is_none());
    }
}
