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

/// Everything about a message except its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Assigned by the producer, kept across retries: the deduplication key.
    pub id: MessageId,
    /// What the message is for.
    pub kind: Kind,
    /// The channel (point-to-point) or topic (pub/sub) it is addressed to.
    pub channel: String,
    /// Links a reply to its request.
    pub correlation_id: Option<u64>,
    /// Where replies go.
    pub reply_to: Option<NodeId>,
    /// Routes the message to the one worker that owns this key (sharded channels).
    pub shard_key: Option<Bytes>,
    /// Higher goes first where a queue can choose.
    pub priority: Priority,
    /// Wall-clock creation time, milliseconds since the Unix epoch (producer's clock).
    pub created_unix_ms: u64,
    /// After this wall-clock time the message is no longer worth delivering.
    pub expires_unix_ms: Option<u64>,
    /// 1 for the first transmission, counting up with every retransmission.
    pub attempt: u32,
    /// Application key/value headers, passed through untouched.
    pub headers: Vec<(String, Bytes)>,
}

/// A message as the application receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// The body: opaque bytes (typed bodies are postcard-encoded by the API).
    pub body: Bytes,
}
