//! Simulated Aspen nodes: the real `RaftNode` on the real redb log and SQLite state machine
//! (real files in a per-run directory), reached through the simulated network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aspen_api::{ClientRequest, ClientResponse, ClusterNode, NodeId};
use aspen_consensus::{ConsensusConfig, HealthTracker, RaftNode, RaftRpc, RaftRpcReply};
use aspen_raft_storage::log::LogStoreWatch;
use aspen_raft_storage::state_machine::{Durability, Opened, StateMachineWatch};
use aspen_raft_storage::{RedbLogStore, SqliteStateMachine};
use madsim::net::Endpoint;
use madsim::runtime::Handle;

use crate::history::Trace;
use crate::net::{self, CLIENT_TAG, NetFaults, RAFT_TAG, SimRaftClient};

/// A running node as the simulator sees it (for invariant checks).
#[derive(Clone)]
pub struct LiveNode {
    /// The consensus node.
    pub raft: RaftNode<SimRaftClient>,
    /// Its log (a second handle on the same database).
    pub log: RedbLogStore,
    /// Its state machine.
    pub state_machine: SqliteStateMachine,
}

/// The nodes currently running, by id.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<RegistryInner>>,
}

#[derive(Default)]
struct RegistryInner {
    live: BTreeMap<NodeId, LiveNode>,
    /// Watches on each node's last log and state machine: a restart waits until the old
    /// ones closed.
    closed: BTreeMap<NodeId, (LogStoreWatch, StateMachineWatch)>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The running nodes.
    pub fn live(&self) -> BTreeMap<NodeId, LiveNode> {
        self.lock().live.clone()
    }

    /// One running node.
    pub fn get(&self, id: NodeId) -> Option<LiveNode> {
        self.lock().live.get(&id).cloned()
    }

    /// Forgets a node that is being killed, so nothing but its own tasks holds its files.
    pub fn remove(&self, id: NodeId) {
        self.lock().live.remove(&id);
    }

    /// Whether node `id`'s previous incarnation has closed its log and state machine.
    pub fn is_closed(&self, id: NodeId) -> bool {
        self.lock().closed.get(&id).is_none_or(|(log, state_machine)| log.is_closed() && state_machine.is_closed())
    }

    /// Waits (10 ms steps, at most `steps` of them) until node `id`'s previous incarnation
    /// has closed its log and state machine; killed tasks are dropped lazily. Returns whether it closed.
    pub async fn wait_closed(&self, id: NodeId, steps: u32) -> bool {
        for _ in 0..steps {
            if self.is_closed(id) {
                return true;
            }
            madsim::time::sleep(Duration::from_millis(10)).await;
        }
        self.is_closed(id)
    }
}

/// Everything a node's init task needs; cloned into madsim's restartable init closure.
#[derive(Clone)]
pub struct NodeSpec {
    /// The node id.
    pub id: NodeId,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its consensus settings.
    pub config: ConsensusConfig,
    /// Network faults shared by the run.
    pub faults: Arc<NetFaults>,
    /// The run's registry.
    pub registry: Registry,
    /// The run's trace.
    pub trace: Trace,
}

/// The member record of node `id`.
pub fn member(id: NodeId) -> ClusterNode {
    ClusterNode { id, addr: net::node_addr(id).to_string() }
}

/// Milliseconds of simulated time since the run started.
pub fn now_ms() -> u64 {
    madsim::time::TimeHandle::current().elapsed().as_millis() as u64
}

/// File in a node's directory holding the number of its simulated OS boot.
const BOOT_FILE: &str = "sim-boot";

/// The number of the simulated OS boot a node's directory is under (0 until its first OS crash).
fn boot_number(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(BOOT_FILE)).ok().and_then(|text| text.trim().parse().ok()).unwrap_or(0)
}

/// The state machine durability of the simulated OS boot a node's directory is under.
pub fn boot_of(dir: &Path) -> Durability {
    Durability::Unsynced { boot: format!("sim-boot-{}", boot_number(dir)) }
}

/// Moves a node's directory to its next simulated OS boot.
pub fn next_boot(dir: &Path) -> std::io::Result<u64> {
    let next = boot_number(dir) + 1;
    std::fs::write(dir.join(BOOT_FILE), next.to_string())?;
    Ok(next)
}

/// The body of a node: open the files, start Raft, serve until killed.
pub async fn run_node(spec: NodeSpec) {
    let id = spec.id;
    // A killed incarnation's files must close before reopening.
    if !spec.registry.wait_closed(id, 1000).await {
        spec.trace
            .violation(now_ms(), format!("node {id}: previous incarnation never closed its log and state machine"));
        return;
    }
    if let Err(error) = std::fs::create_dir_all(&spec.dir) {
        return spec.trace.violation(now_ms(), format!("node {id}: cannot create its directory: {error}"));
    }
    let log = match RedbLogStore::open(spec.dir.join("raft.redb")) {
        Ok(log) => log,
        Err(error) => return spec.trace.violation(now_ms(), format!("node {id}: log does not reopen: {error}")),
    };
    let state_machine = match SqliteStateMachine::open_with(spec.dir.join("sm"), boot_of(&spec.dir)) {
        Ok(state_machine) => state_machine,
        Err(error) => {
            return spec.trace.violation(now_ms(), format!("node {id}: state machine does not reopen: {error}"));
        }
    };
    if state_machine.opened() == Opened::Discarded {
        spec.trace.event(now_ms(), format!("node {id}: state machine from an earlier boot discarded; rebuilding"));
    }
    let rpc = Arc::new(SimRaftClient::new(Arc::clone(&spec.faults)));
    let health = Arc::new(HealthTracker::default());
    let raft = match RaftNode::start(spec.config.clone(), log.clone(), state_machine.clone(), rpc, health).await {
        Ok(raft) => raft,
        Err(error) => return spec.trace.violation(now_ms(), format!("node {id}: raft does not start: {error}")),
    };
    {
        let mut registry = spec.registry.lock();
        registry.closed.insert(id, (log.watch(), state_machine.watch()));
        registry.live.insert(id, LiveNode { raft: raft.clone(), log, state_machine });
    }
    spec.trace.event(now_ms(), format!("node {id} started"));
    let endpoint = match Endpoint::bind(net::node_addr(id)).await {
        Ok(endpoint) => Arc::new(endpoint),
        Err(error) => return spec.trace.violation(now_ms(), format!("node {id}: cannot bind: {error}")),
    };
    let raft_node = raft.clone();
    madsim::task::spawn(net::serve(Arc::clone(&endpoint), RAFT_TAG, Arc::clone(&spec.faults), move |bytes| {
        let node = raft_node.clone();
        async move {
            let reply = match postcard::from_bytes::<RaftRpc>(&bytes) {
                Ok(request) => node.handle_rpc(request).await,
                Err(error) => RaftRpcReply::Failed(format!("malformed request: {error}")),
            };
            postcard::to_stdvec(&reply).unwrap_or_default()
        }
    }));
    net::serve(endpoint, CLIENT_TAG, Arc::clone(&spec.faults), move |bytes| {
        let node = raft.clone();
        async move {
            let response = match postcard::from_bytes::<ClientRequest>(&bytes) {
                Ok(request) => node.handle_client(request).await,
                Err(error) => ClientResponse::Rejected(format!("malformed request: {error}")),
            };
            postcard::to_stdvec(&response).unwrap_or_default()
        }
    })
    .await;
}

/// Creates the simulated host of node `id` (started now, restartable later).
pub fn create_node(handle: &Handle, spec: NodeSpec) -> madsim::runtime::NodeHandle {
    let ip = net::node_addr(spec.id).ip();
    handle.create_node().name(format!("node-{}", spec.id)).ip(ip).init(move || run_node(spec.clone())).build()
}

/// The data directory of node `id` under `root`.
pub fn node_dir(root: &Path, id: NodeId) -> PathBuf {
    root.join(format!("node-{id}"))
}
