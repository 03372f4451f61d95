//! The SQLite schema of the state machine and the pragmas every connection uses.

use rusqlite::Connection;

/// Schema version written to `PRAGMA user_version`; a snapshot with another version is refused.
pub const SCHEMA_VERSION: i64 = 2;

/// Tables of the state machine.
///
/// `kv_store` holds live keys; the `kv` view is what SQL users see. `sessions` holds each
/// client session's remembered answers (exactly-once writes, `session.rs`). `raft_meta`
/// holds last_applied, membership and the cluster clock, written in the same transaction
/// as the data they describe, so a crash can never separate them.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv_store (
    key BLOB PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_store_by_lease ON kv_store(lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY NOT NULL,
    ttl_secs INTEGER NOT NULL,
    granted_revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id BLOB PRIMARY KEY NOT NULL,
    last_used_ms INTEGER NOT NULL,
    state BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS raft_meta (
    name TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS kv AS
    SELECT key, value, create_revision, mod_revision, version, lease FROM kv_store;
";

/// Page size of a new state machine file (a file keeps the size it was created with). Every
/// put rewrites at least one b-tree page, and the WAL takes whole pages, so this is the
/// state machine's write cost per key: 2 KiB still holds a record of up to 488 bytes on
/// its leaf (a 256 B value and its key), where 1 KiB would spill such a record into an
/// overflow page. Same-run A/B against 4 KiB, put x16 Aspen/etcd: mean 1.46 -> 1.57 over 8
/// rounds each, 1.43 in 6 later rounds: a few percent at most on this noisy host, for half
/// the bytes SQLite writes per put.
pub const PAGE_SIZE: u32 = 2048;

/// Prepares the writer connection: WAL so readers never block the writer, and
/// `synchronous` as the state machine's durability says (`OFF` or `NORMAL`): the redb log
/// is the durability point (docs/adr/0001-sqlite-synchronous-normal.md and
/// docs/adr/0003-state-machine-without-fsync.md): after a crash the state machine may be
/// behind its log, never ahead, and openraft re-applies the missing entries.
pub fn configure_writer(conn: &Connection, synchronous: &str) -> rusqlite::Result<()> {
    // Before WAL mode: a WAL database cannot change its page size. A no-op on an existing file.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // The WAL stays bounded by checkpoints the state machine runs in the background
    // (CHECKPOINT_WAL_PAGES, and MAX_WAL_CHECKPOINTS times it as a hard bound), not inside an apply.
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.execute_batch(SCHEMA)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

/// Prepares a pooled read connection.
pub fn configure_reader(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "query_only", true)?;
    conn.pragma_update(None, "cache_size", -16384)?;
    Ok(())
}
