//! `aspen-cli dev`: a local cluster of aspen-node processes, ready for writes in a few
//! seconds, initialized on first start, reused on restart, stopped cleanly on Ctrl-C.
//!
//! A new cluster gets a random cluster secret, data token and admin token, each in a file
//! of the dev dir that only its owner can read; the nodes are given the files' paths, never
//! the secrets, because a command line is visible to every user of the machine.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use aspen_api::{ClusterError, ClusterNode, NodeId, Secret};
use aspen_client::{AspenClient, ClientError};
use aspen_transport::PeerAddr;
use serde_json::json;
use tokio::process::Child;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

use crate::Outcome;
use crate::cli::DevArgs;
use crate::cluster::{id_list, node_status_until};
use crate::connect::{
    ADMIN_TOKEN_FILE, CLUSTER_ENV_FILE, DEFAULT_CLUSTER_DIR, TOKEN_FILE, connect_to, read_token_file, release,
    render_cluster_env,
};
use crate::output::{print, print_json};

/// The node binary's name, next to aspen-cli or on PATH.
const NODE_BIN: &str = "aspen-node";
/// File in a node's data dir holding its address once it serves (written by aspen-node).
const ADDR_FILE: &str = "node.addr";
/// File in a node's data dir that receives its stdout and stderr.
const LOG_FILE: &str = "node.log";
/// Longest wait for every node to write its address.
const SERVE_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for a leader that can serve reads and writes.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for the nodes to exit after SIGTERM before they are killed.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How often startup progress is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often a running cluster's processes are checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Metrics ports sit this far above the node ports.
const METRICS_PORT_OFFSET: u16 = 100;
/// Largest node.addr read: one address line.
const ADDR_FILE_BYTES_MAX: u64 = 4096;
/// How much of the end of a node.log is read when a node fails to start.
const LOG_TAIL_BYTES: u64 = 16 * 1024;
/// Most log lines shown when a node fails to start.
const LOG_EXCERPT_LINES: usize = 15;
/// Written to node.log before each start, so an excerpt shows only the latest run.
const START_MARKER: &str = "--- aspen-cli dev: starting node";
/// A key nobody writes: reading it through the leader proves the cluster serves.
const PROBE_KEY: &[u8] = b"aspen-dev/ready-probe";
/// File in the dev dir holding the cluster secret.
const SECRET_FILE: &str = "secret";
/// Random bytes in each secret and token made for a new cluster (written as hex).
const SECRET_BYTES: usize = 32;
/// Mode of the secret and token files: read and written by their owner only.
const SECRET_FILE_MODE: u32 = 0o600;

/// The files holding a dev cluster's secret and tokens.
struct Credentials {
    /// The cluster secret the nodes prove to each other.
    secret: PathBuf,
    /// The data token.
    token: PathBuf,
    /// The admin token.
    admin_token: PathBuf,
}

impl Credentials {
    /// The dev dir's secret and token files: kept from an earlier run, or made up now for
    /// a new cluster; either way readable by their owner only.
    fn ensure(dir: &Path) -> anyhow::Result<Credentials> {
        let credentials = Credentials {
            secret: dir.join(SECRET_FILE),
            token: dir.join(TOKEN_FILE),
            admin_token: dir.join(ADMIN_TOKEN_FILE),
        };
        for path in [&credentials.secret, &credentials.token, &credentials.admin_token] {
            ensure_secret_file(path)?;
        }
        Ok(credentials)
    }

    /// The admin token, which dev itself uses: it initializes the cluster.
    fn read_admin_token(&self) -> anyhow::Result<Secret> {
        read_token_file(&self.admin_token)?.filter(|token| !token.is_empty()).with_context(|| {
            format!("{} is empty; delete it and the dev dir's other secrets", self.admin_token.display())
        })
    }
}

/// `SECRET_BYTES` random bytes as hex.
fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|error| anyhow!("no randomness for a secret: {error}"))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Makes `path` hold a random secret unless it exists, and leaves it mode 0600.
fn ensure_secret_file(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // Created with its final mode, so the secret is never readable by others, not even
    // for a moment.
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(SECRET_FILE_MODE).open(path) {
        Ok(mut file) => {
            writeln!(file, "{}", random_hex()?).with_context(|| format!("cannot write {}", path.display()))?;
            file.sync_all().with_context(|| format!("cannot write {}", path.display()))?;
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error).with_context(|| format!("cannot create {}", path.display())),
    }
    // Also for a file kept from an earlier run, or created under a stricter umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SECRET_FILE_MODE))
        .with_context(|| format!("cannot make {} private", path.display()))
}

/// One running aspen-node.
struct NodeProcess {
    id: NodeId,
    dir: PathBuf,
    child: Child,
    /// Set once its exit has been reported, so it is reported once.
    exited: bool,
}

/// SIGINT or SIGTERM. Both streams are created up front so a signal that arrives between
/// two waits is kept, not lost.
struct ShutdownSignal {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignal {
    fn new() -> anyhow::Result<Self> {
        let interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        Ok(ShutdownSignal { interrupt, terminate })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Starts the cluster, reports how to use it, runs until SIGINT or SIGTERM, and stops
/// every node it started, whatever happened.
pub async fn run(args: &DevArgs, json: bool) -> anyhow::Result<Outcome> {
    let mut nodes = Vec::with_capacity(usize::from(args.nodes));
    let outcome = serve(args, json, &mut nodes).await;
    stop(&mut nodes).await;
    outcome.map(|()| Outcome::Done)
}

async fn serve(args: &DevArgs, json: bool, nodes: &mut Vec<NodeProcess>) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut shutdown = ShutdownSignal::new()?;
    let node_bin = find_node_bin(args.node_bin.as_deref());
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let credentials = Credentials::ensure(&args.data_dir)?;
    let ready = tokio::select! {
        ready = start(args, &credentials, &node_bin, nodes) => ready?,
        () = shutdown.recv() => bail!("interrupted while starting"),
    };
    report_ready(args, &credentials, &ready, started.elapsed(), json)?;
    watch(nodes, &mut shutdown).await
}

/// What a started cluster looks like.
struct Ready {
    peers: Vec<PeerAddr>,
    leader: NodeId,
}

async fn start(
    args: &DevArgs,
    credentials: &Credentials,
    node_bin: &Path,
    nodes: &mut Vec<NodeProcess>,
) -> anyhow::Result<Ready> {
    let noun = if args.nodes == 1 { "process" } else { "processes" };
    eprintln!("starting {} aspen-node {noun} in {}", args.nodes, args.data_dir.display());
    let admin_token = credentials.read_admin_token()?;
    for id in 1..=NodeId::from(args.nodes) {
        nodes.push(spawn_node(args, credentials, node_bin, id)?);
    }
    let peers = wait_until_serving(nodes).await?;
    let client = Arc::new(connect_to(peers.clone(), admin_token, LEADER_WAIT).await?);
    let leader = match initialize_if_new(&client, &peers).await {
        Ok(()) => wait_for_leader(&client, &peers).await,
        Err(error) => Err(error),
    };
    release(client).await;
    let leader = leader?;
    let env_path = args.data_dir.join(CLUSTER_ENV_FILE);
    write_atomically(&env_path, &render_cluster_env(&peers))?;
    Ok(Ready { peers, leader })
}

/// `--node-bin`, else aspen-node next to this executable (how cargo lays out a workspace),
/// else aspen-node on PATH.
fn find_node_bin(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    match std::env::current_exe() {
        Ok(exe) if exe.with_file_name(NODE_BIN).is_file() => exe.with_file_name(NODE_BIN),
        _ => PathBuf::from(NODE_BIN),
    }
}

fn node_port(base: u16, id: NodeId, offset: u16) -> anyhow::Result<u16> {
    let port = u64::from(base) + u64::from(offset) + id - 1;
    u16::try_from(port).map_err(|_| anyhow!("port {port} for node {id} is above 65535; lower --base-port"))
}

fn spawn_node(args: &DevArgs, credentials: &Credentials, node_bin: &Path, id: NodeId) -> anyhow::Result<NodeProcess> {
    let dir = args.data_dir.join(format!("node-{id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // A stale address from the last run would make a node look ready before it serves.
    match std::fs::remove_file(dir.join(ADDR_FILE)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(error).with_context(|| format!("cannot remove {}", dir.join(ADDR_FILE).display()));
        }
        _ => {}
    }
    let log_path = dir.join(LOG_FILE);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    writeln!(log, "{START_MARKER} {id} ---")?;
    let stderr = log.try_clone()?;
    let mut command = tokio::process::Command::new(node_bin);
    command
        .arg("--node-id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(&dir)
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", node_port(args.base_port, id, 0)?))
        // Paths, not secrets: the command line is visible to every local user.
        .arg("--cluster-secret-file")
        .arg(&credentials.secret)
        .arg("--client-token-file")
        .arg(&credentials.token)
        .arg("--admin-token-file")
        .arg(&credentials.admin_token)
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", node_port(args.base_port, id, METRICS_PORT_OFFSET)?))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        // If aspen-cli dies without stopping them, the nodes must not linger.
        .kill_on_drop(true);
    // aspen-node reads ASPEN_* settings from the environment; the user's (for another
    // cluster) must not leak into this one.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ASPEN_") {
            command.env_remove(name);
        }
    }
    let child = command.spawn().map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => anyhow!(
            "cannot find the aspen-node binary {}: build it with `cargo build -p aspen-node` or pass --node-bin",
            node_bin.display()
        ),
        _ => anyhow!("cannot start {}: {error}", node_bin.display()),
    })?;
    Ok(NodeProcess { id, dir, child, exited: false })
}

/// Waits until every node has written its address, failing fast when one exits.
async fn wait_until_serving(nodes: &mut [NodeProcess]) -> anyhow::Result<Vec<PeerAddr>> {
    let deadline = Instant::now() + SERVE_WAIT;
    let mut addrs: Vec<Option<PeerAddr>> = vec![None; nodes.len()];
    loop {
        for (node, addr) in nodes.iter_mut().zip(addrs.iter_mut()) {
            if addr.is_some() {
                continue;
            }
            if let Some(status) = node.child.try_wait()? {
                node.exited = true;
                bail!("node {} exited while starting ({status}){}", node.id, log_excerpt(&node.dir));
            }
            if let Some(found) = read_addr_file(&node.dir.join(ADDR_FILE))? {
                eprintln!("  node {} serving at {found}", node.id);
                *addr = Some(found);
            }
        }
        if addrs.iter().all(Option::is_some) {
            return Ok(addrs.into_iter().flatten().collect());
        }
        if Instant::now() >= deadline {
            let waiting: Vec<String> = nodes
                .iter()
                .zip(&addrs)
                .filter(|(_, addr)| addr.is_none())
                .map(|(node, _)| node.id.to_string())
                .collect();
            let first = nodes.iter().zip(&addrs).find(|(_, addr)| addr.is_none()).map(|(node, _)| &node.dir);
            let excerpt = first.map(|dir| log_excerpt(dir)).unwrap_or_default();
            bail!("node(s) {} did not start serving within {} s{excerpt}", waiting.join(", "), SERVE_WAIT.as_secs());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The address in a node.addr, or `None` while the file is missing or half written (the
/// node writes one line; it is complete once it ends in a newline).
fn read_addr_file(path: &Path) -> anyhow::Result<Option<PeerAddr>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut text = String::new();
    file.take(ADDR_FILE_BYTES_MAX)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !text.ends_with('\n') {
        return Ok(None);
    }
    let addr = text.trim().parse().with_context(|| format!("invalid address in {}", path.display()))?;
    Ok(Some(addr))
}

/// The end of a node's log from its latest start, for an error message.
fn log_excerpt(dir: &Path) -> String {
    let path = dir.join(LOG_FILE);
    let tail = read_tail(&path, LOG_TAIL_BYTES).unwrap_or_default();
    format!("; {} says:\n{}", path.display(), last_run_summary(&tail))
}

/// The last lines the latest run wrote, without a backtrace (RUST_BACKTRACE makes anyhow
/// print one after the error, which would push the error itself out of the excerpt).
fn last_run_summary(log: &str) -> String {
    let run = match log.rfind(START_MARKER) {
        Some(start) => log[start..].split_once('\n').map_or("", |(_, rest)| rest),
        None => log,
    };
    let run = run.split_once("\nStack backtrace:").map_or(run, |(before, _)| before);
    let lines: Vec<&str> = run.trim_end().lines().collect();
    lines[lines.len().saturating_sub(LOG_EXCERPT_LINES)..].join("\n")
}

fn read_tail(path: &Path, bytes_max: u64) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(bytes_max)))?;
    let mut bytes = Vec::new();
    file.take(bytes_max).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Initializes the cluster unless node 1 already knows its voters (a restart on an existing
/// data dir), and checks that a restarted cluster can reach quorum with the nodes running.
async fn initialize_if_new(client: &AspenClient, peers: &[PeerAddr]) -> anyhow::Result<()> {
    let first = peers.first().context("no node started")?;
    let status = node_status_until(client, first, Instant::now() + LEADER_WAIT)
        .await
        .context("node 1 does not answer status")?;
    if status.voters.is_empty() {
        let members: Vec<ClusterNode> =
            (1..).zip(peers).map(|(id, peer)| ClusterNode { id, addr: peer.to_string() }).collect();
        match client.init(members).await {
            Ok(()) => eprintln!("initialized a new cluster of {} voters", peers.len()),
            Err(ClientError::Cluster(ClusterError::AlreadyInitialized)) => {}
            Err(error) => return Err(error).context("initializing the cluster"),
        }
        return Ok(());
    }
    let running = 1..=peers.len() as NodeId;
    let running_voters = status.voters.iter().filter(|id| running.contains(id)).count();
    eprintln!("reusing the existing cluster (voters: {})", id_list(&status.voters));
    if running_voters * 2 <= status.voters.len() {
        bail!(
            "the cluster's voters are {} but only nodes 1..={} run: no quorum; restart with --nodes {}",
            id_list(&status.voters),
            peers.len(),
            status.voters.last().copied().unwrap_or(1)
        );
    }
    for id in running.filter(|id| !status.voters.contains(id) && !status.learners.contains(id)) {
        eprintln!("  note: node {id} is not a member; add it with `aspen-cli cluster add-learner` and `promote`");
    }
    Ok(())
}

/// Waits until some node names a leader and a linearizable read through it succeeds, so
/// the first write after "ready" does not wait for an election.
async fn wait_for_leader(client: &AspenClient, peers: &[PeerAddr]) -> anyhow::Result<NodeId> {
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        for peer in peers {
            let status = tokio::time::timeout_at(deadline, client.node_status(peer)).await;
            if let Ok(Ok(status)) = status
                && let Some(leader) = status.leader
            {
                client.get(PROBE_KEY).await.context("the cluster elected a leader but does not serve reads")?;
                return Ok(leader);
            }
        }
        if Instant::now() >= deadline {
            bail!("no leader within {} s; see the node logs (node-*/{LOG_FILE})", LEADER_WAIT.as_secs());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Writes a file so a concurrent reader sees the old or the new contents, never half.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

fn report_ready(
    args: &DevArgs,
    credentials: &Credentials,
    ready: &Ready,
    elapsed: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let peers: Vec<String> = ready.peers.iter().map(PeerAddr::to_string).collect();
    let dir = std::fs::canonicalize(&args.data_dir).unwrap_or_else(|_| args.data_dir.clone());
    let absolute = |path: &Path| dir.join(path.file_name().unwrap_or_default()).display().to_string();
    let (token_file, admin_token_file) = (absolute(&credentials.token), absolute(&credentials.admin_token));
    let metrics_port = node_port(args.base_port, 1, METRICS_PORT_OFFSET)?;
    if json {
        return print_json(&json!({
            "ready": true,
            "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            "leader": ready.leader,
            "peers": peers,
            "token_file": token_file,
            "admin_token_file": admin_token_file,
            "cluster_dir": dir.display().to_string(),
        }));
    }
    // Plain `aspen-cli kv ...` finds the cluster only when run from the directory holding
    // ./aspen-dev, so show that form only when it applies.
    let default_dir = std::fs::canonicalize(DEFAULT_CLUSTER_DIR).ok();
    let mut lines = vec![
        format!(
            "Aspen dev cluster ready in {:.1} s: {} nodes, leader is node {}.",
            elapsed.as_secs_f64(),
            peers.len(),
            ready.leader
        ),
        String::new(),
        "Try it:".into(),
    ];
    if default_dir.as_deref() == Some(dir.as_path()) {
        lines.push("  aspen-cli kv put hello world    # from this directory".into());
        lines.push(format!("  aspen-cli --cluster-dir {} kv get hello    # from anywhere", dir.display()));
    } else {
        lines.push(format!("  aspen-cli --cluster-dir {} kv put hello world", dir.display()));
    }
    lines.push(format!("  export ASPEN_PEERS={} ASPEN_TOKEN_FILE={token_file}", peers.join(",")));
    lines.push(String::new());
    lines.push(format!(
        "Tokens (mode 0600): {token_file} reads and writes keys; {admin_token_file} also administers the cluster."
    ));
    lines.push(format!(
        "Logs: {}/node-*/{LOG_FILE}   Metrics: http://127.0.0.1:{metrics_port}/metrics (node 1)",
        dir.display()
    ));
    lines.push("Press Ctrl-C to stop the cluster.".into());
    print(&lines.join("\n"))
}

/// Runs until SIGINT or SIGTERM, reporting nodes that exit; fails if all of them do.
async fn watch(nodes: &mut [NodeProcess], shutdown: &mut ShutdownSignal) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = shutdown.recv() => {
                eprintln!("stopping the cluster");
                return Ok(());
            }
            () = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
        for node in nodes.iter_mut().filter(|node| !node.exited) {
            if let Some(status) = node.child.try_wait()? {
                node.exited = true;
                eprintln!("warning: node {} exited ({status}); see {}", node.id, node.dir.join(LOG_FILE).display());
            }
        }
        if nodes.iter().all(|node| node.exited) {
            bail!("every node exited");
        }
    }
}

/// Sends SIGTERM to every node, waits for them to exit, and kills those that do not.
async fn stop(nodes: &mut [NodeProcess]) {
    for node in nodes.iter_mut() {
        // `id()` is `None` once the child was reaped, so a recycled pid is never signalled.
        let Some(pid) = node.child.id() else { continue };
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !sent.is_ok_and(|status| status.success()) {
            let _ = node.child.start_kill();
        }
    }
    let deadline = Instant::now() + STOP_WAIT;
    for node in nodes.iter_mut() {
        match tokio::time::timeout_at(deadline, node.child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => eprintln!("warning: waiting for node {}: {error}", node.id),
            Err(_) => {
                eprintln!("node {} did not stop within {} s; killing it", node.id, STOP_WAIT.as_secs());
                if let Err(error) = node.child.kill().await {
                    eprintln!("warning: cannot kill node {}: {error}", node.id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_the_node_id_and_stay_in_range() {
        assert_eq!(node_port(7101, 1, 0).expect("port"), 7101);
        assert_eq!(node_port(7101, 3, METRICS_PORT_OFFSET).expect("port"), 7203);
        assert!(node_port(65500, 7, METRICS_PORT_OFFSET).is_err());
    }

    #[test]
    fn addr_file_counts_only_once_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(ADDR_FILE);
        assert_eq!(read_addr_file(&path).expect("missing is fine"), None);
        let addr = format!("{}@127.0.0.1:7101", aspen_transport::SecretKey::from_bytes(&[7; 32]).public());
        std::fs::write(&path, &addr).expect("write");
        assert_eq!(read_addr_file(&path).expect("half written"), None);
        std::fs::write(&path, format!("{addr}\n")).expect("write");
        assert_eq!(read_addr_file(&path).expect("complete").map(|peer| peer.to_string()), Some(addr));
        std::fs::write(&path, "garbage\n").expect("write");
        assert!(read_addr_file(&path).is_err());
    }

    #[test]
    fn log_excerpt_shows_the_end_of_a_long_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log: String = (0..10_000).map(|line| format!("line {line}\n")).collect();
        std::fs::write(dir.path().join(LOG_FILE), log).expect("write");
        let excerpt = log_excerpt(dir.path());
        assert!(excerpt.ends_with("line 9998\nline 9999"), "{excerpt}");
        assert_eq!(excerpt.lines().count(), LOG_EXCERPT_LINES + 1);
    }

    #[test]
    fn run_summary_keeps_the_latest_run_without_its_backtrace() {
        let cases = [
            ("a\nb\n", "a\nb"),
            (
                "--- aspen-cli dev: starting node 1 ---\nold error\n--- aspen-cli dev: starting node 1 ---\n\
                 Error: starting the node\n\nCaused by:\n    cannot bind\n\nStack backtrace:\n   0: frame\n",
                "Error: starting the node\n\nCaused by:\n    cannot bind",
            ),
            ("--- aspen-cli dev: starting node 2 ---\n", ""),
        ];
        for (log, expected) in cases {
            assert_eq!(last_run_summary(log), expected, "{log:?}");
        }
    }
}
