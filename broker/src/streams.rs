//! The open `Receive` streams of this broker process: which participant each
//! belongs to, which of its leases are still unacknowledged, and the
//! per-participant [`Notify`] that wakes them when there is new work.
//!
//! # Invariants
//! - A participant has at most `max_per_participant` registered streams.
//! - A stream's in-flight set holds only ids the store leased to that stream;
//!   an entry leaves on ack, reject, withdraw, purge, when its delivery is dropped
//!   from the stream's channel unsent (see [`crate::outbound`]), when its message
//!   expires (`TickReport::expired_in_flight`) or is dead-lettered for its attempts
//!   (`TickReport::dead_lettered_in_flight`), or when its ack deadline passes (the store then owns its redelivery), so a stream never stalls
//!   at its `max_in_flight`. A lease of a message taken back (withdrawn, purged)
//!   between the store's lease and its registration here never enters it: the
//!   withdrawal or purge came too early to free its slot.
//! - A message id names one message of a participant, so the in-flight sets, the
//!   channels' marks and every clean-up here match by id alone: the store refuses a
//!   message whose id another sender's message to the same recipient has, as long as
//!   that one's record is kept (`SubmitOutcome::IdTaken`; the recipient acks and
//!   rejects by id), and a receipt's id is a UUIDv5, which no sender may submit.
//!   (Two receipts of one participant share an id only when its message id was used
//!   again after the first message's metadata went, by when the first receipt was
//!   settled: acknowledged, or expired with that metadata.)
//! - Lock order: this registry's lock, then a stream channel's (a [`Dropper`]'s);
//!   a channel reports its drops with its own lock released.
//! - Locks are std mutexes held only for map updates, never across `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, watch};
use trmx_proto::{MessageId, ParticipantId};

use crate::admin::DropReason;
use crate::outbound::Dropper;
use crate::store::{Millis, StreamId};

/// One unacknowledged delivery on a stream.
#[derive(Debug, Clone)]
struct InFlight {
    /// Sender of the message (None for receipts), to wake it when its receipt is queued.
    sender: Option<ParticipantId>,
    /// When the store stops holding the lease.
    deadline: Millis,
}

#[derive(Debug)]
struct StreamState {
    in_flight: HashMap<MessageId, InFlight>,
    /// Set to true to make the stream end.
    close: watch::Sender<bool>,
    /// Drops a message taken back (withdrawn, purged) still waiting to be sent.
    dropper: Dropper,
}

#[derive(Debug, Default)]
struct ParticipantStreams {
    notify: Arc<Notify>,
    streams: HashMap<StreamId, StreamState>,
}

/// Registry of open streams. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Streams {
    next_id: AtomicU64,
    max_per_participant: usize,
    inner: Mutex<HashMap<ParticipantId, ParticipantStreams>>,
}

/// What [`Streams::settled`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Senders of the settled messages known to a stream here (receipts excluded).
    pub senders: Vec<ParticipantId>,
    /// Whether some id was not in flight on any stream here (leased before a
    /// restart, or already timed out): its sender is unknown.
    pub unknown: bool,
}

/// A delivery handed to a stream, as [`Streams::leased`] records it.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The message.
    pub message_id: MessageId,
    /// Its sender (None for receipts).
    pub sender: Option<ParticipantId>,
    /// When the store stops holding the lease.
    pub deadline: Millis,
}

/// What a stream needs to run: its id, the participant's wake-up and its close signal.
#[derive(Debug)]
pub struct StreamHandle {
    /// The stream's id (the store's lease owner).
    pub id: StreamId,
    /// The participant.
    pub participant: ParticipantId,
    /// Notified when the participant may have new due messages or free slots.
    pub notify: Arc<Notify>,
    /// Becomes `true` when the stream must end (its participant left the registry,
    /// shutdown).
    pub close: watch::Receiver<bool>,
}

impl Streams {
    /// An empty registry. Stream ids count from `first_id`; they may repeat those of
    /// an earlier run on the same store, since `BrokerStore::recover` releases every
    /// lease of that run at start.
    pub fn new(max_per_participant: usize, first_id: u64) -> Self {
        Self {
            next_id: AtomicU64::new(first_id),
            max_per_participant,
            inner: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ParticipantId, ParticipantStreams>> {
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Registers a new stream of `participant`, sending through the channel `dropper`
    /// drops withdrawn messages from; `None` if it already has the maximum number of
    /// streams.
    pub fn open(&self, participant: &ParticipantId, dropper: Dropper) -> Option<StreamHandle> {
        let mut inner = self.lock();
        let entry = inner.entry(participant.clone()).or_default();
        if entry.streams.len() >= self.max_per_participant {
            return None;
        }
        let id = StreamId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (close_tx, close_rx) = watch::channel(false);
        entry.streams.insert(
            id,
            StreamState {
                in_flight: HashMap::new(),
                close: close_tx,
                dropper,
            },
        );
        Some(StreamHandle {
            id,
            participant: participant.clone(),
            notify: entry.notify.clone(),
            close: close_rx,
        })
    }

    /// Unregisters a stream (after its leases were released).
    pub fn remove(&self, participant: &ParticipantId, id: StreamId) {
        let mut inner = self.lock();
        if let Some(entry) = inner.get_mut(participant) {
            entry.streams.remove(&id);
        }
    }

    /// Number of open streams of `participant`.
    pub fn count(&self, participant: &ParticipantId) -> usize {
        self.lock().get(participant).map_or(0, |p| p.streams.len())
    }

    /// Number of open streams of every participant.
    pub fn total(&self) -> usize {
        self.lock().values().map(|p| p.streams.len()).sum()
    }

    /// Free delivery slots of a stream at `now`: `max_in_flight` minus the
    /// leases whose deadline has not passed. Drops the expired ones.
    pub fn free_slots(
        &self,
        participant: &ParticipantId,
        id: StreamId,
        max_in_flight: usize,
        now: Millis,
    ) -> usize {
        let mut inner = self.lock();
        let Some(stream) = inner
            .get_mut(participant)
            .and_then(|p| p.streams.get_mut(&id))
        else {
            return 0;
        };
        stream.in_flight.retain(|_, lease| lease.deadline > now);
        max_in_flight.saturating_sub(stream.in_flight.len())
    }

    /// Records leases handed to a stream, but for those of messages taken back
    /// (withdrawn, purged) since the store made them: [`Streams::withdrawn`] and
    /// [`Streams::drop_waiting`] found those in flight on no stream, so freed no slot, and
    /// their deliveries are dropped from the channel unsent, never acked. Registered, each
    /// would hold a slot until its turn came in the channel (or its ack deadline).
    pub fn leased(
        &self,
        participant: &ParticipantId,
        id: StreamId,
        leases: impl IntoIterator<Item = Lease>,
    ) {
        let mut inner = self.lock();
        if let Some(stream) = inner
            .get_mut(participant)
            .and_then(|p| p.streams.get_mut(&id))
        {
            for lease in leases {
                // (the mark outlives this call: the stream task forgets marks only when
                // every lease it holds is in its channel; see `crate::outbound`)
                if stream.dropper.drops(&lease.message_id, lease.deadline) {
                    continue;
                }
                stream.in_flight.insert(
                    lease.message_id,
                    InFlight {
                        sender: lease.sender,
                        deadline: lease.deadline,
                    },
                );
            }
        }
    }

    /// Removes `ids` from the streams of `participant` (acknowledged or
    /// rejected), from every stream that holds one, drops their copies still waiting in
    /// the streams' channels, and wakes those streams. Returns the senders of the removed
    /// messages (whose receipts are now queued).
    pub fn settled(&self, participant: &ParticipantId, ids: &[MessageId]) -> Settled {
        let mut inner = self.lock();
        let mut settled = Settled::default();
        let Some(entry) = inner.get_mut(participant) else {
            settled.unknown = !ids.is_empty();
            return settled;
        };
        for id in ids {
            // Every stream's entry goes, not only the first found: one whose ack deadline
            // passed may still be on a stream that has not looked since (blocked in a send),
            // and the message's live lease on another would hold its slot until its deadline.
            // Its copies still waiting in a channel (leased again after the ack timeout)
            // are dropped: the recipient holds the message.
            let mut found = None;
            for stream in entry.streams.values_mut() {
                let removed = stream.in_flight.remove(id);
                found = found.or(removed);
                stream.dropper.settled(*id);
            }
            match found {
                Some(lease) => settled.senders.extend(lease.sender),
                None => settled.unknown = true,
            }
        }
        entry.notify.notify_waiters();
        settled
    }

    /// Drops message `id` from the channels of `participant`'s streams where it waits
    /// to be sent, or comes to wait (purged by an operator: the recipient must not get
    /// it). Every stream of the recipient is told, not only one holding the message in
    /// flight: a copy whose ack deadline passed while it waited is in flight on none, and
    /// a lease the stream has not registered yet on none either. (Message ids are unique
    /// per recipient: the store refuses a second sender's message under a used id.)
    pub fn drop_waiting(&self, participant: &ParticipantId, id: &MessageId) {
        let inner = self.lock();
        if let Some(entry) = inner.get(participant) {
            for stream in entry.streams.values() {
                stream.dropper.taken_back(*id, DropReason::Purged);
            }
        }
    }

    /// Removes `ids` from the streams of `participant` after the store said they are
    /// not in flight to it (an ack or a reject answered `NOT_FOUND`: the message
    /// expired, was withdrawn or purged meanwhile), so that their slots count against
    /// `max_in_flight` no longer. Wakes those streams only if one held such an id: a
    /// client acking unknown ids over and over sets no stream leasing.
    pub fn not_in_flight(&self, participant: &ParticipantId, ids: &[MessageId]) {
        if ids.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let Some(entry) = inner.get_mut(participant) else {
            return;
        };
        let mut freed = false;
        for id in ids {
            for stream in entry.streams.values_mut() {
                freed |= stream.in_flight.remove(id).is_some();
            }
        }
        if freed {
            entry.notify.notify_waiters();
        }
    }

    /// A delivery of message `id` leased with `deadline` was dropped from a channel of
    /// `participant`'s streams, never sent (its lifetime ended, or it was taken back, while
    /// it waited): frees the slot of that lease, if a stream still holds it, and wakes the
    /// streams. Its recipient will never ack it, so the slot would otherwise be held until
    /// the deadline. A later lease of the message (after the ack timeout, or a redrive)
    /// has another deadline and keeps its slot. Also for a delivery sent whose message
    /// expired: the broker holds it no longer, whether the node acks it or not.
    pub fn dropped(&self, participant: &ParticipantId, id: &MessageId, deadline: Millis) {
        let mut inner = self.lock();
        let Some(entry) = inner.get_mut(participant) else {
            return;
        };
        let mut freed = false;
        for stream in entry.streams.values_mut() {
            if stream
                .in_flight
                .get(id)
                .is_some_and(|lease| lease.deadline == deadline)
            {
                stream.in_flight.remove(id);
                freed = true;
            }
        }
        if freed {
            entry.notify.notify_waiters();
        }
    }

    /// The ack deadline `deadline` of `participant`'s delivery of message `id` passed with
    /// its attempts used up: the store dead-lettered it and reported it to its sender as not
    /// delivered. Drops its copies from the channels of the participant's streams where they
    /// wait, or come to wait, to be sent (a slow link), and frees that lease's slot, as
    /// [`Streams::dropped`] does. A copy already handed to the connection is out of reach:
    /// the node's ack of it is answered `ACK_RESULT_NOT_FOUND`. A copy of a later lease (an
    /// operator redrove the message since) is sent as any other.
    pub fn dead_lettered(&self, participant: &ParticipantId, id: &MessageId, deadline: Millis) {
        {
            let inner = self.lock();
            if let Some(entry) = inner.get(participant) {
                for stream in entry.streams.values() {
                    stream.dropper.dead_lettered(*id, deadline);
                }
            }
        }
        self.dropped(participant, id, deadline);
    }

    /// `sender` withdrew its message `id` to `recipient`: frees its slot on whichever
    /// stream of the recipient holds it, and drops it from their channels where it waits,
    /// or comes to wait, to be sent (see [`Streams::drop_waiting`]).
    pub fn withdrawn(&self, recipient: &ParticipantId, sender: &ParticipantId, id: &MessageId) {
        let mut inner = self.lock();
        let Some(entry) = inner.get_mut(recipient) else {
            return;
        };
        let mut hit = false;
        for stream in entry.streams.values_mut() {
            let own = stream
                .in_flight
                .get(id)
                .is_some_and(|lease| lease.sender.as_ref() == Some(sender));
            if own {
                stream.in_flight.remove(id);
                hit = true;
            }
            stream.dropper.taken_back(*id, DropReason::Withdrawn);
        }
        if hit {
            entry.notify.notify_waiters();
        }
    }

    /// Wakes the streams of `participant` (new message, released leases, ...).
    pub fn wake(&self, participant: &ParticipantId) {
        let mut inner = self.lock();
        inner
            .entry(participant.clone())
            .or_default()
            .notify
            .notify_waiters();
    }

    /// Wakes every stream.
    pub fn wake_all(&self) {
        for entry in self.lock().values() {
            entry.notify.notify_waiters();
        }
    }

    /// The participant's wake-up, created if needed (a stream takes it before
    /// looking for work so that no wake-up is lost).
    pub fn notify_of(&self, participant: &ParticipantId) -> Arc<Notify> {
        self.lock()
            .entry(participant.clone())
            .or_default()
            .notify
            .clone()
    }

    /// Tells the streams of `participant` to end (it left the registry).
    pub fn close_participant(&self, participant: &ParticipantId) {
        if let Some(entry) = self.lock().get(participant) {
            for stream in entry.streams.values() {
                let _ = stream.close.send(true);
            }
        }
    }

    /// Tells every stream to end (shutdown).
    pub fn close_all(&self) {
        for entry in self.lock().values() {
            for stream in entry.streams.values() {
                let _ = stream.close.send(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ParticipantId {
        ParticipantId::parse(s).unwrap()
    }

    fn dropper() -> Dropper {
        crate::outbound::unreported(1, 1 << 20).0.dropper()
    }

    #[test]
    fn streams_per_participant_are_bounded() {
        let streams = Streams::new(2, 1);
        let p = id("NL-NRM");
        let a = streams.open(&p, dropper()).unwrap();
        let _b = streams.open(&p, dropper()).unwrap();
        assert!(streams.open(&p, dropper()).is_none());
        assert!(streams.open(&id("BE-PAYOKE"), dropper()).is_some());
        streams.remove(&p, a.id);
        assert!(streams.open(&p, dropper()).is_some());
    }

    #[test]
    fn slots_free_on_settle_and_on_deadline() {
        let streams = Streams::new(4, 1);
        let p = id("NL-NRM");
        let s = streams.open(&p, dropper()).unwrap();
        let m1 = MessageId::new_v7();
        let m2 = MessageId::new_v7();
        let sender = id("BE-PAYOKE");
        let lease = |message_id, sender, deadline| Lease {
            message_id,
            sender,
            deadline,
        };
        streams.leased(
            &p,
            s.id,
            [lease(m1, Some(sender.clone()), 100), lease(m2, None, 200)],
        );
        assert_eq!(streams.free_slots(&p, s.id, 2, 50), 0);
        let settled = streams.settled(&p, &[m1]);
        assert_eq!(settled.senders, vec![sender]);
        // settled again: found on no stream
        let again = streams.settled(&p, &[m1]);
        assert!(again.unknown && again.senders.is_empty());
        assert!(!settled.unknown);
        assert_eq!(streams.free_slots(&p, s.id, 2, 50), 1);
        assert_eq!(streams.free_slots(&p, s.id, 2, 200), 2);
        assert!(streams.settled(&p, &[m2]).unknown);
    }

    /// A delivery dropped from the channel unsent frees the slot of the lease that put it
    /// in, not that of a later lease of the message (another deadline).
    #[test]
    fn a_dropped_delivery_frees_the_slot_of_its_own_lease_only() {
        let streams = Streams::new(4, 1);
        let p = id("NL-NRM");
        let s = streams.open(&p, dropper()).unwrap();
        let m = MessageId::new_v7();
        let lease = |deadline| Lease {
            message_id: m,
            sender: Some(id("BE-PAYOKE")),
            deadline,
        };
        streams.leased(&p, s.id, [lease(200)]);
        // a first copy's, leased before with deadline 100: not this lease
        streams.dropped(&p, &m, 100);
        assert_eq!(streams.free_slots(&p, s.id, 2, 50), 1);
        let woken = s.notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        streams.dropped(&p, &m, 200);
        assert_eq!(streams.free_slots(&p, s.id, 2, 50), 2);
        assert!(
            ready_at_once(woken.as_mut()),
            "the stream is woken to lease again"
        );
    }

    /// The store leases messages to a stream; before the stream task registers the
    /// leases (`leased`), one is withdrawn by its sender and another purged by an operator.
    /// Those found the message in flight on no stream, so they freed no slot; their
    /// deliveries will be dropped from the channel unsent, and never acked. Registered all
    /// the same, each held a slot until the ack deadline, or, since the channel reports its
    /// drops, until its turn came behind a slow link. They take none.
    #[test]
    fn a_lease_taken_back_before_the_stream_registers_it_takes_no_slot() {
        let streams = Streams::new(4, 1);
        let (recipient, sender) = (id("BE-PAYOKE"), id("NL-NRM"));
        let s = streams.open(&recipient, dropper()).unwrap();
        let [withdrawn, purged, kept] = [(); 3].map(|()| MessageId::new_v7());
        let lease = |message_id| Lease {
            message_id,
            sender: Some(sender.clone()),
            deadline: 100,
        };
        // (the store leased all three: now the withdrawal and the purge)
        streams.withdrawn(&recipient, &sender, &withdrawn);
        streams.drop_waiting(&recipient, &purged);
        streams.leased(&recipient, s.id, [withdrawn, purged, kept].map(lease));
        assert_eq!(streams.free_slots(&recipient, s.id, 3, 50), 2);
        // the one kept is in flight as ever
        assert_eq!(streams.settled(&recipient, &[kept]).senders, [sender]);
        assert_eq!(streams.free_slots(&recipient, s.id, 3, 50), 3);
    }

    /// A delivery that expired in flight gives its slot back once: the expiry's release,
    /// the late ack's `NOT_FOUND`, the ack deadline and a repeated release all free the
    /// same entry, never a second slot, nor the slot of a later lease of the message (a
    /// redrive's, with another deadline), so a stream never leases past `max_in_flight`.
    #[test]
    fn an_expired_delivery_frees_its_slot_once() {
        let streams = Streams::new(4, 1);
        let p = id("NL-NRM");
        let s = streams.open(&p, dropper()).unwrap();
        let [expired, other] = [(); 2].map(|()| MessageId::new_v7());
        let lease = |message_id, deadline| Lease {
            message_id,
            sender: Some(id("BE-PAYOKE")),
            deadline,
        };
        streams.leased(&p, s.id, [lease(expired, 100), lease(other, 100)]);
        assert_eq!(streams.free_slots(&p, s.id, 2, 50), 0);
        // the expiry, then the late ack answered NOT_FOUND, then the expiry again
        streams.dropped(&p, &expired, 100);
        assert_eq!(streams.free_slots(&p, s.id, 2, 50), 1);
        streams.not_in_flight(&p, &[expired]);
        streams.dropped(&p, &expired, 100);
        assert_eq!(streams.free_slots(&p, s.id, 2, 50), 1);
        // redriven and leased again: a stale report of the first lease keeps its slot
        streams.leased(&p, s.id, [lease(expired, 300)]);
        assert_eq!(streams.free_slots(&p, s.id, 2, 60), 0);
        streams.dropped(&p, &expired, 100);
        assert_eq!(streams.free_slots(&p, s.id, 2, 60), 0);
        // past the first deadline only `other` is freed
        assert_eq!(streams.free_slots(&p, s.id, 2, 100), 1);
        assert_eq!(streams.free_slots(&p, s.id, 2, 300), 2);
    }

    /// A delivery whose ack timeout passed while its stream did not look (blocked in a send
    /// behind a slow link) keeps its entry there until that stream looks again; leased
    /// again to another stream of the participant and acked, it frees the slot of the new
    /// lease, not only the stale entry: that stream leases again at once, rather than after
    /// the ack deadline of a delivery its node already acked. (Both ways round, so that the
    /// table's order cannot hide it.)
    #[test]
    fn an_ack_frees_the_slot_of_the_live_lease_not_only_a_stale_one() {
        let streams = Streams::new(4, 1);
        let p = id("NL-NRM");
        let (a, b) = (
            streams.open(&p, dropper()).unwrap(),
            streams.open(&p, dropper()).unwrap(),
        );
        let [m, n] = [(); 2].map(|()| MessageId::new_v7());
        let lease = |message_id, deadline| Lease {
            message_id,
            sender: Some(id("BE-PAYOKE")),
            deadline,
        };
        // m timed out on a, leased again on b; n the other way round
        streams.leased(&p, a.id, [lease(m, 100), lease(n, 300)]);
        streams.leased(&p, b.id, [lease(n, 100), lease(m, 300)]);
        let settled = streams.settled(&p, &[m, n]);
        assert_eq!(settled.senders.len(), 2, "each found once");
        assert!(!settled.unknown);
        for s in [&a, &b] {
            assert_eq!(
                streams.free_slots(&p, s.id, 1, 150),
                1,
                "the acked delivery holds a slot of stream {}",
                s.id.0
            );
        }
    }

    /// Whether `fut` is ready at its first poll.
    fn ready_at_once<F: std::future::Future>(fut: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        fut.poll(&mut cx).is_ready()
    }
}
