//! Checkers: Weft's point-to-point guarantees, judged from the recorded history alone.
//!
//! Each checker reads [`Record`]s and reports [`Violation`]s with enough detail (times, nodes,
//! sequence numbers) to find the spot in a replay with `RUST_LOG`. They assume what every scenario
//! provides: the network is whole after the fault phase, every crashed node restarted, and the run
//! lasted long enough to drain. A message is named by its id: (sender, receiver, stream, seq).
//!
//! A send is *accepted* iff `send` returned `Ok` (an accepted message is durable in the sender's
//! spool). A send that returned an error, or whose node crashed before it returned, is *not
//! accepted*.
//!
//! | checker       | guarantee                                                                 |
//! |---------------|---------------------------------------------------------------------------|
//! | `loss`        | every accepted message reaches the receiver's application, or its sender  |
//! |               | is told it was dead-lettered (an event or its receipt)                    |
//! | `duplicate`   | a message reaches the application again only across a crash of the        |
//! |               | receiver (taken, but not yet settled with a durable watermark)            |
//! | `redelivered` | once its receipt resolved, a message never reaches the application again  |
//! |               | (acks go out only after the watermark is durable)                         |
//! | `fifo`        | per (sender, receiver, lane), each stream arrives in increasing order, never |
//! |               | skipping an accepted message, and a replaced stream never comes back;     |
//! |               | after a receiver crash the stream may go back (re-deliveries)             |
//! | `ack`         | a receipt resolves only for a message the receiver's application took     |
//! | `integrity`   | a delivered body is the one sent; a message not accepted may arrive (at   |
//! |               | most once outside receiver crashes), a message nobody sent never does    |
//! | `api`         | sends fail only on a faulty or capped spool, receipts only by dead        |
//! |               | letters, starts only on a faulty disk; no protocol errors                 |
//! | `early`       | a delayed message never reaches the application before its due time      |
//!
//! Delayed sends (crash and partition kinds) have no id when `send` returns (`Scheduled`); their
//! receipt learns it at the release (`Released`, then they are checked like accepted messages).
//! A crash can move the release into a later incarnation without a receipt, so each scheduled
//! message is also judged by its body: delivered from its sender to its receiver (`loss`),
//! under one id only (`duplicate`: numbering it twice would give the receiver no way to drop
//! the second copy), and never before its due time (`early`).
//!
//! (The harness adds `liveness` — the run settled: every spool drained — and `simulation`
//! violations when a host fails or a task panics; [`check_pubsub`] and [`check_work`] judge the
//! patterns, and in `gossip-scale` [`GossipCost`] bounds what the gossip trees cost: `cost`.)
//!
//! Excused: messages a sender may have lost to a quarantined spool segment (its restart found
//! damage, the operator's alarm went off) count as reported, not lost.
//!
//! The trace-hash check (same seed, same hash) needs two runs; the harness and the sweep do it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::history::SUBSCRIBE_UNCONFIRMED;
use crate::history::{Event, NodeIndex, Record};
use crate::scenario::{pattern_matches, FaultAction};

/// Which guarantee a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Checker {
    /// An accepted message was neither delivered nor reported dead-lettered.
    Loss,
    /// A message was delivered twice without a receiver crash in between.
    Duplicate,
    /// A message was delivered again after its receipt resolved.
    Redelivered,
    /// Out of order, a skipped accepted message, or an old stream again.
    Fifo,
    /// A receipt resolved for a message not (yet) delivered.
    Ack,
    /// Wrong body, or a delivery nobody sent.
    Integrity,
    /// A send, receipt or start failed where it must not, or the driver reported a protocol
    /// error.
    Api,
    /// A published event did not reach a subscription that was in effect before the publish.
    Coverage,
    /// The run did not settle: sends, receipts or spools were not done by the deadline.
    Liveness,
    /// The gossip trees cost too much: too many copies per delivered event, or too many hops.
    Cost,
    /// The simulation itself failed: a host returned an error or a task panicked.
    Simulation,
    /// A delayed message reached the application before its due time.
    Early,
}

impl Checker {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Checker::Loss => "loss",
            Checker::Duplicate => "duplicate",
            Checker::Redelivered => "redelivered",
            Checker::Fifo => "fifo",
            Checker::Ack => "ack",
            Checker::Integrity => "integrity",
            Checker::Api => "api",
            Checker::Coverage => "coverage",
            Checker::Liveness => "liveness",
            Checker::Cost => "cost",
            Checker::Simulation => "simulation",
            Checker::Early => "early",
        }
    }
}

/// One broken guarantee.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which guarantee.
    pub checker: Checker,
    /// When it became visible (simulated time).
    pub at: Duration,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] {:.3}s {}",
            self.checker.name(),
            self.at.as_secs_f64(),
            self.detail
        )
    }
}

/// A message: (sender, receiver, stream, seq).
type MessageKey = (NodeIndex, NodeIndex, u64, u64);

fn name(key: &MessageKey) -> String {
    let (from, to, stream, seq) = key;
    format!("{from}->{to} seq {seq} (stream {stream:016x})")
}

fn secs(at: Duration) -> String {
    format!("{:.3}s", at.as_secs_f64())
}

#[derive(Clone, Debug)]
struct Accepted {
    at: Duration,
    body_digest: u64,
}

/// One delivery: when, which record, what body.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    at: Duration,
    index: usize,
    body_digest: u64,
}

/// Per (receiver, sender): where its FIFO order stands.
#[derive(Debug, Default)]
struct Order {
    stream: Option<u64>,
    /// Highest seq delivered of `stream` (since the last rewind).
    last: u64,
    /// Streams replaced by a newer one.
    replaced: BTreeSet<u64>,
    /// The receiver crashed since this pair's last delivery: the stream may go back once.
    rewind: bool,
}

/// What the records say, gathered in one pass.
#[derive(Debug, Default)]
struct Facts {
    accepted: BTreeMap<MessageKey, Accepted>,
    /// Per (sender, receiver): digests of sends that were not accepted (failed or interrupted).
    unaccepted: BTreeMap<(NodeIndex, NodeIndex), Vec<u64>>,
    deliveries: BTreeMap<MessageKey, Vec<Delivery>>,
    /// Per message: when its receipt resolved (record index, time).
    acked: BTreeMap<MessageKey, (usize, Duration)>,
    dead_lettered: BTreeSet<MessageKey>,
    /// Per node: record indexes of its crashes.
    crashes: BTreeMap<NodeIndex, Vec<usize>>,
    /// Per node: times its restarts found damaged segments.
    quarantines: BTreeMap<NodeIndex, Vec<Duration>>,
    /// Nodes whose disk was faulty or capped (from that record index on).
    disk_trouble: BTreeMap<NodeIndex, usize>,
    /// Per (receiver, sender): skipped seqs of a stream, checked once everything is known.
    skipped: Vec<(Duration, MessageKey)>,
    /// Delayed sends that returned `Ok`: (when, sender, receiver, body digest, due time).
    scheduled: Vec<(Duration, NodeIndex, NodeIndex, u64, Duration)>,
}

impl Facts {
    /// The sender's restart found damage after the message was accepted: it may be gone, and
    /// the operator was told.
    fn lost_to_quarantine(&self, key: &MessageKey, accepted_at: Duration) -> bool {
        self.quarantines
            .get(&key.0)
            .is_some_and(|times| times.iter().any(|&at| at >= accepted_at))
    }
}

/// Runs every checker over `records` (a whole run that ended at `end`).
pub fn check(records: &[Record], end: Duration) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut facts = Facts::default();
    // Per (receiver, sender, lane).
    let mut orders: BTreeMap<(NodeIndex, NodeIndex, u8), Order> = BTreeMap::new();
    let mut acks = Vec::new();

    for (index, record) in records.iter().enumerate() {
        let at = record.at;
        let mut violation = |checker, detail| {
            violations.push(Violation {
                checker,
                at,
                detail,
            })
        };
        match &record.event {
            Event::Scheduled {
                from,
                to,
                body_digest,
                due,
            } => {
                facts.scheduled.push((at, *from, *to, *body_digest, *due));
                // Its deliveries are something that was sent, whatever id they carry.
                facts
                    .unaccepted
                    .entry((*from, *to))
                    .or_default()
                    .push(*body_digest);
            }
            Event::Accepted {
                from,
                to,
                stream,
                seq,
                body_digest,
            }
            | Event::Released {
                from,
                to,
                stream,
                seq,
                body_digest,
            } => {
                let key = (*from, *to, *stream, *seq);
                let accepted = Accepted {
                    at,
                    body_digest: *body_digest,
                };
                if let Some(first) = facts.accepted.get(&key) {
                    // The second message can never be told apart from the first: the receiver
                    // takes it for a duplicate.
                    let first_at = secs(first.at);
                    violation(
                        Checker::Api,
                        format!(
                            "two sends returned the same id: {} (first at {first_at})",
                            name(&key)
                        ),
                    );
                } else {
                    facts.accepted.insert(key, accepted);
                }
            }
            Event::SendFailed {
                from,
                to,
                body_digest,
                spool,
                error,
            } => {
                facts
                    .unaccepted
                    .entry((*from, *to))
                    .or_default()
                    .push(*body_digest);
                if !*spool || !facts.disk_trouble.contains_key(from) {
                    violation(
                        Checker::Api,
                        format!("send {from}->{to} failed on a healthy node: {error}"),
                    );
                }
            }
            Event::SendInterrupted {
                from,
                to,
                body_digest,
            } => facts
                .unaccepted
                .entry((*from, *to))
                .or_default()
                .push(*body_digest),
            Event::Delivered {
                at: receiver,
                from,
                stream,
                seq,
                lane,
                body_digest,
            } => {
                let Some(from) = from else {
                    violation(
                        Checker::Integrity,
                        format!(
                            "node {receiver} got seq {seq} from a producer that is not in the run"
                        ),
                    );
                    continue;
                };
                let key = (*from, *receiver, *stream, *seq);
                let delivery = Delivery {
                    at,
                    index,
                    body_digest: *body_digest,
                };
                let copies = facts.deliveries.entry(key).or_default();
                if let Some(previous) = copies.last() {
                    if !facts
                        .crashes
                        .get(receiver)
                        .is_some_and(|c| c.iter().any(|&c| previous.index < c))
                    {
                        violation(
                            Checker::Duplicate,
                            format!(
                                "{} delivered again (first at {}) without a crash of node {receiver} in between",
                                name(&key),
                                secs(copies[0].at)
                            ),
                        );
                    }
                }
                let again = !copies.is_empty();
                copies.push(delivery);
                if let Some(&(acked_index, acked_at)) = facts.acked.get(&key) {
                    // (A first delivery after the ack is the `ack` checker's.)
                    if again && acked_index < index {
                        violation(
                            Checker::Redelivered,
                            format!(
                                "{} delivered again after its receipt resolved at {}",
                                name(&key),
                                secs(acked_at)
                            ),
                        );
                    }
                }
                fifo(
                    orders.entry((*receiver, *from, *lane)).or_default(),
                    key,
                    at,
                    &mut facts.skipped,
                    &mut violation,
                );
            }
            Event::Acked {
                from,
                to,
                stream,
                seq,
            } => {
                let key = (*from, *to, *stream, *seq);
                facts.acked.entry(key).or_insert((index, at));
                acks.push((at, index, key));
            }
            Event::ReceiptFailed {
                from,
                to,
                stream,
                seq,
                dead_lettered,
                error,
            } => {
                let key = (*from, *to, *stream, *seq);
                if *dead_lettered {
                    facts.dead_lettered.insert(key);
                } else {
                    violation(
                        Checker::Api,
                        format!(
                            "receipt of {} failed while the node ran: {error}",
                            name(&key)
                        ),
                    );
                }
            }
            Event::DeadLettered {
                from,
                to,
                stream,
                seq,
                ..
            } => {
                facts.dead_lettered.insert((*from, *to, *stream, *seq));
            }
            Event::SpoolCapped { node, .. } => {
                facts.disk_trouble.entry(*node).or_insert(index);
            }
            Event::Quarantined { node, .. } => facts.quarantines.entry(*node).or_default().push(at),
            // The message is sent again under its new id: accepted under both.
            Event::Renumbered {
                from,
                to: Some(to),
                old_stream,
                old_seq,
                new_stream,
                new_seq,
            } => {
                if let Some(sent) = facts.accepted.get(&(*from, *to, *old_stream, *old_seq)) {
                    let sent = sent.clone();
                    facts
                        .accepted
                        .insert((*from, *to, *new_stream, *new_seq), sent);
                }
            }
            Event::StartFailed { node, error } => {
                if !facts.disk_trouble.contains_key(node) {
                    violation(
                        Checker::Api,
                        format!("node {node} failed to start on a healthy disk: {error}"),
                    );
                }
            }
            Event::Fault(FaultAction::Crash { nodes, .. }) => {
                for node in nodes {
                    facts.crashes.entry(*node).or_default().push(index);
                    for ((receiver, ..), order) in orders.iter_mut() {
                        if receiver == node {
                            order.rewind = true;
                        }
                    }
                }
            }
            Event::Fault(FaultAction::Disk { node, .. }) => {
                facts.disk_trouble.entry(*node).or_insert(index);
            }
            Event::BitFlipped { .. }
            | Event::Renumbered { .. }
            | Event::UnsyncedLost { .. }
            | Event::PeerUp { .. }
            | Event::PeerDown { .. }
            | Event::ConsumerPaused { .. }
            | Event::ConsumerResumed { .. }
            | Event::Subscribed { .. }
            | Event::SubscribeFailed { .. }
            | Event::PublishStarted { .. }
            | Event::Published { .. }
            | Event::PublishFailed { .. }
            | Event::PublishInterrupted { .. }
            | Event::PublishSettled { .. }
            | Event::EventReceived { .. }
            | Event::Pulling { .. }
            | Event::PullFailed { .. }
            | Event::Pushed { .. }
            | Event::PushFailed { .. }
            | Event::PushInterrupted { .. }
            | Event::ItemTaken { .. }
            | Event::Fault(_) => {}
        }
    }

    // loss and integrity, per accepted message.
    for (key, sent) in &facts.accepted {
        match facts.deliveries.get(key) {
            None => {
                if !facts.dead_lettered.contains(key) && !facts.lost_to_quarantine(key, sent.at) {
                    violations.push(Violation {
                        checker: Checker::Loss,
                        at: end,
                        detail: format!(
                            "{} (accepted at {}) neither delivered nor dead-lettered by the end ({})",
                            name(key),
                            secs(sent.at),
                            secs(end)
                        ),
                    });
                }
            }
            Some(copies) => {
                for copy in copies {
                    if copy.body_digest != sent.body_digest {
                        violations.push(Violation {
                            checker: Checker::Integrity,
                            at: copy.at,
                            detail: format!("{} delivered with another body", name(key)),
                        });
                    }
                }
            }
        }
    }

    // Delayed messages, by body: delivered, under one id, not before their time.
    for &(sent_at, from, to, digest, due) in &facts.scheduled {
        let copies: Vec<(&MessageKey, &Delivery)> = facts
            .deliveries
            .range((from, to, 0, 0)..=(from, to, u64::MAX, u64::MAX))
            .flat_map(|(key, copies)| copies.iter().map(move |copy| (key, copy)))
            .filter(|(_, copy)| copy.body_digest == digest)
            .collect();
        let ids: BTreeSet<&MessageKey> = copies.iter().map(|(key, _)| *key).collect();
        if ids.is_empty() {
            let reported = facts
                .dead_lettered
                .iter()
                .any(|key| key.0 == from && key.1 == to)
                || facts
                    .quarantines
                    .get(&from)
                    .is_some_and(|times| times.iter().any(|&q| q >= sent_at));
            if !reported {
                violations.push(Violation {
                    checker: Checker::Loss,
                    at: end,
                    detail: format!(
                        "delayed {from}->{to} (scheduled at {}, due {}) never delivered",
                        secs(sent_at),
                        secs(due)
                    ),
                });
            }
        }
        if ids.len() > 1 {
            let names: Vec<String> = ids.iter().map(|key| name(key)).collect();
            violations.push(Violation {
                checker: Checker::Duplicate,
                at: copies[0].1.at,
                detail: format!(
                    "delayed {from}->{to} (due {}) delivered under {} ids: {}",
                    secs(due),
                    ids.len(),
                    names.join(", ")
                ),
            });
        }
        // The delivery time is recorded in whole simulated time; the due time was converted
        // from whole wall-clock milliseconds: a millisecond of slack.
        if let Some((key, copy)) = copies
            .iter()
            .find(|(_, copy)| copy.at + Duration::from_millis(1) < due)
        {
            violations.push(Violation {
                checker: Checker::Early,
                at: copy.at,
                detail: format!("{} delivered before its due time {}", name(key), secs(due)),
            });
        }
    }

    // Deliveries of messages that were not accepted: they must be something that was sent.
    for (key, copies) in &facts.deliveries {
        if facts.accepted.contains_key(key) {
            continue;
        }
        let (from, receiver, ..) = *key;
        let sent = facts
            .unaccepted
            .get(&(from, receiver))
            .is_some_and(|digests| digests.contains(&copies[0].body_digest));
        if !sent {
            violations.push(Violation {
                checker: Checker::Integrity,
                at: copies[0].at,
                detail: format!("{} delivered but never sent", name(key)),
            });
        }
    }

    // FIFO gaps: a skipped seq must not be an accepted message (unless it was given up).
    for (at, key) in &facts.skipped {
        if let Some(sent) = facts.accepted.get(key) {
            if !facts.dead_lettered.contains(key) && !facts.lost_to_quarantine(key, sent.at) {
                violations.push(Violation {
                    checker: Checker::Fifo,
                    at: *at,
                    detail: format!("{} skipped: a later message was delivered first", name(key)),
                });
            }
        }
    }

    // acked ⇒ the application took it before.
    for (acked_at, acked_index, key) in acks {
        let first = facts.deliveries.get(&key).and_then(|copies| copies.first());
        match first {
            Some(first) if first.index < acked_index => {}
            Some(first) => violations.push(Violation {
                checker: Checker::Ack,
                at: acked_at,
                detail: format!(
                    "{} acked at {} before its delivery at {}",
                    name(&key),
                    secs(acked_at),
                    secs(first.at)
                ),
            }),
            None => violations.push(Violation {
                checker: Checker::Ack,
                at: acked_at,
                detail: format!(
                    "{} acked at {} but never delivered",
                    name(&key),
                    secs(acked_at)
                ),
            }),
        }
    }

    violations.sort_by_key(|violation| (violation.checker, violation.at));
    violations
}

/// Longest time after the later of its publish and the end of the faults (and pauses, and
/// planned publishes) that an event may take to reach a subscription.
pub const PUBSUB_DELIVERY_BOUND: Duration = Duration::from_secs(10);

/// An event: (publisher, seq).
type EventKey = (NodeIndex, u32);
/// A subscription: (node, its index among the node's patterns).
type SubKey = (NodeIndex, usize);

/// What a publish looked like from its publisher.
#[derive(Debug, Default)]
struct PublishFacts {
    /// Record index of `PublishStarted`.
    started: Option<usize>,
    /// `publish` returned `Ok`: (time, topic, body digest).
    published: Option<(Duration, String, u64)>,
    /// Interrupted by a crash: (topic, body digest).
    interrupted: Option<(String, u64)>,
}

/// One event a subscription yielded.
#[derive(Debug, Clone, Copy)]
struct Received {
    at: Duration,
    index: usize,
}

/// The pub/sub guarantees, judged from a `pubsub` run's history (`quiet_from`: when its faults,
/// pauses and planned publishes were over):
///
/// | checker     | guarantee                                                                   |
/// |-------------|-----------------------------------------------------------------------------|
/// | `coverage`  | an event whose publish returned `Ok` reaches every subscription whose       |
/// |             | pattern matches its topic and that was in effect (`subscribe` returned)     |
/// |             | before the publish started — unless the subscriber crashed after the        |
/// |             | publish without having it (its queue is memory: the documented limit)       |
/// | `duplicate` | a subscription yields an event at most once (across a crash of its node:    |
/// |             | the new subscription may yield it again)                                    |
/// | `fifo`      | a subscription yields each publisher's events in publish order, within one  |
/// |             | run of the publisher (an event of a run that ended in a crash and that a    |
/// |             | relay still holds may come after events of the next run)                    |
/// | `integrity` | a subscription yields only events that were published (returned `Ok` or     |
/// |             | interrupted by a crash), by their publisher, with their body and topic,     |
/// |             | and only on topics its pattern matches                                      |
/// | `liveness`  | a covered event arrives at most [`PUBSUB_DELIVERY_BOUND`] after the later   |
/// |             | of its publish and `quiet_from`                                             |
/// | `api`       | subscribe fails only with `NotConfirmed`, publishes and their receipts never |
///
/// Also returns how many (subscription, event) pairs the coverage rule required and how many of
/// them arrived.
pub fn check_pubsub(
    records: &[Record],
    end: Duration,
    quiet_from: Duration,
) -> (Vec<Violation>, Coverage) {
    let mut coverage = Coverage::default();
    let mut violations = Vec::new();
    let mut publishes: BTreeMap<EventKey, PublishFacts> = BTreeMap::new();
    // Per subscription: its incarnations, (record index, time, pattern, durable) of each
    // `Subscribed`.
    let mut subscriptions: BTreeMap<SubKey, Vec<(usize, Duration, String, bool)>> = BTreeMap::new();
    let mut received: BTreeMap<(SubKey, EventKey), Vec<Received>> = BTreeMap::new();
    // Per (subscription, publisher): the last seq it yielded, since the node's last crash.
    let mut last_seq: BTreeMap<(SubKey, NodeIndex, usize), u32> = BTreeMap::new();
    let mut crashes: BTreeMap<NodeIndex, Vec<usize>> = BTreeMap::new();
    let crashed_between = |crashes: &BTreeMap<NodeIndex, Vec<usize>>, node, from, to| {
        crashes
            .get(&node)
            .is_some_and(|c| c.iter().any(|&c| from < c && c < to))
    };
    for (index, record) in records.iter().enumerate() {
        let at = record.at;
        let mut violation = |checker, detail| {
            violations.push(Violation {
                checker,
                at,
                detail,
            })
        };
        match &record.event {
            Event::Subscribed {
                node,
                sub,
                pattern,
                durable,
            } => subscriptions.entry((*node, *sub)).or_default().push((
                index,
                at,
                pattern.clone(),
                *durable,
            )),
            // Faults may keep a peer from confirming; the application tries again.
            Event::SubscribeFailed { node, sub, error }
                if !error.contains("did not confirm") && error != SUBSCRIBE_UNCONFIRMED =>
            {
                violation(
                    Checker::Api,
                    format!("node {node}: subscription {sub} failed: {error}"),
                );
            }
            Event::PublishStarted { publisher, seq } => {
                publishes.entry((*publisher, *seq)).or_default().started = Some(index);
            }
            Event::Published {
                publisher,
                seq,
                topic,
                body_digest,
                ..
            } => {
                publishes.entry((*publisher, *seq)).or_default().published =
                    Some((at, topic.clone(), *body_digest));
            }
            Event::PublishInterrupted {
                publisher,
                seq,
                topic,
                body_digest,
            } => {
                publishes.entry((*publisher, *seq)).or_default().interrupted =
                    Some((topic.clone(), *body_digest));
            }
            Event::PublishFailed {
                publisher,
                seq,
                error,
            } => violation(
                Checker::Api,
                format!("node {publisher}: publish of event {seq} failed: {error}"),
            ),
            Event::PublishSettled {
                publisher,
                seq,
                error: Some(error),
            } => violation(
                Checker::Api,
                format!("node {publisher}: a receipt of event {seq} failed: {error}"),
            ),
            Event::EventReceived {
                node,
                sub,
                producer,
                publisher,
                seq,
                ..
            } => {
                let key = ((*node, *sub), (*publisher, *seq));
                if *producer != Some(*publisher) {
                    violation(
                        Checker::Integrity,
                        format!(
                            "node {node}: subscription {sub} got event {publisher}/{seq} from producer {producer:?}"
                        ),
                    );
                }
                let copies = received.entry(key).or_default();
                if let Some(previous) = copies.last() {
                    if !crashed_between(&crashes, *node, previous.index, index) {
                        violation(
                            Checker::Duplicate,
                            format!(
                                "node {node}: subscription {sub} got event {publisher}/{seq} again (first at {})",
                                secs(copies[0].at)
                            ),
                        );
                    }
                }
                copies.push(Received { at, index });
                // FIFO holds within one run of the publisher: across its crash, an event of the
                // earlier run that a relay still holds may come after the new run's.
                let run = publishes
                    .get(&(*publisher, *seq))
                    .and_then(|facts| facts.started)
                    .map_or(0, |started| {
                        crashes
                            .get(publisher)
                            .map_or(0, |c| c.iter().filter(|&&c| c < started).count())
                    });
                let last = last_seq
                    .entry(((*node, *sub), *publisher, run))
                    .or_default();
                if *seq <= *last {
                    violation(
                        Checker::Fifo,
                        format!(
                            "node {node}: subscription {sub} got event {publisher}/{seq} after {publisher}/{last}"
                        ),
                    );
                }
                *last = (*last).max(*seq);
            }
            Event::Fault(FaultAction::Crash { nodes, .. }) => {
                for node in nodes {
                    crashes.entry(*node).or_default().push(index);
                    // A new subscription starts its order afresh.
                    last_seq.retain(|((subscriber, _), _, _), _| subscriber != node);
                }
            }
            _ => {}
        }
    }

    // Integrity: every yielded event was published, as it was published, on a matching topic.
    for (&((node, sub), (publisher, seq)), copies) in &received {
        let first = copies[0];
        let Some(pattern) = subscriptions.get(&(node, sub)).and_then(|incarnations| {
            incarnations
                .iter()
                .rev()
                .find(|(index, ..)| *index < first.index)
                .map(|(_, _, pattern, _)| pattern)
        }) else {
            violations.push(Violation {
                checker: Checker::Integrity,
                at: first.at,
                detail: format!(
                    "node {node}: subscription {sub} got event {publisher}/{seq} before it was subscribed"
                ),
            });
            continue;
        };
        let facts = publishes.get(&(publisher, seq));
        let sent = facts.and_then(|facts| {
            facts
                .published
                .as_ref()
                .map(|(_, topic, digest)| (topic, digest))
                .or(facts
                    .interrupted
                    .as_ref()
                    .map(|(topic, digest)| (topic, digest)))
        });
        let Some((topic, digest)) = sent else {
            violations.push(Violation {
                checker: Checker::Integrity,
                at: first.at,
                detail: format!(
                    "node {node}: subscription {sub} got event {publisher}/{seq}, which was never published"
                ),
            });
            continue;
        };
        if !pattern_matches(pattern, topic) {
            violations.push(Violation {
                checker: Checker::Integrity,
                at: first.at,
                detail: format!(
                    "node {node}: subscription {sub} ({pattern:?}) got event {publisher}/{seq} on {topic:?}, which it does not match"
                ),
            });
        }
        for copy in copies {
            let Event::EventReceived {
                topic: got_topic,
                body_digest,
                ..
            } = &records[copy.index].event
            else {
                continue;
            };
            if got_topic != topic || body_digest != digest {
                violations.push(Violation {
                    checker: Checker::Integrity,
                    at: copy.at,
                    detail: format!(
                        "node {node}: subscription {sub} got event {publisher}/{seq} on {got_topic:?} with another body or topic (published on {topic:?})"
                    ),
                });
            }
        }
    }

    // Coverage and liveness: every event published `Ok`, at every subscription in effect before
    // its publish started. A durable subscription is in effect from its first `Subscribed` on,
    // across its node's crashes: its publishers keep what it is owed while it is down (the
    // budget, `durable_retention_max`, is far above what a run publishes).
    for (&(publisher, seq), facts) in &publishes {
        let (Some(started), Some((published_at, topic, _))) = (facts.started, &facts.published)
        else {
            continue;
        };
        for (&(node, sub), incarnations) in &subscriptions {
            let durable = incarnations.first().is_some_and(|(.., durable)| *durable);
            // The subscription in effect when the publish started: its node did not crash since
            // (a durable one: its first incarnation).
            let in_effect = if durable {
                incarnations.first().filter(|(index, ..)| *index < started)
            } else {
                incarnations
                    .iter()
                    .rev()
                    .find(|(index, ..)| *index < started)
            };
            let Some(&(subscribed, _, ref pattern, _)) = in_effect else {
                continue;
            };
            if !pattern_matches(pattern, topic)
                || (!durable && crashed_between(&crashes, node, subscribed, started))
            {
                continue;
            }
            let first = received
                .get(&((node, sub), (publisher, seq)))
                .and_then(|copies| copies.iter().find(|copy| copy.index > subscribed));
            let excused = !durable
                && first.is_none()
                && crashes
                    .get(&node)
                    .is_some_and(|c| c.iter().any(|&c| c > started));
            if !excused {
                coverage.required += 1;
            }
            match first {
                Some(first) => {
                    coverage.delivered += 1;
                    let due = (*published_at).max(quiet_from) + PUBSUB_DELIVERY_BOUND;
                    if first.at > due {
                        violations.push(Violation {
                            checker: Checker::Liveness,
                            at: first.at,
                            detail: format!(
                                "node {node}: subscription {sub} got event {publisher}/{seq} (published at {}) only at {}",
                                secs(*published_at),
                                secs(first.at)
                            ),
                        });
                    }
                }
                // The subscriber's queue died with it (the documented limit).
                None if excused => {}
                None => violations.push(Violation {
                    checker: Checker::Coverage,
                    at: end,
                    detail: format!(
                        "event {publisher}/{seq} on {topic:?} (published at {}) never reached node {node}'s {}subscription {sub} ({pattern:?}, in effect since {})",
                        secs(*published_at),
                        if durable { "durable " } else { "" },
                        secs(records[subscribed].at)
                    ),
                }),
            }
        }
    }

    violations.sort_by_key(|violation| (violation.checker, violation.at));
    (violations, coverage)
}

/// The (subscription, event) pairs the pub/sub coverage rule required in a run, and how many of
/// them arrived (a late arrival counts here; the liveness checker judges it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Pairs the rule required: the subscription was in effect before the publish started and
    /// its node did not crash without the event.
    pub required: usize,
    /// Required pairs whose event the subscription yielded.
    pub delivered: usize,
}

impl Coverage {
    /// Delivered over required (1 when nothing was required).
    pub fn fraction(&self) -> f64 {
        if self.required == 0 {
            1.0
        } else {
            self.delivered as f64 / self.required as f64
        }
    }
}

/// Most event copies the nodes of a `gossip-scale` run may receive, all together, per event
/// they take in order (duplicates come from repairs racing the trees, and from relays sending
/// again after a reconnect or a restart).
pub const COPIES_PER_DELIVERY_MAX: f64 = 1.3;

/// Most links an event may cross to reach a subscriber in a mesh of `nodes`:
/// ⌊log2(nodes)⌋ + 2.
pub fn hops_bound(nodes: usize) -> u64 {
    u64::from(nodes.max(1).ilog2()) + 2
}

/// What the gossip trees of a run cost, from the coverage checker and every node's metrics
/// (every incarnation's counters added).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GossipCost {
    /// The coverage rule's pairs.
    pub coverage: Coverage,
    /// Sequenced event copies the nodes received, duplicates included (`event_copies`).
    pub copies: u64,
    /// Events the nodes took in order, once each per node start (`events_received`).
    pub received: u64,
    /// Copies the publishers re-sent over direct links (`events_repaired`).
    pub repaired: u64,
    /// The most links an event crossed (`event_hops_max`).
    pub hops_max: u64,
    /// [`hops_bound`] of the run's node count.
    pub hops_bound: u64,
}

impl GossipCost {
    /// Measures a run of `metrics.len()` nodes.
    pub fn measure(coverage: Coverage, metrics: &[weft::MetricsSnapshot]) -> Self {
        GossipCost {
            coverage,
            copies: metrics.iter().map(|m| m.event_copies).sum(),
            received: metrics.iter().map(|m| m.events_received).sum(),
            repaired: metrics.iter().map(|m| m.events_repaired).sum(),
            hops_max: metrics.iter().map(|m| m.event_hops_max).max().unwrap_or(0),
            hops_bound: hops_bound(metrics.len()),
        }
    }

    /// Copies received per event taken in order (NaN when nothing was received).
    pub fn copies_per_delivery(&self) -> f64 {
        self.copies as f64 / self.received as f64
    }

    /// `cost` violations (at `end`): more than [`COPIES_PER_DELIVERY_MAX`] copies per delivery,
    /// or an event that crossed more than [`hops_bound`] links. (Coverage below 1 is already a
    /// `coverage` violation per missing pair.)
    pub fn check(&self, end: Duration) -> Vec<Violation> {
        let mut violations = Vec::new();
        let ratio = self.copies_per_delivery();
        // NaN (nothing received) fails too.
        if ratio.is_nan() || ratio > COPIES_PER_DELIVERY_MAX {
            violations.push(Violation {
                checker: Checker::Cost,
                at: end,
                detail: format!(
                    "{ratio:.3} event copies per delivery ({} copies, {} events received; at most {COPIES_PER_DELIVERY_MAX})",
                    self.copies, self.received
                ),
            });
        }
        if self.hops_max > self.hops_bound {
            violations.push(Violation {
                checker: Checker::Cost,
                at: end,
                detail: format!(
                    "an event crossed {} links (at most {})",
                    self.hops_max, self.hops_bound
                ),
            });
        }
        violations
    }
}

/// What the work queue checkers know of one item.
#[derive(Debug, Default)]
struct ItemFacts {
    /// `push` returned `Ok`: (time, key, body digest).
    pushed: Option<(Duration, Option<u8>, u64)>,
    /// Interrupted by the producer's crash: (key, body digest).
    interrupted: Option<(Option<u8>, u64)>,
    /// Every take: (worker, record index, time).
    takes: Vec<(NodeIndex, usize, Duration)>,
    /// How many of them were copies (marked with `weft::REDELIVERY_HEADER`): made from a stuck
    /// worker, or reassigned from a silent one.
    copies: u32,
    /// Takes of marked copies of a keyed item: (worker, time).
    keyed_copies: Vec<(NodeIndex, Duration)>,
}

/// The work queue guarantees, judged from a `work` run's history (the producer is node 0;
/// `reassign_after` is the workers' `work_reassign_after`, `quiet_from` when the faults, pauses
/// and planned pushes were over):
///
/// | checker     | guarantee                                                                   |
/// |-------------|-----------------------------------------------------------------------------|
/// | `coverage`  | every item whose push returned `Ok` is taken by a worker                    |
/// | `duplicate` | an item is taken again only if a worker that took it crashed or went silent |
/// |             | (down at the producer for `reassign_after`) after its push, or once per     |
/// |             | copy of it (made from a worker that acknowledged nothing for the producer's |
/// |             | `work_ack_timeout`: paused, restarted and not pulling yet, or cut off by a  |
/// |             | partition its connection has not noticed); a worker's clean leave excuses   |
/// |             | nothing (what it settled is acknowledged before it goes); a keyed item is   |
/// |             | copied only when reassigned (some worker crashed, went silent or left       |
/// |             | between its push and the take), never from a stuck worker                   |
/// | `fifo`      | per shard key, items are first taken in push order (across workers, in the  |
/// |             | order the history has the takes)                                            |
/// | `integrity` | a taken item was pushed (returned `Ok` or interrupted), by the producer,    |
/// |             | with its body and key                                                       |
/// | `liveness`  | an item is first taken at most [`PUBSUB_DELIVERY_BOUND`] after the later of |
/// |             | its push and `quiet_from`                                                   |
/// | `api`       | pushes never fail; pulls fail only with `NotConfirmed`                      |
pub fn check_work(
    records: &[Record],
    end: Duration,
    quiet_from: Duration,
    reassign_after: Duration,
) -> Vec<Violation> {
    const PRODUCER: NodeIndex = 0;
    let mut violations = Vec::new();
    let mut items: BTreeMap<u32, ItemFacts> = BTreeMap::new();
    let mut crashes: BTreeMap<NodeIndex, Vec<Duration>> = BTreeMap::new();
    // Per worker: intervals its connection was down at the producer for `reassign_after`.
    let mut silences: BTreeMap<NodeIndex, Vec<(Duration, Duration)>> = BTreeMap::new();
    let mut down_since: BTreeMap<NodeIndex, Duration> = BTreeMap::new();
    // Workers that left cleanly, until they restart: what they settled was
    // acknowledged before they closed, so neither their absence nor a crash while gone
    // excuses a second take of an item they took.
    let mut left: BTreeSet<NodeIndex> = BTreeSet::new();
    // Every clean leave, (node, from, until its restart): the producer moves the items the
    // leaver had not taken yet, and items pushed to it before it was known to be gone.
    let mut leaves: Vec<(NodeIndex, Duration, Option<Duration>)> = Vec::new();
    // Per key: the highest seq first taken so far.
    let mut key_order: BTreeMap<u8, u32> = BTreeMap::new();

    let end_silence = |silences: &mut BTreeMap<NodeIndex, Vec<(Duration, Duration)>>,
                       worker: NodeIndex,
                       from: Duration,
                       to: Duration| {
        if to.saturating_sub(from) >= reassign_after {
            silences.entry(worker).or_default().push((from, to));
        }
    };
    for (index, record) in records.iter().enumerate() {
        let at = record.at;
        let mut violation = |checker, detail| {
            violations.push(Violation {
                checker,
                at,
                detail,
            })
        };
        match &record.event {
            Event::Pushed {
                seq,
                key,
                body_digest,
            } => items.entry(*seq).or_default().pushed = Some((at, *key, *body_digest)),
            Event::PushInterrupted {
                seq,
                key,
                body_digest,
            } => items.entry(*seq).or_default().interrupted = Some((*key, *body_digest)),
            Event::PushFailed { seq, error } => {
                violation(Checker::Api, format!("push of item {seq} failed: {error}"))
            }
            Event::PullFailed { node, error } if !error.contains("did not confirm") => {
                violation(Checker::Api, format!("node {node}: pull failed: {error}"))
            }
            Event::ItemTaken {
                worker,
                producer,
                seq,
                key,
                copy,
                ..
            } => {
                if *producer != Some(PRODUCER) {
                    violation(
                        Checker::Integrity,
                        format!("node {worker}: took item {seq} from producer {producer:?}"),
                    );
                }
                let facts = items.entry(*seq).or_default();
                if facts.takes.is_empty() {
                    if let Some(key) = key {
                        let last = key_order.entry(*key).or_default();
                        if *seq < *last {
                            violation(
                                Checker::Fifo,
                                format!(
                                    "node {worker}: took item {seq} of key {key} after item {last} of that key"
                                ),
                            );
                        }
                        *last = (*last).max(*seq);
                    }
                }
                facts.takes.push((*worker, index, at));
                facts.copies += u32::from(*copy);
                if *copy && key.is_some() {
                    facts.keyed_copies.push((*worker, at));
                }
            }
            // A worker that left cleanly is not silent: its absence excuses nothing.
            Event::PeerDown { node, peer } if *node == PRODUCER && !left.contains(peer) => {
                down_since.entry(*peer).or_insert(at);
            }
            Event::Fault(FaultAction::Leave { node }) => {
                left.insert(*node);
                leaves.push((*node, at, None));
            }
            Event::Fault(FaultAction::Restart { nodes }) => {
                for node in nodes {
                    if left.remove(node) {
                        for leave in leaves.iter_mut().filter(|l| l.0 == *node && l.2.is_none()) {
                            leave.2 = Some(at);
                        }
                    }
                }
            }
            Event::PeerUp { node, peer } if *node == PRODUCER => {
                if let Some(from) = down_since.remove(peer) {
                    end_silence(&mut silences, *peer, from, at);
                }
            }
            Event::Fault(FaultAction::Crash { nodes, .. }) => {
                for node in nodes {
                    if left.contains(node) {
                        continue; // nothing runs there to lose an acknowledgement
                    }
                    crashes.entry(*node).or_default().push(at);
                    if *node == PRODUCER {
                        // Its view of the workers starts afresh.
                        for (worker, from) in std::mem::take(&mut down_since) {
                            end_silence(&mut silences, worker, from, at);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for (worker, from) in down_since {
        end_silence(&mut silences, worker, from, end);
    }

    for (&seq, facts) in &items {
        let sent = facts
            .pushed
            .map(|(_, key, digest)| (key, digest))
            .or(facts.interrupted);
        // Integrity of every take.
        for &(worker, index, at) in &facts.takes {
            let Event::ItemTaken {
                key, body_digest, ..
            } = &records[index].event
            else {
                continue;
            };
            match sent {
                None => violations.push(Violation {
                    checker: Checker::Integrity,
                    at,
                    detail: format!("node {worker}: took item {seq}, which was never pushed"),
                }),
                Some((sent_key, digest)) if sent_key != *key || digest != *body_digest => {
                    violations.push(Violation {
                        checker: Checker::Integrity,
                        at,
                        detail: format!(
                            "node {worker}: took item {seq} with another body or key ({key:?}, pushed with {sent_key:?})"
                        ),
                    })
                }
                Some(_) => {}
            }
        }
        let since = facts.pushed.map_or(Duration::ZERO, |(at, ..)| at);
        // A copy of a keyed item comes only from a reassignment: some worker crashed, went
        // silent or left between the push and the take (stuck workers keep their keyed items).
        for &(worker, at) in &facts.keyed_copies {
            let reassigned = crashes
                .values()
                .any(|c| c.iter().any(|&c| since <= c && c <= at))
                || leaves.iter().any(|&(_, from, until)| {
                    from <= at && until.is_none_or(|until| until >= since)
                })
                || silences
                    .values()
                    .any(|s| s.iter().any(|&(from, to)| from <= at && to >= since));
            if !reassigned {
                violations.push(Violation {
                    checker: Checker::Duplicate,
                    at,
                    detail: format!(
                        "node {worker}: took a copy of keyed item {seq} with no worker crashed or silent since its push"
                    ),
                });
            }
        }
        // Duplicates: excused by a crash or a silence of a worker that took it, or one per copy
        // (its original and the copy are both taken when the stuck worker resumes).
        let mut copies = facts.copies;
        for &(worker, _, at) in facts.takes.iter().skip(1) {
            let excused = facts.takes.iter().any(|&(taker, ..)| {
                crashes
                    .get(&taker)
                    .is_some_and(|c| c.iter().any(|&c| c <= at))
                    || silences
                        .get(&taker)
                        .is_some_and(|s| s.iter().any(|&(from, to)| from <= at && to >= since))
            });
            if !excused && copies > 0 {
                copies -= 1;
            } else if !excused {
                let (first, _, first_at) = facts.takes[0];
                violations.push(Violation {
                    checker: Checker::Duplicate,
                    at,
                    detail: format!(
                        "node {worker}: took item {seq} again (first node {first} at {}) with no crash or silence of a worker that had it",
                        secs(first_at)
                    ),
                });
            }
        }
        // Coverage and liveness of what was pushed.
        let Some((pushed_at, ..)) = facts.pushed else {
            continue;
        };
        match facts.takes.first() {
            None => violations.push(Violation {
                checker: Checker::Coverage,
                at: end,
                detail: format!("item {seq} (pushed at {}) was never taken", secs(pushed_at)),
            }),
            Some(&(worker, _, at)) => {
                if at > pushed_at.max(quiet_from) + PUBSUB_DELIVERY_BOUND {
                    violations.push(Violation {
                        checker: Checker::Liveness,
                        at,
                        detail: format!(
                            "node {worker}: took item {seq} (pushed at {}) only at {}",
                            secs(pushed_at),
                            secs(at)
                        ),
                    });
                }
            }
        }
    }
    violations.sort_by_key(|violation| (violation.checker, violation.at));
    violations
}

/// One delivery against its pair's FIFO order (see the module docs).
fn fifo(
    order: &mut Order,
    key: MessageKey,
    at: Duration,
    skipped: &mut Vec<(Duration, MessageKey)>,
    violation: &mut impl FnMut(Checker, String),
) {
    let (from, receiver, stream, seq) = key;
    let rewind = std::mem::take(&mut order.rewind);
    if order.stream != Some(stream) {
        if order.replaced.contains(&stream) {
            violation(
                Checker::Fifo,
                format!("{}: a replaced stream delivers again", name(&key)),
            );
            return;
        }
        if let Some(old) = order.stream.replace(stream) {
            order.replaced.insert(old);
        }
        order.last = 0;
    } else if seq <= order.last {
        if !rewind {
            violation(
                Checker::Fifo,
                format!(
                    "{from}->{receiver}: seq {seq} delivered after seq {} (out of order or repeated)",
                    order.last
                ),
            );
            return;
        }
        // Re-deliveries after the receiver's crash start from its durable watermark.
        order.last = seq;
        return;
    }
    for missing in order.last + 1..seq {
        skipped.push((at, (from, receiver, stream, missing)));
    }
    order.last = seq;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::CrashMode;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn record(ms: u64, event: Event) -> Record {
        Record { at: at(ms), event }
    }

    fn accepted(ms: u64, from: NodeIndex, to: NodeIndex, seq: u64) -> Record {
        record(
            ms,
            Event::Accepted {
                from,
                to,
                stream: 7,
                seq,
                body_digest: seq * 10,
            },
        )
    }

    fn failed(ms: u64, from: NodeIndex, to: NodeIndex, body_digest: u64) -> Record {
        record(
            ms,
            Event::SendFailed {
                from,
                to,
                body_digest,
                spool: true,
                error: "the spool is full".into(),
            },
        )
    }

    fn delivered(ms: u64, from: NodeIndex, to: NodeIndex, seq: u64) -> Record {
        record(
            ms,
            Event::Delivered {
                at: to,
                from: Some(from),
                stream: 7,
                seq,
                lane: 0,
                body_digest: seq * 10,
            },
        )
    }

    fn acked(ms: u64, from: NodeIndex, to: NodeIndex, seq: u64) -> Record {
        record(
            ms,
            Event::Acked {
                from,
                to,
                stream: 7,
                seq,
            },
        )
    }

    fn crash(ms: u64, node: NodeIndex) -> Record {
        record(
            ms,
            Event::Fault(FaultAction::Crash {
                nodes: vec![node],
                mode: CrashMode::PowerLoss,
            }),
        )
    }

    fn checkers(records: &[Record]) -> Vec<Checker> {
        check(records, at(1_000))
            .into_iter()
            .map(|violation| violation.checker)
            .collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let records = [
            accepted(1, 0, 1, 1),
            accepted(2, 0, 1, 2),
            delivered(5, 0, 1, 1),
            delivered(6, 0, 1, 2),
            acked(10, 0, 1, 1),
            acked(10, 0, 1, 2),
        ];
        assert_eq!(checkers(&records), []);
    }

    fn scheduled(ms: u64, from: NodeIndex, to: NodeIndex, digest: u64, due_ms: u64) -> Record {
        record(
            ms,
            Event::Scheduled {
                from,
                to,
                body_digest: digest,
                due: at(due_ms),
            },
        )
    }

    #[test]
    fn delayed_messages_are_judged_by_body_whether_or_not_they_were_released_with_a_receipt() {
        // Released with a receipt (seq 2, digest 20), and after a crash without one (seq 3).
        let clean = [
            accepted(1, 0, 1, 1),
            scheduled(2, 0, 1, 20, 500),
            scheduled(3, 0, 1, 30, 600),
            delivered(5, 0, 1, 1),
            record(
                500,
                Event::Released {
                    from: 0,
                    to: 1,
                    stream: 7,
                    seq: 2,
                    body_digest: 20,
                },
            ),
            delivered(501, 0, 1, 2),
            delivered(650, 0, 1, 3),
        ];
        assert_eq!(checkers(&clean), []);
        // Early.
        let records = [scheduled(2, 0, 1, 20, 500), delivered(400, 0, 1, 2)];
        assert_eq!(checkers(&records), [Checker::Early]);
        // Never delivered.
        let records = [scheduled(2, 0, 1, 20, 500)];
        assert_eq!(checkers(&records), [Checker::Loss]);
        // Numbered twice: delivered under two ids (the receiver cannot drop the second).
        let mut twice = delivered(700, 0, 1, 3);
        if let Event::Delivered { body_digest, .. } = &mut twice.event {
            *body_digest = 20;
        }
        let records = [scheduled(2, 0, 1, 20, 500), delivered(600, 0, 1, 2), twice];
        assert_eq!(checkers(&records), [Checker::Duplicate]);
    }

    #[test]
    fn each_broken_guarantee_is_reported() {
        // Lost (and acked without delivery).
        let records = [accepted(1, 0, 1, 1), acked(10, 0, 1, 1)];
        assert_eq!(checkers(&records), [Checker::Loss, Checker::Ack]);
        // Duplicated.
        let records = [
            accepted(1, 0, 1, 1),
            delivered(5, 0, 1, 1),
            delivered(6, 0, 1, 1),
        ];
        assert_eq!(checkers(&records), [Checker::Duplicate, Checker::Fifo]);
        // Reordered.
        let records = [
            accepted(1, 0, 1, 1),
            accepted(1, 0, 1, 2),
            delivered(5, 0, 1, 2),
            delivered(6, 0, 1, 1),
        ];
        assert_eq!(checkers(&records), [Checker::Fifo, Checker::Fifo]);
        // Acked before delivered.
        let records = [
            accepted(1, 0, 1, 1),
            acked(4, 0, 1, 1),
            delivered(5, 0, 1, 1),
        ];
        assert_eq!(checkers(&records), [Checker::Ack]);
        // A send failed on a healthy node.
        let records = [failed(1, 0, 1, 10)];
        assert_eq!(checkers(&records), [Checker::Api]);
    }

    #[test]
    fn a_receiver_crash_allows_a_redelivery_but_not_after_the_ack() {
        // Taken, then the receiver crashed before its watermark was durable: it comes again.
        let records = [
            accepted(1, 0, 1, 1),
            accepted(1, 0, 1, 2),
            delivered(5, 0, 1, 1),
            delivered(6, 0, 1, 2),
            crash(7, 1),
            delivered(20, 0, 1, 2),
            acked(25, 0, 1, 1),
            acked(25, 0, 1, 2),
        ];
        assert_eq!(checkers(&records), []);
        // The receipt resolved: the receiver's watermark was durable, so no crash excuses it.
        let records = [
            accepted(1, 0, 1, 1),
            delivered(5, 0, 1, 1),
            acked(8, 0, 1, 1),
            crash(9, 1),
            crash(9, 0),
            delivered(20, 0, 1, 1),
        ];
        assert_eq!(checkers(&records), [Checker::Redelivered]);
        // A crash of the sender excuses nothing at the receiver.
        let records = [
            accepted(1, 0, 1, 1),
            delivered(5, 0, 1, 1),
            crash(7, 0),
            delivered(20, 0, 1, 1),
        ];
        assert_eq!(checkers(&records), [Checker::Duplicate, Checker::Fifo]);
    }

    #[test]
    fn reports_and_refusals_are_not_losses() {
        let dead = record(
            9,
            Event::DeadLettered {
                from: 0,
                to: 1,
                stream: 7,
                seq: 1,
                reason: "expired".into(),
            },
        );
        let capped = record(
            0,
            Event::SpoolCapped {
                node: 0,
                bytes_max: 1,
            },
        );
        // Seq 1 dead-lettered (skipped on the wire), seq 2 not accepted but delivered once,
        // seq 3 delivered.
        let records = [
            capped,
            accepted(1, 0, 1, 1),
            failed(2, 0, 1, 20),
            accepted(3, 0, 1, 3),
            delivered(5, 0, 1, 2),
            delivered(6, 0, 1, 3),
            dead,
        ];
        assert_eq!(checkers(&records), []);
        // Something nobody sent.
        let records = [delivered(5, 0, 1, 4)];
        assert_eq!(checkers(&records), [Checker::Integrity]);
        // The sender's restart quarantined a segment: the operator was told.
        let quarantined = record(
            8,
            Event::Quarantined {
                node: 0,
                segments: 1,
            },
        );
        let records = [accepted(1, 0, 1, 1), crash(7, 0), quarantined];
        assert_eq!(checkers(&records), []);
    }
    fn subscribed(ms: u64, node: NodeIndex, pattern: &str) -> Record {
        record(
            ms,
            Event::Subscribed {
                node,
                sub: 0,
                pattern: pattern.into(),
                durable: false,
            },
        )
    }

    /// `PublishStarted` and `Published` of event `publisher/seq` on `topic`.
    fn published(ms: u64, publisher: NodeIndex, seq: u32, topic: &str) -> [Record; 2] {
        [
            record(ms, Event::PublishStarted { publisher, seq }),
            record(
                ms,
                Event::Published {
                    publisher,
                    seq,
                    topic: topic.into(),
                    body_digest: u64::from(seq) * 10,
                    remote: 1,
                    local: 0,
                },
            ),
        ]
    }

    fn received(ms: u64, node: NodeIndex, publisher: NodeIndex, seq: u32, topic: &str) -> Record {
        record(
            ms,
            Event::EventReceived {
                node,
                sub: 0,
                producer: Some(publisher),
                publisher,
                seq,
                topic: topic.into(),
                body_digest: u64::from(seq) * 10,
            },
        )
    }

    fn pubsub_checkers(records: &[Record]) -> Vec<Checker> {
        check_pubsub(records, at(60_000), at(1_000))
            .0
            .into_iter()
            .map(|violation| violation.checker)
            .collect()
    }

    /// Node 1 subscribes to `orders/*`, node 2 to `users/**`; node 0 publishes two events on
    /// `orders/created` and one on `misc/noise`.
    fn pubsub_history() -> Vec<Record> {
        let mut records = vec![subscribed(1, 1, "orders/*"), subscribed(1, 2, "users/**")];
        records.extend(published(10, 0, 1, "orders/created"));
        records.extend(published(11, 0, 2, "misc/noise"));
        records.extend(published(12, 0, 3, "orders/created"));
        records
    }

    /// The coverage rule's pairs are counted, and a subscriber's crash without the event takes
    /// the pair out of the count, as it excuses it from the checker.
    #[test]
    fn coverage_counts_the_required_pairs_and_their_deliveries() {
        let mut records = pubsub_history();
        records.push(received(15, 1, 0, 1, "orders/created"));
        let (violations, coverage) = check_pubsub(&records, at(60_000), at(1_000));
        assert_eq!(violations.len(), 1);
        assert_eq!(
            coverage,
            Coverage {
                required: 2,
                delivered: 1
            }
        );
        assert_eq!(coverage.fraction(), 0.5);
        records.push(crash(20, 1));
        let (violations, coverage) = check_pubsub(&records, at(60_000), at(1_000));
        assert_eq!(violations, []);
        assert_eq!(coverage.fraction(), 1.0);
        assert_eq!(coverage.required, 1);
    }

    #[test]
    fn gossip_cost_bounds_copies_per_delivery_and_hops() {
        assert_eq!(hops_bound(100), 8);
        assert_eq!(hops_bound(5), 4);
        let coverage = Coverage {
            required: 10,
            delivered: 10,
        };
        let cost = |copies: u64, received: u64, hops: u64| {
            let mut metrics = vec![weft::MetricsSnapshot::default(); 100];
            metrics[7].event_copies = copies;
            metrics[7].events_received = received;
            metrics[9].event_hops_max = hops;
            GossipCost::measure(coverage, &metrics)
                .check(at(1))
                .into_iter()
                .map(|violation| violation.checker)
                .collect::<Vec<_>>()
        };
        assert_eq!(cost(13, 10, 8), []);
        assert_eq!(cost(14, 10, 8), [Checker::Cost]);
        assert_eq!(cost(10, 10, 9), [Checker::Cost]);
        assert_eq!(cost(0, 0, 1), [Checker::Cost], "nothing received");
    }

    #[test]
    fn a_clean_pubsub_history_passes() {
        let mut records = pubsub_history();
        records.push(received(15, 1, 0, 1, "orders/created"));
        records.push(received(16, 1, 0, 3, "orders/created"));
        assert_eq!(pubsub_checkers(&records), []);
    }

    #[test]
    fn each_broken_pubsub_guarantee_is_reported() {
        let base = pubsub_history();
        let with = |extra: &[Record]| {
            let mut records = base.clone();
            records.extend_from_slice(extra);
            pubsub_checkers(&records)
        };
        // A matching subscription misses an event.
        assert_eq!(
            with(&[received(15, 1, 0, 1, "orders/created")]),
            [Checker::Coverage]
        );
        // Twice.
        assert_eq!(
            with(&[
                received(15, 1, 0, 1, "orders/created"),
                received(16, 1, 0, 1, "orders/created"),
                received(17, 1, 0, 3, "orders/created"),
            ]),
            [Checker::Duplicate, Checker::Fifo]
        );
        // Out of order.
        assert_eq!(
            with(&[
                received(15, 1, 0, 3, "orders/created"),
                received(16, 1, 0, 1, "orders/created"),
            ]),
            [Checker::Fifo]
        );
        // An event the pattern does not match, and one nobody published.
        assert_eq!(
            with(&[
                received(15, 1, 0, 1, "orders/created"),
                received(15, 1, 0, 3, "orders/created"),
                received(15, 2, 0, 1, "orders/created"),
                received(16, 2, 0, 9, "users/signup"),
            ]),
            [Checker::Integrity, Checker::Integrity]
        );
        // Too late after the faults.
        assert_eq!(
            with(&[
                received(15, 1, 0, 1, "orders/created"),
                received(12_000, 1, 0, 3, "orders/created"),
            ]),
            [Checker::Liveness]
        );
    }

    #[test]
    fn a_subscribers_crash_excuses_what_it_had_not_taken() {
        let mut records = pubsub_history();
        records.push(received(15, 1, 0, 1, "orders/created"));
        records.push(crash(20, 1));
        // The restarted subscriber may get event 1 again and must get what comes after its new
        // subscription.
        records.push(subscribed(30, 1, "orders/*"));
        records.push(received(31, 1, 0, 1, "orders/created"));
        assert_eq!(pubsub_checkers(&records), []);
        records.extend(published(40, 0, 4, "orders/created"));
        assert_eq!(pubsub_checkers(&records), [Checker::Coverage]);
        // A subscription that came after the publish is not owed it.
        let mut late = vec![subscribed(50, 2, "orders/*")];
        late.extend(published(40, 0, 1, "orders/created"));
        late.sort_by_key(|record| record.at);
        assert_eq!(pubsub_checkers(&late), []);
    }
    fn pushed(ms: u64, seq: u32, key: Option<u8>) -> Record {
        record(
            ms,
            Event::Pushed {
                seq,
                key,
                body_digest: u64::from(seq),
            },
        )
    }

    fn taken(ms: u64, worker: NodeIndex, seq: u32, key: Option<u8>) -> Record {
        record(
            ms,
            Event::ItemTaken {
                worker,
                producer: Some(0),
                seq,
                key,
                body_digest: u64::from(seq),
                copy: false,
            },
        )
    }

    /// A copy of item `seq` taken (one a stuck worker held).
    fn copy_taken(ms: u64, worker: NodeIndex, seq: u32, key: Option<u8>) -> Record {
        let mut record = taken(ms, worker, seq, key);
        if let Event::ItemTaken { copy, .. } = &mut record.event {
            *copy = true;
        }
        record
    }

    fn work_checkers(records: &[Record]) -> Vec<Checker> {
        check_work(records, at(60_000), at(1_000), at(2_000))
            .into_iter()
            .map(|violation| violation.checker)
            .collect()
    }

    #[test]
    fn each_broken_work_guarantee_is_reported() {
        let base = vec![
            pushed(10, 1, Some(0)),
            pushed(11, 2, None),
            pushed(12, 3, Some(0)),
        ];
        let with = |extra: &[Record]| {
            let mut records = base.clone();
            records.extend_from_slice(extra);
            work_checkers(&records)
        };
        let clean = [
            taken(20, 1, 1, Some(0)),
            taken(21, 2, 2, None),
            taken(22, 1, 3, Some(0)),
        ];
        assert_eq!(with(&clean), []);
        // Never taken.
        assert_eq!(with(&clean[..2]), [Checker::Coverage]);
        // Out of key order (across workers).
        assert_eq!(
            with(&[
                taken(20, 2, 3, Some(0)),
                taken(21, 1, 1, Some(0)),
                taken(22, 2, 2, None)
            ]),
            [Checker::Fifo]
        );
        // Twice, with and without a silence of a worker that had it.
        let mut twice = clean.to_vec();
        twice.push(taken(30, 3, 1, Some(0)));
        assert_eq!(with(&twice), [Checker::Duplicate]);
        let silence = [
            record(15, Event::PeerDown { node: 0, peer: 1 }),
            record(2_500, Event::PeerUp { node: 0, peer: 1 }),
        ];
        let mut excused = silence.to_vec();
        excused.extend(twice.iter().cloned());
        excused.sort_by_key(|record| record.at);
        assert_eq!(with(&excused), []);
        // A stuck worker's item: its copy and its original, both taken; one more take of it
        // is a duplicate, and so is a copy of a keyed item.
        let mut copied = clean.to_vec();
        copied.push(copy_taken(2_600, 3, 2, None));
        assert_eq!(with(&copied), []);
        let mut thrice = copied.clone();
        thrice.push(taken(2_700, 1, 2, None));
        assert_eq!(with(&thrice), [Checker::Duplicate]);
        let mut keyed = copied.clone();
        keyed.push(copy_taken(2_700, 3, 1, Some(0)));
        assert_eq!(with(&keyed), [Checker::Duplicate]);
        // A keyed item reassigned from a silent worker is marked too: the silence excuses it.
        let mut reassigned = silence.to_vec();
        reassigned.extend(clean.iter().cloned());
        reassigned.push(copy_taken(2_700, 3, 1, Some(0)));
        reassigned.sort_by_key(|record| record.at);
        assert_eq!(with(&reassigned), []);
        // Never pushed.
        assert_eq!(
            with(&[
                clean[0].clone(),
                clean[1].clone(),
                clean[2].clone(),
                taken(40, 2, 9, None)
            ]),
            [Checker::Integrity]
        );
    }
}
