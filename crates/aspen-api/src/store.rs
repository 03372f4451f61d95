//! The traits every Aspen front end implements: in-process nodes, the client, the simulator.

use std::collections::BTreeSet;
use std::future::Future;

use crate::cluster::{ClusterNode, ClusterStatus, NodeId};
use crate::error::{ClusterError, KvError};
use crate::kv::{GetRequest, GetResponse, ScanRequest, ScanResponse, WriteResponse};
use crate::session::ClientWrite;
use crate::sql::{SqlRequest, SqlResponse};

/// A replicated, linearizable key-value store.
pub trait KeyValueStore: Send + Sync {
    /// Reads one key.
    fn get(&self, request: GetRequest) -> impl Future<Output = Result<GetResponse, KvError>> + Send;
    /// Reads a range of keys.
    fn scan(&self, request: ScanRequest) -> impl Future<Output = Result<ScanResponse, KvError>> + Send;
    /// Applies one write through consensus, at most once per write identity.
    fn write(&self, write: ClientWrite) -> impl Future<Output = Result<WriteResponse, KvError>> + Send;
    /// Runs a read-only SQL query over the `kv` view.
    fn sql(&self, request: SqlRequest) -> impl Future<Output = Result<SqlResponse, KvError>> + Send;
}

/// Administration of a cluster's membership and maintenance.
pub trait ClusterController: Send + Sync {
    /// Initializes a new cluster with these voting members, once each member other than this
    /// node has proven it holds the cluster secret (`ClusterError::SecretNotProven` names one
    /// that answers without a proof).
    fn init(&self, members: Vec<ClusterNode>) -> impl Future<Output = Result<(), ClusterError>> + Send;
    /// Adds a non-voting member that starts replicating.
    fn add_learner(&self, node: ClusterNode) -> impl Future<Output = Result<(), ClusterError>> + Send;
    /// Changes the voting members (joint consensus).
    fn change_membership(&self, voters: BTreeSet<NodeId>) -> impl Future<Output = Result<(), ClusterError>> + Send;
    /// Removes a node from the cluster entirely.
    fn remove(&self, node: NodeId) -> impl Future<Output = Result<(), ClusterError>> + Send;
    /// Reports this node's view of the cluster.
    fn status(&self) -> impl Future<Output = Result<ClusterStatus, ClusterError>> + Send;
    /// Builds a snapshot now.
    fn trigger_snapshot(&self) -> impl Future<Output = Result<(), ClusterError>> + Send;
    /// Asks the leader to hand leadership to `node`.
    fn transfer_leader(&self, node: NodeId) -> impl Future<Output = Result<(), ClusterError>> + Send;
}
