//! Finding peers on the local network with multicast DNS (DNS-SD over mDNS, RFC 6762/6763).
//!
//! A node announces one service instance of type [`SERVICE_TYPE_DEFAULT`], named by its full node
//! id, on its bound UDP port, with three TXT records:
//!
//! | key    | value                                   |
//! |--------|-----------------------------------------|
//! | `id`   | the full node id (52 base32 characters) |
//! | `mesh` | the mesh name                           |
//! | `v`    | the protocol versions spoken, `MIN-MAX` |
//!
//! It browses for the same type at the same time. A resolved instance of another node of the same
//! mesh whose version range overlaps ours becomes [`DiscoveryEvent::Discovered`]; an instance that
//! leaves (goodbye packet on a clean shutdown, or its records expiring) becomes
//! [`DiscoveryEvent::Vanished`]. Everything else (our own instance, other meshes, incompatible
//! versions, malformed records) is ignored with a debug log line.
//!
//! An announcement is only a **hint**: anyone on the link can announce any id. The QUIC handshake
//! pins the id that is dialed, so a spoofed record costs a failed dial, never a connection to an
//! impostor; and addresses from records are added to a peer's known addresses, never replacing
//! them.
//!
//! # Interfaces
//! mdns-sd announces and queries on every interface by default ([`Interfaces::All`], the
//! production default). Demos and tests use [`Interfaces::LoopbackOnly`]. Note that mdns-sd 0.21
//! joins the mDNS multicast group on every interface when its daemon starts, before the interface
//! selection is applied (no mDNS packet is sent or processed there, but the kernel reports the
//! group membership); tests that must not touch a real interface at all run inside a network
//! namespace they create.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};
use weft_proto::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use weft_proto::NodeId;

use crate::addr::NodeAddr;
pub use crate::config::{Interfaces, MdnsConfig, SERVICE_TYPE_DEFAULT};
use crate::error::ConnectError;

/// Most announced instances remembered at once, to tell which node a removal concerns. Instances
/// beyond it are still reported as discovered, but their removal is not.
pub const INSTANCES_MAX: usize = 4_096;

/// How long [`Discovery::shutdown`] waits for the goodbye packets and for the daemon to stop.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// What this node announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The node's id (the instance name and the `id` TXT record).
    pub id: NodeId,
    /// The mesh name (`mesh` TXT record); nodes of other meshes ignore the announcement.
    pub mesh: String,
    /// The node's bound UDP address. An unspecified IP (`0.0.0.0`) announces the addresses of the
    /// selected interfaces instead, following their changes.
    pub addr: SocketAddr,
}

/// Something discovery learned.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiscoveryEvent {
    /// A node of our mesh announced itself at these addresses (a hint, see the module docs).
    Discovered(NodeAddr),
    /// A node's announcement is gone (goodbye or expiry). Its links are not affected.
    Vanished(NodeId),
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The service type is not `_name._udp.local.` (name of 1 to 15 bytes).
    #[error("invalid mDNS service type {0:?}: expected `_name._udp.local.` with a name of 1 to 15 bytes")]
    ServiceType(String),
    /// The mDNS daemon refused a request (e.g. it could not start).
    #[error("mDNS: {0}")]
    Daemon(String),
}

impl From<mdns_sd::Error> for DiscoveryError {
    fn from(error: mdns_sd::Error) -> Self {
        Self::Daemon(error.to_string())
    }
}

/// Called for every [`DiscoveryEvent`], on a tokio task; must not block.
pub type DiscoveryCallback = Arc<dyn Fn(DiscoveryEvent) + Send + Sync>;

/// Running discovery: the mDNS daemon with our announcement and a browse.
///
/// [`Discovery::shutdown`] (or dropping it) unregisters the announcement (goodbye packets) and stops
/// the daemon and the task that reads its events.
#[must_use = "discovery stops when dropped"]
pub struct Discovery {
    daemon: ServiceDaemon,
    /// Our instance's full name, for the goodbye.
    fullname: String,
    /// Reads browse events; ends when the daemon drops its event sender.
    browse_task: Option<JoinHandle<()>>,
    stopped: bool,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("fullname", &self.fullname)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Starts the daemon on the configured interfaces, announces `local` and browses for other
    /// nodes, calling `on_event` for each one found or gone. Must be called within a tokio runtime.
    pub fn start(
        config: &MdnsConfig,
        local: Announcement,
        on_event: DiscoveryCallback,
    ) -> Result<Self, DiscoveryError> {
        let mut discovery = Self::idle(start_daemon(config)?);
        // On error, dropping `discovery` stops the daemon.
        let info = service_info(config, &local)?;
        discovery.fullname = info.get_fullname().to_owned();
        discovery.daemon.register(info)?;
        let events = discovery.daemon.browse(&config.service_type)?;
        discovery.browse_task = Some(tokio::spawn(
            browse(events, local, on_event).in_current_span(),
        ));
        info!(instance = %discovery.fullname, interfaces = ?config.interfaces, "mDNS discovery started");
        Ok(discovery)
    }

    /// Unregisters the announcement (sending goodbye packets), stops the daemon and waits (at most
    /// [`SHUTDOWN_TIMEOUT`] for each step) until it and the browse task have ended.
    pub async fn shutdown(mut self) {
        self.stopped = true;
        let announced = !self.fullname.is_empty();
        if let Some(status) = announced
            .then(|| self.daemon.unregister(&self.fullname).ok())
            .flatten()
        {
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, status.recv_async()).await;
        }
        if let Ok(status) = self.daemon.shutdown() {
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, status.recv_async()).await;
        }
        if let Some(task) = self.browse_task.take() {
            // The daemon dropped the browse channel on exit, which ends the task.
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, task).await.is_err() {
                abort.abort();
            }
        }
        debug!(instance = %self.fullname, "mDNS discovery stopped");
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(task) = self.browse_task.take() {
            task.abort();
        }
        if !self.stopped {
            // Queued in order on the daemon's thread: the goodbye goes out before it exits.
            if !self.fullname.is_empty() {
                let _ = self.daemon.unregister(&self.fullname);
            }
            let _ = self.daemon.shutdown();
        }
    }
}

fn check_service_type(service_type: &str) -> Result<(), DiscoveryError> {
    let name = service_type
        .strip_suffix("._udp.local.")
        .and_then(|rest| rest.strip_prefix('_'));
    match name {
        Some(name) if (1..=15).contains(&name.len()) && !name.contains('.') => Ok(()),
        _ => Err(DiscoveryError::ServiceType(service_type.to_owned())),
    }
}

fn service_info(config: &MdnsConfig, local: &Announcement) -> Result<ServiceInfo, DiscoveryError> {
    let id = local.id.to_string();
    // A node id is 52 characters: within DNS's 63-byte label limit, as instance and host name.
    let host = format!("{id}.local.");
    let versions = format!("{PROTOCOL_VERSION_MIN}-{PROTOCOL_VERSION_MAX}");
    let properties = [
        ("id", id.as_str()),
        ("mesh", local.mesh.as_str()),
        ("v", versions.as_str()),
    ];
    let ip = local.addr.ip();
    if ip.is_unspecified() {
        let info = ServiceInfo::new(
            &config.service_type,
            &id,
            &host,
            "",
            local.addr.port(),
            &properties[..],
        )?;
        Ok(info.enable_addr_auto())
    } else {
        Ok(ServiceInfo::new(
            &config.service_type,
            &id,
            &host,
            ip,
            local.addr.port(),
            &properties[..],
        )?)
    }
}

/// Starts an mdns-sd daemon restricted to the configured interfaces. Commands run in order on the
/// daemon's thread, so the selection is in force before anything is announced or queried.
fn start_daemon(config: &MdnsConfig) -> Result<ServiceDaemon, DiscoveryError> {
    check_service_type(&config.service_type)?;
    let daemon = ServiceDaemon::new()?;
    let selected = match &config.interfaces {
        Interfaces::All => Ok(()),
        Interfaces::LoopbackOnly => daemon
            .disable_interface(IfKind::All)
            .and_then(|()| daemon.enable_interface(IfKind::LoopbackV4)),
        Interfaces::Named(names) => daemon.disable_interface(IfKind::All).and_then(|()| {
            daemon.enable_interface(names.iter().map(IfKind::from).collect::<Vec<_>>())
        }),
    };
    if let Err(e) = selected {
        let _ = daemon.shutdown();
        return Err(e.into());
    }
    Ok(daemon)
}

/// Something a scan saw.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScanEvent {
    /// A node announced itself (any mesh).
    Seen(Sighting),
    /// A node's announcement is gone (goodbye or expiry).
    Gone(NodeId),
}

/// Called for every [`ScanEvent`], on a tokio task; must not block.
pub type ScanCallback = Arc<dyn Fn(ScanEvent) + Send + Sync>;

impl Discovery {
    /// A daemon that announces and browses nothing yet.
    fn idle(daemon: ServiceDaemon) -> Self {
        Self {
            daemon,
            fullname: String::new(),
            browse_task: None,
            stopped: false,
        }
    }

    /// Browses without announcing anything, reporting the nodes of every mesh (for operators:
    /// `weft discover`). Must be called within a tokio runtime.
    pub fn scan(config: &MdnsConfig, on_event: ScanCallback) -> Result<Self, DiscoveryError> {
        let mut discovery = Self::idle(start_daemon(config)?);
        let events = discovery.daemon.browse(&config.service_type)?;
        discovery.browse_task = Some(tokio::spawn(scan(events, on_event).in_current_span()));
        info!(interfaces = ?config.interfaces, "mDNS scan started");
        Ok(discovery)
    }
}

/// Reads browse events for [`Discovery::scan`].
async fn scan(events: mdns_sd::Receiver<ServiceEvent>, on_event: ScanCallback) {
    let mut instances: BTreeMap<String, NodeId> = BTreeMap::new();
    while let Ok(event) = events.recv_async().await {
        match event {
            ServiceEvent::ServiceResolved(service) => match read_service(&service) {
                Ok(seen) => {
                    if instances.len() < INSTANCES_MAX || instances.contains_key(&service.fullname)
                    {
                        instances.insert(service.fullname.clone(), seen.id);
                    }
                    on_event(ScanEvent::Seen(seen));
                }
                Err(reason) => {
                    debug!(instance = %service.fullname, %reason, "mDNS: unreadable announcement");
                }
            },
            ServiceEvent::ServiceRemoved(_, fullname) => {
                if let Some(id) = instances.remove(&fullname) {
                    on_event(ScanEvent::Gone(id));
                }
            }
            ServiceEvent::SearchStopped(_) => break,
            _ => {}
        }
    }
}

/// Reads the daemon's browse events until it stops, turning them into [`DiscoveryEvent`]s.
async fn browse(
    events: mdns_sd::Receiver<ServiceEvent>,
    local: Announcement,
    on_event: DiscoveryCallback,
) {
    // Instance full name → node id, to name the node of a removal.
    let mut instances: BTreeMap<String, NodeId> = BTreeMap::new();
    while let Ok(event) = events.recv_async().await {
        match event {
            ServiceEvent::ServiceResolved(service) => {
                match read_service(&service).and_then(|seen| admit(seen, &local)) {
                    Ok(peer) => {
                        if instances.len() < INSTANCES_MAX
                            || instances.contains_key(&service.fullname)
                        {
                            instances.insert(service.fullname.clone(), peer.id);
                        } else {
                            warn!(
                                limit = INSTANCES_MAX,
                                "mDNS: too many instances to track removals"
                            );
                        }
                        debug!(peer = %peer, "mDNS: discovered");
                        on_event(DiscoveryEvent::Discovered(peer));
                    }
                    Err(Ignored::Own) => {}
                    Err(reason) => {
                        debug!(instance = %service.fullname, %reason, "mDNS: ignored announcement");
                    }
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                if let Some(id) = instances.remove(&fullname) {
                    debug!(peer = %id.short(), "mDNS: vanished");
                    on_event(DiscoveryEvent::Vanished(id));
                }
            }
            ServiceEvent::SearchStopped(_) => break,
            _ => {}
        }
    }
}

/// The parts of a resolved instance that matter.
struct Record<'a, I> {
    id: Option<&'a str>,
    mesh: Option<&'a str>,
    versions: Option<&'a str>,
    port: u16,
    ips: I,
}

/// Why an announcement was ignored.
#[derive(Debug, PartialEq, Eq)]
enum Ignored {
    Own,
    Malformed(&'static str),
    OtherMesh(String),
    Incompatible(String),
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Own => f.write_str("our own announcement"),
            Self::Malformed(what) => write!(f, "malformed record: {what}"),
            Self::OtherMesh(mesh) => write!(f, "another mesh ({mesh:?})"),
            Self::Incompatible(versions) => write!(
                f,
                "protocol versions {versions} do not overlap ours ({PROTOCOL_VERSION_MIN}-{PROTOCOL_VERSION_MAX})"
            ),
        }
    }
}

/// A node seen on the network, whatever its mesh (what `weft discover` lists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    /// The announced node id (a claim until a handshake proves it).
    pub id: NodeId,
    /// The announced mesh.
    pub mesh: String,
    /// Lowest protocol version it speaks.
    pub version_min: u16,
    /// Highest protocol version it speaks.
    pub version_max: u16,
    /// Every advertised address with the port, sorted.
    pub addrs: Vec<SocketAddr>,
}

/// Reads a resolved instance's records, whatever its mesh and versions.
fn parse<I: Iterator<Item = IpAddr>>(record: Record<'_, I>) -> Result<Sighting, Ignored> {
    let id = record.id.ok_or(Ignored::Malformed("no id"))?;
    let id = NodeId::from_str(id).map_err(|_| Ignored::Malformed("bad id"))?;
    let mesh = record.mesh.ok_or(Ignored::Malformed("no mesh"))?.to_owned();
    let versions = record.versions.ok_or(Ignored::Malformed("no version"))?;
    let (version_min, version_max) = versions
        .split_once('-')
        .and_then(|(min, max)| Some((min.parse::<u16>().ok()?, max.parse::<u16>().ok()?)))
        .filter(|(min, max)| min <= max)
        .ok_or(Ignored::Malformed("bad version range"))?;
    if record.port == 0 {
        return Err(Ignored::Malformed("port 0"));
    }
    let mut addrs: Vec<SocketAddr> = record
        .ips
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .map(|ip| SocketAddr::new(ip, record.port))
        .collect();
    // Deterministic order (the daemon hands a hash set).
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(Ignored::Malformed("no usable address"));
    }
    Ok(Sighting {
        id,
        mesh,
        version_min,
        version_max,
        addrs,
    })
}

/// Reads a resolved instance from the daemon.
fn read_service(service: &mdns_sd::ResolvedService) -> Result<Sighting, Ignored> {
    parse(Record {
        id: service.get_property_val_str("id"),
        mesh: service.get_property_val_str("mesh"),
        versions: service.get_property_val_str("v"),
        port: service.get_port(),
        ips: service.get_addresses().iter().map(|ip| ip.to_ip_addr()),
    })
}

/// Decides whether a resolved instance is a peer worth dialing.
#[cfg(test)]
fn judge<I: Iterator<Item = IpAddr>>(
    record: Record<'_, I>,
    local: &Announcement,
) -> Result<NodeAddr, Ignored> {
    admit(parse(record)?, local)
}

/// Whether a sighting is a peer of ours worth dialing.
fn admit(seen: Sighting, local: &Announcement) -> Result<NodeAddr, Ignored> {
    if seen.id == local.id {
        return Err(Ignored::Own);
    }
    if seen.mesh != local.mesh {
        return Err(Ignored::OtherMesh(seen.mesh));
    }
    if seen.version_min > PROTOCOL_VERSION_MAX || seen.version_max < PROTOCOL_VERSION_MIN {
        return Err(Ignored::Incompatible(format!(
            "{}-{}",
            seen.version_min, seen.version_max
        )));
    }
    Ok(NodeAddr {
        id: seen.id,
        addrs: seen.addrs,
    })
}

/// Measures the round trip to node `node` at `addr` (for `weft discover`'s RTT column): a QUIC +
/// TLS handshake from a throwaway identity, which also proves the node holds the announced key,
/// closed at once without a hello (the node logs it at debug level and counts nothing).
pub async fn probe_rtt(
    addr: std::net::SocketAddr,
    node: weft_proto::NodeId,
    timeout: std::time::Duration,
) -> Result<std::time::Duration, crate::error::ConnectError> {
    probe(addr, node, timeout).await
}

/// Measures the round trip to the node `expected` at `addr`: a QUIC + TLS handshake from a
/// throwaway identity and endpoint, which proves the node's key, then closed at once (the node
/// logs it at debug level and counts nothing). Returns quinn's RTT estimate.
async fn probe(
    addr: SocketAddr,
    expected: NodeId,
    timeout: Duration,
) -> Result<Duration, ConnectError> {
    let identity = crate::identity::Identity::generate()
        .map_err(|e| ConnectError::Handshake(format!("probe identity: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = crate::tls::client_config(&identity, expected, provider)
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| ConnectError::Handshake(format!("probe socket: {e}")))?;
    let attempt = async {
        let connection = endpoint.connect_with(config, addr, "weft")?.await?;
        let rtt = connection.rtt();
        connection.close(crate::close_code::PROBE, b"rtt probe");
        Ok::<_, ConnectError>(rtt)
    };
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Handshake(format!(
            "no handshake within {timeout:?}"
        ))),
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This build's protocol versions as a TXT record states them.
    const VERSIONS: &str = "4-4";

    fn id(byte: u8) -> NodeId {
        NodeId::from_bytes([byte; 32])
    }

    fn local() -> Announcement {
        Announcement {
            id: id(1),
            mesh: "shop".into(),
            addr: "127.0.0.1:7450".parse().unwrap(),
        }
    }

    fn record<'a>(
        id: Option<&'a str>,
        mesh: Option<&'a str>,
        versions: Option<&'a str>,
    ) -> Record<'a, std::vec::IntoIter<IpAddr>> {
        Record {
            id,
            mesh,
            versions,
            port: 7451,
            ips: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()].into_iter(),
        }
    }

    #[test]
    fn a_valid_record_yields_every_address_with_the_port() {
        let other = id(2).to_string();
        assert_eq!(
            VERSIONS,
            format!("{PROTOCOL_VERSION_MIN}-{PROTOCOL_VERSION_MAX}")
        );
        let peer = judge(record(Some(&other), Some("shop"), Some(VERSIONS)), &local()).unwrap();
        assert_eq!(peer.id, id(2));
        assert_eq!(
            peer.addrs,
            vec![
                "127.0.0.1:7451".parse::<SocketAddr>().unwrap(),
                "[::1]:7451".parse().unwrap()
            ]
        );
    }

    #[test]
    fn own_other_mesh_incompatible_and_malformed_records_are_ignored() {
        let own = id(1).to_string();
        let other = id(2).to_string();
        let l = local();
        assert_eq!(
            judge(record(Some(&own), Some("shop"), Some(VERSIONS)), &l),
            Err(Ignored::Own)
        );
        assert!(matches!(
            judge(record(Some(&other), Some("bank"), Some(VERSIONS)), &l),
            Err(Ignored::OtherMesh(_))
        ));
        assert!(matches!(
            judge(record(Some(&other), Some("shop"), Some("7-9")), &l),
            Err(Ignored::Incompatible(_))
        ));
        for bad in [
            record(None, Some("shop"), Some(VERSIONS)),
            record(Some("nonsense"), Some("shop"), Some(VERSIONS)),
            record(Some(&other), None, Some(VERSIONS)),
            record(Some(&other), Some("shop"), None),
            record(Some(&other), Some("shop"), Some("1")),
            record(Some(&other), Some("shop"), Some("2-1")),
            record(Some(&other), Some("shop"), Some("a-b")),
        ] {
            assert!(matches!(judge(bad, &l), Err(Ignored::Malformed(_))));
        }
        let mut no_port = record(Some(&other), Some("shop"), Some(VERSIONS));
        no_port.port = 0;
        assert!(matches!(judge(no_port, &l), Err(Ignored::Malformed(_))));
        let mut no_addr = record(Some(&other), Some("shop"), Some(VERSIONS));
        no_addr.ips = vec!["0.0.0.0".parse().unwrap()].into_iter();
        assert!(matches!(judge(no_addr, &l), Err(Ignored::Malformed(_))));
    }

    #[test]
    fn overlapping_version_ranges_are_compatible() {
        let other = id(2).to_string();
        let wide = format!("0-{}", PROTOCOL_VERSION_MAX + 5);
        assert!(judge(record(Some(&other), Some("shop"), Some(&wide)), &local()).is_ok());
    }

    #[test]
    fn service_types_are_checked() {
        assert!(check_service_type(SERVICE_TYPE_DEFAULT).is_ok());
        assert!(check_service_type("_weft-t12345678._udp.local.").is_ok());
        for bad in [
            "_weft._tcp.local.",
            "weft._udp.local.",
            "_._udp.local.",
            "_this-is-far-too-long._udp.local.",
            "_weft._udp.local",
        ] {
            assert!(check_service_type(bad).is_err(), "{bad}");
        }
    }
}
