//! The `weft` command: identities, a listening node, one-shot sends, pub/sub and
//! request/response from a shell, spool inspection and benchmarks.

mod bench;
mod config_file;
mod patterns_cmd;
mod spool_cmd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use weft::{Identity, Node, NodeAddr, Priority};

#[derive(Parser, Debug)]
#[command(name = "weft", version, about = "Weft: brokerless messaging over QUIC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create (on first use) or show the node identity kept in a data directory.
    Id {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Run a node and print every message it receives.
    Listen {
        /// The node's data directory (identity).
        #[arg(long)]
        data_dir: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7450")]
        bind: SocketAddr,
        /// Mesh name; nodes of other meshes are refused.
        #[arg(long, default_value = "default")]
        mesh: String,
        /// Peers to connect to, as NODE_ID@IP:PORT.
        #[arg(long = "peer")]
        peers: Vec<NodeAddr>,
        /// Exit after this many messages (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Send one message to a node and wait for its acknowledgement.
    Send {
        /// The node's data directory (identity).
        #[arg(long)]
        data_dir: PathBuf,
        /// The receiver, as NODE_ID@IP:PORT.
        #[arg(long)]
        to: NodeAddr,
        /// Channel to send on.
        #[arg(long)]
        channel: String,
        /// Mesh name; must match the receiver's.
        #[arg(long, default_value = "default")]
        mesh: String,
        /// UDP address to send from.
        #[arg(long, default_value = "0.0.0.0:0")]
        bind: SocketAddr,
        /// Give up after this many seconds without an acknowledgement (counted from the due
        /// time with --delay).
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
        /// Deliver not before this delay from now (sender's clock): e.g. 500ms, 5s, 2m, 1h, 3d;
        /// at most 30 days. The message is durable at once; if this command stops before the
        /// due time, the next node started on the same --data-dir delivers it.
        #[arg(long, value_name = "DURATION", value_parser = parse_delay)]
        delay: Option<Duration>,
        /// Priority: `high`, `normal`, `low` (alias `bulk`) or 0-255 (4 is normal). Above
        /// normal travels in the high lane, below it in the bulk lane, each FIFO on its own.
        #[arg(long, default_value = "normal", value_parser = parse_priority)]
        priority: Priority,
        /// The message text.
        text: String,
    },
    /// Run a node: connect to peers, consume whatever arrives, show live rates, and serve
    /// Prometheus metrics and a JSON status. Settings come from flags and/or `--config FILE`.
    Node(config_file::NodeArgs),
    /// List the Weft nodes announcing themselves with mDNS (any mesh), live or once.
    Discover {
        /// Only nodes of this mesh.
        #[arg(long)]
        mesh: Option<String>,
        /// Listen for `--window-secs`, print once and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// How long `--once` listens.
        #[arg(long, default_value_t = 3)]
        window_secs: u64,
        /// Print JSON: an array of objects with `node_id`, `mesh`, `addrs`, `versions`,
        /// `last_seen_ms_ago`, `rtt_us` (round trip of a handshake probe; null without answer).
        #[arg(long)]
        json: bool,
        /// Restrict mDNS to this interface (repeatable; `lo` for loopback only).
        #[arg(long = "mdns-interface")]
        mdns_interfaces: Vec<String>,
    },
    /// Show a running node's status (peers and counters), read from its `--metrics` endpoint.
    Status {
        /// The node's metrics address, as given to `weft node --metrics`.
        #[arg(long)]
        metrics: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure throughput and latency between two processes on loopback.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
    /// Inspect a stopped node's spool: pending messages, dead letters; replay or purge them.
    Spool {
        #[command(subcommand)]
        which: spool_cmd::SpoolCommand,
    },
    /// Subscribe to a topic pattern (`*` one segment, `**` the rest) and print each event.
    Sub {
        #[command(flatten)]
        mesh: patterns_cmd::MeshArgs,
        #[command(flatten)]
        gossip: patterns_cmd::GossipArgs,
        /// Topic pattern, e.g. `orders/*`.
        pattern: String,
        /// Exit after this many events (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Publish an event and wait until the subscribers it is sent to acknowledged it (they
    /// relay it to the rest).
    Pub {
        #[command(flatten)]
        mesh: patterns_cmd::MeshArgs,
        #[command(flatten)]
        gossip: patterns_cmd::GossipArgs,
        #[command(flatten)]
        send: patterns_cmd::OptionArgs,
        /// Wait for at least this many subscribers before publishing, and fail if an event
        /// reaches none; 0 publishes at once, even to nobody.
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
        /// Publish the event this many times.
        #[arg(long, default_value_t = 1)]
        repeat: u64,
        /// Topic, e.g. `orders/created`.
        topic: String,
        /// The event text; `-` publishes each line of stdin as an event, until its end.
        text: String,
    },
    /// Answer requests for a service (with `--reply TEXT`, or echo them).
    Rep {
        #[command(flatten)]
        mesh: patterns_cmd::MeshArgs,
        /// Answer every request with this text (default: echo the request).
        #[arg(long)]
        reply: Option<String>,
        /// Exit after this many requests (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// Service name.
        service: String,
    },
    /// Send a request to a service and print the reply.
    Req {
        #[command(flatten)]
        mesh: patterns_cmd::MeshArgs,
        #[command(flatten)]
        send: patterns_cmd::OptionArgs,
        /// Ask this node (its id) instead of any server of the service.
        #[arg(long)]
        to: Option<weft::NodeId>,
        /// Give up after this many milliseconds without a reply.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Service name.
        service: String,
        /// The request text.
        text: String,
    },
    /// Take items from a work queue as one of its competing workers, printing each.
    Pull {
        #[command(flatten)]
        mesh: patterns_cmd::MeshArgs,
        /// Most items a producer may have sent this worker unacknowledged.
        #[arg(long)]
        credit: Option<u32>,
        /// Exit after this many items (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// Queue name.
        queue: String,
    },
    /// Push an item to a work queue: exactly one worker gets it.
    Push {
        #[command(flatten)]
        mesh: patterns_cmd::MeshArgs,
        #[command(flatten)]
        send: patterns_cmd::OptionArgs,
        /// Push the item this many times.
        #[arg(long, default_value_t = 1)]
        repeat: u64,
        /// Shard key: items with the same key go to one worker, in order.
        #[arg(long)]
        key: Option<String>,
        /// With TEXT `-`: each line is `KEY TEXT`, its first word the item's shard key.
        #[arg(long)]
        keyed_lines: bool,
        /// Wait for this many workers of the queue before the first push.
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Queue name.
        queue: String,
        /// The item text; `-` pushes each line of stdin as an item.
        text: String,
    },
    /// The receiving process of `weft bench` (started by it; not for direct use).
    #[command(hide = true)]
    BenchPeer(bench::PeerArgs),
    /// Spins threads at whatever priority it was started with (`bench --keep-cpus-awake`).
    #[command(hide = true)]
    BenchSpin {
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        seconds: u64,
    },
}

fn init_tracing(default: tracing::Level) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::from_level(default)));
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench { which } => bench::run(which),
        Command::BenchPeer(args) => bench::run_peer(args),
        Command::BenchSpin { threads, seconds } => bench::spin(threads, seconds),
        Command::Spool { which } => spool_cmd::run(which),
        other => {
            init_tracing(tracing::Level::INFO);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(run(other)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Id { data_dir } => {
            let identity = Identity::load_or_create(&data_dir)?;
            println!("{}", identity.node_id());
            Ok(())
        }
        Command::Listen {
            data_dir,
            bind,
            mesh,
            peers,
            count,
        } => listen(data_dir, bind, mesh, peers, count).await,
        Command::Send {
            data_dir,
            to,
            channel,
            mesh,
            bind,
            timeout_secs,
            delay,
            priority,
            text,
        } => {
            let target = SendTarget {
                data_dir,
                to,
                channel,
                mesh,
                bind,
                priority,
            };
            send(target, timeout_secs, delay, text).await
        }
        Command::Node(args) => run_node(args.resolve()?).await,
        Command::Status { metrics, json } => status(metrics, json).await,
        Command::Discover {
            mesh,
            once,
            window_secs,
            json,
            mdns_interfaces,
        } => {
            let config = weft::MdnsConfig {
                interfaces: mdns_interfaces_from(&mdns_interfaces),
                ..Default::default()
            };
            let window = once.then(|| Duration::from_secs(window_secs));
            discover(config, mesh, window, json).await
        }
        Command::Sub {
            mesh,
            gossip,
            pattern,
            count,
        } => patterns_cmd::sub(mesh, gossip, pattern, count).await,
        Command::Pub {
            mesh,
            gossip,
            send,
            subscribers,
            repeat,
            topic,
            text,
        } => patterns_cmd::publish(mesh, gossip, send, topic, text, subscribers, repeat).await,
        Command::Rep {
            mesh,
            reply,
            count,
            service,
        } => patterns_cmd::rep(mesh, service, reply, count).await,
        Command::Req {
            mesh,
            send,
            to,
            timeout_ms,
            service,
            text,
        } => patterns_cmd::req(mesh, send, service, text, to, timeout_ms).await,
        Command::Pull {
            mesh,
            credit,
            count,
            queue,
        } => patterns_cmd::pull(mesh, queue, credit, count).await,
        Command::Push {
            mesh,
            send,
            repeat,
            key,
            keyed_lines,
            workers,
            queue,
            text,
        } => {
            let push = patterns_cmd::Push {
                key,
                keyed_lines,
                workers,
                text,
                repeat,
            };
            patterns_cmd::push(mesh, send, queue, push).await
        }
        Command::Bench { .. }
        | Command::BenchPeer(_)
        | Command::BenchSpin { .. }
        | Command::Spool { .. } => {
            unreachable!("handled before the runtime")
        }
    }
}

async fn listen(
    data_dir: PathBuf,
    bind: SocketAddr,
    mesh: String,
    peers: Vec<NodeAddr>,
    count: Option<u64>,
) -> Result<()> {
    let mut builder = Node::builder().mesh(mesh).data_dir(&data_dir).bind(bind);
    for peer in peers {
        builder = builder.peer(peer);
    }
    let node = builder.start().await?;
    let mut inbox = node.receive_all()?;
    println!("listening as {}", node.addr()?);
    let mut received = 0u64;
    loop {
        let message = tokio::select! {
            message = inbox.recv() => message,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(message) = message else { break };
        let header = &message.header;
        match std::str::from_utf8(&message.body) {
            Ok(text) => println!(
                "[{}] {} #{}: {text}",
                header.channel,
                header.id.producer.short(),
                header.id.seq
            ),
            Err(_) => println!(
                "[{}] {} #{}: <{} bytes>",
                header.channel,
                header.id.producer.short(),
                header.id.seq,
                message.body.len()
            ),
        }
        received += 1;
        if count.is_some_and(|count| received >= count) {
            break;
        }
    }
    node.shutdown().await;
    Ok(())
}

/// Where `weft send` sends from and to.
struct SendTarget {
    data_dir: PathBuf,
    to: NodeAddr,
    channel: String,
    mesh: String,
    bind: SocketAddr,
    priority: Priority,
}

/// A priority: `high`, `normal`, `low` / `bulk`, or a number 0-255.
fn parse_priority(text: &str) -> Result<Priority, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "high" => Ok(Priority::HIGH),
        "normal" => Ok(Priority::NORMAL),
        "low" | "bulk" => Ok(Priority::LOW),
        number => number
            .parse::<u8>()
            .map(Priority)
            .map_err(|_| format!("{text:?} is not a priority: high, normal, low (bulk) or 0-255")),
    }
}

/// A delay: a whole number with a unit (`ms`, `s`, `m`, `h`, `d`), or `0`.
fn parse_delay(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m, h or d), e.g. 5s"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown unit {other:?} (ms, s, m, h or d)")),
    };
    number
        .checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

async fn send(
    target: SendTarget,
    timeout_secs: u64,
    delay: Option<Duration>,
    text: String,
) -> Result<()> {
    let SendTarget {
        data_dir,
        to,
        channel,
        mesh,
        bind,
        priority,
    } = target;
    if to.addrs.is_empty() {
        bail!("--to needs an address: NODE_ID@IP:PORT (e.g. the line `weft listen` printed)");
    }
    let node = Node::builder()
        .mesh(mesh)
        .data_dir(&data_dir)
        .bind(bind)
        .start()
        .await?;
    node.add_peer(to.clone())?;
    let started = Instant::now();
    let sender = node.sender(to.id)?;
    let message = sender
        .new_message(channel.as_str(), text.into_bytes())
        .with_priority(priority)
        .with_delay(delay.unwrap_or_default());
    let receipt = sender.send_message(message).await?;
    drop(sender);
    if let Some(due) = receipt.due_unix_ms() {
        println!("scheduled: due at {due} (Unix ms); waiting for it");
    }
    let timeout = Duration::from_secs(timeout_secs) + delay.unwrap_or_default();
    let outcome = tokio::time::timeout(timeout, receipt).await;
    let elapsed = started.elapsed();
    node.shutdown().await;
    match outcome {
        Ok(Ok(delivered)) => {
            println!(
                "delivered {} to {} on {channel:?} in {:.1} ms (connection setup included)",
                delivered.id,
                delivered.peer.short(),
                elapsed.as_secs_f64() * 1e3
            );
            Ok(())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!(
            "no acknowledgement from {} within {timeout_secs} s (after the due time, if delayed): is `weft listen` running there, in the same mesh?",
            to.id.short()
        ),
    }
}

async fn run_node(settings: config_file::NodeSettings) -> Result<()> {
    let config_file::NodeSettings {
        data_dir,
        bind,
        mesh,
        peers,
        seeds,
        metrics,
        secret_file,
        mdns,
        run_secs,
    } = settings;
    let mut builder = Node::builder().mesh(mesh).data_dir(&data_dir).bind(bind);
    for peer in peers {
        builder = builder.peer(peer);
    }
    for seed in seeds {
        builder = builder.seed(seed);
    }
    if let Some(mdns) = mdns {
        builder = builder.discovery_mdns(mdns);
    }
    if let Some(path) = secret_file {
        let secret = std::fs::read(&path)
            .with_context(|| format!("cannot read the secret file {}", path.display()))?;
        // A trailing newline from `echo secret > file` is not part of the secret.
        let trimmed = secret.trim_ascii_end();
        if trimmed.is_empty() {
            bail!(
                "the secret file {} is empty: write the mesh secret into it",
                path.display()
            );
        }
        builder = builder.mesh_secret(trimmed);
    }
    let node = builder.start().await?;
    println!("node {}", node.addr()?);
    let admin = match metrics {
        Some(addr) => {
            let server = weft::admin::serve(node.clone(), addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr} (is the port in use?)"))?;
            println!(
                "metrics on http://{}/metrics, status on /status",
                server.local_addr()
            );
            Some(server)
        }
        None => None,
    };
    // Consume what arrives (a node that never reads would stop its links).
    let mut inbox = node.receive_all()?;
    let deadline = run_secs.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = node.metrics();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sleep_until(deadline) => break,
            message = inbox.recv() => if message.is_none() { break },
            _ = tick.tick() => {
                let now = node.metrics();
                eprintln!(
                    "peers {} | sent {}/s acked {}/s delivered {}/s | retransmitted {} duplicates {}",
                    now.peers_connected,
                    now.sent - last.sent,
                    now.acked - last.acked,
                    now.delivered - last.delivered,
                    now.retransmitted,
                    now.duplicates,
                );
                last = now;
            }
        }
    }
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn status(metrics: SocketAddr, json: bool) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(metrics).await?;
        stream
            .write_all(b"GET /status HTTP/1.1\r\nhost: weft\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {metrics} within 5 s"))?
        .with_context(|| {
            format!("cannot reach {metrics}: is `weft node --metrics {metrics}` running?")
        })?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .context("malformed HTTP response")?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: serde_json::Value = serde_json::from_str(body).context("malformed status JSON")?;
    println!("node   {}", status["node_id"].as_str().unwrap_or("?"));
    println!("mesh   {}", status["mesh"].as_str().unwrap_or("?"));
    println!("addr   {}", status["addr"].as_str().unwrap_or("?"));
    let peers = status["peers_connected"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    println!("peers  {} connected", peers.len());
    for peer in peers {
        println!("       {}", peer.as_str().unwrap_or("?"));
    }
    if let Some(counters) = status["metrics"].as_object() {
        for (name, value) in counters {
            println!("{name:>16}  {value}");
        }
    }
    Ok(())
}

/// `--mdns-interface` values: none = every interface, `lo` alone = IPv4 loopback, else by name.
fn mdns_interfaces_from(names: &[String]) -> weft::discovery::Interfaces {
    use weft::discovery::Interfaces;
    match names {
        [] => Interfaces::All,
        [only] if only == "lo" => Interfaces::LoopbackOnly,
        names => Interfaces::Named(names.to_vec()),
    }
}

/// How long one RTT probe of `weft discover` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `weft discover` knows of a node: its announcement, when it was last seen, and the
/// round trip its last probe measured (`None`: not measured yet or no answer).
type Discovered = (weft::discovery::Sighting, Instant, Option<Duration>);

async fn discover(
    config: weft::MdnsConfig,
    mesh: Option<String>,
    window: Option<Duration>,
    json: bool,
) -> Result<()> {
    use std::collections::BTreeMap;
    use weft::discovery::{Discovery, ScanEvent};

    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let scanner = Discovery::scan(
        &config,
        std::sync::Arc::new(move |event| {
            let _ = events_tx.send(event);
        }),
    )
    .context("cannot start mDNS")?;
    let (rtt_tx, mut rtts) = tokio::sync::mpsc::unbounded_channel();
    let probe = |seen: &weft::discovery::Sighting| {
        // One probe per sighting, to the first announced address (bounded by PROBE_TIMEOUT).
        if let Some(addr) = seen.addrs.first().copied() {
            let (id, tx) = (seen.id, rtt_tx.clone());
            tokio::spawn(async move {
                let rtt = weft::discovery::probe_rtt(addr, id, PROBE_TIMEOUT)
                    .await
                    .ok();
                let _ = tx.send((id, rtt));
            });
        }
    };
    let mut nodes: BTreeMap<weft::NodeId, Discovered> = BTreeMap::new();
    let mut probing = 0usize;
    let deadline = window.map(|w| tokio::time::Instant::now() + w);
    loop {
        let changed = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sleep_until(deadline) => break,
            Some((id, rtt)) = rtts.recv() => {
                probing -= 1;
                match nodes.get_mut(&id) {
                    Some(node) => { node.2 = rtt; true }
                    None => false,
                }
            }
            event = events.recv() => match event {
                Some(ScanEvent::Seen(seen)) => {
                    if mesh.as_ref().is_some_and(|m| *m != seen.mesh) {
                        false
                    } else {
                        probe(&seen);
                        probing += 1;
                        let rtt = nodes.get(&seen.id).and_then(|n| n.2);
                        nodes.insert(seen.id, (seen, Instant::now(), rtt));
                        true
                    }
                }
                Some(ScanEvent::Gone(id)) => nodes.remove(&id).is_some(),
                Some(_) => false,
                None => break,
            },
        };
        if changed && window.is_none() {
            print_nodes(&nodes, json);
        }
    }
    scanner.shutdown().await;
    if window.is_some() {
        // The probes started in the window end within PROBE_TIMEOUT.
        while probing > 0 {
            let Ok(Some((id, rtt))) = tokio::time::timeout(PROBE_TIMEOUT, rtts.recv()).await else {
                break;
            };
            probing -= 1;
            if let Some(node) = nodes.get_mut(&id) {
                node.2 = rtt;
            }
        }
        print_nodes(&nodes, json);
    }
    Ok(())
}

fn print_nodes(nodes: &std::collections::BTreeMap<weft::NodeId, Discovered>, json: bool) {
    if json {
        let list: Vec<_> = nodes
            .values()
            .map(|(seen, at, rtt)| {
                serde_json::json!({
                    "node_id": seen.id.to_string(),
                    "mesh": seen.mesh,
                    "addrs": seen.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "versions": format!("{}-{}", seen.version_min, seen.version_max),
                    "last_seen_ms_ago": at.elapsed().as_millis() as u64,
                    "rtt_us": rtt.map(|rtt| rtt.as_micros() as u64),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return;
    }
    println!(
        "{:<54} {:<16} {:<9} {:>9} {:>10}  addresses",
        "node", "mesh", "versions", "rtt (ms)", "seen (s)"
    );
    for (seen, at, rtt) in nodes.values() {
        let addrs: Vec<String> = seen.addrs.iter().map(|a| a.to_string()).collect();
        let rtt = rtt.map_or("-".to_string(), |rtt| {
            format!("{:.2}", rtt.as_secs_f64() * 1e3)
        });
        println!(
            "{:<54} {:<16} {:<9} {:>9} {:>10.1}  {}",
            seen.id.to_string(),
            seen.mesh,
            format!("{}-{}", seen.version_min, seen.version_max),
            rtt,
            at.elapsed().as_secs_f64(),
            addrs.join(", ")
        );
    }
    println!("({} nodes)", nodes.len());
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn priorities_parse_by_name_or_number_and_refuse_garbage() {
        use weft::{Lane, Priority};
        assert_eq!(super::parse_priority("high"), Ok(Priority::HIGH));
        assert_eq!(super::parse_priority("Normal"), Ok(Priority::NORMAL));
        assert_eq!(super::parse_priority("bulk"), Ok(Priority::LOW));
        assert_eq!(
            super::parse_priority("6").map(Priority::lane),
            Ok(Lane::High)
        );
        for bad in ["", "urgent", "256", "-1"] {
            assert!(super::parse_priority(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn delays_parse_with_units_and_refuse_garbage() {
        assert_eq!(super::parse_delay("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(super::parse_delay("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(super::parse_delay("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(super::parse_delay("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            super::parse_delay("3d"),
            Ok(Duration::from_secs(3 * 86_400))
        );
        assert_eq!(super::parse_delay("0"), Ok(Duration::ZERO));
        for bad in ["5", "s", "-1s", "1.5s", "5x", "", "99999999999999999999d"] {
            assert!(super::parse_delay(bad).is_err(), "{bad:?}");
        }
    }
}
