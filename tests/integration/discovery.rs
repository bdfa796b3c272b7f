//! mDNS discovery between real nodes, with no configured peers.
//!
//! Safety: mDNS must never touch this machine's real network. Every test runs in a network
//! namespace it creates (only a loopback interface inside) AND restricts mdns-sd to IPv4 loopback.
//! The namespace matters because mdns-sd joins the multicast group on every interface when its
//! daemon starts, before the loopback-only selection applies. Creating a namespace needs root
//! (CAP_SYS_ADMIN), as in CI. Without it a test never falls back to the real network: it is
//! skipped with a message on stderr, except in CI (`CI` set), where that is a failure, so the
//! coverage cannot vanish silently. (See [`in_private_network`]; the interop test with avahi and
//! the hostile-announcement tests live in `discovery_interop.rs` and `discovery_admission.rs`.)

use std::future::{Future, IntoFuture};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use weft::{Identity, Interfaces, MdnsConfig, Node, NodeId, PeerEvent};

use crate::support::init_tracing;

/// Bound on discovering and connecting (RFC 6762 probing alone takes about 1 s).
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(20);

/// Skips the calling test with `why` (printed past the test harness's output capture), or fails
/// it in CI, where every discovery test must run.
pub fn skip_unless_ci(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("a discovery test")
        .to_owned();
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {why} (CI must run every discovery test)"
    );
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Runs `test` on a thread of its own inside a fresh network namespace with only loopback up, on
/// a current-thread runtime: every socket and thread the test creates (QUIC endpoints, the mDNS
/// daemon's thread) is created from that thread and so lives in the namespace. So does every
/// process it starts (a child inherits the namespace of the thread that starts it).
///
/// Without the privilege to create a namespace the test is skipped (failed in CI), never run
/// on the real network.
pub fn in_private_network<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let name = std::thread::current().name().map(str::to_owned);
    let mut thread = std::thread::Builder::new();
    if let Some(name) = name {
        thread = thread.name(name);
    }
    let thread = thread
        .spawn(move || {
            let outside = network_namespace("thread-self");
            if let Err(errno) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                skip_unless_ci(&format!(
                    "cannot create a network namespace ({errno}): mDNS tests need root \
                     (CAP_SYS_ADMIN) and never run on the real network"
                ));
                return;
            }
            let inside = network_namespace("thread-self");
            assert_ne!(
                inside, outside,
                "the test thread is in a new network namespace"
            );
            let status = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("run `ip link set lo up` (iproute2)");
            assert!(status.success(), "bring loopback up in the test namespace");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(test());
        })
        .expect("spawn the test thread");
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

fn network_namespace(task: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{task}/ns/net")).expect("read the network namespace")
}

/// Regression guard for the safety rule: no mDNS daemon thread of this process shares the network
/// namespace of the process's main thread (the machine's real network).
pub fn assert_no_mdns_daemon_on_the_real_network() {
    let real = network_namespace("self");
    for task in std::fs::read_dir("/proc/self/task").expect("list threads") {
        let path = task.expect("thread entry").path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if name.trim() != "mDNS_daemon" {
            continue;
        }
        if let Ok(namespace) = std::fs::read_link(path.join("ns/net")) {
            assert_ne!(namespace, real, "an mDNS daemon runs on the real network");
        }
    }
}

/// A fresh DNS-SD service type (name ≤ 15 bytes), so parallel runs and stale announcements of
/// earlier runs never meet.
pub fn fresh_service_type() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let salt = nanos ^ std::process::id().rotate_left(16) ^ rand_u32();
    format!("_weft-t{salt:08x}._udp.local.")
}

fn rand_u32() -> u32 {
    // A fresh identity is 32 random bytes; borrow four of them.
    let id = Identity::generate().expect("identity").node_id();
    let bytes = id.as_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// A node on 127.0.0.1 that finds its peers with mDNS on loopback only.
pub async fn discovering_node(mesh: &str, service_type: &str) -> Node {
    discovering_node_with(mesh, service_type, |builder| builder).await
}

/// [`discovering_node`], with the builder adjusted by `configure` (identity, secret, config).
pub async fn discovering_node_with(
    mesh: &str,
    service_type: &str,
    configure: impl FnOnce(weft::NodeBuilder) -> weft::NodeBuilder,
) -> Node {
    init_tracing();
    let builder = Node::builder()
        .mesh(mesh)
        .identity(Identity::generate().expect("identity"))
        .bind("127.0.0.1:0".parse().unwrap())
        .discovery_mdns(MdnsConfig {
            interfaces: Interfaces::LoopbackOnly,
            service_type: service_type.to_owned(),
        });
    configure(builder).start().await.expect("node starts")
}

pub async fn within_discovery<T>(what: &str, future: impl IntoFuture<Output = T>) -> T {
    match tokio::time::timeout(DISCOVERY_WAIT, future.into_future()).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DISCOVERY_WAIT:?} waiting for {what}"),
    }
}

/// Waits for the first event `matches` accepts.
pub async fn next_event(
    events: &mut broadcast::Receiver<PeerEvent>,
    what: &str,
    matches: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    within_discovery(what, async {
        loop {
            match events.recv().await {
                Ok(event) if matches(&event) => return event,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("events closed"),
            }
        }
    })
    .await
}

/// Every event received so far (without waiting).
pub fn drain(events: &mut broadcast::Receiver<PeerEvent>) -> Vec<PeerEvent> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    seen
}

pub fn discovered(event: &PeerEvent, who: NodeId) -> bool {
    matches!(event, PeerEvent::Discovered { peer, .. } if *peer == who)
}

pub async fn exchange_acknowledged_message(from: &Node, to: &Node) {
    let mut inbox = to.receive("hello").unwrap();
    let receipt = from
        .send(to.id(), "hello", &b"found you"[..])
        .await
        .unwrap();
    let message = within_discovery("message", inbox.recv()).await.unwrap();
    inbox.settle();
    let delivered = within_discovery("receipt", receipt).await.unwrap();
    assert_eq!(delivered.peer, to.id());
    assert_eq!(&message.body[..], b"found you");
    assert_eq!(message.header.id.producer, from.id());
}

/// Two nodes with no configured peers find each other and exchange an acknowledged message; a node
/// of another mesh announcing on the same service type is ignored.
#[test]
fn nodes_of_a_mesh_find_each_other_and_ignore_other_meshes() {
    in_private_network(|| async {
        let service_type = fresh_service_type();
        // The stranger announces first, so both nodes resolve it no later than each other.
        let stranger = discovering_node("other-mesh", &service_type).await;
        let mut stranger_events = stranger.events();
        let started = Instant::now();
        let a = discovering_node("shop", &service_type).await;
        let mut a_events = a.events();
        let b = discovering_node("shop", &service_type).await;
        assert_no_mdns_daemon_on_the_real_network();

        within_discovery("a connected to b", a.connected(b.id()))
            .await
            .unwrap();
        let a_to_b = started.elapsed();
        within_discovery("b connected to a", b.connected(a.id()))
            .await
            .unwrap();
        let both = started.elapsed();
        eprintln!("discovery: start → a connected to b {a_to_b:?}, both ways {both:?}");
        exchange_acknowledged_message(&a, &b).await;
        exchange_acknowledged_message(&b, &a).await;

        let found = next_event(&mut a_events, "a discovers b", |e| discovered(e, b.id())).await;
        let PeerEvent::Discovered { addrs, .. } = found else {
            unreachable!()
        };
        assert_eq!(addrs, vec![b.local_addr().unwrap()], "b's bound address");

        // Give the stranger's announcement (out before either node started) ample time to be seen.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let seen = drain(&mut a_events);
        assert!(
            !seen.iter().any(|e| discovered(e, stranger.id())),
            "another mesh is not reported: {seen:?}"
        );
        assert_eq!(a.connected_peers(), vec![b.id()]);
        assert_eq!(b.connected_peers(), vec![a.id()]);
        assert!(stranger.connected_peers().is_empty());
        let stranger_seen = drain(&mut stranger_events);
        assert!(
            !stranger_seen
                .iter()
                .any(|e| matches!(e, PeerEvent::Discovered { .. })),
            "the stranger finds nobody of its mesh: {stranger_seen:?}"
        );
        assert_eq!(a.metrics().received, 1);

        stranger.shutdown().await;
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// A node started after the others is found by them; when it leaves, they see it vanish (goodbye
/// packets) while its links just go down.
#[test]
fn a_late_joiner_is_found_and_a_leaver_vanishes() {
    in_private_network(|| async {
        let service_type = fresh_service_type();
        let a = discovering_node("shop", &service_type).await;
        let b = discovering_node("shop", &service_type).await;
        within_discovery("a connected to b", a.connected(b.id()))
            .await
            .unwrap();
        let mut a_events = a.events();

        let started = Instant::now();
        let late = discovering_node("shop", &service_type).await;
        assert_no_mdns_daemon_on_the_real_network();
        within_discovery("a connected to the late joiner", a.connected(late.id()))
            .await
            .unwrap();
        let a_to_late = started.elapsed();
        within_discovery("b connected to the late joiner", b.connected(late.id()))
            .await
            .unwrap();
        let all = started.elapsed();
        eprintln!("discovery: late joiner start → a connected {a_to_late:?}, a and b {all:?}");
        exchange_acknowledged_message(&late, &a).await;
        exchange_acknowledged_message(&b, &late).await;

        let late_id = late.id();
        let left = Instant::now();
        let vanished = async {
            next_event(
                &mut a_events,
                "the late joiner vanishes",
                |e| matches!(e, PeerEvent::Vanished { peer } if *peer == late_id),
            )
            .await;
            left.elapsed()
        };
        let ((), vanished) = tokio::join!(late.shutdown(), vanished);
        eprintln!(
            "discovery: shutdown → vanished {vanished:?} (shutdown done {:?})",
            left.elapsed()
        );

        a.shutdown().await;
        b.shutdown().await;
    });
}

/// A scan (announcing nothing) lists the nodes of every mesh with their ids, meshes, versions
/// and addresses, and sees a node's goodbye.
#[test]
fn a_scan_lists_nodes_of_every_mesh_and_sees_goodbyes() {
    in_private_network(|| async {
        use std::sync::{Arc, Mutex};
        use weft::discovery::{Discovery, ScanEvent};

        let service_type = fresh_service_type();
        let shop = discovering_node("shop", &service_type).await;
        let bank = discovering_node("bank", &service_type).await;
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let seen_tx = Arc::new(Mutex::new(seen_tx));
        let scanner = Discovery::scan(
            &MdnsConfig {
                interfaces: Interfaces::LoopbackOnly,
                service_type: service_type.clone(),
            },
            Arc::new(move |event| {
                let _ = seen_tx.lock().unwrap().send(event);
            }),
        )
        .expect("scan starts");

        let mut found = std::collections::BTreeMap::new();
        while found.len() < 2 {
            match within_discovery("both nodes seen", seen.recv())
                .await
                .unwrap()
            {
                ScanEvent::Seen(sighting) => {
                    found.insert(sighting.id, sighting);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        for (node, mesh) in [(&shop, "shop"), (&bank, "bank")] {
            let sighting = &found[&node.id()];
            assert_eq!(sighting.mesh, mesh);
            assert_eq!(sighting.addrs, vec![node.local_addr().unwrap()]);
            assert!(sighting.version_min <= sighting.version_max);
            // `weft discover`'s RTT column: a handshake with the announced key at its address.
            let rtt = weft::discovery::probe_rtt(
                sighting.addrs[0],
                sighting.id,
                std::time::Duration::from_secs(5),
            )
            .await
            .expect("the announced node answers the probe");
            assert!(rtt > std::time::Duration::ZERO);
        }

        bank.shutdown().await;
        loop {
            match within_discovery("the goodbye", seen.recv()).await.unwrap() {
                ScanEvent::Gone(id) => {
                    assert_eq!(id, bank.id());
                    break;
                }
                ScanEvent::Seen(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        scanner.shutdown().await;
        shop.shutdown().await;
    });
}

/// Twenty nodes started at once find each other: every node ends up connected to all nineteen
/// others with no configured peer. Prints how long that took (recorded in docs/BENCHMARKS.md).
#[test]
fn twenty_nodes_started_at_once_form_a_full_mesh() {
    in_private_network(|| async {
        const NODES: usize = 20;
        let service_type = fresh_service_type();
        let started = std::time::Instant::now();
        let mut nodes = Vec::with_capacity(NODES);
        for _ in 0..NODES {
            nodes.push(discovering_node("crowd", &service_type).await);
        }
        let all_started = started.elapsed();
        for node in &nodes {
            within_discovery("a full mesh", node.wait_for_peers(NODES - 1))
                .await
                .unwrap();
        }
        eprintln!(
            "discovery: {NODES} nodes started in {all_started:?}, full mesh after {:?}",
            started.elapsed()
        );
        let stopping = std::time::Instant::now();
        futures_util::future::join_all(nodes.iter().map(Node::shutdown)).await;
        eprintln!(
            "discovery: {NODES} nodes stopped in {:?}",
            stopping.elapsed()
        );
    });
}
