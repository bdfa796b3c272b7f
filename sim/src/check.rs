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
//! | `fifo`        | per (sender, receiver), each stream arrives in increasing order, never    |
//! |               | skipping an accepted message, and a replaced stream never comes back;     |
//! |               | after a receiver crash the stream may go back (re-deliveries)             |
//! | `ack`         | a receipt resolves only for a message the receiver's application took     |
//! | `integrity`   | a delivered body is the one sent; a message not accepted may arrive (at   |
//! |               | most once outside receiver crashes), a message nobody sent never does    |
//! | `api`         | sends fail only on a faulty or capped spool, receipts only by dead        |
//! |               | letters, starts only on a faulty disk; no protocol errors                 |
//!
//! (The harness adds `liveness` — the run settled: every spool drained — and `simulation`
//! violations when a host fails or a task panics.)
//!
//! Excused: messages a sender may have lost to a quarantined spool segment (its restart found
//! damage, the operator's alarm went off) count as reported, not lost.
//!
//! The trace-hash check (same seed, same hash) needs two runs; the harness and the sweep do it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::history::{Event, NodeIndex, Record};
use crate::scenario::FaultAction;

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
    /// The run did not settle: sends, receipts or spools were not done by the deadline.
    Liveness,
    /// The simulation itself failed: a host returned an error or a task panicked.
    Simulation,
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
            Checker::Liveness => "liveness",
            Checker::Simulation => "simulation",
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

#[derive(Debug)]
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
    let mut orders: BTreeMap<(NodeIndex, NodeIndex), Order> = BTreeMap::new();
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
            Event::Accepted {
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
                    orders.entry((*receiver, *from)).or_default(),
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
                    for ((receiver, _), order) in orders.iter_mut() {
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
            | Event::UnsyncedLost { .. }
            | Event::PeerUp { .. }
            | Event::PeerDown { .. }
            | Event::ConsumerPaused { .. }
            | Event::ConsumerResumed { .. }
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
}
