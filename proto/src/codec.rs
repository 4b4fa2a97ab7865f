//! The codec every switchyard service is generated with: prost's, except that a message
//! that does not decode (bad protobuf, invalid UTF-8 in a string) is the sender's fault,
//! `INVALID_ARGUMENT`, where prost's codec answers `INTERNAL` (which tells an operator to
//! look at the server instead of the client).

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct EdgeCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for EdgeCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for EdgeCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = EdgeDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        EdgeDecoder(self.0.decoder())
    }
}

/// Decodes with prost; a decode failure becomes `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct EdgeDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for EdgeDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| match s.code() {
            Code::Internal => Status::invalid_argument(format!(
                "the message is not valid protobuf for this method: {}",
                s.message()
            )),
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
