//! CA rollover without a flag day: a second CA of the same trust domain joins the broker's
//! `tls.ca` bundle and `tls.crl`, takes over the broker's certificate, and the first CA is
//! dropped — by reloads alone, never a restart.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use trmx_certs::{Ca, CaOptions, CertPaths, IssueSpec};
use trmx_transport::{
    ClientOptions, CrlPolicy, CrlRecord, ListenerLimits, ServerTls, TlsFile, TlsPaths,
    TransportError, client_channel, client_config,
};

use super::harness::{
    Fixture, Server, TRUST_DOMAIN, check_request, eventually, health, raw_accepted,
};

/// `out` as the concatenation of `parts` (what `cat a.pem b.pem > out` does).
fn cat(out: &Path, parts: &[PathBuf]) {
    let mut text = String::new();
    for part in parts {
        text.push_str(&std::fs::read_to_string(part).unwrap());
    }
    std::fs::write(out, text).unwrap();
}

/// `cert` and its key, trusting the CAs in `ca`.
fn with_ca(cert: &CertPaths, ca: &Path) -> TlsPaths {
    TlsPaths {
        ca: ca.to_owned(),
        cert: cert.cert.clone(),
        key: cert.key.clone(),
    }
}

fn second_ca(fx: &Fixture, name: &str) -> Ca {
    Ca::init(
        &fx.dir.path().join("ca2"),
        &CaOptions::new(TRUST_DOMAIN, name),
    )
    .unwrap()
}

fn participant(fx: &Fixture, ca: &Ca, id: &str) -> CertPaths {
    let paths = CertPaths::from_prefix(&fx.dir.path().join(id));
    ca.issue(&IssueSpec::participant(id), &paths, true).unwrap();
    paths
}

fn broker_spec() -> IssueSpec {
    IssueSpec::broker(
        "main",
        vec!["localhost".to_owned()],
        vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
    )
}

/// The broker's own `tls.ca` and `tls.crl`, first holding CA1's certificate and CRL.
struct BrokerFiles {
    ca: PathBuf,
    crl: PathBuf,
}

impl BrokerFiles {
    fn new(fx: &Fixture) -> BrokerFiles {
        let etc = fx.dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let files = BrokerFiles {
            ca: etc.join("tls.ca"),
            crl: etc.join("tls.crl"),
        };
        files.set(&[&fx.fed.ca]);
        files
    }

    /// Trust exactly `cas`, with their CRLs as they are now.
    fn set(&self, cas: &[&Ca]) {
        let certs: Vec<PathBuf> = cas.iter().map(|ca| ca.ca_cert_path()).collect();
        let crls: Vec<PathBuf> = cas.iter().map(|ca| ca.crl_path()).collect();
        cat(&self.ca, &certs);
        cat(&self.crl, &crls);
    }

    fn load(&self, fx: &Fixture) -> Result<ServerTls, TransportError> {
        ServerTls::load(
            &with_ca(&fx.broker, &self.ca),
            Some(&self.crl),
            CrlPolicy::Strict,
        )
    }
}

#[tokio::test]
async fn a_second_ca_takes_over_by_reloads_alone() {
    let fx = Fixture::new();
    let ca1 = &fx.fed.ca;
    let files = BrokerFiles::new(&fx);
    let node_a = fx.fed.participant("NL-NRM").unwrap();
    let a_trusting_ca1 = client_config(&with_ca(&node_a, &ca1.ca_cert_path())).unwrap();
    let server = Server::start(files.load(&fx).unwrap(), ListenerLimits::default()).await;

    // node A, trusting CA1 only, keeps a stream open through the rollover
    let mut a_client = health(server.addr, &with_ca(&node_a, &ca1.ca_cert_path()));
    let mut a_watch = a_client.watch(check_request()).await.unwrap().into_inner();
    a_watch.message().await.unwrap().unwrap();
    assert!(
        raw_accepted(server.addr, a_trusting_ca1.clone())
            .await
            .unwrap()
    );

    // 1. CA2 appears; the broker trusts the bundle CA1+CA2 with both CRLs
    let ca2 = second_ca(&fx, "trm.test federation CA 2");
    let bundle = fx.dir.path().join("bundle.pem");
    cat(&bundle, &[ca1.ca_cert_path(), ca2.ca_cert_path()]);
    files.set(&[ca1, &ca2]);
    let report = server.tls.reload().unwrap();
    assert!(report.closed.is_empty(), "{report:?}");
    assert!(!report.crl.stale);
    assert!(
        raw_accepted(server.addr, a_trusting_ca1.clone())
            .await
            .unwrap()
    );
    let node_b = participant(&fx, &ca2, "BE-PAYOKE");
    let b_config = client_config(&with_ca(&node_b, &bundle)).unwrap();
    assert!(raw_accepted(server.addr, b_config.clone()).await.unwrap());
    a_client.check(check_request()).await.unwrap();

    // 2. the broker's certificate is re-issued by CA2
    ca2.issue(&broker_spec(), &fx.broker, true).unwrap();
    let report = server.tls.reload().unwrap();
    assert!(report.closed.is_empty(), "{report:?}");
    let a_trusting_bundle = client_config(&with_ca(&node_a, &bundle)).unwrap();
    assert!(
        raw_accepted(server.addr, a_trusting_bundle.clone())
            .await
            .unwrap()
    );
    assert!(raw_accepted(server.addr, b_config.clone()).await.unwrap());
    // a node still trusting CA1 alone cannot verify the broker any more: nodes take the
    // bundle before the broker's certificate changes
    assert!(!raw_accepted(server.addr, a_trusting_ca1).await.unwrap());
    // connections opened before are untouched
    a_client.check(check_request()).await.unwrap();

    // 3. revoking a CA2 certificate through CA2's CRL cuts that node only
    let node_c = participant(&fx, &ca2, "DE-KOK");
    let mut c_client = health(server.addr, &with_ca(&node_c, &bundle));
    c_client.check(check_request()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 2)
        .await
    );
    ca2.revoke(&node_c.cert).unwrap();
    files.set(&[ca1, &ca2]);
    let report = server.tls.reload().unwrap();
    assert_eq!(report.closed, ["participant DE-KOK from 127.0.0.1"]);
    let c_config = client_config(&with_ca(&node_c, &bundle)).unwrap();
    assert!(!raw_accepted(server.addr, c_config).await.unwrap());
    assert!(raw_accepted(server.addr, b_config.clone()).await.unwrap());
    assert!(
        raw_accepted(server.addr, a_trusting_bundle.clone())
            .await
            .unwrap()
    );
    a_client.check(check_request()).await.unwrap();

    // 4. CA1 leaves the bundle (and its CRL the CRL file): its certificates are cut
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 1)
        .await
    );
    files.set(&[&ca2]);
    let report = server.tls.reload().unwrap();
    assert_eq!(report.closed, ["participant NL-NRM from 127.0.0.1"]);
    assert!(!report.crl.stale);
    let next = tokio::time::timeout(Duration::from_secs(5), a_watch.message())
        .await
        .expect("the stream of a CA1 certificate closed within 5 s");
    assert!(!matches!(next, Ok(Some(_))), "{next:?}");
    assert!(!raw_accepted(server.addr, a_trusting_bundle).await.unwrap());
    assert!(raw_accepted(server.addr, b_config).await.unwrap());
    server.stop().await;
}

/// A CA that left the CRL file at the end of a rollover stays in the CRL record: when it
/// comes back (a bundle from a backup) with an old CRL, the reload compares that CRL with
/// the recorded one, though no CRL of that CA is in force any more.
#[test]
fn a_crl_of_a_ca_back_in_the_file_is_checked_against_the_record() {
    let fx = Fixture::new();
    let files = BrokerFiles::new(&fx);
    let ca1 = &fx.fed.ca;
    let ca2 = second_ca(&fx, "trm.test federation CA 2");
    let first_crl = fx.dir.path().join("ca1-crl.pem.backup");
    std::fs::copy(ca1.crl_path(), &first_crl).unwrap();
    fx.fed.revoke(&participant(&fx, ca1, "NL-NRM")).unwrap();
    files.set(&[ca1, &ca2]);
    let record = CrlRecord::read(&fx.dir.path().join("crl-record.json")).unwrap();
    let tls = ServerTls::load_with_record(
        &with_ca(&fx.broker, &files.ca),
        Some(&files.crl),
        CrlPolicy::Strict,
        record,
    )
    .unwrap();
    // the rollover ends: the broker's certificate is CA2's, CA1 leaves
    ca2.issue(&broker_spec(), &fx.broker, true).unwrap();
    files.set(&[&ca2]);
    tls.reload().unwrap();

    // CA1 comes back with its first CRL
    cat(&files.ca, &[ca1.ca_cert_path(), ca2.ca_cert_path()]);
    cat(&files.crl, &[first_crl, ca2.crl_path()]);
    let err = tls.reload().unwrap_err();
    assert!(
        matches!(err, TransportError::CrlOlderThanRecorded { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("CN=trm.test federation CA,") && msg.contains("crlNumber 1 < crlNumber 2"),
        "{msg}"
    );
    // with its current CRL it is welcome
    files.set(&[ca1, &ca2]);
    tls.reload().unwrap();
}

/// The load checks with two CAs and two CRLs: no refusal whichever CA issued the broker's
/// certificate, whichever order the files list them in.
#[test]
fn a_bundle_of_two_cas_and_their_crls_loads() {
    let fx = Fixture::new();
    let files = BrokerFiles::new(&fx);
    let ca2 = second_ca(&fx, "trm.test federation CA 2");
    for order in [[&fx.fed.ca, &ca2], [&ca2, &fx.fed.ca]] {
        files.set(&order);
        let tls = files.load(&fx).unwrap();
        assert!(!tls.crl_status().stale);
    }
    ca2.issue(&broker_spec(), &fx.broker, true).unwrap();
    for order in [[&fx.fed.ca, &ca2], [&ca2, &fx.fed.ca]] {
        files.set(&order);
        files.load(&fx).unwrap();
    }
}

/// A bundle whose CRL file lacks one CA's CRL would refuse every client that CA issued
/// (rustls refuses an unknown revocation status): refused at load, naming the CA, where it
/// loaded with a warning about an intermediate CA when the broker's own certificate was
/// the uncovered CA's.
#[test]
fn a_bundle_without_the_crl_of_one_of_its_cas_is_refused() {
    let fx = Fixture::new();
    let files = BrokerFiles::new(&fx);
    let ca2 = second_ca(&fx, "trm.test federation CA 2");
    let bundle = [fx.fed.ca.ca_cert_path(), ca2.ca_cert_path()];
    for broker_ca in [&fx.fed.ca, &ca2] {
        broker_ca.issue(&broker_spec(), &fx.broker, true).unwrap();
        for (missing, present) in [(&fx.fed.ca, &ca2), (&ca2, &fx.fed.ca)] {
            cat(&files.ca, &bundle);
            cat(&files.crl, &[present.crl_path()]);
            let err = files.load(&fx).unwrap_err();
            assert!(matches!(err, TransportError::CrlNotFromCa { .. }), "{err}");
            assert_eq!(err.files(), [TlsFile::Crl, TlsFile::Ca]);
            let name = if std::ptr::eq(missing, &ca2) {
                "CN=trm.test federation CA 2"
            } else {
                "CN=trm.test federation CA,"
            };
            assert!(err.to_string().contains(name), "{err}");
        }
    }
}

/// Two CAs of the same name cannot share a CRL file: rustls checks a certificate against
/// the first CRL that names its issuer, so the other CA's clients would all be refused
/// (or, as before, the broker refused with "not issued by the CA"). Refused at load with
/// what to do; a CA2 made with another `--name` is fine (above).
#[test]
fn two_cas_of_the_same_name_with_crls_are_refused() {
    let fx = Fixture::new();
    let files = BrokerFiles::new(&fx);
    let ca2 = second_ca(&fx, "trm.test federation CA");
    for order in [[&fx.fed.ca, &ca2], [&ca2, &fx.fed.ca]] {
        files.set(&order);
        let err = files.load(&fx).unwrap_err();
        assert_eq!(err.files(), [TlsFile::Ca], "{err}");
        assert!(err.to_string().contains("--name"), "{err}");
    }
    // without CRLs the two are told apart by their keys
    ServerTls::load(&with_ca(&fx.broker, &files.ca), None, CrlPolicy::Warn).unwrap();
}

/// A node's `tls.ca` and `tls.crl` are checked as the broker's are: with the CRL of one CA
/// missing, or two CAs of one name, every broker certificate of that CA would be refused
/// at each connect, with no word why. The channel is refused when it is made instead.
#[tokio::test]
async fn a_node_checks_its_ca_bundle_and_crls_as_the_broker_does() {
    let fx = Fixture::new();
    let node = participant(&fx, &fx.fed.ca, "NL-NRM");
    let etc = fx.dir.path().join("node");
    std::fs::create_dir(&etc).unwrap();
    let (ca, crl) = (etc.join("tls.ca"), etc.join("tls.crl"));
    let channel = |crl: &Path| {
        let opts = ClientOptions {
            crl: Some(crl.to_owned()),
            ..ClientOptions::default()
        };
        client_channel("127.0.0.1:1", &with_ca(&node, &ca), &opts)
    };
    let ca2 = second_ca(&fx, "trm.test federation CA 2");
    cat(&ca, &[fx.fed.ca.ca_cert_path(), ca2.ca_cert_path()]);
    cat(&crl, &[fx.fed.ca.crl_path()]);
    let err = channel(&crl).unwrap_err();
    assert!(matches!(err, TransportError::CrlNotFromCa { .. }), "{err}");
    assert!(
        err.to_string().contains("CN=trm.test federation CA 2"),
        "{err}"
    );
    cat(&crl, &[fx.fed.ca.crl_path(), ca2.crl_path()]);
    channel(&crl).expect("both CAs and both CRLs");

    let namesake = Ca::init(
        &fx.dir.path().join("namesake"),
        &CaOptions::new(TRUST_DOMAIN, "trm.test federation CA"),
    )
    .unwrap();
    cat(&ca, &[fx.fed.ca.ca_cert_path(), namesake.ca_cert_path()]);
    cat(&crl, &[fx.fed.ca.crl_path(), namesake.crl_path()]);
    let err = channel(&crl).unwrap_err();
    assert!(err.to_string().contains("--name"), "{err}");
}
