//! Publish/subscribe, request/response and scatter-gather between real nodes over QUIC.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use weft::{Node, PullOptions, RequestError, SubscribeOptions};

use crate::support::{addr, node, node_with, within};

/// `count` nodes, every one connected to every other.
async fn mesh(name: &str, count: usize) -> Vec<Node> {
    crate::support::mesh_with(name, count, |_| {}).await
}

fn number(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_le_bytes())
}

fn read_number(body: &[u8]) -> u64 {
    u64::from_le_bytes(body[..8].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_every_matching_event_once_in_order_per_publisher() {
    const EVENTS: u64 = 2_000;
    let nodes = mesh("pubsub", 3).await;
    let (subscriber, publishers) = (&nodes[0], &nodes[1..]);
    // No waiting after subscribe: it returns once the publishers know (no slow-joiner loss).
    let mut orders = within("subscribe", subscriber.subscribe("orders/*"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for publisher in publishers {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..EVENTS {
                let topic = if n.is_multiple_of(2) {
                    "orders/created"
                } else {
                    "orders/paid"
                };
                let published = publisher.publish(topic, number(n)).await.unwrap();
                assert_eq!(published.receipts.len(), 1, "one subscriber");
                // Not matching: must not arrive.
                let other = publisher
                    .publish("payments/settled", number(n))
                    .await
                    .unwrap();
                assert!(other.receipts.is_empty());
            }
        }));
    }
    let mut next: BTreeMap<weft::NodeId, u64> = BTreeMap::new();
    for _ in 0..EVENTS * publishers.len() as u64 {
        let event = within("event", orders.recv())
            .await
            .expect("subscription open");
        let n = read_number(&event.body);
        let expected = next.entry(event.header.id.producer).or_insert(0);
        assert_eq!(n, *expected, "FIFO per publisher, no gaps, no duplicates");
        *expected += 1;
        let topic = if n.is_multiple_of(2) {
            "orders/created"
        } else {
            "orders/paid"
        };
        assert_eq!(event.header.channel, topic);
        assert_eq!(event.header.kind, weft::Kind::Event);
    }
    for task in tasks {
        within("publishers", task).await.unwrap();
    }
    assert_eq!(next.len(), 2);
    assert!(
        orders.try_recv().is_none(),
        "nothing beyond the matching events"
    );
    assert_eq!(subscriber.metrics().events_delivered, EVENTS * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_receipts_resolve_and_unsubscribing_stops_the_events() {
    let nodes = mesh("unsubscribe", 2).await;
    let (publisher, subscriber) = (&nodes[0], &nodes[1]);
    let mut all = within("subscribe", subscriber.subscribe("sensors/**"))
        .await
        .unwrap();
    let mut local = within("local subscribe", publisher.subscribe("sensors/7/temp"))
        .await
        .unwrap();
    let published = publisher.publish("sensors/7/temp", "21.5").await.unwrap();
    assert_eq!(published.subscribers(), vec![subscriber.id()]);
    assert_eq!(published.local, 1);
    assert_eq!(within("delivered", published.delivered()).await.unwrap(), 2);
    assert_eq!(
        &within("event", all.recv()).await.unwrap().body[..],
        b"21.5"
    );
    assert_eq!(
        &within("local", local.recv()).await.unwrap().body[..],
        b"21.5"
    );
    drop(all);
    // The publisher learns of the unsubscription; then nothing is sent to the subscriber.
    within("unsubscribed", async {
        loop {
            let published = publisher.publish("sensors/7/temp", "22").await.unwrap();
            if published.receipts.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A second subscription on a node that already receives the topic gets every event published
/// after it was made (the event task's cached targets follow new and dropped subscriptions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_made_while_events_flow_gets_the_next_ones() {
    let nodes = mesh("targets", 2).await;
    let (publisher, subscriber) = (&nodes[0], &nodes[1]);
    let mut first = within("subscribe", subscriber.subscribe("orders/*"))
        .await
        .unwrap();
    let mut n = 0;
    for round in 0..3 {
        for _ in 0..100 {
            let _ = publisher
                .publish("orders/created", number(n))
                .await
                .unwrap();
            n += 1;
        }
        for want in n - 100..n {
            let event = within("event", first.recv()).await.unwrap();
            assert_eq!(read_number(&event.body), want);
        }
        // A second subscription to the same topic, then a third (the second dropped):
        // each gets the events published after it.
        let mut next = within("subscribe", subscriber.subscribe("orders/created"))
            .await
            .unwrap();
        let _ = publisher
            .publish("orders/created", number(n))
            .await
            .unwrap();
        let event = within("event on the new subscription", next.recv())
            .await
            .unwrap();
        assert_eq!(read_number(&event.body), n, "round {round}");
        let event = within("event", first.recv()).await.unwrap();
        assert_eq!(read_number(&event.body), n);
        n += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_best_effort_subscription_drops_and_counts_instead_of_blocking() {
    const EVENTS: u64 = 5_000;
    let publisher = node("telemetry").await;
    let subscriber = node_with("telemetry", |c| c.patterns.subscription_capacity = 16).await;
    publisher.add_peer(addr(&subscriber)).unwrap();
    within("connected", publisher.connected(subscriber.id()))
        .await
        .unwrap();
    // Both ends: a subscription is confirmed by the peers its node is connected to.
    within("connected", subscriber.connected(publisher.id()))
        .await
        .unwrap();
    let mut slow = within(
        "subscribe",
        subscriber.subscribe_with(
            "cpu",
            SubscribeOptions {
                best_effort: true,
                ..SubscribeOptions::default()
            },
        ),
    )
    .await
    .unwrap();
    let mut sent = 0;
    for n in 0..EVENTS {
        sent += publisher.publish_best_effort("cpu", number(n)).unwrap() as u64;
    }
    // A marker published reliably behind them on the same link: once a reliable subscription
    // has it, every best-effort event before it was delivered or dropped.
    let mut marker = within("marker subscribe", subscriber.subscribe("cpu-done"))
        .await
        .unwrap();
    let published = publisher.publish("cpu-done", "done").await.unwrap();
    assert_eq!(published.receipts.len(), 1);
    within("marker", marker.recv()).await.unwrap();
    let mut received = 0;
    while slow.try_recv().is_some() {
        received += 1;
    }
    let publisher_dropped = publisher.metrics().events_dropped;
    assert!(
        slow.dropped() > 0,
        "a queue of 16 cannot hold {EVENTS} events"
    );
    assert_eq!(
        sent + publisher_dropped,
        EVENTS,
        "every event sent or counted"
    );
    // A connection that dropped meanwhile drops what it had queued, counted as volatile drops.
    assert_eq!(
        received + slow.dropped() + publisher.metrics().volatile_dropped,
        sent,
        "every event sent was received or counted as dropped"
    );
    assert_eq!(subscriber.metrics().events_dropped, slow.dropped());
}

/// Serves `service` on `node`: answers each request with "<label>:<body>", counting runs.
async fn serve(node: &Node, service: &str, label: &'static str) -> Arc<AtomicU64> {
    let runs = Arc::new(AtomicU64::new(0));
    let mut requests = within("serve", node.serve(service)).await.unwrap();
    let counter = Arc::clone(&runs);
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let body = format!("{label}:{}", String::from_utf8_lossy(request.body()));
            let _ = request.reply(body).await;
        }
    });
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_and_balanced_across_servers() {
    let nodes = mesh("reqrep", 3).await;
    let client = &nodes[0];
    let a = serve(&nodes[1], "pricing", "a").await;
    let b = serve(&nodes[2], "pricing", "b").await;
    within("servers known", client.wait_for_service("pricing", 2))
        .await
        .unwrap();
    for n in 0..40 {
        let reply = within("reply", client.request("pricing", format!("sku{n}")))
            .await
            .unwrap();
        let text = String::from_utf8(reply.body.to_vec()).unwrap();
        let server = reply.header.id.producer;
        let label = if server == nodes[1].id() { "a" } else { "b" };
        assert_eq!(text, format!("{label}:sku{n}"));
    }
    assert_eq!(a.load(Ordering::SeqCst) + b.load(Ordering::SeqCst), 40);
    assert_eq!(a.load(Ordering::SeqCst), 20, "round robin");
    // DEALER/ROUTER style: to one chosen node.
    for _ in 0..5 {
        let reply = within("reply", client.request("pricing", "x").to(nodes[2].id()))
            .await
            .unwrap();
        assert_eq!(&reply.body[..], b"b:x");
    }
    // A node that serves a service answers its own requests too.
    let local = serve(client, "local", "self").await;
    let reply = within("local reply", client.request("local", "q"))
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"self:q");
    assert_eq!(local.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_typed() {
    let nodes = mesh("reqerr", 2).await;
    let (client, server) = (&nodes[0], &nodes[1]);
    // Nobody serves it: at once, not after the (long) timeout.
    let error = within(
        "no responders",
        client
            .request("nobody", "q")
            .timeout(Duration::from_secs(3600)),
    )
    .await
    .unwrap_err();
    assert_eq!(error, RequestError::NoResponders);
    assert!(matches!(
        client.request("bad//name", "q").await,
        Err(RequestError::Service(_))
    ));
    // A handler that keeps requests without answering: the requester times out.
    let mut silent = within("serve", server.serve("silent")).await.unwrap();
    within("known", client.wait_for_service("silent", 1))
        .await
        .unwrap();
    let timeout = Duration::from_millis(200);
    let pending = client.request("silent", "q").timeout(timeout);
    let (result, held) = tokio::join!(pending.send(), silent.recv());
    assert_eq!(result.unwrap_err(), RequestError::Timeout(timeout));
    drop(held);
    // A handler that drops the request: the requester learns it at once.
    let server_task = tokio::spawn(async move {
        let request = silent.recv().await.unwrap();
        drop(request);
        let request = silent.recv().await.unwrap();
        request.fail("out of stock").await.unwrap();
        silent
    });
    let error = within(
        "dropped",
        client
            .request("silent", "q")
            .timeout(Duration::from_secs(3600)),
    )
    .await
    .unwrap_err();
    assert_eq!(error, RequestError::Dropped);
    let error = within("failed", client.request("silent", "q"))
        .await
        .unwrap_err();
    assert_eq!(error, RequestError::Failed("out of stock".into()));
    within("server", server_task).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_is_answered_without_running_the_handler_again() {
    let nodes = mesh("idempotent", 2).await;
    let (client, server) = (&nodes[0], &nodes[1]);
    let runs = serve(server, "charge", "charged").await;
    within("known", client.wait_for_service("charge", 1))
        .await
        .unwrap();
    let first = within("first", client.request("charge", "order-7").id(42))
        .await
        .unwrap();
    let again = within("again", client.request("charge", "order-7").id(42))
        .await
        .unwrap();
    assert_eq!(first.body, again.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    within("other", client.request("charge", "order-8").id(43))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scatter_gather_collects_until_the_deadline_and_reports_who_answered() {
    let nodes = mesh("scatter", 4).await;
    let client = &nodes[0];
    serve(&nodes[1], "inventory", "n1").await;
    serve(&nodes[2], "inventory", "n2").await;
    let mut silent = within("serve", nodes[3].serve("inventory")).await.unwrap();
    within("known", client.wait_for_service("inventory", 3))
        .await
        .unwrap();
    let gather = client
        .scatter("inventory", "sku9")
        .timeout(Duration::from_millis(500));
    let (gathered, held) = tokio::join!(gather.gather(), silent.recv());
    let gathered = gathered.unwrap();
    assert_eq!(gathered.asked.len(), 3);
    let mut bodies: Vec<_> = gathered
        .replies
        .iter()
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(bodies, vec!["n1:sku9", "n2:sku9"]);
    assert_eq!(gathered.missing(), vec![nodes[3].id()]);
    drop(held);
    // With a count, it stops early.
    let first = within(
        "count",
        client
            .scatter("inventory", "q")
            .count(1)
            .timeout(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    assert_eq!(first.replies.len(), 1);
}

/// Takes work from `puller` until `stop`, sending each item's number to `taken`.
fn work(
    mut puller: weft::Puller,
    taken: tokio::sync::mpsc::UnboundedSender<(usize, u64)>,
    worker: usize,
) -> tokio::task::JoinHandle<weft::Puller> {
    tokio::spawn(async move {
        while let Some(item) = puller.recv().await {
            assert!(item.header.channel == "thumbnails" || item.header.channel == "ledger");
            if taken.send((worker, read_number(&item.body))).is_err() {
                break;
            }
        }
        puller
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_work_item_goes_to_one_worker_and_a_slow_worker_holds_at_most_its_credit() {
    const ITEMS: u64 = 3_000;
    const CREDIT: u32 = 4;
    let credit = PullOptions {
        credit: Some(CREDIT),
    };
    let nodes = mesh("work", 4).await;
    let producer = &nodes[0];
    // The slow worker takes nothing while the work is pushed.
    let mut slow = within("pull", nodes[1].pull_with("thumbnails", credit))
        .await
        .unwrap();
    let (taken, mut done) = tokio::sync::mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for (i, node) in nodes[2..].iter().enumerate() {
        let puller = within("pull", node.pull_with("thumbnails", credit))
            .await
            .unwrap();
        workers.push(work(puller, taken.clone(), i));
    }
    for n in 0..ITEMS {
        within("push", producer.push("thumbnails", number(n)))
            .await
            .unwrap();
    }
    // Every item is assigned now; the slow worker holds what it got, at most its credit.
    let mut seen = std::collections::BTreeSet::new();
    let mut per_worker = [0u64; 2];
    let mut slow_items = 0;
    while (seen.len() as u64) < ITEMS {
        tokio::select! {
            Some((worker, n)) = done.recv() => {
                assert!(seen.insert(n), "item {n} twice");
                per_worker[worker] += 1;
            }
            item = slow.recv() => {
                let n = read_number(&item.expect("puller open").body);
                assert!(seen.insert(n), "item {n} twice");
                slow_items += 1;
            }
        }
    }
    for worker in workers {
        worker.abort();
    }
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "both fast workers got work: {per_worker:?}"
    );
    assert_eq!(
        slow_items, CREDIT,
        "the slow worker got its credit and no more"
    );
    assert!(slow.try_recv().is_none());
}

/// A producer configured by `configure` and two workers, connected both ways.
async fn producer_and_two_workers(
    mesh: &str,
    configure: impl FnOnce(&mut weft::NodeConfig),
) -> (Node, Node, Node) {
    let producer = node_with(mesh, configure).await;
    let first = node(mesh).await;
    let second = node(mesh).await;
    for worker in [&first, &second] {
        producer.add_peer(addr(worker)).unwrap();
        within("connected", producer.connected(worker.id()))
            .await
            .unwrap();
        within("connected", worker.connected(producer.id()))
            .await
            .unwrap();
    }
    (producer, first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_of_a_worker_that_dies_goes_to_another() {
    const HELD: u64 = 8;
    let (producer, doomed, survivor) = producer_and_two_workers("work-death", |c| {
        c.patterns.work_reassign_after = Duration::from_millis(200);
    })
    .await;
    let credit = PullOptions {
        credit: Some(HELD as u32),
    };
    // Only the doomed worker pulls at first: it gets (and holds, unacknowledged) the first items.
    let held = within("pull", doomed.pull_with("thumbnails", credit))
        .await
        .unwrap();
    for n in 0..HELD {
        within("push", producer.push("thumbnails", number(n)))
            .await
            .unwrap();
    }
    let puller = within("pull", survivor.pull("thumbnails")).await.unwrap();
    let (taken, mut done) = tokio::sync::mpsc::unbounded_channel();
    let task = work(puller, taken, 0);
    // The doomed worker dies without having taken its items.
    drop(held);
    doomed.shutdown().await;
    for n in HELD..2 * HELD {
        within("push", producer.push("thumbnails", number(n)))
            .await
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    while (seen.len() as u64) < 2 * HELD {
        let (_, n) = within("reassigned work", done.recv()).await.unwrap();
        assert!(seen.insert(n), "item {n} twice");
    }
    assert_eq!(seen, (0..2 * HELD).collect());
    task.abort();
}

/// A worker that stays connected but stops taking its items: past `work_ack_timeout` the
/// items it holds behind the one in its hands are copied to another worker (marked with the
/// original's id), new work goes elsewhere, and if it recovers it still gets its originals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_worker_has_its_waiting_items_copied_to_another() {
    const HELD: u64 = 8;
    let (producer, stuck, survivor) = producer_and_two_workers("work-stuck", |c| {
        c.patterns.work_ack_timeout = Some(Duration::from_millis(500));
    })
    .await;
    // Room for more than it gets: only being stuck keeps new work away from it.
    let credit = PullOptions {
        credit: Some(2 * HELD as u32),
    };
    let mut hung = within("pull", stuck.pull_with("thumbnails", credit))
        .await
        .unwrap();
    for n in 0..HELD {
        within("push", producer.push("thumbnails", number(n)))
            .await
            .unwrap();
    }
    // It takes the first item and hangs on it.
    let in_hand = within("the first item", hung.recv()).await.unwrap();
    assert_eq!(read_number(&in_hand.body), 0);
    // Less credit than the stuck worker has free: credit alone would send it the new work.
    let small = PullOptions { credit: Some(4) };
    let puller = within("pull", survivor.pull_with("thumbnails", small))
        .await
        .unwrap();
    let (taken, mut done) = tokio::sync::mpsc::unbounded_channel();
    let copies = tokio::spawn(async move {
        let mut puller = puller;
        let mut copies = BTreeMap::new();
        while copies.len() < (HELD - 1) as usize {
            let item = puller.recv().await.unwrap();
            let original = item
                .header
                .header(weft::REDELIVERY_HEADER)
                .map(|id| String::from_utf8(id.to_vec()).unwrap());
            copies.insert(read_number(&item.body), original);
        }
        let task = work(puller, taken, 1);
        (copies, task)
    });
    let (copies, task) = within("copies of the waiting items", copies).await.unwrap();
    assert_eq!(
        copies.keys().copied().collect::<Vec<_>>(),
        (1..HELD).collect::<Vec<_>>(),
        "every waiting item, not the one in its hands"
    );
    assert_eq!(producer.metrics().work_redelivered, HELD - 1);
    // New work goes to the live worker only.
    for n in HELD..2 * HELD {
        within("push", producer.push("thumbnails", number(n)))
            .await
            .unwrap();
    }
    for n in HELD..2 * HELD {
        let (worker, item) = within("new work", done.recv()).await.unwrap();
        assert_eq!((worker, item), (1, n));
    }
    // Recovered, the stuck worker gets its originals, whose ids the copies named.
    for n in 1..HELD {
        let item = within("an original", hung.recv()).await.unwrap();
        assert_eq!(read_number(&item.body), n);
        assert!(item.header.header(weft::REDELIVERY_HEADER).is_none());
        assert_eq!(
            copies[&n].as_deref(),
            Some(weft::redelivery_of(&item.header.id).as_str()),
            "the copy names its original"
        );
    }
    assert!(hung.try_recv().is_none(), "no new work while it was stuck");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_keys_keep_their_order_when_workers_join_and_die() {
    const KEYS: u64 = 16;
    const PER_KEY: u64 = 10;
    let fast_reassign = |c: &mut weft::NodeConfig| {
        c.patterns.work_reassign_after = Duration::from_millis(200);
    };
    let producer = node_with("ledger", fast_reassign).await;
    let steady = node("ledger").await;
    let doomed = node("ledger").await;
    let joiner = node("ledger").await;
    for worker in [&steady, &doomed, &joiner] {
        producer.add_peer(addr(worker)).unwrap();
        within("connected", producer.connected(worker.id()))
            .await
            .unwrap();
        within("connected", worker.connected(producer.id()))
            .await
            .unwrap();
    }
    let (taken, mut done) = tokio::sync::mpsc::unbounded_channel();
    let steady_task = work(
        within("pull", steady.pull("ledger")).await.unwrap(),
        taken.clone(),
        0,
    );
    // The doomed worker takes nothing: its keys' messages wait, unacknowledged, until it dies.
    let held = within(
        "pull",
        doomed.pull_with(
            "ledger",
            PullOptions {
                credit: Some(1_000),
            },
        ),
    )
    .await
    .unwrap();
    let push = |producer: Node, from: u64, to: u64| async move {
        for n in from..to {
            for key in 0..KEYS {
                producer
                    .push_keyed("ledger", format!("acct-{key}"), number(key * 1_000 + n))
                    .await
                    .unwrap();
            }
        }
    };
    within("first half", push(producer.clone(), 0, PER_KEY / 2)).await;
    // A worker joins (keys move to it) and the doomed one dies (its keys move, after its
    // unacknowledged messages were taken back) while the second half is pushed.
    let joiner_task = work(
        within("pull", joiner.pull("ledger")).await.unwrap(),
        taken,
        1,
    );
    let second_half = tokio::spawn(push(producer.clone(), PER_KEY / 2, PER_KEY));
    drop(held);
    doomed.shutdown().await;
    within("second half", second_half).await.unwrap();
    let mut next = vec![0u64; KEYS as usize];
    let mut per_worker = [0u64; 2];
    for _ in 0..KEYS * PER_KEY {
        let (worker, value) = within("ledger entry", done.recv()).await.unwrap();
        let (key, n) = ((value / 1_000) as usize, value % 1_000);
        assert_eq!(n, next[key], "key {key}: in order, no gaps, no duplicates");
        next[key] += 1;
        per_worker[worker] += 1;
    }
    assert!(next.iter().all(|n| *n == PER_KEY));
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "keys moved to the joiner: {per_worker:?}"
    );
    steady_task.abort();
    joiner_task.abort();
}

/// Three workers with spools take keyed items; one stops cleanly a sixth of the way in, after
/// its application dropped its puller (settling what it took). Every item is handled exactly
/// once: the stopping node acknowledges what it settled before it closes, so nothing it handled
/// goes to the key's new owner, and what it had not taken yet (moved on after its leave) comes
/// marked with the original's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leaves_cleanly_hands_on_nothing_it_handled() {
    const ITEMS: u64 = 3_000;
    const KEYS: u64 = 64;
    const LEAVE_AFTER: u64 = ITEMS / 6;
    let fast_reassign = |c: &mut weft::NodeConfig| {
        c.patterns.work_reassign_after = Duration::from_millis(200);
    };
    let root = std::env::temp_dir().join(format!("weft-leave-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let spooled = |name: &str| {
        let dir = root.join(name);
        async move {
            Node::builder()
                .mesh("leave")
                .data_dir(&dir)
                .bind("127.0.0.1:0".parse().unwrap())
                .configure(fast_reassign)
                .start()
                .await
                .expect("node starts")
        }
    };
    let producer = spooled("producer").await;
    let workers = [
        spooled("w0").await,
        spooled("w1").await,
        spooled("leaving").await,
    ];
    for worker in &workers {
        producer.add_peer(addr(worker)).unwrap();
        within("connected", producer.connected(worker.id()))
            .await
            .unwrap();
    }
    // Every take: (worker, value, marked as a redelivery).
    let (taken, mut takes) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (index, worker) in workers.iter().enumerate() {
        let mut puller = within("pull", worker.pull("ledger")).await.unwrap();
        let taken = taken.clone();
        tasks.push(tokio::spawn(async move {
            let mut count = 0;
            while let Some(item) = puller.recv().await {
                let marked = item.header.header(weft::REDELIVERY_HEADER).is_some();
                let _ = taken.send((index, read_number(&item.body), marked));
                count += 1;
                if index == 2 && count == LEAVE_AFTER {
                    break; // the leaving worker's application stops taking
                }
            }
            // Dropped here: what it took is settled.
        }));
    }
    drop(taken);
    let pushing = tokio::spawn({
        let producer = producer.clone();
        async move {
            for n in 0..ITEMS {
                producer
                    .push_keyed("ledger", format!("acct-{}", n % KEYS), number(n))
                    .await
                    .unwrap();
            }
        }
    });
    // The leaver stops cleanly as soon as its application is done.
    let leaving = tasks.pop().expect("three workers");
    let leaver = workers[2].clone();
    let left = tokio::spawn(async move {
        leaving.await.unwrap();
        leaver.shutdown().await;
    });
    let mut seen: BTreeMap<u64, Vec<(usize, bool)>> = BTreeMap::new();
    while seen.len() < ITEMS as usize {
        let (worker, value, marked) = within("every item", takes.recv()).await.unwrap();
        seen.entry(value).or_default().push((worker, marked));
    }
    within("pushes", pushing).await.unwrap();
    within("the leave", left).await.unwrap();
    // Every item was taken; a second take could come only after the leaver's connection was
    // down for the reassignment delay (200 ms) and the next control tick (100 ms): wait well
    // past that.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok((worker, value, marked)) = takes.try_recv() {
        seen.entry(value).or_default().push((worker, marked));
    }
    let twice: Vec<_> = seen.iter().filter(|(_, takes)| takes.len() > 1).collect();
    assert!(twice.is_empty(), "handled twice: {twice:?}");
    let by_leaver = seen.values().filter(|takes| takes[0].0 == 2).count() as u64;
    assert_eq!(
        by_leaver, LEAVE_AFTER,
        "the leaver handled its share, then left"
    );
    for task in tasks {
        task.abort();
    }
    producer.shutdown().await;
    for worker in &workers {
        worker.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Every readiness wait ends with one error type: a bad name, a peer that cannot be tracked, a
/// node that shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_share_one_error_type() {
    let node = crate::support::node("ready").await;
    assert!(matches!(
        node.wait_for_subscribers("a//b", 1).await,
        Err(weft::ReadyError::Name(_))
    ));
    assert!(matches!(
        node.wait_for_workers("", 1).await,
        Err(weft::ReadyError::Name(_))
    ));
    assert!(matches!(
        node.wait_for_service("a//b", 1).await,
        Err(weft::ReadyError::Name(_))
    ));
    assert!(matches!(
        node.connected(node.id()).await,
        Err(weft::ReadyError::Peer(weft::SendError::ToSelf(_)))
    ));
    let waiting = {
        let node = node.clone();
        tokio::spawn(async move { node.wait_for_service("pricing", 1).await })
    };
    node.shutdown().await;
    assert_eq!(
        within("the wait ends", waiting).await.unwrap(),
        Err(weft::ReadyError::NodeClosed)
    );
}

/// Once `wait_for_interest` returned, what the connected peers serve is known: a service nobody
/// connected answers can be told apart from one not heard of yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_wait_for_interest_the_connected_peers_services_are_known() {
    let server = crate::support::node("interest").await;
    let _service = within("serve", server.serve("pricing")).await.unwrap();
    let client = crate::support::node("interest").await;
    client.add_peer(addr(&server)).unwrap();
    within("connected", client.connected(server.id()))
        .await
        .unwrap();
    within("interest known", client.wait_for_interest())
        .await
        .unwrap();
    let at_once = |service: &'static str| {
        let client = client.clone();
        async move {
            tokio::time::timeout(Duration::ZERO, client.wait_for_service(service, 1))
                .await
                .is_ok()
        }
    };
    assert!(at_once("pricing").await, "known without waiting");
    assert!(!at_once("shipping").await, "nobody connected serves it");
    client.shutdown().await;
    server.shutdown().await;
}
