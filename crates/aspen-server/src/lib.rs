//! Assembles an Aspen node from its parts: the redb log and SQLite state machine
//! (aspen-raft-storage), consensus (aspen-consensus) and the iroh transport
//! (aspen-transport). Serves Raft RPCs (ALPN `aspen-raft/4`, cluster-secret proofs both
//! ways) and client RPCs (ALPN `aspen-client/4`, multiplexed; a data token for reads and
//! writes, an admin token for cluster administration too), both checking credentials on
//! each stream's hello before reading a request, and Prometheus metrics over HTTP. The `aspen-node` binary is a thin shell around [`Server`].

pub mod client_rpc;
pub mod config;
pub mod discovery;
pub mod metrics;
pub mod raft_rpc;
pub mod server;

pub use config::{ConfigError, NodeConfig, PartialConfig, StaticPeer};
pub use server::{ADDR_FILE, Server, ServerError};
