//! Comparing this node's log with the leader's, entry by entry, through the hash chain.
//!
//! Each log stores `hash = blake3(prev_hash || index || term || entry_bytes)` for every
//! entry, so equal hashes at one log id mean equal logs up to it. Each node verifies its own
//! chain, which says nothing about whether it matches anyone else's: a follower whose log was
//! rewritten consistently on disk, or that stored something else through a bug, passes its
//! own check. So the leader sends its hash of the entry at `prev_log_id` with every
//! AppendEntries (and of a snapshot's last entry with the snapshot), and the follower compares
//! it with its own before openraft sees the request. Every AppendEntries a follower accepts
//! names an entry it holds (openraft refuses the others), so the check runs on each of them,
//! except at or before the follower's purge point. When the follower already holds some of
//! the request's entries (openraft keeps an entry whose log id matches and does not rewrite
//! it), the follower also computes the leader's hash of the last of those from the request
//! and compares it with its own, so it never acknowledges entries its log holds differently:
//! a divergence is caught by the first request that reaches it.
//!
//! A mismatch is not repaired: the follower records it once, stops accepting entries and
//! snapshots (which would build on, or anchor the chain on, its wrong log) and stops
//! campaigning, until an operator wipes and rejoins it (docs/operations.md). Raft cannot tell
//! which side is wrong: if every follower reports divergence from the same leader, the
//! leader's log is the damaged one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use aspen_api::NodeId;
use aspen_raft_storage::log::ChainHashes;
use aspen_raft_storage::log::chain::{self, ChainHash};
use aspen_raft_storage::{Entry, LogId};
use openraft::entry::RaftEntry;
use serde::{Deserialize, Serialize};

/// This node's log differs from the leader's at an entry both hold under the same log id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error(
    "log diverged from leader {leader}'s at index {index} (term {term}): the leader's chain hash is {}, this node's {}; \
     this node refuses entries until it is wiped and rejoined",
    hex(leader_hash),
    hex(local_hash)
)]
pub struct ChainDivergence {
    /// The leader whose request showed the divergence.
    pub leader: NodeId,
    /// The index both logs hold an entry of the same term at.
    pub index: u64,
    /// That entry's term.
    pub term: u64,
    /// The leader's chain hash there.
    pub leader_hash: ChainHash,
    /// This node's chain hash there.
    pub local_hash: ChainHash,
}

/// What the chain comparisons found, for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainStats {
    /// Comparisons of a leader's chain hash with this log's (matched, or diverged).
    pub checked: u64,
    /// Divergences found: 0 or 1, since the first stops the node accepting entries.
    pub divergences: u64,
    /// The divergence found, if any.
    pub divergence: Option<ChainDivergence>,
}

/// A follower's side of the comparison: this log's hashes and what was found.
pub(crate) struct ChainGuard {
    hashes: ChainHashes,
    diverged: OnceLock<ChainDivergence>,
    checked: AtomicU64,
}

impl ChainGuard {
    /// Compares against the log `hashes` reads.
    pub(crate) fn new(hashes: ChainHashes) -> Self {
        ChainGuard { hashes, diverged: OnceLock::new(), checked: AtomicU64::new(0) }
    }

    /// This log's hashes.
    pub(crate) fn hashes(&self) -> &ChainHashes {
        &self.hashes
    }

    /// The divergence found, once found.
    pub(crate) fn diverged(&self) -> Option<&ChainDivergence> {
        self.diverged.get()
    }

    /// Checks the leader's hash of `prev` (the entry an AppendEntries builds on, or a
    /// snapshot's last entry) against this log's, then the hash of the last of `entries` this
    /// log holds already (under the same log id), which the leader's is computed for from
    /// `prev_hash` and the entries before it. Skipped (`Ok`) where either side has no hash:
    /// the leader purged the entry or its chain is unrooted, or this log does not hold it
    /// (shorter, purged, or another term there: a normal Raft conflict, which openraft
    /// resolves). Once a divergence is found, every later check fails with it.
    pub(crate) fn check_append(
        &self,
        leader: NodeId,
        prev: Option<&LogId>,
        prev_hash: Option<ChainHash>,
        entries: &[Entry],
    ) -> Result<(), ChainDivergence> {
        if let Some(divergence) = self.diverged() {
            return Err(divergence.clone());
        }
        let (Some(prev), Some(prev_hash)) = (prev, prev_hash) else { return Ok(()) };
        // Not held here: openraft refuses the request (or, at or before this log's purge
        // point, takes it as matching, and there is no hash here to compare).
        let Some(local_hash) = self.hashes.hash_at(prev) else { return Ok(()) };
        self.compare(leader, prev, prev_hash, local_hash)?;
        let Some(held_last) = self.hashes.last_index() else { return Ok(()) };
        if entries.first().is_none_or(|first| Some(first.index()) != prev.index.checked_add(1)) {
            return Ok(());
        }
        let held = entries.iter().take_while(|entry| entry.index() <= held_last).count();
        // Usually none (the follower is at `prev`); after a reconnect, the resent ones. The
        // last with a matching log id is enough: equal hashes there mean equal logs up to it.
        for position in (0..held).rev() {
            let at = &entries[position].log_id;
            let Some(local_hash) = self.hashes.hash_at(at) else { continue };
            let leader_hash = match chain::hash_entries(&prev_hash, &entries[..=position]) {
                Ok(Some(hash)) => hash,
                // Entries this node cannot encode fail openraft's append the same way.
                Ok(None) | Err(_) => return Ok(()),
            };
            return self.compare(leader, at, leader_hash, local_hash);
        }
        Ok(())
    }

    /// Records a comparison at `at`, and a divergence if the hashes differ.
    fn compare(
        &self,
        leader: NodeId,
        at: &LogId,
        leader_hash: ChainHash,
        local_hash: ChainHash,
    ) -> Result<(), ChainDivergence> {
        self.checked.fetch_add(1, Ordering::Relaxed);
        if local_hash == leader_hash {
            return Ok(());
        }
        let divergence = ChainDivergence { leader, index: at.index, term: at.leader_id.term, leader_hash, local_hash };
        if self.diverged.set(divergence.clone()).is_ok() {
            tracing::error!(
                leader,
                index = divergence.index,
                term = divergence.term,
                leader_hash = %hex(&leader_hash),
                local_hash = %hex(&local_hash),
                "this node's log diverged from the leader's at index {}; refusing entries and snapshots until it \
                 is wiped and rejoined (docs/operations.md)",
                divergence.index
            );
        }
        Err(self.diverged().cloned().unwrap_or(divergence))
    }

    /// What the comparisons found so far.
    pub(crate) fn stats(&self) -> ChainStats {
        let divergence = self.diverged().cloned();
        ChainStats {
            checked: self.checked.load(Ordering::Relaxed),
            divergences: u64::from(divergence.is_some()),
            divergence,
        }
    }
}

fn hex(hash: &ChainHash) -> String {
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use aspen_raft_storage::{Entry, RedbLogStore};
    use openraft::EntryPayload;

    use super::*;

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(term.into(), index)
    }

    fn entries(count: u64) -> Vec<Entry> {
        (1..=count)
            .map(|index| {
                let command = aspen_api::WriteCommand::Delete { key: index.to_le_bytes().to_vec() };
                Entry { log_id: log_id(2, index), payload: EntryPayload::Normal(command.into()) }
            })
            .collect()
    }

    fn guard_over(dir: &tempfile::TempDir, count: u64) -> (RedbLogStore, ChainGuard) {
        let log = RedbLogStore::open(dir.path().join("log.redb")).expect("open");
        log.append_entries(&entries(count)).expect("append");
        let guard = ChainGuard::new(log.chain_hashes());
        (log, guard)
    }

    impl ChainGuard {
        fn check(&self, leader: NodeId, at: Option<&LogId>, hash: Option<ChainHash>) -> Result<(), ChainDivergence> {
            self.check_append(leader, at, hash, &[])
        }
    }

    #[test]
    fn matching_and_missing_hashes_pass_and_a_mismatch_sticks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, guard) = guard_over(&dir, 5);
        let own = |index| log.hash_at(&log_id(2, index)).expect("hash_at").expect("held");
        assert_eq!(guard.check(1, Some(&log_id(2, 3)), Some(own(3))), Ok(()));
        // Nothing to compare: no prev entry, no leader hash, not held here, another term.
        assert_eq!(guard.check(1, None, Some(own(3))), Ok(()));
        assert_eq!(guard.check(1, Some(&log_id(2, 3)), None), Ok(()));
        assert_eq!(guard.check(1, Some(&log_id(2, 9)), Some([1; 32])), Ok(()));
        assert_eq!(guard.check(1, Some(&log_id(1, 3)), Some([1; 32])), Ok(()));
        assert_eq!(guard.stats(), ChainStats { checked: 1, divergences: 0, divergence: None });

        let found = guard.check(7, Some(&log_id(2, 4)), Some([1; 32])).expect_err("a different hash diverges");
        let expected = ChainDivergence { leader: 7, index: 4, term: 2, leader_hash: [1; 32], local_hash: own(4) };
        assert_eq!(found, expected);
        assert!(found.to_string().contains("at index 4"), "{found}");
        // From then on every request is refused with the first divergence, even a matching one.
        assert_eq!(guard.check(1, Some(&log_id(2, 3)), Some(own(3))), Err(expected.clone()));
        assert_eq!(guard.check(1, None, None), Err(expected.clone()));
        assert_eq!(guard.stats(), ChainStats { checked: 2, divergences: 1, divergence: Some(expected) });
    }

    /// A follower that holds some of the request's entries already acknowledges them without
    /// openraft rewriting them: the check covers them, not only the entry before them.
    #[test]
    fn entries_the_follower_holds_already_are_compared_too() {
        let leader_dir = tempfile::tempdir().expect("tempdir");
        let (leader, _) = guard_over(&leader_dir, 8);
        let sent = entries(8);
        let prev = log_id(2, 2);
        let prev_hash = leader.hash_at(&prev).expect("hash_at");

        // Holds 1..=6 as the leader does: passes, comparing at 2 and at 6.
        let same_dir = tempfile::tempdir().expect("tempdir");
        let (_same, same) = guard_over(&same_dir, 6);
        assert_eq!(same.check_append(1, Some(&prev), prev_hash, &sent[2..]), Ok(()));
        assert_eq!(same.stats().checked, 2);

        // Holds 1..=6 with entry 4 rewritten (and the chain after it recomputed): entry 2
        // matches, entry 6 does not.
        let forged_dir = tempfile::tempdir().expect("tempdir");
        let (forged_log, forged) = guard_over(&forged_dir, 6);
        let mut other = sent[3].clone();
        other.payload = EntryPayload::Blank;
        assert!(forged_log.rewrite_entry(other).expect("rewrite"));
        assert_eq!(forged.check(1, Some(&prev), prev_hash), Ok(()), "the entry before the request matches");
        let divergence = forged.check_append(1, Some(&prev), prev_hash, &sent[2..]).expect_err("diverged");
        assert_eq!(
            (divergence.index, divergence.leader_hash),
            (6, leader.hash_at(&log_id(2, 6)).expect("hash_at").expect("held"))
        );
    }
}
