//! `weft bench`: processes on loopback, measured at the receivers.
//!
//! The parent starts `weft bench-peer` child processes, reads each child's address from its
//! first stdout line, and then either streams messages to it (throughput: the child reports how
//! long the messages took to arrive, first to last) or exchanges sequential ping/echo messages
//! (round trip, measured by the parent). `fanout` does the same with pub/sub (the parent
//! publishes, every child subscribes and reports wall-clock times of its first and last event)
//! and `reqrep` with request/response (the child serves, the parent times each request). Closing
//! a child's stdin ends it.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use weft::{Identity, Node, NodeAddr, Priority, Receipt};

/// Upper bound for one benchmark phase; a stuck run fails instead of hanging.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Point-to-point messages between two processes.
    P2p(P2pArgs),
    /// The on-disk spool alone: durable appends with group commit (or one fsync per message).
    Spool(SpoolArgs),
    /// Pub/sub: this process publishes, `--subs` processes subscribe; aggregate delivered/s.
    Fanout(FanoutArgs),
    /// Request/response: sequential requests to a serving process; latency percentiles.
    Reqrep(ReqrepArgs),
}

#[derive(Args, Debug)]
pub struct FanoutArgs {
    /// Subscriber processes.
    #[arg(long, default_value_t = 4)]
    subs: usize,
    /// Event body size in bytes (at least 8: the bench stamps a counter).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Events to publish (each subscriber must get every one, in order).
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Publish in batches of this many events (`Node::publish_batch`); 0: one `publish` per
    /// event.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Largest UDP payload path MTU discovery may use.
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
    /// Tokio runtime of every process.
    #[arg(long, value_enum, default_value_t = Flavor::CurrentThread)]
    runtime: Flavor,
}

#[derive(Args, Debug)]
pub struct ReqrepArgs {
    /// Requests to time (sequential: one outstanding at a time).
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Request and reply body size in bytes (at least 8; the replier echoes the request).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Untimed requests first.
    #[arg(long, default_value_t = 1_000)]
    warmup: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Largest UDP payload path MTU discovery may use.
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
    /// Tokio runtime of both processes.
    #[arg(long, value_enum, default_value_t = Flavor::CurrentThread)]
    runtime: Flavor,
    /// Keep every CPU busy at the lowest priority (`nice 19` spinning processes) during the
    /// run, so that no CPU halts while idle: on a virtual machine, waking a halted vCPU is most
    /// of a quiet machine's round trip. Costs all idle CPU time; see docs/BENCHMARKS.md.
    #[arg(long)]
    keep_cpus_awake: bool,
}

/// Which tokio runtime a bench process runs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// One thread for everything.
    CurrentThread,
    /// Tokio's work-stealing runtime, one worker per core.
    MultiThread,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::CurrentThread => "current-thread",
            Flavor::MultiThread => "multi-thread",
        }
    }

    fn build(self) -> Result<tokio::runtime::Runtime> {
        let mut builder = match self {
            Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread(),
        };
        builder
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    }
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
    /// Keep every CPU busy at the lowest priority (`nice 19` spinning processes) during the
    /// run, so that no CPU halts while idle: on a virtual machine, waking a halted vCPU is most
    /// of a quiet machine's round trip. Costs all idle CPU time; see docs/BENCHMARKS.md.
    #[arg(long)]
    keep_cpus_awake: bool,
    /// Concurrent sends with --durable (per-message `send`).
    #[arg(long, default_value_t = 8192)]
    window: usize,
    /// Send through `send_batch` in batches of this many messages (two batches in flight)
    /// instead of one `send` per message; 0 = per message.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// With --rtt: the round trips' priority (`high`, `normal`, `low`/`bulk` or 0-255); the
    /// echo answers with the same one.
    #[arg(long, default_value = "normal", value_parser = crate::parse_priority)]
    priority: Priority,
    /// With --rtt: keep the bulk lane to the echo process full meanwhile (16 KiB messages of
    /// priority low, as fast as its queue takes them; at most a million), to see what a round
    /// trip of each priority costs behind bulk traffic.
    #[arg(long)]
    bulk_load: bool,
}

#[derive(Args, Debug)]
pub struct PeerArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    count: u64,
    #[arg(long)]
    max_udp_payload: u16,
    #[arg(long, value_enum, default_value_t = Flavor::CurrentThread)]
    runtime: Flavor,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Count `count` messages and report first-to-last time.
    Sink,
    /// Send every message straight back.
    Echo,
    /// Subscribe to the fanout topic, check `count` events arrive in order, report the
    /// wall-clock times of the first and the last.
    Subscriber,
    /// Serve the reqrep service, answering every request with its own body.
    Replier,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Sink => "sink",
            Mode::Echo => "echo",
            Mode::Subscriber => "subscriber",
            Mode::Replier => "replier",
        }
    }
}

const BENCH_CHANNEL: &str = "bench";
const ECHO_CHANNEL: &str = "bench/echo";
/// The channels as names made once: a send clones a reference instead of copying the string.
const BENCH: weft::Channel = weft::Channel::from_static(BENCH_CHANNEL);
const ECHO: weft::Channel = weft::Channel::from_static(ECHO_CHANNEL);
/// Bulk traffic during `--rtt --bulk-load` (the echo process takes it and drops it).
const BULK_CHANNEL: &str = "bench/bulk";
const BULK_BODY_BYTES: usize = 16 * 1024;
const BULK_MESSAGES_MAX: u64 = 1_000_000;
const FANOUT_TOPIC: &str = "bench/fanout";
const REQREP_SERVICE: &str = "bench/reqrep";
/// How long one request may wait for its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn runtime() -> Result<tokio::runtime::Runtime> {
    Flavor::CurrentThread.build()
}

/// Nanoseconds since the Unix epoch: comparable across the processes of one machine.
fn wall_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The counter a bench stamps into the first 8 bytes of a body.
fn stamp(body: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(body.get(..8)?.try_into().ok()?))
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

/// Most seconds a spinner runs (it is killed at the end of the run; this bounds an orphan).
const SPIN_SECONDS_MAX: u64 = 900;

/// With `--keep-cpus-awake`: one `weft bench-spin` process at `nice 19` spinning a thread per
/// CPU until dropped. The bench's own processes (nice 0) preempt it at once; it only keeps the
/// CPUs from halting while they would otherwise be idle.
struct AwakeCpus(Option<Child>);

impl AwakeCpus {
    fn start(enabled: bool) -> Result<Self> {
        if !enabled {
            return Ok(Self(None));
        }
        let exe = std::env::current_exe().context("locating the weft binary")?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let child = Command::new("nice")
            .args(["-n", "19"])
            .arg(exe)
            .args(["bench-spin", "--threads", &threads.to_string()])
            .args(["--seconds", &SPIN_SECONDS_MAX.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the spinner (`nice` must be on the PATH)")?;
        Ok(Self(Some(child)))
    }
}

impl Drop for AwakeCpus {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `weft bench-spin`: spins `threads` threads for at most `seconds`.
pub fn spin(threads: usize, seconds: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(seconds.min(SPIN_SECONDS_MAX));
    let spinners: Vec<_> = (0..threads.max(1))
        .map(|_| {
            std::thread::spawn(move || {
                while Instant::now() < until {
                    for _ in 0..1024 {
                        std::hint::spin_loop();
                    }
                }
            })
        })
        .collect();
    for spinner in spinners {
        let _ = spinner.join();
    }
    Ok(())
}

struct PeerProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    addr: NodeAddr,
}

impl PeerProcess {
    fn start(mode: Mode, count: u64, max_udp_payload: u16, runtime: Flavor) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the weft binary")?;
        let mut child = Command::new(exe)
            .args(["bench-peer", "--mode", mode.name(), "--count"])
            .arg(count.to_string())
            .arg("--max-udp-payload")
            .arg(max_udp_payload.to_string())
            .args(["--runtime", runtime.name()])
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
        end_child(&mut self.child)
    }

    /// Hands the rest of the child's stdout to a thread that forwards each line as
    /// `(index, Some(line))`, then `(index, None)` when the child closes it (exits).
    fn forward_lines(
        self,
        index: usize,
        lines: tokio::sync::mpsc::UnboundedSender<(usize, Option<String>)>,
    ) -> Child {
        let stdout = self.stdout;
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if lines.send((index, Some(line))).is_err() {
                    return;
                }
            }
            let _ = lines.send((index, None));
        });
        self.child
    }
}

/// Closes a child's stdin (which ends it) and checks that it exits cleanly.
fn end_child(child: &mut Child) -> Result<()> {
    drop(child.stdin.take());
    let status = child.wait()?;
    if !status.success() {
        bail!("bench peer exited with {status}");
    }
    Ok(())
}

pub fn run(command: BenchCommand) -> Result<()> {
    let args = match command {
        BenchCommand::P2p(args) => args,
        BenchCommand::Spool(args) => return spool(&args),
        BenchCommand::Fanout(args) => return fanout(&args),
        BenchCommand::Reqrep(args) => return reqrep(&args),
    };
    let _awake = AwakeCpus::start(args.keep_cpus_awake)?;
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
    let mut peer = PeerProcess::start(
        Mode::Sink,
        args.count,
        args.max_udp_payload,
        Flavor::CurrentThread,
    )?;
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
        // One body shared by every message (a reference count per send): what is measured is
        // Weft's path, not the allocator. A fresh copy per message cost more in page faults than
        // Weft itself at 64 KiB (glibc trims and re-faults the heap as bodies come and go).
        let body = Bytes::from(vec![0xa5u8; args.size]);
        let started = Instant::now();
        let mut last = None;
        if args.batch > 0 {
            use futures_util::StreamExt;
            let batch = args.batch as u64;
            let mut batches = futures_util::stream::iter((0..args.count).step_by(args.batch))
                .map(|start| {
                    let n = batch.min(args.count - start);
                    let messages = (0..n).map(|_| node.new_message(BENCH, body.clone()));
                    sender.send_batch(messages.collect::<Vec<_>>())
                })
                .buffered(2);
            while let Some(receipts) = batches.next().await {
                let receipts = receipts?;
                // Acks are cumulative: the highest number covers every message.
                let highest = receipts.get(receipts.len().saturating_sub(1));
                if highest.as_ref().map(|r| r.id().seq)
                    > last.as_ref().map(|r: &Receipt| r.id().seq)
                {
                    last = highest;
                }
            }
            accepted_in = Some(started.elapsed());
        } else if args.durable {
            use futures_util::StreamExt;
            let mut sends = futures_util::stream::iter(0..args.count)
                .map(|_| sender.send(BENCH, body.clone()))
                .buffered(args.window.max(1));
            while let Some(receipt) = sends.next().await {
                last = Some(receipt?);
            }
            accepted_in = Some(started.elapsed());
        } else {
            for _ in 0..args.count {
                last = Some(sender.send(BENCH, body.clone()).await?);
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
    let peer = PeerProcess::start(
        Mode::Echo,
        args.count,
        args.max_udp_payload,
        Flavor::CurrentThread,
    )?;
    let rt = runtime()?;
    let samples = rt.block_on(async {
        let node = bench_node(args.max_udp_payload).await?;
        let mut echoes = node.receive(ECHO_CHANNEL)?;
        node.add_peer(peer.addr.clone())?;
        tokio::time::timeout(PHASE_TIMEOUT, node.connected(peer.addr.id))
            .await
            .context("bench peer did not connect")??;
        let sender = node.sender(peer.addr.id)?;
        let (stop_bulk, stopped) = tokio::sync::watch::channel(false);
        let mut bulk = None;
        let warmup = (args.count / 10).min(1_000);
        let mut samples = Vec::with_capacity(args.count as usize);
        let mut body = vec![0u8; args.size.max(8)];
        for i in 0..warmup + args.count {
            if i == warmup && args.bulk_load {
                // The bulk starts after the (unloaded) warmup: every timed round trip meets it.
                bulk = Some(tokio::spawn(bulk_load(sender.clone(), stopped.clone())));
                tokio::task::yield_now().await;
            }
            body[..8].copy_from_slice(&i.to_le_bytes());
            let started = Instant::now();
            let message = sender
                .new_message(BENCH, Bytes::copy_from_slice(&body))
                .with_priority(args.priority);
            let _receipt = sender.send_message(message).await?;
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
        let _ = stop_bulk.send(true);
        let bulk_sent = match bulk {
            Some(bulk) => bulk.await.context("bulk sender")??,
            None => 0,
        };
        node.shutdown().await;
        anyhow::Ok((samples, bulk_sent))
    })?;
    let (mut samples, bulk_sent) = samples;
    peer.finish()?;
    let (p50, p99, p999) = percentiles_us(&mut samples);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "p2p-rtt",
                "size": args.size,
                "priority": args.priority.0,
                "lane": args.priority.lane().to_string(),
                "bulk_messages": bulk_sent,
                "count": samples.len(),
                "p50_us": p50,
                "p99_us": p99,
                "p999_us": p999,
                "max_udp_payload": args.max_udp_payload,
            })
        );
    } else {
        println!(
            "p2p round trip, {} x {} B ({} lane{}): p50 {p50:.1} µs, p99 {p99:.1} µs, p99.9 {p999:.1} µs",
            samples.len(),
            args.size,
            args.priority.lane(),
            if args.bulk_load {
                format!(", behind {bulk_sent} bulk messages of {BULK_BODY_BYTES} B")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Keeps the bulk lane to the peer full until `stop` (or [`BULK_MESSAGES_MAX`] messages):
/// each send waits while the lane's queue is full. Returns how many it sent.
async fn bulk_load(
    sender: weft::PeerSender,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<u64> {
    let body = Bytes::from(vec![0u8; BULK_BODY_BYTES]);
    let mut sent = 0;
    while sent < BULK_MESSAGES_MAX {
        let message = sender
            .new_message(BULK_CHANNEL, body.clone())
            .with_priority(Priority::LOW);
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            receipt = sender.send_message(message) => {
                drop(receipt?);
                sent += 1;
            }
        }
    }
    Ok(sent)
}

/// p50, p99 and p99.9 of nanosecond samples, in microseconds.
fn percentiles_us(samples: &mut [u64]) -> (f64, f64, f64) {
    samples.sort_unstable();
    let pct = |p: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index] as f64 / 1e3
    };
    (pct(0.50), pct(0.99), pct(0.999))
}

/// One publisher (this process) and `--subs` subscriber processes; every subscriber reports the
/// wall-clock times of its first and last event, so the aggregate rate is measured from the
/// earliest first event to the latest last one on the machine's one clock.
fn fanout(args: &FanoutArgs) -> Result<()> {
    if args.count == 0 || args.subs == 0 {
        bail!("--count and --subs must be at least 1");
    }
    if args.subs > 64 {
        bail!("--subs is at most 64 (each is a process)");
    }
    if args.size < 8 {
        bail!("--size must be at least 8 bytes (the bench stamps a counter)");
    }
    let mut peers = Vec::with_capacity(args.subs);
    for _ in 0..args.subs {
        peers.push(PeerProcess::start(
            Mode::Subscriber,
            args.count,
            args.max_udp_payload,
            args.runtime,
        )?);
    }
    let addrs: Vec<NodeAddr> = peers.iter().map(|p| p.addr.clone()).collect();
    // Each subscriber's stdout, line by line, so a subscriber that fails (and exits) while we
    // publish ends the run at once instead of leaving the publisher waiting for its acks.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let mut children: Vec<Child> = peers
        .into_iter()
        .enumerate()
        .map(|(i, peer)| peer.forward_lines(i, lines_tx.clone()))
        .collect();
    drop(lines_tx);
    let mut reports: Vec<Option<String>> = vec![None; args.subs];
    let note = |reports: &mut Vec<Option<String>>, (i, line): (usize, Option<String>)| {
        match line {
            Some(line) => match line.strip_prefix("RESULT ") {
                Some(result) => reports[i] = Some(result.to_owned()),
                None => bail!("subscriber {i} said {line:?}, expected RESULT"),
            },
            None if reports[i].is_none() => {
                bail!("subscriber {i} exited without a result (its error is above)")
            }
            None => {}
        }
        anyhow::Ok(())
    };
    let rt = args.runtime.build()?;
    let (accepted_in, acked_in) = rt.block_on(async {
        let node = bench_node(args.max_udp_payload).await?;
        for addr in &addrs {
            node.add_peer(addr.clone())?;
        }
        for addr in &addrs {
            tokio::time::timeout(PHASE_TIMEOUT, node.connected(addr.id))
                .await
                .context("a subscriber did not connect")??;
        }
        tokio::time::timeout(
            PHASE_TIMEOUT,
            node.wait_for_subscribers(FANOUT_TOPIC, args.subs),
        )
        .await
        .context("the subscriptions did not arrive")??;
        let mut body = vec![0xa5u8; args.size];
        let started = Instant::now();
        let mut batch_body = body.clone();
        let publish_batches = async {
            let mut last = Vec::new();
            let mut next = 0u64;
            while next < args.count {
                let end = args.count.min(next + args.batch as u64);
                let bodies = (next..end).map(|i| {
                    batch_body[..8].copy_from_slice(&i.to_le_bytes());
                    Bytes::copy_from_slice(&batch_body)
                });
                let bodies: Vec<Bytes> = bodies.collect();
                let published = node.publish_batch(FANOUT_TOPIC, bodies).await?;
                if published.receipts.len() != args.subs {
                    bail!(
                        "events {next}..{end} went to {} subscribers, expected {}",
                        published.receipts.len(),
                        args.subs
                    );
                }
                next = end;
                // Acknowledgements are cumulative per link: the last batch's cover all before.
                last = vec![published];
            }
            let accepted = started.elapsed();
            for published in last {
                published.delivered().await?;
            }
            anyhow::Ok(accepted)
        };
        let publish_all = async {
            if args.batch > 0 {
                return publish_batches.await;
            }
            let mut last = None;
            for i in 0..args.count {
                body[..8].copy_from_slice(&i.to_le_bytes());
                let published = node
                    .publish(FANOUT_TOPIC, Bytes::copy_from_slice(&body))
                    .await?;
                if published.receipts.len() != args.subs {
                    bail!(
                        "event {i} went to {} subscribers, expected {}",
                        published.receipts.len(),
                        args.subs
                    );
                }
                // Receipts are cumulative per link: the last one covers all before it.
                last = Some(published);
            }
            let accepted = started.elapsed();
            if let Some(last) = last {
                last.delivered().await?;
            }
            anyhow::Ok(accepted)
        };
        let run = async {
            tokio::pin!(publish_all);
            let accepted = loop {
                tokio::select! {
                    accepted = &mut publish_all => break accepted?,
                    Some(line) = lines.recv() => note(&mut reports, line)?,
                }
            };
            let acked = started.elapsed();
            while reports.iter().any(Option::is_none) {
                let line = lines.recv().await.context("subscribers' output closed")?;
                note(&mut reports, line)?;
            }
            anyhow::Ok((accepted, acked))
        };
        let times = tokio::time::timeout(PHASE_TIMEOUT, run)
            .await
            .context("publishing did not finish in time")??;
        node.shutdown().await;
        anyhow::Ok(times)
    })?;
    drop(rt);
    let mut firsts = Vec::with_capacity(args.subs);
    let mut lasts = Vec::with_capacity(args.subs);
    let mut delivered = 0u64;
    let mut slowest = 0u64;
    for result in reports.iter().flatten() {
        let fields: Vec<u64> = result
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("malformed result line")?;
        let [received, first, last] = fields[..] else {
            bail!("malformed result line {result:?}");
        };
        if received != args.count {
            bail!(
                "a subscriber got {received} events, expected {}",
                args.count
            );
        }
        delivered += received;
        slowest = slowest.max(last.saturating_sub(first));
        firsts.push(first);
        lasts.push(last);
    }
    for child in &mut children {
        end_child(child)?;
    }
    let span = lasts
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .saturating_sub(firsts.iter().min().copied().unwrap_or(0));
    let seconds = (span as f64 / 1e9).max(1e-9);
    let msgs_per_sec = delivered as f64 / seconds;
    let mb_per_sec = msgs_per_sec * args.size as f64 / 1e6;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "fanout",
                "subs": args.subs,
                "size": args.size,
                "count": args.count,
                "delivered": delivered,
                "seconds": seconds,
                "msgs_per_sec": msgs_per_sec,
                "events_per_sec": args.count as f64 / seconds,
                "mb_per_sec": mb_per_sec,
                "slowest_sub_seconds": slowest as f64 / 1e9,
                "publisher_accepted_seconds": accepted_in.as_secs_f64(),
                "publisher_acked_seconds": acked_in.as_secs_f64(),
                "runtime": args.runtime.name(),
                "max_udp_payload": args.max_udp_payload,
                "batch": args.batch,
            })
        );
    } else {
        println!(
            "fanout to {} subscribers, {} x {} B: {:.0} delivered/s in all ({:.0} events/s each), {:.1} MB/s ({:.3} s); all acknowledged after {:.3} s",
            args.subs,
            args.count,
            args.size,
            msgs_per_sec,
            args.count as f64 / seconds,
            mb_per_sec,
            seconds,
            acked_in.as_secs_f64()
        );
    }
    Ok(())
}

/// Sequential requests from this process to a serving child process, each timed from the call
/// to the reply (application to application).
fn reqrep(args: &ReqrepArgs) -> Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    if args.size < 8 {
        bail!("--size must be at least 8 bytes (the bench stamps a counter)");
    }
    let _awake = AwakeCpus::start(args.keep_cpus_awake)?;
    let peer = PeerProcess::start(Mode::Replier, 0, args.max_udp_payload, args.runtime)?;
    let rt = args.runtime.build()?;
    let mut samples = rt.block_on(async {
        let node = bench_node(args.max_udp_payload).await?;
        node.add_peer(peer.addr.clone())?;
        tokio::time::timeout(PHASE_TIMEOUT, node.connected(peer.addr.id))
            .await
            .context("the replier did not connect")??;
        tokio::time::timeout(PHASE_TIMEOUT, node.wait_for_service(REQREP_SERVICE, 1))
            .await
            .context("the service did not arrive")??;
        let mut samples = Vec::with_capacity(args.count as usize);
        let mut body = vec![0x5au8; args.size];
        let run = async {
            for i in 0..args.warmup + args.count {
                body[..8].copy_from_slice(&i.to_le_bytes());
                let started = Instant::now();
                let reply = node
                    .request(REQREP_SERVICE, Bytes::copy_from_slice(&body))
                    .timeout(REQUEST_TIMEOUT)
                    .await
                    .with_context(|| format!("request {i}"))?;
                let elapsed = started.elapsed();
                if reply.body[..] != body[..] {
                    bail!("reply {i} is not the request's body");
                }
                if i >= args.warmup {
                    samples.push(elapsed.as_nanos() as u64);
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(PHASE_TIMEOUT, run)
            .await
            .context("the requests did not finish in time")??;
        node.shutdown().await;
        anyhow::Ok(samples)
    })?;
    drop(rt);
    peer.finish()?;
    let count = samples.len();
    let mean_us = samples.iter().sum::<u64>() as f64 / count.max(1) as f64 / 1e3;
    let (p50, p99, p999) = percentiles_us(&mut samples);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "reqrep",
                "size": args.size,
                "count": count,
                "warmup": args.warmup,
                "p50_us": p50,
                "p99_us": p99,
                "p999_us": p999,
                "mean_us": mean_us,
                "runtime": args.runtime.name(),
                "max_udp_payload": args.max_udp_payload,
            })
        );
    } else {
        println!(
            "request/reply, {count} x {} B: p50 {p50:.1} µs, p99 {p99:.1} µs, p99.9 {p999:.1} µs (mean {mean_us:.1} µs)",
            args.size
        );
    }
    Ok(())
}

pub fn run_peer(args: PeerArgs) -> Result<()> {
    let rt = args.runtime.build()?;
    let result = rt.block_on(async {
        let node = bench_node(args.max_udp_payload).await?;
        // Everything this mode listens on exists before the parent learns our address.
        let mut inbox = match args.mode {
            Mode::Sink | Mode::Echo => Some(node.receive(BENCH_CHANNEL)?),
            Mode::Subscriber | Mode::Replier => None,
        };
        let mut subscription = match args.mode {
            Mode::Subscriber => Some(node.subscribe(FANOUT_TOPIC).await?),
            _ => None,
        };
        let mut service = match args.mode {
            Mode::Replier => Some(node.serve(REQREP_SERVICE).await?),
            _ => None,
        };
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
                let inbox = inbox.as_mut().expect("a sink has an inbox");
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
            Mode::Echo => {
                let inbox = inbox.as_mut().expect("an echo has an inbox");
                // Bulk traffic (`--bulk-load`) is taken and dropped.
                let mut bulk = node.receive(BULK_CHANNEL)?;
                let mut dropped = Vec::with_capacity(1024);
                loop {
                    let message = tokio::select! {
                        biased;
                        message = inbox.recv() => message,
                        n = bulk.recv_many(&mut dropped, 1024) => {
                            if n == 0 {
                                break;
                            }
                            dropped.clear();
                            continue;
                        }
                        _ = &mut stdin_closed => break,
                    };
                    let Some(message) = message else { break };
                    // The answer travels in the request's lane.
                    let producer = message.header.id.producer;
                    let echo = node
                        .new_message(ECHO, message.body)
                        .with_priority(message.header.priority);
                    let _receipt = node.send_message(producer, echo).await?;
                }
            }
            Mode::Subscriber => {
                let subscription = subscription.as_mut().expect("a subscriber subscribed");
                let count = args.count;
                let receive = async {
                    let mut received = 0u64;
                    let mut first = None;
                    while received < count {
                        let Some(event) = subscription.recv().await else {
                            bail!("node closed after {received} events");
                        };
                        first.get_or_insert_with(wall_nanos);
                        let mut next = Some(event);
                        // Everything already queued, without a wake per event.
                        while let Some(event) = next {
                            if stamp(&event.body) != Some(received) {
                                bail!(
                                    "event {received} out of order: its counter is {:?}",
                                    stamp(&event.body)
                                );
                            }
                            received += 1;
                            next = if received < count {
                                subscription.try_recv()
                            } else {
                                None
                            };
                        }
                    }
                    anyhow::Ok((received, first.unwrap_or(0), wall_nanos()))
                };
                let (received, first, last) = tokio::select! {
                    result = tokio::time::timeout(PHASE_TIMEOUT, receive) => {
                        result.context("events did not arrive in time")??
                    }
                    _ = &mut stdin_closed => bail!("parent went away"),
                };
                writeln!(out, "RESULT {received} {first} {last}")?;
                out.flush()?;
                let _ = stdin_closed.await;
            }
            Mode::Replier => {
                let service = service.as_mut().expect("a replier serves");
                loop {
                    let request = tokio::select! {
                        request = service.recv() => request,
                        _ = &mut stdin_closed => break,
                    };
                    let Some(request) = request else { break };
                    let body = request.body().clone();
                    request.reply(body).await?;
                }
            }
        }
        drop((subscription, service));
        node.shutdown().await;
        anyhow::Ok(())
    });
    // The stdin reader may still be blocked (after a failure the parent has not closed our
    // stdin yet): exit without waiting for it, so the parent sees us go.
    rt.shutdown_background();
    result
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
