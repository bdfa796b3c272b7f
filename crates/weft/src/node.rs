//! The node: its endpoint, its peers and the application-facing API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, info_span, warn, Instrument};
use weft_proto::backoff::SplitMix64;
use weft_proto::{
    gossip, Channel, Kind, Lane, MessageId, NodeId, OutgoingMessage, Priority, StreamId,
};

use crate::addr::NodeAddr;
use crate::config::{NodeConfig, Seams, WallClock};
use crate::connection::{self, close_code, EndpointClosed, Established};
use crate::discovery::{Announcement, Discovery, DiscoveryCallback, DiscoveryEvent, MdnsConfig};
use crate::durable::{Durable, Restored, SpoolSetup};
use crate::error::{ReceiveError, SendBatchError, SendError, StartError, TrySendError};
pub use crate::events::PeerEvent;
use crate::handle::{Control, Outgoing, PeerHandle};
use crate::identity::Identity;
use crate::inbox::{Channels, Inbox};
use crate::keys::Keys;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::peer::{Dialer, PeerEnv, PeerTask, RestoredLane};
use crate::queue;
use crate::receipt::{Receipt, Receipts, SlotState};
use crate::scheduler::{Scheduler, Waiting};
use crate::tls;

/// A message this node had numbered before a start on a damaged spool (a quarantined segment),
/// sent again under a new number in a new stream: after corruption delivery is at-least-once,
/// and the peer may get it under both ids. See [`Node::renumbered`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renumbered {
    /// Its destination.
    pub peer: NodeId,
    /// The id it had.
    pub old: MessageId,
    /// The id it is sent under now.
    pub new: MessageId,
}

/// How long `shutdown` waits for the endpoint's connections to drain and its socket to close:
/// a connection closed while its handshake is unanswered drains for three probe timeouts
/// without a round-trip sample (about 3 s with quinn's initial RTT estimate of 333 ms).
const ENDPOINT_RELEASE_MAX: Duration = Duration::from_secs(5);

/// State shared by the node's tasks.
pub(crate) struct Shared {
    pub id: NodeId,
    pub identity: Identity,
    pub config: NodeConfig,
    pub seams: Seams,
    /// The QUIC endpoint, taken (closed and dropped) by `shutdown` or the drop of the last
    /// [`Node`]: never handed out for longer than a dial or the accept loop, through
    /// [`Shared::endpoint`], so that handles outliving the node do not keep the UDP port bound.
    endpoint: Mutex<Option<quinn::Endpoint>>,
    /// Ends (the sender is dropped) once the node's own UDP socket is closed: after the last
    /// user of the endpoint (its driver, connections) let go of it. `None` with a socket from
    /// [`Seams::udp_socket`], whose owner keeps it.
    socket_closed: Option<watch::Receiver<()>>,
    pub provider: Arc<rustls::crypto::CryptoProvider>,
    pub transport: Arc<quinn::TransportConfig>,
    /// This incarnation's stream epoch for peers without a stream restored from the spool.
    pub epoch: u64,
    /// When this incarnation started (wall clock, Unix ms), announced in every hello.
    pub incarnation: u64,
    /// The spool writer (`None`: a node without a data directory keeps messages in memory only).
    pub durable: Option<Durable>,
    /// Streams recovered from the spool, taken by each peer's task when it starts.
    pub restored: Mutex<Restored>,
    /// Messages renumbered by this start's recovery.
    pub renumbered: Vec<Renumbered>,
    pub rng: Mutex<SplitMix64>,
    pub wall_clock: WallClock,
    pub peers: RwLock<BTreeMap<NodeId, Arc<PeerHandle>>>,
    pub channels: Arc<Channels>,
    /// The idempotency keys handed on recently.
    pub keys: Arc<Keys>,
    pub events: broadcast::Sender<PeerEvent>,
    pub shutdown: watch::Sender<bool>,
    pub tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The runtime the node started on.
    pub runtime: tokio::runtime::Handle,
    pub metrics: Arc<Metrics>,
    /// Delayed messages waiting for their due time (see [`crate::scheduler`]).
    pub scheduler: Arc<Scheduler>,
    /// Pub/sub and request/response state.
    pub patterns: crate::patterns::Patterns,
    /// What the peer tasks get of the node.
    peer_env: Arc<PeerEnv>,
}

/// How peer tasks dial: through the node's endpoint while the node lives.
fn dialer(node: Weak<Shared>) -> Dialer {
    Arc::new(move |peer, addr| {
        let node = node.upgrade();
        Box::pin(async move {
            match node {
                Some(node) => connection::dial(node, peer, addr).await,
                None => Err(quinn::ConnectError::EndpointStopping.into()),
            }
        })
    })
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What the handshakes of `connection` need of the node, and nothing more.
impl connection::Context for Shared {
    fn config(&self) -> &NodeConfig {
        &self.config
    }

    fn local_id(&self) -> NodeId {
        self.id
    }

    fn incarnation(&self) -> u64 {
        self.incarnation
    }

    fn identity(&self) -> &Identity {
        &self.identity
    }

    fn provider(&self) -> &Arc<rustls::crypto::CryptoProvider> {
        &self.provider
    }

    fn transport(&self) -> &Arc<quinn::TransportConfig> {
        &self.transport
    }

    fn seams(&self) -> &Seams {
        &self.seams
    }

    fn endpoint(&self) -> Result<quinn::Endpoint, EndpointClosed> {
        Shared::endpoint(self)
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn is_shutting_down(&self) -> bool {
        Shared::is_shutting_down(self)
    }

    fn attach(
        self: &Arc<Self>,
        peer: NodeId,
        established: Established,
    ) -> Result<(), Box<Established>> {
        Shared::attach(self, peer, established)
    }
}

impl Shared {
    /// The endpoint, to dial or accept with; [`EndpointClosed`] once the node shut down. Hold
    /// the clone no longer than that: while one lives, quinn keeps the UDP socket.
    pub(crate) fn endpoint(&self) -> Result<quinn::Endpoint, EndpointClosed> {
        self.endpoint
            .lock()
            .expect("endpoint lock poisoned")
            .clone()
            .ok_or(EndpointClosed)
    }

    /// Takes the endpoint out of reach (dials fail with [`EndpointClosed`] from now on) and
    /// closes it; a drop does only this, without waiting.
    fn take_endpoint(&self, reason: &[u8]) -> Option<quinn::Endpoint> {
        let endpoint = self
            .endpoint
            .lock()
            .expect("endpoint lock poisoned")
            .take()?;
        endpoint.close(close_code::SHUTDOWN, reason);
        Some(endpoint)
    }

    /// Closes the endpoint and waits (until `deadline`) for its connections to drain and for
    /// its UDP socket to be closed, so that a new node can bind the address at once.
    ///
    /// quinn closes the socket only when nothing holds it any more: its endpoint driver task,
    /// which ends once every `Endpoint` clone is dropped and every connection drained, and each
    /// connection's state. That happens on other tasks, some time after the last handle here is
    /// dropped; hence [`SocketRelease`], which says when it did.
    async fn release_endpoint(&self, deadline: tokio::time::Instant) {
        if let Some(endpoint) = self.take_endpoint(b"shutdown") {
            if tokio::time::timeout_at(deadline, endpoint.wait_idle())
                .await
                .is_err()
            {
                warn!(
                    connections = endpoint.open_connections(),
                    "connections still draining at the end of the shutdown; the UDP socket stays \
                     bound until they are done"
                );
                return;
            }
        }
        if let Some(mut closed) = self.socket_closed.clone() {
            // Only ever ends with an error: the sender is dropped with the socket.
            if tokio::time::timeout_at(deadline, closed.changed())
                .await
                .is_err()
            {
                warn!("the UDP socket is still held at the end of the shutdown");
            }
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn random(&self) -> u64 {
        self.rng.lock().expect("rng lock poisoned").next_u64()
    }

    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut tasks = self.tasks.lock().expect("tasks lock poisoned");
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    /// A sender to `peer`, tracking it (and starting its task) on first use.
    pub(crate) fn sender(self: &Arc<Self>, peer: NodeId) -> Result<PeerSender, SendError> {
        Ok(PeerSender {
            handle: self.peer(peer)?,
            shared: Arc::clone(self),
        })
    }

    /// The peer's handle, creating it (and its task) on first use.
    pub(crate) fn peer(self: &Arc<Self>, id: NodeId) -> Result<Arc<PeerHandle>, SendError> {
        if let Some(handle) = self.peers.read().expect("peers lock poisoned").get(&id) {
            return Ok(Arc::clone(handle));
        }
        if id == self.id {
            return Err(SendError::ToSelf(id));
        }
        if self.is_shutting_down() {
            return Err(SendError::NodeClosed);
        }
        let mut peers = self.peers.write().expect("peers lock poisoned");
        if let Some(handle) = peers.get(&id) {
            return Ok(Arc::clone(handle));
        }
        if peers.len() >= self.config.peers_max {
            return Err(SendError::TooManyPeers(self.config.peers_max));
        }
        let seed = self.random();
        let restored = |lane: Lane| {
            let mut restored = self.restored.lock().expect("restored lock poisoned");
            RestoredLane {
                outbound: restored.outbound.remove(&(id, lane)),
                inbound: restored.inbound.remove(&(id, lane)),
            }
        };
        let (task, handle) = PeerTask::new(Arc::clone(&self.peer_env), id, seed, restored);
        let handle = Arc::new(handle);
        peers.insert(id, Arc::clone(&handle));
        drop(peers);
        let span = info_span!(parent: None, "peer", node = %self.id.short(), peer = %id.short());
        self.spawn(task.run().instrument(span));
        Ok(handle)
    }

    /// Hands an established connection to its peer's link. Gives it back if the node cannot take
    /// another peer.
    pub(crate) fn attach(
        self: &Arc<Self>,
        peer: NodeId,
        established: Established,
    ) -> Result<(), Box<Established>> {
        let handle = match self.peer(peer) {
            Ok(handle) => handle,
            Err(_) => return Err(Box::new(established)),
        };
        handle
            .control
            .send(Control::Connection(established))
            .map_err(|mpsc::error::SendError(control)| match control {
                Control::Connection(established) => Box::new(established),
                _ => unreachable!("sent a connection"),
            })
    }

    /// Numbers a delayed message that became due and enqueues it (the release task's work; see
    /// [`PeerSender::release`]); a peer the node cannot track fails the message's receipt.
    async fn release(self: &Arc<Self>, waiting: Waiting) {
        if crate::patterns::later::is_local(self, &waiting) {
            crate::patterns::later::release(self, waiting);
            return;
        }
        let dest = waiting.dest;
        match self.sender(dest) {
            Ok(sender) => sender.release(waiting).await,
            Err(error) => {
                warn!(peer = %dest.short(), %error, "cannot release a delayed message");
                self.scheduler.free_place(waiting.ticket.holds_place);
                let _ = waiting.ticket.slot.send(SlotState::Failed(
                    crate::error::DeliveryError::NotAccepted(format!(
                        "cannot be released: {error}"
                    )),
                ));
            }
        }
    }

    /// Puts a delayed message addressed to this node itself (a pattern operation with a due
    /// time, see `patterns::later`) into the schedule: with a spool, durable when this returns.
    /// Returns its due time.
    pub(crate) async fn schedule_local(
        self: &Arc<Self>,
        message: OutgoingMessage,
    ) -> Result<u64, SendError> {
        let due = message
            .deliver_after_unix_ms()
            .expect("scheduled with a due time");
        let expires = message.options.as_ref().and_then(|o| o.expires_unix_ms);
        let delay_max_ms = u64::try_from(self.config.delay_max.as_millis()).unwrap_or(u64::MAX);
        weft_proto::schedule::check_due(due, self.now_unix_ms(), delay_max_ms, expires)?;
        if self.is_shutting_down() {
            return Err(SendError::NodeClosed);
        }
        self.scheduler
            .take_place()
            .map_err(SendError::ScheduleFull)?;
        self.start_release_task();
        let (slot, _) = crate::receipt::slot(self.durable.is_none());
        let Some(durable) = &self.durable else {
            self.scheduler.insert(Waiting {
                dest: self.id,
                message,
                ticket: crate::scheduler::Ticket {
                    tag: 0,
                    slot,
                    holds_place: true,
                },
            });
            return Ok(due);
        };
        match durable.room.acquire().await {
            Ok(room) => room.forget(),
            Err(_) => {
                self.scheduler.free_place(true);
                return Err(SendError::NodeClosed);
            }
        }
        let (done, accepted) = tokio::sync::oneshot::channel();
        let command = crate::durable::Command::Schedule {
            dest: self.id,
            message,
            slot,
            done: Some(done),
        };
        if durable.tx.send(command).is_err() {
            durable.room.add_permits(1);
            self.scheduler.free_place(true);
            return Err(SendError::NodeClosed);
        }
        match accepted.await {
            Ok(Ok(())) => Ok(due),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(SendError::NodeClosed),
        }
    }

    pub(crate) fn now_unix_ms(&self) -> u64 {
        (self.wall_clock)()
    }

    /// Starts the task that releases delayed messages, on the first one (a node that never
    /// delays a message runs no such task: its runtime, and a simulation's event order, are
    /// exactly as without the feature). Idempotent.
    pub(crate) fn start_release_task(self: &Arc<Self>) {
        if self.scheduler.mark_started() {
            let span = info_span!(parent: None, "scheduler", node = %self.id.short());
            // On the node's runtime (a `try_send` may come from a thread outside it).
            let clock = Arc::clone(self);
            let releaser = Arc::clone(self);
            let release = move |waiting: Waiting| {
                let shared = Arc::clone(&releaser);
                async move { shared.release(waiting).await }
            };
            let task = crate::scheduler::run(
                Arc::clone(&self.scheduler),
                self.shutdown.subscribe(),
                move || clock.now_unix_ms(),
                release,
            );
            let handle = self.runtime.spawn(task.instrument(span));
            let mut tasks = self.tasks.lock().expect("tasks lock poisoned");
            tasks.retain(|t| !t.is_finished());
            tasks.push(handle);
        }
    }
}

/// Builds and starts a [`Node`].
#[derive(Debug, Default)]
#[must_use = "a builder does nothing until .start().await"]
pub struct NodeBuilder {
    config: NodeConfig,
    data_dir: Option<PathBuf>,
    identity: Option<Identity>,
    seams: Seams,
}

impl NodeBuilder {
    /// The mesh this node belongs to; nodes of other meshes are refused.
    pub fn mesh(mut self, mesh: impl Into<String>) -> Self {
        self.config.mesh = mesh.into();
        self
    }

    /// Requires every peer to prove it knows `secret` (proven per connection, never sent).
    pub fn mesh_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.config.admission = self.config.admission.with_secret(secret.as_ref());
        self
    }

    /// Admits only these nodes (in addition to the mesh name and secret checks).
    pub fn allow_only(mut self, nodes: impl IntoIterator<Item = NodeId>) -> Self {
        self.config.admission = self.config.admission.with_allow_list(nodes);
        self
    }

    /// The node's directory: its identity key lives here (created on first start).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Use this identity instead of one from a data directory.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The UDP address to listen on (default `0.0.0.0:7450`; use port 0 for any free port).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.config.bind = addr;
        self
    }

    /// A peer to connect to at start (and to keep reconnecting to).
    pub fn peer(mut self, peer: NodeAddr) -> Self {
        self.config.peers.push(peer);
        self
    }

    /// A seed: an address where some node of the mesh listens, its id unknown (see
    /// [`NodeConfig::seeds`]).
    pub fn seed(mut self, addr: SocketAddr) -> Self {
        self.config.seeds.push(addr);
        self
    }

    /// Finds peers of the same mesh with mDNS, and announces this node (see [`crate::discovery`]).
    /// Demos and tests use [`crate::Interfaces::LoopbackOnly`].
    pub fn discovery_mdns(mut self, config: MdnsConfig) -> Self {
        self.config.mdns = Some(config);
        self
    }

    /// Replaces the whole configuration (the mesh, bind address and peers included).
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Adjusts the configuration in place.
    pub fn configure(mut self, f: impl FnOnce(&mut NodeConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Replaces parts of the environment (for deterministic simulation).
    pub fn seams(mut self, seams: Seams) -> Self {
        self.seams = seams;
        self
    }

    /// Starts the node: binds the socket, starts accepting and dials the configured peers.
    pub async fn start(self) -> Result<Node, StartError> {
        let NodeBuilder {
            config,
            data_dir,
            identity,
            seams,
        } = self;
        config.validate().map_err(StartError::Config)?;
        let identity = match (identity, &data_dir) {
            (Some(identity), _) => identity,
            (None, Some(dir)) => Identity::load_or_create(dir)?,
            (None, None) => return Err(StartError::NoIdentity),
        };
        let mut lock = data_dir.as_deref().map(lock_data_dir).transpose()?;
        let id = identity.node_id();
        let provider = seams
            .crypto_provider
            .clone()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let transport = Arc::new(transport_config(&config));
        let server_tls = tls::server_config(&identity, Arc::clone(&provider))?;
        let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
            .map_err(|e| StartError::Config(format!("TLS: {e}")))?;
        let mut server_config = match &seams.token_key {
            Some(key) => quinn::ServerConfig::new(Arc::new(server_crypto), Arc::clone(key)),
            None => quinn::ServerConfig::with_crypto(Arc::new(server_crypto)),
        };
        server_config.transport_config(Arc::clone(&transport));
        if let Some(time_source) = &seams.time_source {
            server_config.time_source(Arc::clone(time_source));
        }
        let mut endpoint_config = seams.endpoint_config.clone().unwrap_or_default();
        endpoint_config
            .max_udp_payload_size(config.max_udp_payload)
            .map_err(|e| StartError::Config(format!("max_udp_payload: {e}")))?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let (socket, socket_closed) = match &seams.udp_socket {
            Some(socket) => (Arc::clone(socket), None),
            None => {
                let (socket, closed) = std::net::UdpSocket::bind(config.bind)
                    .and_then(|socket| SocketRelease::wrap(&*runtime, socket))
                    .map_err(|source| StartError::Bind {
                        addr: config.bind,
                        source,
                    })?;
                (socket, Some(closed))
            }
        };
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
        let rng_seed = seams.rng_seed.unwrap_or_else(os_random_u64);
        let mut rng = SplitMix64::new(rng_seed);
        let epoch = rng.next_u64();
        let wall_clock: WallClock = seams.wall_clock.clone().unwrap_or_else(|| {
            Arc::new(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            })
        });
        let incarnation = wall_clock();
        let (events, _) = broadcast::channel(config.events_capacity);
        let metrics = Arc::new(Metrics::default());
        let scheduler = Arc::new(Scheduler::new(config.schedule_max, Arc::clone(&metrics)));
        let (durable, mut restored) = match spool_setup(&config, &seams, data_dir.as_deref())? {
            Some(mut setup) => {
                // The spool writer holds the lock from now on: it is the last to touch the data
                // directory, and stops (dropping both) at shutdown whoever holds a handle.
                setup.lock = lock.take();
                let (durable, restored) = Durable::start(
                    setup,
                    config.limits(),
                    config.peers_max,
                    epoch,
                    events.clone(),
                    Arc::clone(&metrics),
                    Arc::clone(&scheduler),
                )
                .map_err(StartError::Spool)?;
                (Some(durable), restored)
            }
            None => (None, Restored::default()),
        };
        let mut restored_peers: Vec<NodeId> =
            restored.outbound.keys().map(|(peer, _)| *peer).collect();
        restored_peers.sort_unstable();
        restored_peers.dedup();
        scheduler.restore(std::mem::take(&mut restored.scheduled));
        let keys = Arc::new(Keys::new(
            config.idempotency_keys_max,
            config.idempotency_window.as_millis() as u64,
            std::mem::take(&mut restored.keys),
            wall_clock(),
            durable.as_ref().map(|d| d.tx.clone()),
            Arc::clone(&metrics),
        ));
        let message_id = |peer: &NodeId, lane: Lane, (epoch, seq): (u64, u64)| MessageId {
            producer: id,
            stream: StreamId::lane(&id, peer, epoch, lane),
            seq,
        };
        let renumbered = restored
            .renumbered
            .iter()
            .map(|(peer, lane, old, new)| Renumbered {
                peer: *peer,
                old: message_id(peer, *lane, *old),
                new: message_id(peer, *lane, *new),
            })
            .collect();
        let (shutdown, _) = watch::channel(false);
        let channels = Arc::new(Channels::new(
            config.inbox_capacity,
            config.channels_max,
            config.unopened_channels_per_peer,
        ));
        let peers_at_start = config.peers.clone();
        let seeds_at_start = config.seeds.clone();
        let patterns = crate::patterns::Patterns::new(id, epoch, &config.patterns);
        #[allow(unused_mut)]
        let mut link = config.link.clone();
        #[cfg(feature = "fault-injection")]
        {
            link.fault = seams.fault;
        }
        let shared = Arc::new_cyclic(|node: &Weak<Shared>| Shared {
            peer_env: Arc::new(PeerEnv {
                id,
                epoch,
                config: config.clone(),
                link,
                durable: durable.as_ref().map(|d| d.tx.clone()),
                channels: Arc::clone(&channels),
                keys: Arc::clone(&keys),
                events: events.clone(),
                metrics: Arc::clone(&metrics),
                wall_clock: Arc::clone(&wall_clock),
                shutdown: shutdown.subscribe(),
                dial: dialer(Weak::clone(node)),
            }),
            id,
            identity,
            config,
            seams,
            endpoint: Mutex::new(Some(endpoint)),
            socket_closed,
            provider,
            transport,
            epoch,
            incarnation,
            durable,
            restored: Mutex::new(restored),
            renumbered,
            rng: Mutex::new(rng),
            wall_clock,
            peers: RwLock::new(BTreeMap::new()),
            channels,
            keys,
            events,
            shutdown,
            tasks: Mutex::new(Vec::new()),
            runtime: tokio::runtime::Handle::current(),
            metrics,
            scheduler,
            patterns,
        });
        let local_addr = shared.endpoint().ok().and_then(|e| e.local_addr().ok());
        info!(node = %id, addr = ?local_addr, mesh = %shared.config.mesh, "node started");
        let span = info_span!(parent: None, "node", node = %id.short());
        crate::patterns::start(&shared)
            .map_err(|e| StartError::Config(format!("pattern channels: {e}")))?;
        shared.spawn(accept_loop(Arc::clone(&shared)).instrument(span.clone()));
        if shared.scheduler.has_waiting() {
            shared.start_release_task();
        }
        let node = Node {
            inner: Arc::new(NodeInner {
                shared,
                discovery: Mutex::new(None),
                data_dir_lock: Mutex::new(lock),
            }),
        };
        for peer in restored_peers {
            // Their messages wait in their links for a connection (dialed if an address is
            // configured or discovered, or accepted when the peer dials us).
            if let Err(e) = node.shared().peer(peer) {
                warn!(peer = %peer.short(), error = %e, "cannot restore the stream to a peer");
            }
        }
        for peer in peers_at_start {
            if let Err(e) = node.add_peer(peer.clone()) {
                warn!(peer = %peer.id.short(), error = %e, "cannot add configured peer");
            }
        }
        for seed in seeds_at_start {
            node.add_seed(seed);
        }
        if let Some(mdns) = &node.config().mdns {
            let discovery = span.in_scope(|| start_discovery(&node, mdns))?;
            *node
                .inner
                .discovery
                .lock()
                .expect("discovery lock poisoned") = Some(discovery);
        }
        Ok(node)
    }
}

/// Announces `node` and connects to the nodes of its mesh that discovery finds.
fn start_discovery(node: &Node, config: &MdnsConfig) -> Result<Discovery, StartError> {
    let shared = node.shared();
    let local = Announcement {
        id: shared.id,
        mesh: shared.config.mesh.clone(),
        addr: node
            .local_addr()
            .map_err(|e| StartError::Config(format!("mDNS discovery: no local address: {e}")))?,
    };
    // Weak: discovery lives inside the node and must not keep it alive.
    let weak: Weak<NodeInner> = Arc::downgrade(&node.inner);
    let on_event: DiscoveryCallback = Arc::new(move |event| {
        let Some(inner) = weak.upgrade() else { return };
        let node = Node { inner };
        match event {
            DiscoveryEvent::Discovered(peer) => {
                let _ = node.shared().events.send(PeerEvent::Discovered {
                    peer: peer.id,
                    addrs: peer.addrs.clone(),
                });
                let id = peer.id;
                if let Err(e) = node.add_peer(peer) {
                    warn!(peer = %id.short(), error = %e, "cannot add discovered peer");
                }
            }
            DiscoveryEvent::Vanished(peer) => {
                let _ = node.shared().events.send(PeerEvent::Vanished { peer });
            }
        }
    });
    Discovery::start(config, local, on_event)
        .map_err(|e| StartError::Config(format!("mDNS discovery: {e}")))
}

/// Takes the data directory's lock: one node (or `weft spool` command) per directory.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let data_dir_error = |source| StartError::DataDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(data_dir_error)?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(data_dir_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::Locked(path)),
        Err(std::fs::TryLockError::Error(e)) => Err(data_dir_error(e)),
    }
}

/// Where the spool lives: the simulation's storage, else `<data_dir>/spool`; none without a
/// data directory (or with `config.spool` off).
fn spool_setup(
    config: &NodeConfig,
    seams: &Seams,
    data_dir: Option<&std::path::Path>,
) -> Result<Option<SpoolSetup>, StartError> {
    let Some(spool_config) = &config.spool else {
        return Ok(None);
    };
    #[cfg(feature = "fault-injection")]
    let ack_before_fsync = seams.fault == weft_proto::link::Fault::AckBeforeFsync;
    #[cfg(not(feature = "fault-injection"))]
    let ack_before_fsync = false;
    if let Some(storage) = &seams.spool_storage {
        return Ok(Some(SpoolSetup {
            storage: storage(),
            config: spool_config.clone(),
            inline: true,
            sync_latency: seams.spool_sync_latency,
            ack_before_fsync,
            lock: None,
            keys: key_bounds(config),
        }));
    }
    let Some(dir) = data_dir else { return Ok(None) };
    let dir = dir.join("spool");
    let storage = std::fs::create_dir_all(&dir)
        .and_then(|()| weft_spool::FsStorage::open(&dir))
        .map_err(|source| StartError::DataDir {
            path: dir.clone(),
            source,
        })?;
    Ok(Some(SpoolSetup {
        storage: Box::new(storage),
        config: spool_config.clone(),
        inline: false,
        sync_latency: None,
        ack_before_fsync,
        lock: None,
        keys: key_bounds(config),
    }))
}

/// The idempotency window the spool keeps (see `NodeConfig::idempotency_keys_max`).
fn key_bounds(config: &NodeConfig) -> crate::durable::KeyBounds {
    crate::durable::KeyBounds {
        entries_max: config.idempotency_keys_max,
        age_max_ms: config.idempotency_window.as_millis() as u64,
    }
}

fn transport_config(config: &NodeConfig) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(config.keep_alive));
    let idle =
        quinn::IdleTimeout::try_from(config.idle_timeout).unwrap_or(quinn::VarInt::MAX.into());
    transport.max_idle_timeout(Some(idle));
    // One bidirectional stream per lane (the first also carries the hello); more are refused.
    transport.max_concurrent_bidi_streams((Lane::ALL.len() as u8).into());
    transport.max_concurrent_uni_streams(0u8.into());
    // Windows large enough for the link's in-flight bytes on a fast path.
    let window = (config.link.window_bytes as u64).clamp(1 << 20, 64 << 20);
    transport.stream_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
    transport.receive_window(quinn::VarInt::from_u64(window * 2).unwrap_or(quinn::VarInt::MAX));
    transport.send_window(window * 2);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(config.max_udp_payload);
    transport.mtu_discovery_config(Some(mtu));
    transport
}

fn os_random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // The OS generator failing is not recoverable in any useful way; fall back to the clock.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(bytes)
}

/// Dials a seed address until some node answers, then hands the connection to that node's link
/// and gives the link the address, so the link redials it from then on.
async fn seed_task(shared: Arc<Shared>, addr: SocketAddr) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = weft_proto::backoff::Backoff::new(
        shared.config.reconnect_initial.as_millis() as u64,
        shared.config.reconnect_max.as_millis() as u64,
    );
    loop {
        let result = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return,
            result = connection::dial_to(Arc::clone(&shared), None, addr) => result,
        };
        match result {
            Ok((peer, _)) if peer == shared.id => {
                warn!("the seed is this node itself; ignoring it");
                return;
            }
            Ok((peer, established)) => {
                info!(peer = %peer.short(), "seed answered");
                match shared.attach(peer, established) {
                    Ok(()) => {
                        if let Ok(handle) = shared.peer(peer) {
                            let _ = handle.control.send(Control::Addresses(vec![addr]));
                        }
                    }
                    Err(_) => {
                        warn!(peer = %peer.short(), "seed answered but the node tracks its maximum of peers")
                    }
                }
                return;
            }
            Err(error) => {
                shared.metrics.dial_failure();
                let delay = backoff.next_delay_ms(shared.random());
                info!(%error, retry_in_ms = delay, "seed not reachable");
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|stop| *stop) => return,
                    () = tokio::time::sleep(Duration::from_millis(delay)) => {}
                }
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    // Held until the node stops (which ends this loop, before `shutdown` releases the endpoint).
    let Ok(endpoint) = shared.endpoint() else {
        return;
    };
    loop {
        let incoming = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        let span = info_span!("accept", %remote);
        let mut stop = shared.shutdown.subscribe();
        let handshake = connection::accept(Arc::clone(&shared), incoming);
        shared.spawn(
            async move {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|stop| *stop) => {}
                    () = handshake => {}
                }
            }
            .instrument(span),
        );
    }
}

/// The node's own UDP socket as quinn gets it: the runtime's socket, and a signal that it is
/// closed (see [`Shared::release_endpoint`]). quinn keeps the socket (this wrapper) in its
/// endpoint and in every connection, and each I/O poller it makes holds it too, so the socket
/// is closed exactly when this is dropped.
#[derive(Debug)]
struct SocketRelease {
    /// Declared first: dropped (the file descriptor closed) before `closed` signals.
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    /// Its receivers see the channel close when this is dropped.
    _closed: watch::Sender<()>,
}

impl SocketRelease {
    /// Wraps `socket` for `runtime`; the receiver ends once the socket is closed.
    fn wrap(
        runtime: &dyn quinn::Runtime,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<(Arc<dyn quinn::AsyncUdpSocket>, watch::Receiver<()>)> {
        let (closed, receiver) = watch::channel(());
        let wrapped: Arc<dyn quinn::AsyncUdpSocket> = Arc::new(SocketRelease {
            inner: runtime.wrap_udp_socket(socket)?,
            _closed: closed,
        });
        Ok((wrapped, receiver))
    }
}

impl quinn::AsyncUdpSocket for SocketRelease {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(ReleasePoller {
            inner: Arc::clone(&self.inner).create_io_poller(),
            _socket: self,
        })
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The runtime socket's poller, holding the [`SocketRelease`] it was made for (the inner
/// poller holds the inner socket: without this, the socket could outlive the signal).
#[derive(Debug)]
struct ReleasePoller {
    /// Declared first: dropped before the wrapper it keeps alive.
    inner: std::pin::Pin<Box<dyn quinn::UdpPoller>>,
    _socket: Arc<SocketRelease>,
}

impl quinn::UdpPoller for ReleasePoller {
    fn poll_writable(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.get_mut().inner.as_mut().poll_writable(cx)
    }
}

struct NodeInner {
    shared: Arc<Shared>,
    /// mDNS discovery, if configured; taken (and stopped) by `shutdown` or drop.
    discovery: Mutex<Option<Discovery>>,
    /// The data directory's lock when the node has no spool (with a spool, its writer holds
    /// it; see [`SpoolSetup::lock`]); taken (and released) by `shutdown` or drop. Never in
    /// [`Shared`]: handles that outlive the node (a [`PeerSender`], a subscription, a puller)
    /// hold that, and must not keep the directory locked after `shutdown`.
    data_dir_lock: Mutex<Option<std::fs::File>>,
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        // Dropping discovery sends the goodbye and stops its daemon.
        drop(self.discovery.lock().map(|mut d| d.take()));
        // The last handle is gone: stop every task. `shutdown()` does this and waits for it.
        self.shared.shutdown.send_replace(true);
        // Closed and out of `Shared`, which handles outliving the node keep: the socket goes
        // once the tasks and connections let go of it.
        drop(self.shared.take_endpoint(b"node dropped"));
        // The application's consuming handles end, as after `shutdown()`: once their queues
        // are empty and the stopping tasks dropped the senders they hold.
        self.shared.channels.close();
        self.shared.patterns.close();
    }
}

/// A Weft node. Cheap to clone; the node stops when the last clone is dropped or
/// [`Node::shutdown`] is called.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id()).finish()
    }
}

impl Node {
    /// Starts building a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared().id
    }

    /// The address the node's socket is bound to; an error once the node shut down (the
    /// socket is closed).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared().endpoint()?.local_addr()
    }

    /// This node's id and address, as another node would dial it.
    pub fn addr(&self) -> std::io::Result<NodeAddr> {
        Ok(NodeAddr::new(self.id(), self.local_addr()?))
    }

    /// The configuration in force.
    pub fn config(&self) -> &NodeConfig {
        &self.shared().config
    }

    /// Starts connecting to a peer (and keeps reconnecting, with backoff, while it is down).
    pub fn add_peer(&self, peer: NodeAddr) -> Result<(), SendError> {
        let handle = self.shared().peer(peer.id)?;
        let _ = handle.control.send(Control::Addresses(peer.addrs));
        Ok(())
    }

    /// Dials `addr` (a node whose id is not known), with backoff, until a node of the mesh answers;
    /// that node then becomes a peer with this address. Stops when the node shuts down.
    pub fn add_seed(&self, addr: SocketAddr) {
        let shared = Arc::clone(self.shared());
        let span = info_span!(parent: None, "seed", node = %shared.id.short(), %addr);
        shared.spawn(seed_task(Arc::clone(&shared), addr).instrument(span));
    }

    /// Waits until connections to at least `count` peers are up. Wrap it in a timeout.
    pub async fn wait_for_peers(&self, count: usize) -> Result<(), crate::error::ReadyError> {
        let mut events = self.events();
        let mut shutdown = self.shared().shutdown.subscribe();
        loop {
            if self.connected_peers().len() >= count {
                return Ok(());
            }
            let event = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => Err(broadcast::error::RecvError::Closed),
                event = events.recv() => event,
            };
            match event {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(crate::error::ReadyError::NodeClosed)
                }
            }
        }
    }

    /// Waits until a connection to `peer` is up, with the streams of all its lanes (starting to
    /// track the peer if needed).
    ///
    /// This is this node's view: the peer may install the connection a moment later. What the
    /// peer announces (its subscriptions, services, workers) reaches this node once the peer
    /// sees it; to wait for that, use `wait_for_subscribers` / `wait_for_workers`, or
    /// `connected` on both nodes.
    pub async fn connected(&self, peer: NodeId) -> Result<(), crate::error::ReadyError> {
        let handle = self.shared().peer(peer)?;
        let mut shutdown = self.shared().shutdown.subscribe();
        for lane in handle.lanes() {
            let mut connected = lane.connected.clone();
            let up = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => false,
                result = connected.wait_for(|up| *up) => result.is_ok(),
            };
            if !up {
                return Err(crate::error::ReadyError::NodeClosed);
            }
        }
        Ok(())
    }

    /// Peers with a connection up now, carrying every lane.
    pub fn connected_peers(&self) -> Vec<NodeId> {
        let peers = self.shared().peers.read().expect("peers lock poisoned");
        peers
            .values()
            .filter(|h| h.lanes().all(|lane| *lane.connected.borrow()))
            .map(|h| h.id)
            .collect()
    }

    /// Peer up/down events from now on.
    pub fn events(&self) -> broadcast::Receiver<PeerEvent> {
        self.shared().events.subscribe()
    }

    /// A message for `channel` with this node's clock and default header fields; adjust the public
    /// fields (kind, priority, headers, expiry, ...) and pass it to [`Node::send_message`].
    pub fn new_message(
        &self,
        channel: impl Into<Channel>,
        body: impl Into<Bytes>,
    ) -> OutgoingMessage {
        OutgoingMessage::command(channel, body.into(), self.shared().now_unix_ms())
    }

    /// Sends `body` to `peer` on `channel`. Waits while the peer's queue is full (backpressure),
    /// then returns a receipt that resolves when the peer acknowledged the message.
    pub async fn send(
        &self,
        peer: NodeId,
        channel: impl Into<Channel>,
        body: impl Into<Bytes>,
    ) -> Result<Receipt, SendError> {
        // Stamped when the node takes it (see `PeerSender::send`).
        let message = OutgoingMessage::command(channel, body.into(), 0);
        self.send_message(peer, message).await
    }

    /// [`Node::send`] with options: headers, priority, expiry, a due time, an idempotency key
    /// (see [`MessageOptions`](crate::MessageOptions)).
    pub async fn send_with(
        &self,
        peer: NodeId,
        channel: impl Into<Channel>,
        body: impl Into<Bytes>,
        options: &crate::MessageOptions,
    ) -> Result<Receipt, SendError> {
        options.check()?;
        let now = self.shared().now_unix_ms();
        let message = options.apply(OutgoingMessage::command(channel, body.into(), now), now);
        self.send_message(peer, message).await
    }

    /// Sends a serde value, encoded with postcard.
    pub async fn send_typed<T: Serialize + ?Sized>(
        &self,
        peer: NodeId,
        channel: impl Into<Channel>,
        value: &T,
    ) -> Result<Receipt, crate::error::SendTypedError> {
        let body = crate::body::encode(value)?;
        Ok(self.send(peer, channel, body).await?)
    }

    /// Sends a fully specified message (see [`Node::new_message`]).
    pub async fn send_message(
        &self,
        peer: NodeId,
        message: OutgoingMessage,
    ) -> Result<Receipt, SendError> {
        self.sender(peer)?.send_message(message).await
    }

    /// Like [`Node::send`], but returns [`TrySendError::WouldBlock`] instead of waiting.
    pub fn try_send(
        &self,
        peer: NodeId,
        channel: impl Into<Channel>,
        body: impl Into<Bytes>,
    ) -> Result<Receipt, TrySendError> {
        let message = self.new_message(channel, body);
        self.sender(peer)?.try_send_message(message)
    }

    /// A handle for sending to one peer without looking it up per message.
    pub fn sender(&self, peer: NodeId) -> Result<PeerSender, SendError> {
        Ok(PeerSender {
            handle: self.shared().peer(peer)?,
            shared: Arc::clone(self.shared()),
        })
    }

    /// The application's end of `channel`. Messages that arrived before are waiting in it.
    pub fn receive(&self, channel: &str) -> Result<Inbox, ReceiveError> {
        self.shared().channels.take_receiver(channel)
    }

    /// Receives every message for a channel that has no queue of its own (no `receive` on it and
    /// nothing buffered for it), e.g. to print all traffic. Channels opened with
    /// [`Node::receive`] still get their own messages.
    pub fn receive_all(&self) -> Result<Inbox, ReceiveError> {
        self.shared().channels.take_catch_all()
    }

    /// The messages this start gave new ids because its spool was damaged (empty unless a
    /// segment was quarantined): each is sent again under its new id, and its old receipt is
    /// gone with the old process. An application that tracks ids follows them here.
    pub fn renumbered(&self) -> &[Renumbered] {
        &self.shared().renumbered
    }

    /// Counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared().metrics.snapshot()
    }

    /// Stops the node: closes every connection, fails outstanding receipts and requests, and
    /// waits for all of its tasks (bounded by a few seconds for the endpoint to drain). Once it
    /// returns, the spool is synced and closed, the data directory is unlocked and the UDP
    /// socket is closed, even if clones of this node, subscriptions, services, pullers, inboxes
    /// or senders are still alive: a new node can start on the directory and the address. The
    /// consuming handles end (`recv` returns `None` once their queues are empty), the others
    /// answer "node closed".
    pub async fn shutdown(&self) {
        let shared = self.shared();
        let discovery = self
            .inner
            .discovery
            .lock()
            .expect("discovery lock poisoned")
            .take();
        if let Some(discovery) = discovery {
            // Goodbye first, so peers stop dialing a node that is leaving.
            discovery.shutdown().await;
        }
        shared.patterns.stop().await;
        shared.shutdown.send_replace(true);
        // Tasks may start others while they stop (an accepted connection's handshake): wait
        // until none is left, so nothing writes to the spool once it is closed.
        loop {
            let tasks: Vec<_> =
                std::mem::take(&mut *shared.tasks.lock().expect("tasks lock poisoned"));
            if tasks.is_empty() {
                break;
            }
            for task in tasks {
                let _ = task.await;
            }
        }
        if let Some(durable) = &shared.durable {
            // Stops the writer, which releases the spool and (holding it) the directory's lock.
            durable.close().await;
        }
        let data_dir_lock = self
            .inner
            .data_dir_lock
            .lock()
            .expect("lock poisoned")
            .take();
        drop(data_dir_lock);
        // The application's consuming handles (inboxes, pullers, subscriptions, services) end
        // once their queues are empty: the tasks that fed them are gone, and so are the senders.
        shared.channels.close();
        shared.patterns.close();
        let deadline = tokio::time::Instant::now() + ENDPOINT_RELEASE_MAX;
        shared.release_endpoint(deadline).await;
        info!(node = %shared.id.short(), "node stopped");
    }
}

/// Sends to one peer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PeerSender {
    handle: Arc<PeerHandle>,
    shared: Arc<Shared>,
}

impl PeerSender {
    /// The peer.
    pub fn peer(&self) -> NodeId {
        self.handle.id
    }

    /// Sends `body` on `channel`; see [`Node::send`].
    pub async fn send(
        &self,
        channel: impl Into<Channel>,
        body: impl Into<Bytes>,
    ) -> Result<Receipt, SendError> {
        // Stamped when the peer task (or, with a spool, `send_message`) takes it: one clock
        // reading per batch instead of one per message.
        let message = OutgoingMessage::command(channel, body.into(), 0);
        self.send_message(message).await
    }

    /// A message with default options, stamped with the node's clock; see [`Node::new_message`].
    pub fn new_message(
        &self,
        channel: impl Into<Channel>,
        body: impl Into<Bytes>,
    ) -> OutgoingMessage {
        OutgoingMessage::command(channel, body.into(), self.shared.now_unix_ms())
    }

    /// Sends a fully specified message. Waits while the peer's queue (or the spool) is full;
    /// with a spool, returns once the message is durable ("accepted"): after a crash of this
    /// node it is sent again, and it is delivered or dead-lettered, never lost.
    ///
    /// A delayed message ([`OutgoingMessage::with_delay`], [`OutgoingMessage::with_deliver_after`])
    /// is accepted now (with a spool: durable now, unnumbered) and numbered into the peer's
    /// stream only at its due time; see [`Receipt`] for its id and [`weft_proto::schedule`] for the
    /// guarantees. Refused with [`SendError::Delay`] (too far ahead, or expiring first) or
    /// [`SendError::ScheduleFull`].
    pub async fn send_message(&self, mut message: OutgoingMessage) -> Result<Receipt, SendError> {
        message.check(&self.shared.config.limits())?;
        if message.deliver_after.is_some() {
            return self.schedule(message).await;
        }
        let handle = self.lane(&message);
        let Some(durable) = &self.shared.durable else {
            // One hold of the queue's lock: room, number and place.
            let seq = handle
                .commands
                .send_numbered(|seq| Outgoing {
                    seq,
                    tag: 0,
                    message,
                    run: None,
                })
                .await
                .map_err(|_| SendError::NodeClosed)?;
            return Ok(self.receipt(handle, seq));
        };
        if message.created_unix_ms == 0 {
            // The spool keeps it as it is: its age must count from now.
            message.created_unix_ms = self.shared.now_unix_ms();
        }
        let permit = handle
            .commands
            .reserve()
            .await
            .map_err(|_| SendError::NodeClosed)?;
        durable
            .room
            .acquire()
            .await
            .map_err(|_| SendError::NodeClosed)?
            .forget();
        let (done, accepted) = tokio::sync::oneshot::channel();
        let receipt = self.spool(handle, durable, permit, message, Some(done))?;
        match accepted.await {
            Ok(Ok(())) => Ok(receipt),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(SendError::NodeClosed),
        }
    }

    /// Queues an encoded event (see `weft_proto::gossip`) for the peer, in the lane of
    /// `priority`. Without a spool it joins the run of events last queued in that lane while
    /// the run still waits there: many events, one link message (one frame, one number, one
    /// acknowledgement, one hand-off at the peer); the receipt is the run's, and FIFO holds
    /// (only the last queued message is ever joined). With a spool, and for an event too large
    /// for a run, the event is a message of its own ([`PeerSender::send_message`]: durable
    /// when this returns).
    pub(crate) async fn send_event(
        &self,
        event: &[u8],
        priority: Priority,
    ) -> Result<Receipt, SendError> {
        if !self.joins_runs(event) {
            let message = self.event_message(Bytes::copy_from_slice(event), priority);
            return self.send_message(message).await;
        }
        let handle = self.handle.lane(priority.lane());
        let seq = handle
            .commands
            .send_joined(
                |last| join_run(last, event, priority),
                |seq| new_run(seq, event, priority),
            )
            .await
            .map_err(|_| SendError::NodeClosed)?;
        Ok(self.receipt(handle, seq))
    }

    /// [`PeerSender::send_event`] without waiting for room ([`TrySendError::WouldBlock`]).
    pub(crate) fn try_send_event(
        &self,
        event: &[u8],
        priority: Priority,
    ) -> Result<Receipt, TrySendError> {
        if !self.joins_runs(event) {
            let message = self.event_message(Bytes::copy_from_slice(event), priority);
            return self.try_send_message(message);
        }
        let handle = self.handle.lane(priority.lane());
        let seq = handle
            .commands
            .try_send_joined(
                |last| join_run(last, event, priority),
                |seq| new_run(seq, event, priority),
            )
            .map_err(would_block)?;
        Ok(self.receipt(handle, seq))
    }

    /// Whether `event` goes into a run: not with a spool (each event is durable on its own
    /// before the send returns), nor an event too large for one (sent alone, not copied), nor
    /// under a body limit smaller than a run.
    fn joins_runs(&self, event: &[u8]) -> bool {
        self.shared.durable.is_none()
            && event.len() + 16 <= gossip::RUN_BYTES_MAX
            && self.shared.config.limits().max_body_bytes >= gossip::RUN_BYTES_MAX
    }

    /// The link message of one encoded event, created now.
    fn event_message(&self, event: Bytes, priority: Priority) -> OutgoingMessage {
        event_message(event, priority, self.shared.now_unix_ms())
    }

    /// Sends without waiting: [`TrySendError::WouldBlock`] when the peer's queue is full,
    /// [`TrySendError::SpoolFull`] when the spool is. With a spool, the message is not durable
    /// yet when this returns: [`Receipt::accepted`] tells when it is (or that it was refused).
    pub fn try_send_message(&self, mut message: OutgoingMessage) -> Result<Receipt, TrySendError> {
        message
            .check(&self.shared.config.limits())
            .map_err(SendError::from)?;
        if message.deliver_after.is_some() {
            return self.try_schedule(message);
        }
        let handle = self.lane(&message);
        let Some(durable) = &self.shared.durable else {
            let seq = handle
                .commands
                .try_send_numbered(|seq| Outgoing {
                    seq,
                    tag: 0,
                    message,
                    run: None,
                })
                .map_err(would_block)?;
            return Ok(self.receipt(handle, seq));
        };
        let permit = handle.commands.try_reserve().map_err(would_block)?;
        match durable.room.try_acquire() {
            Ok(room) => room.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(TrySendError::SpoolFull),
            Err(tokio::sync::TryAcquireError::Closed) => {
                return Err(TrySendError::Send(SendError::NodeClosed))
            }
        }
        if message.created_unix_ms == 0 {
            message.created_unix_ms = self.shared.now_unix_ms();
        }
        Ok(self.spool(handle, durable, permit, message, None)?)
    }

    /// Sends many messages to the peer, in order, and returns once all are accepted (with a
    /// spool: durable). The same guarantees as [`PeerSender::send_message`] per message, at a
    /// fraction of the cost: queue room, spool room and sequence numbers are taken for runs of
    /// messages at once, and each run is one command to the spool writer, so a large batch
    /// fills a group commit by itself. A run is as long as the peer's queue has room; when it
    /// is full, what was gathered goes ahead and the rest waits (backpressure, as for `send`).
    ///
    /// Delayed messages of the batch are scheduled one by one after the others are sent (each
    /// is numbered only when due; their receipts are [`Receipts::scheduled`]).
    ///
    /// Fails before anything is sent if a message is invalid ([`SendBatchError::Invalid`]; a
    /// delayed message's due time is checked too).
    /// If the spool refuses messages (full, failing) or the node shuts down half-way,
    /// [`SendBatchError::Partial`] carries the receipts of what was sent (each refused one
    /// fails its receipt) and how many were not accepted.
    pub async fn send_batch(
        &self,
        messages: impl IntoIterator<Item = OutgoingMessage>,
    ) -> Result<Receipts, SendBatchError> {
        let mut messages: Vec<OutgoingMessage> = messages.into_iter().collect();
        let limits = self.shared.config.limits();
        let delay_max_ms =
            u64::try_from(self.shared.config.delay_max.as_millis()).unwrap_or(u64::MAX);
        let now = self.shared.now_unix_ms();
        for message in messages.iter_mut().filter(|m| m.created_unix_ms == 0) {
            message.created_unix_ms = now;
        }
        for (index, message) in messages.iter().enumerate() {
            if let Err(error) = message.check(&limits) {
                return Err(SendBatchError::Invalid {
                    index,
                    error: error.into(),
                });
            }
            if let Some(due) = message.deliver_after_unix_ms() {
                let expires = message.options.as_ref().and_then(|o| o.expires_unix_ms);
                if let Err(error) = weft_proto::schedule::check_due(due, now, delay_max_ms, expires)
                {
                    return Err(SendBatchError::Invalid {
                        index,
                        error: error.into(),
                    });
                }
            }
        }
        let total = messages.len();
        let (delayed, messages): (Vec<_>, Vec<_>) = messages
            .into_iter()
            .partition(|m| m.deliver_after.is_some());
        // One batch, one lane: its receipts follow one stream.
        let lane = messages.first().map_or(Lane::Normal, |m| m.priority.lane());
        if let Some(index) = messages.iter().position(|m| m.priority.lane() != lane) {
            let other = messages[index].priority.lane();
            return Err(SendBatchError::Invalid {
                index,
                error: SendError::MixedLanes { lane, other },
            });
        }
        let handle = self.handle.lane(lane);
        let mut receipts = self.receipts(handle);
        let mut outcomes = Vec::new();
        let mut messages = messages.into_iter().peekable();
        let unsent = |receipts: Receipts, error: SendError| SendBatchError::Partial {
            refused: total - receipts.len(),
            receipts,
            error,
        };
        while messages.peek().is_some() {
            let Some(durable) = &self.shared.durable else {
                // Without a spool: the free places (at least one, waiting for it), then one
                // hold of the queue's lock to number and queue the run.
                // When the queue is full, wait for a quarter of it rather than for one slot:
                // runs of one would cost more than single sends.
                let commands = &handle.commands;
                let want = commands
                    .capacity()
                    .max(commands.max_capacity() / 4)
                    .clamp(1, BATCH_RUN_MAX);
                let run: Vec<OutgoingMessage> = messages.by_ref().take(want).collect();
                let Ok(places) = handle.commands.reserve_many(run.len()).await else {
                    return Err(unsent(receipts, SendError::NodeClosed));
                };
                let count = run.len();
                let first = places
                    .send_numbered(count, |first| {
                        Some((first..).zip(run).map(|(seq, message)| Outgoing {
                            seq,
                            tag: 0,
                            message,
                            run: None,
                        }))
                    })
                    .expect("sends whenever asked to");
                receipts.push_run(first..=first + count as u64 - 1);
                continue;
            };
            // The first message of a run waits for queue and spool room; the others take what
            // is free now.
            let mut run = Vec::new();
            let Ok(mut places) = handle.commands.reserve().await else {
                return Err(unsent(receipts, SendError::NodeClosed));
            };
            // Spool room stays held (not forgotten) until the run is handed over, so a batch
            // dropped half-way gives it back.
            let Ok(mut room) = durable.room.acquire().await else {
                return Err(unsent(receipts, SendError::NodeClosed));
            };
            run.push(messages.next().expect("peeked"));
            // A run takes at least a quarter of the queue when that much is left (waiting for
            // its places: runs of one would cost more than single sends), then what is free.
            let min_run = handle.commands.max_capacity() / 4;
            while run.len() < BATCH_RUN_MAX && messages.peek().is_some() {
                let more = if run.len() < min_run {
                    handle.commands.reserve().await.ok()
                } else {
                    handle.commands.try_reserve().ok()
                };
                let Some(more) = more else {
                    break;
                };
                // Spool room is never waited for past the first: a spool short of room
                // (its peer away) still takes what fits now.
                match durable.room.try_acquire() {
                    Ok(room_more) => room.merge(room_more),
                    Err(_) => break, // `more` goes back with its drop
                }
                places.merge(more);
                run.push(messages.next().expect("peeked"));
            }
            room.forget();
            let (done, outcome) = tokio::sync::oneshot::channel();
            let count = run.len();
            // Under the queue's lock, so that the writer and the peer task see the lane's
            // numbers in the same order: the peer task holds the run until the writer answers
            // (only durable messages reach the link).
            let first = places.send_numbered(count, |first| {
                durable
                    .tx
                    .send(crate::durable::Command::AppendRun {
                        to: Arc::clone(&handle.spool_reply),
                        first,
                        messages: run.clone(),
                        done,
                    })
                    .ok()?;
                Some((first..).zip(run).map(|(seq, message)| Outgoing {
                    seq,
                    tag: 0,
                    message,
                    run: None,
                }))
            });
            let Some(first) = first else {
                durable.room.add_permits(count);
                return Err(unsent(receipts, SendError::NodeClosed));
            };
            let count = count as u64;
            receipts.push_run(first..=first + count - 1);
            outcomes.push(outcome);
        }
        let mut refused = Vec::new();
        for outcome in outcomes {
            match outcome.await {
                Ok(failures) => refused.extend(failures),
                Err(_) => return Err(unsent(receipts, SendError::NodeClosed)),
            }
        }
        for message in delayed {
            match self.schedule(message).await {
                Ok(receipt) => receipts.scheduled.push(receipt),
                Err(error) => return Err(unsent(receipts, error)),
            }
        }
        match refused.first() {
            None => Ok(receipts),
            Some(error) => Err(SendBatchError::Partial {
                error: error.clone().into(),
                refused: refused.len(),
                receipts,
            }),
        }
    }

    /// Sends a volatile message: on the current connection, ahead of the queued sequenced
    /// messages, without acknowledgement, spool or retransmission; if the connection goes away
    /// before it is written it is dropped (and counted). For requests, replies and telemetry
    /// whose loss the caller handles (a timeout, a newer value). Waits while the peer's queue is
    /// full; [`SendError::NotConnected`] when no connection is up.
    pub async fn send_volatile(&self, message: OutgoingMessage) -> Result<(), SendError> {
        message.check(&self.shared.config.limits())?;
        if message.deliver_after.is_some() {
            return Err(SendError::VolatileDelayed);
        }
        let handle = self.lane(&message);
        if !*handle.connected.borrow() {
            return Err(SendError::NotConnected(handle.id));
        }
        let permit = handle
            .commands
            .reserve()
            .await
            .map_err(|_| SendError::NodeClosed)?;
        permit.send_all([volatile(message)]);
        Ok(())
    }

    /// Like [`PeerSender::send_volatile`], but [`TrySendError::WouldBlock`] instead of waiting.
    pub fn try_send_volatile(&self, message: OutgoingMessage) -> Result<(), TrySendError> {
        message
            .check(&self.shared.config.limits())
            .map_err(SendError::from)?;
        if message.deliver_after.is_some() {
            return Err(SendError::VolatileDelayed.into());
        }
        let handle = self.lane(&message);
        if !*handle.connected.borrow() {
            return Err(SendError::NotConnected(handle.id).into());
        }
        handle
            .commands
            .try_send_with(|| volatile(message))
            .map_err(would_block)?;
        Ok(())
    }

    /// The due time of a delayed message, checked (see [`weft_proto::schedule::check_due`]),
    /// with a place in the schedule taken for it.
    fn take_place(&self, message: &OutgoingMessage) -> Result<u64, SendError> {
        let due = message
            .deliver_after_unix_ms()
            .expect("called for delayed messages");
        let config = &self.shared.config;
        let expires = message.options.as_ref().and_then(|o| o.expires_unix_ms);
        let delay_max_ms = u64::try_from(config.delay_max.as_millis()).unwrap_or(u64::MAX);
        weft_proto::schedule::check_due(due, self.shared.now_unix_ms(), delay_max_ms, expires)?;
        if self.shared.is_shutting_down() {
            return Err(SendError::NodeClosed);
        }
        self.shared
            .scheduler
            .take_place()
            .map_err(SendError::ScheduleFull)?;
        Ok(due)
    }

    /// `send_message` of a delayed message: waits for spool room, returns once durable.
    async fn schedule(&self, message: OutgoingMessage) -> Result<Receipt, SendError> {
        let due = self.take_place(&message)?;
        let Some(durable) = &self.shared.durable else {
            return self.schedule_now(message, due, None);
        };
        match durable.room.acquire().await {
            Ok(room) => room.forget(),
            Err(_) => {
                self.shared.scheduler.free_place(true);
                return Err(SendError::NodeClosed);
            }
        }
        let (done, accepted) = tokio::sync::oneshot::channel();
        let receipt = self.schedule_now(message, due, Some(done))?;
        match accepted.await {
            Ok(Ok(())) => Ok(receipt),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(SendError::NodeClosed),
        }
    }

    /// `try_send_message` of a delayed message: never waits.
    fn try_schedule(&self, message: OutgoingMessage) -> Result<Receipt, TrySendError> {
        let due = self.take_place(&message)?;
        if let Some(durable) = &self.shared.durable {
            match durable.room.try_acquire() {
                Ok(room) => room.forget(),
                Err(error) => {
                    self.shared.scheduler.free_place(true);
                    return Err(match error {
                        tokio::sync::TryAcquireError::NoPermits => TrySendError::SpoolFull,
                        tokio::sync::TryAcquireError::Closed => SendError::NodeClosed.into(),
                    });
                }
            }
        }
        Ok(self.schedule_now(message, due, None)?)
    }

    /// Into the schedule (no spool), or to the spool writer, which writes it unnumbered and
    /// then schedules it. A place (and spool room) is taken.
    fn schedule_now(
        &self,
        message: OutgoingMessage,
        due: u64,
        done: Option<tokio::sync::oneshot::Sender<Result<(), crate::error::DeliveryError>>>,
    ) -> Result<Receipt, SendError> {
        let (slot, watch) = crate::receipt::slot(self.shared.durable.is_none());
        let dest = self.handle.id;
        let lane = message.priority.lane();
        self.shared.start_release_task();
        match &self.shared.durable {
            None => self.shared.scheduler.insert(Waiting {
                dest,
                message,
                ticket: crate::scheduler::Ticket {
                    tag: 0,
                    slot,
                    holds_place: true,
                },
            }),
            Some(durable) => {
                let command = crate::durable::Command::Schedule {
                    dest,
                    message,
                    slot,
                    done,
                };
                if durable.tx.send(command).is_err() {
                    durable.room.add_permits(1);
                    self.shared.scheduler.free_place(true);
                    return Err(SendError::NodeClosed);
                }
            }
        }
        let mut receipt = self.receipt(self.handle.lane(lane), 0);
        receipt.scheduled = Some((due, watch));
        Ok(receipt)
    }

    /// Numbers a delayed message that became due and enqueues it like a fresh send (called by
    /// the release task, in due order). Waits for room in the peer's queue. With a spool the
    /// writer appends the numbered copy, retires the unnumbered record and only then tells
    /// the receipt its number; it already holds its spool room.
    pub(crate) async fn release(&self, waiting: Waiting) {
        let Waiting {
            dest: _,
            message,
            ticket,
        } = waiting;
        let handle = self.lane(&message);
        let Ok(permit) = handle.commands.reserve().await else {
            // Shutting down: the receipt reports `NodeClosed`; with a spool the unnumbered
            // record stays and the next start schedules it again.
            return;
        };
        match &self.shared.durable {
            None => {
                let seq = permit
                    .send_numbered(1, |seq| {
                        Some([Outgoing {
                            seq,
                            tag: 0,
                            message,
                            run: None,
                        }])
                    })
                    .expect("sends whenever asked to");
                self.shared.metrics.released();
                self.shared.scheduler.free_place(ticket.holds_place);
                let _ = ticket.slot.send(SlotState::Numbered(seq));
            }
            Some(durable) => {
                // The writer numbers the receipt's slot once the copy is durable.
                let _ = number_and_spool(handle, durable, permit, message, None, Some(ticket));
            }
        }
    }

    /// The handle of the lane `message` travels in (see [`Lane`]).
    fn lane(&self, message: &OutgoingMessage) -> &Arc<PeerHandle> {
        self.handle.lane(message.priority.lane())
    }
    /// With a spool: numbers the message and sends it to the writer and, held there until the
    /// writer answers that it is durable, to the peer task's queue.
    fn spool(
        &self,
        handle: &Arc<PeerHandle>,
        durable: &Durable,
        permit: queue::Permit<Outgoing>,
        message: OutgoingMessage,
        done: Option<tokio::sync::oneshot::Sender<Result<(), crate::error::DeliveryError>>>,
    ) -> Result<Receipt, SendError> {
        match number_and_spool(handle, durable, permit, message, done, None) {
            Some(seq) => Ok(self.receipt(handle, seq)),
            None => {
                durable.room.add_permits(1);
                Err(SendError::NodeClosed)
            }
        }
    }

    /// Empty receipts for a batch to this peer's lane.
    fn receipts(&self, handle: &Arc<PeerHandle>) -> Receipts {
        let Receipt {
            id, peer, progress, ..
        } = self.receipt(handle, 0);
        Receipts {
            peer,
            base: id,
            runs: Vec::new(),
            progress,
            scheduled: Vec::new(),
        }
    }

    fn receipt(&self, handle: &Arc<PeerHandle>, seq: u64) -> Receipt {
        Receipt {
            id: MessageId {
                producer: self.shared.id,
                stream: handle.stream,
                seq,
            },
            peer: handle.id,
            progress: Arc::clone(&handle.progress),
            scheduled: None,
        }
    }
}

/// Under the lane queue's lock (so the writer and the peer task both see the lane's numbers
/// in order): numbers `message`, asks the writer to make it durable, and puts it in the peer
/// task's queue, where it waits for the writer's answer (only a durable message reaches the
/// link). `None` (nothing numbered or queued) if the writer is gone.
fn number_and_spool(
    handle: &PeerHandle,
    durable: &Durable,
    permit: queue::Permit<Outgoing>,
    message: OutgoingMessage,
    done: Option<tokio::sync::oneshot::Sender<Result<(), crate::error::DeliveryError>>>,
    release: Option<crate::scheduler::Ticket>,
) -> Option<u64> {
    permit.send_numbered(1, |seq| {
        let command = crate::durable::Command::Append {
            to: Arc::clone(&handle.spool_reply),
            seq,
            message: message.clone(),
            done,
            release,
        };
        durable.tx.send(command).ok()?;
        Some([Outgoing {
            seq,
            tag: 0,
            message,
            run: None,
        }])
    })
}

/// Most messages taken into one run of a batch (one command to the spool writer).
const BATCH_RUN_MAX: usize = 8_192;

/// A volatile message for the peer's queue: sequence number 0 is outside every stream.
fn volatile(message: OutgoingMessage) -> Outgoing {
    Outgoing {
        seq: 0,
        tag: 0,
        message,
        run: None,
    }
}

/// The link message carrying `body` (one encoded event, or a run of them) in the lane of
/// `priority`, created at `created_unix_ms` (0: stamped when its peer task takes it).
pub(crate) fn event_message(
    body: Bytes,
    priority: Priority,
    created_unix_ms: u64,
) -> OutgoingMessage {
    OutgoingMessage::command(
        Channel::from_static(weft_proto::channel::mesh::EVENT),
        body,
        created_unix_ms,
    )
    .with_kind(Kind::Event)
    .with_priority(priority)
}

/// Adds `event` to the lane's last queued message if that is a run of events of `priority`
/// with room: the run's number.
fn join_run(last: &mut Outgoing, event: &[u8], priority: Priority) -> Option<u64> {
    let run = last.run.as_mut()?;
    (last.message.priority == priority && run.push(event)).then_some(last.seq)
}

/// A new run of events, holding `event`, as message `seq`.
fn new_run(seq: u64, event: &[u8], priority: Priority) -> Outgoing {
    Outgoing {
        seq,
        tag: 0,
        // Stamped when the peer task takes it, like `PeerSender::send`'s messages.
        message: event_message(Bytes::new(), priority, 0),
        run: Some(Box::new(gossip::Run::new(event))),
    }
}

fn would_block(error: queue::TrySendError) -> TrySendError {
    match error {
        queue::TrySendError::Full => TrySendError::WouldBlock,
        queue::TrySendError::Closed => TrySendError::Send(SendError::NodeClosed),
    }
}
