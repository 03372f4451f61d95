//! The seam between the client's logic and its network, as `aspen_consensus::RaftRpcClient`
//! is consensus's: [`ClientConnector`] sends one request to one node and says, when no
//! response came, whether the request certainly was not sent. Retries, redirects, leader
//! tracking, write sessions and confirmed reads live above it in [`crate::Client`], so every
//! transport (iroh in production, the simulator's network in `aspen-sim`) runs the same
//! client logic.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;

use aspen_api::{ClientRequest, ClientResponse};

use crate::ClientError;

/// A node's address as a transport knows it.
pub trait ClientPeer: Clone + PartialEq + fmt::Debug + fmt::Display + FromStr + Send + Sync + 'static {
    /// A short name for messages.
    fn short(&self) -> String;
    /// Whether `other` names the same node, perhaps at other addresses.
    fn same_node(&self, other: &Self) -> bool;
}

/// What a transport knows about its connection to a node, best first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// A connection is open (or the transport needs none): calls go out at once.
    Connected,
    /// Never dialed: nothing is known.
    Unknown,
    /// A first dial is under way.
    Dialing,
    /// Its last dial failed or its connection went silent: calls fail at once.
    Down {
        /// Why it was taken for down.
        reason: String,
    },
}

/// Why one request to one node got no response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NodeUnreachable {
    /// The whole description, naming the node.
    pub message: String,
    /// Why, without the node's name.
    pub reason: String,
    /// Whether the request certainly was not sent (then it cannot have taken effect).
    pub before_send: bool,
}

/// Sends client requests to nodes: the transport under [`crate::Client`].
pub trait ClientConnector: Send + Sync + 'static {
    /// A node's address.
    type Peer: ClientPeer;

    /// Sends `request` to `peer` and waits for its response. No response is
    /// `ClientError::Unreachable`; a request the transport refused to carry is
    /// `ClientError::Unauthorized` or `ClientError::Rejected`.
    fn call(
        &self,
        peer: &Self::Peer,
        request: ClientRequest,
    ) -> impl Future<Output = Result<ClientResponse, ClientError>> + Send;

    /// Opens a connection to `peer`, if the transport has connections.
    fn connect(&self, peer: &Self::Peer) -> impl Future<Output = Result<(), ClientError>> + Send;

    /// What is known about the connection to `peer`.
    fn reachability(&self, peer: &Self::Peer) -> Reachability;

    /// Closes every connection.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// A plain socket address names a node in connectionless transports (the simulator's).
impl ClientPeer for SocketAddr {
    fn short(&self) -> String {
        self.to_string()
    }

    fn same_node(&self, other: &Self) -> bool {
        self == other
    }
}
