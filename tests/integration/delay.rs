//! Deliver-after (delayed sends) over real QUIC on 127.0.0.1: a delayed message is not delivered
//! before its due time and is delivered after it, without holding up messages sent later; with a
//! spool it survives the sender's shutdown before its time and arrives once after the restart;
//! bad due times and a full schedule are typed errors.
//!
//! "Not before" is checked against the wall clock when the receiver gets the message (sender and
//! receiver share this machine's clock); nothing here sleeps in place of waiting for an event.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft::proto::schedule::DueError;
use weft::{Node, SendBatchError, SendError, TrySendError};

use crate::support::{addr, init_tracing, node, node_with, tempdir, within};

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Receives the next message and the wall-clock time it arrived.
async fn recv_at(inbox: &mut weft::Inbox) -> (weft::Message, u64) {
    let message = within("a message", inbox.recv()).await.expect("open inbox");
    (message, now_unix_ms())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_waits_for_its_time_and_holds_nothing_up() {
    let a = node("delay").await;
    let b = node("delay").await;
    let mut inbox = b.receive("jobs").unwrap();
    a.add_peer(addr(&b)).unwrap();
    within("connection", a.connected(b.id())).await.unwrap();
    let to_b = a.sender(b.id()).unwrap();

    // Sent in this order: late (+700 ms), early (+350 ms), now.
    let late = to_b
        .send_message(
            to_b.new_message("jobs", &b"late"[..])
                .with_delay(Duration::from_millis(700)),
        )
        .await
        .unwrap();
    let early = to_b
        .send_message(
            to_b.new_message("jobs", &b"early"[..])
                .with_delay(Duration::from_millis(350)),
        )
        .await
        .unwrap();
    assert_eq!(late.try_id(), None, "numbered only when due");
    let late_due = late.due_unix_ms().expect("a delayed receipt");
    let early_due = early.due_unix_ms().expect("a delayed receipt");
    assert!(a.metrics().scheduled == 2, "{:?}", a.metrics());
    let now = to_b.send("jobs", &b"now"[..]).await.unwrap();

    // The undelayed message is not held up behind the delayed ones.
    let (first, _) = recv_at(&mut inbox).await;
    assert_eq!(&first.body[..], b"now");
    assert_eq!(first.header.id, now.id());
    // The delayed ones arrive in due order, each not before its time.
    let (second, at) = recv_at(&mut inbox).await;
    assert_eq!(&second.body[..], b"early");
    assert!(at >= early_due, "early arrived at {at}, due {early_due}");
    let (third, at) = recv_at(&mut inbox).await;
    assert_eq!(&third.body[..], b"late");
    assert!(at >= late_due, "late arrived at {at}, due {late_due}");
    inbox.settle();
    // Numbered into the stream when they became due: after "now", in due order.
    let early_id = within("early numbered", early.numbered()).await.unwrap();
    assert_eq!(early_id, second.header.id);
    assert_eq!(early_id.seq, now.id().seq + 1);
    assert_eq!(late.try_id(), Some(third.header.id));
    within("early acknowledged", early).await.unwrap();
    let delivered = within("late acknowledged", late).await.unwrap();
    assert_eq!(delivered.id, third.header.id);
    let metrics = a.metrics();
    assert_eq!((metrics.scheduled, metrics.released), (0, 2));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_delayed_message_survives_a_sender_restart_and_arrives_once() {
    let a_dir = tempdir("a");
    let b = node("delay").await;
    let mut inbox = b.receive("jobs").unwrap();
    let a = durable_node(&a_dir).await;
    a.add_peer(addr(&b)).unwrap();
    let to_b = a.sender(b.id()).unwrap();
    let receipt = to_b
        .send_message(
            to_b.new_message("jobs", &b"delayed"[..])
                .with_delay(Duration::from_millis(900)),
        )
        .await
        .unwrap();
    let due = receipt.due_unix_ms().unwrap();
    within("accepted", receipt.accepted()).await.unwrap();
    // A marker sent after it goes first: the delayed message held nothing up.
    let marker_receipt = to_b.send("jobs", &b"marker"[..]).await.unwrap();
    let (marker, _) = recv_at(&mut inbox).await;
    assert_eq!(&marker.body[..], b"marker");
    inbox.settle();
    within("marker acknowledged", marker_receipt).await.unwrap();
    // The sender stops before the due time: the message waits in its spool.
    a.shutdown().await;
    assert!(
        now_unix_ms() < due,
        "the test machine is too slow for this test"
    );
    assert!(
        within("the receipt of a stopped node", receipt)
            .await
            .is_err(),
        "the receipt of a message still waiting reports the shutdown"
    );
    drop((a, to_b));

    let a = durable_node(&a_dir).await;
    let metrics = a.metrics();
    assert_eq!(
        (metrics.scheduled, metrics.spool_pending),
        (1, 1),
        "restored into the schedule"
    );
    a.add_peer(addr(&b)).unwrap();
    let (message, at) = recv_at(&mut inbox).await;
    assert_eq!(&message.body[..], b"delayed");
    assert!(at >= due, "arrived at {at}, due {due}");
    inbox.settle();
    // Exactly once: nothing else arrives (bounded wait), and the sender's spool empties.
    let more = tokio::time::timeout(Duration::from_millis(700), inbox.recv()).await;
    assert!(more.is_err(), "a second copy arrived: {more:?}");
    for _ in 0..300 {
        if a.metrics().spool_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.metrics().released, 1);
    a.shutdown().await;
    drop(a);
    // Nothing is left to schedule or send after another restart: the unnumbered record was
    // retired when its numbered copy was written, and the copy when it was acknowledged.
    let a = durable_node(&a_dir).await;
    let metrics = a.metrics();
    assert_eq!((metrics.scheduled, metrics.spool_pending), (0, 0));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_due_times_and_a_full_schedule_are_typed_errors() {
    let a = node_with("delay", |c| c.schedule_max = 1).await;
    let b = node("delay").await;
    let mut inbox = b.receive("jobs").unwrap();
    a.add_peer(addr(&b)).unwrap();
    let to_b = a.sender(b.id()).unwrap();
    let day_ms = 24 * 60 * 60 * 1000;

    // Beyond the 30-day maximum (and absurdly far).
    for due in [now_unix_ms() + 31 * day_ms, u64::MAX] {
        let message = to_b.new_message("jobs", &b"x"[..]).with_deliver_after(due);
        let error = to_b.send_message(message.clone()).await.unwrap_err();
        assert!(
            matches!(error, SendError::Delay(DueError::TooFar { .. })),
            "{error}"
        );
        let error = to_b.try_send_message(message.clone()).unwrap_err();
        assert!(
            matches!(
                error,
                TrySendError::Send(SendError::Delay(DueError::TooFar { .. }))
            ),
            "{error}"
        );
        let error = to_b
            .send_batch([to_b.new_message("jobs", &b"ok"[..]), message])
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                SendBatchError::Invalid {
                    index: 1,
                    error: SendError::Delay(_)
                }
            ),
            "{error}"
        );
    }
    // Expiring before it is due.
    let message = to_b
        .new_message("jobs", &b"x"[..])
        .with_delay(Duration::from_secs(60));
    let due = message.deliver_after_unix_ms().unwrap();
    let error = to_b
        .send_message(message.with_expiry(due - 1))
        .await
        .unwrap_err();
    assert!(
        matches!(error, SendError::Delay(DueError::ExpiresBeforeDue { .. })),
        "{error}"
    );
    // Volatile messages are never held.
    let error = to_b
        .send_volatile(
            to_b.new_message("jobs", &b"x"[..])
                .with_delay(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::VolatileDelayed), "{error}");
    assert_eq!(a.metrics().scheduled, 0, "nothing refused was scheduled");

    // A full schedule (one place): refused at once, by both forms, until the place is free.
    let first = to_b
        .send_message(
            to_b.new_message("jobs", &b"first"[..])
                .with_delay(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let second = || {
        to_b.new_message("jobs", &b"second"[..])
            .with_delay(Duration::from_millis(10))
    };
    let error = to_b.send_message(second()).await.unwrap_err();
    assert!(matches!(error, SendError::ScheduleFull(1)), "{error}");
    let error = to_b.try_send_message(second()).unwrap_err();
    assert!(
        matches!(error, TrySendError::Send(SendError::ScheduleFull(1))),
        "{error}"
    );
    let message = within("first", inbox.recv()).await.unwrap();
    assert_eq!(&message.body[..], b"first");
    inbox.settle();
    within("first acknowledged", first).await.unwrap();
    // Released: its place is free again.
    let second = to_b.try_send_message(second()).unwrap();
    let message = within("second", inbox.recv()).await.unwrap();
    assert_eq!(&message.body[..], b"second");
    inbox.settle();
    within("second acknowledged", second).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A batch mixing delayed and immediate messages: the immediate ones go at once, the delayed
/// ones when due; the `Receipts` resolve once all are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_delayed_messages() {
    let a = node("delay").await;
    let b = node("delay").await;
    let mut inbox = b.receive("jobs").unwrap();
    a.add_peer(addr(&b)).unwrap();
    let to_b = a.sender(b.id()).unwrap();
    let batch = vec![
        to_b.new_message("jobs", &b"d1"[..])
            .with_delay(Duration::from_millis(300)),
        to_b.new_message("jobs", &b"i1"[..]),
        to_b.new_message("jobs", &b"i2"[..]),
    ];
    let receipts = to_b.send_batch(batch).await.unwrap();
    assert_eq!(receipts.len(), 3);
    assert_eq!(receipts.ids().count(), 2);
    let due = receipts.scheduled()[0].due_unix_ms().unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let (message, at) = recv_at(&mut inbox).await;
        if &message.body[..] == b"d1" {
            assert!(at >= due, "arrived at {at}, due {due}");
        }
        bodies.push(message.body);
    }
    inbox.settle();
    assert_eq!(bodies, [&b"i1"[..], &b"i2"[..], &b"d1"[..]]);
    assert_eq!(within("batch acknowledged", receipts).await.unwrap(), 3);
    a.shutdown().await;
    b.shutdown().await;
}

async fn durable_node(dir: &Path) -> Node {
    init_tracing();
    Node::builder()
        .mesh("delay")
        .data_dir(dir)
        .bind("127.0.0.1:0".parse().unwrap())
        .configure(|c| {
            c.reconnect_initial = Duration::from_millis(20);
            c.reconnect_max = Duration::from_millis(200);
        })
        .start()
        .await
        .expect("node starts")
}
