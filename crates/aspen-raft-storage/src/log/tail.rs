//! The newest log entries, kept in memory as they are appended, so replication and the
//! state machine read what was just written without a trip to redb (a blocking-pool hop,
//! a read transaction, decoding and re-verifying each row's hash). Each keeps its chain
//! hash too, so the hashes consensus compares across nodes are answered from memory.
//!
//! The tail always holds a contiguous run of entries ending at the log's last entry, or
//! nothing. Entries leave it from the front when it outgrows [`MAX_TAIL_ENTRIES`] or
//! [`MAX_TAIL_BYTES`], and from the back when the log is truncated; a read it cannot
//! answer whole goes to redb, which stays the one durable, verified copy.

use std::collections::VecDeque;
use std::ops::{Bound, RangeBounds};

use openraft::entry::RaftEntry;

use super::chain::ChainHash;
use crate::type_config::{Entry, LogId};

/// Most entries kept in memory.
pub const MAX_TAIL_ENTRIES: usize = 4096;
/// Most encoded entry bytes kept in memory.
pub const MAX_TAIL_BYTES: usize = 32 * 1024 * 1024;

/// One entry in the tail.
#[derive(Debug)]
struct Cached {
    entry: Entry,
    /// Encoded size, counted against [`MAX_TAIL_BYTES`].
    size: usize,
    /// The entry's chain hash.
    hash: ChainHash,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Oldest first, indexes consecutive.
    entries: VecDeque<Cached>,
    bytes: usize,
}

impl Tail {
    /// Adds an entry just appended after the current last one; `size` is its encoded size,
    /// `hash` its chain hash. An entry that does not follow on replaces the tail.
    pub(crate) fn push(&mut self, entry: Entry, size: usize, hash: ChainHash) {
        if self.entries.back().is_some_and(|last| last.entry.index() + 1 != entry.index()) {
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back(Cached { entry, size, hash });
        while self.entries.len() > MAX_TAIL_ENTRIES || self.bytes > MAX_TAIL_BYTES {
            let Some(oldest) = self.entries.pop_front() else { break };
            self.bytes -= oldest.size;
        }
    }

    /// Forgets entries at `index` and after (the log is being truncated or overwritten there).
    pub(crate) fn truncate_from(&mut self, index: u64) {
        while self.entries.back().is_some_and(|last| last.entry.index() >= index) {
            if let Some(last) = self.entries.pop_back() {
                self.bytes -= last.size;
            }
        }
    }

    /// Forgets entries up to and including `index` (the log is being purged there).
    pub(crate) fn purge_upto(&mut self, index: u64) {
        while self.entries.front().is_some_and(|first| first.entry.index() <= index) {
            if let Some(first) = self.entries.pop_front() {
                self.bytes -= first.size;
            }
        }
    }

    /// The chain hash of the entry `log_id` names, if the tail holds that entry. Needs no
    /// check against the log's last entry: the tail never holds an entry the log does not,
    /// and the log id (index and term) names one entry.
    pub(crate) fn hash_of(&self, log_id: &LogId) -> Option<ChainHash> {
        let first = self.entries.front()?.entry.index();
        let position = usize::try_from(log_id.index.checked_sub(first)?).ok()?;
        let cached = self.entries.get(position)?;
        (cached.entry.log_id == *log_id).then_some(cached.hash)
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries in `range` if the tail holds every entry of it up to the log's end (a
    /// range reaching past the last entry is answered with what exists, as redb would);
    /// `None` if part of it is older than the tail, or if the tail does not end at
    /// `log_last`, the log's last index as published (mid-write, or after a failed one).
    pub(crate) fn get(&self, range: &impl RangeBounds<u64>, log_last: Option<u64>) -> Option<Vec<Entry>> {
        let last = self.entries.back()?.entry.index();
        if Some(last) != log_last {
            return None;
        }
        let first = self.entries.front()?.entry.index();
        let start = match range.start_bound() {
            Bound::Included(start) => *start,
            Bound::Excluded(start) => start.checked_add(1)?,
            Bound::Unbounded => 0,
        };
        if start < first {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .map(|cached| &cached.entry)
                .take_while(|entry| range.contains(&entry.index()))
                .cloned()
                .collect(),
        )
    }

    #[cfg(test)]
    fn indexes(&self) -> Vec<u64> {
        self.entries.iter().map(|cached| cached.entry.index()).collect()
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;
    use openraft::vote::RaftLeaderIdExt;

    use super::*;
    use crate::type_config::{LogId, TypeConfig};

    fn entry(index: u64) -> Entry {
        let leader = <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(1, 1);
        Entry::new_blank(LogId::new(leader, index))
    }

    fn tail_of(indexes: std::ops::RangeInclusive<u64>) -> Tail {
        let mut tail = Tail::default();
        for index in indexes {
            tail.push(entry(index), 100, hash(index));
        }
        tail
    }

    /// A distinct stand-in hash per index.
    fn hash(index: u64) -> ChainHash {
        let mut hash = [0; 32];
        hash[..8].copy_from_slice(&index.to_le_bytes());
        hash
    }

    fn got(tail: &Tail, range: impl RangeBounds<u64>) -> Option<Vec<u64>> {
        let last = tail.entries.back().map(|cached| cached.entry.index());
        tail.get(&range, last).map(|entries| entries.iter().map(|entry| entry.index()).collect())
    }

    #[test]
    fn answers_ranges_inside_the_tail_and_refuses_older_ones() {
        let tail = tail_of(5..=9);
        assert_eq!(got(&tail, 5..8), Some(vec![5, 6, 7]));
        assert_eq!(got(&tail, 7..), Some(vec![7, 8, 9]));
        assert_eq!(got(&tail, 8..=20), Some(vec![8, 9]), "past the end: what exists, as redb answers");
        assert_eq!(got(&tail, 10..12), Some(vec![]));
        assert_eq!(got(&tail, 4..7), None, "entry 4 is older than the tail");
        assert_eq!(got(&tail, ..7), None);
        assert_eq!(got(&Tail::default(), 1..3), None);
        // A tail that does not end where the log does (a write between the two, or one that
        // failed after trimming the tail) answers nothing.
        assert_eq!(tail.get(&(5..8), Some(10)).map(|entries| entries.len()), None);
        assert_eq!(tail.get(&(5..8), Some(8)).map(|entries| entries.len()), None);
        assert_eq!(tail.get(&(5..8), Some(9)).map(|entries| entries.len()), Some(3));
    }

    #[test]
    fn hashes_are_found_by_log_id_and_only_for_entries_held() {
        let mut tail = tail_of(5..=9);
        assert_eq!(tail.hash_of(&entry(5).log_id), Some(hash(5)));
        assert_eq!(tail.hash_of(&entry(9).log_id), Some(hash(9)));
        assert_eq!(tail.hash_of(&entry(4).log_id), None, "older than the tail");
        assert_eq!(tail.hash_of(&entry(10).log_id), None, "past the end");
        let other_term = LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(2, 1), 7);
        assert_eq!(tail.hash_of(&other_term), None, "same index, another term: another entry");
        tail.truncate_from(8);
        assert_eq!(tail.hash_of(&entry(8).log_id), None);
        tail.purge_upto(6);
        assert_eq!(tail.hash_of(&entry(6).log_id), None);
        assert_eq!(tail.hash_of(&entry(7).log_id), Some(hash(7)));
    }

    #[test]
    fn truncation_purge_and_a_gap_keep_it_contiguous() {
        let mut tail = tail_of(1..=10);
        tail.truncate_from(8);
        assert_eq!(tail.indexes(), (1..=7).collect::<Vec<_>>());
        tail.purge_upto(3);
        assert_eq!(tail.indexes(), (4..=7).collect::<Vec<_>>());
        tail.push(entry(8), 100, hash(8));
        assert_eq!(tail.indexes(), (4..=8).collect::<Vec<_>>());
        // An append that does not follow on (the log moved without the tail) starts over.
        tail.push(entry(20), 100, hash(20));
        assert_eq!(tail.indexes(), vec![20]);
        assert_eq!(got(&tail, 8..9), None);
        assert_eq!(tail.bytes, 100);
    }

    #[test]
    fn stays_within_its_entry_and_byte_limits() {
        let mut tail = Tail::default();
        for index in 1..=(MAX_TAIL_ENTRIES as u64 + 10) {
            tail.push(entry(index), 1, hash(index));
        }
        assert_eq!(tail.entries.len(), MAX_TAIL_ENTRIES);
        assert_eq!(tail.indexes().first(), Some(&11));
        tail.push(entry(MAX_TAIL_ENTRIES as u64 + 11), MAX_TAIL_BYTES, hash(0));
        assert_eq!(tail.indexes(), vec![MAX_TAIL_ENTRIES as u64 + 11], "the byte limit evicts from the front");
        assert_eq!(tail.bytes, MAX_TAIL_BYTES);
    }
}
