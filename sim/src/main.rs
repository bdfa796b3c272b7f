//! `weft-sim`: run one seed of a scenario, or sweep many, and report broken guarantees.
//!
//! `run` prints a summary of the run, the first violations, and as its last two lines
//! `trace-hash: <hex>` and `violations: <count>`; it exits non-zero on any violation. A
//! `gossip-scale` run prints before those what its gossip trees cost:
//!
//! - `coverage: <fraction>`: required (subscription, event) pairs delivered over those the
//!   coverage rule requires (1 for a clean run);
//! - `copies-per-delivery: <ratio>`: event copies the nodes received over events they took in
//!   order (`event_copies` / `events_received`, summed over every node and incarnation; at
//!   most 1.3);
//! - `hops-max: <n>`: the most links an event crossed (`event_hops_max`; at most
//!   ⌊log2(nodes)⌋ + 2).
//!
//! `sweep` runs a range of seeds (of one scenario or all of them), prints a line per scenario
//! and, for every failing seed, the exact command that replays it (and for `gossip-scale` the
//! cost of each seed and the worst). With `--canary` a deliberate driver bug is switched on and
//! the sweep reports on how many seeds the checkers caught it.
//!
//! Output is quiet unless `RUST_LOG` is set (`RUST_LOG=weft=debug`, `RUST_LOG=info`, ...).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use weft_sim::check::{Checker, GossipCost, COPIES_PER_DELIVERY_MAX};
use weft_sim::history::Event;
use weft_sim::scenario::FaultAction;
use weft_sim::{run, Canary, Outcome, ScenarioKind};

/// How many violations a run prints in full.
const VIOLATIONS_SHOWN: usize = 10;
/// How many seeds a canary sweep lists as escaped.
const ESCAPED_SHOWN: usize = 10;
/// Runs of more nodes than this print a summary of the pub/sub plan, not a line per node.
const PLAN_NODES_SHOWN: usize = 10;

#[derive(Debug, Parser)]
#[command(
    name = "weft-sim",
    about = "Deterministic simulation of Weft nodes under turmoil"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one seed of one scenario and check it.
    Run {
        /// partition, hold, loss, latency, crash, disk, bitrot, spool-full, pubsub, work or
        /// gossip-scale.
        #[arg(long)]
        scenario: ScenarioKind,
        /// The run seed: everything in the run derives from it.
        #[arg(long)]
        seed: u64,
        /// Switch on a deliberate driver bug (the checkers must then report violations).
        #[arg(long)]
        canary: Option<CanaryArg>,
        /// Print the whole recorded history.
        #[arg(long)]
        trace: bool,
    },
    /// Run a range of seeds and summarise.
    Sweep {
        /// A scenario, or `all` (every scenario but gossip-scale, whose hundred nodes take a
        /// minute a run).
        #[arg(long)]
        scenario: String,
        /// Seeds as `A..B` (B excluded), `A..=B`, or a single seed.
        #[arg(long)]
        seeds: String,
        /// Switch on a deliberate driver bug and report how often it is caught.
        #[arg(long)]
        canary: Option<CanaryArg>,
        /// Run every seed twice and fail if the trace hashes differ.
        #[arg(long)]
        twice: bool,
        /// Runs in parallel (each run is single-threaded).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Print `<scenario> <seed> <trace-hash>` for every run (diff two sweeps to check
        /// determinism across processes or machines).
        #[arg(long)]
        hashes: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CanaryArg {
    NoDedup,
    NoRetransmit,
    AckBeforeFsync,
    WatermarkAfterAck,
    DropEvent,
}

impl From<CanaryArg> for Canary {
    fn from(arg: CanaryArg) -> Canary {
        match arg {
            CanaryArg::NoDedup => Canary::NoDedup,
            CanaryArg::NoRetransmit => Canary::NoRetransmit,
            CanaryArg::AckBeforeFsync => Canary::AckBeforeFsync,
            CanaryArg::WatermarkAfterAck => Canary::WatermarkAfterAck,
            CanaryArg::DropEvent => Canary::DropEvent,
        }
    }
}

/// Log timestamps in simulated time, which is what the history and the violations report.
#[derive(Debug)]
struct SimulatedTime;

impl tracing_subscriber::fmt::time::FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(elapsed) => write!(w, "{:>9.3}s", elapsed.as_secs_f64()),
            None => write!(w, "{:>10}", "-"),
        }
    }
}

/// Logs to stderr only when `RUST_LOG` is set (as `tracing_subscriber::filter::Targets`, e.g.
/// `RUST_LOG=weft=debug,weft_sim=info`): a sweep is quiet by default.
fn init_tracing() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let Ok(spec) = std::env::var("RUST_LOG") else {
        return;
    };
    let filter = match spec.parse::<Targets>() {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!("ignoring RUST_LOG={spec:?}: {error}");
            return;
        }
    };
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_timer(SimulatedTime),
        )
        .with(filter)
        .try_init();
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            scenario,
            seed,
            canary,
            trace,
        } => Ok(run_one(scenario, seed, canary.map(Canary::from), trace)),
        Command::Sweep {
            scenario,
            seeds,
            canary,
            twice,
            jobs,
            hashes,
        } => sweep(
            &scenario,
            &seeds,
            SweepOptions {
                canary: canary.map(Canary::from),
                twice,
                jobs,
                hashes,
            },
        ),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn replay_command(kind: ScenarioKind, seed: u64, canary: Option<Canary>) -> String {
    let mut command =
        format!("cargo run --release -p weft-sim -- run --scenario {kind} --seed {seed}");
    if let Some(canary) = canary {
        command.push_str(" --canary ");
        command.push_str(canary.name());
    }
    command
}

/// Counts of what happened in a run, from its history and metrics.
#[derive(Debug, Default)]
struct Tally {
    accepted: usize,
    scheduled: usize,
    released: usize,
    delivered: usize,
    acked: usize,
    peer_up: usize,
    peer_down: usize,
    faults: usize,
    not_accepted: usize,
    dead_lettered: usize,
    crashes: usize,
    retransmitted: u64,
    duplicates_dropped: u64,
    dial_failures: u64,
    published: usize,
    publishes_interrupted: usize,
    publishes_settled: usize,
    events_received: usize,
}

fn tally(outcome: &Outcome) -> Tally {
    let mut tally = Tally::default();
    for record in &outcome.records {
        match record.event {
            Event::Accepted { .. } => tally.accepted += 1,
            Event::Scheduled { .. } => tally.scheduled += 1,
            Event::Released { .. } => tally.released += 1,
            Event::Delivered { .. } => tally.delivered += 1,
            Event::Acked { .. } => tally.acked += 1,
            Event::PeerUp { .. } => tally.peer_up += 1,
            Event::PeerDown { .. } => tally.peer_down += 1,
            Event::SendFailed { .. } | Event::SendInterrupted { .. } => tally.not_accepted += 1,
            Event::DeadLettered { .. } => tally.dead_lettered += 1,
            Event::Fault(FaultAction::Crash { ref nodes, .. }) => {
                tally.faults += 1;
                tally.crashes += nodes.len();
            }
            Event::Fault(_) => tally.faults += 1,
            Event::Published { .. } => tally.published += 1,
            Event::PublishInterrupted { .. } => tally.publishes_interrupted += 1,
            Event::PublishSettled { .. } => tally.publishes_settled += 1,
            Event::EventReceived { .. } | Event::ItemTaken { .. } => tally.events_received += 1,
            Event::Pushed { .. } => tally.published += 1,
            Event::PushInterrupted { .. } => tally.publishes_interrupted += 1,
            _ => {}
        }
    }
    for metrics in &outcome.metrics {
        tally.retransmitted += metrics.retransmitted;
        tally.duplicates_dropped += metrics.duplicates;
        tally.dial_failures += metrics.dial_failures;
    }
    tally
}

/// How long after its last fault, pause and planned send the run settled (`None`: it never did).
fn drain_time(outcome: &Outcome) -> Option<Duration> {
    let quiet = outcome.scenario.quiet_from();
    outcome
        .settled_at
        .map(|settled| settled.saturating_sub(quiet))
}

fn run_one(kind: ScenarioKind, seed: u64, canary: Option<Canary>, trace: bool) -> bool {
    let outcome = run(kind, seed, canary);
    let scenario = &outcome.scenario;
    if trace {
        for record in &outcome.records {
            println!("{record}");
        }
    }
    println!(
        "scenario {kind}, seed {seed}{}: {} nodes, {} messages and {} events planned",
        canary.map_or(String::new(), |c| format!(", canary {}", c.name())),
        scenario.nodes,
        scenario.planned_messages(),
        scenario.planned_publishes()
    );
    if let Some(plan) = &scenario.pubsub {
        for (node, patterns) in plan.patterns.iter().enumerate() {
            if scenario.nodes <= PLAN_NODES_SHOWN || !plan.publishes[node].is_empty() {
                println!(
                    "  node {node} subscribes to {patterns:?}, publishes {} events",
                    plan.publishes[node].len()
                );
            }
        }
        if scenario.nodes > PLAN_NODES_SHOWN {
            let others = plan.publishes.iter().filter(|p| p.is_empty()).count();
            let subscribing = |pattern: Option<&str>| {
                plan.patterns
                    .iter()
                    .zip(&plan.publishes)
                    .filter(|(patterns, publishes)| {
                        publishes.is_empty()
                            && match pattern {
                                Some(pattern) => patterns.contains(&pattern),
                                None => !patterns.is_empty(),
                            }
                    })
                    .count()
            };
            println!(
                "  of the {others} other nodes, {} subscribe ({} of them to \"**\" too)",
                subscribing(None),
                subscribing(Some("**"))
            );
        }
    }
    for fault in &scenario.faults {
        println!("  {:>7.3}s {}", fault.at.as_secs_f64(), fault.action);
    }
    for (node, pauses) in scenario.pauses.iter().enumerate() {
        for pause in pauses {
            println!(
                "  node {node} consumer paused {:.3}s..{:.3}s",
                pause.from.as_secs_f64(),
                pause.until.as_secs_f64()
            );
        }
    }
    let tally = tally(&outcome);
    println!(
        "accepted {}, not accepted {}, delivered {}, acked {}, dead-lettered {}; node crashes {}; connections up {}, down {}",
        tally.accepted,
        tally.not_accepted,
        tally.delivered,
        tally.acked,
        tally.dead_lettered,
        tally.crashes,
        tally.peer_up,
        tally.peer_down
    );
    if tally.scheduled > 0 {
        println!(
            "delayed: scheduled {}, released with a receipt {} (the rest after a crash, without one)",
            tally.scheduled, tally.released
        );
    }
    if scenario.work.is_some() {
        println!(
            "pushed {}, interrupted {}; taken {}",
            tally.published, tally.publishes_interrupted, tally.events_received
        );
    }
    if scenario.pubsub.is_some() {
        println!(
            "published {}, interrupted {}, acknowledged by every subscriber {}; received {}",
            tally.published,
            tally.publishes_interrupted,
            tally.publishes_settled,
            tally.events_received
        );
    }
    println!(
        "driver: retransmitted {}, duplicates dropped {}, dial failures {}",
        tally.retransmitted, tally.duplicates_dropped, tally.dial_failures
    );
    let spools: Vec<String> = outcome
        .spool_disk
        .iter()
        .map(|(files, bytes, written)| {
            format!(
                "{files} files {:.1} KiB (of {:.1} KiB written)",
                *bytes as f64 / 1024.0,
                *written as f64 / 1024.0
            )
        })
        .collect();
    println!("spools at the end: {}", spools.join(", "));
    println!(
        "simulated {:.1}s in {:.3}s wall; {}",
        outcome.simulated.as_secs_f64(),
        outcome.wall.as_secs_f64(),
        match drain_time(&outcome) {
            Some(drain) => format!(
                "settled {:.3}s after the last fault, pause and planned send",
                drain.as_secs_f64()
            ),
            None => "never settled (receipts unresolved at the end)".to_string(),
        }
    );
    if !outcome.violations.is_empty() {
        let mut per_checker: BTreeMap<&str, usize> = BTreeMap::new();
        for violation in &outcome.violations {
            *per_checker.entry(violation.checker.name()).or_default() += 1;
        }
        let summary: Vec<String> = per_checker
            .iter()
            .map(|(name, count)| format!("{name} {count}"))
            .collect();
        println!(
            "VIOLATIONS ({}), first {}:",
            summary.join(", "),
            VIOLATIONS_SHOWN.min(outcome.violations.len())
        );
        for violation in outcome.violations.iter().take(VIOLATIONS_SHOWN) {
            println!("  {violation}");
        }
        println!("replay: {}", replay_command(kind, seed, canary));
        if let Some(bug) = kind.known_bug() {
            println!("known bug of the node this scenario fails on: {bug}");
        }
    }
    if let Some(cost) = &outcome.gossip {
        println!(
            "coverage: {:.4} ({} of {} required deliveries)",
            cost.coverage.fraction(),
            cost.coverage.delivered,
            cost.coverage.required
        );
        println!(
            "copies-per-delivery: {:.4} ({} copies, {} events received in order, {} repaired; at most {COPIES_PER_DELIVERY_MAX})",
            cost.copies_per_delivery(),
            cost.copies,
            cost.received,
            cost.repaired
        );
        println!("hops-max: {} (at most {})", cost.hops_max, cost.hops_bound);
    }
    println!("trace-hash: {}", outcome.trace_hash.to_hex());
    println!("violations: {}", outcome.violations.len());
    outcome.passed()
}

fn parse_seeds(text: &str) -> anyhow::Result<Vec<u64>> {
    let number = |part: &str| {
        part.trim()
            .parse::<u64>()
            .with_context(|| format!("bad seed {part:?} in --seeds {text:?}"))
    };
    let seeds: Vec<u64> = if let Some((low, high)) = text.split_once("..=") {
        (number(low)?..=number(high)?).collect()
    } else if let Some((low, high)) = text.split_once("..") {
        (number(low)?..number(high)?).collect()
    } else {
        vec![number(text)?]
    };
    if seeds.is_empty() {
        bail!("--seeds {text:?} is empty");
    }
    Ok(seeds)
}

/// What a sweep keeps of one run.
#[derive(Debug)]
struct SeedResult {
    seed: u64,
    violations: usize,
    first_violation: Option<String>,
    checkers: Vec<&'static str>,
    nondeterministic: Option<(String, String)>,
    trace_hash: String,
    simulation_failed: bool,
    wall: Duration,
    peer_down: usize,
    retransmitted: u64,
    duplicates_dropped: u64,
    drain: Option<Duration>,
    gossip: Option<GossipCost>,
}

fn run_seed(kind: ScenarioKind, seed: u64, canary: Option<Canary>, twice: bool) -> SeedResult {
    let outcome = run(kind, seed, canary);
    let mut wall = outcome.wall;
    let nondeterministic = if twice {
        let again = run(kind, seed, canary);
        wall += again.wall;
        (again.trace_hash != outcome.trace_hash).then(|| {
            (
                outcome.trace_hash.to_hex().to_string(),
                again.trace_hash.to_hex().to_string(),
            )
        })
    } else {
        None
    };
    let tally = tally(&outcome);
    let mut checkers: Vec<&'static str> = outcome
        .violations
        .iter()
        .map(|violation| violation.checker.name())
        .collect();
    checkers.dedup();
    SeedResult {
        seed,
        violations: outcome.violations.len(),
        first_violation: outcome.violations.first().map(ToString::to_string),
        simulation_failed: outcome
            .violations
            .iter()
            .any(|violation| violation.checker == Checker::Simulation),
        checkers,
        nondeterministic,
        trace_hash: outcome.trace_hash.to_hex().to_string(),
        wall,
        peer_down: tally.peer_down,
        retransmitted: tally.retransmitted,
        duplicates_dropped: tally.duplicates_dropped,
        drain: drain_time(&outcome),
        gossip: outcome.gossip,
    }
}

/// Runs every seed of `kind`, `jobs` at a time, in seed order in the result.
fn run_seeds(
    kind: ScenarioKind,
    seeds: &[u64],
    canary: Option<Canary>,
    twice: bool,
    jobs: usize,
) -> Vec<SeedResult> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(seeds.len()));
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let position = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(position) else {
                    return;
                };
                let result = run_seed(kind, seed, canary, twice);
                results
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(result);
            });
        }
    });
    let mut results = results
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    results.sort_by_key(|result| result.seed);
    results
}

/// What the gossip trees cost in each of a sweep's runs that measured it, then the worst of
/// them: lowest coverage, most copies per delivery, most hops, each with its seed (nothing if
/// no run measured it).
fn gossip_lines(results: &[SeedResult]) -> Vec<String> {
    let costs: Vec<(u64, &GossipCost)> = results
        .iter()
        .filter_map(|result| result.gossip.as_ref().map(|cost| (result.seed, cost)))
        .collect();
    let mut lines: Vec<String> = costs
        .iter()
        .map(|(seed, cost)| {
            format!(
                "seed {seed}: coverage {:.4}, copies-per-delivery {:.4}, hops-max {}",
                cost.coverage.fraction(),
                cost.copies_per_delivery(),
                cost.hops_max
            )
        })
        .collect();
    lines.extend(gossip_worst(&costs));
    lines
}

/// The worst of `costs` (`None` if empty).
fn gossip_worst(costs: &[(u64, &GossipCost)]) -> Option<String> {
    let worst = |key: fn(&GossipCost) -> f64| {
        costs
            .iter()
            .map(|&(seed, cost)| (key(cost), seed))
            // On a tie, the first seed.
            .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
    };
    let (coverage, coverage_seed) = worst(|cost| -cost.coverage.fraction())?;
    let (copies, copies_seed) = worst(GossipCost::copies_per_delivery)?;
    let (hops, hops_seed) = worst(|cost| cost.hops_max as f64)?;
    Some(format!(
        "gossip, worst of {} runs: coverage {:.4} (seed {coverage_seed}), copies-per-delivery {copies:.4} (seed {copies_seed}), hops-max {hops} (seed {hops_seed})",
        costs.len(),
        -coverage
    ))
}

/// How a sweep runs and what it prints.
#[derive(Debug, Clone, Copy)]
struct SweepOptions {
    canary: Option<Canary>,
    twice: bool,
    jobs: usize,
    hashes: bool,
}

fn sweep(scenario: &str, seeds: &str, options: SweepOptions) -> anyhow::Result<bool> {
    let SweepOptions {
        canary,
        twice,
        jobs,
        hashes,
    } = options;
    let kinds: Vec<ScenarioKind> = if scenario == "all" {
        ScenarioKind::SWEPT.to_vec()
    } else {
        vec![scenario.parse().map_err(anyhow::Error::msg)?]
    };
    let seeds = parse_seeds(seeds)?;
    let started = Instant::now();
    let mut all_passed = true;
    let mut canary_caught = 0;
    for kind in kinds {
        let kind_started = Instant::now();
        let results = run_seeds(kind, &seeds, canary, twice, jobs);
        let wall = kind_started.elapsed();
        if hashes {
            for result in &results {
                println!("{kind} {} {}", result.seed, result.trace_hash);
            }
        }
        let runs = results.len() as f64;
        let slowest = results
            .iter()
            .map(|result| result.wall)
            .max()
            .unwrap_or_default();
        let mean = |value: fn(&SeedResult) -> f64| results.iter().map(value).sum::<f64>() / runs;
        let diverged: Vec<&SeedResult> = results
            .iter()
            .filter(|result| result.nondeterministic.is_some())
            .collect();
        let slowest_drain = results
            .iter()
            .filter_map(|result| result.drain.map(|drain| (drain, result.seed)))
            .max();
        let unsettled = results
            .iter()
            .filter(|result| result.drain.is_none())
            .count();
        let stats = format!(
            "{:.2}s wall ({:.3}s/run, slowest {:.3}s); per run: {:.1} connection losses, {:.1} retransmitted, {:.1} duplicates dropped; slowest drain {}; {unsettled} never settled",
            wall.as_secs_f64(),
            mean(|r| r.wall.as_secs_f64()),
            slowest.as_secs_f64(),
            mean(|r| r.peer_down as f64),
            mean(|r| r.retransmitted as f64),
            mean(|r| r.duplicates_dropped as f64),
            slowest_drain.map_or("-".to_string(), |(drain, seed)| format!(
                "{:.3}s (seed {seed})",
                drain.as_secs_f64()
            )),
        );
        match canary {
            None => {
                let failed: Vec<&SeedResult> = results
                    .iter()
                    .filter(|result| result.violations > 0)
                    .collect();
                println!(
                    "{kind}: {} seeds, {} failed{}, {stats}",
                    results.len(),
                    failed.len(),
                    if twice {
                        format!(", {} nondeterministic", diverged.len())
                    } else {
                        String::new()
                    }
                );
                for result in &failed {
                    println!(
                        "  FAIL {kind} seed {}: {} violations ({}); first: {}",
                        result.seed,
                        result.violations,
                        result.checkers.join(", "),
                        result.first_violation.as_deref().unwrap_or("-")
                    );
                    println!("    replay: {}", replay_command(kind, result.seed, None));
                }
                if let (Some(bug), false) = (kind.known_bug(), failed.is_empty()) {
                    println!("  known bug of the node {kind} fails on: {bug}");
                }
                all_passed &= failed.is_empty();
            }
            Some(canary) => {
                // A failed simulation is not the canary being caught: it is a failure.
                let broken: Vec<&SeedResult> = results
                    .iter()
                    .filter(|result| result.simulation_failed)
                    .collect();
                let caught = results
                    .iter()
                    .filter(|result| result.violations > 0 && !result.simulation_failed)
                    .count();
                canary_caught += caught;
                let mut by_checker: BTreeMap<&str, usize> = BTreeMap::new();
                for result in &results {
                    for checker in &result.checkers {
                        *by_checker.entry(checker).or_default() += 1;
                    }
                }
                let by_checker: Vec<String> = by_checker
                    .iter()
                    .map(|(name, count)| format!("{name} {count}"))
                    .collect();
                println!(
                    "{kind}: canary {} caught on {caught}/{} seeds (seeds per checker: {}), {stats}",
                    canary.name(),
                    results.len(),
                    if by_checker.is_empty() {
                        "none".to_string()
                    } else {
                        by_checker.join(", ")
                    }
                );
                let escaped: Vec<String> = results
                    .iter()
                    .filter(|result| result.violations == 0)
                    .take(ESCAPED_SHOWN)
                    .map(|result| result.seed.to_string())
                    .collect();
                if !escaped.is_empty() {
                    println!("  escaped on seeds {}", escaped.join(", "));
                }
                for result in &broken {
                    println!(
                        "  FAIL {kind} seed {}: {}",
                        result.seed,
                        result.first_violation.as_deref().unwrap_or("-")
                    );
                    println!(
                        "    replay: {}",
                        replay_command(kind, result.seed, Some(canary))
                    );
                }
                all_passed &= broken.is_empty();
            }
        }
        for line in gossip_lines(&results) {
            println!("  {line}");
        }
        for result in &diverged {
            if let Some((first, again)) = &result.nondeterministic {
                println!(
                    "  NONDETERMINISTIC {kind} seed {}: trace {first} then {again}",
                    result.seed
                );
                println!("    replay: {}", replay_command(kind, result.seed, canary));
            }
        }
        all_passed &= diverged.is_empty();
    }
    if let Some(canary) = canary {
        if canary_caught == 0 {
            println!(
                "canary {} was never caught: the checkers prove nothing here",
                canary.name()
            );
            all_passed = false;
        }
    }
    println!("sweep took {:.1}s", started.elapsed().as_secs_f64());
    Ok(all_passed)
}
