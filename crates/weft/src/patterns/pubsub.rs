//! Publish/subscribe: wildcard subscriptions, events routed by interest.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;
use tracing::warn;
use weft_proto::envelope;
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
    /// One receipt per remote subscriber: resolves once that node's subscriptions have the event.
    pub receipts: Vec<Receipt>,
    /// Local subscriptions that got it.
    pub local: usize,
}

impl Published {
    /// Nodes the event went to (remote subscribers), in node id order.
    pub fn subscribers(&self) -> Vec<NodeId> {
        self.receipts.iter().map(|r| r.peer()).collect()
    }

    /// Waits until every remote subscriber acknowledged the event.
    pub async fn delivered(self) -> Result<usize, crate::error::DeliveryError> {
        let count = self.receipts.len();
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

/// The message a local subscription receives for an event.
fn event_message(template: &Message, topic: &Topic, payload: Bytes) -> Message {
    let mut message = template.clone();
    message.header.channel = topic.as_str().to_owned();
    message.body = payload;
    message
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

/// Events from peers: unwrap, deliver to the matching local subscriptions, then take the next
/// (which settles this one: the publisher's receipt resolves once every local subscription
/// has the event).
pub(crate) async fn event_task(shared: Arc<Shared>, mut events: Inbox) {
    // Made once: a new one per event (two watch subscriptions and their waiters) was a quarter
    // of a subscriber's CPU.
    let stopping = super::Patterns::stopping(&shared);
    tokio::pin!(stopping);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut stopping => break,
            message = events.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let (topic, payload) = match envelope::unwrap(&message.body) {
            Ok(unwrapped) => unwrapped,
            Err(e) => {
                shared.metrics.protocol_error();
                warn!(peer = %message.header.id.producer.short(), error = %e, "malformed event dropped");
                continue;
            }
        };
        let event = event_message(&message, &topic, payload);
        tokio::select! {
            biased;
            () = &mut stopping => {
                // Not every subscription has it: not settled, so the publisher keeps it.
                events.unsettle_last();
                break;
            }
            _ = deliver_locally(&shared, &topic, event) => {}
        }
    }
}

/// Checks the topic and builds the wire message of an event, checked against the limits.
fn event_outgoing(
    shared: &Shared,
    topic: &str,
    payload: &[u8],
) -> Result<(Topic, OutgoingMessage), PublishError> {
    let topic = Topic::new(topic)?;
    let outgoing = OutgoingMessage::command(
        EVENT_CHANNEL,
        envelope::wrap(&topic, payload),
        shared.now_unix_ms(),
    )
    .with_kind(Kind::Event);
    outgoing
        .check(&shared.config.limits())
        .map_err(SendError::from)?;
    Ok((topic, outgoing))
}

/// A local event's id: this node's own pub/sub stream.
fn local_event(shared: &Shared, topic: &Topic, payload: Bytes) -> Message {
    let seq = shared.patterns.local_events.fetch_add(1, Ordering::Relaxed) + 1;
    Message {
        header: weft_proto::Header {
            id: MessageId {
                producer: shared.id,
                stream: StreamId::direct(&shared.id, &shared.id, shared.epoch),
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

pub(crate) async fn publish(
    shared: &Arc<Shared>,
    topic: &str,
    payload: Bytes,
) -> Result<Published, PublishError> {
    let (topic, outgoing) = event_outgoing(shared, topic, &payload)?;
    let subscribers = shared.patterns.lock().table.subscribers(&topic);
    let mut receipts = Vec::with_capacity(subscribers.len());
    for peer in subscribers {
        let sent = match shared.sender(peer) {
            Ok(sender) => sender.send_message(outgoing.clone()).await,
            Err(e) => Err(e),
        };
        match sent {
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
    let local = if shared.patterns.lock().table.subscribed_here(&topic) {
        deliver_locally(shared, &topic, local_event(shared, &topic, payload)).await
    } else {
        0
    };
    Ok(Published { receipts, local })
}

/// Best effort: volatile to every connected subscriber whose queue has room; the rest are
/// dropped and counted. Returns how many subscribers (remote and local) got it.
pub(crate) fn publish_best_effort(
    shared: &Arc<Shared>,
    topic: &str,
    payload: Bytes,
) -> Result<usize, PublishError> {
    let (topic, outgoing) = event_outgoing(shared, topic, &payload)?;
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
        let message = local_event(shared, &topic, payload);
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
