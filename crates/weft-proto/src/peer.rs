//! The per-peer protocol decisions that are not about one stream's sequence numbers: when and
//! where to dial, which of two connections to keep, when the peer counts as up, and when an
//! inbound watermark may be acknowledged.
//!
//! Three sans-IO parts, which [`crate::session::Session`] composes (one `Peer`, and a gate and
//! a timer per lane) and drives; a driver talks to the session, not to these:
//!
//! - [`Peer`] (one per known peer): the peer's addresses and which to dial first, the reconnect
//!   backoff and the stagger between addresses, duplicate-connection resolution, the lane
//!   handshake (the peer is *up* only once every other lane installed its stream on the current
//!   connection), and up/down.
//! - [`WatermarkGate`] (one per lane): *persist before acknowledging*. With a spool, an inbound
//!   watermark is acknowledged only once the spool made it durable; one persist is in flight at a
//!   time (later settlements coalesce behind it); a refusal for room is retried after a delay, a
//!   stopped spool is never retried.
//! - [`ExpiryTimer`] (one per lane): when queued messages are next checked against their expiry
//!   and retry budget.
//!
//! Each follows quinn-proto's shape: `handle_*` with what happened (and the time it happened,
//! `now`), outputs drained after ([`Peer::poll_event`] until `None`), `poll_timeout` and
//! `handle_timeout(now)`. Time is a parameter: nothing here reads a clock, and the only
//! randomness (backoff jitter) comes from a generator seeded by the driver. Every protocol delay
//! (backoff, stagger, retry, expiry period) is decided here.
//!
//! `peer_tests` runs two sessions over a simulated wire in virtual time; the gate and the timer
//! also have tests of their own there.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::backoff::{Backoff, SplitMix64};
use crate::handshake::{resolve_duplicate, Candidate, Keep};
use crate::NodeId;

/// Most addresses remembered per peer, in each of the two lists (given and learned); the
/// oldest goes when a list is full.
pub const ADDRESSES_MAX: usize = 16;
/// Delay between dialing one address of a peer and the next, when the first has not connected
/// by then (happy-eyeballs style: an unreachable address costs a stagger, not a handshake
/// timeout).
pub const DIAL_STAGGER: Duration = Duration::from_millis(250);
/// How long after the spool refused an inbound watermark (it was full) the newest one is tried
/// again. Room comes back as peers acknowledge what this node sent; meanwhile settlements do not
/// retry, so a full spool costs one refused append per peer and period, not one per message.
pub const WATERMARK_RETRY: Duration = Duration::from_millis(500);
/// How often queued messages are checked against their expiry and the retry policy.
pub const EXPIRY_CHECK: Duration = Duration::from_secs(1);

/// What a [`Peer`] needs to know of the node's settings.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// First reconnect delay (doubled per failure, with jitter).
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// See [`DIAL_STAGGER`].
    pub dial_stagger: Duration,
    /// Streams a connection carries besides the hello's (one per lane other than the normal
    /// one); the peer is up once each of them is installed.
    pub other_lanes: usize,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            reconnect_initial: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
            dial_stagger: DIAL_STAGGER,
            other_lanes: crate::Lane::ALL.len() - 1,
        }
    }
}

/// What the driver must do for a [`Peer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// Dial these addresses: the i-th `i × stagger` after the first, skipping those not started
    /// once one connected. Each welcomed connection goes to [`Peer::handle_connection`]; when
    /// none connected, [`Peer::handle_dial_failed`] once.
    Dial {
        /// In the order to try them (the one that worked last first).
        addresses: Vec<SocketAddr>,
        /// Between the starts of two attempts.
        stagger: Duration,
    },
    /// Every lane's stream is in place on the current connection.
    Up {
        /// The connection's remote address.
        remote: SocketAddr,
        /// This node dialed it.
        dialed_by_local: bool,
    },
    /// The peer, which was up, is not any more.
    Down,
}

/// What to do with a new connection (see [`Peer::handle_connection`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Use it, as the `generation`-th connection. `replaced`: close the one in use (the driver
    /// has already been told it is lost: its lanes disconnect).
    Install {
        /// Numbers connections in the order they were installed (from 1).
        generation: u64,
        /// Why the connection in use was replaced, if there was one.
        replaced: Option<Replaced>,
    },
    /// Keep the connection in use; close the new one as a duplicate.
    CloseNew,
}

/// Why a connection in use gave way to a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replaced {
    /// The new one comes from a newer incarnation of the peer: the old one is dead, however
    /// long QUIC would take to notice.
    PeerRestarted,
    /// Duplicate resolution chose the new one (simultaneous dials, redials).
    Duplicate,
}

impl Replaced {
    /// Why, in words, for logs and `Down` reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerRestarted => "the peer restarted",
            Self::Duplicate => "replaced by another connection",
        }
    }
}

/// A connection that passed its hello exchange, as the machine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewConnection {
    /// Where the peer is on it.
    pub remote: SocketAddr,
    /// This node dialed it (else it was accepted).
    pub dialed_by_local: bool,
    /// The peer's incarnation, from its hello or welcome.
    pub peer_incarnation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dial {
    Idle,
    At(Instant),
    InFlight,
}

#[derive(Clone, Copy, Debug)]
struct Current {
    generation: u64,
    connection: NewConnection,
    lanes_up: usize,
    up: bool,
    /// The peer's resume arrived on it (it is not one that accepts and at once drops).
    proven: bool,
}

/// One peer's connection lifecycle (see the module doc).
#[derive(Debug)]
pub struct Peer {
    local: NodeId,
    remote: NodeId,
    config: PeerConfig,
    /// Addresses the application gave (`add_peer`, configured seeds, discovery): always redialed.
    given: Vec<SocketAddr>,
    /// Addresses learned from the peer's own incoming connections: redialed until it says
    /// goodbye.
    learned: Vec<SocketAddr>,
    /// Rotates the first address of a round, so one that failed everywhere starts elsewhere.
    next_address: usize,
    /// The address our last successful dial reached: dialed first next time.
    preferred: Option<SocketAddr>,
    backoff: Backoff,
    random: SplitMix64,
    dial: Dial,
    current: Option<Current>,
    /// Connections installed so far.
    generation: u64,
    shutting_down: bool,
    events: VecDeque<PeerEvent>,
}

impl Peer {
    /// The machine for `remote`, as seen from `local`; `seed` fixes its backoff jitter.
    pub fn new(local: NodeId, remote: NodeId, config: PeerConfig, seed: u64) -> Self {
        let backoff = Backoff::new(
            config.reconnect_initial.as_millis() as u64,
            config.reconnect_max.as_millis() as u64,
        );
        Self {
            local,
            remote,
            config,
            given: Vec::new(),
            learned: Vec::new(),
            next_address: 0,
            preferred: None,
            backoff,
            random: SplitMix64::new(seed),
            dial: Dial::Idle,
            current: None,
            generation: 0,
            shutting_down: false,
            events: VecDeque::new(),
        }
    }

    /// The peer.
    pub fn remote(&self) -> NodeId {
        self.remote
    }

    /// Whether a connection is installed (its lanes may still be setting up).
    pub fn is_connected(&self) -> bool {
        self.current.is_some()
    }

    /// Whether the peer is up: every lane's stream is in place.
    pub fn is_up(&self) -> bool {
        self.current.is_some_and(|c| c.up)
    }

    /// The current connection's generation (0: none was ever installed).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Failed dial rounds since the last proven connection.
    pub fn dial_attempts(&self) -> u32 {
        self.backoff.attempts()
    }

    /// Addresses known: given first, then learned.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.given.iter().chain(self.learned.iter()).copied()
    }

    /// Addresses to dial the peer at (given by the application, discovery or configuration).
    pub fn handle_addresses(
        &mut self,
        now: Instant,
        addresses: impl IntoIterator<Item = SocketAddr>,
    ) {
        for address in addresses {
            remember(&mut self.given, address);
        }
        self.schedule_dial(now);
    }

    /// A connection to the peer passed its hello exchange. The driver installs it or closes it
    /// as told; with `replaced` it closes the one in use first (and its lanes lose their
    /// streams).
    pub fn handle_connection(&mut self, new: NewConnection) -> Admit {
        if new.dialed_by_local {
            self.dial = Dial::Idle;
        }
        let mut replaced = None;
        if let Some(current) = &self.current {
            let keep = resolve_duplicate(
                &self.local,
                &self.remote,
                Candidate {
                    dialed_by_local: current.connection.dialed_by_local,
                    peer_incarnation: current.connection.peer_incarnation,
                },
                Candidate {
                    dialed_by_local: new.dialed_by_local,
                    peer_incarnation: new.peer_incarnation,
                },
            );
            if keep == Keep::Existing {
                return Admit::CloseNew;
            }
            replaced = Some(
                if new.peer_incarnation > current.connection.peer_incarnation {
                    Replaced::PeerRestarted
                } else {
                    Replaced::Duplicate
                },
            );
            self.lose_current();
            self.dial = Dial::Idle;
        }
        if new.dialed_by_local {
            self.preferred = Some(new.remote);
        } else if !self.given.contains(&new.remote) {
            // An incoming connection comes from the peer's own socket: a good address to redial.
            remember(&mut self.learned, new.remote);
        }
        self.generation += 1;
        self.current = Some(Current {
            generation: self.generation,
            connection: new,
            lanes_up: 0,
            up: false,
            // The backoff is reset only once this connection proves itself (the peer's resume
            // arrives), so a peer that accepts and at once drops connections is not redialed in
            // a tight loop.
            proven: false,
        });
        self.peer_up_if_ready();
        Admit::Install {
            generation: self.generation,
            replaced,
        }
    }

    /// Another lane installed its stream on the `generation`-th connection. Stale reports (of a
    /// connection replaced meanwhile) are ignored.
    pub fn handle_lane_up(&mut self, generation: u64) {
        let Some(current) = &mut self.current else {
            return;
        };
        if current.generation != generation || current.up {
            return;
        }
        current.lanes_up += 1;
        self.peer_up_if_ready();
    }

    /// The peer's resume arrived on the current connection: it works, so the next failure backs
    /// off from the start again.
    pub fn handle_resumed(&mut self) {
        if let Some(current) = &mut self.current {
            if !current.proven {
                current.proven = true;
                self.backoff.reset();
            }
        }
    }

    /// The current connection is gone. `goodbye`: the peer left on purpose (it finished its
    /// stream or closed with the shutdown code), so only the addresses we were given are
    /// redialed.
    pub fn handle_connection_lost(&mut self, now: Instant, goodbye: bool) {
        if goodbye {
            self.learned.clear();
        }
        if self.current.is_none() {
            return;
        }
        self.lose_current();
        self.schedule_dial(now);
    }

    /// None of the addresses of the last [`PeerEvent::Dial`] connected.
    pub fn handle_dial_failed(&mut self, now: Instant) {
        if self.dial == Dial::InFlight {
            self.dial = Dial::Idle;
        }
        self.schedule_dial(now);
    }

    /// The node is stopping: no more dials.
    pub fn handle_shutdown(&mut self) {
        self.shutting_down = true;
        self.dial = Dial::Idle;
    }

    /// The next deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.dial {
            Dial::At(at) => Some(at),
            _ => None,
        }
    }

    /// Time passed: a dial that is due starts ([`PeerEvent::Dial`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Dial::At(at) = self.dial {
            if at <= now {
                self.start_dial();
            }
        }
    }

    /// The next thing for the driver to do.
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    fn lose_current(&mut self) {
        if let Some(current) = self.current.take() {
            if current.up {
                self.events.push_back(PeerEvent::Down);
            }
        }
    }

    fn peer_up_if_ready(&mut self) {
        let Some(current) = &mut self.current else {
            return;
        };
        if !current.up && current.lanes_up >= self.config.other_lanes {
            current.up = true;
            self.events.push_back(PeerEvent::Up {
                remote: current.connection.remote,
                dialed_by_local: current.connection.dialed_by_local,
            });
        }
    }

    fn schedule_dial(&mut self, now: Instant) {
        let no_targets = self.given.is_empty() && self.learned.is_empty();
        if self.current.is_some() || no_targets || self.dial != Dial::Idle || self.shutting_down {
            return;
        }
        let delay_ms = if self.backoff.attempts() == 0 && self.generation == 0 {
            0
        } else {
            self.backoff.next_delay_ms(self.random.next_u64())
        };
        self.dial = Dial::At(now + Duration::from_millis(delay_ms));
    }

    /// Every known address, the one that worked last first, rotated per round.
    fn start_dial(&mut self) {
        let mut targets: Vec<SocketAddr> = self.addresses().collect();
        if self.current.is_some() || targets.is_empty() || self.shutting_down {
            self.dial = Dial::Idle;
            return;
        }
        let rotate = self.next_address % targets.len();
        targets.rotate_left(rotate);
        self.next_address = self.next_address.wrapping_add(1);
        if let Some(preferred) = self.preferred {
            if let Some(position) = targets.iter().position(|a| *a == preferred) {
                let address = targets.remove(position);
                targets.insert(0, address);
            }
        }
        self.dial = Dial::InFlight;
        if self.backoff.attempts() == 0 {
            // Count the attempt now, so a failure right away still backs off.
            self.backoff.next_delay_ms(0);
        }
        self.events.push_back(PeerEvent::Dial {
            addresses: targets,
            stagger: self.config.dial_stagger,
        });
    }
}

/// Adds `address` to a bounded list (the oldest goes when it is full).
fn remember(list: &mut Vec<SocketAddr>, address: SocketAddr) {
    if !list.contains(&address) {
        if list.len() >= ADDRESSES_MAX {
            list.remove(0);
        }
        list.push(address);
    }
}

/// An inbound stream's position: (epoch, delivered up to).
pub type Watermark = (u64, u64);

/// What the driver does after a [`WatermarkGate`] input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateOutput {
    /// Acknowledge the peer's stream up to here (`Link::acknowledge`).
    pub acknowledge: Option<Watermark>,
    /// Ask the spool to make this watermark durable; answer with
    /// [`WatermarkGate::handle_durable`] or [`WatermarkGate::handle_refused`].
    pub persist: Option<Watermark>,
}

/// How a refusal changed the gate, for the driver's logs (each said once per episode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The spool is full: the first refusal of an episode; retried after [`WATERMARK_RETRY`].
    FirstFull,
    /// Full again, already reported.
    StillFull,
    /// The spool stopped (a storage failure): nothing more is acknowledged until a restart.
    FirstStopped,
    /// Stopped, already reported.
    StillStopped,
}

/// Persist-before-acknowledge for one inbound lane (see the module doc).
#[derive(Debug)]
pub struct WatermarkGate {
    /// Whether there is a spool (without one, settlements are acknowledged at once).
    spooled: bool,
    /// Acknowledge before the spool confirms (the simulation's canary bug).
    acknowledge_early: bool,
    retry_after: Duration,
    /// The last watermark made durable (or restored).
    durable: Watermark,
    /// The one being persisted now.
    in_flight: Option<Watermark>,
    /// When to try again after a refusal for room.
    retry_at: Deadline,
    /// The spool refuses for room, while it does.
    refused: bool,
    /// The spool stopped after a storage failure.
    stopped: bool,
}

impl WatermarkGate {
    /// A gate for a node with a spool (`spooled`) or without; `durable` is the watermark
    /// restored from the spool (`(0, 0)`: none).
    pub fn new(spooled: bool, durable: Watermark) -> Self {
        Self {
            spooled,
            acknowledge_early: false,
            retry_after: WATERMARK_RETRY,
            durable,
            in_flight: None,
            retry_at: Deadline::default(),
            refused: false,
            stopped: false,
        }
    }

    /// Deliberately acknowledges before the spool confirms (only for proving the simulation's
    /// checkers: this loses messages at a crash).
    #[cfg(feature = "fault-injection")]
    pub fn acknowledge_before_durable(mut self) -> Self {
        self.acknowledge_early = true;
        self
    }

    /// The last durable watermark.
    pub fn durable(&self) -> Watermark {
        self.durable
    }

    /// Whether a watermark is being persisted (its acknowledgement follows the spool's answer).
    pub fn is_persisting(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The application settled the stream up to `watermark`. `last`: the lane is stopping, so
    /// the newest is persisted whatever is in flight or waiting for a retry.
    pub fn handle_settled(&mut self, watermark: Watermark, last: bool) -> GateOutput {
        let mut output = GateOutput::default();
        if !self.spooled || self.acknowledge_early {
            output.acknowledge = Some(watermark);
            if !self.spooled {
                return output;
            }
        }
        let (epoch, up_to) = watermark;
        let newer = |(e, u): Watermark| e != epoch || up_to > u;
        // Nothing delivered of the stream yet: a watermark would add nothing (the peer's resume
        // starts the stream again after a restart), only a record per lane.
        if up_to == 0 || !newer(self.durable) || self.stopped {
            return output;
        }
        if self.retry_at.is_set() && !last {
            return output;
        }
        if let Some(in_flight) = self.in_flight {
            if !last || !newer(in_flight) {
                return output;
            }
        }
        self.in_flight = Some(watermark);
        output.persist = Some(watermark);
        output
    }

    /// The spool made `watermark` durable: acknowledge up to it. Returns whether this ended a
    /// refusal episode (for the log).
    pub fn handle_durable(&mut self, watermark: Watermark) -> (GateOutput, bool) {
        self.in_flight = None;
        self.durable = watermark;
        // The spool has room again: no need to wait for the retry.
        self.retry_at.clear();
        let recovered = std::mem::take(&mut self.refused);
        let output = GateOutput {
            acknowledge: Some(watermark),
            persist: None,
        };
        (output, recovered)
    }

    /// The spool did not persist `watermark`: nothing past the last durable one is acknowledged
    /// (the peer keeps those messages and resends them after a restart, which drops them as
    /// duplicates only up to the durable watermark). `stopped`: it never will again.
    pub fn handle_refused(&mut self, now: Instant, watermark: Watermark, stopped: bool) -> Refusal {
        if self.in_flight == Some(watermark) {
            self.in_flight = None;
        }
        if stopped {
            let first = !self.stopped;
            self.stopped = true;
            return if first {
                Refusal::FirstStopped
            } else {
                Refusal::StillStopped
            };
        }
        let first = !self.refused;
        self.refused = true;
        self.retry_at.set(now + self.retry_after);
        if first {
            Refusal::FirstFull
        } else {
            Refusal::StillFull
        }
    }

    /// When to retry after a refusal.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retry_at.get()
    }

    /// Time passed: returns true when the driver should hand the newest settlement to
    /// [`WatermarkGate::handle_settled`] again.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        self.retry_at.fire(now)
    }
}

/// When one lane's queued messages are next checked against expiry and retry budget: every
/// [`EXPIRY_CHECK`] while messages are queued, never while none are.
#[derive(Debug, Default)]
pub struct ExpiryTimer {
    at: Deadline,
}

impl ExpiryTimer {
    /// Arms the timer if messages are queued and it is not armed yet.
    pub fn arm(&mut self, now: Instant, queued_messages: usize) {
        if !self.at.is_set() && queued_messages > 0 {
            self.at.set(now + EXPIRY_CHECK);
        }
    }

    /// The next check.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.at.get()
    }

    /// Time passed: returns true when the queued messages are to be checked now.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        self.at.fire(now)
    }
}

/// A one-shot deadline: set, read, and fired (cleared) once time reaches it.
#[derive(Clone, Copy, Debug, Default)]
struct Deadline(Option<Instant>);

impl Deadline {
    fn set(&mut self, at: Instant) {
        self.0 = Some(at);
    }

    fn clear(&mut self) {
        self.0 = None;
    }

    fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn get(&self) -> Option<Instant> {
        self.0
    }

    /// True (and cleared) if `now` reached it.
    fn fire(&mut self, now: Instant) -> bool {
        let due = self.0.is_some_and(|at| at <= now);
        if due {
            self.0 = None;
        }
        due
    }
}
