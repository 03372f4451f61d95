//! Building, serving and stopping one node.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use aspen_api::{ClusterController, ClusterNode, Secret};
use aspen_consensus::{HealthTracker, RaftNode};
use aspen_raft_storage::{RedbLogStore, SqliteStateMachine};
use aspen_transport::EndpointId;
use aspen_transport::{
    CLIENT_ALPN, MemoryLookup, MuxProtocol, PeerAddr, RAFT_ALPN, RpcClient, RpcProtocol, bind_endpoint_with_lookup,
    load_or_create_secret_key,
};
use iroh::protocol::Router;
use iroh_gossip::Gossip;
use tokio::task::JoinHandle;

use crate::client_rpc::{ClientService, ClientTokens};
use crate::config::NodeConfig;
use crate::discovery::{AddressBook, Discovery, MAX_ANNOUNCEMENT_SIZE, mdns_service_name};
use crate::metrics::{Metrics, bind_http, serve_http};
use crate::raft_rpc::{IrohRaftClient, RaftService};

/// File in the data dir holding the node's address once it serves.
pub const ADDR_FILE: &str = "node.addr";
/// Longest a shutdown waits for background tasks to release the node's files.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// File in the data dir holding the node's secret key.
pub const KEY_FILE: &str = "node.key";

/// Why a node failed to start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data dir is unusable.
    #[error("data dir {path}: {reason}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// The network could not be set up.
    #[error(transparent)]
    Transport(#[from] aspen_transport::TransportError),
    /// The Raft log could not be opened (including a broken hash chain).
    #[error("raft log: {0}")]
    Log(#[from] aspen_raft_storage::LogStoreError),
    /// The state machine could not be opened.
    #[error("state machine: {0}")]
    StateMachine(#[from] aspen_raft_storage::StateMachineError),
    /// Consensus failed to start.
    #[error(transparent)]
    Consensus(#[from] aspen_consensus::StartError),
    /// mDNS could not start (no IPv4 or IPv6 multicast on this host).
    #[error("mDNS discovery: {0}")]
    Mdns(String),
    /// The metrics port could not be bound.
    #[error("metrics address {addr}: {reason}")]
    Metrics {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// Starts mDNS on the endpoint: advertises this node under the cluster's service name and
/// streams the endpoint ids it finds on the LAN.
fn start_mdns(
    endpoint: &iroh::Endpoint,
    secret: &Secret,
) -> Result<tokio::sync::mpsc::Receiver<EndpointId>, ServerError> {
    use futures::StreamExt;
    use iroh_mdns_address_lookup::{DiscoveryEvent, MdnsAddressLookup};
    let mdns_error = |reason: String| ServerError::Mdns(reason);
    let mdns = MdnsAddressLookup::builder()
        .service_name(mdns_service_name(secret))
        .build(endpoint.id())
        .map_err(|error| mdns_error(error.to_string()))?;
    endpoint.address_lookup().map_err(|error| mdns_error(error.to_string()))?.add(mdns.clone());
    let (found, local_peers) = tokio::sync::mpsc::channel(aspen_api::limits::MAX_PEERS);
    tokio::spawn(async move {
        let mut events = mdns.subscribe().await;
        while let Some(event) = events.next().await {
            if let DiscoveryEvent::Discovered { endpoint_info, .. } = event {
                // Bounded: when the channel is full, later announcements rediscover the peer.
                let _ = found.try_send(endpoint_info.endpoint_id);
            }
        }
    });
    Ok(local_peers)
}

/// A running node.
pub struct Server {
    node: RaftNode<IrohRaftClient>,
    router: Router,
    addr: PeerAddr,
    metrics_task: Option<JoinHandle<()>>,
    discovery_task: JoinHandle<()>,
    metrics: Arc<Metrics>,
    book: Arc<AddressBook>,
    log_watch: aspen_raft_storage::log::LogStoreWatch,
}

impl Server {
    /// Opens the node's files, binds its endpoint, starts Raft and serves both protocols.
    pub async fn start(config: NodeConfig) -> Result<Server, ServerError> {
        let data_error = |error: std::io::Error| ServerError::DataDir {
            path: config.data_dir.display().to_string(),
            reason: error.to_string(),
        };
        std::fs::create_dir_all(&config.data_dir).map_err(data_error)?;
        let _ = std::fs::remove_file(config.data_dir.join(ADDR_FILE));
        let key = load_or_create_secret_key(&config.data_dir.join(KEY_FILE))?;
        let lookup = MemoryLookup::new();
        let mut bootstrap = Vec::new();
        for peer in &config.peers {
            if let Ok(addr) = peer.addr.parse::<PeerAddr>() {
                lookup.add_endpoint_info(addr.endpoint_addr());
                bootstrap.push(addr.id);
            }
        }
        let alpns = vec![RAFT_ALPN.to_vec(), CLIENT_ALPN.to_vec(), iroh_gossip::ALPN.to_vec()];
        let endpoint =
            bind_endpoint_with_lookup(key.clone(), config.bind, alpns, Some(lookup.clone()), config.internet).await?;
        let addr = PeerAddr::from(endpoint.addr());
        let gossip = Gossip::builder().max_message_size(MAX_ANNOUNCEMENT_SIZE).spawn(endpoint.clone());
        let endpoint_for_mdns = endpoint.clone();
        let book = Arc::new(AddressBook::default());

        let log = RedbLogStore::open(config.data_dir.join("raft-log.redb"))?;
        let log_watch = log.watch();
        let state_machine = SqliteStateMachine::open(config.data_dir.join("state-machine"))?;
        let health = Arc::new(HealthTracker::default());
        let metrics = Arc::new(Metrics { raft_denied: Arc::new(AtomicU64::new(0)), ..Default::default() });
        let raft_client = Arc::new(IrohRaftClient::new(
            RpcClient::new(endpoint.clone()),
            &config.cluster_secret,
            Arc::clone(&health),
            Arc::clone(&book),
            Arc::clone(&metrics),
        )?);
        let node = RaftNode::start(config.consensus.clone(), log, state_machine, raft_client, health).await?;

        let raft_service =
            RaftService::new(node.clone(), config.cluster_secret.clone(), endpoint.id(), Arc::clone(&metrics));
        let tokens = ClientTokens { data: config.client_token.clone(), admin: config.admin_token.clone() };
        let client_service = ClientService::new(node.clone(), tokens, Arc::clone(&metrics));
        let router = Router::builder(endpoint)
            .accept(RAFT_ALPN, RpcProtocol::new(Arc::new(raft_service)))
            .accept(CLIENT_ALPN, MuxProtocol::new(Arc::new(client_service)))
            .accept(iroh_gossip::ALPN, gossip.clone())
            .spawn();

        // Members already known from the log are gossip bootstrap peers too.
        for member in node.metrics().membership_config.membership().nodes().map(|(_, member)| member.clone()) {
            if let Ok(member_addr) = member.addr.parse::<PeerAddr>()
                && member_addr.id != addr.id
            {
                lookup.add_endpoint_info(member_addr.endpoint_addr());
                bootstrap.push(member_addr.id);
            }
        }
        let local_peers =
            if config.mdns_discovery { Some(start_mdns(&endpoint_for_mdns, &config.cluster_secret)?) } else { None };
        let discovery = Discovery {
            gossip,
            key,
            secret: config.cluster_secret.clone(),
            me: (config.node_id, addr.clone()),
            book: Arc::clone(&book),
            lookup,
            local_peers,
        };
        let discovery_task = tokio::spawn(discovery.run(bootstrap));

        let metrics_task = match config.metrics_addr {
            Some(metrics_addr) => {
                let listener = bind_http(metrics_addr).await.map_err(|error| ServerError::Metrics {
                    addr: metrics_addr.to_string(),
                    reason: error.to_string(),
                })?;
                Some(tokio::spawn(serve_http(listener, node.clone(), Arc::clone(&metrics))))
            }
            None => None,
        };
        std::fs::write(config.data_dir.join(ADDR_FILE), format!("{addr}\n")).map_err(data_error)?;
        tracing::info!(node = config.node_id, %addr, "node serving");
        Ok(Server { node, router, addr, metrics_task, discovery_task, metrics, book, log_watch })
    }

    /// The node's address (what peers and clients dial).
    pub fn addr(&self) -> &PeerAddr {
        &self.addr
    }

    /// The consensus node.
    pub fn node(&self) -> &RaftNode<IrohRaftClient> {
        &self.node
    }

    /// Peer addresses learned by gossip.
    pub fn address_book(&self) -> &Arc<AddressBook> {
        &self.book
    }

    /// The node's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// This node as a cluster member.
    pub fn member(&self) -> ClusterNode {
        ClusterNode { id: self.node.id(), addr: self.addr.to_string() }
    }

    /// Initializes a new cluster of this node and `peers`, unless already initialized.
    pub async fn init_if_new(&self, peers: Vec<ClusterNode>) -> Result<(), aspen_api::ClusterError> {
        let mut members = vec![self.member()];
        members.extend(peers.into_iter().filter(|peer| peer.id != self.node.id()));
        match self.node.init(members).await {
            Ok(()) | Err(aspen_api::ClusterError::AlreadyInitialized) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Stops serving and shuts Raft down; the node's files stay for a restart. Returns once
    /// the log database is closed (bounded by [`SHUTDOWN_GRACE`]), so the same data dir can
    /// be opened again right away.
    pub async fn shutdown(self) {
        let log_watch = self.log_watch.clone();
        self.stop().await;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !log_watch.is_closed() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if !log_watch.is_closed() {
            tracing::warn!("the raft log was still open {SHUTDOWN_GRACE:?} after shutdown");
        }
    }

    async fn stop(self) {
        if let Some(task) = self.metrics_task {
            task.abort();
        }
        self.discovery_task.abort();
        if let Err(error) = self.router.shutdown().await {
            tracing::warn!(%error, "router shutdown");
        }
        if let Err(error) = self.node.shutdown().await {
            tracing::warn!(%error, "raft shutdown");
        }
    }
}
