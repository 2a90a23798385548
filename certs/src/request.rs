//! Certificate requests: an organisation makes its key pair itself and sends the CA only
//! a certificate signing request (PKCS #10), so its private key never leaves its machine.
//!
//! The request proves that its sender holds the private key (it is signed with it), and
//! [`CertRequest`] checks that signature when it reads one. The CA takes nothing else from
//! it: the identity, the names and the validity of the certificate come from the CA's own
//! command line, never from what the request asks for. Both sides print the same
//! [`CertRequest::fingerprint`] of the public key, so that the CA administrator can compare
//! it with the organisation over another channel (the phone) before issuing.

use std::io::Read;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256, PublicKeyData, SignatureAlgorithm,
};
use rustls::pki_types::pem::{PemObject, SectionKind};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as ParsedKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::error::CertError;
use crate::pem::{Mode, NewFile, write_atomic, write_pair_atomic};

/// Longest request file read (a PKCS #10 request is well under 4 KiB).
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// A verified certificate signing request: the public key to certify.
#[derive(Debug, Clone)]
pub struct CertRequest {
    public_key: RequestKey,
    path: PathBuf,
    kept_key: Option<KeptKey>,
}

/// The key of a certificate still in date that [`CertRequest::create`] replaced with
/// `force`: kept under another name, since the certificate cannot be used without it.
#[derive(Debug, Clone)]
pub struct KeptKey {
    /// Where the old key is now (`<key>.replaced-<unix seconds>`: a hard link, mode as it
    /// was, or a copy with mode `0600` where the file system allows no hard link).
    pub path: PathBuf,
    /// The certificate beside the key that needs it.
    pub cert: PathBuf,
    /// That certificate's identity (SPIFFE URI).
    pub identity: String,
    /// When that certificate expires.
    pub not_after: std::time::SystemTime,
}

/// The public key of a request, with the algorithm of its own `SubjectPublicKeyInfo`
/// (rcgen's CSR parser takes it from the request's *signature* algorithm instead, so a
/// P-384 key signed with SHA-256, openssl's default, would be certified as a P-256 key).
#[derive(Debug, Clone)]
pub(crate) struct RequestKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for RequestKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// What the federation's TLS 1.3 peers (rustls with ring) can use, for the messages.
const SUPPORTED_KEYS: &str = "the federation takes ECDSA P-256 (what `trmx-certs request` makes), \
                              ECDSA P-384, Ed25519 or RSA of 2048 to 8192 bits";

/// The key of a request as the certificate will carry it, if a TLS 1.3 handshake with
/// rustls and ring can use it.
fn request_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<RequestKey, String> {
    let key_alg = &spki.algorithm.algorithm;
    let raw = spki.subject_public_key.data.to_vec();
    let alg = if *key_alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let (alg, len) = match curve {
            Some(c) if c == OID_EC_P256 => (&PKCS_ECDSA_P256_SHA256, 65),
            Some(c) if c == OID_NIST_EC_P384 => (&PKCS_ECDSA_P384_SHA384, 97),
            Some(c) if c == OID_NIST_EC_P521 => {
                return Err(format!(
                    "an ECDSA P-521 key is not supported: {SUPPORTED_KEYS}"
                ));
            }
            Some(c) => {
                return Err(format!(
                    "an ECDSA key on curve {c} is not supported: {SUPPORTED_KEYS}"
                ));
            }
            None => {
                return Err(format!(
                    "an ECDSA key with explicit curve parameters is not supported: {SUPPORTED_KEYS}"
                ));
            }
        };
        if raw.len() != len || raw.first() != Some(&4) {
            return Err(format!(
                "its ECDSA key is not an uncompressed point (make the request without \
                 point compression): {SUPPORTED_KEYS}"
            ));
        }
        alg
    } else if *key_alg == OID_SIG_ED25519 {
        &PKCS_ED25519
    } else if *key_alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(ParsedKey::RSA(rsa)) => rsa_bits(rsa.modulus),
            _ => 0,
        };
        if !(2048..=8192).contains(&bits) {
            return Err(format!(
                "a {bits}-bit RSA key is not supported: {SUPPORTED_KEYS}"
            ));
        }
        &PKCS_RSA_SHA256
    } else {
        return Err(format!(
            "a key of type {key_alg} is not supported: {SUPPORTED_KEYS}"
        ));
    };
    Ok(RequestKey { raw, alg })
}

/// The size in bits of an RSA modulus (a DER INTEGER's content, maybe with leading zeros).
fn rsa_bits(modulus: &[u8]) -> usize {
    let digits = modulus
        .iter()
        .position(|b| *b != 0)
        .map_or(&[][..], |i| &modulus[i..]);
    match digits.first() {
        Some(first) => digits.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
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
        Self {
            key: crate::pem::suffixed(prefix, ".key"),
            request: crate::pem::suffixed(prefix, ".csr"),
        }
    }
}

impl CertRequest {
    /// Makes a new ECDSA P-256 key and a request for it with common name `name` (a label
    /// for the CA administrator; the CA decides the identity), and writes both: the key
    /// with mode `0600`. Refuses to overwrite either file unless `force`.
    ///
    /// With `force`, the key of a certificate still in date beside it (the same name with
    /// `.pem`) is replaced too, but kept under another name ([`CertRequest::kept_key`]):
    /// after a key leak, the certificate is revoked and a new key is what the organisation
    /// needs; if the certificate is still in use, its node needs the old key until the new
    /// certificate is installed. (The tool has no CRL to tell the two apart.)
    pub fn create(name: &str, out: &RequestPaths, force: bool) -> Result<CertRequest, CertError> {
        crate::identity::validate_name("request", name)?;
        // (`request --out ca/ca --force` wrote over the CA key)
        for path in [&out.key, &out.request] {
            if let Some(ca_file) = crate::ca::ca_file_at(path) {
                return Err(CertError::CaFileTarget {
                    path: path.clone(),
                    ca_file,
                });
            }
        }
        if !force {
            for path in [&out.key, &out.request] {
                if std::fs::symlink_metadata(path).is_ok() {
                    return Err(CertError::RequestExists {
                        path: path.clone(),
                        key: out.key.clone(),
                        free_prefix: free_prefix(out),
                    });
                }
            }
        }
        let in_use = if force { key_in_use(&out.key) } else { None };
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
        // (a second name for the old key, not a move: a failed write below leaves the key
        // file as it was)
        let kept_key = match in_use {
            Some(cert) => Some(keep_key(&out.key, cert)?),
            None => None,
        };
        // As a pair: written one after the other, a request that could not be written (a
        // full disk, a directory in its way) failed after the key was replaced, leaving the
        // certificate beside it without its key and no request to replace it.
        let key_pem = key.serialize_pem();
        let written = write_pair_atomic(
            NewFile {
                what: "private key",
                path: &out.key,
                contents: key_pem.as_bytes(),
                mode: Mode::Secret,
            },
            NewFile {
                what: "certificate request",
                path: &out.request,
                contents: pem.as_bytes(),
                mode: Mode::Public,
            },
            force,
        );
        if let Err(e) = written {
            // the old key back in place: its second name is of no use (kept if the key
            // could not be put back, which the error says)
            if let Some(kept) = &kept_key
                && !matches!(e, CertError::PairIncomplete { .. })
            {
                let _ = std::fs::remove_file(&kept.path);
            }
            return Err(e);
        }
        Ok(CertRequest {
            kept_key,
            ..Self::from_pem_file(&out.request)?
        })
    }

    /// The key of a certificate still in date that [`CertRequest::create`] replaced, and
    /// where it was kept; `None` for a request read from a file.
    pub fn kept_key(&self) -> Option<&KeptKey> {
        self.kept_key.as_ref()
    }

    /// Reads a PEM request and checks its signature (proof that its sender holds the key).
    /// The file must hold exactly one `CERTIFICATE REQUEST` block (or `NEW CERTIFICATE
    /// REQUEST`, as Windows and Java tools write) and no private key.
    pub fn from_pem_file(path: &Path) -> Result<CertRequest, CertError> {
        let what = "certificate request";
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_REQUEST_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| CertError::io("read certificate request", path, e))?;
        if bytes.len() as u64 > MAX_REQUEST_BYTES {
            return Err(CertError::parse(
                what,
                path,
                format!("more than {MAX_REQUEST_BYTES} bytes is not a certificate request"),
            ));
        }
        let text = String::from_utf8_lossy(&bytes);
        let private_key = text.lines().any(|line| {
            let line = line.trim();
            line.starts_with("-----BEGIN ") && line.ends_with("PRIVATE KEY-----")
        });
        if private_key {
            return Err(CertError::parse(
                what,
                path,
                "it holds a private key, which must never leave the organisation: treat that \
                 key as disclosed, have the organisation make a new key and request \
                 (`trmx-certs request`) and send only the .csr",
            ));
        }
        // (Windows certreq and Java keytool label their requests "NEW CERTIFICATE REQUEST")
        let text = text.replace(
            "-----BEGIN NEW CERTIFICATE REQUEST-----",
            "-----BEGIN CERTIFICATE REQUEST-----",
        );
        let text = text.replace(
            "-----END NEW CERTIFICATE REQUEST-----",
            "-----END CERTIFICATE REQUEST-----",
        );
        let requests = if text.contains("-----BEGIN CERTIFICATE REQUEST-----") {
            <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes())
                .filter(|section| !matches!(section, Ok((kind, _)) if *kind != SectionKind::Csr))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CertError::parse(what, path, format!("malformed PEM: {e:?}")))?
        } else {
            Vec::new()
        };
        let der = match requests.as_slice() {
            [(_, der)] => der,
            [] if bytes.first() == Some(&0x30) => {
                return Err(CertError::parse(
                    what,
                    path,
                    "no CERTIFICATE REQUEST block; for a DER request, convert it first: \
                     `openssl req -inform DER -in FILE -out FILE.csr`",
                ));
            }
            [] => {
                return Err(CertError::parse(
                    what,
                    path,
                    "no CERTIFICATE REQUEST block (make one with `trmx-certs request`)",
                ));
            }
            more => {
                return Err(CertError::parse(
                    what,
                    path,
                    format!(
                        "{} CERTIFICATE REQUEST blocks: send one request per file",
                        more.len()
                    ),
                ));
            }
        };
        let public_key =
            verified_key(der).map_err(|problem| CertError::parse(what, path, problem))?;
        Ok(CertRequest {
            public_key,
            path: path.to_path_buf(),
            kept_key: None,
        })
    }

    /// The request file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public key to certify.
    pub(crate) fn public_key(&self) -> &RequestKey {
        &self.public_key
    }

    /// SHA-256 of the public key's SubjectPublicKeyInfo, in groups of four hex digits
    /// (`3f2a 9c01 …`): what the CA administrator reads out to the organisation before
    /// issuing. openssl prints the same digits for a request with `openssl req -in FILE
    /// -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum` (`openssl x509` for
    /// the certificate).
    pub fn fingerprint(&self) -> String {
        key_fingerprint(&self.public_key.subject_public_key_info())
    }
}

/// The key of a DER request whose signature proves that its sender holds the private key.
/// Only the key is taken: the subject, the attributes and any extensions the request asks
/// for are ignored (not refused: the CA decides all of them).
fn verified_key(der: &[u8]) -> Result<RequestKey, String> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| format!("not a PKCS #10 certificate request: {e}"))?;
    if !rest.is_empty() {
        return Err("data after the request".to_string());
    }
    // the key first: an unsupported one is named, not reported as a bad signature
    let key = request_key(&csr.certification_request_info.subject_pki)?;
    csr.verify_signature().map_err(|e| match e {
        X509Error::SignatureUnsupportedAlgorithm => format!(
            "its signature algorithm ({}) is not supported: sign it with SHA-256 or SHA-384",
            csr.signature_algorithm.algorithm
        ),
        _ => "its signature does not match its key (damaged or altered)".to_string(),
    })?;
    // the certificate carries the key exactly as the request has it
    if key.subject_public_key_info() != csr.certification_request_info.subject_pki.raw {
        return Err(format!(
            "its key is encoded in an unusual way (not as a certificate would carry it): \
             {SUPPORTED_KEYS}"
        ));
    }
    Ok(key)
}

/// The certificate beside `key_path` (the same name with `.pem`) that is in date and
/// certifies the key in it: replacing that key leaves the certificate unusable (the node
/// refuses it at its next start). `None` for a key without such a certificate (expired,
/// missing, another key's, unreadable).
fn key_in_use(key_path: &Path) -> Option<(PathBuf, crate::CertInfo)> {
    let pem = std::fs::read_to_string(key_path).ok()?;
    let key = KeyPair::from_pem(&pem).ok()?;
    let cert_path = key_path.with_extension("pem");
    let cert = crate::CertInfo::from_pem_file(&cert_path).ok()?;
    let fingerprint = key_fingerprint(&rcgen::PublicKeyData::subject_public_key_info(&key));
    (fingerprint == cert.key_fingerprint && cert.is_valid_at(std::time::SystemTime::now()))
        .then_some((cert_path, cert))
}

/// A path prefix beside `out`'s whose key and request files do not exist (`NL-NRM-2`, or
/// the first free number after it): a name for a renewal's request to suggest. (Free when
/// suggested; only a suggestion, the run it is given to checks again.)
fn free_prefix(out: &RequestPaths) -> PathBuf {
    let key = out.key.as_os_str().to_string_lossy();
    let prefix = key.strip_suffix(".key").unwrap_or(&key);
    let free = |candidate: &Path| {
        let paths = RequestPaths::from_prefix(candidate);
        [paths.key, paths.request]
            .iter()
            .all(|p| std::fs::symlink_metadata(p).is_err())
    };
    (2..100)
        .map(|n| PathBuf::from(format!("{prefix}-{n}")))
        .find(|candidate| free(candidate))
        .unwrap_or_else(|| PathBuf::from(format!("{prefix}-new")))
}

/// Gives the key at `key_path` a second name, `<key>.replaced-<unix seconds>` (a hard
/// link: same file, same mode), before a new key replaces it. `request --out NL-NRM
/// --force` was refused while NL-NRM.pem was in date, even after it was revoked for a key
/// leak, the very case that needs a new key; the old key is kept in case the certificate
/// is in fact still in use.
fn keep_key(
    key_path: &Path,
    (cert, info): (PathBuf, crate::CertInfo),
) -> Result<KeptKey, CertError> {
    Ok(KeptKey {
        path: keep_aside(key_path, |from, to| std::fs::hard_link(from, to))?,
        cert,
        identity: info.identity.spiffe_uri(),
        not_after: info.not_after,
    })
}

/// Gives the file at `key_path` the first free name `<key>.replaced-<unix seconds>[-n]`,
/// with `link` (tests make it fail); where no hard link can be made (vfat, some network
/// mounts) as a copy, mode `0600`. It failed there, so `request --force` could not replace
/// such a key at all. A name that exists is never written over, whoever made it.
fn keep_aside(
    key_path: &Path,
    link: impl Fn(&Path, &Path) -> std::io::Result<()>,
) -> Result<PathBuf, CertError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut old_key: Option<Vec<u8>> = None;
    let mut n = 1;
    loop {
        let mut name = key_path.as_os_str().to_os_string();
        name.push(format!(".replaced-{stamp}"));
        if n > 1 {
            name.push(format!("-{n}"));
        }
        let path = PathBuf::from(name);
        let kept = match &old_key {
            None => link(key_path, &path)
                .map_err(|e| CertError::io("keep the replaced key as", &path, e)),
            Some(old_key) => write_atomic("replaced key", &path, old_key, Mode::Secret, false),
        };
        match kept {
            Ok(()) => return Ok(path),
            Err(CertError::AlreadyExists { .. }) => n += 1,
            Err(CertError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                n += 1;
            }
            // no hard link here: the same name again, as a copy
            Err(_) if old_key.is_none() => {
                let bytes = std::fs::read(key_path)
                    .map_err(|e| CertError::io("read the replaced key", key_path, e))?;
                old_key = Some(bytes);
            }
            Err(e) => return Err(e),
        }
    }
}

/// SHA-256 of a public key's DER SubjectPublicKeyInfo (the key with its algorithm and
/// curve, as a request or a certificate carries it), in groups of four hex digits.
pub fn key_fingerprint(subject_public_key_info: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, subject_public_key_info);
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
        assert_eq!(
            key_fingerprint(&key.subject_public_key_info()),
            made.fingerprint()
        );
        // never over existing files without force
        let err = CertRequest::create("NL-NRM", &out, false).unwrap_err();
        assert!(matches!(err, CertError::RequestExists { .. }), "{err}");
    }

    /// Where no hard link can be made (vfat, some network mounts), `request --force` of a
    /// key in use failed (`cannot keep the replaced key as …`) and could not replace it at
    /// all. The old key is kept as a copy, mode 0600; a name that exists is skipped, never
    /// written over.
    #[test]
    fn a_replaced_key_is_kept_as_a_copy_without_hard_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("NL-NRM.key");
        std::fs::write(&key, b"old key").unwrap();
        let no_links = |_: &Path, _: &Path| Err(std::io::Error::other("no hard links here"));
        let kept = keep_aside(&key, no_links).unwrap();
        assert_eq!(std::fs::read(&kept).unwrap(), b"old key");
        let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // the name is taken now: the next one is another, and the first stays as it was
        let again = keep_aside(&key, no_links).unwrap();
        assert_ne!(again, kept);
        assert_eq!(std::fs::read(&kept).unwrap(), b"old key");
        let linked = keep_aside(&key, |from, to| std::fs::hard_link(from, to)).unwrap();
        assert!(![&kept, &again].contains(&&linked));
        assert_eq!(std::fs::read(&linked).unwrap(), b"old key");
    }

    #[test]
    fn a_request_labelled_new_certificate_request_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let out = RequestPaths::from_prefix(&dir.path().join("x"));
        let made = CertRequest::create("x", &out, false).unwrap();
        let pem = std::fs::read_to_string(&out.request).unwrap();
        let relabelled = pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        assert_ne!(relabelled, pem);
        std::fs::write(&out.request, relabelled).unwrap();
        let read = CertRequest::from_pem_file(&out.request).unwrap();
        assert_eq!(read.fingerprint(), made.fingerprint());
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
