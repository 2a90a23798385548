//! Identifier newtypes. Each is checked once, at construction; holding one
//! means holding a valid value.

use std::fmt;
use std::str::FromStr;

use crate::ValidationError;

/// A participant of the federation: `^(?:[A-Z]{2}|INT)-[A-Z0-9]{2,24}$`,
/// e.g. `NL-NRM`, `BE-PAYOKE`, `INT-IOM`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParticipantId(String);

impl ParticipantId {
    /// Checks `value` against the participant-ID rule.
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        if is_valid_participant_id(value) {
            Ok(Self(value.to_owned()))
        } else {
            Err(ValidationError::new(
                "",
                "must be a participant ID like NL-NRM (country code or INT, '-', 2-24 of A-Z 0-9)",
            ))
        }
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The country part: an ISO 3166-1 alpha-2 code or `INT`.
    pub fn country(&self) -> &str {
        self.0.split('-').next().unwrap_or_default()
    }
}

/// Whether `value` matches `^(?:[A-Z]{2}|INT)-[A-Z0-9]{2,24}$`.
pub fn is_valid_participant_id(value: &str) -> bool {
    let Some((country, org)) = value.split_once('-') else {
        return false;
    };
    let country_ok =
        country == "INT" || (country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase()));
    let org_ok = (2..=24).contains(&org.len())
        && org
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    country_ok && org_ok
}

macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(uuid::Uuid);

        impl $name {
            /// Parses a lower-case hyphenated UUID (the only accepted encoding).
            pub fn parse(value: &str) -> Result<Self, ValidationError> {
                parse_lower_uuid(value).map(Self)
            }

            /// The underlying UUID.
            pub fn uuid(&self) -> uuid::Uuid {
                self.0
            }

            /// The 16 raw bytes (used as storage keys).
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// From 16 raw bytes (storage keys).
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(uuid::Uuid::from_bytes(bytes))
            }
        }

        impl From<uuid::Uuid> for $name {
            fn from(value: uuid::Uuid) -> Self {
                Self(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
    };
}

uuid_newtype!(
    /// A message's id: a lower-case UUID (v7 preferred), the idempotency key
    /// together with the sender.
    MessageId
);

uuid_newtype!(
    /// A pseudonymous case reference: a random lower-case UUID minted by the
    /// node that opened the case.
    CaseRef
);

impl MessageId {
    /// A new time-ordered (v7) id.
    pub fn new_v7() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// Whether this is an id of the broker's own space (UUIDv5, see
    /// [`Self::receipt_id`]), which no participant may submit.
    pub fn is_broker_made(&self) -> bool {
        self.0.get_version_num() == 5
    }

    /// The id of the broker-made receipt for `original` with `outcome`
    /// (DESIGN.md §3, Receipts): the broker makes it so and a node checks a
    /// receipt's id against it, so both call this one function.
    pub fn receipt_for(original: MessageId, outcome: crate::pb::Outcome) -> Self {
        Self::receipt_id(original, receipt_outcome_name(outcome))
    }

    /// The id of the broker-made receipt for `original` with the outcome named
    /// `outcome` (see [`receipt_outcome_name`]): UUIDv5 of (original id,
    /// outcome name), so that a repeated receipt is recognisably the same
    /// message.
    pub fn receipt_id(original: MessageId, outcome: &str) -> Self {
        let mut name = original.0.hyphenated().to_string();
        name.push(':');
        name.push_str(outcome);
        Self(uuid::Uuid::new_v5(&RECEIPT_NAMESPACE, name.as_bytes()))
    }
}

impl CaseRef {
    /// A new random (v4) case reference.
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

/// The name hashed into a receipt's id: the [`crate::pb::Outcome`] value's name
/// without its `OUTCOME_` prefix (`DELIVERED`, `EXPIRED`, `REJECTED_BY_RECIPIENT`,
/// `DEAD_LETTERED`, `PURGED`). Part of the wire contract: changing it changes
/// every receipt id.
pub fn receipt_outcome_name(outcome: crate::pb::Outcome) -> &'static str {
    let name = outcome.as_str_name();
    name.strip_prefix("OUTCOME_").unwrap_or(name)
}

/// Namespace of receipt ids (UUIDv5). Fixed forever: changing it would make
/// receipts of old messages look new.
const RECEIPT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x7f3b_6a1e_2c4d_4e8f_9a0b_1c2d_3e4f_5a6b);

fn parse_lower_uuid(value: &str) -> Result<uuid::Uuid, ValidationError> {
    const RULE: &str = "must be a lower-case hyphenated UUID";
    if value.len() != 36 || value.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ValidationError::new("", RULE));
    }
    uuid::Uuid::parse_str(value).map_err(|_| ValidationError::new("", RULE))
}

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ParticipantId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for ParticipantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participant_ids() {
        for ok in [
            "NL-NRM",
            "BE-PAYOKE",
            "NG-NAPTIP",
            "INT-IOM",
            "DE-AB",
            "FR-A1B2C3D4E5F6G7H8I9J0K1L2",
        ] {
            assert!(ParticipantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "NL",
            "nl-NRM",
            "NL-nrm",
            "NLD-NRM",
            "IN-",
            "NL-N",
            "NL_NRM",
            "NL-NRM-X",
            "INTL-IOM",
            "NL-ABCDEFGHIJKLMNOPQRSTUVWXY",
        ] {
            assert!(ParticipantId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            ParticipantId::parse("INT-IOM").map(|p| p.country().to_owned()),
            Ok("INT".to_owned())
        );
    }

    #[test]
    fn uuids_must_be_lower_case_hyphenated() {
        let id = MessageId::new_v7();
        assert_eq!(MessageId::parse(&id.to_string()), Ok(id));
        assert!(MessageId::parse(&id.to_string().to_uppercase()).is_err());
        assert!(MessageId::parse(&id.uuid().simple().to_string()).is_err());
        assert!(CaseRef::parse("not-a-uuid").is_err());
    }

    #[test]
    fn receipt_ids_are_stable_and_distinct_per_outcome() {
        let id = MessageId::new_v7();
        assert_eq!(
            MessageId::receipt_id(id, "DELIVERED"),
            MessageId::receipt_id(id, "DELIVERED")
        );
        assert_ne!(
            MessageId::receipt_id(id, "DELIVERED"),
            MessageId::receipt_id(id, "EXPIRED")
        );
    }

    /// The outcome names are wire contract (every receipt id hashes one): a
    /// renamed enum value must not change them silently.
    #[test]
    fn receipt_ids_hash_the_outcome_names_of_the_contract() {
        use crate::pb::Outcome;
        let id: MessageId = "01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap();
        for (outcome, name) in [
            (Outcome::Delivered, "DELIVERED"),
            (Outcome::Expired, "EXPIRED"),
            (Outcome::RejectedByRecipient, "REJECTED_BY_RECIPIENT"),
            (Outcome::DeadLettered, "DEAD_LETTERED"),
            (Outcome::Purged, "PURGED"),
        ] {
            assert_eq!(receipt_outcome_name(outcome), name);
            assert_eq!(
                MessageId::receipt_for(id, outcome),
                MessageId::receipt_id(id, name)
            );
        }
        assert_eq!(
            MessageId::receipt_for(id, Outcome::Delivered).to_string(),
            "e7cc68e9-7f69-50cf-8343-8e628c1d8b0a",
            "the id of a delivery receipt of a fixed message"
        );
    }
}
