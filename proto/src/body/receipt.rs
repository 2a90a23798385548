//! Checks of the broker-made `Receipt`.

use super::check::{Check, at, enum_required, fail, instant, present};
use crate::{MessageId, pb};

const ROOT: &str = "receipt";

/// A `Receipt`.
pub(super) fn receipt(r: &pb::Receipt) -> Check {
    let id_path = at(ROOT, "message_id");
    if r.message_id.is_empty() {
        return fail(id_path, "is required");
    }
    MessageId::parse(&r.message_id).map_err(|e| e.within(&id_path))?;
    let _: pb::Outcome = enum_required(r.outcome, &at(ROOT, "outcome"))?;
    let at_path = at(ROOT, "at");
    instant(present(&r.at, &at_path)?, &at_path)?;
    if let Some(ts) = &r.last_delivered_at {
        instant(ts, &at(ROOT, "last_delivered_at"))?;
    }
    if r.reason_code.len() > 64
        || !r
            .reason_code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'_' | b':'))
    {
        return fail(at(ROOT, "reason_code"), "must be at most 64 of A-Z 0-9 _ :");
    }
    if r.field_path.len() > 256
        || !r
            .field_path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'[' | b']'))
    {
        return fail(
            at(ROOT, "field_path"),
            "must be at most 256 of a-z A-Z 0-9 _ . [ ]",
        );
    }
    Ok(())
}
