//! Idempotency keys: a producer may give a message a key of its own (an order id, an outbox
//! row id; header [`IDEMPOTENCY_KEY_HEADER`](crate::message::IDEMPOTENCY_KEY_HEADER)), and the
//! receiving node hands its application only the first message with a given (producer, key)
//! within a bounded window. Message ids already make retransmissions harmless; a key covers what
//! ids cannot: a producer that sends the same thing again *as a new message*, typically a
//! transactional-outbox relay that crashed after sending a row and before marking it sent.
//!
//! The window is bounded by count and by age (whichever is hit first forgets the oldest key):
//! a second message beyond either bound is handed on again. The window remembers which message
//! brought a key first, and lets *that* message through again: a message that is redelivered
//! (same [`MessageId`], because it was not acknowledged before a crash) is the link's business,
//! not a repeat. So a key can be remembered from the moment its message arrives: the node
//! persists it then (when it has a spool), in the spool writer's order before the watermark that
//! acknowledges the message, and restores the window at start, so a receiver's restart does not
//! open the window.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::id::{MessageId, NodeId};

/// Whether a key was seen before (see [`Window::sight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sighting {
    /// First time within the window: hand the message on (and persist the key).
    First,
    /// The very message that brought the key first, delivered again (it was not acknowledged
    /// before a crash or a lost connection): hand it on.
    Redelivered,
    /// Seen before, at this wall-clock time (Unix milliseconds): drop the message.
    Again {
        /// When the first message with this key was handed on.
        first_unix_ms: u64,
    },
}

/// The keys handed on recently, per producer.
#[derive(Debug)]
pub struct Window {
    /// The first message's id and when it came.
    seen: HashMap<(NodeId, Bytes), (MessageId, u64)>,
    /// Insertion order with insertion time (ms), for eviction.
    order: VecDeque<((NodeId, Bytes), u64)>,
    entries_max: usize,
    age_max_ms: u64,
}

impl Window {
    /// A window of at most `entries_max` keys, each remembered for at most `age_max_ms`.
    pub fn new(entries_max: usize, age_max_ms: u64) -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            entries_max: entries_max.max(1),
            age_max_ms,
        }
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Keys remembered at most.
    pub fn entries_max(&self) -> usize {
        self.entries_max
    }

    /// How long a key is remembered.
    pub fn age_max_ms(&self) -> u64 {
        self.age_max_ms
    }

    /// Forgets what is older than the window at `now_ms`, and the oldest beyond `room` free
    /// places.
    fn evict(&mut self, now_ms: u64, room: usize) {
        while let Some((key, at)) = self.order.front() {
            let too_old = now_ms.saturating_sub(*at) >= self.age_max_ms;
            if !too_old && self.seen.len() + room <= self.entries_max {
                break;
            }
            if self.seen.get(key).is_some_and(|(_, first)| first == at) {
                self.seen.remove(key);
            }
            self.order.pop_front();
        }
    }

    /// Message `id` (of producer `id.producer`) with `key` arrived at `now_ms`: is it the
    /// first? The first is remembered from now on.
    pub fn sight(&mut self, id: MessageId, key: &Bytes, now_ms: u64) -> Sighting {
        self.evict(now_ms, 0);
        let entry = (id.producer, key.clone());
        if let Some(&(first, first_unix_ms)) = self.seen.get(&entry) {
            // (A volatile message, seq 0, is never delivered again: its id names no copy.)
            if first == id && id.seq != 0 {
                return Sighting::Redelivered;
            }
            return Sighting::Again { first_unix_ms };
        }
        self.evict(now_ms, 1);
        self.seen.insert(entry.clone(), (id, now_ms));
        self.order.push_back((entry, now_ms));
        Sighting::First
    }

    /// Takes back a key that message `id` brought at `at_ms` (persisted before a restart),
    /// unless it is out of the window at `now_ms`. Restore in persisted order.
    pub fn restore(&mut self, id: MessageId, key: Bytes, at_ms: u64, now_ms: u64) {
        if now_ms.saturating_sub(at_ms) >= self.age_max_ms {
            return;
        }
        let entry = (id.producer, key);
        if self.seen.contains_key(&entry) {
            return;
        }
        self.evict(now_ms, 1);
        self.seen.insert(entry.clone(), (id, at_ms));
        self.order.push_back((entry, at_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::id::StreamId;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    /// Message `seq` of producer `n`.
    fn id(n: u8, seq: u64) -> MessageId {
        MessageId {
            producer: node(n),
            stream: StreamId(u64::from(n)),
            seq,
        }
    }

    #[test]
    fn the_second_message_with_a_key_is_a_repeat_per_producer() {
        let mut window = Window::new(16, 60_000);
        let key = Bytes::from_static(b"order-17");
        assert_eq!(window.sight(id(1, 1), &key, 1_000), Sighting::First);
        assert_eq!(
            window.sight(id(1, 2), &key, 2_000),
            Sighting::Again {
                first_unix_ms: 1_000
            }
        );
        // The first message itself, delivered again, is not a repeat.
        assert_eq!(window.sight(id(1, 1), &key, 2_500), Sighting::Redelivered);
        // Volatile messages (seq 0) share their id: a second one is a repeat.
        let volatile = Bytes::from_static(b"v");
        assert_eq!(window.sight(id(1, 0), &volatile, 3_000), Sighting::First);
        assert!(matches!(
            window.sight(id(1, 0), &volatile, 3_000),
            Sighting::Again { .. }
        ));
        // Another producer's key of the same spelling is its own.
        assert_eq!(window.sight(id(2, 1), &key, 3_000), Sighting::First);
        assert_eq!(window.len(), 3);
    }

    #[test]
    fn keys_are_forgotten_beyond_the_age_and_the_count() {
        let mut window = Window::new(3, 10_000);
        let keys: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![i])).collect();
        assert_eq!(window.sight(id(1, 101), &keys[0], 0), Sighting::First);
        // Just inside the age: still a repeat; at the age: forgotten.
        assert!(matches!(
            window.sight(id(1, 102), &keys[0], 9_999),
            Sighting::Again { .. }
        ));
        assert_eq!(window.sight(id(1, 103), &keys[0], 10_000), Sighting::First);
        for key in &keys[1..4] {
            assert_eq!(window.sight(id(1, 104), key, 10_001), Sighting::First);
        }
        // Four sighted, three kept: the oldest (keys[0] at 10 000) went.
        assert_eq!(window.len(), 3);
        assert_eq!(window.sight(id(1, 105), &keys[0], 10_002), Sighting::First);
        assert!(matches!(
            window.sight(id(1, 106), &keys[3], 10_002),
            Sighting::Again { .. }
        ));
        assert_eq!(window.len(), 3);
    }

    #[test]
    fn a_restored_window_remembers_what_is_still_inside_it() {
        let mut window = Window::new(2, 10_000);
        let (a, b, c) = (
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b"),
            Bytes::from_static(b"c"),
        );
        window.restore(id(1, 1), a.clone(), 0, 20_000); // too old
        window.restore(id(1, 1), b.clone(), 15_000, 20_000);
        window.restore(id(1, 1), c.clone(), 16_000, 20_000);
        window.restore(id(1, 1), c.clone(), 16_000, 20_000); // twice: once
        assert_eq!(window.len(), 2);
        assert_eq!(window.sight(id(1, 107), &a, 20_000), Sighting::First);
        // `a` took the place of the oldest, `b`.
        assert_eq!(
            window.sight(id(1, 108), &c, 20_000),
            Sighting::Again {
                first_unix_ms: 16_000
            }
        );
        assert_eq!(window.sight(id(1, 109), &b, 20_000), Sighting::First);
    }
}
