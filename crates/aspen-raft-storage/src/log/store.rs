use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

use aspen_api::limits::{MAX_BATCH_SIZE, MAX_ENTRY_SIZE};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;

use super::chain::{self, ChainHash, GENESIS};
use super::journal::{self, Journal, JournalFile, Plan};
use super::tail::Tail;
use crate::close::{CloseSignal, CloseWatch};
use crate::error::{LogStoreError, redb_error};
use crate::timings::DiskTimings;
use crate::type_config::{Entry, LogId, TypeConfig, Vote};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("raft_log_meta");

const META_VOTE: &[u8] = b"vote";
const META_COMMITTED: &[u8] = b"committed";
const META_PURGED: &[u8] = b"purged";
/// Whether the chain is rooted (see [`RedbLogStore::hash_at`]): written with every purge.
const META_ROOTED: &[u8] = b"chain_rooted";
/// The last journal record a durable commit covers (see `journal`).
const META_JOURNAL_SEQ: &[u8] = b"journal_seq";

/// Most appends waiting for the group fsync. Each holds only openraft's completion callback
/// (the entries are already in the journal); a full queue makes the next append wait, which pushes
/// back on openraft.
pub const MAX_PENDING_FLUSHES: usize = 1024;

/// The hash-chained redb Raft log. Cheap to clone: clones share one database.
#[derive(Clone)]
pub struct RedbLogStore {
    shared: Arc<Shared>,
}

struct Shared {
    db: Database,
    /// What the chain needs to extend and verify itself, cached from disk. Updated only
    /// after the transaction that changes it has committed.
    state: Mutex<ChainState>,
    /// Serializes writes (see [`Shared::writing`]); guards the journal's write cursor.
    write_lock: Mutex<Journal>,
    /// Serializes durable redb commits (redb has one write transaction at a time): taken
    /// after the write lock by writers, alone by a checkpoint running off the write lock.
    commit_lock: Mutex<()>,
    /// The journal's files, synced without the write lock.
    journal_files: [JournalFile; 2],
    /// The last journal record a durable redb commit covers.
    durable_seq: AtomicU64,
    /// Rows appended since the last durable redb commit (a checkpoint): in the journal and
    /// here. Contiguous and ending at the last entry; bounded by the journal's checkpoint
    /// limits. Reads take rows from here and only those below the first from redb: a
    /// checkpoint off the write lock commits a prefix of them to redb before removing it
    /// here.
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
    /// The prefix of `pending` a checkpoint off the write lock is to commit, if one is due.
    sealed: Mutex<Option<Sealed>>,
    /// The newest entries in memory. Entries enter it after the append that stores them and
    /// leave it before the commit that removes them, so it never holds one the log does not;
    /// reads use it only while it ends at the published last entry.
    tail: Mutex<Tail>,
    /// The leader's hash of the last entry of a snapshot about to be installed (see
    /// [`RedbLogStore::expect_snapshot_anchor`]).
    snapshot_anchor: Mutex<Option<(LogId, ChainHash)>>,
    /// The group-commit queue of appends waiting for their fsync, started on first use.
    flusher: OnceLock<mpsc::Sender<IOFlushed<TypeConfig>>>,
    /// Callbacks handed to the flusher and not yet completed.
    flushes_pending: AtomicUsize,
    /// Whether this node leads (see [`RedbLogStore::leader_switch`]).
    leading: Arc<AtomicBool>,
    /// How long journal syncs and durable commits take (see [`RedbLogStore::disk_timings`]).
    timings: Arc<DiskTimings>,
    /// Set once everything above is dropped. Declared last: fields drop in declaration
    /// order, so `db` (whose drop releases the file lock) is gone by then. Pending rows are
    /// not written on close: they are in the journal, which the next open replays.
    closed: CloseSignal,
}

/// Rows whose journal file was left at a switch, to be committed off the write lock.
#[derive(Clone, Copy, Debug)]
struct Sealed {
    /// How many rows at the front of `pending`.
    rows: usize,
    /// The last journal record holding them.
    seq: u64,
}

/// A durable redb commit in progress: its transaction and the commit lock.
struct Checkpoint<'a> {
    txn: redb::WriteTransaction,
    _commit: MutexGuard<'a, ()>,
}

#[derive(Clone, Debug, Default)]
struct ChainState {
    /// Last entry and its hash.
    last: Option<(LogId, ChainHash)>,
    /// Last purged log id.
    purged: Option<LogId>,
    /// The hash the first stored entry chains from: GENESIS, or the purge point's hash.
    anchor: ChainHash,
    /// Whether `anchor` is the hash every node's chain has at the purge point (GENESIS, a
    /// stored entry's hash, or the leader's hash received with a snapshot), so this log's
    /// hashes can be compared with other nodes'. A purge past every entry without the
    /// leader's hash anchors the chain on a hash of the purge point alone, and the log is
    /// unrooted until a later snapshot install brings the leader's hash again.
    rooted: bool,
    vote: Option<Vote>,
    /// The latest committed log id openraft reported.
    committed: Option<LogId>,
    /// The committed log id as last written to redb: `committed` rides along with the next
    /// checkpoint rather than paying for a transaction of its own.
    committed_stored: Option<LogId>,
}

/// What [`RedbLogStore::verify`] found: the log's bounds after a full chain check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSummary {
    /// Last purged log id.
    pub purged: Option<LogId>,
    /// Last entry's log id.
    pub last: Option<LogId>,
    /// Number of stored entries.
    pub entries: u64,
    /// Hash of the last entry (or the anchor when the log is empty).
    pub last_hash: ChainHash,
}

/// Tells when the log's database is closed (see [`crate::close`]).
pub type LogStoreWatch = CloseWatch;

/// Sets whether the node leads (see [`RedbLogStore::leader_switch`]).
#[derive(Clone, Debug)]
pub struct LeaderSwitch {
    leading: Weak<AtomicBool>,
}

impl LeaderSwitch {
    /// Records the role; `false` once the log is closed (the switch has nothing to set).
    pub fn set(&self, leading: bool) -> bool {
        match self.leading.upgrade() {
            Some(flag) => {
                flag.store(leading, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// See [`RedbLogStore::chain_hashes`].
#[derive(Clone, Debug)]
pub struct ChainHashes {
    shared: Weak<Shared>,
}

impl ChainHashes {
    /// [`RedbLogStore::hash_at`]; `None` also when the log is closed or cannot be read
    /// (the comparison is skipped, and the failure is the reader's to report).
    pub fn hash_at(&self, log_id: &LogId) -> Option<ChainHash> {
        let shared = self.shared.upgrade()?;
        match shared.hash_at(log_id) {
            Ok(hash) => hash,
            Err(error) => {
                tracing::warn!(%error, index = log_id.index, "could not read the log's chain hash");
                None
            }
        }
    }

    /// The index of the log's last entry, if it holds any (`None` also once closed).
    pub fn last_index(&self) -> Option<u64> {
        let shared = self.shared.upgrade()?;
        shared.lock().last.map(|(log_id, _)| log_id.index)
    }

    /// [`RedbLogStore::expect_snapshot_anchor`]; does nothing once the log is closed.
    pub fn expect_snapshot_anchor(&self, last: LogId, leader_hash: ChainHash) {
        if let Some(shared) = self.shared.upgrade() {
            shared.expect_snapshot_anchor(last, leader_hash);
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbLogShared").finish_non_exhaustive()
    }
}

impl RedbLogStore {
    /// A watch that tells when this log's database is closed.
    pub fn watch(&self) -> LogStoreWatch {
        self.shared.closed.watch()
    }

    /// Opens (or creates) the log at `path` and verifies the whole hash chain.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LogStoreError> {
        let path = path.as_ref();
        // redb panics on some kinds of damage (e.g. invalid UTF-8 in its table directory);
        // a damaged file must be a typed error, never a crashed node.
        std::panic::catch_unwind(|| Self::open_unchecked(path)).unwrap_or_else(|panic| {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|message| message.to_string()))
                .unwrap_or_else(|| "redb panicked".into());
            Err(LogStoreError::Corrupted { path: path.display().to_string(), reason })
        })
    }

    fn open_unchecked(path: &Path) -> Result<Self, LogStoreError> {
        let db = Database::create(path).map_err(redb_error)?;
        let txn = db.begin_write().map_err(redb_error)?;
        txn.open_table(ENTRIES).map_err(redb_error)?;
        let checkpointed_seq: u64 =
            read_meta(&txn.open_table(META).map_err(redb_error)?, META_JOURNAL_SEQ)?.unwrap_or(0);
        let (mut journal, replay) = match Journal::open(&journal::journal_paths(path), checkpointed_seq) {
            Ok(opened) => opened,
            // The damaged record is the first after the checkpoint: the entries before it are
            // redb's. The transaction is dropped uncommitted: the log stays as it was.
            Err(LogStoreError::JournalCorrupt {
                path,
                offset,
                sequence,
                first_index: None,
                last_good_index: None,
                reason,
            }) => {
                let last_good_index = last_stored_index(&txn)?;
                return Err(LogStoreError::JournalCorrupt {
                    path,
                    offset,
                    sequence,
                    first_index: last_good_index.and_then(|index| index.checked_add(1)),
                    last_good_index,
                    reason,
                });
            }
            Err(error) => return Err(error),
        };
        if !replay.is_empty() {
            // Appends the journal made durable that redb's durable state lacks, replayed
            // in order; the chain check below verifies the result.
            let mut table = txn.open_table(ENTRIES).map_err(redb_error)?;
            for record in &replay {
                let Some((first, _)) = record.rows.first() else { continue };
                remove_range(&mut table, *first..)?;
                for (index, row) in &record.rows {
                    table.insert(*index, row.as_slice()).map_err(redb_error)?;
                }
            }
            tracing::info!(records = replay.len(), "replayed the log journal");
        }
        commit_durable(txn, &mut journal)?;
        let shared = Shared {
            db,
            state: Mutex::new(ChainState::default()),
            commit_lock: Mutex::new(()),
            journal_files: journal.files(),
            durable_seq: AtomicU64::new(journal.last_seq()),
            pending: Mutex::new(Vec::new()),
            sealed: Mutex::new(None),
            tail: Mutex::new(Tail::default()),
            snapshot_anchor: Mutex::new(None),
            write_lock: Mutex::new(journal),
            flusher: OnceLock::new(),
            flushes_pending: AtomicUsize::new(0),
            leading: Arc::new(AtomicBool::new(true)),
            timings: Arc::new(DiskTimings::default()),
            closed: CloseSignal::default(),
        };
        let state = shared.load_and_verify()?.0;
        *shared.lock() = state;
        Ok(RedbLogStore { shared: Arc::new(shared) })
    }

    /// How long this log's journal syncs and durable commits have taken, for metrics.
    pub fn disk_timings(&self) -> Arc<DiskTimings> {
        Arc::clone(&self.shared.timings)
    }

    /// Re-reads the log from disk and verifies every entry's hash and decoding.
    pub fn verify(&self) -> Result<LogSummary, LogStoreError> {
        Ok(self.shared.load_and_verify()?.1)
    }

    /// Raw access for tests that simulate corruption: overwrites the stored row of `index`.
    #[doc(hidden)]
    pub fn overwrite_raw_row(&self, index: u64, row: &[u8]) -> Result<(), LogStoreError> {
        let mut journal = self.shared.writing();
        // Reads must see the damage, not the good copy in memory.
        self.shared.tail().clear();
        let checkpoint = self.shared.begin_checkpoint()?;
        checkpoint.txn.open_table(ENTRIES).map_err(redb_error)?.insert(index, row).map_err(redb_error)?;
        self.shared.commit_checkpoint(checkpoint, &mut journal)
    }

    /// For tests of a log that diverged from the cluster's: replaces the entry at `entry`'s
    /// index with `entry` and appends the entries after it again, so the chain is recomputed
    /// and verifies while no other node's log matches it. `false` when the log holds no
    /// entry there.
    #[doc(hidden)]
    pub fn rewrite_entry(&self, entry: Entry) -> Result<bool, LogStoreError> {
        let index = entry.index();
        let mut entries = self.read_entries(index..)?;
        let Some(first) = entries.first_mut() else { return Ok(false) };
        *first = entry;
        let before = match index.checked_sub(1) {
            Some(before) => self.read_entries(before..index)?.first().map(|entry| entry.log_id),
            None => None,
        };
        self.truncate_entries_after(before.or(self.log_state().last_purged_log_id))?;
        for batch in entries.chunks(MAX_BATCH_SIZE) {
            self.append_entries(batch)?;
        }
        Ok(true)
    }

    /// Raw access for tests that simulate corruption: the stored row of `index` (pending or
    /// in redb).
    #[doc(hidden)]
    pub fn read_raw_row(&self, index: u64) -> Result<Option<Vec<u8>>, LogStoreError> {
        let pending = self.shared.pending();
        if let Some((_, row)) = pending.iter().find(|(pending_index, _)| *pending_index == index) {
            return Ok(Some(row.clone()));
        }
        let txn = self.shared.db.begin_read().map_err(redb_error)?;
        drop(pending);
        let table = txn.open_table(ENTRIES).map_err(redb_error)?;
        Ok(table.get(index).map_err(redb_error)?.map(|row| row.value().to_vec()))
    }

    /// For tests of a checkpoint caught mid-way: holds off every durable redb commit
    /// (including the checkpoint of a journal file appends have left) until dropped. An
    /// append that must commit under the write lock meanwhile waits for it.
    #[doc(hidden)]
    pub fn hold_commits(&self) -> impl Drop + '_ {
        self.shared.commit_lock()
    }

    /// Appends entries durably (a journal record and its fsync, or a durable redb commit
    /// when a checkpoint is due) and extends the chain.
    pub fn append_entries(&self, entries: &[Entry]) -> Result<(), LogStoreError> {
        self.shared.append(entries, true, false)
    }

    /// A switch that tells the store whether this node leads, which picks how
    /// `RaftLogStorage::append` makes entries durable. A leader's append returns before its
    /// fsync (the flusher does it, for many appends at once) so replication starts at once.
    /// A follower's appends arrive one AppendEntries at a time and are acknowledged only
    /// once durable, so each syncs the journal itself rather than waiting for a flusher
    /// round. A stale value costs speed, never safety: both ways complete the
    /// callback only after the fsync. New stores behave as leaders. The switch does not
    /// keep the database open.
    pub fn leader_switch(&self) -> LeaderSwitch {
        LeaderSwitch { leading: Arc::downgrade(&self.shared.leading) }
    }

    /// Makes every earlier append durable (one fsync, however many appends it covers).
    pub fn sync(&self) -> Result<(), LogStoreError> {
        self.shared.sync()
    }

    /// Entries in `range`, verified against the chain.
    pub fn read_entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, LogStoreError> {
        self.shared.read(range)
    }

    /// Removes every entry after `last_kept` (all entries for `None`).
    pub fn truncate_entries_after(&self, last_kept: Option<LogId>) -> Result<(), LogStoreError> {
        self.shared.truncate_after(last_kept)
    }

    /// Removes every entry up to and including `upto`, keeping the chain's anchor.
    pub fn purge_entries_upto(&self, upto: LogId) -> Result<(), LogStoreError> {
        self.shared.purge(upto)
    }

    /// Durably records a vote.
    pub fn save_vote_now(&self, vote: &Vote) -> Result<(), LogStoreError> {
        self.shared.save_vote(vote)
    }

    /// The chain hash of the entry `log_id` names (same index and term), for comparing this
    /// log with another node's: equal hashes at one log id mean equal logs up to it. `None`
    /// when the log does not hold that entry (shorter, purged before it, or another term
    /// there), except that the purge point itself answers with the chain's anchor; and
    /// `None` while the chain is unrooted (anchored on a purge point alone after a snapshot
    /// install without the leader's hash), whose hashes no other node shares. Cheap: the
    /// last entry, the purge point and the in-memory tail answer without I/O, older
    /// entries with one redb point read (no chain verification: that is `read_entries`).
    pub fn hash_at(&self, log_id: &LogId) -> Result<Option<ChainHash>, LogStoreError> {
        self.shared.hash_at(log_id)
    }

    /// Records the leader's chain hash at `last`, the last entry of a snapshot about to be
    /// installed. If the install purges the log past every entry it holds, the chain is
    /// anchored on this hash (and rooted) instead of a hash of the purge point alone, so the
    /// entries appended after it keep the same hashes as on the leader.
    pub fn expect_snapshot_anchor(&self, last: LogId, leader_hash: ChainHash) {
        self.shared.expect_snapshot_anchor(last, leader_hash);
    }

    /// A handle to [`RedbLogStore::hash_at`] and [`RedbLogStore::expect_snapshot_anchor`]
    /// that does not keep the database open, for consensus's network and RPC handling.
    pub fn chain_hashes(&self) -> ChainHashes {
        ChainHashes { shared: Arc::downgrade(&self.shared) }
    }

    /// The purge point and last log id.
    pub fn log_state(&self) -> LogState<TypeConfig> {
        let state = self.shared.lock();
        let last = state.last.as_ref().map(|(log_id, _)| *log_id).or(state.purged);
        LogState { last_purged_log_id: state.purged, last_log_id: last }
    }
}

impl Shared {
    /// Held from reading the cached state to publishing it, by every write: the flusher's
    /// sync runs concurrently with openraft's log calls.
    fn writing(&self) -> MutexGuard<'_, Journal> {
        self.write_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, Vec<(u64, Vec<u8>)>> {
        // Changed only by writers holding the write lock, each change whole (extend, clear,
        // truncate), so a poisoned lock still holds a consistent run of rows.
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn commit_lock(&self) -> MutexGuard<'_, ()> {
        self.commit_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sealed(&self) -> MutexGuard<'_, Option<Sealed>> {
        self.sealed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A write transaction for a durable commit, holding the pending rows already, so the
    /// caller's changes (truncation, purge) apply on top of them. Caller holds the write lock
    /// and finishes with [`Shared::commit_checkpoint`]; a checkpoint running off the write
    /// lock finishes first.
    fn begin_checkpoint(&self) -> Result<Checkpoint<'_>, LogStoreError> {
        let commit = self.commit_lock();
        let txn = self.db.begin_write().map_err(redb_error)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(redb_error)?;
            for (index, row) in self.pending().iter() {
                table.insert(*index, row.as_slice()).map_err(redb_error)?;
            }
        }
        Ok(Checkpoint { txn, _commit: commit })
    }

    /// Commits a [`Shared::begin_checkpoint`] transaction durably: redb now holds every
    /// journaled row, so the journal starts over and nothing is pending or sealed.
    fn commit_checkpoint(&self, checkpoint: Checkpoint<'_>, journal: &mut Journal) -> Result<(), LogStoreError> {
        let started = Instant::now();
        commit_durable(checkpoint.txn, journal)?;
        self.timings.log_committed(started.elapsed());
        self.durable_seq.fetch_max(journal.last_seq(), Ordering::AcqRel);
        self.pending().clear();
        *self.sealed() = None;
        Ok(())
    }

    /// Commits the sealed rows (those of the journal file appends just left) to redb
    /// durably, without the write lock: appends go on into the other file meanwhile. Does
    /// nothing if a durable commit under the write lock took them first. On failure the
    /// rows stay pending and journaled; the next full file checkpoints under the lock.
    fn checkpoint_sealed(&self) -> Result<(), LogStoreError> {
        let _commit = self.commit_lock();
        let Some(sealed) = *self.sealed() else { return Ok(()) };
        let result = self.commit_sealed(sealed);
        *self.sealed() = None;
        result
    }

    fn commit_sealed(&self, sealed: Sealed) -> Result<(), LogStoreError> {
        // Copied out so reads need not wait for the commit; appends only add rows after them.
        let rows: Vec<(u64, Vec<u8>)> = self.pending().get(..sealed.rows).map(<[_]>::to_vec).unwrap_or_default();
        let Some((last_index, last_row)) = rows.last() else { return Ok(()) };
        let txn = self.db.begin_write().map_err(redb_error)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(redb_error)?;
            for (index, row) in &rows {
                table.insert(*index, row.as_slice()).map_err(redb_error)?;
            }
            let mut meta = txn.open_table(META).map_err(redb_error)?;
            write_meta(&mut meta, META_JOURNAL_SEQ, &sealed.seq)?;
            // The committed log id rides along, but never past these rows (the rows after
            // them may not be durable yet): beyond them, the last of them is committed too.
            if let Some(committed) = self.lock().committed {
                let stored = match chain::decode_row(last_row) {
                    Some(row) if committed.index > *last_index => LogId::new(row.term.into(), *last_index),
                    _ => committed,
                };
                if stored.index <= *last_index {
                    write_meta(&mut meta, META_COMMITTED, &Some(stored))?;
                }
            }
        }
        let started = Instant::now();
        txn.commit().map_err(redb_error)?;
        self.timings.log_committed(started.elapsed());
        self.durable_seq.fetch_max(sealed.seq, Ordering::AcqRel);
        // Readers take redb only below the first pending row, so the committed rows are
        // read from one place at any moment.
        self.pending().drain(..rows.len());
        Ok(())
    }

    /// Publishes the state a write committed, keeping the committed log id openraft may
    /// have reported meanwhile (it is recorded without the write lock).
    fn publish(&self, state: ChainState) {
        let mut current = self.lock();
        let committed = current.committed;
        *current = state;
        current.committed = committed;
    }

    fn snapshot_anchor(&self) -> MutexGuard<'_, Option<(LogId, ChainHash)>> {
        // Only a hint, replaced whole.
        self.snapshot_anchor.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn expect_snapshot_anchor(&self, last: LogId, leader_hash: ChainHash) {
        *self.snapshot_anchor() = Some((last, leader_hash));
    }

    fn hash_at(&self, log_id: &LogId) -> Result<Option<ChainHash>, LogStoreError> {
        let (rooted, last, purged, anchor) = {
            let state = self.lock();
            (state.rooted, state.last, state.purged, state.anchor)
        };
        if !rooted {
            return Ok(None);
        }
        // Replication and heartbeats mostly name the last entry.
        if let Some((last, hash)) = last
            && last == *log_id
        {
            return Ok(Some(hash));
        }
        if purged == Some(*log_id) {
            return Ok(Some(anchor));
        }
        let held = purged.is_none_or(|purged| log_id.index > purged.index)
            && last.is_some_and(|(last, _)| log_id.index < last.index);
        if !held {
            return Ok(None);
        }
        if let Some(hash) = self.tail().hash_of(log_id) {
            return Ok(Some(hash));
        }
        let term = log_id.leader_id.term;
        let of_row = |row: &[u8]| chain::decode_row(row).filter(|row| row.term == term).map(|row| row.hash);
        {
            // A checkpoint commits rows to redb before it drops them from here: a row not
            // found here (below the first pending one) is in redb by the time it is looked up.
            let pending = self.pending();
            if let Some((first, _)) = pending.first()
                && log_id.index >= *first
            {
                let position = usize::try_from(log_id.index - first).ok();
                let row = position.and_then(|position| pending.get(position));
                return Ok(row.filter(|(index, _)| *index == log_id.index).and_then(|(_, row)| of_row(row)));
            }
        }
        let txn = self.db.begin_read().map_err(redb_error)?;
        let table = txn.open_table(ENTRIES).map_err(redb_error)?;
        let row = table.get(log_id.index).map_err(redb_error)?;
        Ok(row.and_then(|row| of_row(row.value())))
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        // The tail is only a cache; a panic mid-update can leave it short, so start over.
        self.tail.lock().unwrap_or_else(|poisoned| {
            let mut tail = poisoned.into_inner();
            tail.clear();
            tail
        })
    }

    fn lock(&self) -> MutexGuard<'_, ChainState> {
        // A poisoned lock means a panic mid-update of the cache; the cache is only written
        // after a successful commit, so the data it caches is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn load_and_verify(&self) -> Result<(ChainState, LogSummary), LogStoreError> {
        // The pending rows and a read transaction taken together: a checkpoint moving rows
        // from one to the other needs this lock to finish.
        let pending_lock = self.pending();
        let txn = self.db.begin_read().map_err(redb_error)?;
        let pending = pending_lock.clone();
        drop(pending_lock);
        let meta = txn.open_table(META).map_err(redb_error)?;
        let vote: Option<Vote> = read_meta(&meta, META_VOTE)?;
        let committed: Option<LogId> = read_meta::<Option<LogId>>(&meta, META_COMMITTED)?.flatten();
        let purge_point: Option<(LogId, ChainHash)> = read_meta(&meta, META_PURGED)?;
        // A log purged before the flag existed may be anchored anywhere: unrooted, so its
        // hashes are never compared (a false divergence would stop a healthy follower).
        let rooted = read_meta::<bool>(&meta, META_ROOTED)?.unwrap_or(purge_point.is_none());
        let (purged, anchor) = match purge_point {
            Some((log_id, hash)) => (Some(log_id), hash),
            None => (None, GENESIS),
        };

        let entries = txn.open_table(ENTRIES).map_err(redb_error)?;
        let mut prev_hash = anchor;
        let mut expected_index = purged.map(|log_id| log_id.index + 1);
        let mut last = None;
        let mut count = 0u64;
        let mut check = |index: u64, row: &[u8]| -> Result<(), LogStoreError> {
            if let Some(expected) = expected_index
                && index != expected
            {
                return Err(LogStoreError::Gap { expected, found: index });
            }
            let entry = verify_row(index, &prev_hash, row)?;
            prev_hash = row_hash(row);
            last = Some((entry.log_id, prev_hash));
            expected_index = Some(index + 1);
            count += 1;
            Ok(())
        };
        // redb may also hold the first pending rows (a checkpoint off the write lock has
        // committed them and not yet removed them from memory): those are read once, below.
        let stored_end = pending.first().map_or(Bound::Unbounded, |(first, _)| Bound::Excluded(*first));
        for item in entries.range::<u64>((Bound::Unbounded, stored_end)).map_err(redb_error)? {
            let (key, value) = item.map_err(redb_error)?;
            check(key.value(), value.value())?;
        }
        for (index, row) in pending.iter() {
            check(*index, row)?;
        }
        let summary =
            LogSummary { purged, last: last.as_ref().map(|(log_id, _)| *log_id), entries: count, last_hash: prev_hash };
        Ok((ChainState { last, purged, anchor, rooted, vote, committed, committed_stored: committed }, summary))
    }

    /// Appends `entries`: readable at once, durable once the journal is synced (at once
    /// with `sync_now`, else by the next [`Shared::sync`]). When the append left a journal
    /// file behind, its rows are checkpointed afterwards: on a task of its own with
    /// `background` (the caller returns at once), else here.
    fn append(self: &Arc<Self>, entries: &[Entry], sync_now: bool, background: bool) -> Result<(), LogStoreError> {
        let appended = {
            let mut journal = self.writing();
            self.append_locked(&mut journal, entries)?
        };
        if sync_now && appended != Appended::Checkpointed {
            self.sync()?;
        }
        if appended == Appended::Switched {
            if background {
                self.spawn_checkpoint();
            } else {
                self.checkpoint_sealed()?;
            }
        }
        Ok(())
    }

    /// Runs [`Shared::checkpoint_sealed`] on a task of its own.
    fn spawn_checkpoint(self: &Arc<Self>) {
        let shared = Arc::clone(self);
        crate::rt::spawn(async move {
            match crate::rt::blocking(move || shared.checkpoint_sealed()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "log checkpoint failed; the rows stay journaled"),
                Err(error) => tracing::warn!(%error, "log checkpoint task failed; the rows stay journaled"),
            }
        });
    }

    /// An append run by the caller (an async worker) if no other write holds the log and
    /// no checkpoint is due: a few tens of microseconds of in-memory work and one write to
    /// the page cache, cheaper than a hop to a blocking thread. `None` when it would wait.
    fn try_append_unsynced_now(self: &Arc<Self>, entries: &[Entry]) -> Option<Result<(), LogStoreError>> {
        let mut journal = match self.write_lock.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        // A full journal file (a switch or a checkpoint), or an append over existing
        // entries (a checkpoint), fsyncs: that belongs on a blocking thread.
        if journal.due() || replaces_entries(&self.lock(), entries) {
            return None;
        }
        let appended = self.append_locked(&mut journal, entries);
        drop(journal);
        if let Ok(Appended::Switched) = appended {
            // A record too large for the rest of the file switched files after all.
            self.spawn_checkpoint();
        }
        Some(appended.map(|_| ()))
    }

    /// `append` for a caller holding the write lock. The rows go to the journal as one
    /// record and stay pending in memory until a checkpoint writes them to redb, or the
    /// append is a checkpoint itself (a durable redb commit: the batch was too large for a
    /// record, both journal files were full, or the append replaces existing entries).
    fn append_locked(&self, journal: &mut Journal, entries: &[Entry]) -> Result<Appended, LogStoreError> {
        let Some(first) = entries.first() else { return Ok(Appended::Checkpointed) };
        if entries.len() > MAX_BATCH_SIZE {
            return Err(LogStoreError::BatchTooLarge { count: entries.len(), max: MAX_BATCH_SIZE });
        }
        let mut state = self.lock().clone();
        // openraft truncates conflicting entries before appending; an append over existing
        // entries still replaces them rather than forking the chain, in a checkpoint (rare:
        // only after a change of leader).
        let mut checkpoint = None;
        if replaces_entries(&state, entries) {
            let replacing = self.begin_checkpoint()?;
            {
                let mut table = replacing.txn.open_table(ENTRIES).map_err(redb_error)?;
                self.tail().truncate_from(first.index());
                remove_range(&mut table, first.index()..)?;
                state.last = previous_entry(&table, first.index())?;
            }
            checkpoint = Some(replacing);
        }
        let mut prev_hash = match &state.last {
            Some((last, hash)) => {
                if first.index() != last.index + 1 {
                    return Err(LogStoreError::NonContiguousAppend { last: last.index, found: first.index() });
                }
                *hash
            }
            None => state.anchor,
        };
        let mut rows = Vec::with_capacity(entries.len());
        let mut cached = Vec::with_capacity(entries.len());
        for (expected_index, entry) in (first.index()..).zip(entries) {
            let index = entry.index();
            if index != expected_index {
                return Err(LogStoreError::NonContiguousAppend { last: expected_index - 1, found: index });
            }
            let bytes = chain::encode_entry(entry)?;
            if bytes.len() > MAX_ENTRY_SIZE {
                return Err(LogStoreError::EntryTooLarge { index, size: bytes.len(), max: MAX_ENTRY_SIZE });
            }
            let term = entry.log_id.leader_id.term;
            let hash = chain::entry_hash(&prev_hash, index, term, &bytes);
            cached.push((bytes.len(), hash));
            rows.push((index, chain::encode_row(&hash, term, &bytes)));
            prev_hash = hash;
        }
        let last_entry = &entries[entries.len() - 1];
        state.last = Some((last_entry.log_id, prev_hash));
        let record_bytes = journal::payload_len(rows.iter().map(|(_, row)| row.as_slice()));
        let plan = match checkpoint {
            Some(_) => Plan::Checkpoint,
            None => journal.plan(record_bytes, self.durable_seq.load(Ordering::Acquire)),
        };
        let appended = match plan {
            Plan::Record => {
                self.journal_rows(journal, rows)?;
                Appended::Journaled
            }
            Plan::SwitchThenRecord => {
                let seq = journal.switch()?;
                let sealed_rows = self.pending().len();
                *self.sealed() = Some(Sealed { rows: sealed_rows, seq });
                self.journal_rows(journal, rows)?;
                Appended::Switched
            }
            Plan::Checkpoint => {
                let checkpoint = match checkpoint {
                    Some(checkpoint) => checkpoint,
                    None => self.begin_checkpoint()?,
                };
                {
                    let mut table = checkpoint.txn.open_table(ENTRIES).map_err(redb_error)?;
                    for (index, row) in &rows {
                        table.insert(*index, row.as_slice()).map_err(redb_error)?;
                    }
                }
                store_committed(&checkpoint.txn, &mut state)?;
                self.commit_checkpoint(checkpoint, journal)?;
                Appended::Checkpointed
            }
        };
        self.publish(state);
        let mut tail = self.tail();
        for (entry, (size, hash)) in entries.iter().zip(cached) {
            tail.push(entry.clone(), size, hash);
        }
        Ok(appended)
    }

    /// Writes `rows` as one journal record and keeps them pending until a checkpoint.
    fn journal_rows(&self, journal: &mut Journal, rows: Vec<(u64, Vec<u8>)>) -> Result<(), LogStoreError> {
        journal.write(rows.iter().map(|(index, row)| (*index, row.as_slice())))?;
        self.pending().extend(rows);
        Ok(())
    }

    /// The durability point of the whole system: one `fdatasync` of the journal, which
    /// makes every record written before it durable. Needs no write lock: appends go on
    /// while it runs.
    fn sync(&self) -> Result<(), LogStoreError> {
        // Usually only the current file has unsynced records; right after a switch the
        // one left behind is synced already (see `Journal::switch`).
        let started = Instant::now();
        for file in &self.journal_files {
            file.sync()?;
        }
        self.timings.journal_synced(started.elapsed());
        Ok(())
    }

    /// The group-commit queue, starting its flusher task on first use. The task holds only
    /// a weak handle, so it never keeps the database open; it ends when the store is dropped.
    fn flusher(self: &Arc<Self>) -> &mpsc::Sender<IOFlushed<TypeConfig>> {
        self.flusher.get_or_init(|| {
            let (sender, queue) = mpsc::channel(MAX_PENDING_FLUSHES);
            crate::rt::spawn(flush_loop(Arc::downgrade(self), queue));
            sender
        })
    }

    fn read(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, LogStoreError> {
        let anchor = self.lock().anchor;
        let start = match range.start_bound() {
            Bound::Included(start) => *start,
            Bound::Excluded(start) => start.saturating_add(1),
            Bound::Unbounded => 0,
        };
        // The pending rows wanted (and the one before the range, for its hash), copied
        // together with the start of a read transaction: a checkpoint moving rows from
        // memory to redb needs this lock to finish, so no row is missed or read twice.
        let pending_lock = self.pending();
        let txn = self.db.begin_read().map_err(redb_error)?;
        let pending_first = pending_lock.first().map(|(index, _)| *index);
        let pending: Vec<(u64, Vec<u8>)> = pending_lock
            .iter()
            .filter(|(index, _)| range.contains(index) || index.checked_add(1) == Some(start))
            .cloned()
            .collect();
        drop(pending_lock);
        let table = txn.open_table(ENTRIES).map_err(redb_error)?;
        // redb holds the rows below the pending ones.
        let stored_end = match (range.end_bound(), pending_first) {
            (Bound::Included(end), Some(first)) if *end < first => Bound::Included(*end),
            (Bound::Excluded(end), Some(first)) if *end <= first => Bound::Excluded(*end),
            (_, Some(first)) => Bound::Excluded(first),
            (Bound::Included(end), None) => Bound::Included(*end),
            (Bound::Excluded(end), None) => Bound::Excluded(*end),
            (Bound::Unbounded, None) => Bound::Unbounded,
        };
        let empty = match stored_end {
            Bound::Included(end) => end < start,
            Bound::Excluded(end) => end <= start,
            Bound::Unbounded => false,
        };
        let mut rows: Vec<(u64, Vec<u8>)> = Vec::new();
        if !empty {
            for item in table.range::<u64>((Bound::Included(start), stored_end)).map_err(redb_error)? {
                let (key, value) = item.map_err(redb_error)?;
                rows.push((key.value(), value.value().to_vec()));
            }
        }
        let mut entries = Vec::new();
        let mut prev: Option<(u64, ChainHash)> = None;
        for (index, row) in rows.into_iter().chain(pending) {
            if !range.contains(&index) {
                // The pending row just before the range: only its hash is needed.
                prev = Some((index, row_hash(&row)));
                continue;
            }
            let prev_hash = match prev {
                Some((prev_index, hash)) if prev_index + 1 == index => hash,
                Some((prev_index, _)) => return Err(LogStoreError::Gap { expected: prev_index + 1, found: index }),
                // The first entry read chains from its stored predecessor, or from the
                // anchor when it is the first entry of the log.
                None => match index.checked_sub(1).map(|prev_index| table.get(prev_index)).transpose() {
                    Ok(Some(Some(row))) => row_hash(row.value()),
                    Ok(_) => anchor,
                    Err(error) => return Err(redb_error(error)),
                },
            };
            entries.push(verify_row(index, &prev_hash, &row)?);
            prev = Some((index, row_hash(&row)));
        }
        Ok(entries)
    }

    fn truncate_after(&self, last_kept: Option<LogId>) -> Result<(), LogStoreError> {
        let first_removed = last_kept.map_or(0, |log_id| log_id.index + 1);
        let mut journal = self.writing();
        let mut state = self.lock().clone();
        self.tail().truncate_from(first_removed);
        let checkpoint = self.begin_checkpoint()?;
        {
            let mut table = checkpoint.txn.open_table(ENTRIES).map_err(redb_error)?;
            remove_range(&mut table, first_removed..)?;
            state.last = previous_entry(&table, first_removed)?;
        }
        self.commit_checkpoint(checkpoint, &mut journal)?;
        self.publish(state);
        Ok(())
    }

    fn purge(&self, upto: LogId) -> Result<(), LogStoreError> {
        let mut journal = self.writing();
        let mut state = self.lock().clone();
        if state.purged.is_some_and(|purged| purged.index >= upto.index) {
            return Ok(());
        }
        self.tail().purge_upto(upto.index);
        let checkpoint = self.begin_checkpoint()?;
        {
            let txn = &checkpoint.txn;
            let mut table = txn.open_table(ENTRIES).map_err(redb_error)?;
            let stored_hash = table.get(upto.index).map_err(redb_error)?.map(|row| row_hash(row.value()));
            let first_index = table.first().map_err(redb_error)?.map(|(key, _)| key.value());
            (state.anchor, state.rooted) = match (stored_hash, first_index) {
                // The purge point is stored: the remaining entries chain from its hash.
                (Some(hash), _) => (hash, state.rooted),
                // The purge point is before the first stored entry: the chain is unchanged.
                (None, Some(first)) if upto.index < first => (state.anchor, state.rooted),
                // Everything stored is obsolete (a snapshot overtook the log): the chain goes
                // on from the leader's hash of the snapshot's last entry when it came with
                // the snapshot, else from a hash of the purge point alone, which no other
                // node's chain shares.
                _ => match self.snapshot_anchor().take().filter(|(last, _)| *last == upto) {
                    Some((_, leader_hash)) => (leader_hash, true),
                    None => (chain::anchor_hash(upto.index, upto.leader_id.term), false),
                },
            };
            remove_range(&mut table, ..=upto.index)?;
            if state.last.is_some_and(|(last, _)| last.index <= upto.index) {
                state.last = None;
            }
            state.purged = Some(upto);
            let mut meta = txn.open_table(META).map_err(redb_error)?;
            write_meta(&mut meta, META_PURGED, &(upto, state.anchor))?;
            write_meta(&mut meta, META_ROOTED, &state.rooted)?;
        }
        self.commit_checkpoint(checkpoint, &mut journal)?;
        self.publish(state);
        Ok(())
    }

    fn save_vote(&self, vote: &Vote) -> Result<(), LogStoreError> {
        let mut journal = self.writing();
        let checkpoint = self.begin_checkpoint()?;
        write_meta(&mut checkpoint.txn.open_table(META).map_err(redb_error)?, META_VOTE, vote)?;
        self.commit_checkpoint(checkpoint, &mut journal)?;
        self.lock().vote = Some(*vote);
        Ok(())
    }

    /// Records the committed log id in memory; the next checkpoint stores it. Losing it in a
    /// crash is safe: it is re-learned from the leader, and a stored value is never ahead of
    /// the entries stored with it (a checkpoint writes every pending row).
    fn save_committed(&self, committed: Option<LogId>) {
        self.lock().committed = committed;
    }
}

/// Commits `txn` durably (the default durability), recording that it covers every journal
/// record written so far, which the journal may then overwrite.
fn commit_durable(txn: redb::WriteTransaction, journal: &mut Journal) -> Result<(), LogStoreError> {
    write_meta(&mut txn.open_table(META).map_err(redb_error)?, META_JOURNAL_SEQ, &journal.last_seq())?;
    txn.commit().map_err(redb_error)?;
    journal.checkpointed();
    Ok(())
}

/// How an append was stored (see [`Shared::append_locked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Appended {
    /// As a journal record, durable once the journal is synced.
    Journaled,
    /// As a journal record in the other file; the rows before it are sealed for a
    /// checkpoint off the write lock ([`Shared::checkpoint_sealed`]).
    Switched,
    /// In a durable redb commit.
    Checkpointed,
}

/// Whether appending `entries` would replace entries the log holds (it starts at or before
/// the last one).
fn replaces_entries(state: &ChainState, entries: &[Entry]) -> bool {
    match (&state.last, entries.first()) {
        (Some((last, _)), Some(first)) => first.index() <= last.index,
        _ => false,
    }
}

/// The index of redb's last entry, or of its purge point when it holds none.
fn last_stored_index(txn: &redb::WriteTransaction) -> Result<Option<u64>, LogStoreError> {
    let table = txn.open_table(ENTRIES).map_err(redb_error)?;
    if let Some((key, _)) = table.last().map_err(redb_error)? {
        return Ok(Some(key.value()));
    }
    let purged: Option<(LogId, ChainHash)> = read_meta(&txn.open_table(META).map_err(redb_error)?, META_PURGED)?;
    Ok(purged.map(|(log_id, _)| log_id.index))
}

/// Writes the committed log id into `txn` if it changed since last stored.
fn store_committed(txn: &redb::WriteTransaction, state: &mut ChainState) -> Result<(), LogStoreError> {
    if state.committed != state.committed_stored {
        write_meta(&mut txn.open_table(META).map_err(redb_error)?, META_COMMITTED, &state.committed)?;
        state.committed_stored = state.committed;
    }
    Ok(())
}

fn remove_range(
    table: &mut redb::Table<'_, u64, &[u8]>,
    range: impl RangeBounds<u64> + 'static,
) -> Result<(), LogStoreError> {
    let removed: Vec<u64> = table
        .range::<u64>(range)
        .map_err(redb_error)?
        .map(|item| item.map(|(key, _)| key.value()))
        .collect::<Result<_, _>>()
        .map_err(redb_error)?;
    for index in removed {
        table.remove(index).map_err(redb_error)?;
    }
    Ok(())
}

fn previous_entry(
    table: &redb::Table<'_, u64, &[u8]>,
    before: u64,
) -> Result<Option<(LogId, ChainHash)>, LogStoreError> {
    let Some(item) = table.range::<u64>(..before).map_err(redb_error)?.next_back() else { return Ok(None) };
    let (key, value) = item.map_err(redb_error)?;
    let entry = decode_row_entry(key.value(), value.value())?;
    Ok(Some((entry.log_id, row_hash(value.value()))))
}

fn row_hash(row: &[u8]) -> ChainHash {
    chain::decode_row(row).map_or(GENESIS, |row| row.hash)
}

fn decode_row_entry(index: u64, row: &[u8]) -> Result<Entry, LogStoreError> {
    let row = chain::decode_row(row)
        .ok_or_else(|| LogStoreError::MalformedEntry { index, reason: "row shorter than its header".into() })?;
    let entry: Entry = postcard::from_bytes(row.entry_bytes)
        .map_err(|error| LogStoreError::MalformedEntry { index, reason: error.to_string() })?;
    if entry.index() != index || entry.log_id.leader_id.term != row.term {
        return Err(LogStoreError::MalformedEntry {
            index,
            reason: format!(
                "row holds entry {} of term {} under term {}",
                entry.index(),
                entry.log_id.leader_id.term,
                row.term
            ),
        });
    }
    Ok(entry)
}

/// Checks a row's hash against the chain before decoding it.
fn verify_row(index: u64, prev_hash: &ChainHash, row: &[u8]) -> Result<Entry, LogStoreError> {
    let parsed = chain::decode_row(row)
        .ok_or_else(|| LogStoreError::MalformedEntry { index, reason: "row shorter than its header".into() })?;
    let expected = chain::entry_hash(prev_hash, index, parsed.term, parsed.entry_bytes);
    if expected != parsed.hash {
        return Err(LogStoreError::ChainMismatch { index, expected: hex(&expected), found: hex(&parsed.hash) });
    }
    decode_row_entry(index, row)
}

fn hex(hash: &ChainHash) -> String {
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn read_meta<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &'static [u8],
) -> Result<Option<T>, LogStoreError> {
    let Some(value) = table.get(name).map_err(redb_error)? else { return Ok(None) };
    postcard::from_bytes(value.value()).map(Some).map_err(|error| LogStoreError::MalformedMeta {
        name: std::str::from_utf8(name).unwrap_or("?"),
        reason: error.to_string(),
    })
}

fn write_meta<T: Serialize>(
    table: &mut redb::Table<'_, &[u8], &[u8]>,
    name: &'static [u8],
    value: &T,
) -> Result<(), LogStoreError> {
    let bytes = postcard::to_stdvec(value).map_err(|error| LogStoreError::Encode(error.to_string()))?;
    table.insert(name, bytes.as_slice()).map_err(redb_error)?;
    Ok(())
}

/// Group commit: takes every append waiting for durability, makes them durable with one
/// fsync, then completes their callbacks in append order. Appends go on (and replication
/// reads them) while the fsync runs; openraft counts an entry only once its callback fires.
async fn flush_loop(shared: Weak<Shared>, mut queue: mpsc::Receiver<IOFlushed<TypeConfig>>) {
    let mut waiting = Vec::new();
    while let Some(first) = queue.recv().await {
        waiting.push(first);
        while waiting.len() < MAX_PENDING_FLUSHES {
            let Ok(next) = queue.try_recv() else { break };
            waiting.push(next);
        }
        let Some(shared) = shared.upgrade() else {
            for callback in waiting.drain(..) {
                callback.io_completed(Err(io::Error::other("the log was closed before its appends were made durable")));
            }
            return;
        };
        let result = blocking(&shared, |shared| shared.sync()).await.map_err(|error| error.to_string());
        let completed = waiting.len();
        for callback in waiting.drain(..) {
            callback.io_completed(result.clone().map_err(io::Error::other));
        }
        shared.flushes_pending.fetch_sub(completed, Ordering::AcqRel);
    }
}

/// Runs blocking redb work off the async executor.
async fn blocking<T, F>(shared: &Arc<Shared>, work: F) -> Result<T, LogStoreError>
where
    T: Send + 'static,
    F: FnOnce(&Arc<Shared>) -> Result<T, LogStoreError> + Send + 'static,
{
    let shared = Arc::clone(shared);
    crate::rt::blocking(move || work(&shared)).await.map_err(LogStoreError::Task)?
}

impl RaftLogReader<TypeConfig> for RedbLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let last = self.shared.lock().last.map(|(log_id, _)| log_id.index);
        if let Some(entries) = self.shared.tail().get(&bounds, last) {
            return Ok(entries);
        }
        Ok(blocking(&self.shared, move |shared| shared.read(bounds)).await?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.shared.lock().vote)
    }
}

impl RaftLogStorage<TypeConfig> for RedbLogStore {
    type LogReader = RedbLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        Ok(self.log_state())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = *vote;
        Ok(blocking(&self.shared, move |shared| shared.save_vote(&vote)).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.shared.save_committed(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.shared.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // Callbacks complete in append order: while the flusher holds any, later appends
        // queue behind them.
        let group =
            self.shared.leading.load(Ordering::Relaxed) || self.shared.flushes_pending.load(Ordering::Acquire) > 0;
        let inline = if group {
            self.shared.try_append_unsynced_now(&entries)
        } else {
            // A follower's append is durable before it returns, and openraft's core waits
            // for it either way; running the record write and its fdatasync here, on the
            // worker, saves two thread hand-offs per AppendEntries (to a blocking thread
            // and back), which on a 2-core machine cost more than the ~0.1 ms the worker
            // is held. The other worker steals this one's queued tasks meanwhile.
            self.shared.try_append_unsynced_now(&entries).map(|appended| appended.and_then(|()| self.shared.sync()))
        };
        let result = match inline {
            Some(result) => result,
            None => blocking(&self.shared, move |shared| shared.append(&entries, !group, true)).await,
        };
        if let Err(error) = result {
            let message = error.to_string();
            callback.io_completed(Err(io::Error::other(message)));
            return Err(error.into());
        }
        if !group {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        // Durable once the flusher's next fsync completes; the callback says so.
        self.shared.flushes_pending.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::error::SendError(callback)) = self.shared.flusher().send(callback).await {
            self.shared.flushes_pending.fetch_sub(1, Ordering::AcqRel);
            let error = io::Error::other("the log's flusher has stopped");
            callback.io_completed(Err(io::Error::other(error.to_string())));
            return Err(error);
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        Ok(blocking(&self.shared, move |shared| shared.truncate_after(last_log_id)).await?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        Ok(blocking(&self.shared, move |shared| shared.purge(log_id)).await?)
    }
}

#[cfg(test)]
mod tests {
    use openraft::EntryPayload;

    use super::*;

    fn entry(index: u64) -> Entry {
        Entry { log_id: LogId::new(1.into(), index), payload: EntryPayload::Blank }
    }

    /// Between a checkpoint's commit and its removal of the rows from memory, redb and the
    /// pending rows both hold them: reads and verification take each row once.
    #[test]
    fn rows_both_committed_and_pending_are_read_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbLogStore::open(dir.path().join("log.redb")).expect("open");
        let entries: Vec<Entry> = (1..=20).map(entry).collect();
        store.append_entries(&entries[..10]).expect("append");
        // A checkpoint of the first rows, committed but not yet released from memory.
        {
            let journal = store.shared.writing();
            let rows = store.shared.pending().len();
            *store.shared.sealed() = Some(Sealed { rows, seq: journal.last_seq() });
        }
        store.append_entries(&entries[10..]).expect("append more");
        let shared = &store.shared;
        let sealed = shared.sealed().expect("sealed");
        let rows: Vec<(u64, Vec<u8>)> = shared.pending()[..sealed.rows].to_vec();
        let txn = shared.db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(ENTRIES).expect("table");
            for (index, row) in &rows {
                table.insert(*index, row.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
        assert_eq!(shared.pending().len(), 20, "the committed rows are still pending too");
        assert_eq!(store.read_entries(..).expect("read all"), entries);
        assert_eq!(store.read_entries(5..15).expect("read across"), entries[4..14].to_vec());
        let summary = store.verify().expect("verify");
        assert_eq!((summary.entries, summary.last.map(|log_id| log_id.index)), (20, Some(20)));
        // Finishing the checkpoint changes nothing a reader sees.
        store.shared.checkpoint_sealed().expect("checkpoint");
        assert_eq!(shared.pending().len(), 10);
        assert_eq!(store.read_entries(..).expect("read all"), entries);
        assert_eq!(store.verify().expect("verify").entries, 20);
    }

    fn stored_committed(store: &RedbLogStore) -> Option<LogId> {
        let txn = store.shared.db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("meta");
        read_meta::<Option<LogId>>(&meta, META_COMMITTED).expect("decode").flatten()
    }

    /// A checkpoint off the lock stores the committed log id, but never one past the rows
    /// it commits.
    #[test]
    fn a_sealed_checkpoint_stores_the_committed_id_up_to_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbLogStore::open(dir.path().join("log.redb")).expect("open");
        let entries: Vec<Entry> = (1..=20).map(entry).collect();
        let seal = |store: &RedbLogStore| {
            let journal = store.shared.writing();
            let rows = store.shared.pending().len();
            *store.shared.sealed() = Some(Sealed { rows, seq: journal.last_seq() });
        };
        store.append_entries(&entries[..10]).expect("append");
        seal(&store);
        store.append_entries(&entries[10..]).expect("append more");
        store.shared.save_committed(Some(entry(15).log_id));
        store.shared.checkpoint_sealed().expect("checkpoint");
        assert_eq!(stored_committed(&store), Some(entry(10).log_id), "capped at the last committed row");
        seal(&store);
        store.shared.save_committed(Some(entry(17).log_id));
        store.shared.checkpoint_sealed().expect("checkpoint");
        assert_eq!(stored_committed(&store), Some(entry(17).log_id));
    }

    /// A follower's append returns only once its record is durable (it syncs on the
    /// calling worker, or on a blocking thread when the log is busy), and its callback fires.
    #[test]
    fn a_follower_append_is_synced_when_it_returns() {
        use openraft::type_config::TypeConfigExt;

        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbLogStore::open(dir.path().join("log.redb")).expect("open");
        let synced = |store: &RedbLogStore| store.shared.journal_files.iter().all(JournalFile::is_synced);
        let mut writer = store.clone();
        assert!(store.leader_switch().set(false));
        runtime.block_on(async {
            for index in 1..=8 {
                let (callback, done) = TypeConfig::oneshot();
                writer.append(vec![entry(index)], IOFlushed::signal(callback)).await.expect("append");
                assert!(synced(&store), "follower append {index} returned before its fsync");
                done.await.expect("callback fired").expect("durable");
            }
        });
        assert_eq!(store.read_entries(..).expect("read"), (1..=8).map(entry).collect::<Vec<_>>());
    }
}
