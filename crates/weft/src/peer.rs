//! The peer tasks: one per known peer and [`Lane`], each owning that lane's [`Link`] for the
//! node's lifetime.
//!
//! The normal lane's task owns the peer's connection: it dials, accepts, resolves duplicates and
//! reports the peer up and down. Once it installs a connection, the side that dialed opens one
//! more bidirectional QUIC stream per other lane (its first byte names the lane) and the other
//! side accepts them; each stream goes to its lane's task with the connection's generation, so a
//! stream of a connection replaced meanwhile is never installed over a newer one. A lane task
//! never dials and never closes the connection: it loses its stream with the connection and gets
//! the next one from the normal lane's task. The peer is *up* (the `Up` event, the metric,
//! `Node::connected_peers`) only once every lane installed its stream, so anything sent on the
//! news can use any lane; each lane's own connected flag says whether its stream is in place. Each QUIC stream has its lane's send priority ([`Lane::stream_priority`]), so quinn
//! sends high-lane bytes ahead of queued bulk bytes.
//!
//! A task is the only code that touches its link, so the link needs no lock. It multiplexes, in
//! priority order: shutdown, control (connections, addresses), a parked delivery waiting for room
//! in its channel, the stream accepting queued bytes, bytes from the connection, and messages from
//! the application. Writes never block the task: encoded batches wait in a bounded queue and go
//! out through quinn's cancel-safe `write_chunks`, tried at once and otherwise awaited alongside
//! reads, so a peer that is slow to read can never stop this task from reading (two nodes writing
//! to each other cannot deadlock).

use std::collections::{HashMap, VecDeque};
use std::future::pending;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};
use weft_proto::frame::LENGTH_PREFIX_BYTES;
use weft_proto::link::{LinkEvent, LinkStats};
use weft_proto::peer::{
    Admit, ExpiryTimer, GateOutput, NewConnection, Peer, PeerConfig, Refusal, WatermarkGate,
};
use weft_proto::spooled::Watermark;
use weft_proto::{
    Channel, Frame, FrameDecoder, FrameError, Lane, Link, Message, MessageId, NodeId,
    OutgoingMessage,
};

use crate::connection::{self, close_code, Established};
use crate::durable::{Command, Outgoing};
use crate::error::{ConnectError, DeliveryError};
use crate::inbox::ChannelError;
use crate::node::{PeerEvent, PeerHandle, Shared};
use crate::receipt::Fates;
use crate::settle::Settlement;

/// Bytes gathered into one write: large writes are what make QUIC fast (one write per message
/// runs at a twentieth of the speed).
const TRANSMIT_BATCH_BYTES: usize = 64 * 1024;
/// Encoded batches waiting for the stream to accept them (a large body is a batch of its own);
/// with the batch size and the largest body this bounds the bytes between the link and quinn's
/// send buffer.
const WRITE_QUEUE_BATCHES: usize = 16;
/// Most bytes taken from the connection per read.
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Frames read ahead while a delivery waits for room in its channel (body bytes, roughly): acks
/// among them are handled at once, so the node's own receipts keep resolving while its
/// application is slow; beyond this the task stops reading and QUIC flow control pushes back.
const HELD_BYTES_MAX: usize = 1024 * 1024;
/// Capacity reserved at once for encoding batches (several batches are split off one buffer).
const TX_BUFFER_BYTES: usize = 4 * TRANSMIT_BATCH_BYTES;
/// Most application messages taken per wakeup.
const COMMAND_BATCH: usize = 512;
/// Longest a clean shutdown waits for what is queued for a peer to be written and read.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);

/// Messages to a peer task from elsewhere in the node.
#[derive(Debug)]
pub(crate) enum Control {
    /// A connection passed its hello exchange (dialed or accepted).
    Connection(Established),
    /// To a lane other than the normal one: its stream on the connection the normal lane's task
    /// installed as its `generation`-th.
    LaneStream {
        generation: u64,
        established: Established,
    },
    /// Our dial failed.
    DialFailed(ConnectError),
    /// Addresses to dial the peer at.
    Addresses(Vec<SocketAddr>),
    /// The spool made this inbound watermark durable: acknowledge up to it.
    WatermarkDurable { epoch: u64, up_to: u64 },
    /// The spool did not make this inbound watermark durable: acknowledge nothing past the last
    /// durable one. `stopped`: the spool refuses everything until the node restarts (a storage
    /// failure poisoned it), so retrying is pointless; otherwise it was full, and a retry may pass.
    WatermarkFailed {
        epoch: u64,
        up_to: u64,
        stopped: bool,
        error: String,
    },
    /// Take back the messages not yet in flight whose channel starts with `channel_prefix`
    /// (work for a worker that went silent): (seq, spool tag, message), in sequence order.
    Withdraw {
        channel_prefix: String,
        reply: tokio::sync::oneshot::Sender<Vec<(u64, u64, OutgoingMessage)>>,
    },
    /// Copies of the queued messages numbered `seqs` (ascending), in flight or not, that are
    /// still there: (seq, message), in sequence order (work held by a stuck worker).
    CopyQueued {
        seqs: Vec<u64>,
        reply: tokio::sync::oneshot::Sender<Vec<(u64, OutgoingMessage)>>,
    },
    /// To the normal lane's task: another lane installed its stream on the `generation`-th
    /// connection (when all have, the peer is up).
    LaneUp { generation: u64 },
    /// What a `Withdraw` took (when it took something) is durable elsewhere: the peer may be
    /// told to skip it (see `Link::hold_for_withdrawal`).
    SettleWithdrawal,
    /// Give up these messages (ascending seqs) if they are still queued and not in flight:
    /// dead-lettered with `reason`, as expired ones are (events over a durable subscription's
    /// retention budget).
    GiveUp {
        seqs: Vec<u64>,
        reason: weft_proto::link::GiveUp,
    },
}

struct Conn {
    connection: quinn::Connection,
    dialed_by_local: bool,
    /// The peer's incarnation this connection belongs to (from its hello).
    peer_incarnation: u64,
    recv: quinn::RecvStream,
    send: quinn::SendStream,
    /// The rest of the last chunk read, not yet decoded: whole frames are taken from it without
    /// copying.
    rx_chunk: Bytes,
    /// A frame that straddles chunks, being reassembled (empty most of the time).
    rx: BytesMut,
    /// Where batches are encoded; each batch is split off, so one allocation serves several.
    tx_buf: BytesMut,
    /// Frames read while a delivery was parked, waiting in order behind it.
    held: VecDeque<Frame>,
    /// Rough size of `held`, bounded by `HELD_BYTES_MAX`.
    held_bytes: usize,
    /// Encoded batches the stream has not accepted yet (at most `WRITE_QUEUE_BATCHES`).
    tx: VecDeque<Bytes>,
}

/// The channel queues this lane delivered to, valid while `Channels::generation` stays.
#[derive(Default)]
struct ChannelCache {
    queues: HashMap<Channel, mpsc::Sender<Message>>,
    /// The last channel delivered to: consecutive messages mostly share one, and comparing
    /// names is cheaper than hashing them.
    last: Option<(Channel, mpsc::Sender<Message>)>,
}

/// What the normal lane's task knows of another lane's task.
struct OtherLane {
    lane: Lane,
    control: mpsc::UnboundedSender<Control>,
    /// True once the lane's task drained at shutdown (the connection is closed after).
    drained: watch::Receiver<bool>,
}

impl Conn {
    fn new(established: Established) -> Self {
        let Established {
            connection,
            send,
            recv,
            leftover,
            dialed_by_local,
            remote: _,
            peer_incarnation,
        } = established;
        Self {
            connection,
            dialed_by_local,
            peer_incarnation,
            recv,
            send,
            rx_chunk: Bytes::new(),
            rx: leftover,
            tx_buf: BytesMut::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            tx: VecDeque::with_capacity(WRITE_QUEUE_BATCHES),
        }
    }
}

pub(crate) struct PeerTask {
    shared: Arc<Shared>,
    peer: NodeId,
    link: Link,
    /// The other lanes' tasks (in the normal lane's task only).
    others: Vec<OtherLane>,
    /// The connection lifecycle: addresses, dials, duplicates, the lane handshake, up and down
    /// (in the normal lane's task only).
    connectivity: Option<Peer>,
    /// The normal lane's task (in the other lanes' tasks).
    normal_lane: Option<mpsc::UnboundedSender<Control>>,
    /// Set once this task drained at shutdown.
    drained: watch::Sender<bool>,
    decoder: FrameDecoder,
    commands: mpsc::Receiver<Outgoing>,
    /// Taken from `commands` (or restored) but not yet in the link (it was at its bound).
    pending: VecDeque<Outgoing>,
    batch: Vec<Outgoing>,
    control: mpsc::UnboundedReceiver<Control>,
    control_tx: mpsc::UnboundedSender<Control>,
    acked: watch::Sender<u64>,
    connected: watch::Sender<bool>,
    conn: Option<Conn>,
    /// The generation of the connection this lane's stream belongs to (see [`Peer`]).
    generation: u64,
    channels: ChannelCache,
    /// `Channels::generation` when `channels` was last known to be current.
    channels_generation: u64,
    /// The channel queue the link's current delivery waits for.
    parked: Option<mpsc::Sender<Message>>,
    stats: LinkStats,
    /// What the application took of the peer's stream (see [`Settlement`]).
    settlement: Arc<Settlement>,
    /// Persist before acknowledging: which inbound watermark to persist or acknowledge when.
    gate: WatermarkGate,
    /// When queued messages are next checked for expiry.
    expiry: ExpiryTimer,
    fates: Arc<Fates>,
    retired: Vec<u64>,
    /// The newest acknowledgement the link reported, not yet published.
    acked_pending: Option<u64>,
}

impl PeerTask {
    /// The tasks of every lane to `peer` (the normal lane's first) and the normal lane's handle,
    /// which holds the others'.
    pub(crate) fn new(shared: Arc<Shared>, peer: NodeId) -> (Vec<Self>, PeerHandle) {
        let (mut normal, mut handle) = Self::new_lane(Arc::clone(&shared), peer, Lane::Normal);
        let mut tasks = Vec::with_capacity(Lane::ALL.len());
        for lane in Lane::ALL.into_iter().filter(|l| *l != Lane::Normal) {
            let (mut task, lane_handle) = Self::new_lane(Arc::clone(&shared), peer, lane);
            task.normal_lane = Some(normal.control_tx.clone());
            normal.others.push(OtherLane {
                lane,
                control: lane_handle.control.clone(),
                drained: task.drained.subscribe(),
            });
            handle.others.push(Arc::new(lane_handle));
            tasks.push(task);
        }
        tasks.insert(0, normal);
        (tasks, handle)
    }

    /// The lane this task carries.
    pub(crate) fn lane(&self) -> Lane {
        self.link.lane()
    }

    fn new_lane(shared: Arc<Shared>, peer: NodeId, lane: Lane) -> (Self, PeerHandle) {
        let config = &shared.config;
        let mut link_config = shared.link_config();
        // Acknowledgements wait for the application to take a message (and, with a spool, for
        // its watermark to be durable): the driver acknowledges, not the link.
        link_config.ack_on_delivery = false;
        let mut link = Link::with_lane(shared.id, peer, shared.epoch, lane, link_config);
        let (outbound, inbound) = {
            let mut restored = shared.restored.lock().expect("restored lock poisoned");
            (
                restored.outbound.remove(&(peer, lane)),
                restored.inbound.remove(&(peer, lane)),
            )
        };
        let mut pending = VecDeque::new();
        if let Some(stream) = outbound {
            link.restore_outbound(stream.epoch, stream.acked_up_to);
            pending.extend(stream.messages);
        }
        let next_seq = pending.back().map_or(link.next_seq(), |o| o.seq + 1);
        let settlement = Arc::new(Settlement::default());
        let mut watermark_durable = (0, 0);
        if let Some((epoch, up_to)) = inbound {
            link.restore_inbound(epoch, up_to);
            settlement.reset(link.inbound_stream(epoch), epoch, up_to);
            watermark_durable = (epoch, up_to);
        }
        #[allow(unused_mut)]
        let mut gate = WatermarkGate::new(shared.durable.is_some(), watermark_durable);
        #[cfg(feature = "fault-injection")]
        if shared.seams.fault == weft_proto::link::Fault::WatermarkAfterAck {
            // The canary's bug: acknowledge before the watermark is durable.
            gate = gate.acknowledge_before_durable();
        }
        let connectivity = (lane == Lane::Normal).then(|| {
            let config = PeerConfig {
                reconnect_initial: config.reconnect_initial,
                reconnect_max: config.reconnect_max,
                ..PeerConfig::default()
            };
            Peer::new(shared.id, peer, config, shared.random())
        });
        shared.channels.register(peer, Arc::clone(&settlement));
        let (commands_tx, commands) = mpsc::channel(config.peer_command_capacity);
        let (control_tx, control) = mpsc::unbounded_channel();
        let (acked, acked_rx) = watch::channel(link.acked_up_to());
        let (connected, connected_rx) = watch::channel(false);
        let fates = Arc::new(Fates::default());
        let handle = PeerHandle {
            id: peer,
            lane,
            others: Vec::new(),
            epoch: link.epoch(),
            stream: link.stream(),
            commands: commands_tx,
            control: control_tx.clone(),
            next_seq: Mutex::new(next_seq),
            acked: acked_rx,
            accepted: watch::channel(next_seq - 1).0,
            fates: Arc::clone(&fates),
            connected: connected_rx,
        };
        let mut task = Self {
            decoder: FrameDecoder::new(config.limits()),
            shared,
            peer,
            link,
            others: Vec::new(),
            connectivity,
            normal_lane: None,
            drained: watch::channel(false).0,
            commands,
            pending,
            batch: Vec::with_capacity(COMMAND_BATCH),
            control,
            control_tx,
            acked,
            connected,
            conn: None,
            generation: 0,
            channels: ChannelCache::default(),
            channels_generation: 0,
            parked: None,
            stats: LinkStats::default(),
            settlement,
            gate,
            expiry: ExpiryTimer::default(),
            fates,
            retired: Vec::new(),
            acked_pending: None,
        };
        task.absorb();
        (task, handle)
    }

    pub(crate) async fn run(mut self) {
        let mut shutdown = self.shared.shutdown.subscribe();
        loop {
            self.flush();
            self.publish_progress();
            let room = self.link_room();
            let parked = self.parked.clone();
            let reading = self
                .conn
                .as_ref()
                .is_some_and(|c| c.held_bytes < HELD_BYTES_MAX);
            // Not reading means not noticing the connection die; watch for that directly.
            let closing = self
                .conn
                .as_ref()
                .filter(|_| !reading)
                .map(|c| c.connection.clone());
            let (recv, send) = match &mut self.conn {
                Some(conn) => (Some(&mut conn.recv), Some((&mut conn.send, &mut conn.tx))),
                None => (None, None),
            };
            let queued = self.link.queued_messages();
            if queued > 0 && self.expiry.poll_timeout().is_none() {
                self.expiry.arm(now(), queued);
            }
            // The machines' earliest deadline: one timer, and at it every machine looks at the
            // time (each acts only on what is due).
            let deadline = [
                self.connectivity.as_ref().and_then(Peer::poll_timeout),
                self.expiry.poll_timeout(),
                self.gate.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let settlement = Arc::clone(&self.settlement);
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                Some(control) = self.control.recv() => self.handle_control(control),
                permit = reserve(parked) => self.deliver_parked(permit),
                written = write_queued(send) => {
                    if let Err(e) = written {
                        self.connection_lost(format!("write failed: {e}"));
                    }
                }
                read = read_chunk(recv, reading) => self.handle_read(read),
                error = closed(closing) => self.connection_lost(error.to_string()),
                n = self.commands.recv_many(&mut self.batch, room), if room > 0 => {
                    if n == 0 {
                        break; // every sender is gone: the node is being dropped
                    }
                    self.take_batch();
                }
                () = settlement.moved.notified() => self.settled(),
                _ = sleep_until(deadline) => self.handle_timeouts(),
            }
        }
        if let Some(connectivity) = &mut self.connectivity {
            connectivity.handle_shutdown();
        }
        self.drain().await;
        self.drained.send_replace(true);
        self.stop();
    }

    /// A deadline passed: every machine handles what is due at one reading of the clock.
    fn handle_timeouts(&mut self) {
        let now = now();
        if let Some(connectivity) = &mut self.connectivity {
            connectivity.handle_timeout(now);
        }
        self.connectivity_events("");
        if self.expiry.handle_timeout(now) {
            self.expire();
        }
        if self.gate.handle_timeout(now) {
            self.persist_settled(false);
        }
    }

    /// On a clean shutdown: until everything queued for the peer is acknowledged (or at most
    /// [`SHUTDOWN_DRAIN`]), keeps reading (the peer's resume and acks) and writing (messages the
    /// application sent last, replies, acks of what it settled); then finishes the stream, so
    /// that closing the connection discards nothing the peer could still take.
    async fn drain(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        if self.conn.is_none() {
            return;
        }
        // What the application settled last (the pattern tasks settle theirs before the peers
        // stop): without a spool its acknowledgement goes out with the rest.
        self.settled();
        while let Ok(outgoing) = self.commands.try_recv() {
            self.batch.push(outgoing);
        }
        self.take_batch();
        loop {
            self.flush();
            self.publish_progress();
            let Some(conn) = &mut self.conn else { return };
            let unsent = !conn.tx.is_empty() || self.link.wants_transmit();
            if !unsent && self.link.queued_messages() == 0 && self.pending.is_empty() {
                break;
            }
            let reading = conn.held_bytes < HELD_BYTES_MAX;
            let send = Some((&mut conn.send, &mut conn.tx));
            tokio::select! {
                written = write_queued(send) => {
                    if let Err(e) = written {
                        self.connection_lost(format!("write failed: {e}"));
                    }
                }
                read = read_chunk(Some(&mut conn.recv), reading) => self.handle_read(read),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let Some(conn) = &mut self.conn else { return };
        if conn.send.finish().is_ok() {
            let _ = tokio::time::timeout_at(deadline, conn.send.stopped()).await;
        }
        // The connection closes when this task stops: not before the other lanes drained.
        for other in &mut self.others {
            let _ = tokio::time::timeout_at(deadline, other.drained.wait_for(|done| *done)).await;
        }
    }

    /// How many more messages to take from the application now.
    fn link_room(&self) -> usize {
        if !self.pending.is_empty() {
            return 0;
        }
        let held = self.link.queued_messages();
        self.shared
            .config
            .link
            .queue_messages_max
            .saturating_sub(held)
            .min(COMMAND_BATCH)
    }

    /// Moves a batch from the application into the link (each message is moved as few times as
    /// possible: they are copied by value at every hop).
    fn take_batch(&mut self) {
        for outgoing in self.batch.drain(..) {
            if self.pending.is_empty() && fits(&self.link, &outgoing) {
                push(&mut self.link, outgoing);
            } else {
                self.pending.push_back(outgoing);
            }
        }
    }

    /// Moves messages from `pending` into the link while it has room.
    fn absorb(&mut self) {
        while let Some(front) = self.pending.front() {
            if !fits(&self.link, front) {
                break;
            }
            let outgoing = self.pending.pop_front().expect("front exists");
            push(&mut self.link, outgoing);
        }
    }

    /// Encodes what the link has to send (up to the write queue's bound) and hands as much as the
    /// stream takes right now to quinn; the rest waits for the select's write branch.
    fn flush(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        while conn.tx.len() < WRITE_QUEUE_BATCHES && self.link.wants_transmit() {
            if conn.tx_buf.capacity() < TRANSMIT_BATCH_BYTES {
                conn.tx_buf.reserve(TX_BUFFER_BYTES);
            }
            let queued = conn.tx.len();
            // Large bodies join the queue as buffers of their own (no copy into the batch).
            self.link
                .poll_transmit_chunks(&mut conn.tx_buf, &mut conn.tx, TRANSMIT_BATCH_BYTES);
            if !conn.tx_buf.is_empty() {
                conn.tx.push_back(conn.tx_buf.split().freeze());
            }
            if conn.tx.len() == queued {
                break;
            }
        }
        if conn.tx.is_empty() {
            return;
        }
        // `write_chunks` is cancel-safe: if the stream is blocked, nothing was written.
        if let Some(Err(e)) = write_queued(Some((&mut conn.send, &mut conn.tx))).now_or_never() {
            self.connection_lost(format!("write failed: {e}"));
        }
    }

    fn publish_progress(&mut self) {
        if let Some(connectivity) = &mut self.connectivity {
            if self.link.peer_resumed() {
                connectivity.handle_resumed();
            }
        }
        self.link_events();
        let acked = self.acked_pending.take();
        if let Some(up_to) = acked {
            self.acked.send_replace(up_to);
            self.absorb();
            self.link.take_retired(&mut self.retired);
            if !self.retired.is_empty() {
                if let Some(durable) = &self.shared.durable {
                    let _ = durable
                        .tx
                        .send(Command::Retire(std::mem::take(&mut self.retired)));
                }
                self.retired.clear();
            }
        }
        let stats = self.link.stats();
        self.shared.metrics.add_link_delta(&self.stats, &stats);
        self.stats = stats;
    }

    /// Handles the link's events. Called right after every frame, so that a new or skipping
    /// inbound stream reaches the settlement before any of its messages reach the application.
    fn link_events(&mut self) {
        while let Some(event) = self.link.poll_event() {
            match event {
                LinkEvent::Acked { up_to } => self.acked_pending = Some(up_to),
                LinkEvent::InboundStream { epoch, base } => {
                    let stream = self.link.inbound_stream(epoch);
                    self.settlement.reset(stream, epoch, base);
                }
                LinkEvent::Skipped { epoch, from, up_to } => {
                    self.settlement.skip(epoch, from, up_to)
                }
            }
        }
    }

    fn handle_control(&mut self, control: Control) {
        match control {
            Control::Connection(established) => self.install(established),
            Control::LaneStream {
                generation,
                established,
            } => self.install_lane_stream(generation, established),
            Control::Withdraw {
                channel_prefix,
                reply,
            } => {
                let mut withdrawn = self
                    .link
                    .withdraw(|m| m.channel.starts_with(&channel_prefix));
                let before = self.pending.len();
                let mut kept = VecDeque::with_capacity(before);
                for outgoing in self.pending.drain(..) {
                    if outgoing.message.channel.starts_with(&channel_prefix) {
                        withdrawn.push((outgoing.seq, outgoing.tag, outgoing.message));
                    } else {
                        kept.push_back(outgoing);
                    }
                }
                self.pending = kept;
                if let Some(first) = withdrawn.iter().map(|(seq, ..)| *seq).min() {
                    // Until the caller made them durable elsewhere (`SettleWithdrawal`).
                    self.link.hold_for_withdrawal(first);
                }
                withdrawn.sort_unstable_by_key(|(seq, ..)| *seq);
                let _ = reply.send(withdrawn);
                self.absorb();
            }
            Control::GiveUp { seqs, reason } => {
                // The messages may still wait in the command queue (this select takes control
                // first): take them into the link before looking (bounded by the queue).
                while let Ok(outgoing) = self.commands.try_recv() {
                    self.batch.push(outgoing);
                }
                self.take_batch();
                let given_up = self.link.give_up(&seqs, reason);
                self.dead_letter(given_up);
            }
            Control::CopyQueued { seqs, reply } => {
                let wanted = |seq: &u64| seqs.binary_search(seq).is_ok();
                let copies = self
                    .link
                    .queued()
                    .filter(|(seq, _)| wanted(seq))
                    .map(|(seq, message)| (seq, message.clone()))
                    .chain(
                        self.pending
                            .iter()
                            .filter(|o| wanted(&o.seq))
                            .map(|o| (o.seq, o.message.clone())),
                    )
                    .collect();
                let _ = reply.send(copies);
            }
            Control::LaneUp { generation } => {
                if let Some(connectivity) = &mut self.connectivity {
                    connectivity.handle_lane_up(generation);
                }
                self.connectivity_events("");
            }
            Control::SettleWithdrawal => {
                self.link.settle_withdrawal();
                self.flush();
            }
            Control::DialFailed(error) => {
                let attempts = self.connectivity.as_ref().map_or(0, Peer::dial_attempts);
                self.shared.metrics.dial_failure();
                let refused = matches!(
                    error,
                    ConnectError::Refused(_) | ConnectError::RefusedPeer(_)
                );
                if refused {
                    self.shared.metrics.refusal();
                    warn!(%error, "dial refused");
                } else if attempts <= 1 {
                    info!(%error, "dial failed");
                } else {
                    debug!(%error, attempts, "dial failed");
                }
                let _ = self.shared.events.send(PeerEvent::ConnectFailed {
                    peer: self.peer,
                    reason: error.to_string(),
                    refused,
                });
                if let Some(connectivity) = &mut self.connectivity {
                    connectivity.handle_dial_failed(now());
                }
            }
            Control::Addresses(addrs) => {
                if let Some(connectivity) = &mut self.connectivity {
                    connectivity.handle_addresses(now(), addrs);
                }
            }
            Control::WatermarkDurable { epoch, up_to } => {
                let (output, recovered) = self.gate.handle_durable((epoch, up_to));
                if recovered {
                    info!("the spool took this peer's watermark again; acknowledgements resume");
                }
                self.apply_gate(output);
                self.settled();
            }
            Control::WatermarkFailed {
                epoch,
                up_to,
                stopped,
                error,
            } => self.watermark_failed((epoch, up_to), stopped, error),
        }
    }

    /// The spool did not persist a watermark: nothing past the last durable one is
    /// acknowledged (see [`WatermarkGate::handle_refused`]); each episode is logged once.
    fn watermark_failed(&mut self, watermark: (u64, u64), stopped: bool, error: String) {
        match self.gate.handle_refused(now(), watermark, stopped) {
            Refusal::FirstStopped => {
                warn!(%error, "the spool stopped: acknowledgements to this peer wait for a restart")
            }
            Refusal::FirstFull => warn!(
                %error,
                "the spool refused this peer's watermark: acknowledgements to it wait for room"
            ),
            Refusal::StillFull | Refusal::StillStopped => {}
        }
    }

    fn settled(&mut self) {
        self.persist_settled(false);
    }

    /// The application settled more of the peer's stream: the gate says whether to acknowledge
    /// it now or to persist it first (`last`: the task is stopping, persist the newest
    /// regardless).
    fn persist_settled(&mut self, last: bool) {
        let output = self.gate.handle_settled(self.settlement.watermark(), last);
        self.apply_gate(output);
    }

    fn apply_gate(&mut self, output: GateOutput) {
        if let Some((epoch, up_to)) = output.acknowledge {
            self.link.acknowledge(epoch, up_to);
        }
        if let (Some((epoch, up_to)), Some(durable)) = (output.persist, &self.shared.durable) {
            let watermark = Watermark {
                peer: self.peer,
                epoch,
                up_to,
                lane: self.link.lane(),
            };
            let _ = durable.tx.send(Command::Watermark {
                watermark,
                reply: self.control_tx.clone(),
            });
        }
    }

    /// Gives up queued messages past their expiry or retry budget: each goes to the dead-letter
    /// log (with a spool), its receipt fails, and the application gets an event.
    fn expire(&mut self) {
        let now = self.shared.now_unix_ms();
        let given_up = self.link.expire(now);
        self.dead_letter(given_up);
    }

    /// Dead-letters given-up messages (with a spool; else reports them): the receipt fails and
    /// the application gets an event. Events owed to durable subscriptions are counted too.
    fn dead_letter(&mut self, given_up: Vec<weft_proto::link::GivenUp>) {
        for given_up in given_up {
            if given_up.message.channel == weft_proto::channel::mesh::EVENT
                && given_up
                    .message
                    .options
                    .as_ref()
                    .is_some_and(|o| o.expires_unix_ms.is_some())
            {
                // Only events owed to durable subscriptions carry an expiry.
                self.shared
                    .metrics
                    .durable_events_dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let id = MessageId {
                producer: self.shared.id,
                stream: self.link.stream(),
                seq: given_up.seq,
            };
            let reason = given_up.reason.to_string();
            self.fates.fail(
                given_up.seq,
                DeliveryError::DeadLettered {
                    reason: reason.clone(),
                },
            );
            match &self.shared.durable {
                Some(durable) if given_up.tag != 0 => {
                    let _ = durable.tx.send(Command::DeadLetter {
                        peer: self.peer,
                        id,
                        tag: given_up.tag,
                        reason,
                    });
                }
                _ => {
                    self.shared.metrics.dead_lettered();
                    warn!(%id, %reason, "message given up (no spool: not kept)");
                    let _ = self.shared.events.send(PeerEvent::DeadLettered {
                        peer: self.peer,
                        id,
                        reason,
                    });
                }
            }
        }
        self.absorb();
    }

    /// A connection passed its hello: the connectivity machine decides whether it replaces the
    /// one in use or is closed as a duplicate.
    fn install(&mut self, established: Established) {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.connection.close_reason().is_some())
        {
            // The current connection is already dead (we just had not read far enough to see it):
            // never prefer it over a live one.
            self.connection_lost("connection closed".into());
        }
        let Some(connectivity) = &mut self.connectivity else {
            return;
        };
        let admit = connectivity.handle_connection(NewConnection {
            remote: established.remote,
            dialed_by_local: established.dialed_by_local,
            peer_incarnation: established.peer_incarnation,
        });
        let (generation, replaced) = match admit {
            Admit::CloseNew => {
                debug!(
                    incarnation = established.peer_incarnation,
                    "closing duplicate connection"
                );
                established
                    .connection
                    .close(close_code::DUPLICATE, b"duplicate connection");
                return;
            }
            Admit::Install {
                generation,
                replaced,
            } => (generation, replaced),
        };
        if let Some(replaced) = replaced {
            if let Some(current) = self.conn.take() {
                current
                    .connection
                    .close(close_code::DUPLICATE, b"replaced by another connection");
                self.link.disconnected();
                self.connected.send_replace(false);
            }
            self.connectivity_events(replaced.as_str());
        }
        self.generation = generation;
        self.conn = Some(Conn::new(established));
        self.link.connected();
        self.connected.send_replace(true);
        self.connectivity_events("");
        self.open_lanes();
        self.process_rx();
    }

    /// Carries out what the connectivity machine asks for: dials, and the peer's up and down
    /// (events, metric, log); `reason` says why, for a down.
    fn connectivity_events(&mut self, reason: &str) {
        while let Some(event) = self.connectivity.as_mut().and_then(Peer::poll_event) {
            match event {
                weft_proto::peer::PeerEvent::Dial { addresses, stagger } => {
                    self.start_dial(addresses, stagger)
                }
                weft_proto::peer::PeerEvent::Up {
                    remote,
                    dialed_by_local,
                } => {
                    self.shared.metrics.peer_up();
                    info!(%remote, dialed = dialed_by_local, "peer up");
                    let _ = self.shared.events.send(PeerEvent::Up {
                        peer: self.peer,
                        addr: remote,
                    });
                }
                weft_proto::peer::PeerEvent::Down => {
                    self.shared.metrics.peer_down();
                    info!(%reason, "peer down");
                    let _ = self.shared.events.send(PeerEvent::Down {
                        peer: self.peer,
                        reason: reason.to_string(),
                    });
                }
            }
        }
    }

    /// Gives the other lanes' tasks their streams on the connection just installed: the side
    /// that dialed opens them (first byte: the lane), the other accepts them. A failure closes
    /// the connection (it cannot carry every lane); one closed meanwhile just ends this.
    fn open_lanes(&self) {
        let Some(conn) = &self.conn else { return };
        if self.others.is_empty() {
            return;
        }
        let connection = conn.connection.clone();
        let dialed = conn.dialed_by_local;
        let incarnation = conn.peer_incarnation;
        let generation = self.generation;
        let lanes: Vec<(Lane, mpsc::UnboundedSender<Control>)> = self
            .others
            .iter()
            .map(|other| (other.lane, other.control.clone()))
            .collect();
        let mut shutdown = self.shared.shutdown.subscribe();
        tokio::spawn(
            async move {
                let streams = async {
                    let mut seen = Vec::with_capacity(lanes.len());
                    for (index, _) in lanes.iter().enumerate() {
                        let (lane, send, recv) = if dialed {
                            let lane = lanes[index].0;
                            let (send, recv) = open_lane_stream(&connection, lane).await?;
                            (lane, send, recv)
                        } else {
                            accept_lane_stream(&connection, &mut seen).await?
                        };
                        let Some((_, control)) = lanes.iter().find(|(l, _)| *l == lane) else {
                            return Err(format!("the peer opened a stream for lane {lane}"));
                        };
                        let _ = control.send(Control::LaneStream {
                            generation,
                            established: Established {
                                remote: connection.remote_address(),
                                connection: connection.clone(),
                                send,
                                recv,
                                leftover: BytesMut::new(),
                                dialed_by_local: dialed,
                                peer_incarnation: incarnation,
                            },
                        });
                    }
                    Ok::<(), String>(())
                };
                let result = tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|stop| *stop) => return,
                    result = streams => result,
                };
                if let Err(reason) = result {
                    if connection.close_reason().is_none() {
                        warn!(%reason, "cannot set up the lanes' streams; closing the connection");
                        connection.close(close_code::PROTOCOL, reason.as_bytes());
                    }
                }
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// A lane's stream on a connection the normal lane's task installed (see the module doc).
    /// A stream of an older connection than the one in use is dropped.
    fn install_lane_stream(&mut self, generation: u64, established: Established) {
        if generation <= self.generation || established.connection.close_reason().is_some() {
            debug!(generation, "stale lane stream dropped");
            return;
        }
        self.connection_lost("replaced by a newer connection".into());
        self.generation = generation;
        self.conn = Some(Conn::new(established));
        self.link.connected();
        self.connected.send_replace(true);
        debug!(generation, "lane stream up");
        if let Some(normal) = &self.normal_lane {
            let _ = normal.send(Control::LaneUp { generation });
        }
        self.process_rx();
    }

    fn connection_lost(&mut self, reason: String) {
        self.lose_connection(reason, false);
    }

    /// The connection (or this lane's stream) is gone; `goodbye`: the peer left on purpose, so
    /// only the addresses we were given are redialed.
    fn lose_connection(&mut self, reason: String, goodbye: bool) {
        let Some(conn) = self.conn.take() else { return };
        drop(conn);
        self.link.disconnected();
        self.connected.send_replace(false);
        let Some(connectivity) = &mut self.connectivity else {
            // The normal lane's task reports the connection and redials.
            debug!(%reason, "lane stream down");
            return;
        };
        if !connectivity.is_up() {
            info!(%reason, "connection lost before every lane was up");
        }
        connectivity.handle_connection_lost(now(), goodbye);
        self.connectivity_events(&reason);
    }

    fn protocol_error(&mut self, reason: String) {
        self.shared.metrics.protocol_error();
        warn!(%reason, "peer broke the protocol; closing the connection");
        if let Some(conn) = &self.conn {
            conn.connection
                .close(close_code::PROTOCOL, reason.as_bytes());
        }
        self.connection_lost(format!("protocol error: {reason}"));
    }

    /// Dials `targets` in order, each next one `stagger` after the previous (as the
    /// connectivity machine asked): the first connection is handed over; attempts not started
    /// yet are skipped, and one that completes anyway goes through the usual duplicate
    /// resolution. Only when every address failed is the dial a failure.
    fn start_dial(&mut self, targets: Vec<SocketAddr>, stagger: Duration) {
        debug!(addresses = targets.len(), "dialing");
        let shared = Arc::clone(&self.shared);
        let control = self.control_tx.clone();
        let peer = self.peer;
        let mut shutdown = shared.shutdown.subscribe();
        tokio::spawn(
            async move {
                let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let mut attempts = futures_util::stream::FuturesUnordered::new();
                for (position, addr) in targets.into_iter().enumerate() {
                    let shared = Arc::clone(&shared);
                    let connected = Arc::clone(&connected);
                    attempts.push(async move {
                        if position > 0 {
                            tokio::time::sleep(stagger * position as u32).await;
                            if connected.load(std::sync::atomic::Ordering::Acquire) {
                                return None;
                            }
                        }
                        Some(connection::dial(shared, peer, addr).await)
                    });
                }
                let mut last_error = None;
                loop {
                    let attempt = tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|stop| *stop) => return,
                        attempt = futures_util::StreamExt::next(&mut attempts) => attempt,
                    };
                    match attempt {
                        None => break,
                        Some(None) => {}
                        Some(Some(Ok(established))) => {
                            connected.store(true, std::sync::atomic::Ordering::Release);
                            let _ = control.send(Control::Connection(established));
                        }
                        Some(Some(Err(error))) => last_error = Some(error),
                    }
                }
                if !connected.load(std::sync::atomic::Ordering::Acquire) {
                    if let Some(error) = last_error {
                        let _ = control.send(Control::DialFailed(error));
                    }
                }
            }
            .instrument(tracing::Span::current()),
        );
    }

    fn handle_read(&mut self, read: Result<Option<quinn::Chunk>, quinn::ReadError>) {
        match read {
            Ok(Some(chunk)) => {
                if let Some(conn) = &mut self.conn {
                    debug_assert!(
                        conn.rx_chunk.is_empty(),
                        "reads wait until a chunk is consumed"
                    );
                    conn.rx_chunk = chunk.bytes;
                }
                self.process_rx();
            }
            Ok(None) => {
                // Only a clean shutdown finishes the stream (see `drain`): a goodbye.
                self.lose_connection("the peer finished its stream (shutting down)".into(), true);
            }
            Err(quinn::ReadError::ConnectionLost(e)) => {
                // A goodbye: the peer left on purpose. Redial only what we were told to.
                let goodbye = matches!(
                    &e,
                    quinn::ConnectionError::ApplicationClosed(close)
                        if close.error_code == close_code::SHUTDOWN
                );
                self.lose_connection(e.to_string(), goodbye);
            }
            Err(e) => self.connection_lost(format!("read failed: {e}")),
        }
    }

    /// Decodes and handles frames until the buffer runs dry or a delivery has to wait; then reads
    /// ahead (see [`PeerTask::read_ahead`]).
    fn process_rx(&mut self) {
        loop {
            if !self.deliver() {
                self.read_ahead();
                return;
            }
            let Some(conn) = &mut self.conn else { return };
            let frame = match conn.held.pop_front() {
                Some(frame) => {
                    conn.held_bytes -= held_size(&frame);
                    frame
                }
                None => match next_frame(&self.decoder, conn) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return,
                    Err(e) => {
                        self.protocol_error(e.to_string());
                        return;
                    }
                },
            };
            if let Err(e) = self.link.handle_frame(frame) {
                self.protocol_error(e.to_string());
                return;
            }
            self.link_events();
        }
    }

    /// While a delivery waits for room: decode what has arrived, handle acknowledgements at once
    /// (they concern our own stream), and hold everything else, in order, up to `HELD_BYTES_MAX`.
    fn read_ahead(&mut self) {
        loop {
            let Some(conn) = &mut self.conn else { return };
            if conn.held_bytes >= HELD_BYTES_MAX {
                return;
            }
            match next_frame(&self.decoder, conn) {
                Ok(Some(frame @ Frame::Ack { .. })) => {
                    if let Err(e) = self.link.handle_frame(frame) {
                        self.protocol_error(e.to_string());
                        return;
                    }
                }
                Ok(Some(frame)) => {
                    conn.held_bytes += held_size(&frame);
                    conn.held.push_back(frame);
                }
                Ok(None) => return,
                Err(e) => {
                    self.protocol_error(e.to_string());
                    return;
                }
            }
        }
    }

    /// Hands the link's pending delivery to its channel. Returns false if it has to wait.
    fn deliver(&mut self) -> bool {
        let Some(message) = self.link.peek_delivery() else {
            return true;
        };
        let generation = self.shared.channels.generation();
        if generation != self.channels_generation {
            self.channels = ChannelCache::default();
            self.channels_generation = generation;
        }
        let channel = &message.header.channel;
        let cached = self
            .channels
            .last
            .as_ref()
            .filter(|(name, _)| name == channel)
            .map(|(_, sender)| sender.clone());
        let sender = match cached.or_else(|| self.channels.queues.get(channel).cloned()) {
            Some(sender) => sender,
            None => match self.shared.channels.sender(channel) {
                Ok(sender) => {
                    self.channels.queues.insert(channel.clone(), sender.clone());
                    sender
                }
                Err(ChannelError::TooMany) => {
                    let reason = format!(
                        "peer sends to more channels than this node keeps ({}); raise channels_max",
                        self.shared.config.channels_max
                    );
                    self.protocol_error(reason);
                    return false;
                }
                Err(ChannelError::Closed) => return false,
            },
        };
        if self
            .channels
            .last
            .as_ref()
            .is_none_or(|(name, _)| name != &message.header.channel)
        {
            self.channels.last = Some((message.header.channel.clone(), sender.clone()));
        }
        match sender.try_reserve_owned() {
            Ok(permit) => {
                let message = self.link.pop_delivery().expect("peeked");
                count_delivery(&self.shared, &message);
                permit.send(message);
                true
            }
            Err(mpsc::error::TrySendError::Full(sender)) => {
                self.parked = Some(sender);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn deliver_parked(&mut self, permit: Option<mpsc::OwnedPermit<Message>>) {
        self.parked = None;
        let Some(permit) = permit else { return };
        if let Some(message) = self.link.pop_delivery() {
            count_delivery(&self.shared, &message);
            permit.send(message);
        }
        self.process_rx();
    }

    fn stop(&mut self) {
        // Persist what the application settled last (the spool writer closes after this task).
        self.persist_settled(true);
        if let Some(conn) = self.conn.take() {
            self.connected.send_replace(false);
            if let Some(connectivity) = &self.connectivity {
                conn.connection.close(close_code::SHUTDOWN, b"shutdown");
                if connectivity.is_up() {
                    self.shared.metrics.peer_down();
                }
            }
            self.link.disconnected();
        }
        self.publish_progress();
        let unacked = self.link.queued_messages() + self.pending.len() + self.commands.len();
        if unacked > 0 && self.shared.durable.is_some() {
            info!(
                unacked,
                "stopping with messages the peer has not acknowledged; they stay in the spool"
            );
        } else if unacked > 0 {
            warn!(
                unacked,
                "node stopped with messages the peer has not acknowledged (no spool: they are lost)"
            );
        }
    }
}

/// Opens `lane`'s stream on a connection this node dialed: its first byte names the lane.
async fn open_lane_stream(
    connection: &quinn::Connection,
    lane: Lane,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| format!("cannot open the {lane} lane's stream: {e}"))?;
    let _ = send.set_priority(lane.stream_priority());
    send.write_all(&[lane.index() as u8])
        .await
        .map_err(|e| format!("cannot write the {lane} lane's stream: {e}"))?;
    Ok((send, recv))
}

/// Accepts a lane's stream on a connection the peer dialed, and reads which lane it is (one
/// the connection has not carried yet, never the normal lane: that one is the hello's stream).
async fn accept_lane_stream(
    connection: &quinn::Connection,
    seen: &mut Vec<Lane>,
) -> Result<(Lane, quinn::SendStream, quinn::RecvStream), String> {
    let (send, mut recv) = connection
        .accept_bi()
        .await
        .map_err(|e| format!("cannot accept a lane's stream: {e}"))?;
    let mut byte = [0u8; 1];
    recv.read_exact(&mut byte)
        .await
        .map_err(|e| format!("cannot read a lane's stream: {e}"))?;
    let lane = Lane::from_index(usize::from(byte[0]))
        .filter(|lane| *lane != Lane::Normal && !seen.contains(lane))
        .ok_or_else(|| {
            format!(
                "the peer opened a stream for lane {} (unknown or taken)",
                byte[0]
            )
        })?;
    seen.push(lane);
    let _ = send.set_priority(lane.stream_priority());
    Ok((lane, send, recv))
}

async fn reserve<T>(sender: Option<mpsc::Sender<T>>) -> Option<mpsc::OwnedPermit<T>> {
    match sender {
        Some(sender) => sender.reserve_owned().await.ok(),
        None => pending().await,
    }
}

async fn read_chunk(
    recv: Option<&mut quinn::RecvStream>,
    enabled: bool,
) -> Result<Option<quinn::Chunk>, quinn::ReadError> {
    match recv {
        Some(recv) if enabled => recv.read_chunk(READ_CHUNK_BYTES, true).await,
        _ => pending().await,
    }
}

/// The next whole frame from what the connection delivered: first a frame straddling chunks
/// (topped up from the current chunk just enough to complete it), then frames taken from the
/// chunk without copying. An incomplete frame at the end of the chunk moves to the reassembly
/// buffer, so the chunk is always consumed when this returns `None`.
fn next_frame(decoder: &FrameDecoder, conn: &mut Conn) -> Result<Option<Frame>, FrameError> {
    if !conn.rx.is_empty() {
        if conn.rx.len() < LENGTH_PREFIX_BYTES {
            let take = (LENGTH_PREFIX_BYTES - conn.rx.len()).min(conn.rx_chunk.len());
            conn.rx.extend_from_slice(&conn.rx_chunk.split_to(take));
        }
        if let Some(total) = decoder.frame_len(&conn.rx)? {
            // Room for the whole frame at once (the length was checked against the limits): a
            // large frame arrives in many chunks, and growing the buffer chunk by chunk would
            // copy it several times over.
            conn.rx.reserve(total.saturating_sub(conn.rx.len()));
            let take = total.saturating_sub(conn.rx.len()).min(conn.rx_chunk.len());
            conn.rx.extend_from_slice(&conn.rx_chunk.split_to(take));
        }
        let frame = decoder.decode(&mut conn.rx)?;
        if frame.is_none() {
            debug_assert!(conn.rx_chunk.is_empty());
        }
        return Ok(frame);
    }
    // (`decode_bytes` checks the length prefix first: an oversized frame is refused here, before
    // anything is buffered for it.)
    if let Some(frame) = decoder.decode_bytes(&mut conn.rx_chunk)? {
        return Ok(Some(frame));
    }
    conn.rx.extend_from_slice(&conn.rx_chunk);
    conn.rx_chunk.clear();
    Ok(None)
}

/// Writes queued batches until the stream takes at least one byte (cancel-safe: `write_chunks`
/// writes nothing if it does not complete). Pending forever when there is nothing to write.
async fn write_queued(
    stream: Option<(&mut quinn::SendStream, &mut VecDeque<Bytes>)>,
) -> Result<(), quinn::WriteError> {
    let Some((send, queue)) = stream.filter(|(_, queue)| !queue.is_empty()) else {
        return pending().await;
    };
    let written = send.write_chunks(queue.make_contiguous()).await?;
    queue.drain(..written.chunks);
    while queue.front().is_some_and(|chunk| chunk.is_empty()) {
        queue.pop_front();
    }
    Ok(())
}

async fn closed(connection: Option<quinn::Connection>) -> quinn::ConnectionError {
    match connection {
        Some(connection) => connection.closed().await,
        None => pending().await,
    }
}

/// Queues a message in its link. The API checked it against the same limits and its sequence
/// number is above every earlier one; the caller checked room.
fn push(link: &mut Link, outgoing: Outgoing) {
    let Outgoing { seq, tag, message } = outgoing;
    if seq == 0 {
        // Volatile: without a connection it is dropped (and counted by the link).
        if let Err(e) = link.push_volatile(message) {
            debug!(error = %e, "volatile message dropped");
        }
        return;
    }
    if let Err(e) = link.push_at(seq, tag, message) {
        unreachable!("checked message refused by its link: {e}");
    }
}

/// Counts a message handed to the application (work items included; the mesh's other channels,
/// `$weft/...`, are counted by what they carry: events delivered).
fn count_delivery(shared: &Shared, message: &Message) {
    let channel = &message.header.channel;
    if !channel.starts_with('$') || channel.starts_with(weft_proto::channel::mesh::WORK_PREFIX) {
        shared.metrics.delivered(1);
    }
}

/// Whether the link has room for `outgoing` now (volatile messages have a queue of their own).
fn fits(link: &Link, outgoing: &Outgoing) -> bool {
    if outgoing.seq == 0 {
        link.has_volatile_room()
    } else {
        link.has_room(outgoing.message.body.len())
    }
}

/// What a held frame counts against `HELD_BYTES_MAX`.
fn held_size(frame: &Frame) -> usize {
    match frame {
        Frame::Data(data) => 64 + data.channel.len() + data.body.len(),
        _ => 64,
    }
}

/// Sleeps until a deadline of the sans-IO machines (forever without one).
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
        None => pending().await,
    }
}

/// The driver's clock, as the sans-IO machines take it.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}
