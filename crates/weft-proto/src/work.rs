//! A work-queue producer's decisions, as a sans-IO machine: which worker gets the next item
//! (credit, rendezvous ownership of shard keys, the per-key barrier across a rebalance), what a
//! silent worker's work is taken back as, and which workers are stuck (connected, acknowledging
//! nothing) and which of their items are copied to others. The driver (`weft`'s
//! `patterns::work`) feeds it the workers announced for a queue, each worker's acknowledged
//! watermark and connection state and the time, and carries out what it decides (sends,
//! withdrawals, copies); see that module for the guarantees.
//!
//! Everything is keyed by the sequence numbers of the producer's link to each worker (the
//! normal lane): an item is *outstanding* from its send until the worker's acknowledged
//! watermark passes it, and a worker's free credit is its announced credit less what is
//! outstanding. Maps are ordered, so decisions are the same in every run of a seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::id::NodeId;
use crate::shard;

/// Most shard keys a producer tracks per node (their owner and last message): past it, keys
/// whose messages were all acknowledged are forgotten, and a new key waits until one can be.
pub const KEYS_MAX: usize = 65_536;

/// A queue and the digest of a shard key of it.
pub type KeyId = (String, [u8; 32]);

/// What a producer remembers of a shard key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyState {
    /// The worker its last message went to.
    pub owner: NodeId,
    /// That message's sequence number on the link to `owner`.
    pub last_seq: u64,
    /// Its messages are being taken back from a silent owner and pushed again: new messages
    /// for the key wait until that is done.
    pub reassigning: bool,
}

/// The choice for one item (see [`Producer::choose`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The worker to send it to; `None`: wait (no worker, no credit, or the key's barrier).
    pub worker: Option<NodeId>,
    /// The workers whose acknowledgements may change the answer (to wait on).
    pub watch: Vec<NodeId>,
}

/// A silent worker's work, taken back (see [`Producer::take_silent`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Silent {
    /// The worker.
    pub worker: NodeId,
    /// Its keys, now waiting until its withdrawn items are pushed again
    /// ([`Producer::release_keys`]).
    pub keys: Vec<KeyId>,
    /// Per queue, the sequence numbers it held unacknowledged (no longer counted against its
    /// credit; what the link could not withdraw goes back with [`Producer::put_back`]).
    pub taken: Vec<(String, VecDeque<u64>)>,
}

/// What one look at the stuck workers decided (see [`Producer::stuck_tick`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StuckTick {
    /// Workers found stuck now (to log).
    pub stuck: Vec<NodeId>,
    /// Workers that get work again (to log); pushes waiting for a worker must look again.
    pub freed: Vec<NodeId>,
    /// Items to copy to other workers: (worker, queue, sequence numbers), unkeyed ones only
    /// (the driver finds out which are keyed and leaves those; they stay marked).
    pub copies: Vec<(NodeId, String, Vec<u64>)>,
}

/// What a producer knows of stuck workers.
#[derive(Debug, Default)]
struct Stuck {
    /// Per worker holding unacknowledged work: its acknowledged watermark and when that last
    /// moved (or the worker last reconnected), in Unix ms.
    progress: BTreeMap<NodeId, (u64, u64)>,
    /// Workers stuck now: chosen for no new work.
    workers: BTreeSet<NodeId>,
    /// Per (queue, worker): sequence numbers whose copies went (or are going) to other workers,
    /// or that stay (keyed); pruned as the worker acknowledges.
    copied: BTreeMap<(String, NodeId), BTreeSet<u64>>,
}

/// A producer's work in flight, per queue and worker. See the module doc.
#[derive(Debug)]
pub struct Producer {
    /// Per (queue, worker): sequence numbers sent and not yet acknowledged, ascending.
    outstanding: BTreeMap<(String, NodeId), VecDeque<u64>>,
    keys: BTreeMap<KeyId, KeyState>,
    stuck: Stuck,
    /// Round-robin start among equally free workers.
    cursor: usize,
    keys_max: usize,
}

impl Default for Producer {
    fn default() -> Self {
        Self::new(KEYS_MAX)
    }
}

impl Producer {
    /// A producer tracking at most `keys_max` shard keys.
    pub fn new(keys_max: usize) -> Self {
        Self {
            outstanding: BTreeMap::new(),
            keys: BTreeMap::new(),
            stuck: Stuck::default(),
            cursor: 0,
            keys_max: keys_max.max(1),
        }
    }

    /// `worker`'s free credit for `queue` (announced `credit` less what is outstanding), after
    /// pruning what it acknowledged.
    fn free_credit(&mut self, queue: &str, worker: NodeId, credit: u32, acked: u64) -> u32 {
        let outstanding = self
            .outstanding
            .entry((queue.to_owned(), worker))
            .or_default();
        prune(outstanding, acked);
        credit.saturating_sub(outstanding.len() as u32)
    }

    /// The worker for the next item of `queue` among `workers` (connected, with their announced
    /// credit): the one with the most free credit (round robin among equals); with a shard
    /// `key`, its owner among them (rendezvous hashing), once the key's previous owner
    /// acknowledged everything sent to it for the key. `reassigning`: a withdrawn item pushed
    /// again, which was within its credit before and so does not wait for credit, and may pass
    /// the barrier its own reassignment set. `acked`: each worker's acknowledged watermark.
    pub fn choose(
        &mut self,
        queue: &str,
        workers: &[(NodeId, u32)],
        key: Option<&[u8]>,
        reassigning: bool,
        acked: impl Fn(&NodeId) -> u64,
    ) -> Choice {
        // A stuck worker gets no new work (its keys wait for it).
        let workers: Vec<(NodeId, u32)> = workers
            .iter()
            .filter(|(w, _)| !self.stuck.workers.contains(w))
            .copied()
            .collect();
        let mut watch: Vec<NodeId> = workers.iter().map(|(w, _)| *w).collect();
        let worker = match key {
            Some(key) => {
                let owner = shard::owner(key, workers.iter().map(|(w, _)| w));
                let digest = (queue.to_owned(), shard::key_digest(key));
                let previous = self.keys.get(&digest).copied();
                if let Some(previous) = previous {
                    watch.push(previous.owner);
                }
                let moved_unsettled =
                    |p: &KeyState| Some(p.owner) != owner && acked(&p.owner) < p.last_seq;
                let barrier = previous.is_some_and(|p| {
                    if reassigning {
                        // The silent owner's items are being taken back: only a live owner that
                        // got some of them already must settle them first.
                        workers.iter().any(|(w, _)| *w == p.owner) && moved_unsettled(&p)
                    } else {
                        p.reassigning || moved_unsettled(&p)
                    }
                });
                let full = previous.is_none() && self.keys.len() >= self.keys_max && {
                    // Forget keys whose items were all acknowledged, then look again.
                    self.keys
                        .retain(|_, k| k.reassigning || acked(&k.owner) < k.last_seq);
                    self.keys.len() >= self.keys_max
                };
                match owner {
                    Some(owner) if !barrier && !full => {
                        let credit = workers
                            .iter()
                            .find(|(w, _)| *w == owner)
                            .map_or(0, |(_, c)| *c);
                        let free = self.free_credit(queue, owner, credit, acked(&owner));
                        (free > 0 || reassigning).then_some(owner)
                    }
                    _ => None,
                }
            }
            None => {
                let mut best: Option<(NodeId, u32)> = None;
                let start = self.cursor;
                for i in 0..workers.len() {
                    let (worker, credit) = workers[(start + i) % workers.len()];
                    let free = self.free_credit(queue, worker, credit, acked(&worker));
                    if free > 0 && best.is_none_or(|(_, f)| free > f) {
                        best = Some((worker, free));
                    }
                }
                self.cursor = self.cursor.wrapping_add(1);
                best.map(|(w, _)| w).or_else(|| {
                    reassigning
                        .then(|| workers.get(start % workers.len().max(1)).map(|(w, _)| *w))
                        .flatten()
                })
            }
        };
        Choice { worker, watch }
    }

    /// An item of `queue` went to `worker` as link message `seq` (with its shard `key`).
    pub fn sent(
        &mut self,
        queue: &str,
        worker: NodeId,
        seq: u64,
        key: Option<&[u8]>,
        reassigning: bool,
    ) {
        self.outstanding
            .entry((queue.to_owned(), worker))
            .or_default()
            .push_back(seq);
        if let Some(key) = key {
            let digest = (queue.to_owned(), shard::key_digest(key));
            let reassigning = reassigning && self.keys.get(&digest).is_some_and(|k| k.reassigning);
            self.keys.insert(
                digest,
                KeyState {
                    owner: worker,
                    last_seq: seq,
                    reassigning,
                },
            );
        }
    }

    /// Takes back what a restart found in flight: per worker the items sent and not
    /// acknowledged (`items`: queue, seq), and per key where its last item went.
    pub fn restore(
        &mut self,
        items: impl IntoIterator<Item = (String, NodeId, u64)>,
        keys: impl IntoIterator<Item = (KeyId, KeyState)>,
    ) {
        for (queue, worker, seq) in items {
            self.outstanding
                .entry((queue, worker))
                .or_default()
                .push_back(seq);
        }
        for outstanding in self.outstanding.values_mut() {
            outstanding.make_contiguous().sort_unstable();
        }
        self.keys.extend(keys);
    }

    /// Every worker that holds unacknowledged items (of any queue), ascending.
    pub fn workers_with_work(&self) -> Vec<NodeId> {
        let mut workers: Vec<NodeId> = self
            .outstanding
            .iter()
            .filter(|(_, seqs)| !seqs.is_empty())
            .map(|((_, worker), _)| *worker)
            .collect();
        workers.sort();
        workers.dedup();
        workers
    }

    /// Takes back the work of `silent` workers (their connection down too long): their items
    /// stop counting against their credit, and their keys wait until the withdrawn items are
    /// pushed again. Taken at once, so the next look does not take the same work twice.
    pub fn take_silent(&mut self, silent: &[NodeId]) -> Vec<Silent> {
        let mut taken: BTreeMap<NodeId, Vec<(String, VecDeque<u64>)>> = BTreeMap::new();
        self.outstanding.retain(|(queue, worker), seqs| {
            if silent.contains(worker) {
                taken
                    .entry(*worker)
                    .or_default()
                    .push((queue.clone(), std::mem::take(seqs)));
                false
            } else {
                true
            }
        });
        silent
            .iter()
            .map(|worker| {
                let mut keys = Vec::new();
                for (digest, key) in self.keys.iter_mut() {
                    if key.owner == *worker {
                        key.reassigning = true;
                        keys.push(digest.clone());
                    }
                }
                Silent {
                    worker: *worker,
                    keys,
                    taken: taken.remove(worker).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// What the link of a silent `worker` could not withdraw (in flight: not in `gone`) still
    /// uses its credit; and its keys wait only for what it still has before `first_withdrawn`.
    pub fn put_back(
        &mut self,
        worker: NodeId,
        taken: Vec<(String, VecDeque<u64>)>,
        gone: &BTreeSet<u64>,
    ) {
        for (queue, seqs) in taken {
            let kept: Vec<u64> = seqs.into_iter().filter(|s| !gone.contains(s)).collect();
            if !kept.is_empty() {
                let outstanding = self.outstanding.entry((queue, worker)).or_default();
                outstanding.extend(kept);
                outstanding.make_contiguous().sort_unstable();
            }
        }
        if let Some(first) = gone.first() {
            for key in self.keys.values_mut() {
                if key.owner == worker && key.last_seq >= *first {
                    key.last_seq = first - 1;
                }
            }
        }
    }

    /// Ends the reassignment barrier of `keys` (their withdrawn items were pushed again, or
    /// that failed).
    pub fn release_keys(&mut self, keys: &[KeyId]) {
        for digest in keys {
            if let Some(key) = self.keys.get_mut(digest) {
                key.reassigning = false;
            }
        }
    }

    /// Looks at the workers holding work at `now_ms`: one connected that acknowledged nothing
    /// for `timeout_ms` is stuck (no new work; copies of its unkeyed items behind the oldest go
    /// to other workers, when `others(queue, worker)` says there is one); its first
    /// acknowledgement, or a reconnection, frees it.
    pub fn stuck_tick(
        &mut self,
        now_ms: u64,
        timeout_ms: u64,
        acked: impl Fn(&NodeId) -> u64,
        connected: impl Fn(&NodeId) -> bool,
        others: impl Fn(&str, &NodeId, &BTreeSet<NodeId>) -> bool,
    ) -> StuckTick {
        let mut tick = StuckTick::default();
        let mut holding = BTreeSet::new();
        for ((_, worker), seqs) in self.outstanding.iter_mut() {
            prune(seqs, acked(worker));
            if !seqs.is_empty() {
                holding.insert(*worker);
            }
        }
        let stuck = &mut self.stuck;
        stuck.copied.retain(|(_, worker), seqs| {
            let acked = acked(worker);
            seqs.retain(|seq| *seq > acked);
            !seqs.is_empty()
        });
        stuck.progress.retain(|worker, _| holding.contains(worker));
        stuck.workers.retain(|worker| {
            let holds = holding.contains(worker);
            if !holds {
                tick.freed.push(*worker);
            }
            holds
        });
        for worker in &holding {
            let acked = acked(worker);
            let progress = stuck.progress.entry(*worker).or_insert((acked, now_ms));
            if progress.0 != acked || !connected(worker) {
                // Moving (or away: a silent worker's work is reassigned instead).
                *progress = (acked, now_ms);
                if stuck.workers.remove(worker) {
                    tick.freed.push(*worker);
                }
            } else if now_ms.saturating_sub(progress.1) >= timeout_ms
                && stuck.workers.insert(*worker)
            {
                tick.stuck.push(*worker);
            }
        }
        for ((queue, worker), seqs) in &self.outstanding {
            if !self.stuck.workers.contains(worker) || !others(queue, worker, &self.stuck.workers) {
                continue;
            }
            let copied = self
                .stuck
                .copied
                .entry((queue.clone(), *worker))
                .or_default();
            // The oldest may be in the application's hands (a long job): it stays. The rest
            // wait unread in the worker's queue.
            let fresh: Vec<u64> = seqs
                .iter()
                .skip(1)
                .filter(|s| copied.insert(**s))
                .copied()
                .collect();
            if !fresh.is_empty() {
                tick.copies.push((*worker, queue.clone(), fresh));
            }
        }
        tick
    }

    /// Items asked to be copied from a stuck worker that its link did not have (still on their
    /// way in): looked for again at the next tick.
    pub fn copies_not_found(&mut self, queue: &str, worker: NodeId, seqs: &[u64]) {
        if let Some(marked) = self.stuck.copied.get_mut(&(queue.to_owned(), worker)) {
            for seq in seqs {
                marked.remove(seq);
            }
        }
    }

    /// Whether `worker` is stuck now.
    pub fn is_stuck(&self, worker: &NodeId) -> bool {
        self.stuck.workers.contains(worker)
    }
}

/// Drops from `outstanding` (ascending) what the worker acknowledged (up to `acked`).
fn prune(outstanding: &mut VecDeque<u64>, acked: u64) {
    while outstanding.front().is_some_and(|seq| *seq <= acked) {
        outstanding.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    /// Acknowledged watermarks, as the driver reads them from the links.
    struct Acks(BTreeMap<NodeId, u64>);

    impl Acks {
        fn of(&self, worker: &NodeId) -> u64 {
            self.0.get(worker).copied().unwrap_or(0)
        }
    }

    /// Sends to whoever `choose` picks, numbering per worker link, until nobody can take more.
    fn fill(
        producer: &mut Producer,
        workers: &[(NodeId, u32)],
        next_seq: &mut BTreeMap<NodeId, u64>,
        acks: &Acks,
    ) -> Vec<NodeId> {
        let mut sent = Vec::new();
        while let Some(worker) = producer
            .choose("q", workers, None, false, |w| acks.of(w))
            .worker
        {
            let seq = next_seq.entry(worker).or_insert(0);
            *seq += 1;
            producer.sent("q", worker, *seq, None, false);
            sent.push(worker);
            assert!(sent.len() <= 100, "credit bounds what is sent");
        }
        sent
    }

    #[test]
    fn credit_bounds_each_worker_and_acknowledgements_free_it() {
        let mut producer = Producer::default();
        let workers = [(node(1), 3), (node(2), 1)];
        let mut seqs = BTreeMap::new();
        let mut acks = Acks(BTreeMap::new());
        let sent = fill(&mut producer, &workers, &mut seqs, &acks);
        assert_eq!(sent.iter().filter(|w| **w == node(1)).count(), 3);
        assert_eq!(sent.iter().filter(|w| **w == node(2)).count(), 1);
        // The most free credit first: worker 1 (3 free) before worker 2 (1 free).
        assert_eq!(sent[0], node(1));
        // Worker 2 acknowledges its one: it may take one more, nobody else.
        acks.0.insert(node(2), 1);
        assert_eq!(
            fill(&mut producer, &workers, &mut seqs, &acks),
            vec![node(2)]
        );
        // A reassigned item does not wait for credit.
        let choice = producer.choose("q", &workers, None, true, |w| acks.of(w));
        assert!(choice.worker.is_some());
        assert_eq!(choice.watch, vec![node(1), node(2)]);
    }

    #[test]
    fn a_key_moves_to_its_new_owner_only_after_the_old_one_acknowledged_it() {
        let mut producer = Producer::default();
        let key = b"account-7";
        let (a, b) = (node(1), node(2));
        let owner_of = |workers: &[NodeId]| shard::owner(key, workers.iter()).unwrap();
        // Only `a` and `b`: the key's owner among both.
        let both = [(a, 8), (b, 8)];
        let first = owner_of(&[a, b]);
        let other = if first == a { b } else { a };
        let acks = Acks(BTreeMap::new());
        let choice = producer.choose("q", &both, Some(key), false, |w| acks.of(w));
        assert_eq!(choice.worker, Some(first));
        producer.sent("q", first, 1, Some(key), false);
        // The owner leaves the queue: the key moves to the other, but not before the first
        // owner acknowledged seq 1.
        let left = [(other, 8)];
        let choice = producer.choose("q", &left, Some(key), false, |w| acks.of(w));
        assert_eq!(choice.worker, None, "the barrier holds the key");
        assert!(
            choice.watch.contains(&first),
            "waits on the old owner's acks"
        );
        let acked = Acks(BTreeMap::from([(first, 1)]));
        let choice = producer.choose("q", &left, Some(key), false, |w| acked.of(w));
        assert_eq!(choice.worker, Some(other));
    }

    #[test]
    fn a_silent_workers_work_is_taken_back_and_its_keys_wait_for_the_push_again() {
        let mut producer = Producer::default();
        let (a, b) = (node(1), node(2));
        let key = b"k";
        let acks = Acks(BTreeMap::new());
        let owner = shard::owner(key, [a, b].iter()).unwrap();
        let other = if owner == a { b } else { a };
        for seq in 1..=3 {
            producer.sent("q", owner, seq, Some(key), false);
        }
        assert_eq!(producer.workers_with_work(), vec![owner]);
        let silent = producer.take_silent(&[owner]);
        assert_eq!(silent.len(), 1);
        assert_eq!(
            silent[0].taken,
            vec![("q".to_owned(), VecDeque::from([1, 2, 3]))]
        );
        assert_eq!(silent[0].keys.len(), 1);
        assert!(producer.workers_with_work().is_empty(), "taken once");
        // New items of the key wait; the withdrawn ones pushed again pass.
        let live = [(other, 8)];
        assert_eq!(
            producer
                .choose("q", &live, Some(key), false, |w| acks.of(w))
                .worker,
            None
        );
        assert_eq!(
            producer
                .choose("q", &live, Some(key), true, |w| acks.of(w))
                .worker,
            Some(other)
        );
        // Seq 3 was in flight (not withdrawn): it still counts against the silent worker.
        producer.put_back(owner, silent[0].taken.clone(), &BTreeSet::from([1, 2]));
        assert_eq!(producer.workers_with_work(), vec![owner]);
        producer.release_keys(&silent[0].keys);
        // The key now waits only for seq 0 (nothing) at the old owner: it moves.
        assert_eq!(
            producer
                .choose("q", &live, Some(key), false, |w| acks.of(w))
                .worker,
            Some(other)
        );
    }

    #[test]
    fn a_connected_worker_that_acknowledges_nothing_is_stuck_until_it_does() {
        let mut producer = Producer::default();
        let (a, b) = (node(1), node(2));
        for seq in 1..=4 {
            producer.sent("q", a, seq, None, false);
        }
        let mut acks = Acks(BTreeMap::new());
        let connected = |_: &NodeId| true;
        let others = |_: &str, w: &NodeId, stuck: &BTreeSet<NodeId>| *w != b && !stuck.contains(&b);
        let tick = producer.stuck_tick(0, 1_000, |w| acks.of(w), connected, others);
        assert_eq!(tick, StuckTick::default(), "the clock starts");
        let tick = producer.stuck_tick(999, 1_000, |w| acks.of(w), connected, others);
        assert!(tick.stuck.is_empty());
        let tick = producer.stuck_tick(1_000, 1_000, |w| acks.of(w), connected, others);
        assert_eq!(tick.stuck, vec![a]);
        // The oldest stays (maybe in the application's hands); the rest are copied, once.
        assert_eq!(tick.copies, vec![(a, "q".to_owned(), vec![2, 3, 4])]);
        assert!(producer.is_stuck(&a));
        assert_eq!(
            producer
                .choose("q", &[(a, 100), (b, 1)], None, false, |w| acks.of(w))
                .worker,
            Some(b),
            "a stuck worker gets no new work"
        );
        let tick = producer.stuck_tick(1_100, 1_000, |w| acks.of(w), connected, others);
        assert!(tick.copies.is_empty(), "copied once");
        // One was not found in the link yet: asked for again at the next tick.
        producer.copies_not_found("q", a, &[4]);
        let tick = producer.stuck_tick(1_200, 1_000, |w| acks.of(w), connected, others);
        assert_eq!(tick.copies, vec![(a, "q".to_owned(), vec![4])]);
        // It acknowledges: free again.
        acks.0.insert(a, 1);
        let tick = producer.stuck_tick(1_300, 1_000, |w| acks.of(w), connected, others);
        assert_eq!(tick.freed, vec![a]);
        assert!(!producer.is_stuck(&a));
    }

    #[test]
    fn keys_beyond_the_bound_wait_until_acknowledged_ones_are_forgotten() {
        let mut producer = Producer::new(2);
        let a = node(1);
        let workers = [(a, 100)];
        let mut acks = Acks(BTreeMap::new());
        for (seq, key) in [(1, &b"k1"[..]), (2, b"k2")] {
            let choice = producer.choose("q", &workers, Some(key), false, |w| acks.of(w));
            assert_eq!(choice.worker, Some(a));
            producer.sent("q", a, seq, Some(key), false);
        }
        let choice = producer.choose("q", &workers, Some(b"k3"), false, |w| acks.of(w));
        assert_eq!(choice.worker, None, "full of unacknowledged keys");
        acks.0.insert(a, 1);
        let choice = producer.choose("q", &workers, Some(b"k3"), false, |w| acks.of(w));
        assert_eq!(choice.worker, Some(a), "k1 was forgotten");
    }
}
