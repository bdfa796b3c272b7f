//! Reliability over a real connection that dies, and backpressure at the bounds.

use std::time::Duration;

use weft::{NodeAddr, PeerEvent, TrySendError};

use crate::proxy::Relay;
use crate::support::{node_with, within};

fn short_timeouts(config: &mut weft::NodeConfig) {
    config.keep_alive = Duration::from_millis(100);
    config.idle_timeout = Duration::from_millis(600);
    config.reconnect_initial = Duration::from_millis(20);
    config.reconnect_max = Duration::from_millis(200);
}

/// Node A connected to node B through a relay the test can cut, and A's peer events.
async fn connected_through_a_relay() -> (
    weft::Node,
    weft::Node,
    Relay,
    tokio::sync::broadcast::Receiver<PeerEvent>,
) {
    let a = node_with("test", short_timeouts).await;
    let b = node_with("test", short_timeouts).await;
    let relay = Relay::start(b.local_addr().unwrap()).await;
    let events = a.events();
    a.add_peer(NodeAddr::new(b.id(), relay.front)).unwrap();
    within("connect through the relay", a.connected(b.id()))
        .await
        .unwrap();
    (a, b, relay, events)
}

/// Waits until the link notices that its connection died.
async fn peer_down(events: &mut tokio::sync::broadcast::Receiver<PeerEvent>) {
    within("the link notices the dead connection", async {
        loop {
            if let PeerEvent::Down { .. } = events.recv().await.unwrap() {
                break;
            }
        }
    })
    .await;
}

/// The connection dies (every datagram dropped until the idle timeout) with messages in flight
/// and more queued behind them. Once the path is back, the link reconnects and retransmits:
/// every message arrives, in order, exactly once, and every receipt resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_are_retransmitted_after_the_connection_dies() {
    const BEFORE: u32 = 3_000;
    const DURING: u32 = 3_000;
    let (a, b, relay, mut events) = connected_through_a_relay().await;
    let mut inbox = b.receive("seq").unwrap();
    // Consume as a real application does (the channel queue is bounded: an unread inbox would
    // rightly stop the link).
    let consumer = tokio::spawn(async move {
        for i in 0..BEFORE + DURING {
            let message = within("delivery", inbox.recv()).await.unwrap();
            assert_eq!(message.body[..], i.to_le_bytes(), "in order, once");
        }
        inbox.settle();
        inbox
    });

    let mut receipts = Vec::new();
    for i in 0..BEFORE {
        receipts.push(
            a.send(b.id(), "seq", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
        );
    }
    // Cut while the tail of these is still in flight, and queue more behind the dead link.
    relay.cut(true);
    for i in BEFORE..BEFORE + DURING {
        receipts.push(
            a.send(b.id(), "seq", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
        );
    }
    peer_down(&mut events).await;
    assert!(
        !receipts.last().unwrap().is_delivered(),
        "nothing crossed the cut"
    );
    relay.cut(false);

    for receipt in receipts {
        within("every receipt resolves", receipt).await.unwrap();
    }
    let mut inbox = within("consumer", consumer).await.unwrap();
    assert!(
        inbox.try_recv().is_none(),
        "no duplicate after the last message"
    );
    assert!(relay.dropped() > 0, "the cut really dropped traffic");
    assert_eq!(b.metrics().delivered, u64::from(BEFORE + DURING));
}

/// With nowhere to send, a peer's queue fills to its bound; then `try_send` says WouldBlock
/// (nothing is dropped) and `send` waits.
#[tokio::test]
async fn a_full_peer_queue_gives_backpressure_not_loss() {
    let a = node_with("test", |c| {
        c.link.queue_messages_max = 8;
        c.peer_command_capacity = 4;
    })
    .await;
    let nowhere = weft::Identity::generate().unwrap().node_id();
    let mut accepted = 0;
    let outcome = loop {
        match a.try_send(nowhere, "c", vec![1u8; 16]) {
            Ok(_receipt) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted <= 8 + 4 + 1, "the bounds hold");
        // Let the peer task move messages from its command queue into the link.
        tokio::task::yield_now().await;
    };
    assert_eq!(outcome, TrySendError::WouldBlock);
    assert!(accepted >= 4, "accepted {accepted} before blocking");
    let blocked = tokio::time::timeout(
        Duration::from_millis(200),
        a.send(nowhere, "c", vec![2u8; 16]),
    )
    .await;
    assert!(blocked.is_err(), "send waits while the queue is full");
}

/// A peer that leaves cleanly says goodbye (the shutdown close code): the node it was connected
/// to stops redialing the address it had only learned from that peer's own connection.
#[tokio::test]
async fn a_clean_shutdown_is_a_goodbye_not_a_reason_to_redial() {
    let stays = node_with("test", short_timeouts).await;
    let leaves = node_with("test", short_timeouts).await;
    let mut events = stays.events();
    leaves.add_peer(crate::support::addr(&stays)).unwrap();
    within("connect", stays.connected(leaves.id()))
        .await
        .unwrap();
    leaves.shutdown().await;
    within("down", async {
        loop {
            if let PeerEvent::Down { .. } = events.recv().await.unwrap() {
                break;
            }
        }
    })
    .await;
    // Reconnect attempts would start within `reconnect_initial` (20 ms); give them 20 times that.
    let redial = tokio::time::timeout(Duration::from_millis(400), async {
        loop {
            if let PeerEvent::ConnectFailed { .. } = events.recv().await.unwrap() {
                break;
            }
        }
    })
    .await;
    assert!(redial.is_err(), "no redial after a goodbye");
    assert_eq!(stays.metrics().dial_failures, 0);
}

/// B's application stops reading one channel, so B's link parks a delivery and stops accepting
/// A's data. B's own messages to A must still be acknowledged (B keeps reading acks), and once B
/// reads again, A's messages arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_channel_does_not_stall_the_nodes_own_receipts() {
    let a = node_with("test", |_| {}).await;
    let b = node_with("test", |c| c.inbox_capacity = 2).await;
    a.add_peer(crate::support::addr(&b)).unwrap();
    within("connect", a.connected(b.id())).await.unwrap();
    let mut slow = b.receive("slow").unwrap(); // opened, but not read for now
    let mut fast = a.receive("fast").unwrap();

    let mut stuck = Vec::new();
    for i in 0..10u8 {
        stuck.push(a.send(b.id(), "slow", vec![i]).await.unwrap());
    }
    // The third message cannot be delivered: B's channel holds two.
    within("B's queue fills", async {
        while slow.len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!stuck.last().unwrap().is_delivered());

    for i in 0..100u32 {
        let receipt = b
            .send(a.id(), "fast", i.to_le_bytes().to_vec())
            .await
            .unwrap();
        let message = within("A gets it", fast.recv()).await.unwrap();
        assert_eq!(message.body[..], i.to_le_bytes());
        fast.settle();
        within("B's receipt while its slow channel is full", receipt)
            .await
            .unwrap();
    }

    for i in 0..10u8 {
        assert_eq!(
            within("slow delivery", slow.recv()).await.unwrap().body[..],
            [i]
        );
    }
    slow.settle();
    for receipt in stuck {
        within("A's receipts once B reads", receipt).await.unwrap();
    }
}

/// A peer advertised at two addresses, the first of which swallows packets without answering:
/// the second is dialed a moment later instead of after the first's handshake timeout.
#[tokio::test]
async fn an_unreachable_first_address_does_not_hold_up_the_connection() {
    // Long enough that waiting for it would fail the test's own bound (30 s).
    let patient = |c: &mut weft::NodeConfig| c.handshake_timeout = Duration::from_secs(120);
    let dialer = node_with("test", patient).await;
    let target = node_with("test", patient).await;
    // Bound, never read: datagrams to it vanish (no ICMP), like a host that is not there.
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addrs = vec![
        black_hole.local_addr().unwrap(),
        target.local_addr().unwrap(),
    ];
    dialer
        .add_peer(NodeAddr {
            id: target.id(),
            addrs,
        })
        .unwrap();
    within(
        "connected over the second address",
        dialer.connected(target.id()),
    )
    .await
    .unwrap();
    let receipt = dialer.send(target.id(), "c", "hello").await.unwrap();
    let mut inbox = target.receive("c").unwrap();
    crate::support::take_and_ack(&mut inbox, receipt).await;
    drop(black_hole);
}

/// `Node::send` leaves a message's creation time to the peer task, which stamps a whole batch
/// with one clock reading. A message queued while the peer is unreachable must then age from
/// that stamp: unstamped (created "at 1970") it would be given up as too old at the first
/// expiry check. So: cut the path, send, let two expiry checks pass (the check runs every
/// second while messages are queued), heal: the message arrives and its receipt resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_queued_while_the_peer_is_away_ages_from_its_send() {
    let (a, b, relay, mut events) = connected_through_a_relay().await;
    relay.cut(true);
    peer_down(&mut events).await;
    let receipt = a.send(b.id(), "late", "still fresh").await.unwrap();
    // Two expiry checks (`weft_proto::peer::EXPIRY_CHECK` is one second) with it queued.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut inbox = b.receive("late").unwrap();
    let consumer = tokio::spawn(async move {
        let message = within("delivery", inbox.recv()).await.unwrap();
        inbox.settle();
        (message, inbox)
    });
    relay.cut(false);
    // Given up, it would fail at once (dead-lettered as too old).
    within("the receipt", receipt)
        .await
        .expect("delivered, not given up");
    let (message, _inbox) = within("consumer", consumer).await.unwrap();
    assert_eq!(&message.body[..], b"still fresh");
    assert!(message.header.created_unix_ms > 0, "stamped by the sender");
    assert_eq!(a.metrics().dead_lettered, 0);
}

/// Events in runs survive the connection dying under them: a burst published while the path
/// is cut queues as runs behind the dead link; once the path is back, every event arrives once
/// and in order, the runs' receipts resolve, and fewer link messages than events crossed (how
/// many fewer depends on how far the publisher runs ahead of its peer task: with two worker
/// threads, a few events per run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_runs_are_retransmitted_after_the_connection_dies() {
    const BEFORE: u64 = 3_000;
    const DURING: u64 = 3_000;
    let (a, b, relay, mut events) = connected_through_a_relay().await;
    let mut subscription = within("subscribe", b.subscribe("seq/**")).await.unwrap();
    within("the subscriber", a.wait_for_subscribers("seq/a", 1))
        .await
        .unwrap();
    let consumer = tokio::spawn(async move {
        for i in 0..BEFORE + DURING {
            let event = within("event", subscription.recv()).await.unwrap();
            assert_eq!(event.body[..], i.to_le_bytes(), "in order, once");
        }
        subscription
    });
    let before = b.metrics().received;
    let mut published = Vec::new();
    for i in 0..BEFORE {
        published.push(a.publish("seq/a", i.to_le_bytes().to_vec()).await.unwrap());
    }
    relay.cut(true);
    for i in BEFORE..BEFORE + DURING {
        published.push(a.publish("seq/a", i.to_le_bytes().to_vec()).await.unwrap());
    }
    peer_down(&mut events).await;
    relay.cut(false);
    for event in published {
        assert_eq!(within("delivered", event.delivered()).await.unwrap(), 1);
    }
    let mut subscription = within("consumer", consumer).await.unwrap();
    assert!(
        subscription.try_recv().is_none(),
        "no duplicate after the last event"
    );
    assert!(relay.dropped() > 0, "the cut really dropped traffic");
    let messages = b.metrics().received - before;
    assert!(
        messages < BEFORE + DURING,
        "{} events in {messages} link messages: none shared a run",
        BEFORE + DURING
    );
}
