//! SPIFFE-style identities: who a certificate says it is.
//!
//! Every trmx certificate carries exactly one URI SAN:
//! `spiffe://<trust-domain>/participant/<ID>`, `spiffe://<trust-domain>/operator/<name>`
//! or `spiffe://<trust-domain>/broker/<name>`. This module validates the parts and parses
//! the URI back out of a DER certificate.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CertError;

/// What a certificate is for, with the name it carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// A broker (server) certificate, e.g. `Broker("eu-1")`.
    Broker(String),
    /// A participant's node certificate, e.g. `Participant("NL-NRM")`.
    Participant(String),
    /// An operator's certificate, e.g. `Operator("alice")`.
    Operator(String),
}

impl Role {
    /// The SPIFFE path kind: `broker`, `participant` or `operator`.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Broker(_) => "broker",
            Role::Participant(_) => "participant",
            Role::Operator(_) => "operator",
        }
    }

    /// The name or participant id carried by the role.
    pub fn name(&self) -> &str {
        match self {
            Role::Broker(n) | Role::Participant(n) | Role::Operator(n) => n,
        }
    }

    /// Builds a role from its SPIFFE path kind and name, validating the name.
    pub fn from_parts(kind: &str, name: &str) -> Result<Role, CertError> {
        match kind {
            "participant" => {
                validate_participant_id(name)?;
                Ok(Role::Participant(name.to_string()))
            }
            "operator" => {
                validate_name("operator", name)?;
                Ok(Role::Operator(name.to_string()))
            }
            "broker" => {
                validate_name("broker", name)?;
                Ok(Role::Broker(name.to_string()))
            }
            other => Err(CertError::InvalidIdentity {
                problem: format!(
                    "unknown role {other:?} (expected participant, operator or broker)"
                ),
            }),
        }
    }

    /// Checks the name or participant id carried by the role.
    pub fn validate(&self) -> Result<(), CertError> {
        match self {
            Role::Participant(id) => validate_participant_id(id),
            Role::Operator(n) => validate_name("operator", n),
            Role::Broker(n) => validate_name("broker", n),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.name())
    }
}

/// The identity of a certificate: its trust domain and role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The federation's SPIFFE trust domain, e.g. `trm.example`.
    pub trust_domain: String,
    /// Who the certificate belongs to.
    pub role: Role,
}

impl Identity {
    /// Builds an identity, validating the trust domain and the role's name.
    pub fn new(trust_domain: &str, role: Role) -> Result<Identity, CertError> {
        validate_trust_domain(trust_domain)?;
        role.validate()?;
        Ok(Identity {
            trust_domain: trust_domain.to_string(),
            role,
        })
    }

    /// Reads the identity of a DER certificate: it must carry exactly one URI SAN, a
    /// well-formed `spiffe://` URI with a valid role and name.
    pub fn from_der(cert_der: &[u8]) -> Result<Identity, CertError> {
        let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| CertError::Parse {
            what: "certificate",
            location: "(DER input)".to_string(),
            problem: e.to_string(),
        })?;
        Identity::from_x509(&cert)
    }

    /// [`Identity::from_der`], and the trust domain must be `trust_domain` (a broker uses
    /// this on a verified peer certificate).
    pub fn from_der_in_domain(cert_der: &[u8], trust_domain: &str) -> Result<Identity, CertError> {
        let id = Identity::from_der(cert_der)?;
        if id.trust_domain != trust_domain {
            return Err(CertError::TrustDomainMismatch {
                expected: trust_domain.to_string(),
                found: id.trust_domain,
            });
        }
        Ok(id)
    }

    pub(crate) fn from_x509(cert: &X509Certificate<'_>) -> Result<Identity, CertError> {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertError::InvalidIdentity {
                problem: format!("subject alternative name extension: {e}"),
            })?
            .ok_or_else(|| CertError::InvalidIdentity {
                problem: "no subject alternative name extension".to_string(),
            })?;
        let mut uris = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        let uri = uris.next().ok_or_else(|| CertError::InvalidIdentity {
            problem: "no URI subject alternative name".to_string(),
        })?;
        if uris.next().is_some() {
            return Err(CertError::InvalidIdentity {
                problem: "more than one URI subject alternative name".to_string(),
            });
        }
        Identity::from_spiffe_uri(uri)
    }

    /// Parses `spiffe://<trust-domain>/<kind>/<name>`.
    pub fn from_spiffe_uri(uri: &str) -> Result<Identity, CertError> {
        let bad = |problem: &str| CertError::InvalidIdentity {
            problem: format!("URI {uri:?}: {problem}"),
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let (Some(domain), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected spiffe://<trust-domain>/<role>/<name>"));
        };
        validate_trust_domain(domain)?;
        let role = Role::from_parts(kind, name)?;
        Ok(Identity {
            trust_domain: domain.to_string(),
            role,
        })
    }

    /// The URI SAN form: `spiffe://<trust-domain>/participant/NL-NRM`.
    pub fn spiffe_uri(&self) -> String {
        format!(
            "spiffe://{}/{}/{}",
            self.trust_domain,
            self.role.kind(),
            self.role.name()
        )
    }

    /// The participant id, for a node certificate.
    pub fn participant(&self) -> Option<&str> {
        match &self.role {
            Role::Participant(id) => Some(id),
            _ => None,
        }
    }

    /// The operator name, for an operator certificate.
    pub fn operator(&self) -> Option<&str> {
        match &self.role {
            Role::Operator(n) => Some(n),
            _ => None,
        }
    }

    /// The broker name, for a broker certificate.
    pub fn broker(&self) -> Option<&str> {
        match &self.role {
            Role::Broker(n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spiffe_uri())
    }
}

/// Checks a participant id against `^(?:[A-Z]{2}|INT)-[A-Z0-9]{2,24}$`.
pub fn validate_participant_id(id: &str) -> Result<(), CertError> {
    let ok = match id.split_once('-') {
        Some((country, org)) => {
            let country_ok = country == "INT"
                || (country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase()));
            let org_ok = (2..=24).contains(&org.len())
                && org
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
            country_ok && org_ok
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidParticipantId { id: id.to_string() })
    }
}

/// Checks an operator or broker name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not `.` or `..`.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), CertError> {
    let ok = (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

/// Checks a SPIFFE trust domain: 1 to 255 of `a-z 0-9 . _ -`.
pub fn validate_trust_domain(domain: &str) -> Result<(), CertError> {
    let ok = (1..=255).contains(&domain.len())
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidTrustDomain {
            domain: domain.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participant_ids() {
        for ok in [
            "NL-NRM",
            "BE-PAYOKE",
            "NG-NAPTIP",
            "INT-IOM",
            "DE-K0K",
            "FR-AB",
        ] {
            assert!(validate_participant_id(ok).is_ok(), "{ok}");
        }
        let long_ok = format!("NL-{}", "A".repeat(24));
        assert!(validate_participant_id(&long_ok).is_ok());
        let too_long = format!("NL-{}", "A".repeat(25));
        for bad in [
            "nl-nrm",
            "NL-N",
            "NLD-NRM",
            "N-NRM",
            "NL_NRM",
            "NL-NR-M",
            "NL-",
            "-NRM",
            "",
            "INTL-X1",
            "NL-nrm",
            "N1-NRM",
            too_long.as_str(),
            "NL-NRM ",
            "ÄÄ-NRM",
        ] {
            assert!(validate_participant_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn participant_error_is_one_line() {
        let e = validate_participant_id("nl-nrm").unwrap_err().to_string();
        assert_eq!(
            e,
            "participant id \"nl-nrm\" is invalid: expected CC-ORG like NL-NRM"
        );
    }

    #[test]
    fn names_and_domains() {
        assert!(validate_name("operator", "alice").is_ok());
        assert!(validate_name("broker", "eu-1.main_b").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(validate_name("operator", bad).is_err(), "{bad:?}");
        }
        assert!(validate_trust_domain("trm.example").is_ok());
        for bad in ["", "TRM.example", "trm.example/x", "trm example", "a:1"] {
            assert!(validate_trust_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spiffe_uri_round_trip() {
        for role in [
            Role::Participant("NL-NRM".into()),
            Role::Operator("alice".into()),
            Role::Broker("eu-1".into()),
        ] {
            let id = Identity::new("trm.example", role).unwrap();
            let back = Identity::from_spiffe_uri(&id.spiffe_uri()).unwrap();
            assert_eq!(back, id);
        }
        let id = Identity::from_spiffe_uri("spiffe://trm.example/participant/NL-NRM").unwrap();
        assert_eq!(id.participant(), Some("NL-NRM"));
        assert_eq!(id.operator(), None);
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "https://trm.example/participant/NL-NRM",
            "spiffe://trm.example/participant/nl-nrm",
            "spiffe://trm.example/participant",
            "spiffe://trm.example/participant/NL-NRM/x",
            "spiffe://trm.example/admin/alice",
            "spiffe://TRM/participant/NL-NRM",
            "spiffe://trm.example:443/participant/NL-NRM",
            "spiffe://user@trm.example/participant/NL-NRM",
            "spiffe://trm.example/participant/NL-NRM?x=1",
            "spiffe:///participant/NL-NRM",
        ] {
            assert!(Identity::from_spiffe_uri(bad).is_err(), "{bad}");
        }
    }

    fn cert_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.to_string().try_into().unwrap())
    }

    #[test]
    fn from_der_needs_exactly_one_spiffe_uri() {
        let good = cert_with_sans(vec![
            uri("spiffe://trm.example/participant/NL-NRM"),
            rcgen::SanType::DnsName("localhost".to_string().try_into().unwrap()),
        ]);
        assert_eq!(
            Identity::from_der(&good).unwrap().participant(),
            Some("NL-NRM")
        );
        let two = cert_with_sans(vec![
            uri("spiffe://trm.example/participant/NL-NRM"),
            uri("spiffe://trm.example/participant/BE-PAYOKE"),
        ]);
        let e = Identity::from_der(&two).unwrap_err().to_string();
        assert!(e.contains("more than one URI"), "{e}");
        let none = cert_with_sans(vec![rcgen::SanType::DnsName(
            "localhost".to_string().try_into().unwrap(),
        )]);
        assert!(Identity::from_der(&none).is_err());
        let no_san = cert_with_sans(vec![]);
        assert!(Identity::from_der(&no_san).is_err());
        let bad_id = cert_with_sans(vec![uri("spiffe://trm.example/participant/nl-nrm")]);
        assert!(matches!(
            Identity::from_der(&bad_id),
            Err(CertError::InvalidParticipantId { .. })
        ));
        assert!(Identity::from_der(b"garbage").is_err());
        assert!(Identity::from_der_in_domain(&good, "trm.example").is_ok());
        assert!(matches!(
            Identity::from_der_in_domain(&good, "other.example"),
            Err(CertError::TrustDomainMismatch { .. })
        ));
    }
}
