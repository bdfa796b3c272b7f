//! Hostile and unwelcome nodes found through mDNS: an announcement is only a hint, so a forged
//! record never yields a connection to an impostor nor evicts a verified address, and a node with
//! the wrong mesh secret is found but refused. Run in private network namespaces (see
//! `discovery.rs` for the safety rule).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};
use weft::proto::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use weft::{Identity, Node, NodeId, PeerEvent};

use crate::discovery::{
    assert_no_mdns_daemon_on_the_real_network, discovering_node_with,
    exchange_acknowledged_message, fresh_service_type, in_private_network, within_discovery,
};

/// Every event of a node since [`Recorder::start`], kept for checks after the fact.
struct Recorder {
    events: Arc<Mutex<Vec<PeerEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn start(node: &Node) -> Self {
        let mut receiver = node.events();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        let task = tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(event) => sink.lock().unwrap().push(event),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        panic!("the recorder missed {n} events")
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Self { events, task }
    }

    fn snapshot(&self) -> Vec<PeerEvent> {
        self.events.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// The first event from index `from` on that `matches` accepts, with its index.
    async fn wait_for(
        &self,
        from: usize,
        what: &str,
        matches: impl Fn(&PeerEvent) -> bool,
    ) -> (usize, PeerEvent) {
        within_discovery(what, async {
            loop {
                let found = self
                    .events
                    .lock()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, e)| matches(e))
                    .map(|(i, e)| (i, e.clone()));
                if let Some(found) = found {
                    return found;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Announces, on IPv4 loopback only, a Weft record claiming node `claimed` of `mesh` at `at`,
/// from a daemon of its own. The instance has a name of its own: nodes read the claimed id from
/// the `id` TXT record, never from the instance name.
fn forge_announcement(
    service_type: &str,
    claimed: NodeId,
    mesh: &str,
    at: SocketAddr,
) -> ServiceDaemon {
    let daemon = ServiceDaemon::new().expect("the forger's mDNS daemon starts");
    daemon.disable_interface(IfKind::All).expect("no interface");
    daemon
        .enable_interface(IfKind::LoopbackV4)
        .expect("IPv4 loopback only");
    let id = claimed.to_string();
    let versions = format!("{PROTOCOL_VERSION_MIN}-{PROTOCOL_VERSION_MAX}");
    let properties = [
        ("id", id.as_str()),
        ("mesh", mesh),
        ("v", versions.as_str()),
    ];
    let info = ServiceInfo::new(
        service_type,
        "forged",
        "impostor.local.",
        at.ip(),
        at.port(),
        &properties[..],
    )
    .expect("forged record");
    daemon.register(info).expect("forged announcement");
    daemon
}

async fn stop_forger(forger: ServiceDaemon) {
    if let Ok(status) = forger.shutdown() {
        let _ = tokio::time::timeout(Duration::from_secs(2), status.recv_async()).await;
    }
}

/// Binds a node with `identity` to `addr` (the address a node had until it just shut down), with
/// no discovery: a peer can only reach it at an address it already knew.
async fn restart_without_mdns(identity: Identity, mesh: &str, addr: SocketAddr) -> Node {
    // `shutdown` released the old node's socket: the address binds again at once.
    Node::builder()
        .mesh(mesh)
        .identity(identity)
        .bind(addr)
        .start()
        .await
        .unwrap_or_else(|e| panic!("cannot bind {addr} again after the shutdown: {e}"))
}

/// A forged announcement claims node A's id at the address of an impostor with another key. B,
/// which sees it before A exists, dials the impostor and fails the handshake (the id is pinned),
/// naming both ids. Once A announces itself, B connects to A, never to the impostor, and the
/// forged record does not evict A's address: after A restarts at the same address *without* mDNS,
/// B reconnects to it there.
#[test]
fn a_spoofed_announcement_never_connects_to_the_impostor_nor_evicts_the_real_address() {
    in_private_network(|| async {
        let service_type = fresh_service_type();
        let a_identity = Identity::generate().expect("identity");
        let a_id = a_identity.node_id();
        let impostor = crate::support::node("shop").await; // no mDNS, another key
        let impostor_events = Recorder::start(&impostor);
        let impostor_addr = impostor.local_addr().unwrap();
        let forger = forge_announcement(&service_type, a_id, "shop", impostor_addr);

        let fast_reconnect =
            |c: &mut weft::NodeConfig| c.reconnect_max = Duration::from_millis(500);
        let b = discovering_node_with("shop", &service_type, |builder| {
            builder.configure(fast_reconnect)
        })
        .await;
        let b_events = Recorder::start(&b);
        assert_no_mdns_daemon_on_the_real_network();

        // Only the forged record exists yet: B's dial reaches the impostor and TLS refuses it.
        let (_, failure) = b_events
            .wait_for(
                0,
                "B's dial to the impostor fails",
                |e| matches!(e, PeerEvent::ConnectFailed { peer, .. } if *peer == a_id),
            )
            .await;
        let PeerEvent::ConnectFailed {
            reason, refused, ..
        } = failure
        else {
            unreachable!()
        };
        assert!(!refused, "TLS fails before any hello: {reason}");
        assert!(
            reason.contains(&a_id.to_string()) && reason.contains(&impostor.id().to_string()),
            "the failure names the pinned and the presented id: {reason}"
        );

        // The real A appears; B connects to it.
        let a = discovering_node_with("shop", &service_type, |builder| {
            builder.identity(a_identity.clone())
        })
        .await;
        let a_addr = a.local_addr().unwrap();
        let (first_up, _) = b_events
            .wait_for(
                0,
                "B connected to A",
                |e| matches!(e, PeerEvent::Up { peer, .. } if *peer == a_id),
            )
            .await;
        exchange_acknowledged_message(&b, &a).await;
        assert_eq!(b.connected_peers(), vec![a_id]);
        // B may be connected by A's dial before it resolved A's own record; the point below is
        // what B keeps from that record, so wait for it.
        b_events
            .wait_for(0, "B resolving A's record", |e| {
                matches!(e, PeerEvent::Discovered { peer, addrs } if *peer == a_id && addrs == &vec![a_addr])
            })
            .await;

        // A leaves and comes back at the same address, no longer announcing itself: B finds it
        // there, the address learned from A's record having survived the forged one.
        let before_restart = b_events.len().max(first_up + 1);
        a.shutdown().await; // releases its UDP socket
        drop(a);
        b_events
            .wait_for(
                before_restart,
                "B sees A go down",
                |e| matches!(e, PeerEvent::Down { peer, .. } if *peer == a_id),
            )
            .await;
        let a = restart_without_mdns(a_identity, "shop", a_addr).await;
        b_events
            .wait_for(
                before_restart,
                "B reconnected to A",
                |e| matches!(e, PeerEvent::Up { peer, .. } if *peer == a_id),
            )
            .await;
        exchange_acknowledged_message(&b, &a).await;

        let b_seen = b_events.snapshot();
        let ups: Vec<SocketAddr> = b_seen
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Up { peer, addr } => {
                    assert_eq!(*peer, a_id, "B connects to nobody but A: {b_seen:?}");
                    Some(*addr)
                }
                _ => None,
            })
            .collect();
        assert!(ups.len() >= 2, "connected, then reconnected: {b_seen:?}");
        assert!(
            ups.iter().all(|addr| *addr == a_addr),
            "every connection is to A's address {a_addr}, none to the impostor's {impostor_addr}: {b_seen:?}"
        );
        assert!(
            b_seen.iter().any(|e| matches!(
                e,
                PeerEvent::Discovered { peer, addrs } if *peer == a_id && addrs == &vec![impostor_addr]
            )),
            "the forged record was seen: {b_seen:?}"
        );
        let impostor_seen = impostor_events.snapshot();
        assert!(
            !impostor_seen
                .iter()
                .any(|e| matches!(e, PeerEvent::Up { .. })),
            "the impostor never gets a connection: {impostor_seen:?}"
        );
        assert!(impostor.connected_peers().is_empty());
        assert_eq!(impostor.metrics().received, 0);
        assert_eq!(b.connected_peers(), vec![a_id]);

        stop_forger(forger).await;
        a.shutdown().await;
        b.shutdown().await;
        impostor.shutdown().await;
    });
}

/// Waits for a dial to `peer_id` refused at the hello for the mesh secret.
async fn refused_by(events: &Recorder, peer_id: NodeId, what: &str) {
    let (_, event) = events
        .wait_for(0, what, |e| {
            matches!(e, PeerEvent::ConnectFailed { peer, refused: true, .. } if *peer == peer_id)
        })
        .await;
    let PeerEvent::ConnectFailed { reason, .. } = event else {
        unreachable!()
    };
    assert!(
        reason.contains("NotAdmitted") && reason.contains("mesh secret"),
        "{what}: {reason}"
    );
}

/// The record carries no secret, so mDNS finds a node with the wrong mesh secret; it is refused
/// at the hello on both sides (whoever dials), with the reason, backs off instead of storming,
/// and never gets a link, while a node with the right secret connects.
#[test]
fn a_discovered_node_with_the_wrong_mesh_secret_is_refused() {
    in_private_network(|| async {
        let service_type = fresh_service_type();
        let guarded =
            discovering_node_with("shop", &service_type, |b| b.mesh_secret("s3cret")).await;
        let guarded_events = Recorder::start(&guarded);
        let intruder =
            discovering_node_with("shop", &service_type, |b| b.mesh_secret("guess")).await;
        let intruder_events = Recorder::start(&intruder);
        let friend =
            discovering_node_with("shop", &service_type, |b| b.mesh_secret("s3cret")).await;
        assert_no_mdns_daemon_on_the_real_network();

        within_discovery("the friend connected", friend.connected(guarded.id()))
            .await
            .unwrap();
        exchange_acknowledged_message(&friend, &guarded).await;

        refused_by(
            &intruder_events,
            guarded.id(),
            "the intruder's dial refused",
        )
        .await;
        refused_by(
            &guarded_events,
            intruder.id(),
            "the guarded node's dial refused",
        )
        .await;

        // Refused dials back off: a handful in a few seconds, not a storm.
        let refusals = |events: &Recorder| {
            events
                .snapshot()
                .iter()
                .filter(|e| matches!(e, PeerEvent::ConnectFailed { refused: true, .. }))
                .count()
        };
        let before = refusals(&intruder_events);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = refusals(&intruder_events) - before;
        assert!(during <= 12, "{during} refusals in 3 s: backoff failed");

        let intruder_seen = intruder_events.snapshot();
        assert!(
            !intruder_seen
                .iter()
                .any(|e| matches!(e, PeerEvent::Up { .. })),
            "the intruder gets no link (the friend refuses it too): {intruder_seen:?}"
        );
        let guarded_seen = guarded_events.snapshot();
        assert!(
            !guarded_seen
                .iter()
                .any(|e| matches!(e, PeerEvent::Up { peer, .. } if *peer == intruder.id())),
            "no link to the intruder: {guarded_seen:?}"
        );
        assert!(intruder.connected_peers().is_empty());
        assert_eq!(guarded.connected_peers(), vec![friend.id()]);

        intruder.shutdown().await;
        friend.shutdown().await;
        guarded.shutdown().await;
    });
}
