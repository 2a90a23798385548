//! The participant registry: who the broker routes for and which kinds each
//! accepts, built from the validated config at start and again at a reload (SIGHUP,
//! [`LiveRegistry`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError, RwLock};

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

/// The registry in force. A reload (SIGHUP) replaces it whole; each request reads the
/// one in force when it looks, so a participant added is served at its next request and
/// one removed is refused at its next.
#[derive(Debug, Default)]
pub struct LiveRegistry(RwLock<Arc<Registry>>);

impl LiveRegistry {
    /// Holds `registry`.
    pub fn new(registry: Registry) -> Self {
        Self(RwLock::new(Arc::new(registry)))
    }

    /// The registry in force now.
    pub fn current(&self) -> Arc<Registry> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `registry` in force; returns what differs from the one it replaces.
    pub fn replace(&self, registry: Registry) -> RegistryChange {
        let mut held = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let change = held.changes_to(&registry);
        *held = Arc::new(registry);
        change
    }
}

/// What a new registry changes, by participant id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryChange {
    /// In the new registry only.
    pub added: Vec<ParticipantId>,
    /// In the old one only.
    pub removed: Vec<ParticipantId>,
    /// In both, with another name, country, type or accepted kinds.
    pub changed: Vec<ParticipantId>,
}

impl RegistryChange {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl Registry {
    /// What `new` changes of this registry.
    pub fn changes_to(&self, new: &Registry) -> RegistryChange {
        let mut change = RegistryChange::default();
        for (id, participant) in &new.participants {
            match self.participants.get(id) {
                None => change.added.push(id.clone()),
                Some(old) if old != participant => change.changed.push(id.clone()),
                Some(_) => {}
            }
        }
        change.removed = self
            .participants
            .keys()
            .filter(|id| !new.participants.contains_key(*id))
            .cloned()
            .collect();
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, accepts: &[&str]) -> ParticipantConfig {
        ParticipantConfig {
            id: id.into(),
            display_name: id.into(),
            country: id[..2].into(),
            organisation_type: OrganisationType::Ngo,
            accepts: accepts.iter().map(|k| (*k).to_owned()).collect(),
        }
    }

    /// A reload tells the added, the removed and the changed apart (an entry whose
    /// accepted kinds changed is changed, one listed again as it was is not), and the one
    /// put in force is what requests read from then on.
    #[test]
    fn a_replaced_registry_says_what_changed_and_is_read_from_then_on() {
        let live = LiveRegistry::new(
            Registry::from_config(&[
                entry("NL-NRM", &["referral"]),
                entry("BE-PAYOKE", &["referral"]),
                entry("INT-IOM", &["follow-up"]),
            ])
            .unwrap(),
        );
        let before = live.current();
        let change = live.replace(
            Registry::from_config(&[
                entry("NL-NRM", &["referral"]),
                entry("BE-PAYOKE", &["referral", "follow-up"]),
                entry("DE-KOK", &["referral"]),
            ])
            .unwrap(),
        );
        let ids = |ids: &[&str]| -> Vec<ParticipantId> {
            ids.iter()
                .map(|id| ParticipantId::parse(id).unwrap())
                .collect()
        };
        assert_eq!(
            change,
            RegistryChange {
                added: ids(&["DE-KOK"]),
                removed: ids(&["INT-IOM"]),
                changed: ids(&["BE-PAYOKE"]),
            }
        );
        let be = ParticipantId::parse("BE-PAYOKE").unwrap();
        assert!(live.current().get(&be).unwrap().accepts(Kind::FollowUp));
        // (a request that took the registry before goes on with it)
        assert!(!before.get(&be).unwrap().accepts(Kind::FollowUp));
        assert!(live.replace(Registry::clone(&live.current())).is_empty());
    }
}
