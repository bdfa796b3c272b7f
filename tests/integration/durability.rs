//! Durability over real QUIC and a real data directory: sends survive the sender's restart and
//! the receiver being away, a restarted receiver does not deliver again what it delivered before,
//! given-up messages are dead-lettered (and the application told), and a full spool pushes back.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft::{DeliveryError, Node, NodeAddr, PeerEvent, TrySendError};

use crate::proxy::Relay;
use crate::support::{init_tracing, tempdir, within};

fn short_timeouts(config: &mut weft::NodeConfig) {
    config.keep_alive = Duration::from_millis(100);
    config.idle_timeout = Duration::from_millis(600);
    config.reconnect_initial = Duration::from_millis(20);
    config.reconnect_max = Duration::from_millis(200);
}

async fn durable_node(dir: &Path, bind: SocketAddr) -> Node {
    durable_node_with(dir, bind, |_| {}).await
}

/// A node on `dir` with short timeouts and `configure`'s changes.
async fn durable_node_with(
    dir: &Path,
    bind: SocketAddr,
    configure: impl FnOnce(&mut weft::NodeConfig),
) -> Node {
    init_tracing();
    Node::builder()
        .mesh("durable")
        .data_dir(dir)
        .bind(bind)
        .configure(|c| {
            short_timeouts(c);
            configure(c);
        })
        .start()
        .await
        .expect("node starts")
}

/// Starts a node on the data directory and the address of a node that just shut down: both are
/// free as soon as its `shutdown` returned (`Locked` or `Bind` fails the test).
async fn restart_on(dir: &Path, addr: SocketAddr) -> Node {
    Node::builder()
        .mesh("durable")
        .data_dir(dir)
        .bind(addr)
        .configure(short_timeouts)
        .start()
        .await
        .unwrap_or_else(|e| panic!("node does not restart on {addr}: {e}"))
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A sends to B while B has never been up; A restarts; B comes up: everything A accepted arrives,
/// once, in order — after a restart of the sender, under the same message ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_sends_survive_a_sender_restart_and_flow_when_the_peer_appears() {
    const COUNT: u32 = 500;
    let a_dir = tempdir("a");
    let b_dir = tempdir("b");
    // B's identity exists before B runs, so A can address it.
    let b_id = weft::Identity::load_or_create(&b_dir).unwrap().node_id();
    let a = durable_node(&a_dir, loopback()).await;
    let mut ids = Vec::new();
    for i in 0..COUNT {
        let receipt = a
            .send(b_id, "orders", i.to_le_bytes().to_vec())
            .await
            .unwrap();
        ids.push(receipt.id());
    }
    assert_eq!(a.metrics().accepted, u64::from(COUNT));
    a.shutdown().await;
    drop(a);

    let a = durable_node(&a_dir, loopback()).await;
    assert_eq!(a.metrics().spool_pending, u64::from(COUNT), "recovered");
    let b = durable_node(&b_dir, loopback()).await;
    let mut inbox = b.receive("orders").unwrap();
    a.add_peer(b.addr().unwrap()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let message = within("a restored message", inbox.recv()).await.unwrap();
        assert_eq!(message.body[..], (i as u32).to_le_bytes(), "in order, once");
        assert_eq!(message.header.id, *id, "the id assigned before the restart");
    }
    // A new send continues the same stream; its acknowledgement covers the restored ones.
    let receipt = a.send(b.id(), "orders", b"after".to_vec()).await.unwrap();
    assert_eq!(receipt.id().seq, u64::from(COUNT) + 1);
    let next = within("the new message", inbox.recv()).await.unwrap();
    assert_eq!(&next.body[..], b"after");
    inbox.settle();
    within("receipt", receipt).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
    drop(a);
    // Everything acknowledged was retired: nothing to send after the next restart.
    let a = durable_node(&a_dir, loopback()).await;
    assert_eq!(a.metrics().spool_pending, 0);
    a.shutdown().await;
}

/// The batch form of the test above: `send_batch` to a peer that was never up returns once the
/// whole batch is durable; after A's restart every message reaches B once, in order, under the
/// ids its receipts named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_batch_survives_a_sender_restart() {
    const COUNT: u32 = 3_000;
    let a_dir = tempdir("a");
    let b_dir = tempdir("b");
    let b_id = weft::Identity::load_or_create(&b_dir).unwrap().node_id();
    // A queue smaller than the batch: it is written in several runs (group commits).
    let a = durable_node_with(&a_dir, loopback(), |c| c.peer_command_capacity = 500).await;
    let messages = (0..COUNT).map(|i| a.new_message("orders", i.to_le_bytes().to_vec()));
    let receipts = within(
        "the batch is accepted",
        a.sender(b_id).unwrap().send_batch(messages),
    )
    .await
    .unwrap();
    let ids: Vec<_> = receipts.ids().collect();
    assert_eq!(ids.len(), COUNT as usize);
    assert_eq!(
        a.metrics().accepted,
        u64::from(COUNT),
        "durable when it returned"
    );
    a.shutdown().await;
    drop(a);

    let a = durable_node(&a_dir, loopback()).await;
    assert_eq!(a.metrics().spool_pending, u64::from(COUNT), "recovered");
    let b = durable_node(&b_dir, loopback()).await;
    let mut inbox = b.receive("orders").unwrap();
    a.add_peer(b.addr().unwrap()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let message = within("a restored message", inbox.recv()).await.unwrap();
        assert_eq!(message.body[..], (i as u32).to_le_bytes(), "in order, once");
        assert_eq!(message.header.id, *id, "the id assigned before the restart");
    }
    inbox.settle();
    a.shutdown().await;
    b.shutdown().await;
}

/// A batch bigger than the spool's byte cap: the spool takes what fits and refuses the rest.
/// The refusal is reported (`Partial`, with how many), each refused message's receipt fails,
/// and every accepted one is delivered once the peer appears. Nothing is silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_spool_cannot_hold_reports_what_it_refused() {
    const COUNT: usize = 400;
    let a_dir = tempdir("a");
    let b_dir = tempdir("b");
    let b_id = weft::Identity::load_or_create(&b_dir).unwrap().node_id();
    let a = durable_node_with(&a_dir, loopback(), |c| {
        c.spool = Some(weft::SpoolConfig {
            bytes_max: 256 * 1024,
            segment_bytes_target: 64 * 1024,
            ..Default::default()
        });
    })
    .await;
    let messages = (0..COUNT).map(|i| {
        let mut body = vec![0u8; 2048];
        body[..4].copy_from_slice(&(i as u32).to_le_bytes());
        a.new_message("orders", body)
    });
    let error = a
        .sender(b_id)
        .unwrap()
        .send_batch(messages)
        .await
        .unwrap_err();
    let weft::SendBatchError::Partial {
        receipts,
        refused,
        error,
    } = error
    else {
        panic!("expected a partial batch, got {error:?}");
    };
    assert!(matches!(error, weft::SendError::SpoolFull(_)), "{error:?}");
    assert_eq!(receipts.len(), COUNT, "every message was numbered");
    assert!(
        refused > 0 && refused < COUNT,
        "refused {refused} of {COUNT}"
    );
    let mut accepted = Vec::new();
    for i in 0..COUNT {
        match receipts.get(i).unwrap().accepted().await {
            Ok(()) => accepted.push(i as u32),
            Err(DeliveryError::SpoolFull(_)) => {}
            Err(other) => panic!("message {i}: {other:?}"),
        }
    }
    assert_eq!(
        accepted.len(),
        COUNT - refused,
        "the receipts agree with the count"
    );

    let b = durable_node(&b_dir, loopback()).await;
    let mut inbox = b.receive("orders").unwrap();
    a.add_peer(b.addr().unwrap()).unwrap();
    for i in &accepted {
        let message = within("an accepted message", inbox.recv()).await.unwrap();
        assert_eq!(
            message.body[..4],
            i.to_le_bytes(),
            "the accepted ones, in order"
        );
    }
    inbox.settle();
    let outcome = within("the batch's fates", receipts).await.unwrap_err();
    assert_eq!(outcome.delivered, accepted.len());
    assert_eq!(outcome.failed.len(), refused);
    a.shutdown().await;
    b.shutdown().await;
}

/// B delivers A's messages but its acknowledgements never reach A; B restarts. A sends them
/// again on the new connection, and B — whose watermark was durable before it acknowledged —
/// drops every one as a duplicate: the application sees each message once across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_receiver_does_not_deliver_again_what_it_delivered() {
    const COUNT: u32 = 50;
    let a_dir = tempdir("a");
    let b_dir = tempdir("b");
    let b = durable_node(&b_dir, loopback()).await;
    let b_addr = b.local_addr().unwrap();
    let relay = Relay::start(b_addr).await;
    let a = durable_node(&a_dir, loopback()).await;
    a.add_peer(NodeAddr::new(b.id(), relay.front)).unwrap();
    let mut inbox = b.receive("ledger").unwrap();
    // One full round trip first: both streams are resumed.
    let first = a.send(b.id(), "ledger", b"first".to_vec()).await.unwrap();
    assert_eq!(
        &within("first", inbox.recv()).await.unwrap().body[..],
        b"first"
    );
    inbox.settle();
    within("first receipt", first).await.unwrap();

    relay.cut_backward(true);
    let mut receipts = Vec::new();
    for i in 0..COUNT {
        receipts.push(
            a.send(b.id(), "ledger", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
        );
    }
    for i in 0..COUNT {
        let message = within("delivery", inbox.recv()).await.unwrap();
        assert_eq!(message.body[..], i.to_le_bytes());
    }
    drop(inbox); // settles the last one
    b.shutdown().await;
    drop(b);
    assert!(
        !receipts[0].is_delivered(),
        "no acknowledgement got through"
    );
    relay.cut_backward(false);

    let b = restart_on(&b_dir, b_addr).await;
    let mut inbox = b.receive("ledger").unwrap();
    let marker = a.send(b.id(), "ledger", b"after".to_vec()).await.unwrap();
    let next = within("the next message", inbox.recv()).await.unwrap();
    assert_eq!(&next.body[..], b"after", "nothing delivered twice");
    inbox.settle();
    for receipt in receipts {
        within("receipts after the restart", receipt).await.unwrap();
    }
    within("marker", marker).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A message whose expiry passes before its peer ever appears is dead-lettered: its receipt
/// says so, the application gets an event, the metric counts it, and the dead-letter log keeps
/// it across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dead_lettered_and_reported() {
    let a_dir = tempdir("a");
    let absent = weft::Identity::generate().unwrap().node_id();
    let a = durable_node(&a_dir, loopback()).await;
    let mut events = a.events();
    let message = a.new_message("alerts", b"too late".to_vec());
    let expires = message.created_unix_ms + 100;
    let receipt = a
        .send_message(absent, message.with_expiry(expires))
        .await
        .unwrap();
    let id = receipt.id();
    match within("dead letter", receipt).await {
        Err(DeliveryError::DeadLettered { reason }) => assert_eq!(reason, "expired"),
        other => panic!("expected a dead letter, got {other:?}"),
    }
    within("dead-letter event", async {
        loop {
            if let Ok(PeerEvent::DeadLettered { id: got, .. }) = events.recv().await {
                assert_eq!(got, id);
                return;
            }
        }
    })
    .await;
    assert_eq!(a.metrics().dead_lettered, 1);
    assert_eq!(a.metrics().spool_pending, 0);
    a.shutdown().await;
    drop(a);

    let (spool, recovery) = weft_spool::Spool::open(
        weft_spool::FsStorage::open(a_dir.join("spool")).unwrap(),
        weft_spool::SpoolConfig::default(),
    )
    .unwrap();
    assert!(recovery.pending.is_empty());
    let letters: Vec<_> = spool.dead_letters().map(|l| l.reason.to_owned()).collect();
    assert_eq!(letters, vec!["expired".to_owned()]);
}

/// At the spool's record cap `try_send` says `SpoolFull` and `send` waits; nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_pushes_back() {
    let a_dir = tempdir("a");
    let absent = weft::Identity::generate().unwrap().node_id();
    init_tracing();
    let a = Node::builder()
        .mesh("durable")
        .data_dir(&a_dir)
        .bind(loopback())
        .configure(|config| {
            // Room for 8 messages: the writer keeps one record per peer for watermarks.
            config.spool = Some(weft::SpoolConfig {
                records_max: 8 + config.peers_max as u64 + 1,
                ..Default::default()
            });
        })
        .start()
        .await
        .unwrap();
    for i in 0..8u32 {
        let _pending = a
            .send(absent, "work", i.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    assert_eq!(
        a.try_send(absent, "work", b"one more".to_vec())
            .unwrap_err(),
        TrySendError::SpoolFull
    );
    let waiting = tokio::time::timeout(
        Duration::from_millis(200),
        a.send(absent, "work", b"one more".to_vec()),
    )
    .await;
    assert!(waiting.is_err(), "send waits for room");
    a.shutdown().await;
}

/// B's spool is full (of messages to X, which is down) when its application takes A's messages:
/// the watermarks that let B acknowledge them still go in (into the spool's reserve, each
/// replacing the one before), so B's acknowledgements never stop. Without the reserve the spool
/// refused a watermark within a few hundred messages and A's receipts waited until X came up —
/// and two nodes whose full spools hold messages for each other would wait for each other for
/// good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_still_takes_watermarks_so_acknowledgements_continue() {
    init_tracing();
    let b_dir = tempdir("b");
    let x_id = weft::Identity::generate().unwrap().node_id();
    let a = durable_node(&tempdir("a"), loopback()).await;
    let b = Node::builder()
        .mesh("durable")
        .data_dir(&b_dir)
        .bind(loopback())
        .configure(|config| {
            short_timeouts(config);
            config.spool = Some(weft::SpoolConfig {
                bytes_max: 16 * 1024,
                segment_bytes_target: 1024,
                ..Default::default()
            });
        })
        .start()
        .await
        .unwrap();
    // Fill B's spool with messages to X, which is not up, until it refuses one.
    let mut filler = 0;
    loop {
        match b.send(x_id, "filler", vec![7u8; 512]).await {
            Ok(_) => filler += 1,
            Err(weft::SendError::SpoolFull(_)) => break,
            Err(e) => panic!("unexpected refusal: {e}"),
        }
        assert!(filler < 1_000, "the spool never filled up");
    }
    a.add_peer(b.addr().unwrap()).unwrap();
    let mut inbox = b.receive("work").unwrap();
    for i in 0..1_000u32 {
        let receipt = a
            .send(b.id(), "work", i.to_le_bytes().to_vec())
            .await
            .unwrap();
        let message = within("delivery", inbox.recv()).await.unwrap();
        assert_eq!(message.body[..], i.to_le_bytes());
        inbox.settle();
        within("A's receipt while B's spool is full", receipt)
            .await
            .unwrap();
    }
    assert_eq!(b.metrics().spool_errors, 0, "no watermark was refused");
    a.shutdown().await;
    b.shutdown().await;
}

/// B restarts from its data directory while A still holds the connection to B's previous run:
/// B left without its close reaching A (the relay between them was cut first, as if B's process
/// had been killed), and the idle timeout is far longer than this test waits. B's new run dials
/// A; its connection must replace the dead one at once (it comes from a newer incarnation of B),
/// and messages flow both ways, including those A sent into the dead connection.
///
/// A's id is the smaller one, so between connections of one incarnation A's own dial wins: a
/// node that did not tell incarnations apart would keep its dead connection to B's previous run
/// and close every connection B's new run dials ("closing duplicate connection").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_replaces_the_connection_its_previous_run_left_behind() {
    fn long_idle(config: &mut weft::NodeConfig) {
        config.keep_alive = Duration::from_secs(1);
        config.idle_timeout = Duration::from_secs(300);
        config.reconnect_initial = Duration::from_millis(20);
        config.reconnect_max = Duration::from_millis(200);
    }
    init_tracing();
    let b_dir = tempdir("b");
    let (a_identity, b_identity) = ordered_identities();
    let a = Node::builder()
        .mesh("durable")
        .identity(a_identity)
        .bind(loopback())
        .configure(long_idle)
        .start()
        .await
        .unwrap();
    let start_b = || {
        Node::builder()
            .mesh("durable")
            .identity(b_identity.clone())
            .data_dir(&b_dir)
            .bind(loopback())
            .configure(long_idle)
            .start()
    };
    let b = start_b().await.unwrap();
    let b_id = b.id();
    let relay = Relay::start(b.local_addr().unwrap()).await;
    let mut inbox = a.receive("replies").unwrap();
    a.add_peer(NodeAddr::new(b_id, relay.front)).unwrap();
    within("A dials B through the relay", a.connected(b_id))
        .await
        .unwrap();

    // B goes away; its close never reaches A.
    relay.cut(true);
    b.shutdown().await;
    drop(b);
    assert_eq!(
        a.connected_peers(),
        vec![b_id],
        "A still holds the old connection"
    );
    let mut events = a.events();
    let during = a.send(b_id, "requests", b"sent into the dead connection".to_vec());
    let during = within("send while B is away", during).await.unwrap();

    // B's new run, from the same data directory (free once `shutdown` returned), dials A
    // directly.
    let b = start_b().await.expect("B restarts");
    let mut requests = b.receive("requests").unwrap();
    b.add_peer(a.addr().unwrap()).unwrap();
    within("A takes B's new connection", async {
        loop {
            match events.recv().await.unwrap() {
                PeerEvent::Up { peer, .. } if peer == b_id => break,
                _ => {}
            }
        }
    })
    .await;

    let message = within("what A sent while B was away", requests.recv())
        .await
        .unwrap();
    assert_eq!(&message.body[..], b"sent into the dead connection");
    requests.settle();
    within("its receipt", during).await.unwrap();
    let reply = b.send(a.id(), "replies", b"back".to_vec()).await.unwrap();
    assert_eq!(
        &within("B's reply", inbox.recv()).await.unwrap().body[..],
        b"back"
    );
    inbox.settle();
    within("the reply's receipt", reply).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// Two fresh identities, the one with the smaller node id first.
fn ordered_identities() -> (weft::Identity, weft::Identity) {
    let one = weft::Identity::generate().unwrap();
    let two = weft::Identity::generate().unwrap();
    if one.node_id() < two.node_id() {
        (one, two)
    } else {
        (two, one)
    }
}

/// `shutdown` lets go of everything a restart needs although handles of the node are still
/// alive (a clone, plain and durable subscriptions, a service, a puller, an inbox): once it has
/// returned, a node starts at once (no retry on `Locked` or `Bind`) on the same data directory
/// and the same UDP port, under the same id, and receives; the kept consuming handles end
/// (`recv` returns `None`) and the others get typed "node closed" answers, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_data_directory_while_handles_are_alive() {
    let dir = tempdir("handles");
    let node = durable_node(&dir, loopback()).await;
    let id = node.id();
    let bound = node.local_addr().unwrap();
    let peer = crate::support::node_with("durable", short_timeouts).await;
    let mut peer_inbox = peer.receive("before").unwrap();
    node.add_peer(crate::support::addr(&peer)).unwrap();
    // The spool and a link are in use before the shutdown.
    let receipt = node
        .send(peer.id(), "before", b"before".to_vec())
        .await
        .unwrap();
    let before = crate::support::take_and_ack(&mut peer_inbox, receipt).await;
    assert_eq!(&before.body[..], b"before");

    let clone = node.clone();
    let mut subscription = node.subscribe("news/*").await.unwrap();
    let mut durable = node.subscribe_durable("audit", "ledger/**").await.unwrap();
    let mut service = node.serve("lookup").await.unwrap();
    let mut puller = node.pull("jobs").await.unwrap();
    let mut inbox = node.receive("kept").unwrap();
    within("shutdown", node.shutdown()).await;
    drop(node);

    // The same directory and the same address, at once.
    let restarted = Node::builder()
        .mesh("durable")
        .data_dir(&dir)
        .bind(bound)
        .configure(short_timeouts)
        .start()
        .await
        .expect("the data directory and the port are free once shutdown returned");
    assert_eq!(restarted.id(), id, "the same identity");
    assert_eq!(restarted.local_addr().unwrap(), bound, "the same address");
    let mut after_inbox = restarted.receive("after").unwrap();
    peer.add_peer(crate::support::addr(&restarted)).unwrap();
    let receipt = peer.send(id, "after", b"after".to_vec()).await.unwrap();
    let after = crate::support::take_and_ack(&mut after_inbox, receipt).await;
    assert_eq!(&after.body[..], b"after");

    // The consuming handles kept from before the shutdown have ended.
    ends("the subscription", subscription.recv()).await;
    ends("the durable subscription", durable.recv()).await;
    ends("the service", service.recv()).await;
    ends("the puller", puller.recv()).await;
    ends("the inbox", inbox.recv()).await;
    // The others answer with typed errors.
    let error = clone
        .send(peer.id(), "late", b"late".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(error, weft::SendError::NodeClosed), "{error:?}");
    let stranger = weft::Identity::generate().unwrap().node_id();
    let error = clone
        .send(stranger, "late", b"late".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(error, weft::SendError::NodeClosed), "{error:?}");
    let error = clone
        .try_send(peer.id(), "late", b"late".to_vec())
        .unwrap_err();
    assert!(
        matches!(error, TrySendError::Send(weft::SendError::NodeClosed)),
        "{error:?}"
    );
    let error = clone.subscribe("news/*").await.unwrap_err();
    assert!(
        matches!(error, weft::SubscribeError::NodeClosed),
        "{error:?}"
    );
    assert!(clone.local_addr().is_err(), "no socket any more");
    drop((clone, subscription, durable, service, puller, inbox));
    restarted.shutdown().await;
    peer.shutdown().await;
}

/// Awaits a consuming handle's `recv`, which must return `None` at once (the node shut down,
/// nothing is queued): a regression fails here rather than hanging.
/// A node dropped without `shutdown()` (its last clone goes out of scope) ends the consuming
/// handles the application kept, as a shutdown does: none of them waits forever.
#[tokio::test]
async fn dropping_the_node_ends_the_handles_it_handed_out() {
    let node = crate::support::node_with("dropped", short_timeouts).await;
    let mut subscription = node.subscribe("news/*").await.unwrap();
    let mut service = node.serve("lookup").await.unwrap();
    let mut puller = node.pull("jobs").await.unwrap();
    let mut inbox = node.receive("kept").unwrap();
    let clone = node.clone();
    drop(node);
    drop(clone);
    ends("the subscription", subscription.recv()).await;
    ends("the service", service.recv()).await;
    ends("the puller", puller.recv()).await;
    ends("the inbox", inbox.recv()).await;
}

async fn ends<T: std::fmt::Debug>(what: &str, recv: impl std::future::Future<Output = Option<T>>) {
    match tokio::time::timeout(Duration::from_secs(5), recv).await {
        Ok(None) => {}
        Ok(Some(item)) => panic!("{what} returned {item:?} after the node's shutdown"),
        Err(_) => panic!("{what} did not end after the node's shutdown"),
    }
}
