//! The log's journal: the fast durability point of appends.
//!
//! A durable redb commit writes about nine scattered pages and fsyncs them; on a virtual
//! disk every separate write costs a request, so it takes several times one fsync of one
//! block (measured here: 1 page + fdatasync ~0.3 ms, 8 scattered pages ~1 ms). An append
//! therefore writes its rows to this journal only: one sequential write of one record, made
//! durable by one `fdatasync` (which the flusher shares among all appends waiting for it).
//! The rows stay pending in memory, where reads find them, until a durable redb commit (a
//! checkpoint, every [`JOURNAL_CHECKPOINT_RECORDS`] records or before any other durable
//! change: truncation, purge, vote) writes them all to redb at once; the journal then starts
//! over at offset 0.
//!
//! Every record carries a sequence number that only grows, and every durable redb commit
//! stores the number of the last record it covers. On open, the records after it are
//! replayed into redb in order (each one replaces the log from its first index on, as the
//! append did); replay stops at the first record that is torn, fails its checksum, or does
//! not continue the sequence (old records left behind from before the last checkpoint).
//!
//! The file is never truncated and grows ahead of the records in zero-filled steps of
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

use crate::error::LogStoreError;

/// Records written since the last checkpoint after which the next append checkpoints: it
/// bounds replay work on open and the rows pending in memory. A checkpoint writes every
/// pending row to redb and fsyncs while holding the log's write lock, so its size is a
/// stall every append waits out: at 1024 records put p99.9 at 256 clients was 153/146 ms,
/// at 256 records 44/54 ms (etcd 51/77) in a same-run A/B, throughput within noise.
pub const JOURNAL_CHECKPOINT_RECORDS: u64 = 256;
/// Journal bytes after which the next append checkpoints.
pub const JOURNAL_CHECKPOINT_BYTES: u64 = 16 * 1024 * 1024;
/// Largest record; a larger append is committed durably to redb directly instead.
pub const MAX_JOURNAL_RECORD: usize = 4 * 1024 * 1024;
/// How far ahead of its records the file is extended with zeros at a time. Smaller steps
/// put the inode write back on more syncs; larger ones make the sync that flushes the
/// zeros slower.
pub const JOURNAL_GROW_STEP: u64 = 256 * 1024;

const MAGIC: [u8; 4] = *b"ASJ1";
const HEADER_LEN: usize = 4 + 4 + 8 + 32;
const ROW_HEADER_LEN: usize = 8 + 4;

/// One journaled append: the rows it stored, in index order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct JournalRecord {
    pub seq: u64,
    pub rows: Vec<(u64, Vec<u8>)>,
}

/// The journal file, shared by the writer and whoever makes its records durable.
#[derive(Clone, Debug)]
pub(crate) struct JournalFile {
    file: Arc<File>,
    path: Arc<PathBuf>,
}

impl JournalFile {
    /// Makes every record written before the call durable (one `fdatasync`); needs no lock.
    pub fn sync(&self) -> Result<(), LogStoreError> {
        self.file.sync_data().map_err(|error| journal_error(&self.path, format!("fdatasync: {error}")))
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> Result<(), LogStoreError> {
        self.file.write_all_at(bytes, offset).map_err(|error| journal_error(&self.path, error))
    }
}

/// Encoded size of a record's payload holding `rows`.
pub(crate) fn payload_len<'a>(rows: impl Iterator<Item = &'a [u8]>) -> usize {
    rows.map(|row| ROW_HEADER_LEN + row.len()).sum()
}

/// The journal's write cursor; lives inside the log's write lock.
#[derive(Debug)]
pub(crate) struct Journal {
    file: JournalFile,
    /// Where the next record goes.
    offset: u64,
    /// The file's length: written (zero-filled) space the records can go into.
    allocated: u64,
    /// The last sequence number written or covered by a checkpoint.
    last_seq: u64,
    /// Records written since the last checkpoint.
    since_checkpoint: u64,
    /// Reused encoding buffer.
    buffer: Vec<u8>,
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
    /// Opens (or creates) the journal at `path` and returns the records after
    /// `checkpointed_seq`, the last sequence number redb's durable state covers. The cursor
    /// starts after them; the caller replays them and checkpoints (see [`Journal::checkpointed`]).
    pub fn open(path: &Path, checkpointed_seq: u64) -> Result<(Journal, Vec<JournalRecord>), LogStoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|error| journal_error(path, error))?;
        let records = read_records(&file, path, checkpointed_seq)?;
        let allocated = file.metadata().map_err(|error| journal_error(path, error))?.len();
        let last_seq = records.last().map_or(checkpointed_seq, |record| record.seq);
        let journal = Journal {
            file: JournalFile { file: Arc::new(file), path: Arc::new(path.to_path_buf()) },
            offset: 0,
            allocated,
            last_seq,
            since_checkpoint: records.len() as u64,
            buffer: Vec::new(),
        };
        Ok((journal, records))
    }

    /// The file, for `fdatasync` without the write lock.
    pub fn file(&self) -> JournalFile {
        self.file.clone()
    }

    /// The sequence number a durable commit made now covers.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether an append of about `bytes` of rows must be a checkpoint rather than a
    /// record: the record would be too large, or the journal is due for one.
    pub fn needs_checkpoint(&self, bytes: usize) -> bool {
        bytes > MAX_JOURNAL_RECORD
            || self.since_checkpoint >= JOURNAL_CHECKPOINT_RECORDS
            || self.offset + (bytes as u64) > JOURNAL_CHECKPOINT_BYTES
    }

    /// Writes one record of `rows` (not yet durable: see [`Journal::file`]).
    pub fn write<'a>(&mut self, rows: impl Iterator<Item = (u64, &'a [u8])>) -> Result<(), LogStoreError> {
        let seq = self.last_seq + 1;
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
            return Err(journal_error(&self.file.path, reason));
        }
        let sum = checksum(seq, &self.buffer[HEADER_LEN..]);
        self.buffer[0..4].copy_from_slice(&MAGIC);
        self.buffer[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
        self.buffer[8..16].copy_from_slice(&seq.to_le_bytes());
        self.buffer[16..48].copy_from_slice(&sum);
        let end = self.offset + self.buffer.len() as u64;
        if end > self.allocated {
            let grown = end.div_ceil(JOURNAL_GROW_STEP) * JOURNAL_GROW_STEP;
            self.file.write_at(&vec![0u8; (grown - self.allocated) as usize], self.allocated)?;
            self.allocated = grown;
        }
        self.file.write_at(&self.buffer, self.offset)?;
        self.offset += self.buffer.len() as u64;
        self.last_seq = seq;
        self.since_checkpoint += 1;
        Ok(())
    }

    /// Records that a durable redb commit covering [`Journal::last_seq`] succeeded: the
    /// journal's records are no longer needed and the next one overwrites them from the
    /// start.
    pub fn checkpointed(&mut self) {
        self.offset = 0;
        self.since_checkpoint = 0;
    }
}

/// Parses the consecutive run of records that follows `checkpointed_seq` from the start of
/// the file. Records at or before it are left over from before the checkpoint.
fn read_records(file: &File, path: &Path, checkpointed_seq: u64) -> Result<Vec<JournalRecord>, LogStoreError> {
    let mut reader = io::BufReader::new(file);
    let mut records = Vec::new();
    let mut expected = checkpointed_seq + 1;
    let mut offset = 0u64;
    loop {
        let mut header = [0u8; HEADER_LEN];
        if !read_full(&mut reader, &mut header).map_err(|error| journal_error(path, error))? {
            break;
        }
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        if header[0..4] != MAGIC || len > MAX_JOURNAL_RECORD || seq != expected {
            if header[0..4] == MAGIC && seq > expected && records.is_empty() {
                // A record newer than any checkpoint with the ones before it missing: the
                // journal does not belong to this log state.
                return Err(journal_error(
                    path,
                    format!("first record is {seq} but the log was checkpointed at {checkpointed_seq}"),
                ));
            }
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
        expected += 1;
        offset += (HEADER_LEN + len) as u64;
    }
    Ok(records)
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

    #[test]
    fn records_after_the_checkpoint_come_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.journal");
        let (mut journal, replay) = Journal::open(&path, 0).expect("open");
        assert!(replay.is_empty());
        write(&mut journal, &rows(1, 3));
        write(&mut journal, &rows(4, 2));
        drop(journal);
        let (journal, replay) = Journal::open(&path, 0).expect("reopen");
        assert_eq!(
            replay,
            vec![JournalRecord { seq: 1, rows: rows(1, 3) }, JournalRecord { seq: 2, rows: rows(4, 2) }]
        );
        assert_eq!(journal.last_seq(), 2);
        // Redb's durable state covers both: nothing is replayed, and the sequence goes on.
        let (journal, replay) = Journal::open(&path, 2).expect("reopen");
        assert!(replay.is_empty());
        assert_eq!(journal.last_seq(), 2);
    }

    #[test]
    fn a_checkpoint_leaves_older_records_behind_that_are_never_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.journal");
        let (mut journal, _) = Journal::open(&path, 0).expect("open");
        for first in 0..4 {
            write(&mut journal, &rows(first * 10 + 1, 10));
        }
        journal.checkpointed();
        // A short record overwrites the start of record 1; records 2..4 remain on disk.
        write(&mut journal, &rows(41, 1));
        drop(journal);
        let (journal, replay) = Journal::open(&path, 4).expect("reopen");
        assert_eq!(replay, vec![JournalRecord { seq: 5, rows: rows(41, 1) }]);
        assert_eq!(journal.last_seq(), 5);
        // Nothing written since the checkpoint: the old record at the start is ignored.
        let (_, replay) = Journal::open(&path, 5).expect("reopen");
        assert!(replay.is_empty());
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.journal");
        let (mut journal, _) = Journal::open(&path, 0).expect("open");
        write(&mut journal, &rows(1, 2));
        write(&mut journal, &rows(3, 2));
        let end = journal.offset;
        drop(journal);
        // Cut the last record in half: a crash mid-write.
        let file = OpenOptions::new().read(true).write(true).open(&path).expect("open file");
        file.set_len(end - 5).expect("truncate");
        let (_, replay) = Journal::open(&path, 0).expect("reopen torn");
        assert_eq!(replay.len(), 1);
        // Flip a payload byte of the first record: its checksum fails, nothing replays.
        let mut byte = [0u8; 1];
        file.read_at(&mut byte, HEADER_LEN as u64 + 2).expect("read");
        file.write_all_at(&[byte[0] ^ 0xff], HEADER_LEN as u64 + 2).expect("flip");
        let (_, replay) = Journal::open(&path, 0).expect("reopen corrupt");
        assert!(replay.is_empty());
    }

    #[test]
    fn the_file_grows_ahead_in_zeroed_steps_that_replay_ignores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.journal");
        let (mut journal, _) = Journal::open(&path, 0).expect("open");
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
        let (_, replay) = Journal::open(&path, 0).expect("reopen");
        assert_eq!(replay.iter().map(|record| record.seq).collect::<Vec<_>>(), vec![1, 2], "zeros end replay");
        // A crash mid-record inside the zeroed space leaves a record whose checksum fails.
        let file = OpenOptions::new().read(true).write(true).open(&path).expect("open file");
        file.write_all_at(&[0u8; 64], end - 64).expect("zero the end of record 2");
        let (mut journal, replay) = Journal::open(&path, 0).expect("reopen torn");
        assert_eq!(replay.len(), 1, "only the intact record 1 replays: {replay:?}");
        // After a checkpoint the records overwrite the start; the file neither shrinks nor grows.
        journal.checkpointed();
        write(&mut journal, &rows(4, 1));
        assert_eq!(len(&path), 2 * JOURNAL_GROW_STEP);
    }

    #[test]
    fn a_journal_ahead_of_the_checkpoint_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.journal");
        let (mut journal, _) = Journal::open(&path, 7).expect("open");
        write(&mut journal, &rows(1, 1));
        drop(journal);
        assert!(matches!(Journal::open(&path, 3), Err(LogStoreError::Journal { .. })));
    }

    #[test]
    fn checkpoints_are_due_by_records_and_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(&dir.path().join("j"), 0).expect("open");
        assert!(!journal.needs_checkpoint(100));
        assert!(journal.needs_checkpoint(MAX_JOURNAL_RECORD + 1));
        for index in 0..JOURNAL_CHECKPOINT_RECORDS {
            write(&mut journal, &rows(index + 1, 1));
        }
        assert!(journal.needs_checkpoint(100));
        journal.checkpointed();
        assert!(!journal.needs_checkpoint(100));
    }
}
