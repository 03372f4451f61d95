//! The openraft type configuration shared by storage, consensus and the simulator.

use aspen_api::{ApplyError, ClusterNode, NodeId, Proposal, WriteResponse};

openraft::declare_raft_types!(
    /// Aspen's Raft types: entries carry [`Proposal`]s (client writes with their identities),
    /// nodes are [`ClusterNode`]s.
    ///
    /// Leader ids are standard Raft's (one leader per term), not openraft's default
    /// "advanced" ids, which let several candidates lead the same term with different node
    /// ids. The simulator found two leaders in one term under the default (seeds 574 and
    /// 593); etcd users expect a term to name one leader.
    pub TypeConfig:
        D = Proposal,
        R = EntryResponse,
        NodeId = NodeId,
        Node = ClusterNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
        AsyncRuntime = crate::rt::RaftRuntime,
);

/// A log id under [`TypeConfig`].
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A vote under [`TypeConfig`].
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// A log entry under [`TypeConfig`].
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// Membership as stored with the log id that set it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata under [`TypeConfig`].
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;

/// What applying one entry produced: each client's result for the writes of a
/// [`Proposal`], in order; nothing for the blank and membership entries openraft proposes
/// itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EntryResponse {
    /// One result per write of the proposal.
    Writes(Vec<Result<WriteResponse, ApplyError>>),
    /// The entry carried no client command.
    NoOp,
}
