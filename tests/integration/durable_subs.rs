//! Durable named subscriptions over real QUIC and real data directories: a durable subscriber
//! that was away receives what it missed — once, in order — then live events, across its own
//! restart and its publisher's; a plain subscriber starts from now; a retention overflow is
//! dead-lettered and counted, never silent; an explicit unsubscribe ends the retention.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use weft::{Node, NodeConfig, PeerEvent, Subscription};

use crate::support::{addr, init_tracing, tempdir, within};

const TOPIC: &str = "orders/created";
const PATTERN: &str = "orders/*";
/// The body of the event that closes each check: whatever came before it came once.
const SENTINEL: u64 = u64::MAX;

fn short_timeouts(config: &mut NodeConfig) {
    config.keep_alive = Duration::from_millis(100);
    config.idle_timeout = Duration::from_millis(600);
    config.reconnect_initial = Duration::from_millis(20);
    config.reconnect_max = Duration::from_millis(200);
}

async fn start(dir: &Path, configure: impl FnOnce(&mut NodeConfig)) -> Node {
    init_tracing();
    Node::builder()
        .mesh("durable-subs")
        .data_dir(dir)
        .bind(loopback())
        .configure(|c| {
            short_timeouts(c);
            configure(c);
        })
        .start()
        .await
        .expect("node starts")
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn number(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_le_bytes())
}

async fn publish(publisher: &Node, n: u64) -> weft::Published {
    publisher
        .publish(TOPIC, number(n))
        .await
        .expect("published")
}

/// The next event's number (and its publisher).
async fn next(subscription: &mut Subscription) -> (u64, weft::NodeId) {
    let event = within("an event", subscription.recv())
        .await
        .expect("subscription open");
    let n = u64::from_le_bytes(event.body[..8].try_into().unwrap());
    (n, event.header.id.producer)
}

/// Takes the events numbered `expected`, in this order, from `publisher`.
async fn expect_exactly(
    subscription: &mut Subscription,
    publisher: weft::NodeId,
    expected: impl IntoIterator<Item = u64>,
) {
    for want in expected {
        let (n, from) = next(subscription).await;
        assert_eq!(from, publisher);
        assert_eq!(n, want, "once each, in publish order, nothing else");
    }
}

/// Publishes the sentinel and takes it: nothing came between the events before and it.
async fn expect_nothing_more(subscription: &mut Subscription, publisher: &Node) {
    let _ = publish(publisher, SENTINEL).await;
    let (n, _) = next(subscription).await;
    assert_eq!(n, SENTINEL, "an event the subscription should not have had");
}

/// Waits until `node` sees `peer` down.
async fn wait_down(
    node: &Node,
    events: &mut tokio::sync::broadcast::Receiver<PeerEvent>,
    peer: weft::NodeId,
) {
    within("peer down", async {
        while node.connected_peers().contains(&peer) {
            match events.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
    .await;
}

/// Starts the node at `dir` (with `configure`) and waits until it is connected to `publisher`.
async fn start_connected(
    dir: &Path,
    publisher: &Node,
    configure: impl FnOnce(&mut NodeConfig),
) -> Node {
    let node = start(dir, configure).await;
    node.add_peer(addr(publisher)).unwrap();
    within("peers", node.wait_for_peers(1)).await.unwrap();
    node
}

/// Shuts `node` down and waits until `publisher` saw it go (`events` subscribed before it came).
async fn leave(
    publisher: &Node,
    events: &mut tokio::sync::broadcast::Receiver<PeerEvent>,
    node: Node,
) {
    let id = node.id();
    node.shutdown().await;
    drop(node);
    wait_down(publisher, events, id).await;
}

/// A durable and a plain subscriber both leave; the publisher publishes; both come back (same
/// identity and data directory). The durable one gets exactly what it missed, in order, then
/// live events; the plain one only what is published after it subscribed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_durable_subscriber_gets_what_it_missed_once_in_order_and_a_plain_one_does_not()
{
    const BEFORE: u64 = 5;
    const AWAY: u64 = 20;
    const LIVE: u64 = 5;
    let (p_dir, d_dir, t_dir) = (tempdir("p"), tempdir("d"), tempdir("t"));
    let publisher = start(&p_dir, |_| {}).await;
    let mut peer_events = publisher.events();
    let durable = start(&d_dir, |_| {}).await;
    let plain = start(&t_dir, |_| {}).await;
    durable.add_peer(addr(&publisher)).unwrap();
    plain.add_peer(addr(&publisher)).unwrap();
    within("peers", durable.wait_for_peers(1)).await.unwrap();
    within("peers", plain.wait_for_peers(1)).await.unwrap();
    let mut billing = durable.subscribe_durable("billing", PATTERN).await.unwrap();
    assert_eq!(billing.durable_name(), Some("billing"));
    let mut watcher = plain.subscribe(PATTERN).await.unwrap();
    within("subscribers", publisher.wait_for_subscribers(TOPIC, 2))
        .await
        .unwrap();
    for n in 0..BEFORE {
        let _ = publish(&publisher, n).await;
    }
    expect_exactly(&mut billing, publisher.id(), 0..BEFORE).await;
    expect_exactly(&mut watcher, publisher.id(), 0..BEFORE).await;
    assert_eq!(publisher.metrics().durable_subscriptions, 1);
    // Both leave (the application is done with what it took).
    let (durable_id, plain_id) = (durable.id(), plain.id());
    drop((billing, watcher));
    durable.shutdown().await;
    plain.shutdown().await;
    drop((durable, plain));
    wait_down(&publisher, &mut peer_events, durable_id).await;
    wait_down(&publisher, &mut peer_events, plain_id).await;

    for n in BEFORE..BEFORE + AWAY {
        let _ = publish(&publisher, n).await;
    }
    assert!(publisher.metrics().durable_events_owed >= AWAY);

    // The durable subscriber comes back and subscribes again under its name.
    let durable = start(&d_dir, |_| {}).await;
    assert_eq!(durable.id(), durable_id);
    durable.add_peer(addr(&publisher)).unwrap();
    within("peers", durable.wait_for_peers(1)).await.unwrap();
    let mut billing = durable.subscribe_durable("billing", PATTERN).await.unwrap();
    expect_exactly(&mut billing, publisher.id(), BEFORE..BEFORE + AWAY).await;
    for n in BEFORE + AWAY..BEFORE + AWAY + LIVE {
        let _ = publish(&publisher, n).await;
    }
    expect_exactly(
        &mut billing,
        publisher.id(),
        BEFORE + AWAY..BEFORE + AWAY + LIVE,
    )
    .await;

    // The plain one comes back: it starts from now.
    let plain = start(&t_dir, |_| {}).await;
    plain.add_peer(addr(&publisher)).unwrap();
    within("peers", plain.wait_for_peers(1)).await.unwrap();
    let mut watcher = plain.subscribe(PATTERN).await.unwrap();
    within("subscribers", publisher.wait_for_subscribers(TOPIC, 2))
        .await
        .unwrap();
    expect_nothing_more(&mut watcher, &publisher).await;
    let (n, _) = next(&mut billing).await;
    assert_eq!(n, SENTINEL, "nothing twice for the durable one either");
    // Done with the last one: every event owed is acknowledged.
    drop(billing);
    let owed = within("owed drains", async {
        loop {
            let owed = publisher.metrics().durable_events_owed;
            if owed == 0 {
                return owed;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(owed, 0);
    assert_eq!(publisher.metrics().durable_events_dropped, 0);
    for node in [&publisher, &durable, &plain] {
        node.shutdown().await;
    }
}

/// The publisher restarts (same data directory) while its durable subscriber is away: it still
/// knows the subscription (its registry is in the spool), so what it publishes after its restart
/// is kept too, and what it had published before sits in its spool. The subscriber gets both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_restart_while_the_durable_subscriber_is_away_loses_nothing() {
    const BEFORE_RESTART: u64 = 10;
    const AFTER_RESTART: u64 = 10;
    let (p_dir, d_dir) = (tempdir("p"), tempdir("d"));
    let publisher = start(&p_dir, |_| {}).await;
    let mut peer_events = publisher.events();
    let durable = start_connected(&d_dir, &publisher, |_| {}).await;
    let mut audit = durable.subscribe_durable("audit", PATTERN).await.unwrap();
    within("subscribers", publisher.wait_for_subscribers(TOPIC, 1))
        .await
        .unwrap();
    let first = publish(&publisher, 0).await;
    expect_exactly(&mut audit, publisher.id(), [0]).await;
    // Done with it: acknowledged, so nothing of before is owed while it is away.
    drop(audit);
    within("acknowledged", first.delivered()).await.unwrap();
    leave(&publisher, &mut peer_events, durable).await;

    for n in 1..=BEFORE_RESTART {
        let _ = publish(&publisher, n).await;
    }
    publisher.shutdown().await;
    drop(publisher);
    let publisher = start(&p_dir, |_| {}).await;
    assert_eq!(
        publisher.metrics().durable_subscriptions,
        1,
        "registry restored"
    );
    assert_eq!(
        publisher.metrics().durable_events_owed,
        BEFORE_RESTART,
        "what it owes, restored from its spool"
    );
    for n in BEFORE_RESTART + 1..=BEFORE_RESTART + AFTER_RESTART {
        let _ = publish(&publisher, n).await;
    }

    let durable = start_connected(&d_dir, &publisher, |_| {}).await;
    let mut audit = durable.subscribe_durable("audit", PATTERN).await.unwrap();
    expect_exactly(
        &mut audit,
        publisher.id(),
        1..=BEFORE_RESTART + AFTER_RESTART,
    )
    .await;
    expect_nothing_more(&mut audit, &publisher).await;
    publisher.shutdown().await;
    durable.shutdown().await;
}

/// A durable subscriber away for longer than its budget: the publisher gives up the oldest
/// events it owes it — each dead-lettered with the reason and counted — and the subscriber
/// gets the newest `budget` when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_overflow_is_dead_lettered_and_counted() {
    const BUDGET: usize = 5;
    const AWAY: u64 = 12;
    let (p_dir, d_dir) = (tempdir("p"), tempdir("d"));
    let publisher = start(&p_dir, |c| c.patterns.durable_retention_max = BUDGET).await;
    let mut peer_events = publisher.events();
    let durable = start_connected(&d_dir, &publisher, |_| {}).await;
    let mut billing = durable.subscribe_durable("billing", PATTERN).await.unwrap();
    within("subscribers", publisher.wait_for_subscribers(TOPIC, 1))
        .await
        .unwrap();
    let first = publish(&publisher, 0).await;
    expect_exactly(&mut billing, publisher.id(), [0]).await;
    let durable_id = durable.id();
    // Done with it: acknowledged, so nothing of before is owed while it is away.
    drop(billing);
    within("acknowledged", first.delivered()).await.unwrap();
    leave(&publisher, &mut peer_events, durable).await;

    for n in 1..=AWAY {
        let _ = publish(&publisher, n).await;
    }
    let dropped = AWAY - BUDGET as u64;
    let mut dead = Vec::new();
    within("dead letters", async {
        while (dead.len() as u64) < dropped {
            if let Ok(PeerEvent::DeadLettered { peer, reason, .. }) = peer_events.recv().await {
                assert_eq!(peer, durable_id);
                dead.push(reason);
            }
        }
    })
    .await;
    assert!(dead
        .iter()
        .all(|reason| reason.contains("durable subscription retention exceeded")));
    assert_eq!(publisher.metrics().durable_events_dropped, dropped);
    assert_eq!(publisher.metrics().durable_events_owed, BUDGET as u64);

    let durable = start_connected(&d_dir, &publisher, |_| {}).await;
    let mut billing = durable.subscribe_durable("billing", PATTERN).await.unwrap();
    expect_exactly(&mut billing, publisher.id(), dropped + 1..=AWAY).await;
    expect_nothing_more(&mut billing, &publisher).await;
    publisher.shutdown().await;
    durable.shutdown().await;
}

/// Ending a durable subscription ends its retention: what is published while its node is away
/// afterwards is not kept for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribed_durable_subscription_is_kept_no_longer() {
    let (p_dir, d_dir) = (tempdir("p"), tempdir("d"));
    let publisher = start(&p_dir, |_| {}).await;
    let mut peer_events = publisher.events();
    let durable = start_connected(&d_dir, &publisher, |_| {}).await;
    let billing = durable.subscribe_durable("billing", PATTERN).await.unwrap();
    assert!(matches!(
        durable.subscribe_durable("billing", "other").await,
        Err(weft::SubscribeError::DurableInUse(_))
    ));
    within("subscribers", publisher.wait_for_subscribers(TOPIC, 1))
        .await
        .unwrap();
    assert_eq!(publisher.metrics().durable_subscriptions, 1);
    within("unsubscribe", billing.unsubscribe()).await.unwrap();
    assert_eq!(publisher.metrics().durable_subscriptions, 0);
    leave(&publisher, &mut peer_events, durable).await;
    for n in 0..3 {
        let _ = publish(&publisher, n).await;
    }
    assert_eq!(
        publisher.metrics().durable_events_owed,
        0,
        "nothing kept for it"
    );
    publisher.shutdown().await;
}

/// Events that reach a restarted durable subscriber before its application subscribes again
/// wait for it unacknowledged: when the node goes away once more before that, its publisher
/// still has them, and the next subscription under the name gets every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_for_a_durable_subscription_are_not_acknowledged_before_it_takes_them() {
    const AWAY: u64 = 10;
    let (p_dir, d_dir) = (tempdir("p"), tempdir("d"));
    let publisher = start(&p_dir, |_| {}).await;
    let mut peer_events = publisher.events();
    let durable = start_connected(&d_dir, &publisher, |_| {}).await;
    let billing = durable.subscribe_durable("billing", PATTERN).await.unwrap();
    drop(billing);
    leave(&publisher, &mut peer_events, durable).await;
    for n in 1..=AWAY {
        let _ = publish(&publisher, n).await;
    }
    // Back, but its application does not subscribe: the events arrive and wait for it.
    let durable = start(&d_dir, |_| {}).await;
    durable.add_peer(addr(&publisher)).unwrap();
    within("events queued for the durable subscription", async {
        while durable.metrics().events_delivered < AWAY {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    leave(&publisher, &mut peer_events, durable).await;
    assert_eq!(
        publisher.metrics().durable_events_owed,
        AWAY,
        "none acknowledged"
    );

    let durable = start_connected(&d_dir, &publisher, |_| {}).await;
    let mut billing = durable.subscribe_durable("billing", PATTERN).await.unwrap();
    expect_exactly(&mut billing, publisher.id(), 1..=AWAY).await;
    expect_nothing_more(&mut billing, &publisher).await;
    publisher.shutdown().await;
    durable.shutdown().await;
}

/// A restarted subscriber whose second durable subscription's queue fills before the
/// application subscribes again: the links from the publisher stop reading (backpressure), and
/// with them the publisher's acknowledgements of the first subscription. Subscribing again
/// under names confirmed before (persisted) does not wait for them, so neither deadlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_durable_queue_does_not_keep_a_restarted_subscriber_from_subscribing_again() {
    const AWAY: u64 = 40;
    let small = |c: &mut NodeConfig| {
        c.patterns.subscription_capacity = 2;
        c.inbox_capacity = 2;
    };
    let (p_dir, d_dir) = (tempdir("p"), tempdir("d"));
    let publisher = start(&p_dir, |_| {}).await;
    let mut peer_events = publisher.events();
    let durable = start_connected(&d_dir, &publisher, small).await;
    let first = durable.subscribe_durable("first", "other/*").await.unwrap();
    let second = durable.subscribe_durable("second", PATTERN).await.unwrap();
    drop((first, second));
    leave(&publisher, &mut peer_events, durable).await;
    for n in 1..=AWAY {
        let _ = publish(&publisher, n).await;
    }
    let durable = start_connected(&d_dir, &publisher, small).await;
    let _first = within(
        "subscribing again",
        durable.subscribe_durable("first", "other/*"),
    )
    .await
    .unwrap();
    let mut second = within(
        "subscribing again",
        durable.subscribe_durable("second", PATTERN),
    )
    .await
    .unwrap();
    expect_exactly(&mut second, publisher.id(), 1..=AWAY).await;
    expect_nothing_more(&mut second, &publisher).await;
    publisher.shutdown().await;
    durable.shutdown().await;
}
