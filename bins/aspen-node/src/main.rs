//! aspen-node: parse configuration (file, then ASPEN_* environment, then flags), build the
//! node, serve until SIGTERM or SIGINT, shut down cleanly. No logic lives here.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use aspen_server::{NodeConfig, PartialConfig, Server, StaticPeer};
use clap::Parser;

/// An Aspen node: one member of a replicated, linearizable key-value cluster.
///
/// Settings come from a TOML file (--config), then ASPEN_* environment variables, then
/// flags; later sources win. On start the node writes its address to DATA_DIR/node.addr.
#[derive(Debug, Parser)]
#[command(name = "aspen-node", version, about)]
struct Args {
    /// TOML config file (keys: node_id, data_dir, bind, peers = [{id, addr}], cluster_secret,
    /// client_token, metrics_addr, heartbeat_interval_ms, election_timeout_min_ms,
    /// election_timeout_max_ms, snapshot_after_entries, relays, dns_discovery, pkarr_discovery,
    /// mdns_discovery).
    #[arg(long, env = "ASPEN_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id (1 or more).
    #[arg(long, env = "ASPEN_NODE_ID")]
    node_id: Option<u64>,
    /// Directory for the node's key, Raft log and state machine.
    #[arg(long, env = "ASPEN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Listen address of the node's QUIC endpoint [default: 0.0.0.0:7101].
    #[arg(long, env = "ASPEN_BIND")]
    bind: Option<SocketAddr>,
    /// A peer as ID=ADDR (ADDR is <endpoint-id>@<ip:port>); repeat for each peer.
    #[arg(long = "peer", env = "ASPEN_NODE_PEERS", value_delimiter = ',')]
    peers: Vec<StaticPeer>,
    /// Secret every cluster member must prove it holds (at least 8 bytes).
    #[arg(long, env = "ASPEN_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Token clients must present.
    #[arg(long, env = "ASPEN_CLIENT_TOKEN", hide_env_values = true)]
    client_token: Option<String>,
    /// Address of the Prometheus metrics HTTP endpoint (GET /metrics).
    #[arg(long, env = "ASPEN_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Use n0's public relays for NAT traversal (off by default; needs internet).
    #[arg(long, env = "ASPEN_RELAYS")]
    relays: bool,
    /// Resolve peers through n0's DNS discovery (off by default; needs internet).
    #[arg(long, env = "ASPEN_DNS_DISCOVERY")]
    dns_discovery: bool,
    /// Publish and resolve addresses through n0's pkarr relay (off by default; needs internet).
    #[arg(long, env = "ASPEN_PKARR_DISCOVERY")]
    pkarr_discovery: bool,
    /// Find cluster members on the LAN by mDNS (off by default).
    #[arg(long, env = "ASPEN_MDNS")]
    mdns: bool,
    /// Initialize a new cluster of this node and its --peer list if not yet initialized.
    #[arg(long)]
    init: bool,
}

impl Args {
    fn resolve(&self) -> Result<NodeConfig> {
        let file = match &self.config {
            Some(path) => PartialConfig::from_file(path)?,
            None => PartialConfig::default(),
        };
        let overrides = PartialConfig {
            node_id: self.node_id,
            data_dir: self.data_dir.clone(),
            bind: self.bind,
            peers: (!self.peers.is_empty()).then(|| self.peers.clone()),
            cluster_secret: self.cluster_secret.clone(),
            client_token: self.client_token.clone(),
            metrics_addr: self.metrics_addr,
            relays: self.relays.then_some(true),
            dns_discovery: self.dns_discovery.then_some(true),
            pkarr_discovery: self.pkarr_discovery.then_some(true),
            mdns_discovery: self.mdns.then_some(true),
            ..Default::default()
        };
        Ok(overrides.over(file).resolve()?)
    }
}

/// mimalloc instead of glibc malloc: a node allocates many small short-lived buffers
/// (frames, entries, rows); profiling under write load showed glibc's malloc/free and its
/// consolidation at about a tenth of the node's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,iroh=warn,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = args.resolve()?;
    let peers: Vec<aspen_api::ClusterNode> =
        config.peers.iter().map(|peer| aspen_api::ClusterNode { id: peer.id, addr: peer.addr.clone() }).collect();
    let node_id = config.node_id;
    let server = Server::start(config).await.context("starting the node")?;
    if args.init {
        server.init_if_new(peers).await.context("initializing the cluster")?;
    }
    println!("node {node_id} ready: {}", server.addr());
    println!("node {node_id} endpoint id: {}", server.addr().id);
    println!("node {node_id} ticket: {}", server.addr().ticket());

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    server.shutdown().await;
    Ok(())
}
