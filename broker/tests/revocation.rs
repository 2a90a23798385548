//! A certificate that connects is refused after it is revoked and the CRL is
//! reloaded, and its open `Receive` stream is closed.

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
