//! [`Client`]: the client's logic over any [`ClientConnector`]. Calls go to the known
//! leader first, move on to other nodes, follow redirects and retry only what is safe to
//! retry; writes carry an identity of this client's session, so a resend applies at most
//! once, and a write given up after an attempt that may have reached the cluster fails with
//! `KvError::OutcomeUnknown`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aspen_api::retry::{self, AttemptFailure, RETRY_PAUSE, RetryAction};
use aspen_api::session::{ClientSession, SessionId, WriteId};
use aspen_api::{
    ApplyError, ClientRequest, ClientResponse, ClientWrite, ClusterNode, ClusterStatus, KeyRange, KvError, NodeId,
    SqlRequest, SqlResponse, TxnRequest, TxnResponse, WriteCommand, WriteResponse,
};
use futures::StreamExt;

use crate::availability::{Availability, is_availability_error};
use crate::connector::{ClientConnector, ClientPeer, NodeUnreachable, Reachability};
use crate::reads::QuorumCache;
use crate::{
    CONNECT_STAGGER, ClientError, DEFAULT_RETRY_DEADLINE, DIAL_HEDGE, LEADER_CHECK_PERIOD, LEADER_PROBE_TIMEOUT,
    LEADER_SUSPECT_AFTER, MAX_CLIENT_PEERS, MIN_ATTEMPT_WINDOW, rt,
};

/// Dials the peers in turn, starting the next one [`CONNECT_STAGGER`] after the last (or
/// at once when it fails), and returns the index of the first that connects (0 if none
/// does). A dead node in the list then costs at most the stagger, and one that comes after
/// a live one costs nothing at all: it is not dialed until a call needs it. The dials still
/// under way go on in the background and fill the connection pool.
async fn first_to_connect<C: ClientConnector>(connector: &C, peers: &[C::Peer]) -> usize {
    let mut dials = futures::stream::FuturesUnordered::new();
    let mut next = 0;
    loop {
        if next < peers.len() {
            let peer = &peers[next];
            let index = next;
            dials.push(async move { (index, connector.connect(peer).await.is_ok()) });
            next += 1;
        }
        let stagger = rt::sleep(CONNECT_STAGGER);
        // Biased: no runtime randomness, so a simulated run replays exactly.
        tokio::select! {
            biased;
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
struct KnownLeader<P> {
    addr: P,
    /// Its term, when learned from a status (a redirect names none).
    term: Option<u64>,
}

/// A leader some node named in its status.
#[derive(Clone, Debug)]
struct LeaderView<P> {
    term: u64,
    id: NodeId,
    addr: P,
}

/// When the nodes were last asked who leads, and the leader they named.
type LeaderLook<P> = (Instant, Option<LeaderView<P>>);

/// How this client's linearizable gets and scans completed, since it connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadPaths {
    /// Confirmed by the client: the leader's stamp and the voters' terms (ADR 0004).
    pub confirmed: u64,
    /// Through a ReadIndex round run by a node (no stamp could be confirmed, or the
    /// client has confirmed reads off).
    pub read_index: u64,
}

/// A connection to an Aspen cluster over any [`ClientConnector`] (iroh in production:
/// [`crate::AspenClient`]).
pub struct Client<C: ClientConnector> {
    pub(crate) connector: C,
    pub(crate) peers: Vec<C::Peer>,
    /// Index of the node that answered last; calls start there when no leader is known.
    pub(crate) preferred: AtomicUsize,
    /// The leader as last learned (from a status or a redirect); calls start there.
    leader: Mutex<Option<KnownLeader<C::Peer>>>,
    /// The newest leader the nodes named when last asked on behalf of a waiting call, and
    /// when that was: calls waiting together share one look.
    leader_view: Mutex<Option<LeaderLook<C::Peer>>>,
    /// Held while the nodes are asked who leads for waiting calls.
    leader_probing: tokio::sync::Mutex<()>,
    retry_deadline: Duration,
    /// Client-confirmed linearizable gets (ADR 0004); off: every one is a leader ReadIndex round.
    pub(crate) confirmed_reads: bool,
    pub(crate) quorum: Mutex<QuorumCache<C::Peer>>,
    pub(crate) confirmed_count: AtomicU64,
    pub(crate) read_index_count: AtomicU64,
    /// This client's write session: identities for exactly-once writes.
    session: Mutex<ClientSession>,
}

/// A client is given 1..=[`MAX_CLIENT_PEERS`] node addresses.
pub(crate) fn check_peer_count(count: usize) -> Result<(), ClientError> {
    if count == 0 || count > MAX_CLIENT_PEERS {
        return Err(ClientError::Config(format!("give 1..={MAX_CLIENT_PEERS} node addresses")));
    }
    Ok(())
}

/// A fresh random session id (128 bits: two clients never share one).
fn new_session() -> Result<ClientSession, ClientError> {
    let id =
        rt::random_u128().map_err(|error| ClientError::Config(format!("no randomness for a session id: {error}")))?;
    Ok(ClientSession::new(SessionId(id)))
}

impl<C: ClientConnector> Client<C> {
    /// A client of the cluster through `peers` (any subset of its nodes) over `connector`;
    /// calls start at the first of them that connects.
    pub async fn new(connector: C, peers: Vec<C::Peer>) -> Result<Self, ClientError> {
        check_peer_count(peers.len())?;
        let preferred = AtomicUsize::new(first_to_connect(&connector, &peers).await);
        Ok(Client {
            connector,
            peers,
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

    /// The transport under this client.
    pub fn connector(&self) -> &C {
        &self.connector
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
    pub async fn call_node(&self, peer: &C::Peer, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        match self.connector.call(peer, request).await? {
            ClientResponse::Unauthorized(reason) => Err(ClientError::Unauthorized(reason)),
            ClientResponse::Rejected(reason) => Err(ClientError::Rejected(reason)),
            response => Ok(response),
        }
    }

    /// Sends `request`, moving on to other nodes and retrying while `retry` says the
    /// outcome allows it, until the retry deadline.
    pub(crate) async fn call<T>(
        &self,
        request: ClientRequest,
        idempotent: bool,
        decode: impl Fn(ClientResponse) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.call_tracked(request, idempotent, decode).await.0
    }

    /// [`Client::call`], and whether any failed attempt may have taken effect.
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
        let mut tried: Vec<C::Peer> = Vec::new();
        let mut answered: Vec<C::Peer> = Vec::new();
        let mut failures: BTreeMap<String, String> = BTreeMap::new();
        // Nodes this call already waited for a first connection to, in vain: not again.
        let mut slow_dials: Vec<C::Peer> = Vec::new();
        let mut redirect: Option<C::Peer> = None;
        loop {
            let Some(peer) = redirect.take().or_else(|| self.next_target(&tried)) else {
                // Every node failed this round: pause (an election takes a moment), then
                // learn who leads before the next round.
                let left = self.retry_deadline.saturating_sub(started.elapsed());
                rt::sleep(RETRY_PAUSE.min(left)).await;
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
            let attempt = rt::timeout(window, attempt).await.unwrap_or_else(|rt::Elapsed| {
                let reason = format!("no reply within {} ms", window.as_millis());
                let message = format!("no reply from {} within {} ms", peer.short(), window.as_millis());
                Err(ClientError::Unreachable(NodeUnreachable { message, reason, before_send: false }))
            });
            let error = match attempt.and_then(&decode) {
                Ok(value) => {
                    if let Some(position) = self.peers.iter().position(|known| *known == peer) {
                        self.preferred.store(position, Ordering::Relaxed);
                    }
                    return (Ok(value), maybe_applied);
                }
                Err(error) => error,
            };
            if self.connector.reachability(&peer) == Reachability::Dialing && !slow_dials.contains(&peer) {
                slow_dials.push(peer.clone());
            }
            let failure = match &error {
                ClientError::Unreachable(error) => {
                    failures.insert(peer.short(), error.reason.clone());
                    AttemptFailure::Unreachable { before_send: error.before_send }
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
                && let Ok(leader) = addr.parse::<C::Peer>()
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
        peer: &C::Peer,
        request: ClientRequest,
        connect_wait: Duration,
    ) -> Result<ClientResponse, ClientError> {
        if self.connector.reachability(peer) != Reachability::Connected {
            match rt::timeout(connect_wait, self.connector.connect(peer)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    let reason = match connect_wait.as_millis() {
                        0 => "no answer to the handshake yet".to_string(),
                        waited => format!("no answer to the handshake within {waited} ms"),
                    };
                    let message = format!("cannot connect to {}: {reason}", peer.short());
                    return Err(ClientError::Unreachable(NodeUnreachable { message, reason, before_send: true }));
                }
            }
        }
        self.call_node(peer, request).await
    }

    /// The node to try next this round: the known leader, then the configured nodes from
    /// the one that answered last, connected ones first and those known down last; `None`
    /// once every one was tried.
    fn next_target(&self, tried: &[C::Peer]) -> Option<C::Peer> {
        let leader = self.known_leader();
        if let Some(leader) = leader.filter(|leader| !tried.contains(leader))
            && !matches!(self.connector.reachability(&leader), Reachability::Down { .. })
        {
            return Some(leader);
        }
        let start = self.preferred.load(Ordering::Relaxed);
        (0..self.peers.len())
            .map(|offset| &self.peers[(start + offset) % self.peers.len()])
            .filter(|peer| !tried.contains(peer))
            .min_by_key(|peer| match self.connector.reachability(peer) {
                Reachability::Connected => 0,
                Reachability::Unknown | Reachability::Dialing => 1,
                Reachability::Down { .. } => 2,
            })
            .cloned()
    }

    fn known_leader(&self) -> Option<C::Peer> {
        self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().map(|leader| leader.addr.clone())
    }

    /// The term of the leader as last learned, if a status told it.
    fn known_term(&self) -> Option<u64> {
        self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().and_then(|leader| leader.term)
    }

    pub(crate) fn set_leader(&self, addr: C::Peer, term: Option<u64>) {
        *self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(KnownLeader { addr, term });
    }

    /// Forgets the leader if it is `peer`.
    fn forget_leader(&self, peer: &C::Peer) {
        let mut leader = self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if leader.as_ref().is_some_and(|leader| leader.addr.same_node(peer)) {
            *leader = None;
        }
    }

    /// Asks the nodes who leads and remembers the answer (see [`Client::probe_leader`]).
    async fn learn_leader(&self) {
        if let Some(view) = self.probe_leader(None).await {
            self.set_leader(view.addr, Some(view.term));
        }
    }

    /// Asks the nodes likeliest to answer at once, except `skip`, for their status at once,
    /// each for at most [`LEADER_PROBE_TIMEOUT`]:
    /// the leader named in the highest term, unless it is known to be down (a follower
    /// still names a crashed leader until it elects another).
    async fn probe_leader(&self, skip: Option<&C::Peer>) -> Option<LeaderView<C::Peer>> {
        // Only the likeliest to answer at once are asked: those with an open connection, else
        // those never dialed, else those whose first dial is still under way; never those
        // known to be down.
        let ranked: Vec<(u8, &C::Peer)> = self
            .peers
            .iter()
            .filter(|peer| skip.is_none_or(|skip| !skip.same_node(peer)))
            .filter_map(|peer| match self.connector.reachability(peer) {
                Reachability::Connected => Some((0, peer)),
                Reachability::Unknown => Some((1, peer)),
                Reachability::Dialing => Some((2, peer)),
                Reachability::Down { .. } => None,
            })
            .collect();
        let best = ranked.iter().map(|(rank, _)| *rank).min();
        let ask = ranked.into_iter().filter(|(rank, _)| Some(*rank) == best).map(|(_, peer)| peer);
        let asks = ask.map(|peer| async move {
            match rt::timeout(LEADER_PROBE_TIMEOUT, self.call_node(peer, ClientRequest::Status)).await {
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
                let addr: C::Peer = status.nodes.iter().find(|node| node.id == id)?.addr.parse().ok()?;
                Some(LeaderView { term: status.term, id, addr })
            })
            .filter(|view| !matches!(self.connector.reachability(&view.addr), Reachability::Down { .. }))
            .max_by_key(|view| view.term)
    }

    /// Who the other nodes say leads, asked at most once per [`LEADER_CHECK_PERIOD`] for
    /// all the calls waiting meanwhile; `waiting_on` is not asked (it is the node a call
    /// waits for).
    async fn leader_view(&self, waiting_on: &C::Peer) -> Option<LeaderView<C::Peer>> {
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

    /// [`Client::attempt`], given up when a new leader is elected meanwhile: after
    /// [`LEADER_SUSPECT_AFTER`] the client asks the other nodes who leads, every
    /// [`LEADER_CHECK_PERIOD`], and stops waiting once one names a leader in a term newer
    /// than the one it knew when the attempt began (or than the first answer, if it knew
    /// none). A leader that crashed after acknowledging the request would otherwise hold it
    /// until the silence of its connection is noticed. Only for requests that may be sent
    /// again: the abandoned attempt may still take effect.
    async fn attempt_watching_leader(
        &self,
        peer: &C::Peer,
        request: ClientRequest,
        connect_wait: Duration,
    ) -> Result<ClientResponse, ClientError> {
        let mut baseline = self.known_term();
        let attempt = self.attempt(peer, request, connect_wait);
        tokio::pin!(attempt);
        let mut pause = LEADER_SUSPECT_AFTER;
        loop {
            tokio::select! {
                biased;
                result = &mut attempt => return result,
                () = rt::sleep(pause) => {}
            }
            pause = LEADER_CHECK_PERIOD;
            let view = tokio::select! {
                biased;
                result = &mut attempt => return result,
                view = self.leader_view(peer) => view,
            };
            let Some(view) = view else { continue };
            match baseline {
                Some(term) if view.term > term => {
                    tracing::debug!(peer = %peer.short(), leader = view.id, term = view.term, "new leader; resending");
                    let reason = format!("stopped waiting: node {} leads since term {}", view.id, view.term);
                    self.set_leader(view.addr, Some(view.term));
                    let message = format!("stream to {} failed: {reason}", peer.short());
                    return Err(ClientError::Unreachable(NodeUnreachable { message, reason, before_send: false }));
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
        answered: &[C::Peer],
        failures: &BTreeMap<String, String>,
        last: &ClientError,
    ) -> Availability {
        let mut reachable = 0;
        let mut unreachable = Vec::new();
        for peer in &self.peers {
            let reachability = self.connector.reachability(peer);
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
    pub async fn node_status(&self, peer: &C::Peer) -> Result<ClusterStatus, ClientError> {
        match self.call_node(peer, ClientRequest::Status).await? {
            ClientResponse::Status(result) => Ok(result?),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Prometheus metrics text of one specific node.
    pub async fn node_metrics(&self, peer: &C::Peer) -> Result<String, ClientError> {
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
    pub fn peers(&self) -> &[C::Peer] {
        &self.peers
    }

    /// Closes the client's connections (see [`ClientConnector::close`]).
    pub async fn close(&self) {
        self.connector.close().await;
    }
}
#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;

    use super::*;

    /// A transport that answers from a script, in order, and records every request; past
    /// the script, no request leaves the client.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Result<ClientResponse, ClientError>>>,
        sent: Mutex<Vec<(SocketAddr, ClientRequest)>>,
    }

    fn lost(before_send: bool) -> Result<ClientResponse, ClientError> {
        Err(ClientError::Unreachable(NodeUnreachable { message: "lost".into(), reason: "lost".into(), before_send }))
    }

    impl ClientConnector for Scripted {
        type Peer = SocketAddr;

        async fn call(&self, peer: &SocketAddr, request: ClientRequest) -> Result<ClientResponse, ClientError> {
            self.sent.lock().expect("lock").push((*peer, request));
            self.answers.lock().expect("lock").pop_front().unwrap_or_else(|| lost(true))
        }

        async fn connect(&self, _peer: &SocketAddr) -> Result<(), ClientError> {
            Ok(())
        }

        fn reachability(&self, _peer: &SocketAddr) -> Reachability {
            Reachability::Connected
        }

        async fn close(&self) {}
    }

    fn node(id: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, id], 7000))
    }

    async fn client(answers: Vec<Result<ClientResponse, ClientError>>) -> Client<Scripted> {
        let connector = Scripted { answers: Mutex::new(answers.into()), sent: Mutex::default() };
        Client::new(connector, vec![node(1), node(2), node(3)])
            .await
            .expect("client")
            .with_retry_deadline(Duration::from_millis(300))
    }

    fn sent_writes(client: &Client<Scripted>) -> Vec<(SocketAddr, ClientWrite)> {
        let sent = client.connector().sent.lock().expect("lock");
        sent.iter()
            .filter_map(|(peer, request)| match request {
                ClientRequest::Write(write) => Some((*peer, write.clone())),
                _ => None,
            })
            .collect()
    }

    const APPLIED: WriteResponse = WriteResponse::Put { revision: 7 };

    #[tokio::test]
    async fn a_write_whose_reply_was_lost_is_resent_with_the_same_identity() {
        let client = client(vec![lost(false), Ok(ClientResponse::Write(Ok(APPLIED)))]).await;
        assert_eq!(client.put("k", "v").await.expect("put"), APPLIED);
        let writes = sent_writes(&client);
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert!(writes[0].1.id.is_some());
        assert_eq!(writes[0].1.id, writes[1].1.id, "a resend carries the first attempt's identity");
    }

    #[tokio::test]
    async fn a_write_given_up_after_a_lost_reply_has_an_unknown_outcome() {
        let client = client(vec![lost(false)]).await;
        let error = client.put("k", "v").await.expect_err("no node answers");
        assert!(matches!(error, ClientError::Kv(KvError::OutcomeUnknown(_))), "{error:?}");
    }

    #[tokio::test]
    async fn a_write_that_was_never_sent_is_not_called_unknown() {
        let client = client(Vec::new()).await;
        let error = client.put("k", "v").await.expect_err("no node answers");
        assert!(matches!(error, ClientError::Unavailable(_)), "{error:?}");
    }

    #[tokio::test]
    async fn a_redirect_is_followed_to_the_leader_it_names() {
        let redirect = KvError::NotLeader { leader: Some(3), leader_addr: Some(node(3).to_string()) };
        let client =
            client(vec![Ok(ClientResponse::Write(Err(redirect))), Ok(ClientResponse::Write(Ok(APPLIED)))]).await;
        assert_eq!(client.put("k", "v").await.expect("put"), APPLIED);
        let peers: Vec<SocketAddr> = sent_writes(&client).into_iter().map(|(peer, _)| peer).collect();
        assert_eq!(peers, vec![node(1), node(3)]);
        // The next call starts at the leader.
        client.connector().sent.lock().expect("lock").clear();
        client.connector().answers.lock().expect("lock").push_back(Ok(ClientResponse::Write(Ok(APPLIED))));
        client.put("k", "w").await.expect("put");
        assert_eq!(sent_writes(&client)[0].0, node(3));
    }
}
