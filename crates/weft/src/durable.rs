//! The node's spool service: one writer owning the [`Spool`], fed by a channel.
//!
//! ```text
//! send ──(seq assigned under the peer's lock)──► Append ─┐
//!   └─ the same message into the peer task's queue,      │
//!      held there (not in the link) until answered      │
//! peer task: settled watermark ─────────────────► Watermark ┤   writer: take every waiting command,
//! peer task: acked tags ────────────────────────► Retire ───┤   append/retire them all, ONE sync,
//! peer task: given-up message ──────────────────► DeadLetter┘   then answer them in order
//!                                                              │
//!   peer task ◄── Control::Spooled{lane, [(seq, tag | refusal)]} ◄─┘  (and Control::WatermarkDurable)
//!   → durable messages enter the link; receipts' accepted watermark and fates move
//! ```
//! Group commit falls out of the loop: while one fsync runs, new commands queue up and form the
//! next batch, so the batch grows with the load and one fsync serves all of it. A send is
//! *accepted* (its `send` returns) only after the sync that covers it returned `Ok`; only then
//! does the message reach its link, so nothing a peer ever saw can be missing from the spool.
//! The writer only answers: it holds no peer handle and no queue slot, and it never pushes into
//! a peer's queue (a [`SpoolReply`] says where to answer). A peer's watermark is confirmed to its
//! task (which only then acknowledges) the same way, and every watermark request is answered:
//! `WatermarkDurable` after its sync, or `WatermarkFailed` if the spool refused it (full: the
//! task retries later) or a write or sync failed (the spool is poisoned: the task stops
//! acknowledging until the node restarts).
//!
//! Production runs the writer on a dedicated thread (fsync blocks); the simulation runs it as a
//! task on the simulated host, over a `SimStorage`, with an optional simulated fsync latency.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use weft_proto::frame::Limits;
use weft_proto::spooled::{self, SpoolEntry, SpooledMessage, Watermark};
use weft_proto::{Lane, MessageId, NodeId, OutgoingMessage};
use weft_spool::{FsyncPolicy, Spool, SpoolConfig, SpoolError, Storage};

use crate::error::DeliveryError;
use crate::events::PeerEvent;
use crate::handle::{Control, Outgoing, SpoolOutcome, SpoolReply};
use crate::metrics::Metrics;
use crate::receipt::SlotState;
use crate::scheduler::{Scheduler, Ticket, Waiting};

/// Most commands taken into one batch (one sync).
const BATCH_MAX: usize = 65_536;
/// How long retirements may wait for a sync of their own when no send brings one.
const RETIRE_SYNC_DELAY: Duration = Duration::from_millis(100);

/// Work for the writer.
pub(crate) enum Command {
    /// Make a send durable, then answer its peer task (which holds the message meanwhile:
    /// only a durable one reaches the link).
    Append {
        to: Arc<SpoolReply>,
        seq: u64,
        message: OutgoingMessage,
        /// Told the outcome (an awaiting `send`: one wake per send, not a broadcast).
        done: Option<oneshot::Sender<Result<(), DeliveryError>>>,
        /// For a delayed message now due: its unnumbered record (retired by this append) and
        /// its receipt's slot.
        release: Option<Ticket>,
    },
    /// Make a delayed message durable *unnumbered* (with its due time), then put it into the
    /// schedule. `done` as for `Append`.
    Schedule {
        dest: NodeId,
        message: OutgoingMessage,
        slot: tokio::sync::watch::Sender<SlotState>,
        done: Option<oneshot::Sender<Result<(), DeliveryError>>>,
    },
    /// A run of a batch: `messages` numbered from `first` on (each also in the peer task's
    /// queue). `done` is told, after the sync, which of them the spool refused (usually none).
    AppendRun {
        to: Arc<SpoolReply>,
        first: u64,
        messages: Vec<OutgoingMessage>,
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
    /// Persist an idempotency key's first sighting (see the `keys` module); no answer: the
    /// watermark that acknowledges its message comes later through this queue, and its sync
    /// covers both.
    Key(weft_proto::spooled::SpooledKey),
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

/// A peer's lane: what streams, watermarks and restored state are kept per.
pub(crate) type PeerLane = (NodeId, Lane);

/// Everything recovery hands to the peer tasks.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    pub outbound: HashMap<PeerLane, RestoredStream>,
    pub inbound: HashMap<PeerLane, (u64, u64)>,
    /// Messages given new numbers because the spool was damaged: (peer, lane, old (epoch,
    /// seq), new (epoch, seq)); see [`crate::Renumbered`].
    pub renumbered: Vec<(NodeId, Lane, EpochSeq, EpochSeq)>,
    /// The durable subscription registry last persisted (see `patterns::pubsub::restore`).
    pub registry: Option<Bytes>,
    /// Delayed messages still waiting (unnumbered): (destination, record, message), in spool
    /// order; they go back into the schedule.
    pub scheduled: Vec<(NodeId, u64, OutgoingMessage)>,
    /// Idempotency keys persisted, in spool order (see the `keys` module).
    pub keys: Vec<weft_proto::spooled::SpooledKey>,
}

/// How many idempotency keys the spool keeps, and for how long.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyBounds {
    pub entries_max: usize,
    pub age_max_ms: u64,
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
    /// The data directory's lock (none in the simulation). The writer owns it and drops it
    /// with the spool when it stops, so no other node (or `weft spool` command) opens the spool
    /// before this writer's last sync, and none is kept out once it is done.
    pub lock: Option<std::fs::File>,
    /// How many idempotency keys the spool keeps, and for how long.
    pub keys: KeyBounds,
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
        scheduler: Arc<Scheduler>,
    ) -> Result<(Self, Restored), String> {
        let key_bounds = setup.keys;
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
        let (restored, watermarks, pending, registry_tag, key_tags) =
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
        // Idempotency key records hold room like messages (see `Command::Key`).
        let room = setup
            .config
            .records_max
            .saturating_sub(pending as u64 + peers_max as u64 + 1 + key_tags.len() as u64);
        let room = Arc::new(Semaphore::new((room as usize).min(Semaphore::MAX_PERMITS)));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            spool,
            policy: setup.config.fsync,
            limits,
            buf: BytesMut::new(),
            watermarks,
            registry_tag,
            keys: key_tags.into(),
            keys_max: key_bounds.entries_max,
            keys_age_max_ms: key_bounds.age_max_ms,
            room: Arc::clone(&room),
            events,
            metrics,
            unsynced_since: None,
            ack_before_fsync: setup.ack_before_fsync,
            scheduler,
            _lock: setup.lock,
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

    /// Syncs what is buffered and stops the writer, whoever still holds this handle: the writer
    /// drops the spool and the data directory's lock as it stops (on its thread: before this
    /// returns). Commands sent afterwards are refused (the channel is closed).
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
/// message count, the spool record of the durable subscription registry, the records of the
/// idempotency keys (with their time, in spool order).
type Recovered = (
    Restored,
    HashMap<PeerLane, u64>,
    usize,
    Option<u64>,
    Vec<(u64, u64)>,
);

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
    let mut watermarks: HashMap<PeerLane, (u64, Watermark)> = HashMap::new();
    // Per destination lane: a numbered message stays in the lane it was numbered in; an
    // unnumbered one takes its priority's.
    let mut by_dest: HashMap<PeerLane, Vec<(u64, SpooledMessage)>> = HashMap::new();
    let mut dead = Vec::new();
    let mut stale = Vec::new();
    let mut registry: Option<(u64, Bytes)> = None;
    let mut key_tags = Vec::new();
    // Delayed messages not yet due (unnumbered), and the records that numbered copies replaced.
    let mut waiting = Vec::new();
    let mut replaced = std::collections::HashSet::new();
    for record in pending {
        match spooled::decode(Bytes::from(record.payload.to_vec()), limits) {
            Ok(SpoolEntry::Message(message)) if message.is_waiting() => {
                waiting.push((record.seq, message));
            }
            Ok(SpoolEntry::Message(message)) => {
                if message.origin != 0 {
                    replaced.insert(message.origin);
                }
                let lane = if message.seq == 0 {
                    message.message.priority.lane()
                } else {
                    message.lane
                };
                by_dest
                    .entry((message.dest, lane))
                    .or_default()
                    .push((record.seq, message));
            }
            Ok(SpoolEntry::Watermark(watermark)) => {
                // The newest record per peer wins; older ones only survived a crash between
                // the append of their successor and their retirement.
                let key = (watermark.peer, watermark.lane);
                if let Some((old, _)) = watermarks.insert(key, (record.seq, watermark)) {
                    stale.push(old);
                }
            }
            Ok(SpoolEntry::Registry(bytes)) => {
                // Likewise: the newest wins.
                if let Some((old, _)) = registry.replace((record.seq, bytes)) {
                    stale.push(old);
                }
            }
            Ok(SpoolEntry::Key(key)) => {
                key_tags.push((key.at_unix_ms, record.seq));
                restored.keys.push(key);
            }
            Err(e) => {
                error!(seq = record.seq, error = %e, "spool record does not decode; dead-lettering it");
                dead.push((record.seq, format!("undecodable spool record: {e}")));
            }
        }
    }
    // A delayed message is numbered by appending its numbered copy (naming this record as its
    // origin) and then retiring this record, in one batch. A crash can leave the copy without
    // the retirement (recovery is the synced state plus a prefix of what followed); the copy is
    // then the message — restored under its number like any numbered record, so a receiver that
    // has it drops it by id — and the unnumbered original is stale. Without the copy the
    // original was never numbered on the wire (a message reaches its link only after the sync
    // covering its record), so scheduling it again cannot give the receiver a second id.
    waiting.retain(|(tag, _)| {
        let live = !replaced.contains(tag);
        if !live {
            stale.push(*tag);
        }
        live
    });
    waiting.sort_by_key(|(tag, _)| *tag);
    let mut pending_messages = waiting.len();
    restored.scheduled = waiting
        .into_iter()
        .map(|(tag, message)| (message.dest, tag, message.message))
        .collect();
    // A record whose numbered copy exists (a replayed dead letter or a renumbered message
    // rewritten at a recovery that crashed before retiring it) is superseded by the copy.
    for records in by_dest.values_mut() {
        records.retain(|(tag, _)| {
            let superseded = replaced.contains(tag);
            if superseded {
                stale.push(*tag);
            }
            !superseded
        });
    }
    for ((dest, lane), records) in by_dest {
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
                (dest, lane),
                RestoredStream {
                    epoch: new_epoch,
                    acked_up_to: 0,
                    messages: Vec::new(),
                },
            );
        }
        let stream = restore_stream(&mut records, &mut dead);
        if let Some(stream) = stream {
            restored.outbound.insert((dest, lane), stream);
        }
        let stream = restored
            .outbound
            .get_mut(&(dest, lane))
            .expect("inserted above");
        for (tag, message) in unnumbered {
            let seq = stream.messages.last().map_or(stream.acked_up_to, |m| m.seq) + 1;
            let mut buf = BytesMut::new();
            // The copy names its origin: a crash between its append and the origin's
            // retirement leaves both, and the next recovery keeps the copy only (the rule
            // below), instead of numbering the message a second time under another id.
            let renumbered = spooled::encode_scheduled(
                &dest,
                lane,
                stream.epoch,
                seq,
                tag,
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
                            lane,
                            (message.epoch, message.seq),
                            (stream.epoch, seq),
                        ));
                    }
                    stream.messages.push(Outgoing {
                        seq,
                        tag: new_tag,
                        message: message.message,
                        run: None,
                    });
                }
                Err(e) => {
                    error!(tag, error = %e, "cannot number a replayed message; it stays in the spool")
                }
            }
        }
        pending_messages += stream.messages.len();
    }
    // (`pending_messages` counts the waiting delayed messages too: each holds a record.)
    restored
        .outbound
        .retain(|_, stream| !stream.messages.is_empty());
    let registry_tag = registry.as_ref().map(|(tag, _)| *tag);
    restored.registry = registry.map(|(_, bytes)| bytes);
    let (restored, watermarks, pending) =
        finish_restore(spool, restored, watermarks, dead, stale, pending_messages)?;
    Ok((restored, watermarks, pending, registry_tag, key_tags))
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
                    run: None,
                })
                .collect(),
        })
    }
}

fn finish_restore<S: Storage>(
    spool: &mut Spool<S>,
    mut restored: Restored,
    watermarks: HashMap<PeerLane, (u64, Watermark)>,
    dead: Vec<(u64, String)>,
    stale: Vec<u64>,
    pending_messages: usize,
) -> Result<(Restored, HashMap<PeerLane, u64>, usize), String> {
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
    for (key, (seq, watermark)) in watermarks {
        records.insert(key, seq);
        restored
            .inbound
            .insert(key, (watermark.epoch, watermark.up_to));
    }
    Ok((restored, records, pending_messages))
}

struct Appended {
    seq: u64,
    /// Its index in [`Batch::answers`].
    answer: usize,
    done: Done,
    release: Option<Ticket>,
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
    /// What to tell the peer tasks, in command order: (to, seq, outcome). An appended
    /// message's outcome is its tag until the sync decides.
    answers: Vec<(Arc<SpoolReply>, u64, SpoolOutcome)>,
    /// Delayed messages written unnumbered, for the schedule once durable.
    scheduled: Vec<(Waiting, Done)>,
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

    /// Answers the peer tasks: one `Control::Spooled` per lane the batch touched, its outcomes
    /// in sequence order (commands of one lane arrive in that order).
    fn answer(&mut self) {
        let mut answers = std::mem::take(&mut self.answers).into_iter().peekable();
        while let Some((to, seq, outcome)) = answers.next() {
            let mut outcomes = vec![(seq, outcome)];
            while let Some((_, seq, outcome)) = answers.next_if(|(next, ..)| Arc::ptr_eq(next, &to))
            {
                outcomes.push((seq, outcome));
            }
            let _ = to.control.send(Control::Spooled {
                lane: to.lane,
                outcomes,
            });
        }
    }
}

struct Writer {
    spool: Spool<Box<dyn Storage + Send>>,
    policy: FsyncPolicy,
    limits: Limits,
    buf: BytesMut,
    /// The spool record holding each peer's current watermark.
    watermarks: HashMap<PeerLane, u64>,
    /// The spool record holding the durable subscription registry.
    registry_tag: Option<u64>,
    /// The records of the idempotency keys persisted, oldest first: (first sighting, record).
    keys: VecDeque<(u64, u64)>,
    /// Most key records kept.
    keys_max: usize,
    /// How long a key record is kept.
    keys_age_max_ms: u64,
    room: Arc<Semaphore>,
    events: broadcast::Sender<PeerEvent>,
    metrics: Arc<Metrics>,
    /// Since when something written is not fsynced yet.
    unsynced_since: Option<Instant>,
    ack_before_fsync: bool,
    /// Where accepted delayed messages go, and refused releases go back.
    scheduler: Arc<Scheduler>,
    /// The data directory's lock; declared after `spool`, so it is released after the spool is
    /// closed, when the writer stops (see [`SpoolSetup::lock`]).
    _lock: Option<std::fs::File>,
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
                    to,
                    seq,
                    message,
                    done,
                    release,
                } => {
                    let done = done.map_or(Done::Nobody, Done::Send);
                    self.append(&mut batch, to, seq, message, done, release);
                }
                Command::Schedule {
                    dest,
                    message,
                    slot,
                    done,
                } => {
                    let done = done.map_or(Done::Nobody, Done::Send);
                    self.schedule(&mut batch, dest, message, slot, done);
                }
                Command::AppendRun {
                    to,
                    first,
                    messages,
                    done,
                } => {
                    let run = batch.runs.len();
                    batch.runs.push(Run {
                        done,
                        refused: Vec::new(),
                    });
                    for (message, seq) in messages.into_iter().zip(first..) {
                        self.append(
                            &mut batch,
                            Arc::clone(&to),
                            seq,
                            message,
                            Done::Run(run),
                            None,
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
                            let key = (watermark.peer, watermark.lane);
                            if let Some(old) = self.watermarks.insert(key, tag) {
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
                                lane: watermark.lane,
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
                Command::Key(key) => {
                    let at = key.at_unix_ms;
                    // A key record holds a place of the spool's room, as a message does (given
                    // back when it is retired), but never waits for one: with the spool full of
                    // messages the key stays in memory only, and a repeat is still dropped
                    // until this node restarts.
                    match self.room.try_acquire() {
                        Ok(permit) => {
                            permit.forget();
                            self.buf.clear();
                            spooled::encode_key(&key, &mut self.buf);
                            match self.spool.append(&self.buf) {
                                Ok(tag) => self.keys.push_back((at, tag)),
                                Err(e) => {
                                    self.room.add_permits(1);
                                    self.metrics.spool_error();
                                    error!(error = %e, "cannot persist an idempotency key");
                                }
                            }
                        }
                        Err(_) => {
                            warn!(
                                message = %key.id,
                                "spool full: an idempotency key is kept in memory only"
                            );
                        }
                    }
                    // Keys leave in the order they came (the window's order): by count, and
                    // by age measured against the newest key's time.
                    while let Some(&(first, tag)) = self.keys.front() {
                        if self.keys.len() <= self.keys_max
                            && at.saturating_sub(first) < self.keys_age_max_ms
                        {
                            break;
                        }
                        self.keys.pop_front();
                        if self.spool.retire(tag).is_ok() {
                            self.room.add_permits(1);
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

    /// A delayed message: written unnumbered (seq 0, no stream) with its due time.
    fn schedule(
        &mut self,
        batch: &mut Batch,
        dest: NodeId,
        message: OutgoingMessage,
        slot: tokio::sync::watch::Sender<SlotState>,
        done: Done,
    ) {
        self.buf.clear();
        let appended =
            match spooled::encode_message(&dest, 0, 0, &message, self.limits, &mut self.buf) {
                Ok(()) => self.spool.append(&self.buf).map_err(spool_refusal),
                Err(e) => Err(DeliveryError::NotAccepted(e.to_string())),
            };
        match appended {
            Ok(tag) => batch.scheduled.push((
                Waiting {
                    dest,
                    message,
                    ticket: Ticket {
                        tag,
                        slot,
                        holds_place: true,
                    },
                },
                done,
            )),
            Err(error) => {
                self.room.add_permits(1);
                self.scheduler.free_place(true);
                if matches!(error, DeliveryError::NotAccepted(_)) {
                    self.metrics.spool_error();
                }
                let _ = slot.send(SlotState::Failed(error.clone()));
                batch.tell(done, Err(error));
            }
        }
    }

    fn append(
        &mut self,
        batch: &mut Batch,
        to: Arc<SpoolReply>,
        seq: u64,
        message: OutgoingMessage,
        done: Done,
        release: Option<Ticket>,
    ) {
        self.buf.clear();
        let origin = release.as_ref().map_or(0, |ticket| ticket.tag);
        // The API checked the message against the same limits, so encoding cannot fail; if it
        // did, the send is refused like any other the spool cannot take.
        let appended = match spooled::encode_scheduled(
            &to.peer,
            to.lane,
            to.epoch,
            seq,
            origin,
            &message,
            self.limits,
            &mut self.buf,
        ) {
            Ok(()) => self.spool.append(&self.buf).map_err(spool_refusal),
            Err(e) => Err(DeliveryError::NotAccepted(e.to_string())),
        };
        match (appended, release) {
            (Ok(tag), release) => {
                if let Some(ticket) = &release {
                    // The numbered copy is appended first and the unnumbered original retired
                    // after it, in the same batch (one sync): see `restore` for why a crash
                    // between the two neither loses the message nor numbers it twice.
                    if let Err(e) = self.spool.retire(ticket.tag) {
                        warn!(tag = ticket.tag, error = %e, "cannot retire a released delayed message's unnumbered record (recovery retires it)");
                    }
                }
                batch.appended.push(Appended {
                    seq,
                    answer: batch.answers.len(),
                    done,
                    release,
                });
                batch.answers.push((to, seq, Ok(tag)));
            }
            (Err(error), Some(ticket)) => {
                // Its number is skipped (the link tells the peer); the unnumbered record keeps
                // its spool room and the message its place in the schedule.
                let dest = to.peer;
                batch.answers.push((to, seq, Err(error.clone())));
                let waiting = Waiting {
                    dest,
                    message,
                    ticket,
                };
                if matches!(error, DeliveryError::SpoolFull(_)) {
                    debug!(%error, "release of a delayed message refused for room; retried");
                    self.scheduler.refused_for_room(waiting);
                } else {
                    self.metrics.spool_error();
                    error!(%error, "cannot release a delayed message: it stays in the spool and is scheduled again after a restart");
                    self.scheduler.free_place(waiting.ticket.holds_place);
                    let _ = waiting.ticket.slot.send(SlotState::Failed(error));
                }
            }
            (Err(error), None) => {
                self.room.add_permits(1);
                if matches!(error, DeliveryError::NotAccepted(_)) {
                    self.metrics.spool_error();
                }
                debug!(%error, "send refused by the spool");
                batch.answers.push((to, seq, Err(error.clone())));
                batch.tell(done, Err(error));
            }
        }
    }

    /// Makes the batch durable and completes it; on failure fails its sends.
    fn commit(&mut self, batch: &mut Batch) {
        let retire_only = batch.appended.is_empty()
            && batch.scheduled.is_empty()
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
                    batch.answers[appended.answer].2 = Err(error.clone());
                    if let Some(ticket) = appended.release {
                        // Stays in the spool (unnumbered): scheduled again after a restart.
                        self.scheduler.free_place(ticket.holds_place);
                        let _ = ticket.slot.send(SlotState::Failed(error.clone()));
                    }
                    batch.tell(appended.done, Err(error));
                }
                for (waiting, done) in std::mem::take(&mut batch.scheduled) {
                    self.room.add_permits(1);
                    self.scheduler.free_place(waiting.ticket.holds_place);
                    let error = DeliveryError::NotAccepted(e.to_string());
                    let _ = waiting.ticket.slot.send(SlotState::Failed(error.clone()));
                    batch.tell(done, Err(error));
                }
                batch.finish_runs();
                batch.answer();
                // Not durable, and never will be: the failure poisoned the spool.
                for done in batch.registries.drain(..) {
                    let _ = done.send(Err(e.to_string()));
                }
                for (watermark, reply) in batch.watermarks.drain(..) {
                    let _ = reply.send(Control::WatermarkFailed {
                        lane: watermark.lane,
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
        // A release replaces a record already counted when its message was scheduled.
        let releases = batch
            .appended
            .iter()
            .filter(|a| a.release.is_some())
            .count();
        self.metrics
            .accepted((batch.appended.len() - releases + batch.scheduled.len()) as u64);
        for (waiting, done) in std::mem::take(&mut batch.scheduled) {
            let _ = waiting
                .ticket
                .slot
                .send(SlotState::Waiting { accepted: true });
            self.scheduler.insert(waiting);
            batch.tell(done, Ok(()));
        }
        for appended in std::mem::take(&mut batch.appended) {
            let Appended {
                seq,
                answer: _,
                done,
                release,
            } = appended;
            batch.tell(done, Ok(()));
            if let Some(ticket) = release {
                self.metrics.released();
                self.scheduler.free_place(ticket.holds_place);
                let _ = ticket.slot.send(SlotState::Numbered(seq));
            }
        }
        batch.finish_runs();
        batch.answer();
        for done in batch.registries.drain(..) {
            let _ = done.send(Ok(()));
        }
        for (watermark, reply) in batch.watermarks.drain(..) {
            self.metrics.watermark_persisted();
            let _ = reply.send(Control::WatermarkDurable {
                lane: watermark.lane,
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

/// A spool error as the refusal of a send.
fn spool_refusal(e: SpoolError) -> DeliveryError {
    match e {
        SpoolError::Full { .. } => DeliveryError::SpoolFull(e.to_string()),
        _ => DeliveryError::NotAccepted(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::Priority;
    use weft_spool::{CrashMode, SimStorage};

    fn delayed(due: u64) -> OutgoingMessage {
        OutgoingMessage::command("jobs", Bytes::from_static(b"later"), 1_000)
            .with_deliver_after(due)
    }

    fn encode(dest: &NodeId, epoch: u64, seq: u64, origin: u64, m: &OutgoingMessage) -> BytesMut {
        let mut buf = BytesMut::new();
        let lane = if seq == 0 {
            Lane::Normal
        } else {
            m.priority.lane()
        };
        spooled::encode_scheduled(
            dest,
            lane,
            epoch,
            seq,
            origin,
            m,
            Limits::default(),
            &mut buf,
        )
        .unwrap();
        buf
    }

    fn reopen(disk: &SimStorage) -> (Spool<SimStorage>, Recovered) {
        let (mut spool, recovery) = Spool::open(disk.clone(), SpoolConfig::default()).unwrap();
        let recovered =
            restore(&mut spool, recovery.pending, Limits::default(), 99, false).unwrap();
        (spool, recovered)
    }

    /// Each lane's records restore into that lane's stream: numbered messages keep the lane
    /// they were numbered in (whatever their priority says), an unnumbered one (a replayed dead
    /// letter) joins the stream of its priority's lane, and watermarks are kept per lane.
    #[test]
    fn records_restore_into_their_own_lanes() {
        let dest = NodeId::from_bytes([6; 32]);
        let disk = SimStorage::new(1);
        let (mut spool, _) = Spool::open(disk.clone(), SpoolConfig::default()).unwrap();
        let message = |priority: Priority| {
            OutgoingMessage::command("jobs", Bytes::from_static(b"x"), 1_000)
                .with_priority(priority)
        };
        for seq in 1..=3 {
            spool
                .append(&encode(&dest, 7, seq, 0, &message(Priority::HIGH)))
                .unwrap();
            spool
                .append(&encode(&dest, 8, seq + 10, 0, &message(Priority::LOW)))
                .unwrap();
        }
        spool
            .append(&encode(&dest, 9, 4, 0, &message(Priority::NORMAL)))
            .unwrap();
        // Unnumbered, high: joins the high lane's stream after its numbered messages.
        spool
            .append(&encode(&dest, 0, 0, 0, &message(Priority::HIGH)))
            .unwrap();
        let mut buf = BytesMut::new();
        for (lane, up_to) in [(Lane::Normal, 5), (Lane::High, 6), (Lane::Bulk, 7)] {
            buf.clear();
            spooled::encode_watermark(
                &Watermark {
                    peer: dest,
                    epoch: 3,
                    up_to,
                    lane,
                },
                &mut buf,
            );
            spool.append(&buf).unwrap();
        }
        spool.sync().unwrap();
        drop(spool);
        let (_, (restored, watermarks, pending, _, _)) = reopen(&disk);
        assert_eq!(pending, 8);
        let seqs = |lane: Lane| {
            let stream = &restored.outbound[&(dest, lane)];
            let seqs: Vec<u64> = stream.messages.iter().map(|m| m.seq).collect();
            (stream.epoch, seqs)
        };
        assert_eq!(seqs(Lane::High), (7, vec![1, 2, 3, 4]));
        assert_eq!(seqs(Lane::Bulk), (8, vec![11, 12, 13]));
        assert_eq!(seqs(Lane::Normal), (9, vec![4]));
        for (lane, up_to) in [(Lane::Normal, 5), (Lane::High, 6), (Lane::Bulk, 7)] {
            assert_eq!(restored.inbound[&(dest, lane)], (3, up_to), "{lane}");
        }
        assert_eq!(watermarks.len(), 3);
        // The renumbered replay was written into the high lane: the next start finds it there.
        let (_, (restored, _, _, _, _)) = reopen(&disk);
        let high = &restored.outbound[&(dest, Lane::High)];
        assert_eq!(
            high.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    /// The crash window of a release: the numbered copy is durable, the retirement of the
    /// unnumbered original is not. Recovery must send the copy (same id) and drop the original,
    /// not schedule it again (it would be numbered a second time: a duplicate under a new id).
    #[test]
    fn a_release_interrupted_before_the_retirement_is_sent_once_under_its_number() {
        let dest = NodeId::from_bytes([5; 32]);
        let disk = SimStorage::new(1);
        let (mut spool, _) = Spool::open(disk.clone(), SpoolConfig::default()).unwrap();
        let original = spool
            .append(&encode(&dest, 0, 0, 0, &delayed(5_000)))
            .unwrap();
        spool.sync().unwrap();
        // Released: the numbered copy (seq 1 of epoch 7) names its origin; crash before the
        // retirement of the original is written.
        spool
            .append(&encode(&dest, 7, 1, original, &delayed(5_000)))
            .unwrap();
        spool.sync().unwrap();
        drop(spool);
        disk.crash(CrashMode::TornTail);
        let (mut spool, (restored, _, pending, _, _)) = reopen(&disk);
        assert!(restored.scheduled.is_empty(), "not scheduled again");
        let stream = &restored.outbound[&(dest, Lane::Normal)];
        assert_eq!(stream.epoch, 7);
        assert_eq!(
            stream.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [1]
        );
        assert_eq!(pending, 1);
        // The original was retired by recovery: the next start finds the copy only.
        spool.sync().unwrap();
        drop(spool);
        let (_, (restored, _, pending, _, _)) = reopen(&disk);
        assert!(restored.scheduled.is_empty());
        assert_eq!(pending, 1);
    }

    /// A replayed dead letter (unnumbered, no due time) is numbered at recovery by a copy that
    /// names it; a crash before the original's retirement leaves both. The next recovery sends
    /// the copy under its number and drops the original, instead of numbering it again (the
    /// receiver would get it under two ids).
    #[test]
    fn a_replayed_dead_letter_renumbered_before_a_crash_is_sent_once() {
        let dest = NodeId::from_bytes([7; 32]);
        let replayed = OutgoingMessage::command("jobs", Bytes::from_static(b"again"), 1_000);
        let disk = SimStorage::new(3);
        let (mut spool, _) = Spool::open(disk.clone(), SpoolConfig::default()).unwrap();
        let original = spool.append(&encode(&dest, 0, 0, 0, &replayed)).unwrap();
        spool.sync().unwrap();
        drop(spool);
        // The first recovery numbers it: a copy naming the original.
        let (spool, (restored, _, pending, _, _)) = reopen(&disk);
        assert_eq!(pending, 1);
        let first = &restored.outbound[&(dest, Lane::Normal)];
        let seq = first.messages[0].seq;
        let copy = first.messages[0].tag;
        assert_ne!(copy, original);
        drop(spool);
        // The same state as a crash between the copy and the original's retirement: both live.
        let (spool, recovery) = Spool::open(disk.clone(), SpoolConfig::default()).unwrap();
        let record = recovery
            .pending
            .iter()
            .find(|r| r.seq == copy)
            .expect("the copy is pending");
        let payload = Bytes::from(record.payload.to_vec());
        let SpoolEntry::Message(entry) = spooled::decode(payload, Limits::default()).unwrap()
        else {
            panic!("the copy is a message");
        };
        assert_eq!(
            (entry.seq, entry.origin),
            (seq, original),
            "the copy names its origin"
        );
        drop(spool);
        let disk2 = SimStorage::new(4);
        let (mut both, _) = Spool::open(disk2.clone(), SpoolConfig::default()).unwrap();
        let original = both.append(&encode(&dest, 0, 0, 0, &replayed)).unwrap();
        both.append(&encode(&dest, first.epoch, seq, original, &replayed))
            .unwrap();
        both.sync().unwrap();
        drop(both);
        disk2.crash(CrashMode::TornTail);
        let (_, (restored, _, pending, _, _)) = reopen(&disk2);
        let stream = &restored.outbound[&(dest, Lane::Normal)];
        assert_eq!(
            stream.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [seq],
            "sent once, under the copy's number"
        );
        assert_eq!(pending, 1);
    }

    /// Before its release a delayed message comes back as waiting, with its due time, in send
    /// order; a crash before the numbered copy was durable leaves exactly that state.
    #[test]
    fn an_unreleased_delayed_message_is_scheduled_again() {
        let dest = NodeId::from_bytes([6; 32]);
        let disk = SimStorage::new(2);
        let (mut spool, _) = Spool::open(disk.clone(), SpoolConfig::default()).unwrap();
        let first = spool
            .append(&encode(&dest, 0, 0, 0, &delayed(9_000)))
            .unwrap();
        let second = spool
            .append(&encode(&dest, 0, 0, 0, &delayed(8_000)))
            .unwrap();
        spool.sync().unwrap();
        // A release of `first` whose batch never reached the disk.
        spool
            .append(&encode(&dest, 7, 1, first, &delayed(9_000)))
            .unwrap();
        spool.retire(first).unwrap();
        drop(spool);
        disk.crash(CrashMode::TornTail);
        let (_, (restored, _, pending, _, _)) = reopen(&disk);
        assert!(restored.outbound.is_empty());
        assert_eq!(pending, 2);
        let waiting: Vec<_> = restored
            .scheduled
            .iter()
            .map(|(d, tag, m)| (*d, *tag, m.deliver_after_unix_ms()))
            .collect();
        assert_eq!(
            waiting,
            [(dest, first, Some(9_000)), (dest, second, Some(8_000))]
        );
    }
}
