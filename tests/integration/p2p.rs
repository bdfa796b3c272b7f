//! Point-to-point messaging between two real nodes.

use std::collections::VecDeque;

use bytes::Bytes;
use weft::Node;

use crate::support::{addr, node, within};

const COUNT: u64 = 100_000;

/// Streams `COUNT` numbered messages from `from` to `to` with a window of receipts in flight,
/// checking that every receipt resolves in sequence order.
async fn stream(from: Node, to: Node) {
    let sender = from.sender(to.id()).unwrap();
    let mut receipts = VecDeque::new();
    let mut acked = 0u64;
    for n in 0..COUNT {
        let body = Bytes::copy_from_slice(&n.to_le_bytes());
        receipts.push_back(sender.send("numbers", body).await.unwrap());
        // A window of receipts in flight instead of one round trip per message.
        while receipts.len() > 4_096 || (n + 1 == COUNT && !receipts.is_empty()) {
            let delivered = within("receipt", receipts.pop_front().unwrap())
                .await
                .unwrap();
            assert_eq!(delivered.id.seq, acked + 1);
            acked += 1;
        }
    }
    assert_eq!(acked, COUNT);
}

/// Receives `COUNT` messages on `node` and checks they arrive in order, without gaps or
/// duplicates; nothing more may follow.
async fn receive(node: Node) {
    let mut inbox = node.receive("numbers").unwrap();
    for next in 0..COUNT {
        let message = within("delivery", inbox.recv()).await.expect("inbox open");
        let n = u64::from_le_bytes(message.body[..8].try_into().unwrap());
        assert_eq!(n, next, "in order, no gaps, no duplicates");
    }
    assert!(
        inbox.try_recv().is_none(),
        "no message beyond the {COUNT} sent"
    );
}

/// Two nodes exchange 100,000 messages each way at once: every one acknowledged, delivered in
/// order, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_each_way_acknowledged_in_order_without_duplicates() {
    let a = node("test").await;
    let b = node("test").await;
    a.add_peer(addr(&b)).unwrap();
    let tasks = [
        tokio::spawn(receive(a.clone())),
        tokio::spawn(receive(b.clone())),
        tokio::spawn(stream(a.clone(), b.clone())),
        tokio::spawn(stream(b.clone(), a.clone())),
    ];
    for task in tasks {
        within("exchange", task).await.unwrap();
    }
    for node in [&a, &b] {
        let metrics = node.metrics();
        assert_eq!(metrics.received, COUNT);
        assert_eq!(metrics.delivered, COUNT);
        assert_eq!(metrics.duplicates, 0);
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Nodes on the IPv6 loopback connect and exchange acknowledged messages like on IPv4.
#[tokio::test]
async fn nodes_talk_over_ipv6_loopback() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI machines must have an IPv6 loopback"
        );
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let start = || async {
        crate::support::init_tracing();
        Node::builder()
            .mesh("v6")
            .identity(weft::Identity::generate().unwrap())
            .bind("[::1]:0".parse().unwrap())
            .start()
            .await
            .unwrap()
    };
    let (a, b) = (start().await, start().await);
    assert!(b.local_addr().unwrap().is_ipv6());
    a.add_peer(addr(&b)).unwrap();
    within("connected", a.connected(b.id())).await.unwrap();
    let mut inbox = b.receive("v6").unwrap();
    for n in 0..100u64 {
        let receipt = a
            .send(b.id(), "v6", Bytes::copy_from_slice(&n.to_le_bytes()))
            .await
            .unwrap();
        let message = crate::support::take_and_ack(&mut inbox, receipt).await;
        assert_eq!(message.body, Bytes::copy_from_slice(&n.to_le_bytes()));
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// `weft discover`'s RTT probe: a handshake that proves the node's key, measured and closed at
/// once; the probed node counts no failure and gains no peer.
#[tokio::test]
async fn an_rtt_probe_proves_the_key_and_leaves_no_trace() {
    let target = crate::support::node("probe").await;
    let timeout = std::time::Duration::from_secs(5);
    let at = target.local_addr().unwrap();
    let rtt = within(
        "probe",
        weft::discovery::probe_rtt(at, target.id(), timeout),
    )
    .await
    .unwrap();
    assert!(rtt > std::time::Duration::ZERO);
    let impostor = weft::Identity::generate().unwrap().node_id();
    assert!(
        within("probe", weft::discovery::probe_rtt(at, impostor, timeout))
            .await
            .is_err(),
        "a probe pinned to another key fails"
    );
    assert!(target.connected_peers().is_empty());
    assert_eq!(target.metrics().peers_connected, 0);
    target.shutdown().await;
}

/// A batch many times larger than the peer's queue goes out in runs as room frees up: every
/// message arrives once, in order, under the ids its receipts name, and the receipts resolve
/// once the last one is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_queue_arrives_whole_and_in_order() {
    const COUNT: u32 = 5_000;
    let a = crate::support::node_with("batch", |c| c.peer_command_capacity = 64).await;
    let b = node("batch").await;
    let mut inbox = b.receive("batch").unwrap();
    a.add_peer(addr(&b)).unwrap();
    let sender = a.sender(b.id()).unwrap();
    let messages = (0..COUNT).map(|i| a.new_message("batch", i.to_le_bytes().to_vec()));
    let receipts = within("the batch is queued", sender.send_batch(messages))
        .await
        .unwrap();
    assert_eq!(receipts.len(), COUNT as usize);
    let ids: Vec<_> = receipts.ids().collect();
    for (i, id) in ids.iter().enumerate() {
        let message = within("a batched message", inbox.recv()).await.unwrap();
        assert_eq!(message.body[..], (i as u32).to_le_bytes(), "in order, once");
        assert_eq!(message.header.id, *id, "the id its receipt names");
    }
    inbox.settle();
    assert_eq!(within("the receipts", receipts).await, Ok(COUNT as usize));
    // The stream goes on after the batch.
    let next = a.send(b.id(), "batch", b"after".to_vec()).await.unwrap();
    assert_eq!(next.id().seq, ids.last().unwrap().seq + 1);
    a.shutdown().await;
    b.shutdown().await;
}

/// One message over the limits fails the whole batch, with its index, before anything of it is
/// sent: the stream's next number is still the first.
#[tokio::test]
async fn an_invalid_message_fails_the_batch_before_anything_is_sent() {
    let a = node("batch-invalid").await;
    let b = node("batch-invalid").await;
    let mut inbox = b.receive("batch").unwrap();
    a.add_peer(addr(&b)).unwrap();
    let too_large = vec![0u8; a.config().limits().max_body_bytes + 1];
    let messages = vec![
        a.new_message("batch", b"fine".to_vec()),
        a.new_message("batch", too_large),
        a.new_message("batch", b"fine too".to_vec()),
    ];
    let error = a
        .sender(b.id())
        .unwrap()
        .send_batch(messages)
        .await
        .unwrap_err();
    assert!(
        matches!(error, weft::SendBatchError::Invalid { index: 1, .. }),
        "{error:?}"
    );
    let receipt = a.send(b.id(), "batch", b"single".to_vec()).await.unwrap();
    assert_eq!(receipt.id().seq, 1, "the batch took no number");
    let message = within("the single message", inbox.recv()).await.unwrap();
    assert_eq!(&message.body[..], b"single");
    a.shutdown().await;
    b.shutdown().await;
}
