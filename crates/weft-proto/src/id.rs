//! Node and message identities.
//!
//! A [`NodeId`] is a node's Ed25519 public key: the TLS handshake proves it, so nothing else (an
//! mDNS record, a hello frame) is trusted to claim it. It prints as 52 lowercase base32 characters
//! (RFC 4648 alphabet, no padding) and parses back from the same text.
//!
//! A [`MessageId`] is `(producer, stream, seq)`: the producer assigns it once and keeps it across
//! retries, so a receiver recognises a retransmission. Because `seq` counts up without gaps inside a
//! stream, a receiver deduplicates with one watermark per stream instead of a set of seen ids: memory
//! is bounded by the number of live streams, not by traffic.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::message::Lane;

/// Length of a node id in bytes (an Ed25519 public key).
pub const NODE_ID_LEN: usize = 32;
/// Length of the printed form of a [`NodeId`].
pub const NODE_ID_TEXT_LEN: usize = 52;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A node's identity: its Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId([u8; NODE_ID_LEN]);

impl NodeId {
    /// Wraps the 32 bytes of an Ed25519 public key.
    pub const fn from_bytes(bytes: [u8; NODE_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw public key.
    pub const fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }

    /// The first 8 characters of the printed form, for logs and tables.
    pub fn short(&self) -> String {
        let mut text = self.to_string();
        text.truncate(8);
        text
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; NODE_ID_TEXT_LEN];
        let mut bits: u32 = 0;
        let mut bit_count = 0;
        let mut written = 0;
        for &byte in &self.0 {
            bits = (bits << 8) | u32::from(byte);
            bit_count += 8;
            while bit_count >= 5 {
                bit_count -= 5;
                out[written] = BASE32[((bits >> bit_count) & 31) as usize];
                written += 1;
            }
        }
        if bit_count > 0 {
            out[written] = BASE32[((bits << (5 - bit_count)) & 31) as usize];
            written += 1;
        }
        debug_assert_eq!(written, NODE_ID_TEXT_LEN);
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// Why a text is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseNodeIdError {
    /// The text is not 52 characters long.
    #[error("a node id is {NODE_ID_TEXT_LEN} base32 characters, got {0}")]
    Length(usize),
    /// A character outside `a-z2-7`.
    #[error("invalid character {0:?} in node id (expected a-z or 2-7)")]
    Character(char),
    /// The unused low bits of the last character are not zero.
    #[error("node id has non-zero padding bits (mistyped last character?)")]
    Padding,
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let count = text.chars().count();
        if count != NODE_ID_TEXT_LEN {
            return Err(ParseNodeIdError::Length(count));
        }
        let mut out = [0u8; NODE_ID_LEN];
        let mut bits: u32 = 0;
        let mut bit_count = 0;
        let mut written = 0;
        for c in text.chars() {
            let lower = c.to_ascii_lowercase();
            let value = match lower {
                'a'..='z' => lower as u32 - 'a' as u32,
                '2'..='7' => lower as u32 - '2' as u32 + 26,
                _ => return Err(ParseNodeIdError::Character(c)),
            };
            bits = (bits << 5) | value;
            bit_count += 5;
            if bit_count >= 8 {
                bit_count -= 8;
                out[written] = (bits >> bit_count) as u8;
                written += 1;
            }
        }
        if bits & ((1 << bit_count) - 1) != 0 {
            return Err(ParseNodeIdError::Padding);
        }
        Ok(Self(out))
    }
}

/// An ordered stream of messages from one producer. Sequence numbers count from 1 inside a stream.
///
/// A point-to-point stream is derived from (producer, receiver, epoch): a producer that restarts
/// without its spool starts a new epoch, so the receiver never mistakes its fresh sequence numbers
/// for duplicates of the old ones.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamId(pub u64);

impl StreamId {
    /// The stream of direct messages from `producer` to `receiver` in the producer's `epoch`.
    pub fn direct(producer: &NodeId, receiver: &NodeId, epoch: u64) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("weft 2026 direct stream id");
        hasher.update(producer.as_bytes());
        hasher.update(receiver.as_bytes());
        hasher.update(&epoch.to_le_bytes());
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        Self(u64::from_le_bytes(first))
    }

    /// The stream of direct messages in `lane` (see [`Lane`]): the normal lane's is
    /// [`StreamId::direct`], so ids of messages spooled before lanes existed stay valid.
    pub fn lane(producer: &NodeId, receiver: &NodeId, epoch: u64, lane: Lane) -> Self {
        if lane == Lane::Normal {
            return Self::direct(producer, receiver, epoch);
        }
        let mut hasher = blake3::Hasher::new_derive_key("weft 2026 lane stream id");
        hasher.update(producer.as_bytes());
        hasher.update(receiver.as_bytes());
        hasher.update(&epoch.to_le_bytes());
        hasher.update(&[lane.index() as u8]);
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        Self(u64::from_le_bytes(first))
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:016x})", self.0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The identity of one message, assigned by its producer and kept across every retry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId {
    /// The node that created the message.
    pub producer: NodeId,
    /// The producer's ordered stream the message belongs to.
    pub stream: StreamId,
    /// Position in the stream, from 1, without gaps.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.producer.short(), self.stream, self.seq)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_text_round_trips() {
        for seed in 0u8..=40 {
            let mut bytes = [0u8; 32];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = seed.wrapping_mul(31).wrapping_add(i as u8 * 7);
            }
            let id = NodeId::from_bytes(bytes);
            let text = id.to_string();
            assert_eq!(text.len(), NODE_ID_TEXT_LEN);
            assert_eq!(text.parse::<NodeId>().unwrap(), id);
            assert_eq!(text.to_uppercase().parse::<NodeId>().unwrap(), id);
        }
    }

    #[test]
    fn node_id_rejects_bad_text() {
        assert_eq!("abc".parse::<NodeId>(), Err(ParseNodeIdError::Length(3)));
        let bad = "1".repeat(NODE_ID_TEXT_LEN);
        assert_eq!(bad.parse::<NodeId>(), Err(ParseNodeIdError::Character('1')));
        // 52 * 5 = 260 bits: the last 4 bits must be zero; 'b' sets one of them.
        let padded = format!("{}b", "a".repeat(NODE_ID_TEXT_LEN - 1));
        assert_eq!(padded.parse::<NodeId>(), Err(ParseNodeIdError::Padding));
    }

    #[test]
    fn direct_streams_differ_by_direction_and_epoch() {
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        assert_ne!(StreamId::direct(&a, &b, 1), StreamId::direct(&b, &a, 1));
        assert_ne!(StreamId::direct(&a, &b, 1), StreamId::direct(&a, &b, 2));
        assert_eq!(StreamId::direct(&a, &b, 1), StreamId::direct(&a, &b, 1));
        assert_eq!(
            StreamId::lane(&a, &b, 1, Lane::Normal),
            StreamId::direct(&a, &b, 1)
        );
        let lanes: std::collections::HashSet<_> = Lane::ALL
            .iter()
            .map(|lane| StreamId::lane(&a, &b, 1, *lane))
            .collect();
        assert_eq!(lanes.len(), Lane::ALL.len(), "one stream per lane");
    }
}
