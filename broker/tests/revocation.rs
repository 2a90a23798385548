//! A certificate that connects is refused after it is revoked and the CRL is
//! reloaded, and its open `Receive` stream is closed.

use anyhow::Context as _;
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn a_revoked_certificate_is_refused_and_its_stream_closed() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut nl = t.client("NL-NRM")?;
    let mut stream = receive(&mut be, 0).await?;
    submit(&mut nl, referral("BE-PAYOKE")).await?;
    next(&mut stream).await?;

    let be_cert = trmx_certs::CertPaths::for_cert(&t.pki.participant("BE-PAYOKE")?.cert);
    t.pki.federation.revoke(&be_cert)?;
    let report = t.broker.reload_tls()?;
    assert!(report.closed_connections >= 1, "{report:?}");
    // the report (and its log line) names whose connections were closed
    assert_eq!(report.closed.len(), report.closed_connections, "{report:?}");
    assert!(
        report
            .closed
            .iter()
            .all(|c| c == "participant BE-PAYOKE from 127.0.0.1"),
        "{report:?}"
    );

    // The open stream ends.
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(None)) | Ok(Err(_)) => {}
        other => anyhow::bail!("revoked stream still open: {other:?}"),
    }
    // New calls with the revoked certificate fail (the handshake is refused).
    let mut fresh = t.client("BE-PAYOKE")?;
    let refused = fresh.get_info(trmx_proto::pb::GetInfoRequest {}).await;
    let status = refused.expect_err("revoked certificate accepted");
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ),
        "{status}"
    );
    // Others are unaffected.
    nl.get_info(trmx_proto::pb::GetInfoRequest {}).await?;
    Ok(())
}

/// Why a broker on `t`'s config does not start (tried once, without the harness's
/// retries); fails the test if it starts.
async fn refused_start(t: &TestBroker, what: &str) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let started = trmx_broker::Broker::builder(t.config.clone())
        .clock(t.clock.clone())
        .start(listener)
        .await;
    match started {
        Ok(mut broker) => {
            broker.shutdown().await?;
            anyhow::bail!("{what}: the broker started")
        }
        Err(error) => Ok(error.to_string()),
    }
}

/// The `crlNumber` of the (one) CRL in the file at `path`.
fn crl_number(path: &std::path::Path) -> anyhow::Result<String> {
    let crls = trmx_certs::load_crls_pem(path)?;
    let der = crls.first().context("no CRL")?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())?;
    Ok(crl.crl_number().context("no crlNumber")?.to_string())
}

/// Revokes the certificate of participant `id` (issued on first use): a new CRL.
fn revoke(t: &TestBroker, id: &str) -> anyhow::Result<()> {
    let cert = trmx_certs::CertPaths::for_cert(&t.pki.participant(id)?.cert);
    Ok(t.pki.federation.revoke(&cert)?)
}

/// A reload refused a CRL older than the one in force, but after a restart there was
/// nothing to compare with: a crl.pem restored from a backup was taken at start, and
/// un-revoked every certificate revoked since. The broker now records the newest CRL of
/// each CA in its data directory (at start and at every reload) and refuses an older one
/// at start too; the same CRL, or a newer one, starts.
#[tokio::test]
async fn a_crl_older_than_the_recorded_one_is_refused_at_start() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let crl = t.pki.federation.crl_path();
    let record = t.config.data_dir.join(trmx_broker::CRL_RECORD_FILE);
    assert!(record.exists(), "the first start writes the record");
    let backup = t._dir.path().join("crl.pem.backup");
    std::fs::copy(&crl, &backup)?;
    // BE-PAYOKE is revoked, and the reload records the new CRL
    revoke(&t, "BE-PAYOKE")?;
    t.broker.reload_tls()?;
    let (old, new) = (crl_number(&backup)?, crl_number(&crl)?);
    let current = std::fs::read(&crl)?;
    t.broker.shutdown().await?;

    // the CRL from before the revocation comes back from the backup
    std::fs::copy(&backup, &crl)?;
    let refused = refused_start(&t, "an older CRL").await?;
    for part in [
        format!("crlNumber {old} < crlNumber {new}"),
        format!("recorded in {}", record.display()),
        crl.display().to_string(),
        format!("delete {}", record.display()),
        "tls.crl".to_owned(),
    ] {
        assert!(refused.contains(&part), "{part:?} in {refused}");
    }
    let checked = trmx_broker::check_config(&t.config).expect_err("an older CRL");
    assert_eq!(
        checked.to_string(),
        refused,
        "check-config says what the start says"
    );
    // a compaction of the store keeps the record
    trmx_broker::store::compact_offline(&t.config.data_dir, None)?;
    let after_compaction = refused_start(&t, "an older CRL after a compaction").await?;
    assert_eq!(after_compaction, refused);

    // the same CRL as before starts, and BE-PAYOKE is still refused
    std::fs::write(&crl, &current)?;
    t.restart().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let answer = be.get_info(trmx_proto::pb::GetInfoRequest {}).await;
    assert!(answer.is_err(), "{answer:?}");
    // a newer one too, and the start records it
    revoke(&t, "INT-IOM")?;
    let newest = crl_number(&crl)?;
    t.restart().await?;
    t.broker.shutdown().await?;
    std::fs::write(&crl, &current)?;
    let refused = refused_start(&t, "an older CRL").await?;
    assert!(
        refused.contains(&format!("crlNumber {new} < crlNumber {newest}")),
        "{refused}"
    );

    // going back on purpose: without its record the broker takes the CRL it is given
    std::fs::remove_file(&record)?;
    t.restart().await?;
    assert!(record.exists(), "a new record");
    Ok(())
}

/// A record that does not parse must not count as no record (which would accept any CRL):
/// the start stops and names it. Deleted, the broker starts afresh.
#[tokio::test]
async fn a_damaged_crl_record_stops_the_start_naming_it() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    t.broker.shutdown().await?;
    let record = t.config.data_dir.join(trmx_broker::CRL_RECORD_FILE);
    let text = std::fs::read_to_string(&record)?;
    // cut short, as a disk that filled up might leave it
    std::fs::write(&record, &text[..text.len() / 2])?;
    let refused = refused_start(&t, "a damaged record").await?;
    for part in [
        format!("CRL record {} is damaged", record.display()),
        "delete it".to_owned(),
    ] {
        assert!(refused.contains(&part), "{part:?} in {refused}");
    }
    let checked = trmx_broker::check_config(&t.config).expect_err("a damaged record");
    assert_eq!(checked.to_string(), refused);

    std::fs::remove_file(&record)?;
    t.restart().await?;
    assert_eq!(
        std::fs::read_to_string(&record)?,
        text,
        "the same record again"
    );
    Ok(())
}
