//! Event dissemination: relay trees, per-subscriber chains, and the publisher's retention and
//! repair. The publisher does not send an event to every subscriber itself: it sends it to at
//! most `fanout` of them, each of which relays it to at most `fanout` more, and so on.
//!
//! # The route
//! Every event carries the list of its addressees below the node it is sent to ([`Hop`]s): the
//! first is the receiver itself (on the wire only its `prev`: the receiver knows who it is), the
//! rest its subtree. The receiver splits the rest into at most
//! `fanout` contiguous chunks ([`split`]); the head of each chunk is a child, the chunk its
//! route. A publisher with `n` addressees thus reaches each in at most ⌈log_fanout(n)⌉ + 1 hops,
//! and each addressee receives exactly one copy — the layout is the publisher's (source
//! routing), so relays need no view of the membership and never disagree about it. The
//! publisher orders addressees by a hash of (publisher, addressee), so each publisher's tree puts
//! different nodes in the relaying positions, and connected addressees first, so a node that is
//! away is a leaf and holds up nobody.
//!
//! Each hop is a sequenced link message — or part of one: without a spool, events for the same
//! hop queued while its link is busy travel together as a [`Run`] — acknowledged, spooled,
//! retried. A relay forwards before
//! it takes the next message, so the hop to it is acknowledged only once the copies for its
//! subtree are accepted (durable with a spool).
//!
//! # Chains
//! Copies of one publisher's events reach a subscriber over different paths when the tree
//! changes, so each [`Hop`] names `prev`: the seq of the previous event the publisher addressed
//! to that subscriber (0: the first since the subscriber's current start). A subscriber delivers
//! an event only after its `prev` ([`Chains`]): FIFO per publisher, and a repeated event (seq at
//! or below the last delivered) is dropped — exactly once per subscriber start.
//!
//! # Retention and repair
//! The publisher keeps each event ([`Publisher`]) until every addressee confirmed it
//! ([`Confirm`]: the last seq delivered, sent now and then). An addressee that makes no progress
//! for `repair_after` (a relay crashed, a path is cut, its out-of-order buffer overflowed) is
//! handed everything unconfirmed over its direct link, in order; from then on that link owns it
//! (acked, spooled, retried; dead-lettered after its budget: never silently gone), and retention
//! lets go. When retention is full, the addressees holding its oldest event are handed over at
//! once, so memory stays bounded and a stuck subscriber stalls a publisher for no longer.
//!
//! # Durable subscribers: straight over the publisher's link
//! A node with a durable subscription at this publisher (see [`crate::interest`]) is never put in
//! a tree: the publisher sends it every event it addresses to it itself ([`Fanout::direct`]),
//! flagged [`Event::direct`] and naming the durable subscriptions it is owed to
//! ([`Event::durable`]), and hands it over to that link at once (no retention, no repair). The
//! link is FIFO and deduplicated across restarts of either end (spool, persisted watermark), so
//! such a subscriber needs neither the chain's reordering nor the publisher's repair, and when it
//! is away the events it is owed wait in the publisher's link (and spool) until it is back. The
//! chain still orders them: a node that becomes durable while tree copies are on their way gets
//! what it was owed handed over first ([`Fanout::repairs`], in order, before the new event), and
//! a subscriber whose chain is fresh (it restarted: its chains are memory) takes a direct event
//! as the start of its chain ([`Chains::accept_direct`]) — the link already dropped what it
//! delivered before its restart, so nothing comes twice.
//!
//! Maps are ordered: repairs and confirmations come out in node id order, the same in every run
//! (the simulation replays a seed bit for bit).

use std::collections::{BTreeMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

use crate::id::{NodeId, NODE_ID_LEN};
use crate::message::{Priority, HEADERS_MAX, HEADER_NAME_MAX, HEADER_VALUE_MAX};
use crate::topic::{Topic, TopicError, TOPIC_BYTES_MAX};

/// Most hops an event's route may list.
pub const ROUTE_MAX: usize = 4096;

/// Most durable subscription names one event may carry.
pub const DURABLE_NAMES_MAX: usize = 64;

const FLAG_ORIGIN: u8 = 1;
const FLAG_DIRECT: u8 = 2;
/// The event carries [`EventOptions`] (between its topic and its payload).
const FLAG_OPTIONS: u8 = 4;
/// The route's first hop is the receiver: only its `prev` is written (32 bytes less per copy).
/// Always set by this version's encoders when the route is not empty; an event without it
/// (written by an earlier version, say, and kept in a spool) lists the first hop in full.
const FLAG_FIRST_IMPLIED: u8 = 8;
const FLAGS_KNOWN: u8 = FLAG_ORIGIN | FLAG_DIRECT | FLAG_OPTIONS | FLAG_FIRST_IMPLIED;

/// Why an event or confirmation is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GossipError {
    /// Shorter than its own header says.
    #[error("event truncated")]
    Truncated,
    /// Flags this version does not know.
    #[error("unknown event flags {0:#x}")]
    UnknownFlags(u8),
    /// A varint longer than 64 bits.
    #[error("malformed varint")]
    Varint,
    /// More hops than [`ROUTE_MAX`].
    #[error("route of {0} hops (at most {ROUTE_MAX})")]
    RouteTooLong(u64),
    /// The topic is not UTF-8.
    #[error("event topic is not UTF-8")]
    NotUtf8,
    /// The topic is not valid.
    #[error("event names an invalid topic: {0}")]
    Topic(#[from] TopicError),
    /// A sequenced event whose route does not start with its receiver.
    #[error("event routed to another node")]
    NotForUs,
    /// More durable subscription names than [`DURABLE_NAMES_MAX`].
    #[error("event names {0} durable subscriptions (at most {DURABLE_NAMES_MAX})")]
    TooManyNames(u64),
    /// The event's options break the header rules ([`crate::message::HEADERS_MAX`], ...).
    #[error("event options are not valid: {0}")]
    Options(&'static str),
}

/// What a publisher set on an event besides its topic and payload: the same fields a
/// point-to-point message carries, travelling with every copy unchanged (relays copy them as
/// bytes of the event) and shown to every subscriber on the message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventOptions {
    /// The event's priority (also the lane of every hop).
    pub priority: Priority,
    /// After this wall-clock time (Unix milliseconds) the event is no longer worth delivering.
    pub expires_unix_ms: Option<u64>,
    /// Application headers (and the mesh's own, such as the idempotency key).
    pub headers: Vec<(String, Bytes)>,
}

impl EventOptions {
    /// Whether every field has its default (such options are not sent at all).
    pub fn is_empty(&self) -> bool {
        self.priority == Priority::NORMAL
            && self.expires_unix_ms.is_none()
            && self.headers.is_empty()
    }

    /// Bytes the options add to an event.
    pub fn encoded_len(&self) -> usize {
        1 + varint_len(self.expires_unix_ms.unwrap_or(0))
            + varint_len(self.headers.len() as u64)
            + self
                .headers
                .iter()
                .map(|(k, v)| 1 + k.len() + varint_len(v.len() as u64) + v.len())
                .sum::<usize>()
    }

    fn encode(&self, body: &mut Vec<u8>) {
        body.push(self.priority.0);
        push_varint(body, self.expires_unix_ms.unwrap_or(0));
        push_varint(body, self.headers.len() as u64);
        for (name, value) in &self.headers {
            debug_assert!(name.len() <= HEADER_NAME_MAX);
            body.push(name.len() as u8);
            body.extend_from_slice(name.as_bytes());
            push_varint(body, value.len() as u64);
            body.extend_from_slice(value);
        }
    }

    fn decode(reader: &mut Reader<'_>, body: &Bytes) -> Result<Self, GossipError> {
        let priority = Priority(reader.u8()?);
        let expires = reader.varint()?;
        let count = reader.varint()?;
        if count > HEADERS_MAX as u64 {
            return Err(GossipError::Options("too many headers"));
        }
        let mut headers = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = usize::from(reader.u8()?);
            if len == 0 || len > HEADER_NAME_MAX {
                return Err(GossipError::Options("header name length"));
            }
            let name = std::str::from_utf8(reader.take(len)?)
                .map_err(|_| GossipError::Options("header name is not UTF-8"))?;
            let name = name.to_owned();
            let len = reader.varint()?;
            if len > HEADER_VALUE_MAX as u64 {
                return Err(GossipError::Options("header value length"));
            }
            let start = reader.at;
            reader.take(len as usize)?;
            headers.push((name, body.slice(start..reader.at)));
        }
        Ok(Self {
            priority,
            expires_unix_ms: (expires != 0).then_some(expires),
            headers,
        })
    }
}

/// One addressee of an event: a node and the seq of the previous event the publisher addressed
/// to it (0: none since the node's current start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The addressee.
    pub node: NodeId,
    /// Its previous event's seq.
    pub prev: u64,
}

/// An event as it travels: who published it, its place in the publisher's sequence, and where
/// it goes from here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The publisher.
    pub origin: NodeId,
    /// The publisher's incarnation (its start); sequences restart with it.
    pub incarnation: u64,
    /// Position in the publisher's sequence, from 1; 0 for a best-effort event (no chain, no
    /// route, never repaired).
    pub seq: u64,
    /// Links crossed so far, this one included (1: straight from the publisher).
    pub hops: u8,
    /// The receiver and its subtree (empty for a best-effort event).
    pub route: Vec<Hop>,
    /// Sent by the publisher itself to a node with a durable subscription there, over their
    /// link (FIFO, deduplicated across restarts): never relayed.
    pub direct: bool,
    /// The receiver's durable subscriptions this event is owed to (by name; only when
    /// `direct`). The receiver holds it for them while they are not attached.
    pub durable: Vec<String>,
    /// The topic.
    pub topic: Topic,
    /// The payload (a slice of the received body, never copied).
    pub payload: Bytes,
    /// What the publisher set besides topic and payload, if anything.
    pub options: Option<Box<EventOptions>>,
}

impl Event {
    /// Encodes the event for the link to `route[0]`; `sender` is the node writing it (the origin
    /// is left out when it is the sender: the receiver knows who sent it).
    pub fn encode(&self, sender: &NodeId) -> Bytes {
        encode_parts(
            sender,
            &self.origin,
            self.incarnation,
            self.seq,
            self.hops,
            &self.route,
            self.direct.then_some(self.durable.as_slice()),
            &self.topic,
            self.options.as_deref(),
            &self.payload,
        )
    }

    /// Decodes an event `receiver` received from `sender` (the receiver heads the route: its
    /// id is not on the wire).
    pub fn decode(body: &Bytes, sender: &NodeId, receiver: &NodeId) -> Result<Self, GossipError> {
        Self::decode_after(body, sender, receiver, &mut None)
    }

    /// [`Event::decode`] for a stream of events, which mostly share their topic: one equal to
    /// `last` (the previous event's) is taken from it instead of being checked again; `last`
    /// becomes this event's topic.
    pub fn decode_after(
        body: &Bytes,
        sender: &NodeId,
        receiver: &NodeId,
        last: &mut Option<Topic>,
    ) -> Result<Self, GossipError> {
        let mut reader = Reader { bytes: body, at: 0 };
        let flags = reader.u8()?;
        if flags & !FLAGS_KNOWN != 0 {
            return Err(GossipError::UnknownFlags(flags));
        }
        let origin = if flags & FLAG_ORIGIN != 0 {
            reader.node()?
        } else {
            *sender
        };
        let incarnation = reader.varint()?;
        let seq = reader.varint()?;
        let hops = reader.u8()?;
        let count = reader.varint()?;
        if count > ROUTE_MAX as u64 {
            return Err(GossipError::RouteTooLong(count));
        }
        let mut route = Vec::with_capacity(count as usize);
        for i in 0..count {
            let node = match i == 0 && flags & FLAG_FIRST_IMPLIED != 0 {
                true => *receiver,
                false => reader.node()?,
            };
            let prev = reader.varint()?;
            route.push(Hop { node, prev });
        }
        let direct = flags & FLAG_DIRECT != 0;
        let mut durable = Vec::new();
        if direct {
            let names = reader.varint()?;
            if names > DURABLE_NAMES_MAX as u64 {
                return Err(GossipError::TooManyNames(names));
            }
            for _ in 0..names {
                let len = usize::from(reader.u8()?);
                let name =
                    std::str::from_utf8(reader.take(len)?).map_err(|_| GossipError::NotUtf8)?;
                durable.push(Topic::new(name)?.as_str().to_owned());
            }
        }
        let len = usize::from(reader.u8()?);
        let name = reader.take(len)?;
        let topic = match last {
            Some(topic) if topic.as_str().as_bytes() == name => topic.clone(),
            _ => {
                let name = std::str::from_utf8(name).map_err(|_| GossipError::NotUtf8)?;
                let topic = Topic::new(name)?;
                *last = Some(topic.clone());
                topic
            }
        };
        let options = if flags & FLAG_OPTIONS != 0 {
            Some(Box::new(EventOptions::decode(&mut reader, body)?))
        } else {
            None
        };
        let payload = body.slice(reader.at..);
        Ok(Self {
            origin,
            incarnation,
            seq,
            hops,
            route,
            direct,
            durable,
            topic,
            payload,
            options,
        })
    }

    /// The copy for a child: its route, one more hop.
    pub fn for_child(&self, route: &[Hop]) -> Event {
        Event {
            origin: self.origin,
            incarnation: self.incarnation,
            seq: self.seq,
            hops: self.hops.saturating_add(1),
            route: route.to_vec(),
            direct: false,
            durable: Vec::new(),
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            options: self.options.clone(),
        }
    }
}

/// Encodes an event without building an [`Event`] (the publisher's path). `direct`: sent by the
/// publisher over its own link to a durable subscriber, with the names of the durable
/// subscriptions it is owed to (names are topics: at most [`TOPIC_BYTES_MAX`] bytes).
#[allow(clippy::too_many_arguments)]
pub fn encode_parts(
    sender: &NodeId,
    origin: &NodeId,
    incarnation: u64,
    seq: u64,
    hops: u8,
    route: &[Hop],
    direct: Option<&[String]>,
    topic: &Topic,
    options: Option<&EventOptions>,
    payload: &[u8],
) -> Bytes {
    let parts = Parts {
        origin: (origin != sender).then_some(origin),
        incarnation,
        seq,
        hops,
        direct,
        topic,
        options: options.filter(|o| !o.is_empty()),
        payload,
    };
    // The exact length, so the body is one allocation that `Bytes` takes over as it is (a
    // vector with spare capacity would cost a second one), and plain vector appends.
    let len = parts.len(route);
    let mut body = Vec::with_capacity(len);
    parts.write(&mut body, route);
    debug_assert_eq!(body.len(), len);
    Bytes::from(body)
}

/// A publisher's own event on its way to its first hops: encoded once (what comes before the
/// route and what comes after it), then per route only the route is written between the two —
/// into a buffer the caller reuses, or as a body of its own.
#[derive(Debug)]
pub struct OwnEvent {
    /// What comes before the route ([`Parts::write_head`], the first hop not implied).
    head: Vec<u8>,
    /// What comes after it ([`Parts::write_tail`]).
    tail: Vec<u8>,
}

impl OwnEvent {
    /// Event `seq` of its publisher's `incarnation` (the publisher writes it: no origin).
    pub fn new(
        incarnation: u64,
        seq: u64,
        topic: &Topic,
        options: Option<&EventOptions>,
        payload: &[u8],
    ) -> Self {
        let parts = Parts {
            origin: None,
            incarnation,
            seq,
            hops: 1,
            direct: None,
            topic,
            options: options.filter(|o| !o.is_empty()),
            payload,
        };
        let mut head = Vec::with_capacity(1 + 10 + 10 + 1);
        parts.write_head(&mut head, false);
        let mut tail = Vec::with_capacity(parts.len(&[]) - head.len() - route_len(&[]));
        parts.write_tail(&mut tail);
        Self { head, tail }
    }

    /// The copy's length with `route`.
    fn len(&self, route: &[Hop]) -> usize {
        self.head.len() + route_len(route) + self.tail.len()
    }

    fn write(&self, out: &mut Vec<u8>, route: &[Hop]) {
        debug_assert!(route.len() <= ROUTE_MAX);
        let flags = match route.is_empty() {
            true => self.head[0],
            false => self.head[0] | FLAG_FIRST_IMPLIED,
        };
        out.push(flags);
        out.extend_from_slice(&self.head[1..]);
        write_route(out, route);
        out.extend_from_slice(&self.tail);
    }

    /// The copy for `route` (headed by the node it goes to), written over `out`.
    pub fn encode_into(&self, route: &[Hop], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(self.len(route));
        self.write(out, route);
    }

    /// The copy for `route` as a body of its own (exactly its length: one allocation).
    pub fn encode(&self, route: &[Hop]) -> Bytes {
        let mut body = Vec::with_capacity(self.len(route));
        self.write(&mut body, route);
        Bytes::from(body)
    }
}

/// An event's fields but its route, as [`encode_parts`] writes them.
#[derive(Debug)]
struct Parts<'a> {
    /// The origin, when it is not the node writing the copy (then it travels too).
    origin: Option<&'a NodeId>,
    incarnation: u64,
    seq: u64,
    hops: u8,
    direct: Option<&'a [String]>,
    topic: &'a Topic,
    options: Option<&'a EventOptions>,
    payload: &'a [u8],
}

impl Parts<'_> {
    /// The encoded length with `route`.
    fn len(&self, route: &[Hop]) -> usize {
        let durable = self.direct.unwrap_or_default();
        1 + if self.origin.is_some() {
            NODE_ID_LEN
        } else {
            0
        } + varint_len(self.incarnation)
            + varint_len(self.seq)
            + 1
            + route_len(route)
            + if self.direct.is_some() {
                varint_len(durable.len() as u64)
                    + durable.iter().map(|n| 1 + n.len()).sum::<usize>()
            } else {
                0
            }
            + 1
            + self.topic.as_str().len()
            + self.options.map_or(0, EventOptions::encoded_len)
            + self.payload.len()
    }

    /// Appends the event with `route` to `body`.
    fn write(&self, body: &mut Vec<u8>, route: &[Hop]) {
        debug_assert!(route.len() <= ROUTE_MAX);
        self.write_head(body, !route.is_empty());
        write_route(body, route);
        self.write_tail(body);
    }

    /// What comes before the route: flags (`first_implied`: the route's first hop is not
    /// written, see `FLAG_FIRST_IMPLIED`), origin, incarnation, seq, hops.
    fn write_head(&self, body: &mut Vec<u8>, first_implied: bool) {
        let mut flags = if self.origin.is_some() {
            FLAG_ORIGIN
        } else {
            0
        };
        if self.direct.is_some() {
            flags |= FLAG_DIRECT;
        }
        if self.options.is_some() {
            flags |= FLAG_OPTIONS;
        }
        if first_implied {
            flags |= FLAG_FIRST_IMPLIED;
        }
        body.push(flags);
        if let Some(origin) = self.origin {
            body.extend_from_slice(origin.as_bytes());
        }
        push_varint(body, self.incarnation);
        push_varint(body, self.seq);
        body.push(self.hops);
    }

    /// What comes after the route: durable names (direct events), topic, options, payload.
    fn write_tail(&self, body: &mut Vec<u8>) {
        let name = self.topic.as_str().as_bytes();
        debug_assert!(name.len() <= TOPIC_BYTES_MAX);
        if let Some(durable) = self.direct {
            debug_assert!(durable.len() <= DURABLE_NAMES_MAX);
            push_varint(body, durable.len() as u64);
            for durable_name in durable {
                debug_assert!(durable_name.len() <= TOPIC_BYTES_MAX);
                body.push(durable_name.len() as u8);
                body.extend_from_slice(durable_name.as_bytes());
            }
        }
        body.push(name.len() as u8);
        body.extend_from_slice(name);
        if let Some(options) = self.options {
            options.encode(body);
        }
        body.extend_from_slice(self.payload);
    }
}

/// Bytes of `value` as a varint.
fn varint_len(value: u64) -> usize {
    // 7 bits per byte, at least one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// The encoded length of `route`: its count, then each hop (the first without its node id,
/// see `FLAG_FIRST_IMPLIED`).
fn route_len(route: &[Hop]) -> usize {
    varint_len(route.len() as u64)
        + route
            .iter()
            .map(|hop| NODE_ID_LEN + varint_len(hop.prev))
            .sum::<usize>()
        - if route.is_empty() { 0 } else { NODE_ID_LEN }
}

/// Writes `route` as [`route_len`] counts it.
fn write_route(out: &mut Vec<u8>, route: &[Hop]) {
    push_varint(out, route.len() as u64);
    for (i, hop) in route.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(hop.node.as_bytes());
        }
        push_varint(out, hop.prev);
    }
}

fn push_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// First byte of a run: several events for one hop in one link message (an event's first byte
/// is its flags, which never have this bit).
pub const RUN_MARKER: u8 = 0x80;

/// The most bytes of events a run holds: below the size from which a link hands a body to the
/// transport as its own buffer, and small enough that a queue of runs stays close to a queue of
/// events in memory.
pub const RUN_BYTES_MAX: usize = 8 * 1024;

/// The most events a run holds.
pub const RUN_EVENTS_MAX: usize = 64;

/// Several encoded events for the same hop, sent as one link message: one frame, one
/// sequence number, one acknowledgement and one hand-off for all of them. On the wire:
/// [`RUN_MARKER`], then each event as a varint length and its bytes. Built by the publisher's
/// and relays' sends while the run waits in a link's queue (see `PeerSender::send_event` in
/// the driver); read with [`run_events`].
#[derive(Debug)]
pub struct Run {
    body: BytesMut,
    events: usize,
}

impl Run {
    /// A run holding `event`.
    pub fn new(event: &[u8]) -> Self {
        // Room for a few events; it grows (by doubling) as more join.
        let mut body = BytesMut::with_capacity(RUN_BYTES_MAX.min((1 + 10 + event.len()) * 4));
        body.put_u8(RUN_MARKER);
        let mut run = Self { body, events: 0 };
        run.append(event);
        run
    }

    /// Adds `event` if the run has room for it; false if not (the run is unchanged).
    pub fn push(&mut self, event: &[u8]) -> bool {
        if self.events >= RUN_EVENTS_MAX
            || self.body.len() + varint_len(event.len() as u64) + event.len() > RUN_BYTES_MAX
        {
            return false;
        }
        self.append(event);
        true
    }

    fn append(&mut self, event: &[u8]) {
        let mut len = event.len() as u64;
        while len >= 0x80 {
            self.body.put_u8((len as u8) | 0x80);
            len >>= 7;
        }
        self.body.put_u8(len as u8);
        self.body.extend_from_slice(event);
        self.events += 1;
    }

    /// How many events it holds.
    pub fn len(&self) -> usize {
        self.events
    }

    /// Whether it holds none (never: a run starts with an event).
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// The link message body. A run that filled less than half its buffer is copied into one
    /// of its size: the link keeps the body until the peer acknowledges it, and a run of one
    /// small event must not hold a buffer made for many.
    pub fn finish(self) -> Bytes {
        if self.body.capacity() > 2 * self.body.len() {
            Bytes::copy_from_slice(&self.body)
        } else {
            self.body.freeze()
        }
    }
}

/// The events of a link message body: the events of a run (each a slice of `body`, not a
/// copy), or `body` itself when it is a single event. A malformed run ends with an error.
pub fn run_events(body: &Bytes) -> impl Iterator<Item = Result<Bytes, GossipError>> + '_ {
    let run = body.first() == Some(&RUN_MARKER);
    let mut reader = Reader {
        bytes: body,
        at: usize::from(run),
    };
    let mut single = (!run).then(|| body.clone());
    let mut failed = false;
    std::iter::from_fn(move || {
        if let Some(event) = single.take() {
            return Some(Ok(event));
        }
        if !run || failed || reader.at >= body.len() {
            return None;
        }
        let event = reader.varint().and_then(|len| {
            let len = usize::try_from(len).map_err(|_| GossipError::Truncated)?;
            let start = reader.at;
            reader.take(len)?;
            Ok(body.slice(start..start + len))
        });
        failed = event.is_err();
        Some(event)
    })
}

/// The most bytes [`encode_parts`] adds to a payload with a route of `hops` entries (and, for a
/// direct event, the durable names `durable`).
pub fn overhead(topic: &Topic, hops: usize, durable: &[String]) -> usize {
    1 + NODE_ID_LEN
        + 21
        + hops * (NODE_ID_LEN + 10)
        + 10
        + durable.iter().map(|n| 1 + n.len()).sum::<usize>()
        + 10
        + topic.as_str().len()
}

/// Splits a subtree (the route below its root) into at most `fanout` contiguous chunks of
/// nearly equal size: the head of each is a child, the chunk its route.
pub fn split(subtree: &[Hop], fanout: usize) -> impl Iterator<Item = &[Hop]> {
    let fanout = fanout.max(1);
    let chunks = subtree.len().min(fanout);
    let base = subtree.len().checked_div(chunks).unwrap_or(0);
    let extra = subtree.len().checked_rem(chunks).unwrap_or(0);
    let mut start = 0;
    (0..chunks).map(move |i| {
        let len = base + usize::from(i < extra);
        let chunk = &subtree[start..start + len];
        start += len;
        chunk
    })
}

/// A subscriber's report to a publisher: every event of `incarnation` up to `seq` that was
/// addressed to it is delivered. Volatile; a lost one is made good by the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confirm {
    /// The publisher's incarnation.
    pub incarnation: u64,
    /// The last seq delivered.
    pub seq: u64,
    /// The subscriber's own incarnation (a confirm from an earlier start is stale).
    pub subscriber_incarnation: u64,
}

impl Confirm {
    /// Encodes it.
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::with_capacity(30);
        put_varint(&mut body, self.incarnation);
        put_varint(&mut body, self.seq);
        put_varint(&mut body, self.subscriber_incarnation);
        body.freeze()
    }

    /// Decodes it.
    pub fn decode(body: &[u8]) -> Result<Self, GossipError> {
        let mut reader = Reader { bytes: body, at: 0 };
        Ok(Self {
            incarnation: reader.varint()?,
            seq: reader.varint()?,
            subscriber_incarnation: reader.varint()?,
        })
    }
}

fn put_varint(buf: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], GossipError> {
        let end = self.at.checked_add(len).ok_or(GossipError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(GossipError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, GossipError> {
        Ok(self.take(1)?[0])
    }

    fn node(&mut self) -> Result<NodeId, GossipError> {
        let mut id = [0u8; NODE_ID_LEN];
        id.copy_from_slice(self.take(NODE_ID_LEN)?);
        Ok(NodeId::from_bytes(id))
    }

    fn varint(&mut self) -> Result<u64, GossipError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(GossipError::Varint);
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(GossipError::Varint)
    }
}

// ---------------------------------------------------------------------------------------------
// Subscriber side

/// What [`Chains::accept`] made of an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted<T> {
    /// Deliver it: it was next, and held none back (the common case, no allocation).
    Next(T),
    /// Deliver these, in this order (the event, and the held events it unblocked).
    Deliver(Vec<T>),
    /// Its predecessor has not arrived: held until it does.
    Held,
    /// Delivered before: drop it.
    Duplicate,
    /// Its predecessor has not arrived and the hold for this publisher is full: dropped (the
    /// publisher still has it and repairs it, since it is not confirmed).
    Dropped,
}

#[derive(Debug)]
struct Chain<T> {
    /// The seq of the last event delivered (0: none).
    last: u64,
    /// Held events by their `prev`: (seq, event).
    held: BTreeMap<u64, (u64, T)>,
    /// When it was last used (the [`Chains`] clock), for eviction.
    used: u64,
    /// Delivered since the last [`Chains::take_confirms`].
    unconfirmed: bool,
}

/// A subscriber's chains: per (publisher, incarnation), what was delivered and what waits for
/// its predecessor. Bounded: at most `held_max` events held per chain, at most `chains_max`
/// chains (the least recently used is forgotten).
#[derive(Debug)]
pub struct Chains<T> {
    chains: BTreeMap<(NodeId, u64), Chain<T>>,
    held_max: usize,
    chains_max: usize,
    clock: u64,
}

impl<T> Chains<T> {
    /// Empty, with these bounds.
    pub fn new(held_max: usize, chains_max: usize) -> Self {
        Self {
            chains: BTreeMap::new(),
            held_max: held_max.max(1),
            chains_max: chains_max.max(1),
            clock: 0,
        }
    }

    /// Takes an event `seq` of `(origin, incarnation)` whose predecessor is `prev`.
    pub fn accept(
        &mut self,
        origin: NodeId,
        incarnation: u64,
        seq: u64,
        prev: u64,
        event: T,
    ) -> Accepted<T> {
        self.accept_inner(origin, incarnation, seq, prev, false, event)
    }

    /// [`Chains::accept`] for a direct event ([`Event::direct`]: over the publisher's own link,
    /// which delivers each event once, in order, across restarts of either end). A chain that
    /// delivered nothing yet (this node restarted: chains are memory) starts with it whatever
    /// its `prev`: what came before was delivered before the restart or given up by the link.
    pub fn accept_direct(
        &mut self,
        origin: NodeId,
        incarnation: u64,
        seq: u64,
        prev: u64,
        event: T,
    ) -> Accepted<T> {
        self.accept_inner(origin, incarnation, seq, prev, true, event)
    }

    fn accept_inner(
        &mut self,
        origin: NodeId,
        incarnation: u64,
        seq: u64,
        prev: u64,
        direct: bool,
        event: T,
    ) -> Accepted<T> {
        self.clock += 1;
        if !self.chains.contains_key(&(origin, incarnation)) && self.chains.len() >= self.chains_max
        {
            self.evict();
        }
        let chain = self
            .chains
            .entry((origin, incarnation))
            .or_insert_with(|| Chain {
                last: 0,
                held: BTreeMap::new(),
                used: 0,
                unconfirmed: false,
            });
        chain.used = self.clock;
        if seq <= chain.last {
            return Accepted::Duplicate;
        }
        // prev 0 past the start: the publisher started the chain again (it forgot this
        // subscriber); what it sent before is no longer awaited. A direct event starts a fresh
        // chain (see `accept_direct`).
        let starts = prev == 0 || (direct && chain.last == 0);
        if prev != chain.last && !starts {
            if chain.held.len() >= self.held_max && !chain.held.contains_key(&prev) {
                return Accepted::Dropped;
            }
            chain.held.insert(prev, (seq, event));
            return Accepted::Held;
        }
        chain.last = seq;
        chain.unconfirmed = true;
        if chain.held.is_empty() {
            return Accepted::Next(event);
        }
        let mut delivered = vec![event];
        while let Some((seq, event)) = chain.held.remove(&chain.last) {
            delivered.push(event);
            chain.last = seq;
        }
        // Held events older than the last delivered are copies of delivered ones.
        chain.held = chain.held.split_off(&chain.last);
        match delivered.len() {
            1 => Accepted::Next(delivered.pop().expect("one")),
            _ => Accepted::Deliver(delivered),
        }
    }

    /// The chains that delivered since the last call: (publisher, incarnation, last seq).
    pub fn take_confirms(&mut self) -> Vec<(NodeId, u64, u64)> {
        self.chains
            .iter_mut()
            .filter(|(_, chain)| chain.unconfirmed)
            .map(|(&(origin, incarnation), chain)| {
                chain.unconfirmed = false;
                (origin, incarnation, chain.last)
            })
            .collect()
    }

    /// Events held, over every chain.
    pub fn held(&self) -> usize {
        self.chains.values().map(|c| c.held.len()).sum()
    }

    fn evict(&mut self) {
        if let Some(key) = self
            .chains
            .iter()
            .min_by_key(|(_, chain)| chain.used)
            .map(|(key, _)| *key)
        {
            self.chains.remove(&key);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Publisher side

/// The publisher's bounds and timing.
#[derive(Clone, Copy, Debug)]
pub struct PublisherConfig {
    /// Children per node of the tree (the publisher's included).
    pub fanout: usize,
    /// Events retained at most.
    pub retained_max: usize,
    /// Payload bytes retained at most.
    pub retained_bytes_max: usize,
    /// An addressee without progress this long is handed over to its direct link.
    pub repair_after_ms: u64,
    /// Addressees whose chain is remembered at most (the least recently addressed idle one is
    /// forgotten first).
    pub chains_max: usize,
}

/// An addressee of an event, as the publisher sees it.
#[derive(Clone, Debug)]
pub struct Addressee {
    /// The node.
    pub node: NodeId,
    /// Its current start (its chain starts again when this changes).
    pub incarnation: u64,
    /// Connected now (the disconnected become leaves).
    pub connected: bool,
    /// It has a durable subscription at this publisher: sent to directly, never relayed (see
    /// the module docs).
    pub direct: bool,
    /// Its durable subscriptions that match the event (by name; only when `direct`).
    pub durable: Vec<String>,
}

#[derive(Debug)]
struct SubscriberChain {
    incarnation: u64,
    /// Tree position key: a hash of (publisher, node).
    order: u64,
    /// The last seq addressed to it.
    last_sent: u64,
    /// The last seq it confirmed.
    confirmed: u64,
    /// Everything up to this seq was handed to its direct link.
    handed_over: u64,
    /// Events below this seq belong to an earlier chain (before its restart).
    floor: u64,
    /// When it last made progress, or became owed something (milliseconds).
    progress_ms: u64,
}

impl SubscriberChain {
    fn settled(&self) -> u64 {
        self.confirmed.max(self.handed_over)
    }

    fn owed(&self) -> bool {
        self.last_sent > self.settled()
    }

    fn has_settled(&self, seq: u64) -> bool {
        seq < self.floor || seq <= self.settled()
    }

    /// The highest seq up to which [`SubscriberChain::has_settled`] holds for every seq.
    fn settled_through(&self) -> u64 {
        self.settled().max(self.floor.saturating_sub(1))
    }
}

/// An event kept for repair.
#[derive(Clone, Debug)]
pub struct Retained {
    /// Its seq.
    pub seq: u64,
    /// Its topic.
    pub topic: Topic,
    /// Its payload.
    pub payload: Bytes,
    /// Every addressee with its `prev`.
    pub addressees: Vec<Hop>,
    /// Its options (a repaired copy carries them like the first).
    pub options: Option<Box<EventOptions>>,
}

/// One event of a [`Repair`]: (seq, topic, payload, prev, options).
pub type RepairEvent = (u64, Topic, Bytes, u64, Option<Box<EventOptions>>);

/// A repair: events for one subscriber, in order, each with its `prev`, to send over its direct
/// link.
#[derive(Debug)]
pub struct Repair {
    /// The subscriber.
    pub to: NodeId,
    /// (seq, topic, payload, prev, options), ascending.
    pub events: Vec<RepairEvent>,
}

/// An event to send: its seq and the route of each first hop.
#[derive(Debug)]
pub struct Fanout {
    /// The event's seq.
    pub seq: u64,
    /// One route per first hop (its head is the node to send to).
    pub routes: Routes,
    /// Durable subscribers, each sent the event directly: its hop and the names of its durable
    /// subscriptions the event is owed to. Handed over to their links at once.
    pub direct: Vec<(Hop, Vec<String>)>,
    /// What a node that just became direct was owed from the trees: to send (flagged direct)
    /// before this event, so its chain stays in order.
    pub repairs: Vec<Repair>,
}

/// An event's routes: its tree addressees in tree order, split into one route per first hop
/// (held in one vector: no allocation per route).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    hops: Vec<Hop>,
    fanout: usize,
}

impl Routes {
    /// The routes, each headed by the node to send to.
    pub fn iter(&self) -> impl Iterator<Item = &[Hop]> {
        split(&self.hops, self.fanout)
    }

    /// How many routes (first hops).
    pub fn len(&self) -> usize {
        self.hops.len().min(self.fanout.max(1))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.hops.is_empty()
    }

    /// Every addressee of every route.
    pub fn hops(&self) -> &[Hop] {
        &self.hops
    }
}

/// The publisher's side: sequence, per-addressee chains, retention. See the module docs.
#[derive(Debug)]
pub struct Publisher {
    origin: NodeId,
    next_seq: u64,
    chains: BTreeMap<NodeId, SubscriberChain>,
    retained: VecDeque<Retained>,
    retained_bytes: usize,
    config: PublisherConfig,
}

impl Publisher {
    /// A publisher `origin` at the start of an incarnation.
    pub fn new(origin: NodeId, config: PublisherConfig) -> Self {
        Self {
            origin,
            next_seq: 1,
            chains: BTreeMap::new(),
            retained: VecDeque::new(),
            retained_bytes: 0,
            config,
        }
    }

    /// Whether retention has room for another event (else hand over with
    /// [`Publisher::repairs`]`(now, true)` and wait for confirmations).
    pub fn has_room(&self) -> bool {
        self.retained.len() < self.config.retained_max
            && self.retained_bytes < self.config.retained_bytes_max
    }

    /// Events retained now.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Numbers an event, chains it for each addressee, retains it and lays out its tree.
    pub fn publish(
        &mut self,
        addressees: &[Addressee],
        topic: &Topic,
        payload: &Bytes,
        now_ms: u64,
    ) -> Fanout {
        self.publish_with(addressees, topic, payload, None, now_ms)
    }

    /// [`Publisher::publish`] of an event with options (kept with it for repairs).
    pub fn publish_with(
        &mut self,
        addressees: &[Addressee],
        topic: &Topic,
        payload: &Bytes,
        options: Option<&EventOptions>,
        now_ms: u64,
    ) -> Fanout {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.chains.len() + addressees.len() > self.config.chains_max {
            self.forget_idle(addressees.len());
        }
        // A node that just became direct and is owed tree copies: handed over first, in order,
        // over the same link as this event.
        let owed_direct: Vec<NodeId> = addressees
            .iter()
            .filter(|a| a.direct)
            .filter(|a| {
                self.chains
                    .get(&a.node)
                    .is_some_and(|c| c.incarnation == a.incarnation && c.owed())
            })
            .map(|a| a.node)
            .collect();
        let repairs: Vec<Repair> = owed_direct
            .into_iter()
            .map(|node| self.hand_over(node, now_ms))
            .collect();
        if !repairs.is_empty() {
            self.trim();
        }
        let mut placed: Vec<(bool, u64, Hop)> = Vec::with_capacity(addressees.len());
        let mut direct = Vec::new();
        for addressee in addressees {
            let origin = self.origin;
            let chain = self
                .chains
                .entry(addressee.node)
                .or_insert_with(|| SubscriberChain {
                    incarnation: addressee.incarnation,
                    order: tree_order(&origin, &addressee.node),
                    last_sent: 0,
                    confirmed: 0,
                    handed_over: 0,
                    floor: seq,
                    progress_ms: now_ms,
                });
            if chain.incarnation != addressee.incarnation {
                // The node started again: a new chain, from this event.
                chain.incarnation = addressee.incarnation;
                chain.last_sent = 0;
                chain.confirmed = 0;
                chain.handed_over = 0;
                chain.floor = seq;
            }
            if !chain.owed() {
                chain.progress_ms = now_ms;
            }
            let prev = chain.last_sent;
            chain.last_sent = seq;
            if addressee.direct {
                // Its link owns it from now on: never retained, never repaired.
                chain.handed_over = seq;
                direct.push((
                    Hop {
                        node: addressee.node,
                        prev,
                    },
                    addressee.durable.clone(),
                ));
                continue;
            }
            placed.push((
                !addressee.connected,
                chain.order,
                Hop {
                    node: addressee.node,
                    prev,
                },
            ));
        }
        placed.sort_unstable_by_key(|&(away, order, hop)| (away, order, hop.node));
        // Collected into a vector of its own size (collecting in place would reuse the larger
        // one and then shrink it: a reallocation per event).
        let mut hops = Vec::with_capacity(placed.len());
        hops.extend(placed.into_iter().map(|(_, _, hop)| hop));
        if !hops.is_empty() {
            self.retained_bytes += payload.len();
            self.retained.push_back(Retained {
                seq,
                topic: topic.clone(),
                payload: payload.clone(),
                addressees: hops.clone(),
                options: options.map(|o| Box::new(o.clone())),
            });
        }
        Fanout {
            seq,
            routes: Routes {
                hops,
                fanout: self.config.fanout,
            },
            direct,
            repairs,
        }
    }

    /// A subscriber's confirmation. Returns whether retention shrank.
    pub fn confirm(&mut self, from: &NodeId, confirm: Confirm, now_ms: u64) -> bool {
        let Some(chain) = self.chains.get_mut(from) else {
            return false;
        };
        if chain.incarnation != confirm.subscriber_incarnation
            || confirm.seq > chain.last_sent
            || confirm.seq <= chain.confirmed
        {
            return false;
        }
        chain.confirmed = confirm.seq;
        chain.progress_ms = now_ms;
        self.trim()
    }

    /// The repairs due: every `reachable` addressee (connected to the publisher) owed events
    /// without progress for `repair_after`, and with `force` every addressee holding the oldest
    /// retained event. Each is handed everything unsettled and counts as settled from then on.
    ///
    /// One that is not reachable waits: its confirmations cannot arrive either, and the tree may
    /// well still reach it, so a repair into its down link would only come twice; it is repaired
    /// once it is back (it made no progress meanwhile) or when retention is full.
    pub fn repairs(
        &mut self,
        now_ms: u64,
        force: bool,
        reachable: impl Fn(&NodeId) -> bool,
    ) -> Vec<Repair> {
        let oldest = self.retained.front().map(|r| r.seq);
        let due: Vec<NodeId> = self
            .chains
            .iter()
            .filter(|(_, chain)| chain.owed())
            .filter(|(node, chain)| {
                (now_ms.saturating_sub(chain.progress_ms) >= self.config.repair_after_ms
                    && reachable(node))
                    || (force && oldest.is_some_and(|seq| !chain.has_settled(seq)))
            })
            .map(|(node, _)| *node)
            .collect();
        let repairs: Vec<Repair> = due
            .into_iter()
            .map(|node| self.hand_over(node, now_ms))
            .collect();
        if !repairs.is_empty() {
            self.trim();
        }
        repairs
    }

    /// Hands `node` everything retained for it that it has not settled: from now on its direct
    /// link owns those events.
    fn hand_over(&mut self, node: NodeId, now_ms: u64) -> Repair {
        let chain = self
            .chains
            .get_mut(&node)
            .expect("handed-over chains exist");
        let (from, floor) = (chain.settled(), chain.floor);
        chain.handed_over = chain.last_sent;
        chain.progress_ms = now_ms;
        let events = self
            .retained
            .iter()
            .filter(|r| r.seq > from && r.seq >= floor)
            .filter_map(|r| {
                r.addressees.iter().find(|hop| hop.node == node).map(|hop| {
                    (
                        r.seq,
                        r.topic.clone(),
                        r.payload.clone(),
                        hop.prev,
                        r.options.clone(),
                    )
                })
            })
            .collect();
        Repair { to: node, events }
    }

    /// Drops retained events that every addressee settled.
    fn trim(&mut self) -> bool {
        let before = self.retained.len();
        // Every chain settled everything up to here: events up to it go without looking up
        // each of their addressees (one pass over the chains per trim, not one lookup per
        // addressee per event).
        let all_settled = self
            .chains
            .values()
            .map(SubscriberChain::settled_through)
            .min()
            .unwrap_or(u64::MAX);
        while let Some(front) = self.retained.front() {
            let settled = front.seq <= all_settled
                || front.addressees.iter().all(|hop| {
                    self.chains
                        .get(&hop.node)
                        .is_none_or(|chain| chain.has_settled(front.seq))
                });
            if !settled {
                break;
            }
            self.retained_bytes -= front.payload.len();
            self.retained.pop_front();
        }
        self.retained.len() < before
    }

    /// Forgets settled chains, least recently addressed first, to make room for `room` more.
    fn forget_idle(&mut self, room: usize) {
        let mut idle: Vec<(u64, NodeId)> = self
            .chains
            .iter()
            .filter(|(_, chain)| !chain.owed())
            .map(|(node, chain)| (chain.last_sent, *node))
            .collect();
        idle.sort_unstable();
        let excess = (self.chains.len() + room).saturating_sub(self.config.chains_max);
        for (_, node) in idle.into_iter().take(excess) {
            self.chains.remove(&node);
        }
    }
}

/// Where a node sits in `origin`'s trees: connected addressees are laid out in ascending order
/// of this key (then by node id), and the heads of that list's [`split`] are the first hops.
pub fn tree_order(origin: &NodeId, node: &NodeId) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key("weft 2026 gossip tree order");
    hasher.update(origin.as_bytes());
    hasher.update(node.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
#[path = "gossip_tests.rs"]
mod tests;
