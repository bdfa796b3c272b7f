//! One set of message options for every pattern, and idempotency keys, between real nodes over
//! QUIC: what a producer sets (headers, priority, expiry, key) reaches the receiving
//! application on every pattern and across a relay; a second message with the same
//! (producer, key) is processed once, also after the receiver restarted; bad options are typed
//! errors.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use weft::proto::message::IDEMPOTENCY_KEY_HEADER;
use weft::{
    MessageOptions, Node, OptionsError, Priority, PublishError, RequestError, SendError, WorkError,
};

use crate::support::{addr, init_tracing, tempdir, within};

/// `count` nodes, every one connected to every other, with events relayed one hop at a time
/// (fan-out 1: a publisher's tree is a chain, so most copies pass through a relay).
async fn chain_mesh(name: &str, count: usize) -> Vec<Node> {
    crate::support::mesh_with(name, count, |c| c.patterns.gossip_fanout = 1).await
}

fn options() -> MessageOptions {
    MessageOptions::new()
        .header("trace-id", "4bf92f35")
        .header("tenant", "acme")
        .priority(Priority::HIGH)
        .ttl(Duration::from_secs(600))
        .idempotency_key("order-17")
}

/// What every receiver must see of [`options`].
fn assert_carried(message: &weft::Message, key: &str, priority: Priority, what: &str) {
    let header = &message.header;
    assert_eq!(
        header.header("trace-id").map(|v| &v[..]),
        Some(&b"4bf92f35"[..]),
        "{what}: header"
    );
    assert_eq!(
        header.header("tenant").map(|v| &v[..]),
        Some(&b"acme"[..]),
        "{what}"
    );
    assert_eq!(
        header.idempotency_key().map(|v| &v[..]),
        Some(key.as_bytes()),
        "{what}: key"
    );
    assert_eq!(header.priority, priority, "{what}: priority");
    let expires = header.expires_unix_ms().expect("an expiry");
    assert!(
        expires > header.created_unix_ms.max(1) && expires < u64::MAX,
        "{what}: expiry {expires}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pattern_carries_the_options_to_the_receiving_application() {
    let nodes = chain_mesh("options", 4).await;
    let (producer, receivers) = (&nodes[0], &nodes[1..]);

    // Publish (and a batch): every subscriber, most of them behind a relay, sees the options.
    let mut subscriptions = Vec::new();
    for receiver in receivers {
        subscriptions.push(
            within("subscribe", receiver.subscribe("orders/*"))
                .await
                .unwrap(),
        );
    }
    let published = producer
        .publish_with("orders/created", b"one".to_vec(), &options())
        .await
        .unwrap();
    assert_eq!(published.receipts.len() + published.relayed, 3);
    let _ = producer
        .publish_batch_with("orders/paid", [b"a".to_vec(), b"b".to_vec()], &options())
        .await
        .unwrap();
    for subscription in &mut subscriptions {
        let event = within("event", subscription.recv()).await.unwrap();
        assert_eq!(&event.body[..], b"one");
        assert_carried(&event, "order-17", Priority::HIGH, "event");
        for (i, body) in [&b"a"[..], b"b"].into_iter().enumerate() {
            let event = within("batch event", subscription.recv()).await.unwrap();
            assert_eq!(&event.body[..], body);
            assert_carried(
                &event,
                &format!("order-17/{i}"),
                Priority::HIGH,
                "batch event",
            );
        }
    }

    // Request and scatter: the server sees them on the request.
    let mut service = within("serve", receivers[0].serve("pricing"))
        .await
        .unwrap();
    within("service known", producer.wait_for_service("pricing", 1))
        .await
        .unwrap();
    let server = tokio::spawn(async move {
        for key in ["quote-1", "quote-2"] {
            let request = service.recv().await.unwrap();
            assert_carried(request.message(), key, Priority::HIGH, "request");
            request.reply(b"42".to_vec()).await.unwrap();
        }
    });
    let reply = within(
        "reply",
        producer
            .request("pricing", b"q".to_vec())
            .options(options().idempotency_key("quote-1")),
    )
    .await
    .unwrap();
    assert_eq!(&reply.body[..], b"42");
    let gathered = within(
        "scatter",
        producer
            .scatter("pricing", b"q".to_vec())
            .options(options().idempotency_key("quote-2")),
    )
    .await
    .unwrap();
    assert_eq!(gathered.replies.len(), 1);
    assert_eq!(&gathered.replies[0].body[..], b"42");
    within("server saw both", server).await.unwrap();

    // Push: the worker sees them (work items stay in the normal lane).
    let mut puller = within("pull", receivers[1].pull("jobs")).await.unwrap();
    within("worker known", producer.wait_for_workers("jobs", 1))
        .await
        .unwrap();
    let work_options = options()
        .priority(Priority::NORMAL)
        .idempotency_key("job-1");
    within(
        "push",
        producer.push_with("jobs", b"job".to_vec(), &work_options),
    )
    .await
    .unwrap();
    within(
        "push keyed",
        producer.push_keyed_with(
            "jobs",
            b"k".to_vec(),
            b"keyed".to_vec(),
            &work_options.clone().idempotency_key("job-2"),
        ),
    )
    .await
    .unwrap();
    let item = within("work item", puller.recv()).await.unwrap();
    assert_carried(&item, "job-1", Priority::NORMAL, "work item");
    let item = within("keyed work item", puller.recv()).await.unwrap();
    assert_carried(&item, "job-2", Priority::NORMAL, "keyed work item");

    // Point to point.
    let mut inbox = receivers[2].receive("direct").unwrap();
    let receipt = producer
        .send_with(
            receivers[2].id(),
            "direct",
            b"p2p".to_vec(),
            &options().idempotency_key("p2p-1"),
        )
        .await
        .unwrap();
    let message = within("direct message", inbox.recv()).await.unwrap();
    assert_carried(&message, "p2p-1", Priority::HIGH, "point to point");
    assert_eq!(message.header.id.stream, receipt.id().stream);
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_typed_errors_and_nothing_is_sent() {
    let nodes = chain_mesh("options-bad", 2).await;
    let (producer, receiver) = (&nodes[0], &nodes[1]);
    let mut subscription = within("subscribe", receiver.subscribe("t")).await.unwrap();
    let reserved = MessageOptions::new().header(IDEMPOTENCY_KEY_HEADER, "forged");
    assert!(matches!(
        producer.publish_with("t", b"x".to_vec(), &reserved).await,
        Err(PublishError::Send(SendError::Options(
            OptionsError::Header(weft::proto::HeaderError::Reserved { .. })
        )))
    ));
    let delayed = MessageOptions::new().delay(Duration::from_secs(1));
    assert!(matches!(
        producer
            .publish_batch_with("t", [b"x".to_vec()], &delayed)
            .await
            .map_err(|e| e.error),
        Err(PublishError::Send(SendError::Options(
            OptionsError::Unsupported { .. }
        )))
    ));
    assert!(matches!(
        producer
            .request("svc", b"x".to_vec())
            .options(delayed.clone())
            .await,
        Err(RequestError::Send(SendError::Options(
            OptionsError::Unsupported { .. }
        )))
    ));
    assert!(matches!(
        producer
            .push_with(
                "jobs",
                b"x".to_vec(),
                &MessageOptions::new().priority(Priority::HIGH)
            )
            .await,
        Err(WorkError::Send(SendError::Options(
            OptionsError::Unsupported { .. }
        )))
    ));
    assert!(matches!(
        producer
            .request("svc", b"x".to_vec())
            .options(MessageOptions::new().header("no spaces", "x"))
            .await,
        Err(RequestError::Send(SendError::Options(
            OptionsError::Header(weft::proto::HeaderError::Name { .. })
        )))
    ));
    assert!(matches!(
        producer
            .send_with(
                receiver.id(),
                "c",
                b"x".to_vec(),
                &MessageOptions::new().idempotency_key("")
            )
            .await,
        Err(SendError::Options(OptionsError::Header(
            weft::proto::HeaderError::IdempotencyKey { len: 0 }
        )))
    ));
    // Nothing of the refused ones was published: the next event is the first to arrive.
    let _ = producer.publish("t", b"marker".to_vec()).await.unwrap();
    let first = within("marker", subscription.recv()).await.unwrap();
    assert_eq!(&first.body[..], b"marker");
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_event_is_dropped_by_its_subscriber_and_counted() {
    let nodes = chain_mesh("options-expiry", 2).await;
    let (producer, receiver) = (&nodes[0], &nodes[1]);
    let mut subscription = within("subscribe", receiver.subscribe("t")).await.unwrap();
    let expired =
        MessageOptions::new().expires_at(std::time::SystemTime::now() - Duration::from_secs(1));
    let _ = producer
        .publish_with("t", b"stale".to_vec(), &expired)
        .await
        .unwrap();
    let _ = producer.publish("t", b"fresh".to_vec()).await.unwrap();
    let first = within("fresh event", subscription.recv()).await.unwrap();
    assert_eq!(&first.body[..], b"fresh", "the expired one was dropped");
    assert_eq!(receiver.metrics().events_expired, 1);
    for node in &nodes {
        node.shutdown().await;
    }
}

/// Events, work items and requests: a second message of the same producer with the same key
/// is not handed to the application (a request is answered with the first one's reply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_is_processed_once_on_every_pattern() {
    let nodes = chain_mesh("options-keys", 3).await;
    let (producer, receiver) = (&nodes[0], &nodes[1]);
    let keyed = |key: &str| MessageOptions::new().idempotency_key(key.to_owned());

    // Events, also through a relay (fan-out 1: one of the two subscribers gets a relayed copy).
    let mut subscriptions = Vec::new();
    for n in &nodes[1..] {
        subscriptions.push(within("subscribe", n.subscribe("orders")).await.unwrap());
    }
    for body in [&b"first"[..], b"again", b"and again"] {
        let _ = producer
            .publish_with("orders", body.to_vec(), &keyed("order-1"))
            .await
            .unwrap();
    }
    let _ = producer
        .publish_with("orders", b"other".to_vec(), &keyed("order-2"))
        .await
        .unwrap();
    for subscription in &mut subscriptions {
        let first = within("event", subscription.recv()).await.unwrap();
        assert_eq!(&first.body[..], b"first");
        let next = within("next event", subscription.recv()).await.unwrap();
        assert_eq!(&next.body[..], b"other", "the repeats were dropped");
    }

    // Work items.
    let mut puller = within("pull", receiver.pull("jobs")).await.unwrap();
    within("worker known", producer.wait_for_workers("jobs", 1))
        .await
        .unwrap();
    for body in [&b"job"[..], b"job again"] {
        producer
            .push_with("jobs", body.to_vec(), &keyed("job-1"))
            .await
            .unwrap();
    }
    producer.push("jobs", b"marker".to_vec()).await.unwrap();
    let item = within("work item", puller.recv()).await.unwrap();
    assert_eq!(&item.body[..], b"job");
    let item = within("marker item", puller.recv()).await.unwrap();
    assert_eq!(&item.body[..], b"marker", "the repeat was dropped");

    // Requests: the repeat gets the first reply; the handler ran once.
    let mut service = within("serve", receiver.serve("charge")).await.unwrap();
    within("service known", producer.wait_for_service("charge", 1))
        .await
        .unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&runs);
    let server = tokio::spawn(async move {
        while let Some(request) = service.recv().await {
            let run = counted.fetch_add(1, Ordering::SeqCst) + 1;
            request.reply(format!("charged (run {run})")).await.unwrap();
        }
    });
    for _ in 0..2 {
        let reply = within(
            "charge",
            producer
                .request("charge", b"10 EUR".to_vec())
                .to(receiver.id())
                .options(keyed("payment-1")),
        )
        .await
        .unwrap();
        assert_eq!(&reply.body[..], b"charged (run 1)");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    // The metric counts the dropped events (one per subscriber node and repeat) and work item.
    let repeats: u64 = nodes[1..]
        .iter()
        .map(|n| n.metrics().idempotent_repeats)
        .sum();
    assert_eq!(repeats, 2 * 2 + 1 + 1, "events, the work item, the request");
    server.abort();
    for node in &nodes {
        node.shutdown().await;
    }
}

async fn durable(dir: &Path, bind: SocketAddr) -> Node {
    init_tracing();
    Node::builder()
        .mesh("options-durable")
        .data_dir(dir)
        .bind(bind)
        .configure(|c| {
            c.reconnect_initial = Duration::from_millis(20);
            c.reconnect_max = Duration::from_millis(200);
        })
        .start()
        .await
        .unwrap_or_else(|e| panic!("node starts on {bind}: {e}"))
}

/// The transactional outbox's case: a producer sends a message with its row's key, the
/// receiver processes it, the producer (having crashed before marking the row sent) sends it
/// again as a new message — before and after the receiver restarted. Processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_remembered_across_the_receivers_restart() {
    let (a_dir, b_dir) = (tempdir("a"), tempdir("b"));
    let b = durable(&b_dir, "127.0.0.1:0".parse().unwrap()).await;
    let b_addr = b.local_addr().unwrap();
    let a = durable(&a_dir, "127.0.0.1:0".parse().unwrap()).await;
    a.add_peer(addr(&b)).unwrap();
    let row = MessageOptions::new().idempotency_key("outbox-row-7");
    let mut inbox = b.receive("orders").unwrap();

    let first = a
        .send_with(b.id(), "orders", b"order 7".to_vec(), &row)
        .await
        .unwrap();
    let message = within("first", inbox.recv()).await.unwrap();
    assert_eq!(&message.body[..], b"order 7");
    inbox.settle();
    within("first acknowledged", first).await.unwrap();
    // Sent again as a new message: dropped, yet acknowledged (the sender can forget it).
    let again = a
        .send_with(b.id(), "orders", b"order 7".to_vec(), &row)
        .await
        .unwrap();
    assert_ne!(again.id(), message.header.id);
    within("repeat acknowledged", again).await.unwrap();
    let marker = a
        .send(b.id(), "orders", b"marker 1".to_vec())
        .await
        .unwrap();
    let next = within("marker", inbox.recv()).await.unwrap();
    assert_eq!(&next.body[..], b"marker 1", "the repeat was not handed on");
    inbox.settle();
    within("marker acknowledged", marker).await.unwrap();
    assert_eq!(b.metrics().idempotent_repeats, 1);

    // The receiver restarts: the key was persisted before the first was acknowledged.
    drop(inbox);
    b.shutdown().await;
    drop(b);
    let b = durable(&b_dir, b_addr).await;
    let mut inbox = b.receive("orders").unwrap();
    let again = a
        .send_with(b.id(), "orders", b"order 7".to_vec(), &row)
        .await
        .unwrap();
    let other = MessageOptions::new().idempotency_key("outbox-row-8");
    let _ = a
        .send_with(b.id(), "orders", b"order 8".to_vec(), &other)
        .await
        .unwrap();
    let next = within("the next message", inbox.recv()).await.unwrap();
    assert_eq!(
        &next.body[..],
        b"order 8",
        "row 7 is still known after the restart"
    );
    inbox.settle();
    within("repeat acknowledged after the restart", again)
        .await
        .unwrap();
    assert_eq!(b.metrics().idempotent_repeats, 1);
    a.shutdown().await;
    b.shutdown().await;
}

/// A publish and a push with a due time are accepted at once and carried out at their due time:
/// later events and items overtake them, and they arrive no earlier than due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_publish_and_push_are_carried_out_at_their_due_time() {
    let nodes = chain_mesh("options-later", 2).await;
    let (producer, receiver) = (&nodes[0], &nodes[1]);
    let mut subscription = within("subscribe", receiver.subscribe("t")).await.unwrap();
    let mut puller = within("pull", receiver.pull("jobs")).await.unwrap();
    within("worker known", producer.wait_for_workers("jobs", 1))
        .await
        .unwrap();
    let later = MessageOptions::new()
        .delay(Duration::from_millis(400))
        .header("kind", "reminder");
    let published = producer
        .publish_with("t", b"later".to_vec(), &later)
        .await
        .unwrap();
    let due = published.scheduled.expect("scheduled");
    assert!(published.receipts.is_empty());
    producer
        .push_with("jobs", b"later".to_vec(), &later)
        .await
        .unwrap();
    let _ = producer.publish("t", b"now".to_vec()).await.unwrap();
    producer.push("jobs", b"now".to_vec()).await.unwrap();
    let now_unix_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let first = within("event", subscription.recv()).await.unwrap();
    assert_eq!(&first.body[..], b"now", "the later one is overtaken");
    let second = within("the delayed event", subscription.recv())
        .await
        .unwrap();
    assert_eq!(&second.body[..], b"later");
    assert!(now_unix_ms() >= due, "not before its due time");
    assert_eq!(
        second.header.header("kind").map(|v| &v[..]),
        Some(&b"reminder"[..])
    );
    let item = within("item", puller.recv()).await.unwrap();
    assert_eq!(&item.body[..], b"now");
    let item = within("the delayed item", puller.recv()).await.unwrap();
    assert_eq!(&item.body[..], b"later");
    assert!(now_unix_ms() >= due);
    for node in &nodes {
        node.shutdown().await;
    }
}

/// A delayed publish is durable: the publisher stops before the due time and starts again on
/// its data directory; the event is published then, once, with a key of its own (so that a run
/// repeated after a crash is not processed twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_publish_survives_the_publishers_restart() {
    let (p_dir, s_dir) = (tempdir("publisher"), tempdir("subscriber"));
    let publisher = durable(&p_dir, "127.0.0.1:0".parse().unwrap()).await;
    let p_addr = publisher.local_addr().unwrap();
    let subscriber = durable(&s_dir, "127.0.0.1:0".parse().unwrap()).await;
    subscriber.add_peer(addr(&publisher)).unwrap();
    within("connected", subscriber.connected(publisher.id()))
        .await
        .unwrap();
    // Durable: the publisher keeps its events for it even while it is not connected.
    let mut subscription = within("subscribe", subscriber.subscribe_durable("reminders", "t"))
        .await
        .unwrap();
    let later = MessageOptions::new().delay(Duration::from_millis(1_500));
    let published = publisher
        .publish_with("t", b"later".to_vec(), &later)
        .await
        .unwrap();
    assert!(published.scheduled.is_some());
    publisher.shutdown().await;
    drop(publisher);
    let publisher = durable(&p_dir, p_addr).await;
    let event = within("the delayed event", subscription.recv())
        .await
        .unwrap();
    assert_eq!(&event.body[..], b"later");
    let key = event.header.idempotency_key().expect("a key of its own");
    assert!(key.starts_with(b"weft-later/"), "{key:?}");
    let _ = publisher.publish("t", b"marker".to_vec()).await.unwrap();
    let next = within("marker", subscription.recv()).await.unwrap();
    assert_eq!(&next.body[..], b"marker", "published once");
    drop(subscription);
    publisher.shutdown().await;
    subscriber.shutdown().await;
}
