//! The federation CA: a directory holding the CA certificate and key, the index of issued
//! certificates and the current CRL.
//!
//! # Layout of a CA directory
//! - `ca.pem` — the CA certificate (the trust anchor every broker and node loads);
//! - `ca.key` — the CA's private key, mode `0600`;
//! - `crl.pem` — the current CRL, rewritten on every revocation and by `write_crl`;
//! - `index.json` — issued serials with identity, expiry and revocation time, the last CRL
//!   number and the CRL lifetime used on revocation;
//! - `ca.lock` — locked (`flock`) while a run changes the directory (see below).
//!
//! # Invariants
//! - every file is replaced atomically (temporary file + rename), keys are created `0600`;
//!   a new key and its certificate are written together (`pem::write_pair_atomic`): a
//!   failure leaves the old pair;
//! - the CRL number only grows;
//! - a serial once marked revoked stays revoked (and in every later CRL);
//! - every change (issue, revoke, CRL, renew) reads the index, changes it and writes the
//!   index and CRL while holding an exclusive `flock` on `ca.lock`; a second run waits for it
//!   (up to [`LOCK_WAIT`]), so two runs at once never lose each other's changes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::info::normalize_serial;
use crate::pem::{Mode, NewFile, parent_dir, read, write_atomic, write_pair_atomic};
use crate::{CertError, CertInfo, CertRequest, Identity, Role, load_certs_pem};

/// How far `not_before` (and a CRL's `thisUpdate`) is set in the past, so that peers whose
/// clocks run a little behind still accept a certificate issued a moment ago.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// The CRL lifetime used when none was configured: 7 days.
pub const DEFAULT_CRL_NEXT_UPDATE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default validity of a CA certificate, in days (10 years).
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;

/// Default validity of broker, node and operator certificates, in days.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// How long a change to a CA directory waits for another run to release `ca.lock`.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Longest validity accepted for any certificate, in days (100 years).
const MAX_VALIDITY_DAYS: u32 = 36_500;

const DAY: u64 = 24 * 3600;

/// Options of [`Ca::init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaOptions {
    /// The SPIFFE trust domain of the federation, e.g. `trm.example`.
    pub trust_domain: String,
    /// The CA's common name, e.g. `TRM Federation CA`.
    pub name: String,
    /// How long the CA certificate is valid, in days.
    pub validity_days: u32,
    /// Replace an existing CA in the directory (its index and CRL start afresh).
    pub force: bool,
}

impl CaOptions {
    /// Options with the default validity and without `force`.
    pub fn new(trust_domain: &str, name: &str) -> CaOptions {
        CaOptions {
            trust_domain: trust_domain.to_string(),
            name: name.to_string(),
            validity_days: DEFAULT_CA_VALIDITY_DAYS,
            force: false,
        }
    }
}

/// What to put in a new certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueSpec {
    /// Who the certificate is for.
    pub role: Role,
    /// DNS name SANs (brokers only).
    pub dns_names: Vec<String>,
    /// IP address SANs (brokers only).
    pub ips: Vec<IpAddr>,
    /// Validity in days from now.
    pub validity_days: u32,
}

impl IssueSpec {
    /// A node certificate for a participant id, default validity.
    pub fn participant(id: &str) -> IssueSpec {
        IssueSpec::for_role(Role::Participant(id.to_string()))
    }

    /// An operator certificate, default validity.
    pub fn operator(name: &str) -> IssueSpec {
        IssueSpec::for_role(Role::Operator(name.to_string()))
    }

    /// A broker certificate with its DNS names and IPs, default validity.
    pub fn broker(name: &str, dns_names: Vec<String>, ips: Vec<IpAddr>) -> IssueSpec {
        IssueSpec {
            dns_names,
            ips,
            ..IssueSpec::for_role(Role::Broker(name.to_string()))
        }
    }

    fn for_role(role: Role) -> IssueSpec {
        IssueSpec {
            role,
            dns_names: Vec::new(),
            ips: Vec::new(),
            validity_days: DEFAULT_VALIDITY_DAYS,
        }
    }
}

/// Where a certificate and its key live (PEM files; the key is mode `0600`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertPaths {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PKCS#8 PEM.
    pub key: PathBuf,
}

impl CertPaths {
    /// `<prefix>.pem` and `<prefix>.key`.
    pub fn from_prefix(prefix: &Path) -> CertPaths {
        CertPaths {
            cert: crate::pem::suffixed(prefix, ".pem"),
            key: crate::pem::suffixed(prefix, ".key"),
        }
    }

    /// The certificate file and the key file next to it (same name, extension `.key`).
    pub fn for_cert(cert: &Path) -> CertPaths {
        CertPaths {
            cert: cert.to_path_buf(),
            key: cert.with_extension("key"),
        }
    }
}

/// One certificate in the CA's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedCert {
    /// Serial, lower-case hex.
    pub serial: String,
    /// The SPIFFE URI.
    pub identity: String,
    /// Issue time, Unix seconds.
    pub issued_at: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Revocation time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// Serial of the certificate that renewed this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_by: Option<String>,
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The index entry, now revoked (`revoked_at` is the first revocation's time).
    pub cert: IssuedCert,
    /// It was revoked before this call; only the CRL was rewritten.
    pub already_revoked: bool,
}

/// What [`Ca::issue_with`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The new certificate.
    pub cert: CertInfo,
    /// The certificate of this CA that was in the certificate file and was replaced (with
    /// `force`), read under the CA lock: it stays valid until it expires unless revoked.
    pub replaced: Option<CertInfo>,
}

/// What [`Ca::renew`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The replaced certificate: its files are gone, but it stays valid until it expires
    /// unless its serial is revoked.
    pub old: CertInfo,
    /// The new certificate, now in the certificate file.
    pub new: CertInfo,
    /// When the replaced certificate was revoked, if it was: renewing a revoked certificate
    /// is allowed (a new key after a leak) but should never happen by accident.
    pub old_revoked_at: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    version: u32,
    trust_domain: String,
    /// Number of the last CRL written.
    crl_number: u64,
    /// `nextUpdate - thisUpdate` used when a revocation rewrites the CRL.
    crl_next_update_secs: u64,
    certs: Vec<IssuedCert>,
}

const INDEX_VERSION: u32 = 1;

/// A federation CA directory opened for reading only: the CA certificate and the index,
/// never `ca.key`. Enough to list what the CA issued and to check whether it issued a
/// certificate and revoked it, so an auditor or an operator without access to the key can
/// do that. [`Ca`] is a view plus the key.
pub struct CaView {
    dir: PathBuf,
    trust_domain: String,
    cert_der: CertificateDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    index: Mutex<Index>,
}

impl std::fmt::Debug for CaView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaView")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// An opened federation CA directory, key included: it issues, renews and revokes.
pub struct Ca {
    view: CaView,
    key: KeyPair,
    /// The CA's subject key identifier, used as the CRL's authority key identifier.
    key_id: Vec<u8>,
    /// Where [`Ca::init`] with `force` moved the CA it replaced.
    replaced: Option<PathBuf>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.view.dir)
            .field("trust_domain", &self.view.trust_domain)
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

impl CaView {
    /// Opens an existing CA directory for reading: `ca.pem` and `index.json`, never
    /// `ca.key`. A missing or unreadable file is a one-line error naming it; a directory
    /// with neither `ca.pem` nor `ca.key` (a wrong `--dir`) is [`CertError::NoCa`].
    pub fn open(dir: &Path) -> Result<CaView, CertError> {
        refuse_no_ca(dir)?;
        CaView::read(dir)
    }

    fn read(dir: &Path) -> Result<CaView, CertError> {
        let cert_path = dir.join("ca.pem");
        let index_path = dir.join("index.json");
        let cert_der = load_certs_pem(&cert_path)
            .map_err(|e| rename_what(e, "CA certificate"))?
            .into_iter()
            .next()
            .ok_or_else(|| {
                CertError::parse("CA certificate", &cert_path, "no CERTIFICATE block")
            })?;
        let (_, x509) = X509Certificate::from_der(&cert_der)
            .map_err(|e| CertError::parse("CA certificate", &cert_path, e))?;
        if !x509.is_ca() {
            return Err(CertError::parse(
                "CA certificate",
                &cert_path,
                "not a CA certificate",
            ));
        }
        let not_before = crate::info::system_time(x509.validity().not_before);
        let not_after = crate::info::system_time(x509.validity().not_after);

        let index = load_index(&index_path)?;
        crate::identity::validate_trust_domain(&index.trust_domain)
            .map_err(|e| CertError::parse("CA index", &index_path, e))?;
        Ok(CaView {
            dir: dir.to_path_buf(),
            trust_domain: index.trust_domain.clone(),
            cert_der: cert_der.into_owned(),
            not_before,
            not_after,
            index: Mutex::new(index),
        })
    }

    /// The federation's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/ca.pem`, the trust anchor.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `<dir>/crl.pem`, the current CRL.
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    /// The end of the CA certificate's validity: no certificate it issues may outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The latest time the index records (an issue or a revocation), if any: a clock
    /// behind it has probably been set back.
    pub fn latest_record(&self) -> Option<SystemTime> {
        self.lock()
            .certs
            .iter()
            .flat_map(|c| std::iter::once(c.issued_at).chain(c.revoked_at))
            .max()
            .map(crate::from_unix_seconds)
    }

    /// Refuses a clock (`now`) before the CA certificate's start: either this clock is
    /// behind (and a certificate or CRL dated by it would be expired, or past its
    /// nextUpdate, for every peer whose clock is right) or the CA was made on a clock
    /// ahead; which one cannot be told here, and the error says both.
    fn check_clock(&self, now: SystemTime) -> Result<(), CertError> {
        if now >= self.not_before {
            return Ok(());
        }
        Err(CertError::ClockBeforeCa {
            now,
            ca_not_before: self.not_before,
            ca_cert: self.ca_cert_path(),
        })
    }

    /// The CA certificate, DER.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Reads a certificate file and checks that this CA signed it and that it carries an
    /// identity of this trust domain.
    pub fn verify_issued(&self, cert_pem_path: &Path) -> Result<CertInfo, CertError> {
        let der = load_certs_pem(cert_pem_path)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                CertError::parse("certificate", cert_pem_path, "no CERTIFICATE block")
            })?;
        if der == self.cert_der {
            return Err(CertError::parse(
                "certificate",
                cert_pem_path,
                "it is the CA certificate itself, not one it issued: give a broker, node or \
                 operator certificate (to retire the CA, move to a successor: see CA rollover)",
            ));
        }
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| CertError::parse("certificate", cert_pem_path, e))?;
        let (_, ca) = X509Certificate::from_der(&self.cert_der)
            .map_err(|e| CertError::parse("CA certificate", &self.ca_cert_path(), e))?;
        cert.verify_signature(Some(ca.public_key())).map_err(|_| {
            // (the usual cause: --dir or TRMX_CA_DIR names another CA, e.g. a successor)
            let (issuer, ca_name) = (cert.issuer().to_string(), ca.subject().to_string());
            let whose = if issuer == ca_name {
                format!("it names {issuer} as its issuer, a CA of the same name but another key")
            } else {
                format!("its issuer is {issuer}, and this CA is {ca_name}")
            };
            CertError::NotIssuedByCa {
                path: cert_pem_path.to_path_buf(),
                problem: format!(
                    "{whose}: check that --dir (or TRMX_CA_DIR) is the CA directory that \
                     issued it, not {}",
                    self.dir.display()
                ),
            }
        })?;
        let info = CertInfo::from_x509(&cert).map_err(|e| match e {
            CertError::InvalidIdentity { problem } => {
                CertError::parse("certificate", cert_pem_path, format!("identity: {problem}"))
            }
            other => other,
        })?;
        if info.identity.trust_domain != self.trust_domain {
            return Err(CertError::TrustDomainMismatch {
                expected: self.trust_domain.clone(),
                found: info.identity.trust_domain,
            });
        }
        Ok(info)
    }

    /// Whether the serial (hex, any case, leading zeros and `:` ignored) is revoked, as of
    /// this CA's last open or change (a long-running process should rely on the CRL).
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        let serial = normalize_serial(serial_hex);
        self.lock()
            .certs
            .iter()
            .any(|c| c.serial == serial && c.revoked_at.is_some())
    }

    /// Every certificate this CA issued, from the index.
    pub fn issued(&self) -> Vec<IssuedCert> {
        self.lock().certs.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Ca {
    /// Creates a CA in `dir` (created `0700` if missing): `ca.pem`, `ca.key` (`0600`), an empty
    /// `index.json` and an empty `crl.pem` valid for [`DEFAULT_CRL_NEXT_UPDATE`]. Refuses
    /// to replace an existing CA unless `opts.force`.
    pub fn init(dir: &Path, opts: &CaOptions) -> Result<Ca, CertError> {
        crate::identity::validate_trust_domain(&opts.trust_domain)?;
        let name = opts.name.trim();
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(CertError::InvalidArgument {
                field: "name",
                problem: "expected 1 to 64 printable characters".to_string(),
            });
        }
        check_validity_days(opts.validity_days)?;
        create_dir(dir)?;
        let (cert_path, key_path, index_path) = (
            dir.join("ca.pem"),
            dir.join("ca.key"),
            dir.join("index.json"),
        );
        // (a CA key is never destroyed: with `force` the CA it replaces is moved aside)
        let lock = DirLock::acquire(dir, LOCK_WAIT)?;
        let replaced = if opts.force {
            retire_ca(dir)?
        } else {
            for p in [&cert_path, &key_path, &index_path] {
                refuse_existing(p).map_err(|e| match e {
                    CertError::AlreadyExists { path } => CertError::CaExists {
                        path,
                        dir: dir.to_path_buf(),
                    },
                    e => e,
                })?;
            }
            None
        };

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(CertError::generate("CA key"))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, opts.trust_domain.as_str());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = OffsetDateTime::from(now + days(opts.validity_days));
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(CertError::generate("CA certificate"))?;

        write_atomic(
            "CA key",
            &key_path,
            key.serialize_pem().as_bytes(),
            Mode::Secret,
            opts.force,
        )?;
        write_atomic(
            "CA certificate",
            &cert_path,
            cert.pem().as_bytes(),
            Mode::Public,
            opts.force,
        )?;
        let index = Index {
            version: INDEX_VERSION,
            trust_domain: opts.trust_domain.clone(),
            crl_number: 0,
            crl_next_update_secs: DEFAULT_CRL_NEXT_UPDATE.as_secs(),
            certs: Vec::new(),
        };
        save_index(&index_path, &index)?;
        let mut ca = Ca::open(dir)?;
        ca.replaced = replaced;
        ca.write_crl_locked(&lock, DEFAULT_CRL_NEXT_UPDATE)?;
        Ok(ca)
    }

    /// Opens an existing CA directory, key included. A missing or unreadable file is a
    /// one-line error naming it (`cannot read CA key /x/ca.key: No such file or directory`);
    /// a directory with neither `ca.pem` nor `ca.key` (a wrong `--dir`) is
    /// [`CertError::NoCa`]. To read without the key, use [`CaView::open`].
    pub fn open(dir: &Path) -> Result<Ca, CertError> {
        refuse_no_ca(dir)?;
        let key_path = dir.join("ca.key");
        let key_pem = crate::pem::read_secret("CA key", &key_path)?;
        let key_pem = String::from_utf8(key_pem)
            .map_err(|_| CertError::parse("CA key", &key_path, "not UTF-8 PEM"))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| CertError::parse("CA key", &key_path, e))?;

        let view = CaView::read(dir)?;
        let cert_path = view.ca_cert_path();
        let (_, x509) = X509Certificate::from_der(&view.cert_der)
            .map_err(|e| CertError::parse("CA certificate", &cert_path, e))?;
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(CertError::parse(
                "CA key",
                &key_path,
                format!(
                    "it does not belong to the certificate {}",
                    cert_path.display()
                ),
            ));
        }
        let key_id = x509
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(kid) => Some(kid.0.to_vec()),
                _ => None,
            })
            .ok_or_else(|| {
                CertError::parse("CA certificate", &cert_path, "no subject key identifier")
            })?;
        Ok(Ca {
            view,
            key,
            key_id,
            replaced: None,
        })
    }

    /// The read-only part of this CA: certificate, trust domain, index.
    pub fn view(&self) -> &CaView {
        &self.view
    }

    /// Where [`Ca::init`] with `force` moved the files of the CA it replaced (`None` when
    /// there was none, and for a CA opened with [`Ca::open`]).
    pub fn replaced(&self) -> Option<&Path> {
        self.replaced.as_deref()
    }

    /// The federation's trust domain.
    pub fn trust_domain(&self) -> &str {
        self.view.trust_domain()
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        self.view.dir()
    }

    /// `<dir>/ca.pem`, the trust anchor.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.view.ca_cert_path()
    }

    /// `<dir>/crl.pem`, the current CRL.
    pub fn crl_path(&self) -> PathBuf {
        self.view.crl_path()
    }

    fn index_path(&self) -> PathBuf {
        self.view.index_path()
    }

    /// The end of the CA certificate's validity: no certificate it issues may outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.view.not_after()
    }

    /// The CA certificate, DER.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        self.view.ca_cert_der()
    }

    /// Issues a certificate for `spec` and writes it to `out` (key `0600`). Refuses to
    /// overwrite either file unless `force`; on refusal nothing is written.
    ///
    /// Refuses a system clock before the CA certificate's start ([`CertError::ClockBeforeCa`]):
    /// what it dated would be expired for everyone else.
    pub fn issue(
        &self,
        spec: &IssueSpec,
        out: &CertPaths,
        force: bool,
    ) -> Result<CertInfo, CertError> {
        self.issue_with(spec, out, None, force)
            .map(|issued| issued.cert)
    }

    /// [`Ca::issue`] with an explicit "now" (for tests of expiry handling), taken as it is:
    /// no check of the clock.
    pub fn issue_at(
        &self,
        spec: &IssueSpec,
        out: &CertPaths,
        force: bool,
        now: SystemTime,
    ) -> Result<CertInfo, CertError> {
        let lock = self.lock_dir()?;
        self.issue_locked(
            &lock,
            spec,
            &out.cert,
            NewKey::Generate(&out.key),
            force,
            now,
        )
        .map(|issued| issued.cert)
    }

    /// Issues a certificate for `spec` to the key of `request` and writes it to `cert`
    /// (no key file: the organisation made its key itself). Only the request's public key
    /// is used; identity, names and validity come from `spec`. Refuses to overwrite `cert`
    /// unless `force`.
    pub fn issue_for_request(
        &self,
        spec: &IssueSpec,
        request: &CertRequest,
        cert: &Path,
        force: bool,
    ) -> Result<CertInfo, CertError> {
        let out = CertPaths::for_cert(cert);
        self.issue_with(spec, &out, Some(request), force)
            .map(|issued| issued.cert)
    }

    /// [`Ca::issue`] (`request` `None`) or [`Ca::issue_for_request`] (only `out.cert` is
    /// written), saying which certificate of this CA it replaced. That is read under the CA
    /// lock: read before it (as the CLI did), two forced issues at once both said they
    /// replaced the certificate that was there first, and the second called the one the
    /// first wrote, which it did replace, "another valid certificate, which this one does
    /// not replace".
    pub fn issue_with(
        &self,
        spec: &IssueSpec,
        out: &CertPaths,
        request: Option<&CertRequest>,
        force: bool,
    ) -> Result<Issued, CertError> {
        let now = SystemTime::now();
        self.view.check_clock(now)?;
        let lock = self.lock_dir()?;
        let key = match request {
            Some(request) => NewKey::Request(request),
            None => NewKey::Generate(&out.key),
        };
        self.issue_locked(&lock, spec, &out.cert, key, force, now)
    }

    fn issue_locked(
        &self,
        lock: &DirLock,
        spec: &IssueSpec,
        cert_path: &Path,
        key: NewKey<'_>,
        force: bool,
        now: SystemTime,
    ) -> Result<Issued, CertError> {
        let identity = Identity::new(&self.view.trust_domain, spec.role.clone())?;
        check_validity_days(spec.validity_days)?;
        let not_after = now + days(spec.validity_days);
        self.check_within_ca(&CERT_WITHIN_CA, now, not_after)?;
        let mut sans = vec![SanType::URI(ia5("URI", identity.spiffe_uri())?)];
        match spec.role {
            Role::Broker(_) => {
                if spec.dns_names.is_empty() && spec.ips.is_empty() {
                    return Err(CertError::InvalidArgument {
                        field: "broker names",
                        problem: "a broker certificate needs at least one DNS name (--dns) or IP \
                                  address (--ip), the address nodes connect to"
                            .to_string(),
                    });
                }
                for d in &spec.dns_names {
                    check_dns_name(d)?;
                    sans.push(SanType::DnsName(ia5("broker DNS name", d.clone())?));
                }
                sans.extend(spec.ips.iter().copied().map(SanType::IpAddress));
            }
            Role::Participant(_) | Role::Operator(_) => {
                if !spec.dns_names.is_empty() || !spec.ips.is_empty() {
                    return Err(CertError::InvalidArgument {
                        field: "dns/ip",
                        problem: "DNS names and IP addresses are only for broker certificates"
                            .to_string(),
                    });
                }
            }
        }
        if !force {
            refuse_existing(cert_path)?;
            if let NewKey::Generate(key_path) = key {
                refuse_existing(key_path)?;
            }
        }
        self.check_targets(cert_path, key)?;
        // (a missing, unreadable or foreign file is replaced too, with nothing to revoke)
        let replaced = if force {
            self.verify_issued(cert_path).ok()
        } else {
            None
        };

        let key = match key {
            NewKey::Generate(path) => Certified::Made(
                Box::new(
                    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                        .map_err(CertError::generate("certificate key"))?,
                ),
                path,
            ),
            NewKey::Request(request) => Certified::Request(request),
        };
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.role.name());
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.view.trust_domain.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, identity.role.kind());
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match spec.role {
            Role::Broker(_) => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Participant(_) | Role::Operator(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.not_before = OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&self.view.cert_der, &self.key)
            .map_err(CertError::generate("issuer from the CA certificate"))?;
        let cert = match &key {
            Certified::Made(key, _) => params.signed_by(key.as_ref(), &issuer),
            Certified::Request(request) => params.signed_by(request.public_key(), &issuer),
        }
        .map_err(CertError::generate("certificate"))?;
        let info = CertInfo::from_der(cert.der())?;

        let key_path = match &key {
            Certified::Made(_, path) => Some(*path),
            Certified::Request(_) => None,
        };
        for path in std::iter::once(cert_path).chain(key_path) {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| CertError::io("create directory", parent, e))?;
            }
        }
        // The index first: a crash after the files are in place must not leave a
        // certificate in use that `list` does not show and its serial cannot revoke. A
        // crash before they are in place leaves an entry for a certificate never
        // installed, which is harmless (and revocable). A failed write takes it out again.
        let entry = IssuedCert {
            serial: info.serial_hex.clone(),
            identity: identity.spiffe_uri(),
            issued_at: unix(now),
            not_after: unix(info.not_after),
            revoked_at: None,
            renewed_by: None,
        };
        self.update_index(lock, |index| index.certs.push(entry))?;
        if let Err(e) = write_issued(&cert, &key, cert_path, force) {
            let undone = self.update_index(lock, |index| {
                index.certs.retain(|c| c.serial != info.serial_hex);
            });
            return Err(match undone {
                Ok(()) => e,
                Err(undo) => CertError::IndexNotUndone {
                    serial: info.serial_hex,
                    undo: Box::new(undo),
                    cause: Box::new(e),
                },
            });
        }
        Ok(Issued {
            cert: info,
            replaced,
        })
    }

    /// Refuses, before anything is made or recorded, the files an issue or renewal would
    /// write over by mistake: one of this CA's own files (`--out ca/ca --force` or `renew
    /// … --key ca/ca.key` wrote a participant's key over the CA key, and the CA was gone),
    /// one path for both the key and the certificate (the key was lost under the
    /// certificate), a key path holding something other than a private key (`--key` naming
    /// a certificate: it was overwritten by a key), and a certificate path holding a
    /// private key (the two swapped).
    fn check_targets(&self, cert_path: &Path, key: NewKey<'_>) -> Result<(), CertError> {
        let key_path = match key {
            NewKey::Generate(path) => Some(path),
            NewKey::Request(_) => None,
        };
        for path in std::iter::once(cert_path).chain(key_path) {
            if let Some(ca_file) = self.own_file(path) {
                return Err(CertError::CaFileTarget {
                    path: path.to_path_buf(),
                    ca_file,
                });
            }
        }
        let Some(key_path) = key_path else {
            return refuse_holding(cert_path, Holds::PrivateKey);
        };
        if key_path.is_dir() {
            return Err(CertError::InvalidArgument {
                field: "--key",
                problem: format!(
                    "{} is a directory: give the path of the key file itself (e.g. {})",
                    key_path.display(),
                    key_path
                        .join(
                            cert_path
                                .with_extension("key")
                                .file_name()
                                .unwrap_or_default()
                        )
                        .display()
                ),
            });
        }
        if key_path == cert_path || same_file(key_path, cert_path) {
            return Err(CertError::InvalidArgument {
                field: "--key",
                problem: format!(
                    "the key and the certificate would both be written to {}: give the key a \
                     file of its own (--key {})",
                    cert_path.display(),
                    cert_path.with_extension("key").display()
                ),
            });
        }
        refuse_holding(cert_path, Holds::PrivateKey)?;
        refuse_holding(key_path, Holds::NoPrivateKey)
    }

    /// The CA file that `path` is: one of any CA directory's own files ([`ca_file_at`]),
    /// or the same file as one of this CA's under another name (a hard link).
    fn own_file(&self, path: &Path) -> Option<PathBuf> {
        ca_file_at(path).or_else(|| {
            CA_OWN_FILES
                .into_iter()
                .map(|name| self.view.dir.join(name))
                .find(|own| same_file(path, own))
        })
    }

    /// Reads a certificate file and checks that this CA signed it and that it carries an
    /// identity of this trust domain.
    pub fn verify_issued(&self, cert_pem_path: &Path) -> Result<CertInfo, CertError> {
        self.view.verify_issued(cert_pem_path)
    }

    /// Revokes the certificate in `cert_pem_path` (it must have been signed by this CA):
    /// marks it revoked in the index and rewrites the CRL with the configured lifetime.
    /// Revoking twice is harmless (the CRL is rewritten, the first revocation time kept).
    ///
    /// The file is read under the CA lock: a `renew` running at the same time replaces
    /// it, and the certificate revoked is the one the file holds then, not an older one
    /// read while waiting for the lock (which left the renewed certificate valid).
    pub fn revoke(&self, cert_pem_path: &Path) -> Result<Revocation, CertError> {
        self.check_can_sign_crl()?;
        let lock = self.lock_dir()?;
        let info = self.verify_issued(cert_pem_path)?;
        self.revoke_serial_locked(&lock, &info.serial_hex, Some(&info))
    }

    /// Revokes a serial (hex, as `show` and `list` print it; any case, `:` and leading
    /// zeros ignored) that this CA's index knows. Needs no copy of the certificate, so a
    /// certificate replaced by [`Ca::renew`] or a forced [`Ca::issue`] can still be revoked.
    pub fn revoke_serial_hex(&self, serial_hex: &str) -> Result<Revocation, CertError> {
        let serial = normalize_serial(serial_hex);
        if serial_hex
            .trim()
            .trim_start_matches("0x")
            .replace(':', "")
            .is_empty()
        {
            return Err(CertError::InvalidArgument {
                field: "serial",
                problem: "it is empty: give the serial in hex, as `trmx-certs list` shows it"
                    .to_string(),
            });
        }
        if !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CertError::InvalidArgument {
                field: "serial",
                problem: format!("{serial_hex:?} is not hexadecimal"),
            });
        }
        self.revoke_serial(&serial, None)
    }

    /// Revokes every certificate the index lists for `role` in this CA's trust domain (a
    /// participant after a compromise or when it leaves: its renewed certificate and the one
    /// it replaced alike) and rewrites the CRL once. Certificates already revoked are
    /// reported with `already_revoked`. Refuses, changing nothing, when the index lists no
    /// certificate for `role`.
    pub fn revoke_role(&self, role: &Role) -> Result<Vec<Revocation>, CertError> {
        let identity = Identity::new(&self.view.trust_domain, role.clone())?.spiffe_uri();
        self.check_can_sign_crl()?;
        let lock = self.lock_dir()?;
        let index = load_index(&self.index_path())?;
        if !index.certs.iter().any(|c| c.identity == identity) {
            return Err(CertError::UnknownIdentity { identity });
        }
        let now = unix(SystemTime::now());
        let mut revocations = Vec::new();
        self.update_index(&lock, |index| {
            for entry in index.certs.iter_mut().filter(|c| c.identity == identity) {
                let already_revoked = entry.revoked_at.is_some();
                entry.revoked_at.get_or_insert(now);
                revocations.push(Revocation {
                    cert: entry.clone(),
                    already_revoked,
                });
            }
        })?;
        let next = Duration::from_secs(self.lock().crl_next_update_secs);
        let serials: Vec<String> = revocations.iter().map(|r| r.cert.serial.clone()).collect();
        self.write_crl_after_revoking(&lock, next, &serials)?;
        Ok(revocations)
    }

    /// Marks `serial` revoked and rewrites the CRL. `info` is the certificate itself when
    /// the caller has it: a serial missing from the index is then recorded, not refused.
    fn revoke_serial(
        &self,
        serial: &str,
        info: Option<&CertInfo>,
    ) -> Result<Revocation, CertError> {
        self.check_can_sign_crl()?;
        let lock = self.lock_dir()?;
        self.revoke_serial_locked(&lock, serial, info)
    }

    /// [`Ca::revoke_serial`] under the CA lock taken already.
    fn revoke_serial_locked(
        &self,
        lock: &DirLock,
        serial: &str,
        info: Option<&CertInfo>,
    ) -> Result<Revocation, CertError> {
        let now = unix(SystemTime::now());
        let mut outcome = None;
        self.update_index(lock, |index| {
            let entry = match index.certs.iter_mut().find(|c| c.serial == serial) {
                Some(entry) => {
                    let already_revoked = entry.revoked_at.is_some();
                    entry.revoked_at.get_or_insert(now);
                    Some((entry.clone(), already_revoked))
                }
                // signed by us but missing from the index (e.g. an index restored from a
                // backup): record it
                None => info.map(|info| {
                    let entry = IssuedCert {
                        serial: serial.to_string(),
                        identity: info.identity.spiffe_uri(),
                        issued_at: unix(info.not_before),
                        not_after: unix(info.not_after),
                        revoked_at: Some(now),
                        renewed_by: None,
                    };
                    index.certs.push(entry.clone());
                    (entry, false)
                }),
            };
            outcome = entry;
        })?;
        let (cert, already_revoked) = outcome.ok_or_else(|| CertError::UnknownSerial {
            serial: serial.to_string(),
            index: self.index_path(),
        })?;
        // rewritten even when already revoked: it repairs a CRL that a crash between the
        // index update and the CRL write left without this serial
        let next = Duration::from_secs(self.lock().crl_next_update_secs);
        self.write_crl_after_revoking(lock, next, std::slice::from_ref(&cert.serial))?;
        Ok(Revocation {
            cert,
            already_revoked,
        })
    }

    /// Writes a new CRL (next CRL number) listing every revoked serial, valid from now
    /// (minus [`CLOCK_SKEW_ALLOWANCE`]) until now + `next_update`, and remembers
    /// `next_update` for later revocations.
    ///
    /// Refuses a `next_update` past the CA certificate's end, saying how many days still
    /// fit: a CRL cannot vouch for anything after its issuer expires.
    pub fn write_crl(&self, next_update: Duration) -> Result<(), CertError> {
        let now = SystemTime::now();
        self.view.check_clock(now)?;
        self.check_within_ca(&CRL_WITHIN_CA, now, now + next_update)?;
        let lock = self.lock_dir()?;
        self.write_crl_locked(&lock, next_update)
    }

    /// [`Ca::write_crl_locked`] after `serials` were marked revoked in the index: a failure
    /// (disk full, a read-only directory) says that the revocation is recorded but in no
    /// CRL, and how to write that CRL, since `list` and `show --dir` already call it
    /// revoked while no broker knows of it.
    fn write_crl_after_revoking(
        &self,
        lock: &DirLock,
        next_update: Duration,
        serials: &[String],
    ) -> Result<(), CertError> {
        // (only the CRL: `next_update` came from the index, so there is nothing to remember,
        // and an index write failing after the CRL was written would be told as a CRL not
        // written)
        self.write_crl_file_locked(lock, next_update)
            .map_err(|cause| CertError::CrlNotWritten {
                serials: serials.join(", "),
                dir: self.view.dir.clone(),
                cause: Box::new(cause),
            })
    }

    /// [`Ca::write_crl`] under `lock`, for the CRLs that follow a change (`init`, a
    /// revocation) with the remembered `next_update`: near the CA's end their `nextUpdate`
    /// is cut to the CA's, since a revocation must not fail for want of time left.
    fn write_crl_locked(&self, lock: &DirLock, next_update: Duration) -> Result<(), CertError> {
        self.write_crl_file_locked(lock, next_update)?;
        self.update_index(lock, |index| {
            index.crl_next_update_secs = next_update.as_secs();
        })
    }

    /// [`Ca::write_crl_locked`] without remembering `next_update`.
    fn write_crl_file_locked(
        &self,
        lock: &DirLock,
        next_update: Duration,
    ) -> Result<(), CertError> {
        let now = SystemTime::now();
        self.view.check_clock(now)?;
        let until = (now + next_update).min(self.not_after());
        self.write_crl_with_times_locked(lock, now - CLOCK_SKEW_ALLOWANCE, until)
    }

    /// Writes a new CRL with explicit `thisUpdate` / `nextUpdate` (tests use it to make a
    /// CRL that is already past its `nextUpdate`).
    pub fn write_crl_with_times(
        &self,
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<(), CertError> {
        let lock = self.lock_dir()?;
        self.write_crl_with_times_locked(&lock, this_update, next_update)
    }

    fn write_crl_with_times_locked(
        &self,
        _lock: &DirLock,
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<(), CertError> {
        if next_update <= this_update {
            return Err(CertError::InvalidArgument {
                field: "next update",
                problem: "must be after this update".to_string(),
            });
        }
        let mut guard = self.lock();
        let mut index = load_index(&self.index_path())?;
        index.crl_number = index.crl_number.max(guard.crl_number) + 1;
        let revoked_certs = index
            .certs
            .iter()
            .filter_map(|c| {
                let at = c.revoked_at?;
                let bytes = hex_bytes(&c.serial)?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: OffsetDateTime::from_unix_timestamp(at)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: OffsetDateTime::from(this_update),
            next_update: OffsetDateTime::from(next_update),
            crl_number: SerialNumber::from_slice(&index.crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.key_id.clone()),
        };
        let issuer = Issuer::from_ca_cert_der(&self.view.cert_der, &self.key)
            .map_err(CertError::generate("issuer from the CA certificate"))?;
        let crl = params
            .signed_by(&issuer)
            .map_err(CertError::generate("CRL"))?;
        let pem = crl.pem().map_err(CertError::generate("CRL PEM"))?;
        // index first: a crash between the two leaves a CRL number gap, never a reused one
        save_index(&self.index_path(), &index)?;
        write_atomic("CRL", &self.crl_path(), pem.as_bytes(), Mode::Public, true)?;
        *guard = index;
        Ok(())
    }

    /// Issues a fresh certificate with the same identity (and DNS/IP names) as the one in
    /// `cert.cert`, a new key and `validity_days`, replacing both files, and records the new
    /// serial as the old one's `renewed_by`. The old certificate is not revoked: it stays
    /// valid until it expires unless revoked with [`Ca::revoke_serial_hex`] (its serial is
    /// in the returned [`Renewal`]) once the new one is deployed.
    pub fn renew(&self, cert: &CertPaths, validity_days: u32) -> Result<Renewal, CertError> {
        self.renew_with(&cert.cert, NewKey::Generate(&cert.key), validity_days)
    }

    /// [`Ca::renew`] to the key of `request` (the organisation's new key): only the
    /// certificate file is replaced.
    pub fn renew_for_request(
        &self,
        cert: &Path,
        request: &CertRequest,
        validity_days: u32,
    ) -> Result<Renewal, CertError> {
        self.renew_with(cert, NewKey::Request(request), validity_days)
    }

    fn renew_with(
        &self,
        cert: &Path,
        key: NewKey<'_>,
        validity_days: u32,
    ) -> Result<Renewal, CertError> {
        let now = SystemTime::now();
        self.view.check_clock(now)?;
        // The certificate is read and the targets checked under the lock: read before it,
        // two renewals at once both renewed the certificate they had read, the second
        // writing over the first one's new pair and recording itself as the successor of
        // the old serial, so the first new certificate stayed valid with no file and no
        // `renewed_by`, both runs said they replaced the old serial, and the second called
        // the one it replaced "another valid certificate, which this one does not replace".
        // Under the lock the second renews what the first left, as if run after it.
        let lock = self.lock_dir()?;
        let old = self.verify_issued(cert)?;
        // (the CA's own files first: the more precise refusal)
        self.check_targets(cert, key)?;
        if let NewKey::Generate(key_path) = key {
            refuse_foreign_key(key_path, cert, &old)?;
        }
        let spec = IssueSpec {
            role: old.identity.role.clone(),
            dns_names: old.dns_names.clone(),
            ips: old.ips.clone(),
            validity_days,
        };
        let new = self.issue_locked(&lock, &spec, cert, key, true, now)?.cert;
        let mut old_revoked_at = None;
        self.update_index(&lock, |index| {
            if let Some(entry) = index.certs.iter_mut().find(|c| c.serial == old.serial_hex) {
                entry.renewed_by = Some(new.serial_hex.clone());
                old_revoked_at = entry.revoked_at.map(crate::from_unix_seconds);
            }
        })?;
        Ok(Renewal {
            old,
            new,
            old_revoked_at,
        })
    }

    /// Whether the serial (hex, any case, leading zeros and `:` ignored) is revoked, as of
    /// this CA's last open or change (a long-running process should rely on the CRL).
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.view.is_revoked(serial_hex)
    }

    /// Every certificate this CA issued, from the index.
    pub fn issued(&self) -> Vec<IssuedCert> {
        self.view.issued()
    }

    /// [`CaView::latest_record`].
    pub fn latest_record(&self) -> Option<SystemTime> {
        self.view.latest_record()
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.view.lock()
    }

    /// Refuses a revocation, before anything is changed, once the CA has expired: it can
    /// sign no CRL any more (a revocation recorded in the index alone would reach no
    /// one), and every certificate it issued has expired with it.
    fn check_can_sign_crl(&self) -> Result<(), CertError> {
        let ca_end = self.view.not_after;
        let now = SystemTime::now();
        self.view.check_clock(now)?;
        if now < ca_end {
            return Ok(());
        }
        Err(CertError::InvalidArgument {
            field: "CA",
            problem: format!(
                "the CA certificate expired {}: it can sign no CRL any more, and every \
                 certificate it issued expired with it (none may outlive it); revoke with \
                 its successor's directory",
                crate::format_time(ca_end)
            ),
        })
    }

    /// Refuses `until` past the CA certificate's end, with the days that still fit (from
    /// `now`) and the flag to pass them with.
    fn check_within_ca(
        &self,
        limit: &WithinCa,
        now: SystemTime,
        until: SystemTime,
    ) -> Result<(), CertError> {
        let ca_end = self.view.not_after;
        if until <= ca_end {
            return Ok(());
        }
        let left_days = ca_end.duration_since(now).unwrap_or_default().as_secs() / DAY;
        let what_now = if left_days == 0 {
            format!("{}: replace the CA", limit.none_left)
        } else {
            format!(
                "at most {left_days} days remain: pass {} {left_days} or less, and replace the \
                 CA before it expires",
                limit.flag
            )
        };
        Err(CertError::InvalidArgument {
            field: limit.field,
            problem: format!(
                "{} would outlive the CA certificate, which expires {}; {what_now}",
                limit.subject,
                crate::format_time(ca_end)
            ),
        })
    }

    /// Takes `ca.lock`, waiting up to [`LOCK_WAIT`] for another run to release it, and
    /// checks that the directory still holds this CA: one that `init --force` replaced
    /// since [`Ca::open`] must not sign a certificate or a CRL into its successor's files.
    fn lock_dir(&self) -> Result<DirLock, CertError> {
        let lock = DirLock::acquire(&self.view.dir, LOCK_WAIT)?;
        let on_disk = load_certs_pem(&self.ca_cert_path())
            .ok()
            .and_then(|certs| certs.into_iter().next());
        if on_disk.as_ref() != Some(&self.view.cert_der) {
            return Err(CertError::CaReplaced {
                dir: self.view.dir.clone(),
            });
        }
        Ok(lock)
    }

    /// Re-reads the index from disk (another process may have changed it), applies `f`,
    /// saves it and keeps it in memory.
    fn update_index(&self, _lock: &DirLock, f: impl FnOnce(&mut Index)) -> Result<(), CertError> {
        let mut guard = self.lock();
        let mut index = load_index(&self.index_path())?;
        index.crl_number = index.crl_number.max(guard.crl_number);
        f(&mut index);
        save_index(&self.index_path(), &index)?;
        *guard = index;
        Ok(())
    }
}

/// What [`Ca::check_within_ca`] says about something that would outlive the CA.
#[derive(Debug)]
struct WithinCa {
    /// The field in the error.
    field: &'static str,
    /// What would outlive the CA.
    subject: &'static str,
    /// The command-line flag that sets its lifetime in days.
    flag: &'static str,
    /// What to say when not even one day is left.
    none_left: &'static str,
}

/// A certificate's validity ends by the CA's.
const CERT_WITHIN_CA: WithinCa = WithinCa {
    field: "validity days",
    subject: "the certificate",
    flag: "--validity-days",
    none_left: "no certificate can be issued any more",
};

/// A CRL's nextUpdate comes by the CA's end.
const CRL_WITHIN_CA: WithinCa = WithinCa {
    field: "next update days",
    subject: "the CRL (its nextUpdate)",
    flag: "--next-update-days",
    none_left: "no CRL can be written for a day any more",
};

/// Where the key of a new certificate comes from.
#[derive(Debug, Clone, Copy)]
enum NewKey<'a> {
    /// Made here, and written to this path (mode `0600`) next to the certificate.
    Generate(&'a Path),
    /// The organisation's own, from its certificate request: no key file is written.
    Request(&'a CertRequest),
}

/// Writes an issued certificate to `cert_path`, with its key beside it when it was made
/// here.
fn write_issued(
    cert: &rcgen::Certificate,
    key: &Certified<'_>,
    cert_path: &Path,
    force: bool,
) -> Result<(), CertError> {
    let cert_pem = cert.pem();
    let cert_file = NewFile {
        what: "certificate",
        path: cert_path,
        contents: cert_pem.as_bytes(),
        mode: Mode::Public,
    };
    match &key {
        // both or neither: a crash or failure must not leave a new key beside the old
        // certificate (or the reverse); see `write_pair_atomic` for what remains
        Certified::Made(key, key_path) => {
            let key_pem = key.serialize_pem();
            let key_file = NewFile {
                what: "private key",
                path: key_path,
                contents: key_pem.as_bytes(),
                mode: Mode::Secret,
            };
            write_pair_atomic(key_file, cert_file, force)
        }
        Certified::Request(_) => write_atomic(
            cert_file.what,
            cert_file.path,
            cert_file.contents,
            cert_file.mode,
            force,
        ),
    }
}

/// The key a certificate is issued to, once [`NewKey`] is resolved.
enum Certified<'a> {
    /// Made here; to be written to the path.
    Made(Box<KeyPair>, &'a Path),
    /// The organisation's, from its request.
    Request(&'a CertRequest),
}

/// An exclusive `flock` on `<dir>/ca.lock` while a run changes the CA directory. The
/// kernel releases it when the file is closed: when the guard is dropped, and also when a
/// run is killed, so a crash never leaves the directory locked. The file itself stays
/// (removing it could let two runs lock two different files) and holds the last owner's
/// pid, for the error a waiting run reports.
#[derive(Debug)]
struct DirLock {
    /// Closing it releases the lock.
    _file: std::fs::File,
}

impl DirLock {
    fn acquire(dir: &Path, wait: Duration) -> Result<DirLock, CertError> {
        use rustix::fs::{FlockOperation, flock};
        use rustix::io::Errno;
        use std::io::{Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("ca.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| CertError::io("open lock file", &path, e))?;
        let started = std::time::Instant::now();
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(Errno::WOULDBLOCK | Errno::INTR) if started.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(Errno::WOULDBLOCK) => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    return Err(CertError::Locked {
                        owner: describe_owner(owner.trim()),
                        path,
                    });
                }
                Err(e) => return Err(CertError::io("lock", &path, e.into())),
            }
        }
        let owner = format!(
            "pid {} since {}\n",
            std::process::id(),
            crate::format_time(SystemTime::now())
        );
        // only informs a waiting run's error message
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(owner.as_bytes()));
        Ok(DirLock { _file: file })
    }
}

/// What is known of the run holding the lock, from what the lock file says (`pid 1234
/// since …`). The pid in it is the last run's to write it, which need not be the holder's,
/// and the message named a long-gone earlier run's pid as the holder. A pid that is no
/// longer running is said to be that, and what holds the lock then: a run writes its pid
/// at once when it has the lock, and a waiting run reports only after [`LOCK_WAIT`], so
/// the holder is one that writes none here (a program other than trmx-certs, a `flock` of
/// a backup script) or whose pid this machine does not see (another container or machine
/// sharing the directory).
fn describe_owner(recorded: &str) -> String {
    let pid = recorded
        .strip_prefix("pid ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|pid| pid.parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw);
    let Some(pid) = pid else {
        return "its lock file names no process".to_string();
    };
    // (signal 0 only checks: EPERM is a process of another user, still running)
    match rustix::process::test_kill_process(pid) {
        Err(rustix::io::Errno::SRCH) => format!(
            "its lock file says `{recorded}`, a run that has ended here: the lock is held by \
             a process that did not write its pid there, another program (a `flock` of a \
             backup script) or a run in another container or on another machine sharing the \
             directory"
        ),
        _ => format!(
            "its lock file says `{recorded}`, a process still running unless that pid has \
             been reused"
        ),
    }
}

fn load_index(path: &Path) -> Result<Index, CertError> {
    let bytes = read("CA index", path)?;
    let index: Index =
        serde_json::from_slice(&bytes).map_err(|e| CertError::parse("CA index", path, e))?;
    if index.version != INDEX_VERSION {
        return Err(CertError::parse(
            "CA index",
            path,
            format!("unsupported version {}", index.version),
        ));
    }
    Ok(index)
}

fn save_index(path: &Path, index: &Index) -> Result<(), CertError> {
    let mut json =
        serde_json::to_vec_pretty(index).map_err(|e| CertError::parse("CA index", path, e))?;
    json.push(b'\n');
    write_atomic("CA index", path, &json, Mode::Public, true)
}

/// Fails with [`CertError::NoCa`] when `dir` holds neither `ca.pem` nor `ca.key` (a wrong
/// `--dir`), rather than with the name of whichever file is read first.
fn refuse_no_ca(dir: &Path) -> Result<(), CertError> {
    let absent = |name: &str| {
        matches!(std::fs::symlink_metadata(dir.join(name)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    };
    if absent("ca.pem") && absent("ca.key") {
        return Err(CertError::NoCa {
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

fn rename_what(e: CertError, what: &'static str) -> CertError {
    match e {
        CertError::Io { path, source, .. } => CertError::Io {
            action: format!("read {what}"),
            path,
            source,
        },
        CertError::Parse {
            location, problem, ..
        } => CertError::Parse {
            what,
            location,
            problem,
        },
        other => other,
    }
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .map_err(|e| CertError::io("create CA directory", dir, e))
}

/// The files of a CA, moved aside by [`retire_ca`].
const CA_FILES: [&str; 4] = ["ca.key", "ca.pem", "index.json", "crl.pem"];

/// Every file of a CA directory that an issued certificate or key must never replace.
const CA_OWN_FILES: [&str; 5] = ["ca.key", "ca.pem", "index.json", "crl.pem", "ca.lock"];

/// The CA file `path` names, if it names one: a file of [`CA_OWN_FILES`] in a directory
/// that holds a CA (`ca.pem` or `ca.key`), directly or through a symbolic link. Not only
/// the CA at hand's: during a rollover `--out /srv/trmx-ca/ca` would destroy the other
/// CA, and `request` has no CA directory at all.
pub(crate) fn ca_file_at(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let dir = std::fs::canonicalize(parent_dir(path)).ok()?;
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| dir.join(name));
    let target_name = target.file_name()?.to_str()?;
    let target_dir = target.parent()?;
    let holds_ca = ["ca.pem", "ca.key"]
        .into_iter()
        .any(|file| std::fs::symlink_metadata(target_dir.join(file)).is_ok());
    // (any case: on a file system that ignores it, vfat on the CA's USB stick, `--out
    // ca/CA` names ca.key)
    let own = CA_OWN_FILES
        .iter()
        .any(|file| file.eq_ignore_ascii_case(target_name));
    (own && holds_ca).then_some(target)
}

/// Whether `a` and `b` both exist and are the same file (a hard or symbolic link).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Refuses a renewal that would replace the key of another certificate: the key file
/// given (`--key`, or the one beside the certificate) holds a private key, but not the
/// key of `old`, the certificate renewed (`renew NL-NRM.pem --key BE-PAYOKE.key` wrote over
/// BE-PAYOKE's key). A key that cannot be read or parsed here is left to the write.
fn refuse_foreign_key(key_path: &Path, cert: &Path, old: &CertInfo) -> Result<(), CertError> {
    let Ok(pem) = std::fs::read_to_string(key_path) else {
        return Ok(());
    };
    let Ok(key) = KeyPair::from_pem(&pem) else {
        return Ok(());
    };
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    if crate::key_fingerprint(&spki) == old.key_fingerprint {
        return Ok(());
    }
    Err(CertError::InvalidArgument {
        field: "--key",
        problem: format!(
            "{} is not the key of {} (the certificate renewed), and renewing would replace it: \
             give that certificate's key file with --key; if {} is a key no longer used (a \
             certificate issued to a request replaced its certificate), delete it first",
            key_path.display(),
            cert.display(),
            key_path.display()
        ),
    })
}

/// What a file about to be replaced must not hold, for [`refuse_holding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// A certificate's path: a private key there means certificate and key were swapped.
    PrivateKey,
    /// A key's path: anything but a private key there (a certificate, a CRL, a request)
    /// is another file named by mistake.
    NoPrivateKey,
}

/// Refuses to replace the file at `path` when it holds what `holds` rules out. A missing
/// or empty file is fine (nothing is lost), and so is a file that cannot be read here
/// (the write then says why, or replaces what this user may replace anyway).
fn refuse_holding(path: &Path, holds: Holds) -> Result<(), CertError> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(());
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&bytes);
    let labels: Vec<&str> = text
        .split("-----BEGIN ")
        .skip(1)
        .filter_map(|rest| rest.split_once("-----").map(|(label, _)| label))
        .collect();
    let is_key = |label: &&str| label.ends_with("PRIVATE KEY");
    let refused = match holds {
        Holds::PrivateKey => labels.iter().any(is_key),
        Holds::NoPrivateKey => !labels.iter().any(is_key),
    };
    if !refused {
        return Ok(());
    }
    // (a certificate and its key in one file: replaced by the certificate alone, the key
    // in it would be lost)
    let bundle = holds == Holds::PrivateKey && labels.contains(&"CERTIFICATE");
    let found = match labels.first() {
        _ if bundle => "a private key beside its certificate (a bundle)".to_string(),
        Some(&"CERTIFICATE") => "a certificate".to_string(),
        Some(&"X509 CRL") => "a CRL".to_string(),
        Some(&"CERTIFICATE REQUEST") => "a certificate request".to_string(),
        Some(label) if is_key(label) => "a private key".to_string(),
        Some(label) => format!("a PEM {label}"),
        None => "no PEM data".to_string(),
    };
    let (expected, flag) = match holds {
        Holds::PrivateKey if bundle => (
            "a certificate alone",
            "the certificate path: keep the certificate and its key in files of their own",
        ),
        Holds::PrivateKey => (
            "a certificate",
            "the certificate path (are certificate and key swapped?)",
        ),
        Holds::NoPrivateKey => ("a private key", "--key (or --out)"),
    };
    Err(CertError::WrongFileKind {
        path: path.to_path_buf(),
        found,
        expected,
        flag,
    })
}

/// Moves the CA files in `dir` into a new `dir/replaced-<unix seconds>` (mode `0700`):
/// its key signed every certificate still in use, so replacing a CA must not destroy it.
/// Returns that directory, or `None` when `dir` holds no CA file.
fn retire_ca(dir: &Path) -> Result<Option<PathBuf>, CertError> {
    let present: Vec<&str> = CA_FILES
        .into_iter()
        .filter(|name| std::fs::symlink_metadata(dir.join(name)).is_ok())
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let stamp = unix(SystemTime::now());
    let mut target = dir.join(format!("replaced-{stamp}"));
    let mut n = 1;
    loop {
        let mut b = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        match b.create(&target) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                n += 1;
                target = dir.join(format!("replaced-{stamp}-{n}"));
            }
            Err(e) => return Err(CertError::io("create", &target, e)),
        }
    }
    // (a failure part-way names where the files already moved are)
    let moved_to = |e: CertError| CertError::ReplaceIncomplete {
        moved_to: target.clone(),
        cause: Box::new(e),
    };
    for name in present {
        let (from, to) = (dir.join(name), target.join(name));
        std::fs::rename(&from, &to).map_err(|e| moved_to(CertError::io("move aside", &from, e)))?;
    }
    for d in [&target, dir] {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| moved_to(CertError::io("sync", d, e)))?;
    }
    Ok(Some(target))
}

/// Fails with [`CertError::AlreadyExists`] if something is at `path`.
fn refuse_existing(path: &Path) -> Result<(), CertError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(CertError::AlreadyExists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CertError::io("inspect", path, e)),
    }
}

fn check_validity_days(d: u32) -> Result<(), CertError> {
    if (1..=MAX_VALIDITY_DAYS).contains(&d) {
        Ok(())
    } else {
        Err(CertError::InvalidArgument {
            field: "validity days",
            problem: format!("expected 1 to {MAX_VALIDITY_DAYS}, got {d}"),
        })
    }
}

/// A broker's DNS name must be one that TLS clients can match the address they dial
/// against: dot-separated labels of 1 to 63 letters, digits and `-` (not first or last),
/// the leftmost label possibly `*`; at most 253 characters; no port, scheme, path or
/// trailing dot. An IP address is refused with a pointer to `--ip`.
fn check_dns_name(name: &str) -> Result<(), CertError> {
    let invalid = |problem: String| CertError::InvalidArgument {
        field: "broker DNS name",
        problem,
    };
    if name.parse::<IpAddr>().is_ok() {
        return Err(invalid(format!(
            "{name:?} is an IP address: give it with --ip"
        )));
    }
    let label_ok = |(i, label): (usize, &str)| {
        (i == 0 && label == "*")
            || ((1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-'))
    };
    if name.len() > 253 || name == "*" || !name.split('.').enumerate().all(label_ok) {
        return Err(invalid(format!(
            "{name:?} is not a host name: expected labels of letters, digits and '-' separated \
             by dots, like broker.example.eu, without port, scheme, path or trailing dot"
        )));
    }
    Ok(())
}

fn days(d: u32) -> Duration {
    Duration::from_secs(u64::from(d) * DAY)
}

fn ia5(field: &'static str, s: String) -> Result<rcgen::string::Ia5String, CertError> {
    rcgen::string::Ia5String::try_from(s.clone()).map_err(|_| CertError::InvalidArgument {
        field,
        problem: format!("{s:?} is not ASCII"),
    })
}

/// 16 random bytes, most significant bit clear (positive) and second bit set (no leading
/// zero byte, so every serial is exactly 16 bytes long).
fn random_serial() -> Result<SerialNumber, CertError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::InvalidArgument {
            field: "serial",
            problem: "the system random number generator failed".to_string(),
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Ca>();
        assert_send_sync::<crate::Federation>();
    }

    #[test]
    fn serials_are_positive_16_bytes_and_round_trip_through_hex() {
        for _ in 0..50 {
            let s = random_serial().unwrap();
            let bytes = s.to_bytes();
            assert_eq!(bytes.len(), 16);
            assert_eq!(bytes[0] & 0xc0, 0x40);
            let hex = crate::info::serial_hex(&bytes);
            assert_eq!(hex_bytes(&hex).unwrap(), bytes);
            assert_eq!(normalize_serial(&hex.to_uppercase()), hex);
        }
        assert_eq!(hex_bytes("abc"), None);
        assert_eq!(hex_bytes("zz"), None);
    }

    #[test]
    fn a_held_lock_is_waited_for_then_reported_with_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let lock_file = dir.path().join("ca.lock");
        let owner = std::fs::read_to_string(&lock_file).unwrap();
        assert!(owner.starts_with(&format!("pid {} since ", std::process::id())));
        let e = DirLock::acquire(dir.path(), Duration::from_millis(50)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the CA directory is busy: {} is locked by another trmx-certs run or a \
                 program using the trmx-certs library (its lock file says `{}`, a process \
                 still running unless that pid has been reused; `fuser -v {0}` names the \
                 process that holds it); retry once it has finished",
                lock_file.display(),
                owner.trim()
            )
        );
        // The pid in the file is the last run's to write it: an ended run's was named as the
        // holder's, and it was said to be one that had not written its pid yet, which a
        // run does at once, long before a waiting run gives up.
        let mut ended = std::process::Command::new("true").spawn().unwrap();
        ended.wait().unwrap();
        let earlier = format!("pid {} since long ago", ended.id());
        std::fs::write(&lock_file, format!("{earlier}\n")).unwrap();
        let e = DirLock::acquire(dir.path(), Duration::ZERO).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "(its lock file says `{earlier}`, a run that has ended here: the lock is held \
                 by a process that did not write its pid there, another program (a `flock` of \
                 a backup script) or a run in another container or on another machine sharing \
                 the directory; `fuser -v "
            )),
            "{e}"
        );
        std::fs::write(&lock_file, "").unwrap();
        let e = DirLock::acquire(dir.path(), Duration::ZERO).unwrap_err();
        assert!(
            e.to_string()
                .contains("(its lock file names no process; `fuser -v "),
            "{e}"
        );
        // released on drop; a waiting run gets it once released
        let dir_path = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || DirLock::acquire(&dir_path, LOCK_WAIT).is_ok());
        std::thread::sleep(Duration::from_millis(100));
        drop(held);
        assert!(waiter.join().unwrap());
        // the file a killed run leaves behind (its lock went with its process) blocks nobody
        std::fs::write(&lock_file, "pid 1 since long ago\n").unwrap();
        DirLock::acquire(dir.path(), Duration::ZERO).expect("a lock file nobody holds");
    }

    /// `revoke FILE` read the file before it took the CA lock: a `renew` of that file
    /// while it waited for the lock left it revoking the certificate the renewal had just
    /// replaced, and the new one valid. It reads the file under the lock: while another
    /// run holds it, a file not there (yet) is the lock's error, not a read error. (It
    /// waits [`LOCK_WAIT`] for the lock first.)
    #[test]
    fn revoke_reads_the_certificate_file_under_the_ca_lock() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = Ca::init(&ca_dir, &CaOptions::new("trm.example", "TRM Federation CA")).unwrap();
        let held = DirLock::acquire(&ca_dir, Duration::ZERO).unwrap();
        let e = ca.revoke(&dir.path().join("NL-NRM.pem")).unwrap_err();
        assert!(matches!(e, CertError::Locked { .. }), "{e}");
        drop(held);
        let e = ca.revoke(&dir.path().join("NL-NRM.pem")).unwrap_err();
        assert!(matches!(e, CertError::Io { .. }), "{e}");
    }

    #[test]
    fn cert_paths() {
        let p = CertPaths::from_prefix(Path::new("out/NL-NRM"));
        assert_eq!(p.cert, Path::new("out/NL-NRM.pem"));
        assert_eq!(p.key, Path::new("out/NL-NRM.key"));
        let p = CertPaths::for_cert(Path::new("a/b.pem"));
        assert_eq!(p.key, Path::new("a/b.key"));
    }
}
