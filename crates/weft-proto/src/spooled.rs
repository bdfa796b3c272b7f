//! What a node keeps in its spool: the payloads of spool records (the spool crate treats them as
//! opaque bytes; this module is their format).
//!
//! Several kinds of entry share one spool, so one group-commit fsync makes them durable together:
//! - **Outgoing messages** not yet acknowledged: destination, the stream epoch and sequence number
//!   the message has on the wire (so that after a restart it is sent again under the *same*
//!   message id, and a receiver that already has it drops it), and the message itself.
//! - **Inbound watermarks**: per producer, the highest sequence number of its stream that this
//!   node has delivered; persisted before the acknowledgement goes out, so a receiver that crashes
//!   and restarts still recognises what it already delivered.
//! - **The durable subscription registry**: the durable subscriptions of peers this node
//!   publishes to (see [`crate::interest`]), one entry holding all of it; each new one retires
//!   the one before, so a publisher keeps addressing an absent durable subscriber across its
//!   own restart.
//! - **Scheduled messages** (a deliver-after time, see [`crate::schedule`]): written at send time
//!   *unnumbered* (seq 0) with their due time; when due, the node appends a *numbered* copy that
//!   names the unnumbered record it replaces (`origin`, that record's spool seq) and retires the
//!   original. Recovery retires an unnumbered record whose numbered copy exists, so a crash
//!   between the two writes neither loses the message nor sends it under two ids.
//! - **Idempotency keys** a node handed to its application (see [`crate::idempotency`]), one
//!   record each, written before the message can be acknowledged and retired once the key
//!   leaves the window.
//!
//! ```text
//! version:u8 = 1 | tag:u8 = 1 (message)   | dest:[u8;32] | epoch:u64-le | data frame (see frame)
//! version:u8 = 1 | tag:u8 = 2 (watermark) | peer:[u8;32] | epoch:u64-le | up_to:u64-le
//! version:u8 = 1 | tag:u8 = 3 (registry)  | zeros:[u8;32] | 0:u64-le   | InterestTable::registry_encode
//! version:u8 = 1 | tag:u8 = 4 (scheduled) | dest:[u8;32] | epoch:u64-le | due_unix_ms:u64-le
//!                | origin:u64-le | data frame
//! version:u8 = 1 | tag:u8 = 5 (copy)      | dest:[u8;32] | epoch:u64-le | origin:u64-le | data frame
//! version:u8 = 1 | tag:u8 = 6 (lane)      | lane:u8 | a message (1, 5) or watermark (2) entry
//! version:u8 = 1 | tag:u8 = 7 (key)       | producer:[u8;32] | at_unix_ms:u64-le
//!                | stream:u64-le | seq:u64-le | key bytes   (the first message with the key)
//! ```
//! A numbered message or a watermark of the high or bulk [`Lane`] is wrapped in a lane entry;
//! those of the normal lane are written as before lanes existed, so older spools read as the
//! normal lane (which is where their messages were numbered). An unnumbered message takes the
//! lane of its priority when it is numbered.
//! The message part is exactly a wire data frame (length prefix included) with `attempt = 0`, so
//! the one codec that is tested against postcard byte for byte serves both.
//!
//! Compatibility: tags 3, 4, 5, 6 and 7 were added without changing the version, so every record an
//! older build wrote still decodes unchanged. An older build reading a spool with a registry,
//! scheduled, copy or key record dead-letters that record (unknown tag; `weft spool replay` of a newer build
//! sends a scheduled one again, at once), and reads everything else.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::{DataFields, EncodeError, Frame, FrameDecoder, FrameEncoder, Limits};
use crate::id::{MessageId, NodeId, NODE_ID_LEN};
use crate::link::OutgoingMessage;
use crate::message::Lane;

/// Version of the payload format (the first byte of every entry).
pub const FORMAT_VERSION: u8 = 1;
const TAG_MESSAGE: u8 = 1;
const TAG_WATERMARK: u8 = 2;
const TAG_REGISTRY: u8 = 3;
const TAG_SCHEDULED: u8 = 4;
/// A numbered copy of an unnumbered (replayed) or renumbered message: names its origin.
const TAG_COPY: u8 = 5;
/// Wraps an entry of a lane other than the normal one.
const TAG_LANE: u8 = 6;
/// An idempotency key handed on.
const TAG_KEY: u8 = 7;
/// The copy entry's field after the common prefix: its origin.
const COPY_BYTES: usize = 8;
const PREFIX_BYTES: usize = 2 + NODE_ID_LEN + 8;
/// The scheduled entry's fields after the common prefix: due time and origin.
const SCHEDULED_BYTES: usize = 16;

/// An outgoing message as spooled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledMessage {
    /// The node it is for.
    pub dest: NodeId,
    /// Epoch of the outbound stream it was assigned to.
    pub epoch: u64,
    /// Its sequence number in that stream (0: not numbered yet — a replayed dead letter, or a
    /// scheduled message not yet due).
    pub seq: u64,
    /// The message (its `deliver_after` is set for a scheduled entry).
    pub message: OutgoingMessage,
    /// For a numbered copy (of a scheduled message at its release, of a replayed dead letter or
    /// a renumbered message at recovery): the spool seq of the record it replaces (0 otherwise).
    pub origin: u64,
    /// The lane it was numbered in (an unnumbered message: [`Lane::Normal`]; it takes the lane
    /// of its priority when numbered).
    pub lane: Lane,
}

impl SpooledMessage {
    /// Whether this is a scheduled message not yet numbered (it waits for its due time).
    pub fn is_waiting(&self) -> bool {
        self.seq == 0 && self.message.deliver_after.is_some()
    }
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
    /// The lane of the stream.
    pub lane: Lane,
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
    /// An idempotency key handed to the application.
    Key(SpooledKey),
}

/// A persisted idempotency key (see [`crate::idempotency`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledKey {
    /// The first message with the key (its producer gave the key).
    pub id: MessageId,
    /// The key.
    pub key: Bytes,
    /// When its first message was handed on (wall clock, Unix milliseconds).
    pub at_unix_ms: u64,
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
    /// A lane entry names no lane this build knows, or wraps something other than a message
    /// or a watermark.
    #[error("spool lane entry is not valid: {0}")]
    Lane(String),
}

/// Appends the entry for an outgoing message to `out`. A message with a due time
/// (`deliver_after`) is written as a scheduled entry: unnumbered (`seq` 0, `origin` 0) when it is
/// sent, numbered (with `origin`) when it becomes due; other messages ignore `origin`.
pub fn encode_message(
    dest: &NodeId,
    epoch: u64,
    seq: u64,
    message: &OutgoingMessage,
    limits: Limits,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode_scheduled(dest, Lane::Normal, epoch, seq, 0, message, limits, out)
}

/// Like [`encode_message`], in `lane` (ignored for an unnumbered message), with the origin of a
/// numbered copy (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn encode_scheduled(
    dest: &NodeId,
    lane: Lane,
    epoch: u64,
    seq: u64,
    origin: u64,
    message: &OutgoingMessage,
    limits: Limits,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    out.reserve(3 + PREFIX_BYTES + SCHEDULED_BYTES);
    if seq != 0 {
        lane_prefix(lane, out);
    }
    out.put_u8(FORMAT_VERSION);
    let due = message.deliver_after_unix_ms();
    out.put_u8(match (due, origin) {
        (Some(_), _) => TAG_SCHEDULED,
        (None, 0) => TAG_MESSAGE,
        (None, _) => TAG_COPY,
    });
    out.put_slice(dest.as_bytes());
    out.put_u64_le(epoch);
    if let Some(due) = due {
        out.put_u64_le(due);
        out.put_u64_le(origin);
    } else if origin != 0 {
        out.put_u64_le(origin);
    }
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
    out.reserve(3 + PREFIX_BYTES + 8);
    lane_prefix(watermark.lane, out);
    out.put_u8(FORMAT_VERSION);
    out.put_u8(TAG_WATERMARK);
    out.put_slice(watermark.peer.as_bytes());
    out.put_u64_le(watermark.epoch);
    out.put_u64_le(watermark.up_to);
}

/// The lane entry's prefix, for a lane other than the normal one.
fn lane_prefix(lane: Lane, out: &mut BytesMut) {
    if lane != Lane::Normal {
        out.put_u8(FORMAT_VERSION);
        out.put_u8(TAG_LANE);
        out.put_u8(lane.index() as u8);
    }
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

/// Appends the entry for an idempotency key handed on.
pub fn encode_key(key: &SpooledKey, out: &mut BytesMut) {
    out.reserve(PREFIX_BYTES + 16 + key.key.len());
    out.put_u8(FORMAT_VERSION);
    out.put_u8(TAG_KEY);
    out.put_slice(key.id.producer.as_bytes());
    out.put_u64_le(key.at_unix_ms);
    out.put_u64_le(key.id.stream.0);
    out.put_u64_le(key.id.seq);
    out.put_slice(&key.key);
}

/// Decodes one entry. The body of a message shares `payload`'s buffer.
pub fn decode(mut payload: Bytes, limits: Limits) -> Result<SpoolEntry, EntryError> {
    if payload.len() >= 3 && payload[0] == FORMAT_VERSION && payload[1] == TAG_LANE {
        let lane = Lane::from_index(payload[2] as usize)
            .filter(|lane| *lane != Lane::Normal)
            .ok_or_else(|| EntryError::Lane(format!("unknown lane {}", payload[2])))?;
        payload.advance(3);
        if payload.get(1) == Some(&TAG_LANE) {
            return Err(EntryError::Lane("a lane entry inside a lane entry".into()));
        }
        return match decode(payload, limits)? {
            SpoolEntry::Message(m) if m.seq == 0 => {
                Err(EntryError::Lane("an unnumbered message has no lane".into()))
            }
            SpoolEntry::Message(m) => Ok(SpoolEntry::Message(SpooledMessage { lane, ..m })),
            SpoolEntry::Watermark(w) => Ok(SpoolEntry::Watermark(Watermark { lane, ..w })),
            SpoolEntry::Registry(_) => Err(EntryError::Lane("a registry has no lane".into())),
            SpoolEntry::Key(_) => Err(EntryError::Lane("a key has no lane".into())),
        };
    }
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
                lane: Lane::Normal,
            }))
        }
        TAG_MESSAGE | TAG_SCHEDULED | TAG_COPY => {
            let (due, origin) = if tag == TAG_COPY {
                if payload.len() < COPY_BYTES {
                    return Err(EntryError::Short(PREFIX_BYTES + payload.len()));
                }
                (None, payload.get_u64_le())
            } else if tag == TAG_SCHEDULED {
                if payload.len() < SCHEDULED_BYTES {
                    return Err(EntryError::Short(PREFIX_BYTES + payload.len()));
                }
                let due = payload.get_u64_le();
                let origin = payload.get_u64_le();
                match std::num::NonZeroU64::new(due) {
                    Some(due) => (Some(due), origin),
                    None => return Err(EntryError::Message("scheduled with due time 0".into())),
                }
            } else {
                (None, 0)
            };
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
                    deliver_after: due,
                },
                origin,
                lane: Lane::Normal,
            }))
        }
        TAG_REGISTRY => Ok(SpoolEntry::Registry(payload)),
        TAG_KEY => {
            if payload.len() < 16 {
                return Err(EntryError::Short(PREFIX_BYTES + payload.len()));
            }
            let stream = crate::id::StreamId(payload.get_u64_le());
            let seq = payload.get_u64_le();
            if payload.is_empty() || payload.len() > crate::message::IDEMPOTENCY_KEY_RECEIVED_MAX {
                return Err(EntryError::Message(format!(
                    "an idempotency key of {} bytes",
                    payload.len()
                )));
            }
            Ok(SpoolEntry::Key(SpooledKey {
                id: MessageId {
                    producer: node,
                    stream,
                    seq,
                },
                key: payload,
                at_unix_ms: epoch,
            }))
        }
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
                origin: 0,
                lane: Lane::Normal,
            })
        );
    }

    #[test]
    fn scheduled_messages_round_trip_with_due_time_and_origin() {
        let dest = NodeId::from_bytes([4; 32]);
        let delayed = message().with_deliver_after(1_900_000);
        // Unnumbered, as written at send time.
        let mut out = BytesMut::new();
        encode_message(&dest, 0, 0, &delayed, Limits::default(), &mut out).unwrap();
        assert_eq!(out[1], TAG_SCHEDULED);
        let entry = decode(out.freeze(), Limits::default()).unwrap();
        let SpoolEntry::Message(unnumbered) = entry else {
            panic!("not a message: {entry:?}")
        };
        assert!(unnumbered.is_waiting());
        assert_eq!(unnumbered.message.deliver_after_unix_ms(), Some(1_900_000));
        assert_eq!(unnumbered.message, delayed);
        // Numbered when due, naming the record it replaces.
        let mut out = BytesMut::new();
        encode_scheduled(
            &dest,
            Lane::Normal,
            8,
            3,
            41,
            &delayed,
            Limits::default(),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            decode(out.freeze(), Limits::default()),
            Ok(SpoolEntry::Message(SpooledMessage {
                dest,
                epoch: 8,
                seq: 3,
                message: delayed.clone(),
                origin: 41,
                lane: Lane::Normal,
            }))
        );
        // Truncations and a zero due time are typed errors.
        let mut out = BytesMut::new();
        encode_scheduled(
            &dest,
            Lane::Normal,
            8,
            3,
            41,
            &delayed,
            Limits::default(),
            &mut out,
        )
        .unwrap();
        let full = out.freeze();
        for cut in 0..full.len() {
            assert!(
                decode(full.slice(..cut), Limits::default()).is_err(),
                "cut {cut}"
            );
        }
        let mut zero_due = full.to_vec();
        zero_due[PREFIX_BYTES..PREFIX_BYTES + 8].fill(0);
        assert!(matches!(
            decode(Bytes::from(zero_due), Limits::default()),
            Err(EntryError::Message(_))
        ));
    }

    #[test]
    fn a_numbered_copy_round_trips_with_its_origin() {
        let dest = NodeId::from_bytes([3; 32]);
        let mut out = BytesMut::new();
        encode_scheduled(
            &dest,
            Lane::Normal,
            8,
            3,
            41,
            &message(),
            Limits::default(),
            &mut out,
        )
        .unwrap();
        assert_eq!(out[1], TAG_COPY);
        let full = out.freeze();
        assert_eq!(
            decode(full.clone(), Limits::default()),
            Ok(SpoolEntry::Message(SpooledMessage {
                dest,
                epoch: 8,
                seq: 3,
                message: message(),
                origin: 41,
                lane: Lane::Normal,
            }))
        );
        for cut in 0..full.len() {
            assert!(
                decode(full.slice(..cut), Limits::default()).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn a_record_of_the_format_before_scheduling_still_decodes() {
        // Bytes as the build before deliver-after wrote them (tag 1, no due time), spelled out.
        let mut old = vec![FORMAT_VERSION, TAG_MESSAGE];
        old.extend_from_slice(&[9; 32]);
        old.extend_from_slice(&5u64.to_le_bytes());
        let mut frame = BytesMut::new();
        let message = message();
        let fields = DataFields {
            seq: 2,
            kind: message.kind,
            channel: &message.channel,
            priority: message.priority,
            created_unix_ms: message.created_unix_ms,
            attempt: 0,
            options: message.options.as_deref(),
        };
        FrameEncoder::new(Limits::default())
            .data(&mut frame, &fields, &message.body)
            .unwrap();
        old.extend_from_slice(&frame);
        let entry = decode(Bytes::from(old.clone()), Limits::default()).unwrap();
        let SpoolEntry::Message(decoded) = entry else {
            panic!("not a message")
        };
        assert_eq!((decoded.epoch, decoded.seq, decoded.origin), (5, 2, 0));
        assert_eq!(decoded.message, message);
        // And today's encoder writes an undelayed message byte for byte the same way.
        let mut out = BytesMut::new();
        encode_message(
            &NodeId::from_bytes([9; 32]),
            5,
            2,
            &message,
            Limits::default(),
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], &old[..]);
    }

    #[test]
    fn watermark_round_trips() {
        let watermark = Watermark {
            peer: NodeId::from_bytes([3; 32]),
            epoch: u64::MAX,
            up_to: 12,
            lane: Lane::Normal,
        };
        let mut out = BytesMut::new();
        encode_watermark(&watermark, &mut out);
        assert_eq!(
            decode(out.freeze(), Limits::default()),
            Ok(SpoolEntry::Watermark(watermark))
        );
    }

    #[test]
    fn entries_of_other_lanes_round_trip_and_normal_ones_are_written_as_before() {
        let dest = NodeId::from_bytes([5; 32]);
        for lane in Lane::ALL {
            for origin in [0, 41] {
                let mut out = BytesMut::new();
                encode_scheduled(
                    &dest,
                    lane,
                    8,
                    3,
                    origin,
                    &message(),
                    Limits::default(),
                    &mut out,
                )
                .unwrap();
                assert_eq!(out[1] == TAG_LANE, lane != Lane::Normal, "{lane}");
                let full = out.freeze();
                assert_eq!(
                    decode(full.clone(), Limits::default()),
                    Ok(SpoolEntry::Message(SpooledMessage {
                        dest,
                        epoch: 8,
                        seq: 3,
                        message: message(),
                        origin,
                        lane,
                    }))
                );
                for cut in 0..full.len() {
                    assert!(
                        decode(full.slice(..cut), Limits::default()).is_err(),
                        "{lane} cut {cut}"
                    );
                }
            }
            let watermark = Watermark {
                peer: dest,
                epoch: 2,
                up_to: 9,
                lane,
            };
            let mut out = BytesMut::new();
            encode_watermark(&watermark, &mut out);
            assert_eq!(
                decode(out.freeze(), Limits::default()),
                Ok(SpoolEntry::Watermark(watermark))
            );
        }
        // An unnumbered message has no lane (it takes its priority's when numbered).
        let mut out = BytesMut::new();
        encode_scheduled(
            &dest,
            Lane::High,
            0,
            0,
            0,
            &message().with_deliver_after(5),
            Limits::default(),
            &mut out,
        )
        .unwrap();
        assert_eq!(out[1], TAG_SCHEDULED);
        // Unknown lanes, nested lanes and a lane around a registry are typed errors.
        let mut registry = BytesMut::new();
        encode_registry(b"r", &mut registry);
        for bad in [
            vec![FORMAT_VERSION, TAG_LANE, 0],
            vec![FORMAT_VERSION, TAG_LANE, 3],
            vec![FORMAT_VERSION, TAG_LANE, 1, FORMAT_VERSION, TAG_LANE, 2],
            [&[FORMAT_VERSION, TAG_LANE, 1][..], &registry[..]].concat(),
        ] {
            assert!(
                matches!(
                    decode(Bytes::from(bad.clone()), Limits::default()),
                    Err(EntryError::Lane(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_idempotency_key_round_trips_and_a_bad_one_is_refused() {
        let key = SpooledKey {
            id: MessageId {
                producer: NodeId::from_bytes([9; 32]),
                stream: crate::id::StreamId(77),
                seq: 12,
            },
            key: Bytes::from_static(b"order-17"),
            at_unix_ms: 1_765_000_000_000,
        };
        let mut out = BytesMut::new();
        encode_key(&key, &mut out);
        assert_eq!(
            decode(out.clone().freeze(), Limits::default()),
            Ok(SpoolEntry::Key(key.clone()))
        );
        let empty = SpooledKey {
            key: Bytes::new(),
            ..key
        };
        let mut out = BytesMut::new();
        encode_key(&empty, &mut out);
        assert!(matches!(
            decode(out.freeze(), Limits::default()),
            Err(EntryError::Message(_))
        ));
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
        wrong_tag[1] = 8;
        assert_eq!(
            decode(Bytes::from(wrong_tag), Limits::default()),
            Err(EntryError::Tag(8))
        );
    }
}
