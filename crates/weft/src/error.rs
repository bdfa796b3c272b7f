//! Typed errors, one enum per operation.

use std::path::PathBuf;

use weft_proto::frame::{EncodeError, Refusal};
use weft_proto::NodeId;

pub use crate::identity::IdentityError;
pub use crate::tls::TlsError;

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Neither `data_dir` nor `identity` was given.
    #[error(
        "a node needs an identity: call .data_dir(PATH) or .identity(IDENTITY) on the builder"
    )]
    NoIdentity,
    /// The identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source} (is the port in use?)")]
    Bind {
        /// Requested address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Another node (or a `weft spool` command) uses this data directory.
    #[error("data directory is in use ({0} is locked): stop the other node or command, or use another --data-dir")]
    Locked(PathBuf),
    /// The spool could not be opened or recovered.
    #[error("{0}")]
    Spool(String),
    /// The data directory could not be used.
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why a send was not accepted. Nothing was queued when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The message is larger than the limits allow; it can never be sent.
    #[error(transparent)]
    TooLarge(#[from] EncodeError),
    /// The message's options break the header rules, or the pattern does not offer one.
    #[error(transparent)]
    Options(#[from] crate::options::OptionsError),
    /// Sending to ourselves is not supported; deliver locally instead.
    #[error("cannot send to this node itself ({0})")]
    ToSelf(NodeId),
    /// The node is shutting down.
    #[error("the node is shut down")]
    NodeClosed,
    /// The node tracks as many peers as it may.
    #[error("too many peers: the node tracks its maximum of {0}")]
    TooManyPeers(usize),
    /// The spool is at its byte cap: wait for acknowledgements (or raise `spool.bytes_max`).
    #[error("the spool is full: {0}")]
    SpoolFull(String),
    /// The spool could not make the message durable (a storage error; the node's spool stops
    /// accepting until the node restarts and recovery reads what is really on disk).
    #[error("the spool failed: {0}")]
    Spool(String),
    /// A volatile message needs a connection to the peer, and none is up.
    #[error("no connection to {0} is up (volatile messages are not queued)")]
    NotConnected(NodeId),
    /// The delayed message's due time is refused: further ahead than `NodeConfig::delay_max`,
    /// or not before the message's expiry.
    #[error("bad deliver-after time: {0}")]
    Delay(#[from] weft_proto::schedule::DueError),
    /// The node holds its maximum of delayed messages (`NodeConfig::schedule_max`).
    #[error("the schedule of delayed messages is full ({0} waiting)")]
    ScheduleFull(usize),
    /// Volatile messages cannot be delayed (they are never held).
    #[error("a volatile message cannot be delayed")]
    VolatileDelayed,
    /// A batch travels in one lane (see [`weft_proto::Lane`]), so its receipts follow one
    /// stream; this one mixes priorities of two lanes. Send one batch per lane.
    #[error("a batch travels in one lane: its priorities map to the {lane} and the {other} lane (send one batch per lane)")]
    MixedLanes {
        /// The lane of the batch's first message.
        lane: weft_proto::Lane,
        /// The lane of the message that differs.
        other: weft_proto::Lane,
    },
}

impl From<DeliveryError> for SendError {
    fn from(error: DeliveryError) -> Self {
        match error {
            DeliveryError::NodeClosed => Self::NodeClosed,
            DeliveryError::NotAccepted(reason) => Self::Spool(reason),
            DeliveryError::SpoolFull(reason) => Self::SpoolFull(reason),
            DeliveryError::DeadLettered { reason } => Self::Spool(reason),
        }
    }
}

/// Why [`PeerSender::send_batch`](crate::PeerSender::send_batch) did not send every message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendBatchError {
    /// Message `index` can never be sent; nothing of the batch was.
    #[error("message {index} of the batch: {error}")]
    Invalid {
        /// Its position in the batch.
        index: usize,
        /// Why.
        error: SendError,
    },
    /// Some messages were not accepted: the spool refused them (their receipts in `receipts`
    /// fail) or the node shut down before they were numbered (they are not in `receipts`).
    #[error("{refused} message(s) of the batch not accepted: {error}")]
    Partial {
        /// Receipts of every message that was numbered, accepted or refused.
        receipts: crate::receipt::Receipts,
        /// How many were not accepted.
        refused: usize,
        /// The first reason.
        error: SendError,
    },
}

/// Why a non-blocking send was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrySendError {
    /// The peer's queue is at its bound: back off or use the async `send`.
    #[error("the queue for this peer is full (would block)")]
    WouldBlock,
    /// The spool holds its maximum of pending messages: back off or use the async `send`.
    #[error("the spool is full (would block)")]
    SpoolFull,
    /// Any reason `send` could fail too.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// Why a receipt resolved without a delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The node shut down before the peer acknowledged the message. (Without a spool the
    /// message is gone with the process; the spool keeps it across restarts.)
    #[error("the node shut down before the peer acknowledged the message")]
    NodeClosed,
    /// The spool could not make the message durable; it was not sent.
    #[error("the spool did not accept the message: {0}")]
    NotAccepted(String),
    /// The spool is at its byte cap; the message was not sent.
    #[error("the spool is full: {0}")]
    SpoolFull(String),
    /// The message was given up (its expiry or retry budget passed) and moved to the dead-letter
    /// log (`weft spool dead` lists it; `weft spool replay` sends it again).
    #[error("dead-lettered: {reason}")]
    DeadLettered {
        /// Why it was given up.
        reason: String,
    },
}

/// Why `receive` could not open a channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// Another live receiver holds this channel; a channel has one receiver.
    #[error("channel {0:?} already has a receiver")]
    AlreadyReceiving(String),
    /// The node keeps its maximum number of channels.
    #[error("too many channels: the node keeps at most {0} (raise channels_max)")]
    TooManyChannels(usize),
    /// The node is shutting down.
    #[error("the node is shut down")]
    NodeClosed,
}

/// Why a connection attempt failed (reported in logs and peer events).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// QUIC or TLS failed: unreachable, timed out, or the peer's key was not the pinned one.
    #[error("QUIC/TLS: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The dial could not even start (bad address, endpoint closing).
    #[error("cannot dial: {0}")]
    Dial(#[from] quinn::ConnectError),
    /// The peer refused us after the TLS handshake.
    #[error("refused by the peer: {0}")]
    Refused(Refusal),
    /// We refused the peer.
    #[error("refused the peer: {0}")]
    RefusedPeer(Refusal),
    /// The hello exchange broke the protocol or timed out.
    #[error("hello exchange failed: {0}")]
    Handshake(String),
}

/// Why a typed body could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("body (de)serialization failed: {0}")]
pub struct BodyError(pub String);

/// Why a typed send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendTypedError {
    /// The value could not be encoded.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The send failed.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// Why a readiness wait (`Node::connected`, `wait_for_peers`, `wait_for_subscribers`,
/// `wait_for_workers`, `wait_for_service`) ended without its condition. One type for all of them;
/// the waits themselves have no deadline (wrap them in a timeout).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadyError {
    /// Not a valid topic, queue or service name.
    #[error(transparent)]
    Name(#[from] weft_proto::TopicError),
    /// The peer cannot be tracked (this node itself, or the node tracks its maximum of peers).
    #[error(transparent)]
    Peer(SendError),
    /// The node is shut down.
    #[error("the node is shut down")]
    NodeClosed,
}

impl From<SendError> for ReadyError {
    fn from(error: SendError) -> Self {
        match error {
            SendError::NodeClosed => ReadyError::NodeClosed,
            other => ReadyError::Peer(other),
        }
    }
}
