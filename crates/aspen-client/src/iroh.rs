//! The client over iroh QUIC ([`AspenClient`]): [`IrohConnector`] sends each request on the
//! node's multiplexed client stream (ALPN `aspen-client/4`), every stream opening with the
//! client's token; the connection pool of `aspen_transport` says which nodes are connected,
//! being dialed or down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aspen_api::{ClientEnvelope, ClientRequest, ClientResponse, Secret};
use aspen_transport::{CLIENT_ALPN, PeerAddr, RpcClient, SecretKey, TransportError, bind_client_endpoint};

use crate::client::check_peer_count;
use crate::connector::{ClientConnector, ClientPeer, NodeUnreachable, Reachability};
use crate::{Client, ClientError};

/// Longest `close` waits for connections to finish closing. Closing takes milliseconds: a
/// closed connection drains for three probe timeouts, from its measured round trip, or from
/// the client's 2 ms first guess for a handshake still under way (a dial to a dead node),
/// 18 ms. This bound only guards against the unforeseen; past it iroh logs an error.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A connection to an Aspen cluster over iroh.
pub type AspenClient = Client<IrohConnector>;

/// Client requests over iroh QUIC, with one of the cluster's tokens.
pub struct IrohConnector {
    rpc: Arc<RpcClient>,
    token: Secret,
}

impl ClientPeer for PeerAddr {
    fn short(&self) -> String {
        PeerAddr::short(self)
    }

    fn same_node(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

fn unreachable(error: TransportError) -> ClientError {
    ClientError::Unreachable(NodeUnreachable {
        message: error.to_string(),
        reason: error.reason(),
        before_send: error.is_before_send(),
    })
}

impl ClientConnector for IrohConnector {
    type Peer = PeerAddr;

    fn call(
        &self,
        peer: &PeerAddr,
        request: ClientRequest,
    ) -> impl Future<Output = Result<ClientResponse, ClientError>> + Send {
        let envelope = ClientEnvelope { token: self.token.clone(), request };
        async move {
            match self.rpc.call_muxed(peer, CLIENT_ALPN, &envelope).await {
                Ok(response) => Ok(response),
                Err(error @ TransportError::MessageTooLarge { .. }) => Err(ClientError::Rejected(error.to_string())),
                Err(TransportError::Unauthenticated { reason, .. }) => Err(ClientError::Unauthorized(reason)),
                Err(error) => Err(unreachable(error)),
            }
        }
    }

    async fn connect(&self, peer: &PeerAddr) -> Result<(), ClientError> {
        self.rpc.connect(peer, CLIENT_ALPN).await.map(|_| ()).map_err(unreachable)
    }

    fn reachability(&self, peer: &PeerAddr) -> Reachability {
        match self.rpc.reachability(peer, CLIENT_ALPN) {
            aspen_transport::Reachability::Connected => Reachability::Connected,
            aspen_transport::Reachability::Unknown => Reachability::Unknown,
            aspen_transport::Reachability::Dialing => Reachability::Dialing,
            aspen_transport::Reachability::Down { reason, .. } => Reachability::Down { reason },
        }
    }

    /// Closes the connections (peers see a clean close) and cancels the dials still under
    /// way (to dead nodes, most likely), which then hold the close for milliseconds, not
    /// seconds (see [`aspen_transport::endpoint::CLIENT_INITIAL_RTT`]).
    async fn close(&self) {
        self.rpc.close_all();
        let _ = crate::rt::timeout(CLOSE_GRACE, self.rpc.endpoint().close()).await;
    }
}

impl Client<IrohConnector> {
    /// Connects to the cluster through `peers` (any subset of its nodes) with `token`: the
    /// data token (reads and writes) or the admin token (everything).
    pub async fn connect(peers: Vec<PeerAddr>, token: impl Into<Secret>) -> Result<Self, ClientError> {
        check_peer_count(peers.len())?;
        let bind: SocketAddr = "0.0.0.0:0".parse().map_err(|_| ClientError::Config("bind address".into()))?;
        let endpoint = bind_client_endpoint(SecretKey::generate(), bind)
            .await
            .map_err(|error| ClientError::Endpoint(error.to_string()))?;
        let rpc = Arc::new(RpcClient::new(endpoint));
        let token = token.into();
        // Every stream opens with the token, so a node checks it before reading a request.
        rpc.set_hello(CLIENT_ALPN, &aspen_api::ClientHello { token: token.clone() })
            .map_err(|error| ClientError::Config(format!("client token: {error}")))?;
        Client::new(IrohConnector { rpc, token }, peers).await
    }

    /// Parses comma- or whitespace-separated node addresses.
    pub fn parse_peers(text: &str) -> Result<Vec<PeerAddr>, ClientError> {
        text.split([',', ' ', '\n'])
            .filter(|part| !part.trim().is_empty())
            .map(|part| part.parse().map_err(|error: TransportError| ClientError::Address(error.to_string())))
            .collect()
    }
}
