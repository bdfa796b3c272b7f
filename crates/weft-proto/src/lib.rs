//! The sans-IO core of Weft.
//!
//! Everything Weft decides — how frames look on the wire, which sequence number a message gets,
//! when it counts as acknowledged, what is a duplicate, which of two connections to keep, how long to
//! wait before redialing — is decided here, by code that does no IO, reads no clock and draws no
//! randomness. The driver (the `weft` crate) feeds it inputs and carries out its outputs; the
//! simulation feeds the very same driver simulated sockets and time. quinn-proto is the model.
//!
//! # Protocol
//! A connection between two nodes is one QUIC connection with one bidirectional stream per
//! priority [`Lane`], all opened by the dialer: the normal lane's stream carries the hello, and
//! each other lane's stream starts with the lane's byte. Both sides write [`frame::Frame`]s on
//! each, every lane being its own numbered, acknowledged stream of messages:
//! ```text
//! dialer                          acceptor
//!   Hello{versions, mesh, id} -->
//!                             <-- Welcome{versions, mesh, id}   (or Refuse{reason} and close)
//!   Resume{epoch, next_seq}   -->                                (each side, for its own stream)
//!                             <-- Resume{epoch, next_seq}
//!   Data{seq, header, body}*  -->
//!                             <-- Ack{epoch, up_to}              (cumulative, coalesced)
//! ```
//! The TLS handshake already proved both node ids (raw public keys); the hello adds the mesh name
//! and version range, and a node counts as connected only once it was answered with a welcome.
//!
//! # Modules
//! - [`channel`]: channel and topic names (reference-counted UTF-8).
//! - [`id`]: node ids (Ed25519 public keys) and message ids (producer, stream, seq).
//! - [`message`]: the header and body the application sees; header rules.
//! - [`idempotency`]: the window of producers' idempotency keys a node handed on.
//! - [`frame`]: encoding and two-phase, bounded decoding of frames.
//! - [`handshake`]: judging a hello; resolving simultaneous dials.
//! - [`link`]: per-peer acknowledgement, retransmission and deduplication state.
//! - [`schedule`]: delayed (deliver-after) messages waiting for their due time, in due order.
//! - [`spooled`]: the payloads a node keeps in its spool (outgoing messages, inbound watermarks).
//! - [`topic`]: topics and wildcard patterns.
//! - [`interest`]: who subscribes to what and answers which service (announcements, the table).
//! - [`shard`]: which worker owns a shard key (rendezvous hashing).
//! - [`gossip`]: event dissemination: relay trees, per-subscriber chains, retention and repair.
//! - [`owed`]: what a publisher owes its durable subscribers, and their retention budget.
//! - [`envelope`]: bodies of the mesh's own channels (events, requests, replies), reply cache.
//! - [`peer`]: one peer's connection lifecycle (dial, backoff, duplicates, lane handshake, up
//!   and down) and each lane's watermark gate and expiry timer, as sans-IO machines.
//! - [`work`]: a work-queue producer's decisions (credit, shard-key barrier, silent and stuck
//!   workers) as a sans-IO machine.
//! - [`backoff`]: jittered reconnect backoff and a seedable generator.
#![warn(missing_docs)]

pub mod backoff;
pub mod channel;
pub mod envelope;
pub mod frame;
pub mod gossip;
pub mod handshake;
pub mod id;
pub mod idempotency;
pub mod interest;
pub mod link;
pub mod message;
pub mod owed;
pub mod peer;
pub mod schedule;
pub mod session;
pub mod shard;
pub mod spooled;
pub mod topic;
pub mod work;

#[cfg(test)]
mod link_tests;
#[cfg(test)]
mod peer_tests;

pub use channel::Channel;
pub use frame::{DataContext, Frame, FrameDecoder, FrameEncoder, FrameError, Limits};
pub use id::{MessageId, NodeId, StreamId};
pub use link::{Link, LinkConfig, LinkError, LinkEvent, OutgoingMessage};
pub use message::{Header, HeaderError, Kind, Lane, Message, Options, Priority};
pub use topic::{Topic, TopicError, TopicPattern};
