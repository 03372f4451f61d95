//! Typed errors at the API boundary.

use serde::{Deserialize, Serialize};

use crate::cluster::NodeId;
use crate::kv::LeaseId;
use crate::session::SessionId;

/// A request broke a limit or a rule before it reached consensus.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ValidationError {
    /// Keys are never empty.
    #[error("key is empty")]
    EmptyKey,
    /// A key is longer than the limit.
    #[error("key is {size} bytes, the limit is {max}")]
    KeyTooLarge {
        /// Size of the key.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An inline value is longer than the limit.
    #[error("value is {size} bytes, the inline limit is {max}")]
    ValueTooLarge {
        /// Size of the value.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A transaction branch has too many operations.
    #[error("transaction branch has {count} operations, the limit is {max}")]
    TooManyTxnOps {
        /// Operations in the branch.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A transaction has too many compares.
    #[error("transaction has {count} compares, the limit is {max}")]
    TooManyCompares {
        /// Compares in the transaction.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A batch has too many commands.
    #[error("batch has {count} commands, the limit is {max}")]
    BatchTooLarge {
        /// Commands in the batch.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Batches cannot contain batches.
    #[error("a batch cannot contain another batch")]
    NestedBatch,
    /// A scan asked for more keys than the limit.
    #[error("scan limit {limit} is above the maximum {max}")]
    ScanLimitTooLarge {
        /// Requested limit.
        limit: u32,
        /// The maximum.
        max: u32,
    },
    /// A range ends before it starts.
    #[error("range end is before range start")]
    InvertedRange,
    /// Lease ids are in `1..=MAX_LEASE_ID`.
    #[error("lease id {id} is outside 1..=i64::MAX")]
    InvalidLease {
        /// The rejected id.
        id: u64,
    },
    /// A lease TTL is zero or above the limit.
    #[error("lease ttl {ttl_secs}s is outside 1..={max}s")]
    InvalidLeaseTtl {
        /// Requested TTL.
        ttl_secs: u64,
        /// The limit.
        max: u64,
    },
    /// A SQL query text is longer than the limit.
    #[error("SQL query is {size} bytes, the limit is {max}")]
    SqlTooLarge {
        /// Size of the query.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A SQL row limit is zero or above the maximum.
    #[error("SQL row limit {limit} is outside 1..={max}")]
    SqlRowLimit {
        /// Requested row limit.
        limit: u32,
        /// The maximum.
        max: u32,
    },
    /// A write identity is malformed (see [`crate::session::WriteId::validate`]).
    #[error(
        "write id seq {seq} / first outstanding {first_outstanding} is outside 1 <= first <= seq < first + {window}"
    )]
    InvalidWriteId {
        /// The write's sequence.
        seq: u64,
        /// The oldest sequence in flight it named.
        first_outstanding: u64,
        /// The session window.
        window: u64,
    },
    /// A SQL timeout is zero or above the maximum.
    #[error("SQL timeout {timeout_ms} ms is outside 1..={max} ms")]
    SqlTimeout {
        /// Requested timeout.
        timeout_ms: u64,
        /// The maximum.
        max: u64,
    },
}

/// A command reached the state machine but could not take effect. Deterministic: every
/// replica reaches the same error for the same entry, so it is a result, not a fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    /// A put or lease operation named a lease that does not exist.
    #[error("lease {id} does not exist")]
    LeaseNotFound {
        /// The lease.
        id: LeaseId,
    },
    /// A lease grant asked for an id already in use.
    #[error("lease {id} already exists")]
    LeaseExists {
        /// The lease.
        id: LeaseId,
    },
    /// The cluster already holds the maximum number of leases.
    #[error("the cluster holds {max} leases, the limit")]
    TooManyLeases {
        /// The limit.
        max: u64,
    },
    /// The command failed validation when applied (an entry that bypassed the edge checks).
    #[error("invalid command: {0}")]
    Invalid(ValidationError),
    /// The write's session is unknown to the cluster: it expired (or was replaced) while the
    /// client was idle. This write was not applied; an earlier attempt of it may have been.
    #[error("session {session} expired; this attempt was not applied")]
    SessionExpired {
        /// The session.
        session: SessionId,
    },
    /// The write is older than every write its session still waits for: a late duplicate of
    /// a write whose client has moved on. Not applied.
    #[error("write {seq} of its session is older than the oldest write in flight ({floor}); not applied")]
    WriteTooOld {
        /// The write's sequence.
        seq: u64,
        /// The session's oldest sequence still remembered.
        floor: u64,
    },
    /// The cluster holds the maximum number of sessions and none has been idle long enough
    /// to be replaced. Not applied.
    #[error("the cluster holds {max} client sessions, the limit; not applied")]
    TooManySessions {
        /// The limit.
        max: u64,
    },
    /// A retried write that was applied at `revision`; its answer was too large to keep
    /// (see [`crate::session::MAX_SESSION_REPLY_SIZE`]).
    #[error("the write was applied at revision {revision}; its answer was too large to keep for a retry")]
    AppliedReplyNotKept {
        /// Revision of the write.
        revision: u64,
    },
}

/// Errors from a [`crate::KeyValueStore`].
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum KvError {
    /// The request broke a limit.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The write was applied but had no effect.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// This node cannot serve the request; retry on the leader.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The current leader, if known.
        leader: Option<NodeId>,
        /// The leader's address, if known.
        leader_addr: Option<String>,
    },
    /// The request did not finish in time; it may or may not have been applied.
    #[error("timed out after {after_ms} ms; the outcome is unknown")]
    Timeout {
        /// How long the caller waited.
        after_ms: u64,
    },
    /// The cluster cannot currently serve requests (no quorum, shutting down); the request
    /// was not applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The write may or may not have been applied, and the node or client could not learn
    /// which. A write with an identity can be resent with the same identity safely; the
    /// client does so until its deadline and reports this when it gives up.
    #[error("the outcome is unknown (the write may or may not have been applied): {0}")]
    OutcomeUnknown(String),
    /// The SQL query was rejected or failed.
    #[error("SQL error: {0}")]
    Sql(String),
    /// Local storage failed.
    #[error("storage error: {0}")]
    Storage(String),
}

/// Errors from a [`crate::ClusterController`].
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum ClusterError {
    /// The request broke a limit or rule.
    #[error("invalid cluster request: {0}")]
    Invalid(String),
    /// The cluster is already initialized.
    #[error("cluster is already initialized")]
    AlreadyInitialized,
    /// This node cannot serve the request; retry on the leader.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The current leader, if known.
        leader: Option<NodeId>,
        /// The leader's address, if known.
        leader_addr: Option<String>,
    },
    /// The node is not a member of the cluster.
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    /// The request did not finish in time.
    #[error("timed out after {after_ms} ms")]
    Timeout {
        /// How long the caller waited.
        after_ms: u64,
    },
    /// Consensus or storage failed.
    #[error("cluster operation failed: {0}")]
    Failed(String),
    /// The node is the only voter: removing it would leave a cluster that cannot elect.
    #[error("node {0} is the last voter; add another voter before removing it")]
    LastVoter(NodeId),
    /// Removing the voter would leave too few reachable voters to commit anything.
    #[error(
        "removing node {node} would leave {reachable} reachable of {voters_left} voters, not a majority; \
         bring voters back first"
    )]
    WouldLoseQuorum {
        /// The voter asked to be removed.
        node: NodeId,
        /// Voters the cluster would have without it.
        voters_left: usize,
        /// How many of those answered the leader within the leader lease.
        reachable: usize,
    },
    /// The node answered without proving it holds the cluster secret, so it is not admitted.
    #[error("node {node} did not prove it holds the cluster secret: {reason}")]
    SecretNotProven {
        /// The node refused.
        node: NodeId,
        /// What its answer lacked.
        reason: String,
    },
}
