//! Node configuration: a TOML file, then environment variables, then flags (later wins).
//! The binary parses env and flags into a [`PartialConfig`]; merging and validation live
//! here so tests can call them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aspen_api::NodeId;
use aspen_api::limits::MAX_PEERS;
use aspen_api::protocol::MAX_TOKEN_SIZE;
use aspen_consensus::ConsensusConfig;
use aspen_transport::InternetServices;
use serde::Deserialize;

/// Shortest cluster secret accepted: a secret is the only thing keeping strangers out.
pub const MIN_SECRET_LEN: usize = 8;
/// Default listen address for the node's endpoint.
pub const DEFAULT_BIND: &str = "0.0.0.0:7101";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A required setting is missing.
    #[error("missing setting {0} (config file key, ASPEN_* variable or flag)")]
    Missing(&'static str),
    /// A setting has an invalid value.
    #[error("invalid {setting}: {reason}")]
    Invalid {
        /// Which setting.
        setting: &'static str,
        /// Why.
        reason: String,
    },
}

/// A static peer: a node id and its address.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct StaticPeer {
    /// The peer's node id.
    pub id: NodeId,
    /// Its address, `<endpoint-id>@<ip:port>` or a ticket.
    pub addr: String,
}

impl std::str::FromStr for StaticPeer {
    type Err = ConfigError;

    /// Parses `ID=ADDR`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| ConfigError::Invalid { setting: "peer", reason: format!("{text:?}: {reason}") };
        let (id, addr) = text.split_once('=').ok_or_else(|| invalid("expected ID=ADDR"))?;
        let id = id.trim().parse().map_err(|_| invalid("node id is not a number"))?;
        Ok(StaticPeer { id, addr: addr.trim().to_string() })
    }
}

/// Every setting, all optional: one layer of configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialConfig {
    /// This node's id (1 or more).
    pub node_id: Option<NodeId>,
    /// Where the node keeps its key, log and state machine.
    pub data_dir: Option<PathBuf>,
    /// Listen address of the node's QUIC endpoint.
    pub bind: Option<SocketAddr>,
    /// Known peers.
    pub peers: Option<Vec<StaticPeer>>,
    /// Secret every member proves it holds.
    pub cluster_secret: Option<String>,
    /// Token clients must present.
    pub client_token: Option<String>,
    /// Address of the Prometheus metrics HTTP endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Leader heartbeat period, in milliseconds.
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower end of the election timeout, in milliseconds.
    pub election_timeout_min_ms: Option<u64>,
    /// Upper end of the election timeout, in milliseconds.
    pub election_timeout_max_ms: Option<u64>,
    /// Entries between snapshots.
    pub snapshot_after_entries: Option<u64>,
    /// Use n0's public relays (default false).
    pub relays: Option<bool>,
    /// Resolve peers through n0's DNS discovery (default false).
    pub dns_discovery: Option<bool>,
    /// Publish and resolve addresses through n0's pkarr relay (default false).
    pub pkarr_discovery: Option<bool>,
    /// Find cluster members on the LAN by mDNS (default false).
    pub mdns_discovery: Option<bool>,
}

impl PartialConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.display().to_string(), reason: error.to_string() })?;
        toml::from_str(&text)
            .map_err(|error| ConfigError::Parse { path: path.display().to_string(), reason: error.to_string() })
    }

    /// This layer with every unset setting taken from `lower`.
    pub fn over(self, lower: PartialConfig) -> PartialConfig {
        PartialConfig {
            node_id: self.node_id.or(lower.node_id),
            data_dir: self.data_dir.or(lower.data_dir),
            bind: self.bind.or(lower.bind),
            peers: self.peers.or(lower.peers),
            cluster_secret: self.cluster_secret.or(lower.cluster_secret),
            client_token: self.client_token.or(lower.client_token),
            metrics_addr: self.metrics_addr.or(lower.metrics_addr),
            heartbeat_interval_ms: self.heartbeat_interval_ms.or(lower.heartbeat_interval_ms),
            election_timeout_min_ms: self.election_timeout_min_ms.or(lower.election_timeout_min_ms),
            election_timeout_max_ms: self.election_timeout_max_ms.or(lower.election_timeout_max_ms),
            snapshot_after_entries: self.snapshot_after_entries.or(lower.snapshot_after_entries),
            relays: self.relays.or(lower.relays),
            dns_discovery: self.dns_discovery.or(lower.dns_discovery),
            pkarr_discovery: self.pkarr_discovery.or(lower.pkarr_discovery),
            mdns_discovery: self.mdns_discovery.or(lower.mdns_discovery),
        }
    }

    /// Checks every setting and fills defaults.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let node_id = self.node_id.ok_or(ConfigError::Missing("node_id"))?;
        if node_id == 0 {
            return Err(ConfigError::Invalid { setting: "node_id", reason: "must be 1 or more".into() });
        }
        let data_dir = self.data_dir.ok_or(ConfigError::Missing("data_dir"))?;
        let cluster_secret = self.cluster_secret.ok_or(ConfigError::Missing("cluster_secret"))?;
        if cluster_secret.len() < MIN_SECRET_LEN {
            return Err(ConfigError::Invalid {
                setting: "cluster_secret",
                reason: format!("must be at least {MIN_SECRET_LEN} bytes"),
            });
        }
        let client_token = self.client_token.ok_or(ConfigError::Missing("client_token"))?;
        if client_token.is_empty() || client_token.len() > MAX_TOKEN_SIZE {
            return Err(ConfigError::Invalid {
                setting: "client_token",
                reason: format!("must be 1..={MAX_TOKEN_SIZE} bytes"),
            });
        }
        let peers = self.peers.unwrap_or_default();
        if peers.len() > MAX_PEERS {
            return Err(ConfigError::Invalid { setting: "peers", reason: format!("at most {MAX_PEERS}") });
        }
        let bind = match self.bind {
            Some(bind) => bind,
            None => DEFAULT_BIND
                .parse()
                .map_err(|_| ConfigError::Invalid { setting: "bind", reason: DEFAULT_BIND.into() })?,
        };
        let mut consensus = ConsensusConfig::new(node_id);
        if let Some(value) = self.heartbeat_interval_ms {
            consensus.heartbeat_interval_ms = value;
        }
        if let Some(value) = self.election_timeout_min_ms {
            consensus.election_timeout_min_ms = value;
        }
        if let Some(value) = self.election_timeout_max_ms {
            consensus.election_timeout_max_ms = value;
        }
        if let Some(value) = self.snapshot_after_entries {
            consensus.snapshot_after_entries = value;
        }
        consensus
            .raft_config()
            .map_err(|error| ConfigError::Invalid { setting: "consensus timing", reason: error.to_string() })?;
        let internet = InternetServices {
            relays: self.relays.unwrap_or(false),
            dns_discovery: self.dns_discovery.unwrap_or(false),
            pkarr_discovery: self.pkarr_discovery.unwrap_or(false),
        };
        Ok(NodeConfig {
            node_id,
            data_dir,
            bind,
            peers,
            cluster_secret,
            client_token,
            metrics_addr: self.metrics_addr,
            consensus,
            internet,
            mdns_discovery: self.mdns_discovery.unwrap_or(false),
        })
    }
}

/// A complete, validated node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// Where the node keeps its files.
    pub data_dir: PathBuf,
    /// Listen address.
    pub bind: SocketAddr,
    /// Known peers.
    pub peers: Vec<StaticPeer>,
    /// The cluster secret.
    pub cluster_secret: String,
    /// The client token.
    pub client_token: String,
    /// Metrics HTTP address, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Consensus tuning.
    pub consensus: ConsensusConfig,
    /// Relays and internet discovery services (all off by default).
    pub internet: InternetServices,
    /// mDNS discovery on the LAN (off by default).
    pub mdns_discovery: bool,
}

impl NodeConfig {
    /// A loopback configuration for tests and the dev cluster.
    pub fn local(node_id: NodeId, data_dir: PathBuf, secret: &str, token: &str) -> Self {
        NodeConfig {
            node_id,
            data_dir,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: Vec::new(),
            cluster_secret: secret.to_string(),
            client_token: token.to_string(),
            metrics_addr: None,
            consensus: ConsensusConfig::new(node_id),
            internet: InternetServices::default(),
            mdns_discovery: false,
        }
    }

    /// How long the node waits for in-flight work when shutting down.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_layers_win_and_validation_is_typed() {
        let file: PartialConfig = toml::from_str(
            r#"
            node_id = 1
            data_dir = "/var/lib/aspen"
            cluster_secret = "file-secret"
            client_token = "file-token"
            peers = [{ id = 2, addr = "x@127.0.0.1:1" }]
            "#,
        )
        .expect("parse");
        let flags = PartialConfig { node_id: Some(3), client_token: Some("flag-token".into()), ..Default::default() };
        let config = flags.over(file).resolve().expect("resolve");
        assert_eq!(config.node_id, 3);
        assert_eq!(config.client_token, "flag-token");
        assert_eq!(config.cluster_secret, "file-secret");
        assert_eq!(config.peers, vec![StaticPeer { id: 2, addr: "x@127.0.0.1:1".into() }]);

        let short = PartialConfig { cluster_secret: Some("short".into()), ..config_layer() };
        assert!(matches!(short.resolve(), Err(ConfigError::Invalid { setting: "cluster_secret", .. })));
        let zero = PartialConfig { node_id: Some(0), ..config_layer() };
        assert!(matches!(zero.resolve(), Err(ConfigError::Invalid { setting: "node_id", .. })));
        let missing = PartialConfig { client_token: None, ..config_layer() };
        assert!(matches!(missing.resolve(), Err(ConfigError::Missing("client_token"))));
        let timing =
            PartialConfig { election_timeout_min_ms: Some(10), heartbeat_interval_ms: Some(50), ..config_layer() };
        assert!(matches!(timing.resolve(), Err(ConfigError::Invalid { setting: "consensus timing", .. })));
        assert!(toml::from_str::<PartialConfig>("unknown_key = 1").is_err());
        assert!("2=abc@127.0.0.1:1".parse::<StaticPeer>().is_ok());
        assert!("nope".parse::<StaticPeer>().is_err());
    }

    fn config_layer() -> PartialConfig {
        PartialConfig {
            node_id: Some(1),
            data_dir: Some("/tmp/x".into()),
            cluster_secret: Some("long-enough".into()),
            client_token: Some("t".into()),
            ..Default::default()
        }
    }
}
