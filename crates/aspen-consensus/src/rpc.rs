//! The messages nodes exchange, and the one trait a transport implements to carry them.
//!
//! Consensus never knows how bytes move: production wires [`RaftRpcClient`] to iroh QUIC,
//! the simulator to an in-memory network that drops, delays and partitions.

use std::future::Future;

use aspen_api::{ClientWrite, ClusterNode, KvError, NodeId, WriteResponse};
use aspen_raft_storage::log::chain::ChainHash;
use aspen_raft_storage::{SnapshotMeta, TypeConfig, Vote};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::chain::ChainDivergence;

/// One piece of a snapshot being streamed to a follower.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The sender's vote; a stale leader's snapshot is refused.
    pub vote: Vote,
    /// What the snapshot describes.
    pub meta: SnapshotMeta,
    /// Total size in bytes.
    pub size: u64,
    /// blake3 of the whole snapshot.
    pub checksum: [u8; 32],
    /// Where this chunk starts.
    pub offset: u64,
    /// The bytes (at most `MAX_SNAPSHOT_CHUNK_SIZE`).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The sender's chain hash of the snapshot's last entry, if its log has one there: the
    /// receiver compares it with its own, and anchors its chain on it when the install
    /// purges its whole log (see `crate::chain`).
    pub last_hash: Option<ChainHash>,
}

/// openraft's AppendEntries with the leader's chain hash at `prev_log_id`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AppendEntries {
    /// openraft's request.
    pub request: AppendEntriesRequest<TypeConfig>,
    /// The leader's chain hash of the entry at `request.prev_log_id`; `None` when there is
    /// none or the leader's log has none there (see `crate::chain`).
    pub prev_hash: Option<ChainHash>,
}

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// Replicate entries / heartbeat.
    AppendEntries(AppendEntries),
    /// Ask for a vote.
    Vote(VoteRequest<TypeConfig>),
    /// Ask for a pre-vote.
    PreVote(VoteRequest<TypeConfig>),
    /// Stream a snapshot.
    Snapshot(SnapshotChunk),
    /// Hand leadership over.
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// A follower asks the leader for a linearizable read point (ReadIndex).
    ReadIndex,
    /// A follower forwards a client write, with its identity, to the leader.
    Forward(ClientWrite),
    /// Asks a node who it is, before adding it: proves it is reachable, admits us and (through
    /// the [`RaftRpcClient`]) holds the cluster secret.
    Ping,
}

/// The reply to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpcReply {
    /// Reply to `AppendEntries`.
    AppendEntries(AppendEntriesResponse<TypeConfig>),
    /// Reply to `Vote` and `PreVote`.
    Vote(VoteResponse<TypeConfig>),
    /// Reply to a snapshot chunk; `Some` once the last chunk installed.
    Snapshot(Option<SnapshotResponse<TypeConfig>>),
    /// Reply to `TransferLeader`.
    TransferLeader,
    /// Reply to `ReadIndex`: the log index a read must wait for.
    ReadIndex(Result<u64, KvError>),
    /// Reply to `Forward`.
    Forward(Result<WriteResponse, KvError>),
    /// Reply to `Ping`: the node's id.
    Pong {
        /// The answering node's id.
        node_id: NodeId,
    },
    /// The receiver failed to handle the request.
    Failed(String),
    /// The receiver's log diverged from the leader's: it refuses entries, snapshots and
    /// leadership (reply to `AppendEntries`, `Snapshot` and `TransferLeader`).
    ChainDivergence(ChainDivergence),
}

/// Why an RPC did not produce a reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RpcFailure {
    /// The peer could not be reached (refused, down, partitioned, unknown address).
    #[error("peer {node} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// No reply within the deadline; the request may or may not have been handled.
    #[error("rpc to {node} timed out after {after_ms} ms")]
    Timeout {
        /// The peer.
        node: NodeId,
        /// The deadline.
        after_ms: u64,
    },
    /// The exchange failed mid-way (reset stream, malformed or oversized message).
    #[error("rpc to {node} failed: {reason}")]
    Network {
        /// The peer.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The peer answered without proving it holds the cluster secret: whatever it said is
    /// not from a member of this cluster.
    #[error("peer {node} did not prove it holds the cluster secret: {reason}")]
    Unauthenticated {
        /// The peer.
        node: NodeId,
        /// What its answer lacked.
        reason: String,
    },
}

/// Carries one request to a peer and returns its reply.
///
/// Access control is the implementation's: the peer must prove it is a member (holds the
/// cluster secret) for its reply to count, else the call fails with
/// [`RpcFailure::Unauthenticated`]. `add_learner` relies on it before admitting a node.
pub trait RaftRpcClient: Send + Sync + 'static {
    /// Sends `request` to `target` (reachable at `node.addr`) and waits for the reply.
    fn call(
        &self,
        target: NodeId,
        node: &ClusterNode,
        request: RaftRpc,
    ) -> impl Future<Output = Result<RaftRpcReply, RpcFailure>> + Send;
}
