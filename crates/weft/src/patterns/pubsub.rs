//! Publish/subscribe: wildcard subscriptions, events routed by interest.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

use tracing::{debug, warn, Instrument};
use weft_proto::gossip::{self, Accepted, Chains, Confirm, Event, EventOptions, Hop};
use weft_proto::interest::InterestError;
use weft_proto::{
    Kind, Message, MessageId, NodeId, OutgoingMessage, Priority, StreamId, Topic, TopicError,
    TopicPattern,
};

use super::{DurableSlot, LocalSubscription, EVENT_CHANNEL};
use crate::error::{SendError, TrySendError};
use crate::inbox::{Inbox, Settler};
use crate::node::Shared;
use crate::receipt::Receipt;

/// Why a subscription was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// Not a valid pattern.
    #[error(transparent)]
    Pattern(#[from] TopicError),
    /// The node has its maximum of distinct subscriptions and services.
    #[error("{0}")]
    TooMany(String),
    /// These connected peers did not confirm the subscription in time (see
    /// `PatternConfig::subscribe_timeout`); the subscription was withdrawn (a durable one
    /// stays, detached: its publishers learn of it when they confirm).
    #[error("{} connected peer(s) did not confirm the subscription in time", .0.len())]
    NotConfirmed(Vec<NodeId>),
    /// This node answers the service already (one `Service` per name and node).
    #[error("this node already serves {0:?}")]
    AlreadyServed(String),
    /// A subscription of this node holds the durable subscription already (one `Subscription`
    /// per name and node at a time).
    #[error("durable subscription {0:?} is held by another subscription of this node")]
    DurableInUse(String),
    /// A durable subscription cannot be best effort (it is kept for its subscriber while it is
    /// away; best effort drops what finds its queue full).
    #[error("a durable subscription cannot be best effort")]
    DurableBestEffort,
    /// The node is shut down.
    #[error("the node is shut down")]
    NodeClosed,
}

/// Why a publish failed. Nothing was sent when this is returned, except for
/// [`PublishError::Partial`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// Not a valid topic.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The value could not be encoded.
    #[error("cannot encode the event: {0}")]
    Body(String),
    /// The event cannot be sent (too large, node closed, spool failure).
    #[error(transparent)]
    Send(#[from] SendError),
    /// Some subscribers got the event and the send to one failed.
    #[error("the event reached {sent} subscriber(s), then failed for {peer}: {error}")]
    Partial {
        /// Subscribers that have the event (receipts were dropped).
        sent: usize,
        /// Where it failed.
        peer: NodeId,
        /// Why.
        error: SendError,
    },
}

/// Options of a subscription.
#[derive(Clone, Debug, Default)]
pub struct SubscribeOptions {
    /// Best effort (telemetry): when this subscription's queue is full, new events for it are
    /// dropped and counted ([`Subscription::dropped`], metric `events_dropped`) instead of
    /// making the publishers wait.
    pub best_effort: bool,
    /// A durable subscription under this name (a valid topic, e.g. `"billing"`): identified by
    /// (this node's id, name), it outlives the `Subscription`, the connection and the node's
    /// restarts. Publishers keep sending it what matches its pattern while it is away (in
    /// their links and spools, within `PatternConfig::durable_retention_max` events per
    /// subscription and `durable_retention_age`); subscribing again under the name, with the
    /// same identity and data directory, receives what it missed — once, in order per
    /// publisher — and then live events. Only [`Subscription::unsubscribe`] or
    /// `Node::unsubscribe_durable` ends it. `None`: a plain subscription (starts from now;
    /// nothing is kept for it once it is gone).
    pub durable: Option<String>,
}

/// What a publish did.
#[derive(Debug)]
#[must_use = "a publish reports where the event went; await `delivered` to know it arrived"]
pub struct Published {
    /// One receipt per first hop: resolves once that node's subscriptions have the event and
    /// the copies it relays to its subtree are accepted (durable, with a spool). With at most
    /// `gossip_fanout` subscribers, one per remote subscriber.
    pub receipts: Vec<Receipt>,
    /// Remote subscribers the event reaches through a relay (not in `receipts`).
    pub relayed: usize,
    /// Local subscriptions that got it.
    pub local: usize,
    /// A publish with a due time (`MessageOptions::delay`): the time it will be published
    /// (Unix ms), accepted now — nothing was sent yet, so there are no receipts.
    pub scheduled: Option<u64>,
}

impl Published {
    /// The nodes the event was sent to itself (the first hops).
    pub fn subscribers(&self) -> Vec<NodeId> {
        self.receipts.iter().map(|r| r.peer()).collect()
    }

    /// Waits until every first hop acknowledged the event; returns how many subscriptions and
    /// nodes it was addressed to (local subscriptions, first hops and relayed subscribers).
    pub async fn delivered(self) -> Result<usize, crate::error::DeliveryError> {
        let count = self.receipts.len() + self.relayed;
        for receipt in self.receipts {
            receipt.await?;
        }
        Ok(count + self.local)
    }
}

/// What a [`publish_batch`](crate::Node::publish_batch) did.
#[derive(Debug, Default)]
#[must_use = "a publish reports where the events went; await `delivered` to know they arrived"]
pub struct PublishedBatch {
    /// Events published (all of the batch when it returns `Ok`).
    pub events: usize,
    /// One entry per first hop: the receipts of every copy sent to that node, in order
    /// (resolving like [`Published::receipts`], per copy).
    pub receipts: Vec<crate::receipt::Receipts>,
    /// Copies that reach remote subscribers through a relay (not in `receipts`), over all events.
    pub relayed: usize,
    /// Deliveries to local subscriptions, over all events.
    pub local: usize,
}

impl PublishedBatch {
    /// The nodes the events were sent to themselves (the first hops).
    pub fn subscribers(&self) -> Vec<NodeId> {
        self.receipts.iter().map(|r| r.peer()).collect()
    }

    /// Waits until every first hop acknowledged every copy sent to it; returns how many copies
    /// were addressed in all (local deliveries, copies to first hops and relayed copies).
    pub async fn delivered(self) -> Result<usize, crate::receipt::BatchDeliveryError> {
        let mut count = self.relayed + self.local;
        for receipts in self.receipts {
            count += receipts.await?;
        }
        Ok(count)
    }

    /// Takes in what a later part of the same batch did.
    fn absorb_receipts(&mut self, peer: NodeId, later: crate::receipt::Receipts) {
        match self.receipts.iter_mut().find(|r| r.peer() == peer) {
            Some(receipts) => receipts.append(later),
            None => self.receipts.push(later),
        }
    }

    fn absorb(&mut self, published: Published) {
        self.events += 1;
        self.relayed += published.relayed;
        self.local += published.local;
        for receipt in published.receipts {
            let peer = receipt.peer();
            let mut receipts = crate::receipt::Receipts::for_peer_of(&receipt);
            let seq = receipt.id().seq;
            receipts.push_run(seq..=seq);
            self.absorb_receipts(peer, receipts);
        }
    }
}

/// Why a [`publish_batch`](crate::Node::publish_batch) stopped before its end.
#[derive(Debug, thiserror::Error)]
#[error("{published} event(s) of the batch published, then: {error}")]
pub struct PublishBatchError {
    /// The events before this index were published: each was sent to every first hop. The
    /// next ones failed with `error`: nothing of the batch from here on was published, except
    /// that with [`PublishError::Partial`] (or a [`PublishError::Send`] on a spool failure)
    /// some events numbered together with the failing one (at most a run of 1024) may have
    /// reached some first hops; the publisher hands them to the others later, as after a
    /// partial [`publish`](crate::Node::publish).
    pub published: usize,
    /// Why.
    pub error: PublishError,
    /// What was published before the failure.
    pub done: PublishedBatch,
}

/// An event on its way to a subscription, with the settlement of its link message when the
/// subscription is durable (settled once the application asks for the next event).
pub(crate) struct Delivery {
    pub(crate) message: Message,
    pub(crate) settler: Option<Settler>,
}

/// A subscription: a stream of the events whose topic matches its pattern, in order per
/// publisher. Dropping a plain one unsubscribes; dropping a durable one only detaches from it
/// (events for it are kept — by its publishers, or queued here — until it is subscribed again
/// under its name or ended with [`Subscription::unsubscribe`]).
///
/// A durable subscription's events are acknowledged to their publishers only once the
/// application is done with them (it asks for the next one, or drops the subscription after
/// taking it), so one taken from its queue and not yet done with when the process dies comes
/// again after the restart; one done with never does.
pub struct Subscription {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u64,
    pub(crate) pattern: TopicPattern,
    pub(crate) rx: Option<mpsc::Receiver<Delivery>>,
    pub(crate) dropped: Arc<AtomicU64>,
    /// Its name, for a durable subscription.
    pub(crate) durable: Option<String>,
    /// The settlement of the event returned last (durable subscriptions).
    pub(crate) taken: Option<Settler>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The pattern.
    pub fn pattern(&self) -> &TopicPattern {
        &self.pattern
    }

    /// The durable subscription's name (`None` for a plain subscription).
    pub fn durable_name(&self) -> Option<&str> {
        self.durable.as_deref()
    }

    /// The next event; `None` once the node shut down. The event's `header.channel` is its
    /// topic, `header.id.producer` its publisher. Settles the event returned before (see
    /// [`Subscription`]).
    pub async fn recv(&mut self) -> Option<Message> {
        self.settle();
        let delivery = self.rx.as_mut()?.recv().await?;
        Some(self.take(delivery))
    }

    /// The next event with its body decoded (postcard) as a `T` (see
    /// [`Inbox::recv_typed`](crate::Inbox::recv_typed)); `None` as for [`Subscription::recv`].
    pub async fn recv_typed<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Option<Result<crate::body::Typed<T>, crate::body::Undecodable>> {
        self.recv().await.map(crate::body::typed)
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.settle();
        let delivery = self.rx.as_mut()?.try_recv().ok()?;
        Some(self.take(delivery))
    }

    /// Events dropped because this (best-effort) subscription's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Ends the subscription. For a durable one this ends it for good, everywhere: this node
    /// announces the end to its peers (returns once every connected peer confirmed it, like
    /// `subscribe`), and every publisher drops it from its registry and keeps nothing more for
    /// it. A publisher that is not connected now learns it when it next connects (the end is
    /// persisted here with a data directory, among the last `interest::DURABLE_ENDED_MAX`).
    pub async fn unsubscribe(mut self) -> Result<(), SubscribeError> {
        self.settle();
        match self.durable.clone() {
            Some(name) => unsubscribe_durable(&Arc::clone(&self.shared), &name).await,
            None => Ok(()), // the drop withdraws it
        }
    }

    fn take(&mut self, delivery: Delivery) -> Message {
        self.taken = delivery.settler;
        delivery.message
    }

    fn settle(&mut self) {
        if let Some(settler) = self.taken.take() {
            settler.release();
        }
    }
}

impl Stream for Subscription {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.settle();
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(delivery)) => Poll::Ready(Some(self.take(delivery))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.settle();
        let patterns = &self.shared.patterns;
        let changed = {
            let mut state = patterns.lock();
            state.subscriptions.retain(|s| s.id != self.id);
            patterns
                .subscriptions_changed
                .fetch_add(1, Ordering::Release);
            match &self.durable {
                // Detach: what waits in the queue stays there for the next subscription
                // under the name (unsettled: its publishers keep it meanwhile).
                Some(name) => {
                    let rx = self.rx.take();
                    let closed = state.closed;
                    match state.durable_slots.get_mut(name) {
                        Some(slot) if slot.attached == Some(self.id) => {
                            slot.attached = None;
                            slot.rx = rx;
                        }
                        // The node shut down: unsettled, they come again after a restart.
                        _ if closed => drop(rx),
                        // Ended meanwhile: nothing waits for these any more.
                        _ => release_all(rx),
                    }
                    false
                }
                None => state.table.unsubscribe(&self.pattern),
            }
        };
        if changed {
            let _ = patterns.announce.send(());
        }
    }
}

/// Settles every event waiting in a durable queue that nobody will read.
fn release_all(rx: Option<mpsc::Receiver<Delivery>>) {
    if let Some(mut rx) = rx {
        rx.close();
        while let Ok(delivery) = rx.try_recv() {
            if let Some(settler) = delivery.settler {
                settler.release();
            }
        }
    }
}

pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    pattern: &str,
    options: SubscribeOptions,
) -> Result<Subscription, SubscribeError> {
    if shared.is_shutting_down() {
        return Err(SubscribeError::NodeClosed);
    }
    let pattern = TopicPattern::new(pattern)?;
    let durable = match options.durable {
        Some(name) if options.best_effort => {
            let _ = name;
            return Err(SubscribeError::DurableBestEffort);
        }
        Some(name) => Some(Topic::new(name)?),
        None => None,
    };
    let patterns = &shared.patterns;
    let config = &shared.config.patterns;
    let dropped = Arc::new(AtomicU64::new(0));
    let too_many = |e: InterestError| SubscribeError::TooMany(e.to_string());
    let (id, version, rx, confirmed) = {
        let mut state = patterns.lock();
        if state.closed {
            return Err(SubscribeError::NodeClosed);
        }
        let id = state.next_subscription;
        // Confirmed by every peer before (in this start, or one before: persisted): the
        // publishers have it in their registries.
        let confirmed = durable
            .as_ref()
            .is_some_and(|name| state.durable_confirmed.get(name.as_str()) == Some(&pattern));
        let (version, tx, rx) = match &durable {
            Some(name) => {
                if state
                    .durable_slots
                    .get(name.as_str())
                    .is_some_and(|slot| slot.attached.is_some())
                {
                    return Err(SubscribeError::DurableInUse(name.as_str().to_owned()));
                }
                let version = state
                    .table
                    .subscribe_durable(name, &pattern)
                    .map_err(too_many)?;
                let slot = state
                    .durable_slots
                    .entry(name.as_str().to_owned())
                    .or_insert_with(|| DurableSlot::new(config.subscription_capacity));
                slot.attached = Some(id);
                (version, slot.tx.clone(), slot.rx.take())
            }
            None => {
                let version = state.table.subscribe(&pattern).map_err(too_many)?;
                let (tx, rx) = mpsc::channel(config.subscription_capacity);
                (version, tx, Some(rx))
            }
        };
        state.next_subscription += 1;
        patterns
            .subscriptions_changed
            .fetch_add(1, Ordering::Release);
        state.subscriptions.push(LocalSubscription {
            id,
            pattern: pattern.clone(),
            tx,
            best_effort: options.best_effort,
            dropped: Arc::clone(&dropped),
            durable: durable.as_ref().map(|name| name.as_str().to_owned()),
        });
        (id, version, rx, confirmed)
    };
    let subscription = Subscription {
        shared: Arc::clone(shared),
        id,
        pattern,
        rx,
        dropped,
        durable: durable.map(|name| name.as_str().to_owned()),
        taken: None,
    };
    let _ = patterns.announce.send(());
    if confirmed {
        // After a restart this must not wait: the peers' acknowledgements may be stuck behind
        // events queued for this very subscription (see `Patterns::in_effect`).
        return Ok(subscription);
    }
    match patterns
        .in_effect(
            shared,
            version,
            config.subscribe_timeout,
            subscription.durable.as_deref(),
        )
        .await
    {
        Ok(()) => {
            if let Some(name) = &subscription.durable {
                let persisting = {
                    let mut state = patterns.lock();
                    state
                        .durable_confirmed
                        .insert(name.clone(), subscription.pattern.clone());
                    persist_durable_state(shared, &state)
                };
                persisted(persisting).await;
            }
            Ok(subscription)
        }
        Err(waiting) => Err(SubscribeError::NotConfirmed(waiting)), // dropping withdraws it
    }
}

/// Takes back what a restart finds for pub/sub: the durable subscription registry, and what
/// the restored links still owe durable subscribers (so their budgets hold across restarts).
pub(crate) fn restore(shared: &Arc<Shared>) {
    let restored = shared.restored.lock().expect("restored lock poisoned");
    let mut state = shared.patterns.lock();
    if let Some(persisted) = &restored.registry {
        let restored = postcard::from_bytes::<DurableState>(persisted)
            .map_err(|e| e.to_string())
            .and_then(|persisted| {
                let entries = state
                    .table
                    .registry_restore(&persisted.registry)
                    .map_err(|e| e.to_string())?;
                for (name, pattern) in persisted.confirmed {
                    let (Ok(topic), Ok(pattern)) =
                        (Topic::new(name.as_str()), TopicPattern::new(pattern))
                    else {
                        continue;
                    };
                    // Announced from the start on, and in effect already.
                    if state.table.subscribe_durable(&topic, &pattern).is_ok() {
                        state.durable_confirmed.insert(name, pattern);
                    }
                }
                state.table.restore_durable_ended(persisted.ended);
                Ok(entries)
            });
        match restored {
            Ok(entries) => debug!(entries, "durable subscription state restored"),
            Err(e) => {
                shared.metrics.spool_error();
                warn!(error = %e, "durable subscription state not restored");
            }
        }
    }
    for (&(node, lane), stream) in &restored.outbound {
        if lane != weft_proto::Lane::Normal {
            continue; // the patterns' messages travel in the normal lane
        }
        for outgoing in &stream.messages {
            if outgoing.message.channel != EVENT_CHANNEL {
                continue;
            }
            let Ok(event) = Event::decode(&outgoing.message.body, &shared.id, &node) else {
                continue;
            };
            if event.direct && !event.durable.is_empty() {
                // Within the budget when it was recorded; a smaller budget now gives up at the
                // next publish to this node.
                let _ = state.owed.record(node, outgoing.seq, &event.durable);
            }
        }
    }
    record_owed(shared, &state);
}

/// What a node persists of durable subscriptions (one spool record, each replacing the one
/// before): as a publisher, its registry of peers' durable subscriptions; as a subscriber, its
/// own durable subscriptions that every connected peer confirmed (subscribing again under the
/// name after a restart is in effect at once: see [`subscribe`]) and its tombstones.
#[derive(serde::Serialize, serde::Deserialize)]
struct DurableState {
    /// `InterestTable::registry_encode`.
    registry: Vec<u8>,
    /// (name, pattern) of the local durable subscriptions confirmed.
    confirmed: Vec<(String, String)>,
    /// Names of the local durable subscriptions ended.
    ended: Vec<String>,
}

/// A snapshot of the durable subscription state on its way to the spool.
pub(crate) type Persisting = Option<tokio::sync::oneshot::Receiver<Result<(), String>>>;

/// Starts persisting the node's durable subscription state as it is now (a node without a
/// spool keeps it in memory). Called under the patterns lock, so that snapshots reach the
/// spool writer in the order they were taken.
pub(crate) fn persist_durable_state(shared: &Shared, state: &super::State) -> Persisting {
    let durable = shared.durable.as_ref()?;
    let snapshot = DurableState {
        registry: state.table.registry_encode(),
        confirmed: state
            .durable_confirmed
            .iter()
            .map(|(name, pattern)| (name.clone(), pattern.as_str().to_owned()))
            .collect(),
        ended: state.table.durable_ended(),
    };
    let registry = postcard::to_allocvec(&snapshot).expect("durable state always encodes");
    let (done, result) = tokio::sync::oneshot::channel();
    let command = crate::durable::Command::Registry { registry, done };
    durable.tx.send(command).ok()?;
    Some(result)
}

/// Waits until a snapshot started by [`persist_durable_state`] is durable.
pub(crate) async fn persisted(persisting: Persisting) {
    if let Some(result) = persisting {
        if let Ok(Err(e)) = result.await {
            warn!(error = %e, "durable subscription state not persisted");
        }
    }
}

/// Ends the durable subscription `name` of this node (see [`Subscription::unsubscribe`]).
pub(crate) async fn unsubscribe_durable(
    shared: &Arc<Shared>,
    name: &str,
) -> Result<(), SubscribeError> {
    if shared.is_shutting_down() {
        return Err(SubscribeError::NodeClosed);
    }
    let name = Topic::new(name)?;
    let patterns = &shared.patterns;
    let version = {
        let mut state = patterns.lock();
        if let Some(mut slot) = state.durable_slots.remove(name.as_str()) {
            release_all(slot.rx.take());
        }
        state.durable_known.remove(name.as_str());
        state.durable_confirmed.remove(name.as_str());
        state
            .subscriptions
            .retain(|s| s.durable.as_deref() != Some(name.as_str()));
        patterns
            .subscriptions_changed
            .fetch_add(1, Ordering::Release);
        let version = state.table.unsubscribe_durable(&name);
        (version, persist_durable_state(shared, &state))
    };
    let (version, persisting) = version;
    persisted(persisting).await;
    patterns
        .announce_and_confirm(shared, version)
        .await
        .map_err(SubscribeError::NotConfirmed)
}

/// Publisher chains remembered at most (see `gossip::PublisherConfig::chains_max`).
pub(crate) const PUBLISHER_CHAINS_MAX: usize = 65_536;
/// Publisher chains a subscriber remembers at most.
const SUBSCRIBER_CHAINS_MAX: usize = 4_096;
/// A subscriber confirms at least every this many events it delivered (and whenever its event
/// queue runs empty).
const CONFIRM_EVERY: u32 = 128;
/// How often a subscriber retries confirmations that found a full peer queue.
const CONFIRM_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The message a local subscription receives for an event of `origin`.
fn event_message(
    shared: &Shared,
    origin: NodeId,
    incarnation: u64,
    seq: u64,
    topic: &Topic,
    payload: Bytes,
) -> Message {
    let stream = StreamId::direct(&origin, &shared.id, incarnation);
    event_message_in(origin, stream, seq, topic, payload, shared.now_unix_ms())
}

/// The link message carrying an encoded event, in the lane of the event's priority.
fn event_link_message(
    shared: &Shared,
    body: Bytes,
    options: Option<&EventOptions>,
) -> OutgoingMessage {
    crate::node::event_message(body, priority_of(options), shared.now_unix_ms())
}

/// An event's priority: the lane of every hop.
fn priority_of(options: Option<&EventOptions>) -> Priority {
    options.map_or(Priority::NORMAL, |o| o.priority)
}

/// Puts the event's options on `message` (an event for local subscriptions, changed in place:
/// no move on the common path); false when the event expired or repeats an idempotency key of
/// its publisher: then it is dropped (counted, logged) and only settled.
fn dress(
    shared: &Shared,
    message: &mut Message,
    options: Option<&EventOptions>,
    now_unix_ms: u64,
) -> bool {
    let Some(options) = options else {
        return true;
    };
    message.header.priority = options.priority;
    if options.expires_unix_ms.is_some() || !options.headers.is_empty() {
        message.header.options = Some(Box::new(weft_proto::Options {
            expires_unix_ms: options.expires_unix_ms,
            headers: options.headers.clone(),
            ..Default::default()
        }));
    }
    if options.expires_unix_ms.is_some_and(|at| at <= now_unix_ms) {
        shared
            .metrics
            .events_expired
            .fetch_add(1, Ordering::Relaxed);
        debug!(event = %message.header.id, topic = %message.header.channel, "expired event dropped");
        return false;
    }
    !shared.keys.is_repeat(message, now_unix_ms)
}

/// [`event_message`] with the id's stream already known (a blake3 hash: the event task
/// remembers the last one, see [`Streams`]).
fn event_message_in(
    origin: NodeId,
    stream: StreamId,
    seq: u64,
    topic: &Topic,
    payload: Bytes,
    created_unix_ms: u64,
) -> Message {
    Message {
        header: weft_proto::Header {
            id: MessageId {
                producer: origin,
                stream,
                seq,
            },
            kind: Kind::Event,
            channel: topic.channel(),
            priority: Default::default(),
            created_unix_ms,
            attempt: 1,
            options: None,
        },
        body: payload,
    }
}

/// Hands an event to every local subscription whose pattern matches (waiting at a full reliable
/// one, dropping at a full best-effort one), and to the durable subscriptions it names
/// (`durable`): queued for one that is not attached now, unless this node ended it. A durable
/// subscription gets a hold of the event's settlement (`settler`), so its link message is
/// acknowledged only once its application is done with it. Returns how many got it.
async fn deliver_locally(
    shared: &Shared,
    topic: &Topic,
    message: Message,
    durable: &[String],
    settler: Option<&mut Settling<'_>>,
) -> usize {
    let origin = message.header.id.producer;
    let mut learned = false;
    let targets: Vec<Target> = {
        let mut state = shared.patterns.lock();
        let mut targets: Vec<_> = state
            .subscriptions
            .iter()
            .filter(|s| {
                s.pattern.matches(topic) || s.durable.as_ref().is_some_and(|n| durable.contains(n))
            })
            .map(target)
            .collect();
        let capacity = shared.config.patterns.subscription_capacity;
        for name in durable {
            if state.table.durable_ended_here(name) {
                continue; // ended: its publishers are told to stop
            }
            if state.durable_slots.contains_key(name) || state.table.durable_here(name) {
                // The publisher has it in its registry (see `Patterns::in_effect`).
                learned |= state
                    .durable_known
                    .entry(name.clone())
                    .or_default()
                    .insert(origin);
            }
            if state
                .durable_slots
                .get(name)
                .is_some_and(|slot| slot.attached.is_some())
            {
                continue; // attached: among the subscriptions above
            }
            if !state.durable_slots.contains_key(name)
                && state.durable_slots.len() >= weft_proto::interest::DURABLE_ENDED_MAX
            {
                warn!(name, "too many durable subscriptions waiting to be attached; event not queued for this one");
                continue;
            }
            // Not attached (this node restarted and its application has not subscribed again
            // yet, or it dropped the subscription): queued for the next one under the name.
            let slot = state
                .durable_slots
                .entry(name.clone())
                .or_insert_with(|| DurableSlot::new(capacity));
            targets.push((slot.tx.clone(), false, Arc::new(AtomicU64::new(0)), true));
            learned |= state
                .durable_known
                .entry(name.clone())
                .or_default()
                .insert(origin);
        }
        targets
    };
    if learned {
        shared.patterns.bump();
    }
    hand_to(shared, &targets, message, settler).await
}

/// A local subscription's queue as `deliver_locally` hands events to it: (queue, best effort,
/// its drop counter, durable).
type Target = (mpsc::Sender<Delivery>, bool, Arc<AtomicU64>, bool);

/// Where an event for `subscription` goes.
fn target(subscription: &super::LocalSubscription) -> Target {
    (
        subscription.tx.clone(),
        subscription.best_effort,
        Arc::clone(&subscription.dropped),
        subscription.durable.is_some(),
    )
}

/// Hands `message` to each of `targets` (see [`deliver_locally`]). Returns how many got it.
async fn hand_to(
    shared: &Shared,
    targets: &[Target],
    message: Message,
    mut settler: Option<&mut Settling<'_>>,
) -> usize {
    let mut delivered = 0;
    let count = targets.len();
    let mut message = Some(message);
    for (i, (tx, best_effort, dropped, durable)) in targets.iter().enumerate() {
        let (best_effort, durable) = (*best_effort, *durable);
        let message = if i + 1 == count {
            message.take().expect("the last target takes the event")
        } else {
            message
                .clone()
                .expect("the event is there until the last target")
        };
        // Counted before the event becomes visible, so a reader that has it sees the count.
        let permit = if best_effort {
            match tx.try_reserve() {
                Ok(permit) => Some(permit),
                Err(mpsc::error::TrySendError::Full(())) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    shared
                        .metrics
                        .events_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(mpsc::error::TrySendError::Closed(())) => None,
            }
        } else {
            tx.reserve().await.ok()
        };
        if let Some(permit) = permit {
            delivered += 1;
            shared
                .metrics
                .events_delivered
                .fetch_add(1, Ordering::Relaxed);
            let settler = match settler.as_mut() {
                Some(settling) if durable => Some(settling.hold()),
                _ => None,
            };
            permit.send(Delivery { message, settler });
        }
    }
    delivered
}

fn is_connected(shared: &Shared, peer: &NodeId) -> bool {
    shared
        .peers
        .read()
        .expect("peers lock poisoned")
        .get(peer)
        .is_some_and(|handle| *handle.connected.borrow())
}

/// Sends a sequenced event to `route[0]` (its subtree in the rest of the route).
async fn send_event(
    shared: &Arc<Shared>,
    event: &Event,
) -> Result<crate::receipt::Receipt, SendError> {
    let to = event.route[0].node;
    shared
        .sender(to)?
        .send_event(
            &event.encode(&shared.id),
            priority_of(event.options.as_deref()),
        )
        .await
}

/// The link messages of a publisher's own event on its way down its trees, one per route
/// (headed by the node it goes to; the rest is that node's subtree).
fn tree_messages<'a>(
    shared: &'a Shared,
    seq: u64,
    routes: &'a gossip::Routes,
    topic: &Topic,
    options: Option<&'a EventOptions>,
    payload: &Bytes,
) -> impl Iterator<Item = (&'a [Hop], OutgoingMessage)> + 'a {
    let own = gossip::OwnEvent::new(shared.epoch, seq, topic, options, payload);
    let copies: Vec<Bytes> = routes.iter().map(|route| own.encode(route)).collect();
    routes
        .iter()
        .zip(copies)
        .map(move |(route, body)| (route, event_link_message(shared, body, options)))
}

/// Queues an event's copy for a child that is not connected, without waiting for room: when its
/// queue or the spool is full, the copy is left to the publisher's repair.
async fn relay_to_absent(shared: &Arc<Shared>, event: &Event, absent: &Hop) {
    let copy = event.for_child(std::slice::from_ref(absent));
    let queued = shared
        .sender(absent.node)
        .map_err(TrySendError::from)
        .and_then(|sender| {
            sender.try_send_event(
                &copy.encode(&shared.id),
                priority_of(copy.options.as_deref()),
            )
        });
    match queued {
        Ok(receipt) => match receipt.accepted().await {
            Ok(()) => {
                shared
                    .metrics
                    .events_relayed
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                debug!(child = %absent.node.short(), error = %e, "relayed copy not accepted; its publisher repairs it")
            }
        },
        Err(e) => {
            debug!(child = %absent.node.short(), error = %e, "relayed copy not queued; its publisher repairs it")
        }
    }
}

/// What the event task does with one received event: relay it to its children, then take it
/// into its publisher's chain and deliver what that releases.
async fn take_event(
    shared: &Arc<Shared>,
    chains: &mut Chains<Event>,
    streams: &mut Streams,
    targets: &mut Targets,
    event: Event,
    settling: &mut Settling<'_>,
) {
    let metrics = &shared.metrics;
    if event.seq == 0 {
        // Best effort: no chain.
        let mut message = event_message(
            shared,
            event.origin,
            event.incarnation,
            0,
            &event.topic,
            event.payload,
        );
        let now = shared.now_unix_ms();
        if dress(shared, &mut message, event.options.as_deref(), now) {
            deliver_locally(shared, &event.topic, message, &[], None).await;
        }
        return;
    }
    metrics.event_copies.fetch_add(1, Ordering::Relaxed);
    metrics
        .event_hops_max
        .fetch_max(u64::from(event.hops), Ordering::Relaxed);
    let fanout = shared.config.patterns.gossip_fanout;
    for chunk in gossip::split(&event.route[1..], fanout) {
        // A child that is not connected keeps its own copy in this node's link to it (queued,
        // spooled: it arrives when the child is back), and the next connected node of its
        // subtree takes its place for the rest.
        let mut child = chunk;
        while let Some(absent) = child.first().filter(|hop| !is_connected(shared, &hop.node)) {
            relay_to_absent(shared, &event, absent).await;
            child = &child[1..];
        }
        if child.is_empty() {
            continue;
        }
        let copy = event.for_child(child);
        match send_event(shared, &copy).await {
            Ok(_receipt) => {
                metrics.events_relayed.fetch_add(1, Ordering::Relaxed);
            }
            // The publisher re-sends to the subtree over its own links once it sees no progress.
            Err(e) => warn!(
                child = %child[0].node.short(),
                subtree = child.len(),
                error = %e,
                "event not relayed; its publisher will repair it"
            ),
        }
    }
    let (origin, incarnation, seq, prev) = (
        event.origin,
        event.incarnation,
        event.seq,
        event.route[0].prev,
    );
    let accepted = if event.direct {
        chains.accept_direct(origin, incarnation, seq, prev, event)
    } else {
        chains.accept(origin, incarnation, seq, prev, event)
    };
    match accepted {
        Accepted::Next(event) => {
            deliver_event(shared, streams, targets, event, Some(settling)).await;
        }
        Accepted::Deliver(events) => {
            let mut settling = Some(settling);
            for event in events {
                // The first is the event in hand; the others were held, and their link
                // messages settled when they arrived.
                deliver_event(shared, streams, targets, event, settling.take()).await;
            }
        }
        Accepted::Held => {
            debug!(publisher = %origin.short(), seq, prev, "event held for its predecessor");
        }
        Accepted::Duplicate => {}
        Accepted::Dropped => {
            debug!(publisher = %origin.short(), seq, "hold full: event dropped, its publisher repairs it");
        }
    }
}

/// Hands an event its chain released to the local subscriptions (the matching ones, and the
/// durable ones it names); `settler`: the settlement of its link message, for the event in hand.
async fn deliver_event(
    shared: &Arc<Shared>,
    streams: &mut Streams,
    targets: &mut Targets,
    event: Event,
    settler: Option<&mut Settling<'_>>,
) {
    shared
        .metrics
        .events_received
        .fetch_add(1, Ordering::Relaxed);
    let stream = streams.get(shared, event.origin, event.incarnation);
    let mut message = event_message_in(
        event.origin,
        stream,
        event.seq,
        &event.topic,
        event.payload,
        streams.now_unix_ms,
    );
    if !dress(
        shared,
        &mut message,
        event.options.as_deref(),
        streams.now_unix_ms,
    ) {
        return; // dropped: its link message settles with the batch
    }
    if event.durable.is_empty() {
        let targets = targets.get(shared, &event.topic);
        hand_to(shared, targets, message, settler).await;
    } else {
        deliver_locally(shared, &event.topic, message, &event.durable, settler).await;
    }
}

/// Sends the confirmations due (and those a full queue refused before); keeps what is refused
/// again.
fn send_confirms(
    shared: &Arc<Shared>,
    chains: &mut Chains<Event>,
    refused: &mut BTreeMap<(NodeId, u64), u64>,
) {
    for (origin, incarnation, seq) in chains.take_confirms() {
        refused.insert((origin, incarnation), seq);
    }
    refused.retain(|&(origin, incarnation), &mut seq| {
        let confirm = Confirm {
            incarnation,
            seq,
            subscriber_incarnation: shared.epoch,
        };
        let message = super::control_message(
            shared,
            super::CONFIRM_CHANNEL,
            Kind::Reply,
            confirm.encode(),
        );
        !super::try_volatile(shared, origin, message)
    });
}

/// Events the event task takes from its inbox at once (their link messages are settled
/// together: one notification of the peer task per batch instead of per event).
const EVENT_BATCH_MAX: usize = 256;

/// The settlement of one received event's link message, made only when a durable subscription
/// takes a hold of it (most events settle with their batch, see [`event_task`]).
pub(crate) struct Settling<'a> {
    inbox: &'a Inbox,
    id: MessageId,
    settler: Option<Settler>,
}

impl Settling<'_> {
    /// Another hold on the event's settlement (see [`Settler::hold`]).
    fn hold(&mut self) -> Settler {
        let (inbox, id) = (self.inbox, self.id);
        self.settler.get_or_insert_with(|| inbox.settler(id)).hold()
    }
}

/// The local subscriptions an event on the last topic goes to (events without durable names),
/// while the subscriptions are the same (`Patterns::subscriptions_changed`): one lookup under
/// the patterns lock per topic change instead of per event.
#[derive(Default)]
struct Targets {
    cached: Option<(u64, Topic, Vec<Target>)>,
}

impl Targets {
    fn get(&mut self, shared: &Shared, topic: &Topic) -> &[Target] {
        let generation = shared
            .patterns
            .subscriptions_changed
            .load(Ordering::Acquire);
        let fresh = matches!(&self.cached, Some((g, t, _)) if *g == generation && t == topic);
        if !fresh {
            let state = shared.patterns.lock();
            // Read again under the lock: a change after it bumps the generation again.
            let generation = shared
                .patterns
                .subscriptions_changed
                .load(Ordering::Acquire);
            let targets = state
                .subscriptions
                .iter()
                .filter(|s| s.pattern.matches(topic))
                .map(target)
                .collect();
            self.cached = Some((generation, topic.clone(), targets));
        }
        &self.cached.as_ref().expect("filled above").2
    }
}

/// What the event task stamps on the messages it hands to subscriptions: the last publisher
/// stream it named an event's id after (a blake3 hash per event otherwise, and a batch mostly
/// comes from one publisher), and the batch's arrival time (one clock read per batch).
#[derive(Default)]
struct Streams {
    last: Option<(NodeId, u64, StreamId)>,
    /// When the batch in hand was taken, Unix milliseconds (the messages' creation time).
    now_unix_ms: u64,
}

impl Streams {
    fn get(&mut self, shared: &Shared, origin: NodeId, incarnation: u64) -> StreamId {
        match self.last {
            Some((o, i, stream)) if o == origin && i == incarnation => stream,
            _ => {
                let stream = StreamId::direct(&origin, &shared.id, incarnation);
                self.last = Some((origin, incarnation, stream));
                stream
            }
        }
    }
}

/// Events from peers, a batch at a time: relay, chain, deliver to the matching local
/// subscriptions. An event's link message is settled once it is relayed and delivered (the
/// hop's acknowledgement means the subtree's copies are accepted and the chain has it): with
/// its batch, or — when handling an event has to wait (a full queue) — together with what was
/// handled before it, first. One that a durable subscription got is settled once every such
/// subscription is done with it (each holds it).
pub(crate) async fn event_task(shared: Arc<Shared>, mut events: Inbox) {
    // Made once: a new one per event (two watch subscriptions and their waiters) was a quarter
    // of a subscriber's CPU.
    let stopping = super::Patterns::stopping(&shared);
    tokio::pin!(stopping);
    let mut chains: Chains<Event> =
        Chains::new(shared.config.patterns.event_hold_max, SUBSCRIBER_CHAINS_MAX);
    let mut streams = Streams::default();
    let mut targets = Targets::default();
    let mut last_topic = None;
    let mut refused = BTreeMap::new();
    let mut since_confirm = 0u32;
    let mut retry = tokio::time::interval(CONFIRM_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(EVENT_BATCH_MAX);
    // Handled, to be settled (bounded by the batch).
    let mut handled: Vec<MessageId> = Vec::with_capacity(EVENT_BATCH_MAX);
    'batches: loop {
        let received = tokio::select! {
            biased;
            () = &mut stopping => break,
            received = events.recv_many_unsettled(&mut batch, EVENT_BATCH_MAX) => received,
            _ = retry.tick() => {
                send_confirms(&shared, &mut chains, &mut refused);
                continue;
            }
        };
        if received == 0 {
            break; // the node shut down
        }
        streams.now_unix_ms = shared.now_unix_ms();
        for message in batch.drain(..) {
            let id = message.header.id;
            let from = message.header.id.producer;
            let mut settling = Settling {
                inbox: &events,
                id,
                settler: None,
            };
            // One event, or a run of them (one link message for many events to this hop): the
            // message settles once every event in it is handled.
            // A bad event, or a run longer than any this version sends, drops the rest of the
            // message (logged and counted once): what was dropped is not confirmed, so a
            // publisher that sent it in good faith repairs it.
            for (index, event) in gossip::run_events(&message.body).enumerate() {
                if index == gossip::RUN_EVENTS_MAX {
                    shared.metrics.protocol_error();
                    warn!(peer = %from.short(), "run of more than {} events: the rest dropped", gossip::RUN_EVENTS_MAX);
                    break;
                }
                let decoded = event.and_then(|event| {
                    Event::decode_after(&event, &from, &shared.id, &mut last_topic)
                });
                let event = match decoded {
                    Ok(event)
                        if event.seq == 0
                            || event.route.first().is_some_and(|hop| hop.node == shared.id) =>
                    {
                        event
                    }
                    Ok(_) => {
                        shared.metrics.protocol_error();
                        warn!(peer = %from.short(), "event routed to another node: dropped with the rest of its message");
                        break;
                    }
                    Err(e) => {
                        shared.metrics.protocol_error();
                        warn!(peer = %from.short(), error = %e, "malformed event: dropped with the rest of its message");
                        break;
                    }
                };
                {
                    let mut work = std::pin::pin!(take_event(
                        &shared,
                        &mut chains,
                        &mut streams,
                        &mut targets,
                        event,
                        &mut settling
                    ));
                    let finished = std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(
                            std::future::Future::poll(work.as_mut(), cx).is_ready(),
                        )
                    })
                    .await;
                    if !finished {
                        // About to wait: what was handled before is settled now, not after the wait.
                        events.settle_ids(&mut handled);
                        tokio::select! {
                            biased;
                            // Not relayed or delivered everywhere: never settled, so the sender
                            // keeps it (a run with it: its events handled before come again only
                            // if this node, stopping now, gets the run again).
                            () = &mut stopping => break 'batches,
                            () = work => {}
                        }
                    }
                }
                since_confirm += 1;
                if since_confirm >= CONFIRM_EVERY {
                    since_confirm = 0;
                    send_confirms(&shared, &mut chains, &mut refused);
                }
            }
            match settling.settler {
                Some(settler) => settler.release(),
                None => handled.push(id),
            }
        }
        events.settle_ids(&mut handled);
        if events.is_empty() {
            since_confirm = 0;
            send_confirms(&shared, &mut chains, &mut refused);
        }
    }
    // Handled before the stop: settled (acknowledged by the peers' last writes).
    events.settle_ids(&mut handled);
}

/// A subscriber's confirmation: retention may shrink, and publishers waiting for room go on.
pub(crate) fn handle_confirm(shared: &Arc<Shared>, message: &Message) {
    let from = message.header.id.producer;
    let confirm = match Confirm::decode(&message.body) {
        Ok(confirm) => confirm,
        Err(e) => {
            shared.metrics.protocol_error();
            warn!(peer = %from.short(), error = %e, "malformed event confirmation dropped");
            return;
        }
    };
    if confirm.incarnation != shared.epoch {
        return; // for an earlier start of this node
    }
    let now = shared.now_unix_ms();
    if shared
        .patterns
        .lock()
        .publisher
        .confirm(&from, confirm, now)
    {
        shared.patterns.retention_freed.notify_waiters();
    }
}

/// Hands the addressees that stalled (or, with `force`, that hold the oldest retained event)
/// everything they did not confirm, over their direct links, in a task of its own.
pub(crate) fn repair_stalled(shared: &Arc<Shared>, force: bool) {
    let now = shared.now_unix_ms();
    let repairs = {
        let mut state = shared.patterns.lock();
        let repairs = state
            .publisher
            .repairs(now, force, |node| is_connected(shared, node));
        record_retained(shared, &state.publisher);
        repairs
    };
    if repairs.is_empty() {
        return;
    }
    shared.patterns.retention_freed.notify_waiters();
    let span = tracing::info_span!("repair", node = %shared.id.short());
    tokio::spawn(send_repairs(Arc::clone(shared), repairs).instrument(span));
}

/// Sends each repair's events over the direct link to its subscriber, in order.
async fn send_repairs(shared: Arc<Shared>, repairs: Vec<gossip::Repair>) {
    for repair in repairs {
        send_repair(&shared, repair, false).await;
    }
}

/// Sends one repair's events over the direct link, in order (`direct`: to a node that became a
/// durable subscriber, flagged so).
async fn send_repair(shared: &Arc<Shared>, repair: gossip::Repair, direct: bool) {
    debug!(subscriber = %repair.to.short(), events = repair.events.len(), "repairing events over the direct link");
    for (seq, topic, payload, prev, options) in repair.events {
        let event = Event {
            origin: shared.id,
            incarnation: shared.epoch,
            seq,
            hops: 1,
            route: vec![Hop {
                node: repair.to,
                prev,
            }],
            direct,
            durable: Vec::new(),
            topic,
            payload,
            options,
        };
        match send_event(shared, &event).await {
            Ok(_receipt) => {
                shared
                    .metrics
                    .events_repaired
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(subscriber = %repair.to.short(), seq, error = %e, "event repair not sent");
                break;
            }
        }
    }
}

pub(crate) async fn publish(
    shared: &Arc<Shared>,
    topic: &str,
    payload: Bytes,
    options: Option<&EventOptions>,
) -> Result<Published, PublishError> {
    let topic = shared.patterns.topic(topic)?;
    let options_len = options.map_or(0, EventOptions::encoded_len);
    let patterns = &shared.patterns;
    // With durable subscribers about, events are numbered and sent directly in one order: a
    // restarted durable subscriber starts its chain at the first direct event it gets, so an
    // earlier one must not come after it on the link.
    let has_durable = patterns.lock().table.registry_len() > 0;
    let _direct_order = match has_durable {
        true => Some(patterns.direct_order.lock().await),
        false => None,
    };
    let fanout = loop {
        let room = patterns.retention_freed.notified();
        {
            let mut state = patterns.lock();
            if state.publisher.has_room() {
                let addressees = state.table.addressees_cached(&topic);
                // The longest route a first hop can get, and the most names a direct event
                // carries: checked before the event is numbered, so a refused event leaves no
                // gap in anyone's chain.
                let longest = addressees
                    .len()
                    .div_ceil(shared.config.patterns.gossip_fanout.max(1));
                let size = addressees
                    .iter()
                    .map(|a| gossip::overhead(&topic, 1, &a.durable))
                    .fold(gossip::overhead(&topic, longest, &[]), usize::max)
                    + options_len
                    + payload.len();
                if !addressees.is_empty() {
                    check_event_size(shared, size)?;
                }
                let now = shared.now_unix_ms();
                let fanout =
                    state
                        .publisher
                        .publish_with(&addressees, &topic, &payload, options, now);
                record_retained(shared, &state.publisher);
                break fanout;
            }
        }
        repair_stalled(shared, true);
        tokio::select! {
            () = room => {}
            () = super::Patterns::stopping(shared) => {
                return Err(PublishError::Send(SendError::NodeClosed));
            }
        }
    };
    // What a node that just became direct was owed from the trees, in order, before this.
    for repair in fanout.repairs {
        send_repair(shared, repair, true).await;
    }
    let addressed: usize = fanout.routes.hops().len() + fanout.direct.len();
    let mut receipts = Vec::with_capacity(fanout.routes.len() + fanout.direct.len());
    let sent = |result: Result<Receipt, SendError>,
                peer: NodeId,
                receipts: &mut Vec<Receipt>|
     -> Result<(), PublishError> {
        match result {
            Ok(receipt) => {
                receipts.push(receipt);
                Ok(())
            }
            Err(error) if receipts.is_empty() => Err(error.into()),
            Err(error) => Err(PublishError::Partial {
                sent: receipts.len(),
                peer,
                error,
            }),
        }
    };
    for (hop, durable) in fanout.direct {
        let event = Event {
            origin: shared.id,
            incarnation: shared.epoch,
            seq: fanout.seq,
            hops: 1,
            route: vec![hop],
            direct: true,
            durable,
            topic: topic.clone(),
            payload: payload.clone(),
            options: options.map(|o| Box::new(o.clone())),
        };
        let result = send_direct(shared, &event).await;
        sent(result, hop.node, &mut receipts)?;
    }
    let own = gossip::OwnEvent::new(shared.epoch, fanout.seq, &topic, options, &payload);
    let priority = priority_of(options);
    // Each copy is written here and copied into its hop's run: no allocation per copy.
    let mut copy = Vec::new();
    for route in fanout.routes.iter() {
        let peer = route[0].node;
        own.encode_into(route, &mut copy);
        // Joins the run of events waiting for this hop, if one does (see `send_event`).
        let result = match shared.sender(peer) {
            Ok(sender) => sender.send_event(&copy, priority).await,
            Err(error) => Err(error),
        };
        sent(result, peer, &mut receipts)?;
    }
    let local = if patterns.lock().table.subscribed_here(&topic) {
        let mut message =
            event_message(shared, shared.id, shared.epoch, fanout.seq, &topic, payload);
        match dress(shared, &mut message, options, shared.now_unix_ms()) {
            true => deliver_locally(shared, &topic, message, &[], None).await,
            false => 0,
        }
    } else {
        0
    };
    Ok(Published {
        relayed: addressed - receipts.len(),
        receipts,
        local,
        scheduled: None,
    })
}

/// Events of one batch numbered under one hold of the patterns lock (bounded: the copies wait
/// in memory until they are handed to the links).
const PUBLISH_BATCH_RUN_MAX: usize = 1024;

/// Publishes `payloads` on `topic`, in order: the same guarantees as one [`publish`] per
/// payload, at a fraction of the cost. A run of events is numbered under one hold of the
/// patterns lock (one interest lookup, room for the run in retention), and each first hop gets
/// the run's copies as one [`crate::PeerSender::send_batch`] (one reservation of its queue).
/// With durable subscribers about, events go one by one through [`publish`] (each direct event
/// names the durable subscriptions it is owed to, and is recorded against them).
pub(crate) async fn publish_batch(
    shared: &Arc<Shared>,
    topic: &str,
    payloads: Vec<Bytes>,
    options: Option<&crate::MessageOptions>,
) -> Result<PublishedBatch, PublishBatchError> {
    let mut done = PublishedBatch::default();
    // Event `index` of the batch, published at `now`: its options (the key names its place).
    let options_of =
        |now: u64, index: usize| options.and_then(|o| o.event_options(now, Some(index)));
    let topic = match shared.patterns.topic(topic) {
        Ok(topic) => topic,
        Err(error) => {
            return Err(PublishBatchError {
                published: 0,
                error: error.into(),
                done,
            })
        }
    };
    let patterns = &shared.patterns;
    let mut payloads = payloads.into_iter().peekable();
    while payloads.peek().is_some() {
        let mut runs: BTreeMap<NodeId, Vec<OutgoingMessage>> = BTreeMap::new();
        let mut local = Vec::new();
        let mut relayed = 0;
        let mut refused = None;
        // Registered before the look at retention, so a confirmation in between is not missed.
        let room = patterns.retention_freed.notified();
        let full;
        let numbered = {
            let mut state = patterns.lock();
            full = !state.publisher.has_room();
            let one_by_one = state.table.registry_len() > 0 || full;
            let mut numbered = 0;
            if !one_by_one {
                let addressees = state.table.addressees_cached(&topic);
                let here = state.table.subscribed_here(&topic);
                let longest = addressees
                    .len()
                    .div_ceil(shared.config.patterns.gossip_fanout.max(1));
                let overhead = gossip::overhead(&topic, longest, &[]);
                let now = shared.now_unix_ms();
                // (Every event's options have the same size but for the key's index.)
                let options_len = options_of(now, usize::MAX)
                    .as_ref()
                    .map_or(0, EventOptions::encoded_len);
                let overhead = overhead + options_len;
                while numbered < PUBLISH_BATCH_RUN_MAX && state.publisher.has_room() {
                    let Some(payload) = payloads.next_if(|payload| {
                        addressees.is_empty()
                            || check_event_size(shared, overhead + payload.len()).is_ok()
                    }) else {
                        break;
                    };
                    let event_options = options_of(now, done.events + numbered);
                    let event_options = event_options.as_ref();
                    let fanout = state.publisher.publish_with(
                        &addressees,
                        &topic,
                        &payload,
                        event_options,
                        now,
                    );
                    debug_assert!(fanout.direct.is_empty() && fanout.repairs.is_empty());
                    for (route, message) in tree_messages(
                        shared,
                        fanout.seq,
                        &fanout.routes,
                        &topic,
                        event_options,
                        &payload,
                    ) {
                        relayed += route.len() - 1;
                        runs.entry(route[0].node).or_default().push(message);
                    }
                    if here {
                        local.push((fanout.seq, payload, event_options.cloned()));
                    }
                    numbered += 1;
                }
                record_retained(shared, &state.publisher);
                if numbered < PUBLISH_BATCH_RUN_MAX && state.publisher.has_room() {
                    // Stopped at an event too large for the links.
                    if let Some(payload) = payloads.peek() {
                        refused = check_event_size(shared, overhead + payload.len()).err();
                    }
                }
            }
            numbered
        };
        if full {
            // Retention is full: the subscribers are behind (a batch outruns them easily).
            // Wait for their confirmations to make room (backpressure) while they make
            // progress — the control task repairs those that make none for
            // `event_repair_after` — and only after that long without room go the way of a
            // single `publish`, which hands the slowest over to their direct links at once.
            // (Handing over subscribers that merely lag sends them everything unconfirmed a
            // second time.)
            tokio::select! {
                () = room => continue,
                () = tokio::time::sleep(shared.config.patterns.event_repair_after) => {}
                () = super::Patterns::stopping(shared) => {
                    return Err(PublishBatchError {
                        published: done.events,
                        error: PublishError::Send(crate::error::SendError::NodeClosed),
                        done,
                    });
                }
            }
        }
        if numbered == 0 && refused.is_none() {
            // Durable subscribers, or retention full for long (waits there for room).
            let payload = payloads.next().expect("peeked");
            let event_options = options_of(shared.now_unix_ms(), done.events);
            match publish(shared, topic.as_str(), payload, event_options.as_ref()).await {
                Ok(published) => done.absorb(published),
                Err(error) => {
                    return Err(PublishBatchError {
                        published: done.events,
                        error,
                        done,
                    })
                }
            }
            continue;
        }
        // Every first hop gets the run, even after one failed (fewer repairs).
        let mut reached = 0;
        let mut failed = None;
        for (peer, messages) in runs {
            let sent = match shared.sender(peer) {
                Ok(sender) => sender.send_batch(messages).await,
                Err(error) => Err(crate::error::SendBatchError::Invalid { index: 0, error }),
            };
            let error = match sent {
                Ok(receipts) => {
                    done.absorb_receipts(peer, receipts);
                    reached += 1;
                    continue;
                }
                Err(crate::error::SendBatchError::Invalid { error, .. }) => error,
                Err(crate::error::SendBatchError::Partial {
                    receipts, error, ..
                }) => {
                    done.absorb_receipts(peer, receipts);
                    error
                }
            };
            failed.get_or_insert((peer, error));
        }
        if let Some((peer, error)) = failed {
            // The publisher's retention repairs the first hops that missed events of this run,
            // as after a partial `publish`.
            let error = match reached {
                0 => PublishError::Send(error),
                sent => PublishError::Partial { sent, peer, error },
            };
            return Err(PublishBatchError {
                published: done.events,
                error,
                done,
            });
        }
        for (seq, payload, event_options) in local {
            let mut message = event_message(shared, shared.id, shared.epoch, seq, &topic, payload);
            let now = shared.now_unix_ms();
            if dress(shared, &mut message, event_options.as_ref(), now) {
                done.local += deliver_locally(shared, &topic, message, &[], None).await;
            }
        }
        done.relayed += relayed;
        done.events += numbered;
        if let Some(error) = refused {
            return Err(PublishBatchError {
                published: done.events,
                error: error.into(),
                done,
            });
        }
    }
    Ok(done)
}

/// Sends a direct event to a durable subscriber's node. One owed to durable subscriptions
/// expires after `durable_retention_age` and is counted against their budget
/// (`durable_retention_max`): beyond it, the oldest is given up (dead-lettered).
async fn send_direct(shared: &Arc<Shared>, event: &Event) -> Result<Receipt, SendError> {
    let to = event.route[0].node;
    let now = shared.now_unix_ms();
    let mut outgoing =
        event_link_message(shared, event.encode(&shared.id), event.options.as_deref());
    if !event.durable.is_empty() {
        let age = shared.config.patterns.durable_retention_age.as_millis() as u64;
        outgoing = outgoing.with_expiry(now.saturating_add(age));
    }
    let receipt = shared.sender(to)?.send_message(outgoing).await?;
    if !event.durable.is_empty() {
        owe(shared, to, receipt.id().seq, &event.durable);
    }
    Ok(receipt)
}

/// Records an event owed to `node`'s durable subscriptions `names` under link seq `seq`, and
/// gives up in the link what no subscription keeps any more (over budget).
fn owe(shared: &Arc<Shared>, node: NodeId, seq: u64, names: &[String]) {
    let given_up = {
        let mut state = shared.patterns.lock();
        if let Some(acked) = acked_up_to(shared, &node) {
            state.owed.acked(&node, acked);
        }
        let given_up = state.owed.record(node, seq, names);
        record_owed(shared, &state);
        given_up
    };
    if given_up.is_empty() {
        return;
    }
    debug!(subscriber = %node.short(), events = given_up.len(), "durable retention full: oldest owed events given up");
    if let Ok(handle) = shared.peer(node) {
        let _ = handle.control.send(crate::handle::Control::GiveUp {
            seqs: given_up,
            reason: weft_proto::link::GiveUp::Retention,
        });
    }
}

/// What `node`'s link acknowledged so far.
fn acked_up_to(shared: &Shared, node: &NodeId) -> Option<u64> {
    let peers = shared.peers.read().expect("peers lock poisoned");
    peers
        .get(node)
        .map(|handle| *handle.progress.acked.borrow())
}

/// Takes the links' acknowledgements into the owed ledger (the control tick).
pub(crate) fn refresh_owed(shared: &Arc<Shared>) {
    let nodes = shared.patterns.lock().owed.nodes();
    let acked: Vec<(NodeId, u64)> = nodes
        .into_iter()
        .filter_map(|node| acked_up_to(shared, &node).map(|a| (node, a)))
        .collect();
    let mut state = shared.patterns.lock();
    for (node, up_to) in acked {
        state.owed.acked(&node, up_to);
    }
    record_owed(shared, &state);
}

/// Updates the durable subscription gauges.
pub(crate) fn record_owed(shared: &Shared, state: &super::State) {
    shared
        .metrics
        .durable_events_owed
        .store(state.owed.total() as u64, Ordering::Relaxed);
    shared
        .metrics
        .durable_subscriptions
        .store(state.table.registry_len() as u64, Ordering::Relaxed);
}

fn record_retained(shared: &Shared, publisher: &gossip::Publisher) {
    shared
        .metrics
        .events_retained
        .store(publisher.retained() as u64, Ordering::Relaxed);
}

/// Refuses an event body of `size` bytes that the link limits would refuse.
fn check_event_size(shared: &Shared, size: usize) -> Result<(), SendError> {
    let max = shared.config.limits().max_body_bytes;
    if size > max {
        return Err(weft_proto::frame::EncodeError::BodyTooLarge { len: size, max }.into());
    }
    Ok(())
}

/// Best effort: volatile to every connected subscriber whose queue has room; the rest are
/// dropped and counted. Returns how many subscribers (remote and local) got it.
pub(crate) fn publish_best_effort(
    shared: &Arc<Shared>,
    topic: &str,
    payload: Bytes,
) -> Result<usize, PublishError> {
    let topic = shared.patterns.topic(topic)?;
    let body = gossip::encode_parts(
        &shared.id,
        &shared.id,
        shared.epoch,
        0,
        1,
        &[],
        None,
        &topic,
        None,
        &payload,
    );
    let outgoing = crate::node::event_message(body, Priority::NORMAL, shared.now_unix_ms());
    outgoing
        .check(&shared.config.limits())
        .map_err(SendError::from)?;
    let subscribers = shared.patterns.lock().table.subscribers(&topic);
    let mut sent = 0;
    for peer in subscribers {
        let result = shared
            .sender(peer)
            .map_err(TrySendError::from)
            .and_then(|sender| sender.try_send_volatile(outgoing.clone()));
        match result {
            Ok(()) => sent += 1,
            Err(_) => {
                shared
                    .metrics
                    .events_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if shared.patterns.lock().table.subscribed_here(&topic) {
        let seq = shared.patterns.local_events.fetch_add(1, Ordering::Relaxed) + 1;
        let message = event_message(shared, shared.id, shared.epoch, seq, &topic, payload);
        let targets: Vec<_> = {
            let state = shared.patterns.lock();
            state
                .subscriptions
                .iter()
                .filter(|s| s.pattern.matches(&topic))
                .map(|s| (s.tx.clone(), Arc::clone(&s.dropped)))
                .collect()
        };
        for (tx, dropped) in targets {
            let delivery = Delivery {
                message: message.clone(),
                settler: None,
            };
            if tx.try_send(delivery).is_ok() {
                sent += 1;
            } else {
                dropped.fetch_add(1, Ordering::Relaxed);
                shared
                    .metrics
                    .events_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(sent)
}
