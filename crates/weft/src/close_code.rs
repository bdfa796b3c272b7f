//! QUIC application close codes: why a connection was closed, as the peer sees it.

use quinn::VarInt;
/// The node is shutting down.
pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
/// A newer or preferred connection to the same peer replaced this one.
pub const DUPLICATE: VarInt = VarInt::from_u32(1);
/// The hello was refused.
pub const REFUSED: VarInt = VarInt::from_u32(2);
/// The peer broke the protocol.
pub const PROTOCOL: VarInt = VarInt::from_u32(3);
/// An RTT probe (`weft discover`): closed on purpose right after the TLS handshake.
pub const PROBE: VarInt = VarInt::from_u32(4);
