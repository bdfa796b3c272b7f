//! The peer task: one per known peer, owning that peer's [`Session`] (its connection lifecycle
//! and every lane's [`Link`]) for the node's lifetime, and moving bytes between quinn and the
//! session.
//!
//! The task carries out what the session decides: it dials when told (a dial round runs as a
//! helper task and reports back), installs or closes connections as the session's duplicate
//! resolution says, and reports the peer up and down. A connection carries one bidirectional
//! QUIC stream per lane: the normal lane's is the hello's; once a connection is installed, the
//! side that dialed opens the others (first byte: the lane) and the other side accepts them (a
//! helper task), and each comes back with the connection's generation, so a stream of a
//! connection replaced meanwhile is never installed. Each stream has its lane's send priority
//! ([`Lane::stream_priority`]), so quinn sends high-lane bytes ahead of queued bulk bytes.
//!
//! The task is the only code that touches its session, so the session needs no lock. It
//! multiplexes, in priority order: shutdown, control (connections, lane streams, addresses, the
//! spool's answers, the work queues' requests), the lanes (taken in turn, so a busy lane cannot
//! starve another), the connection closing while no lane reads, and the session's deadline. Per
//! lane: a parked delivery waiting for room in its channel, the stream accepting queued bytes,
//! bytes from the stream, messages from the application, and the application settling what it
//! took. Writes never block the task: encoded batches wait in a bounded queue per lane and go
//! out through quinn's cancel-safe `write_chunks`, tried at once and otherwise awaited alongside
//! reads, so a peer that is slow to read can never stop this task from reading (two nodes
//! writing to each other cannot deadlock).

use std::collections::{HashMap, VecDeque};
use std::future::{pending, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};
use weft_proto::frame::LENGTH_PREFIX_BYTES;
use weft_proto::link::{GivenUp, LinkStats};
use weft_proto::peer::{Admit, NewConnection, PeerConfig, PeerEvent as Lifecycle, Refusal};
use weft_proto::session::{Session, SessionConfig, SessionEvent};
use weft_proto::spooled::Watermark;
use weft_proto::{
    Channel, DataContext, Frame, FrameDecoder, FrameError, Lane, Link, LinkConfig, Message,
    MessageId, NodeId,
};

use crate::config::{NodeConfig, WallClock};
use crate::connection::{close_code, Established};
use crate::durable::{Command, RestoredStream};
use crate::error::{ConnectError, DeliveryError};
use crate::events::PeerEvent;
use crate::handle::{Control, Outgoing, PeerHandle, SpoolOutcome, SpoolReply};
use crate::inbox::{ChannelError, Channels};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::queue;
use crate::receipt::{Fates, Progress};
use crate::settle::Settlement;

/// Bytes gathered into one write: large writes are what make QUIC fast (one write per message
/// runs at a twentieth of the speed).
const TRANSMIT_BATCH_BYTES: usize = 64 * 1024;
/// Encoded batches waiting for a stream to accept them (a large body is a batch of its own);
/// with the batch size and the largest body this bounds the bytes between a link and quinn's
/// send buffer.
const WRITE_QUEUE_BATCHES: usize = 16;
/// Most bytes taken from a stream per read.
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Most reads of one lane's stream per wake of the task.
const READS_PER_WAKE: usize = 16;
/// Frames read ahead per lane while a delivery waits for room in its channel (body bytes,
/// roughly): acks among them are handled at once, so the node's own receipts keep resolving
/// while its application is slow; beyond this the lane stops reading and QUIC flow control
/// pushes back.
const HELD_BYTES_MAX: usize = 1024 * 1024;
/// Capacity reserved at once for encoding batches (several batches are split off one buffer).
const TX_BUFFER_BYTES: usize = 4 * TRANSMIT_BATCH_BYTES;
/// Most application messages taken per wakeup and lane.
const COMMAND_BATCH: usize = 512;

/// The connection in use.
struct Conn {
    connection: quinn::Connection,
    dialed_by_local: bool,
    /// Its generation in the session (see [`weft_proto::peer::Peer::generation`]).
    generation: u64,
}

/// One lane's QUIC stream on the connection in use.
struct Stream {
    recv: quinn::RecvStream,
    send: quinn::SendStream,
    /// The peer finished its side (it is shutting down): nothing more to read.
    finished: bool,
    /// The rest of the last chunk read, not yet decoded: whole frames are taken from it without
    /// copying.
    rx_chunk: Bytes,
    /// A frame that straddles chunks, being reassembled (empty most of the time).
    rx: BytesMut,
    /// The last data frame read from the stream, which a continuation repeats.
    rx_data: DataContext,
    /// Where batches are encoded; each batch is split off, so one allocation serves several.
    tx_buf: BytesMut,
    /// Frames read while a delivery was parked, waiting in order behind it.
    held: VecDeque<Frame>,
    /// Rough size of `held`, bounded by `HELD_BYTES_MAX`.
    held_bytes: usize,
    /// Encoded batches the stream has not accepted yet (at most `WRITE_QUEUE_BATCHES`).
    tx: VecDeque<Bytes>,
}

impl Stream {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream, leftover: BytesMut) -> Self {
        Self {
            recv,
            send,
            finished: false,
            rx_chunk: Bytes::new(),
            rx_data: DataContext::new(),
            rx: leftover,
            tx_buf: BytesMut::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            tx: VecDeque::with_capacity(WRITE_QUEUE_BATCHES),
        }
    }

    fn reading(&self) -> bool {
        !self.finished && self.held_bytes < HELD_BYTES_MAX
    }
}

/// The channel queues a lane delivered to, valid while `Channels::generation` stays.
#[derive(Default)]
struct ChannelCache {
    queues: HashMap<Channel, queue::Sender<Message>>,
    /// The last channel delivered to: consecutive messages mostly share one, and comparing
    /// names is cheaper than hashing them.
    last: Option<(Channel, queue::Sender<Message>)>,
}

/// What woke a lane.
enum Wake {
    /// A parked delivery's channel has room (or closed).
    Parked,
    /// The stream accepted queued bytes (or failed).
    Written(Result<(), quinn::WriteError>),
    /// Bytes from the stream.
    Read(Result<Option<quinn::Chunk>, quinn::ReadError>),
    /// Messages from the application (0: every sender is gone).
    Commands(usize),
    /// The application settled more of the peer's stream.
    Settled,
}

/// The driver's side of one lane: its stream, the application's queue into it, and what the
/// application learns of it. The lane's protocol state is in the session.
struct LaneIo {
    lane: Lane,
    stream: Option<Stream>,
    commands: queue::Receiver<Outgoing>,
    /// Taken from `commands` (or restored) but not yet in the link (it was at its bound).
    pending: VecDeque<Outgoing>,
    /// With a spool: taken from `commands`, waiting for the spool writer's answer (only a
    /// durable message enters `pending` and the link), in sequence order.
    unspooled: VecDeque<Outgoing>,
    /// The writer's answers not matched with a message yet (it may answer before this task
    /// took the message from `commands`), in sequence order.
    answers: VecDeque<(u64, SpoolOutcome)>,
    /// The highest seq whose fate at the spool is known, for receipts.
    accepted: watch::Sender<u64>,
    batch: Vec<Outgoing>,
    acked: watch::Sender<u64>,
    connected: watch::Sender<bool>,
    channels: ChannelCache,
    /// `Channels::generation` when `channels` was last known to be current.
    channels_generation: u64,
    /// The channel queue the link's current delivery waits for.
    parked: Option<queue::Sender<Message>>,
    stats: LinkStats,
    /// What the application took of the peer's stream (see [`Settlement`]).
    settlement: Arc<Settlement>,
    /// What receipts watch (the task moves `acked`/`accepted` and records failures).
    progress: Arc<Progress>,
    /// The newest acknowledgement of our stream, not yet published.
    acked_pending: Option<u64>,
    /// Messages handed to application channels, not yet added to the metrics (added once per
    /// wake, with the link's other counters).
    delivered: u64,
}

impl LaneIo {
    /// What wakes this lane next; `room`: how many messages it takes from the application;
    /// `inbound`: the peer's stream in this lane has begun (else nothing can be settled, and
    /// the settlement is not watched: a notification waits for the next look).
    async fn next(&mut self, room: usize, inbound: bool) -> Wake {
        let reading = self.stream.as_ref().is_some_and(Stream::reading);
        let (recv, send) = match &mut self.stream {
            Some(stream) => (
                Some(&mut stream.recv),
                Some((&mut stream.send, &mut stream.tx)),
            ),
            None => (None, None),
        };
        tokio::select! {
            biased;
            () = channel_room(self.parked.as_ref()) => Wake::Parked,
            written = write_queued(send) => Wake::Written(written),
            read = read_chunk(recv, reading) => Wake::Read(read),
            n = self.commands.recv_many(&mut self.batch, room), if room > 0 => Wake::Commands(n),
            () = self.settlement.moved.notified(), if inbound => Wake::Settled,
        }
    }
}

/// Dials `peer` at an address (the node's endpoint, TLS and hello exchange).
pub(crate) type Dialer = Arc<
    dyn Fn(
            NodeId,
            SocketAddr,
        ) -> futures_util::future::BoxFuture<'static, Result<Established, ConnectError>>
        + Send
        + Sync,
>;

/// What a peer task needs of its node: narrow handles, each owned elsewhere (the node builds
/// one for all its peers).
pub(crate) struct PeerEnv {
    pub id: NodeId,
    /// This incarnation's stream epoch for streams not restored from the spool.
    pub epoch: u64,
    pub config: NodeConfig,
    /// The links' settings (with the simulation's fault, if any).
    pub link: LinkConfig,
    /// The spool writer (`None`: no spool).
    pub durable: Option<mpsc::UnboundedSender<Command>>,
    pub channels: Arc<Channels>,
    /// Idempotency keys (see [`crate::keys`]).
    pub keys: Arc<Keys>,
    pub events: broadcast::Sender<PeerEvent>,
    pub metrics: Arc<Metrics>,
    pub wall_clock: WallClock,
    /// True once the node stops.
    pub shutdown: watch::Receiver<bool>,
    pub dial: Dialer,
}

/// What the spool restored of one peer's lane: our stream and the peer's watermark.
#[derive(Default)]
pub(crate) struct RestoredLane {
    pub outbound: Option<RestoredStream>,
    pub inbound: Option<(u64, u64)>,
}

pub(crate) struct PeerTask {
    env: Arc<PeerEnv>,
    peer: NodeId,
    session: Session,
    /// Indexed by [`Lane::index`].
    lanes: [LaneIo; 3],
    conn: Option<Conn>,
    /// The lane served first at the next wake (they take turns).
    turn: usize,
    decoder: FrameDecoder,
    control: mpsc::UnboundedReceiver<Control>,
    control_tx: mpsc::UnboundedSender<Control>,
    retired: Vec<u64>,
}

impl PeerTask {
    /// The task for `peer` and its handle (the normal lane's, holding the others').
    /// `seed` seeds the backoff jitter; `restored` takes each lane's restored state (by lane).
    pub(crate) fn new(
        env: Arc<PeerEnv>,
        peer: NodeId,
        seed: u64,
        mut restored: impl FnMut(Lane) -> RestoredLane,
    ) -> (Self, PeerHandle) {
        let config = &env.config;
        let mut link = env.link.clone();
        // Acknowledgements wait for the application to take a message (and, with a spool, for
        // its watermark to be durable): the session acknowledges, not the link.
        link.ack_on_delivery = false;
        let session_config = SessionConfig {
            peer: PeerConfig {
                reconnect_initial: config.reconnect_initial,
                reconnect_max: config.reconnect_max,
                ..PeerConfig::default()
            },
            link,
            spooled: env.durable.is_some(),
        };
        let mut session = Session::new(env.id, peer, env.epoch, session_config, seed);
        #[cfg(feature = "fault-injection")]
        if env.link.fault == weft_proto::link::Fault::WatermarkAfterAck {
            // The canary's bug: acknowledge before the watermark is durable.
            session.acknowledge_before_durable();
        }
        let (control_tx, control) = mpsc::unbounded_channel();
        let mut handles = Vec::with_capacity(Lane::ALL.len());
        let lanes = Lane::ALL.map(|lane| {
            let RestoredLane { outbound, inbound } = restored(lane);
            let mut pending = VecDeque::new();
            if let Some(stream) = outbound {
                session.restore_outbound(lane, stream.epoch, stream.acked_up_to);
                pending.extend(stream.messages);
            }
            let link = session.link(lane);
            let next_seq = pending.back().map_or(link.next_seq(), |o| o.seq + 1);
            let settlement = Arc::new(Settlement::default());
            if let Some((epoch, up_to)) = inbound {
                session.restore_inbound(lane, epoch, up_to);
                settlement.reset(session.link(lane).inbound_stream(epoch), epoch, up_to);
            }
            let link = session.link(lane);
            env.channels.register(peer, Arc::clone(&settlement));
            let (commands_tx, commands) = queue::channel(config.peer_command_capacity);
            commands_tx.set_next_seq(next_seq);
            let (acked, acked_rx) = watch::channel(link.acked_up_to());
            let (connected, connected_rx) = watch::channel(false);
            let (accepted, accepted_rx) = watch::channel(next_seq - 1);
            let progress = Arc::new(Progress {
                acked: acked_rx,
                accepted: env.durable.is_some().then_some(accepted_rx),
                fates: Fates::default(),
            });
            let spool_reply = Arc::new(SpoolReply {
                peer,
                lane,
                epoch: link.epoch(),
                control: control_tx.clone(),
            });
            handles.push(PeerHandle {
                id: peer,
                lane,
                others: Vec::new(),
                stream: link.stream(),
                commands: commands_tx,
                control: control_tx.clone(),
                progress: Arc::clone(&progress),
                spool_reply,
                connected: connected_rx,
            });
            LaneIo {
                lane,
                stream: None,
                commands,
                pending,
                unspooled: VecDeque::new(),
                answers: VecDeque::new(),
                accepted,
                batch: Vec::with_capacity(COMMAND_BATCH),
                acked,
                connected,
                channels: ChannelCache::default(),
                channels_generation: 0,
                parked: None,
                stats: LinkStats::default(),
                settlement,
                progress,
                acked_pending: None,
                delivered: 0,
            }
        });
        let mut handles = handles.into_iter();
        let mut handle = handles.next().expect("the normal lane comes first");
        debug_assert_eq!(handle.lane, Lane::Normal);
        handle.others = handles.map(Arc::new).collect();
        let mut task = Self {
            decoder: FrameDecoder::new(config.limits()),
            env,
            peer,
            session,
            lanes,
            conn: None,
            turn: 0,
            control,
            control_tx,
            retired: Vec::new(),
        };
        for lane in Lane::ALL {
            task.absorb(lane);
        }
        (task, handle)
    }

    pub(crate) async fn run(mut self) {
        let mut shutdown = self.env.shutdown.clone();
        loop {
            self.flush_all();
            self.publish_progress();
            let rooms = Lane::ALL.map(|lane| self.link_room(lane));
            let inbound = Lane::ALL.map(|lane| self.session.link(lane).inbound().is_some());
            // Not reading means not noticing the connection die; watch for that directly.
            let reading = self
                .lanes
                .iter()
                .any(|l| l.stream.as_ref().is_some_and(Stream::reading));
            let closing = self
                .conn
                .as_ref()
                .filter(|_| !reading)
                .map(|c| c.connection.clone());
            let deadline = self.session.poll_timeout(now());
            let first = self.turn;
            self.turn = (self.turn + 1) % Lane::ALL.len();
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                Some(control) = self.control.recv() => self.handle_control(control),
                (lane, wake) = next_wake(&mut self.lanes, rooms, inbound, first) => {
                    if !self.handle_wake(lane, wake) {
                        break; // every sender is gone: the node is being dropped
                    }
                }
                error = closed(closing) => self.connection_lost(error.to_string()),
                _ = sleep_until(deadline) => self.handle_timeouts(),
            }
        }
        let deadline = self.session.handle_shutdown(now());
        self.drain(Instant::from_std(deadline)).await;
        self.stop();
    }

    /// Handles what woke `lane`. False: the application's queue closed (the node is dropped).
    fn handle_wake(&mut self, lane: Lane, wake: Wake) -> bool {
        match wake {
            Wake::Parked => self.deliver_parked(lane),
            Wake::Written(Ok(())) => {}
            Wake::Written(Err(e)) => self.connection_lost(format!("write failed: {e}")),
            Wake::Read(read) => self.handle_read(lane, read),
            Wake::Commands(0) => return false,
            Wake::Commands(_) => self.take_batch(lane),
            Wake::Settled => self.settled(lane, false),
        }
        true
    }

    /// A deadline passed: the session handles what is due at one reading of the clock.
    fn handle_timeouts(&mut self) {
        self.session.handle_timeout(now(), (self.env.wall_clock)());
        self.session_events("");
    }

    /// On a clean shutdown: until everything queued for the peer is acknowledged (or at most
    /// `deadline`, the session's), keeps reading (the peer's resume and acks) and writing (messages the
    /// application sent last, replies, acks of what it settled); then finishes the streams, so
    /// that closing the connection discards nothing the peer could still take.
    async fn drain(&mut self, deadline: Instant) {
        if self.conn.is_none() {
            return;
        }
        for lane in Lane::ALL {
            // What the application settled last (the pattern tasks settle theirs before the
            // peers stop): without a spool its acknowledgement goes out with the rest.
            self.settled(lane, false);
            let io = &mut self.lanes[lane.index()];
            while let Some(outgoing) = io.commands.try_recv() {
                io.batch.push(outgoing);
            }
            self.take_batch(lane);
        }
        loop {
            self.flush_all();
            self.publish_progress();
            if self.conn.is_none() {
                return;
            }
            // The session's own state, and what this task holds on its way in or out.
            let busy = self.session.is_draining()
                || self.lanes.iter().any(|io| {
                    io.stream.as_ref().is_some_and(|s| {
                        !s.tx.is_empty() || !io.pending.is_empty() || !io.unspooled.is_empty()
                    })
                });
            if !busy {
                break;
            }
            let first = self.turn;
            self.turn = (self.turn + 1) % Lane::ALL.len();
            tokio::select! {
                // The spool's answers (what the application sent last becomes durable) and
                // watermark confirmations; nothing else is taken on any more.
                Some(control) = self.control.recv() => {
                    if matches!(
                        control,
                        Control::Spooled { .. }
                            | Control::WatermarkDurable { .. }
                            | Control::WatermarkFailed { .. }
                    ) {
                        self.handle_control(control);
                    }
                }
                (lane, wake) = next_wake(&mut self.lanes, [0; 3], [true; 3], first) => {
                    self.handle_wake(lane, wake);
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        for io in &mut self.lanes {
            if let Some(stream) = &mut io.stream {
                if stream.send.finish().is_ok() {
                    let _ = tokio::time::timeout_at(deadline, stream.send.stopped()).await;
                }
            }
        }
    }

    /// How many more messages `lane` takes from the application now.
    fn link_room(&self, lane: Lane) -> usize {
        let io = &self.lanes[lane.index()];
        if !io.pending.is_empty() {
            return 0;
        }
        let held = self.session.link(lane).queued_messages() + io.unspooled.len();
        self.env
            .config
            .link
            .queue_messages_max
            .saturating_sub(held)
            .min(COMMAND_BATCH)
    }

    /// Moves a batch from the application into `lane`'s link (each message is moved as few
    /// times as possible: they are copied by value at every hop).
    fn take_batch(&mut self, lane: Lane) {
        let spooled = self.env.durable.is_some();
        let io = &mut self.lanes[lane.index()];
        let link = self.session.link_mut(lane);
        // One clock reading for the batch's unstamped messages (`PeerSender::send`).
        let mut now_ms = None;
        for mut outgoing in io.batch.drain(..) {
            if let Some(run) = outgoing.run.take() {
                // Out of the queue: no event joins it any more.
                outgoing.message.body = run.finish();
            }
            if outgoing.message.created_unix_ms == 0 {
                let now = *now_ms.get_or_insert_with(|| (self.env.wall_clock)());
                outgoing.message.created_unix_ms = now;
            }
            if spooled && outgoing.seq != 0 {
                // Not durable yet: held until the writer answers (`spool_answered`).
                io.unspooled.push_back(outgoing);
            } else if io.pending.is_empty() && fits(link, &outgoing) {
                push(link, outgoing);
            } else {
                io.pending.push_back(outgoing);
            }
        }
        if !io.answers.is_empty() {
            self.spool_answered(lane);
        }
    }

    /// Matches the spool writer's answers with the messages held for them, in sequence order:
    /// a durable one goes on to the link with its record's tag; a refused one fails its
    /// receipt, and its number is skipped on the wire. Then moves the accepted watermark.
    fn spool_answered(&mut self, lane: Lane) {
        let io = &mut self.lanes[lane.index()];
        let mut accepted = None;
        while let (Some(held), Some((seq, _))) = (io.unspooled.front(), io.answers.front()) {
            let seq = *seq;
            if held.seq != seq {
                // The writer answers every message it was given once, in the order given: an
                // unmatched one is a bug. Drop the older side rather than stall the lane.
                warn!(held = held.seq, answered = seq, %lane, "spool answer out of order");
                if held.seq < seq {
                    io.unspooled.pop_front();
                } else {
                    io.answers.pop_front();
                }
                continue;
            }
            let mut outgoing = io.unspooled.pop_front().expect("front exists");
            let (_, outcome) = io.answers.pop_front().expect("front exists");
            accepted = Some(seq);
            match outcome {
                Ok(tag) => {
                    outgoing.tag = tag;
                    io.pending.push_back(outgoing);
                }
                Err(error) => io.progress.fates.fail(seq, error),
            }
        }
        if let Some(seq) = accepted {
            io.accepted.send_if_modified(|accepted| {
                let moved = seq > *accepted;
                *accepted = (*accepted).max(seq);
                moved
            });
        }
        self.absorb(lane);
    }

    /// Moves messages from `lane`'s `pending` into its link while it has room.
    fn absorb(&mut self, lane: Lane) {
        let io = &mut self.lanes[lane.index()];
        let link = self.session.link_mut(lane);
        while let Some(front) = io.pending.front() {
            if !fits(link, front) {
                break;
            }
            let outgoing = io.pending.pop_front().expect("front exists");
            push(link, outgoing);
        }
    }

    fn flush_all(&mut self) {
        for lane in Lane::ALL {
            self.flush(lane);
        }
    }

    /// Encodes what `lane`'s link has to send (up to the write queue's bound) and hands as
    /// much as the stream takes right now to quinn; the rest waits for the lane's write wake.
    fn flush(&mut self, lane: Lane) {
        let Some(stream) = &mut self.lanes[lane.index()].stream else {
            return;
        };
        let link = self.session.link_mut(lane);
        while stream.tx.len() < WRITE_QUEUE_BATCHES && link.wants_transmit() {
            if stream.tx_buf.capacity() < TRANSMIT_BATCH_BYTES {
                stream.tx_buf.reserve(TX_BUFFER_BYTES);
            }
            let queued = stream.tx.len();
            // Large bodies join the queue as buffers of their own (no copy into the batch).
            link.poll_transmit_chunks(&mut stream.tx_buf, &mut stream.tx, TRANSMIT_BATCH_BYTES);
            if !stream.tx_buf.is_empty() {
                stream.tx.push_back(stream.tx_buf.split().freeze());
            }
            if stream.tx.len() == queued {
                break;
            }
        }
        if stream.tx.is_empty() {
            return;
        }
        // `write_chunks` is cancel-safe: if the stream is blocked, nothing was written.
        let written = write_queued(Some((&mut stream.send, &mut stream.tx))).now_or_never();
        if let Some(Err(e)) = written {
            self.connection_lost(format!("write failed: {e}"));
        }
    }

    /// Publishes what the peer acknowledged (receipts resolve; the spool retires) and the
    /// links' counters.
    fn publish_progress(&mut self) {
        for lane in Lane::ALL {
            let io = &mut self.lanes[lane.index()];
            if let Some(up_to) = io.acked_pending.take() {
                io.acked.send_replace(up_to);
                self.absorb(lane);
                self.session.link_mut(lane).take_retired(&mut self.retired);
            }
            let stats = self.session.link(lane).stats();
            let io = &mut self.lanes[lane.index()];
            if io.delivered > 0 {
                self.env
                    .metrics
                    .delivered(std::mem::take(&mut io.delivered));
            }
            self.env.metrics.add_link_delta(&io.stats, &stats);
            io.stats = stats;
        }
        if !self.retired.is_empty() {
            if let Some(durable) = &self.env.durable {
                let _ = durable.send(Command::Retire(std::mem::take(&mut self.retired)));
            }
            self.retired.clear();
        }
    }

    /// Carries out what the session asks for; `reason` says why, for a down.
    fn session_events(&mut self, reason: &str) {
        while let Some(event) = self.session.poll_event() {
            match event {
                SessionEvent::Peer(Lifecycle::Dial { addresses, stagger }) => {
                    self.start_dial(addresses, stagger)
                }
                SessionEvent::Peer(Lifecycle::Up {
                    remote,
                    dialed_by_local,
                }) => {
                    self.env.metrics.peer_up();
                    info!(%remote, dialed = dialed_by_local, "peer up");
                    let _ = self.env.events.send(PeerEvent::Up {
                        peer: self.peer,
                        addr: remote,
                    });
                }
                SessionEvent::Peer(Lifecycle::Down) => {
                    self.env.metrics.peer_down();
                    info!(%reason, "peer down");
                    let _ = self.env.events.send(PeerEvent::Down {
                        peer: self.peer,
                        reason: reason.to_string(),
                    });
                }
                SessionEvent::Acked { lane, up_to } => {
                    self.lanes[lane.index()].acked_pending = Some(up_to);
                }
                SessionEvent::InboundStream { lane, epoch, base } => {
                    let stream = self.session.link(lane).inbound_stream(epoch);
                    self.lanes[lane.index()]
                        .settlement
                        .reset(stream, epoch, base);
                }
                SessionEvent::Skipped {
                    lane,
                    epoch,
                    from,
                    up_to,
                } => self.lanes[lane.index()].settlement.skip(epoch, from, up_to),
                SessionEvent::Persist { lane, watermark } => self.persist(lane, watermark),
                SessionEvent::GivenUp { lane, given_up } => self.dead_letter(lane, given_up),
            }
        }
    }

    fn handle_control(&mut self, control: Control) {
        match control {
            Control::Connection(established) => self.install(established),
            Control::LaneStream {
                generation,
                lane,
                send,
                recv,
            } => self.install_lane_stream(generation, lane, send, recv),
            Control::Withdraw {
                channel_prefix,
                reply,
            } => {
                let io = &mut self.lanes[Lane::Normal.index()];
                let link = self.session.link_mut(Lane::Normal);
                let mut withdrawn = link.withdraw(|m| m.channel.starts_with(&channel_prefix));
                let mut kept = VecDeque::with_capacity(io.pending.len());
                for outgoing in io.pending.drain(..) {
                    if outgoing.message.channel.starts_with(&channel_prefix) {
                        withdrawn.push((outgoing.seq, outgoing.tag, outgoing.message));
                    } else {
                        kept.push_back(outgoing);
                    }
                }
                io.pending = kept;
                if let Some(first) = withdrawn.iter().map(|(seq, ..)| *seq).min() {
                    // Until the caller made them durable elsewhere (`SettleWithdrawal`).
                    link.hold_for_withdrawal(first);
                }
                withdrawn.sort_unstable_by_key(|(seq, ..)| *seq);
                let _ = reply.send(withdrawn);
                self.absorb(Lane::Normal);
            }
            Control::GiveUp { seqs, reason } => {
                // The messages may still wait in the command queue (control is taken first):
                // take them into the link before looking (bounded by the queue).
                let io = &mut self.lanes[Lane::Normal.index()];
                while let Some(outgoing) = io.commands.try_recv() {
                    io.batch.push(outgoing);
                }
                self.take_batch(Lane::Normal);
                self.session.give_up(Lane::Normal, &seqs, reason);
                self.session_events("");
            }
            Control::CopyQueued { seqs, reply } => {
                let wanted = |seq: &u64| seqs.binary_search(seq).is_ok();
                let io = &self.lanes[Lane::Normal.index()];
                let copies = self
                    .session
                    .link(Lane::Normal)
                    .queued()
                    .filter(|(seq, _)| wanted(seq))
                    .map(|(seq, message)| (seq, message.clone()))
                    .chain(
                        io.pending
                            .iter()
                            .filter(|o| wanted(&o.seq))
                            .map(|o| (o.seq, o.message.clone())),
                    )
                    .collect();
                let _ = reply.send(copies);
            }
            Control::SettleWithdrawal => {
                self.session.link_mut(Lane::Normal).settle_withdrawal();
                self.flush(Lane::Normal);
            }
            Control::Spooled { lane, outcomes } => {
                self.lanes[lane.index()].answers.extend(outcomes);
                self.spool_answered(lane);
            }
            Control::DialFailed(error) => {
                let attempts = self.session.peer().dial_attempts();
                self.env.metrics.dial_failure();
                let refused = matches!(
                    error,
                    ConnectError::Refused(_) | ConnectError::RefusedPeer(_)
                );
                if refused {
                    self.env.metrics.refusal();
                    warn!(%error, "dial refused");
                } else if attempts <= 1 {
                    info!(%error, "dial failed");
                } else {
                    debug!(%error, attempts, "dial failed");
                }
                let _ = self.env.events.send(PeerEvent::ConnectFailed {
                    peer: self.peer,
                    reason: error.to_string(),
                    refused,
                });
                self.session.handle_dial_failed(now());
                self.session_events("");
            }
            Control::Addresses(addrs) => {
                self.session.handle_addresses(now(), addrs);
                self.session_events("");
            }
            Control::WatermarkDurable { lane, epoch, up_to } => {
                if self.session.handle_durable(lane, (epoch, up_to)) {
                    info!(%lane, "the spool took this peer's watermark again; acknowledgements resume");
                }
                // (The session hands on what was settled meanwhile itself.)
                self.session_events("");
            }
            Control::WatermarkFailed {
                lane,
                epoch,
                up_to,
                stopped,
                error,
            } => self.watermark_failed(lane, (epoch, up_to), stopped, error),
        }
    }

    /// The spool did not persist a watermark: nothing past the last durable one is
    /// acknowledged (see [`weft_proto::peer::WatermarkGate::handle_refused`]); each episode is
    /// logged once.
    fn watermark_failed(
        &mut self,
        lane: Lane,
        watermark: (u64, u64),
        stopped: bool,
        error: String,
    ) {
        match self.session.handle_refused(lane, now(), watermark, stopped) {
            Refusal::FirstStopped => {
                warn!(%error, %lane, "the spool stopped: acknowledgements to this peer wait for a restart")
            }
            Refusal::FirstFull => warn!(
                %error, %lane,
                "the spool refused this peer's watermark: acknowledgements to it wait for room"
            ),
            Refusal::StillFull | Refusal::StillStopped => {}
        }
    }

    /// Hands the newest settlement of `lane` to the session, which acknowledges it now or asks
    /// to persist it first (`last`: the task is stopping, persist the newest regardless).
    fn settled(&mut self, lane: Lane, last: bool) {
        let watermark = self.lanes[lane.index()].settlement.watermark();
        self.session.handle_settled(lane, watermark, last);
        self.session_events("");
    }

    /// Asks the spool writer to make an inbound watermark durable (it answers on `control`).
    fn persist(&mut self, lane: Lane, (epoch, up_to): (u64, u64)) {
        let Some(durable) = &self.env.durable else {
            return;
        };
        let watermark = Watermark {
            peer: self.peer,
            epoch,
            up_to,
            lane,
        };
        let _ = durable.send(Command::Watermark {
            watermark,
            reply: self.control_tx.clone(),
        });
    }

    /// Dead-letters a given-up message (with a spool; else reports it): the receipt fails and
    /// the application gets an event. Events owed to durable subscriptions are counted too.
    fn dead_letter(&mut self, lane: Lane, given_up: GivenUp) {
        if given_up.message.channel == weft_proto::channel::mesh::EVENT
            && given_up
                .message
                .options
                .as_ref()
                .is_some_and(|o| o.expires_unix_ms.is_some())
        {
            // Only events owed to durable subscriptions carry an expiry.
            self.env
                .metrics
                .durable_events_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let id = MessageId {
            producer: self.env.id,
            stream: self.session.link(lane).stream(),
            seq: given_up.seq,
        };
        let reason = given_up.reason.to_string();
        self.lanes[lane.index()].progress.fates.fail(
            given_up.seq,
            DeliveryError::DeadLettered {
                reason: reason.clone(),
            },
        );
        match &self.env.durable {
            Some(durable) if given_up.tag != 0 => {
                let _ = durable.send(Command::DeadLetter {
                    peer: self.peer,
                    id,
                    tag: given_up.tag,
                    reason,
                });
            }
            _ => {
                self.env.metrics.dead_lettered();
                warn!(%id, %reason, "message given up (no spool: not kept)");
                let _ = self.env.events.send(PeerEvent::DeadLettered {
                    peer: self.peer,
                    id,
                    reason,
                });
            }
        }
        self.absorb(lane);
    }

    /// A connection passed its hello: the session decides whether it replaces the one in use
    /// or is closed as a duplicate.
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
        let admit = self.session.handle_connection(NewConnection {
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
        if let Some(current) = self.conn.take() {
            current
                .connection
                .close(close_code::DUPLICATE, b"replaced by another connection");
            self.drop_streams();
        }
        let Established {
            connection,
            send,
            recv,
            leftover,
            dialed_by_local,
            remote: _,
            peer_incarnation: _,
        } = established;
        self.conn = Some(Conn {
            connection,
            dialed_by_local,
            generation,
        });
        let normal = &mut self.lanes[Lane::Normal.index()];
        normal.stream = Some(Stream::new(send, recv, leftover));
        normal.connected.send_replace(true);
        self.session_events(replaced.map_or("", |r| r.as_str()));
        self.open_lanes();
        self.process_rx(Lane::Normal);
    }

    /// Drops every lane's stream (the connection went or is replaced).
    fn drop_streams(&mut self) {
        for io in &mut self.lanes {
            if io.stream.take().is_some() {
                io.connected.send_replace(false);
            }
        }
    }

    /// Opens or accepts the other lanes' streams on the connection just installed, in a helper
    /// task: the side that dialed opens them (first byte: the lane), the other accepts them.
    /// A failure closes the connection (it cannot carry every lane); one closed meanwhile just
    /// ends this.
    fn open_lanes(&self) {
        let Some(conn) = &self.conn else { return };
        let connection = conn.connection.clone();
        let dialed = conn.dialed_by_local;
        let generation = conn.generation;
        let control = self.control_tx.clone();
        let mut shutdown = self.env.shutdown.clone();
        tokio::spawn(
            async move {
                let others: Vec<Lane> = Lane::ALL
                    .into_iter()
                    .filter(|l| *l != Lane::Normal)
                    .collect();
                let streams = async {
                    let mut seen = Vec::with_capacity(others.len());
                    for lane in &others {
                        let (lane, send, recv) = if dialed {
                            let (send, recv) = open_lane_stream(&connection, *lane).await?;
                            (*lane, send, recv)
                        } else {
                            accept_lane_stream(&connection, &mut seen).await?
                        };
                        let _ = control.send(Control::LaneStream {
                            generation,
                            lane,
                            send,
                            recv,
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

    /// A lane's stream on a connection this task installed. A stream of a connection replaced
    /// meanwhile is dropped.
    fn install_lane_stream(
        &mut self,
        generation: u64,
        lane: Lane,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let live = self
            .conn
            .as_ref()
            .is_some_and(|c| c.connection.close_reason().is_none());
        if !live || !self.session.handle_lane_stream(lane, generation) {
            debug!(generation, %lane, "stale lane stream dropped");
            return;
        }
        let io = &mut self.lanes[lane.index()];
        io.stream = Some(Stream::new(send, recv, BytesMut::new()));
        io.connected.send_replace(true);
        debug!(generation, %lane, "lane stream up");
        self.session_events("");
        self.process_rx(lane);
    }

    fn connection_lost(&mut self, reason: String) {
        self.lose_connection(reason, false);
    }

    /// The connection is gone; `goodbye`: the peer left on purpose, so only the addresses we
    /// were given are redialed.
    fn lose_connection(&mut self, reason: String, goodbye: bool) {
        if self.conn.take().is_none() {
            return;
        }
        self.drop_streams();
        if !self.session.peer().is_up() {
            info!(%reason, "connection lost before every lane was up");
        }
        self.session.handle_connection_lost(now(), goodbye);
        self.session_events(&reason);
    }

    fn protocol_error(&mut self, reason: String) {
        self.env.metrics.protocol_error();
        warn!(%reason, "peer broke the protocol; closing the connection");
        if let Some(conn) = &self.conn {
            conn.connection
                .close(close_code::PROTOCOL, reason.as_bytes());
        }
        self.connection_lost(format!("protocol error: {reason}"));
    }

    /// Dials `targets` in order, each next one `stagger` after the previous (as the session
    /// asked): the first connection is handed over; attempts not started yet are skipped, and
    /// one that completes anyway goes through the usual duplicate resolution. Only when every
    /// address failed is the dial a failure.
    fn start_dial(&mut self, targets: Vec<SocketAddr>, stagger: Duration) {
        debug!(addresses = targets.len(), "dialing");
        let dial = Arc::clone(&self.env.dial);
        let control = self.control_tx.clone();
        let peer = self.peer;
        let mut shutdown = self.env.shutdown.clone();
        tokio::spawn(
            async move {
                let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let mut attempts = futures_util::stream::FuturesUnordered::new();
                for (position, addr) in targets.into_iter().enumerate() {
                    let dial = Arc::clone(&dial);
                    let connected = Arc::clone(&connected);
                    attempts.push(async move {
                        if position > 0 {
                            tokio::time::sleep(stagger * position as u32).await;
                            if connected.load(std::sync::atomic::Ordering::Acquire) {
                                return None;
                            }
                        }
                        Some(dial(peer, addr).await)
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

    fn handle_read(&mut self, lane: Lane, read: Result<Option<quinn::Chunk>, quinn::ReadError>) {
        match read {
            Ok(Some(chunk)) => {
                if let Some(stream) = &mut self.lanes[lane.index()].stream {
                    debug_assert!(
                        stream.rx_chunk.is_empty(),
                        "reads wait until a chunk is consumed"
                    );
                    stream.rx_chunk = chunk.bytes;
                }
                self.process_rx(lane);
                // What else has arrived is taken in the same wake (a large message comes in
                // many chunks), up to a bound that keeps the other lanes' turns.
                for _ in 1..READS_PER_WAKE {
                    let Some(stream) = &mut self.lanes[lane.index()].stream else {
                        return;
                    };
                    if !stream.reading() || !stream.rx_chunk.is_empty() {
                        return;
                    }
                    // `read_chunk` is cancel-safe: if nothing is there, nothing was taken.
                    match stream
                        .recv
                        .read_chunk(READ_CHUNK_BYTES, true)
                        .now_or_never()
                    {
                        Some(Ok(Some(chunk))) => {
                            stream.rx_chunk = chunk.bytes;
                            self.process_rx(lane);
                        }
                        Some(other) => return self.handle_read(lane, other),
                        None => return,
                    }
                }
            }
            Ok(None) => {
                // Only a clean shutdown finishes a stream (see `drain`): the peer is leaving.
                // Once it finished every stream in place, it is a goodbye.
                if let Some(stream) = &mut self.lanes[lane.index()].stream {
                    stream.finished = true;
                }
                let all = self
                    .lanes
                    .iter()
                    .all(|io| io.stream.as_ref().is_none_or(|s| s.finished));
                if all {
                    self.lose_connection(
                        "the peer finished its streams (shutting down)".into(),
                        true,
                    );
                }
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
            Err(e) => self.connection_lost(format!("read failed on the {lane} lane: {e}")),
        }
    }

    /// Decodes and handles `lane`'s frames until the buffer runs dry or a delivery has to wait;
    /// then reads ahead (see [`PeerTask::read_ahead`]).
    fn process_rx(&mut self, lane: Lane) {
        loop {
            if !self.deliver(lane) {
                self.read_ahead(lane);
                return;
            }
            let Some(stream) = &mut self.lanes[lane.index()].stream else {
                return;
            };
            let frame = match stream.held.pop_front() {
                Some(frame) => {
                    stream.held_bytes -= held_size(&frame);
                    frame
                }
                None => match next_frame(&self.decoder, stream) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return,
                    Err(e) => {
                        self.protocol_error(e.to_string());
                        return;
                    }
                },
            };
            if let Err(e) = self.session.handle_frame(lane, frame) {
                self.protocol_error(e.to_string());
                return;
            }
            // A new or skipping inbound stream reaches the settlement before any of its
            // messages reach the application.
            self.session_events("");
        }
    }

    /// While a delivery waits for room: decode what has arrived, handle acknowledgements at once
    /// (they concern our own stream), and hold everything else, in order, up to `HELD_BYTES_MAX`.
    fn read_ahead(&mut self, lane: Lane) {
        loop {
            let Some(stream) = &mut self.lanes[lane.index()].stream else {
                return;
            };
            if stream.held_bytes >= HELD_BYTES_MAX {
                return;
            }
            match next_frame(&self.decoder, stream) {
                Ok(Some(frame @ Frame::Ack { .. })) => {
                    if let Err(e) = self.session.handle_frame(lane, frame) {
                        self.protocol_error(e.to_string());
                        return;
                    }
                    self.session_events("");
                }
                Ok(Some(frame)) => {
                    stream.held_bytes += held_size(&frame);
                    stream.held.push_back(frame);
                }
                Ok(None) => return,
                Err(e) => {
                    self.protocol_error(e.to_string());
                    return;
                }
            }
        }
    }

    /// Hands `lane`'s pending delivery to its channel. Returns false if it has to wait.
    fn deliver(&mut self, lane: Lane) -> bool {
        let Some(message) = self.session.link(lane).peek_delivery() else {
            return true;
        };
        // A repeat of an idempotency key is settled at once instead (requests excepted: the
        // request task answers those from its reply cache). Only keyed messages pay for it.
        if message.header.options.is_some()
            && message.header.kind != weft_proto::Kind::Request
            && self.env.keys.is_repeat(message, (self.env.wall_clock)())
        {
            let message = self.session.link_mut(lane).pop_delivery().expect("peeked");
            let id = message.header.id;
            self.lanes[lane.index()]
                .settlement
                .settle_many(id.stream, [id.seq]);
            return true;
        }
        let io = &mut self.lanes[lane.index()];
        let generation = self.env.channels.generation();
        if generation != io.channels_generation {
            io.channels = ChannelCache::default();
            io.channels_generation = generation;
        }
        // The channel's queue: the last one used (consecutive messages mostly share one, and
        // comparing names is cheaper than hashing them), else from the cache or the node.
        let channel = &message.header.channel;
        if io
            .channels
            .last
            .as_ref()
            .is_none_or(|(name, _)| name != channel)
        {
            let sender = match io.channels.queues.get(channel) {
                Some(sender) => sender.clone(),
                None => match self.env.channels.sender(channel, self.peer) {
                    Ok(sender) => {
                        io.channels.queues.insert(channel.clone(), sender.clone());
                        sender
                    }
                    Err(ChannelError::TooMany) => {
                        let reason = format!(
                            "peer sends to more channels that this node's application never opened than a peer may create ({}); raise unopened_channels_per_peer",
                            self.env.config.unopened_channels_per_peer
                        );
                        self.protocol_error(reason);
                        return false;
                    }
                    Err(ChannelError::Closed) => return false,
                },
            };
            io.channels.last = Some((channel.clone(), sender));
        }
        let (_, sender) = io.channels.last.as_ref().expect("set above");
        let link = self.session.link_mut(lane);
        let counted = &mut io.delivered;
        let delivered = sender.try_send_with(|| {
            let message = link.pop_delivery().expect("peeked");
            *counted += u64::from(is_application(&message));
            message
        });
        match delivered {
            Ok(()) => true,
            Err(queue::TrySendError::Full) => {
                io.parked = Some(sender.clone());
                false
            }
            Err(queue::TrySendError::Closed) => false,
        }
    }

    /// The channel a delivery waited for has room (or closed): deliver on.
    fn deliver_parked(&mut self, lane: Lane) {
        self.lanes[lane.index()].parked = None;
        self.process_rx(lane);
    }

    fn stop(&mut self) {
        // Persist what the application settled last (the spool writer closes after this task).
        for lane in Lane::ALL {
            self.settled(lane, true);
        }
        if let Some(conn) = self.conn.take() {
            conn.connection.close(close_code::SHUTDOWN, b"shutdown");
            self.drop_streams();
            if self.session.peer().is_up() {
                self.env.metrics.peer_down();
            }
            for lane in Lane::ALL {
                self.session.link_mut(lane).disconnected();
            }
        }
        self.publish_progress();
        let unacked: usize = Lane::ALL
            .into_iter()
            .map(|lane| {
                let io = &self.lanes[lane.index()];
                self.session.link(lane).queued_messages()
                    + io.pending.len()
                    + io.unspooled.len()
                    + io.commands.len()
            })
            .sum();
        if unacked > 0 && self.env.durable.is_some() {
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

/// The next wake of any lane, taking them in turn from `first` (so a busy lane cannot starve
/// the others), with each lane's `rooms` for application messages.
async fn next_wake(
    lanes: &mut [LaneIo; 3],
    rooms: [usize; 3],
    inbound: [bool; 3],
    first: usize,
) -> (Lane, Wake) {
    let [a, b, c] = lanes;
    let (la, lb, lc) = (a.lane, b.lane, c.lane);
    let mut a = pin!(a.next(rooms[0], inbound[0]));
    let mut b = pin!(b.next(rooms[1], inbound[1]));
    let mut c = pin!(c.next(rooms[2], inbound[2]));
    std::future::poll_fn(|cx| {
        for i in 0..3 {
            let polled = match (first + i) % 3 {
                0 => a.as_mut().poll(cx).map(|w| (la, w)),
                1 => b.as_mut().poll(cx).map(|w| (lb, w)),
                _ => c.as_mut().poll(cx).map(|w| (lc, w)),
            };
            if polled.is_ready() {
                return polled;
            }
        }
        Poll::Pending
    })
    .await
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

/// Room in `sender`'s queue (or its close); never without a queue.
async fn channel_room<T>(sender: Option<&queue::Sender<T>>) {
    match sender {
        Some(sender) => {
            let _ = sender.room().await;
        }
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
fn next_frame(decoder: &FrameDecoder, conn: &mut Stream) -> Result<Option<Frame>, FrameError> {
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
        let frame = decoder.decode_in(&mut conn.rx_data, &mut conn.rx)?;
        if frame.is_none() {
            debug_assert!(conn.rx_chunk.is_empty());
        }
        return Ok(frame);
    }
    // (`decode_bytes` checks the length prefix first: an oversized frame is refused here, before
    // anything is buffered for it.)
    if let Some(frame) = decoder.decode_bytes_in(&mut conn.rx_data, &mut conn.rx_chunk)? {
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
    let Outgoing {
        seq, tag, message, ..
    } = outgoing;
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

/// Whether a delivery counts in the metrics' `delivered`: application channels and work items
/// (the mesh's other channels, `$weft/...`, are counted by what they carry: events delivered).
fn is_application(message: &Message) -> bool {
    let channel = &message.header.channel;
    !channel.starts_with('$') || channel.starts_with(weft_proto::channel::mesh::WORK_PREFIX)
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
