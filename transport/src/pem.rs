//! Reading PEM files (certificates, keys, CRLs) with errors that name the file. A CRL may
//! also be a DER file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::{TlsFile, TransportError};

/// (not waited on when the path names a FIFO: [`trmx_certs::pem::read_regular_file`])
fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, TransportError> {
    trmx_certs::pem::read_regular_file(path, &file.to_string()).map_err(|error| {
        TransportError::Read {
            file,
            path: path.to_owned(),
            error,
        }
    })
}

fn pem_error(
    file: TlsFile,
    path: &Path,
) -> impl FnOnce(rustls::pki_types::pem::Error) -> TransportError {
    let path = path.to_owned();
    move |error| TransportError::Pem { file, path, error }
}

/// Every certificate in a PEM file (at least one): this party's chain (`file` is
/// [`TlsFile::Cert`]) or the CA ([`TlsFile::Ca`]).
pub(crate) fn certs(
    file: TlsFile,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bytes = read(file, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(file, path))?;
    if certs.is_empty() {
        return Err(pem_error(file, path)(
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1). A file that other
/// users may read (or its group write) is refused ([`trmx_certs::read_key_file`]): the
/// key would not be secret, and a copy made with the wrong umask is the usual cause. So is
/// one whose POSIX ACL lets others read it, and a path that is no regular file (a
/// directory, or a FIFO, which is not waited on).
pub(crate) fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let read = trmx_certs::read_key_file(path).map_err(|error| TransportError::Read {
        file: TlsFile::Key,
        path: path.to_owned(),
        error,
    })?;
    let bytes = match read {
        trmx_certs::KeyFile::Read(bytes) => bytes,
        trmx_certs::KeyFile::Exposed { mode } => {
            return Err(TransportError::Invalid {
                file: TlsFile::Key,
                path: path.to_owned(),
                reason: format!(
                    "mode {mode:04o} lets other users read or change it: `chmod 600 {0}` when \
                     the service's user owns it, or `chmod 640 {0}` when root owns it with the \
                     service's group (`root:trmx`)",
                    path.display()
                ),
            });
        }
    };
    PrivateKeyDer::from_pem_slice(&bytes).map_err(pem_error(TlsFile::Key, path))
}

/// The trust anchors in a CA file.
pub(crate) fn roots(path: &Path) -> Result<Arc<RootCertStore>, TransportError> {
    let mut store = RootCertStore::empty();
    for cert in certs(TlsFile::Ca, path)? {
        if let Some(reason) = not_a_ca(&cert) {
            return Err(TransportError::Invalid {
                file: TlsFile::Ca,
                path: path.to_owned(),
                reason,
            });
        }
        store.add(cert).map_err(|e| TransportError::Invalid {
            file: TlsFile::Ca,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

/// Why `cert` cannot be a trust anchor of the federation, if it cannot: a certificate
/// that is not a CA's (a participant's or the broker's own, given as `tls.ca` by
/// mistake). rustls would take it, and every peer would then be refused later with a
/// message about the CRL or the chain; this names the file that is wrong.
fn not_a_ca(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if parsed.is_ca() {
        return None;
    }
    Some(format!(
        "{} is not a CA certificate (a participant's or the broker's own?): point it at \
         the federation CA's certificate (ca.pem in the CA directory of `trmx-certs`)",
        parsed.subject()
    ))
}

/// CRLs read from one file, with the earliest `nextUpdate` among them.
#[derive(Debug)]
pub(crate) struct Crls {
    pub(crate) ders: Vec<CertificateRevocationListDer<'static>>,
    pub(crate) next_update: Option<SystemTime>,
    /// How recent each CRL is, in file order (one per entry of `ders`).
    pub(crate) versions: Vec<CrlVersion>,
}

/// How recent one CRL is, for telling a CRL restored from a backup from a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CrlVersion {
    /// Its issuer's name (DER), and the issuer's key identifier when the CRL names it: a
    /// new CA of the same name (another key) starts its own count.
    pub(crate) issuer: (Vec<u8>, Option<Vec<u8>>),
    /// The issuer's name, for a message.
    pub(crate) issuer_name: String,
    /// `crlNumber` (RFC 5280 §5.2.3: grows with every CRL of the issuer), if present.
    pub(crate) number: Option<x509_parser::num_bigint::BigUint>,
    /// `thisUpdate`, in Unix seconds.
    pub(crate) this_update: i64,
    /// The SHA-256 digest of the CRL (DER), which tells two CRLs of one number apart.
    /// Always known for a CRL read from a file; `None` for one a CRL record written
    /// before records kept it: unknown, never taken for a different CRL.
    pub(crate) sha256: Option<[u8; 32]>,
}

/// How a CRL stands against the one accepted before for the same CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Issued before it: a lower `crlNumber`, or without one an earlier `thisUpdate`.
    Older,
    /// Another CRL in its place: the same `crlNumber` (or without one the same
    /// `thisUpdate`) but other content. A CA restored from a backup issues a number again,
    /// without the revocations made since the backup.
    Reissued,
    /// The same CRL (or one whose digest is not known to differ), or a later one.
    NotOlder,
}

impl CrlVersion {
    /// Whether this CRL came before `accepted` (the same issuer's), or takes its place
    /// with other content (see [`Standing`]).
    pub(crate) fn standing(&self, accepted: &CrlVersion) -> Standing {
        let order = match (&self.number, &accepted.number) {
            (Some(new), Some(old)) => new.cmp(old),
            _ => self.this_update.cmp(&accepted.this_update),
        };
        match order {
            std::cmp::Ordering::Less => Standing::Older,
            std::cmp::Ordering::Equal => match (self.sha256, accepted.sha256) {
                (Some(new), Some(old)) if new != old => Standing::Reissued,
                _ => Standing::NotOlder,
            },
            std::cmp::Ordering::Greater => Standing::NotOlder,
        }
    }

    /// Whether this CRL and `other` are of the same CA: the same issuer name, and the same
    /// authority key identifier when both name one. (webpki checks a certificate against
    /// the first CRL whose issuer is the certificate's issuer, by name alone.)
    pub(crate) fn same_ca(&self, other: &CrlVersion) -> bool {
        self.issuer.0 == other.issuer.0
            && match (&self.issuer.1, &other.issuer.1) {
                (Some(mine), Some(theirs)) => mine == theirs,
                _ => true,
            }
    }

    /// `crlNumber 7`, or `thisUpdate 2026-11-30T00:00:00Z` without one (in the terms of
    /// the comparison with `other`).
    pub(crate) fn describe(&self, other: &CrlVersion) -> String {
        match (&self.number, &other.number) {
            (Some(number), Some(_)) => format!("crlNumber {number}"),
            _ => match u64::try_from(self.this_update) {
                Ok(secs) => format!(
                    "thisUpdate {}",
                    trmx_certs::format_time(UNIX_EPOCH + Duration::from_secs(secs))
                ),
                Err(_) => format!("thisUpdate {} (Unix seconds)", self.this_update),
            },
        }
    }
}

/// The CRLs in a file, checked to be parseable: every `X509 CRL` block of a PEM file, or,
/// when the file holds no such block, the whole file as one DER CRL (what `openssl crl
/// -outform DER` and many CAs publish).
pub(crate) fn crls(path: &Path) -> Result<Crls, TransportError> {
    let bytes = read(TlsFile::Crl, path)?;
    let mut ders = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(TlsFile::Crl, path))?;
    if ders.is_empty() {
        ders.push(der_crl(path, bytes)?);
    }
    let mut next_update: Option<SystemTime> = None;
    let mut versions = Vec::with_capacity(ders.len());
    for der in &ders {
        let at = crl_next_update(path.to_owned(), der.as_ref())?;
        next_update = Some(match next_update {
            Some(earliest) if earliest <= at => earliest,
            _ => at,
        });
        versions.push(crl_version(path, der.as_ref())?);
    }
    Ok(Crls {
        ders,
        next_update,
        versions,
    })
}

/// The issuer, `crlNumber` and `thisUpdate` of one DER CRL.
fn crl_version(path: &Path, der: &[u8]) -> Result<CrlVersion, TransportError> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| TransportError::Invalid {
        file: TlsFile::Crl,
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let key_id = crl
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0.to_vec())
            }
            _ => None,
        });
    Ok(CrlVersion {
        issuer: (crl.issuer().as_raw().to_vec(), key_id),
        issuer_name: crl.issuer().to_string(),
        number: crl.crl_number().cloned(),
        this_update: crl.last_update().timestamp(),
        sha256: Some(sha256(der)),
    })
}

/// The SHA-256 digest of `der`.
pub(crate) fn sha256(der: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
    out
}

/// `bytes` as exactly one DER CRL; the error says the file is neither PEM nor DER.
fn der_crl(
    path: &Path,
    bytes: Vec<u8>,
) -> Result<CertificateRevocationListDer<'static>, TransportError> {
    let invalid = |reason: String| TransportError::Invalid {
        file: TlsFile::Crl,
        path: path.to_owned(),
        reason: format!("no PEM \"X509 CRL\" block, and not a DER CRL: {reason}"),
    };
    match x509_parser::parse_x509_crl(&bytes) {
        Ok(([], _)) => Ok(CertificateRevocationListDer::from(bytes)),
        Ok((rest, _)) => Err(invalid(format!("{} bytes after the CRL", rest.len()))),
        Err(e) => Err(invalid(e.to_string())),
    }
}

/// The `nextUpdate` of one DER CRL (rustls requires it, so its absence is an error).
fn crl_next_update(path: PathBuf, der: &[u8]) -> Result<SystemTime, TransportError> {
    let invalid = |reason: String| TransportError::Invalid {
        file: TlsFile::Crl,
        path: path.clone(),
        reason,
    };
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| invalid(e.to_string()))?;
    let next = crl
        .next_update()
        .ok_or_else(|| invalid("no nextUpdate field".to_owned()))?;
    let secs = next.timestamp();
    let secs = u64::try_from(secs).map_err(|_| invalid("nextUpdate before 1970".to_owned()))?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TLS files are read as regular files only (a FIFO would hang the start: see
    /// `trmx_certs::pem::read_regular_file`), and the error names the file wanted.
    #[test]
    fn a_tls_file_path_naming_no_regular_file_says_which_file_it_wants() {
        let dir = tempfile::tempdir().unwrap();
        let e = certs(TlsFile::Ca, dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(
                "it is a directory, not a regular file: give the path of the CA certificate file"
            ),
            "{e}"
        );
    }

    fn version(number: Option<u32>, this_update: i64) -> CrlVersion {
        CrlVersion {
            issuer: (b"ca".to_vec(), None),
            issuer_name: "CN=ca".to_owned(),
            number: number.map(x509_parser::num_bigint::BigUint::from),
            this_update,
            sha256: Some([0xaa; 32]),
        }
    }

    fn with_digest(version: CrlVersion, sha256: Option<[u8; 32]>) -> CrlVersion {
        CrlVersion { sha256, ..version }
    }

    #[test]
    fn a_crl_is_older_by_its_number_or_without_one_by_its_this_update() {
        use Standing::{NotOlder, Older};
        // the number decides, whatever the times (a CRL re-signed with a clock set back)
        assert_eq!(
            version(Some(6), 2_000).standing(&version(Some(7), 1_000)),
            Older
        );
        assert_eq!(
            version(Some(8), 1_000).standing(&version(Some(7), 2_000)),
            NotOlder
        );
        assert_eq!(
            version(Some(7), 1_000).standing(&version(Some(7), 1_000)),
            NotOlder
        );
        // without a number on either side, thisUpdate
        assert_eq!(
            version(None, 1_000).standing(&version(Some(7), 2_000)),
            Older
        );
        assert_eq!(
            version(None, 2_000).standing(&version(None, 2_000)),
            NotOlder
        );
        assert_eq!(
            version(None, 0).describe(&version(Some(7), 0)),
            "thisUpdate 1970-01-01T00:00:00Z"
        );
        assert_eq!(
            version(Some(7), 0).describe(&version(Some(8), 0)),
            "crlNumber 7"
        );
    }

    /// A CA restored from a backup issues a crlNumber again, without the revocations
    /// made since: the same number with other content is no newer CRL. A digest not known
    /// (a record written before records kept it) is no evidence of a different one.
    #[test]
    fn another_crl_in_the_place_of_the_accepted_one_is_reissued() {
        use Standing::{NotOlder, Reissued};
        let accepted = version(Some(7), 1_000);
        let other = with_digest(version(Some(7), 1_000), Some([0xee; 32]));
        assert_eq!(other.standing(&accepted), Reissued);
        // without a number, the same thisUpdate
        let accepted = version(None, 1_000);
        assert_eq!(
            with_digest(version(None, 1_000), Some([0xee; 32])).standing(&accepted),
            Reissued
        );
        // a digest not recorded
        assert_eq!(
            other.standing(&with_digest(version(Some(7), 1_000), None)),
            NotOlder
        );
        // a later CRL has other content, of course
        assert_eq!(other.standing(&version(Some(6), 1_000)), NotOlder);
    }

    #[test]
    fn two_crls_are_of_one_ca_by_name_and_key_id_when_both_have_one() {
        let key = |id: Option<&[u8]>| CrlVersion {
            issuer: (b"ca".to_vec(), id.map(<[u8]>::to_vec)),
            ..version(Some(1), 0)
        };
        assert!(key(Some(b"k1")).same_ca(&key(Some(b"k1"))));
        assert!(!key(Some(b"k1")).same_ca(&key(Some(b"k2"))));
        assert!(key(Some(b"k1")).same_ca(&key(None)));
        assert!(key(None).same_ca(&key(None)));
        let other_name = CrlVersion {
            issuer: (b"other".to_vec(), Some(b"k1".to_vec())),
            ..key(Some(b"k1"))
        };
        assert!(!other_name.same_ca(&key(Some(b"k1"))));
    }
}
