//! What the node tells the application about its peers ([`PeerEvent`], through
//! [`crate::Node::events`]).

use std::net::SocketAddr;

use weft_proto::{MessageId, NodeId};

/// A peer came or went.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A connection to the peer is established (hello exchanged).
    Up {
        /// The peer.
        peer: NodeId,
        /// Its address on this connection.
        addr: SocketAddr,
    },
    /// The connection to the peer is gone; unacknowledged messages wait for the next one.
    Down {
        /// The peer.
        peer: NodeId,
        /// Why, in one sentence.
        reason: String,
    },
    /// A dial to the peer failed (unreachable, another key than the pinned one, refused by the
    /// peer's admission); the node retries with backoff.
    ConnectFailed {
        /// The peer we meant to reach.
        peer: NodeId,
        /// Why, in one sentence.
        reason: String,
        /// Whether the peer (or we) refused at the hello, as opposed to a network failure.
        refused: bool,
    },
    /// mDNS discovery found a node of our mesh (a hint: the handshake proves the id). The node
    /// adds these addresses to the peer's and connects.
    Discovered {
        /// The announced node.
        peer: NodeId,
        /// Its announced addresses.
        addrs: Vec<SocketAddr>,
    },
    /// A node's mDNS announcement is gone (goodbye or expiry). Links are not affected.
    Vanished {
        /// The node.
        peer: NodeId,
    },
    /// A message to `peer` was given up (its expiry or retry budget passed) and moved to the
    /// dead-letter log (`weft spool dead` lists it, `weft spool replay` sends it again).
    DeadLettered {
        /// The destination.
        peer: NodeId,
        /// The message.
        id: MessageId,
        /// Why, in one sentence.
        reason: String,
    },
}
