//! Raft RPCs over iroh, authenticated both ways. Every request carries a proof of the
//! cluster secret bound to the sender's authenticated endpoint id; requests without a valid
//! proof are refused, logged, and never reach consensus. Every answer carries the callee's
//! proof for the request's fresh challenge; an answer without it fails the call as
//! [`RpcFailure::Unauthenticated`], so a leader never admits (nor counts the replies of) an
//! endpoint that does not hold the secret, however well it mimics a node.
//!
//! Why per exchange, in the envelope, rather than once per connection in a handshake: it
//! needs no state in the transport's connection and lane pools (a connection re-dialled
//! after a restart is covered with no extra step), costs two keyed hashes per RPC (well
//! under a microsecond against a network round trip), and consensus stays free of both
//! iroh and the secret: it only sees [`RpcFailure::Unauthenticated`] through the
//! [`RaftRpcClient`] seam, which the simulator's network never returns.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use aspen_api::limits::MAX_PEERS;
use aspen_api::{ClusterNode, NodeId, Secret};
use aspen_consensus::{HealthTracker, RaftNode, RaftRpc, RaftRpcClient, RaftRpcReply, RpcFailure};
use aspen_transport::auth::{Challenges, cluster_proof, responder_proof, verify_cluster_proof, verify_responder_proof};
use aspen_transport::{EndpointId, PeerAddr, RAFT_ALPN, RpcClient, RpcHandler, TransportError};
use serde::{Deserialize, Serialize};

use crate::discovery::AddressBook;
use crate::metrics::Metrics;

/// The credentials that open every Raft stream, checked before any request on it is read.
#[derive(Debug, Serialize, Deserialize)]
pub struct RaftHello {
    /// `cluster_proof(secret, sender endpoint id)`.
    pub proof: [u8; 32],
}

/// A Raft RPC with the sender's proof of the cluster secret.
#[derive(Debug, Serialize, Deserialize)]
pub struct RaftEnvelope {
    /// `cluster_proof(secret, sender endpoint id)`.
    pub proof: [u8; 32],
    /// Fresh for this request: the receiver's answer proves the secret over it.
    pub challenge: [u8; 32],
    /// The request.
    pub rpc: RaftRpc,
}

/// The answer to a [`RaftEnvelope`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftEnvelopeReply {
    /// The receiver handled the request; `clock_ms` is its wall clock when it replied, for
    /// the clock-drift detector.
    Reply {
        /// The reply.
        reply: RaftRpcReply,
        /// Receiver's Unix time in milliseconds.
        clock_ms: i64,
        /// `responder_proof(secret, receiver, sender, challenge)`.
        proof: [u8; 32],
    },
    /// The receiver refused the sender (wrong secret) or the message (malformed).
    Denied(String),
}

/// Most membership addresses [`ParsedAddrs`] keeps; past it the cache starts over.
const MAX_PARSED_ADDRS: usize = MAX_PEERS * 2;

/// Each target's membership address as recorded and as parsed: parsing decompresses the
/// endpoint's ed25519 key, too costly to repeat on every heartbeat and append.
#[derive(Default)]
struct ParsedAddrs {
    entries: Mutex<HashMap<NodeId, (String, PeerAddr)>>,
}

impl ParsedAddrs {
    /// `text` (the address recorded for `target`) parsed, once per distinct string.
    fn get(&self, target: NodeId, text: &str) -> Result<PeerAddr, TransportError> {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((seen, addr)) = entries.get(&target)
            && seen == text
        {
            return Ok(addr.clone());
        }
        let addr: PeerAddr = text.parse()?;
        if entries.len() >= MAX_PARSED_ADDRS {
            entries.clear();
        }
        entries.insert(target, (text.to_string(), addr.clone()));
        Ok(addr)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

/// Sends Raft RPCs to peers over iroh.
pub struct IrohRaftClient {
    rpc: RpcClient,
    proof: [u8; 32],
    secret: Secret,
    challenges: Challenges,
    health: Arc<HealthTracker>,
    book: Arc<AddressBook>,
    metrics: Arc<Metrics>,
    parsed: ParsedAddrs,
}

impl IrohRaftClient {
    /// A client sending from `rpc`'s endpoint, proving `secret` (on each stream's hello and
    /// in each request), sampling peer clocks into `health`.
    pub fn new(
        rpc: RpcClient,
        secret: &Secret,
        health: Arc<HealthTracker>,
        book: Arc<AddressBook>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TransportError> {
        let proof = cluster_proof(secret.expose(), &rpc.endpoint().id());
        rpc.set_hello(RAFT_ALPN, &RaftHello { proof })?;
        Ok(IrohRaftClient {
            rpc,
            proof,
            secret: secret.clone(),
            challenges: Challenges::default(),
            health,
            book,
            metrics,
            parsed: ParsedAddrs::default(),
        })
    }
}

/// Shows the sending endpoint, never the secret (a [`Secret`] prints `<redacted>`).
impl std::fmt::Debug for IrohRaftClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("IrohRaftClient")
            .field("endpoint", &self.rpc.endpoint().id().fmt_short().to_string())
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64)
}

fn failure(node: NodeId, error: TransportError) -> RpcFailure {
    match error {
        TransportError::ConnectTimeout { .. }
        | TransportError::Connect { .. }
        | TransportError::OpenTimeout { .. }
        | TransportError::PeerDown { .. }
        | TransportError::InvalidPeerAddr { .. }
        // A peer that refuses our secret stays refused: back off as from an unreachable one.
        | TransportError::Unauthenticated { .. } => RpcFailure::Unreachable { node, reason: error.to_string() },
        TransportError::ReadTimeout { after_ms, .. } => RpcFailure::Timeout { node, after_ms },
        other => RpcFailure::Network { node, reason: other.to_string() },
    }
}

impl RaftRpcClient for IrohRaftClient {
    async fn call(&self, target: NodeId, node: &ClusterNode, request: RaftRpc) -> Result<RaftRpcReply, RpcFailure> {
        let recorded = self.parsed.get(target, &node.addr).map_err(|error| failure(target, error))?;
        // A gossiped address is fresher than the one recorded when the node joined, but only
        // for the same identity: node ids are unique per cluster, endpoint ids everywhere.
        let peer = match self.book.get(target) {
            Some(gossiped) if gossiped.id == recorded.id => gossiped,
            _ => recorded,
        };
        let challenge = self.challenges.next();
        let envelope = RaftEnvelope { proof: self.proof, challenge, rpc: request };
        let sent_ms = unix_ms();
        let reply = self.metrics.raft_rpcs.time(self.rpc.call(&peer, RAFT_ALPN, &envelope)).await;
        match reply.map_err(|error| failure(target, error))? {
            RaftEnvelopeReply::Reply { reply, clock_ms, proof } => {
                let me = self.rpc.endpoint().id();
                if !verify_responder_proof(self.secret.expose(), &peer.id, &me, &challenge, &proof) {
                    tracing::warn!(node = target, peer = %peer.short(), "a peer answered without proving the cluster secret");
                    let reason = "its answer carries no valid proof of the cluster secret".to_string();
                    return Err(RpcFailure::Unauthenticated { node: target, reason });
                }
                self.health.record_clock(target, sent_ms, clock_ms, unix_ms());
                Ok(reply)
            }
            RaftEnvelopeReply::Denied(reason) => Err(RpcFailure::Network { node: target, reason }),
        }
    }
}

/// Serves Raft RPCs to a [`RaftNode`].
pub struct RaftService {
    node: RaftNode<IrohRaftClient>,
    secret: Secret,
    /// This node's endpoint id, which its answers' proofs name.
    me: EndpointId,
    metrics: Arc<Metrics>,
}

impl RaftService {
    /// Serves `node` on the endpoint `me`, admitting senders that prove `secret` and proving
    /// it in every answer; counts refusals and times served requests in `metrics`.
    pub fn new(node: RaftNode<IrohRaftClient>, secret: Secret, me: EndpointId, metrics: Arc<Metrics>) -> Self {
        RaftService { node, secret, me, metrics }
    }
}

/// Shows the serving node and endpoint, never the secret.
impl std::fmt::Debug for RaftService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RaftService")
            .field("node", &self.node.id())
            .field("me", &self.me.fmt_short().to_string())
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

impl RpcHandler for RaftService {
    type Hello = RaftHello;
    type Request = RaftEnvelope;
    type Response = RaftEnvelopeReply;

    fn authenticate(&self, peer: EndpointId, hello: RaftHello) -> Result<(), String> {
        if verify_cluster_proof(self.secret.expose(), &peer, &hello.proof) {
            return Ok(());
        }
        self.metrics.raft_denied.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %peer.fmt_short(), "refused a Raft connection: wrong cluster secret");
        Err("wrong cluster secret".into())
    }

    async fn handle(&self, peer: EndpointId, envelope: RaftEnvelope) -> RaftEnvelopeReply {
        if !verify_cluster_proof(self.secret.expose(), &peer, &envelope.proof) {
            self.metrics.raft_denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %peer.fmt_short(), "refused a Raft RPC: wrong cluster secret");
            return RaftEnvelopeReply::Denied("wrong cluster secret".into());
        }
        let started = std::time::Instant::now();
        let reply = self.node.handle_rpc(envelope.rpc).await;
        let refused = matches!(reply, RaftRpcReply::Failed(_) | RaftRpcReply::ChainDivergence(_));
        self.metrics.raft_served.record(started, refused);
        let proof = responder_proof(self.secret.expose(), &self.me, &peer, &envelope.challenge);
        RaftEnvelopeReply::Reply { reply, clock_ms: unix_ms(), proof }
    }

    fn reject(&self, peer: EndpointId, error: TransportError) -> RaftEnvelopeReply {
        tracing::warn!(peer = %peer.fmt_short(), %error, "refused a malformed Raft RPC");
        RaftEnvelopeReply::Denied(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspen_transport::SecretKey;

    fn text_of(seed: u8, port: u16) -> String {
        let id = SecretKey::from_bytes(&[seed; 32]).public();
        PeerAddr { id, addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))] }.to_string()
    }

    #[test]
    fn parsed_addrs_follow_the_recorded_string() {
        let cache = ParsedAddrs::default();
        let first = cache.get(1, &text_of(1, 7000)).expect("valid address");
        assert_eq!(first.addrs, vec![std::net::SocketAddr::from(([127, 0, 0, 1], 7000))]);
        assert_eq!(cache.get(1, &text_of(1, 7000)).expect("cached"), first);
        // A node that moved gets its new address, not the cached one.
        let moved = cache.get(1, &text_of(1, 7001)).expect("valid address");
        assert_eq!(moved.addrs, vec![std::net::SocketAddr::from(([127, 0, 0, 1], 7001))]);
        // A malformed recorded address is an error, every time, and is not cached.
        assert!(cache.get(2, "not-an-address").is_err());
        assert!(cache.get(2, "not-an-address").is_err());
        assert_eq!(cache.len(), 1);
    }

    /// Debug of everything that holds the cluster secret (the Raft client and service, the
    /// discovery task) shows `<redacted>`, never the secret.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn debug_of_the_raft_client_service_and_discovery_shows_no_secret() {
        const SECRET: &str = "raft-rpc-secret-value";
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SecretKey::generate();
        let endpoint = aspen_transport::bind_endpoint(
            key.clone(),
            "127.0.0.1:0".parse().expect("addr"),
            vec![RAFT_ALPN.to_vec(), iroh_gossip::ALPN.to_vec()],
        )
        .await
        .expect("bind");
        let (metrics, health, book) =
            (Arc::new(Metrics::default()), Arc::new(HealthTracker::default()), Arc::new(AddressBook::default()));
        let secret = Secret::new(SECRET);
        let client = IrohRaftClient::new(
            RpcClient::new(endpoint.clone()),
            &secret,
            Arc::clone(&health),
            Arc::clone(&book),
            Arc::clone(&metrics),
        )
        .expect("client");
        let client_debug = format!("{client:?}");
        let log = aspen_raft_storage::RedbLogStore::open(dir.path().join("log.redb")).expect("log");
        let state_machine = aspen_raft_storage::SqliteStateMachine::open(dir.path().join("sm")).expect("sm");
        let node =
            RaftNode::start(aspen_consensus::ConsensusConfig::new(1), log, state_machine, Arc::new(client), health)
                .await
                .expect("node");
        let service = RaftService::new(node.clone(), secret.clone(), endpoint.id(), metrics);
        let discovery = crate::discovery::Discovery {
            gossip: iroh_gossip::Gossip::builder().spawn(endpoint.clone()),
            key,
            secret,
            me: (1, PeerAddr::from(endpoint.addr())),
            book,
            lookup: aspen_transport::MemoryLookup::new(),
            local_peers: None,
        };
        let texts = [client_debug, format!("{service:?}"), format!("{service:#?}"), format!("{discovery:?}")];
        for text in &texts {
            assert!(!text.contains(SECRET), "the secret in {text}");
            assert!(text.contains(aspen_api::secret::REDACTED), "{text}");
        }
        node.shutdown().await.expect("shutdown");
        endpoint.close().await;
    }

    #[test]
    fn parsed_addrs_stay_bounded() {
        let cache = ParsedAddrs::default();
        for node in 0..(MAX_PARSED_ADDRS as u64 * 3) {
            cache.get(node, &text_of(node as u8, 7000)).expect("valid address");
            assert!(cache.len() <= MAX_PARSED_ADDRS);
        }
    }
}
