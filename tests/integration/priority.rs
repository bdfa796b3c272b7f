//! Priorities: each lane (high, normal, bulk) is its own ordered stream on its own QUIC stream.

use std::collections::HashMap;

use weft::{Lane, Node, Priority};

use crate::support::{addr, node, node_with, within};

/// `count` numbered messages of `size` bytes to `to` on `channel`, each with `priority`; the
/// first 8 bytes are the number. Returns the receipts.
async fn send_numbered(
    from: &Node,
    to: &Node,
    channel: &str,
    priority: Priority,
    count: u64,
    size: usize,
) -> Vec<weft::Receipt> {
    let sender = from.sender(to.id()).unwrap();
    let mut receipts = Vec::new();
    for n in 0..count {
        let mut body = vec![0u8; size.max(8)];
        body[..8].copy_from_slice(&n.to_le_bytes());
        let message = sender.new_message(channel, body).with_priority(priority);
        receipts.push(sender.send_message(message).await.unwrap());
    }
    receipts
}

fn number(message: &weft::Message) -> u64 {
    u64::from_le_bytes(message.body[..8].try_into().unwrap())
}

/// A high-priority message sent behind tens of megabytes of queued bulk messages arrives long
/// before the bulk is through: it travels in its own stream, which QUIC serves first. Every
/// message arrives once, FIFO per lane, and the receipts name each lane's own stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_message_overtakes_a_bulk_backlog() {
    const BULK: u64 = 1_500;
    let a = node("lanes").await;
    let b = node("lanes").await;
    a.add_peer(addr(&b)).unwrap();
    within("connected", a.connected(b.id())).await.unwrap();
    let mut inbox = b.receive("mixed").unwrap();
    // 1 500 × 32 KiB = 47 MiB: all of it queued at once, far more than one window.
    let bulk = send_numbered(&a, &b, "mixed", Priority::LOW, BULK, 32 * 1024).await;
    let high = send_numbered(&a, &b, "mixed", Priority::HIGH, 3, 8).await;
    let normal = send_numbered(&a, &b, "mixed", Priority::NORMAL, 3, 8).await;
    let streams: Vec<_> = [&bulk[0], &high[0], &normal[0]]
        .iter()
        .map(|r| r.id().stream)
        .collect();
    assert!(
        streams[0] != streams[1] && streams[1] != streams[2] && streams[0] != streams[2],
        "one stream per lane: {streams:?}"
    );
    let mut next: HashMap<Lane, u64> = HashMap::new();
    let mut high_positions = Vec::new();
    for position in 0..BULK + 6 {
        let message = within("delivery", inbox.recv()).await.unwrap();
        let lane = message.header.priority.lane();
        let expected = next.entry(lane).or_default();
        assert_eq!(number(&message), *expected, "FIFO within the {lane} lane");
        *expected += 1;
        if lane == Lane::High {
            high_positions.push(position);
        }
    }
    inbox.settle();
    assert_eq!(next[&Lane::Bulk], BULK);
    assert_eq!(next[&Lane::High], 3);
    assert_eq!(next[&Lane::Normal], 3);
    assert!(inbox.try_recv().is_none(), "nothing twice");
    assert!(
        high_positions[2] < BULK / 2,
        "the high lane goes ahead of queued bulk: high arrived at {high_positions:?} of {}",
        BULK + 6
    );
    for receipt in high.into_iter().chain(normal).chain(bulk) {
        within("ack", receipt).await.unwrap();
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A receiver whose application does not take its bulk messages still takes high-priority
/// ones: a full bulk inbox stops the bulk lane's stream only (in one stream, the parked bulk
/// message would hold back everything behind it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_stuck_on_bulk_still_takes_high_priority_messages() {
    const BULK: u64 = 3_000;
    let a = node("lanes").await;
    let b = node_with("lanes", |c| c.inbox_capacity = 64).await;
    a.add_peer(addr(&b)).unwrap();
    within("connected", a.connected(b.id())).await.unwrap();
    let mut bulk_inbox = b.receive("bulk").unwrap();
    let mut urgent = b.receive("urgent").unwrap();
    // Far more than the bulk inbox and the receiver's read-ahead (1 MiB) hold.
    let bulk = send_numbered(&a, &b, "bulk", Priority::LOW, BULK, 1024).await;
    let high = send_numbered(&a, &b, "urgent", Priority::HIGH, 10, 8).await;
    for n in 0..10 {
        let message = within("an urgent message past the stuck bulk lane", urgent.recv())
            .await
            .unwrap();
        assert_eq!(number(&message), n);
    }
    urgent.settle();
    for receipt in high {
        within("urgent ack", receipt).await.unwrap();
    }
    assert!(
        !bulk.last().unwrap().is_delivered(),
        "the bulk lane is still held up"
    );
    for n in 0..BULK {
        let message = within("bulk", bulk_inbox.recv()).await.unwrap();
        assert_eq!(number(&message), n, "bulk in order, once");
    }
    bulk_inbox.settle();
    let last = bulk.into_iter().last().unwrap();
    within("bulk acks", last).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A batch travels in one lane: mixing priorities of two lanes is refused before anything is
/// sent, with the index of the first message of the other lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixing_lanes_is_refused_before_anything_is_sent() {
    let a = node("lanes").await;
    let b = node("lanes").await;
    let sender = a.sender(b.id()).unwrap();
    let messages = vec![
        sender.new_message("c", "a").with_priority(Priority(5)),
        sender.new_message("c", "b").with_priority(Priority::HIGH),
        sender.new_message("c", "c").with_priority(Priority::LOW),
    ];
    let error = sender.send_batch(messages).await.unwrap_err();
    match error {
        weft::SendBatchError::Invalid {
            index: 2,
            error:
                weft::SendError::MixedLanes {
                    lane: Lane::High,
                    other: Lane::Bulk,
                },
        } => {}
        other => panic!("expected a refused mixed batch, got {other:?}"),
    }
    assert_eq!(a.metrics().sent, 0, "nothing sent");
    a.shutdown().await;
    b.shutdown().await;
}

/// A high-priority request, and its reply, pass a normal lane held up behind messages the
/// server's application does not take; a normal-priority request waits behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_request_passes_a_held_up_normal_lane() {
    let a = node("lanes").await;
    let b = node_with("lanes", |c| c.inbox_capacity = 64).await;
    a.add_peer(addr(&b)).unwrap();
    within("connected", a.connected(b.id())).await.unwrap();
    // `serve` returns once every peer *B* sees connected confirmed the service: B must see A
    // (A's lanes can be up before B installed the connection).
    within("connected", b.connected(a.id())).await.unwrap();
    let mut service = within("serve", b.serve("price")).await.unwrap();
    let server = tokio::spawn(async move {
        while let Some(request) = service.recv().await {
            let body = request.body().clone();
            if request.reply(body).await.is_err() {
                break;
            }
        }
    });
    // Never read: the normal lane from A parks on it.
    let _stuck = b.receive("stuck").unwrap();
    let held = send_numbered(&a, &b, "stuck", Priority::NORMAL, 3_000, 1024).await;
    let answer = within(
        "a high-priority answer",
        a.request("price", "quote").priority(Priority::HIGH),
    )
    .await
    .unwrap();
    assert_eq!(&answer.body[..], b"quote");
    assert_eq!(answer.header.priority.lane(), Lane::High, "the reply too");
    let normal = a
        .request("price", "quote")
        .timeout(std::time::Duration::from_millis(500))
        .await;
    assert!(
        matches!(normal, Err(weft::RequestError::Timeout(_))),
        "the normal lane is held up: {normal:?}"
    );
    assert!(!held.last().unwrap().is_delivered());
    server.abort();
    a.shutdown().await;
    b.shutdown().await;
}
