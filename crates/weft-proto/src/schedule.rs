//! The deliver-after schedule: messages accepted now but not to be delivered before a time.
//!
//! A delayed message is held **at the sender**, outside its peer's stream: the stream is one
//! ordered, numbered sequence per peer, and a receiver accepts only the next number, so a
//! message numbered at send time but held back would hold up every later message of the
//! stream (head-of-line blocking). A scheduled message therefore gets its sequence number only
//! when it becomes due, and then enters the stream exactly like a fresh send.
//!
//! Ordering, precisely: scheduled messages become due in order of (due time, then the order
//! they were scheduled in), and each is numbered when it does, so per (sender, receiver) the
//! stream is FIFO in the order messages *become due*: a delayed message is delivered after
//! every message numbered before its release and before every message numbered after it; a
//! message sent later without a delay overtakes it.
//!
//! Time is the sender's wall clock (Unix milliseconds), passed in: this module reads no clock.
//! "Not before T" holds for the sender's clock; a receiver whose clock is ahead may see it
//! "early" by the skew. A clock stepped backwards delays releases by the step; stepped forwards,
//! releases everything it skipped at once (in due order).

use std::collections::BTreeMap;

/// The default for the furthest a due time may lie ahead: 30 days.
pub const DELAY_MAX_MS_DEFAULT: u64 = 30 * 24 * 60 * 60 * 1000;

/// Messages (any `T`) waiting for their due time, in due order; bounded by a capacity.
#[derive(Debug)]
pub struct Schedule<T> {
    /// Keyed by (due time, insertion counter): ties keep insertion order, deterministically.
    entries: BTreeMap<(u64, u64), T>,
    next_order: u64,
    /// Most entries held; [`Schedule::insert`] refuses beyond it.
    capacity: usize,
}

impl<T> Schedule<T> {
    /// An empty schedule holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            next_order: 0,
            capacity,
        }
    }

    /// Adds `item`, due at `due_unix_ms`. Gives it back when the schedule is full.
    pub fn insert(&mut self, due_unix_ms: u64, item: T) -> Result<(), T> {
        if self.entries.len() >= self.capacity {
            return Err(item);
        }
        self.entries.insert((due_unix_ms, self.next_order), item);
        self.next_order += 1;
        Ok(())
    }

    /// The earliest entry if it is due at `now_unix_ms` (due time ≤ now), taken out.
    pub fn pop_due(&mut self, now_unix_ms: u64) -> Option<(u64, T)> {
        let entry = self.entries.first_entry()?;
        if entry.key().0 > now_unix_ms {
            return None;
        }
        let ((due, _), item) = entry.remove_entry();
        Some((due, item))
    }

    /// When the earliest entry is due.
    pub fn next_due(&self) -> Option<u64> {
        self.entries.first_key_value().map(|((due, _), _)| *due)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Most entries held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The entries in the order they become due, with their due times.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.entries.iter().map(|((due, _), item)| (*due, item))
    }
}

/// Why a due time is refused at the API.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DueError {
    /// Further ahead than the node allows (`NodeConfig::delay_max`).
    #[error("due time {due_unix_ms} is more than {delay_max_ms} ms ahead of now ({now_unix_ms})")]
    TooFar {
        /// The requested due time.
        due_unix_ms: u64,
        /// The sender's clock.
        now_unix_ms: u64,
        /// The furthest allowed.
        delay_max_ms: u64,
    },
    /// The message would expire before (or when) it becomes due: it could never be delivered.
    #[error("the message expires at {expires_unix_ms}, not after its due time {due_unix_ms}")]
    ExpiresBeforeDue {
        /// The requested due time.
        due_unix_ms: u64,
        /// Its expiry.
        expires_unix_ms: u64,
    },
}

/// Checks a due time against the sender's clock and the message's expiry. A due time in the
/// past is fine (the message is due at once, still through the schedule).
pub fn check_due(
    due_unix_ms: u64,
    now_unix_ms: u64,
    delay_max_ms: u64,
    expires_unix_ms: Option<u64>,
) -> Result<(), DueError> {
    if due_unix_ms.saturating_sub(now_unix_ms) > delay_max_ms {
        return Err(DueError::TooFar {
            due_unix_ms,
            now_unix_ms,
            delay_max_ms,
        });
    }
    if let Some(expires_unix_ms) = expires_unix_ms {
        if expires_unix_ms <= due_unix_ms {
            return Err(DueError::ExpiresBeforeDue {
                due_unix_ms,
                expires_unix_ms,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_in_due_order_then_insertion_order_and_only_when_due() {
        let mut schedule = Schedule::new(8);
        schedule.insert(300, "c").unwrap();
        schedule.insert(100, "a1").unwrap();
        schedule.insert(200, "b").unwrap();
        schedule.insert(100, "a2").unwrap();
        assert_eq!(schedule.next_due(), Some(100));
        assert_eq!(schedule.pop_due(99), None, "nothing is due before its time");
        assert_eq!(schedule.pop_due(100), Some((100, "a1")));
        assert_eq!(
            schedule.pop_due(100),
            Some((100, "a2")),
            "ties keep send order"
        );
        assert_eq!(schedule.pop_due(100), None);
        assert_eq!(schedule.len(), 2);
        // A clock that jumped releases everything it passed, in due order.
        assert_eq!(schedule.pop_due(1_000), Some((200, "b")));
        assert_eq!(schedule.pop_due(1_000), Some((300, "c")));
        assert_eq!(schedule.pop_due(1_000), None);
        assert!(schedule.is_empty());
        assert_eq!(schedule.next_due(), None);
    }

    #[test]
    fn a_full_schedule_gives_the_item_back() {
        let mut schedule = Schedule::new(2);
        schedule.insert(5, 1).unwrap();
        schedule.insert(5, 2).unwrap();
        assert_eq!(schedule.insert(1, 3), Err(3));
        assert_eq!(schedule.len(), 2);
        assert_eq!(schedule.pop_due(5), Some((5, 1)));
        schedule.insert(1, 3).unwrap();
        assert_eq!(schedule.iter().collect::<Vec<_>>(), vec![(1, &3), (5, &2)]);
    }

    #[test]
    fn release_order_matches_a_model_on_random_scripts() {
        // Random inserts and pops against a sorted-vector model.
        let mut rng = crate::backoff::SplitMix64::new(7);
        for _ in 0..200 {
            let mut schedule = Schedule::new(16);
            let mut model: Vec<(u64, u64)> = Vec::new(); // (due, order)
            let mut order = 0;
            let mut now = 0;
            for _ in 0..100 {
                if rng.next_u64().is_multiple_of(3) {
                    now += rng.next_u64() % 50;
                    let mut released = Vec::new();
                    while let Some((due, item)) = schedule.pop_due(now) {
                        assert!(due <= now);
                        released.push((due, item));
                    }
                    model.sort();
                    let split = model.partition_point(|(due, _)| *due <= now);
                    let expected: Vec<_> = model.drain(..split).collect();
                    assert_eq!(released, expected);
                } else {
                    let due = now + rng.next_u64() % 100;
                    let accepted = schedule.insert(due, order).is_ok();
                    assert_eq!(accepted, model.len() < 16);
                    if accepted {
                        model.push((due, order));
                    }
                    order += 1;
                }
            }
        }
    }

    #[test]
    fn the_builders_agree() {
        use crate::OutgoingMessage;
        use std::time::{Duration, UNIX_EPOCH};
        let base = OutgoingMessage::command("c", bytes::Bytes::new(), 1_000);
        let delayed = base.clone().with_delay(Duration::from_millis(250));
        assert_eq!(delayed.deliver_after_unix_ms(), Some(1_250));
        let at = base
            .clone()
            .with_deliver_at(UNIX_EPOCH + Duration::from_millis(1_250));
        assert_eq!(at, delayed);
        assert_eq!(base.clone().with_delay(Duration::ZERO).deliver_after, None);
        assert_eq!(base.clone().with_deliver_after(0).deliver_after, None);
        assert_eq!(delayed.age_base_unix_ms(), 1_250);
        assert_eq!(base.age_base_unix_ms(), 1_000);
    }

    #[test]
    fn due_times_are_checked() {
        let max = DELAY_MAX_MS_DEFAULT;
        assert_eq!(
            check_due(1_000, 1_000 + 5, max, None),
            Ok(()),
            "past is fine"
        );
        assert_eq!(check_due(1_000 + max, 1_000, max, None), Ok(()));
        assert!(matches!(
            check_due(1_001 + max, 1_000, max, None),
            Err(DueError::TooFar { .. })
        ));
        assert!(matches!(
            check_due(u64::MAX, 1_000, max, None),
            Err(DueError::TooFar { .. })
        ));
        assert_eq!(check_due(2_000, 1_000, max, Some(2_001)), Ok(()));
        assert!(matches!(
            check_due(2_000, 1_000, max, Some(2_000)),
            Err(DueError::ExpiresBeforeDue { .. })
        ));
    }
}
