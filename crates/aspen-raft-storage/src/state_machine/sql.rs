//! The read-only SQL entry point over the `kv` view.
//!
//! Three independent guards: the connection is opened read-only, the statement must be
//! read-only (`sqlite3_stmt_readonly`), and an authorizer lets the statement read nothing
//! but the `kv` view. A progress handler bounds its running time; the row limit and a
//! byte budget bound its result. Its memory is bounded three ways: SQLite's own limits
//! while it runs (no string, blob or row larger than a reply, at most
//! [`MAX_SQL_COLUMNS`] columns), a heap budget for the statement ([`HeapBudget`]), and the
//! result's bytes counted value by value as rows are read, before they are copied.

use std::time::{Duration, Instant};

use aspen_api::limits::{MAX_SQL_COLUMNS, MAX_SQL_QUERY_MEMORY, MAX_SQL_QUERY_SIZE, MAX_SQL_RESPONSE_SIZE};
use aspen_api::{SqlRequest, SqlResponse, SqlValue};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode};

use super::heap::HeapBudget;
use crate::error::SqlError;

/// How many SQLite virtual-machine steps run between deadline checks.
const PROGRESS_CHECK_STEPS: i32 = 1000;

/// SQLite's limits while a query runs. Set per query and restored after it, like the
/// hooks: the pooled connections also serve internal reads.
const QUERY_LIMITS: [(Limit, usize); 5] = [
    // A value or row larger than a reply could never be returned: fail when it is built,
    // not after it was (`zeroblob(300000000)` would otherwise allocate it, then copy it).
    (Limit::SQLITE_LIMIT_LENGTH, MAX_SQL_RESPONSE_SIZE),
    // Already validated; repeated so SQLite refuses it too.
    (Limit::SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_QUERY_SIZE),
    // A result row holds all its values at once.
    (Limit::SQLITE_LIMIT_COLUMN, MAX_SQL_COLUMNS),
    // The authorizer denies ATTACH; no database to attach either.
    (Limit::SQLITE_LIMIT_ATTACHED, 0),
    // The heap budget counts the stepping thread only; a sorter thread would escape it.
    (Limit::SQLITE_LIMIT_WORKER_THREADS, 0),
];

/// Runs one SELECT over the `kv` view on a read-only connection.
pub fn run_query(conn: &mut Connection, request: &SqlRequest) -> Result<SqlResponse, SqlError> {
    request.validate()?;
    let deadline = Instant::now() + Duration::from_millis(request.timeout_ms);
    let previous_limits =
        set_limits(conn, QUERY_LIMITS.map(|(limit, value)| (limit, clamp(value)))).map_err(classify)?;
    let budget = HeapBudget::new(MAX_SQL_QUERY_MEMORY);
    let result = conn
        .authorizer(Some(authorize_kv_view_reads))
        .and_then(|()| conn.progress_handler(PROGRESS_CHECK_STEPS, Some(move || Instant::now() > deadline)))
        .map_err(classify)
        .and_then(|()| prepare_and_collect(conn, request, &budget))
        .map_err(|error| {
            // Whatever SQLite made of the refused allocation, it is why the query failed.
            if budget.refused() { SqlError::OutOfMemory { max_bytes: MAX_SQL_QUERY_MEMORY } } else { error }
        });
    // Pooled connections are shared with internal reads of `kv_store`: always clear both
    // hooks and restore the limits.
    let cleared = conn
        .progress_handler(0, None::<fn() -> bool>)
        .and_then(|()| conn.authorizer(None::<fn(AuthContext<'_>) -> Authorization>))
        .and_then(|()| set_limits(conn, previous_limits).map(|_| ()));
    cleared.map_err(classify)?;
    result
}

/// Values for each of [`QUERY_LIMITS`].
type Limits = [(Limit, i32); QUERY_LIMITS.len()];

/// Sets each limit and returns the values they had.
fn set_limits(conn: &Connection, limits: Limits) -> rusqlite::Result<Limits> {
    let mut previous = limits;
    for (slot, (limit, value)) in previous.iter_mut().zip(limits) {
        *slot = (limit, conn.set_limit(limit, value)?);
    }
    Ok(previous)
}

fn clamp(value: usize) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn prepare_and_collect(conn: &Connection, request: &SqlRequest, budget: &HeapBudget) -> Result<SqlResponse, SqlError> {
    let running = |error| classify_running(error, request.timeout_ms);
    let mut statement = budget.within(|| conn.prepare(&request.query)).map_err(running)?;
    if !statement.readonly() {
        return Err(SqlError::NotReadOnly);
    }
    let columns: Vec<String> = statement.column_names().map(|name| name.to_string()).collect();
    let column_count = columns.len();
    let row_limit = request.row_limit as usize;
    let mut rows: Vec<Vec<SqlValue>> = Vec::new();
    let mut bytes = 0usize;
    let mut truncated = false;
    let mut cursor = budget.within(|| statement.query([])).map_err(running)?;
    // Only the step runs under the heap budget; see `HeapBudget`.
    while let Some(row) = budget.within(|| cursor.next()).map_err(running)? {
        if rows.len() == row_limit {
            truncated = true;
            break;
        }
        let Some(values) = read_row(row, column_count, &mut bytes)? else {
            // A row that does not fit ends the result, unless it is the first: an empty
            // result would claim the query matched nothing.
            if rows.is_empty() {
                return Err(SqlError::TooLarge { max_bytes: MAX_SQL_RESPONSE_SIZE });
            }
            truncated = true;
            break;
        };
        rows.push(values);
    }
    Ok(SqlResponse { columns, rows, truncated })
}

/// A row's values, or `None` if they would take the result past [`MAX_SQL_RESPONSE_SIZE`];
/// each value is measured before it is copied.
fn read_row(
    row: &rusqlite::Row<'_>,
    column_count: usize,
    bytes: &mut usize,
) -> Result<Option<Vec<SqlValue>>, SqlError> {
    let mut row_bytes = 0usize;
    let mut values = Vec::with_capacity(column_count);
    for index in 0..column_count {
        let value = row.get_ref(index).map_err(classify)?;
        row_bytes += match value {
            ValueRef::Text(text) => text.len(),
            ValueRef::Blob(blob) => blob.len(),
            ValueRef::Null | ValueRef::Integer(_) | ValueRef::Real(_) => 8,
        };
        if *bytes + row_bytes > MAX_SQL_RESPONSE_SIZE {
            return Ok(None);
        }
        values.push(match value {
            ValueRef::Null => SqlValue::Null,
            ValueRef::Integer(value) => SqlValue::Integer(value),
            ValueRef::Real(value) => SqlValue::Real(value),
            ValueRef::Text(text) => SqlValue::Text(String::from_utf8_lossy(text).into_owned()),
            ValueRef::Blob(blob) => SqlValue::Blob(blob.to_vec()),
        });
    }
    *bytes += row_bytes;
    Ok(Some(values))
}

/// Allows a SELECT that reads only the `kv` view (and `kv_store` through it), common
/// table expressions and functions; denies every other action, including reads of the
/// internal tables (`raft_meta`, `leases`, `sessions`, `sqlite_*`) and direct column reads of
/// `kv_store`. SQLite reports column-less reads (`COUNT(*)` through a flattened view)
/// without the view as accessor; those reveal nothing the view does not, so they pass.
fn authorize_kv_view_reads(context: AuthContext<'_>) -> Authorization {
    match context.action {
        AuthAction::Select | AuthAction::Function { .. } | AuthAction::Recursive => Authorization::Allow,
        AuthAction::Read { table_name: "kv_store", column_name } => {
            if context.accessor == Some("kv") || column_name.is_empty() {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        AuthAction::Read { table_name, .. }
            if INTERNAL_TABLES.contains(&table_name) || table_name.starts_with("sqlite_") =>
        {
            Authorization::Deny
        }
        // The `kv` view itself and common table expressions.
        AuthAction::Read { .. } => Authorization::Allow,
        _ => Authorization::Deny,
    }
}

/// Tables SQL users may never read.
const INTERNAL_TABLES: [&str; 3] = ["raft_meta", "leases", "sessions"];

fn classify(error: rusqlite::Error) -> SqlError {
    match &error {
        rusqlite::Error::SqliteFailure(failure, _) if failure.code == ErrorCode::AuthorizationForStatementDenied => {
            SqlError::Denied(error.to_string())
        }
        rusqlite::Error::MultipleStatement => SqlError::MultipleStatements,
        _ => SqlError::Invalid(error.to_string()),
    }
}

fn classify_running(error: rusqlite::Error, timeout_ms: u64) -> SqlError {
    match &error {
        rusqlite::Error::SqliteFailure(failure, _) if failure.code == ErrorCode::OperationInterrupted => {
            SqlError::Timeout { timeout_ms }
        }
        rusqlite::Error::SqliteFailure(failure, _) if failure.code == ErrorCode::TooBig => {
            SqlError::TooLarge { max_bytes: MAX_SQL_RESPONSE_SIZE }
        }
        _ => classify(error),
    }
}
