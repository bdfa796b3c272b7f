//! Request/response (REQ/REP, and DEALER/ROUTER with `to`) and scatter-gather.
//!
//! Requests and replies are volatile: a request lost with a connection is a timeout for the
//! requester, who may ask again under the same request id ([`RequestBuilder::id`]); the server
//! remembers answered ids ([`weft_proto::envelope::ReplyCache`]) and answers a repeated one from
//! its cache instead of running the handler twice.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use weft_proto::envelope::{self, Begin, ReplyStatus};
use weft_proto::{
    Kind, Message, MessageId, NodeId, OutgoingMessage, Priority, StreamId, Topic, TopicError,
};

use super::{reply_status_error, Waiting, REPLY_CHANNEL, REQUEST_CHANNEL};
use crate::error::SendError;
use crate::inbox::Inbox;
use crate::node::Shared;

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Not a valid service name.
    #[error(transparent)]
    Service(#[from] TopicError),
    /// No connected node answers this service (or the chosen one stopped answering it).
    #[error("no node answers this service")]
    NoResponders,
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The server's handler dropped the request without answering.
    #[error("the server dropped the request without answering")]
    Dropped,
    /// The server's handler failed.
    #[error("the server failed: {0}")]
    Failed(String),
    /// The request could not be sent.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The node has its maximum of outstanding requests (`PatternConfig::requests_max`).
    #[error("too many outstanding requests ({0})")]
    TooMany(usize),
    /// A request with this id is outstanding already.
    #[error("request id {0} is outstanding already")]
    DuplicateId(u64),
    /// The node is shut down.
    #[error("the node is shut down")]
    NodeClosed,
    /// The server handled a request with this idempotency key before and no longer keeps its
    /// reply (see [`RequestBuilder::options`]); its handler was not run again.
    #[error("the server handled this idempotency key before and no longer keeps the reply")]
    Repeated,
    /// The reply's body is not of the type asked for ([`RequestBuilder::reply_as`]); the reply
    /// is handed back with the error.
    #[error(transparent)]
    Reply(Box<crate::body::Undecodable>),
}

/// A reply, or an error status, as it reaches the waiting requester.
pub(crate) struct Answer {
    pub(crate) status: ReplyStatus,
    /// Channel: the service; body: the payload; producer: the server.
    pub(crate) message: Message,
}

/// Removes a waiting request when its requester stops waiting (answer, timeout, cancel).
struct WaitingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.shared.patterns.lock().waiting.remove(&self.id);
    }
}

fn register(shared: &Shared, id: u64, waiting: Waiting) -> Result<WaitingGuard<'_>, RequestError> {
    let mut state = shared.patterns.lock();
    if state.closed {
        return Err(RequestError::NodeClosed);
    }
    let max = shared.config.patterns.requests_max;
    if state.waiting.len() >= max {
        return Err(RequestError::TooMany(max));
    }
    if state.waiting.contains_key(&id) {
        return Err(RequestError::DuplicateId(id));
    }
    state.waiting.insert(id, waiting);
    Ok(WaitingGuard { shared, id })
}

/// A request or scatter, checked: its service, body, timeout and options.
struct Asked {
    service: Topic,
    payload: Bytes,
    timeout: Duration,
    options: Option<crate::MessageOptions>,
}

/// Checks what a request or scatter asks: the service name, the body, the options (the header
/// rules, and no due time).
fn checked(
    shared: &Shared,
    service: String,
    payload: Result<Bytes, String>,
    timeout: Option<Duration>,
    options: Option<crate::MessageOptions>,
) -> Result<Asked, RequestError> {
    let payload = payload.map_err(RequestError::Failed)?;
    let service = Topic::new(service)?;
    let timeout = timeout.unwrap_or(shared.config.patterns.request_timeout);
    if let Some(options) = &options {
        options.check().map_err(SendError::from)?;
        options.refuse_delay("requests").map_err(SendError::from)?;
    }
    Ok(Asked {
        service,
        payload,
        timeout,
        options,
    })
}

impl Asked {
    /// The wire message of request `id`, checked against the frame limits.
    fn outgoing(
        &self,
        shared: &Shared,
        id: u64,
        priority: Priority,
    ) -> Result<OutgoingMessage, RequestError> {
        let now = shared.now_unix_ms();
        let mut outgoing = OutgoingMessage::command(
            weft_proto::Channel::from_static(REQUEST_CHANNEL),
            envelope::wrap(&self.service, &self.payload),
            now,
        )
        .with_kind(Kind::Request)
        .with_priority(priority)
        .with_correlation_id(id)
        .with_reply_to(shared.id)
        .with_expiry(now + self.timeout.as_millis() as u64);
        if let Some(options) = &self.options {
            outgoing = options.apply(outgoing, now);
        }
        outgoing
            .check(&shared.config.limits())
            .map_err(SendError::from)?;
        Ok(outgoing)
    }
}

/// The request as the local server would have received it from the wire.
fn as_received(shared: &Shared, outgoing: OutgoingMessage) -> Message {
    Message {
        header: weft_proto::Header {
            id: MessageId {
                producer: shared.id,
                stream: StreamId::direct(&shared.id, &shared.id, shared.epoch),
                seq: 0,
            },
            kind: outgoing.kind,
            channel: outgoing.channel,
            priority: outgoing.priority,
            created_unix_ms: outgoing.created_unix_ms,
            attempt: 1,
            options: outgoing.options,
        },
        body: outgoing.body,
    }
}

/// Sends a request to `target` (possibly this node). Errors are about sending, not answering.
async fn dispatch(
    shared: &Arc<Shared>,
    target: NodeId,
    outgoing: OutgoingMessage,
) -> Result<(), RequestError> {
    if target == shared.id {
        handle_request(shared, as_received(shared, outgoing)).await;
        return Ok(());
    }
    shared.sender(target)?.send_volatile(outgoing).await?;
    Ok(())
}

/// The nodes that answer `service`: connected peers, and this node if it does.
fn servers(shared: &Shared, service: &Topic) -> Vec<NodeId> {
    let state = shared.patterns.lock();
    let mut servers = state.table.servers(service);
    if state.services.contains_key(service.as_str()) {
        servers.push(shared.id);
    }
    servers
}

/// A request being built: `.timeout()`, `.to()`, `.id()`, then `.await` it.
#[must_use = "a request does nothing until awaited"]
pub struct RequestBuilder {
    pub(crate) shared: Arc<Shared>,
    pub(crate) service: String,
    pub(crate) payload: Result<Bytes, String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) to: Option<NodeId>,
    pub(crate) id: Option<u64>,
    pub(crate) priority: Priority,
    pub(crate) options: Option<crate::MessageOptions>,
}

impl std::fmt::Debug for RequestBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBuilder")
            .field("service", &self.service)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl RequestBuilder {
    /// How long to wait for the reply (default `PatternConfig::request_timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Asks this node (DEALER/ROUTER style) instead of any server of the service.
    pub fn to(mut self, node: NodeId) -> Self {
        self.to = Some(node);
        self
    }

    /// The request's priority (default [`Priority::NORMAL`]): it and its reply travel in that
    /// priority's lane (see [`weft_proto::Lane`]), so a high-priority request does not wait
    /// behind bulk traffic between the two nodes.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Headers, priority, expiry and an idempotency key for the request (see
    /// [`MessageOptions`](crate::MessageOptions); the server sees them on
    /// [`Request::message`]). A priority set here wins over [`RequestBuilder::priority`]; an
    /// expiry earlier than the timeout ends the server's interest sooner. With an idempotency
    /// key, the server answers a repeat of the key (a new request from a requester that
    /// restarted) with the reply it gave, while it keeps it (`reply_cache_age`); after that,
    /// with [`RequestError::Repeated`]. A due time is refused ([`crate::OptionsError`]).
    pub fn options(mut self, options: crate::MessageOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// The request id (default: random). Asking again under the same id after a timeout gets
    /// the server's cached reply if it answered already, without running its handler again.
    pub fn id(mut self, id: u64) -> Self {
        self.id = Some(id);
        self
    }

    /// Sends the request and waits for the reply: its `body` is the answer, `header.id.producer`
    /// the server.
    pub async fn send(self) -> Result<Message, RequestError> {
        let RequestBuilder {
            shared,
            service,
            payload,
            timeout,
            to,
            id,
            priority,
            options,
        } = self;
        let asked = checked(&shared, service, payload, timeout, options)?;
        let (service, timeout) = (&asked.service, asked.timeout);
        let target = match to {
            Some(node) => node,
            None => {
                let servers = servers(&shared, service);
                if servers.is_empty() {
                    return Err(RequestError::NoResponders);
                }
                let mut state = shared.patterns.lock();
                state.next_server = state.next_server.wrapping_add(1);
                servers[state.next_server % servers.len()]
            }
        };
        let id = id.unwrap_or_else(|| shared.random());
        let outgoing = asked.outgoing(&shared, id, priority)?;
        let (tx, rx) = oneshot::channel();
        let _guard = register(&shared, id, Waiting::One(tx))?;
        match dispatch(&shared, target, outgoing).await {
            Err(RequestError::Send(SendError::NotConnected(_))) if to.is_none() => {
                return Err(RequestError::NoResponders)
            }
            other => other?,
        }
        let answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(RequestError::NodeClosed),
            Err(_) => return Err(RequestError::Timeout(timeout)),
        };
        match reply_status_error(answer.status, &answer.message.body) {
            None => Ok(answer.message),
            Some(error) => Err(error),
        }
    }
}

impl RequestBuilder {
    /// Sends the request and decodes the reply (postcard) as a `T`: typed end to end with
    /// [`Node::request_typed`](crate::Node::request_typed) and [`Request::reply_typed`]. A reply
    /// of another type is [`RequestError::Reply`], with the reply.
    pub async fn reply_as<T: serde::de::DeserializeOwned>(
        self,
    ) -> Result<crate::body::Typed<T>, RequestError> {
        let reply = self.send().await?;
        crate::body::typed(reply).map_err(|e| RequestError::Reply(Box::new(e)))
    }
}

impl IntoFuture for RequestBuilder {
    type Output = Result<Message, RequestError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// What a scatter-gather collected.
#[derive(Debug)]
pub struct Gathered {
    /// The nodes asked.
    pub asked: Vec<NodeId>,
    /// Replies, in arrival order (`header.id.producer` is the server).
    pub replies: Vec<Message>,
    /// Servers that answered with an error, or could not be asked.
    pub failures: Vec<(NodeId, RequestError)>,
}

impl Gathered {
    /// Nodes asked that neither replied nor failed before the gathering stopped.
    pub fn missing(&self) -> Vec<NodeId> {
        self.asked
            .iter()
            .filter(|n| {
                !self.replies.iter().any(|r| r.header.id.producer == **n)
                    && !self.failures.iter().any(|(f, _)| f == *n)
            })
            .copied()
            .collect()
    }
}

/// A scatter-gather being built: `.count()`, `.timeout()`, then `.await` it.
#[must_use = "a scatter does nothing until awaited"]
pub struct ScatterBuilder {
    pub(crate) shared: Arc<Shared>,
    pub(crate) service: String,
    pub(crate) payload: Result<Bytes, String>,
    pub(crate) count: Option<usize>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) options: Option<crate::MessageOptions>,
}

impl std::fmt::Debug for ScatterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScatterBuilder")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl ScatterBuilder {
    /// Stop after this many replies (default: every node asked).
    pub fn count(mut self, count: usize) -> Self {
        self.count = Some(count);
        self
    }

    /// Stop at this deadline (default `PatternConfig::request_timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Headers, priority, expiry and an idempotency key for every copy of the request (see
    /// [`RequestBuilder::options`]).
    pub fn options(mut self, options: crate::MessageOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// Asks every node that answers the service and collects replies until the count, the
    /// deadline, or every node answered.
    pub async fn gather(self) -> Result<Gathered, RequestError> {
        let ScatterBuilder {
            shared,
            service,
            payload,
            count,
            timeout,
            options,
        } = self;
        let request = checked(&shared, service, payload, timeout, options)?;
        let timeout = request.timeout;
        let asked = servers(&shared, &request.service);
        if asked.is_empty() {
            return Err(RequestError::NoResponders);
        }
        let id = shared.random();
        let outgoing = request.outgoing(&shared, id, Priority::NORMAL)?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _guard = register(&shared, id, Waiting::Many(tx))?;
        let mut gathered = Gathered {
            asked: asked.clone(),
            replies: Vec::new(),
            failures: Vec::new(),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        for target in asked {
            if let Err(error) = dispatch(&shared, target, outgoing.clone()).await {
                gathered.failures.push((target, error));
            }
        }
        let wanted = count.unwrap_or(usize::MAX);
        while gathered.replies.len() < wanted
            && gathered.replies.len() + gathered.failures.len() < gathered.asked.len()
        {
            let answer = tokio::select! {
                answer = rx.recv() => match answer {
                    Some(answer) => answer,
                    None => return Err(RequestError::NodeClosed),
                },
                _ = tokio::time::sleep_until(deadline) => break,
            };
            let from = answer.message.header.id.producer;
            if !gathered.asked.contains(&from)
                || gathered
                    .replies
                    .iter()
                    .any(|r| r.header.id.producer == from)
            {
                continue; // not asked, or a repeat
            }
            match reply_status_error(answer.status, &answer.message.body) {
                None => gathered.replies.push(answer.message),
                Some(error) => gathered.failures.push((from, error)),
            }
        }
        Ok(gathered)
    }
}

impl IntoFuture for ScatterBuilder {
    type Output = Result<Gathered, RequestError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.gather())
    }
}

/// A request for a service this node answers. Answer it with [`Request::reply`] (or
/// [`Request::fail`]); dropping it unanswered tells the requester ([`RequestError::Dropped`]).
pub struct Request {
    shared: Arc<Shared>,
    /// Channel: the service; body: the payload.
    message: Message,
    requester: NodeId,
    id: u64,
    /// Where the reply cache keeps its reply: (requester, id), or (requester, a digest of the
    /// idempotency key).
    cache_key: (NodeId, u64),
    answered: bool,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("service", &self.message.header.channel)
            .field("requester", &self.requester)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Request {
    /// The request: `header.channel` is the service, `body` the payload.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The payload.
    pub fn body(&self) -> &Bytes {
        &self.message.body
    }

    /// Decodes the payload (postcard).
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::error::BodyError> {
        crate::body::decode(&self.message.body)
    }

    /// Who asked.
    pub fn requester(&self) -> NodeId {
        self.requester
    }

    /// The request id (the same across the requester's retries).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Answers the request.
    pub async fn reply(mut self, body: impl Into<Bytes>) -> Result<(), SendError> {
        self.answered = true;
        let body = envelope::reply(ReplyStatus::Ok, &body.into());
        self.finish(body).await
    }

    /// Answers with a serde value (postcard).
    pub async fn reply_typed<T: Serialize + ?Sized>(
        self,
        value: &T,
    ) -> Result<(), crate::error::SendTypedError> {
        let body = crate::body::encode(value)?;
        Ok(self.reply(body).await?)
    }

    /// Answers with a failure: the requester gets [`RequestError::Failed`] with `reason`.
    pub async fn fail(mut self, reason: &str) -> Result<(), SendError> {
        self.answered = true;
        let body = envelope::reply(ReplyStatus::Failed, reason.as_bytes());
        self.finish(body).await
    }

    async fn finish(&self, body: Bytes) -> Result<(), SendError> {
        self.shared
            .patterns
            .lock()
            .replies
            .finish(self.cache_key, body.clone());
        send_reply(
            &self.shared,
            (self.requester, self.id),
            &self.message.header.channel,
            self.message.header.priority,
            body,
        )
        .await
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.shared.patterns.lock().replies.forget(&self.cache_key);
        let body = envelope::reply(ReplyStatus::Dropped, &[]);
        if self.requester == self.shared.id {
            let priority = self.message.header.priority;
            complete(&self.shared, (self.id, priority), self.shared.id, body);
            return;
        }
        let message = reply_outgoing(&self.shared, self.id, self.message.header.priority, body);
        if let Ok(sender) = self.shared.sender(self.requester) {
            let _ = sender.try_send_volatile(message);
        }
    }
}

/// The requests for one service this node answers. Dropping it stops answering.
pub struct Service {
    pub(crate) shared: Arc<Shared>,
    pub(crate) name: Topic,
    pub(crate) rx: mpsc::Receiver<Request>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// The service name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The next request; `None` once the node shut down.
    pub async fn recv(&mut self) -> Option<Request> {
        self.rx.recv().await
    }
}

impl Stream for Service {
    type Item = Request;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let patterns = &self.shared.patterns;
        let changed = {
            let mut state = patterns.lock();
            state.services.remove(self.name.as_str());
            state.table.unserve(&self.name)
        };
        if changed {
            let _ = patterns.announce.send(());
        }
    }
}

pub(crate) async fn serve(
    shared: &Arc<Shared>,
    name: &str,
) -> Result<Service, super::SubscribeError> {
    use super::SubscribeError;
    if shared.is_shutting_down() {
        return Err(SubscribeError::NodeClosed);
    }
    let name = Topic::new(name)?;
    let (tx, rx) = mpsc::channel(shared.config.patterns.service_capacity);
    let version = {
        let mut state = shared.patterns.lock();
        if state.closed {
            return Err(SubscribeError::NodeClosed);
        }
        if state.services.contains_key(name.as_str()) {
            return Err(SubscribeError::AlreadyServed(name.as_str().to_owned()));
        }
        let version = state
            .table
            .serve(&name)
            .map_err(|e| SubscribeError::TooMany(e.to_string()))?;
        state.services.insert(name.as_str().to_owned(), tx);
        version
    };
    let service = Service {
        shared: Arc::clone(shared),
        name,
        rx,
    };
    match shared.patterns.announce_and_confirm(shared, version).await {
        Ok(()) => Ok(service),
        Err(waiting) => Err(SubscribeError::NotConfirmed(waiting)),
    }
}

/// A reply travels in its request's lane (the request's priority).
fn reply_outgoing(shared: &Shared, id: u64, priority: Priority, body: Bytes) -> OutgoingMessage {
    OutgoingMessage::command(
        weft_proto::Channel::from_static(REPLY_CHANNEL),
        body,
        shared.now_unix_ms(),
    )
    .with_kind(Kind::Reply)
    .with_correlation_id(id)
    .with_priority(priority)
}

/// Sends a reply body to the requester of request `id` (or completes a local request).
async fn send_reply(
    shared: &Arc<Shared>,
    (requester, id): (NodeId, u64),
    service: &str,
    priority: Priority,
    body: Bytes,
) -> Result<(), SendError> {
    if requester == shared.id {
        complete(shared, (id, priority), shared.id, body);
        return Ok(());
    }
    let result = match shared.sender(requester) {
        Ok(sender) => {
            sender
                .send_volatile(reply_outgoing(shared, id, priority, body))
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        debug!(service, requester = %requester.short(), error = %e, "reply not sent");
    }
    result
}

/// Hands the reply to request `id` to its waiter, if it still waits (`priority`: the lane it
/// came in, which the answer's header says).
fn complete(shared: &Shared, (id, priority): (u64, Priority), from: NodeId, body: Bytes) {
    let (status, payload) = match envelope::unwrap_reply(&body) {
        Ok(reply) => reply,
        Err(e) => {
            shared.metrics.protocol_error();
            warn!(from = %from.short(), error = %e, "malformed reply dropped");
            return;
        }
    };
    let mut state = shared.patterns.lock();
    let Some(waiting) = state.waiting.get(&id) else {
        return; // timed out, or an answer to someone else's retry
    };
    let message = Message {
        header: weft_proto::Header {
            id: MessageId {
                producer: from,
                stream: StreamId(0),
                seq: 0,
            },
            kind: Kind::Reply,
            channel: Default::default(),
            priority,
            created_unix_ms: shared.now_unix_ms(),
            attempt: 1,
            options: None,
        },
        body: payload,
    };
    let answer = Answer { status, message };
    match waiting {
        Waiting::Many(tx) => {
            let _ = tx.send(answer);
        }
        Waiting::One(_) => {
            if let Some(Waiting::One(tx)) = state.waiting.remove(&id) {
                let _ = tx.send(answer);
            }
        }
    }
}

/// A request arrived (from a peer, or from this node itself).
pub(crate) async fn handle_request(shared: &Arc<Shared>, message: Message) {
    let from = message.header.id.producer;
    let requester = message.header.reply_to().unwrap_or(from);
    let priority = message.header.priority;
    let Some(id) = message.header.correlation_id() else {
        shared.metrics.protocol_error();
        warn!(from = %from.short(), "request without a request id dropped");
        return;
    };
    let (service, payload) = match envelope::unwrap(&message.body) {
        Ok(unwrapped) => unwrapped,
        Err(e) => {
            shared.metrics.protocol_error();
            warn!(from = %from.short(), error = %e, "malformed request dropped");
            return;
        }
    };
    let now = shared.now_unix_ms();
    if message.header.expires_unix_ms().is_some_and(|at| at < now) {
        debug!(%service, "request arrived after its requester stopped waiting; dropped");
        return;
    }
    // A request with an idempotency key is cached under the key (so a new request repeating
    // it gets the first one's reply) and judged by the node's window of keys beyond the cache.
    let key = message.header.idempotency_key().map(|key| {
        let digest = blake3::hash(key);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        u64::from_le_bytes(first)
    });
    let repeat = key.is_some() && shared.keys.is_repeat(&message, now);
    let cache_key = (requester, key.unwrap_or(id));
    let (queue, begin) = {
        let mut state = shared.patterns.lock();
        match state.services.get(service.as_str()).cloned() {
            Some(queue) => {
                let begin = state.replies.begin(cache_key, now);
                if repeat && begin == Begin::Run {
                    // Handled before, and the reply is gone: not run again.
                    state.replies.forget(&cache_key);
                    let body = envelope::reply(ReplyStatus::Repeated, &[]);
                    (Some(queue), Begin::Replay(body))
                } else {
                    (Some(queue), begin)
                }
            }
            None => (None, Begin::Running),
        }
    };
    let Some(queue) = queue else {
        let body = envelope::reply(ReplyStatus::NoService, &[]);
        let _ = send_reply(shared, (requester, id), service.as_str(), priority, body).await;
        return;
    };
    match begin {
        Begin::Run => {
            let mut request_message = message;
            request_message.header.channel = service.as_str().into();
            request_message.body = payload;
            let request = Request {
                shared: Arc::clone(shared),
                message: request_message,
                requester,
                id,
                cache_key,
                answered: false,
            };
            // A full service queue makes requests wait here (the requesters' timeouts bound it).
            if let Err(mpsc::error::SendError(mut request)) = queue.send(request).await {
                // The service was dropped meanwhile: nobody answers here any more.
                request.answered = true;
                shared.patterns.lock().replies.forget(&cache_key);
                let body = envelope::reply(ReplyStatus::NoService, &[]);
                let _ = send_reply(shared, (requester, id), service.as_str(), priority, body).await;
            }
        }
        Begin::Running => {}
        Begin::Replay(body) => {
            debug!(%service, id, "repeated request answered from the reply cache");
            let _ = send_reply(shared, (requester, id), service.as_str(), priority, body).await;
        }
    }
}

/// Requests from peers.
pub(crate) async fn request_task(shared: Arc<Shared>, mut requests: Inbox) {
    // Made once, not per request (see `event_task`).
    let stopping = super::Patterns::stopping(&shared);
    tokio::pin!(stopping);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut stopping => break,
            message = requests.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        tokio::select! {
            biased;
            () = &mut stopping => break,
            _ = handle_request(&shared, message) => {}
        }
    }
}

/// Replies from peers.
pub(crate) async fn reply_task(shared: Arc<Shared>, mut replies: Inbox) {
    // Made once, not per reply (see `event_task`).
    let stopping = super::Patterns::stopping(&shared);
    tokio::pin!(stopping);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut stopping => break,
            message = replies.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let from = message.header.id.producer;
        let Some(id) = message.header.correlation_id() else {
            shared.metrics.protocol_error();
            warn!(from = %from.short(), "reply without a request id dropped");
            continue;
        };
        complete(&shared, (id, message.header.priority), from, message.body);
    }
}
