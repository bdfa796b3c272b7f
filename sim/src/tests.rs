//! Regression tests: a few seeds of every scenario pass, the canaries are caught, and a seed
//! replays to the same trace. Kept to a handful of runs: they run in debug builds, where a
//! simulated run is about ten times slower than in release.

use crate::harness::{run, Canary};
use crate::scenario::ScenarioKind;

fn assert_passes(kind: ScenarioKind, seed: u64) {
    let outcome = run(kind, seed, None);
    let first: Vec<String> = outcome
        .violations
        .iter()
        .take(5)
        .map(ToString::to_string)
        .collect();
    assert!(
        outcome.passed(),
        "{kind} seed {seed}: {} violations, first: {first:#?}",
        outcome.violations.len()
    );
}

#[test]
fn partition_seed_1_passes() {
    assert_passes(ScenarioKind::Partition, 1);
}

#[test]
fn hold_seed_1_passes() {
    assert_passes(ScenarioKind::Hold, 1);
}

#[test]
fn loss_seed_1_passes() {
    assert_passes(ScenarioKind::Loss, 1);
}

#[test]
fn latency_seed_1_passes() {
    assert_passes(ScenarioKind::Latency, 1);
}

#[test]
fn no_dedup_canary_is_caught() {
    let outcome = run(ScenarioKind::Partition, 1, Some(Canary::NoDedup));
    assert!(!outcome.passed(), "duplicates went unnoticed");
}

#[test]
fn no_retransmit_canary_is_caught() {
    let outcome = run(ScenarioKind::Hold, 1, Some(Canary::NoRetransmit));
    assert!(!outcome.passed(), "lost messages went unnoticed");
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    let first = run(ScenarioKind::Loss, 2, None);
    let again = run(ScenarioKind::Loss, 2, None);
    assert_eq!(first.records.len(), again.records.len());
    assert_eq!(first.trace_hash, again.trace_hash);
}
