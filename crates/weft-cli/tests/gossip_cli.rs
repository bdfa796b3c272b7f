//! Gossip fan-out across processes: one `weft pub` and seven `weft sub` processes on 127.0.0.1
//! at `--gossip-fanout 2`, so most subscribers get their events only through other subscriber
//! processes relaying them (the in-process relay tests are `tests/integration/gossip.rs`).
//!
//! With seven subscribers at fan-out 2 a publisher's tree is fixed by its layout
//! (`weft_proto::gossip::split`): it sends to two first hops (hops 1); one relays to two
//! subscribers, the other to one subscriber (hops 2) and that one to the last (hops 3). Which
//! process takes which place depends on the ids, so the tests find the places from each
//! subscriber's `/status` (`event_hops_max`, `events_relayed`).
//!
//! Every wait is bounded by [`common::WAIT`]; the tests synchronise on output lines only (the events
//! each subscriber prints, the publisher's stdin carrying the events to publish).

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use common::Running;

/// Subscriber processes.
const SUBSCRIBERS: usize = 7;
/// Their fan-out (and the publisher's): small, so that most subscribers are relayed to.
const FANOUT: &str = "2";
/// What the subscribers subscribe to (a wildcard) and the topic the events go to.
const PATTERN: &str = "ticks/*";
const TOPIC: &str = "ticks/n";

impl Running {
    /// The admin address of a line `metrics on http://ADDR/metrics, status on /status`.
    fn metrics_addr(&self) -> String {
        let rest = self.line_after("metrics on http://");
        rest.split_once("/metrics")
            .unwrap_or_else(|| panic!("{}: malformed metrics line {rest:?}", self.name))
            .0
            .to_owned()
    }

    /// Reads the events `numbers` in this order, each exactly once: a lost, repeated or
    /// reordered event is a different line than the one expected.
    fn expect_events(&self, numbers: std::ops::RangeInclusive<u64>) {
        for n in numbers {
            let line = self.line(&format!("event {n}"));
            assert_eq!(
                event_body(&line),
                format!("event {n}"),
                "{}: expected event {n}, got {line:?}",
                self.name
            );
        }
    }

    /// Hands the publisher (running with TEXT `-`) the events `numbers`, one line each.
    fn publish(&mut self, numbers: std::ops::RangeInclusive<u64>) {
        let text: String = numbers.map(|n| format!("event {n}\n")).collect();
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(text.as_bytes())
            .expect("the publisher reads");
        stdin.flush().unwrap();
    }

    /// Closes the publisher's stdin (its last event) and returns its final line.
    fn finish_publishing(&mut self) -> String {
        drop(self.stdin.take());
        let line = self.line("the publisher's summary");
        self.wait_success();
        line
    }
}

/// The body of a `weft sub` line `TOPIC PUBLISHER BODY`.
fn event_body(line: &str) -> &str {
    line.splitn(3, ' ').nth(2).unwrap_or("")
}

/// A subscriber process and its admin endpoint.
struct Subscriber {
    process: Running,
    /// `ID@ADDR`, for `--peer`.
    addr: String,
    /// The admin address, for `weft status`.
    metrics: String,
}

/// Starts the subscribers, each connected to every earlier one (so the mesh is full: relays
/// reach their children directly), and waits until each has subscribed.
fn start_subscribers(mesh: &str) -> Vec<Subscriber> {
    let mut subscribers: Vec<Subscriber> = Vec::new();
    let mut addrs: Vec<String> = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut args: Vec<String> = [
            "sub",
            "--mesh",
            mesh,
            "--gossip-fanout",
            FANOUT,
            "--metrics",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        for addr in &addrs {
            args.extend(["--peer".to_owned(), addr.clone()]);
        }
        args.push(PATTERN.to_owned());
        let process = Running::start(&format!("subscriber {i}"), &args);
        let addr = process.line_after("node ");
        addrs.push(addr.clone());
        let metrics = process.metrics_addr();
        assert_eq!(
            process.line("subscribed"),
            format!("subscribed to {PATTERN}")
        );
        subscribers.push(Subscriber {
            process,
            addr,
            metrics,
        });
    }
    subscribers
}

/// Starts the publisher, connected to every subscriber, publishing each line of its stdin once
/// all of them subscribed; returns it and its admin address.
fn start_publisher(mesh: &str, subscribers: &[Subscriber]) -> (Running, String) {
    let mut args: Vec<String> = [
        "pub",
        "--mesh",
        mesh,
        "--gossip-fanout",
        FANOUT,
        "--metrics",
        "127.0.0.1:0",
        "--subscribers",
        &SUBSCRIBERS.to_string(),
    ]
    .map(String::from)
    .to_vec();
    for subscriber in subscribers {
        args.extend(["--peer".to_owned(), subscriber.addr.clone()]);
    }
    args.extend([TOPIC.to_owned(), "-".to_owned()]);
    let publisher = Running::start("the publisher", &args);
    let metrics = publisher.metrics_addr();
    (publisher, metrics)
}

/// A node's `/status`, read with `weft status --json`.
fn status(metrics: &str) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--json", "--metrics", metrics])
        .output()
        .expect("weft status runs");
    assert!(
        output.status.success(),
        "weft status --metrics {metrics} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("weft status --json prints JSON")
}

/// One counter of a node's `/status`.
fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["metrics"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {status}"))
}

/// Each subscriber's place in the tree: (`event_hops_max`, `events_relayed`).
fn places(subscribers: &[Subscriber]) -> Vec<(u64, u64)> {
    subscribers
        .iter()
        .map(|s| {
            let status = status(&s.metrics);
            (
                counter(&status, "event_hops_max"),
                counter(&status, "events_relayed"),
            )
        })
        .collect()
}

/// Kills the subscribers and checks that none printed an event beyond those read (a copy that
/// came once more would be one).
fn stop_and_check_nothing_more(subscribers: Vec<Subscriber>) {
    for subscriber in subscribers {
        let name = subscriber.process.name.clone();
        let rest = subscriber.process.kill_and_drain();
        assert!(rest.is_empty(), "{name} printed more: {rest:?}");
    }
}

#[test]
fn every_subscriber_gets_each_event_once_in_order_through_subscriber_relays() {
    const EVENTS: u64 = 50;
    let subscribers = start_subscribers("cli-gossip-tree");
    let (mut publisher, publisher_metrics) = start_publisher("cli-gossip-tree", &subscribers);
    publisher.publish(1..=EVENTS);
    for subscriber in &subscribers {
        subscriber.process.expect_events(1..=EVENTS);
    }

    // The tree of 7 at fan-out 2 (see the module doc): two first hops, four subscribers at
    // hops 2 and one at hops 3; three relays, which relay 5 copies per event in all.
    let places = places(&subscribers);
    let mut hops: Vec<u64> = places.iter().map(|p| p.0).collect();
    hops.sort_unstable();
    assert_eq!(
        hops,
        [1, 1, 2, 2, 2, 2, 3],
        "places (hops, relayed): {places:?}"
    );
    let relays = places.iter().filter(|p| p.1 > 0).count();
    assert_eq!(relays, 3, "places (hops, relayed): {places:?}");
    let relayed: u64 = places.iter().map(|p| p.1).sum();
    assert_eq!(relayed, 5 * EVENTS, "places (hops, relayed): {places:?}");
    for subscriber in &subscribers {
        let status = status(&subscriber.metrics);
        assert_eq!(counter(&status, "events_received"), EVENTS);
    }
    let publisher_status = status(&publisher_metrics);
    assert_eq!(counter(&publisher_status, "events_relayed"), 0);

    assert_eq!(
        publisher.finish_publishing(),
        format!("published {EVENTS} event(s) on {TOPIC} to {SUBSCRIBERS} subscriber(s)")
    );
    stop_and_check_nothing_more(subscribers);
}

#[test]
fn a_relay_killed_mid_stream_costs_no_other_subscriber_an_event() {
    let mut subscribers = start_subscribers("cli-gossip-kill");
    let (mut publisher, publisher_metrics) = start_publisher("cli-gossip-kill", &subscribers);
    publisher.publish(1..=20);
    for subscriber in &subscribers {
        subscriber.process.expect_events(1..=20);
    }
    // The relay to kill: the one at hops 2 that relays (to the one at hops 3). It is not a
    // first hop, so the publisher's own sends never wait for it.
    let places = places(&subscribers);
    let relays_below: Vec<usize> = (0..SUBSCRIBERS)
        .filter(|&i| places[i].0 == 2 && places[i].1 > 0)
        .collect();
    assert_eq!(relays_below.len(), 1, "places (hops, relayed): {places:?}");
    let orphan = places
        .iter()
        .position(|p| p.0 == 3)
        .unwrap_or_else(|| panic!("no subscriber at hops 3: {places:?}"));
    let orphan_name = subscribers[orphan].process.name.clone();
    let victim = subscribers.remove(relays_below[0]);

    // Kill it while events are flowing: the publisher has events 21..=40 and the victim has
    // relayed half of them when it dies; 41..=80 are published after it died.
    publisher.publish(21..=40);
    victim.process.expect_events(21..=30);
    let victim_name = victim.process.name.clone();
    drop(victim.process.kill_and_drain());
    publisher.publish(41..=80);

    let started = Instant::now();
    for subscriber in &subscribers {
        subscriber.process.expect_events(21..=80);
    }
    let publisher_status = status(&publisher_metrics);
    eprintln!(
        "killed {victim_name}; the other {} subscribers had every event {:.1} s later \
         (the publisher repaired {} event copies; {orphan_name} was below it)",
        subscribers.len(),
        started.elapsed().as_secs_f64(),
        counter(&publisher_status, "events_repaired"),
    );
    for subscriber in &subscribers {
        assert_eq!(
            counter(&status(&subscriber.metrics), "events_received"),
            80,
            "{}",
            subscriber.process.name
        );
    }
    let summary = publisher.finish_publishing();
    assert!(
        summary.starts_with(&format!("published 80 event(s) on {TOPIC} to ")),
        "{summary:?}"
    );
    stop_and_check_nothing_more(subscribers);
}

/// Sends `signal` (`-STOP`, `-CONT`) to a process.
fn signal(process: &Running, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &process.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {} failed", process.name);
}

/// A relay that freezes (SIGSTOP) while events flow: the subscriber below it stalls, and the
/// publisher repairs it over the direct link. When the relay thaws (SIGCONT) it relays the
/// events it was holding, so the subscriber below gets them a second time, and each such copy
/// must be recognised and dropped: every subscriber still prints each event exactly once and in
/// order, and the one below counts more copies than events.
#[test]
fn copies_that_arrive_after_a_repair_are_dropped_not_delivered_again() {
    let subscribers = start_subscribers("cli-gossip-thaw");
    let (mut publisher, _) = start_publisher("cli-gossip-thaw", &subscribers);
    publisher.publish(1..=20);
    for subscriber in &subscribers {
        subscriber.process.expect_events(1..=20);
    }
    let places = places(&subscribers);
    let relay = (0..SUBSCRIBERS)
        .find(|&i| places[i].0 == 2 && places[i].1 > 0)
        .unwrap_or_else(|| panic!("no relay at hops 2: {places:?}"));
    let below = places
        .iter()
        .position(|p| p.0 == 3)
        .unwrap_or_else(|| panic!("no subscriber at hops 3: {places:?}"));

    signal(&subscribers[relay].process, "-STOP");
    publisher.publish(21..=40);
    // Everyone but the frozen relay gets 21..=40; the one below it only through the
    // publisher's repair (`event_repair_after`, 2 s).
    for (i, subscriber) in subscribers.iter().enumerate() {
        if i != relay {
            subscriber.process.expect_events(21..=40);
        }
    }
    let repaired = counter(&status(&subscribers[below].metrics), "events_received");
    assert_eq!(
        repaired, 40,
        "{} was repaired",
        subscribers[below].process.name
    );

    signal(&subscribers[relay].process, "-CONT");
    // The thawed relay takes what it held (its parent's copies of 21..=40, and the publisher's
    // repair of them), relays them below, then the new events: on the link to the one below,
    // the stale copies come before 41..=50.
    subscribers[relay].process.expect_events(21..=40);
    publisher.publish(41..=50);
    for subscriber in &subscribers {
        subscriber.process.expect_events(41..=50);
    }
    let below_status = status(&subscribers[below].metrics);
    assert_eq!(counter(&below_status, "events_received"), 50);
    assert!(
        counter(&below_status, "event_copies") > 50,
        "{} got no second copy, so nothing was tested: {below_status}",
        subscribers[below].process.name
    );
    drop(publisher.finish_publishing());
    stop_and_check_nothing_more(subscribers);
}
