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
//! Architecture invariant: depends on aspen-api and aspen-transport only, never on
//! consensus or storage.

pub mod availability;
pub mod txn_syntax;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::availability::{Availability, is_availability_error};
use aspen_api::retry::{self, AttemptFailure, RETRY_PAUSE, RetryAction};
use aspen_api::rounds::SharedRounds;
use aspen_api::session::{ClientSession, SessionId, WriteId};
use aspen_api::{
    ApplyError, ClientEnvelope, ClientRequest, ClientResponse, ClientWrite, ClusterError, ClusterNode, ClusterStatus,
    GetRequest, GetResponse, KeyRange, KvError, LeaderStamp, Liveness, NodeId, ReadConsistency, ScanRequest,
    ScanResponse, Secret, SqlRequest, SqlResponse, Stamped, TermReply, TxnRequest, TxnResponse, WriteCommand,
    WriteResponse,
};
use aspen_transport::{
    CLIENT_ALPN, PeerAddr, Reachability, RpcClient, SecretKey, TransportError, bind_client_endpoint,
};
use futures::StreamExt;

pub use aspen_api::retry::DEFAULT_RETRY_DEADLINE;
/// Least time a call's attempt may wait for its answer, even when the call's retry deadline
/// is nearer: a call overruns its deadline by at most this (and a leader probe).
pub const MIN_ATTEMPT_WINDOW: Duration = Duration::from_millis(500);
/// Longest `close` waits for connections to finish closing. Closing takes milliseconds: a
/// closed connection drains for three probe timeouts, from its measured round trip, or from
/// the client's 2 ms first guess for a handshake still under way (a dial to a dead node),
/// 18 ms. This bound only guards against the unforeseen; past it iroh logs an error.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Most nodes a client is configured with.
pub const MAX_CLIENT_PEERS: usize = aspen_api::limits::MAX_PEERS;
/// Longest a client-confirmed read waits for a voter's term before it falls back to the
/// leader's own ReadIndex round.
pub const TERM_CONFIRM_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a voter that did not confirm a read is asked no more, when others can be.
const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// Shortest pause between two status calls made to learn whom to ask.
const READ_QUORUM_RELEARN: Duration = Duration::from_secs(1);
/// Longest pause between them: it doubles after each stamped read that could not reach the
/// leader (a leader address this client cannot dial costs one failed read per pause).
const MAX_READ_QUORUM_RELEARN: Duration = Duration::from_secs(32);
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
    #[error(transparent)]
    Address(TransportError),
    /// No node could be reached before the retry deadline.
    #[error("no node reachable: {0}")]
    Unreachable(TransportError),
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
    Endpoint(TransportError),
    /// The client gave up at its deadline: what it could reach, and the last error.
    #[error("{0}")]
    Unavailable(Availability),
}

/// Dials the peers in turn, starting the next one [`CONNECT_STAGGER`] after the last (or
/// at once when it fails), and returns the index of the first that connects (0 if none
/// does). A dead node in the list then costs at most the stagger, and one that comes after
/// a live one costs nothing at all: it is not dialed until a call needs it. The dials still
/// under way go on in the background and fill the connection pool.
async fn first_to_connect(rpc: &Arc<RpcClient>, peers: &[PeerAddr]) -> usize {
    let mut dials = futures::stream::FuturesUnordered::new();
    let mut next = 0;
    loop {
        if next < peers.len() {
            let peer = &peers[next];
            let index = next;
            dials.push(async move { (index, rpc.connect(peer, CLIENT_ALPN).await.is_ok()) });
            next += 1;
        }
        let stagger = tokio::time::sleep(CONNECT_STAGGER);
        tokio::select! {
            Some((index, connected)) = dials.next() => {
                if connected {
                    return index;
                }
                if dials.is_empty() && next >= peers.len() {
                    return 0;
                }
            }
            () = stagger, if next < peers.len() => {}
            else => return 0,
        }
    }
}

/// The leader as this client last learned it.
#[derive(Clone, Debug)]
struct KnownLeader {
    addr: PeerAddr,
    /// Its term, when learned from a status (a redirect names none).
    term: Option<u64>,
}

/// A leader some node named in its status.
#[derive(Clone, Debug)]
struct LeaderView {
    term: u64,
    id: NodeId,
    addr: PeerAddr,
}

/// Whom a client-confirmed read goes to.
struct ReadQuorum {
    /// The leader as last seen, and its address.
    leader_id: NodeId,
    leader: PeerAddr,
    /// The voters whose terms are asked, with their addresses.
    ask: Vec<(NodeId, PeerAddr)>,
    /// Term rounds, shared by the reads that began before each round.
    terms: SharedRounds<Arc<Vec<TermReply>>>,
    /// Whether a read was confirmed through this quorum yet.
    confirmed_once: AtomicBool,
}

/// What the client knows about whom to ask.
#[derive(Default)]
struct QuorumCache {
    current: Option<Arc<ReadQuorum>>,
    /// No status call to learn whom to ask before this.
    relearn_after: Option<Instant>,
    /// Stamped reads in a row that could not reach the leader.
    unreachable: u32,
    /// Voters that recently failed to confirm, and until when they are passed over.
    suspects: BTreeMap<NodeId, Instant>,
}

/// How this client's linearizable gets and scans completed, since it connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadPaths {
    /// Confirmed by the client: the leader's stamp and the voters' terms (ADR 0004).
    pub confirmed: u64,
    /// Through a ReadIndex round run by a node (no stamp could be confirmed, or the
    /// client has confirmed reads off).
    pub read_index: u64,
}

/// A connection to an Aspen cluster.
pub struct AspenClient {
    rpc: Arc<RpcClient>,
    peers: Vec<PeerAddr>,
    token: Secret,
    /// Index of the node that answered last; calls start there when no leader is known.
    preferred: AtomicUsize,
    /// The leader as last learned (from a status or a redirect); calls start there.
    leader: Mutex<Option<KnownLeader>>,
    /// The newest leader the nodes named when last asked on behalf of a waiting call, and
    /// when that was: calls waiting together share one look.
    leader_view: Mutex<Option<(Instant, Option<LeaderView>)>>,
    /// Held while the nodes are asked who leads for waiting calls.
    leader_probing: tokio::sync::Mutex<()>,
    retry_deadline: Duration,
    /// Client-confirmed linearizable gets (ADR 0004); off: every one is a leader ReadIndex round.
    confirmed_reads: bool,
    quorum: Mutex<QuorumCache>,
    confirmed_count: AtomicU64,
    read_index_count: AtomicU64,
    /// This client's write session: identities for exactly-once writes.
    session: Mutex<ClientSession>,
}

/// A fresh random session id (128 bits: two clients never share one).
fn new_session() -> Result<ClientSession, ClientError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|error| ClientError::Config(format!("no randomness for a session id: {error}")))?;
    Ok(ClientSession::new(SessionId(u128::from_le_bytes(bytes))))
}

impl AspenClient {
    /// Connects to the cluster through `peers` (any subset of its nodes) with `token`: the
    /// data token (reads and writes) or the admin token (everything).
    pub async fn connect(peers: Vec<PeerAddr>, token: impl Into<Secret>) -> Result<Self, ClientError> {
        if peers.is_empty() || peers.len() > MAX_CLIENT_PEERS {
            return Err(ClientError::Config(format!("give 1..={MAX_CLIENT_PEERS} node addresses")));
        }
        let bind: SocketAddr = "0.0.0.0:0".parse().map_err(|_| ClientError::Config("bind address".into()))?;
        let endpoint = bind_client_endpoint(SecretKey::generate(), bind).await.map_err(ClientError::Endpoint)?;
        let rpc = Arc::new(RpcClient::new(endpoint));
        let token = token.into();
        // Every stream opens with the token, so a node checks it before reading a request.
        rpc.set_hello(CLIENT_ALPN, &aspen_api::ClientHello { token: token.clone() })
            .map_err(|error| ClientError::Config(format!("client token: {error}")))?;
        let preferred = AtomicUsize::new(first_to_connect(&rpc, &peers).await);
        Ok(AspenClient {
            rpc,
            peers,
            token,
            preferred,
            leader: Mutex::new(None),
            leader_view: Mutex::new(None),
            leader_probing: tokio::sync::Mutex::new(()),
            retry_deadline: DEFAULT_RETRY_DEADLINE,
            confirmed_reads: true,
            quorum: Mutex::new(QuorumCache::default()),
            confirmed_count: AtomicU64::new(0),
            read_index_count: AtomicU64::new(0),
            session: Mutex::new(new_session()?),
        })
    }

    /// Parses comma- or whitespace-separated node addresses.
    pub fn parse_peers(text: &str) -> Result<Vec<PeerAddr>, ClientError> {
        text.split([',', ' ', '\n'])
            .filter(|part| !part.trim().is_empty())
            .map(|part| part.parse().map_err(ClientError::Address))
            .collect()
    }

    /// Sets how long calls retry through elections and unreachable nodes; it bounds each
    /// attempt's wait for an answer too (see [`MIN_ATTEMPT_WINDOW`]).
    pub fn with_retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// How this client's linearizable gets and scans completed so far.
    pub fn read_paths(&self) -> ReadPaths {
        ReadPaths {
            confirmed: self.confirmed_count.load(Ordering::Relaxed),
            read_index: self.read_index_count.load(Ordering::Relaxed),
        }
    }

    /// Turns client-confirmed linearizable gets and scans on (the default) or off; off,
    /// every linearizable read waits for the node's own ReadIndex round.
    pub fn with_confirmed_reads(mut self, on: bool) -> Self {
        self.confirmed_reads = on;
        self
    }

    /// Sends one request to one node.
    pub async fn call_node(&self, peer: &PeerAddr, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        let envelope = ClientEnvelope { token: self.token.clone(), request };
        match self.rpc.call_muxed(peer, CLIENT_ALPN, &envelope).await {
            Ok(ClientResponse::Unauthorized(reason)) => Err(ClientError::Unauthorized(reason)),
            Ok(ClientResponse::Rejected(reason)) => Err(ClientError::Rejected(reason)),
            Ok(response) => Ok(response),
            Err(error @ TransportError::MessageTooLarge { .. }) => Err(ClientError::Rejected(error.to_string())),
            Err(TransportError::Unauthenticated { reason, .. }) => Err(ClientError::Unauthorized(reason)),
            Err(error) => Err(ClientError::Unreachable(error)),
        }
    }

    /// Sends `request`, moving on to other nodes and retrying while `retry` says the
    /// outcome allows it, until the retry deadline.
    async fn call<T>(
        &self,
        request: ClientRequest,
        idempotent: bool,
        decode: impl Fn(ClientResponse) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.call_tracked(request, idempotent, decode).await.0
    }

    /// [`AspenClient::call`], and whether any failed attempt may have taken effect.
    ///
    /// Each round tries the known leader first, then the other nodes, those with an open
    /// connection before those never reached and those known to be down last (a call to a
    /// node known down fails at once; see `aspen_transport::dial`). A node not connected
    /// yet is waited for at most [`DIAL_HEDGE`] when there are others. Only after a round
    /// in which every node failed does the call pause ([`RETRY_PAUSE`]), then ask every
    /// node who leads. A redirect to the leader is followed at once, unless it names a node
    /// that already failed this round. At the deadline an availability error becomes
    /// [`ClientError::Unavailable`], which says how many nodes could be reached.
    async fn call_tracked<T>(
        &self,
        request: ClientRequest,
        idempotent: bool,
        decode: impl Fn(ClientResponse) -> Result<T, ClientError>,
    ) -> (Result<T, ClientError>, bool) {
        let started = Instant::now();
        let mut maybe_applied = false;
        let mut tried: Vec<PeerAddr> = Vec::new();
        let mut answered: Vec<PeerAddr> = Vec::new();
        let mut failures: BTreeMap<String, String> = BTreeMap::new();
        // Nodes this call already waited for a first connection to, in vain: not again.
        let mut slow_dials: Vec<PeerAddr> = Vec::new();
        let mut redirect: Option<PeerAddr> = None;
        loop {
            let Some(peer) = redirect.take().or_else(|| self.next_target(&tried)) else {
                // Every node failed this round: pause (an election takes a moment), then
                // learn who leads before the next round.
                let left = self.retry_deadline.saturating_sub(started.elapsed());
                tokio::time::sleep(RETRY_PAUSE.min(left)).await;
                tried.clear();
                self.learn_leader().await;
                continue;
            };
            tried.push(peer.clone());
            // A node not connected yet is waited for briefly when there are others to ask
            // (this round or the next), else until the deadline; its dial goes on anyway.
            let left = self.retry_deadline.saturating_sub(started.elapsed());
            let connect_wait = if self.peers.len() == 1 {
                left
            } else if slow_dials.contains(&peer) {
                Duration::ZERO
            } else {
                DIAL_HEDGE.min(left)
            };
            let term_before = self.known_term();
            let attempt = async {
                if idempotent {
                    self.attempt_watching_leader(&peer, request.clone(), connect_wait).await
                } else {
                    self.attempt(&peer, request.clone(), connect_wait).await
                }
            };
            // The deadline bounds the wait for an answer too (a leader that lost its quorum
            // holds a write until its own timeout), with a floor so that a last attempt
            // still gets a node's quick answer. Given up, it is a read timeout: the request
            // may have been handled.
            let window = left.max(MIN_ATTEMPT_WINDOW);
            let given_up = TransportError::ReadTimeout { peer: peer.short(), after_ms: window.as_millis() as u64 };
            let attempt =
                tokio::time::timeout(window, attempt).await.unwrap_or(Err(ClientError::Unreachable(given_up)));
            let error = match attempt.and_then(&decode) {
                Ok(value) => {
                    if let Some(position) = self.peers.iter().position(|known| *known == peer) {
                        self.preferred.store(position, Ordering::Relaxed);
                    }
                    return (Ok(value), maybe_applied);
                }
                Err(error) => error,
            };
            if self.rpc.reachability(&peer, CLIENT_ALPN) == Reachability::Dialing && !slow_dials.contains(&peer) {
                slow_dials.push(peer.clone());
            }
            let failure = match &error {
                ClientError::Unreachable(error) => {
                    failures.insert(peer.short(), error.reason());
                    AttemptFailure::Unreachable { before_send: error.is_before_send() }
                }
                ClientError::Kv(error) => AttemptFailure::Kv(error),
                ClientError::Cluster(error) => AttemptFailure::Cluster(error),
                _ => AttemptFailure::Other,
            };
            if !matches!(failure, AttemptFailure::Unreachable { .. }) {
                answered.push(peer.clone());
            }
            let action = retry::after_failure(failure, idempotent);
            let this_maybe_applied = retry::may_have_applied(failure);
            if action == RetryAction::Stop || started.elapsed() >= self.retry_deadline {
                let error = if action != RetryAction::Stop && is_availability_error(&error) {
                    ClientError::Unavailable(self.availability(&answered, &failures, &error))
                } else {
                    error
                };
                return (Err(error), maybe_applied || this_maybe_applied);
            }
            maybe_applied |= this_maybe_applied;
            tracing::debug!(peer = %peer.short(), %error, "retrying");
            // The node failed, or said it does not lead: it is not the leader to start with
            // (unless the attempt was given up because it was just elected).
            if self.known_term() == term_before {
                self.forget_leader(&peer);
            }
            if let RetryAction::Redirect(addr) = action
                && let Ok(leader) = addr.parse::<PeerAddr>()
                && !tried.contains(&leader)
            {
                self.set_leader(leader.clone(), None);
                redirect = Some(leader);
            }
        }
    }

    /// Sends `request` to `peer`, waiting at most `connect_wait` for a connection if it has
    /// none (its dial goes on in the background).
    async fn attempt(
        &self,
        peer: &PeerAddr,
        request: ClientRequest,
        connect_wait: Duration,
    ) -> Result<ClientResponse, ClientError> {
        if self.rpc.reachability(peer, CLIENT_ALPN) != Reachability::Connected {
            match tokio::time::timeout(connect_wait, self.rpc.connect(peer, CLIENT_ALPN)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(ClientError::Unreachable(error)),
                Err(_) => {
                    let reason = match connect_wait.as_millis() {
                        0 => "no answer to the handshake yet".to_string(),
                        waited => format!("no answer to the handshake within {waited} ms"),
                    };
                    return Err(ClientError::Unreachable(TransportError::Connect { peer: peer.short(), reason }));
                }
            }
        }
        self.call_node(peer, request).await
    }

    /// The node to try next this round: the known leader, then the configured nodes from
    /// the one that answered last, connected ones first and those known down last; `None`
    /// once every one was tried.
    fn next_target(&self, tried: &[PeerAddr]) -> Option<PeerAddr> {
        let leader = self.known_leader();
        if let Some(leader) = leader.filter(|leader| !tried.contains(leader))
            && !matches!(self.rpc.reachability(&leader, CLIENT_ALPN), Reachability::Down { .. })
        {
            return Some(leader);
        }
        let start = self.preferred.load(Ordering::Relaxed);
        (0..self.peers.len())
            .map(|offset| &self.peers[(start + offset) % self.peers.len()])
            .filter(|peer| !tried.contains(peer))
            .min_by_key(|peer| match self.rpc.reachability(peer, CLIENT_ALPN) {
                Reachability::Connected => 0,
                Reachability::Unknown | Reachability::Dialing => 1,
                Reachability::Down { .. } => 2,
            })
            .cloned()
    }

    fn known_leader(&self) -> Option<PeerAddr> {
        self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().map(|leader| leader.addr.clone())
    }

    /// The term of the leader as last learned, if a status told it.
    fn known_term(&self) -> Option<u64> {
        self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().and_then(|leader| leader.term)
    }

    fn set_leader(&self, addr: PeerAddr, term: Option<u64>) {
        *self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(KnownLeader { addr, term });
    }

    /// Forgets the leader if it is `peer`.
    fn forget_leader(&self, peer: &PeerAddr) {
        let mut leader = self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if leader.as_ref().is_some_and(|leader| leader.addr.id == peer.id) {
            *leader = None;
        }
    }

    /// Asks the nodes who leads and remembers the answer (see [`AspenClient::probe_leader`]).
    async fn learn_leader(&self) {
        if let Some(view) = self.probe_leader(None).await {
            self.set_leader(view.addr, Some(view.term));
        }
    }

    /// Asks the nodes likeliest to answer at once, except `skip`, for their status at once,
    /// each for at most [`LEADER_PROBE_TIMEOUT`]:
    /// the leader named in the highest term, unless it is known to be down (a follower
    /// still names a crashed leader until it elects another).
    async fn probe_leader(&self, skip: Option<&PeerAddr>) -> Option<LeaderView> {
        // Only the likeliest to answer at once are asked: those with an open connection, else
        // those never dialed, else those whose first dial is still under way; never those
        // known to be down.
        let ranked: Vec<(u8, &PeerAddr)> = self
            .peers
            .iter()
            .filter(|peer| skip.is_none_or(|skip| skip.id != peer.id))
            .filter_map(|peer| match self.rpc.reachability(peer, CLIENT_ALPN) {
                Reachability::Connected => Some((0, peer)),
                Reachability::Unknown => Some((1, peer)),
                Reachability::Dialing => Some((2, peer)),
                Reachability::Down { .. } => None,
            })
            .collect();
        let best = ranked.iter().map(|(rank, _)| *rank).min();
        let ask = ranked.into_iter().filter(|(rank, _)| Some(*rank) == best).map(|(_, peer)| peer);
        let asks = ask.map(|peer| async move {
            match tokio::time::timeout(LEADER_PROBE_TIMEOUT, self.call_node(peer, ClientRequest::Status)).await {
                Ok(Ok(ClientResponse::Status(Ok(status)))) => Some(status),
                _ => None,
            }
        });
        let statuses = futures::future::join_all(asks).await;
        statuses
            .iter()
            .flatten()
            .filter_map(|status| {
                let id = status.leader?;
                let addr: PeerAddr = status.nodes.iter().find(|node| node.id == id)?.addr.parse().ok()?;
                Some(LeaderView { term: status.term, id, addr })
            })
            .filter(|view| !matches!(self.rpc.reachability(&view.addr, CLIENT_ALPN), Reachability::Down { .. }))
            .max_by_key(|view| view.term)
    }

    /// Who the other nodes say leads, asked at most once per [`LEADER_CHECK_PERIOD`] for
    /// all the calls waiting meanwhile; `waiting_on` is not asked (it is the node a call
    /// waits for).
    async fn leader_view(&self, waiting_on: &PeerAddr) -> Option<LeaderView> {
        let fresh = || {
            let view = self.leader_view.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            view.as_ref().filter(|(at, _)| at.elapsed() < LEADER_CHECK_PERIOD).map(|(_, view)| view.clone())
        };
        if let Some(view) = fresh() {
            return view;
        }
        let _probing = self.leader_probing.lock().await;
        if let Some(view) = fresh() {
            return view;
        }
        let view = self.probe_leader(Some(waiting_on)).await;
        *self.leader_view.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some((Instant::now(), view.clone()));
        view
    }

    /// [`AspenClient::attempt`], given up when a new leader is elected meanwhile: after
    /// [`LEADER_SUSPECT_AFTER`] the client asks the other nodes who leads, every
    /// [`LEADER_CHECK_PERIOD`], and stops waiting once one names a leader in a term newer
    /// than the one it knew when the attempt began (or than the first answer, if it knew
    /// none). A leader that crashed after acknowledging the request would otherwise hold it
    /// until the silence of its connection is noticed. Only for requests that may be sent
    /// again: the abandoned attempt may still take effect.
    async fn attempt_watching_leader(
        &self,
        peer: &PeerAddr,
        request: ClientRequest,
        connect_wait: Duration,
    ) -> Result<ClientResponse, ClientError> {
        let mut baseline = self.known_term();
        let attempt = self.attempt(peer, request, connect_wait);
        tokio::pin!(attempt);
        let mut pause = LEADER_SUSPECT_AFTER;
        loop {
            tokio::select! {
                result = &mut attempt => return result,
                () = tokio::time::sleep(pause) => {}
            }
            pause = LEADER_CHECK_PERIOD;
            let view = tokio::select! {
                result = &mut attempt => return result,
                view = self.leader_view(peer) => view,
            };
            let Some(view) = view else { continue };
            match baseline {
                Some(term) if view.term > term => {
                    tracing::debug!(peer = %peer.short(), leader = view.id, term = view.term, "new leader; resending");
                    let reason = format!("stopped waiting: node {} leads since term {}", view.id, view.term);
                    self.set_leader(view.addr, Some(view.term));
                    return Err(ClientError::Unreachable(TransportError::Stream { peer: peer.short(), reason }));
                }
                Some(_) => {}
                None => baseline = Some(view.term),
            }
        }
    }

    /// How many configured nodes `answered` this call or are connected, and why the others
    /// are not reachable, for an error about `last`.
    fn availability(
        &self,
        answered: &[PeerAddr],
        failures: &BTreeMap<String, String>,
        last: &ClientError,
    ) -> Availability {
        let mut reachable = 0;
        let mut unreachable = Vec::new();
        for peer in &self.peers {
            let reachability = self.rpc.reachability(peer, CLIENT_ALPN);
            if answered.contains(peer) || reachability == Reachability::Connected {
                reachable += 1;
                continue;
            }
            let reason = match (failures.get(&peer.short()), reachability) {
                (Some(error), _) => error.clone(),
                (None, Reachability::Down { reason, .. }) => reason,
                (None, Reachability::Dialing) => "no answer to the handshake yet".into(),
                (None, _) => "not tried".into(),
            };
            unreachable.push((peer.short(), reason));
        }
        Availability { reachable, total: self.peers.len(), unreachable, last_error: last.to_string() }
    }

    /// Reads one key (linearizable).
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<GetResponse, ClientError> {
        self.get_with(GetRequest { key: key.into(), consistency: ReadConsistency::Linearizable }).await
    }

    /// Reads one key with the given consistency.
    pub async fn get_with(&self, request: GetRequest) -> Result<GetResponse, ClientError> {
        let stamped = || ClientRequest::StampedGet(request.clone());
        if let Some(response) =
            self.linearizable_read(request.consistency, stamped, ClientResponse::into_stamped_get).await
        {
            return Ok(response);
        }
        self.call(ClientRequest::Get(request), true, |response| match response {
            ClientResponse::Get(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// For a linearizable read with confirmed reads on: the client-confirmed answer, if it
    /// could be confirmed. `None` means the caller sends the plain request, which (when
    /// linearizable) a node answers after its own ReadIndex round; it is counted as such.
    async fn linearizable_read<T>(
        &self,
        consistency: ReadConsistency,
        stamped: impl FnOnce() -> ClientRequest,
        unpack: fn(ClientResponse) -> Option<Stamped<T>>,
    ) -> Option<T> {
        if consistency != ReadConsistency::Linearizable {
            return None;
        }
        if self.confirmed_reads
            && let Some(response) = self.confirmed_read(stamped(), unpack).await
        {
            return Some(response);
        }
        self.read_index_count.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// A client-confirmed linearizable read (ADR 0004), or `None` when it cannot be
    /// confirmed and the caller must take the leader's ReadIndex path.
    async fn confirmed_read<T>(
        &self,
        request: ClientRequest,
        unpack: fn(ClientResponse) -> Option<Stamped<T>>,
    ) -> Option<T> {
        let quorum = self.read_quorum().await?;
        let read = tokio::time::timeout(STAMPED_READ_TIMEOUT, self.call_node(&quorum.leader, request));
        let terms = quorum.terms.run(|| self.term_round(&quorum));
        let (read, terms) = tokio::join!(read, terms);
        let stamped = match read {
            Ok(Ok(response)) => match unpack(response) {
                Some(stamped) => stamped,
                None => {
                    tracing::debug!("stamped read refused; relearning the leader");
                    self.forget_quorum(None);
                    return None;
                }
            },
            outcome => {
                tracing::debug!(failed = ?outcome.ok().map(Result::err), "leader unreachable for a stamped read");
                self.leader_unreachable();
                return None;
            }
        };
        let Some(stamp) = stamped.stamp else {
            // The node ran a ReadIndex round itself.
            self.read_index_count.fetch_add(1, Ordering::Relaxed);
            return Some(stamped.response);
        };
        let replies = terms.ok()?;
        if stamp.leader == quorum.leader_id && stamp.confirmed_by(&replies) {
            self.confirmed_count.fetch_add(1, Ordering::Relaxed);
            if !quorum.confirmed_once.swap(true, Ordering::Relaxed) {
                // This leader is reachable: relearn at the base pace again.
                self.quorum_cache().unreachable = 0;
            }
            return Some(stamped.response);
        }
        let silent = quorum.ask.iter().map(|(id, _)| *id).find(|id| !replies.iter().any(|reply| reply.node == *id));
        tracing::debug!(?stamp, ?replies, "read not confirmed; falling back to the leader's ReadIndex");
        self.forget_quorum(silent);
        None
    }

    /// Asks every chosen voter for its term, each for at most `TERM_CONFIRM_TIMEOUT`.
    async fn term_round(&self, quorum: &ReadQuorum) -> Result<Arc<Vec<TermReply>>, KvError> {
        let calls = quorum.ask.iter().map(|(id, addr)| async move {
            let call = tokio::time::timeout(TERM_CONFIRM_TIMEOUT, self.call_node(addr, ClientRequest::Term));
            match call.await {
                Ok(Ok(ClientResponse::Term(Ok(reply)))) if reply.node == *id => Some(reply),
                _ => None,
            }
        });
        Ok(Arc::new(futures::future::join_all(calls).await.into_iter().flatten().collect()))
    }

    fn quorum_cache(&self) -> MutexGuard<'_, QuorumCache> {
        self.quorum.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops the cached quorum after a read it could not confirm; `silent` (a voter that
    /// did not answer) is passed over for a while.
    fn forget_quorum(&self, silent: Option<NodeId>) {
        let mut cache = self.quorum_cache();
        cache.current = None;
        if let Some(id) = silent {
            cache.suspects.insert(id, Instant::now() + SUSPECT_FOR);
        }
    }

    /// Drops the cached quorum after a stamped read that could not reach the leader, and
    /// waits twice as long as last time before relearning.
    fn leader_unreachable(&self) {
        let mut cache = self.quorum_cache();
        cache.current = None;
        cache.unreachable = cache.unreachable.saturating_add(1);
        let pause = READ_QUORUM_RELEARN.saturating_mul(1 << cache.unreachable.min(6)).min(MAX_READ_QUORUM_RELEARN);
        cache.relearn_after = Some(Instant::now() + pause);
    }

    /// Whom to ask: cached, else learned from a node's status (at most once per
    /// `READ_QUORUM_RELEARN`, less often after unreachable leaders); `None` while nothing
    /// usable is known.
    async fn read_quorum(&self) -> Option<Arc<ReadQuorum>> {
        {
            let mut cache = self.quorum_cache();
            if let Some(quorum) = &cache.current {
                return Some(Arc::clone(quorum));
            }
            let now = Instant::now();
            if cache.relearn_after.is_some_and(|after| now < after) {
                return None;
            }
            cache.relearn_after = Some(now + READ_QUORUM_RELEARN);
        }
        let peer = self.peers[self.preferred.load(Ordering::Relaxed) % self.peers.len()].clone();
        let status = match self.call_node(&peer, ClientRequest::Status).await {
            Ok(ClientResponse::Status(Ok(status))) => status,
            _ => return None,
        };
        if let Some(leader) = status.leader.and_then(|id| status.nodes.iter().find(|node| node.id == id))
            && let Ok(addr) = leader.addr.parse()
        {
            self.set_leader(addr, Some(status.term));
        }
        let mut cache = self.quorum_cache();
        let now = Instant::now();
        cache.suspects.retain(|_, until| *until > now);
        // Voters are asked in order of how likely they are to answer at once: connected,
        // never dialed, still being dialed (a first dial that takes long is to a dead node
        // more often than not), suspected (they failed to confirm lately, or the leader's
        // failure detector does not call them healthy: a new process knows nothing itself
        // yet), and known down last.
        let mut rank: BTreeMap<NodeId, u8> = BTreeMap::new();
        for node in &status.nodes {
            let Ok(addr) = node.addr.parse::<PeerAddr>() else { continue };
            let reachability = match self.rpc.reachability(&addr, CLIENT_ALPN) {
                Reachability::Connected => 0,
                Reachability::Unknown => 1,
                Reachability::Dialing => 2,
                Reachability::Down { .. } => 4,
            };
            rank.insert(node.id, reachability);
        }
        let unhealthy = status
            .peers
            .iter()
            .filter(|peer| status.leader == Some(status.node_id) && peer.liveness != Liveness::Healthy)
            .map(|peer| peer.node_id);
        for id in cache.suspects.keys().copied().chain(unhealthy) {
            let entry = rank.entry(id).or_default();
            *entry = (*entry).max(3);
        }
        let quorum = Arc::new(read_quorum_from(&status, &rank)?);
        cache.current = Some(Arc::clone(&quorum));
        Some(quorum)
    }

    /// Reads a range.
    pub async fn scan(&self, request: ScanRequest) -> Result<ScanResponse, ClientError> {
        let stamped = || ClientRequest::StampedScan(request.clone());
        if let Some(response) =
            self.linearizable_read(request.consistency, stamped, ClientResponse::into_stamped_scan).await
        {
            return Ok(response);
        }
        self.call(ClientRequest::Scan(request), true, |response| match response {
            ClientResponse::Scan(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    fn lock_session(&self) -> MutexGuard<'_, ClientSession> {
        self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new write identity; a new session when the current one's window is full (its
    /// oldest write is stuck) or it expired.
    fn begin_write(&self, expired: Option<SessionId>) -> Result<WriteId, ClientError> {
        let mut session = self.lock_session();
        if expired == Some(session.id()) {
            *session = new_session()?;
        }
        if let Some(id) = session.begin() {
            return Ok(id);
        }
        *session = new_session()?;
        session.begin().ok_or_else(|| ClientError::Config("a new session has no room".into()))
    }

    /// Applies a write command, at most once: every attempt carries the same identity, so the
    /// client retries through timeouts, broken connections and leader changes until its
    /// deadline. Fails with `KvError::OutcomeUnknown` when it gives up after an attempt that
    /// may have been applied.
    pub async fn write(&self, command: WriteCommand) -> Result<WriteResponse, ClientError> {
        command.validate().map_err(KvError::from)?;
        let mut expired = None;
        let mut maybe_applied = false;
        // At most one new session per call: a session that expires twice within one call
        // means the cluster's clock or this client is far off; report it.
        for _ in 0..2 {
            let id = self.begin_write(expired)?;
            let request = ClientRequest::Write(ClientWrite { id: Some(id), command: command.clone() });
            let (outcome, attempt_maybe_applied) = self
                .call_tracked(request, true, |response| match response {
                    ClientResponse::Write(result) => Ok(result?),
                    other => Err(ClientError::Protocol(format!("{other:?}"))),
                })
                .await;
            self.lock_session().finish(id);
            maybe_applied |= attempt_maybe_applied;
            match outcome {
                // The session was gone when this attempt arrived, so this attempt did nothing;
                // if no earlier attempt can have done anything, a new session may resend it.
                Err(ClientError::Kv(KvError::Apply(ApplyError::SessionExpired { session }))) if !maybe_applied => {
                    tracing::debug!(%session, "write session expired; starting a new one");
                    expired = Some(session);
                }
                Err(error) if maybe_applied && !matches!(&error, ClientError::Kv(kv) if retry::is_verdict(kv)) => {
                    return Err(ClientError::Kv(KvError::OutcomeUnknown(error.to_string())));
                }
                outcome => return outcome,
            }
        }
        Err(ClientError::Kv(KvError::OutcomeUnknown("the write session expired twice".into())))
    }

    /// Sets `key` to `value`.
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<WriteResponse, ClientError> {
        self.write(WriteCommand::Put { key: key.into(), value: value.into(), lease: None }).await
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<WriteResponse, ClientError> {
        self.write(WriteCommand::Delete { key: key.into() }).await
    }

    /// Deletes every key under `prefix`.
    pub async fn delete_prefix(&self, prefix: impl Into<Vec<u8>>) -> Result<WriteResponse, ClientError> {
        self.write(WriteCommand::DeleteRange { range: KeyRange::prefix(prefix) }).await
    }

    /// Runs a transaction.
    pub async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, ClientError> {
        match self.write(WriteCommand::Txn(txn)).await? {
            WriteResponse::Txn(response) => Ok(response),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Runs a read-only SQL query.
    pub async fn sql(&self, request: SqlRequest) -> Result<SqlResponse, ClientError> {
        self.call(ClientRequest::Sql(request), true, |response| match response {
            ClientResponse::Sql(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// The status of the first node that answers.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.call(ClientRequest::Status, true, |response| match response {
            ClientResponse::Status(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// The status of one specific node.
    pub async fn node_status(&self, peer: &PeerAddr) -> Result<ClusterStatus, ClientError> {
        match self.call_node(peer, ClientRequest::Status).await? {
            ClientResponse::Status(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Prometheus metrics text of one specific node.
    pub async fn node_metrics(&self, peer: &PeerAddr) -> Result<String, ClientError> {
        match self.call_node(peer, ClientRequest::Metrics).await? {
            ClientResponse::Metrics(text) => Ok(text),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    async fn cluster(&self, request: ClientRequest) -> Result<(), ClientError> {
        self.call(request, false, |response| match response {
            ClientResponse::Cluster(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        })
        .await
    }

    /// Initializes a new cluster with these voters (sent to the first configured node).
    pub async fn init(&self, members: Vec<ClusterNode>) -> Result<(), ClientError> {
        match self.call_node(&self.peers[0], ClientRequest::Init(members)).await? {
            ClientResponse::Cluster(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Adds a learner.
    pub async fn add_learner(&self, node: ClusterNode) -> Result<(), ClientError> {
        self.cluster(ClientRequest::AddLearner(node)).await
    }

    /// Sets the voters.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), ClientError> {
        self.cluster(ClientRequest::ChangeMembership(voters)).await
    }

    /// Removes a node.
    pub async fn remove(&self, node: NodeId) -> Result<(), ClientError> {
        self.cluster(ClientRequest::Remove(node)).await
    }

    /// Builds a snapshot on the node that answers.
    pub async fn trigger_snapshot(&self) -> Result<(), ClientError> {
        self.cluster(ClientRequest::TriggerSnapshot).await
    }

    /// Hands leadership to `node`.
    pub async fn transfer_leader(&self, node: NodeId) -> Result<(), ClientError> {
        self.cluster(ClientRequest::TransferLeader(node)).await
    }

    /// The configured node addresses.
    pub fn peers(&self) -> &[PeerAddr] {
        &self.peers
    }

    /// Closes the client's connections (peers see a clean close) and cancels its dials
    /// still under way (to dead nodes, most likely), which then hold the close for
    /// milliseconds, not seconds (see [`aspen_transport::endpoint::CLIENT_INITIAL_RTT`]).
    pub async fn close(&self) {
        self.rpc.close_all();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.rpc.endpoint().close()).await;
    }
}

/// Whom to ask for reads confirmed against `status`'s leader: the fewest other voters that
/// make a majority with it, those with the lowest `rank` first (likeliest to answer at once;
/// a voter missing from it ranks 0).
fn read_quorum_from(status: &ClusterStatus, rank: &BTreeMap<NodeId, u8>) -> Option<ReadQuorum> {
    let leader_id = status.leader?;
    let addr = |id: NodeId| -> Option<PeerAddr> {
        status.nodes.iter().find(|node| node.id == id).and_then(|node| node.addr.parse().ok())
    };
    let needed =
        LeaderStamp { leader: leader_id, term: 0, voters: vec![status.voters.clone()] }.followers_to_ask().len();
    let mut others: Vec<NodeId> = status.voters.iter().copied().filter(|id| *id != leader_id).collect();
    // Stable: among equals, the lowest-numbered first.
    others.sort_by_key(|id| rank.get(id).copied().unwrap_or(0));
    let ask = others.into_iter().take(needed).map(|id| Some((id, addr(id)?))).collect::<Option<_>>()?;
    Some(ReadQuorum {
        leader_id,
        leader: addr(leader_id)?,
        ask,
        terms: SharedRounds::default(),
        confirmed_once: AtomicBool::new(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of_five() -> ClusterStatus {
        let addr = |id: u8| format!("{}@127.0.0.1:{}", SecretKey::from_bytes(&[id; 32]).public(), 7000 + u16::from(id));
        ClusterStatus {
            node_id: 1,
            role: aspen_api::NodeRole::Leader,
            term: 3,
            leader: Some(1),
            last_log_index: None,
            last_applied: None,
            voters: (1..=5).collect(),
            learners: BTreeSet::new(),
            nodes: (1..=5u8).map(|id| ClusterNode { id: NodeId::from(id), addr: addr(id) }).collect(),
            peers: Vec::new(),
        }
    }

    #[test]
    fn a_confirmed_read_asks_the_voters_likeliest_to_answer_at_once() {
        let status = status_of_five();
        let asked = |rank: &[(NodeId, u8)]| -> Vec<NodeId> {
            let quorum = read_quorum_from(&status, &rank.iter().copied().collect()).expect("a quorum");
            quorum.ask.iter().map(|(id, _)| *id).collect()
        };
        // Two followers make a majority of five with the leader; among equals, the lowest ids.
        assert_eq!(asked(&[]), vec![2, 3]);
        // Known down (4), suspected (3) and still dialing (2) go after connected ones.
        assert_eq!(asked(&[(2, 2), (3, 3), (4, 4), (5, 0)]), vec![5, 2]);
        assert_eq!(asked(&[(2, 4), (3, 4), (4, 1)]), vec![5, 4]);
    }
}
