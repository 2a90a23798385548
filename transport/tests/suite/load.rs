//! What `ServerTls::load` (and so a reload) refuses, naming the files: material a client
//! would refuse, or that would make the server refuse every client, with no word why.

use trmx_certs::Federation;
use trmx_transport::{CrlPolicy, ServerTls, TlsFile, TransportError};

use super::harness::Fixture;

fn load(fx: &Fixture, paths: &trmx_transport::TlsPaths) -> Result<ServerTls, TransportError> {
    ServerTls::load(paths, Some(&fx.crl()), CrlPolicy::Warn)
}

/// A second federation; `trust_domain` equal to the fixture's gives a CA of the same name.
fn other_federation(trust_domain: &str) -> (tempfile::TempDir, Federation) {
    let dir = tempfile::tempdir().unwrap();
    let fed = Federation::create(dir.path(), trust_domain).unwrap();
    (dir, fed)
}

#[test]
fn a_key_of_another_certificate_names_both_files_once() {
    let fx = Fixture::new();
    let other = fx.fed.broker("other").unwrap();
    let mut paths = fx.paths(&fx.broker);
    paths.key = other.key.clone();
    let err = load(&fx, &paths).unwrap_err();
    assert!(matches!(err, TransportError::KeyMismatch { .. }), "{err}");
    assert_eq!(err.files(), [TlsFile::Key, TlsFile::Cert]);
    let text = err.to_string();
    assert_eq!(
        text.matches(&*other.key.to_string_lossy()).count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches(&*fx.broker.cert.to_string_lossy()).count(),
        1,
        "{text}"
    );
    assert!(!text.contains("KeyMismatch"), "{text}");
}

#[test]
fn a_server_certificate_of_another_ca_is_refused() {
    for trust_domain in ["trm.other", super::harness::TRUST_DOMAIN] {
        let fx = Fixture::new();
        let (_dir, other) = other_federation(trust_domain);
        let stranger = other.broker("main").unwrap();
        let err = load(&fx, &fx.paths(&stranger)).unwrap_err();
        assert!(
            matches!(err, TransportError::NotIssuedByCa { .. }),
            "{trust_domain}: {err}"
        );
        assert_eq!(err.files(), [TlsFile::Cert, TlsFile::Ca]);
        let text = err.to_string();
        assert!(text.contains(&*stranger.cert.to_string_lossy()), "{text}");
        assert!(
            text.contains(&*fx.fed.ca_cert_path().to_string_lossy()),
            "{text}"
        );
    }
}

#[test]
fn a_client_certificate_is_not_a_server_certificate() {
    let fx = Fixture::new();
    for cert in [
        fx.fed.participant("NL-NRM").unwrap(),
        fx.fed.operator("alice").unwrap(),
    ] {
        let err = load(&fx, &fx.paths(&cert)).unwrap_err();
        assert!(
            matches!(err, TransportError::NotServerCertificate { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("serverAuth"), "{err}");
    }
}

#[test]
fn a_crl_the_ca_did_not_issue_is_refused() {
    for trust_domain in ["trm.other", super::harness::TRUST_DOMAIN] {
        let fx = Fixture::new();
        let (_dir, other) = other_federation(trust_domain);
        let err = ServerTls::load(
            &fx.paths(&fx.broker),
            Some(&other.crl_path()),
            CrlPolicy::Warn,
        )
        .unwrap_err();
        assert!(
            matches!(err, TransportError::CrlNotFromCa { .. }),
            "{trust_domain}: {err}"
        );
        assert_eq!(err.files(), [TlsFile::Crl, TlsFile::Ca]);
        assert!(
            err.to_string()
                .contains(&*other.crl_path().to_string_lossy()),
            "{err}"
        );
    }
}

#[test]
fn a_revoked_server_certificate_does_not_stop_crl_reloads() {
    // (a reload refused for it would keep the old CRL, and the clients revoked with it)
    let fx = Fixture::new();
    let tls = fx.server_tls(CrlPolicy::Warn);
    fx.fed.revoke(&fx.broker).unwrap();
    tls.reload().unwrap();
    load(&fx, &fx.paths(&fx.broker)).unwrap();
}

#[test]
fn a_reload_with_a_certificate_of_another_ca_keeps_the_old_config() {
    let fx = Fixture::new();
    let tls = fx.server_tls(CrlPolicy::Warn);
    let (_dir, other) = other_federation("trm.other");
    let stranger = other.broker("main").unwrap();
    std::fs::copy(&stranger.cert, &fx.broker.cert).unwrap();
    std::fs::copy(&stranger.key, &fx.broker.key).unwrap();
    let err = tls.reload().unwrap_err();
    assert!(matches!(err, TransportError::NotIssuedByCa { .. }), "{err}");
}

/// A deployment with an intermediate CA: `tls.ca` is the root, the broker's certificate
/// comes with the intermediate that issued it, and the CRL file holds the root's CRL only.
/// The clients the root issues are checked as they should be: it loads (with a warning that
/// the intermediate's CRL is missing), where it was refused as "another CA's CRL".
#[test]
fn a_crl_of_the_root_without_the_intermediates_loads() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SerialNumber,
        date_time_ymd,
    };
    let ca_params = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("root CA");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::from_ca_cert_der(root.der(), &root_key).unwrap();
    let mid_key = KeyPair::generate().unwrap();
    let mid = ca_params("intermediate CA")
        .signed_by(&mid_key, &root_issuer)
        .unwrap();
    let mid_issuer = Issuer::from_ca_cert_der(mid.der(), &mid_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["broker.test".to_owned()]).unwrap();
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &mid_issuer).unwrap();
    let crl = CertificateRevocationListParams {
        this_update: date_time_ymd(2025, 1, 1),
        next_update: date_time_ymd(2099, 1, 1),
        crl_number: SerialNumber::from_slice(&[1]),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&root_issuer)
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let paths = trmx_transport::TlsPaths {
        ca: write("root.pem", root.pem()),
        cert: write("broker.pem", format!("{}{}", leaf.pem(), mid.pem())),
        key: write("broker.key", leaf_key.serialize_pem()),
    };
    std::fs::set_permissions(
        &paths.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let crl = write("root.crl.pem", crl.pem().unwrap());
    ServerTls::load(&paths, Some(&crl), CrlPolicy::Warn).unwrap();
}

/// A private key that other users may read (a copy made with the wrong umask) is
/// refused by the server and by a client, naming the file and the fix; one its group
/// may read (`0640`, kept by root for a service's group) is taken.
#[tokio::test]
async fn a_private_key_other_users_may_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let client = || {
        let opts = trmx_transport::ClientOptions {
            server_name: "localhost".into(),
            ..trmx_transport::ClientOptions::default()
        };
        trmx_transport::client_channel("127.0.0.1:1", &fx.paths(&node), &opts).map(drop)
    };
    for mode in [0o644, 0o604, 0o660] {
        chmod(&fx.broker.key, mode);
        let err = load(&fx, &fx.paths(&fx.broker)).map(drop).unwrap_err();
        assert_eq!(err.files(), [TlsFile::Key], "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
        chmod(&node.key, mode);
        let err = client().unwrap_err();
        assert_eq!(err.files(), [TlsFile::Key], "{err}");
    }
    for mode in [0o600, 0o640, 0o400] {
        chmod(&fx.broker.key, mode);
        load(&fx, &fx.paths(&fx.broker)).unwrap();
        chmod(&node.key, mode);
        client().unwrap();
    }
}

/// A renewed server certificate hours from valid (by this clock) was installed by a
/// reload without a word (it was checked as of a moment it is valid), and every client
/// with a right clock refused it at the handshake. It is not taken up now, naming both
/// clocks, and the one in force stays (the rest of the reload is taken up); minutes from
/// valid, it is taken up (with a warning).
#[test]
fn a_reload_refuses_its_own_certificate_not_valid_yet_beyond_minutes() {
    let fx = Fixture::new();
    let tls = fx.server_tls(CrlPolicy::Warn);
    let spec = trmx_certs::IssueSpec::broker(
        "main",
        vec!["localhost".to_owned()],
        vec![std::net::IpAddr::from([127, 0, 0, 1])],
    );
    // (issued by a CA machine whose clock is ahead: its notBefore is 5 minutes before that)
    let issue_ahead = |ahead: std::time::Duration| {
        fx.fed
            .ca
            .issue_at(
                &spec,
                &fx.broker,
                true,
                std::time::SystemTime::now() + ahead,
            )
            .unwrap()
    };

    let info = issue_ahead(std::time::Duration::from_secs(2 * 3600));
    let report = tls.reload().unwrap();
    let text = report.certificate_refused.expect("taken up hours early");
    for said in [
        &*fx.broker.cert.to_string_lossy(),
        &*info.serial_hex,
        &*format!(
            "it is not valid before {}, and this machine's clock says ",
            trmx_certs::format_time(info.not_before)
        ),
        "either this clock is behind",
        "or the CA machine's clock was ahead",
        "the certificate in force stays",
    ] {
        assert!(text.contains(said), "{said:?} not in {text}");
    }

    // a renewal the CA issued at its own time (notBefore 5 minutes back) goes in silently
    issue_ahead(std::time::Duration::ZERO);
    let report = tls.reload().unwrap();
    assert_eq!(report.certificate_refused, None);

    issue_ahead(std::time::Duration::from_secs(8 * 60));
    let report = tls.reload().unwrap();
    assert_eq!(report.certificate_refused, None, "refused minutes early");
}

/// After a reload refused a renewed certificate as not valid yet, a later reload (the
/// interval's, with the files unchanged) takes it up once it is valid by the server's
/// clock, the one `load_with_clock` was given: no second SIGHUP needed.
#[test]
fn a_later_reload_takes_up_the_certificate_once_valid_by_the_servers_clock() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, SystemTime};
    let fx = Fixture::new();
    let ahead = Arc::new(AtomicU64::new(0));
    let clock = {
        let ahead = Arc::clone(&ahead);
        trmx_transport::TlsClock::new(move || {
            SystemTime::now() + Duration::from_secs(ahead.load(Ordering::Relaxed))
        })
    };
    let paths = fx.paths(&fx.broker);
    let tls =
        ServerTls::load_with_clock(&paths, Some(&fx.crl()), CrlPolicy::Warn, None, clock).unwrap();
    let spec = trmx_certs::IssueSpec::broker(
        "main",
        vec!["localhost".to_owned()],
        vec![std::net::IpAddr::from([127, 0, 0, 1])],
    );
    let at = SystemTime::now() + Duration::from_secs(2 * 3600);
    fx.fed.ca.issue_at(&spec, &fx.broker, true, at).unwrap();
    assert!(tls.reload().unwrap().certificate_refused.is_some());
    assert!(tls.reload().unwrap().certificate_refused.is_some());

    ahead.store(2 * 3600, Ordering::Relaxed);
    let report = tls.reload().unwrap();
    assert_eq!(report.certificate_refused, None);
}
