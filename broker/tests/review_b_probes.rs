//! Review probes (branch review-b). Tests marked FAILS fail on the reviewed code and
//! show a defect.

use crate::harness::*;

/// FAILS. An operator appends the CA's new CRL to tls.crl instead of replacing the file
/// (`cat crl.pem >> /etc/trmx/crl.pem`). The reload (SIGHUP) succeeds and records the
/// new CRL in the data directory's CRL record. The broker then runs for weeks; at the next
/// restart (a reboot), the very file it ran with is refused as "older than the newest one
/// accepted before ... a copy restored from a backup?": the old CRL still at the top of
/// the file is compared with the record. The broker stays down. The file should have been
/// refused at the reload already (webpki enforces only the first CRL of an issuer, so the
/// new revocations were not even in force; see the transport probe), or accepted again.
#[tokio::test]
async fn a_crl_file_a_reload_accepted_is_not_refused_at_the_next_start() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let crl = t.config.tls.crl.clone().expect("the harness sets tls.crl");
    let before = std::fs::read(&crl)?;
    let be = trmx_certs::CertPaths::for_cert(&t.pki.participant("BE-PAYOKE")?.cert);
    t.pki.federation.revoke(&be)?;
    let new = std::fs::read(&crl)?;
    std::fs::write(&crl, [before.as_slice(), new.as_slice()].concat())?;
    t.broker.reload_tls()?;
    let checked = trmx_broker::check_config(&t.config);
    let restarted = t.restart().await;
    assert!(
        checked.is_ok() && restarted.is_ok(),
        "a tls.crl that the running broker accepted stops the next start: check-config: \
         {checked:?}; start: {restarted:?}"
    );
    Ok(())
}

/// The crlNumber recorded for the (one) CA in the CRL record at `path`.
fn recorded_number(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    Ok(json["crls"][0]["crl_number"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// FAILS (timing-dependent: the old broker must let go of the store within the new one's
/// one-second lock wait; when it does not, the test says so and proves nothing). A start
/// reads the CRL record and tls.crl, and checks one against the other, before it holds
/// the data directory (`load_tls` runs before `open_store`). A broker started while the
/// previous one is still stopping (a supervisor that overlaps restarts, a second start by
/// mistake) reads both, waits for the lock; meanwhile the old one reloads a newer CRL
/// (crlNumber 2, BE-PAYOKE revoked), records it, and stops. The new broker gets the lock
/// and serves with CRL 1 in force, older than the record it now owns: BE-PAYOKE is let in
/// until the next interval reload (`tls.crl_reload_interval`, 5 min by default). (Had its
/// own take changed anything, e.g. a CA new in its tls.crl, it would also have written
/// its stale in-memory record over the newer file.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_overlapping_the_previous_run_does_not_move_the_record_back()
-> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let record = t.config.data_dir.join(trmx_broker::CRL_RECORD_FILE);
    assert_eq!(recorded_number(&record)?, "1");
    let (config, clock) = (t.config.clone(), t.clock.clone());
    let second = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        trmx_broker::Broker::builder(config)
            .clock(clock)
            .start(listener)
            .await
            .map_err(anyhow::Error::from)
    });
    // the second start has read the record and tls.crl, and waits for the store's lock
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let be = trmx_certs::CertPaths::for_cert(&t.pki.participant("BE-PAYOKE")?.cert);
    t.pki.federation.revoke(&be)?;
    t.broker.reload_tls()?;
    assert_eq!(recorded_number(&record)?, "2", "the reload records CRL 2");
    t.broker.shutdown().await?;
    let mut second = match second.await? {
        Ok(broker) => broker,
        Err(error) => {
            eprintln!("inconclusive: the second start did not get the lock in time: {error:#}");
            return Ok(());
        }
    };
    let now = recorded_number(&record)?;
    let mut be = client(second.local_addr(), &t.pki.participant("BE-PAYOKE")?)?;
    let answer = be.get_info(trmx_proto::pb::GetInfoRequest {}).await;
    second.shutdown().await?;
    assert_eq!(now, "2", "the record moved back");
    assert!(
        answer.is_err(),
        "the record says crlNumber {now}, but the new broker serves CRL 1: the revoked \
         BE-PAYOKE was let in"
    );
    Ok(())
}
