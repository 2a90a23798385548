//! [`BrokerError`], the one error type of the crate, and its single mapping to
//! [`tonic::Status`].
//!
//! Start-up errors (config, TLS material, store) and refusals of a request
//! (bad envelope, permission, quota) share this enum. A refusal's message
//! names a field and a rule, or an id — never a value from a payload or body.

use tonic::{Code, Status};
use trmx_proto::ValidationError;

use crate::store::StoreError;

/// Everything that can go wrong in the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A config value breaks a rule; `field` is its dotted path.
    #[error("config: {field} {problem}")]
    Config {
        /// Dotted path of the field, e.g. `limits.default_max_in_flight`.
        field: String,
        /// The rule broken, with the offending config value.
        problem: String,
    },
    /// The config file could not be read.
    #[error("config: cannot read {path}: {source}")]
    ConfigRead {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for [`crate::config::BrokerConfig`].
    #[error("config: {path}: {message}")]
    ConfigParse {
        /// The file.
        path: String,
        /// The parser's message (names the key).
        message: String,
    },
    /// The TLS material or the listener could not be set up.
    #[error("transport: {context}: {source}")]
    Transport {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An I/O error outside the store.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The storage engine failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A malformed request: names the field and the rule.
    #[error("{0}")]
    InvalidArgument(#[from] ValidationError),
    /// The caller's certificate carries no usable identity.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this (wrong certificate role, foreign sender,
    /// broker-made kind).
    #[error("{0}")]
    PermissionDenied(String),
    /// Unknown recipient, or no such message of the caller's.
    #[error("{0}")]
    NotFound(String),
    /// A reused message id with different content.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well formed but cannot be carried out in this state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A quota, rate or disk limit refuses the request for now.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The broker cannot accept work right now (store not writable, shutting down).
    #[error("{0}")]
    Unavailable(String),
}

impl BrokerError {
    /// A config error for `field`.
    pub fn config(field: impl Into<String>, problem: impl Into<String>) -> Self {
        BrokerError::Config {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A transport set-up error.
    pub fn transport(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BrokerError::Transport {
            context,
            source: source.into(),
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            BrokerError::InvalidArgument(_) => Code::InvalidArgument,
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
            BrokerError::NotFound(_) => Code::NotFound,
            BrokerError::AlreadyExists(_) => Code::AlreadyExists,
            BrokerError::FailedPrecondition(_) => Code::FailedPrecondition,
            BrokerError::ResourceExhausted(_) => Code::ResourceExhausted,
            BrokerError::Unavailable(_) => Code::Unavailable,
            BrokerError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            BrokerError::Store(_)
            | BrokerError::Config { .. }
            | BrokerError::ConfigRead { .. }
            | BrokerError::ConfigParse { .. }
            | BrokerError::Transport { .. }
            | BrokerError::Io { .. } => Code::Internal,
        }
    }
}

/// The one place where broker errors become gRPC statuses. Internal details
/// (paths, store reasons) are logged by the caller, not sent to clients.
impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        let code = error.code();
        let message = match &error {
            BrokerError::Store(StoreError::Unavailable(_)) => {
                "the broker cannot store messages right now; retry later".to_string()
            }
            _ if code == Code::Internal => "internal broker error".to_string(),
            _ => error.to_string(),
        };
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages_survive_the_mapping() {
        let cases = [
            (
                BrokerError::InvalidArgument(ValidationError::new(
                    "envelope.recipient",
                    "is required",
                )),
                Code::InvalidArgument,
                "envelope.recipient: is required",
            ),
            (
                BrokerError::PermissionDenied("operator certificates cannot use Exchange".into()),
                Code::PermissionDenied,
                "operator certificates cannot use Exchange",
            ),
            (
                BrokerError::NotFound("unknown recipient BE-X".into()),
                Code::NotFound,
                "unknown recipient BE-X",
            ),
            (
                BrokerError::AlreadyExists("id used".into()),
                Code::AlreadyExists,
                "id used",
            ),
            (
                BrokerError::FailedPrecondition("expired".into()),
                Code::FailedPrecondition,
                "expired",
            ),
            (
                BrokerError::ResourceExhausted("rate".into()),
                Code::ResourceExhausted,
                "rate",
            ),
            (
                BrokerError::Unavailable("shutting down".into()),
                Code::Unavailable,
                "shutting down",
            ),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn internal_details_stay_inside() {
        let status = Status::from(BrokerError::Store(StoreError::Corrupt(
            "/var/lib/x page 7".into(),
        )));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("/var/lib"));
        let status = Status::from(BrokerError::Store(StoreError::Unavailable(
            "flush: no space".into(),
        )));
        assert_eq!(status.code(), Code::Unavailable);
    }
}
