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
//! sequence continues by one (past that lie old records left behind by earlier turns). A
//! record that is torn or fails its checksum is discarded only as the last one written (a
//! crash tore it before its sync); if records written after it exist, it is damage, and the
//! log does not open ([`LogStoreError::JournalCorrupt`]; the exact rule is on
//! `replay_records`).
//!
//! The files are never truncated and grow ahead of the records in zero-filled steps of
//! [`JOURNAL_GROW_STEP`]: an `fdatasync` after a write that extends a file also has to
//! write the inode (its new size), which on this disk doubled its cost (measured: 5 KB
//! records, write + fdatasync, 313-318 us growing the file vs 150 us inside zero-filled
//! space). Zeros after the last record end a file's records like the old records do.
//!
//! Record layout: `MAGIC (4) | payload length u32 LE | seq u64 LE | blake3(seq, length,
//! payload) (32) | payload`, where the payload is rows, each `index u64 LE | length u32 LE |
//! row` (the row exactly as stored in redb).

use std::fs::{File, OpenOptions};
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

/// Most records the journal holds after its last checkpoint: a file takes at most
/// [`JOURNAL_CHECKPOINT_RECORDS`], and appends move to a file only once a durable commit
/// covers every record in it. Bounds how far replay looks past a damaged record.
const LIVE_RECORDS_MAX: u64 = 2 * JOURNAL_CHECKPOINT_RECORDS;

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
        #[cfg(madsim)]
        super::sim_crash::synced(&self.path);
        self.synced.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    /// Whether the last sync covered every write made to this file.
    #[cfg(test)]
    pub(crate) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.written.load(Ordering::Acquire)
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> Result<(), LogStoreError> {
        #[cfg(madsim)]
        super::sim_crash::before_write(&self.path, &self.file, offset, bytes.len());
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
        let records = replay_records(&files, checkpointed_seq)?;
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

/// A record header as read from disk, before its payload is checked.
#[derive(Clone, Copy, Debug)]
struct Header {
    /// Payload length.
    len: usize,
    seq: u64,
    sum: [u8; 32],
}

impl Header {
    /// Offset just past the record that starts at `offset` with this header.
    fn end(&self, offset: u64) -> u64 {
        offset + (HEADER_LEN + self.len) as u64
    }
}

/// What is wrong with a record whose header reads fine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecordState {
    /// Whole, and its checksum passes.
    Whole,
    /// The file ends inside it.
    Cut,
    /// Its checksum fails.
    Damaged,
}

/// A record header met past a file's run (see [`FileScan::steps`]).
#[derive(Clone, Copy, Debug)]
struct Step {
    /// Which of the two files.
    file: usize,
    /// How many records past the end of the run: 0 for the header right there.
    hop: u64,
    offset: u64,
    header: Header,
}

/// What reading one journal file found.
struct FileScan {
    /// The records from offset 0 while each is whole, passes its checksum and continues the
    /// sequence by one, with their offsets.
    run: Vec<(u64, JournalRecord)>,
    /// Where the run ends.
    run_end: u64,
    /// The headers met stepping from `run_end` over each record by the length its header
    /// states, its checksum passing or not, until no header starts where the last one ends
    /// (at most [`LIVE_RECORDS_MAX`] steps).
    steps: Vec<Step>,
}

/// The header at `offset`, if one starts there: the magic, and a length no record exceeds.
fn read_header(file: &JournalFile, offset: u64, file_len: u64) -> Result<Option<Header>, LogStoreError> {
    if offset.saturating_add(HEADER_LEN as u64) > file_len {
        return Ok(None);
    }
    let mut bytes = [0u8; HEADER_LEN];
    file.file.read_exact_at(&mut bytes, offset).map_err(|error| journal_error(&file.path, error))?;
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if bytes[0..4] != MAGIC || len > MAX_JOURNAL_RECORD {
        return Ok(None);
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[8..16]);
    let mut sum = [0u8; 32];
    sum.copy_from_slice(&bytes[16..HEADER_LEN]);
    Ok(Some(Header { len, seq: u64::from_le_bytes(seq), sum }))
}

/// The payload of the record at `offset` and what state it is in (`None` when cut).
fn read_payload(
    file: &JournalFile,
    offset: u64,
    header: &Header,
    file_len: u64,
) -> Result<(RecordState, Option<Vec<u8>>), LogStoreError> {
    if header.end(offset) > file_len {
        return Ok((RecordState::Cut, None));
    }
    let mut payload = vec![0u8; header.len];
    file.file
        .read_exact_at(&mut payload, offset + HEADER_LEN as u64)
        .map_err(|error| journal_error(&file.path, error))?;
    let state = if checksum(header.seq, &payload) == header.sum { RecordState::Whole } else { RecordState::Damaged };
    Ok((state, Some(payload)))
}

/// Reads one file: its run from offset 0, then the headers past it (see [`FileScan`]).
fn scan_file(file: &JournalFile, which: usize) -> Result<FileScan, LogStoreError> {
    let file_len = file.len()?;
    let mut run: Vec<(u64, JournalRecord)> = Vec::new();
    let mut offset = 0u64;
    while let Some(header) = read_header(file, offset, file_len)? {
        if run.last().is_some_and(|(_, last)| last.seq.checked_add(1) != Some(header.seq)) {
            break;
        }
        let (RecordState::Whole, Some(payload)) = read_payload(file, offset, &header, file_len)? else { break };
        let rows = parse_rows(&payload)
            .ok_or_else(|| journal_error(&file.path, format!("record {} has malformed rows", header.seq)))?;
        run.push((offset, JournalRecord { seq: header.seq, rows }));
        offset = header.end(offset);
    }
    let run_end = offset;
    let mut steps = Vec::new();
    for hop in 0..LIVE_RECORDS_MAX {
        let Some(header) = read_header(file, offset, file_len)? else { break };
        steps.push(Step { file: which, hop, offset, header });
        offset = header.end(offset);
    }
    Ok(FileScan { run, run_end, steps })
}

/// The records after `checkpointed_seq` from both files, in sequence order: the ones replay
/// takes (see [`Journal::open`]).
///
/// # Which damage is a torn final record
///
/// Replay takes the records numbered `checkpointed_seq + 1` on while the sequence continues
/// by one, up to some `m`, from the files' runs (whole records from offset 0 whose checksums
/// pass). Record `m + 1` is then missing: never written, torn by a crash, or damaged. Only
/// records written since the last `fdatasync` can be torn, and only a synced record is ever
/// acknowledged; so record `m + 1` is discarded as a torn final record (with a warning) only
/// if nothing on disk shows that a record was written after it:
///
/// 1. no record of either file's run after `checkpointed_seq` is left over (one numbered
///    above `m`: a record of the file appends switched to while `m + 1` is in the one they
///    left, which was synced before the switch);
/// 2. no header at the start of a file is numbered from `m + 2` to `checkpointed_seq +`
///    [`LIVE_RECORDS_MAX`] (the torn first record of the file appends switched to);
/// 3. stepping from where a file's run ends over each record by the length its header
///    states (a damaged record's too), the `i`-th header met past the first is not numbered
///    `m + 1 + i` (the records after a damaged one in the same file).
///
/// Anything else is [`LogStoreError::JournalCorrupt`]: the log does not open, and the files
/// are left as they are. The two weaker signs the files might seem to offer do not work:
/// a file is rewritten from offset 0 after every checkpoint, so past its last record lie
/// leftovers of older records rather than zeros, and a header there may be bytes a client
/// wrote inside a value. Hence rule 3 trusts a header past the run only where the records
/// before it say one starts and only with the exact number it must have, and rule 2 only at
/// offset 0, where every header was written by the journal. What no rule can see: damage to
/// the magic or length of a record hides the records after it in the same file, which then
/// look like leftovers. And a power loss during a sync of several records can leave an
/// earlier one torn and a later one whole (the disk may persist unsynced writes in any
/// order); rules 1 and 3 report that as damage too: the node refuses to start rather than
/// guess, and is rebuilt from its peers (docs/operations.md). A process crash tears at most
/// the last write.
fn replay_records(files: &[JournalFile; 2], checkpointed_seq: u64) -> Result<Vec<JournalRecord>, LogStoreError> {
    let scans = [scan_file(&files[0], 0)?, scan_file(&files[1], 1)?];
    let steps: Vec<Step> = scans.iter().flat_map(|scan| scan.steps.iter().copied()).collect();
    let run_ends = [scans[0].run_end, scans[1].run_end];
    let runs_empty = [scans[0].run.is_empty(), scans[1].run.is_empty()];
    let mut after: Vec<(usize, u64, JournalRecord)> = Vec::new();
    for (which, scan) in scans.into_iter().enumerate() {
        after.extend(
            scan.run
                .into_iter()
                .filter(|(_, record)| record.seq > checkpointed_seq)
                .map(|(offset, record)| (which, offset, record)),
        );
    }
    after.sort_by_key(|(_, _, record)| record.seq);
    if let Some(pair) = after.windows(2).find(|pair| pair[0].2.seq == pair[1].2.seq) {
        let (file, offset, record) = &pair[1];
        return Err(LogStoreError::JournalCorrupt {
            path: files[*file].path.display().to_string(),
            offset: *offset,
            sequence: record.seq,
            first_index: record.rows.first().map(|(index, _)| *index),
            last_good_index: None,
            reason: format!("is also in {}", files[pair[0].0].path.display()),
        });
    }
    let taken = (1..)
        .zip(&after)
        .take_while(|(count, (_, _, record))| record.seq.checked_sub(checkpointed_seq) == Some(*count))
        .count();
    let missing = checkpointed_seq.saturating_add(taken as u64).saturating_add(1);
    let live_end = checkpointed_seq.saturating_add(LIVE_RECORDS_MAX);
    let later = after.get(taken).map(|(file, offset, record)| (*file, *offset, record.seq)).or_else(|| {
        steps
            .iter()
            .find(|step| {
                let seq = step.header.seq;
                (step.hop > 0 && seq == missing.saturating_add(step.hop))
                    || (step.offset == 0 && seq > missing && seq <= live_end)
            })
            .map(|step| (step.file, step.offset, step.header.seq))
    });
    // Where record `missing` is (or should start): after the run holding the record before
    // it, or at the start of a file (the first record after a checkpoint or a switch).
    let holder = after[..taken].last().map(|(file, _, _)| *file);
    let found = steps
        .iter()
        .filter(|step| step.hop == 0 && step.header.seq == missing)
        .filter(|step| holder.map_or(step.offset == 0, |file| step.file == file || step.offset == 0))
        .min_by_key(|step| Some(step.file) != holder);
    let Some((later_file, later_offset, later_seq)) = later else {
        if let Some(step) = found {
            tracing::warn!(
                path = %files[step.file].path.display(),
                offset = step.offset,
                seq = missing,
                "the journal ends in a torn record, never acknowledged; discarding it"
            );
        }
        after.truncate(taken);
        return Ok(after.into_iter().map(|(_, _, record)| record).collect());
    };
    let (file, offset, what) = match found {
        Some(step) => {
            let file_len = files[step.file].len()?;
            let what = match read_payload(&files[step.file], step.offset, &step.header, file_len)?.0 {
                RecordState::Cut => "is cut short by the end of the file",
                RecordState::Damaged => "fails its checksum",
                RecordState::Whole => "is whole but not where the records before it end",
            };
            (step.file, step.offset, what)
        }
        None => {
            let file = holder.unwrap_or_else(|| {
                // The first record after the checkpoint starts some file, one whose run is not
                // made of older records: preferably the one where the later record was found.
                if runs_empty[later_file] { later_file } else { 1 - later_file }
            });
            let offset = if holder.is_some() { run_ends[file] } else { 0 };
            (file, offset, "has no readable header")
        }
    };
    let last_good_index = after[..taken].last().and_then(|(_, _, record)| record.rows.last()).map(|(index, _)| *index);
    Err(LogStoreError::JournalCorrupt {
        path: files[file].path.display().to_string(),
        offset,
        sequence: missing,
        first_index: last_good_index.and_then(|index| index.checked_add(1)),
        last_good_index,
        reason: format!(
            "{what}, yet record {later_seq} was written after it ({} at byte {later_offset})",
            files[later_file].path.display()
        ),
    })
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

    /// Writes `count` records of two rows each (indexes 1, 2, then 3, 4, ...); returns each
    /// record's offset.
    fn write_records(journal: &mut Journal, count: u64) -> Vec<u64> {
        (0..count)
            .map(|record| {
                let offset = journal.offset;
                write(journal, &rows(record * 2 + 1, 2));
                offset
            })
            .collect()
    }

    fn damage(path: &Path, offset: u64, bytes: &[u8]) {
        let file = OpenOptions::new().write(true).open(path).expect("open file");
        file.write_all_at(bytes, offset).expect("damage");
    }

    fn flip(path: &Path, offset: u64) {
        let file = OpenOptions::new().read(true).write(true).open(path).expect("open file");
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, offset).expect("read");
        file.write_all_at(&[byte[0] ^ 0x5a], offset).expect("flip");
    }

    fn cut(path: &Path, len: u64) {
        OpenOptions::new().write(true).open(path).expect("open file").set_len(len).expect("truncate");
    }

    /// What a refused open names: file, offset, sequence, first index, last good index.
    fn refusal(
        result: Result<(Journal, Vec<JournalRecord>), LogStoreError>,
    ) -> (String, u64, u64, Option<u64>, Option<u64>) {
        match result {
            Err(LogStoreError::JournalCorrupt { path, offset, sequence, first_index, last_good_index, .. }) => {
                (path, offset, sequence, first_index, last_good_index)
            }
            Err(other) => panic!("not a damaged journal: {other}"),
            Ok((_, replay)) => panic!("opened and replayed {:?}", seqs(&replay)),
        }
    }

    fn name(path: &Path) -> String {
        path.display().to_string()
    }

    #[test]
    fn a_torn_final_record_is_discarded() {
        // Cut short by the end of the file (a crash while the file was being extended), or its
        // tail never reached the disk inside space already zero-filled.
        for zeroed_tail in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let paths = paths(&dir);
            let (mut journal, _) = Journal::open(&paths, 0).expect("open");
            let offsets = write_records(&mut journal, 3);
            let end = journal.offset;
            drop(journal);
            if zeroed_tail {
                damage(&paths[0], end - 10, &[0u8; 10]);
            } else {
                cut(&paths[0], offsets[2] + HEADER_LEN as u64 + 5);
            }
            let (_, replay) = Journal::open(&paths, 0).expect("reopen torn");
            assert_eq!(seqs(&replay), vec![1, 2]);
        }
    }

    #[test]
    fn a_damaged_record_with_records_after_it_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = paths(&dir);
        let (mut journal, _) = Journal::open(&paths, 0).expect("open");
        let offsets = write_records(&mut journal, 3);
        drop(journal);
        // A payload byte of the middle record: its checksum fails, record 3 follows.
        let payload_byte = offsets[1] + HEADER_LEN as u64 + 3;
        flip(&paths[0], payload_byte);
        let named = refusal(Journal::open(&paths, 0));
        assert_eq!(named, (name(&paths[0]), offsets[1], 2, Some(3), Some(2)));
        flip(&paths[0], payload_byte);
        let (_, replay) = Journal::open(&paths, 0).expect("the repaired journal opens");
        assert_eq!(seqs(&replay), vec![1, 2, 3]);
        // Its sequence number: the header no longer names it, but its length still leads to
        // record 3.
        flip(&paths[0], offsets[1] + 8);
        let named = refusal(Journal::open(&paths, 0));
        assert_eq!(named, (name(&paths[0]), offsets[1], 2, Some(3), Some(2)));
        flip(&paths[0], offsets[1] + 8);
        // The first record, followed by a record cut short: that one was written after it.
        flip(&paths[0], HEADER_LEN as u64 + 3);
        cut(&paths[0], offsets[1] + HEADER_LEN as u64 + 5);
        let named = refusal(Journal::open(&paths, 0));
        assert_eq!(named, (name(&paths[0]), 0, 1, None, None), "the store names the index before it");
    }

    #[test]
    fn damage_in_the_file_appends_left_refuses_to_open_while_the_other_has_records() {
        let last = JOURNAL_CHECKPOINT_RECORDS;
        let last_record_len = (HEADER_LEN + ROW_HEADER_LEN + format!("row {last}").len()) as u64;
        // The second file holds a whole record, or only the torn start of its first.
        for second_torn in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (paths, mut journal) = with_full_first_file(&dir);
            let end = journal.offset;
            journal.switch().expect("switch");
            write(&mut journal, &rows(last + 1, 1));
            drop(journal);
            if second_torn {
                cut(&paths[1], HEADER_LEN as u64 + 2);
                let (_, replay) = Journal::open(&paths, 0).expect("a torn first record of the second file");
                assert_eq!(replay.len() as u64, last, "is the torn final record");
            }
            // The first file was synced before the switch: only a disk fault damages it.
            damage(&paths[0], end - 8, &[0u8; 8]);
            let named = refusal(Journal::open(&paths, 0));
            assert_eq!(named, (name(&paths[0]), end - last_record_len, last, Some(last), Some(last - 1)));
        }
    }

    #[test]
    fn damaged_leftovers_of_older_records_are_not_damage_to_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = paths(&dir);
        let (mut journal, _) = Journal::open(&paths, 0).expect("open");
        // Records of one size, so that the old ones line up behind the new one.
        let offsets: Vec<u64> = (1..=4)
            .map(|index| {
                let offset = journal.offset;
                write(&mut journal, &rows(index, 1));
                offset
            })
            .collect();
        journal.checkpointed();
        write(&mut journal, &rows(5, 1));
        drop(journal);
        flip(&paths[0], offsets[2] + HEADER_LEN as u64 + 3);
        let (_, replay) = Journal::open(&paths, 4).expect("reopen");
        assert_eq!(seqs(&replay), vec![5]);
    }

    /// A header a client wrote inside a value, left behind in an old record where the new
    /// records end, is no later record: only the exact next numbers would be.
    #[test]
    fn headers_inside_old_rows_are_not_taken_for_later_records() {
        let forged = |seq: u64| -> Vec<u8> {
            let mut header = MAGIC.to_vec();
            header.extend_from_slice(&0u32.to_le_bytes());
            header.extend_from_slice(&seq.to_le_bytes());
            header.extend_from_slice(&[0u8; 32]);
            header
        };
        let lead = 20;
        let mut row = vec![0x55u8; lead];
        row.extend(forged(3));
        row.extend(forged(9));
        row.extend([0x55u8; 30]);
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = paths(&dir);
        let (mut journal, _) = Journal::open(&paths, 0).expect("open");
        write(&mut journal, &[(1, row)]);
        journal.checkpointed();
        // Record 2 ends exactly where the first forged header starts.
        write(&mut journal, &[(2, vec![1u8; lead])]);
        assert_eq!(journal.offset, (HEADER_LEN + ROW_HEADER_LEN + lead) as u64);
        drop(journal);
        let (_, replay) = Journal::open(&paths, 1).expect("reopen");
        assert_eq!(seqs(&replay), vec![2]);
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
        // Records 4 to 7 are missing: the journal does not continue the log's checkpoint.
        let (_, _, sequence, _, _) = refusal(Journal::open(&paths, 3));
        assert_eq!(sequence, 4);
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
