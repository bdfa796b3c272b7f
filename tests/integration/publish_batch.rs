//! `Node::publish_batch` over real QUIC: each subscriber gets each event of a batch once, in
//! order with the publisher's single publishes, over direct links and relay trees, with a data
//! directory, past a full retention; errors say how far the batch got.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use weft::{Node, PublishError, SendError, Subscription};

use crate::support::{addr, node_with, tempdir, within};

fn number(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_le_bytes())
}

fn numbers(range: std::ops::Range<u64>) -> Vec<Bytes> {
    range.map(number).collect()
}

/// `subscribers` nodes connected to `publisher` (and nothing else), each configured alike.
async fn subscribers_of(
    publisher: &Node,
    subscribers: usize,
    configure: impl Fn(&mut weft::NodeConfig),
) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..subscribers {
        let node = node_with("publish-batch", &configure).await;
        node.add_peer(addr(publisher)).unwrap();
        within("connected", node.wait_for_peers(1)).await.unwrap();
        nodes.push(node);
    }
    nodes
}

/// Subscribes each of `nodes` to `pattern`.
async fn subscribe_all(nodes: &[Node], pattern: &str) -> Vec<Subscription> {
    let mut subscriptions = Vec::new();
    for node in nodes {
        subscriptions.push(within("subscribe", node.subscribe(pattern)).await.unwrap());
    }
    subscriptions
}

/// Takes `count` events and checks they are `0..count` in order, from `publisher`.
async fn expect_in_order(subscription: &mut Subscription, publisher: weft::NodeId, count: u64) {
    for want in 0..count {
        let event = within("an event", subscription.recv())
            .await
            .expect("subscription open");
        assert_eq!(event.header.id.producer, publisher);
        let n = u64::from_le_bytes(event.body[..8].try_into().unwrap());
        assert_eq!(n, want, "once each, in publish order");
    }
}

/// Batches (across the run boundary of 1024) and single publishes, interleaved, on two topics
/// of one pattern: every subscriber, and a local subscription, gets all of them once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_single_publishes_reach_every_subscriber_once_in_order() {
    let publisher = node_with("publish-batch", |_| {}).await;
    let subscribers = subscribers_of(&publisher, 3, |_| {}).await;
    let mut subscriptions = subscribe_all(&subscribers, "orders/*").await;
    let mut local = publisher.subscribe("orders/*").await.unwrap();
    within(
        "subscribers",
        publisher.wait_for_subscribers("orders/created", 3),
    )
    .await
    .unwrap();

    let first = within(
        "first batch",
        publisher.publish_batch("orders/created", numbers(0..2_500)),
    )
    .await
    .unwrap();
    assert_eq!(first.events, 2_500);
    assert_eq!(first.local, 2_500);
    let mut hops = first.subscribers();
    hops.sort();
    let mut expected: Vec<_> = subscribers.iter().map(Node::id).collect();
    expected.sort();
    assert_eq!(hops, expected, "one first hop per subscriber");
    assert!(first.receipts.iter().all(|r| r.len() == 2_500));
    let single = publisher
        .publish("orders/paid", number(2_500))
        .await
        .unwrap();
    let second = within(
        "second batch",
        publisher.publish_batch("orders/paid", numbers(2_501..4_000)),
    )
    .await
    .unwrap();
    // Not matching: goes nowhere.
    let elsewhere = publisher
        .publish_batch("payments/settled", numbers(0..10))
        .await
        .unwrap();
    assert_eq!(elsewhere.events, 10);
    assert!(elsewhere.receipts.is_empty());
    assert_eq!(elsewhere.local, 0);
    let empty = publisher
        .publish_batch("orders/paid", Vec::<Bytes>::new())
        .await
        .unwrap();
    assert_eq!(empty.events, 0);

    for subscription in &mut subscriptions {
        expect_in_order(subscription, publisher.id(), 4_000).await;
    }
    expect_in_order(&mut local, publisher.id(), 4_000).await;
    assert_eq!(
        within("delivered", first.delivered()).await.unwrap(),
        3 * 2_500 + 2_500
    );
    within("delivered", single.delivered()).await.unwrap();
    assert_eq!(
        within("delivered", second.delivered()).await.unwrap(),
        4 * 1_499
    );
    for subscription in &mut subscriptions {
        assert!(subscription.try_recv().is_none(), "nothing twice");
    }
    for node in subscribers.iter().chain([&publisher]) {
        node.shutdown().await;
    }
}

/// More subscribers than the gossip fanout: the batch goes down relay trees; every subscriber
/// gets every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reaches_subscribers_through_relays() {
    let fanout = |c: &mut weft::NodeConfig| c.patterns.gossip_fanout = 2;
    let publisher = node_with("publish-batch", fanout).await;
    let subscribers = subscribers_of(&publisher, 5, fanout).await;
    // Relays need links to their children.
    for (i, a) in subscribers.iter().enumerate() {
        for b in &subscribers[i + 1..] {
            a.add_peer(addr(b)).unwrap();
        }
    }
    for node in &subscribers {
        within("mesh", node.wait_for_peers(5)).await.unwrap();
    }
    let mut subscriptions = subscribe_all(&subscribers, "telemetry/**").await;
    within(
        "subscribers",
        publisher.wait_for_subscribers("telemetry/a/b", 5),
    )
    .await
    .unwrap();
    let published = within(
        "batch",
        publisher.publish_batch("telemetry/a/b", numbers(0..1_500)),
    )
    .await
    .unwrap();
    assert_eq!(published.receipts.len(), 2, "two first hops");
    assert_eq!(
        published.relayed,
        3 * 1_500,
        "the other three through relays"
    );
    for subscription in &mut subscriptions {
        expect_in_order(subscription, publisher.id(), 1_500).await;
    }
    within("delivered", published.delivered()).await.unwrap();
    for node in subscribers.iter().chain([&publisher]) {
        node.shutdown().await;
    }
}

/// A retention far smaller than the batch: the publisher waits for its subscribers'
/// confirmations instead of handing them everything unconfirmed a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_retention_waits_for_room_without_repairs() {
    let small = |c: &mut weft::NodeConfig| c.patterns.event_retention_max = 64;
    let publisher = node_with("publish-batch", small).await;
    let subscribers = subscribers_of(&publisher, 2, |_| {}).await;
    let mut subscriptions = subscribe_all(&subscribers, "orders/*").await;
    within("subscribers", publisher.wait_for_subscribers("orders/x", 2))
        .await
        .unwrap();
    let publishing = publisher.publish_batch("orders/x", numbers(0..3_000));
    let receiving = async {
        for subscription in &mut subscriptions {
            expect_in_order(subscription, publisher.id(), 3_000).await;
        }
    };
    let (published, ()) = within("batch", async { tokio::join!(publishing, receiving) }).await;
    let published = published.unwrap();
    assert_eq!(published.events, 3_000);
    assert_eq!(publisher.metrics().events_repaired, 0, "no copy sent twice");
    for node in subscribers.iter().chain([&publisher]) {
        node.shutdown().await;
    }
}

/// An invalid topic publishes nothing; an event too large for the links stops the batch there,
/// after the events before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_errors_are_typed_and_say_how_far_the_batch_got() {
    let publisher = node_with("publish-batch", |_| {}).await;
    let subscribers = subscribers_of(&publisher, 1, |_| {}).await;
    let mut subscription = subscribers[0].subscribe("orders/*").await.unwrap();
    within("subscribers", publisher.wait_for_subscribers("orders/x", 1))
        .await
        .unwrap();

    let error = publisher
        .publish_batch("orders//x", numbers(0..3))
        .await
        .unwrap_err();
    assert_eq!(error.published, 0);
    assert!(matches!(error.error, PublishError::Topic(_)), "{error}");

    let too_large = Bytes::from(vec![7u8; publisher.config().link.limits.max_body_bytes]);
    let bodies = vec![number(0), number(1), too_large, number(3)];
    let error = publisher
        .publish_batch("orders/x", bodies)
        .await
        .unwrap_err();
    assert_eq!(error.published, 2);
    assert_eq!(error.done.events, 2);
    assert!(
        matches!(error.error, PublishError::Send(SendError::TooLarge(_))),
        "{error}"
    );
    // The two before it arrive; nothing after it was published.
    expect_in_order(&mut subscription, publisher.id(), 2).await;
    let _ = publisher
        .publish("orders/x", number(u64::MAX))
        .await
        .unwrap();
    let next = within("sentinel", subscription.recv()).await.unwrap();
    assert_eq!(&next.body[..], &u64::MAX.to_le_bytes());
    for node in subscribers.iter().chain([&publisher]) {
        node.shutdown().await;
    }
}

/// With a data directory on both sides and a durable subscriber: the batch goes through the
/// spool, event by event to the durable subscriber (its events name the subscription), and a
/// plain subscriber next to it gets the same events in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reaches_a_durable_subscriber_through_the_spool() {
    let start = |dir: PathBuf| async move {
        Node::builder()
            .mesh("publish-batch")
            .data_dir(dir)
            .bind("127.0.0.1:0".parse().unwrap())
            .start()
            .await
            .expect("node starts")
    };
    let publisher = start(tempdir("p")).await;
    let durable = start(tempdir("d")).await;
    durable.add_peer(addr(&publisher)).unwrap();
    within("connected", durable.wait_for_peers(1))
        .await
        .unwrap();
    let plain = subscribers_of(&publisher, 1, |_| {}).await;
    let mut billing = within(
        "subscribe",
        durable.subscribe_durable("billing", "orders/*"),
    )
    .await
    .unwrap();
    let mut watcher = plain[0].subscribe("orders/*").await.unwrap();
    within("subscribers", publisher.wait_for_subscribers("orders/x", 2))
        .await
        .unwrap();
    let published = within(
        "batch",
        publisher.publish_batch("orders/x", numbers(0..300)),
    )
    .await
    .unwrap();
    assert_eq!(published.events, 300);
    let per_hop: BTreeMap<_, _> = published
        .receipts
        .iter()
        .map(|r| (r.peer(), r.len()))
        .collect();
    assert_eq!(per_hop.get(&durable.id()), Some(&300));
    assert_eq!(per_hop.get(&plain[0].id()), Some(&300));
    expect_in_order(&mut billing, publisher.id(), 300).await;
    expect_in_order(&mut watcher, publisher.id(), 300).await;
    // Done with the last one (a durable subscription's events are acknowledged then).
    drop((billing, watcher));
    within("delivered", published.delivered()).await.unwrap();
    for node in [&durable, &plain[0], &publisher] {
        node.shutdown().await;
    }
}
