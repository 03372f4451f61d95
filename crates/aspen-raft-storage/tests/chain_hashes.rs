//! Properties of `RedbLogStore::hash_at`, the chain hash consensus compares across nodes:
//! it is the hash stored with the entry wherever the row lives (last entry, in-memory tail,
//! pending journal rows, redb), it names one entry (index and term), and two logs holding
//! the same entries agree on it, also when one of them got its start from a snapshot.

mod common;

use aspen_api::WriteCommand;
use aspen_raft_storage::log::chain::{self, ChainHash};
use aspen_raft_storage::log::tail::MAX_TAIL_ENTRIES;
use aspen_raft_storage::{Entry, LogId, RedbLogStore};
use common::{blank, log_id, normal};

fn put(index: u64) -> WriteCommand {
    WriteCommand::Put { key: format!("k{index}").into_bytes(), value: b"v".to_vec(), lease: None }
}

/// The hash stored in the row of `index`.
fn stored_hash(store: &RedbLogStore, index: u64) -> ChainHash {
    let row = store.read_raw_row(index).expect("read raw").expect("row exists");
    chain::decode_row(&row).expect("row decodes").hash
}

fn hash(store: &RedbLogStore, log_id: LogId) -> Option<ChainHash> {
    store.hash_at(&log_id).expect("hash_at")
}

#[test]
fn hash_at_is_the_stored_hash_wherever_the_row_lives_and_names_one_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    let store = RedbLogStore::open(&path).expect("open");
    // Few, large appends: one journal record each, so every row stays pending (no
    // checkpoint is due), more rows than the in-memory tail keeps.
    let total = MAX_TAIL_ENTRIES as u64 + 900;
    let entries: Vec<Entry> = (1..=total).map(|index| blank(2, index)).collect();
    for batch in entries.chunks(1000) {
        store.append_entries(batch).expect("append");
    }
    let check = |store: &RedbLogStore| {
        for index in 1..=total {
            assert_eq!(hash(store, log_id(2, index)), Some(stored_hash(store, index)), "entry {index}");
            assert_eq!(hash(store, log_id(1, index)), None, "index {index} under another term is another entry");
        }
        assert_eq!(hash(store, log_id(2, total + 1)), None, "past the last entry");
    };
    check(&store);
    drop(store);
    // Reopened, the tail is empty and every row is in redb.
    let store = RedbLogStore::open(&path).expect("reopen");
    check(&store);

    // The purge point answers with the anchor, which is its hash; entries before it are gone.
    let at_purge = stored_hash(&store, 100);
    store.purge_entries_upto(log_id(2, 100)).expect("purge");
    assert_eq!(hash(&store, log_id(2, 100)), Some(at_purge));
    assert_eq!(hash(&store, log_id(2, 99)), None);
    assert_eq!(hash(&store, log_id(2, 101)), Some(stored_hash(&store, 101)));
}

/// Entries 1..=`last` of term 3, the same on every "node".
fn history(last: u64) -> Vec<Entry> {
    (1..=last).map(|index| normal(3, index, put(index))).collect()
}

#[test]
fn a_log_started_from_a_snapshot_with_the_leaders_hash_has_the_leaders_hashes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = history(40);
    let leader = RedbLogStore::open(dir.path().join("leader.redb")).expect("open");
    leader.append_entries(&entries[..30]).expect("append");
    // The leader snapshots and purges its own log at a stored entry: still rooted.
    leader.purge_entries_upto(log_id(3, 15)).expect("purge");

    // A follower that had only the first 10 entries installs a snapshot up to 20 (openraft
    // then purges past everything it holds) and receives the rest by replication.
    let follower_path = dir.path().join("follower.redb");
    let follower = RedbLogStore::open(&follower_path).expect("open");
    follower.append_entries(&entries[..10]).expect("append");
    let snapshot_last = log_id(3, 20);
    let leader_hash = hash(&leader, snapshot_last).expect("the leader holds the snapshot's last entry");
    follower.expect_snapshot_anchor(snapshot_last, leader_hash);
    follower.purge_entries_upto(snapshot_last).expect("purge past the log");
    follower.append_entries(&entries[20..30]).expect("append after the snapshot");
    for index in 20..=30 {
        let id = log_id(3, index);
        assert_eq!(hash(&follower, id), hash(&leader, id), "entry {index}");
        assert!(hash(&follower, id).is_some(), "entry {index} is compared");
    }
    drop(follower);
    let follower = RedbLogStore::open(&follower_path).expect("reopen");
    follower.verify().expect("the re-anchored chain verifies");
    follower.append_entries(&entries[30..]).expect("append");
    leader.append_entries(&entries[30..]).expect("append");
    for index in 20..=40 {
        let id = log_id(3, index);
        assert_eq!(hash(&follower, id), hash(&leader, id), "entry {index} after reopen");
    }
}

#[test]
fn a_log_started_from_a_snapshot_without_the_leaders_hash_compares_nothing_until_one_comes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = history(40);
    let leader = RedbLogStore::open(dir.path().join("leader.redb")).expect("open");
    leader.append_entries(&entries).expect("append");

    let path = dir.path().join("follower.redb");
    let follower = RedbLogStore::open(&path).expect("open");
    follower.append_entries(&entries[..5]).expect("append");
    // A hint for another log id is not this snapshot's.
    follower.expect_snapshot_anchor(log_id(3, 19), [7; 32]);
    follower.purge_entries_upto(log_id(3, 20)).expect("purge past the log");
    follower.append_entries(&entries[20..25]).expect("append");
    for index in 20..=25 {
        assert_eq!(hash(&follower, log_id(3, index)), None, "entry {index}: unrooted hashes are not shared");
    }
    // Its own purge at a stored entry does not make the chain rooted, nor does a reopen.
    follower.purge_entries_upto(log_id(3, 22)).expect("purge");
    drop(follower);
    let follower = RedbLogStore::open(&path).expect("reopen");
    assert_eq!(hash(&follower, log_id(3, 24)), None);

    // The next snapshot install that overtakes the log brings the leader's hash again.
    let snapshot_last = log_id(3, 30);
    follower.expect_snapshot_anchor(snapshot_last, hash(&leader, snapshot_last).expect("leader hash"));
    follower.purge_entries_upto(snapshot_last).expect("purge past the log");
    follower.append_entries(&entries[30..]).expect("append");
    for index in 30..=40 {
        let id = log_id(3, index);
        assert_eq!(hash(&follower, id), hash(&leader, id), "entry {index}");
        assert!(hash(&follower, id).is_some());
    }
}

#[test]
fn two_logs_agree_on_every_hash_before_the_first_differing_entry_and_on_none_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = history(30);
    let original = RedbLogStore::open(dir.path().join("original.redb")).expect("open");
    original.append_entries(&entries).expect("append");
    let path = dir.path().join("rewritten.redb");
    let rewritten = RedbLogStore::open(&path).expect("open");
    rewritten.append_entries(&entries).expect("append");
    assert!(rewritten.rewrite_entry(normal(3, 12, put(999))).expect("rewrite"));
    drop(rewritten);
    let rewritten = RedbLogStore::open(&path).expect("a rewritten log verifies on open");
    for index in 1..=30 {
        let id = log_id(3, index);
        let (ours, theirs) = (hash(&original, id).expect("held"), hash(&rewritten, id).expect("held"));
        assert_eq!(ours == theirs, index < 12, "entry {index}");
    }
}

#[test]
fn hash_entries_computes_what_the_log_stores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = history(12);
    let store = RedbLogStore::open(dir.path().join("log.redb")).expect("open");
    store.append_entries(&entries).expect("append");
    let prev = hash(&store, log_id(3, 4)).expect("held");
    for last in 5..=12 {
        let computed = chain::hash_entries(&prev, &entries[4..last as usize]).expect("consecutive");
        assert_eq!(computed, hash(&store, log_id(3, last)), "entry {last}");
    }
    assert_eq!(chain::hash_entries(&prev, &[]).expect("nothing"), None);
    let gap = [entries[4].clone(), entries[6].clone()];
    assert!(chain::hash_entries(&prev, &gap).is_err(), "entries with a gap have no chain");
}
