//! The broker operations as synchronous sled transactions (run on blocking
//! threads by the async layer in `mod.rs`, which then waits for the flush).

use std::collections::{BTreeSet, HashMap};

use ::sled::Transactional as _;
use ::sled::transaction::{TransactionError, TransactionalTree};
use trmx_proto::{MessageId, ParticipantId, pb};

use super::Core;
use super::codec::{
    LeaseEntry, RecipientCounters, Record, TimerKind, parse_timer_key, participant_prefix,
    read_u64, seq_suffix,
};
use super::tx::{
    BACKOFF, COUNTERS, DEAD, LEASED, LEGACY_INFLIGHT, LEGACY_LEASES, PAYLOADS, QUEUE, RECORDS,
    TIMERS, Tx, TxResult, abort, after, backoff, drop_payload, finish_keeping_payload,
    finish_without_payload, index_entries, may_be_leased,
};
use crate::store::{
    Accepted, AckResult, Leased, Millis, NewMessage, PurgeResult, QueueStats, RedriveResult,
    RejectResult, Released, SearchFilter, SearchPage, State, StatusRecord, StoreError, StreamId,
    SubmitOutcome, TickReport, WithdrawResult,
};

/// Recipients that have newly due messages after an operation.
pub(super) type Wake = BTreeSet<ParticipantId>;

/// Timers applied per transaction by `tick`.
const TICK_BATCH: usize = 256;
/// Timers and lease deadlines one `tick` applies at most (it stops at the
/// first transaction that reaches it): it runs alone on the writer thread,
/// and a clock far ahead (a start after days down) can make a week of
/// expiries and retentions due at once, which applied in one call held
/// every submit, lease and ack for minutes. The rest is due still, so
/// `next_timer` says so and the timer loop calls again at once, behind
/// whatever queued meanwhile.
pub(crate) const MAX_TIMERS_PER_TICK: usize = 4 * TICK_BATCH;
/// Leases requeued per transaction by `recover`.
const RECOVER_BATCH: usize = 256;
/// Bytes of stored records (and payloads) one transaction of a batch reads, at
/// most, or one record when larger: sled holds every value a transaction read
/// until it commits, and a record carries its payload, so a batch of 256
/// messages of `max_envelope_bytes` would be held at once (2 GiB at the
/// default 8 MiB; 16 GiB at its ceiling). Applies to `tick`, the requeues of
/// `recover` and of a closed stream, `shorten_backoffs`,
/// [`Core::drop_unusable_payloads`], the copy of `store compact`, the parts
/// of an `Ack` ([`Core::plan`]), and the jobs the writer thread merges into
/// one transaction (`writer::run_batch`).
pub(super) const BATCH_READ_BYTES: u64 = 16 << 20;

pub(super) fn storage(e: ::sled::Error) -> StoreError {
    StoreError::Unavailable(format!("storage error: {e}"))
}

impl Core {
    fn tree(&self, index: usize) -> &::sled::Tree {
        &self.trees[index]
    }

    /// Runs `f` as one atomic transaction over every tree.
    pub(super) fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        let result = self
            .trees
            .as_slice()
            .transaction(|trees: &Vec<TransactionalTree>| {
                let tx = Tx {
                    t: trees.as_slice(),
                    life: &self.life,
                    seq_floor: self.seq_floor,
                    audit_block: Default::default(),
                    #[cfg(test)]
                    read: Default::default(),
                };
                let value = f(&tx);
                #[cfg(test)]
                self.largest_read
                    .fetch_max(tx.read.get(), std::sync::atomic::Ordering::Relaxed);
                let value = value?;
                tx.finish_audit()?;
                Ok(value)
            });
        match result {
            Ok(value) => Ok(value),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(storage(e)),
        }
    }

    /// The committed record of `seq` as it is now, without its payload:
    /// IN_FLIGHT when it has a lease (see `Tx::record`). (Every reader of it
    /// wants the metadata: a status, a search, a plan. A payload copied for
    /// each record read was up to `max_envelope_bytes` for nothing.)
    ///
    /// Outside the writer thread a change can commit between the two reads,
    /// so the lease is read first. If it ended in between, the record read
    /// second is what followed: the lease is applied only when that record is
    /// due again (giving the IN_FLIGHT state just before). A lease taken in
    /// between is not seen. Either way the answer is a state the message was
    /// in.
    fn load(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        Ok(self.load_sized(seq)?.map(|(record, _)| record))
    }

    /// [`Self::load`], with the size of the stored record: what a transaction
    /// holds once it has read it and changed it. A kept payload of the older
    /// format (in `payloads`) counts too: a change that drops it deletes it, and
    /// sled's `remove` reads the value it deletes and holds it as well.
    fn load_sized(&self, seq: u64) -> Result<Option<(Record, u64)>, StoreError> {
        let key = seq.to_be_bytes();
        let lease = self.tree(LEASED).get(key).map_err(storage)?;
        let Some(bytes) = self.tree(RECORDS).get(key).map_err(storage)? else {
            return Ok(None);
        };
        let mut size = bytes.len() as u64;
        let (record, inline) = Record::decode_metadata_inline(&bytes)?;
        if record.payload_kept
            && !inline
            && record.payload_size > 0
            && let Some(payload) = self.tree(PAYLOADS).get(key).map_err(storage)?
        {
            size = size.saturating_add(payload.len() as u64);
        }
        match lease {
            Some(v) if may_be_leased(&record) => {
                Ok(Some((LeaseEntry::decode(&v)?.apply(record), size)))
            }
            _ => Ok(Some((record, size))),
        }
    }

    /// Which records of each of `ids` a change by id (an `Ack`, a `Reject`, a
    /// withdrawal) reads in its transaction: those `wanted` keeps, in parts cut
    /// at [`BATCH_READ_BYTES`] of records (one id alone when larger).
    ///
    /// Runs before the transaction, against the committed trees, reading one
    /// record at a time and only its metadata: a request that names the ids of
    /// other participants' messages (their senders know them), or of messages
    /// it cannot change, holds none of them at once, and its transaction reads
    /// none of them. `wanted` should keep every record the change might act on
    /// given the state it reads now; the transaction re-checks each record it
    /// reads, as its state may change meanwhile (an earlier job of its batch, or
    /// an earlier part of the same request).
    pub(super) fn plan(
        &self,
        ids: &[MessageId],
        wanted: impl Fn(&Record) -> bool,
    ) -> Result<Vec<Part>, StoreError> {
        let mut parts = Vec::new();
        let mut part = Part::default();
        for &id in ids {
            let mut seqs = Vec::new();
            let mut bytes = 0u64;
            if let Some(all) = self
                .tree(super::tx::BY_ID)
                .get(id.as_bytes())
                .map_err(storage)?
            {
                for seq in super::codec::decode_seqs(&all)? {
                    if let Some((record, size)) = self.load_sized(seq)?
                        && wanted(&record)
                    {
                        seqs.push(seq);
                        bytes = bytes.saturating_add(size);
                    }
                }
            }
            if !part.ids.is_empty() && part.bytes.saturating_add(bytes) > BATCH_READ_BYTES {
                parts.push(std::mem::take(&mut part));
            }
            part.ids.push((id, seqs));
            part.bytes = part.bytes.saturating_add(bytes);
        }
        parts.push(part);
        Ok(parts)
    }

    /// The bytes a transaction holds once it has read record `seq`: the record
    /// (with its payload) and a payload of the older format beside it. Read
    /// outside any transaction, one at a time, to cut a batch at
    /// [`BATCH_READ_BYTES`].
    fn stored_bytes(&self, seq: u64) -> Result<u64, StoreError> {
        let key = seq.to_be_bytes();
        let mut bytes = 0;
        for tree in [RECORDS, PAYLOADS] {
            if let Some(value) = self.tree(tree).get(key).map_err(storage)? {
                bytes += value.len() as u64;
            }
        }
        Ok(bytes)
    }

    /// Notes a batch of `len` records read by one transaction (tests check that a
    /// batch stops at [`BATCH_READ_BYTES`]).
    fn note_batch(&self, len: usize) {
        #[cfg(test)]
        self.largest_batch
            .fetch_max(len, std::sync::atomic::Ordering::Relaxed);
        #[cfg(not(test))]
        let _ = len;
    }

    /// The stored `record` with its lease, if it has one (for scans; see
    /// [`Self::load`] for reads of one record outside the writer thread).
    fn with_lease(&self, record: Record) -> Result<Record, StoreError> {
        if !may_be_leased(&record) {
            return Ok(record);
        }
        match self
            .tree(LEASED)
            .get(record.seq.to_be_bytes())
            .map_err(storage)?
        {
            Some(v) => Ok(LeaseEntry::decode(&v)?.apply(record)),
            None => Ok(record),
        }
    }

    /// `(deadline, seq)` of every lease, earliest first, and the seqs whose
    /// entry cannot be read (see [`Self::repair_lease`]). The `leased` tree
    /// holds only the messages in flight (bounded by the streams and their
    /// `max_in_flight`), never the backlog, so it is read whole.
    fn lease_deadlines(&self) -> Result<LeaseDeadlines, StoreError> {
        let mut out = LeaseDeadlines::default();
        for item in self.tree(LEASED).iter() {
            let (key, value) = item.map_err(storage)?;
            match read_u64(&key).and_then(|seq| Ok((seq, LeaseEntry::decode(&value)?))) {
                Ok((seq, lease)) => out.due.push((lease.deadline, seq)),
                Err(why) => out.damaged.push((key, why)),
            }
        }
        out.due.sort_unstable();
        Ok(out)
    }

    /// The lease entry under `key` cannot be read (`why`): its message is
    /// made due again, as after a restart (it may have been on a stream
    /// still open: like a lease whose ack timeout passed early), so that it
    /// neither stays in flight forever nor fails every operation that reads
    /// it. A key that names no message just goes. Logged. Only `tick` and
    /// the restart repair: a stream's release passes such an entry by.
    fn repair_lease(&self, key: &[u8], why: &StoreError, now: Millis) -> Result<Wake, StoreError> {
        tracing::error!(
            %why,
            "a lease in the store cannot be read: its message is due again; the store is \
             damaged, run `trmx-broker store verify` when the broker is stopped"
        );
        let Ok(seq) = read_u64(key) else {
            self.tree(LEASED).remove(key).map_err(storage)?;
            return Ok(Wake::new());
        };
        self.transact(|tx| {
            let mut wake = Wake::new();
            let stored = match tx.t[RECORDS].get(seq.to_be_bytes())? {
                Some(bytes) => Record::decode_stored(&bytes).ok(),
                None => None,
            };
            let Some(due) = stored.filter(may_be_leased) else {
                // nothing it could lease: only the entry goes
                tx.t[LEASED].remove(&seq.to_be_bytes())?;
                return Ok(wake);
            };
            // what the entry stood for, as well as can be told: `put` takes
            // the entry away and puts the message back in its queue
            let in_flight = LeaseEntry {
                deadline: now,
                stream: 0,
                attempt: due.attempts.saturating_add(1),
                delivered_at: due.last_delivered_at.unwrap_or(due.state_changed_at),
            }
            .apply(due.clone());
            let mut back = due;
            back.state_changed_at = now;
            tx.put(Some(&in_flight), Some(&back))?;
            wake.insert(back.recipient.clone());
            Ok(wake)
        })
    }

    /// The seqs of the committed queue of `recipient` that a lease of up to
    /// `max` looks at, in lease order, not known to be damaged (see
    /// [`Leases::damaged`]): `max` not `claimed` by an earlier lease of the
    /// same batch (they are added to it), and the claimed ones among them.
    ///
    /// An earlier lease of the batch may stop short of what it claimed (at its
    /// byte budget): what it leaves is then this lease's, in order, as
    /// [`Tx::lease`] finds them still due. Without them this lease would skip
    /// ahead of them, or find nothing and let its stream sleep while they wait.
    pub(super) fn lease_candidates(
        &self,
        recipient: &ParticipantId,
        max: usize,
        claimed: &mut super::writer::Claimed,
    ) -> Result<Vec<u64>, StoreError> {
        let mut candidates = Vec::with_capacity(max.min(1024));
        if max == 0 {
            return Ok(candidates);
        }
        let unleasable = self
            .unleasable
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut unclaimed = 0;
        for item in self.tree(QUEUE).scan_prefix(participant_prefix(recipient)) {
            let (key, _) = item.map_err(storage)?;
            let seq = seq_suffix(&key)?;
            if unleasable.contains(&seq) {
                continue;
            }
            candidates.push(seq);
            if claimed.insert(seq) {
                unclaimed += 1;
                if unclaimed >= max {
                    break;
                }
            }
        }
        Ok(candidates)
    }

    /// Puts IN_FLIGHT messages back in their queue (see [`Requeue`]); the
    /// restart also empties the lease trees of older stores.
    pub(super) fn requeue_in_flight(
        &self,
        on: &Requeue,
        now: Millis,
    ) -> Result<(Released, Wake), StoreError> {
        let (total, wake, applied) = self.requeue_in_flight_partly(on, now);
        applied.map(|()| (total, wake))
    }

    /// [`Self::requeue_in_flight`], which commits a batch at a time: what the batches
    /// committed before one failed is returned with the failure.
    pub(super) fn requeue_in_flight_partly(
        &self,
        on: &Requeue,
        now: Millis,
    ) -> (Released, Wake, Result<(), StoreError>) {
        let (mut total, mut wake) = (Released::default(), Wake::new());
        let mut applied = Ok(());
        if matches!(on, Requeue::Restart) {
            for legacy in [LEGACY_INFLIGHT, LEGACY_LEASES] {
                applied = applied
                    .and_then(|()| self.requeue_from(legacy, on, now, &mut total, &mut wake));
            }
        }
        applied = applied.and_then(|()| self.requeue_from(LEASED, on, now, &mut total, &mut wake));
        (total, wake, applied)
    }

    /// At start: a message backing off waits at most its backoff from `now`.
    /// Its `next_attempt_at` was set on the clock of an earlier process: a
    /// clock set back since (a start accepts one behind, up to
    /// `lifecycle.max_downtime`) would otherwise hold the redelivery by as
    /// much, days where the backoff is seconds; a backoff shortened in the
    /// config since applies too. One read of each message backing off (the
    /// `backoff` tree: failed deliveries only, never the backlog). Returns
    /// how many were brought forward, and the recipients of those due now.
    pub(super) fn shorten_backoffs(&self, now: Millis) -> Result<(u64, Wake), StoreError> {
        let (mut shortened, mut wake) = (0, Wake::new());
        let mut after_key: Option<Vec<u8>> = None;
        loop {
            let range = match &after_key {
                Some(k) => self.tree(BACKOFF).range(k.clone()..),
                None => self.tree(BACKOFF).iter(),
            };
            let mut batch = Vec::with_capacity(RECOVER_BATCH);
            let mut bytes = 0;
            for key in range.keys() {
                let key = key.map_err(storage)?;
                if after_key.as_deref() == Some(&key[..]) {
                    continue;
                }
                after_key = Some(key.to_vec());
                // (a key that cannot be read is left to `store verify`)
                if let Ok(seq) = seq_suffix(&key) {
                    batch.push(seq);
                    bytes += self.stored_bytes(seq)?;
                }
                if batch.len() >= RECOVER_BATCH || bytes >= BATCH_READ_BYTES {
                    break;
                }
            }
            if batch.is_empty() {
                break;
            }
            self.note_batch(batch.len());
            let (count, woken) = self.transact(|tx| {
                let (mut count, mut woken) = (0, Wake::new());
                for &seq in &batch {
                    let Some(old) = tx.readable_record(seq, "its backoff is left as it is")? else {
                        continue;
                    };
                    let Some(due) = old.next_attempt_at.filter(|_| old.state == State::Accepted)
                    else {
                        continue;
                    };
                    let latest = after(now, backoff(&self.life, old.attempts));
                    if due <= latest {
                        continue;
                    }
                    let mut new = old.clone();
                    new.next_attempt_at = (latest > now).then_some(latest);
                    tx.put(Some(&old), Some(&new))?;
                    if new.next_attempt_at.is_none() {
                        woken.insert(new.recipient.clone());
                    }
                    count += 1;
                }
                Ok((count, woken))
            })?;
            shortened += count;
            wake.extend(woken);
        }
        if shortened > 0 {
            tracing::warn!(
                shortened,
                "redeliveries were due later than their backoff from now (the clock is behind \
                 the previous run's, or the backoff was shortened): brought forward"
            );
        }
        Ok((shortened, wake))
    }

    /// [`Self::requeue_in_flight`] over one lease tree. Every lease tree ends
    /// its keys with the seq; the stream id is the value of the legacy trees
    /// and part of a [`LeaseEntry`] in `leased`. No lease tree is per
    /// recipient: each is read whole, which is bounded by the messages in
    /// flight, not by the backlog.
    /// Adds what it committed to `total` and `wake` as it goes, so that a failure
    /// leaves there what the batches before it did.
    fn requeue_from(
        &self,
        tree: usize,
        on: &Requeue,
        now: Millis,
        total: &mut Released,
        wake: &mut Wake,
    ) -> Result<(), StoreError> {
        let (recipient, stream, failed_attempt) = match on {
            Requeue::Stream {
                recipient,
                stream,
                failed_attempt,
            } => (Some(recipient), Some(*stream), *failed_attempt),
            Requeue::Restart => (None, None, false),
        };
        let mut after_key: Option<Vec<u8>> = None;
        loop {
            let mut batch = Vec::with_capacity(RECOVER_BATCH);
            let mut bytes = 0;
            let range = match &after_key {
                Some(k) => self.tree(tree).range(k.clone()..),
                None => self.tree(tree).iter(),
            };
            for item in range {
                let (key, value) = item.map_err(storage)?;
                if after_key.as_deref() == Some(&key[..]) {
                    continue;
                }
                after_key = Some(key.to_vec());
                let leased = if tree == LEASED {
                    seq_suffix(&key).and_then(|seq| Ok((LeaseEntry::decode(&value)?.stream, seq)))
                } else {
                    seq_suffix(&key).and_then(|seq| Ok((read_u64(&value)?, seq)))
                };
                let (leased_to, seq) = match leased {
                    Ok(leased) => leased,
                    // whose stream it was cannot be told: due again at a
                    // restart; a stream's release leaves it to the next tick
                    Err(why) if tree == LEASED => {
                        if stream.is_none() {
                            wake.extend(self.repair_lease(&key, &why, now)?);
                        }
                        continue;
                    }
                    Err(why) => return Err(why),
                };
                if stream.is_some_and(|s| leased_to != s.0) {
                    continue;
                }
                batch.push((key, seq));
                bytes += self.stored_bytes(seq)?;
                if batch.len() >= RECOVER_BATCH || bytes >= BATCH_READ_BYTES {
                    break;
                }
            }
            if batch.is_empty() {
                break;
            }
            self.note_batch(batch.len());
            let (count, woken) = self.transact(|tx| {
                let mut count = Released::default();
                let mut woken = Wake::new();
                for (key, seq) in &batch {
                    if tree != LEASED {
                        // `put` keeps only the `leased` tree in step
                        tx.t[tree].remove(key)?;
                    }
                    let Some(old) = tx.record(*seq)? else {
                        continue;
                    };
                    let on_stream = match (old.lease, stream) {
                        (Some((_, s)), Some(want)) => s == want.0,
                        (Some(_), None) => true,
                        (None, _) => false,
                    };
                    if old.state != State::InFlight
                        || !on_stream
                        || recipient.is_some_and(|r| old.recipient != *r)
                    {
                        continue;
                    }
                    if failed_attempt {
                        match self.attempt_failed(tx, &old, now, now, &mut woken)? {
                            Retry::DeadLettered => {
                                count.dead_lettered += 1;
                                // (`on_stream` above: the record has a lease)
                                if let Some((deadline, _)) = old.lease {
                                    count.dead_lettered_in_flight.push(
                                        crate::store::ExpiredLease {
                                            recipient: old.recipient.clone(),
                                            message_id: old.message_id,
                                            deadline,
                                        },
                                    );
                                }
                            }
                            Retry::Due | Retry::Later => count.requeued += 1,
                        }
                        continue;
                    }
                    let mut new = old.clone();
                    new.state = State::Accepted;
                    new.state_changed_at = now;
                    new.lease = None;
                    new.next_attempt_at = None;
                    tx.put(Some(&old), Some(&new))?;
                    woken.insert(new.recipient.clone());
                    count.requeued += 1;
                }
                Ok((count, woken))
            })?;
            total.requeued += count.requeued;
            total.dead_lettered += count.dead_lettered;
            total
                .dead_lettered_in_flight
                .extend(count.dead_lettered_in_flight);
            wake.extend(woken);
        }
        Ok(())
    }

    pub(super) fn status(
        &self,
        sender: &ParticipantId,
        id: MessageId,
    ) -> Result<Option<StatusRecord>, StoreError> {
        Ok(self.sender_record(sender, id)?.map(|r| r.to_status()))
    }

    /// What the first submit of `sender`'s message `id` was answered, if it
    /// was stored with `fingerprint` (the same content).
    pub(super) fn identical(
        &self,
        sender: &ParticipantId,
        id: MessageId,
        fingerprint: &[u8; 32],
    ) -> Result<Option<Accepted>, StoreError> {
        Ok(self
            .sender_record(sender, id)?
            .filter(|r| r.fingerprint == *fingerprint)
            .map(|first| Accepted {
                broker_seq: first.seq,
                accepted_at: first.accepted_at,
                expires_at: first.expires_at,
            }))
    }

    /// The committed record of `sender`'s message `id`.
    fn sender_record(
        &self,
        sender: &ParticipantId,
        id: MessageId,
    ) -> Result<Option<Record>, StoreError> {
        let Some(seqs) = self
            .tree(super::tx::BY_ID)
            .get(id.as_bytes())
            .map_err(storage)?
        else {
            return Ok(None);
        };
        for seq in super::codec::decode_seqs(&seqs)? {
            if let Some(record) = self.load(seq)?
                && record.sender.as_ref() == Some(sender)
            {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    /// Applies the timers and lease deadlines that are due at `now`, in time
    /// order across both trees (a lease deadline before an expiry fires
    /// first, as it would have with the broker running): the earliest, up
    /// to about [`MAX_TIMERS_PER_TICK`].
    ///
    /// Applied in several transactions: on an error, the report and wake-ups of
    /// those committed before it come back with it (the streams free the slots
    /// of the messages that expired in flight, which the next tick no longer
    /// sees).
    pub(super) fn tick(&self, now: Millis) -> (TickReport, Wake, Result<(), StoreError>) {
        let mut report = TickReport::default();
        let mut wake = Wake::new();
        let result = self.tick_into(now, &mut report, &mut wake);
        report.woken = wake.iter().cloned().collect();
        (report, wake, result)
    }

    /// [`Self::tick`], adding each committed transaction's work to `report` and `wake`.
    fn tick_into(
        &self,
        now: Millis,
        report: &mut TickReport,
        wake: &mut Wake,
    ) -> Result<(), StoreError> {
        let mut applied = 0;
        // Read once: leases taken meanwhile are due after `now`, and one
        // settled meanwhile is found settled when its turn comes.
        let deadlines = self.lease_deadlines()?;
        for (key, why) in &deadlines.damaged {
            wake.extend(self.repair_lease(key, why, now)?);
        }
        let mut due_leases: std::collections::VecDeque<(Millis, u64)> = deadlines
            .due
            .into_iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .collect();
        while applied < MAX_TIMERS_PER_TICK {
            let timers = self.due_keys(TIMERS, now, |k| Ok(parse_timer_key(k)?.0))?;
            let leases: Vec<(Millis, ::sled::IVec)> = due_leases
                .iter()
                .take(TICK_BATCH)
                .map(|(deadline, seq)| (*deadline, ::sled::IVec::from(&seq.to_be_bytes())))
                .collect();
            if timers.is_empty() && leases.is_empty() {
                break;
            }
            // a full batch may stop before later entries of its tree: fire
            // nothing of the other tree beyond its last time in this round
            let cutoff = [&timers, &leases]
                .into_iter()
                .filter(|batch| batch.len() >= TICK_BATCH)
                .filter_map(|batch| batch.last().map(|(at, _)| *at))
                .min()
                .unwrap_or(now);
            let mut due: Vec<(Millis, bool, ::sled::IVec)> = timers
                .into_iter()
                .map(|(at, key)| (at, false, key))
                .chain(leases.into_iter().map(|(at, key)| (at, true, key)))
                .filter(|(at, _, _)| *at <= cutoff)
                .collect();
            // (a lease deadline goes first at the same millisecond, as the
            // `Lease` timer kind sorted first when leases were timers)
            due.sort_by_key(|(at, is_lease, _)| (*at, !*is_lease));
            // at most `BATCH_READ_BYTES` of records in one transaction: what is
            // cut off is still due, and comes next round (a timer stays in its
            // tree; a lease deadline stays in `due_leases`)
            let mut bytes = 0;
            let mut keep = 0;
            for (_, is_lease, key) in &due {
                if keep > 0 && bytes >= BATCH_READ_BYTES {
                    break;
                }
                let seq = if *is_lease {
                    read_u64(key).ok()
                } else {
                    parse_timer_key(key).ok().map(|(_, _, seq)| seq)
                };
                // (a key that cannot be read reads no record: `fire` drops it)
                if let Some(seq) = seq {
                    bytes += self.stored_bytes(seq)?;
                }
                keep += 1;
            }
            due.truncate(keep);
            // (the leases fired now are a prefix of `due_leases`: the sort is
            // stable and keeps them in deadline order)
            let fired = due.iter().filter(|(_, is_lease, _)| *is_lease).count();
            due_leases.drain(..fired);
            applied += due.len();
            self.note_batch(due.len());
            let (part, woken) = self.transact(|tx| {
                let mut part = TickReport::default();
                let mut woken = Wake::new();
                for (at, is_lease, key) in &due {
                    if *is_lease {
                        let seq = match read_u64(key) {
                            Ok(seq) => seq,
                            Err(e) => return abort(e),
                        };
                        let old = tx.readable_record(seq, "its lease is dropped")?;
                        // (`put` removes it too; one without its record goes here)
                        tx.t[LEASED].remove(key)?;
                        if let Some(old) = old {
                            self.lease_timeout(tx, *at, &old, now, &mut part, &mut woken)?;
                        }
                    } else {
                        self.fire(tx, key, now, &mut part, &mut woken)?;
                    }
                }
                Ok((part, woken))
            })?;
            report.redelivery_due += part.redelivery_due;
            report.dead_lettered += part.dead_lettered;
            report.expired += part.expired;
            report.payloads_deleted += part.payloads_deleted;
            report.metadata_deleted += part.metadata_deleted;
            report.expired_in_flight.extend(part.expired_in_flight);
            report
                .dead_lettered_in_flight
                .extend(part.dead_lettered_in_flight);
            wake.extend(woken);
        }
        Ok(())
    }

    /// Up to [`TICK_BATCH`] keys of `tree` (ordered by time) due at `now`.
    fn due_keys(
        &self,
        tree: usize,
        now: Millis,
        time_of: impl Fn(&[u8]) -> Result<Millis, StoreError>,
    ) -> Result<Vec<(Millis, ::sled::IVec)>, StoreError> {
        let mut keys = Vec::new();
        for item in self.tree(tree).iter().keys() {
            let key = item.map_err(storage)?;
            let at = match time_of(&key) {
                Ok(at) => at,
                Err(why) => {
                    // it can never fire: read at every tick, it would stop
                    // every timer behind it
                    tracing::error!(
                        %why,
                        "a timer in the store cannot be read: it is dropped; the store is \
                         damaged, run `trmx-broker store verify` when the broker is stopped"
                    );
                    self.tree(tree).remove(&key).map_err(storage)?;
                    continue;
                }
            };
            if at > now {
                break;
            }
            keys.push((at, key));
            if keys.len() >= TICK_BATCH {
                break;
            }
        }
        Ok(keys)
    }

    /// The ack deadline `at` of `old`'s lease passed: a failed attempt.
    /// Nothing happens when `old` is no longer leased with that deadline.
    fn lease_timeout(
        &self,
        tx: &Tx<'_>,
        at: Millis,
        old: &Record,
        now: Millis,
        report: &mut TickReport,
        wake: &mut Wake,
    ) -> TxResult<()> {
        if old.state != State::InFlight || old.lease.map(|l| l.0) != Some(at) {
            return Ok(());
        }
        // the backoff runs from the ack deadline, so a late tick (broker
        // down, coarse timer) does not stretch it
        match self.attempt_failed(tx, old, at, now, wake)? {
            Retry::DeadLettered => {
                report.dead_lettered += 1;
                report
                    .dead_lettered_in_flight
                    .push(crate::store::ExpiredLease {
                        recipient: old.recipient.clone(),
                        message_id: old.message_id,
                        deadline: at,
                    });
            }
            Retry::Due | Retry::Later => report.redelivery_due += 1,
        }
        Ok(())
    }

    /// The delivery of the IN_FLIGHT `old` failed (ack deadline passed, or
    /// its recipient's stream closed without an ack): DEAD_LETTERED (+ NDR)
    /// when its attempts are used up, else ACCEPTED again, due once the
    /// backoff from `failed_at` has passed.
    ///
    /// A receipt's attempts are never used up: a receipt never causes a
    /// receipt, so one dead-lettered would leave its sender never knowing
    /// what became of its message (DESIGN.md §4's guarantee: delivered, or a
    /// report). It is tried again, at most the longest backoff apart, until
    /// it expires at the end of the metadata retention.
    fn attempt_failed(
        &self,
        tx: &Tx<'_>,
        old: &Record,
        failed_at: Millis,
        now: Millis,
        wake: &mut Wake,
    ) -> TxResult<Retry> {
        let mut new = old.clone();
        let receipt = old.sender.is_none();
        if old.attempts >= self.life.max_attempts && !receipt {
            finish_keeping_payload(&mut new, State::DeadLettered, now, &self.life);
            new.reason_code = "MAX_ATTEMPTS".to_owned();
            tx.put(Some(old), Some(&new))?;
            if let Some(to) = tx.receipt(&new, pb::Outcome::DeadLettered, now)? {
                wake.insert(to);
            }
            return Ok(Retry::DeadLettered);
        }
        let due = after(failed_at, backoff(&self.life, old.attempts));
        new.state = State::Accepted;
        new.state_changed_at = now;
        new.lease = None;
        new.next_attempt_at = (due > now).then_some(due);
        tx.put(Some(old), Some(&new))?;
        if new.next_attempt_at.is_none() {
            wake.insert(new.recipient.clone());
            Ok(Retry::Due)
        } else {
            Ok(Retry::Later)
        }
    }

    /// Applies one due timer.
    fn fire(
        &self,
        tx: &Tx<'_>,
        key: &[u8],
        now: Millis,
        report: &mut TickReport,
        wake: &mut Wake,
    ) -> TxResult<()> {
        let (at, kind, seq) = match parse_timer_key(key) {
            Ok(parsed) => parsed,
            Err(e) => return abort(e),
        };
        tx.t[TIMERS].remove(key)?;
        let Some(old) = tx.readable_record(seq, "its timer is dropped")? else {
            return Ok(()); // stale timer
        };
        let mut new = old.clone();
        match kind {
            TimerKind::Lease => {
                // written by stores before the `leases` tree
                self.lease_timeout(tx, at, &old, now, report, wake)?;
            }
            TimerKind::Due if old.state == State::Accepted && old.next_attempt_at == Some(at) => {
                new.next_attempt_at = None;
                tx.put(Some(&old), Some(&new))?;
                wake.insert(new.recipient.clone());
            }
            TimerKind::Expiry if old.state.is_active() && old.expires_at == at => {
                if let Some((deadline, _)) = old.lease.filter(|_| old.state == State::InFlight) {
                    report.expired_in_flight.push(crate::store::ExpiredLease {
                        recipient: old.recipient.clone(),
                        message_id: old.message_id,
                        deadline,
                    });
                }
                finish_keeping_payload(&mut new, State::Expired, now, &self.life);
                if old.sender.is_none() {
                    // A receipt is never redriven (`Record::redrivable`), so
                    // its payload is of no use to anyone now: kept, it would
                    // only wait for the dead-letter retention.
                    drop_payload(&mut new);
                }
                new.reason_code = "EXPIRED".to_owned();
                tx.put(Some(&old), Some(&new))?;
                if let Some(to) = tx.receipt(&new, pb::Outcome::Expired, now)? {
                    wake.insert(to);
                }
                report.expired += 1;
            }
            TimerKind::PayloadRetention
                if old.payload_kept && old.payload_delete_at == Some(at) =>
            {
                new.payload_kept = false;
                new.payload_delete_at = None;
                tx.put(Some(&old), Some(&new))?;
                report.payloads_deleted += 1;
            }
            TimerKind::MetadataRetention
                if !old.state.is_active() && old.metadata_delete_at == Some(at) =>
            {
                tx.put(Some(&old), None)?;
                report.metadata_deleted += 1;
            }
            _ => {} // stale timer: removed above
        }
        Ok(())
    }

    pub(super) fn next_timer(&self) -> Result<Option<Millis>, StoreError> {
        let timer = match self.tree(TIMERS).first().map_err(storage)? {
            Some((key, _)) => Some(parse_timer_key(&key)?.0),
            None => None,
        };
        let lease = self
            .lease_deadlines()?
            .due
            .first()
            .map(|(deadline, _)| *deadline);
        Ok(timer.into_iter().chain(lease).min())
    }

    /// Per-recipient counters, and the oldest message each recipient has not
    /// acknowledged: the lowest seq (seqs follow acceptance) among its due
    /// messages (the head of each priority of `queue`), those backing off
    /// (the head of its `backoff` entries) and those in flight (`leased`,
    /// read whole once, as it holds only the messages in flight). A few reads
    /// per recipient and one per message in flight, never the backlog; and
    /// nothing is written for it when a message is acknowledged at its first
    /// delivery.
    ///
    /// A figure of a moment, read outside the writer: every delivery moves a
    /// message from `queue` to `leased`, and a backoff that ends moves it
    /// from `backoff` to `queue`, so `backoff`, `queue` and `leased` are read
    /// in that order and such a message is seen at least once. One whose
    /// lease ends between the reads may be missed by that answer.
    pub(super) fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(COUNTERS).scan_prefix(b"r") {
            let (key, value) = item.map_err(storage)?;
            let name = std::str::from_utf8(&key[1..])
                .map_err(|_| StoreError::Corrupt("counter key".to_owned()))?;
            let recipient = ParticipantId::parse(name)
                .map_err(|_| StoreError::Corrupt("counter key".to_owned()))?;
            let counters = RecipientCounters::decode(&value)?;
            let prefix = participant_prefix(&recipient);
            let mut oldest = self.first_waiting(BACKOFF, &prefix)?;
            for priority in [0u8, 1u8] {
                let mut p = prefix.clone();
                p.push(priority);
                oldest = oldest
                    .into_iter()
                    .chain(self.first_waiting(QUEUE, &p)?)
                    .min();
            }
            out.push((
                QueueStats {
                    recipient,
                    depth: counters.depth,
                    in_flight: counters.in_flight,
                    oldest_accepted_at: None,
                    bytes: counters.bytes,
                },
                oldest,
            ));
        }
        let in_flight = self.oldest_in_flight()?;
        Ok(out
            .into_iter()
            .map(|(mut stats, oldest)| {
                let oldest = oldest
                    .into_iter()
                    .chain(in_flight.get(&stats.recipient).copied())
                    .min();
                stats.oldest_accepted_at = oldest.map(|(_, accepted_at)| accepted_at);
                stats
            })
            .collect())
    }

    /// `(seq, accepted_at)` of the first message under `prefix` of the
    /// seq-ordered index `tree` that still waits (ACCEPTED or IN_FLIGHT). A
    /// record that cannot be read (logged), or that was settled since the
    /// entry was read, is passed by.
    fn first_waiting(
        &self,
        tree: usize,
        prefix: &[u8],
    ) -> Result<Option<(u64, Millis)>, StoreError> {
        for item in self.tree(tree).scan_prefix(prefix).keys() {
            let seq = seq_suffix(&item.map_err(storage)?)?;
            if let Some(waiting) = self.waiting(seq)? {
                return Ok(Some((seq, waiting.accepted_at)));
            }
        }
        Ok(None)
    }

    /// The oldest message in flight of each recipient, `(seq,
    /// accepted_at)`: the whole `leased` tree, which holds only the messages
    /// in flight (bounded by the streams and their `max_in_flight`), with
    /// the metadata of each record for its recipient. An entry whose key
    /// cannot be read is left to the repair of `tick`.
    fn oldest_in_flight(&self) -> Result<HashMap<ParticipantId, (u64, Millis)>, StoreError> {
        let mut out: HashMap<ParticipantId, (u64, Millis)> = HashMap::new();
        for key in self.tree(LEASED).iter().keys() {
            let Ok(seq) = read_u64(&key.map_err(storage)?) else {
                continue;
            };
            if let Some(record) = self.waiting(seq)? {
                // keys in seq order: the first of a recipient is its oldest
                out.entry(record.recipient)
                    .or_insert((seq, record.accepted_at));
            }
        }
        Ok(out)
    }

    /// The metadata of the record `seq` if it still waits for its recipient
    /// (ACCEPTED or IN_FLIGHT: a leased record is stored ACCEPTED); none
    /// when it was settled or cannot be read (logged once per process: the
    /// queue figures are read at every metrics scrape).
    fn waiting(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        let record = match self.tree(RECORDS).get(seq.to_be_bytes()).map_err(storage)? {
            Some(bytes) => Record::decode_metadata(&bytes).map(Some),
            None => Ok(None),
        };
        Ok(self
            .readable_logged(seq, record, Repeat::Once)?
            .filter(|record| record.state.is_active()))
    }

    pub(super) fn dead_letters(
        &self,
        limit: usize,
        after_seq: Option<u64>,
    ) -> Result<SearchPage, StoreError> {
        let mut page = Paging::new(limit, 0);
        for item in self.tree(DEAD).range(seqs_after(after_seq)).keys() {
            let seq = read_u64(&item.map_err(storage)?)?;
            let record = self.readable(seq, self.load(seq))?;
            if !page.examine(seq, record.map(|r| r.to_status())) {
                break;
            }
        }
        Ok(page.finish())
    }

    pub(super) fn search(&self, filter: &SearchFilter) -> Result<SearchPage, StoreError> {
        let matches = |r: &Record| {
            filter.message_id.is_none_or(|id| r.message_id == id)
                && filter
                    .sender
                    .as_ref()
                    .is_none_or(|s| r.sender.as_ref() == Some(s))
                && filter.recipient.as_ref().is_none_or(|p| r.recipient == *p)
                && filter.case_ref.is_none_or(|c| r.case_ref == c)
                && filter.state.is_none_or(|s| r.state == s)
                && filter.kind.is_none_or(|k| r.kind == k)
                && filter.accepted_from.is_none_or(|t| r.accepted_at >= t)
                && filter.accepted_until.is_none_or(|t| r.accepted_at < t)
        };
        let mut page = Paging::new(filter.limit, filter.scan_limit);
        if let Some(id) = filter.message_id {
            let mut seqs = match self
                .tree(super::tx::BY_ID)
                .get(id.as_bytes())
                .map_err(storage)?
            {
                Some(v) => super::codec::decode_seqs(&v)?,
                None => Vec::new(),
            };
            seqs.sort_unstable();
            seqs.retain(|seq| after_seq_ok(*seq, filter.after_seq));
            for seq in seqs {
                let record = self.readable(seq, self.load(seq))?;
                let matched = record.filter(|r| matches(r)).map(|r| r.to_status());
                if !page.examine(seq, matched) {
                    break;
                }
            }
            return Ok(page.finish());
        }
        // Metadata only: an inline payload is not even copied.
        for item in self.tree(RECORDS).range(seqs_after(filter.after_seq)) {
            let (key, value) = item.map_err(storage)?;
            let seq = read_u64(&key)?;
            let record = Record::decode_metadata(&value).and_then(|r| self.with_lease(r));
            let matched = self
                .readable(seq, record.map(Some))?
                .filter(|r| matches(r))
                .map(|r| r.to_status());
            if !page.examine(seq, matched) {
                break;
            }
        }
        Ok(page.finish())
    }

    /// `record` of `seq`, or none when it cannot be read (logged at every
    /// read: an operator's search or listing is asked for): one damaged
    /// record must not fail every operator read that passes it.
    fn readable(
        &self,
        seq: u64,
        record: Result<Option<Record>, StoreError>,
    ) -> Result<Option<Record>, StoreError> {
        self.readable_logged(seq, record, Repeat::EveryRead)
    }

    /// [`Self::readable`], logging a damaged record as `repeat` says (then at
    /// DEBUG when it is not logged at ERROR).
    fn readable_logged(
        &self,
        seq: u64,
        record: Result<Option<Record>, StoreError>,
        repeat: Repeat,
    ) -> Result<Option<Record>, StoreError> {
        match record {
            Err(StoreError::Corrupt(why)) => {
                if repeat == Repeat::EveryRead || self.first_logged(seq) {
                    tracing::error!(
                        seq,
                        %why,
                        "a stored message record cannot be read: left out of what operators \
                         read (searches, dead letters, queue figures and their metrics); the \
                         store is damaged, run `trmx-broker store verify`"
                    );
                } else {
                    tracing::debug!(
                        seq,
                        "a stored message record cannot be read (logged before)"
                    );
                }
                Ok(None)
            }
            other => other,
        }
    }

    /// Whether the damaged record `seq` is logged by the queue figures for the
    /// first time in this process (remembered from now on). Past
    /// [`DAMAGED_REMEMBERED`] records, every one is logged every time: a store
    /// that damaged is better flooding the log than silent.
    fn first_logged(&self, seq: u64) -> bool {
        let mut logged = self
            .damaged_logged
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if logged.contains(&seq) {
            return false;
        }
        if logged.len() < DAMAGED_REMEMBERED {
            logged.insert(seq);
        }
        true
    }
}

/// How often a read logs a damaged record at ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// At every read: an operator's search or dead-letter listing, asked for.
    EveryRead,
    /// Once per record and process: the queue figures are read at every
    /// metrics scrape (and operator queue listing), and would log the same
    /// record every few seconds. Its operator reads, and `trmx-broker store
    /// verify`, still name it.
    Once,
}

/// Damaged records whose ERROR the queue figures remember having logged (the
/// records at queue heads and in flight: a few per recipient).
pub(super) const DAMAGED_REMEMBERED: usize = 4096;

/// The leases of the store, by deadline.
#[derive(Debug, Default)]
struct LeaseDeadlines {
    /// `(deadline, seq)`, earliest first.
    due: Vec<(Millis, u64)>,
    /// The keys whose lease entry cannot be read, and why.
    damaged: Vec<(::sled::IVec, StoreError)>,
}

/// What [`Tx::lease`] did with its candidates.
#[derive(Debug)]
pub(super) struct Leases {
    /// Now IN_FLIGHT, to be delivered.
    pub(super) leased: Vec<Leased>,
    /// Queued messages that cannot be delivered (a record that cannot be
    /// read, a payload gone). They stay queued until they expire or are
    /// purged, and later leases pass them by: picked again and again, a
    /// few of them at the head of a queue would stop every delivery behind
    /// them.
    pub(super) damaged: Vec<u64>,
}

/// Part of a change by id ([`Core::plan`]): the ids in the order named, each
/// with the seqs of its records the transaction reads; at most
/// [`BATCH_READ_BYTES`] of records in all, or one id.
#[derive(Debug, Clone, Default)]
pub(super) struct Part {
    pub(super) ids: Vec<(MessageId, Vec<u64>)>,
    /// The size of those records when planned.
    pub(super) bytes: u64,
}

impl Part {
    /// The parts of a plan as one (a change of one id: always one part).
    pub(super) fn joined(parts: Vec<Part>) -> Part {
        let mut joined = Part::default();
        for part in parts {
            joined.ids.extend(part.ids);
            joined.bytes = joined.bytes.saturating_add(part.bytes);
        }
        joined
    }
}

/// Whether `r` was delivered and not settled since: an `Ack` or a `Reject` of
/// its recipient applies to it.
pub(super) fn delivered(r: &Record) -> bool {
    r.state == State::InFlight || (r.state == State::Accepted && r.attempts > 0)
}

/// The records an `Ack` of `recipient` may act on ([`Core::plan`]): its
/// deliveries, and those it acknowledged (a repeated ack is answered so).
pub(super) fn ackable(recipient: &ParticipantId) -> impl Fn(&Record) -> bool + '_ {
    move |r| r.recipient == *recipient && (delivered(r) || r.state == State::Acknowledged)
}

/// The records a `Reject` of `recipient` may act on ([`Core::plan`]): its
/// deliveries, and those it rejected (a repeated reject is answered so).
pub(super) fn rejectable(recipient: &ParticipantId) -> impl Fn(&Record) -> bool + '_ {
    move |r| {
        r.recipient == *recipient
            && (delivered(r) || (r.state == State::DeadLettered && r.rejected))
    }
}

/// The records a withdrawal of `sender` may act on ([`Core::plan`]): its own.
pub(super) fn sent_by(sender: &ParticipantId) -> impl Fn(&Record) -> bool + '_ {
    move |r| r.sender.as_ref() == Some(sender)
}

/// Which IN_FLIGHT messages [`Core::requeue_in_flight`] puts back, and how.
#[derive(Debug)]
pub(super) enum Requeue {
    /// Those of `recipient` leased to `stream`, which ended. With
    /// `failed_attempt` (the recipient ended it) each is a failed delivery:
    /// backoff and the attempt limit apply; else they are due at once.
    Stream {
        recipient: ParticipantId,
        stream: StreamId,
        failed_attempt: bool,
    },
    /// Every one, at start-up: the previous process ended their streams,
    /// not their recipients. Due at once; no attempt is lost.
    Restart,
}

/// What became of a failed delivery.
enum Retry {
    /// Due again now.
    Due,
    /// Due again after the backoff.
    Later,
    /// Attempts used up.
    DeadLettered,
}

/// The `meta` key set once every message of the store backing off has its
/// `backoff` entry. Its value is that of the store's `running_at` (empty
/// when none) when the index was last known to be in step: this version
/// writes both together, so they differ once an earlier version, which
/// marks its runs but does not keep the index, ran on the store (see
/// [`backoff_indexed`]).
pub(super) const BACKOFF_INDEXED_KEY: &[u8] = b"backoff_indexed";

/// Whether the `backoff` index of the store with `meta` is complete and in
/// step: its mark is there, and names the last run recorded. (A mark of a
/// run other than the last means an earlier broker version ran since, and
/// changed messages without the index.)
pub(super) fn backoff_indexed(meta: &::sled::Tree) -> Result<bool, StoreError> {
    in_step(meta, BACKOFF_INDEXED_KEY)
}

/// Whether the one-time pass whose mark is `key` in `meta` is done and in
/// step: its mark is there and names the last run recorded (an earlier
/// version, which does not know the mark, ran since otherwise).
fn in_step(meta: &::sled::Tree, key: &[u8]) -> Result<bool, StoreError> {
    let mark = meta.get(key).map_err(storage)?;
    Ok(mark.is_some_and(|mark| mark == running_mark(meta).unwrap_or_default()))
}

/// The `meta` key set once no EXPIRED or DEAD_LETTERED record keeps a
/// payload that no redrive can use (an expired receipt's, a rejected
/// message's): versions before the one that deletes them at once kept them
/// for the dead-letter retention. Its value is the store's `running_at`,
/// as [`BACKOFF_INDEXED_KEY`]'s, and for the same reason: an earlier version
/// that ran since may have kept such payloads again.
pub(super) const UNUSABLE_PAYLOADS_DROPPED_KEY: &[u8] = b"unusable_payloads_dropped";

/// Payloads deleted per transaction by [`Core::drop_unusable_payloads`], at most.
const DROP_BATCH: usize = 256;

/// What [`Core::drop_unusable_payloads`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct DroppedPayloads {
    /// Payloads deleted.
    pub(super) dropped: u64,
    /// The most payload bytes one of its transactions read (and held until it
    /// committed).
    pub(super) most_bytes_held: u64,
}

impl Core {
    /// Deletes, once, the payloads that stores written before kept for the
    /// dead-letter retention although no redrive can ever use them: those of
    /// expired (or, earlier still, dead-lettered) receipts and of rejected
    /// messages (see [`drop_payload`]). Their metadata, its retention and
    /// their state stay as they are (DESIGN.md §4), so nothing is audited and
    /// no report is sent. Reads only the `dead` tree and its records. Each
    /// batch is one transaction that applies the same change as the expiry or
    /// rejection does today, so an interrupted pass (a crash) leaves every
    /// record consistent and the next open does the rest; the mark is written
    /// after a flush of the last batch.
    ///
    /// Each dead letter is read first outside any transaction, one at a time,
    /// and only those whose payload goes are read again in one, at most
    /// [`DROP_BATCH`] and [`BATCH_READ_BYTES`] of them: a transaction holds
    /// every value it read until it commits, and most dead letters keep their
    /// payload for a redrive (up to `limits.max_envelope_bytes` each), so
    /// batches of every dead letter held hundreds of them at once, gigabytes
    /// at the start of a store of large messages.
    pub(super) fn drop_unusable_payloads(&self) -> Result<DroppedPayloads, StoreError> {
        let mut done = DroppedPayloads::default();
        if in_step(&self.meta, UNUSABLE_PAYLOADS_DROPPED_KEY)? {
            return Ok(done);
        }
        // (a start on a store of many dead letters takes a while: say why, first)
        if !self.tree(DEAD).is_empty() {
            tracing::info!(
                "looking for payloads of expired receipts and rejected messages that an earlier \
                 version kept: one read of every dead letter, once, before the broker serves"
            );
        }
        let (mut batch, mut batch_bytes) = (Vec::new(), 0u64);
        for key in self.tree(DEAD).iter().keys() {
            let key = key.map_err(storage)?;
            // (a damaged key is left out, as every scan does: one damaged
            // entry must not stop the start; `store verify` reports it)
            let Ok(seq) = read_u64(&key) else {
                continue;
            };
            let Some(value) = self.tree(RECORDS).get(&key).map_err(storage)? else {
                continue;
            };
            match Record::decode_metadata(&value) {
                Ok(record) if unusable_payload(&record) => {
                    batch.push(seq);
                    batch_bytes = batch_bytes.saturating_add(record.payload_size);
                }
                Ok(_) => continue,
                Err(why) => {
                    tracing::error!(
                        seq,
                        %why,
                        "a stored message record cannot be read: its payload is left as it is; \
                         the store is damaged, restore the data directory from a backup"
                    );
                    continue;
                }
            }
            if batch.len() >= DROP_BATCH || batch_bytes >= BATCH_READ_BYTES {
                self.drop_payloads_of(&std::mem::take(&mut batch), &mut done)?;
                batch_bytes = 0;
            }
        }
        self.drop_payloads_of(&batch, &mut done)?;
        // the deletions durable before the mark that says they are done
        trmx_durable::flush_sled(&self.meta).map_err(storage)?;
        self.meta
            .insert(UNUSABLE_PAYLOADS_DROPPED_KEY, running_mark(&self.meta)?)
            .map_err(storage)?;
        trmx_durable::flush_sled(&self.meta).map_err(storage)?;
        if done.dropped > 0 {
            tracing::info!(
                dropped = done.dropped,
                "payloads of expired receipts and rejected messages that an earlier version kept \
                 for the dead-letter retention deleted: no redrive can use them"
            );
        }
        Ok(done)
    }

    /// Deletes, in one transaction, the payloads of the records `seqs` that
    /// still keep one no redrive can use (see [`Self::drop_unusable_payloads`]).
    fn drop_payloads_of(&self, seqs: &[u64], done: &mut DroppedPayloads) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (dropped, held) = self.transact(|tx| {
            let (mut dropped, mut held) = (0u64, 0u64);
            for &seq in seqs {
                let Some(old) = tx.readable_record(seq, "its payload is left as it is")? else {
                    continue;
                };
                if old.payload_kept {
                    held = held.saturating_add(old.payload_size);
                }
                if unusable_payload(&old) {
                    let mut new = old.clone();
                    drop_payload(&mut new);
                    tx.put(Some(&old), Some(&new))?;
                    dropped += 1;
                }
            }
            Ok((dropped, held))
        })?;
        done.dropped += dropped;
        done.most_bytes_held = done.most_bytes_held.max(held);
        Ok(())
    }
}

/// Whether the stored `r` keeps a payload that no redrive can ever use: an
/// EXPIRED or DEAD_LETTERED receipt's (a receipt has no sender to redrive
/// for), or a rejected message's.
fn unusable_payload(r: &Record) -> bool {
    r.payload_kept
        && matches!(r.state, State::Expired | State::DeadLettered)
        && (r.sender.is_none() || r.rejected)
}

/// The value the mark of a `backoff` index in step has in a store with
/// `meta`: its `running_at`, or empty.
fn running_mark(meta: &::sled::Tree) -> Result<Vec<u8>, StoreError> {
    Ok(meta
        .get(super::RUNNING_KEY)
        .map_err(storage)?
        .map(|running| running.to_vec())
        .unwrap_or_default())
}

/// Keys of `backoff` written per batch by [`index_backoff`].
const INDEX_BATCH: usize = 10_000;

/// Gives every message backing off in a store written before the `backoff`
/// tree its entry, once (the store's `meta` then says so): one read of every
/// record's metadata, at the first start of a broker that keeps the index,
/// before anything else writes. The entries are those [`index_entries`]
/// derives, as for every change. Returns how many it indexed. A record that
/// cannot be read (or whose key is not a seq) is left out (logged), as every
/// scan does: one damaged record must not stop the start.
///
/// It starts from an empty `backoff`: a pass interrupted before its mark (a
/// crash, then the store run by an earlier version again, which does not
/// keep the index) may have left entries of messages that no longer back
/// off, which no change would ever remove. For the same reason a store an
/// earlier version ran on after it was indexed (its mark names another run
/// than the last: [`backoff_indexed`]) is indexed again.
pub(super) fn index_backoff(
    trees: &[::sled::Tree],
    meta: &::sled::Tree,
) -> Result<u64, StoreError> {
    if backoff_indexed(meta)? {
        return Ok(0);
    }
    // (a start on a store of many records takes a while: say why, first)
    let any = !trees[RECORDS].is_empty();
    if any {
        tracing::info!(
            "indexing the messages backing off for the oldest-message age: one read of every \
             record, once, before the broker serves"
        );
    }
    trees[BACKOFF].clear().map_err(storage)?;
    let (mut indexed, mut in_batch) = (0u64, 0usize);
    let mut batch = ::sled::Batch::default();
    for item in trees[RECORDS].iter() {
        let (key, value) = item.map_err(storage)?;
        let seq = read_u64(&key).unwrap_or_default();
        match Record::decode_metadata(&value) {
            Ok(record) => {
                for (_, key, value) in index_entries(&record)
                    .into_iter()
                    .filter(|(tree, _, _)| *tree == BACKOFF)
                {
                    batch.insert(key, value);
                    indexed += 1;
                    in_batch += 1;
                }
            }
            Err(why) => tracing::error!(
                seq,
                %why,
                "a stored message record cannot be read: left out of the queue's oldest-message \
                 age; the store is damaged, run `trmx-broker store verify`"
            ),
        }
        if in_batch >= INDEX_BATCH {
            trees[BACKOFF]
                .apply_batch(std::mem::take(&mut batch))
                .map_err(storage)?;
            in_batch = 0;
        }
    }
    trees[BACKOFF].apply_batch(batch).map_err(storage)?;
    // the entries durable before the mark that says they are complete
    trmx_durable::flush_sled(meta).map_err(storage)?;
    meta.insert(BACKOFF_INDEXED_KEY, running_mark(meta)?)
        .map_err(storage)?;
    trmx_durable::flush_sled(meta).map_err(storage)?;
    if any {
        tracing::info!(
            indexed,
            "messages backing off indexed for the oldest-message age"
        );
    }
    Ok(indexed)
}

/// The keys of the seq-keyed trees after `after` (all of them when `None`).
fn seqs_after(after: Option<u64>) -> (std::ops::Bound<[u8; 8]>, std::ops::Bound<[u8; 8]>) {
    use std::ops::Bound;
    match after {
        Some(seq) => (Bound::Excluded(seq.to_be_bytes()), Bound::Unbounded),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

fn after_seq_ok(seq: u64, after: Option<u64>) -> bool {
    after.is_none_or(|after| seq > after)
}

/// Collects one page of an operator read: at most `limit` matches (0 means
/// 100), looking one match further to know whether there are more, and
/// examining at most `scan_limit` records (0: no bound).
struct Paging {
    limit: usize,
    scan_limit: usize,
    examined: usize,
    records: Vec<StatusRecord>,
    resume_after: Option<u64>,
}

impl Paging {
    fn new(limit: usize, scan_limit: usize) -> Self {
        Self {
            limit: if limit == 0 { 100 } else { limit },
            scan_limit,
            examined: 0,
            records: Vec::new(),
            resume_after: None,
        }
    }

    /// Takes the record `seq` (its status when it matched); `false` when
    /// the page is complete and the scan stops.
    fn examine(&mut self, seq: u64, matched: Option<StatusRecord>) -> bool {
        if let Some(status) = matched {
            if self.records.len() == self.limit {
                // one more match: the next page starts after the last one kept
                self.resume_after = self.records.last().map(|r| r.broker_seq);
                return false;
            }
            self.records.push(status);
        }
        self.examined += 1;
        if self.scan_limit > 0 && self.examined >= self.scan_limit {
            self.resume_after = Some(seq);
            return false;
        }
        true
    }

    fn finish(self) -> SearchPage {
        SearchPage {
            records: self.records,
            resume_after: self.resume_after,
        }
    }
}

/// Operations that run inside a (possibly shared) transaction.
impl Tx<'_> {
    /// Up to `max` due messages of `recipient`, leased to `stream`, out of
    /// `candidates` (picked by [`Core::lease_candidates`] from the committed
    /// queue). Each is re-checked here: an earlier job of the same batch may
    /// have settled or leased it. Messages queued by earlier jobs of the same batch are
    /// left for the next lease: their submit wakes the stream once durable.
    ///
    /// A queued message that cannot be read (a damaged record, a payload
    /// gone) is left queued and logged, and the messages behind it are
    /// leased: one unreadable record must not stop a recipient's deliveries
    /// (its Receive stream would end with the error at every attempt). It
    /// stays ACCEPTED until it expires or an operator purges it.
    pub(super) fn lease(
        &self,
        recipient: &ParticipantId,
        stream: StreamId,
        candidates: &[u64],
        max: usize,
        max_bytes: u64,
        now: Millis,
    ) -> TxResult<Leases> {
        let tx = self;
        let mut out = Leases {
            leased: Vec::with_capacity(candidates.len()),
            damaged: Vec::new(),
        };
        let deadline = after(now, self.life.ack_timeout);
        let mut bytes: u64 = 0;
        for &seq in candidates {
            if out.leased.len() >= max {
                break;
            }
            let Some(old) = tx.readable_record(
                seq,
                "it stays queued and is skipped, the messages behind it are delivered",
            )?
            else {
                out.damaged.push(seq);
                continue;
            };
            if old.state != State::Accepted
                || old.next_attempt_at.is_some()
                || old.recipient != *recipient
                // expired but not yet ticked: `tick` will expire it
                || old.expires_at <= now
            {
                continue;
            }
            // stop, not skip: what follows stays in lease order
            let size = old.payload_size;
            if !out.leased.is_empty() && bytes.saturating_add(size) > max_bytes {
                break;
            }
            let Some(payload) = tx.payload(&old)? else {
                tracing::error!(
                    seq,
                    message_id = %old.message_id,
                    %recipient,
                    "the payload of a queued message is missing: it stays queued and is \
                     skipped, the messages behind it are delivered; purge it \
                     (trmx-broker admin purge) so that its sender gets a non-delivery report"
                );
                out.damaged.push(seq);
                continue;
            };
            let mut new = old.clone();
            new.state = State::InFlight;
            new.attempts = old.attempts.saturating_add(1);
            new.last_delivered_at = Some(now);
            new.state_changed_at = now;
            new.lease = Some((deadline, stream.0));
            tx.put(Some(&old), Some(&new))?;
            bytes = bytes.saturating_add(size);
            out.leased.push(Leased {
                message_id: new.message_id,
                sender: new.sender,
                recipient: new.recipient,
                kind: new.kind,
                case_ref: new.case_ref,
                in_reply_to: new.in_reply_to,
                priority: new.priority,
                created_at: new.created_at,
                expires_at: new.expires_at,
                content_type: new.content_type,
                payload: bytes::Bytes::copy_from_slice(&payload),
                payload_sha256: new.payload_sha256,
                accepted_at: new.accepted_at,
                broker_seq: new.seq,
                attempt: new.attempts,
            });
        }
        Ok(out)
    }

    pub(super) fn submit(&self, msg: &NewMessage, now: Millis) -> TxResult<(SubmitOutcome, Wake)> {
        let tx = self;
        let size = msg.payload.len() as u64;
        let same_id = tx.records_of(msg.message_id)?;
        if let Some(first) = same_id
            .iter()
            .find(|r| r.sender.as_ref() == Some(&msg.sender))
        {
            let accepted = Accepted {
                broker_seq: first.seq,
                accepted_at: first.accepted_at,
                expires_at: first.expires_at,
            };
            let outcome = if first.fingerprint == msg.fingerprint {
                SubmitOutcome::Duplicate(accepted)
            } else {
                SubmitOutcome::Conflict
            };
            return Ok((outcome, Wake::new()));
        }
        if same_id.iter().any(|r| r.recipient == msg.recipient) {
            return Ok((SubmitOutcome::IdTaken, Wake::new()));
        }
        let queued = tx.sender_bytes(&msg.sender)?;
        if queued.saturating_add(size) > self.life.max_queued_bytes_per_sender {
            return Ok((SubmitOutcome::QuotaExceeded, Wake::new()));
        }
        let seq = tx.next_seq()?;
        let record = Record {
            seq,
            message_id: msg.message_id,
            sender: Some(msg.sender.clone()),
            recipient: msg.recipient.clone(),
            kind: msg.kind,
            case_ref: msg.case_ref,
            in_reply_to: msg.in_reply_to,
            priority: msg.priority,
            created_at: msg.created_at,
            expires_at: msg.expires_at,
            accepted_at: now,
            content_type: msg.content_type.clone(),
            payload_sha256: msg.payload_sha256,
            payload_size: size,
            fingerprint: msg.fingerprint,
            state: State::Accepted,
            attempts: 0,
            last_delivered_at: None,
            state_changed_at: now,
            next_attempt_at: None,
            lease: None,
            reason_code: String::new(),
            field_path: String::new(),
            payload_kept: true,
            rejected: false,
            payload_delete_at: None,
            metadata_delete_at: None,
            note: String::new(),
            payload: Some(super::codec::InlinePayload(::sled::IVec::from(
                msg.payload.as_ref(),
            ))),
        };
        tx.put(None, Some(&record))?;
        let mut wake = Wake::new();
        wake.insert(msg.recipient.clone());
        Ok((
            SubmitOutcome::Accepted(Accepted {
                broker_seq: seq,
                accepted_at: now,
                expires_at: msg.expires_at,
            }),
            wake,
        ))
    }

    /// Acknowledges `part` (of [`Core::plan`] with [`ackable`]) for `recipient`:
    /// reads only the records the plan kept, and re-checks each.
    pub(super) fn ack(
        &self,
        recipient: &ParticipantId,
        part: &Part,
        now: Millis,
    ) -> TxResult<(Vec<AckResult>, Wake)> {
        let tx = self;
        let mut results = Vec::with_capacity(part.ids.len());
        let mut wake = Wake::new();
        for (_, seqs) in &part.ids {
            // An ack of a message that is no longer delivered to the caller is
            // NOT_FOUND, also one its node really stored but acknowledged after
            // the message expired (or was withdrawn or purged): DESIGN.md §3 says
            // NOT_FOUND for an id "not in flight to the caller", and §4 makes
            // EXPIRED final, its sender already told so by a non-delivery report.
            // ACKNOWLEDGED would tell the node its ack was applied when the
            // record stays EXPIRED, and applying it would send the sender a
            // DELIVERED receipt contradicting the report it has (the node
            // deduplicates a redriven copy, so nothing is lost either way).
            let mut result = AckResult::NotFound;
            for &seq in seqs {
                let Some(old) = tx.record(seq)? else {
                    continue;
                };
                if old.recipient != *recipient {
                    continue;
                }
                if old.state == State::Acknowledged {
                    // (one acknowledged by this call wins: it is counted)
                    if result == AckResult::NotFound {
                        result = AckResult::Acknowledged {
                            kind: old.kind,
                            already: true,
                        };
                    }
                } else if delivered(&old) {
                    let mut new = old.clone();
                    finish_without_payload(&mut new, State::Acknowledged, now, self.life);
                    tx.put(Some(&old), Some(&new))?;
                    if let Some(to) = tx.receipt(&new, pb::Outcome::Delivered, now)? {
                        wake.insert(to);
                    }
                    result = AckResult::Acknowledged {
                        kind: old.kind,
                        already: false,
                    };
                }
            }
            results.push(result);
        }
        Ok((results, wake))
    }

    /// Rejects `part` (of [`Core::plan`] with [`rejectable`], one id) for
    /// `recipient`: reads only the records the plan kept, and re-checks each.
    pub(super) fn reject(
        &self,
        recipient: &ParticipantId,
        part: &Part,
        reason_code: &str,
        field_path: &str,
        now: Millis,
    ) -> TxResult<(RejectResult, Wake)> {
        let tx = self;
        let mut result = RejectResult::NotFound;
        let mut wake = Wake::new();
        for &seq in part.ids.iter().flat_map(|(_, seqs)| seqs) {
            let Some(old) = tx.record(seq)? else {
                continue;
            };
            if old.recipient != *recipient {
                continue;
            }
            if old.state == State::DeadLettered && old.rejected {
                result = RejectResult::Rejected { already: true };
            } else if delivered(&old) {
                let mut new = old.clone();
                finish_keeping_payload(&mut new, State::DeadLettered, now, self.life);
                // A dead letter's payload is kept for a redrive, which a rejected
                // message never gets (DESIGN.md §4), and no one may read it here:
                // kept, it would only be personal data waiting for its retention.
                drop_payload(&mut new);
                new.rejected = true;
                new.reason_code = reason_code.to_owned();
                new.field_path = field_path.to_owned();
                tx.put(Some(&old), Some(&new))?;
                if let Some(to) = tx.receipt(&new, pb::Outcome::RejectedByRecipient, now)? {
                    wake.insert(to);
                }
                result = RejectResult::Rejected { already: false };
            }
        }
        Ok((result, wake))
    }

    /// Withdraws `sender`'s message of `part` (of [`Core::plan`] with
    /// [`sent_by`], one id): reads only the records the plan kept.
    pub(super) fn withdraw(
        &self,
        sender: &ParticipantId,
        part: &Part,
        now: Millis,
    ) -> TxResult<WithdrawResult> {
        let tx = self;
        let mut found = None;
        for &seq in part.ids.iter().flat_map(|(_, seqs)| seqs) {
            if let Some(old) = tx.record(seq)?
                && old.sender.as_ref() == Some(sender)
            {
                found = Some(old);
                break;
            }
        }
        let Some(old) = found else {
            return Ok(WithdrawResult::NotFound);
        };
        Ok(match old.state {
            // An expired or dead-lettered message keeps its payload for a redrive: a
            // sender that takes back a misaddressed one wants it gone, and never
            // redriven to the wrong recipient (ARCHITECTURE.md). Its sender had its
            // non-delivery report already; a withdrawal makes none.
            State::Accepted | State::InFlight | State::Expired | State::DeadLettered => {
                let mut new = old.clone();
                finish_without_payload(&mut new, State::Withdrawn, now, self.life);
                tx.put(Some(&old), Some(&new))?;
                WithdrawResult::Withdrawn {
                    at: now,
                    recipient: old.recipient,
                    already: false,
                }
            }
            State::Withdrawn => WithdrawResult::Withdrawn {
                at: old.state_changed_at,
                recipient: old.recipient,
                already: true,
            },
            State::Acknowledged => WithdrawResult::AlreadyAcknowledged,
            state @ State::Purged => WithdrawResult::Final { state },
        })
    }

    /// The one message an operator names: `sender`'s `id`, or without a sender the
    /// only message with that id. `Err` lists the participants to name when several
    /// used the id.
    fn operator_target(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
    ) -> TxResult<Result<Option<Record>, Vec<Option<ParticipantId>>>> {
        let mut records = self.records_of(id)?;
        if let Some(sender) = sender {
            // A receipt is named by the participant it goes to, the sender of the
            // message it reports on: two senders that used one id both get receipts
            // under one id, and its own sender (the broker) tells them apart from
            // nothing.
            records.retain(|r| named_by(r) == sender);
        }
        // A receipt has no sender to name: of the receipts with this id to one
        // participant, only the newest is meant (the older ones are of an earlier
        // message its sender sent under the same id, whose metadata went since; see
        // `Tx::receipt`).
        let superseded: Vec<u64> = records
            .iter()
            .filter(|r| {
                r.sender.is_none()
                    && records
                        .iter()
                        .any(|n| n.sender.is_none() && n.recipient == r.recipient && n.seq > r.seq)
            })
            .map(|r| r.seq)
            .collect();
        records.retain(|r| !superseded.contains(&r.seq));
        Ok(if records.len() > 1 {
            Err(records.iter().map(|r| Some(named_by(r).clone())).collect())
        } else {
            Ok(records.pop())
        })
    }

    pub(super) fn purge(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
        reason: &str,
        now: Millis,
    ) -> TxResult<(PurgeResult, Wake)> {
        let tx = self;
        let mut wake = Wake::new();
        let old = match tx.operator_target(id, sender)? {
            Ok(Some(old)) => old,
            Ok(None) => return Ok((PurgeResult::NotFound, wake)),
            Err(senders) => return Ok((PurgeResult::Ambiguous { senders }, wake)),
        };
        match old.state {
            State::Accepted | State::InFlight => {}
            State::Purged => {
                let already = PurgeResult::AlreadyPurged {
                    at: old.state_changed_at,
                    recipient: old.recipient,
                    sender: old.sender,
                };
                return Ok((already, wake));
            }
            state => return Ok((PurgeResult::NotPurgeable { state }, wake)),
        }
        let mut new = old.clone();
        finish_without_payload(&mut new, State::Purged, now, self.life);
        new.reason_code = "PURGED".to_owned();
        new.note = reason.to_owned();
        tx.put(Some(&old), Some(&new))?;
        if let Some(to) = tx.receipt(&new, pb::Outcome::Purged, now)? {
            wake.insert(to);
        }
        let purged = PurgeResult::Purged {
            recipient: new.recipient,
            sender: new.sender,
        };
        Ok((purged, wake))
    }

    pub(super) fn redrive(
        &self,
        id: MessageId,
        sender: Option<&ParticipantId>,
        now: Millis,
    ) -> TxResult<(RedriveResult, Wake)> {
        let tx = self;
        let mut wake = Wake::new();
        let old = match tx.operator_target(id, sender)? {
            Ok(Some(old)) => old,
            Ok(None) => return Ok((RedriveResult::NotFound, wake)),
            Err(senders) => return Ok((RedriveResult::Ambiguous { senders }, wake)),
        };
        if !old.redrivable() {
            // A message that waits may have been redriven by a call whose flush
            // failed (the write kept, the wake-up of its recipient lost with the
            // flush): the retry, refused, wakes the recipient's streams in its
            // stead. Harmless otherwise: a stream looks, and finds what it finds.
            if old.state == State::Accepted && old.next_attempt_at.is_none() {
                wake.insert(old.recipient.clone());
            }
            return Ok((RedriveResult::NotRedrivable { state: old.state }, wake));
        }
        // As long as the first lifetime, taken from its acceptance.
        // Redriven before, `expires_at` has moved on from that, so
        // this is longer: capped at the longest lifetime any message
        // gets, which the nodes' duplicate windows rely on.
        let lifetime = old
            .expires_at
            .saturating_sub(old.accepted_at)
            .min(after(0, self.life.max_lifetime))
            .max(60_000);
        let mut new = old.clone();
        new.state = State::Accepted;
        new.state_changed_at = now;
        new.attempts = 0;
        new.expires_at = now.saturating_add(lifetime);
        new.next_attempt_at = None;
        new.lease = None;
        new.reason_code = String::new();
        new.field_path = String::new();
        new.payload_delete_at = None;
        new.metadata_delete_at = None;
        tx.put(Some(&old), Some(&new))?;
        wake.insert(new.recipient.clone());
        let accepted = Accepted {
            broker_seq: new.seq,
            accepted_at: new.accepted_at,
            expires_at: new.expires_at,
        };
        let redriven = RedriveResult::Redriven {
            accepted,
            attempts_before: old.attempts,
        };
        Ok((redriven, wake))
    }
}

/// The participant an operator names `r` by (`sender` of a purge or redrive): its
/// sender, or for a receipt (the broker's) the participant it goes to.
fn named_by(r: &Record) -> &ParticipantId {
    r.sender.as_ref().unwrap_or(&r.recipient)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use trmx_proto::envelope::{Priority, sha256};
    use trmx_proto::{CaseRef, Kind};

    use super::super::codec::{LeaseEntry, Record, decode_seqs};
    use super::super::tx::{BY_ID, PAYLOADS};
    use super::super::{SledOptions, SledStore};
    use super::*;
    use crate::store::conformance::{ACKED, ACKED_BEFORE};
    use crate::store::{BrokerStore, Lifecycle, NewMessage, StreamEnd};

    const NOW: Millis = 1_700_000_000_000;

    fn message(to: &ParticipantId) -> NewMessage {
        let payload = bytes::Bytes::from_static(b"payload");
        NewMessage {
            message_id: MessageId::new_v7(),
            sender: ParticipantId::parse("NL-NRM").unwrap(),
            recipient: to.clone(),
            kind: Kind::Referral,
            case_ref: CaseRef::new_random(),
            in_reply_to: None,
            priority: Priority::Normal,
            created_at: NOW,
            expires_at: NOW + 24 * 3600 * 1000,
            content_type: Kind::Referral.content_type(),
            payload_sha256: sha256(&payload),
            fingerprint: sha256(b"fingerprint"),
            payload,
        }
    }

    fn open(dir: &std::path::Path) -> SledStore {
        SledStore::open(dir, SledOptions::default(), Lifecycle::default()).unwrap()
    }

    /// The store's sled database opened raw, to damage it as a torn write or a bad
    /// restore would. Through `open_sled`, as the store opens it: sled's I/O threads let
    /// go of the directory lock a moment after a closed store is dropped, and a plain
    /// `sled::open` right after fails now and then on a busy host.
    fn raw_db(dir: &std::path::Path) -> ::sled::Db {
        trmx_durable::open_sled(&::sled::Config::new().path(dir)).unwrap()
    }

    /// The store's flushes take the process's one flush turn (`trmx_durable::flush_sled`),
    /// the one a node's store takes too: two sled 0.34 flushes at once (tests run a broker
    /// and nodes in one process) can hang both for good. A submit is not answered while
    /// another flush has the turn, and is once it is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_waits_for_the_process_flush_turn() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(dir.path()));
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        // (the turn held on a thread of its own, as another store's flush holds it)
        let (held_tx, held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _turn = trmx_durable::hold_flush_turn();
            held_tx.send(()).unwrap();
            let _ = released.recv();
        });
        held.recv().unwrap();
        let submitting = tokio::spawn({
            let (s, msg) = (Arc::clone(&s), message(&be));
            async move { s.submit(msg, NOW).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !submitting.is_finished(),
            "the submit was flushed while another flush had the turn"
        );
        drop(release);
        holder.join().unwrap();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(30), submitting)
            .await
            .expect("answered once the turn is free");
        assert!(answered.unwrap().is_ok());
    }

    /// A closed store in `dir` that holds a message to BE-PAYOKE whose record
    /// is damaged (not decodable), then `messages`; `change` may alter the
    /// stored records of `messages` (their seqs in order) before it is reopened.
    async fn damaged_store(
        dir: &std::path::Path,
        messages: &[&NewMessage],
        change: impl FnOnce(&::sled::Tree, &[u64]),
    ) {
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir);
        let mut seqs = Vec::new();
        for m in std::iter::once(&message(&be)).chain(messages.iter().copied()) {
            match s.submit(m.clone(), NOW).await.unwrap() {
                SubmitOutcome::Accepted(a) => seqs.push(a.broker_seq),
                other => panic!("{other:?}"),
            }
        }
        s.close().await.unwrap();
        drop(s);
        let db = raw_db(dir);
        let records = db.open_tree("records").unwrap();
        records
            .insert(seqs[0].to_be_bytes(), &b"\xffnot a record"[..])
            .unwrap();
        change(&records, &seqs[1..]);
        db.flush().unwrap();
    }

    /// A queued message whose record cannot be read, or whose payload is
    /// gone, is skipped: the messages behind it are still delivered, and it
    /// stays queued (ACCEPTED) for an operator to purge.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_queued_message_does_not_stop_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let (payload_gone, fine) = (message(&be), message(&be));
        damaged_store(dir.path(), &[&payload_gone, &fine], |records, seqs| {
            let key = seqs[0].to_be_bytes();
            let mut record = Record::decode(&records.get(key).unwrap().unwrap()).unwrap();
            record.payload = None; // written without it, and not in `payloads`
            records.insert(key, record.encode()).unwrap();
        })
        .await;
        let s = open(dir.path());
        let leased = s.lease(&be, StreamId(1), 10, u64::MAX, NOW).await.unwrap();
        let ids: Vec<MessageId> = leased.iter().map(|l| l.message_id).collect();
        assert_eq!(ids, vec![fine.message_id]);
        let status = s
            .status(&payload_gone.sender, payload_gone.message_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.state, State::Accepted);
        // and the operator can purge it: its sender is told
        let purged = s
            .operator_purge(
                "night-shift",
                payload_gone.message_id,
                None,
                "payload lost",
                NOW,
            )
            .await
            .unwrap();
        assert!(
            matches!(purged, crate::store::PurgeResult::Purged { .. }),
            "{purged:?}"
        );
        s.close().await.unwrap();
    }

    /// Damaged messages at the head of a queue do not stop a small delivery
    /// window: a lease of one message passes them by and delivers the next
    /// good one, and later leases do not pick them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_messages_at_the_head_do_not_stop_a_window_of_one() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let (gone1, gone2, first, second) =
            (message(&be), message(&be), message(&be), message(&be));
        damaged_store(
            dir.path(),
            &[&gone1, &gone2, &first, &second],
            |records, seqs| {
                for seq in &seqs[..2] {
                    let key = seq.to_be_bytes();
                    let mut record = Record::decode(&records.get(key).unwrap().unwrap()).unwrap();
                    record.payload = None; // written without it, and not in `payloads`
                    records.insert(key, record.encode()).unwrap();
                }
            },
        )
        .await;
        let s = open(dir.path());
        for (stream, want) in [(1, &first), (2, &second)] {
            let leased = s
                .lease(&be, StreamId(stream), 1, u64::MAX, NOW)
                .await
                .unwrap();
            let ids: Vec<MessageId> = leased.iter().map(|l| l.message_id).collect();
            assert_eq!(ids, vec![want.message_id], "stream {stream}");
        }
        assert!(
            s.lease(&be, StreamId(3), 1, u64::MAX, NOW)
                .await
                .unwrap()
                .is_empty()
        );
        s.close().await.unwrap();
    }

    /// A record that cannot be decoded does not fail `tick` for every other
    /// message when its timer comes due: the timer is dropped (and logged),
    /// the others fire.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_record_does_not_stop_the_timers() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let fine = message(&be);
        damaged_store(dir.path(), &[&fine], |_, _| {}).await;
        let s = open(dir.path());
        let after_expiry = NOW + 25 * 3600 * 1000;
        let report = s.tick(after_expiry).await.unwrap();
        assert_eq!(report.expired, 1);
        let status = s
            .status(&fine.sender, fine.message_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.state, State::Expired);
        // the damaged record's timer is gone: the next tick has nothing to do
        assert_eq!(s.tick(after_expiry).await.unwrap(), TickReport::default());
        s.close().await.unwrap();
    }

    /// An operator's search or statistics pass a damaged record by (logged):
    /// it does not fail the read of every other message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_operator_search_skips_a_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let fine = message(&be);
        damaged_store(dir.path(), &[&fine], |_, _| {}).await;
        let s = open(dir.path());
        let page = s.search(SearchFilter::default()).await.unwrap();
        let ids: Vec<MessageId> = page.records.iter().map(|r| r.message_id).collect();
        assert_eq!(ids, vec![fine.message_id]);
        assert_eq!(page.resume_after, None);
        s.close().await.unwrap();
    }

    /// A damaged record at the head of a queue is met by the queue figures, which the
    /// broker reads at every metrics scrape: its ERROR is logged the first time only,
    /// not at every scrape (it flooded the log). An operator's search still logs it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_figures_log_a_damaged_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let fine = message(&be);
        damaged_store(dir.path(), &[&fine], |_, _| {}).await;
        let s = open(dir.path());
        let core = Arc::clone(&s.inner.core);
        // (the reads run on this thread, where the capture is the default)
        let errors = errors_logged(|| {
            for _ in 0..3 {
                let stats = core.queue_stats().unwrap();
                assert_eq!(stats[0].depth, 2, "the damaged one is still counted");
            }
        });
        assert_eq!(errors, 1, "logged at the first scrape only");
        let errors = errors_logged(|| {
            core.search(&SearchFilter::default()).unwrap();
        });
        assert_eq!(errors, 1, "an operator's search names it");
        s.close().await.unwrap();
    }

    /// tracing caches, for the whole process, whether a log line's callsite interests any
    /// subscriber, the first time a thread reaches it: a test thread without a subscriber
    /// of its own could cache "never" for a line a capture below then waits for (a flake
    /// the node's captures had). A global subscriber that takes every line (and drops it)
    /// keeps every callsite interesting; installing it re-asks those cached before.
    fn keep_callsites_interesting() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        });
    }

    /// The ERROR events `f` logs on this thread.
    fn errors_logged(f: impl FnOnce()) -> usize {
        use tracing_subscriber::layer::SubscriberExt;
        keep_callsites_interesting();

        struct CountErrors(Arc<std::sync::atomic::AtomicUsize>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountErrors {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                if *event.metadata().level() == tracing::Level::ERROR {
                    self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }

        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(CountErrors(Arc::clone(&count)));
        tracing::subscriber::with_default(subscriber, f);
        count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A closed store in `dir` with `n` messages to BE-PAYOKE, all leased to
    /// one stream, the lease entry of the first overwritten with bytes that
    /// do not decode; their ids and seqs.
    async fn store_with_a_damaged_lease(dir: &std::path::Path, n: usize) -> Vec<(MessageId, u64)> {
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir);
        for _ in 0..n {
            s.submit(message(&be), NOW).await.unwrap();
        }
        let leased: Vec<_> = s
            .lease(&be, StreamId(4), n, u64::MAX, NOW)
            .await
            .unwrap()
            .iter()
            .map(|l| (l.message_id, l.broker_seq))
            .collect();
        assert_eq!(leased.len(), n);
        s.close().await.unwrap();
        drop(s);
        let db = raw_db(dir);
        db.open_tree("leased")
            .unwrap()
            .insert(leased[0].1.to_be_bytes(), &b"xx"[..])
            .unwrap();
        db.flush().unwrap();
        leased
    }

    /// A lease entry that cannot be read stops neither the start-up (its
    /// `recover`) nor the timers: the message is due again, and so are the
    /// others in flight at the restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_lease_is_due_again_at_start_and_at_a_tick() {
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        // at start-up
        let dir = tempfile::tempdir().unwrap();
        let leased = store_with_a_damaged_lease(dir.path(), 2).await;
        let s = open(dir.path());
        s.recover(NOW).await.unwrap();
        let again = s
            .lease(&be, StreamId(5), 10, u64::MAX, NOW + 1)
            .await
            .unwrap();
        let mut ids: Vec<_> = again.iter().map(|l| l.message_id).collect();
        ids.sort();
        let mut want: Vec<_> = leased.iter().map(|(id, _)| *id).collect();
        want.sort();
        assert_eq!(ids, want);
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");

        // at a tick, without a restart: that message due again, the other
        // still in flight; the release of another stream leaves it alone
        let dir = tempfile::tempdir().unwrap();
        let leased = store_with_a_damaged_lease(dir.path(), 2).await;
        let s = open(dir.path());
        let released = s
            .release_stream(
                &be,
                StreamId(9),
                crate::store::StreamEnd::Recipient,
                NOW + 1,
            )
            .await
            .unwrap();
        assert_eq!(released, crate::store::Released::default());
        assert!(
            s.lease(&be, StreamId(5), 10, u64::MAX, NOW + 1)
                .await
                .unwrap()
                .is_empty()
        );
        s.tick(NOW + 1).await.unwrap();
        let again = s
            .lease(&be, StreamId(5), 10, u64::MAX, NOW + 2)
            .await
            .unwrap();
        let ids: Vec<_> = again.iter().map(|l| l.message_id).collect();
        assert_eq!(ids, vec![leased[0].0]);
        s.close().await.unwrap();
    }

    /// A lease key that names no message goes at the restart and at a
    /// tick, and stops neither.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_lease_key_stops_neither_the_start_nor_the_timers() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let m = message(&be);
        let s = open(dir.path());
        s.submit(m.clone(), NOW).await.unwrap();
        s.close().await.unwrap();
        drop(s);
        for _ in 0..2 {
            {
                let db = raw_db(dir.path());
                db.open_tree("leased")
                    .unwrap()
                    .insert(&[1u8, 2, 3][..], &b"xx"[..])
                    .unwrap();
                db.flush().unwrap();
            }
            let s = open(dir.path());
            s.recover(NOW).await.unwrap();
            assert!(s.next_timer().await.is_ok());
            s.tick(NOW + 1).await.unwrap();
            s.close().await.unwrap();
        }
        let s = open(dir.path());
        assert_eq!(s.tick(m.expires_at).await.unwrap().expired, 1);
        s.close().await.unwrap();
    }

    /// A timer key that cannot be read is dropped, not read at every tick
    /// in front of the timers behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_timer_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let m = message(&be);
        let s = open(dir.path());
        s.submit(m.clone(), NOW).await.unwrap();
        s.close().await.unwrap();
        drop(s);
        {
            let db = raw_db(dir.path());
            // sorts before every real timer key
            db.open_tree("timers")
                .unwrap()
                .insert(&[0u8, 1, 2][..], &[][..])
                .unwrap();
            db.flush().unwrap();
        }
        let s = open(dir.path());
        let report = s.tick(m.expires_at).await.unwrap();
        assert_eq!(report.expired, 1);
        assert_eq!(s.tick(m.expires_at).await.unwrap(), TickReport::default());
        s.close().await.unwrap();
    }

    /// Older stores wrote a leased record in full (IN_FLIGHT) and kept the
    /// lease in `inflight` (recipient, seq → stream) with a `Lease` timer,
    /// or in `leases` (deadline, seq → stream). `recover` makes such a
    /// message due again and empties those trees; a left-over timer goes
    /// stale.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_of_older_stores_are_recovered() {
        for legacy_tree in ["inflight", "leases"] {
            let dir = tempfile::tempdir().unwrap();
            let be = ParticipantId::parse("BE-PAYOKE").unwrap();
            let m = message(&be);
            let s = open(dir.path());
            s.submit(m.clone(), NOW).await.unwrap();
            let leased = s.lease(&be, StreamId(4), 1, u64::MAX, NOW).await.unwrap();
            let seq = leased[0].broker_seq;
            s.close().await.unwrap();
            drop(s);
            {
                // rewrite the lease as an older broker stored it
                let db = raw_db(dir.path());
                let key = seq.to_be_bytes();
                let entry = db
                    .open_tree("leased")
                    .unwrap()
                    .remove(key)
                    .unwrap()
                    .unwrap();
                let entry = LeaseEntry::decode(&entry).unwrap();
                let records = db.open_tree("records").unwrap();
                let stored = Record::decode(&records.get(key).unwrap().unwrap()).unwrap();
                records.insert(key, entry.apply(stored).encode()).unwrap();
                let stream = entry.stream.to_be_bytes();
                let legacy_key = if legacy_tree == "inflight" {
                    let mut k = participant_prefix(&be);
                    k.extend_from_slice(&key);
                    k
                } else {
                    let mut k = entry.deadline.to_be_bytes().to_vec();
                    k.extend_from_slice(&key);
                    k
                };
                db.open_tree(legacy_tree)
                    .unwrap()
                    .insert(legacy_key, &stream)
                    .unwrap();
                let mut timer = entry.deadline.to_be_bytes().to_vec();
                timer.push(1);
                timer.extend_from_slice(&key);
                db.open_tree("timers")
                    .unwrap()
                    .insert(timer, &[][..])
                    .unwrap();
                db.flush().unwrap();
            }
            let s = open(dir.path());
            let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
            assert_eq!((st.state, st.attempts), (State::InFlight, 1));
            assert_eq!(s.recover(NOW).await.unwrap(), 1, "{legacy_tree}");
            let again = s
                .lease(&be, StreamId(5), 10, u64::MAX, NOW + 1_000)
                .await
                .unwrap();
            assert_eq!(again.len(), 1);
            assert_eq!(again[0].attempt, 2);
            // the old lease timer does not time the new lease out
            let report = s.tick(NOW + 60_000).await.unwrap();
            assert_eq!(report.redelivery_due, 0);
            let st = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
            assert_eq!((st.state, st.attempts), (State::InFlight, 2));
            let stats = s.queue_stats().await.unwrap();
            assert_eq!((stats[0].depth, stats[0].in_flight), (0, 1));
            s.close().await.unwrap();
            drop(s);
            let db = raw_db(dir.path());
            assert!(db.open_tree(legacy_tree).unwrap().is_empty());
        }
    }

    /// Leases that the writer merges into one batch, for `(stream, max, max_bytes)` in
    /// that order (the writer is held until all are queued): the ids each got.
    async fn leases_in_one_batch(
        s: &SledStore,
        be: &ParticipantId,
        leases: &[(u64, usize, u64)],
    ) -> Vec<Vec<MessageId>> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let hold = s.inner.writer.exclusive(move |_| {
            let _ = held.recv();
            Ok(())
        });
        let mut hold = std::pin::pin!(hold);
        // (each queues its job on its first poll)
        assert!(futures::poll!(hold.as_mut()).is_pending());
        let mut pending = Vec::new();
        for &(stream, max, max_bytes) in leases {
            let mut lease = s.lease(be, StreamId(stream), max, max_bytes, NOW);
            assert!(futures::poll!(lease.as_mut()).is_pending());
            pending.push(lease);
        }
        release.send(()).unwrap();
        hold.await.unwrap();
        let mut out = Vec::new();
        for lease in pending {
            out.push(lease.await.unwrap().iter().map(|l| l.message_id).collect());
        }
        out
    }

    /// Two streams of one recipient whose leases fall in one writer batch: the first
    /// stops at its byte budget, short of what it picked before the batch began. What
    /// it left is the second's, in lease order: the second must neither skip past it
    /// (delivering later messages first on its stream) nor answer "nothing due" while
    /// it waits (its stream would sleep, with room and free slots, until something
    /// else wakes it, possibly only when the first stream's slow link drains).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_lease_leaves_at_its_byte_budget_goes_to_the_next_lease_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        let mut ids = Vec::new();
        for _ in 0..6 {
            let m = message(&be);
            ids.push(m.message_id);
            s.submit(m, NOW).await.unwrap();
        }
        let size = b"payload".len() as u64;
        // the first takes one (its budget), the second the next three, in order
        let got = leases_in_one_batch(&s, &be, &[(1, 3, size), (2, 3, u64::MAX)]).await;
        assert_eq!(got, vec![ids[..1].to_vec(), ids[1..4].to_vec()]);
        // the first picks every message left, and takes one: the rest is the second's
        let got = leases_in_one_batch(&s, &be, &[(3, 10, size), (4, 10, u64::MAX)]).await;
        assert_eq!(got, vec![ids[4..5].to_vec(), ids[5..].to_vec()]);
        s.close().await.unwrap();
    }

    /// An expired receipt's payload is gone from the disk's trees at its expiry, not
    /// at the dead-letter retention (it is never redriven), and the store verifies
    /// consistent: the record keeps its metadata and no payload timer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_receipt_is_stored_without_its_payload() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let life = Lifecycle::default();
        let s = open(dir.path());
        let m = message(&be);
        s.submit(m.clone(), NOW).await.unwrap();
        s.lease(&be, StreamId(1), 1, u64::MAX, NOW).await.unwrap();
        s.ack(&be, &[m.message_id], NOW).await.unwrap();
        let expired_at = after(NOW, life.metadata_retention);
        assert_eq!(s.tick(expired_at).await.unwrap().expired, 1);
        let receipt = MessageId::receipt_for(m.message_id, pb::Outcome::Delivered);
        let seqs: Vec<u64> = s.inner.core.trees[BY_ID]
            .get(receipt.as_bytes())
            .unwrap()
            .map(|v| decode_seqs(&v).unwrap())
            .unwrap_or_default();
        assert_eq!(seqs.len(), 1);
        let stored = s.inner.core.trees[RECORDS]
            .get(seqs[0].to_be_bytes())
            .unwrap()
            .unwrap();
        let record = Record::decode_stored(&stored).unwrap();
        assert_eq!(record.state, State::Expired);
        assert!(
            !record.payload_kept && record.payload.is_none(),
            "an expired receipt stored with its payload"
        );
        assert!(s.inner.core.trees[PAYLOADS].is_empty());
        assert!(
            !s.inner.core.trees[TIMERS].iter().keys().any(|k| {
                parse_timer_key(&k.unwrap()).unwrap().1 == TimerKind::PayloadRetention
            }),
            "a payload retention timer is left"
        );
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// A tick whose flush fails has committed its timers all the same: it reports what
    /// they did with the error (the lease of the message that expired in flight, whose
    /// slot the stream frees: no later tick reports it again), and the state stays so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_tick_reports_what_it_committed() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        let mut m = message(&be);
        m.expires_at = NOW + 1_000; // before its ack deadline
        s.submit(m.clone(), NOW).await.unwrap();
        let leased = s.lease(&be, StreamId(1), 1, u64::MAX, NOW).await.unwrap();
        assert_eq!(leased.len(), 1);
        let deadline = after(NOW, Lifecycle::default().ack_timeout);
        s.fault_switch().set_failing(true);
        let failed = s.tick(m.expires_at).await.unwrap_err();
        assert!(
            matches!(failed.error, StoreError::Unavailable(_)),
            "{failed:?}"
        );
        assert_eq!(failed.applied.expired, 1, "{failed:?}");
        assert_eq!(
            failed.applied.expired_in_flight,
            vec![crate::store::ExpiredLease {
                recipient: be.clone(),
                message_id: m.message_id,
                deadline,
            }]
        );
        s.fault_switch().set_failing(false);
        let again = s.tick(m.expires_at).await.unwrap();
        assert_eq!(again.expired, 0, "{again:?}");
        assert!(again.expired_in_flight.is_empty(), "{again:?}");
        let status = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
        assert_eq!(status.state, State::Expired);
        s.close().await.unwrap();
    }

    /// The same for a lease whose last attempt's ack deadline passed: a tick whose flush
    /// fails reports it dead-lettered in flight with the error (the timer loop drops its
    /// waiting copies and frees its slot: no later tick reports it again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_tick_reports_the_leases_it_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let life = Lifecycle {
            max_attempts: 1,
            ..Lifecycle::default()
        };
        let s = SledStore::open(dir.path(), SledOptions::default(), life.clone()).unwrap();
        let m = message(&be);
        s.submit(m.clone(), NOW).await.unwrap();
        assert_eq!(
            s.lease(&be, StreamId(1), 1, u64::MAX, NOW)
                .await
                .unwrap()
                .len(),
            1
        );
        let deadline = after(NOW, life.ack_timeout);
        s.fault_switch().set_failing(true);
        let failed = s.tick(deadline).await.unwrap_err();
        assert_eq!(failed.applied.dead_lettered, 1, "{failed:?}");
        assert_eq!(
            failed.applied.dead_lettered_in_flight,
            vec![crate::store::ExpiredLease {
                recipient: be.clone(),
                message_id: m.message_id,
                deadline,
            }]
        );
        s.fault_switch().set_failing(false);
        let again = s.tick(deadline).await.unwrap();
        assert_eq!(again.dead_lettered, 0, "{again:?}");
        assert!(again.dead_lettered_in_flight.is_empty(), "{again:?}");
        let status = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
        assert_eq!(status.state, State::DeadLettered);
        s.close().await.unwrap();
    }

    /// The same for a stream's release: one whose flush fails reports the lease it
    /// dead-lettered, and what it requeued, with the error (the service counts the dead
    /// letter and drops the message's copies waiting in the recipient's other streams:
    /// nothing releases that lease again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_release_reports_what_it_released() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let life = Lifecycle {
            max_attempts: 1,
            ..Lifecycle::default()
        };
        let s = SledStore::open(dir.path(), SledOptions::default(), life.clone()).unwrap();
        let m = message(&be);
        s.submit(m.clone(), NOW).await.unwrap();
        assert_eq!(
            s.lease(&be, StreamId(1), 1, u64::MAX, NOW)
                .await
                .unwrap()
                .len(),
            1
        );
        s.fault_switch().set_failing(true);
        let failed = s
            .release_stream(&be, StreamId(1), StreamEnd::Recipient, NOW + 1)
            .await
            .unwrap_err();
        let committed = failed.committed.expect("the release was committed");
        assert_eq!(committed.dead_lettered, 1, "{committed:?}");
        assert_eq!(
            committed.dead_lettered_in_flight,
            vec![crate::store::ExpiredLease {
                recipient: be.clone(),
                message_id: m.message_id,
                deadline: after(NOW, life.ack_timeout),
            }]
        );
        s.fault_switch().set_failing(false);
        let again = s
            .release_stream(&be, StreamId(1), StreamEnd::Recipient, NOW + 2)
            .await
            .unwrap();
        assert_eq!(again, Released::default());
        let status = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
        assert_eq!(status.state, State::DeadLettered);
        s.close().await.unwrap();
    }

    /// The same for a `Submit`: one whose flush fails reports the message it stored with
    /// the error (the service counts it: it is kept and delivered), and the sender's
    /// retry is a duplicate of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_submit_reports_what_it_stored() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        let m = message(&be);
        s.fault_switch().set_failing(true);
        let failed = s.submit(m.clone(), NOW).await.unwrap_err();
        assert!(
            matches!(failed.error, StoreError::Unavailable(_)),
            "{failed:?}"
        );
        let Some(SubmitOutcome::Accepted(first)) = failed.committed else {
            panic!("the submit's write is not reported: {failed:?}");
        };
        s.fault_switch().set_failing(false);
        assert_eq!(
            s.submit(m.clone(), NOW + 1).await.unwrap(),
            SubmitOutcome::Duplicate(first)
        );
        let leased = s
            .lease(&be, StreamId(1), 1, u64::MAX, NOW + 1)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].message_id, m.message_id);
        s.close().await.unwrap();
    }

    /// The same for a `Reject`: one whose flush fails reports the message it rejected
    /// with the error (the service counts the dead letter and frees its stream slot),
    /// and the node's repeat finds it rejected `already`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_reject_reports_what_it_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        let m = message(&be);
        s.submit(m.clone(), NOW).await.unwrap();
        let leased = s.lease(&be, StreamId(1), 1, u64::MAX, NOW).await.unwrap();
        assert_eq!(leased.len(), 1);
        s.fault_switch().set_failing(true);
        let failed = s
            .reject(&be, m.message_id, "INVALID_BODY", "referral", NOW)
            .await
            .unwrap_err();
        assert!(
            matches!(failed.error, StoreError::Unavailable(_)),
            "{failed:?}"
        );
        assert_eq!(
            failed.committed,
            Some(RejectResult::Rejected { already: false })
        );
        s.fault_switch().set_failing(false);
        assert_eq!(
            s.reject(&be, m.message_id, "INVALID_BODY", "referral", NOW)
                .await
                .unwrap(),
            RejectResult::Rejected { already: true }
        );
        let status = s.status(&m.sender, m.message_id).await.unwrap().unwrap();
        assert_eq!(status.state, State::DeadLettered);
        s.close().await.unwrap();
    }

    /// sled holds every value a transaction read until it commits, and a record carries
    /// its payload: the batches of a tick, of a closed stream's requeue, of `recover`'s
    /// requeue and of its backoff shortening each read up to 256 records in one
    /// transaction, 2 GiB of large messages at the default `max_envelope_bytes`. Each now
    /// stops at `BATCH_READ_BYTES` of records, and still does all its work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_large_messages_is_cut_at_its_byte_budget() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let most = BATCH_READ_BYTES as usize / LARGE + 1;
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        let large = |expires_at: Millis| {
            let mut m = message(&be);
            m.payload = bytes::Bytes::from(vec![7u8; LARGE]);
            m.payload_sha256 = sha256(&m.payload);
            m.expires_at = expires_at;
            m
        };
        let largest = |s: &SledStore| {
            s.inner
                .core
                .largest_batch
                .swap(0, std::sync::atomic::Ordering::Relaxed)
        };
        let mut ids = Vec::new();
        for _ in 0..N {
            let m = large(NOW + 24 * 3600 * 1000);
            ids.push(m.message_id);
            s.submit(m, NOW).await.unwrap();
        }
        largest(&s);

        // a closed stream: every delivery a failed attempt, backing off
        let leased = s.lease(&be, StreamId(1), N, u64::MAX, NOW).await.unwrap();
        assert_eq!(leased.len(), N);
        let released = s
            .release_stream(&be, StreamId(1), StreamEnd::Recipient, NOW)
            .await
            .unwrap();
        assert_eq!(released.requeued, N as u64, "{released:?}");
        let batch = largest(&s);
        assert!(
            (1..=most).contains(&batch),
            "the stream's requeue read {batch} records at once"
        );

        // a start with the clock an hour behind: every backoff brought forward
        let (shortened, _) = s.inner.core.shorten_backoffs(NOW - 3_600_000).unwrap();
        assert_eq!(shortened, N as u64);
        let batch = largest(&s);
        assert!(
            (1..=most).contains(&batch),
            "the backoffs' shortening read {batch} records at once"
        );

        // their backoffs end: a tick makes them due
        let later = NOW + 3_600_000;
        let due = s.tick(later).await.unwrap();
        assert_eq!(due.woken, vec![be.clone()], "{due:?}");
        let batch = largest(&s);
        assert!(
            (1..=most).contains(&batch),
            "a tick read {batch} records at once"
        );

        // a restart with all of them in flight: all due again
        let leased = s.lease(&be, StreamId(2), N, u64::MAX, later).await.unwrap();
        assert_eq!(leased.len(), N);
        largest(&s);
        assert_eq!(s.recover(later).await.unwrap(), N as u64);
        let batch = largest(&s);
        assert!(
            (1..=most).contains(&batch),
            "the restart's requeue read {batch} records at once"
        );

        // a tick expiring them all, half of them in flight
        let end = NOW + 24 * 3600 * 1000;
        let leased = s
            .lease(&be, StreamId(3), N / 2, u64::MAX, end - 1_000)
            .await
            .unwrap();
        assert_eq!(leased.len(), N / 2);
        largest(&s);
        let expired = s.tick(end).await.unwrap();
        assert_eq!(expired.expired, N as u64, "{expired:?}");
        assert_eq!(expired.expired_in_flight.len(), N / 2, "{expired:?}");
        let batch = largest(&s);
        assert!(
            (1..=most).contains(&batch),
            "a tick read {batch} records at once"
        );
        for id in ids {
            let status = s.status(&message(&be).sender, id).await.unwrap().unwrap();
            assert_eq!(status.state, State::Expired);
        }
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// A tick cut at its byte budget between lease deadlines of the same millisecond, and
    /// between the last of them and the expiries of that millisecond, still fires every
    /// lease before the expiry of its message (no message expires in flight, which would
    /// free its stream's slot a second time) and fires each lease once: the leases that
    /// come next round are exactly those the cut left in `due_leases`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tick_cut_among_leases_and_expiries_of_one_millisecond_fires_each_in_order() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let most = BATCH_READ_BYTES as usize / LARGE + 1;
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        let deadline = after(NOW, Lifecycle::default().ack_timeout);
        for _ in 0..N {
            let mut m = message(&be);
            m.payload = bytes::Bytes::from(vec![7u8; LARGE]);
            m.payload_sha256 = sha256(&m.payload);
            // (its expiry at its lease's deadline: the lease fires first)
            m.expires_at = deadline;
            s.submit(m, NOW).await.unwrap();
        }
        let leased = s.lease(&be, StreamId(1), N, u64::MAX, NOW).await.unwrap();
        assert_eq!(leased.len(), N);
        s.inner
            .core
            .largest_batch
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        let report = s.tick(deadline).await.unwrap();
        let batch = s
            .inner
            .core
            .largest_batch
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        assert!(
            (1..=most).contains(&batch),
            "a tick read {batch} records at once"
        );
        assert_eq!(report.expired, N as u64, "{report:?}");
        assert!(
            report.expired_in_flight.is_empty(),
            "leases the cut left were not fired before their expiries: {report:?}"
        );
        let again = s.tick(deadline).await.unwrap();
        assert_eq!(again, TickReport::default(), "{again:?}");
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// A tick that fails in a later batch (one whose message's counters cannot be read,
    /// after a full batch of expiries) reports what its committed first batch did: every
    /// expiry, the lease that expired in flight among them (its stream frees the slot).
    /// The next tick neither applies nor reports them again (no slot freed twice, no
    /// expiry counted twice in `/metrics`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tick_failing_in_a_later_batch_reports_the_batches_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (be, iom) = (
            ParticipantId::parse("BE-PAYOKE").unwrap(),
            ParticipantId::parse("INT-IOM").unwrap(),
        );
        let s = open(dir.path());
        let expires_at = NOW + 1_000; // before the ack deadline
        let mut first = None;
        for _ in 0..TICK_BATCH {
            let mut m = message(&be);
            m.expires_at = expires_at;
            s.submit(m.clone(), NOW).await.unwrap();
            first.get_or_insert(m);
        }
        let first = first.unwrap();
        let leased = s.lease(&be, StreamId(1), 1, u64::MAX, NOW).await.unwrap();
        assert_eq!(leased[0].message_id, first.message_id);
        // expiring in the next batch, with its recipient's counters unreadable
        let mut later = message(&iom);
        later.expires_at = expires_at + 1;
        s.submit(later.clone(), NOW).await.unwrap();
        s.inner.core.trees[COUNTERS]
            .insert(
                super::super::codec::recipient_counter_key(&iom),
                &[0xff][..],
            )
            .unwrap();
        let failed = s.tick(later.expires_at).await.unwrap_err();
        assert!(matches!(failed.error, StoreError::Corrupt(_)), "{failed:?}");
        assert_eq!(
            failed.applied.expired, TICK_BATCH as u64,
            "{:?}",
            failed.error
        );
        assert_eq!(
            failed
                .applied
                .expired_in_flight
                .iter()
                .map(|l| l.message_id)
                .collect::<Vec<_>>(),
            vec![first.message_id]
        );
        let again = s.tick(expires_at).await.unwrap();
        assert_eq!(
            (again.expired, again.expired_in_flight.len()),
            (0, 0),
            "{again:?}"
        );
        s.close().await.unwrap();
    }

    /// The stored record of `seq` in the closed store `db`, rewritten as
    /// a version before the deletion of unusable payloads left it: its
    /// payload `payload` kept until the dead-letter retention, with its timer.
    fn keep_payload_as_before(db: &::sled::Db, seq: u64, payload: &::sled::IVec, dlr: Millis) {
        let records = db.open_tree("records").unwrap();
        let mut record =
            Record::decode_stored(&records.get(seq.to_be_bytes()).unwrap().unwrap()).unwrap();
        assert!(!record.payload_kept, "{record:?}");
        record.payload_kept = true;
        record.payload = Some(super::super::codec::InlinePayload(payload.clone()));
        let at = record.state_changed_at + dlr;
        record.payload_delete_at = Some(at);
        records.insert(seq.to_be_bytes(), record.encode()).unwrap();
        db.open_tree("timers")
            .unwrap()
            .insert(
                super::super::codec::timer_key(at, TimerKind::PayloadRetention, seq),
                &[][..],
            )
            .unwrap();
    }

    /// A store written before expired receipts and rejected messages lost their
    /// payloads at once keeps them until the dead-letter retention: its first open
    /// deletes them, keeping state, metadata and its retention, and `store verify`
    /// finds the store consistent before and after. It does so again after an
    /// earlier version ran on the store (which may keep such payloads again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_written_before_keeps_no_unusable_payload_after_open() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        // (a dead-letter retention longer than the metadata's: the rejected
        // message's metadata outlives the receipt's expiry)
        let default = Lifecycle::default();
        let life = Lifecycle {
            dead_letter_retention: default.metadata_retention * 2,
            ..default
        };
        let dlr = after(0, life.dead_letter_retention);
        let open = |dir: &std::path::Path| {
            SledStore::open(dir, SledOptions::default(), life.clone()).unwrap()
        };
        let s = open(dir.path());
        let (acked, rejected, redrivable) = (message(&be), message(&be), message(&be));
        for m in [&acked, &rejected] {
            s.submit(m.clone(), NOW).await.unwrap();
        }
        let mut short = redrivable.clone();
        short.expires_at = NOW + 1_000;
        s.submit(short, NOW).await.unwrap();
        s.lease(&be, StreamId(1), 3, u64::MAX, NOW).await.unwrap();
        s.ack(&be, &[acked.message_id], NOW).await.unwrap();
        let seq_of = |id: MessageId| -> u64 {
            let seqs = decode_seqs(
                &s.inner.core.trees[BY_ID]
                    .get(id.as_bytes())
                    .unwrap()
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(seqs.len(), 1);
            seqs[0]
        };
        let receipt = seq_of(MessageId::receipt_for(
            acked.message_id,
            pb::Outcome::Delivered,
        ));
        let rejected_seq = seq_of(rejected.message_id);
        let redrivable_seq = seq_of(redrivable.message_id);
        let stored = |s: &SledStore, seq: u64| {
            Record::decode_stored(
                &s.inner.core.trees[RECORDS]
                    .get(seq.to_be_bytes())
                    .unwrap()
                    .unwrap(),
            )
            .unwrap()
        };
        // the payloads as stored before the rejection and the expiry
        let payloads = [receipt, rejected_seq]
            .map(|seq| stored(&s, seq).payload.expect("stored with its record").0);
        s.reject(&be, rejected.message_id, "SCHEMA", "referral", NOW)
            .await
            .unwrap();
        // the message expires (its payload kept for a redrive), then the receipts
        let expired_at = after(NOW, life.metadata_retention);
        s.tick(NOW + 1_000).await.unwrap();
        assert!(s.tick(expired_at).await.unwrap().expired >= 1);
        let before = [receipt, rejected_seq].map(|seq| stored(&s, seq));
        assert_eq!(before[0].state, State::Expired);
        assert_eq!(before[1].state, State::DeadLettered);
        s.close().await.unwrap();
        drop(s);
        let as_before = |earlier_run: Option<Millis>| {
            let db = raw_db(dir.path());
            for (seq, payload) in [receipt, rejected_seq].into_iter().zip(&payloads) {
                keep_payload_as_before(&db, seq, payload, dlr);
            }
            let meta = db.open_tree("meta").unwrap();
            match earlier_run {
                // an earlier version marks its runs, not this pass
                Some(at) => {
                    meta.insert(super::super::RUNNING_KEY, &at.to_be_bytes()[..])
                        .unwrap();
                }
                None => {
                    meta.remove(UNUSABLE_PAYLOADS_DROPPED_KEY).unwrap();
                }
            }
            db.flush().unwrap();
        };
        for earlier_run in [None, Some(NOW + 5)] {
            as_before(earlier_run);
            let report = crate::store::verify_store_offline(dir.path()).unwrap();
            assert!(report.is_consistent(), "{report}");
            let s = open(dir.path());
            for (seq, old) in [receipt, rejected_seq].into_iter().zip(&before) {
                let now = stored(&s, seq);
                assert!(
                    !now.payload_kept && now.payload.is_none() && now.payload_delete_at.is_none(),
                    "an unusable payload kept after open: {now:?}"
                );
                assert_eq!(
                    (now.state, now.state_changed_at, now.metadata_delete_at),
                    (old.state, old.state_changed_at, old.metadata_delete_at)
                );
            }
            assert!(
                !s.inner.core.trees[TIMERS].iter().keys().any(|k| {
                    let (_, kind, seq) = parse_timer_key(&k.unwrap()).unwrap();
                    kind == TimerKind::PayloadRetention && seq != redrivable_seq
                }),
                "a payload retention timer is left"
            );
            // the expired message keeps its payload for a redrive
            assert!(stored(&s, redrivable_seq).payload_kept);
            // all three still listed, as dead letters are
            let dead = s.dead_letters(0, None).await.unwrap().records;
            assert!(
                dead.iter()
                    .any(|r| r.message_id == redrivable.message_id && r.redrivable)
            );
            for id in [rejected.message_id, before[0].message_id] {
                assert!(
                    dead.iter().any(|r| r.message_id == id && !r.payload_kept),
                    "{dead:?}"
                );
            }
            s.close().await.unwrap();
            drop(s);
            let report = crate::store::verify_store_offline(dir.path()).unwrap();
            assert!(report.is_consistent(), "{report}");
        }
    }

    /// The peak resident set of this process since the last reset (kB), and a reset.
    fn peak_rss_kb(reset: bool) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if reset {
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
        kb
    }

    /// A dead letter as a version before the one-time deletion stored it: `kind` 0 a
    /// redrivable message, 1 an expired receipt, 2 a rejected message, each with its
    /// payload of `size` bytes kept for the dead-letter retention.
    fn dead_as_before(seq: u64, kind: u8, size: usize) -> Record {
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let payload = vec![(seq % 251) as u8; size];
        Record {
            seq,
            message_id: MessageId::new_v7(),
            sender: (kind != 1).then(|| nl.clone()),
            recipient: be,
            kind: Kind::Referral,
            case_ref: CaseRef::new_random(),
            in_reply_to: None,
            priority: Priority::Normal,
            created_at: NOW,
            expires_at: NOW + 1,
            accepted_at: NOW,
            content_type: Kind::Referral.content_type(),
            payload_sha256: sha256(&payload),
            payload_size: size as u64,
            fingerprint: [0; 32],
            state: if kind == 2 {
                State::DeadLettered
            } else {
                State::Expired
            },
            attempts: 1,
            last_delivered_at: None,
            state_changed_at: NOW,
            next_attempt_at: None,
            lease: None,
            reason_code: "EXPIRED".to_owned(),
            field_path: String::new(),
            payload_kept: true,
            rejected: kind == 2,
            payload_delete_at: Some(NOW + 1_000_000),
            metadata_delete_at: Some(NOW + 2_000_000),
            note: String::new(),
            payload: Some(super::super::codec::InlinePayload(::sled::IVec::from(
                payload,
            ))),
        }
    }

    /// Figures, not a check: the open of a store of `TRMX_DEAD` (100,000) dead letters
    /// of `TRMX_PAYLOAD` (2,048) bytes, a third of them unusable payloads an earlier
    /// version kept (`TRMX_MARK=backoff_indexed`: the backoff indexing's figures instead).
    /// `cargo test -p trmx-broker --lib open_figures -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn open_figures_of_a_store_of_many_dead_letters() {
        let n: u64 = std::env::var("TRMX_DEAD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let size: usize = std::env::var("TRMX_PAYLOAD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048);
        let dir = tempfile::tempdir_in(std::env::var("TRMX_DIR").unwrap_or("/tmp".into())).unwrap();
        let s = open(dir.path());
        let mut made = 0u64;
        while made < n {
            let chunk = (n - made).min(500);
            s.inner
                .core
                .transact(|tx| {
                    for i in 0..chunk {
                        let seq = tx.next_seq()?;
                        tx.put(
                            None,
                            Some(&dead_as_before(seq, ((made + i) % 3) as u8, size)),
                        )?;
                    }
                    Ok(())
                })
                .unwrap();
            made += chunk;
        }
        s.close().await.unwrap();
        drop(s);
        for again in [false, true, false] {
            {
                let db = raw_db(dir.path());
                let meta = db.open_tree("meta").unwrap();
                if again {
                    let mark = std::env::var("TRMX_MARK").unwrap_or_default();
                    meta.remove(if mark.is_empty() {
                        UNUSABLE_PAYLOADS_DROPPED_KEY
                    } else {
                        mark.as_bytes()
                    })
                    .unwrap();
                }
                db.flush().unwrap();
            }
            peak_rss_kb(true);
            let before = peak_rss_kb(false);
            let started = std::time::Instant::now();
            let s = open(dir.path());
            let took = started.elapsed();
            let peak = peak_rss_kb(false);
            eprintln!(
                "FIGURES dead={n} payload={size} pass={again}: open {took:?}, peak rss {} MiB (before {} MiB)",
                peak / 1024,
                before / 1024
            );
            s.close().await.unwrap();
            drop(s);
        }
    }

    /// The one-time deletion of unusable payloads reads in its transactions only the
    /// records whose payload goes, and at most `BATCH_READ_BYTES` of payload each (one
    /// payload more): a transaction holds what it read until it commits, and dead letters
    /// kept for a redrive may be many and large. Every unusable payload still goes, and
    /// every redrivable one stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_deletion_of_unusable_payloads_holds_only_what_it_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        const LARGE: usize = 1 << 20;
        // (more than `BATCH_READ_BYTES` of rejected messages, and as much kept for a
        // redrive, between them expired receipts: in seq order, as `dead` is read)
        let each = (BATCH_READ_BYTES as usize / LARGE) + 4;
        let seqs = s
            .inner
            .core
            .transact(|tx| {
                let mut seqs = Vec::new();
                for i in 0..3 * each {
                    let kind = (i % 3) as u8;
                    let seq = tx.next_seq()?;
                    let size = if kind == 1 { 100 } else { LARGE };
                    tx.put(None, Some(&dead_as_before(seq, kind, size)))?;
                    seqs.push((seq, kind));
                }
                Ok(seqs)
            })
            .unwrap();
        s.inner
            .core
            .meta
            .remove(UNUSABLE_PAYLOADS_DROPPED_KEY)
            .unwrap();
        let done = s.inner.core.drop_unusable_payloads().unwrap();
        assert_eq!(done.dropped, 2 * each as u64, "{done:?}");
        assert!(
            done.most_bytes_held <= BATCH_READ_BYTES + LARGE as u64,
            "a transaction of the deletion held {} payload bytes (at most {BATCH_READ_BYTES} \
             and one payload expected)",
            done.most_bytes_held
        );
        for (seq, kind) in seqs {
            let record = s.inner.core.load(seq).unwrap().unwrap();
            assert_eq!(record.payload_kept, kind == 0, "{kind}: {record:?}");
        }
        // done: a second pass in step reads nothing
        assert_eq!(
            s.inner.core.drop_unusable_payloads().unwrap(),
            DroppedPayloads::default()
        );
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// `store accept-clock` records a new last run: the marks of the one-time passes (the
    /// `backoff` index, the deletion of unusable payloads) stay in step with it when they
    /// were, so that the next start does not read every record again, and stay out of
    /// step when an earlier version ran since, so that it still does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accepting_the_clock_keeps_the_marks_of_the_one_time_passes_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.mark_running(NOW).await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let marks = |dir: &std::path::Path| {
            let db = raw_db(dir);
            let meta = db.open_tree("meta").unwrap();
            [BACKOFF_INDEXED_KEY, UNUSABLE_PAYLOADS_DROPPED_KEY]
                .map(|key| in_step(&meta, key).unwrap())
        };
        crate::store::accept_clock_offline(dir.path(), NOW + 60_000, "test").unwrap();
        assert_eq!(marks(dir.path()), [true, true], "a mark left out of step");
        {
            // an earlier version ran since: it marks its runs, not the passes
            let db = raw_db(dir.path());
            db.open_tree("meta")
                .unwrap()
                .insert(b"running_at", &(NOW + 120_000).to_be_bytes()[..])
                .unwrap();
            db.flush().unwrap();
        }
        crate::store::accept_clock_offline(dir.path(), NOW + 180_000, "test").unwrap();
        assert_eq!(marks(dir.path()), [false, false], "a mark put in step");
    }

    /// The deletion of unusable payloads goes by what each record says, not by the `dead`
    /// index: a receipt still to deliver keeps its payload though a stray `dead` entry
    /// names it. A payload in the `payloads` tree of records written before payloads moved
    /// into the record goes too. A pass cut short (a crash before its mark) leaves every
    /// record consistent, and the next open does the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_deletion_of_unusable_payloads_goes_by_the_record_and_is_finished_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let (waiting, old_format, many) = s
            .inner
            .core
            .transact(|tx| {
                let waiting_seq = tx.next_seq()?;
                let mut waiting = dead_as_before(waiting_seq, 1, 100);
                waiting.state = State::Accepted;
                waiting.reason_code = String::new();
                waiting.payload_delete_at = None;
                waiting.metadata_delete_at = None;
                tx.put(None, Some(&waiting))?;
                tx.t[DEAD].insert(&waiting_seq.to_be_bytes(), &[][..])?;
                let old_seq = tx.next_seq()?;
                let mut old_format = dead_as_before(old_seq, 1, 100);
                let payload = old_format.payload.take().unwrap();
                tx.put(None, Some(&old_format))?;
                tx.t[PAYLOADS].insert(&old_seq.to_be_bytes(), payload.0)?;
                let mut many = Vec::new();
                for i in 0..2 * DROP_BATCH {
                    let seq = tx.next_seq()?;
                    tx.put(None, Some(&dead_as_before(seq, 1 + (i % 2) as u8, 100)))?;
                    many.push(seq);
                }
                Ok((waiting_seq, old_seq, many))
            })
            .unwrap();
        s.inner
            .core
            .meta
            .remove(UNUSABLE_PAYLOADS_DROPPED_KEY)
            .unwrap();
        // a first batch done, then a crash: no mark
        let mut done = DroppedPayloads::default();
        s.inner
            .core
            .drop_payloads_of(&many[..DROP_BATCH / 2], &mut done)
            .unwrap();
        assert_eq!(done.dropped, DROP_BATCH as u64 / 2);
        s.close().await.unwrap();
        drop(s);
        let s = open(dir.path());
        let kept = |seq: u64| s.inner.core.load(seq).unwrap().unwrap().payload_kept;
        assert!(many.iter().all(|&seq| !kept(seq)), "a payload left");
        let waiting_now = s.inner.core.load(waiting).unwrap().unwrap();
        assert!(
            waiting_now.state == State::Accepted && waiting_now.payload_kept,
            "a receipt still to deliver lost its payload: {waiting_now:?}"
        );
        assert!(!kept(old_format));
        assert!(
            s.inner.core.trees[PAYLOADS]
                .get(old_format.to_be_bytes())
                .unwrap()
                .is_none(),
            "an unusable payload left in the `payloads` tree"
        );
        // (the stray entry out, the store is consistent)
        s.inner.core.trees[DEAD]
            .remove(waiting.to_be_bytes())
            .unwrap();
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// The messages of the events `f` logs at `level` on this thread.
    fn messages_logged(level: tracing::Level, f: impl FnOnce()) -> Vec<String> {
        use tracing_subscriber::layer::SubscriberExt;
        keep_callsites_interesting();

        struct Messages(Arc<std::sync::Mutex<Vec<String>>>, tracing::Level);
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    *self.0 = format!("{value:?}");
                }
            }
        }
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Messages {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                if *event.metadata().level() == self.1 {
                    let mut message = String::new();
                    event.record(&mut Message(&mut message));
                    self.0.lock().unwrap().push(message);
                }
            }
        }

        let messages = Arc::new(std::sync::Mutex::new(Vec::new()));
        let subscriber =
            tracing_subscriber::registry().with(Messages(Arc::clone(&messages), level));
        tracing::subscriber::with_default(subscriber, f);
        std::mem::take(&mut *messages.lock().unwrap())
    }

    /// The deletion of unusable payloads reads every dead letter: the start of a store of
    /// many says why it takes a while before it begins, not only once it is done (and a
    /// store whose pass is done says nothing).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_deletion_of_unusable_payloads_says_why_the_start_is_slow_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.inner
            .core
            .transact(|tx| {
                for kind in [0, 1] {
                    let seq = tx.next_seq()?;
                    tx.put(None, Some(&dead_as_before(seq, kind, 100)))?;
                }
                Ok(())
            })
            .unwrap();
        s.inner
            .core
            .meta
            .remove(UNUSABLE_PAYLOADS_DROPPED_KEY)
            .unwrap();
        s.close().await.unwrap();
        drop(s);
        let why = "one read of every dead letter";
        for (again, expected) in [(false, true), (true, false)] {
            let mut opened = None;
            let logged = messages_logged(tracing::Level::INFO, || {
                opened = Some(open(dir.path()));
            });
            let s = opened.unwrap();
            let said = logged.iter().position(|m| m.contains(why));
            assert_eq!(said.is_some(), expected, "again: {again}, {logged:?}");
            if let Some(said) = said {
                let done = logged
                    .iter()
                    .position(|m| m.contains("no redrive can use them"))
                    .expect("the deletions said");
                assert!(said < done, "{logged:?}");
            }
            s.close().await.unwrap();
            drop(s);
        }
    }

    /// The seqs in the `backoff` index of the open store `s`.
    fn backoff_seqs(s: &SledStore) -> Vec<u64> {
        s.inner.core.trees[BACKOFF]
            .iter()
            .keys()
            .map(|key| seq_suffix(&key.unwrap()).unwrap())
            .collect()
    }

    /// A store written before the `backoff` index gets it at its first open:
    /// the oldest message of a queue is then one backing off before the
    /// upgrade (older than the one in flight), and the store verifies
    /// consistent before and after; once the index is complete, store verify
    /// finds an entry missing from it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_written_before_the_backoff_index_is_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let (first, second) = (message(&be), message(&be));
        let s = open(dir.path());
        let SubmitOutcome::Accepted(accepted) = s.submit(first.clone(), NOW).await.unwrap() else {
            panic!("not accepted");
        };
        s.submit(second.clone(), NOW + 1).await.unwrap();
        let leased = s
            .lease(&be, StreamId(1), 1, u64::MAX, NOW + 2)
            .await
            .unwrap();
        assert_eq!(leased[0].message_id, first.message_id);
        // its node closed the stream: backing off; the second in flight
        s.release_stream(&be, StreamId(1), StreamEnd::Recipient, NOW + 3)
            .await
            .unwrap();
        let leased = s
            .lease(&be, StreamId(2), 1, u64::MAX, NOW + 4)
            .await
            .unwrap();
        assert_eq!(leased[0].message_id, second.message_id);
        assert_eq!(backoff_seqs(&s), vec![accepted.broker_seq]);
        s.close().await.unwrap();
        drop(s);
        {
            // as a broker before the index left it
            let db = raw_db(dir.path());
            db.drop_tree("backoff").unwrap();
            db.open_tree("meta")
                .unwrap()
                .remove(BACKOFF_INDEXED_KEY)
                .unwrap();
            db.flush().unwrap();
        }
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
        let s = open(dir.path());
        assert_eq!(backoff_seqs(&s), vec![accepted.broker_seq]);
        let stats = s.queue_stats().await.unwrap();
        assert_eq!(stats[0].oldest_accepted_at, Some(NOW), "{stats:?}");
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
        {
            let db = raw_db(dir.path());
            db.open_tree("backoff").unwrap().clear().unwrap();
            db.flush().unwrap();
        }
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert_eq!(report.missing.get("backoff"), Some(&1), "{report}");
    }

    /// The `backoff` index holds exactly the messages backing off: one whose
    /// ack deadline passed gets its entry, and loses it when it is due again
    /// and when it expires while backing off; a message delivered and
    /// acknowledged at once never has one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backoff_index_holds_the_messages_backing_off() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let life = Lifecycle::default();
        let (timeout, base) = (
            after(0, life.ack_timeout),
            after(0, life.redelivery_backoff_base),
        );
        let s = open(dir.path());
        let seq = |outcome: SubmitOutcome| match outcome {
            SubmitOutcome::Accepted(a) => a.broker_seq,
            other => panic!("not accepted: {other:?}"),
        };
        let mut expiring = message(&be);
        expiring.expires_at = NOW + timeout + base / 2;
        let (redelivered, at_once) = (message(&be), message(&be));
        let expiring_seq = seq(s.submit(expiring.clone(), NOW).await.unwrap());
        let redelivered_seq = seq(s.submit(redelivered.clone(), NOW).await.unwrap());
        s.submit(at_once.clone(), NOW).await.unwrap();
        assert_eq!(
            s.lease(&be, StreamId(1), 3, u64::MAX, NOW)
                .await
                .unwrap()
                .len(),
            3
        );
        s.ack(&be, &[at_once.message_id], NOW).await.unwrap();
        assert!(backoff_seqs(&s).is_empty(), "delivered and acknowledged");
        // the ack deadline passed: both others back off
        let report = s.tick(NOW + timeout).await.unwrap();
        assert_eq!(report.redelivery_due, 2);
        assert_eq!(backoff_seqs(&s), vec![expiring_seq, redelivered_seq]);
        // one expires while backing off
        let report = s.tick(NOW + timeout + base / 2).await.unwrap();
        assert_eq!(report.expired, 1);
        assert_eq!(backoff_seqs(&s), vec![redelivered_seq]);
        // the other is due again, and delivered
        s.tick(NOW + timeout + base).await.unwrap();
        assert!(backoff_seqs(&s).is_empty(), "due again");
        let leased = s
            .lease(&be, StreamId(2), 3, u64::MAX, NOW + timeout + base)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].message_id, redelivered.message_id);
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// An open-time indexing that was interrupted (a crash, then the store run
    /// by the earlier version again) can leave `backoff` entries of messages
    /// that no longer back off: the next indexing starts from an empty
    /// `backoff`, so the index is what the records imply, not a superset.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_indexing_leaves_no_stale_backoff_entry() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        let SubmitOutcome::Accepted(queued) = s.submit(message(&be), NOW).await.unwrap() else {
            panic!("not accepted");
        };
        s.close().await.unwrap();
        drop(s);
        {
            // an entry the interrupted pass wrote while it was backing off,
            // and no mark that the index is complete
            let db = raw_db(dir.path());
            db.open_tree("backoff")
                .unwrap()
                .insert(
                    super::super::codec::backoff_key(&be, queued.broker_seq),
                    &[][..],
                )
                .unwrap();
            db.open_tree("meta")
                .unwrap()
                .remove(BACKOFF_INDEXED_KEY)
                .unwrap();
            db.flush().unwrap();
        }
        let s = open(dir.path());
        assert!(backoff_seqs(&s).is_empty(), "due now, not backing off");
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// A damaged key in `records` (too short for a seq) does not stop the
    /// start that indexes a store written before the `backoff` tree: like a
    /// damaged record, it is logged and left out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_record_key_does_not_stop_the_indexing_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        s.submit(message(&be), NOW).await.unwrap();
        s.close().await.unwrap();
        drop(s);
        {
            let db = raw_db(dir.path());
            db.open_tree("records")
                .unwrap()
                .insert(&b"bad"[..], &b"\xffnot a record"[..])
                .unwrap();
            db.open_tree("meta")
                .unwrap()
                .remove(BACKOFF_INDEXED_KEY)
                .unwrap();
            db.flush().unwrap();
        }
        let s = SledStore::open(dir.path(), SledOptions::default(), Lifecycle::default())
            .expect("a damaged record key must not stop the start");
        assert_eq!(s.queue_stats().await.unwrap()[0].depth, 1);
        s.close().await.unwrap();
    }

    /// The `backoff` index after every way out of a backoff: a withdraw and a
    /// purge while backing off, the attempts used up (dead-lettered), a
    /// redrive of the dead letter, and a restart's recovery of leases; at the
    /// end `store verify` finds it what the records imply, and the oldest
    /// message of the queue is the one still backing off.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backoff_index_follows_withdraw_purge_dead_letter_redrive_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let life = Lifecycle {
            max_attempts: 2,
            ..Lifecycle::default()
        };
        let s = SledStore::open(dir.path(), SledOptions::default(), life.clone()).unwrap();
        let ms: Vec<NewMessage> = (0..4).map(|_| message(&be)).collect();
        let mut seqs = Vec::new();
        for (n, m) in ms.iter().enumerate() {
            match s.submit(m.clone(), NOW + n as u64).await.unwrap() {
                SubmitOutcome::Accepted(a) => seqs.push(a.broker_seq),
                other => panic!("{other:?}"),
            }
        }
        // all four delivered, the stream closed by its node: all back off
        assert_eq!(
            s.lease(&be, StreamId(1), 4, u64::MAX, NOW + 10)
                .await
                .unwrap()
                .len(),
            4
        );
        s.release_stream(&be, StreamId(1), StreamEnd::Recipient, NOW + 11)
            .await
            .unwrap();
        assert_eq!(backoff_seqs(&s), seqs);
        // withdrawn and purged while backing off
        s.withdraw(&nl, ms[0].message_id, NOW + 12).await.unwrap();
        s.purge(ms[1].message_id, None, "misaddressed", NOW + 12)
            .await
            .unwrap();
        assert_eq!(backoff_seqs(&s), seqs[2..].to_vec());
        // the two others due again, delivered, and timed out: the second attempt
        // was the last, both dead-lettered
        let t = NOW + 11 + after(0, life.redelivery_backoff_max);
        s.tick(t).await.unwrap();
        assert!(backoff_seqs(&s).is_empty(), "due again");
        assert_eq!(
            s.lease(&be, StreamId(2), 4, u64::MAX, t)
                .await
                .unwrap()
                .len(),
            2
        );
        let report = s.tick(t + after(0, life.ack_timeout)).await.unwrap();
        assert_eq!(report.dead_lettered, 2);
        assert!(backoff_seqs(&s).is_empty(), "dead-lettered");
        // one redriven, delivered, and its stream closed: backing off again
        let t = t + after(0, life.ack_timeout) + 1;
        assert!(matches!(
            s.redrive(ms[2].message_id, None, t).await.unwrap(),
            RedriveResult::Redriven { .. }
        ));
        assert!(backoff_seqs(&s).is_empty(), "redriven: due");
        assert_eq!(
            s.lease(&be, StreamId(3), 4, u64::MAX, t)
                .await
                .unwrap()
                .len(),
            1
        );
        s.release_stream(&be, StreamId(3), StreamEnd::Recipient, t + 1)
            .await
            .unwrap();
        assert_eq!(backoff_seqs(&s), vec![seqs[2]]);
        let stats = s.queue_stats().await.unwrap();
        assert_eq!(stats[0].oldest_accepted_at, Some(NOW + 2), "{stats:?}");
        // a restart's recovery leaves a message backing off as it is
        s.close().await.unwrap();
        drop(s);
        let s = SledStore::open(dir.path(), SledOptions::default(), life).unwrap();
        s.recover(t + 2).await.unwrap();
        assert_eq!(backoff_seqs(&s), vec![seqs[2]]);
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// `store compact` carries the `backoff` index and the mark that it is
    /// complete: the copy verifies consistent, and is not indexed again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compacted_store_keeps_its_backoff_index_and_its_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (data, copy) = (dir.path().join("data"), dir.path().join("copy"));
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(&data);
        let SubmitOutcome::Accepted(a) = s.submit(message(&be), NOW).await.unwrap() else {
            panic!("not accepted");
        };
        s.lease(&be, StreamId(1), 1, u64::MAX, NOW).await.unwrap();
        s.release_stream(&be, StreamId(1), StreamEnd::Recipient, NOW + 1)
            .await
            .unwrap();
        assert_eq!(backoff_seqs(&s), vec![a.broker_seq]);
        s.close().await.unwrap();
        drop(s);
        crate::store::compact_offline(&data, Some(&copy)).unwrap();
        {
            let db = raw_db(&copy);
            let meta = db.open_tree("meta").unwrap();
            assert!(meta.get(BACKOFF_INDEXED_KEY).unwrap().is_some());
            let backoff = db.open_tree("backoff").unwrap();
            assert_eq!(backoff.len(), 1);
        }
        let report = crate::store::verify_store_offline(&copy).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// A store an earlier version ran on after it was indexed (that version
    /// marks its runs but changes messages without the index: an entry left
    /// for a message no longer backing off, none for one that now is) is
    /// indexed again at the next start, not trusted because of its old mark.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_an_earlier_version_ran_on_is_indexed_again() {
        let dir = tempfile::tempdir().unwrap();
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir.path());
        s.mark_running(NOW).await.unwrap();
        let SubmitOutcome::Accepted(a) = s.submit(message(&be), NOW).await.unwrap() else {
            panic!("not accepted");
        };
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
        {
            // the earlier version: a later run marked, and an entry it left
            // behind for the message, now due (its backoff ended)
            let db = raw_db(dir.path());
            db.open_tree("meta")
                .unwrap()
                .insert(b"running_at", &(NOW + 60_000).to_be_bytes()[..])
                .unwrap();
            db.open_tree("backoff")
                .unwrap()
                .insert(super::super::codec::backoff_key(&be, a.broker_seq), &[][..])
                .unwrap();
            db.flush().unwrap();
        }
        let s = open(dir.path());
        assert!(backoff_seqs(&s).is_empty(), "indexed again");
        s.mark_running(NOW + 120_000).await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// A submit whose caller goes away while its flush is under way (a client's
    /// deadline drops its handler there) still wakes its recipient once the flush is
    /// done: the message is stored whatever the caller does, and a recipient's idle
    /// stream sleeps until it is woken; the sender's retry, a duplicate, wakes nobody.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_submit_whose_caller_goes_away_during_its_flush_still_wakes_the_recipient() {
        let hold = crate::service::test_support::FlushHold::default();
        let dir = tempfile::tempdir().unwrap();
        let opts = SledOptions {
            flush_observer: Some(hold.observer()),
            ..SledOptions::default()
        };
        let s = Arc::new(SledStore::open(dir.path(), opts, Lifecycle::default()).unwrap());
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let mut wakeups = s.wakeups();
        let submitting = {
            let (s, msg) = (Arc::clone(&s), message(&be));
            async move { s.submit(msg, NOW).await }
        };
        hold.cancel_during_flush(submitting).await;
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), wakeups.recv()).await;
        assert_eq!(
            woken.expect("the recipient was never woken").unwrap(),
            be,
            "the recipient is woken"
        );
        s.close().await.unwrap();
    }

    /// A store of `n` messages of `size` bytes from NL-NRM to BE-PAYOKE, all in flight
    /// on a stream of BE-PAYOKE's; the measure of the bytes a transaction read reset.
    async fn large_in_flight(
        dir: &std::path::Path,
        n: usize,
        size: usize,
    ) -> (SledStore, Vec<MessageId>) {
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let s = open(dir);
        let mut ids = Vec::new();
        for _ in 0..n {
            let mut m = message(&be);
            m.payload = bytes::Bytes::from(vec![7u8; size]);
            m.payload_sha256 = sha256(&m.payload);
            ids.push(m.message_id);
            s.submit(m, NOW).await.unwrap();
        }
        let leased = s.lease(&be, StreamId(1), n, u64::MAX, NOW).await.unwrap();
        assert_eq!(leased.len(), n);
        largest_read(&s);
        (s, ids)
    }

    /// The most bytes of records one transaction read since the last call.
    fn largest_read(s: &SledStore) -> u64 {
        s.inner
            .core
            .largest_read
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// An `Ack` naming the ids of messages in flight to someone else (their sender
    /// knows them), a `Reject` of one, and a withdrawal of another sender's message
    /// read none of those records in their transactions: an `Ack` read each whole,
    /// payload included, and sled held them all until it committed (1,024 ids of
    /// 8 MiB messages: 8 GiB from one call). Each is NOT_FOUND and changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_of_others_large_messages_reads_none_of_them() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let (s, ids) = large_in_flight(dir.path(), N, LARGE).await;
        let (nl, iom) = (
            ParticipantId::parse("NL-NRM").unwrap(),
            ParticipantId::parse("INT-IOM").unwrap(),
        );

        for caller in [&nl, &iom] {
            let results = s.ack(caller, &ids, NOW).await.unwrap();
            assert_eq!(results, vec![AckResult::NotFound; N], "acked by {caller}");
            let read = largest_read(&s);
            assert!(
                read < LARGE as u64,
                "an ack by {caller} of messages not its own read {read} bytes of them at once"
            );
        }
        let rejected = s.reject(&nl, ids[0], "INVALID", "", NOW).await.unwrap();
        assert_eq!(rejected, RejectResult::NotFound);
        let withdrawn = s.withdraw(&iom, ids[1], NOW).await.unwrap();
        assert_eq!(withdrawn, WithdrawResult::NotFound);
        let read = largest_read(&s);
        assert!(
            read < LARGE as u64,
            "a reject or withdrawal of a message not the caller's read {read} bytes"
        );

        for id in &ids {
            let status = s.status(&nl, *id).await.unwrap().unwrap();
            assert_eq!(status.state, State::InFlight, "{id} was changed");
        }
        s.close().await.unwrap();
    }

    /// An `Ack` of its own many large deliveries is applied in transactions cut at
    /// `BATCH_READ_BYTES` of records, and still answers every id in order, each
    /// ACKNOWLEDGED with one receipt to its sender.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_of_many_large_messages_is_cut_at_its_byte_budget() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let (s, ids) = large_in_flight(dir.path(), N, LARGE).await;
        let (nl, be) = (
            ParticipantId::parse("NL-NRM").unwrap(),
            ParticipantId::parse("BE-PAYOKE").unwrap(),
        );
        // (one made-up id among them keeps its place)
        let mut named = ids.clone();
        named.insert(N / 2, MessageId::new_v7());
        let results = s.ack(&be, &named, NOW).await.unwrap();
        let mut expected = vec![ACKED; N + 1];
        expected[N / 2] = AckResult::NotFound;
        assert_eq!(results, expected);
        let read = largest_read(&s);
        assert!(
            (1..=BATCH_READ_BYTES + LARGE as u64).contains(&read),
            "the ack read {read} bytes of records in one transaction"
        );

        let receipts = s
            .lease(&nl, StreamId(2), 2 * N, u64::MAX, NOW)
            .await
            .unwrap();
        let mut receipted: Vec<MessageId> = receipts
            .iter()
            .map(|r| {
                assert_eq!(r.kind, Kind::DeliveryReceipt);
                let body = <pb::Receipt as prost::Message>::decode(r.payload.as_ref()).unwrap();
                MessageId::parse(&body.message_id).unwrap()
            })
            .collect();
        receipted.sort();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(receipted, sorted, "one receipt per message");
        assert_eq!(s.ack(&be, &ids, NOW).await.unwrap(), vec![ACKED_BEFORE; N]);
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// Asserts that NL-NRM has `n` receipts waiting (one per message acknowledged),
    /// closes `s`, and that its store in `dir` is consistent.
    async fn one_receipt_each_then_consistent(s: SledStore, dir: &std::path::Path, n: usize) {
        let nl = ParticipantId::parse("NL-NRM").unwrap();
        let receipts = s
            .lease(&nl, StreamId(2), 2 * n, u64::MAX, NOW)
            .await
            .unwrap();
        assert_eq!(receipts.len(), n, "one receipt per message");
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// Holds the store's writer thread until the returned sender sends: the jobs queued
    /// meanwhile are merged into batches when it lets go. The handle ends with the hold.
    async fn hold_writer(
        s: &Arc<SledStore>,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        let (started, running) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let hold = {
            let s = Arc::clone(s);
            tokio::spawn(async move {
                s.inner
                    .writer
                    .exclusive(move |_| {
                        started.send(()).unwrap();
                        let _ = released.recv();
                        Ok(())
                    })
                    .await
            })
        };
        tokio::task::spawn_blocking(move || running.recv().unwrap())
            .await
            .unwrap();
        (release, hold)
    }

    /// Acknowledges each of `ids` in an `Ack` of its own, all queued while the writer is
    /// held ([`hold_writer`]), so that the writer merges them; each is ACKNOWLEDGED.
    async fn acked_one_by_one_merged(s: &Arc<SledStore>, be: &ParticipantId, ids: &[MessageId]) {
        let (release, hold) = hold_writer(s).await;
        let acks: Vec<_> = ids
            .iter()
            .map(|id| {
                let (s, be, id) = (Arc::clone(s), be.clone(), *id);
                tokio::spawn(async move { s.ack(&be, &[id], NOW).await })
            })
            .collect();
        while s.inner.writer.queued() < ids.len() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        release.send(()).unwrap();
        hold.await.unwrap().unwrap();
        for ack in acks {
            assert_eq!(ack.await.unwrap().unwrap(), vec![ACKED]);
        }
    }

    /// Acks of one large delivery each, queued at once, are merged by the writer into
    /// transactions of at most `BATCH_READ_BYTES` of records together, not one of
    /// them all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_merged_by_the_writer_are_cut_at_their_byte_budget() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let (s, ids) = large_in_flight(dir.path(), N, LARGE).await;
        let s = Arc::new(s);
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();

        acked_one_by_one_merged(&s, &be, &ids).await;
        let read = largest_read(&s);
        assert!(
            (1..=BATCH_READ_BYTES + LARGE as u64).contains(&read),
            "the merged acks read {read} bytes of records in one transaction"
        );
        s.close().await.unwrap();
    }

    /// An `Ack` cut in several transactions whose flush fails is answered with the error,
    /// as an ack in one is; the node's repeat finds each message ACKNOWLEDGED, and each
    /// sender has exactly one receipt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_cut_in_parts_whose_flush_fails_is_repeated_to_the_same_end() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let (s, ids) = large_in_flight(dir.path(), N, LARGE).await;
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        s.fault_switch().set_failing(true);
        let failed = s
            .ack(&be, &ids, NOW)
            .await
            .expect_err("an ack whose flush failed is not answered");
        // (what it applied is said, for the broker to count it and free the slots)
        assert_eq!(failed.committed, Some(vec![ACKED; N]));
        s.fault_switch().set_failing(false);
        assert_eq!(s.ack(&be, &ids, NOW).await.unwrap(), vec![ACKED_BEFORE; N]);
        one_receipt_each_then_consistent(s, dir.path(), N).await;
    }

    /// A crash between the parts of a cut `Ack` leaves the first applied and durable,
    /// the others in flight (then due again at the restart, delivered once): the node,
    /// which had no answer, acks all again, and each id is ACKNOWLEDGED with exactly one
    /// receipt to its sender. The store is consistent after the first part alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_cut_short_between_its_parts_is_repeated_to_the_same_end() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let (s, ids) = large_in_flight(dir.path(), N, LARGE).await;
        let (nl, be) = (
            ParticipantId::parse("NL-NRM").unwrap(),
            ParticipantId::parse("BE-PAYOKE").unwrap(),
        );
        // what a crash right after the first part's transaction (and a flush) leaves
        let parts = s.inner.core.plan(&ids, ackable(&be)).unwrap();
        assert!(parts.len() > 1, "{} parts", parts.len());
        let (first, _) = s
            .inner
            .core
            .transact(|tx| tx.ack(&be, &parts[0], NOW))
            .unwrap();
        assert_eq!(first, vec![ACKED; parts[0].ids.len()]);
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");

        let s = open(dir.path());
        let requeued = s.recover(NOW + 1_000).await.unwrap();
        assert_eq!(requeued, (N - parts[0].ids.len()) as u64);
        // (those of the first part were acknowledged before the crash: counted then)
        let mut expected = vec![ACKED_BEFORE; parts[0].ids.len()];
        expected.resize(N, ACKED);
        assert_eq!(s.ack(&be, &ids, NOW + 1_000).await.unwrap(), expected);
        let receipts = s
            .lease(&nl, StreamId(2), 2 * N, u64::MAX, NOW + 1_000)
            .await
            .unwrap();
        assert_eq!(receipts.len(), N, "one receipt per message");
        for id in &ids {
            let status = s.status(&nl, *id).await.unwrap().unwrap();
            assert_eq!(status.state, State::Acknowledged, "{id}");
        }
        s.close().await.unwrap();
    }

    /// An `Ack` of large deliveries written before payloads moved into the record (the
    /// payload in the `payloads` tree) is cut at `BATCH_READ_BYTES` too: acknowledging
    /// deletes each payload, and sled's `remove` reads the value it deletes and holds it
    /// until the transaction commits, so the plan counts it with the record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_of_large_messages_of_the_older_format_is_cut_at_its_byte_budget() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let mut ids = Vec::new();
        for _ in 0..N {
            let mut m = message(&be);
            m.payload = bytes::Bytes::from(vec![7u8; LARGE]);
            m.payload_sha256 = sha256(&m.payload);
            ids.push(m.message_id);
            s.submit(m, NOW).await.unwrap();
        }
        // each payload moved out of its record, as the older format stored it
        let moved = ids.clone();
        s.inner
            .core
            .transact(|tx| {
                for id in &moved {
                    for mut record in tx.records_of(*id)? {
                        let payload = record.payload.take().unwrap();
                        tx.t[RECORDS].insert(&record.seq.to_be_bytes(), record.encode())?;
                        tx.t[PAYLOADS].insert(&record.seq.to_be_bytes(), payload.0)?;
                    }
                }
                Ok(())
            })
            .unwrap();
        let leased = s.lease(&be, StreamId(1), N, u64::MAX, NOW).await.unwrap();
        assert_eq!(leased.len(), N);
        assert!(leased.iter().all(|m| m.payload.len() == LARGE));
        largest_read(&s);

        let results = s.ack(&be, &ids, NOW).await.unwrap();
        assert_eq!(results, vec![ACKED; N]);
        let read = largest_read(&s);
        assert!(
            (1..=BATCH_READ_BYTES + 2 * LARGE as u64).contains(&read),
            "the ack read {read} bytes of records and payloads in one transaction"
        );
        assert!(s.inner.core.trees[PAYLOADS].is_empty(), "a payload left");
        one_receipt_each_then_consistent(s, dir.path(), N).await;
    }

    /// Changes by id merged by the writer into one transaction are each planned before
    /// any of them runs: a withdrawal or a reject earlier in the batch settles a
    /// message that a later `Ack` planned as in flight, and that `Ack`, which re-reads
    /// the record, finds it NOT_FOUND; acks of one id repeated in the batch (in one call
    /// or several) are all ACKNOWLEDGED with one receipt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_by_id_merged_in_one_batch_see_the_changes_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(dir.path()));
        let (nl, be) = (
            ParticipantId::parse("NL-NRM").unwrap(),
            ParticipantId::parse("BE-PAYOKE").unwrap(),
        );
        let mut ids = Vec::new();
        for _ in 0..3 {
            let m = message(&be);
            ids.push(m.message_id);
            s.submit(m, NOW).await.unwrap();
        }
        let leased = s.lease(&be, StreamId(1), 3, u64::MAX, NOW).await.unwrap();
        assert_eq!(leased.len(), 3);
        let (withdrawn, rejected, acked) = (ids[0], ids[1], ids[2]);

        // the writer held until all the changes wait for it, in this order
        let (release, hold) = hold_writer(&s).await;
        async fn queued_after(s: &SledStore, n: usize) {
            while s.inner.writer.queued() < n {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
        let withdrawal = {
            let (s, nl) = (Arc::clone(&s), nl.clone());
            tokio::spawn(async move { s.withdraw(&nl, withdrawn, NOW).await })
        };
        queued_after(&s, 1).await;
        let reject = {
            let (s, be) = (Arc::clone(&s), be.clone());
            tokio::spawn(async move { s.reject(&be, rejected, "INVALID", "", NOW).await })
        };
        queued_after(&s, 2).await;
        let mut acks = Vec::new();
        for (n, named) in [
            vec![withdrawn, rejected],
            vec![acked],
            vec![acked, acked],
            vec![acked],
        ]
        .into_iter()
        .enumerate()
        {
            let (s2, be) = (Arc::clone(&s), be.clone());
            acks.push(tokio::spawn(async move { s2.ack(&be, &named, NOW).await }));
            queued_after(&s, 3 + n).await;
        }
        release.send(()).unwrap();
        hold.await.unwrap().unwrap();

        assert!(matches!(
            withdrawal.await.unwrap().unwrap(),
            WithdrawResult::Withdrawn { already: false, .. }
        ));
        assert_eq!(
            reject.await.unwrap().unwrap(),
            RejectResult::Rejected { already: false }
        );
        let mut results = Vec::new();
        for ack in acks {
            results.push(ack.await.unwrap().unwrap());
        }
        // (acknowledged by the first ack that names it, once: the repeats say so)
        let (a, again, n) = (ACKED, ACKED_BEFORE, AckResult::NotFound);
        assert_eq!(
            results,
            vec![vec![n, n], vec![a], vec![again, again], vec![again]]
        );

        // one DELIVERED receipt, one REJECTED_BY_RECIPIENT; a withdrawal makes none
        let receipts = s.lease(&nl, StreamId(2), 10, u64::MAX, NOW).await.unwrap();
        assert_eq!(receipts.len(), 2);
        let mut states = Vec::new();
        for id in &ids {
            states.push(s.status(&nl, *id).await.unwrap().unwrap().state);
        }
        assert_eq!(
            states,
            vec![State::Withdrawn, State::DeadLettered, State::Acknowledged]
        );
        let s = Arc::into_inner(s).unwrap();
        s.close().await.unwrap();
        drop(s);
        let report = crate::store::verify_store_offline(dir.path()).unwrap();
        assert!(report.is_consistent(), "{report}");
    }

    /// An id named twice in one `Ack` cut in parts, once in its first part and again in
    /// its last, is ACKNOWLEDGED at both places with one receipt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_id_named_twice_across_the_parts_of_an_ack_has_one_receipt() {
        const LARGE: usize = 1 << 20;
        const N: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let (s, ids) = large_in_flight(dir.path(), N, LARGE).await;
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        let mut named = ids.clone();
        named.push(ids[0]);
        let parts = s.inner.core.plan(&named, ackable(&be)).unwrap();
        assert!(parts.len() > 1, "{} parts", parts.len());
        // (the repeat says it was acknowledged already: it is counted once)
        let mut expected = vec![ACKED; N];
        expected.push(ACKED_BEFORE);
        assert_eq!(s.ack(&be, &named, NOW).await.unwrap(), expected);
        one_receipt_each_then_consistent(s, dir.path(), N).await;
    }

    /// The common path keeps merging: one-id acks of small messages, queued at once,
    /// share one transaction (their records are far below `BATCH_READ_BYTES`), as
    /// before acks were planned; the byte cut does not split them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_of_small_messages_queued_at_once_share_one_transaction() {
        const SMALL: usize = 4 << 10;
        const N: usize = 64;
        let dir = tempfile::tempdir().unwrap();
        let (s, ids) = large_in_flight(dir.path(), N, SMALL).await;
        let s = Arc::new(s);
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();

        acked_one_by_one_merged(&s, &be, &ids).await;
        let read = largest_read(&s);
        assert!(
            read >= (N * SMALL) as u64,
            "the {N} acks read at most {read} bytes in one transaction: not merged"
        );
        s.close().await.unwrap();
    }
}
