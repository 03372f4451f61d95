//! Aspen's consensus: openraft wired to the redb log and SQLite state machine.
//! [`RaftNode`] is one cluster member with a direct async API (the `KeyValueStore` and
//! `ClusterController` traits), write batching, and linearizable reads by ReadIndex on
//! any node. Peers are reached through the [`RaftRpcClient`] trait.
//!
//! Architecture invariant: this crate never depends on iroh or on aspen-transport; the
//! network is a trait, so the simulator runs this code unchanged over an in-memory network.

pub mod batcher;
pub mod chain;
pub mod config;
mod errors;
pub mod health;
pub mod network;
pub mod node;
pub mod rpc;

pub use chain::{ChainDivergence, ChainStats};
pub use config::ConsensusConfig;
pub use health::HealthTracker;
pub use node::{RaftNode, StartError};
pub use rpc::{AppendEntries, RaftRpc, RaftRpcClient, RaftRpcReply, RpcFailure, SnapshotChunk};
