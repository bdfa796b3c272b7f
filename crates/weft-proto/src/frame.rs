//! Wire frames: length-prefixed, postcard-encoded, decoded in two phases.
//!
//! ```text
//! frame   = length:u32-le  tag:u8  payload        (length counts tag + payload)
//! payload = postcard(fields)  [body bytes]        (only Data carries a raw body after its fields)
//! ```
//! The decoder reads the 4-byte length first and refuses anything above [`Limits::max_frame_bytes`]
//! *before* buffering or allocating for it; only then does it decode the bounded slice. A data
//! frame's body is a zero-copy slice of the received bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::id::NodeId;
use crate::message::{Kind, Priority};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Size limits a node enforces on what it sends and accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message body; bigger bodies are refused at the API.
    pub max_body_bytes: usize,
    /// Largest encoded header (channel, user headers, shard key, ...).
    pub max_header_bytes: usize,
}

impl Limits {
    /// Largest frame (tag + payload) the decoder accepts.
    pub const fn max_frame_bytes(&self) -> usize {
        1 + self.max_header_bytes + self.max_body_bytes
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// The protocol versions this build speaks. ALPN names the major version; the hello carries the range.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// See [`PROTOCOL_VERSION_MIN`].
pub const PROTOCOL_VERSION_MAX: u16 = 1;
/// ALPN protocol id: the major version.
pub const ALPN: &[u8] = b"weft/1";

/// First frame each side sends on a new connection. Its claims are checked against the TLS identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest protocol version the sender speaks.
    pub version_min: u16,
    /// Highest protocol version the sender speaks.
    pub version_max: u16,
    /// Nodes of other meshes are refused.
    pub mesh: String,
    /// The sender's node id; must equal the key the TLS handshake proved.
    pub node_id: NodeId,
}

/// Why a peer was refused. Sent to the peer in a [`Frame::Refuse`] and logged on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The peer belongs to another mesh.
    WrongMesh,
    /// No protocol version in common.
    IncompatibleVersion,
    /// The hello claimed another id than the TLS handshake proved.
    IdentityMismatch,
    /// The node has as many peers as it may hold.
    TooManyPeers,
    /// The node is shutting down.
    ShuttingDown,
    /// The first frame was not a hello.
    ProtocolViolation,
}

/// A refusal with a human-readable explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub reason: RefuseReason,
    /// One sentence for the log.
    pub detail: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.reason, self.detail)
    }
}

/// A message on the wire. Producer and stream are implicit: the link's peer and its current stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFrame {
    /// Position in the sender's current stream.
    pub seq: u64,
    /// What the message is for.
    pub kind: Kind,
    /// Channel or topic.
    pub channel: String,
    /// Links a reply to its request.
    pub correlation_id: Option<u64>,
    /// Where replies go.
    pub reply_to: Option<NodeId>,
    /// Shard routing key.
    pub shard_key: Option<Bytes>,
    /// Priority.
    pub priority: Priority,
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
    /// Expiry, Unix milliseconds.
    pub expires_unix_ms: Option<u64>,
    /// Transmission attempt, from 1.
    pub attempt: u32,
    /// Application headers.
    pub headers: Vec<(String, Bytes)>,
    /// The body.
    pub body: Bytes,
}

/// Borrowed view of a data frame's fields, for encoding without copies.
#[derive(Debug, Serialize)]
pub struct DataFields<'a> {
    /// See [`DataFrame::seq`].
    pub seq: u64,
    /// See [`DataFrame::kind`].
    pub kind: Kind,
    /// See [`DataFrame::channel`].
    pub channel: &'a str,
    /// See [`DataFrame::correlation_id`].
    pub correlation_id: Option<u64>,
    /// See [`DataFrame::reply_to`].
    pub reply_to: Option<NodeId>,
    /// See [`DataFrame::shard_key`].
    pub shard_key: Option<&'a [u8]>,
    /// See [`DataFrame::priority`].
    pub priority: Priority,
    /// See [`DataFrame::created_unix_ms`].
    pub created_unix_ms: u64,
    /// See [`DataFrame::expires_unix_ms`].
    pub expires_unix_ms: Option<u64>,
    /// See [`DataFrame::attempt`].
    pub attempt: u32,
    /// See [`DataFrame::headers`].
    pub headers: &'a [(String, Bytes)],
}

#[derive(Deserialize)]
struct DataFieldsIn<'a> {
    seq: u64,
    kind: Kind,
    channel: &'a str,
    correlation_id: Option<u64>,
    reply_to: Option<NodeId>,
    shard_key: Option<&'a [u8]>,
    priority: Priority,
    created_unix_ms: u64,
    expires_unix_ms: Option<u64>,
    attempt: u32,
    #[serde(borrow)]
    headers: Vec<(&'a str, &'a [u8])>,
}

/// Everything that travels on a link's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Dialer's first frame.
    Hello(Hello),
    /// Acceptor's answer to an acceptable hello.
    Welcome(Hello),
    /// Acceptor's answer to an unacceptable hello; the connection closes after it.
    Refuse(Refusal),
    /// "My stream to you is `epoch`; everything below `next_seq` you have acknowledged." Sent once
    /// per connection before any data, so a receiver that lost its state does not wait for a gap.
    Resume {
        /// The sender's stream epoch.
        epoch: u64,
        /// First sequence number the sender has not seen acknowledged.
        next_seq: u64,
    },
    /// Cumulative acknowledgement: every message of stream `epoch` up to `up_to` was delivered.
    Ack {
        /// Epoch of the acknowledged stream.
        epoch: u64,
        /// Highest delivered sequence number.
        up_to: u64,
    },
    /// A message.
    Data(DataFrame),
}

const TAG_HELLO: u8 = 1;
const TAG_WELCOME: u8 = 2;
const TAG_REFUSE: u8 = 3;
const TAG_RESUME: u8 = 4;
const TAG_ACK: u8 = 5;
const TAG_DATA: u8 = 6;

/// Why bytes from a peer are not a valid frame. Any of these ends the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds the limit; nothing was buffered for it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// A zero-length frame has no tag.
    #[error("empty frame")]
    Empty,
    /// The tag names no frame type.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// The fields do not decode.
    #[error("malformed {frame} frame: {detail}")]
    Malformed {
        /// Which frame type.
        frame: &'static str,
        /// What postcard reported.
        detail: String,
    },
    /// Bytes left over after a frame that carries no body.
    #[error("{0} trailing bytes after a {1} frame")]
    Trailing(usize, &'static str),
}

/// Why a frame could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded header (channel, user headers, shard key) exceeds [`Limits::max_header_bytes`].
    #[error("message header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge {
        /// Encoded size.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The body exceeds [`Limits::max_body_bytes`].
    #[error("message body of {len} bytes exceeds the limit of {max} bytes")]
    BodyTooLarge {
        /// Body size.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// postcard failed (should not happen for well-formed values).
    #[error("encoding failed: {0}")]
    Postcard(String),
}

/// Appends frames to a buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameEncoder {
    limits: Limits,
}

impl FrameEncoder {
    /// An encoder enforcing `limits`.
    pub const fn new(limits: Limits) -> Self {
        Self { limits }
    }

    /// Appends a control frame (anything but data).
    pub fn control(&self, buf: &mut BytesMut, frame: &Frame) -> Result<(), EncodeError> {
        let start = begin(buf);
        let result = match frame {
            Frame::Hello(hello) => put(buf, TAG_HELLO, hello),
            Frame::Welcome(hello) => put(buf, TAG_WELCOME, hello),
            Frame::Refuse(refusal) => put(buf, TAG_REFUSE, refusal),
            Frame::Resume { epoch, next_seq } => put(buf, TAG_RESUME, &(epoch, next_seq)),
            Frame::Ack { epoch, up_to } => put(buf, TAG_ACK, &(epoch, up_to)),
            Frame::Data(data) => {
                let fields = DataFields {
                    seq: data.seq,
                    kind: data.kind,
                    channel: &data.channel,
                    correlation_id: data.correlation_id,
                    reply_to: data.reply_to,
                    shard_key: data.shard_key.as_deref(),
                    priority: data.priority,
                    created_unix_ms: data.created_unix_ms,
                    expires_unix_ms: data.expires_unix_ms,
                    attempt: data.attempt,
                    headers: &data.headers,
                };
                buf.truncate(start);
                return self.data(buf, &fields, &data.body);
            }
        };
        finish(buf, start, result)
    }

    /// Appends a data frame: the fields, then the raw body.
    pub fn data(
        &self,
        buf: &mut BytesMut,
        fields: &DataFields<'_>,
        body: &[u8],
    ) -> Result<(), EncodeError> {
        if body.len() > self.limits.max_body_bytes {
            return Err(EncodeError::BodyTooLarge {
                len: body.len(),
                max: self.limits.max_body_bytes,
            });
        }
        let start = begin(buf);
        let result = put(buf, TAG_DATA, fields);
        let header_len = buf.len() - start - LENGTH_PREFIX_BYTES - 1;
        if result.is_ok() && header_len > self.limits.max_header_bytes {
            buf.truncate(start);
            return Err(EncodeError::HeaderTooLarge {
                len: header_len,
                max: self.limits.max_header_bytes,
            });
        }
        buf.extend_from_slice(body);
        finish(buf, start, result)
    }
}

fn begin(buf: &mut BytesMut) -> usize {
    let start = buf.len();
    buf.put_u32_le(0);
    start
}

fn put<T: Serialize>(buf: &mut BytesMut, tag: u8, value: &T) -> Result<(), EncodeError> {
    buf.put_u8(tag);
    let taken = std::mem::take(buf);
    match postcard::to_extend(value, taken) {
        Ok(back) => {
            *buf = back;
            Ok(())
        }
        Err(e) => Err(EncodeError::Postcard(e.to_string())),
    }
}

fn finish(
    buf: &mut BytesMut,
    start: usize,
    result: Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    if let Err(e) = result {
        buf.truncate(start);
        return Err(e);
    }
    let len = (buf.len() - start - LENGTH_PREFIX_BYTES) as u32;
    buf[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Splits a byte stream into frames, refusing oversized ones before buffering them.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder accepting frames up to `limits.max_frame_bytes()`.
    pub const fn new(limits: Limits) -> Self {
        Self {
            max_frame_bytes: limits.max_frame_bytes(),
        }
    }

    /// Phase one: how many bytes the next frame needs in total, once its prefix is readable.
    /// Errors as soon as the prefix announces an oversized or empty frame.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        if buf.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        prefix.copy_from_slice(&buf[..LENGTH_PREFIX_BYTES]);
        let len = u32::from_le_bytes(prefix) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        Ok(Some(LENGTH_PREFIX_BYTES + len))
    }

    /// Takes the next whole frame off the front of `buf`, or returns `None` if it is not all there yet
    /// (having reserved room for it, which phase one bounded).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(total) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total).freeze();
        frame.advance(LENGTH_PREFIX_BYTES);
        decode_payload(frame).map(Some)
    }
}

fn exact<'a, T: Deserialize<'a>>(bytes: &'a [u8], name: &'static str) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| FrameError::Malformed {
        frame: name,
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len(), name));
    }
    Ok(value)
}

/// Phase two: decodes one frame (tag + payload) whose length was already checked.
fn decode_payload(frame: Bytes) -> Result<Frame, FrameError> {
    let tag = frame[0];
    let payload = &frame[1..];
    match tag {
        TAG_HELLO => Ok(Frame::Hello(exact(payload, "hello")?)),
        TAG_WELCOME => Ok(Frame::Welcome(exact(payload, "welcome")?)),
        TAG_REFUSE => Ok(Frame::Refuse(exact(payload, "refuse")?)),
        TAG_RESUME => {
            let (epoch, next_seq) = exact(payload, "resume")?;
            Ok(Frame::Resume { epoch, next_seq })
        }
        TAG_ACK => {
            let (epoch, up_to) = exact(payload, "ack")?;
            Ok(Frame::Ack { epoch, up_to })
        }
        TAG_DATA => {
            let (fields, body): (DataFieldsIn<'_>, &[u8]) = postcard::take_from_bytes(payload)
                .map_err(|e| FrameError::Malformed {
                    frame: "data",
                    detail: e.to_string(),
                })?;
            Ok(Frame::Data(DataFrame {
                seq: fields.seq,
                kind: fields.kind,
                channel: fields.channel.to_owned(),
                correlation_id: fields.correlation_id,
                reply_to: fields.reply_to,
                shard_key: fields.shard_key.map(|key| frame.slice_ref(key)),
                priority: fields.priority,
                created_unix_ms: fields.created_unix_ms,
                expires_unix_ms: fields.expires_unix_ms,
                attempt: fields.attempt,
                headers: fields
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), frame.slice_ref(v)))
                    .collect(),
                body: frame.slice_ref(body),
            }))
        }
        other => Err(FrameError::UnknownTag(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_data(body: &[u8]) -> DataFrame {
        DataFrame {
            seq: 42,
            kind: Kind::Command,
            channel: "points/grant".into(),
            correlation_id: Some(9),
            reply_to: Some(NodeId::from_bytes([3; 32])),
            shard_key: Some(Bytes::from_static(b"acct-1")),
            priority: Priority::HIGH,
            created_unix_ms: 1_700_000_000_000,
            expires_unix_ms: None,
            attempt: 2,
            headers: vec![("trace".into(), Bytes::from_static(b"abc"))],
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn every_frame_round_trips_even_when_split_byte_by_byte() {
        let hello = Hello {
            version_min: 1,
            version_max: 3,
            mesh: "shop".into(),
            node_id: NodeId::from_bytes([5; 32]),
        };
        let frames = vec![
            Frame::Hello(hello.clone()),
            Frame::Welcome(hello),
            Frame::Refuse(Refusal {
                reason: RefuseReason::WrongMesh,
                detail: "mesh \"a\" is not \"b\"".into(),
            }),
            Frame::Resume {
                epoch: 7,
                next_seq: 1,
            },
            Frame::Ack {
                epoch: 7,
                up_to: u64::MAX,
            },
            Frame::Data(sample_data(b"hello world")),
            Frame::Data(sample_data(b"")),
        ];
        let encoder = FrameEncoder::new(Limits::default());
        let mut wire = BytesMut::new();
        for frame in &frames {
            encoder.control(&mut wire, frame).unwrap();
        }
        let decoder = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                decoded.push(frame);
            }
        }
        assert_eq!(decoded, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let limits = Limits {
            max_body_bytes: 100,
            max_header_bytes: 100,
        };
        let decoder = FrameDecoder::new(limits);
        let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        let capacity_before = buf.capacity();
        assert_eq!(
            decoder.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 201
            })
        );
        assert_eq!(
            buf.capacity(),
            capacity_before,
            "must not reserve for an oversized frame"
        );
    }

    #[test]
    fn oversized_body_is_refused_at_encode() {
        let limits = Limits {
            max_body_bytes: 4,
            max_header_bytes: 100,
        };
        let encoder = FrameEncoder::new(limits);
        let mut buf = BytesMut::new();
        let err = encoder.control(&mut buf, &Frame::Data(sample_data(b"12345")));
        assert_eq!(err, Err(EncodeError::BodyTooLarge { len: 5, max: 4 }));
        assert!(buf.is_empty(), "a refused frame leaves nothing behind");
    }

    #[test]
    fn garbage_is_a_typed_error_never_a_panic() {
        let decoder = FrameDecoder::new(Limits::default());
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..5_000u32 {
            let len = (round % 64) as usize + 1;
            let mut buf = BytesMut::new();
            buf.put_u32_le(len as u32);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                buf.put_u8(state as u8);
            }
            // Any outcome but a panic is fine; unknown tags and malformed fields must be errors.
            if let Ok(Some(Frame::Data(d))) = decoder.decode(&mut buf) {
                assert!(d.body.len() < len);
            }
        }
        let mut unknown = BytesMut::from(&[1, 0, 0, 0, 99][..]);
        assert_eq!(
            decoder.decode(&mut unknown),
            Err(FrameError::UnknownTag(99))
        );
        let mut empty = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(decoder.decode(&mut empty), Err(FrameError::Empty));
    }
}
