//! The history: what the applications and the scenario saw, recorded outside the nodes.
//!
//! The nodes under test never write here; the simulated applications around them do (a send that
//! returned `Ok`, a message their inbox yielded, a receipt that resolved, a peer event) and so does
//! the fault script. The checkers read only this record, so they judge the driver by what a user of
//! the public API could observe, not by the driver's own bookkeeping.
//!
//! A node that crashes loses its tasks mid-flight: a send that had not returned is recorded as
//! interrupted (its outcome unknown to the application), its unresolved receipts are forgotten,
//! and after the restart the application carries on with the sends it had not made yet.
//!
//! turmoil runs every host on one thread, so one mutex-protected vector gives a total order of
//! events that is itself deterministic; each event carries the simulated time it happened at. The
//! trace hash is a blake3 over the canonical encoding of the whole record (times included): two
//! runs of one seed must produce it byte for byte.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::scenario::FaultAction;

/// Why the pub/sub application tries a subscription again that `subscribe` returned (recorded
/// by the harness, excused by the checkers).
pub const SUBSCRIBE_UNCONFIRMED: &str = "a peer went down before it confirmed the subscription";

/// A node, by its index in the scenario (host `node{index}`).
pub type NodeIndex = usize;

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `send` returned `Ok`: the node accepted the message for `to`.
    Accepted {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// The sender's stream to `to` (from the receipt's message id).
        stream: u64,
        /// Sequence number in that stream.
        seq: u64,
        /// First 8 bytes of the body's blake3, to check what arrives.
        body_digest: u64,
    },
    /// `send` of a delayed message returned `Ok`: accepted (durable), not numbered yet; its id is
    /// known only at its release ([`Event::Released`]), which a crash may move into a later
    /// incarnation of the sender (then without a receipt, so without a `Released`).
    Scheduled {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
        /// Not to be delivered before this simulated time.
        due: Duration,
    },
    /// A delayed message's receipt learned its number: from here on it is checked like an
    /// accepted message.
    Released {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// The sender's stream to `to`.
        stream: u64,
        /// Sequence number in that stream.
        seq: u64,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
    },
    /// `send` returned an error: the message was not accepted.
    SendFailed {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
        /// Whether the spool refused it (full, or failed): the only failure a healthy run may
        /// see, and only from a node whose disk is faulty or capped.
        spool: bool,
        /// The error.
        error: String,
    },
    /// The sender crashed while `send` had not returned: accepted or not, nobody knows.
    SendInterrupted {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
    },
    /// The receiver's inbox yielded the message.
    Delivered {
        /// Receiver.
        at: NodeIndex,
        /// Producer (from the message id), or `None` for a node id that is not in the run.
        from: Option<NodeIndex>,
        /// Producer's stream.
        stream: u64,
        /// Sequence number.
        seq: u64,
        /// The lane it travelled in ([`weft::Lane::index`]): FIFO holds per lane.
        lane: u8,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
    },
    /// The receipt of a message resolved: the receiver acknowledged it.
    Acked {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// The sender's stream.
        stream: u64,
        /// Sequence number.
        seq: u64,
    },
    /// A receipt failed: the message was dead-lettered (a report), or something that never
    /// should happen while the node runs.
    ReceiptFailed {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// The sender's stream.
        stream: u64,
        /// Sequence number.
        seq: u64,
        /// Whether the error is `DeliveryError::DeadLettered`.
        dead_lettered: bool,
        /// The error.
        error: String,
    },
    /// The sender's node reported a message dead-lettered (`PeerEvent::DeadLettered`).
    DeadLettered {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// The sender's stream.
        stream: u64,
        /// Sequence number.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// A node's spool has a small byte cap (recorded at the start).
    SpoolCapped {
        /// The node.
        node: NodeIndex,
        /// The cap.
        bytes_max: u64,
    },
    /// The harness flipped a bit of a node's spool file.
    BitFlipped {
        /// The node.
        node: NodeIndex,
        /// The file.
        file: String,
        /// Byte offset.
        offset: u64,
    },
    /// A node's restart found damaged spool segments and quarantined them (the operator's alarm:
    /// what they held may be lost).
    Quarantined {
        /// The node.
        node: NodeIndex,
        /// Segments quarantined by this start.
        segments: usize,
    },
    /// A node's recovery gave a message it had numbered before a new id (after a quarantine):
    /// `(old_stream, old_seq)` is sent again as `(new_stream, new_seq)`.
    Renumbered {
        /// The sender.
        from: NodeIndex,
        /// The receiver (`None`: not a node of the run).
        to: Option<NodeIndex>,
        /// Old stream.
        old_stream: u64,
        /// Old seq.
        old_seq: u64,
        /// New stream.
        new_stream: u64,
        /// New seq.
        new_seq: u64,
    },
    /// A power loss met bytes its node had written but not fsynced: they are dropped, or torn.
    UnsyncedLost {
        /// The node.
        node: NodeIndex,
        /// How many.
        bytes: u64,
    },
    /// A node did not start (its supervisor tries again).
    StartFailed {
        /// The node.
        node: NodeIndex,
        /// Why.
        error: String,
    },
    /// A connection to `peer` came up at `node`.
    PeerUp {
        /// Observer.
        node: NodeIndex,
        /// The peer.
        peer: NodeIndex,
    },
    /// The connection to `peer` went down at `node`.
    PeerDown {
        /// Observer.
        node: NodeIndex,
        /// The peer.
        peer: NodeIndex,
    },
    /// The node's application stopped reading its inbox.
    ConsumerPaused {
        /// The node.
        node: NodeIndex,
    },
    /// The node's application reads its inbox again.
    ConsumerResumed {
        /// The node.
        node: NodeIndex,
    },
    /// The fault script changed the network.
    Fault(FaultAction),
    /// `subscribe` returned: the node's subscription `sub` (its index among the node's
    /// patterns) is in effect.
    Subscribed {
        /// Subscriber.
        node: NodeIndex,
        /// Which of its subscriptions.
        sub: usize,
        /// The pattern.
        pattern: String,
        /// A durable subscription (`subscribe_durable`, named [`crate::scenario::durable_name`]).
        durable: bool,
    },
    /// `subscribe` failed (the application tries again).
    SubscribeFailed {
        /// Subscriber.
        node: NodeIndex,
        /// Which of its subscriptions.
        sub: usize,
        /// The error.
        error: String,
    },
    /// The application called `publish`.
    PublishStarted {
        /// Publisher.
        publisher: NodeIndex,
        /// Its sequence number of the event.
        seq: u32,
    },
    /// `publish` returned `Ok`.
    Published {
        /// Publisher.
        publisher: NodeIndex,
        /// Its sequence number of the event.
        seq: u32,
        /// The topic.
        topic: String,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
        /// Remote subscribers it went to (receipts).
        remote: usize,
        /// Local subscriptions that got it.
        local: usize,
    },
    /// `publish` returned an error.
    PublishFailed {
        /// Publisher.
        publisher: NodeIndex,
        /// Its sequence number of the event.
        seq: u32,
        /// The error.
        error: String,
    },
    /// The publisher crashed while `publish` had not returned: delivered or not, nobody knows.
    PublishInterrupted {
        /// Publisher.
        publisher: NodeIndex,
        /// Its sequence number of the event.
        seq: u32,
        /// The topic.
        topic: String,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
    },
    /// Every receipt of a publish resolved (`error`: one failed).
    PublishSettled {
        /// Publisher.
        publisher: NodeIndex,
        /// Its sequence number of the event.
        seq: u32,
        /// Why a receipt failed, if one did.
        error: Option<String>,
    },
    /// A subscription yielded an event.
    EventReceived {
        /// Subscriber.
        node: NodeIndex,
        /// Which of its subscriptions.
        sub: usize,
        /// The event's producer (message id), `None` for a node id that is not in the run.
        producer: Option<NodeIndex>,
        /// The publisher the body names.
        publisher: NodeIndex,
        /// The sequence number the body names.
        seq: u32,
        /// The event's topic.
        topic: String,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
    },
    /// `pull` returned: the worker takes items of the queue.
    Pulling {
        /// The worker.
        node: NodeIndex,
    },
    /// `pull` failed (the application tries again).
    PullFailed {
        /// The worker.
        node: NodeIndex,
        /// The error.
        error: String,
    },
    /// `push` (or `push_keyed`) returned `Ok`.
    Pushed {
        /// The item's sequence number.
        seq: u32,
        /// Its shard key, if any.
        key: Option<u8>,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
    },
    /// `push` returned an error.
    PushFailed {
        /// The item's sequence number.
        seq: u32,
        /// The error.
        error: String,
    },
    /// The producer crashed while `push` had not returned: handled or not, nobody knows.
    PushInterrupted {
        /// The item's sequence number.
        seq: u32,
        /// Its shard key, if any.
        key: Option<u8>,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
    },
    /// A worker's `Puller` yielded an item (the worker takes it).
    ItemTaken {
        /// The worker.
        worker: NodeIndex,
        /// The item's producer (message id), `None` for a node id that is not in the run.
        producer: Option<NodeIndex>,
        /// The sequence number the body names.
        seq: u32,
        /// The shard key the body names.
        key: Option<u8>,
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
        /// A copy the producer made of an item a stuck worker held (it carries
        /// `weft::REDELIVERY_HEADER`).
        copy: bool,
    },
}

impl Event {
    /// Appends the canonical encoding: a tag byte, then fixed-width little-endian fields.
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn node(out: &mut Vec<u8>, node: NodeIndex) {
            out.push(node as u8);
        }
        fn number(out: &mut Vec<u8>, value: u64) {
            out.extend(value.to_le_bytes());
        }
        fn text(out: &mut Vec<u8>, text: &str) {
            number(out, text.len() as u64);
            out.extend(text.as_bytes());
        }
        match self {
            Event::Accepted {
                from,
                to,
                stream,
                seq,
                body_digest,
            } => {
                out.push(1);
                node(out, *from);
                node(out, *to);
                number(out, *stream);
                number(out, *seq);
                number(out, *body_digest);
            }
            Event::Scheduled {
                from,
                to,
                body_digest,
                due,
            } => {
                out.push(33);
                node(out, *from);
                node(out, *to);
                number(out, *body_digest);
                number(out, due.as_nanos() as u64);
            }
            Event::Released {
                from,
                to,
                stream,
                seq,
                body_digest,
            } => {
                out.push(34);
                node(out, *from);
                node(out, *to);
                number(out, *stream);
                number(out, *seq);
                number(out, *body_digest);
            }
            Event::SendFailed {
                from,
                to,
                body_digest,
                spool,
                error,
            } => {
                out.push(2);
                node(out, *from);
                node(out, *to);
                number(out, *body_digest);
                out.push(u8::from(*spool));
                text(out, error);
            }
            Event::SendInterrupted {
                from,
                to,
                body_digest,
            } => {
                out.push(11);
                node(out, *from);
                node(out, *to);
                number(out, *body_digest);
            }
            Event::Delivered {
                at,
                from,
                stream,
                seq,
                lane,
                body_digest,
            } => {
                out.push(3);
                node(out, *at);
                node(out, from.unwrap_or(u8::MAX as usize));
                number(out, *stream);
                number(out, *seq);
                out.push(*lane);
                number(out, *body_digest);
            }
            Event::Acked {
                from,
                to,
                stream,
                seq,
            } => {
                out.push(4);
                node(out, *from);
                node(out, *to);
                number(out, *stream);
                number(out, *seq);
            }
            Event::ReceiptFailed {
                from,
                to,
                stream,
                seq,
                dead_lettered,
                error,
            } => {
                out.push(5);
                node(out, *from);
                node(out, *to);
                number(out, *stream);
                number(out, *seq);
                out.push(u8::from(*dead_lettered));
                text(out, error);
            }
            Event::DeadLettered {
                from,
                to,
                stream,
                seq,
                reason,
            } => {
                out.push(12);
                node(out, *from);
                node(out, *to);
                number(out, *stream);
                number(out, *seq);
                text(out, reason);
            }
            Event::SpoolCapped { node: n, bytes_max } => {
                out.push(13);
                node(out, *n);
                number(out, *bytes_max);
            }
            Event::BitFlipped {
                node: n,
                file,
                offset,
            } => {
                out.push(14);
                node(out, *n);
                text(out, file);
                number(out, *offset);
            }
            Event::Quarantined { node: n, segments } => {
                out.push(15);
                node(out, *n);
                number(out, *segments as u64);
            }
            Event::Renumbered {
                from,
                to,
                old_stream,
                old_seq,
                new_stream,
                new_seq,
            } => {
                out.push(32);
                node(out, *from);
                number(out, to.map_or(u64::MAX, |t| t as u64));
                number(out, *old_stream);
                number(out, *old_seq);
                number(out, *new_stream);
                number(out, *new_seq);
            }
            Event::UnsyncedLost { node: n, bytes } => {
                out.push(17);
                node(out, *n);
                number(out, *bytes);
            }
            Event::StartFailed { node: n, error } => {
                out.push(16);
                node(out, *n);
                text(out, error);
            }
            Event::PeerUp { node: n, peer } => {
                out.push(6);
                node(out, *n);
                node(out, *peer);
            }
            Event::PeerDown { node: n, peer } => {
                out.push(7);
                node(out, *n);
                node(out, *peer);
            }
            Event::ConsumerPaused { node: n } => {
                out.push(8);
                node(out, *n);
            }
            Event::ConsumerResumed { node: n } => {
                out.push(9);
                node(out, *n);
            }
            Event::Fault(action) => {
                out.push(10);
                action.encode(out);
            }
            Event::Subscribed {
                node: n,
                sub,
                pattern,
                durable,
            } => {
                out.push(18);
                node(out, *n);
                node(out, *sub);
                text(out, pattern);
                if *durable {
                    // Only then: the traces of runs without durable subscriptions stay as they were.
                    out.push(1);
                }
            }
            Event::SubscribeFailed {
                node: n,
                sub,
                error,
            } => {
                out.push(19);
                node(out, *n);
                node(out, *sub);
                text(out, error);
            }
            Event::PublishStarted { publisher, seq } => {
                out.push(20);
                node(out, *publisher);
                number(out, u64::from(*seq));
            }
            Event::Published {
                publisher,
                seq,
                topic,
                body_digest,
                remote,
                local,
            } => {
                out.push(21);
                node(out, *publisher);
                number(out, u64::from(*seq));
                text(out, topic);
                number(out, *body_digest);
                number(out, *remote as u64);
                number(out, *local as u64);
            }
            Event::PublishFailed {
                publisher,
                seq,
                error,
            } => {
                out.push(22);
                node(out, *publisher);
                number(out, u64::from(*seq));
                text(out, error);
            }
            Event::PublishInterrupted {
                publisher,
                seq,
                topic,
                body_digest,
            } => {
                out.push(23);
                node(out, *publisher);
                number(out, u64::from(*seq));
                text(out, topic);
                number(out, *body_digest);
            }
            Event::PublishSettled {
                publisher,
                seq,
                error,
            } => {
                out.push(24);
                node(out, *publisher);
                number(out, u64::from(*seq));
                text(out, error.as_deref().unwrap_or(""));
            }
            Event::EventReceived {
                node: n,
                sub,
                producer,
                publisher,
                seq,
                topic,
                body_digest,
            } => {
                out.push(25);
                node(out, *n);
                node(out, *sub);
                node(out, producer.unwrap_or(u8::MAX as usize));
                node(out, *publisher);
                number(out, u64::from(*seq));
                text(out, topic);
                number(out, *body_digest);
            }
            Event::Pulling { node: n } => {
                out.push(26);
                node(out, *n);
            }
            Event::PullFailed { node: n, error } => {
                out.push(27);
                node(out, *n);
                text(out, error);
            }
            Event::Pushed {
                seq,
                key,
                body_digest,
            } => {
                out.push(28);
                number(out, u64::from(*seq));
                out.push(key.unwrap_or(u8::MAX));
                number(out, *body_digest);
            }
            Event::PushFailed { seq, error } => {
                out.push(29);
                number(out, u64::from(*seq));
                text(out, error);
            }
            Event::PushInterrupted {
                seq,
                key,
                body_digest,
            } => {
                out.push(30);
                number(out, u64::from(*seq));
                out.push(key.unwrap_or(u8::MAX));
                number(out, *body_digest);
            }
            Event::ItemTaken {
                worker,
                producer,
                seq,
                key,
                body_digest,
                copy,
            } => {
                out.push(31);
                node(out, *worker);
                node(out, producer.unwrap_or(u8::MAX as usize));
                number(out, u64::from(*seq));
                out.push(key.unwrap_or(u8::MAX));
                number(out, *body_digest);
                out.push(u8::from(*copy));
            }
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Accepted {
                from,
                to,
                seq,
                stream,
                ..
            } => write!(f, "accepted {from}->{to} seq {seq} (stream {stream:016x})"),
            Event::SendFailed {
                from, to, error, ..
            } => write!(f, "send {from}->{to} failed: {error}"),
            Event::Scheduled { from, to, due, .. } => write!(
                f,
                "scheduled {from}->{to}, due at {:.3} s",
                due.as_secs_f64()
            ),
            Event::Released {
                from,
                to,
                stream,
                seq,
                ..
            } => write!(f, "released {from}->{to} seq {seq} (stream {stream:016x})"),
            Event::SendInterrupted { from, to, .. } => {
                write!(f, "send {from}->{to} interrupted by a crash")
            }
            Event::Delivered {
                at,
                from,
                seq,
                stream,
                ..
            } => match from {
                Some(from) => write!(f, "delivered {from}->{at} seq {seq} (stream {stream:016x})"),
                None => write!(f, "delivered ?->{at} seq {seq} from an unknown producer"),
            },
            Event::Acked { from, to, seq, .. } => write!(f, "acked {from}->{to} seq {seq}"),
            Event::ReceiptFailed {
                from,
                to,
                seq,
                error,
                ..
            } => write!(f, "receipt {from}->{to} seq {seq} failed: {error}"),
            Event::DeadLettered {
                from,
                to,
                seq,
                reason,
                ..
            } => write!(f, "dead-lettered {from}->{to} seq {seq}: {reason}"),
            Event::SpoolCapped { node, bytes_max } => {
                write!(f, "node {node}: spool capped at {bytes_max} bytes")
            }
            Event::BitFlipped { node, file, offset } => {
                write!(f, "node {node}: bit flipped in {file} at {offset}")
            }
            Event::Quarantined { node, segments } => {
                write!(f, "node {node}: {segments} spool segment(s) quarantined")
            }
            Event::UnsyncedLost { node, bytes } => {
                write!(f, "node {node}: {bytes} unsynced bytes at the power loss")
            }
            Event::Renumbered {
                from,
                to,
                old_stream,
                old_seq,
                new_stream,
                new_seq,
            } => write!(
                f,
                "node {from}: message {old_stream:x}/{old_seq} to {to:?} renumbered {new_stream:x}/{new_seq}"
            ),
            Event::StartFailed { node, error } => write!(f, "node {node}: start failed: {error}"),
            Event::PeerUp { node, peer } => write!(f, "node {node}: peer {peer} up"),
            Event::PeerDown { node, peer } => write!(f, "node {node}: peer {peer} down"),
            Event::ConsumerPaused { node } => write!(f, "node {node}: consumer paused"),
            Event::ConsumerResumed { node } => write!(f, "node {node}: consumer resumed"),
            Event::Fault(action) => write!(f, "fault: {action}"),
            Event::Subscribed {
                node,
                sub,
                pattern,
                durable,
            } => {
                let kind = if *durable { "durable subscription" } else { "subscription" };
                write!(f, "node {node}: {kind} {sub} to {pattern:?} in effect")
            }
            Event::SubscribeFailed { node, sub, error } => {
                write!(f, "node {node}: subscription {sub} failed: {error}")
            }
            Event::PublishStarted { publisher, seq } => {
                write!(f, "node {publisher}: publishing event {seq}")
            }
            Event::Published {
                publisher,
                seq,
                topic,
                remote,
                local,
                ..
            } => write!(
                f,
                "node {publisher}: published event {seq} on {topic:?} to {remote} remote, {local} local"
            ),
            Event::PublishFailed {
                publisher,
                seq,
                error,
            } => write!(f, "node {publisher}: publish of event {seq} failed: {error}"),
            Event::PublishInterrupted {
                publisher, seq, ..
            } => write!(f, "node {publisher}: publish of event {seq} interrupted by a crash"),
            Event::PublishSettled {
                publisher,
                seq,
                error,
            } => match error {
                None => write!(f, "node {publisher}: event {seq} acknowledged by every subscriber"),
                Some(error) => write!(f, "node {publisher}: event {seq} receipt failed: {error}"),
            },
            Event::EventReceived {
                node,
                sub,
                publisher,
                seq,
                topic,
                ..
            } => write!(
                f,
                "node {node}: subscription {sub} got event {publisher}/{seq} on {topic:?}"
            ),
            Event::Pulling { node } => write!(f, "node {node}: pulling"),
            Event::PullFailed { node, error } => write!(f, "node {node}: pull failed: {error}"),
            Event::Pushed { seq, key, .. } => write!(f, "pushed item {seq} (key {key:?})"),
            Event::PushFailed { seq, error } => write!(f, "push of item {seq} failed: {error}"),
            Event::PushInterrupted { seq, .. } => {
                write!(f, "push of item {seq} interrupted by a crash")
            }
            Event::ItemTaken {
                worker,
                seq,
                key,
                copy,
                ..
            } => {
                let copy = if *copy { ", a stuck worker's copy" } else { "" };
                write!(f, "node {worker}: took item {seq} (key {key:?}{copy})")
            }
        }
    }
}

/// An event at its simulated time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Simulated time since the start of the run.
    pub at: Duration,
    /// What happened.
    pub event: Event,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>9.3}s {}", self.at.as_secs_f64(), self.event)
    }
}

/// The trace hash: blake3 over every record's time (nanoseconds) and canonical event encoding.
pub fn trace_hash(records: &[Record]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_derive_key("weft-sim 2026 trace");
    let mut buffer = Vec::with_capacity(64);
    for record in records {
        buffer.clear();
        buffer.extend((record.at.as_nanos() as u64).to_le_bytes());
        record.event.encode(&mut buffer);
        hasher.update(&(buffer.len() as u32).to_le_bytes());
        hasher.update(&buffer);
    }
    hasher.finalize()
}

/// Counters the harness polls to decide that a run has settled (not part of the trace).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Sends and publishes that returned (`Ok` or not) or were interrupted by a crash.
    pub sends_done: usize,
    /// Receipts (and publishes' receipts) of running nodes not resolved yet (a crash forgets
    /// its node's).
    pub open_receipts: usize,
    /// Whether every node reported its metrics since its last start and its spool holds no
    /// unacknowledged message.
    pub spools_drained: bool,
    /// Per node: messages in its spool not yet acknowledged, as last reported (`None`: nothing
    /// reported since the node's last start).
    pub spool_pending: Vec<Option<u64>>,
}

#[derive(Debug, Default)]
struct Inner {
    records: Vec<Record>,
    sends_done: usize,
    /// Per node: its unresolved receipts.
    open_receipts: Vec<usize>,
    /// Per node: the metrics of its current incarnation (`None`: none reported yet).
    metrics: Vec<Option<weft::MetricsSnapshot>>,
    /// Per node: the counters of its earlier incarnations, summed.
    carried: Vec<weft::MetricsSnapshot>,
}

/// The shared recorder; clones record into the same history.
#[derive(Clone, Debug, Default)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
}

impl History {
    /// An empty history for `nodes` nodes.
    pub fn new(nodes: usize) -> Self {
        let history = History::default();
        {
            let mut inner = history.lock();
            inner.open_receipts = vec![0; nodes];
            inner.metrics = vec![None; nodes];
            inner.carried = vec![weft::MetricsSnapshot::default(); nodes];
        }
        history
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written Vec push behind; keep going
        // and let the harness report the panic.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `event` at the current simulated time of the running host.
    pub fn record_now(&self, event: Event) {
        let at = turmoil::sim_elapsed().unwrap_or_default();
        self.record(at, event);
    }

    /// Records `event` at `at`.
    pub fn record(&self, at: Duration, event: Event) {
        let mut inner = self.lock();
        match &event {
            Event::Accepted { from, .. } | Event::Scheduled { from, .. } => {
                inner.sends_done += 1;
                inner.open_receipts[*from] += 1;
            }
            Event::Published { publisher, .. } => {
                inner.sends_done += 1;
                inner.open_receipts[*publisher] += 1;
            }
            Event::SendFailed { .. }
            | Event::SendInterrupted { .. }
            | Event::PublishFailed { .. }
            | Event::PublishInterrupted { .. }
            | Event::Pushed { .. }
            | Event::PushFailed { .. }
            | Event::PushInterrupted { .. } => inner.sends_done += 1,
            Event::Acked { from, .. }
            | Event::ReceiptFailed { from, .. }
            | Event::PublishSettled {
                publisher: from, ..
            } => {
                let open = &mut inner.open_receipts[*from];
                *open = open.saturating_sub(1);
            }
            _ => {}
        }
        inner.records.push(Record { at, event });
    }

    /// A node crashed: its receipts are gone, and its counters so far are kept aside.
    pub fn crashed(&self, node: NodeIndex) {
        let mut inner = self.lock();
        inner.open_receipts[node] = 0;
        if let Some(metrics) = inner.metrics[node].take() {
            add_counters(&mut inner.carried[node], &metrics);
        }
    }

    /// The latest metrics a node reported (for the run summary and for the drain condition; not
    /// part of the trace).
    pub fn set_metrics(&self, node: NodeIndex, metrics: weft::MetricsSnapshot) {
        if let Some(slot) = self.lock().metrics.get_mut(node) {
            *slot = Some(metrics);
        }
    }

    /// Progress counters.
    pub fn progress(&self) -> Progress {
        let inner = self.lock();
        let spool_pending: Vec<Option<u64>> = inner
            .metrics
            .iter()
            .map(|metrics| metrics.map(|m| m.spool_pending + m.events_retained))
            .collect();
        Progress {
            sends_done: inner.sends_done,
            open_receipts: inner.open_receipts.iter().sum(),
            spools_drained: spool_pending.iter().all(|pending| *pending == Some(0)),
            spool_pending,
        }
    }

    /// The records so far and every node's metrics (its earlier incarnations' counters added).
    pub fn snapshot(&self) -> (Vec<Record>, Vec<weft::MetricsSnapshot>) {
        let inner = self.lock();
        let metrics = inner
            .carried
            .iter()
            .zip(&inner.metrics)
            .map(|(carried, current)| {
                let mut total = current.unwrap_or_default();
                add_counters(&mut total, carried);
                total
            })
            .collect();
        (inner.records.clone(), metrics)
    }
}

/// Adds the counters (not the gauges) of `more` to `total`, and keeps the higher of the
/// high-water marks. What a node counted after its last report before a crash (at most the
/// harness's metrics interval) is lost with it, as a scrape of a real process would lose it.
fn add_counters(total: &mut weft::MetricsSnapshot, more: &weft::MetricsSnapshot) {
    total.sent += more.sent;
    total.retransmitted += more.retransmitted;
    total.acked += more.acked;
    total.received += more.received;
    total.duplicates += more.duplicates;
    total.delivered += more.delivered;
    total.protocol_errors += more.protocol_errors;
    total.dial_failures += more.dial_failures;
    total.refusals += more.refusals;
    total.accepted += more.accepted;
    total.dead_lettered += more.dead_lettered;
    total.spool_errors += more.spool_errors;
    total.watermarks_persisted += more.watermarks_persisted;
    total.events_delivered += more.events_delivered;
    total.events_dropped += more.events_dropped;
    total.volatile_dropped += more.volatile_dropped;
    total.event_copies += more.event_copies;
    total.events_received += more.events_received;
    total.events_relayed += more.events_relayed;
    total.events_repaired += more.events_repaired;
    // A high-water mark, not a counter: the most over every incarnation.
    total.event_hops_max = total.event_hops_max.max(more.event_hops_max);
}
