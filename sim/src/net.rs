//! quinn over turmoil: a [`quinn::AsyncUdpSocket`] backed by turmoil's simulated UDP.
//!
//! quinn takes any socket through [`quinn::Endpoint::new_with_abstract_socket`]; with this one the
//! unmodified node code runs on turmoil's network (latency, loss, partitions, holds), and with
//! [`quinn::TokioRuntime`] its timers run on turmoil's simulated clock.
//!
//! turmoil's socket has no poll API and no offloads, which shapes the adapter:
//! - `readable()` holds the socket's internal receive lock while pending, and `try_recv_from`
//!   only `try_lock`s it, so a receive attempted while a `readable()` future is alive fails with a
//!   spurious `WouldBlock`. The adapter keeps exactly one stored `readable()` future and receives
//!   only before creating it or after it resolved (and was dropped).
//! - There is no GSO, GRO or ECN: one datagram per segment, `stride = len`, `ecn = None`.
//! - A sender never blocks, so the [`quinn::UdpPoller`] is always ready.
//! - There is no MTU: the socket reports `may_fragment() == false`, so quinn's path MTU discovery
//!   runs (and climbs to its 1452-byte ceiling).
//! - A socket bound to `0.0.0.0` reports `0.0.0.0`; quinn should see the host's simulated address,
//!   which turmoil does not expose to the host itself, so [`TurmoilUdpSocket::bind`] discovers it.

use std::{
    fmt,
    future::Future,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use quinn::udp::{RecvMeta, Transmit};

/// The stored "wait until a datagram is queued" future; it owns a handle to the socket so it can
/// live between `poll_recv` calls.
type ReadableFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A quinn socket on turmoil's simulated network.
///
/// Create it with [`TurmoilUdpSocket::bind`] inside a turmoil host and hand it to
/// [`quinn::Endpoint::new_with_abstract_socket`] together with `Arc::new(quinn::TokioRuntime)`.
/// All of its methods must run inside that host (quinn's endpoint driver does).
pub struct TurmoilUdpSocket {
    /// The simulated socket; shared with the stored `readable()` future.
    socket: Arc<turmoil::net::UdpSocket>,
    /// The host's simulated IP and the bound port: what quinn sees as its local address.
    local_addr: SocketAddr,
    /// At most one pending `readable()` future. While it is `Some` nothing may call
    /// `try_recv_from` (see the module doc).
    readable: Mutex<Option<ReadableFuture>>,
}

impl fmt::Debug for TurmoilUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurmoilUdpSocket")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl TurmoilUdpSocket {
    /// Binds a simulated UDP socket on the current turmoil host.
    ///
    /// `addr` is what the node would bind on a real machine: the unspecified address (`0.0.0.0`
    /// or `::`), the host's own simulated IP (`turmoil::lookup(host_name)`), or a loopback address;
    /// port 0 picks an ephemeral port. turmoil itself binds only unspecified or loopback addresses,
    /// so for the first two the socket is bound on the unspecified address and reports the host's
    /// IP, found by a loopback probe that costs one simulation tick. A specific IP that is not
    /// this host's fails with `AddrNotAvailable`, like a real bind.
    ///
    /// Panics (in turmoil) when called outside a turmoil host.
    pub async fn bind(addr: SocketAddr) -> io::Result<Arc<TurmoilUdpSocket>> {
        let local_addr;
        let socket;
        if addr.ip().is_loopback() {
            socket = turmoil::net::UdpSocket::bind(addr).await?;
            local_addr = socket.local_addr()?;
        } else {
            let unspecified = unspecified_like(addr.ip());
            // Bound before the probe, so that port 0 gets the same ephemeral port as a plain bind.
            socket =
                turmoil::net::UdpSocket::bind(SocketAddr::new(unspecified, addr.port())).await?;
            let host_ip = discover_host_ip(unspecified).await?;
            if !addr.ip().is_unspecified() && addr.ip() != host_ip {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!(
                        "{} is not this turmoil host's address ({host_ip})",
                        addr.ip()
                    ),
                ));
            }
            local_addr = SocketAddr::new(host_ip, socket.local_addr()?.port());
        }
        Ok(Arc::new(TurmoilUdpSocket {
            socket: Arc::new(socket),
            local_addr,
            readable: Mutex::new(None),
        }))
    }
}

impl quinn::AsyncUdpSocket for TurmoilUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    /// Sends each segment as one datagram. Like quinn-udp on a real socket, a failed send (here:
    /// no link to the destination) loses the datagram instead of failing the connection.
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let segment_size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for datagram in transmit.contents.chunks(segment_size) {
            if let Err(error) = self.socket.try_send_to(datagram, transmit.destination) {
                tracing::debug!(
                    local = %self.local_addr,
                    destination = %transmit.destination,
                    %error,
                    "simulated datagram not sent"
                );
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut readable = self
            .readable
            .lock()
            .expect("readable future mutex poisoned");
        loop {
            if let Some(future) = readable.as_mut() {
                let ready = match future.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(ready) => ready,
                };
                // Dropping the resolved future releases turmoil's receive lock.
                *readable = None;
                ready?;
            }

            let mut received = 0;
            for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
                match self.socket.try_recv_from(buf) {
                    Ok((len, origin)) => {
                        *meta = RecvMeta {
                            addr: origin,
                            len,
                            stride: len,
                            ecn: None,
                            dst_ip: Some(self.local_addr.ip()),
                        };
                        received += 1;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) if received == 0 => return Poll::Ready(Err(error)),
                    Err(_) => break,
                }
            }
            if received > 0 {
                return Poll::Ready(Ok(received));
            }

            // Queue empty: wait for the next datagram, then try again.
            let socket = Arc::clone(&self.socket);
            *readable = Some(Box::pin(async move { socket.readable().await }));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// turmoil never blocks a sender, so there is never anything to wait for.
#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Payload of the address probe; anything else arriving on the probe socket is ignored.
const PROBE_PAYLOAD: &[u8] = b"weft-sim host address probe";

/// Datagrams the probe socket reads before giving up on seeing its own probe. It is bound on a
/// fresh ephemeral port that no peer knows, so the first datagram is expected to be the probe.
const PROBE_DATAGRAMS_MAX: usize = 8;

/// Simulated time the probe may take; turmoil delivers a looped-back datagram after one tick.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Distinguishes the multicast groups of concurrent probes (on any host, in any simulation in this
/// process), so a probe is never delivered to another host. Only uniqueness matters: the group
/// never reaches quinn, so it does not affect determinism.
static NEXT_PROBE_GROUP: AtomicU32 = AtomicU32::new(0);

/// The host's simulated IP. turmoil does not expose it to the host's own software, but it stamps it
/// as the source of any datagram sent from an unspecified address: a probe sent to a multicast
/// group that only the probe socket joined, with multicast loop on, comes back from that address.
async fn discover_host_ip(unspecified: IpAddr) -> io::Result<IpAddr> {
    let probe = turmoil::net::UdpSocket::bind(SocketAddr::new(unspecified, 0)).await?;
    let port = probe.local_addr()?.port();
    let [_, high, middle, low] = NEXT_PROBE_GROUP
        .fetch_add(1, Ordering::Relaxed)
        .to_be_bytes();
    let group = match unspecified {
        IpAddr::V4(_) => {
            // 239/8: administratively scoped multicast.
            let group = Ipv4Addr::new(239, high, middle, low);
            probe.join_multicast_v4(group, Ipv4Addr::UNSPECIFIED)?;
            probe.set_multicast_loop_v4(true)?;
            IpAddr::V4(group)
        }
        IpAddr::V6(_) => {
            // ff15::/16: transient, site-local scope.
            let group = Ipv6Addr::new(
                0xff15,
                0,
                0,
                0,
                0,
                0,
                u16::from(high),
                u16::from_be_bytes([middle, low]),
            );
            probe.join_multicast_v6(&group, 0)?;
            probe.set_multicast_loop_v6(true)?;
            IpAddr::V6(group)
        }
    };
    probe.send_to(PROBE_PAYLOAD, (group, port)).await?;

    let mut buffer = [0u8; PROBE_PAYLOAD.len() + 1];
    for _ in 0..PROBE_DATAGRAMS_MAX {
        let (len, origin) = tokio::time::timeout(PROBE_TIMEOUT, probe.recv_from(&mut buffer))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "host address probe never came back",
                )
            })??;
        if &buffer[..len] == PROBE_PAYLOAD && origin.port() == port {
            return Ok(origin.ip());
        }
    }
    Err(io::Error::other(
        "host address probe drowned in foreign datagrams",
    ))
}

/// The unspecified address of `ip`'s family.
fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::AsyncUdpSocket;
    use std::future::poll_fn;

    /// The adapter reports the host's address, delivers datagrams both ways and keeps receiving
    /// after its stored `readable()` future resolved.
    #[test]
    fn reports_host_address_and_exchanges_datagrams() {
        let mut sim = turmoil::Builder::new()
            .rng_seed(1)
            .simulation_duration(Duration::from_secs(5))
            .min_message_latency(Duration::from_millis(2))
            .max_message_latency(Duration::from_millis(2))
            .build();

        sim.host("echo", || async {
            let socket = TurmoilUdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5000).into()).await?;
            assert_eq!(socket.local_addr()?, (turmoil::lookup("echo"), 5000).into());
            let mut buffer = vec![0u8; 2048];
            loop {
                let mut meta = [RecvMeta::default()];
                let received = poll_fn(|cx| {
                    let mut bufs = [IoSliceMut::new(&mut buffer)];
                    socket.poll_recv(cx, &mut bufs, &mut meta)
                })
                .await?;
                assert_eq!(received, 1);
                let [meta] = meta;
                assert_eq!(meta.stride, meta.len);
                socket.try_send(&Transmit {
                    destination: meta.addr,
                    ecn: None,
                    contents: &buffer[..meta.len],
                    segment_size: None,
                    src_ip: None,
                })?;
            }
        });

        sim.client("caller", async {
            let caller_ip = turmoil::lookup("caller");
            // A specific IP that is not ours is refused, ours is accepted.
            let wrong = TurmoilUdpSocket::bind((turmoil::lookup("echo"), 0).into()).await;
            assert_eq!(
                wrong.map(|_| ()).map_err(|error| error.kind()),
                Err(io::ErrorKind::AddrNotAvailable)
            );
            let socket = TurmoilUdpSocket::bind((caller_ip, 0).into()).await?;
            assert_eq!(socket.local_addr()?.ip(), caller_ip);
            assert_ne!(socket.local_addr()?.port(), 0);

            let echo: SocketAddr = (turmoil::lookup("echo"), 5000).into();
            for round in 0..3u8 {
                let payload = [round; 300];
                socket.try_send(&Transmit {
                    destination: echo,
                    ecn: None,
                    contents: &payload,
                    segment_size: None,
                    src_ip: None,
                })?;
                let mut buffer = vec![0u8; 2048];
                let mut meta = [RecvMeta::default()];
                poll_fn(|cx| {
                    let mut bufs = [IoSliceMut::new(&mut buffer)];
                    socket.poll_recv(cx, &mut bufs, &mut meta)
                })
                .await?;
                assert_eq!(meta[0].addr, echo);
                assert_eq!(&buffer[..meta[0].len], &payload[..]);
            }
            Ok(())
        });

        sim.run().expect("simulation failed");
    }
}
