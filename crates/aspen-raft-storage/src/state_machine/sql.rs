//! The read-only SQL entry point over the `kv` view.
//!
//! Three independent guards: the connection is opened read-only, the statement must be
//! read-only (`sqlite3_stmt_readonly`), and an authorizer lets the statement read nothing
//! but the `kv` view. A progress handler bounds its running time; the row limit and a
//! byte budget bound its result.

use std::time::{Duration, Instant};

use aspen_api::limits::MAX_RPC_MESSAGE_SIZE;
use aspen_api::{SqlRequest, SqlResponse, SqlValue};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode};

use crate::error::SqlError;

/// Largest SQL result, in bytes of values: a response must fit in one RPC message.
pub const MAX_SQL_RESPONSE_SIZE: usize = MAX_RPC_MESSAGE_SIZE / 2;

/// How many SQLite virtual-machine steps run between deadline checks.
const PROGRESS_CHECK_STEPS: i32 = 1000;

/// Runs one SELECT over the `kv` view on a read-only connection.
pub fn run_query(conn: &mut Connection, request: &SqlRequest) -> Result<SqlResponse, SqlError> {
    request.validate()?;
    let deadline = Instant::now() + Duration::from_millis(request.timeout_ms);
    conn.authorizer(Some(authorize_kv_view_reads)).map_err(classify)?;
    let result = conn
        .progress_handler(PROGRESS_CHECK_STEPS, Some(move || Instant::now() > deadline))
        .map_err(classify)
        .and_then(|()| prepare_and_collect(conn, request));
    // Pooled connections are shared with internal reads of `kv_store`: always clear both.
    let cleared = conn
        .progress_handler(0, None::<fn() -> bool>)
        .and_then(|()| conn.authorizer(None::<fn(AuthContext<'_>) -> Authorization>));
    cleared.map_err(classify)?;
    result
}

fn prepare_and_collect(conn: &Connection, request: &SqlRequest) -> Result<SqlResponse, SqlError> {
    let mut statement = conn.prepare(&request.query).map_err(|error| classify_running(error, request.timeout_ms))?;
    if !statement.readonly() {
        return Err(SqlError::NotReadOnly);
    }
    let columns: Vec<String> = statement.column_names().map(|name| name.to_string()).collect();
    collect_rows(&mut statement, columns, request.row_limit as usize, request.timeout_ms)
}

fn collect_rows(
    statement: &mut rusqlite::Statement<'_>,
    columns: Vec<String>,
    row_limit: usize,
    timeout_ms: u64,
) -> Result<SqlResponse, SqlError> {
    let column_count = columns.len();
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    let mut truncated = false;
    let mut cursor = statement.query([]).map_err(|error| classify_running(error, timeout_ms))?;
    while let Some(row) = cursor.next().map_err(|error| classify_running(error, timeout_ms))? {
        if rows.len() == row_limit || bytes > MAX_SQL_RESPONSE_SIZE {
            truncated = true;
            break;
        }
        let mut values = Vec::with_capacity(column_count);
        for index in 0..column_count {
            let value = match row.get_ref(index).map_err(classify)? {
                ValueRef::Null => SqlValue::Null,
                ValueRef::Integer(value) => SqlValue::Integer(value),
                ValueRef::Real(value) => SqlValue::Real(value),
                ValueRef::Text(text) => SqlValue::Text(String::from_utf8_lossy(text).into_owned()),
                ValueRef::Blob(blob) => SqlValue::Blob(blob.to_vec()),
            };
            bytes += match &value {
                SqlValue::Text(text) => text.len(),
                SqlValue::Blob(blob) => blob.len(),
                _ => 8,
            };
            values.push(value);
        }
        rows.push(values);
    }
    Ok(SqlResponse { columns, rows, truncated })
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
        _ => classify(error),
    }
}
