//! Handshake timeout, concurrency of handshakes, the handshake budget (global, per
//! address, eviction), connection cap.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use trmx_transport::{ListenerLimits, client_config};

use super::harness::{
    Fixture, Server, check_request, closed_within, connect_from, eventually, health, raw_accepted,
    raw_accepted_from,
};

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

const HOST_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const HOST_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// `n` TCP connections from `source` that never send a ClientHello.
async fn silent(source: IpAddr, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(connect_from(source, addr).await.unwrap());
    }
    sockets
}

#[tokio::test]
async fn silent_sockets_do_not_take_connection_slots() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let limits = ListenerLimits {
        max_connections: 4,
        handshake_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    let mut sockets = silent(HOST_A, server.addr, limits.max_connections).await;
    // a node connecting after them gets in (before, they held every slot)
    let mut client = health(server.addr, &fx.paths(&node));
    client.check(check_request()).await.unwrap();
    assert_eq!(server.tls.open_connections(), 1);
    for socket in &mut sockets {
        assert!(!closed_within(socket, Duration::from_millis(100)).await);
    }
}

#[tokio::test]
async fn one_address_at_its_handshake_cap_does_not_block_another() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let limits = ListenerLimits {
        max_handshakes: 4,
        max_handshakes_per_ip: 2,
        handshake_timeout: Duration::from_secs(30),
        handshake_eviction_age: Duration::from_secs(60),
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    let mut sockets = silent(HOST_A, server.addr, 4).await;
    // the two beyond the address's cap are closed at once, the first two wait
    for socket in &mut sockets[2..] {
        assert!(closed_within(socket, Duration::from_secs(5)).await);
    }
    for socket in &mut sockets[..2] {
        assert!(!closed_within(socket, Duration::from_millis(100)).await);
    }
    let config = client_config(&fx.paths(&node)).unwrap();
    assert!(
        !raw_accepted_from(HOST_A, server.addr, config.clone())
            .await
            .unwrap()
    );
    assert!(
        raw_accepted_from(HOST_B, server.addr, config)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_full_handshake_budget_refuses_new_sockets_while_the_pending_are_young() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let limits = ListenerLimits {
        max_handshakes: 2,
        handshake_timeout: Duration::from_secs(30),
        handshake_eviction_age: Duration::from_secs(60),
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    let mut sockets = silent(HOST_A, server.addr, 2).await;
    let config = client_config(&fx.paths(&node)).unwrap();
    assert!(
        !raw_accepted_from(HOST_B, server.addr, config)
            .await
            .unwrap()
    );
    for socket in &mut sockets {
        assert!(!closed_within(socket, Duration::from_millis(100)).await);
    }
}

#[tokio::test]
async fn a_full_handshake_budget_closes_the_oldest_pending_handshake_for_a_new_one() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let limits = ListenerLimits {
        max_handshakes: 2,
        handshake_timeout: Duration::from_secs(30),
        handshake_eviction_age: Duration::ZERO,
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    let mut sockets = silent(HOST_A, server.addr, 2).await;
    let config = client_config(&fx.paths(&node)).unwrap();
    assert!(
        raw_accepted_from(HOST_B, server.addr, config)
            .await
            .unwrap()
    );
    assert!(closed_within(&mut sockets[0], Duration::from_secs(5)).await);
    assert!(!closed_within(&mut sockets[1], Duration::from_millis(100)).await);
}

#[tokio::test]
async fn an_identity_at_its_connection_cap_is_refused_while_others_get_in() {
    let fx = Fixture::new();
    let nl = fx.fed.participant("NL-NRM").unwrap();
    let be = fx.fed.participant("BE-PAYOKE").unwrap();
    let limits = ListenerLimits {
        max_connections: 4,
        max_connections_per_identity: 2,
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    let mut first = health(server.addr, &fx.paths(&nl));
    first.check(check_request()).await.unwrap();
    let mut second = health(server.addr, &fx.paths(&nl));
    second.check(check_request()).await.unwrap();
    let nl_config = client_config(&fx.paths(&nl)).unwrap();
    assert!(
        !raw_accepted(server.addr, nl_config.clone()).await.unwrap(),
        "a third connection of NL-NRM, with slots free"
    );
    let be_config = client_config(&fx.paths(&be)).unwrap();
    assert!(raw_accepted(server.addr, be_config).await.unwrap());
    // its place comes back once one of its connections is gone
    drop(first);
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 1)
        .await
    );
    assert!(raw_accepted(server.addr, nl_config).await.unwrap());
}

#[tokio::test]
async fn a_connection_that_sends_no_http2_preface_is_closed_after_the_handshake_timeout() {
    let fx = Fixture::new();
    let node = fx.fed.participant("NL-NRM").unwrap();
    let limits = ListenerLimits {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let server = Server::start(fx.server_tls(Default::default()), limits).await;
    let config = client_config(&fx.paths(&node)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 1)
        .await
    );
    // authenticated, then silent: the server's settings come, then the close
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a silent authenticated connection stays open"
    );
    assert!(
        eventually(Duration::from_secs(5), || server.tls.open_connections()
            == 0)
        .await
    );
}
