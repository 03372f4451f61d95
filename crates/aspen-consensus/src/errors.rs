//! Mapping openraft's errors onto Aspen's API errors.

use aspen_api::{ClusterError, KvError};
use aspen_raft_storage::TypeConfig;
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};

/// A typed redirect from openraft's forward-to-leader.
pub fn not_leader(forward: &ForwardToLeader<TypeConfig>) -> KvError {
    KvError::NotLeader {
        leader: forward.leader_id,
        leader_addr: forward.leader_node.as_ref().map(|node| node.addr.clone()),
    }
}

/// A client write's failure.
pub fn client_write_error(error: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> KvError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => not_leader(&forward),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => KvError::Unavailable(error.to_string()),
        // openraft documents a discarded entry's outcome as unknown: this node's copy was
        // overwritten or purged, but another node may have committed and applied it.
        RaftError::APIError(error @ ClientWriteError::LogEntryDiscarded(_)) => {
            KvError::OutcomeUnknown(error.to_string())
        }
        RaftError::APIError(error @ ClientWriteError::PreconditionFailed(_)) => KvError::Unavailable(error.to_string()),
        // The Raft core stopped with the entry possibly appended and replicated.
        RaftError::Fatal(fatal) => KvError::OutcomeUnknown(fatal.to_string()),
    }
}

/// A membership change's failure.
pub fn cluster_write_error(error: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> ClusterError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => ClusterError::NotLeader {
            leader: forward.leader_id,
            leader_addr: forward.leader_node.as_ref().map(|node| node.addr.clone()),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => ClusterError::Invalid(error.to_string()),
        RaftError::APIError(error) => ClusterError::Failed(error.to_string()),
        RaftError::Fatal(fatal) => ClusterError::Failed(fatal.to_string()),
    }
}
