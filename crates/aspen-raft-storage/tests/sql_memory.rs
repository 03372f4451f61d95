//! A SQL query that would build more than a reply can carry fails fast with a typed error,
//! and the node's memory does not grow with what the query asked for.
//!
//! One test in its own binary: it measures the process's peak resident memory, which any
//! test running beside it would disturb.

mod common;

use std::time::{Duration, Instant};

use aspen_api::limits::{MAX_SQL_QUERY_MEMORY, MAX_SQL_RESPONSE_SIZE, MAX_VALUE_SIZE};
use aspen_api::{SqlRequest, SqlValue, WriteCommand};
use aspen_raft_storage::{SqlError, SqliteStateMachine};
use common::normal;

/// Keys holding a full-size value each: together more than one SQL reply may carry.
const LARGE_VALUES: u64 = 8;

/// Longest a refused query may take: far below its 10 s timeout, so it was refused for its
/// size, not interrupted.
const FAST: Duration = Duration::from_secs(3);

/// Most the process's resident memory may grow while one refused query runs.
const MAX_RSS_GROWTH: u64 = 64 * 1024 * 1024;

/// A `/proc/self/status` field in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|line| line.starts_with(field)).unwrap_or_else(|| panic!("{field} missing"));
    let kib: u64 = line.trim_start_matches(field).trim().trim_end_matches("kB").trim().parse().expect("kB value");
    kib * 1024
}

/// Resets the peak resident size (`VmHWM`) to the current one, so the next reading is
/// the peak of what runs in between.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM through /proc/self/clear_refs");
}

/// The typed error a query must fail with.
enum Refusal {
    /// It builds a value or result larger than a reply.
    TooLarge,
    /// It needs more memory than a query may use.
    OutOfMemory,
    /// Either, depending on which bound it reaches first.
    Either,
}

impl Refusal {
    fn matches(&self, error: &SqlError) -> bool {
        let too_large = matches!(error, SqlError::TooLarge { max_bytes } if *max_bytes == MAX_SQL_RESPONSE_SIZE);
        let out_of_memory = matches!(error, SqlError::OutOfMemory { max_bytes } if *max_bytes == MAX_SQL_QUERY_MEMORY);
        match self {
            Refusal::TooLarge => too_large,
            Refusal::OutOfMemory => out_of_memory,
            Refusal::Either => too_large || out_of_memory,
        }
    }
}

fn many_constants_query() -> String {
    // Constant expressions are computed once and kept for the statement's lifetime, each
    // in a register of its own: 100 values of 4 MB each are alive at once, although each is
    // below the value limit and the result is a single integer.
    let terms: Vec<String> = (1..=100).map(|i| format!("length(hex(zeroblob({})))", 2_000_000 + i)).collect();
    format!("SELECT {}", terms.join(" + "))
}

fn many_columns_query() -> String {
    let columns: Vec<String> = (1..=40).map(|i| format!("randomblob({})", 4_000_000 + i)).collect();
    format!("SELECT {}", columns.join(", "))
}

#[test]
fn oversized_sql_results_fail_fast_with_typed_errors_without_growing_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
    let entries: Vec<_> = (1..=LARGE_VALUES)
        .map(|i| {
            let command = WriteCommand::Put {
                key: format!("big-{i}").into_bytes(),
                value: vec![b'v'; MAX_VALUE_SIZE],
                lease: None,
            };
            normal(1, i, command)
        })
        .collect();
    state_machine.apply_entries(&entries).expect("seed");
    let reader = state_machine.reader();
    reader.sql(&SqlRequest::new("SELECT count(*) FROM kv")).expect("warm-up query");

    let cases = [
        ("zeroblob", "SELECT zeroblob(300000000)".to_string(), Refusal::TooLarge),
        ("group_concat over kv", "SELECT length(group_concat(value)) FROM kv".to_string(), Refusal::TooLarge),
        (
            "group_concat over generated rows",
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) \
             SELECT length(group_concat(printf('%050d', i))) FROM n"
                .to_string(),
            Refusal::TooLarge,
        ),
        (
            "recursive CTE doubling a string",
            "WITH RECURSIVE s(t) AS (SELECT 'x' UNION ALL SELECT t || t FROM s WHERE length(t) < 1000000000) \
             SELECT max(length(t)) FROM s"
                .to_string(),
            Refusal::TooLarge,
        ),
        ("many constant values", many_constants_query(), Refusal::OutOfMemory),
        ("many large columns", many_columns_query(), Refusal::Either),
    ];
    for (name, query, expected) in cases {
        let mut request = SqlRequest::new(query);
        request.timeout_ms = 10_000;
        reset_peak_rss();
        let rss_before = status_bytes("VmRSS:");
        let started = Instant::now();
        let result = reader.sql(&request);
        let elapsed = started.elapsed();
        let growth = status_bytes("VmHWM:").saturating_sub(rss_before);
        match result {
            Err(error) => assert!(expected.matches(&error), "{name}: unexpected error {error:?}"),
            Ok(response) => panic!("{name}: answered {} rows instead of failing", response.rows.len()),
        }
        assert!(elapsed < FAST, "{name}: took {elapsed:?}");
        assert!(growth < MAX_RSS_GROWTH, "{name}: peak resident memory grew by {} MiB", growth / (1024 * 1024));
    }

    // The pool still answers, with full-size values, after every refusal.
    let response =
        reader.sql(&SqlRequest::new("SELECT value FROM kv WHERE key = CAST('big-1' AS BLOB)")).expect("read");
    assert_eq!(response.rows, vec![vec![SqlValue::Blob(vec![b'v'; MAX_VALUE_SIZE])]]);
    let mut all = SqlRequest::new("SELECT key, value FROM kv ORDER BY key");
    all.timeout_ms = 10_000;
    let response = reader.sql(&all).expect("read all values");
    // Eight 1 MiB values do not fit in one reply: the result stops at whole rows.
    assert!(response.truncated);
    assert_eq!(response.rows.len(), MAX_SQL_RESPONSE_SIZE / MAX_VALUE_SIZE - 1);
}
