//! The audit log in sled (see [`crate::store::audit`] for the records and the
//! chain rules).
//!
//! | tree | key → value |
//! |---|---|
//! | `audit` | seq of the block's first record (u64 BE) → block: [`BLOCK_MARK`], then per record (consecutive seqs) its length (u32 BE) and stored value (canonical encoding ‖ SHA-256 of it). A value without the mark is one record (stores written before blocks). |
//! | `audit_meta` | `head` → seq, hash of the last record; `anchor` → seq, hash the first kept record links to |
//!
//! The records of one transaction are appended ([`Tx::audit`]: [`Tx::put`]
//! calls it through [`Tx::audit_change`]; operator actions directly) to a
//! block that is written when the transaction's work is done
//! ([`Tx::finish_audit`], called by `Core::transact`), in the same
//! transaction: one insert per transaction (per [`BLOCK_MAX`] bytes) instead of
//! one per record — every sled insert of a new key costs a page update and,
//! every few, a node split. A block never spans two segments, so retention
//! ([`Core::audit_prune`], from `tick`) still drops whole segments of
//! [`SEGMENT_RECORDS`] records and moves the anchor. Each record keeps its own
//! hash, so a changed record is still found at its own sequence number.

use std::path::Path;

use super::Core;
use super::codec::Record;
use super::ops::storage;
use super::tx::{AUDIT, AUDIT_META, Tx, TxResult, abort, after};
use crate::store::audit::{
    AuditEvent, AuditRecord, AuditReport, ChainPoint, LifecycleEvent, SEGMENT_RECORDS, segment_of,
    verify,
};
use crate::store::{Millis, StoreError};

const HEAD: &[u8] = b"head";
const ANCHOR: &[u8] = b"anchor";
/// Attempts at a verification that raced with retention.
const VERIFY_ATTEMPTS: usize = 3;
/// Segments dropped per `tick` at most.
const PRUNE_SEGMENTS_PER_TICK: usize = 4;

/// First byte of a block value (a record's canonical encoding starts with
/// its format version, 1).
const BLOCK_MARK: u8 = 0xB1;
/// A block is closed once it holds this many bytes (well below the size at
/// which sled stores a value in a file of its own).
const BLOCK_MAX: usize = 32 * 1024;

/// The audit records of one transaction not yet written to the tree.
#[derive(Debug, Default)]
pub(super) struct PendingBlock {
    first: u64,
    next: u64,
    value: Vec<u8>,
}

/// Appends one stored record to a block value.
fn push_entry(block: &mut Vec<u8>, stored: &[u8]) {
    if block.is_empty() {
        block.push(BLOCK_MARK);
    }
    let len = u32::try_from(stored.len()).unwrap_or(u32::MAX);
    block.extend_from_slice(&len.to_be_bytes());
    block.extend_from_slice(stored);
}

/// The records `(seq, stored value)` of the `audit` tree value at `key`
/// (a block, or one record as written before blocks). A malformed block
/// yields its remainder as one record, which then fails verification there.
fn entries(key: u64, value: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let Some((&BLOCK_MARK, mut rest)) = value.split_first() else {
        return vec![(key, value.to_vec())];
    };
    let mut out = Vec::new();
    let mut seq = key;
    while !rest.is_empty() {
        let len = rest
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_be_bytes(b) as usize);
        match len {
            Some(len) if rest.len() >= 4 + len => {
                out.push((seq, rest[4..4 + len].to_vec()));
                rest = &rest[4 + len..];
            }
            _ => {
                out.push((seq, rest.to_vec()));
                break;
            }
        }
        seq += 1;
    }
    out
}

fn key_seq(key: &[u8]) -> Result<u64, StoreError> {
    let key: [u8; 8] = key
        .try_into()
        .map_err(|_| StoreError::Corrupt("audit key".to_owned()))?;
    Ok(u64::from_be_bytes(key))
}

/// The stored value of record `seq` (None if not kept).
fn find_record(audit: &::sled::Tree, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(item) = audit.range(..=seq.to_be_bytes()).next_back() else {
        return Ok(None);
    };
    let (key, value) = item.map_err(storage)?;
    Ok(entries(key_seq(&key)?, &value)
        .into_iter()
        .find(|(s, _)| *s == seq)
        .map(|(_, stored)| stored))
}

impl Tx<'_> {
    /// Writes the audit records of this transaction (see the module doc).
    pub(super) fn finish_audit(&self) -> TxResult<()> {
        let block = std::mem::take(&mut *self.audit_block.borrow_mut());
        if !block.value.is_empty() {
            self.t[AUDIT].insert(&block.first.to_be_bytes(), block.value)?;
        }
        Ok(())
    }

    fn chain_point(&self, key: &[u8]) -> TxResult<ChainPoint> {
        match self.t[AUDIT_META].get(key)? {
            Some(v) => match ChainPoint::decode(&v) {
                Ok(point) => Ok(point),
                Err(e) => abort(e),
            },
            None => Ok(ChainPoint::default()),
        }
    }

    /// Appends `event` at `at` to the chain.
    pub(super) fn audit(&self, at: Millis, event: AuditEvent) -> TxResult<()> {
        let head = self.chain_point(HEAD)?;
        let record = AuditRecord {
            seq: head.seq + 1,
            at,
            prev_hash: head.hash,
            event,
        };
        let (value, hash) = record.to_stored();
        {
            let mut block = self.audit_block.borrow_mut();
            let fits = !block.value.is_empty()
                && block.next == record.seq
                && segment_of(block.first) == segment_of(record.seq)
                && block.value.len() + value.len() <= BLOCK_MAX;
            if !fits {
                let done = std::mem::take(&mut *block);
                if !done.value.is_empty() {
                    self.t[AUDIT].insert(&done.first.to_be_bytes(), done.value)?;
                }
                block.first = record.seq;
            }
            push_entry(&mut block.value, &value);
            block.next = record.seq + 1;
        }
        let head = ChainPoint {
            seq: record.seq,
            hash,
        };
        self.t[AUDIT_META].insert(HEAD, &head.encode()[..])?;
        Ok(())
    }

    /// Records the change `old` → `new` of one message if its state changed
    /// (no case reference, no payload).
    pub(super) fn audit_change(&self, old: Option<&Record>, new: Option<&Record>) -> TxResult<()> {
        let rejected = new.is_some_and(|n| n.rejected);
        let Some(event) = LifecycleEvent::of(old.map(|r| r.state), new.map(|r| r.state), rejected)
        else {
            return Ok(());
        };
        let Some(r) = new.or(old) else {
            return Ok(());
        };
        let at = match (new, old) {
            (Some(n), _) => n.state_changed_at,
            (None, Some(o)) => o.metadata_delete_at.unwrap_or(o.state_changed_at),
            (None, None) => return Ok(()),
        };
        self.audit(
            at,
            AuditEvent::Lifecycle {
                event,
                message_id: r.message_id,
                kind: r.kind,
                sender: r.sender.clone(),
                recipient: r.recipient.clone(),
                from: old.map(|o| o.state),
                to: new.map(|n| n.state),
                accepted_at: r.accepted_at,
                attempts: r.attempts,
            },
        )
    }
}

fn chain_point(meta: &::sled::Tree, key: &[u8]) -> Result<ChainPoint, StoreError> {
    match meta.get(key).map_err(storage)? {
        Some(v) => ChainPoint::decode(&v),
        None => Ok(ChainPoint::default()),
    }
}

/// Verifies the chain in the `audit` / `audit_meta` trees: the records from the
/// anchor up to the head read at the start (records appended meanwhile are left
/// for the next verification). Retried when retention moved the anchor meanwhile.
fn verify_trees(audit: &::sled::Tree, meta: &::sled::Tree) -> Result<AuditReport, StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let anchor = chain_point(meta, ANCHOR)?;
        let head = chain_point(meta, HEAD)?;
        let records = audit
            .range(..=head.seq.to_be_bytes())
            .map(|item| -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
                let (key, value) = item.map_err(storage)?;
                Ok(entries(key_seq(&key)?, &value))
            })
            .flat_map(|block| match block {
                Ok(records) => records.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
            // records appended after the head was read
            .filter(|item| item.as_ref().map_or(true, |(seq, _)| *seq <= head.seq));
        let report = verify(anchor, head, records)?;
        if report.first_broken.is_none()
            || attempt >= VERIFY_ATTEMPTS
            || chain_point(meta, ANCHOR)? == anchor
        {
            return Ok(report);
        }
    }
}

impl Core {
    /// Verifies the audit chain (reads only; runs beside the writer).
    pub(super) fn audit_verify(&self) -> Result<AuditReport, StoreError> {
        verify_trees(&self.trees[AUDIT], &self.trees[AUDIT_META])
    }

    /// Drops whole segments whose last record is older than the audit retention,
    /// oldest first, keeping the hash the chain continues from. Returns the
    /// records dropped. A segment is dropped only once the next one has begun.
    pub(super) fn audit_prune(&self, now: Millis) -> Result<u64, StoreError> {
        let audit = &self.trees[AUDIT];
        let meta = &self.trees[AUDIT_META];
        let retention = self.life.audit_retention;
        let mut dropped = 0;
        for _ in 0..PRUNE_SEGMENTS_PER_TICK {
            let anchor = chain_point(meta, ANCHOR)?;
            let head = chain_point(meta, HEAD)?;
            let first = anchor.seq + 1;
            let segment_end = (first - 1) / SEGMENT_RECORDS * SEGMENT_RECORDS + SEGMENT_RECORDS;
            if head.seq <= segment_end {
                break; // the segment is still being written (or is the last one)
            }
            let Some(last) = find_record(audit, segment_end)? else {
                return Err(StoreError::Corrupt(format!(
                    "audit record {segment_end} missing"
                )));
            };
            if last.len() < 32 {
                return Err(StoreError::Corrupt("audit record too short".to_owned()));
            }
            let (encoding, hash) = last.split_at(last.len() - 32);
            // (the header only: a later version's record has one too)
            let (_, at, _) = AuditRecord::decode_header(encoding)?;
            if after(at, retention) > now {
                break;
            }
            let mut new_anchor = ChainPoint {
                seq: segment_end,
                hash: [0; 32],
            };
            new_anchor.hash.copy_from_slice(hash);
            // blocks never span two segments: these hold exactly its records
            let keys = audit
                .range(first.to_be_bytes()..=segment_end.to_be_bytes())
                .keys()
                .collect::<Result<Vec<_>, _>>()
                .map_err(storage)?;
            self.transact(|tx| {
                for key in &keys {
                    tx.t[AUDIT].remove(key)?;
                }
                tx.t[AUDIT_META].insert(ANCHOR, &new_anchor.encode()[..])?;
                Ok(())
            })?;
            dropped += segment_end + 1 - first;
        }
        if dropped > 0 {
            tracing::info!(records = dropped, "audit segments past retention dropped");
        }
        Ok(dropped)
    }
}

/// Opens the sled database in `path` for offline work (the broker must be
/// stopped: sled locks the directory) after checking that it is a broker store.
pub(super) fn open_existing(path: &Path) -> Result<::sled::Db, StoreError> {
    let open_err = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    // never create a database where there is none (sled would)
    std::fs::read_dir(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => open_err("the directory does not exist".to_owned()),
        _ => open_err(format!("cannot read the directory: {e}")),
    })?;
    if !path.join("conf").is_file() {
        return Err(open_err("not a trmx broker data directory".to_owned()));
    }
    let config = ::sled::Config::new()
        .path(path)
        .cache_capacity(16 << 20)
        .flush_every_ms(None);
    let db =
        trmx_durable::open_sled(&config).map_err(|e| open_err(super::describe_open_error(&e)))?;
    let is_store = db
        .open_tree("meta")
        .and_then(|meta| meta.get("format"))
        .map_err(|e| open_err(e.to_string()))?
        .is_some_and(|format| format.as_ref() == super::FORMAT);
    if !is_store {
        return Err(open_err("not a trmx broker data directory".to_owned()));
    }
    Ok(db)
}

/// Verifies the audit log of the broker store in `path` while the broker is
/// stopped (offline). Changes no record (opening a sled store still does sled's own
/// housekeeping on its files: recovery, a snapshot).
pub fn verify_audit_offline(path: &Path) -> Result<AuditReport, StoreError> {
    let db = open_existing(path)?;
    let audit = db.open_tree("audit").map_err(storage)?;
    let meta = db.open_tree("audit_meta").map_err(storage)?;
    verify_trees(&audit, &meta)
}

/// Test support only (tamper tests): replaces the stored value of audit record
/// `seq` in the stopped broker's store at `path` with `change(value)` and
/// flushes. Returns false when there is no such record. Never use it on a real
/// store: it breaks the chain on purpose.
#[doc(hidden)]
pub fn tamper_audit_record(
    path: &Path,
    seq: u64,
    change: impl FnOnce(&mut Vec<u8>),
) -> Result<bool, StoreError> {
    let db = open_existing(path)?;
    let audit = db.open_tree("audit").map_err(storage)?;
    let Some(item) = audit.range(..=seq.to_be_bytes()).next_back() else {
        return Ok(false);
    };
    let (key, value) = item.map_err(storage)?;
    let first = key_seq(&key)?;
    let mut records = entries(first, &value);
    let Some((_, stored)) = records.iter_mut().find(|(s, _)| *s == seq) else {
        return Ok(false);
    };
    change(stored);
    let value = if value.first() == Some(&BLOCK_MARK) {
        let mut block = Vec::new();
        for (_, stored) in &records {
            push_entry(&mut block, stored);
        }
        block
    } else {
        records.swap_remove(0).1
    };
    audit.insert(key, value).map_err(storage)?;
    trmx_durable::flush_sled(&db).map_err(storage)?;
    Ok(true)
}

/// Every audit record kept in the stopped broker's store at `path`, oldest
/// first (for inspection and tests). Changes no record (see
/// [`verify_audit_offline`]).
pub fn audit_records_offline(path: &Path) -> Result<Vec<AuditRecord>, StoreError> {
    let db = open_existing(path)?;
    let audit = db.open_tree("audit").map_err(storage)?;
    let mut out = Vec::new();
    for item in audit.iter() {
        let (key, value) = item.map_err(storage)?;
        for (_, value) in entries(key_seq(&key)?, &value) {
            if value.len() < 32 {
                return Err(StoreError::Corrupt("audit record too short".to_owned()));
            }
            out.push(AuditRecord::decode(&value[..value.len() - 32])?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Lifecycle;
    use crate::store::audit::OperatorAction;
    use crate::store::sled::{SledOptions, SledStore};

    fn lifecycle() -> Lifecycle {
        Lifecycle {
            ack_timeout: Duration::from_secs(30),
            max_attempts: 3,
            redelivery_backoff_base: Duration::from_secs(2),
            redelivery_backoff_max: Duration::from_secs(10),
            dead_letter_retention: Duration::from_secs(3600),
            metadata_retention: Duration::from_secs(3600),
            max_queued_bytes_per_sender: 1 << 20,
            audit_retention: Duration::from_secs(60),
            ..Lifecycle::default()
        }
    }

    fn action(n: u64) -> AuditEvent {
        AuditEvent::Operator(OperatorAction::Purge {
            operator: format!("op{n}"),
            message_id: trmx_proto::MessageId::new_v7(),
            reason: "test".to_owned(),
        })
    }

    /// Appends `per_tx` records in each of `txs` transactions at `at`.
    fn append(core: &Core, txs: u64, per_tx: u64, at: Millis) {
        for t in 0..txs {
            core.transact(|tx| {
                for i in 0..per_tx {
                    tx.audit(at, action(t * per_tx + i))?;
                }
                Ok(())
            })
            .unwrap();
        }
    }

    /// A damaged record stops the audit log's retention, not the timers: the tick
    /// applies them and reports the failure, and its wake-ups go out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_audit_record_stops_the_audit_retention_not_the_timers() {
        use crate::store::BrokerStore;
        use crate::store::conformance::{BE, NL, lease_ids, message, pid, submit_ok};
        use trmx_proto::envelope::Priority;

        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), SledOptions::default(), lifecycle()).unwrap();
        append(&store.inner.core, 1, SEGMENT_RECORDS + 10, 1_000);
        store.close().await.unwrap();
        drop(store);
        // the last record of the first segment no longer decodes
        let damaged = tamper_audit_record(dir.path(), SEGMENT_RECORDS, |v| v[0] ^= 0xff).unwrap();
        assert!(damaged);

        let store = SledStore::open(dir.path(), SledOptions::default(), lifecycle()).unwrap();
        let now = 2_000;
        let m = message(NL, BE, Priority::Normal, 100, now);
        submit_ok(&store, &m, now).await;
        assert_eq!(lease_ids(&store, BE, 1, 1, now).await, vec![m.message_id]);
        let mut wakeups = store.wakeups();
        // past the ack deadline and the backoff, and past the audit retention
        let report = store.tick(now + 100_000).await.unwrap();
        assert_eq!(report.redelivery_due, 1);
        assert!(report.audit_prune_error.is_some(), "{report:?}");
        assert_eq!(wakeups.try_recv().ok(), Some(pid(BE)));
        store.close().await.unwrap();
    }

    #[test]
    fn blocks_keep_every_record_span_no_segment_and_prune_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), SledOptions::default(), lifecycle()).unwrap();
        let core = &store.inner.core;
        // 3 segments and a bit, in transactions of odd sizes (blocks cross
        // no segment boundary even when a transaction does)
        let total = 3 * SEGMENT_RECORDS + 77;
        append(core, total / 333, 333, 1_000);
        append(core, 1, total % 333, 1_000);
        let report = core.audit_verify().unwrap();
        assert_eq!(report.first_broken, None, "{}", report.problem);
        assert_eq!((report.first_seq, report.last_seq), (1, total));
        assert_eq!(report.records, total);
        // fewer tree entries than records: blocks
        let blocks = core.trees[AUDIT].len() as u64;
        assert!(blocks < total / 10, "{blocks} blocks");
        for item in core.trees[AUDIT].iter() {
            let (key, value) = item.unwrap();
            let records = entries(key_seq(&key).unwrap(), &value);
            let first = records.first().unwrap().0;
            let last = records.last().unwrap().0;
            assert_eq!(segment_of(first), segment_of(last));
        }
        // retention drops whole segments and the chain still verifies
        let dropped = core.audit_prune(1_000 + 61_000).unwrap();
        assert_eq!(dropped, 3 * SEGMENT_RECORDS);
        let report = core.audit_verify().unwrap();
        assert_eq!(report.first_broken, None, "{}", report.problem);
        assert_eq!(report.first_seq, 3 * SEGMENT_RECORDS + 1);
        assert_eq!(report.last_seq, total);
        // a changed record inside a block is found at its own seq
        let target = total - 5;
        let path = dir.path().to_owned();
        drop(store);
        assert!(tamper_audit_record(&path, target, |v| v[12] ^= 1).unwrap());
        let report = verify_audit_offline(&path).unwrap();
        assert_eq!(report.first_broken, Some(target));
        let records = audit_records_offline(&path).unwrap();
        assert_eq!(records.len() as u64, total - 3 * SEGMENT_RECORDS);
    }
}
