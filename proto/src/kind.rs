//! Message kinds and their content types.

use crate::pb;

/// What a message is (the domain view of [`pb::MessageKind`], without
/// `UNSPECIFIED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `Referral` body.
    Referral,
    /// `ReferralResponse` body.
    ReferralResponse,
    /// `ReturnRiskAssessmentRequest` body.
    ReturnRiskAssessmentRequest,
    /// `ReturnRiskAssessment` body.
    ReturnRiskAssessment,
    /// `FollowUp` body.
    FollowUp,
    /// Broker-made `Receipt`, outcome delivered.
    DeliveryReceipt,
    /// Broker-made `Receipt`, any other outcome.
    NonDeliveryReport,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 7] = [
        Kind::Referral,
        Kind::ReferralResponse,
        Kind::ReturnRiskAssessmentRequest,
        Kind::ReturnRiskAssessment,
        Kind::FollowUp,
        Kind::DeliveryReceipt,
        Kind::NonDeliveryReport,
    ];

    /// The kinds a node may submit.
    pub const APPLICATION: [Kind; 5] = [
        Kind::Referral,
        Kind::ReferralResponse,
        Kind::ReturnRiskAssessmentRequest,
        Kind::ReturnRiskAssessment,
        Kind::FollowUp,
    ];

    /// From the wire enum; `None` for `UNSPECIFIED` or an unknown number.
    pub fn from_pb(value: i32) -> Option<Self> {
        Some(match pb::MessageKind::try_from(value).ok()? {
            pb::MessageKind::Unspecified => return None,
            pb::MessageKind::Referral => Kind::Referral,
            pb::MessageKind::ReferralResponse => Kind::ReferralResponse,
            pb::MessageKind::ReturnRiskAssessmentRequest => Kind::ReturnRiskAssessmentRequest,
            pb::MessageKind::ReturnRiskAssessment => Kind::ReturnRiskAssessment,
            pb::MessageKind::FollowUp => Kind::FollowUp,
            pb::MessageKind::DeliveryReceipt => Kind::DeliveryReceipt,
            pb::MessageKind::NonDeliveryReport => Kind::NonDeliveryReport,
        })
    }

    /// The wire enum.
    pub fn to_pb(self) -> pb::MessageKind {
        match self {
            Kind::Referral => pb::MessageKind::Referral,
            Kind::ReferralResponse => pb::MessageKind::ReferralResponse,
            Kind::ReturnRiskAssessmentRequest => pb::MessageKind::ReturnRiskAssessmentRequest,
            Kind::ReturnRiskAssessment => pb::MessageKind::ReturnRiskAssessment,
            Kind::FollowUp => pb::MessageKind::FollowUp,
            Kind::DeliveryReceipt => pb::MessageKind::DeliveryReceipt,
            Kind::NonDeliveryReport => pb::MessageKind::NonDeliveryReport,
        }
    }

    /// Whether only the broker makes this kind.
    pub fn is_broker_made(self) -> bool {
        matches!(self, Kind::DeliveryReceipt | Kind::NonDeliveryReport)
    }

    /// Whether a message of this kind answers another (`in_reply_to` required).
    pub fn is_answer(self) -> bool {
        self.answers().is_some()
    }

    /// The kind of request a message of this kind answers (DOMAIN.md): a referral
    /// response a referral, a return-risk assessment its request. Other messages may
    /// name a message in `in_reply_to` too (a follow-up), but answer no request.
    pub fn answers(self) -> Option<Kind> {
        match self {
            Kind::ReferralResponse => Some(Kind::Referral),
            Kind::ReturnRiskAssessment => Some(Kind::ReturnRiskAssessmentRequest),
            _ => None,
        }
    }

    /// The protobuf message name of the body, e.g. `trmx.v1.Referral`.
    pub fn body_message(self) -> &'static str {
        match self {
            Kind::Referral => "trmx.v1.Referral",
            Kind::ReferralResponse => "trmx.v1.ReferralResponse",
            Kind::ReturnRiskAssessmentRequest => "trmx.v1.ReturnRiskAssessmentRequest",
            Kind::ReturnRiskAssessment => "trmx.v1.ReturnRiskAssessment",
            Kind::FollowUp => "trmx.v1.FollowUp",
            Kind::DeliveryReceipt | Kind::NonDeliveryReport => "trmx.v1.Receipt",
        }
    }

    /// The envelope `content_type` of a protobuf-encoded body of this kind.
    pub fn content_type(self) -> String {
        format!("application/x-protobuf; proto={}", self.body_message())
    }

    /// Short lower-case name used by CLIs and logs: `referral`,
    /// `referral-response`, `return-risk-assessment-request`,
    /// `return-risk-assessment`, `follow-up`, `delivery-receipt`,
    /// `non-delivery-report`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Referral => "referral",
            Kind::ReferralResponse => "referral-response",
            Kind::ReturnRiskAssessmentRequest => "return-risk-assessment-request",
            Kind::ReturnRiskAssessment => "return-risk-assessment",
            Kind::FollowUp => "follow-up",
            Kind::DeliveryReceipt => "delivery-receipt",
            Kind::NonDeliveryReport => "non-delivery-report",
        }
    }

    /// Parses [`Kind::name`], or the wire name (`MESSAGE_KIND_REFERRAL`).
    pub fn from_name(name: &str) -> Option<Self> {
        Kind::ALL
            .into_iter()
            .find(|kind| kind.name() == name || kind.to_pb().as_str_name() == name)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_pb(kind.to_pb() as i32), Some(kind));
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
            assert_eq!(Kind::from_name(kind.to_pb().as_str_name()), Some(kind));
        }
        assert_eq!(Kind::from_pb(0), None);
        assert_eq!(Kind::from_pb(99), None);
    }
}
