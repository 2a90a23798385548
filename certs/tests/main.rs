//! trmx-certs integration tests: certificates checked by rustls' own verifiers (ring
//! provider), the CA directory's files, and the CLI binary.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use trmx_certs::{CertPaths, Federation, load_certs_pem, load_crls_pem};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(fed: &Federation) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in load_certs_pem(&fed.ca_cert_path()).unwrap() {
        roots.add(c).unwrap();
    }
    Arc::new(roots)
}

/// A client verifier as a broker builds it: CA roots plus the CRL read from disk now.
fn client_verifier(fed: &Federation) -> Arc<dyn ClientCertVerifier> {
    WebPkiClientVerifier::builder_with_provider(roots(fed), provider())
        .with_crls(load_crls_pem(&fed.crl_path()).unwrap())
        .build()
        .unwrap()
}

fn leaf(paths: &CertPaths) -> CertificateDer<'static> {
    load_certs_pem(&paths.cert).unwrap().remove(0)
}

fn verify_client(
    v: &Arc<dyn ClientCertVerifier>,
    cert: &CertificateDer<'_>,
) -> Result<(), rustls::Error> {
    v.verify_client_cert(cert, &[], UnixTime::now()).map(|_| ())
}

fn federation() -> (tempfile::TempDir, Federation) {
    let dir = tempfile::tempdir().unwrap();
    let fed = Federation::create(dir.path(), "trm.example").unwrap();
    (dir, fed)
}

/// Takes read access to `<ca_dir>/ca.key` away, as an auditor lacks it: mode 000, and since
/// that does not stop root, the file is also moved out of the directory if still readable.
fn hide_ca_key(ca_dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let key = ca_dir.join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&key).is_ok() {
        let elsewhere = ca_dir.parent().unwrap().join("ca.key.elsewhere");
        std::fs::rename(&key, elsewhere).unwrap();
    }
}

mod verify {
    use super::*;
    use rustls::CertificateError;
    use trmx_certs::{Identity, Role};

    #[test]
    fn node_certificate_verifies_as_client_and_names_the_participant() {
        let (_d, fed) = federation();
        let node = fed.participant("NL-NRM").unwrap();
        let cert = leaf(&node);
        verify_client(&client_verifier(&fed), &cert).unwrap();
        let id = Identity::from_der(&cert).unwrap();
        assert_eq!(id.participant(), Some("NL-NRM"));
        assert_eq!(id.trust_domain, "trm.example");
        assert_eq!(id.spiffe_uri(), "spiffe://trm.example/participant/NL-NRM");
    }

    #[test]
    fn revoked_certificate_is_refused_once_the_crl_is_reloaded() {
        let (_d, fed) = federation();
        let node = fed.participant("BE-PAYOKE").unwrap();
        let other = fed.participant("NG-NAPTIP").unwrap();
        let cert = leaf(&node);

        // positive control: accepted by a verifier built with the current CRL
        verify_client(&client_verifier(&fed), &cert).unwrap();

        fed.revoke(&node).unwrap();
        let reloaded = client_verifier(&fed);
        let err = verify_client(&reloaded, &cert).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked),
            "{err:?}"
        );
        // the same reloaded verifier still accepts a certificate that was not revoked
        verify_client(&reloaded, &leaf(&other)).unwrap();
        assert!(
            fed.ca
                .is_revoked(&trmx_certs::CertInfo::from_der(&cert).unwrap().serial_hex)
        );
    }

    #[test]
    fn crl_past_next_update_is_refused_by_a_strict_verifier() {
        let (_d, fed) = federation();
        let cert = leaf(&fed.participant("NL-NRM").unwrap());
        let strict = |fed: &Federation| {
            WebPkiClientVerifier::builder_with_provider(roots(fed), provider())
                .with_crls(load_crls_pem(&fed.crl_path()).unwrap())
                .enforce_revocation_expiration()
                .build()
                .unwrap()
        };
        verify_client(&strict(&fed), &cert).unwrap();
        let now = SystemTime::now();
        fed.ca
            .write_crl_with_times(
                now - Duration::from_secs(7200),
                now - Duration::from_secs(60),
            )
            .unwrap();
        let err = verify_client(&strict(&fed), &cert).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredRevocationList
                        | CertificateError::ExpiredRevocationListContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn operator_certificate_parses_as_operator() {
        let (_d, fed) = federation();
        let op = fed.operator("alice").unwrap();
        let cert = leaf(&op);
        verify_client(&client_verifier(&fed), &cert).unwrap();
        let id = Identity::from_der(&cert).unwrap();
        assert_eq!(id.role, Role::Operator("alice".to_string()));
        assert_eq!(id.participant(), None);
        assert_eq!(id.spiffe_uri(), "spiffe://trm.example/operator/alice");
    }

    #[test]
    fn broker_certificate_verifies_as_server_for_localhost_and_loopback() {
        let (_d, fed) = federation();
        let broker = fed.broker("eu-1").unwrap();
        let cert = leaf(&broker);
        let v = WebPkiServerVerifier::builder_with_provider(roots(&fed), provider())
            .with_crls(load_crls_pem(&fed.crl_path()).unwrap())
            .build()
            .unwrap();
        for name in ["localhost", "127.0.0.1", "::1"] {
            let sn = ServerName::try_from(name).unwrap();
            v.verify_server_cert(&cert, &[], &sn, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        let wrong = ServerName::try_from("broker.example.org").unwrap();
        assert!(
            v.verify_server_cert(&cert, &[], &wrong, &[], UnixTime::now())
                .is_err()
        );
        let id = Identity::from_der(&cert).unwrap();
        assert_eq!(id.role, Role::Broker("eu-1".to_string()));

        // a node certificate (clientAuth only) is no server certificate
        let node = leaf(&fed.participant("NL-NRM").unwrap());
        let sn = ServerName::try_from("localhost").unwrap();
        assert!(
            v.verify_server_cert(&node, &[], &sn, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn server_certificate_of_another_federation_is_refused() {
        let (_d, fed) = federation();
        let (_d2, other) = federation();
        let foreign = leaf(&other.participant("NL-NRM").unwrap());
        // positive control first
        verify_client(
            &client_verifier(&fed),
            &leaf(&fed.participant("NL-NRM").unwrap()),
        )
        .unwrap();
        assert!(verify_client(&client_verifier(&fed), &foreign).is_err());
        // and this CA refuses to revoke it
        let e = fed
            .ca
            .revoke(&other.dir.join("NL-NRM.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("was not issued by this CA"), "{e}");
    }

    #[test]
    fn certificates_tolerate_a_peer_clock_a_little_behind() {
        let (_d, fed) = federation();
        let cert = leaf(&fed.participant("NL-NRM").unwrap());
        let behind = SystemTime::now() - Duration::from_secs(120);
        let at = UnixTime::since_unix_epoch(behind.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        client_verifier(&fed)
            .verify_client_cert(&cert, &[], at)
            .unwrap();
    }
}

mod ca_files {
    use super::*;
    use trmx_certs::{Ca, CaOptions, CertError, CertInfo, IssueSpec};
    use x509_parser::prelude::FromDer;

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn key_files_are_0600() {
        let (_d, fed) = federation();
        assert_eq!(mode(&fed.dir.join("ca/ca.key")), 0o600);
        for paths in [
            fed.participant("NL-NRM").unwrap(),
            fed.operator("alice").unwrap(),
            fed.broker("eu-1").unwrap(),
        ] {
            assert_eq!(mode(&paths.key), 0o600, "{}", paths.key.display());
            assert_eq!(mode(&paths.cert), 0o644, "{}", paths.cert.display());
        }
    }

    #[test]
    fn reissue_without_force_refuses_and_changes_nothing() {
        let (_d, fed) = federation();
        let out = CertPaths::from_prefix(&fed.dir.join("node"));
        fed.ca
            .issue(&IssueSpec::participant("NL-NRM"), &out, false)
            .unwrap();
        let (cert, key) = (
            std::fs::read(&out.cert).unwrap(),
            std::fs::read(&out.key).unwrap(),
        );
        let issued = fed.ca.issued().len();

        let err = fed
            .ca
            .issue(&IssueSpec::participant("NL-NRM"), &out, false)
            .unwrap_err();
        assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("refusing to overwrite {} (use --force)", out.cert.display())
        );
        assert_eq!(std::fs::read(&out.cert).unwrap(), cert);
        assert_eq!(std::fs::read(&out.key).unwrap(), key);
        assert_eq!(fed.ca.issued().len(), issued);

        // with force it is replaced
        fed.ca
            .issue(&IssueSpec::participant("NL-NRM"), &out, true)
            .unwrap();
        assert_ne!(std::fs::read(&out.key).unwrap(), key);
    }

    /// A run that opened the CA before another replaced it (`init --force` while a `revoke`
    /// or `issue` waited for the lock) must not sign with the replaced key into the new
    /// CA's directory: a CRL the new CA did not sign would fail at every broker and node.
    #[test]
    fn a_run_that_opened_a_replaced_ca_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CaOptions::new("trm.example", "TRM Federation CA");
        let stale = Ca::init(dir.path(), &opts).unwrap();
        let forced = CaOptions {
            force: true,
            ..opts
        };
        let fresh = Ca::init(dir.path(), &forced).unwrap();
        let files = |names: &[&str]| -> Vec<Vec<u8>> {
            names
                .iter()
                .map(|n| std::fs::read(dir.path().join(n)).unwrap())
                .collect()
        };
        let before = files(&["ca.pem", "crl.pem", "index.json"]);
        let out = CertPaths::from_prefix(&dir.path().join("NL-NRM"));

        let errors = [
            stale
                .issue(&IssueSpec::participant("NL-NRM"), &out, false)
                .map(|_| ())
                .unwrap_err(),
            stale.write_crl(Duration::from_secs(86_400)).unwrap_err(),
            stale.revoke_serial_hex("01").map(|_| ()).unwrap_err(),
        ];
        for err in errors {
            let err = err.to_string();
            assert!(err.contains("was replaced"), "{err}");
        }
        assert_eq!(files(&["ca.pem", "crl.pem", "index.json"]), before);
        assert!(!out.cert.exists());
        // the CA that replaced it is unaffected
        fresh
            .issue(&IssueSpec::participant("NL-NRM"), &out, false)
            .unwrap();
    }

    /// Names of the temporary files (`.trmx-certs-*`) in `dir`.
    fn temporaries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".trmx-certs-"))
            .collect()
    }

    /// A key and its certificate are replaced together: when the certificate cannot be
    /// written (here a directory is in its way), the old key stays, nothing is recorded and
    /// no temporary file is left; on success none is left either.
    #[test]
    fn a_certificate_that_cannot_be_written_leaves_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(
            &dir.path().join("ca"),
            &CaOptions::new("trm.example", "TRM Federation CA"),
        )
        .unwrap();
        let out = dir.path().join("out");
        let paths = CertPaths::from_prefix(&out.join("NL-NRM"));
        let spec = IssueSpec::participant("NL-NRM");
        ca.issue(&spec, &paths, false).unwrap();
        let renewed = ca.renew(&paths, 30).unwrap();
        assert_eq!(temporaries(&out), Vec::<String>::new());
        let key = std::fs::read(&paths.key).unwrap();
        let index = std::fs::read(dir.path().join("ca/index.json")).unwrap();

        let blocked = CertPaths {
            cert: out.join("blocked.pem"),
            key: paths.key.clone(),
        };
        std::fs::create_dir(&blocked.cert).unwrap();
        let err = ca.issue(&spec, &blocked, true).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "cannot write certificate {}: ",
                blocked.cert.display()
            )),
            "{err}"
        );
        assert_eq!(std::fs::read(&paths.key).unwrap(), key, "the old key stays");
        assert_eq!(mode(&paths.key), 0o600);
        assert_eq!(
            CertInfo::from_pem_file(&paths.cert).unwrap().serial_hex,
            renewed.new.serial_hex
        );
        assert_eq!(
            std::fs::read(dir.path().join("ca/index.json")).unwrap(),
            index
        );
        assert_eq!(temporaries(&out), Vec::<String>::new());
    }

    /// A CA key that other users may read is refused before anything is signed with it,
    /// naming the file and the fix, as a node's or the broker's key is.
    #[test]
    fn a_ca_key_other_users_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        Ca::init(&ca_dir, &CaOptions::new("trm.example", "TRM Federation CA")).unwrap();
        let key = ca_dir.join("ca.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Ca::open(&ca_dir).map(drop).unwrap_err().to_string();
        assert!(err.contains("mode 0644"), "{err}");
        assert!(
            err.contains(&format!("chmod 600 {}", key.display())),
            "{err}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        Ca::open(&ca_dir).unwrap();
    }

    /// Every file of the directories in `dirs`, by path, with its contents (but for
    /// `ca.lock`, which names the last run that took it).
    fn snapshot(dirs: &[&Path]) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = dirs
            .iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && !p.ends_with("ca.lock"))
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        files.sort();
        files
    }

    /// `issue --out ca/ca --force` wrote a node key over `ca.key` and its certificate over
    /// `ca.pem`, and `renew … --key ca/ca.key` (or a link to it) replaced the CA key: the
    /// CA was gone for good. Both are refused, naming the CA file, and nothing changes.
    #[test]
    fn an_issue_or_renewal_never_writes_over_the_ca_s_own_files() {
        let (d, fed) = federation();
        let ca_dir = fed.dir.join("ca");
        let node = fed.participant("NL-NRM").unwrap();
        let link = d.path().join("link.key");
        std::os::unix::fs::symlink(ca_dir.join("ca.key"), &link).unwrap();
        let before = snapshot(&[&ca_dir, d.path()]);
        let spec = IssueSpec::participant("BE-PAYOKE");
        let index = CertPaths {
            cert: ca_dir.join("index.json"),
            key: d.path().join("new.key"),
        };
        let prefixes = ["ca", "crl", "../ca/ca"].map(|p| CertPaths::from_prefix(&ca_dir.join(p)));
        for out in prefixes.into_iter().chain([index]) {
            let name = out.cert.display();
            let err = fed.ca.issue(&spec, &out, true).unwrap_err();
            assert!(
                matches!(err, CertError::CaFileTarget { .. }),
                "{name}: {err}"
            );
            assert!(
                err.to_string().contains("it is the CA's own"),
                "{name}: {err}"
            );
        }
        for key in [ca_dir.join("ca.key"), ca_dir.join("ca.lock"), link] {
            let paths = CertPaths {
                cert: node.cert.clone(),
                key: key.clone(),
            };
            let err = fed.ca.renew(&paths, 30).unwrap_err().to_string();
            assert!(
                err.contains(&format!("CA's own {}", ca_dir.display())),
                "{}: {err}",
                key.display()
            );
        }
        assert_eq!(snapshot(&[&ca_dir, d.path()]), before, "nothing changed");
        Ca::open(&ca_dir).unwrap();
    }

    /// `renew` with `--key` naming the wrong file wrote the new key over it: a certificate
    /// (`--key` and the certificate swapped, or another certificate), the certificate itself
    /// (the key then lost under the certificate), or another participant's key. Each is
    /// refused, naming the file, before anything is issued; the right key is renewed.
    #[test]
    fn renew_refuses_a_key_file_that_is_not_the_certificate_s_key() {
        let (d, fed) = federation();
        let node = fed.participant("NL-NRM").unwrap();
        let other = fed.participant("BE-PAYOKE").unwrap();
        let crl = d.path().join("crl-copy.pem");
        std::fs::copy(fed.crl_path(), &crl).unwrap();
        let ca_dir = fed.dir.join("ca");
        let before = snapshot(&[&ca_dir, d.path()]);
        for (key, expected) in [
            (
                other.cert.clone(),
                "it holds a certificate, not a private key",
            ),
            (crl, "it holds a CRL, not a private key"),
            (
                node.cert.clone(),
                "the key and the certificate would both be written",
            ),
            (other.key.clone(), "is not the key of"),
            (
                d.path().to_path_buf(),
                "is a directory: give the path of the key file itself",
            ),
        ] {
            let paths = CertPaths {
                cert: node.cert.clone(),
                key: key.clone(),
            };
            let err = fed.ca.renew(&paths, 30).unwrap_err().to_string();
            assert!(err.contains(expected), "{}: {err}", key.display());
            assert!(
                err.contains(&key.display().to_string()),
                "{}: {err}",
                key.display()
            );
        }
        // and a certificate path that holds a key: the two swapped
        let swapped = CertPaths {
            cert: node.key.clone(),
            key: node.cert.clone(),
        };
        fed.ca.renew(&swapped, 30).unwrap_err();
        let out = CertPaths {
            cert: other.key.clone(),
            key: d.path().join("new.key"),
        };
        let err = fed
            .ca
            .issue(&IssueSpec::participant("BE-PAYOKE"), &out, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("it holds a private key, not a certificate"),
            "{err}"
        );
        assert_eq!(snapshot(&[&ca_dir, d.path()]), before, "nothing changed");

        let renewed = fed.ca.renew(&node, 30).unwrap();
        assert_ne!(renewed.new.serial_hex, renewed.old.serial_hex);
    }

    /// A certificate file that holds its key too (a bundle, as some operators keep for the
    /// admin CLI) given to `renew` or to `issue --force` was refused with "it holds a
    /// certificate, not a certificate". It is refused saying that it is a bundle and what
    /// to do, and nothing changes.
    #[test]
    fn a_certificate_bundled_with_its_key_is_refused_as_a_bundle() {
        let (d, fed) = federation();
        let node = fed.participant("NL-NRM").unwrap();
        let bundle = d.path().join("bundle.pem");
        let mut pem = std::fs::read(&node.cert).unwrap();
        pem.extend(std::fs::read(&node.key).unwrap());
        std::fs::write(&bundle, pem).unwrap();
        let ca_dir = fed.dir.join("ca");
        let before = snapshot(&[&ca_dir, d.path()]);
        let paths = CertPaths {
            cert: bundle.clone(),
            key: d.path().join("bundle.key"),
        };
        let renewed = fed.ca.renew(&paths, 30).unwrap_err().to_string();
        let issued = fed
            .ca
            .issue(&IssueSpec::participant("NL-NRM"), &paths, true)
            .unwrap_err()
            .to_string();
        for err in [renewed, issued] {
            assert_eq!(
                err,
                format!(
                    "refusing to replace {}: it holds a private key beside its certificate (a \
                     bundle), not a certificate alone; check the certificate path: keep the \
                     certificate and its key in files of their own",
                    bundle.display()
                )
            );
        }
        assert_eq!(snapshot(&[&ca_dir, d.path()]), before, "nothing changed");
    }

    /// A clock set back before the CA was made (a dead CMOS battery, a VM restored with an
    /// old clock) issued certificates and CRLs dated by it: expired, or past their
    /// nextUpdate, for everyone whose clock is right, with no word. Issue, CRL and revoke
    /// are refused, with both times and what to do, and nothing is written or recorded.
    /// The refusal blamed this clock alone, where the CA may have been made on a clock
    /// ahead: it now says both, and what each case needs. (Here the CA certificate is
    /// re-made to start in a year, with the same key: this clock is then "before the CA
    /// was made".)
    #[test]
    fn a_clock_before_the_ca_was_made_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let ca_dir = d.path().join("ca");
        Ca::init(&ca_dir, &CaOptions::new("trm.example", "Later CA")).unwrap();
        let key = std::fs::read_to_string(ca_dir.join("ca.key")).unwrap();
        let key = rcgen::KeyPair::from_pem(&key).unwrap();
        let year = Duration::from_secs(365 * 24 * 3600);
        let start = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                (SystemTime::now() + year)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Later CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.not_before = time::OffsetDateTime::from(start);
        params.not_after = time::OffsetDateTime::from(start + year);
        let later = params.self_signed(&key).unwrap();
        std::fs::write(ca_dir.join("ca.pem"), later.pem()).unwrap();
        let ca = Ca::open(&ca_dir).unwrap();
        let out = CertPaths::from_prefix(&d.path().join("NL-NRM"));
        let spec = IssueSpec::participant("NL-NRM");
        let before = snapshot(&[&ca_dir, d.path()]);
        let refusals = [
            ca.issue(&spec, &out, false).map(drop).unwrap_err(),
            ca.write_crl(Duration::from_secs(86_400)).unwrap_err(),
            ca.revoke_serial_hex("ab").map(drop).unwrap_err(),
            ca.revoke_role(&trmx_certs::Role::Participant("NL-NRM".into()))
                .map(drop)
                .unwrap_err(),
        ];
        for err in refusals {
            assert!(matches!(err, CertError::ClockBeforeCa { .. }), "{err}");
            let text = err.to_string();
            assert!(text.starts_with("this machine's clock says "), "{text}");
            // (which clock is off cannot be told: it blamed this one alone)
            assert!(
                text.contains(&format!(
                    ", before the start of the CA certificate {} ({}): either this clock is \
                     behind, or the CA was made on a clock that was ahead; ",
                    ca_dir.join("ca.pem").display(),
                    trmx_certs::format_time(start)
                )),
                "{text}"
            );
            assert!(
                text.ends_with(&format!(
                    "if it is behind, set it right and run the command again; if it is right, \
                     the command works from {} on",
                    trmx_certs::format_time(start)
                )),
                "{text}"
            );
        }
        assert_eq!(snapshot(&[&ca_dir, d.path()]), before);
        assert!(!out.cert.exists() && !out.key.exists());
        // (a test's explicit time is taken as it is)
        ca.issue_at(&spec, &out, false, start).unwrap();
    }

    /// The index records a certificate before its files are put in place, so a crash in
    /// between never leaves a certificate in use that the index does not know: when the
    /// index cannot be written (here a directory is in its way), no file is written.
    #[test]
    fn a_certificate_the_index_cannot_record_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = Ca::init(&ca_dir, &CaOptions::new("trm.example", "TRM Federation CA")).unwrap();
        let out = dir.path().join("out");
        let paths = CertPaths::from_prefix(&out.join("NL-NRM"));
        let index = ca_dir.join("index.json");
        let saved = dir.path().join("index.saved");
        std::fs::rename(&index, &saved).unwrap();
        std::fs::create_dir(&index).unwrap();
        let err = ca
            .issue(&IssueSpec::participant("NL-NRM"), &paths, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("index.json"), "{err}");
        assert!(
            !paths.cert.exists() && !paths.key.exists(),
            "nothing written"
        );

        std::fs::remove_dir(&index).unwrap();
        std::fs::rename(&saved, &index).unwrap();
        let info = ca
            .issue(&IssueSpec::participant("NL-NRM"), &paths, false)
            .unwrap();
        let listed = Ca::open(&ca_dir).unwrap().issued();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].serial, info.serial_hex);
    }

    #[test]
    fn init_refuses_to_replace_a_ca_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CaOptions::new("trm.example", "TRM Federation CA");
        Ca::init(dir.path(), &opts).unwrap();
        let key = std::fs::read(dir.path().join("ca.key")).unwrap();
        let err = Ca::init(dir.path(), &opts).unwrap_err().to_string();
        assert!(err.starts_with("refusing to overwrite"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), key);
        let forced = CaOptions {
            force: true,
            ..opts
        };
        let fresh = Ca::init(dir.path(), &forced).unwrap();
        assert_ne!(std::fs::read(dir.path().join("ca.key")).unwrap(), key);
        // the replaced CA is moved aside, key included, never destroyed
        let previous = fresh.replaced().expect("the old CA was moved aside");
        assert_eq!(previous.parent(), Some(dir.path()));
        assert_eq!(std::fs::read(previous.join("ca.key")).unwrap(), key);
        for name in ["ca.pem", "index.json", "crl.pem"] {
            assert!(previous.join(name).is_file(), "{name} moved aside");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(previous).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // and it still opens as the CA it was
        let old = Ca::open(previous).unwrap();
        assert_eq!(old.trust_domain(), "trm.example");
        assert!(Ca::open(dir.path()).unwrap().replaced().is_none());
        // a second forced init in the same second gets a directory of its own
        let again = Ca::init(dir.path(), &forced).unwrap();
        assert_ne!(again.replaced(), Some(previous));
        assert!(previous.join("ca.key").is_file());
    }

    #[test]
    fn invalid_participant_id_is_a_one_line_error() {
        let (_d, fed) = federation();
        let err = fed.participant("nl-nrm").unwrap_err().to_string();
        assert_eq!(
            err,
            "participant id \"nl-nrm\" is invalid: expected CC-ORG like NL-NRM"
        );
        let out = CertPaths::from_prefix(&fed.dir.join("x"));
        let err = fed
            .ca
            .issue(&IssueSpec::participant("NLD-NRM"), &out, false)
            .unwrap_err();
        assert!(
            matches!(err, CertError::InvalidParticipantId { .. }),
            "{err}"
        );
        assert!(!out.cert.exists() && !out.key.exists());
    }

    #[test]
    fn unreadable_ca_is_a_one_line_error_naming_the_file() {
        // a wrong --dir or TRMX_CA_DIR: say so, not only which file is missing
        let dir = tempfile::tempdir().unwrap();
        for wrong in [dir.path().to_path_buf(), dir.path().join("missing")] {
            let err = Ca::open(&wrong).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "no federation CA in {} (neither ca.pem nor ca.key is there): check --dir or \
                     TRMX_CA_DIR, or create one with `trmx-certs init`",
                    wrong.display()
                )
            );
        }
        // a CA directory that lost its key: name the file
        std::fs::write(dir.path().join("ca.pem"), "").unwrap();
        let err = Ca::open(dir.path()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "cannot read CA key {}: No such file or directory",
                dir.path().join("ca.key").display()
            )
        );
        assert!(!err.contains('\n'));

        let (_d, fed) = federation();
        let ca_dir = fed.dir.join("ca");
        std::fs::write(ca_dir.join("ca.pem"), "not a certificate").unwrap();
        let err = Ca::open(&ca_dir).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "cannot parse CA certificate {}",
                ca_dir.join("ca.pem").display()
            )),
            "{err}"
        );
    }

    /// An auditor with `ca.pem` and `index.json` but not `ca.key` reads what the CA issued
    /// and revoked; only signing needs the key.
    #[test]
    fn a_ca_view_reads_the_directory_without_the_key() {
        use trmx_certs::CaView;
        let (_d, fed) = federation();
        let node = fed.participant("NL-NRM").unwrap();
        let other = fed.participant("BE-PAYOKE").unwrap();
        fed.revoke(&node).unwrap();
        let ca_dir = fed.dir.join("ca");
        hide_ca_key(&ca_dir);

        let view = CaView::open(&ca_dir).unwrap();
        assert_eq!(view.trust_domain(), "trm.example");
        assert_eq!(view.not_after(), fed.ca.not_after());
        assert_eq!(view.issued(), fed.ca.issued());
        let revoked = view.verify_issued(&node.cert).unwrap();
        assert!(view.is_revoked(&revoked.serial_hex));
        let valid = view.verify_issued(&other.cert).unwrap();
        assert!(!view.is_revoked(&valid.serial_hex));

        let err = Ca::open(&ca_dir).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "cannot read CA key {}: ",
                ca_dir.join("ca.key").display()
            )),
            "{err}"
        );
        // a wrong directory is still named as one
        let err = CaView::open(&fed.dir).unwrap_err();
        assert!(matches!(err, CertError::NoCa { .. }), "{err}");
    }

    #[test]
    fn renew_keeps_identity_and_changes_key_and_serial() {
        let (_d, fed) = federation();
        let broker = fed.broker("eu-1").unwrap();
        let old = CertInfo::from_pem_file(&broker.cert).unwrap();
        let old_key = std::fs::read(&broker.key).unwrap();

        let renewal = fed.ca.renew(&broker, 30).unwrap();
        assert_eq!(renewal.old, old);
        let new = renewal.new;
        assert_eq!(new.identity, old.identity);
        assert_eq!(new.dns_names, old.dns_names);
        assert_eq!(new.ips, old.ips);
        assert_ne!(new.serial_hex, old.serial_hex);
        assert_ne!(std::fs::read(&broker.key).unwrap(), old_key);
        assert_eq!(CertInfo::from_pem_file(&broker.cert).unwrap(), new);
        assert!(new.not_after < old.not_after);
        assert_eq!(mode(&broker.key), 0o600);
        // the new key matches the new certificate: rustls accepts the pair
        let key = trmx_certs::load_key_pem(&broker.key).unwrap();
        let chain = load_certs_pem(&broker.cert).unwrap();
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let issued = fed.ca.issued();
        let entry = issued.iter().find(|c| c.serial == old.serial_hex).unwrap();
        assert_eq!(entry.renewed_by.as_deref(), Some(new.serial_hex.as_str()));
        assert_eq!(renewal.old_revoked_at, None);

        // a revoked certificate can be renewed (a new key after a leak); the renewal says
        // when it was revoked
        fed.revoke(&broker).unwrap();
        let revoked_at = fed.ca.issued().last().unwrap().revoked_at.unwrap();
        let again = fed.ca.renew(&broker, 30).unwrap();
        assert_eq!(again.old.serial_hex, new.serial_hex);
        assert_eq!(
            again.old_revoked_at,
            Some(trmx_certs::from_unix_seconds(revoked_at))
        );
        assert!(!fed.ca.is_revoked(&again.new.serial_hex));
    }

    /// A request (the organisation keeps its key): the CA certifies only the request's key,
    /// with the identity, names and usages of its own command line, whatever the request
    /// asks for; no key file is written.
    #[test]
    fn a_request_gets_a_certificate_for_its_key_and_nothing_else_it_asks() {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa};
        use trmx_certs::{CertRequest, Identity, Role};
        let (d, fed) = federation();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        asked.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://trm.example/participant/BE-PAYOKE"
                .try_into()
                .unwrap(),
        ));
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        asked.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = d.path().join("nl.csr");
        let pem = asked.serialize_request(&key).unwrap().pem().unwrap();
        std::fs::write(&csr, pem).unwrap();

        let request = CertRequest::from_pem_file(&csr).unwrap();
        assert_eq!(
            request.fingerprint(),
            trmx_certs::key_fingerprint(&rcgen::PublicKeyData::subject_public_key_info(&key))
        );
        let cert = d.path().join("NL-NRM.pem");
        let spec = IssueSpec::participant("NL-NRM");
        let info = fed
            .ca
            .issue_for_request(&spec, &request, &cert, false)
            .unwrap();
        assert_eq!(
            info.identity,
            Identity::new("trm.example", Role::Participant("NL-NRM".into())).unwrap()
        );
        assert!(info.dns_names.is_empty() && info.ips.is_empty());
        assert!(info.client_auth && !info.server_auth);
        assert!(!d.path().join("NL-NRM.key").exists(), "no key is made");
        let chain = load_certs_pem(&cert).unwrap();
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&chain[0]).unwrap();
        assert!(!parsed.is_ca());
        // a client of this federation, and the request's key is the certificate's
        verify_client(&client_verifier(&fed), &chain[0]).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .unwrap();
        // never over an existing certificate without force
        let err = fed.ca.issue_for_request(&spec, &request, &cert, false);
        assert!(
            matches!(err, Err(CertError::AlreadyExists { .. })),
            "{err:?}"
        );

        // renewal to the organisation's next key replaces only the certificate
        let next = d.path().join("next");
        let next = CertRequest::create(
            "NL-NRM",
            &trmx_certs::RequestPaths::from_prefix(&next),
            false,
        )
        .unwrap();
        let renewal = fed.ca.renew_for_request(&cert, &next, 30).unwrap();
        assert_eq!(renewal.old, info);
        assert_eq!(renewal.new.identity, info.identity);
        assert_eq!(CertInfo::from_pem_file(&cert).unwrap(), renewal.new);
        let issued = fed.ca.issued();
        let entry = issued.iter().find(|c| c.serial == info.serial_hex).unwrap();
        assert_eq!(
            entry.renewed_by.as_deref(),
            Some(renewal.new.serial_hex.as_str())
        );
        assert!(!d.path().join("NL-NRM.key").exists());
    }

    #[test]
    fn renewed_certificate_is_revoked_by_serial_without_its_file() {
        let (_d, fed) = federation();
        let node = fed.participant("NL-NRM").unwrap();
        let old_cert = leaf(&node);
        let renewal = fed.ca.renew(&node, 30).unwrap();
        let (old, new) = (renewal.old.serial_hex, renewal.new.serial_hex);
        // the file now holds the new certificate: revoking by file would hit the new one
        assert_eq!(CertInfo::from_pem_file(&node.cert).unwrap().serial_hex, new);

        // any case and `:` separators, as other tools print serials
        let colons = old
            .as_bytes()
            .chunks(2)
            .map(|b| std::str::from_utf8(b).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        let first = fed.ca.revoke_serial_hex(&colons).unwrap();
        assert!(!first.already_revoked);
        assert_eq!(first.cert.serial, old);
        assert_eq!(
            first.cert.identity,
            "spiffe://trm.example/participant/NL-NRM"
        );
        assert_eq!(first.cert.renewed_by.as_deref(), Some(new.as_str()));
        assert!(fed.ca.is_revoked(&old) && !fed.ca.is_revoked(&new));
        let err = verify_client(&client_verifier(&fed), &old_cert).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        );
        verify_client(&client_verifier(&fed), &leaf(&node)).unwrap();

        // twice is harmless and keeps the first revocation time
        let again = fed.ca.revoke_serial_hex(&old).unwrap();
        assert!(again.already_revoked);
        assert_eq!(again.cert.revoked_at, first.cert.revoked_at);
    }

    #[test]
    fn revoking_an_unknown_or_malformed_serial_changes_nothing() {
        let (_d, fed) = federation();
        fed.participant("NL-NRM").unwrap();
        let (index, crl) = (fed.dir.join("ca/index.json"), fed.crl_path());
        let before = (std::fs::read(&index).unwrap(), std::fs::read(&crl).unwrap());

        let err = fed.ca.revoke_serial_hex("0x4A01").unwrap_err();
        assert!(matches!(err, CertError::UnknownSerial { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "serial 4a01 was not issued by this CA (it is not in {})",
                index.display()
            )
        );
        let err = fed.ca.revoke_serial_hex("NL-NRM").unwrap_err().to_string();
        assert_eq!(err, "serial is invalid: \"NL-NRM\" is not hexadecimal");
        assert_eq!(
            (std::fs::read(&index).unwrap(), std::fs::read(&crl).unwrap()),
            before
        );
    }

    #[test]
    fn crl_numbers_increase_and_next_update_is_configurable() {
        let (_d, fed) = federation();
        let read = |fed: &Federation| {
            let der = load_crls_pem(&fed.crl_path()).unwrap().remove(0);
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
            let number = crl.crl_number().unwrap().to_string();
            let next = crl.next_update().unwrap().timestamp();
            let this = crl.last_update().timestamp();
            (number.parse::<u64>().unwrap(), this, next)
        };
        let (n1, this1, next1) = read(&fed);
        assert_eq!(next1 - this1, 7 * 24 * 3600 + 300);
        fed.ca
            .write_crl(Duration::from_secs(2 * 24 * 3600))
            .unwrap();
        let (n2, this2, next2) = read(&fed);
        assert!(n2 > n1);
        assert_eq!(next2 - this2, 2 * 24 * 3600 + 300);
        // a revocation keeps the configured lifetime
        fed.revoke(&fed.participant("NL-NRM").unwrap()).unwrap();
        let (n3, this3, next3) = read(&fed);
        assert!(n3 > n2);
        assert_eq!(next3 - this3, 2 * 24 * 3600 + 300);
        // reopening the CA keeps counting up
        let reopened = Ca::open(&fed.dir.join("ca")).unwrap();
        reopened.write_crl(Duration::from_secs(3600)).unwrap();
        assert!(read(&fed).0 > n3);
    }

    /// Once the CA has expired it can sign no CRL: a revocation is refused before the
    /// index records it (it would reach no one), saying why.
    #[test]
    fn an_expired_ca_refuses_a_revocation_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(
            dir.path(),
            &CaOptions::new("trm.example", "TRM Federation CA"),
        )
        .unwrap();
        let node = CertPaths::from_prefix(&dir.path().join("NL-NRM"));
        ca.issue(&IssueSpec::participant("NL-NRM"), &node, false)
            .unwrap();
        // the same CA, its certificate signed again by its key, expired yesterday
        let key_pem = std::fs::read_to_string(dir.path().join("ca.key")).unwrap();
        let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "TRM Federation CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let day = Duration::from_secs(86_400);
        params.not_before = (SystemTime::now() - day * 20).into();
        params.not_after = (SystemTime::now() - day).into();
        let expired = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), expired.pem()).unwrap();
        let ca = Ca::open(dir.path()).unwrap();
        let files =
            || ["crl.pem", "index.json"].map(|n| std::fs::read(dir.path().join(n)).unwrap());
        let before = files();
        let err = ca.revoke(&node.cert).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("the CA certificate expired"), "{text}");
        assert!(text.contains("successor"), "{text}");
        assert_eq!(files(), before, "nothing recorded");
        let err = ca.revoke_role(&trmx_certs::Role::Participant("NL-NRM".into()));
        assert!(err.unwrap_err().to_string().contains("expired"));
        assert_eq!(files(), before);
    }

    /// A CRL cannot promise a next update after its CA has expired: refused, with the days
    /// that still fit, and nothing written.
    #[test]
    fn a_crl_may_not_outlive_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CaOptions {
            validity_days: 10,
            ..CaOptions::new("trm.example", "TRM Federation CA")
        };
        let ca = Ca::init(dir.path(), &opts).unwrap();
        let files =
            || ["crl.pem", "index.json"].map(|n| std::fs::read(dir.path().join(n)).unwrap());
        let before = files();
        let err = ca
            .write_crl(Duration::from_secs(30 * 24 * 3600))
            .unwrap_err();
        assert!(matches!(err, CertError::InvalidArgument { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "next update days is invalid: the CRL (its nextUpdate) would outlive the CA \
                 certificate, which expires {}; at most 9 days remain: pass --next-update-days 9 \
                 or less, and replace the CA before it expires",
                trmx_certs::format_time(ca.not_after())
            )
        );
        assert_eq!(files(), before);
        ca.write_crl(Duration::from_secs(9 * 24 * 3600)).unwrap();
        assert_ne!(files(), before);

        // the CRLs written on their own, with the remembered nextUpdate (7 days after
        // init), end with a CA that has less left: a revocation never fails for want of
        // time left
        let fresh = tempfile::tempdir().unwrap();
        let short = CaOptions {
            validity_days: 5,
            ..opts
        };
        let ca = Ca::init(fresh.path(), &short).unwrap();
        let next_update = || {
            let der = load_crls_pem(&fresh.path().join("crl.pem"))
                .unwrap()
                .remove(0);
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
            crl.next_update().unwrap().timestamp()
        };
        let ca_end = i64::try_from(
            ca.not_after()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        assert!(next_update() <= ca_end, "init's CRL outlives the CA");
        let node = CertPaths::from_prefix(&fresh.path().join("NL-NRM"));
        let spec = IssueSpec {
            validity_days: 3,
            ..IssueSpec::participant("NL-NRM")
        };
        let info = ca.issue(&spec, &node, false).unwrap();
        ca.revoke(&node.cert).unwrap();
        assert!(ca.is_revoked(&info.serial_hex));
        assert!(
            next_update() <= ca_end,
            "the revocation's CRL outlives the CA"
        );
    }

    /// Two `trmx-certs` runs at once (here: separate `Ca` handles on one directory, which
    /// share nothing but the files) must not lose each other's issues or revocations.
    #[test]
    fn concurrent_runs_lose_no_certificate_and_no_revocation() {
        let (_d, fed) = federation();
        let ca_dir = fed.dir.join("ca");
        let mut serials = Vec::new();
        for i in 0..12 {
            let out = CertPaths::from_prefix(&fed.dir.join(format!("to-revoke-{i}")));
            let id = format!("NL-R{i:02}");
            let info = fed
                .ca
                .issue(&IssueSpec::participant(&id), &out, false)
                .unwrap();
            serials.push(info.serial_hex);
        }
        let runs: Vec<_> = (0..4)
            .map(|run| {
                let ca_dir = ca_dir.clone();
                let dir = fed.dir.clone();
                let to_revoke: Vec<String> = serials.iter().skip(run).step_by(4).cloned().collect();
                std::thread::spawn(move || {
                    let ca = Ca::open(&ca_dir).unwrap();
                    let mut issued = Vec::new();
                    for (i, serial) in to_revoke.iter().enumerate() {
                        ca.revoke_serial_hex(serial).unwrap();
                        let id = format!("BE-I{run}{i}");
                        let out = CertPaths::from_prefix(&dir.join(&id));
                        let info = ca.issue(&IssueSpec::participant(&id), &out, false).unwrap();
                        issued.push(info.serial_hex);
                    }
                    issued
                })
            })
            .collect();
        let issued: Vec<String> = runs
            .into_iter()
            .flat_map(|run| run.join().unwrap())
            .collect();

        let ca = Ca::open(&ca_dir).unwrap();
        let index = ca.issued();
        for serial in &serials {
            assert!(ca.is_revoked(serial), "revocation of {serial} lost");
        }
        for serial in &issued {
            assert!(
                index.iter().any(|c| &c.serial == serial),
                "issue of {serial} lost"
            );
        }
        let der = load_crls_pem(&fed.crl_path()).unwrap().remove(0);
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let listed: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        for serial in &serials {
            assert!(listed.contains(serial), "{serial} missing from the CRL");
        }
    }

    /// A broker certificate is useless, and the failure shows only at the nodes ("certificate
    /// not valid for name"), when it carries no name a client can match: refuse it at issue.
    #[test]
    fn broker_names_that_no_client_can_match_are_refused() {
        use std::net::{IpAddr, Ipv4Addr};
        let (_d, fed) = federation();
        let out = CertPaths::from_prefix(&fed.dir.join("b"));
        let issue = |dns: &[&str], ips: Vec<IpAddr>| {
            let dns = dns.iter().map(|d| d.to_string()).collect();
            fed.ca
                .issue(&IssueSpec::broker("eu-1", dns, ips), &out, true)
        };
        let err = issue(&[], Vec::new()).unwrap_err().to_string();
        assert_eq!(
            err,
            "broker names is invalid: a broker certificate needs at least one DNS name (--dns) \
             or IP address (--ip), the address nodes connect to"
        );
        let err = issue(&["127.0.0.1"], Vec::new()).unwrap_err().to_string();
        assert_eq!(
            err,
            "broker DNS name is invalid: \"127.0.0.1\" is an IP address: give it with --ip"
        );
        for bad in [
            "broker.example.eu:7443",
            "https://broker.example.eu",
            "broker.example.eu/",
            "a b",
            "-broker.example.eu",
            "broker-.example.eu",
            "broker..example.eu",
            "broker.example.eu.",
            ".example.eu",
            "",
            "broker.*.eu",
            "*",
        ] {
            let err = issue(&[bad], Vec::new()).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "broker DNS name is invalid: {bad:?} is not a host name"
                )),
                "{bad:?}: {err}"
            );
        }
        assert!(!out.cert.exists() && !out.key.exists());
        let long_label = format!("{}.example.eu", "a".repeat(64));
        assert!(issue(&[&long_label], Vec::new()).is_err());

        for good in [
            "localhost",
            "broker.trm.example.eu",
            "Broker-1.example",
            "*.trm.example",
        ] {
            issue(&[good], Vec::new()).unwrap();
        }
        issue(&[], vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]).unwrap();
    }

    #[test]
    fn certificate_details() {
        let (_d, fed) = federation();
        let node = CertInfo::from_pem_file(&fed.participant("INT-IOM").unwrap().cert).unwrap();
        assert!(node.client_auth && !node.server_auth);
        assert!(node.dns_names.is_empty() && node.ips.is_empty());
        assert_eq!(node.serial_hex.len(), 32);
        assert!(node.not_before < SystemTime::now() - Duration::from_secs(60));
        assert!(node.is_valid_at(SystemTime::now()));
        assert!(
            node.issuer.contains("CN=trm.example federation CA"),
            "{}",
            node.issuer
        );
        let broker = CertInfo::from_pem_file(&fed.broker("b").unwrap().cert).unwrap();
        assert!(broker.server_auth);
        assert_eq!(broker.dns_names, vec!["localhost".to_string()]);
        assert_eq!(broker.ips.len(), 2);
        // serials are random
        let again = CertInfo::from_pem_file(&fed.participant("INT-IOM").unwrap().cert).unwrap();
        assert_ne!(again.serial_hex, node.serial_hex);
        // nodes and operators get no DNS/IP names
        let mut spec = IssueSpec::participant("NL-NRM");
        spec.dns_names = vec!["localhost".into()];
        let out = CertPaths::from_prefix(&fed.dir.join("y"));
        assert!(fed.ca.issue(&spec, &out, false).is_err());
        // validity beyond the CA's is refused
        let spec = IssueSpec {
            validity_days: 20_000,
            ..IssueSpec::participant("NL-NRM")
        };
        let e = fed.ca.issue(&spec, &out, false).unwrap_err().to_string();
        assert!(e.contains("outlive the CA"), "{e}");
    }
}

mod cli {
    use super::*;
    use std::process::{Command, Output};
    use trmx_certs::CertInfo;

    fn certs(cwd: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_trmx-certs"))
            .current_dir(cwd)
            .env_remove("TRMX_CA_DIR")
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(out: &Output) -> String {
        assert!(
            out.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout.clone()).unwrap()
    }

    fn failed(out: &Output) -> String {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr.clone()).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        err.trim_end().to_string()
    }

    #[test]
    fn init_issue_show_revoke_show() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ok(&certs(
            d,
            &[
                "init",
                "--dir",
                "ca",
                "--trust-domain",
                "trm.example",
                "--name",
                "TRM Federation CA",
                "--validity-days",
                "3650",
            ],
        ));
        ok(&certs(
            d,
            &[
                "issue",
                "node",
                "--dir",
                "ca",
                "--participant",
                "NL-NRM",
                "--validity-days",
                "7",
            ],
        ));
        assert!(d.join("NL-NRM.pem").exists() && d.join("NL-NRM.key").exists());

        let show = |args: &[&str]| -> serde_json::Value {
            serde_json::from_str(&ok(&certs(d, args))).unwrap()
        };
        let v = show(&["show", "--dir", "ca", "--json", "NL-NRM.pem"]);
        assert_eq!(v["identity"], "spiffe://trm.example/participant/NL-NRM");
        assert_eq!(v["role"], "participant");
        assert_eq!(v["participant"], "NL-NRM");
        assert_eq!(v["revoked"], false);
        assert_eq!(v["issued_by_ca"], true);
        let serial = v["serial"].as_str().unwrap().to_string();

        // without --force, a second issue is refused
        let err = failed(&certs(
            d,
            &[
                "issue",
                "node",
                "--dir",
                "ca",
                "--participant",
                "NL-NRM",
                "--validity-days",
                "7",
            ],
        ));
        assert_eq!(err, "error: refusing to overwrite NL-NRM.pem (use --force)");

        ok(&certs(d, &["revoke", "--dir", "ca", "NL-NRM.pem"]));
        let v = show(&["show", "--dir", "ca", "--json", "NL-NRM.pem"]);
        assert_eq!(v["revoked"], true);
        assert_eq!(v["serial"], serial.as_str());
        let text = ok(&certs(d, &["show", "--dir", "ca", "NL-NRM.pem"]));
        assert!(text.contains("revoked:     yes"), "{text}");
        // without --dir nothing is said about revocation
        let v = show(&["show", "--json", "NL-NRM.pem"]);
        assert!(v.get("revoked").is_none());

        // broker, operator, renew, crl
        ok(&certs(
            d,
            &[
                "issue",
                "broker",
                "--dir",
                "ca",
                "--name",
                "eu-1",
                "--dns",
                "localhost",
                "--ip",
                "127.0.0.1",
                "--out",
                "out/broker",
                "--validity-days",
                "7",
            ],
        ));
        let v = show(&["show", "--json", "out/broker.pem"]);
        assert_eq!(v["role"], "broker");
        assert_eq!(v["dns_names"][0], "localhost");
        assert_eq!(v["ips"][0], "127.0.0.1");
        ok(&certs(
            d,
            &[
                "issue",
                "operator",
                "--dir",
                "ca",
                "--name",
                "alice",
                "--validity-days",
                "7",
            ],
        ));
        assert_eq!(
            show(&["show", "--json", "operator-alice.pem"])["role"],
            "operator"
        );
        ok(&certs(
            d,
            &[
                "renew",
                "--dir",
                "ca",
                "--validity-days",
                "7",
                "out/broker.pem",
            ],
        ));
        let renewed = show(&["show", "--dir", "ca", "--json", "out/broker.pem"]);
        assert_eq!(renewed["identity"], "spiffe://trm.example/broker/eu-1");
        assert_ne!(renewed["serial"], v["serial"]);
        ok(&certs(
            d,
            &["crl", "--dir", "ca", "--next-update-days", "3"],
        ));
    }

    #[test]
    fn errors_are_one_line_with_exit_code_1() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ok(&certs(
            d,
            &["init", "--dir", "ca", "--trust-domain", "trm.example"],
        ));
        let err = failed(&certs(
            d,
            &["issue", "node", "--dir", "ca", "--participant", "nl-nrm"],
        ));
        assert_eq!(
            err,
            "error: participant id \"nl-nrm\" is invalid: expected CC-ORG like NL-NRM"
        );
        let err = failed(&certs(
            d,
            &[
                "issue",
                "node",
                "--dir",
                "/nonexistent/ca",
                "--participant",
                "NL-NRM",
            ],
        ));
        assert_eq!(
            err,
            "error: no federation CA in /nonexistent/ca (neither ca.pem nor ca.key is there): \
             check --dir or TRMX_CA_DIR, or create one with `trmx-certs init`"
        );
        let err = failed(&certs(d, &["show", "missing.pem"]));
        assert_eq!(
            err,
            "error: cannot read certificate missing.pem: No such file or directory"
        );
        let err = failed(&certs(
            d,
            &["init", "--dir", "ca2", "--trust-domain", "TRM"],
        ));
        assert!(
            err.starts_with("error: trust domain \"TRM\" is invalid"),
            "{err}"
        );
    }

    /// Serials in the CA's current CRL, lower-case hex as `list` prints them.
    fn crl_serials(d: &Path) -> Vec<String> {
        use x509_parser::prelude::FromDer;
        let der = load_crls_pem(&d.join("ca/crl.pem")).unwrap().remove(0);
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        crl.iter_revoked_certificates()
            .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
            .collect()
    }

    /// The `trmx-certs revoke ...` line a command printed, as arguments.
    fn printed_revoke_command(stdout: &str) -> Vec<String> {
        let line = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("trmx-certs "))
            .unwrap_or_else(|| panic!("no trmx-certs command in:\n{stdout}"));
        line.split_whitespace().map(str::to_string).collect()
    }

    /// Runs each of `runs` as its own `trmx-certs` process in `d`, all started while this
    /// test holds `ca/ca.lock` (so each has read what it reads before the lock and waits
    /// for it), then releases the lock and returns what each printed.
    fn at_once_on_a_held_lock(d: &Path, runs: &[&[&str]]) -> Vec<String> {
        use rustix::fs::{FlockOperation, flock};
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(d.join("ca/ca.lock"))
            .unwrap();
        flock(&lock, FlockOperation::LockExclusive).unwrap();
        let children: Vec<_> = runs
            .iter()
            .map(|args| {
                Command::new(env!("CARGO_BIN_EXE_trmx-certs"))
                    .current_dir(d)
                    .env_remove("TRMX_CA_DIR")
                    .args(*args)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // (time for each to reach the lock; the outcome must not depend on it)
        std::thread::sleep(Duration::from_millis(500));
        drop(lock);
        children
            .into_iter()
            .map(|child| ok(&child.wait_with_output().unwrap()))
            .collect()
    }

    /// `issue --force` read the certificate it replaces before taking the CA lock: two at
    /// once both said they replaced the certificate that was there first (with its revoke
    /// command), and the one the first of them wrote, replaced by the second, was called
    /// another certificate "which this one does not replace". What is replaced is now read
    /// under the lock: each names what it replaced, with its revoke command, once.
    #[test]
    fn two_forced_issues_at_once_each_name_what_they_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let first = init_and_issue_node(d);
        let issue: &[&str] = &[
            "issue",
            "node",
            "--dir",
            "ca",
            "--participant",
            "NL-NRM",
            "--force",
        ];
        let printed = at_once_on_a_held_lock(d, &[issue, issue]);
        let in_file = CertInfo::from_pem_file(&d.join("NL-NRM.pem"))
            .unwrap()
            .serial_hex;
        let listed = list(d);
        assert_eq!(listed.len(), 3, "{listed:?}");
        let between = listed
            .iter()
            .map(|c| c["serial"].as_str().unwrap().to_string())
            .find(|s| *s != first && *s != in_file)
            .unwrap();
        for serial in [&first, &between] {
            let told = printed
                .iter()
                .filter(|out| out.contains(&format!("--serial {serial}\n")))
                .count();
            assert_eq!(told, 1, "{serial}: {printed:?}");
        }
    }

    /// `renew` read the certificate and checked its targets before taking the CA lock: two
    /// renewals of one certificate at once both renewed the certificate they had read, the
    /// second wrote over the first one's new pair and was recorded as the old serial's
    /// successor, and the first new certificate stayed valid with no file and no
    /// `renewed_by`, while both said they replaced the old serial. Both now wait here on a
    /// held lock; once it is released, the second renews what the first left, as if run
    /// after it: one chain in the index, each replaced serial told once.
    #[test]
    fn two_renewals_at_once_are_one_after_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let first = init_and_issue_node(d);
        let renew: &[&str] = &["renew", "--dir", "ca", "NL-NRM.pem"];
        let printed = at_once_on_a_held_lock(d, &[renew, renew]);
        let in_file = CertInfo::from_pem_file(&d.join("NL-NRM.pem"))
            .unwrap()
            .serial_hex;
        let listed = list(d);
        assert_eq!(listed.len(), 3, "{listed:?}");
        let renewed_by = |serial: &str| {
            listed.iter().find(|c| c["serial"] == serial).unwrap()["renewed_by"]
                .as_str()
                .map(str::to_string)
        };
        // one chain: the first certificate, the one between, the one in the file
        let between = renewed_by(&first).expect("the first certificate is renewed");
        assert_ne!(between, in_file);
        assert_eq!(renewed_by(&between).as_deref(), Some(in_file.as_str()));
        assert_eq!(renewed_by(&in_file), None);
        // each old certificate, still valid, has its revoke command printed once
        for serial in [&first, &between] {
            let told = printed
                .iter()
                .filter(|out| out.contains(&format!("--serial {serial}\n")))
                .count();
            assert_eq!(told, 1, "{serial}: {printed:?}");
        }
    }

    fn list(d: &Path) -> Vec<serde_json::Value> {
        serde_json::from_str(&ok(&certs(d, &["list", "--dir", "ca", "--json"]))).unwrap()
    }

    fn init_and_issue_node(d: &Path) -> String {
        ok(&certs(
            d,
            &["init", "--dir", "ca", "--trust-domain", "trm.example"],
        ));
        ok(&certs(
            d,
            &["issue", "node", "--dir", "ca", "--participant", "NL-NRM"],
        ));
        let v: serde_json::Value =
            serde_json::from_str(&ok(&certs(d, &["show", "--json", "NL-NRM.pem"]))).unwrap();
        v["serial"].as_str().unwrap().to_string()
    }

    /// The organisation makes its key and request; the CA issues from the request alone,
    /// and both print the same fingerprint for the administrator to compare.
    #[test]
    fn request_then_issue_from_it_keeps_the_key_with_the_organisation() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ok(&certs(
            d,
            &["init", "--dir", "ca", "--trust-domain", "trm.example"],
        ));
        std::fs::create_dir(d.join("org")).unwrap();
        let asked = ok(&certs(&d.join("org"), &["request", "--name", "NL-NRM"]));
        let fingerprint = |out: &str| {
            out.lines()
                .find_map(|l| l.split("fingerprint").nth(1))
                .map(|f| f.trim_start_matches(':').trim().to_string())
                .unwrap_or_else(|| panic!("no fingerprint in:\n{out}"))
        };
        std::fs::copy(d.join("org/NL-NRM.csr"), d.join("NL-NRM.csr")).unwrap();
        let issued = ok(&certs(
            d,
            &[
                "issue",
                "node",
                "--dir",
                "ca",
                "--participant",
                "NL-NRM",
                "--csr",
                "NL-NRM.csr",
            ],
        ));
        assert_eq!(fingerprint(&asked), fingerprint(&issued));
        // and the organisation finds the same digits in the certificate it gets back
        let shown: serde_json::Value =
            serde_json::from_str(&ok(&certs(d, &["show", "--json", "NL-NRM.pem"]))).unwrap();
        assert_eq!(shown["key_fingerprint"], fingerprint(&asked));
        assert!(d.join("NL-NRM.pem").exists());
        assert!(!d.join("NL-NRM.key").exists(), "the CA made no key");
        // the organisation's key and the CA's certificate are a pair
        let chain = load_certs_pem(&d.join("NL-NRM.pem")).unwrap();
        let key = trmx_certs::load_key_pem(&d.join("org/NL-NRM.key")).unwrap();
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        assert_eq!(list(d).len(), 1);
        // a key or a certificate given as the request is refused, and nothing is issued
        for (not_a_request, expect) in [
            ("org/NL-NRM.key", "it holds a private key"),
            ("NL-NRM.pem", "no CERTIFICATE REQUEST block"),
        ] {
            let err = failed(&certs(
                d,
                &[
                    "issue",
                    "node",
                    "--dir",
                    "ca",
                    "--participant",
                    "BE-PAYOKE",
                    "--csr",
                    not_a_request,
                ],
            ));
            assert!(err.contains(expect), "{err}");
        }
        assert_eq!(list(d).len(), 1);
        assert!(!d.join("BE-PAYOKE.pem").exists());

        // a request's certificate over one whose key the CA made: that key is stale
        ok(&certs(
            d,
            &["issue", "node", "--dir", "ca", "--participant", "BE-PAYOKE"],
        ));
        ok(&certs(&d.join("org"), &["request", "--name", "BE-PAYOKE"]));
        let out = certs(
            d,
            &[
                "issue",
                "node",
                "--dir",
                "ca",
                "--participant",
                "BE-PAYOKE",
                "--csr",
                "org/BE-PAYOKE.csr",
                "--force",
            ],
        );
        ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "warning: BE-PAYOKE.key does not match the certificate just written to \
                 BE-PAYOKE.pem, which is for the key of the request: it is most likely the key \
                 of the certificate this one replaced"
            ),
            "{stderr}"
        );
    }

    /// `request` and `init` over existing files said only "(use --force)", where `--force`
    /// is the destructive choice: it replaces the key in use, or the CA. `request` points to
    /// `--out` first, with a name that is free; `init` says what `--force` destroys. Nothing
    /// is changed by the refusals.
    #[test]
    fn refusals_of_request_and_init_name_the_safe_way_before_force() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        let key = std::fs::read(d.join("NL-NRM.key")).unwrap();
        // (NL-NRM-2 taken: the first free name is suggested)
        std::fs::write(d.join("NL-NRM-2.csr"), "").unwrap();
        let err = failed(&certs(d, &["request", "--name", "NL-NRM"]));
        assert_eq!(
            err,
            "error: refusing to overwrite NL-NRM.key: for a renewal, write the new key and \
             request under another name with --out, leaving the key in use in place until the \
             new certificate is back (`--out NL-NRM-3` names files that do not exist yet). \
             `--force` replaces NL-NRM.key with a new key (after a key leak): a certificate in \
             use with the old key cannot be used without it until a certificate for the new \
             one is installed"
        );
        assert_eq!(std::fs::read(d.join("NL-NRM.key")).unwrap(), key);
        assert!(!d.join("NL-NRM.csr").exists());
        // the suggestion works
        ok(&certs(
            d,
            &["request", "--name", "NL-NRM", "--out", "NL-NRM-3"],
        ));

        let ca_key = std::fs::read(d.join("ca/ca.key")).unwrap();
        let err = failed(&certs(
            d,
            &["init", "--dir", "ca", "--trust-domain", "trm.example"],
        ));
        assert_eq!(
            err,
            "error: refusing to overwrite ca/ca.pem: ca holds a federation CA already. For a \
             successor CA (a CA rollover), give another --dir and another --name. `--force` \
             replaces this CA with a new one: its files, key included, are moved into \
             ca/replaced-<unix seconds>/, and no certificate it issued is valid under the new \
             CA, so every broker and node then needs the new ca.pem and a certificate issued \
             again"
        );
        assert_eq!(std::fs::read(d.join("ca/ca.key")).unwrap(), ca_key);
    }

    /// `request` then `issue --csr` in one directory: the key beside the new certificate
    /// is the request's own, and nothing was replaced, yet it warned that the key was that
    /// of a replaced certificate, not matching, to be deleted. It says nothing of the key
    /// then; a key beside it that is another's is warned about, without a replacement.
    #[test]
    fn issue_from_a_request_made_in_the_same_directory_keeps_quiet_about_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ok(&certs(
            d,
            &["init", "--dir", "ca", "--trust-domain", "trm.example"],
        ));
        ok(&certs(d, &["request", "--name", "XX-TEST"]));
        let issue = |participant: &str, csr: &str| {
            certs(
                d,
                &[
                    "issue",
                    "node",
                    "--dir",
                    "ca",
                    "--participant",
                    participant,
                    "--csr",
                    csr,
                ],
            )
        };
        let out = issue("XX-TEST", "XX-TEST.csr");
        ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("warning"), "{stderr}");
        // the pair works
        let key = trmx_certs::load_key_pem(&d.join("XX-TEST.key")).unwrap();
        let chain = load_certs_pem(&d.join("XX-TEST.pem")).unwrap();
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        // another's key beside the certificate, nothing replaced: warned, as what it is
        std::fs::copy(d.join("XX-TEST.key"), d.join("YY-TEST.key")).unwrap();
        ok(&certs(
            &d.join("ca"),
            &["request", "--name", "YY-TEST", "--out", "../yy"],
        ));
        let out = issue("YY-TEST", "yy.csr");
        ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "warning: YY-TEST.key does not match the certificate just written to \
                 YY-TEST.pem, which is for the key of the request: it is the key of no \
                 certificate written here (this issue replaced none)"
            ),
            "{stderr}"
        );
    }

    #[test]
    fn renew_then_revoke_the_old_certificate_by_the_printed_serial() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = init_and_issue_node(d);
        std::fs::copy(d.join("NL-NRM.pem"), d.join("old.pem")).unwrap();

        let out = ok(&certs(d, &["renew", "--dir", "ca", "NL-NRM.pem"]));
        let new = CertInfo::from_pem_file(&d.join("NL-NRM.pem"))
            .unwrap()
            .serial_hex;
        assert_ne!(new, old);
        assert!(out.contains(&format!("(serial {old})")), "{out}");
        let command = printed_revoke_command(&out);
        assert_eq!(command, ["revoke", "--dir", "ca", "--serial", old.as_str()]);
        assert!(crl_serials(d).is_empty());

        // the operator runs the printed command once the new certificate is deployed
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let out = ok(&certs(d, &args));
        assert!(
            out.contains(&format!(
                "revoked spiffe://trm.example/participant/NL-NRM (serial {old})"
            )),
            "{out}"
        );
        assert!(!out.contains("PRIVATE KEY"), "{out}");
        assert_eq!(crl_serials(d), std::slice::from_ref(&old));

        // the old copy is refused, the deployed new certificate still accepted
        let fed = Federation::open(d).unwrap();
        let v = client_verifier(&fed);
        assert!(verify_client(&v, &leaf(&CertPaths::for_cert(&d.join("old.pem")))).is_err());
        verify_client(&v, &leaf(&CertPaths::for_cert(&d.join("NL-NRM.pem")))).unwrap();

        // the list shows both, the old one revoked and renewed by the new one
        let listed = list(d);
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert_eq!(listed[0]["serial"], old.as_str());
        assert_eq!(listed[0]["revoked"], true);
        assert_eq!(listed[0]["renewed_by"], new.as_str());
        assert_eq!(listed[1]["serial"], new.as_str());
        assert_eq!(listed[1]["revoked"], false);
        assert_eq!(listed[1]["renewed_by"], serde_json::Value::Null);
        for c in &listed {
            assert_eq!(c["identity"], "spiffe://trm.example/participant/NL-NRM");
        }
        let text = ok(&certs(d, &["list", "--dir", "ca"]));
        let row = |serial: &str| {
            text.lines()
                .find(|l| l.starts_with(serial))
                .unwrap_or_else(|| panic!("{serial} missing:\n{text}"))
                .to_string()
        };
        assert!(
            row(&old).contains(" revoked ") && row(&old).ends_with(&new),
            "{text}"
        );
        assert!(
            row(&new).contains(" valid ") && row(&new).ends_with(" -"),
            "{text}"
        );

        // revoking again succeeds, says so and keeps the CRL as it was
        let out = ok(&certs(d, &["revoke", "--dir", "ca", "old.pem"]));
        assert!(out.contains("was already revoked"), "{out}");
        assert_eq!(crl_serials(d), [old]);
    }

    /// After a key leak the administrator revokes, then renews to a new key: allowed, but
    /// stderr says that the certificate renewed was revoked (serial, time), so that nobody
    /// renews a revoked identity by accident. A renewal of a valid one says nothing of it.
    #[test]
    fn renewing_a_revoked_certificate_notes_it_on_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let first = init_and_issue_node(d);
        let out = certs(d, &["renew", "--dir", "ca", "NL-NRM.pem"]);
        ok(&out);
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let second = CertInfo::from_pem_file(&d.join("NL-NRM.pem"))
            .unwrap()
            .serial_hex;

        ok(&certs(d, &["revoke", "--dir", "ca", "NL-NRM.pem"]));
        let revoked_at = list(d)[1]["revoked_at"].as_str().unwrap().to_string();
        let note = |stderr: &[u8], old: &str, new: &str| {
            let stderr = String::from_utf8(stderr.to_vec()).unwrap();
            let expected = format!(
                "note: the certificate renewed, spiffe://trm.example/participant/NL-NRM (serial \
                 {old}), was revoked on {revoked_at}; the new certificate (serial {new}) is \
                 valid for the same identity: if it must not be, revoke it with `trmx-certs \
                 revoke --dir ca --serial {new}`\n"
            );
            // (after the note that the first certificate, renewed but not revoked, stays
            // valid)
            let (others, renewed) = stderr.split_once('\n').unwrap();
            assert!(
                others.contains(&format!("serial {first} (not after")),
                "{stderr}"
            );
            assert_eq!(renewed, expected);
        };
        let out = certs(d, &["renew", "--dir", "ca", "NL-NRM.pem"]);
        ok(&out);
        let third = CertInfo::from_pem_file(&d.join("NL-NRM.pem"))
            .unwrap()
            .serial_hex;
        note(&out.stderr, &second, &third);
        assert_eq!(list(d)[1]["renewed_by"], third.as_str());
        assert_eq!(list(d)[2]["revoked"], false);

        // to the organisation's own new key (--csr) alike
        ok(&certs(d, &["revoke", "--dir", "ca", "--serial", &third]));
        let revoked_at = list(d)[2]["revoked_at"].as_str().unwrap().to_string();
        ok(&certs(d, &["request", "--name", "NL-NRM", "--out", "next"]));
        let out = certs(
            d,
            &["renew", "--dir", "ca", "NL-NRM.pem", "--csr", "next.csr"],
        );
        ok(&out);
        let fourth = CertInfo::from_pem_file(&d.join("NL-NRM.pem"))
            .unwrap()
            .serial_hex;
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains(&format!(
                "(serial {third}), was revoked on {revoked_at}; the new certificate (serial \
                 {fourth})"
            )),
            "{stderr}"
        );
        assert_ne!(first, third);
    }

    #[test]
    fn issue_force_prints_how_to_revoke_the_replaced_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = init_and_issue_node(d);
        let issue = ["issue", "node", "--dir", "ca", "--participant", "NL-NRM"];
        let out = ok(&certs(d, &[&issue[..], &["--force"]].concat()));
        let command = printed_revoke_command(&out);
        assert_eq!(command, ["revoke", "--dir", "ca", "--serial", old.as_str()]);
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        ok(&certs(d, &args));
        assert_eq!(crl_serials(d), [old]);

        // the usual reaction to a compromise, revoke then reissue: nothing more to revoke
        ok(&certs(d, &["revoke", "--dir", "ca", "NL-NRM.pem"]));
        let out = ok(&certs(d, &[&issue[..], &["--force"]].concat()));
        assert!(out.contains("already revoked"), "{out}");
        assert!(!out.contains("trmx-certs revoke"), "{out}");
    }

    /// A second `issue` for a participant to another `--out` replaces nothing: the first
    /// certificate stays valid. That used to go unsaid; the issue now notes on stderr
    /// every other valid certificate of the identity, with the command that revokes one,
    /// and says nothing of a revoked one or of another identity's.
    #[test]
    fn a_second_certificate_for_an_identity_says_the_first_stays_valid() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let first = init_and_issue_node(d);
        ok(&certs(
            d,
            &["issue", "node", "--dir", "ca", "--participant", "BE-PAYOKE"],
        ));
        let second = ["issue", "node", "--dir", "ca", "--participant", "NL-NRM"];
        let out = certs(d, &[&second[..], &["--out", "second/NL-NRM"]].concat());
        ok(&out);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.starts_with(
                "note: spiffe://trm.example/participant/NL-NRM has another valid certificate, \
                 which this one does not replace: serial "
            ),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("`trmx-certs revoke --dir ca --serial {first}`")),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");

        // once the first is revoked, a third names only the second
        ok(&certs(d, &["revoke", "--dir", "ca", "NL-NRM.pem"]));
        let out = certs(d, &[&second[..], &["--out", "third/NL-NRM"]].concat());
        ok(&out);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!stderr.contains(&first), "{stderr}");
        assert!(stderr.contains("has another valid certificate"), "{stderr}");
        assert!(!stderr.contains("BE-PAYOKE"), "{stderr}");
    }

    /// `--out certs/` wrote the hidden files `certs/.pem` and `certs/.key`, and `--out
    /// NL.pem` wrote `NL.pem.pem` and `NL.pem.key`. A directory ending in / (or `.`) now
    /// gets the default names inside it, and a prefix ending in .pem, .key, .csr or .crt is
    /// refused, naming the prefix to give, with nothing issued.
    #[test]
    fn out_names_a_directory_or_a_prefix_never_hidden_or_doubled_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        std::fs::create_dir(d.join("existing")).unwrap();
        for (out, participant, expected) in [
            ("certs/", "BE-PAYOKE", "certs/BE-PAYOKE"),
            ("existing/", "NG-NAPTIP", "existing/NG-NAPTIP"),
            (".", "INT-ILO", "./INT-ILO"),
        ] {
            let issue = ["issue", "node", "--dir", "ca", "--participant", participant];
            let printed = ok(&certs(d, &[&issue[..], &["--out", out]].concat()));
            assert!(
                printed.contains(&format!("certificate: {expected}.pem")),
                "{printed}"
            );
            assert!(d.join(format!("{expected}.pem")).is_file(), "{out}");
            assert!(d.join(format!("{expected}.key")).is_file(), "{out}");
        }
        let printed = ok(&certs(
            d,
            &["request", "--name", "INT-IOM", "--out", "req/"],
        ));
        assert!(printed.contains("req/INT-IOM.csr"), "{printed}");
        assert!(d.join("req/INT-IOM.key").is_file());
        for name in ["certs", "existing", "req"] {
            let hidden = std::fs::read_dir(d.join(name))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect::<Vec<_>>();
            assert_eq!(hidden, Vec::<String>::new(), "{name}");
        }

        let issued = list(d).len();
        let issue = ["issue", "node", "--dir", "ca", "--participant", "INT-IOM"];
        let err = failed(&certs(d, &[&issue[..], &["--out", "INT-IOM.pem"]].concat()));
        assert_eq!(
            err,
            "error: --out is invalid: INT-IOM.pem ends in .pem, but --out is a path prefix \
             that .pem, .key or .csr is added to: give --out INT-IOM"
        );
        failed(&certs(d, &["request", "--name", "X", "--out", "x.KEY"]));
        assert_eq!(list(d).len(), issued, "nothing issued");
        assert!(!d.join("INT-IOM.pem.pem").exists() && !d.join("x.KEY.key").exists());
    }

    /// `--out d/.` was refused as an existing directory without the `/`, though `.` names
    /// a directory as `/` does: it writes inside it now. `--out afile/` said "Not a
    /// directory" and `--out dangling-link/` "File exists": each says what is wrong and
    /// what to do, with nothing issued.
    #[test]
    fn out_naming_a_directory_that_cannot_be_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        std::fs::create_dir(d.join("existing")).unwrap();
        let issue = ["issue", "node", "--dir", "ca", "--participant", "BE-PAYOKE"];
        let printed = ok(&certs(d, &[&issue[..], &["--out", "existing/."]].concat()));
        assert!(
            printed.contains("certificate: existing/./BE-PAYOKE.pem"),
            "{printed}"
        );
        assert!(d.join("existing/BE-PAYOKE.key").is_file());

        std::fs::write(d.join("notes"), "kept").unwrap();
        std::os::unix::fs::symlink("gone/certs", d.join("dangling")).unwrap();
        let issued = list(d).len();
        let issue = ["issue", "node", "--dir", "ca", "--participant", "NG-NAPTIP"];
        let err = failed(&certs(d, &[&issue[..], &["--out", "notes/"]].concat()));
        assert_eq!(
            err,
            "error: --out is invalid: notes/ names a directory to write the files in, but it \
             is a file (left as it is): give a directory, or a path prefix that names no file"
        );
        let err = failed(&certs(d, &[&issue[..], &["--out", "notes/sub/"]].concat()));
        assert_eq!(
            err,
            "error: --out is invalid: cannot use notes/sub/ as the directory to write the \
             files in: a part of its path is a file, not a directory; give a directory that \
             exists or can be made"
        );
        let err = failed(&certs(d, &[&issue[..], &["--out", "dangling/"]].concat()));
        assert_eq!(
            err,
            "error: --out is invalid: dangling/ is a symbolic link to gone/certs, which does \
             not exist: make that directory (`mkdir -p gone/certs`) or give another --out"
        );
        let err = failed(&certs(
            d,
            &["request", "--name", "NG-NAPTIP", "--out", "dangling/"],
        ));
        assert!(err.contains("is a symbolic link to gone/certs"), "{err}");
        // written with `/.` (`cannot create directory dangling: File exists`, `a part of its
        // path is a file`), the same
        let err = failed(&certs(d, &[&issue[..], &["--out", "dangling/./"]].concat()));
        assert_eq!(
            err,
            "error: --out is invalid: dangling/./ is a symbolic link to gone/certs, which \
             does not exist: make that directory (`mkdir -p gone/certs`) or give another --out"
        );
        let err = failed(&certs(d, &[&issue[..], &["--out", "notes/."]].concat()));
        assert!(
            err.starts_with(
                "error: --out is invalid: notes/. names a directory to write the \
                 files in, but it is a file"
            ),
            "{err}"
        );
        assert_eq!(list(d).len(), issued, "nothing issued");
        assert_eq!(std::fs::read_to_string(d.join("notes")).unwrap(), "kept");
        assert!(!d.join("gone").exists());
    }

    /// `--out DIR` naming an existing directory wrote the files inside it, where `--out
    /// DIR-less-prefix` writes beside: `--out certs/NL` with a directory `certs/NL` there
    /// made `certs/NL/NL-NRM.pem`. `--out` is a prefix, or a directory when it ends in `/`;
    /// an existing directory or file without the `/` is refused as ambiguous, naming both
    /// readings, with nothing issued or written, for `issue` and `request` alike.
    #[test]
    fn out_naming_an_existing_directory_or_file_is_refused_as_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        std::fs::create_dir(d.join("existing")).unwrap();
        std::fs::write(d.join("notes"), "kept").unwrap();
        let issued = list(d).len();
        let issue = ["issue", "node", "--dir", "ca", "--participant", "BE-PAYOKE"];
        let err = failed(&certs(d, &[&issue[..], &["--out", "existing"]].concat()));
        assert_eq!(
            err,
            "error: --out is invalid: existing is an existing directory: give --out existing/ \
             to write the files inside it as BE-PAYOKE.*, or a path prefix that names no \
             directory (e.g. --out existing/BE-PAYOKE)"
        );
        let err = failed(&certs(
            d,
            &["request", "--name", "BE-PAYOKE", "--out", "existing"],
        ));
        assert!(err.contains("existing is an existing directory"), "{err}");
        let err = failed(&certs(d, &[&issue[..], &["--out", "notes"]].concat()));
        assert_eq!(
            err,
            "error: --out is invalid: notes is an existing file, but --out is a path prefix \
             that .pem, .key or .csr is added to (beside that file, which stays as it is): \
             give a prefix that names no file, or a directory ending in /"
        );
        failed(&certs(
            d,
            &["request", "--name", "BE-PAYOKE", "--out", "notes"],
        ));
        assert_eq!(list(d).len(), issued, "nothing issued");
        assert_eq!(std::fs::read_dir(d.join("existing")).unwrap().count(), 0);
        assert_eq!(std::fs::read_to_string(d.join("notes")).unwrap(), "kept");
        assert!(!d.join("notes.pem").exists() && !d.join("notes.key").exists());
    }

    /// A clock set back behind what the CA last recorded (but after the CA was made) is
    /// not refused, since that record may itself come from a clock ahead; but it is said
    /// on stderr, with both times, before anything is signed: a CRL dated by it may be past
    /// its nextUpdate at once.
    #[test]
    fn a_clock_behind_the_ca_s_last_record_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        let out = certs(d, &["crl", "--dir", "ca"]);
        ok(&out);
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // the index as a clock 30 days ahead of this one left it
        let index_path = d.join("ca/index.json");
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
        let ahead = SystemTime::now() + Duration::from_secs(30 * 24 * 3600);
        let ahead_secs = ahead
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        index["certs"][0]["issued_at"] = ahead_secs.into();
        std::fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
        let out = certs(d, &["crl", "--dir", "ca"]);
        ok(&out);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.starts_with("warning: this machine's clock says "),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "but the CA index records an issue or revocation at {}",
                trmx_certs::format_time(trmx_certs::from_unix_seconds(
                    i64::try_from(ahead_secs).unwrap()
                ))
            )),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }

    /// `revoke` and `renew` given the wrong file said only `no CERTIFICATE block` (a key
    /// or the CRL) or `identity: no subject alternative name extension` (the CA's own
    /// certificate), and `revoke --serial ""` looked for serial `00`. Each now says what
    /// the file is, or that the serial is empty, and changes nothing.
    #[test]
    fn revoke_given_the_wrong_file_or_no_serial_says_what_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        let crl = std::fs::read(d.join("ca/crl.pem")).unwrap();
        for (args, expected) in [
            (
                &["revoke", "--dir", "ca", "NL-NRM.key"][..],
                "error: cannot parse certificate NL-NRM.key: no CERTIFICATE block (it holds a \
                 private key: are the certificate and key paths swapped?)",
            ),
            (
                &["revoke", "--dir", "ca", "ca/crl.pem"],
                "error: cannot parse certificate ca/crl.pem: no CERTIFICATE block (it holds a \
                 CRL: give the certificate's .pem)",
            ),
            (
                &["revoke", "--dir", "ca", "ca/ca.pem"],
                "error: cannot parse certificate ca/ca.pem: it is the CA certificate itself, \
                 not one it issued: give a broker, node or operator certificate (to retire \
                 the CA, move to a successor: see CA rollover)",
            ),
            (
                &["revoke", "--dir", "ca", "--serial", ""],
                "error: serial is invalid: it is empty: give the serial in hex, as \
                 `trmx-certs list` shows it",
            ),
            (
                &["renew", "--dir", "ca", "NL-NRM.key"],
                "error: cannot parse certificate NL-NRM.key: no CERTIFICATE block (it holds a \
                 private key: are the certificate and key paths swapped?)",
            ),
        ] {
            assert_eq!(failed(&certs(d, args)), expected, "{args:?}");
        }
        assert_eq!(std::fs::read(d.join("ca/crl.pem")).unwrap(), crl);
        assert_eq!(list(d).len(), 1);
    }

    /// A revocation whose CRL cannot be written (disk full, read-only directory; here a
    /// directory is in the way) failed with the write error alone, though the index had
    /// recorded it, so that `list` and `show --dir` called the certificate revoked while no
    /// CRL carried it. The error now says so and names the command that writes the CRL;
    /// that command then puts the serial in the CRL.
    #[test]
    fn a_revocation_whose_crl_cannot_be_written_says_how_to_write_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let serial = init_and_issue_node(d);
        let crl = d.join("ca/crl.pem");
        std::fs::remove_file(&crl).unwrap();
        std::fs::create_dir(&crl).unwrap();
        let err = failed(&certs(d, &["revoke", "--dir", "ca", "NL-NRM.pem"]));
        assert!(
            err.starts_with("error: cannot write CRL ca/crl.pem: "),
            "{err}"
        );
        assert!(
            err.ends_with(&format!(
                "; the revocation of serial {serial} is recorded in the CA index but in no \
                 CRL yet, so no broker or node knows of it: once the cause is fixed, run \
                 `trmx-certs crl --dir ca` and install the new crl.pem"
            )),
            "{err}"
        );
        assert_eq!(list(d)[0]["revoked"], true);

        std::fs::remove_dir(&crl).unwrap();
        ok(&certs(d, &["crl", "--dir", "ca"]));
        assert_eq!(crl_serials(d), [serial]);
    }

    /// `request --out ca/ca --force` wrote a request key over the CA key, and `issue` with
    /// one CA could write over another CA's files (during a rollover, `--out
    /// /srv/trmx-ca/ca --force` with `TRMX_CA_DIR=/srv/trmx-ca2`). Both are refused,
    /// naming the CA file, and both CAs stay as they were.
    #[test]
    fn no_command_writes_over_any_ca_s_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        ok(&certs(
            d,
            &[
                "init",
                "--dir",
                "ca2",
                "--trust-domain",
                "trm.example",
                "--name",
                "CA 2",
            ],
        ));
        let keys = |d: &Path| {
            ["ca/ca.key", "ca/ca.pem", "ca2/ca.key", "ca2/ca.pem"]
                .map(|f| std::fs::read(d.join(f)).unwrap())
        };
        let before = keys(d);
        for args in [
            &["request", "--name", "NL-NRM", "--out", "ca/ca", "--force"][..],
            &["request", "--name", "NL-NRM", "--out", "ca2/ca", "--force"],
            &[
                "issue",
                "node",
                "--dir",
                "ca2",
                "--participant",
                "NL-NRM",
                "--out",
                "ca/ca",
                "--force",
            ],
        ] {
            let err = failed(&certs(d, args));
            assert!(
                err.starts_with("error: refusing to write ca"),
                "{args:?}: {err}"
            );
            assert!(
                err.contains("/ca.key: it is the CA's own ")
                    || err.contains("/ca.pem: it is the CA's own "),
                "{args:?}: {err}"
            );
        }
        assert!(before == keys(d), "a CA file changed");
        assert!(!d.join("ca/ca.csr").exists() && !d.join("ca2/ca.csr").exists());
        ok(&certs(d, &["crl", "--dir", "ca"]));
        ok(&certs(d, &["crl", "--dir", "ca2"]));
    }

    /// On a file system that ignores case (vfat, as on a USB stick that carries an offline
    /// CA), `request --out ca/CA --force`, or `issue` with another CA to it, writes over
    /// `ca.key`: a CA file name is one in any case. (Here, on a file system that keeps
    /// case, the refusal is what is seen.)
    #[test]
    fn a_ca_file_named_in_another_case_is_a_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        ok(&certs(
            d,
            &[
                "init",
                "--dir",
                "ca2",
                "--trust-domain",
                "trm.example",
                "--name",
                "CA 2",
            ],
        ));
        for args in [
            &["request", "--name", "NL-NRM", "--out", "ca/CA", "--force"][..],
            &[
                "issue",
                "node",
                "--dir",
                "ca2",
                "--participant",
                "NL-NRM",
                "--out",
                "ca/Ca",
                "--force",
            ],
        ] {
            let err = failed(&certs(d, args));
            assert!(
                err.starts_with("error: refusing to write ca/C"),
                "{args:?}: {err}"
            );
            assert!(err.contains(": it is the CA's own "), "{args:?}: {err}");
        }
        let written: Vec<_> = std::fs::read_dir(d.join("ca"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with('C'))
            .collect();
        assert_eq!(written, Vec::<String>::new());
    }

    /// `request --out NL-NRM --force` was refused while NL-NRM.pem was in date, even once it
    /// was revoked after a key leak, the very case that needs a new key (the refusal said to
    /// write the request under another name). --force now replaces that key and keeps the
    /// old one as NL-NRM.key.replaced-<unix seconds> (its node needs it if the certificate
    /// is still in use), saying so on stderr with both ways on; without --force nothing is
    /// replaced.
    #[test]
    fn request_force_replaces_the_key_of_a_certificate_in_date_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        ok(&certs(d, &["revoke", "--dir", "ca", "NL-NRM.pem"]));
        let key = std::fs::read(d.join("NL-NRM.key")).unwrap();
        let err = failed(&certs(
            d,
            &["request", "--name", "NL-NRM", "--out", "NL-NRM"],
        ));
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert_eq!(std::fs::read(d.join("NL-NRM.key")).unwrap(), key);

        let out = certs(
            d,
            &["request", "--name", "NL-NRM", "--out", "NL-NRM", "--force"],
        );
        let printed = ok(&out);
        assert!(printed.contains("request:     NL-NRM.csr"), "{printed}");
        assert_ne!(std::fs::read(d.join("NL-NRM.key")).unwrap(), key);
        let kept: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("NL-NRM.key.replaced-"))
            .collect();
        let [kept] = kept.as_slice() else {
            panic!("one kept key: {kept:?}")
        };
        assert_eq!(std::fs::read(d.join(kept)).unwrap(), key);
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join(kept))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let stderr = String::from_utf8(out.stderr.clone()).unwrap();
        assert!(
            stderr.starts_with(
                "note: NL-NRM.key was the key of NL-NRM.pem \
                 (spiffe://trm.example/participant/NL-NRM, valid until "
            ),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "the old key is kept as {kept}. If that certificate was revoked (a key leak), \
                 delete {kept}. If it is still in use, its node cannot restart until the \
                 certificate issued to NL-NRM.csr is installed as NL-NRM.pem; to go back \
                 instead: `mv {kept} NL-NRM.key`"
            )),
            "{stderr}"
        );

        // a key without its certificate beside it is replaced as asked, and not kept
        std::fs::rename(d.join("NL-NRM.pem"), d.join("elsewhere.pem")).unwrap();
        let out = certs(
            d,
            &["request", "--name", "NL-NRM", "--out", "NL-NRM", "--force"],
        );
        ok(&out);
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `request --force` whose request could not be written (here a directory in the way of
    /// NL-NRM.csr; a full disk alike) failed after it had replaced NL-NRM.key: the node's
    /// certificate was left without its key, with no request to replace it, and the old key
    /// was kept under a name the error did not give. The key and the request are now written
    /// as a pair: the failure leaves the old key in place and nothing kept beside it.
    #[test]
    fn request_force_that_cannot_write_the_request_keeps_the_old_key_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        let key = std::fs::read(d.join("NL-NRM.key")).unwrap();
        std::fs::create_dir(d.join("NL-NRM.csr")).unwrap();
        let err = failed(&certs(
            d,
            &["request", "--name", "NL-NRM", "--out", "NL-NRM", "--force"],
        ));
        assert!(
            err.starts_with("error: cannot write certificate request NL-NRM.csr"),
            "{err}"
        );
        assert!(
            std::fs::read(d.join("NL-NRM.key")).unwrap() == key,
            "NL-NRM.key was replaced though the request failed"
        );
        let left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.contains(".replaced-") || name.starts_with(".trmx-certs-"))
            .collect();
        assert_eq!(left, Vec::<String>::new());
    }

    /// `revoke` or `renew` with --dir (or a TRMX_CA_DIR left set) naming another CA than
    /// the one that issued the certificate said `(signature: signature verification
    /// error)`. It now names the certificate's issuer, this CA and the flag to check, also
    /// for another CA of the same name (the default name, a staging CA).
    #[test]
    fn a_certificate_of_another_ca_names_both_and_the_dir_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        for (ca, name) in [("ca2", "CA 2"), ("ca3", "TRM Federation CA")] {
            let init = [
                "init",
                "--dir",
                ca,
                "--trust-domain",
                "trm.example",
                "--name",
                name,
            ];
            ok(&certs(d, &init));
        }
        let err = failed(&certs(d, &["revoke", "--dir", "ca2", "NL-NRM.pem"]));
        assert_eq!(
            err,
            "error: certificate NL-NRM.pem was not issued by this CA (its issuer is CN=TRM \
             Federation CA, O=trm.example, and this CA is CN=CA 2, O=trm.example: check that \
             --dir (or TRMX_CA_DIR) is the CA directory that issued it, not ca2)"
        );
        let err = failed(&certs(d, &["renew", "--dir", "ca3", "NL-NRM.pem"]));
        assert_eq!(
            err,
            "error: certificate NL-NRM.pem was not issued by this CA (it names CN=TRM \
             Federation CA, O=trm.example as its issuer, a CA of the same name but another \
             key: check that --dir (or TRMX_CA_DIR) is the CA directory that issued it, not \
             ca3)"
        );
    }

    /// `trmx-certs list | head -1` panicked with a backtrace ("failed printing to stdout:
    /// Broken pipe") and exit status 101. A reader that goes away now ends the output
    /// quietly, with success. (The listing is larger than a pipe holds, so the write meets
    /// the closed pipe whenever the reader goes.)
    #[test]
    fn a_listing_piped_into_a_reader_that_stops_early_is_no_panic() {
        use std::process::Stdio;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_and_issue_node(d);
        let index_path = d.join("ca/index.json");
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
        let first = index["certs"][0].clone();
        let certs_list = index["certs"].as_array_mut().unwrap();
        for n in 0..1000 {
            let mut entry = first.clone();
            entry["serial"] = format!("{n:032x}").into();
            certs_list.push(entry);
        }
        std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
        for args in [
            &["list", "--dir", "ca"][..],
            &["list", "--dir", "ca", "--json"],
        ] {
            let mut child = Command::new(env!("CARGO_BIN_EXE_trmx-certs"))
                .current_dir(d)
                .env_remove("TRMX_CA_DIR")
                .env_remove("RUST_BACKTRACE")
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            drop(child.stdout.take());
            let out = child.wait_with_output().unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.stderr.is_empty(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// `trmx-certs issue … | head -0` (stdout closed before the tool writes) panicked with
    /// exit status 101 after the certificate was issued and recorded: a script saw a
    /// failure, and a retry issued a second certificate. Every command that reports what
    /// it did to stdout ends quietly, with success, when nobody reads it. (The pipe's
    /// reader is closed before the tool starts, so every write meets it.)
    #[test]
    fn a_command_whose_stdout_is_closed_is_no_panic() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let closed_stdout = || {
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            writer
        };
        let run = |args: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_trmx-certs"))
                .current_dir(d)
                .env_remove("TRMX_CA_DIR")
                .env_remove("RUST_BACKTRACE")
                .args(args)
                .stdout(closed_stdout())
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.stderr.is_empty(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["init", "--dir", "ca", "--trust-domain", "trm.example"]);
        run(&["issue", "node", "--dir", "ca", "--participant", "NL-NRM"]);
        run(&["request", "--name", "BE-PAYOKE"]);
        run(&["crl", "--dir", "ca"]);
        run(&["revoke", "--dir", "ca", "NL-NRM.pem"]);
        // what was done is done: one certificate issued, and it is revoked
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("ca/index.json")).unwrap()).unwrap();
        let issued = index["certs"].as_array().unwrap();
        assert_eq!(issued.len(), 1, "{index}");
        assert!(!issued[0]["revoked_at"].is_null(), "{index}");
    }

    #[test]
    fn revoke_takes_exactly_one_of_file_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let serial = init_and_issue_node(d);
        let crl = std::fs::read(d.join("ca/crl.pem")).unwrap();

        let err = failed(&certs(d, &["revoke", "--dir", "ca", "--serial", "4a01"]));
        assert_eq!(
            err,
            "error: serial 4a01 was not issued by this CA (it is not in ca/index.json)"
        );
        for args in [
            &["revoke", "--dir", "ca"][..],
            &["revoke", "--dir", "ca", "NL-NRM.pem", "--serial", &serial],
        ] {
            let out = certs(d, args);
            assert_eq!(out.status.code(), Some(2), "{args:?}");
        }
        assert_eq!(std::fs::read(d.join("ca/crl.pem")).unwrap(), crl);
        assert_eq!(list(d)[0]["revoked"], false);
    }

    /// After a compromise, or when an organisation leaves, the administrator revokes "NL-NRM"
    /// without first looking up which serials it holds (a renewal leaves two valid ones).
    #[test]
    fn revoke_by_participant_revokes_every_certificate_of_it_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let first = init_and_issue_node(d);
        ok(&certs(d, &["renew", "--dir", "ca", "NL-NRM.pem"]));
        let renewed = CertInfo::from_pem_file(&d.join("NL-NRM.pem"))
            .unwrap()
            .serial_hex;
        ok(&certs(
            d,
            &["issue", "node", "--dir", "ca", "--participant", "BE-PAYOKE"],
        ));

        let revoke = ["revoke", "--dir", "ca", "--participant", "NL-NRM"];
        let out = ok(&certs(d, &revoke));
        for serial in [&first, &renewed] {
            assert!(
                out.contains(&format!(
                    "revoked spiffe://trm.example/participant/NL-NRM (serial {serial})"
                )),
                "{out}"
            );
        }
        let mut revoked = crl_serials(d);
        revoked.sort();
        let mut expected = vec![first.clone(), renewed.clone()];
        expected.sort();
        assert_eq!(revoked, expected);

        // again: nothing new, says so, the CRL still lists both
        let out = ok(&certs(d, &revoke));
        assert_eq!(out.matches("was already revoked").count(), 2, "{out}");
        assert_eq!(crl_serials(d).len(), 2);

        let before = std::fs::read(d.join("ca/index.json")).unwrap();
        let err = failed(&certs(
            d,
            &["revoke", "--dir", "ca", "--participant", "DE-NOBODY"],
        ));
        assert_eq!(
            err,
            "error: this CA issued no certificate for spiffe://trm.example/participant/DE-NOBODY \
             (see `trmx-certs list`)"
        );
        let err = failed(&certs(
            d,
            &["revoke", "--dir", "ca", "--participant", "nl-nrm"],
        ));
        assert!(
            err.starts_with("error: participant id \"nl-nrm\" is invalid"),
            "{err}"
        );
        assert_eq!(std::fs::read(d.join("ca/index.json")).unwrap(), before);
        let out = certs(
            d,
            &[
                "revoke",
                "--dir",
                "ca",
                "--participant",
                "NL-NRM",
                "NL-NRM.pem",
            ],
        );
        assert_eq!(out.status.code(), Some(2));

        ok(&certs(
            d,
            &["issue", "operator", "--dir", "ca", "--name", "alice"],
        ));
        let out = ok(&certs(d, &["revoke", "--dir", "ca", "--operator", "alice"]));
        assert!(
            out.contains("revoked spiffe://trm.example/operator/alice"),
            "{out}"
        );
        assert_eq!(crl_serials(d).len(), 3);
    }

    /// Years in, the CA itself nears its end: every run says so, and an issue that would
    /// outlive it says how long a certificate can still be.
    #[test]
    fn a_ca_near_its_expiry_warns_and_says_what_can_still_be_issued() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let init = [
            "init",
            "--dir",
            "ca",
            "--trust-domain",
            "trm.example",
            "--validity-days",
            "100",
        ];
        ok(&certs(d, &init));
        let node = ["issue", "node", "--dir", "ca", "--participant", "NL-NRM"];
        let out = certs(d, &node);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains(
                "warning: the CA certificate expires on 2" // the date
            ) && err.contains("(in 99 days)"),
            "{err}"
        );
        assert!(
            err.contains("at most 99 days remain: pass --validity-days 99 or less"),
            "{err}"
        );
        assert!(!d.join("NL-NRM.pem").exists());

        let out = certs(d, &[&node[..], &["--validity-days", "99"]].concat());
        ok(&out);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("(in 99 days)"), "{err}");
        // read-only commands warn too
        let out = certs(d, &["list", "--dir", "ca"]);
        ok(&out);
        assert!(
            String::from_utf8(out.stderr)
                .unwrap()
                .contains("(in 99 days)")
        );

        // a CA with years ahead does not
        let far = tempfile::tempdir().unwrap();
        ok(&certs(far.path(), &init[..5]));
        let out = certs(far.path(), &["list", "--dir", "ca"]);
        ok(&out);
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Least privilege: `list` and `show --dir` need `ca.pem` and `index.json`, not the CA
    /// key; `issue` says plainly that it cannot read the key.
    #[test]
    fn list_and_show_work_without_access_to_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let serial = init_and_issue_node(d);
        ok(&certs(d, &["revoke", "--dir", "ca", "--serial", &serial]));
        hide_ca_key(&d.join("ca"));

        let listed = list(d);
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["serial"], serial.as_str());
        assert_eq!(listed[0]["revoked"], true);
        let text = ok(&certs(d, &["list", "--dir", "ca"]));
        assert!(text.contains(&serial), "{text}");
        let v: serde_json::Value = serde_json::from_str(&ok(&certs(
            d,
            &["show", "--dir", "ca", "--json", "NL-NRM.pem"],
        )))
        .unwrap();
        assert_eq!(v["issued_by_ca"], true);
        assert_eq!(v["revoked"], true);

        let err = failed(&certs(
            d,
            &["issue", "node", "--dir", "ca", "--participant", "BE-PAYOKE"],
        ));
        assert!(
            err.starts_with("error: cannot read CA key ca/ca.key: "),
            "{err}"
        );
        assert!(!d.join("BE-PAYOKE.pem").exists());
        // a wrong --dir still says there is no CA there
        let err = failed(&certs(d, &["list", "--dir", "."]));
        assert!(err.starts_with("error: no federation CA in ."), "{err}");
        let err = failed(&certs(d, &["show", "--dir", ".", "NL-NRM.pem"]));
        assert!(err.starts_with("error: no federation CA in ."), "{err}");
    }

    #[test]
    fn crl_refuses_a_next_update_past_the_ca_s_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let init = ["init", "--dir", "ca", "--trust-domain", "trm.example"];
        ok(&certs(d, &[&init[..], &["--validity-days", "10"]].concat()));
        let crl = std::fs::read(d.join("ca/crl.pem")).unwrap();
        let out = certs(d, &["crl", "--dir", "ca", "--next-update-days", "30"]);
        assert_eq!(out.status.code(), Some(1));
        // (after the CA-expiry warning) one line, saying what still fits
        let stderr = String::from_utf8(out.stderr).unwrap();
        let err = stderr.lines().last().unwrap();
        assert!(
            err.starts_with(
                "error: next update days is invalid: the CRL (its nextUpdate) would outlive the \
                 CA certificate, which expires 2"
            ),
            "{err}"
        );
        assert!(
            err.ends_with(
                "at most 9 days remain: pass --next-update-days 9 or less, and replace the CA \
                 before it expires"
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(d.join("ca/crl.pem")).unwrap(), crl);
        ok(&certs(
            d,
            &["crl", "--dir", "ca", "--next-update-days", "9"],
        ));
        assert_ne!(std::fs::read(d.join("ca/crl.pem")).unwrap(), crl);
    }

    #[test]
    fn help_documents_every_command() {
        let dir = tempfile::tempdir().unwrap();
        let help = ok(&certs(dir.path(), &["--help"]));
        for cmd in ["init", "issue", "revoke", "crl", "renew", "show", "list"] {
            assert!(help.contains(cmd), "{cmd} missing from --help:\n{help}");
        }
        let issue = ok(&certs(dir.path(), &["issue", "--help"]));
        for cmd in ["broker", "node", "operator"] {
            assert!(
                issue.contains(cmd),
                "{cmd} missing from issue --help:\n{issue}"
            );
        }
    }
}

/// Certificate requests made elsewhere than by `trmx-certs request` (openssl and the like):
/// which keys are certified, and that the certificate then works in a mutual TLS 1.3
/// handshake with a broker of the federation.
mod requests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{self, EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair as _};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateSigningRequestDer, PrivateKeyDer};
    use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
    use trmx_certs::{CertRequest, IssueSpec};

    /// DER: a tag, its length and its content.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else if len < 0x100 {
            out.extend([0x81, len as u8]);
        } else {
            out.extend([0x82, (len >> 8) as u8, len as u8]);
        }
        out.extend_from_slice(content);
        out
    }

    fn seq(parts: &[&[u8]]) -> Vec<u8> {
        tlv(0x30, &parts.concat())
    }

    fn bits(content: &[u8]) -> Vec<u8> {
        tlv(0x03, &[&[0u8][..], content].concat())
    }

    const EC_PUBLIC_KEY: &[u8] = &[0x06, 7, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x06, 8, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 5, 0x2b, 0x81, 0x04, 0x00, 0x22];
    const P521: &[u8] = &[0x06, 5, 0x2b, 0x81, 0x04, 0x00, 0x23];
    const ECDSA_SHA256: &[u8] = &[0x06, 8, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    const ECDSA_SHA384: &[u8] = &[0x06, 8, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];

    /// A PKCS #10 request for `spki`, signed by `sign` under signature algorithm `sig_alg`
    /// (as openssl makes them: `openssl req -new -key K [-sha384]`).
    fn request_der(spki: &[u8], sig_alg: &[u8], sign: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        let cn = seq(&[&[0x06, 3, 0x55, 0x04, 0x03], &tlv(0x0c, b"x")]);
        let name = seq(&[&tlv(0x31, &cn)]);
        let info = seq(&[&[0x02, 1, 0], &name, spki, &[0xa0, 0]]);
        let signature = sign(&info);
        seq(&[&info, &seq(&[sig_alg]), &bits(&signature)])
    }

    fn pem(label: &str, der: &[u8]) -> String {
        // base64 without a dependency: through rcgen's own PEM of a request is not
        // possible for a hand-made one, so encode here
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk.len();
            let v = u32::from(chunk[0]) << 16
                | u32::from(*chunk.get(1).unwrap_or(&0)) << 8
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= n {
                    b64.push(T[(v >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    /// An ECDSA key on `curve` (its OID) and a request for it.
    fn ecdsa_request(
        alg: &'static EcdsaSigningAlgorithm,
        curve: &[u8],
    ) -> (String, PrivateKeyDer<'static>) {
        let sig_alg = if curve == P256 {
            ECDSA_SHA256
        } else {
            ECDSA_SHA384
        };
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let spki = seq(&[
            &seq(&[EC_PUBLIC_KEY, curve]),
            &bits(key.public_key().as_ref()),
        ]);
        let der = request_der(&spki, sig_alg, |m| {
            key.sign(&rng, m).unwrap().as_ref().to_vec()
        });
        let key_der = PrivateKeyDer::try_from(pkcs8.as_ref().to_vec()).unwrap();
        (pem("CERTIFICATE REQUEST", &der), key_der)
    }

    /// Runs a mutual TLS 1.3 handshake in memory: a broker of `fed` (its client verifier
    /// as the broker builds it) and a client with `chain` and `key`.
    fn handshake(
        fed: &Federation,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), rustls::Error> {
        let broker = fed.broker("b").unwrap();
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(client_verifier(fed))
            .with_single_cert(
                load_certs_pem(&broker.cert).unwrap(),
                trmx_certs::load_key_pem(&broker.key).unwrap(),
            )
            .unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(fed))
            .with_client_auth_cert(chain, key)?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(Arc::new(client), name)?;
        let mut s = ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    /// Issues a node certificate from `csr_pem` and returns its chain.
    fn issue(fed: &Federation, dir: &Path, csr_pem: &str) -> Vec<CertificateDer<'static>> {
        let csr = dir.join("org.csr");
        std::fs::write(&csr, csr_pem).unwrap();
        let request = CertRequest::from_pem_file(&csr).unwrap();
        let cert = dir.join("org.pem");
        let _ = std::fs::remove_file(&cert);
        fed.ca
            .issue_for_request(&IssueSpec::participant("NL-NRM"), &request, &cert, false)
            .unwrap();
        load_certs_pem(&cert).unwrap()
    }

    /// The key of a request goes into the certificate as the request has it, whatever
    /// digest the request was signed with: openssl signs a P-384 request with SHA-256 by
    /// default, and `-sha384` a P-256 one with SHA-384 (the two requests in tests/data
    /// were made so; their keys were thrown away).
    #[test]
    fn a_request_signed_with_another_digest_than_its_curve_s_gets_its_own_key_certified() {
        use x509_parser::certification_request::X509CertificationRequest;
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (d, fed) = federation();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        for name in ["p384-sha256.csr", "p256-sha384.csr"] {
            let csr_pem = std::fs::read_to_string(data.join(name)).unwrap();
            let chain = issue(&fed, d.path(), &csr_pem);
            let csr_der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
            let (_, csr) = X509CertificationRequest::from_der(&csr_der).unwrap();
            let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
            assert_eq!(
                cert.public_key().raw,
                csr.certification_request_info.subject_pki.raw,
                "{name}: the certificate's key is not the request's"
            );
        }
        // with keys at hand: the certificate and the organisation's key make a handshake
        let (csr, key) = ecdsa_request(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, P384);
        handshake(&fed, issue(&fed, d.path(), &csr), key).unwrap();
        let (csr, key) = ecdsa_request(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, P256);
        handshake(&fed, issue(&fed, d.path(), &csr), key).unwrap();
        // Ed25519 (openssl genpkey -algorithm ed25519) works too
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let chain = issue(&fed, d.path(), &csr);
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        handshake(&fed, chain, key_der).unwrap();
    }

    /// The file the CA is given must hold exactly one request and no private key: a key
    /// sent along (`cat NL-NRM.csr NL-NRM.key`, or openssl's output with the key in it)
    /// has left the organisation, and the CA must not certify it as if it had not.
    #[test]
    fn a_request_file_with_a_private_key_or_two_requests_is_refused() {
        let (d, fed) = federation();
        let org = trmx_certs::RequestPaths::from_prefix(&d.path().join("org"));
        CertRequest::create("NL-NRM", &org, false).unwrap();
        let csr = std::fs::read_to_string(&org.request).unwrap();
        let key = std::fs::read_to_string(&org.key).unwrap();
        let other = rcgen::CertificateParams::default()
            .serialize_request(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem()
            .unwrap();
        // (an encrypted key's armour, built here so that no key-like block sits in the source)
        let encrypted = ["ENCRYPTED", "PRIVATE", "KEY"].join(" ");
        let encrypted = format!("-----BEGIN {encrypted}-----\nAAAA\n-----END {encrypted}-----\n");
        let file = d.path().join("sent.csr");
        for (contents, expect) in [
            (format!("{csr}{key}"), "private key"),
            (format!("{key}{csr}"), "private key"),
            (format!("{csr}{encrypted}"), "private key"),
            (format!("{csr}{other}"), "2 CERTIFICATE REQUEST blocks"),
        ] {
            std::fs::write(&file, contents).unwrap();
            let err = CertRequest::from_pem_file(&file).unwrap_err().to_string();
            assert!(err.contains(expect), "{err}");
        }
        // a DER request is named as such
        let der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        std::fs::write(&file, der.as_ref()).unwrap();
        let err = CertRequest::from_pem_file(&file).unwrap_err().to_string();
        assert!(err.contains("openssl req -inform DER"), "{err}");
        assert!(fed.ca.issued().is_empty());
    }

    /// A request read from a pipe (whose size no metadata tells) is bounded like a file.
    #[test]
    fn a_request_read_from_a_pipe_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("csr.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
                // the reader may stop early: a broken pipe is fine
                let _ = f.write_all(&vec![b'A'; 1 << 20]);
            })
        };
        let err = CertRequest::from_pem_file(&fifo).unwrap_err().to_string();
        writer.join().unwrap();
        assert!(err.contains("more than"), "{err}");
    }

    /// The fingerprint both sides read out is the SHA-256 of the key's
    /// SubjectPublicKeyInfo, so that an organisation that made its request with openssl
    /// can compute it too (`openssl req -in NL-NRM.csr -noout -pubkey | openssl pkey -pubin
    /// -outform DER | sha256sum`), and it covers the key's algorithm and curve.
    #[test]
    fn the_fingerprint_is_the_sha256_of_the_subject_public_key_info() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (d, fed) = federation();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let csr = std::fs::read_to_string(data.join("p384-sha256.csr")).unwrap();
        let chain = issue(&fed, d.path(), &csr);
        let request = CertRequest::from_pem_file(&d.path().join("org.csr")).unwrap();
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(request.fingerprint().replace(' ', ""), hex);
        // the one openssl printed for this request
        assert_eq!(
            hex,
            "93669acee944e184e1c0c640f0ac3ed25dfcac4cb85fed7583714a28fe64f65d"
        );
    }

    /// A key that no handshake of the federation can use is refused by name, not as an
    /// "altered" request, and nothing is issued.
    #[test]
    fn a_key_no_handshake_can_use_is_refused_saying_so() {
        let (d, fed) = federation();
        let csr = d.path().join("org.csr");
        let garbage = |_: &[u8]| vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01];
        // P-521 (ring verifies no P-521 signature) and a 1024-bit RSA key
        let p521 = seq(&[&seq(&[EC_PUBLIC_KEY, P521]), &bits(&[4; 133])]);
        let mut modulus = vec![0x00, 0xc1];
        modulus.extend([0x5a; 127]);
        let rsa_key = seq(&[&tlv(0x02, &modulus), &[0x02, 3, 1, 0, 1]]);
        let rsa_alg = [
            &[
                0x06, 9, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
            ][..],
            &[0x05, 0],
        ]
        .concat();
        let rsa1024 = seq(&[&seq(&[&rsa_alg]), &bits(&rsa_key)]);
        let sha1_rsa = [
            0x06, 9, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05,
        ];
        for (spki, sig_alg, expect) in [
            (p521, ECDSA_SHA256, "P-521"),
            (rsa1024, &sha1_rsa[..], "1024-bit RSA"),
        ] {
            std::fs::write(
                &csr,
                pem("CERTIFICATE REQUEST", &request_der(&spki, sig_alg, garbage)),
            )
            .unwrap();
            let err = CertRequest::from_pem_file(&csr).unwrap_err().to_string();
            assert!(
                err.contains(expect) && err.contains("not supported"),
                "{err}"
            );
        }
        assert!(fed.ca.issued().is_empty());
    }
}
