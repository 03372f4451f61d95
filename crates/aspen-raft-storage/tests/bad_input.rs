//! Bad input gets its typed error, the store stays usable and nothing stored is lost.

mod common;

use aspen_api::limits::{MAX_KEY_SIZE, MAX_SNAPSHOT_CHUNK_SIZE, MAX_SNAPSHOT_SIZE, MAX_TXN_OPS, MAX_VALUE_SIZE};
use aspen_api::{
    ApplyError, ScanRequest, SqlRequest, SqlValue, TxnOp, TxnRequest, ValidationError, WriteCommand, WriteResponse,
};
use aspen_raft_storage::{EntryResponse, RedbLogStore, SnapshotError, SqlError, SqliteStateMachine, StateMachineError};
use common::{blank, normal};

fn put(key: &[u8], value: &[u8]) -> WriteCommand {
    WriteCommand::Put { key: key.to_vec(), value: value.to_vec(), lease: None }
}

fn seeded_state_machine(dir: &std::path::Path) -> SqliteStateMachine {
    let state_machine = SqliteStateMachine::open(dir).expect("open");
    let entries: Vec<_> = (1..=20u64).map(|i| normal(1, i, put(format!("key-{i:02}").as_bytes(), b"v"))).collect();
    state_machine.apply_entries(&entries).expect("seed");
    state_machine
}

fn value_of(state_machine: &SqliteStateMachine, key: &[u8]) -> Option<Vec<u8>> {
    state_machine.reader().get(key).expect("get").kv.map(|kv| kv.value)
}

#[test]
fn oversized_and_malformed_commands_are_refused_deterministically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = seeded_state_machine(dir.path());
    let cases = [
        (
            put(&vec![b'k'; MAX_KEY_SIZE + 1], b"v"),
            ValidationError::KeyTooLarge { size: MAX_KEY_SIZE + 1, max: MAX_KEY_SIZE },
        ),
        (
            put(b"key-01", &vec![0; MAX_VALUE_SIZE + 1]),
            ValidationError::ValueTooLarge { size: MAX_VALUE_SIZE + 1, max: MAX_VALUE_SIZE },
        ),
        (put(b"", b"v"), ValidationError::EmptyKey),
        (
            WriteCommand::Txn(TxnRequest {
                compare: vec![],
                success: vec![TxnOp::Delete { key: b"key-01".to_vec() }; MAX_TXN_OPS + 1],
                failure: vec![],
            }),
            ValidationError::TooManyTxnOps { count: MAX_TXN_OPS + 1, max: MAX_TXN_OPS },
        ),
    ];
    let mut index = 21;
    for (command, expected) in cases {
        // Edge check first, as a node does before proposing.
        assert_eq!(command.validate(), Err(expected.clone()));
        // An entry that bypassed the edge is refused identically by the state machine.
        let responses = state_machine.apply_entries(&[normal(1, index, command)]).expect("apply");
        assert_eq!(responses, vec![EntryResponse::Writes(vec![Err(ApplyError::Invalid(expected))])]);
        index += 1;
    }
    assert_eq!(value_of(&state_machine, b"key-01"), Some(b"v".to_vec()), "refused commands changed nothing");
    assert_eq!(state_machine.applied_state_now().last_applied.map(|log_id| log_id.index), Some(index - 1));

    let too_long_key = vec![b'k'; MAX_KEY_SIZE + 1];
    assert!(matches!(
        state_machine.reader().get(&too_long_key),
        Err(StateMachineError::Validation(ValidationError::KeyTooLarge { .. }))
    ));
    let mut scan = ScanRequest::prefix(b"key".to_vec(), 5);
    scan.limit = aspen_api::limits::MAX_SCAN_LIMIT + 1;
    assert!(matches!(
        state_machine.reader().scan(&scan),
        Err(StateMachineError::Validation(ValidationError::ScanLimitTooLarge { .. }))
    ));
}

#[test]
fn failing_transaction_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = seeded_state_machine(dir.path());
    let txn = WriteCommand::Txn(TxnRequest {
        compare: vec![],
        success: vec![
            TxnOp::Put { key: b"key-01".to_vec(), value: b"changed".to_vec(), lease: None },
            TxnOp::Put { key: b"key-02".to_vec(), value: b"changed".to_vec(), lease: Some(77) },
        ],
        failure: vec![],
    });
    let responses = state_machine.apply_entries(&[normal(1, 21, txn)]).expect("apply");
    assert_eq!(responses, vec![EntryResponse::Writes(vec![Err(ApplyError::LeaseNotFound { id: 77 })])]);
    assert_eq!(value_of(&state_machine, b"key-01"), Some(b"v".to_vec()));
}

#[test]
fn scans_page_with_continuation_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = seeded_state_machine(dir.path());
    let mut request = ScanRequest::prefix(b"key-".to_vec(), 7);
    let mut seen = Vec::new();
    loop {
        let page = state_machine.reader().scan(&request).expect("scan");
        assert!(page.kvs.len() <= 7);
        seen.extend(page.kvs.into_iter().map(|kv| kv.key));
        match page.continuation {
            Some(token) => request.after = Some(token),
            None => break,
        }
    }
    let expected: Vec<Vec<u8>> = (1..=20).map(|i| format!("key-{i:02}").into_bytes()).collect();
    assert_eq!(seen, expected);
    let mut count = ScanRequest::prefix(b"key-1".to_vec(), 0);
    count.count_only = true;
    assert_eq!(state_machine.reader().scan(&count).expect("count").count, 10);
}

#[test]
fn sql_allows_only_bounded_selects_over_the_kv_view() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = seeded_state_machine(dir.path());
    let reader = state_machine.reader();

    let response = reader
        .sql(&SqlRequest::new("SELECT key, version FROM kv WHERE key >= CAST('key-19' AS BLOB) ORDER BY key"))
        .expect("select");
    assert_eq!(response.columns, vec!["key", "version"]);
    assert_eq!(response.rows.len(), 2);
    assert_eq!(response.rows[0], vec![SqlValue::Blob(b"key-19".to_vec()), SqlValue::Integer(1)]);

    let mut limited = SqlRequest::new("SELECT key FROM kv");
    limited.row_limit = 5;
    let response = reader.sql(&limited).expect("limited select");
    assert_eq!((response.rows.len(), response.truncated), (5, true));

    for statement in
        ["DELETE FROM kv_store", "INSERT INTO kv_store VALUES (x'01', x'01', 1, 1, 1, NULL)", "DROP VIEW kv"]
    {
        let error = reader.sql(&SqlRequest::new(statement)).expect_err(statement);
        assert!(matches!(error, SqlError::Denied(_) | SqlError::NotReadOnly), "{statement}: {error:?}");
    }
    for statement in
        ["SELECT * FROM raft_meta", "SELECT * FROM kv_store", "SELECT * FROM sqlite_master", "PRAGMA user_version"]
    {
        let error = reader.sql(&SqlRequest::new(statement)).expect_err(statement);
        assert!(matches!(error, SqlError::Denied(_)), "{statement}: {error:?}");
    }
    let error = reader.sql(&SqlRequest::new("SELECT 1; SELECT 2")).expect_err("two statements");
    assert!(matches!(error, SqlError::MultipleStatements), "{error:?}");

    let mut endless =
        SqlRequest::new("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n, kv");
    endless.timeout_ms = 50;
    let error = reader.sql(&endless).expect_err("runaway query");
    assert!(matches!(error, SqlError::Timeout { timeout_ms: 50 }), "{error:?}");

    let mut oversized = SqlRequest::new("SELECT 1");
    oversized.row_limit = aspen_api::limits::MAX_SQL_ROWS + 1;
    assert!(matches!(reader.sql(&oversized), Err(SqlError::Validation(ValidationError::SqlRowLimit { .. }))));

    // The pooled connections still serve internal reads after the authorizer was used.
    assert_eq!(value_of(&state_machine, b"key-05"), Some(b"v".to_vec()));
}

#[test]
fn snapshot_receiver_rejects_bad_chunks_and_install_keeps_old_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leader = seeded_state_machine(&dir.path().join("leader"));
    let (meta, file) = leader.build_snapshot_now().expect("build");
    let follower = SqliteStateMachine::open(dir.path().join("follower")).expect("open follower");
    follower.apply_entries(&[normal(1, 1, put(b"mine", b"old"))]).expect("seed follower");

    let chunk = file.read_chunk(0, MAX_SNAPSHOT_CHUNK_SIZE).expect("read chunk");
    // Truncated: the last bytes never arrive.
    let mut receiver = follower.receive_snapshot(file.size(), file.checksum()).expect("receive");
    receiver.write_chunk(0, &chunk[..chunk.len() - 10]).expect("partial chunk");
    assert!(matches!(receiver.finish(), Err(SnapshotError::Truncated { .. })));
    // Out of order.
    let mut receiver = follower.receive_snapshot(file.size(), file.checksum()).expect("receive");
    assert!(matches!(receiver.write_chunk(5, &chunk), Err(SnapshotError::OutOfOrderChunk { expected: 0, found: 5 })));
    // Oversized chunk and oversized snapshot.
    let mut receiver = follower.receive_snapshot(file.size(), file.checksum()).expect("receive");
    let huge = vec![0u8; MAX_SNAPSHOT_CHUNK_SIZE + 1];
    assert!(matches!(receiver.write_chunk(0, &huge), Err(SnapshotError::ChunkTooLarge { .. })));
    assert!(matches!(
        follower.receive_snapshot(MAX_SNAPSHOT_SIZE + 1, file.checksum()),
        Err(SnapshotError::TooLarge { .. })
    ));
    // Garbage of the right length: the checksum catches it.
    let mut receiver = follower.receive_snapshot(file.size(), file.checksum()).expect("receive");
    let garbage = vec![0xA5u8; file.size() as usize];
    for (offset, piece) in garbage.chunks(MAX_SNAPSHOT_CHUNK_SIZE).enumerate() {
        receiver.write_chunk((offset * MAX_SNAPSHOT_CHUNK_SIZE) as u64, piece).expect("garbage chunk");
    }
    assert!(matches!(receiver.finish(), Err(SnapshotError::ChecksumMismatch { .. })));
    // Garbage with a matching checksum (a faulty sender): not a database, refused at install.
    let checksum = *blake3::hash(&garbage).as_bytes();
    let mut receiver = follower.receive_snapshot(garbage.len() as u64, checksum).expect("receive");
    for (offset, piece) in garbage.chunks(MAX_SNAPSHOT_CHUNK_SIZE).enumerate() {
        receiver.write_chunk((offset * MAX_SNAPSHOT_CHUNK_SIZE) as u64, piece).expect("garbage chunk");
    }
    let bogus = receiver.finish().expect("checksum matches");
    let error = follower.install_snapshot_now(&meta, &bogus).expect_err("garbage is not a state machine");
    assert!(matches!(error, StateMachineError::Snapshot(SnapshotError::Invalid(_))), "{error:?}");
    assert_eq!(value_of(&follower, b"mine"), Some(b"old".to_vec()), "failed install kept the old state");

    // The genuine snapshot, streamed in small chunks, installs.
    let mut receiver = follower.receive_snapshot(file.size(), file.checksum()).expect("receive");
    let mut offset = 0;
    loop {
        let piece = file.read_chunk(offset, 4096).expect("chunk");
        if piece.is_empty() {
            break;
        }
        receiver.write_chunk(offset, &piece).expect("chunk");
        offset += piece.len() as u64;
    }
    let received = receiver.finish().expect("whole snapshot");
    follower.install_snapshot_now(&meta, &received).expect("install");
    assert_eq!(value_of(&follower, b"mine"), None);
    assert_eq!(value_of(&follower, b"key-07"), Some(b"v".to_vec()));
    assert_eq!(follower.applied_state_now(), leader.applied_state_now());
}

#[test]
fn lease_revoke_removes_attached_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
    let responses = state_machine
        .apply_entries(&[
            normal(1, 1, WriteCommand::LeaseGrant { id: 0, ttl_secs: 10 }),
            normal(1, 2, WriteCommand::Put { key: b"a".to_vec(), value: b"1".to_vec(), lease: Some(1) }),
            normal(1, 3, put(b"b", b"2")),
            normal(1, 4, WriteCommand::LeaseRevoke { id: 1 }),
            blank(1, 5),
        ])
        .expect("apply");
    assert_eq!(
        responses[0],
        EntryResponse::Writes(vec![Ok(WriteResponse::LeaseGrant { revision: 1, id: 1, ttl_secs: 10 })])
    );
    assert_eq!(responses[3], EntryResponse::Writes(vec![Ok(WriteResponse::LeaseRevoke { revision: 4, deleted: 1 })]));
    assert_eq!(value_of(&state_machine, b"a"), None);
    assert_eq!(value_of(&state_machine, b"b"), Some(b"2".to_vec()));
}

#[test]
fn tampered_redb_file_is_a_typed_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    {
        let store = RedbLogStore::open(&path).expect("open");
        let entries: Vec<_> =
            (1..=200u64).map(|i| normal(1, i, put(format!("key-{i}").as_bytes(), &[7u8; 200]))).collect();
        store.append_entries(&entries).expect("append");
    }
    let clean = std::fs::read(&path).expect("read file");
    // Flip bytes across the file; every open must either succeed with a verified chain
    // or fail with a typed error. None may panic.
    let mut detected = 0;
    for position in (0..clean.len()).step_by(clean.len() / 64) {
        let mut bytes = clean.clone();
        bytes[position] ^= 0xFF;
        std::fs::write(&path, &bytes).expect("write tampered file");
        match RedbLogStore::open(&path) {
            Ok(store) => {
                if let Err(error) = store.read_entries(..) {
                    assert!(error.is_corruption(), "{error}");
                    detected += 1;
                }
            }
            Err(error) => {
                let _typed: &aspen_raft_storage::LogStoreError = &error;
                detected += 1;
            }
        }
    }
    assert!(detected > 0, "no tampering was detected at all");
    std::fs::write(&path, &clean).expect("restore");
    let store = RedbLogStore::open(&path).expect("the clean file opens");
    assert_eq!(store.read_entries(..).expect("read").len(), 200);
}
