//! Node configuration: a TOML file, then environment variables, then flags (later wins).
//! The binary parses env and flags into a [`PartialConfig`]; merging and validation live
//! here so tests can call them.
//!
//! The cluster secret and the two client tokens (data and admin) can each be given as a
//! value or as the path of a file holding it, so that no secret has to appear on a command
//! line, where every local user can read it. Secrets are [`Secret`]s: `Debug` of any
//! configuration shows `<redacted>` in their place. A config file or secret file that
//! users other than its owner can read gets a warning at startup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aspen_api::limits::MAX_PEERS;
use aspen_api::protocol::MAX_TOKEN_SIZE;
use aspen_api::{NodeId, Secret};
use aspen_consensus::ConsensusConfig;
use aspen_transport::InternetServices;
use aspen_transport::secret_file::{self, SecretFileError, warn_if_exposed};
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
    pub cluster_secret: Option<Secret>,
    /// File holding the cluster secret (instead of `cluster_secret`).
    pub cluster_secret_file: Option<PathBuf>,
    /// Token that grants clients data access: reads and writes of keys.
    pub client_token: Option<Secret>,
    /// File holding the client token (instead of `client_token`).
    pub client_token_file: Option<PathBuf>,
    /// Token that grants clients everything, cluster administration too; must differ from
    /// the client token.
    pub admin_token: Option<Secret>,
    /// File holding the admin token (instead of `admin_token`).
    pub admin_token_file: Option<PathBuf>,
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
    /// Reads a TOML file, warning when it holds a secret that others can read.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.display().to_string(), reason: error.to_string() })?;
        let layer: PartialConfig = toml::from_str(&text)
            .map_err(|error| ConfigError::Parse { path: path.display().to_string(), reason: error.to_string() })?;
        if layer.holds_secrets() {
            warn_if_exposed(path, "a secret or token");
        }
        Ok(layer)
    }

    /// Whether this layer holds a secret or token itself (not just a file's path).
    pub fn holds_secrets(&self) -> bool {
        self.cluster_secret.is_some() || self.client_token.is_some() || self.admin_token.is_some()
    }

    /// This layer with every unset setting taken from `lower`.
    pub fn over(self, lower: PartialConfig) -> PartialConfig {
        // A secret's value and its file are one setting: a layer giving either replaces
        // both, so a file in the flags overrides a value in the config file and back.
        let (cluster_secret, cluster_secret_file) = either_pair(
            (self.cluster_secret, self.cluster_secret_file),
            (lower.cluster_secret, lower.cluster_secret_file),
        );
        let (client_token, client_token_file) =
            either_pair((self.client_token, self.client_token_file), (lower.client_token, lower.client_token_file));
        let (admin_token, admin_token_file) =
            either_pair((self.admin_token, self.admin_token_file), (lower.admin_token, lower.admin_token_file));
        PartialConfig {
            node_id: self.node_id.or(lower.node_id),
            data_dir: self.data_dir.or(lower.data_dir),
            bind: self.bind.or(lower.bind),
            peers: self.peers.or(lower.peers),
            cluster_secret,
            cluster_secret_file,
            client_token,
            client_token_file,
            admin_token,
            admin_token_file,
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
        let cluster_secret = secret_setting("cluster_secret", self.cluster_secret, self.cluster_secret_file)?;
        if cluster_secret.len() < MIN_SECRET_LEN {
            return Err(ConfigError::Invalid {
                setting: "cluster_secret",
                reason: format!("must be at least {MIN_SECRET_LEN} bytes"),
            });
        }
        let client_token = secret_setting("client_token", self.client_token, self.client_token_file)?;
        let admin_token = secret_setting("admin_token", self.admin_token, self.admin_token_file)?;
        for (setting, token) in [("client_token", &client_token), ("admin_token", &admin_token)] {
            if token.is_empty() || token.len() > MAX_TOKEN_SIZE {
                return Err(ConfigError::Invalid { setting, reason: format!("must be 1..={MAX_TOKEN_SIZE} bytes") });
            }
        }
        if admin_token == client_token {
            return Err(ConfigError::Invalid {
                setting: "admin_token",
                reason: "must differ from client_token: whoever holds the client token must not administer the cluster"
                    .into(),
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
            admin_token,
            metrics_addr: self.metrics_addr,
            consensus,
            internet,
            mdns_discovery: self.mdns_discovery.unwrap_or(false),
        })
    }
}

/// `upper` if it gives the setting (its value or its file), else `lower`.
fn either_pair<T, U>(upper: (Option<T>, Option<U>), lower: (Option<T>, Option<U>)) -> (Option<T>, Option<U>) {
    if upper.0.is_some() || upper.1.is_some() { upper } else { lower }
}

/// A secret given as a value or as a file holding it (one of the two).
fn secret_setting(setting: &'static str, value: Option<Secret>, file: Option<PathBuf>) -> Result<Secret, ConfigError> {
    match (value, file) {
        (Some(value), None) => Ok(value),
        (None, Some(path)) => read_secret_file(setting, &path),
        (Some(_), Some(path)) => Err(ConfigError::Invalid {
            setting,
            reason: format!("given both as a value and as the file {}; give one", path.display()),
        }),
        (None, None) => Err(ConfigError::Missing(setting)),
    }
}

/// Reads `setting`'s secret from a file (see [`aspen_transport::secret_file`]), warning when
/// users other than the owner can read it.
pub fn read_secret_file(setting: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    secret_file::read_secret_file(path, setting).map_err(|error| match error {
        SecretFileError::Read { path, source } => ConfigError::Read { path, reason: source.to_string() },
        error @ SecretFileError::TooLarge { .. } => ConfigError::Invalid { setting, reason: error.to_string() },
    })
}

/// A complete, validated node configuration. `Debug` shows `<redacted>` for the secret
/// and the tokens.
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
    pub cluster_secret: Secret,
    /// The client (data) token: reads and writes of keys.
    pub client_token: Secret,
    /// The admin token: everything the client token allows, and cluster administration.
    pub admin_token: Secret,
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
    /// A loopback configuration for tests and the dev cluster: cluster `secret`, data
    /// `token` and `admin_token`.
    pub fn local(node_id: NodeId, data_dir: PathBuf, secret: &str, token: &str, admin_token: &str) -> Self {
        NodeConfig {
            node_id,
            data_dir,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: Vec::new(),
            cluster_secret: Secret::new(secret),
            client_token: Secret::new(token),
            admin_token: Secret::new(admin_token),
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
            admin_token = "file-admin"
            peers = [{ id = 2, addr = "x@127.0.0.1:1" }]
            "#,
        )
        .expect("parse");
        let flags = PartialConfig { node_id: Some(3), client_token: Some("flag-token".into()), ..Default::default() };
        let config = flags.over(file).resolve().expect("resolve");
        assert_eq!(config.node_id, 3);
        assert_eq!(config.client_token.expose(), "flag-token");
        assert_eq!(config.admin_token.expose(), "file-admin");
        assert_eq!(config.cluster_secret.expose(), "file-secret");
        assert_eq!(config.peers, vec![StaticPeer { id: 2, addr: "x@127.0.0.1:1".into() }]);

        let short = PartialConfig { cluster_secret: Some("short".into()), ..config_layer() };
        assert!(matches!(short.resolve(), Err(ConfigError::Invalid { setting: "cluster_secret", .. })));
        let zero = PartialConfig { node_id: Some(0), ..config_layer() };
        assert!(matches!(zero.resolve(), Err(ConfigError::Invalid { setting: "node_id", .. })));
        let missing = PartialConfig { client_token: None, ..config_layer() };
        assert!(matches!(missing.resolve(), Err(ConfigError::Missing("client_token"))));
        let missing = PartialConfig { admin_token: None, ..config_layer() };
        assert!(matches!(missing.resolve(), Err(ConfigError::Missing("admin_token"))));
        let same = PartialConfig { admin_token: Some("t".into()), ..config_layer() };
        assert!(matches!(same.resolve(), Err(ConfigError::Invalid { setting: "admin_token", .. })));
        let long = PartialConfig { admin_token: Some("a".repeat(MAX_TOKEN_SIZE + 1).into()), ..config_layer() };
        assert!(matches!(long.resolve(), Err(ConfigError::Invalid { setting: "admin_token", .. })));
        let timing =
            PartialConfig { election_timeout_min_ms: Some(10), heartbeat_interval_ms: Some(50), ..config_layer() };
        assert!(matches!(timing.resolve(), Err(ConfigError::Invalid { setting: "consensus timing", .. })));
        assert!(toml::from_str::<PartialConfig>("unknown_key = 1").is_err());
        assert!("2=abc@127.0.0.1:1".parse::<StaticPeer>().is_ok());
        assert!("nope".parse::<StaticPeer>().is_err());
    }

    /// Writes `text` to `name` in `dir` with `mode`.
    fn file_with_mode(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn secrets_come_from_files_and_a_file_in_a_higher_layer_replaces_a_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = file_with_mode(dir.path(), "secret", "secret-from-file\n", 0o600);
        let token = file_with_mode(dir.path(), "token", "  data-from-file\r\n", 0o600);
        let admin = file_with_mode(dir.path(), "admin", "admin-from-file", 0o600);
        let file: PartialConfig = toml::from_str(&format!(
            "cluster_secret_file = {:?}\nclient_token = \"inline-token\"\n",
            secret.display().to_string()
        ))
        .expect("parse");
        let flags = PartialConfig {
            client_token_file: Some(token.clone()),
            admin_token_file: Some(admin.clone()),
            ..PartialConfig { cluster_secret: None, client_token: None, admin_token: None, ..config_layer() }
        };
        let config = flags.over(file).resolve().expect("resolve");
        assert_eq!(config.cluster_secret.expose(), "secret-from-file");
        assert_eq!(config.client_token.expose(), "data-from-file");
        assert_eq!(config.admin_token.expose(), "admin-from-file");

        // A value in a higher layer replaces a lower layer's file too.
        let value = PartialConfig { client_token: Some("flag-token".into()), ..Default::default() };
        let lower = PartialConfig { client_token: None, client_token_file: Some(token.clone()), ..config_layer() };
        assert_eq!(value.over(lower).resolve().expect("resolve").client_token.expose(), "flag-token");

        let both = PartialConfig { client_token_file: Some(token), ..config_layer() };
        assert!(matches!(both.resolve(), Err(ConfigError::Invalid { setting: "client_token", .. })));
        let missing_file =
            PartialConfig { admin_token: None, admin_token_file: Some(dir.path().join("nope")), ..config_layer() };
        assert!(matches!(missing_file.resolve(), Err(ConfigError::Read { .. })));
        let huge =
            file_with_mode(dir.path(), "huge", &"x".repeat(secret_file::SECRET_FILE_BYTES_MAX as usize + 1), 0o600);
        let huge = PartialConfig { admin_token: None, admin_token_file: Some(huge), ..config_layer() };
        assert!(matches!(huge.resolve(), Err(ConfigError::Invalid { setting: "admin_token", .. })));
    }

    #[test]
    fn debug_of_a_config_shows_no_secret_or_token() {
        let config =
            NodeConfig::local(1, "/tmp/x".into(), "cluster-secret-value", "data-token-value", "admin-token-value");
        let layer = PartialConfig {
            cluster_secret: Some("cluster-secret-value".into()),
            admin_token: Some("admin-token-value".into()),
            ..config_layer()
        };
        for text in [format!("{config:?}"), format!("{config:#?}"), format!("{layer:?}")] {
            for secret in ["cluster-secret-value", "data-token-value", "admin-token-value", "long-enough"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains("<redacted>"), "{text}");
        }
    }

    #[test]
    fn a_config_file_warns_only_when_it_holds_a_secret_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with_secret = file_with_mode(dir.path(), "with.toml", "admin_token = \"a\"", 0o644);
        assert!(PartialConfig::from_file(&with_secret).expect("parse").holds_secrets());
        let without = file_with_mode(dir.path(), "without.toml", "admin_token_file = \"/x\"", 0o644);
        assert!(!PartialConfig::from_file(&without).expect("parse").holds_secrets());
    }

    fn config_layer() -> PartialConfig {
        PartialConfig {
            node_id: Some(1),
            data_dir: Some("/tmp/x".into()),
            cluster_secret: Some("long-enough".into()),
            client_token: Some("t".into()),
            admin_token: Some("admin".into()),
            ..Default::default()
        }
    }
}
