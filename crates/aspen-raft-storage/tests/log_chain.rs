//! Properties of the hash-chained log: every valid history verifies (also after
//! truncation, purge and reopen), and any single flipped bit in any stored row is
//! reported as corruption at exactly that row's index.

mod common;

use aspen_raft_storage::{Entry, LogStoreError, RedbLogStore};
use common::{Op, blank, log_id, normal};

/// A random log history: appends in batches with rising terms, truncations, purges.
#[derive(Clone, Debug, bolero::TypeGenerator)]
enum Step {
    Append { ops: Vec<Op>, new_term: bool },
    TruncateBack { count: u8 },
    Purge { count: u8 },
}

fn index_of(error: &LogStoreError) -> Option<u64> {
    match error {
        LogStoreError::ChainMismatch { index, .. } | LogStoreError::MalformedEntry { index, .. } => Some(*index),
        _ => None,
    }
}

/// Applies `steps` to the store and to a plain vector of expected entries.
fn run_history(store: &RedbLogStore, steps: &[Step]) -> (Vec<Entry>, Option<u64>) {
    let mut expected: Vec<Entry> = Vec::new();
    let mut term = 1;
    let mut next_index = 1;
    let mut purged = None;
    for step in steps {
        match step {
            Step::Append { ops, new_term } => {
                if *new_term {
                    term += 1;
                }
                let mut entries: Vec<Entry> = ops
                    .iter()
                    .take(20)
                    .enumerate()
                    .map(|(offset, op)| normal(term, next_index + offset as u64, op.command()))
                    .collect();
                if entries.is_empty() {
                    entries.push(blank(term, next_index));
                }
                store.append_entries(&entries).expect("append");
                next_index += entries.len() as u64;
                expected.extend(entries);
            }
            Step::TruncateBack { count } => {
                let keep = expected.len().saturating_sub(usize::from(*count % 8));
                let last_kept = keep
                    .checked_sub(1)
                    .map(|position| expected[position].log_id)
                    .or(purged.map(|index| log_id(0, index)));
                if keep == 0 && purged.is_some() {
                    continue;
                }
                store.truncate_entries_after(last_kept).expect("truncate");
                expected.truncate(keep);
                next_index =
                    expected.last().map_or(purged.map_or(1, |index| index + 1), |entry| entry.log_id.index + 1);
            }
            Step::Purge { count } => {
                let count = usize::from(*count % 6).min(expected.len());
                if count == 0 {
                    continue;
                }
                let upto = expected[count - 1].log_id;
                store.purge_entries_upto(upto).expect("purge");
                expected.drain(..count);
                purged = Some(upto.index);
            }
        }
    }
    (expected, purged)
}

#[test]
fn every_valid_history_verifies_and_reads_back() {
    bolero::check!().with_type::<Vec<Step>>().with_iterations(120).for_each(|steps| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        let store = RedbLogStore::open(&path).expect("open");
        let (expected, purged) = run_history(&store, steps);
        let summary = store.verify().expect("a valid chain verifies");
        assert_eq!(summary.entries, expected.len() as u64);
        assert_eq!(summary.purged.map(|log_id| log_id.index), purged);
        assert_eq!(store.read_entries(..).expect("read all"), expected);
        if let Some(middle) = expected.get(expected.len() / 2) {
            let from_middle = store.read_entries(middle.log_id.index..).expect("read a suffix");
            assert_eq!(from_middle, expected[expected.len() / 2..]);
        }
        drop(store);
        let reopened = RedbLogStore::open(&path).expect("reopen verifies the chain");
        assert_eq!(reopened.read_entries(..).expect("read all after reopen"), expected);
    });
}

#[test]
fn any_flipped_bit_is_reported_at_its_index() {
    bolero::check!().with_type::<(Vec<Op>, u8, u8, u16, u8)>().with_iterations(150).for_each(
        |(ops, purge, victim, byte, bit)| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("log.redb");
            let store = RedbLogStore::open(&path).expect("open");
            let mut entries: Vec<Entry> =
                ops.iter().take(24).enumerate().map(|(i, op)| normal(3, i as u64 + 1, op.command())).collect();
            entries.push(blank(4, entries.len() as u64 + 1));
            store.append_entries(&entries).expect("append");
            // Sometimes purge a prefix first, so the victim may chain from the anchor.
            let purged = u64::from(*purge) % entries.len() as u64;
            if purged > 0 {
                store.purge_entries_upto(entries[purged as usize - 1].log_id).expect("purge");
            }
            let victim = purged + 1 + u64::from(*victim) % (entries.len() as u64 - purged);
            let mut row = store.read_raw_row(victim).expect("read raw").expect("victim row exists");
            let position = usize::from(*byte) % row.len();
            row[position] ^= 1 << (bit % 8);
            store.overwrite_raw_row(victim, &row).expect("tamper");

            let error = store.verify().expect_err("tampering is detected");
            assert_eq!(index_of(&error), Some(victim), "{error}");
            assert!(error.is_corruption());
            let read_error = store.read_entries(..).expect_err("reading the tampered range fails");
            assert_eq!(index_of(&read_error), Some(victim), "{read_error}");
            let io_error: std::io::Error = read_error.into();
            assert_eq!(io_error.kind(), std::io::ErrorKind::InvalidData);
            // Entries before the victim are still readable.
            let before = store.read_entries(..victim).expect("entries before the victim read fine");
            assert_eq!(before.len() as u64, victim - purged - 1);
            drop(store);
            let reopen_error = RedbLogStore::open(&path).err().expect("reopening refuses the tampered chain");
            assert_eq!(index_of(&reopen_error), Some(victim), "{reopen_error}");
        },
    );
}

/// Appends past two journal checkpoints, then truncates: what reopens is exactly what was
/// kept (a replayed journal record never brings truncated entries back), and the journal
/// stays bounded by its checkpoints.
#[test]
fn journal_checkpoints_and_truncation_survive_reopen() {
    use aspen_raft_storage::log::journal::{JOURNAL_CHECKPOINT_RECORDS, JOURNAL_GROW_STEP, journal_paths};

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    let store = RedbLogStore::open(&path).expect("open");
    // Enough records that a journal never checkpointed would outgrow the bound below.
    let total = 20 * JOURNAL_CHECKPOINT_RECORDS + 100;
    let mut expected = Vec::new();
    for index in 1..=total {
        let entry = blank(1, index);
        store.append_entries(std::slice::from_ref(&entry)).expect("append");
        expected.push(entry);
    }
    // Entries after the last checkpoint live durably only in the journal (and pending in
    // memory); a truncation among them is a durable commit of its own.
    let keep = total - 50;
    store.truncate_entries_after(Some(log_id(1, keep))).expect("truncate");
    expected.truncate(keep as usize);
    let replacement: Vec<Entry> = (keep + 1..=keep + 10).map(|index| blank(2, index)).collect();
    store.append_entries(&replacement).expect("append after truncate");
    expected.extend(replacement);
    // The replacement is pending (journal only), everything before it in redb: reads that
    // start, end or cross there chain across the two.
    let boundary = keep + 1;
    let want = |range: &dyn Fn(u64) -> bool| -> Vec<Entry> {
        expected.iter().filter(|entry| range(entry.log_id.index)).cloned().collect()
    };
    for start in boundary - 3..=boundary + 3 {
        for end in [boundary - 2, boundary, boundary + 1, boundary + 5, keep + 11, keep + 30] {
            if end >= start {
                let got = store.read_entries(start..end).expect("read a window");
                assert_eq!(got, want(&|index| (start..end).contains(&index)), "{start}..{end}");
                let got = store.read_entries(start..=end).expect("read a window");
                assert_eq!(got, want(&|index| (start..=end).contains(&index)), "{start}..={end}");
            }
        }
        assert_eq!(store.read_entries(start..).expect("read to the end"), want(&|index| index >= start));
    }
    assert_eq!(store.verify().expect("verify across the boundary").last, Some(log_id(2, keep + 10)));
    drop(store);

    // Records of at most this size, in files that grow in whole zero-filled steps.
    let record_bound = 48 + 12 + 256;
    let bound = (JOURNAL_CHECKPOINT_RECORDS * record_bound).div_ceil(JOURNAL_GROW_STEP) * JOURNAL_GROW_STEP;
    for journal in journal_paths(&path) {
        let journal_len = std::fs::metadata(&journal).expect("journal file exists").len();
        assert!(journal_len <= bound, "{} of {journal_len} bytes outgrew its checkpoints", journal.display());
    }
    let reopened = RedbLogStore::open(&path).expect("reopen");
    assert_eq!(reopened.read_entries(..).expect("read all"), expected);
    assert_eq!(reopened.verify().expect("verify").last, Some(log_id(2, keep + 10)));
}

/// A checkpoint caught mid-way, as a crash would find it: appends have moved on to the
/// journal's second file while the rows of the first are not in redb yet. Appends and reads
/// go on meanwhile; the files as they are then (a process crash) open to the whole log,
/// replayed from both journal files in order; and once the checkpoint goes through, the
/// store reopens to the same log.
#[test]
fn appends_go_on_during_a_checkpoint_and_a_crash_mid_way_loses_nothing() {
    use aspen_raft_storage::TypeConfig;
    use aspen_raft_storage::log::journal::{JOURNAL_CHECKPOINT_RECORDS, journal_paths};
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    let store = RedbLogStore::open(&path).expect("open");
    let mut writer = store.clone();
    let total = JOURNAL_CHECKPOINT_RECORDS + 40;
    let expected: Vec<Entry> = (1..=total).map(|index| blank(1, index)).collect();
    let hold = store.hold_commits();
    runtime.block_on(async {
        // Appended the way openraft does: every callback must fire (the appends are durable
        // in the journal) although no redb commit can happen.
        for entry in &expected {
            let (callback, done) = TypeConfig::oneshot();
            writer.append(vec![entry.clone()], IOFlushed::signal(callback)).await.expect("append");
            done.await.expect("callback fired").expect("durable");
        }
    });
    assert_eq!(store.read_entries(..).expect("read while held"), expected);
    assert_eq!(
        store.read_entries(total - 50..total - 30).expect("window"),
        expected[(total - 51) as usize..(total - 31) as usize]
    );

    let image = tempfile::tempdir().expect("crash image dir");
    let image_path = image.path().join("log.redb");
    std::fs::copy(&path, &image_path).expect("copy redb");
    for (from, to) in journal_paths(&path).iter().zip(journal_paths(&image_path)) {
        std::fs::copy(from, to).expect("copy journal file");
    }
    let second = std::fs::metadata(&journal_paths(&image_path)[1]).expect("second file").len();
    assert!(second > 0, "appends moved to the second journal file");

    drop(hold);
    drop(writer);
    drop(store);
    // Waits for the checkpoint, which was running on a blocking thread.
    drop(runtime);

    let crashed = RedbLogStore::open(&image_path).expect("the crash image opens");
    assert_eq!(crashed.read_entries(..).expect("read replayed"), expected);
    assert_eq!(crashed.verify().expect("verify replayed").last, Some(log_id(1, total)));
    let reopened = RedbLogStore::open(&path).expect("reopen after the checkpoint");
    assert_eq!(reopened.read_entries(..).expect("read"), expected);
}
