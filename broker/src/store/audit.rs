//! The audit log's records, their canonical encoding, and the chain check
//! (issue 6 item 2). Backend-neutral: the sled store keeps the records in its
//! `audit` tree (see `sled/audit.rs`), another backend would keep them in a table.
//!
//! What is recorded: every lifecycle change of a message (accepted, in flight,
//! requeued, acknowledged, expired, dead-lettered, rejected, withdrawn, purged,
//! redriven) with its id, kind, sender, recipient, states and times; every
//! operator action with the operator's name (for the offline `store accept-clock`, the
//! operating-system user who ran it). NEVER a case reference, a payload or a body value.
//!
//! # Invariants
//! - Records are numbered 1, 2, 3, … without gaps; each holds the SHA-256 of the
//!   previous record (the *anchor* hash for the first record kept: 32 zero bytes at
//!   the start of the log, or the hash of the last record of the segments retention
//!   dropped).
//! - A record's hash is the SHA-256 of its canonical encoding ([`AuditRecord::encode`]),
//!   which includes the previous hash; the stored value is the encoding followed by
//!   that hash, so a changed record is found at its own sequence number.
//! - A record is written in the same atomic write as the change it records.
//! - Retention drops whole segments of [`SEGMENT_RECORDS`] records, oldest first,
//!   and keeps the hash the chain continues from.

use trmx_proto::envelope::sha256;
use trmx_proto::{Kind, MessageId, ParticipantId, pb};

use crate::store::{Millis, State, StoreError};

/// Records per segment (the unit retention drops).
pub const SEGMENT_RECORDS: u64 = 4096;
/// Format version of the canonical encoding.
const VERSION: u8 = 1;
/// Bytes of the header every record begins with: version, seq, at, prev_hash.
const HEADER_BYTES: usize = 1 + 8 + 8 + 32;
/// Longest text field kept in a record (an operator's reason is at most 500 characters).
const MAX_TEXT: usize = 4096;

/// The segment a record belongs to.
pub fn segment_of(seq: u64) -> u64 {
    seq.saturating_sub(1) / SEGMENT_RECORDS
}

/// A lifecycle step of a message, from its old and new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// New message (or receipt) made durable.
    Accepted,
    /// Handed to a recipient stream.
    InFlight,
    /// Back in the queue after an ack timeout, a closed stream or a restart.
    Requeued,
    /// The recipient stored it.
    Acknowledged,
    /// Its lifetime ended.
    Expired,
    /// Too many attempts.
    DeadLettered,
    /// The recipient rejected it (dead-lettered, never redriven).
    Rejected,
    /// The sender took it back.
    Withdrawn,
    /// An operator removed it.
    Purged,
    /// An operator put it back in the queue.
    Redriven,
    /// Its metadata retention passed and the record was deleted.
    Deleted,
}

impl LifecycleEvent {
    const ALL: [LifecycleEvent; 11] = [
        LifecycleEvent::Accepted,
        LifecycleEvent::InFlight,
        LifecycleEvent::Requeued,
        LifecycleEvent::Acknowledged,
        LifecycleEvent::Expired,
        LifecycleEvent::DeadLettered,
        LifecycleEvent::Rejected,
        LifecycleEvent::Withdrawn,
        LifecycleEvent::Purged,
        LifecycleEvent::Redriven,
        LifecycleEvent::Deleted,
    ];

    /// The step from `from` to `to` (`None`: no record before / after), or `None`
    /// when the state did not change.
    pub fn of(from: Option<State>, to: Option<State>, rejected: bool) -> Option<Self> {
        Some(match (from, to) {
            (None, Some(_)) => LifecycleEvent::Accepted,
            (Some(_), None) => LifecycleEvent::Deleted,
            (Some(a), Some(b)) if a == b => return None,
            (Some(State::Expired | State::DeadLettered), Some(State::Accepted)) => {
                LifecycleEvent::Redriven
            }
            (Some(_), Some(State::Accepted)) => LifecycleEvent::Requeued,
            (Some(_), Some(State::InFlight)) => LifecycleEvent::InFlight,
            (Some(_), Some(State::Acknowledged)) => LifecycleEvent::Acknowledged,
            (Some(_), Some(State::Expired)) => LifecycleEvent::Expired,
            (Some(_), Some(State::DeadLettered)) if rejected => LifecycleEvent::Rejected,
            (Some(_), Some(State::DeadLettered)) => LifecycleEvent::DeadLettered,
            (Some(_), Some(State::Withdrawn)) => LifecycleEvent::Withdrawn,
            (Some(_), Some(State::Purged)) => LifecycleEvent::Purged,
            (None, None) => return None,
        })
    }

    /// `ACCEPTED`, `IN_FLIGHT`, …
    pub fn name(self) -> &'static str {
        match self {
            LifecycleEvent::Accepted => "ACCEPTED",
            LifecycleEvent::InFlight => "IN_FLIGHT",
            LifecycleEvent::Requeued => "REQUEUED",
            LifecycleEvent::Acknowledged => "ACKNOWLEDGED",
            LifecycleEvent::Expired => "EXPIRED",
            LifecycleEvent::DeadLettered => "DEAD_LETTERED",
            LifecycleEvent::Rejected => "REJECTED",
            LifecycleEvent::Withdrawn => "WITHDRAWN",
            LifecycleEvent::Purged => "PURGED",
            LifecycleEvent::Redriven => "REDRIVEN",
            LifecycleEvent::Deleted => "DELETED",
        }
    }

    fn code(self) -> u8 {
        Self::ALL
            .iter()
            .position(|e| *e == self)
            .and_then(|i| u8::try_from(i + 1).ok())
            .unwrap_or(0)
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }
}

/// What an operator did (with what the audit must show, and nothing more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorAction {
    /// A metadata search; `filter` names the fields filtered on (a case
    /// reference only as "set", never its value).
    Search {
        /// The operator's name (from the certificate).
        operator: String,
        /// The filter, e.g. `sender=NL-NRM state=DEAD_LETTERED case_ref=(set)`.
        filter: String,
    },
    /// The dead letters were listed.
    ListDeadLetters {
        /// The operator's name.
        operator: String,
    },
    /// A redrive was asked for.
    Redrive {
        /// The operator's name.
        operator: String,
        /// The message.
        message_id: MessageId,
    },
    /// A purge was asked for.
    Purge {
        /// The operator's name.
        operator: String,
        /// The message.
        message_id: MessageId,
        /// The operator's reason.
        reason: String,
    },
    /// Federation statistics were computed over acceptance times `from`..`until`:
    /// aggregates, but two ranges a moment apart can single out one message
    /// (its corridor, kind, acceptance time and outcome), so they are audited
    /// like a search.
    Statistics {
        /// The operator's name.
        operator: String,
        /// Start of the range (inclusive; 0 when unset).
        from: Millis,
        /// End of the range (exclusive).
        until: Millis,
    },
    /// The audit log was verified.
    VerifyAudit {
        /// The operator's name.
        operator: String,
        /// Whether the chain was intact.
        intact: bool,
    },
    /// The system clock was accepted (`trmx-broker store accept-clock`, broker stopped):
    /// the store's last run moved, and with it the time from which the next start
    /// measures (and so what expires at its first tick).
    AcceptClock {
        /// Who ran it: the operating-system user (no certificate is involved offline).
        operator: String,
        /// The last run recorded before (None: the store had none).
        recorded_before: Option<Millis>,
        /// The last run recorded now: the system clock when it ran.
        accepted: Millis,
    },
}

impl OperatorAction {
    /// `SEARCH`, `LIST_DEAD_LETTERS`, `REDRIVE`, `PURGE`, `STATISTICS`, `VERIFY_AUDIT`,
    /// `ACCEPT_CLOCK`.
    pub fn name(&self) -> &'static str {
        match self {
            OperatorAction::Search { .. } => "SEARCH",
            OperatorAction::ListDeadLetters { .. } => "LIST_DEAD_LETTERS",
            OperatorAction::Redrive { .. } => "REDRIVE",
            OperatorAction::Purge { .. } => "PURGE",
            OperatorAction::Statistics { .. } => "STATISTICS",
            OperatorAction::VerifyAudit { .. } => "VERIFY_AUDIT",
            OperatorAction::AcceptClock { .. } => "ACCEPT_CLOCK",
        }
    }

    /// The operator's name.
    pub fn operator(&self) -> &str {
        match self {
            OperatorAction::Search { operator, .. }
            | OperatorAction::ListDeadLetters { operator }
            | OperatorAction::Redrive { operator, .. }
            | OperatorAction::Purge { operator, .. }
            | OperatorAction::Statistics { operator, .. }
            | OperatorAction::VerifyAudit { operator, .. }
            | OperatorAction::AcceptClock { operator, .. } => operator,
        }
    }
}

/// What one audit record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditEvent {
    /// A message changed state.
    Lifecycle {
        /// The step.
        event: LifecycleEvent,
        /// The message id.
        message_id: MessageId,
        /// The message kind.
        kind: Kind,
        /// The sender (none for broker-made receipts).
        sender: Option<ParticipantId>,
        /// The recipient.
        recipient: ParticipantId,
        /// State before (none for a new message).
        from: Option<State>,
        /// State after (none when the record was deleted).
        to: Option<State>,
        /// When the broker accepted the message.
        accepted_at: Millis,
        /// Attempts so far, after the change: 0 for `REDRIVEN`, since a redrive counts
        /// them from 0 again (the `EXPIRED` or `DEAD_LETTERED` record before it holds
        /// the earlier count).
        attempts: u32,
    },
    /// An operator acted.
    Operator(OperatorAction),
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// 1, 2, 3, …
    pub seq: u64,
    /// When it happened (the broker's clock).
    pub at: Millis,
    /// SHA-256 of the previous record (or the anchor).
    pub prev_hash: [u8; 32],
    /// What happened.
    pub event: AuditEvent,
}

fn state_code(state: Option<State>) -> u8 {
    match state {
        None => 0,
        Some(s) => u8::try_from(s.to_pb() as i32).unwrap_or(0),
    }
}

fn state_from_code(code: u8) -> Result<Option<State>, StoreError> {
    Ok(match code {
        0 => None,
        1 => Some(State::Accepted),
        2 => Some(State::InFlight),
        3 => Some(State::Acknowledged),
        4 => Some(State::Expired),
        5 => Some(State::DeadLettered),
        6 => Some(State::Withdrawn),
        7 => Some(State::Purged),
        _ => return Err(corrupt("state")),
    })
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("audit record: bad {what}"))
}

/// Writes `text`, cut to at most [`MAX_TEXT`] bytes at a character boundary (a cut
/// inside a character would not decode, and `audit verify` would call the chain broken).
fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = &text.as_bytes()[..end];
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads the canonical encoding.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, StoreError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, StoreError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, StoreError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], StoreError> {
        let b = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
    fn text(&mut self, what: &str) -> Result<String, StoreError> {
        let len = u16::from_be_bytes(self.array::<2>(what)?);
        let bytes = self.take(usize::from(len), what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(what))
    }
    fn participant(&mut self, what: &str) -> Result<Option<ParticipantId>, StoreError> {
        let text = self.text(what)?;
        if text.is_empty() {
            return Ok(None);
        }
        ParticipantId::parse(&text)
            .map(Some)
            .map_err(|_| corrupt(what))
    }
}

impl AuditRecord {
    /// The canonical encoding (what the hash covers): big-endian integers,
    /// length-prefixed UTF-8 texts, fixed field order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.push(VERSION);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.at.to_be_bytes());
        out.extend_from_slice(&self.prev_hash);
        match &self.event {
            AuditEvent::Lifecycle {
                event,
                message_id,
                kind,
                sender,
                recipient,
                from,
                to,
                accepted_at,
                attempts,
            } => {
                out.push(1);
                out.push(event.code());
                out.extend_from_slice(message_id.as_bytes());
                out.push(u8::try_from(kind.to_pb() as i32).unwrap_or(0));
                put_text(&mut out, sender.as_ref().map_or("", ParticipantId::as_str));
                put_text(&mut out, recipient.as_str());
                out.push(state_code(*from));
                out.push(state_code(*to));
                out.extend_from_slice(&accepted_at.to_be_bytes());
                out.extend_from_slice(&attempts.to_be_bytes());
            }
            AuditEvent::Operator(action) => {
                out.push(2);
                put_text(&mut out, action.operator());
                match action {
                    OperatorAction::Search { filter, .. } => {
                        out.push(1);
                        put_text(&mut out, filter);
                    }
                    OperatorAction::ListDeadLetters { .. } => out.push(2),
                    OperatorAction::Redrive { message_id, .. } => {
                        out.push(3);
                        out.extend_from_slice(message_id.as_bytes());
                    }
                    OperatorAction::Purge {
                        message_id, reason, ..
                    } => {
                        out.push(4);
                        out.extend_from_slice(message_id.as_bytes());
                        put_text(&mut out, reason);
                    }
                    OperatorAction::VerifyAudit { intact, .. } => {
                        out.push(5);
                        out.push(u8::from(*intact));
                    }
                    OperatorAction::AcceptClock {
                        recorded_before,
                        accepted,
                        ..
                    } => {
                        out.push(6);
                        out.push(u8::from(recorded_before.is_some()));
                        out.extend_from_slice(&recorded_before.unwrap_or(0).to_be_bytes());
                        out.extend_from_slice(&accepted.to_be_bytes());
                    }
                    OperatorAction::Statistics { from, until, .. } => {
                        out.push(7);
                        out.extend_from_slice(&from.to_be_bytes());
                        out.extend_from_slice(&until.to_be_bytes());
                    }
                }
            }
        }
        out
    }

    /// The sequence number, time and link that every encoded record begins
    /// with, whatever its event: all that the chain needs. A record of an
    /// event this version does not know (an operator action added by a later
    /// one) has them too, so [`verify`] and the audit retention read only
    /// these; an older broker that decoded every event called a chain with a
    /// later version's record in it broken there.
    pub fn decode_header(bytes: &[u8]) -> Result<(u64, Millis, [u8; 32]), StoreError> {
        let mut r = Reader(bytes);
        if r.u8("version")? != VERSION {
            return Err(corrupt("version"));
        }
        Ok((r.u64("seq")?, r.u64("at")?, r.array::<32>("prev_hash")?))
    }

    /// Decodes [`Self::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let (seq, at, prev_hash) = Self::decode_header(bytes)?;
        let mut r = Reader(&bytes[HEADER_BYTES..]);
        let event = match r.u8("type")? {
            1 => {
                let event =
                    LifecycleEvent::from_code(r.u8("event")?).ok_or_else(|| corrupt("event"))?;
                let message_id = MessageId::from_bytes(r.array::<16>("message_id")?);
                let kind =
                    Kind::from_pb(i32::from(r.u8("kind")?)).ok_or_else(|| corrupt("kind"))?;
                let sender = r.participant("sender")?;
                let recipient = r
                    .participant("recipient")?
                    .ok_or_else(|| corrupt("recipient"))?;
                let from = state_from_code(r.u8("from")?)?;
                let to = state_from_code(r.u8("to")?)?;
                let accepted_at = r.u64("accepted_at")?;
                let attempts = r.u32("attempts")?;
                AuditEvent::Lifecycle {
                    event,
                    message_id,
                    kind,
                    sender,
                    recipient,
                    from,
                    to,
                    accepted_at,
                    attempts,
                }
            }
            2 => {
                let operator = r.text("operator")?;
                let action = match r.u8("action")? {
                    1 => OperatorAction::Search {
                        operator,
                        filter: r.text("filter")?,
                    },
                    2 => OperatorAction::ListDeadLetters { operator },
                    3 => OperatorAction::Redrive {
                        operator,
                        message_id: MessageId::from_bytes(r.array::<16>("message_id")?),
                    },
                    4 => OperatorAction::Purge {
                        operator,
                        message_id: MessageId::from_bytes(r.array::<16>("message_id")?),
                        reason: r.text("reason")?,
                    },
                    5 => OperatorAction::VerifyAudit {
                        operator,
                        intact: r.u8("intact")? != 0,
                    },
                    6 => {
                        let had_before = r.u8("recorded_before")? != 0;
                        let before = r.u64("recorded_before")?;
                        OperatorAction::AcceptClock {
                            operator,
                            recorded_before: had_before.then_some(before),
                            accepted: r.u64("accepted")?,
                        }
                    }
                    7 => OperatorAction::Statistics {
                        operator,
                        from: r.u64("from")?,
                        until: r.u64("until")?,
                    },
                    _ => return Err(corrupt("action")),
                };
                AuditEvent::Operator(action)
            }
            _ => return Err(corrupt("type")),
        };
        if !r.0.is_empty() {
            return Err(corrupt("length"));
        }
        Ok(Self {
            seq,
            at,
            prev_hash,
            event,
        })
    }

    /// The stored value: the canonical encoding, then its SHA-256.
    pub fn to_stored(&self) -> (Vec<u8>, [u8; 32]) {
        let mut value = self.encode();
        let hash = sha256(&value);
        value.extend_from_slice(&hash);
        (value, hash)
    }
}

/// The chain head or anchor: a sequence number and a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainPoint {
    /// Sequence number (0: before the first record).
    pub seq: u64,
    /// SHA-256 of that record (zeros for seq 0).
    pub hash: [u8; 32],
}

impl ChainPoint {
    /// 40 bytes: seq, hash.
    pub fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..].copy_from_slice(&self.hash);
        out
    }

    /// Decodes [`Self::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(bytes);
        let seq = r.u64("chain point")?;
        let hash = r.array::<32>("chain point")?;
        if !r.0.is_empty() {
            return Err(corrupt("chain point"));
        }
        Ok(Self { seq, hash })
    }
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditReport {
    /// Records checked.
    pub records: u64,
    /// Sequence number of the first record whose hash or link is wrong.
    pub first_broken: Option<u64>,
    /// What is wrong there.
    pub problem: String,
    /// First record kept (0: empty log).
    pub first_seq: u64,
    /// Last record (0: empty log).
    pub last_seq: u64,
    /// Hash of the last record.
    pub head_hash: Option<[u8; 32]>,
    /// The hash the first kept record links to.
    pub anchor_hash: [u8; 32],
}

impl AuditReport {
    /// The wire form.
    pub fn to_pb(&self) -> pb::AuditReport {
        pb::AuditReport {
            records: self.records,
            intact: self.first_broken.is_none(),
            first_broken: self.first_broken.unwrap_or(0),
            problem: self.problem.clone(),
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            head_hash: self.head_hash.map(|h| h.to_vec()).unwrap_or_default(),
            anchor_hash: self.anchor_hash.to_vec(),
        }
    }
}

/// Walks `records` (stored key → value, in key order) from `anchor` and checks
/// every hash and link, then that `head` is the last record. Stops at the first
/// broken record.
pub fn verify<I>(
    anchor: ChainPoint,
    head: ChainPoint,
    records: I,
) -> Result<AuditReport, StoreError>
where
    I: IntoIterator<Item = Result<(u64, Vec<u8>), StoreError>>,
{
    let mut report = AuditReport {
        anchor_hash: anchor.hash,
        ..AuditReport::default()
    };
    let mut expected = anchor.seq + 1;
    let mut prev = anchor.hash;
    let broken = |report: &mut AuditReport, seq: u64, problem: &str| {
        report.first_broken = Some(seq);
        report.problem = problem.to_owned();
    };
    for item in records {
        let (seq, value) = item?;
        if report.first_seq == 0 {
            report.first_seq = seq;
        }
        report.records += 1;
        if seq != expected {
            broken(&mut report, expected, "missing record");
            return Ok(report);
        }
        if value.len() < 32 {
            broken(&mut report, seq, "record too short");
            return Ok(report);
        }
        let (encoding, stored_hash) = value.split_at(value.len() - 32);
        let hash = sha256(encoding);
        if hash[..] != stored_hash[..] {
            broken(&mut report, seq, "hash mismatch (record changed)");
            return Ok(report);
        }
        // (the hash covers the event; only the header is read: see
        // `AuditRecord::decode_header`)
        let (record_seq, _, prev_hash) = match AuditRecord::decode_header(encoding) {
            Ok(header) => header,
            Err(_) => {
                broken(&mut report, seq, "undecodable record");
                return Ok(report);
            }
        };
        if record_seq != seq {
            broken(&mut report, seq, "sequence number mismatch");
            return Ok(report);
        }
        if prev_hash != prev {
            broken(
                &mut report,
                seq,
                "link mismatch (previous record changed or removed)",
            );
            return Ok(report);
        }
        prev = hash;
        report.last_seq = seq;
        report.head_hash = Some(hash);
        expected = seq + 1;
    }
    let last = expected - 1;
    if head.seq > last {
        broken(
            &mut report,
            expected,
            "missing record (the chain head is further)",
        );
    } else if head.seq < last {
        broken(&mut report, head.seq + 1, "record beyond the chain head");
    } else if head.seq > anchor.seq && head.hash != prev {
        broken(&mut report, head.seq, "chain head hash mismatch");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> (ChainPoint, Vec<(u64, Vec<u8>)>) {
        let mut prev = [0u8; 32];
        let mut out = Vec::new();
        for seq in 1..=n {
            let event = if seq % 5 == 0 {
                AuditEvent::Operator(OperatorAction::AcceptClock {
                    operator: "trmx (uid 998)".into(),
                    recorded_before: (seq % 10 == 0).then_some(1_000 + seq),
                    accepted: 2_000 + seq,
                })
            } else if seq % 7 == 0 {
                AuditEvent::Operator(OperatorAction::Statistics {
                    operator: "alice".into(),
                    from: seq,
                    until: 3_000 + seq,
                })
            } else if seq % 2 == 0 {
                AuditEvent::Operator(OperatorAction::Purge {
                    operator: "alice".into(),
                    message_id: MessageId::new_v7(),
                    reason: "misaddressed".into(),
                })
            } else {
                AuditEvent::Lifecycle {
                    event: LifecycleEvent::Accepted,
                    message_id: MessageId::new_v7(),
                    kind: Kind::Referral,
                    sender: Some(ParticipantId::parse("NL-NRM").unwrap()),
                    recipient: ParticipantId::parse("BE-PAYOKE").unwrap(),
                    from: None,
                    to: Some(State::Accepted),
                    accepted_at: 7,
                    attempts: 0,
                }
            };
            let record = AuditRecord {
                seq,
                at: 1000 + seq,
                prev_hash: prev,
                event,
            };
            assert_eq!(AuditRecord::decode(&record.encode()).unwrap(), record);
            let (value, hash) = record.to_stored();
            out.push((seq, value));
            prev = hash;
        }
        (ChainPoint { seq: n, hash: prev }, out)
    }

    #[test]
    fn a_long_text_is_cut_between_characters() {
        // one byte, then two-byte characters: byte 4096 falls inside one
        let reason = format!("a{}", "é".repeat(2500));
        let record = AuditRecord {
            seq: 1,
            at: 1,
            prev_hash: [0; 32],
            event: AuditEvent::Operator(OperatorAction::Purge {
                operator: "alice".into(),
                message_id: MessageId::new_v7(),
                reason,
            }),
        };
        let decoded = AuditRecord::decode(&record.encode()).unwrap();
        let AuditEvent::Operator(OperatorAction::Purge { reason, .. }) = decoded.event else {
            panic!("{decoded:?}");
        };
        assert_eq!(reason.len(), MAX_TEXT - 1);
        assert!(reason.starts_with("aé"));
    }

    fn ok(records: &[(u64, Vec<u8>)]) -> Vec<Result<(u64, Vec<u8>), StoreError>> {
        records.iter().cloned().map(Ok).collect()
    }

    /// A record of an operator action added by a later version (as STATISTICS
    /// was to the version before it) is part of an intact chain: its hash and
    /// link are checked, not its event, so a broker going back a version, or
    /// verifying a log a later one wrote, does not call the chain broken (an
    /// auditor would take that for tampering). A change of it is still found.
    #[test]
    fn a_record_of_an_action_this_version_does_not_know_keeps_the_chain_intact() {
        let (_, mut records) = chain(3);
        // record 2 rewritten as a later version's action, and 3 linked to it
        let later = {
            let mut encoding = AuditRecord {
                seq: 2,
                at: 1002,
                prev_hash: sha256(&records[0].1[..records[0].1.len() - 32]),
                event: AuditEvent::Operator(OperatorAction::Statistics {
                    operator: "alice".into(),
                    from: 0,
                    until: 1,
                }),
            }
            .encode();
            let tag = encoding.len() - 17; // the action code before from, until
            assert_eq!(encoding[tag], 7);
            encoding[tag] = 200;
            encoding
        };
        assert!(AuditRecord::decode(&later).is_err(), "unknown here");
        let hash = sha256(&later);
        records[1].1 = [later.clone(), hash.to_vec()].concat();
        let mut third = AuditRecord::decode(&records[2].1[..records[2].1.len() - 32]).unwrap();
        third.prev_hash = hash;
        let (value, head_hash) = third.to_stored();
        records[2].1 = value;
        let head = ChainPoint {
            seq: 3,
            hash: head_hash,
        };
        let report = verify(ChainPoint::default(), head, ok(&records)).unwrap();
        assert_eq!(report.first_broken, None, "{report:?}");
        assert_eq!(report.records, 3);
        // changed, it is still found
        let mut changed = later;
        let last = changed.len() - 1;
        changed[last] ^= 1;
        records[1].1 = [changed, hash.to_vec()].concat();
        let report = verify(ChainPoint::default(), head, ok(&records)).unwrap();
        assert_eq!(report.first_broken, Some(2), "{report:?}");
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (head, records) = chain(10);
        let report = verify(ChainPoint::default(), head, ok(&records)).unwrap();
        assert_eq!(report.first_broken, None, "{report:?}");
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (10, 1, 10)
        );
        let empty = verify(ChainPoint::default(), ChainPoint::default(), Vec::new()).unwrap();
        assert_eq!(empty.first_broken, None);
    }

    #[test]
    fn tampering_is_found_at_the_record() {
        let (head, mut records) = chain(10);
        records[6].1[20] ^= 1; // seq 7
        let report = verify(ChainPoint::default(), head, ok(&records)).unwrap();
        assert_eq!(report.first_broken, Some(7));
        // a record removed in the middle
        let (head, mut records) = chain(10);
        records.remove(3);
        let report = verify(ChainPoint::default(), head, ok(&records)).unwrap();
        assert_eq!(report.first_broken, Some(4));
        // the last record removed
        let (head, mut records) = chain(10);
        records.pop();
        let report = verify(ChainPoint::default(), head, ok(&records)).unwrap();
        assert_eq!(report.first_broken, Some(10));
        // a record replaced by a well-formed one with a fresh own hash: the next link breaks
        let (head, mut records) = chain(10);
        let mut forged = AuditRecord::decode(&records[4].1[..records[4].1.len() - 32]).unwrap();
        forged.at += 1;
        records[4].1 = forged.to_stored().0;
        let report = verify(ChainPoint::default(), head, ok(&records)).unwrap();
        assert_eq!(report.first_broken, Some(6));
    }

    #[test]
    fn the_chain_continues_from_the_anchor_after_retention() {
        let (head, records) = chain(10);
        let anchor_hash = {
            let (enc, hash) = records[3].1.split_at(records[3].1.len() - 32);
            assert_eq!(sha256(enc)[..], hash[..]);
            let mut h = [0u8; 32];
            h.copy_from_slice(hash);
            h
        };
        let anchor = ChainPoint {
            seq: 4,
            hash: anchor_hash,
        };
        let report = verify(anchor, head, ok(&records[4..])).unwrap();
        assert_eq!(report.first_broken, None, "{report:?}");
        assert_eq!(report.first_seq, 5);
        let wrong = ChainPoint {
            seq: 4,
            hash: [9; 32],
        };
        assert_eq!(
            verify(wrong, head, ok(&records[4..])).unwrap().first_broken,
            Some(5)
        );
    }

    #[test]
    fn lifecycle_events() {
        use LifecycleEvent as E;
        assert_eq!(E::of(None, Some(State::Accepted), false), Some(E::Accepted));
        assert_eq!(
            E::of(Some(State::Accepted), Some(State::Accepted), false),
            None
        );
        assert_eq!(
            E::of(Some(State::DeadLettered), Some(State::Accepted), false),
            Some(E::Redriven)
        );
        assert_eq!(
            E::of(Some(State::InFlight), Some(State::Accepted), false),
            Some(E::Requeued)
        );
        assert_eq!(
            E::of(Some(State::InFlight), Some(State::DeadLettered), true),
            Some(E::Rejected)
        );
        for e in LifecycleEvent::ALL {
            assert_eq!(LifecycleEvent::from_code(e.code()), Some(e));
        }
    }
}
