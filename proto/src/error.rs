//! Validation errors: a field path and the rule broken, never the value.

/// A value that breaks a rule of the wire contract or of DOMAIN.md.
///
/// `Display` shows `field: rule`. It never contains the offending value,
/// because body values are personal data and errors end up in logs and in
/// non-delivery reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct ValidationError {
    /// Dotted path of the offending field, e.g. `referral.person.age_band`.
    pub field: String,
    /// The rule broken, e.g. `is required`, `must be a lower-case UUID`.
    pub rule: String,
}

impl ValidationError {
    /// A new error for `field` breaking `rule`.
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// The same error with `prefix.` put before the field path.
    #[must_use]
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}
