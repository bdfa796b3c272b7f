//! Establishing a connection: QUIC + TLS (which proves both node ids), then the hello exchange
//! (mesh, versions). Only after a welcome does a connection reach its peer's link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tracing::{debug, info, warn};
use weft_proto::frame::{Frame, FrameDecoder, FrameEncoder, Limits, Refusal, RefuseReason};
use weft_proto::handshake::{judge_hello, local_hello, ADMISSION_EXPORTER_LABEL};
use weft_proto::NodeId;

use crate::config::{NodeConfig, Seams};
use crate::error::ConnectError;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::tls;

pub(crate) use crate::close_code;

/// What the handshakes need of the node (implemented by the node's shared state): the module
/// depends on this narrow interface, not on the node, so the node's modules and this one do
/// not import each other.
pub(crate) trait Context: Send + Sync + 'static {
    /// The node's settings (mesh, admission, handshake timeout, peer bound).
    fn config(&self) -> &NodeConfig;
    /// This node's id.
    fn local_id(&self) -> NodeId;
    /// This incarnation's start time, announced in every hello.
    fn incarnation(&self) -> u64;
    /// The key TLS proves.
    fn identity(&self) -> &Identity;
    /// The crypto provider for TLS configurations.
    fn provider(&self) -> &Arc<rustls::crypto::CryptoProvider>;
    /// The QUIC transport settings.
    fn transport(&self) -> &Arc<quinn::TransportConfig>;
    /// The runtime seams (the simulation's seeded connection ids).
    fn seams(&self) -> &Seams;
    /// The endpoint to dial with, until the node shuts down.
    fn endpoint(&self) -> Result<quinn::Endpoint, EndpointClosed>;
    /// Counters.
    fn metrics(&self) -> &Metrics;
    /// Whether the node is stopping (new peers are refused).
    fn is_shutting_down(&self) -> bool;
    /// Hands an accepted connection to its peer's link; gives it back if the node cannot take
    /// another peer.
    fn attach(
        self: &Arc<Self>,
        peer: NodeId,
        established: Established,
    ) -> Result<(), Box<Established>>;
}

/// The node was shut down (or dropped): it has no endpoint any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndpointClosed;

impl From<EndpointClosed> for crate::error::ConnectError {
    fn from(_: EndpointClosed) -> Self {
        // What quinn answers a dial on a closed endpoint.
        Self::Dial(quinn::ConnectError::EndpointStopping)
    }
}

impl From<EndpointClosed> for std::io::Error {
    fn from(_: EndpointClosed) -> Self {
        std::io::Error::new(std::io::ErrorKind::NotConnected, "the node is shut down")
    }
}

/// Hellos are small; a peer announcing a bigger first frame is not speaking our protocol.
const HELLO_LIMITS: Limits = Limits {
    max_body_bytes: 0,
    max_header_bytes: 4_096,
};

/// A connection whose hello exchange succeeded, ready for its peer's link.
#[derive(Debug)]
pub(crate) struct Established {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// Bytes read past the hello: the beginning of the peer's link frames.
    pub leftover: BytesMut,
    pub dialed_by_local: bool,
    pub remote: SocketAddr,
    /// The peer's incarnation, from its hello (see [`weft_proto::frame::Hello::incarnation`]).
    pub peer_incarnation: u64,
}

async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), ConnectError> {
    let mut buf = BytesMut::new();
    FrameEncoder::new(HELLO_LIMITS)
        .control(&mut buf, frame)
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    send.write_all(&buf)
        .await
        .map_err(|e| ConnectError::Handshake(format!("write: {e}")))
}

async fn read_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Frame, ConnectError> {
    let decoder = FrameDecoder::new(HELLO_LIMITS);
    loop {
        if let Some(frame) = decoder
            .decode(buf)
            .map_err(|e| ConnectError::Handshake(format!("first frame: {e}")))?
        {
            return Ok(frame);
        }
        match recv.read_chunk(HELLO_LIMITS.max_frame_bytes(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(ConnectError::Handshake("stream ended during hello".into())),
            Err(e) => return Err(ConnectError::Handshake(format!("read: {e}"))),
        }
    }
}

/// The node the TLS handshake proved; a connection without one is closed.
fn proven_peer(connection: &quinn::Connection) -> Result<NodeId, ConnectError> {
    tls::peer_node_id(connection).ok_or_else(|| {
        connection.close(close_code::PROTOCOL, b"no node identity");
        ConnectError::Handshake("peer presented no Ed25519 key".into())
    })
}

/// 32 bytes both ends of this TLS session derive alike (RFC 8446 §7.5), to bind the mesh-secret
/// proof to this connection.
fn session_bytes(connection: &quinn::Connection) -> Result<[u8; 32], ConnectError> {
    let mut out = [0u8; 32];
    connection
        .export_keying_material(&mut out, ADMISSION_EXPORTER_LABEL, b"")
        .map_err(|_| ConnectError::Handshake("TLS keying-material exporter unavailable".into()))?;
    Ok(out)
}

/// This node's hello for a connection.
fn our_hello(shared: &impl Context, session: &[u8; 32]) -> Frame {
    let proof = shared.config().admission.proof(session, &shared.local_id());
    Frame::Hello(local_hello(
        &shared.config().mesh,
        shared.local_id(),
        shared.incarnation(),
        proof,
    ))
}

fn client_config(
    shared: &impl Context,
    expected: Option<NodeId>,
) -> Result<quinn::ClientConfig, ConnectError> {
    let provider = Arc::clone(shared.provider());
    let tls = match expected {
        Some(expected) => tls::client_config(shared.identity(), expected, provider),
        None => tls::client_config_unpinned(shared.identity(), provider),
    }
    .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::clone(shared.transport()));
    if let Some(provider) = &shared.seams().initial_dst_cid_provider {
        config.initial_dst_cid_provider(Arc::clone(provider));
    }
    Ok(config)
}

/// Dials `peer` at `addr`, pinning its id, and runs the hello exchange.
pub(crate) async fn dial<C: Context>(
    shared: Arc<C>,
    peer: NodeId,
    addr: SocketAddr,
) -> Result<Established, ConnectError> {
    dial_to(shared, Some(peer), addr)
        .await
        .map(|(_, established)| established)
}

/// Dials `addr`, pinning `expected` if given (else accepting whichever node answers, as for a
/// seed address), and runs the hello exchange. Returns the node the handshake proved.
pub(crate) async fn dial_to<C: Context>(
    shared: Arc<C>,
    expected: Option<NodeId>,
    addr: SocketAddr,
) -> Result<(NodeId, Established), ConnectError> {
    let timeout = shared.config().handshake_timeout;
    let attempt = async {
        let config = client_config(&*shared, expected)?;
        let endpoint = shared.endpoint()?;
        let connection = endpoint.connect_with(config, addr, "weft")?;
        // Not held while the handshake runs (the shutdown may be releasing the socket).
        drop(endpoint);
        let connection = connection.await?;
        let peer = proven_peer(&connection)?;
        let session = session_bytes(&connection)?;
        let (mut send, mut recv) = connection.open_bi().await?;
        write_frame(&mut send, &our_hello(&*shared, &session)).await?;
        let mut leftover = BytesMut::new();
        let peer_incarnation = match read_frame(&mut recv, &mut leftover).await? {
            Frame::Welcome(hello) => {
                let admission = &shared.config().admission;
                let judged = judge_hello(&shared.config().mesh, admission, &session, &peer, &hello);
                // (Counted and logged by the peer task, which gets the refusal as a dial failure.)
                if let Err(refusal) = judged {
                    connection.close(close_code::REFUSED, refusal.detail.as_bytes());
                    return Err(ConnectError::RefusedPeer(refusal));
                }
                hello.incarnation
            }
            Frame::Refuse(refusal) => return Err(ConnectError::Refused(refusal)),
            other => {
                connection.close(close_code::PROTOCOL, b"expected welcome");
                return Err(ConnectError::Handshake(format!(
                    "expected welcome, got {other:?}"
                )));
            }
        };
        Ok((
            peer,
            Established {
                connection,
                send,
                recv,
                leftover,
                dialed_by_local: true,
                remote: addr,
                peer_incarnation,
            },
        ))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Handshake(format!(
            "no welcome within {timeout:?}"
        ))),
    }
}

/// Runs the acceptor's side for one incoming connection and hands it to the peer's link.
pub(crate) async fn accept<C: Context>(shared: Arc<C>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let timeout = shared.config().handshake_timeout;
    let result = tokio::time::timeout(timeout, accept_inner(&*shared, incoming)).await;
    match result {
        Ok(Ok((peer, established))) => {
            if let Err(established) = shared.attach(peer, established) {
                refuse(
                    &*shared,
                    *established,
                    Refusal {
                        reason: RefuseReason::TooManyPeers,
                        detail: format!("node already tracks {} peers", shared.config().peers_max),
                    },
                )
                .await;
            }
        }
        // A refusal was counted and logged before it was sent.
        Ok(Err(ConnectError::RefusedPeer(_))) => {}
        Ok(Err(ConnectError::Connection(quinn::ConnectionError::ApplicationClosed(close))))
            if close.error_code == close_code::PROBE =>
        {
            debug!(%remote, "round-trip probe");
        }
        Ok(Err(e)) => {
            shared.metrics().dial_failure();
            info!(%remote, error = %e, "incoming connection failed");
        }
        Err(_) => info!(%remote, "incoming connection: no hello within {timeout:?}"),
    }
}

async fn accept_inner(
    shared: &impl Context,
    incoming: quinn::Incoming,
) -> Result<(NodeId, Established), ConnectError> {
    let connection = incoming.await?;
    let remote = connection.remote_address();
    let peer = proven_peer(&connection)?;
    let session = session_bytes(&connection)?;
    let (mut send, mut recv) = connection.accept_bi().await?;
    let mut leftover = BytesMut::new();
    let hello = match read_frame(&mut recv, &mut leftover).await {
        Ok(Frame::Hello(hello)) => hello,
        Ok(other) => {
            let refusal = Refusal {
                reason: RefuseReason::ProtocolViolation,
                detail: format!("first frame must be a hello, got {other:?}"),
            };
            write_refusal(shared, &mut send, &connection, &refusal).await;
            return Err(ConnectError::RefusedPeer(refusal));
        }
        Err(e) => {
            connection.close(close_code::PROTOCOL, b"bad hello");
            return Err(e);
        }
    };
    let admission = &shared.config().admission;
    if let Err(refusal) = judge_hello(&shared.config().mesh, admission, &session, &peer, &hello) {
        write_refusal(shared, &mut send, &connection, &refusal).await;
        return Err(ConnectError::RefusedPeer(refusal));
    }
    if shared.is_shutting_down() {
        let refusal = Refusal {
            reason: RefuseReason::ShuttingDown,
            detail: "node is shutting down".into(),
        };
        write_refusal(shared, &mut send, &connection, &refusal).await;
        return Err(ConnectError::RefusedPeer(refusal));
    }
    write_frame(
        &mut send,
        &Frame::Welcome(local_hello(
            &shared.config().mesh,
            shared.local_id(),
            shared.incarnation(),
            admission.proof(&session, &shared.local_id()),
        )),
    )
    .await?;
    debug!(peer = %peer.short(), %remote, "accepted");
    Ok((
        peer,
        Established {
            connection,
            send,
            recv,
            leftover,
            dialed_by_local: false,
            remote,
            peer_incarnation: hello.incarnation,
        },
    ))
}

async fn refuse(shared: &impl Context, mut established: Established, refusal: Refusal) {
    write_refusal(
        shared,
        &mut established.send,
        &established.connection,
        &refusal,
    )
    .await;
}

/// Counts and logs the refusal, then tells the peer why and closes.
async fn write_refusal(
    shared: &impl Context,
    send: &mut quinn::SendStream,
    connection: &quinn::Connection,
    refusal: &Refusal,
) {
    shared.metrics().refusal();
    warn!(remote = %connection.remote_address(), %refusal, "refusing peer");
    // Best effort: the refusal frame tells the dialer why; the close follows either way.
    let _ = write_frame(send, &Frame::Refuse(refusal.clone())).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    connection.close(close_code::REFUSED, refusal.detail.as_bytes());
}
