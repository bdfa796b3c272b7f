//! The bounded queues of the data path: the application's messages into a peer's lane, and
//! delivered messages into a channel's inbox.
//!
//! A bounded multi-producer, single-consumer queue like `tokio::sync::mpsc`'s, built for runs of
//! messages: one uncontended lock per send (its room, its sequence number and its place at once),
//! one per run a receiver takes, and no wake for a receiver that is not waiting. tokio's channel
//! pays a semaphore acquire and release, a block-list push and pop and a waker swap per message,
//! about eight atomic read-modify-writes between the two ends; at millions of messages a second
//! that was the data path's largest cost after the codec (see docs/BENCHMARKS.md). Senders wait
//! for room on a [`Notify`] that is told when the queue goes from full to not full (or, while
//! someone waits for several places, at every pop), so a sender that waits is never missed and
//! one that does not costs nothing. Sends and receives
//! spend tokio's cooperative budget, as tokio's own channels do, so a task that sends in a loop
//! still yields.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use tokio::sync::Notify;

/// The receiver is gone: nothing can be sent any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// Why a send that does not wait did not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrySendError {
    /// No room now.
    Full,
    /// The receiver is gone.
    Closed,
}

/// A bounded queue of `capacity` items (at least one).
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            reserved: 0,
            closed: false,
            next_seq: 0,
            waker: None,
            waiting: false,
            wanting: 0,
        }),
        room: Notify::new(),
        capacity: capacity.max(1),
        senders: AtomicUsize::new(1),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Senders waiting for room: told when the queue goes from full to not full (at every pop
    /// and release while someone waits for several places), and when the receiver goes.
    room: Notify,
    capacity: usize,
    /// Live [`Sender`]s: the receiver ends once the queue is empty and none is left.
    senders: AtomicUsize,
}

struct State<T> {
    items: VecDeque<T>,
    /// Places promised to [`Permit`]s, not filled yet (they count against the capacity).
    reserved: usize,
    /// The receiver is gone.
    closed: bool,
    /// The number the next [`Sender::send_numbered`] hands out: an outbound lane numbers its
    /// messages here, so that queue order is number order with no lock of its own.
    next_seq: u64,
    /// The receiver's waker, kept between waits (so a receiver waiting with the same waker
    /// again does not clone it again); `waiting` says whether it waits now.
    waker: Option<Waker>,
    waiting: bool,
    /// Senders waiting for more than one place (see [`Sender::reserve_many`]).
    wanting: usize,
}

impl<T> State<T> {
    fn is_full(&self, capacity: usize) -> bool {
        self.items.len() + self.reserved >= capacity
    }

    fn room(&self, capacity: usize) -> usize {
        capacity.saturating_sub(self.items.len() + self.reserved)
    }

    /// Whether a change from `was_full` frees places someone waits for.
    fn tells_waiters(&self, was_full: bool, capacity: usize) -> bool {
        (was_full && !self.is_full(capacity)) || self.wanting > 0
    }

    /// Wakes the receiver if it waits.
    fn wake_receiver(&mut self) {
        if self.waiting {
            self.waiting = false;
            if let Some(waker) = &self.waker {
                waker.wake_by_ref();
            }
        }
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock leaves the queue as consistent as any single push
        // or pop does: carry on with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until the queue has room for one more, or the receiver is gone.
    async fn room(&self) -> Result<(), Closed> {
        let notified = self.room.notified();
        tokio::pin!(notified);
        // Registered before looking, so a change from full to not full after the look wakes us.
        notified.as_mut().enable();
        {
            let state = self.lock();
            if state.closed {
                return Err(Closed);
            }
            if !state.is_full(self.capacity) {
                return Ok(());
            }
        }
        notified.await;
        Ok(())
    }

    /// Gives back `count` reserved places.
    fn release(&self, count: usize) {
        self.shrink(self.lock(), |state| state.reserved -= count);
    }

    /// Runs `f`, which frees places, under the held lock; then tells the senders waiting for
    /// room if that is news to them (after the lock is released).
    fn shrink<R>(
        &self,
        mut state: MutexGuard<'_, State<T>>,
        f: impl FnOnce(&mut State<T>) -> R,
    ) -> R {
        let was_full = state.is_full(self.capacity);
        let result = f(&mut state);
        let tell = state.tells_waiters(was_full, self.capacity);
        drop(state);
        if tell {
            self.room.notify_waiters();
        }
        result
    }
}

/// Spends one unit of tokio's cooperative budget (yielding first if it is spent).
async fn budget() {
    poll_fn(|cx| {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        coop.made_progress();
        Poll::Ready(())
    })
    .await;
}

/// The sending end; clones send into the same queue.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last one: a waiting receiver learns that nothing more comes.
            self.shared.lock().wake_receiver();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

impl<T> Sender<T> {
    /// Numbers an item and queues it, under one hold of the lock: `make` gets the number
    /// ([`Sender::set_next_seq`] and up, one per call) and returns the item. Waits for room.
    pub(crate) async fn send_numbered(&self, make: impl FnOnce(u64) -> T) -> Result<u64, Closed> {
        budget().await;
        let mut make = Some(make);
        loop {
            match self.try_numbered(&mut make) {
                Ok(seq) => return Ok(seq),
                Err(TrySendError::Closed) => return Err(Closed),
                Err(TrySendError::Full) => self.shared.room().await?,
            }
        }
    }

    /// [`Sender::send_numbered`] without waiting.
    pub(crate) fn try_send_numbered(
        &self,
        make: impl FnOnce(u64) -> T,
    ) -> Result<u64, TrySendError> {
        self.try_numbered(&mut Some(make))
    }

    fn try_numbered(&self, make: &mut Option<impl FnOnce(u64) -> T>) -> Result<u64, TrySendError> {
        let mut seq = 0;
        self.try_push(|state| {
            seq = state.next_seq;
            state.next_seq += 1;
            let make = make.take().expect("called until it sends, then not again");
            make(seq)
        })?;
        Ok(seq)
    }

    /// Adds to the last queued item when `join` takes it (returning that item's number; no
    /// room is needed, the item holds its place already), and otherwise numbers and queues a
    /// new item like [`Sender::send_numbered`], waiting for room. Both under one hold of the
    /// lock: the receiver never sees an item while it is joined.
    pub(crate) async fn send_joined(
        &self,
        mut join: impl FnMut(&mut T) -> Option<u64>,
        make: impl FnOnce(u64) -> T,
    ) -> Result<u64, Closed> {
        budget().await;
        let mut make = Some(make);
        loop {
            match self.try_joined(&mut join, &mut make) {
                Ok(seq) => return Ok(seq),
                Err(TrySendError::Closed) => return Err(Closed),
                Err(TrySendError::Full) => self.shared.room().await?,
            }
        }
    }

    /// [`Sender::send_joined`] without waiting.
    pub(crate) fn try_send_joined(
        &self,
        mut join: impl FnMut(&mut T) -> Option<u64>,
        make: impl FnOnce(u64) -> T,
    ) -> Result<u64, TrySendError> {
        self.try_joined(&mut join, &mut Some(make))
    }

    fn try_joined(
        &self,
        join: &mut impl FnMut(&mut T) -> Option<u64>,
        make: &mut Option<impl FnOnce(u64) -> T>,
    ) -> Result<u64, TrySendError> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed);
        }
        // The receiver was woken when the item was queued, and takes it as it is then.
        if let Some(seq) = state.items.back_mut().and_then(&mut *join) {
            return Ok(seq);
        }
        if state.is_full(self.shared.capacity) {
            return Err(TrySendError::Full);
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let make = make.take().expect("called until it sends, then not again");
        state.items.push_back(make(seq));
        state.wake_receiver();
        Ok(seq)
    }

    /// Queues `make()` if there is room now; `make` runs only then (under the lock: keep it
    /// short).
    pub(crate) fn try_send_with(&self, make: impl FnOnce() -> T) -> Result<(), TrySendError> {
        self.try_push(|_| make())
    }

    /// Queues what `make` returns, under one hold of the lock, if there is room now.
    fn try_push(&self, make: impl FnOnce(&mut State<T>) -> T) -> Result<(), TrySendError> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed);
        }
        if state.is_full(self.shared.capacity) {
            return Err(TrySendError::Full);
        }
        let item = make(&mut state);
        state.items.push_back(item);
        state.wake_receiver();
        Ok(())
    }

    /// Sets the number the next numbered send hands out (before any is sent).
    pub(crate) fn set_next_seq(&self, next_seq: u64) {
        self.shared.lock().next_seq = next_seq;
    }

    /// One place, held until the permit sends or is dropped. Waits for room.
    pub(crate) async fn reserve(&self) -> Result<Permit<T>, Closed> {
        self.reserve_many(1).await
    }

    /// `count` places at once (at least one, at most the capacity), held until the permit
    /// sends or is dropped. Waits until all are free.
    pub(crate) async fn reserve_many(&self, count: usize) -> Result<Permit<T>, Closed> {
        assert!(
            (1..=self.shared.capacity).contains(&count),
            "reserve between one place and the capacity"
        );
        budget().await;
        loop {
            {
                let mut state = self.shared.lock();
                if state.closed {
                    return Err(Closed);
                }
                if state.room(self.shared.capacity) >= count {
                    state.reserved += count;
                    return Ok(self.permit(count));
                }
            }
            self.wait_for_places(count).await?;
        }
    }

    /// Waits until `count` places are free (or the receiver is gone). For one place the change
    /// from full to not full is the signal; a waiter for more is counted in `wanting`, which
    /// makes every pop and release tell the waiters.
    async fn wait_for_places(&self, count: usize) -> Result<(), Closed> {
        if count == 1 {
            return self.shared.room().await;
        }
        let notified = self.shared.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Closed);
            }
            if state.room(self.shared.capacity) >= count {
                return Ok(());
            }
            state.wanting += 1;
        }
        // Counted out again however the wait ends (woken or dropped).
        struct Wanting<'a, T>(&'a Shared<T>);
        impl<T> Drop for Wanting<'_, T> {
            fn drop(&mut self) {
                self.0.lock().wanting -= 1;
            }
        }
        let _wanting = Wanting(&self.shared);
        notified.await;
        Ok(())
    }

    /// One place if there is room now.
    pub(crate) fn try_reserve(&self) -> Result<Permit<T>, TrySendError> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed);
        }
        if state.is_full(self.shared.capacity) {
            return Err(TrySendError::Full);
        }
        state.reserved += 1;
        drop(state);
        Ok(self.permit(1))
    }

    fn permit(&self, count: usize) -> Permit<T> {
        Permit {
            shared: Arc::clone(&self.shared),
            count,
        }
    }

    /// Waits until there is room for one more item (or the receiver is gone).
    pub(crate) async fn room(&self) -> Result<(), Closed> {
        self.shared.room().await
    }

    /// Places free now.
    pub(crate) fn capacity(&self) -> usize {
        self.shared.lock().room(self.shared.capacity)
    }

    /// Places in all.
    pub(crate) fn max_capacity(&self) -> usize {
        self.shared.capacity
    }
}

/// Places reserved in a queue: filled by [`Permit::send_all`] or [`Permit::send_numbered`],
/// given back when dropped unfilled.
pub(crate) struct Permit<T> {
    shared: Arc<Shared<T>>,
    count: usize,
}

impl<T> std::fmt::Debug for Permit<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl<T> Permit<T> {
    /// How many places this permit holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Takes over `other`'s places (of the same queue).
    pub(crate) fn merge(&mut self, mut other: Permit<T>) {
        assert!(
            Arc::ptr_eq(&self.shared, &other.shared),
            "places of one queue"
        );
        self.count += other.count;
        other.count = 0;
    }

    /// Queues the items (at most the permit's places; unused places go back).
    pub(crate) fn send_all(mut self, items: impl IntoIterator<Item = T>) {
        let mut state = self.shared.lock();
        let mut sent = 0;
        for item in items.into_iter().take(self.count) {
            state.items.push_back(item);
            sent += 1;
        }
        state.reserved -= sent;
        self.count -= sent;
        if sent > 0 {
            state.wake_receiver();
        }
    }

    /// Numbers `count` items (at most the permit's places) and queues them, under one hold of
    /// the lock: `make` gets the first number and returns the items, or `None` to send nothing
    /// (no number is used then). Returns the first number if it sent.
    pub(crate) fn send_numbered<I: IntoIterator<Item = T>>(
        mut self,
        count: usize,
        make: impl FnOnce(u64) -> Option<I>,
    ) -> Option<u64> {
        assert!(count <= self.count, "more items than places");
        let mut state = self.shared.lock();
        let first = state.next_seq;
        let items = make(first)?;
        let before = state.items.len();
        state.items.extend(items.into_iter().take(count));
        let sent = state.items.len() - before;
        debug_assert_eq!(sent, count, "make returns the items it was asked for");
        state.next_seq += sent as u64;
        state.reserved -= sent;
        self.count -= sent;
        state.wake_receiver();
        Some(first)
    }
}

impl<T> Drop for Permit<T> {
    fn drop(&mut self) {
        if self.count > 0 {
            self.shared.release(self.count);
        }
    }
}

/// The receiving end. Dropping it closes the queue (sends fail) and drops what it holds.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

impl<T> Receiver<T> {
    /// Moves up to `limit` items (at least one) into `buffer`; `Ready(0)` once the queue is
    /// empty and every sender is gone (or for a `limit` of 0).
    pub(crate) fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut Vec<T>,
        limit: usize,
    ) -> Poll<usize> {
        if limit == 0 {
            return Poll::Ready(0);
        }
        self.poll_take(cx, |items| {
            let n = limit.min(items.len());
            buffer.extend(items.drain(..n));
            n
        })
        .map(|taken| taken.unwrap_or(0))
    }

    /// Runs `take` on the waiting items (never empty) under the lock; `Ready(None)` once the
    /// queue is empty and every sender is gone.
    fn poll_take<R>(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&mut VecDeque<T>) -> R,
    ) -> Poll<Option<R>> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let mut state = self.shared.lock();
        if state.items.is_empty() {
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return Poll::Ready(None);
            }
            if !state
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.waker = Some(cx.waker().clone());
            }
            state.waiting = true;
            return Poll::Pending;
        }
        let taken = self.shared.shrink(state, |state| take(&mut state.items));
        coop.made_progress();
        Poll::Ready(Some(taken))
    }

    /// Up to `limit` items into `buffer`, waiting for at least one; 0 once the queue is empty
    /// and every sender is gone.
    pub(crate) async fn recv_many(&mut self, buffer: &mut Vec<T>, limit: usize) -> usize {
        poll_fn(|cx| self.poll_recv_many(cx, buffer, limit)).await
    }

    /// The next item; `Ready(None)` once the queue is empty and every sender is gone.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.poll_take(cx, |items| items.pop_front().expect("not empty"))
    }

    /// The next item, waiting for it; `None` once the queue is empty and every sender is gone.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        self.shared
            .shrink(self.shared.lock(), |state| state.items.pop_front())
    }

    /// Items waiting now.
    pub(crate) fn len(&self) -> usize {
        self.shared.lock().items.len()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock: an item's drop may do anything.
        drop(items);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn items_arrive_in_order_with_their_numbers() {
        let (tx, mut rx) = channel::<(u64, &str)>(8);
        tx.set_next_seq(5);
        let a = tx.send_numbered(|seq| (seq, "a")).await.unwrap();
        let b = tx.try_send_numbered(|seq| (seq, "b")).unwrap();
        tx.try_send_with(|| (0, "volatile")).unwrap();
        assert_eq!((a, b), (5, 6));
        let mut got = Vec::new();
        assert_eq!(rx.recv_many(&mut got, 10).await, 3);
        assert_eq!(got, vec![(5, "a"), (6, "b"), (0, "volatile")]);
    }

    /// A join goes into the last item while it waits in the queue (even a full one: it takes
    /// no place), never into one the receiver took, and a refused join queues a new item.
    #[tokio::test]
    async fn a_join_adds_to_the_last_item_only_while_it_waits() {
        let (tx, mut rx) = channel::<(u64, Vec<&str>)>(2);
        // Joins a run of at most three.
        let join = |word: &'static str| {
            move |last: &mut (u64, Vec<&'static str>)| {
                (last.1.len() < 3).then(|| {
                    last.1.push(word);
                    last.0
                })
            }
        };
        let new = |word: &'static str| move |seq| (seq, vec![word]);
        assert_eq!(tx.send_joined(join("a"), new("a")).await.unwrap(), 0);
        assert_eq!(tx.try_send_joined(join("b"), new("b")).unwrap(), 0);
        assert_eq!(tx.send_joined(join("c"), new("c")).await.unwrap(), 0);
        assert_eq!(tx.send_joined(join("d"), new("d")).await.unwrap(), 1);
        // Full (two items): a join still goes in, a new item does not.
        assert_eq!(tx.try_send_joined(join("e"), new("e")).unwrap(), 1);
        assert_eq!(tx.try_send_joined(join("f"), new("f")).unwrap(), 1);
        assert_eq!(
            tx.try_send_joined(join("g"), new("g")),
            Err(TrySendError::Full)
        );
        let mut got = Vec::new();
        assert_eq!(rx.recv_many(&mut got, 10).await, 2);
        assert_eq!(
            got,
            vec![(0, vec!["a", "b", "c"]), (1, vec!["d", "e", "f"])]
        );
        // Taken: the next join starts a new item, numbered on.
        assert_eq!(tx.try_send_joined(join("g"), new("g")).unwrap(), 2);
        assert_eq!(rx.recv().await, Some((2, vec!["g"])));
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_sender_wait_until_the_receiver_takes() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.try_send_with(|| 1).unwrap();
        tx.try_send_with(|| 2).unwrap();
        assert_eq!(tx.try_send_with(|| 3), Err(TrySendError::Full));
        assert!(matches!(tx.try_reserve(), Err(TrySendError::Full)));
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send_numbered(|_| 3).await }
        });
        // The sender is parked on the full queue: a take is what lets it on.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(rx.recv().await, Some(1));
        waiting.await.unwrap().unwrap();
        let mut got = Vec::new();
        rx.recv_many(&mut got, 10).await;
        assert_eq!(got, vec![2, 3]);
    }

    #[tokio::test]
    async fn reserved_places_count_against_the_capacity_and_come_back_when_dropped() {
        let (tx, mut rx) = channel::<u32>(3);
        let permit = tx.reserve_many(2).await.unwrap();
        assert_eq!(permit.len(), 2);
        assert_eq!(tx.capacity(), 1);
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.reserve_many(3).await.map(|p| p.len()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(permit);
        assert_eq!(waiting.await.unwrap(), Ok(3));
        let permit = tx.reserve_many(3).await.unwrap();
        let first = permit.send_numbered(3, |first| {
            Some(vec![10, 11, 12].into_iter().map(move |v| v + first as u32))
        });
        assert_eq!(first, Some(0));
        let mut got = Vec::new();
        rx.recv_many(&mut got, 10).await;
        assert_eq!(got, vec![10, 11, 12]);
    }

    #[tokio::test]
    async fn a_permit_that_sends_nothing_uses_no_number() {
        let (tx, mut rx) = channel::<u64>(4);
        let permit = tx.reserve().await.unwrap();
        assert_eq!(permit.send_numbered(1, |_| None::<Vec<u64>>), None);
        assert_eq!(tx.capacity(), 4);
        let seq = tx.send_numbered(|seq| seq).await.unwrap();
        assert_eq!(seq, 0);
        assert_eq!(rx.recv().await, Some(0));
    }

    #[tokio::test]
    async fn the_receiver_ends_once_every_sender_is_gone_and_the_queue_is_empty() {
        let (tx, mut rx) = channel::<u32>(4);
        let other = tx.clone();
        tx.try_send_with(|| 1).unwrap();
        drop(tx);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                got.push(item);
            }
            got
        });
        other.send_numbered(|_| 2).await.unwrap();
        drop(other);
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the receiver ends")
            .unwrap();
        assert_eq!(got, vec![1, 2]);
    }

    #[tokio::test]
    async fn dropping_the_receiver_fails_waiting_and_later_senders() {
        let (tx, rx) = channel::<u32>(1);
        tx.try_send_with(|| 1).unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send_numbered(|_| 2).await }
        });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(Closed));
        assert_eq!(tx.try_send_with(|| 3), Err(TrySendError::Closed));
        assert!(tx.reserve().await.is_err());
    }

    #[tokio::test]
    async fn a_sender_in_a_loop_yields_to_other_tasks() {
        let (tx, mut rx) = channel::<u32>(100_000);
        let other = tokio::spawn(async {});
        // The queue never fills, so only the cooperative budget makes the loop yield.
        for n in 0..10_000 {
            tx.send_numbered(|_| n).await.unwrap();
            if other.is_finished() {
                break;
            }
        }
        assert!(
            other.is_finished(),
            "the other task ran while the loop sent"
        );
        assert!(rx.try_recv().is_some());
    }
}
