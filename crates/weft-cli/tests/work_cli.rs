//! Competing consumers and sharded queues across processes: three `weft pull` workers and one
//! `weft push` producer (its stdin carrying the items), on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Running, WAIT};

const WORKERS: usize = 3;
const QUEUE: &str = "jobs";

/// Starts the workers (credit 4, so the producer spreads its items) and the producer, which
/// knows them all.
fn start(mesh: &str) -> (Vec<Running>, Running) {
    let mut workers = Vec::new();
    let mut args: Vec<String> = ["push", "--mesh", mesh, "--workers", "3"]
        .map(String::from)
        .to_vec();
    for i in 0..WORKERS {
        let worker = Running::start(
            &format!("worker {i}"),
            &["pull", "--mesh", mesh, "--credit", "4", QUEUE],
        );
        args.extend(["--peer".to_owned(), worker.node_addr()]);
        assert_eq!(worker.line("pulling"), format!("pulling from {QUEUE}"));
        workers.push(worker);
    }
    args.extend([QUEUE.to_owned(), "-".to_owned()]);
    let producer = Running::start("weft push", &args);
    (workers, producer)
}

/// The item a `weft pull` line `QUEUE PRODUCER BODY` carries: the number after `item-`.
fn item(line: &str) -> u64 {
    let body = line.splitn(3, ' ').nth(2).unwrap_or("");
    let number = body.rsplit("item-").next().unwrap_or("");
    number
        .parse()
        .unwrap_or_else(|_| panic!("not an item line: {line:?}"))
}

/// Reads the workers' lines into `taken` (item → the workers that printed it, in order) until
/// `done` says so; fails after [`WAIT`].
fn collect(
    workers: &[&Running],
    taken: &mut BTreeMap<u64, Vec<String>>,
    mut done: impl FnMut(&BTreeMap<u64, Vec<String>>) -> bool,
) {
    let started = Instant::now();
    while !done(taken) {
        assert!(
            started.elapsed() < WAIT,
            "items missing after {WAIT:?}: have {:?}",
            taken.keys().collect::<Vec<_>>()
        );
        for worker in workers {
            while let Some(line) = worker.line_within(Duration::from_millis(20)) {
                taken
                    .entry(item(&line))
                    .or_default()
                    .push(worker.name.clone());
            }
        }
    }
}

/// Sends `signal` (`-STOP`, ...) to a process.
fn signal(process: &Running, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &process.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {} failed", process.name);
}

fn items(range: std::ops::Range<u64>) -> String {
    range.map(|n| format!("item-{n}\n")).collect()
}

/// Every item goes to exactly one of the worker processes, all of them get work, and when one
/// freezes and is killed mid-stream the items it held go to the others: each item is printed,
/// and twice only if the killed worker had printed it (taken, its acknowledgement lost).
#[test]
fn each_item_goes_to_one_worker_and_a_killed_workers_items_to_the_others() {
    let (mut workers, mut producer) = start("cli-work");
    producer.write(&items(0..60));
    let mut taken = BTreeMap::new();
    {
        let all: Vec<&Running> = workers.iter().collect();
        collect(&all, &mut taken, |t| t.len() == 60);
    }
    for (n, by) in &taken {
        assert_eq!(by.len(), 1, "item {n} taken by {by:?}");
    }
    for worker in &workers {
        assert!(
            taken.values().any(|by| by[0] == worker.name),
            "{} got no work",
            worker.name
        );
    }
    // Worker 0 freezes (SIGSTOP): the items the producer gives it now stay unprinted, in its
    // hands. Then it is killed (SIGKILL) while the producer keeps pushing.
    let victim = workers.remove(0);
    signal(&victim, "-STOP");
    producer.write(&items(60..90));
    {
        let survivors: Vec<&Running> = workers.iter().collect();
        // Up to the frozen worker's credit of them never reach the survivors by themselves.
        collect(&survivors, &mut taken, |t| t.len() >= 90 - 4);
    }
    let victim_name = victim.name.clone();
    for line in victim.kill_and_drain() {
        taken
            .entry(item(&line))
            .or_default()
            .push(victim_name.clone());
    }
    producer.write(&items(90..120));
    {
        let survivors: Vec<&Running> = workers.iter().collect();
        collect(&survivors, &mut taken, |t| t.len() == 120);
    }
    // Reassigned items may still be on their way: let the producer finish, then drain.
    drop(producer.stdin.take());
    assert_eq!(producer.line("the summary"), "pushed 120 item(s) to jobs");
    producer.wait_success();
    for worker in &workers {
        while let Some(line) = worker.line_within(Duration::from_millis(200)) {
            taken
                .entry(item(&line))
                .or_default()
                .push(worker.name.clone());
        }
    }
    assert_eq!(taken.len(), 120, "every item taken");
    let mut twice = 0;
    for (n, by) in &taken {
        let survivors = by.iter().filter(|w| **w != victim_name).count();
        assert!(survivors <= 1, "item {n} taken by {by:?}");
        if by.len() > 1 {
            assert!(by.contains(&victim_name), "item {n} taken by {by:?}");
            twice += 1;
        }
    }
    assert!(
        twice <= 5,
        "{twice} items taken twice: more than the killed worker could hold"
    );
}

/// Sharded: each key's items go to one worker process, printed in push order.
#[test]
fn each_keys_items_go_to_one_worker_in_order() {
    const KEYS: u64 = 6;
    const PER_KEY: u64 = 20;
    let (workers, mut producer) = {
        let mesh = "cli-shard";
        let mut workers = Vec::new();
        // Every worker known before the first push: keys do not move to late joiners.
        let mut args: Vec<String> = ["push", "--mesh", mesh, "--keyed-lines", "--workers", "3"]
            .map(String::from)
            .to_vec();
        for i in 0..WORKERS {
            let worker = Running::start(&format!("worker {i}"), &["pull", "--mesh", mesh, QUEUE]);
            args.extend(["--peer".to_owned(), worker.node_addr()]);
            assert_eq!(worker.line("pulling"), format!("pulling from {QUEUE}"));
            workers.push(worker);
        }
        args.extend([QUEUE.to_owned(), "-".to_owned()]);
        (workers, Running::start("weft push", &args))
    };
    // Item n has key n % KEYS: the keys' items interleave.
    let lines: String = (0..KEYS * PER_KEY)
        .map(|n| format!("acct-{} item-{n}\n", n % KEYS))
        .collect();
    producer.write(&lines);
    drop(producer.stdin.take());
    assert_eq!(
        producer.line("the summary"),
        format!("pushed {} item(s) to {QUEUE}", KEYS * PER_KEY)
    );
    producer.wait_success();
    let mut taken = BTreeMap::new();
    let mut order: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let started = Instant::now();
    while taken.len() < (KEYS * PER_KEY) as usize {
        assert!(started.elapsed() < WAIT, "items missing: {}", taken.len());
        for worker in &workers {
            while let Some(line) = worker.line_within(Duration::from_millis(20)) {
                let n = item(&line);
                assert!(
                    taken.insert(n, worker.name.clone()).is_none(),
                    "item {n} twice"
                );
                order.entry(n % KEYS).or_default().push(n);
            }
        }
    }
    for key in 0..KEYS {
        let owners: std::collections::BTreeSet<_> = (0..PER_KEY)
            .map(|i| taken[&(key + i * KEYS)].clone())
            .collect();
        assert_eq!(owners.len(), 1, "key {key} went to {owners:?}");
        let expected: Vec<u64> = (0..PER_KEY).map(|i| key + i * KEYS).collect();
        assert_eq!(order[&key], expected, "key {key} in push order");
    }
}
