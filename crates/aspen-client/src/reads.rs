//! Linearizable reads confirmed by the client (ADR 0004): the stamped read goes to the
//! leader and, at the same time, a term check to enough other voters; when they confirm
//! the leader's stamp the read is linearizable one round trip sooner than a ReadIndex round
//! run by the leader. Any doubt falls back to that round.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use aspen_api::rounds::SharedRounds;
use aspen_api::{
    ClientRequest, ClientResponse, ClusterStatus, GetRequest, GetResponse, KvError, LeaderStamp, Liveness, NodeId,
    ReadConsistency, ScanRequest, ScanResponse, Stamped, TermReply,
};

use crate::connector::{ClientConnector, ClientPeer, Reachability};
use crate::{Client, ClientError, STAMPED_READ_TIMEOUT, TERM_CONFIRM_TIMEOUT, rt};

/// How long a voter that did not confirm a read is asked no more, when others can be.
const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// Shortest pause between two status calls made to learn whom to ask.
const READ_QUORUM_RELEARN: Duration = Duration::from_secs(1);
/// Longest pause between them: it doubles after each stamped read that could not reach the
/// leader (a leader address this client cannot dial costs one failed read per pause).
const MAX_READ_QUORUM_RELEARN: Duration = Duration::from_secs(32);

/// Whom a client-confirmed read goes to.
struct ReadQuorum<P> {
    /// The leader as last seen, and its address.
    leader_id: NodeId,
    leader: P,
    /// The voters whose terms are asked, with their addresses.
    ask: Vec<(NodeId, P)>,
    /// Term rounds, shared by the reads that began before each round.
    terms: SharedRounds<Arc<Vec<TermReply>>>,
    /// Whether a read was confirmed through this quorum yet.
    confirmed_once: AtomicBool,
}

/// What the client knows about whom to ask.
pub(crate) struct QuorumCache<P> {
    current: Option<Arc<ReadQuorum<P>>>,
    /// No status call to learn whom to ask before this.
    relearn_after: Option<Instant>,
    /// Stamped reads in a row that could not reach the leader.
    unreachable: u32,
    /// Voters that recently failed to confirm, and until when they are passed over.
    suspects: BTreeMap<NodeId, Instant>,
}

impl<P> Default for QuorumCache<P> {
    fn default() -> Self {
        QuorumCache { current: None, relearn_after: None, unreachable: 0, suspects: BTreeMap::new() }
    }
}

impl<C: ClientConnector> Client<C> {
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
        let read = rt::timeout(STAMPED_READ_TIMEOUT, self.call_node(&quorum.leader, request));
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
        // Deliberate bug for the simulator's self-test (`cargo xtask sim --bug
        // unconfirmed-read`): the leader's stamp is trusted without the voters' terms, so a
        // deposed leader's read passes. Never in real builds.
        let confirmed = cfg!(feature = "sim-bug-unconfirmed-read") || stamp.confirmed_by(&replies);
        if stamp.leader == quorum.leader_id && confirmed {
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
    async fn term_round(&self, quorum: &ReadQuorum<C::Peer>) -> Result<Arc<Vec<TermReply>>, KvError> {
        let calls = quorum.ask.iter().map(|(id, addr)| async move {
            let call = rt::timeout(TERM_CONFIRM_TIMEOUT, self.call_node(addr, ClientRequest::Term));
            match call.await {
                Ok(Ok(ClientResponse::Term(Ok(reply)))) if reply.node == *id => Some(reply),
                _ => None,
            }
        });
        Ok(Arc::new(futures::future::join_all(calls).await.into_iter().flatten().collect()))
    }

    fn quorum_cache(&self) -> MutexGuard<'_, QuorumCache<C::Peer>> {
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
    async fn read_quorum(&self) -> Option<Arc<ReadQuorum<C::Peer>>> {
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
            let Ok(addr) = node.addr.parse::<C::Peer>() else { continue };
            let reachability = match self.connector.reachability(&addr) {
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
}

/// Whom to ask for reads confirmed against `status`'s leader: the fewest other voters that
/// make a majority with it, those with the lowest `rank` first (likeliest to answer at once;
/// a voter missing from it ranks 0).
fn read_quorum_from<P: ClientPeer>(status: &ClusterStatus, rank: &BTreeMap<NodeId, u8>) -> Option<ReadQuorum<P>> {
    let leader_id = status.leader?;
    let addr = |id: NodeId| -> Option<P> {
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
    use std::collections::BTreeSet;
    use std::net::SocketAddr;

    use aspen_api::ClusterNode;

    use super::*;

    fn status_of_five() -> ClusterStatus {
        let addr = |id: u8| format!("10.0.0.{id}:7000");
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
            let quorum: ReadQuorum<SocketAddr> =
                read_quorum_from(&status, &rank.iter().copied().collect()).expect("a quorum");
            quorum.ask.iter().map(|(id, _)| *id).collect()
        };
        // Two followers make a majority of five with the leader; among equals, the lowest ids.
        assert_eq!(asked(&[]), vec![2, 3]);
        // Known down (4), suspected (3) and still dialing (2) go after connected ones.
        assert_eq!(asked(&[(2, 2), (3, 3), (4, 4), (5, 0)]), vec![5, 2]);
        assert_eq!(asked(&[(2, 4), (3, 4), (4, 1)]), vec![5, 4]);
    }
}
