//! The message: a header the mesh reads and a body it never looks into.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::{MessageId, NodeId};

/// What a message is for; decides which guarantees and which handling it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Kind {
    /// Something happened (pub/sub).
    Event,
    /// Do something (point-to-point, acknowledged).
    Command,
    /// A piece of state handed over.
    Document,
    /// Asks for a [`Kind::Reply`].
    Request,
    /// Answers a [`Kind::Request`], matched by correlation id.
    Reply,
}

/// Delivery priority: higher goes first where a queue can choose. `Priority::NORMAL` is the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Priority(pub u8);

impl Priority {
    /// Bulk traffic.
    pub const LOW: Self = Self(0);
    /// The default.
    pub const NORMAL: Self = Self(4);
    /// Control-like traffic.
    pub const HIGH: Self = Self(7);
}

impl Default for Priority {
    fn default() -> Self {
        Self::NORMAL
    }
}

impl Priority {
    /// The lane a message of this priority travels in: above [`Priority::NORMAL`] the high lane,
    /// below it the bulk lane.
    pub fn lane(self) -> Lane {
        match self.0.cmp(&Self::NORMAL.0) {
            std::cmp::Ordering::Greater => Lane::High,
            std::cmp::Ordering::Equal => Lane::Normal,
            std::cmp::Ordering::Less => Lane::Bulk,
        }
    }
}

/// One of the three ordered streams between two nodes. Each lane is numbered, acknowledged,
/// spooled and deduplicated on its own and travels on its own QUIC stream, which the sender's
/// QUIC scheduler serves by lane: a high-priority message never waits behind queued bulk bytes,
/// and a receiver whose application is slow to take bulk messages still reads the high lane.
/// Order is FIFO per (sender, receiver, lane); messages in different lanes may overtake each
/// other. Everything the mesh sends for its patterns travels in the normal lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Lane {
    /// [`Priority::NORMAL`]: the lane of the hello exchange and of the patterns.
    Normal,
    /// Priorities above normal.
    High,
    /// Priorities below normal.
    Bulk,
}

impl Lane {
    /// Every lane, in the order of [`Lane::index`].
    pub const ALL: [Lane; 3] = [Lane::Normal, Lane::High, Lane::Bulk];

    /// Its position in [`Lane::ALL`] (also its byte on the wire and in the spool).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The lane with this [`Lane::index`], if any.
    pub fn from_index(index: usize) -> Option<Self> {
        Self::ALL.get(index).copied()
    }

    /// The QUIC send priority of its stream (quinn serves higher first).
    pub fn stream_priority(self) -> i32 {
        match self {
            Lane::High => 1,
            Lane::Normal => 0,
            Lane::Bulk => -1,
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lane::Normal => "normal",
            Lane::High => "high",
            Lane::Bulk => "bulk",
        })
    }
}

/// The header fields most messages leave empty. Boxed behind an `Option` in [`Header`] and
/// [`crate::OutgoingMessage`], so the common message stays small: a message is moved several
/// times between the API, the link queue and the application, and every byte of it counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Links a reply to its request.
    pub correlation_id: Option<u64>,
    /// Where replies go.
    pub reply_to: Option<NodeId>,
    /// Routes the message to the one worker that owns this key (sharded channels).
    pub shard_key: Option<Bytes>,
    /// After this wall-clock time (Unix milliseconds) the message is no longer worth delivering.
    pub expires_unix_ms: Option<u64>,
    /// Application key/value headers, passed through untouched.
    pub headers: Vec<(String, Bytes)>,
}

impl Options {
    /// Whether every field is empty (such options are not boxed at all).
    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none()
            && self.reply_to.is_none()
            && self.shard_key.is_none()
            && self.expires_unix_ms.is_none()
            && self.headers.is_empty()
    }
}

/// Everything about a message except its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Assigned by the producer, kept across retries: the deduplication key.
    pub id: MessageId,
    /// What the message is for.
    pub kind: Kind,
    /// The channel (point-to-point) or topic (pub/sub) it is addressed to.
    pub channel: crate::Channel,
    /// Higher goes first where a queue can choose.
    pub priority: Priority,
    /// Wall-clock creation time, milliseconds since the Unix epoch (producer's clock).
    pub created_unix_ms: u64,
    /// 1 for the first transmission, counting up with every retransmission.
    pub attempt: u32,
    /// The rarely used fields, if any is set.
    pub options: Option<Box<Options>>,
}

impl Header {
    /// Links a reply to its request.
    pub fn correlation_id(&self) -> Option<u64> {
        self.options.as_ref().and_then(|o| o.correlation_id)
    }

    /// Where replies go.
    pub fn reply_to(&self) -> Option<NodeId> {
        self.options.as_ref().and_then(|o| o.reply_to)
    }

    /// The shard routing key.
    pub fn shard_key(&self) -> Option<&Bytes> {
        self.options.as_ref().and_then(|o| o.shard_key.as_ref())
    }

    /// Wall-clock expiry, Unix milliseconds.
    pub fn expires_unix_ms(&self) -> Option<u64> {
        self.options.as_ref().and_then(|o| o.expires_unix_ms)
    }

    /// Application headers.
    pub fn headers(&self) -> &[(String, Bytes)] {
        self.options.as_ref().map_or(&[], |o| &o.headers)
    }

    /// The producer's idempotency key ([`IDEMPOTENCY_KEY_HEADER`]), if it gave one.
    pub fn idempotency_key(&self) -> Option<&Bytes> {
        self.header(IDEMPOTENCY_KEY_HEADER)
    }

    /// The value of application header `key`, if present.
    pub fn header(&self, key: &str) -> Option<&Bytes> {
        self.headers()
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// A message as the application receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// The body: opaque bytes (typed bodies are postcard-encoded by the API).
    pub body: Bytes,
}

/// The header carrying an application's idempotency key (judged by the receiver's
/// `idempotency::Window`).
pub const IDEMPOTENCY_KEY_HEADER: &str = "weft-idempotency-key";
/// Header names starting with this are the mesh's own; an application may not set them.
pub const RESERVED_HEADER_PREFIX: &str = "weft-";
/// Longest header name, in bytes.
pub const HEADER_NAME_MAX: usize = 128;
/// Longest header value, in bytes.
pub const HEADER_VALUE_MAX: usize = 8 * 1024;
/// Most headers on one message (the mesh's own included).
pub const HEADERS_MAX: usize = 64;
/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_MAX: usize = 256;
/// Longest idempotency key a receiver remembers (an application's key plus the `/index` a
/// batch adds); a longer one is not deduplicated, so a peer cannot fill the window's memory.
pub const IDEMPOTENCY_KEY_RECEIVED_MAX: usize = IDEMPOTENCY_KEY_MAX + 32;

/// Why an application header (or idempotency key) is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The name is empty, too long, or has a byte outside `A-Z a-z 0-9 - _ . : /`.
    #[error(
        "header name {name:?} is invalid: 1 to {HEADER_NAME_MAX} bytes of A-Z a-z 0-9 - _ . : /"
    )]
    Name {
        /// The name as given.
        name: String,
    },
    /// The name starts with [`RESERVED_HEADER_PREFIX`].
    #[error("header name {name:?} is reserved for the mesh (names starting with {RESERVED_HEADER_PREFIX:?})")]
    Reserved {
        /// The name as given.
        name: String,
    },
    /// The value is longer than [`HEADER_VALUE_MAX`].
    #[error("header {name:?} has a value of {len} bytes; at most {HEADER_VALUE_MAX}")]
    ValueTooLong {
        /// The header's name.
        name: String,
        /// The value's length.
        len: usize,
    },
    /// More than [`HEADERS_MAX`] headers.
    #[error("{count} headers; at most {HEADERS_MAX}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// An idempotency key that is empty or longer than [`IDEMPOTENCY_KEY_MAX`].
    #[error("an idempotency key has 1 to {IDEMPOTENCY_KEY_MAX} bytes, not {len}")]
    IdempotencyKey {
        /// The key's length.
        len: usize,
    },
}

/// Checks one header an application sets: its name (syntax, not reserved) and its value's size.
pub fn check_header(name: &str, value: &[u8]) -> Result<(), HeaderError> {
    let valid = !name.is_empty()
        && name.len() <= HEADER_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'));
    if !valid {
        return Err(HeaderError::Name { name: name.into() });
    }
    if name
        .get(..RESERVED_HEADER_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
    {
        return Err(HeaderError::Reserved { name: name.into() });
    }
    if value.len() > HEADER_VALUE_MAX {
        return Err(HeaderError::ValueTooLong {
            name: name.into(),
            len: value.len(),
        });
    }
    Ok(())
}

/// Checks an idempotency key's size.
pub fn check_idempotency_key(key: &[u8]) -> Result<(), HeaderError> {
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX {
        return Err(HeaderError::IdempotencyKey { len: key.len() });
    }
    Ok(())
}

#[cfg(test)]
mod header_tests {
    use super::*;

    #[test]
    fn header_names_and_values_are_bounded_and_the_mesh_prefix_is_reserved() {
        assert_eq!(check_header("trace-id", b"abc"), Ok(()));
        assert_eq!(check_header("x/y:z_1.2", b""), Ok(()));
        for bad in [
            "",
            "has space",
            "é",
            "a\nb",
            &"n".repeat(HEADER_NAME_MAX + 1),
        ] {
            assert!(
                matches!(check_header(bad, b"v"), Err(HeaderError::Name { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check_header("Weft-Idempotency-Key", b"k"),
            Err(HeaderError::Reserved { .. })
        ));
        assert!(matches!(
            check_header("big", &vec![0; HEADER_VALUE_MAX + 1]),
            Err(HeaderError::ValueTooLong { len, .. }) if len == HEADER_VALUE_MAX + 1
        ));
        assert_eq!(check_header("big", &vec![0; HEADER_VALUE_MAX]), Ok(()));
        assert_eq!(check_idempotency_key(b"order-17"), Ok(()));
        assert!(check_idempotency_key(b"").is_err());
        assert!(check_idempotency_key(&[1; IDEMPOTENCY_KEY_MAX + 1]).is_err());
    }
}
