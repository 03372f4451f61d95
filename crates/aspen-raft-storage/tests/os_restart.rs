//! ADR 0003: the state machine writes SQLite without fsync, so after an OS crash its file
//! may be torn. A file written under another boot is discarded on open and rebuilt from the
//! current snapshot (and then the log, which openraft re-applies); a file from this boot,
//! or one closed cleanly, is kept.
//!
//! The OS crash is staged the way it would look on disk: the marker still names the boot
//! that was running (a crash leaves no clean close behind), and the database and its WAL
//! are damaged, as unsynced pages may be.

mod common;

use std::fs::OpenOptions;
use std::path::Path;

use aspen_api::{KeyValue, ScanRequest, WriteCommand};
use aspen_raft_storage::SqliteStateMachine;
use aspen_raft_storage::state_machine::DB_FILE;
use aspen_raft_storage::state_machine::boot::{self, Durability, Opened};
use common::model::Model;
use common::normal;

fn boot(name: &str) -> Durability {
    Durability::Unsynced { boot: name.into() }
}

fn contents(state_machine: &SqliteStateMachine) -> Vec<KeyValue> {
    state_machine.reader().scan(&ScanRequest::prefix(Vec::new(), 0)).expect("scan").kvs
}

fn put(index: u64) -> WriteCommand {
    WriteCommand::Put {
        key: format!("key-{:02}", index % 40).into_bytes(),
        value: format!("value-{index}").into_bytes(),
        lease: None,
    }
}

/// Applies entries `range` to both.
fn apply(state_machine: &SqliteStateMachine, model: &mut Model, range: std::ops::RangeInclusive<u64>) {
    for index in range {
        let command = put(index);
        let _response = model.apply(index, &command);
        state_machine.apply_entries(&[normal(1, index, command)]).expect("apply");
    }
}

fn model_contents(model: &Model) -> Vec<KeyValue> {
    model.kvs.values().cloned().collect()
}

/// Stages an OS crash under `running`: the marker as it was while running, and the
/// database's pages and WAL tail damaged.
fn os_crash(dir: &Path, running: &Durability) {
    boot::record_running(dir, running).expect("marker");
    let db = OpenOptions::new().write(true).open(dir.join(DB_FILE)).expect("open db");
    let len = db.metadata().expect("metadata").len();
    db.set_len(len / 2).expect("tear the database");
    std::fs::write(dir.join(format!("{DB_FILE}-wal")), vec![0xa5; 10_000]).expect("garble the WAL");
}

#[test]
fn after_an_os_restart_an_unsynced_state_machine_is_rebuilt_from_its_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model = Model::default();
    let at_snapshot = {
        let state_machine = SqliteStateMachine::open_with(dir.path(), boot("a")).expect("open");
        assert_eq!(state_machine.opened(), Opened::Kept);
        apply(&state_machine, &mut model, 1..=60);
        let (meta, _) = state_machine.build_snapshot_now().expect("snapshot");
        assert_eq!(meta.last_log_id.map(|log_id| log_id.index), Some(60));
        let at_snapshot = model_contents(&model);
        apply(&state_machine, &mut model, 61..=120);
        assert_eq!(contents(&state_machine), model_contents(&model));
        at_snapshot
    };
    os_crash(dir.path(), &boot("a"));

    let state_machine = SqliteStateMachine::open_with(dir.path(), boot("b")).expect("reopen after the OS restart");
    assert_eq!(state_machine.opened(), Opened::Discarded);
    // Back at the snapshot; the log (here: the test) re-applies what follows it.
    assert_eq!(state_machine.applied_state_now().last_applied.map(|log_id| log_id.index), Some(60));
    assert_eq!(contents(&state_machine), at_snapshot);
    for index in 61..=120 {
        state_machine.apply_entries(&[normal(1, index, put(index))]).expect("re-apply");
    }
    assert_eq!(contents(&state_machine), model_contents(&model));
}

#[test]
fn a_state_machine_from_this_boot_or_closed_cleanly_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model = Model::default();
    {
        let state_machine = SqliteStateMachine::open_with(dir.path(), boot("a")).expect("open");
        apply(&state_machine, &mut model, 1..=50);
    }
    // A process crash under the same boot: the marker names it, the page cache kept every
    // write (nothing damaged), so the file is kept.
    boot::record_running(dir.path(), &boot("a")).expect("marker");
    {
        let state_machine = SqliteStateMachine::open_with(dir.path(), boot("a")).expect("reopen, same boot");
        assert_eq!(state_machine.opened(), Opened::Kept);
        assert_eq!(state_machine.applied_state_now().last_applied.map(|log_id| log_id.index), Some(50));
        apply(&state_machine, &mut model, 51..=80);
    }
    // Closed cleanly (the drop above): a later boot keeps it too.
    let state_machine = SqliteStateMachine::open_with(dir.path(), boot("c")).expect("reopen, next boot");
    assert_eq!(state_machine.opened(), Opened::Kept);
    assert_eq!(state_machine.applied_state_now().last_applied.map(|log_id| log_id.index), Some(80));
    assert_eq!(contents(&state_machine), model_contents(&model));
}

#[test]
fn without_a_snapshot_the_rebuild_starts_from_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut model = Model::default();
    {
        let state_machine = SqliteStateMachine::open_with(dir.path(), boot("a")).expect("open");
        apply(&state_machine, &mut model, 1..=30);
    }
    os_crash(dir.path(), &boot("a"));
    let state_machine = SqliteStateMachine::open_with(dir.path(), boot("b")).expect("reopen after the OS restart");
    assert_eq!(state_machine.opened(), Opened::Discarded);
    assert_eq!(state_machine.applied_state_now().last_applied, None, "the whole log is re-applied");
    assert!(contents(&state_machine).is_empty());
}
