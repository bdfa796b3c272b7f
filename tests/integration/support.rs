//! Shared test helpers: nodes on loopback, bounded waits.

use std::future::IntoFuture;
use std::time::Duration;

use weft::{Identity, Node, NodeAddr};

/// Upper bound for anything a test waits for; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::WARN)
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
