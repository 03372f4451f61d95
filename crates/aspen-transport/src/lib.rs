//! Aspen's network layer on iroh QUIC: binding an endpoint with relays off and a persistent
//! identity, peer addresses, bounded request/response RPC with pooled connections and
//! timeouts, cluster-secret proofs, and reading secrets from owner-only files. It knows
//! nothing of Raft or the KV store: message types are the caller's.
//!
//! Architecture invariant: depends only on aspen-api among Aspen crates, so the client can
//! use it without pulling in consensus or storage.

pub mod auth;
pub mod dial;
pub mod endpoint;
pub mod error;
pub mod mux;
pub mod peer;
pub mod rpc;
pub mod secret_file;

pub use dial::Reachability;
pub use endpoint::{
    InternetServices, bind_client_endpoint, bind_endpoint, bind_endpoint_with_lookup, load_or_create_secret_key,
};
pub use error::TransportError;
pub use iroh::address_lookup::MemoryLookup;
pub use iroh::{Endpoint, EndpointId, SecretKey};
pub use mux::MuxProtocol;
pub use peer::PeerAddr;
pub use rpc::{RpcClient, RpcHandler, RpcProtocol};

/// ALPN of the Raft RPC protocol between nodes (3: replies prove the cluster secret too;
/// 4: every stream opens with a hello).
pub const RAFT_ALPN: &[u8] = b"aspen-raft/4";
/// ALPN of the client RPC protocol (4: every stream opens with a hello).
pub const CLIENT_ALPN: &[u8] = b"aspen-client/4";
