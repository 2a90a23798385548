//! CRL: revocation on reload (new and open connections), stale CRLs, failed reloads.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tonic_health::pb::health_check_response::ServingStatus;
use trmx_transport::{
    CrlPolicy, CrlRecord, HandshakeFailure, ListenerLimits, ServerTls, TlsFile, TransportError,
    client_config,
};

use super::harness::{
    Fixture, Server, assert_refused, check_request, eventually, failures, health, raw_accepted,
};

#[tokio::test]
async fn revoked_certificate_is_refused_and_its_open_stream_closed() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let bystander = fx.fed.participant("BE-PAYOKE").unwrap();
    let server = Server::start(fx.server_tls(CrlPolicy::Warn), ListenerLimits::default()).await;

    // positive control: the certificate works, a long Watch stream is open
    let mut client = health(server.addr, &fx.paths(&node));
    let mut watch = client.watch(check_request()).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let mut other = health(server.addr, &fx.paths(&bystander));
    let mut other_watch = other.watch(check_request()).await.unwrap().into_inner();
    other_watch.message().await.unwrap().unwrap();
    let node_config = client_config(&fx.paths(&node)).unwrap();
    assert!(
        raw_accepted(server.addr, node_config.clone())
            .await
            .unwrap()
    );
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 2)
        .await
    );

    fx.fed.revoke(&node).unwrap();
    let report = server.tls.reload().unwrap();
    assert_eq!(report.closed_connections, 1);
    assert_eq!(report.closed, ["participant NL-NRM from 127.0.0.1"]);
    assert!(!report.crl.stale);

    // the open stream ends within seconds
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("open stream of a revoked certificate closed within 5 s");
    assert!(!matches!(next, Ok(Some(_))), "{next:?}");
    // new connections are refused, and counted as revoked
    assert!(!raw_accepted(server.addr, node_config).await.unwrap());
    assert!(
        eventually(Duration::from_secs(5), || failures(
            &server.tls,
            HandshakeFailure::Revoked
        ) >= 1)
        .await
    );
    let err = client.check(check_request()).await.unwrap_err();
    assert_refused(&err);
    // the client hears why (the server's alert), not a broken pipe
    let mut causes = format!("{err}");
    let mut cause = std::error::Error::source(&err);
    while let Some(e) = cause {
        causes.push_str(&format!(": {e}"));
        cause = e.source();
    }
    assert!(causes.contains("CertificateRevoked"), "{causes}");
    // the other participant is untouched
    other.check(check_request()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 1)
        .await
    );
    // a second reload closes nothing more
    assert_eq!(server.tls.reload().unwrap().closed_connections, 0);
    server.stop().await;
}

#[tokio::test]
async fn failed_reload_keeps_the_old_config() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(CrlPolicy::Warn), ListenerLimits::default()).await;
    let good_crl = std::fs::read(fx.crl()).unwrap();
    std::fs::write(
        fx.crl(),
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let err = server.tls.reload().unwrap_err();
    assert!(err.to_string().contains("crl"), "{err}");
    let config = client_config(&fx.paths(&node)).unwrap();
    assert!(raw_accepted(server.addr, config).await.unwrap());
    std::fs::write(fx.crl(), good_crl).unwrap();
    server.tls.reload().unwrap();
}

fn write_stale_crl(fx: &Fixture) {
    let now = SystemTime::now();
    fx.fed
        .ca
        .write_crl_with_times(
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
}

#[tokio::test]
async fn stale_crl_under_strict_policy_refuses() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    write_stale_crl(&fx);
    let tls = fx.server_tls(CrlPolicy::Strict);
    assert!(tls.crl_status().stale);
    let server = Server::start(tls, ListenerLimits::default()).await;
    let config = client_config(&fx.paths(&node)).unwrap();
    assert!(!raw_accepted(server.addr, config.clone()).await.unwrap());
    assert!(
        eventually(Duration::from_secs(5), || failures(
            &server.tls,
            HandshakeFailure::StaleCrl
        ) == 1)
        .await
    );

    // a fresh CRL lets the same certificate in again
    fx.fed.ca.write_crl(Duration::from_secs(3600)).unwrap();
    let report = server.tls.reload().unwrap();
    assert!(!report.crl.stale);
    assert!(raw_accepted(server.addr, config).await.unwrap());
}

#[tokio::test]
async fn stale_crl_under_warn_policy_is_reported_but_accepted() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    write_stale_crl(&fx);
    let tls = fx.server_tls(CrlPolicy::Warn);
    let status = tls.crl_status();
    assert!(status.stale);
    assert!(status.next_update.unwrap() < SystemTime::now());
    let server = Server::start(tls, ListenerLimits::default()).await;
    let config = client_config(&fx.paths(&node)).unwrap();
    assert!(raw_accepted(server.addr, config).await.unwrap());
}

#[test]
fn crl_status_follows_the_clock() {
    let fx = Fixture::new();
    fx.fed.ca.write_crl(Duration::from_secs(3600)).unwrap();
    let tls = fx.server_tls(CrlPolicy::Warn);
    let status = tls.crl_status();
    assert!(!status.stale);
    let next = status.next_update.unwrap();
    assert!(next > SystemTime::now() + Duration::from_secs(3000));
    assert!(!tls.crl_status_at(next - Duration::from_secs(1)).stale);
    assert!(tls.crl_status_at(next).stale);

    let without = ServerTls::load(&fx.paths(&fx.broker), None, CrlPolicy::Strict).unwrap();
    assert_eq!(without.crl_status().next_update, None);
    assert!(!without.crl_status().stale);
}

/// Writes the federation's current CRL to `to` as DER (one CRL, no PEM armour).
fn write_der_crl(fx: &Fixture, to: &std::path::Path) {
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateRevocationListDer::from_pem_file(fx.crl()).unwrap();
    std::fs::write(to, der.as_ref()).unwrap();
}

#[tokio::test]
async fn der_crl_is_loaded_and_reloaded() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let bystander = fx.fed.participant("BE-PAYOKE").unwrap();
    let der_crl = fx.dir.path().join("ca.crl.der");
    write_der_crl(&fx, &der_crl);
    let tls = ServerTls::load(&fx.paths(&fx.broker), Some(&der_crl), CrlPolicy::Strict).unwrap();
    assert!(tls.crl_status().next_update.is_some());
    let server = Server::start(tls, ListenerLimits::default()).await;
    let node_config = client_config(&fx.paths(&node)).unwrap();
    assert!(
        raw_accepted(server.addr, node_config.clone())
            .await
            .unwrap()
    );

    fx.fed.revoke(&node).unwrap();
    write_der_crl(&fx, &der_crl);
    let report = server.tls.reload().unwrap();
    assert!(!report.crl.stale);
    assert!(!raw_accepted(server.addr, node_config).await.unwrap());
    let bystander_config = client_config(&fx.paths(&bystander)).unwrap();
    assert!(raw_accepted(server.addr, bystander_config).await.unwrap());
}

#[test]
fn crl_file_neither_pem_nor_der_is_refused_naming_the_file() {
    let fx = Fixture::new();
    let der = {
        let path = fx.dir.path().join("whole.crl.der");
        write_der_crl(&fx, &path);
        std::fs::read(path).unwrap()
    };
    let truncated = fx.dir.path().join("truncated.crl");
    std::fs::write(&truncated, &der[..der.len() - 1]).unwrap();
    let trailing = fx.dir.path().join("trailing.crl");
    std::fs::write(&trailing, [der.as_slice(), b"\0"].concat()).unwrap();
    // a PEM file without a CRL block (the CA certificate) is not a DER CRL either
    let certificate = fx.fed.ca_cert_path();
    for path in [truncated, trailing, certificate] {
        let err = ServerTls::load(&fx.paths(&fx.broker), Some(&path), CrlPolicy::Warn).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a DER CRL"), "{msg}");
    }
}

#[tokio::test]
async fn concurrent_reloads_take_turns_and_the_last_crl_on_disk_wins() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let bystander = fx.fed.participant("BE-PAYOKE").unwrap();
    let tls = fx.server_tls(CrlPolicy::Warn);
    let stop = AtomicBool::new(false);
    // Three "interval" threads reload in a loop while the operator revokes a certificate
    // and reloads once more (SIGHUP); then the loops stop.
    let (mut generations, sighup) = std::thread::scope(|scope| {
        let loops: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    let mut seen = Vec::new();
                    while seen.len() < 5 || !stop.load(Ordering::Acquire) {
                        seen.push(tls.reload().unwrap().generation);
                    }
                    seen
                })
            })
            .collect();
        fx.fed.revoke(&node).unwrap();
        let sighup = tls.reload().unwrap().generation;
        stop.store(true, Ordering::Release);
        let per_thread: Vec<Vec<u64>> = loops.into_iter().map(|l| l.join().unwrap()).collect();
        (per_thread, sighup)
    });
    for seen in &generations {
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }
    generations.push(vec![sighup]);
    let mut all: Vec<u64> = generations.concat();
    all.sort_unstable();
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, expected, "every reload got its own next generation");

    // the CRL written last (with the revocation) is the one in force. (An end-state check:
    // the loops went on reloading after the revocation, so it cannot catch the race itself;
    // the distinct, increasing generations above are what the lock is for.)
    let server = Server::start(tls, ListenerLimits::default()).await;
    let node_config = client_config(&fx.paths(&node)).unwrap();
    assert!(!raw_accepted(server.addr, node_config).await.unwrap());
    let bystander_config = client_config(&fx.paths(&bystander)).unwrap();
    assert!(raw_accepted(server.addr, bystander_config).await.unwrap());
}

/// Rotating a node's certificate (`trmx-certs renew`, then `revoke --serial <old>`): the
/// renewed certificate connects next to the old one, and revoking the old serial closes
/// only the connection that still uses it, not the participant's new one.
#[tokio::test]
async fn renewal_then_revoking_the_old_serial_closes_only_the_old_certificate() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(CrlPolicy::Warn), ListenerLimits::default()).await;

    let mut old = health(server.addr, &fx.paths(&node));
    let mut old_watch = old.watch(check_request()).await.unwrap().into_inner();
    old_watch.message().await.unwrap().unwrap();

    // the channel above keeps the old certificate and key; the files now hold the new ones
    let renewal = fx.fed.ca.renew(&node, 30).unwrap();
    assert_ne!(renewal.new.serial_hex, renewal.old.serial_hex);
    let mut new = health(server.addr, &fx.paths(&node));
    let mut new_watch = new.watch(check_request()).await.unwrap().into_inner();
    new_watch.message().await.unwrap().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 2)
        .await
    );

    fx.fed
        .ca
        .revoke_serial_hex(&renewal.old.serial_hex)
        .unwrap();
    let report = server.tls.reload().unwrap();
    assert_eq!(report.closed, ["participant NL-NRM from 127.0.0.1"]);
    let next = tokio::time::timeout(Duration::from_secs(5), old_watch.message())
        .await
        .expect("stream of the old certificate closed within 5 s");
    assert!(!matches!(next, Ok(Some(_))), "{next:?}");
    // the renewed certificate's stream and new connections carry on
    new.check(check_request()).await.unwrap();
    assert!(
        raw_accepted(server.addr, client_config(&fx.paths(&node)).unwrap())
            .await
            .unwrap()
    );
    assert_eq!(server.tls.reload().unwrap().closed_connections, 0);
    drop(new_watch);
    server.stop().await;
}

/// A long-running client (a node) keeps its channel across a renewal: when the broker
/// closes the connection of the old, now revoked, certificate, the same channel connects
/// again with the renewed files, without a restart.
#[tokio::test]
async fn a_channel_reconnects_with_the_renewed_certificate_after_the_old_is_revoked() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(CrlPolicy::Warn), ListenerLimits::default()).await;
    let mut client = health(server.addr, &fx.paths(&node));
    client.check(check_request()).await.unwrap();

    let renewal = fx.fed.ca.renew(&node, 30).unwrap();
    fx.fed
        .ca
        .revoke_serial_hex(&renewal.old.serial_hex)
        .unwrap();
    let report = server.tls.reload().unwrap();
    assert_eq!(report.closed, ["participant NL-NRM from 127.0.0.1"]);

    // the channel notices the closed connection and dials again (a first call may
    // still meet the closed one)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        match client.check(check_request()).await {
            Ok(_) => break,
            Err(status) => last = Some(status),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = client.check(check_request()).await;
    assert!(answer.is_ok(), "{answer:?}, before: {last:?}");
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 1)
        .await
    );
    server.stop().await;
}

/// A crl.pem restored from a backup used to be loaded like any other, and silently
/// un-revoked every certificate revoked since. A reload now refuses a CRL whose
/// `crlNumber` is below the one in force for the same CA, and keeps the one in force.
#[tokio::test]
async fn a_crl_older_than_the_one_in_force_is_refused_on_reload() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(CrlPolicy::Warn), ListenerLimits::default()).await;
    let backup = fx.dir.path().join("crl.pem.backup");
    std::fs::copy(fx.crl(), &backup).unwrap();
    // the second CRL: NL-NRM revoked
    fx.fed.revoke(&node).unwrap();
    let generation = server.tls.reload().unwrap().generation;
    let current = std::fs::read(fx.crl()).unwrap();
    let node_config = client_config(&fx.paths(&node)).unwrap();
    assert!(
        !raw_accepted(server.addr, node_config.clone())
            .await
            .unwrap()
    );

    // the first CRL comes back from the backup
    std::fs::copy(&backup, fx.crl()).unwrap();
    let err = server.tls.reload().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&fx.crl().display().to_string())
            && msg.contains("older than the one in force")
            && msg.contains("crlNumber"),
        "{msg}"
    );
    assert_eq!(err.files(), [trmx_transport::TlsFile::Crl]);
    assert!(
        !raw_accepted(server.addr, node_config).await.unwrap(),
        "the restored CRL un-revoked NL-NRM"
    );

    // the current CRL again (the same one: not older) reloads
    std::fs::write(fx.crl(), current).unwrap();
    assert_eq!(server.tls.reload().unwrap().generation, generation + 1);
}

/// A reload compares a CRL with the one in force, but a restarted server has none: a
/// crl.pem restored from a backup while it was down was loaded like any other. With a CRL
/// record, the load refuses a CRL older than the one recorded for its CA; the record is
/// written by `save_crl_record` and from then on by every reload, and never by a load
/// alone (what `check-config` runs).
#[test]
fn a_crl_older_than_the_recorded_one_is_refused_at_load() {
    let fx = Fixture::new();
    let record = fx.dir.path().join("crl-record.json");
    let load = || {
        ServerTls::load_with_record(
            &fx.paths(&fx.broker),
            Some(&fx.crl()),
            CrlPolicy::Warn,
            CrlRecord::read(&record)?,
        )
    };
    let backup = fx.dir.path().join("crl.pem.backup");
    std::fs::copy(fx.crl(), &backup).unwrap();

    let tls = load().unwrap();
    fx.fed
        .revoke(&fx.fed.participant("NL-NRM").unwrap())
        .unwrap();
    tls.reload().unwrap();
    assert!(
        !record.exists(),
        "a load and a reload without saving write nothing"
    );
    tls.save_crl_record().unwrap();
    let second = std::fs::read(fx.crl()).unwrap();
    // a reload records the third CRL
    fx.fed
        .revoke(&fx.fed.participant("BE-PAYOKE").unwrap())
        .unwrap();
    tls.reload().unwrap();
    let third = std::fs::read(fx.crl()).unwrap();
    drop(tls);

    // "restarted" with the second CRL, or the first
    for (older, comparison) in [
        (&second, "crlNumber 2 < crlNumber 3"),
        (
            &std::fs::read(&backup).unwrap(),
            "crlNumber 1 < crlNumber 3",
        ),
    ] {
        std::fs::write(fx.crl(), older).unwrap();
        let err = load().unwrap_err();
        assert!(
            matches!(err, TransportError::CrlOlderThanRecorded { .. }),
            "{err:?}"
        );
        assert_eq!(err.files(), [TlsFile::Crl]);
        let msg = err.to_string();
        for part in [
            comparison.to_owned(),
            fx.crl().display().to_string(),
            format!("delete {}", record.display()),
        ] {
            assert!(msg.contains(&part), "{part:?} in {msg}");
        }
        // (what the record adds: without it, the CRL loads)
        ServerTls::load(&fx.paths(&fx.broker), Some(&fx.crl()), CrlPolicy::Warn).unwrap();
    }
    std::fs::write(fx.crl(), &third).unwrap();
    load().expect("the recorded CRL itself");
}

/// A server loaded from `fx`'s files with the CRL record at `record`.
fn load_recorded(fx: &Fixture, record: &Path) -> Result<ServerTls, TransportError> {
    ServerTls::load_with_record(
        &fx.paths(&fx.broker),
        Some(&fx.crl()),
        CrlPolicy::Warn,
        CrlRecord::read(record)?,
    )
}

/// The `crl_number` of every CA in the CRL record at `record`, in its order.
fn recorded_numbers(record: &Path) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    json["crls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|crl| crl["crl_number"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts that `err` refuses `fx`'s CRL file for holding two CRLs of the federation CA,
/// and says how to fix it.
fn assert_two_of_one_ca(fx: &Fixture, err: &TransportError) {
    assert!(
        matches!(err, TransportError::CrlTwoOfOneCa { .. }),
        "{err:?}"
    );
    assert_eq!(err.files(), [TlsFile::Crl]);
    let msg = err.to_string();
    for part in [
        format!("CRL {}: ", fx.crl().display()),
        "two CRLs of CN=trm.test federation CA".to_owned(),
        "Keep only that CA's newest CRL".to_owned(),
        "trmx-certs crl".to_owned(),
    ] {
        assert!(msg.contains(&part), "{part:?} in {msg}");
    }
}

/// A CRL file with two CRLs of one CA (a new CRL appended with `cat new.pem >> crl.pem`):
/// webpki checks a certificate against the first CRL of its issuer only, so a newer CRL
/// behind an older one was silently not enforced while the reload succeeded and the CRL
/// record said it was in force; and the next start refused the very same file as "a copy
/// restored from a backup". Such a file is refused, at load and at reload, whichever
/// order, naming the CA and the file; a refused reload keeps the CRL in force.
#[tokio::test]
async fn a_crl_file_with_two_crls_of_one_ca_is_refused_at_load_and_reload() {
    let fx = Fixture::new();
    let record = fx.dir.path().join("crl-record.json");
    let node = fx.fed.participant("NL-NRM").unwrap();
    let first = std::fs::read(fx.crl()).unwrap();
    fx.fed.revoke(&node).unwrap();
    let second = std::fs::read(fx.crl()).unwrap();
    for file in [[&second[..], &first[..]], [&first[..], &second[..]]] {
        std::fs::write(fx.crl(), file.concat()).unwrap();
        assert_two_of_one_ca(&fx, &load_recorded(&fx, &record).unwrap_err());
    }

    // a server in force with the first CRL, and an operator who appends the second
    std::fs::write(fx.crl(), &first).unwrap();
    let tls = load_recorded(&fx, &record).unwrap();
    tls.save_crl_record().unwrap();
    let server = Server::start(tls, ListenerLimits::default()).await;
    std::fs::write(fx.crl(), [first.as_slice(), second.as_slice()].concat()).unwrap();
    assert_two_of_one_ca(&fx, &server.tls.reload().unwrap_err());
    assert_eq!(
        recorded_numbers(&record),
        ["1"],
        "the record says the refused CRL is in force"
    );

    // only the newest CRL in the file: taken (the first reload that succeeded), and
    // NL-NRM refused
    std::fs::write(fx.crl(), &second).unwrap();
    assert_eq!(server.tls.reload().unwrap().generation, 1);
    let node_config = client_config(&fx.paths(&node)).unwrap();
    assert!(!raw_accepted(server.addr, node_config).await.unwrap());
    assert_eq!(recorded_numbers(&record), ["2"]);
    server.stop().await;
}

/// A node checks the broker's certificate against its `tls.crl` as the broker checks the
/// node's: an appended CRL of the same CA would not be in force there either, so the node
/// refuses the file too (at start; a change while it runs is refused and the files read
/// before stay in force).
#[tokio::test]
async fn a_client_refuses_a_crl_file_with_two_crls_of_one_ca() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let first = std::fs::read(fx.crl()).unwrap();
    fx.fed
        .revoke(&fx.fed.participant("BE-PAYOKE").unwrap())
        .unwrap();
    let second = std::fs::read(fx.crl()).unwrap();
    std::fs::write(fx.crl(), [first.as_slice(), second.as_slice()].concat()).unwrap();
    let opts = trmx_transport::ClientOptions {
        server_name: "localhost".into(),
        crl: Some(fx.crl()),
        ..trmx_transport::ClientOptions::default()
    };
    let err = trmx_transport::client_channel("127.0.0.1:1", &fx.paths(&node), &opts)
        .map(drop)
        .unwrap_err();
    assert_two_of_one_ca(&fx, &err);
    // the newest alone is fine
    std::fs::write(fx.crl(), &second).unwrap();
    trmx_transport::client_channel("127.0.0.1:1", &fx.paths(&node), &opts).unwrap();
}

/// Copies every regular file of `from` into `to` (a backup of a CA directory, or its
/// restore).
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The CA's directory is restored from a backup taken before its last revocation, and the
/// CRL it then issues carries the crlNumber of the last one the server took, without that
/// revocation. An equal number counted as "not older", so the server took it, at a reload
/// and at a start, and the revoked certificate was accepted again. Another CRL under the
/// number in force (or recorded) is refused, saying the CA issued two CRLs numbered so.
#[tokio::test]
async fn a_different_crl_under_the_number_in_force_or_recorded_is_refused() {
    let fx = Fixture::new();
    let record = fx.dir.path().join("crl-record.json");
    let node = fx.fed.participant("NL-NRM").unwrap();
    let ca_dir = fx.fed.ca.dir().to_owned();
    let backup = fx.dir.path().join("ca-backup");
    copy_files(&ca_dir, &backup);

    let tls = load_recorded(&fx, &record).unwrap();
    tls.save_crl_record().unwrap();
    let server = Server::start(tls, ListenerLimits::default()).await;
    fx.fed.revoke(&node).unwrap(); // crlNumber 2: NL-NRM revoked
    server.tls.reload().unwrap();
    let node_config = client_config(&fx.paths(&node)).unwrap();
    assert!(
        !raw_accepted(server.addr, node_config.clone())
            .await
            .unwrap()
    );

    // the CA is restored from the backup, and its operator refreshes the CRL
    copy_files(&backup, &ca_dir);
    let restored = trmx_certs::Ca::open(&ca_dir).unwrap();
    restored.write_crl(Duration::from_secs(7 * 86_400)).unwrap();
    assert_eq!(restored.crl_path(), fx.crl());
    let err = server.tls.reload().unwrap_err();
    assert!(
        matches!(err, TransportError::CrlReissued { record: None, .. }),
        "{err:?}"
    );
    assert_eq!(err.files(), [TlsFile::Crl]);
    let msg = err.to_string();
    for part in [
        format!("CRL {}: ", fx.crl().display()),
        "issued two different CRLs with crlNumber 2".to_owned(),
        "the one in force stays".to_owned(),
        "install the newest CRL from the CA".to_owned(),
        "check the CA's own state".to_owned(),
    ] {
        assert!(msg.contains(&part), "{part:?} in {msg}");
    }
    assert!(
        !raw_accepted(server.addr, node_config).await.unwrap(),
        "the restored CA's CRL un-revoked NL-NRM"
    );
    server.stop().await;

    // and at the next start, against the record
    let err = load_recorded(&fx, &record).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::CrlReissued {
                record: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    for part in [
        "issued two different CRLs with crlNumber 2".to_owned(),
        format!("recorded in {}", record.display()),
    ] {
        assert!(msg.contains(&part), "{part:?} in {msg}");
    }
}

/// A start reads the CRL record before it owns the directory (the broker: before its
/// store's lock), and a server still stopping may record a newer CRL meanwhile. The save
/// wrote the record read at load over it, and the new server served the older CRL. The
/// save reads the record again: the CRL loaded is checked against it (the start refused,
/// with the load's error), and the newer record is kept.
#[test]
fn a_save_refuses_a_crl_older_than_the_record_written_since_the_load() {
    let fx = Fixture::new();
    let record = fx.dir.path().join("crl-record.json");
    let stopping = load_recorded(&fx, &record).unwrap();
    stopping.save_crl_record().unwrap();
    // the next server loads the first CRL while the previous one still runs...
    let starting = load_recorded(&fx, &record).unwrap();
    // ...which takes a second CRL (NL-NRM revoked) and records it before it stops
    fx.fed
        .revoke(&fx.fed.participant("NL-NRM").unwrap())
        .unwrap();
    stopping.reload().unwrap();
    drop(stopping);
    assert_eq!(recorded_numbers(&record), ["2"]);

    let err = starting.save_crl_record().unwrap_err();
    assert!(
        matches!(err, TransportError::CrlOlderThanRecorded { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("crlNumber 1 < crlNumber 2"),
        "{err}"
    );
    assert_eq!(recorded_numbers(&record), ["2"], "the record moved back");
    // with the second CRL, the next start takes it
    load_recorded(&fx, &record)
        .unwrap()
        .save_crl_record()
        .unwrap();
}

/// A reload that found a renewed server certificate not valid yet (beyond minutes) failed
/// as a whole, and a CRL installed beside it was not taken up either: the certificates it
/// revokes were let in at every reload until the renewal became valid. The CRL is in
/// force now, with the certificate in force presented still.
#[tokio::test]
async fn a_reload_takes_up_the_crl_beside_a_certificate_not_valid_yet() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let bystander = fx.fed.participant("BE-PAYOKE").unwrap();
    let server = Server::start(fx.server_tls(CrlPolicy::Warn), ListenerLimits::default()).await;
    let node_config = client_config(&fx.paths(&node)).unwrap();
    assert!(
        raw_accepted(server.addr, node_config.clone())
            .await
            .unwrap()
    );

    let spec = trmx_certs::IssueSpec::broker(
        "main",
        vec!["localhost".to_owned()],
        vec![std::net::IpAddr::from([127, 0, 0, 1])],
    );
    let at = SystemTime::now() + Duration::from_secs(2 * 3600);
    fx.fed.ca.issue_at(&spec, &fx.broker, true, at).unwrap();
    fx.fed.revoke(&node).unwrap();
    let report = server.tls.reload().unwrap();
    assert!(report.certificate_refused.is_some(), "{report:?}");

    assert!(!raw_accepted(server.addr, node_config).await.unwrap());
    // (a client with a right clock still accepts the certificate presented)
    let other = client_config(&fx.paths(&bystander)).unwrap();
    assert!(raw_accepted(server.addr, other).await.unwrap());
    server.stop().await;
}
