//! Cluster membership and status types.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Identifies a node within a cluster.
pub type NodeId = u64;

/// A node and how to reach it (an endpoint address or ticket, opaque to consensus).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterNode {
    /// The node's id.
    pub id: NodeId,
    /// How peers and clients reach it.
    pub addr: String,
}

/// The role a node currently plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRole {
    /// Leads the cluster.
    Leader,
    /// Votes and replicates.
    Follower,
    /// Campaigning for leadership.
    Candidate,
    /// Replicates without voting.
    Learner,
    /// Shutting down or not yet started.
    Shutdown,
    /// Elected leader, but no quorum acknowledged it within the leader lease: it refuses
    /// writes and is not the leader to use. It leads again once a quorum answers, or
    /// follows the newer leader it hears from.
    Isolated,
}

/// A snapshot of one node's view of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node answering.
    pub node_id: NodeId,
    /// Its role.
    pub role: NodeRole,
    /// The current term.
    pub term: u64,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// Index of the last entry in this node's log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to this node's state machine.
    pub last_applied: Option<u64>,
    /// Voting members.
    pub voters: BTreeSet<NodeId>,
    /// Non-voting members.
    pub learners: BTreeSet<NodeId>,
    /// Every member with its address.
    pub nodes: Vec<ClusterNode>,
    /// How this node sees each peer it talks to (the leader sees every member).
    pub peers: Vec<PeerHealth>,
}

/// Whether a peer answers, as seen by one node's failure detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Liveness {
    /// The last RPC succeeded.
    Healthy,
    /// Recent RPCs failed, but not long or often enough to call the peer down.
    Suspect,
    /// RPCs have failed consecutively for longer than the detection window.
    Down,
}

/// How far a peer's clock is from this node's, as measured from RPC round trips.
/// Observational only: consensus never uses clocks for safety.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockDrift {
    /// No measurement yet.
    Unknown,
    /// Within 100 ms.
    Ok,
    /// 100 ms or more.
    Warn,
    /// 500 ms or more.
    Alert,
}

/// One peer as seen by this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHealth {
    /// The peer.
    pub node_id: NodeId,
    /// Failure-detector verdict.
    pub liveness: Liveness,
    /// RPC failures since the last success.
    pub consecutive_failures: u32,
    /// The last failure, if any since the last success.
    pub last_error: Option<String>,
    /// Peer clock minus local clock, in milliseconds, from the latest round trip.
    pub clock_offset_ms: Option<i64>,
    /// Drift verdict.
    pub clock: ClockDrift,
}
