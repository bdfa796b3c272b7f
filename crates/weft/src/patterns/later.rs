//! Pattern operations with a due time: a publish or a push given `MessageOptions::delay` (or
//! `deliver_at`) is accepted now and carried out at its due time. It waits as a delayed message
//! addressed to this node itself, on the channel `$weft/later/pub/TOPIC` or
//! `$weft/later/push/QUEUE`, in the node's schedule — with a spool, written there first
//! (unnumbered, with its due time) exactly like a delayed point-to-point send, so it survives a
//! restart. At its due time the release task hands it here instead of to a peer's stream: the
//! publish or push runs then (subscribers and workers are chosen then), and only once it was
//! accepted (durable in the links) is the record retired.
//!
//! A crash between the acceptance and the retirement runs it again at the next start. So that a
//! second run is not processed twice, a delayed operation without an idempotency key of the
//! application's gets one of its own, named after its spool record (`weft-later/TAG`): the
//! receivers drop the repeat (see [`crate::keys`]).

use std::sync::Arc;

use bytes::Bytes;
use tracing::{debug, warn};
use weft_proto::message::IDEMPOTENCY_KEY_HEADER;
use weft_proto::{OutgoingMessage, Topic};

use crate::error::SendError;
use crate::node::Shared;
use crate::options::MessageOptions;
use crate::scheduler::Waiting;

/// Channel prefix of a delayed publish (the topic follows).
const PUBLISH: &str = "$weft/later/pub/";
/// Channel prefix of a delayed push (the queue follows; a shard key is in the options).
const PUSH: &str = "$weft/later/push/";

/// What a delayed operation does at its due time.
pub(crate) enum Later<'a> {
    Publish {
        topic: &'a Topic,
    },
    Push {
        queue: &'a Topic,
        key: Option<Bytes>,
    },
}

/// Accepts `body` for `op` at the due time `options` sets (with a spool: durable when this
/// returns). Returns the due time.
pub(crate) async fn schedule(
    shared: &Arc<Shared>,
    op: Later<'_>,
    body: Bytes,
    options: &MessageOptions,
) -> Result<u64, SendError> {
    let now = shared.now_unix_ms();
    let (channel, key) = match op {
        Later::Publish { topic } => (format!("{PUBLISH}{topic}"), None),
        Later::Push { queue, key } => (format!("{PUSH}{queue}"), key),
    };
    let mut message = options.apply(OutgoingMessage::command(channel, body, now), now);
    if let Some(key) = key {
        message = message.with_shard_key(key);
    }
    message.check(&shared.config.limits())?;
    shared.schedule_local(message).await
}

/// Whether a delayed message is one of this module's (addressed to this node itself).
pub(crate) fn is_local(shared: &Shared, waiting: &Waiting) -> bool {
    waiting.dest == shared.id
}

/// Carries out a delayed operation that became due, in a task of its own (a push may wait for
/// a worker; the release task goes on meanwhile).
pub(crate) fn release(shared: &Arc<Shared>, waiting: Waiting) {
    let task = run(Arc::clone(shared), waiting);
    shared.spawn(task);
}

async fn run(shared: Arc<Shared>, waiting: Waiting) {
    let Waiting {
        message, ticket, ..
    } = waiting;
    let tag = ticket.tag;
    let mut options = MessageOptions::from_message(&message);
    if message
        .options
        .as_ref()
        .is_none_or(|o| o.headers.iter().all(|(k, _)| k != IDEMPOTENCY_KEY_HEADER))
        && tag != 0
    {
        options = options.idempotency_key(format!("weft-later/{tag}"));
    }
    let channel = message.channel.as_str();
    let outcome = if let Some(topic) = channel.strip_prefix(PUBLISH) {
        let event_options = options.event_options(shared.now_unix_ms(), None);
        super::pubsub::publish(&shared, topic, message.body.clone(), event_options.as_ref())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else if let Some(queue) = channel.strip_prefix(PUSH) {
        let key = message.options.as_ref().and_then(|o| o.shard_key.clone());
        super::work::push(&shared, queue, key, message.body.clone(), Some(&options))
            .await
            .map_err(|e| e.to_string())
    } else {
        Err(format!("unknown delayed operation {channel:?}"))
    };
    shared.scheduler.free_place(ticket.holds_place);
    match outcome {
        Ok(()) => {
            shared.metrics.released();
            debug!(channel, tag, "delayed operation carried out");
            if let (Some(durable), true) = (&shared.durable, tag != 0) {
                let _ = durable.tx.send(crate::durable::Command::Retire(vec![tag]));
            }
        }
        Err(_) if shared.is_shutting_down() => {
            // Its record stays: the next start carries it out.
        }
        Err(error) => {
            warn!(channel, tag, %error, "a delayed operation failed: to the dead letters");
            if let (Some(durable), true) = (&shared.durable, tag != 0) {
                let id = weft_proto::MessageId {
                    producer: shared.id,
                    stream: weft_proto::StreamId(0),
                    seq: 0,
                };
                let _ = durable.tx.send(crate::durable::Command::DeadLetter {
                    peer: shared.id,
                    id,
                    tag,
                    reason: format!("delayed operation failed: {error}"),
                });
            }
        }
    }
}
