//! The one place where a [`NodeError`] becomes a [`tonic::Status`].
//!
//! | error | code |
//! |---|---|
//! | `Invalid` | `INVALID_ARGUMENT`, message `field.path: rule`, metadata `trmx-field` |
//! | `IdempotencyConflict` | `ALREADY_EXISTS` |
//! | `NotFound` | `NOT_FOUND` |
//! | `FailedPrecondition` | `FAILED_PRECONDITION` |
//! | `BrokerUnavailable` | `UNAVAILABLE` |
//! | `Store` | `UNAVAILABLE` (the node's database cannot take the request now) |
//! | `LimitReached` | `RESOURCE_EXHAUSTED`, the message naming the config key |
//! | `Config` | `INTERNAL` |

use tonic::{Code, Status};

use crate::core::NodeError;

/// Metadata key that carries the offending field path of an `INVALID_ARGUMENT`.
pub const FIELD_METADATA_KEY: &str = "trmx-field";

/// Maps a core error to the status the local API answers with.
pub fn to_status(error: NodeError) -> Status {
    let code = match &error {
        NodeError::Invalid(_) => Code::InvalidArgument,
        NodeError::IdempotencyConflict { .. } => Code::AlreadyExists,
        NodeError::NotFound(_) => Code::NotFound,
        NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
        NodeError::BrokerUnavailable(_) | NodeError::Store(_) | NodeError::ShuttingDown => {
            Code::Unavailable
        }
        NodeError::LimitReached { .. } => Code::ResourceExhausted,
        NodeError::Config(_) | NodeError::ClockJump(_) => Code::Internal,
    };
    let mut status = Status::new(code, error.to_string());
    if let NodeError::Invalid(invalid) = &error
        && let Ok(value) = invalid.field.parse()
    {
        status.metadata_mut().insert(FIELD_METADATA_KEY, value);
    }
    status
}

/// The offending field path of an `INVALID_ARGUMENT` answered by a node, if any.
pub fn invalid_field(status: &Status) -> Option<&str> {
    if status.code() != Code::InvalidArgument {
        return None;
    }
    status
        .metadata()
        .get(FIELD_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
}
