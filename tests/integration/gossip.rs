//! Gossip fan-out between real nodes over QUIC: a publisher sends each event to a few
//! subscribers, which relay it down a tree; a subscriber that a path does not reach is repaired
//! over the publisher's direct link.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use weft::proto::gossip::{split, tree_order, Hop};
use weft::{Node, NodeConfig, Subscription};

use crate::support::{addr, node_with, within};

fn gossip_config(fanout: usize, repair_after: Duration) -> impl Fn(&mut NodeConfig) + Clone {
    move |c: &mut NodeConfig| {
        c.patterns.gossip_fanout = fanout;
        c.patterns.event_repair_after = repair_after;
    }
}

fn number(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_le_bytes())
}

/// Takes `count` events from `subscription`: each must come from `publisher`, numbered 0, 1, …
/// in order (FIFO, no gap, no duplicate).
async fn expect_in_order(subscription: &mut Subscription, publisher: weft::NodeId, count: u64) {
    for expected in 0..count {
        let event = within("event", subscription.recv()).await.expect("open");
        assert_eq!(
            event.header.id.producer, publisher,
            "the publisher, not a relay"
        );
        let n = u64::from_le_bytes(event.body[..8].try_into().unwrap());
        assert_eq!(n, expected, "FIFO per publisher, no gaps, no duplicates");
    }
}

/// The nodes `publisher` sends an event for `subscribers` (all connected) to itself: the heads
/// of the chunks of its tree.
fn first_hops(
    publisher: &weft::NodeId,
    subscribers: &[weft::NodeId],
    fanout: usize,
) -> Vec<weft::NodeId> {
    let mut route: Vec<Hop> = subscribers
        .iter()
        .map(|&node| Hop { node, prev: 0 })
        .collect();
    route.sort_by_key(|hop| (tree_order(publisher, &hop.node), hop.node));
    split(&route, fanout).map(|chunk| chunk[0].node).collect()
}

/// Connects every pair of `nodes` and waits for the full mesh.
async fn connect_all(nodes: &[&Node]) {
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            a.add_peer(addr(b)).unwrap();
        }
    }
    for n in nodes {
        within("full mesh", n.wait_for_peers(nodes.len() - 1))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_reaches_many_subscribers_through_relays_once_each_in_order() {
    const EVENTS: u64 = 300;
    const SUBSCRIBERS: usize = 11;
    const FANOUT: usize = 3;
    let mut nodes = Vec::new();
    for _ in 0..=SUBSCRIBERS {
        // Repairs would add copies: far out of reach of a healthy run, even on a loaded machine.
        let config = gossip_config(FANOUT, Duration::from_secs(60));
        nodes.push(node_with("gossip", config).await);
    }
    connect_all(&nodes.iter().collect::<Vec<_>>()).await;
    let (publisher, subscribers) = (&nodes[0], &nodes[1..]);
    let mut subscriptions = Vec::new();
    for subscriber in subscribers {
        subscriptions.push(
            within("subscribe", subscriber.subscribe("ticks/**"))
                .await
                .unwrap(),
        );
    }
    within(
        "subscribers",
        publisher.wait_for_subscribers("ticks/a", SUBSCRIBERS),
    )
    .await
    .unwrap();
    for n in 0..EVENTS {
        let published = publisher.publish("ticks/a", number(n)).await.unwrap();
        assert_eq!(
            published.receipts.len(),
            FANOUT,
            "the publisher sends to its first hops only"
        );
        assert_eq!(published.relayed, SUBSCRIBERS - FANOUT);
    }
    for subscription in &mut subscriptions {
        expect_in_order(subscription, publisher.id(), EVENTS).await;
    }
    let metrics: Vec<_> = subscribers.iter().map(Node::metrics).collect();
    let copies: u64 = metrics.iter().map(|m| m.event_copies).sum();
    let received: u64 = metrics.iter().map(|m| m.events_received).sum();
    let relayed: u64 = metrics.iter().map(|m| m.events_relayed).sum();
    let hops_max = metrics.iter().map(|m| m.event_hops_max).max().unwrap();
    assert_eq!(received, EVENTS * SUBSCRIBERS as u64);
    assert_eq!(copies, received, "one copy per delivery on a healthy mesh");
    assert_eq!(relayed, EVENTS * (SUBSCRIBERS - FANOUT) as u64);
    assert!(
        (2..=3).contains(&hops_max),
        "11 subscribers, fan-out 3: relayed, at most 3 hops (got {hops_max})"
    );
    assert_eq!(publisher.metrics().events_repaired, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_no_relay_can_reach_is_repaired_by_its_publisher() {
    const EVENTS: u64 = 200;
    const FANOUT: usize = 2;
    let config = gossip_config(FANOUT, Duration::from_millis(300));
    let publisher = node_with("gossip-repair", config.clone()).await;
    let mut relays = Vec::new();
    for _ in 0..6 {
        relays.push(node_with("gossip-repair", config.clone()).await);
    }
    // The isolated subscriber is connected to the publisher only (no relay knows its address),
    // and is not one of the publisher's first hops: every copy meant for it goes through a relay
    // that cannot deliver it.
    let isolated = loop {
        let candidate = node_with("gossip-repair", config.clone()).await;
        let mut subscribers: Vec<weft::NodeId> = relays.iter().map(Node::id).collect();
        subscribers.push(candidate.id());
        if !first_hops(&publisher.id(), &subscribers, FANOUT).contains(&candidate.id()) {
            break candidate;
        }
        candidate.shutdown().await;
    };
    let mut mesh: Vec<&Node> = vec![&publisher];
    mesh.extend(relays.iter());
    connect_all(&mesh).await;
    publisher.add_peer(addr(&isolated)).unwrap();
    within("connected", isolated.wait_for_peers(1))
        .await
        .unwrap();
    let mut subscriptions = Vec::new();
    for subscriber in relays.iter().chain([&isolated]) {
        subscriptions.push(
            within("subscribe", subscriber.subscribe("ticks/*"))
                .await
                .unwrap(),
        );
    }
    within("subscribers", publisher.wait_for_subscribers("ticks/a", 7))
        .await
        .unwrap();
    // Normally the isolated subscriber is a relay's child; a relay whose connection dropped
    // for a moment on a loaded machine goes to the end of the tree, which can make it a first
    // hop for that event.
    let mut direct = 0;
    for n in 0..EVENTS {
        let published = publisher.publish("ticks/a", number(n)).await.unwrap();
        if published.subscribers().contains(&isolated.id()) {
            direct += 1;
        }
    }
    assert!(
        direct < EVENTS / 2,
        "mostly reached through relays ({direct} direct)"
    );
    for subscription in &mut subscriptions {
        expect_in_order(subscription, publisher.id(), EVENTS).await;
    }
    let repaired = publisher.metrics().events_repaired;
    assert!(
        repaired >= EVENTS - direct,
        "every relayed event of the isolated subscriber was repaired (repaired {repaired})"
    );
    assert_eq!(isolated.metrics().events_received, EVENTS);
    // Nothing further: each subscription had exactly its events.
    let mut extra = BTreeMap::new();
    for (i, subscription) in subscriptions.iter_mut().enumerate() {
        if subscription.try_recv().is_some() {
            extra.insert(i, ());
        }
    }
    assert!(extra.is_empty(), "extra events at {extra:?}");
}

/// Events published faster than the link takes them travel in runs (one link message for many
/// events to a hop): far fewer link messages than events reach the subscriber, and every event
/// still arrives once, in order. Without runs each event would be a link message of its own.
#[tokio::test]
async fn a_burst_of_events_travels_in_runs_and_arrives_once_in_order() {
    const EVENTS: u64 = 3_000;
    let publisher = node_with("runs", |_| {}).await;
    let subscriber = node_with("runs", |_| {}).await;
    connect_all(&[&publisher, &subscriber]).await;
    let mut subscription = within("subscribe", subscriber.subscribe("burst/**"))
        .await
        .unwrap();
    within("subscriber", publisher.wait_for_subscribers("burst/a", 1))
        .await
        .unwrap();
    let before = subscriber.metrics().received;
    let mut last = None;
    for n in 0..EVENTS {
        last = Some(publisher.publish("burst/a", number(n)).await.unwrap());
    }
    expect_in_order(&mut subscription, publisher.id(), EVENTS).await;
    let delivered = within("acknowledged", last.unwrap().delivered())
        .await
        .unwrap();
    assert_eq!(delivered, 1);
    let messages = subscriber.metrics().received - before;
    assert!(
        messages < EVENTS / 4,
        "{EVENTS} events came in {messages} link messages: not in runs"
    );
    assert_eq!(subscriber.metrics().events_received, EVENTS);
}
