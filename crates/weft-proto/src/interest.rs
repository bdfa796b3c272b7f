//! Who listens to what: the interest table behind pub/sub and request routing.
//!
//! Every node announces its *interest* — the topic patterns it subscribes to and the service
//! names it answers — to each peer it is connected to, and keeps the latest announcement of each
//! peer. A publisher sends an event only to peers whose patterns match its topic; a requester
//! picks among the connected peers that serve the service.
//!
//! Announcements carry the whole interest (bounded by [`PATTERNS_MAX`] and [`SERVICES_MAX`]) with
//! a version that grows with every local change, and the announcing node's *incarnation* (a
//! number new at every start), so a restarted node's first announcement replaces what its earlier
//! incarnation said even though its version starts again at 1. They travel as volatile messages:
//! a node announces again on every new connection, so an announcement lost with a connection is
//! replaced by the next one. A peer answers each announcement with an [`InterestMessage::Ack`];
//! a subscription is *in effect* once every connected peer acknowledged a version that has it
//! ([`InterestTable::acknowledged_by_all`]): from then on every publisher connected at that time
//! sends matching events.
//!
//! The interest of a peer whose connection went down is kept for a lease
//! ([`InterestTable::expire`]): events published meanwhile wait in its link (and spool) and
//! arrive when it comes back, which repairs a short partition; after the lease the peer is
//! forgotten until it announces again.
//!
//! # Durable subscriptions
//! A durable subscription is a named one: (subscriber node, name) with a pattern. Announcements
//! carry them besides the plain patterns, and each node keeps its peers' in a *registry* that
//! outlives both the lease and the subscriber's restarts: a subscriber whose announcement no
//! longer names one (it restarted and its application has not subscribed again yet) keeps it.
//! Only an explicit end removes it: the subscriber announces the name among its ended ones
//! (tombstones, the last [`DURABLE_ENDED_MAX`] of this start). The registry is bounded
//! ([`DURABLE_MAX`] entries: beyond it new ones are refused and counted) and a node persists it
//! ([`InterestTable::registry_encode`], [`InterestTable::registry_restore`]) so that it keeps
//! addressing an absent durable subscriber across its own restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::NodeId;
use crate::topic::{Topic, TopicError, TopicPattern};

/// Most topic patterns one node may announce.
pub const PATTERNS_MAX: usize = 1024;
/// Most service names one node may announce.
pub const SERVICES_MAX: usize = 256;
/// Most durable subscriptions one node may announce, and most it keeps as tombstones.
pub const DURABLE_ENDED_MAX: usize = 256;
/// Most durable subscriptions of peers a node keeps in its registry.
pub const DURABLE_MAX: usize = 4096;
/// Topics whose addressees [`InterestTable::addressees_cached`] keeps at most (the cache is
/// emptied when full, and whenever a peer's interest, connection or durable registry changes).
pub const ADDRESSEES_CACHED_MAX: usize = 256;

/// A durable subscription as announced: its name and pattern.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableInterest {
    /// The name (a valid topic: the subscriber's handle on it across restarts).
    pub name: String,
    /// The pattern.
    pub pattern: String,
}

/// A peer's durable subscription in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RegistryEntry {
    pattern: TopicPattern,
    /// The subscriber's incarnation when it last announced (0: restored, not seen since).
    incarnation: u64,
}

/// One node's whole interest, as sent to its peers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// New at every start of the announcing node.
    pub incarnation: u64,
    /// Grows with every change within an incarnation.
    pub version: u64,
    /// Topic patterns subscribed to.
    pub subscriptions: Vec<String>,
    /// Service names answered.
    pub services: Vec<String>,
    /// Work queues pulled from, each with the credit this node grants every producer (most
    /// messages of the queue it may have sent and not yet seen acknowledged).
    pub queues: Vec<(String, u32)>,
    /// Durable subscriptions (see the module docs).
    pub durable: Vec<DurableInterest>,
    /// Names of durable subscriptions this start ended (tombstones): peers drop them from
    /// their registries.
    pub durable_ended: Vec<String>,
}

/// What travels on the interest channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InterestMessage {
    /// The sender's interest.
    Announce(Announcement),
    /// The sender has processed our announcement `version` of `incarnation`.
    Ack {
        /// Our incarnation, as the announcement said.
        incarnation: u64,
        /// The version processed.
        version: u64,
    },
}

impl InterestMessage {
    /// Encodes the message (postcard).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("interest messages always encode")
    }

    /// Decodes a message from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, InterestError> {
        postcard::from_bytes(bytes).map_err(|e| InterestError::Malformed(e.to_string()))
    }
}

/// Why a peer's interest message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InterestError {
    /// Not a valid encoding.
    #[error("malformed interest message: {0}")]
    Malformed(String),
    /// More patterns or services than a node may announce.
    #[error("announcement has {patterns} patterns and {services} services; the most are {PATTERNS_MAX} and {SERVICES_MAX}")]
    TooMany {
        /// Patterns announced.
        patterns: usize,
        /// Services announced.
        services: usize,
    },
    /// A pattern or service name is not valid.
    #[error("announcement names an invalid topic: {0}")]
    Topic(#[from] TopicError),
    /// A local subscription or service beyond the bound.
    #[error("this node already has {0} distinct subscriptions or services; the most is {max}", max = PATTERNS_MAX)]
    LocalFull(usize),
    /// A persisted registry that does not decode.
    #[error("durable subscription registry does not decode: {0}")]
    Registry(String),
}

/// What one peer announced, and how far it acknowledged ours.
#[derive(Clone, Debug, Default)]
struct PeerInterest {
    incarnation: u64,
    version: u64,
    subscriptions: Vec<TopicPattern>,
    services: BTreeSet<String>,
    queues: BTreeMap<String, u32>,
    /// The highest version of our current incarnation the peer acknowledged on its current
    /// connection.
    acked: u64,
    connected: bool,
    /// When the connection went down (wall-clock milliseconds), while it is down.
    down_since_ms: Option<u64>,
}

/// The local interest and every peer's. See the module docs.
#[derive(Debug)]
pub struct InterestTable {
    incarnation: u64,
    version: u64,
    subscriptions: BTreeMap<TopicPattern, usize>,
    services: BTreeMap<String, usize>,
    queues: BTreeMap<String, u32>,
    peers: BTreeMap<NodeId, PeerInterest>,
    /// How long a disconnected peer's interest is kept, in milliseconds.
    lease_ms: u64,
    /// Local durable subscriptions: name → pattern.
    durable: BTreeMap<String, TopicPattern>,
    /// Local durable subscriptions ended in this start, oldest first (bounded).
    durable_ended: std::collections::VecDeque<String>,
    /// Peers' durable subscriptions: (subscriber, name) → entry. Outlives the lease.
    registry: BTreeMap<(NodeId, String), RegistryEntry>,
    /// Bumped whenever the registry changes (the driver persists it then).
    registry_version: u64,
    /// Durable subscriptions of peers refused because the registry was full.
    registry_refused: u64,
    /// Registry entries ended since the last [`InterestTable::take_ended`].
    ended: Vec<(NodeId, String)>,
    /// [`InterestTable::addressees`] per topic, as long as no peer's interest, connection or
    /// durable registry entry changed (bounded: [`ADDRESSEES_CACHED_MAX`]).
    addressees_cache: BTreeMap<String, Arc<[crate::gossip::Addressee]>>,
}

impl InterestTable {
    /// An empty table for a node whose current start is `incarnation`; the interest of a peer
    /// stays `lease_ms` after its connection went down.
    pub fn new(incarnation: u64, lease_ms: u64) -> Self {
        Self {
            incarnation,
            version: 0,
            subscriptions: BTreeMap::new(),
            services: BTreeMap::new(),
            queues: BTreeMap::new(),
            peers: BTreeMap::new(),
            lease_ms,
            durable: BTreeMap::new(),
            durable_ended: std::collections::VecDeque::new(),
            registry: BTreeMap::new(),
            registry_version: 0,
            registry_refused: 0,
            ended: Vec::new(),
            addressees_cache: BTreeMap::new(),
        }
    }

    /// The version of the local interest (grows with every change).
    pub fn version(&self) -> u64 {
        self.version
    }

    fn local_entries(&self) -> usize {
        self.subscriptions.len() + self.services.len() + self.queues.len()
    }

    /// Adds (or re-points) the local durable subscription `name`. Returns the version that has
    /// it.
    pub fn subscribe_durable(
        &mut self,
        name: &Topic,
        pattern: &TopicPattern,
    ) -> Result<u64, InterestError> {
        if self.durable.get(name.as_str()) == Some(pattern) {
            return Ok(self.version);
        }
        if !self.durable.contains_key(name.as_str()) && self.durable.len() >= DURABLE_ENDED_MAX {
            return Err(InterestError::LocalFull(self.durable.len()));
        }
        self.durable_ended.retain(|n| n != name.as_str());
        self.durable
            .insert(name.as_str().to_owned(), pattern.clone());
        self.version += 1;
        Ok(self.version)
    }

    /// Ends the local durable subscription `name`: announced as ended from now on, so peers
    /// drop it from their registries. Returns the version that says so.
    pub fn unsubscribe_durable(&mut self, name: &Topic) -> u64 {
        self.durable.remove(name.as_str());
        if !self.durable_ended.iter().any(|n| n == name.as_str()) {
            if self.durable_ended.len() >= DURABLE_ENDED_MAX {
                self.durable_ended.pop_front();
            }
            self.durable_ended.push_back(name.as_str().to_owned());
        }
        self.version += 1;
        self.version
    }

    /// Names of the local durable subscriptions ended (tombstones), oldest first.
    pub fn durable_ended(&self) -> Vec<String> {
        self.durable_ended.iter().cloned().collect()
    }

    /// Takes back tombstones persisted by an earlier start (announced from now on).
    pub fn restore_durable_ended(&mut self, names: impl IntoIterator<Item = String>) {
        for name in names {
            if Topic::new(name.as_str()).is_err() || self.durable_ended.contains(&name) {
                continue;
            }
            if self.durable_ended.len() >= DURABLE_ENDED_MAX {
                self.durable_ended.pop_front();
            }
            self.durable_ended.push_back(name);
        }
    }

    /// Whether the local durable subscription `name` exists (or ended in this start: `false`).
    pub fn durable_here(&self, name: &str) -> bool {
        self.durable.contains_key(name)
    }

    /// Whether this start ended the local durable subscription `name`.
    pub fn durable_ended_here(&self, name: &str) -> bool {
        self.durable_ended.iter().any(|n| n == name)
    }

    /// Peers' durable subscriptions ended (removed from the registry) since the last call.
    pub fn take_ended(&mut self) -> Vec<(NodeId, String)> {
        std::mem::take(&mut self.ended)
    }

    /// Grows whenever the registry of peers' durable subscriptions changes.
    pub fn registry_version(&self) -> u64 {
        self.registry_version
    }

    /// Peers' durable subscriptions in the registry.
    pub fn registry_len(&self) -> usize {
        self.registry.len()
    }

    /// Durable subscriptions of peers refused so far because the registry was full.
    pub fn registry_refused(&self) -> u64 {
        self.registry_refused
    }

    /// Whether `peer` has a durable subscription here (it is then sent events directly).
    pub fn has_durable(&self, peer: &NodeId) -> bool {
        self.registry
            .range((*peer, String::new())..)
            .next()
            .is_some_and(|((node, _), _)| node == peer)
    }

    /// The registry, to persist: postcard of `[(subscriber, name, pattern)]`.
    pub fn registry_encode(&self) -> Vec<u8> {
        let entries: Vec<(NodeId, &str, &str)> = self
            .registry
            .iter()
            .map(|((node, name), entry)| (*node, name.as_str(), entry.pattern.as_str()))
            .collect();
        postcard::to_allocvec(&entries).expect("a registry always encodes")
    }

    /// Takes back a persisted registry (at start, before any announcement).
    pub fn registry_restore(&mut self, bytes: &[u8]) -> Result<usize, InterestError> {
        let entries: Vec<(NodeId, String, String)> =
            postcard::from_bytes(bytes).map_err(|e| InterestError::Registry(e.to_string()))?;
        self.addressees_cache.clear();
        for (node, name, pattern) in entries.into_iter().take(DURABLE_MAX) {
            Topic::new(name.as_str())?;
            let pattern = TopicPattern::new(pattern)?;
            self.registry.insert(
                (node, name),
                RegistryEntry {
                    pattern,
                    incarnation: 0,
                },
            );
        }
        Ok(self.registry.len())
    }

    /// Adds a local subscription (counted: the same pattern twice needs two `unsubscribe`s).
    /// Returns the version that has it.
    pub fn subscribe(&mut self, pattern: &TopicPattern) -> Result<u64, InterestError> {
        if let Some(count) = self.subscriptions.get_mut(pattern) {
            *count += 1;
            return Ok(self.version);
        }
        if self.subscriptions.len() >= PATTERNS_MAX {
            return Err(InterestError::LocalFull(self.local_entries()));
        }
        self.subscriptions.insert(pattern.clone(), 1);
        self.version += 1;
        Ok(self.version)
    }

    /// Removes one local subscription of `pattern`. Returns whether the announced interest changed.
    pub fn unsubscribe(&mut self, pattern: &TopicPattern) -> bool {
        remove_counted(&mut self.subscriptions, pattern) && {
            self.version += 1;
            true
        }
    }

    /// Starts answering `service` here. Returns the version that has it.
    pub fn serve(&mut self, service: &Topic) -> Result<u64, InterestError> {
        if let Some(count) = self.services.get_mut(service.as_str()) {
            *count += 1;
            return Ok(self.version);
        }
        if self.services.len() >= SERVICES_MAX {
            return Err(InterestError::LocalFull(self.local_entries()));
        }
        self.services.insert(service.as_str().to_owned(), 1);
        self.version += 1;
        Ok(self.version)
    }

    /// Stops answering `service` here (counted). Returns whether the announced interest changed.
    pub fn unserve(&mut self, service: &Topic) -> bool {
        remove_counted(&mut self.services, service.as_str()) && {
            self.version += 1;
            true
        }
    }

    /// Starts pulling from work queue `queue` here with `credit` per producer. Returns the
    /// version that has it; `None` if this node pulls from it already.
    pub fn pull(&mut self, queue: &Topic, credit: u32) -> Result<Option<u64>, InterestError> {
        if self.queues.contains_key(queue.as_str()) {
            return Ok(None);
        }
        if self.queues.len() >= SERVICES_MAX {
            return Err(InterestError::LocalFull(self.local_entries()));
        }
        self.queues.insert(queue.as_str().to_owned(), credit.max(1));
        self.version += 1;
        Ok(Some(self.version))
    }

    /// Stops pulling from `queue` here. Returns whether the announced interest changed.
    pub fn unpull(&mut self, queue: &Topic) -> bool {
        self.queues.remove(queue.as_str()).is_some() && {
            self.version += 1;
            true
        }
    }

    /// Connected peers that pull from `queue`, with the credit each grants, in node id order.
    pub fn workers(&self, queue: &Topic) -> Vec<(NodeId, u32)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.connected)
            .filter_map(|(id, p)| p.queues.get(queue.as_str()).map(|c| (*id, *c)))
            .collect()
    }

    /// Whether `peer`'s interest (its announcement, maybe empty) reached this node since it
    /// was last forgotten: what it subscribes to, serves and pulls is known.
    pub fn heard_from(&self, peer: &NodeId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.incarnation != 0)
    }

    /// Since when (wall clock, ms) `peer`'s connection has been down; `None` while it is up
    /// or once it is forgotten.
    pub fn down_since(&self, peer: &NodeId) -> Option<u64> {
        self.peers.get(peer).and_then(|p| p.down_since_ms)
    }

    /// Whether a local subscription (plain or durable) matches `topic`.
    pub fn subscribed_here(&self, topic: &Topic) -> bool {
        self.subscriptions.keys().any(|p| p.matches(topic))
            || self.durable.values().any(|p| p.matches(topic))
    }

    /// Whether this node answers `service`.
    pub fn served_here(&self, service: &Topic) -> bool {
        self.services.contains_key(service.as_str())
    }

    /// The local interest, to send to peers.
    pub fn announcement(&self) -> Announcement {
        Announcement {
            incarnation: self.incarnation,
            version: self.version,
            subscriptions: self
                .subscriptions
                .keys()
                .map(|p| p.as_str().to_owned())
                .collect(),
            services: self.services.keys().cloned().collect(),
            queues: self
                .queues
                .iter()
                .map(|(name, credit)| (name.clone(), *credit))
                .collect(),
            durable: self
                .durable
                .iter()
                .map(|(name, pattern)| DurableInterest {
                    name: name.clone(),
                    pattern: pattern.as_str().to_owned(),
                })
                .collect(),
            durable_ended: self.durable_ended.iter().cloned().collect(),
        }
    }

    /// A connection to `peer` is up: it needs our announcement again (and acknowledges anew).
    pub fn peer_connected(&mut self, peer: NodeId) {
        self.addressees_cache.clear();
        let entry = self.peers.entry(peer).or_default();
        entry.connected = true;
        entry.down_since_ms = None;
        entry.acked = 0;
    }

    /// The connection to `peer` went down at `now_ms`.
    pub fn peer_disconnected(&mut self, peer: NodeId, now_ms: u64) {
        self.addressees_cache.clear();
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.connected = false;
            entry.acked = 0;
            entry.down_since_ms.get_or_insert(now_ms);
        }
    }

    /// Forgets peers that have been down for longer than the lease. Returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<NodeId> {
        let lease_ms = self.lease_ms;
        let expired: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.down_since_ms
                    .is_some_and(|since| now_ms.saturating_sub(since) >= lease_ms)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.peers.remove(id);
            self.addressees_cache.clear();
        }
        expired
    }

    /// Takes `peer`'s announcement. Returns whether its interest changed; an older announcement
    /// of the same incarnation is ignored (announcements are not ordered across connections).
    pub fn handle_announcement(
        &mut self,
        peer: NodeId,
        announcement: Announcement,
    ) -> Result<bool, InterestError> {
        if announcement.subscriptions.len() > PATTERNS_MAX
            || announcement.services.len() > SERVICES_MAX
            || announcement.queues.len() > SERVICES_MAX
            || announcement.durable.len() > DURABLE_ENDED_MAX
            || announcement.durable_ended.len() > DURABLE_ENDED_MAX
        {
            return Err(InterestError::TooMany {
                patterns: announcement.subscriptions.len(),
                services: announcement.services.len(),
            });
        }
        let subscriptions = announcement
            .subscriptions
            .into_iter()
            .map(TopicPattern::new)
            .collect::<Result<Vec<_>, _>>()?;
        let services = announcement
            .services
            .into_iter()
            .map(|s| Topic::new(s).map(|t| t.as_str().to_owned()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let queues = announcement
            .queues
            .into_iter()
            .map(|(name, credit)| Topic::new(name).map(|t| (t.as_str().to_owned(), credit.max(1))))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let durable = announcement
            .durable
            .into_iter()
            .map(|d| {
                Topic::new(d.name.as_str())?;
                Ok((d.name, TopicPattern::new(d.pattern)?))
            })
            .collect::<Result<Vec<_>, TopicError>>()?;
        for name in &announcement.durable_ended {
            Topic::new(name.as_str())?;
        }
        self.addressees_cache.clear();
        let entry = self.peers.entry(peer).or_default();
        if entry.incarnation == announcement.incarnation && announcement.version <= entry.version {
            return Ok(false);
        }
        let incarnation = announcement.incarnation;
        for name in announcement.durable_ended {
            let key = (peer, name);
            if self.registry.remove(&key).is_some() {
                self.registry_version += 1;
                self.ended.push(key);
            }
        }
        for (name, pattern) in durable {
            let full = self.registry.len() >= DURABLE_MAX;
            match self.registry.get_mut(&(peer, name.clone())) {
                Some(known) => {
                    if known.pattern != pattern {
                        known.pattern = pattern;
                        self.registry_version += 1;
                    }
                    known.incarnation = incarnation;
                }
                None if full => self.registry_refused += 1,
                None => {
                    self.registry.insert(
                        (peer, name),
                        RegistryEntry {
                            pattern,
                            incarnation,
                        },
                    );
                    self.registry_version += 1;
                }
            }
        }
        let entry = self.peers.entry(peer).or_default();
        entry.incarnation = announcement.incarnation;
        entry.version = announcement.version;
        let changed = entry.subscriptions != subscriptions
            || entry.services != services
            || entry.queues != queues;
        entry.subscriptions = subscriptions;
        entry.services = services;
        entry.queues = queues;
        Ok(changed)
    }

    /// `peer` acknowledged our announcement `version` of `incarnation`.
    pub fn handle_ack(&mut self, peer: NodeId, incarnation: u64, version: u64) {
        if incarnation != self.incarnation {
            return; // about an earlier start of this node
        }
        if let Some(entry) = self.peers.get_mut(&peer) {
            if entry.connected {
                entry.acked = entry.acked.max(version);
            }
        }
    }

    /// Whether every connected peer acknowledged `version` (or a later one) of our interest.
    pub fn acknowledged_by_all(&self, version: u64) -> bool {
        self.peers
            .values()
            .filter(|p| p.connected)
            .all(|p| p.acked >= version)
    }

    /// The highest version of our interest `peer` acknowledged on its current connection
    /// (0: none, or the table does not know the connection yet).
    pub fn acknowledged_by(&self, peer: &NodeId) -> u64 {
        self.peers
            .get(peer)
            .filter(|p| p.connected)
            .map_or(0, |p| p.acked)
    }

    /// Connected peers that have not acknowledged `version` yet.
    pub fn waiting_for(&self, version: u64) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.connected && p.acked < version)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Peers with a subscription matching `topic` (connected, or down for less than the lease),
    /// in node id order.
    pub fn subscribers(&self, topic: &Topic) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(id, p)| {
                p.subscriptions.iter().any(|s| s.matches(topic)) || self.durable_matches(id, topic)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `peer` has a durable subscription here matching `topic`.
    fn durable_matches(&self, peer: &NodeId, topic: &Topic) -> bool {
        self.registry
            .range((*peer, String::new())..)
            .take_while(|((node, _), _)| node == peer)
            .any(|(_, entry)| entry.pattern.matches(topic))
    }

    /// The addressees of an event on `topic`, in node id order: peers with a subscription
    /// matching it (connected, or down for less than the lease), and peers with a durable
    /// subscription matching it (whether or not they are there; see the module docs), with
    /// their incarnation, whether they are connected, and for peers with a durable
    /// subscription here `direct` and the names of those that match.
    pub fn addressees(&self, topic: &Topic) -> Vec<crate::gossip::Addressee> {
        let mut addressees: BTreeMap<NodeId, crate::gossip::Addressee> = self
            .peers
            .iter()
            .filter(|(_, p)| p.subscriptions.iter().any(|s| s.matches(topic)))
            .map(|(id, p)| {
                (
                    *id,
                    crate::gossip::Addressee {
                        node: *id,
                        incarnation: p.incarnation,
                        connected: p.connected,
                        direct: false,
                        durable: Vec::new(),
                    },
                )
            })
            .collect();
        let mut previous: Option<NodeId> = None;
        for ((node, name), entry) in &self.registry {
            if previous != Some(*node) {
                previous = Some(*node);
                // A node with any durable subscription here gets every event directly.
                if let Some(addressee) = addressees.get_mut(node) {
                    addressee.direct = true;
                }
            }
            if !entry.pattern.matches(topic) {
                continue;
            }
            let peer = self.peers.get(node);
            let addressee = addressees
                .entry(*node)
                .or_insert_with(|| crate::gossip::Addressee {
                    node: *node,
                    incarnation: peer.map_or(entry.incarnation, |p| p.incarnation),
                    connected: peer.is_some_and(|p| p.connected),
                    direct: true,
                    durable: Vec::new(),
                });
            addressee.direct = true;
            if addressee.durable.len() < crate::gossip::DURABLE_NAMES_MAX {
                addressee.durable.push(name.clone());
            }
        }
        addressees.into_values().collect()
    }

    /// [`InterestTable::addressees`], computed once per topic until a peer's interest,
    /// connection or durable registry entry changes (the publisher's path: one lookup per
    /// event would otherwise build the list anew each time).
    pub fn addressees_cached(&mut self, topic: &Topic) -> Arc<[crate::gossip::Addressee]> {
        if let Some(cached) = self.addressees_cache.get(topic.as_str()) {
            return Arc::clone(cached);
        }
        let addressees: Arc<[crate::gossip::Addressee]> = self.addressees(topic).into();
        if self.addressees_cache.len() >= ADDRESSEES_CACHED_MAX {
            self.addressees_cache.clear();
        }
        self.addressees_cache
            .insert(topic.as_str().to_owned(), Arc::clone(&addressees));
        addressees
    }

    /// Connected peers with a subscription (plain or durable) matching `topic`.
    pub fn connected_subscribers(&self, topic: &Topic) -> usize {
        self.peers
            .iter()
            .filter(|(id, p)| {
                p.connected
                    && (p.subscriptions.iter().any(|s| s.matches(topic))
                        || self.durable_matches(id, topic))
            })
            .count()
    }

    /// Connected peers that answer `service`, in node id order.
    pub fn servers(&self, service: &Topic) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.connected && p.services.contains(service.as_str()))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `peer` answers `service` (as far as its last announcement says).
    pub fn serves(&self, peer: &NodeId, service: &Topic) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.services.contains(service.as_str()))
    }
}

fn remove_counted<K, Q>(map: &mut BTreeMap<K, usize>, key: &Q) -> bool
where
    K: Ord + std::borrow::Borrow<Q>,
    Q: Ord + ?Sized,
{
    let Some(count) = map.get_mut(key) else {
        return false;
    };
    *count -= 1;
    if *count == 0 {
        map.remove(key);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn pattern(s: &str) -> TopicPattern {
        TopicPattern::new(s).unwrap()
    }

    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    fn announce(table: &mut InterestTable, peer: NodeId, from: &InterestTable) -> bool {
        let bytes = InterestMessage::Announce(from.announcement()).encode();
        let InterestMessage::Announce(a) = InterestMessage::decode(&bytes).unwrap() else {
            panic!("an announcement");
        };
        table.handle_announcement(peer, a).unwrap()
    }

    /// The cached addressees follow every change a fresh lookup would see: connections,
    /// announcements (new and withdrawn subscriptions, durable ones), expiry.
    #[test]
    fn cached_addressees_follow_every_change() {
        let view = |table: &mut InterestTable, t: &str| -> Vec<(NodeId, bool, bool)> {
            let cached: Vec<_> = table
                .addressees_cached(&topic(t))
                .iter()
                .map(|a| (a.node, a.connected, a.direct))
                .collect();
            let fresh: Vec<_> = table
                .addressees(&topic(t))
                .into_iter()
                .map(|a| (a.node, a.connected, a.direct))
                .collect();
            assert_eq!(cached, fresh, "the cache is stale for {t}");
            cached
        };
        let mut publisher = InterestTable::new(1, 1000);
        let mut subscriber = InterestTable::new(2, 1000);
        subscriber.subscribe(&pattern("orders/*")).unwrap();
        assert!(view(&mut publisher, "orders/1").is_empty());
        publisher.peer_connected(node(2));
        announce(&mut publisher, node(2), &subscriber);
        assert_eq!(
            view(&mut publisher, "orders/1"),
            vec![(node(2), true, false)]
        );
        assert_eq!(
            view(&mut publisher, "orders/1"),
            vec![(node(2), true, false)]
        );
        publisher.peer_disconnected(node(2), 10);
        assert_eq!(
            view(&mut publisher, "orders/1"),
            vec![(node(2), false, false)]
        );
        publisher.peer_connected(node(2));
        subscriber
            .subscribe_durable(&topic("billing"), &pattern("orders/*"))
            .unwrap();
        announce(&mut publisher, node(2), &subscriber);
        assert_eq!(
            view(&mut publisher, "orders/1"),
            vec![(node(2), true, true)]
        );
        subscriber.unsubscribe_durable(&topic("billing"));
        subscriber.unsubscribe(&pattern("orders/*"));
        announce(&mut publisher, node(2), &subscriber);
        assert!(view(&mut publisher, "orders/1").is_empty());
        subscriber.subscribe(&pattern("orders/*")).unwrap();
        announce(&mut publisher, node(2), &subscriber);
        assert_eq!(
            view(&mut publisher, "orders/1"),
            vec![(node(2), true, false)]
        );
        publisher.peer_disconnected(node(2), 10);
        assert_eq!(publisher.expire(2000), vec![node(2)]);
        assert!(view(&mut publisher, "orders/1").is_empty());
        // Many topics: the cache stays bounded and right.
        for i in 0..ADDRESSEES_CACHED_MAX + 10 {
            view(&mut publisher, &format!("t/{i}"));
        }
        assert!(publisher.addressees_cache.len() <= ADDRESSEES_CACHED_MAX);
    }

    #[test]
    fn events_go_to_matching_peers_only() {
        let mut publisher = InterestTable::new(1, 1000);
        let mut sub_a = InterestTable::new(2, 1000);
        let mut sub_b = InterestTable::new(3, 1000);
        sub_a.subscribe(&pattern("orders/*")).unwrap();
        sub_b.subscribe(&pattern("orders/created/**")).unwrap();
        sub_b.serve(&topic("pricing")).unwrap();
        publisher.peer_connected(node(2));
        publisher.peer_connected(node(3));
        assert!(announce(&mut publisher, node(2), &sub_a));
        assert!(announce(&mut publisher, node(3), &sub_b));
        assert_eq!(
            publisher.subscribers(&topic("orders/created")),
            vec![node(2), node(3)]
        );
        assert_eq!(
            publisher.subscribers(&topic("orders/deleted")),
            vec![node(2)]
        );
        assert!(publisher.subscribers(&topic("payments/x")).is_empty());
        assert_eq!(publisher.servers(&topic("pricing")), vec![node(3)]);
        assert!(publisher.servers(&topic("stock")).is_empty());
    }

    #[test]
    fn stale_announcements_are_ignored_but_a_new_incarnation_replaces() {
        let mut table = InterestTable::new(1, 1000);
        let mut peer = InterestTable::new(7, 1000);
        peer.subscribe(&pattern("a")).unwrap();
        let old = peer.announcement();
        peer.subscribe(&pattern("b")).unwrap();
        let new = peer.announcement();
        assert!(table.handle_announcement(node(2), new).unwrap());
        assert!(
            !table.handle_announcement(node(2), old).unwrap(),
            "older version"
        );
        assert_eq!(table.subscribers(&topic("b")), vec![node(2)]);
        // The peer restarts with only "a": version 1 again, but a new incarnation.
        let mut restarted = InterestTable::new(8, 1000);
        restarted.subscribe(&pattern("a")).unwrap();
        assert!(table
            .handle_announcement(node(2), restarted.announcement())
            .unwrap());
        assert!(table.subscribers(&topic("b")).is_empty());
    }

    #[test]
    fn a_subscription_is_in_effect_once_every_connected_peer_acknowledged_it() {
        let mut table = InterestTable::new(1, 1000);
        table.peer_connected(node(2));
        table.peer_connected(node(3));
        let version = table.subscribe(&pattern("x/*")).unwrap();
        assert!(!table.acknowledged_by_all(version));
        table.handle_ack(node(2), 1, version);
        assert_eq!(table.waiting_for(version), vec![node(3)]);
        table.handle_ack(node(3), 99, version); // another incarnation of ours: ignored
        assert!(!table.acknowledged_by_all(version));
        table.peer_disconnected(node(3), 0);
        assert!(
            table.acknowledged_by_all(version),
            "a peer that is gone is not waited for"
        );
        table.peer_connected(node(3));
        assert!(
            !table.acknowledged_by_all(version),
            "a new connection acknowledges anew"
        );
    }

    #[test]
    fn a_disconnected_subscriber_is_kept_for_the_lease() {
        let mut table = InterestTable::new(1, 1000);
        let mut peer = InterestTable::new(2, 1000);
        peer.subscribe(&pattern("a")).unwrap();
        peer.serve(&topic("s")).unwrap();
        table.peer_connected(node(2));
        announce(&mut table, node(2), &peer);
        table.peer_disconnected(node(2), 5_000);
        assert_eq!(table.subscribers(&topic("a")), vec![node(2)]);
        assert!(
            table.servers(&topic("s")).is_empty(),
            "requests need a live server"
        );
        assert!(table.expire(5_999).is_empty());
        assert_eq!(table.expire(6_000), vec![node(2)]);
        assert!(table.subscribers(&topic("a")).is_empty());
    }

    #[test]
    fn counted_subscriptions_change_the_version_only_at_the_edges() {
        let mut table = InterestTable::new(1, 1000);
        let v1 = table.subscribe(&pattern("a")).unwrap();
        assert_eq!(table.subscribe(&pattern("a")).unwrap(), v1);
        assert!(!table.unsubscribe(&pattern("a")));
        assert!(table.subscribed_here(&topic("a")));
        assert!(table.unsubscribe(&pattern("a")));
        assert!(!table.subscribed_here(&topic("a")));
        assert!(table.version() > v1);
        assert!(!table.unsubscribe(&pattern("never")));
    }

    #[test]
    fn work_goes_to_connected_workers_and_is_taken_back_from_silent_ones() {
        let mut producer = InterestTable::new(1, 60_000);
        let mut worker = InterestTable::new(2, 1000);
        assert!(worker.pull(&topic("thumbs"), 8).unwrap().is_some());
        assert_eq!(
            worker.pull(&topic("thumbs"), 8).unwrap(),
            None,
            "once per node"
        );
        producer.peer_connected(node(2));
        announce(&mut producer, node(2), &worker);
        assert_eq!(producer.workers(&topic("thumbs")), vec![(node(2), 8)]);
        assert!(producer.workers(&topic("other")).is_empty());
        producer.peer_disconnected(node(2), 10_000);
        assert!(producer.workers(&topic("thumbs")).is_empty());
        assert_eq!(producer.down_since(&node(2)), Some(10_000));
        assert_eq!(producer.down_since(&node(9)), None);
        producer.peer_connected(node(2));
        assert_eq!(producer.down_since(&node(2)), None);
        assert!(worker.unpull(&topic("thumbs")));
        assert!(!worker.unpull(&topic("thumbs")));
    }

    #[test]
    fn bad_announcements_are_refused() {
        let mut table = InterestTable::new(1, 1000);
        let bad = Announcement {
            incarnation: 1,
            version: 1,
            subscriptions: vec!["a//b".into()],
            services: vec![],
            queues: vec![],
            durable: vec![],
            durable_ended: vec![],
        };
        assert!(matches!(
            table.handle_announcement(node(2), bad),
            Err(InterestError::Topic(_))
        ));
        let many = Announcement {
            incarnation: 1,
            version: 1,
            subscriptions: (0..=PATTERNS_MAX).map(|i| format!("t{i}")).collect(),
            services: vec![],
            queues: vec![],
            durable: vec![],
            durable_ended: vec![],
        };
        assert!(matches!(
            table.handle_announcement(node(2), many),
            Err(InterestError::TooMany { .. })
        ));
        assert!(InterestMessage::decode(&[0xff, 0xff, 0xff]).is_err());
    }

    fn durable_names(table: &InterestTable, t: &str) -> Vec<(NodeId, bool, bool, Vec<String>)> {
        table
            .addressees(&topic(t))
            .into_iter()
            .map(|a| (a.node, a.connected, a.direct, a.durable))
            .collect()
    }

    #[test]
    fn a_durable_subscription_outlives_the_lease_and_restarts_until_it_is_ended() {
        let mut publisher = InterestTable::new(1, 1000);
        let mut subscriber = InterestTable::new(2, 1000);
        subscriber.subscribe(&pattern("other")).unwrap();
        subscriber
            .subscribe_durable(&topic("billing"), &pattern("orders/*"))
            .unwrap();
        publisher.peer_connected(node(2));
        let before = publisher.registry_version();
        announce(&mut publisher, node(2), &subscriber);
        assert!(publisher.registry_version() > before);
        assert!(publisher.has_durable(&node(2)));
        assert_eq!(
            durable_names(&publisher, "orders/1"),
            vec![(node(2), true, true, vec!["billing".to_owned()])]
        );
        // Every event to a node with a durable subscription goes direct, named or not.
        assert_eq!(
            durable_names(&publisher, "other"),
            vec![(node(2), true, true, vec![])]
        );
        // Gone past the lease: still addressed, as a disconnected durable subscriber.
        publisher.peer_disconnected(node(2), 0);
        assert_eq!(publisher.expire(5_000), vec![node(2)]);
        assert_eq!(
            durable_names(&publisher, "orders/1"),
            vec![(node(2), false, true, vec!["billing".to_owned()])]
        );
        assert!(
            durable_names(&publisher, "other").is_empty(),
            "plain interest is gone"
        );
        // It restarts; its application has not subscribed again yet: the registry keeps it.
        let restarted = InterestTable::new(3, 1000);
        publisher.peer_connected(node(2));
        announce(&mut publisher, node(2), &restarted);
        assert_eq!(publisher.registry_len(), 1);
        // An explicit end removes it.
        let mut ending = InterestTable::new(3, 1000);
        ending
            .subscribe_durable(&topic("billing"), &pattern("orders/*"))
            .unwrap();
        ending.unsubscribe_durable(&topic("billing"));
        assert!(!ending.durable_here("billing"));
        assert!(ending.durable_ended_here("billing"));
        let before = publisher.registry_version();
        announce(&mut publisher, node(2), &ending);
        assert!(publisher.registry_version() > before);
        assert_eq!(publisher.registry_len(), 0);
        assert!(durable_names(&publisher, "orders/1").is_empty());
        // Subscribing again under the name lifts the tombstone.
        ending
            .subscribe_durable(&topic("billing"), &pattern("orders/*"))
            .unwrap();
        assert!(!ending.durable_ended_here("billing"));
    }

    #[test]
    fn the_registry_survives_a_restart_of_the_publisher() {
        let mut publisher = InterestTable::new(1, 1000);
        let mut subscriber = InterestTable::new(2, 1000);
        subscriber
            .subscribe_durable(&topic("a"), &pattern("x/**"))
            .unwrap();
        subscriber
            .subscribe_durable(&topic("b"), &pattern("x/y"))
            .unwrap();
        publisher.peer_connected(node(2));
        announce(&mut publisher, node(2), &subscriber);
        let saved = publisher.registry_encode();
        let mut restarted = InterestTable::new(9, 1000);
        assert_eq!(restarted.registry_restore(&saved).unwrap(), 2);
        assert_eq!(
            durable_names(&restarted, "x/y"),
            vec![(node(2), false, true, vec!["a".to_owned(), "b".to_owned()])]
        );
        assert!(restarted.registry_restore(&[0xff, 0xff, 0xff]).is_err());
    }
}
