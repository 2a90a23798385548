//! Handshakes that must fail.

use std::sync::Arc;

use std::time::Duration;
use trmx_certs::Federation;

use trmx_transport::{HandshakeFailure, ListenerLimits, TlsPaths, client_config};

use super::harness::{
    Fixture, Server, assert_refused, check_request, eventually, failures, health, raw_accepted,
};

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(fx: &Fixture) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fx.fed.ca.ca_cert_der().clone()).unwrap();
    roots
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let fx = Fixture::new();
    let server = Server::start(fx.server_tls(Default::default()), ListenerLimits::default()).await;
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&fx))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    assert!(!raw_accepted(server.addr, config).await.unwrap());
    assert_eq!(server.tls.open_connections(), 0);
    assert!(
        eventually(Duration::from_secs(5), || failures(
            &server.tls,
            HandshakeFailure::NoCertificate
        ) == 1)
        .await
    );
    assert_eq!(failures(&server.tls, HandshakeFailure::BadCertificate), 0);
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let fx = Fixture::new();
    let other_dir = tempfile::tempdir().unwrap();
    let other = Federation::create(other_dir.path(), "trm.test").unwrap();
    let stranger = other.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(Default::default()), ListenerLimits::default()).await;
    // trusts our CA for the server, presents a certificate of the other CA
    let paths = TlsPaths {
        ca: fx.fed.ca_cert_path(),
        cert: stranger.cert.clone(),
        key: stranger.key.clone(),
    };
    assert!(
        !raw_accepted(server.addr, client_config(&paths).unwrap())
            .await
            .unwrap()
    );
    let err = health(server.addr, &paths)
        .check(check_request())
        .await
        .unwrap_err();
    assert_refused(&err);
    assert!(!trmx_transport::server_name_mismatch(&err), "{err:?}");
    assert!(server.seen.lock().unwrap().is_empty());
    // counted by reason: the raw client and the channel (which may retry)
    assert!(
        eventually(Duration::from_secs(5), || failures(
            &server.tls,
            HandshakeFailure::UnknownCa
        ) >= 2)
        .await
    );
    assert_eq!(failures(&server.tls, HandshakeFailure::BadCertificate), 0);
}

#[tokio::test]
async fn certificate_of_a_ca_of_another_name_is_counted_as_unknown_ca() {
    let fx = Fixture::new();
    let other_dir = tempfile::tempdir().unwrap();
    let other = Federation::create(other_dir.path(), "trm.other").unwrap();
    let stranger = other.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(Default::default()), ListenerLimits::default()).await;
    let paths = TlsPaths {
        ca: fx.fed.ca_cert_path(),
        cert: stranger.cert.clone(),
        key: stranger.key.clone(),
    };
    assert!(
        !raw_accepted(server.addr, client_config(&paths).unwrap())
            .await
            .unwrap()
    );
    assert!(
        eventually(Duration::from_secs(5), || failures(
            &server.tls,
            HandshakeFailure::UnknownCa
        ) == 1)
        .await
    );
}

#[tokio::test]
async fn tls12_client_is_refused() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(Default::default()), ListenerLimits::default()).await;
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_file(&node.cert).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&node.key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots(&fx))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    assert!(!raw_accepted(server.addr, config).await.unwrap());
}

#[tokio::test]
async fn client_refuses_server_with_wrong_name() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(Default::default()), ListenerLimits::default()).await;
    let opts = trmx_transport::ClientOptions {
        server_name: "broker.elsewhere.example".to_owned(),
        ..Default::default()
    };
    let channel =
        trmx_transport::client_channel(&server.addr.to_string(), &fx.paths(&node), &opts).unwrap();
    let err = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(check_request())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(trmx_transport::server_name_mismatch(&err), "{err:?}");
    // the server counts the client's refusal apart from refusals of client certificates
    assert!(
        eventually(Duration::from_secs(5), || failures(
            &server.tls,
            HandshakeFailure::ClientRefused
        ) >= 1)
        .await
    );
    assert_eq!(failures(&server.tls, HandshakeFailure::BadCertificate), 0);
}

use rustls::pki_types::pem::PemObject as _;
