//! [`BrokerError`], the one error type of the crate, and its single mapping to
//! [`tonic::Status`].
//!
//! Start-up errors (config, TLS material, store) and refusals of a request
//! (bad envelope, permission, quota) share this enum. A refusal's message
//! names a field and a rule, or an id — never a value from a payload or body.
//!
//! Causes follow `trmx_transport`'s rule: a message carries its cause's text, and no
//! variant also returns that cause from `source()`, so `%error` in a log and `{:#}`
//! through `anyhow` both print each cause once.

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
    #[error("config: cannot read {path}: {error}")]
    ConfigRead {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The config file is not valid TOML for [`crate::config::BrokerConfig`].
    #[error("config: {path}: {message}")]
    ConfigParse {
        /// The file.
        path: String,
        /// The parser's message (names the key).
        message: String,
    },
    /// The TLS material named by the config is unusable; `fields` are the config fields
    /// of the files at fault, e.g. `tls.key and tls.cert`.
    #[error("config: {fields}: {error}")]
    Tls {
        /// The config fields, joined with "and".
        fields: String,
        /// What is wrong, naming the files.
        error: trmx_transport::TransportError,
    },
    /// The TLS material or the listener could not be set up.
    #[error("transport: {context}: {error}")]
    Transport {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The system clock disagrees with the last time a broker ran on the store
    /// (see `lifecycle.max_downtime`): the broker does not start.
    #[error("clock: {0}")]
    ClockJump(String),
    /// An I/O error outside the store.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        error: std::io::Error,
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
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BrokerError::Transport {
            context,
            error: error.into(),
        }
    }

    /// A TLS file named by `config.tls` is unusable: names the config fields of the files
    /// at fault.
    pub fn tls(error: trmx_transport::TransportError) -> Self {
        use trmx_transport::TlsFile;
        let fields: Vec<&str> = error
            .files()
            .iter()
            .map(|file| match file {
                TlsFile::Ca => "tls.ca",
                TlsFile::Cert => "tls.cert",
                TlsFile::Key => "tls.key",
                TlsFile::Crl => "tls.crl",
            })
            .collect();
        if fields.is_empty() {
            return BrokerError::transport("tls", error);
        }
        BrokerError::Tls {
            fields: fields.join(" and "),
            error,
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
            | BrokerError::Tls { .. }
            | BrokerError::Transport { .. }
            | BrokerError::ClockJump(_)
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
    fn each_cause_is_printed_once_by_display_and_by_anyhow() {
        let io = || std::io::Error::from_raw_os_error(98);
        let errors = [
            BrokerError::Io {
                context: "binding admin_listen 127.0.0.1:9464".into(),
                error: io(),
            },
            BrokerError::ConfigRead {
                path: "/x/broker.toml".into(),
                error: io(),
            },
            BrokerError::tls(trmx_transport::TransportError::Read {
                file: trmx_transport::TlsFile::Cert,
                path: "/x/nope.pem".into(),
                error: io(),
            }),
            BrokerError::transport("reading the CA certificate", io()),
        ];
        let cause = io().to_string();
        for error in errors {
            let display = error.to_string();
            assert_eq!(display.matches(&cause).count(), 1, "{display}");
            let chain = format!("{:#}", anyhow::Error::from(error));
            assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
            assert_eq!(chain, display);
        }
    }

    #[test]
    fn tls_errors_name_the_config_fields() {
        let error = BrokerError::tls(trmx_transport::TransportError::KeyMismatch {
            cert: "/x/broker.pem".into(),
            key: "/x/other.key".into(),
        });
        let text = error.to_string();
        assert!(text.starts_with("config: tls.key and tls.cert: "), "{text}");
        assert!(
            text.contains("/x/other.key") && text.contains("/x/broker.pem"),
            "{text}"
        );
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
