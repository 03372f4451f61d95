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

pub mod txn_syntax;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aspen_api::retry::{self, AttemptFailure, RETRY_PAUSE, RetryAction};
use aspen_api::rounds::SharedRounds;
use aspen_api::session::{ClientSession, SessionId, WriteId};
use aspen_api::{
    ApplyError, ClientEnvelope, ClientRequest, ClientResponse, ClientWrite, ClusterError, ClusterNode, ClusterStatus,
    GetRequest, GetResponse, KeyRange, KvError, LeaderStamp, NodeId, ReadConsistency, ScanRequest, ScanResponse,
    Secret, SqlRequest, SqlResponse, Stamped, TermReply, TxnRequest, TxnResponse, WriteCommand, WriteResponse,
};
use aspen_transport::{CLIENT_ALPN, PeerAddr, RpcClient, SecretKey, TransportError, bind_endpoint};

pub use aspen_api::retry::DEFAULT_RETRY_DEADLINE;
/// Longest `close` waits for connections to finish closing.
const CLOSE_GRACE: Duration = Duration::from_millis(250);
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
}

/// Dials every peer at once and returns the index of the first that connects (0 if none
/// does), so a dead node in the list costs nothing when others are up. The other dials go
/// on in the background and fill the connection pool.
async fn first_to_connect(rpc: &Arc<RpcClient>, peers: &[PeerAddr]) -> usize {
    let (connected, mut first) = tokio::sync::mpsc::channel(peers.len());
    for (index, peer) in peers.iter().enumerate() {
        let rpc = Arc::clone(rpc);
        let peer = peer.clone();
        let connected = connected.clone();
        tokio::spawn(async move {
            if rpc.connect(&peer, CLIENT_ALPN).await.is_ok() {
                let _ = connected.send(index).await;
            }
        });
    }
    drop(connected);
    first.recv().await.unwrap_or(0)
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
    /// Index of the node that answered last; calls start there.
    preferred: AtomicUsize,
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
        let endpoint = bind_endpoint(SecretKey::generate(), bind, Vec::new()).await.map_err(ClientError::Endpoint)?;
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

    /// Sets how long calls retry through elections and unreachable nodes.
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
    async fn call_tracked<T>(
        &self,
        request: ClientRequest,
        idempotent: bool,
        decode: impl Fn(ClientResponse) -> Result<T, ClientError>,
    ) -> (Result<T, ClientError>, bool) {
        let started = Instant::now();
        let mut maybe_applied = false;
        let mut target: Option<PeerAddr> = None;
        let mut index = self.preferred.load(Ordering::Relaxed);
        loop {
            let peer = target.take().unwrap_or_else(|| self.peers[index % self.peers.len()].clone());
            let outcome = self.call_node(&peer, request.clone()).await.and_then(&decode);
            let failure = match &outcome {
                Ok(_) => {
                    if let Some(position) = self.peers.iter().position(|known| *known == peer) {
                        self.preferred.store(position, Ordering::Relaxed);
                    }
                    return (outcome, maybe_applied);
                }
                Err(ClientError::Unreachable(error)) => {
                    AttemptFailure::Unreachable { before_send: error.is_before_send() }
                }
                Err(ClientError::Kv(error)) => AttemptFailure::Kv(error),
                Err(ClientError::Cluster(error)) => AttemptFailure::Cluster(error),
                Err(_) => AttemptFailure::Other,
            };
            let action = retry::after_failure(failure, idempotent);
            let this_maybe_applied = retry::may_have_applied(failure);
            if action == RetryAction::Stop || started.elapsed() >= self.retry_deadline {
                return (outcome, maybe_applied || this_maybe_applied);
            }
            maybe_applied |= this_maybe_applied;
            tracing::debug!(peer = %peer.short(), error = ?outcome.as_ref().err(), "retrying");
            target = match action {
                RetryAction::Redirect(addr) => addr.parse().ok(),
                RetryAction::NextNode | RetryAction::Stop => None,
            };
            if target.is_none() {
                index += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
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
        let mut cache = self.quorum_cache();
        let now = Instant::now();
        cache.suspects.retain(|_, until| *until > now);
        let quorum = Arc::new(read_quorum_from(&status, &cache.suspects)?);
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

    /// Closes the client's connections (peers see a clean close). Bounded: a dial still
    /// pending to a dead node would otherwise hold the close for seconds.
    pub async fn close(&self) {
        self.rpc.close_all();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.rpc.endpoint().close()).await;
    }
}

/// Whom to ask for reads confirmed against `status`'s leader: the fewest other voters that
/// make a majority with it, passing over `suspects` while others can stand in.
fn read_quorum_from(status: &ClusterStatus, suspects: &BTreeMap<NodeId, Instant>) -> Option<ReadQuorum> {
    let leader_id = status.leader?;
    let addr = |id: NodeId| -> Option<PeerAddr> {
        status.nodes.iter().find(|node| node.id == id).and_then(|node| node.addr.parse().ok())
    };
    let needed =
        LeaderStamp { leader: leader_id, term: 0, voters: vec![status.voters.clone()] }.followers_to_ask().len();
    let (trusted, suspected): (Vec<NodeId>, Vec<NodeId>) =
        status.voters.iter().copied().filter(|id| *id != leader_id).partition(|id| !suspects.contains_key(id));
    let ask =
        trusted.into_iter().chain(suspected).take(needed).map(|id| Some((id, addr(id)?))).collect::<Option<_>>()?;
    Some(ReadQuorum {
        leader_id,
        leader: addr(leader_id)?,
        ask,
        terms: SharedRounds::default(),
        confirmed_once: AtomicBool::new(false),
    })
}
