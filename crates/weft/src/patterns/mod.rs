//! The messaging patterns on top of the links: publish/subscribe and request/response
//! (with scatter-gather). The decisions — who is interested in what, whether a request was
//! answered before — are the sans-IO core's ([`weft_proto::interest`], [`weft_proto::envelope`]);
//! this module carries them out with the node's own channels and tasks.
//!
//! ```text
//! $weft/interest  volatile   announcements of subscriptions and services, and their acks
//! $weft/ev        sequenced  events (`weft_proto::gossip::Event`): to each peer whose pattern
//!                            matches, over a relay tree when they are many (acknowledged per
//!                            hop, spooled with a data directory, retried; chained per
//!                            subscriber); volatile for best-effort events
//! $weft/evc       volatile   confirmations: the last event a subscriber delivered, per publisher
//! $weft/req       volatile   requests: [service][payload], correlation id, reply address
//! $weft/rep       volatile   replies: [status][payload], correlation id
//! $weft/queue/Q   sequenced  work items of queue Q, to one worker with credit (see `work`)
//! ```
//! Four tasks serve these channels, so that a full subscription queue (which makes the event
//! task wait: backpressure to the publishers) never delays interest or replies.

pub(crate) mod later;
mod pubsub;
mod reqrep;
mod work;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, warn, Instrument};
use weft_proto::envelope::{ReplyCache, ReplyStatus};
use weft_proto::interest::{InterestMessage, InterestTable};
use weft_proto::{Kind, Message, NodeId, OutgoingMessage, Topic, TopicError, TopicPattern};

use crate::inbox::Inbox;
use crate::node::{PeerEvent, Shared};

pub use pubsub::{
    PublishBatchError, PublishError, Published, PublishedBatch, SubscribeError, SubscribeOptions,
    Subscription,
};
use reqrep::Answer;
pub use reqrep::{Gathered, Request, RequestBuilder, RequestError, ScatterBuilder, Service};
pub use work::{redelivery_of, PullOptions, Puller, WorkError, REDELIVERY_HEADER};

/// Channel of interest announcements.
pub(crate) const INTEREST_CHANNEL: &str = weft_proto::channel::mesh::INTEREST;
/// Channel of events.
pub(crate) const EVENT_CHANNEL: &str = weft_proto::channel::mesh::EVENT;
/// Channel of subscribers' confirmations of events.
pub(crate) const CONFIRM_CHANNEL: &str = weft_proto::channel::mesh::CONFIRM;
/// Channel of requests.
pub(crate) const REQUEST_CHANNEL: &str = weft_proto::channel::mesh::REQUEST;
/// Channel of replies.
pub(crate) const REPLY_CHANNEL: &str = weft_proto::channel::mesh::REPLY;

/// How often announcements and acks that found a full peer queue are retried, and leases of
/// disconnected peers are checked.
const TICK: Duration = Duration::from_millis(100);

/// A local subscription.
struct LocalSubscription {
    id: u64,
    pattern: TopicPattern,
    tx: mpsc::Sender<pubsub::Delivery>,
    best_effort: bool,
    dropped: Arc<AtomicU64>,
    /// The name of a durable subscription.
    durable: Option<String>,
}

/// The queue of a local durable subscription: it outlives its `Subscription`, so events owed
/// to it wait here (unsettled: their publishers keep them) while nobody is attached — after a
/// restart, until the application subscribes again under the name.
struct DurableSlot {
    tx: mpsc::Sender<pubsub::Delivery>,
    /// `None` while a `Subscription` holds the receiver.
    rx: Option<mpsc::Receiver<pubsub::Delivery>>,
    /// The id of the `Subscription` attached now.
    attached: Option<u64>,
}

impl DurableSlot {
    fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        Self {
            tx,
            rx: Some(rx),
            attached: None,
        }
    }
}

/// Where a reply goes.
enum Waiting {
    /// One request: the first reply.
    One(oneshot::Sender<Answer>),
    /// Scatter-gather: every reply until the gatherer stops.
    Many(mpsc::UnboundedSender<Answer>),
}

pub(crate) struct State {
    table: InterestTable,
    subscriptions: Vec<LocalSubscription>,
    services: BTreeMap<String, mpsc::Sender<Request>>,
    waiting: HashMap<u64, Waiting>,
    replies: ReplyCache,
    next_subscription: u64,
    /// Peers owed our announcement (their queue was full when we tried).
    announce_due: BTreeSet<NodeId>,
    /// Acks owed to peers (their queue was full when we tried): (incarnation, version).
    acks_due: BTreeMap<NodeId, (u64, u64)>,
    /// Round-robin position for choosing a server.
    next_server: usize,
    /// This node as a work-queue producer: credit used per worker, shard keys' owners and
    /// barriers, stuck workers (the decisions; `work` carries them out).
    work: weft_proto::work::Producer,
    /// This node as a publisher: event sequence, chains per subscriber, retention.
    publisher: weft_proto::gossip::Publisher,
    /// Local durable subscriptions' queues, by name (bounded by
    /// `interest::DURABLE_ENDED_MAX`).
    durable_slots: BTreeMap<String, DurableSlot>,
    /// Per local durable subscription, the publishers that sent an event owed to it since
    /// this start: they have it in their registries (see `Patterns::in_effect`). Bounded by
    /// the slots times `NodeConfig::peers_max`.
    durable_known: BTreeMap<String, BTreeSet<NodeId>>,
    /// Local durable subscriptions every connected peer confirmed, with their patterns
    /// (persisted: see `pubsub::DurableState`).
    durable_confirmed: BTreeMap<String, TopicPattern>,
    /// This node as a publisher: events owed to durable subscriptions, per subscriber.
    owed: weft_proto::owed::OwedEvents,
    /// Set by [`Patterns::close`] (the node shut down): the queues above are gone, and no
    /// subscription, service or waiting request is taken any more.
    closed: bool,
}

/// The node's pattern state, shared by its API and its pattern tasks.
pub(crate) struct Patterns {
    state: Mutex<State>,
    /// Bumped whenever the interest table changes (peers' interest, acks, connections).
    changed: watch::Sender<u64>,
    /// Tells the control task to announce the local interest to every connected peer.
    announce: mpsc::UnboundedSender<()>,
    announce_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    /// Stops the pattern tasks ahead of the peers (see [`Patterns::stop`]).
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Sequence of best-effort events published to local subscriptions (their message ids).
    local_events: AtomicU64,
    /// Signalled when the publisher's retention shrank (publishers wait for room).
    retention_freed: tokio::sync::Notify,
    /// Held from numbering an event to sending its direct copies while durable subscribers
    /// are about (see `pubsub::publish`).
    direct_order: tokio::sync::Mutex<()>,
    /// Bumped, under the state's lock, whenever `State::subscriptions` changes (the event
    /// task's cached targets are stale then).
    subscriptions_changed: AtomicU64,
    /// The topic published last, checked: a publisher mostly publishes on one topic at a time,
    /// and checking it again per event cost more than numbering it.
    last_topic: Mutex<Option<Topic>>,
}

impl Patterns {
    pub(crate) fn new(id: NodeId, incarnation: u64, config: &crate::config::PatternConfig) -> Self {
        let (announce, announce_rx) = mpsc::unbounded_channel();
        Self {
            state: Mutex::new(State {
                table: InterestTable::new(incarnation, config.interest_lease.as_millis() as u64),
                subscriptions: Vec::new(),
                services: BTreeMap::new(),
                waiting: HashMap::new(),
                replies: ReplyCache::new(
                    config.reply_cache_max,
                    config.reply_cache_age.as_millis() as u64,
                ),
                next_subscription: 1,
                announce_due: BTreeSet::new(),
                acks_due: BTreeMap::new(),
                next_server: 0,
                work: weft_proto::work::Producer::default(),
                publisher: weft_proto::gossip::Publisher::new(
                    id,
                    weft_proto::gossip::PublisherConfig {
                        fanout: config.gossip_fanout,
                        retained_max: config.event_retention_max,
                        retained_bytes_max: config.event_retention_bytes_max,
                        repair_after_ms: config.event_repair_after.as_millis() as u64,
                        chains_max: pubsub::PUBLISHER_CHAINS_MAX,
                    },
                ),
                durable_slots: BTreeMap::new(),
                durable_known: BTreeMap::new(),
                durable_confirmed: BTreeMap::new(),
                owed: weft_proto::owed::OwedEvents::new(config.durable_retention_max),
                closed: false,
            }),
            changed: watch::channel(0).0,
            announce,
            announce_rx: Mutex::new(Some(announce_rx)),
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            local_events: AtomicU64::new(0),
            retention_freed: tokio::sync::Notify::new(),
            direct_order: tokio::sync::Mutex::new(()),
            subscriptions_changed: AtomicU64::new(0),
            last_topic: Mutex::new(None),
        }
    }

    /// `name` as a checked topic (the last one is remembered: see `Patterns::last_topic`).
    fn topic(&self, name: &str) -> Result<Topic, TopicError> {
        let mut last = self
            .last_topic
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(topic) = last.as_ref().filter(|t| t.as_str() == name) {
            return Ok(topic.clone());
        }
        let topic = Topic::new(name)?;
        *last = Some(topic.clone());
        Ok(topic)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("patterns lock poisoned")
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Stops the pattern tasks and waits for them. A clean shutdown does this before it stops
    /// the peers, so that the events and requests the tasks took are settled (and acknowledged
    /// by the peers' last writes) instead of being sent again to a node that handled them.
    pub(crate) async fn stop(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("patterns lock poisoned"));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Drops every queue sender the pattern state holds — local subscriptions' (durable ones'
    /// too, with the events waiting for a detached one), services' — and the requests waiting
    /// for replies, and refuses new ones: the application's [`Subscription`]s and [`Service`]s
    /// end (`recv` returns `None` once their queues are empty), and its requests fail with
    /// [`RequestError::NodeClosed`], whoever still holds the node. The node's shutdown calls
    /// this once its tasks are stopped (they hold clones of these senders while they run).
    pub(crate) fn close(&self) {
        let dropped = {
            let mut state = self.lock();
            state.closed = true;
            self.subscriptions_changed
                .fetch_add(1, std::sync::atomic::Ordering::Release);
            (
                std::mem::take(&mut state.subscriptions),
                std::mem::take(&mut state.services),
                std::mem::take(&mut state.durable_slots),
                std::mem::take(&mut state.waiting),
            )
        };
        // Dropped outside the lock (queued events and requests have destructors of their own).
        drop(dropped);
    }

    /// Resolves once the pattern tasks are to stop (the node's shutdown, or [`Patterns::stop`]).
    pub(crate) async fn stopping(shared: &Shared) {
        let mut node = shared.shutdown.subscribe();
        let mut patterns = shared.patterns.stop.subscribe();
        tokio::select! {
            _ = node.wait_for(|stop| *stop) => {}
            _ = patterns.wait_for(|stop| *stop) => {}
        }
    }

    /// Announces the local interest (its `version`) and waits, up to `subscribe_timeout`, until
    /// every connected peer acknowledged it: a new service or pull is in effect.
    async fn announce_and_confirm(&self, shared: &Shared, version: u64) -> Result<(), Vec<NodeId>> {
        let _ = self.announce.send(());
        self.in_effect(
            shared,
            version,
            shared.config.patterns.subscribe_timeout,
            None,
        )
        .await
    }

    /// Waits until every connected peer acknowledged `version` of the local interest. The
    /// connections are the node's own view (not the table's, which learns of new connections
    /// a moment later), so a peer that just connected is waited for too.
    ///
    /// For the durable subscription `durable`, a peer that sent an event owed to it since this
    /// start has it in its registry already, and counts as confirmed: after a restart, events
    /// owed to the subscription may fill its queue before the application subscribes again, and
    /// then the peer's acknowledgement waits behind them on the connection (the links stop
    /// reading), which would wait for this subscription.
    async fn in_effect(
        &self,
        shared: &Shared,
        version: u64,
        timeout: Duration,
        durable: Option<&str>,
    ) -> Result<(), Vec<NodeId>> {
        let mut changed = self.changed.subscribe();
        let waiting = || {
            let connected = connected_peers(shared);
            let state = self.lock();
            let known = durable.and_then(|name| state.durable_known.get(name));
            connected
                .into_iter()
                .filter(|peer| state.table.acknowledged_by(peer) < version)
                .filter(|peer| !known.is_some_and(|known| known.contains(peer)))
                .collect::<Vec<_>>()
        };
        let wait = async {
            loop {
                if waiting().is_empty() {
                    return;
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(()) => Ok(()),
            Err(_) => Err(waiting()),
        }
    }
}

/// Takes the node's pattern channels and starts the tasks serving them.
pub(crate) fn start(shared: &Arc<Shared>) -> Result<(), crate::error::ReceiveError> {
    work::restore(shared);
    pubsub::restore(shared);
    let interest = shared.channels.take_receiver(INTEREST_CHANNEL)?;
    let events = shared.channels.take_receiver(EVENT_CHANNEL)?;
    let confirms = shared.channels.take_receiver(CONFIRM_CHANNEL)?;
    let requests = shared.channels.take_receiver(REQUEST_CHANNEL)?;
    let replies = shared.channels.take_receiver(REPLY_CHANNEL)?;
    let announce = shared
        .patterns
        .announce_rx
        .lock()
        .expect("patterns lock poisoned")
        .take()
        .expect("pattern tasks start once");
    let span = tracing::info_span!(parent: None, "patterns", node = %shared.id.short());
    let tasks = [
        tokio::spawn(
            control_task(Arc::clone(shared), interest, confirms, announce).instrument(span.clone()),
        ),
        tokio::spawn(pubsub::event_task(Arc::clone(shared), events).instrument(span.clone())),
        tokio::spawn(reqrep::request_task(Arc::clone(shared), requests).instrument(span.clone())),
        tokio::spawn(reqrep::reply_task(Arc::clone(shared), replies).instrument(span)),
    ];
    shared
        .patterns
        .tasks
        .lock()
        .expect("patterns lock poisoned")
        .extend(tasks);
    Ok(())
}

/// A volatile message on one of the pattern channels.
fn control_message(
    shared: &Shared,
    channel: &'static str,
    kind: Kind,
    body: Bytes,
) -> OutgoingMessage {
    OutgoingMessage::command(
        weft_proto::Channel::from_static(channel),
        body,
        shared.now_unix_ms(),
    )
    .with_kind(kind)
}

/// Sends a volatile message without waiting; false if the peer's queue is full (try later).
/// A peer that is not connected needs nothing: it gets everything again on its next connection.
fn try_volatile(shared: &Arc<Shared>, peer: NodeId, message: OutgoingMessage) -> bool {
    use crate::error::{SendError, TrySendError};
    let sender = match shared.sender(peer) {
        Ok(sender) => sender,
        Err(_) => return true,
    };
    match sender.try_send_volatile(message) {
        Ok(()) | Err(TrySendError::Send(SendError::NotConnected(_))) => true,
        Err(TrySendError::WouldBlock) => false,
        Err(e) => {
            debug!(peer = %peer.short(), error = %e, "volatile message not sent");
            true
        }
    }
}

fn announce_to(shared: &Arc<Shared>, peers: impl IntoIterator<Item = NodeId>) {
    let announcement = shared.patterns.lock().table.announcement();
    let body = Bytes::from(InterestMessage::Announce(announcement).encode());
    for peer in peers {
        let message = control_message(shared, INTEREST_CHANNEL, Kind::Document, body.clone());
        if !try_volatile(shared, peer, message) {
            shared.patterns.lock().announce_due.insert(peer);
        }
    }
}

fn ack_to(shared: &Arc<Shared>, peer: NodeId, incarnation: u64, version: u64) {
    let body = Bytes::from(
        InterestMessage::Ack {
            incarnation,
            version,
        }
        .encode(),
    );
    let message = control_message(shared, INTEREST_CHANNEL, Kind::Reply, body);
    if !try_volatile(shared, peer, message) {
        shared
            .patterns
            .lock()
            .acks_due
            .insert(peer, (incarnation, version));
    }
}

/// Interest: announcements in and out, acks, peers coming and going, leases.
async fn control_task(
    shared: Arc<Shared>,
    mut interest: Inbox,
    mut confirms: Inbox,
    mut announce: mpsc::UnboundedReceiver<()>,
) {
    let patterns = &shared.patterns;
    let mut peer_events = shared.events.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Peers connected before this task subscribed to events.
    let connected = connected_peers(&shared);
    {
        let mut state = patterns.lock();
        for peer in &connected {
            state.table.peer_connected(*peer);
        }
    }
    announce_to(&shared, connected);
    loop {
        tokio::select! {
            biased;
            () = Patterns::stopping(&shared) => break,
            event = peer_events.recv() => match event {
                Ok(PeerEvent::Up { peer, .. }) => {
                    patterns.lock().table.peer_connected(peer);
                    patterns.bump();
                    announce_to(&shared, [peer]);
                }
                Ok(PeerEvent::Down { peer, .. }) => {
                    let now = shared.now_unix_ms();
                    patterns.lock().table.peer_disconnected(peer, now);
                    patterns.bump();
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Missed ups and downs: take the connections as they are now.
                    warn!(missed, "peer events lagged; re-announcing to every connected peer");
                    let connected = connected_peers(&shared);
                    resync(&shared, &connected);
                    announce_to(&shared, connected);
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            Some(()) = announce.recv() => {
                while announce.try_recv().is_ok() {}
                announce_to(&shared, connected_peers(&shared));
            }
            message = interest.recv() => {
                let Some(message) = message else { break };
                handle_interest(&shared, message);
            }
            message = confirms.recv() => {
                let Some(message) = message else { break };
                pubsub::handle_confirm(&shared, &message);
            }
            _ = tick.tick() => {
                let (announce_due, acks_due) = {
                    let mut state = patterns.lock();
                    let expired = state.table.expire(shared.now_unix_ms());
                    if !expired.is_empty() {
                        debug!(peers = expired.len(), "interest of peers down past the lease forgotten");
                    }
                    (
                        std::mem::take(&mut state.announce_due),
                        std::mem::take(&mut state.acks_due),
                    )
                };
                if !announce_due.is_empty() {
                    announce_to(&shared, announce_due);
                }
                work::reassign_silent(&shared);
                work::redeliver_stuck(&shared);
                pubsub::repair_stalled(&shared, false);
                pubsub::refresh_owed(&shared);
                for (peer, (incarnation, version)) in acks_due {
                    ack_to(&shared, peer, incarnation, version);
                }
            }
        }
    }
}

fn connected_peers(shared: &Shared) -> Vec<NodeId> {
    let peers = shared.peers.read().expect("peers lock poisoned");
    peers
        .values()
        .filter(|h| *h.connected.borrow())
        .map(|h| h.id)
        .collect()
}

/// Brings the table's view of connections in line with `connected` (after missed events).
fn resync(shared: &Shared, connected: &[NodeId]) {
    let now = shared.now_unix_ms();
    let peers: Vec<(NodeId, bool)> = {
        let handles = shared.peers.read().expect("peers lock poisoned");
        handles
            .values()
            .map(|h| (h.id, connected.contains(&h.id)))
            .collect()
    };
    let mut state = shared.patterns.lock();
    for (peer, up) in peers {
        if up {
            state.table.peer_connected(peer);
        } else {
            state.table.peer_disconnected(peer, now);
        }
    }
    drop(state);
    shared.patterns.bump();
}

fn handle_interest(shared: &Arc<Shared>, message: Message) {
    let peer = message.header.id.producer;
    let decoded = InterestMessage::decode(&message.body);
    let patterns = &shared.patterns;
    match decoded {
        Ok(InterestMessage::Announce(announcement)) => {
            let (incarnation, version) = (announcement.incarnation, announcement.version);
            let (result, registry) = {
                let mut state = patterns.lock();
                let before = state.table.registry_version();
                let result = state.table.handle_announcement(peer, announcement);
                for (node, name) in state.table.take_ended() {
                    state.owed.forget(&node, &name);
                }
                let persisting = (state.table.registry_version() != before).then(|| {
                    pubsub::record_owed(shared, &state);
                    pubsub::persist_durable_state(shared, &state)
                });
                (result, persisting)
            };
            match result {
                Ok(changed) => {
                    if changed {
                        debug!(peer = %peer.short(), version, "peer interest changed");
                    }
                    patterns.bump();
                    match registry {
                        // A durable subscription is in effect here once the registry holding
                        // it is durable: acknowledged only then.
                        Some(persisting) => {
                            let shared = Arc::clone(shared);
                            tokio::spawn(async move {
                                pubsub::persisted(persisting).await;
                                ack_to(&shared, peer, incarnation, version);
                            });
                        }
                        None => ack_to(shared, peer, incarnation, version),
                    }
                }
                Err(e) => {
                    shared.metrics.protocol_error();
                    warn!(peer = %peer.short(), error = %e, "interest announcement refused");
                }
            }
        }
        Ok(InterestMessage::Ack {
            incarnation,
            version,
        }) => {
            patterns.lock().table.handle_ack(peer, incarnation, version);
            patterns.bump();
        }
        Err(e) => {
            shared.metrics.protocol_error();
            warn!(peer = %peer.short(), error = %e, "interest message refused");
        }
    }
}

/// A reply as the requester sees it.
pub(crate) fn reply_status_error(status: ReplyStatus, payload: &Bytes) -> Option<RequestError> {
    match status {
        ReplyStatus::Ok => None,
        ReplyStatus::NoService => Some(RequestError::NoResponders),
        ReplyStatus::Dropped => Some(RequestError::Dropped),
        ReplyStatus::Failed => Some(RequestError::Failed(
            String::from_utf8_lossy(payload).into_owned(),
        )),
        ReplyStatus::Repeated => Some(RequestError::Repeated),
    }
}

/// Waits for the next change of the pattern state; false once the node stops (a readiness wait
/// then ends: `Shared` may outlive the shutdown in other handles, and its watch with it).
async fn ready_changed(shared: &Shared, changed: &mut watch::Receiver<u64>) -> bool {
    tokio::select! {
        biased;
        () = Patterns::stopping(shared) => false,
        result = changed.changed() => result.is_ok(),
    }
}

impl crate::Node {
    /// Subscribes to the events whose topic matches `pattern` (`*` one segment, `**` the rest).
    /// Returns once every connected peer confirmed the subscription: from then on, every event
    /// they publish on a matching topic reaches it (no slow-joiner loss). Reliable: a full
    /// subscription makes the publishers wait.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, SubscribeError> {
        pubsub::subscribe(self.shared(), pattern, SubscribeOptions::default()).await
    }

    /// [`Node::subscribe`](crate::Node::subscribe) with options (e.g. best effort for telemetry, or durable).
    pub async fn subscribe_with(
        &self,
        pattern: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubscribeError> {
        pubsub::subscribe(self.shared(), pattern, options).await
    }

    /// A durable subscription named `name` (see [`SubscribeOptions::durable`]): publishers keep
    /// what matches `pattern` for it while it is away — across disconnections and restarts of
    /// this node and of theirs (with data directories) — within its retention budget, and it
    /// receives what it missed, once and in order per publisher, when it subscribes again under
    /// the same name. Ended only by [`Subscription::unsubscribe`] or
    /// [`Node::unsubscribe_durable`](crate::Node::unsubscribe_durable); dropping the `Subscription` only detaches from it.
    pub async fn subscribe_durable(
        &self,
        name: &str,
        pattern: &str,
    ) -> Result<Subscription, SubscribeError> {
        let options = SubscribeOptions {
            durable: Some(name.to_owned()),
            ..SubscribeOptions::default()
        };
        pubsub::subscribe(self.shared(), pattern, options).await
    }

    /// Ends this node's durable subscription `name` (attached or not): every publisher drops
    /// it and keeps nothing more for it. Returns once every connected peer confirmed.
    pub async fn unsubscribe_durable(&self, name: &str) -> Result<(), SubscribeError> {
        pubsub::unsubscribe_durable(self.shared(), name).await
    }

    /// Publishes an event: to every peer subscribed to a matching pattern (acknowledged per
    /// link, spooled with a data directory, FIFO per publisher) and to this node's own matching
    /// subscriptions. Returns once every send was accepted (with a spool: durable); the
    /// receipts resolve when each subscriber has it.
    pub async fn publish(
        &self,
        topic: &str,
        body: impl Into<Bytes>,
    ) -> Result<Published, PublishError> {
        pubsub::publish(self.shared(), topic, body.into(), None).await
    }

    /// [`Node::publish`](crate::Node::publish) with options: headers, priority, expiry and an
    /// idempotency key, which every subscriber sees on the message (see
    /// [`MessageOptions`](crate::MessageOptions)). An event whose expiry passed before it
    /// reached a subscriber node is dropped there (metric `events_expired`); FIFO per publisher
    /// holds across priorities.
    ///
    /// With a due time (`delay`, `deliver_at`) the event is accepted now (with a spool:
    /// durable, surviving a restart) and published at its due time, to the subscribers there
    /// are then; [`Published::scheduled`] says when, and there are no receipts.
    pub async fn publish_with(
        &self,
        topic: &str,
        body: impl Into<Bytes>,
        options: &crate::MessageOptions,
    ) -> Result<Published, PublishError> {
        let shared = self.shared();
        options.check().map_err(crate::error::SendError::from)?;
        if options.is_delayed() {
            let topic = weft_proto::Topic::new(topic)?;
            let op = later::Later::Publish { topic: &topic };
            let due = later::schedule(shared, op, body.into(), options).await?;
            return Ok(Published {
                receipts: Vec::new(),
                relayed: 0,
                local: 0,
                scheduled: Some(due),
            });
        }
        let event_options = options.event_options(shared.now_unix_ms(), None);
        pubsub::publish(shared, topic, body.into(), event_options.as_ref()).await
    }

    /// Publishes many events on one topic, in order: the same guarantees as one
    /// [`Node::publish`](crate::Node::publish) per body (each subscriber gets each event once, FIFO per publisher;
    /// acknowledged per hop; spooled with a data directory), at a fraction of the cost, as a
    /// ZeroMQ publisher batches its sends. Runs of events (up to 1024) are numbered at once
    /// and every first hop gets a run's copies with one reservation of its queue
    /// ([`PeerSender::send_batch`](crate::PeerSender::send_batch)). Returns once every copy was
    /// accepted (with a spool: durable); the receipts resolve when each subscriber has them.
    ///
    /// With durable subscribers about, the events are published one by one (same result, no
    /// saving). Errors say how many events were published before the failure
    /// ([`PublishBatchError::published`]); an event too large for the links stops the batch
    /// there, with the events before it published.
    pub async fn publish_batch<B: Into<Bytes>>(
        &self,
        topic: &str,
        bodies: impl IntoIterator<Item = B>,
    ) -> Result<PublishedBatch, PublishBatchError> {
        let bodies = bodies.into_iter().map(Into::into).collect();
        pubsub::publish_batch(self.shared(), topic, bodies, None).await
    }

    /// [`Node::publish_batch`](crate::Node::publish_batch) with options for every event (see
    /// [`Node::publish_with`](crate::Node::publish_with)); an idempotency key names the batch,
    /// event `i` carrying `key/i`.
    pub async fn publish_batch_with<B: Into<Bytes>>(
        &self,
        topic: &str,
        bodies: impl IntoIterator<Item = B>,
        options: &crate::MessageOptions,
    ) -> Result<PublishedBatch, PublishBatchError> {
        let checked = options
            .check()
            .and_then(|()| options.refuse_delay("publish_batch"));
        if let Err(error) = checked {
            return Err(PublishBatchError {
                published: 0,
                error: crate::error::SendError::from(error).into(),
                done: PublishedBatch::default(),
            });
        }
        let bodies = bodies.into_iter().map(Into::into).collect();
        pubsub::publish_batch(self.shared(), topic, bodies, Some(options)).await
    }

    /// Publishes a serde value (postcard).
    pub async fn publish_typed<T: serde::Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<Published, PublishError> {
        let body = crate::body::encode(value).map_err(|e| PublishError::Body(e.to_string()))?;
        self.publish(topic, body).await
    }

    /// Publishes an event best effort (telemetry): volatile, to connected subscribers whose
    /// queues have room; every drop is counted (metric `events_dropped`). Never waits. Returns
    /// how many subscribers got it.
    pub fn publish_best_effort(
        &self,
        topic: &str,
        body: impl Into<Bytes>,
    ) -> Result<usize, PublishError> {
        pubsub::publish_best_effort(self.shared(), topic, body.into())
    }

    /// Waits until at least `count` connected peers subscribe to a pattern matching `topic`.
    /// Wrap it in a timeout.
    pub async fn wait_for_subscribers(
        &self,
        topic: &str,
        count: usize,
    ) -> Result<(), crate::error::ReadyError> {
        let topic = weft_proto::Topic::new(topic)?;
        let patterns = &self.shared().patterns;
        let mut changed = patterns.changed.subscribe();
        loop {
            if patterns.lock().table.connected_subscribers(&topic) >= count {
                return Ok(());
            }
            if !ready_changed(self.shared(), &mut changed).await {
                return Err(crate::error::ReadyError::NodeClosed);
            }
        }
    }

    /// Waits until at least `count` connected peers pull from work queue `queue` (so that, for
    /// instance, sharded keys are spread over all of them from the first push: a worker that
    /// joins later takes over its keys, in order). Wrap it in a timeout.
    pub async fn wait_for_workers(
        &self,
        queue: &str,
        count: usize,
    ) -> Result<(), crate::error::ReadyError> {
        let queue = weft_proto::Topic::new(queue)?;
        let patterns = &self.shared().patterns;
        let mut changed = patterns.changed.subscribe();
        loop {
            if patterns.lock().table.workers(&queue).len() >= count {
                return Ok(());
            }
            if !ready_changed(self.shared(), &mut changed).await {
                return Err(crate::error::ReadyError::NodeClosed);
            }
        }
    }

    /// Waits until the interest of every connected peer (what it subscribes to, serves and
    /// pulls) has reached this node: from then on `wait_for_service(s, 1)` and the like answer
    /// for the mesh as it is connected now, so a caller can tell "nobody serves this" from "not
    /// heard yet". Wrap it in a timeout.
    pub async fn wait_for_interest(&self) -> Result<(), crate::error::ReadyError> {
        let shared = self.shared();
        let patterns = &shared.patterns;
        let mut changed = patterns.changed.subscribe();
        loop {
            let connected = self.connected_peers();
            if connected
                .iter()
                .all(|peer| patterns.lock().table.heard_from(peer))
            {
                return Ok(());
            }
            if !ready_changed(shared, &mut changed).await {
                return Err(crate::error::ReadyError::NodeClosed);
            }
        }
    }

    /// Starts answering requests for `service`. Returns once every connected peer confirmed it.
    pub async fn serve(&self, service: &str) -> Result<Service, SubscribeError> {
        reqrep::serve(self.shared(), service).await
    }

    /// Waits until at least `count` nodes (connected peers, or this one) answer `service`.
    /// Wrap it in a timeout.
    pub async fn wait_for_service(
        &self,
        service: &str,
        count: usize,
    ) -> Result<(), crate::error::ReadyError> {
        let service = weft_proto::Topic::new(service)?;
        let shared = self.shared();
        let patterns = &shared.patterns;
        let mut changed = patterns.changed.subscribe();
        loop {
            {
                let state = patterns.lock();
                let local = usize::from(state.services.contains_key(service.as_str()));
                if state.table.servers(&service).len() + local >= count {
                    return Ok(());
                }
            }
            if !ready_changed(self.shared(), &mut changed).await {
                return Err(crate::error::ReadyError::NodeClosed);
            }
        }
    }

    /// A request to any node that answers `service` (load-balanced round robin), or with
    /// [`RequestBuilder::to`] to one node. Await it: the reply, or a typed error — at once
    /// [`RequestError::NoResponders`] when no connected node answers the service.
    pub fn request(&self, service: &str, body: impl Into<Bytes>) -> RequestBuilder {
        RequestBuilder {
            shared: Arc::clone(self.shared()),
            service: service.to_owned(),
            payload: Ok(body.into()),
            timeout: None,
            to: None,
            id: None,
            priority: weft_proto::Priority::NORMAL,
            options: None,
        }
    }

    /// A request with a serde body (postcard); see [`Node::request`](crate::Node::request).
    pub fn request_typed<T: serde::Serialize + ?Sized>(
        &self,
        service: &str,
        value: &T,
    ) -> RequestBuilder {
        RequestBuilder {
            shared: Arc::clone(self.shared()),
            service: service.to_owned(),
            payload: crate::body::encode(value).map_err(|e| e.to_string()),
            timeout: None,
            to: None,
            id: None,
            priority: weft_proto::Priority::NORMAL,
            options: None,
        }
    }

    /// Pushes a message to work queue `queue` (PUSH/PULL): to exactly one connected worker,
    /// the one with the most free credit; waits while every worker's credit is used up or no
    /// worker is there (wrap it in a timeout). Returns once the message is accepted (with a
    /// spool: durable). A worker that goes silent has its unacknowledged messages given to the
    /// others.
    pub async fn push(&self, queue: &str, body: impl Into<Bytes>) -> Result<(), WorkError> {
        work::push(self.shared(), queue, None, body.into(), None).await
    }

    /// [`Node::push`](crate::Node::push) with options: headers, expiry and an idempotency key,
    /// which the worker sees on the message (see [`MessageOptions`](crate::MessageOptions)).
    /// Work items travel in the normal lane (where credit is counted): another priority is
    /// refused ([`crate::OptionsError`]). With a due time the item is accepted now (with a
    /// spool: durable) and pushed at its due time, to a worker chosen then.
    pub async fn push_with(
        &self,
        queue: &str,
        body: impl Into<Bytes>,
        options: &crate::MessageOptions,
    ) -> Result<(), WorkError> {
        work::push(self.shared(), queue, None, body.into(), Some(options)).await
    }

    /// Pushes to a sharded work queue: every message with the same `key` goes to the key's
    /// owner among the connected workers (rendezvous hashing), in order; when workers join or
    /// leave, a key moves to its new owner only after its old owner acknowledged everything it
    /// got for the key (a silent owner's unacknowledged messages are taken back and pushed to
    /// the new owner first). Order holds per (producer, key).
    pub async fn push_keyed(
        &self,
        queue: &str,
        key: impl Into<Bytes>,
        body: impl Into<Bytes>,
    ) -> Result<(), WorkError> {
        work::push(self.shared(), queue, Some(key.into()), body.into(), None).await
    }

    /// [`Node::push_keyed`](crate::Node::push_keyed) with options (see
    /// [`Node::push_with`](crate::Node::push_with)).
    pub async fn push_keyed_with(
        &self,
        queue: &str,
        key: impl Into<Bytes>,
        body: impl Into<Bytes>,
        options: &crate::MessageOptions,
    ) -> Result<(), WorkError> {
        work::push(
            self.shared(),
            queue,
            Some(key.into()),
            body.into(),
            Some(options),
        )
        .await
    }

    /// Pulls from work queue `queue` as one of its competing workers (default credit).
    pub async fn pull(&self, queue: &str) -> Result<Puller, SubscribeError> {
        work::pull(self.shared(), queue, PullOptions { credit: None }).await
    }

    /// [`Node::pull`](crate::Node::pull) with options (the credit).
    pub async fn pull_with(
        &self,
        queue: &str,
        options: PullOptions,
    ) -> Result<Puller, SubscribeError> {
        work::pull(self.shared(), queue, options).await
    }

    /// Scatter-gather: asks every node that answers `service` and collects the replies until
    /// a count, a deadline, or every node answered; reports who answered and who did not.
    pub fn scatter(&self, service: &str, body: impl Into<Bytes>) -> ScatterBuilder {
        ScatterBuilder {
            shared: Arc::clone(self.shared()),
            service: service.to_owned(),
            payload: Ok(body.into()),
            count: None,
            timeout: None,
            options: None,
        }
    }
}
