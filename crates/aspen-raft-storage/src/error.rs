//! Typed storage errors. openraft's traits speak `std::io::Error`; ours wrap into it with
//! `io::Error::other` / `InvalidData` so callers can downcast back to these.

use std::io;

use aspen_api::ValidationError;

/// Failures of the redb Raft log.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// A stored entry's hash does not match the one the chain computes: the log was
    /// tampered with or corrupted. Never repaired silently.
    #[error("log corruption at index {index}: stored hash {found} but the chain computes {expected}")]
    ChainMismatch {
        /// Index of the first entry whose hash fails.
        index: u64,
        /// Hash the chain computes (hex).
        expected: String,
        /// Hash stored with the entry (hex).
        found: String,
    },
    /// A stored entry cannot be decoded, or disagrees with its own row.
    #[error("log entry {index} is malformed: {reason}")]
    MalformedEntry {
        /// Index of the entry.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Entries are missing from the middle of the log.
    #[error("log has a gap: expected entry {expected}, found entry {found}")]
    Gap {
        /// The index that should follow.
        expected: u64,
        /// The index found instead.
        found: u64,
    },
    /// Metadata (vote, committed, purge point) cannot be decoded.
    #[error("log metadata {name:?} is malformed: {reason}")]
    MalformedMeta {
        /// Which metadata record.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The database file is damaged beyond what redb can report as an error.
    #[error("log file {path} is corrupted: {reason}")]
    Corrupted {
        /// The file.
        path: String,
        /// What failed while reading it.
        reason: String,
    },
    /// An append would leave a gap after the current last entry.
    #[error("append at index {found} does not follow the last entry {last}")]
    NonContiguousAppend {
        /// The current last index.
        last: u64,
        /// The first index appended.
        found: u64,
    },
    /// An entry is larger than the log accepts.
    #[error("entry {index} is {size} bytes encoded, the limit is {max}")]
    EntryTooLarge {
        /// Index of the entry.
        index: u64,
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Too many entries in one append.
    #[error("append of {count} entries exceeds the batch limit {max}")]
    BatchTooLarge {
        /// Entries in the append.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The log's journal could not be read or written.
    #[error("log journal {path}: {reason}")]
    Journal {
        /// The journal file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// A journal record is damaged and records written after it exist: replaying only the
    /// records before it would drop entries that may have been acknowledged, so the log does
    /// not open. Never skipped: only a torn final record is (see `log::journal`).
    #[error(
        "log journal {path} is damaged at byte {offset}: record {sequence}{} {reason}; replaying only the \
         records before it would lose entries that may have been acknowledged, so the log does not open",
        index_note(*.first_index, *.last_good_index)
    )]
    JournalCorrupt {
        /// The journal file holding the damaged record (or where it should start).
        path: String,
        /// Where in that file the damaged record starts.
        offset: u64,
        /// The journal sequence number of the damaged record.
        sequence: u64,
        /// The first log index the damaged record held, when known: the one after
        /// `last_good_index`.
        first_index: Option<u64>,
        /// The last log index before the damaged record that is intact (in the journal or in
        /// redb), when there is one.
        last_good_index: Option<u64>,
        /// What is wrong with the record and which later record shows it was not the last.
        reason: String,
    },
    /// redb failed.
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// Encoding an entry failed.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The blocking storage task died.
    #[error("storage task failed: {0}")]
    Task(String),
}

impl LogStoreError {
    /// Whether the error means stored data is damaged (as opposed to an I/O or usage error).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            LogStoreError::ChainMismatch { .. }
                | LogStoreError::MalformedEntry { .. }
                | LogStoreError::Gap { .. }
                | LogStoreError::MalformedMeta { .. }
                | LogStoreError::Corrupted { .. }
                | LogStoreError::JournalCorrupt { .. }
        ) || matches!(self, LogStoreError::Redb(redb::Error::Corrupted(_)))
    }
}

impl From<LogStoreError> for io::Error {
    fn from(error: LogStoreError) -> io::Error {
        let kind = if error.is_corruption() { io::ErrorKind::InvalidData } else { io::ErrorKind::Other };
        io::Error::new(kind, error)
    }
}

/// The log indexes a [`LogStoreError::JournalCorrupt`] message names, when known.
fn index_note(first_index: Option<u64>, last_good_index: Option<u64>) -> String {
    match (first_index, last_good_index) {
        (Some(first), _) => format!(" (log entries from index {first})"),
        (None, Some(last)) => format!(" (the entries after index {last})"),
        (None, None) => String::new(),
    }
}

/// Converts any redb error type into [`LogStoreError`].
pub(crate) fn redb_error(error: impl Into<redb::Error>) -> LogStoreError {
    LogStoreError::Redb(error.into())
}

/// Failures of the SQLite state machine.
#[derive(Debug, thiserror::Error)]
pub enum StateMachineError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Every read connection stayed busy for the whole wait.
    #[error("all {size} read connections busy for {waited:?}")]
    PoolExhausted {
        /// Connections in the pool.
        size: usize,
        /// How long the read waited.
        waited: std::time::Duration,
    },
    /// Stored metadata cannot be decoded.
    #[error("state machine metadata {name:?} is malformed: {reason}")]
    MalformedMeta {
        /// Which metadata record.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry's application data cannot be encoded.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The request broke a limit.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// A snapshot operation failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// File-system I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The blocking storage task died.
    #[error("storage task failed: {0}")]
    Task(String),
}

impl From<StateMachineError> for io::Error {
    fn from(error: StateMachineError) -> io::Error {
        match error {
            StateMachineError::Io(error) => error,
            StateMachineError::Snapshot(SnapshotError::Io(error)) => error,
            StateMachineError::Snapshot(error) => io::Error::new(io::ErrorKind::InvalidData, error),
            other => io::Error::other(other),
        }
    }
}

/// Failures building, streaming, receiving or installing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A chunk did not start where the previous one ended.
    #[error("snapshot chunk at offset {found} does not follow the {expected} bytes received")]
    OutOfOrderChunk {
        /// Bytes received so far.
        expected: u64,
        /// The chunk's offset.
        found: u64,
    },
    /// A chunk is larger than the chunk limit.
    #[error("snapshot chunk of {size} bytes exceeds the chunk limit {max}")]
    ChunkTooLarge {
        /// Size of the chunk.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The snapshot is larger than the snapshot limit.
    #[error("snapshot of {size} bytes exceeds the limit {max}")]
    TooLarge {
        /// Size of the snapshot.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The snapshot holds more keys than the limit.
    #[error("snapshot holds {count} keys, the limit is {max}")]
    TooManyEntries {
        /// Keys in the snapshot.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// The received bytes are fewer than announced.
    #[error("snapshot is truncated: received {received} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        received: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// The received bytes do not hash to the announced checksum.
    #[error("snapshot checksum mismatch: expected {expected}, computed {computed}")]
    ChecksumMismatch {
        /// The announced checksum (hex).
        expected: String,
        /// The checksum of the received bytes (hex).
        computed: String,
    },
    /// The bytes are not a valid Aspen state-machine database.
    #[error("snapshot is not a valid state machine: {0}")]
    Invalid(String),
    /// File-system I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// Failures of the read-only SQL entry point.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The request broke a bound.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The statement would modify the database; only SELECT is allowed.
    #[error("only read-only SELECT statements are allowed")]
    NotReadOnly,
    /// The statement touches something other than the `kv` view.
    #[error("not authorized: {0} (only the `kv` view can be queried)")]
    Denied(String),
    /// More than one statement was given.
    #[error("exactly one statement is allowed")]
    MultipleStatements,
    /// The query ran longer than its timeout and was interrupted.
    #[error("query interrupted after {timeout_ms} ms")]
    Timeout {
        /// The timeout.
        timeout_ms: u64,
    },
    /// The query built a string, blob or row, or a result, larger than one reply carries.
    #[error("query result or a value it builds exceeds {max_bytes} bytes")]
    TooLarge {
        /// The limit.
        max_bytes: usize,
    },
    /// The query needed more memory than one query may use.
    #[error("query needs more than {max_bytes} bytes of memory")]
    OutOfMemory {
        /// The limit.
        max_bytes: usize,
    },
    /// The query is not valid SQL or failed while running.
    #[error("query failed: {0}")]
    Invalid(String),
    /// The state machine could not serve the query.
    #[error(transparent)]
    Storage(#[from] Box<StateMachineError>),
}
