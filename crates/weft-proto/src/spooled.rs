//! What a node keeps in its spool: the payloads of spool records (the spool crate treats them as
//! opaque bytes; this module is their format).
//!
//! Two kinds of entry share one spool, so one group-commit fsync makes both durable:
//! - **Outgoing messages** not yet acknowledged: destination, the stream epoch and sequence number
//!   the message has on the wire (so that after a restart it is sent again under the *same*
//!   message id, and a receiver that already has it drops it), and the message itself.
//! - **Inbound watermarks**: per producer, the highest sequence number of its stream that this
//!   node has delivered; persisted before the acknowledgement goes out, so a receiver that crashes
//!   and restarts still recognises what it already delivered.
//!
//! - **The durable subscription registry**: the durable subscriptions of peers this node
//!   publishes to (see [`crate::interest`]), one entry holding all of it; each new one retires
//!   the one before, so a publisher keeps addressing an absent durable subscriber across its
//!   own restart.
//!
//! ```text
//! version:u8 = 1 | tag:u8 = 1 (message)   | dest:[u8;32] | epoch:u64-le | data frame (see frame)
//! version:u8 = 1 | tag:u8 = 2 (watermark) | peer:[u8;32] | epoch:u64-le | up_to:u64-le
//! version:u8 = 1 | tag:u8 = 3 (registry)  | zeros:[u8;32] | 0:u64-le   | InterestTable::registry_encode
//! ```
//! The message part is exactly a wire data frame (length prefix included) with `attempt = 0`, so
//! the one codec that is tested against postcard byte for byte serves both.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::{DataFields, EncodeError, Frame, FrameDecoder, FrameEncoder, Limits};
use crate::id::{NodeId, NODE_ID_LEN};
use crate::link::OutgoingMessage;

/// Version of the payload format (the first byte of every entry).
pub const FORMAT_VERSION: u8 = 1;
const TAG_MESSAGE: u8 = 1;
const TAG_WATERMARK: u8 = 2;
const TAG_REGISTRY: u8 = 3;
const PREFIX_BYTES: usize = 2 + NODE_ID_LEN + 8;

/// An outgoing message as spooled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledMessage {
    /// The node it is for.
    pub dest: NodeId,
    /// Epoch of the outbound stream it was assigned to.
    pub epoch: u64,
    /// Its sequence number in that stream.
    pub seq: u64,
    /// The message.
    pub message: OutgoingMessage,
}

/// A persisted inbound dedup watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermark {
    /// The producer.
    pub peer: NodeId,
    /// Epoch of the producer's stream to this node.
    pub epoch: u64,
    /// Every message of that stream up to here was delivered.
    pub up_to: u64,
}

/// One spool record's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpoolEntry {
    /// An outgoing message.
    Message(SpooledMessage),
    /// An inbound watermark.
    Watermark(Watermark),
    /// The durable subscription registry (`InterestTable::registry_encode`).
    Registry(Bytes),
}

/// Why a payload is not a valid entry (a spool written by another program or version, or damage
/// the spool's checksums cannot see).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// Shorter than its fixed part.
    #[error("spool entry of {0} bytes is too short")]
    Short(usize),
    /// Written by a format version this build does not read.
    #[error("spool entry format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    Version(u8),
    /// Unknown entry tag.
    #[error("unknown spool entry tag {0}")]
    Tag(u8),
    /// The message part does not decode.
    #[error("spooled message does not decode: {0}")]
    Message(String),
}

/// Appends the entry for an outgoing message to `out`.
pub fn encode_message(
    dest: &NodeId,
    epoch: u64,
    seq: u64,
    message: &OutgoingMessage,
    limits: Limits,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    out.reserve(PREFIX_BYTES);
    out.put_u8(FORMAT_VERSION);
    out.put_u8(TAG_MESSAGE);
    out.put_slice(dest.as_bytes());
    out.put_u64_le(epoch);
    let fields = DataFields {
        seq,
        kind: message.kind,
        channel: &message.channel,
        priority: message.priority,
        created_unix_ms: message.created_unix_ms,
        attempt: 0,
        options: message.options.as_deref(),
    };
    FrameEncoder::new(limits).data(out, &fields, &message.body)
}

/// Appends the entry for an inbound watermark to `out`.
pub fn encode_watermark(watermark: &Watermark, out: &mut BytesMut) {
    out.reserve(PREFIX_BYTES + 8);
    out.put_u8(FORMAT_VERSION);
    out.put_u8(TAG_WATERMARK);
    out.put_slice(watermark.peer.as_bytes());
    out.put_u64_le(watermark.epoch);
    out.put_u64_le(watermark.up_to);
}

/// Appends the entry for the durable subscription registry to `out`.
pub fn encode_registry(registry: &[u8], out: &mut BytesMut) {
    out.reserve(PREFIX_BYTES + registry.len());
    out.put_u8(FORMAT_VERSION);
    out.put_u8(TAG_REGISTRY);
    out.put_slice(&[0; NODE_ID_LEN]);
    out.put_u64_le(0);
    out.put_slice(registry);
}

/// Decodes one entry. The body of a message shares `payload`'s buffer.
pub fn decode(mut payload: Bytes, limits: Limits) -> Result<SpoolEntry, EntryError> {
    if payload.len() < PREFIX_BYTES {
        return Err(EntryError::Short(payload.len()));
    }
    let version = payload.get_u8();
    if version != FORMAT_VERSION {
        return Err(EntryError::Version(version));
    }
    let tag = payload.get_u8();
    let mut id = [0u8; NODE_ID_LEN];
    payload.copy_to_slice(&mut id);
    let node = NodeId::from_bytes(id);
    let epoch = payload.get_u64_le();
    match tag {
        TAG_WATERMARK => {
            if payload.len() != 8 {
                return Err(EntryError::Short(PREFIX_BYTES + payload.len()));
            }
            Ok(SpoolEntry::Watermark(Watermark {
                peer: node,
                epoch,
                up_to: payload.get_u64_le(),
            }))
        }
        TAG_MESSAGE => {
            let frame = FrameDecoder::new(limits)
                .decode_bytes(&mut payload)
                .map_err(|e| EntryError::Message(e.to_string()))?;
            let data = match frame {
                Some(Frame::Data(data)) if payload.is_empty() => data,
                Some(Frame::Data(_)) => {
                    return Err(EntryError::Message(format!(
                        "{} trailing bytes",
                        payload.len()
                    )))
                }
                Some(_) => return Err(EntryError::Message("not a data frame".into())),
                None => return Err(EntryError::Message("truncated".into())),
            };
            Ok(SpoolEntry::Message(SpooledMessage {
                dest: node,
                epoch,
                seq: data.seq,
                message: OutgoingMessage {
                    kind: data.kind,
                    channel: data.channel,
                    priority: data.priority,
                    created_unix_ms: data.created_unix_ms,
                    options: data.options,
                    body: data.body,
                },
            }))
        }
        TAG_REGISTRY => Ok(SpoolEntry::Registry(payload)),
        other => Err(EntryError::Tag(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Kind, Priority};

    fn message() -> OutgoingMessage {
        OutgoingMessage::command("orders/created", Bytes::from_static(b"order 7"), 1_700_000)
            .with_kind(Kind::Event)
            .with_priority(Priority::HIGH)
            .with_expiry(1_800_000)
            .with_header("trace", Bytes::from_static(b"abc"))
    }

    #[test]
    fn message_round_trips() {
        let dest = NodeId::from_bytes([9; 32]);
        let mut out = BytesMut::new();
        encode_message(&dest, 77, 5, &message(), Limits::default(), &mut out).unwrap();
        let entry = decode(out.freeze(), Limits::default()).unwrap();
        assert_eq!(
            entry,
            SpoolEntry::Message(SpooledMessage {
                dest,
                epoch: 77,
                seq: 5,
                message: message(),
            })
        );
    }

    #[test]
    fn watermark_round_trips() {
        let watermark = Watermark {
            peer: NodeId::from_bytes([3; 32]),
            epoch: u64::MAX,
            up_to: 12,
        };
        let mut out = BytesMut::new();
        encode_watermark(&watermark, &mut out);
        assert_eq!(
            decode(out.freeze(), Limits::default()),
            Ok(SpoolEntry::Watermark(watermark))
        );
    }

    #[test]
    fn registry_round_trips() {
        let mut out = BytesMut::new();
        encode_registry(b"registry bytes", &mut out);
        assert_eq!(
            decode(out.freeze(), Limits::default()),
            Ok(SpoolEntry::Registry(Bytes::from_static(b"registry bytes")))
        );
    }

    #[test]
    fn damaged_entries_are_typed_errors() {
        let dest = NodeId::from_bytes([9; 32]);
        let mut out = BytesMut::new();
        encode_message(&dest, 1, 1, &message(), Limits::default(), &mut out).unwrap();
        let full = out.freeze();
        // Every truncation and every single-byte change decodes to an error or a value, never a panic.
        for cut in 0..full.len() {
            assert!(
                decode(full.slice(..cut), Limits::default()).is_err(),
                "cut {cut}"
            );
        }
        for at in 0..full.len() {
            let mut bytes = full.to_vec();
            bytes[at] ^= 0x5a;
            let _ = decode(Bytes::from(bytes), Limits::default());
        }
        let mut wrong_version = full.to_vec();
        wrong_version[0] = 9;
        assert_eq!(
            decode(Bytes::from(wrong_version), Limits::default()),
            Err(EntryError::Version(9))
        );
        let mut wrong_tag = full.to_vec();
        wrong_tag[1] = 7;
        assert_eq!(
            decode(Bytes::from(wrong_tag), Limits::default()),
            Err(EntryError::Tag(7))
        );
    }
}
