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
//! - The ids of the deliveries in the channel are known, with how many copies of each
//!   wait there ([`Waiting::queued`]: a delivery whose ack timeout passed while it waited
//!   is leased again, onto the same stream, behind its first copy). A message taken back
//!   ([`Dropper::taken_back`]: withdrawn, purged) is marked, and every copy of it is
//!   dropped when its turn comes, not sent: its recipient never sees it. The mark is kept
//!   while no copy waits too, since a copy leased before the message was taken back may
//!   still be on its way in (the stream task puts a batch in one delivery at a time, and
//!   learns of a lease only once the store made it); the stream task forgets the marks
//!   without a copy when it holds no delivery still to put in
//!   ([`Outbox::forget_taken_back`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tonic::Status;
use trmx_proto::{MessageId, pb};

/// What both ends share.
#[derive(Debug)]
struct Waiting {
    bytes: AtomicU64,
    /// Half the buffer: at or below it, there is room again.
    low: u64,
    room_made: Notify,
    /// The message ids of the deliveries in the channel, and of the messages taken back
    /// (see the module doc).
    queued: Mutex<HashMap<MessageId, Queued>>,
}

/// What the channel knows of one message id.
#[derive(Debug, Default)]
struct Queued {
    /// The copies of it waiting in the channel.
    copies: u32,
    /// Taken back: every copy is dropped, not sent.
    taken_back: bool,
}

/// A delivery in the channel, with its message id.
type Item = Result<(MessageId, pb::Delivery), Status>;

impl Waiting {
    fn queued(&self) -> MutexGuard<'_, HashMap<MessageId, Queued>> {
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
    tx: mpsc::Sender<Item>,
    buffer: u64,
    waiting: Arc<Waiting>,
}

/// The connection's end: the `Receive` response stream tonic sends from.
#[derive(Debug)]
pub struct Outbound {
    rx: mpsc::Receiver<Item>,
    waiting: Arc<Waiting>,
}

/// The connection's end is gone (the recipient went away).
#[derive(Debug)]
pub struct Gone;

/// Drops a message taken back from a stream's channel (kept by the stream registry).
#[derive(Debug, Clone)]
pub struct Dropper(Arc<Waiting>);

impl Dropper {
    /// `message_id` was taken back (withdrawn, purged): every copy of it that waits in the
    /// channel, or is put in until the stream task forgets the mark, is dropped when its
    /// turn comes instead of sent.
    pub fn taken_back(&self, message_id: MessageId) {
        self.0.queued().entry(message_id).or_default().taken_back = true;
    }
}

impl Outbox {
    /// Puts `delivery` (of message `id`) in, once the channel has room. Cancel-safe: a
    /// delivery is either in the channel and counted, or neither.
    pub async fn send(&self, id: MessageId, delivery: pb::Delivery) -> Result<(), Gone> {
        let permit = self.tx.reserve().await.map_err(|_| Gone)?;
        self.waiting
            .bytes
            .fetch_add(payload_bytes(&delivery), Ordering::Relaxed);
        self.waiting.queued().entry(id).or_default().copies += 1;
        permit.send(Ok((id, delivery)));
        Ok(())
    }

    /// What drops a message taken back from this channel.
    pub fn dropper(&self) -> Dropper {
        Dropper(self.waiting.clone())
    }

    /// Forgets the marks of messages taken back of which no copy waits in the channel.
    /// Call it only while the stream holds no leased delivery it has still to put in (a
    /// copy leased before its message was taken back must find the mark).
    pub fn forget_taken_back(&self) {
        self.waiting.queued().retain(|_, queued| queued.copies > 0);
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
            let (id, delivery) = match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(item))) => item,
                Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            let size = payload_bytes(&delivery);
            let before = self.waiting.bytes.fetch_sub(size, Ordering::Relaxed);
            if before - size <= self.waiting.low && before > self.waiting.low {
                self.waiting.room_made.notify_one();
            }
            let taken_back = {
                let mut queued = self.waiting.queued();
                match queued.get_mut(&id) {
                    Some(entry) => {
                        entry.copies = entry.copies.saturating_sub(1);
                        let taken_back = entry.taken_back;
                        // (a mark stays: another copy may still come, see the module doc)
                        if entry.copies == 0 && !taken_back {
                            queued.remove(&id);
                        }
                        taken_back
                    }
                    None => false,
                }
            };
            if !taken_back {
                return Poll::Ready(Some(Ok(delivery)));
            }
        }
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
            outbox
                .send(MessageId::new_v7(), delivery(size))
                .await
                .unwrap();
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
        outbox
            .send(MessageId::new_v7(), delivery(80))
            .await
            .unwrap();
        outbound.next().await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(5), outbox.room_made())
            .await
            .expect("the take made room while no one waited");
    }

    #[tokio::test]
    async fn a_message_larger_than_the_buffer_leaves_room_for_one_when_sent() {
        let (outbox, mut outbound) = channel(8, 100);
        outbox
            .send(MessageId::new_v7(), delivery(500))
            .await
            .unwrap();
        assert_eq!(outbox.room(), 0);
        outbound.next().await.unwrap().unwrap();
        assert_eq!(outbox.room(), 100);
    }

    #[tokio::test]
    async fn a_send_cancelled_while_the_channel_is_full_counts_nothing() {
        let (outbox, _outbound) = channel(1, 1 << 20);
        outbox
            .send(MessageId::new_v7(), delivery(10))
            .await
            .unwrap();
        let blocked = tokio::time::timeout(
            Duration::from_millis(20),
            outbox.send(MessageId::new_v7(), delivery(1000)),
        )
        .await;
        assert!(blocked.is_err(), "the channel is full");
        assert_eq!(outbox.waiting_bytes(), 10);
    }

    /// The message ids of the deliveries `outbound` gives until it is empty.
    async fn taken(outbound: &mut Outbound) -> Vec<MessageId> {
        let mut ids = Vec::new();
        while let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_millis(20), outbound.next()).await
        {
            let id = delivery.unwrap().envelope.unwrap().message_id;
            ids.push(MessageId::parse(&id).unwrap());
        }
        ids
    }

    async fn send(outbox: &Outbox, id: MessageId) {
        let mut delivery = delivery(10);
        if let Some(envelope) = delivery.envelope.as_mut() {
            envelope.message_id = id.to_string();
        }
        outbox.send(id, delivery).await.unwrap();
    }

    #[tokio::test]
    async fn a_message_withdrawn_while_it_waits_is_dropped_not_sent() {
        let (outbox, mut outbound) = channel(8, 1 << 20);
        let dropper = outbox.dropper();
        let [a, b, c] = [(); 3].map(|()| MessageId::new_v7());
        for id in [a, b, c] {
            send(&outbox, id).await;
        }
        let first = outbound.next().await.unwrap().unwrap();
        assert_eq!(first.envelope.unwrap().message_id, a.to_string());
        // sent already: nothing to drop
        dropper.taken_back(a);
        dropper.taken_back(b);
        assert_eq!(taken(&mut outbound).await, [c]);
        assert_eq!(outbox.waiting_bytes(), 0);
        // the marks are kept until the stream task forgets them
        outbox.forget_taken_back();
        assert!(outbox.waiting.queued().is_empty(), "a mark is kept");
    }

    /// A delivery whose ack timeout passed while it waited is leased again onto the same
    /// stream: both copies of a message taken back are dropped, and so is one the stream
    /// task puts in after the mark (leased before, still on its way in).
    #[tokio::test]
    async fn every_copy_of_a_message_taken_back_is_dropped() {
        let (outbox, mut outbound) = channel(8, 1 << 20);
        let dropper = outbox.dropper();
        let [m, other] = [(); 2].map(|()| MessageId::new_v7());
        send(&outbox, m).await;
        send(&outbox, other).await;
        send(&outbox, m).await;
        dropper.taken_back(m);
        assert_eq!(taken(&mut outbound).await, [other]);
        send(&outbox, m).await;
        assert_eq!(taken(&mut outbound).await, []);
        assert_eq!(outbox.waiting_bytes(), 0);

        // a message not taken back is sent each time it comes
        let again = MessageId::new_v7();
        send(&outbox, again).await;
        send(&outbox, again).await;
        assert_eq!(taken(&mut outbound).await, [again, again]);
        send(&outbox, again).await;
        assert_eq!(taken(&mut outbound).await, [again]);
    }

    /// Forgetting the marks keeps those of messages with a copy waiting.
    #[tokio::test]
    async fn forgetting_keeps_the_marks_of_waiting_copies() {
        let (outbox, mut outbound) = channel(8, 1 << 20);
        let dropper = outbox.dropper();
        let [m, gone] = [(); 2].map(|()| MessageId::new_v7());
        send(&outbox, m).await;
        dropper.taken_back(m);
        dropper.taken_back(gone);
        outbox.forget_taken_back();
        assert_eq!(outbox.waiting.queued().len(), 1);
        assert_eq!(taken(&mut outbound).await, []);
    }

    #[tokio::test]
    async fn a_send_after_the_connection_went_away_fails() {
        let (outbox, outbound) = channel(1, 1 << 20);
        drop(outbound);
        assert!(outbox.send(MessageId::new_v7(), delivery(1)).await.is_err());
        outbox.closed().await;
    }

    /// Polls `fut` once.
    async fn poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
    }
}
