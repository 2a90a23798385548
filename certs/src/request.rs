//! Certificate requests: an organisation makes its key pair itself and sends the CA only
//! a certificate signing request (PKCS #10), so its private key never leaves its machine.
//!
//! The request proves that its sender holds the private key (it is signed with it), and
//! [`CertRequest`] checks that signature when it reads one. The CA takes nothing else from
//! it: the identity, the names and the validity of the certificate come from the CA's own
//! command line, never from what the request asks for. Both sides print the same
//! [`CertRequest::fingerprint`] of the public key, so that the CA administrator can compare
//! it with the organisation over another channel (the phone) before issuing.

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, KeyPair,
    PKCS_ECDSA_P256_SHA256, PublicKeyData,
};

use crate::error::CertError;
use crate::pem::{Mode, write_atomic};

/// Longest request file read (a PKCS #10 request is well under 4 KiB).
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// A verified certificate signing request: the public key to certify.
#[derive(Debug, Clone)]
pub struct CertRequest {
    public_key: rcgen::PublicKey,
    path: PathBuf,
}

/// The files [`CertRequest::create`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPaths {
    /// The private key (mode `0600`): it stays with the organisation.
    pub key: PathBuf,
    /// The request (PEM, `CERTIFICATE REQUEST`): it goes to the CA.
    pub request: PathBuf,
}

impl RequestPaths {
    /// `PREFIX.key` and `PREFIX.csr`.
    pub fn from_prefix(prefix: &Path) -> Self {
        let mut key = prefix.as_os_str().to_owned();
        key.push(".key");
        let mut request = prefix.as_os_str().to_owned();
        request.push(".csr");
        Self {
            key: key.into(),
            request: request.into(),
        }
    }
}

impl CertRequest {
    /// Makes a new ECDSA P-256 key and a request for it with common name `name` (a label
    /// for the CA administrator; the CA decides the identity), and writes both: the key
    /// with mode `0600`. Refuses to overwrite either file unless `force`.
    pub fn create(name: &str, out: &RequestPaths, force: bool) -> Result<CertRequest, CertError> {
        crate::identity::validate_name("request", name)?;
        if !force {
            for path in [&out.key, &out.request] {
                if std::fs::symlink_metadata(path).is_ok() {
                    return Err(CertError::AlreadyExists { path: path.clone() });
                }
            }
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(CertError::generate("request key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let request = params
            .serialize_request(&key)
            .map_err(CertError::generate("certificate request"))?;
        let pem = request
            .pem()
            .map_err(CertError::generate("certificate request PEM"))?;
        for path in [&out.key, &out.request] {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| CertError::io("create directory", parent, e))?;
            }
        }
        write_atomic(
            "private key",
            &out.key,
            key.serialize_pem().as_bytes(),
            Mode::Secret,
            force,
        )?;
        write_atomic(
            "certificate request",
            &out.request,
            pem.as_bytes(),
            Mode::Public,
            force,
        )?;
        Self::from_pem_file(&out.request)
    }

    /// Reads a PEM request and checks its signature (proof that its sender holds the key).
    pub fn from_pem_file(path: &Path) -> Result<CertRequest, CertError> {
        let what = "certificate request";
        let len = std::fs::metadata(path)
            .map_err(|e| CertError::io("read certificate request", path, e))?
            .len();
        if len > MAX_REQUEST_BYTES {
            return Err(CertError::parse(
                what,
                path,
                format!("{len} bytes is not a certificate request"),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| CertError::io("read certificate request", path, e))?;
        if !text.contains("-----BEGIN CERTIFICATE REQUEST-----") {
            return Err(CertError::parse(
                what,
                path,
                "no CERTIFICATE REQUEST block (make one with `trmx-certs request`)",
            ));
        }
        let parsed = CertificateSigningRequestParams::from_pem(&text).map_err(|e| {
            let problem = match e {
                rcgen::Error::InvalidCertificationRequestSignature => {
                    "its signature does not match its key (damaged or altered)".to_string()
                }
                other => other.to_string(),
            };
            CertError::parse(what, path, problem)
        })?;
        Ok(CertRequest {
            public_key: parsed.public_key,
            path: path.to_path_buf(),
        })
    }

    /// The request file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public key to certify.
    pub(crate) fn public_key(&self) -> &rcgen::PublicKey {
        &self.public_key
    }

    /// SHA-256 of the public key, in groups of four hex digits (`3f2a 9c01 …`): what the CA
    /// administrator reads out to the organisation before issuing.
    pub fn fingerprint(&self) -> String {
        key_fingerprint(self.public_key.der_bytes())
    }
}

/// SHA-256 of a raw public key (the subject public key bits of a certificate or request),
/// in groups of four hex digits.
pub fn key_fingerprint(raw_public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, raw_public_key);
    let hex: Vec<String> = digest
        .as_ref()
        .chunks(2)
        .map(|pair| pair.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    hex.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_written_private_and_read_back_with_the_same_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = RequestPaths::from_prefix(&dir.path().join("NL-NRM"));
        let made = CertRequest::create("NL-NRM", &out, false).unwrap();
        let mode = std::fs::metadata(&out.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = CertRequest::from_pem_file(&out.request).unwrap();
        assert_eq!(read.fingerprint(), made.fingerprint());
        assert_eq!(made.fingerprint().split(' ').count(), 16);
        // the key in the key file is the requested one
        let key = KeyPair::from_pem(&std::fs::read_to_string(&out.key).unwrap()).unwrap();
        assert_eq!(key_fingerprint(key.public_key_raw()), made.fingerprint());
        // never over existing files without force
        let err = CertRequest::create("NL-NRM", &out, false).unwrap_err();
        assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
    }

    #[test]
    fn an_altered_request_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = RequestPaths::from_prefix(&dir.path().join("x"));
        CertRequest::create("x", &out, false).unwrap();
        // change one base64 digit near the end: a few bits of the signature
        let pem = std::fs::read_to_string(&out.request).unwrap();
        let end = pem.find("-----END").unwrap();
        let body = pem[..end].trim_end().trim_end_matches('=');
        let at = body.len() - 8;
        let digit = if &body[at..=at] == "A" { "B" } else { "A" };
        let altered = format!("{}{digit}{}", &pem[..at], &pem[at + 1..]);
        std::fs::write(&out.request, altered).unwrap();
        let err = CertRequest::from_pem_file(&out.request)
            .unwrap_err()
            .to_string();
        assert!(err.contains("signature does not match"), "{err}");
        // a certificate is not a request
        std::fs::write(&out.request, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let err = CertRequest::from_pem_file(&out.request)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CERTIFICATE REQUEST block"), "{err}");
    }
}
