//! `weft pub`, `weft sub`, `weft req`, `weft rep`, `weft push`, `weft pull`: the messaging
//! patterns from a shell.
//!
//! Each command runs a short-lived node (an ephemeral identity, memory only, unless
//! `--data-dir` names one), connects to the given peers or seeds, and does one thing. Output is
//! one line per event, request or reply; errors are one sentence on stderr.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use weft::admin::AdminServer;
use weft::{Identity, Message, Node, NodeAddr, NodeConfig, NodeId};

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
    /// Serve `/metrics` (Prometheus) and `/status` (JSON, for `weft status`) over HTTP on this
    /// address; port 0 takes a free one, named by the line `metrics on http://ADDR/metrics`.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// One JSON object per output line instead of text: status lines as `{"node": ..}`,
    /// `{"subscribed": ..}` and the like, each message as an object with its channel, id,
    /// headers and body (`body` as text, or `body_hex` when it is not UTF-8).
    #[arg(long)]
    json: bool,
}

/// What `weft pub`, `weft req` and `weft push` set on every message they send (see
/// `weft::MessageOptions`).
#[derive(clap::Args, Debug, Clone)]
pub struct OptionArgs {
    /// An application header on every message, as NAME=VALUE (repeatable); the receiver
    /// prints it with `--json`.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// The producer's idempotency key on every message: the receiving node hands its
    /// application only the first message of this node with the key (so `--repeat 3` with a
    /// key is processed once).
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

impl OptionArgs {
    fn options(&self) -> weft::MessageOptions {
        let mut options = weft::MessageOptions::new();
        for (name, value) in &self.headers {
            options = options.header(name.clone(), value.clone().into_bytes());
        }
        if let Some(key) = &self.idempotency_key {
            options = options.idempotency_key(key.clone().into_bytes());
        }
        options
    }
}

/// `--header NAME=VALUE`, the name checked by the header rules.
fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    weft::proto::message::check_header(name, value.as_bytes()).map_err(|e| e.to_string())?;
    Ok((name.to_owned(), value.to_owned()))
}

/// How `weft pub` and `weft sub` take part in the gossip trees of pub/sub.
#[derive(clap::Args, Debug, Clone)]
pub struct GossipArgs {
    /// Children of each node in an event's relay tree: a publisher sends each event to at most
    /// N subscribers itself and each relays it to at most N more [default: 8]. Relays split
    /// with their own value, so give every publisher and subscriber the same one.
    #[arg(long, value_name = "N", value_parser = parse_gossip_fanout)]
    gossip_fanout: Option<NonZeroUsize>,
}

impl GossipArgs {
    fn apply(&self, config: &mut NodeConfig) {
        if let Some(fanout) = self.gossip_fanout {
            config.patterns.gossip_fanout = fanout.get();
        }
    }
}

/// `--gossip-fanout`: a whole number of at least 1.
fn parse_gossip_fanout(text: &str) -> Result<NonZeroUsize, String> {
    let fanout: usize = text
        .parse()
        .map_err(|e| format!("{text:?} is not a whole number: {e}"))?;
    NonZeroUsize::new(fanout).ok_or_else(|| {
        "0 is not a fan-out: every node of a gossip tree sends an event on to at least 1 \
         subscriber (the default is 8)"
            .to_owned()
    })
}

/// A pattern command's node, with its admin endpoint if `--metrics` asked for one.
struct Joined {
    node: Node,
    admin: Option<AdminServer>,
}

impl Joined {
    /// Prints `node ID@ADDR` (with `node_line`: what the long-running commands print first, for
    /// others to pass as `--peer`), then `metrics on http://ADDR/metrics, status on /status`
    /// if `--metrics` asked for the endpoint.
    fn announce(&self, mesh: &MeshArgs, node_line: bool) -> Result<()> {
        if node_line {
            let addr = self.node.addr()?;
            mesh.say(
                || format!("node {addr}"),
                || json!({ "node": addr.to_string() }),
            );
        }
        if let Some(admin) = &self.admin {
            let at = admin.local_addr();
            mesh.say(
                || format!("metrics on http://{at}/metrics, status on /status"),
                || json!({ "metrics": format!("http://{at}/metrics"), "status": format!("http://{at}/status") }),
            );
        }
        Ok(())
    }

    /// Stops the admin endpoint, then the node.
    async fn leave(self) {
        if let Some(admin) = self.admin {
            admin.shutdown().await;
        }
        self.node.shutdown().await;
    }
}

impl MeshArgs {
    /// Prints one output line: `text`, or with `--json` the object `value`.
    fn say(&self, text: impl FnOnce() -> String, value: impl FnOnce() -> serde_json::Value) {
        if self.json {
            println!("{}", value());
        } else {
            println!("{}", text());
        }
    }

    /// Prints a message: `text`, or with `--json` the message as an object (see [`message_json`]).
    fn print_message(&self, text: impl FnOnce() -> String, message: &Message) {
        self.say(text, || message_json(message));
    }

    async fn start(&self) -> Result<Joined> {
        self.start_with(|_| {}).await
    }

    /// Starts the node with `configure` applied to its configuration, and the admin endpoint.
    async fn start_with(&self, configure: impl FnOnce(&mut NodeConfig)) -> Result<Joined> {
        let mut builder = Node::builder()
            .mesh(self.mesh.clone())
            .bind(self.bind)
            .configure(configure);
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
        let admin = match self.metrics {
            Some(addr) => {
                let server = weft::admin::serve(node.clone(), addr)
                    .await
                    .with_context(|| {
                        format!("cannot serve metrics on {addr} (is the port in use?)")
                    })?;
                Some(server)
            }
            None => None,
        };
        Ok(Joined { node, admin })
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

/// A message as JSON: channel, id (producer, stream, seq), kind, creation time, attempt,
/// headers, and the body as `body` (UTF-8 text) or `body_hex`.
fn message_json(message: &Message) -> serde_json::Value {
    let header = &message.header;
    let mut object = serde_json::Map::new();
    object.insert("channel".into(), json!(header.channel.as_str()));
    object.insert("producer".into(), json!(header.id.producer.to_string()));
    object.insert("stream".into(), json!(header.id.stream.to_string()));
    object.insert("seq".into(), json!(header.id.seq));
    object.insert(
        "kind".into(),
        json!(format!("{:?}", header.kind).to_lowercase()),
    );
    object.insert("created_unix_ms".into(), json!(header.created_unix_ms));
    object.insert("attempt".into(), json!(header.attempt));
    let headers: Vec<serde_json::Value> = header
        .headers()
        .iter()
        .map(|(name, value)| {
            let mut entry = serde_json::Map::new();
            entry.insert("name".into(), json!(name));
            insert_bytes(&mut entry, "value", value);
            serde_json::Value::Object(entry)
        })
        .collect();
    object.insert("headers".into(), json!(headers));
    insert_bytes(&mut object, "body", &message.body);
    serde_json::Value::Object(object)
}

/// `bytes` under `name` as text, or under `NAME_hex` when they are not UTF-8.
fn insert_bytes(object: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => object.insert(name.to_owned(), json!(text)),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            object.insert(format!("{name}_hex"), json!(hex))
        }
    };
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
pub async fn sub(
    mesh: MeshArgs,
    gossip: GossipArgs,
    pattern: String,
    count: Option<u64>,
) -> Result<()> {
    let joined = mesh.start_with(|config| gossip.apply(config)).await?;
    joined.announce(&mesh, true)?;
    let node = &joined.node;
    mesh.connected(node).await?;
    let mut subscription = node
        .subscribe(&pattern)
        .await
        .with_context(|| format!("cannot subscribe to {pattern:?}"))?;
    mesh.say(
        || format!("subscribed to {pattern}"),
        || json!({ "subscribed": pattern }),
    );
    let mut received = 0;
    while count.is_none_or(|count| received < count) {
        let Some(Some(event)) = ctrl_c_or(subscription.recv()).await else {
            break;
        };
        mesh.print_message(
            || {
                format!(
                    "{} {} {}",
                    event.header.channel,
                    event.header.id.producer.short(),
                    body_text(&event)
                )
            },
            &event,
        );
        received += 1;
    }
    drop(subscription);
    joined.leave().await;
    Ok(())
}

/// `weft pub TOPIC TEXT`: publishes (after waiting for `--subscribers`, one by default), each
/// event once its first hops acknowledged the one before; fails when an event reached nobody
/// (unless `--subscribers 0`). `TEXT` `-` publishes each line of stdin as an event, until its
/// end.
pub async fn publish(
    mesh: MeshArgs,
    gossip: GossipArgs,
    send: OptionArgs,
    topic: String,
    text: String,
    subscribers: usize,
    repeat: u64,
) -> Result<()> {
    let from_stdin = text == "-";
    if from_stdin && repeat != 1 {
        bail!("--repeat does not go with `-` (events from stdin): repeat the lines instead");
    }
    let joined = mesh.start_with(|config| gossip.apply(config)).await?;
    joined.announce(&mesh, false)?;
    let node = &joined.node;
    mesh.connected(node).await?;
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
    let mut published = 0u64;
    let mut reached = 0;
    let options = send.options();
    if from_stdin {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.context("cannot read stdin")? {
            reached = publish_one(&mesh, node, &topic, line.into_bytes(), &options).await?;
            published += 1;
            reached_someone(reached, subscribers, &topic)?;
        }
    } else {
        for _ in 0..repeat {
            reached = publish_one(&mesh, node, &topic, text.clone().into_bytes(), &options).await?;
            published += 1;
            reached_someone(reached, subscribers, &topic)?;
        }
    }
    mesh.say(
        || format!("published {published} event(s) on {topic} to {reached} subscriber(s)"),
        || json!({ "published": published, "topic": topic, "subscribers": reached }),
    );
    joined.leave().await;
    Ok(())
}

/// An event that reached no subscriber is an error unless none was asked for (the subscribers
/// waited for may have left since).
fn reached_someone(reached: usize, subscribers: usize, topic: &str) -> Result<()> {
    if reached == 0 && subscribers > 0 {
        bail!("an event on {topic:?} reached no subscriber (they left); --subscribers 0 publishes to nobody without failing");
    }
    Ok(())
}

/// Publishes one event and waits for its first hops' acknowledgements (each also means the
/// copies that hop relays are accepted); returns the subscribers it was addressed to, first
/// hops, relayed and local.
async fn publish_one(
    mesh: &MeshArgs,
    node: &Node,
    topic: &str,
    body: Vec<u8>,
    options: &weft::MessageOptions,
) -> Result<usize> {
    let published = node.publish_with(topic, body, options).await?;
    let reached = tokio::time::timeout(mesh.wait(), published.delivered())
        .await
        .context("the subscribers did not acknowledge in time")??;
    Ok(reached)
}

/// `weft rep SERVICE`: answers each request with `--reply TEXT` (or echoes it).
pub async fn rep(
    mesh: MeshArgs,
    service: String,
    reply: Option<String>,
    count: Option<u64>,
) -> Result<()> {
    let joined = mesh.start().await?;
    joined.announce(&mesh, true)?;
    let node = &joined.node;
    mesh.connected(node).await?;
    let mut requests = node
        .serve(&service)
        .await
        .with_context(|| format!("cannot serve {service:?}"))?;
    mesh.say(
        || format!("serving {service}"),
        || json!({ "serving": service }),
    );
    let mut answered = 0;
    while count.is_none_or(|count| answered < count) {
        let Some(Some(request)) = ctrl_c_or(requests.recv()).await else {
            break;
        };
        mesh.print_message(
            || {
                format!(
                    "{} {} {}",
                    service,
                    request.requester().short(),
                    body_text(request.message())
                )
            },
            request.message(),
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
    joined.leave().await;
    Ok(())
}

/// `weft req SERVICE TEXT`: waits for a server, asks, prints the reply.
pub async fn req(
    mesh: MeshArgs,
    send: OptionArgs,
    service: String,
    text: String,
    to: Option<NodeId>,
    timeout_ms: u64,
) -> Result<()> {
    let joined = mesh.start().await?;
    joined.announce(&mesh, false)?;
    let node = &joined.node;
    mesh.connected(node).await?;
    if to.is_none() {
        // Once the connected peers' interest is known, a mesh without the service fails at
        // once instead of after `--wait-secs`.
        tokio::time::timeout(mesh.wait(), node.wait_for_interest())
            .await
            .context("the connected peers did not announce their interest in time")??;
        let served = tokio::time::timeout(Duration::ZERO, node.wait_for_service(&service, 1))
            .await
            .is_ok_and(|ready| ready.is_ok());
        if !served {
            bail!(
                "no node answers {service:?} among the connected ones: start `weft rep {service}` and pass it as --peer"
            );
        }
    }
    let mut request = node
        .request(&service, text.into_bytes())
        .timeout(Duration::from_millis(timeout_ms))
        .options(send.options());
    if let Some(to) = to {
        request = request.to(to);
    }
    let result = request.await;
    joined.leave().await;
    match result {
        Ok(reply) => {
            mesh.print_message(|| body_text(&reply), &reply);
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
    let joined = mesh.start().await?;
    joined.announce(&mesh, true)?;
    let node = &joined.node;
    mesh.connected(node).await?;
    let mut puller = node
        .pull_with(&queue, weft::PullOptions { credit })
        .await
        .with_context(|| format!("cannot pull from {queue:?}"))?;
    mesh.say(
        || format!("pulling from {queue}"),
        || json!({ "pulling": queue }),
    );
    let mut taken = 0;
    while count.is_none_or(|count| taken < count) {
        let Some(Some(item)) = ctrl_c_or(puller.recv()).await else {
            break;
        };
        mesh.print_message(
            || {
                format!(
                    "{} {} {}",
                    item.header.channel,
                    item.header.id.producer.short(),
                    body_text(&item)
                )
            },
            &item,
        );
        taken += 1;
    }
    // Done with the last one: acknowledge it before leaving.
    puller.settle();
    drop(puller);
    joined.leave().await;
    Ok(())
}

/// What `weft push` pushes, besides where and with which options.
#[derive(Debug)]
pub struct Push {
    /// The shard key of every item (`--key`).
    pub key: Option<String>,
    /// Each stdin line is `KEY TEXT` (`--keyed-lines`).
    pub keyed_lines: bool,
    /// Workers to wait for before the first push.
    pub workers: usize,
    /// The item text; `-`: each stdin line.
    pub text: String,
    /// How many times to push it.
    pub repeat: u64,
}

/// `weft push QUEUE TEXT`: hands the item to one worker (waiting for one with credit); with
/// `--key`, to the key's owner, in order.
///
/// `TEXT` `-` pushes each line of stdin as an item, until its end; with `keyed_lines`, a line is
/// `KEY TEXT` (its first word the shard key).
pub async fn push(mesh: MeshArgs, send: OptionArgs, queue: String, push: Push) -> Result<()> {
    let Push {
        key,
        keyed_lines,
        workers,
        text,
        repeat,
    } = push;
    let from_stdin = text == "-";
    if from_stdin && repeat != 1 {
        bail!("--repeat does not go with `-` (items from stdin): repeat the lines instead");
    }
    if keyed_lines && (!from_stdin || key.is_some()) {
        bail!("--keyed-lines takes each item's key from its line: it needs `-` and no --key");
    }
    let joined = mesh.start().await?;
    joined.announce(&mesh, false)?;
    let node = &joined.node;
    mesh.connected(node).await?;
    if workers > 0 {
        tokio::time::timeout(mesh.wait(), node.wait_for_workers(&queue, workers))
            .await
            .with_context(|| {
                format!(
                    "fewer than {workers} worker(s) of {queue:?} within {} s",
                    mesh.wait_secs
                )
            })??;
    }
    let mut pushed = 0u64;
    let options = send.options();
    if from_stdin {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.context("cannot read stdin")? {
            let (line_key, body) = match line.split_once(' ') {
                Some((k, rest)) if keyed_lines => (Some(k.to_owned()), rest.to_owned()),
                _ if keyed_lines => bail!("line {:?} has no `KEY TEXT`", line),
                _ => (key.clone(), line),
            };
            push_one(&mesh, node, &queue, line_key, body.into_bytes(), &options).await?;
            pushed += 1;
        }
    } else {
        for _ in 0..repeat {
            let body = text.clone().into_bytes();
            push_one(&mesh, node, &queue, key.clone(), body, &options).await?;
            pushed += 1;
        }
    }
    mesh.say(
        || format!("pushed {pushed} item(s) to {queue}"),
        || json!({ "pushed": pushed, "queue": queue }),
    );
    joined.leave().await;
    Ok(())
}

/// Pushes one item (keyed: to the key's owner), waiting at most `--wait-secs` for a worker.
async fn push_one(
    mesh: &MeshArgs,
    node: &Node,
    queue: &str,
    key: Option<String>,
    body: Vec<u8>,
    options: &weft::MessageOptions,
) -> Result<()> {
    let pushed = async {
        match key {
            Some(key) => {
                node.push_keyed_with(queue, key.into_bytes(), body, options)
                    .await
            }
            None => node.push_with(queue, body, options).await,
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_as_name_value_and_bad_names_are_refused() {
        assert_eq!(
            parse_header("trace-id=a=b"),
            Ok(("trace-id".to_owned(), "a=b".to_owned()))
        );
        assert!(parse_header("no-equals").is_err());
        assert!(parse_header("has space=x").is_err());
        assert!(parse_header("weft-idempotency-key=x").is_err());
    }

    #[test]
    fn bytes_are_text_when_they_are_utf8_and_hex_otherwise() {
        let mut object = serde_json::Map::new();
        insert_bytes(&mut object, "body", "naïve \"quoted\"".as_bytes());
        insert_bytes(&mut object, "key", &[0xff, 0x00, 0x7f]);
        assert_eq!(
            serde_json::Value::Object(object),
            json!({ "body": "naïve \"quoted\"", "key_hex": "ff007f" })
        );
    }
}
