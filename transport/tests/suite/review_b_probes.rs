//! Review probes (branch review-b) for the CRL record: each test asserts what an operator
//! relies on; the ones marked FAILS fail on the reviewed code and show a defect.

use std::path::{Path, PathBuf};

use trmx_certs::Ca;
use trmx_transport::{CrlPolicy, CrlRecord, ListenerLimits, ServerTls, client_config};

use super::harness::{Fixture, Server, raw_accepted};

fn load(fx: &Fixture, record: &Path) -> Result<ServerTls, trmx_transport::TransportError> {
    ServerTls::load_with_record(
        &fx.paths(&fx.broker),
        Some(&fx.crl()),
        CrlPolicy::Warn,
        CrlRecord::read(record)?,
    )
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
    assert!(
        !raw_accepted(server.addr, node_config.clone())
            .await
            .unwrap()
    );

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
