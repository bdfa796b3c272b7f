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
}

/// A snapshot of a node's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
        }
    }
}
