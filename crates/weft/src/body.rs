//! Typed bodies: serde values encoded with postcard. Raw `Bytes` bodies need none of this.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::BodyError;
use weft_proto::Message;

/// Encodes a typed body with postcard.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, BodyError> {
    postcard::to_allocvec(value)
        .map(Bytes::from)
        .map_err(|e| BodyError(e.to_string()))
}

/// Decodes a typed body; trailing bytes are an error (they mean the types do not match).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| BodyError(e.to_string()))?;
    if !rest.is_empty() {
        return Err(BodyError(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// A received message whose body decoded as a `T` (see `recv_typed` on
/// [`Inbox`](crate::Inbox), [`Subscription`](crate::Subscription) and [`Puller`](crate::Puller)).
#[derive(Debug, Clone, PartialEq)]
pub struct Typed<T> {
    /// The decoded body.
    pub value: T,
    /// The message it came in (id, headers, ...).
    pub message: Message,
}

/// A received message whose body did not decode as the type asked for. The message is handed
/// over with the error, so nothing is lost: the application logs it, keeps it or tries another
/// type. It counts as taken like any other (settled at the next call).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message {} on {:?}: {error}", message.header.id, message.header.channel.as_str())]
pub struct Undecodable {
    /// Why.
    pub error: BodyError,
    /// The message (boxed: the error stays small on the happy path's `Result`).
    pub message: Box<Message>,
}

/// `message`'s body decoded as a `T`.
pub(crate) fn typed<T: DeserializeOwned>(message: Message) -> Result<Typed<T>, Undecodable> {
    match decode(&message.body) {
        Ok(value) => Ok(Typed { value, message }),
        Err(error) => Err(Undecodable {
            error,
            message: Box::new(message),
        }),
    }
}
