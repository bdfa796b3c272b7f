//! Node-wide counters. Atomics updated by the peer tasks once per batch, read by anyone.

use std::sync::atomic::{AtomicU64, Ordering};

use weft_proto::link::LinkStats;

/// Live counters of a node.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    sent: AtomicU64,
    retransmitted: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    delivered: AtomicU64,
    peers_connected: AtomicU64,
    protocol_errors: AtomicU64,
    dial_failures: AtomicU64,
    refusals: AtomicU64,
    accepted: AtomicU64,
    dead_lettered: AtomicU64,
    spool_pending: AtomicU64,
    spool_errors: AtomicU64,
    watermarks_persisted: AtomicU64,
    pub(crate) events_delivered: AtomicU64,
    pub(crate) events_dropped: AtomicU64,
    pub(crate) volatile_dropped: AtomicU64,
    pub(crate) event_copies: AtomicU64,
    pub(crate) events_received: AtomicU64,
    pub(crate) events_relayed: AtomicU64,
    pub(crate) events_repaired: AtomicU64,
    pub(crate) event_hops_max: AtomicU64,
    pub(crate) events_retained: AtomicU64,
    pub(crate) durable_subscriptions: AtomicU64,
    pub(crate) durable_events_owed: AtomicU64,
    pub(crate) durable_events_dropped: AtomicU64,
    pub(crate) work_redelivered: AtomicU64,
    pub(crate) idempotent_repeats: AtomicU64,
    pub(crate) events_expired: AtomicU64,
    scheduled: AtomicU64,
    released: AtomicU64,
}

/// A snapshot of a node's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Messages transmitted for the first time.
    pub sent: u64,
    /// Messages transmitted again after a reconnect.
    pub retransmitted: u64,
    /// Messages acknowledged by their peers.
    pub acked: u64,
    /// Messages accepted from peers.
    pub received: u64,
    /// Duplicates received and dropped.
    pub duplicates: u64,
    /// Messages handed to the application's channel queues.
    pub delivered: u64,
    /// Peers with an established connection now.
    pub peers_connected: u64,
    /// Connections closed because the peer broke the protocol.
    pub protocol_errors: u64,
    /// Dials that failed.
    pub dial_failures: u64,
    /// Peers refused at the hello, or that refused us.
    pub refusals: u64,
    /// Sends made durable in the spool.
    pub accepted: u64,
    /// Messages given up (expiry, retry budget) and moved to the dead-letter log.
    pub dead_lettered: u64,
    /// Outgoing messages in the spool, not yet acknowledged.
    pub spool_pending: u64,
    /// Spool operations that failed (storage errors, full dead-letter log).
    pub spool_errors: u64,
    /// Inbound dedup watermarks made durable.
    pub watermarks_persisted: u64,
    /// Events handed to local subscriptions.
    pub events_delivered: u64,
    /// Best-effort events dropped at a full queue (a subscription's, or a peer's).
    pub events_dropped: u64,
    /// Volatile messages (requests, replies, announcements, best-effort events) dropped
    /// because their connection went away before they were written.
    pub volatile_dropped: u64,
    /// Copies of sequenced events received (first copies, copies already delivered, and
    /// copies dropped at a full out-of-order hold): with `events_received`, the copies per
    /// delivered event of the gossip trees.
    pub event_copies: u64,
    /// Sequenced events taken in order from their publishers (once each per node start).
    pub events_received: u64,
    /// Event copies relayed to children of a gossip tree.
    pub events_relayed: u64,
    /// Event copies a publisher re-sent over a direct link (repairs).
    pub events_repaired: u64,
    /// The most links an event received had crossed (1: straight from its publisher).
    pub event_hops_max: u64,
    /// Events this node published and keeps for repair, not yet confirmed by every addressee.
    pub events_retained: u64,
    /// Durable subscriptions of peers this node keeps sending to as a publisher (its registry).
    pub durable_subscriptions: u64,
    /// Events this node published that its links hold for durable subscribers, not yet
    /// acknowledged (an event owed to several durable subscriptions of one node counts once).
    pub durable_events_owed: u64,
    /// Events owed to durable subscribers that this node gave up (dead-lettered): over a
    /// subscription's retention budget (`durable_retention_max`) or past its age
    /// (`durable_retention_age`).
    pub durable_events_dropped: u64,
    /// Work items this node copied from a stuck worker (connected, holding them without
    /// acknowledging anything for `work_ack_timeout`) to another worker.
    pub work_redelivered: u64,
    /// Messages dropped because their producer sent a message with the same idempotency key
    /// before, within the window (see [`crate::MessageOptions::idempotency_key`]).
    pub idempotent_repeats: u64,
    /// Events dropped by this subscriber node because their expiry had passed.
    pub events_expired: u64,
    /// Delayed messages waiting for their due time (a gauge).
    pub scheduled: u64,
    /// Delayed messages numbered into their stream at their due time.
    pub released: u64,
}

impl Metrics {
    pub(crate) fn add_link_delta(&self, before: &LinkStats, after: &LinkStats) {
        let add = |counter: &AtomicU64, a: u64, b: u64| {
            if b > a {
                counter.fetch_add(b - a, Ordering::Relaxed);
            }
        };
        add(&self.sent, before.sent, after.sent);
        add(
            &self.retransmitted,
            before.retransmitted,
            after.retransmitted,
        );
        add(&self.acked, before.acked, after.acked);
        add(&self.received, before.received, after.received);
        add(&self.duplicates, before.duplicates, after.duplicates);
        add(
            &self.volatile_dropped,
            before.volatile_dropped,
            after.volatile_dropped,
        );
    }

    pub(crate) fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn peer_up(&self) {
        self.peers_connected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn peer_down(&self) {
        self.peers_connected.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dial_failure(&self) {
        self.dial_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refusal(&self) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn accepted(&self, n: u64) {
        self.accepted.fetch_add(n, Ordering::Relaxed);
        self.spool_pending.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn spool_retired(&self, n: u64) {
        self.spool_pending.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn recovered(&self, n: u64) {
        self.spool_pending.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn spool_error(&self) {
        self.spool_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn watermark_persisted(&self) {
        self.watermarks_persisted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn scheduled_set(&self, waiting: u64) {
        self.scheduled.store(waiting, Ordering::Relaxed);
    }

    pub(crate) fn released(&self) {
        self.released.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            sent: get(&self.sent),
            retransmitted: get(&self.retransmitted),
            acked: get(&self.acked),
            received: get(&self.received),
            duplicates: get(&self.duplicates),
            delivered: get(&self.delivered),
            peers_connected: get(&self.peers_connected),
            protocol_errors: get(&self.protocol_errors),
            dial_failures: get(&self.dial_failures),
            refusals: get(&self.refusals),
            accepted: get(&self.accepted),
            dead_lettered: get(&self.dead_lettered),
            spool_pending: get(&self.spool_pending),
            spool_errors: get(&self.spool_errors),
            watermarks_persisted: get(&self.watermarks_persisted),
            events_delivered: get(&self.events_delivered),
            events_dropped: get(&self.events_dropped),
            volatile_dropped: get(&self.volatile_dropped),
            event_copies: get(&self.event_copies),
            events_received: get(&self.events_received),
            events_relayed: get(&self.events_relayed),
            events_repaired: get(&self.events_repaired),
            event_hops_max: get(&self.event_hops_max),
            events_retained: get(&self.events_retained),
            durable_subscriptions: get(&self.durable_subscriptions),
            durable_events_owed: get(&self.durable_events_owed),
            durable_events_dropped: get(&self.durable_events_dropped),
            work_redelivered: get(&self.work_redelivered),
            idempotent_repeats: get(&self.idempotent_repeats),
            events_expired: get(&self.events_expired),
            scheduled: get(&self.scheduled),
            released: get(&self.released),
        }
    }
}

/// One counter or gauge: its name, kind, help text and value in a snapshot.
struct Series {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: u64,
}

impl MetricsSnapshot {
    fn series(&self) -> [Series; 32] {
        let counter = |name, help, value| Series {
            name,
            kind: "counter",
            help,
            value,
        };
        [
            counter(
                "weft_messages_sent_total",
                "Messages transmitted for the first time.",
                self.sent,
            ),
            counter(
                "weft_messages_retransmitted_total",
                "Messages transmitted again after a reconnect.",
                self.retransmitted,
            ),
            counter(
                "weft_messages_acked_total",
                "Messages acknowledged by their peers.",
                self.acked,
            ),
            counter(
                "weft_messages_received_total",
                "Messages accepted from peers.",
                self.received,
            ),
            counter(
                "weft_messages_deduplicated_total",
                "Duplicate messages received and dropped.",
                self.duplicates,
            ),
            counter(
                "weft_messages_delivered_total",
                "Messages handed to the application's channel queues.",
                self.delivered,
            ),
            Series {
                name: "weft_peers_connected",
                kind: "gauge",
                help: "Peers with an established connection.",
                value: self.peers_connected,
            },
            counter(
                "weft_protocol_errors_total",
                "Connections closed because the peer broke the protocol.",
                self.protocol_errors,
            ),
            counter(
                "weft_dial_failures_total",
                "Connection attempts that failed.",
                self.dial_failures,
            ),
            counter(
                "weft_refusals_total",
                "Peers refused at the hello, or that refused this node.",
                self.refusals,
            ),
            counter(
                "weft_messages_accepted_total",
                "Sends made durable in the spool.",
                self.accepted,
            ),
            counter(
                "weft_messages_dead_lettered_total",
                "Messages given up (expiry, retry budget) and moved to the dead-letter log.",
                self.dead_lettered,
            ),
            Series {
                name: "weft_spool_pending_messages",
                kind: "gauge",
                help: "Outgoing messages in the spool, not yet acknowledged.",
                value: self.spool_pending,
            },
            counter(
                "weft_events_delivered_total",
                "Events handed to local subscriptions.",
                self.events_delivered,
            ),
            counter(
                "weft_events_dropped_total",
                "Best-effort events dropped at a full queue.",
                self.events_dropped,
            ),
            counter(
                "weft_volatile_dropped_total",
                "Volatile messages dropped because their connection went away first.",
                self.volatile_dropped,
            ),
            counter(
                "weft_spool_errors_total",
                "Spool operations that failed (storage errors, full dead-letter log).",
                self.spool_errors,
            ),
            counter(
                "weft_watermarks_persisted_total",
                "Inbound dedup watermarks made durable.",
                self.watermarks_persisted,
            ),
            counter(
                "weft_event_copies_total",
                "Copies of sequenced events received (with duplicates).",
                self.event_copies,
            ),
            counter(
                "weft_events_received_total",
                "Sequenced events taken in order from their publishers.",
                self.events_received,
            ),
            counter(
                "weft_events_relayed_total",
                "Event copies relayed to children of a gossip tree.",
                self.events_relayed,
            ),
            counter(
                "weft_events_repaired_total",
                "Event copies a publisher re-sent over a direct link.",
                self.events_repaired,
            ),
            Series {
                name: "weft_event_hops_max",
                kind: "gauge",
                help: "The most links an event received had crossed.",
                value: self.event_hops_max,
            },
            Series {
                name: "weft_events_retained",
                kind: "gauge",
                help: "Published events kept for repair, not yet confirmed by every addressee.",
                value: self.events_retained,
            },
            Series {
                name: "weft_durable_subscriptions",
                kind: "gauge",
                help: "Durable subscriptions of peers this node keeps sending to as a publisher.",
                value: self.durable_subscriptions,
            },
            Series {
                name: "weft_durable_events_owed",
                kind: "gauge",
                help: "Published events held in links for durable subscribers, not yet acknowledged.",
                value: self.durable_events_owed,
            },
            counter(
                "weft_durable_events_dropped_total",
                "Events owed to durable subscribers given up (dead-lettered): over budget or too old.",
                self.durable_events_dropped,
            ),
            counter(
                "weft_work_redelivered_total",
                "Work items copied from a stuck worker (connected, silent past work_ack_timeout) to another.",
                self.work_redelivered,
            ),
            counter(
                "weft_idempotent_repeats_total",
                "Messages dropped as repeats of an earlier message with the same producer and idempotency key.",
                self.idempotent_repeats,
            ),
            counter(
                "weft_events_expired_total",
                "Events dropped by this subscriber node because their expiry had passed.",
                self.events_expired,
            ),
            Series {
                name: "weft_messages_scheduled",
                kind: "gauge",
                help: "Delayed messages waiting for their due time.",
                value: self.scheduled,
            },
            counter(
                "weft_messages_released_total",
                "Delayed messages numbered into their stream at their due time.",
                self.released,
            ),
        ]
    }

    /// The counters in the Prometheus text exposition format, each with the given labels
    /// (values are escaped as the format requires).
    pub fn to_prometheus(&self, labels: &[(&str, &str)]) -> String {
        use std::fmt::Write;
        let labels = if labels.is_empty() {
            String::new()
        } else {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(k, v)| {
                    let escaped = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    format!("{k}=\"{escaped}\"")
                })
                .collect();
            format!("{{{}}}", pairs.join(","))
        };
        let mut out = String::new();
        for series in self.series() {
            let _ = writeln!(out, "# HELP {} {}", series.name, series.help);
            let _ = writeln!(out, "# TYPE {} {}", series.name, series.kind);
            let _ = writeln!(out, "{}{labels} {}", series.name, series.value);
        }
        out
    }

    /// The counters as a JSON object (`{"sent": 1, ...}`), names as in the struct.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of integers serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_help_type_and_escaped_labels() {
        let snapshot = MetricsSnapshot {
            sent: 3,
            peers_connected: 2,
            ..Default::default()
        };
        // A label value with a backslash and a quote: both must be escaped.
        let text = snapshot.to_prometheus(&[("node", r#"ab\"c"#), ("mesh", "shop")]);
        assert!(text.contains("# TYPE weft_messages_sent_total counter\n"));
        let labels = r#"{node="ab\\\"c",mesh="shop"}"#;
        assert!(
            text.contains(&format!("weft_messages_sent_total{labels} 3\n")),
            "{text}"
        );
        assert!(text.contains("# TYPE weft_peers_connected gauge\n"));
        assert!(text.contains(&format!("weft_peers_connected{labels} 2\n")));
        assert!(text.contains("# TYPE weft_events_dropped_total counter\n"));
        // HELP, TYPE and the value for every series, nothing else.
        assert_eq!(text.lines().count(), 3 * snapshot.series().len());
    }
}
