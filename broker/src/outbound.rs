//! The sending side of a `Receive` stream. Deliveries wait in a channel until tonic
//! takes them for the connection. HTTP/2 flow control holds tonic back, though not
//! at the window's edge: hyper queues one message beyond the peer's window and takes
//! the next to hold it, so on a slow link the rest wait here. The channel counts their
//! payload bytes, so that the stream leases more messages only while little waits
//! to be sent (`limits.receive_buffer_bytes`): a delivery's ack timeout runs from its
//! lease, and must not be spent waiting behind other deliveries (the window and those
//! two messages are ahead of it all the same; `lifecycle.ack_timeout` allows for them).
//!
//! The room comes back in halves: once the bytes waiting are down to half the buffer,
//! the stream may fill it again. A stream on a fast link then leases in batches (each
//! lease is a store transaction), not one message per message sent.
//!
//! # Invariants
//! - [`Outbox::waiting_bytes`] is the payload bytes of the deliveries in the channel:
//!   added when one is put in, taken off when tonic takes it out.
//! - A take that brings the bytes waiting down to half the buffer or below notifies
//!   [`Outbox::room_made`] (a stored permit if no one is waiting), so a stream waiting
//!   for room never misses it.
//! - The ids of the deliveries in the channel are known ([`Waiting::queued`]); one
//!   withdrawn while it waits ([`Dropper::withdrawn`]) is dropped when its turn comes,
//!   not sent: its recipient never sees it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tonic::Status;
use trmx_proto::pb;

/// What both ends share.
#[derive(Debug)]
struct Waiting {
    bytes: AtomicU64,
    /// Half the buffer: at or below it, there is room again.
    low: u64,
    room_made: Notify,
    /// The message ids of the deliveries in the channel, and whether each was
    /// withdrawn since it was put in.
    queued: Mutex<HashMap<String, bool>>,
}

impl Waiting {
    fn queued(&self) -> MutexGuard<'_, HashMap<String, bool>> {
        // (single inserts and removals: a panic leaves the map whole)
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A `Receive` stream's channel to its connection, holding at most `capacity`
/// deliveries, with room for `buffer` payload bytes.
pub fn channel(capacity: usize, buffer: u64) -> (Outbox, Outbound) {
    let (tx, rx) = mpsc::channel(capacity);
    let waiting = Arc::new(Waiting {
        bytes: AtomicU64::new(0),
        low: buffer / 2,
        room_made: Notify::new(),
        queued: Mutex::new(HashMap::new()),
    });
    (
        Outbox {
            tx,
            buffer,
            waiting: waiting.clone(),
        },
        Outbound { rx, waiting },
    )
}

/// The stream task's end: puts deliveries in.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Result<pb::Delivery, Status>>,
    buffer: u64,
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

/// Drops a withdrawn message from a stream's channel (kept by the stream registry).
#[derive(Debug, Clone)]
pub struct Dropper(Arc<Waiting>);

impl Dropper {
    /// `message_id` was withdrawn: if it waits in the channel, it is dropped when its
    /// turn comes instead of sent. Whether it was waiting.
    pub fn withdrawn(&self, message_id: &str) -> bool {
        match self.0.queued().get_mut(message_id) {
            Some(withdrawn) => {
                *withdrawn = true;
                true
            }
            None => false,
        }
    }
}

impl Outbox {
    /// Puts `delivery` in, once the channel has room. Cancel-safe: a delivery is either
    /// in the channel and counted, or neither.
    pub async fn send(&self, delivery: pb::Delivery) -> Result<(), Gone> {
        let permit = self.tx.reserve().await.map_err(|_| Gone)?;
        self.waiting
            .bytes
            .fetch_add(payload_bytes(&delivery), Ordering::Relaxed);
        self.waiting.queued().insert(message_id(&delivery), false);
        permit.send(Ok(delivery));
        Ok(())
    }

    /// What drops a withdrawn message from this channel.
    pub fn dropper(&self) -> Dropper {
        Dropper(self.waiting.clone())
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

    /// Payload bytes the stream may lease now: what the buffer has left, once the
    /// bytes waiting are down to half of it; else 0.
    pub fn room(&self) -> u64 {
        let waiting = self.waiting_bytes();
        if waiting > self.waiting.low {
            0
        } else {
            self.buffer.saturating_sub(waiting).max(1)
        }
    }

    /// Completes once a take made room (at once if one did since the last call).
    pub async fn room_made(&self) {
        self.waiting.room_made.notified().await;
    }

    /// Completes once the connection's end is gone.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl Stream for Outbound {
    type Item = Result<pb::Delivery, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let polled = self.rx.poll_recv(cx);
            let Poll::Ready(Some(Ok(delivery))) = &polled else {
                return polled;
            };
            let size = payload_bytes(delivery);
            let before = self.waiting.bytes.fetch_sub(size, Ordering::Relaxed);
            if before - size <= self.waiting.low && before > self.waiting.low {
                self.waiting.room_made.notify_one();
            }
            let withdrawn = self
                .waiting
                .queued()
                .remove(&message_id(delivery))
                .unwrap_or(false);
            if !withdrawn {
                return polled;
            }
        }
    }
}

/// The message id of a delivery.
fn message_id(delivery: &pb::Delivery) -> String {
    delivery
        .envelope
        .as_ref()
        .map_or_else(String::new, |envelope| envelope.message_id.clone())
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
    use std::time::Duration;
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
    async fn room_comes_back_when_half_the_buffer_is_sent() {
        let (outbox, mut outbound) = channel(8, 200);
        assert_eq!(outbox.room(), 200);
        for size in [60, 60, 60] {
            outbox.send(delivery(size)).await.unwrap();
        }
        assert_eq!((outbox.waiting_bytes(), outbox.room()), (180, 0));

        let room_made = outbox.room_made();
        tokio::pin!(room_made);
        outbound.next().await.unwrap().unwrap();
        // 120 waiting: more than half
        assert_eq!((outbox.waiting_bytes(), outbox.room()), (120, 0));
        assert!(poll_once(room_made.as_mut()).await.is_pending());
        outbound.next().await.unwrap().unwrap();
        assert_eq!((outbox.waiting_bytes(), outbox.room()), (60, 140));
        room_made.await;
    }

    #[tokio::test]
    async fn room_made_while_no_one_waits_is_not_lost() {
        let (outbox, mut outbound) = channel(8, 100);
        outbox.send(delivery(80)).await.unwrap();
        outbound.next().await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(5), outbox.room_made())
            .await
            .expect("the take made room while no one waited");
    }

    #[tokio::test]
    async fn a_message_larger_than_the_buffer_leaves_room_for_one_when_sent() {
        let (outbox, mut outbound) = channel(8, 100);
        outbox.send(delivery(500)).await.unwrap();
        assert_eq!(outbox.room(), 0);
        outbound.next().await.unwrap().unwrap();
        assert_eq!(outbox.room(), 100);
    }

    #[tokio::test]
    async fn a_send_cancelled_while_the_channel_is_full_counts_nothing() {
        let (outbox, _outbound) = channel(1, 1 << 20);
        outbox.send(delivery(10)).await.unwrap();
        let blocked =
            tokio::time::timeout(Duration::from_millis(20), outbox.send(delivery(1000))).await;
        assert!(blocked.is_err(), "the channel is full");
        assert_eq!(outbox.waiting_bytes(), 10);
    }

    fn delivery_of(id: &str, size: usize) -> pb::Delivery {
        let mut delivery = delivery(size);
        if let Some(envelope) = delivery.envelope.as_mut() {
            envelope.message_id = id.to_owned();
        }
        delivery
    }

    #[tokio::test]
    async fn a_message_withdrawn_while_it_waits_is_dropped_not_sent() {
        let (outbox, mut outbound) = channel(8, 1 << 20);
        let dropper = outbox.dropper();
        for id in ["a", "b", "c"] {
            outbox.send(delivery_of(id, 10)).await.unwrap();
        }
        let first = outbound.next().await.unwrap().unwrap();
        assert_eq!(first.envelope.unwrap().message_id, "a");
        // sent already: nothing to drop
        assert!(!dropper.withdrawn("a"));
        assert!(dropper.withdrawn("b"));
        let next = outbound.next().await.unwrap().unwrap();
        assert_eq!(next.envelope.unwrap().message_id, "c");
        assert_eq!(outbox.waiting_bytes(), 0);
        assert!(!dropper.withdrawn("b"), "forgotten once dropped");
    }

    #[tokio::test]
    async fn a_send_after_the_connection_went_away_fails() {
        let (outbox, outbound) = channel(1, 1 << 20);
        drop(outbound);
        assert!(outbox.send(delivery(1)).await.is_err());
        outbox.closed().await;
    }

    /// Polls `fut` once.
    async fn poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
    }
}
