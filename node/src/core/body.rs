//! TEMPORARY stand-in for `trmx_proto::body` until that module lands; it has
//! the same names so that the switch is a one-line `pub use`.

use trmx_proto::time::Date;
use trmx_proto::{Kind, MessageId, ValidationError};

/// What a body is validated against besides itself.
#[derive(Debug, Clone, Copy)]
pub struct BodyContext {
    /// The message this one answers, if any.
    pub in_reply_to: Option<MessageId>,
    /// Today's date (for `respond_by` and similar rules).
    pub today: Date,
}

/// A message body (placeholder: opaque bytes tagged with the kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    kind: Kind,
    bytes: Vec<u8>,
}

impl Body {
    /// Decodes a protobuf body of `kind`.
    pub fn decode(kind: Kind, bytes: &[u8]) -> Result<Self, ValidationError> {
        Ok(Self {
            kind,
            bytes: bytes.to_vec(),
        })
    }

    /// The protobuf encoding.
    pub fn encode(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// Parses the proto3 JSON mapping of a body of `kind`.
    pub fn from_json(kind: Kind, json: &str) -> Result<Self, ValidationError> {
        Ok(Self {
            kind,
            bytes: json.as_bytes().to_vec(),
        })
    }

    /// The proto3 JSON mapping.
    pub fn to_json(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Checks the DOMAIN.md rules.
    pub fn validate(&self, _ctx: &BodyContext) -> Result<(), ValidationError> {
        Ok(())
    }

    /// The kind of message this body belongs to.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The date an answer is requested by (referral, RRA request).
    pub fn respond_by(&self) -> Option<Date> {
        None
    }

    /// The next follow-up due date (follow-up).
    pub fn next_follow_up_due(&self) -> Option<Date> {
        None
    }

    /// `handling.retain_until`, if the body has one.
    pub fn retain_until(&self) -> Option<Date> {
        None
    }
}
