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
use crate::message::{Kind, Options, Priority};

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
///
/// 4: a data frame may continue the one before it on its stream (`TAG_DATA_NEXT`, see
/// [`DataContext`]).
pub const PROTOCOL_VERSION_MIN: u16 = 4;
/// See [`PROTOCOL_VERSION_MIN`].
pub const PROTOCOL_VERSION_MAX: u16 = 4;
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
    /// Which run of the sender's process this is: when it started (wall clock, Unix ms). A
    /// connection from a newer incarnation of a peer replaces one from an older incarnation,
    /// which is dead (see [`crate::handshake::resolve_duplicate`]).
    pub incarnation: u64,
    /// Proof that the sender knows the mesh secret, bound to this TLS session (see
    /// [`crate::handshake::mesh_proof`]); `None` when the sender has no secret configured.
    pub proof: Option<[u8; 32]>,
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
    /// The peer is not admitted: not on the allow-list, or it did not prove the mesh secret.
    NotAdmitted,
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
    pub channel: crate::Channel,
    /// Priority.
    pub priority: Priority,
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
    /// Transmission attempt, from 1.
    pub attempt: u32,
    /// The rarely used fields, boxed only when one is set.
    pub options: Option<Box<Options>>,
    /// The body.
    pub body: Bytes,
}

/// Borrowed view of a data frame's fields, for encoding without copies. On the wire the options
/// are flattened into their fields (postcard of the same field order as the decoder reads).
#[derive(Debug, Clone, Copy)]
pub struct DataFields<'a> {
    /// See [`DataFrame::seq`].
    pub seq: u64,
    /// See [`DataFrame::kind`].
    pub kind: Kind,
    /// See [`DataFrame::channel`].
    pub channel: &'a str,
    /// See [`DataFrame::priority`].
    pub priority: Priority,
    /// See [`DataFrame::created_unix_ms`].
    pub created_unix_ms: u64,
    /// See [`DataFrame::attempt`].
    pub attempt: u32,
    /// See [`DataFrame::options`].
    pub options: Option<&'a Options>,
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
/// A data frame that continues the data frame before it on the same stream: the next seq, the
/// same kind, channel, priority and attempt, no options; only the creation time's advance and
/// the body travel (see [`DataContext`]).
const TAG_DATA_NEXT: u8 = 7;

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

/// One direction of one stream's memory of its last data frame, so that a run of messages on
/// one channel sends each header once: a data frame whose fields but seq, creation time and
/// body repeat the one before (seq one more, same kind, channel, priority and attempt, no
/// options, created no earlier) travels as a `TAG_DATA_NEXT` frame: after the length prefix,
/// its tag and the creation time's advance (2 bytes, usually) and the body, instead of about 19
/// bytes plus the channel name. The sender's and the receiver's contexts see the
/// same frames in the same order, so they agree; each starts empty with its stream, and a
/// continuation without a data frame before it on the stream is malformed.
#[derive(Clone, Debug, Default)]
pub struct DataContext {
    last: Option<LastData>,
}

#[derive(Clone, Debug)]
struct LastData {
    seq: u64,
    kind: Kind,
    channel: crate::Channel,
    priority: Priority,
    created_unix_ms: u64,
    attempt: u32,
}

impl DataContext {
    /// A new stream's context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the last frame (a new stream begins).
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// The creation time's advance when `fields` continue the last frame.
    fn continues(&self, fields: &DataFields<'_>) -> Option<u64> {
        let last = self.last.as_ref()?;
        let continues = last.seq != 0
            && fields.seq == last.seq + 1
            && fields.options.is_none()
            && fields.kind == last.kind
            && fields.priority == last.priority
            && fields.attempt == last.attempt
            && fields.channel == last.channel.as_str();
        continues
            .then(|| fields.created_unix_ms.checked_sub(last.created_unix_ms))
            .flatten()
    }

    /// Remembers a data frame sent or received in full. The channel is kept as its own copy
    /// when it changed (a received one would otherwise hold its whole read chunk).
    fn remember(&mut self, fields: &DataFields<'_>) {
        let channel = match self.last.take() {
            Some(last) if last.channel.as_str() == fields.channel => last.channel,
            _ => crate::Channel::from(fields.channel),
        };
        self.last = Some(LastData {
            seq: fields.seq,
            kind: fields.kind,
            channel,
            priority: fields.priority,
            created_unix_ms: fields.created_unix_ms,
            attempt: fields.attempt,
        });
    }

    /// A continuation was sent for `fields`.
    fn next_sent(&mut self, fields: &DataFields<'_>) {
        if let Some(last) = &mut self.last {
            last.seq = fields.seq;
            last.created_unix_ms = fields.created_unix_ms;
        }
    }

    /// A received continuation: the frame it stands for.
    fn next(&mut self, delta: u64, body: Bytes) -> Result<DataFrame, FrameError> {
        let malformed = |detail: &str| FrameError::Malformed {
            frame: "data-next",
            detail: detail.to_owned(),
        };
        let last = self
            .last
            .as_mut()
            .ok_or_else(|| malformed("no data frame before it on the stream"))?;
        if last.seq == 0 {
            return Err(malformed("continues a volatile frame"));
        }
        last.seq = last
            .seq
            .checked_add(1)
            .ok_or_else(|| malformed("seq overflows"))?;
        last.created_unix_ms = last
            .created_unix_ms
            .checked_add(delta)
            .ok_or_else(|| malformed("creation time overflows"))?;
        Ok(DataFrame {
            seq: last.seq,
            kind: last.kind,
            channel: last.channel.clone(),
            priority: last.priority,
            created_unix_ms: last.created_unix_ms,
            attempt: last.attempt,
            options: None,
            body,
        })
    }
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
                    priority: data.priority,
                    created_unix_ms: data.created_unix_ms,
                    attempt: data.attempt,
                    options: data.options.as_deref(),
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
        buf.reserve(LENGTH_PREFIX_BYTES + 1 + data_fields_bound(fields) + body.len());
        self.data_header(buf, fields, body.len())?;
        buf.extend_from_slice(body);
        Ok(())
    }

    /// [`FrameEncoder::data`] on a stream with `context`: a continuation of the frame before
    /// when it is one (see [`DataContext`]).
    pub fn data_in(
        &self,
        context: &mut DataContext,
        buf: &mut BytesMut,
        fields: &DataFields<'_>,
        body: &[u8],
    ) -> Result<(), EncodeError> {
        if let Some(delta) = context.continues(fields) {
            self.next_header(buf, delta, body.len())?;
            context.next_sent(fields);
            buf.extend_from_slice(body);
            return Ok(());
        }
        self.data(buf, fields, body)?;
        context.remember(fields);
        Ok(())
    }

    /// [`FrameEncoder::data_header`] on a stream with `context` (see [`FrameEncoder::data_in`]).
    pub fn data_header_in(
        &self,
        context: &mut DataContext,
        buf: &mut BytesMut,
        fields: &DataFields<'_>,
        body_len: usize,
    ) -> Result<(), EncodeError> {
        if let Some(delta) = context.continues(fields) {
            self.next_header(buf, delta, body_len)?;
            context.next_sent(fields);
            return Ok(());
        }
        self.data_header(buf, fields, body_len)?;
        context.remember(fields);
        Ok(())
    }

    /// A continuation's length prefix, tag and creation-time advance.
    fn next_header(
        &self,
        buf: &mut BytesMut,
        delta: u64,
        body_len: usize,
    ) -> Result<(), EncodeError> {
        if body_len > self.limits.max_body_bytes {
            return Err(EncodeError::BodyTooLarge {
                len: body_len,
                max: self.limits.max_body_bytes,
            });
        }
        buf.reserve(LENGTH_PREFIX_BYTES + 1 + 10 + body_len);
        let start = buf.len();
        buf.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
        buf.put_u8(TAG_DATA_NEXT);
        wire::put_varint(buf, delta);
        let len = (buf.len() - start - LENGTH_PREFIX_BYTES + body_len) as u32;
        buf[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }

    /// A data frame without its body: everything [`FrameEncoder::data`] writes before the body,
    /// with the length prefix counting a body of `body_len` bytes that the caller sends right
    /// after (a large body goes to the transport as its own buffer instead of being copied).
    pub fn data_header(
        &self,
        buf: &mut BytesMut,
        fields: &DataFields<'_>,
        body_len: usize,
    ) -> Result<(), EncodeError> {
        if body_len > self.limits.max_body_bytes {
            return Err(EncodeError::BodyTooLarge {
                len: body_len,
                max: self.limits.max_body_bytes,
            });
        }
        // Hand-written postcard (the format the control frames use via serde): serde's
        // byte-at-a-time `Extend` into a `BytesMut` cost a fifth of a sender's CPU.
        buf.reserve(LENGTH_PREFIX_BYTES + 1 + data_fields_bound(fields));
        let start = buf.len();
        wire::put_data_header(buf, TAG_DATA, fields);
        let header_len = buf.len() - start - LENGTH_PREFIX_BYTES - 1;
        if header_len > self.limits.max_header_bytes {
            buf.truncate(start);
            return Err(EncodeError::HeaderTooLarge {
                len: header_len,
                max: self.limits.max_header_bytes,
            });
        }
        let len = (buf.len() - start - LENGTH_PREFIX_BYTES + body_len) as u32;
        buf[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }
}

/// An upper bound of the encoded size of `fields` (varints at their widest).
fn data_fields_bound(fields: &DataFields<'_>) -> usize {
    let options = fields.options.map_or(0, |o| {
        let headers: usize = o.headers.iter().map(|(k, v)| k.len() + v.len() + 20).sum();
        o.shard_key.as_ref().map_or(0, |k| k.len() + 10) + headers
    });
    100 + fields.channel.len() + options
}

/// The postcard wire format, by hand, for the one frame on the hot path. Postcard encodes
/// integers as LEB128 varints, `Option` as a 0/1 tag, enum variants by index, strings and byte
/// strings as a varint length plus bytes, arrays as their bytes, structs as their fields in order.
/// Tests check this against postcard itself in both directions.
mod wire {
    use bytes::{BufMut, Bytes, BytesMut};

    use super::{DataFields, DataFrame, FrameError};
    use crate::id::{NodeId, NODE_ID_LEN};
    use crate::message::{Kind, Options, Priority};

    /// A varint at the start of `bytes`: (value, bytes used); `None` if truncated or too long.
    pub(super) fn take_varint(bytes: &[u8]) -> Option<(u64, usize)> {
        let mut value = 0u64;
        for (i, &byte) in bytes.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some((value, i + 1));
            }
        }
        None
    }

    pub(super) fn put_varint(buf: &mut BytesMut, value: u64) {
        let mut scratch = Scratch::new();
        scratch.varint(value);
        scratch.flush(buf);
    }

    fn put_bytes(buf: &mut BytesMut, bytes: &[u8]) {
        put_varint(buf, bytes.len() as u64);
        buf.put_slice(bytes);
    }

    fn kind_index(kind: Kind) -> u64 {
        match kind {
            Kind::Event => 0,
            Kind::Command => 1,
            Kind::Document => 2,
            Kind::Request => 3,
            Kind::Reply => 4,
        }
    }

    fn kind_from_index(index: u64) -> Option<Kind> {
        Some(match index {
            0 => Kind::Event,
            1 => Kind::Command,
            2 => Kind::Document,
            3 => Kind::Request,
            4 => Kind::Reply,
            _ => return None,
        })
    }

    /// Small fields gathered on the stack and appended at once: one `put_slice` per field cost
    /// a data frame's sender a third of its encoding time. A short variable-length field (the
    /// channel name, a reply-to id) joins the run too, so a typical header is one append.
    struct Scratch {
        bytes: [u8; Scratch::CAPACITY],
        len: usize,
    }

    impl Scratch {
        const CAPACITY: usize = 256;
        /// The most every fixed-size field of a data header takes together, at its widest
        /// (length prefix and tag 5, seq 10, kind 1, channel length 10, correlation id 11,
        /// reply-to and shard-key tags 2, shard-key length 10, priority 1, creation time 10,
        /// expiry 11, attempt 5, header count 10): a slice joins the run only while this much
        /// room stays behind it, so the fixed fields always fit.
        const FIXED_MAX: usize = 96;

        fn new() -> Self {
            Self {
                bytes: [0; Self::CAPACITY],
                len: 0,
            }
        }

        fn u8(&mut self, byte: u8) {
            self.bytes[self.len] = byte;
            self.len += 1;
        }

        fn varint(&mut self, mut value: u64) {
            while value >= 0x80 {
                self.u8((value as u8 & 0x7f) | 0x80);
                value >>= 7;
            }
            self.u8(value as u8);
        }

        fn option_varint(&mut self, value: Option<u64>) {
            match value {
                None => self.u8(0),
                Some(v) => {
                    self.u8(1);
                    self.varint(v);
                }
            }
        }

        /// A variable-length field: into the run if it leaves room for the fixed fields, else
        /// after what was gathered.
        fn slice(&mut self, bytes: &[u8], buf: &mut BytesMut) {
            if self.len + bytes.len() + Self::FIXED_MAX <= Self::CAPACITY {
                self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
                self.len += bytes.len();
            } else {
                self.flush(buf);
                buf.extend_from_slice(bytes);
            }
        }

        /// Appends what was gathered to `buf` and starts again.
        fn flush(&mut self, buf: &mut BytesMut) {
            buf.extend_from_slice(&self.bytes[..self.len]);
            self.len = 0;
        }
    }

    /// A data frame's length prefix (zero, for the caller to fill in), `tag` and fields.
    pub(super) fn put_data_header(buf: &mut BytesMut, tag: u8, f: &DataFields<'_>) {
        let mut scratch = Scratch::new();
        for byte in [0; super::LENGTH_PREFIX_BYTES] {
            scratch.u8(byte);
        }
        scratch.u8(tag);
        put_data_fields_into(&mut scratch, buf, f);
    }

    /// The fields after what `scratch` holds already, flushed to `buf`.
    fn put_data_fields_into(scratch: &mut Scratch, buf: &mut BytesMut, f: &DataFields<'_>) {
        let o = f.options;
        scratch.varint(f.seq);
        scratch.varint(kind_index(f.kind));
        scratch.varint(f.channel.len() as u64);
        scratch.slice(f.channel.as_bytes(), buf);
        scratch.option_varint(o.and_then(|o| o.correlation_id));
        match o.and_then(|o| o.reply_to.as_ref()) {
            None => scratch.u8(0),
            Some(id) => {
                scratch.u8(1);
                scratch.slice(id.as_bytes(), buf);
            }
        }
        match o.and_then(|o| o.shard_key.as_ref()) {
            None => scratch.u8(0),
            Some(key) => {
                scratch.u8(1);
                scratch.varint(key.len() as u64);
                scratch.slice(key, buf);
            }
        }
        scratch.u8(f.priority.0);
        scratch.varint(f.created_unix_ms);
        scratch.option_varint(o.and_then(|o| o.expires_unix_ms));
        scratch.varint(u64::from(f.attempt));
        let headers = o.map_or(&[][..], |o| &o.headers[..]);
        scratch.varint(headers.len() as u64);
        scratch.flush(buf);
        for (key, value) in headers {
            put_bytes(buf, key.as_bytes());
            put_bytes(buf, value);
        }
    }

    /// A cursor over a data frame's payload. Every read is bounds-checked; nothing is allocated
    /// from a length before the bytes it announces are known to be there.
    struct Reader<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    /// What is wrong with a data frame: a small error while decoding (every field's `Result`
    /// stays two words wide), turned into a [`FrameError`] once at the end.
    #[derive(Clone, Copy, Debug)]
    struct Bad(&'static str);

    fn malformed(detail: &'static str) -> Bad {
        Bad(detail)
    }

    impl From<Bad> for FrameError {
        fn from(Bad(detail): Bad) -> Self {
            FrameError::Malformed {
                frame: "data",
                detail: detail.to_owned(),
            }
        }
    }

    impl<'a> Reader<'a> {
        fn u8(&mut self) -> Result<u8, Bad> {
            let byte = *self
                .bytes
                .get(self.pos)
                .ok_or_else(|| malformed("truncated"))?;
            self.pos += 1;
            Ok(byte)
        }

        /// A LEB128 varint of at most `max_bits` bits (32 or 64).
        #[inline]
        fn varint(&mut self, max_bits: u32) -> Result<u64, Bad> {
            // Most fields (kind, lengths, flags, attempt, counts) fit in one byte.
            if let Some(&byte) = self.bytes.get(self.pos) {
                if byte < 0x80 {
                    self.pos += 1;
                    return Ok(u64::from(byte));
                }
            }
            self.varint_long(max_bits)
        }

        fn varint_long(&mut self, max_bits: u32) -> Result<u64, Bad> {
            let max_bytes = max_bits.div_ceil(7) as usize;
            let rest = &self.bytes[self.pos..];
            let n = rest.len().min(max_bytes);
            let mut value: u64 = 0;
            // One pass over the bytes there are; the range check only at the end.
            for (i, &byte) in rest[..n].iter().enumerate() {
                value |= u64::from(byte & 0x7f) << (7 * i);
                if byte < 0x80 {
                    if i == max_bytes - 1 && u32::from(byte) >> (max_bits - 7 * i as u32) != 0 {
                        return Err(malformed("varint out of range"));
                    }
                    self.pos += i + 1;
                    return Ok(value);
                }
            }
            // Every byte there is continues: the varint is cut off, or wider than `max_bits`.
            Err(malformed(if n < max_bytes {
                "truncated"
            } else {
                "varint out of range"
            }))
        }

        fn option(&mut self) -> Result<bool, Bad> {
            match self.u8()? {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(malformed("bad option tag")),
            }
        }

        fn bytes(&mut self) -> Result<&'a [u8], Bad> {
            let len = self.varint(64)?;
            let remaining = (self.bytes.len() - self.pos) as u64;
            if len > remaining {
                return Err(malformed("length beyond the frame"));
            }
            let start = self.pos;
            self.pos += len as usize;
            Ok(&self.bytes[start..self.pos])
        }

        fn str(&mut self) -> Result<&'a str, Bad> {
            std::str::from_utf8(self.bytes()?).map_err(|_| malformed("string is not UTF-8"))
        }
    }

    /// Decodes a data frame's payload (after the tag); `frame` is the buffer it lies in, so the
    /// body, shard key and header values become zero-copy slices of it.
    pub(super) fn decode_data(frame: &Bytes, payload: &[u8]) -> Result<DataFrame, FrameError> {
        Ok(decode_data_fields(frame, payload)?)
    }

    fn decode_data_fields(frame: &Bytes, payload: &[u8]) -> Result<DataFrame, Bad> {
        let mut r = Reader {
            bytes: payload,
            pos: 0,
        };
        let seq = r.varint(64)?;
        let kind = kind_from_index(r.varint(32)?).ok_or_else(|| malformed("unknown kind"))?;
        let channel = crate::Channel::from_utf8(frame.slice_ref(r.bytes()?))
            .map_err(|_| malformed("string is not UTF-8"))?;
        let correlation_id = if r.option()? {
            Some(r.varint(64)?)
        } else {
            None
        };
        let reply_to = if r.option()? {
            let start = r.pos;
            if r.bytes.len() - start < NODE_ID_LEN {
                return Err(malformed("truncated node id"));
            }
            r.pos += NODE_ID_LEN;
            let mut id = [0u8; NODE_ID_LEN];
            id.copy_from_slice(&r.bytes[start..r.pos]);
            Some(NodeId::from_bytes(id))
        } else {
            None
        };
        let shard_key = if r.option()? {
            Some(frame.slice_ref(r.bytes()?))
        } else {
            None
        };
        let priority = Priority(r.u8()?);
        let created_unix_ms = r.varint(64)?;
        let expires_unix_ms = if r.option()? {
            Some(r.varint(64)?)
        } else {
            None
        };
        let attempt = r.varint(32)? as u32;
        let count = r.varint(64)?;
        // Each header takes at least two bytes, so a count beyond that is a lie: refuse it
        // before reserving anything for it.
        if count > ((r.bytes.len() - r.pos) / 2) as u64 {
            return Err(malformed("header count beyond the frame"));
        }
        let mut headers = Vec::with_capacity(count as usize);
        // (An empty `Vec` does not allocate: most messages carry no headers.)
        for _ in 0..count {
            let key = r.str()?.to_owned();
            let value = frame.slice_ref(r.bytes()?);
            headers.push((key, value));
        }
        let options = Options {
            correlation_id,
            reply_to,
            shard_key,
            expires_unix_ms,
            headers,
        };
        Ok(DataFrame {
            seq,
            kind,
            channel,
            priority,
            created_unix_ms,
            attempt,
            options: (!options.is_empty()).then(|| Box::new(options)),
            body: frame.slice_ref(&payload[r.pos..]),
        })
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
    /// (having reserved room for it, which phase one bounded). Without a stream context: a
    /// continuation is malformed (see [`FrameDecoder::decode_in`]).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        self.take(buf)?.map(decode_payload).transpose()
    }

    /// [`FrameDecoder::decode`] on a stream with `context`, which continuations (see
    /// [`DataContext`]) need.
    pub fn decode_in(
        &self,
        context: &mut DataContext,
        buf: &mut BytesMut,
    ) -> Result<Option<Frame>, FrameError> {
        self.take(buf)?
            .map(|frame| decode_in(context, frame))
            .transpose()
    }

    /// The next whole frame's payload (tag on), split off `buf`.
    fn take(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(total) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total).freeze();
        frame.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(frame))
    }
}

impl FrameDecoder {
    /// Like [`FrameDecoder::decode`], but takes the frame off the front of a received chunk
    /// without copying it: the frame (and the body sliced from it) shares the chunk's buffer.
    /// Returns `None`, leaving `buf` untouched, if the chunk does not hold the whole frame.
    pub fn decode_bytes(&self, buf: &mut Bytes) -> Result<Option<Frame>, FrameError> {
        self.take_bytes(buf)?.map(decode_payload).transpose()
    }

    /// [`FrameDecoder::decode_bytes`] on a stream with `context`, which continuations
    /// (see [`DataContext`]) need.
    pub fn decode_bytes_in(
        &self,
        context: &mut DataContext,
        buf: &mut Bytes,
    ) -> Result<Option<Frame>, FrameError> {
        self.take_bytes(buf)?
            .map(|frame| decode_in(context, frame))
            .transpose()
    }

    /// [`FrameDecoder::take`] from a received chunk, without copying.
    fn take_bytes(&self, buf: &mut Bytes) -> Result<Option<Bytes>, FrameError> {
        let Some(total) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        frame.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(frame))
    }
}

/// Decodes one frame (tag + payload) with `context`: a continuation becomes the data frame it
/// stands for, and every data frame in full is remembered.
fn decode_in(context: &mut DataContext, frame: Bytes) -> Result<Frame, FrameError> {
    match frame[0] {
        TAG_DATA_NEXT => {
            let (delta, used) =
                wire::take_varint(&frame[1..]).ok_or_else(|| FrameError::Malformed {
                    frame: "data-next",
                    detail: "truncated creation time".to_owned(),
                })?;
            let body = frame.slice(1 + used..);
            context.next(delta, body).map(Frame::Data)
        }
        _ => {
            let frame = decode_payload(frame)?;
            if let Frame::Data(data) = &frame {
                context.remember(&DataFields {
                    seq: data.seq,
                    kind: data.kind,
                    channel: &data.channel,
                    priority: data.priority,
                    created_unix_ms: data.created_unix_ms,
                    attempt: data.attempt,
                    options: data.options.as_deref(),
                });
            }
            Ok(frame)
        }
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
        TAG_DATA => Ok(Frame::Data(wire::decode_data(&frame, payload)?)),
        TAG_DATA_NEXT => Err(FrameError::Malformed {
            frame: "data-next",
            detail: "no data frame before it on the stream".to_owned(),
        }),
        other => Err(FrameError::UnknownTag(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields_of(data: &DataFrame) -> DataFields<'_> {
        DataFields {
            seq: data.seq,
            kind: data.kind,
            channel: &data.channel,
            priority: data.priority,
            created_unix_ms: data.created_unix_ms,
            attempt: data.attempt,
            options: data.options.as_deref(),
        }
    }

    /// A run on one channel sends its header once; whatever breaks the run (another channel,
    /// kind, priority or attempt, options, a gap in seq, an earlier clock, a volatile frame)
    /// goes in full; the receiver's context rebuilds every frame as it was.
    #[test]
    fn a_run_of_data_frames_sends_its_header_once() {
        let encoder = FrameEncoder::new(Limits::default());
        let decoder = FrameDecoder::new(Limits::default());
        let plain = |seq: u64, channel: &str, created: u64| DataFrame {
            seq,
            kind: Kind::Command,
            channel: channel.into(),
            priority: Priority::NORMAL,
            created_unix_ms: created,
            attempt: 1,
            options: None,
            body: Bytes::from(format!("body {seq}")),
        };
        let mut frames = vec![
            plain(1, "orders", 1_000),
            plain(2, "orders", 1_000),
            plain(3, "orders", 1_007),
            plain(4, "billing", 1_007),
            plain(5, "billing", 1_003),
            plain(7, "billing", 1_003),
            plain(0, "billing", 1_003),
            plain(8, "billing", 1_003),
            plain(9, "billing", 1_004),
        ];
        let mut with_options = plain(10, "billing", 1_004);
        with_options.options = sample_data(b"").options;
        frames.push(with_options);
        frames.push(plain(11, "billing", 1_004));
        let mut retried = plain(12, "billing", 1_004);
        retried.attempt = 2;
        frames.push(retried);
        let mut urgent = plain(13, "billing", 1_004);
        urgent.priority = Priority::HIGH;
        frames.push(urgent);
        let mut event = plain(14, "billing", 1_004);
        event.kind = Kind::Event;
        frames.push(event);
        frames.push(plain(15, "billing", 1_004));

        let mut sent = DataContext::new();
        let mut sizes = Vec::new();
        let mut wire = BytesMut::new();
        for frame in &frames {
            let before = wire.len();
            encoder
                .data_in(&mut sent, &mut wire, &fields_of(frame), &frame.body)
                .unwrap();
            sizes.push(wire.len() - before - frame.body.len());
        }
        let continued: Vec<u64> = frames
            .iter()
            .zip(&sizes)
            .filter(|(_, &size)| size <= LENGTH_PREFIX_BYTES + 2)
            .map(|(frame, _)| frame.seq)
            .collect();
        // 2 and 3 continue 1; 9 continues 8; 11 the frame with options (whose other fields it
        // shares); 15, a command after an event, does not.
        assert_eq!(continued, vec![2, 3, 9, 11]);

        // Fed to the receiver in pieces of every size: the same frames come out.
        for piece in [1, 3, 7, 64, wire.len()] {
            let mut received = DataContext::new();
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            for chunk in wire.chunks(piece) {
                buf.extend_from_slice(chunk);
                while let Some(frame) = decoder.decode_in(&mut received, &mut buf).unwrap() {
                    decoded.push(frame);
                }
            }
            let expected: Vec<Frame> = frames.iter().cloned().map(Frame::Data).collect();
            assert_eq!(decoded, expected, "pieces of {piece}");
        }
    }

    /// A continuation on a stream that has no data frame before it, or that continues a
    /// volatile frame, is a typed error, never a panic or a made-up message.
    #[test]
    fn a_continuation_without_its_frame_is_malformed() {
        let encoder = FrameEncoder::new(Limits::default());
        let decoder = FrameDecoder::new(Limits::default());
        let first = DataFrame {
            seq: 1,
            kind: Kind::Command,
            channel: "c".into(),
            priority: Priority::NORMAL,
            created_unix_ms: 5,
            attempt: 1,
            options: None,
            body: Bytes::from_static(b"a"),
        };
        let second = DataFrame {
            seq: 2,
            ..first.clone()
        };
        let mut sent = DataContext::new();
        let mut wire = BytesMut::new();
        for frame in [&first, &second] {
            encoder
                .data_in(&mut sent, &mut wire, &fields_of(frame), &frame.body)
                .unwrap();
        }
        let mut alone = wire.split_off(wire.len() - (LENGTH_PREFIX_BYTES + 2 + 1));
        assert!(matches!(
            decoder.decode_in(&mut DataContext::new(), &mut alone.clone()),
            Err(FrameError::Malformed {
                frame: "data-next",
                ..
            })
        ));
        assert!(matches!(
            decoder.decode(&mut alone),
            Err(FrameError::Malformed {
                frame: "data-next",
                ..
            })
        ));
        // After a volatile frame (seq 0), nothing continues.
        let mut received = DataContext::new();
        received.remember(&DataFields {
            seq: 0,
            ..fields_of(&first)
        });
        let mut next = BytesMut::new();
        next.extend_from_slice(&3u32.to_le_bytes());
        next.extend_from_slice(&[TAG_DATA_NEXT, 0, b'x']);
        assert!(decoder.decode_in(&mut received, &mut next).is_err());
        // A truncated creation time.
        let mut cut = BytesMut::new();
        cut.extend_from_slice(&2u32.to_le_bytes());
        cut.extend_from_slice(&[TAG_DATA_NEXT, 0x80]);
        let mut received = DataContext::new();
        received.remember(&fields_of(&first));
        assert!(decoder.decode_in(&mut received, &mut cut).is_err());
    }

    fn sample_data(body: &[u8]) -> DataFrame {
        DataFrame {
            seq: 42,
            kind: Kind::Command,
            channel: "points/grant".into(),
            priority: Priority::HIGH,
            created_unix_ms: 1_700_000_000_000,
            attempt: 2,
            options: Some(Box::new(Options {
                correlation_id: Some(9),
                reply_to: Some(NodeId::from_bytes([3; 32])),
                shard_key: Some(Bytes::from_static(b"acct-1")),
                expires_unix_ms: None,
                headers: vec![("trace".into(), Bytes::from_static(b"abc"))],
            })),
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
            incarnation: 1_790_000_000_000,
            proof: Some([9; 32]),
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

    /// A serde twin of the data fields, to check the hand-written codec against postcard.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Twin {
        seq: u64,
        kind: Kind,
        channel: String,
        correlation_id: Option<u64>,
        reply_to: Option<NodeId>,
        shard_key: Option<Vec<u8>>,
        priority: Priority,
        created_unix_ms: u64,
        expires_unix_ms: Option<u64>,
        attempt: u32,
        headers: Vec<(String, Vec<u8>)>,
    }

    #[test]
    fn hand_written_data_codec_is_postcard() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let kinds = [
            Kind::Event,
            Kind::Command,
            Kind::Document,
            Kind::Request,
            Kind::Reply,
        ];
        for round in 0..2_000u64 {
            let big = |v: u64, round: u64| if round.is_multiple_of(3) { v } else { v % 300 };
            let twin = Twin {
                seq: big(next(), round),
                kind: kinds[(next() % 5) as usize],
                channel: "c".repeat((next() % 200) as usize),
                correlation_id: (next() % 2 == 0).then(|| big(next(), round + 1)),
                reply_to: (next() % 2 == 0).then(|| NodeId::from_bytes([round as u8; 32])),
                shard_key: (next() % 2 == 0).then(|| vec![7u8; (next() % 40) as usize]),
                priority: Priority((next() % 256) as u8),
                created_unix_ms: big(next(), round + 2),
                expires_unix_ms: (next() % 2 == 0).then(&mut next),
                attempt: next() as u32,
                headers: (0..next() % 4)
                    .map(|i| (format!("k{i}"), vec![i as u8; (next() % 300) as usize]))
                    .collect(),
            };
            let body = vec![round as u8; (next() % 100) as usize];
            let headers: Vec<(String, Bytes)> = twin
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), Bytes::copy_from_slice(v)))
                .collect();
            let options = Options {
                correlation_id: twin.correlation_id,
                reply_to: twin.reply_to,
                shard_key: twin.shard_key.clone().map(Bytes::from),
                expires_unix_ms: twin.expires_unix_ms,
                headers: headers.clone(),
            };
            let fields = DataFields {
                seq: twin.seq,
                kind: twin.kind,
                channel: &twin.channel,
                priority: twin.priority,
                created_unix_ms: twin.created_unix_ms,
                attempt: twin.attempt,
                options: (!options.is_empty()).then_some(&options),
            };
            let mut ours = BytesMut::new();
            FrameEncoder::new(Limits::default())
                .data(&mut ours, &fields, &body)
                .unwrap();
            let theirs = postcard::to_allocvec(&twin).unwrap();
            assert_eq!(&ours[5..5 + theirs.len()], &theirs[..], "round {round}");
            assert_eq!(&ours[5 + theirs.len()..], &body[..]);
            // And postcard's bytes decode through the hand-written decoder.
            let mut wire = BytesMut::new();
            wire.put_u32_le((1 + theirs.len() + body.len()) as u32);
            wire.put_u8(TAG_DATA);
            wire.put_slice(&theirs);
            wire.put_slice(&body);
            let Some(Frame::Data(decoded)) = FrameDecoder::new(Limits::default())
                .decode(&mut wire)
                .unwrap()
            else {
                panic!("round {round}: not a data frame");
            };
            assert_eq!(decoded.seq, twin.seq);
            assert_eq!(decoded.channel, twin.channel);
            assert_eq!(decoded.created_unix_ms, twin.created_unix_ms);
            assert_eq!(decoded.attempt, twin.attempt);
            assert_eq!(
                decoded.options.as_deref(),
                (!options.is_empty()).then_some(&options)
            );
            assert_eq!(&decoded.body[..], &body[..]);
        }
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
