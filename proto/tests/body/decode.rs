//! Protobuf decoding never panics on malformed bytes.

use proptest::prelude::*;
use trmx_proto::Kind;
use trmx_proto::body::Body;

use super::{EXAMPLES, assert_reportable, ctx};

#[test]
fn malformed_bytes_are_an_error_on_payload() {
    for kind in Kind::ALL {
        for bytes in [
            &[0xff_u8][..],
            &[0x0a, 0x05, 0x01],
            &[0x08],
            &[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ] {
            let err = Body::decode(kind, bytes).expect_err("malformed");
            assert_eq!(err.field, "payload", "{kind}");
            assert_reportable(&err);
        }
    }
}

#[test]
fn empty_bytes_decode_to_an_empty_body_that_does_not_validate() {
    for kind in Kind::APPLICATION {
        let body = Body::decode(kind, &[]).unwrap();
        assert_eq!(body.kind(), kind);
        assert_reportable(&body.validate(&ctx()).expect_err("empty body"));
    }
}

fn encoded_examples() -> Vec<(Kind, Vec<u8>)> {
    EXAMPLES
        .iter()
        .map(|(_, kind, json)| {
            (
                *kind,
                Body::from_json(*kind, json)
                    .expect("example parses")
                    .encode(),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(kind in 0..Kind::ALL.len(), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let kind = Kind::ALL[kind];
        if let Ok(body) = Body::decode(kind, &bytes) {
            if let Err(e) = body.validate(&ctx()) {
                assert_reportable(&e);
            }
            let _ = body.to_json();
            let _ = (body.respond_by(), body.retain_until(), body.next_follow_up_due());
        }
    }

    #[test]
    fn mutated_examples_never_panic(
        which in 0..EXAMPLES.len(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let (kind, mut bytes) = encoded_examples().swap_remove(which);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let cut = cut.index(bytes.len() + 1);
        for slice in [&bytes[..], &bytes[..cut]] {
            match Body::decode(kind, slice) {
                Err(e) => assert_reportable(&e),
                Ok(body) => {
                // Whatever a node refuses, it reports with a path the broker takes.
                if let Err(e) = body.validate(&ctx()) {
                    assert_reportable(&e);
                }
                let json = body.to_json();
                if body.try_to_json().is_ok() {
                    // Whatever decodes and serializes reads back as the same body.
                    prop_assert_eq!(Body::from_json(kind, &json).ok(), Some(body.clone()));
                }
                }
            }
        }
    }
}

#[test]
fn unknown_enum_numbers_decode_but_do_not_validate_or_serialize() {
    let mut referral = super::referral();
    referral.safety_risk = 77;
    let bytes = Body::Referral(referral).encode();
    let body = Body::decode(Kind::Referral, &bytes).expect("well-formed protobuf");
    let err = body.validate(&ctx()).expect_err("unknown enum value");
    assert_eq!(err.field, "referral.safety_risk");
    assert_reportable(&err);
    assert_eq!(
        body.try_to_json().expect_err("no JSON name").field,
        "referral"
    );
    assert_eq!(body.to_json(), "{}");
}
