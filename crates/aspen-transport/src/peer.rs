//! Peer addresses: an endpoint id plus the direct socket addresses to dial it on.
//!
//! Text form: `<64-hex endpoint id>@<ip:port>[,<ip:port>...]`; an iroh endpoint ticket
//! (`endpoint...`) is also accepted.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use iroh::{EndpointAddr, EndpointId, TransportAddr};
use iroh_tickets::endpoint::EndpointTicket;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::TransportError;

/// Most socket addresses one peer address may carry.
pub const MAX_PEER_SOCKET_ADDRS: usize = 16;

/// How to reach one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// The node's endpoint id (its public key, authenticated by the QUIC handshake).
    pub id: EndpointId,
    /// Direct addresses to dial.
    pub addrs: Vec<SocketAddr>,
}

impl PeerAddr {
    /// The iroh address to dial.
    pub fn endpoint_addr(&self) -> EndpointAddr {
        EndpointAddr::from_parts(self.id, self.addrs.iter().map(|addr| TransportAddr::Ip(*addr)))
    }

    /// The same address as an iroh endpoint ticket (`endpoint...`), accepted wherever a
    /// peer address is.
    pub fn ticket(&self) -> String {
        EndpointTicket::new(self.endpoint_addr()).to_string()
    }

    /// A short id for logs.
    pub fn short(&self) -> String {
        self.id.fmt_short().to_string()
    }
}

impl From<EndpointAddr> for PeerAddr {
    fn from(addr: EndpointAddr) -> Self {
        let addrs = addr
            .addrs
            .iter()
            .filter_map(|transport| match transport {
                TransportAddr::Ip(addr) => Some(*addr),
                _ => None,
            })
            .collect();
        PeerAddr { id: addr.id, addrs }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@", self.id)?;
        for (position, addr) in self.addrs.iter().enumerate() {
            if position > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

impl FromStr for PeerAddr {
    type Err = TransportError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| TransportError::InvalidPeerAddr { input: input.to_string(), reason };
        let input = input.trim();
        if input.starts_with("endpoint") {
            let ticket: EndpointTicket = input.parse().map_err(|error| invalid(format!("bad ticket: {error}")))?;
            return Ok(PeerAddr::from(ticket.endpoint_addr().clone()));
        }
        let (id, addrs) = input.split_once('@').ok_or_else(|| invalid("missing '@'".into()))?;
        let id: EndpointId = id.parse().map_err(|error| invalid(format!("bad endpoint id: {error}")))?;
        let addrs: Vec<SocketAddr> = addrs
            .split(',')
            .filter(|part| !part.is_empty())
            .map(|part| part.parse().map_err(|error| invalid(format!("bad socket address {part:?}: {error}"))))
            .collect::<Result<_, _>>()?;
        if addrs.is_empty() {
            return Err(invalid("no socket address".into()));
        }
        if addrs.len() > MAX_PEER_SOCKET_ADDRS {
            return Err(invalid(format!("more than {MAX_PEER_SOCKET_ADDRS} socket addresses")));
        }
        Ok(PeerAddr { id, addrs })
    }
}

impl Serialize for PeerAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_bad_input_is_typed() {
        let id = iroh::SecretKey::from_bytes(&[7; 32]).public();
        let addr =
            PeerAddr { id, addrs: vec!["127.0.0.1:7000".parse().expect("addr"), "[::1]:7001".parse().expect("addr")] };
        let text = addr.to_string();
        assert_eq!(text.parse::<PeerAddr>().expect("parse"), addr);
        let ticket = EndpointTicket::new(addr.endpoint_addr()).to_string();
        assert_eq!(ticket.parse::<PeerAddr>().expect("ticket"), addr);
        for bad in ["", "nonsense", "abc@127.0.0.1:1", &format!("{id}@"), &format!("{id}@not-an-addr"), "endpointzzzz"]
        {
            assert!(matches!(bad.parse::<PeerAddr>(), Err(TransportError::InvalidPeerAddr { .. })), "{bad:?}");
        }
    }
}
