//! Shard ownership: which worker of a group owns a key.
//!
//! Rendezvous (highest-random-weight) hashing: every (key, worker) pair gets a weight from
//! blake3, and the key belongs to the worker with the highest weight. Every node computes the
//! same owner from the same set of workers without coordination, and when a worker joins or
//! leaves only the keys it wins or held move — about 1/n of them.

use crate::id::NodeId;

/// The weight of `worker` for `key`.
fn weight(key: &[u8], worker: &NodeId) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(worker.as_bytes());
    *hasher.finalize().as_bytes()
}

/// The owner of `key` among `workers` (`None` if there are none).
pub fn owner<'a>(key: &[u8], workers: impl IntoIterator<Item = &'a NodeId>) -> Option<NodeId> {
    workers
        .into_iter()
        .map(|w| (weight(key, w), *w))
        .max()
        .map(|(_, w)| w)
}

/// A fixed-size digest of a shard key, for bounded per-key state.
pub fn key_digest(key: &[u8]) -> [u8; 32] {
    *blake3::hash(key).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    #[test]
    fn owners_are_stable_and_only_the_leavers_keys_move() {
        let workers: Vec<NodeId> = (1..=5).map(node).collect();
        let keys: Vec<Vec<u8>> = (0..2_000u32).map(|k| k.to_le_bytes().to_vec()).collect();
        let before: Vec<NodeId> = keys.iter().map(|k| owner(k, &workers).unwrap()).collect();
        // Order of the worker list does not matter.
        let reversed: Vec<NodeId> = workers.iter().rev().copied().collect();
        for (k, o) in keys.iter().zip(&before) {
            assert_eq!(owner(k, &reversed), Some(*o));
        }
        // Roughly balanced.
        for w in &workers {
            let share = before.iter().filter(|o| *o == w).count();
            assert!((250..=550).contains(&share), "{share} of 2000 keys");
        }
        // Worker 3 leaves: only its keys move.
        let remaining: Vec<NodeId> = workers.iter().copied().filter(|w| *w != node(3)).collect();
        for (k, o) in keys.iter().zip(&before) {
            let now = owner(k, &remaining).unwrap();
            if *o != node(3) {
                assert_eq!(now, *o, "a key of a worker that stayed moved");
            } else {
                assert_ne!(now, node(3));
            }
        }
        assert_eq!(owner(b"k", std::iter::empty()), None);
    }
}
