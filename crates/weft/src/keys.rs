//! The node's window of idempotency keys (see [`weft_proto::idempotency`]): every path that
//! hands a message with a key to the application — a peer task for point-to-point messages and
//! work items, the event task for events, the request task for requests — asks it first, and
//! drops (settling it, so it is acknowledged) a message it calls a repeat. One lock, taken only
//! for messages that carry a key.
//!
//! With a spool, a key's first sighting is persisted: the record goes to the spool writer before
//! the caller hands the message on, so it is in the writer's queue ahead of the watermark that
//! will acknowledge the message, and one sync covers both. At start the window is restored from
//! those records. The writer retires the records as keys leave the window (see
//! `durable::Writer`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::{debug, warn};
use weft_proto::idempotency::{Sighting, Window};
use weft_proto::message::IDEMPOTENCY_KEY_RECEIVED_MAX;
use weft_proto::spooled::SpooledKey;
use weft_proto::Message;

use crate::durable::Command;
use crate::metrics::Metrics;

pub(crate) struct Keys {
    window: Mutex<Window>,
    /// The spool writer (`None`: no spool, the window is memory only).
    durable: Option<mpsc::UnboundedSender<Command>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

impl Keys {
    /// A window with the keys persisted before this start (in spool order).
    pub(crate) fn new(
        entries_max: usize,
        age_max_ms: u64,
        restored: Vec<SpooledKey>,
        now_ms: u64,
        durable: Option<mpsc::UnboundedSender<Command>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut window = Window::new(entries_max, age_max_ms);
        for key in restored {
            window.restore(key.id, key.key, key.at_unix_ms, now_ms);
        }
        Self {
            window: Mutex::new(window),
            durable,
            metrics,
        }
    }

    /// Whether `message` repeats an earlier message of its producer with the same key (then it
    /// is counted and logged, and the caller drops it). A message without a key never is.
    pub(crate) fn is_repeat(&self, message: &Message, now_ms: u64) -> bool {
        let Some(key) = message.header.idempotency_key() else {
            return false;
        };
        let id = message.header.id;
        if key.is_empty() || key.len() > IDEMPOTENCY_KEY_RECEIVED_MAX {
            warn!(
                producer = %id.producer.short(),
                message = %id,
                len = key.len(),
                "idempotency key of a length no producer of this version sends; not deduplicated"
            );
            return false;
        }
        let sighting = self
            .window
            .lock()
            .expect("idempotency window lock poisoned")
            .sight(id, key, now_ms);
        match sighting {
            Sighting::First => {
                if let Some(durable) = &self.durable {
                    let key = SpooledKey {
                        id,
                        key: key.clone(),
                        at_unix_ms: now_ms,
                    };
                    // A closed writer means the node is stopping: nothing is acknowledged after.
                    let _ = durable.send(Command::Key(key));
                }
                false
            }
            Sighting::Redelivered => false,
            Sighting::Again { first_unix_ms } => {
                self.metrics
                    .idempotent_repeats
                    .fetch_add(1, Ordering::Relaxed);
                debug!(
                    producer = %id.producer.short(),
                    message = %id,
                    key = ?key,
                    first_unix_ms,
                    "repeat of an idempotency key dropped"
                );
                true
            }
        }
    }
}
