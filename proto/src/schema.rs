//! The names of the `trmx.v1` schema that a field path may be made of.
//!
//! A field path (a [`ValidationError`](crate::ValidationError)'s `field`, a
//! `Reject`'s `field_path`) names where a message is wrong, never what is in it:
//! it travels to the sender's non-delivery report, the broker operator's dead
//! letters and logs, and body values are personal data. Checking only its form
//! (dotted `[A-Za-z0-9_]` segments) lets a value through wherever a segment can
//! hold one: `referral.person.AminaBello`, from a node whose JSON decoder put an
//! unknown key into the path. So every segment must also be a name of the
//! schema: a field name of a `trmx.v1` message, or a message name in
//! snake_case (a path's root: `envelope`, `referral`, `referral_response`,
//! `return_risk_assessment_request`, `return_risk_assessment`, `follow_up`,
//! `receipt`). The names are read from the compiled descriptors by `build.rs`,
//! so a field added to a `.proto` file is a valid segment at once.
//!
//! The names are those of the whole package, not of the message at that place
//! of the path (`referral.person.findings` passes although `PersonProfile` has
//! no `findings`). That closes the leak as well: the names are a fixed set of a
//! few hundred schema words, so no value of a body can travel in a path unless
//! it is itself such a word; and a path true to its form but wrong in its shape
//! is a bug of the rejecting node, which costs nothing but a confusing reason.
//! Walking the message tree would also tie every implementation to one choice
//! of root per kind, which the wire contract does not fix.

include!(concat!(env!("OUT_DIR"), "/trmx_path_names.rs"));

/// Every name, sorted (for tests that go through them all).
#[cfg(test)]
pub(crate) fn names() -> &'static [&'static str] {
    PATH_NAMES
}

/// Whether `name` is a field name of a `trmx.v1` message or a `trmx.v1`
/// message name in snake_case (see the [module docs](self)).
pub fn is_field_name(name: &str) -> bool {
    PATH_NAMES.binary_search(&name).is_ok()
}

/// Whether `path` is a field path: dotted segments, each a name for which
/// [`is_field_name`] holds, followed by any number of `[N]` indexes
/// (`referral.consent.purposes[0]`). The empty path is not one; a length limit
/// is up to the caller.
pub fn is_field_path(path: &str) -> bool {
    path.split('.').all(|segment| {
        let name_len = segment
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let (name, indexes) = segment.split_at(name_len);
        is_field_name(name) && are_indexes(indexes)
    })
}

/// Digits an index may have at most: every list of the schema's bodies is held to
/// at most 64 entries, so a real index is never longer. Unbounded, an index could
/// carry a number of a body (`referral.person[31612345678]`: a phone number) where
/// a name cannot; three digits without a leading zero hold no phone number, and a
/// rejecting node whose path the broker refuses rejects again without it.
const MAX_INDEX_DIGITS: usize = 3;

/// Zero or more `[N]` (N: `0`, or up to [`MAX_INDEX_DIGITS`] decimal digits without
/// a leading zero).
fn are_indexes(mut rest: &str) -> bool {
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('[') else {
            return false;
        };
        let digits = inner.bytes().take_while(u8::is_ascii_digit).count();
        let Some(after) = inner.get(digits..).and_then(|r| r.strip_prefix(']')) else {
            return false;
        };
        if digits == 0 || digits > MAX_INDEX_DIGITS || (digits > 1 && inner.starts_with('0')) {
            return false;
        }
        rest = after;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;
    use crate::body::Body;

    #[test]
    fn names_come_from_the_schema_sorted_and_unique() {
        assert!(PATH_NAMES.windows(2).all(|w| w[0] < w[1]));
        for name in [
            "envelope",
            "payload",
            "payload_sha256",
            "recipient",
            "message_id",
            "consent",
            "basis",
            "person",
            "age_band",
            "purposes",
            "field_path",
        ] {
            assert!(is_field_name(name), "{name}");
        }
        for kind in Kind::ALL {
            assert!(is_field_name(Body::root(kind)), "{kind:?}");
        }
        for name in [
            "",
            "AminaBello",
            "amina_bello",
            "Person",
            "ageBand",
            "referral ",
            "trmx",
        ] {
            assert!(!is_field_name(name), "{name:?}");
        }
    }

    #[test]
    fn paths_are_schema_names_with_indexes() {
        for good in [
            "referral",
            "referral.consent.basis",
            "referral.consent.purposes[0]",
            "return_risk_assessment.findings[2].level",
            "envelope.payload_sha256",
            "payload",
            "follow_up.events[0][1]",
            "follow_up.events[999]",
        ] {
            assert!(is_field_path(good), "{good:?}");
        }
        for bad in [
            "",
            "referral.person.AminaBello",
            "referral.person.amina_bello",
            "AminaBello",
            "referral.",
            ".referral",
            "referral..consent",
            "referral[x]",
            "referral[]",
            "referral[1",
            "referral.consent basis",
            "name=Jane",
            // a number of a body where an index goes
            "referral.person[31612345678]",
            "referral.person[1000]",
            "referral.person[012]",
        ] {
            assert!(!is_field_path(bad), "{bad:?}");
        }
    }
}
