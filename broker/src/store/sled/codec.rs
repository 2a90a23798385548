//! Binary encoding of the message record and of the index keys.
//!
//! Integers are big-endian so that keys sort numerically; strings and byte
//! strings carry a `u32` length. A record starts with a format byte so that a
//! later version can read old records.

use trmx_proto::envelope::Priority;
use trmx_proto::{CaseRef, Kind, MessageId, ParticipantId};

use crate::store::{Millis, State, StatusRecord, StoreError};

/// Format byte of [`Record`] encodings without a payload (the payload, if
/// any, is in the `payloads` tree).
const RECORD_V1: u8 = 1;
/// Format byte of [`Record`] encodings followed by the payload (if kept).
const RECORD_V2: u8 = 2;

/// A payload stored with its record (its bytes never show in `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub(super) struct InlinePayload(pub(super) ::sled::IVec);

impl std::fmt::Debug for InlinePayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InlinePayload({} bytes)", self.0.len())
    }
}

/// Everything the store knows about one message, and its payload when that
/// is stored with the record (every record written since format byte 2;
/// older ones keep theirs in the `payloads` tree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) seq: u64,
    pub(super) message_id: MessageId,
    pub(super) sender: Option<ParticipantId>,
    pub(super) recipient: ParticipantId,
    pub(super) kind: Kind,
    pub(super) case_ref: CaseRef,
    pub(super) in_reply_to: Option<MessageId>,
    pub(super) priority: Priority,
    pub(super) created_at: Millis,
    pub(super) expires_at: Millis,
    pub(super) accepted_at: Millis,
    pub(super) content_type: String,
    pub(super) payload_sha256: [u8; 32],
    pub(super) payload_size: u64,
    pub(super) fingerprint: [u8; 32],
    pub(super) state: State,
    pub(super) attempts: u32,
    pub(super) last_delivered_at: Option<Millis>,
    pub(super) state_changed_at: Millis,
    /// ACCEPTED and backing off until then (not in the queue yet).
    pub(super) next_attempt_at: Option<Millis>,
    /// IN_FLIGHT: (ack deadline, stream).
    pub(super) lease: Option<(Millis, u64)>,
    pub(super) reason_code: String,
    pub(super) field_path: String,
    pub(super) payload_kept: bool,
    /// DEAD_LETTERED by the recipient's rejection (never redrivable).
    pub(super) rejected: bool,
    pub(super) payload_delete_at: Option<Millis>,
    pub(super) metadata_delete_at: Option<Millis>,
    /// Operator note (purge reason). Never sent to anyone.
    pub(super) note: String,
    /// The payload, when stored with the record; written only while
    /// `payload_kept` (so dropping it is rewriting the record).
    pub(super) payload: Option<InlinePayload>,
}

impl Record {
    /// Whether an operator could redrive it now.
    ///
    /// Never a receipt (no sender: the broker made it). One expires only when its
    /// sender's node has not taken it for the whole metadata retention, the longest
    /// lifetime there is, and that node repairs it by itself: it asks about every
    /// message it has no receipt for and submits again one the broker no longer
    /// knows, which gets a receipt of its own. (Redriven, it would wait in the queue
    /// of a node that has been away that long for another metadata retention.) The
    /// operator's list and redrive both read this, so they always agree.
    pub(super) fn redrivable(&self) -> bool {
        self.sender.is_some()
            && self.payload_kept
            && (self.state == State::Expired
                || (self.state == State::DeadLettered && !self.rejected))
    }

    pub(super) fn to_status(&self) -> StatusRecord {
        StatusRecord {
            message_id: self.message_id,
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            kind: self.kind,
            case_ref: self.case_ref,
            in_reply_to: self.in_reply_to,
            priority: self.priority,
            state: self.state,
            attempts: self.attempts,
            accepted_at: self.accepted_at,
            expires_at: self.expires_at,
            last_delivered_at: self.last_delivered_at,
            state_changed_at: self.state_changed_at,
            next_attempt_at: self.next_attempt_at,
            reason_code: self.reason_code.clone(),
            field_path: self.field_path.clone(),
            payload_size: self.payload_size,
            payload_kept: self.payload_kept,
            broker_seq: self.seq,
            redrivable: self.redrivable(),
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let inline = self.payload.as_ref().filter(|_| self.payload_kept);
        let mut w = Writer(Vec::with_capacity(
            256 + self.content_type.len() + inline.map_or(0, |p| p.0.len()),
        ));
        w.u8(RECORD_V2);
        w.u64(self.seq);
        w.raw(self.message_id.as_bytes());
        w.opt_str(self.sender.as_ref().map(ParticipantId::as_str));
        w.str(self.recipient.as_str());
        w.u8(kind_code(self.kind));
        w.raw(self.case_ref.as_bytes());
        match self.in_reply_to {
            Some(id) => {
                w.u8(1);
                w.raw(id.as_bytes());
            }
            None => w.u8(0),
        }
        w.u8(priority_code(self.priority));
        w.u64(self.created_at);
        w.u64(self.expires_at);
        w.u64(self.accepted_at);
        w.str(&self.content_type);
        w.raw(&self.payload_sha256);
        w.u64(self.payload_size);
        w.raw(&self.fingerprint);
        w.u8(state_code(self.state));
        w.u32(self.attempts);
        w.opt_u64(self.last_delivered_at);
        w.u64(self.state_changed_at);
        w.opt_u64(self.next_attempt_at);
        match self.lease {
            Some((deadline, stream)) => {
                w.u8(1);
                w.u64(deadline);
                w.u64(stream);
            }
            None => w.u8(0),
        }
        w.str(&self.reason_code);
        w.str(&self.field_path);
        w.u8(u8::from(self.payload_kept));
        w.u8(u8::from(self.rejected));
        w.opt_u64(self.payload_delete_at);
        w.opt_u64(self.metadata_delete_at);
        w.str(&self.note);
        if let Some(payload) = inline {
            w.raw(&payload.0);
        }
        w.0
    }

    /// Decodes a stored record; an inline payload is copied (tests only: the
    /// store reads a payload shared, [`Self::decode_stored`], or not at all).
    #[cfg(test)]
    pub(super) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let (mut record, payload_at) = Self::decode_meta(bytes)?;
        if let Some(at) = payload_at {
            record.payload = Some(InlinePayload(::sled::IVec::from(&bytes[at..])));
        }
        Ok(record)
    }

    /// Decodes a stored record; an inline payload is shared, not copied.
    pub(super) fn decode_stored(value: &::sled::IVec) -> Result<Self, StoreError> {
        let (mut record, payload_at) = Self::decode_meta(value)?;
        if let Some(at) = payload_at {
            record.payload = Some(InlinePayload(value.subslice(at, value.len() - at)));
        }
        Ok(record)
    }

    /// Decodes a stored record without its payload (scans of metadata).
    pub(super) fn decode_metadata(bytes: &[u8]) -> Result<Self, StoreError> {
        Ok(Self::decode_meta(bytes)?.0)
    }

    /// [`Self::decode_metadata`], and whether the payload is stored with the
    /// record (else a kept payload of the older format is in `payloads`).
    pub(super) fn decode_metadata_inline(bytes: &[u8]) -> Result<(Self, bool), StoreError> {
        let (record, payload_at) = Self::decode_meta(bytes)?;
        Ok((record, payload_at.is_some()))
    }

    /// The record without its payload, and where an inline payload starts.
    fn decode_meta(bytes: &[u8]) -> Result<(Self, Option<usize>), StoreError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != RECORD_V1 && version != RECORD_V2 {
            return Err(corrupt(format!("unknown record format {version}")));
        }
        let record = Record {
            seq: r.u64()?,
            message_id: MessageId::from_bytes(r.array()?),
            sender: r.opt_str()?.map(|s| participant(&s)).transpose()?,
            recipient: participant(&r.str()?)?,
            kind: kind_from_code(r.u8()?)?,
            case_ref: CaseRef::from_bytes(r.array()?),
            in_reply_to: match r.u8()? {
                0 => None,
                _ => Some(MessageId::from_bytes(r.array()?)),
            },
            priority: priority_from_code(r.u8()?)?,
            created_at: r.u64()?,
            expires_at: r.u64()?,
            accepted_at: r.u64()?,
            content_type: r.str()?,
            payload_sha256: r.array()?,
            payload_size: r.u64()?,
            fingerprint: r.array()?,
            state: state_from_code(r.u8()?)?,
            attempts: r.u32()?,
            last_delivered_at: r.opt_u64()?,
            state_changed_at: r.u64()?,
            next_attempt_at: r.opt_u64()?,
            lease: match r.u8()? {
                0 => None,
                _ => Some((r.u64()?, r.u64()?)),
            },
            reason_code: r.str()?,
            field_path: r.str()?,
            payload_kept: r.u8()? != 0,
            rejected: r.u8()? != 0,
            payload_delete_at: r.opt_u64()?,
            metadata_delete_at: r.opt_u64()?,
            note: r.str()?,
            payload: None,
        };
        let rest = r.0.len();
        if rest == 0 {
            return Ok((record, None));
        }
        if version == RECORD_V1 {
            return Err(corrupt("trailing bytes after record".to_owned()));
        }
        if !record.payload_kept || rest as u64 != record.payload_size {
            return Err(corrupt("inline payload of the wrong size".to_owned()));
        }
        Ok((record, Some(bytes.len() - rest)))
    }
}

fn corrupt(what: String) -> StoreError {
    StoreError::Corrupt(what)
}

fn participant(value: &str) -> Result<ParticipantId, StoreError> {
    ParticipantId::parse(value).map_err(|_| corrupt("invalid participant id in record".to_owned()))
}

/// Priority byte used in records and queue keys: urgent sorts first.
pub(super) fn priority_code(priority: Priority) -> u8 {
    match priority {
        Priority::Urgent => 0,
        Priority::Normal => 1,
    }
}

fn priority_from_code(code: u8) -> Result<Priority, StoreError> {
    match code {
        0 => Ok(Priority::Urgent),
        1 => Ok(Priority::Normal),
        other => Err(corrupt(format!("unknown priority {other}"))),
    }
}

fn kind_code(kind: Kind) -> u8 {
    // wire numbers are 1..=7
    u8::try_from(kind.to_pb() as i32).unwrap_or(0)
}

fn kind_from_code(code: u8) -> Result<Kind, StoreError> {
    Kind::from_pb(i32::from(code)).ok_or_else(|| corrupt(format!("unknown kind {code}")))
}

fn state_code(state: State) -> u8 {
    match state {
        State::Accepted => 1,
        State::InFlight => 2,
        State::Acknowledged => 3,
        State::Expired => 4,
        State::DeadLettered => 5,
        State::Withdrawn => 6,
        State::Purged => 7,
    }
}

fn state_from_code(code: u8) -> Result<State, StoreError> {
    Ok(match code {
        1 => State::Accepted,
        2 => State::InFlight,
        3 => State::Acknowledged,
        4 => State::Expired,
        5 => State::DeadLettered,
        6 => State::Withdrawn,
        7 => State::Purged,
        other => return Err(corrupt(format!("unknown state {other}"))),
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn raw(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v.as_bytes());
    }
    fn opt_str(&mut self, v: Option<&str>) {
        match v {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            Some(x) => {
                self.u8(1);
                self.u64(x);
            }
            None => self.u8(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt("record truncated".to_owned()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<String, StoreError> {
        let len = usize::try_from(self.u32()?).map_err(|_| corrupt("length".to_owned()))?;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| corrupt("invalid utf-8".to_owned()))
    }
    fn opt_str(&mut self) -> Result<Option<String>, StoreError> {
        match self.u8()? {
            0 => Ok(None),
            _ => self.str().map(Some),
        }
    }
    fn opt_u64(&mut self) -> Result<Option<u64>, StoreError> {
        match self.u8()? {
            0 => Ok(None),
            _ => self.u64().map(Some),
        }
    }
}

/// Reads a big-endian `u64` from the first 8 bytes of `bytes`.
pub(super) fn read_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("short integer".to_owned()))
}

/// Key prefix of one participant in per-participant trees: its id and a 0
/// byte (ids never contain one, so `NL-AB` is not a prefix of `NL-ABC`).
pub(super) fn participant_prefix(id: &ParticipantId) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.as_str().len() + 10);
    key.extend_from_slice(id.as_str().as_bytes());
    key.push(0);
    key
}

/// `queue`: recipient | 0 | priority | seq.
pub(super) fn queue_key(recipient: &ParticipantId, priority: Priority, seq: u64) -> Vec<u8> {
    let mut key = participant_prefix(recipient);
    key.push(priority_code(priority));
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `backoff`: recipient | 0 | seq — an ACCEPTED message backing off before a
/// redelivery, in acceptance order: the first key of a recipient is its
/// oldest.
pub(super) fn backoff_key(recipient: &ParticipantId, seq: u64) -> Vec<u8> {
    let mut key = participant_prefix(recipient);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// A lease as the `leased` tree stores it (key: seq): a leased message's
/// record stays as it was when it was due, and this entry says the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeaseEntry {
    pub(super) deadline: Millis,
    pub(super) stream: u64,
    /// The attempt this delivery is (the record keeps the previous count).
    pub(super) attempt: u32,
    pub(super) delivered_at: Millis,
}

impl LeaseEntry {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(28));
        w.u64(self.deadline);
        w.u64(self.stream);
        w.u32(self.attempt);
        w.u64(self.delivered_at);
        w.0
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(bytes);
        let entry = Self {
            deadline: r.u64()?,
            stream: r.u64()?,
            attempt: r.u32()?,
            delivered_at: r.u64()?,
        };
        if !r.0.is_empty() {
            return Err(corrupt("trailing bytes after lease".to_owned()));
        }
        Ok(entry)
    }

    /// `r` (a due ACCEPTED record) as this lease makes it: IN_FLIGHT.
    pub(super) fn apply(&self, mut r: Record) -> Record {
        r.state = State::InFlight;
        r.attempts = self.attempt;
        r.last_delivered_at = Some(self.delivered_at);
        r.state_changed_at = self.delivered_at;
        r.lease = Some((self.deadline, self.stream));
        r
    }

    /// The lease of an IN_FLIGHT record.
    pub(super) fn of(r: &Record) -> Option<Self> {
        let (deadline, stream) = r.lease?;
        Some(Self {
            deadline,
            stream,
            attempt: r.attempts,
            delivered_at: r.last_delivered_at.unwrap_or(r.state_changed_at),
        })
    }
}

/// The seq at the end of a `queue` key, or of a key of a lease tree.
pub(super) fn seq_suffix(key: &[u8]) -> Result<u64, StoreError> {
    let start = key
        .len()
        .checked_sub(8)
        .ok_or_else(|| corrupt("short index key".to_owned()))?;
    read_u64(&key[start..])
}

/// What a timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerKind {
    /// IN_FLIGHT ack deadline (only in stores written before the `leases`
    /// tree took this part; still honoured).
    Lease = 1,
    /// ACCEPTED backoff ended: due again.
    Due = 2,
    /// ACCEPTED / IN_FLIGHT lifetime ended.
    Expiry = 3,
    /// Dead-letter retention ended: delete the payload.
    PayloadRetention = 4,
    /// Metadata retention ended: delete the record.
    MetadataRetention = 5,
}

/// `timers`: at | kind | seq.
pub(super) fn timer_key(at: Millis, kind: TimerKind, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    key.extend_from_slice(&at.to_be_bytes());
    key.push(kind as u8);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub(super) fn parse_timer_key(key: &[u8]) -> Result<(Millis, TimerKind, u64), StoreError> {
    if key.len() != 17 {
        return Err(corrupt("bad timer key".to_owned()));
    }
    let kind = match key[8] {
        1 => TimerKind::Lease,
        2 => TimerKind::Due,
        3 => TimerKind::Expiry,
        4 => TimerKind::PayloadRetention,
        5 => TimerKind::MetadataRetention,
        other => return Err(corrupt(format!("unknown timer kind {other}"))),
    };
    Ok((read_u64(&key[..8])?, kind, read_u64(&key[9..])?))
}

/// Per-recipient counters: depth, in flight, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RecipientCounters {
    pub(super) depth: u64,
    pub(super) in_flight: u64,
    pub(super) bytes: u64,
}

impl RecipientCounters {
    pub(super) fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.depth.to_be_bytes());
        out[8..16].copy_from_slice(&self.in_flight.to_be_bytes());
        out[16..].copy_from_slice(&self.bytes.to_be_bytes());
        out
    }
    pub(super) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() != 24 {
            return Err(corrupt("bad counters".to_owned()));
        }
        Ok(Self {
            depth: read_u64(&bytes[..8])?,
            in_flight: read_u64(&bytes[8..16])?,
            bytes: read_u64(&bytes[16..])?,
        })
    }
}

/// `counters` key of a sender's queued bytes.
pub(super) fn sender_counter_key(sender: &ParticipantId) -> Vec<u8> {
    let mut key = vec![b's'];
    key.extend_from_slice(sender.as_str().as_bytes());
    key
}

/// `counters` key of a recipient's queue figures.
pub(super) fn recipient_counter_key(recipient: &ParticipantId) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(recipient.as_str().as_bytes());
    key
}

/// Decodes a list of big-endian seqs (value of `by_id`).
pub(super) fn decode_seqs(bytes: &[u8]) -> Result<Vec<u64>, StoreError> {
    if !bytes.len().is_multiple_of(8) {
        return Err(corrupt("bad seq list".to_owned()));
    }
    bytes.chunks_exact(8).map(read_u64).collect()
}

pub(super) fn encode_seqs(seqs: &[u64]) -> Vec<u8> {
    seqs.iter().flat_map(|s| s.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            seq: 42,
            message_id: MessageId::new_v7(),
            sender: Some(ParticipantId::parse("NL-NRM").unwrap()),
            recipient: ParticipantId::parse("BE-PAYOKE").unwrap(),
            kind: Kind::Referral,
            case_ref: CaseRef::new_random(),
            in_reply_to: Some(MessageId::new_v7()),
            priority: Priority::Urgent,
            created_at: 1,
            expires_at: 2,
            accepted_at: 3,
            content_type: Kind::Referral.content_type(),
            payload_sha256: [7; 32],
            payload_size: 4096,
            fingerprint: [9; 32],
            state: State::InFlight,
            attempts: 2,
            last_delivered_at: Some(5),
            state_changed_at: 6,
            next_attempt_at: None,
            lease: Some((7, 8)),
            reason_code: "R".to_owned(),
            field_path: "a.b".to_owned(),
            payload_kept: true,
            rejected: false,
            payload_delete_at: None,
            metadata_delete_at: Some(9),
            note: String::new(),
            payload: None,
        }
    }

    #[test]
    fn records_round_trip_and_truncation_is_corrupt() {
        let record = sample();
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), record);
        assert!(matches!(
            Record::decode(&bytes[..bytes.len() - 1]),
            Err(StoreError::Corrupt(_))
        ));
        let mut receipt = sample();
        receipt.sender = None;
        receipt.in_reply_to = None;
        receipt.lease = None;
        assert_eq!(Record::decode(&receipt.encode()).unwrap(), receipt);
        // an inline payload round-trips, must have its recorded size, and is
        // not written once the payload is no longer kept
        let mut with = sample();
        with.payload = Some(InlinePayload(::sled::IVec::from(vec![5u8; 4096])));
        let bytes = with.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), with);
        assert_eq!(
            Record::decode_stored(&::sled::IVec::from(bytes.clone())).unwrap(),
            with
        );
        assert!(matches!(
            Record::decode(&bytes[..bytes.len() - 1]),
            Err(StoreError::Corrupt(_))
        ));
        with.payload_kept = false;
        assert_eq!(with.encode().len(), sample().encode().len());
        assert!(!format!("{with:?}").contains("5, 5"));
    }

    #[test]
    fn timer_keys_sort_by_time() {
        let a = timer_key(5, TimerKind::Expiry, 99);
        let b = timer_key(6, TimerKind::Lease, 1);
        assert!(a < b);
        assert_eq!(parse_timer_key(&a).unwrap(), (5, TimerKind::Expiry, 99));
    }

    #[test]
    fn lease_entries_round_trip_and_make_the_record_in_flight() {
        let entry = LeaseEntry {
            deadline: 9,
            stream: 4,
            attempt: 3,
            delivered_at: 7,
        };
        let bytes = entry.encode();
        assert_eq!(LeaseEntry::decode(&bytes).unwrap(), entry);
        assert!(LeaseEntry::decode(&bytes[1..]).is_err());
        let mut due = sample();
        due.state = State::Accepted;
        due.lease = None;
        let leased = entry.apply(due);
        assert_eq!(leased.state, State::InFlight);
        assert_eq!(leased.lease, Some((9, 4)));
        assert_eq!(LeaseEntry::of(&leased), Some(entry));
    }

    #[test]
    fn urgent_queue_keys_sort_first() {
        let r = ParticipantId::parse("BE-PAYOKE").unwrap();
        assert!(queue_key(&r, Priority::Urgent, 100) < queue_key(&r, Priority::Normal, 1));
        assert!(queue_key(&r, Priority::Normal, 1) < queue_key(&r, Priority::Normal, 2));
    }
}
