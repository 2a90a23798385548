//! Reading a certificate back: identity, serial, validity, names.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::time::ASN1Time;

use crate::{CertError, Identity, load_certs_pem};

/// What `show` prints and what the CA needs to renew or revoke a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The SPIFFE identity (trust domain and role).
    pub identity: Identity,
    /// The serial number, lower-case hex without leading zero bytes.
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The issuer's distinguished name, e.g. `CN=TRM Federation CA`.
    pub issuer: String,
    /// The subject's distinguished name.
    pub subject: String,
    /// DNS name SANs (brokers only).
    pub dns_names: Vec<String>,
    /// IP address SANs (brokers only).
    pub ips: Vec<IpAddr>,
    /// The certificate may authenticate a TLS server.
    pub server_auth: bool,
    /// The certificate may authenticate a TLS client.
    pub client_auth: bool,
    /// [`crate::key_fingerprint`] of its public key: the digits `trmx-certs request`
    /// printed for the key the certificate was issued to.
    pub key_fingerprint: String,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, CertError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse {
            what: "certificate",
            location: "(DER input)".to_string(),
            problem: e.to_string(),
        })?;
        CertInfo::from_x509(&cert)
    }

    /// Parses the first certificate of a PEM file.
    pub fn from_pem_file(path: &Path) -> Result<CertInfo, CertError> {
        let certs = load_certs_pem(path)?;
        let first = certs
            .first()
            .ok_or_else(|| CertError::parse("certificate", path, "no CERTIFICATE block"))?;
        let (_, cert) = X509Certificate::from_der(first)
            .map_err(|e| CertError::parse("certificate", path, e))?;
        CertInfo::from_x509(&cert).map_err(|e| match e {
            CertError::InvalidIdentity { problem } => {
                CertError::parse("certificate", path, format!("identity: {problem}"))
            }
            other => other,
        })
    }

    pub(crate) fn from_x509(cert: &X509Certificate<'_>) -> Result<CertInfo, CertError> {
        let identity = Identity::from_x509(cert)?;
        let mut dns_names = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push((*d).to_string()),
                    GeneralName::IPAddress(b) => {
                        if let Some(ip) = ip_from_bytes(b) {
                            ips.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        let (server_auth, client_auth) = match cert.extended_key_usage() {
            Ok(Some(eku)) => (eku.value.server_auth, eku.value.client_auth),
            _ => (false, false),
        };
        Ok(CertInfo {
            identity,
            serial_hex: serial_hex(cert.tbs_certificate.raw_serial()),
            not_before: system_time(cert.validity().not_before),
            not_after: system_time(cert.validity().not_after),
            issuer: cert.issuer().to_string(),
            subject: cert.subject().to_string(),
            dns_names,
            ips,
            server_auth,
            client_auth,
            key_fingerprint: crate::key_fingerprint(cert.public_key().raw),
        })
    }

    /// Whether `now` lies inside the validity period.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// When the certificate is not valid yet at `now` (this machine's clock): what is
    /// known and what to do, for `check-config`. One of two clocks is off and which
    /// cannot be told from here: this one is behind (the certificate is fine for `peers`,
    /// those who verify it, but their own new certificates look not valid yet here), or
    /// the CA machine's was ahead when it issued it (`peers` refuse it until its start).
    /// `None` when it is valid from `now` on.
    pub fn not_valid_yet(&self, now: SystemTime, peers: &str) -> Option<NotValidYet> {
        let ahead = self
            .not_before
            .duration_since(now)
            .ok()
            .filter(|d| !d.is_zero())?;
        let minutes = ahead.as_secs().div_ceil(60);
        // (rounded up to minutes, 3 seconds read "1 minute(s)")
        let span = if ahead < Duration::from_secs(60) {
            format!("{} second(s)", ahead.as_secs().max(1))
        } else {
            format!("{minutes} minute(s)")
        };
        let from = crate::format_time(self.not_before);
        let message = format!(
            "it is not valid before {from}, and this machine's clock says {}, {span} \
             earlier: either this clock is behind (the certificate is valid for {peers} with \
             a right clock, but their certificates issued in the last {span} look not valid \
             yet here) or the CA machine's clock was ahead when it \
             issued the certificate ({peers} would refuse it until {from}); compare both \
             clocks with a time source (`timedatectl`, `chronyc tracking`), then set this one \
             right or issue the certificate again with the CA machine's clock right",
            crate::format_time(now)
        );
        Some(NotValidYet {
            warn_only: ahead <= NOT_VALID_YET_WARN,
            span,
            message,
        })
    }
}

/// A certificate not valid yet by at most this long is a warning in `check-config`, not a
/// failure: it becomes valid by itself within minutes (its `notBefore` is already
/// [`crate::CLOCK_SKEW_ALLOWANCE`] before the CA's clock at issue), and which clock is off
/// cannot be told from here.
pub const NOT_VALID_YET_WARN: Duration = Duration::from_secs(10 * 60);

/// A certificate not valid yet by this machine's clock ([`CertInfo::not_valid_yet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotValidYet {
    /// Within [`NOT_VALID_YET_WARN`]: a warning, not a failure.
    pub warn_only: bool,
    /// How long until it is valid here, for a reader: `3 second(s)` below a minute,
    /// else `4 minute(s)` (rounded up).
    pub span: String,
    /// What is known and what to do, starting `it is not valid before …`.
    pub message: String,
}

/// Lower-case hex of a DER integer's bytes, without leading zero bytes.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Normalizes a user-given serial: lower case, no `0x`, no `:`, no leading zero bytes.
pub(crate) fn normalize_serial(s: &str) -> String {
    let s = s
        .trim()
        .trim_start_matches("0x")
        .replace(':', "")
        .to_ascii_lowercase();
    let trimmed = s.trim_start_matches('0');
    let mut t = trimmed.to_string();
    if !t.len().is_multiple_of(2) {
        t.insert(0, '0');
    }
    if t.is_empty() { "00".to_string() } else { t }
}

pub(crate) fn system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Some(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(b) {
        return Some(IpAddr::from(v6));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_strips_leading_zeros() {
        assert_eq!(serial_hex(&[0x00, 0x9a, 0x01]), "9a01");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(normalize_serial("0x00:9A:01"), "9a01");
        assert_eq!(normalize_serial("A01"), "0a01");
    }

    /// The span a reader is told, and where a warning becomes a failure: 3 seconds read
    /// "1 minute(s)" before, and a renewal issued at the CA's own time (its notBefore
    /// [`crate::CLOCK_SKEW_ALLOWANCE`] back) must not be told at all.
    #[test]
    fn not_valid_yet_tells_seconds_below_a_minute_and_fails_beyond_the_warning() {
        let dir = tempfile::tempdir().unwrap();
        let fed = crate::Federation::create(dir.path(), "trm.test").unwrap();
        let node = fed.participant("NL-NRM").unwrap();
        let info = CertInfo::from_pem_file(&node.cert).unwrap();
        let before = |by: Duration| info.not_before - by;
        assert_eq!(info.not_valid_yet(SystemTime::now(), "the broker"), None);
        assert_eq!(info.not_valid_yet(info.not_before, "the broker"), None);

        let soon = info
            .not_valid_yet(before(Duration::from_secs(3)), "x")
            .unwrap();
        assert_eq!((soon.span.as_str(), soon.warn_only), ("3 second(s)", true));
        assert!(
            soon.message.contains(", 3 second(s) earlier"),
            "{}",
            soon.message
        );
        let at_limit = info.not_valid_yet(before(NOT_VALID_YET_WARN), "x").unwrap();
        assert_eq!(
            (at_limit.span.as_str(), at_limit.warn_only),
            ("10 minute(s)", true)
        );
        let beyond = NOT_VALID_YET_WARN + Duration::from_secs(1);
        let beyond = info.not_valid_yet(before(beyond), "x").unwrap();
        assert_eq!(
            (beyond.span.as_str(), beyond.warn_only),
            ("11 minute(s)", false)
        );
    }
}
