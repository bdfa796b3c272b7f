//! One set of message options for every pattern: [`MessageOptions`], taken by
//! [`Node::send_with`](crate::Node::send_with), [`Node::publish_with`](crate::Node::publish_with),
//! [`Node::publish_batch_with`](crate::Node::publish_batch_with),
//! [`Node::push_with`](crate::Node::push_with), [`Node::push_keyed_with`](crate::Node::push_keyed_with),
//! [`RequestBuilder::options`](crate::RequestBuilder::options) and
//! [`ScatterBuilder::options`](crate::ScatterBuilder::options). The receiving side sees them on
//! the [`Message`](crate::Message): `header.headers()`, `header.priority`,
//! `header.expires_unix_ms()`, `header.idempotency_key()`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use weft_proto::gossip::EventOptions;
use weft_proto::message::{
    check_header, check_idempotency_key, HeaderError, HEADERS_MAX, IDEMPOTENCY_KEY_HEADER,
};
use weft_proto::{OutgoingMessage, Priority};

/// Headers the mesh may add to a message of its own (`weft-redelivery-of`, the idempotency
/// key): kept free below [`HEADERS_MAX`].
const MESH_HEADERS: usize = 2;

/// Why a message's options are refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// A header (or the idempotency key) breaks the header rules.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The pattern does not offer this option.
    #[error("{option} is not available for {pattern}: {why}")]
    Unsupported {
        /// The option.
        option: &'static str,
        /// The pattern.
        pattern: &'static str,
        /// Why, and what to do instead.
        why: &'static str,
    },
}

/// A point in time of an option (expiry, due time): relative to the send, or absolute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    /// This long after it is sent.
    After(Duration),
    /// At this wall-clock time (Unix milliseconds).
    At(u64),
}

impl When {
    /// At `at` (a time before the Unix epoch is 0).
    fn at(at: SystemTime) -> Self {
        let unix_ms = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        When::At(unix_ms)
    }

    /// The wall-clock time (Unix milliseconds) for a message sent at `now_unix_ms`.
    fn unix_ms(self, now_unix_ms: u64) -> u64 {
        match self {
            When::After(after) => {
                now_unix_ms.saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
            }
            When::At(at) => at,
        }
    }
}

/// What a message carries besides its body and address, the same for every pattern:
/// application headers, a priority, an expiry, a due time and an idempotency key. A builder:
///
/// ```
/// use std::time::Duration;
/// use weft::{MessageOptions, Priority};
///
/// let options = MessageOptions::new()
///     .header("trace-id", "4bf92f35")
///     .priority(Priority::HIGH)
///     .ttl(Duration::from_secs(30))
///     .idempotency_key("order-17");
/// assert_eq!(options.headers().len(), 1);
/// ```
///
/// Header names are 1 to 128 bytes of `A-Z a-z 0-9 - _ . : /`, values at most 8 KiB, at most
/// 62 headers; names starting with `weft-` are the mesh's own. A send with options that break
/// these rules fails with [`OptionsError`] (inside the pattern's error), before anything is
/// sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageOptions {
    headers: Vec<(String, Bytes)>,
    priority: Option<Priority>,
    expiry: Option<When>,
    due: Option<When>,
    idempotency_key: Option<Bytes>,
}

impl MessageOptions {
    /// No options: the defaults of every pattern.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an application header (passed through untouched; a name may repeat).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The priority (default [`Priority::NORMAL`]): the lane the message travels in, on every
    /// hop (see [`weft_proto::Lane`]). Order is FIFO per lane; pub/sub keeps FIFO per
    /// publisher across lanes.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Not worth delivering once `ttl` has passed since it was sent: a point-to-point message or
    /// work item is given up (to the dead letters) by its link, an event or request is dropped
    /// by its receiver.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.expiry = Some(When::After(ttl));
        self
    }

    /// Like [`MessageOptions::ttl`], at a wall-clock time.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expiry = Some(When::at(at));
        self
    }

    /// Deliver not before `delay` from now: the message is accepted now (with a spool:
    /// durable) and held in this node's schedule; a point-to-point message is numbered into its
    /// stream when due, a publish or push is carried out then (subscribers and workers chosen
    /// then). Requests and publish batches refuse it.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.due = Some(When::After(delay));
        self
    }

    /// Deliver not before `at` (see [`MessageOptions::delay`]).
    pub fn deliver_at(mut self, at: SystemTime) -> Self {
        self.due = Some(When::at(at));
        self
    }

    /// The producer's own key for this message (an order id, an outbox row id; 1 to 256
    /// bytes). The receiving node hands its application only the first message of this node
    /// with the key within its window (`NodeConfig::idempotency_window`, persisted with a
    /// spool): a message sent again as a *new* message — a transactional-outbox relay that
    /// crashed after sending and before marking the row sent — is processed once. The
    /// receiver sees it as `header.idempotency_key()`. For
    /// [`Node::publish_batch_with`](crate::Node::publish_batch_with) the key names the batch:
    /// event `i` gets `key/i`.
    pub fn idempotency_key(mut self, key: impl Into<Bytes>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The application headers set.
    pub fn headers(&self) -> &[(String, Bytes)] {
        &self.headers
    }

    /// Checks the headers and the key against the header rules.
    pub fn check(&self) -> Result<(), OptionsError> {
        if self.headers.len() > HEADERS_MAX - MESH_HEADERS {
            return Err(HeaderError::TooMany {
                count: self.headers.len(),
            }
            .into());
        }
        for (name, value) in &self.headers {
            check_header(name, value)?;
        }
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key(key)?;
        }
        Ok(())
    }

    /// Refuses a due time for a pattern that cannot hold one.
    pub(crate) fn refuse_delay(&self, pattern: &'static str) -> Result<(), OptionsError> {
        match self.due {
            None => Ok(()),
            Some(_) => Err(OptionsError::Unsupported {
                option: "a due time (delay, deliver_at)",
                pattern,
                why: "a request is answered while its requester waits, and a batch is \
                      published at once: schedule the call, or publish the events one by one \
                      with publish_with",
            }),
        }
    }

    fn expires_unix_ms(&self, now_unix_ms: u64) -> Option<u64> {
        self.expiry.map(|expiry| expiry.unix_ms(now_unix_ms).max(1))
    }

    /// Sets the options on `message` (created at `now_unix_ms`). The expiry is the earlier of
    /// the message's own and the options'. Check first ([`MessageOptions::check`]).
    pub(crate) fn apply(&self, mut message: OutgoingMessage, now_unix_ms: u64) -> OutgoingMessage {
        if let Some(priority) = self.priority {
            message.priority = priority;
        }
        if let Some(at) = self.expires_unix_ms(now_unix_ms) {
            let at = message
                .options
                .as_ref()
                .and_then(|o| o.expires_unix_ms)
                .map_or(at, |own| own.min(at));
            message = message.with_expiry(at);
        }
        for (name, value) in &self.headers {
            message = message.with_header(name.clone(), value.clone());
        }
        if let Some(key) = &self.idempotency_key {
            message = message.with_header(IDEMPOTENCY_KEY_HEADER, key.clone());
        }
        match self.due {
            Some(When::After(delay)) => {
                if message.created_unix_ms == 0 {
                    message.created_unix_ms = now_unix_ms;
                }
                message = message.with_delay(delay);
            }
            Some(When::At(at)) => message = message.with_deliver_after(at),
            None => {}
        }
        message
    }

    /// The options of an event published at `now_unix_ms` (`None`: all defaults); `index`:
    /// its place in a batch (the key becomes `key/index`).
    pub(crate) fn event_options(
        &self,
        now_unix_ms: u64,
        index: Option<usize>,
    ) -> Option<EventOptions> {
        let mut headers = self.headers.clone();
        if let Some(key) = &self.idempotency_key {
            let key = match index {
                None => key.clone(),
                Some(i) => {
                    let mut indexed = key.to_vec();
                    indexed.extend_from_slice(format!("/{i}").as_bytes());
                    Bytes::from(indexed)
                }
            };
            headers.push((IDEMPOTENCY_KEY_HEADER.to_owned(), key));
        }
        let options = EventOptions {
            priority: self.priority.unwrap_or_default(),
            expires_unix_ms: self.expires_unix_ms(now_unix_ms),
            headers,
        };
        (!options.is_empty()).then_some(options)
    }

    /// The priority set, if any.
    pub(crate) fn priority_or(&self, default: Priority) -> Priority {
        self.priority.unwrap_or(default)
    }

    /// Whether a due time is set.
    pub(crate) fn is_delayed(&self) -> bool {
        self.due.is_some()
    }

    /// The options a message carries (a delayed operation's, at its due time): headers, the
    /// idempotency key, priority and expiry; no due time.
    pub(crate) fn from_message(message: &OutgoingMessage) -> Self {
        let mut options = Self {
            priority: Some(message.priority),
            ..Self::default()
        };
        if let Some(own) = &message.options {
            for (name, value) in &own.headers {
                if name == IDEMPOTENCY_KEY_HEADER {
                    options.idempotency_key = Some(value.clone());
                } else {
                    options.headers.push((name.clone(), value.clone()));
                }
            }
            options.expiry = own.expires_unix_ms.map(When::At);
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_set_on_the_message() {
        let options = MessageOptions::new()
            .header("trace", "abc")
            .priority(Priority::HIGH)
            .ttl(Duration::from_secs(5))
            .idempotency_key("order-17");
        assert_eq!(options.check(), Ok(()));
        let message =
            OutgoingMessage::command("orders", Bytes::from_static(b"x"), 1_000).with_expiry(3_000);
        let message = options.apply(message, 1_000);
        assert_eq!(message.priority, Priority::HIGH);
        let own = message.options.as_ref().unwrap();
        assert_eq!(own.expires_unix_ms, Some(3_000), "the earlier expiry wins");
        assert_eq!(
            own.headers,
            vec![
                ("trace".to_owned(), Bytes::from_static(b"abc")),
                (
                    IDEMPOTENCY_KEY_HEADER.to_owned(),
                    Bytes::from_static(b"order-17")
                ),
            ]
        );
        assert_eq!(message.deliver_after, None);
        let delayed = MessageOptions::new()
            .delay(Duration::from_secs(2))
            .apply(OutgoingMessage::command("c", Bytes::new(), 0), 10_000);
        assert_eq!(delayed.deliver_after_unix_ms(), Some(12_000));
        assert!(MessageOptions::new()
            .delay(Duration::from_secs(1))
            .refuse_delay("publish")
            .is_err());
    }

    #[test]
    fn bad_headers_and_keys_are_typed_errors() {
        assert!(matches!(
            MessageOptions::new().header("weft-x", "v").check(),
            Err(OptionsError::Header(HeaderError::Reserved { .. }))
        ));
        assert!(matches!(
            MessageOptions::new().header("a b", "v").check(),
            Err(OptionsError::Header(HeaderError::Name { .. }))
        ));
        assert!(matches!(
            MessageOptions::new().idempotency_key("").check(),
            Err(OptionsError::Header(HeaderError::IdempotencyKey { len: 0 }))
        ));
        let many =
            (0..HEADERS_MAX).fold(MessageOptions::new(), |o, i| o.header(format!("h{i}"), ""));
        assert!(matches!(
            many.check(),
            Err(OptionsError::Header(HeaderError::TooMany { .. }))
        ));
    }

    #[test]
    fn a_batch_key_names_each_event_by_its_place() {
        let options = MessageOptions::new().idempotency_key("batch-9");
        let third = options.event_options(0, Some(2)).unwrap();
        assert_eq!(
            third.headers,
            vec![(
                IDEMPOTENCY_KEY_HEADER.to_owned(),
                Bytes::from_static(b"batch-9/2")
            )]
        );
        assert_eq!(MessageOptions::new().event_options(0, None), None);
    }
}
