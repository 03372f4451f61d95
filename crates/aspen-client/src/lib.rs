//! A Rust client for Aspen. Connects to any node by its address (`<endpoint-id>@<ip:port>`
//! or a ticket), sends requests over iroh QUIC (ALPN `aspen-client/4`, all
//! of a client's concurrent requests to one node multiplexed on one stream) with one of the
//! cluster's tokens (the data token for reads and writes, the admin token for cluster
//! administration as well), follows leader redirects for cluster operations, and retries only what is
//! safe to retry: reads always, and writes because each carries an identity (a session of
//! this client and a sequence number) that the cluster applies at most once
//! (`aspen_api::session`). A write the client gives up on after an attempt that may have
//! reached the cluster fails with `KvError::OutcomeUnknown`, never with a plain
//! "unavailable".
//!
//! Linearizable gets are confirmed by the client (ADR 0004): the read goes to the leader
//! and, at the same time, a term check to enough other voters; if they confirm the
//! leader's stamp the read is linearizable one network round trip sooner than a ReadIndex
//! round run by the leader. Any doubt (no stamp, a newer term, a voter that does not
//! answer, a membership change) falls back to the leader's own ReadIndex round.
//!
//! The logic (retries, redirects, leader tracking, write sessions, confirmed reads) is
//! [`Client`], generic over its transport ([`ClientConnector`]), so the deterministic
//! simulator runs this very code over its simulated network; [`AspenClient`] is the client
//! over iroh (feature `iroh`, on by default). Without that feature the crate builds without
//! iroh, also under `--cfg madsim`, where time and randomness are the simulation's
//! (`rt.rs`).
//!
//! Architecture invariant: depends on aspen-api, and aspen-transport for iroh, never on
//! consensus or storage.

pub mod availability;
mod client;
pub mod connector;
#[cfg(feature = "iroh")]
mod iroh;
mod reads;
mod rt;
pub mod txn_syntax;

use std::time::Duration;

use aspen_api::{ClusterError, KvError};

use crate::availability::Availability;
pub use crate::client::Client;
pub use crate::client::ReadPaths;
pub use crate::connector::{ClientConnector, ClientPeer, NodeUnreachable, Reachability};
#[cfg(feature = "iroh")]
pub use crate::iroh::{AspenClient, IrohConnector};

pub use aspen_api::retry::DEFAULT_RETRY_DEADLINE;
/// Least time a call's attempt may wait for its answer, even when the call's retry deadline
/// is nearer: a call overruns its deadline by at most this (and a leader probe).
pub const MIN_ATTEMPT_WINDOW: Duration = Duration::from_millis(500);
/// Most nodes a client is configured with.
pub const MAX_CLIENT_PEERS: usize = aspen_api::limits::MAX_PEERS;
/// Longest a client-confirmed read waits for a voter's term before it falls back to the
/// leader's own ReadIndex round.
pub const TERM_CONFIRM_TIMEOUT: Duration = Duration::from_millis(250);
/// Longest a stamped read waits for the leader before the client falls back.
pub const STAMPED_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a call waits for a first connection to a node while other nodes could answer
/// instead; the dial goes on in the background. A handshake on a LAN takes milliseconds,
/// so a node silent this long is most likely down, and a dead node never answers at all:
/// waiting for the connect timeout would cost every call that picks it seconds.
pub const DIAL_HEDGE: Duration = Duration::from_millis(250);
/// Pause between starting dials to the configured nodes when a client connects: a live node
/// on a LAN answers well within it, so usually one node is dialed, and a dead one first in
/// the list delays the connection by this much.
pub const CONNECT_STAGGER: Duration = Duration::from_millis(25);
/// How long a call waits on a node before it starts asking the other nodes whether a new
/// leader was elected meanwhile (a write commits in milliseconds; an election takes at
/// least the shortest election timeout, 500 ms by default).
pub const LEADER_SUSPECT_AFTER: Duration = Duration::from_millis(250);
/// How often, at most, a client asks the nodes who leads while calls wait; the calls
/// waiting at the same time share one look.
pub const LEADER_CHECK_PERIOD: Duration = Duration::from_millis(100);
/// Longest the client waits for a node's status when it asks every node who leads.
pub const LEADER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client was configured without any node address, or with too many.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// A node address could not be parsed.
    #[error("{0}")]
    Address(String),
    /// A node did not answer a request (the last one tried, when the call gave up).
    #[error("no node reachable: {0}")]
    Unreachable(NodeUnreachable),
    /// The node refused the token.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The node rejected the request as malformed or too large.
    #[error("request rejected: {0}")]
    Rejected(String),
    /// A key-value operation failed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A cluster operation failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The node answered with a reply of the wrong kind.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// The local endpoint could not be created.
    #[error("cannot start client endpoint: {0}")]
    Endpoint(String),
    /// The client gave up at its deadline: what it could reach, and the last error.
    #[error("{0}")]
    Unavailable(Availability),
}
