//! A Rust client for Aspen. Connects to any node by its address (`<endpoint-id>@<ip:port>`
//! or a ticket), sends requests over iroh QUIC (ALPN `aspen-client/2`) with the cluster's
//! client token, follows leader redirects for cluster operations, and retries only what is
//! safe to retry: reads always, writes only when they certainly were not applied.
//!
//! Architecture invariant: depends on aspen-api and aspen-transport only, never on
//! consensus or storage.

pub mod txn_syntax;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aspen_api::retry::{self, AttemptFailure, RETRY_PAUSE, RetryAction};
use aspen_api::{
    ClientEnvelope, ClientRequest, ClientResponse, ClusterError, ClusterNode, ClusterStatus, GetRequest, GetResponse,
    KeyRange, KvError, NodeId, ReadConsistency, ScanRequest, ScanResponse, SqlRequest, SqlResponse, TxnRequest,
    TxnResponse, WriteCommand, WriteResponse,
};
use aspen_transport::{CLIENT_ALPN, PeerAddr, RpcClient, SecretKey, TransportError, bind_endpoint};

pub use aspen_api::retry::DEFAULT_RETRY_DEADLINE;
/// Longest `close` waits for connections to finish closing.
const CLOSE_GRACE: Duration = Duration::from_millis(250);
/// Most nodes a client is configured with.
pub const MAX_CLIENT_PEERS: usize = aspen_api::limits::MAX_PEERS;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client was configured without any node address, or with too many.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// A node address could not be parsed.
    #[error(transparent)]
    Address(TransportError),
    /// No node could be reached before the retry deadline.
    #[error("no node reachable: {0}")]
    Unreachable(TransportError),
    /// The node refused the token.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The node rejected the request as malformed or too large.
    #[error("request rejected: {0}")]
    Rejected(String),
    /// A key-value operation failed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A cluster operation failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The node answered with a reply of the wrong kind.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// The local endpoint could not be created.
    #[error("cannot start client endpoint: {0}")]
    Endpoint(TransportError),
}

/// Dials every peer at once and returns the index of the first that connects (0 if none
/// does), so a dead node in the list costs nothing when others are up. The other dials go
/// on in the background and fill the connection pool.
async fn first_to_connect(rpc: &Arc<RpcClient>, peers: &[PeerAddr]) -> usize {
    let (connected, mut first) = tokio::sync::mpsc::channel(peers.len());
    for (index, peer) in peers.iter().enumerate() {
        let rpc = Arc::clone(rpc);
        let peer = peer.clone();
        let connected = connected.clone();
        tokio::spawn(async move {
            if rpc.connect(&peer, CLIENT_ALPN).await.is_ok() {
                let _ = connected.send(index).await;
            }
        });
    }
    drop(connected);
    first.recv().await.unwrap_or(0)
}

/// A connection to an Aspen cluster.
pub struct AspenClient {
    rpc: Arc<RpcClient>,
    peers: Vec<PeerAddr>,
    token: String,
    /// Index of the node that answered last; calls start there.
    preferred: AtomicUsize,
    retry_deadline: Duration,
}

impl AspenClient {
    /// Connects to the cluster through `peers` (any subset of its nodes) with `token`.
    pub async fn connect(peers: Vec<PeerAddr>, token: impl Into<String>) -> Result<Self, ClientError> {
        if peers.is_empty() || peers.len() > MAX_CLIENT_PEERS {
            return Err(ClientError::Config(format!("give 1..={MAX_CLIENT_PEERS} node addresses")));
        }
        let bind: SocketAddr = "0.0.0.0:0".parse().map_err(|_| ClientError::Config("bind address".into()))?;
        let endpoint = bind_endpoint(SecretKey::generate(), bind, Vec::new()).await.map_err(ClientError::Endpoint)?;
        let rpc = Arc::new(RpcClient::new(endpoint));
        let preferred = AtomicUsize::new(first_to_connect(&rpc, &peers).await);
        Ok(AspenClient { rpc, peers, token: token.into(), preferred, retry_deadline: DEFAULT_RETRY_DEADLINE })
    }

    /// Parses comma- or whitespace-separated node addresses.
    pub fn parse_peers(text: &str) -> Result<Vec<PeerAddr>, ClientError> {
        text.split([',', ' ', '\n'])
            .filter(|part| !part.trim().is_empty())
            .map(|part| part.parse().map_err(ClientError::Address))
            .collect()
    }

    /// Sets how long calls retry through elections and unreachable nodes.
    pub fn with_retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// Sends one request to one node.
    pub async fn call_node(&self, peer: &PeerAddr, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        let envelope = ClientEnvelope { token: self.token.clone(), request };
        match self.rpc.call(peer, CLIENT_ALPN, &envelope).await {
            Ok(ClientResponse::Unauthorized(reason)) => Err(ClientError::Unauthorized(reason)),
            Ok(ClientResponse::Rejected(reason)) => Err(ClientError::Rejected(reason)),
            Ok(response) => Ok(response),
            Err(error @ TransportError::MessageTooLarge { .. }) => Err(ClientError::Rejected(error.to_string())),
            Err(error) => Err(ClientError::Unreachable(error)),
        }
    }

    /// Sends `request`, moving on to other nodes and retrying while `retry` says the
    /// outcome allows it, until the retry deadline.
    async fn call<T>(
        &self,
        request: ClientRequest,
        idempotent: bool,
        decode: impl Fn(ClientResponse) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let started = Instant::now();
        let mut target: Option<PeerAddr> = None;
        let mut index = self.preferred.load(Ordering::Relaxed);
        loop {
            let peer = target.take().unwrap_or_else(|| self.peers[index % self.peers.len()].clone());
            let outcome = self.call_node(&peer, request.clone()).await.and_then(&decode);
            let failure = match &outcome {
                Ok(_) => {
                    if let Some(position) = self.peers.iter().position(|known| *known == peer) {
                        self.preferred.store(position, Ordering::Relaxed);
                    }
                    return outcome;
                }
                Err(ClientError::Unreachable(error)) => {
                    AttemptFailure::Unreachable { before_send: error.is_before_send() }
                }
                Err(ClientError::Kv(error)) => AttemptFailure::Kv(error),
                Err(ClientError::Cluster(error)) => AttemptFailure::Cluster(error),
                Err(_) => AttemptFailure::Other,
            };
            let action = retry::after_failure(failure, idempotent);
            if action == RetryAction::Stop || started.elapsed() >= self.retry_deadline {
                return outcome;
            }
            tracing::debug!(peer = %peer.short(), error = ?outcome.as_ref().err(), "retrying");
            target = match action {
                RetryAction::Redirect(addr) => addr.parse().ok(),
                RetryAction::NextNode | RetryAction::Stop => None,
            };
            if target.is_none() {
                index += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }

    /// Reads one key (linearizable).
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<GetResponse, ClientError> {
        self.get_with(GetRequest { key: key.into(), consistency: ReadConsistency::Linearizable }).await
    }

    /// Reads one key with the given consistency.
    pub async fn get_with(&self, request: GetRequest) -> Result<GetResponse, ClientError> {
        self.call(ClientRequest::Get(request), true, |response| match response {
            ClientResponse::Get(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// Reads a range.
    pub async fn scan(&self, request: ScanRequest) -> Result<ScanResponse, ClientError> {
        self.call(ClientRequest::Scan(request), true, |response| match response {
            ClientResponse::Scan(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// Applies a write command.
    pub async fn write(&self, command: WriteCommand) -> Result<WriteResponse, ClientError> {
        command.validate().map_err(KvError::from)?;
        self.call(ClientRequest::Write(command), false, |response| match response {
            ClientResponse::Write(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// Sets `key` to `value`.
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<WriteResponse, ClientError> {
        self.write(WriteCommand::Put { key: key.into(), value: value.into(), lease: None }).await
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<WriteResponse, ClientError> {
        self.write(WriteCommand::Delete { key: key.into() }).await
    }

    /// Deletes every key under `prefix`.
    pub async fn delete_prefix(&self, prefix: impl Into<Vec<u8>>) -> Result<WriteResponse, ClientError> {
        self.write(WriteCommand::DeleteRange { range: KeyRange::prefix(prefix) }).await
    }

    /// Runs a transaction.
    pub async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, ClientError> {
        match self.write(WriteCommand::Txn(txn)).await? {
            WriteResponse::Txn(response) => Ok(response),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Runs a read-only SQL query.
    pub async fn sql(&self, request: SqlRequest) -> Result<SqlResponse, ClientError> {
        self.call(ClientRequest::Sql(request), true, |response| match response {
            ClientResponse::Sql(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// The status of the first node that answers.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.call(ClientRequest::Status, true, |response| match response {
            ClientResponse::Status(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// The status of one specific node.
    pub async fn node_status(&self, peer: &PeerAddr) -> Result<ClusterStatus, ClientError> {
        match self.call_node(peer, ClientRequest::Status).await? {
            ClientResponse::Status(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Prometheus metrics text of one specific node.
    pub async fn node_metrics(&self, peer: &PeerAddr) -> Result<String, ClientError> {
        match self.call_node(peer, ClientRequest::Metrics).await? {
            ClientResponse::Metrics(text) => Ok(text),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    async fn cluster(&self, request: ClientRequest) -> Result<(), ClientError> {
        self.call(request, false, |response| match response {
            ClientResponse::Cluster(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// Initializes a new cluster with these voters (sent to the first configured node).
    pub async fn init(&self, members: Vec<ClusterNode>) -> Result<(), ClientError> {
        match self.call_node(&self.peers[0], ClientRequest::Init(members)).await? {
            ClientResponse::Cluster(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Adds a learner.
    pub async fn add_learner(&self, node: ClusterNode) -> Result<(), ClientError> {
        self.cluster(ClientRequest::AddLearner(node)).await
    }

    /// Sets the voters.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), ClientError> {
        self.cluster(ClientRequest::ChangeMembership(voters)).await
    }

    /// Removes a node.
    pub async fn remove(&self, node: NodeId) -> Result<(), ClientError> {
        self.cluster(ClientRequest::Remove(node)).await
    }

    /// Builds a snapshot on the node that answers.
    pub async fn trigger_snapshot(&self) -> Result<(), ClientError> {
        self.cluster(ClientRequest::TriggerSnapshot).await
    }

    /// Hands leadership to `node`.
    pub async fn transfer_leader(&self, node: NodeId) -> Result<(), ClientError> {
        self.cluster(ClientRequest::TransferLeader(node)).await
    }

    /// The configured node addresses.
    pub fn peers(&self) -> &[PeerAddr] {
        &self.peers
    }

    /// Closes the client's connections (peers see a clean close). Bounded: a dial still
    /// pending to a dead node would otherwise hold the close for seconds.
    pub async fn close(&self) {
        self.rpc.close_all();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.rpc.endpoint().close()).await;
    }
}
