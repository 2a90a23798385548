//! The participant registry: who the broker routes for and which kinds each
//! accepts, built once from the validated config.

use std::collections::{BTreeMap, BTreeSet};

use trmx_proto::{Kind, ParticipantId, pb};

use crate::config::{OrganisationType, ParticipantConfig};
use crate::error::BrokerError;

/// One participant of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    /// Its id.
    pub id: ParticipantId,
    /// Human-readable name.
    pub display_name: String,
    /// Country code or `INT`.
    pub country: String,
    /// Kind of organisation.
    pub organisation_type: OrganisationType,
    /// Application kinds it accepts (receipts are always accepted).
    pub accepts: BTreeSet<Kind>,
}

impl Participant {
    /// Whether a message of `kind` may be sent to this participant.
    pub fn accepts(&self, kind: Kind) -> bool {
        kind.is_broker_made() || self.accepts.contains(&kind)
    }

    /// The wire form for `GetInfo`.
    pub fn to_pb(&self) -> pb::Participant {
        pb::Participant {
            id: self.id.to_string(),
            display_name: self.display_name.clone(),
            country: self.country.clone(),
            organisation_type: self.organisation_type.to_pb() as i32,
            accepts: self.accepts.iter().map(|k| k.to_pb() as i32).collect(),
        }
    }
}

/// The registry, sorted by id.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    participants: BTreeMap<ParticipantId, Participant>,
}

impl Registry {
    /// Builds the registry from config entries (already validated; re-checked here).
    pub fn from_config(entries: &[ParticipantConfig]) -> Result<Self, BrokerError> {
        let mut participants = BTreeMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let id = ParticipantId::parse(&entry.id)
                .map_err(|e| BrokerError::config(format!("participants[{i}].id"), e.rule))?;
            let mut accepts = BTreeSet::new();
            for (j, name) in entry.accepts.iter().enumerate() {
                let kind = Kind::from_name(name).ok_or_else(|| {
                    BrokerError::config(
                        format!("participants[{i}].accepts[{j}]"),
                        format!("is not a message kind, got {name:?}"),
                    )
                })?;
                accepts.insert(kind);
            }
            participants.insert(
                id.clone(),
                Participant {
                    id,
                    display_name: entry.display_name.clone(),
                    country: entry.country.clone(),
                    organisation_type: entry.organisation_type,
                    accepts,
                },
            );
        }
        Ok(Self { participants })
    }

    /// The participant with this id.
    pub fn get(&self, id: &ParticipantId) -> Option<&Participant> {
        self.participants.get(id)
    }

    /// Every participant, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Participant> {
        self.participants.values()
    }

    /// Number of participants.
    pub fn len(&self) -> usize {
        self.participants.len()
    }

    /// Whether the registry is empty.
    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }
}
