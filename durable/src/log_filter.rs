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
//!
//! Whatever the filter, [`NoStoredBytes`] keeps sled's DEBUG and TRACE lines out of the
//! log: they print the keys and values sled writes, as byte arrays, and those values are
//! message payloads on the broker and bodies on a node (personal data).

use std::fmt;

use tracing::{Level, Metadata};

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
/// belong to a span filter) that is neither a level nor `target=level`, and returns the
/// filter to give tracing: each directive without the whitespace around it and around its
/// `=`, empty directives left out.
///
/// The caller must give tracing the returned filter, not `filter`: tracing keeps the
/// whitespace around a directive in it, so `info ` (a space typed after the level) or the
/// ` info` of `trmx_node=debug, info` is a target of that name to it, never matched: a
/// silent process. A level is what tracing reads as one: a name (any case) or `0`–`5`.
pub fn check_log_filter(filter: &str) -> Result<String, BareTarget> {
    // each directive, and the byte offset of its `=` outside a span filter
    let mut depth = 0_i32;
    let mut directives = vec![(String::new(), None)];
    for c in filter.chars() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                directives.push((String::new(), None));
                continue;
            }
            _ => {}
        }
        if let Some((directive, equals)) = directives.last_mut() {
            if c == '=' && depth == 0 && equals.is_none() {
                *equals = Some(directive.len());
            }
            directive.push(c);
        }
    }
    let mut checked = Vec::new();
    for (directive, equals) in &directives {
        let bare = || BareTarget {
            directive: directive.trim().to_owned(),
        };
        match equals {
            // `target=` (no level) is `target` to tracing: everything of that target alone
            Some(at) => {
                let (target, level) = (directive[..*at].trim(), directive[at + 1..].trim());
                if level.is_empty() {
                    return Err(bare());
                }
                checked.push(format!("{target}={level}"));
            }
            None if directive.trim().is_empty() => {}
            None => {
                let level = directive.trim();
                if level
                    .parse::<tracing::level_filters::LevelFilter>()
                    .is_err()
                {
                    return Err(bare());
                }
                checked.push(level.to_owned());
            }
        }
    }
    Ok(checked.join(","))
}

/// Whether a log line of `metadata` may be written at all, whatever the operator's filter:
/// not one of sled's below INFO. sled logs (through the `log` crate, which the processes
/// route into `tracing`) every key and value it writes at TRACE
/// (`linking pid 24 with Set([0, 0, 0, 1], [8, 1, 18, 31, 10, 15, 78, 82, ..])`, the
/// encoded body of a referral) and whole batches and tree nodes at DEBUG and TRACE; its
/// INFO, WARN and ERROR lines name files and failures, never a value.
pub fn may_log(metadata: &Metadata<'_>) -> bool {
    let target = metadata.target();
    let sled = target == "sled" || target.starts_with("sled::");
    !(sled && *metadata.level() > Level::INFO)
}

/// A layer that refuses what [`may_log`] refuses, for every other layer of the subscriber
/// (a global filter, as `EnvFilter` is): broker and node add it to their logger so that no
/// `log_level` (`trace`, `sled=trace`, `RUST_LOG`) prints what sled stores.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStoredBytes;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for NoStoredBytes {
    fn enabled(
        &self,
        metadata: &Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        may_log(metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled prints stored keys and values at DEBUG and TRACE: those never reach a layer
    /// behind [`NoStoredBytes`], whatever its level; sled's INFO and everyone else's TRACE do.
    #[test]
    fn sled_below_info_is_never_logged() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt as _;

        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let m = event.metadata();
                let line = format!("{} {}", m.target(), m.level());
                self.0.lock().expect("lock").push(line);
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry()
            .with(NoStoredBytes)
            .with(Seen(Arc::clone(&seen)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "sled::pagecache", "linking pid 24 with Set([..], [..])");
            tracing::debug!(target: "sled", "applying batch");
            tracing::info!(target: "sled::config", "opened");
            tracing::trace!(target: "sledge", "not sled");
            tracing::trace!(target: "trmx_node::core", "ours");
        });
        assert_eq!(
            *seen.lock().expect("lock"),
            ["sled::config INFO", "sledge TRACE", "trmx_node::core TRACE"]
        );
    }

    #[test]
    fn a_bare_word_that_is_no_level_is_refused() {
        for (typo, directive) in [
            ("debgu", "debgu"),
            ("Info,trmx_nod", "trmx_nod"),
            ("warn, debgu", "debgu"),
            ("trmx_broker[span{a=1,b=2}]", "trmx_broker[span{a=1,b=2}]"),
            // no level after `=`: tracing reads `debug=` as the target `debug`
            ("debug=", "debug="),
            ("info,trmx_node = ", "trmx_node ="),
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

    /// tracing keeps the whitespace around a directive: `info ` was a target to it, and
    /// the node or broker logged nothing. The filter returned is the one to give tracing.
    #[test]
    fn the_filter_returned_has_no_whitespace_tracing_would_read_as_a_target() {
        for (written, used) in [
            ("info", "info"),
            ("info ", "info"),
            (" INFO\n", "INFO"),
            ("3", "3"),
            ("trmx_node=debug, info", "trmx_node=debug,info"),
            ("info, trmx_node = debug ,", "info,trmx_node=debug"),
            ("info,,h2=off", "info,h2=off"),
            (
                "warn, trmx_broker[stream{participant=X}]=debug",
                "warn,trmx_broker[stream{participant=X}]=debug",
            ),
        ] {
            let checked = check_log_filter(written).unwrap_or_else(|e| panic!("{written}: {e}"));
            assert_eq!(checked, used, "{written:?}");
        }
    }
}
