//! The client protocol: what a client sends to any node (ALPN `aspen-client/4`) and what
//! comes back. Every stream opens with a [`ClientHello`] carrying one of the two tokens
//! configured on the node, checked before any request is read; every request carries it
//! too, and decides what the request may do ([`Right`]): the data token reads and writes
//! keys, the admin token also administers the cluster.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterNode, ClusterStatus, NodeId};
use crate::confirm::{Stamped, TermReply};
use crate::error::{ClusterError, KvError};
use crate::kv::{GetRequest, GetResponse, ScanRequest, ScanResponse, WriteResponse};
use crate::secret::Secret;
use crate::session::ClientWrite;
use crate::sql::{SqlRequest, SqlResponse};

/// Longest client token, in bytes.
pub const MAX_TOKEN_SIZE: usize = 256;

/// The credentials that open every client stream, checked before any request on it is
/// read (at most `MAX_UNAUTHENTICATED_FRAME_SIZE` bytes encoded).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientHello {
    /// The data or admin token configured on the node.
    pub token: Secret,
}

/// A request with its credentials.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientEnvelope {
    /// The data or admin token configured on the node; it decides what the request may do.
    pub token: Secret,
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

/// What a token lets its holder do. The admin token grants both; the data token grants
/// [`Right::Data`] only, and the admin token cannot be derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    /// Read and write keys (get, scan, write, txn, SQL), and the harmless reads of a node's
    /// state that operators and the client's own read path need (status, term, metrics).
    Data,
    /// Change the cluster: init, membership, removal, snapshots, leadership.
    Admin,
}

impl ClientRequest {
    /// The right this request needs. Exhaustive, so a new request must be placed.
    pub fn right(&self) -> Right {
        match self {
            // Term and Status are part of every linearizable read (ADR 0004); Metrics is
            // the same counters /metrics serves to anyone who reaches the HTTP port.
            ClientRequest::Get(_)
            | ClientRequest::Scan(_)
            | ClientRequest::Write(_)
            | ClientRequest::Sql(_)
            | ClientRequest::Status
            | ClientRequest::Metrics
            | ClientRequest::StampedGet(_)
            | ClientRequest::Term
            | ClientRequest::StampedScan(_) => Right::Data,
            ClientRequest::Init(_)
            | ClientRequest::AddLearner(_)
            | ClientRequest::ChangeMembership(_)
            | ClientRequest::Remove(_)
            | ClientRequest::TriggerSnapshot
            | ClientRequest::TransferLeader(_) => Right::Admin,
        }
    }

    /// A short name of the operation, for refusals and logs.
    pub fn operation(&self) -> &'static str {
        match self {
            ClientRequest::Get(_) => "get",
            ClientRequest::Scan(_) => "scan",
            ClientRequest::Write(_) => "write",
            ClientRequest::Sql(_) => "sql",
            ClientRequest::Status => "status",
            ClientRequest::Metrics => "metrics",
            ClientRequest::Init(_) => "init",
            ClientRequest::AddLearner(_) => "add learner",
            ClientRequest::ChangeMembership(_) => "change membership",
            ClientRequest::Remove(_) => "remove node",
            ClientRequest::TriggerSnapshot => "trigger snapshot",
            ClientRequest::TransferLeader(_) => "transfer leader",
            ClientRequest::StampedGet(_) => "stamped get",
            ClientRequest::Term => "term",
            ClientRequest::StampedScan(_) => "stamped scan",
        }
    }
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
    /// The token was missing or wrong, or grants too little for the request (the data
    /// token asking for an admin operation); nothing was done.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{ReadConsistency, WriteCommand};

    #[test]
    fn only_cluster_changes_need_the_admin_right() {
        let get = GetRequest { key: b"k".to_vec(), consistency: ReadConsistency::Linearizable };
        let scan = ScanRequest::prefix(b"k".to_vec(), 0);
        let write = ClientWrite { id: None, command: WriteCommand::Delete { key: b"k".to_vec() } };
        let node = ClusterNode { id: 2, addr: "x".into() };
        let cases = [
            (ClientRequest::Get(get.clone()), Right::Data),
            (ClientRequest::StampedGet(get), Right::Data),
            (ClientRequest::Scan(scan.clone()), Right::Data),
            (ClientRequest::StampedScan(scan), Right::Data),
            (ClientRequest::Write(write), Right::Data),
            (ClientRequest::Sql(SqlRequest::new("SELECT 1")), Right::Data),
            (ClientRequest::Status, Right::Data),
            (ClientRequest::Term, Right::Data),
            (ClientRequest::Metrics, Right::Data),
            (ClientRequest::Init(vec![node.clone()]), Right::Admin),
            (ClientRequest::AddLearner(node), Right::Admin),
            (ClientRequest::ChangeMembership([1, 2].into()), Right::Admin),
            (ClientRequest::Remove(2), Right::Admin),
            (ClientRequest::TriggerSnapshot, Right::Admin),
            (ClientRequest::TransferLeader(2), Right::Admin),
        ];
        for (request, right) in cases {
            assert_eq!(request.right(), right, "{}", request.operation());
        }
    }
}
