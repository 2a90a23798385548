//! Field-level checks shared by every body. Each takes the field's path and
//! returns a [`ValidationError`] naming that path and the rule, never the
//! value.

use std::time::SystemTime;

use crate::time::{Date, from_timestamp};
use crate::{ValidationError, pb};

/// Longest `PersonProfile.pseudonym`, in characters.
pub const MAX_PSEUDONYM_CHARS: usize = 64;
/// Longest free text (`LocalizedText.text`), in characters.
pub const MAX_NOTES_CHARS: usize = 4000;
/// Most attachments on one message.
pub const MAX_ATTACHMENTS: usize = 5;
/// Largest attachment content, in bytes (1 MiB).
pub const MAX_ATTACHMENT_BYTES: usize = 1024 * 1024;
/// Largest total attachment content of one message, in bytes (2 MiB).
pub const MAX_ATTACHMENTS_TOTAL_BYTES: usize = 2 * 1024 * 1024;

/// Longest name-like text (names, organisations, providers), in characters.
pub(super) const MAX_NAME_CHARS: usize = 200;
/// Most entries of a repeated enum field.
pub(super) const MAX_ENUM_LIST: usize = 64;
/// Most country codes in one list.
pub(super) const MAX_COUNTRIES: usize = 10;
/// Most language codes in one list.
pub(super) const MAX_LANGUAGES: usize = 20;

/// Result of a check.
pub(super) type Check<T = ()> = Result<T, ValidationError>;

/// An error for `path`.
pub(super) fn fail<T>(path: impl Into<String>, rule: impl Into<String>) -> Check<T> {
    Err(ValidationError::new(path, rule))
}

/// `path.field`.
pub(super) fn at(path: &str, field: &str) -> String {
    format!("{path}.{field}")
}

/// `path[index]`.
pub(super) fn nth(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

/// A required sub-message.
pub(super) fn present<'a, M>(value: &'a Option<M>, path: &str) -> Check<&'a M> {
    value
        .as_ref()
        .ok_or_else(|| ValidationError::new(path, "is required"))
}

/// A required enum: known and not `UNSPECIFIED`.
pub(super) fn enum_required<E: TryFrom<i32>>(value: i32, path: &str) -> Check<E> {
    if value == 0 {
        return fail(path, "is required (must not be UNSPECIFIED)");
    }
    E::try_from(value).or_else(|_| fail(path, "must be a known enum value"))
}

/// An optional enum: `None` for `UNSPECIFIED`, an error for an unknown number.
pub(super) fn enum_optional<E: TryFrom<i32>>(value: i32, path: &str) -> Check<Option<E>> {
    if value == 0 {
        return Ok(None);
    }
    enum_required(value, path).map(Some)
}

/// A repeated enum used as a set: at least `min` entries, at most
/// [`MAX_ENUM_LIST`], each known and not `UNSPECIFIED`, no repeats.
pub(super) fn enum_set<E: TryFrom<i32>>(values: &[i32], path: &str, min: usize) -> Check<Vec<E>> {
    count(values.len(), path, min, MAX_ENUM_LIST)?;
    let mut out = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        out.push(enum_required(*value, &nth(path, i))?);
        if values[..i].contains(value) {
            return fail(nth(path, i), "must not repeat a value");
        }
    }
    Ok(out)
}

/// A repeated field's size: between `min` and `max` entries.
pub(super) fn count(len: usize, path: &str, min: usize, max: usize) -> Check {
    if len < min {
        return fail(
            path,
            if min == 1 {
                "must have at least one entry".to_owned()
            } else {
                format!("must have at least {min} entries")
            },
        );
    }
    if len > max {
        return fail(path, format!("must have at most {max} entries"));
    }
    Ok(())
}

/// A required calendar date `YYYY-MM-DD`.
pub(super) fn date_required(value: &str, path: &str) -> Check<Date> {
    if value.is_empty() {
        return fail(path, "is required");
    }
    Date::parse(value).map_err(|e| e.within(path))
}

/// An optional calendar date `YYYY-MM-DD` (empty means unset).
pub(super) fn date_optional(value: &str, path: &str) -> Check<Option<Date>> {
    if value.is_empty() {
        return Ok(None);
    }
    Date::parse(value).map(Some).map_err(|e| e.within(path))
}

/// A date that records the past: not after `today`.
pub(super) fn not_future(date: Date, today: Date, path: &str) -> Check {
    if date > today {
        return fail(path, "must not be in the future");
    }
    Ok(())
}

/// `later` is not before `earlier` (both optional); `what` names `earlier`.
pub(super) fn not_before(
    later: Option<Date>,
    earlier: Option<Date>,
    path: &str,
    what: &str,
) -> Check {
    if let (Some(later), Some(earlier)) = (later, earlier)
        && later < earlier
    {
        return fail(path, format!("must not be before {what}"));
    }
    Ok(())
}

/// A valid instant (2000-01-01 ..= 9999-12-31, nanos in range).
pub(super) fn instant(ts: &pb::Timestamp, path: &str) -> Check<SystemTime> {
    from_timestamp(ts).map_err(|e| e.within(path))
}

/// Text: at most `max_chars` characters, no control characters (line breaks
/// and tabs allowed when `multiline`), and, when `required`, not blank.
pub(super) fn text(
    value: &str,
    path: &str,
    max_chars: usize,
    required: bool,
    multiline: bool,
) -> Check {
    if value.trim().is_empty() {
        if required {
            return fail(path, "is required");
        }
        if !value.is_empty() {
            return fail(path, "must not be blank");
        }
        return Ok(());
    }
    if value.chars().count() > max_chars {
        return fail(path, format!("must be at most {max_chars} characters"));
    }
    let allowed = |c: char| multiline && matches!(c, '\n' | '\r' | '\t');
    if value.chars().any(|c| c.is_control() && !allowed(c)) {
        return fail(path, "must not contain control characters");
    }
    Ok(())
}

/// An ISO 3166-1 alpha-2 country code: two upper-case letters.
pub(super) fn country(value: &str, path: &str) -> Check {
    if value.is_empty() {
        return fail(path, "is required");
    }
    if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
        return fail(
            path,
            "must be an ISO 3166-1 alpha-2 country code (two upper-case letters)",
        );
    }
    Ok(())
}

/// A list of country codes: at most [`MAX_COUNTRIES`], no repeats.
pub(super) fn countries(values: &[String], path: &str) -> Check {
    count(values.len(), path, 0, MAX_COUNTRIES)?;
    for (i, value) in values.iter().enumerate() {
        country(value, &nth(path, i))?;
        if values[..i].contains(value) {
            return fail(nth(path, i), "must not repeat a value");
        }
    }
    Ok(())
}

/// An ISO 639-1 language code: two lower-case letters.
pub(super) fn language(value: &str, path: &str) -> Check {
    if value.is_empty() {
        return fail(path, "is required");
    }
    if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_lowercase()) {
        return fail(
            path,
            "must be an ISO 639-1 language code (two lower-case letters)",
        );
    }
    Ok(())
}

/// A list of language codes: at most [`MAX_LANGUAGES`], no repeats.
pub(super) fn languages(values: &[String], path: &str) -> Check {
    count(values.len(), path, 0, MAX_LANGUAGES)?;
    for (i, value) in values.iter().enumerate() {
        language(value, &nth(path, i))?;
        if values[..i].contains(value) {
            return fail(nth(path, i), "must not repeat a value");
        }
    }
    Ok(())
}

/// A participant ID like `BE-PAYOKE`.
pub(super) fn participant(value: &str, path: &str) -> Check {
    if value.is_empty() {
        return fail(path, "is required");
    }
    if !crate::ids::is_valid_participant_id(value) {
        return fail(
            path,
            "must be a participant ID like NL-NRM (country code or INT, '-', 2-24 of A-Z 0-9)",
        );
    }
    Ok(())
}
