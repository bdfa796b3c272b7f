//! Receipts: a future per sent message that resolves when the peer acknowledged it.
//!
//! Acknowledgements are cumulative per link, so a receipt is only a sequence number and a
//! reference to its lane's [`Progress`] (the watermarks it watches): no allocation per message,
//! however many are in flight, and one reference count per receipt. The rare message
//! that fails — refused by the spool, or given up and dead-lettered — is recorded in the peer's
//! [`Fates`], which a receipt consults before believing the watermark (an acknowledgement can
//! cover a sequence number the peer was told to skip).

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::warn;
use weft_proto::{MessageId, NodeId};

use crate::error::DeliveryError;

/// Most failures remembered per peer for receipts not yet awaited; beyond it the oldest go (a
/// receipt for one of those then reports only what the watermark says).
const FATES_MAX: usize = 65_536;

/// What receipts watch of one peer's lane: the acknowledged watermark, the spool's accepted
/// watermark and the messages that failed. One per lane, shared by the lane's handle and every
/// receipt: a receipt costs one reference count, whatever it is asked later.
#[derive(Debug)]
pub(crate) struct Progress {
    /// The link's acknowledged watermark.
    pub acked: watch::Receiver<u64>,
    /// The highest seq whose fate at the spool is known (`None`: the node has no spool).
    pub accepted: Option<watch::Receiver<u64>>,
    pub fates: Fates,
}

/// Messages to one peer that will never be delivered, by sequence number, and a version that
/// moves with every change (receipts wait on it).
#[derive(Debug)]
pub(crate) struct Fates {
    failed: Mutex<BTreeMap<u64, DeliveryError>>,
    version: watch::Sender<u64>,
}

impl Default for Fates {
    fn default() -> Self {
        Self {
            failed: Mutex::new(BTreeMap::new()),
            version: watch::channel(0).0,
        }
    }
}

impl Fates {
    pub(crate) fn fail(&self, seq: u64, error: DeliveryError) {
        let mut failed = self.failed.lock().expect("fates lock poisoned");
        if failed.len() >= FATES_MAX {
            if let Some((oldest, _)) = failed.pop_first() {
                warn!(
                    seq = oldest,
                    "forgetting an old failure nobody asked about (receipt no longer exact)"
                );
            }
        }
        failed.insert(seq, error);
        drop(failed);
        self.version.send_modify(|v| *v += 1);
    }

    fn get(&self, seq: u64) -> Option<DeliveryError> {
        self.failed
            .lock()
            .expect("fates lock poisoned")
            .get(&seq)
            .cloned()
    }
}

/// Proof that a peer's application took a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The message.
    pub id: MessageId,
    /// The node that acknowledged it.
    pub peer: NodeId,
}

/// Where a delayed (scheduled) message stands, shared by the schedule (which moves it) and its
/// receipt (which waits on it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// Waiting for its due time; `accepted`: durable in the spool (always true without one).
    Waiting { accepted: bool },
    /// Due, and numbered into the peer's stream with this sequence number.
    Numbered(u64),
    /// It will never be sent (the spool refused it, or it could not be released).
    Failed(DeliveryError),
}

/// A fresh slot for a scheduled message: the schedule keeps the sender, the receipt the receiver.
pub(crate) fn slot(accepted: bool) -> (watch::Sender<SlotState>, watch::Receiver<SlotState>) {
    watch::channel(SlotState::Waiting { accepted })
}

/// Resolves once the peer acknowledged the message (`.await` it), or fails if the message was
/// given up (dead-lettered), refused by the spool, or the node shut down first. Dropping a receipt
/// does not cancel the send.
///
/// A **delayed** message (see [`OutgoingMessage::with_delay`](weft_proto::OutgoingMessage::with_delay))
/// gets its sequence number, hence its [`MessageId`], only when it becomes due: until then
/// [`Receipt::try_id`] is `None`, [`Receipt::due_unix_ms`] tells when, and
/// [`Receipt::numbered`] waits for the id. Awaiting the receipt waits for the due time, then for
/// the acknowledgement, as for any message.
#[derive(Debug)]
#[must_use = "a receipt tells whether the peer got the message; drop it explicitly if you do not care"]
pub struct Receipt {
    /// For a scheduled message not yet numbered, `seq` is 0 (outside every stream).
    pub(crate) id: MessageId,
    pub(crate) peer: NodeId,
    pub(crate) progress: Arc<Progress>,
    /// For a delayed message: its due time and its slot.
    pub(crate) scheduled: Option<(u64, watch::Receiver<SlotState>)>,
}

impl Receipt {
    /// The message's id. For a delayed message not yet due the id is not known yet, and this is
    /// a placeholder with `seq` 0 (no message has that number): prefer [`Receipt::try_id`] or
    /// [`Receipt::numbered`] for delayed messages.
    pub fn id(&self) -> MessageId {
        self.try_id().unwrap_or(self.id)
    }

    /// The message's id, `None` while a delayed message waits for its due time.
    pub fn try_id(&self) -> Option<MessageId> {
        match &self.scheduled {
            None => Some(self.id),
            Some((_, slot)) => match &*slot.borrow() {
                SlotState::Numbered(seq) => Some(MessageId {
                    seq: *seq,
                    ..self.id
                }),
                _ => None,
            },
        }
    }

    /// For a delayed message, when it is due (Unix milliseconds, the sender's clock).
    pub fn due_unix_ms(&self) -> Option<u64> {
        self.scheduled.as_ref().map(|(due, _)| *due)
    }

    /// The message's id, once it has one: at once for an ordinary message; for a delayed one,
    /// once it is due and numbered (or the error that means it never will be).
    pub async fn numbered(&self) -> Result<MessageId, DeliveryError> {
        let Some((_, slot)) = &self.scheduled else {
            return Ok(self.id);
        };
        let mut slot = slot.clone();
        let state = slot
            .wait_for(|s| !matches!(s, SlotState::Waiting { .. }))
            .await
            .map(|s| s.clone());
        match state {
            Ok(SlotState::Numbered(seq)) => Ok(MessageId { seq, ..self.id }),
            Ok(SlotState::Failed(error)) => Err(error),
            Ok(SlotState::Waiting { .. }) | Err(_) => Err(DeliveryError::NodeClosed),
        }
    }

    /// The node the message was sent to.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Whether the peer has acknowledged it already.
    pub fn is_delivered(&self) -> bool {
        let Some(id) = self.try_id() else {
            return false;
        };
        *self.progress.acked.borrow() >= id.seq && self.progress.fates.get(id.seq).is_none()
    }

    /// Waits until the message is durable in the spool ("accepted"): at once for a node without
    /// a spool, and for receipts of `send` (which returns only then); `try_send` returns before.
    /// For a delayed message: once its unnumbered record is durable (it is numbered later).
    pub async fn accepted(&self) -> Result<(), DeliveryError> {
        if let Some((_, slot)) = &self.scheduled {
            let mut slot = slot.clone();
            let state = slot
                .wait_for(|s| *s != SlotState::Waiting { accepted: false })
                .await
                .map(|s| s.clone());
            return match state {
                Ok(SlotState::Failed(error)) => Err(error),
                Ok(_) => Ok(()),
                Err(_) => Err(DeliveryError::NodeClosed),
            };
        }
        let Some(accepted) = &self.progress.accepted else {
            return Ok(());
        };
        let seq = self.id.seq;
        let mut accepted = accepted.clone();
        let waited = accepted.wait_for(|a| *a >= seq).await.is_ok();
        match self.progress.fates.get(seq) {
            Some(error) => Err(error),
            None if waited => Ok(()),
            None => Err(DeliveryError::NodeClosed),
        }
    }
}

impl IntoFuture for Receipt {
    type Output = Result<Delivered, DeliveryError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            if self.scheduled.is_some() {
                self.id = self.numbered().await?;
            }
            let seq = self.id.seq;
            let delivered = Delivered {
                id: self.id,
                peer: self.peer,
            };
            let fates = &self.progress.fates;
            let mut version = fates.version.subscribe();
            let mut acked = self.progress.acked.clone();
            loop {
                if let Some(error) = fates.get(seq) {
                    return Err(error);
                }
                if *acked.borrow_and_update() >= seq {
                    return Ok(delivered);
                }
                tokio::select! {
                    changed = acked.changed() => {
                        if changed.is_err() {
                            let acked = *acked.borrow() >= seq;
                            return match fates.get(seq) {
                                Some(error) => Err(error),
                                None if acked => Ok(delivered),
                                None => Err(DeliveryError::NodeClosed),
                            };
                        }
                    }
                    _ = version.changed() => {}
                }
            }
        })
    }
}

impl Fates {
    /// The failures among `seqs`, in sequence order.
    fn failed_in(&self, seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, DeliveryError)> {
        self.failed
            .lock()
            .expect("fates lock poisoned")
            .range(seqs)
            .map(|(seq, error)| (*seq, error.clone()))
            .collect()
    }
}

/// The receipts of one [`send_batch`](crate::PeerSender::send_batch): every message of the
/// batch, in order, to one peer. Like a [`Receipt`] it is only sequence numbers and views of the
/// peer's watermarks, however large the batch. `.await` it to wait until the peer acknowledged
/// every message (or some failed); [`Receipts::get`] gives one message's own [`Receipt`].
#[derive(Debug)]
#[must_use = "receipts tell whether the peer got the messages; drop them explicitly if you do not care"]
pub struct Receipts {
    pub(crate) peer: NodeId,
    /// The first message's id; the others share its producer and stream.
    pub(crate) base: MessageId,
    /// The batch's sequence numbers: contiguous runs (another sender may have numbered its own
    /// messages between two runs), in order.
    pub(crate) runs: Vec<std::ops::RangeInclusive<u64>>,
    pub(crate) progress: Arc<Progress>,
    /// The receipts of the batch's delayed messages, in the order given.
    pub(crate) scheduled: Vec<Receipt>,
}

/// Why not every message of a batch was delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} of {} message(s) not delivered (first: {}: {})", .failed.len(), .delivered + .failed.len(), .failed[0].0, .failed[0].1)]
pub struct BatchDeliveryError {
    /// How many were delivered.
    pub delivered: usize,
    /// The ones that were not, in order, with why (never empty).
    pub failed: Vec<(MessageId, DeliveryError)>,
}

impl Receipts {
    /// Empty receipts for messages to `receipt`'s peer (the same views of its watermarks).
    pub(crate) fn for_peer_of(receipt: &Receipt) -> Receipts {
        Receipts {
            peer: receipt.peer,
            base: receipt.id,
            runs: Vec::new(),
            progress: Arc::clone(&receipt.progress),
            scheduled: Vec::new(),
        }
    }

    /// Adds a later batch's receipts to the same peer (its numbers are above these).
    pub(crate) fn append(&mut self, later: Receipts) {
        debug_assert_eq!(self.peer, later.peer);
        if self.runs.is_empty() {
            self.base = later.base;
        }
        for run in later.runs {
            self.push_run(run);
        }
        self.scheduled.extend(later.scheduled);
    }

    pub(crate) fn push_run(&mut self, run: std::ops::RangeInclusive<u64>) {
        match self.runs.last_mut() {
            Some(last) if *last.end() + 1 == *run.start() => *last = *last.start()..=*run.end(),
            _ => self.runs.push(run),
        }
    }

    /// How many messages the batch holds (delayed ones included).
    pub fn len(&self) -> usize {
        self.runs
            .iter()
            .map(|r| (r.end() - r.start() + 1) as usize)
            .sum::<usize>()
            + self.scheduled.len()
    }

    /// Whether the batch was empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.scheduled.is_empty()
    }

    /// The receipts of the batch's delayed messages, in the order they were given. They are
    /// numbered only when due, so [`Receipts::ids`] and [`Receipts::get`] cover the batch's
    /// other messages only; awaiting the `Receipts` waits for these too.
    pub fn scheduled(&self) -> &[Receipt] {
        &self.scheduled
    }

    /// The node the messages were sent to.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The ids of the messages sent at once (not the delayed ones), in the order they were given.
    pub fn ids(&self) -> impl Iterator<Item = MessageId> + '_ {
        self.runs
            .iter()
            .flat_map(|run| run.clone())
            .map(|seq| MessageId { seq, ..self.base })
    }

    /// The receipt of the `index`th message sent at once (delayed ones: [`Receipts::scheduled`]).
    pub fn get(&self, index: usize) -> Option<Receipt> {
        let id = self.ids().nth(index)?;
        Some(Receipt {
            id,
            peer: self.peer,
            progress: Arc::clone(&self.progress),
            scheduled: None,
        })
    }

    /// Whether the peer acknowledged every message already.
    pub fn is_delivered(&self) -> bool {
        if !self.scheduled.iter().all(Receipt::is_delivered) {
            return false;
        }
        let Some(last) = self.runs.last() else {
            return true;
        };
        *self.progress.acked.borrow() >= *last.end() && self.failures().is_empty()
    }

    /// Messages above `acked` whose failure is not recorded either.
    fn unsettled_above(&self, acked: u64) -> u64 {
        self.runs
            .iter()
            .filter(|run| *run.end() > acked)
            .map(|run| {
                let above = (*run.start()).max(acked + 1)..=*run.end();
                let count = above.end() - above.start() + 1;
                count - self.progress.fates.failed_in(above).len() as u64
            })
            .sum()
    }

    fn failures(&self) -> Vec<(MessageId, DeliveryError)> {
        self.runs
            .iter()
            .flat_map(|run| self.progress.fates.failed_in(run.clone()))
            .map(|(seq, error)| (MessageId { seq, ..self.base }, error))
            .collect()
    }

    /// The outcome once every message's fate is known: acknowledged up to `acked`, the failed
    /// ones from the fates, the rest `otherwise`.
    fn outcome(
        &self,
        acked: u64,
        otherwise: Option<DeliveryError>,
    ) -> Result<usize, BatchDeliveryError> {
        let mut failed = self.failures();
        if let Some(error) = otherwise {
            for run in &self.runs {
                for seq in run.clone().filter(|seq| *seq > acked) {
                    if !failed.iter().any(|(id, _)| id.seq == seq) {
                        failed.push((MessageId { seq, ..self.base }, error.clone()));
                    }
                }
            }
            failed.sort_by_key(|(id, _)| id.seq);
        }
        if failed.is_empty() {
            Ok(self.len())
        } else {
            Err(BatchDeliveryError {
                delivered: self.len() - failed.len(),
                failed,
            })
        }
    }
}

impl IntoFuture for Receipts {
    type Output = Result<usize, BatchDeliveryError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    /// Resolves once the peer acknowledged every message (`Ok(len)`), or with every message that
    /// will not be delivered (given up, refused by the spool, or the node shut down first).
    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            let scheduled = std::mem::take(&mut self.scheduled);
            let mut outcome = self.settle_runs().await;
            for receipt in scheduled {
                let id = receipt.id();
                let result = receipt.await;
                outcome = match (outcome, result) {
                    (Ok(delivered), Ok(_)) => Ok(delivered + 1),
                    (Ok(delivered), Err(error)) => Err(BatchDeliveryError {
                        delivered,
                        failed: vec![(id, error)],
                    }),
                    (Err(mut e), Ok(_)) => {
                        e.delivered += 1;
                        Err(e)
                    }
                    (Err(mut e), Err(error)) => {
                        e.failed.push((id, error));
                        Err(e)
                    }
                };
            }
            outcome
        })
    }
}

impl Receipts {
    /// Waits for the messages numbered at once (see `into_future`).
    async fn settle_runs(self) -> Result<usize, BatchDeliveryError> {
        {
            let Some(last) = self.runs.last().map(|run| *run.end()) else {
                return Ok(0);
            };
            let mut version = self.progress.fates.version.subscribe();
            let mut watermark = self.progress.acked.clone();
            loop {
                let acked = *watermark.borrow_and_update();
                // Settled: everything acknowledged, or each message above the ack failed (a
                // refused or given-up message may never be covered by an ack).
                if acked >= last || self.unsettled_above(acked) == 0 {
                    return self.outcome(acked, None);
                }
                tokio::select! {
                    changed = watermark.changed() => {
                        if changed.is_err() {
                            let acked = *watermark.borrow();
                            return self.outcome(acked, Some(DeliveryError::NodeClosed));
                        }
                    }
                    _ = version.changed() => {}
                }
            }
        }
    }
}
