//! The local API's caps beyond those of one connection (streams, request
//! size): connections open at once, and `Watch` streams open at once.
//!
//! Whoever can open the socket is trusted (mode 0600), but an integration
//! with a bug can still leak connections or `Watch` streams until the node
//! runs out of file descriptors or memory, and with them its broker link and
//! its store. [`incoming`] closes a connection over
//! [`ApiLimits::max_connections`] as soon as it is accepted; [`WatchSlots`]
//! refuses a `Watch` over [`ApiLimits::max_watch_streams`] with
//! `RESOURCE_EXHAUSTED`. Both say so in a warning at most once a
//! [`WARN_EVERY`], with the number refused since the one before.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, UdsConnectInfo};

use crate::core::NodeError;

/// The config key of [`ApiLimits::max_connections`].
pub(crate) const MAX_CONNECTIONS_KEY: &str = "api.max_connections";
/// The config key of [`ApiLimits::max_watch_streams`].
pub(crate) const MAX_WATCH_STREAMS_KEY: &str = "api.max_watch_streams";

/// How often a refusal of the same kind is logged at most.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(60);

/// How long the accept loop waits after a failed accept (out of file
/// descriptors, most likely) before it tries again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The local API's caps (`[api]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections open at once (`api.max_connections`).
    pub max_connections: usize,
    /// `Watch` streams open at once, over all connections (`api.max_watch_streams`).
    pub max_watch_streams: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_watch_streams: 64,
        }
    }
}

/// Which refusals reach the log: the first, then one a [`WARN_EVERY`] at
/// most, each with the number refused since the one logged before.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    logged_at: Option<Instant>,
    /// Refusals since the last one logged, this one included.
    refused: u64,
}

impl Throttle {
    /// Counts a refusal at `now`: `Some(refusals since the last logged,
    /// this one included)` when it is to be logged.
    pub(crate) fn refused(&mut self, now: Instant) -> Option<u64> {
        self.refused = self.refused.saturating_add(1);
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
        if !due {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.refused))
    }
}

/// A connection of the local API, holding one of the [`ApiLimits::max_connections`]
/// slots until it is dropped.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: UnixStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The accept loop's state.
struct Accept {
    listener: UnixListener,
    slots: Arc<Semaphore>,
    limit: usize,
    refusals: Throttle,
    failures: Throttle,
}

/// The connections accepted on `listener`, at most `max_connections` open at
/// once: one more is closed as soon as it is accepted (its client sees the
/// connection end), and a warning names the limit. A failed accept is logged
/// and tried again after a short pause; the stream never ends nor yields an
/// error (tonic's server, fed errors, would retry at once, spinning while the
/// node is out of file descriptors).
pub(crate) fn incoming(
    listener: UnixListener,
    max_connections: usize,
) -> impl Stream<Item = Result<Conn, io::Error>> {
    let accept = Accept {
        listener,
        slots: Arc::new(Semaphore::new(max_connections)),
        limit: max_connections,
        refusals: Throttle::default(),
        failures: Throttle::default(),
    };
    futures::stream::unfold(accept, |mut accept| async move {
        loop {
            match accept.listener.accept().await {
                Ok((stream, _)) => match Arc::clone(&accept.slots).try_acquire_owned() {
                    Ok(slot) => {
                        return Some((
                            Ok(Conn {
                                stream,
                                _slot: slot,
                            }),
                            accept,
                        ));
                    }
                    Err(_) => {
                        // (the peer's process id helps find the integration that leaks)
                        let pid = stream.peer_cred().ok().and_then(|cred| cred.pid());
                        drop(stream);
                        if let Some(refused) = accept.refusals.refused(Instant::now()) {
                            tracing::warn!(
                                limit = accept.limit,
                                refused,
                                peer_pid = pid.unwrap_or(0),
                                "local api connection closed: {MAX_CONNECTIONS_KEY} reached (is \
                                 an integration leaking connections?)"
                            );
                        }
                    }
                },
                Err(error) => {
                    if let Some(failed) = accept.failures.refused(Instant::now()) {
                        tracing::warn!(%error, failed, "local api cannot accept a connection");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    })
}

/// The [`ApiLimits::max_watch_streams`] slots; clones share them.
#[derive(Debug, Clone)]
pub(crate) struct WatchSlots {
    slots: Arc<Semaphore>,
    limit: usize,
    refusals: Arc<Mutex<Throttle>>,
}

impl WatchSlots {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            refusals: Arc::default(),
        }
    }

    /// A slot for one more `Watch` stream, to be held as long as it is open;
    /// [`NodeError::LimitReached`] when all are taken.
    pub(crate) fn take(&self) -> Result<OwnedSemaphorePermit, NodeError> {
        Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            let logged = self
                .refusals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .refused(Instant::now());
            if let Some(refused) = logged {
                tracing::warn!(
                    limit = self.limit,
                    refused,
                    "local api watch refused: {MAX_WATCH_STREAMS_KEY} reached (is an \
                     integration leaking watch streams?)"
                );
            }
            NodeError::LimitReached {
                what: "too many Watch streams open",
                key: MAX_WATCH_STREAMS_KEY,
                limit: self.limit,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_a_while_with_their_count() {
        let mut throttle = Throttle::default();
        let t0 = Instant::now();
        assert_eq!(throttle.refused(t0), Some(1), "the first");
        assert_eq!(throttle.refused(t0 + Duration::from_secs(1)), None);
        assert_eq!(throttle.refused(t0 + Duration::from_secs(59)), None);
        assert_eq!(
            throttle.refused(t0 + WARN_EVERY),
            Some(3),
            "a while later, with the ones not logged"
        );
        assert_eq!(throttle.refused(t0 + WARN_EVERY), None);
        assert_eq!(throttle.refused(t0 + WARN_EVERY * 2), Some(2));
    }
}
