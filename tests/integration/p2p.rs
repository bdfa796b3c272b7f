//! Point-to-point messaging between two real nodes.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::support::{addr, node, within};

/// Two nodes exchange 100,000 messages: every one acknowledged, delivered in order, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_acknowledged_in_order_without_duplicates() {
    const COUNT: u64 = 100_000;
    let a = node("test").await;
    let b = node("test").await;
    a.add_peer(addr(&b)).unwrap();
    let mut inbox = b.receive("numbers").unwrap();

    let receiver = tokio::spawn(async move {
        let mut next = 0u64;
        while next < COUNT {
            let message = inbox.recv().await.expect("inbox open");
            let n = u64::from_le_bytes(message.body[..8].try_into().unwrap());
            assert_eq!(n, next, "in order, no gaps, no duplicates");
            next += 1;
        }
        // Nothing more may arrive: a duplicate would show up here.
        inbox
    });

    let sender = a.sender(b.id()).unwrap();
    let mut receipts = VecDeque::new();
    let mut acked = 0u64;
    for n in 0..COUNT {
        let receipt = sender
            .send("numbers", Bytes::copy_from_slice(&n.to_le_bytes()))
            .await
            .unwrap();
        receipts.push_back(receipt);
        // Keep a window of receipts in flight instead of one round trip per message.
        if receipts.len() > 4_096 {
            let delivered = within("receipt", receipts.pop_front().unwrap())
                .await
                .unwrap();
            assert_eq!(delivered.id.seq, acked + 1);
            acked += 1;
        }
    }
    while let Some(receipt) = receipts.pop_front() {
        let delivered = within("receipt", receipt).await.unwrap();
        assert_eq!(delivered.id.seq, acked + 1);
        acked += 1;
    }
    assert_eq!(acked, COUNT);
    let mut inbox = within("receiver", receiver).await.unwrap();
    assert!(
        inbox.try_recv().is_none(),
        "no message beyond the {COUNT} sent"
    );
    let metrics = b.metrics();
    assert_eq!(metrics.received, COUNT);
    assert_eq!(metrics.duplicates, 0);
    a.shutdown().await;
    b.shutdown().await;
}
