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
