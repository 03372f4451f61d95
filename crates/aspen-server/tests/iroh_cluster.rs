//! In-process clusters of real nodes over real iroh endpoints on 127.0.0.1, driven through
//! the real client: replication, reads on every node, failover and restart, security.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aspen_api::{
    ApplyError, ClientRequest, ClientResponse, ClientWrite, ClusterController, ClusterError, ClusterNode, Compare,
    CompareOp, CompareTarget, GetRequest, KvError, ReadConsistency, ScanRequest, SessionId, TxnOp, TxnRequest,
    WriteCommand, WriteId, WriteResponse,
};
use aspen_client::{AspenClient, ClientError};
use aspen_consensus::{RaftRpc, RaftRpcReply};
use aspen_server::raft_rpc::{RaftEnvelope, RaftEnvelopeReply, RaftHello};
use aspen_server::{NodeConfig, Server};
use aspen_transport::auth::responder_proof;
use aspen_transport::{CLIENT_ALPN, PeerAddr, RAFT_ALPN};

const SECRET: &str = "test-cluster-secret";
const TOKEN: &str = "test-token";
const ADMIN_TOKEN: &str = "test-admin-token";

struct TestNode {
    id: u64,
    dir: PathBuf,
    bind: SocketAddr,
    server: Option<Server>,
}

fn config(id: u64, dir: PathBuf, bind: SocketAddr, secret: &str) -> NodeConfig {
    let mut config = NodeConfig::local(id, dir, secret, TOKEN, ADMIN_TOKEN);
    config.bind = bind;
    config.consensus.heartbeat_interval_ms = 50;
    config.consensus.election_timeout_min_ms = 300;
    config.consensus.election_timeout_max_ms = 600;
    config.consensus.write_timeout = Duration::from_secs(5);
    config
}

impl TestNode {
    async fn start(id: u64, root: &std::path::Path) -> TestNode {
        let dir = root.join(format!("node-{id}"));
        let server =
            Server::start(config(id, dir.clone(), "127.0.0.1:0".parse().expect("addr"), SECRET)).await.expect("start");
        let bind = server.addr().addrs[0];
        TestNode { id, dir, bind, server: Some(server) }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// Restarts from the same files on the same port (its address is in the membership).
    async fn restart(&mut self) {
        for _ in 0..100 {
            match Server::start(config(self.id, self.dir.clone(), self.bind, SECRET)).await {
                Ok(server) => {
                    self.server = Some(server);
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("node {} could not restart on {}", self.id, self.bind);
    }

    fn addr(&self) -> PeerAddr {
        self.server().addr().clone()
    }
}

async fn start_cluster(root: &std::path::Path, size: u64) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in 1..=size {
        nodes.push(TestNode::start(id, root).await);
    }
    let members: Vec<ClusterNode> = nodes.iter().map(|node| node.server().member()).collect();
    nodes[0].server().init_if_new(members[1..].to_vec()).await.expect("init");
    nodes
}

/// A client holding the data token: reads and writes.
async fn client(nodes: &[&TestNode]) -> AspenClient {
    AspenClient::connect(nodes.iter().map(|node| node.addr()).collect(), TOKEN).await.expect("client")
}

/// A client holding the admin token: everything, cluster administration too.
async fn admin_client(nodes: &[&TestNode]) -> AspenClient {
    AspenClient::connect(nodes.iter().map(|node| node.addr()).collect(), ADMIN_TOKEN).await.expect("admin client")
}

async fn wait_for_leader(nodes: &[&TestNode]) -> u64 {
    for _ in 0..200 {
        let leaders: std::collections::BTreeSet<Option<u64>> =
            nodes.iter().map(|node| node.server().node().metrics().current_leader).collect();
        if leaders.len() == 1
            && let Some(Some(leader)) = leaders.first()
            && nodes.iter().any(|node| node.id == *leader)
        {
            return *leader;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_any_node_are_linearizable_on_every_node() {
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_cluster(root.path(), 3).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_for_leader(&all).await;
    for node in &nodes {
        let single = client(&[node]).await;
        single.put(format!("from-{}", node.id), "v").await.expect("put through this node");
    }
    for node in &nodes {
        // Each node serves the reads itself (ReadIndex, through the leader on followers).
        let single = client(&[node]).await.with_confirmed_reads(false);
        for writer in 1..=3 {
            let got = single.get(format!("from-{writer}")).await.expect("get");
            assert_eq!(
                got.kv.map(|kv| kv.value),
                Some(b"v".to_vec()),
                "read on node {} of write via {writer}",
                node.id
            );
        }
        let stale = single
            .get_with(GetRequest { key: b"from-1".to_vec(), consistency: ReadConsistency::Stale })
            .await
            .expect("stale get");
        assert!(stale.revision > 0);
    }
    let status = client(&all).await.status().await.expect("status");
    assert_eq!(status.voters.len(), 3);

    // Metrics over the client protocol: the leader counts the writes and its Raft RPCs.
    let leader_id = status.leader.expect("leader");
    let leader = nodes.iter().find(|node| node.id == leader_id).expect("leader node");
    let text = client(&[leader]).await.node_metrics(&leader.addr()).await.expect("metrics");
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|line| line.starts_with(name) && !line.starts_with('#'))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from metrics:\n{text}"))
    };
    assert_eq!(value("aspen_raft_is_leader{"), 1.0);
    assert!(value("aspen_client_writes_total") >= 1.0);
    assert!(value("aspen_raft_rpcs_total") > 0.0, "heartbeats and appends are counted");
    assert!(text.contains("aspen_raft_replication_lag{"), "{text}");
    assert!(text.contains("aspen_raft_rpcs_latency_seconds_bucket{le=\"0.001\"}"), "{text}");
    // The leader's journal was synced for those writes, and the syncs are timed.
    assert!(value("aspen_disk_log_journal_sync_duration_seconds_count") >= 1.0, "{text}");
    assert!(value("aspen_disk_log_journal_sync_duration_seconds_sum") > 0.0, "{text}");
    assert!(text.contains("aspen_disk_log_commit_duration_seconds_bucket{le=\"0.0001\"}"), "{text}");
}

/// Reads "k" (which must hold `expected` every time) up to `attempts` times, 50 ms apart,
/// until one read is confirmed by the client; whether one was.
async fn read_until_confirmed(client: &AspenClient, expected: &[u8], attempts: usize) -> bool {
    let before = client.read_paths().confirmed;
    for _ in 0..attempts {
        let got = client.get("k").await.expect("get");
        assert_eq!(got.kv.map(|kv| kv.value), Some(expected.to_vec()));
        if client.read_paths().confirmed > before {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_reads_are_confirmed_by_the_client_and_survive_lost_nodes() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_cluster(root.path(), 3).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader_id = wait_for_leader(&all).await;
    let leader = nodes.iter().find(|node| node.id == leader_id).expect("leader node").addr();
    // Like the benchmark: each client knows only the leader and learns the voters.
    let only_leader = || async { AspenClient::connect(vec![leader.clone()], TOKEN).await.expect("client") };
    let writer = only_leader().await;
    let reader = only_leader().await;
    for round in 0..20 {
        writer.put("k", format!("v{round}")).await.expect("put");
        let got = reader.get("k").await.expect("get");
        assert_eq!(got.kv.map(|kv| kv.value), Some(format!("v{round}").into_bytes()), "read after write {round}");
    }
    let paths = reader.read_paths();
    assert!(paths.confirmed >= 19, "reads should be confirmed by the client: {paths:?}");
    let scan = ScanRequest {
        range: aspen_api::KeyRange::prefix("k"),
        limit: 0,
        keys_only: false,
        count_only: false,
        after: None,
        consistency: ReadConsistency::Linearizable,
    };
    let scanned = reader.scan(scan).await.expect("scan");
    assert_eq!(scanned.kvs.iter().map(|kv| kv.value.clone()).collect::<Vec<_>>(), vec![b"v19".to_vec()]);
    assert_eq!(reader.read_paths().confirmed, paths.confirmed + 1, "the scan is confirmed too");

    // Stop the follower the client asks (the lowest-numbered one). Reads stay correct: the
    // next one falls back to the leader's ReadIndex round, later ones ask the other follower.
    let asked_id = nodes.iter().map(|node| node.id).find(|id| *id != leader_id).expect("a follower");
    let asked = nodes.iter_mut().find(|node| node.id == asked_id).expect("follower");
    asked.stop().await;
    writer.put("k", "after").await.expect("put with one follower down");
    let before = reader.read_paths();
    let stood_in = read_until_confirmed(&reader, b"after", 60).await;
    let after = reader.read_paths();
    assert!(after.read_index > before.read_index, "the first read after the loss fell back: {after:?}");
    assert!(stood_in, "the other follower never confirmed a read: {after:?}");

    // Off: every linearizable get is a ReadIndex round on the node.
    let plain = only_leader().await.with_confirmed_reads(false);
    assert_eq!(plain.get("k").await.expect("get").kv.map(|kv| kv.value), Some(b"after".to_vec()));
    assert_eq!(plain.read_paths(), aspen_client::ReadPaths { confirmed: 0, read_index: 1 });

    // Leader loss: the follower comes back, the leader stops; a client that knows every node
    // reads through the new leader, the slow way at first, then confirmed there again.
    nodes.iter_mut().find(|node| node.id == asked_id).expect("follower").restart().await;
    let everyone = client(&nodes.iter().collect::<Vec<_>>()).await;
    everyone.put("k", "before-failover").await.expect("put with all three up");
    assert_eq!(everyone.get("k").await.expect("get").kv.map(|kv| kv.value), Some(b"before-failover".to_vec()));
    nodes.iter_mut().find(|node| node.id == leader_id).expect("leader").stop().await;
    let survivors: Vec<&TestNode> = nodes.iter().filter(|node| node.id != leader_id).collect();
    wait_for_leader(&survivors).await;
    everyone.put("k", "after-failover").await.expect("put after failover");
    assert!(
        read_until_confirmed(&everyone, b"after-failover", 200).await,
        "reads were never confirmed at the new leader: {:?}",
        everyone.read_paths()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let root = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port();
    let mut node_config = config(1, root.path().join("node-1"), "127.0.0.1:0".parse().expect("addr"), SECRET);
    node_config.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    let server = Server::start(node_config).await.expect("start");
    server.init_if_new(Vec::new()).await.expect("init");
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("aspen_raft_term{node=\"1\"}"), "{response}");
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.write_all(b"GET /nope HTTP/1.1\r\n\r\n").await.expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response");
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_loses_no_acknowledged_write_and_restart_catches_up() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_cluster(root.path(), 3).await;
    let leader = wait_for_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let everyone = client(&nodes.iter().collect::<Vec<_>>()).await;
    for i in 0..30 {
        everyone.put(format!("acked/{i:02}"), i.to_string()).await.expect("acked write");
    }
    let leader_index = nodes.iter().position(|node| node.id == leader).expect("leader is a node");
    nodes[leader_index].stop().await;
    let survivors: Vec<&TestNode> = nodes.iter().filter(|node| node.server.is_some()).collect();
    let new_leader = wait_for_leader(&survivors).await;
    assert_ne!(new_leader, leader);
    let survivors_client = client(&survivors).await;
    let scan = survivors_client.scan(ScanRequest::prefix(b"acked/".to_vec(), 0)).await.expect("scan");
    assert_eq!(scan.kvs.len(), 30, "every acknowledged write survived the leader");
    survivors_client.put("after", "failover").await.expect("write after failover");

    // The new leader's failure detector calls the killed node down (not merely suspect),
    // and measures the live peer's clock as in sync.
    let new_leader_node = nodes.iter().find(|node| node.id == new_leader).expect("new leader");
    let mut verdict = None;
    for _ in 0..400 {
        let status = ClusterController::status(new_leader_node.server().node()).await.expect("status");
        let old = status.peers.iter().find(|peer| peer.node_id == leader).cloned();
        let live = status.peers.iter().find(|peer| peer.node_id != leader).cloned();
        if let (Some(old), Some(live)) = (old, live)
            && old.liveness == aspen_api::Liveness::Down
            && live.clock == aspen_api::ClockDrift::Ok
        {
            verdict = Some((old, live));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (old, live) = verdict.expect("the killed leader is detected as down and the live peer's clock is in sync");
    assert!(old.consecutive_failures >= aspen_consensus::health::DOWN_AFTER_FAILURES);
    assert_eq!(live.liveness, aspen_api::Liveness::Healthy);

    nodes[leader_index].restart().await;
    let restarted = client(&[&nodes[leader_index]]).await;
    let got = restarted.get("after").await.expect("linearizable read on the restarted node");
    assert_eq!(got.kv.map(|kv| kv.value), Some(b"failover".to_vec()));
    for node in &mut nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_secret_cannot_join_and_wrong_token_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_cluster(root.path(), 3).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader = wait_for_leader(&all).await;

    let wrong_token = AspenClient::connect(vec![nodes[0].addr()], "not-the-token").await.expect("client");
    assert!(matches!(wrong_token.put("k", "v").await, Err(ClientError::Unauthorized(_))));
    assert!(matches!(wrong_token.get("k").await, Err(ClientError::Unauthorized(_))));
    assert!(nodes[0].server().metrics().unauthorized.get() >= 2);

    // A node with the wrong secret: the leader cannot replicate to it, it never gets data.
    let intruder_dir = root.path().join("intruder");
    let intruder_config = config(9, intruder_dir, "127.0.0.1:0".parse().expect("addr"), "a-different-secret");
    let intruder = Server::start(intruder_config).await.expect("intruder starts");
    client(&all).await.put("secret-data", "x").await.expect("write");
    let leader_node = nodes.iter().find(|node| node.id == leader).expect("leader");
    let mut short = admin_client(&[leader_node]).await.with_retry_deadline(Duration::from_secs(1));
    let added = short.add_learner(intruder.member()).await;
    assert!(
        added.as_ref().is_err_and(|error| !matches!(error, ClientError::Unauthorized(_))),
        "a node with the wrong secret must not join: {added:?}"
    );
    assert!(intruder.node().metrics().last_applied.is_none(), "the intruder received no entries");
    let denied = intruder.metrics().raft_denied.load(std::sync::atomic::Ordering::Relaxed);
    assert!(denied > 0, "the intruder refused the leader's RPCs as unauthenticated");
    short = client(&all).await;
    let got = short.get("secret-data").await.expect("cluster still serves");
    assert_eq!(got.kv.map(|kv| kv.value), Some(b"x".to_vec()));
    intruder.shutdown().await;
}

/// A modified node: answers every Raft RPC as node `id` answers a Ping, without the cluster
/// secret; its answers carry its best guess at a proof (one under a secret of its own).
struct Impostor {
    id: u64,
    me: aspen_transport::EndpointId,
    /// Whether anything but a Ping reached it (log entries, votes, snapshots).
    saw_more_than_ping: std::sync::atomic::AtomicBool,
}

impl aspen_transport::RpcHandler for Impostor {
    type Hello = RaftHello;
    type Request = RaftEnvelope;
    type Response = RaftEnvelopeReply;

    fn authenticate(&self, _peer: aspen_transport::EndpointId, _hello: RaftHello) -> Result<(), String> {
        Ok(())
    }

    async fn handle(&self, peer: aspen_transport::EndpointId, envelope: RaftEnvelope) -> RaftEnvelopeReply {
        if !matches!(envelope.rpc, RaftRpc::Ping) {
            self.saw_more_than_ping.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let proof = responder_proof("a-guessed-secret", &self.me, &peer, &envelope.challenge);
        RaftEnvelopeReply::Reply { reply: RaftRpcReply::Pong { node_id: self.id }, clock_ms: 0, proof }
    }

    fn reject(&self, _peer: aspen_transport::EndpointId, error: aspen_transport::TransportError) -> RaftEnvelopeReply {
        RaftEnvelopeReply::Denied(error.to_string())
    }
}

/// Starts an [`Impostor`] answering as node `id` on 127.0.0.1; returns it, its address and
/// the router serving it (shut it down at the end).
async fn start_impostor(id: u64) -> (std::sync::Arc<Impostor>, PeerAddr, iroh::protocol::Router) {
    let endpoint = aspen_transport::bind_endpoint(
        aspen_transport::SecretKey::generate(),
        "127.0.0.1:0".parse().expect("addr"),
        vec![RAFT_ALPN.to_vec()],
    )
    .await
    .expect("bind the impostor");
    let impostor = std::sync::Arc::new(Impostor {
        id,
        me: endpoint.id(),
        saw_more_than_ping: std::sync::atomic::AtomicBool::new(false),
    });
    let addr = PeerAddr::from(endpoint.addr());
    let router = iroh::protocol::Router::builder(endpoint)
        .accept(RAFT_ALPN, aspen_transport::RpcProtocol::new(std::sync::Arc::clone(&impostor)))
        .spawn();
    (impostor, addr, router)
}

/// Client refusals counted by every node together.
fn unauthorized_total(nodes: &[TestNode]) -> u64 {
    nodes.iter().filter_map(|node| node.server.as_ref()).map(|server| server.metrics().unauthorized.get()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_data_token_reads_and_writes_but_only_the_admin_token_changes_the_cluster() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_cluster(root.path(), 3).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader = wait_for_leader(&all).await;
    let follower = nodes.iter().find(|node| node.id != leader).expect("a follower").id;

    // The data token: every data request, the reads confirmed through Status and Term.
    let data = client(&all).await.with_retry_deadline(Duration::from_secs(5));
    data.put("k", "v").await.expect("the data token writes");
    assert!(read_until_confirmed(&data, b"v", 40).await, "the data token's linearizable reads are confirmed");
    let scan = data.scan(ScanRequest::prefix(b"k".to_vec(), 0)).await.expect("the data token scans");
    assert_eq!(scan.kvs.len(), 1);
    data.sql(aspen_api::SqlRequest::new("SELECT key FROM kv")).await.expect("the data token runs SQL");
    data.delete("k").await.expect("the data token deletes");
    assert_eq!(data.status().await.expect("the data token reads the status").leader, Some(leader));
    data.node_metrics(&nodes[0].addr()).await.expect("the data token reads metrics");

    // ... but no administration, and each refusal says which token it needs.
    let mut newcomer = TestNode::start(4, root.path()).await;
    let before = unauthorized_total(&nodes);
    let attempts = [
        ("init", data.init(vec![newcomer.server().member()]).await),
        ("add learner", data.add_learner(newcomer.server().member()).await),
        ("change membership", data.change_membership([1, 2, 3, 4].into()).await),
        ("remove node", data.remove(follower).await),
        ("transfer leader", data.transfer_leader(follower).await),
        ("trigger snapshot", data.trigger_snapshot().await),
    ];
    for (operation, outcome) in attempts {
        match outcome {
            Err(ClientError::Unauthorized(reason)) => {
                assert!(reason.contains(operation) && reason.contains("admin token"), "{operation}: {reason}")
            }
            other => panic!("{operation} with the data token: {other:?}"),
        }
    }
    assert!(unauthorized_total(&nodes) >= before + 6, "every refusal is counted");
    let status = data.status().await.expect("status");
    assert_eq!(status.voters, [1, 2, 3].into(), "nothing changed");
    assert!(status.learners.is_empty(), "nothing changed: {status:?}");
    assert_eq!(wait_for_leader(&all).await, leader, "leadership stayed");
    assert!(nodes.iter().all(|node| node.server().node().metrics().snapshot.is_none()), "no snapshot was built");

    // The admin token does all of it, and data requests too.
    let admin = admin_client(&all).await.with_retry_deadline(Duration::from_secs(10));
    admin.add_learner(newcomer.server().member()).await.expect("the admin token adds a learner");
    admin.change_membership([1, 2, 3, 4].into()).await.expect("the admin token promotes it");
    admin.transfer_leader(follower).await.expect("the admin token hands over leadership");
    let mut voters: Vec<&TestNode> = all.clone();
    voters.push(&newcomer);
    for _ in 0..100 {
        if wait_for_leader(&voters).await == follower {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(wait_for_leader(&voters).await, follower, "leadership moved to node {follower}");
    admin.remove(4).await.expect("the admin token removes a node");
    admin.trigger_snapshot().await.expect("the admin token triggers a snapshot");
    admin.put("k", "admin").await.expect("the admin token writes");
    let status = admin.status().await.expect("status");
    assert_eq!(status.voters, [1, 2, 3].into());
    newcomer.stop().await;
    for node in &mut nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_learner_must_prove_the_cluster_secret_before_it_is_admitted() {
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_cluster(root.path(), 3).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader_id = wait_for_leader(&all).await;
    let leader = nodes.iter().find(|node| node.id == leader_id).expect("leader").server().node();

    let (impostor, impostor_addr, router) = start_impostor(9).await;
    let added = leader.add_learner(ClusterNode { id: 9, addr: impostor_addr.to_string() }).await;
    assert!(
        matches!(&added, Err(ClusterError::SecretNotProven { node: 9, .. })),
        "an endpoint without the secret must be refused by name: {added:?}"
    );
    assert!(leader.metrics().membership_config.membership().get_node(&9).is_none(), "node 9 is not a member");
    assert!(
        !impostor.saw_more_than_ping.load(std::sync::atomic::Ordering::Relaxed),
        "the impostor was sent nothing but the Ping"
    );

    // A real node holding the secret is still admitted.
    let member = TestNode::start(4, root.path()).await;
    leader.add_learner(member.server().member()).await.expect("a node with the secret joins");
    assert!(leader.metrics().membership_config.membership().get_node(&4).is_some());
    router.shutdown().await.expect("stop the impostor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn init_makes_every_member_prove_the_cluster_secret_first() {
    let root = tempfile::tempdir().expect("tempdir");
    let first = TestNode::start(1, root.path()).await;
    let second = TestNode::start(2, root.path()).await;
    let (impostor, impostor_addr, router) = start_impostor(3).await;
    let impostor_member = ClusterNode { id: 3, addr: impostor_addr.to_string() };

    let members = vec![first.server().member(), second.server().member(), impostor_member];
    let init = first.server().node().init(members).await;
    assert!(
        matches!(&init, Err(ClusterError::SecretNotProven { node: 3, .. })),
        "init must refuse a member without the secret, by name: {init:?}"
    );
    for node in [&first, &second] {
        let metrics = node.server().node().metrics();
        assert!(metrics.last_log_index.is_none(), "node {} was not initialized: {metrics:?}", node.id);
        assert_eq!(metrics.membership_config.membership().voter_ids().count(), 0, "node {} has no voters", node.id);
    }
    assert!(
        !impostor.saw_more_than_ping.load(std::sync::atomic::Ordering::Relaxed),
        "the impostor was sent nothing but the Ping"
    );

    // The same nodes without the impostor: a cluster.
    let members = vec![first.server().member(), second.server().member()];
    first.server().node().init(members).await.expect("members that prove the secret form a cluster");
    wait_for_leader(&[&first, &second]).await;
    router.shutdown().await.expect("stop the impostor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_without_credentials_is_refused_unread_and_a_client_puts_a_mebibyte_first() {
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_cluster(root.path(), 3).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_for_leader(&all).await;
    let target = nodes[0].addr();

    // A peer that skips the hello: its first frame announces 8 MiB and it sends them.
    let stranger = aspen_transport::bind_endpoint(
        aspen_transport::SecretKey::generate(),
        "127.0.0.1:0".parse().expect("addr"),
        vec![],
    )
    .await
    .expect("bind");
    for alpn in [CLIENT_ALPN, RAFT_ALPN] {
        let connection = stranger.connect(target.endpoint_addr(), alpn).await.expect("connect");
        let (mut send, _recv) = connection.open_bi().await.expect("open");
        let size = 8 * 1024 * 1024;
        let mut frame = (size as u32).to_le_bytes().to_vec();
        frame.extend(std::iter::repeat_n(0u8, size));
        let writer = tokio::spawn(async move { send.write_all(&frame).await });
        let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await.expect("closed in time");
        let iroh::endpoint::ConnectionError::ApplicationClosed(close) = closed else { panic!("closed by {closed:?}") };
        assert_eq!(close.error_code, iroh::endpoint::VarInt::from_u32(aspen_transport::rpc::CLOSE_UNAUTHENTICATED));
        let reason = String::from_utf8_lossy(&close.reason).into_owned();
        let limit = aspen_api::limits::MAX_UNAUTHENTICATED_FRAME_SIZE.to_string();
        assert!(reason.contains(&limit), "refused for its size, unread: {reason}");
        assert!(writer.await.expect("join").is_err(), "the node did not read the 8 MiB");
    }
    stranger.close().await;

    // A client's very first request may be large: its hello goes ahead of it.
    let fresh = AspenClient::connect(vec![target], TOKEN).await.expect("client");
    let mebibyte = vec![7u8; 1024 * 1024];
    fresh.put("big", mebibyte.clone()).await.expect("a 1 MiB put as the first request");
    let got = fresh.get("big").await.expect("get");
    assert_eq!(got.kv.map(|kv| kv.value), Some(mebibyte));
}

fn snapshotting(config: &mut NodeConfig) {
    config.consensus.snapshot_after_entries = 30;
    config.consensus.log_entries_kept_after_snapshot = 0;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_node_catches_up_through_a_snapshot_streamed_over_iroh() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut servers = Vec::new();
    for id in 1..=3 {
        let mut node_config =
            config(id, root.path().join(format!("node-{id}")), "127.0.0.1:0".parse().expect("addr"), SECRET);
        snapshotting(&mut node_config);
        servers.push(Server::start(node_config).await.expect("start"));
    }
    let members: Vec<ClusterNode> = servers[1..].iter().map(Server::member).collect();
    servers[0].init_if_new(members).await.expect("init");
    let addrs: Vec<PeerAddr> = servers.iter().map(|server| server.addr().clone()).collect();
    let writer = AspenClient::connect(addrs.clone(), TOKEN).await.expect("client");
    writer.put("warmup", "1").await.expect("warm up");

    // Take node 3 down, write enough for the others to snapshot and purge their logs.
    let lagging = servers.pop().expect("node 3");
    let lagging_dir = root.path().join("node-3");
    let lagging_bind = lagging.addr().addrs[0];
    lagging.shutdown().await;
    for i in 0..120 {
        writer.put(format!("lag/{i:03}"), "x".repeat(200)).await.expect("write while node 3 is down");
    }
    let leader = servers.iter().find(|server| server.node().metrics().current_leader == Some(server.node().id()));
    let leader = leader.expect("a leader among nodes 1 and 2");
    for _ in 0..400 {
        if leader.node().metrics().purged.is_some_and(|purged| purged.index > 60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(leader.node().metrics().purged.is_some_and(|purged| purged.index > 60), "leader purged its log");

    // Node 3 restarts: the entries it misses are gone from the log, only a snapshot helps.
    let mut restarted = None;
    for _ in 0..100 {
        let mut node_config = config(3, lagging_dir.clone(), lagging_bind, SECRET);
        snapshotting(&mut node_config);
        if let Ok(server) = Server::start(node_config).await {
            restarted = Some(server);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restarted = restarted.expect("node 3 restarts");
    // Served by node 3 itself (not confirmed at the leader), so node 3 must catch up first.
    let reader =
        AspenClient::connect(vec![restarted.addr().clone()], TOKEN).await.expect("client").with_confirmed_reads(false);
    let scan = reader.scan(ScanRequest::prefix(b"lag/".to_vec(), 0)).await.expect("linearizable scan on node 3");
    assert_eq!(scan.kvs.len(), 120);
    assert!(restarted.node().metrics().snapshot.is_some(), "node 3 installed a snapshot");
    restarted.shutdown().await;
    for server in servers {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_three_to_five_to_three_over_iroh_while_writes_continue() {
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_cluster(root.path(), 3).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_for_leader(&all).await;
    let admin = admin_client(&all).await;
    let writer = std::sync::Arc::new(client(&all).await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = {
        let writer = std::sync::Arc::clone(&writer);
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("members/{i:05}");
                if writer.put(key.clone(), "v").await.is_ok() {
                    acked.push(key);
                }
                i += 1;
            }
            acked
        })
    };
    let mut extra = Vec::new();
    for id in [4, 5] {
        let node = TestNode::start(id, root.path()).await;
        admin.add_learner(node.server().member()).await.expect("add learner");
        extra.push(node);
    }
    admin.change_membership([1, 2, 3, 4, 5].into()).await.expect("grow to five voters");
    assert_eq!(admin.status().await.expect("status").voters.len(), 5);
    admin.change_membership([1, 4, 5].into()).await.expect("shrink to three voters");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writes.await.expect("writer");
    assert!(!acked.is_empty());
    let status = admin.status().await.expect("status");
    assert_eq!(status.voters, [1, 4, 5].into());
    let on_new_voter = client(&[&extra[1]]).await;
    let scan = on_new_voter.scan(ScanRequest::prefix(b"members/".to_vec(), 0)).await.expect("scan on node 5");
    let stored: std::collections::BTreeSet<Vec<u8>> = scan.kvs.into_iter().map(|kv| kv.key).collect();
    for key in &acked {
        assert!(stored.contains(key.as_bytes()), "acknowledged {key} is on the new voter");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gossip_teaches_peers_and_finds_a_node_restarted_on_a_new_port() {
    let root = tempfile::tempdir().expect("tempdir");
    let any_port: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let first = Server::start(config(1, root.path().join("node-1"), any_port, SECRET)).await.expect("node 1");
    let seed = vec![aspen_server::StaticPeer { id: 1, addr: first.addr().to_string() }];
    let with_seed = |id: u64, bind: SocketAddr| {
        let mut node_config = config(id, root.path().join(format!("node-{id}")), bind, SECRET);
        node_config.peers = seed.clone();
        node_config
    };
    let second = Server::start(with_seed(2, any_port)).await.expect("node 2");
    let third = Server::start(with_seed(3, any_port)).await.expect("node 3");

    // Nodes 2 and 3 only know node 1, yet learn each other.
    let mut learned = false;
    for _ in 0..200 {
        if second.address_book().get(3).as_ref() == Some(third.addr())
            && third.address_book().get(2).as_ref() == Some(second.addr())
        {
            learned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        learned,
        "gossip spread the addresses: {:?} / {:?}",
        second.address_book().all(),
        third.address_book().all()
    );

    first.init_if_new(vec![second.member(), third.member()]).await.expect("init");
    let everyone =
        AspenClient::connect(vec![first.addr().clone(), second.addr().clone()], TOKEN).await.expect("client");
    everyone.put("before", "1").await.expect("write");

    // Node 3 comes back on a different port; the address in the membership is stale.
    let old_addr = third.addr().clone();
    third.shutdown().await;
    let third = Server::start(with_seed(3, any_port)).await.expect("node 3 again");
    assert_ne!(third.addr(), &old_addr, "restarted on a new port");
    everyone.put("after", "2").await.expect("write");
    let on_third = AspenClient::connect(vec![third.addr().clone()], TOKEN).await.expect("client");
    let got = on_third.get("after").await.expect("linearizable read on the moved node");
    assert_eq!(got.kv.map(|kv| kv.value), Some(b"2".to_vec()), "the leader reached node 3 at its gossiped address");
    for server in [first, second, third] {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mdns_finds_members_on_the_lan_without_any_static_peer() {
    let root = tempfile::tempdir().expect("tempdir");
    // A secret of its own: the mDNS service name derives from it, so concurrent test
    // clusters on this host stay apart.
    let secret = format!("mdns-test-secret-{}", std::process::id());
    let any_port: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let with_mdns = |id: u64| {
        let mut node_config = config(id, root.path().join(format!("node-{id}")), any_port, &secret);
        node_config.mdns_discovery = true;
        node_config
    };
    let first = Server::start(with_mdns(1)).await.expect("node 1");
    let second = Server::start(with_mdns(2)).await.expect("node 2");
    let mut found = false;
    for _ in 0..300 {
        if first.address_book().get(2).as_ref() == Some(second.addr())
            && second.address_book().get(1).as_ref() == Some(first.addr())
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found, "mDNS + gossip: {:?} / {:?}", first.address_book().all(), second.address_book().all());
    first.shutdown().await;
    second.shutdown().await;
}

/// Sends `write` to `peer` until a node answers other than "not the leader" or "unavailable".
async fn resend(client: &AspenClient, peer: &PeerAddr, write: &ClientWrite) -> Result<WriteResponse, KvError> {
    for _ in 0..100 {
        match client.call_node(peer, ClientRequest::Write(write.clone())).await {
            Ok(ClientResponse::Write(Err(KvError::NotLeader { .. } | KvError::Unavailable(_)))) | Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(ClientResponse::Write(result)) => return result,
            Ok(other) => panic!("unexpected reply {other:?}"),
        }
    }
    panic!("no node answered the write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_resent_with_its_identity_applies_once_through_forwarding_and_failover() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_cluster(root.path(), 3).await;
    let leader = wait_for_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let everyone = client(&nodes.iter().collect::<Vec<_>>()).await;
    everyone.put("k", "a").await.expect("seed");
    let session = SessionId(0x5eed);
    let cas = |seq, first_outstanding| ClientWrite {
        id: Some(WriteId { session, seq, first_outstanding }),
        command: WriteCommand::Txn(TxnRequest {
            compare: vec![Compare {
                key: b"k".to_vec(),
                op: CompareOp::Equal,
                target: CompareTarget::Value(b"a".to_vec()),
            }],
            success: vec![TxnOp::Put { key: b"k".to_vec(), value: b"b".to_vec(), lease: None }],
            failure: vec![],
        }),
    };
    let leader_node = nodes.iter().find(|node| node.id == leader).expect("leader");
    let follower = nodes.iter().find(|node| node.id != leader).expect("follower");
    let first = resend(&everyone, &leader_node.addr(), &cas(1, 1)).await.expect("cas");
    let WriteResponse::Txn(answer) = &first else { panic!("{first:?}") };
    assert!(answer.succeeded);
    // A resend through a follower is forwarded to the leader, which remembers the answer.
    assert_eq!(resend(&everyone, &follower.addr(), &cas(1, 1)).await, Ok(first.clone()));

    // The leader goes away; the new leader, from its own log, gives the same answer.
    let leader_index = nodes.iter().position(|node| node.id == leader).expect("leader index");
    nodes[leader_index].stop().await;
    let survivors: Vec<&TestNode> = nodes.iter().filter(|node| node.server.is_some()).collect();
    wait_for_leader(&survivors).await;
    let survivor = survivors[0].addr();
    let survivors_client = client(&survivors).await;
    assert_eq!(resend(&survivors_client, &survivor, &cas(1, 1)).await, Ok(first));
    let got = survivors_client.get("k").await.expect("get").kv.expect("k exists");
    assert_eq!((got.value.as_slice(), got.version), (&b"b"[..], 2), "the CAS applied once");

    // Once the client has moved past it, the old write is refused, not applied.
    resend(
        &survivors_client,
        &survivor,
        &ClientWrite {
            id: Some(WriteId { session, seq: 5, first_outstanding: 5 }),
            command: WriteCommand::Delete { key: b"other".to_vec() },
        },
    )
    .await
    .expect("a later write");
    assert_eq!(
        resend(&survivors_client, &survivor, &cas(1, 1)).await,
        Err(KvError::Apply(ApplyError::WriteTooOld { seq: 1, floor: 5 }))
    );
    for node in &mut nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_the_leader_hands_over_and_leaves_a_working_cluster() {
    use aspen_api::{ClusterController, NodeRole};
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_cluster(root.path(), 3).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let old_leader = wait_for_leader(&all).await;
    let follower = nodes.iter().find(|node| node.id != old_leader).expect("a follower");
    // The client knows only a follower: the removal reaches the leader by its redirect.
    let admin = admin_client(&[follower]).await;
    admin.put("before", "1").await.expect("write before the removal");
    admin.remove(old_leader).await.expect("remove the leader");

    let rest: Vec<&TestNode> = nodes.iter().filter(|node| node.id != old_leader).collect();
    let rest_ids: std::collections::BTreeSet<u64> = rest.iter().map(|node| node.id).collect();
    let new_leader = wait_for_leader(&rest).await;
    assert!(rest_ids.contains(&new_leader), "the new leader {new_leader} is one of {rest_ids:?}");
    let status = admin.status().await.expect("status");
    assert_eq!(status.voters, rest_ids, "two voters are left");
    assert!(status.nodes.iter().all(|node| node.id != old_leader), "the old leader left the membership");
    client(&rest).await.put("after", "2").await.expect("write after the removal");
    for node in &rest {
        let single = client(&[node]).await;
        for (key, value) in [("before", "1"), ("after", "2")] {
            let got = single.get(key).await.expect("linearizable get").kv.map(|kv| kv.value);
            assert_eq!(got, Some(value.as_bytes().to_vec()), "{key} on node {}", node.id);
        }
    }

    // Every Raft core still answers (a panicked core leaves stale metrics behind), and the
    // removed node ends as a learner outside the membership it knows.
    for node in &nodes {
        let raft = node.server().node();
        raft.term().await.unwrap_or_else(|error| panic!("node {}'s Raft core is gone: {error}", node.id));
        let status = raft.status().await.expect("status");
        assert_ne!(status.role, NodeRole::Shutdown, "node {} shut down", node.id);
        if node.id == old_leader {
            assert_eq!(status.role, NodeRole::Learner, "the removed leader stepped down");
            assert!(status.nodes.iter().all(|member| member.id != old_leader), "{status:?}");
        }
    }
    for node in &mut nodes {
        node.stop().await;
    }
}

/// The value of the unlabelled counter `name` in a node's Prometheus text.
fn counter(server: &Server, name: &str) -> u64 {
    let text = aspen_server::metrics::render(server.node(), server.metrics());
    let line = text.lines().find(|line| line.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name}"));
    line[name.len() + 1..].parse().unwrap_or_else(|error| panic!("{line}: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_with_a_forged_log_reports_divergence_over_iroh_and_the_others_keep_serving() {
    use aspen_raft_storage::RedbLogStore;
    use openraft::EntryPayload;

    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_cluster(root.path(), 3).await;
    let leader = wait_for_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let everyone = client(&nodes.iter().collect::<Vec<_>>()).await;
    for i in 0..10 {
        everyone.put(format!("before/{i}"), "v").await.expect("write");
    }
    let forged_at = nodes.iter().position(|node| node.id != leader).expect("a follower");
    nodes[forged_at].stop().await;

    // Its log, rewritten with another value in one client write and re-chained, verifies on
    // its own: only the leader's hashes can tell.
    let path = nodes[forged_at].dir.join("raft-log.redb");
    let log = RedbLogStore::open(&path).expect("open the stopped node's log");
    let last = log.log_state().last_log_id.map(|log_id| log_id.index);
    let mut forged = log
        .read_entries(..)
        .expect("read")
        .into_iter()
        .find(|entry| matches!(&entry.payload, EntryPayload::Normal(proposal) if !proposal.writes.is_empty()))
        .expect("a client write");
    let EntryPayload::Normal(proposal) = &mut forged.payload else { unreachable!("found above") };
    proposal.writes[0].command = WriteCommand::Put { key: b"forged".to_vec(), value: b"x".to_vec(), lease: None };
    assert!(log.rewrite_entry(forged).expect("rewrite"));
    drop(log);

    nodes[forged_at].restart().await;
    let healthy: Vec<&TestNode> = nodes.iter().filter(|node| node.id != nodes[forged_at].id).collect();
    let writer = client(&healthy).await;
    for i in 0..10 {
        writer.put(format!("after/{i}"), "v").await.expect("write with a diverged follower");
    }
    let forged_node = &nodes[forged_at];
    let mut reported = 0;
    for _ in 0..100 {
        reported = counter(forged_node.server(), "aspen_raft_chain_divergence_total");
        if reported > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reported, 1, "the forged follower never reported the divergence");
    assert_eq!(forged_node.server().node().metrics().last_log_index, last, "it accepted entries after");
    for node in &healthy {
        assert_eq!(counter(node.server(), "aspen_raft_chain_divergence_total"), 0, "node {}", node.id);
        if node.id != leader {
            assert!(counter(node.server(), "aspen_raft_chain_checks_total") > 0, "node {} compared nothing", node.id);
        }
        let got = client(&[node]).await.get("after/9").await.expect("linearizable get").kv.map(|kv| kv.value);
        assert_eq!(got, Some(b"v".to_vec()), "node {}", node.id);
    }
    let status = aspen_api::ClusterController::status(forged_node.server().node()).await.expect("status");
    assert_eq!(status.last_log_index, last);
    for node in &mut nodes {
        node.stop().await;
    }
}
