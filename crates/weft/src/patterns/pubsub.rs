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
use weft_proto::gossip::{self, Accepted, Chains, Confirm, Event, Hop};
use weft_proto::interest::InterestError;
use weft_proto::{
    Kind, Message, MessageId, NodeId, OutgoingMessage, StreamId, Topic, TopicError, TopicPattern,
};

use super::{LocalSubscription, EVENT_CHANNEL};
use crate::error::{SendError, TrySendError};
use crate::inbox::Inbox;
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
    /// `PatternConfig::subscribe_timeout`); the subscription was withdrawn.
    #[error("{} connected peer(s) did not confirm the subscription in time", .0.len())]
    NotConfirmed(Vec<NodeId>),
    /// This node answers the service already (one `Service` per name and node).
    #[error("this node already serves {0:?}")]
    AlreadyServed(String),
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
#[derive(Clone, Copy, Debug, Default)]
pub struct SubscribeOptions {
    /// Best effort (telemetry): when this subscription's queue is full, new events for it are
    /// dropped and counted ([`Subscription::dropped`], metric `events_dropped`) instead of
    /// making the publishers wait.
    pub best_effort: bool,
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

/// A subscription: a stream of the events whose topic matches its pattern, in order per
/// publisher. Dropping it unsubscribes.
pub struct Subscription {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u64,
    pub(crate) pattern: TopicPattern,
    pub(crate) rx: mpsc::Receiver<Message>,
    pub(crate) dropped: Arc<AtomicU64>,
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

    /// The next event; `None` once the node shut down. The event's `header.channel` is its
    /// topic, `header.id.producer` its publisher.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Events dropped because this (best-effort) subscription's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Stream for Subscription {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let patterns = &self.shared.patterns;
        let changed = {
            let mut state = patterns.lock();
            state.subscriptions.retain(|s| s.id != self.id);
            state.table.unsubscribe(&self.pattern)
        };
        if changed {
            let _ = patterns.announce.send(());
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
    let patterns = &shared.patterns;
    let config = &shared.config.patterns;
    let (tx, rx) = mpsc::channel(config.subscription_capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    let (id, version) = {
        let mut state = patterns.lock();
        let version = state.table.subscribe(&pattern).map_err(|e| match e {
            InterestError::LocalFull(_) => SubscribeError::TooMany(e.to_string()),
            other => SubscribeError::TooMany(other.to_string()),
        })?;
        let id = state.next_subscription;
        state.next_subscription += 1;
        state.subscriptions.push(LocalSubscription {
            id,
            pattern: pattern.clone(),
            tx,
            best_effort: options.best_effort,
            dropped: Arc::clone(&dropped),
        });
        (id, version)
    };
    let subscription = Subscription {
        shared: Arc::clone(shared),
        id,
        pattern,
        rx,
        dropped,
    };
    let _ = patterns.announce.send(());
    match patterns
        .in_effect(shared, version, config.subscribe_timeout)
        .await
    {
        Ok(()) => Ok(subscription),
        Err(waiting) => Err(SubscribeError::NotConfirmed(waiting)), // dropping withdraws it
    }
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
    Message {
        header: weft_proto::Header {
            id: MessageId {
                producer: origin,
                stream: StreamId::direct(&origin, &shared.id, incarnation),
                seq,
            },
            kind: Kind::Event,
            channel: topic.as_str().to_owned(),
            priority: Default::default(),
            created_unix_ms: shared.now_unix_ms(),
            attempt: 1,
            options: None,
        },
        body: payload,
    }
}

/// Hands an event to every local subscription whose pattern matches (waiting at a full reliable
/// one, dropping at a full best-effort one). Returns how many got it.
async fn deliver_locally(shared: &Shared, topic: &Topic, message: Message) -> usize {
    let targets: Vec<(mpsc::Sender<Message>, bool, Arc<AtomicU64>)> = {
        let state = shared.patterns.lock();
        state
            .subscriptions
            .iter()
            .filter(|s| s.pattern.matches(topic))
            .map(|s| (s.tx.clone(), s.best_effort, Arc::clone(&s.dropped)))
            .collect()
    };
    let mut delivered = 0;
    let count = targets.len();
    let mut message = Some(message);
    for (i, (tx, best_effort, dropped)) in targets.into_iter().enumerate() {
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
            permit.send(message);
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
    let outgoing = OutgoingMessage::command(
        EVENT_CHANNEL,
        event.encode(&shared.id),
        shared.now_unix_ms(),
    )
    .with_kind(Kind::Event);
    shared.sender(to)?.send_message(outgoing).await
}

/// Queues an event's copy for a child that is not connected, without waiting for room: when its
/// queue or the spool is full, the copy is left to the publisher's repair.
async fn relay_to_absent(shared: &Arc<Shared>, event: &Event, absent: &Hop) {
    let copy = event.for_child(std::slice::from_ref(absent));
    let outgoing =
        OutgoingMessage::command(EVENT_CHANNEL, copy.encode(&shared.id), shared.now_unix_ms())
            .with_kind(Kind::Event);
    let queued = shared
        .sender(absent.node)
        .map_err(TrySendError::from)
        .and_then(|sender| sender.try_send_message(outgoing));
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
async fn take_event(shared: &Arc<Shared>, chains: &mut Chains<Event>, event: Event) {
    let metrics = &shared.metrics;
    if event.seq == 0 {
        // Best effort: no chain.
        let message = event_message(
            shared,
            event.origin,
            event.incarnation,
            0,
            &event.topic,
            event.payload,
        );
        deliver_locally(shared, &event.topic, message).await;
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
    match chains.accept(origin, incarnation, seq, prev, event) {
        Accepted::Deliver(events) => {
            for event in events {
                metrics.events_received.fetch_add(1, Ordering::Relaxed);
                let message = event_message(
                    shared,
                    event.origin,
                    event.incarnation,
                    event.seq,
                    &event.topic,
                    event.payload,
                );
                deliver_locally(shared, &event.topic, message).await;
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

/// Events from peers: relay, chain, deliver to the matching local subscriptions, then take the
/// next (which settles this one: the hop's acknowledgement means the subtree's copies are
/// accepted and the chain has it).
pub(crate) async fn event_task(shared: Arc<Shared>, mut events: Inbox) {
    // Made once: a new one per event (two watch subscriptions and their waiters) was a quarter
    // of a subscriber's CPU.
    let stopping = super::Patterns::stopping(&shared);
    tokio::pin!(stopping);
    let mut chains: Chains<Event> =
        Chains::new(shared.config.patterns.event_hold_max, SUBSCRIBER_CHAINS_MAX);
    let mut refused = BTreeMap::new();
    let mut since_confirm = 0u32;
    let mut retry = tokio::time::interval(CONFIRM_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut stopping => break,
            message = events.recv() => match message {
                Some(message) => message,
                None => break,
            },
            _ = retry.tick() => {
                send_confirms(&shared, &mut chains, &mut refused);
                continue;
            }
        };
        let event = match Event::decode(&message.body, &message.header.id.producer) {
            Ok(event)
                if event.seq == 0
                    || event.route.first().is_some_and(|hop| hop.node == shared.id) =>
            {
                event
            }
            Ok(_) => {
                shared.metrics.protocol_error();
                warn!(peer = %message.header.id.producer.short(), "event routed to another node dropped");
                continue;
            }
            Err(e) => {
                shared.metrics.protocol_error();
                warn!(peer = %message.header.id.producer.short(), error = %e, "malformed event dropped");
                continue;
            }
        };
        tokio::select! {
            biased;
            () = &mut stopping => {
                // Not relayed or delivered everywhere: not settled, so the sender keeps it.
                events.unsettle_last();
                break;
            }
            () = take_event(&shared, &mut chains, event) => {}
        }
        since_confirm += 1;
        if since_confirm >= CONFIRM_EVERY || events.is_empty() {
            since_confirm = 0;
            send_confirms(&shared, &mut chains, &mut refused);
        }
    }
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
        debug!(subscriber = %repair.to.short(), events = repair.events.len(), "repairing events over the direct link");
        for (seq, topic, payload, prev) in repair.events {
            let event = Event {
                origin: shared.id,
                incarnation: shared.epoch,
                seq,
                hops: 1,
                route: vec![Hop {
                    node: repair.to,
                    prev,
                }],
                topic,
                payload,
            };
            match send_event(&shared, &event).await {
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
}

pub(crate) async fn publish(
    shared: &Arc<Shared>,
    topic: &str,
    payload: Bytes,
) -> Result<Published, PublishError> {
    let topic = Topic::new(topic)?;
    let patterns = &shared.patterns;
    let fanout = loop {
        let room = patterns.retention_freed.notified();
        {
            let mut state = patterns.lock();
            if state.publisher.has_room() {
                let addressees = state.table.addressees(&topic);
                // The longest route a first hop can get: checked before the event is numbered,
                // so a refused event leaves no gap in anyone's chain.
                let longest = addressees
                    .len()
                    .div_ceil(shared.config.patterns.gossip_fanout.max(1));
                let size = gossip::overhead(&topic, longest) + payload.len();
                if !addressees.is_empty() {
                    check_event_size(shared, size)?;
                }
                let now = shared.now_unix_ms();
                let fanout = state.publisher.publish(&addressees, &topic, &payload, now);
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
    let addressed: usize = fanout.routes.iter().map(Vec::len).sum();
    let mut receipts = Vec::with_capacity(fanout.routes.len());
    for route in fanout.routes {
        let peer = route[0].node;
        let event = Event {
            origin: shared.id,
            incarnation: shared.epoch,
            seq: fanout.seq,
            hops: 1,
            route,
            topic: topic.clone(),
            payload: payload.clone(),
        };
        match send_event(shared, &event).await {
            Ok(receipt) => receipts.push(receipt),
            Err(error) if receipts.is_empty() => return Err(error.into()),
            Err(error) => {
                return Err(PublishError::Partial {
                    sent: receipts.len(),
                    peer,
                    error,
                })
            }
        }
    }
    let local = if patterns.lock().table.subscribed_here(&topic) {
        let message = event_message(shared, shared.id, shared.epoch, fanout.seq, &topic, payload);
        deliver_locally(shared, &topic, message).await
    } else {
        0
    };
    Ok(Published {
        relayed: addressed - receipts.len(),
        receipts,
        local,
    })
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
    let topic = Topic::new(topic)?;
    let body = gossip::encode_parts(
        &shared.id,
        &shared.id,
        shared.epoch,
        0,
        1,
        &[],
        &topic,
        &payload,
    );
    let outgoing =
        OutgoingMessage::command(EVENT_CHANNEL, body, shared.now_unix_ms()).with_kind(Kind::Event);
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
            if tx.try_send(message.clone()).is_ok() {
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
