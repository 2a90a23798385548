//! Inside one sled transaction: reading records and keeping every index in
//! step with them.
//!
//! The single rule that keeps the trees consistent: every index entry, timer
//! and counter is a function of one record ([`index_entries`],
//! [`Contribution`]). A change is written with [`Tx::put`]`(old, new)`, which
//! removes what `old` implied and writes what `new` implies, in the same
//! transaction as the record itself — and appends the audit record of a state
//! change (`audit.rs`).

use std::time::Duration;

use ::sled::transaction::{ConflictableTransactionError, TransactionalTree};
use prost::Message as _;
use trmx_proto::{Kind, MessageId, ParticipantId, pb};

use super::codec::{
    InlinePayload, LeaseEntry, RecipientCounters, Record, TimerKind, backoff_key, decode_seqs,
    encode_seqs, queue_key, read_u64, recipient_counter_key, sender_counter_key, timer_key,
};
use crate::store::{Lifecycle, Millis, State, StoreError};

/// Result inside a transaction closure.
pub(super) type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// Tree indexes (order of [`TREE_NAMES`]).
pub(super) const RECORDS: usize = 0;
pub(super) const PAYLOADS: usize = 1;
pub(super) const BY_ID: usize = 2;
pub(super) const QUEUE: usize = 3;
/// Leases of stores written before [`LEASED`] (recipient, seq → stream,
/// plus a `Lease` timer): emptied by `recover`.
pub(super) const LEGACY_INFLIGHT: usize = 4;
pub(super) const TIMERS: usize = 5;
pub(super) const DEAD: usize = 6;
pub(super) const COUNTERS: usize = 7;
pub(super) const AUDIT: usize = 8;
pub(super) const AUDIT_META: usize = 9;
/// Leases of stores written before [`LEASED`] (deadline, seq → stream):
/// emptied by `recover`.
pub(super) const LEGACY_LEASES: usize = 10;
pub(super) const LEASED: usize = 11;
/// The ACCEPTED messages backing off before a redelivery, by recipient and
/// seq (their `Due` timers are by time): with the head of `queue` and the
/// `leased` entries, the oldest message a recipient has not acknowledged,
/// without reading its backlog. Written only when a delivery failed, never
/// for a message acknowledged at its first delivery. Stores written before
/// it are indexed once at open (`ops::index_backoff`).
pub(super) const BACKOFF: usize = 12;

/// Names of the sled trees, in index order. (Stores written before kept a
/// `by_sender` tree too; it is no longer read or written. `inflight` and
/// `leases` held leases of IN_FLIGHT records written in full; they are only
/// read and emptied at start-up now.)
pub(super) const TREE_NAMES: [&str; 13] = [
    "records",
    "payloads",
    "by_id",
    "queue",
    "inflight",
    "timers",
    "dead",
    "counters",
    "audit",
    "audit_meta",
    "leases",
    "leased",
    "backoff",
];

/// Aborts the transaction with `err`.
pub(super) fn abort<T>(err: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(err))
}

/// `now + d` in milliseconds, saturating.
pub(super) fn after(now: Millis, d: Duration) -> Millis {
    now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The view of one transaction over all trees.
pub(super) struct Tx<'a> {
    pub(super) t: &'a [TransactionalTree],
    pub(super) life: &'a Lifecycle,
    /// Added to sled's id generator for a new seq (see [`Self::next_seq`]).
    pub(super) seq_floor: u64,
    /// Audit records of this transaction not yet written (`audit.rs`).
    pub(super) audit_block: std::cell::RefCell<super::audit::PendingBlock>,
    /// Bytes of records and payloads this transaction read (tests only: sled
    /// holds them until it commits; see `Core::largest_read`).
    #[cfg(test)]
    pub(super) read: std::cell::Cell<u64>,
}

impl Tx<'_> {
    /// The seq of a new record: sled's database-wide id generator, above
    /// `seq_floor`. The generator only grows, but it starts again at 0 in a
    /// database written by `compact_offline`, which stores the floor that
    /// keeps new seqs above every seq it copied.
    pub(super) fn next_seq(&self) -> TxResult<u64> {
        let id = self.t[RECORDS].generate_id()?;
        match self.seq_floor.checked_add(id) {
            Some(seq) => Ok(seq),
            None => abort(StoreError::Corrupt("message seqs are exhausted".to_owned())),
        }
    }

    /// The record of `seq` as it is now: IN_FLIGHT when it has a lease.
    pub(super) fn record(&self, seq: u64) -> TxResult<Option<Record>> {
        let Some(bytes) = self.t[RECORDS].get(seq.to_be_bytes())? else {
            return Ok(None);
        };
        self.note_read(&bytes);
        let record = match Record::decode_stored(&bytes) {
            Ok(record) => record,
            Err(e) => return abort(e),
        };
        if !may_be_leased(&record) {
            return Ok(Some(record));
        }
        match self.t[LEASED].get(seq.to_be_bytes())? {
            Some(v) => match LeaseEntry::decode(&v) {
                Ok(lease) => Ok(Some(lease.apply(record))),
                Err(e) => abort(e),
            },
            None => Ok(Some(record)),
        }
    }

    /// [`Self::record`], for the operations that go through many messages
    /// (lease, tick): a record that cannot be decoded is logged with `what`
    /// is done about it and read as absent, so that one damaged record does
    /// not fail the operation for every other message.
    pub(super) fn readable_record(&self, seq: u64, what: &str) -> TxResult<Option<Record>> {
        match self.record(seq) {
            Err(::sled::transaction::ConflictableTransactionError::Abort(StoreError::Corrupt(
                why,
            ))) => {
                tracing::error!(
                    seq,
                    %why,
                    "a stored message record cannot be read: {what}; the store is damaged, \
                     restore the data directory from a backup"
                );
                Ok(None)
            }
            other => other,
        }
    }

    /// The payload of `r` (with the record, or in `payloads` for records
    /// written before payloads moved into the record).
    ///
    /// An empty payload stored with its record takes no bytes, so the record
    /// reads back as one without an inline payload: with nothing in
    /// `payloads` either, a kept payload of size 0 is the empty one (without
    /// this, such a message failed every lease as corrupt, and blocked its
    /// recipient's queue).
    pub(super) fn payload(&self, r: &Record) -> TxResult<Option<::sled::IVec>> {
        if !r.payload_kept {
            return Ok(None);
        }
        match &r.payload {
            Some(p) => Ok(Some(p.0.clone())),
            None => match self.t[PAYLOADS].get(r.seq.to_be_bytes())? {
                Some(p) => {
                    self.note_read(&p);
                    Ok(Some(p))
                }
                None if r.payload_size == 0 => Ok(Some(::sled::IVec::default())),
                None => Ok(None),
            },
        }
    }

    /// Counts `value`, read by this transaction (tests only).
    fn note_read(&self, value: &::sled::IVec) {
        #[cfg(test)]
        self.read
            .set(self.read.get().saturating_add(value.len() as u64));
        #[cfg(not(test))]
        let _ = value;
    }

    /// Every record with message id `id` (normally one; two senders may
    /// happen to use the same id).
    pub(super) fn records_of(&self, id: trmx_proto::MessageId) -> TxResult<Vec<Record>> {
        let seqs = match self.t[BY_ID].get(id.as_bytes())? {
            Some(v) => match decode_seqs(&v) {
                Ok(seqs) => seqs,
                Err(e) => return abort(e),
            },
            None => return Ok(Vec::new()),
        };
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(record) = self.record(seq)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn counter(&self, key: &[u8]) -> TxResult<u64> {
        match self.t[COUNTERS].get(key)? {
            Some(v) => match read_u64(&v) {
                Ok(n) => Ok(n),
                Err(e) => abort(e),
            },
            None => Ok(0),
        }
    }

    /// Payload bytes of `sender`'s ACCEPTED / IN_FLIGHT messages.
    pub(super) fn sender_bytes(&self, sender: &ParticipantId) -> TxResult<u64> {
        self.counter(&sender_counter_key(sender))
    }

    /// Writes the change `old` → `new` of one message (either may be absent:
    /// creation, deletion) with every index, timer and counter it implies.
    /// A payload that `old` kept and `new` does not is deleted; the caller
    /// stores the payload of a new message.
    pub(super) fn put(&self, old: Option<&Record>, new: Option<&Record>) -> TxResult<()> {
        self.audit_change(old, new)?;
        // Only the entries that differ are written: an entry both records
        // imply (e.g. the expiry timer of a message being leased) is already
        // stored, and every write costs a sled page update.
        let before = old.map(index_entries).unwrap_or_default();
        let after = new.map(index_entries).unwrap_or_default();
        for (tree, key, _) in &before {
            if !after.iter().any(|(t, k, _)| t == tree && k == key) {
                self.t[*tree].remove(key.as_slice())?;
            }
        }
        for entry in after.iter() {
            if !before.contains(entry) {
                let (tree, key, value) = entry;
                self.t[*tree].insert(key.as_slice(), value.as_slice())?;
            }
        }
        self.apply_counters(old, new)?;
        match (old, new) {
            (None, Some(new)) => {
                self.update_by_id(new.message_id, |seqs| seqs.push(new.seq))?;
            }
            (Some(old), None) => {
                self.update_by_id(old.message_id, |seqs| seqs.retain(|s| *s != old.seq))?;
                self.t[RECORDS].remove(&old.seq.to_be_bytes())?;
            }
            _ => {}
        }
        // (a payload stored with the record goes with the rewritten record)
        if let Some(old) = old
            && old.payload_kept
            && old.payload.is_none()
            && !new.is_some_and(|n| n.payload_kept)
        {
            // (sled's `remove` reads the value it deletes, and holds it too)
            if let Some(payload) = self.t[PAYLOADS].remove(&old.seq.to_be_bytes())? {
                self.note_read(&payload);
            }
        }
        // A lease writes only its `leased` entry (an index entry of the
        // IN_FLIGHT record): the stored record stays the due ACCEPTED one, so
        // leasing does not rewrite a record with its payload.
        if let Some(new) = new
            && new.state != State::InFlight
        {
            self.t[RECORDS].insert(&new.seq.to_be_bytes(), new.encode())?;
        }
        Ok(())
    }

    fn update_by_id(
        &self,
        id: trmx_proto::MessageId,
        change: impl FnOnce(&mut Vec<u64>),
    ) -> TxResult<()> {
        let mut seqs = match self.t[BY_ID].get(id.as_bytes())? {
            Some(v) => match decode_seqs(&v) {
                Ok(seqs) => seqs,
                Err(e) => return abort(e),
            },
            None => Vec::new(),
        };
        change(&mut seqs);
        if seqs.is_empty() {
            self.t[BY_ID].remove(&id.as_bytes()[..])?;
        } else {
            self.t[BY_ID].insert(&id.as_bytes()[..], encode_seqs(&seqs))?;
        }
        Ok(())
    }

    fn apply_counters(&self, old: Option<&Record>, new: Option<&Record>) -> TxResult<()> {
        let before = old.map(Contribution::of).unwrap_or_default();
        let after = new.map(Contribution::of).unwrap_or_default();
        if before == after {
            return Ok(());
        }
        // recipient figures: one read and (if changed) one write per key
        let mut recipients: Vec<&ParticipantId> = Vec::with_capacity(2);
        recipients.extend(before.recipient);
        if let Some(r) = after.recipient
            && !recipients.contains(&r)
        {
            recipients.push(r);
        }
        for recipient in recipients {
            let key = recipient_counter_key(recipient);
            let current = match self.t[COUNTERS].get(&key)? {
                Some(v) => match RecipientCounters::decode(&v) {
                    Ok(c) => c,
                    Err(e) => return abort(e),
                },
                None => RecipientCounters::default(),
            };
            let mut counters = current;
            for (contribution, sign) in [(&before, false), (&after, true)] {
                if contribution.recipient != Some(recipient) {
                    continue;
                }
                let apply = |value: &mut u64, delta: u64| {
                    *value = if sign {
                        value.saturating_add(delta)
                    } else {
                        value.saturating_sub(delta)
                    };
                };
                apply(&mut counters.depth, contribution.depth);
                apply(&mut counters.in_flight, contribution.in_flight);
                apply(&mut counters.bytes, contribution.bytes);
            }
            if counters != current {
                self.t[COUNTERS].insert(key, &counters.encode()[..])?;
            }
        }
        // sender quota
        let mut senders: Vec<&ParticipantId> = Vec::with_capacity(2);
        senders.extend(before.sender);
        if let Some(s) = after.sender
            && !senders.contains(&s)
        {
            senders.push(s);
        }
        for sender in senders {
            let key = sender_counter_key(sender);
            let current = self.counter(&key)?;
            let mut next = current;
            if before.sender == Some(sender) {
                next = next.saturating_sub(before.bytes);
            }
            if after.sender == Some(sender) {
                next = next.saturating_add(after.bytes);
            }
            if next != current {
                self.t[COUNTERS].insert(key, &next.to_be_bytes()[..])?;
            }
        }
        Ok(())
    }

    /// Queues the receipt with `outcome` for `original` (already in its new
    /// state) to the original sender, unless `original` is itself a receipt
    /// or that receipt exists already. Returns the receipt's recipient.
    pub(super) fn receipt(
        &self,
        original: &Record,
        outcome: pb::Outcome,
        now: Millis,
    ) -> TxResult<Option<ParticipantId>> {
        let Some(sender) = &original.sender else {
            return Ok(None); // a receipt never causes a receipt
        };
        let id = MessageId::receipt_for(original.message_id, outcome);
        // Only a receipt made after `original` was accepted is one of its own (seqs
        // only grow; a redrive keeps the seq): an older one with this id is of an
        // earlier message its sender sent under the same id, whose metadata was
        // deleted since while its receipt is still on record (acked later, or
        // expired unread). Counted, it would keep this message's receipt from its
        // sender, whose node submits a message again precisely when it never
        // learned what became of it.
        if self
            .records_of(id)?
            .iter()
            .any(|r| r.recipient == *sender && r.sender.is_none() && r.seq > original.seq)
        {
            return Ok(None);
        }
        let body = pb::Receipt {
            message_id: original.message_id.to_string(),
            outcome: outcome as i32,
            at: Some(timestamp(now)),
            attempts: original.attempts,
            last_delivered_at: original.last_delivered_at.map(timestamp),
            reason_code: original.reason_code.clone(),
            field_path: original.field_path.clone(),
        };
        let payload = body.encode_to_vec();
        let kind = if outcome == pb::Outcome::Delivered {
            Kind::DeliveryReceipt
        } else {
            Kind::NonDeliveryReport
        };
        let seq = self.next_seq()?;
        let record = Record {
            seq,
            message_id: id,
            sender: None,
            recipient: sender.clone(),
            kind,
            case_ref: original.case_ref,
            in_reply_to: None,
            priority: original.priority,
            created_at: now,
            expires_at: after(now, self.life.metadata_retention),
            accepted_at: now,
            content_type: Kind::DeliveryReceipt.content_type(),
            payload_sha256: trmx_proto::envelope::sha256(&payload),
            payload_size: payload.len() as u64,
            fingerprint: [0; 32],
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
            payload: Some(InlinePayload(::sled::IVec::from(payload))),
        };
        self.put(None, Some(&record))?;
        Ok(Some(sender.clone()))
    }
}

fn timestamp(at: Millis) -> pb::Timestamp {
    trmx_proto::time::to_timestamp(trmx_proto::time::from_millis(at))
}

/// Index entries `(tree, key, value)` that `r` implies.
pub(super) fn index_entries(r: &Record) -> Vec<(usize, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::with_capacity(4);
    match r.state {
        State::Accepted => match r.next_attempt_at {
            None => out.push((
                QUEUE,
                queue_key(&r.recipient, r.priority, r.seq),
                Vec::new(),
            )),
            Some(at) => {
                out.push((TIMERS, timer_key(at, TimerKind::Due, r.seq), Vec::new()));
                out.push((BACKOFF, backoff_key(&r.recipient, r.seq), Vec::new()));
            }
        },
        State::InFlight => {
            if let Some(lease) = LeaseEntry::of(r) {
                out.push((LEASED, r.seq.to_be_bytes().to_vec(), lease.encode()));
            }
        }
        State::Expired | State::DeadLettered => {
            out.push((DEAD, r.seq.to_be_bytes().to_vec(), Vec::new()));
        }
        State::Acknowledged | State::Withdrawn | State::Purged => {}
    }
    if r.state.is_active() {
        out.push((
            TIMERS,
            timer_key(r.expires_at, TimerKind::Expiry, r.seq),
            Vec::new(),
        ));
    }
    if r.payload_kept
        && let Some(at) = r.payload_delete_at
    {
        out.push((
            TIMERS,
            timer_key(at, TimerKind::PayloadRetention, r.seq),
            Vec::new(),
        ));
    }
    if let Some(at) = r.metadata_delete_at {
        out.push((
            TIMERS,
            timer_key(at, TimerKind::MetadataRetention, r.seq),
            Vec::new(),
        ));
    }
    out
}

/// Whether the stored `r` may have a lease in `leased`: a lease is only
/// taken of a due ACCEPTED record, which stays stored as it was.
pub(super) fn may_be_leased(r: &Record) -> bool {
    r.state == State::Accepted && r.next_attempt_at.is_none()
}

/// What one record adds to the counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Contribution<'a> {
    pub(super) recipient: Option<&'a ParticipantId>,
    pub(super) sender: Option<&'a ParticipantId>,
    pub(super) depth: u64,
    pub(super) in_flight: u64,
    pub(super) bytes: u64,
}

impl<'a> Contribution<'a> {
    pub(super) fn of(r: &'a Record) -> Self {
        if !r.state.is_active() {
            return Self::default();
        }
        Self {
            recipient: Some(&r.recipient),
            sender: r.sender.as_ref(),
            depth: u64::from(r.state == State::Accepted),
            in_flight: u64::from(r.state == State::InFlight),
            bytes: r.payload_size,
        }
    }
}

/// Moves `r` to a final state whose payload is deleted at once
/// (ACKNOWLEDGED, WITHDRAWN, PURGED).
pub(super) fn finish_without_payload(r: &mut Record, state: State, now: Millis, life: &Lifecycle) {
    r.state = state;
    r.state_changed_at = now;
    r.lease = None;
    r.next_attempt_at = None;
    r.payload_kept = false;
    r.payload_delete_at = None;
    r.metadata_delete_at = Some(after(now, life.metadata_retention));
}

/// Moves `r` to EXPIRED or DEAD_LETTERED: the payload is kept for the
/// dead-letter retention, the metadata at least as long.
pub(super) fn finish_keeping_payload(r: &mut Record, state: State, now: Millis, life: &Lifecycle) {
    r.state = state;
    r.state_changed_at = now;
    r.lease = None;
    r.next_attempt_at = None;
    if r.payload_kept {
        r.payload_delete_at = Some(after(now, life.dead_letter_retention));
    }
    r.metadata_delete_at = Some(after(
        now,
        life.metadata_retention.max(life.dead_letter_retention),
    ));
}

/// Deletes the payload of `r`, which [`finish_keeping_payload`] made
/// EXPIRED or DEAD_LETTERED, when no redrive can use it (a rejected message,
/// a receipt): its metadata stays for the retention of its state.
pub(super) fn drop_payload(r: &mut Record) {
    r.payload_kept = false;
    r.payload_delete_at = None;
}

/// Backoff before redelivery after `attempts` deliveries: base * 2^(attempts-1), capped.
pub(super) fn backoff(life: &Lifecycle, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(31);
    life.redelivery_backoff_base
        .checked_mul(1u32 << exponent)
        .unwrap_or(life.redelivery_backoff_max)
        .min(life.redelivery_backoff_max)
}
