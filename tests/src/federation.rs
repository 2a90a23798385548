//! A local federation on disk: the PKI, a broker config with the participant
//! registry of the demo story, and one node config per participant.
//!
//! Used by the demo (`trmx-demo`) and by the end-to-end tests; everything is
//! generated at run time in a directory of the caller's (no key is ever
//! committed).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use trmx_certs::{CertPaths, Federation};

/// Trust domain of the demo federation.
pub const TRUST_DOMAIN: &str = "trm.demo";

/// One participant of the local federation.
#[derive(Debug, Clone)]
pub struct Member {
    /// Participant ID, e.g. `NL-NRM`.
    pub id: &'static str,
    /// Display name in the registry.
    pub display_name: &'static str,
    /// `nrm`, `ngo`, `authority`, … (broker config spelling).
    pub organisation_type: &'static str,
}

/// The three organisations of the DOMAIN.md story.
pub const STORY_MEMBERS: [Member; 3] = [
    Member {
        id: "NL-NRM",
        display_name: "Dutch National Referral Mechanism",
        organisation_type: "nrm",
    },
    Member {
        id: "BE-PAYOKE",
        display_name: "Payoke (Antwerp)",
        organisation_type: "ngo",
    },
    Member {
        id: "NG-NAPTIP",
        display_name: "National Agency for the Prohibition of Trafficking in Persons",
        organisation_type: "authority",
    },
];

/// Every application kind, as the broker config spells them.
const ALL_KINDS: &str = r#"["referral", "referral-response", "return-risk-assessment-request", "return-risk-assessment", "follow-up"]"#;

/// Paths of a generated local federation.
#[derive(Debug)]
pub struct LocalFederation {
    /// Root directory.
    pub dir: PathBuf,
    /// The PKI.
    pub pki: Federation,
    /// The broker's certificate and key.
    pub broker_cert: CertPaths,
    /// The members.
    pub members: Vec<Member>,
}

impl LocalFederation {
    /// Creates the CA, the broker certificate and one node certificate per member.
    pub fn create(dir: &Path, members: &[Member]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Federation::create(&dir.join("pki"), TRUST_DOMAIN)?;
        let broker_cert = pki.broker("demo")?;
        for member in members {
            pki.participant(member.id)?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            pki,
            broker_cert,
            members: members.to_vec(),
        })
    }

    /// Writes `broker/broker.toml` and returns its path. The broker listens on
    /// 127.0.0.1:0; its ready file tells the bound address.
    pub fn write_broker_config(&self, extra: &str) -> anyhow::Result<PathBuf> {
        let broker_dir = self.dir.join("broker");
        std::fs::create_dir_all(&broker_dir)?;
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\n\
             admin_listen = \"127.0.0.1:0\"\n\
             data_dir = {data:?}\n\n\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\ncrl = {crl:?}\n\n\
             [limits]\nmin_free_disk_bytes = \"64MiB\"\n\n{extra}\n",
            data = broker_dir.join("data"),
            ca = self.pki.ca_cert_path(),
            cert = self.broker_cert.cert,
            key = self.broker_cert.key,
            crl = self.pki.crl_path(),
        );
        for member in &self.members {
            text.push_str(&format!(
                "[[participants]]\nid = {id:?}\ndisplay_name = {name:?}\ncountry = {country:?}\n\
                 organisation_type = {org:?}\naccepts = {ALL_KINDS}\n\n",
                id = member.id,
                name = member.display_name,
                country = &member.id[..2],
                org = member.organisation_type,
            ));
        }
        let path = broker_dir.join("broker.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Writes `<ID>/node.toml` for `member` pointing at the broker at `broker`,
    /// and returns its path. The local API socket is `<ID>/node.sock`.
    pub fn write_node_config(&self, member: &str, broker: SocketAddr) -> anyhow::Result<PathBuf> {
        let node_dir = self.dir.join(member);
        std::fs::create_dir_all(&node_dir)?;
        let cert = CertPaths::from_prefix(&self.pki.dir.join(member));
        let text = format!(
            "participant = {member:?}\n\
             data_dir = {data:?}\n\n\
             [broker]\naddress = \"{broker}\"\nserver_name = \"localhost\"\n\
             reconnect_min_ms = 100\nreconnect_max_ms = 1000\n\n\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\n\
             [api]\nsocket = {socket:?}\n",
            data = node_dir.join("data"),
            ca = self.pki.ca_cert_path(),
            cert = cert.cert,
            key = cert.key,
            socket = node_dir.join("node.sock"),
        );
        let path = node_dir.join("node.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}
