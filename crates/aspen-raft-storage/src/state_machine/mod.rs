//! The state machine in SQLite.
//!
//! One writer connection applies each batch of committed entries in one transaction,
//! together with last_applied and membership. Reads go through a bounded pool of read-only
//! connections and run concurrently with applies (WAL mode). Snapshots are files built
//! by `VACUUM INTO` (see [`snapshot`]).

pub mod apply;
pub mod boot;
mod heap;
pub mod meta;
mod pool;
pub mod read;
pub mod schema;
pub mod session;
pub mod snapshot;
pub mod sql;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aspen_api::limits::MAX_BATCH_SIZE;
use aspen_api::{GetResponse, ScanRequest, ScanResponse, SqlRequest, SqlResponse, WriteCommand, validate_key};
use futures::{Stream, TryStreamExt};
use openraft::EntryPayload;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use rusqlite::{Connection, TransactionBehavior};

pub use self::boot::{Durability, Opened};
use self::meta::AppliedState;
use self::pool::ReadPool;
pub use self::pool::{READ_POOL_SIZE, READ_POOL_WAIT};
use self::snapshot::{SnapshotFile, SnapshotStore};
use crate::close::{CloseSignal, CloseWatch};
use crate::error::{SnapshotError, SqlError, StateMachineError};
use crate::type_config::{Entry, EntryResponse, LogId, SnapshotMeta, StoredMembership, TypeConfig};

/// File name of the live database inside the state machine's directory.
pub const DB_FILE: &str = "state.db";

/// WAL size (pages) after which a checkpoint starts, without fsync ([`Durability::Unsynced`]):
/// 8 MiB at the 2 KiB [`schema::PAGE_SIZE`], 16 MiB in a file made with 4 KiB pages. A
/// checkpoint copies each page once however many frames hold it, so a longer WAL copies
/// fewer pages per write (same-run A/B against 1024: put x16 5311/5623 -> 5624/5929
/// ops/s). The async apply starts it in the background (a connection of its own, PASSIVE:
/// it never blocks applies or reads); the synchronous `apply_entries` runs it on the writer.
pub const CHECKPOINT_WAL_PAGES: u64 = 4096;
/// The same for [`Durability::Synced`], where a checkpoint fsyncs the WAL and then the
/// database: 2 MiB at 2 KiB pages, 4 MiB at 4 KiB. At 16 MiB the write p99 doubled: its
/// fsync of up to 4096 pages queued the log journal's fdatasync behind it.
pub const SYNCED_CHECKPOINT_WAL_PAGES: u64 = 1024;
/// WAL size at which the async apply checkpoints on the writer and waits for it, as a
/// multiple of the checkpoint size: the WAL's bound. Under sustained writes a background
/// checkpoint never copies the frames appended while it ran, so the WAL cannot start over
/// by itself; the writer's checkpoint finds most frames already copied and is short. The
/// WAL holds at most this plus one apply's pages (unless a long read pins old frames;
/// reads are bounded by their timeouts).
pub const MAX_WAL_CHECKPOINTS: u64 = 4;
/// Most write operations in one apply run inline on the async worker; bigger applies
/// (and range deletes, whose cost the command does not tell) go to a blocking thread.
pub const INLINE_APPLY_MAX_OPS: usize = 256;

/// Largest scan limit served inline on an async worker by [`StateMachineReader::try_scan_now`].
pub const INLINE_SCAN_LIMIT: u32 = 1000;

/// A snapshot under [`TypeConfig`] with file-backed data.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>;

/// The SQLite state machine. Cheap to clone: clones share the writer and the pool.
#[derive(Clone)]
pub struct SqliteStateMachine {
    shared: Arc<Shared>,
}

struct Shared {
    db_path: PathBuf,
    /// How the file survives crashes (see [`boot`]).
    durability: Durability,
    /// Whether open found a file it kept or one it discarded.
    opened: Opened,
    writer: Mutex<Writer>,
    snapshots: SnapshotStore,
    reader: StateMachineReader,
    /// Pages in the WAL after the last commit (the writer's WAL hook records it).
    wal_pages: Arc<AtomicU64>,
    /// WAL checkpoints run since open.
    checkpoints: AtomicU64,
    /// Held by a running checkpoint: one at a time, and the writer's waits for the
    /// background one instead of failing busy.
    checkpoint_lock: Arc<tokio::sync::Mutex<()>>,
    /// Set once everything above is closed (declared last: fields drop in order, after
    /// `Drop::drop` has made the file durable).
    closed: CloseSignal,
}

/// Tells when the state machine's files are closed (see [`crate::close`]).
pub type StateMachineWatch = CloseWatch;

struct Writer {
    conn: Connection,
    applied: AppliedState,
    /// Session rows as last committed (taken for each apply, given back after its commit).
    sessions: session::SessionCache,
}

/// Serves reads from the pool of read-only connections. Cheap to clone.
#[derive(Clone)]
pub struct StateMachineReader {
    pool: Arc<ReadPool>,
}

impl SqliteStateMachine {
    /// Opens (or creates) the state machine in `dir`, without fsync where the OS names its
    /// boot ([`Durability::for_this_boot`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StateMachineError> {
        Self::open_with(dir, Durability::for_this_boot())
    }

    /// Opens (or creates) the state machine in `dir`. A file written without fsync under
    /// another boot is deleted first (see [`boot`]). If the database is then behind the
    /// current snapshot (deleted, or its last commits lost in a crash after the log was
    /// purged), the snapshot is reinstalled before anything else; openraft re-applies the
    /// log after it.
    pub fn open_with(dir: impl AsRef<Path>, durability: Durability) -> Result<Self, StateMachineError> {
        // Before the process's first SQLite connection, so SQL queries get a heap budget.
        heap::install();
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let opened = boot::prepare(dir, &durability)?;
        let db_path = dir.join(DB_FILE);
        let mut conn = Connection::open(&db_path)?;
        schema::configure_writer(&conn, durability.synchronous())?;
        // The hook replaces SQLite's automatic checkpoint, which would run inside the
        // commit: Aspen checkpoints after the apply instead, off the async worker (see
        // `Shared::checkpoint`).
        let wal_pages = Arc::new(AtomicU64::new(0));
        let hook_pages = Arc::clone(&wal_pages);
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            hook_pages.store(u64::try_from(pages).unwrap_or(0), Ordering::Relaxed);
            Ok(())
        }))?;
        let applied = meta::read_applied(&conn)?;
        let snapshots = SnapshotStore::open(dir.join("snapshots"))?;
        let pool = Arc::new(ReadPool::open(db_path.clone())?);
        let shared = Shared {
            db_path,
            durability,
            opened,
            writer: Mutex::new(Writer { conn, applied, sessions: session::SessionCache::default() }),
            snapshots,
            reader: StateMachineReader { pool },
            wal_pages,
            checkpoints: AtomicU64::new(0),
            checkpoint_lock: Arc::new(tokio::sync::Mutex::new(())),
            closed: CloseSignal::default(),
        };
        let state_machine = SqliteStateMachine { shared: Arc::new(shared) };
        if let Some((meta, _)) = state_machine.shared.snapshots.current()? {
            let applied = state_machine.shared.lock_writer().applied.last_applied;
            if meta.last_log_id > applied {
                tracing::warn!(?applied, snapshot = ?meta.last_log_id, "state machine is behind its snapshot; reinstalling");
                state_machine.shared.load_snapshot_into_db(&meta)?;
            }
        }
        Ok(state_machine)
    }

    /// A watch that tells when this state machine's files are closed.
    pub fn watch(&self) -> StateMachineWatch {
        self.shared.closed.watch()
    }

    /// Whether open kept the database it found or discarded it (see [`boot`]).
    pub fn opened(&self) -> Opened {
        self.shared.opened
    }

    /// A handle for reads.
    pub fn reader(&self) -> StateMachineReader {
        self.shared.reader.clone()
    }

    /// The last applied log id and membership.
    pub fn applied_state_now(&self) -> AppliedState {
        self.shared.lock_writer().applied.clone()
    }

    /// WAL pages after which a checkpoint starts; the WAL's bound is
    /// [`MAX_WAL_CHECKPOINTS`] times this.
    pub fn checkpoint_wal_pages(&self) -> u64 {
        self.shared.durability.checkpoint_wal_pages()
    }

    /// Pages in the write-ahead log after the last apply.
    pub fn wal_pages(&self) -> u64 {
        self.shared.wal_pages.load(Ordering::Relaxed)
    }

    /// WAL checkpoints run since open.
    pub fn checkpoints(&self) -> u64 {
        self.shared.checkpoints.load(Ordering::Relaxed)
    }

    /// Applies entries synchronously in one transaction and returns one response per
    /// entry. Used by [`RaftStateMachine::apply`] and by tests and benchmarks.
    pub fn apply_entries(&self, entries: &[Entry]) -> Result<Vec<EntryResponse>, StateMachineError> {
        let responses = self.shared.apply_entries(entries)?;
        if self.shared.checkpoint_due() {
            self.shared.checkpoint()?;
        }
        Ok(responses)
    }

    /// Builds a snapshot now and makes it current.
    pub fn build_snapshot_now(&self) -> Result<(SnapshotMeta, SnapshotFile), StateMachineError> {
        Ok(self.shared.snapshots.build(&self.shared.db_path)?)
    }

    /// Installs a snapshot: validates and keeps a copy, then replaces the data.
    pub fn install_snapshot_now(&self, meta: &SnapshotMeta, file: &SnapshotFile) -> Result<(), StateMachineError> {
        let (meta, _) = self.shared.snapshots.adopt(file, meta)?;
        self.shared.load_snapshot_into_db(&meta)
    }

    /// The current snapshot, if any.
    pub fn current_snapshot(&self) -> Result<Option<(SnapshotMeta, SnapshotFile)>, StateMachineError> {
        Ok(self.shared.snapshots.current()?)
    }

    /// Starts receiving a streamed snapshot of `size` bytes with blake3 `checksum`.
    pub fn receive_snapshot(&self, size: u64, checksum: [u8; 32]) -> Result<snapshot::SnapshotReceiver, SnapshotError> {
        self.shared.snapshots.receive(size, checksum)
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, StateMachineError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StateMachineError> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        crate::rt::blocking(move || work(&shared)).await.map_err(StateMachineError::Task)?
    }
}

impl Shared {
    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // `applied` is only replaced after a successful commit, so a writer poisoned by a
        // panic elsewhere still describes the database correctly.
        self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply_entries(&self, entries: &[Entry]) -> Result<Vec<EntryResponse>, StateMachineError> {
        let mut writer = self.lock_writer();
        let mut applied = writer.applied.clone();
        // Taken out: if anything below fails, the cache is dropped with the transaction.
        let mut sessions = session::Sessions::with_cache(std::mem::take(&mut writer.sessions));
        let txn = writer.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut responses = Vec::with_capacity(entries.len());
        let mut membership_changed = false;
        let clock_before = applied.cluster_time_ms;
        for entry in entries {
            let index = entry.log_id.index;
            let response = match &entry.payload {
                EntryPayload::Blank => EntryResponse::NoOp,
                EntryPayload::Normal(proposal) => {
                    let now_ms = applied.cluster_time_ms.max(proposal.time_ms);
                    sessions.sweep_if_due(&txn, applied.cluster_time_ms, now_ms)?;
                    applied.cluster_time_ms = now_ms;
                    let mut results = Vec::with_capacity(proposal.writes.len());
                    for write in &proposal.writes {
                        results.push(sessions.apply(&txn, index, now_ms, write)?);
                    }
                    EntryResponse::Writes(results)
                }
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                    membership_changed = true;
                    EntryResponse::NoOp
                }
            };
            applied.last_applied = Some(entry.log_id);
            responses.push(response);
        }
        sessions.flush(&txn)?;
        meta::write_applied(&txn, &applied, membership_changed, applied.cluster_time_ms != clock_before)?;
        txn.commit()?;
        writer.applied = applied;
        writer.sessions = sessions.into_cache();
        Ok(responses)
    }

    /// Replaces the live data with the snapshot's in one transaction: a crash leaves
    /// either the old state or the new one, never a mix.
    fn load_snapshot_into_db(&self, meta: &SnapshotMeta) -> Result<(), StateMachineError> {
        let snapshot_path = self.snapshots_current_path()?;
        let mut writer = self.lock_writer();
        writer.sessions = session::SessionCache::default();
        let path = snapshot_path.to_str().ok_or_else(|| SnapshotError::Invalid("non-UTF-8 data path".into()))?;
        writer.conn.execute("ATTACH DATABASE ?1 AS snap", [format!("file:{path}?mode=ro")])?;
        let result = (|| -> Result<AppliedState, StateMachineError> {
            let txn = writer.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            txn.execute_batch(
                "DELETE FROM main.kv_store;
                 INSERT INTO main.kv_store SELECT * FROM snap.kv_store;
                 DELETE FROM main.leases;
                 INSERT INTO main.leases SELECT * FROM snap.leases;
                 DELETE FROM main.sessions;
                 INSERT INTO main.sessions SELECT * FROM snap.sessions;
                 DELETE FROM main.raft_meta;
                 INSERT INTO main.raft_meta SELECT * FROM snap.raft_meta;",
            )?;
            let applied = meta::read_applied(&txn)?;
            if applied.last_applied != meta.last_log_id {
                return Err(SnapshotError::Invalid(format!(
                    "snapshot holds state at {:?}, expected {:?}",
                    applied.last_applied, meta.last_log_id
                ))
                .into());
            }
            txn.commit()?;
            Ok(applied)
        })();
        writer.conn.execute("DETACH DATABASE snap", [])?;
        writer.applied = result?;
        Ok(())
    }

    fn checkpoint_due(&self) -> bool {
        self.wal_pages.load(Ordering::Relaxed) >= self.durability.checkpoint_wal_pages()
    }

    /// A PASSIVE checkpoint on a connection of its own, concurrent with applies and reads.
    fn background_checkpoint(&self) -> Result<(), StateMachineError> {
        let conn = Connection::open(&self.db_path)?;
        conn.pragma_update(None, "synchronous", self.durability.synchronous())?;
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copies the WAL into the database file on the writer connection, between applies (as
    /// SQLite's automatic checkpoint would, inside the commit): with no writer running, every
    /// frame is copied and the next commit starts the WAL from its beginning.
    fn checkpoint(&self) -> Result<(), StateMachineError> {
        let writer = self.lock_writer();
        writer.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        self.wal_pages.store(0, Ordering::Relaxed);
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes an unsynced database durable as it stands and marks it clean, so a later boot
    /// keeps it instead of rebuilding it: every WAL frame copied into the file (the WAL
    /// truncated), the file and the WAL fsynced, then the marker.
    fn close_durably(&mut self) -> Result<(), StateMachineError> {
        let writer = self.writer.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        writer.conn.pragma_update(None, "synchronous", "FULL")?;
        let busy: i64 = writer.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))?;
        if busy != 0 {
            return Err(StateMachineError::Io(io::Error::other("the closing checkpoint found the database busy")));
        }
        std::fs::File::open(&self.db_path)?.sync_all()?;
        let wal = self.db_path.with_file_name(format!("{DB_FILE}-wal"));
        if wal.exists() {
            std::fs::File::open(&wal)?.sync_all()?;
        }
        let dir = self.db_path.parent().ok_or_else(|| io::Error::other("database path has no directory"))?;
        boot::mark_clean(dir)?;
        Ok(())
    }

    fn snapshots_current_path(&self) -> Result<PathBuf, StateMachineError> {
        self.snapshots
            .current_path()?
            .ok_or_else(|| SnapshotError::Invalid("no current snapshot to load".into()).into())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if matches!(self.durability, Durability::Unsynced { .. })
            && let Err(error) = self.close_durably()
        {
            // The marker still names this boot: after an OS restart the file is rebuilt.
            tracing::warn!(%error, "state machine closed without a durable checkpoint");
        }
    }
}

impl StateMachineReader {
    /// Reads one key from the local state machine.
    pub fn get(&self, key: &[u8]) -> Result<GetResponse, StateMachineError> {
        validate_key(key)?;
        let mut conn = self.pool.get()?;
        Ok(read::get(&mut conn, key)?)
    }

    /// Reads one key without waiting: `None` when every pooled connection is busy. For
    /// callers on an async worker, where a point read (microseconds) costs less than a hop
    /// to a blocking thread; they fall back to [`Self::get`] on a blocking thread.
    pub fn try_get_now(&self, key: &[u8]) -> Option<Result<GetResponse, StateMachineError>> {
        if let Err(error) = validate_key(key) {
            return Some(Err(error.into()));
        }
        self.try_read_now(|conn| read::get(conn, key))
    }

    /// Scans without waiting, like [`Self::try_get_now`]; `None` also for scans that may
    /// return more than [`INLINE_SCAN_LIMIT`] keys, which belong on a blocking thread.
    pub fn try_scan_now(&self, request: &ScanRequest) -> Option<Result<ScanResponse, StateMachineError>> {
        if request.limit == 0 || request.limit > INLINE_SCAN_LIMIT {
            return None;
        }
        if let Err(error) = request.validate() {
            return Some(Err(error.into()));
        }
        self.try_read_now(|conn| read::scan(conn, request))
    }

    /// Runs `read` on a pooled connection if one is free now; `None` instead of waiting.
    fn try_read_now<T>(
        &self,
        read: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Option<Result<T, StateMachineError>> {
        match self.pool.try_get() {
            Ok(Some(mut conn)) => Some(read(&mut conn).map_err(StateMachineError::from)),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        }
    }

    /// Scans a range from the local state machine.
    pub fn scan(&self, request: &ScanRequest) -> Result<ScanResponse, StateMachineError> {
        request.validate()?;
        let mut conn = self.pool.get()?;
        Ok(read::scan(&mut conn, request)?)
    }

    /// Runs a read-only SQL query over the `kv` view.
    pub fn sql(&self, request: &SqlRequest) -> Result<SqlResponse, SqlError> {
        let mut conn = self.pool.get().map_err(|error| SqlError::Storage(Box::new(error)))?;
        let result = sql::run_query(&mut conn, request);
        if matches!(result, Err(SqlError::OutOfMemory { .. })) {
            // SQLite recovers from a failed allocation, but a fresh connection need not.
            conn.discard();
        }
        result
    }

    /// A blake3 digest of every key (with its value, revisions and lease), every lease and
    /// every client session,
    /// with the revision it reflects, read in one transaction. Replicas at the same revision
    /// must have equal digests; the simulator checks it.
    pub fn digest(&self) -> Result<(u64, [u8; 32]), StateMachineError> {
        let mut conn = self.pool.get()?;
        let txn = conn.transaction()?;
        let revision = meta::read_revision(&txn)?;
        let mut hasher = blake3::Hasher::new();
        {
            let mut rows = txn.prepare_cached(
                "SELECT key, value, create_revision, mod_revision, version, lease FROM kv_store ORDER BY key",
            )?;
            let mut rows = rows.query([])?;
            while let Some(row) = rows.next()? {
                for column in 0..2 {
                    let bytes: Vec<u8> = row.get(column)?;
                    hasher.update(&(bytes.len() as u64).to_le_bytes());
                    hasher.update(&bytes);
                }
                for column in 2..5 {
                    hasher.update(&row.get::<_, i64>(column)?.to_le_bytes());
                }
                hasher.update(&row.get::<_, Option<i64>>(5)?.unwrap_or(-1).to_le_bytes());
            }
            let mut leases = txn.prepare_cached("SELECT id, ttl_secs, granted_revision FROM leases ORDER BY id")?;
            let mut leases = leases.query([])?;
            while let Some(row) = leases.next()? {
                for column in 0..3 {
                    hasher.update(&row.get::<_, i64>(column)?.to_le_bytes());
                }
            }
            let mut sessions = txn.prepare_cached("SELECT id, last_used_ms, state FROM sessions ORDER BY id")?;
            let mut sessions = sessions.query([])?;
            while let Some(row) = sessions.next()? {
                for column in [0, 2] {
                    let bytes: Vec<u8> = row.get(column)?;
                    hasher.update(&(bytes.len() as u64).to_le_bytes());
                    hasher.update(&bytes);
                }
                hasher.update(&row.get::<_, i64>(1)?.to_le_bytes());
            }
        }
        txn.commit()?;
        Ok((revision, *hasher.finalize().as_bytes()))
    }

    /// The applied index as seen by readers.
    pub fn revision(&self) -> Result<u64, StateMachineError> {
        let conn = self.pool.get()?;
        Ok(meta::read_revision(&conn)?)
    }
}

/// Builds snapshots on request from openraft.
pub struct SqliteSnapshotBuilder {
    state_machine: SqliteStateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SqliteSnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, snapshot) =
            self.state_machine.blocking(|shared| Ok(shared.snapshots.build(&shared.db_path)?)).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, size = snapshot.size(), "built snapshot");
        Ok(Snapshot { meta, snapshot })
    }
}

impl SqliteStateMachine {
    /// Starts a background checkpoint past the checkpoint size; at [`MAX_WAL_CHECKPOINTS`]
    /// times it waits
    /// for any background one, then checkpoints on the writer (on a blocking thread). A
    /// failed checkpoint is retried after the next apply; the applied data is committed
    /// either way.
    async fn checkpoint_if_due(&self) {
        let pages = self.shared.wal_pages.load(Ordering::Relaxed);
        let checkpoint_pages = self.shared.durability.checkpoint_wal_pages();
        if pages >= MAX_WAL_CHECKPOINTS * checkpoint_pages {
            let _running = self.shared.checkpoint_lock.lock().await;
            if let Err(error) = self.blocking(|shared| shared.checkpoint()).await {
                tracing::warn!(%error, pages, "WAL checkpoint on the writer failed; retrying after the next apply");
            }
        } else if pages >= checkpoint_pages
            && let Ok(running) = Arc::clone(&self.shared.checkpoint_lock).try_lock_owned()
        {
            let state_machine = self.clone();
            crate::rt::spawn(async move {
                if let Err(error) = state_machine.blocking(|shared| shared.background_checkpoint()).await {
                    tracing::warn!(%error, "background WAL checkpoint failed");
                }
                drop(running);
            });
        }
    }
}

/// How many write operations applying `entries` takes, as far as the commands tell; range
/// deletes and lease revokes count as `INLINE_APPLY_MAX_OPS` (their cost depends on the data).
fn apply_ops(entries: &[Entry]) -> usize {
    fn ops(command: &WriteCommand) -> usize {
        match command {
            WriteCommand::Put { .. } | WriteCommand::Delete { .. } | WriteCommand::LeaseGrant { .. } => 1,
            WriteCommand::Txn(txn) => txn.compare.len() + txn.success.len().max(txn.failure.len()),
            WriteCommand::Batch(commands) => commands.iter().map(ops).sum(),
            WriteCommand::DeleteRange { .. } | WriteCommand::LeaseRevoke { .. } => INLINE_APPLY_MAX_OPS,
        }
    }
    entries
        .iter()
        .map(|entry| match &entry.payload {
            EntryPayload::Normal(proposal) => proposal.writes.iter().map(|write| ops(&write.command)).sum(),
            EntryPayload::Blank | EntryPayload::Membership(_) => 1,
        })
        .fold(0, usize::saturating_add)
}

impl RaftStateMachine<TypeConfig> for SqliteStateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SqliteSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.applied_state_now();
        Ok((applied.last_applied, applied.membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut batch: Vec<Entry> = Vec::new();
        let mut responders = Vec::new();
        loop {
            let next = entries.try_next().await?;
            let end = next.is_none();
            if let Some((entry, responder)) = next {
                batch.push(entry);
                responders.push(responder);
            }
            if batch.len() == MAX_BATCH_SIZE || (end && !batch.is_empty()) {
                let work = std::mem::take(&mut batch);
                // Small applies (the common case: no fsync, microseconds) run here; a hop to
                // a blocking thread would cost more than the work.
                let responses = if apply_ops(&work) <= INLINE_APPLY_MAX_OPS {
                    self.shared.apply_entries(&work)?
                } else {
                    self.blocking(move |shared| shared.apply_entries(&work)).await?
                };
                self.checkpoint_if_due().await;
                // Responses go out only after the transaction commits, so a client that
                // sees its write acknowledged can read it back from any pooled connection.
                for (responder, response) in responders.drain(..).zip(responses) {
                    if let Some(responder) = responder {
                        responder.send(response);
                    }
                }
            }
            if end {
                return Ok(());
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SqliteSnapshotBuilder { state_machine: self.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> Result<(), io::Error> {
        let meta = meta.clone();
        self.blocking(move |shared| {
            let (meta, _) = shared.snapshots.adopt(&snapshot, &meta)?;
            shared.load_snapshot_into_db(&meta)
        })
        .await?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let current = self.blocking(|shared| Ok(shared.snapshots.current()?)).await?;
        Ok(current.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}
