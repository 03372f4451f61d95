//! Exactly-once writes in the state machine: a write with an identity takes effect once,
//! however often its entry's command arrives, through snapshots and on every replica alike.

mod common;

use aspen_api::session::{MAX_SESSIONS, SESSION_IDLE_EXPIRY_MS, SESSION_MIN_IDLE_MS, SESSION_SWEEP_INTERVAL_MS};
use aspen_api::{
    ApplyError, ClientWrite, Compare, CompareOp, CompareTarget, Proposal, SessionId, TxnOp, TxnRequest, WriteCommand,
    WriteId, WriteResponse,
};
use aspen_raft_storage::{Entry, EntryResponse, SqliteStateMachine};
use common::log_id;
use openraft::EntryPayload;

/// Cluster-clock origin of these tests: an arbitrary wall-clock time.
const T0: u64 = 1_800_000_000_000;

fn entry(index: u64, time_ms: u64, writes: Vec<ClientWrite>) -> Entry {
    Entry { log_id: log_id(1, index), payload: EntryPayload::Normal(Proposal { time_ms, writes }) }
}

fn id(session: u128, seq: u64, first_outstanding: u64) -> Option<WriteId> {
    Some(WriteId { session: SessionId(session), seq, first_outstanding })
}

/// A CAS from `expected` to `new` on key `k`: applied twice it would report failure.
fn cas(expected: &[u8], new: &[u8]) -> WriteCommand {
    WriteCommand::Txn(TxnRequest {
        compare: vec![Compare {
            key: b"k".to_vec(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(expected.to_vec()),
        }],
        success: vec![TxnOp::Put { key: b"k".to_vec(), value: new.to_vec(), lease: None }],
        failure: vec![],
    })
}

fn put(key: &str, value: &str) -> WriteCommand {
    WriteCommand::Put { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec(), lease: None }
}

fn results(responses: Vec<EntryResponse>) -> Vec<Result<WriteResponse, ApplyError>> {
    responses
        .into_iter()
        .flat_map(|response| match response {
            EntryResponse::Writes(results) => results,
            EntryResponse::NoOp => Vec::new(),
        })
        .collect()
}

fn value(state_machine: &SqliteStateMachine, key: &str) -> Option<(Vec<u8>, u64)> {
    state_machine.reader().get(key.as_bytes()).expect("get").kv.map(|kv| (kv.value, kv.version))
}

fn cas_succeeded(result: &Result<WriteResponse, ApplyError>) -> bool {
    match result {
        Ok(WriteResponse::Txn(response)) => response.succeeded,
        other => panic!("expected a txn answer, got {other:?}"),
    }
}

#[test]
fn a_retried_cas_applies_once_and_gets_its_first_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
    let first = state_machine
        .apply_entries(&[
            entry(1, T0, vec![ClientWrite { id: id(1, 1, 1), command: put("k", "a") }]),
            entry(2, T0, vec![ClientWrite { id: id(1, 2, 2), command: cas(b"a", b"b") }]),
        ])
        .expect("apply");
    assert!(cas_succeeded(&results(first)[1]));
    // The same CAS again (a retry after a lost reply), in a later entry and apply.
    let retry = state_machine
        .apply_entries(&[entry(3, T0 + 5, vec![ClientWrite { id: id(1, 2, 2), command: cas(b"a", b"b") }])])
        .expect("apply");
    let retry = results(retry);
    assert!(cas_succeeded(&retry[0]), "the retry gets the first answer: succeeded");
    match &retry[0] {
        Ok(WriteResponse::Txn(response)) => assert_eq!(response.revision, 2, "and the first revision"),
        other => panic!("{other:?}"),
    }
    assert_eq!(value(&state_machine, "k"), Some((b"b".to_vec(), 2)), "applied once: version 2, not 3");

    // The same command without an identity applies again (and fails its compare).
    let unkeyed =
        state_machine.apply_entries(&[entry(4, T0 + 6, vec![ClientWrite::from(cas(b"a", b"b"))])]).expect("apply");
    assert!(!cas_succeeded(&results(unkeyed)[0]));
}

#[test]
fn duplicates_inside_one_entry_and_one_apply_are_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
    let write = ClientWrite { id: id(9, 1, 1), command: put("x", "1") };
    let responses = state_machine
        .apply_entries(&[entry(1, T0, vec![write.clone(), write.clone()]), entry(2, T0, vec![write])])
        .expect("apply");
    let answers = results(responses);
    assert_eq!(answers, vec![Ok(WriteResponse::Put { revision: 1 }); 3]);
    assert_eq!(value(&state_machine, "x"), Some((b"1".to_vec(), 1)));
}

#[test]
fn forgotten_and_expired_writes_get_typed_errors_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
    let answers = results(
        state_machine
            .apply_entries(&[
                entry(1, T0, vec![ClientWrite { id: id(1, 1, 1), command: put("k", "1") }]),
                // The client has moved on past 1..=4: write 2 is forgotten.
                entry(2, T0, vec![ClientWrite { id: id(1, 5, 5), command: put("k", "5") }]),
                entry(3, T0, vec![ClientWrite { id: id(1, 2, 1), command: put("k", "late") }]),
                // A session nobody started, named by a client that is past its first write.
                entry(4, T0, vec![ClientWrite { id: id(2, 7, 3), command: put("k", "ghost") }]),
            ])
            .expect("apply"),
    );
    assert_eq!(answers[2], Err(ApplyError::WriteTooOld { seq: 2, floor: 5 }));
    assert_eq!(answers[3], Err(ApplyError::SessionExpired { session: SessionId(2) }));
    assert_eq!(value(&state_machine, "k"), Some((b"5".to_vec(), 2)));
}

#[test]
fn idle_sessions_expire_at_the_same_entry_on_every_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let late = T0 + SESSION_IDLE_EXPIRY_MS + SESSION_SWEEP_INTERVAL_MS;
    let entries = vec![
        entry(1, T0, vec![ClientWrite { id: id(1, 1, 1), command: put("a", "1") }]),
        entry(2, T0 + 2 * SESSION_SWEEP_INTERVAL_MS, vec![ClientWrite { id: id(2, 1, 1), command: put("b", "1") }]),
        // An hour and a minute later session 2 writes again (its clock shows late); session 1
        // has been idle past the expiry and is gone, session 2 is not.
        entry(3, late, vec![ClientWrite { id: id(2, 2, 2), command: put("b", "2") }]),
        entry(4, late, vec![ClientWrite { id: id(1, 2, 2), command: put("a", "2") }]),
        // A leader whose clock is behind never moves the cluster clock back.
        entry(5, T0, vec![ClientWrite { id: id(2, 3, 3), command: put("b", "3") }]),
    ];
    // One replica applies everything at once, another one entry per apply: same answers,
    // same sessions (the digest covers them).
    let whole = SqliteStateMachine::open(dir.path().join("whole")).expect("open");
    let answers = results(whole.apply_entries(&entries).expect("apply"));
    let split = SqliteStateMachine::open(dir.path().join("split")).expect("open");
    let mut split_answers = Vec::new();
    for one in &entries {
        split_answers.extend(results(split.apply_entries(std::slice::from_ref(one)).expect("apply")));
    }
    assert_eq!(answers, split_answers);
    assert!(answers[2].is_ok());
    assert_eq!(answers[3], Err(ApplyError::SessionExpired { session: SessionId(1) }));
    assert!(answers[4].is_ok());
    assert_eq!(whole.applied_state_now().cluster_time_ms, late);
    assert_eq!(whole.reader().digest().expect("digest"), split.reader().digest().expect("digest"));
}

#[test]
fn sessions_travel_in_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leader = SqliteStateMachine::open(dir.path().join("leader")).expect("open");
    leader
        .apply_entries(&[
            entry(1, T0, vec![ClientWrite { id: id(1, 1, 1), command: put("k", "a") }]),
            entry(2, T0, vec![ClientWrite { id: id(1, 2, 1), command: cas(b"a", b"b") }]),
        ])
        .expect("apply");
    let (meta, file) = leader.build_snapshot_now().expect("build");
    let follower = SqliteStateMachine::open(dir.path().join("follower")).expect("open");
    follower.install_snapshot_now(&meta, &file).expect("install");
    // The CAS arrives again after the follower (now leading) installed the snapshot.
    let retry = results(
        follower
            .apply_entries(&[entry(3, T0, vec![ClientWrite { id: id(1, 2, 1), command: cas(b"a", b"b") }])])
            .expect("apply"),
    );
    assert!(cas_succeeded(&retry[0]), "the snapshot kept the session's answer");
    assert_eq!(value(&follower, "k"), Some((b"b".to_vec(), 2)));
    assert_eq!(follower.applied_state_now().cluster_time_ms, T0);
}

/// The state machine keeps session rows decoded between applies; a snapshot install must
/// replace those too, or a retry would get an answer the installed state never gave.
#[test]
fn an_installed_snapshot_replaces_the_sessions_a_node_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leader = SqliteStateMachine::open(dir.path().join("leader")).expect("open");
    let first = entry(1, T0, vec![ClientWrite { id: id(1, 1, 1), command: put("k", "a") }]);
    leader.apply_entries(std::slice::from_ref(&first)).expect("apply");
    let (meta, file) = leader.build_snapshot_now().expect("build");
    // The follower applied the session's second write too (an entry the new leader never
    // committed), so it remembers an answer for sequence 2.
    let follower = SqliteStateMachine::open(dir.path().join("follower")).expect("open");
    follower
        .apply_entries(&[first, entry(2, T0, vec![ClientWrite { id: id(1, 2, 1), command: cas(b"a", b"b") }])])
        .expect("apply");
    follower.install_snapshot_now(&meta, &file).expect("install");
    // Sequence 2 now carries another command: the installed state has no answer for it,
    // so it applies.
    let applied = results(
        follower
            .apply_entries(&[entry(2, T0, vec![ClientWrite { id: id(1, 2, 1), command: cas(b"a", b"c") }])])
            .expect("apply"),
    );
    assert!(cas_succeeded(&applied[0]), "{applied:?}");
    assert_eq!(value(&follower, "k"), Some((b"c".to_vec(), 2)));
}

#[test]
fn a_full_session_table_replaces_only_long_idle_sessions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
    // MAX_SESSIONS sessions, each with one write, 1000 to an entry. The highest ids come
    // first, 1 ms earlier than the rest: the least recently used session is then one the
    // state machine still holds decoded (its cache keeps the highest ids), so replacing it
    // must drop it there too.
    let per_entry = 1000u64;
    let mut index = 0;
    for chunk in (0..MAX_SESSIONS / per_entry).rev() {
        index += 1;
        let writes = (0..per_entry)
            .map(|n| {
                let session = u128::from(chunk * per_entry + n + 1);
                ClientWrite { id: id(session, 1, 1), command: put("shared", "v") }
            })
            .collect();
        let time = if index == 1 { T0 } else { T0 + 1 };
        state_machine.apply_entries(&[entry(index, time, writes)]).expect("apply");
    }
    let least_recent = u128::from(MAX_SESSIONS - per_entry + 1);
    let newcomer =
        |index, time| entry(index, time, vec![ClientWrite { id: id(u128::MAX, 1, 1), command: put("n", "1") }]);
    let refused = results(state_machine.apply_entries(&[newcomer(index + 1, T0 + 1000)]).expect("apply"));
    assert_eq!(refused[0], Err(ApplyError::TooManySessions { max: MAX_SESSIONS }));
    assert_eq!(value(&state_machine, "n"), None);
    let admitted =
        results(state_machine.apply_entries(&[newcomer(index + 2, T0 + SESSION_MIN_IDLE_MS)]).expect("apply"));
    assert!(admitted[0].is_ok(), "{admitted:?}");
    // The replaced session was the least recently used: a later write of it finds it gone.
    let gone = results(
        state_machine
            .apply_entries(&[entry(
                index + 3,
                T0 + SESSION_MIN_IDLE_MS,
                vec![ClientWrite { id: id(least_recent, 2, 2), command: put("shared", "w") }],
            )])
            .expect("apply"),
    );
    assert_eq!(gone[0], Err(ApplyError::SessionExpired { session: SessionId(least_recent) }));
    // A session used later than it is still there.
    let kept = results(
        state_machine
            .apply_entries(&[entry(
                index + 4,
                T0 + SESSION_MIN_IDLE_MS,
                vec![ClientWrite { id: id(1, 2, 2), command: put("shared", "x") }],
            )])
            .expect("apply"),
    );
    assert!(kept[0].is_ok(), "{kept:?}");
}
