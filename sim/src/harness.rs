//! One simulated run: real `weft::Node`s on turmoil hosts, a scripted network, a recorded history.
//!
//! Each host runs the production driver with the seams from [`crate::determinism`] and a simulated
//! application around it: a consumer that reads the inbox (pausing when the scenario says so), a
//! sender per destination that sends the planned messages with a bounded window of unresolved
//! receipts, and a recorder of peer events. The harness steps the simulation itself, one tick at a
//! time, so it can apply the fault script between two ticks (per-link latency, crashes and restarts
//! are only reachable through the `Sim` handle), stop as soon as the run has settled, and notice
//! panics in tasks that tokio would otherwise swallow.
//!
//! Every node has a spool on a [`SimStorage`] that lives here, in the node's [`NodeContext`],
//! not on the host: a crash (turmoil `crash`) drops the node's tasks and, for a power loss, what
//! the storage had not made durable; a restart (turmoil `bounce`) starts the node again on what
//! is left, with the same identity and fresh seeds for everything random (a restarted process
//! draws new randomness). The application's progress (which planned sends it made) is kept here
//! too, so that after a restart it carries on where it stopped. A start that fails on the spool
//! (a full disk, a failed fsync) is retried by a supervisor loop.
//!
//! A run has settled when every planned send returned (or was interrupted by a crash), every
//! receipt of a running node resolved, every node's spool is empty (all it holds was acknowledged:
//! the spools drained), and the fault script and consumer pauses are over; it then continues for
//! [`SETTLE_TAIL`] so that late duplicates still show, and ends at [`DEADLINE`] at the latest —
//! unsettled, which is a `liveness` violation. Hosts never return on their own: a host that fails
//! (returns `Err`) or a task that panics fails the run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weft::{
    DeliveryError, Identity, Node, NodeAddr, NodeId, PeerEvent, PeerSender, Receipt, Receipts,
    Seams, SendBatchError, SendError, StartError,
};
use weft_proto::link::Fault;
use weft_spool::{SimStorage, SpoolConfig};

use crate::check::{check, check_pubsub, check_work, Checker, GossipCost, Violation};
use crate::determinism::{crypto_provider, quinn_seams, SimulatedClock};
use crate::history::{trace_hash, Event, History, NodeIndex, Record};
use crate::net::TurmoilUdpSocket;
use crate::scenario::{
    derive_seed, durable_name, node_identity, parse_event_body, parse_item_body, DiskFault,
    FaultAction, NodeSpool, Pause, PlannedItem, PlannedPublish, PlannedSend, Scenario,
    ScenarioKind, DEADLINE, IDLE_TIMEOUT, KEEP_ALIVE, SEGMENT_BYTES, WORK_KEYS, WORK_QUEUE,
};

/// The port every node listens on.
pub const PORT: u16 = 7450;
/// The mesh all simulated nodes share.
const MESH: &str = "weft-sim";
/// The one channel the simulated applications use.
const CHANNEL: &str = "sim";
/// turmoil's step: how far simulated time moves per tick.
const TICK: Duration = Duration::from_millis(5);
/// Datagrams a host's socket queues before turmoil drops more (its default of 64 would add loss).
const UDP_CAPACITY: usize = 4_096;
/// Unresolved receipts one node keeps per destination; its sender waits when the window is full.
const RECEIPT_WINDOW: usize = 8;
/// Messages a channel's queue holds: tiny, so that a paused consumer makes links park deliveries
/// (see the scenario docs) and bursts exercise backpressure.
const INBOX_CAPACITY: usize = 2;
/// Children per node of the event relay trees in `pubsub`: small, so its five nodes relay.
const PUBSUB_GOSSIP_FANOUT: usize = 2;
/// Events a subscription's queue holds (`pubsub`); see [`INBOX_CAPACITY`].
const SUBSCRIPTION_CAPACITY: usize = 4;
/// Publishes one node keeps with unresolved receipts; its publisher waits when the window is
/// full.
const PUBLISH_WINDOW: usize = 8;
/// With [`Canary::DropEvent`], of every this many events a node's subscriptions yield one is
/// lost.
const DROP_EVENT_EVERY: u64 = 20;
/// Items a worker may hold unacknowledged per producer (`work`): small, so that pauses and
/// silent workers make the producer wait and move work.
const PULL_CREDIT: u32 = 4;
/// How long a worker may be silent before its unacknowledged items go to the others (`work`):
/// shorter than some crashes and partitions of the scenario.
pub const WORK_REASSIGN_AFTER: Duration = Duration::from_secs(2);
/// How long a connected worker may hold items without acknowledging any before copies of them
/// go to the others (`work`): shorter than many of the scenario's consumer pauses.
pub const WORK_ACK_TIMEOUT: Duration = Duration::from_secs(2);
pub use crate::history::SUBSCRIBE_UNCONFIRMED;
/// How often a node reports its metrics for the run summary.
const METRICS_INTERVAL: Duration = Duration::from_millis(250);
/// Simulated time a settled run keeps going, so that late duplicates are seen.
pub const SETTLE_TAIL: Duration = Duration::from_secs(1);
/// How long the supervisor waits before it starts a node again whose start failed.
const START_RETRY_DELAY: Duration = Duration::from_secs(1);

/// A deliberate driver bug, to prove the checkers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Canary {
    /// Duplicates reach the application.
    NoDedup,
    /// Messages in flight on a dead connection are skipped.
    NoRetransmit,
    /// Sends are reported accepted before the spool's fsync.
    AckBeforeFsync,
    /// Receivers acknowledge before their dedup watermark is durable.
    WatermarkAfterAck,
    /// A bug of the simulated subscriber, not of the node: every 20th event a node's
    /// subscriptions yield is not recorded (`pubsub`: the coverage checker must notice).
    DropEvent,
}

impl Canary {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Canary::NoDedup => "no-dedup",
            Canary::NoRetransmit => "no-retransmit",
            Canary::AckBeforeFsync => "ack-before-fsync",
            Canary::WatermarkAfterAck => "watermark-after-ack",
            Canary::DropEvent => "drop-event",
        }
    }

    fn fault(self) -> Fault {
        match self {
            Canary::NoDedup => Fault::NoDedup,
            Canary::NoRetransmit => Fault::NoRetransmit,
            Canary::AckBeforeFsync => Fault::AckBeforeFsync,
            Canary::WatermarkAfterAck => Fault::WatermarkAfterAck,
            Canary::DropEvent => Fault::None,
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The scenario that ran.
    pub scenario: Scenario,
    /// The canary, if any.
    pub canary: Option<Canary>,
    /// The whole history.
    pub records: Vec<Record>,
    /// Each node's last reported counters.
    pub metrics: Vec<weft::MetricsSnapshot>,
    /// Each node's spool at the end: (files, bytes) on its disk, and bytes ever written.
    pub spool_disk: Vec<(usize, u64, u64)>,
    /// Every broken guarantee (including a failed simulation).
    pub violations: Vec<Violation>,
    /// What the gossip trees cost (`gossip-scale`, unless the simulation failed).
    pub gossip: Option<GossipCost>,
    /// blake3 of the history.
    pub trace_hash: blake3::Hash,
    /// Simulated time the run lasted.
    pub simulated: Duration,
    /// When every planned send had returned and every receipt resolved, if that happened before
    /// the deadline (only counted once the faults and pauses were over).
    pub settled_at: Option<Duration>,
    /// Real time it took.
    pub wall: Duration,
}

impl Outcome {
    /// Whether no guarantee was broken.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The host name of node `index`.
pub fn host_name(index: NodeIndex) -> String {
    format!("node{index}")
}

/// Runs `kind` with `seed` to the end and checks the history.
pub fn run(kind: ScenarioKind, seed: u64, canary: Option<Canary>) -> Outcome {
    let started = Instant::now();
    let scenario = Scenario::generate(kind, seed);
    let history = History::new(scenario.nodes);
    let Simulated {
        end: simulated,
        settled_at,
        failure,
        unsettled,
        spool_disk,
    } = simulate(&scenario, canary, &history);
    let (records, metrics) = history.snapshot();
    let mut gossip = None;
    let mut violations = match failure {
        // A broken run's history is cut short; checking it would only add noise.
        Some(failure) => vec![Violation {
            checker: Checker::Simulation,
            at: simulated,
            detail: format!("simulation failed: {failure}"),
        }],
        None => {
            let mut violations = check(&records, simulated);
            if scenario.pubsub.is_some() {
                let (pubsub, coverage) = check_pubsub(&records, simulated, scenario.quiet_from());
                violations.extend(pubsub);
                if kind == ScenarioKind::GossipScale {
                    let cost = GossipCost::measure(coverage, &metrics);
                    violations.extend(cost.check(simulated));
                    gossip = Some(cost);
                }
            }
            if scenario.work.is_some() {
                violations.extend(check_work(
                    &records,
                    simulated,
                    scenario.quiet_from(),
                    WORK_REASSIGN_AFTER,
                ));
            }
            violations.sort_by_key(|violation| (violation.checker, violation.at));
            violations
        }
    };
    if let Some(unsettled) = unsettled {
        violations.push(Violation {
            checker: Checker::Liveness,
            at: simulated,
            detail: format!(
                "not settled {:.1}s after the faults ended: {unsettled}",
                simulated
                    .saturating_sub(scenario.quiet_from())
                    .as_secs_f64()
            ),
        });
    }
    for (node, node_metrics) in metrics.iter().enumerate() {
        if node_metrics.protocol_errors > 0 {
            violations.push(Violation {
                checker: Checker::Api,
                at: simulated,
                detail: format!(
                    "node {node} closed {} connection(s) for protocol errors between honest nodes",
                    node_metrics.protocol_errors
                ),
            });
        }
    }
    Outcome {
        trace_hash: trace_hash(&records),
        gossip,
        scenario,
        canary,
        records,
        metrics,
        spool_disk,
        violations,
        simulated,
        settled_at,
        wall: started.elapsed(),
    }
}

/// Everything one host needs, and what of it outlives the host's crashes; shared by the host
/// factory (turmoil calls it again on a bounce).
#[derive(Debug)]
struct NodeContext {
    index: NodeIndex,
    run_seed: u64,
    ids: Arc<Vec<NodeId>>,
    identity: Identity,
    /// The planned sends, per destination in order.
    sends: BTreeMap<NodeIndex, Vec<PlannedSend>>,
    pauses: Vec<Pause>,
    fault: Fault,
    history: History,
    spool: NodeSpool,
    /// The node's disk.
    storage: SimStorage,
    /// How many times the node's software started (each start draws fresh seeds).
    starts: AtomicU64,
    /// The application's progress, kept across crashes.
    app: Mutex<AppState>,
    /// The pub/sub application's plan for this node (`pubsub`).
    pubsub: Option<PubSubApp>,
    /// Every [`DROP_EVENT_EVERY`]th event is not recorded ([`Canary::DropEvent`]).
    drop_events: bool,
    /// Events the node's subscriptions yielded (for [`Canary::DropEvent`]).
    events_yielded: AtomicU64,
    /// The producer's items (`work`, node 0); `Some(empty)` for a worker.
    work: Option<Vec<PlannedItem>>,
    /// The nodes' `gossip_fanout`, when not the default.
    gossip_fanout: Option<usize>,
    /// Set by a [`FaultAction::Leave`]: the application stops and the node shuts down cleanly.
    /// Cleared when the node's software starts.
    leave: tokio::sync::watch::Sender<bool>,
}

/// One node's part of a `pubsub` run.
#[derive(Debug)]
struct PubSubApp {
    /// Its subscription patterns.
    patterns: Vec<&'static str>,
    /// Whether they are durable (see `PubSubPlan::durable`).
    durable: bool,
    /// Its events, in publish order.
    publishes: Vec<PlannedPublish>,
    /// Per topic it publishes on, how many other nodes subscribe to it.
    remote_subscribers: BTreeMap<&'static str, usize>,
}

impl NodeContext {
    fn app(&self) -> MutexGuard<'_, AppState> {
        self.app
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What the simulated application did so far (it would keep this in its own database).
#[derive(Debug, Default)]
struct AppState {
    /// Per destination: the position, in its planned sends, of the next one to make.
    next: BTreeMap<NodeIndex, usize>,
    /// Per destination: the body digest of the send that has not returned yet.
    in_flight: BTreeMap<NodeIndex, Vec<u64>>,
    /// Position of the next event to publish (`pubsub`).
    next_publish: usize,
    /// The event whose `publish` has not returned yet: (seq, topic, body digest).
    publish_in_flight: Option<(u32, &'static str, u64)>,
    /// Position of the next item to push (`work`).
    next_push: usize,
    /// The item whose `push` has not returned yet: (seq, key, body digest).
    push_in_flight: Option<(u32, Option<u8>, u64)>,
}

/// How a simulation ended.
#[derive(Debug)]
struct Simulated {
    /// Simulated time at the end.
    end: Duration,
    /// See [`Outcome::settled_at`].
    settled_at: Option<Duration>,
    /// Why the simulation itself failed (a host returned an error, a task panicked).
    failure: Option<String>,
    /// What was still outstanding at the deadline, if the run never settled.
    unsettled: Option<String>,
    /// See [`Outcome::spool_disk`].
    spool_disk: Vec<(usize, u64, u64)>,
}

/// Builds the simulation and steps it to the end.
fn simulate(scenario: &Scenario, canary: Option<Canary>, history: &History) -> Simulated {
    capture_panics();
    take_panics();
    let seed = scenario.seed;
    let identities: Vec<Identity> = (0..scenario.nodes)
        .map(|index| node_identity(seed, index))
        .collect();
    let ids = Arc::new(identities.iter().map(Identity::node_id).collect::<Vec<_>>());

    // The harness steps the simulation itself and stops at DEADLINE; turmoil's own duration
    // limit is only a backstop.
    let mut sim = turmoil::Builder::new()
        .rng_seed(derive_seed(seed, "turmoil", 0))
        .simulation_duration(DEADLINE + Duration::from_secs(5))
        .tick_duration(TICK)
        .min_message_latency(scenario.latency.0)
        .max_message_latency(scenario.latency.1)
        .udp_capacity(UDP_CAPACITY)
        .build();
    let mut contexts = Vec::with_capacity(scenario.nodes);
    for (index, identity) in identities.into_iter().enumerate() {
        let mut sends: BTreeMap<NodeIndex, Vec<PlannedSend>> = BTreeMap::new();
        for send in &scenario.sends[index] {
            sends.entry(send.to).or_default().push(send.clone());
        }
        let spool = scenario.spools[index];
        if let Some(bytes_max) = spool.bytes_max {
            history.record(
                Duration::ZERO,
                Event::SpoolCapped {
                    node: index,
                    bytes_max,
                },
            );
        }
        let pubsub = scenario.pubsub.as_ref().map(|plan| PubSubApp {
            patterns: plan.patterns[index].clone(),
            durable: plan.durable[index],
            publishes: plan.publishes[index].clone(),
            remote_subscribers: plan.publishes[index]
                .iter()
                .map(|publish| (publish.topic, plan.remote_subscribers(index, publish.topic)))
                .collect(),
        });
        let context = Arc::new(NodeContext {
            index,
            run_seed: seed,
            ids: Arc::clone(&ids),
            identity,
            sends,
            pauses: scenario.pauses[index].clone(),
            fault: canary.map_or(Fault::None, Canary::fault),
            history: history.clone(),
            spool,
            storage: SimStorage::new(derive_seed(seed, "storage", index as u64)),
            starts: AtomicU64::new(0),
            app: Mutex::new(AppState::default()),
            pubsub,
            drop_events: canary == Some(Canary::DropEvent),
            events_yielded: AtomicU64::new(0),
            leave: tokio::sync::watch::Sender::new(false),
            work: scenario.work.as_ref().map(|plan| {
                if index == 0 {
                    plan.items.clone()
                } else {
                    Vec::new()
                }
            }),
            gossip_fanout: (scenario.kind == ScenarioKind::PubSub).then_some(PUBSUB_GOSSIP_FANOUT),
        });
        contexts.push(Arc::clone(&context));
        sim.host(host_name(index), move || {
            let context = Arc::clone(&context);
            async move { node_software(context).await }
        });
    }
    let addrs: Vec<IpAddr> = (0..scenario.nodes)
        .map(|index| sim.lookup(host_name(index)))
        .collect();

    let planned = scenario.planned_messages() + scenario.planned_publishes();
    let quiet_after = scenario.quiet_from();
    let mut faults = scenario.faults.iter().peekable();
    let mut settled_at = None;
    loop {
        let now = sim.elapsed();
        while let Some(fault) = faults.next_if(|fault| fault.at <= now) {
            history.record(now, Event::Fault(fault.action.clone()));
            apply(&mut sim, &addrs, scenario, &contexts, now, &fault.action);
        }
        if now >= DEADLINE {
            let progress = history.progress();
            let unsettled = settled_at.is_none().then(|| {
                format!(
                    "{}/{planned} sends and publishes returned, {} receipts unresolved, unacknowledged messages in the spools per node: {}",
                    progress.sends_done,
                    progress.open_receipts,
                    progress
                        .spool_pending
                        .iter()
                        .map(|pending| pending.map_or("?".to_string(), |p| p.to_string()))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            });
            return Simulated {
                end: now,
                settled_at,
                failure: None,
                unsettled,
                spool_disk: spool_disk(&contexts),
            };
        }
        if settled_at.is_none() && now >= quiet_after {
            let progress = history.progress();
            if progress.sends_done == planned
                && progress.open_receipts == 0
                && progress.spools_drained
            {
                settled_at = Some(now);
            }
        }
        if settled_at.is_some_and(|settled| now >= settled + SETTLE_TAIL) {
            return Simulated {
                end: now,
                settled_at,
                failure: None,
                unsettled: None,
                spool_disk: spool_disk(&contexts),
            };
        }
        let failure = match sim.step() {
            Err(error) => Some(format!("a host failed: {error}")),
            Ok(_) => {
                let panics = take_panics();
                (!panics.is_empty()).then(|| format!("panic: {}", panics.join("; ")))
            }
        };
        if failure.is_some() {
            return Simulated {
                end: sim.elapsed(),
                settled_at,
                failure,
                unsettled: None,
                spool_disk: spool_disk(&contexts),
            };
        }
    }
}

/// Applies one scripted change to the network, the nodes or their disks.
fn apply(
    sim: &mut turmoil::Sim<'_>,
    addrs: &[IpAddr],
    scenario: &Scenario,
    contexts: &[Arc<NodeContext>],
    now: Duration,
    action: &FaultAction,
) {
    let pairs = |a: &[usize], b: &[usize]| -> Vec<(IpAddr, IpAddr)> {
        a.iter()
            .flat_map(|&a| b.iter().map(move |&b| (addrs[a], addrs[b])))
            .collect()
    };
    match action {
        FaultAction::Partition { a, b } => {
            for (a, b) in pairs(a, b) {
                sim.partition(a, b);
            }
        }
        FaultAction::Repair { a, b } => {
            for (a, b) in pairs(a, b) {
                sim.repair(a, b);
            }
        }
        FaultAction::Hold { a, b } => {
            for (a, b) in pairs(a, b) {
                sim.hold(a, b);
            }
        }
        FaultAction::Release { a, b } => {
            for (a, b) in pairs(a, b) {
                sim.release(a, b);
            }
        }
        FaultAction::SetLatency { a, b, latency_ms } => {
            sim.set_link_latency(addrs[*a], addrs[*b], Duration::from_millis(*latency_ms));
        }
        FaultAction::SetMaxLatency {
            a,
            b,
            max_latency_ms,
        } => {
            sim.set_link_max_message_latency(
                addrs[*a],
                addrs[*b],
                Duration::from_millis(*max_latency_ms),
            );
        }
        FaultAction::RestoreLatency { a, b } => {
            sim.set_link_latency(addrs[*a], addrs[*b], scenario.latency.0);
            sim.set_link_max_message_latency(addrs[*a], addrs[*b], scenario.latency.1);
        }
        FaultAction::Crash { nodes, mode } => {
            for &node in nodes {
                sim.crash(host_name(node));
                let context = &contexts[node];
                context.history.crashed(node);
                let (interrupted, publish, push) = {
                    let mut app = context.app();
                    let interrupted = std::mem::take(&mut app.in_flight);
                    for (to, digests) in &interrupted {
                        *app.next.entry(*to).or_default() += digests.len();
                    }
                    let publish = app.publish_in_flight.take();
                    if publish.is_some() {
                        app.next_publish += 1;
                    }
                    let push = app.push_in_flight.take();
                    if push.is_some() {
                        app.next_push += 1;
                    }
                    (interrupted, publish, push)
                };
                if let Some((seq, key, body_digest)) = push {
                    let interrupted = Event::PushInterrupted {
                        seq,
                        key,
                        body_digest,
                    };
                    context.history.record(now, interrupted);
                }
                if let Some((seq, topic, body_digest)) = publish {
                    let interrupted = Event::PublishInterrupted {
                        publisher: node,
                        seq,
                        topic: topic.to_owned(),
                        body_digest,
                    };
                    context.history.record(now, interrupted);
                }
                for (to, digests) in interrupted {
                    for body_digest in digests {
                        context.history.record(
                            now,
                            Event::SendInterrupted {
                                from: node,
                                to,
                                body_digest,
                            },
                        );
                    }
                }
                if let Some(storage_crash) = mode.storage_crash() {
                    let unsynced: u64 = context
                        .storage
                        .files()
                        .iter()
                        .map(|file| file.len - file.durable_len)
                        .sum();
                    if unsynced > 0 {
                        let lost = Event::UnsyncedLost {
                            node,
                            bytes: unsynced,
                        };
                        context.history.record(now, lost);
                    }
                    context.storage.crash(storage_crash);
                }
            }
        }
        FaultAction::Restart { nodes } => {
            for &node in nodes {
                sim.bounce(host_name(node));
            }
        }
        FaultAction::Leave { node } => {
            contexts[*node].leave.send_replace(true);
        }
        FaultAction::Disk { node, fault } => {
            let storage = &contexts[*node].storage;
            match fault {
                DiskFault::FlipBits { count } => {
                    for _ in 0..*count {
                        if let Some((file, offset)) = flip_bit_in_old_segment(storage) {
                            let flipped = Event::BitFlipped {
                                node: *node,
                                file,
                                offset,
                            };
                            contexts[*node].history.record(now, flipped);
                        }
                    }
                }
                DiskFault::Full { bytes } => storage.set_space_budget(Some(*bytes)),
                DiskFault::Freed => storage.set_space_budget(None),
                DiskFault::FailNextSync => storage.fail_next_sync(),
            }
        }
    }
}

/// Flips a random bit of a random spool file that is not the newest segment of its log (the
/// tail, where damage looks like a torn write). Returns the file and offset, or `None` if there
/// is no such file.
fn flip_bit_in_old_segment(storage: &SimStorage) -> Option<(String, u64)> {
    let files = storage.files();
    let segments = |prefix: &'static str| {
        files
            .iter()
            .filter(move |file| file.name.starts_with(prefix) && file.name.ends_with(".log"))
    };
    let mut old = Vec::new();
    for prefix in ["spool-", "dead-"] {
        // Names carry the segment id in fixed-width hex: the greatest is the newest.
        let newest = segments(prefix).map(|file| &file.name).max();
        old.extend(segments(prefix).filter(|file| Some(&file.name) != newest && file.len > 0));
    }
    if old.is_empty() {
        return None;
    }
    let file = old[storage.random_below(old.len() as u64) as usize];
    let offset = storage.random_below(file.len);
    let bit = storage.random_below(8) as u8;
    storage.flip_bit(&file.name, offset, bit).ok()?;
    Some((file.name.clone(), offset))
}

/// Each node's spool files and bytes on disk, and bytes ever written.
fn spool_disk(contexts: &[Arc<NodeContext>]) -> Vec<(usize, u64, u64)> {
    contexts
        .iter()
        .map(|context| {
            let files = context.storage.files();
            (
                files.len(),
                files.iter().map(|file| file.len).sum(),
                context.storage.stats().bytes_appended,
            )
        })
        .collect()
}

/// Spool segments renamed aside by recoveries so far.
fn quarantined_segments(storage: &SimStorage) -> usize {
    storage
        .files()
        .iter()
        .filter(|file| file.name.ends_with(".quarantined"))
        .count()
}

/// The simulated time of the running host.
fn sim_now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// Sleeps until simulated time `at` (returns at once if it has passed).
async fn sleep_until(at: Duration) {
    tokio::time::sleep(at.saturating_sub(sim_now())).await;
}

/// What runs on host `node{index}`: a real node and the simulated application around it.
async fn node_software(context: Arc<NodeContext>) -> Result<(), Box<dyn Error>> {
    let index = context.index;
    let history = context.history.clone();
    // A restarted process draws fresh randomness (QUIC ids and keys, stream epochs); only the
    // identity and the disk are the same. The first start keeps the seeds of a run without
    // crashes.
    let start = context.starts.fetch_add(1, Ordering::Relaxed);
    let incarnation = index as u64 | start << 16;
    context.leave.send_replace(false);
    let quarantined_before = quarantined_segments(&context.storage);
    let node = loop {
        match start_node(&context, incarnation).await? {
            Ok(node) => break node,
            Err(error) => {
                // The supervisor's answer to a node that cannot open its spool: try again later.
                history.record_now(Event::StartFailed {
                    node: index,
                    error: error.to_string(),
                });
                tokio::time::sleep(START_RETRY_DELAY).await;
            }
        }
    };
    let quarantined = quarantined_segments(&context.storage).saturating_sub(quarantined_before);
    if quarantined > 0 {
        history.record_now(Event::Quarantined {
            node: index,
            segments: quarantined,
        });
    }
    for renumbered in node.renumbered() {
        history.record_now(Event::Renumbered {
            from: index,
            to: index_of(&context.ids, &renumbered.peer),
            old_stream: renumbered.old.stream.0,
            old_seq: renumbered.old.seq,
            new_stream: renumbered.new.stream.0,
            new_seq: renumbered.new.seq,
        });
    }

    let ids = Arc::clone(&context.ids);
    tokio::spawn(record_peer_events(
        node.events(),
        index,
        Arc::clone(&ids),
        history.clone(),
    ));
    tokio::spawn(consume(
        node.receive(CHANNEL)?,
        index,
        context.pauses.clone(),
        Arc::clone(&ids),
        history.clone(),
    ));
    for (peer, id) in ids.iter().enumerate() {
        if peer != index {
            let addr = SocketAddr::new(turmoil::lookup(host_name(peer)), PORT);
            node.add_peer(NodeAddr::new(*id, addr))?;
        }
    }
    for &to in context.sends.keys() {
        let (receipts, pending) = mpsc::channel(RECEIPT_WINDOW);
        tokio::spawn(send_all(
            node.sender(ids[to])?,
            Arc::clone(&context),
            to,
            receipts,
        ));
        tokio::spawn(await_receipts(pending, index, to, history.clone()));
    }

    if context.pubsub.is_some() {
        tokio::spawn(pubsub_app(node.clone(), Arc::clone(&context)));
    }
    let work = context
        .work
        .is_some()
        .then(|| tokio::spawn(work_app(node.clone(), Arc::clone(&context))));

    // The node lives as long as this host (until the harness stops stepping or crashes it), or
    // until it leaves.
    let mut leave = context.leave.subscribe();
    loop {
        history.set_metrics(index, node.metrics());
        tokio::select! {
            _ = tokio::time::sleep(METRICS_INTERVAL) => {}
            () = left(&mut leave) => break,
        }
    }
    // A clean leave: the application is done first (a worker drops its puller, settling what it
    // took), then the node stops, acknowledging what was settled.
    if let Some(work) = work {
        if index == 0 {
            work.abort();
        }
        let _ = work.await;
    }
    node.shutdown().await;
    history.set_metrics(index, node.metrics());
    std::future::pending::<()>().await;
    Ok(())
}

/// Starts the node once. The outer error fails the host; the inner one is a start the
/// supervisor retries (the spool could not be opened: a full disk, a failed fsync).
async fn start_node(
    context: &NodeContext,
    incarnation: u64,
) -> Result<Result<Node, StartError>, Box<dyn Error>> {
    let node_seed = derive_seed(context.run_seed, "node", incarnation);
    let socket =
        TurmoilUdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT)).await?;
    let quinn = quinn_seams(node_seed);
    let storage = context.storage.clone();
    let seams = Seams {
        udp_socket: Some(socket),
        crypto_provider: Some(crypto_provider(node_seed)),
        endpoint_config: Some(quinn.endpoint_config),
        initial_dst_cid_provider: Some(quinn.initial_dst_cid_provider),
        token_key: Some(quinn.token_key),
        time_source: Some(quinn.time_source),
        rng_seed: Some(derive_seed(context.run_seed, "driver rng", incarnation)),
        wall_clock: Some(Arc::new(|| {
            SimulatedClock.since_unix_epoch().as_millis() as u64
        })),
        spool_storage: Some(Arc::new(move || Box::new(storage.clone()))),
        spool_sync_latency: Some(context.spool.sync_latency),
        fault: context.fault,
    };
    let defaults = SpoolConfig::default();
    let spool = SpoolConfig {
        segment_bytes_target: SEGMENT_BYTES,
        bytes_max: context.spool.bytes_max.unwrap_or(defaults.bytes_max),
        ..defaults
    };
    let started = Node::builder()
        .mesh(MESH)
        .identity(context.identity.clone())
        .configure(|config| {
            config.bind = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT);
            config.keep_alive = KEEP_ALIVE;
            config.idle_timeout = IDLE_TIMEOUT;
            config.handshake_timeout = Duration::from_secs(3);
            config.reconnect_max = Duration::from_secs(2);
            config.inbox_capacity = INBOX_CAPACITY;
            config.spool = Some(spool);
            // Longer than any run: a partitioned subscriber keeps its events queued in the
            // publisher's link (and spool) however long the partition lasts.
            config.patterns.interest_lease = DEADLINE * 2;
            // Small, so that a paused subscriber makes its node's event task wait, and the
            // publisher's link park events (as the tiny inbox does for point-to-point).
            config.patterns.subscription_capacity = SUBSCRIPTION_CAPACITY;
            config.patterns.pull_credit = PULL_CREDIT;
            config.patterns.work_reassign_after = WORK_REASSIGN_AFTER;
            config.patterns.work_ack_timeout = Some(WORK_ACK_TIMEOUT);
            // `pubsub` relays every event: with fan-out 2 and four subscribers a publisher
            // sends to two, each of which relays to one, so relays crash, are cut off and
            // repaired. `gossip-scale` keeps the default (8) and `event_repair_after` (2 s): it
            // measures the trees production builds, and a repair 2 s after the last progress
            // fits well inside the pub/sub liveness bound (10 s after the faults).
            if let Some(fanout) = context.gossip_fanout {
                config.patterns.gossip_fanout = fanout;
            }
        })
        .seams(seams)
        .start()
        .await;
    match started {
        Ok(node) => Ok(Ok(node)),
        Err(error @ StartError::Spool(_)) => Ok(Err(error)),
        Err(error) => Err(error.into()),
    }
}

/// First 8 bytes of the body's blake3.
fn body_digest(body: &[u8]) -> u64 {
    let hash = blake3::hash(body);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

fn index_of(ids: &[NodeId], id: &NodeId) -> Option<NodeIndex> {
    ids.iter().position(|candidate| candidate == id)
}

/// Sends the planned messages to one destination in order, from where the application stopped
/// before a crash, keeping at most [`RECEIPT_WINDOW`] receipts unresolved (the channel to
/// [`await_receipts`] is the window). For half the pairs (odd `from + to`), sends that are due
/// together (the node was held up by backpressure, or they were planned close together) go as
/// one `send_batch`, so batches meet crashes, full spools and disk faults too; the other half
/// send one by one.
async fn send_all(
    sender: PeerSender,
    context: Arc<NodeContext>,
    to: NodeIndex,
    receipts: mpsc::Sender<(Receipt, u64)>,
) {
    let from = context.index;
    let history = context.history.clone();
    let Some(sends) = context.sends.get(&to) else {
        return;
    };
    loop {
        let position = *context.app().next.entry(to).or_default();
        let Some(send) = sends.get(position) else {
            return;
        };
        sleep_until(send.at).await;
        let now = sim_now();
        // Half the pairs batch, half send one by one: both paths meet every fault.
        let window = if (from + to) % 2 == 1 {
            RECEIPT_WINDOW
        } else {
            1
        };
        // A batch travels in one lane: it ends where the next send's lane differs.
        let lane = sends[position].priority.lane();
        let due = sends[position..]
            .iter()
            .take(window)
            .take_while(|send| send.at <= now && send.priority.lane() == lane)
            .count()
            .max(1);
        let Ok(slots) = receipts.reserve_many(due).await else {
            return; // the receipt task is gone: the host is shutting down
        };
        let batch = &sends[position..position + due];
        let digests: Vec<u64> = batch.iter().map(|send| body_digest(&send.body)).collect();
        context.app().in_flight.insert(to, digests.clone());
        let sent: Vec<Result<Receipt, SendError>> = if batch.iter().any(|s| s.delay.is_some()) {
            // Delayed sends go one by one (their receipts are apart in a batch's `Receipts`).
            let mut sent = Vec::with_capacity(due);
            for send in batch {
                let message = sender
                    .new_message(CHANNEL, send.body.clone())
                    .with_priority(send.priority)
                    .with_delay(send.delay.unwrap_or_default());
                sent.push(sender.send_message(message).await);
            }
            sent
        } else if due == 1 {
            let message = sender
                .new_message(CHANNEL, batch[0].body.clone())
                .with_priority(batch[0].priority);
            vec![sender.send_message(message).await]
        } else {
            let messages = batch.iter().map(|send| {
                sender
                    .new_message(CHANNEL, send.body.clone())
                    .with_priority(send.priority)
            });
            batch_outcomes(sender.send_batch(messages.collect::<Vec<_>>()).await, due).await
        };
        {
            let mut app = context.app();
            app.in_flight.remove(&to);
            *app.next.entry(to).or_default() += due;
        }
        for ((sent, digest), slot) in sent.into_iter().zip(digests).zip(slots) {
            match sent {
                Ok(receipt) => {
                    match receipt.due_unix_ms() {
                        Some(due_unix_ms) => {
                            // The due time on the simulated clock: the node's wall clock is
                            // the simulated one plus a fixed epoch (this record may come after
                            // the due time: a batch is recorded once all of it returned).
                            let epoch = SimulatedClock.since_unix_epoch() - sim_now();
                            let due = Duration::from_millis(due_unix_ms).saturating_sub(epoch);
                            history.record_now(Event::Scheduled {
                                from,
                                to,
                                body_digest: digest,
                                due,
                            });
                        }
                        None => {
                            let id = receipt.id();
                            history.record_now(Event::Accepted {
                                from,
                                to,
                                stream: id.stream.0,
                                seq: id.seq,
                                body_digest: digest,
                            });
                        }
                    }
                    slot.send((receipt, digest));
                }
                Err(error) => history.record_now(Event::SendFailed {
                    from,
                    to,
                    body_digest: digest,
                    spool: matches!(error, SendError::SpoolFull(_) | SendError::Spool(_)),
                    error: error.to_string(),
                }),
            }
        }
    }
}

/// Each message's outcome of a batch: its receipt if the spool accepted it, else why not.
async fn batch_outcomes(
    sent: Result<Receipts, SendBatchError>,
    count: usize,
) -> Vec<Result<Receipt, SendError>> {
    let (receipts, error) = match sent {
        Ok(receipts) => (receipts, None),
        Err(SendBatchError::Partial {
            receipts, error, ..
        }) => (receipts, Some(error)),
        Err(SendBatchError::Invalid { error, .. }) => {
            return (0..count).map(|_| Err(error.clone())).collect()
        }
        Err(other) => panic!("unexpected batch error: {other}"),
    };
    let mut outcomes = Vec::with_capacity(count);
    for i in 0..count {
        let outcome = match receipts.get(i) {
            Some(receipt) => match receipt.accepted().await {
                Ok(()) => Ok(receipt),
                Err(refused) => Err(refused.into()),
            },
            None => Err(error.clone().unwrap_or(SendError::NodeClosed)),
        };
        outcomes.push(outcome);
    }
    outcomes
}

/// Awaits receipts in sending order and records each resolution.
async fn await_receipts(
    mut pending: mpsc::Receiver<(Receipt, u64)>,
    from: NodeIndex,
    to: NodeIndex,
    history: History,
) {
    while let Some((receipt, body_digest)) = pending.recv().await {
        if receipt.due_unix_ms().is_some() {
            // A delayed message: its id once it is released (the node shutting down first
            // leaves it to a later incarnation, without a receipt).
            let Ok(id) = receipt.numbered().await else {
                continue;
            };
            history.record_now(Event::Released {
                from,
                to,
                stream: id.stream.0,
                seq: id.seq,
                body_digest,
            });
        }
        let id = receipt.id();
        let (stream, seq) = (id.stream.0, id.seq);
        match receipt.await {
            Ok(_) => history.record_now(Event::Acked {
                from,
                to,
                stream,
                seq,
            }),
            Err(error) => history.record_now(Event::ReceiptFailed {
                from,
                to,
                stream,
                seq,
                dead_lettered: matches!(error, DeliveryError::DeadLettered { .. }),
                error: error.to_string(),
            }),
        }
    }
}

/// Reads the inbox for as long as the node runs, pausing as scheduled.
async fn consume(
    mut inbox: weft::Inbox,
    index: NodeIndex,
    pauses: Vec<Pause>,
    ids: Arc<Vec<NodeId>>,
    history: History,
) {
    // After a restart, the pauses that are over are history.
    let now = sim_now();
    let mut pauses = pauses
        .into_iter()
        .filter(|pause| pause.until > now)
        .peekable();
    loop {
        let next_pause = pauses.peek().copied();
        tokio::select! {
            biased;
            message = inbox.recv() => {
                let Some(message) = message else { return };
                let id = message.header.id;
                history.record_now(Event::Delivered {
                    at: index,
                    from: index_of(&ids, &id.producer),
                    stream: id.stream.0,
                    seq: id.seq,
                    lane: message.header.priority.lane().index() as u8,
                    body_digest: body_digest(&message.body),
                });
            }
            _ = pause_start(next_pause) => {
                pauses.next();
                if let Some(pause) = next_pause {
                    history.record_now(Event::ConsumerPaused { node: index });
                    sleep_until(pause.until).await;
                    history.record_now(Event::ConsumerResumed { node: index });
                }
            }
        }
    }
}

/// The pub/sub application of one node, from each start of the node: once connected to every
/// peer it subscribes to its patterns (and records each subscription in effect); a publisher
/// then waits until every other node that subscribes to its topics is known to it (a restarted
/// publisher's node knows its peers' interest only once they announced it on the new
/// connections, and routes events by what it knows) and publishes its remaining events at their
/// planned times, at most [`PUBLISH_WINDOW`] with unresolved receipts.
async fn pubsub_app(node: Node, context: Arc<NodeContext>) {
    let index = context.index;
    let history = context.history.clone();
    let Some(app) = context.pubsub.as_ref() else {
        return;
    };
    for (sub, pattern) in app.patterns.iter().enumerate() {
        let subscription = loop {
            if node.wait_for_peers(context.ids.len() - 1).await.is_err() {
                return;
            }
            // `subscribe` returns once every peer connected *then* confirmed: a peer whose
            // connection went down while it waited did not, and will not send it events until
            // it reconnects and learns of it. The application wants every peer: it tries again.
            // (Nothing yields between `subscribe`'s last look at the peers and this one.)
            // A durable node subscribes under the same names at every start, and gets what
            // its publishers kept for it while it was down.
            let subscribed = if app.durable {
                node.subscribe_durable(&durable_name(sub), pattern).await
            } else {
                node.subscribe(pattern).await
            };
            let error = match subscribed {
                Ok(subscription) if node.connected_peers().len() == context.ids.len() - 1 => {
                    break subscription
                }
                Ok(_) => SUBSCRIBE_UNCONFIRMED.to_owned(),
                Err(error) => error.to_string(),
            };
            history.record_now(Event::SubscribeFailed {
                node: index,
                sub,
                error,
            });
        };
        history.record_now(Event::Subscribed {
            node: index,
            sub,
            pattern: (*pattern).to_owned(),
            durable: app.durable,
        });
        tokio::spawn(consume_events(subscription, Arc::clone(&context), sub));
    }
    if app.publishes.is_empty() {
        return;
    }
    for (topic, &count) in &app.remote_subscribers {
        if node.wait_for_subscribers(topic, count).await.is_err() {
            return;
        }
    }
    let (window, pending) = mpsc::channel(PUBLISH_WINDOW);
    tokio::spawn(await_published(pending, index, history.clone()));
    loop {
        let position = context.app().next_publish;
        let Some(publish) = app.publishes.get(position) else {
            return;
        };
        sleep_until(publish.at).await;
        let Ok(slot) = window.reserve().await else {
            return;
        };
        let PlannedPublish {
            seq, topic, body, ..
        } = publish;
        let digest = body_digest(body);
        context.app().publish_in_flight = Some((*seq, topic, digest));
        history.record_now(Event::PublishStarted {
            publisher: index,
            seq: *seq,
        });
        let published = node.publish(topic, body.clone()).await;
        {
            let mut app = context.app();
            app.publish_in_flight = None;
            app.next_publish += 1;
        }
        match published {
            Ok(published) => {
                history.record_now(Event::Published {
                    publisher: index,
                    seq: *seq,
                    topic: (*topic).to_owned(),
                    body_digest: digest,
                    remote: published.receipts.len(),
                    local: published.local,
                });
                slot.send((*seq, published));
            }
            Err(error) => history.record_now(Event::PublishFailed {
                publisher: index,
                seq: *seq,
                error: error.to_string(),
            }),
        }
    }
}

/// Awaits every publish's receipts, in publish order, and records each outcome.
async fn await_published(
    mut pending: mpsc::Receiver<(u32, weft::Published)>,
    publisher: NodeIndex,
    history: History,
) {
    while let Some((seq, published)) = pending.recv().await {
        let error = published.delivered().await.err().map(|e| e.to_string());
        history.record_now(Event::PublishSettled {
            publisher,
            seq,
            error,
        });
    }
}

/// Reads one subscription for as long as the node runs, pausing as scheduled.
async fn consume_events(
    mut subscription: weft::Subscription,
    context: Arc<NodeContext>,
    sub: usize,
) {
    let index = context.index;
    let history = &context.history;
    let now = sim_now();
    let mut pauses = context
        .pauses
        .iter()
        .copied()
        .filter(|pause| pause.until > now)
        .peekable();
    loop {
        let next_pause = pauses.peek().copied();
        tokio::select! {
            biased;
            event = subscription.recv() => {
                let Some(event) = event else { return };
                let yielded = context.events_yielded.fetch_add(1, Ordering::Relaxed) + 1;
                if context.drop_events && yielded.is_multiple_of(DROP_EVENT_EVERY) {
                    continue;
                }
                let (publisher, seq) =
                    parse_event_body(&event.body).unwrap_or((u8::MAX as usize, u32::MAX));
                history.record_now(Event::EventReceived {
                    node: index,
                    sub,
                    producer: index_of(&context.ids, &event.header.id.producer),
                    publisher,
                    seq,
                    topic: event.header.channel.to_string(),
                    body_digest: body_digest(&event.body),
                });
            }
            _ = pause_start(next_pause) => {
                pauses.next();
                if let Some(pause) = next_pause {
                    // Recorded once per node, by its first subscription.
                    if sub == 0 {
                        history.record_now(Event::ConsumerPaused { node: index });
                    }
                    sleep_until(pause.until).await;
                    if sub == 0 {
                        history.record_now(Event::ConsumerResumed { node: index });
                    }
                }
            }
        }
    }
}

/// The work queue application of one node, from each start: the producer (node 0) pushes its
/// remaining items at their planned times (keyed ones with `push_keyed`); a worker pulls the
/// queue and takes items for as long as it runs, pausing as scheduled, recording each item when
/// it takes it.
async fn work_app(node: Node, context: Arc<NodeContext>) {
    let index = context.index;
    let history = context.history.clone();
    let Some(items) = context.work.as_ref() else {
        return;
    };
    if index != 0 {
        let puller = loop {
            match node.pull(WORK_QUEUE).await {
                Ok(puller) => break puller,
                Err(error) => {
                    history.record_now(Event::PullFailed {
                        node: index,
                        error: error.to_string(),
                    });
                    if node.wait_for_peers(context.ids.len() - 1).await.is_err() {
                        return;
                    }
                }
            }
        };
        history.record_now(Event::Pulling { node: index });
        take_items(puller, &context).await;
        return;
    }
    loop {
        let position = context.app().next_push;
        let Some(item) = items.get(position) else {
            return;
        };
        sleep_until(item.at).await;
        let digest = body_digest(&item.body);
        context.app().push_in_flight = Some((item.seq, item.key, digest));
        let pushed = match item.key {
            Some(key) => {
                node.push_keyed(WORK_QUEUE, WORK_KEYS[usize::from(key)], item.body.clone())
                    .await
            }
            None => node.push(WORK_QUEUE, item.body.clone()).await,
        };
        {
            let mut app = context.app();
            app.push_in_flight = None;
            app.next_push += 1;
        }
        match pushed {
            Ok(()) => history.record_now(Event::Pushed {
                seq: item.seq,
                key: item.key,
                body_digest: digest,
            }),
            Err(error) => history.record_now(Event::PushFailed {
                seq: item.seq,
                error: error.to_string(),
            }),
        }
    }
}

/// Takes a worker's items for as long as the node runs, pausing as scheduled. Told to leave,
/// it takes one more item (waiting at most [`LEAVE_AFTER_TAKE_MAX`]) and stops right after
/// it, so that the leave comes while that item is settled but maybe not yet acknowledged: the
/// window a clean stop must not lose.
async fn take_items(mut puller: weft::Puller, context: &NodeContext) {
    let index = context.index;
    let history = &context.history;
    let mut leave = context.leave.subscribe();
    let now = sim_now();
    let mut pauses = context
        .pauses
        .iter()
        .copied()
        .filter(|pause| pause.until > now)
        .peekable();
    // Told to leave: stop by then even if no item comes.
    let mut leaving: Option<Duration> = None;
    loop {
        let next_pause = pauses.peek().copied();
        tokio::select! {
            biased;
            () = left(&mut leave), if leaving.is_none() => {
                leaving = Some(sim_now() + LEAVE_AFTER_TAKE_MAX);
            }
            () = sleep_until(leaving.unwrap_or_default()), if leaving.is_some() => return,
            item = puller.recv() => {
                let Some(item) = item else { return };
                let (seq, key) = parse_item_body(&item.body).unwrap_or((u32::MAX, None));
                history.record_now(Event::ItemTaken {
                    worker: index,
                    producer: index_of(&context.ids, &item.header.id.producer),
                    seq,
                    key,
                    body_digest: body_digest(&item.body),
                    copy: item.header.header(weft::REDELIVERY_HEADER).is_some(),
                });
                if leaving.is_some() {
                    return; // dropping the puller settles what was taken
                }
            }
            _ = pause_start(next_pause), if leaving.is_none() => {
                pauses.next();
                if let Some(pause) = next_pause {
                    history.record_now(Event::ConsumerPaused { node: index });
                    let mut leave = context.leave.subscribe();
                    tokio::select! {
                        () = sleep_until(pause.until) => {}
                        () = left(&mut leave) => return,
                    }
                    history.record_now(Event::ConsumerResumed { node: index });
                }
            }
        }
    }
}

/// How long a worker told to leave waits for one more item before it stops anyway.
const LEAVE_AFTER_TAKE_MAX: Duration = Duration::from_millis(500);

/// Until the node is told to leave (a [`FaultAction::Leave`]).
async fn left(leave: &mut tokio::sync::watch::Receiver<bool>) {
    // (The guard `wait_for` returns must not live across an await.)
    let _ = leave.wait_for(|leave| *leave).await.map(|_| ());
}

async fn pause_start(pause: Option<Pause>) {
    match pause {
        Some(pause) => sleep_until(pause.from).await,
        None => std::future::pending().await,
    }
}

/// Records connection changes (for the trace and for debugging a failing seed) and dead letters.
async fn record_peer_events(
    mut events: tokio::sync::broadcast::Receiver<PeerEvent>,
    index: NodeIndex,
    ids: Arc<Vec<NodeId>>,
    history: History,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(PeerEvent::Up { peer, .. }) => {
                if let Some(peer) = index_of(&ids, &peer) {
                    history.record_now(Event::PeerUp { node: index, peer });
                }
            }
            Ok(PeerEvent::Down { peer, .. }) => {
                if let Some(peer) = index_of(&ids, &peer) {
                    history.record_now(Event::PeerDown { node: index, peer });
                }
            }
            Ok(PeerEvent::DeadLettered { peer, id, reason }) => {
                if let Some(to) = index_of(&ids, &peer) {
                    history.record_now(Event::DeadLettered {
                        from: index,
                        to,
                        stream: id.stream.0,
                        seq: id.seq,
                        reason,
                    });
                }
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

thread_local! {
    /// Panics on this thread since the last [`take_panics`]. turmoil runs every host on the thread
    /// that steps the simulation, and tokio catches panics of spawned tasks, so this is where the
    /// harness learns of them.
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Installs (once per process) a panic hook that also records the panic for the harness.
fn capture_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = PANICS.try_with(|panics| {
                if let Ok(mut panics) = panics.try_borrow_mut() {
                    panics.push(info.to_string());
                }
            });
            previous(info);
        }));
    });
}

fn take_panics() -> Vec<String> {
    PANICS.with(|panics| std::mem::take(&mut *panics.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tokio swallows a spawned task's panic; the harness must still see it.
    #[test]
    fn a_panic_in_a_spawned_task_is_noticed() {
        capture_panics();
        take_panics();
        let mut sim = turmoil::Builder::new().build();
        sim.host("host", || async {
            tokio::spawn(async { panic!("deliberate panic in a task") });
            std::future::pending::<()>().await;
            Ok(())
        });
        for _ in 0..3 {
            sim.step().expect("the host itself does not fail");
        }
        let panics = take_panics();
        assert!(
            panics
                .iter()
                .any(|panic| panic.contains("deliberate panic in a task")),
            "{panics:?}"
        );
    }
}
