//! Receipts: a future per sent message that resolves when the peer acknowledged it.
//!
//! Acknowledgements are cumulative per link, so a receipt is only a sequence number and a view of
//! the link's acknowledged watermark: no allocation per message, however many are in flight.

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use tokio::sync::watch;
use weft_proto::{MessageId, NodeId};

use crate::error::DeliveryError;

/// Proof that a peer delivered a message to its application's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The message.
    pub id: MessageId,
    /// The node that acknowledged it.
    pub peer: NodeId,
}

/// Resolves once the peer acknowledged the message (`.await` it), or fails if the node shut down
/// first. Dropping a receipt does not cancel the send.
#[derive(Debug)]
#[must_use = "a receipt tells whether the peer got the message; drop it explicitly if you do not care"]
pub struct Receipt {
    pub(crate) id: MessageId,
    pub(crate) peer: NodeId,
    pub(crate) acked: watch::Receiver<u64>,
}

impl Receipt {
    /// The message's id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Whether the peer has acknowledged it already.
    pub fn is_delivered(&self) -> bool {
        *self.acked.borrow() >= self.id.seq
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
            let waited = self.acked.wait_for(|acked| *acked >= seq).await.is_ok();
            if waited || *self.acked.borrow() >= seq {
                Ok(delivered)
            } else {
                Err(DeliveryError::NodeClosed)
            }
        })
    }
}
