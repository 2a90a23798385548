//! TLS material the broker refuses at start (and `check-config` with it), naming the
//! file: what would otherwise start and report ready, then refuse every client.

use tokio::net::TcpListener;
use trmx_broker::{Broker, BrokerConfig, BrokerError};
use trmx_certs::Federation;

use crate::harness::*;

async fn start(config: &BrokerConfig) -> Result<trmx_broker::RunningBroker, BrokerError> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    Broker::builder(config.clone()).start(listener).await
}

#[tokio::test]
async fn broken_tls_material_is_refused_at_start_naming_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let other = Federation::create(&dir.path().join("other"), "trm.other")?;
    let stranger = other.broker("test-1")?;
    let node = pki.federation.participant("NL-NRM")?;
    let good = test_config(dir.path().join("data"), pki.tls.clone());

    let mut foreign_cert = good.clone();
    foreign_cert.tls.cert = stranger.cert.clone();
    foreign_cert.tls.key = stranger.key.clone();
    let mut node_cert = good.clone();
    node_cert.tls.cert = node.cert.clone();
    node_cert.tls.key = node.key.clone();
    let mut foreign_crl = good.clone();
    foreign_crl.tls.crl = Some(other.crl_path());

    for (what, config, file, problem) in [
        (
            "a certificate of another CA",
            &foreign_cert,
            &stranger.cert,
            "not issued by the CA",
        ),
        (
            "a node certificate",
            &node_cert,
            &node.cert,
            "not a server certificate",
        ),
        (
            "another CA's CRL",
            &foreign_crl,
            &other.crl_path(),
            "not issued by the CA",
        ),
    ] {
        let error = start(config).await.expect_err(what).to_string();
        assert!(error.contains(&*file.to_string_lossy()), "{what}: {error}");
        assert!(error.contains(problem), "{what}: {error}");
        let checked = trmx_broker::check_config(config)
            .expect_err(what)
            .to_string();
        assert_eq!(checked, error, "check-config says what the start says");
    }
    // nothing was created for the refused starts
    assert!(!good.data_dir.exists());
    let mut broker = start(&good).await?;
    broker.shutdown().await?;
    Ok(())
}
