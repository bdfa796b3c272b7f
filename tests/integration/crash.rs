//! kill -9, for real: a sender process streams 50 000 messages to a receiver process over
//! loopback while the test SIGKILLs one or the other at random moments and restarts it from its
//! data directory. At the end the receiver has every message, each message id once, in order
//! per sender stream.
//!
//! Both processes are this test binary, re-executed with `--ignored --exact crash::child` and
//! their role in the environment. The applications follow Weft's contract:
//! - the sender logs each number once `send` returned (accepted); after a restart it sends the
//!   numbers it has no log line for. A number accepted just before a kill, whose log line did
//!   not make it, is sent again as a *new* message (another id): the test allows that for at
//!   most one batch per sender restart.
//! - the receiver appends each message to its output file before asking for the next (which is
//!   what settles, i.e. allows the acknowledgement); after a restart it skips ids already in its
//!   file — a message taken but whose watermark was not durable yet comes again, same id.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft::{Identity, Node, NodeAddr};

const COUNT: u32 = 50_000;
const BATCH: usize = 64;
const KILLS: usize = 8;
const CHANNEL: &str = "crash";

fn child_env(name: &str) -> Option<String> {
    std::env::var(format!("WEFT_CRASH_{name}")).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_sender_and_receiver_lose_and_duplicate_nothing() {
    crate::support::init_tracing();
    let root = std::env::temp_dir().join(format!("weft-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let sender_dir = root.join("sender");
    let receiver_dir = root.join("receiver");
    let receiver_id = Identity::load_or_create(&receiver_dir).unwrap().node_id();
    Identity::load_or_create(&sender_dir).unwrap();
    let (sender_port, receiver_port) = (free_port(), free_port());
    let receiver_addr = NodeAddr::new(
        receiver_id,
        SocketAddr::from(([127, 0, 0, 1], receiver_port)),
    );
    let spawn_sender = || {
        spawn_child(
            "sender",
            &sender_dir,
            sender_port,
            Some(&receiver_addr.to_string()),
        )
    };
    let spawn_receiver = || spawn_child("receiver", &receiver_dir, receiver_port, None);

    let mut receiver = spawn_receiver();
    let mut sender = spawn_sender();
    // Seeded, so a failure can be replayed: WEFT_CRASH_SEED=<n>.
    let seed = std::env::var("WEFT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()));
    eprintln!("crash test seed {seed} (WEFT_CRASH_SEED to replay)");
    let mut rng = weft::proto::backoff::SplitMix64::new(seed);
    let (mut sender_kills, mut receiver_kills) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut sender_done = false;
    for _ in 0..KILLS {
        let pause = Duration::from_millis(300 + rng.next_u64() % 700);
        if wait_exit(&mut sender, pause).await.is_some() {
            sender_done = true;
            break;
        }
        if rng.next_u64().is_multiple_of(2) {
            sender.kill().unwrap(); // SIGKILL
            sender.wait().unwrap();
            sender_kills += 1;
            sender = spawn_sender();
        } else {
            receiver.kill().unwrap();
            receiver.wait().unwrap();
            receiver_kills += 1;
            receiver = spawn_receiver();
        }
    }
    if !sender_done {
        let status = wait_exit(
            &mut sender,
            deadline.saturating_duration_since(Instant::now()),
        )
        .await
        .expect("the sender finishes (all accepted and acknowledged) in time");
        assert!(status.success(), "sender failed: {status}");
    }
    // The sender exits only once its spool is empty, i.e. everything was acknowledged, which
    // the receiver does only after writing it down: the output is complete now.
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    eprintln!("killed the sender {sender_kills} times and the receiver {receiver_kills} times");

    let lines = std::fs::read_to_string(receiver_dir.join("received")).unwrap();
    let mut ids = HashSet::new();
    let mut last_seq: BTreeMap<u64, u64> = BTreeMap::new();
    let mut ids_per_number: BTreeMap<u32, usize> = BTreeMap::new();
    for line in lines.lines() {
        let mut fields = line.split(' ');
        let stream: u64 = fields.next().unwrap().parse().unwrap();
        let seq: u64 = fields.next().unwrap().parse().unwrap();
        let number: u32 = fields.next().unwrap().parse().unwrap();
        assert!(ids.insert((stream, seq)), "message {stream}/{seq} twice");
        let last = last_seq.entry(stream).or_default();
        assert!(
            seq > *last,
            "stream {stream}: {seq} after {last}: out of order"
        );
        *last = seq;
        *ids_per_number.entry(number).or_default() += 1;
    }
    let missing: Vec<u32> = (0..COUNT)
        .filter(|n| !ids_per_number.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} numbers lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let resent: usize = ids_per_number.values().map(|n| n - 1).sum();
    assert!(
        resent <= sender_kills * BATCH,
        "{resent} numbers sent twice, more than a batch per sender restart"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The child processes. Ignored in normal runs; the test above runs it with its role set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of sigkilled_sender_and_receiver_lose_and_duplicate_nothing"]
async fn child() {
    let role = child_env("ROLE").expect("WEFT_CRASH_ROLE");
    let dir = PathBuf::from(child_env("DIR").expect("WEFT_CRASH_DIR"));
    let port: u16 = child_env("PORT").unwrap().parse().unwrap();
    crate::support::init_tracing();
    let node = Node::builder()
        .mesh("crash")
        .data_dir(&dir)
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .configure(|config| {
            config.keep_alive = Duration::from_millis(200);
            config.idle_timeout = Duration::from_millis(1_500);
            config.reconnect_initial = Duration::from_millis(20);
            config.reconnect_max = Duration::from_millis(300);
        })
        .start()
        .await
        .expect("node starts");
    match role.as_str() {
        "sender" => {
            let peer: NodeAddr = child_env("PEER").unwrap().parse().unwrap();
            run_sender(&node, peer, &dir).await
        }
        "receiver" => run_receiver(&node, &dir).await,
        other => panic!("unknown role {other}"),
    }
}

async fn run_sender(node: &Node, peer: NodeAddr, dir: &Path) {
    let log_path = dir.join("accepted");
    let done: BTreeSet<u32> = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let sender = node.sender(peer.id).unwrap();
    node.add_peer(peer).unwrap();
    let todo: Vec<u32> = (0..COUNT).filter(|n| !done.contains(n)).collect();
    for chunk in todo.chunks(BATCH) {
        let sends = chunk.iter().map(|&n| {
            let sender = sender.clone();
            async move { (n, sender.send(CHANNEL, n.to_le_bytes().to_vec()).await) }
        });
        for (n, result) in futures_util::future::join_all(sends).await {
            let _receipt = result.expect("send accepted");
            // One write per number: a kill never leaves half a line behind a complete one.
            log.write_all(format!("{n}\n").as_bytes()).unwrap();
        }
    }
    // Stay until every message is acknowledged (the spool is empty), then exit cleanly.
    let deadline = Instant::now() + Duration::from_secs(120);
    while node.metrics().spool_pending > 0 {
        assert!(Instant::now() < deadline, "the spool never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

async fn run_receiver(node: &Node, dir: &Path) {
    let path = dir.join("received");
    let seen: HashSet<(u64, u64)> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    let mut seen = seen;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let mut inbox = node.receive(CHANNEL).unwrap();
    let mut batch = Vec::new();
    loop {
        // Asking for more settles what the previous call returned, which was written below.
        batch.clear();
        if inbox.recv_many(&mut batch, 1024).await == 0 {
            return;
        }
        let mut text = String::new();
        for message in &batch {
            let id = message.header.id;
            if !seen.insert((id.stream.0, id.seq)) {
                continue; // taken before a crash, watermark not yet durable: here again
            }
            let number = u32::from_le_bytes(message.body[..4].try_into().unwrap());
            text.push_str(&format!("{} {} {number}\n", id.stream.0, id.seq));
        }
        out.write_all(text.as_bytes()).unwrap();
    }
}

fn spawn_child(role: &str, dir: &Path, port: u16, peer: Option<&str>) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--ignored",
            "--exact",
            "crash::child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WEFT_CRASH_ROLE", role)
        .env("WEFT_CRASH_DIR", dir)
        .env("WEFT_CRASH_PORT", port.to_string())
        .stdout(Stdio::null());
    if let Some(peer) = peer {
        command.env("WEFT_CRASH_PEER", peer);
    }
    command.spawn().expect("child process starts")
}

/// Waits up to `limit` for the child to exit.
async fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
