//! A fault-injecting TCP proxy for tests: sits between nodes and the broker
//! and can cut every connection, stall traffic, or delay it.
//!
//! The proxy forwards raw bytes (the TLS session runs end to end through it),
//! so it exercises exactly what a real network fault does to a client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything at once.
    None,
    /// Hold every byte (connections stay open, nothing moves) until the fault changes.
    Stall,
    /// Delay each forwarded chunk by this long.
    Delay(Duration),
    /// Refuse new connections and close existing ones.
    Down,
}

/// A running proxy. Dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Bumped by [`FaultProxy::cut`]: connections opened before the bump close.
    generation: Arc<watch::Sender<u64>>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1:0 that forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (fault, fault_rx) = watch::channel(Fault::None);
        let generation = Arc::new(watch::channel(0u64).0);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            fault_rx,
            Arc::clone(&generation),
            Arc::clone(&accepted),
        ));
        Ok(Self {
            addr,
            fault,
            generation,
            accepted,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the fault applied from now on (to open and new connections).
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
        if fault == Fault::Down {
            self.cut();
        }
    }

    /// Closes every open connection (clients see a reset mid-stream); new
    /// connections are accepted unless the fault is [`Fault::Down`].
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// How many connections the proxy has accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    fault: watch::Receiver<Fault>,
    generation: Arc<watch::Sender<u64>>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *fault.borrow() == Fault::Down {
            drop(client);
            continue;
        }
        accepted.fetch_add(1, Ordering::Relaxed);
        let fault = fault.clone();
        let generation = generation.subscribe();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(client_read, server_write, fault.clone());
            let down = pump(server_read, client_write, fault);
            let mut generation = generation;
            let start = *generation.borrow_and_update();
            tokio::select! {
                _ = async { tokio::join!(up, down) } => {}
                _ = async {
                    while generation.changed().await.is_ok() {
                        if *generation.borrow() != start {
                            break;
                        }
                    }
                } => {}
            }
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        loop {
            let current = *fault.borrow_and_update();
            match current {
                Fault::None => break,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Stall => {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
                Fault::Down => return,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
