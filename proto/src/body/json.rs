//! proto3 JSON → message, with errors that name the field path and never a
//! value.
//!
//! The pbjson-generated serde impls do the mapping; `serde_path_to_error`
//! tracks where a failure happened. serde's own message is only inspected to
//! pick the rule: it may quote the offending value, so it is never returned.

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use crate::ValidationError;

/// Longest JSON key reported in an error path; longer or odd keys end the
/// path at their parent object.
const MAX_REPORTED_KEY: usize = 64;

/// Parses `json` as `T`; errors are rooted at `root` (e.g. `referral`).
pub(super) fn parse<T: DeserializeOwned>(root: &str, json: &str) -> Result<T, ValidationError> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let rule = rule(e.inner());
        let mut field = path(root, e.path(), rule == UNKNOWN_FIELD);
        if rule == "duplicate field"
            && let Some(name) = duplicate_name(e.inner())
        {
            field.push('.');
            field.push_str(&name);
        }
        ValidationError::new(field, rule)
    })?;
    deserializer
        .end()
        .map_err(|_| ValidationError::new(root, "must be one JSON object with nothing after it"))?;
    Ok(value)
}

/// The rule of a key that the message at its place does not have.
const UNKNOWN_FIELD: &str = "unknown field";

/// `root.snake_case.path[3].of_the_field`.
///
/// With `unknown_key`, the path's last key is one the schema does not have: it is
/// left out, and the path ends at the object that holds it (`referral.person`). Such
/// a key is whatever the sender's software wrote there, a value put where a key goes
/// (`{"bello": true}`) as much as a misspelt field, and the path travels beyond the
/// node that refuses the body: into its log, the `Reject` that becomes the sender's
/// non-delivery report, and the broker operator's dead letters. A key that is not a
/// plausible field name likewise ends the path at its object, so the path stays a
/// valid dotted field path that the broker accepts in a `Reject`.
fn path(root: &str, path: &serde_path_to_error::Path, unknown_key: bool) -> String {
    let mut segments: Vec<&Segment> = path.iter().collect();
    if unknown_key && matches!(segments.last(), Some(Segment::Map { .. })) {
        segments.pop();
    }
    let mut out = root.to_owned();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => match field_name(key) {
                Some(name) => {
                    out.push('.');
                    out.push_str(&name);
                }
                None => break,
            },
            Segment::Enum { .. } | Segment::Unknown => break,
        }
    }
    out
}

/// A JSON key as its proto field name (`ageBand` → `age_band`); `None` for a
/// key that is not a plausible field name (it could hold anything).
fn field_name(key: &str) -> Option<String> {
    let plausible = !key.is_empty()
        && key.len() <= MAX_REPORTED_KEY
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !plausible {
        return None;
    }
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The field named by serde's "duplicate field `name`" (a schema name from
/// the generated code, never a value).
fn duplicate_name(error: &serde_json::Error) -> Option<String> {
    let message = error.to_string();
    let name = message
        .strip_prefix("duplicate field `")?
        .split('`')
        .next()?;
    field_name(name)
}

/// Timestamp fields of the bodies, by JSON name. pbjson writes instants with a
/// `+00:00` offset; canonical proto3 JSON writes them `Z`-normalized.
const TIMESTAMP_FIELDS: [&str; 3] = ["givenAt", "at", "lastDeliveredAt"];

/// Rewrites the `+00:00` offset of every timestamp field to `Z`. Only
/// structural keys match `"name": "` (inside a JSON string a quote is always
/// escaped), so free text is never touched.
pub(super) fn z_normalize(json: String) -> String {
    let mut out = json;
    for key in TIMESTAMP_FIELDS {
        let pattern = format!("\"{key}\": \"");
        let mut from = 0;
        while let Some(found) = out[from..].find(&pattern) {
            let start = from + found + pattern.len();
            let Some(len) = out[start..].find('"') else {
                break;
            };
            let end = start + len;
            if out[start..end].ends_with("+00:00") {
                out.replace_range(end - 6..end, "Z");
                from = end - 5;
            } else {
                from = end;
            }
        }
    }
    out
}

/// The rule broken, from the kind of serde error (its text is not returned).
fn rule(error: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax => "is not valid JSON",
        Category::Eof => "is not valid JSON (the document ends early)",
        Category::Io => "could not be read",
        Category::Data => {
            let message = error.to_string();
            if message.starts_with("unknown field") {
                UNKNOWN_FIELD
            } else if message.starts_with("duplicate field") {
                "duplicate field"
            } else if message.starts_with("unknown variant") {
                "unknown enum value"
            } else if message.starts_with("invalid type") {
                "wrong type"
            } else {
                "wrong type or invalid value"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_proto_field_names() {
        assert_eq!(field_name("ageBand").as_deref(), Some("age_band"));
        assert_eq!(field_name("age_band").as_deref(), Some("age_band"));
        assert_eq!(field_name("sha256").as_deref(), Some("sha256"));
        assert_eq!(field_name("Jane Doe"), None);
        assert_eq!(field_name(&"a".repeat(65)), None);
    }

    /// A wrong value under a known key is reported with that key as its proto
    /// field name: for every field, its JSON name (protoc's lowerCamelCase) must
    /// come back as a name of the schema, or the broker would refuse the path.
    #[test]
    fn every_json_name_becomes_a_schema_name() {
        for name in crate::schema::names() {
            let mut json_name = String::new();
            let mut upper = false;
            for c in name.chars() {
                if c == '_' {
                    upper = true;
                } else if upper {
                    json_name.push(c.to_ascii_uppercase());
                    upper = false;
                } else {
                    json_name.push(c);
                }
            }
            for key in [name, json_name.as_str()] {
                let back = field_name(key);
                assert!(
                    back.as_deref().is_some_and(crate::schema::is_field_name),
                    "{key} -> {back:?}"
                );
            }
        }
    }

    #[test]
    fn timestamps_are_z_normalized_and_text_is_left_alone() {
        let json = "{\n  \"givenAt\": \"2026-01-13T10:30:00.250+00:00\",\n  \"text\": \"\\\"at\\\": \\\"2026-01-13T10:30:00+00:00\"\n}".to_owned();
        let out = z_normalize(json);
        assert!(
            out.contains("\"givenAt\": \"2026-01-13T10:30:00.250Z\""),
            "{out}"
        );
        assert!(out.contains("2026-01-13T10:30:00+00:00\"\n"), "{out}");
    }
}
