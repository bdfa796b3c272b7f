//! A link: everything one node keeps about one peer, across however many connections come and go.
//!
//! Outbound, a link is a FIFO of messages not yet acknowledged. Each gets the next sequence number of
//! the link's stream when it is pushed and keeps it across retransmissions. At most
//! [`LinkConfig::window_messages`] / [`LinkConfig::window_bytes`] are in flight on a connection;
//! cumulative [`Frame::Ack`]s retire them. When a connection is replaced, transmission restarts
//! from the first unacknowledged message (go-back-N): QUIC already retransmits inside a connection,
//! so the link only has to cover what a dead connection took with it.
//!
//! Inbound, a link accepts exactly the next sequence number of the peer's stream. A lower one is a
//! duplicate (a retransmission of something already delivered): it is dropped and re-acknowledged.
//! A higher one cannot happen on an ordered stream that resumed correctly, so it is a protocol
//! error. One watermark per peer stream is therefore the whole deduplication state: memory does not
//! grow with traffic. (Multi-path delivery such as gossip needs a window above the watermark too;
//! a FIFO link does not.)
//!
//! # Driving a link
//! The driver calls, in this order, whenever something happened:
//! 1. [`Link::connected`] / [`Link::disconnected`] on connection changes;
//! 2. [`Link::push`] for messages the application sends (while [`Link::has_room`]);
//! 3. [`Link::handle_frame`] for each frame read, draining [`Link::pop_delivery`] after each one
//!    (at most one delivery is pending at a time; the driver hands it to the application's queue
//!    and only then pops it, which is what makes it acknowledgeable);
//! 4. [`Link::poll_transmit`] while [`Link::wants_transmit`], writing the bytes to the connection;
//! 5. [`Link::poll_event`] until `None`, resolving receipts.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::frame::{DataFields, DataFrame, EncodeError, Frame, FrameEncoder, Limits};
use crate::id::{MessageId, NodeId, StreamId};
use crate::message::{Header, Kind, Message, Options, Priority};

/// Bounds of a link. Every queue a link holds is capped by one of these.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Most messages in flight (transmitted, unacknowledged) on one connection.
    pub window_messages: usize,
    /// Most body bytes in flight on one connection.
    pub window_bytes: usize,
    /// Most messages held for the peer (in flight plus waiting); beyond it `push` refuses.
    pub queue_messages_max: usize,
    /// Most body bytes held for the peer.
    pub queue_bytes_max: usize,
    /// Frame size limits.
    pub limits: Limits,
    /// A deliberate bug, switched on by the simulation to prove its checkers can fail.
    #[cfg(feature = "fault-injection")]
    pub fault: Fault,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            window_messages: 16_384,
            window_bytes: 16 * 1024 * 1024,
            queue_messages_max: 65_536,
            queue_bytes_max: 64 * 1024 * 1024,
            limits: Limits::default(),
            #[cfg(feature = "fault-injection")]
            fault: Fault::None,
        }
    }
}

/// Deliberate bugs for proving the simulation's checkers.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// No bug.
    #[default]
    None,
    /// Deliver retransmitted duplicates to the application again.
    NoDedup,
    /// After a reconnect, skip what the old connection had in flight (and tell the peer to skip it).
    NoRetransmit,
}

/// A message the application handed over, before it has a sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// What the message is for.
    pub kind: Kind,
    /// Channel or topic.
    pub channel: String,
    /// Priority.
    pub priority: Priority,
    /// Wall-clock creation time, Unix milliseconds.
    pub created_unix_ms: u64,
    /// The rarely used header fields, boxed only when one is set (see [`Options`]).
    pub options: Option<Box<Options>>,
    /// The body.
    pub body: Bytes,
}

impl OutgoingMessage {
    /// A command with default header fields.
    pub fn command(channel: impl Into<String>, body: Bytes, created_unix_ms: u64) -> Self {
        Self {
            kind: Kind::Command,
            channel: channel.into(),
            priority: Priority::NORMAL,
            created_unix_ms,
            options: None,
            body,
        }
    }

    /// The rarely used fields, created on first use.
    pub fn options_mut(&mut self) -> &mut Options {
        self.options.get_or_insert_with(Default::default)
    }

    /// Sets the kind.
    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Links the message to a request (replies) or names it (requests).
    pub fn with_correlation_id(mut self, id: u64) -> Self {
        self.options_mut().correlation_id = Some(id);
        self
    }

    /// Where replies should go.
    pub fn with_reply_to(mut self, node: NodeId) -> Self {
        self.options_mut().reply_to = Some(node);
        self
    }

    /// Routes the message by `key` (sharded channels).
    pub fn with_shard_key(mut self, key: impl Into<Bytes>) -> Self {
        self.options_mut().shard_key = Some(key.into());
        self
    }

    /// The wall-clock time (Unix milliseconds) after which the message is not worth delivering.
    pub fn with_expiry(mut self, expires_unix_ms: u64) -> Self {
        self.options_mut().expires_unix_ms = Some(expires_unix_ms);
        self
    }

    /// Adds an application header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.options_mut().headers.push((key.into(), value.into()));
        self
    }

    /// An upper bound of the encoded header size (postcard varints never exceed these widths).
    pub fn header_bytes_bound(&self) -> usize {
        const FIXED: usize = 10 + 1 + 10 + 11 + 33 + 1 + 1 + 10 + 11 + 5;
        let options = self.options.as_ref().map_or(0, |o| {
            let headers: usize = o.headers.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
            o.shard_key.as_ref().map_or(0, |k| k.len() + 5) + headers
        });
        FIXED + self.channel.len() + 5 + options + 5
    }

    /// Checks the message against the frame limits, so that encoding it later cannot fail.
    pub fn check(&self, limits: &Limits) -> Result<(), EncodeError> {
        if self.body.len() > limits.max_body_bytes {
            return Err(EncodeError::BodyTooLarge {
                len: self.body.len(),
                max: limits.max_body_bytes,
            });
        }
        let bound = self.header_bytes_bound();
        if bound > limits.max_header_bytes {
            return Err(EncodeError::HeaderTooLarge {
                len: bound,
                max: limits.max_header_bytes,
            });
        }
        Ok(())
    }
}

/// Why [`Link::push`] refused a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The link holds its maximum of messages or bytes; wait for acknowledgements.
    #[error("link queue is full ({messages} messages, {bytes} bytes held)")]
    QueueFull {
        /// Messages held.
        messages: usize,
        /// Body bytes held.
        bytes: usize,
    },
    /// The message can never be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// A peer broke the protocol; the connection must be closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Data arrived before the peer said which stream it belongs to.
    #[error("data before resume")]
    DataBeforeResume,
    /// A sequence number skipped ahead on an ordered stream.
    #[error("sequence gap: expected {expected}, got {got}")]
    Gap {
        /// Next expected sequence number.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// An acknowledgement for messages never sent.
    #[error("ack up to {up_to} but only {sent} were ever sent")]
    AckBeyondSent {
        /// Acknowledged sequence number.
        up_to: u64,
        /// Highest assigned sequence number.
        sent: u64,
    },
    /// A handshake frame after the handshake.
    #[error("unexpected {0} frame on an established link")]
    Unexpected(&'static str),
}

/// Something the application should learn about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Every message of the current stream up to and including `up_to` was delivered by the peer.
    Acked {
        /// Highest acknowledged sequence number.
        up_to: u64,
    },
}

/// Counters of a link, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Data frames transmitted for the first time.
    pub sent: u64,
    /// Data frames transmitted again after a reconnect.
    pub retransmitted: u64,
    /// Messages acknowledged by the peer.
    pub acked: u64,
    /// Messages accepted from the peer.
    pub received: u64,
    /// Duplicates from the peer, dropped.
    pub duplicates: u64,
}

#[derive(Debug)]
struct Queued {
    seq: u64,
    message: OutgoingMessage,
    transmissions: u32,
}

#[derive(Debug)]
struct Inbound {
    epoch: u64,
    stream: StreamId,
    /// Highest sequence number accepted (the dedup watermark).
    received: u64,
    /// Highest sequence number handed to the application: what acks report.
    delivered: u64,
}

/// One node's state about one peer. See the module docs.
#[derive(Debug)]
pub struct Link {
    local: NodeId,
    peer: NodeId,
    config: LinkConfig,
    encoder: FrameEncoder,
    // -- outbound --
    epoch: u64,
    stream: StreamId,
    next_seq: u64,
    acked_up_to: u64,
    /// Unacknowledged messages, by ascending seq; the front is `acked_up_to + 1`.
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// Index in `queue` of the next message to transmit on the current connection.
    cursor: usize,
    inflight_bytes: usize,
    connected: bool,
    resume_due: bool,
    /// The peer's resume arrived on this connection: its ack (sent right behind the resume) tells
    /// what it already has, so data waits for it instead of resending a whole window blindly.
    peer_resumed: bool,
    // -- inbound --
    inbound: Option<Inbound>,
    /// (peer stream epoch, message) handed over by `handle_frame`, taken by `pop_delivery`.
    deliveries: VecDeque<(u64, Message)>,
    ack_due: bool,
    events: VecDeque<LinkEvent>,
    stats: LinkStats,
}

impl Link {
    /// A link from `local` to `peer` whose outbound stream is `epoch` (unique per incarnation of
    /// the local node unless the stream is restored from a spool).
    pub fn new(local: NodeId, peer: NodeId, epoch: u64, config: LinkConfig) -> Self {
        Self {
            encoder: FrameEncoder::new(config.limits),
            stream: StreamId::direct(&local, &peer, epoch),
            local,
            peer,
            config,
            epoch,
            next_seq: 1,
            acked_up_to: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            cursor: 0,
            inflight_bytes: 0,
            connected: false,
            resume_due: false,
            peer_resumed: false,
            inbound: None,
            deliveries: VecDeque::new(),
            ack_due: false,
            events: VecDeque::new(),
            stats: LinkStats::default(),
        }
    }

    /// The peer.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The outbound stream.
    pub fn stream(&self) -> StreamId {
        self.stream
    }

    /// The outbound epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number the next pushed message gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest sequence number the peer acknowledged.
    pub fn acked_up_to(&self) -> u64 {
        self.acked_up_to
    }

    /// Messages held (in flight or waiting).
    pub fn queued_messages(&self) -> usize {
        self.queue.len()
    }

    /// Body bytes held.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Whether a connection is attached.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether the peer's resume arrived on the current connection: the connection works both
    /// ways (a driver resets its reconnect backoff only then).
    pub fn peer_resumed(&self) -> bool {
        self.connected && self.peer_resumed
    }

    /// Whether `push` would accept a message of `body_bytes`.
    pub fn has_room(&self, body_bytes: usize) -> bool {
        self.queue.len() < self.config.queue_messages_max
            && (self.queue.is_empty()
                || self.queued_bytes + body_bytes <= self.config.queue_bytes_max)
    }

    /// Queues a message; returns its sequence number.
    pub fn push(&mut self, message: OutgoingMessage) -> Result<u64, PushError> {
        message.check(&self.config.limits)?;
        if !self.has_room(message.body.len()) {
            return Err(PushError::QueueFull {
                messages: self.queue.len(),
                bytes: self.queued_bytes,
            });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queued_bytes += message.body.len();
        self.queue.push_back(Queued {
            seq,
            message,
            transmissions: 0,
        });
        Ok(seq)
    }

    /// A (new) connection to the peer is established and its hello exchange is done.
    pub fn connected(&mut self) {
        self.connected = true;
        self.resume_due = true;
        self.peer_resumed = false;
        #[cfg(feature = "fault-injection")]
        if self.config.fault == Fault::NoRetransmit {
            // The bug: carry on after what the old connection took, as if it had arrived.
            self.ack_due |= self.inbound.is_some();
            return;
        }
        self.cursor = 0;
        self.inflight_bytes = 0;
        // Tell the peer what we have, so it can retire what we got but whose ack the old
        // connection lost.
        self.ack_due |= self.inbound.is_some();
    }

    /// The connection is gone. Everything unacknowledged stays queued for the next one.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.resume_due = false;
    }

    /// Processes one frame from the peer.
    ///
    /// Acknowledgements concern this node's own stream, not the data ahead of them, so a driver
    /// may hand them in while a delivery is still pending (and ahead of data it holds back).
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), LinkError> {
        debug_assert!(
            self.deliveries.is_empty() || matches!(frame, Frame::Ack { .. }),
            "drain deliveries before the next data frame"
        );
        match frame {
            Frame::Data(data) => self.handle_data(data),
            Frame::Ack { epoch, up_to } => self.handle_ack(epoch, up_to),
            Frame::Resume { epoch, next_seq } => {
                self.handle_resume(epoch, next_seq);
                Ok(())
            }
            Frame::Hello(_) => Err(LinkError::Unexpected("hello")),
            Frame::Welcome(_) => Err(LinkError::Unexpected("welcome")),
            Frame::Refuse(_) => Err(LinkError::Unexpected("refuse")),
        }
    }

    fn handle_resume(&mut self, epoch: u64, next_seq: u64) {
        self.peer_resumed = true;
        let base = next_seq.saturating_sub(1);
        match &mut self.inbound {
            Some(inbound) if inbound.epoch == epoch => {
                // The peer says everything below `next_seq` was acknowledged by us. Normally we
                // already know; if not, we lost state, and the peer is the authority.
                inbound.received = inbound.received.max(base);
                inbound.delivered = inbound.delivered.max(base);
            }
            _ => {
                self.inbound = Some(Inbound {
                    epoch,
                    stream: StreamId::direct(&self.peer, &self.local, epoch),
                    received: base,
                    delivered: base,
                });
            }
        }
        self.ack_due = true;
    }

    fn handle_data(&mut self, data: DataFrame) -> Result<(), LinkError> {
        let Some(inbound) = &mut self.inbound else {
            return Err(LinkError::DataBeforeResume);
        };
        let expected = inbound.received + 1;
        if data.seq < expected {
            self.stats.duplicates += 1;
            self.ack_due = true;
            #[cfg(feature = "fault-injection")]
            if self.config.fault == Fault::NoDedup {
                let epoch = inbound.epoch;
                let message = to_message(self.peer, inbound.stream, data);
                self.deliveries.push_back((epoch, message));
            }
            return Ok(());
        }
        if data.seq > expected {
            return Err(LinkError::Gap {
                expected,
                got: data.seq,
            });
        }
        inbound.received = data.seq;
        self.stats.received += 1;
        let epoch = inbound.epoch;
        let message = to_message(self.peer, inbound.stream, data);
        self.deliveries.push_back((epoch, message));
        Ok(())
    }

    fn handle_ack(&mut self, epoch: u64, up_to: u64) -> Result<(), LinkError> {
        if epoch != self.epoch {
            return Ok(()); // about a stream of an earlier incarnation
        }
        if up_to >= self.next_seq {
            return Err(LinkError::AckBeyondSent {
                up_to,
                sent: self.next_seq - 1,
            });
        }
        if up_to <= self.acked_up_to {
            return Ok(());
        }
        while let Some(front) = self.queue.front() {
            if front.seq > up_to {
                break;
            }
            let done = self.queue.pop_front().expect("front exists");
            self.queued_bytes -= done.message.body.len();
            if self.cursor > 0 {
                self.cursor -= 1;
                self.inflight_bytes = self.inflight_bytes.saturating_sub(done.message.body.len());
            }
            self.stats.acked += 1;
        }
        self.acked_up_to = up_to;
        self.events.push_back(LinkEvent::Acked { up_to });
        Ok(())
    }

    /// The message the last frame delivered, if any, without taking it (to find its channel).
    pub fn peek_delivery(&self) -> Option<&Message> {
        self.deliveries.front().map(|(_, m)| m)
    }

    /// Takes the delivered message: the application now has it, so it becomes acknowledgeable.
    pub fn pop_delivery(&mut self) -> Option<Message> {
        let (epoch, message) = self.deliveries.pop_front()?;
        if let Some(inbound) = &mut self.inbound {
            if inbound.epoch == epoch && message.header.id.seq > inbound.delivered {
                inbound.delivered = message.header.id.seq;
                self.ack_due = true;
            }
        }
        Some(message)
    }

    fn window_open(&self) -> bool {
        self.peer_resumed
            && self.cursor < self.queue.len()
            && self.cursor < self.config.window_messages
            && self.inflight_bytes < self.config.window_bytes
    }

    /// Whether `poll_transmit` has anything to write.
    pub fn wants_transmit(&self) -> bool {
        self.connected && (self.resume_due || self.ack_due || self.window_open())
    }

    /// Appends frames to `buf` until it holds `max_bytes` or nothing is left to send: first the
    /// resume and the acknowledgement (so they never wait behind bulk data), then data in order.
    pub fn poll_transmit(&mut self, buf: &mut BytesMut, max_bytes: usize) {
        if !self.connected {
            return;
        }
        if self.resume_due {
            self.resume_due = false;
            let next_seq = self.resume_point();
            self.control(
                buf,
                &Frame::Resume {
                    epoch: self.epoch,
                    next_seq,
                },
            );
        }
        if self.ack_due {
            self.ack_due = false;
            if let Some(inbound) = &self.inbound {
                let frame = Frame::Ack {
                    epoch: inbound.epoch,
                    up_to: inbound.delivered,
                };
                self.control(buf, &frame);
            }
        }
        while buf.len() < max_bytes && self.window_open() {
            let entry = &mut self.queue[self.cursor];
            entry.transmissions += 1;
            let message = &entry.message;
            let fields = DataFields {
                seq: entry.seq,
                kind: message.kind,
                channel: &message.channel,
                priority: message.priority,
                created_unix_ms: message.created_unix_ms,
                attempt: entry.transmissions,
                options: message.options.as_deref(),
            };
            // `push` checked the message against the limits with an upper bound of its encoded size.
            if let Err(e) = self.encoder.data(buf, &fields, &message.body) {
                unreachable!("message passed its limit check but failed to encode: {e}");
            }
            if entry.transmissions == 1 {
                self.stats.sent += 1;
            } else {
                self.stats.retransmitted += 1;
            }
            self.inflight_bytes += message.body.len();
            self.cursor += 1;
        }
    }

    fn resume_point(&self) -> u64 {
        #[cfg(feature = "fault-injection")]
        if self.config.fault == Fault::NoRetransmit {
            return self.queue.get(self.cursor).map_or(self.next_seq, |q| q.seq);
        }
        self.acked_up_to + 1
    }

    fn control(&self, buf: &mut BytesMut, frame: &Frame) {
        // Control frames are a few dozen bytes with no user-controlled fields.
        if let Err(e) = self.encoder.control(buf, frame) {
            unreachable!("control frame failed to encode: {e}");
        }
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }
}

fn to_message(producer: NodeId, stream: StreamId, data: DataFrame) -> Message {
    Message {
        header: Header {
            id: MessageId {
                producer,
                stream,
                seq: data.seq,
            },
            kind: data.kind,
            channel: data.channel,
            priority: data.priority,
            created_unix_ms: data.created_unix_ms,
            attempt: data.attempt,
            options: data.options,
        },
        body: data.body,
    }
}
