//! openraft's network traits over any [`RaftRpcClient`].

use std::future::Future;
use std::sync::Arc;

use aspen_api::limits::MAX_SNAPSHOT_CHUNK_SIZE;
use aspen_api::{ClusterNode, NodeId};
use aspen_raft_storage::state_machine::Snapshot;
use aspen_raft_storage::{SnapshotFile, TypeConfig, Vote};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};

use crate::health::HealthTracker;
use crate::rpc::{RaftRpc, RaftRpcClient, RaftRpcReply, RpcFailure, SnapshotChunk};

/// Creates per-peer network handles for openraft.
pub struct NetworkFactory<C> {
    client: Arc<C>,
    health: Arc<HealthTracker>,
}

impl<C> NetworkFactory<C> {
    /// A factory whose handles send through `client` and report outcomes to `health`.
    pub fn new(client: Arc<C>, health: Arc<HealthTracker>) -> Self {
        NetworkFactory { client, health }
    }
}

/// openraft's handle to one peer.
pub struct PeerNetwork<C> {
    client: Arc<C>,
    health: Arc<HealthTracker>,
    target: NodeId,
    node: ClusterNode,
}

impl<C: RaftRpcClient> RaftNetworkFactory<TypeConfig> for NetworkFactory<C> {
    type Network = PeerNetwork<C>;

    async fn new_client(&mut self, target: NodeId, node: &ClusterNode) -> Self::Network {
        PeerNetwork { client: Arc::clone(&self.client), health: Arc::clone(&self.health), target, node: node.clone() }
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
}

impl<C: RaftRpcClient> RaftNetworkV2<TypeConfig> for PeerNetwork<C> {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::AppendEntries(request)).await? {
            RaftRpcReply::AppendEntries(response) => Ok(response),
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
            other => Err(unexpected(other)),
        }
    }
}
