//! The openraft type configuration shared by storage, consensus and the simulator.

use aspen_api::{ApplyError, ClusterNode, NodeId, WriteCommand, WriteResponse};

openraft::declare_raft_types!(
    /// Aspen's Raft types: entries carry [`WriteCommand`]s, nodes are [`ClusterNode`]s.
    pub TypeConfig:
        D = WriteCommand,
        R = EntryResponse,
        NodeId = NodeId,
        Node = ClusterNode,
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

/// What applying one entry produced: the client's result for a write, nothing for the
/// blank and membership entries openraft proposes itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EntryResponse {
    /// The result of a [`WriteCommand`].
    Write(Result<WriteResponse, ApplyError>),
    /// The entry carried no client command.
    NoOp,
}
