//! Review probes (branch review-b) for the CRL record: each test asserts what an operator
//! relies on; the ones marked FAILS fail on the reviewed code and show a defect.

use std::path::{Path, PathBuf};

use trmx_certs::Ca;
use trmx_transport::{CrlPolicy, CrlRecord, ListenerLimits, ServerTls, client_config};

use super::harness::{Fixture, Server, raw_accepted};

/// `out` as the concatenation of `parts` (`cat a.pem b.pem > out`).
fn cat(out: &Path, parts: &[&[u8]]) {
    std::fs::write(out, parts.concat()).unwrap();
}

fn load(fx: &Fixture, record: &Path) -> Result<ServerTls, trmx_transport::TransportError> {
    ServerTls::load_with_record(
        &fx.paths(&fx.broker),
        Some(&fx.crl()),
        CrlPolicy::Warn,
        CrlRecord::read(record)?,
    )
}

/// FAILS. A tls.crl that holds two CRLs of one CA (the current one, and a stale copy
/// appended after it: `cat crl.pem >> crl-bundle.pem` done twice over a week) starts the
/// broker, and the start records the newer of the two. The next start, with the very same
/// file, is refused as "older than the newest one accepted before ... a copy restored from
/// a backup?": the stale copy is compared with the record. A file that started the
/// broker once must start it again (or be refused the first time too, saying why).
#[test]
fn a_crl_file_that_started_the_broker_starts_it_again() {
    let fx = Fixture::new();
    let record = fx.dir.path().join("crl-record.json");
    let first = std::fs::read(fx.crl()).unwrap();
    fx.fed
        .revoke(&fx.fed.participant("NL-NRM").unwrap())
        .unwrap();
    let second = std::fs::read(fx.crl()).unwrap();
    // the current CRL first, a stale copy of the same CA's after it
    cat(&fx.crl(), &[&second, &first]);

    let first_start = load(&fx, &record).and_then(|tls| tls.save_crl_record());
    assert!(first_start.is_ok(), "{first_start:?}");
    let second_start = load(&fx, &record).map(drop);
    assert!(
        second_start.is_ok(),
        "the same tls.crl started the server, then was refused: {}",
        second_start.unwrap_err()
    );
}

/// FAILS. The same file with the stale copy *first*: webpki checks a certificate against
/// the first CRL that names its issuer, so NL-NRM (revoked in the second, newer CRL) is
/// accepted, while the reload reported success and the CRL record says the newer CRL is in
/// force. The revocation is silently not applied. (Two CRLs of one CA in tls.crl should be
/// refused outright, at load and reload, naming the CA.)
#[tokio::test]
async fn a_newer_crl_behind_an_older_one_of_the_same_ca_is_not_silently_ignored() {
    let fx = Fixture::new();
    let record = fx.dir.path().join("crl-record.json");
    let node = fx.fed.participant("NL-NRM").unwrap();
    let tls = load(&fx, &record).unwrap();
    tls.save_crl_record().unwrap();
    let server = Server::start(tls, ListenerLimits::default()).await;
    let first = std::fs::read(fx.crl()).unwrap();
    fx.fed.revoke(&node).unwrap();
    let second = std::fs::read(fx.crl()).unwrap();
    // an operator appends the new CRL to the file instead of replacing it
    cat(&fx.crl(), &[&first, &second]);
    let reloaded = server.tls.reload();
    let accepted = raw_accepted(server.addr, client_config(&fx.paths(&node)).unwrap())
        .await
        .unwrap();
    server.stop().await;
    assert!(
        reloaded.is_err() || !accepted,
        "the reload succeeded (recording crlNumber 2) and the certificate revoked in \
         crlNumber 2 still completes the handshake"
    );
}

/// Copies every regular file of `from` into `to` (a backup of a CA directory).
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// FAILS. The CA's directory is restored from last night's backup (taken just before the
/// last revocation). `trmx-certs crl` on the restored CA issues a CRL with the same
/// crlNumber as the last one the broker accepted, but without that revocation. The
/// broker takes it (equal numbers count as "not older"), at a reload and at a start, and
/// the revoked certificate is accepted again: a silent un-revoke the record was meant to
/// stop. Two different CRLs of one CA under one crlNumber should be refused.
#[tokio::test]
async fn a_different_crl_under_the_recorded_crl_number_is_refused() {
    let fx = Fixture::new();
    let record = fx.dir.path().join("crl-record.json");
    let node = fx.fed.participant("NL-NRM").unwrap();
    let ca_dir: PathBuf = fx.fed.ca.dir().to_owned();
    let backup = fx.dir.path().join("ca-backup");
    copy_files(&ca_dir, &backup);

    let tls = load(&fx, &record).unwrap();
    tls.save_crl_record().unwrap();
    let server = Server::start(tls, ListenerLimits::default()).await;
    fx.fed.revoke(&node).unwrap(); // crlNumber 2: NL-NRM revoked
    server.tls.reload().unwrap();
    let node_config = client_config(&fx.paths(&node)).unwrap();
    assert!(!raw_accepted(server.addr, node_config.clone()).await.unwrap());

    // the CA machine is restored from the backup, and its operator refreshes the CRL
    copy_files(&backup, &ca_dir);
    let restored = Ca::open(&ca_dir).unwrap();
    restored
        .write_crl(std::time::Duration::from_secs(7 * 86_400))
        .unwrap(); // crlNumber 2 again, NL-NRM not in it (written to fx.crl())
    assert_eq!(restored.crl_path(), fx.crl());

    let reloaded = server.tls.reload();
    let accepted = raw_accepted(server.addr, node_config).await.unwrap();
    server.stop().await;
    assert!(
        reloaded.is_err() && !accepted,
        "reload: {:?}; the revoked certificate accepted again: {accepted}",
        reloaded.map(|r| r.generation)
    );
}
