//! Aspen's public API: the data model (keys, revisions, ranges, transactions, leases),
//! the [`KeyValueStore`] and [`ClusterController`] traits, typed errors, and every limit
//! Aspen enforces, with validation helpers.
//!
//! Architecture invariant: this crate does no I/O and depends on no runtime, storage or
//! network crate; everything else depends on it.
#![deny(missing_docs)]

pub mod cluster;
pub mod confirm;
pub mod error;
pub mod kv;
pub mod limits;
pub mod protocol;
pub mod retry;
pub mod rounds;
pub mod secret;
pub mod session;
pub mod sql;
pub mod store;
pub mod txn;

pub use cluster::{ClockDrift, ClusterNode, ClusterStatus, Liveness, NodeId, NodeRole, PeerHealth};
pub use confirm::{LeaderStamp, Stamped, TermReply};
pub use error::{ApplyError, ClusterError, KvError, ValidationError};
pub use kv::{
    GetRequest, GetResponse, KeyRange, KeyValue, LeaseId, MAX_LEASE_ID, ReadConsistency, Revision, ScanRequest,
    ScanResponse, WriteCommand, WriteResponse, prefix_end, validate_key, validate_lease_id, validate_value,
};
pub use protocol::{ClientEnvelope, ClientHello, ClientRequest, ClientResponse, Right};
pub use secret::Secret;
pub use session::{ClientSession, ClientWrite, Proposal, SessionId, WriteId};
pub use sql::{SqlRequest, SqlResponse, SqlValue};
pub use store::{ClusterController, KeyValueStore};
pub use txn::{Compare, CompareOp, CompareTarget, TxnOp, TxnOpResponse, TxnRequest, TxnResponse};
