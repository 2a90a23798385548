//! A whole federation in one directory, for tests and demos.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::{Ca, CaOptions, CertError, CertPaths, IssueSpec};

/// A CA in `<dir>/ca` and certificates next to it in `<dir>`:
/// `broker-<name>.pem/.key`, `<PARTICIPANT-ID>.pem/.key`, `operator-<name>.pem/.key`.
///
/// Meant for tests and demos: `create` replaces any federation already in the directory,
/// and issuing the same name twice replaces the earlier files.
#[derive(Debug)]
pub struct Federation {
    /// The federation directory.
    pub dir: PathBuf,
    /// Its CA (`<dir>/ca`).
    pub ca: Ca,
}

impl Federation {
    /// Creates the directory and a fresh CA named `<trust_domain> federation CA`.
    pub fn create(dir: &Path, trust_domain: &str) -> Result<Federation, CertError> {
        let opts = CaOptions {
            force: true,
            ..CaOptions::new(trust_domain, &format!("{trust_domain} federation CA"))
        };
        let ca = Ca::init(&dir.join("ca"), &opts)?;
        Ok(Federation {
            dir: dir.to_path_buf(),
            ca,
        })
    }

    /// Opens a federation made by [`Federation::create`].
    pub fn open(dir: &Path) -> Result<Federation, CertError> {
        Ok(Federation {
            dir: dir.to_path_buf(),
            ca: Ca::open(&dir.join("ca"))?,
        })
    }

    /// The CA certificate (trust anchor) path.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.ca.ca_cert_path()
    }

    /// The CRL path.
    pub fn crl_path(&self) -> PathBuf {
        self.ca.crl_path()
    }

    /// A broker certificate `broker-<name>`: DNS `localhost`, IPs `127.0.0.1` and `::1`,
    /// serverAuth and clientAuth.
    pub fn broker(&self, name: &str) -> Result<CertPaths, CertError> {
        let spec = IssueSpec::broker(
            name,
            vec!["localhost".to_string()],
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        );
        self.issue(&format!("broker-{name}"), &spec)
    }

    /// A node certificate `<ID>` for a participant, clientAuth only.
    pub fn participant(&self, id: &str) -> Result<CertPaths, CertError> {
        crate::identity::validate_participant_id(id)?;
        self.issue(id, &IssueSpec::participant(id))
    }

    /// An operator certificate `operator-<name>`, clientAuth only.
    pub fn operator(&self, name: &str) -> Result<CertPaths, CertError> {
        crate::identity::validate_name("operator", name)?;
        self.issue(&format!("operator-{name}"), &IssueSpec::operator(name))
    }

    /// Issues any spec to `<dir>/<file_stem>.pem/.key`, replacing earlier files.
    pub fn issue(&self, file_stem: &str, spec: &IssueSpec) -> Result<CertPaths, CertError> {
        spec.role.validate()?;
        let paths = CertPaths::from_prefix(&self.dir.join(file_stem));
        self.ca.issue(spec, &paths, true)?;
        Ok(paths)
    }

    /// Revokes a certificate and rewrites the CRL.
    pub fn revoke(&self, cert: &CertPaths) -> Result<(), CertError> {
        self.ca.revoke(&cert.cert).map(drop)
    }
}
