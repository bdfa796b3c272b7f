//! Weft: a brokerless messaging mesh. Every service embeds a [`Node`]; nodes talk directly over
//! QUIC, authenticated by their own Ed25519 keys.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let node = weft::Node::builder()
//!     .mesh("shop")
//!     .data_dir("./var/orders")
//!     .bind("127.0.0.1:7450".parse()?)
//!     .start()
//!     .await?;
//! let peer: weft::NodeAddr = "aaaa...@127.0.0.1:7451".parse()?;
//! node.add_peer(peer.clone())?;
//! let receipt = node.send(peer.id, "points/grant", &b"7 points"[..]).await?;
//! receipt.await?; // the peer's application queue has it
//! let mut inbox = node.receive("points/grant")?;
//! while let Some(message) = inbox.recv().await {
//!     println!("{} from {}", message.header.channel, message.header.id.producer);
//! }
//! # Ok(()) }
//! ```
//!
//! # Guarantees (point-to-point)
//! - A receipt resolves only once the peer handed the message to its application's queue.
//! - Per (sender, receiver, priority lane): FIFO, no duplicates, across reconnects
//!   (unacknowledged messages are retransmitted on the next connection and deduplicated by the
//!   receiver).
//! - Memory is bounded: a full peer queue makes `send` wait (or `try_send` return
//!   [`TrySendError::WouldBlock`]); a full channel queue stops the link reading.
//! - Without a data directory messages live in memory: a process that dies loses what its peers
//!   had not acknowledged. With one, a send returns once the message is in the spool, and it is
//!   delivered or dead-lettered across crashes of either end.
//!
//! # Modules
//! The protocol decisions live in the sans-IO crate [`weft_proto`]; this crate drives it with
//! tokio, quinn and rustls: [`node`] (API, endpoint, peers), `peer` (one task per peer,
//! driving its [`weft_proto::session::Session`] — the connection lifecycle and every priority
//! lane's link — and moving bytes between quinn and it), `connection` (dial/accept and the hello
//! exchange), `durable` (the spool writer), `patterns` (pub/sub, request/reply, work queues),
//! [`discovery`] (mDNS), [`tls`] and [`identity`]. ARCHITECTURE.md is the map.
#![warn(missing_docs)]

pub mod addr;
pub mod admin;
pub mod body;
mod close_code;
pub mod config;
mod connection;
pub mod discovery;
mod durable;
pub mod error;
mod events;
mod handle;
pub mod identity;
mod inbox;
mod keys;
mod metrics;
pub mod node;
pub mod options;
mod patterns;
mod peer;
mod queue;
mod receipt;
mod scheduler;
mod settle;
pub mod tls;

pub use addr::NodeAddr;
pub use body::{decode, encode, Typed, Undecodable};
pub use bytes::Bytes;
pub use config::{NodeConfig, PatternConfig, Seams};
pub use discovery::{Interfaces, MdnsConfig};
pub use error::{
    BodyError, ConnectError, DeliveryError, ReadyError, ReceiveError, SendBatchError, SendError,
    SendTypedError, StartError, TrySendError,
};
pub use identity::Identity;
pub use inbox::Inbox;
pub use metrics::MetricsSnapshot;
pub use node::{Node, NodeBuilder, PeerEvent, PeerSender, Renumbered};
pub use options::{MessageOptions, OptionsError};
pub use patterns::{
    redelivery_of, Gathered, PublishBatchError, PublishError, Published, PublishedBatch,
    PullOptions, Puller, Request, RequestBuilder, RequestError, ScatterBuilder, Service,
    SubscribeError, SubscribeOptions, Subscription, WorkError, REDELIVERY_HEADER,
};
pub use receipt::{BatchDeliveryError, Delivered, Receipt, Receipts};
pub use weft_proto::{
    self as proto, Channel, Header, Kind, Lane, Limits, LinkConfig, Message, MessageId, NodeId,
    Options, OutgoingMessage, Priority, Topic, TopicError, TopicPattern,
};
pub use weft_spool::{FsyncPolicy, SpoolConfig};
