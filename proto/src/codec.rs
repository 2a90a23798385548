//! The gRPC codec of every generated service: prost encoding, with malformed
//! messages answered `INVALID_ARGUMENT`.
//!
//! tonic's prost codec maps every protobuf decode error to `INTERNAL` (as
//! gRPC's status-code guide suggests for a peer's parse failure). For a
//! broker that faces other organisations' software, a request that is not a
//! valid protobuf message is bad input from the caller and must say so: a
//! client that sees `INTERNAL` retries and pages its operators, one that sees
//! `INVALID_ARGUMENT` fixes its request. The same codec decodes responses on
//! the client side, where a malformed response is equally reported as
//! `INVALID_ARGUMENT` (it never happens between trmx peers).

use tonic::codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// [`ProstCodec`] with decode errors mapped to `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as TonicCodec>::Encoder;
    type Decoder = MalformedIsInvalid<<ProstCodec<T, U> as TonicCodec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MalformedIsInvalid(self.0.decoder())
    }
}

/// A decoder whose `INTERNAL` decode failures become `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct MalformedIsInvalid<D>(D);

impl<D> Decoder for MalformedIsInvalid<D>
where
    D: Decoder<Error = Status>,
{
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(src).map_err(|status| {
            if status.code() == Code::Internal {
                // prost's message names the wire problem and the message
                // type/field, never a field's value.
                Status::invalid_argument(format!(
                    "not a valid protobuf message: {}",
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
