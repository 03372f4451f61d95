//! Real processes: three aspen-node binaries on loopback driven by the aspen-cli binary.
//! One node is SIGKILLed while writes go on, then all of them; after a restart from their
//! data dirs every acknowledged write is there. A client that stays connected through a
//! node's crash and restart reaches it again within seconds; so does the leader, to a
//! follower restarted or frozen (SIGSTOP) and thawed. A dev cluster keeps its secrets in
//! owner-only files and off every command line, and the CLI takes its tokens from files
//! (--token-file, --admin-token-file). With a node down, commands do not wait for it; with
//! two down, a write returns within its timeout and the error says there is no quorum and
//! what became of the write.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use aspen_transport::rpc::{CONNECT_TIMEOUT, PEER_SILENCE_LIMIT};
use common::{CLI, DevCluster, node_binary};
const SECRET: &str = "e2e-cluster-secret";
const TOKEN: &str = "e2e-token";
const ADMIN_TOKEN: &str = "e2e-admin-token";

fn free_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe socket");
    socket.local_addr().expect("local addr").port()
}

struct NodeProcess {
    id: u64,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl NodeProcess {
    fn start(&mut self, node_bin: &Path) {
        std::fs::create_dir_all(&self.dir).expect("node dir");
        let _ = std::fs::remove_file(self.dir.join("node.addr"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("node.log")).expect("log");
        let child = Command::new(node_bin)
            .args(["--node-id", &self.id.to_string(), "--bind", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.dir)
            // Secrets through the environment, not the command line.
            .env("ASPEN_CLUSTER_SECRET", SECRET)
            .env("ASPEN_CLIENT_TOKEN", TOKEN)
            .env("ASPEN_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("ASPEN_NODE_PEERS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn aspen-node");
        self.child = Some(child);
        let started = Instant::now();
        while !self.dir.join("node.addr").is_file() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "node {} did not start; see {}/node.log",
                self.id,
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    /// Sends `signal` (a `kill` signal name such as `STOP`) to the running node.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running node").id().to_string();
        let status = Command::new("kill").args([&format!("-{signal}"), &pid]).status().expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    fn addr(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.addr")).expect("node.addr").trim().to_string()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Runs aspen-cli with none of the user's ASPEN_* settings and `env` set.
fn cli_with(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(CLI);
    command.args(args).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ASPEN_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("run aspen-cli")
}

/// Runs aspen-cli against `peers` with both tokens.
fn cli(peers: &str, args: &[&str]) -> Output {
    cli_within(peers, 20, args)
}

/// Runs aspen-cli against `peers` with both tokens, calls retried for at most `timeout_secs`.
fn cli_within(peers: &str, timeout_secs: u64, args: &[&str]) -> Output {
    let env = [("ASPEN_PEERS", peers), ("ASPEN_TOKEN", TOKEN), ("ASPEN_ADMIN_TOKEN", ADMIN_TOKEN)];
    let timeout = timeout_secs.to_string();
    let mut all = vec!["--timeout-secs", timeout.as_str()];
    all.extend_from_slice(args);
    cli_with(&env, &all)
}

fn put(peers: &str, key: &str, value: &str) -> bool {
    let started = Instant::now();
    let ok = cli(peers, &["kv", "put", key, value]).status.success();
    eprintln!("put {key}: {ok} in {:?}", started.elapsed());
    ok
}

/// Starts `count` nodes under `root` and initializes them as one cluster; returns them and
/// their comma-separated addresses.
fn start_cluster(node_bin: &Path, root: &Path, count: u64) -> (Vec<NodeProcess>, String) {
    let mut nodes: Vec<NodeProcess> = (1..=count)
        .map(|id| NodeProcess { id, dir: root.join(format!("node-{id}")), port: free_port(), child: None })
        .collect();
    for node in &mut nodes {
        node.start(node_bin);
    }
    let peers = nodes.iter().map(NodeProcess::addr).collect::<Vec<_>>().join(",");
    let init = cli(&peers, &["cluster", "init"]);
    assert!(init.status.success(), "init: {}", String::from_utf8_lossy(&init.stderr));
    (nodes, peers)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

async fn connect(peers: &str) -> aspen_client::AspenClient {
    let peers = aspen_client::AspenClient::parse_peers(peers).expect("peers");
    aspen_client::AspenClient::connect(peers, TOKEN)
        .await
        .expect("connect")
        .with_retry_deadline(Duration::from_secs(60))
}

#[test]
fn sigkill_one_then_all_nodes_loses_no_acknowledged_write() {
    let node_bin = node_binary();
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, peers) = start_cluster(&node_bin, root.path(), 3);

    let mut acked = Vec::new();
    for i in 0..25 {
        let (key, value) = (format!("e2e/{i:03}"), format!("v{i}"));
        if put(&peers, &key, &value) {
            acked.push((key, value));
        }
    }
    assert_eq!(acked.len(), 25, "every write succeeds on a healthy cluster");

    // Kill one node (whichever it is, possibly the leader) and keep writing.
    nodes[0].sigkill();
    for i in 25..40 {
        let (key, value) = (format!("e2e/{i:03}"), format!("v{i}"));
        if put(&peers, &key, &value) {
            acked.push((key, value));
        }
    }
    assert!(acked.len() > 25, "writes continue with one node down");

    // Kill everything, then restart every node from its files.
    for node in &mut nodes {
        node.sigkill();
    }
    for node in &mut nodes {
        node.start(&node_bin);
    }
    let scan = cli(&peers, &["--json", "kv", "scan", "--prefix", "e2e/", "--limit", "1000"]);
    assert!(scan.status.success(), "scan: {}", String::from_utf8_lossy(&scan.stderr));
    let body: serde_json::Value = serde_json::from_slice(&scan.stdout).expect("scan json");
    let stored: std::collections::BTreeMap<String, String> = body["kvs"]
        .as_array()
        .expect("kvs")
        .iter()
        .map(|kv| (kv["key"].as_str().expect("key").to_string(), kv["value"].as_str().expect("value").to_string()))
        .collect();
    for (key, value) in &acked {
        assert_eq!(stored.get(key), Some(value), "acknowledged write {key} after SIGKILL of all nodes");
    }
    // Every restarted node serves linearizable reads of the last acknowledged write.
    let (last_key, last_value) = acked.last().expect("a write");
    for node in &nodes {
        let get = cli(&node.addr(), &["--json", "kv", "get", last_key]);
        let body: serde_json::Value = serde_json::from_slice(&get.stdout).expect("get json");
        assert_eq!(body["kv"]["value"].as_str(), Some(last_value.as_str()), "node {}", node.id);
    }
}

/// How soon a connected client must reach a node again after the node restarts. The node's
/// crash left the client's pooled QUIC connection pointing at a process that no longer
/// exists; QUIC alone notices only at its idle timeout (30 s), so a client that waits for
/// that is cut off for half a minute. The transport notices the silence in about 2 s.
const RECONNECT_BOUND: Duration = Duration::from_secs(10);

#[test]
fn a_connected_client_reaches_a_restarted_node_within_seconds() {
    let node_bin = node_binary();
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, addr) = start_cluster(&node_bin, root.path(), 1);
    let node = &mut nodes[0];
    runtime().block_on(async {
        let client = connect(&addr).await;
        client.put("restart/key", "before").await.expect("put before the crash");

        // SIGKILL: the node sends no CONNECTION_CLOSE, so the client's connection stays open.
        node.sigkill();
        node.start(&node_bin);
        assert_eq!(node.addr(), addr, "same endpoint id and port after the restart");

        let restarted = Instant::now();
        let got = client.get("restart/key").await.expect("get after the restart");
        let took = restarted.elapsed();
        assert_eq!(got.kv.map(|kv| kv.value), Some(b"before".to_vec()), "the acknowledged write survives");
        assert!(took < RECONNECT_BOUND, "the client was cut off from the restarted node for {took:?}");
        client.put("restart/key", "after").await.expect("put after the restart");
        client.close().await;
    });
}

/// The leader's connection to a follower outlives the follower's crash just as a client's
/// does; the restarted follower must get the leader's entries again within seconds (it
/// cannot help itself: its pre-votes are refused while the leader is healthy).
#[test]
fn a_restarted_follower_catches_up_within_seconds() {
    let node_bin = node_binary();
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, peers) = start_cluster(&node_bin, root.path(), 3);
    runtime().block_on(async {
        let client = connect(&peers).await;
        client.put("follower/before", "1").await.expect("put on a healthy cluster");
        let leader = client.status().await.expect("status").leader.expect("a leader");
        client.close().await;
        // Writes go to the leader alone: a write sent to the dying follower would end
        // ambiguous, as it must.
        let leader_addr = nodes.iter().find(|node| node.id == leader).expect("leader is a member").addr();
        let client = connect(&leader_addr).await;
        let follower = nodes.iter_mut().find(|node| node.id != leader).expect("a follower");

        follower.sigkill();
        follower.start(&node_bin);
        let restarted = Instant::now();
        client.put("follower/after", "2").await.expect("put while a follower restarts");
        wait_for_stale_value(follower, "follower/after", "2", restarted, "its restart");

        // Frozen (SIGSTOP) for longer than the silence limit: the leader gives up the
        // connection meanwhile, and the follower, thawed, is caught up again just as soon.
        follower.signal("STOP");
        client.put("follower/frozen", "3").await.expect("put while a follower is frozen");
        tokio::time::sleep(PEER_SILENCE_LIMIT * 2).await;
        client.put("follower/frozen", "4").await.expect("put while a follower is frozen");
        follower.signal("CONT");
        wait_for_stale_value(follower, "follower/frozen", "4", Instant::now(), "SIGCONT");
        client.close().await;
    });
}

/// Polls `node` alone with stale reads until `key` holds `value`, failing once
/// [`RECONNECT_BOUND`] has passed since `since` (`event`).
fn wait_for_stale_value(node: &NodeProcess, key: &str, value: &str, since: Instant, event: &str) {
    loop {
        let get = cli(&node.addr(), &["--json", "kv", "get", "--stale", key]);
        if get.status.success() {
            let body: serde_json::Value = serde_json::from_slice(&get.stdout).expect("get json");
            if body["kv"]["value"].as_str() == Some(value) {
                return;
            }
        }
        let took = since.elapsed();
        assert!(took < RECONNECT_BOUND, "node {} has not caught up on {key} {took:?} after {event}", node.id);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads a file of the dev dir, and its permission bits.
fn read_with_mode(path: &Path) -> (String, u32) {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mode = std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    (text.trim().to_string(), mode)
}

#[test]
fn a_dev_cluster_keeps_its_secrets_in_private_files_and_off_every_command_line() {
    let work = tempfile::tempdir().expect("tempdir");
    let data_dir = work.path().join("aspen-dev");
    let (cluster, _) = DevCluster::start(&data_dir, 7601);

    let files = ["secret", "token", "admin-token"].map(|name| data_dir.join(name));
    let secrets = files.clone().map(|path| {
        let (value, mode) = read_with_mode(&path);
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
        assert!(value.len() >= 32, "{} holds a short secret", path.display());
        value
    });
    assert!(secrets[0] != secrets[1] && secrets[1] != secrets[2] && secrets[0] != secrets[2], "three secrets");
    let (env, _) = read_with_mode(&data_dir.join("cluster.env"));
    for secret in &secrets {
        assert!(!env.contains(secret.as_str()), "cluster.env holds a secret: {env}");
    }

    // Every process's command line, the nodes' among them, and no secret in any.
    let ps = Command::new("ps").args(["-ww", "-eo", "args"]).output().expect("run ps");
    assert!(ps.status.success(), "ps failed");
    let commands = String::from_utf8_lossy(&ps.stdout);
    let dir_text = data_dir.display().to_string();
    let nodes = commands.lines().filter(|line| line.contains("--node-id") && line.contains(&dir_text)).count();
    assert_eq!(nodes, 3, "ps shows the three nodes:\n{commands}");
    for (path, secret) in files.iter().zip(&secrets) {
        assert!(!commands.contains(secret.as_str()), "the secret of {} is on a command line", path.display());
    }

    // The CLI finds the tokens from the directory holding the dev dir: the data token for
    // data, the admin token for administration.
    let here = |args: &[&str]| {
        let mut command = Command::new(CLI);
        command.current_dir(work.path()).args(args).stdin(Stdio::null());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ASPEN_") {
                command.env_remove(name);
            }
        }
        command.output().expect("run aspen-cli")
    };
    let put = here(&["kv", "put", "private", "yes"]);
    assert!(put.status.success(), "put: {}", String::from_utf8_lossy(&put.stderr));
    let snapshot = here(&["cluster", "snapshot"]);
    assert!(snapshot.status.success(), "snapshot: {}", String::from_utf8_lossy(&snapshot.stderr));

    // Whoever holds only the data token cannot administer, and is told which token it needs.
    let peers = env.strip_prefix("ASPEN_PEERS=").expect("peers line").trim().to_string();
    let data_only = [("ASPEN_PEERS", peers.as_str()), ("ASPEN_TOKEN", secrets[1].as_str())];
    let get = cli_with(&data_only, &["--json", "kv", "get", "private"]);
    assert!(get.status.success(), "get with the data token: {}", String::from_utf8_lossy(&get.stderr));
    let refused = cli_with(&data_only, &["cluster", "snapshot"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("admin token"), "{stderr}");
    let admin = [("ASPEN_PEERS", peers.as_str()), ("ASPEN_ADMIN_TOKEN", secrets[2].as_str())];
    let snapshot = cli_with(&admin, &["cluster", "snapshot"]);
    assert!(snapshot.status.success(), "snapshot: {}", String::from_utf8_lossy(&snapshot.stderr));

    // From anywhere, the token files named as options (or ASPEN_*_FILE): no token on the
    // command line, each file its own right.
    let (token_file, admin_token_file) = (files[1].display().to_string(), files[2].display().to_string());
    let peers_only = [("ASPEN_PEERS", peers.as_str())];
    let get = cli_with(&peers_only, &["--json", "kv", "get", "private", "--token-file", &token_file]);
    let stderr = String::from_utf8_lossy(&get.stderr);
    assert!(get.status.success(), "get with --token-file: {stderr}");
    assert!(!stderr.contains("WARN"), "a private token file is not warned about: {stderr}");
    let refused = cli_with(&peers_only, &["--token-file", &token_file, "cluster", "snapshot"]);
    assert_eq!(refused.status.code(), Some(1), "the data token file cannot administer");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("admin token"));
    let snapshot = cli_with(&peers_only, &["--admin-token-file", &admin_token_file, "cluster", "snapshot"]);
    assert!(snapshot.status.success(), "--admin-token-file: {}", String::from_utf8_lossy(&snapshot.stderr));
    let by_env = [("ASPEN_PEERS", peers.as_str()), ("ASPEN_TOKEN_FILE", token_file.as_str())];
    assert!(cli_with(&by_env, &["kv", "put", "by-env-file", "yes"]).status.success(), "ASPEN_TOKEN_FILE");
    // A token file others can read works, with a warning naming the fix.
    let loose = work.path().join("loose-token");
    std::fs::write(&loose, format!("{}\n", secrets[1])).expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let get = cli_with(&peers_only, &["--token-file", &loose.display().to_string(), "kv", "get", "private"]);
    let stderr = String::from_utf8_lossy(&get.stderr);
    assert!(get.status.success(), "get with a loose token file: {stderr}");
    assert!(stderr.contains("mode 0644") && stderr.contains("chmod 600"), "{stderr}");
    // The token itself on the command line still works, with a warning.
    let get = cli_with(&peers_only, &["--token", &secrets[1], "kv", "get", "private"]);
    let stderr = String::from_utf8_lossy(&get.stderr);
    assert!(get.status.success(), "get with --token: {stderr}");
    assert!(stderr.contains("--token puts a token on the command line"), "{stderr}");
    let wrong = work.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").expect("write");
    let refused = cli_with(&peers_only, &["--token-file", &wrong.display().to_string(), "kv", "get", "private"]);
    assert_eq!(refused.status.code(), Some(1), "a wrong token from a file is refused");
    drop(cluster);

    // A restart keeps the cluster's secrets, and makes a loosened file private again.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&files[1], std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let (cluster, _) = DevCluster::start(&data_dir, 7601);
    for (path, secret) in files.iter().zip(&secrets) {
        assert_eq!(read_with_mode(path), (secret.clone(), 0o600), "{} after a restart", path.display());
    }
    let get = here(&["--json", "kv", "get", "private"]);
    let body: serde_json::Value = serde_json::from_slice(&get.stdout).expect("get json");
    assert_eq!(body["kv"]["value"], "yes");
    drop(cluster);
}

/// What iroh logs when a process drops its endpoint before closing it finished: a client
/// whose close waited on a dial to a dead node past its grace period.
const UNGRACEFUL_CLOSE: &str = "Endpoint dropped without calling";

/// Runs `args` with one node dead and checks that the command succeeded, did not wait for a
/// connect timeout, and closed its endpoint without waiting on the dead node.
fn fast_and_clean(peers: &str, args: &[&str]) -> Output {
    let started = Instant::now();
    let output = cli(peers, args);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?} with a node down: {stderr}");
    assert!(!stderr.contains(UNGRACEFUL_CLOSE), "{args:?} waited on the dead node at exit: {stderr}");
    // Generous: such a call takes tens of milliseconds; before, a status waited for the
    // dead node's connect timeout.
    assert!(took < CONNECT_TIMEOUT, "{args:?} took {took:?} with a node down");
    output
}

#[test]
fn with_one_node_down_commands_skip_it_and_with_two_down_the_error_counts_reachable_nodes() {
    let node_bin = node_binary();
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, peers) = start_cluster(&node_bin, root.path(), 3);
    assert!(put(&peers, "down/before", "1"), "a write on a healthy cluster");
    let status = cli(&peers, &["--json", "cluster", "status"]);
    let body: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let leader = body["nodes"][0]["status"]["leader"].as_u64().expect("a leader");

    // A follower dies; the leader's failure detector calls it down within seconds.
    let dead = nodes.iter().position(|node| node.id != leader).expect("a follower");
    nodes[dead].sigkill();
    let dead_id = nodes[dead].id;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let output = fast_and_clean(&peers, &["--json", "cluster", "status"]);
        let body: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status json");
        let rows = body["nodes"].as_array().expect("rows");
        let error = rows.iter().find(|row| row["node_id"].as_u64() == Some(dead_id)).map(|row| &row["error"]);
        // The dead node's row is not waited for once the leader calls it down or suspect.
        if let Some(error) = error.and_then(|error| error.as_str())
            && error.contains(&format!("the leader calls node {dead_id}"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the dead node's row never cited the leader: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..3 {
        fast_and_clean(&peers, &["kv", "put", &format!("down/{i}"), "v"]);
        let get = fast_and_clean(&peers, &["--json", "kv", "get", &format!("down/{i}")]);
        let body: serde_json::Value = serde_json::from_slice(&get.stdout).expect("get json");
        assert_eq!(body["kv"]["value"].as_str(), Some("v"));
    }

    // A second node dies: no quorum. A write sent at once usually reaches the leader while
    // its lease lasts, which proposes it and holds it for its commit: the command still
    // returns within its timeout, and says there is no quorum and that the outcome is
    // unknown (or, if the leader refused it already, that it was not applied).
    let second = nodes.iter().position(|node| node.id != leader && node.id != dead_id).expect("the other follower");
    nodes[second].sigkill();
    let timeout_secs = 3;
    let bound = Duration::from_secs(timeout_secs) + Duration::from_millis(1500);
    let started = Instant::now();
    let output = cli_within(&peers, timeout_secs, &["kv", "put", "down/racing", "v"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(took < bound, "a write without a quorum took {took:?} with --timeout-secs {timeout_secs}: {stderr}");
    assert!(stderr.contains("no quorum: 1 of 3 nodes reachable"), "{stderr}");
    match output.status.code() {
        Some(4) => assert!(stderr.contains("the outcome is unknown"), "{stderr}"),
        Some(1) => assert!(stderr.contains("The write was not applied"), "{stderr}"),
        other => panic!("a write without a quorum exited {other:?}: {stderr}"),
    }
    assert!(!stderr.contains("this node is the leader"), "{stderr}");

    // Once its lease has run out the leader refuses writes at once (or has stepped down):
    // every attempt was refused, so the write was certainly not applied.
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let output = cli_within(&peers, timeout_secs, &["kv", "put", "down/lost", "v"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(took < bound, "a refused write took {took:?} with --timeout-secs {timeout_secs}: {stderr}");
    assert_eq!(output.status.code(), Some(1), "a write refused by every node was not applied: {stderr}");
    assert!(stderr.contains("no quorum: 1 of 3 nodes reachable"), "{stderr}");
    assert!(stderr.contains("The write was not applied"), "{stderr}");
    assert!(!stderr.contains("this node is the leader"), "{stderr}");
}
