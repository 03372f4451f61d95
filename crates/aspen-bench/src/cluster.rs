//! Starting the two 3-node clusters as real processes on loopback, each member with its own
//! data dir on the same disk, and stopping them whatever happens: every process is owned
//! by a [`ChildGuard`] that kills it when dropped, so an error, a panic or Ctrl-C (handled
//! by the binary as an error) leaves nothing running.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aspen_api::{ClientRequest, ClientResponse, ClusterNode, GetRequest, ReadConsistency, Secret};
use aspen_client::{AspenClient, ClientError};
use aspen_transport::PeerAddr;
use tokio::time::Instant;

use crate::etcd::{EtcdClient, PutRequest};

/// Members per cluster.
pub const MEMBERS: usize = 3;
/// Longest wait for a cluster to serve after its processes start.
const READY_WAIT: Duration = Duration::from_secs(30);
/// How often startup progress is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How much of the end of a member's log an error shows.
const LOG_TAIL_BYTES: u64 = 4096;
/// Largest node.addr read: one address line.
const ADDR_FILE_BYTES_MAX: u64 = 4096;
/// Where each process's stdout and stderr go, inside its data dir.
const LOG_FILE: &str = "process.log";

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file or directory operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("cannot start {program}: {source} (is it installed? `cargo xtask bench etcd` installs etcd)")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A process exited while starting.
    #[error("{name} exited while starting ({status}); the end of {log}:\n{tail}")]
    Exited {
        /// Which member.
        name: String,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// The cluster did not become ready in time.
    #[error("{what} not ready within {waited:?}: {detail}")]
    NotReady {
        /// Which cluster or member.
        what: String,
        /// How long it was given.
        waited: Duration,
        /// The last thing that failed.
        detail: String,
    },
    /// An Aspen client call failed.
    #[error(transparent)]
    Aspen(#[from] ClientError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A running child process, killed and reaped when dropped.
pub struct ChildGuard {
    name: String,
    log: PathBuf,
    child: Child,
}

impl ChildGuard {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: impl Into<String>, mut command: Command, log: PathBuf) -> Result<Self, ClusterError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_error(format!("cannot open {}", log.display())))?;
        let stderr = file.try_clone().map_err(io_error("cannot duplicate a log handle"))?;
        command.stdin(Stdio::null()).stdout(file).stderr(stderr);
        let program = PathBuf::from(command.get_program());
        let child = command.spawn().map_err(|source| ClusterError::Spawn { program, source })?;
        Ok(ChildGuard { name: name.into(), log, child })
    }

    /// Kills the process with SIGKILL (no chance to say goodbye to its peers, as in a crash)
    /// and reaps it.
    pub fn sigkill(&mut self) -> Result<(), ClusterError> {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().map_err(io_error(format!("cannot kill {}", self.name)))?;
        }
        self.child.wait().map_err(io_error(format!("cannot reap {}", self.name)))?;
        Ok(())
    }

    /// Fails with the end of the log if the process has exited.
    pub fn check_running(&mut self) -> Result<(), ClusterError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(ClusterError::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                log: self.log.display().to_string(),
                tail: log_tail(&self.log),
            }),
            Err(source) => Err(ClusterError::Io { what: format!("cannot poll {}", self.name), source }),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // The data is thrown away after a run, so there is nothing to shut down gracefully.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The last lines of a log file, or a note saying it could not be read.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_else(|error| format!("(cannot read the log: {error})"))
}

/// Removes `dir` if present and creates it empty.
fn fresh_dir(dir: &Path) -> Result<(), ClusterError> {
    match std::fs::remove_dir_all(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_error(format!("cannot remove {}", dir.display()))(error));
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).map_err(io_error(format!("cannot create {}", dir.display())))
}

fn port(base: u16, offset: usize) -> Result<u16, ClusterError> {
    u16::try_from(usize::from(base) + offset).map_err(|_| ClusterError::NotReady {
        what: "port plan".into(),
        waited: Duration::ZERO,
        detail: format!("port {base} + {offset} is above 65535; lower --base-port"),
    })
}

/// How to start the etcd cluster.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// The etcd binary.
    pub bin: PathBuf,
    /// Parent of the members' data dirs (emptied first).
    pub dir: PathBuf,
    /// Client ports are `base_port..base_port+3`, peer ports `base_port+10..base_port+13`.
    pub base_port: u16,
}

/// A running 3-member etcd cluster.
pub struct EtcdCluster {
    /// Client URLs, member 1 first.
    pub client_urls: Vec<String>,
    /// Client URL of the leader.
    pub leader_url: String,
    /// The server version etcd reports.
    pub version: String,
    config: EtcdConfig,
    /// The processes; dropping the cluster stops them.
    members: Vec<ChildGuard>,
}

/// The command that starts etcd member `index` (from 0) of the cluster `config` describes;
/// also restarts it on its data dir (etcd then ignores the initial-cluster settings).
fn etcd_member(config: &EtcdConfig, index: usize) -> Result<(String, Command, PathBuf), ClusterError> {
    let client_url = |index| Ok::<_, ClusterError>(format!("http://127.0.0.1:{}", port(config.base_port, index)?));
    let peer_url = |index| Ok::<_, ClusterError>(format!("http://127.0.0.1:{}", port(config.base_port, 10 + index)?));
    let initial_cluster = (0..MEMBERS)
        .map(|index| Ok(format!("e{}={}", index + 1, peer_url(index)?)))
        .collect::<Result<Vec<String>, ClusterError>>()?;
    let name = format!("e{}", index + 1);
    let data_dir = config.dir.join(&name);
    std::fs::create_dir_all(&data_dir).map_err(io_error(format!("cannot create {}", data_dir.display())))?;
    let mut command = Command::new(&config.bin);
    command
        .arg("--name")
        .arg(&name)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--listen-client-urls")
        .arg(client_url(index)?)
        .arg("--advertise-client-urls")
        .arg(client_url(index)?)
        .arg("--listen-peer-urls")
        .arg(peer_url(index)?)
        .arg("--initial-advertise-peer-urls")
        .arg(peer_url(index)?)
        .arg("--initial-cluster")
        .arg(initial_cluster.join(","))
        .arg("--initial-cluster-token")
        .arg("aspen-bench")
        .arg("--initial-cluster-state")
        .arg("new")
        .arg("--logger")
        .arg("zap")
        .arg("--log-outputs")
        .arg("stderr");
    // etcd reads ETCD_* settings from the environment; the user's must not leak in.
    for (variable, _) in std::env::vars_os() {
        if variable.to_string_lossy().starts_with("ETCD") {
            command.env_remove(variable);
        }
    }
    Ok((format!("etcd member {name}"), command, data_dir.join(LOG_FILE)))
}

impl EtcdCluster {
    /// Starts the members with etcd's defaults (fsync on), waits for a leader and a write.
    pub async fn start(config: &EtcdConfig) -> Result<EtcdCluster, ClusterError> {
        fresh_dir(&config.dir)?;
        let client_urls = (0..MEMBERS)
            .map(|index| Ok(format!("http://127.0.0.1:{}", port(config.base_port, index)?)))
            .collect::<Result<Vec<String>, ClusterError>>()?;
        let mut members = Vec::new();
        for index in 0..MEMBERS {
            let (name, command, log) = etcd_member(config, index)?;
            members.push(ChildGuard::spawn(name, command, log)?);
        }
        let (leader_url, version) = wait_for_etcd_leader(&mut members, &client_urls).await?;
        Ok(EtcdCluster { client_urls, leader_url, version, config: config.clone(), members })
    }

    /// SIGKILLs the member that leads now; returns its index.
    pub async fn kill_leader(&mut self) -> Result<usize, ClusterError> {
        let (leader_url, _) = etcd_leader(&self.client_urls).await.map_err(|detail| ClusterError::NotReady {
            what: "etcd leader".into(),
            waited: Duration::ZERO,
            detail,
        })?;
        let index =
            self.client_urls.iter().position(|url| *url == leader_url).ok_or_else(|| ClusterError::NotReady {
                what: "etcd leader".into(),
                waited: Duration::ZERO,
                detail: format!("{leader_url} is not a member's URL"),
            })?;
        self.members[index].sigkill()?;
        Ok(index)
    }

    /// Restarts member `index` on its data dir and waits until every member names the same
    /// leader and a write goes through.
    pub async fn restart(&mut self, index: usize) -> Result<(), ClusterError> {
        let (name, command, log) = etcd_member(&self.config, index)?;
        self.members[index] = ChildGuard::spawn(name, command, log)?;
        let (leader_url, _) = wait_for_etcd_leader(&mut self.members, &self.client_urls).await?;
        self.leader_url = leader_url;
        Ok(())
    }
}

/// Waits until every member answers and names the same leader, and a put through the
/// leader succeeds. Returns the leader's client URL and the server version.
async fn wait_for_etcd_leader(
    members: &mut [ChildGuard],
    client_urls: &[String],
) -> Result<(String, String), ClusterError> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        for member in members.iter_mut() {
            member.check_running()?;
        }
        let detail = match etcd_leader(client_urls).await {
            Ok((leader_url, version)) => return Ok((leader_url, version)),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            return Err(ClusterError::NotReady { what: "etcd cluster".into(), waited: READY_WAIT, detail });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn etcd_leader(client_urls: &[String]) -> Result<(String, String), String> {
    let mut leaders = Vec::new();
    let mut by_member = Vec::new();
    let mut version = String::new();
    for url in client_urls {
        let client = EtcdClient::connect(url).await.map_err(|error| error.to_string())?;
        let status = client.status().await.map_err(|error| error.to_string())?;
        let member = status.header.as_ref().map_or(0, |header| header.member_id);
        leaders.push(status.leader);
        by_member.push((member, url.clone(), client));
        version = status.version;
    }
    let leader = leaders[0];
    if leader == 0 || leaders.iter().any(|&other| other != leader) {
        return Err(format!("members disagree on the leader: {leaders:?}"));
    }
    let (_, url, client) = by_member
        .into_iter()
        .find(|(member, _, _)| *member == leader)
        .ok_or_else(|| format!("leader {leader:x} is not one of the members"))?;
    let probe = PutRequest { key: b"aspen-bench/probe".to_vec(), value: b"ready".to_vec(), lease: 0, prev_kv: false };
    client.put(probe).await.map_err(|error| error.to_string())?;
    Ok((url, version))
}

/// How to start the Aspen cluster.
#[derive(Clone, Debug)]
pub struct AspenConfig {
    /// The aspen-node binary.
    pub bin: PathBuf,
    /// Parent of the nodes' data dirs (emptied first).
    pub dir: PathBuf,
    /// Node ports are `base_port..base_port+3`.
    pub base_port: u16,
    /// The client (data) token.
    pub token: Secret,
    /// The admin token (initializes the cluster).
    pub admin_token: Secret,
    /// The cluster secret.
    pub secret: Secret,
}

/// A running 3-node Aspen cluster.
pub struct AspenCluster {
    /// Node addresses, node 1 first.
    pub peers: Vec<PeerAddr>,
    /// Address of the leader.
    pub leader: PeerAddr,
    config: AspenConfig,
    /// The processes; dropping the cluster stops them.
    nodes: Vec<ChildGuard>,
}

/// The command that starts node `index` (from 0) of the cluster `config` describes, as
/// `aspen-cli dev` does; also restarts it on its data dir.
fn aspen_node(config: &AspenConfig, index: usize) -> Result<(String, Command, PathBuf), ClusterError> {
    let id = index + 1;
    let data_dir = config.dir.join(format!("node-{id}"));
    std::fs::create_dir_all(&data_dir).map_err(io_error(format!("cannot create {}", data_dir.display())))?;
    let mut command = Command::new(&config.bin);
    command
        .arg("--node-id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", port(config.base_port, index)?))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", port(config.base_port, 10 + index)?));
    // aspen-node reads ASPEN_* settings (ASPEN_BENCH_SECS among them) from the
    // environment; none may change the nodes.
    for (variable, _) in std::env::vars_os() {
        if variable.to_string_lossy().starts_with("ASPEN_") {
            command.env_remove(variable);
        }
    }
    // Secrets through the environment: a command line is visible to every user.
    command
        .env("ASPEN_CLUSTER_SECRET", config.secret.expose())
        .env("ASPEN_CLIENT_TOKEN", config.token.expose())
        .env("ASPEN_ADMIN_TOKEN", config.admin_token.expose());
    Ok((format!("aspen-node {id}"), command, data_dir.join(LOG_FILE)))
}

impl AspenCluster {
    /// Starts the nodes as `aspen-cli dev` does, initializes the cluster and waits until the
    /// leader serves a linearizable read.
    pub async fn start(config: &AspenConfig) -> Result<AspenCluster, ClusterError> {
        fresh_dir(&config.dir)?;
        let mut nodes = Vec::new();
        for index in 0..MEMBERS {
            let (name, command, log) = aspen_node(config, index)?;
            nodes.push(ChildGuard::spawn(name, command, log)?);
        }
        let peers = wait_for_addrs(&mut nodes, &config.dir).await?;
        let client = AspenClient::connect(peers.clone(), config.admin_token.clone()).await?;
        let members: Vec<ClusterNode> =
            (1..).zip(&peers).map(|(id, peer)| ClusterNode { id, addr: peer.to_string() }).collect();
        let ready = async {
            client.init(members).await?;
            wait_for_aspen_leader(&client, &mut nodes, &peers).await
        }
        .await;
        client.close().await;
        let leader = ready?;
        Ok(AspenCluster { peers, leader, config: config.clone(), nodes })
    }

    /// SIGKILLs the node that leads now (as a live node reports it); returns its index.
    pub async fn kill_leader(&mut self) -> Result<usize, ClusterError> {
        let client = AspenClient::connect(self.peers.clone(), self.config.token.clone()).await?;
        let status = client.status().await;
        client.close().await;
        let leader = status?.leader.ok_or_else(|| ClusterError::NotReady {
            what: "aspen leader".into(),
            waited: Duration::ZERO,
            detail: "no node names a leader".into(),
        })?;
        let index = usize::try_from(leader).ok().and_then(|id| id.checked_sub(1)).filter(|index| *index < MEMBERS);
        let index = index.ok_or_else(|| ClusterError::NotReady {
            what: "aspen leader".into(),
            waited: Duration::ZERO,
            detail: format!("leader {leader} is not one of nodes 1..={MEMBERS}"),
        })?;
        self.nodes[index].sigkill()?;
        Ok(index)
    }

    /// Restarts node `index` on its data dir and waits until it serves again and the
    /// cluster has a leader that serves linearizable reads.
    pub async fn restart(&mut self, index: usize) -> Result<(), ClusterError> {
        let addr_file = self.config.dir.join(format!("node-{}", index + 1)).join("node.addr");
        match std::fs::remove_file(&addr_file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_error(format!("cannot remove {}", addr_file.display()))(error));
            }
            _ => {}
        }
        let (name, command, log) = aspen_node(&self.config, index)?;
        self.nodes[index] = ChildGuard::spawn(name, command, log)?;
        let peers = wait_for_addrs(&mut self.nodes, &self.config.dir).await?;
        let client = AspenClient::connect(peers.clone(), self.config.token.clone()).await?;
        let ready = async {
            let leader = wait_for_aspen_leader(&client, &mut self.nodes, &peers).await?;
            wait_for_aspen_catch_up(&client, &peers).await?;
            Ok::<_, ClusterError>(leader)
        }
        .await;
        client.close().await;
        self.leader = ready?;
        Ok(())
    }
}

/// Waits until every node names the same leader and has applied as much as every other
/// (no writes run meanwhile), so the next failover starts from three caught-up nodes.
async fn wait_for_aspen_catch_up(client: &AspenClient, peers: &[PeerAddr]) -> Result<(), ClusterError> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        let mut views = Vec::new();
        for peer in peers {
            let view = client.node_status(peer).await.map(|status| (status.leader, status.last_applied));
            views.push(view.unwrap_or((None, None)));
        }
        let first = views[0];
        if first.0.is_some() && views.iter().all(|view| *view == first) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let detail = format!("(leader, applied) per node: {views:?}");
            return Err(ClusterError::NotReady { what: "aspen catch-up".into(), waited: READY_WAIT, detail });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until every node has written its address to `node.addr` (one line, complete once
/// it ends in a newline), failing fast when one exits.
async fn wait_for_addrs(nodes: &mut [ChildGuard], dir: &Path) -> Result<Vec<PeerAddr>, ClusterError> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        let mut peers = Vec::new();
        for (index, node) in nodes.iter_mut().enumerate() {
            node.check_running()?;
            let path = dir.join(format!("node-{}", index + 1)).join("node.addr");
            if let Some(peer) = read_addr_file(&path)? {
                peers.push(peer);
            }
        }
        if peers.len() == nodes.len() {
            return Ok(peers);
        }
        if Instant::now() >= deadline {
            let detail = format!("{} of {} nodes wrote node.addr", peers.len(), nodes.len());
            return Err(ClusterError::NotReady { what: "aspen nodes".into(), waited: READY_WAIT, detail });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn read_addr_file(path: &Path) -> Result<Option<PeerAddr>, ClusterError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error(format!("cannot read {}", path.display()))(error)),
    };
    let mut text = String::new();
    file.take(ADDR_FILE_BYTES_MAX)
        .read_to_string(&mut text)
        .map_err(io_error(format!("cannot read {}", path.display())))?;
    if !text.ends_with('\n') {
        return Ok(None);
    }
    text.trim().parse().map(Some).map_err(|error| ClusterError::NotReady {
        what: path.display().to_string(),
        waited: Duration::ZERO,
        detail: format!("invalid address: {error}"),
    })
}

async fn wait_for_aspen_leader(
    client: &AspenClient,
    nodes: &mut [ChildGuard],
    peers: &[PeerAddr],
) -> Result<PeerAddr, ClusterError> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        for node in nodes.iter_mut() {
            node.check_running()?;
        }
        let detail = match client.node_status(&peers[0]).await {
            Ok(status) => match status
                .leader
                .and_then(|id| usize::try_from(id).ok())
                .and_then(|id| peers.get(id.checked_sub(1)?))
            {
                Some(leader) => {
                    // A linearizable read through the leader proves it serves.
                    let probe =
                        GetRequest { key: b"aspen-bench/probe".to_vec(), consistency: ReadConsistency::Linearizable };
                    match client.call_node(leader, ClientRequest::Get(probe)).await {
                        Ok(ClientResponse::Get(Ok(_))) => return Ok(leader.clone()),
                        Ok(other) => format!("the leader answered the probe read with {other:?}"),
                        Err(error) => error.to_string(),
                    }
                }
                None => format!("node 1 reports leader {:?}", status.leader),
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(ClusterError::NotReady { what: "aspen cluster".into(), waited: READY_WAIT, detail });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_kills_its_process_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new("sleep");
        command.arg("600");
        let mut guard = ChildGuard::spawn("sleep", command, dir.path().join("log")).expect("spawn sleep");
        guard.check_running().expect("running");
        let pid = guard.child.id();
        drop(guard);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} still exists");
    }

    #[test]
    fn an_exited_process_reports_its_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new("sh");
        command.args(["-c", "echo cannot bind port >&2; exit 3"]);
        let mut guard = ChildGuard::spawn("failing", command, dir.path().join("log")).expect("spawn sh");
        let _ = guard.child.wait();
        let error = guard.check_running().expect_err("exited").to_string();
        assert!(error.contains("cannot bind port") && error.contains("exit status: 3"), "{error}");
    }
}
