//! The `presence` tree: when each participant was last seen, and the
//! `not_after` of the certificate it last connected with.
//!
//! It lives outside the message trees (written by plain inserts on the writer
//! thread, never inside a message transaction): it is bookkeeping for the
//! operator's alerts, not part of any message's state, and a message change
//! never waits for it.

use trmx_proto::ParticipantId;

use super::Core;
use super::codec::read_u64;
use crate::store::{Presence, StoreError};

/// Name of the sled tree (key: participant id → [`encode`]).
pub(super) const TREE: &str = "presence";
/// First byte of every value: the encoding's version.
const VERSION: u8 = 1;
/// Length of an encoded value.
const ENCODED_LEN: usize = 18;

/// version | last_seen (u64) | 1 if the certificate's not_after is known | not_after (u64).
fn encode(p: &Presence) -> [u8; ENCODED_LEN] {
    let mut out = [0u8; ENCODED_LEN];
    out[0] = VERSION;
    out[1..9].copy_from_slice(&p.last_seen.to_be_bytes());
    if let Some(not_after) = p.cert_not_after {
        out[9] = 1;
        out[10..18].copy_from_slice(&not_after.to_be_bytes());
    }
    out
}

fn decode(key: &[u8], value: &[u8]) -> Result<Presence, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("presence entry: {why}"));
    let id = std::str::from_utf8(key).map_err(|_| corrupt("participant id is not UTF-8"))?;
    let participant = ParticipantId::parse(id).map_err(|_| corrupt("invalid participant id"))?;
    if value.len() != ENCODED_LEN || value[0] != VERSION {
        return Err(corrupt("unknown encoding"));
    }
    let cert_not_after = match value[9] {
        0 => None,
        1 => Some(read_u64(&value[10..])?),
        _ => return Err(corrupt("unknown certificate flag")),
    };
    Ok(Presence {
        participant,
        last_seen: read_u64(&value[1..])?,
        cert_not_after,
    })
}

impl Core {
    /// Writes every entry of `seen` that is newer than the one stored (last
    /// seen only moves forward: a late save cannot undo a newer one).
    /// Runs on the writer thread; the caller then waits for a flush.
    pub(super) fn save_presence(&self, seen: &[Presence]) -> Result<(), StoreError> {
        for p in seen {
            let key = p.participant.as_str().as_bytes();
            let stored = self
                .presence
                .get(key)
                .map_err(super::ops::storage)?
                .and_then(|v| decode(key, &v).ok());
            let newer = stored.is_none_or(|old| {
                p.last_seen > old.last_seen
                    || (p.last_seen == old.last_seen && p.cert_not_after != old.cert_not_after)
            });
            if newer {
                self.presence
                    .insert(key, &encode(p)[..])
                    .map_err(super::ops::storage)?;
            }
        }
        Ok(())
    }

    /// Every stored presence. An entry that cannot be read is logged and
    /// skipped: it only feeds the operator's gauges.
    pub(super) fn presence(&self) -> Result<Vec<Presence>, StoreError> {
        let mut out = Vec::new();
        for item in self.presence.iter() {
            let (key, value) = item.map_err(super::ops::storage)?;
            match decode(&key, &value) {
                Ok(p) => out.push(p),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable presence entry"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Millis;

    fn presence(last_seen: Millis, cert_not_after: Option<Millis>) -> Presence {
        Presence {
            participant: ParticipantId::parse("NL-NRM").unwrap(),
            last_seen,
            cert_not_after,
        }
    }

    #[test]
    fn an_entry_reads_back_as_written() {
        for p in [
            presence(1_700_000_000_000, Some(1_800_000_000_000)),
            presence(5, None),
        ] {
            let value = encode(&p);
            assert_eq!(decode(b"NL-NRM", &value).unwrap(), p);
        }
    }

    #[test]
    fn a_damaged_entry_is_an_error_not_a_guess() {
        let value = encode(&presence(5, None));
        assert!(decode(b"NL-NRM", &value[..10]).is_err(), "short");
        let mut other_version = value;
        other_version[0] = 2;
        assert!(decode(b"NL-NRM", &other_version).is_err(), "version");
        let mut bad_flag = value;
        bad_flag[9] = 7;
        assert!(decode(b"NL-NRM", &bad_flag).is_err(), "flag");
        assert!(decode(b"not an id", &value).is_err(), "key");
    }
}
