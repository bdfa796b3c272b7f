//! Weft's deterministic simulation suite.
//!
//! Real [`weft::Node`]s — the production driver, not a model of it — run on
//! [turmoil](https://docs.rs/turmoil) hosts: quinn over turmoil's simulated UDP ([`net`]), every
//! source of randomness and wall-clock time seeded from one run seed ([`determinism`]). A
//! [`scenario`] drawn from the seed makes the nodes send to each other while the network is
//! partitioned, held, lossy or slow, while nodes crash and restart, and while their spools' disks
//! fail; the [`harness`] steps the simulation, applies the fault script and records what the
//! applications observe into a [`history`] outside the nodes; the [`check`]ers then judge the
//! history against Weft's guarantees (nothing accepted is lost, no duplicates but across a
//! receiver's crash, nothing again once acknowledged, FIFO per pair, acked ⇒ delivered, the spools
//! drain) and a blake3 trace hash makes "same seed, same run" checkable. The pub/sub scenarios
//! add coverage, per-publisher order and liveness of events; `gossip-scale` (a hundred nodes)
//! also bounds what the gossip trees cost: copies per delivered event and hops.
//!
//! Canaries switch on deliberate bugs in the core (`weft_proto::link::Fault`) to prove that the
//! checkers can fail: a suite that never fails proves nothing.
//!
//! The `weft-sim` binary runs one seed (`run`) or many (`sweep`); see its `--help`.

pub mod check;
pub mod determinism;
pub mod harness;
pub mod history;
pub mod net;
pub mod scenario;

pub use harness::{run, Canary, Outcome};
pub use scenario::{Scenario, ScenarioKind};

#[cfg(test)]
mod tests;
