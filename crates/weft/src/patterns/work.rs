//! Competing consumers (PUSH/PULL): a named work queue, each message to exactly one worker.
//!
//! A worker pulls from queue `q` by receiving on the channel `$weft/queue/q` and announcing the
//! queue with a *credit*: the most messages of the queue one producer may have sent it without
//! an acknowledgement. Acknowledgements come when the worker's application takes the next
//! message (the link's settle-then-ack), so a slow worker holds at most its credit per producer
//! and is never flooded. A producer sends each message to the connected worker with the most
//! free credit (round robin among equals) and waits while every worker's credit is used up.
//!
//! A worker that goes silent (its connection down for `PatternConfig::work_reassign_after`)
//! gets its unacknowledged messages taken back from its link ([`weft_proto::Link::withdraw`];
//! the worker is told to skip them if it returns) and pushed to the other workers, so a worker
//! that dies does not take its work with it. Each reassigned copy carries the header
//! [`REDELIVERY_HEADER`] naming the original's id. Exactly one worker handles a message while
//! workers stay connected, and across a clean leave (a stopping node acknowledges what its
//! application settled before it closes its connections); a message reassigned from a worker
//! that had taken it but whose acknowledgement was lost (a crash, a cut) is handled twice
//! (at-least-once across a worker's loss; the header lets the application recognise the pair).
//!
//! A worker that stays connected but stops taking messages (its application hangs) would keep
//! what it was given for good. A producer therefore watches each worker that holds its work:
//! one that acknowledged nothing for `PatternConfig::work_ack_timeout` while connected is
//! *stuck*. It gets no new work, and copies of the unkeyed items it holds behind the oldest
//! (which its application may be working on: a long job is not handed out twice) go to the
//! other workers, with the header [`REDELIVERY_HEADER`] naming the original's id; its first
//! acknowledgement ends that. The originals stay in its link — a link never takes back what it
//! transmitted on a live connection — so a worker that recovers and takes them handles them a
//! second time (at-least-once, as for a lost worker; the header lets an application recognise
//! the pair). Keyed items stay with their stuck owner, and so do their keys: per-key order
//! holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::select_all;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};
use weft_proto::{Kind, Message, NodeId, OutgoingMessage, Priority, Topic, TopicError};

use super::SubscribeError;
use crate::error::SendError;
use crate::handle::Control;
use crate::inbox::Inbox;
use crate::node::Shared;

/// Channel prefix of work queues.
pub(crate) const WORK_PREFIX: &str = weft_proto::channel::mesh::WORK_PREFIX;

/// Header of an item copied from a stuck worker: the original's message id, as
/// `PRODUCER/STREAM/SEQ` (the whole node id, the stream id in hex, the sequence number).
pub const REDELIVERY_HEADER: &str = "weft-redelivery-of";

/// The value of [`REDELIVERY_HEADER`] naming `id`.
pub fn redelivery_of(id: &weft_proto::MessageId) -> String {
    format!("{}/{}/{}", id.producer, id.stream, id.seq)
}

/// `message` marked as a redelivery of `original`, unless it already names an earlier original
/// (a copy of a copy names the first).
fn marked_redelivery(
    message: OutgoingMessage,
    original: &weft_proto::MessageId,
) -> OutgoingMessage {
    let marked = message
        .options
        .as_ref()
        .is_some_and(|o| o.headers.iter().any(|(k, _)| k == REDELIVERY_HEADER));
    if marked {
        message
    } else {
        message.with_header(REDELIVERY_HEADER, redelivery_of(original))
    }
}

/// What a producer knows of stuck workers (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Stuck {
    /// Per worker holding unacknowledged work: its acknowledged watermark and when that last
    /// moved (or the worker last reconnected), in Unix ms.
    progress: BTreeMap<NodeId, (u64, u64)>,
    /// Workers stuck now: chosen for no new work.
    workers: BTreeSet<NodeId>,
    /// Per (queue, worker): sequence numbers whose copies went (or are going) to other
    /// workers, or that stay (keyed); pruned as the worker acknowledges.
    copied: BTreeMap<(String, NodeId), BTreeSet<u64>>,
}

/// Why a push failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkError {
    /// Not a valid queue name.
    #[error(transparent)]
    Queue(#[from] TopicError),
    /// The message cannot be sent (too large, node closed, spool failure).
    #[error(transparent)]
    Send(#[from] SendError),
}

/// Options of a worker.
#[derive(Clone, Copy, Debug)]
pub struct PullOptions {
    /// Most messages one producer may have sent this worker unacknowledged (default: the
    /// node's `PatternConfig::pull_credit`).
    pub credit: Option<u32>,
}

/// One worker's end of a work queue. Take messages with [`Puller::recv`]: each is acknowledged
/// when the next is asked for (or on [`Puller::settle`]), which returns its credit to the
/// producer. Dropping it stops pulling.
pub struct Puller {
    pub(crate) shared: Arc<Shared>,
    pub(crate) queue: Topic,
    pub(crate) inbox: Inbox,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Puller {
    /// The queue.
    pub fn queue(&self) -> &str {
        self.queue.as_str()
    }

    /// The next message (`header.channel` is the queue name); settles the one before. `None`
    /// once the node shut down (and the queue is empty).
    pub async fn recv(&mut self) -> Option<Message> {
        let mut message = self.inbox.recv().await?;
        message.header.channel = self.queue.as_str().into();
        Some(message)
    }

    /// A message if one is waiting; settles the one before.
    pub fn try_recv(&mut self) -> Option<Message> {
        let mut message = self.inbox.try_recv()?;
        message.header.channel = self.queue.as_str().into();
        Some(message)
    }

    /// Settles the messages taken so far (done with them) without asking for more.
    pub fn settle(&mut self) {
        self.inbox.settle();
    }
}

impl Drop for Puller {
    fn drop(&mut self) {
        let patterns = &self.shared.patterns;
        if patterns.lock().table.unpull(&self.queue) {
            let _ = patterns.announce.send(());
        }
    }
}

pub(crate) async fn pull(
    shared: &Arc<Shared>,
    queue: &str,
    options: PullOptions,
) -> Result<Puller, SubscribeError> {
    if shared.is_shutting_down() {
        return Err(SubscribeError::NodeClosed);
    }
    let queue = Topic::new(queue)?;
    let credit = options
        .credit
        .unwrap_or(shared.config.patterns.pull_credit)
        .max(1);
    let inbox = shared
        .channels
        .take_receiver(&format!("{WORK_PREFIX}{queue}"))
        .map_err(|e| match e {
            crate::error::ReceiveError::NodeClosed => SubscribeError::NodeClosed,
            _ => SubscribeError::AlreadyServed(queue.as_str().to_owned()),
        })?;
    let version = {
        let mut state = shared.patterns.lock();
        match state.table.pull(&queue, credit) {
            Ok(Some(version)) => version,
            Ok(None) => return Err(SubscribeError::AlreadyServed(queue.as_str().to_owned())),
            Err(e) => return Err(SubscribeError::TooMany(e.to_string())),
        }
    };
    let puller = Puller {
        shared: Arc::clone(shared),
        queue,
        inbox,
    };
    match shared.patterns.announce_and_confirm(shared, version).await {
        Ok(()) => Ok(puller),
        Err(waiting) => Err(SubscribeError::NotConfirmed(waiting)),
    }
}

/// The worker with the most free credit for `queue`, pruning what each acknowledged. With a
/// shard `key`: its owner among the connected workers (rendezvous hashing), and only once the
/// key's previous owner acknowledged everything sent to it for the key (per-key order across a
/// rebalance). `reassigning`: this is a withdrawn message being pushed again, which may pass the
/// key's reassignment barrier. Returns the choice (or `None`: wait) and the workers to watch.
fn choose(
    shared: &Shared,
    queue: &Topic,
    key: Option<&[u8]>,
    reassigning: bool,
) -> (Option<NodeId>, Vec<NodeId>) {
    let mut state = shared.patterns.lock();
    let mut workers = state.table.workers(queue);
    // A stuck worker gets no new work (its keys wait for it: see `redeliver_stuck`).
    workers.retain(|(w, _)| !state.stuck.workers.contains(w));
    let peers = shared.peers.read().expect("peers lock poisoned");
    let acked_of = |worker: &NodeId| peers.get(worker).map_or(0, |h| *h.progress.acked.borrow());
    let free_credit = |state: &mut super::State, worker: NodeId, credit: u32| {
        let acked = acked_of(&worker);
        let outstanding = state
            .outstanding
            .entry((queue.as_str().to_owned(), worker))
            .or_default();
        while outstanding.front().is_some_and(|seq| *seq <= acked) {
            outstanding.pop_front();
        }
        credit.saturating_sub(outstanding.len() as u32)
    };
    let mut watch: Vec<NodeId> = workers.iter().map(|(w, _)| *w).collect();
    let chosen = match key {
        Some(key) => {
            let owner = weft_proto::shard::owner(key, workers.iter().map(|(w, _)| w));
            let digest = (
                queue.as_str().to_owned(),
                weft_proto::shard::key_digest(key),
            );
            let previous = state.keys.get(&digest).copied();
            if let Some(previous) = previous {
                watch.push(previous.owner);
            }
            let moved_unsettled =
                |p: &KeyState| Some(p.owner) != owner && acked_of(&p.owner) < p.last_seq;
            let barrier = previous.is_some_and(|p| {
                if reassigning {
                    // The silent owner's messages are being taken back: only a live owner that
                    // got some of them already must settle them first.
                    workers.iter().any(|(w, _)| *w == p.owner) && moved_unsettled(&p)
                } else {
                    p.reassigning || moved_unsettled(&p)
                }
            });
            let full = previous.is_none() && state.keys.len() >= KEYS_MAX && {
                // Forget keys whose messages were all acknowledged, then look again.
                state
                    .keys
                    .retain(|_, k| k.reassigning || acked_of(&k.owner) < k.last_seq);
                state.keys.len() >= KEYS_MAX
            };
            match owner {
                Some(owner) if !barrier && !full => {
                    let credit = workers
                        .iter()
                        .find(|(w, _)| *w == owner)
                        .map_or(0, |(_, c)| *c);
                    // A withdrawn message pushed again was within its credit before: it does
                    // not wait for credit (its old worker's link is held until it is durable
                    // again, so waiting for acknowledgements there could wait forever).
                    (free_credit(&mut state, owner, credit) > 0 || reassigning).then_some(owner)
                }
                _ => None,
            }
        }
        None => {
            let mut best: Option<(NodeId, u32)> = None;
            let start = state.next_server;
            for i in 0..workers.len() {
                let (worker, credit) = workers[(start + i) % workers.len()];
                let free = free_credit(&mut state, worker, credit);
                if free > 0 && best.is_none_or(|(_, f)| free > f) {
                    best = Some((worker, free));
                }
            }
            state.next_server = state.next_server.wrapping_add(1);
            best.map(|(w, _)| w).or_else(|| {
                // A withdrawn message pushed again does not wait for credit (see above).
                reassigning
                    .then(|| workers.get(start % workers.len().max(1)).map(|(w, _)| *w))
                    .flatten()
            })
        }
    };
    (chosen, watch)
}

/// Most shard keys a producer tracks per node (their owner and last message): past it, keys
/// whose messages were all acknowledged are forgotten, and a new key waits until one can be.
pub(crate) const KEYS_MAX: usize = 65_536;

/// What a producer remembers of a shard key.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyState {
    /// The worker its last message went to.
    owner: NodeId,
    /// That message's sequence number on the link to `owner`.
    last_seq: u64,
    /// Its messages are being taken back from a silent owner and pushed again: new messages
    /// for the key wait until that is done.
    reassigning: bool,
}

/// Rebuilds what the producer knows of its work in flight from the spool at start: which items
/// each worker holds unacknowledged (its credit used) and, per shard key, where the key's last
/// message went — so a key moves to a new owner only after its old owner acknowledged what the
/// previous run sent it (else a restart would break per-key order). Runs before the peer tasks
/// take their restored streams.
pub(crate) fn restore(shared: &Shared) {
    let restored = shared.restored.lock().expect("restored lock poisoned");
    let mut state = shared.patterns.lock();
    // Per key: (sent at, worker, seq) of its latest pending message.
    let mut latest: BTreeMap<(String, [u8; 32]), (u64, NodeId, u64)> = BTreeMap::new();
    let mut items = 0usize;
    for (&(worker, lane), stream) in &restored.outbound {
        if lane != weft_proto::Lane::Normal {
            continue; // the patterns' messages travel in the normal lane
        }
        for outgoing in &stream.messages {
            let Some(queue) = outgoing.message.channel.strip_prefix(WORK_PREFIX) else {
                continue;
            };
            items += 1;
            state
                .outstanding
                .entry((queue.to_owned(), worker))
                .or_default()
                .push_back(outgoing.seq);
            if let Some(key) = outgoing
                .message
                .options
                .as_ref()
                .and_then(|o| o.shard_key.as_ref())
            {
                let digest = (queue.to_owned(), weft_proto::shard::key_digest(key));
                let sent = (outgoing.message.created_unix_ms, worker, outgoing.seq);
                let entry = latest.entry(digest).or_insert(sent);
                if (sent.0, sent.2) > (entry.0, entry.2) {
                    *entry = sent;
                }
            }
        }
    }
    for outstanding in state.outstanding.values_mut() {
        outstanding.make_contiguous().sort_unstable();
    }
    for (digest, (_, owner, last_seq)) in latest {
        state.keys.insert(
            digest,
            KeyState {
                owner,
                last_seq,
                reassigning: false,
            },
        );
    }
    if items > 0 {
        debug!(items, "work in flight restored from the spool");
    }
}

/// Sends `message` (already on the queue's channel) to a worker with credit, waiting for one.
async fn push_message(
    shared: &Arc<Shared>,
    queue: &Topic,
    message: OutgoingMessage,
    reassigning: bool,
) -> Result<NodeId, WorkError> {
    let key = message.options.as_ref().and_then(|o| o.shard_key.clone());
    let mut changed = shared.patterns.changed.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if shared.is_shutting_down() {
            return Err(SendError::NodeClosed.into());
        }
        let (chosen, workers) = choose(shared, queue, key.as_deref(), reassigning);
        if let Some(worker) = chosen {
            let receipt = shared.sender(worker)?.send_message(message).await?;
            let seq = receipt.id().seq;
            let mut state = shared.patterns.lock();
            state
                .outstanding
                .entry((queue.as_str().to_owned(), worker))
                .or_default()
                .push_back(seq);
            if let Some(key) = &key {
                let digest = (
                    queue.as_str().to_owned(),
                    weft_proto::shard::key_digest(key),
                );
                let reassigning =
                    reassigning && state.keys.get(&digest).is_some_and(|k| k.reassigning);
                state.keys.insert(
                    digest,
                    KeyState {
                        owner: worker,
                        last_seq: seq,
                        reassigning,
                    },
                );
            }
            return Ok(worker);
        }
        // Wait for an acknowledgement from a worker, or for workers to come or go. A clone of
        // a handle's receiver (never marked seen) takes every ack so far for a change: mark the
        // clones seen, else `changed` returns at once and this loop spins while every credit is
        // used up. Then look again, so an ack that came since `choose` looked is not missed.
        let mut acks: Vec<_> = workers
            .iter()
            .filter_map(|w| {
                shared
                    .peers
                    .read()
                    .ok()?
                    .get(w)
                    .map(|h| h.progress.acked.clone())
            })
            .collect();
        for rx in &mut acks {
            rx.borrow_and_update();
        }
        if choose(shared, queue, key.as_deref(), reassigning)
            .0
            .is_some()
        {
            continue;
        }
        let acked = async {
            if acks.is_empty() {
                std::future::pending::<()>().await;
            }
            let _ = select_all(acks.iter_mut().map(|rx| Box::pin(rx.changed()))).await;
        };
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return Err(SendError::NodeClosed.into()),
            _ = acked => {}
            result = changed.changed() => {
                if result.is_err() {
                    return Err(SendError::NodeClosed.into());
                }
            }
        }
    }
}

pub(crate) async fn push(
    shared: &Arc<Shared>,
    queue: &str,
    key: Option<Bytes>,
    payload: Bytes,
    options: Option<&crate::MessageOptions>,
) -> Result<(), WorkError> {
    let queue = Topic::new(queue)?;
    let now = shared.now_unix_ms();
    let mut message = OutgoingMessage::command(format!("{WORK_PREFIX}{queue}"), payload, now)
        .with_kind(Kind::Command);
    if let Some(options) = options {
        options.check().map_err(SendError::from)?;
        options
            .refuse_delay("work queues")
            .map_err(SendError::from)?;
        if options.priority_or(Priority::NORMAL).lane() != weft_proto::Lane::Normal {
            return Err(SendError::from(crate::OptionsError::Unsupported {
                option: "a priority other than normal",
                pattern: "work queues",
                why: "work items travel in the normal lane, where each worker's credit is counted",
            })
            .into());
        }
        message = options.apply(message, now);
    }
    if let Some(key) = key {
        message = message.with_shard_key(key);
    }
    message
        .check(&shared.config.limits())
        .map_err(SendError::from)?;
    push_message(shared, &queue, message, false).await?;
    Ok(())
}

/// Takes back the unacknowledged work of workers silent for longer than the reassignment delay
/// and pushes it to the others (called from the control task's tick).
pub(crate) fn reassign_silent(shared: &Arc<Shared>) {
    let delay = shared.config.patterns.work_reassign_after.as_millis() as u64;
    let since = shared.now_unix_ms().saturating_sub(delay);
    let silent = {
        let mut state = shared.patterns.lock();
        // Every worker we sent unacknowledged work to, whether or not it still announces the
        // queue (a worker that stopped pulling just before it died still holds its items).
        let mut with_work: Vec<NodeId> = state
            .outstanding
            .iter()
            .filter(|(_, seqs)| !seqs.is_empty())
            .map(|((_, worker), _)| *worker)
            .filter(|w| {
                // A worker not connected since this node started (it restarted with work for a
                // worker that has not come back, or left for good) counts as down since then.
                let down = state.table.down_since(w).or_else(|| {
                    let peers = shared.peers.read().expect("peers lock poisoned");
                    let connected = peers.get(w).is_some_and(|h| *h.connected.borrow());
                    (!connected).then_some(shared.incarnation)
                });
                down.is_some_and(|down| down <= since)
            })
            .collect();
        with_work.sort();
        with_work.dedup();
        // Cleared now, so the next tick does not take the same work back twice (what the
        // withdrawal does not take, being in flight, is put back when it returns).
        let mut taken: BTreeMap<NodeId, Vec<(String, std::collections::VecDeque<u64>)>> =
            BTreeMap::new();
        state.outstanding.retain(|(queue, worker), seqs| {
            if with_work.contains(worker) {
                taken
                    .entry(*worker)
                    .or_default()
                    .push((queue.clone(), std::mem::take(seqs)));
                false
            } else {
                true
            }
        });
        // Their keys wait until the withdrawn messages are pushed again, in order.
        with_work
            .into_iter()
            .map(|worker| {
                let mut keys = Vec::new();
                for (digest, key) in state.keys.iter_mut() {
                    if key.owner == worker {
                        key.reassigning = true;
                        keys.push(digest.clone());
                    }
                }
                let taken = taken.remove(&worker).unwrap_or_default();
                (worker, keys, taken)
            })
            .collect::<Vec<_>>()
    };
    for (worker, keys, taken) in silent {
        let release = ReleaseKeys {
            shared: Arc::clone(shared),
            keys,
        };
        let Ok(handle) = shared.peer(worker) else {
            continue;
        };
        let (reply, withdrawn) = oneshot::channel();
        let asked = handle.control.send(Control::Withdraw {
            channel_prefix: WORK_PREFIX.to_owned(),
            reply,
        });
        if asked.is_err() {
            continue;
        }
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            // Whatever happens below, the keys of this worker do not wait any longer after it.
            let _release = release;
            let withdrawn = withdrawn.await.unwrap_or_default();
            {
                // What was in flight (not withdrawn) still uses the worker's credit.
                let gone: std::collections::BTreeSet<u64> =
                    withdrawn.iter().map(|(seq, ..)| *seq).collect();
                let mut state = shared.patterns.lock();
                for (queue, seqs) in taken {
                    let kept: Vec<u64> = seqs.into_iter().filter(|s| !gone.contains(s)).collect();
                    if !kept.is_empty() {
                        let outstanding = state.outstanding.entry((queue, worker)).or_default();
                        outstanding.extend(kept);
                        outstanding.make_contiguous().sort_unstable();
                    }
                }
            }
            if withdrawn.is_empty() {
                return;
            }
            info!(
                worker = %worker.short(),
                messages = withdrawn.len(),
                "worker silent: its unacknowledged work goes to other workers"
            );
            // The worker's keys wait for what it still has in flight (below the first withdrawn
            // number, which it acknowledges as it goes), not for the withdrawn messages: it will
            // be told to skip those only once they are durable again elsewhere.
            let first = withdrawn[0].0;
            {
                let mut state = shared.patterns.lock();
                for key in state.keys.values_mut() {
                    if key.owner == worker && key.last_seq >= first {
                        key.last_seq = first - 1;
                    }
                }
            }
            let mut retired = Vec::new();
            let mut all_pushed = true;
            for (seq, tag, message) in withdrawn {
                let Some(queue) = message
                    .channel
                    .strip_prefix(WORK_PREFIX)
                    .and_then(|q| Topic::new(q).ok())
                else {
                    continue;
                };
                // The silent worker may have handled it (its acknowledgement lost with the
                // connection): the copy names the original, so the application can tell.
                let original = weft_proto::MessageId {
                    producer: shared.id,
                    stream: handle.stream,
                    seq,
                };
                let message = marked_redelivery(message, &original);
                match push_message(&shared, &queue, message, true).await {
                    Ok(to) => {
                        debug!(queue = %queue, to = %to.short(), "work reassigned");
                        if tag != 0 {
                            retired.push(tag);
                        }
                    }
                    Err(e) => {
                        warn!(queue = %queue, error = %e, "reassigned work could not be pushed; it stays in the spool");
                        all_pushed = false;
                        break;
                    }
                }
            }
            // Durable elsewhere now: the worker may be told to skip the old numbers.
            if all_pushed {
                let _ = handle.control.send(Control::SettleWithdrawal);
            }
            // The old spool records go only once their messages are durable again elsewhere.
            if let (Some(durable), false) = (&shared.durable, retired.is_empty()) {
                let _ = durable.tx.send(crate::durable::Command::Retire(retired));
            }
        });
    }
}

/// Finds workers that hold work without acknowledging any for `work_ack_timeout` while
/// connected, and pushes copies of the unkeyed items they hold to the other workers (called
/// from the control task's tick; see the module doc).
pub(crate) fn redeliver_stuck(shared: &Arc<Shared>) {
    let Some(timeout) = shared.config.patterns.work_ack_timeout else {
        return;
    };
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let now = shared.now_unix_ms();
    let mut copies = Vec::new();
    // Whether a stuck worker gets work again: pushes waiting for a worker must look again (an
    // acknowledgement woke them before this tick noticed it, and nothing else would).
    let freed = {
        let mut guard = shared.patterns.lock();
        let state = &mut *guard;
        let was_stuck = state.stuck.workers.clone();
        let peers = shared.peers.read().expect("peers lock poisoned");
        let acked_of =
            |worker: &NodeId| peers.get(worker).map_or(0, |h| *h.progress.acked.borrow());
        let mut holding = BTreeSet::new();
        for ((_, worker), seqs) in state.outstanding.iter_mut() {
            let acked = acked_of(worker);
            while seqs.front().is_some_and(|seq| *seq <= acked) {
                seqs.pop_front();
            }
            if !seqs.is_empty() {
                holding.insert(*worker);
            }
        }
        let stuck = &mut state.stuck;
        stuck.copied.retain(|(_, worker), seqs| {
            let acked = acked_of(worker);
            seqs.retain(|seq| *seq > acked);
            !seqs.is_empty()
        });
        stuck.progress.retain(|worker, _| holding.contains(worker));
        stuck.workers.retain(|worker| {
            let holds = holding.contains(worker);
            if !holds {
                info!(worker = %worker.short(), "worker acknowledged all it held: it gets work again");
            }
            holds
        });
        for worker in &holding {
            let acked = acked_of(worker);
            let connected = peers.get(worker).is_some_and(|h| *h.connected.borrow());
            let progress = stuck.progress.entry(*worker).or_insert((acked, now));
            if progress.0 != acked || !connected {
                // Moving (or away: a silent worker's work is reassigned instead).
                *progress = (acked, now);
                if stuck.workers.remove(worker) {
                    info!(worker = %worker.short(), "worker acknowledges again: it gets work again");
                }
            } else if now.saturating_sub(progress.1) >= timeout_ms && stuck.workers.insert(*worker)
            {
                warn!(
                    worker = %worker.short(),
                    timeout_ms,
                    "worker connected but acknowledging nothing: it gets no new work, and copies of its unkeyed items go to other workers"
                );
            }
        }
        for ((queue, worker), seqs) in &state.outstanding {
            if !state.stuck.workers.contains(worker) {
                continue;
            }
            let Ok(topic) = Topic::new(queue) else {
                continue;
            };
            // Copies need another worker to go to; without one they would only come back.
            let others = state
                .table
                .workers(&topic)
                .iter()
                .any(|(w, _)| w != worker && !state.stuck.workers.contains(w));
            if !others {
                continue;
            }
            let copied = state
                .stuck
                .copied
                .entry((queue.clone(), *worker))
                .or_default();
            // The oldest may be in the application's hands (taken, not yet settled: a long job):
            // it stays. The rest wait unread in the worker's queue.
            let fresh: Vec<u64> = seqs
                .iter()
                .skip(1)
                .filter(|s| copied.insert(**s))
                .copied()
                .collect();
            if !fresh.is_empty() {
                copies.push((*worker, topic, fresh));
            }
        }
        was_stuck.iter().any(|w| !state.stuck.workers.contains(w))
    };
    if freed {
        shared.patterns.bump();
    }
    for (worker, queue, seqs) in copies {
        let Ok(handle) = shared.peer(worker) else {
            continue;
        };
        let (reply, copied) = oneshot::channel();
        let mut wanted = seqs;
        wanted.sort_unstable();
        if handle
            .control
            .send(Control::CopyQueued {
                seqs: wanted.clone(),
                reply,
            })
            .is_err()
        {
            continue;
        }
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            let copied = copied.await.unwrap_or_default();
            {
                // Not found now (still on its way into the link): looked for at the next tick.
                let found: BTreeSet<u64> = copied.iter().map(|(seq, _)| *seq).collect();
                let mut state = shared.patterns.lock();
                if let Some(marked) = state
                    .stuck
                    .copied
                    .get_mut(&(queue.as_str().to_owned(), worker))
                {
                    for seq in wanted.iter().filter(|s| !found.contains(s)) {
                        marked.remove(seq);
                    }
                }
            }
            for (seq, message) in copied {
                if message
                    .options
                    .as_ref()
                    .is_some_and(|o| o.shard_key.is_some())
                {
                    continue; // stays with its owner (per-key order); stays marked
                }
                let original = weft_proto::MessageId {
                    producer: shared.id,
                    stream: handle.stream,
                    seq,
                };
                let copy = marked_redelivery(message, &original);
                match push_message(&shared, &queue, copy, false).await {
                    Ok(to) => {
                        shared
                            .metrics
                            .work_redelivered
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        debug!(queue = %queue, %original, to = %to.short(), "work copied from a stuck worker");
                    }
                    Err(e) => {
                        warn!(queue = %queue, %original, error = %e, "a stuck worker's item could not be copied; it stays with that worker");
                        return;
                    }
                }
            }
        });
    }
}

/// Ends the reassignment barrier of the keys a silent worker owned.
struct ReleaseKeys {
    shared: Arc<Shared>,
    keys: Vec<(String, [u8; 32])>,
}

impl Drop for ReleaseKeys {
    fn drop(&mut self) {
        let mut state = self.shared.patterns.lock();
        for digest in &self.keys {
            if let Some(key) = state.keys.get_mut(digest) {
                key.reassigning = false;
            }
        }
        drop(state);
        self.shared.patterns.bump();
    }
}
