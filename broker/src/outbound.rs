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
//! A delivery leaves the channel only for a message the broker still delivers. One taken
//! back while it waited (withdrawn, purged, or dead-lettered when its last attempt's ack
//! timeout passed, its sender told it was not delivered) is dropped when its turn comes,
//! never sent;
//! so is one whose lifetime ended meanwhile. Expiry is read on the broker's clock when
//! the delivery is taken out, the instant that matters: the store expires a message once
//! its `expires_at` has passed, also while it is IN_FLIGHT (DESIGN.md §4: a lease does not
//! hold it back), and leases none whose `expires_at` has passed; the channel drops one at
//! that same instant, so the recipient never gets a message the broker already declared
//! expired (with its non-delivery report on the way to the sender). What tonic took
//! before is out of reach: a delivery taken out just before its expiry may reach the node
//! after it (the two messages hyper holds), as one sent a moment earlier would.
//! A dropped delivery is reported ([`Report::dropped`]) so that its stream slot is freed:
//! its recipient will never ack it.
//!
//! Once the stream ends on the broker's side (its task closes it, or goes), nothing more
//! leaves the channel but the status that ends it: the stream's leases are released next,
//! due again at once, and the stream's entry, through which withdrawals and purges reach
//! the channel, goes. A delivery still waiting then would reach the recipient, once it
//! reads on, after its message was leased again to another stream (in flight on two at
//! once), withdrawn, purged or acknowledged meanwhile, or after its participant left the
//! registry.
//!
//! So is a copy of a message its recipient acknowledged or rejected meanwhile (another copy
//! of it, the one it was leased for before its ack timeout passed): the node holds it.
//!
//! A dead copy (taken back, settled, or expired) keeps its bytes and its place in the
//! channel until its turn; it is not evicted when its lifetime ends. That costs the
//! recipient nothing: its stream slot is freed at once (by the withdrawal, purge, expiry or
//! settlement, see [`crate::streams`]); the channel is first in, first out, so a fresh
//! delivery put in earlier would still wait behind the same live deliveries ahead of the
//! dead copy; and the take after the last of those drops the dead copies before the next
//! live one in the same poll, sending none of their bytes, so the room comes back as soon
//! as the live bytes ahead of them are sent. What it holds meanwhile is memory, bounded by
//! the buffer (`limits.receive_buffer_bytes`) and the channel's capacity.
//!
//! # Invariants
//! - [`Outbox::waiting_bytes`] is the payload bytes of the deliveries in the channel:
//!   added when one is put in, taken off when tonic takes it out, sent or dropped.
//! - A take (sent or dropped) that brings the bytes waiting down to half the buffer or
//!   below notifies [`Outbox::room_made`] (a stored permit if no one is waiting), so a
//!   stream waiting for room never misses it.
//! - The ids of the deliveries in the channel are known, with how many copies of each
//!   wait there (`Waiting::queued`: a delivery whose ack timeout passed while it waited
//!   is leased again, onto the same stream, behind its first copy). A message taken back
//!   ([`Dropper::taken_back`]: withdrawn, purged) is marked, and every copy of it is
//!   dropped when its turn comes, not sent: its recipient never sees it. A message
//!   dead-lettered when its last attempt's ack deadline passed ([`Dropper::dead_lettered`])
//!   is marked with that deadline: the copies of that lease and of earlier ones (leased no
//!   later) are dropped, not a copy of a later lease, which only an operator's redrive
//!   makes (its deadline is later): the redriven message is delivered. So is a message
//!   its recipient acknowledged or rejected while a copy waits ([`Dropper::settled`]; the
//!   mark of one taken back wins). The mark is kept
//!   while no copy waits too, since a copy leased before the message was taken back may
//!   still be on its way in (the stream task puts a batch in one delivery at a time, and
//!   learns of a lease only once the store made it); the stream task forgets the marks
//!   without a copy when it holds no delivery still to put in
//!   ([`Outbox::forget_taken_back`]). The stream registry reads the mark too
//!   ([`Dropper::drops`]) when the stream registers its leases, so that a lease
//!   taken back before it was registered holds no slot.
//! - A delivery whose `expires_at` is at or before the clock's now when its turn comes is
//!   dropped, not sent (a message taken back counts as taken back, not expired).
//! - Once the stream is ended (by [`Outbox::end_with`], by the [`Outbox`]'s drop, or
//!   by [`Dropper::end`]), and before the stream's leases are released, the connection's
//!   end gives no delivery more: the status the stream ended with, if any, then the end.
//! - Every delivery taken out is reported once to the channel's [`Report`]: sent (it is
//!   handed to the connection; `trmx_messages_delivered_total` counts it then, not when it
//!   is put in) or dropped, with its reason, or as settled. A delivery still in the
//!   channel when the connection goes, or when the stream ends, is none of these. Reports
//!   are made outside the channel's lock (a drop's takes the stream registry's lock, which
//!   is taken before this one when a message is taken back).

use std::collections::HashMap;
use std::fmt::Debug;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tonic::Status;
use trmx_proto::{Kind, MessageId, pb};

use crate::admin::DropReason;
use crate::clock::Clock;
use crate::store::Millis;

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
    /// The stream ended on the broker's side: no delivery leaves the channel any more.
    ended: AtomicBool,
    /// The status the stream ended with, until the connection's end gives it.
    status: Mutex<Option<Status>>,
}

/// What the channel knows of one message id.
#[derive(Debug, Default)]
struct Queued {
    /// The copies of it waiting in the channel.
    copies: u32,
    /// Why every copy is dropped, not sent, if it is.
    dead: Option<Dead>,
    /// The ack deadline of the lease with which the message was dead-lettered, its
    /// attempts used up: a copy leased with this deadline or an earlier one is dropped,
    /// not sent. One leased later (a redrive's) is sent.
    dead_lettered: Option<Millis>,
}

impl Queued {
    /// Whether this entry says something beyond its copies (a mark to keep).
    fn marked(&self) -> bool {
        self.dead.is_some() || self.dead_lettered.is_some()
    }

    /// Why a copy leased with ack deadline `lease_deadline` is dropped, if it is (a mark
    /// of a message taken back wins, then the dead-lettering, then the settlement).
    fn dead_for(&self, lease_deadline: Millis) -> Option<Dead> {
        let dead_lettered = self
            .dead_lettered
            .filter(|&deadline| lease_deadline <= deadline)
            .map(|_| Dead::Dropped(DropReason::DeadLettered));
        match self.dead {
            Some(Dead::Dropped(reason)) => Some(Dead::Dropped(reason)),
            settled => dead_lettered.or(settled),
        }
    }
}

/// Why every copy of a message is dropped when its turn comes, not sent.
#[derive(Debug, Clone, Copy)]
enum Dead {
    /// Taken back (withdrawn, purged), dead-lettered, or expired as the clock says: its
    /// recipient must never see it. Reported as dropped for this reason.
    Dropped(DropReason),
    /// Acknowledged or rejected by its recipient, which holds it: a copy still waiting
    /// (leased again after its ack timeout) would only reach it again.
    Settled,
}

/// A delivery to put in the channel, with what the channel needs to know of it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The message.
    pub message_id: MessageId,
    /// Its kind (for the metrics).
    pub kind: Kind,
    /// When its lifetime ends: from then on the delivery is dropped, not sent.
    pub expires_at: Millis,
    /// The deadline of the lease that put it in (which lease a drop frees, see
    /// [`crate::streams::Streams::dropped`]).
    pub lease_deadline: Millis,
    /// What the recipient receives.
    pub delivery: pb::Delivery,
}

/// What the connection's end tells as deliveries leave the channel: each delivery taken
/// out is either sent or dropped, and told once.
pub trait Report: Send + Sync + Debug + 'static {
    /// `outgoing` is handed to the connection now.
    fn sent(&self, outgoing: &Outgoing);
    /// `outgoing` was dropped for `reason`, never sent: its recipient will not ack it.
    fn dropped(&self, outgoing: &Outgoing, reason: DropReason);
    /// `outgoing` was dropped, never sent: its recipient acknowledged or rejected the
    /// message meanwhile (another copy of it), so it holds no slot.
    fn settled(&self, outgoing: &Outgoing);
}

impl Waiting {
    fn queued(&self) -> MutexGuard<'_, HashMap<MessageId, Queued>> {
        // (single inserts and removals: a panic leaves the map whole)
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn status(&self) -> MutexGuard<'_, Option<Status>> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends the stream (see [`Waiting::ended`]), with `status` unless it ended already.
    fn end(&self, status: Option<Status>) {
        if !self.ended.swap(true, Ordering::SeqCst)
            && let Some(status) = status
        {
            *self.status() = Some(status);
        }
    }
}

/// A `Receive` stream's channel to its connection, holding at most `capacity`
/// deliveries, with room for `buffer` payload bytes. `clock` is the broker's (expiry is
/// read on it); `report` is told of every delivery taken out, sent or dropped.
pub fn channel(
    capacity: usize,
    buffer: u64,
    clock: Arc<dyn Clock>,
    report: Box<dyn Report>,
) -> (Outbox, Outbound) {
    let (tx, rx) = mpsc::channel(capacity);
    let waiting = Arc::new(Waiting {
        bytes: AtomicU64::new(0),
        low: buffer / 2,
        room_made: Notify::new(),
        queued: Mutex::new(HashMap::new()),
        ended: AtomicBool::new(false),
        status: Mutex::new(None),
    });
    (
        Outbox {
            tx,
            buffer,
            waiting: waiting.clone(),
        },
        Outbound {
            rx,
            waiting,
            clock,
            report,
        },
    )
}

/// The stream task's end: puts deliveries in.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    buffer: u64,
    waiting: Arc<Waiting>,
}

/// The connection's end: the `Receive` response stream tonic sends from.
#[derive(Debug)]
pub struct Outbound {
    rx: mpsc::Receiver<Outgoing>,
    waiting: Arc<Waiting>,
    clock: Arc<dyn Clock>,
    report: Box<dyn Report>,
}

/// The connection's end is gone (the recipient went away).
#[derive(Debug)]
pub struct Gone;

/// Drops a message taken back from a stream's channel (kept by the stream registry).
#[derive(Debug, Clone)]
pub struct Dropper(Arc<Waiting>);

impl Dropper {
    /// `message_id` was taken back (`reason`: withdrawn, purged): every copy of it that
    /// waits in the channel, or is put in until the stream task forgets the mark, is
    /// dropped when its turn comes instead of sent.
    pub fn taken_back(&self, message_id: MessageId, reason: DropReason) {
        self.0.queued().entry(message_id).or_default().dead = Some(Dead::Dropped(reason));
    }

    /// `message_id` was dead-lettered when the ack deadline `deadline` of its last attempt
    /// passed: every copy of a lease with that deadline or an earlier one that waits in
    /// the channel, or is put in until the stream task forgets the mark, is dropped when
    /// its turn comes instead of sent. A copy of a later lease is sent: an operator
    /// redrove the message, and marked by id alone the redriven copy would be dropped too,
    /// unsent, and the message dead-lettered again at its ack deadline.
    pub fn dead_lettered(&self, message_id: MessageId, deadline: Millis) {
        let mut queued = self.0.queued();
        let mark = &mut queued.entry(message_id).or_default().dead_lettered;
        *mark = Some(mark.map_or(deadline, |before| before.max(deadline)));
    }

    /// `message_id` was acknowledged or rejected by the recipient (a final state): if a
    /// copy of it waits in the channel, every copy that waits, or is put in until the
    /// stream task forgets the mark, is dropped when its turn comes instead of sent. A mark
    /// of a message taken back is kept as it is.
    ///
    /// Only where a copy waits: every ack of the participant comes here for each of its
    /// streams, and a stream blocked in a send forgets no mark, so marks of ids without a
    /// copy would pile up, one per ack, while it is blocked. (A copy still on its way in
    /// is then sent, a duplicate the node drops, as before.)
    pub fn settled(&self, message_id: MessageId) {
        if let Some(queued) = self.0.queued().get_mut(&message_id)
            && queued.copies > 0
        {
            queued.dead.get_or_insert(Dead::Settled);
        }
    }

    /// Whether a delivery of `message_id` leased with ack deadline `lease_deadline` is
    /// dropped unsent: its message is marked taken back or settled, or dead-lettered with
    /// that lease or a later one.
    pub fn drops(&self, message_id: &MessageId, lease_deadline: Millis) -> bool {
        self.0
            .queued()
            .get(message_id)
            .is_some_and(|queued| queued.dead_for(lease_deadline).is_some())
    }

    /// The stream ended (before its leases are released): no delivery leaves the channel
    /// any more, and the connection's end gives `status`, unless the stream ended already.
    /// For the stream's guard, which may run before its [`Outbox`] is dropped.
    pub fn end(&self, status: Status) {
        self.0.end(Some(status));
    }
}

impl Outbox {
    /// Puts `outgoing` in, once the channel has room. Cancel-safe: a delivery is either
    /// in the channel and counted, or neither.
    pub async fn send(&self, outgoing: Outgoing) -> Result<(), Gone> {
        let permit = self.tx.reserve().await.map_err(|_| Gone)?;
        self.waiting
            .bytes
            .fetch_add(payload_bytes(&outgoing.delivery), Ordering::Relaxed);
        self.waiting
            .queued()
            .entry(outgoing.message_id)
            .or_default()
            .copies += 1;
        permit.send(outgoing);
        Ok(())
    }

    /// What drops a message taken back from this channel.
    pub fn dropper(&self) -> Dropper {
        Dropper(self.waiting.clone())
    }

    /// Forgets the marks of messages taken back or settled of which no copy waits in the
    /// channel.
    /// Call it only while the stream holds no leased delivery it has still to put in (a
    /// copy leased before its message was taken back must find the mark).
    pub fn forget_taken_back(&self) {
        self.waiting.queued().retain(|_, queued| queued.copies > 0);
    }

    /// Ends the stream with `status`: no delivery waiting leaves the channel any more
    /// (the stream's leases are released next), the connection's end gives `status`.
    pub fn end_with(&self, status: Status) {
        self.waiting.end(Some(status));
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

impl Drop for Outbox {
    /// The stream task let go of its end (also by a panic, or the runtime shutting
    /// down): what still waits is not sent (see the module doc). Dropping `tx` after this
    /// wakes the connection's end.
    fn drop(&mut self) {
        self.waiting.end(None);
    }
}

impl Stream for Outbound {
    type Item = Result<pb::Delivery, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.waiting.ended.load(Ordering::SeqCst) {
                // (the status once, then the end)
                return Poll::Ready(self.waiting.status().take().map(Err));
            }
            let outgoing = match self.rx.poll_recv(cx) {
                Poll::Ready(Some(outgoing)) => outgoing,
                // (the stream task's end is gone: its drop ended the stream first)
                Poll::Ready(None) => return Poll::Ready(self.waiting.status().take().map(Err)),
                Poll::Pending => return Poll::Pending,
            };
            let size = payload_bytes(&outgoing.delivery);
            let before = self.waiting.bytes.fetch_sub(size, Ordering::Relaxed);
            if before - size <= self.waiting.low && before > self.waiting.low {
                self.waiting.room_made.notify_one();
            }
            let id = outgoing.message_id;
            let dead = {
                let mut queued = self.waiting.queued();
                match queued.get_mut(&id) {
                    Some(entry) => {
                        entry.copies = entry.copies.saturating_sub(1);
                        let dead = entry.dead_for(outgoing.lease_deadline);
                        // (a mark stays: another copy may still come, see the module doc)
                        if entry.copies == 0 && !entry.marked() {
                            queued.remove(&id);
                        }
                        dead
                    }
                    None => None,
                }
            };
            let dead = dead.or_else(|| {
                (outgoing.expires_at <= self.clock.now_millis())
                    .then_some(Dead::Dropped(DropReason::Expired))
            });
            // (the channel's lock is released: see the module doc)
            match dead {
                None => {
                    self.report.sent(&outgoing);
                    return Poll::Ready(Some(Ok(outgoing.delivery)));
                }
                Some(Dead::Dropped(reason)) => self.report.dropped(&outgoing, reason),
                Some(Dead::Settled) => self.report.settled(&outgoing),
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

/// A channel whose clock is the system's and whose drops are told no one (for the tests of
/// other modules that need a [`Dropper`]).
#[cfg(test)]
pub(crate) fn unreported(capacity: usize, buffer: u64) -> (Outbox, Outbound) {
    #[derive(Debug)]
    struct Nobody;
    impl Report for Nobody {
        fn sent(&self, _: &Outgoing) {}
        fn dropped(&self, _: &Outgoing, _: DropReason) {}
        fn settled(&self, _: &Outgoing) {}
    }
    channel(
        capacity,
        buffer,
        Arc::new(crate::clock::SystemClock),
        Box::new(Nobody),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::Duration;
    use tokio_stream::StreamExt;

    /// When the tests' clock stands.
    const NOW: Millis = 1_800_000_000_000;
    /// A lifetime that never ends in these tests.
    const LATER: Millis = NOW + 86_400_000;

    /// What a channel reported, in order: the deliveries dropped, and those sent.
    #[derive(Debug, Default, Clone)]
    struct Reported {
        dropped: Arc<Mutex<Vec<(MessageId, DropReason)>>>,
        sent: Arc<Mutex<Vec<MessageId>>>,
        settled: Arc<Mutex<Vec<MessageId>>>,
    }

    impl Report for Reported {
        fn sent(&self, outgoing: &Outgoing) {
            self.sent().push(outgoing.message_id);
        }

        fn dropped(&self, outgoing: &Outgoing, reason: DropReason) {
            self.drops().push((outgoing.message_id, reason));
        }

        fn settled(&self, outgoing: &Outgoing) {
            self.settled.lock().unwrap().push(outgoing.message_id);
        }
    }

    impl Reported {
        fn drops(&self) -> MutexGuard<'_, Vec<(MessageId, DropReason)>> {
            self.dropped.lock().unwrap()
        }

        fn sent(&self) -> MutexGuard<'_, Vec<MessageId>> {
            self.sent.lock().unwrap()
        }
    }

    /// A channel on a manual clock standing at [`NOW`], with what it reports.
    fn test_channel(capacity: usize, buffer: u64) -> (Outbox, Outbound, ManualClock, Reported) {
        let clock = ManualClock::at_millis(NOW);
        let reported = Reported::default();
        let (outbox, outbound) = channel(
            capacity,
            buffer,
            Arc::new(clock.clone()),
            Box::new(reported.clone()),
        );
        (outbox, outbound, clock, reported)
    }

    /// A delivery of a new message with `size` payload bytes, alive until `expires_at`.
    fn outgoing(size: usize, expires_at: Millis) -> Outgoing {
        outgoing_of(MessageId::new_v7(), size, expires_at)
    }

    fn outgoing_of(id: MessageId, size: usize, expires_at: Millis) -> Outgoing {
        Outgoing {
            message_id: id,
            kind: Kind::Referral,
            expires_at,
            lease_deadline: NOW + 60_000,
            delivery: pb::Delivery {
                envelope: Some(pb::Envelope {
                    message_id: id.to_string(),
                    payload: vec![1; size],
                    ..pb::Envelope::default()
                }),
                attempt: 1,
            },
        }
    }

    #[tokio::test]
    async fn room_comes_back_when_half_the_buffer_is_sent() {
        let (outbox, mut outbound, _, _) = test_channel(8, 200);
        assert_eq!(outbox.room(), 200);
        for size in [60, 60, 60] {
            outbox.send(outgoing(size, LATER)).await.unwrap();
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
        let (outbox, mut outbound, _, _) = test_channel(8, 100);
        outbox.send(outgoing(80, LATER)).await.unwrap();
        outbound.next().await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(5), outbox.room_made())
            .await
            .expect("the take made room while no one waited");
    }

    #[tokio::test]
    async fn a_message_larger_than_the_buffer_leaves_room_for_one_when_sent() {
        let (outbox, mut outbound, _, _) = test_channel(8, 100);
        outbox.send(outgoing(500, LATER)).await.unwrap();
        assert_eq!(outbox.room(), 0);
        outbound.next().await.unwrap().unwrap();
        assert_eq!(outbox.room(), 100);
    }

    #[tokio::test]
    async fn a_send_cancelled_while_the_channel_is_full_counts_nothing() {
        let (outbox, _outbound, _, _) = test_channel(1, 1 << 20);
        outbox.send(outgoing(10, LATER)).await.unwrap();
        let blocked = tokio::time::timeout(
            Duration::from_millis(20),
            outbox.send(outgoing(1000, LATER)),
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
        outbox.send(outgoing_of(id, 10, LATER)).await.unwrap();
    }

    #[tokio::test]
    async fn a_message_withdrawn_while_it_waits_is_dropped_not_sent() {
        let (outbox, mut outbound, _, reported) = test_channel(8, 1 << 20);
        let dropper = outbox.dropper();
        let [a, b, c] = [(); 3].map(|()| MessageId::new_v7());
        for id in [a, b, c] {
            send(&outbox, id).await;
        }
        let first = outbound.next().await.unwrap().unwrap();
        assert_eq!(first.envelope.unwrap().message_id, a.to_string());
        // sent already: nothing to drop
        dropper.taken_back(a, DropReason::Withdrawn);
        dropper.taken_back(b, DropReason::Withdrawn);
        assert_eq!(taken(&mut outbound).await, [c]);
        assert_eq!(outbox.waiting_bytes(), 0);
        assert_eq!(*reported.drops(), [(b, DropReason::Withdrawn)]);
        // the marks are kept until the stream task forgets them
        outbox.forget_taken_back();
        assert!(outbox.waiting.queued().is_empty(), "a mark is kept");
    }

    /// A delivery whose ack timeout passed while it waited is leased again onto the same
    /// stream: both copies of a message taken back are dropped, and so is one the stream
    /// task puts in after the mark (leased before, still on its way in).
    #[tokio::test]
    async fn every_copy_of_a_message_taken_back_is_dropped() {
        let (outbox, mut outbound, _, reported) = test_channel(8, 1 << 20);
        let dropper = outbox.dropper();
        let [m, other] = [(); 2].map(|()| MessageId::new_v7());
        send(&outbox, m).await;
        send(&outbox, other).await;
        send(&outbox, m).await;
        dropper.taken_back(m, DropReason::Purged);
        assert_eq!(taken(&mut outbound).await, [other]);
        send(&outbox, m).await;
        assert_eq!(taken(&mut outbound).await, []);
        assert_eq!(outbox.waiting_bytes(), 0);
        assert_eq!(*reported.drops(), [(m, DropReason::Purged); 3]);

        // a message not taken back is sent each time it comes
        let again = MessageId::new_v7();
        send(&outbox, again).await;
        send(&outbox, again).await;
        assert_eq!(taken(&mut outbound).await, [again, again]);
        send(&outbox, again).await;
        assert_eq!(taken(&mut outbound).await, [again]);
    }

    /// A message its recipient acknowledged (another copy of it, leased before its ack
    /// timeout passed) has every copy still waiting dropped, reported as settled, not sent,
    /// also one put in after the mark; a mark of a message taken back is kept as it was.
    #[tokio::test]
    async fn every_copy_of_a_settled_message_is_dropped() {
        let (outbox, mut outbound, _, reported) = test_channel(8, 1 << 20);
        let dropper = outbox.dropper();
        let [m, purged, other] = [(); 3].map(|()| MessageId::new_v7());
        for id in [m, other, purged] {
            send(&outbox, id).await;
        }
        dropper.settled(m);
        dropper.taken_back(purged, DropReason::Purged);
        dropper.settled(purged);
        send(&outbox, m).await;
        assert_eq!(taken(&mut outbound).await, [other]);
        assert_eq!(*reported.settled.lock().unwrap(), [m, m]);
        assert_eq!(*reported.drops(), [(purged, DropReason::Purged)]);
        assert_eq!(outbox.waiting_bytes(), 0);
        assert!(dropper.drops(&m, NOW), "the mark is kept until forgotten");
        outbox.forget_taken_back();
        assert!(outbox.waiting.queued().is_empty());
        // no copy waiting: no mark (a stream blocked in a send would collect one per ack)
        dropper.settled(other);
        assert!(outbox.waiting.queued().is_empty());
    }

    /// A message dead-lettered at its last attempt's ack deadline has the copies of that
    /// lease and of earlier ones dropped, also one put in after the mark; a copy of a later
    /// lease (an operator redrove the message meanwhile) is sent, and a lease with it
    /// registered (see [`Dropper::drops`]).
    #[tokio::test]
    async fn a_dead_lettered_message_drops_the_copies_of_its_leases_not_a_redrives() {
        let (outbox, mut outbound, _, reported) = test_channel(8, 1 << 20);
        let dropper = outbox.dropper();
        let m = MessageId::new_v7();
        let leased = |deadline| Outgoing {
            lease_deadline: deadline,
            ..outgoing_of(m, 10, LATER)
        };
        let last = NOW + 60_000;
        outbox.send(leased(NOW + 30_000)).await.unwrap();
        outbox.send(leased(last)).await.unwrap();
        dropper.dead_lettered(m, last);
        // (the last lease's copy, still on its way in, and a redrive's)
        outbox.send(leased(last)).await.unwrap();
        outbox.send(leased(last + 1)).await.unwrap();
        assert!(dropper.drops(&m, last) && !dropper.drops(&m, last + 1));
        assert_eq!(taken(&mut outbound).await, [m]);
        assert_eq!(*reported.drops(), [(m, DropReason::DeadLettered); 3]);
        assert_eq!(outbox.waiting_bytes(), 0);
    }

    /// Forgetting the marks keeps those of messages with a copy waiting.
    #[tokio::test]
    async fn forgetting_keeps_the_marks_of_waiting_copies() {
        let (outbox, mut outbound, _, _) = test_channel(8, 1 << 20);
        let dropper = outbox.dropper();
        let [m, gone] = [(); 2].map(|()| MessageId::new_v7());
        send(&outbox, m).await;
        dropper.taken_back(m, DropReason::Withdrawn);
        dropper.taken_back(gone, DropReason::Withdrawn);
        outbox.forget_taken_back();
        assert_eq!(outbox.waiting.queued().len(), 1);
        assert_eq!(taken(&mut outbound).await, []);
    }

    /// A delivery whose message's lifetime ends while it waits (on the broker's clock, as
    /// the store expires it) is dropped when its turn comes, not sent; the bytes, the room
    /// and the copies come out as for one sent, and the drop is reported.
    #[tokio::test]
    async fn a_delivery_whose_lifetime_ends_while_it_waits_is_dropped_not_sent() {
        let (outbox, mut outbound, clock, reported) = test_channel(8, 200);
        let [a, short, exact, b] = [(); 4].map(|()| MessageId::new_v7());
        outbox.send(outgoing_of(a, 60, NOW + 100)).await.unwrap();
        outbox.send(outgoing_of(short, 60, NOW + 50)).await.unwrap();
        outbox.send(outgoing_of(exact, 60, NOW + 60)).await.unwrap();
        outbox.send(outgoing_of(b, 10, LATER)).await.unwrap();
        assert_eq!((outbox.waiting_bytes(), outbox.room()), (190, 0));
        let room_made = outbox.room_made();
        tokio::pin!(room_made);

        // before: sent, though it expires while the others wait
        assert_eq!(taken_one(&mut outbound).await, a);
        // `short` passed its expiry, `exact` stands at it: both dropped
        clock.advance(Duration::from_millis(60));
        assert_eq!(taken(&mut outbound).await, [b]);
        assert_eq!(
            *reported.drops(),
            [(short, DropReason::Expired), (exact, DropReason::Expired)]
        );
        assert_eq!((outbox.waiting_bytes(), outbox.room()), (0, 200));
        room_made.await;
        assert!(
            outbox.waiting.queued().is_empty(),
            "a copy is still counted"
        );
    }

    /// A message both taken back and expired counts as taken back.
    #[tokio::test]
    async fn a_message_taken_back_and_expired_is_dropped_as_taken_back() {
        let (outbox, mut outbound, clock, reported) = test_channel(8, 1 << 20);
        let m = MessageId::new_v7();
        outbox.send(outgoing_of(m, 10, NOW + 10)).await.unwrap();
        outbox.dropper().taken_back(m, DropReason::Withdrawn);
        clock.advance(Duration::from_secs(1));
        assert_eq!(taken(&mut outbound).await, []);
        assert_eq!(*reported.drops(), [(m, DropReason::Withdrawn)]);
    }

    /// A delivery counts as sent when tonic takes it for the connection, not when it is
    /// put in; one dropped is not sent, and one still waiting when the connection goes is
    /// neither.
    #[tokio::test]
    async fn a_delivery_is_reported_sent_when_taken_for_the_connection() {
        let (outbox, mut outbound, clock, reported) = test_channel(8, 1 << 20);
        let [a, withdrawn, expired, b, left] = [(); 5].map(|()| MessageId::new_v7());
        send(&outbox, a).await;
        send(&outbox, withdrawn).await;
        outbox
            .send(outgoing_of(expired, 10, NOW + 1))
            .await
            .unwrap();
        send(&outbox, b).await;
        assert!(reported.sent().is_empty(), "counted when put in");
        assert_eq!(taken_one(&mut outbound).await, a);
        assert_eq!(*reported.sent(), [a]);

        outbox
            .dropper()
            .taken_back(withdrawn, DropReason::Withdrawn);
        clock.advance(Duration::from_millis(1));
        assert_eq!(taken(&mut outbound).await, [b]);
        assert_eq!(*reported.sent(), [a, b]);
        assert_eq!(
            *reported.drops(),
            [
                (withdrawn, DropReason::Withdrawn),
                (expired, DropReason::Expired)
            ]
        );

        send(&outbox, left).await;
        drop(outbound);
        assert_eq!(*reported.sent(), [a, b]);
        assert_eq!(reported.drops().len(), 2);
    }

    async fn taken_one(outbound: &mut Outbound) -> MessageId {
        let delivery = outbound.next().await.unwrap().unwrap();
        MessageId::parse(&delivery.envelope.unwrap().message_id).unwrap()
    }

    /// A stream ended on the broker's side sends nothing more of what waits: the status
    /// it ended with, then the end (its leases are released next). Its task's end dropped
    /// without a status (a panic, the runtime going) ends it all the same.
    #[tokio::test]
    async fn a_stream_ended_sends_its_status_and_nothing_of_what_waits() {
        let (outbox, mut outbound, _, reported) = test_channel(8, 1 << 20);
        let [a, b, c] = [(); 3].map(|()| MessageId::new_v7());
        for id in [a, b, c] {
            send(&outbox, id).await;
        }
        assert_eq!(taken_one(&mut outbound).await, a);
        outbox.end_with(Status::unavailable("the broker is shutting down"));
        // (a second end keeps the first status)
        outbox.dropper().end(Status::internal("later"));
        drop(outbox);
        let end = outbound.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable, "{end}");
        assert!(outbound.next().await.is_none());
        assert_eq!(*reported.sent(), [a]);

        let (outbox, mut outbound, _, _) = test_channel(8, 1 << 20);
        send(&outbox, a).await;
        drop(outbox);
        assert!(outbound.next().await.is_none());
    }

    #[tokio::test]
    async fn a_send_after_the_connection_went_away_fails() {
        let (outbox, outbound, _, _) = test_channel(1, 1 << 20);
        drop(outbound);
        assert!(outbox.send(outgoing(1, LATER)).await.is_err());
        outbox.closed().await;
    }

    /// Polls `fut` once.
    async fn poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
    }
}
