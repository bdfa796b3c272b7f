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
use std::num::NonZeroU64;

use bytes::{Bytes, BytesMut};

use crate::frame::{DataContext, DataFields, DataFrame, EncodeError, Frame, FrameEncoder, Limits};
use crate::id::{MessageId, NodeId, StreamId};
use crate::message::{Header, Kind, Lane, Message, Options, Priority};

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
    /// When outbound messages give up (see [`Link::expire`]).
    pub retry: RetryPolicy,
    /// Most volatile messages (see [`Link::push_volatile`]) waiting for the connection.
    pub volatile_messages_max: usize,
    /// Acknowledge a message as soon as [`Link::pop_delivery`] hands it over. Off, the driver
    /// decides with [`Link::acknowledge`] (after the application took the message and the
    /// watermark is durable) and learns of skipped and new inbound streams from [`LinkEvent`]s.
    pub ack_on_delivery: bool,
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
            retry: RetryPolicy::default(),
            volatile_messages_max: 4096,
            ack_on_delivery: true,
            #[cfg(feature = "fault-injection")]
            fault: Fault::None,
        }
    }
}

/// How long an outbound message is retried before it goes to the dead-letter log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most connections a message is transmitted on without being acknowledged (a message that
    /// every connection dies on, e.g. one that crashes its receiver, stops here).
    pub max_attempts: u32,
    /// Most wall-clock milliseconds from a message's creation to its acknowledgement, whether or
    /// not the peer was reachable meanwhile.
    pub max_age_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 16,
            max_age_ms: 24 * 60 * 60 * 1000,
        }
    }
}

/// Why an outbound message was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// Its own expiry passed.
    Expired,
    /// It was transmitted on this many connections without an acknowledgement.
    Attempts(u32),
    /// It is older than [`RetryPolicy::max_age_ms`].
    TooOld,
    /// Its driver gave it up ([`Link::give_up`]): an event owed to durable subscriptions that
    /// all exceeded their retention budget.
    Retention,
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Expired => f.write_str("expired"),
            Self::Attempts(n) => write!(f, "retry budget exhausted after {n} attempts"),
            Self::TooOld => f.write_str("retry period exhausted"),
            Self::Retention => f.write_str("durable subscription retention exceeded"),
        }
    }
}

/// A message [`Link::expire`] took out of the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GivenUp {
    /// Its sequence number.
    pub seq: u64,
    /// The driver's tag given to [`Link::push_at`].
    pub tag: u64,
    /// Why.
    pub reason: GiveUp,
    /// The message.
    pub message: OutgoingMessage,
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
    /// (Driver) report sends accepted before the spool's fsync.
    AckBeforeFsync,
    /// (Driver) acknowledge inbound messages before their watermark is durable.
    WatermarkAfterAck,
}

/// A message the application handed over, before it has a sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// What the message is for.
    pub kind: Kind,
    /// Channel or topic.
    pub channel: crate::Channel,
    /// Priority.
    pub priority: Priority,
    /// Wall-clock creation time, Unix milliseconds. 0: not stamped yet (a node stamps it when
    /// it takes the message, once per batch).
    pub created_unix_ms: u64,
    /// The rarely used header fields, boxed only when one is set (see [`Options`]).
    pub options: Option<Box<Options>>,
    /// The body.
    pub body: Bytes,
    /// Deliver not before this wall-clock time (Unix milliseconds, the *sender's* clock): the
    /// sender holds the message in its schedule and numbers it into the stream only then (see
    /// [`crate::schedule`]). `None`: at once. Not a wire field: the receiver sees an ordinary
    /// message; the spool keeps it (see [`crate::spooled`]). Also the start of the retry
    /// policy's age ([`RetryPolicy::max_age_ms`]) for a delayed message.
    pub deliver_after: Option<NonZeroU64>,
}

impl OutgoingMessage {
    /// A command with default header fields.
    pub fn command(channel: impl Into<crate::Channel>, body: Bytes, created_unix_ms: u64) -> Self {
        Self {
            kind: Kind::Command,
            channel: channel.into(),
            priority: Priority::NORMAL,
            created_unix_ms,
            options: None,
            body,
            deliver_after: None,
        }
    }

    /// Deliver not before `unix_ms` (the sender's wall clock; see
    /// [`OutgoingMessage::deliver_after`]). 0 means at once.
    pub fn with_deliver_after(mut self, unix_ms: u64) -> Self {
        self.deliver_after = NonZeroU64::new(unix_ms);
        self
    }

    /// Deliver not before `delay` after the message's creation time (`created_unix_ms`, which
    /// the node stamps from its clock); a zero delay means at once.
    pub fn with_delay(self, delay: std::time::Duration) -> Self {
        if delay.is_zero() {
            return self;
        }
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
        let at = self.created_unix_ms.saturating_add(delay_ms);
        self.with_deliver_after(at)
    }

    /// Deliver not before `at` (see [`OutgoingMessage::with_deliver_after`]; a time before the
    /// Unix epoch means at once). Converts only: reads no clock.
    pub fn with_deliver_at(self, at: std::time::SystemTime) -> Self {
        let unix_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.with_deliver_after(unix_ms)
    }

    /// The time the message is due, if it is delayed (Unix milliseconds).
    pub fn deliver_after_unix_ms(&self) -> Option<u64> {
        self.deliver_after.map(NonZeroU64::get)
    }

    /// From when the retry policy's age counts: its due time if it is delayed (it waited in the
    /// schedule until then on purpose), else its creation.
    pub fn age_base_unix_ms(&self) -> u64 {
        self.deliver_after_unix_ms()
            .map_or(self.created_unix_ms, |due| due.max(self.created_unix_ms))
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
    /// No connection is up: a volatile message has nothing to wait on.
    #[error("not connected")]
    NotConnected,
    /// The volatile queue holds its maximum; wait for the connection to take some.
    #[error("volatile queue is full ({0} messages)")]
    VolatileFull(usize),
    /// The sequence number is below the next free one.
    #[error("sequence number {seq} was already used (next is {next})")]
    Reused {
        /// The number given.
        seq: u64,
        /// The lowest acceptable.
        next: u64,
    },
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
    /// The peer started (or restarted after losing its spool) an inbound stream: nothing below
    /// `base + 1` will arrive on it. Replaces any earlier inbound stream.
    InboundStream {
        /// The stream's epoch.
        epoch: u64,
        /// Everything up to here is settled.
        base: u64,
    },
    /// The peer skipped inbound sequence numbers (it gave them up): everything up to `up_to`
    /// that had not arrived never will.
    Skipped {
        /// The stream's epoch.
        epoch: u64,
        /// Lowest skipped sequence number (everything below it arrived).
        from: u64,
        /// Highest skipped sequence number.
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
    /// Volatile messages transmitted.
    pub volatile_sent: u64,
    /// Volatile messages dropped because the connection went away before they were written.
    pub volatile_dropped: u64,
    /// Volatile messages accepted from the peer.
    pub volatile_received: u64,
}

#[derive(Debug)]
struct Queued {
    seq: u64,
    tag: u64,
    message: OutgoingMessage,
    transmissions: u32,
}

#[derive(Debug)]
struct Inbound {
    epoch: u64,
    stream: StreamId,
    /// Highest sequence number accepted or skipped (the dedup watermark).
    received: u64,
    /// What acks report: the highest sequence number delivered (or acknowledged by the driver).
    acked: u64,
}

/// One node's state about one peer. See the module docs.
#[derive(Debug)]
pub struct Link {
    local: NodeId,
    peer: NodeId,
    lane: Lane,
    config: LinkConfig,
    encoder: FrameEncoder,
    /// The last data frame written on the current connection's stream (a run on one channel
    /// sends its header once, see [`DataContext`]); forgotten with the connection.
    sent_data: DataContext,
    // -- outbound --
    epoch: u64,
    stream: StreamId,
    next_seq: u64,
    acked_up_to: u64,
    /// Unacknowledged messages, by ascending seq; the front is `acked_up_to + 1`.
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// Volatile messages waiting for the current connection (never retransmitted).
    volatile: VecDeque<OutgoingMessage>,
    /// Index in `queue` of the next message to transmit on the current connection.
    cursor: usize,
    inflight_bytes: usize,
    /// The sequence number the peer expects next on the current connection; a queued message
    /// above it (its predecessors were given up) is preceded by a resume that skips the gap.
    peer_expects: u64,
    /// Tags of acknowledged messages, for the driver (see [`Link::take_retired`]).
    retired: Vec<u64>,
    connected: bool,
    /// The lowest withdrawn sequence number whose withdrawal is not settled (see
    /// [`Link::hold_for_withdrawal`]): until then no data goes out, and no resume names a
    /// later number, so the peer is not told to skip it.
    withdrawn_unsettled: Option<u64>,
    /// Withdrawals not yet settled.
    withdrawals: u32,
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
        Self::with_lane(local, peer, epoch, Lane::Normal, config)
    }

    /// A link for one [`Lane`] to `peer`: its streams (outbound and inbound) are that lane's.
    pub fn with_lane(
        local: NodeId,
        peer: NodeId,
        epoch: u64,
        lane: Lane,
        config: LinkConfig,
    ) -> Self {
        Self {
            encoder: FrameEncoder::new(config.limits),
            sent_data: DataContext::new(),
            stream: StreamId::lane(&local, &peer, epoch, lane),
            local,
            peer,
            lane,
            config,
            epoch,
            next_seq: 1,
            acked_up_to: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            volatile: VecDeque::new(),
            cursor: 0,
            inflight_bytes: 0,
            peer_expects: 1,
            retired: Vec::new(),
            connected: false,
            withdrawn_unsettled: None,
            withdrawals: 0,
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

    /// The lane.
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// The peer's inbound stream of this lane in `epoch`.
    pub fn inbound_stream(&self, epoch: u64) -> StreamId {
        StreamId::lane(&self.peer, &self.local, epoch, self.lane)
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

    /// Whether [`Link::push_volatile`] would accept a message now.
    pub fn has_volatile_room(&self) -> bool {
        self.volatile.len() < self.config.volatile_messages_max
    }

    /// Queues a volatile message: sent on the current connection ahead of sequenced data, with
    /// sequence number 0, never acknowledged, never retransmitted; if the connection goes away
    /// before it is written, it is dropped (and counted). For traffic whose loss the layer above
    /// handles itself (requests and replies with timeouts, interest announcements that are sent
    /// again on every connection, best-effort events).
    pub fn push_volatile(&mut self, message: OutgoingMessage) -> Result<(), PushError> {
        message.check(&self.config.limits)?;
        if !self.connected {
            self.stats.volatile_dropped += 1;
            return Err(PushError::NotConnected);
        }
        if !self.has_volatile_room() {
            return Err(PushError::VolatileFull(self.volatile.len()));
        }
        self.volatile.push_back(message);
        Ok(())
    }

    /// Queues a message under the next sequence number; returns it.
    pub fn push(&mut self, message: OutgoingMessage) -> Result<u64, PushError> {
        let seq = self.next_seq;
        self.push_at(seq, 0, message)?;
        Ok(seq)
    }

    /// Queues a message under `seq`, which must be at least [`Link::next_seq`]: a driver that
    /// assigns sequence numbers itself (they are in its spool before they reach the link) passes
    /// them here; numbers it skipped (given up before they were queued) are skipped on the wire.
    /// `tag` is the driver's (its spool record), returned by [`Link::take_retired`] and
    /// [`Link::expire`]; 0 means none.
    pub fn push_at(
        &mut self,
        seq: u64,
        tag: u64,
        message: OutgoingMessage,
    ) -> Result<(), PushError> {
        message.check(&self.config.limits)?;
        if !self.has_room(message.body.len()) {
            return Err(PushError::QueueFull {
                messages: self.queue.len(),
                bytes: self.queued_bytes,
            });
        }
        if seq < self.next_seq {
            return Err(PushError::Reused {
                seq,
                next: self.next_seq,
            });
        }
        self.next_seq = seq + 1;
        self.queued_bytes += message.body.len();
        self.queue.push_back(Queued {
            seq,
            tag,
            message,
            transmissions: 0,
        });
        Ok(())
    }

    /// Continues an outbound stream of an earlier incarnation (restored from a spool): `epoch`
    /// as before, everything up to `acked_up_to` settled. Only on a link that queued nothing yet.
    pub fn restore_outbound(&mut self, epoch: u64, acked_up_to: u64) {
        debug_assert!(self.queue.is_empty() && self.next_seq == 1);
        self.epoch = epoch;
        self.stream = StreamId::lane(&self.local, &self.peer, epoch, self.lane);
        self.acked_up_to = acked_up_to;
        self.next_seq = acked_up_to + 1;
    }

    /// Continues an inbound stream whose watermark was persisted: messages up to `up_to` of the
    /// peer's stream `epoch` are duplicates from now on.
    pub fn restore_inbound(&mut self, epoch: u64, up_to: u64) {
        self.inbound = Some(Inbound {
            epoch,
            stream: self.inbound_stream(epoch),
            received: up_to,
            acked: up_to,
        });
    }

    /// The inbound stream: (epoch, highest received or skipped, highest acknowledged).
    pub fn inbound(&self) -> Option<(u64, u64, u64)> {
        self.inbound
            .as_ref()
            .map(|i| (i.epoch, i.received, i.acked))
    }

    /// Acknowledges the peer's messages up to `up_to` of stream `epoch` (with
    /// [`LinkConfig::ack_on_delivery`] off). Ignored for another epoch; capped at what arrived.
    pub fn acknowledge(&mut self, epoch: u64, up_to: u64) {
        if let Some(inbound) = &mut self.inbound {
            let up_to = up_to.min(inbound.received);
            if inbound.epoch == epoch && up_to > inbound.acked {
                inbound.acked = up_to;
                self.ack_due = true;
            }
        }
    }

    /// Moves the driver's tags of messages acknowledged since the last call into `out`.
    pub fn take_retired(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.retired);
    }

    /// Gives up queued messages that are past their expiry or the [`RetryPolicy`], except those
    /// in flight on the current connection (their acknowledgement may be on its way). The peer is
    /// told to skip their sequence numbers. `now_unix_ms` is the wall clock.
    pub fn expire(&mut self, now_unix_ms: u64) -> Vec<GivenUp> {
        let policy = self.config.retry;
        let first = if self.connected { self.cursor } else { 0 };
        let verdict = |q: &Queued| {
            let expires = q.message.options.as_ref().and_then(|o| o.expires_unix_ms);
            if expires.is_some_and(|at| now_unix_ms >= at) {
                Some(GiveUp::Expired)
            } else if q.transmissions >= policy.max_attempts {
                Some(GiveUp::Attempts(q.transmissions))
            } else if now_unix_ms.saturating_sub(q.message.age_base_unix_ms()) > policy.max_age_ms {
                Some(GiveUp::TooOld)
            } else {
                None
            }
        };
        if !self.queue.iter().skip(first).any(|q| verdict(q).is_some()) {
            return Vec::new();
        }
        self.give_up_where(verdict)
    }

    /// Gives up the queued messages numbered `seqs` (ascending) for `reason`, except those in
    /// flight on a live connection, like [`Link::expire`]: the peer is told to skip them.
    pub fn give_up(&mut self, seqs: &[u64], reason: GiveUp) -> Vec<GivenUp> {
        self.give_up_where(|q| seqs.binary_search(&q.seq).is_ok().then_some(reason))
    }

    /// Gives up the queued messages not in flight for which `verdict` has a reason.
    fn give_up_where(&mut self, verdict: impl Fn(&Queued) -> Option<GiveUp>) -> Vec<GivenUp> {
        self.take_unsent(verdict)
            .into_iter()
            .map(|(queued, reason)| GivenUp {
                seq: queued.seq,
                tag: queued.tag,
                reason,
                message: queued.message,
            })
            .collect()
    }

    /// The queued messages (in flight or waiting), by ascending sequence number.
    pub fn queued(&self) -> impl Iterator<Item = (u64, &OutgoingMessage)> {
        self.queue
            .iter()
            .map(|queued| (queued.seq, &queued.message))
    }

    /// Takes back the queued messages that `select` picks, except those in flight on a live
    /// connection (a driver withdraws work from a peer that went silent, to give it to another).
    /// The peer is told to skip their numbers, as for given-up messages — once the driver
    /// settles the withdrawal, if it holds it with [`Link::hold_for_withdrawal`]. Returns them
    /// in sequence order.
    pub fn withdraw(
        &mut self,
        select: impl Fn(&OutgoingMessage) -> bool,
    ) -> Vec<(u64, u64, OutgoingMessage)> {
        self.take_unsent(|q| select(&q.message).then_some(()))
            .into_iter()
            .map(|(queued, ())| (queued.seq, queued.tag, queued.message))
            .collect()
    }

    /// Takes out of the queue the messages `pick` names (with what it said of each), in
    /// sequence order, except those in flight on a live connection (their acknowledgement may
    /// be on its way).
    fn take_unsent<T>(&mut self, pick: impl Fn(&Queued) -> Option<T>) -> Vec<(Queued, T)> {
        let first = if self.connected { self.cursor } else { 0 };
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for (index, queued) in self.queue.drain(..).enumerate() {
            match pick(&queued).filter(|_| index >= first) {
                Some(said) => {
                    self.queued_bytes -= queued.message.body.len();
                    taken.push((queued, said));
                }
                None => kept.push_back(queued),
            }
        }
        self.queue = kept;
        taken
    }

    /// Holds the stream at `first`, a withdrawn number, until [`Link::settle_withdrawal`]:
    /// nothing after it goes out and a resume names no later number, so the peer is not told
    /// to skip it yet. A driver holds a withdrawal until the withdrawn messages are durable
    /// elsewhere: if it crashes before, its spool gives them back to this link under their old
    /// numbers, and a peer told to skip them would drop them.
    pub fn hold_for_withdrawal(&mut self, first: u64) {
        self.withdrawn_unsettled = Some(self.withdrawn_unsettled.map_or(first, |w| w.min(first)));
        self.withdrawals += 1;
    }

    /// Settles one held withdrawal; once all are, the stream goes on (skipping the numbers).
    pub fn settle_withdrawal(&mut self) {
        self.withdrawals = self.withdrawals.saturating_sub(1);
        if self.withdrawals == 0 {
            self.withdrawn_unsettled = None;
        }
    }

    /// A (new) connection to the peer is established and its hello exchange is done.
    pub fn connected(&mut self) {
        self.connected = true;
        self.sent_data.reset();
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
        self.sent_data.reset();
        self.resume_due = false;
        self.stats.volatile_dropped += self.volatile.len() as u64;
        self.volatile.clear();
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
                // Everything below `next_seq` is settled on the peer's side: acknowledged by us
                // (normally we know; if not, we lost state and the peer is the authority), or
                // given up by the peer.
                if base > inbound.received {
                    let from = inbound.received + 1;
                    inbound.received = base;
                    if self.config.ack_on_delivery {
                        inbound.acked = base;
                    } else {
                        self.events.push_back(LinkEvent::Skipped {
                            epoch,
                            from,
                            up_to: base,
                        });
                    }
                }
            }
            _ => {
                self.inbound = Some(Inbound {
                    epoch,
                    stream: self.inbound_stream(epoch),
                    received: base,
                    acked: base,
                });
                self.events
                    .push_back(LinkEvent::InboundStream { epoch, base });
            }
        }
        self.ack_due = true;
    }

    fn handle_data(&mut self, data: DataFrame) -> Result<(), LinkError> {
        let Some(inbound) = &mut self.inbound else {
            return Err(LinkError::DataBeforeResume);
        };
        if data.seq == 0 {
            // Volatile: outside the sequence, neither deduplicated nor acknowledged.
            self.stats.volatile_received += 1;
            let epoch = inbound.epoch;
            let message = to_message(self.peer, inbound.stream, data);
            self.deliveries.push_back((epoch, message));
            return Ok(());
        }
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
            if done.tag != 0 {
                self.retired.push(done.tag);
            }
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
        if self.config.ack_on_delivery {
            if let Some(inbound) = &mut self.inbound {
                if inbound.epoch == epoch && message.header.id.seq > inbound.acked {
                    inbound.acked = message.header.id.seq;
                    self.ack_due = true;
                }
            }
        }
        Some(message)
    }

    fn window_open(&self) -> bool {
        self.peer_resumed
            && self.withdrawn_unsettled.is_none()
            && self.cursor < self.queue.len()
            && self.cursor < self.config.window_messages
            && self.inflight_bytes < self.config.window_bytes
    }

    /// Whether `poll_transmit` has anything to write.
    pub fn wants_transmit(&self) -> bool {
        self.connected
            && (self.resume_due || self.ack_due || !self.volatile.is_empty() || self.window_open())
    }

    /// Appends frames to `buf` until it holds `max_bytes` or nothing is left to send: first the
    /// resume and the acknowledgement (so they never wait behind bulk data), then data in order.
    pub fn poll_transmit(&mut self, buf: &mut BytesMut, max_bytes: usize) {
        self.transmit(buf, None, max_bytes);
    }

    /// Like [`Link::poll_transmit`], but a body of [`SEPARATE_BODY_BYTES`] or more is not copied
    /// into `buf`: what `buf` holds up to the body's frame header is split off into `chunks`,
    /// followed by the body itself (shared, not copied). The caller appends what is left in
    /// `buf` after the call; `chunks` then holds the bytes to write, in order.
    pub fn poll_transmit_chunks(
        &mut self,
        buf: &mut BytesMut,
        chunks: &mut VecDeque<Bytes>,
        max_bytes: usize,
    ) {
        self.transmit(buf, Some(chunks), max_bytes);
    }

    fn transmit(
        &mut self,
        buf: &mut BytesMut,
        mut chunks: Option<&mut VecDeque<Bytes>>,
        max_bytes: usize,
    ) {
        // Bytes handed to `chunks` by this call, which count against `max_bytes` too.
        let mut chunked = 0;
        if !self.connected {
            return;
        }
        if self.resume_due {
            self.resume_due = false;
            let next_seq = self.resume_point();
            self.peer_expects = next_seq;
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
                    up_to: inbound.acked,
                };
                self.control(buf, &frame);
            }
        }
        while buf.len() + chunked < max_bytes {
            let Some(message) = self.volatile.pop_front() else {
                break;
            };
            chunked += encode_data(
                &self.encoder,
                &mut self.sent_data,
                buf,
                chunks.as_deref_mut(),
                0,
                1,
                &message,
            );
            self.stats.volatile_sent += 1;
        }
        while buf.len() + chunked < max_bytes && self.window_open() {
            let seq = self.queue[self.cursor].seq;
            if seq != self.peer_expects {
                // Its predecessors were given up: tell the peer not to wait for them.
                self.control(
                    buf,
                    &Frame::Resume {
                        epoch: self.epoch,
                        next_seq: seq,
                    },
                );
            }
            self.peer_expects = seq + 1;
            let entry = &mut self.queue[self.cursor];
            entry.transmissions += 1;
            let message = &entry.message;
            chunked += encode_data(
                &self.encoder,
                &mut self.sent_data,
                buf,
                chunks.as_deref_mut(),
                entry.seq,
                entry.transmissions,
                message,
            );
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
        // The first message still queued; with nothing queued, the next number (a peer that
        // has not seen messages that were given up must not wait for them either).
        let first = self.queue.front().map_or(self.next_seq, |q| q.seq);
        // Not past a withdrawn number whose withdrawal is not settled.
        self.withdrawn_unsettled.map_or(first, |w| w.min(first))
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

/// Bodies from this size on are handed to the transport as their own buffer rather than copied
/// behind their frame header (see [`Link::poll_transmit_chunks`]); below it one copy into a
/// batch is cheaper than a buffer of its own.
pub const SEPARATE_BODY_BYTES: usize = 16 * 1024;

/// Encodes `message` as data frame `seq` (transmission `attempt`) into `buf`, or with `chunks`
/// and a large body its header into `buf` and then `buf` and the body into `chunks`. Returns
/// the bytes moved to `chunks`.
fn encode_data(
    encoder: &FrameEncoder,
    context: &mut DataContext,
    buf: &mut BytesMut,
    chunks: Option<&mut VecDeque<Bytes>>,
    seq: u64,
    attempt: u32,
    message: &OutgoingMessage,
) -> usize {
    let fields = &DataFields {
        seq,
        kind: message.kind,
        channel: &message.channel,
        priority: message.priority,
        created_unix_ms: message.created_unix_ms,
        attempt,
        options: message.options.as_deref(),
    };
    let body = &message.body;
    // `push` checked the message against the limits with an upper bound of its encoded size.
    let encoded = match chunks {
        Some(chunks) if body.len() >= SEPARATE_BODY_BYTES => encoder
            .data_header_in(context, buf, fields, body.len())
            .map(|()| {
                let head = buf.split().freeze();
                let moved = head.len() + body.len();
                chunks.push_back(head);
                chunks.push_back(body.clone());
                moved
            }),
        _ => encoder.data_in(context, buf, fields, body).map(|()| 0),
    };
    match encoded {
        Ok(moved) => moved,
        Err(e) => unreachable!("message passed its limit check but failed to encode: {e}"),
    }
}
