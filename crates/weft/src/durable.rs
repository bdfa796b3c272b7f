//! The node's spool service: one writer owning the [`Spool`], fed by a channel.
//!
//! ```text
//! send ──(seq assigned under the peer's lock)──► Append ─┐
//! peer task: settled watermark ─────────────────► Watermark ┤   writer: take every waiting command,
//! peer task: acked tags ────────────────────────► Retire ───┤   append/retire them all, ONE sync,
//! peer task: given-up message ──────────────────► DeadLetter┘   then complete them in order
//!                                                              │
//!   accepted watermark ◄── permit.send(Outgoing) to the peer's link ◄─┘  (and Control::WatermarkDurable)
//! ```
//! Group commit falls out of the loop: while one fsync runs, new commands queue up and form the
//! next batch, so the batch grows with the load and one fsync serves all of it. A send is
//! *accepted* (its `send` returns) only after the sync that covers it returned `Ok`; only then
//! does the message reach its link, so nothing a peer ever saw can be missing from the spool.
//! A peer's watermark is confirmed to its task (which only then acknowledges) the same way, and
//! every watermark request is answered: `WatermarkDurable` after its sync, or `WatermarkFailed`
//! if the spool refused it (full: the task retries later) or a write or sync failed (the spool
//! is poisoned: the task stops acknowledging until the node restarts).
//!
//! Production runs the writer on a dedicated thread (fsync blocks); the simulation runs it as a
//! task on the simulated host, over a `SimStorage`, with an optional simulated fsync latency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use weft_proto::frame::Limits;
use weft_proto::spooled::{self, SpoolEntry, SpooledMessage, Watermark};
use weft_proto::{MessageId, NodeId, OutgoingMessage};
use weft_spool::{FsyncPolicy, Spool, SpoolConfig, SpoolError, Storage};

use crate::error::DeliveryError;
use crate::metrics::Metrics;
use crate::node::{PeerEvent, PeerHandle};
use crate::peer::Control;

/// Most commands taken into one batch (one sync).
const BATCH_MAX: usize = 65_536;
/// How long retirements may wait for a sync of their own when no send brings one.
const RETIRE_SYNC_DELAY: Duration = Duration::from_millis(100);

/// A message on its way into a link: its wire sequence number and the spool record holding it
/// (`tag`, 0 for a node without a spool).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub seq: u64,
    pub tag: u64,
    pub message: OutgoingMessage,
}

/// Work for the writer.
pub(crate) enum Command {
    /// Make a send durable, then hand it to its link through `permit`.
    Append {
        peer: Arc<PeerHandle>,
        seq: u64,
        message: OutgoingMessage,
        permit: mpsc::OwnedPermit<Outgoing>,
        /// Told the outcome (an awaiting `send`: one wake per send, not a broadcast).
        done: Option<oneshot::Sender<Result<(), DeliveryError>>>,
    },
    /// A run of a batch: `messages` numbered from `first` on, each with its slot in the link's
    /// queue. `done` is told, after the sync, which of them the spool refused (usually none).
    AppendRun {
        peer: Arc<PeerHandle>,
        first: u64,
        messages: Vec<(OutgoingMessage, mpsc::OwnedPermit<Outgoing>)>,
        done: oneshot::Sender<Vec<DeliveryError>>,
    },
    /// Persist an inbound watermark, then confirm it to the peer task (`WatermarkDurable`), or
    /// tell it that it did not (`WatermarkFailed`): every request gets exactly one answer.
    Watermark {
        watermark: Watermark,
        reply: mpsc::UnboundedSender<Control>,
    },
    /// Persist the durable subscription registry (replacing the one before), then answer.
    Registry {
        registry: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// The peer acknowledged these records.
    Retire(Vec<u64>),
    /// Move a given-up message to the dead-letter log.
    DeadLetter {
        peer: NodeId,
        id: MessageId,
        tag: u64,
        reason: String,
    },
    /// Sync and stop.
    Close(oneshot::Sender<()>),
}

/// What a restart found for one destination: its stream continues where it left off.
#[derive(Debug)]
pub(crate) struct RestoredStream {
    pub epoch: u64,
    pub acked_up_to: u64,
    pub messages: Vec<Outgoing>,
}

/// A position in an outbound stream: (epoch, seq).
pub(crate) type EpochSeq = (u64, u64);

/// Everything recovery hands to the peer tasks.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    pub outbound: HashMap<NodeId, RestoredStream>,
    pub inbound: HashMap<NodeId, (u64, u64)>,
    /// Messages given new numbers because the spool was damaged: (peer, old (epoch, seq), new
    /// (epoch, seq)); see [`crate::Renumbered`].
    pub renumbered: Vec<(NodeId, EpochSeq, EpochSeq)>,
    /// The durable subscription registry last persisted (see `patterns::pubsub::restore`).
    pub registry: Option<Bytes>,
}

/// Where the spool lives and how the writer runs.
pub(crate) struct SpoolSetup {
    pub storage: Box<dyn Storage + Send>,
    pub config: SpoolConfig,
    /// Run the writer as a task on the current runtime (the simulation) instead of a thread.
    pub inline: bool,
    /// Simulated fsync time (the simulation).
    pub sync_latency: Option<Duration>,
    /// The `ack-before-fsync` canary: complete sends before their sync.
    pub ack_before_fsync: bool,
}

/// The node's handle on its spool writer.
#[derive(Debug)]
pub(crate) struct Durable {
    pub tx: mpsc::UnboundedSender<Command>,
    /// Records the spool can still take; a send takes one first (and waits for it), the writer
    /// gives them back on retirement, dead-lettering or refusal.
    pub room: Arc<Semaphore>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Durable {
    /// Opens the spool, recovers what it holds and starts the writer.
    pub(crate) fn start(
        setup: SpoolSetup,
        limits: Limits,
        peers_max: usize,
        epoch: u64,
        events: broadcast::Sender<PeerEvent>,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Restored), String> {
        let (mut spool, recovery) = Spool::open(setup.storage, setup.config.clone())
            .map_err(|e| format!("cannot open the spool: {e}"))?;
        if !recovery.is_clean() {
            for segment in &recovery.quarantined {
                metrics.spool_error();
                error!(
                    ?segment,
                    "spool segment quarantined: records in it may be lost (see the spool's .quarantined files)"
                );
            }
            for tail in &recovery.truncated {
                info!(?tail, "spool: torn tail from a crash truncated");
            }
        }
        // After a quarantine, records of a stream may be missing, so its numbers cannot be
        // trusted to continue where the peer thinks they are: every pending message gets a new
        // number in a new stream (the peer may see some again: at-least-once after corruption).
        let renumber = !recovery.quarantined.is_empty();
        if renumber {
            warn!("spool damaged: pending messages are renumbered into new streams");
        }
        let (restored, watermarks, pending, registry_tag) =
            restore(&mut spool, recovery.pending, limits, epoch, renumber)?;
        metrics.recovered(pending as u64);
        if pending > 0 || !restored.inbound.is_empty() {
            info!(
                pending,
                destinations = restored.outbound.len(),
                watermarks = restored.inbound.len(),
                "spool recovered: unacknowledged messages will be sent again"
            );
        }
        let room = setup
            .config
            .records_max
            .saturating_sub(pending as u64 + peers_max as u64 + 1);
        let room = Arc::new(Semaphore::new((room as usize).min(Semaphore::MAX_PERMITS)));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            spool,
            policy: setup.config.fsync,
            limits,
            buf: BytesMut::new(),
            watermarks,
            registry_tag,
            room: Arc::clone(&room),
            events,
            metrics,
            unsynced_since: None,
            ack_before_fsync: setup.ack_before_fsync,
        };
        let latency = setup.sync_latency;
        let thread = if setup.inline {
            tokio::spawn(run(writer, rx, latency));
            None
        } else {
            let thread = std::thread::Builder::new()
                .name("weft-spool".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build();
                    match runtime {
                        Ok(runtime) => runtime.block_on(run(writer, rx, latency)),
                        Err(e) => error!(error = %e, "cannot start the spool writer"),
                    }
                })
                .map_err(|e| format!("cannot start the spool writer thread: {e}"))?;
            Some(thread)
        };
        Ok((
            Self {
                tx,
                room,
                thread: Mutex::new(thread),
            },
            restored,
        ))
    }

    /// Syncs what is buffered and stops the writer.
    pub(crate) async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Close(reply)).is_ok() {
            let _ = done.await;
        }
        let thread = self
            .thread
            .lock()
            .expect("spool thread lock poisoned")
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// What recovery found: the streams, the spool record of each peer's watermark, the pending
/// message count, the spool record of the durable subscription registry.
type Recovered = (Restored, HashMap<NodeId, u64>, usize, Option<u64>);

/// Sorts recovered records into restored streams and watermarks. Whatever cannot be restored
/// goes to the dead-letter log with the reason — nothing is skipped silently. Unnumbered
/// messages (sequence number 0: replayed dead letters, written by `weft spool replay`) join the
/// end of their destination's stream (or a new one in `epoch`); they are rewritten with their
/// number before anything is sent, so a later restart sends them under the same id.
fn restore<S: Storage>(
    spool: &mut Spool<S>,
    pending: Vec<weft_spool::PendingRecord>,
    limits: Limits,
    new_epoch: u64,
    renumber: bool,
) -> Result<Recovered, String> {
    let mut restored = Restored::default();
    let mut watermarks: HashMap<NodeId, (u64, Watermark)> = HashMap::new();
    let mut by_dest: HashMap<NodeId, Vec<(u64, SpooledMessage)>> = HashMap::new();
    let mut dead = Vec::new();
    let mut stale = Vec::new();
    let mut registry: Option<(u64, Bytes)> = None;
    for record in pending {
        match spooled::decode(Bytes::from(record.payload.to_vec()), limits) {
            Ok(SpoolEntry::Message(message)) => by_dest
                .entry(message.dest)
                .or_default()
                .push((record.seq, message)),
            Ok(SpoolEntry::Watermark(watermark)) => {
                // The newest record per peer wins; older ones only survived a crash between
                // the append of their successor and their retirement.
                if let Some((old, _)) = watermarks.insert(watermark.peer, (record.seq, watermark)) {
                    stale.push(old);
                }
            }
            Ok(SpoolEntry::Registry(bytes)) => {
                // Likewise: the newest wins.
                if let Some((old, _)) = registry.replace((record.seq, bytes)) {
                    stale.push(old);
                }
            }
            Err(e) => {
                error!(seq = record.seq, error = %e, "spool record does not decode; dead-lettering it");
                dead.push((record.seq, format!("undecodable spool record: {e}")));
            }
        }
    }
    let mut pending_messages = 0;
    for (dest, records) in by_dest {
        let (mut unnumbered, mut records): (Vec<_>, Vec<_>) = records
            .into_iter()
            .partition(|(_, m)| renumber || m.seq == 0);
        unnumbered.sort_by_key(|(tag, _)| *tag);
        // A numbered message recorded twice (a rewrite that crashed before retiring the old
        // record) is sent once.
        let mut numbered_seen = std::collections::HashSet::new();
        unnumbered.retain(|(tag, m)| {
            let fresh = m.seq == 0 || numbered_seen.insert((m.epoch, m.seq));
            if !fresh {
                stale.push(*tag);
            }
            fresh
        });
        records.sort_by_key(|(tag, _)| *tag);
        if records.is_empty() {
            restored.outbound.insert(
                dest,
                RestoredStream {
                    epoch: new_epoch,
                    acked_up_to: 0,
                    messages: Vec::new(),
                },
            );
        }
        let stream = restore_stream(&mut records, &mut dead);
        if let Some(stream) = stream {
            restored.outbound.insert(dest, stream);
        }
        let stream = restored.outbound.get_mut(&dest).expect("inserted above");
        for (tag, message) in unnumbered {
            let seq = stream.messages.last().map_or(stream.acked_up_to, |m| m.seq) + 1;
            let mut buf = BytesMut::new();
            let renumbered = spooled::encode_message(
                &dest,
                stream.epoch,
                seq,
                &message.message,
                limits,
                &mut buf,
            )
            .map_err(|e| e.to_string())
            .and_then(|()| spool.append(&buf).map_err(|e| e.to_string()));
            match renumbered {
                Ok(new_tag) => {
                    let _ = spool.retire(tag);
                    if message.seq != 0 {
                        // It had a number the peer may have seen: tell the application.
                        restored.renumbered.push((
                            dest,
                            (message.epoch, message.seq),
                            (stream.epoch, seq),
                        ));
                    }
                    stream.messages.push(Outgoing {
                        seq,
                        tag: new_tag,
                        message: message.message,
                    });
                }
                Err(e) => {
                    error!(tag, error = %e, "cannot number a replayed message; it stays in the spool")
                }
            }
        }
        pending_messages += stream.messages.len();
    }
    restored
        .outbound
        .retain(|_, stream| !stream.messages.is_empty());
    let registry_tag = registry.as_ref().map(|(tag, _)| *tag);
    restored.registry = registry.map(|(_, bytes)| bytes);
    let (restored, watermarks, pending) =
        finish_restore(spool, restored, watermarks, dead, stale, pending_messages)?;
    Ok((restored, watermarks, pending, registry_tag))
}

/// One destination's numbered records, in spool order, as a stream to continue.
fn restore_stream(
    records: &mut Vec<(u64, SpooledMessage)>,
    dead: &mut Vec<(u64, String)>,
) -> Option<RestoredStream> {
    let records = std::mem::take(records);
    let first = records.first()?;
    {
        // Every record of a destination continues one stream; a second epoch can only come from
        // damage or a foreign spool, and its numbers would collide: dead-letter it (replayable).
        let epoch = first.1.epoch;
        let (current, other): (Vec<_>, Vec<_>) =
            records.into_iter().partition(|(_, m)| m.epoch == epoch);
        for (tag, _) in other {
            dead.push((
                tag,
                "belongs to an older stream to this peer (replay it to send it again)".into(),
            ));
        }
        let mut current = current;
        current.sort_by_key(|(_, m)| m.seq);
        current.dedup_by_key(|(_, m)| m.seq);
        let acked_up_to = current[0].1.seq - 1;
        Some(RestoredStream {
            epoch,
            acked_up_to,
            messages: current
                .into_iter()
                .map(|(tag, m)| Outgoing {
                    seq: m.seq,
                    tag,
                    message: m.message,
                })
                .collect(),
        })
    }
}

fn finish_restore<S: Storage>(
    spool: &mut Spool<S>,
    mut restored: Restored,
    watermarks: HashMap<NodeId, (u64, Watermark)>,
    dead: Vec<(u64, String)>,
    stale: Vec<u64>,
    pending_messages: usize,
) -> Result<(Restored, HashMap<NodeId, u64>, usize), String> {
    for (seq, reason) in dead {
        if let Err(e) = spool.dead_letter(seq, &reason) {
            error!(seq, error = %e, "cannot dead-letter an unrestorable record; it stays in the spool");
        }
    }
    for seq in stale {
        let _ = spool.retire(seq);
    }
    spool
        .sync()
        .map_err(|e| format!("cannot sync the spool after recovery: {e}"))?;
    let mut records = HashMap::new();
    for (peer, (seq, watermark)) in watermarks {
        records.insert(peer, seq);
        restored
            .inbound
            .insert(peer, (watermark.epoch, watermark.up_to));
    }
    Ok((restored, records, pending_messages))
}

struct Appended {
    peer: Arc<PeerHandle>,
    seq: u64,
    tag: u64,
    message: OutgoingMessage,
    permit: mpsc::OwnedPermit<Outgoing>,
    done: Done,
}

/// Whom to tell the outcome of an append.
enum Done {
    /// Nobody (`try_send`: the receipt tells).
    Nobody,
    /// An awaiting `send`.
    Send(oneshot::Sender<Result<(), DeliveryError>>),
    /// A run of a batch: its index in [`Batch::runs`].
    Run(usize),
}

/// A run of a batch being written: told every refusal of its messages once all are known.
struct Run {
    done: oneshot::Sender<Vec<DeliveryError>>,
    refused: Vec<DeliveryError>,
}

#[derive(Default)]
struct Batch {
    appended: Vec<Appended>,
    runs: Vec<Run>,
    watermarks: Vec<(Watermark, mpsc::UnboundedSender<Control>)>,
    registries: Vec<oneshot::Sender<Result<(), String>>>,
    dead: Vec<(NodeId, MessageId, String)>,
    close: Option<oneshot::Sender<()>>,
}

impl Batch {
    fn tell(&mut self, done: Done, outcome: Result<(), DeliveryError>) {
        match (done, outcome) {
            (Done::Nobody, _) => {}
            (Done::Send(done), outcome) => {
                let _ = done.send(outcome);
            }
            (Done::Run(_), Ok(())) => {}
            (Done::Run(run), Err(error)) => self.runs[run].refused.push(error),
        }
    }

    /// Tells every run its refusals (once all its messages' fates are known).
    fn finish_runs(&mut self) {
        for run in self.runs.drain(..) {
            let _ = run.done.send(run.refused);
        }
    }
}

struct Writer {
    spool: Spool<Box<dyn Storage + Send>>,
    policy: FsyncPolicy,
    limits: Limits,
    buf: BytesMut,
    /// The spool record holding each peer's current watermark.
    watermarks: HashMap<NodeId, u64>,
    /// The spool record holding the durable subscription registry.
    registry_tag: Option<u64>,
    room: Arc<Semaphore>,
    events: broadcast::Sender<PeerEvent>,
    metrics: Arc<Metrics>,
    /// Since when something written is not fsynced yet.
    unsynced_since: Option<Instant>,
    ack_before_fsync: bool,
}

async fn run(
    mut writer: Writer,
    mut rx: mpsc::UnboundedReceiver<Command>,
    latency: Option<Duration>,
) {
    let mut commands = Vec::new();
    loop {
        let first = match writer.interval_due() {
            // Biased (deterministic under simulation), the due sync first: a steady stream of
            // commands must not keep it waiting.
            Some(at) => tokio::select! {
                biased;
                () = tokio::time::sleep_until(at) => {
                    writer.sync_now();
                    continue;
                }
                command = rx.recv() => command,
            },
            None => rx.recv().await,
        };
        let Some(first) = first else { break };
        commands.push(first);
        while commands.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(command) => commands.push(command),
                Err(_) => break,
            }
        }
        let mut batch = writer.write(&mut commands);
        if writer.ack_before_fsync {
            // The canary's bug: report sends accepted before the fsync.
            writer.complete(&mut batch);
        }
        if let Some(latency) = latency {
            // A simulated fsync that takes time. Like a real one it comes after the write: the
            // batch waits in the storage meanwhile (where a killed process leaves it and a power
            // loss drops or tears it), not in this process. A failed write poisons the spool,
            // and the sync in `commit` then refuses the batch.
            let _ = writer.spool.flush();
            tokio::time::sleep(latency).await;
        }
        writer.commit(&mut batch);
        if let Some(close) = batch.close.take() {
            let _ = close.send(());
            break;
        }
    }
    if let Err(e) = writer.spool.sync() {
        warn!(error = %e, "final spool sync failed");
    }
    debug!("spool writer stopped");
}

impl Writer {
    fn write(&mut self, commands: &mut Vec<Command>) -> Batch {
        let mut batch = Batch::default();
        for command in commands.drain(..) {
            match command {
                Command::Append {
                    peer,
                    seq,
                    message,
                    permit,
                    done,
                } => {
                    let done = done.map_or(Done::Nobody, Done::Send);
                    self.append(&mut batch, peer, seq, message, permit, done);
                }
                Command::AppendRun {
                    peer,
                    first,
                    messages,
                    done,
                } => {
                    let run = batch.runs.len();
                    batch.runs.push(Run {
                        done,
                        refused: Vec::new(),
                    });
                    for ((message, permit), seq) in messages.into_iter().zip(first..) {
                        self.append(
                            &mut batch,
                            Arc::clone(&peer),
                            seq,
                            message,
                            permit,
                            Done::Run(run),
                        );
                    }
                }
                Command::Watermark { watermark, reply } => {
                    self.buf.clear();
                    spooled::encode_watermark(&watermark, &mut self.buf);
                    // Into the reserve: a full spool must not stop acknowledgements (see
                    // `Spool::append_reserved`).
                    match self.spool.append_reserved(&self.buf) {
                        Ok(tag) => {
                            if let Some(old) = self.watermarks.insert(watermark.peer, tag) {
                                let _ = self.spool.retire(old);
                            }
                            batch.watermarks.push((watermark, reply));
                        }
                        Err(e) => {
                            match &e {
                                // Reported (logged, counted) when the spool stopped.
                                SpoolError::Poisoned { .. } => {}
                                // Backpressure: the peer task retries and warns once.
                                SpoolError::Full { .. } => self.metrics.spool_error(),
                                _ => {
                                    self.metrics.spool_error();
                                    error!(error = %e, "cannot persist a watermark: the spool accepts nothing more until the node restarts");
                                }
                            }
                            let _ = reply.send(Control::WatermarkFailed {
                                epoch: watermark.epoch,
                                up_to: watermark.up_to,
                                stopped: self.spool.is_poisoned(),
                                error: e.to_string(),
                            });
                        }
                    }
                }
                Command::Registry { registry, done } => {
                    self.buf.clear();
                    spooled::encode_registry(&registry, &mut self.buf);
                    // Into the reserve, like a watermark: rare, small, and it must not wait
                    // for room that only an absent subscriber's return would make.
                    match self.spool.append_reserved(&self.buf) {
                        Ok(tag) => {
                            if let Some(old) = self.registry_tag.replace(tag) {
                                let _ = self.spool.retire(old);
                            }
                            batch.registries.push(done);
                        }
                        Err(e) => {
                            self.metrics.spool_error();
                            error!(error = %e, "cannot persist the durable subscription registry");
                            let _ = done.send(Err(e.to_string()));
                        }
                    }
                }
                Command::Retire(tags) => {
                    let mut retired = 0;
                    for tag in tags {
                        match self.spool.retire(tag) {
                            Ok(()) => retired += 1,
                            Err(SpoolError::NotPending { .. }) => {}
                            Err(e) => {
                                self.metrics.spool_error();
                                error!(error = %e, "cannot retire an acknowledged record");
                            }
                        }
                    }
                    self.room.add_permits(retired);
                    self.metrics.spool_retired(retired as u64);
                }
                Command::DeadLetter {
                    peer,
                    id,
                    tag,
                    reason,
                } => match self.spool.dead_letter(tag, &reason) {
                    Ok(()) => {
                        self.room.add_permits(1);
                        self.metrics.spool_retired(1);
                        batch.dead.push((peer, id, reason));
                    }
                    Err(e) => {
                        self.metrics.spool_error();
                        error!(%id, error = %e, "cannot dead-letter a given-up message; it stays in the spool and is sent again after a restart");
                        batch
                            .dead
                            .push((peer, id, format!("{reason} (kept in the spool: {e})")));
                    }
                },
                Command::Close(reply) => batch.close = Some(reply),
            }
        }
        batch
    }

    fn append(
        &mut self,
        batch: &mut Batch,
        peer: Arc<PeerHandle>,
        seq: u64,
        message: OutgoingMessage,
        permit: mpsc::OwnedPermit<Outgoing>,
        done: Done,
    ) {
        self.buf.clear();
        // The API checked the message against the same limits, so encoding cannot fail; if it
        // did, the send is refused like any other the spool cannot take.
        let appended = match spooled::encode_message(
            &peer.id,
            peer.epoch,
            seq,
            &message,
            self.limits,
            &mut self.buf,
        ) {
            Ok(()) => self.spool.append(&self.buf).map_err(|e| match e {
                SpoolError::Full { .. } => DeliveryError::SpoolFull(e.to_string()),
                _ => DeliveryError::NotAccepted(e.to_string()),
            }),
            Err(e) => Err(DeliveryError::NotAccepted(e.to_string())),
        };
        match appended {
            Ok(tag) => batch.appended.push(Appended {
                peer,
                seq,
                tag,
                message,
                permit,
                done,
            }),
            Err(error) => {
                self.room.add_permits(1);
                if matches!(error, DeliveryError::NotAccepted(_)) {
                    self.metrics.spool_error();
                }
                debug!(%error, "send refused by the spool");
                peer.fates.fail(seq, error.clone());
                settle(&peer, seq);
                batch.tell(done, Err(error));
            }
        }
    }

    /// Makes the batch durable and completes it; on failure fails its sends.
    fn commit(&mut self, batch: &mut Batch) {
        let retire_only = batch.appended.is_empty()
            && batch.watermarks.is_empty()
            && batch.registries.is_empty()
            && batch.dead.is_empty()
            && batch.close.is_none();
        let result = match self.policy {
            // Written (safe from a process crash) now; fsynced on the timer.
            FsyncPolicy::Interval(_) if batch.close.is_none() => self.spool.flush().map(|()| false),
            // Retirements need no fsync of their own: a lost one only means a resend that the
            // receiver's watermark drops. They ride along with the next sync (or the timer).
            _ if retire_only => Ok(false),
            _ => self.spool.sync().map(|_| true),
        };
        match result {
            Ok(synced) => {
                if synced {
                    self.unsynced_since = None;
                } else {
                    self.unsynced_since.get_or_insert_with(Instant::now);
                }
                self.complete(batch);
            }
            Err(e) => {
                self.metrics.spool_error();
                error!(error = %e, "spool write failed: the sends of this batch are refused and the spool accepts nothing more until the node restarts");
                for appended in std::mem::take(&mut batch.appended) {
                    self.room.add_permits(1);
                    let error = DeliveryError::NotAccepted(e.to_string());
                    appended.peer.fates.fail(appended.seq, error.clone());
                    settle(&appended.peer, appended.seq);
                    batch.tell(appended.done, Err(error));
                }
                batch.finish_runs();
                // Not durable, and never will be: the failure poisoned the spool.
                for done in batch.registries.drain(..) {
                    let _ = done.send(Err(e.to_string()));
                }
                for (watermark, reply) in batch.watermarks.drain(..) {
                    let _ = reply.send(Control::WatermarkFailed {
                        epoch: watermark.epoch,
                        up_to: watermark.up_to,
                        stopped: self.spool.is_poisoned(),
                        error: e.to_string(),
                    });
                }
            }
        }
    }

    fn complete(&mut self, batch: &mut Batch) {
        self.metrics.accepted(batch.appended.len() as u64);
        // One watermark move per peer and batch: each move wakes every send waiting on it.
        let mut moved: Vec<(Arc<PeerHandle>, u64)> = Vec::new();
        for appended in std::mem::take(&mut batch.appended) {
            let Appended {
                peer,
                seq,
                tag,
                message,
                permit,
                done,
            } = appended;
            permit.send(Outgoing { seq, tag, message });
            batch.tell(done, Ok(()));
            match moved.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &peer)) {
                Some((_, max)) => *max = (*max).max(seq),
                None => moved.push((peer, seq)),
            }
        }
        for (peer, seq) in moved {
            settle(&peer, seq);
        }
        batch.finish_runs();
        for done in batch.registries.drain(..) {
            let _ = done.send(Ok(()));
        }
        for (watermark, reply) in batch.watermarks.drain(..) {
            self.metrics.watermark_persisted();
            let _ = reply.send(Control::WatermarkDurable {
                epoch: watermark.epoch,
                up_to: watermark.up_to,
            });
        }
        for (peer, id, reason) in batch.dead.drain(..) {
            self.metrics.dead_lettered();
            warn!(%id, %reason, "message dead-lettered");
            let _ = self
                .events
                .send(PeerEvent::DeadLettered { peer, id, reason });
        }
    }

    /// When the writes not yet fsynced are due for it.
    fn interval_due(&self) -> Option<Instant> {
        let since = self.unsynced_since?;
        Some(match self.policy {
            FsyncPolicy::Interval(period) => since + period,
            _ => since + RETIRE_SYNC_DELAY,
        })
    }

    fn sync_now(&mut self) {
        self.unsynced_since = None;
        if let Err(e) = self.spool.sync() {
            self.metrics.spool_error();
            error!(error = %e, "spool sync failed; the spool accepts nothing more until the node restarts");
        }
    }
}

/// Moves the peer's accepted watermark (the highest seq whose fate at the spool is known).
fn settle(peer: &PeerHandle, seq: u64) {
    peer.accepted.send_if_modified(|accepted| {
        if seq > *accepted {
            *accepted = seq;
            true
        } else {
            false
        }
    });
}
