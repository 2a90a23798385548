//! Envelope validation.
//!
//! [`SubmitEnvelope::check`] validates what a node hands to `Submit`;
//! [`check_delivery`] validates what a node receives. Both name the field and
//! the rule broken, never a value.

use std::time::SystemTime;

use crate::time::from_timestamp;
use crate::{CaseRef, Kind, MessageId, ParticipantId, ValidationError, pb};

/// Length of a SHA-256 digest.
pub const DIGEST_LEN: usize = 32;

/// Longest accepted `content_type`.
const MAX_CONTENT_TYPE_LEN: usize = 256;

/// Delivery priority (the domain view of [`pb::Priority`]). Urgent sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Children, imminent return, safety risk.
    Urgent,
    /// Everything else.
    Normal,
}

impl Priority {
    /// From the wire enum; `UNSPECIFIED` means normal.
    pub fn from_pb(value: i32) -> Result<Self, ValidationError> {
        match pb::Priority::try_from(value) {
            Ok(pb::Priority::Urgent) => Ok(Priority::Urgent),
            Ok(pb::Priority::Normal | pb::Priority::Unspecified) => Ok(Priority::Normal),
            Err(_) => Err(ValidationError::new(
                "envelope.priority",
                "must be a known Priority",
            )),
        }
    }

    /// The wire enum.
    pub fn to_pb(self) -> pb::Priority {
        match self {
            Priority::Urgent => pb::Priority::Urgent,
            Priority::Normal => pb::Priority::Normal,
        }
    }
}

/// The client-set fields of an envelope handed to `Submit`, validated.
///
/// # Invariants
/// - `payload_sha256` is the SHA-256 of the payload that was checked.
/// - `content_type` agrees with `kind`.
/// - the broker-set fields (`accepted_at`, `broker_seq`) were empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitEnvelope {
    /// The idempotency key.
    pub message_id: MessageId,
    /// The recipient.
    pub recipient: ParticipantId,
    /// The kind (may be broker-made: the broker refuses those with
    /// `PERMISSION_DENIED`, which is not a format error).
    pub kind: Kind,
    /// The case reference.
    pub case_ref: CaseRef,
    /// The message answered, if any.
    pub in_reply_to: Option<MessageId>,
    /// Priority.
    pub priority: Priority,
    /// Sender's creation time.
    pub created_at: SystemTime,
    /// Sender's requested expiry, if any.
    pub expires_at: Option<SystemTime>,
    /// The content type as sent.
    pub content_type: String,
    /// The checked digest.
    pub payload_sha256: [u8; DIGEST_LEN],
}

impl SubmitEnvelope {
    /// Validates an envelope handed to `Submit`: every client-set field well
    /// formed, broker-set fields empty, digest matching the payload, content
    /// type agreeing with the kind.
    pub fn check(envelope: &pb::Envelope) -> Result<Self, ValidationError> {
        if envelope.accepted_at.is_some() {
            return Err(ValidationError::new(
                "envelope.accepted_at",
                "must be empty: set by the broker",
            ));
        }
        if envelope.broker_seq != 0 {
            return Err(ValidationError::new(
                "envelope.broker_seq",
                "must be empty: set by the broker",
            ));
        }
        // (whether a sender may send is the broker's check, against the
        // caller: here only its form)
        if !envelope.sender.is_empty() {
            ParticipantId::parse(&envelope.sender).map_err(|e| e.within("envelope.sender"))?;
        }
        let common = check_common(envelope)?;
        if common.message_id.is_broker_made() {
            return Err(ValidationError::new(
                "envelope.message_id",
                "must not be a UUIDv5: version 5 ids are the broker's own (receipts); \
                 use a fresh UUIDv7",
            ));
        }
        Ok(Self {
            message_id: common.message_id,
            recipient: common.recipient,
            kind: common.kind,
            case_ref: common.case_ref,
            in_reply_to: common.in_reply_to,
            priority: common.priority,
            created_at: common.created_at,
            expires_at: common.expires_at,
            content_type: envelope.content_type.clone(),
            payload_sha256: common.payload_sha256,
        })
    }
}

/// A delivered envelope, validated by the recipient's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredEnvelope {
    /// The message id.
    pub message_id: MessageId,
    /// The sender; `None` only for broker-made receipts.
    pub sender: Option<ParticipantId>,
    /// The recipient (the receiving node itself).
    pub recipient: ParticipantId,
    /// The kind.
    pub kind: Kind,
    /// The case reference.
    pub case_ref: CaseRef,
    /// The message answered, if any.
    pub in_reply_to: Option<MessageId>,
    /// Priority.
    pub priority: Priority,
    /// Sender's creation time.
    pub created_at: SystemTime,
    /// When the broker accepted it.
    pub accepted_at: SystemTime,
}

/// Validates a delivered envelope: well-formed fields, a sender unless the
/// kind is broker-made, `accepted_at` set, digest matching.
pub fn check_delivery(envelope: &pb::Envelope) -> Result<DeliveredEnvelope, ValidationError> {
    let common = check_common(envelope)?;
    let sender = if common.kind.is_broker_made() {
        if !envelope.sender.is_empty() {
            return Err(ValidationError::new(
                "envelope.sender",
                "must be empty on broker-made receipts",
            ));
        }
        None
    } else {
        Some(ParticipantId::parse(&envelope.sender).map_err(|e| e.within("envelope.sender"))?)
    };
    let accepted_at = envelope
        .accepted_at
        .as_ref()
        .ok_or_else(|| ValidationError::new("envelope.accepted_at", "is required on a delivery"))
        .and_then(|ts| from_timestamp(ts).map_err(|e| e.within("envelope.accepted_at")))?;
    Ok(DeliveredEnvelope {
        message_id: common.message_id,
        sender,
        recipient: common.recipient,
        kind: common.kind,
        case_ref: common.case_ref,
        in_reply_to: common.in_reply_to,
        priority: common.priority,
        created_at: common.created_at,
        accepted_at,
    })
}

/// SHA-256 of `payload`.
pub fn sha256(payload: &[u8]) -> [u8; DIGEST_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(digest.as_ref());
    out
}

struct Common {
    message_id: MessageId,
    recipient: ParticipantId,
    kind: Kind,
    case_ref: CaseRef,
    in_reply_to: Option<MessageId>,
    priority: Priority,
    created_at: SystemTime,
    expires_at: Option<SystemTime>,
    payload_sha256: [u8; DIGEST_LEN],
}

fn check_common(envelope: &pb::Envelope) -> Result<Common, ValidationError> {
    let message_id = required(&envelope.message_id, "envelope.message_id")
        .and_then(|v| MessageId::parse(v).map_err(|e| e.within("envelope.message_id")))?;
    let recipient = required(&envelope.recipient, "envelope.recipient")
        .and_then(|v| ParticipantId::parse(v).map_err(|e| e.within("envelope.recipient")))?;
    let kind = Kind::from_pb(envelope.kind).ok_or_else(|| {
        ValidationError::new(
            "envelope.kind",
            "must be a known MessageKind, not UNSPECIFIED",
        )
    })?;
    let case_ref = required(&envelope.case_ref, "envelope.case_ref")
        .and_then(|v| CaseRef::parse(v).map_err(|e| e.within("envelope.case_ref")))?;
    let in_reply_to = if envelope.in_reply_to.is_empty() {
        None
    } else {
        Some(
            MessageId::parse(&envelope.in_reply_to)
                .map_err(|e| e.within("envelope.in_reply_to"))?,
        )
    };
    if in_reply_to == Some(message_id) {
        return Err(ValidationError::new(
            "envelope.in_reply_to",
            "must not be the message's own id",
        ));
    }
    let priority = Priority::from_pb(envelope.priority)?;
    let created_at = envelope
        .created_at
        .as_ref()
        .ok_or_else(|| ValidationError::new("envelope.created_at", "is required"))
        .and_then(|ts| from_timestamp(ts).map_err(|e| e.within("envelope.created_at")))?;
    let expires_at = envelope
        .expires_at
        .as_ref()
        .map(|ts| from_timestamp(ts).map_err(|e| e.within("envelope.expires_at")))
        .transpose()?;
    if expires_at.is_some_and(|at| at <= created_at) {
        return Err(ValidationError::new(
            "envelope.expires_at",
            "must be after created_at",
        ));
    }
    let content_type = required(&envelope.content_type, "envelope.content_type")?;
    if content_type.len() > MAX_CONTENT_TYPE_LEN {
        return Err(ValidationError::new(
            "envelope.content_type",
            "must be at most 256 bytes",
        ));
    }
    check_content_type(kind, content_type)?;
    let payload_sha256: [u8; DIGEST_LEN] =
        envelope.payload_sha256.as_slice().try_into().map_err(|_| {
            ValidationError::new("envelope.payload_sha256", "must be 32 raw bytes (SHA-256)")
        })?;
    if sha256(&envelope.payload) != payload_sha256 {
        return Err(ValidationError::new(
            "envelope.payload_sha256",
            "does not match the SHA-256 of payload",
        ));
    }
    Ok(Common {
        message_id,
        recipient,
        kind,
        case_ref,
        in_reply_to,
        priority,
        created_at,
        expires_at,
        payload_sha256,
    })
}

/// The content type must name the kind's body message: either exactly
/// [`Kind::content_type`] or a JSON variant
/// `application/json; proto=trmx.v1.Referral`.
fn check_content_type(kind: Kind, content_type: &str) -> Result<(), ValidationError> {
    let mut parts = content_type.split(';').map(str::trim);
    let media = parts.next().unwrap_or_default();
    let proto = parts.find_map(|p| p.strip_prefix("proto="));
    let media_ok = media == "application/x-protobuf" || media == "application/json";
    if !media_ok {
        return Err(ValidationError::new(
            "envelope.content_type",
            "must be application/x-protobuf or application/json with a proto= parameter",
        ));
    }
    if proto != Some(kind.body_message()) {
        return Err(ValidationError::new(
            "envelope.content_type",
            "proto= parameter does not match envelope.kind",
        ));
    }
    Ok(())
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, ValidationError> {
    if value.is_empty() {
        Err(ValidationError::new(field, "is required"))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::to_timestamp;

    fn valid() -> pb::Envelope {
        let payload = b"opaque".to_vec();
        pb::Envelope {
            message_id: MessageId::new_v7().to_string(),
            recipient: "BE-PAYOKE".into(),
            kind: pb::MessageKind::Referral as i32,
            case_ref: CaseRef::new_random().to_string(),
            priority: pb::Priority::Urgent as i32,
            created_at: Some(to_timestamp(SystemTime::now())),
            payload_sha256: sha256(&payload).to_vec(),
            payload,
            content_type: Kind::Referral.content_type(),
            ..Default::default()
        }
    }

    fn field_of(envelope: &pb::Envelope) -> String {
        SubmitEnvelope::check(envelope)
            .expect_err("must be refused")
            .field
    }

    #[test]
    fn a_valid_envelope_passes() {
        let env = valid();
        let checked = SubmitEnvelope::check(&env).unwrap();
        assert_eq!(checked.kind, Kind::Referral);
        assert_eq!(checked.priority, Priority::Urgent);
    }

    type Mutation = Box<dyn Fn(&mut pb::Envelope)>;

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(&str, Mutation)> = vec![
            ("envelope.message_id", Box::new(|e| e.message_id.clear())),
            (
                "envelope.message_id",
                Box::new(|e| e.message_id = e.message_id.to_uppercase()),
            ),
            // the broker's receipt id space: a message there could share its id with
            // a receipt of the same recipient
            (
                "envelope.message_id",
                Box::new(|e| {
                    e.message_id =
                        MessageId::receipt_id(MessageId::new_v7(), "DELIVERED").to_string()
                }),
            ),
            (
                "envelope.recipient",
                Box::new(|e| e.recipient = "be-payoke".into()),
            ),
            ("envelope.kind", Box::new(|e| e.kind = 0)),
            ("envelope.kind", Box::new(|e| e.kind = 42)),
            (
                "envelope.case_ref",
                Box::new(|e| e.case_ref = "case 1".into()),
            ),
            (
                "envelope.in_reply_to",
                Box::new(|e| e.in_reply_to = "x".into()),
            ),
            ("envelope.priority", Box::new(|e| e.priority = 9)),
            ("envelope.created_at", Box::new(|e| e.created_at = None)),
            (
                "envelope.created_at",
                Box::new(|e| {
                    e.created_at = Some(pb::Timestamp {
                        seconds: -5,
                        nanos: 0,
                    })
                }),
            ),
            (
                "envelope.expires_at",
                Box::new(|e| {
                    e.expires_at = Some(pb::Timestamp {
                        seconds: 1_000_000_000,
                        nanos: 0,
                    })
                }),
            ),
            (
                "envelope.content_type",
                Box::new(|e| e.content_type = Kind::FollowUp.content_type()),
            ),
            (
                "envelope.content_type",
                Box::new(|e| e.content_type = "text/plain".into()),
            ),
            (
                "envelope.payload_sha256",
                Box::new(|e| e.payload_sha256 = vec![0; 31]),
            ),
            ("envelope.payload_sha256", Box::new(|e| e.payload.push(1))),
            (
                "envelope.accepted_at",
                Box::new(|e| e.accepted_at = Some(to_timestamp(SystemTime::now()))),
            ),
            ("envelope.broker_seq", Box::new(|e| e.broker_seq = 7)),
            ("envelope.sender", Box::new(|e| e.sender = "nobody".into())),
        ];
        for (field, mutate) in cases {
            let mut env = valid();
            mutate(&mut env);
            assert_eq!(field_of(&env), field);
            // a node rejects a delivery with this path: the broker must take it
            assert!(crate::schema::is_field_path(field), "{field}");
        }
    }

    #[test]
    fn errors_never_echo_values() {
        let mut env = valid();
        env.case_ref = "Jane Doe born 1990".into();
        let err = SubmitEnvelope::check(&env).unwrap_err().to_string();
        assert!(!err.contains("Jane"), "{err}");
    }

    #[test]
    fn deliveries_need_sender_and_acceptance_time() {
        let mut env = valid();
        assert_eq!(check_delivery(&env).unwrap_err().field, "envelope.sender");
        env.sender = "NL-NRM".into();
        assert_eq!(
            check_delivery(&env).unwrap_err().field,
            "envelope.accepted_at"
        );
        env.accepted_at = Some(to_timestamp(SystemTime::now()));
        assert!(check_delivery(&env).is_ok());
    }
}
