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
use weft_proto::work::{KeyState, Silent};
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

    /// The next item with its body decoded (postcard) as a `T` (see
    /// [`Inbox::recv_typed`](crate::Inbox::recv_typed)); `None` as for [`Puller::recv`].
    pub async fn recv_typed<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Option<Result<crate::body::Typed<T>, crate::body::Undecodable>> {
        self.recv().await.map(crate::body::typed)
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

/// The items, one by one, as [`Puller::recv`] hands them out (each settles the one before).
impl futures_util::Stream for Puller {
    type Item = Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        let this = &mut *self;
        std::pin::Pin::new(&mut this.inbox)
            .poll_next(cx)
            .map(|message| {
                message.map(|mut message| {
                    message.header.channel = this.queue.as_str().into();
                    message
                })
            })
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

/// The worker for the next item of `queue` (see `weft_proto::work::Producer::choose`), from
/// the workers announced for it and their links' acknowledged watermarks. Returns the choice
/// (or `None`: wait) and the workers to watch.
fn choose(
    shared: &Shared,
    queue: &Topic,
    key: Option<&[u8]>,
    reassigning: bool,
) -> (Option<NodeId>, Vec<NodeId>) {
    let mut guard = shared.patterns.lock();
    let state = &mut *guard;
    let workers = state.table.workers(queue);
    let peers = shared.peers.read().expect("peers lock poisoned");
    let acked_of = |worker: &NodeId| peers.get(worker).map_or(0, |h| *h.progress.acked.borrow());
    let choice = state
        .work
        .choose(queue.as_str(), &workers, key, reassigning, acked_of);
    (choice.worker, choice.watch)
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
    let mut in_flight = Vec::new();
    for (&(worker, lane), stream) in &restored.outbound {
        if lane != weft_proto::Lane::Normal {
            continue; // the patterns' messages travel in the normal lane
        }
        for outgoing in &stream.messages {
            let Some(queue) = outgoing.message.channel.strip_prefix(WORK_PREFIX) else {
                continue;
            };
            items += 1;
            in_flight.push((queue.to_owned(), worker, outgoing.seq));
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
    let keys = latest.into_iter().map(|(digest, (_, owner, last_seq))| {
        let key = KeyState {
            owner,
            last_seq,
            reassigning: false,
        };
        (digest, key)
    });
    state.work.restore(in_flight, keys);
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
            shared.patterns.lock().work.sent(
                queue.as_str(),
                worker,
                seq,
                key.as_deref(),
                reassigning,
            );
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
        if options.priority_or(Priority::NORMAL).lane() != weft_proto::Lane::Normal {
            return Err(SendError::from(crate::OptionsError::Unsupported {
                option: "a priority other than normal",
                pattern: "work queues",
                why: "work items travel in the normal lane, where each worker's credit is counted",
            })
            .into());
        }
        if options.is_delayed() {
            let op = super::later::Later::Push { queue: &queue, key };
            super::later::schedule(shared, op, message.body, options).await?;
            return Ok(());
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
        let silent: Vec<NodeId> = state
            .work
            .workers_with_work()
            .into_iter()
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
        // Taken now, so the next tick does not take the same work back twice (what the
        // withdrawal does not take, being in flight, is put back when it returns); their keys
        // wait until the withdrawn messages are pushed again, in order.
        state.work.take_silent(&silent)
    };
    for Silent {
        worker,
        keys,
        taken,
    } in silent
    {
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
            // What was in flight (not withdrawn) still uses the worker's credit; the worker's
            // keys wait for what it still has in flight (below the first withdrawn number,
            // which it acknowledges as it goes), not for the withdrawn messages: it will be
            // told to skip those only once they are durable again elsewhere.
            let gone: BTreeSet<u64> = withdrawn.iter().map(|(seq, ..)| *seq).collect();
            shared.patterns.lock().work.put_back(worker, taken, &gone);
            if withdrawn.is_empty() {
                return;
            }
            info!(
                worker = %worker.short(),
                messages = withdrawn.len(),
                "worker silent: its unacknowledged work goes to other workers"
            );
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
    let tick = {
        let mut guard = shared.patterns.lock();
        let state = &mut *guard;
        let peers = shared.peers.read().expect("peers lock poisoned");
        let acked_of =
            |worker: &NodeId| peers.get(worker).map_or(0, |h| *h.progress.acked.borrow());
        let connected = |worker: &NodeId| peers.get(worker).is_some_and(|h| *h.connected.borrow());
        let table = &state.table;
        // Copies need another worker to go to; without one they would only come back.
        let others = |queue: &str, worker: &NodeId, stuck: &BTreeSet<NodeId>| {
            Topic::new(queue).is_ok_and(|topic| {
                table
                    .workers(&topic)
                    .iter()
                    .any(|(w, _)| w != worker && !stuck.contains(w))
            })
        };
        state
            .work
            .stuck_tick(now, timeout_ms, acked_of, connected, others)
    };
    for worker in &tick.stuck {
        warn!(
            worker = %worker.short(),
            timeout_ms,
            "worker connected but acknowledging nothing: it gets no new work, and copies of its unkeyed items go to other workers"
        );
    }
    for worker in &tick.freed {
        info!(worker = %worker.short(), "worker acknowledges again: it gets work again");
    }
    // A stuck worker gets work again: pushes waiting for a worker must look again (an
    // acknowledgement woke them before this tick noticed it, and nothing else would).
    if !tick.freed.is_empty() {
        shared.patterns.bump();
    }
    let copies = tick.copies.into_iter().filter_map(|(worker, queue, seqs)| {
        Topic::new(&queue).ok().map(|topic| (worker, topic, seqs))
    });
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
                let missing: Vec<u64> = wanted
                    .iter()
                    .filter(|s| !found.contains(s))
                    .copied()
                    .collect();
                shared
                    .patterns
                    .lock()
                    .work
                    .copies_not_found(queue.as_str(), worker, &missing);
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
        self.shared.patterns.lock().work.release_keys(&self.keys);
        self.shared.patterns.bump();
    }
}
