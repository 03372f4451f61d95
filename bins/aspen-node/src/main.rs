//! aspen-node: parse configuration (file, then ASPEN_* environment, then flags), build the
//! node, serve until SIGTERM or SIGINT, shut down cleanly. No logic lives here.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use aspen_api::Secret;
use aspen_server::{NodeConfig, PartialConfig, Server, StaticPeer};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

/// An Aspen node: one member of a replicated, linearizable key-value cluster.
///
/// Settings come from a TOML file (--config), then ASPEN_* environment variables, then
/// flags; later sources win. On start the node writes its address to DATA_DIR/node.addr.
///
/// Clients hold one of two tokens: the client token reads and writes keys; the admin token
/// also administers the cluster (init, add-learner, promote, remove, snapshot,
/// transfer-leader). Give secrets as files (--cluster-secret-file, --client-token-file,
/// --admin-token-file, mode 0600) or ASPEN_* variables rather than flags: a command line
/// is visible to every user of the machine.
#[derive(Debug, Parser)]
#[command(name = "aspen-node", version, about)]
struct Args {
    /// TOML config file (keys: node_id, data_dir, bind, peers = [{id, addr}], cluster_secret,
    /// client_token, admin_token, cluster_secret_file, client_token_file, admin_token_file,
    /// metrics_addr, heartbeat_interval_ms, election_timeout_min_ms, election_timeout_max_ms,
    /// snapshot_after_entries, relays, dns_discovery, pkarr_discovery, mdns_discovery). If it
    /// holds a secret, make it readable by its owner only (chmod 600).
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
    #[arg(long, env = "ASPEN_CLUSTER_SECRET", hide_env_values = true, value_name = "SECRET")]
    cluster_secret: Option<Secret>,
    /// File holding the cluster secret (instead of --cluster-secret).
    #[arg(long, env = "ASPEN_CLUSTER_SECRET_FILE", value_name = "FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// Token that lets clients read and write keys (data access).
    #[arg(long, env = "ASPEN_CLIENT_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    client_token: Option<Secret>,
    /// File holding the client token (instead of --client-token).
    #[arg(long, env = "ASPEN_CLIENT_TOKEN_FILE", value_name = "FILE")]
    client_token_file: Option<PathBuf>,
    /// Token that lets clients administer the cluster as well; must differ from the client
    /// token.
    #[arg(long, env = "ASPEN_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    admin_token: Option<Secret>,
    /// File holding the admin token (instead of --admin-token).
    #[arg(long, env = "ASPEN_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
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
            cluster_secret_file: self.cluster_secret_file.clone(),
            client_token: self.client_token.clone(),
            client_token_file: self.client_token_file.clone(),
            admin_token: self.admin_token.clone(),
            admin_token_file: self.admin_token_file.clone(),
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
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    for (id, flag) in
        [("cluster_secret", "--cluster-secret"), ("client_token", "--client-token"), ("admin_token", "--admin-token")]
    {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            tracing::warn!(
                "{flag} puts a secret on the command line, where every local user can read it; use {flag}-file"
            );
        }
    }
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
