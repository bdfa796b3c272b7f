//! Channel inboxes: where delivered messages wait for the application.
//!
//! Every channel has one bounded queue, created on first use by either side: a message for a
//! channel nobody receives yet waits there (no slow-joiner loss), and when the queue is full the
//! link delivering to it stops reading, which the sender feels as backpressure. Dropping an
//! [`Inbox`] hands its queue, with whatever it still holds, back to the node for the next receiver.
//!
//! Two budgets, so that no peer can take the application's channels: the application's own
//! (`NodeConfig::channels_max`: channels it received on at least once) and, per peer, the
//! channels that peer's messages created and the application never opened
//! (`NodeConfig::unopened_channels_per_peer`). A peer over its budget is refused (its task cuts
//! it off with the reason); the application's `receive` is never refused because of a peer, and
//! a channel a peer created moves to the application's budget when the application opens it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use futures_util::Stream;
use weft_proto::{Message, MessageId, NodeId, StreamId};

use crate::error::ReceiveError;
use crate::queue;
use crate::settle::Settlement;

struct Slot {
    tx: queue::Sender<Message>,
    /// `None` while an [`Inbox`] holds the receiver.
    rx: Option<queue::Receiver<Message>>,
    /// The peer whose message created it, while the application never received on it.
    unopened_by: Option<NodeId>,
}

/// Name under which the catch-all queue is kept (not a valid channel name on the wire's API).
const CATCH_ALL: &str = "";

/// The node's channels. `None` once the node shut down.
pub(crate) struct Channels {
    slots: Mutex<Option<HashMap<String, Slot>>>,
    /// Bumped whenever which queue a channel maps to may have changed, so that the peer tasks'
    /// lock-free caches know to look again.
    generation: AtomicU64,
    capacity: usize,
    /// Channels the application opened, at most.
    max: usize,
    /// Channels one peer's messages created that the application never opened, at most.
    unopened_per_peer: usize,
    /// Per producer: what the application took of each lane's stream (see [`Settlement`]).
    settlements: RwLock<HashMap<NodeId, Vec<Arc<Settlement>>>>,
}

/// A stream and the settlement it settles in (see [`Channels::settle`]).
type LastSettlement = (StreamId, Arc<Settlement>);

/// Why a channel's queue could not be found or made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelError {
    TooMany,
    Closed,
}

impl Channels {
    pub(crate) fn new(capacity: usize, max: usize, unopened_per_peer: usize) -> Self {
        Self {
            slots: Mutex::new(Some(HashMap::new())),
            generation: AtomicU64::new(0),
            capacity,
            max,
            unopened_per_peer,
            settlements: RwLock::new(HashMap::new()),
        }
    }

    /// Records where `producer`'s messages of one lane are settled (each lane's peer task calls
    /// this once).
    pub(crate) fn register(&self, producer: NodeId, settlement: Arc<Settlement>) {
        self.settlements
            .write()
            .expect("settlements lock poisoned")
            .entry(producer)
            .or_default()
            .push(settlement);
    }

    /// The application is done with these messages: they may be acknowledged. `last` is the
    /// caller's memory of the settlement it used last: consecutive messages mostly share one
    /// stream, which then needs neither the map's lock nor a lookup.
    fn settle(&self, taken: &mut Vec<MessageId>, last: &mut Option<LastSettlement>) {
        if taken.is_empty() {
            return;
        }
        let mut settlements = None;
        let mut rest = taken.as_slice();
        // Runs of one producer's stream settle at once (one lock, at most one wake).
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .position(|id| id.stream != first.stream || id.producer != first.producer)
                .unwrap_or(rest.len());
            let (ids, after) = rest.split_at(run);
            rest = after;
            if ids.iter().all(|id| id.seq == 0) {
                continue; // volatile: never acknowledged
            }
            let seqs = || ids.iter().map(|id| id.seq);
            if let Some((stream, settlement)) = last.as_ref() {
                if *stream == first.stream && settlement.settle_many(first.stream, seqs()) {
                    continue;
                }
            }
            let settlements = settlements
                .get_or_insert_with(|| self.settlements.read().expect("settlements lock poisoned"));
            let Some(lanes) = settlements.get(&first.producer) else {
                continue;
            };
            *last = lanes
                .iter()
                .find(|settlement| settlement.settle_many(first.stream, seqs()))
                .map(|settlement| (first.stream, Arc::clone(settlement)));
        }
        taken.clear();
    }

    /// The slot of `channel`, made if there is none and the budget allows: the application's
    /// (`creator` `None`) or the creating peer's. The application opening a channel a peer
    /// created moves it to the application's budget (refused, and left as it is, when that is
    /// full).
    fn with_slot<T>(
        &self,
        channel: &str,
        creator: Option<NodeId>,
        f: impl FnOnce(&mut Slot) -> T,
    ) -> Result<T, ChannelError> {
        let mut guard = self.slots.lock().expect("channels lock poisoned");
        let slots = guard.as_mut().ok_or(ChannelError::Closed)?;
        // (Counted when a channel is made or opened, which is rare; never per message.)
        let opened = |slots: &HashMap<String, Slot>| {
            slots.values().filter(|s| s.unopened_by.is_none()).count()
        };
        if let Some(slot) = slots.get(channel) {
            if creator.is_none() && slot.unopened_by.is_some() && opened(slots) >= self.max {
                return Err(ChannelError::TooMany);
            }
            let slot = slots.get_mut(channel).expect("looked up above");
            if creator.is_none() {
                slot.unopened_by = None;
            }
            return Ok(f(slot));
        }
        let full = match creator {
            None => opened(slots) >= self.max,
            Some(peer) => {
                slots
                    .values()
                    .filter(|s| s.unopened_by == Some(peer))
                    .count()
                    >= self.unopened_per_peer
            }
        };
        if full {
            return Err(ChannelError::TooMany);
        }
        let (tx, rx) = queue::channel(self.capacity);
        let slot = slots.entry(channel.to_owned()).or_insert(Slot {
            tx,
            rx: Some(rx),
            unopened_by: creator,
        });
        self.generation.fetch_add(1, Ordering::Release);
        Ok(f(slot))
    }

    /// Changes whenever a cached channel-to-queue mapping may be stale.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The queue a message of `peer` for `channel` goes to: the channel's own if it has one,
    /// else the catch-all queue if someone receives everything, else a new queue for the
    /// channel (where messages wait for their receiver), within `peer`'s budget.
    pub(crate) fn sender(
        &self,
        channel: &str,
        peer: NodeId,
    ) -> Result<queue::Sender<Message>, ChannelError> {
        {
            let guard = self.slots.lock().expect("channels lock poisoned");
            let slots = guard.as_ref().ok_or(ChannelError::Closed)?;
            if let Some(slot) = slots.get(channel) {
                return Ok(slot.tx.clone());
            }
            if let Some(catch_all) = slots.get(CATCH_ALL) {
                if catch_all.rx.is_none() {
                    return Ok(catch_all.tx.clone());
                }
            }
        }
        self.with_slot(channel, Some(peer), |slot| slot.tx.clone())
    }

    /// Receives every message whose channel has no queue of its own.
    pub(crate) fn take_catch_all(self: &Arc<Self>) -> Result<Inbox, ReceiveError> {
        let inbox = self.take_receiver(CATCH_ALL)?;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(inbox)
    }

    pub(crate) fn take_receiver(self: &Arc<Self>, channel: &str) -> Result<Inbox, ReceiveError> {
        let rx = self
            .with_slot(channel, None, |slot| slot.rx.take())
            .map_err(|e| match e {
                ChannelError::Closed => ReceiveError::NodeClosed,
                ChannelError::TooMany => ReceiveError::TooManyChannels(self.max),
            })?
            .ok_or_else(|| ReceiveError::AlreadyReceiving(channel.to_owned()))?;
        Ok(Inbox {
            channel: channel.to_owned(),
            rx: Some(rx),
            channels: Arc::clone(self),
            taken: Vec::new(),
            last_settlement: None,
        })
    }

    fn give_back(&self, channel: &str, rx: queue::Receiver<Message>) {
        let mut guard = self.slots.lock().expect("channels lock poisoned");
        if let Some(slot) = guard.as_mut().and_then(|slots| slots.get_mut(channel)) {
            slot.rx = Some(rx);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Drops every sender held here, so receivers end once the links are gone too.
    pub(crate) fn close(&self) {
        self.slots.lock().expect("channels lock poisoned").take();
    }
}

/// The application's end of one channel: a stream of messages, in order per sending node.
///
/// # Acknowledgement
/// A message is acknowledged to its sender once the application is done with it, which the
/// inbox takes to be when the application asks for the next message (any `recv*` call or the
/// next poll of the stream) or drops the inbox — never while it merely waits in the queue. So a
/// crash loses nothing: what was not acknowledged is sent again. A message is *not* redelivered
/// once its acknowledgement's watermark is durable; one taken and not yet settled when the node
/// dies is (same [`MessageId`]: an application whose effects are not idempotent keys them by it).
pub struct Inbox {
    channel: String,
    rx: Option<queue::Receiver<Message>>,
    channels: Arc<Channels>,
    /// Returned to the application, settled at its next call.
    taken: Vec<MessageId>,
    /// The settlement the last message settled in.
    last_settlement: Option<LastSettlement>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("channel", &self.channel)
            .finish()
    }
}

impl Inbox {
    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message; `None` once the node shut down and the queue is empty. Settles the
    /// messages returned before (see [Acknowledgement](Inbox#acknowledgement)).
    pub async fn recv(&mut self) -> Option<Message> {
        self.settle();
        let message = self.rx.as_mut()?.recv().await?;
        self.taken.push(message.header.id);
        Some(message)
    }

    /// The next message with its body decoded (postcard) as a `T`; `None` as for
    /// [`Inbox::recv`]. A body that is not a `T` comes back as [`Undecodable`](crate::body::Undecodable)
    /// with the message. Settles the messages returned before.
    pub async fn recv_typed<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Option<Result<crate::body::Typed<T>, crate::body::Undecodable>> {
        self.recv().await.map(crate::body::typed)
    }

    /// Up to `limit` messages at once (at least one unless the node shut down), appended to
    /// `buffer`. Settles the messages returned before.
    pub async fn recv_many(&mut self, buffer: &mut Vec<Message>, limit: usize) -> usize {
        self.settle();
        let Some(rx) = self.rx.as_mut() else { return 0 };
        let start = buffer.len();
        let n = rx.recv_many(buffer, limit).await;
        self.taken
            .extend(buffer[start..].iter().map(|m| m.header.id));
        n
    }

    /// A message if one is waiting. Settles the messages returned before.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.settle();
        let message = self.rx.as_mut()?.try_recv()?;
        self.taken.push(message.header.id);
        Some(message)
    }

    /// Settles the messages returned so far now, without asking for more (for an application
    /// that is done with them but will not call `recv` again soon).
    pub fn settle(&mut self) {
        self.channels
            .settle(&mut self.taken, &mut self.last_settlement);
    }

    /// Up to `limit` messages at once, appended to `buffer`, whose settlement the caller takes
    /// over entirely: none is settled by a later call or the drop, only by
    /// [`Inbox::settle_ids`] or a [`Inbox::settler`] (the event task settles a batch at once).
    /// Settles the messages returned before by the other calls.
    pub(crate) async fn recv_many_unsettled(
        &mut self,
        buffer: &mut Vec<Message>,
        limit: usize,
    ) -> usize {
        self.settle();
        let Some(rx) = self.rx.as_mut() else { return 0 };
        rx.recv_many(buffer, limit).await
    }

    /// Settles messages taken with [`Inbox::recv_many_unsettled`] (drains `ids`).
    pub(crate) fn settle_ids(&self, ids: &mut Vec<MessageId>) {
        self.channels.settle(ids, &mut None);
    }

    /// The settlement of message `id` taken with [`Inbox::recv_many_unsettled`], handed on: it
    /// settles once every hold of the returned [`Settler`] is released (the event task hands
    /// it on to durable subscriptions, which settle when their application is done with the
    /// event). A settler dropped without a release never settles: its producer sends the
    /// message again after a restart.
    pub(crate) fn settler(&self, id: MessageId) -> Settler {
        Settler {
            inner: Arc::new(SettlerInner {
                channels: Arc::clone(&self.channels),
                id,
                holds: std::sync::atomic::AtomicUsize::new(1),
            }),
        }
    }

    /// Messages waiting in the queue now.
    pub fn len(&self) -> usize {
        self.rx.as_ref().map_or(0, |rx| rx.len())
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Stream for Inbox {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.settle();
        let polled = match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        };
        if let Poll::Ready(Some(message)) = &polled {
            let id = message.header.id;
            self.taken.push(id);
        }
        polled
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.settle();
        if let Some(rx) = self.rx.take() {
            self.channels.give_back(&self.channel, rx);
        }
    }
}

/// The settlement of one message, handed on (see [`Inbox::settler`]): settled when its
/// last hold is released, never by a drop.
pub(crate) struct Settler {
    inner: Arc<SettlerInner>,
}

struct SettlerInner {
    channels: Arc<Channels>,
    id: MessageId,
    holds: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settler")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Settler {
    /// Another hold on the same message: it settles only once this one is released too.
    pub(crate) fn hold(&self) -> Settler {
        self.inner.holds.fetch_add(1, Ordering::AcqRel);
        Settler {
            inner: Arc::clone(&self.inner),
        }
    }

    /// This hold is done with the message; the last release settles it.
    pub(crate) fn release(self) {
        if self.inner.holds.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner
                .channels
                .settle(&mut vec![self.inner.id], &mut None);
        }
    }
}
