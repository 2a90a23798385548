//! The example documents of the demo story parse, validate, and are canonical.

use trmx_proto::Kind;
use trmx_proto::body::{Body, BodyContext};
use trmx_proto::time::Date;

use super::{EXAMPLES, ctx, example};

#[test]
fn every_example_parses_and_validates() {
    let fixed = BodyContext {
        today: Date::parse("2026-11-29").unwrap(),
        ..ctx()
    };
    for (file, kind, json) in EXAMPLES {
        let body = Body::from_json(kind, json).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(body.kind(), kind, "{file}");
        body.validate(&ctx())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        body.validate(&fixed)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn examples_survive_proto_json_proto() {
    for (file, kind, json) in EXAMPLES {
        let body = Body::from_json(kind, json).unwrap();
        let bytes = body.encode();
        let decoded = Body::decode(kind, &bytes).unwrap();
        assert_eq!(decoded, body, "{file}: protobuf round trip");
        let again = Body::from_json(kind, &decoded.to_json()).unwrap();
        assert_eq!(again, body, "{file}: proto -> JSON -> proto");
        assert_eq!(again.encode(), bytes, "{file}: same bytes");
    }
}

#[test]
fn json_output_is_canonical_and_the_examples_are_written_canonically() {
    let update = std::env::var_os("TRMX_UPDATE_EXAMPLES").is_some();
    for (file, kind, json) in EXAMPLES {
        let canonical = Body::from_json(kind, json).unwrap().to_json();
        let reparsed = Body::from_json(kind, &canonical).unwrap().to_json();
        assert_eq!(reparsed, canonical, "{file}: to_json(from_json(x)) == x");
        if update {
            let path = format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR"));
            std::fs::write(path, format!("{canonical}\n")).unwrap();
        } else {
            assert_eq!(
                json.trim_end(),
                canonical,
                "{file} is not in canonical form (TRMX_UPDATE_EXAMPLES=1 rewrites it)"
            );
        }
    }
}

#[test]
fn json_uses_lower_camel_case_names_and_enum_names() {
    let json = example("01-referral.json").to_json();
    assert!(
        json.contains("\"ageBand\": \"AGE_BAND_FROM_24_TO_26\""),
        "{json}"
    );
    assert!(json.contains("\"retainUntil\": \"2036-12-31\""), "{json}");
    assert!(
        json.contains("\"givenAt\": \"2026-01-13T10:30:00+00:00\"")
            || json.contains("\"givenAt\": \"2026-01-13T10:30:00Z\""),
        "{json}"
    );
    assert!(!json.contains("age_band"), "{json}");
}

#[test]
fn dates_for_the_node_come_from_the_body() {
    let referral = example("01-referral.json");
    assert_eq!(referral.respond_by(), Date::parse("2026-01-21").ok());
    assert_eq!(referral.retain_until(), Date::parse("2036-12-31").ok());
    assert_eq!(referral.next_follow_up_due(), None);

    let request = example("04-return-risk-assessment-request.json");
    assert_eq!(request.respond_by(), Date::parse("2026-07-24").ok());
    assert_eq!(request.retain_until(), Date::parse("2036-12-31").ok());

    let follow_up = example("07-follow-up-3-months.json");
    assert_eq!(
        follow_up.next_follow_up_due(),
        Date::parse("2027-02-10").ok()
    );
    assert_eq!(follow_up.respond_by(), None);
    assert_eq!(follow_up.retain_until(), None);

    assert_eq!(example("02-referral-response.json").respond_by(), None);
}

#[test]
fn receipt_kind_follows_its_outcome() {
    let mut receipt = super::receipt();
    assert_eq!(Body::Receipt(receipt.clone()).kind(), Kind::DeliveryReceipt);
    receipt.outcome = trmx_proto::pb::Outcome::Expired as i32;
    receipt.reason_code = "EXPIRED".into();
    let body = Body::Receipt(receipt);
    assert_eq!(body.kind(), Kind::NonDeliveryReport);
    body.validate(&ctx()).unwrap();
    let bytes = body.encode();
    assert_eq!(
        Body::decode(Kind::NonDeliveryReport, &bytes)
            .unwrap()
            .kind(),
        Kind::NonDeliveryReport
    );
    assert_eq!(
        Body::decode(Kind::DeliveryReceipt, &bytes)
            .unwrap_err()
            .field,
        "receipt.outcome"
    );
    assert_eq!(
        Body::from_json(
            Kind::NonDeliveryReport,
            &example("08-delivery-receipt.json").to_json()
        )
        .unwrap_err()
        .field,
        "receipt.outcome"
    );
}
