//! last_applied and membership, stored in `raft_meta` inside the same transaction as the
//! data they describe.

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::StateMachineError;
use crate::type_config::{LogId, StoredMembership};

const LAST_APPLIED: &str = "last_applied";
const MEMBERSHIP: &str = "membership";
/// The applied index as a plain integer, for reads that only need the revision.
const REVISION: &str = "revision";
/// The cluster clock: the largest leader time of any applied entry, in ms.
const CLUSTER_TIME: &str = "cluster_time_ms";

/// The state machine's position in the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedState {
    /// Last applied entry.
    pub last_applied: Option<LogId>,
    /// Last applied membership.
    pub membership: StoredMembership,
    /// The cluster clock: the largest leader time of any applied entry (ms since the Unix
    /// epoch). Replicated, so session expiry is the same on every replica.
    pub cluster_time_ms: u64,
}

/// Reads the applied state (default when nothing was ever applied).
pub fn read_applied(conn: &Connection) -> Result<AppliedState, StateMachineError> {
    let last_applied = read_blob(conn, LAST_APPLIED)?.map(|bytes| decode(LAST_APPLIED, &bytes)).transpose()?.flatten();
    let membership =
        read_blob(conn, MEMBERSHIP)?.map(|bytes| decode(MEMBERSHIP, &bytes)).transpose()?.unwrap_or_default();
    let cluster_time_ms = conn
        .prepare_cached("SELECT value FROM raft_meta WHERE name = ?1")?
        .query_row(params![CLUSTER_TIME], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    Ok(AppliedState { last_applied, membership, cluster_time_ms })
}

/// Writes the applied state; call inside the transaction that applied the entries. The
/// membership row is rewritten only if `membership_changed` (an apply without a membership
/// entry leaves it as it was): every apply pays for these statements, and most applies are a
/// few puts, so the membership's encoding and upsert were a third of their statements.
/// The cluster clock's row is rewritten only when it moved.
pub fn write_applied(
    conn: &Connection,
    state: &AppliedState,
    membership_changed: bool,
    clock_moved: bool,
) -> Result<(), StateMachineError> {
    let mut upsert = conn.prepare_cached(
        "INSERT INTO raft_meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
    )?;
    upsert.execute(params![LAST_APPLIED, encode(&state.last_applied)?])?;
    if membership_changed {
        upsert.execute(params![MEMBERSHIP, encode(&state.membership)?])?;
    }
    if clock_moved {
        upsert.execute(params![CLUSTER_TIME, state.cluster_time_ms])?;
    }
    upsert.execute(params![REVISION, state.last_applied.map_or(0, |log_id| log_id.index)])?;
    Ok(())
}

/// The applied index (the revision reads report), 0 before anything was applied.
pub fn read_revision(conn: &Connection) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT value FROM raft_meta WHERE name = ?1")?
        .query_row(params![REVISION], |row| row.get(0))
        .optional()
        .map(|revision| revision.unwrap_or(0))
}

fn read_blob(conn: &Connection, name: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT value FROM raft_meta WHERE name = ?1")?
        .query_row(params![name], |row| row.get(0))
        .optional()
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StateMachineError> {
    postcard::to_stdvec(value).map_err(|error| StateMachineError::Encode(error.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(name: &'static str, bytes: &[u8]) -> Result<T, StateMachineError> {
    postcard::from_bytes(bytes).map_err(|error| StateMachineError::MalformedMeta { name, reason: error.to_string() })
}
