//! The proto3 JSON mapping: errors name the field path, never the value.

use trmx_proto::Kind;
use trmx_proto::ValidationError;
use trmx_proto::body::Body;

use super::{EXAMPLES, assert_reportable};

/// The referral example with `edit` applied to its JSON value.
fn referral_json(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut value: serde_json::Value =
        serde_json::from_str(EXAMPLES[0].2).expect("example is JSON");
    edit(&mut value);
    serde_json::to_string(&value).expect("JSON value serializes")
}

fn refused(json: &str) -> ValidationError {
    let err = Body::from_json(Kind::Referral, json).expect_err("must be refused");
    assert_reportable(&err);
    err
}

/// An unknown key is never repeated, however much it looks like a field name: it
/// could be a value put where a key goes (`"bello": true`), and the path travels to
/// the sender, the broker's operator and the recipient's log. The path ends at the
/// object holding it (still a valid dotted path for a Reject).
#[test]
fn unknown_fields_are_refused_at_their_object_without_their_name() {
    let json = referral_json(|v| {
        v["person"]["favouriteColour"] = "blue".into();
    });
    let err = refused(&json);
    assert_eq!(err.field, "referral.person");
    assert_eq!(err.rule, "unknown field");

    let json = referral_json(|v| v["surprise"] = 1.into());
    assert_eq!(refused(&json).field, "referral");

    let json = referral_json(|v| v["person"]["bello"] = true.into());
    let err = refused(&json);
    assert_eq!(err.field, "referral.person");
    assert!(!format!("{err:?}").contains("bello"), "{err:?}");

    // deeper
    let json = referral_json(|v| v["consent"]["secretname"] = 1.into());
    assert_eq!(refused(&json).field, "referral.consent");

    let json = referral_json(|v| v["person"]["Jane Doe SECRET"] = 1.into());
    let err = refused(&json);
    assert_eq!(err.field, "referral.person");
    assert_eq!(err.rule, "unknown field");
    assert!(!format!("{err:?}").contains("SECRET"));
}

#[test]
fn wrong_types_are_named_without_the_value() {
    let json = referral_json(|v| v["person"]["pseudonym"] = 8_675_309.into());
    let err = refused(&json);
    assert_eq!(err.field, "referral.person.pseudonym");
    assert_eq!(err.rule, "wrong type");
    assert!(!err.to_string().contains("8675309"), "{err}");

    let json = referral_json(|v| v["person"]["interpreterNeeded"] = "SECRET yes".into());
    let err = refused(&json);
    assert_eq!(err.field, "referral.person.interpreter_needed");
    assert!(!format!("{err:?}").contains("SECRET"));

    let json = referral_json(|v| v["person"]["nationalities"] = "NG".into());
    assert_eq!(refused(&json).field, "referral.person.nationalities");

    let json = referral_json(|v| v["consent"]["givenAt"] = "SECRET o'clock".into());
    let err = refused(&json);
    assert_eq!(err.field, "referral.consent.given_at");
    assert!(!format!("{err:?}").contains("SECRET"));
}

#[test]
fn unknown_enum_values_are_named_without_the_value() {
    let json = referral_json(|v| v["person"]["ageBand"] = "AGE_BAND_SECRET".into());
    let err = refused(&json);
    assert_eq!(err.field, "referral.person.age_band");
    assert_eq!(err.rule, "unknown enum value");
    assert!(!format!("{err:?}").contains("SECRET"));

    let json = referral_json(|v| {
        v["consent"]["purposes"][1] = "CONSENT_PURPOSE_SECRET".into();
    });
    let err = refused(&json);
    assert_eq!(err.field, "referral.consent.purposes[1]");
    assert!(!format!("{err:?}").contains("SECRET"));
}

#[test]
fn proto_field_names_and_numbers_are_accepted_too() {
    let json = referral_json(|v| {
        let band = v["person"]["ageBand"].take();
        v["person"].as_object_mut().unwrap().remove("ageBand");
        v["person"]["age_band"] = band;
        v["safetyRisk"] = 2.into();
    });
    let body = Body::from_json(Kind::Referral, &json).unwrap();
    assert_eq!(
        body,
        Body::from_json(Kind::Referral, EXAMPLES[0].2).unwrap()
    );
}

#[test]
fn malformed_documents_are_refused_at_the_root() {
    for bad in [
        "",
        "{",
        "[]",
        "null",
        "{} {}",
        "{\"purpose\": }",
        "\"SECRET\"",
    ] {
        let err = refused(bad);
        assert!(err.field.starts_with("referral"), "{bad:?}: {err}");
        assert!(!format!("{err:?}").contains("SECRET"));
    }
    let err = refused(&referral_json(|v| {
        v["attachments"] = serde_json::json!([{"content": "%%%"}])
    }));
    assert_eq!(err.field, "referral.attachments[0].content");
}

#[test]
fn duplicate_fields_are_refused() {
    let err = refused(
        r#"{"purpose": "REFERRAL_PURPOSE_FAMILY_TRACING", "purpose": "REFERRAL_PURPOSE_FAMILY_TRACING"}"#,
    );
    assert_eq!(err.field, "referral.purpose");
}

#[test]
fn default_values_are_left_out_of_the_output() {
    let json = Body::from_json(Kind::ReferralResponse, EXAMPLES[1].2)
        .unwrap()
        .to_json();
    assert!(!json.contains("reason"), "{json}");
    assert!(!json.contains("onwardRecipient"), "{json}");
    assert_eq!(
        Body::from_json(Kind::FollowUp, "{}").unwrap().to_json(),
        "{}"
    );
}
