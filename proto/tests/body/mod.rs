//! Message bodies: examples, DOMAIN.md rules, JSON mapping, decoding.

mod decode;
mod examples;
mod json;
mod rules;

use std::time::SystemTime;

use trmx_proto::body::{Body, BodyContext};
use trmx_proto::time::Date;
use trmx_proto::{Kind, MessageId, ValidationError, pb};

/// The example documents of `proto/examples/`, with their kinds, in story order.
pub(crate) const EXAMPLES: [(&str, Kind, &str); 8] = [
    (
        "01-referral.json",
        Kind::Referral,
        include_str!("../../examples/01-referral.json"),
    ),
    (
        "02-referral-response.json",
        Kind::ReferralResponse,
        include_str!("../../examples/02-referral-response.json"),
    ),
    (
        "03-follow-up-training.json",
        Kind::FollowUp,
        include_str!("../../examples/03-follow-up-training.json"),
    ),
    (
        "04-return-risk-assessment-request.json",
        Kind::ReturnRiskAssessmentRequest,
        include_str!("../../examples/04-return-risk-assessment-request.json"),
    ),
    (
        "05-return-risk-assessment.json",
        Kind::ReturnRiskAssessment,
        include_str!("../../examples/05-return-risk-assessment.json"),
    ),
    (
        "06-follow-up-arrived.json",
        Kind::FollowUp,
        include_str!("../../examples/06-follow-up-arrived.json"),
    ),
    (
        "07-follow-up-3-months.json",
        Kind::FollowUp,
        include_str!("../../examples/07-follow-up-3-months.json"),
    ),
    (
        "08-delivery-receipt.json",
        Kind::DeliveryReceipt,
        include_str!("../../examples/08-delivery-receipt.json"),
    ),
];

/// `error`'s field path is one the broker takes in a `Reject`: every segment a
/// name of the schema (`trmx_proto::schema`). A node rejects a body with the path
/// of its first error, so each refused body in these tests checks that a path our
/// node can produce is not refused by the broker (which would cost the sender the
/// reason) and that it holds nothing but schema names.
#[track_caller]
pub(crate) fn assert_reportable(error: &ValidationError) {
    assert!(
        trmx_proto::schema::is_field_path(&error.field),
        "not a schema field path: {error}"
    );
}

/// A context for an answer received today.
pub(crate) fn ctx() -> BodyContext {
    BodyContext {
        in_reply_to: Some(MessageId::new_v7()),
        today: Date::of(SystemTime::now()),
    }
}

/// The parsed example `name`.
pub(crate) fn example(name: &str) -> Body {
    let (_, kind, json) = EXAMPLES
        .iter()
        .find(|(file, _, _)| *file == name)
        .expect("known example");
    Body::from_json(*kind, json).expect("example parses")
}

pub(crate) fn referral() -> pb::Referral {
    match example("01-referral.json") {
        Body::Referral(m) => m,
        other => panic!("not a referral: {:?}", other.kind()),
    }
}

pub(crate) fn response() -> pb::ReferralResponse {
    match example("02-referral-response.json") {
        Body::ReferralResponse(m) => m,
        other => panic!("not a referral response: {:?}", other.kind()),
    }
}

pub(crate) fn rra_request() -> pb::ReturnRiskAssessmentRequest {
    match example("04-return-risk-assessment-request.json") {
        Body::ReturnRiskAssessmentRequest(m) => m,
        other => panic!("not a request: {:?}", other.kind()),
    }
}

pub(crate) fn rra() -> pb::ReturnRiskAssessment {
    match example("05-return-risk-assessment.json") {
        Body::ReturnRiskAssessment(m) => m,
        other => panic!("not an assessment: {:?}", other.kind()),
    }
}

pub(crate) fn follow_up() -> pb::FollowUp {
    match example("07-follow-up-3-months.json") {
        Body::FollowUp(m) => m,
        other => panic!("not a follow-up: {:?}", other.kind()),
    }
}

pub(crate) fn receipt() -> pb::Receipt {
    match example("08-delivery-receipt.json") {
        Body::Receipt(m) => m,
        other => panic!("not a receipt: {:?}", other.kind()),
    }
}
