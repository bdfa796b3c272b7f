//! What the rest of the node holds of a peer's task: its handle ([`PeerHandle`], one per lane),
//! the messages it takes ([`Outgoing`] from the application, [`Control`] from everyone else).
//!
//! Plain data and channel ends, so that the senders (the API, the spool writer, the patterns)
//! depend on this module and not on the task or the node.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use weft_proto::{Lane, NodeId, OutgoingMessage, StreamId};

use crate::connection::Established;
use crate::error::{ConnectError, DeliveryError};
use crate::queue;
use crate::receipt::Progress;

/// A message on its way into a link: its wire sequence number and the spool record holding it
/// (`tag`, 0 for a node without a spool). `run`: a run of events still open in the lane's
/// queue, which later events for the same hop join; it becomes the message's body when the
/// peer task takes the message (see `PeerSender::send_event`).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub seq: u64,
    pub tag: u64,
    pub message: OutgoingMessage,
    pub run: Option<Box<weft_proto::gossip::Run>>,
}

/// Per-peer, per-lane state shared between the API and the lane's peer task. The handle the
/// node keeps per peer is the normal lane's; it holds the other lanes' (see [`PeerHandle::lane`]).
#[derive(Debug)]
pub(crate) struct PeerHandle {
    pub id: NodeId,
    /// The lane this handle sends in.
    pub lane: Lane,
    /// The high and bulk lanes' handles (in the normal lane's handle only).
    pub others: Vec<Arc<PeerHandle>>,
    /// The id of our stream to the peer (restored from the spool, or new).
    pub stream: StreamId,
    /// Messages for the link, in sequence order (bounded: `send` waits when full). The queue
    /// numbers them too ([`queue::Sender::send_numbered`]): queue order is sequence order.
    pub commands: queue::Sender<Outgoing>,
    /// Connections and addresses for the task (rare; bounded by handshakes in flight).
    pub control: mpsc::UnboundedSender<Control>,
    /// What receipts watch: the acknowledged and accepted watermarks and the failures (moved
    /// by the peer task as the peer acknowledges and the spool writer answers).
    pub progress: Arc<Progress>,
    /// Where the spool writer answers for this lane.
    pub spool_reply: Arc<SpoolReply>,
    /// Whether a connection is up (for a lane other than the normal one: its stream is).
    pub connected: watch::Receiver<bool>,
}

impl PeerHandle {
    /// The handle of `lane` (called on the normal lane's handle, the one the node keeps).
    pub fn lane(self: &Arc<Self>, lane: Lane) -> &Arc<PeerHandle> {
        if lane == self.lane {
            return self;
        }
        self.others
            .iter()
            .find(|other| other.lane == lane)
            .expect("the normal lane's handle holds every lane")
    }

    /// Every lane's handle, the normal one first.
    pub fn lanes(self: &Arc<Self>) -> impl Iterator<Item = &Arc<PeerHandle>> {
        std::iter::once(self).chain(self.others.iter())
    }
}

/// Where the spool writer sends its answers for the messages of one peer's lane (and what it
/// records them under): the writer answers, it never touches the peer's queues.
#[derive(Debug)]
pub(crate) struct SpoolReply {
    pub peer: NodeId,
    pub lane: Lane,
    /// Our stream's epoch to the peer in this lane.
    pub epoch: u64,
    pub control: mpsc::UnboundedSender<Control>,
}

/// The spool's answer for one message: durable under this record (`tag`), or refused (never
/// sent: its number is skipped).
pub(crate) type SpoolOutcome = Result<u64, DeliveryError>;

/// Messages to a peer task from elsewhere in the node.
#[derive(Debug)]
pub(crate) enum Control {
    /// A connection passed its hello exchange (dialed or accepted).
    Connection(Established),
    /// `lane`'s stream on the connection installed as the `generation`-th (from the helper
    /// that opens or accepts the lanes' streams).
    LaneStream {
        generation: u64,
        lane: Lane,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    /// Our dial failed.
    DialFailed(ConnectError),
    /// The spool writer's answers for messages of `lane` (already in this task's queue, held
    /// until answered), in sequence order: (seq, outcome). Only durable messages reach the link.
    Spooled {
        lane: Lane,
        outcomes: Vec<(u64, SpoolOutcome)>,
    },
    /// Addresses to dial the peer at.
    Addresses(Vec<SocketAddr>),
    /// The spool made this inbound watermark of `lane` durable: acknowledge up to it.
    WatermarkDurable { lane: Lane, epoch: u64, up_to: u64 },
    /// The spool did not make this inbound watermark durable: acknowledge nothing past the last
    /// durable one. `stopped`: the spool refuses everything until the node restarts (a storage
    /// failure poisoned it), so retrying is pointless; otherwise it was full, and a retry may pass.
    WatermarkFailed {
        lane: Lane,
        epoch: u64,
        up_to: u64,
        stopped: bool,
        error: String,
    },
    /// Take back the normal lane's messages not yet in flight whose channel starts with
    /// `channel_prefix` (work for a worker that went silent): (seq, spool tag, message), in
    /// sequence order.
    Withdraw {
        channel_prefix: String,
        reply: tokio::sync::oneshot::Sender<Vec<(u64, u64, OutgoingMessage)>>,
    },
    /// Copies of the normal lane's queued messages numbered `seqs` (ascending), in flight or
    /// not, that are still there: (seq, message), in sequence order (work held by a stuck
    /// worker).
    CopyQueued {
        seqs: Vec<u64>,
        reply: tokio::sync::oneshot::Sender<Vec<(u64, OutgoingMessage)>>,
    },
    /// What a `Withdraw` took (when it took something) is durable elsewhere: the peer may be
    /// told to skip it (see `Link::hold_for_withdrawal`).
    SettleWithdrawal,
    /// Give up these messages of the normal lane (ascending seqs) if they are still queued and
    /// not in flight: dead-lettered with `reason`, as expired ones are (events over a durable
    /// subscription's retention budget).
    GiveUp {
        seqs: Vec<u64>,
        reason: weft_proto::link::GiveUp,
    },
}
