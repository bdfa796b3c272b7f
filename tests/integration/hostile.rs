//! Hostile input: a peer that breaks the protocol is cut off, UDP garbage is ignored, and in both
//! cases the node keeps serving its other peers.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use weft::proto::frame::{Frame, FrameEncoder, Limits, ALPN};
use weft::proto::handshake::local_hello;
use weft::{Identity, Node};

use crate::support::{addr, node, within};

/// A raw QUIC client with a real identity that completes the hello, then writes `payload`.
async fn misbehave(target: &Node, payload: &[u8]) -> quinn::ConnectionError {
    let identity = Identity::generate().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = weft::tls::client_config(&identity, target.id(), provider).unwrap();
    assert_eq!(tls.alpn_protocols, vec![ALPN.to_vec()]);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint
        .connect(target.local_addr().unwrap(), "weft")
        .unwrap()
        .await
        .expect("TLS handshake succeeds: the identity is valid");
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let encoder = FrameEncoder::new(Limits::default());
    let mut buf = BytesMut::new();
    encoder
        .control(
            &mut buf,
            &Frame::Hello(local_hello("test", identity.node_id(), 1, None)),
        )
        .unwrap();
    send.write_all(&buf).await.unwrap();
    let mut reply = [0u8; 5];
    recv.read_exact(&mut reply)
        .await
        .expect("a welcome comes back");
    send.write_all(payload).await.unwrap();
    within("the node closes the connection", connection.closed()).await
}

fn assert_protocol_close(error: quinn::ConnectionError) {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(3),
                "PROTOCOL close code: {close:?}"
            );
        }
        other => panic!("expected an application close with the protocol code, got {other:?}"),
    }
}

/// The node under attack, and a well-behaved peer already connected to it.
async fn target_and_friend() -> (Node, Node) {
    let target = node("test").await;
    let friend = node("test").await;
    friend.add_peer(addr(&target)).unwrap();
    within("friend connects", friend.connected(target.id()))
        .await
        .unwrap();
    (target, friend)
}

/// Serving another peer still works: a full send/ack round.
async fn still_serves(node: &Node, other: &Node) {
    let mut inbox = node.receive("still").unwrap();
    let receipt = other.send(node.id(), "still", &b"alive"[..]).await.unwrap();
    assert_eq!(
        &crate::support::take_and_ack(&mut inbox, receipt).await.body[..],
        b"alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_disconnects_the_peer_and_the_node_keeps_serving() {
    let (target, friend) = target_and_friend().await;

    // A frame with an unknown tag.
    let mut garbage = BytesMut::new();
    garbage.put_u32_le(3);
    garbage.put_slice(&[0xee, 1, 2]);
    assert_protocol_close(misbehave(&target, &garbage).await);
    // A data frame before any resume, with fields that do not decode.
    let mut malformed = BytesMut::new();
    malformed.put_u32_le(4);
    malformed.put_slice(&[6, 0xff, 0xff, 0xff]);
    assert_protocol_close(misbehave(&target, &malformed).await);

    assert!(target.metrics().protocol_errors >= 2);
    still_serves(&target, &friend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_before_it_is_buffered() {
    let (target, friend) = target_and_friend().await;

    let mut oversized = BytesMut::new();
    oversized.put_u32_le(u32::MAX); // announces 4 GiB; only the prefix is ever sent
    oversized.put_slice(&[6; 16]);
    assert_protocol_close(misbehave(&target, &oversized).await);
    assert!(target.metrics().protocol_errors >= 1);
    still_serves(&target, &friend).await;
}

/// Random datagrams at the node's port (bounded: 5,000 of them, from loopback) while a peer is
/// exchanging messages with it: every message still arrives and is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_garbage_does_not_disturb_the_node() {
    let (target, friend) = target_and_friend().await;
    let mut inbox = target.receive("steady").unwrap();

    let port = target.local_addr().unwrap();
    let noise = tokio::spawn(async move {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut datagram = [0u8; 1200];
        for i in 0..5_000usize {
            for byte in datagram.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            // Some look like QUIC long headers, most are noise; sizes vary.
            if i % 3 == 0 {
                datagram[0] = 0xc0 | (datagram[0] & 0x0f);
            }
            let len = 1 + (state as usize % datagram.len());
            socket.send_to(&datagram[..len], port).await.unwrap();
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });

    let mut receipts = Vec::new();
    for i in 0..2_000u32 {
        receipts.push(
            friend
                .send(target.id(), "steady", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
        );
    }
    within("noise sent", noise).await.unwrap();
    for i in 0..2_000u32 {
        assert_eq!(
            within("delivery", inbox.recv()).await.unwrap().body[..],
            i.to_le_bytes()
        );
    }
    inbox.settle();
    for receipt in receipts {
        within("ack", receipt).await.unwrap();
    }
    assert_eq!(target.metrics().protocol_errors, 0);
    assert_eq!(friend.connected_peers(), vec![target.id()]);
}

/// A peer that sends to more channels than the application opened — the way to fill a node's
/// channel table with one small message each — is cut off at its own budget
/// (`unopened_channels_per_peer`): the application still opens its channels (`channels_max` is
/// the application's), another peer is still served, and what the peer sent within its budget
/// waits for the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_use_up_the_applications_channels() {
    const BUDGET: usize = 8;
    let target = crate::support::node_with("test", |c| {
        c.unopened_channels_per_peer = BUDGET;
        // The application's (the node's own pattern channels count too): with the peer's
        // eight counted here, its own eight would not fit.
        c.channels_max = 2 * BUDGET;
    })
    .await;
    let (hostile, friend) = (node("test").await, node("test").await);
    for peer in [&hostile, &friend] {
        peer.add_peer(addr(&target)).unwrap();
        within("connects", peer.connected(target.id()))
            .await
            .unwrap();
    }
    let mut events = target.events();
    // Within its budget: buffered for the application, acknowledged once it takes them.
    let mut receipts = Vec::new();
    for i in 0..BUDGET {
        receipts.push(
            hostile
                .send(target.id(), format!("spam/{i}"), b"x".to_vec())
                .await
                .unwrap(),
        );
    }
    // One more channel: the peer is cut off, with the reason.
    let _over = hostile
        .send(target.id(), "spam/over", b"x".to_vec())
        .await
        .unwrap();
    let reason = within("the peer cut off", async {
        loop {
            if let Ok(weft::PeerEvent::Down { peer, reason }) = events.recv().await {
                if peer == hostile.id() {
                    break reason;
                }
            }
        }
    })
    .await;
    assert!(reason.contains("unopened_channels_per_peer"), "{reason}");
    // The application's own channels, up to its own bound, all open.
    let mut mine = Vec::new();
    for i in 0..BUDGET {
        mine.push(target.receive(&format!("mine/{i}")).unwrap());
    }
    still_serves(&target, &friend).await;
    // What the peer sent within its budget is there.
    let mut spam = target.receive("spam/0").unwrap();
    let message = within("buffered message", spam.recv()).await.unwrap();
    assert_eq!(&message.body[..], b"x");
    drop(receipts);
    for node in [&target, &hostile, &friend] {
        node.shutdown().await;
    }
}

/// An authenticated peer that sends hostile runs of events — an event that does not decode in
/// the middle of a run, a run longer than any this version sends, an empty run — costs one
/// counted, logged protocol error per message (not per event), never a panic: the events before
/// the bad one are delivered, the rest of that message is dropped, and the node goes on
/// delivering its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_runs_of_events_are_dropped_once_per_message() {
    use weft::proto::gossip::{Event, Hop, Run, RUN_EVENTS_MAX};
    use weft::proto::{Channel, Kind, OutgoingMessage, Topic};

    let (target, hostile) = target_and_friend().await;
    let mut subscription = within("subscribe", target.subscribe("runs/**"))
        .await
        .unwrap();
    within("interest", hostile.wait_for_subscribers("runs/a", 1))
        .await
        .unwrap();
    // Events of the hostile node's own chain to the target: seq n after n - 1.
    let event = |seq: u64| {
        Event {
            origin: hostile.id(),
            incarnation: 1,
            seq,
            hops: 1,
            route: vec![Hop {
                node: target.id(),
                prev: seq - 1,
            }],
            direct: false,
            durable: Vec::new(),
            topic: Topic::new("runs/a").unwrap(),
            payload: bytes::Bytes::from(seq.to_le_bytes().to_vec()),
            options: None,
        }
        .encode(&hostile.id())
    };
    let to_target = hostile.sender(target.id()).unwrap();
    let send = |body: bytes::Bytes| {
        let message = OutgoingMessage::command(Channel::from_static("$weft/ev"), body, 0)
            .with_kind(Kind::Event);
        let to_target = to_target.clone();
        async move { to_target.send_message(message).await.unwrap() }
    };
    let (errors, copies) = {
        let metrics = target.metrics();
        (metrics.protocol_errors, metrics.event_copies)
    };
    // 1 and 2, then an event that is not one (a length of zero), then 3: 3 is dropped.
    let mut run = Run::new(&event(1));
    assert!(run.push(&event(2)));
    assert!(run.push(&[]));
    assert!(run.push(&event(3)));
    within("acknowledged", send(run.finish()).await)
        .await
        .unwrap();
    // A run of more than RUN_EVENTS_MAX, built by hand past `Run`'s own bound: the first
    // RUN_EVENTS_MAX (3 to 66, 3 again since it was dropped) are taken, the rest dropped.
    let mut long = vec![weft::proto::gossip::RUN_MARKER];
    for seq in 3..3 + RUN_EVENTS_MAX as u64 + 10 {
        let body = event(seq);
        long.push(body.len() as u8);
        long.extend_from_slice(&body);
    }
    within("acknowledged", send(long.into()).await)
        .await
        .unwrap();
    // An empty run: nothing in it, nothing wrong with it.
    within(
        "acknowledged",
        send(vec![weft::proto::gossip::RUN_MARKER].into()).await,
    )
    .await
    .unwrap();
    let delivered = 2 + RUN_EVENTS_MAX as u64;
    for seq in 1..=delivered {
        let event = within("event", subscription.recv()).await.unwrap();
        assert_eq!(
            event.body[..],
            seq.to_le_bytes(),
            "in order, nothing made up"
        );
    }
    assert_eq!(
        target.metrics().protocol_errors,
        errors + 2,
        "one error per hostile message"
    );
    assert_eq!(
        target.metrics().event_copies,
        copies + delivered,
        "nothing after the bad event or past the bound was even looked at"
    );
    // Nothing past what was delivered (waited for: the path is live, as the events above show).
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), subscription.recv())
            .await
            .is_err(),
        "the dropped events never arrive"
    );
    still_serves(&target, &hostile).await;
}
