//! Which cluster a command talks to (--peers, --cluster-dir, or ./aspen-dev) and with which
//! token: the cluster dir's cluster.env (its peers) and token files, as `aspen-cli dev`
//! writes them and the other commands read them.
//!
//! A command needing the data right (kv, sql, cluster status and metrics) uses the data
//! token if it has one (--token-file or ASPEN_TOKEN_FILE, --token or ASPEN_TOKEN, the dir's
//! `token` file, a cluster.env ASPEN_TOKEN line), else the admin token, which grants
//! everything. A cluster administration command uses the admin token if it has one
//! (--admin-token-file or ASPEN_ADMIN_TOKEN_FILE, --admin-token or ASPEN_ADMIN_TOKEN, the
//! dir's `admin-token` file), else the data token, which the node then refuses with a
//! message naming the admin token: whoever holds a single token passes it as --token-file,
//! whichever it is. Every token file is read through `aspen_transport::secret_file`, which
//! warns when users other than the file's owner can read it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use aspen_api::protocol::MAX_TOKEN_SIZE;
use aspen_api::{Right, Secret};
use aspen_client::AspenClient;
use aspen_transport::PeerAddr;
use aspen_transport::secret_file::read_secret_file;

use crate::cli::ConnectionArgs;

/// Name of the file in a cluster dir that holds its peers.
pub const CLUSTER_ENV_FILE: &str = "cluster.env";
/// Name of the file in a cluster dir that holds the data token (mode 0600).
pub const TOKEN_FILE: &str = "token";
/// Name of the file in a cluster dir that holds the admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The cluster dir used when neither --peers nor --cluster-dir is given; also `dev`'s default.
pub const DEFAULT_CLUSTER_DIR: &str = "./aspen-dev";
/// Largest cluster.env read: a few lines of addresses, so anything bigger is not ours.
const CLUSTER_ENV_BYTES_MAX: u64 = 64 * 1024;

/// The contents of a cluster.env file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterEnv {
    /// Comma-separated node addresses.
    pub peers: String,
    /// The data token, if the file has one (files written by hand or by an older `dev`;
    /// `dev` now keeps tokens in their own files).
    pub token: Option<Secret>,
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
            "ASPEN_TOKEN" => token = Some(Secret::new(value)),
            _ => {}
        }
    }
    let peers = peers.filter(|peers| !peers.trim().is_empty()).ok_or(ClusterEnvError::MissingPeers)?;
    Ok(ClusterEnv { peers, token })
}

/// The cluster.env text for these peers. No token: cluster.env is not a secret, the token
/// files are.
pub fn render_cluster_env(peers: &[PeerAddr]) -> String {
    let peers: Vec<String> = peers.iter().map(PeerAddr::to_string).collect();
    format!("ASPEN_PEERS={}\n", peers.join(","))
}

/// Reads a token file of a cluster dir: `None` when there is none, else its contents without
/// surrounding whitespace, warning when users other than its owner can read it.
pub fn read_token_file(path: &Path) -> anyhow::Result<Option<Secret>> {
    match read_secret_file(path, "a client token") {
        Ok(token) => Ok(Some(token)),
        Err(error) if error.is_not_found() => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// The token given by an option's value or its file (`--token`/ASPEN_TOKEN or
/// `--token-file`/ASPEN_TOKEN_FILE; likewise for the admin token), if either; both is an
/// error, as for the node's settings.
fn given_token(value: &Option<Secret>, file: &Option<PathBuf>, names: (&str, &str)) -> anyhow::Result<Option<Secret>> {
    match (value, file) {
        (Some(_), Some(_)) => bail!("{} and {} both give a token; give one", names.0, names.1),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(path)) => Ok(Some(read_secret_file(path, "a client token")?)),
        (None, None) => Ok(None),
    }
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
    /// The data or admin token.
    pub token: Secret,
}

/// Decides which cluster to use: --peers, else --cluster-dir's cluster.env, else
/// `default_dir`'s cluster.env when it exists; and which token to present for a command
/// needing `right` (see the module's comment). Tokens given as options beat the dir's files.
pub fn resolve(args: &ConnectionArgs, default_dir: &Path, right: Right) -> anyhow::Result<Target> {
    let (peers_text, dir, env_token, source) = match (&args.peers, &args.cluster_dir) {
        (Some(peers), _) => (peers.clone(), None, None, "--peers".to_string()),
        (None, Some(dir)) => {
            let env = read_cluster_env(dir)?;
            (env.peers, Some(dir.as_path()), env.token, dir.join(CLUSTER_ENV_FILE).display().to_string())
        }
        (None, None) if default_dir.join(CLUSTER_ENV_FILE).is_file() => {
            let env = read_cluster_env(default_dir)?;
            (env.peers, Some(default_dir), env.token, default_dir.join(CLUSTER_ENV_FILE).display().to_string())
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
    let dir_token = |name: &str| -> anyhow::Result<Option<Secret>> {
        match dir {
            Some(dir) => read_token_file(&dir.join(name)),
            None => Ok(None),
        }
    };
    let data = || -> anyhow::Result<Option<Secret>> {
        let given =
            given_token(&args.token, &args.token_file, ("--token (ASPEN_TOKEN)", "--token-file (ASPEN_TOKEN_FILE)"))?;
        Ok(given.or(dir_token(TOKEN_FILE)?).or_else(|| env_token.clone()))
    };
    let admin = || -> anyhow::Result<Option<Secret>> {
        let names = ("--admin-token (ASPEN_ADMIN_TOKEN)", "--admin-token-file (ASPEN_ADMIN_TOKEN_FILE)");
        Ok(given_token(&args.admin_token, &args.admin_token_file, names)?.or(dir_token(ADMIN_TOKEN_FILE)?))
    };
    let token = match right {
        Right::Data => data()?.or(admin()?),
        Right::Admin => admin()?.or(data()?),
    };
    let Some(token) = token else {
        bail!(
            "no token: pass --token-file <FILE> (or set ASPEN_TOKEN; cluster administration needs \
             --admin-token-file or ASPEN_ADMIN_TOKEN), or use a cluster dir whose token files `aspen-cli dev` wrote"
        );
    };
    if token.len() > MAX_TOKEN_SIZE {
        bail!("the token is {} bytes, the limit is {MAX_TOKEN_SIZE}", token.len());
    }
    Ok(Target { peers, token })
}

/// Connects to the cluster the options name, with the token for commands needing `right`.
pub async fn connect(args: &ConnectionArgs, right: Right) -> anyhow::Result<AspenClient> {
    let target = resolve(args, &PathBuf::from(DEFAULT_CLUSTER_DIR), right)?;
    connect_to(target.peers, target.token, Duration::from_secs(args.timeout_secs)).await
}

/// Connects to `peers` with `token`, retrying calls for up to `retry_deadline`.
pub async fn connect_to(peers: Vec<PeerAddr>, token: Secret, retry_deadline: Duration) -> anyhow::Result<AspenClient> {
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
            token: token.map(Secret::new),
            token_file: None,
            admin_token: None,
            admin_token_file: None,
            cluster_dir: cluster_dir.map(Path::to_path_buf),
            timeout_secs: 15,
        }
    }

    #[test]
    fn cluster_env_parsing_accepts_what_dev_writes_and_hand_edits() {
        let token = |text: &str| Some(Secret::new(text));
        let cases: Vec<(&str, Result<ClusterEnv, ClusterEnvError>)> = vec![
            ("ASPEN_PEERS=a,b\n", Ok(ClusterEnv { peers: "a,b".into(), token: None })),
            ("ASPEN_PEERS=a,b\nASPEN_TOKEN=t\n", Ok(ClusterEnv { peers: "a,b".into(), token: token("t") })),
            ("# dev cluster\n\nexport ASPEN_PEERS=\"a\"\nOTHER=x\n", Ok(ClusterEnv { peers: "a".into(), token: None })),
            ("ASPEN_TOKEN='t'\nASPEN_PEERS = a \n", Ok(ClusterEnv { peers: "a".into(), token: token("t") })),
            ("ASPEN_TOKEN=t\n", Err(ClusterEnvError::MissingPeers)),
            ("ASPEN_PEERS=\n", Err(ClusterEnvError::MissingPeers)),
            ("ASPEN_PEERS=a\nnonsense\n", Err(ClusterEnvError::Malformed { line: 2 })),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_cluster_env(text), expected, "{text:?}");
        }
    }

    #[test]
    fn rendered_cluster_env_parses_back_and_holds_no_token() {
        let peer = peer();
        let peers = AspenClient::parse_peers(&format!("{peer},{peer}")).expect("peers");
        let text = render_cluster_env(&peers);
        assert!(!text.contains("TOKEN"), "{text}");
        assert_eq!(parse_cluster_env(&text), Ok(ClusterEnv { peers: format!("{peer},{peer}"), token: None }));
    }

    #[test]
    fn peers_flag_wins_then_cluster_dir_then_default_dir() {
        let peer = peer();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CLUSTER_ENV_FILE), format!("ASPEN_PEERS={peer}\nASPEN_TOKEN=file\n"))
            .expect("write");
        let missing = dir.path().join("missing");

        let error = resolve(&args(Some(&peer), None, Some(dir.path())), &missing, Right::Data).expect_err("no token");
        assert!(error.to_string().contains("--token"), "{error}");
        let target = resolve(&args(Some(&peer), Some("flag"), Some(dir.path())), &missing, Right::Data).expect("peers");
        assert_eq!((target.peers.len(), target.token.expose()), (1, "flag"));

        let target = resolve(&args(None, None, Some(dir.path())), &missing, Right::Data).expect("cluster dir");
        assert_eq!(target.token.expose(), "file");

        let target = resolve(&args(None, Some("flag"), None), dir.path(), Right::Data).expect("default dir");
        assert_eq!(target.token.expose(), "flag");

        let error = resolve(&args(None, None, None), &missing, Right::Data).expect_err("nothing given");
        assert!(error.to_string().contains("aspen-cli dev"), "{error}");

        let error = resolve(&args(None, None, Some(&missing)), dir.path(), Right::Data).expect_err("missing file");
        assert!(format!("{error:#}").contains("cluster.env"), "{error:#}");

        let error =
            resolve(&args(Some("not-an-address"), Some("t"), None), &missing, Right::Data).expect_err("bad peer");
        assert!(format!("{error:#}").contains("--peers"), "{error:#}");
    }

    #[test]
    fn each_command_takes_its_own_token_first_and_the_other_when_it_has_only_one() {
        let peer = peer();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CLUSTER_ENV_FILE), format!("ASPEN_PEERS={peer}\n")).expect("write");
        std::fs::write(dir.path().join(TOKEN_FILE), "data-file\n").expect("write");
        std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), "admin-file\n").expect("write");
        let token = |args: &ConnectionArgs, right| {
            resolve(args, dir.path(), right).expect("resolve").token.expose().to_string()
        };

        // The dev dir's files: each command its own token.
        let plain = args(None, None, None);
        assert_eq!(token(&plain, Right::Data), "data-file");
        assert_eq!(token(&plain, Right::Admin), "admin-file");
        // Options beat files for the same right.
        let both =
            ConnectionArgs { admin_token: Some(Secret::new("admin-flag")), ..args(None, Some("data-flag"), None) };
        assert_eq!(token(&both, Right::Data), "data-flag");
        assert_eq!(token(&both, Right::Admin), "admin-flag");
        // A token for the right itself, from any source, beats the other right's.
        let data_flag = args(None, Some("data-flag"), None);
        assert_eq!(token(&data_flag, Right::Admin), "admin-file");

        // With one token only, every command presents it (the admin token can do anything;
        // the data token is refused by the node for administration, naming the admin token).
        std::fs::remove_file(dir.path().join(ADMIN_TOKEN_FILE)).expect("remove");
        assert_eq!(token(&plain, Right::Admin), "data-file");
        std::fs::remove_file(dir.path().join(TOKEN_FILE)).expect("remove");
        let admin_only = ConnectionArgs { admin_token: Some(Secret::new("admin-flag")), ..args(None, None, None) };
        assert_eq!(token(&admin_only, Right::Data), "admin-flag");

        std::fs::write(dir.path().join(TOKEN_FILE), "x".repeat(MAX_TOKEN_SIZE + 3)).expect("write");
        assert!(resolve(&plain, dir.path(), Right::Data).is_err(), "an oversized token file is refused");
    }

    #[test]
    fn token_files_given_as_options_beat_the_dirs_and_a_value_with_a_file_is_refused() {
        let peer = peer();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CLUSTER_ENV_FILE), format!("ASPEN_PEERS={peer}\n")).expect("write");
        std::fs::write(dir.path().join(TOKEN_FILE), "data-dir-file\n").expect("write");
        std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), "admin-dir-file\n").expect("write");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let (data_file, admin_file) = (elsewhere.path().join("data"), elsewhere.path().join("admin"));
        std::fs::write(&data_file, " data-option-file\n").expect("write");
        std::fs::write(&admin_file, "admin-option-file\n").expect("write");
        let token = |args: &ConnectionArgs, right| {
            resolve(args, dir.path(), right).expect("resolve").token.expose().to_string()
        };

        let files = ConnectionArgs {
            token_file: Some(data_file.clone()),
            admin_token_file: Some(admin_file.clone()),
            ..args(None, None, None)
        };
        assert_eq!(token(&files, Right::Data), "data-option-file");
        assert_eq!(token(&files, Right::Admin), "admin-option-file");
        let data_only = ConnectionArgs { token_file: Some(data_file.clone()), ..args(None, None, None) };
        assert_eq!(token(&data_only, Right::Admin), "admin-dir-file", "the admin right still finds its own token");

        // A value and a file for the same token: which one was meant is unclear.
        let both = ConnectionArgs { token_file: Some(data_file), ..args(None, Some("value"), None) };
        let error = resolve(&both, dir.path(), Right::Data).expect_err("both");
        assert!(error.to_string().contains("--token-file"), "{error}");
        let both_admin = ConnectionArgs {
            admin_token: Some(Secret::new("value")),
            admin_token_file: Some(admin_file),
            ..args(None, None, None)
        };
        assert!(resolve(&both_admin, dir.path(), Right::Admin).is_err(), "both admin forms are refused too");

        // A token file named explicitly must exist: no silent fallback to another token.
        let missing = ConnectionArgs { token_file: Some(elsewhere.path().join("nope")), ..args(None, None, None) };
        let error = resolve(&missing, dir.path(), Right::Data).expect_err("missing file");
        assert!(format!("{error:#}").contains("nope"), "{error:#}");
    }
}
