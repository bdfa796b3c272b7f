//! One simulated run: real `weft::Node`s on turmoil hosts, a scripted network, a recorded history.
//!
//! Each host runs the production driver with the seams from [`crate::determinism`] and a simulated
//! application around it: a consumer that reads the inbox (pausing when the scenario says so), a
//! sender per destination that sends the planned messages with a bounded window of unresolved
//! receipts, and a recorder of peer events. The harness steps the simulation itself, one tick at a
//! time, so it can apply the fault script between two ticks (per-link latency is only reachable
//! through the `Sim` handle), stop as soon as the run has settled, and notice panics in tasks that
//! tokio would otherwise swallow.
//!
//! A run has settled when every planned send returned, every receipt resolved, and the fault script
//! and consumer pauses are over; it then continues for [`SETTLE_TAIL`] so that late duplicates
//! still show, and ends at [`DEADLINE`] at the latest. Hosts never return on their own: a host
//! that fails (returns `Err`) or a task that panics fails the run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weft::{Identity, Node, NodeAddr, NodeId, PeerEvent, PeerSender, Receipt, Seams};
use weft_proto::link::Fault;

use crate::check::{check, Checker, Violation};
use crate::determinism::{crypto_provider, quinn_seams, SimulatedClock};
use crate::history::{trace_hash, Event, History, NodeIndex, Record};
use crate::net::TurmoilUdpSocket;
use crate::scenario::{
    derive_bytes, derive_seed, FaultAction, Pause, PlannedSend, Scenario, ScenarioKind, DEADLINE,
    IDLE_TIMEOUT, KEEP_ALIVE,
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
/// How often a node reports its metrics for the run summary.
const METRICS_INTERVAL: Duration = Duration::from_millis(250);
/// Simulated time a settled run keeps going, so that late duplicates are seen.
pub const SETTLE_TAIL: Duration = Duration::from_secs(1);

/// A deliberate driver bug, to prove the checkers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Canary {
    /// Duplicates reach the application.
    NoDedup,
    /// Messages in flight on a dead connection are skipped.
    NoRetransmit,
}

impl Canary {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Canary::NoDedup => "no-dedup",
            Canary::NoRetransmit => "no-retransmit",
        }
    }

    fn fault(self) -> Fault {
        match self {
            Canary::NoDedup => Fault::NoDedup,
            Canary::NoRetransmit => Fault::NoRetransmit,
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
    /// Every broken guarantee (including a failed simulation).
    pub violations: Vec<Violation>,
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
    } = simulate(&scenario, canary, &history);
    let (records, metrics) = history.snapshot();
    let mut violations = match failure {
        // A broken run's history is cut short; checking it would only add noise.
        Some(failure) => vec![Violation {
            checker: Checker::Simulation,
            at: simulated,
            detail: format!("simulation failed: {failure}"),
        }],
        None => check(&records, simulated),
    };
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
        scenario,
        canary,
        records,
        metrics,
        violations,
        simulated,
        settled_at,
        wall: started.elapsed(),
    }
}

/// Everything one host needs; shared by the host factory (turmoil may call it again on a bounce).
#[derive(Debug)]
struct NodeContext {
    index: NodeIndex,
    run_seed: u64,
    ids: Arc<Vec<NodeId>>,
    identity: Identity,
    sends: Vec<PlannedSend>,
    pauses: Vec<Pause>,
    fault: Fault,
    history: History,
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
}

/// Builds the simulation and steps it to the end.
fn simulate(scenario: &Scenario, canary: Option<Canary>, history: &History) -> Simulated {
    capture_panics();
    take_panics();
    let seed = scenario.seed;
    let identities: Vec<Identity> = (0..scenario.nodes)
        .map(|index| Identity::from_seed(derive_bytes(seed, "identity", index as u64)))
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
    for (index, identity) in identities.into_iter().enumerate() {
        let context = Arc::new(NodeContext {
            index,
            run_seed: seed,
            ids: Arc::clone(&ids),
            identity,
            sends: scenario.sends[index].clone(),
            pauses: scenario.pauses[index].clone(),
            fault: canary.map_or(Fault::None, Canary::fault),
            history: history.clone(),
        });
        sim.host(host_name(index), move || {
            let context = Arc::clone(&context);
            async move { node_software(context).await }
        });
    }
    let addrs: Vec<IpAddr> = (0..scenario.nodes)
        .map(|index| sim.lookup(host_name(index)))
        .collect();

    let planned = scenario.planned_messages();
    let quiet_after = scenario.quiet_from();
    let mut faults = scenario.faults.iter().peekable();
    let mut settled_at = None;
    loop {
        let now = sim.elapsed();
        while let Some(fault) = faults.next_if(|fault| fault.at <= now) {
            apply(&sim, &addrs, scenario, &fault.action);
            history.record(now, Event::Fault(fault.action.clone()));
        }
        if now >= DEADLINE {
            return Simulated {
                end: now,
                settled_at,
                failure: None,
            };
        }
        if settled_at.is_none() && now >= quiet_after {
            let progress = history.progress();
            if progress.sends_done == planned && progress.receipts_done == planned {
                settled_at = Some(now);
            }
        }
        if settled_at.is_some_and(|settled| now >= settled + SETTLE_TAIL) {
            return Simulated {
                end: now,
                settled_at,
                failure: None,
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
            };
        }
    }
}

/// Applies one scripted change to the network.
fn apply(sim: &turmoil::Sim<'_>, addrs: &[IpAddr], scenario: &Scenario, action: &FaultAction) {
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
    }
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
    let node_seed = derive_seed(context.run_seed, "node", index as u64);
    let socket =
        TurmoilUdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT)).await?;
    let quinn = quinn_seams(node_seed);
    let seams = Seams {
        udp_socket: Some(socket),
        crypto_provider: Some(crypto_provider(node_seed)),
        endpoint_config: Some(quinn.endpoint_config),
        initial_dst_cid_provider: Some(quinn.initial_dst_cid_provider),
        token_key: Some(quinn.token_key),
        time_source: Some(quinn.time_source),
        rng_seed: Some(derive_seed(context.run_seed, "driver rng", index as u64)),
        wall_clock: Some(Arc::new(|| {
            SimulatedClock.since_unix_epoch().as_millis() as u64
        })),
        spool_storage: None,
        spool_sync_latency: None,
        fault: context.fault,
    };
    let node = Node::builder()
        .mesh(MESH)
        .identity(context.identity.clone())
        .configure(|config| {
            config.bind = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT);
            config.keep_alive = KEEP_ALIVE;
            config.idle_timeout = IDLE_TIMEOUT;
            config.handshake_timeout = Duration::from_secs(3);
            config.reconnect_max = Duration::from_secs(2);
            config.inbox_capacity = INBOX_CAPACITY;
        })
        .seams(seams)
        .start()
        .await?;

    let history = context.history.clone();
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

    let mut by_destination: BTreeMap<NodeIndex, Vec<PlannedSend>> = BTreeMap::new();
    for send in &context.sends {
        by_destination
            .entry(send.to)
            .or_default()
            .push(send.clone());
    }
    for (to, sends) in by_destination {
        let (receipts, pending) = mpsc::channel(RECEIPT_WINDOW);
        tokio::spawn(send_all(
            node.sender(ids[to])?,
            index,
            to,
            sends,
            receipts,
            history.clone(),
        ));
        tokio::spawn(await_receipts(pending, index, to, history.clone()));
    }

    // The node lives as long as this host: until the harness stops stepping.
    loop {
        history.set_metrics(index, node.metrics());
        tokio::time::sleep(METRICS_INTERVAL).await;
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

/// Sends the planned messages to one destination in order, keeping at most [`RECEIPT_WINDOW`]
/// receipts unresolved (the channel to [`await_receipts`] is the window).
async fn send_all(
    sender: PeerSender,
    from: NodeIndex,
    to: NodeIndex,
    sends: Vec<PlannedSend>,
    receipts: mpsc::Sender<Receipt>,
    history: History,
) {
    for send in sends {
        sleep_until(send.at).await;
        let Ok(slot) = receipts.reserve().await else {
            return; // the receipt task is gone: the host is shutting down
        };
        match sender.send(CHANNEL, send.body.clone()).await {
            Ok(receipt) => {
                let id = receipt.id();
                history.record_now(Event::Accepted {
                    from,
                    to,
                    stream: id.stream.0,
                    seq: id.seq,
                    body_digest: body_digest(&send.body),
                });
                slot.send(receipt);
            }
            Err(error) => history.record_now(Event::SendFailed {
                from,
                to,
                error: error.to_string(),
            }),
        }
    }
}

/// Awaits receipts in sending order and records each resolution.
async fn await_receipts(
    mut pending: mpsc::Receiver<Receipt>,
    from: NodeIndex,
    to: NodeIndex,
    history: History,
) {
    while let Some(receipt) = pending.recv().await {
        let seq = receipt.id().seq;
        match receipt.await {
            Ok(_) => history.record_now(Event::Acked { from, to, seq }),
            Err(_) => history.record_now(Event::ReceiptFailed { from, to, seq }),
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
    let mut pauses = pauses.into_iter().peekable();
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

async fn pause_start(pause: Option<Pause>) {
    match pause {
        Some(pause) => sleep_until(pause.from).await,
        None => std::future::pending().await,
    }
}

/// Records connection changes (for the trace and for debugging a failing seed).
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
