//! The history: what the applications and the scenario saw, recorded outside the nodes.
//!
//! The nodes under test never write here; the simulated applications around them do (a send that
//! returned `Ok`, a message their inbox yielded, a receipt that resolved, a peer event) and so does
//! the fault script. The checkers read only this record, so they judge the driver by what a user of
//! the public API could observe, not by the driver's own bookkeeping.
//!
//! turmoil runs every host on one thread, so one mutex-protected vector gives a total order of
//! events that is itself deterministic; each event carries the simulated time it happened at. The
//! trace hash is a blake3 over the canonical encoding of the whole record (times included): two
//! runs of one seed must produce it byte for byte.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::scenario::FaultAction;

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
    /// `send` returned an error (never expected in the simulation).
    SendFailed {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// The error.
        error: String,
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
        /// First 8 bytes of the body's blake3.
        body_digest: u64,
    },
    /// The receipt of a message resolved: the receiver acknowledged it.
    Acked {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// Sequence number.
        seq: u64,
    },
    /// A receipt failed (the node shut down first; never expected in the simulation).
    ReceiptFailed {
        /// Sender.
        from: NodeIndex,
        /// Destination.
        to: NodeIndex,
        /// Sequence number.
        seq: u64,
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
            Event::SendFailed { from, to, error } => {
                out.push(2);
                node(out, *from);
                node(out, *to);
                number(out, error.len() as u64);
                out.extend(error.as_bytes());
            }
            Event::Delivered {
                at,
                from,
                stream,
                seq,
                body_digest,
            } => {
                out.push(3);
                node(out, *at);
                node(out, from.unwrap_or(u8::MAX as usize));
                number(out, *stream);
                number(out, *seq);
                number(out, *body_digest);
            }
            Event::Acked { from, to, seq } => {
                out.push(4);
                node(out, *from);
                node(out, *to);
                number(out, *seq);
            }
            Event::ReceiptFailed { from, to, seq } => {
                out.push(5);
                node(out, *from);
                node(out, *to);
                number(out, *seq);
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
            Event::SendFailed { from, to, error } => write!(f, "send {from}->{to} failed: {error}"),
            Event::Delivered { at, from, seq, .. } => match from {
                Some(from) => write!(f, "delivered {from}->{at} seq {seq}"),
                None => write!(f, "delivered ?->{at} seq {seq} from an unknown producer"),
            },
            Event::Acked { from, to, seq } => write!(f, "acked {from}->{to} seq {seq}"),
            Event::ReceiptFailed { from, to, seq } => {
                write!(f, "receipt {from}->{to} seq {seq} failed")
            }
            Event::PeerUp { node, peer } => write!(f, "node {node}: peer {peer} up"),
            Event::PeerDown { node, peer } => write!(f, "node {node}: peer {peer} down"),
            Event::ConsumerPaused { node } => write!(f, "node {node}: consumer paused"),
            Event::ConsumerResumed { node } => write!(f, "node {node}: consumer resumed"),
            Event::Fault(action) => write!(f, "fault: {action}"),
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Sends that returned, `Ok` or not.
    pub sends_done: usize,
    /// Receipts that resolved, `Ok` or not.
    pub receipts_done: usize,
}

#[derive(Debug, Default)]
struct Inner {
    records: Vec<Record>,
    progress: Progress,
    metrics: Vec<weft::MetricsSnapshot>,
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
        history.lock().metrics = vec![weft::MetricsSnapshot::default(); nodes];
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
            Event::Accepted { .. } | Event::SendFailed { .. } => inner.progress.sends_done += 1,
            Event::Acked { .. } | Event::ReceiptFailed { .. } => inner.progress.receipts_done += 1,
            _ => {}
        }
        inner.records.push(Record { at, event });
    }

    /// The latest metrics a node reported (for the run summary; not part of the trace).
    pub fn set_metrics(&self, node: NodeIndex, metrics: weft::MetricsSnapshot) {
        if let Some(slot) = self.lock().metrics.get_mut(node) {
            *slot = metrics;
        }
    }

    /// Progress counters.
    pub fn progress(&self) -> Progress {
        self.lock().progress
    }

    /// The records so far and the last metrics of every node.
    pub fn snapshot(&self) -> (Vec<Record>, Vec<weft::MetricsSnapshot>) {
        let inner = self.lock();
        (inner.records.clone(), inner.metrics.clone())
    }
}
