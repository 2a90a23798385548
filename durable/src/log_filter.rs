//! The rule broker and node apply to a log filter an operator gives them: each directive
//! is a level or `target=level`.
//!
//! The `tracing` filter syntax reads a bare word as a target: a mistyped level such as
//! `debgu` is a valid filter, one that shows only a target of that name, and the process
//! then runs and logs nothing at all, its errors included. Nothing is lost by the rule: a
//! bare `target` means `target=trace`, which may be written so.
//!
//! Only this rule is checked here; the caller still parses the filter with
//! `tracing_subscriber::EnvFilter`, which refuses what is no filter at all.

use std::fmt;

/// The level names of a log filter (matched without regard to case).
pub const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A directive of a log filter that is neither a level nor `target=level`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BareTarget {
    /// The directive as written (trimmed).
    pub directive: String,
}

impl fmt::Display for BareTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a level ({}) nor target=level: as written, nothing but a target of \
             that name would be logged",
            self.directive,
            LOG_LEVELS.join(", ")
        )
    }
}

impl std::error::Error for BareTarget {}

/// Refuses the first directive of `filter` (comma-separated, commas inside `[…]` or `{…}`
/// belong to a span filter) that is neither a level nor `target=level`.
pub fn check_log_filter(filter: &str) -> Result<(), BareTarget> {
    // each directive, and whether it has an `=` outside a span filter
    let mut depth = 0_i32;
    let mut directives = vec![(String::new(), false)];
    for c in filter.chars() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                directives.push((String::new(), false));
                continue;
            }
            _ => {}
        }
        if let Some((directive, has_level)) = directives.last_mut() {
            directive.push(c);
            *has_level |= c == '=' && depth == 0;
        }
    }
    for (directive, has_level) in &directives {
        let directive = directive.trim();
        let bare = !directive.is_empty() && !has_level;
        if bare && !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(BareTarget {
                directive: directive.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_word_that_is_no_level_is_refused() {
        for (typo, directive) in [
            ("debgu", "debgu"),
            ("Info,trmx_nod", "trmx_nod"),
            ("warn, debgu", "debgu"),
            ("trmx_broker[span{a=1,b=2}]", "trmx_broker[span{a=1,b=2}]"),
        ] {
            let error = check_log_filter(typo).expect_err(typo);
            assert_eq!(error.directive, directive);
            assert!(error.to_string().contains("is not a level"), "{error}");
        }
        for fine in [
            "debug",
            "WARN",
            "info,trmx_node=debug",
            "warn,trmx_node::core=trace,h2=off",
            "info,trmx_node[send]=debug",
            "info,trmx_broker[span{a=1,b=2}]=debug",
            "info,",
        ] {
            check_log_filter(fine).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }
    }
}
