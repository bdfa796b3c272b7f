//! Node configuration and the runtime seams the simulation replaces.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use weft_proto::frame::Limits;
use weft_proto::LinkConfig;

use crate::addr::NodeAddr;

/// The default UDP port of a Weft node.
pub const DEFAULT_PORT: u16 = 7450;

/// Everything a node can be configured with. Built through [`crate::NodeBuilder`].
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Nodes of other meshes are refused at the hello.
    pub mesh: String,
    /// Mesh secret and allow-list: who is admitted beyond a valid identity and the mesh name.
    pub admission: weft_proto::handshake::Admission,
    /// Where the node's UDP socket listens (and dials from).
    pub bind: SocketAddr,
    /// Peers to connect to at start (id and addresses).
    pub peers: Vec<NodeAddr>,
    /// Addresses of nodes whose ids are not known in advance (networks without multicast): each
    /// is dialed, with backoff, until a node of the mesh answers; from then on it is that node's
    /// address.
    pub seeds: Vec<SocketAddr>,
    /// Per-peer windows and queue bounds, frame limits.
    pub link: LinkConfig,
    /// Messages buffered per channel before the links delivering to it wait (backpressure).
    pub inbox_capacity: usize,
    /// Most channels the application receives on (`Node::receive`; beyond it
    /// `ReceiveError::TooManyChannels`). Channels that peers' messages create are not counted
    /// here until the application opens them: see `unopened_channels_per_peer`.
    pub channels_max: usize,
    /// Most channels one peer's messages may create that the application never opened (their
    /// messages wait there for a receiver); a peer sending to more is cut off with the reason,
    /// and no peer can use up the application's `channels_max`. Default 256.
    pub unopened_channels_per_peer: usize,
    /// Most peers a node keeps state for.
    pub peers_max: usize,
    /// Sends a peer may queue ahead of its link before `send` waits (on top of the link queue);
    /// with a spool, also the most sends to one peer in one group commit.
    pub peer_command_capacity: usize,
    /// QUIC keep-alive: keeps idle connections open and detects dead ones.
    pub keep_alive: Duration,
    /// A connection with no traffic for this long is dead.
    pub idle_timeout: Duration,
    /// Upper bound for the TLS handshake plus the hello exchange.
    pub handshake_timeout: Duration,
    /// First reconnect delay (jittered, doubling per failure).
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Largest UDP payload path MTU discovery may probe for (loopback allows 65 527).
    pub max_udp_payload: u16,
    /// Capacity of the peer event broadcast; slower event readers miss events (and are told).
    pub events_capacity: usize,
    /// Find peers of the same mesh with mDNS (and announce this node); `None` (the default): off.
    pub mdns: Option<MdnsConfig>,
    /// Bounds and timeouts of pub/sub and request/response.
    pub patterns: PatternConfig,
    /// The on-disk retry spool in `<data_dir>/spool` (fsync policy, caps). Used when the node
    /// has a data directory; `None` keeps messages in memory only (lost if the process dies).
    pub spool: Option<weft_spool::SpoolConfig>,
    /// Most delayed messages (see [`weft_proto::OutgoingMessage::with_delay`]) waiting for their
    /// due time, node-wide; a send beyond it fails with [`crate::SendError::ScheduleFull`] (not
    /// backpressure: the next slot may only free up when the earliest message is due, days
    /// later). Default 65 536. With a spool each also holds one spool record.
    pub schedule_max: usize,
    /// The furthest ahead of the sender's clock a due time may lie; further is refused with
    /// [`crate::SendError::Delay`]. Default 30 days.
    pub delay_max: Duration,
    /// Most idempotency keys (see [`crate::MessageOptions::idempotency_key`]) the node
    /// remembers: a second message with a key it forgot is handed on again. Default 65 536.
    /// With a spool, the keys are persisted, each in a spool record: at most an eighth of
    /// the spool's `records_max` are set aside for them (the persisted window is the smaller
    /// of the two).
    pub idempotency_keys_max: usize,
    /// How long the node remembers an idempotency key. Default one hour.
    pub idempotency_window: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            mesh: "default".into(),
            admission: Default::default(),
            bind: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            peers: Vec::new(),
            seeds: Vec::new(),
            link: LinkConfig::default(),
            inbox_capacity: 4_096,
            channels_max: 4_096,
            unopened_channels_per_peer: 256,
            peers_max: 1_024,
            peer_command_capacity: 16_384,
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            reconnect_initial: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
            max_udp_payload: 1_452,
            events_capacity: 1_024,
            mdns: None,
            patterns: PatternConfig::default(),
            spool: Some(weft_spool::SpoolConfig::default()),
            schedule_max: 65_536,
            delay_max: Duration::from_millis(weft_proto::schedule::DELAY_MAX_MS_DEFAULT),
            idempotency_keys_max: 65_536,
            idempotency_window: Duration::from_secs(3_600),
        }
    }
}

/// Bounds and timeouts of the messaging patterns (pub/sub, request/response, scatter-gather).
#[derive(Clone, Debug)]
pub struct PatternConfig {
    /// How long a subscriber or server whose connection went down keeps receiving events in its
    /// link (and spool), so a short partition loses nothing; after it the peer is forgotten
    /// until it announces again.
    pub interest_lease: Duration,
    /// Longest wait for every connected peer to confirm a new subscription or service (then
    /// `subscribe`/`serve` fail with the peers that did not answer).
    pub subscribe_timeout: Duration,
    /// A request's timeout unless the call sets one.
    pub request_timeout: Duration,
    /// Events buffered per subscription (reliable: a full one makes the publishers wait;
    /// best-effort: a full one drops, counted).
    pub subscription_capacity: usize,
    /// Requests buffered per served service before requests wait.
    pub service_capacity: usize,
    /// Answered requests a server remembers, so a repeated request id is answered again
    /// without running the handler twice.
    pub reply_cache_max: usize,
    /// How long a server remembers an answered request.
    pub reply_cache_age: Duration,
    /// Requests one node may have outstanding at once (each holds a slot until answered or
    /// timed out).
    pub requests_max: usize,
    /// Credit a worker grants each producer unless it says otherwise: the most messages of
    /// its queue the producer may have sent it without an acknowledgement.
    pub pull_credit: u32,
    /// How long a worker's connection may be down before its unacknowledged work is taken back
    /// and given to other workers (shorter than `interest_lease`).
    pub work_reassign_after: Duration,
    /// How long a connected worker may hold work of this producer without acknowledging any
    /// (its application stopped taking messages) before copies of the unkeyed items it holds
    /// behind the oldest (which may be in its application's hands) go to other workers, and it
    /// gets no new work until it acknowledges again. If it recovers, it handles the originals
    /// too (the copies carry the header `weft-redelivery-of`: the original's id). Keyed items
    /// stay with their owner (per-key order). `None`: never.
    pub work_ack_timeout: Option<Duration>,
    /// Children of each node in an event's relay tree: a publisher sends each event to at
    /// most this many subscribers itself, and each of them relays it to at most this many
    /// more (events to at most this many subscribers go straight to each).
    pub gossip_fanout: usize,
    /// Events a publisher keeps for repair until every addressee confirmed them (a full
    /// retention hands the slowest addressees over to their direct links).
    pub event_retention_max: usize,
    /// Payload bytes a publisher keeps for repair.
    pub event_retention_bytes_max: usize,
    /// How long an addressee may make no progress before its publisher re-sends it everything
    /// it did not confirm over the direct link.
    pub event_repair_after: Duration,
    /// Events a subscriber holds per publisher while an earlier one is missing (beyond it, they
    /// are dropped and the publisher repairs them).
    pub event_hold_max: usize,
    /// Events a publisher keeps in its link (and spool) for each durable subscription that has
    /// not received them yet — its subscriber is away, or slow. Beyond it the oldest is given
    /// up: dead-lettered with the reason "durable subscription retention exceeded", counted
    /// (`durable_events_dropped`), never silently gone. Keep it below
    /// `link.queue_messages_max`, or a long absence makes publishes wait for room instead.
    pub durable_retention_max: usize,
    /// How long an event is kept for a durable subscription that has not received it: it
    /// expires then (dead-lettered, counted in `durable_events_dropped`).
    pub durable_retention_age: Duration,
}

impl Default for PatternConfig {
    fn default() -> Self {
        Self {
            interest_lease: Duration::from_secs(30),
            subscribe_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            subscription_capacity: 4_096,
            service_capacity: 1_024,
            reply_cache_max: 16_384,
            reply_cache_age: Duration::from_secs(120),
            requests_max: 65_536,
            pull_credit: 64,
            work_reassign_after: Duration::from_secs(5),
            work_ack_timeout: Some(Duration::from_secs(30)),
            gossip_fanout: 8,
            event_retention_max: 65_536,
            event_retention_bytes_max: 64 << 20,
            event_repair_after: Duration::from_secs(2),
            event_hold_max: 4_096,
            durable_retention_max: 16_384,
            durable_retention_age: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl NodeConfig {
    /// Frame limits in force.
    pub fn limits(&self) -> Limits {
        self.link.limits
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let positive = [
            ("inbox_capacity", self.inbox_capacity),
            ("channels_max", self.channels_max),
            (
                "unopened_channels_per_peer",
                self.unopened_channels_per_peer,
            ),
            ("schedule_max", self.schedule_max),
            ("peers_max", self.peers_max),
            (
                "patterns.subscription_capacity",
                self.patterns.subscription_capacity,
            ),
            ("patterns.service_capacity", self.patterns.service_capacity),
            ("patterns.requests_max", self.patterns.requests_max),
            ("patterns.gossip_fanout", self.patterns.gossip_fanout),
            (
                "patterns.event_retention_max",
                self.patterns.event_retention_max,
            ),
            (
                "patterns.event_retention_bytes_max",
                self.patterns.event_retention_bytes_max,
            ),
            ("patterns.event_hold_max", self.patterns.event_hold_max),
            (
                "patterns.durable_retention_max",
                self.patterns.durable_retention_max,
            ),
            ("peer_command_capacity", self.peer_command_capacity),
            ("events_capacity", self.events_capacity),
            ("link.window_messages", self.link.window_messages),
            ("link.window_bytes", self.link.window_bytes),
            ("link.queue_messages_max", self.link.queue_messages_max),
            ("link.queue_bytes_max", self.link.queue_bytes_max),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(format!(
                "keep_alive ({:?}) must be shorter than idle_timeout ({:?})",
                self.keep_alive, self.idle_timeout
            ));
        }
        if self.max_udp_payload < 1_200 {
            return Err("max_udp_payload must be at least 1200 (the QUIC minimum)".into());
        }
        if self.mesh.is_empty() || self.mesh.len() > 255 {
            return Err("mesh name must be 1 to 255 bytes".into());
        }
        Ok(())
    }
}

/// Makes the spool's storage (see [`Seams::spool_storage`]).
pub type SpoolStorageFactory = Arc<dyn Fn() -> Box<dyn weft_spool::Storage + Send> + Send + Sync>;

/// A wall clock in Unix milliseconds.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Replaceable pieces of the environment. Production leaves every one at its default; the
/// deterministic simulation swaps in a simulated UDP socket, seeded crypto, seeded QUIC ids and a
/// simulated wall clock, and so runs this very driver rather than a copy of it.
#[derive(Clone, Default)]
pub struct Seams {
    /// A UDP socket to use instead of binding `bind`.
    pub udp_socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    /// The rustls provider (default: ring with OS randomness).
    pub crypto_provider: Option<Arc<rustls::crypto::CryptoProvider>>,
    /// quinn endpoint settings (seeded rng, reset key, connection id generator).
    pub endpoint_config: Option<quinn::EndpointConfig>,
    /// The client's initial destination connection id.
    pub initial_dst_cid_provider: Option<Arc<dyn Fn() -> quinn::ConnectionId + Send + Sync>>,
    /// The server's handshake token key.
    pub token_key: Option<Arc<dyn quinn::crypto::HandshakeTokenKey>>,
    /// The server's wall clock for tokens.
    pub time_source: Option<Arc<dyn quinn::TimeSource>>,
    /// Seed for the driver's own randomness (epochs, backoff jitter). Default: from the OS.
    pub rng_seed: Option<u64>,
    /// Wall clock for message timestamps. Default: the system clock.
    pub wall_clock: Option<WallClock>,
    /// The spool's storage (the simulation's `SimStorage`), made anew at each start; the
    /// writer then runs as a task on the node's runtime instead of a thread of its own.
    pub spool_storage: Option<SpoolStorageFactory>,
    /// Simulated fsync time of that storage.
    pub spool_sync_latency: Option<Duration>,
    /// A deliberate bug for the simulation's canaries.
    #[cfg(feature = "fault-injection")]
    pub fault: weft_proto::link::Fault,
}

impl fmt::Debug for Seams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seams")
            .field("udp_socket", &self.udp_socket.is_some())
            .field("crypto_provider", &self.crypto_provider.is_some())
            .field("endpoint_config", &self.endpoint_config.is_some())
            .field("rng_seed", &self.rng_seed)
            .field("wall_clock", &self.wall_clock.is_some())
            .finish_non_exhaustive()
    }
}

/// The DNS-SD service type Weft nodes announce and browse by default.
pub const SERVICE_TYPE_DEFAULT: &str = "_weft._udp.local.";

/// Which network interfaces discovery announces and browses on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Interfaces {
    /// Every interface, IPv4 and IPv6, loopback included (the production default).
    #[default]
    All,
    /// IPv4 loopback only (127.0.0.0/8): for demos and tests, which must not announce on the
    /// machine's real network.
    LoopbackOnly,
    /// Only the interfaces with these names (e.g. `eth0`).
    Named(Vec<String>),
}

/// mDNS discovery settings (see the `discovery` module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdnsConfig {
    /// Where to announce and browse. Default: [`Interfaces::All`]; demos and tests use
    /// [`Interfaces::LoopbackOnly`].
    pub interfaces: Interfaces,
    /// The DNS-SD service type, ending in `._udp.local.` (default [`SERVICE_TYPE_DEFAULT`]).
    /// Nodes only find nodes announcing the same type; tests use a fresh one per run so parallel
    /// runs and stale announcements do not meet.
    pub service_type: String,
}

impl Default for MdnsConfig {
    fn default() -> Self {
        Self {
            interfaces: Interfaces::All,
            service_type: SERVICE_TYPE_DEFAULT.into(),
        }
    }
}
