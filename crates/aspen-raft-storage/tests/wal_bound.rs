//! The state machine's write-ahead log stays bounded under sustained applies, checkpointed
//! between applies, never inside a commit: the synchronous apply checkpoints on the writer
//! past its checkpoint size; the async apply checkpoints in the background from there and
//! on the writer (waiting) at `MAX_WAL_CHECKPOINTS` times it. Both durabilities run.

mod common;

use aspen_api::WriteCommand;
use aspen_raft_storage::state_machine::schema::PAGE_SIZE;
use aspen_raft_storage::state_machine::{DB_FILE, Durability, MAX_WAL_CHECKPOINTS};
use aspen_raft_storage::{Entry, SqliteStateMachine};
use common::normal;
use openraft::storage::RaftStateMachine;

/// 4 KiB values: each put writes overflow pages to the WAL.
const VALUE_BYTES: usize = 4096;
const PUTS_PER_ENTRY: usize = 50;
/// Enough applies to fill the WAL past its largest checkpoint size several times over.
const ENTRIES: u64 = 2400;
/// Pages one entry may add past the checkpoint size: its overflow pages and the b-tree pages
/// it dirties.
const SLACK_PAGES: u64 = (VALUE_BYTES as u64 / PAGE_SIZE as u64 + 3) * PUTS_PER_ENTRY as u64;

fn entry(index: u64) -> Entry {
    let puts = (0..PUTS_PER_ENTRY)
        .map(|put| WriteCommand::Put {
            // 1000 distinct keys: the database stays small, only the WAL would grow.
            key: format!("key-{:04}", (index as usize * PUTS_PER_ENTRY + put) % 1000).into_bytes(),
            value: vec![index as u8; VALUE_BYTES],
            lease: None,
        })
        .collect();
    normal(1, index, WriteCommand::Batch(puts))
}

/// Frames (pages) the WAL file has room for: a 32-byte file header, then frames of a
/// 24-byte header and one page.
fn wal_file_pages(dir: &std::path::Path) -> u64 {
    let wal = dir.join(format!("{DB_FILE}-wal"));
    std::fs::metadata(wal).map_or(0, |meta| meta.len().saturating_sub(32) / (24 + u64::from(PAGE_SIZE)))
}

fn durabilities() -> [Durability; 2] {
    [Durability::Unsynced { boot: "test".into() }, Durability::Synced]
}

#[test]
fn sync_apply_keeps_the_wal_bounded() {
    for durability in durabilities() {
        sync_apply_keeps_the_wal_bounded_with(durability);
    }
}

fn sync_apply_keeps_the_wal_bounded_with(durability: Durability) {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = SqliteStateMachine::open_with(dir.path(), durability).expect("open");
    let bound = state_machine.checkpoint_wal_pages() + SLACK_PAGES;
    for index in 1..=ENTRIES {
        state_machine.apply_entries(&[entry(index)]).expect("apply");
        let file_pages = wal_file_pages(dir.path());
        assert!(file_pages <= bound, "WAL file holds {file_pages} pages after entry {index}");
    }
    assert!(
        state_machine.checkpoints() >= 3,
        "the WAL filled several times: {} checkpoints",
        state_machine.checkpoints()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_apply_keeps_the_wal_bounded() {
    for durability in durabilities() {
        async_apply_keeps_the_wal_bounded_with(durability).await;
    }
}

async fn async_apply_keeps_the_wal_bounded_with(durability: Durability) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut state_machine = SqliteStateMachine::open_with(dir.path(), durability).expect("open");
    let bound = MAX_WAL_CHECKPOINTS * state_machine.checkpoint_wal_pages() + SLACK_PAGES;
    for index in 1..=ENTRIES {
        let stream = futures::stream::iter([Ok((entry(index), None))]);
        state_machine.apply(stream).await.expect("apply");
        let file_pages = wal_file_pages(dir.path());
        assert!(file_pages <= bound, "WAL file holds {file_pages} pages after entry {index}");
    }
    assert!(
        state_machine.checkpoints() >= 3,
        "the WAL filled several times: {} checkpoints",
        state_machine.checkpoints()
    );
    let kv = state_machine.reader().get(b"key-0000").expect("read back").kv.expect("key present");
    assert_eq!(kv.value.len(), VALUE_BYTES);
}

/// A new file takes `PAGE_SIZE` pages (in WAL mode the size is fixed once the file exists),
/// and the WAL frames the bound above counts are that size.
#[test]
fn new_files_use_the_state_machine_page_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_machine = SqliteStateMachine::open_with(dir.path(), Durability::Synced).expect("open");
    state_machine.apply_entries(&[entry(1)]).expect("apply");
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).expect("open the file");
    let page_size: u32 = conn.pragma_query_value(None, "page_size", |row| row.get(0)).expect("page_size");
    assert_eq!(page_size, PAGE_SIZE);
    let journal: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0)).expect("journal_mode");
    assert_eq!(journal, "wal");
}
