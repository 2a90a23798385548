//! The channel of the broker link, moved to a new connection when the node
//! certificate changes.
//!
//! An HTTP/2 connection lasts until it breaks, and presents the certificate
//! it was opened with all along: after a renewal the node would go on
//! presenting the old certificate (to a broker about to revoke it) for weeks.
//! [`LinkChannel`] is the `tower` service every `Exchange` client of the link
//! calls through. [`LinkChannel::outdated`] says when the next connection would
//! present another certificate than the open one, and opens a [`Candidate`]
//! channel that presents it; the certificate loop proves it with one call, and
//! only then [`LinkChannel::move_to`] replaces the channel inside with it (a
//! certificate the broker refuses must not take the link off a connection that
//! works, nor keep it off once that breaks: [`Outdated::hold`] makes the channel
//! in use reconnect with the certificate its connection presents). Each call from
//! then on goes to the new channel, while a call made before (a submit awaiting
//! its answer) ends on the old connection, which hyper closes once its last call
//! has ended. The receive loop, whose stream would hold the old connection open
//! for ever, watches [`LinkChannel::generation`] and moves its stream.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use trmx_certs::CertInfo;
use trmx_transport::ChannelTls;

/// The broker channel in use; clones share it.
#[derive(Clone)]
pub(crate) struct LinkChannel {
    shared: Arc<Shared>,
    /// The channel `poll_ready` polled, for the `call` that follows: its generation,
    /// and whether it answered `Ready` (then it is kept until the call, whatever moves:
    /// tower's contract is that a service once ready stays ready until called).
    ready: Option<Polled>,
}

/// What [`LinkChannel::poll_ready`] last polled.
#[derive(Clone)]
struct Polled {
    generation: u64,
    channel: Channel,
    ready: bool,
}

struct Shared {
    current: Mutex<Current>,
    /// The generation of `current`, for those who wait for a move.
    generation: watch::Sender<u64>,
}

struct Current {
    generation: u64,
    channel: Channel,
    /// Its TLS files (`None`: a link without TLS, in tests).
    tls: Option<ChannelTls>,
}

/// The link's next connection would present another certificate than its open one.
#[derive(Debug)]
pub(crate) struct Outdated {
    /// What the open connection presents (`None`: no trmx certificate).
    pub(crate) old: Option<CertInfo>,
    /// What the certificate files hold: what a new channel's connection presents.
    pub(crate) new: Option<CertInfo>,
    /// The TLS files of the channel in use.
    tls: ChannelTls,
}

/// A new channel, with its own connection, not yet in use by the link.
#[derive(Debug)]
pub(crate) struct Candidate {
    /// Connects at its first call, with the TLS files as they are then: the call that
    /// proves it opens the connection the link then uses (no second one).
    pub(crate) channel: Channel,
    tls: ChannelTls,
}

impl Outdated {
    /// A new channel to the broker with the same TLS files (nothing dialled yet).
    pub(crate) fn candidate(&self) -> Candidate {
        let (channel, tls) = self.tls.new_channel();
        Candidate { channel, tls }
    }

    /// Makes the next connections of the channel in use present `old`, the certificate
    /// its open connection presents, not `new` (which the broker did not accept), until
    /// [`LinkChannel::release`] or a move.
    pub(crate) fn hold(&self) {
        self.tls.hold();
    }
}

impl std::fmt::Debug for LinkChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkChannel")
            .field("generation", &*self.shared.generation.borrow())
            .finish_non_exhaustive()
    }
}

impl LinkChannel {
    pub(crate) fn new(channel: Channel, tls: Option<ChannelTls>) -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                current: Mutex::new(Current {
                    generation: 0,
                    channel,
                    tls,
                }),
                generation,
            }),
            ready: None,
        }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The TLS files of the channel in use (`None`: a link without TLS, in tests): after
    /// a move, the new channel's, whose connection presents the certificate moved to.
    pub(crate) fn tls(&self) -> Option<ChannelTls> {
        self.current().tls.clone()
    }

    /// Changes with each move to a new channel.
    pub(crate) fn generation(&self) -> watch::Receiver<u64> {
        self.shared.generation.subscribe()
    }

    /// Whether the next connection would present another certificate than the open
    /// one presents (`None`: the same, no connection opened yet, or a link without
    /// TLS). Reads the TLS files when they changed (small files, synchronously): call
    /// it off the runtime.
    pub(crate) fn outdated(&self) -> Option<Outdated> {
        let tls = self.tls()?;
        let status = tls.status();
        status.outdated.then_some(Outdated {
            old: status.connected,
            new: status.presented,
            tls,
        })
    }

    /// Makes the next connections of the channel in use present the certificate of the
    /// files again, after [`Outdated::hold`].
    pub(crate) fn release(&self) {
        if let Some(tls) = self.tls() {
            tls.release();
        }
    }

    /// Moves to `candidate`: each call from now on goes to it, and the receive loop
    /// moves its stream (see [`LinkChannel::generation`]).
    pub(crate) fn move_to(&self, candidate: Candidate) {
        let generation = {
            let mut current = self.current();
            current.generation = current.generation.wrapping_add(1);
            // (the old channel is dropped here, unless a call still holds it)
            current.channel = candidate.channel;
            current.tls = Some(candidate.tls);
            current.generation
        };
        self.shared.generation.send_replace(generation);
    }

    /// The channel in use, and its generation.
    fn in_use(&self) -> (u64, Channel) {
        let current = self.current();
        (current.generation, current.channel.clone())
    }
}

impl tower::Service<http::Request<Body>> for LinkChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = <Channel as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A channel that answered `Ready` is kept until the call (it holds a slot in
        // its buffer), even across a move: that one call ends on the old connection,
        // like a call made before the move. One still pending is left for the new one.
        if let Some(polled) = &self.ready
            && polled.ready
        {
            return Poll::Ready(Ok(()));
        }
        let generation = *self.shared.generation.borrow();
        let polled = match self.ready.take() {
            Some(polled) if polled.generation == generation => polled,
            _ => {
                let (generation, channel) = self.in_use();
                Polled {
                    generation,
                    channel,
                    ready: false,
                }
            }
        };
        let polled = self.ready.insert(polled);
        let answer = polled.channel.poll_ready(cx);
        polled.ready = matches!(answer, Poll::Ready(Ok(())));
        answer
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // (`Channel::call` without a `poll_ready` before panics, as this one does then)
        let mut channel = match self.ready.take() {
            Some(polled) => polled.channel,
            None => self.in_use().1,
        };
        channel.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy_channel(buffer: usize) -> Channel {
        tonic::transport::Endpoint::from_static("http://127.0.0.1:9")
            .buffer_size(buffer)
            .connect_lazy()
    }

    /// tower's `Service` contract: once `poll_ready` has returned `Ready(Ok)`, "until a
    /// request is dispatched, repeated calls to `poll_ready` must return either
    /// `Ready(Ok)` or `Ready(Err)`". A move between a `Ready` and the `call` must not
    /// make the next `poll_ready` drop the ready old channel (and its buffer slot) for
    /// the new one, which can be `Pending` (its buffer full). (tonic's client calls right
    /// after `Ready`; a tower layer that polls again, such as a buffer, would not.)
    #[tokio::test]
    async fn a_ready_link_channel_stays_ready_until_it_is_called() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut link = LinkChannel::new(lazy_channel(16), None);
        assert!(matches!(
            tower::Service::<http::Request<Body>>::poll_ready(&mut link, &mut cx),
            Poll::Ready(Ok(()))
        ));
        // a move, as `move_to` makes it, to a channel whose buffer is full
        let full = lazy_channel(1);
        let mut other = full.clone();
        assert!(matches!(
            tower::Service::<http::Request<Body>>::poll_ready(&mut other, &mut cx),
            Poll::Ready(Ok(()))
        ));
        {
            let mut current = link.current();
            current.generation += 1;
            current.channel = full;
        }
        link.shared.generation.send_replace(1);
        assert!(
            matches!(
                tower::Service::<http::Request<Body>>::poll_ready(&mut link, &mut cx),
                Poll::Ready(_)
            ),
            "a LinkChannel that was ready went back to Pending before its call"
        );
    }
}
