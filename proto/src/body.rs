//! Message bodies: validation of the DOMAIN.md rules and the proto3 JSON mapping.
//!
//! A [`Body`] is one decoded payload: a `Referral`, `ReferralResponse`,
//! `ReturnRiskAssessmentRequest`, `ReturnRiskAssessment`, `FollowUp` or a
//! broker-made `Receipt`. It comes from protobuf bytes ([`Body::decode`]) or
//! from a proto3 JSON document ([`Body::from_json`]) and goes back to either
//! ([`Body::encode`], [`Body::to_json`]).
//!
//! [`Body::validate`] checks the rules of DOMAIN.md that the protobuf schema
//! cannot express (required fields, consent, child protection, dates in
//! order, code formats, sizes). Every error is a [`ValidationError`] whose
//! `field` is a path of snake_case proto field names rooted at the body name,
//! e.g. `referral.person.age_band` or `return_risk_assessment.findings[2].level`,
//! and whose `rule` says what is wrong. No error ever contains a value: body
//! values are personal data.
//!
//! Submodules: `check` (field-level helpers), `common` (the shared pieces of
//! `common.proto`), `referral`, `return_risk`, `follow_up`, `receipt` (one per
//! body), `json` (serde error → field path).

mod check;
mod common;
mod follow_up;
mod json;
mod receipt;
mod referral;
mod return_risk;

use prost::Message;

use crate::time::Date;
use crate::{Kind, MessageId, ValidationError, pb};

pub use check::{
    MAX_ATTACHMENT_BYTES, MAX_ATTACHMENTS, MAX_ATTACHMENTS_TOTAL_BYTES, MAX_NOTES_CHARS,
    MAX_PSEUDONYM_CHARS,
};

/// One decoded message body. The variant determines the message kind (see
/// [`Body::kind`]).
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "bodies are built once per message and moved rarely; boxing would only complicate construction"
)]
pub enum Body {
    /// `MESSAGE_KIND_REFERRAL`.
    Referral(pb::Referral),
    /// `MESSAGE_KIND_REFERRAL_RESPONSE`.
    ReferralResponse(pb::ReferralResponse),
    /// `MESSAGE_KIND_RETURN_RISK_ASSESSMENT_REQUEST`.
    ReturnRiskAssessmentRequest(pb::ReturnRiskAssessmentRequest),
    /// `MESSAGE_KIND_RETURN_RISK_ASSESSMENT`.
    ReturnRiskAssessment(pb::ReturnRiskAssessment),
    /// `MESSAGE_KIND_FOLLOW_UP`.
    FollowUp(pb::FollowUp),
    /// `MESSAGE_KIND_DELIVERY_RECEIPT` (outcome delivered) or
    /// `MESSAGE_KIND_NON_DELIVERY_REPORT` (any other outcome).
    Receipt(pb::Receipt),
}

/// What [`Body::validate`] needs to know besides the body itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyContext {
    /// The envelope's `in_reply_to` (required on answers).
    pub in_reply_to: Option<MessageId>,
    /// Today's date (UTC): dates that record the past (identification,
    /// consent, assessment, report) must not be after it.
    pub today: Date,
}

impl Body {
    /// The message kind of this body. A receipt with outcome delivered is a
    /// [`Kind::DeliveryReceipt`], any other receipt a
    /// [`Kind::NonDeliveryReport`].
    pub fn kind(&self) -> Kind {
        match self {
            Body::Referral(_) => Kind::Referral,
            Body::ReferralResponse(_) => Kind::ReferralResponse,
            Body::ReturnRiskAssessmentRequest(_) => Kind::ReturnRiskAssessmentRequest,
            Body::ReturnRiskAssessment(_) => Kind::ReturnRiskAssessment,
            Body::FollowUp(_) => Kind::FollowUp,
            Body::Receipt(receipt) if receipt.outcome == pb::Outcome::Delivered as i32 => {
                Kind::DeliveryReceipt
            }
            Body::Receipt(_) => Kind::NonDeliveryReport,
        }
    }

    /// The root of the field paths of a body of `kind`: `referral`,
    /// `referral_response`, `return_risk_assessment_request`,
    /// `return_risk_assessment`, `follow_up` or `receipt`.
    pub fn root(kind: Kind) -> &'static str {
        match kind {
            Kind::Referral => "referral",
            Kind::ReferralResponse => "referral_response",
            Kind::ReturnRiskAssessmentRequest => "return_risk_assessment_request",
            Kind::ReturnRiskAssessment => "return_risk_assessment",
            Kind::FollowUp => "follow_up",
            Kind::DeliveryReceipt | Kind::NonDeliveryReport => "receipt",
        }
    }

    /// Decodes protobuf bytes as the body of `kind`. Malformed bytes are an
    /// error on field `payload`, never a panic. A receipt whose outcome
    /// disagrees with `kind` is an error on `receipt.outcome`. The body is not
    /// validated: call [`Body::validate`].
    pub fn decode(kind: Kind, bytes: &[u8]) -> Result<Body, ValidationError> {
        fn malformed(kind: Kind) -> ValidationError {
            ValidationError::new(
                "payload",
                format!(
                    "is not a valid protobuf encoding of {}",
                    kind.body_message()
                ),
            )
        }
        let body = match kind {
            Kind::Referral => {
                Body::Referral(pb::Referral::decode(bytes).map_err(|_| malformed(kind))?)
            }
            Kind::ReferralResponse => Body::ReferralResponse(
                pb::ReferralResponse::decode(bytes).map_err(|_| malformed(kind))?,
            ),
            Kind::ReturnRiskAssessmentRequest => Body::ReturnRiskAssessmentRequest(
                pb::ReturnRiskAssessmentRequest::decode(bytes).map_err(|_| malformed(kind))?,
            ),
            Kind::ReturnRiskAssessment => Body::ReturnRiskAssessment(
                pb::ReturnRiskAssessment::decode(bytes).map_err(|_| malformed(kind))?,
            ),
            Kind::FollowUp => {
                Body::FollowUp(pb::FollowUp::decode(bytes).map_err(|_| malformed(kind))?)
            }
            Kind::DeliveryReceipt | Kind::NonDeliveryReport => {
                Body::Receipt(pb::Receipt::decode(bytes).map_err(|_| malformed(kind))?)
            }
        };
        body.check_kind(kind)?;
        Ok(body)
    }

    /// The protobuf encoding of the body (the envelope payload).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Body::Referral(m) => m.encode_to_vec(),
            Body::ReferralResponse(m) => m.encode_to_vec(),
            Body::ReturnRiskAssessmentRequest(m) => m.encode_to_vec(),
            Body::ReturnRiskAssessment(m) => m.encode_to_vec(),
            Body::FollowUp(m) => m.encode_to_vec(),
            Body::Receipt(m) => m.encode_to_vec(),
        }
    }

    /// Parses a proto3 JSON document (lowerCamelCase or proto field names,
    /// enums as their names, dates as strings, bytes as base64) as the body
    /// of `kind`. An unknown field, a wrong type or an unknown enum value is an
    /// error naming the field path (e.g. `referral.person.age_band`), never
    /// the value. The body is not validated: call [`Body::validate`].
    pub fn from_json(kind: Kind, json: &str) -> Result<Body, ValidationError> {
        let root = Body::root(kind);
        let body = match kind {
            Kind::Referral => Body::Referral(json::parse(root, json)?),
            Kind::ReferralResponse => Body::ReferralResponse(json::parse(root, json)?),
            Kind::ReturnRiskAssessmentRequest => {
                Body::ReturnRiskAssessmentRequest(json::parse(root, json)?)
            }
            Kind::ReturnRiskAssessment => Body::ReturnRiskAssessment(json::parse(root, json)?),
            Kind::FollowUp => Body::FollowUp(json::parse(root, json)?),
            Kind::DeliveryReceipt | Kind::NonDeliveryReport => {
                Body::Receipt(json::parse(root, json)?)
            }
        };
        body.check_kind(kind)?;
        Ok(body)
    }

    /// The canonical proto3 JSON of the body, pretty-printed: lowerCamelCase
    /// names in field-number order, default values left out. A body that
    /// passed [`Body::validate`] always serializes; one holding an unknown
    /// enum number or a timestamp that cannot be written as RFC 3339
    /// serializes as `{}` (see [`Body::try_to_json`]).
    pub fn to_json(&self) -> String {
        self.try_to_json().unwrap_or_else(|_| "{}".to_owned())
    }

    /// Like [`Body::to_json`], with an error (naming the body) instead of `{}`
    /// when an enum number is unknown or a timestamp is out of range.
    pub fn try_to_json(&self) -> Result<String, ValidationError> {
        let result = match self {
            Body::Referral(m) => serde_json::to_string_pretty(m),
            Body::ReferralResponse(m) => serde_json::to_string_pretty(m),
            Body::ReturnRiskAssessmentRequest(m) => serde_json::to_string_pretty(m),
            Body::ReturnRiskAssessment(m) => serde_json::to_string_pretty(m),
            Body::FollowUp(m) => serde_json::to_string_pretty(m),
            Body::Receipt(m) => serde_json::to_string_pretty(m),
        };
        result.map(json::z_normalize).map_err(|_| {
            ValidationError::new(
                Body::root(self.kind()),
                "cannot be written as JSON (an unknown enum value or a timestamp out of range)",
            )
        })
    }

    /// Checks the rules of DOMAIN.md. The first broken rule is returned,
    /// naming the field path and the rule, never the value.
    pub fn validate(&self, ctx: &BodyContext) -> Result<(), ValidationError> {
        match self {
            Body::Referral(m) => referral::referral(m, ctx),
            Body::ReferralResponse(m) => referral::response(m, ctx),
            Body::ReturnRiskAssessmentRequest(m) => return_risk::request(m, ctx),
            Body::ReturnRiskAssessment(m) => return_risk::assessment(m, ctx),
            Body::FollowUp(m) => follow_up::follow_up(m, ctx),
            Body::Receipt(m) => receipt::receipt(m),
        }
    }

    /// The date by which the sender needs an answer: `respond_by` of a
    /// referral or a return risk assessment request, if set and valid.
    pub fn respond_by(&self) -> Option<Date> {
        let value = match self {
            Body::Referral(m) => &m.respond_by,
            Body::ReturnRiskAssessmentRequest(m) => &m.respond_by,
            _ => return None,
        };
        Date::parse(value).ok()
    }

    /// For a body about to be sent: its `handling.retain_until` must not have
    /// passed. Such a body would be erased at the next retention run of the
    /// sender's node once it arrives, and of the recipient's soon after it is
    /// stored, perhaps before anyone read it: most likely a typo in the year.
    /// Not part of [`Self::validate`], which a recipient also runs: a message
    /// whose date passes while it waits in a queue is still stored, and erased
    /// by the recipient's retention.
    pub fn check_retention_ahead(&self, today: Date) -> Result<(), ValidationError> {
        match self.retain_until() {
            Some(until) if until < today => Err(ValidationError::new(
                format!("{}.handling.retain_until", Body::root(self.kind())),
                format!(
                    "has passed (today is {today}): the body would be erased by both nodes' \
                     retention, perhaps before it is read; set the date until which the \
                     recipient must keep it"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The date the next follow-up is due (`next_follow_up_due` of a
    /// follow-up), if set and valid.
    pub fn next_follow_up_due(&self) -> Option<Date> {
        match self {
            Body::FollowUp(m) => Date::parse(&m.next_follow_up_due).ok(),
            _ => None,
        }
    }

    /// The date after which the body must be erased
    /// (`handling.retain_until`), for the bodies that carry handling rules
    /// (referrals and return risk assessment requests), if set and valid.
    pub fn retain_until(&self) -> Option<Date> {
        let handling = match self {
            Body::Referral(m) => m.handling.as_ref(),
            Body::ReturnRiskAssessmentRequest(m) => m.handling.as_ref(),
            _ => None,
        }?;
        Date::parse(&handling.retain_until).ok()
    }

    /// A receipt decoded for one receipt kind must not carry the other kind's
    /// outcome.
    fn check_kind(&self, kind: Kind) -> Result<(), ValidationError> {
        if let Body::Receipt(receipt) = self {
            let delivered = receipt.outcome == pb::Outcome::Delivered as i32;
            let mismatch = match kind {
                Kind::DeliveryReceipt => receipt.outcome != 0 && !delivered,
                Kind::NonDeliveryReport => delivered,
                _ => false,
            };
            if mismatch {
                return Err(ValidationError::new(
                    "receipt.outcome",
                    "does not match the message kind (delivered is a delivery receipt, anything else a non-delivery report)",
                ));
            }
        }
        Ok(())
    }
}

impl From<pb::Referral> for Body {
    fn from(value: pb::Referral) -> Self {
        Body::Referral(value)
    }
}

impl From<pb::ReferralResponse> for Body {
    fn from(value: pb::ReferralResponse) -> Self {
        Body::ReferralResponse(value)
    }
}

impl From<pb::ReturnRiskAssessmentRequest> for Body {
    fn from(value: pb::ReturnRiskAssessmentRequest) -> Self {
        Body::ReturnRiskAssessmentRequest(value)
    }
}

impl From<pb::ReturnRiskAssessment> for Body {
    fn from(value: pb::ReturnRiskAssessment) -> Self {
        Body::ReturnRiskAssessment(value)
    }
}

impl From<pb::FollowUp> for Body {
    fn from(value: pb::FollowUp) -> Self {
        Body::FollowUp(value)
    }
}

impl From<pb::Receipt> for Body {
    fn from(value: pb::Receipt) -> Self {
        Body::Receipt(value)
    }
}
