//! A good client completes calls and the server sees who it is.

use tonic_health::pb::health_check_response::ServingStatus;
use trmx_certs::Role;
use trmx_transport::{ListenerLimits, TransportError, client_config};

use super::harness::{Fixture, Server, TRUST_DOMAIN, check_request, health, raw_accepted};

#[tokio::test]
async fn participant_call_carries_its_identity() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let server = Server::start(fx.server_tls(Default::default()), ListenerLimits::default()).await;

    let mut client = health(server.addr, &fx.paths(&node));
    let reply = client.check(check_request()).await.unwrap().into_inner();
    assert_eq!(reply.status(), ServingStatus::Serving);
    // a second call reuses the connection
    client.check(check_request()).await.unwrap();

    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].trust_domain, TRUST_DOMAIN);
    assert_eq!(seen[0].role, Role::Participant("NL-NRM".to_owned()));
    assert_eq!(seen[0].participant(), Some("NL-NRM"));
    assert_eq!(server.tls.open_connections(), 1);
    server.stop().await;
}

#[tokio::test]
async fn operator_identity_is_seen_as_operator() {
    let fx = Fixture::new();
    let op = fx.fed.operator("alice").unwrap();
    let server = Server::start(fx.server_tls(Default::default()), ListenerLimits::default()).await;
    health(server.addr, &fx.paths(&op))
        .check(check_request())
        .await
        .unwrap();
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen[0].role, Role::Operator("alice".to_owned()));
    assert_eq!(seen[0].participant(), None);
}

#[tokio::test]
async fn raw_client_with_good_certificate_is_accepted() {
    let fx = Fixture::new();
    let node = fx.fed.participant("BE-PAYOKE").unwrap();
    let server = Server::start(fx.server_tls(Default::default()), ListenerLimits::default()).await;
    let config = client_config(&fx.paths(&node)).unwrap();
    assert!(raw_accepted(server.addr, config).await.unwrap());
}

#[test]
fn request_without_tls_is_unauthenticated() {
    let status = trmx_transport::peer_identity(&tonic::Request::new(())).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

#[test]
fn load_errors_name_the_file() {
    let fx = Fixture::new();
    let mut paths = fx.paths(&fx.broker);
    paths.key = fx.dir.path().join("missing.key");
    let err = trmx_transport::ServerTls::load(&paths, None, Default::default()).unwrap_err();
    assert!(matches!(err, TransportError::Read { .. }), "{err}");
    assert!(err.to_string().contains("missing.key"), "{err}");

    // a certificate file in place of a key
    paths.key = fx.broker.cert.clone();
    let err = client_config(&paths).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");

    let garbage = fx.dir.path().join("garbage.crl");
    std::fs::write(&garbage, "not a crl").unwrap();
    let err =
        trmx_transport::ServerTls::load(&fx.paths(&fx.broker), Some(&garbage), Default::default())
            .unwrap_err();
    assert!(err.to_string().contains("garbage.crl"), "{err}");
}

#[test]
fn bad_addresses_are_refused() {
    let fx = Fixture::new();
    let paths = fx.paths(&fx.broker);
    let opts = trmx_transport::ClientOptions::default();
    for addr in ["localhost", ":1", "localhost:x"] {
        let err = trmx_transport::client_channel(addr, &paths, &opts).unwrap_err();
        assert!(
            matches!(err, TransportError::Address { .. }),
            "{addr}: {err}"
        );
    }
}
