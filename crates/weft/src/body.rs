//! Typed bodies: serde values encoded with postcard. Raw `Bytes` bodies need none of this.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::BodyError;

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
