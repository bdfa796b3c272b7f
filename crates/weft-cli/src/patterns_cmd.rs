//! `weft pub`, `weft sub`, `weft req`, `weft rep`, `weft push`, `weft pull`: the messaging
//! patterns from a shell.
//!
//! Each command runs a short-lived node (an ephemeral identity, memory only, unless
//! `--data-dir` names one), connects to the given peers or seeds, and does one thing. Output is
//! one line per event, request or reply; errors are one sentence on stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft::{Identity, Message, Node, NodeAddr, NodeId};

/// How a pattern command joins the mesh.
#[derive(clap::Args, Debug, Clone)]
pub struct MeshArgs {
    /// Data directory (identity and spool); default: an ephemeral identity, memory only.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Mesh name; nodes of other meshes are refused.
    #[arg(long, default_value = "default")]
    mesh: String,
    /// Peers to connect to, as NODE_ID@IP:PORT (repeatable).
    #[arg(long = "peer")]
    peers: Vec<NodeAddr>,
    /// Addresses of nodes whose ids are not known (repeatable).
    #[arg(long = "seed")]
    seeds: Vec<SocketAddr>,
    /// How long to wait for the peers, subscribers or servers needed.
    #[arg(long, default_value_t = 10)]
    wait_secs: u64,
}

impl MeshArgs {
    async fn start(&self) -> Result<Node> {
        let mut builder = Node::builder().mesh(self.mesh.clone()).bind(self.bind);
        builder = match &self.data_dir {
            Some(dir) => builder.data_dir(dir),
            None => builder.identity(Identity::generate()?),
        };
        for peer in &self.peers {
            builder = builder.peer(peer.clone());
        }
        for seed in &self.seeds {
            builder = builder.seed(*seed);
        }
        let node = builder.start().await?;
        Ok(node)
    }

    fn wait(&self) -> Duration {
        Duration::from_secs(self.wait_secs)
    }

    /// Waits until every `--peer` (and as many peers as `--seed`s) is connected.
    async fn connected(&self, node: &Node) -> Result<()> {
        let wanted = self.peers.len() + self.seeds.len();
        if wanted == 0 {
            return Ok(());
        }
        tokio::time::timeout(self.wait(), node.wait_for_peers(wanted))
            .await
            .with_context(|| {
                format!(
                    "not connected to the {wanted} peer(s) within {} s: are they running, in mesh {:?}?",
                    self.wait_secs, self.mesh
                )
            })??;
        Ok(())
    }
}

/// Prints a message body as text, or its size if it is not UTF-8.
fn body_text(message: &Message) -> String {
    match std::str::from_utf8(&message.body) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("<{} bytes>", message.body.len()),
    }
}

async fn ctrl_c_or<T>(future: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::select! {
        value = future => Some(value),
        _ = tokio::signal::ctrl_c() => None,
    }
}

/// `weft sub PATTERN`: prints `TOPIC PUBLISHER BODY` per event.
pub async fn sub(mesh: MeshArgs, pattern: String, count: Option<u64>) -> Result<()> {
    let node = mesh.start().await?;
    println!("node {}", node.addr()?);
    mesh.connected(&node).await?;
    let mut subscription = node
        .subscribe(&pattern)
        .await
        .with_context(|| format!("cannot subscribe to {pattern:?}"))?;
    println!("subscribed to {pattern}");
    let mut received = 0;
    while count.is_none_or(|count| received < count) {
        let Some(Some(event)) = ctrl_c_or(subscription.recv()).await else {
            break;
        };
        println!(
            "{} {} {}",
            event.header.channel,
            event.header.id.producer.short(),
            body_text(&event)
        );
        received += 1;
    }
    drop(subscription);
    node.shutdown().await;
    Ok(())
}

/// `weft pub TOPIC TEXT`: publishes (after waiting for `--subscribers`) and waits until every
/// subscriber has it.
pub async fn publish(
    mesh: MeshArgs,
    topic: String,
    text: String,
    subscribers: usize,
    repeat: u64,
) -> Result<()> {
    let node = mesh.start().await?;
    mesh.connected(&node).await?;
    if subscribers > 0 {
        tokio::time::timeout(mesh.wait(), node.wait_for_subscribers(&topic, subscribers))
            .await
            .with_context(|| {
                format!(
                    "fewer than {subscribers} subscriber(s) of {topic:?} within {} s",
                    mesh.wait_secs
                )
            })??;
    }
    let mut reached = 0;
    for _ in 0..repeat {
        let published = node.publish(&topic, text.clone().into_bytes()).await?;
        reached = published.receipts.len() + published.local;
        tokio::time::timeout(mesh.wait(), published.delivered())
            .await
            .context("the subscribers did not acknowledge in time")??;
    }
    println!("published {repeat} event(s) on {topic} to {reached} subscriber(s)");
    node.shutdown().await;
    Ok(())
}

/// `weft rep SERVICE`: answers each request with `--reply TEXT` (or echoes it).
pub async fn rep(
    mesh: MeshArgs,
    service: String,
    reply: Option<String>,
    count: Option<u64>,
) -> Result<()> {
    let node = mesh.start().await?;
    println!("node {}", node.addr()?);
    mesh.connected(&node).await?;
    let mut requests = node
        .serve(&service)
        .await
        .with_context(|| format!("cannot serve {service:?}"))?;
    println!("serving {service}");
    let mut answered = 0;
    while count.is_none_or(|count| answered < count) {
        let Some(Some(request)) = ctrl_c_or(requests.recv()).await else {
            break;
        };
        println!(
            "{} {} {}",
            service,
            request.requester().short(),
            body_text(request.message())
        );
        let answer = match &reply {
            Some(text) => text.clone().into_bytes().into(),
            None => request.body().clone(),
        };
        if let Err(e) = request.reply(answer).await {
            eprintln!("reply not sent: {e}");
        }
        answered += 1;
    }
    drop(requests);
    node.shutdown().await;
    Ok(())
}

/// `weft req SERVICE TEXT`: waits for a server, asks, prints the reply.
pub async fn req(
    mesh: MeshArgs,
    service: String,
    text: String,
    to: Option<NodeId>,
    timeout_ms: u64,
) -> Result<()> {
    let node = mesh.start().await?;
    mesh.connected(&node).await?;
    if to.is_none() {
        tokio::time::timeout(mesh.wait(), node.wait_for_service(&service, 1))
            .await
            .with_context(|| {
                format!(
                    "no node answers {service:?} within {} s: start `weft rep {service}` and pass it as --peer",
                    mesh.wait_secs
                )
            })??;
    }
    let mut request = node
        .request(&service, text.into_bytes())
        .timeout(Duration::from_millis(timeout_ms));
    if let Some(to) = to {
        request = request.to(to);
    }
    let result = request.await;
    node.shutdown().await;
    match result {
        Ok(reply) => {
            println!("{}", body_text(&reply));
            Ok(())
        }
        Err(e) => bail!("request to {service:?} failed: {e}"),
    }
}

/// `weft pull QUEUE`: takes work items one by one, printing `QUEUE PRODUCER BODY`.
pub async fn pull(
    mesh: MeshArgs,
    queue: String,
    credit: Option<u32>,
    count: Option<u64>,
) -> Result<()> {
    let node = mesh.start().await?;
    println!("node {}", node.addr()?);
    mesh.connected(&node).await?;
    let mut puller = node
        .pull_with(&queue, weft::PullOptions { credit })
        .await
        .with_context(|| format!("cannot pull from {queue:?}"))?;
    println!("pulling from {queue}");
    let mut taken = 0;
    while count.is_none_or(|count| taken < count) {
        let Some(Some(item)) = ctrl_c_or(puller.recv()).await else {
            break;
        };
        println!(
            "{} {} {}",
            item.header.channel,
            item.header.id.producer.short(),
            body_text(&item)
        );
        taken += 1;
    }
    // Done with the last one: acknowledge it before leaving.
    puller.settle();
    drop(puller);
    node.shutdown().await;
    Ok(())
}

/// `weft push QUEUE TEXT`: hands the item to one worker (waiting for one with credit); with
/// `--key`, to the key's owner, in order.
pub async fn push(
    mesh: MeshArgs,
    queue: String,
    key: Option<String>,
    text: String,
    repeat: u64,
) -> Result<()> {
    let node = mesh.start().await?;
    mesh.connected(&node).await?;
    for _ in 0..repeat {
        let body = text.clone().into_bytes();
        let pushed = async {
            match &key {
                Some(key) => {
                    node.push_keyed(&queue, key.clone().into_bytes(), body)
                        .await
                }
                None => node.push(&queue, body).await,
            }
        };
        tokio::time::timeout(mesh.wait(), pushed)
            .await
            .with_context(|| {
                format!(
                    "no worker of {queue:?} took the item within {} s: start `weft pull {queue}` and pass it as --peer",
                    mesh.wait_secs
                )
            })??;
    }
    println!("pushed {repeat} item(s) to {queue}");
    node.shutdown().await;
    Ok(())
}
