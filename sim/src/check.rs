//! Checkers: Weft's point-to-point guarantees, judged from the recorded history alone.
//!
//! Each checker reads [`Record`]s and reports [`Violation`]s with enough detail (times, nodes,
//! sequence numbers) to find the spot in a replay with `RUST_LOG`. They assume what every scenario
//! provides: the network is whole after the fault phase and the run lasted long enough to drain,
//! and no node restarts (so each (sender, receiver) pair has one stream, numbered from 1).
//!
//! | checker      | guarantee                                                                   |
//! |--------------|-----------------------------------------------------------------------------|
//! | `loss`       | every accepted message is delivered at its destination by the end          |
//! | `duplicate`  | each (producer, stream, seq) is delivered at most once per receiver         |
//! | `fifo`       | per (sender, receiver) delivered seqs are 1, 2, 3, ... (in order, no gaps)  |
//! | `ack`        | a receipt resolves only for a message the receiver's inbox already yielded  |
//! | `integrity`  | the delivered body is the accepted body; no message from nowhere           |
//! | `api`        | sends and receipts never fail while the node runs; no protocol errors       |
//!
//! (The harness adds `simulation` violations when a host fails or a task panics.)
//!
//! The `ack` checker knows about consumer pauses: the driver acknowledges a message once it is in
//! the application's queue, and a paused application takes it from there only when it resumes.
//! An ack that arrives while the receiver is paused is therefore fine if the message is yielded by
//! the time the consumer resumed; at any other time the inbox yields a queued message at once.
//!
//! The trace-hash check (same seed, same hash) needs two runs; the harness and the sweep do it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::history::{Event, NodeIndex, Record};

/// Which guarantee a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Checker {
    /// An accepted message was never delivered.
    Loss,
    /// A message was delivered twice.
    Duplicate,
    /// Out of order or a gap in one sender's stream.
    Fifo,
    /// A receipt resolved for a message not (yet) delivered.
    Ack,
    /// Wrong body, or a delivery nobody sent.
    Integrity,
    /// A send or receipt failed, or the driver reported a protocol error.
    Api,
    /// The simulation itself failed: a host returned an error or a task panicked.
    Simulation,
}

impl Checker {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Checker::Loss => "loss",
            Checker::Duplicate => "duplicate",
            Checker::Fifo => "fifo",
            Checker::Ack => "ack",
            Checker::Integrity => "integrity",
            Checker::Api => "api",
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

#[derive(Debug)]
struct Accepted {
    at: Duration,
    stream: u64,
    body_digest: u64,
}

/// A delivery as the receiver saw it: (receiver, producer, stream, seq).
type DeliveryKey = (NodeIndex, NodeIndex, u64, u64);

/// One delivery in a (receiver, producer) order: (time, stream, seq).
type Ordered = (Duration, u64, u64);

/// Runs every checker over `records` (a whole run that ended at `end`).
pub fn check(records: &[Record], end: Duration) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut accepted: BTreeMap<(NodeIndex, NodeIndex, u64), Accepted> = BTreeMap::new();
    let mut deliveries: BTreeMap<DeliveryKey, Vec<(Duration, u64)>> = BTreeMap::new();
    // Per (receiver, producer): (time, stream, seq) in delivery order.
    let mut orders: BTreeMap<(NodeIndex, NodeIndex), Vec<Ordered>> = BTreeMap::new();
    let mut acks = Vec::new();
    // Per node: (paused at, resumed at) in time order.
    let mut pauses: BTreeMap<NodeIndex, Vec<(Duration, Option<Duration>)>> = BTreeMap::new();

    for record in records {
        let at = record.at;
        match &record.event {
            Event::Accepted {
                from,
                to,
                stream,
                seq,
                body_digest,
            } => {
                let previous = accepted.insert(
                    (*from, *to, *seq),
                    Accepted {
                        at,
                        stream: *stream,
                        body_digest: *body_digest,
                    },
                );
                if previous.is_some() {
                    violations.push(Violation {
                        checker: Checker::Api,
                        at,
                        detail: format!("{from}->{to}: two sends returned seq {seq}"),
                    });
                }
            }
            Event::Delivered {
                at: receiver,
                from,
                stream,
                seq,
                body_digest,
            } => {
                let Some(from) = from else {
                    violations.push(Violation {
                        checker: Checker::Integrity,
                        at,
                        detail: format!(
                            "node {receiver} got seq {seq} from a producer that is not in the run"
                        ),
                    });
                    continue;
                };
                deliveries
                    .entry((*receiver, *from, *stream, *seq))
                    .or_default()
                    .push((at, *body_digest));
                orders
                    .entry((*receiver, *from))
                    .or_default()
                    .push((at, *stream, *seq));
            }
            Event::Acked { from, to, seq } => acks.push((at, *from, *to, *seq)),
            Event::SendFailed { from, to, error } => violations.push(Violation {
                checker: Checker::Api,
                at,
                detail: format!("send {from}->{to} failed: {error}"),
            }),
            Event::ReceiptFailed { from, to, seq } => violations.push(Violation {
                checker: Checker::Api,
                at,
                detail: format!("receipt {from}->{to} seq {seq} failed while the node ran"),
            }),
            Event::ConsumerPaused { node } => pauses.entry(*node).or_default().push((at, None)),
            Event::ConsumerResumed { node } => {
                if let Some(last) = pauses.get_mut(node).and_then(|p| p.last_mut()) {
                    last.1 = Some(at);
                }
            }
            Event::PeerUp { .. } | Event::PeerDown { .. } | Event::Fault(_) => {}
        }
    }

    // loss and integrity, per accepted message.
    for ((from, to, seq), sent) in &accepted {
        let key = (*to, *from, sent.stream, *seq);
        match deliveries.get(&key) {
            None => violations.push(Violation {
                checker: Checker::Loss,
                at: end,
                detail: format!(
                    "{from}->{to} seq {seq} (accepted at {:.3}s) never delivered by the end ({:.3}s)",
                    sent.at.as_secs_f64(),
                    end.as_secs_f64()
                ),
            }),
            Some(copies) => {
                for (at, digest) in copies {
                    if *digest != sent.body_digest {
                        violations.push(Violation {
                            checker: Checker::Integrity,
                            at: *at,
                            detail: format!("{from}->{to} seq {seq} delivered with another body"),
                        });
                    }
                }
            }
        }
    }

    // duplicates, and deliveries nobody sent.
    for ((receiver, from, stream, seq), copies) in &deliveries {
        let sent = accepted.get(&(*from, *receiver, *seq));
        if sent.is_none_or(|sent| sent.stream != *stream) {
            violations.push(Violation {
                checker: Checker::Integrity,
                at: copies[0].0,
                detail: format!(
                    "{from}->{receiver} seq {seq} (stream {stream:016x}) delivered but never accepted"
                ),
            });
        }
        if copies.len() > 1 {
            let times: Vec<String> = copies
                .iter()
                .map(|(at, _)| format!("{:.3}s", at.as_secs_f64()))
                .collect();
            violations.push(Violation {
                checker: Checker::Duplicate,
                at: copies[1].0,
                detail: format!(
                    "{from}->{receiver} seq {seq} delivered {} times, at {}",
                    copies.len(),
                    times.join(", ")
                ),
            });
        }
    }

    // FIFO: each sender's stream arrives as 1, 2, 3, ...
    for ((receiver, from), order) in &orders {
        let mut previous: Option<(u64, u64)> = None;
        for &(at, stream, seq) in order {
            let expected = match previous {
                None => 1,
                Some((previous_stream, _)) if previous_stream != stream => {
                    violations.push(Violation {
                        checker: Checker::Fifo,
                        at,
                        detail: format!(
                            "{from}->{receiver}: stream changed from {previous_stream:016x} to {stream:016x} without a restart"
                        ),
                    });
                    previous = Some((stream, seq));
                    continue;
                }
                Some((_, previous_seq)) => previous_seq + 1,
            };
            if seq < expected {
                violations.push(Violation {
                    checker: Checker::Fifo,
                    at,
                    detail: format!(
                        "{from}->{receiver}: seq {seq} delivered after seq {} (out of order or repeated)",
                        expected - 1
                    ),
                });
            } else if seq > expected {
                violations.push(Violation {
                    checker: Checker::Fifo,
                    at,
                    detail: format!(
                        "{from}->{receiver}: seq {seq} delivered after seq {} (gap: {expected}..{seq} skipped)",
                        expected - 1
                    ),
                });
            }
            // Keep the highest seen, so one stray message is reported once, not for every
            // message after it.
            let highest = previous.map_or(seq, |(_, previous_seq)| previous_seq.max(seq));
            previous = Some((stream, highest));
        }
    }

    // acked ⇒ delivered (before the ack, unless the receiver was paused then).
    for (acked_at, from, to, seq) in acks {
        let Some(sent) = accepted.get(&(from, to, seq)) else {
            violations.push(Violation {
                checker: Checker::Ack,
                at: acked_at,
                detail: format!("{from}->{to} seq {seq} acked but never accepted"),
            });
            continue;
        };
        let first_delivery = deliveries
            .get(&(to, from, sent.stream, seq))
            .and_then(|copies| copies.first())
            .map(|(at, _)| *at);
        match first_delivery {
            None => violations.push(Violation {
                checker: Checker::Ack,
                at: acked_at,
                detail: format!(
                    "{from}->{to} seq {seq} acked at {:.3}s but never delivered",
                    acked_at.as_secs_f64()
                ),
            }),
            Some(delivered_at) if delivered_at > acked_at => {
                let excused = pauses.get(&to).is_some_and(|node_pauses| {
                    node_pauses.iter().any(|&(paused, resumed)| {
                        paused <= acked_at
                            && resumed.is_none_or(|resumed| {
                                acked_at <= resumed && delivered_at <= resumed
                            })
                    })
                });
                if !excused {
                    violations.push(Violation {
                        checker: Checker::Ack,
                        at: acked_at,
                        detail: format!(
                            "{from}->{to} seq {seq} acked at {:.3}s before its delivery at {:.3}s",
                            acked_at.as_secs_f64(),
                            delivered_at.as_secs_f64()
                        ),
                    });
                }
            }
            Some(_) => {}
        }
    }

    violations.sort_by_key(|violation| (violation.checker, violation.at));
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn accepted(ms: u64, from: NodeIndex, to: NodeIndex, seq: u64) -> Record {
        Record {
            at: at(ms),
            event: Event::Accepted {
                from,
                to,
                stream: 7,
                seq,
                body_digest: seq * 10,
            },
        }
    }

    fn delivered(ms: u64, from: NodeIndex, to: NodeIndex, seq: u64) -> Record {
        Record {
            at: at(ms),
            event: Event::Delivered {
                at: to,
                from: Some(from),
                stream: 7,
                seq,
                body_digest: seq * 10,
            },
        }
    }

    fn acked(ms: u64, from: NodeIndex, to: NodeIndex, seq: u64) -> Record {
        Record {
            at: at(ms),
            event: Event::Acked { from, to, seq },
        }
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
    }

    #[test]
    fn an_ack_during_a_consumer_pause_is_excused_until_the_resume() {
        let pause = |ms, node| Record {
            at: at(ms),
            event: Event::ConsumerPaused { node },
        };
        let resume = |ms, node| Record {
            at: at(ms),
            event: Event::ConsumerResumed { node },
        };
        let records = [
            pause(0, 1),
            accepted(1, 0, 1, 1),
            acked(4, 0, 1, 1),
            resume(9, 1),
            delivered(9, 0, 1, 1),
        ];
        assert_eq!(checkers(&records), []);
        // Delivered only after the resume: not excused.
        let records = [
            pause(0, 1),
            accepted(1, 0, 1, 1),
            acked(4, 0, 1, 1),
            resume(9, 1),
            delivered(12, 0, 1, 1),
        ];
        assert_eq!(checkers(&records), [Checker::Ack]);
    }
}
