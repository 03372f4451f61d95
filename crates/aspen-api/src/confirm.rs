//! Client-confirmed linearizable reads (ADR 0004).
//!
//! A ReadIndex read is a leader read plus a quorum confirming, after the read began, that
//! no newer term exists. The leader usually gathers that quorum itself, one network round
//! trip after the client's request arrives. Here the client gathers it, in parallel with the
//! read: it sends [`ClientRequest::StampedGet`](crate::ClientRequest::StampedGet) (or
//! `StampedScan`) to the leader and [`ClientRequest::Term`](crate::ClientRequest::Term) to enough other voters at
//! the same time. The leader checks, inside its Raft core, that it leads `term` and has
//! committed an entry of that term, serves the read at its commit index and returns a
//! [`LeaderStamp`]. Each other voter reports its current term, also read inside its Raft
//! core. If the leader and voters reporting a term `<= stamp.term` form a majority of every
//! voter set, no leader of a newer term had been elected when the read began (it would need
//! a majority that voted in that term, and terms never go down), so the leader's state held
//! every write acknowledged before the read: the read is linearizable. No clocks are trusted.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::cluster::NodeId;
use crate::limits::MAX_PEERS;

/// What a leader attaches to a read it served for the client to confirm.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStamp {
    /// The leader that served the read.
    pub leader: NodeId,
    /// The term it led when it served the read.
    pub term: u64,
    /// Its voter sets (two during a joint membership change); a majority of each confirms.
    pub voters: Vec<BTreeSet<NodeId>>,
}

/// A node's current term, for a client confirming a [`LeaderStamp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermReply {
    /// The node answering.
    pub node: NodeId,
    /// The highest term it has seen (voted in or followed).
    pub term: u64,
}

/// The answer to a stamped read (a get or a scan).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped<T> {
    /// The read.
    pub response: T,
    /// `Some`: linearizable once confirmed by the client. `None`: the node ran a full
    /// ReadIndex round itself (it could not stamp the read), so it is linearizable as is.
    pub stamp: Option<LeaderStamp>,
}

impl LeaderStamp {
    /// Whether the leader and the voters in `replies` whose term is not above the stamp's
    /// form a majority of every voter set. Replies from nodes outside the sets count for
    /// nothing; an empty or oversized membership confirms nothing.
    pub fn confirmed_by(&self, replies: &[TermReply]) -> bool {
        if self.voters.is_empty() || self.voters.iter().any(|set| set.is_empty() || set.len() > MAX_PEERS) {
            return false;
        }
        let agreeing: BTreeSet<NodeId> = replies
            .iter()
            .filter(|reply| reply.term <= self.term)
            .map(|reply| reply.node)
            .chain(std::iter::once(self.leader))
            .collect();
        self.voters.iter().all(|set| set.iter().filter(|id| agreeing.contains(id)).count() * 2 > set.len())
    }

    /// The fewest voters other than the leader whose agreement confirms a read: for each
    /// voter set, the lowest-numbered ones until, with the leader and those already
    /// chosen, they make a majority.
    pub fn followers_to_ask(&self) -> BTreeSet<NodeId> {
        let mut chosen = BTreeSet::new();
        for set in &self.voters {
            let majority = set.len() / 2 + 1;
            let mut have = set.iter().filter(|id| **id == self.leader || chosen.contains(*id)).count();
            for id in set {
                if have >= majority {
                    break;
                }
                if *id != self.leader && chosen.insert(*id) {
                    have += 1;
                }
            }
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(leader: NodeId, term: u64, voters: &[&[NodeId]]) -> LeaderStamp {
        LeaderStamp { leader, term, voters: voters.iter().map(|set| set.iter().copied().collect()).collect() }
    }

    fn reply(node: NodeId, term: u64) -> TermReply {
        TermReply { node, term }
    }

    #[test]
    fn three_voters_need_one_follower_at_or_below_the_term() {
        let read = stamp(1, 5, &[&[1, 2, 3]]);
        assert!(!read.confirmed_by(&[]), "the leader alone is not a majority of three");
        assert!(read.confirmed_by(&[reply(2, 5)]));
        assert!(read.confirmed_by(&[reply(3, 4)]), "a follower behind the term has voted in no newer one");
        assert!(!read.confirmed_by(&[reply(2, 6)]), "a follower in a newer term may have elected a new leader");
        assert!(read.confirmed_by(&[reply(2, 6), reply(3, 5)]));
        assert!(!read.confirmed_by(&[reply(9, 5)]), "a non-voter confirms nothing");
        assert_eq!(read.followers_to_ask(), BTreeSet::from([2]));
    }

    #[test]
    fn a_single_voter_confirms_itself_and_five_need_two_more() {
        let alone = stamp(7, 1, &[&[7]]);
        assert!(alone.confirmed_by(&[]));
        assert!(alone.followers_to_ask().is_empty());
        let five = stamp(3, 2, &[&[1, 2, 3, 4, 5]]);
        assert!(!five.confirmed_by(&[reply(1, 2)]));
        assert!(five.confirmed_by(&[reply(1, 2), reply(5, 1)]));
        assert_eq!(five.followers_to_ask(), BTreeSet::from([1, 2]));
    }

    #[test]
    fn a_joint_membership_needs_a_majority_of_both_sets() {
        let joint = stamp(1, 3, &[&[1, 2, 3], &[1, 4, 5]]);
        assert!(!joint.confirmed_by(&[reply(2, 3)]), "no majority of the new set");
        assert!(!joint.confirmed_by(&[reply(4, 3)]), "no majority of the old set");
        assert!(joint.confirmed_by(&[reply(2, 3), reply(4, 3)]));
        let ask = joint.followers_to_ask();
        assert_eq!(ask, BTreeSet::from([2, 4]));
        let replies: Vec<TermReply> = ask.iter().map(|node| reply(*node, 3)).collect();
        assert!(joint.confirmed_by(&replies), "asking the chosen followers is always enough");
        // A leader outside the new set (it is being removed) still needs majorities of both.
        let leaving = stamp(1, 3, &[&[1, 2, 3], &[2, 3, 4]]);
        let ask = leaving.followers_to_ask();
        let replies: Vec<TermReply> = ask.iter().map(|node| reply(*node, 3)).collect();
        assert!(leaving.confirmed_by(&replies));
        assert!(!leaving.confirmed_by(&[reply(2, 3)]));
    }

    #[test]
    fn an_empty_membership_confirms_nothing() {
        assert!(!stamp(1, 1, &[]).confirmed_by(&[reply(2, 1)]));
        assert!(!stamp(1, 1, &[&[]]).confirmed_by(&[reply(2, 1)]));
    }
}
