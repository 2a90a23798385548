//! trmx-certs: the federation PKI of trmx (DESIGN.md §2).
//!
//! One federation CA signs every certificate. Each certificate carries exactly one
//! SPIFFE-style URI SAN saying who it is — `spiffe://<td>/participant/<ID>` for a node,
//! `/operator/<name>` for an operator, `/broker/<name>` (plus DNS/IP SANs) for a broker.
//! Brokers and nodes load the CA certificate and the CRL with the helpers in [`pem`], and
//! derive a peer's identity from its verified certificate with [`Identity::from_der`].
//!
//! Modules:
//! - [`identity`] — [`Role`], [`Identity`] and the validators of participant ids, names and
//!   trust domains; parses the URI SAN out of a DER certificate;
//! - [`info`] — [`CertInfo`]: identity, serial, validity, issuer, names of a certificate;
//! - [`ca`] — [`Ca`], a CA directory (`ca.pem`, `ca.key`, `crl.pem`, `index.json`): `init`,
//!   `open`, `issue`, `revoke` (by file, serial or identity), `write_crl`, `renew`, `issued`; every
//!   change holds the directory's `ca.lock`, so concurrent runs lose nothing. [`CaView`] opens
//!   the same directory read-only, never touching `ca.key` (`list`, `show --dir`);
//! - [`federation`] — [`Federation`], a CA plus certificates in one directory for tests
//!   and demos;
//! - [`request`] — [`CertRequest`]: an organisation's own key and certificate signing
//!   request, so that its private key never travels; the CA certifies only its public key;
//! - [`pem`] — `load_certs_pem`, `load_key_pem`, `load_crls_pem` for rustls,
//!   `read_key_file` (refuses a key other users may read; the broker and nodes use it too),
//!   the atomic writer used for every file (keys created `0600`), and the pair writer that
//!   replaces a key and its certificate together;
//! - [`error`] — [`CertError`], the crate's one error type (one-line messages).
//!
//! The `trmx-certs` binary (`src/main.rs`) is a thin clap front end over [`Ca`].

pub mod ca;
pub mod error;
pub mod federation;
pub mod identity;
pub mod info;
pub mod pem;
pub mod request;

use std::time::SystemTime;

pub use ca::{
    CLOCK_SKEW_ALLOWANCE, Ca, CaOptions, CaView, CertPaths, DEFAULT_CA_VALIDITY_DAYS,
    DEFAULT_CRL_NEXT_UPDATE, DEFAULT_VALIDITY_DAYS, IssueSpec, Issued, IssuedCert, LOCK_WAIT,
    Renewal, Revocation,
};
pub use error::CertError;
pub use federation::Federation;
pub use identity::{Identity, Role, validate_name, validate_participant_id, validate_trust_domain};
pub use info::{CertInfo, NOT_VALID_YET_WARN, NotValidYet};
pub use pem::{
    KEY_MODE_FORBIDDEN, KeyFile, load_certs_pem, load_crls_pem, load_key_pem, read_key_file,
};
pub use request::{CertRequest, KeptKey, RequestPaths, key_fingerprint};

/// RFC 3339 in UTC, seconds precision (`2025-03-01T12:00:00Z`).
pub fn format_time(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::from(t));
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{dt}"))
}

/// An index time (Unix seconds, as in [`IssuedCert`]) as a [`SystemTime`].
pub fn from_unix_seconds(secs: i64) -> SystemTime {
    let d = std::time::Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH - d
    }
}
