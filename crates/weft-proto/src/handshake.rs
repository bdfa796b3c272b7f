//! Connection admission: judging a peer's hello, and choosing between two connections to one peer.
//!
//! # Mesh secret
//! A mesh may require a shared secret. Knowing it is proven per connection, never by sending it:
//! both ends derive the same 32 session bytes from the TLS keying-material exporter (RFC 5705 /
//! 8446 §7.5) of *this* connection, and each sends `keyed_blake3(key(secret), session ‖ own id)`.
//! The proof is useless on any other connection (another session) and cannot be reflected back
//! (it names its sender), and a peer without the secret learns nothing it could reuse.

use std::collections::BTreeSet;
use std::fmt;

use crate::frame::{Hello, Refusal, RefuseReason, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use crate::id::NodeId;

/// TLS exporter label for the session bytes the mesh-secret proof is bound to.
pub const ADMISSION_EXPORTER_LABEL: &[u8] = b"EXPORTER-weft-mesh-admission-v1";

/// What a node requires of its peers beyond a valid TLS identity and the same mesh name.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Key derived from the mesh secret; peers must prove they know the secret.
    secret_key: Option<[u8; 32]>,
    /// Only these nodes are admitted (`None`: any node of the mesh).
    pub allow: Option<BTreeSet<NodeId>>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("secret", &self.secret_key.map(|_| "<set>"))
            .field("allow", &self.allow)
            .finish()
    }
}

impl Admission {
    /// Requires peers to prove they know `secret` (any length; it is hashed into a key).
    pub fn with_secret(mut self, secret: &[u8]) -> Self {
        self.secret_key = Some(blake3::derive_key("weft 2026 mesh secret", secret));
        self
    }

    /// Admits only these nodes.
    pub fn with_allow_list(mut self, nodes: impl IntoIterator<Item = NodeId>) -> Self {
        self.allow = Some(nodes.into_iter().collect());
        self
    }

    /// Whether a mesh secret is configured.
    pub fn has_secret(&self) -> bool {
        self.secret_key.is_some()
    }

    /// This node's proof for a connection whose exporter gave `session`, if a secret is set.
    pub fn proof(&self, session: &[u8; 32], local: &NodeId) -> Option<[u8; 32]> {
        self.secret_key.map(|key| mesh_proof(&key, session, local))
    }
}

/// `keyed_blake3(key, session ‖ node)`: proves knowledge of the key on one session, for one node.
pub fn mesh_proof(key: &[u8; 32], session: &[u8; 32], node: &NodeId) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(session);
    hasher.update(node.as_bytes());
    *hasher.finalize().as_bytes()
}

/// The hello this node sends: `incarnation` is when this run of the node started (see
/// [`Hello::incarnation`]), `proof` its mesh-secret proof if it has a secret.
pub fn local_hello(
    mesh: &str,
    node_id: NodeId,
    incarnation: u64,
    proof: Option<[u8; 32]>,
) -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        mesh: mesh.to_owned(),
        node_id,
        incarnation,
        proof,
    }
}

/// Decides whether a peer's hello is acceptable. `proven` is the id the TLS handshake proved; the
/// hello's claims count for nothing until they agree with it; `session` is this connection's
/// exporter output. Returns the negotiated version.
pub fn judge_hello(
    local_mesh: &str,
    admission: &Admission,
    session: &[u8; 32],
    proven: &NodeId,
    hello: &Hello,
) -> Result<u16, Refusal> {
    if hello.node_id != *proven {
        return Err(Refusal {
            reason: RefuseReason::IdentityMismatch,
            detail: format!(
                "hello claims node {} but the TLS handshake proved {}",
                hello.node_id, proven
            ),
        });
    }
    if hello.mesh != local_mesh {
        return Err(Refusal {
            reason: RefuseReason::WrongMesh,
            detail: format!(
                "peer is in mesh {:?}, this node is in mesh {:?}",
                hello.mesh, local_mesh
            ),
        });
    }
    let low = hello.version_min.max(PROTOCOL_VERSION_MIN);
    let high = hello.version_max.min(PROTOCOL_VERSION_MAX);
    if low > high {
        return Err(Refusal {
            reason: RefuseReason::IncompatibleVersion,
            detail: format!(
                "peer speaks protocol {}..={}, this node {}..={}",
                hello.version_min, hello.version_max, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX
            ),
        });
    }
    if let Some(allow) = &admission.allow {
        if !allow.contains(proven) {
            return Err(Refusal {
                reason: RefuseReason::NotAdmitted,
                detail: format!("node {proven} is not on this node's allow-list"),
            });
        }
    }
    if let Some(key) = &admission.secret_key {
        let expected = blake3::Hash::from(mesh_proof(key, session, proven));
        match hello.proof {
            None => {
                return Err(Refusal {
                    reason: RefuseReason::NotAdmitted,
                    detail: "this mesh requires a secret and the peer proved none (configure the mesh secret on it)".into(),
                })
            }
            // `blake3::Hash` compares in constant time.
            Some(proof) if blake3::Hash::from(proof) != expected => {
                return Err(Refusal {
                    reason: RefuseReason::NotAdmitted,
                    detail: "wrong mesh secret (the peer's proof does not match this node's secret)".into(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(high)
}

/// Which of two connections between the same pair of nodes to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Keep the connection already in use; close the new one.
    Existing,
    /// Switch to the new connection; close the existing one.
    New,
}

/// What duplicate resolution knows about one connection to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// This node dialed it (else the peer did).
    pub dialed_by_local: bool,
    /// The peer's incarnation, from its hello or welcome on this connection.
    pub peer_incarnation: u64,
}

/// Chooses between the connection in use and a new one to the same peer, so that both ends keep
/// the same connection without talking about it:
///
/// 1. A connection from a newer incarnation of the peer wins (and one from an older incarnation
///    loses): the peer restarted, so the older connection is dead even if this node has not
///    noticed yet (after latency spikes QUIC's idle timeout stretches to tens of seconds). Only
///    this node holds connections of two incarnations, so nobody has to agree with it.
/// 2. Between connections of the same incarnation (simultaneous dials, redials), the connection
///    dialed by the node with the smaller id wins; between two dialed by the same node, the newer.
///
/// The incarnation is the peer's start time by its wall clock: a peer whose clock stepped back
/// across its restart looks older, and its new connections lose until the old one times out
/// (as every restart did before incarnations were compared).
pub fn resolve_duplicate(
    local: &NodeId,
    remote: &NodeId,
    existing: Candidate,
    new: Candidate,
) -> Keep {
    if new.peer_incarnation != existing.peer_incarnation {
        return if new.peer_incarnation > existing.peer_incarnation {
            Keep::New
        } else {
            Keep::Existing
        };
    }
    if existing.dialed_by_local == new.dialed_by_local {
        return Keep::New;
    }
    let local_is_smaller = local < remote;
    // The winner is the connection whose dialer is the smaller node.
    if new.dialed_by_local == local_is_smaller {
        Keep::New
    } else {
        Keep::Existing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialed(by_local: bool, peer_incarnation: u64) -> Candidate {
        Candidate {
            dialed_by_local: by_local,
            peer_incarnation,
        }
    }

    #[test]
    fn both_ends_keep_the_same_connection() {
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        // One incarnation each; a dialed c1, b dialed c2. At a: c1 is "dialed by local". At b: c2 is.
        let (at_a, at_b) = (7, 5);
        for a_saw_c1_first in [true, false] {
            for b_saw_c1_first in [true, false] {
                let keep_at_a = if a_saw_c1_first {
                    match resolve_duplicate(&a, &b, dialed(true, at_a), dialed(false, at_a)) {
                        Keep::Existing => "c1",
                        Keep::New => "c2",
                    }
                } else {
                    match resolve_duplicate(&a, &b, dialed(false, at_a), dialed(true, at_a)) {
                        Keep::Existing => "c2",
                        Keep::New => "c1",
                    }
                };
                let keep_at_b = if b_saw_c1_first {
                    match resolve_duplicate(&b, &a, dialed(false, at_b), dialed(true, at_b)) {
                        Keep::Existing => "c1",
                        Keep::New => "c2",
                    }
                } else {
                    match resolve_duplicate(&b, &a, dialed(true, at_b), dialed(false, at_b)) {
                        Keep::Existing => "c2",
                        Keep::New => "c1",
                    }
                };
                assert_eq!(keep_at_a, keep_at_b);
                assert_eq!(keep_at_a, "c1", "the smaller node's dial wins");
            }
        }
        // A redial by the same node replaces its earlier connection.
        assert_eq!(
            resolve_duplicate(&a, &b, dialed(true, at_a), dialed(true, at_a)),
            Keep::New
        );
    }

    #[test]
    fn a_restarted_peers_connection_replaces_the_one_of_its_dead_incarnation() {
        let small = NodeId::from_bytes([1; 32]);
        let large = NodeId::from_bytes([2; 32]);
        // Whoever dialed either connection, and whichever node is the smaller: the newer
        // incarnation of the peer wins, and a late connection of the older one never does.
        for (local, remote) in [(small, large), (large, small)] {
            for existing_by_local in [true, false] {
                for new_by_local in [true, false] {
                    let (old, new) = (dialed(existing_by_local, 100), dialed(new_by_local, 200));
                    assert_eq!(resolve_duplicate(&local, &remote, old, new), Keep::New);
                    assert_eq!(resolve_duplicate(&local, &remote, new, old), Keep::Existing);
                }
            }
        }
    }

    #[test]
    fn hello_checks() {
        let id = NodeId::from_bytes([1; 32]);
        let other = NodeId::from_bytes([9; 32]);
        let open = Admission::default();
        let session = [3u8; 32];
        let judge =
            |proven: &NodeId, hello: &Hello| judge_hello("shop", &open, &session, proven, hello);
        assert_eq!(
            judge(&id, &local_hello("shop", id, 1, None)),
            Ok(PROTOCOL_VERSION_MAX)
        );
        let e = judge(&id, &local_hello("bank", id, 1, None)).unwrap_err();
        assert_eq!(e.reason, RefuseReason::WrongMesh);
        let e = judge(&other, &local_hello("shop", id, 1, None)).unwrap_err();
        assert_eq!(e.reason, RefuseReason::IdentityMismatch);
        let mut future = local_hello("shop", id, 1, None);
        future.version_min = 5;
        future.version_max = 9;
        let e = judge(&id, &future).unwrap_err();
        assert_eq!(e.reason, RefuseReason::IncompatibleVersion);
    }

    #[test]
    fn mesh_secret_proofs_bind_secret_session_and_sender() {
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        let mesh = Admission::default().with_secret(b"open sesame");
        let session = [7u8; 32];
        let hello = |admission: &Admission, session: &[u8; 32], sender: NodeId| {
            local_hello("shop", sender, 1, admission.proof(session, &sender))
        };
        // Same secret, same session: admitted.
        assert_eq!(
            judge_hello("shop", &mesh, &session, &a, &hello(&mesh, &session, a)),
            Ok(PROTOCOL_VERSION_MAX)
        );
        // No proof, wrong secret, another session (replay), another sender (reflection): refused.
        let refused = |h: &Hello, proven: &NodeId| {
            judge_hello("shop", &mesh, &session, proven, h)
                .unwrap_err()
                .reason
        };
        assert_eq!(
            refused(&local_hello("shop", a, 1, None), &a),
            RefuseReason::NotAdmitted
        );
        let wrong = Admission::default().with_secret(b"guess");
        assert_eq!(
            refused(&hello(&wrong, &session, a), &a),
            RefuseReason::NotAdmitted
        );
        assert_eq!(
            refused(&hello(&mesh, &[8u8; 32], a), &a),
            RefuseReason::NotAdmitted
        );
        let mut reflected = hello(&mesh, &session, a);
        reflected.node_id = b;
        assert_eq!(refused(&reflected, &b), RefuseReason::NotAdmitted);
        // The secret never shows in debug output.
        assert!(!format!("{mesh:?}").contains("sesame"));
    }

    #[test]
    fn allow_list_admits_only_its_nodes() {
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        let only_a = Admission::default().with_allow_list([a]);
        let session = [0u8; 32];
        assert_eq!(
            judge_hello("m", &only_a, &session, &a, &local_hello("m", a, 1, None)),
            Ok(PROTOCOL_VERSION_MAX)
        );
        let e = judge_hello("m", &only_a, &session, &b, &local_hello("m", b, 1, None)).unwrap_err();
        assert_eq!(e.reason, RefuseReason::NotAdmitted);
        assert!(e.detail.contains(&b.to_string()));
    }
}
