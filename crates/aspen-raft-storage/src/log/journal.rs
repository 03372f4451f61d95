//! The log's journal: the fast durability point of appends.
//!
//! A durable redb commit writes about nine scattered pages and fsyncs them; on a virtual
//! disk every separate write costs a request, so it takes several times one fsync of one
//! block (measured here: 1 page + fdatasync ~0.3 ms, 8 scattered pages ~1 ms). An append
//! therefore writes its rows to this journal only: one sequential write of one record, made
//! durable by one `fdatasync` (which the flusher shares among all appends waiting for it).
//! The rows stay pending in memory, where reads find them, until a durable redb commit (a
//! checkpoint) writes them to redb.
//!
//! The journal is two files used in turn. After [`JOURNAL_CHECKPOINT_RECORDS`] records (or
//! [`JOURNAL_CHECKPOINT_BYTES`]) in one, appends switch to the other, starting at offset 0,
//! and the rows of the first are checkpointed off the write lock while appends go on (see
//! the store). A file is switched to only once a durable commit covers every record in it;
//! when the other file is still being checkpointed, the append checkpoints everything
//! itself, under the lock (the bounded fallback). Truncation, purge, votes and appends over
//! existing entries are durable redb commits of their own, which cover both files.
//!
//! Every record carries a sequence number that only grows, and every durable redb commit
//! stores the number of the last record it covers. On open, the records after it are taken
//! from both files in sequence order and replayed into redb (each one replaces the log from
//! its first index on, as the append did). Each file is read from offset 0 while the
//! sequence continues by one; replay stops at the first record that is torn, fails its
//! checksum, or does not continue the sequence (old records left behind by earlier turns).
//!
//! The files are never truncated and grow ahead of the records in zero-filled steps of
//! [`JOURNAL_GROW_STEP`]: an `fdatasync` after a write that extends a file also has to
//! write the inode (its new size), which on this disk doubled its cost (measured: 5 KB
//! records, write + fdatasync, 313-318 us growing the file vs 150 us inside zero-filled
//! space). Zeros after the last record end replay like any torn tail.
//!
//! Record layout: `MAGIC (4) | payload length u32 LE | seq u64 LE | blake3(seq, length,
//! payload) (32) | payload`, where the payload is rows, each `index u64 LE | length u32 LE |
//! row` (the row exactly as stored in redb).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::LogStoreError;

/// Records written to one file after which appends move to the other and the first is
/// checkpointed: it bounds replay work on open and the rows pending in memory (at most
/// twice this many records). A checkpoint under the write lock is a stall every append waits
/// out (at 1024 records put p99.9 at 256 clients was 153/146 ms, at 256 records 44/54 ms,
/// etcd 51/77); checkpoints now run off the lock, and fall back to it only when one file
/// fills before the other is checkpointed. Under the simulator 16, so that its short runs
/// switch files, checkpoint off the lock, fall back and crash in between often.
pub const JOURNAL_CHECKPOINT_RECORDS: u64 = if cfg!(madsim) { 16 } else { 256 };
/// Most bytes of records in one file before appends move to the other. Each file's share is
/// drawn anew at every switch between half this and this ([`Journal::switch`]), from a
/// sequence seeded by the journal's path, so that the nodes of a cluster, which journal the
/// same entries, do not all checkpoint at the same moment. A checkpoint is a durable redb
/// commit of the file's rows; on a shared disk three simultaneous ones (at 256 records,
/// about 8 MB each under 256 clients) took 64-200 ms and held every node's journal
/// fdatasync for 25-50 ms, so the quorum was slow together: a 50-130 ms write stall about
/// once a second. Under the simulator the share is fixed (records bind first there anyway).
pub const JOURNAL_CHECKPOINT_BYTES: u64 = 2 * 1024 * 1024;
/// Largest record; a larger append is committed durably to redb directly instead.
pub const MAX_JOURNAL_RECORD: usize = 4 * 1024 * 1024;
/// How far ahead of its records a file is extended with zeros at a time. Smaller steps
/// put the inode write back on more syncs; larger ones make the sync that flushes the
/// zeros slower.
pub const JOURNAL_GROW_STEP: u64 = 256 * 1024;

const MAGIC: [u8; 4] = *b"ASJ1";
const HEADER_LEN: usize = 4 + 4 + 8 + 32;
const ROW_HEADER_LEN: usize = 8 + 4;

/// The journal's two files, next to the log at `log_path`: `<log>.journal` and
/// `<log>.journal-b`.
#[must_use]
pub fn journal_paths(log_path: &Path) -> [PathBuf; 2] {
    [log_path.with_extension("journal"), log_path.with_extension("journal-b")]
}

/// One journaled append: the rows it stored, in index order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct JournalRecord {
    pub seq: u64,
    pub rows: Vec<(u64, Vec<u8>)>,
}

/// One journal file, shared by the writer and whoever makes its records durable.
#[derive(Clone, Debug)]
pub(crate) struct JournalFile {
    file: Arc<File>,
    path: Arc<PathBuf>,
    /// Writes made to the file so far, and how many of them the last sync covered.
    written: Arc<AtomicU64>,
    synced: Arc<AtomicU64>,
}

impl JournalFile {
    fn open(path: &Path) -> Result<JournalFile, LogStoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|error| journal_error(path, error))?;
        Ok(JournalFile {
            file: Arc::new(file),
            path: Arc::new(path.to_path_buf()),
            written: Arc::default(),
            synced: Arc::default(),
        })
    }

    /// Makes every record written to this file before the call durable (one `fdatasync`,
    /// skipped when nothing was written since the last one); needs no lock.
    pub fn sync(&self) -> Result<(), LogStoreError> {
        let written = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= written {
            return Ok(());
        }
        self.file.sync_data().map_err(|error| journal_error(&self.path, format!("fdatasync: {error}")))?;
        self.synced.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    /// Whether the last sync covered every write made to this file.
    #[cfg(test)]
    pub(crate) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.written.load(Ordering::Acquire)
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> Result<(), LogStoreError> {
        self.file.write_all_at(bytes, offset).map_err(|error| journal_error(&self.path, error))?;
        self.written.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn len(&self) -> Result<u64, LogStoreError> {
        Ok(self.file.metadata().map_err(|error| journal_error(&self.path, error))?.len())
    }
}

/// Encoded size of a record's payload holding `rows`.
pub(crate) fn payload_len<'a>(rows: impl Iterator<Item = &'a [u8]>) -> usize {
    rows.map(|row| ROW_HEADER_LEN + row.len()).sum()
}

/// What an append of a given size does (see [`Journal::plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Write a record to the current file.
    Record,
    /// Switch files ([`Journal::switch`]), then write the record; the rows before it can be
    /// checkpointed off the write lock.
    SwitchThenRecord,
    /// Commit everything to redb durably now, under the write lock: the record would be too
    /// large, or the current file is full and the other is not checkpointed yet.
    Checkpoint,
}

/// The journal's write cursor; lives inside the log's write lock.
#[derive(Debug)]
pub(crate) struct Journal {
    files: [JournalFile; 2],
    /// The file appends go to.
    current: usize,
    /// Where the next record goes in the current file.
    offset: u64,
    /// Each file's length: written (zero-filled) space the records can go into.
    allocated: [u64; 2],
    /// The last sequence number written or covered by a checkpoint.
    last_seq: u64,
    /// The last sequence number written to each file since it last started over (0 when
    /// none): a file may be written again once a durable commit covers this.
    file_last_seq: [u64; 2],
    /// Records written to the current file since it started over.
    in_current: u64,
    /// Bytes of records the current file takes ([`JOURNAL_CHECKPOINT_BYTES`]).
    share: u64,
    /// State of the sequence the shares are drawn from.
    share_seed: u64,
    /// Reused encoding buffer.
    buffer: Vec<u8>,
}

/// A nonzero seed for a journal's shares from its path: different on every node.
fn seed_of(path: &Path) -> u64 {
    let hash = blake3::hash(path.as_os_str().as_encoded_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(bytes) | 1
}

fn journal_error(path: &Path, error: impl std::fmt::Display) -> LogStoreError {
    LogStoreError::Journal { path: path.display().to_string(), reason: error.to_string() }
}

fn checksum(seq: u64, payload: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(&(payload.len() as u32).to_le_bytes());
    hasher.update(payload);
    *hasher.finalize().as_bytes()
}

impl Journal {
    /// Opens (or creates) the journal's two files and returns the records after
    /// `checkpointed_seq`, the last sequence number redb's durable state covers, in order.
    /// The cursor starts after them; the caller replays them and checkpoints (see
    /// [`Journal::checkpointed`]).
    pub fn open(paths: &[PathBuf; 2], checkpointed_seq: u64) -> Result<(Journal, Vec<JournalRecord>), LogStoreError> {
        let files = [JournalFile::open(&paths[0])?, JournalFile::open(&paths[1])?];
        let runs = [read_run(&files[0].file, &files[0].path)?, read_run(&files[1].file, &files[1].path)?];
        let records = merge_runs(runs, checkpointed_seq, &paths[0])?;
        let last_seq = records.last().map_or(checkpointed_seq, |record| record.seq);
        let allocated = [files[0].len()?, files[1].len()?];
        let mut journal = Journal {
            files,
            current: 0,
            offset: 0,
            allocated,
            last_seq,
            // Until the caller's checkpoint, the replayed records count as unsaved.
            file_last_seq: [last_seq, last_seq],
            in_current: records.len() as u64,
            share: JOURNAL_CHECKPOINT_BYTES,
            share_seed: seed_of(&paths[0]),
            buffer: Vec::new(),
        };
        journal.share = journal.next_share();
        Ok((journal, records))
    }

    /// Both files, for `fdatasync` without the write lock.
    pub fn files(&self) -> [JournalFile; 2] {
        self.files.clone()
    }

    /// The sequence number a durable commit made now covers.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether the next append must run under the write lock with a durable commit or a
    /// file switch (the cheap path on the async worker skips those).
    pub fn due(&self) -> bool {
        // A record is at least one byte: the current file is full for any of them.
        self.full(1)
    }

    /// Whether the current file takes no record of `bytes` more: it holds its share of
    /// records, or the record would take it past its share of bytes (an empty file takes
    /// any record up to [`MAX_JOURNAL_RECORD`]).
    fn full(&self, bytes: usize) -> bool {
        self.in_current >= JOURNAL_CHECKPOINT_RECORDS || (self.offset > 0 && self.offset + (bytes as u64) > self.share)
    }

    /// The next file's share of bytes: between half of [`JOURNAL_CHECKPOINT_BYTES`] and all
    /// of it (all of it under the simulator, whose runs must not depend on paths).
    fn next_share(&mut self) -> u64 {
        if cfg!(madsim) {
            return JOURNAL_CHECKPOINT_BYTES;
        }
        // xorshift64*: enough to spread shares; nothing depends on its quality.
        self.share_seed ^= self.share_seed >> 12;
        self.share_seed ^= self.share_seed << 25;
        self.share_seed ^= self.share_seed >> 27;
        let drawn = self.share_seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let half = JOURNAL_CHECKPOINT_BYTES / 2;
        half + drawn % (half + 1)
    }

    /// What an append of about `bytes` of rows does, given that durable commits cover
    /// every record up to `durable_seq`.
    pub fn plan(&self, bytes: usize, durable_seq: u64) -> Plan {
        if bytes > MAX_JOURNAL_RECORD {
            return Plan::Checkpoint;
        }
        if !self.full(bytes) {
            Plan::Record
        } else if self.file_last_seq[1 - self.current] <= durable_seq {
            Plan::SwitchThenRecord
        } else {
            Plan::Checkpoint
        }
    }

    /// Moves appends to the other file (which a durable commit covers entirely; see
    /// [`Journal::plan`]), from its start, after syncing the file it leaves: a record in
    /// the new file is then never on disk without every record before it. Returns the last
    /// sequence number written so far: once a durable commit covers it, the file just left
    /// is free again.
    pub fn switch(&mut self) -> Result<u64, LogStoreError> {
        self.files[self.current].sync()?;
        self.current = 1 - self.current;
        self.offset = 0;
        self.in_current = 0;
        self.share = self.next_share();
        self.file_last_seq[self.current] = 0;
        Ok(self.last_seq)
    }

    /// Writes one record of `rows` (not yet durable: see [`Journal::files`]).
    pub fn write<'a>(&mut self, rows: impl Iterator<Item = (u64, &'a [u8])>) -> Result<(), LogStoreError> {
        let seq = self.last_seq + 1;
        let file = &self.files[self.current];
        self.buffer.clear();
        self.buffer.resize(HEADER_LEN, 0);
        for (index, row) in rows {
            self.buffer.extend_from_slice(&index.to_le_bytes());
            self.buffer.extend_from_slice(&(row.len() as u32).to_le_bytes());
            self.buffer.extend_from_slice(row);
        }
        let payload_len = self.buffer.len() - HEADER_LEN;
        if payload_len > MAX_JOURNAL_RECORD {
            let reason = format!("record of {payload_len} bytes over {MAX_JOURNAL_RECORD}");
            return Err(journal_error(&file.path, reason));
        }
        let sum = checksum(seq, &self.buffer[HEADER_LEN..]);
        self.buffer[0..4].copy_from_slice(&MAGIC);
        self.buffer[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
        self.buffer[8..16].copy_from_slice(&seq.to_le_bytes());
        self.buffer[16..48].copy_from_slice(&sum);
        let end = self.offset + self.buffer.len() as u64;
        let allocated = &mut self.allocated[self.current];
        if end > *allocated {
            let grown = end.div_ceil(JOURNAL_GROW_STEP) * JOURNAL_GROW_STEP;
            file.write_at(&vec![0u8; (grown - *allocated) as usize], *allocated)?;
            *allocated = grown;
        }
        file.write_at(&self.buffer, self.offset)?;
        self.offset += self.buffer.len() as u64;
        self.last_seq = seq;
        self.file_last_seq[self.current] = seq;
        self.in_current += 1;
        Ok(())
    }

    /// Records that a durable redb commit covering [`Journal::last_seq`] succeeded: no
    /// record in either file is needed any more, and the next one overwrites the current
    /// file from the start.
    pub fn checkpointed(&mut self) {
        self.offset = 0;
        self.in_current = 0;
        self.file_last_seq = [0, 0];
    }
}

/// One file's records: the run that starts at offset 0 and goes on while each record is
/// whole, passes its checksum and continues the sequence by one.
fn read_run(file: &File, path: &Path) -> Result<Vec<JournalRecord>, LogStoreError> {
    let mut reader = io::BufReader::new(file);
    let mut records: Vec<JournalRecord> = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut header = [0u8; HEADER_LEN];
        if !read_full(&mut reader, &mut header).map_err(|error| journal_error(path, error))? {
            break;
        }
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let continues = records.last().is_none_or(|last| seq == last.seq + 1);
        if header[0..4] != MAGIC || len > MAX_JOURNAL_RECORD || !continues {
            break;
        }
        let mut payload = vec![0u8; len];
        if !read_full(&mut reader, &mut payload).map_err(|error| journal_error(path, error))? {
            tracing::warn!(path = %path.display(), offset, seq, "journal ends in a torn record; ignoring it");
            break;
        }
        if checksum(seq, &payload) != header[16..48] {
            tracing::warn!(path = %path.display(), offset, seq, "journal record fails its checksum; replay stops there");
            break;
        }
        let rows =
            parse_rows(&payload).ok_or_else(|| journal_error(path, format!("record {seq} has malformed rows")))?;
        records.push(JournalRecord { seq, rows });
        offset += (HEADER_LEN + len) as u64;
    }
    Ok(records)
}

/// The records after `checkpointed_seq` from both files' runs, in order, while the
/// sequence continues by one. A switch syncs the file it leaves before the other gets a
/// record, so whatever follows `checkpointed_seq` is durable from `checkpointed_seq + 1` on:
/// a first record beyond it means the journal does not belong to this log state.
fn merge_runs(
    runs: [Vec<JournalRecord>; 2],
    checkpointed_seq: u64,
    path: &Path,
) -> Result<Vec<JournalRecord>, LogStoreError> {
    let mut after: Vec<JournalRecord> =
        runs.into_iter().flatten().filter(|record| record.seq > checkpointed_seq).collect();
    after.sort_by_key(|record| record.seq);
    let Some(first) = after.first() else { return Ok(after) };
    if first.seq != checkpointed_seq + 1 {
        return Err(journal_error(
            path,
            format!("first record is {} but the log was checkpointed at {checkpointed_seq}", first.seq),
        ));
    }
    let contiguous = after.windows(2).take_while(|pair| pair[1].seq == pair[0].seq + 1).count() + 1;
    if contiguous < after.len() {
        let last = after[contiguous - 1].seq;
        tracing::warn!(path = %path.display(), last, "journal records after a gap in the sequence are ignored");
        after.truncate(contiguous);
    }
    Ok(after)
}

/// Fills `buffer`; `false` if the file ended first (at once or part way).
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buffer) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(error),
    }
}

fn parse_rows(mut payload: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut rows = Vec::new();
    while !payload.is_empty() {
        let header = payload.get(..ROW_HEADER_LEN)?;
        let index = u64::from_le_bytes(header[0..8].try_into().ok()?);
        let len = u32::from_le_bytes(header[8..12].try_into().ok()?) as usize;
        let row = payload.get(ROW_HEADER_LEN..ROW_HEADER_LEN.checked_add(len)?)?;
        rows.push((index, row.to_vec()));
        payload = &payload[ROW_HEADER_LEN + len..];
    }
    let contiguous = rows.windows(2).all(|pair| pair[1].0 == pair[0].0 + 1);
    (!rows.is_empty() && contiguous).then_some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(first: u64, count: u64) -> Vec<(u64, Vec<u8>)> {
        (first..first + count).map(|index| (index, format!("row {index}").into_bytes())).collect()
    }

    fn write(journal: &mut Journal, rows: &[(u64, Vec<u8>)]) {
        journal.write(rows.iter().map(|(index, row)| (*index, row.as_slice()))).expect("write");
    }

    fn paths(dir: &tempfile::TempDir) -> [PathBuf; 2] {
        journal_paths(&dir.path().join("log.redb"))
    }

    /// A journal whose first file is full: one record per index from 1.
    fn with_full_first_file(dir: &tempfile::TempDir) -> ([PathBuf; 2], Journal) {
        let paths = paths(dir);
        let (mut journal, _) = Journal::open(&paths, 0).expect("open");
        journal.checkpointed();
        for index in 1..=JOURNAL_CHECKPOINT_RECORDS {
            write(&mut journal, &rows(index, 1));
        }
        (paths, journal)
    }

    fn seqs(records: &[JournalRecord]) -> Vec<u64> {
        records.iter().map(|record| record.seq).collect()
    }

    #[test]
    fn records_after_the_checkpoint_come_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = paths(&dir);
        let (mut journal, replay) = Journal::open(&paths, 0).expect("open");
        assert!(replay.is_empty());
        write(&mut journal, &rows(1, 3));
        write(&mut journal, &rows(4, 2));
        drop(journal);
        let (journal, replay) = Journal::open(&paths, 0).expect("reopen");
        assert_eq!(
            replay,
            vec![JournalRecord { seq: 1, rows: rows(1, 3) }, JournalRecord { seq: 2, rows: rows(4, 2) }]
        );
        assert_eq!(journal.last_seq(), 2);
        // Redb's durable state covers both: nothing is replayed, and the sequence goes on.
        let (journal, replay) = Journal::open(&paths, 2).expect("reopen");
        assert!(replay.is_empty());
        assert_eq!(journal.last_seq(), 2);
    }

    #[test]
    fn a_checkpoint_leaves_older_records_behind_that_are_never_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = paths(&dir);
        let (mut journal, _) = Journal::open(&paths, 0).expect("open");
        for first in 0..4 {
            write(&mut journal, &rows(first * 10 + 1, 10));
        }
        journal.checkpointed();
        // A short record overwrites the start of record 1; records 2..4 remain on disk.
        write(&mut journal, &rows(41, 1));
        drop(journal);
        let (journal, replay) = Journal::open(&paths, 4).expect("reopen");
        assert_eq!(replay, vec![JournalRecord { seq: 5, rows: rows(41, 1) }]);
        assert_eq!(journal.last_seq(), 5);
        // Nothing written since the checkpoint: the old record at the start is ignored.
        let (_, replay) = Journal::open(&paths, 5).expect("reopen");
        assert!(replay.is_empty());
    }

    #[test]
    fn records_continue_across_a_switch_and_replay_from_both_files_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (paths, mut journal) = with_full_first_file(&dir);
        // The first file is full and the other holds nothing a commit lacks: switch.
        assert_eq!(journal.plan(10, 0), Plan::SwitchThenRecord);
        let sealed = journal.switch().expect("switch");
        assert_eq!(sealed, JOURNAL_CHECKPOINT_RECORDS);
        for index in 1..=3 {
            write(&mut journal, &rows(JOURNAL_CHECKPOINT_RECORDS + index, 1));
        }
        drop(journal);
        // No checkpoint of the sealed file yet: everything replays, the first file first.
        let (_, replay) = Journal::open(&paths, 0).expect("reopen");
        let all: Vec<u64> = (1..=JOURNAL_CHECKPOINT_RECORDS + 3).collect();
        assert_eq!(seqs(&replay), all);
        assert_eq!(replay[JOURNAL_CHECKPOINT_RECORDS as usize].rows, rows(JOURNAL_CHECKPOINT_RECORDS + 1, 1));
        // The sealed file checkpointed: only the second file's records replay.
        let (mut journal, replay) = Journal::open(&paths, sealed).expect("reopen");
        assert_eq!(seqs(&replay), vec![sealed + 1, sealed + 2, sealed + 3]);
        // Until the caller checkpoints what it replayed, neither file may be switched to.
        assert_eq!(journal.plan(10, sealed), Plan::Record);
        for index in 0..JOURNAL_CHECKPOINT_RECORDS {
            write(&mut journal, &rows(sealed + 4 + index, 1));
        }
        assert_eq!(journal.plan(10, sealed), Plan::Checkpoint, "the other file still holds unsaved records");
    }

    #[test]
    fn a_full_file_checkpoints_under_the_lock_while_the_other_is_unsaved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(&paths(&dir), 0).expect("open");
        assert_eq!(journal.plan(100, 0), Plan::Record);
        assert_eq!(journal.plan(MAX_JOURNAL_RECORD + 1, 0), Plan::Checkpoint, "too large for a record");
        let (_, mut journal) = with_full_first_file(&dir);
        assert!(journal.due());
        let sealed = journal.switch().expect("switch");
        assert!(!journal.due());
        for index in 0..JOURNAL_CHECKPOINT_RECORDS {
            write(&mut journal, &rows(sealed + index + 1, 1));
        }
        // The second file is full too; the first is not committed yet.
        assert_eq!(journal.plan(100, sealed - 1), Plan::Checkpoint);
        // Once it is, appends switch back to it.
        assert_eq!(journal.plan(100, sealed), Plan::SwitchThenRecord);
        journal.checkpointed();
        assert_eq!(journal.plan(100, 0), Plan::Record);
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = paths(&dir);
        let (mut journal, _) = Journal::open(&paths, 0).expect("open");
        write(&mut journal, &rows(1, 2));
        write(&mut journal, &rows(3, 2));
        let end = journal.offset;
        drop(journal);
        // Cut the last record in half: a crash mid-write.
        let file = OpenOptions::new().read(true).write(true).open(&paths[0]).expect("open file");
        file.set_len(end - 5).expect("truncate");
        let (_, replay) = Journal::open(&paths, 0).expect("reopen torn");
        assert_eq!(replay.len(), 1);
        // Flip a payload byte of the first record: its checksum fails, nothing replays.
        let mut byte = [0u8; 1];
        file.read_at(&mut byte, HEADER_LEN as u64 + 2).expect("read");
        file.write_all_at(&[byte[0] ^ 0xff], HEADER_LEN as u64 + 2).expect("flip");
        let (_, replay) = Journal::open(&paths, 0).expect("reopen corrupt");
        assert!(replay.is_empty());
    }

    #[test]
    fn a_torn_record_in_the_first_file_drops_the_second_files_records_after_the_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (paths, mut journal) = with_full_first_file(&dir);
        let end = journal.offset;
        journal.switch().expect("switch");
        write(&mut journal, &rows(JOURNAL_CHECKPOINT_RECORDS + 1, 1));
        drop(journal);
        // Damage the first file's last record (only a disk fault can: it was synced before
        // the switch). Replay stops before it and never jumps the gap to the second file.
        let file = OpenOptions::new().read(true).write(true).open(&paths[0]).expect("open file");
        file.write_all_at(&[0u8; 8], end - 8).expect("damage");
        let (_, replay) = Journal::open(&paths, 0).expect("reopen");
        let kept: Vec<u64> = (1..JOURNAL_CHECKPOINT_RECORDS).collect();
        assert_eq!(seqs(&replay), kept);
    }

    #[test]
    fn the_file_grows_ahead_in_zeroed_steps_that_replay_ignores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = paths(&dir);
        let path = paths[0].clone();
        let (mut journal, _) = Journal::open(&paths, 0).expect("open");
        write(&mut journal, &rows(1, 2));
        let len = |path: &Path| std::fs::metadata(path).expect("metadata").len();
        assert_eq!(len(&path), JOURNAL_GROW_STEP, "the first record allocates one step");
        // A record crossing the step boundary grows the file by whole steps.
        let big = vec![(3, vec![7u8; JOURNAL_GROW_STEP as usize])];
        write(&mut journal, &big);
        let end = journal.offset;
        assert!(end > JOURNAL_GROW_STEP);
        assert_eq!(len(&path), 2 * JOURNAL_GROW_STEP);
        drop(journal);
        let (_, replay) = Journal::open(&paths, 0).expect("reopen");
        assert_eq!(seqs(&replay), vec![1, 2], "zeros end replay");
        // A crash mid-record inside the zeroed space leaves a record whose checksum fails.
        let file = OpenOptions::new().read(true).write(true).open(&path).expect("open file");
        file.write_all_at(&[0u8; 64], end - 64).expect("zero the end of record 2");
        let (mut journal, replay) = Journal::open(&paths, 0).expect("reopen torn");
        assert_eq!(replay.len(), 1, "only the intact record 1 replays: {replay:?}");
        // After a checkpoint the records overwrite the start; the file neither shrinks nor grows.
        journal.checkpointed();
        write(&mut journal, &rows(4, 1));
        assert_eq!(len(&path), 2 * JOURNAL_GROW_STEP);
        assert_eq!(len(&paths[1]), 0, "the second file is not written before a switch");
    }

    /// Record payload bytes that keep each record's size exact: `index | length | row`.
    fn sized_row(index: u64, record_bytes: usize) -> Vec<(u64, Vec<u8>)> {
        vec![(index, vec![1u8; record_bytes - HEADER_LEN - ROW_HEADER_LEN])]
    }

    /// The bytes written to the current file when it switched, for each of `switches` files.
    fn fill_bytes(path: &Path, switches: usize) -> Vec<u64> {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("node dir");
        let paths = journal_paths(path);
        let (mut journal, _) = Journal::open(&paths, 0).expect("open");
        let mut filled = Vec::new();
        let mut index = 1;
        while filled.len() < switches {
            let record = sized_row(index, 16 * 1024);
            let bytes = record[0].1.len() + ROW_HEADER_LEN;
            if journal.full(bytes) {
                filled.push(journal.offset);
                journal.switch().expect("switch");
                journal.checkpointed();
            }
            write(&mut journal, &record);
            index += 1;
        }
        filled
    }

    #[test]
    fn each_file_takes_a_share_of_bytes_that_differs_between_nodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node_a = fill_bytes(&dir.path().join("a").join("log.redb"), 8);
        let node_b = fill_bytes(&dir.path().join("b").join("log.redb"), 8);
        for filled in node_a.iter().chain(&node_b) {
            // Records of 16 KiB stop within one record of the share, which is at least half
            // the limit and at most all of it.
            assert!(*filled + 16 * 1024 > JOURNAL_CHECKPOINT_BYTES / 2, "{filled} under half the limit");
            assert!(*filled <= JOURNAL_CHECKPOINT_BYTES, "{filled} over the limit");
        }
        assert!(node_a.windows(2).any(|pair| pair[0] != pair[1]), "shares vary from file to file: {node_a:?}");
        assert_ne!(node_a, node_b, "two nodes journaling the same records switch at different points");
    }

    #[test]
    fn a_journal_ahead_of_the_checkpoint_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = paths(&dir);
        let (mut journal, _) = Journal::open(&paths, 7).expect("open");
        write(&mut journal, &rows(1, 1));
        drop(journal);
        assert!(matches!(Journal::open(&paths, 3), Err(LogStoreError::Journal { .. })));
    }

    #[test]
    fn a_sync_is_skipped_only_when_nothing_was_written_since_the_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(&paths(&dir), 0).expect("open");
        let files = journal.files();
        let unsynced = |file: &JournalFile| file.written.load(Ordering::Acquire) > file.synced.load(Ordering::Acquire);
        write(&mut journal, &rows(1, 1));
        assert!(unsynced(&files[0]) && !unsynced(&files[1]));
        files[0].sync().expect("sync");
        assert!(!unsynced(&files[0]));
        write(&mut journal, &rows(2, 1));
        assert!(unsynced(&files[0]));
        // A switch syncs the file it leaves.
        journal.switch().expect("switch");
        assert!(!unsynced(&files[0]));
        write(&mut journal, &rows(3, 1));
        assert!(unsynced(&files[1]));
    }
}
