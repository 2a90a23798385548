//! The server side: a reloadable rustls config and the registry of open connections.
//!
//! # Invariants
//! - Every established [`crate::TlsConn`] has exactly one entry in `Inner::conns`, removed
//!   when the connection is dropped.
//! - A connection whose handshake used an older config than the current one is re-verified
//!   against the current verifier when it registers, so a reload racing a handshake cannot
//!   let a revoked certificate through (see `ServerTls::register`).
//! - Reloads run one at a time (`Inner::reloads`, held from reading the files to the
//!   last check of open connections), so the config in force is always built from the
//!   files as the latest reload read them, and generations strictly increase: the `n`th
//!   successful reload stores generation `n`.
//! - A CRL file in force holds at most one CRL per CA (webpki would enforce the first
//!   only).
//! - With a [`CrlRecord`], no CRL in force is older than the one recorded for its CA, nor
//!   another CRL under its number, and the record (in memory, and in its file once
//!   [`ServerTls::save_crl_record`] was called) holds every CRL put in force.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use futures::task::AtomicWaker;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::listener::{HandshakeFailure, HandshakeFailures};
use crate::{CrlRecord, TlsClock, TlsFile, TransportError, pem};

/// Where a party's TLS material lives (all PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// The federation CA certificate (the only trust anchor).
    pub ca: PathBuf,
    /// This party's certificate (chain, leaf first).
    pub cert: PathBuf,
    /// This party's private key.
    pub key: PathBuf,
}

/// What to do when the CRL is past its `nextUpdate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrlPolicy {
    /// Keep accepting; log a warning and report the CRL as stale.
    #[default]
    Warn,
    /// Refuse new handshakes (and, on reload, close open connections) until a fresh CRL is loaded.
    Strict,
}

/// The freshness of the loaded CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlStatus {
    /// The earliest `nextUpdate` of the loaded CRLs; `None` when no CRL is configured.
    pub next_update: Option<SystemTime>,
    /// `true` when `next_update` has passed.
    pub stale: bool,
}

impl CrlStatus {
    fn at(next_update: Option<SystemTime>, now: SystemTime) -> CrlStatus {
        CrlStatus {
            next_update,
            stale: next_update.is_some_and(|next| now >= next),
        }
    }
}

/// What a [`ServerTls::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Open connections ordered closed because their peer certificate no longer verifies.
    pub closed_connections: usize,
    /// Who they were: the identity in the certificate (`participant BE-PAYOKE`, `operator
    /// alice`; the subject when it holds none) and the peer's address, one per connection.
    pub closed: Vec<String>,
    /// The generation of the config now in force: 0 for the one [`ServerTls::load`] built,
    /// one more for every successful reload (reloads never run concurrently).
    pub generation: u64,
    /// The freshness of the CRL now loaded.
    pub crl: CrlStatus,
    /// Why the certificate file's certificate was not taken up though the rest of the
    /// reload was ([`TransportError::NotValidYet`]: the one in force stays; logged).
    pub certificate_refused: Option<String>,
}

/// The server's TLS state: the current rustls config (swapped on reload) and the open
/// connections. Cheap to clone; all clones share the same state.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Inner>,
}

struct Inner {
    paths: TlsPaths,
    crl_path: Option<PathBuf>,
    policy: CrlPolicy,
    state: ArcSwap<Loaded>,
    /// Held for a whole [`ServerTls::reload`]. Without it a reload that read the old CRL
    /// could store its config after one that read the new CRL, and both would carry the
    /// same generation (so `register` would skip its re-check).
    reloads: Mutex<Reloads>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_conn: AtomicU64,
    handshake_failures: HandshakeFailures,
    /// Whether the last write of the CRL record failed (see [`ServerTls::crl_record_saved`]).
    record_unsaved: std::sync::atomic::AtomicBool,
    /// The time certificates and CRLs are checked at (see [`ServerTls::load_with_clock`]).
    clock: TlsClock,
}

/// What the reloads share, behind the lock they hold one after the other.
struct Reloads {
    /// The newest CRL of each CA accepted, when the server keeps a record of them.
    record: Option<CrlRecord>,
    /// Whether a reload writes `record` to its file: from the first
    /// [`ServerTls::save_crl_record`] on.
    saving: bool,
}

/// One loaded generation of TLS material.
pub(crate) struct Loaded {
    pub(crate) config: Arc<ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    crl_next_update: Option<SystemTime>,
    /// How recent each loaded CRL is, so that a reload can refuse an older one.
    crl_versions: Vec<pem::CrlVersion>,
    generation: u64,
    /// The certificate chain and key `config` presents, which a reload keeps when the
    /// files' certificate is not valid yet.
    certified: Arc<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl Loaded {
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

struct ConnEntry {
    certs: Arc<Vec<CertificateDer<'static>>>,
    peer: SocketAddr,
    close: Arc<CloseSignal>,
}

/// The order to close one connection, observed by its [`crate::TlsConn`].
#[derive(Debug, Default)]
pub(crate) struct CloseSignal {
    closed: AtomicBool,
    pub(crate) read_waker: AtomicWaker,
    pub(crate) write_waker: AtomicWaker,
}

impl CloseSignal {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.read_waker.wake();
        self.write_waker.wake();
    }
}

/// Removes a connection from the registry when dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    tls: ServerTls,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tls.inner.conns().remove(&self.id);
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("paths", &self.inner.paths)
            .field("crl", &self.inner.crl_path)
            .field("policy", &self.inner.policy)
            .field("open_connections", &self.open_connections())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn reloads(&self) -> MutexGuard<'_, Reloads> {
        // A panic in an earlier reload left nothing half-done behind this lock (the state
        // is swapped in one store, the record file replaced in one rename), so a poisoned
        // lock is still usable.
        self.reloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        // A panic while holding this lock cannot leave the map inconsistent (single
        // insert/remove calls), so a poisoned lock is still usable.
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(
    paths: &TlsPaths,
    crl: Option<&Path>,
    policy: CrlPolicy,
    generation: u64,
    clock: &TlsClock,
    in_force: Option<&Loaded>,
) -> Result<(Loaded, Option<TransportError>), TransportError> {
    let roots = pem::roots(&paths.ca)?;
    let crls = crl.map(pem::crls).transpose()?;
    let mut chain = pem::certs(TlsFile::Cert, &paths.cert)?;
    let mut key = pem::key(&paths.key)?;
    if let (Some(path), Some(crls)) = (crl, crls.as_ref()) {
        check_one_crl_per_ca(path, &crls.versions)?;
        check_crls_cover_cas(paths, path, crls)?;
    }
    check_own_certificate(paths, &roots, &chain, crl.zip(crls.as_ref()))?;
    // (at load, the caller's start applies this rule itself, with its config's names)
    let mut refused = None;
    if let Some(in_force) = in_force
        && let Some(leaf) = chain.first()
        && let Err(error) = check_own_not_valid_yet(&paths.cert, leaf, clock.now(), "clients")
    {
        // The CA and CRL files are taken up all the same, with the certificate in
        // force: a renewal issued early must not hold back the revocations of a CRL
        // installed beside it (it would, at every reload, until the certificate is valid).
        let (in_force_chain, in_force_key) = &*in_force.certified;
        chain = in_force_chain.clone();
        key = in_force_key.clone_key();
        check_own_certificate(paths, &roots, &chain, crl.zip(crls.as_ref()))?;
        refused = Some(error);
    }
    let certified = Arc::new((chain.clone(), key.clone_key()));

    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let mut crl_next_update = None;
    let mut crl_versions = Vec::new();
    if let Some(crls) = crls {
        builder = builder.with_crls(crls.ders);
        crl_next_update = crls.next_update;
        crl_versions = crls.versions;
    }
    if policy == CrlPolicy::Strict {
        builder = builder.enforce_revocation_expiration();
    }
    let verifier = builder.build().map_err(|error| match crl {
        Some(crl) => TransportError::Verifier {
            file: TlsFile::Crl,
            path: crl.to_owned(),
            error,
        },
        None => TransportError::Verifier {
            file: TlsFile::Ca,
            path: paths.ca.clone(),
            error,
        },
    })?;

    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TransportError::Config {
            file: TlsFile::Cert,
            path: paths.cert.clone(),
            error,
        })?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|error| certified_key_error(paths, error))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.time_provider = clock.provider();
    // No resumption: a resumed session skips client-certificate verification, which
    // would let a since-revoked certificate back in without meeting the new CRL.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;

    Ok((
        Loaded {
            config: Arc::new(config),
            verifier,
            crl_next_update,
            crl_versions,
            generation,
            certified,
        },
        refused,
    ))
}

/// Refuses a CRL file that holds two CRLs of one CA (a new CRL appended to the file, not
/// put in its place): webpki checks a certificate against the first CRL of its issuer
/// only, so the revocations of the other would silently not be in force, while the CRL
/// record took the newer as the one in force.
pub(crate) fn check_one_crl_per_ca(
    crl: &Path,
    crls: &[pem::CrlVersion],
) -> Result<(), TransportError> {
    for (i, found) in crls.iter().enumerate() {
        if crls[..i].iter().any(|before| before.same_ca(found)) {
            return Err(TransportError::CrlTwoOfOneCa {
                path: crl.to_owned(),
                issuer: found.issuer_name.as_str().into(),
            });
        }
    }
    Ok(())
}

/// Refuses a CRL older than the one in force for the same CA: a crl.pem restored from a
/// backup (or an old copy deployed by mistake) would silently un-revoke every certificate
/// revoked since, and a revoked key that leaked would get back in. So is another CRL under
/// the number of the one in force (a CA restored from a backup issues it again, without
/// the revocations made since). A CA new to the file (a rollover) has nothing to compare
/// with; a CA gone from it is not checked.
fn check_crls_not_older(
    crl: &Path,
    loaded: &[pem::CrlVersion],
    new: &[pem::CrlVersion],
) -> Result<(), TransportError> {
    for found in new {
        let Some(in_force) = loaded.iter().find(|old| old.issuer == found.issuer) else {
            continue;
        };
        match found.standing(in_force) {
            pem::Standing::NotOlder => {}
            pem::Standing::Older => {
                return Err(TransportError::CrlOlder {
                    path: crl.to_owned(),
                    issuer: found.issuer_name.clone(),
                    comparison: format!(
                        "{} < {}",
                        found.describe(in_force),
                        in_force.describe(found)
                    ),
                });
            }
            pem::Standing::Reissued => {
                return Err(TransportError::CrlReissued {
                    path: crl.to_owned(),
                    issuer: found.issuer_name.as_str().into(),
                    version: found.describe(in_force).into(),
                    record: None,
                });
            }
        }
    }
    Ok(())
}

/// The error for rustls refusing `paths`' certificate and key together: a key that is not
/// the certificate's names both files.
pub(crate) fn certified_key_error(paths: &TlsPaths, error: rustls::Error) -> TransportError {
    match error {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TransportError::KeyMismatch {
                cert: paths.cert.clone(),
                key: paths.key.clone(),
            }
        }
        error => TransportError::Config {
            file: TlsFile::Cert,
            path: paths.cert.clone(),
            error,
        },
    }
}

/// Checks what a CA file of several CAs (two during a CA rollover) needs once CRLs are
/// configured, on the broker and on a node alike:
/// - no two CAs (different keys) of the same name: webpki checks a certificate against the
///   first CRL naming its issuer, so the clients of one of them would all be refused (and
///   the server's certificate too, when it is theirs), the CRL's signature not verifying;
/// - a CRL of every CA: rustls refuses a client whose revocation status is unknown, so a
///   CA without its CRL would have every client it issued refused.
///
/// A CRL of another CA is the business of [`check_own_certificate`].
pub(crate) fn check_crls_cover_cas(
    paths: &TlsPaths,
    crl: &Path,
    crls: &pem::Crls,
) -> Result<(), TransportError> {
    let cas = pem::certs(TlsFile::Ca, &paths.ca)?;
    let mut issuers = Vec::with_capacity(crls.ders.len());
    for der in &crls.ders {
        let (_, parsed) =
            x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| TransportError::Invalid {
                file: TlsFile::Crl,
                path: crl.to_owned(),
                reason: e.to_string(),
            })?;
        issuers.push(parsed.issuer().as_raw().to_vec());
    }
    let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(cas.len());
    for der in &cas {
        let (_, ca) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
            TransportError::Invalid {
                file: TlsFile::Ca,
                path: paths.ca.clone(),
                reason: e.to_string(),
            }
        })?;
        let name = ca.subject();
        let key = ca.public_key().raw;
        if seen
            .iter()
            .any(|(other_name, other_key)| other_name == name.as_raw() && other_key != key)
        {
            return Err(TransportError::Invalid {
                file: TlsFile::Ca,
                path: paths.ca.clone(),
                reason: format!(
                    "two CAs are named {name}: with CRLs, the certificates of one of them \
                     would all be refused; give the new CA another name (trmx-certs init --name)"
                ),
            });
        }
        seen.push((name.as_raw().to_vec(), key.to_vec()));
        if !issuers
            .iter()
            .any(|issuer| issuer.as_slice() == name.as_raw())
        {
            return Err(TransportError::CrlNotFromCa {
                crl: crl.to_owned(),
                ca: paths.ca.clone(),
                reason: format!(
                    "it holds no CRL of the CA {name}, so every certificate that CA issued \
                     would be refused; add that CA's CRL (cat its crl.pem into the file)"
                ),
            });
        }
    }
    Ok(())
}

/// Checks at load time what would otherwise only show in handshakes, as refused clients
/// with no word why:
/// - the server's certificate chains to the CA (the clients' only trust anchor);
/// - its extended key usage allows serverAuth (a node certificate does not);
/// - the CRLs, if any, tell its revocation status the way the client verifier tells a
///   client's: a CRL the CA did not issue (another CA's, or one whose signature does not
///   verify) leaves every status unknown, and the verifier refuses every client.
///
/// Expiry is left to the caller's monitoring (and a renewal plus reload): an expired or
/// not yet valid certificate is checked as of a moment it is valid (a reload then applies
/// [`check_own_not_valid_yet`], and a start its caller's own check). A certificate the CRL
/// revokes is logged, not refused (see below).
fn check_own_certificate(
    paths: &TlsPaths,
    roots: &RootCertStore,
    chain: &[CertificateDer<'static>],
    crl: Option<(&Path, &pem::Crls)>,
) -> Result<(), TransportError> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Ok(()); // `pem::certs` returns at least one
    };
    let invalid = |file: TlsFile, path: &Path, reason: String| TransportError::Invalid {
        file,
        path: path.to_owned(),
        reason,
    };
    let end_entity = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| invalid(TlsFile::Cert, &paths.cert, format!("{e:?}")))?;
    let crls = match crl {
        Some((path, crls)) => crls
            .ders
            .iter()
            .map(|der| webpki::BorrowedCertRevocationList::from_der(der.as_ref()).map(Into::into))
            .collect::<Result<Vec<webpki::CertRevocationList<'_>>, _>>()
            .map_err(|e| invalid(TlsFile::Crl, path, format!("{e:?}")))?,
        None => Vec::new(),
    };
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
    // as rustls' client verifier does by default: every certificate of the chain, unknown
    // status refused; staleness is the CRL policy's business, not this check's
    let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs)
        .ok()
        .map(|options| {
            options
                .with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(webpki::UnknownStatusPolicy::Deny)
                .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                .build()
        });
    let provider = provider();
    let verify = |at: UnixTime| {
        end_entity
            .verify_for_usage(
                provider.signature_verification_algorithms.all,
                &roots.roots,
                intermediates,
                at,
                webpki::KeyUsage::server_auth(),
                revocation,
                None,
            )
            .map(drop)
    };
    let checked = match verify(UnixTime::now()) {
        Err(webpki::Error::CertExpired { not_after, .. }) => verify(not_after),
        Err(webpki::Error::CertNotValidYet { not_before, .. }) => verify(not_before),
        checked => checked,
    };
    match checked {
        // A CRL of the CA, but none of an intermediate CA in the broker's chain: the
        // clients the CA issued are checked as they should be, so a warning only.
        Err(webpki::Error::UnknownRevocationStatus)
            if crl_refs.iter().any(|crl| {
                roots
                    .roots
                    .iter()
                    .any(|root| root.subject.as_ref() == crl.issuer())
            }) =>
        {
            tracing::warn!(
                cert = %paths.cert.display(),
                crl = %crl.map_or_else(String::new, |(path, _)| path.display().to_string()),
                "the CRL file holds the CA's CRL but none of an intermediate CA of the server's \
                 certificate chain: clients that check the CRL cannot check the server's \
                 certificate; add the intermediate's CRL"
            );
            Ok(())
        }
        // Not refused: a reload that failed on it would keep the old CRL, and so let in
        // the clients revoked with it, until the new certificate is in place.
        Err(webpki::Error::CertRevoked) => {
            tracing::warn!(
                cert = %paths.cert.display(),
                "the server's certificate is revoked by the CRL: clients that read the CRL \
                 refuse it; install a new certificate and reload"
            );
            Ok(())
        }
        checked => {
            checked.map_err(|error| own_certificate_error(paths, crl.map(|(path, _)| path), error))
        }
    }
}

/// A renewed certificate of this party's own, read by a reload, that is not valid yet
/// at `now`, by the rule of the brokers' and nodes' start: beyond
/// [`trmx_certs::NOT_VALID_YET_WARN`] it is refused ([`TransportError::NotValidYet`], so
/// the one in force stays), since every peer with a right clock would refuse it at the
/// handshake until then; within, it is taken up with a warning (it becomes valid by
/// itself within minutes). The reload checked the rest of it as of a moment it is
/// valid. `peers` are those who verify it, for the message.
pub(crate) fn check_own_not_valid_yet(
    cert: &Path,
    leaf: &CertificateDer<'_>,
    now: SystemTime,
    peers: &str,
) -> Result<(), TransportError> {
    // (a certificate trmx_certs cannot read back is left to the handshake checks)
    let Ok(info) = trmx_certs::CertInfo::from_der(leaf) else {
        return Ok(());
    };
    let Some(not_yet) = info.not_valid_yet(now, peers) else {
        return Ok(());
    };
    if !not_yet.warn_only {
        return Err(TransportError::NotValidYet {
            cert: cert.to_owned(),
            reason: format!("serial {}: {}", info.serial_hex, not_yet.message),
        });
    }
    tracing::warn!(
        cert = %cert.display(),
        serial = %info.serial_hex,
        "the renewed certificate is taken up, but {}",
        not_yet.message
    );
    Ok(())
}

/// What a failed [`check_own_certificate`] means, naming the files.
fn own_certificate_error(
    paths: &TlsPaths,
    crl: Option<&Path>,
    error: webpki::Error,
) -> TransportError {
    use webpki::Error as E;
    let crl = || crl.unwrap_or(&paths.ca).to_owned();
    let not_from_ca = |reason: &str| TransportError::CrlNotFromCa {
        crl: crl(),
        ca: paths.ca.clone(),
        reason: reason.to_owned(),
    };
    match error {
        E::UnknownIssuer => TransportError::NotIssuedByCa {
            cert: paths.cert.clone(),
            ca: paths.ca.clone(),
            reason: "no chain of signatures leads to it".to_owned(),
        },
        E::InvalidSignatureForPublicKey => TransportError::NotIssuedByCa {
            cert: paths.cert.clone(),
            ca: paths.ca.clone(),
            reason: "its signature does not verify with the CA's key: a CA of the same name?"
                .to_owned(),
        },
        E::RequiredEkuNotFoundContext(_) => TransportError::NotServerCertificate {
            cert: paths.cert.clone(),
        },
        E::UnknownRevocationStatus => not_from_ca(
            "it is not issued by the CA (another CA's CRL?), so every client would be refused",
        ),
        E::InvalidCrlSignatureForPublicKey => not_from_ca(
            "its signature does not verify with the CA's key, so every client would be refused",
        ),
        E::IssuerNotCrlSigner => not_from_ca("the CA's key usage does not allow signing CRLs"),
        other => TransportError::NotIssuedByCa {
            cert: paths.cert.clone(),
            ca: paths.ca.clone(),
            reason: format!("the check of its chain failed: {other:?}"),
        },
    }
}

impl ServerTls {
    /// Loads the CA, this server's certificate and key, and the CRLs in `crl` (if any: the
    /// `X509 CRL` blocks of a PEM file, or one DER CRL) into a TLS 1.3-only config that
    /// requires a client certificate issued by the CA and not revoked, with ALPN `h2`.
    ///
    /// Refuses, naming the files, what would fail every handshake later: a key that is not
    /// the certificate's, a certificate that does not chain to the CA or lacks serverAuth
    /// (a node certificate), a CRL the CA did not issue, and a CRL file that lacks the CRL
    /// of one of the CAs in the CA file (a bundle); a certificate the CRL revokes
    /// is only a warning. Refuses too a CRL file with two CRLs of one CA
    /// ([`TransportError::CrlTwoOfOneCa`]), whose second would silently not be in force.
    /// [`ServerTls::reload`] makes the same checks.
    ///
    /// Reads small files synchronously.
    pub fn load(
        paths: &TlsPaths,
        crl: Option<&Path>,
        crl_policy: CrlPolicy,
    ) -> Result<ServerTls, TransportError> {
        Self::load_with_clock(paths, crl, crl_policy, None, TlsClock::system())
    }

    /// [`ServerTls::load`], refusing a CRL older than the one `record` holds for its CA
    /// ([`TransportError::CrlOlderThanRecorded`]), or another CRL under its number
    /// ([`TransportError::CrlReissued`]): after a restart there is no CRL in force to
    /// compare with, and a crl.pem restored from a backup (or from a CA restored from one)
    /// must not un-revoke certificates. Reloads compare with the record too, and take what
    /// they load into it.
    ///
    /// Writes nothing (so `check-config` can call it): the record's file is written by
    /// [`ServerTls::save_crl_record`], and from then on by every reload that loads a newer
    /// CRL.
    pub fn load_with_record(
        paths: &TlsPaths,
        crl: Option<&Path>,
        crl_policy: CrlPolicy,
        record: CrlRecord,
    ) -> Result<ServerTls, TransportError> {
        Self::load_with_clock(paths, crl, crl_policy, Some(record), TlsClock::system())
    }

    /// [`ServerTls::load`] or, with a `record`, [`ServerTls::load_with_record`], checking
    /// client certificates (at handshakes and reloads) and CRL freshness at the time
    /// `time` gives instead of the operating system's clock: a server that holds its own
    /// time through a jump of the system clock keeps its TLS on that time too, rather than
    /// refusing every client certificate as expired (or not yet valid) until the clock is
    /// put right. The server's own certificate is checked at load on the system clock.
    pub fn load_with_clock(
        paths: &TlsPaths,
        crl: Option<&Path>,
        crl_policy: CrlPolicy,
        mut record: Option<CrlRecord>,
        clock: TlsClock,
    ) -> Result<ServerTls, TransportError> {
        let (loaded, _) = build(paths, crl, crl_policy, 0, &clock, None)?;
        if let (Some(record), Some(crl)) = (record.as_mut(), crl) {
            record.check(crl, &loaded.crl_versions)?;
            record.take(&loaded.crl_versions);
        }
        let tls = ServerTls {
            inner: Arc::new(Inner {
                paths: paths.clone(),
                crl_path: crl.map(Path::to_owned),
                policy: crl_policy,
                state: ArcSwap::from_pointee(loaded),
                reloads: Mutex::new(Reloads {
                    record,
                    saving: false,
                }),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
                handshake_failures: HandshakeFailures::default(),
                record_unsaved: std::sync::atomic::AtomicBool::new(false),
                clock,
            }),
        };
        tls.log_crl_status("tls config loaded");
        Ok(tls)
    }

    /// Re-reads the CRL, certificate and key, swaps the new config in for new handshakes,
    /// and orders every open connection whose peer certificate no longer verifies
    /// (revoked, expired, or — under [`CrlPolicy::Strict`] — checked against a stale CRL)
    /// closed; those connections fail their next read or write at once.
    ///
    /// On error the old config stays in force and no connection is touched. A certificate
    /// not valid yet by more than [`trmx_certs::NOT_VALID_YET_WARN`] is not taken up
    /// (every client with a right clock would refuse it), but the rest is: the certificate
    /// in force goes on with the CA and CRL files as they are now, and
    /// [`ReloadReport::certificate_refused`] says why ([`TransportError::NotValidYet`],
    /// logged); within those minutes it is taken up with a warning. A CRL older
    /// than the one in force for the same CA (a lower `crlNumber`, or without one an
    /// earlier `thisUpdate`) is such an error: a crl.pem restored from a backup must not
    /// un-revoke certificates. So are another CRL under the number of the one in force (a
    /// CA restored from a backup), and a CRL file with two CRLs of one CA. So is, with a
    /// [`CrlRecord`], a CRL older than the one recorded for its CA, or another under its
    /// number (a CA that left the CRL file and came back); a reload that puts a newer CRL
    /// in force records it (a failure to write the record is logged, and the CRL stays in
    /// force).
    ///
    /// Concurrent calls (SIGHUP and the reload interval) run one after the other, so the
    /// files read by the last one to start are the ones in force when it returns.
    ///
    /// Reads small files and checks one signature chain per open connection synchronously,
    /// and waits for a reload already running: from async code, call it through
    /// `tokio::task::spawn_blocking`.
    pub fn reload(&self) -> Result<ReloadReport, TransportError> {
        let mut reloads = self.inner.reloads();
        let in_force = self.inner.state.load_full();
        let generation = in_force.generation + 1;
        let (loaded, refused) = build(
            &self.inner.paths,
            self.inner.crl_path.as_deref(),
            self.inner.policy,
            generation,
            &self.inner.clock,
            Some(&in_force),
        )?;
        let loaded = Arc::new(loaded);
        if let Some(crl) = self.inner.crl_path.as_deref() {
            check_crls_not_older(crl, &in_force.crl_versions, &loaded.crl_versions)?;
            if let Some(record) = &reloads.record {
                record.check(crl, &loaded.crl_versions)?;
            }
        }
        // Swap first, then snapshot: a connection registering after the snapshot sees the
        // new generation and checks itself (see `register`).
        self.inner.state.store(loaded.clone());
        let saving = reloads.saving;
        if let Some(record) = reloads.record.as_mut() {
            record.take(&loaded.crl_versions);
            // The CRL is in force even so: refusing a newer CRL for want of a record would
            // keep the certificates it revokes in. Tried again at the next reload.
            if saving {
                let saved = record.save();
                self.inner
                    .record_unsaved
                    .store(saved.is_err(), std::sync::atomic::Ordering::Relaxed);
                if let Err(error) = saved {
                    tracing::warn!(
                        %error,
                        "the newer CRL is in force, but not recorded: after a restart an \
                         older CRL would not be refused"
                    );
                }
            }
        }
        type Snapshot = (
            Arc<Vec<CertificateDer<'static>>>,
            SocketAddr,
            Arc<CloseSignal>,
        );
        let snapshot: Vec<Snapshot> = self
            .inner
            .conns()
            .values()
            .map(|entry| (entry.certs.clone(), entry.peer, entry.close.clone()))
            .collect();
        let now = self.now();
        let mut closed = Vec::new();
        for (certs, peer, close) in snapshot {
            if !close.is_closed() && !still_valid(&*loaded.verifier, &certs, now) {
                close.close();
                closed.push(format!("{} from {}", peer_name(&certs), peer.ip()));
            }
        }
        closed.sort();
        let crl = self.crl_status();
        self.log_crl_status("tls config reloaded");
        // (at every reload until it is taken up: a SIGHUP for the renewal must say so)
        if let Some(error) = &refused {
            tracing::warn!(
                %error,
                "the CA and CRL files are taken up, the renewed certificate is not"
            );
        }
        if !closed.is_empty() {
            tracing::info!(
                closed_connections = closed.len(),
                closed = %closed.join(", "),
                "closed connections whose certificate no longer verifies"
            );
        }
        Ok(ReloadReport {
            closed_connections: closed.len(),
            closed,
            generation,
            crl,
            certificate_refused: refused.map(|error| error.to_string()),
        })
    }

    /// Writes the CRL record given to [`ServerTls::load_with_record`] to its file (if it
    /// holds anything the file does not), and makes every later reload that loads a newer
    /// CRL write it too. Nothing to do without a record.
    ///
    /// Reads the file again first: the load read it before this server owned the
    /// directory, and a server that ran on it until then (still stopping when this one
    /// started) may have recorded a newer CRL meanwhile. The CRLs in force are checked
    /// against what the file holds now, with the load's errors
    /// ([`TransportError::CrlOlderThanRecorded`], [`TransportError::CrlReissued`]): the
    /// caller must not serve with them. Otherwise the file's entries and this server's are
    /// merged, the newer of each CA's kept, so a newer record is never written over.
    ///
    /// Call it once the server owns its data directory (the broker: once its store is
    /// open and locked), so that two processes never write one record. Reads, writes and
    /// syncs a small file: from async code, call it through `tokio::task::spawn_blocking`.
    pub fn save_crl_record(&self) -> Result<(), TransportError> {
        let mut guard = self.inner.reloads();
        let reloads = &mut *guard;
        let Some(record) = reloads.record.as_mut() else {
            reloads.saving = true;
            return Ok(());
        };
        let on_disk = CrlRecord::read_again(record.path())?;
        if let Some(crl) = self.inner.crl_path.as_deref() {
            on_disk.check(crl, &self.inner.state.load().crl_versions)?;
        }
        record.merge(on_disk);
        // (from here on, a record that cannot be written now is tried again by every
        // reload that loads a newer CRL)
        reloads.saving = true;
        let saved = record.save();
        self.inner
            .record_unsaved
            .store(saved.is_err(), std::sync::atomic::Ordering::Relaxed);
        saved
    }

    /// `false` while the CRL record could not be written at the last try (the CRL in
    /// force is then not recorded: after a restart, an older CRL would not be refused).
    /// `true` when it was, and for a server that keeps no record.
    pub fn crl_record_saved(&self) -> bool {
        !self
            .inner
            .record_unsaved
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The freshness of the loaded CRL now (on the server's time, see
    /// [`ServerTls::load_with_clock`]).
    pub fn crl_status(&self) -> CrlStatus {
        self.crl_status_at(self.inner.clock.now())
    }

    /// The server's time (see [`ServerTls::load_with_clock`]).
    fn now(&self) -> UnixTime {
        self.inner.clock.unix_time()
    }

    /// The freshness of the loaded CRL at `now` (for callers with their own clock).
    pub fn crl_status_at(&self, now: SystemTime) -> CrlStatus {
        CrlStatus::at(self.inner.state.load().crl_next_update, now)
    }

    /// The policy this server was loaded with.
    pub fn crl_policy(&self) -> CrlPolicy {
        self.inner.policy
    }

    /// Established TLS connections not yet dropped.
    pub fn open_connections(&self) -> usize {
        self.inner.conns().len()
    }

    /// Failed handshakes since [`ServerTls::load`], by reason (every reason listed, from 0).
    pub fn handshake_failures(&self) -> [(HandshakeFailure, u64); HandshakeFailure::ALL.len()] {
        self.inner.handshake_failures.counts()
    }

    /// Where [`crate::incoming`] records failed handshakes.
    pub(crate) fn failures(&self) -> &HandshakeFailures {
        &self.inner.handshake_failures
    }

    /// The config new handshakes use.
    pub(crate) fn current(&self) -> Arc<Loaded> {
        self.inner.state.load_full()
    }

    /// Records an established connection from `peer` whose handshake used
    /// `handshake_generation`.
    pub(crate) fn register(
        &self,
        certs: Arc<Vec<CertificateDer<'static>>>,
        handshake_generation: u64,
        peer: SocketAddr,
    ) -> (Registration, Arc<CloseSignal>) {
        let close = Arc::new(CloseSignal::default());
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        self.inner.conns().insert(
            id,
            ConnEntry {
                certs: certs.clone(),
                peer,
                close: close.clone(),
            },
        );
        let current = self.current();
        if current.generation != handshake_generation
            && !still_valid(&*current.verifier, &certs, self.now())
        {
            close.close();
        }
        (
            Registration {
                tls: self.clone(),
                id,
            },
            close,
        )
    }

    fn log_crl_status(&self, msg: &'static str) {
        let status = self.crl_status();
        let next_update_unix = status
            .next_update
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        // RFC 3339 for people, Unix seconds (as before) for scripts
        let next_update = status.next_update.map(trmx_certs::format_time);
        let next_update = next_update.as_deref();
        if status.stale {
            tracing::warn!(
                next_update,
                next_update_unix,
                policy = ?self.inner.policy,
                "crl is past its next update"
            );
        }
        tracing::info!(next_update, next_update_unix, stale = status.stale, "{msg}");
    }
}

/// Who holds a certificate chain, for a log line: the trmx identity of the leaf
/// (`participant BE-PAYOKE`), else its subject.
pub(crate) fn peer_name(certs: &[CertificateDer<'static>]) -> String {
    let Some(leaf) = certs.first() else {
        return "no certificate".to_owned();
    };
    if let Ok(identity) = trmx_certs::Identity::from_der(leaf.as_ref()) {
        return identity.role.to_string();
    }
    match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, cert)) => format!("subject {}", cert.subject()),
        Err(_) => "an unparsable certificate".to_owned(),
    }
}

fn still_valid(
    verifier: &dyn ClientCertVerifier,
    certs: &[CertificateDer<'static>],
    now: UnixTime,
) -> bool {
    match certs.split_first() {
        Some((end_entity, intermediates)) => verifier
            .verify_client_cert(end_entity, intermediates, now)
            .is_ok(),
        None => false,
    }
}
