//! Reads served from a pooled read-only connection: point gets and range scans.

use aspen_api::limits::MAX_SCAN_LIMIT;
use aspen_api::{GetResponse, KeyValue, ScanRequest, ScanResponse};
use rusqlite::Connection;
use rusqlite::types::Value;

use super::apply::{read_key, row_to_key_value};
use super::meta::read_revision;

/// Reads one key and the revision it was read at, in one read transaction.
pub fn get(conn: &mut Connection, key: &[u8]) -> rusqlite::Result<GetResponse> {
    let txn = conn.transaction()?;
    let kv = read_key(&txn, key)?;
    let revision = read_revision(&txn)?;
    txn.finish()?;
    Ok(GetResponse { kv, revision })
}

/// Scans a range in key order, in one read transaction. `limit = 0` means
/// [`MAX_SCAN_LIMIT`]; the request must already be validated.
pub fn scan(conn: &mut Connection, request: &ScanRequest) -> rusqlite::Result<ScanResponse> {
    let limit = if request.limit == 0 { MAX_SCAN_LIMIT } else { request.limit };
    let mut conditions = vec!["key >= ?"];
    let mut params: Vec<Value> = vec![Value::Blob(request.range.start.clone())];
    if let Some(end) = &request.range.end {
        conditions.push("key < ?");
        params.push(Value::Blob(end.clone()));
    }
    if let Some(after) = &request.after {
        conditions.push("key > ?");
        params.push(Value::Blob(after.clone()));
    }
    let filter = conditions.join(" AND ");
    let txn = conn.transaction()?;
    let revision = read_revision(&txn)?;
    let response = if request.count_only {
        let sql = format!("SELECT COUNT(*) FROM kv_store WHERE {filter}");
        let count: u64 = txn.prepare_cached(&sql)?.query_row(rusqlite::params_from_iter(&params), |row| row.get(0))?;
        ScanResponse { kvs: Vec::new(), count, continuation: None, revision }
    } else {
        let value_column = if request.keys_only { "X''" } else { "value" };
        // One row past the limit tells whether another page exists.
        let sql = format!(
            "SELECT key, {value_column}, create_revision, mod_revision, version, lease FROM kv_store \
             WHERE {filter} ORDER BY key LIMIT {}",
            u64::from(limit) + 1
        );
        let mut statement = txn.prepare_cached(&sql)?;
        let mut kvs: Vec<KeyValue> =
            statement.query_map(rusqlite::params_from_iter(&params), row_to_key_value)?.collect::<Result<_, _>>()?;
        let continuation = if kvs.len() > limit as usize {
            kvs.truncate(limit as usize);
            kvs.last().map(|kv| kv.key.clone())
        } else {
            None
        };
        ScanResponse { count: kvs.len() as u64, kvs, continuation, revision }
    };
    txn.finish()?;
    Ok(response)
}
