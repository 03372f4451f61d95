//! Which cluster a command talks to (--peers, --cluster-dir, or ./aspen-dev) and the
//! cluster.env file that `aspen-cli dev` writes and the other commands read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use aspen_api::protocol::MAX_TOKEN_SIZE;
use aspen_client::AspenClient;
use aspen_transport::PeerAddr;

use crate::cli::ConnectionArgs;

/// Name of the file in a cluster dir that holds its peers and token.
pub const CLUSTER_ENV_FILE: &str = "cluster.env";
/// The cluster dir used when neither --peers nor --cluster-dir is given; also `dev`'s default.
pub const DEFAULT_CLUSTER_DIR: &str = "./aspen-dev";
/// The token used when neither --token nor a cluster.env gives one; also `dev`'s default.
pub const DEFAULT_TOKEN: &str = "dev-token";
/// Largest cluster.env read: a few lines of addresses, so anything bigger is not ours.
const CLUSTER_ENV_BYTES_MAX: u64 = 64 * 1024;

/// The contents of a cluster.env file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterEnv {
    /// Comma-separated node addresses.
    pub peers: String,
    /// The client token, if the file has one.
    pub token: Option<String>,
}

/// Why a cluster.env file could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterEnvError {
    /// A line is neither blank, a comment, nor KEY=VALUE.
    #[error("line {line}: expected KEY=VALUE")]
    Malformed {
        /// The line, from 1.
        line: usize,
    },
    /// The file names no peers.
    #[error("no ASPEN_PEERS line")]
    MissingPeers,
}

/// Parses `KEY=VALUE` lines. Blank lines, `#` comments, an `export ` prefix and quotes
/// around the value are accepted so the file can also be written by hand or sourced.
pub fn parse_cluster_env(text: &str) -> Result<ClusterEnv, ClusterEnvError> {
    let mut peers = None;
    let mut token = None;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line.split_once('=').ok_or(ClusterEnvError::Malformed { line: index + 1 })?;
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|quote| value.strip_prefix(*quote).and_then(|inner| inner.strip_suffix(*quote)))
            .unwrap_or(value);
        match key.trim() {
            "ASPEN_PEERS" => peers = Some(value.to_string()),
            "ASPEN_TOKEN" => token = Some(value.to_string()),
            _ => {}
        }
    }
    let peers = peers.filter(|peers| !peers.trim().is_empty()).ok_or(ClusterEnvError::MissingPeers)?;
    Ok(ClusterEnv { peers, token })
}

/// The cluster.env text for these peers and token.
pub fn render_cluster_env(peers: &[PeerAddr], token: &str) -> String {
    let peers: Vec<String> = peers.iter().map(PeerAddr::to_string).collect();
    format!("ASPEN_PEERS={}\nASPEN_TOKEN={token}\n", peers.join(","))
}

/// Reads DIR/cluster.env.
pub fn read_cluster_env(dir: &Path) -> anyhow::Result<ClusterEnv> {
    let path = dir.join(CLUSTER_ENV_FILE);
    let size = std::fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if size > CLUSTER_ENV_BYTES_MAX {
        bail!("{} is {size} bytes, larger than a cluster.env can be ({CLUSTER_ENV_BYTES_MAX})", path.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_cluster_env(&text).with_context(|| format!("invalid {}", path.display()))
}

/// A resolved cluster: where its nodes are and the token to present.
#[derive(Debug)]
pub struct Target {
    /// Node addresses.
    pub peers: Vec<PeerAddr>,
    /// Client token.
    pub token: String,
}

/// Decides which cluster to use: --peers, else --cluster-dir's cluster.env, else
/// `default_dir`'s cluster.env when it exists. An explicit --token always wins.
pub fn resolve(args: &ConnectionArgs, default_dir: &Path) -> anyhow::Result<Target> {
    let (peers_text, file_token, source) = match (&args.peers, &args.cluster_dir) {
        (Some(peers), _) => (peers.clone(), None, "--peers".to_string()),
        (None, Some(dir)) => {
            let env = read_cluster_env(dir)?;
            (env.peers, env.token, dir.join(CLUSTER_ENV_FILE).display().to_string())
        }
        (None, None) if default_dir.join(CLUSTER_ENV_FILE).is_file() => {
            let env = read_cluster_env(default_dir)?;
            (env.peers, env.token, default_dir.join(CLUSTER_ENV_FILE).display().to_string())
        }
        (None, None) => bail!(
            "no cluster given: pass --peers <ADDRS> (or set ASPEN_PEERS), pass --cluster-dir <DIR>, \
             or start a local cluster with `aspen-cli dev` and run commands from the same directory"
        ),
    };
    let peers = AspenClient::parse_peers(&peers_text).with_context(|| format!("invalid node address in {source}"))?;
    if peers.is_empty() {
        bail!("{source} lists no node addresses");
    }
    let token = args.token.clone().or(file_token).unwrap_or_else(|| DEFAULT_TOKEN.to_string());
    if token.len() > MAX_TOKEN_SIZE {
        bail!("the token is {} bytes, the limit is {MAX_TOKEN_SIZE}", token.len());
    }
    Ok(Target { peers, token })
}

/// Connects to the cluster the options name.
pub async fn connect(args: &ConnectionArgs) -> anyhow::Result<AspenClient> {
    let target = resolve(args, &PathBuf::from(DEFAULT_CLUSTER_DIR))?;
    connect_to(target.peers, &target.token, Duration::from_secs(args.timeout_secs)).await
}

/// Connects to `peers` with `token`, retrying calls for up to `retry_deadline`.
pub async fn connect_to(peers: Vec<PeerAddr>, token: &str, retry_deadline: Duration) -> anyhow::Result<AspenClient> {
    let client = AspenClient::connect(peers, token).await.context("cannot start the client")?;
    Ok(client.with_retry_deadline(retry_deadline))
}

/// Closes a client's endpoint gracefully before the process exits (dropping an open iroh
/// endpoint logs an error and peers would see an abrupt close).
pub async fn release(client: Arc<AspenClient>) {
    client.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> String {
        format!("{}@127.0.0.1:7101", aspen_transport::SecretKey::from_bytes(&[7; 32]).public())
    }

    fn args(peers: Option<&str>, token: Option<&str>, cluster_dir: Option<&Path>) -> ConnectionArgs {
        ConnectionArgs {
            peers: peers.map(str::to_string),
            token: token.map(str::to_string),
            cluster_dir: cluster_dir.map(Path::to_path_buf),
            timeout_secs: 15,
        }
    }

    #[test]
    fn cluster_env_parsing_accepts_what_dev_writes_and_hand_edits() {
        let cases: Vec<(&str, Result<ClusterEnv, ClusterEnvError>)> = vec![
            ("ASPEN_PEERS=a,b\nASPEN_TOKEN=t\n", Ok(ClusterEnv { peers: "a,b".into(), token: Some("t".into()) })),
            ("# dev cluster\n\nexport ASPEN_PEERS=\"a\"\nOTHER=x\n", Ok(ClusterEnv { peers: "a".into(), token: None })),
            ("ASPEN_TOKEN='t'\nASPEN_PEERS = a \n", Ok(ClusterEnv { peers: "a".into(), token: Some("t".into()) })),
            ("ASPEN_TOKEN=t\n", Err(ClusterEnvError::MissingPeers)),
            ("ASPEN_PEERS=\n", Err(ClusterEnvError::MissingPeers)),
            ("ASPEN_PEERS=a\nnonsense\n", Err(ClusterEnvError::Malformed { line: 2 })),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_cluster_env(text), expected, "{text:?}");
        }
    }

    #[test]
    fn rendered_cluster_env_parses_back() {
        let peer = peer();
        let peers = AspenClient::parse_peers(&format!("{peer},{peer}")).expect("peers");
        let text = render_cluster_env(&peers, "secret-token");
        assert_eq!(
            parse_cluster_env(&text),
            Ok(ClusterEnv { peers: format!("{peer},{peer}"), token: Some("secret-token".into()) })
        );
    }

    #[test]
    fn peers_flag_wins_then_cluster_dir_then_default_dir() {
        let peer = peer();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CLUSTER_ENV_FILE), format!("ASPEN_PEERS={peer}\nASPEN_TOKEN=file\n"))
            .expect("write");
        let missing = dir.path().join("missing");

        let target = resolve(&args(Some(&peer), None, Some(dir.path())), &missing).expect("peers flag");
        assert_eq!((target.peers.len(), target.token.as_str()), (1, DEFAULT_TOKEN));

        let target = resolve(&args(None, None, Some(dir.path())), &missing).expect("cluster dir");
        assert_eq!(target.token, "file");

        let target = resolve(&args(None, Some("flag"), None), dir.path()).expect("default dir");
        assert_eq!(target.token, "flag");

        let error = resolve(&args(None, None, None), &missing).expect_err("nothing given");
        assert!(error.to_string().contains("aspen-cli dev"), "{error}");

        let error = resolve(&args(None, None, Some(&missing)), dir.path()).expect_err("missing file");
        assert!(format!("{error:#}").contains("cluster.env"), "{error:#}");

        let error = resolve(&args(Some("not-an-address"), None, None), &missing).expect_err("bad peer");
        assert!(format!("{error:#}").contains("--peers"), "{error:#}");
    }
}
