//! `RaftNode`: one member of an Aspen cluster, with a direct async API implementing the
//! `KeyValueStore` and `ClusterController` traits, and the server side of every RPC.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use aspen_api::limits::MAX_PEERS;
use aspen_api::rounds::SharedRounds;
use aspen_api::{
    ClientRequest, ClientResponse, ClientWrite, ClusterController, ClusterError, ClusterNode, ClusterStatus,
    GetRequest, GetResponse, KeyValueStore, KvError, LeaderStamp, NodeId, NodeRole, ReadConsistency, ScanRequest,
    ScanResponse, SqlRequest, SqlResponse, Stamped, TermReply, WriteResponse, validate_key,
};
use aspen_raft_storage::rt;
use aspen_raft_storage::state_machine::Snapshot;
use aspen_raft_storage::{
    DiskTimings, RedbLogStore, SnapshotMeta, SnapshotReceiver, SqliteStateMachine, StateMachineReader, Vote,
};
use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{InitializeError, LinearizableReadError, RaftError};
use openraft::{ChangeMembers, RaftMetrics, ReadPolicy, ServerState};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::batcher::{self, AspenRaft, PendingWrite, Proposals};
use crate::chain::{ChainDivergence, ChainGuard, ChainStats};
use crate::config::ConsensusConfig;
use crate::errors::{cluster_write_error, not_leader};
use crate::health::HealthTracker;
use crate::network::NetworkFactory;
use crate::rpc::{AppendEntries, RaftRpc, RaftRpcClient, RaftRpcReply, RpcFailure};

/// Failures starting a node.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid consensus config: {0}")]
    Config(#[from] openraft::ConfigError),
    /// openraft could not start on these stores.
    #[error("raft failed to start: {0}")]
    Raft(String),
}

/// A snapshot being received from the leader.
struct SnapshotInbox {
    vote: Vote,
    meta: SnapshotMeta,
    receiver: SnapshotReceiver,
}

/// openraft's metrics under Aspen's types.
type Metrics = RaftMetrics<aspen_raft_storage::TypeConfig>;

/// Pause between proof requests to a would-be member that could not be reached.
const PROOF_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
/// How long `init` keeps asking an unreachable member for its proof (it may still be
/// starting): under a client's 10 s wait for an answer, so the caller gets the refusal
/// naming the member rather than its own timeout.
const INIT_PROOF_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a would-be member was not admitted.
enum Unproven {
    /// It answered, and the answer disqualifies it.
    Refused(ClusterError),
    /// It could not be reached (or refused our own proof).
    Unreachable(RpcFailure),
}

impl Unproven {
    /// The error reported for would-be member `node`.
    fn into_error(self, node: NodeId) -> ClusterError {
        match self {
            Unproven::Refused(error) => error,
            Unproven::Unreachable(failure) => {
                ClusterError::Invalid(format!("node {node} is unreachable or refused us: {failure}"))
            }
        }
    }
}

/// One cluster member. Cheap to clone.
pub struct RaftNode<C: RaftRpcClient> {
    inner: Arc<Inner<C>>,
}

impl<C: RaftRpcClient> Clone for RaftNode<C> {
    fn clone(&self) -> Self {
        RaftNode { inner: Arc::clone(&self.inner) }
    }
}

struct Inner<C> {
    config: ConsensusConfig,
    raft: AspenRaft,
    state_machine: SqliteStateMachine,
    reader: StateMachineReader,
    rpc: Arc<C>,
    health: Arc<HealthTracker>,
    writes: mpsc::Sender<PendingWrite>,
    proposals: Arc<Proposals>,
    reads: SharedRounds<u64>,
    /// Leader checks for client-confirmed reads, shared like ReadIndex rounds.
    stamps: SharedRounds<Option<(LeaderStamp, u64)>>,
    snapshot_inbox: Mutex<Option<SnapshotInbox>>,
    /// The log's disk sync timings.
    disk: Arc<DiskTimings>,
    /// This log compared with the leader's (see `crate::chain`).
    chain: ChainGuard,
}

impl<C: RaftRpcClient> RaftNode<C> {
    /// Starts Raft on the given stores; peers are reached through `rpc`.
    pub async fn start(
        config: ConsensusConfig,
        log: RedbLogStore,
        state_machine: SqliteStateMachine,
        rpc: Arc<C>,
        health: Arc<HealthTracker>,
    ) -> Result<Self, StartError> {
        let raft_config = Arc::new(config.raft_config()?);
        let reader = state_machine.reader();
        let leader_switch = log.leader_switch();
        let disk = log.disk_timings();
        let chain = ChainGuard::new(log.chain_hashes());
        let raft = AspenRaft::new(
            config.node_id,
            raft_config,
            NetworkFactory::new(Arc::clone(&rpc), Arc::clone(&health), log.chain_hashes()),
            log,
            state_machine.clone(),
        )
        .await
        .map_err(|error| StartError::Raft(error.to_string()))?;
        rt::spawn(track_role(raft.metrics(), leader_switch));
        let (writes, queue) = mpsc::channel(config.max_pending_writes);
        let proposals = Proposals::new(config.max_batches_in_flight);
        rt::spawn(batcher::run(raft.clone(), queue, Arc::clone(&proposals), config.write_timeout));
        let inner = Inner {
            config,
            raft,
            state_machine,
            reader,
            rpc,
            health,
            writes,
            proposals,
            reads: SharedRounds::default(),
            stamps: SharedRounds::default(),
            snapshot_inbox: Mutex::new(None),
            disk,
            chain,
        };
        Ok(RaftNode { inner: Arc::new(inner) })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// The openraft handle (for metrics and tests).
    pub fn raft(&self) -> &AspenRaft {
        &self.inner.raft
    }

    /// The failure and clock-drift detector's view of the peers.
    pub fn health(&self) -> &Arc<HealthTracker> {
        &self.inner.health
    }

    /// How long the log's journal syncs and durable commits take.
    pub fn disk_timings(&self) -> &Arc<DiskTimings> {
        &self.inner.disk
    }

    /// What comparing this node's log with the leader's found (see `crate::chain`).
    pub fn chain_stats(&self) -> ChainStats {
        self.inner.chain.stats()
    }

    /// The latest Raft metrics.
    pub fn metrics(&self) -> RaftMetrics<aspen_raft_storage::TypeConfig> {
        self.inner.raft.metrics().borrow_watched().clone()
    }

    /// Stops Raft. Pending writes fail with `Unavailable`.
    pub async fn shutdown(&self) -> Result<(), String> {
        self.inner.raft.shutdown().await.map_err(|error| error.to_string())
    }

    fn leader(&self) -> Option<(NodeId, Option<ClusterNode>)> {
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow_watched();
        let leader = metrics.current_leader?;
        let node = metrics.membership_config.membership().get_node(&leader).cloned();
        Some((leader, node))
    }

    /// Sends `request` to the current leader (never to this node).
    async fn call_leader(&self, request: RaftRpc) -> Result<RaftRpcReply, KvError> {
        let Some((leader, Some(node))) = self.leader() else {
            return Err(KvError::NotLeader { leader: None, leader_addr: None });
        };
        if leader == self.id() {
            // openraft refused this leader the request itself, typically because no quorum
            // acknowledged it within its lease (CheckQuorum): there is no other leader to ask.
            return Err(KvError::Unavailable(self.leader_refusal_reason()));
        }
        self.inner.rpc.call(leader, &node, request).await.map_err(|failure| match failure {
            RpcFailure::Timeout { after_ms, .. } => KvError::Timeout { after_ms },
            // Never reached the leader: nothing was done there.
            RpcFailure::Unreachable { .. } => KvError::Unavailable(failure.to_string()),
            // The exchange broke after the request may have left: a forwarded write may
            // have been applied.
            RpcFailure::Network { .. } => KvError::OutcomeUnknown(failure.to_string()),
            // An answer that did not prove the secret is no answer: the request reached a peer
            // that may or may not have acted on it.
            RpcFailure::Unauthenticated { .. } => KvError::OutcomeUnknown(failure.to_string()),
        })
    }

    /// Proposes a write on this node (which must lead), through the batcher, or directly
    /// when there is nothing to group it with.
    async fn propose(&self, write: ClientWrite) -> Result<WriteResponse, KvError> {
        let timeout = self.inner.config.write_timeout;
        let queue_empty = self.inner.writes.capacity() == self.inner.writes.max_capacity();
        if let Some(_proposing) = self.inner.proposals.try_direct(queue_empty) {
            return batcher::propose_one(&self.inner.raft, write, timeout).await;
        }
        let after_ms = timeout.as_millis() as u64;
        let (reply, result) = oneshot::channel();
        rt::timeout(timeout, self.inner.writes.send(PendingWrite { write, reply }))
            .await
            // Still queued or refused by the closed queue: never proposed.
            .map_err(|_| KvError::Unavailable(format!("write queue full for {after_ms} ms")))?
            .map_err(|_| KvError::Unavailable("node is shutting down".into()))?;
        rt::timeout(timeout, result)
            .await
            .map_err(|_| KvError::Timeout { after_ms })?
            // The batcher dropped the reply after taking the write: it may have been proposed.
            .map_err(|_| KvError::OutcomeUnknown("node shut down while proposing the write".into()))?
    }

    /// Waits until this node's state machine reflects every write acknowledged before the
    /// call (ReadIndex): on the leader directly, on a follower via the leader's read index.
    pub async fn read_barrier(&self, consistency: ReadConsistency) -> Result<(), KvError> {
        if consistency == ReadConsistency::Stale {
            return Ok(());
        }
        // This node applies no more entries: it would wait for a read point it never reaches.
        if let Some(divergence) = self.inner.chain.diverged() {
            return Err(KvError::Unavailable(divergence.to_string()));
        }
        // Deliberate bug for the simulator's self-test (`cargo xtask sim --bug stale-read`):
        // a follower serves "linearizable" reads from its local state. Never in real builds.
        #[cfg(feature = "sim-bug-stale-read")]
        if self.leader().is_some_and(|(leader, _)| leader != self.id()) {
            return Ok(());
        }
        let read_index = match self.leader() {
            Some((leader, _)) if leader == self.id() => match self.local_read_index().await {
                Ok(_) => return Ok(()),
                Err(KvError::NotLeader { .. }) => self.remote_read_index().await?,
                Err(error) => return Err(error),
            },
            _ => self.remote_read_index().await?,
        };
        self.applied_at_least(read_index).await?;
        Ok(())
    }

    /// On the leader: confirms leadership with a quorum and waits for the read point.
    /// Concurrent reads share confirmation rounds (see `aspen_api::rounds`).
    async fn local_read_index(&self) -> Result<u64, KvError> {
        self.inner.reads.run(|| self.confirm_leadership()).await
    }

    /// One ReadIndex round: a quorum confirms this node still leads, and the state machine
    /// has applied everything committed when the round began.
    async fn confirm_leadership(&self) -> Result<u64, KvError> {
        match self.inner.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(read_log_id) => Ok(read_log_id.index()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(forward))) => Err(not_leader(&forward)),
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(quorum))) => {
                let voters = self.metrics().membership_config.membership().voter_ids().count();
                Err(KvError::Unavailable(format!(
                    "no quorum: node {} leads but only {} of {voters} voters confirmed it for this read",
                    self.id(),
                    quorum.got.len()
                )))
            }
            Err(RaftError::Fatal(fatal)) => Err(KvError::Unavailable(fatal.to_string())),
        }
    }

    /// This node's current term, read inside the Raft core, so it is at least the term of
    /// any vote this node granted before the call (ADR 0004).
    pub async fn term(&self) -> Result<TermReply, KvError> {
        let node = self.id();
        let term = self
            .inner
            .raft
            .with_raft_state(|state| state.vote_ref().leader_id.term)
            .await
            .map_err(|fatal| KvError::Unavailable(fatal.to_string()))?;
        Ok(TermReply { node, term })
    }

    /// A read on the leader that the client confirms (ADR 0004): with a stamp when this node
    /// leads and has committed an entry of its term, else after a full ReadIndex round.
    pub async fn get_stamped(&self, request: GetRequest) -> Result<Stamped<GetResponse>, KvError> {
        validate_key(&request.key)?;
        self.stamped(|consistency| self.get(GetRequest { consistency, ..request })).await
    }

    /// A scan on the leader that the client confirms, like [`RaftNode::get_stamped`].
    pub async fn scan_stamped(&self, request: ScanRequest) -> Result<Stamped<ScanResponse>, KvError> {
        request.validate()?;
        self.stamped(|consistency| self.scan(ScanRequest { consistency, ..request })).await
    }

    /// Runs `read` stale after the leader check, or linearizable (a full ReadIndex round)
    /// when this node cannot stamp.
    async fn stamped<T, F, Fut>(&self, read: F) -> Result<Stamped<T>, KvError>
    where
        F: FnOnce(ReadConsistency) -> Fut,
        Fut: Future<Output = Result<T, KvError>>,
    {
        let Some((stamp, read_index)) = self.inner.stamps.run(|| self.leader_stamp()).await? else {
            return Ok(Stamped { response: read(ReadConsistency::Linearizable).await?, stamp: None });
        };
        self.applied_at_least(read_index).await?;
        Ok(Stamped { response: read(ReadConsistency::Stale).await?, stamp: Some(stamp) })
    }

    /// Waits (at most the read timeout) until the state machine has applied `index`.
    async fn applied_at_least(&self, index: u64) -> Result<(), KvError> {
        let timeout = self.inner.config.read_timeout;
        self.inner
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(|_| ())
            .map_err(|_| KvError::Timeout { after_ms: timeout.as_millis() as u64 })
    }

    /// Inside the Raft core: if this node is the elected leader of its term and has
    /// committed an entry of that term (so everything committed before the term is too),
    /// its stamp and commit index; `None` otherwise.
    async fn leader_stamp(&self) -> Result<Option<(LeaderStamp, u64)>, KvError> {
        let id = self.id();
        self.inner
            .raft
            .with_raft_state(move |state| {
                let vote = state.vote_ref();
                let term = vote.leader_id.term;
                let leads =
                    state.server_state == ServerState::Leader && vote.committed && vote.leader_id.voted_for == id;
                let committed = state.local_committed()?;
                if !leads || committed.leader_id.term != term {
                    return None;
                }
                let voters = state.membership_state.effective().get_joint_config().clone();
                Some((LeaderStamp { leader: id, term, voters }, committed.index))
            })
            .await
            .map_err(|fatal| KvError::Unavailable(fatal.to_string()))
    }

    async fn remote_read_index(&self) -> Result<u64, KvError> {
        // A read changes nothing: a broken exchange is just unavailability.
        let reply = self.call_leader(RaftRpc::ReadIndex).await.map_err(|error| match error {
            KvError::OutcomeUnknown(reason) => KvError::Unavailable(reason),
            other => other,
        })?;
        match reply {
            RaftRpcReply::ReadIndex(result) => result,
            other => Err(KvError::Unavailable(format!("unexpected reply to ReadIndex: {other:?}"))),
        }
    }

    /// Answers one client request: the node edge shared by aspen-server (after its token
    /// check, with its metrics around it) and the simulator, so both run the same dispatch.
    /// `Metrics` is the server's to answer (it owns the metrics); here it is refused.
    pub async fn handle_client(&self, request: ClientRequest) -> ClientResponse {
        match request {
            ClientRequest::Get(request) => ClientResponse::Get(self.get(request).await),
            ClientRequest::Scan(request) => ClientResponse::Scan(self.scan(request).await),
            ClientRequest::Write(write) => ClientResponse::Write(self.write(write).await),
            ClientRequest::Sql(request) => ClientResponse::Sql(self.sql(request).await),
            ClientRequest::Status => ClientResponse::Status(self.status().await),
            ClientRequest::Metrics => ClientResponse::Rejected("metrics are served by the node's server".into()),
            ClientRequest::Init(members) => ClientResponse::Cluster(self.init(members).await),
            ClientRequest::AddLearner(member) => ClientResponse::Cluster(self.add_learner(member).await),
            ClientRequest::ChangeMembership(voters) => ClientResponse::Cluster(self.change_membership(voters).await),
            ClientRequest::Remove(id) => ClientResponse::Cluster(self.remove(id).await),
            ClientRequest::TriggerSnapshot => ClientResponse::Cluster(self.trigger_snapshot().await),
            ClientRequest::TransferLeader(id) => ClientResponse::Cluster(self.transfer_leader(id).await),
            ClientRequest::StampedGet(request) => ClientResponse::StampedGet(self.get_stamped(request).await),
            ClientRequest::Term => ClientResponse::Term(self.term().await),
            ClientRequest::StampedScan(request) => ClientResponse::StampedScan(self.scan_stamped(request).await),
        }
    }

    /// Handles a request from a peer. Access control happens before this, in the transport.
    pub async fn handle_rpc(&self, request: RaftRpc) -> RaftRpcReply {
        let raft = &self.inner.raft;
        match request {
            RaftRpc::AppendEntries(AppendEntries { request, prev_hash }) => {
                let leader = request.vote.leader_id.voted_for;
                let prev = request.prev_log_id.as_ref();
                if let Err(divergence) = self.check_chain(leader, prev, prev_hash, &request.entries) {
                    return RaftRpcReply::ChainDivergence(divergence);
                }
                match raft.append_entries(request).await {
                    Ok(response) => RaftRpcReply::AppendEntries(response),
                    Err(error) => RaftRpcReply::Failed(error.to_string()),
                }
            }
            RaftRpc::Vote(request) => match raft.vote(request).await {
                Ok(response) => RaftRpcReply::Vote(response),
                Err(error) => RaftRpcReply::Failed(error.to_string()),
            },
            RaftRpc::PreVote(request) => match raft.pre_vote(request).await {
                Ok(response) => RaftRpcReply::Vote(response),
                Err(error) => RaftRpcReply::Failed(error.to_string()),
            },
            RaftRpc::TransferLeader(_) if let Some(divergence) = self.inner.chain.diverged() => {
                // Leading would replicate the diverged log.
                RaftRpcReply::ChainDivergence(divergence.clone())
            }
            RaftRpc::TransferLeader(request) => match raft.handle_transfer_leader(request).await {
                Ok(Ok(())) => RaftRpcReply::TransferLeader,
                Ok(Err(error)) => RaftRpcReply::Failed(error.to_string()),
                Err(error) => RaftRpcReply::Failed(error.to_string()),
            },
            RaftRpc::Snapshot(chunk) => match self.receive_snapshot_chunk(chunk).await {
                Ok(response) => RaftRpcReply::Snapshot(response),
                Err(SnapshotRefused::Diverged(divergence)) => RaftRpcReply::ChainDivergence(divergence),
                Err(SnapshotRefused::Failed(error)) => RaftRpcReply::Failed(error),
            },
            RaftRpc::ReadIndex => RaftRpcReply::ReadIndex(self.local_read_index().await),
            RaftRpc::Ping => RaftRpcReply::Pong { node_id: self.id() },
            RaftRpc::Forward(write) => {
                // One hop only: a forwarded write is never forwarded again.
                let result = match write.validate() {
                    Ok(()) => self.propose(write).await,
                    Err(error) => Err(error.into()),
                };
                RaftRpcReply::Forward(result)
            }
        }
    }

    /// Compares the leader's chain hash at `at` (and at the last of `entries`, which follow
    /// it, this log holds already) with this log's (see `crate::chain`). On a divergence this
    /// node also stops campaigning: as leader it would replicate its log.
    fn check_chain(
        &self,
        leader: NodeId,
        at: Option<&aspen_raft_storage::LogId>,
        leader_hash: Option<aspen_raft_storage::log::chain::ChainHash>,
        entries: &[aspen_raft_storage::Entry],
    ) -> Result<(), ChainDivergence> {
        self.inner
            .chain
            .check_append(leader, at, leader_hash, entries)
            .inspect_err(|_| self.inner.raft.runtime_config().elect(false))
    }

    async fn receive_snapshot_chunk(
        &self,
        chunk: crate::rpc::SnapshotChunk,
    ) -> Result<Option<openraft::raft::SnapshotResponse<aspen_raft_storage::TypeConfig>>, SnapshotRefused> {
        let leader = chunk.vote.leader_id.voted_for;
        if let Some(divergence) = self.inner.chain.diverged() {
            return Err(SnapshotRefused::Diverged(divergence.clone()));
        }
        let mut inbox = self.inner.snapshot_inbox.lock().await;
        if chunk.offset == 0 {
            let receiver = self
                .inner
                .state_machine
                .receive_snapshot(chunk.size, chunk.checksum)
                .map_err(|error| error.to_string())?;
            *inbox = Some(SnapshotInbox { vote: chunk.vote, meta: chunk.meta.clone(), receiver });
        }
        let Some(state) = inbox.as_mut() else {
            return Err(format!("snapshot chunk at offset {} without a start", chunk.offset).into());
        };
        if state.meta != chunk.meta || state.vote != chunk.vote {
            *inbox = None;
            return Err("snapshot chunk belongs to another snapshot".into());
        }
        if let Err(error) = state.receiver.write_chunk(chunk.offset, &chunk.data) {
            *inbox = None;
            return Err(error.to_string().into());
        }
        if chunk.offset + (chunk.data.len() as u64) < chunk.size {
            return Ok(None);
        }
        let Some(done) = inbox.take() else { return Err("snapshot inbox vanished".into()) };
        let file = done.receiver.finish().map_err(|error| error.to_string())?;
        // The snapshot's last entry, if this log holds it, must be the leader's; if the
        // install purges this whole log, the chain goes on from the leader's hash there.
        let last = done.meta.last_log_id;
        self.check_chain(leader, last.as_ref(), chunk.last_hash, &[]).map_err(SnapshotRefused::Diverged)?;
        if let (Some(last), Some(last_hash)) = (last, chunk.last_hash) {
            self.inner.chain.hashes().expect_snapshot_anchor(last, last_hash);
        }
        let snapshot = Snapshot { meta: done.meta, snapshot: file };
        let installed = self.inner.raft.install_full_snapshot(done.vote, snapshot).await;
        installed.map(Some).map_err(|error| SnapshotRefused::Failed(error.to_string()))
    }

    fn blocking_read<T, F>(&self, read: F) -> impl Future<Output = Result<T, KvError>> + Send + use<T, F, C>
    where
        T: Send + 'static,
        F: FnOnce(&StateMachineReader) -> Result<T, KvError> + Send + 'static,
    {
        let reader = self.inner.reader.clone();
        async move {
            rt::blocking(move || read(&reader))
                .await
                .map_err(|error| KvError::Storage(format!("read task failed: {error}")))?
        }
    }
}

/// Why a snapshot chunk was not taken.
enum SnapshotRefused {
    /// This node's log diverged from the leader's.
    Diverged(ChainDivergence),
    /// The chunk could not be received or installed.
    Failed(String),
}

impl From<String> for SnapshotRefused {
    fn from(error: String) -> Self {
        SnapshotRefused::Failed(error)
    }
}

impl From<&str> for SnapshotRefused {
    fn from(error: &str) -> Self {
        SnapshotRefused::Failed(error.to_string())
    }
}

/// How often the role tracker checks, without a metrics change, whether the log is closed.
const ROLE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps the log store told whether this node leads (it picks the append path by role),
/// until the log is closed. Holds no handle that keeps the log open.
async fn track_role(
    mut metrics: openraft::type_config::alias::WatchReceiverOf<
        aspen_raft_storage::TypeConfig,
        RaftMetrics<aspen_raft_storage::TypeConfig>,
    >,
    switch: aspen_raft_storage::log::LeaderSwitch,
) {
    loop {
        let leading = metrics.borrow_watched().state == ServerState::Leader;
        if !switch.set(leading) {
            return;
        }
        if let Ok(Err(_)) = rt::timeout(ROLE_CHECK_INTERVAL, metrics.changed()).await {
            return;
        }
    }
}

impl<C: RaftRpcClient> KeyValueStore for RaftNode<C> {
    async fn get(&self, request: GetRequest) -> Result<GetResponse, KvError> {
        validate_key(&request.key)?;
        self.read_barrier(request.consistency).await?;
        if let Some(result) = self.inner.reader.try_get_now(&request.key) {
            return result.map_err(|error| KvError::Storage(error.to_string()));
        }
        self.blocking_read(move |reader| reader.get(&request.key).map_err(|error| KvError::Storage(error.to_string())))
            .await
    }

    async fn scan(&self, request: ScanRequest) -> Result<ScanResponse, KvError> {
        request.validate()?;
        self.read_barrier(request.consistency).await?;
        if let Some(result) = self.inner.reader.try_scan_now(&request) {
            return result.map_err(|error| KvError::Storage(error.to_string()));
        }
        self.blocking_read(move |reader| reader.scan(&request).map_err(|error| KvError::Storage(error.to_string())))
            .await
    }

    async fn write(&self, write: ClientWrite) -> Result<WriteResponse, KvError> {
        write.validate()?;
        match self.leader() {
            Some((leader, _)) if leader == self.id() => match self.propose(write.clone()).await {
                // Leadership moved between the check and the proposal: forward once.
                Err(KvError::NotLeader { .. }) => self.forward(write).await,
                result => result,
            },
            Some(_) => self.forward(write).await,
            None => Err(KvError::NotLeader { leader: None, leader_addr: None }),
        }
    }

    async fn sql(&self, request: SqlRequest) -> Result<SqlResponse, KvError> {
        request.validate()?;
        self.read_barrier(request.consistency).await?;
        self.blocking_read(move |reader| reader.sql(&request).map_err(|error| KvError::Sql(error.to_string()))).await
    }
}

impl<C: RaftRpcClient> RaftNode<C> {
    async fn forward(&self, write: ClientWrite) -> Result<WriteResponse, KvError> {
        match self.call_leader(RaftRpc::Forward(write)).await? {
            RaftRpcReply::Forward(result) => result,
            // The leader handled the request in some way (a refusal names no outcome).
            other => Err(KvError::OutcomeUnknown(format!("unexpected reply to Forward: {other:?}"))),
        }
    }

    /// Asks `node` to prove, before it enters the membership (and is sent the log), that it
    /// holds the cluster secret (its answer carries a proof the RPC client checks, see
    /// [`RpcFailure::Unauthenticated`]) and is the node it claims to be.
    async fn prove_member(&self, node: &ClusterNode) -> Result<(), Unproven> {
        match self.inner.rpc.call(node.id, node, RaftRpc::Ping).await {
            Ok(RaftRpcReply::Pong { node_id }) if node_id == node.id => Ok(()),
            Err(RpcFailure::Unauthenticated { reason, .. }) => {
                Err(Unproven::Refused(ClusterError::SecretNotProven { node: node.id, reason }))
            }
            Ok(RaftRpcReply::Pong { node_id }) => Err(Unproven::Refused(ClusterError::Invalid(format!(
                "{} is node {node_id}, not node {}",
                node.addr, node.id
            )))),
            Ok(other) => Err(Unproven::Refused(ClusterError::Invalid(format!("node {} answered {other:?}", node.id)))),
            Err(failure) => Err(Unproven::Unreachable(failure)),
        }
    }

    /// [`RaftNode::prove_member`], asked again while `node` cannot be reached (it may still be
    /// starting), for at most `timeout`.
    async fn prove_member_within(&self, node: &ClusterNode, timeout: std::time::Duration) -> Result<(), ClusterError> {
        let mut last = None;
        let proven = rt::timeout(timeout, async {
            loop {
                match self.prove_member(node).await {
                    Ok(()) => return Ok(()),
                    Err(Unproven::Refused(error)) => return Err(error),
                    Err(unreachable) => last = Some(unreachable),
                }
                rt::sleep(PROOF_RETRY_PAUSE).await;
            }
        })
        .await;
        match proven {
            Ok(result) => result,
            Err(_) => Err(match last {
                Some(unproven) => unproven.into_error(node.id),
                None => {
                    ClusterError::Invalid(format!("node {} did not answer within {} ms", node.id, timeout.as_millis()))
                }
            }),
        }
    }

    /// Ok on the leader; else a redirect to the leader this node knows. A leader that
    /// removed itself keeps its own vote (so `current_leader` still names it) but is no
    /// longer in the `Leader` state: it redirects nowhere, and the client tries other nodes.
    fn require_leader(&self) -> Result<(), ClusterError> {
        match self.leader() {
            Some((leader, _)) if leader == self.id() && self.inner.raft.is_leader() => Ok(()),
            Some((leader, node)) if leader != self.id() => {
                Err(ClusterError::NotLeader { leader: Some(leader), leader_addr: node.map(|node| node.addr) })
            }
            _ => Err(ClusterError::NotLeader { leader: None, leader_addr: None }),
        }
    }

    /// Refuses to remove voter `node` when the voters left could not commit: none left, or
    /// fewer than a majority of them acknowledged this leader within the leader lease (the
    /// joint configuration would never commit, and the change would hang until its timeout).
    fn check_quorum_without(&self, metrics: &Metrics, node: NodeId) -> Result<(), ClusterError> {
        let voters_left: BTreeSet<NodeId> =
            metrics.membership_config.membership().voter_ids().filter(|id| *id != node).collect();
        if voters_left.is_empty() {
            return Err(ClusterError::LastVoter(node));
        }
        let reachable = self.acked_within_lease(metrics, &voters_left);
        if reachable * 2 <= voters_left.len() {
            return Err(ClusterError::WouldLoseQuorum { node, voters_left: voters_left.len(), reachable });
        }
        Ok(())
    }

    /// How many of `voters` this leader counts as with it: itself, and those that
    /// acknowledged it within the leader lease. openraft's lease is the longest election
    /// timeout: a voter silent for that long may already follow someone else, or be gone.
    fn acked_within_lease(&self, metrics: &Metrics, voters: &BTreeSet<NodeId>) -> usize {
        let lease = std::time::Duration::from_millis(self.inner.config.election_timeout_max_ms);
        let acked = |id: &NodeId| {
            let acked_at = metrics.heartbeat.as_ref().and_then(|acks| acks.get(id).cloned().flatten());
            acked_at.is_some_and(|at| at.elapsed() < lease)
        };
        voters.iter().filter(|id| **id == self.id() || acked(id)).count()
    }

    /// Why this node, named leader, cannot serve a request openraft refused it: usually it
    /// has no quorum (and how many voters are with it), else it is stepping down.
    fn leader_refusal_reason(&self) -> String {
        let metrics = self.metrics();
        let (id, term) = (self.id(), metrics.current_term);
        if !self.quorum_lease_expired(&metrics) {
            return format!("node {id} leads term {term} but is handing leadership over or leaving the cluster");
        }
        let voters: BTreeSet<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        format!(
            "no quorum: node {id} was elected leader in term {term} but only {} of {} voters acknowledged it \
             in the last {} ms",
            self.acked_within_lease(&metrics, &voters),
            voters.len(),
            self.inner.config.election_timeout_max_ms
        )
    }

    /// Whether this node leads but no quorum acknowledged it within openraft's leader lease
    /// (the longest election timeout). openraft keeps such a leader in its Leader state until
    /// it hears a newer term, while refusing it new writes (CheckQuorum, see config.rs); this
    /// is the same test, so Aspen reports it as isolated rather than as the leader.
    fn quorum_lease_expired(&self, metrics: &Metrics) -> bool {
        let voters: BTreeSet<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        if voters == BTreeSet::from([self.id()]) {
            return false;
        }
        let lease = std::time::Duration::from_millis(self.inner.config.election_timeout_max_ms);
        metrics.last_quorum_acked.as_ref().is_none_or(|acked| acked.elapsed() >= lease)
    }

    /// After this leader removed itself: waits for openraft's step-down (hand leadership to
    /// the most up-to-date voter, then become a learner outside the membership, two heartbeat
    /// periods; `removed_leader_step_down` in config.rs), so callers that come next are not
    /// served by a leader on its way out. Bounded by two election timeouts, room for a loaded
    /// machine; the removal is committed either way.
    async fn await_step_down(&self) {
        let timeout = std::time::Duration::from_millis(2 * self.inner.config.election_timeout_max_ms);
        let stepped_down = self
            .inner
            .raft
            .wait(Some(timeout))
            .metrics(|metrics| metrics.state != ServerState::Leader, "removed leader steps down")
            .await;
        if let Err(error) = stepped_down {
            tracing::warn!(node = self.id(), %error, "removed leader has not stepped down yet");
        }
    }
}

fn fatal(error: impl std::fmt::Display) -> ClusterError {
    ClusterError::Failed(error.to_string())
}

impl<C: RaftRpcClient> ClusterController for RaftNode<C> {
    async fn init(&self, members: Vec<ClusterNode>) -> Result<(), ClusterError> {
        if members.is_empty() || members.len() > MAX_PEERS {
            return Err(ClusterError::Invalid(format!("a cluster has 1..={MAX_PEERS} initial members")));
        }
        // Already initialized (a restart given `--init` again): say so without asking the
        // members anything, so a restart does not wait on peers that are down.
        if self.inner.raft.is_initialized().await.map_err(fatal)? {
            return Err(ClusterError::AlreadyInitialized);
        }
        let members: BTreeMap<NodeId, ClusterNode> = members.into_iter().map(|node| (node.id, node)).collect();
        // Every other member proves the cluster secret before it is sent anything else (the
        // first heartbeat would carry the log), as a learner must (add_learner). All at once,
        // each asked again while unreachable.
        let proofs = members
            .values()
            .filter(|node| node.id != self.id())
            .map(|node| self.prove_member_within(node, INIT_PROOF_WINDOW));
        futures::future::try_join_all(proofs).await?;
        match self.inner.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Err(ClusterError::AlreadyInitialized),
            Err(error) => Err(fatal(error)),
        }
    }

    async fn add_learner(&self, node: ClusterNode) -> Result<(), ClusterError> {
        self.require_leader()?;
        let members = self.metrics().membership_config.membership().nodes().count();
        if members >= MAX_PEERS {
            return Err(ClusterError::Invalid(format!("the cluster already has {MAX_PEERS} nodes")));
        }
        self.prove_member(&node).await.map_err(|unproven| unproven.into_error(node.id))?;
        // Blocking: returns once the learner has caught up, so promoting it right after is
        // safe. Bounded: a learner that cannot be reached (or refuses us) is a timeout.
        let timeout = self.inner.config.write_timeout;
        rt::timeout(timeout, self.inner.raft.add_learner(node.id, node, true))
            .await
            .map_err(|_| ClusterError::Timeout { after_ms: timeout.as_millis() as u64 })?
            .map(|_| ())
            .map_err(cluster_write_error)
    }

    async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), ClusterError> {
        self.require_leader()?;
        if voters.is_empty() {
            return Err(ClusterError::Invalid("a cluster needs at least one voter".into()));
        }
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        if let Some(unknown) = voters.iter().find(|id| membership.get_node(id).is_none()) {
            return Err(ClusterError::UnknownNode(*unknown));
        }
        let timeout = self.inner.config.write_timeout;
        rt::timeout(timeout, self.inner.raft.change_membership(voters, false))
            .await
            .map_err(|_| ClusterError::Timeout { after_ms: timeout.as_millis() as u64 })?
            .map(|_| ())
            .map_err(cluster_write_error)
    }

    async fn remove(&self, node: NodeId) -> Result<(), ClusterError> {
        self.require_leader()?;
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&node).is_none() {
            return Err(ClusterError::UnknownNode(node));
        }
        // One membership change per removal: with `retain = false`, removing a voter drops it
        // from the membership altogether. A `RemoveNodes` after it would append a second,
        // identical config, and when the node removed is this leader, append it from a leader
        // already outside every config (openraft lets it lead until its step-down): that fails
        // openraft's assertion that only a leader appends a membership and kills the Raft core.
        let change = if membership.voter_ids().any(|id| id == node) {
            self.check_quorum_without(&metrics, node)?;
            ChangeMembers::RemoveVoters(BTreeSet::from([node]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node]))
        };
        let timeout = self.inner.config.write_timeout;
        rt::timeout(timeout, self.inner.raft.change_membership(change, false))
            .await
            .map_err(|_| ClusterError::Timeout { after_ms: timeout.as_millis() as u64 })?
            .map_err(cluster_write_error)?;
        if node == self.id() {
            self.await_step_down().await;
        }
        Ok(())
    }

    async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        let role = match metrics.state {
            ServerState::Leader if self.quorum_lease_expired(&metrics) => NodeRole::Isolated,
            ServerState::Leader => NodeRole::Leader,
            ServerState::Follower => NodeRole::Follower,
            ServerState::Candidate => NodeRole::Candidate,
            ServerState::Learner => NodeRole::Learner,
            ServerState::Shutdown => NodeRole::Shutdown,
        };
        Ok(ClusterStatus {
            node_id: self.id(),
            role,
            term: metrics.current_term,
            // Only a leader names itself: an isolated leader, or one that removed itself and
            // stepped down, still holds its own vote but is no leader a client could use.
            leader: metrics.current_leader.filter(|leader| *leader != self.id() || role == NodeRole::Leader),
            last_log_index: metrics.last_log_index,
            last_applied: metrics.last_applied.map(|log_id| log_id.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership.nodes().map(|(_, node)| node.clone()).collect(),
            peers: self.inner.health.snapshot(),
        })
    }

    async fn trigger_snapshot(&self) -> Result<(), ClusterError> {
        self.inner.raft.trigger().snapshot().await.map_err(fatal)
    }

    async fn transfer_leader(&self, node: NodeId) -> Result<(), ClusterError> {
        self.require_leader()?;
        if self.metrics().membership_config.membership().get_node(&node).is_none() {
            return Err(ClusterError::UnknownNode(node));
        }
        self.inner.raft.trigger().transfer_leader(node).await.map_err(fatal)
    }
}
