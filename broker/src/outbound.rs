//! The sending side of a `Receive` stream. Deliveries wait in a channel until tonic
//! takes them for the connection; tonic takes the next one only when HTTP/2 flow
//! control lets it send, so on a slow link they wait here. The channel counts their
//! payload bytes, so that the stream leases more messages only while little waits
//! to be sent (`limits.receive_buffer_bytes`): a delivery's ack timeout runs from its
//! lease, and must not be spent waiting behind other deliveries.
//!
//! # Invariants
//! - [`Outbox::waiting_bytes`] is the payload bytes of the deliveries in the channel:
//!   added when one is put in, taken off when tonic takes it out.
//! - Each delivery taken out notifies [`Outbox::taken`] (a stored permit if no one is
//!   waiting), so a stream that waits for room never misses it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tonic::Status;
use trmx_proto::pb;

/// What both ends share.
#[derive(Debug, Default)]
struct Waiting {
    bytes: AtomicU64,
    taken: Notify,
}

/// A `Receive` stream's channel to its connection, holding at most `capacity`
/// deliveries.
pub fn channel(capacity: usize) -> (Outbox, Outbound) {
    let (tx, rx) = mpsc::channel(capacity);
    let waiting = Arc::new(Waiting::default());
    (
        Outbox {
            tx,
            waiting: waiting.clone(),
        },
        Outbound { rx, waiting },
    )
}

/// The stream task's end: puts deliveries in.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Result<pb::Delivery, Status>>,
    waiting: Arc<Waiting>,
}

/// The connection's end: the `Receive` response stream tonic sends from.
#[derive(Debug)]
pub struct Outbound {
    rx: mpsc::Receiver<Result<pb::Delivery, Status>>,
    waiting: Arc<Waiting>,
}

/// The connection's end is gone (the recipient went away).
#[derive(Debug)]
pub struct Gone;

impl Outbox {
    /// Puts `delivery` in, once the channel has room. Cancel-safe: a delivery is either
    /// in the channel and counted, or neither.
    pub async fn send(&self, delivery: pb::Delivery) -> Result<(), Gone> {
        let permit = self.tx.reserve().await.map_err(|_| Gone)?;
        self.waiting
            .bytes
            .fetch_add(payload_bytes(&delivery), Ordering::Relaxed);
        permit.send(Ok(delivery));
        Ok(())
    }

    /// Ends the stream with `status`, if the channel has room for it (the connection
    /// ends the stream either way once this end is dropped).
    pub fn end_with(&self, status: Status) {
        let _ = self.tx.try_send(Err(status));
    }

    /// Payload bytes waiting to be taken for the connection.
    pub fn waiting_bytes(&self) -> u64 {
        self.waiting.bytes.load(Ordering::Relaxed)
    }

    /// Completes once a delivery is taken for the connection (at once if one was
    /// taken since the last call).
    pub async fn taken(&self) {
        self.waiting.taken.notified().await;
    }

    /// Completes once the connection's end is gone.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl Stream for Outbound {
    type Item = Result<pb::Delivery, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(delivery))) = &polled {
            self.waiting
                .bytes
                .fetch_sub(payload_bytes(delivery), Ordering::Relaxed);
            self.waiting.taken.notify_one();
        }
        polled
    }
}

/// The bytes a delivery counts for: its payload, as the store's lease budget counts them.
fn payload_bytes(delivery: &pb::Delivery) -> u64 {
    delivery
        .envelope
        .as_ref()
        .map_or(0, |envelope| envelope.payload.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn delivery(size: usize) -> pb::Delivery {
        pb::Delivery {
            envelope: Some(pb::Envelope {
                payload: vec![1; size],
                ..pb::Envelope::default()
            }),
            attempt: 1,
        }
    }

    #[tokio::test]
    async fn counts_the_bytes_waiting_and_tells_when_one_is_taken() {
        let (outbox, mut outbound) = channel(4);
        outbox.send(delivery(100)).await.unwrap();
        outbox.send(delivery(50)).await.unwrap();
        assert_eq!(outbox.waiting_bytes(), 150);

        let taken = outbox.taken();
        tokio::pin!(taken);
        assert!(futures_poll_once(taken.as_mut()).await.is_pending());
        outbound.next().await.unwrap().unwrap();
        assert_eq!(outbox.waiting_bytes(), 50);
        taken.await;
        // a take while no one waits is not lost
        outbound.next().await.unwrap().unwrap();
        assert_eq!(outbox.waiting_bytes(), 0);
        tokio::time::timeout(std::time::Duration::from_secs(5), outbox.taken())
            .await
            .expect("the second take is remembered");
    }

    #[tokio::test]
    async fn a_send_cancelled_while_the_channel_is_full_counts_nothing() {
        let (outbox, _outbound) = channel(1);
        outbox.send(delivery(10)).await.unwrap();
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            outbox.send(delivery(1000)),
        )
        .await;
        assert!(blocked.is_err(), "the channel is full");
        assert_eq!(outbox.waiting_bytes(), 10);
    }

    #[tokio::test]
    async fn a_send_after_the_connection_went_away_fails() {
        let (outbox, outbound) = channel(1);
        drop(outbound);
        assert!(outbox.send(delivery(1)).await.is_err());
        outbox.closed().await;
    }

    /// Polls `fut` once.
    async fn futures_poll_once<F: std::future::Future + Unpin>(fut: F) -> Poll<F::Output> {
        let mut fut = fut;
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
    }
}
