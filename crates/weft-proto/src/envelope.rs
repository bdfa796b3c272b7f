//! Bodies of the mesh's own channels: events (a topic and a payload), requests (a service and a
//! payload) and replies (a status and a payload), and the replier's cache of answered requests.
//!
//! ```text
//! event / request body:  [name length: u8][name: topic or service, UTF-8][payload ...]
//! reply body:            [status: u8][payload ...]   (status 0: the payload is the answer)
//! ```
//! The payload is never copied on the way in: it is a slice of the received body.

use std::collections::{BTreeMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

use crate::id::NodeId;
use crate::topic::{Topic, TopicError, TOPIC_BYTES_MAX};

/// Why a body of the mesh's own channels is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Shorter than its own header says.
    #[error("envelope truncated")]
    Truncated,
    /// The name is not UTF-8.
    #[error("envelope name is not UTF-8")]
    NotUtf8,
    /// The name is not a valid topic or service name.
    #[error("envelope names an invalid topic: {0}")]
    Topic(#[from] TopicError),
    /// A reply status this version does not know.
    #[error("unknown reply status {0}")]
    UnknownStatus(u8),
}

/// Encodes a name (a topic or service, already validated) and a payload.
pub fn wrap(name: &Topic, payload: &[u8]) -> Bytes {
    let name = name.as_str().as_bytes();
    debug_assert!(name.len() <= TOPIC_BYTES_MAX);
    let mut body = BytesMut::with_capacity(1 + name.len() + payload.len());
    body.put_u8(name.len() as u8);
    body.put_slice(name);
    body.put_slice(payload);
    body.freeze()
}

/// How many bytes [`wrap`] adds to a payload.
pub fn wrap_overhead(name: &Topic) -> usize {
    1 + name.as_str().len()
}

/// Decodes what [`wrap`] made.
pub fn unwrap(body: &Bytes) -> Result<(Topic, Bytes), EnvelopeError> {
    let (&len, rest) = body.split_first().ok_or(EnvelopeError::Truncated)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(EnvelopeError::Truncated);
    }
    let name = std::str::from_utf8(&rest[..len]).map_err(|_| EnvelopeError::NotUtf8)?;
    let topic = Topic::new(name)?;
    Ok((topic, body.slice(1 + len..)))
}

/// How a request ended, as its reply says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplyStatus {
    /// The payload is the answer.
    Ok = 0,
    /// The node does not answer this service (any more).
    NoService = 1,
    /// The handler dropped the request without answering.
    Dropped = 2,
    /// The handler failed; the payload is its message (UTF-8).
    Failed = 3,
    /// The request repeats an idempotency key the server handled before and whose reply it no
    /// longer keeps: the handler is not run again.
    Repeated = 4,
}

/// Encodes a reply.
pub fn reply(status: ReplyStatus, payload: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(1 + payload.len());
    body.put_u8(status as u8);
    body.put_slice(payload);
    body.freeze()
}

/// Decodes a reply.
pub fn unwrap_reply(body: &Bytes) -> Result<(ReplyStatus, Bytes), EnvelopeError> {
    let status = match body.first().ok_or(EnvelopeError::Truncated)? {
        0 => ReplyStatus::Ok,
        1 => ReplyStatus::NoService,
        2 => ReplyStatus::Dropped,
        3 => ReplyStatus::Failed,
        4 => ReplyStatus::Repeated,
        other => return Err(EnvelopeError::UnknownStatus(*other)),
    };
    Ok((status, body.slice(1..)))
}

/// A request, as the replier's cache knows it: who asked, and the request id it chose.
pub type RequestKey = (NodeId, u64);

/// What to do with a request that arrived (see [`ReplyCache::begin`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    /// New: run the handler.
    Run,
    /// The handler is running for an earlier copy: its reply will answer this one too.
    Running,
    /// Answered before: send this reply again, do not run the handler.
    Replay(Bytes),
}

#[derive(Clone, Debug)]
enum Entry {
    Running,
    Done(Bytes),
}

/// A replier's memory of recent requests, so that a request that arrives again (the requester
/// retried after a lost reply) is answered from the cache instead of running its handler twice.
/// Bounded by count and by age.
#[derive(Debug)]
pub struct ReplyCache {
    /// Each entry with the time it was inserted (matching its place in `order`).
    entries: BTreeMap<RequestKey, (Entry, u64)>,
    /// Insertion order with insertion time (ms), for eviction.
    order: VecDeque<(RequestKey, u64)>,
    entries_max: usize,
    age_max_ms: u64,
}

impl ReplyCache {
    /// A cache of at most `entries_max` requests, each remembered for at most `age_max_ms`.
    pub fn new(entries_max: usize, age_max_ms: u64) -> Self {
        Self {
            entries: BTreeMap::new(),
            order: VecDeque::new(),
            entries_max: entries_max.max(1),
            age_max_ms,
        }
    }

    /// Requests remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn evict(&mut self, now_ms: u64) {
        while let Some((key, at)) = self.order.front() {
            let too_old = now_ms.saturating_sub(*at) >= self.age_max_ms;
            if !too_old && self.entries.len() < self.entries_max {
                break;
            }
            if self
                .entries
                .get(key)
                .is_some_and(|(_, inserted)| inserted == at)
            {
                self.entries.remove(key);
            }
            self.order.pop_front();
        }
    }

    /// A request `key` arrived at `now_ms`.
    pub fn begin(&mut self, key: RequestKey, now_ms: u64) -> Begin {
        self.evict(now_ms);
        match self.entries.get(&key) {
            Some((Entry::Running, _)) => Begin::Running,
            Some((Entry::Done(reply), _)) => Begin::Replay(reply.clone()),
            None => {
                self.entries.insert(key, (Entry::Running, now_ms));
                self.order.push_back((key, now_ms));
                Begin::Run
            }
        }
    }

    /// The handler answered `key` with `reply` (the whole reply body).
    pub fn finish(&mut self, key: RequestKey, reply: Bytes) {
        if let Some((entry, _)) = self.entries.get_mut(&key) {
            *entry = Entry::Done(reply);
        }
    }

    /// Forgets `key` (its handler gave up without an answer worth replaying).
    pub fn forget(&mut self, key: &RequestKey) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_refuse_garbage() {
        let topic = Topic::new("orders/created").unwrap();
        let body = wrap(&topic, b"payload");
        assert_eq!(body.len(), wrap_overhead(&topic) + 7);
        let (name, payload) = unwrap(&body).unwrap();
        assert_eq!(name, topic);
        assert_eq!(&payload[..], b"payload");
        assert_eq!(unwrap(&Bytes::new()), Err(EnvelopeError::Truncated));
        assert_eq!(
            unwrap(&Bytes::from_static(&[9, b'a'])),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(
            unwrap(&Bytes::from_static(&[2, 0xff, 0xfe])),
            Err(EnvelopeError::NotUtf8)
        );
        assert!(matches!(
            unwrap(&Bytes::from_static(&[2, b'a', b'*'])),
            Err(EnvelopeError::Topic(_))
        ));
        let r = reply(ReplyStatus::Failed, b"boom");
        assert_eq!(
            unwrap_reply(&r).unwrap(),
            (ReplyStatus::Failed, Bytes::from("boom"))
        );
        assert_eq!(
            unwrap_reply(&Bytes::from_static(&[42])),
            Err(EnvelopeError::UnknownStatus(42))
        );
    }

    #[test]
    fn a_repeated_request_is_answered_from_the_cache() {
        let node = NodeId::from_bytes([3; 32]);
        let mut cache = ReplyCache::new(2, 1_000);
        assert_eq!(cache.begin((node, 1), 0), Begin::Run);
        assert_eq!(cache.begin((node, 1), 1), Begin::Running);
        cache.finish((node, 1), Bytes::from("r1"));
        assert_eq!(cache.begin((node, 1), 2), Begin::Replay(Bytes::from("r1")));
        // Bounded by count: the oldest goes first.
        assert_eq!(cache.begin((node, 2), 3), Begin::Run);
        assert_eq!(cache.begin((node, 3), 4), Begin::Run);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.begin((node, 1), 5), Begin::Run, "evicted, runs again");
        // Bounded by age.
        cache.finish((node, 1), Bytes::from("again"));
        assert_eq!(cache.begin((node, 4), 2_000), Begin::Run);
        assert_eq!(
            cache.len(),
            1,
            "everything older than the age bound is gone"
        );
        cache.forget(&(node, 4));
        assert!(cache.is_empty());
    }
}
