//! Consensus behaviour of real RaftNodes (real redb logs, real SQLite state machines on
//! temp dirs) over an in-memory network. Every message is round-tripped through postcard,
//! as on the wire. The iroh transport has its own tests; these are about consensus.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aspen_api::{
    ClientWrite, ClusterController, ClusterError, ClusterNode, GetRequest, KeyValueStore, KvError, NodeId, NodeRole,
    ReadConsistency, ScanRequest, WriteCommand, WriteResponse,
};
use aspen_consensus::{ChainDivergence, ConsensusConfig, RaftNode, RaftRpc, RaftRpcClient, RaftRpcReply, RpcFailure};
use aspen_raft_storage::log::LogStoreWatch;
use aspen_raft_storage::{RedbLogStore, SqliteStateMachine};

type Node = RaftNode<Link>;

/// Routes RPCs between in-process nodes; a node marked down is unreachable, and a cut
/// link drops every message between its two ends, both ways.
#[derive(Default)]
struct Router {
    nodes: Mutex<BTreeMap<NodeId, Node>>,
    down: Mutex<BTreeSet<NodeId>>,
    cut: Mutex<BTreeSet<(NodeId, NodeId)>>,
    /// Every chain divergence a node replied with, and who replied.
    divergences: Mutex<Vec<(NodeId, ChainDivergence)>>,
    /// Each node's log, to know when a stopped node has closed it.
    logs: Mutex<BTreeMap<NodeId, LogStoreWatch>>,
}

impl Router {
    /// Cuts every link between `id` and the other nodes.
    fn isolate(&self, id: NodeId) {
        let others: Vec<NodeId> =
            self.nodes.lock().expect("lock").keys().copied().filter(|other| *other != id).collect();
        for other in others {
            self.cut_link(id, other);
        }
    }

    /// Cuts the link between `a` and `b`, both ways.
    fn cut_link(&self, a: NodeId, b: NodeId) {
        self.cut.lock().expect("lock").extend([(a, b), (b, a)]);
    }

    /// Restores every cut link.
    fn heal(&self) {
        self.cut.lock().expect("lock").clear();
    }
}

/// One node's end of the router: knows who is calling, so links can be cut.
struct Link {
    from: NodeId,
    router: Arc<Router>,
}

impl RaftRpcClient for Link {
    async fn call(&self, target: NodeId, _node: &ClusterNode, request: RaftRpc) -> Result<RaftRpcReply, RpcFailure> {
        let router = &self.router;
        let unreachable = |reason: &str| RpcFailure::Unreachable { node: target, reason: reason.into() };
        if router.down.lock().expect("lock").contains(&target) {
            return Err(unreachable("node is down"));
        }
        if router.cut.lock().expect("lock").contains(&(self.from, target)) {
            return Err(unreachable("link is cut"));
        }
        let node =
            router.nodes.lock().expect("lock").get(&target).cloned().ok_or_else(|| unreachable("no such node"))?;
        let bytes = postcard::to_stdvec(&request).map_err(|error| unreachable(&error.to_string()))?;
        let request: RaftRpc = postcard::from_bytes(&bytes).map_err(|error| unreachable(&error.to_string()))?;
        let reply = node.handle_rpc(request).await;
        // A link cut while the request was being handled loses the reply.
        if router.cut.lock().expect("lock").contains(&(target, self.from)) {
            return Err(unreachable("link is cut"));
        }
        let bytes = postcard::to_stdvec(&reply).map_err(|error| unreachable(&error.to_string()))?;
        let reply: RaftRpcReply = postcard::from_bytes(&bytes).map_err(|error| unreachable(&error.to_string()))?;
        if let RaftRpcReply::ChainDivergence(divergence) = &reply {
            router.divergences.lock().expect("lock").push((target, divergence.clone()));
        }
        Ok(reply)
    }
}

struct Cluster {
    router: Arc<Router>,
    dir: tempfile::TempDir,
    config: fn(NodeId) -> ConsensusConfig,
}

fn fast_config(id: NodeId) -> ConsensusConfig {
    let mut config = ConsensusConfig::new(id);
    config.heartbeat_interval_ms = 50;
    config.election_timeout_min_ms = 300;
    config.election_timeout_max_ms = 600;
    config
}

fn member(id: NodeId) -> ClusterNode {
    ClusterNode { id, addr: format!("mem://{id}") }
}

impl Cluster {
    fn new(config: fn(NodeId) -> ConsensusConfig) -> Self {
        Cluster { router: Arc::new(Router::default()), dir: tempfile::tempdir().expect("tempdir"), config }
    }

    fn node_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    async fn start(&self, id: NodeId) -> Node {
        let dir = self.node_dir(id);
        std::fs::create_dir_all(&dir).expect("node dir");
        let log = RedbLogStore::open(dir.join("raft-log.redb")).expect("log");
        self.router.logs.lock().expect("lock").insert(id, log.watch());
        let state_machine = SqliteStateMachine::open(Path::new(&dir).join("state-machine")).expect("state machine");
        let link = Arc::new(Link { from: id, router: Arc::clone(&self.router) });
        let node =
            RaftNode::start((self.config)(id), log, state_machine, link, Default::default()).await.expect("start");
        self.router.nodes.lock().expect("lock").insert(id, node.clone());
        self.router.down.lock().expect("lock").remove(&id);
        node
    }

    async fn kill(&self, id: NodeId) {
        self.router.down.lock().expect("lock").insert(id);
        let node = self.router.nodes.lock().expect("lock").remove(&id);
        if let Some(node) = node {
            node.shutdown().await.expect("shutdown");
        }
    }

    /// Stops node `id` and waits until its log is closed, so its files can be opened.
    async fn stop(&self, id: NodeId) {
        self.kill(id).await;
        let watch = self.router.logs.lock().expect("lock").get(&id).cloned().expect("node was started");
        for _ in 0..200 {
            if watch.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node {id}'s log is still open after it stopped");
    }

    fn node(&self, id: NodeId) -> Node {
        self.router.nodes.lock().expect("lock").get(&id).cloned().expect("node is running")
    }

    async fn start_initialized(&self, ids: &[NodeId]) -> Vec<Node> {
        let mut nodes = Vec::new();
        for id in ids {
            nodes.push(self.start(*id).await);
        }
        nodes[0].init(ids.iter().map(|id| member(*id)).collect()).await.expect("init");
        self.wait_for_leader(ids).await;
        nodes
    }

    /// Waits until every running node in `ids` agrees on a leader among them.
    async fn wait_for_leader(&self, ids: &[NodeId]) -> NodeId {
        for _ in 0..200 {
            let leaders: BTreeSet<Option<NodeId>> =
                ids.iter().map(|id| self.node(*id).metrics().current_leader).collect();
            if let [Some(leader)] = leaders.iter().collect::<Vec<_>>().as_slice()
                && ids.contains(leader)
            {
                return *leader;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no agreed leader among {ids:?}");
    }
}

fn put(key: &str, value: &str) -> ClientWrite {
    WriteCommand::Put { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec(), lease: None }.into()
}

async fn linearizable_value(node: &Node, key: &str) -> Option<Vec<u8>> {
    let request = GetRequest { key: key.as_bytes().to_vec(), consistency: ReadConsistency::Linearizable };
    node.get(request).await.expect("linearizable get").kv.map(|kv| kv.value)
}

/// Retries a write through leader changes, as a client library does.
async fn write_with_retry(cluster: &Cluster, ids: &[NodeId], command: ClientWrite) -> WriteResponse {
    for attempt in 0..100 {
        let node = cluster.node(ids[attempt % ids.len()]);
        match node.write(command.clone()).await {
            Ok(response) => return response,
            Err(KvError::NotLeader { .. } | KvError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("write failed: {error}"),
        }
    }
    panic!("write never succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_on_leader_and_follower_are_read_linearizably_on_every_node() {
    let cluster = Cluster::new(fast_config);
    let nodes = cluster.start_initialized(&[1, 2, 3]).await;
    let leader = cluster.wait_for_leader(&[1, 2, 3]).await;
    let follower = nodes.iter().find(|node| node.id() != leader).expect("a follower");

    cluster.node(leader).write(put("on-leader", "1")).await.expect("write on leader");
    follower.write(put("on-follower", "2")).await.expect("write on follower is forwarded");
    for node in &nodes {
        assert_eq!(linearizable_value(node, "on-leader").await, Some(b"1".to_vec()), "node {}", node.id());
        assert_eq!(linearizable_value(node, "on-follower").await, Some(b"2".to_vec()), "node {}", node.id());
    }
    let status = follower.status().await.expect("status");
    assert_eq!(status.leader, Some(leader));
    assert_eq!(status.voters, BTreeSet::from([1, 2, 3]));
    assert!(matches!(nodes[1].init(vec![member(9)]).await, Err(ClusterError::AlreadyInitialized)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_are_batched_into_fewer_entries() {
    let cluster = Cluster::new(fast_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let leader = cluster.node(cluster.wait_for_leader(&[1, 2, 3]).await);
    let before = leader.metrics().last_log_index.unwrap_or(0);
    let writes = 400;
    let mut tasks = Vec::new();
    for i in 0..writes {
        let leader = leader.clone();
        tasks.push(tokio::spawn(async move { leader.write(put(&format!("batch/{i:04}"), "v")).await }));
    }
    for task in tasks {
        assert!(matches!(task.await.expect("join"), Ok(WriteResponse::Put { .. })));
    }
    let entries = leader.metrics().last_log_index.unwrap_or(0) - before;
    assert!(entries < writes, "{writes} writes took {entries} entries: no batching happened");
    let scan = leader.scan(ScanRequest::prefix(b"batch/".to_vec(), 0)).await.expect("scan");
    assert_eq!(scan.kvs.len(), writes as usize);
}

/// One write batch in flight, and elections slow enough that a short stall of the leader's
/// replication changes no leader.
fn one_batch_in_flight_config(id: NodeId) -> ConsensusConfig {
    let mut config = fast_config(id);
    config.election_timeout_min_ms = 3000;
    config.election_timeout_max_ms = 4000;
    config.max_batches_in_flight = 1;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_arriving_while_every_batch_slot_is_busy_join_one_entry() {
    let cluster = Cluster::new(one_batch_in_flight_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let leader_id = cluster.wait_for_leader(&[1, 2, 3]).await;
    let leader = cluster.node(leader_id);
    let followers: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != leader_id).collect();
    let before = leader.metrics().last_log_index.unwrap_or(0);

    // The leader cannot reach its followers, so the first write holds the only slot.
    cluster.router.down.lock().expect("lock").extend(followers);
    let spawn_put = |key: &'static str| {
        let leader = leader.clone();
        tokio::spawn(async move { leader.write(put(key, "v")).await })
    };
    let mut tasks = vec![spawn_put("held/a")];
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Writes that arrive at different times while the slot is busy all wait for it, and
    // then go out together: "b" must not be grouped alone just because it came first.
    tasks.push(spawn_put("held/b"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    tasks.push(spawn_put("held/c"));
    tasks.push(spawn_put("held/d"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tasks.iter().all(|task| !task.is_finished()), "a write committed without a follower");
    cluster.router.down.lock().expect("lock").clear();

    for task in tasks {
        assert!(matches!(task.await.expect("join"), Ok(WriteResponse::Put { .. })));
    }
    assert_eq!(leader.metrics().current_leader, Some(leader_id), "the stall changed the leader");
    let entries = leader.metrics().last_log_index.unwrap_or(0) - before;
    assert_eq!(entries, 2, "expected one entry for the first write and one for the three that waited");
    let scan = leader.scan(ScanRequest::prefix(b"held/".to_vec(), 0)).await.expect("scan");
    assert_eq!(scan.kvs.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_crash_loses_no_acknowledged_write_and_old_leader_catches_up() {
    let cluster = Cluster::new(fast_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let old_leader = cluster.wait_for_leader(&[1, 2, 3]).await;
    for i in 0..50 {
        write_with_retry(&cluster, &[1, 2, 3], put(&format!("acked/{i:02}"), &i.to_string())).await;
    }
    cluster.kill(old_leader).await;
    let survivors: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != old_leader).collect();
    let new_leader = cluster.wait_for_leader(&survivors).await;
    assert_ne!(new_leader, old_leader);
    for id in &survivors {
        let scan = cluster.node(*id).scan(ScanRequest::prefix(b"acked/".to_vec(), 0)).await.expect("scan");
        assert_eq!(scan.kvs.len(), 50, "node {id} after failover");
    }
    write_with_retry(&cluster, &survivors, put("after-failover", "yes")).await;

    // The old leader restarts from its files and catches up.
    let restarted = cluster.start(old_leader).await;
    cluster.wait_for_leader(&[1, 2, 3]).await;
    assert_eq!(linearizable_value(&restarted, "after-failover").await, Some(b"yes".to_vec()));
    assert_eq!(linearizable_value(&restarted, "acked/49").await, Some(b"49".to_vec()));
    assert_no_divergence(&cluster, &[1, 2, 3]);
}

/// No node found its log diverged from a leader's, and none was told so.
fn assert_no_divergence(cluster: &Cluster, ids: &[NodeId]) {
    for id in ids {
        let stats = cluster.node(*id).chain_stats();
        assert_eq!(stats.divergences, 0, "node {id}: {stats:?}");
    }
    assert_eq!(*cluster.router.divergences.lock().expect("lock"), vec![]);
}

fn snapshotting_config(id: NodeId) -> ConsensusConfig {
    let mut config = fast_config(id);
    config.snapshot_after_entries = 20;
    config.log_entries_kept_after_snapshot = 0;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_learner_catches_up_through_a_streamed_snapshot() {
    let cluster = Cluster::new(snapshotting_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let leader = cluster.node(cluster.wait_for_leader(&[1, 2, 3]).await);
    for i in 0..120 {
        leader.write(put(&format!("snap/{i:03}"), &"x".repeat(100))).await.expect("write");
    }
    // Wait for the leader to snapshot and purge its log, so the learner cannot replay it.
    for _ in 0..100 {
        if leader.metrics().purged.is_some_and(|purged| purged.index > 50) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let purged = leader.metrics().purged.expect("leader purged its log");
    let learner = cluster.start(4).await;
    leader.add_learner(member(4)).await.expect("add learner");
    learner
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |metrics| metrics.snapshot.is_some_and(|snapshot| snapshot.index >= purged.index),
            "learner got a snapshot",
        )
        .await
        .expect("the learner installed a snapshot covering the purged log");
    // A linearizable read on the learner waits for the leader's read index.
    let scan = learner.scan(ScanRequest::prefix(b"snap/".to_vec(), 0)).await.expect("scan");
    assert_eq!(scan.kvs.len(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_grows_to_five_and_shrinks_to_three_while_writes_continue() {
    let cluster = Cluster::new(fast_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let leader_id = cluster.wait_for_leader(&[1, 2, 3]).await;
    let leader = cluster.node(leader_id);
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let writer = {
        let leader = leader.clone();
        let stop = Arc::clone(&stop);
        let acked_count = Arc::clone(&acked_count);
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("during/{i:05}");
                if leader.write(put(&key, "v")).await.is_ok() {
                    acked.push(key);
                    acked_count.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            acked
        })
    };
    let wait_for_acks = |target: usize| {
        let acked_count = Arc::clone(&acked_count);
        async move {
            while acked_count.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for_acks(5).await;
    for id in [4, 5] {
        cluster.start(id).await;
        leader.add_learner(member(id)).await.expect("add learner");
    }
    leader.change_membership(BTreeSet::from([1, 2, 3, 4, 5])).await.expect("grow to 5");
    assert_eq!(leader.status().await.expect("status").voters, BTreeSet::from([1, 2, 3, 4, 5]));
    let during = acked_count.load(Ordering::Relaxed);
    let shrink_to: BTreeSet<NodeId> =
        [leader_id].into_iter().chain([1, 2, 3, 4, 5].into_iter().filter(|id| *id != leader_id).take(2)).collect();
    leader.change_membership(shrink_to.clone()).await.expect("shrink to 3");
    // Writes keep being acknowledged after both changes.
    tokio::time::timeout(Duration::from_secs(10), wait_for_acks(during + 5)).await.expect("writes continue");
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.expect("writer");
    let status = leader.status().await.expect("status");
    assert_eq!(status.voters, shrink_to);
    for id in &shrink_to {
        let node = cluster.node(*id);
        for key in [&acked[0], &acked[acked.len() / 2], &acked[acked.len() - 1]] {
            assert_eq!(linearizable_value(&node, key).await, Some(b"v".to_vec()), "node {id} key {key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_voter_is_refused_when_no_voter_or_no_reachable_majority_would_be_left() {
    let single = Cluster::new(fast_config);
    let only = single.start_initialized(&[1]).await.remove(0);
    assert!(matches!(only.remove(1).await, Err(ClusterError::LastVoter(1))), "the last voter was removed");
    only.write(put("still", "up")).await.expect("the single node still serves writes");

    let cluster = Cluster::new(fast_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let leader_id = cluster.wait_for_leader(&[1, 2, 3]).await;
    let leader = cluster.node(leader_id);
    let followers: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != leader_id).collect();
    let (live, dead) = (followers[0], followers[1]);
    cluster.kill(dead).await;
    // Long enough for the dead voter's last acknowledgement to fall out of the lease.
    tokio::time::sleep(Duration::from_millis(2 * fast_config(1).election_timeout_max_ms)).await;

    // Without the live follower (or without the leader), one of the two voters left is down.
    for node in [live, leader_id] {
        let refused = leader.remove(node).await;
        assert!(
            matches!(refused, Err(ClusterError::WouldLoseQuorum { node: n, voters_left: 2, reachable: 1 }) if n == node),
            "removing {node} with {dead} down: {refused:?}"
        );
    }
    assert_eq!(leader.status().await.expect("status").voters, BTreeSet::from([1, 2, 3]), "a refusal changed nothing");

    // Removing the dead voter is what an operator needs, and it works.
    leader.remove(dead).await.expect("remove the dead voter");
    let status = leader.status().await.expect("status");
    assert_eq!(status.voters, BTreeSet::from([leader_id, live]));
    assert!(status.nodes.iter().all(|node| node.id != dead), "the removed voter left the membership");
    write_with_retry(&cluster, &[leader_id, live], put("after-removal", "1")).await;
    assert_eq!(linearizable_value(&cluster.node(live), "after-removal").await, Some(b"1".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_follower_neither_raises_the_term_nor_deposes_the_leader() {
    let cluster = Cluster::new(fast_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let leader = cluster.wait_for_leader(&[1, 2, 3]).await;
    write_with_retry(&cluster, &[leader], put("before", "1")).await;
    let term = cluster.node(leader).metrics().current_term;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");

    // Cut off for about seven of its longest election timeouts (the incident: 4 s, term 1 -> 63).
    cluster.router.isolate(follower);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(cluster.node(follower).metrics().current_term, term, "the isolated follower raised its term");
    cluster.router.heal();

    write_with_retry(&cluster, &[leader], put("after", "2")).await;
    assert_eq!(linearizable_value(&cluster.node(follower), "after").await, Some(b"2".to_vec()));
    // A few more election timeouts: the returning follower started no election either.
    tokio::time::sleep(Duration::from_millis(3 * fast_config(1).election_timeout_max_ms)).await;
    for id in [1, 2, 3] {
        let metrics = cluster.node(id).metrics();
        assert_eq!(metrics.current_term, term, "node {id}'s term moved");
        assert_eq!(metrics.current_leader, Some(leader), "node {id} follows another leader");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_leader_stops_reporting_itself_leader_and_follows_the_new_one_after_healing() {
    let cluster = Cluster::new(fast_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let old_id = cluster.wait_for_leader(&[1, 2, 3]).await;
    let old = cluster.node(old_id);
    write_with_retry(&cluster, &[old_id], put("before", "1")).await;
    let survivors: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != old_id).collect();

    cluster.router.isolate(old_id);
    let isolated_at = std::time::Instant::now();
    // The leader lease is the longest election timeout; allow as much again for scheduling.
    let bound = Duration::from_millis(2 * fast_config(1).election_timeout_max_ms);
    let status = loop {
        let status = old.status().await.expect("status");
        if status.role != NodeRole::Leader || isolated_at.elapsed() > bound {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.role, NodeRole::Isolated, "still reports itself leader after {:?}", isolated_at.elapsed());
    assert_eq!(status.leader, None, "an isolated leader names no leader");
    // It refuses writes and linearizable reads at once instead of holding them until they
    // time out, and a refusal that is not a redirect says why: no quorum.
    let refused = tokio::time::timeout(Duration::from_secs(1), old.write(put("refused", "x"))).await;
    let read = GetRequest { key: b"before".to_vec(), consistency: ReadConsistency::Linearizable };
    let refused_read =
        tokio::time::timeout(Duration::from_secs(1), old.get(read)).await.map(|result| result.map(|_| ()));
    for refusal in [refused.map(|result| result.map(|_| ())), refused_read] {
        match refusal {
            Ok(Err(KvError::NotLeader { .. })) => {}
            Ok(Err(KvError::Unavailable(reason))) => {
                assert!(reason.starts_with(&format!("no quorum: node {old_id}")), "{reason}");
                assert!(reason.contains("only 1 of 3 voters"), "{reason}");
            }
            other => panic!("request on the isolated leader: {other:?}"),
        }
    }

    let new_id = cluster.wait_for_leader(&survivors).await;
    write_with_retry(&cluster, &survivors, put("during", "2")).await;
    let new_term = cluster.node(new_id).metrics().current_term;

    cluster.router.heal();
    let followed = old
        .raft()
        .wait(Some(Duration::from_secs(5)))
        .metrics(
            |metrics| metrics.state == openraft::ServerState::Follower && metrics.current_leader == Some(new_id),
            "the old leader follows the new one",
        )
        .await
        .expect("the old leader follows the new leader after healing");
    assert_eq!(followed.current_term, new_term, "the old leader came back with another term");
    assert_eq!(cluster.node(new_id).metrics().current_leader, Some(new_id), "healing deposed the new leader");
    assert_eq!(linearizable_value(&old, "during").await, Some(b"2".to_vec()));
    assert_eq!(linearizable_value(&old, "refused").await, None, "a refused write was applied");
    // Whatever the old leader appended alone was replaced by the new leader's entries: a
    // conflict Raft resolves, not a divergence.
    assert_no_divergence(&cluster, &[1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_that_lost_its_quorum_goes_quiet_so_the_majority_can_elect() {
    // Four voters. The leader still reaches one follower (the bridge) but not the other two,
    // which need the bridge's vote (3 of 4). A bridge that keeps hearing the old leader keeps
    // its lease and refuses them: the old leader must go quiet for a majority to form.
    let cluster = Cluster::new(fast_config);
    cluster.start_initialized(&[1, 2, 3, 4]).await;
    let old_id = cluster.wait_for_leader(&[1, 2, 3, 4]).await;
    let others: Vec<NodeId> = [1, 2, 3, 4].into_iter().filter(|id| *id != old_id).collect();
    for cut_off in &others[1..] {
        cluster.router.cut_link(old_id, *cut_off);
    }

    let new_id = cluster.wait_for_leader(&others).await;
    write_with_retry(&cluster, &others, put("majority", "1")).await;
    // Probing again, the old leader hears the newer term through the bridge and follows it.
    let old = cluster.node(old_id);
    old.raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(|metrics| metrics.current_leader == Some(new_id), "the old leader follows the new one")
        .await
        .expect("the old leader learns of the new leader through the bridge");
    assert_ne!(old.metrics().state, openraft::ServerState::Leader);
}

/// Waits until node `id` has applied its log up to `index`.
async fn wait_applied(node: &Node, index: u64) {
    node.raft()
        .wait(Some(Duration::from_secs(10)))
        .applied_index_at_least(Some(index), "caught up")
        .await
        .expect("the node applies the log");
}

/// Forges the first client write in the log at `path` (its value changes), re-chaining the
/// entries after it: the log verifies on open, and differs from every other node's. Returns
/// the forged entry's index and the last index.
fn forge_log(path: &Path) -> (u64, u64) {
    use aspen_api::WriteCommand;
    use openraft::EntryPayload;

    let log = RedbLogStore::open(path).expect("open the stopped node's log");
    let entries = log.read_entries(..).expect("read");
    let mut forged = entries
        .iter()
        .find(|entry| matches!(&entry.payload, EntryPayload::Normal(proposal) if !proposal.writes.is_empty()))
        .cloned()
        .expect("a client write in the log");
    let EntryPayload::Normal(proposal) = &mut forged.payload else { unreachable!("found above") };
    proposal.writes[0].command =
        WriteCommand::Put { key: b"forged".to_vec(), value: b"never written".to_vec(), lease: None };
    assert!(log.rewrite_entry(forged.clone()).expect("rewrite"));
    drop(log);
    let last = entries.last().expect("entries").log_id.index;
    let reopened = RedbLogStore::open(path).expect("the forged log verifies");
    assert_eq!(reopened.verify().expect("verify").last.map(|log_id| log_id.index), Some(last));
    (forged.log_id.index, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_whose_log_was_forged_on_disk_reports_divergence_and_refuses_entries_while_the_others_serve() {
    let cluster = Cluster::new(fast_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let leader_id = cluster.wait_for_leader(&[1, 2, 3]).await;
    let leader = cluster.node(leader_id);
    for i in 0..20 {
        leader.write(put(&format!("before/{i:02}"), "v")).await.expect("write");
    }
    let followers: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != leader_id).collect();
    let (forged_id, healthy_id) = (followers[0], followers[1]);
    let last_before = leader.metrics().last_log_index.expect("leader log");
    wait_applied(&cluster.node(forged_id), last_before).await;
    let term = leader.metrics().current_term;

    cluster.stop(forged_id).await;
    let (forged_index, forged_last) = forge_log(&cluster.node_dir(forged_id).join("raft-log.redb"));
    let forged = cluster.start(forged_id).await;
    for i in 0..20 {
        write_with_retry(&cluster, &[leader_id, healthy_id], put(&format!("after/{i:02}"), "v")).await;
    }

    // The follower found the divergence at an entry at or after the forged one, and said so.
    let stats = forged.chain_stats();
    assert_eq!(stats.divergences, 1, "{stats:?}");
    let divergence = stats.divergence.expect("the divergence is recorded");
    assert!(
        (forged_index..=forged_last).contains(&divergence.index),
        "divergence at {}, forged {forged_index}..={forged_last}",
        divergence.index
    );
    assert_eq!(divergence.leader, leader_id);
    assert_ne!(divergence.leader_hash, divergence.local_hash);
    let replies = cluster.router.divergences.lock().expect("lock").clone();
    assert!(!replies.is_empty(), "the leader never got the typed refusal");
    assert!(replies.iter().all(|(from, reply)| *from == forged_id && *reply == divergence), "{replies:?}");

    // It took no entry since, while the leader and the healthy follower went on.
    let leader_last = leader.metrics().last_log_index.expect("leader log");
    assert!(leader_last >= forged_last + 20, "the leader kept writing");
    assert_eq!(forged.metrics().last_log_index, Some(forged_last), "the diverged follower accepted entries");
    let healthy = cluster.node(healthy_id);
    assert_eq!(linearizable_value(&healthy, "after/19").await, Some(b"v".to_vec()));
    assert_eq!(linearizable_value(&leader, "after/19").await, Some(b"v".to_vec()));
    assert_eq!(healthy.chain_stats().divergences, 0);

    // It still answers: status, and reads of its own state; a linearizable read, which could
    // never be served here, fails at once.
    let status = forged.status().await.expect("status");
    assert_eq!(status.last_log_index, Some(forged_last));
    let stale = GetRequest { key: b"before/00".to_vec(), consistency: ReadConsistency::Stale };
    assert_eq!(forged.get(stale).await.expect("stale read").kv.map(|kv| kv.value), Some(b"v".to_vec()));
    let linearizable = GetRequest { key: b"after/19".to_vec(), consistency: ReadConsistency::Linearizable };
    let refused = tokio::time::timeout(Duration::from_secs(1), forged.get(linearizable)).await;
    assert!(matches!(refused, Ok(Err(KvError::Unavailable(_)))), "linearizable read on the diverged node: {refused:?}");

    // It neither campaigns nor disturbs the leader.
    tokio::time::sleep(Duration::from_millis(3 * fast_config(1).election_timeout_max_ms)).await;
    assert_eq!(leader.metrics().current_leader, Some(leader_id));
    assert_eq!(leader.metrics().current_term, term, "the term moved");
    assert_eq!(forged.metrics().last_log_index, Some(forged_last));
    write_with_retry(&cluster, &[leader_id, healthy_id], put("still", "serving")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_snapshot_installs_purges_and_restarts_never_report_divergence() {
    let cluster = Cluster::new(snapshotting_config);
    cluster.start_initialized(&[1, 2, 3]).await;
    let leader_id = cluster.wait_for_leader(&[1, 2, 3]).await;
    let leader = cluster.node(leader_id);
    for i in 0..120 {
        leader.write(put(&format!("snap/{i:03}"), "v")).await.expect("write");
    }
    for _ in 0..100 {
        if leader.metrics().purged.is_some_and(|purged| purged.index > 50) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let purged = leader.metrics().purged.expect("leader purged its log");
    // A new learner starts from a snapshot that overtakes its (empty) log.
    let learner = cluster.start(4).await;
    leader.add_learner(member(4)).await.expect("add learner");
    learner
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(|metrics| metrics.snapshot.is_some_and(|snapshot| snapshot.index >= purged.index), "snapshot")
        .await
        .expect("the learner installed a snapshot");
    let checked_after_install = learner.chain_stats().checked;
    for i in 0..40 {
        leader.write(put(&format!("more/{i:03}"), "v")).await.expect("write");
    }
    wait_applied(&learner, leader.metrics().last_log_index.expect("log")).await;
    assert!(
        learner.chain_stats().checked > checked_after_install,
        "the learner compared nothing after its snapshot install: its chain is not the leader's"
    );

    // A follower restarted from its purged log keeps comparing.
    let follower_id = [1, 2, 3].into_iter().find(|id| *id != leader_id).expect("a follower");
    cluster.stop(follower_id).await;
    let follower = cluster.start(follower_id).await;
    for i in 0..40 {
        write_with_retry(&cluster, &[leader_id], put(&format!("last/{i:03}"), "v")).await;
    }
    wait_applied(&follower, leader.metrics().last_log_index.expect("log")).await;
    assert!(follower.chain_stats().checked > 0, "the restarted follower compared nothing");

    assert_no_divergence(&cluster, &[1, 2, 3, 4]);
    for id in [1, 2, 3, 4].into_iter().filter(|id| *id != leader_id) {
        assert!(cluster.node(id).chain_stats().checked > 0, "node {id} compared nothing");
    }
    assert_eq!(linearizable_value(&learner, "last/039").await, Some(b"v".to_vec()));
}
