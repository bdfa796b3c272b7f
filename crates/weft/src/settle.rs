//! Settlement: which of a peer's messages the application has taken, so they may be acknowledged.
//!
//! A message is acknowledged to its producer only once the application *took* it from its inbox
//! and is done with it — the inbox settles a message when the application asks for the next one
//! (or drops the inbox) — never while it merely waits in a queue: a crash then loses nothing that
//! was acknowledged. One producer's stream is split over channels that the application drains at
//! different speeds, so messages settle out of order; acks are cumulative, so the watermark is
//! the highest sequence number below which *everything* settled. A window of flags above the
//! watermark records the rest; it holds at most the messages delivered and not yet settled,
//! which the inbox capacities bound.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use weft_proto::StreamId;

/// One producer's settlement state, shared by its peer task and the inboxes.
#[derive(Debug, Default)]
pub(crate) struct Settlement {
    state: Mutex<State>,
    /// Woken when the watermark moves.
    pub(crate) moved: Notify,
}

#[derive(Debug, Default)]
struct State {
    stream: Option<StreamId>,
    epoch: u64,
    /// Every seq up to here is settled.
    base: u64,
    /// `done[i]`: seq `base + 1 + i` is settled (the front is always false).
    done: VecDeque<bool>,
}

impl Settlement {
    /// A new inbound stream (or one restored from the spool): everything up to `base` is settled.
    pub(crate) fn reset(&self, stream: StreamId, epoch: u64, base: u64) {
        let mut state = self.state.lock().expect("settlement lock poisoned");
        *state = State {
            stream: Some(stream),
            epoch,
            base,
            done: VecDeque::new(),
        };
        drop(state);
        self.moved.notify_one();
    }

    /// The application is done with message `seq` of `stream`. False if `stream` is not this
    /// settlement's (another lane's, or one replaced meanwhile).
    #[cfg(test)]
    pub(crate) fn settle(&self, stream: StreamId, seq: u64) -> bool {
        self.settle_many(stream, [seq])
    }

    /// [`Settlement::settle`] for several messages of `stream` at once: one lock, and one wake
    /// of the peer task if the watermark moved. Volatile messages (seq 0) are skipped.
    pub(crate) fn settle_many(
        &self,
        stream: StreamId,
        seqs: impl IntoIterator<Item = u64>,
    ) -> bool {
        let mut state = self.state.lock().expect("settlement lock poisoned");
        if state.stream != Some(stream) {
            return false;
        }
        let before = state.base;
        for seq in seqs {
            if seq <= state.base {
                continue; // already settled (or volatile)
            }
            if seq == state.base + 1 && state.done.is_empty() {
                // In order, nothing settled ahead of it (the common case): no window to keep.
                state.base = seq;
                continue;
            }
            let index = (seq - state.base - 1) as usize;
            if state.done.len() <= index {
                state.done.resize(index + 1, false);
            }
            state.done[index] = true;
            state.advance();
        }
        let moved = state.base != before;
        drop(state);
        if moved {
            self.moved.notify_one();
        }
        true
    }

    /// The producer gave up `from..=up_to`, which never arrived: settled by definition. (What
    /// arrived before `from` and is not settled yet stays unsettled.)
    pub(crate) fn skip(&self, epoch: u64, from: u64, up_to: u64) {
        let mut state = self.state.lock().expect("settlement lock poisoned");
        if state.epoch != epoch || up_to <= state.base {
            return;
        }
        let first = from.max(state.base + 1);
        let span = (up_to - state.base) as usize;
        if state.done.len() < span {
            state.done.resize(span, false);
        }
        let base = state.base;
        for seq in first..=up_to {
            state.done[(seq - base - 1) as usize] = true;
        }
        if state.advance() {
            drop(state);
            self.moved.notify_one();
        }
    }

    /// (epoch, watermark).
    pub(crate) fn watermark(&self) -> (u64, u64) {
        let state = self.state.lock().expect("settlement lock poisoned");
        (state.epoch, state.base)
    }
}

impl State {
    fn advance(&mut self) -> bool {
        let before = self.base;
        while self.done.front() == Some(&true) {
            self.done.pop_front();
            self.base += 1;
        }
        self.base > before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_moves_only_over_a_settled_prefix() {
        let settlement = Settlement::default();
        let stream = StreamId(7);
        settlement.reset(stream, 1, 10);
        settlement.settle(stream, 12);
        assert_eq!(settlement.watermark(), (1, 10));
        settlement.settle(stream, 11);
        assert_eq!(settlement.watermark(), (1, 12));
        assert!(
            !settlement.settle(StreamId(8), 13),
            "another stream: not ours"
        );
        assert_eq!(settlement.watermark(), (1, 12));
        assert!(
            settlement.settle(stream, 12),
            "again: ours, nothing changes"
        );
        settlement.skip(1, 14, 15); // 13 arrived and is not settled yet
        assert_eq!(settlement.watermark(), (1, 12));
        settlement.settle(stream, 13);
        assert_eq!(settlement.watermark(), (1, 15));
        settlement.settle(stream, 16);
        assert_eq!(settlement.watermark(), (1, 16), "in order: moves at once");
        settlement.settle(stream, 18);
        settlement.settle(stream, 17);
        assert_eq!(settlement.watermark(), (1, 18));
        settlement.reset(StreamId(9), 2, 0);
        assert_eq!(settlement.watermark(), (2, 0));
    }
}
