//! What a publisher owes its durable subscribers, and the per-subscription budget.
//!
//! A publisher sends an event owed to a durable subscription straight over its link to the
//! subscriber's node (see [`crate::gossip`]): while that node is away the event waits in the
//! link (and, with a data directory, in the spool), so the link is where owed events live. This
//! ledger only counts them, per durable subscription, by the link sequence number each went out
//! under, so that a subscription that is away for long cannot hold more than its budget: when a
//! subscription owes more than `max_per_subscription` events, its oldest is no longer kept for
//! it, and once an event is kept for none of the subscriptions it was owed to, the driver gives
//! it up in the link (dead-lettered with the reason: never silently gone). What the link
//! acknowledged is delivered and leaves the ledger.
//!
//! Bounded: at most `max_per_subscription` entries per subscription, and the subscriptions are
//! those of the bounded registry ([`crate::interest::DURABLE_MAX`]).

use std::collections::{BTreeMap, VecDeque};

use crate::id::NodeId;

#[derive(Debug, Default)]
struct NodeOwed {
    /// Per durable subscription name: the link seqs of the events owed to it, oldest first.
    subscriptions: BTreeMap<String, VecDeque<u64>>,
    /// Per link seq: how many subscriptions still keep the event.
    keepers: BTreeMap<u64, u32>,
}

/// Events owed to durable subscriptions, per subscriber node. See the module docs.
#[derive(Debug)]
pub struct OwedEvents {
    nodes: BTreeMap<NodeId, NodeOwed>,
    max_per_subscription: usize,
}

impl OwedEvents {
    /// An empty ledger; each subscription keeps at most `max_per_subscription` events.
    pub fn new(max_per_subscription: usize) -> Self {
        Self {
            nodes: BTreeMap::new(),
            max_per_subscription: max_per_subscription.max(1),
        }
    }

    /// An event went to `node` under link seq `seq`, owed to its durable subscriptions `names`.
    /// Returns the link seqs that no subscription keeps any more (to give up), ascending.
    pub fn record(&mut self, node: NodeId, seq: u64, names: &[String]) -> Vec<u64> {
        if names.is_empty() {
            return Vec::new();
        }
        let owed = self.nodes.entry(node).or_default();
        owed.keepers.insert(seq, names.len() as u32);
        let mut given_up = Vec::new();
        for name in names {
            let queue = owed.subscriptions.entry(name.clone()).or_default();
            queue.push_back(seq);
            while queue.len() > self.max_per_subscription {
                let Some(oldest) = queue.pop_front() else {
                    break;
                };
                if let Some(keepers) = owed.keepers.get_mut(&oldest) {
                    *keepers -= 1;
                    if *keepers == 0 {
                        owed.keepers.remove(&oldest);
                        given_up.push(oldest);
                    }
                }
            }
        }
        given_up.sort_unstable();
        given_up
    }

    /// `node`'s link acknowledged everything up to `up_to`: delivered, no longer owed.
    pub fn acked(&mut self, node: &NodeId, up_to: u64) {
        let Some(owed) = self.nodes.get_mut(node) else {
            return;
        };
        owed.keepers = owed.keepers.split_off(&(up_to + 1));
        for queue in owed.subscriptions.values_mut() {
            while queue.front().is_some_and(|&seq| seq <= up_to) {
                queue.pop_front();
            }
        }
        owed.subscriptions.retain(|_, queue| !queue.is_empty());
        if owed.keepers.is_empty() {
            self.nodes.remove(node);
        }
    }

    /// `node`'s durable subscription `name` ended: nothing is kept for it any more (what is in
    /// the link still flows; the subscriber drops it).
    pub fn forget(&mut self, node: &NodeId, name: &str) {
        let Some(owed) = self.nodes.get_mut(node) else {
            return;
        };
        if let Some(queue) = owed.subscriptions.remove(name) {
            for seq in queue {
                if let Some(keepers) = owed.keepers.get_mut(&seq) {
                    *keepers -= 1;
                    if *keepers == 0 {
                        owed.keepers.remove(&seq);
                    }
                }
            }
        }
        if owed.keepers.is_empty() {
            self.nodes.remove(node);
        }
    }

    /// Nodes owed something, in node id order.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Events owed now, over every node (an event owed to two subscriptions of a node once).
    pub fn total(&self) -> usize {
        self.nodes.values().map(|owed| owed.keepers.len()).sum()
    }

    /// Events owed to `node`'s durable subscription `name`.
    pub fn owed_to(&self, node: &NodeId, name: &str) -> usize {
        self.nodes
            .get(node)
            .and_then(|owed| owed.subscriptions.get(name))
            .map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn the_oldest_beyond_the_budget_is_given_up() {
        let mut owed = OwedEvents::new(3);
        for seq in 1..=3 {
            assert!(owed.record(node(1), seq, &names(&["a"])).is_empty());
        }
        assert_eq!(owed.record(node(1), 4, &names(&["a"])), vec![1]);
        assert_eq!(owed.record(node(1), 5, &names(&["a"])), vec![2]);
        assert_eq!(owed.owed_to(&node(1), "a"), 3);
        assert_eq!(owed.total(), 3);
        // Events owed to nothing (plain subscriptions only) are not counted.
        assert!(owed.record(node(1), 6, &[]).is_empty());
        assert_eq!(owed.total(), 3);
    }

    #[test]
    fn an_event_is_given_up_only_once_no_subscription_keeps_it() {
        let mut owed = OwedEvents::new(2);
        assert!(owed.record(node(1), 1, &names(&["a", "b"])).is_empty());
        assert!(owed.record(node(1), 2, &names(&["a"])).is_empty());
        // "a" drops 1, but "b" still keeps it.
        assert!(owed.record(node(1), 3, &names(&["a"])).is_empty());
        assert_eq!(owed.owed_to(&node(1), "b"), 1);
        assert!(owed.record(node(1), 4, &names(&["b"])).is_empty());
        assert_eq!(owed.record(node(1), 5, &names(&["b"])), vec![1]);
        assert_eq!(owed.total(), 4, "2, 3, 4, 5");
    }

    #[test]
    fn acknowledged_events_are_no_longer_owed() {
        let mut owed = OwedEvents::new(2);
        owed.record(node(1), 1, &names(&["a"]));
        owed.record(node(1), 2, &names(&["a"]));
        owed.record(node(2), 7, &names(&["a"]));
        owed.acked(&node(1), 1);
        assert_eq!(owed.owed_to(&node(1), "a"), 1);
        // Room again: nothing given up.
        assert!(owed.record(node(1), 3, &names(&["a"])).is_empty());
        owed.acked(&node(1), 3);
        assert_eq!(owed.nodes(), vec![node(2)]);
        assert_eq!(owed.total(), 1);
    }

    #[test]
    fn an_ended_subscription_keeps_nothing() {
        let mut owed = OwedEvents::new(2);
        owed.record(node(1), 1, &names(&["a", "b"]));
        owed.record(node(1), 2, &names(&["a"]));
        owed.forget(&node(1), "a");
        assert_eq!(owed.total(), 1, "1 is still owed to b");
        owed.forget(&node(1), "b");
        assert_eq!(owed.total(), 0);
        assert!(owed.nodes().is_empty());
    }
}
