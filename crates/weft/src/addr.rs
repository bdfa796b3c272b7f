//! Node addresses: an id plus where it may be reached.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use weft_proto::id::ParseNodeIdError;
use weft_proto::NodeId;

/// A node's id and the addresses it may be reached at. The addresses are hints: the TLS handshake
/// proves the id, so a wrong address only costs a failed dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddr {
    /// Who.
    pub id: NodeId,
    /// Where (any number: dialed one after another, a moment apart, until one answers).
    pub addrs: Vec<SocketAddr>,
}

impl NodeAddr {
    /// An id reachable at one address.
    pub fn new(id: NodeId, addr: SocketAddr) -> Self {
        Self {
            id,
            addrs: vec![addr],
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id)?;
        for (i, addr) in self.addrs.iter().enumerate() {
            f.write_str(if i == 0 { "@" } else { "," })?;
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

/// Why a text is not a node address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseNodeAddrError {
    /// The id part is wrong.
    #[error("bad node id: {0}")]
    Id(#[from] ParseNodeIdError),
    /// An address part is not `ip:port`.
    #[error("bad address {0:?}: expected ip:port, e.g. 127.0.0.1:7450")]
    Addr(String),
}

impl FromStr for NodeAddr {
    type Err = ParseNodeAddrError;

    /// Parses `NODE_ID@ip:port[,ip:port...]` (or a bare `NODE_ID`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (id, rest) = match text.split_once('@') {
            Some((id, rest)) => (id, Some(rest)),
            None => (text, None),
        };
        let id = id.parse()?;
        let addrs = match rest {
            None => Vec::new(),
            Some(rest) => rest
                .split(',')
                .map(|a| {
                    a.trim()
                        .parse()
                        .map_err(|_| ParseNodeAddrError::Addr(a.to_owned()))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self { id, addrs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = NodeId::from_bytes([7; 32]);
        let addr = NodeAddr {
            id,
            addrs: vec!["127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()],
        };
        assert_eq!(addr.to_string().parse::<NodeAddr>().unwrap(), addr);
        assert!(matches!(
            format!("{id}@nowhere").parse::<NodeAddr>(),
            Err(ParseNodeAddrError::Addr(_))
        ));
    }
}
