//! Connection admission: judging a peer's hello, and choosing between two connections to one peer.

use crate::frame::{Hello, Refusal, RefuseReason, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use crate::id::NodeId;

/// The hello this node sends.
pub fn local_hello(mesh: &str, node_id: NodeId) -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        mesh: mesh.to_owned(),
        node_id,
    }
}

/// Decides whether a peer's hello is acceptable. `proven` is the id the TLS handshake proved; the
/// hello's claims count for nothing until they agree with it. Returns the negotiated version.
pub fn judge_hello(local_mesh: &str, proven: &NodeId, hello: &Hello) -> Result<u16, Refusal> {
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

/// Resolves simultaneous dials so that both ends keep the same connection without talking about it:
/// the connection dialed by the node with the smaller id wins; between two connections dialed by the
/// same node (a redial), the newer wins.
pub fn resolve_duplicate(
    local: &NodeId,
    remote: &NodeId,
    existing_dialed_by_local: bool,
    new_dialed_by_local: bool,
) -> Keep {
    if existing_dialed_by_local == new_dialed_by_local {
        return Keep::New;
    }
    let local_is_smaller = local < remote;
    // The winner is the connection whose dialer is the smaller node.
    if new_dialed_by_local == local_is_smaller {
        Keep::New
    } else {
        Keep::Existing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_keep_the_same_connection() {
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        // a dialed c1, b dialed c2. At a: c1 is "dialed by local". At b: c2 is.
        for a_saw_c1_first in [true, false] {
            for b_saw_c1_first in [true, false] {
                let keep_at_a = if a_saw_c1_first {
                    match resolve_duplicate(&a, &b, true, false) {
                        Keep::Existing => "c1",
                        Keep::New => "c2",
                    }
                } else {
                    match resolve_duplicate(&a, &b, false, true) {
                        Keep::Existing => "c2",
                        Keep::New => "c1",
                    }
                };
                let keep_at_b = if b_saw_c1_first {
                    match resolve_duplicate(&b, &a, false, true) {
                        Keep::Existing => "c1",
                        Keep::New => "c2",
                    }
                } else {
                    match resolve_duplicate(&b, &a, true, false) {
                        Keep::Existing => "c2",
                        Keep::New => "c1",
                    }
                };
                assert_eq!(keep_at_a, keep_at_b);
                assert_eq!(keep_at_a, "c1", "the smaller node's dial wins");
            }
        }
    }

    #[test]
    fn hello_checks() {
        let id = NodeId::from_bytes([1; 32]);
        let other = NodeId::from_bytes([9; 32]);
        assert_eq!(judge_hello("shop", &id, &local_hello("shop", id)), Ok(1));
        let e = judge_hello("shop", &id, &local_hello("bank", id)).unwrap_err();
        assert_eq!(e.reason, RefuseReason::WrongMesh);
        let e = judge_hello("shop", &other, &local_hello("shop", id)).unwrap_err();
        assert_eq!(e.reason, RefuseReason::IdentityMismatch);
        let mut future = local_hello("shop", id);
        future.version_min = 5;
        future.version_max = 9;
        let e = judge_hello("shop", &id, &future).unwrap_err();
        assert_eq!(e.reason, RefuseReason::IncompatibleVersion);
    }
}
