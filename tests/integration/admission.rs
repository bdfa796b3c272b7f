//! Identity pinning and mesh admission: the wrong node or the wrong mesh never gets a link.

use weft::{NodeAddr, PeerEvent};

use crate::support::{addr, node, take_and_ack, within};

async fn next_connect_failure(
    events: &mut tokio::sync::broadcast::Receiver<PeerEvent>,
) -> (String, bool) {
    loop {
        match events.recv().await.expect("events open") {
            PeerEvent::ConnectFailed {
                reason, refused, ..
            } => return (reason, refused),
            PeerEvent::Up { peer, .. } => panic!("connected to {peer:?}, which must be refused"),
            _ => {}
        }
    }
}

/// A dialer that pins node X but reaches a node with another key is refused by TLS, with the
/// mismatch named; the impostor never shows up as a peer.
#[tokio::test]
async fn a_node_presenting_another_key_than_the_pinned_one_is_refused() {
    let dialer = node("test").await;
    let impostor = node("test").await;
    let expected = node("test").await; // the node the dialer means; not at that address
    let mut events = dialer.events();
    dialer
        .add_peer(NodeAddr::new(expected.id(), impostor.local_addr().unwrap()))
        .unwrap();
    let (reason, refused) = within("connect failure", next_connect_failure(&mut events)).await;
    assert!(!refused, "TLS refuses before any hello: {reason}");
    assert!(
        reason.contains(&expected.id().to_string()) && reason.contains(&impostor.id().to_string()),
        "the error names both ids: {reason}"
    );
    assert!(dialer.connected_peers().is_empty());
    assert!(impostor.connected_peers().is_empty());
    assert!(dialer.metrics().dial_failures >= 1);
}

/// Nodes of different meshes refuse each other at the hello, with the reason on both sides.
#[tokio::test]
async fn a_node_of_another_mesh_is_refused_with_a_reason() {
    let shop = node("shop").await;
    let bank = node("bank").await;
    let mut events = shop.events();
    shop.add_peer(addr(&bank)).unwrap();
    let (reason, refused) = within("refusal", next_connect_failure(&mut events)).await;
    assert!(refused, "refused at the hello: {reason}");
    assert!(
        reason.contains("WrongMesh") && reason.contains("shop") && reason.contains("bank"),
        "{reason}"
    );
    assert!(
        bank.metrics().refusals >= 1,
        "the acceptor counted its refusal"
    );
    assert!(shop.connected_peers().is_empty() && bank.connected_peers().is_empty());
}

/// Both nodes dial each other at once: they end up with one connection, and messages flow both
/// ways over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_converge_on_one_connection() {
    let a = node("test").await;
    let b = node("test").await;
    a.add_peer(addr(&b)).unwrap();
    b.add_peer(addr(&a)).unwrap();
    let mut inbox_a = a.receive("c").unwrap();
    let mut inbox_b = b.receive("c").unwrap();
    for i in 0..200u32 {
        let r1 = a.send(b.id(), "c", i.to_le_bytes().to_vec()).await.unwrap();
        let r2 = b.send(a.id(), "c", i.to_le_bytes().to_vec()).await.unwrap();
        let at_b = take_and_ack(&mut inbox_b, r1).await;
        let at_a = take_and_ack(&mut inbox_a, r2).await;
        assert_eq!(at_b.body[..], i.to_le_bytes());
        assert_eq!(at_a.body[..], i.to_le_bytes());
    }
    assert_eq!(a.connected_peers(), vec![b.id()]);
    assert_eq!(b.connected_peers(), vec![a.id()]);
    // A message in flight on the losing connection may be retransmitted on the winner (and
    // dropped there as a duplicate); the application saw each exactly once, in order, above.
    assert_eq!(a.metrics().delivered + b.metrics().delivered, 400);
}

/// A body over the limit is refused at the API with a typed error; nothing is queued, and a
/// message at the limit goes through.
#[tokio::test]
async fn an_oversized_body_is_refused_at_the_api() {
    let limit = 1024;
    let small = |c: &mut weft::NodeConfig| c.link.limits.max_body_bytes = limit;
    let a = crate::support::node_with("test", small).await;
    let b = crate::support::node_with("test", small).await;
    a.add_peer(addr(&b)).unwrap();
    let mut inbox = b.receive("c").unwrap();
    let error = a.send(b.id(), "c", vec![0u8; limit + 1]).await.unwrap_err();
    assert!(
        matches!(
            error,
            weft::SendError::TooLarge(weft::proto::frame::EncodeError::BodyTooLarge { len, max })
                if len == limit + 1 && max == limit
        ),
        "{error:?}"
    );
    assert!(matches!(
        a.try_send(b.id(), "c", vec![0u8; limit + 1]),
        Err(weft::TrySendError::Send(weft::SendError::TooLarge(_)))
    ));
    let receipt = a.send(b.id(), "c", vec![7u8; limit]).await.unwrap();
    let message = take_and_ack(&mut inbox, receipt).await;
    assert_eq!(
        message.header.id.seq, 1,
        "the refused ones took no sequence number"
    );
    assert_eq!(message.body.len(), limit);
}

async fn node_admitting(
    mesh: &str,
    configure: impl FnOnce(weft::NodeBuilder) -> weft::NodeBuilder,
) -> weft::Node {
    crate::support::init_tracing();
    let builder = weft::Node::builder()
        .mesh(mesh)
        .identity(weft::Identity::generate().unwrap())
        .bind("127.0.0.1:0".parse().unwrap());
    configure(builder).start().await.unwrap()
}

/// Nodes sharing the mesh secret connect and exchange messages.
#[tokio::test]
async fn nodes_with_the_same_mesh_secret_are_admitted() {
    let a = node_admitting("shop", |b| b.mesh_secret("s3cret")).await;
    let b = node_admitting("shop", |b| b.mesh_secret("s3cret")).await;
    a.add_peer(addr(&b)).unwrap();
    let mut inbox = b.receive("c").unwrap();
    let receipt = a.send(b.id(), "c", &b"in"[..]).await.unwrap();
    assert_eq!(&take_and_ack(&mut inbox, receipt).await.body[..], b"in");
}

/// A wrong secret, or none, is refused with the reason on both sides, and never connects.
#[tokio::test]
async fn a_node_with_the_wrong_mesh_secret_or_none_is_refused() {
    let guarded = node_admitting("shop", |b| b.mesh_secret("s3cret")).await;
    for (intruder, expected) in [
        (
            node_admitting("shop", |b| b.mesh_secret("guess")).await,
            "wrong mesh secret",
        ),
        (node_admitting("shop", |b| b).await, "proved none"),
    ] {
        let refusals_before = guarded.metrics().refusals;
        let mut events = intruder.events();
        intruder.add_peer(addr(&guarded)).unwrap();
        let (reason, refused) = within("refusal", next_connect_failure(&mut events)).await;
        assert!(refused, "{reason}");
        assert!(
            reason.contains("NotAdmitted") && reason.contains(expected),
            "{reason}"
        );
        assert!(
            guarded.metrics().refusals > refusals_before,
            "the guarded node counted it"
        );
        assert!(guarded.connected_peers().is_empty());
        intruder.shutdown().await;
    }
}

/// With an allow-list, a node not on it is refused even with the right mesh.
#[tokio::test]
async fn a_node_not_on_the_allow_list_is_refused() {
    let friend = weft::Identity::generate().unwrap();
    let friend_id = friend.node_id();
    let guarded = node_admitting("shop", |b| b.allow_only([friend_id])).await;
    let stranger = node_admitting("shop", |b| b).await;
    let mut events = stranger.events();
    stranger.add_peer(addr(&guarded)).unwrap();
    let (reason, refused) = within("refusal", next_connect_failure(&mut events)).await;
    assert!(refused && reason.contains("allow-list"), "{reason}");

    let friend = node_admitting("shop", |b| b.identity(friend)).await;
    friend.add_peer(addr(&guarded)).unwrap();
    within("the listed node connects", friend.connected(guarded.id()))
        .await
        .unwrap();
}

/// Static seeds: a node knows only addresses, not ids. It connects to whichever nodes of its mesh
/// answer there, and `wait_for_peers` returns once they are up; a seed of another mesh is refused.
#[tokio::test]
async fn seeds_by_address_alone_connect_and_readiness_waits_for_them() {
    let b = node_admitting("shop", |b| b).await;
    let c = node_admitting("shop", |b| b).await;
    let other = node_admitting("bank", |b| b).await;
    let a = node_admitting("shop", |builder| {
        builder
            .seed(b.local_addr().unwrap())
            .seed(c.local_addr().unwrap())
            .seed(other.local_addr().unwrap())
    })
    .await;
    within("two peers ready", a.wait_for_peers(2))
        .await
        .unwrap();
    let mut peers = a.connected_peers();
    peers.sort();
    let mut expected = vec![b.id(), c.id()];
    expected.sort();
    assert_eq!(
        peers, expected,
        "the bank node is refused, the shop nodes connect"
    );
    let mut inbox = c.receive("c").unwrap();
    let receipt = a.send(c.id(), "c", &b"via seed"[..]).await.unwrap();
    assert_eq!(
        &take_and_ack(&mut inbox, receipt).await.body[..],
        b"via seed"
    );
}
