//! Receipts: a future per sent message that resolves when the peer acknowledged it.
//!
//! Acknowledgements are cumulative per link, so a receipt is only a sequence number and views of
//! per-peer watermarks: no allocation per message, however many are in flight. The rare message
//! that fails — refused by the spool, or given up and dead-lettered — is recorded in the peer's
//! [`Fates`], which a receipt consults before believing the watermark (an acknowledgement can
//! cover a sequence number the peer was told to skip).

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Mutex;

use tokio::sync::watch;
use tracing::warn;
use weft_proto::{MessageId, NodeId};

use crate::error::DeliveryError;

/// Most failures remembered per peer for receipts not yet awaited; beyond it the oldest go (a
/// receipt for one of those then reports only what the watermark says).
const FATES_MAX: usize = 65_536;

/// Messages to one peer that will never be delivered, by sequence number, and a version that
/// moves with every change (receipts wait on it).
#[derive(Debug)]
pub(crate) struct Fates {
    failed: Mutex<BTreeMap<u64, DeliveryError>>,
    version: watch::Sender<u64>,
}

impl Default for Fates {
    fn default() -> Self {
        Self {
            failed: Mutex::new(BTreeMap::new()),
            version: watch::channel(0).0,
        }
    }
}

impl Fates {
    pub(crate) fn fail(&self, seq: u64, error: DeliveryError) {
        let mut failed = self.failed.lock().expect("fates lock poisoned");
        if failed.len() >= FATES_MAX {
            if let Some((oldest, _)) = failed.pop_first() {
                warn!(
                    seq = oldest,
                    "forgetting an old failure nobody asked about (receipt no longer exact)"
                );
            }
        }
        failed.insert(seq, error);
        drop(failed);
        self.version.send_modify(|v| *v += 1);
    }

    fn get(&self, seq: u64) -> Option<DeliveryError> {
        self.failed
            .lock()
            .expect("fates lock poisoned")
            .get(&seq)
            .cloned()
    }
}

/// Proof that a peer's application took a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The message.
    pub id: MessageId,
    /// The node that acknowledged it.
    pub peer: NodeId,
}

/// Resolves once the peer acknowledged the message (`.await` it), or fails if the message was
/// given up (dead-lettered), refused by the spool, or the node shut down first. Dropping a receipt
/// does not cancel the send.
#[derive(Debug)]
#[must_use = "a receipt tells whether the peer got the message; drop it explicitly if you do not care"]
pub struct Receipt {
    pub(crate) id: MessageId,
    pub(crate) peer: NodeId,
    pub(crate) acked: watch::Receiver<u64>,
    /// The spool's accepted watermark (`None`: the node has no spool).
    pub(crate) accepted: Option<watch::Receiver<u64>>,
    pub(crate) fates: std::sync::Arc<Fates>,
}

impl Receipt {
    /// The message's id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The node the message was sent to.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Whether the peer has acknowledged it already.
    pub fn is_delivered(&self) -> bool {
        *self.acked.borrow() >= self.id.seq && self.fates.get(self.id.seq).is_none()
    }

    /// Waits until the message is durable in the spool ("accepted"): at once for a node without
    /// a spool, and for receipts of `send` (which returns only then); `try_send` returns before.
    pub async fn accepted(&self) -> Result<(), DeliveryError> {
        let Some(accepted) = &self.accepted else {
            return Ok(());
        };
        let seq = self.id.seq;
        let mut accepted = accepted.clone();
        let waited = accepted.wait_for(|a| *a >= seq).await.is_ok();
        match self.fates.get(seq) {
            Some(error) => Err(error),
            None if waited => Ok(()),
            None => Err(DeliveryError::NodeClosed),
        }
    }
}

impl IntoFuture for Receipt {
    type Output = Result<Delivered, DeliveryError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move {
            let seq = self.id.seq;
            let delivered = Delivered {
                id: self.id,
                peer: self.peer,
            };
            let mut version = self.fates.version.subscribe();
            loop {
                if let Some(error) = self.fates.get(seq) {
                    return Err(error);
                }
                if *self.acked.borrow_and_update() >= seq {
                    return Ok(delivered);
                }
                tokio::select! {
                    changed = self.acked.changed() => {
                        if changed.is_err() {
                            let acked = *self.acked.borrow() >= seq;
                            return match self.fates.get(seq) {
                                Some(error) => Err(error),
                                None if acked => Ok(delivered),
                                None => Err(DeliveryError::NodeClosed),
                            };
                        }
                    }
                    _ = version.changed() => {}
                }
            }
        })
    }
}
