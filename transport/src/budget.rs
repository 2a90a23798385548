//! [`RequestBytesLayer`]: a budget of request bytes on their way in, per certificate
//! identity.
//!
//! tonic reads a request's gRPC message into memory until it has all of it (up to the
//! service's largest decoded message), and only then calls the handler, where the
//! service's own limits apply. So a client that sends most of a large message on each of
//! its streams and stalls holds that much memory per stream until the request timeout,
//! times the streams of a connection, times its identity's connections: gigabytes for one
//! certificate, whichever participant (or operator) it names. This layer counts the body
//! bytes each request has received, from the first until its body is dropped (tonic drops
//! it once the message is decoded, or with the request when it times out or is
//! cancelled), per identity across all its connections; a request whose next bytes would
//! take its identity past the budget is answered `RESOURCE_EXHAUSTED` and its bytes
//! dropped. Only that identity is refused: the others' budgets are their own.
//!
//! What HTTP/2 itself buffers before tonic reads it is bounded apart, by the connection's
//! flow-control window. The bytes of a client-streaming request would count for the
//! stream's whole life (trmx has no such method).
//!
//! # Invariants
//! - `Budgets::held` holds, for each identity, the sum of the bytes its live requests have
//!   been charged, never more than the limit; an identity with nothing held has no entry.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::identity::cached_peer_name;
use crate::listener::{REFUSAL_REPORT_INTERVAL, Throttle};

/// A tower layer that holds each certificate identity's requests on their way in to
/// `limit` bytes at once (see the [module docs](self)). Cheap to clone; clones share the
/// budgets.
#[derive(Clone)]
pub struct RequestBytesLayer {
    budgets: Arc<Budgets>,
}

struct Budgets {
    limit: u64,
    held: Mutex<HashMap<Arc<str>, u64>>,
    refused: AtomicU64,
    throttle: Throttle<1>,
}

impl Budgets {
    fn held(&self) -> MutexGuard<'_, HashMap<Arc<str>, u64>> {
        // (single updates of one entry: a poisoned map is still consistent)
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for RequestBytesLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBytesLayer")
            .field("limit", &self.budgets.limit)
            .field("identities_holding", &self.budgets.held().len())
            .finish_non_exhaustive()
    }
}

impl RequestBytesLayer {
    /// A budget of `limit` request bytes on their way in per identity.
    pub fn new(limit: u64) -> Self {
        RequestBytesLayer {
            budgets: Arc::new(Budgets {
                limit,
                held: Mutex::new(HashMap::new()),
                refused: AtomicU64::new(0),
                throttle: Throttle::new(REFUSAL_REPORT_INTERVAL),
            }),
        }
    }

    /// Requests refused since the layer was made.
    pub fn refused(&self) -> u64 {
        self.budgets.refused.load(Ordering::Relaxed)
    }

    /// The bytes the requests of every identity hold now.
    pub fn held(&self) -> u64 {
        self.budgets.held().values().sum()
    }
}

impl<S> tower::Layer<S> for RequestBytesLayer {
    type Service = RequestBytes<S>;

    fn layer(&self, inner: S) -> RequestBytes<S> {
        RequestBytes {
            inner,
            budgets: self.budgets.clone(),
        }
    }
}

/// The service [`RequestBytesLayer`] wraps around another.
#[derive(Clone)]
pub struct RequestBytes<S> {
    inner: S,
    budgets: Arc<Budgets>,
}

impl<S> std::fmt::Debug for RequestBytes<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBytes")
            .field("limit", &self.budgets.limit)
            .finish_non_exhaustive()
    }
}

impl<S> tower::Service<http::Request<Body>> for RequestBytes<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // (every connection from `incoming` carries its client's certificate)
        let identity = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .map(|certs| Arc::<str>::from(cached_peer_name(&certs)));
        let Some(identity) = identity else {
            return self.inner.call(request);
        };
        let charge = Charge {
            budgets: self.budgets.clone(),
            identity,
            held: 0,
            refused: false,
        };
        self.inner
            .call(request.map(|inner| Body::new(Counted { inner, charge })))
    }
}

/// What one request's body holds of its identity's budget; given back when dropped.
struct Charge {
    budgets: Arc<Budgets>,
    identity: Arc<str>,
    held: u64,
    refused: bool,
}

impl Charge {
    /// Takes `bytes` more from the budget, or refuses the request. A refused request
    /// gives back what it held at once, not when tonic drops its body: its bytes are
    /// dropped with it, and held on they would refuse the identity's other requests
    /// meanwhile (of several requests sharing a budget, all but those that fit in it
    /// could be refused).
    fn take(&mut self, bytes: u64) -> Result<(), Status> {
        {
            let mut held = self.budgets.held();
            let total = held.get(&self.identity).copied().unwrap_or(0);
            if total.saturating_add(bytes) <= self.budgets.limit {
                held.insert(self.identity.clone(), total + bytes);
                self.held += bytes;
                return Ok(());
            }
        }
        self.give_back();
        self.refused = true;
        let budgets = &*self.budgets;
        budgets.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(refused) = budgets.throttle.count(0) {
            tracing::warn!(
                identity = %self.identity,
                limit = budgets.limit,
                refused,
                "request bytes of one identity on their way in reached the limit, \
                 refusing its request"
            );
        }
        Err(Status::resource_exhausted(format!(
            "the requests of {} on their way in hold more than {} bytes at once; send fewer \
             or smaller requests at a time",
            self.identity, budgets.limit
        )))
    }
}

impl Charge {
    /// Gives back to the budget what this request holds.
    fn give_back(&mut self) {
        if self.held == 0 {
            return;
        }
        let mut held = self.budgets.held();
        if let Some(total) = held.get_mut(&self.identity) {
            *total = total.saturating_sub(self.held);
            if *total == 0 {
                held.remove(&self.identity);
            }
        }
        self.held = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// A request body whose data frames are charged to its identity.
struct Counted {
    inner: Body,
    charge: Charge,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.charge.refused {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(status) = this.charge.take(data.len() as u64)
        {
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.charge.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(layer: &RequestBytesLayer, identity: &str) -> Charge {
        Charge {
            budgets: layer.budgets.clone(),
            identity: identity.into(),
            held: 0,
            refused: false,
        }
    }

    /// One identity's requests share its budget, another's is its own, and what a
    /// request held is given back when it goes.
    #[test]
    fn an_identity_is_refused_past_its_budget_until_its_requests_go() {
        let layer = RequestBytesLayer::new(100);
        let mut first = charge(&layer, "participant NL-NRM");
        let mut second = charge(&layer, "participant NL-NRM");
        let mut other = charge(&layer, "participant BE-PAYOKE");
        assert!(first.take(60).is_ok());
        let refused = second.take(41).expect_err("past the budget");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("participant NL-NRM"),
            "{refused:?}"
        );
        assert!(
            other.take(100).is_ok(),
            "another identity's budget is its own"
        );
        assert_eq!(layer.refused(), 1);
        assert_eq!(layer.held(), 160);
        // a refused request gives back what it held at once, not when it is dropped
        let mut fourth = charge(&layer, "participant BE-PAYOKE");
        assert!(fourth.take(0).is_ok());
        let mut partial = charge(&layer, "participant NL-NRM");
        assert!(partial.take(30).is_ok());
        assert!(partial.take(20).is_err(), "60 + 30 + 20 is past 100");
        assert_eq!(
            layer.held(),
            160,
            "the 30 bytes of the refused request are back"
        );
        drop((fourth, partial));

        drop(first);
        let mut third = charge(&layer, "participant NL-NRM");
        assert!(
            third.take(100).is_ok(),
            "the first request's bytes were given back"
        );
        drop((second, third, other));
        assert_eq!(layer.held(), 0);
        assert!(
            layer.budgets.held().is_empty(),
            "no entry for an identity holding nothing"
        );
    }
}
