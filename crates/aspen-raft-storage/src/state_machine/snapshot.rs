//! Snapshots of the state machine: built with `VACUUM INTO` from a consistent read,
//! kept as a checksummed file, streamed in bounded chunks, received with every chunk
//! checked, and installed in one SQLite transaction.
//!
//! Durability order, which recovery relies on: a snapshot file is fsynced, then the
//! `current` record naming it is written (temp file, fsync, rename, fsync dir), and only
//! then may the log be purged or the live database replaced. On open, a state machine
//! behind its current snapshot reinstalls it (see `SqliteStateMachine::open`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aspen_api::limits::{MAX_SNAPSHOT_CHUNK_SIZE, MAX_SNAPSHOT_ENTRIES, MAX_SNAPSHOT_SIZE};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use super::meta::{self, AppliedState};
use super::schema::SCHEMA_VERSION;
use crate::error::SnapshotError;
use crate::type_config::SnapshotMeta;

/// A blake3 checksum of a whole snapshot file.
pub type Checksum = [u8; 32];

const CURRENT: &str = "current";

/// Snapshot data handed to openraft and the network: an open, sealed snapshot file.
/// Holding the handle keeps the bytes readable even if a newer snapshot replaces it.
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    size: u64,
    checksum: Checksum,
}

impl SnapshotFile {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// blake3 of the whole file.
    pub fn checksum(&self) -> Checksum {
        self.checksum
    }

    /// Reads up to `max_len` bytes at `offset` (at most [`MAX_SNAPSHOT_CHUNK_SIZE`]);
    /// an empty chunk means the end.
    pub fn read_chunk(&self, offset: u64, max_len: usize) -> Result<Vec<u8>, SnapshotError> {
        let len = max_len.min(MAX_SNAPSHOT_CHUNK_SIZE) as u64;
        let len = len.min(self.size.saturating_sub(offset)) as usize;
        let mut chunk = vec![0u8; len];
        self.file.read_exact_at(&mut chunk, offset)?;
        Ok(chunk)
    }

    /// Re-opens the same file for an independent reader.
    pub fn try_clone(&self) -> Result<SnapshotFile, SnapshotError> {
        Ok(SnapshotFile { file: self.file.try_clone()?, size: self.size, checksum: self.checksum })
    }
}

/// The record naming the current snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CurrentRecord {
    file_name: String,
    meta: SnapshotMeta,
    size: u64,
    checksum: Checksum,
}

/// The directory of snapshot files of one state machine.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    sequence: AtomicU64,
}

impl SnapshotStore {
    /// Opens (creating) the directory and removes leftovers of interrupted builds.
    pub fn open(dir: PathBuf) -> Result<Self, SnapshotError> {
        fs::create_dir_all(&dir)?;
        let current = read_current(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = name == CURRENT || current.as_ref().is_some_and(|record| record.file_name == name);
            if !keep {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(SnapshotStore { dir, sequence: AtomicU64::new(0) })
    }

    fn temp_path(&self, kind: &str) -> PathBuf {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{kind}-{}-{sequence}.tmp", std::process::id()))
    }

    /// The current snapshot, if any, opened for reading.
    pub fn current(&self) -> Result<Option<(SnapshotMeta, SnapshotFile)>, SnapshotError> {
        let Some(record) = read_current(&self.dir)? else { return Ok(None) };
        let file = File::open(self.dir.join(&record.file_name))?;
        Ok(Some((record.meta, SnapshotFile { file, size: record.size, checksum: record.checksum })))
    }

    /// Path of the current snapshot file, if any.
    pub fn current_path(&self) -> Result<Option<PathBuf>, SnapshotError> {
        Ok(read_current(&self.dir)?.map(|record| self.dir.join(record.file_name)))
    }

    /// Builds a snapshot of the database at `db_path` from one consistent read, makes it
    /// current and returns it. The meta is read from the snapshot itself, so it always
    /// describes exactly the data inside.
    pub fn build(&self, db_path: &Path) -> Result<(SnapshotMeta, SnapshotFile), SnapshotError> {
        let temp = self.temp_path("build");
        {
            super::heap::install();
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let source = Connection::open_with_flags(db_path, flags).map_err(invalid)?;
            let temp_str = temp.to_str().ok_or_else(|| SnapshotError::Invalid("non-UTF-8 data path".into()))?;
            source.execute("VACUUM INTO ?1", [temp_str]).map_err(invalid)?;
        }
        let result = self.seal(&temp, None);
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Validates a received or foreign snapshot, copies it in and makes it current.
    /// `expected` is the meta openraft says the snapshot has.
    pub fn adopt(
        &self,
        source: &SnapshotFile,
        expected: &SnapshotMeta,
    ) -> Result<(SnapshotMeta, SnapshotFile), SnapshotError> {
        let temp = self.temp_path("adopt");
        let result = copy_verified(source, &temp).and_then(|()| self.seal(&temp, Some(expected)));
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Checks a complete snapshot file at `temp`, fsyncs it, renames it into place and
    /// records it as current.
    fn seal(
        &self,
        temp: &Path,
        expected: Option<&SnapshotMeta>,
    ) -> Result<(SnapshotMeta, SnapshotFile), SnapshotError> {
        let size = fs::metadata(temp)?.len();
        if size > MAX_SNAPSHOT_SIZE {
            return Err(SnapshotError::TooLarge { size, max: MAX_SNAPSHOT_SIZE });
        }
        let applied = validate_database(temp)?;
        let meta = SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership.clone() };
        if let Some(expected) = expected
            && (expected.last_log_id != meta.last_log_id || expected.last_membership != meta.last_membership)
        {
            return Err(SnapshotError::Invalid(format!(
                "snapshot holds state at {:?} but was announced at {:?}",
                meta.last_log_id, expected.last_log_id
            )));
        }
        let checksum = checksum_file(temp)?;
        File::open(temp)?.sync_all()?;
        let index = meta.last_log_id.map_or(0, |log_id| log_id.index);
        let file_name = format!("snapshot-{index:020}-{}.db", hex(&checksum[..8]));
        let final_path = self.dir.join(&file_name);
        fs::rename(temp, &final_path)?;
        let previous = read_current(&self.dir)?;
        let record = CurrentRecord { file_name: file_name.clone(), meta: meta.clone(), size, checksum };
        self.write_current(&record)?;
        if let Some(previous) = previous
            && previous.file_name != file_name
        {
            fs::remove_file(self.dir.join(previous.file_name))?;
        }
        let file = File::open(&final_path)?;
        Ok((meta, SnapshotFile { file, size, checksum }))
    }

    fn write_current(&self, record: &CurrentRecord) -> Result<(), SnapshotError> {
        let bytes = postcard::to_stdvec(record).map_err(|error| SnapshotError::Invalid(error.to_string()))?;
        let temp = self.temp_path("current");
        {
            let mut file = File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        fs::rename(&temp, self.dir.join(CURRENT))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Starts receiving a snapshot of `size` bytes that must hash to `checksum`.
    pub fn receive(&self, size: u64, checksum: Checksum) -> Result<SnapshotReceiver, SnapshotError> {
        if size > MAX_SNAPSHOT_SIZE {
            return Err(SnapshotError::TooLarge { size, max: MAX_SNAPSHOT_SIZE });
        }
        let path = self.temp_path("receive");
        let file = OpenOptions::new().create_new(true).read(true).write(true).open(&path)?;
        Ok(SnapshotReceiver { path, file, expected_size: size, checksum, received: 0, hasher: blake3::Hasher::new() })
    }
}

/// Collects a snapshot streamed in chunks, checking order, size and checksum.
/// Dropping it before [`SnapshotReceiver::finish`] deletes the partial file.
#[derive(Debug)]
pub struct SnapshotReceiver {
    path: PathBuf,
    file: File,
    expected_size: u64,
    checksum: Checksum,
    received: u64,
    hasher: blake3::Hasher,
}

impl SnapshotReceiver {
    /// Appends the chunk that starts at `offset`.
    pub fn write_chunk(&mut self, offset: u64, chunk: &[u8]) -> Result<(), SnapshotError> {
        if chunk.len() > MAX_SNAPSHOT_CHUNK_SIZE {
            return Err(SnapshotError::ChunkTooLarge { size: chunk.len(), max: MAX_SNAPSHOT_CHUNK_SIZE });
        }
        if offset != self.received {
            return Err(SnapshotError::OutOfOrderChunk { expected: self.received, found: offset });
        }
        let end = self.received + chunk.len() as u64;
        if end > self.expected_size {
            return Err(SnapshotError::TooLarge { size: end, max: self.expected_size });
        }
        self.file.write_all(chunk)?;
        self.hasher.update(chunk);
        self.received = end;
        Ok(())
    }

    /// Checks the snapshot is whole and matches its checksum.
    pub fn finish(mut self) -> Result<SnapshotFile, SnapshotError> {
        if self.received != self.expected_size {
            return Err(SnapshotError::Truncated { received: self.received, expected: self.expected_size });
        }
        let computed = *self.hasher.finalize().as_bytes();
        if computed != self.checksum {
            return Err(SnapshotError::ChecksumMismatch { expected: hex(&self.checksum), computed: hex(&computed) });
        }
        self.file.sync_all()?;
        let file = self.file.try_clone()?;
        // The handle keeps the bytes; the name is no longer needed.
        fs::remove_file(&self.path)?;
        self.path = PathBuf::new();
        Ok(SnapshotFile { file, size: self.expected_size, checksum: self.checksum })
    }
}

impl Drop for SnapshotReceiver {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Opens a snapshot database read-only and checks that it is an intact Aspen state
/// machine within the limits; returns the applied state it holds.
pub fn validate_database(path: &Path) -> Result<AppliedState, SnapshotError> {
    super::heap::install();
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(invalid)?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |row| row.get(0)).map_err(invalid)?;
    if check != "ok" {
        return Err(SnapshotError::Invalid(format!("integrity check failed: {check}")));
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(invalid)?;
    if version != SCHEMA_VERSION {
        return Err(SnapshotError::Invalid(format!("schema version {version}, expected {SCHEMA_VERSION}")));
    }
    let count: u64 = conn.query_row("SELECT COUNT(*) FROM kv_store", [], |row| row.get(0)).map_err(invalid)?;
    if count > MAX_SNAPSHOT_ENTRIES {
        return Err(SnapshotError::TooManyEntries { count, max: MAX_SNAPSHOT_ENTRIES });
    }
    meta::read_applied(&conn).map_err(|error| SnapshotError::Invalid(error.to_string()))
}

fn copy_verified(source: &SnapshotFile, dest: &Path) -> Result<(), SnapshotError> {
    if source.size > MAX_SNAPSHOT_SIZE {
        return Err(SnapshotError::TooLarge { size: source.size, max: MAX_SNAPSHOT_SIZE });
    }
    let mut out = OpenOptions::new().create_new(true).write(true).open(dest)?;
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    loop {
        let chunk = source.read_chunk(offset, MAX_SNAPSHOT_CHUNK_SIZE)?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(&chunk);
        out.write_all(&chunk)?;
        offset += chunk.len() as u64;
    }
    let computed = *hasher.finalize().as_bytes();
    if computed != source.checksum {
        return Err(SnapshotError::ChecksumMismatch { expected: hex(&source.checksum), computed: hex(&computed) });
    }
    Ok(())
}

fn checksum_file(path: &Path) -> Result<Checksum, SnapshotError> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(*hasher.finalize().as_bytes())
}

fn read_current(dir: &Path) -> Result<Option<CurrentRecord>, SnapshotError> {
    let bytes = match fs::read(dir.join(CURRENT)) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    postcard::from_bytes(&bytes)
        .map(Some)
        .map_err(|error| SnapshotError::Invalid(format!("current snapshot record: {error}")))
}

fn invalid(error: rusqlite::Error) -> SnapshotError {
    SnapshotError::Invalid(error.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
