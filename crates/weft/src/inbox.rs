//! Channel inboxes: where delivered messages wait for the application.
//!
//! Every channel has one bounded queue, created on first use by either side: a message for a
//! channel nobody receives yet waits there (no slow-joiner loss), and when the queue is full the
//! link delivering to it stops reading, which the sender feels as backpressure. Dropping an
//! [`Inbox`] hands its queue, with whatever it still holds, back to the node for the next receiver.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;
use weft_proto::Message;

use crate::error::ReceiveError;

struct Slot {
    tx: mpsc::Sender<Message>,
    /// `None` while an [`Inbox`] holds the receiver.
    rx: Option<mpsc::Receiver<Message>>,
}

/// Name under which the catch-all queue is kept (not a valid channel name on the wire's API).
const CATCH_ALL: &str = "";

/// The node's channels. `None` once the node shut down.
pub(crate) struct Channels {
    slots: Mutex<Option<HashMap<String, Slot>>>,
    /// Bumped whenever which queue a channel maps to may have changed, so that the peer tasks'
    /// lock-free caches know to look again.
    generation: AtomicU64,
    capacity: usize,
    max: usize,
}

/// Why a channel's queue could not be found or made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelError {
    TooMany,
    Closed,
}

impl Channels {
    pub(crate) fn new(capacity: usize, max: usize) -> Self {
        Self {
            slots: Mutex::new(Some(HashMap::new())),
            generation: AtomicU64::new(0),
            capacity,
            max,
        }
    }

    fn with_slot<T>(
        &self,
        channel: &str,
        f: impl FnOnce(&mut Slot) -> T,
    ) -> Result<T, ChannelError> {
        let mut guard = self.slots.lock().expect("channels lock poisoned");
        let slots = guard.as_mut().ok_or(ChannelError::Closed)?;
        if let Some(slot) = slots.get_mut(channel) {
            return Ok(f(slot));
        }
        if slots.len() >= self.max {
            return Err(ChannelError::TooMany);
        }
        let (tx, rx) = mpsc::channel(self.capacity);
        let slot = slots
            .entry(channel.to_owned())
            .or_insert(Slot { tx, rx: Some(rx) });
        self.generation.fetch_add(1, Ordering::Release);
        Ok(f(slot))
    }

    /// Changes whenever a cached channel-to-queue mapping may be stale.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The queue a message for `channel` goes to: the channel's own if it has one, else the
    /// catch-all queue if someone receives everything, else a new queue for the channel (where
    /// messages wait for their receiver).
    pub(crate) fn sender(&self, channel: &str) -> Result<mpsc::Sender<Message>, ChannelError> {
        {
            let guard = self.slots.lock().expect("channels lock poisoned");
            let slots = guard.as_ref().ok_or(ChannelError::Closed)?;
            if let Some(slot) = slots.get(channel) {
                return Ok(slot.tx.clone());
            }
            if let Some(catch_all) = slots.get(CATCH_ALL) {
                if catch_all.rx.is_none() {
                    return Ok(catch_all.tx.clone());
                }
            }
        }
        self.with_slot(channel, |slot| slot.tx.clone())
    }

    /// Receives every message whose channel has no queue of its own.
    pub(crate) fn take_catch_all(self: &Arc<Self>) -> Result<Inbox, ReceiveError> {
        let inbox = self.take_receiver(CATCH_ALL)?;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(inbox)
    }

    pub(crate) fn take_receiver(self: &Arc<Self>, channel: &str) -> Result<Inbox, ReceiveError> {
        let rx = self
            .with_slot(channel, |slot| slot.rx.take())
            .map_err(|e| match e {
                ChannelError::Closed => ReceiveError::NodeClosed,
                ChannelError::TooMany => ReceiveError::TooManyChannels(self.max),
            })?
            .ok_or_else(|| ReceiveError::AlreadyReceiving(channel.to_owned()))?;
        Ok(Inbox {
            channel: channel.to_owned(),
            rx: Some(rx),
            channels: Arc::clone(self),
        })
    }

    fn give_back(&self, channel: &str, rx: mpsc::Receiver<Message>) {
        let mut guard = self.slots.lock().expect("channels lock poisoned");
        if let Some(slot) = guard.as_mut().and_then(|slots| slots.get_mut(channel)) {
            slot.rx = Some(rx);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Drops every sender held here, so receivers end once the links are gone too.
    pub(crate) fn close(&self) {
        self.slots.lock().expect("channels lock poisoned").take();
    }
}

/// The application's end of one channel: a stream of messages, in order per sending node.
pub struct Inbox {
    channel: String,
    rx: Option<mpsc::Receiver<Message>>,
    channels: Arc<Channels>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("channel", &self.channel)
            .finish()
    }
}

impl Inbox {
    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message; `None` once the node shut down and the queue is empty.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.as_mut()?.recv().await
    }

    /// Up to `limit` messages at once (at least one unless the node shut down).
    pub async fn recv_many(&mut self, buffer: &mut Vec<Message>, limit: usize) -> usize {
        match self.rx.as_mut() {
            Some(rx) => rx.recv_many(buffer, limit).await,
            None => 0,
        }
    }

    /// A message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.as_mut()?.try_recv().ok()
    }

    /// Messages waiting in the queue now.
    pub fn len(&self) -> usize {
        self.rx.as_ref().map_or(0, |rx| rx.len())
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Stream for Inbox {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            self.channels.give_back(&self.channel, rx);
        }
    }
}
