//! Applying write commands to the SQLite tables, inside the caller's transaction.
//!
//! Every function here is deterministic in (database state, revision, command): each
//! replica that applies the same entry to the same state reaches the same state and the
//! same response. Domain failures (a missing lease) are results, not errors; only SQLite
//! failures are `Err`.

use aspen_api::limits::MAX_LEASES;
use aspen_api::{
    ApplyError, KeyRange, KeyValue, LeaseId, Revision, TxnOp, TxnOpResponse, TxnRequest, TxnResponse, WriteCommand,
    WriteResponse,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

/// The result of applying one command: the outer `Result` is SQLite, the inner one the domain.
pub type Applied = rusqlite::Result<Result<WriteResponse, ApplyError>>;

/// Applies `command` at `revision`.
pub fn apply_command(conn: &Connection, revision: Revision, command: &WriteCommand) -> Applied {
    // Commands are validated at the edge; checking again here means an entry that bypassed
    // the edge (a faulty or malicious leader) is refused identically on every replica.
    if let Err(error) = command.validate() {
        return Ok(Err(ApplyError::Invalid(error)));
    }
    apply_valid(conn, revision, command)
}

fn apply_valid(conn: &Connection, revision: Revision, command: &WriteCommand) -> Applied {
    match command {
        WriteCommand::Put { key, value, lease } => {
            if let Some(id) = lease
                && !lease_exists(conn, *id)?
            {
                return Ok(Err(ApplyError::LeaseNotFound { id: *id }));
            }
            put(conn, revision, key, value, *lease)?;
            Ok(Ok(WriteResponse::Put { revision }))
        }
        WriteCommand::Delete { key } => {
            let deleted = delete_key(conn, key)?;
            Ok(Ok(WriteResponse::Delete { revision, deleted }))
        }
        WriteCommand::DeleteRange { range } => {
            let deleted = delete_range(conn, range)?;
            Ok(Ok(WriteResponse::Delete { revision, deleted }))
        }
        WriteCommand::Txn(txn) => Ok(apply_txn(conn, revision, txn)?.map(WriteResponse::Txn)),
        WriteCommand::LeaseGrant { id, ttl_secs } => lease_grant(conn, revision, *id, *ttl_secs),
        WriteCommand::LeaseRevoke { id } => {
            if !lease_exists(conn, *id)? {
                return Ok(Err(ApplyError::LeaseNotFound { id: *id }));
            }
            let deleted = conn.prepare_cached("DELETE FROM kv_store WHERE lease = ?1")?.execute(params![id])?;
            conn.prepare_cached("DELETE FROM leases WHERE id = ?1")?.execute(params![id])?;
            Ok(Ok(WriteResponse::LeaseRevoke { revision, deleted: deleted as u64 }))
        }
        WriteCommand::Batch(commands) => {
            let mut results = Vec::with_capacity(commands.len());
            for command in commands {
                results.push(apply_valid(conn, revision, command)?);
            }
            Ok(Ok(WriteResponse::Batch(results)))
        }
    }
}

/// Reads one key's record.
pub fn read_key(conn: &Connection, key: &[u8]) -> rusqlite::Result<Option<KeyValue>> {
    conn.prepare_cached(
        "SELECT key, value, create_revision, mod_revision, version, lease FROM kv_store WHERE key = ?1",
    )?
    .query_row(params![key], row_to_key_value)
    .optional()
}

/// Decodes a row of `key, value, create_revision, mod_revision, version, lease`.
pub fn row_to_key_value(row: &Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: row.get(0)?,
        value: row.get(1)?,
        create_revision: row.get(2)?,
        mod_revision: row.get(3)?,
        version: row.get(4)?,
        lease: row.get(5)?,
    })
}

fn put(
    conn: &Connection,
    revision: Revision,
    key: &[u8],
    value: &[u8],
    lease: Option<LeaseId>,
) -> rusqlite::Result<()> {
    // One statement, no read: a new key gets create_revision = revision and version 1,
    // an existing one keeps its create_revision and bumps its version. A put without a
    // lease detaches the key from its old lease (etcd semantics).
    conn.prepare_cached(
        "INSERT INTO kv_store (key, value, create_revision, mod_revision, version, lease)
         VALUES (?1, ?2, ?3, ?3, 1, ?4)
         ON CONFLICT(key) DO UPDATE SET
             value = excluded.value,
             mod_revision = excluded.mod_revision,
             version = kv_store.version + 1,
             lease = excluded.lease",
    )?
    .execute(params![key, value, revision, lease])?;
    Ok(())
}

fn delete_key(conn: &Connection, key: &[u8]) -> rusqlite::Result<u64> {
    let deleted = conn.prepare_cached("DELETE FROM kv_store WHERE key = ?1")?.execute(params![key])?;
    Ok(deleted as u64)
}

fn delete_range(conn: &Connection, range: &KeyRange) -> rusqlite::Result<u64> {
    let deleted = match &range.end {
        Some(end) => conn
            .prepare_cached("DELETE FROM kv_store WHERE key >= ?1 AND key < ?2")?
            .execute(params![range.start, end])?,
        None => conn.prepare_cached("DELETE FROM kv_store WHERE key >= ?1")?.execute(params![range.start])?,
    };
    Ok(deleted as u64)
}

fn lease_exists(conn: &Connection, id: LeaseId) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM leases WHERE id = ?1")?.exists(params![id])
}

fn lease_grant(conn: &Connection, revision: Revision, requested: LeaseId, ttl_secs: u64) -> Applied {
    let count: u64 = conn.prepare_cached("SELECT COUNT(*) FROM leases")?.query_row([], |row| row.get(0))?;
    if count >= MAX_LEASES {
        return Ok(Err(ApplyError::TooManyLeases { max: MAX_LEASES }));
    }
    let id = if requested != 0 {
        if lease_exists(conn, requested)? {
            return Ok(Err(ApplyError::LeaseExists { id: requested }));
        }
        requested
    } else if !lease_exists(conn, revision)? {
        // Assigned ids are the entry's revision, so every replica picks the same one.
        revision
    } else {
        let max: u64 = conn.prepare_cached("SELECT MAX(id) FROM leases")?.query_row([], |row| row.get(0))?;
        max + 1
    };
    conn.prepare_cached("INSERT INTO leases (id, ttl_secs, granted_revision) VALUES (?1, ?2, ?3)")?
        .execute(params![id, ttl_secs, revision])?;
    Ok(Ok(WriteResponse::LeaseGrant { revision, id, ttl_secs }))
}

fn apply_txn(
    conn: &Connection,
    revision: Revision,
    txn: &TxnRequest,
) -> rusqlite::Result<Result<TxnResponse, ApplyError>> {
    let mut succeeded = true;
    for compare in &txn.compare {
        if !compare.holds(read_key(conn, &compare.key)?.as_ref()) {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded { &txn.success } else { &txn.failure };
    // Check every lease before the first write, so a failing txn changes nothing.
    for op in ops {
        if let TxnOp::Put { lease: Some(id), .. } = op
            && !lease_exists(conn, *id)?
        {
            return Ok(Err(ApplyError::LeaseNotFound { id: *id }));
        }
    }
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match op {
            TxnOp::Get { key } => TxnOpResponse::Get(read_key(conn, key)?),
            TxnOp::Put { key, value, lease } => {
                put(conn, revision, key, value, *lease)?;
                TxnOpResponse::Put
            }
            TxnOp::Delete { key } => TxnOpResponse::Delete { deleted: delete_key(conn, key)? },
            TxnOp::DeleteRange { range } => TxnOpResponse::Delete { deleted: delete_range(conn, range)? },
        };
        responses.push(response);
    }
    Ok(Ok(TxnResponse { revision, succeeded, responses }))
}
