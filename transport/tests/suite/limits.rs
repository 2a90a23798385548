//! Handshake timeout, concurrency of handshakes, connection cap.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use trmx_transport::{ListenerLimits, client_config};

use super::harness::{Fixture, Server, check_request, eventually, health, raw_accepted};

#[tokio::test]
async fn silent_client_does_not_block_other_handshakes() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let limits = ListenerLimits {
        handshake_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    // connects and never sends a ClientHello
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    let config = client_config(&fx.paths(&node)).unwrap();
    let accepted = tokio::time::timeout(Duration::from_secs(5), raw_accepted(server.addr, config))
        .await
        .expect("a good handshake completes while another is pending");
    assert!(accepted.unwrap());
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let fx = Fixture::new();
    let limits = ListenerLimits {
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
        .await
        .expect("server closes a silent connection after the handshake timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(server.tls.open_connections(), 0);
}

#[tokio::test]
async fn connections_over_the_cap_are_closed() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let limits = ListenerLimits {
        max_connections: 1,
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    let mut client = health(server.addr, &fx.paths(&node));
    client.check(check_request()).await.unwrap();
    assert_eq!(server.tls.open_connections(), 1);
    let config = client_config(&fx.paths(&node)).unwrap();
    assert!(!raw_accepted(server.addr, config.clone()).await.unwrap());
    // the slot comes back once the first connection is gone
    drop(client);
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 0)
        .await
    );
    assert!(raw_accepted(server.addr, config).await.unwrap());
}
