//! openraft's network traits over any [`RaftRpcClient`]. Each AppendEntries and snapshot
//! carries this node's chain hash at the entry it builds on, for the follower to compare
//! (see [`crate::chain`]).

use std::future::Future;
use std::sync::Arc;

use aspen_api::limits::MAX_SNAPSHOT_CHUNK_SIZE;
use aspen_api::{ClusterNode, NodeId};
use aspen_raft_storage::log::ChainHashes;
use aspen_raft_storage::state_machine::Snapshot;
use aspen_raft_storage::{SnapshotFile, TypeConfig, Vote};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};

use crate::chain::ChainDivergence;
use crate::health::HealthTracker;
use crate::rpc::{AppendEntries, RaftRpc, RaftRpcClient, RaftRpcReply, RpcFailure, SnapshotChunk};

/// Creates per-peer network handles for openraft.
pub struct NetworkFactory<C> {
    client: Arc<C>,
    health: Arc<HealthTracker>,
    hashes: ChainHashes,
}

impl<C> NetworkFactory<C> {
    /// A factory whose handles send through `client`, report outcomes to `health`, and
    /// attach this node's chain hashes from `hashes`.
    pub fn new(client: Arc<C>, health: Arc<HealthTracker>, hashes: ChainHashes) -> Self {
        NetworkFactory { client, health, hashes }
    }
}

/// openraft's handle to one peer.
pub struct PeerNetwork<C> {
    client: Arc<C>,
    health: Arc<HealthTracker>,
    hashes: ChainHashes,
    target: NodeId,
    node: ClusterNode,
    /// Whether this handle has logged the peer's divergence (openraft retries it, with
    /// backoff, for as long as the peer stays in the membership).
    divergence_logged: bool,
}

impl<C: RaftRpcClient> RaftNetworkFactory<TypeConfig> for NetworkFactory<C> {
    type Network = PeerNetwork<C>;

    async fn new_client(&mut self, target: NodeId, node: &ClusterNode) -> Self::Network {
        PeerNetwork {
            client: Arc::clone(&self.client),
            health: Arc::clone(&self.health),
            hashes: self.hashes.clone(),
            target,
            node: node.clone(),
            divergence_logged: false,
        }
    }
}

fn rpc_error(failure: RpcFailure) -> RPCError<TypeConfig> {
    match failure {
        // A peer that cannot prove the secret is no peer: back off as from an unreachable one.
        RpcFailure::Unreachable { .. } | RpcFailure::Unauthenticated { .. } => {
            RPCError::Unreachable(Unreachable::new(&failure))
        }
        RpcFailure::Timeout { .. } | RpcFailure::Network { .. } => RPCError::Network(NetworkError::new(&failure)),
    }
}

/// A peer whose log diverged refuses every entry until it is rebuilt: to openraft it is
/// unreachable, which backs replication off instead of retrying at once.
fn diverged(divergence: &ChainDivergence) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(divergence))
}

fn unexpected(reply: RaftRpcReply) -> RPCError<TypeConfig> {
    let reason = match reply {
        RaftRpcReply::Failed(reason) => reason,
        other => format!("unexpected reply {other:?}"),
    };
    RPCError::Network(NetworkError::from_string(reason))
}

impl<C: RaftRpcClient> PeerNetwork<C> {
    async fn call(&self, request: RaftRpc) -> Result<RaftRpcReply, RPCError<TypeConfig>> {
        let started = std::time::Instant::now();
        let result = self.client.call(self.target, &self.node, request).await;
        match &result {
            Ok(_) => self.health.record_success(self.target),
            Err(failure) => self.health.record_failure(self.target, started, &failure.to_string()),
        }
        result.map_err(rpc_error)
    }

    fn report_divergence(&mut self, divergence: &ChainDivergence) -> RPCError<TypeConfig> {
        if !self.divergence_logged {
            self.divergence_logged = true;
            tracing::warn!(
                follower = self.target,
                index = divergence.index,
                "follower {} reports its log diverged from this leader's at index {}: it refuses entries until \
                 it is wiped and rejoined (if every follower reports this, this leader's log is the damaged one)",
                self.target,
                divergence.index
            );
        }
        diverged(divergence)
    }
}

impl<C: RaftRpcClient> RaftNetworkV2<TypeConfig> for PeerNetwork<C> {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Usually the last entry or one in the log's in-memory tail: no I/O.
        let prev_hash = request.prev_log_id.as_ref().and_then(|log_id| self.hashes.hash_at(log_id));
        match self.call(RaftRpc::AppendEntries(AppendEntries { request, prev_hash })).await? {
            RaftRpcReply::AppendEntries(response) => Ok(response),
            RaftRpcReply::ChainDivergence(divergence) => Err(self.report_divergence(&divergence)),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        request: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Vote(request)).await? {
            RaftRpcReply::Vote(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }

    async fn pre_vote(
        &mut self,
        request: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::PreVote(request)).await? {
            RaftRpcReply::Vote(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let file = snapshot.snapshot;
        let last_hash = snapshot.meta.last_log_id.as_ref().and_then(|log_id| self.hashes.hash_at(log_id));
        let mut cancel = std::pin::pin!(cancel);
        let mut offset = 0u64;
        loop {
            let data = file.read_chunk(offset, MAX_SNAPSHOT_CHUNK_SIZE).map_err(|error| {
                StreamingError::Network(NetworkError::from_string(format!("reading snapshot: {error}")))
            })?;
            let chunk = SnapshotChunk {
                vote,
                meta: snapshot.meta.clone(),
                size: file.size(),
                checksum: file.checksum(),
                offset,
                data,
                last_hash,
            };
            let sent = chunk.data.len() as u64;
            let reply = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                reply = self.call(RaftRpc::Snapshot(chunk)) => reply?,
            };
            offset += sent;
            match reply {
                RaftRpcReply::Snapshot(Some(response)) => return Ok(response),
                RaftRpcReply::Snapshot(None) if offset < file.size() => {}
                RaftRpcReply::ChainDivergence(divergence) => return Err(self.report_divergence(&divergence).into()),
                other => return Err(unexpected(other).into()),
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::TransferLeader(request)).await? {
            RaftRpcReply::TransferLeader => Ok(Ok(())),
            RaftRpcReply::ChainDivergence(divergence) => Err(self.report_divergence(&divergence)),
            other => Err(unexpected(other)),
        }
    }
}
