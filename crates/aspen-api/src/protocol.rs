//! The client protocol: what a client sends to any node (ALPN `aspen-client/4`) and what
//! comes back. Every stream opens with a [`ClientHello`] carrying the client token
//! configured on the node, checked before any request is read; every request carries it
//! too.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterNode, ClusterStatus, NodeId};
use crate::confirm::{Stamped, TermReply};
use crate::error::{ClusterError, KvError};
use crate::kv::{GetRequest, GetResponse, ScanRequest, ScanResponse, WriteResponse};
use crate::session::ClientWrite;
use crate::sql::{SqlRequest, SqlResponse};

/// Longest client token, in bytes.
pub const MAX_TOKEN_SIZE: usize = 256;

/// The credentials that open every client stream, checked before any request on it is
/// read (at most `MAX_UNAUTHENTICATED_FRAME_SIZE` bytes encoded).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientHello {
    /// The client token configured on the node.
    pub token: String,
}

/// A request with its credentials.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientEnvelope {
    /// The client token configured on the node.
    pub token: String,
    /// The request.
    pub request: ClientRequest,
}

/// Everything a client can ask a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Read one key.
    Get(GetRequest),
    /// Read a range.
    Scan(ScanRequest),
    /// Apply a write (put, delete, txn, lease, batch), at most once per identity.
    Write(ClientWrite),
    /// Run a read-only SQL query.
    Sql(SqlRequest),
    /// This node's view of the cluster.
    Status,
    /// Prometheus text metrics of this node.
    Metrics,
    /// Initialize a new cluster with these voters.
    Init(Vec<ClusterNode>),
    /// Add a learner.
    AddLearner(ClusterNode),
    /// Set the voters (joint consensus).
    ChangeMembership(BTreeSet<NodeId>),
    /// Remove a node.
    Remove(NodeId),
    /// Build a snapshot now.
    TriggerSnapshot,
    /// Hand leadership to a node.
    TransferLeader(NodeId),
    /// Read one key on the leader and return a stamp the client confirms with `Term`
    /// replies from other voters (client-confirmed linearizable read, ADR 0004).
    StampedGet(GetRequest),
    /// This node's current term, read inside its Raft core.
    Term,
    /// Read a range on the leader, stamped like `StampedGet`.
    StampedScan(ScanRequest),
}

/// A node's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientResponse {
    /// Answer to `Get`.
    Get(Result<GetResponse, KvError>),
    /// Answer to `Scan`.
    Scan(Result<ScanResponse, KvError>),
    /// Answer to `Write`.
    Write(Result<WriteResponse, KvError>),
    /// Answer to `Sql`.
    Sql(Result<SqlResponse, KvError>),
    /// Answer to `Status`.
    Status(Result<ClusterStatus, ClusterError>),
    /// Answer to `Metrics`.
    Metrics(String),
    /// Answer to the membership and maintenance requests.
    Cluster(Result<(), ClusterError>),
    /// The token was missing or wrong; nothing was done.
    Unauthorized(String),
    /// The request could not be decoded or was too large; nothing was done.
    Rejected(String),
    /// Answer to `StampedGet`.
    StampedGet(Result<Stamped<GetResponse>, KvError>),
    /// Answer to `Term`.
    Term(Result<TermReply, KvError>),
    /// Answer to `StampedScan`.
    StampedScan(Result<Stamped<ScanResponse>, KvError>),
}

impl ClientResponse {
    /// Whether the answer is a failure of any kind.
    pub fn is_error(&self) -> bool {
        match self {
            ClientResponse::Get(result) => result.is_err(),
            ClientResponse::Scan(result) => result.is_err(),
            ClientResponse::Write(result) => result.is_err(),
            ClientResponse::Sql(result) => result.is_err(),
            ClientResponse::Status(result) => result.is_err(),
            ClientResponse::Cluster(result) => result.is_err(),
            ClientResponse::StampedGet(result) => result.is_err(),
            ClientResponse::Term(result) => result.is_err(),
            ClientResponse::StampedScan(result) => result.is_err(),
            ClientResponse::Metrics(_) => false,
            ClientResponse::Unauthorized(_) | ClientResponse::Rejected(_) => true,
        }
    }

    /// The answer to a `StampedGet`, or `None` for anything else (an error, a refusal).
    pub fn into_stamped_get(self) -> Option<Stamped<GetResponse>> {
        match self {
            ClientResponse::StampedGet(Ok(stamped)) => Some(stamped),
            _ => None,
        }
    }

    /// The answer to a `StampedScan`, or `None` for anything else.
    pub fn into_stamped_scan(self) -> Option<Stamped<ScanResponse>> {
        match self {
            ClientResponse::StampedScan(Ok(stamped)) => Some(stamped),
            _ => None,
        }
    }
}
