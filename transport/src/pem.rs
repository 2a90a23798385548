//! Reading PEM files (certificates, keys, CRLs) with errors that name the file. A CRL may
//! also be a DER file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::{TlsFile, TransportError};

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|error| TransportError::Read {
        file,
        path: path.to_owned(),
        error,
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
/// key would not be secret, and a copy made with the wrong umask is the usual cause.
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
                    "mode {mode:04o} lets other users read or change it: `chmod 600 {}` (the \
                     service's user must own it)",
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
        store.add(cert).map_err(|e| TransportError::Invalid {
            file: TlsFile::Ca,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

/// CRLs read from one file, with the earliest `nextUpdate` among them.
#[derive(Debug)]
pub(crate) struct Crls {
    pub(crate) ders: Vec<CertificateRevocationListDer<'static>>,
    pub(crate) next_update: Option<SystemTime>,
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
    for der in &ders {
        let at = crl_next_update(path.to_owned(), der.as_ref())?;
        next_update = Some(match next_update {
            Some(earliest) if earliest <= at => earliest,
            _ => at,
        });
    }
    Ok(Crls { ders, next_update })
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
