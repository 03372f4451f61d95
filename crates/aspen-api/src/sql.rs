//! Read-only SQL over the `kv` view of the state machine.

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::kv::ReadConsistency;
use crate::limits::{MAX_SQL_QUERY_SIZE, MAX_SQL_ROWS, MAX_SQL_TIMEOUT_MS};

/// A SELECT over the `kv` view (`key, value, create_revision, mod_revision, version, lease`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqlRequest {
    /// One SELECT statement.
    pub query: String,
    /// Most rows to return; the response says when more existed.
    pub row_limit: u32,
    /// Longest the query may run, in milliseconds.
    pub timeout_ms: u64,
    /// Freshness required.
    pub consistency: ReadConsistency,
}

impl SqlRequest {
    /// A query with the default bounds (1000 rows, 1 s).
    pub fn new(query: impl Into<String>) -> Self {
        SqlRequest {
            query: query.into(),
            row_limit: 1000,
            timeout_ms: 1000,
            consistency: ReadConsistency::Linearizable,
        }
    }

    /// Checks the query size, row limit and timeout.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.query.len() > MAX_SQL_QUERY_SIZE {
            return Err(ValidationError::SqlTooLarge { size: self.query.len(), max: MAX_SQL_QUERY_SIZE });
        }
        if self.row_limit == 0 || self.row_limit > MAX_SQL_ROWS {
            return Err(ValidationError::SqlRowLimit { limit: self.row_limit, max: MAX_SQL_ROWS });
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_SQL_TIMEOUT_MS {
            return Err(ValidationError::SqlTimeout { timeout_ms: self.timeout_ms, max: MAX_SQL_TIMEOUT_MS });
        }
        Ok(())
    }
}

/// One SQL value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SqlValue {
    /// NULL.
    Null,
    /// An integer.
    Integer(i64),
    /// A float.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// The rows a query returned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SqlResponse {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows, each with one value per column.
    pub rows: Vec<Vec<SqlValue>>,
    /// True when the row limit cut the result short.
    pub truncated: bool,
}
