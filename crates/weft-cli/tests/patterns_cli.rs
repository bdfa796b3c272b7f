//! `weft sub`/`weft pub`, `weft rep`/`weft req` and `weft pull`/`weft push` as separate
//! processes on 127.0.0.1.

mod common;

use std::process::Command;

use common::Running;

fn run(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .output()
        .expect("weft runs");
    assert!(
        output.status.success(),
        "weft {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn sub_prints_what_pub_publishes() {
    let mut sub = Running::start(
        "weft sub",
        &["sub", "--mesh", "cli-pubsub", "--count", "2", "orders/*"],
    );
    let addr = sub.node_addr();
    assert_eq!(sub.line("subscribed"), "subscribed to orders/*");
    let out = run(&[
        "pub",
        "--mesh",
        "cli-pubsub",
        "--peer",
        &addr,
        "--subscribers",
        "1",
        "--repeat",
        "2",
        "orders/created",
        "order 7",
    ]);
    assert_eq!(
        out.trim(),
        "published 2 event(s) on orders/created to 1 subscriber(s)"
    );
    for _ in 0..2 {
        let line = sub.line("an event");
        assert!(
            line.starts_with("orders/created ") && line.ends_with(" order 7"),
            "{line:?}"
        );
    }
    sub.wait_success();
}

/// By default `weft pub` waits for a subscriber and fails, saying so, when none comes; with
/// `--subscribers 0` it publishes to nobody and says that.
#[test]
fn pub_without_subscribers_fails_unless_told_to_publish_to_nobody() {
    let output = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["pub", "--mesh", "cli-nobody", "--wait-secs", "1"])
        .args(["orders/created", "order 7"])
        .output()
        .expect("weft runs");
    assert!(!output.status.success(), "published to nobody by default");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("fewer than 1 subscriber(s) of \"orders/created\" within 1 s"),
        "{stderr}"
    );
    let out = run(&[
        "pub",
        "--mesh",
        "cli-nobody",
        "--subscribers",
        "0",
        "orders/created",
        "order 7",
    ]);
    assert_eq!(
        out.trim(),
        "published 1 event(s) on orders/created to 0 subscriber(s)"
    );
}

/// A JSON line of a `--json` command's output.
fn json_line(running: &Running, what: &str) -> serde_json::Value {
    let line = running.line(what);
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: {line:?} is not JSON: {e}"))
}

/// The address a command started with `--json` prints on its first line, to pass as `--peer`.
fn json_node_addr(running: &Running) -> String {
    json_line(running, "the node line")["node"]
        .as_str()
        .expect("a node address")
        .to_owned()
}

/// With `--json` every output line is one JSON object: status lines by name, each message
/// with its channel, id, headers and body (text, or hex when it is not UTF-8).
#[test]
fn the_pattern_commands_speak_json_when_asked() {
    let sub = Running::start(
        "weft sub --json",
        &[
            "sub", "--json", "--mesh", "cli-json", "--count", "1", "orders/*",
        ],
    );
    let addr = json_node_addr(&sub);
    assert_eq!(json_line(&sub, "subscribed")["subscribed"], "orders/*");
    let out = run(&[
        "pub",
        "--json",
        "--mesh",
        "cli-json",
        "--peer",
        &addr,
        "orders/created",
        "order \"7\"\tpaid",
    ]);
    let published: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(published["published"], 1);
    assert_eq!(published["subscribers"], 1);
    let event = json_line(&sub, "the event");
    assert_eq!(event["channel"], "orders/created");
    assert_eq!(
        event["body"], "order \"7\"\tpaid",
        "quotes and tabs survive"
    );
    assert_eq!(event["kind"], "event");
    assert!(event["seq"].as_u64().is_some() && event["producer"].as_str().is_some());

    let pull = Running::start(
        "weft pull --json",
        &[
            "pull", "--json", "--mesh", "cli-json", "--count", "1", "jobs",
        ],
    );
    let addr = json_node_addr(&pull);
    assert_eq!(json_line(&pull, "pulling")["pulling"], "jobs");
    let out = run(&[
        "push",
        "--json",
        "--mesh",
        "cli-json",
        "--peer",
        &addr,
        "--workers",
        "1",
        "jobs",
        "img-1.png",
    ]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap(),
        serde_json::json!({ "pushed": 1, "queue": "jobs" })
    );
    let item = json_line(&pull, "the item");
    assert_eq!(item["body"], "img-1.png");
    assert!(item["channel"].as_str().unwrap().ends_with("jobs"));
}

#[test]
fn req_prints_what_rep_answers() {
    let mut rep = Running::start(
        "weft rep",
        &[
            "rep",
            "--mesh",
            "cli-reqrep",
            "--reply",
            "42.50",
            "--count",
            "1",
            "pricing",
        ],
    );
    let addr = rep.node_addr();
    assert_eq!(rep.line("serving"), "serving pricing");
    let out = run(&[
        "req",
        "--mesh",
        "cli-reqrep",
        "--peer",
        &addr,
        "pricing",
        "sku-9",
    ]);
    assert_eq!(out.trim(), "42.50");
    let line = rep.line("the request");
    assert!(
        line.starts_with("pricing ") && line.ends_with(" sku-9"),
        "{line:?}"
    );
    rep.wait_success();
}

#[test]
fn req_without_a_server_fails_with_a_clear_sentence() {
    let output = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "req",
            "--mesh",
            "cli-none",
            "--wait-secs",
            "0",
            "nobody",
            "q",
        ])
        .output()
        .expect("weft runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no node answers \"nobody\""), "{stderr}");
}

/// Connected to a mesh whose nodes answer other services, `weft req` fails as soon as their
/// interest is known, not after `--wait-secs`.
#[test]
fn req_fails_at_once_when_the_connected_mesh_has_no_such_service() {
    let mut rep = Running::start(
        "weft rep",
        &["rep", "--mesh", "cli-fast", "--count", "1", "pricing"],
    );
    let addr = rep.node_addr();
    assert_eq!(rep.line("serving"), "serving pricing");
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "req",
            "--mesh",
            "cli-fast",
            "--peer",
            &addr,
            "--wait-secs",
            "120",
        ])
        .args(["shipping", "q"])
        .output()
        .expect("weft runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no node answers \"shipping\" among the connected ones"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "failed at once, not after --wait-secs ({:?})",
        started.elapsed()
    );
    // The service it does answer still works from the same mesh.
    let out = run(&[
        "req", "--mesh", "cli-fast", "--peer", &addr, "pricing", "sku-1",
    ]);
    assert_eq!(out.trim(), "sku-1");
    rep.wait_success();
}

#[test]
fn pull_prints_what_push_pushes() {
    let mut pull = Running::start(
        "weft pull",
        &["pull", "--mesh", "cli-work", "--count", "3", "thumbnails"],
    );
    let addr = pull.node_addr();
    assert_eq!(pull.line("pulling"), "pulling from thumbnails");
    let out = run(&[
        "push",
        "--mesh",
        "cli-work",
        "--peer",
        &addr,
        "--repeat",
        "3",
        "thumbnails",
        "img-1",
    ]);
    assert_eq!(out.trim(), "pushed 3 item(s) to thumbnails");
    for _ in 0..3 {
        let line = pull.line("an item");
        assert!(
            line.starts_with("thumbnails ") && line.ends_with(" img-1"),
            "{line:?}"
        );
    }
    pull.wait_success();
}

#[test]
fn a_gossip_fanout_of_zero_is_refused_with_a_clear_sentence() {
    for command in ["sub", "pub"] {
        let output = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args([command, "--gossip-fanout", "0", "orders/created", "x"])
            .output()
            .expect("weft runs");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("invalid value '0' for '--gossip-fanout <N>': 0 is not a fan-out"),
            "{stderr}"
        );
    }
}

/// `--header` and `--idempotency-key` on `weft pub`: the subscriber sees both (`--json`), and
/// the three events published under one key are handed on once.
#[test]
fn pub_sets_headers_and_a_key_that_the_subscriber_sees_once() {
    let sub = Running::start(
        "weft sub --json",
        &[
            "sub", "--json", "--mesh", "cli-keys", "--count", "2", "orders/*",
        ],
    );
    let addr = json_node_addr(&sub);
    assert_eq!(json_line(&sub, "subscribed")["subscribed"], "orders/*");
    run(&[
        "pub",
        "--mesh",
        "cli-keys",
        "--peer",
        &addr,
        "--header",
        "trace-id=4bf92f35",
        "--idempotency-key",
        "order-7",
        "--repeat",
        "3",
        "orders/created",
        "order 7",
    ]);
    run(&[
        "pub",
        "--mesh",
        "cli-keys",
        "--peer",
        &addr,
        "orders/created",
        "marker",
    ]);
    let event = json_line(&sub, "the keyed event");
    assert_eq!(event["body"], "order 7");
    assert_eq!(
        event["headers"],
        serde_json::json!([
            { "name": "trace-id", "value": "4bf92f35" },
            { "name": "weft-idempotency-key", "value": "order-7" },
        ])
    );
    let next = json_line(&sub, "the next event");
    assert_eq!(next["body"], "marker", "the two repeats were dropped");
    // A reserved or malformed header is refused before anything is sent.
    let output = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["pub", "--mesh", "cli-keys", "--subscribers", "0"])
        .args(["--header", "weft-x=1", "orders/created", "x"])
        .output()
        .expect("weft runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reserved for the mesh"), "{stderr}");
}
