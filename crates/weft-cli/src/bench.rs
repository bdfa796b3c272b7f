//! `weft bench`: two processes on loopback, measured at the receiver.
//!
//! The parent starts `weft bench-peer` as a child process, reads the child's address from its
//! first stdout line, and then either streams messages to it (throughput: the child reports how
//! long the messages took to arrive, first to last) or exchanges sequential ping/echo messages
//! (round trip, measured by the parent). Closing the child's stdin ends it.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use weft::{Identity, Node, NodeAddr};

/// Upper bound for one benchmark phase; a stuck run fails instead of hanging.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Point-to-point messages between two processes.
    P2p(P2pArgs),
    /// The on-disk spool alone: durable appends with group commit (or one fsync per message).
    Spool(SpoolArgs),
}

#[derive(Args, Debug)]
pub struct SpoolArgs {
    /// Record payload size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Records to append.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// `always`: every batch is fsynced before it counts as accepted; `never`: written, not
    /// fsynced (not durable: a machine crash loses it).
    #[arg(long, value_enum, default_value_t = Fsync::Always)]
    fsync: Fsync,
    /// Records per group commit (concurrent sends sharing one fsync); 1 = fsync per message.
    #[arg(long, default_value_t = 1024)]
    batch: u64,
    /// Directory for the spool (default: a fresh one under the system temp dir, removed after).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Fsync {
    Always,
    Never,
}

#[derive(Args, Debug)]
pub struct P2pArgs {
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages to send (throughput) or round trips to time (--rtt).
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Time sequential request-like round trips instead of streaming.
    #[arg(long)]
    rtt: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Largest UDP payload path MTU discovery may use (loopback allows 65527; 1452 is the
    /// internet-safe default).
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
    /// Send through the on-disk spool (fsync with group commit; a fresh temporary data dir):
    /// every send returns once durable. Sends run `--window` at a time so they can share fsyncs.
    #[arg(long)]
    durable: bool,
    /// Concurrent sends with --durable.
    #[arg(long, default_value_t = 8192)]
    window: usize,
}

#[derive(Args, Debug)]
pub struct PeerArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    count: u64,
    #[arg(long)]
    max_udp_payload: u16,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Count `count` messages and report first-to-last time.
    Sink,
    /// Send every message straight back.
    Echo,
}

const BENCH_CHANNEL: &str = "bench";
const ECHO_CHANNEL: &str = "bench/echo";

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn bench_node(max_udp_payload: u16) -> Result<Node> {
    Ok(Node::builder()
        .mesh("bench")
        .identity(Identity::generate()?)
        .bind("127.0.0.1:0".parse()?)
        .configure(|c| c.max_udp_payload = max_udp_payload)
        .start()
        .await?)
}

fn read_line(out: &mut BufReader<ChildStdout>, expect: &str) -> Result<String> {
    let mut line = String::new();
    out.read_line(&mut line)
        .context("reading from the bench peer")?;
    match line.trim_end().strip_prefix(expect) {
        Some(rest) => Ok(rest.trim().to_owned()),
        None => bail!("bench peer said {line:?}, expected {expect}"),
    }
}

struct PeerProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    addr: NodeAddr,
}

impl PeerProcess {
    fn start(mode: &str, count: u64, max_udp_payload: u16) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the weft binary")?;
        let mut child = Command::new(exe)
            .args(["bench-peer", "--mode", mode, "--count"])
            .arg(count.to_string())
            .arg("--max-udp-payload")
            .arg(max_udp_payload.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the bench peer process")?;
        let mut stdout = BufReader::new(child.stdout.take().context("peer stdout")?);
        let addr = read_line(&mut stdout, "READY")?
            .parse()
            .context("bench peer address")?;
        Ok(Self {
            child,
            stdout,
            addr,
        })
    }

    fn finish(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("bench peer exited with {status}");
        }
        Ok(())
    }
}

pub fn run(command: BenchCommand) -> Result<()> {
    let args = match command {
        BenchCommand::P2p(args) => args,
        BenchCommand::Spool(args) => return spool(&args),
    };
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    if args.size < 8 {
        bail!("--size must be at least 8 bytes (the bench stamps a sequence number)");
    }
    if args.rtt {
        rtt(&args)
    } else {
        throughput(&args)
    }
}

fn throughput(args: &P2pArgs) -> Result<()> {
    let mut peer = PeerProcess::start("sink", args.count, args.max_udp_payload)?;
    let rt = runtime()?;
    let data_dir = std::env::temp_dir().join(format!("weft-bench-{}", std::process::id()));
    let mut accepted_in = None;
    let sent_in = rt.block_on(async {
        let node = if args.durable {
            let _ = std::fs::remove_dir_all(&data_dir);
            Node::builder()
                .mesh("bench")
                .data_dir(&data_dir)
                .bind("127.0.0.1:0".parse()?)
                .configure(|c| {
                    c.max_udp_payload = args.max_udp_payload;
                    c.peer_command_capacity = args.window.max(1);
                })
                .start()
                .await?
        } else {
            bench_node(args.max_udp_payload).await?
        };
        node.add_peer(peer.addr.clone())?;
        tokio::time::timeout(PHASE_TIMEOUT, node.connected(peer.addr.id))
            .await
            .context("bench peer did not connect")??;
        let sender = node.sender(peer.addr.id)?;
        let body = vec![0xa5u8; args.size];
        let started = Instant::now();
        let mut last = None;
        if args.durable {
            use futures_util::StreamExt;
            let mut sends = futures_util::stream::iter(0..args.count)
                .map(|_| sender.send(BENCH_CHANNEL, Bytes::copy_from_slice(&body)))
                .buffered(args.window.max(1));
            while let Some(receipt) = sends.next().await {
                last = Some(receipt?);
            }
            accepted_in = Some(started.elapsed());
        } else {
            for _ in 0..args.count {
                last = Some(
                    sender
                        .send(BENCH_CHANNEL, Bytes::copy_from_slice(&body))
                        .await?,
                );
            }
        }
        if let Some(last) = last {
            tokio::time::timeout(PHASE_TIMEOUT, last)
                .await
                .context("acknowledgements did not arrive")??;
        }
        let elapsed = started.elapsed();
        node.shutdown().await;
        if args.durable {
            let _ = std::fs::remove_dir_all(&data_dir);
        }
        anyhow::Ok(elapsed)
    })?;
    let result = read_line(&mut peer.stdout, "RESULT")?;
    let (received, nanos) = result.split_once(' ').context("malformed result line")?;
    let received: u64 = received.parse()?;
    let nanos: u64 = nanos.parse()?;
    peer.finish()?;
    let seconds = (nanos as f64 / 1e9).max(1e-9);
    let msgs_per_sec = received as f64 / seconds;
    let mb_per_sec = msgs_per_sec * args.size as f64 / 1e6;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "p2p",
                "size": args.size,
                "count": received,
                "seconds": seconds,
                "msgs_per_sec": msgs_per_sec,
                "mb_per_sec": mb_per_sec,
                "sender_acked_seconds": sent_in.as_secs_f64(),
                "durable": args.durable,
                "accepted_per_sec": accepted_in.map(|t| received as f64 / t.as_secs_f64().max(1e-9)),
                "max_udp_payload": args.max_udp_payload,
            })
        );
    } else {
        println!(
            "p2p {} x {} B: {:.0} msg/s, {:.1} MB/s at the receiver ({:.3} s); all acknowledged after {:.3} s",
            received,
            args.size,
            msgs_per_sec,
            mb_per_sec,
            seconds,
            sent_in.as_secs_f64()
        );
    }
    Ok(())
}

fn rtt(args: &P2pArgs) -> Result<()> {
    let peer = PeerProcess::start("echo", args.count, args.max_udp_payload)?;
    let rt = runtime()?;
    let mut samples = rt.block_on(async {
        let node = bench_node(args.max_udp_payload).await?;
        let mut echoes = node.receive(ECHO_CHANNEL)?;
        node.add_peer(peer.addr.clone())?;
        tokio::time::timeout(PHASE_TIMEOUT, node.connected(peer.addr.id))
            .await
            .context("bench peer did not connect")??;
        let sender = node.sender(peer.addr.id)?;
        let warmup = (args.count / 10).min(1_000);
        let mut samples = Vec::with_capacity(args.count as usize);
        let mut body = vec![0u8; args.size];
        for i in 0..warmup + args.count {
            body[..8].copy_from_slice(&i.to_le_bytes());
            let started = Instant::now();
            let _receipt = sender
                .send(BENCH_CHANNEL, Bytes::copy_from_slice(&body))
                .await?;
            let echo = tokio::time::timeout(PHASE_TIMEOUT, echoes.recv())
                .await
                .context("echo did not arrive")?
                .context("node closed")?;
            let elapsed = started.elapsed();
            if echo.body[..8] != body[..8] {
                bail!("echo out of order");
            }
            if i >= warmup {
                samples.push(elapsed.as_nanos() as u64);
            }
        }
        node.shutdown().await;
        anyhow::Ok(samples)
    })?;
    peer.finish()?;
    samples.sort_unstable();
    let pct = |p: f64| {
        let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index] as f64 / 1e3
    };
    let (p50, p99, p999) = (pct(0.50), pct(0.99), pct(0.999));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "p2p-rtt",
                "size": args.size,
                "count": samples.len(),
                "p50_us": p50,
                "p99_us": p99,
                "p999_us": p999,
                "max_udp_payload": args.max_udp_payload,
            })
        );
    } else {
        println!(
            "p2p round trip, {} x {} B: p50 {p50:.1} µs, p99 {p99:.1} µs, p99.9 {p999:.1} µs",
            samples.len(),
            args.size
        );
    }
    Ok(())
}

pub fn run_peer(args: PeerArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let node = bench_node(args.max_udp_payload).await?;
        let mut inbox = node.receive(BENCH_CHANNEL)?;
        let mut out = std::io::stdout();
        writeln!(out, "READY {}", node.addr()?)?;
        out.flush()?;
        // Ends when the parent closes our stdin.
        let mut stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        });
        match args.mode {
            Mode::Sink => {
                let mut received = 0u64;
                let mut first = None;
                let mut batch = Vec::with_capacity(1024);
                while received < args.count {
                    let n = tokio::select! {
                        n = inbox.recv_many(&mut batch, 1024) => n,
                        _ = &mut stdin_closed => bail!("parent went away after {received} messages"),
                    };
                    if n == 0 {
                        bail!("node closed");
                    }
                    first.get_or_insert_with(Instant::now);
                    received += n as u64;
                    batch.clear();
                }
                let nanos = first.map_or(0, |t| t.elapsed().as_nanos());
                // Done with the last batch: let it be acknowledged.
                inbox.settle();
                writeln!(out, "RESULT {received} {nanos}")?;
                out.flush()?;
                let _ = stdin_closed.await;
            }
            Mode::Echo => loop {
                let message = tokio::select! {
                    message = inbox.recv() => message,
                    _ = &mut stdin_closed => break,
                };
                let Some(message) = message else { break };
                let _receipt = node
                    .send(message.header.id.producer, ECHO_CHANNEL, message.body)
                    .await?;
            },
        }
        node.shutdown().await;
        anyhow::Ok(())
    })
}

/// Appends `count` records in batches, each batch synced (group commit) before it counts as
/// accepted, retiring each batch after it (as acknowledgements would), so the spool stays within
/// its caps however many records are measured.
fn spool(args: &SpoolArgs) -> Result<()> {
    use weft_spool::{FsStorage, FsyncPolicy, Spool, SpoolConfig};
    if args.count == 0 || args.batch == 0 {
        bail!("--count and --batch must be at least 1");
    }
    let (dir, temporary) = match &args.dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("weft-bench-spool-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = SpoolConfig {
        fsync: match args.fsync {
            Fsync::Always => FsyncPolicy::Always,
            Fsync::Never => FsyncPolicy::Never,
        },
        ..SpoolConfig::default()
    };
    let storage = FsStorage::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let (mut spool, _recovery) = Spool::open(storage, config)?;
    let payload = vec![0x5au8; args.size];
    let started = Instant::now();
    let mut accepted = 0u64;
    while accepted < args.count {
        let batch = args.batch.min(args.count - accepted);
        let mut last = 0;
        for _ in 0..batch {
            last = spool.append(&payload)?;
        }
        spool.sync()?;
        accepted += batch;
        spool.retire_up_to(last)?;
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    spool.close()?;
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let msgs_per_sec = accepted as f64 / seconds;
    let mb_per_sec = msgs_per_sec * args.size as f64 / 1e6;
    let fsync = match args.fsync {
        Fsync::Always => "always",
        Fsync::Never => "never",
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "spool",
                "size": args.size,
                "count": accepted,
                "batch": args.batch,
                "fsync": fsync,
                "seconds": seconds,
                "msgs_per_sec": msgs_per_sec,
                "mb_per_sec": mb_per_sec,
            })
        );
    } else {
        println!(
            "spool {accepted} x {} B, fsync {fsync}, {} per commit: {msgs_per_sec:.0} accepted/s, {mb_per_sec:.1} MB/s ({seconds:.3} s)",
            args.size, args.batch
        );
    }
    Ok(())
}
