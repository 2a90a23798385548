//! The `trmx.v1` wire contract and the domain types around it.
//!
//! - [`pb`]: the prost/tonic code generated from `proto/trmx/v1/*.proto`, with
//!   the pbjson serde impls (proto3 JSON mapping). Kept behind this one
//!   re-export; business logic uses the domain types below.
//! - [`ids`]: newtypes [`ParticipantId`], [`MessageId`], [`CaseRef`] that cannot
//!   hold an invalid value.
//! - [`envelope`]: envelope validation for `Submit` and for received deliveries
//!   (required fields, id formats, sizes, digest, kind ↔ content type).
//! - [`body`]: validation of the DOMAIN.md bodies and their proto3 JSON mapping.
//! - [`codec`]: the gRPC codec of the generated services (prost, with
//!   malformed messages answered `INVALID_ARGUMENT` instead of `INTERNAL`).
//! - [`error`]: [`ValidationError`], which names a field path and the rule
//!   broken, never the value (values are personal data).
//! - [`schema`]: the names a field path may be made of (every field and message
//!   name of `trmx.v1`, generated from the descriptors), so that a path can be
//!   checked to carry no value: the broker checks a `Reject`'s with it.
//!
//! Nothing in this crate does I/O.

mod generated {
    #![allow(
        missing_docs,
        unreachable_pub,
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic
    )]
    include!(concat!(env!("OUT_DIR"), "/trmx.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/trmx.v1.serde.rs"));
}

/// Generated protobuf messages, enums and tonic services of package `trmx.v1`.
pub mod pb {
    pub use crate::generated::*;
    pub use pbjson_types::{Duration, Timestamp};
}

pub mod body;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod ids;
pub mod kind;
pub mod schema;
pub mod time;

pub use error::ValidationError;
pub use ids::{CaseRef, MessageId, ParticipantId};
pub use kind::Kind;
