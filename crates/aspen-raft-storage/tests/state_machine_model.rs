//! Property: any sequence of operations applied to the SQLite state machine gives the
//! same responses and the same contents as the in-memory model, also after a snapshot
//! is built and installed into a fresh store that then keeps applying.

mod common;

use aspen_api::{KeyValue, ScanRequest, WriteCommand};
use aspen_raft_storage::{Entry, EntryResponse, SqliteStateMachine};
use common::model::Model;
use common::{Op, blank, log_id, normal};
use openraft::{EntryPayload, Membership};

fn contents(state_machine: &SqliteStateMachine) -> Vec<KeyValue> {
    let response = state_machine.reader().scan(&ScanRequest::prefix(Vec::new(), 0)).expect("scan everything");
    assert!(response.continuation.is_none(), "the test key space fits in one page");
    response.kvs
}

/// Applies `ops` starting at `first_index`, in batches of `batch` entries, checking each
/// response against the model. Returns the next free index.
fn apply_and_compare(
    state_machine: &SqliteStateMachine,
    model: &mut Model,
    ops: &[Op],
    first_index: u64,
    batch: usize,
) -> u64 {
    let mut index = first_index;
    for chunk in ops.chunks(batch.max(1)) {
        let mut entries = Vec::new();
        let mut expected = Vec::new();
        for op in chunk {
            let command = op.command();
            expected.push(EntryResponse::Writes(vec![model.apply(index, &command)]));
            entries.push(normal(2, index, command));
            index += 1;
        }
        // A blank entry in every batch, as a new leader would propose.
        entries.push(blank(2, index));
        expected.push(EntryResponse::NoOp);
        index += 1;
        let responses = state_machine.apply_entries(&entries).expect("apply");
        assert_eq!(responses, expected, "responses for entries {}..{index}", index - entries.len() as u64);
    }
    if !ops.is_empty() {
        let last_applied = state_machine.applied_state_now().last_applied.map(|log_id| log_id.index);
        assert_eq!(last_applied, Some(index - 1));
    }
    index
}

#[test]
fn state_machine_equals_model_and_survives_snapshot_round_trip() {
    bolero::check!().with_type::<(Vec<Op>, Vec<Op>, u8)>().with_iterations(150).for_each(|(before, after, batch)| {
        let dir = tempfile::tempdir().expect("tempdir");
        let state_machine = SqliteStateMachine::open(dir.path().join("a")).expect("open");
        let mut model = Model::default();
        let next = apply_and_compare(&state_machine, &mut model, before, 1, usize::from(*batch % 7) + 1);
        let model_kvs: Vec<KeyValue> = model.kvs.values().cloned().collect();
        assert_eq!(contents(&state_machine), model_kvs);

        let (meta, file) = state_machine.build_snapshot_now().expect("build snapshot");
        assert_eq!(meta.last_log_id, state_machine.applied_state_now().last_applied);
        let restored = SqliteStateMachine::open(dir.path().join("b")).expect("open fresh");
        restored.install_snapshot_now(&meta, &file).expect("install snapshot");
        assert_eq!(restored.applied_state_now(), state_machine.applied_state_now());
        assert_eq!(contents(&restored), model_kvs);

        // The restored store must carry on exactly like the model (leases included).
        apply_and_compare(&restored, &mut model, after, next, 3);
        let model_kvs: Vec<KeyValue> = model.kvs.values().cloned().collect();
        assert_eq!(contents(&restored), model_kvs);
    });
}

#[test]
fn reopened_state_machine_keeps_its_data_and_position() {
    bolero::check!().with_type::<Vec<Op>>().with_iterations(30).for_each(|ops| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut model = Model::default();
        let applied = {
            let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
            apply_and_compare(&state_machine, &mut model, ops, 1, 4);
            state_machine.applied_state_now()
        };
        let reopened = SqliteStateMachine::open(dir.path()).expect("reopen");
        assert_eq!(reopened.applied_state_now(), applied);
        assert_eq!(contents(&reopened), model.kvs.values().cloned().collect::<Vec<_>>());
    });
}

/// The membership row is written only by applies that carry a membership entry; applies
/// after it leave it in place, and a reopened store still knows the last membership.
#[test]
fn reopened_state_machine_keeps_the_last_membership() {
    let dir = tempfile::tempdir().expect("tempdir");
    let put = |index: u64| {
        normal(1, index, WriteCommand::Put { key: format!("k{index}").into_bytes(), value: vec![1], lease: None })
    };
    let membership = |index: u64, voters: &[u64]| Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Membership(Membership::new_with_defaults(vec![voters.iter().copied().collect()], [])),
    };
    let applied = {
        let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
        state_machine.apply_entries(&[blank(1, 1), membership(2, &[1])]).expect("apply");
        state_machine.apply_entries(&[put(3), put(4)]).expect("apply");
        state_machine.apply_entries(&[put(5), membership(6, &[1, 2, 3]), put(7)]).expect("apply");
        state_machine.apply_entries(&[put(8)]).expect("apply");
        state_machine.applied_state_now()
    };
    assert_eq!(applied.membership.log_id(), &Some(log_id(1, 6)));
    assert_eq!(applied.last_applied, Some(log_id(1, 8)));
    let reopened = SqliteStateMachine::open(dir.path()).expect("reopen");
    assert_eq!(reopened.applied_state_now(), applied);
}
