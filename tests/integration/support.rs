//! Shared test helpers: nodes on loopback, bounded waits.

use std::future::IntoFuture;
use std::time::Duration;

use weft::{Identity, Node, NodeAddr};

/// Upper bound for anything a test waits for; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

/// Logs at WARN, or as `RUST_LOG` says (e.g. `RUST_LOG=weft=debug`).
pub fn init_tracing() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::WARN));
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .with(filter)
        .try_init();
}

/// A node on 127.0.0.1 with a fresh identity, in mesh `mesh`.
pub async fn node(mesh: &str) -> Node {
    init_tracing();
    Node::builder()
        .mesh(mesh)
        .identity(Identity::generate().expect("identity"))
        .bind("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .expect("node starts")
}

pub fn addr(node: &Node) -> NodeAddr {
    node.addr().expect("bound")
}

/// Awaits `future`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, future: impl IntoFuture<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future.into_future()).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Takes the next message from `inbox`, settles it (the application is done with it) and waits
/// for `receipt`, which resolves only then. Returns the message.
pub async fn take_and_ack(inbox: &mut weft::Inbox, receipt: weft::Receipt) -> weft::Message {
    let message = within("delivery", inbox.recv()).await.expect("a message");
    inbox.settle();
    within("ack", receipt).await.expect("acknowledged");
    message
}

/// A node on 127.0.0.1 with its configuration adjusted by `configure`.
pub async fn node_with(mesh: &str, configure: impl FnOnce(&mut weft::NodeConfig)) -> Node {
    init_tracing();
    Node::builder()
        .mesh(mesh)
        .identity(Identity::generate().expect("identity"))
        .bind("127.0.0.1:0".parse().unwrap())
        .configure(configure)
        .start()
        .await
        .expect("node starts")
}

/// `count` nodes (configured by `configure`), every one connected to every other.
pub async fn mesh_with(
    name: &str,
    count: usize,
    configure: impl Fn(&mut weft::NodeConfig),
) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        nodes.push(node_with(name, &configure).await);
    }
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            a.add_peer(addr(b)).unwrap();
        }
    }
    for n in &nodes {
        within("full mesh", n.wait_for_peers(count - 1))
            .await
            .unwrap();
    }
    nodes
}

/// A fresh, empty directory under the system's temp dir, unique within this test run (`name`
/// makes it recognisable).
pub fn tempdir(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("weft-test-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
