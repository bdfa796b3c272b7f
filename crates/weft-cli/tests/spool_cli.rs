//! `weft spool` against real data directories, through the `weft` binary: a node spools messages
//! for an absent peer and dead-letters the expired ones; the commands list, show, replay and purge
//! them; they refuse to touch a running node's spool; a replayed dead letter reaches the peer once
//! both nodes run. Everything stays on 127.0.0.1 (no mDNS).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use weft::{DeliveryError, Node};
use weft_spool::{FsStorage, Spool, SpoolConfig};

/// Bound on every wait: a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl std::future::IntoFuture<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future.into_future()).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A fresh directory under the system temp dir, unique per process and call.
fn tempdir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("weft-spool-cli-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Logs with `RUST_LOG` (e.g. `RUST_LOG=weft=debug`), else warnings only.
fn init_tracing() {
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

async fn start_node(dir: &Path) -> Node {
    init_tracing();
    Node::builder()
        .mesh("spool-cli")
        .data_dir(dir)
        .bind(loopback())
        .configure(|config| {
            config.keep_alive = Duration::from_millis(100);
            config.idle_timeout = Duration::from_millis(600);
            config.reconnect_initial = Duration::from_millis(20);
            config.reconnect_max = Duration::from_millis(200);
        })
        .start()
        .await
        .expect("node starts")
}

/// Runs `weft spool <args> --data-dir <dir>`.
fn weft_spool(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("spool")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("the weft binary runs")
}

/// Runs a `weft spool` command that must succeed and print JSON.
fn weft_spool_json(dir: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let output = weft_spool(dir, &args);
    assert!(
        output.status.success(),
        "weft spool {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "weft spool {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_dead_purge_and_a_replayed_dead_letter_is_delivered() {
    let a_dir = tempdir("a");
    let b_dir = tempdir("b");
    // B's identity exists before B ever runs, so A can address it.
    let b_id = weft::Identity::load_or_create(&b_dir).unwrap().node_id();

    let a = start_node(&a_dir).await;
    for i in 0..3u32 {
        let _pending = a
            .send(b_id, "orders", format!("order {i}").into_bytes())
            .await
            .unwrap();
    }
    let mut expiring = Vec::new();
    for text in ["too late 1", "too late 2"] {
        let message = a.new_message("alerts", text.as_bytes().to_vec());
        let expires = message.created_unix_ms + 100;
        expiring.push(
            a.send_message(b_id, message.with_expiry(expires))
                .await
                .unwrap(),
        );
    }
    for receipt in expiring {
        match within("dead letter", receipt).await {
            Err(DeliveryError::DeadLettered { reason }) => assert_eq!(reason, "expired"),
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    // A running node's spool is never touched.
    for args in [&["ls"][..], &["dead"], &["purge", "--all"]] {
        let refused = weft_spool(&a_dir, args);
        assert!(
            !refused.status.success(),
            "{args:?} ran against a live node"
        );
        let stderr = stderr_of(&refused);
        assert!(
            stderr.contains("is running") && stderr.contains("stop it first"),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one sentence: {stderr}");
    }
    a.shutdown().await;
    drop(a);

    let listing = weft_spool_json(&a_dir, &["ls", "--records"]);
    let destinations = listing["destinations"].as_array().unwrap();
    assert_eq!(destinations.len(), 1, "{listing}");
    let dest = &destinations[0];
    assert_eq!(dest["node_id"], b_id.to_string());
    assert_eq!(dest["node_id_short"], b_id.short());
    assert_eq!(dest["pending"], 3);
    assert_eq!(dest["channels"], serde_json::json!(["orders"]));
    assert!(dest["oldest_age_ms"].as_i64().unwrap() >= 0);
    assert_eq!(listing["dead_letters"], 2);
    assert_eq!(listing["records"].as_array().unwrap().len(), 3);
    assert_eq!(listing["undecodable"], serde_json::json!([]));
    assert_eq!(listing["warnings"], serde_json::json!([]));
    let human = weft_spool(&a_dir, &["ls"]);
    assert!(human.status.success());
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(
        human.contains(&b_id.short()) && human.contains("orders"),
        "{human}"
    );

    let dead = weft_spool_json(&a_dir, &["dead"]);
    let letters = dead["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{dead}");
    for letter in letters {
        assert_eq!(letter["reason"], "expired");
        assert_eq!(letter["entry"], "message");
        assert_eq!(letter["destination"], b_id.to_string());
        assert_eq!(letter["channel"], "alerts");
    }
    let first = letters[0]["seq"].as_u64().unwrap();
    let second = letters[1]["seq"].as_u64().unwrap();

    let shown = weft_spool_json(&a_dir, &["show", &second.to_string()]);
    assert_eq!(shown["state"], "dead letter");
    assert_eq!(shown["reason"], "expired");
    assert_eq!(shown["message"]["channel"], "alerts");
    assert_eq!(shown["message"]["body_utf8"], "too late 2");
    assert!(shown["message"]["expires_unix_ms"].is_u64());
    let body_file = a_dir.join("body.out");
    let human = weft_spool(
        &a_dir,
        &[
            "show",
            &second.to_string(),
            "--body-out",
            body_file.to_str().unwrap(),
        ],
    );
    assert!(human.status.success(), "{}", stderr_of(&human));
    assert_eq!(std::fs::read(&body_file).unwrap(), b"too late 2");

    let purged = weft_spool_json(&a_dir, &["purge", &first.to_string()]);
    assert_eq!(purged["purged"], serde_json::json!([first]));
    let again = weft_spool(&a_dir, &["purge", &first.to_string()]);
    assert!(!again.status.success());
    assert!(stderr_of(&again).contains("not a dead letter"));

    let replayed = weft_spool_json(&a_dir, &["replay", &second.to_string()]);
    let replayed = &replayed["replayed"][0];
    assert_eq!(replayed["dead_seq"], second);
    assert!(replayed["seq"].as_u64().unwrap() > second);
    assert!(
        replayed["notes"][0].as_str().unwrap().contains("cleared"),
        "{replayed}"
    );
    assert_eq!(
        weft_spool_json(&a_dir, &["dead"])["dead_letters"],
        serde_json::json!([])
    );
    let listing = weft_spool_json(&a_dir, &["ls"]);
    assert_eq!(listing["destinations"][0]["pending"], 4);
    assert_eq!(listing["destinations"][0]["unnumbered"], 1);
    assert_eq!(
        listing["destinations"][0]["channels"],
        serde_json::json!(["alerts", "orders"])
    );

    // Both nodes up: the orders and the replayed alert arrive.
    let a = start_node(&a_dir).await;
    let b = start_node(&b_dir).await;
    let mut orders = b.receive("orders").unwrap();
    let mut alerts = b.receive("alerts").unwrap();
    a.add_peer(b.addr().unwrap()).unwrap();
    for i in 0..3u32 {
        let message = within("an order", orders.recv()).await.unwrap();
        assert_eq!(message.body[..], *format!("order {i}").as_bytes());
    }
    let alert = within("the replayed alert", alerts.recv()).await.unwrap();
    assert_eq!(&alert.body[..], b"too late 2");
    orders.settle();
    alerts.settle();
    within("A's spool drains", async {
        while a.metrics().spool_pending > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
    drop((a, b));

    let listing = weft_spool_json(&a_dir, &["ls"]);
    assert_eq!(listing["destinations"], serde_json::json!([]), "{listing}");
    // B keeps its dedup watermark for A's stream: listed apart, not as a message.
    let listing = weft_spool_json(&b_dir, &["ls"]);
    assert_eq!(listing["destinations"], serde_json::json!([]), "{listing}");
    let watermarks = listing["watermarks"].as_array().unwrap();
    assert!(!watermarks.is_empty(), "{listing}");
    assert_eq!(watermarks[0]["up_to"], 4, "{listing}");
    for dir in [a_dir, b_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A payload that is not a spool entry is listed and shown as undecodable, never skipped; replay
/// refuses it; purge --all removes it.
#[test]
fn undecodable_records_are_reported() {
    let dir = tempdir("garbage");
    {
        let storage = FsStorage::open(dir.join("spool")).unwrap();
        let (mut spool, _) = Spool::open(storage, SpoolConfig::default()).unwrap();
        let pending = spool.append(b"not an entry").unwrap();
        let dead = spool.append(b"\x01\x07 also not an entry").unwrap();
        spool.sync().unwrap();
        spool.dead_letter(dead, "test").unwrap();
        spool.sync().unwrap();
        assert!(spool.is_pending(pending));
    }
    let listing = weft_spool_json(&dir, &["ls"]);
    let bad = listing["undecodable"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{listing}");
    let seq = bad[0]["seq"].as_u64().unwrap();
    assert!(bad[0]["error"].as_str().unwrap().contains("too short"));
    let human = weft_spool(&dir, &["ls"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("undecodable record"));

    let shown = weft_spool_json(&dir, &["show", &seq.to_string()]);
    assert_eq!(shown["entry"], "undecodable");
    assert_eq!(shown["payload_hex"], "6e6f7420616e20656e747279");

    let dead = weft_spool_json(&dir, &["dead"]);
    assert_eq!(dead["dead_letters"][0]["entry"], "undecodable");
    assert_eq!(dead["dead_letters"][0]["reason"], "test");
    let dead_seq = dead["dead_letters"][0]["seq"].as_u64().unwrap();
    let refused = weft_spool(&dir, &["replay", &dead_seq.to_string()]);
    assert!(!refused.status.success());
    assert!(stderr_of(&refused).contains("does not decode"));
    let purged = weft_spool_json(&dir, &["purge", "--all"]);
    assert_eq!(purged["purged"], serde_json::json!([dead_seq]));
    let _ = std::fs::remove_dir_all(dir);
}

/// Mistakes get one sentence with the fix, and a non-zero exit.
#[test]
fn mistakes_are_explained() {
    let missing =
        std::env::temp_dir().join(format!("weft-spool-cli-{}-missing", std::process::id()));
    let output = weft_spool(&missing, &["ls"]);
    assert!(!output.status.success());
    assert!(stderr_of(&output).contains("not a directory"));

    let empty = tempdir("empty");
    let output = weft_spool(&empty, &["dead"]);
    assert!(!output.status.success());
    assert!(stderr_of(&output).contains("has no spool"));

    let output = weft_spool(&empty, &["purge"]);
    assert!(!output.status.success(), "purge needs SEQ or --all");
    let _ = std::fs::remove_dir_all(empty);
}

/// A delayed message waiting in a stopped node's spool is listed as scheduled (not as an
/// unnumbered replay), with its due time, by `ls` and `show`; `weft send --delay` refuses a due
/// time beyond the maximum with the typed error's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_are_listed_with_their_due_time() {
    let a_dir = tempdir("a");
    let b_dir = tempdir("b");
    let b_id = weft::Identity::load_or_create(&b_dir).unwrap().node_id();
    let a = start_node(&a_dir).await;
    let sender = a.sender(b_id).unwrap();
    let message = sender
        .new_message("later", &b"in an hour"[..])
        .with_delay(Duration::from_secs(3600));
    let due = message.deliver_after_unix_ms().unwrap();
    let receipt = within("accepted", sender.send_message(message))
        .await
        .unwrap();
    drop((receipt, sender));
    a.shutdown().await;
    drop(a);

    let listing = weft_spool_json(&a_dir, &["ls", "--records"]);
    let dest = &listing["destinations"][0];
    assert_eq!(dest["scheduled"], 1, "{listing}");
    assert_eq!(dest["unnumbered"], 0, "{listing}");
    assert_eq!(dest["next_due_unix_ms"], due);
    let record = &listing["records"][0];
    assert_eq!(record["due_unix_ms"], due);
    assert_eq!(record["wire_seq"], 0);
    let seq = record["seq"].as_u64().unwrap();
    let human = weft_spool(&a_dir, &["ls", "--records"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("scheduled, due"), "{text}");
    assert!(text.contains("1 delayed message(s) waiting"), "{text}");
    let shown = weft_spool_json(&a_dir, &["show", &seq.to_string()]);
    assert_eq!(shown["message"]["due_unix_ms"], due);
    let human = weft_spool(&a_dir, &["show", &seq.to_string()]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("scheduled: unnumbered until due"), "{text}");

    let too_far = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["send", "--data-dir"])
        .arg(&a_dir)
        .args([
            "--bind",
            "127.0.0.1:0",
            "--channel",
            "later",
            "--delay",
            "31d",
        ])
        .arg("--to")
        .arg(format!("{b_id}@127.0.0.1:9"))
        .arg("never")
        .output()
        .unwrap();
    assert!(!too_far.status.success());
    assert!(
        stderr_of(&too_far).contains("bad deliver-after time"),
        "{}",
        stderr_of(&too_far)
    );
}
