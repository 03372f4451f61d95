//! A damaged Raft log journal is reported, never shortened: only a torn final record (the
//! last write, cut by a crash before its sync) is discarded on open. A damaged record with
//! records written after it is `LogStoreError::JournalCorrupt` naming the record, and the
//! files stay as they are, so nothing is lost: undoing the damage opens the whole log.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use aspen_api::WriteCommand;
use aspen_raft_storage::log::journal::{JOURNAL_CHECKPOINT_RECORDS, journal_paths};
use aspen_raft_storage::{Entry, LogStoreError, RedbLogStore};
use common::{blank, normal};

/// Bytes before a record's payload (see the record layout in `log::journal`).
const RECORD_HEADER_LEN: u64 = 48;
const RECORD_MAGIC: &[u8; 4] = b"ASJ1";
/// Appends in the log the tests build: one journal record each.
const APPENDS: u64 = 10;
/// Entries per append.
const BATCH: u64 = 3;

/// A journal record on disk: where it starts, its sequence number and payload length.
#[derive(Clone, Copy, Debug)]
struct Record {
    offset: u64,
    seq: u64,
    payload_len: u64,
}

impl Record {
    fn end(&self) -> u64 {
        self.offset + RECORD_HEADER_LEN + self.payload_len
    }
}

/// The records from the start of a journal file, stepping by the lengths headers state.
fn records(path: &Path) -> Vec<Record> {
    let bytes = std::fs::read(path).expect("read journal");
    let mut found = Vec::new();
    let mut offset = 0usize;
    while let Some(header) = bytes.get(offset..offset + RECORD_HEADER_LEN as usize) {
        if &header[0..4] != RECORD_MAGIC {
            break;
        }
        let payload_len = u64::from(u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")));
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let record = Record { offset: offset as u64, seq, payload_len };
        found.push(record);
        offset = record.end() as usize;
    }
    found
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).expect("open journal");
    file.write_all_at(bytes, offset).expect("write journal");
}

fn flip(path: &Path, offset: u64) {
    let bytes = std::fs::read(path).expect("read journal");
    write_at(path, offset, &[bytes[offset as usize] ^ 0x41]);
}

/// Every file of the log at `path`: the redb file and both journal files.
fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    files.extend(journal_paths(path));
    files
}

fn contents(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|file| std::fs::read(file).expect("read log file")).collect()
}

/// A log of `APPENDS` appends of `BATCH` entries, closed without a checkpoint: every entry
/// lives only in the journal's first file, one record per append (record `k` holds indexes
/// `BATCH * (k - 1) + 1 ..= BATCH * k`).
fn journal_only_log(path: &Path) -> Vec<Entry> {
    let store = RedbLogStore::open(path).expect("open");
    let mut entries = Vec::new();
    for append in 0..APPENDS {
        let batch: Vec<Entry> = (append * BATCH + 1..=(append + 1) * BATCH)
            .map(|index| {
                let value = format!("value {index} ").repeat(8).into_bytes();
                normal(1, index, WriteCommand::Put { key: format!("key-{index}").into_bytes(), value, lease: None })
            })
            .collect();
        store.append_entries(&batch).expect("append");
        entries.extend(batch);
    }
    // Closing writes no pending row to redb: the next open replays the journal.
    drop(store);
    let on_disk = records(&journal_paths(path)[0]);
    let seqs: Vec<u64> = on_disk.iter().map(|record| record.seq).collect();
    assert_eq!(seqs, (1..=APPENDS).collect::<Vec<_>>(), "one record per append, from the start of the file");
    entries
}

/// The fields of a `JournalCorrupt`: file, offset, sequence, first index, last good index.
fn refusal(error: &LogStoreError) -> (String, u64, u64, Option<u64>, Option<u64>) {
    match error {
        LogStoreError::JournalCorrupt { path, offset, sequence, first_index, last_good_index, .. } => {
            (path.clone(), *offset, *sequence, *first_index, *last_good_index)
        }
        other => panic!("not a damaged journal: {other}"),
    }
}

fn name(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn a_damaged_middle_record_refuses_to_open_and_keeps_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    let entries = journal_only_log(&path);
    let journal = journal_paths(&path)[0].clone();
    let middle = records(&journal)[4];
    let damaged_byte = middle.offset + RECORD_HEADER_LEN + 30;
    flip(&journal, damaged_byte);
    let journals = journal_paths(&path).to_vec();
    let before = contents(&journals);

    let error = RedbLogStore::open(&path).err().expect("a damaged middle record refuses to open");
    assert_eq!(refusal(&error), (name(&journal), middle.offset, 5, Some(4 * BATCH + 1), Some(4 * BATCH)));
    assert!(error.is_corruption());
    let message = error.to_string();
    assert!(message.contains("record 5 ") && message.contains("record 6 was written after it"), "{message}");
    let io_error: std::io::Error = error.into();
    assert_eq!(io_error.kind(), std::io::ErrorKind::InvalidData);
    // The journal is as the damage left it. (redb records its allocator state whenever it
    // closes, so its file's bytes change; what it holds does not, as the reopen below shows.)
    assert!(contents(&journals) == before, "a refused open changes no journal file");

    // Nothing was lost: with the byte restored, every entry opens.
    flip(&journal, damaged_byte);
    let store = RedbLogStore::open(&path).expect("the repaired log opens");
    assert_eq!(store.read_entries(..).expect("read"), entries);
    assert_eq!(store.verify().expect("verify").entries, APPENDS * BATCH);
}

/// The damaged record is the first after a checkpoint: the entries before it are in redb,
/// and the error names the index after redb's last.
#[test]
fn a_damaged_first_record_after_a_checkpoint_names_the_index_after_the_stored_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    let entries = journal_only_log(&path);
    let stored = entries[(APPENDS * BATCH) as usize - 1].log_id;
    let store = RedbLogStore::open(&path).expect("open");
    // A truncation that keeps everything is a durable commit: redb now holds every entry.
    store.truncate_entries_after(Some(stored)).expect("checkpoint");
    let more: Vec<Entry> = (stored.index + 1..=stored.index + 2 * BATCH).map(|index| blank(1, index)).collect();
    store.append_entries(&more[..BATCH as usize]).expect("append");
    store.append_entries(&more[BATCH as usize..]).expect("append");
    drop(store);
    let journal = journal_paths(&path)[0].clone();
    let first = records(&journal)[0];
    assert_eq!(first.offset, 0, "after a checkpoint records start over at the start of the file");
    write_at(&journal, first.end() - 4, &[0xee; 4]);
    let error = RedbLogStore::open(&path).err().expect("refuses to open");
    let (file, offset, sequence, first_index, last_good_index) = refusal(&error);
    assert_eq!((file, offset), (name(&journal), 0));
    assert_eq!((first_index, last_good_index), (Some(stored.index + 1), Some(stored.index)), "{error}");
    assert_eq!(records(&journal)[1].seq, sequence + 1, "the record after it was found");
}

#[test]
fn a_torn_final_record_is_discarded_and_every_earlier_entry_opens() {
    // The file ends inside the record, or the record's tail is zeros (never written).
    for zeroed_tail in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        let entries = journal_only_log(&path);
        let journal = journal_paths(&path)[0].clone();
        let last = records(&journal)[APPENDS as usize - 1];
        if zeroed_tail {
            write_at(&journal, last.end() - 16, &[0u8; 16]);
        } else {
            let file = std::fs::OpenOptions::new().write(true).open(&journal).expect("open journal");
            file.set_len(last.offset + RECORD_HEADER_LEN + last.payload_len / 2).expect("cut");
        }
        let kept = ((APPENDS - 1) * BATCH) as usize;
        let store = RedbLogStore::open(&path).expect("a torn final record opens");
        assert_eq!(store.read_entries(..).expect("read"), entries[..kept], "zeroed tail: {zeroed_tail}");
        assert_eq!(store.verify().expect("verify").entries, kept as u64);
        // The log goes on from there, over the torn record's sequence number, and reopens whole.
        store.append_entries(&entries[kept..]).expect("append again");
        drop(store);
        let store = RedbLogStore::open(&path).expect("reopen");
        assert_eq!(store.read_entries(..).expect("read"), entries);
    }
}

#[test]
fn a_damaged_last_record_of_the_file_appends_left_refuses_to_open() {
    use aspen_raft_storage::TypeConfig;
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    let store = RedbLogStore::open(&path).expect("open");
    let mut writer = store.clone();
    // One record per append; the first file takes JOURNAL_CHECKPOINT_RECORDS of them, the
    // rest go to the second. Its checkpoint is held off, as a crash would find it.
    let total = JOURNAL_CHECKPOINT_RECORDS + 5;
    let hold = store.hold_commits();
    runtime.block_on(async {
        for index in 1..=total {
            let (callback, done) = TypeConfig::oneshot();
            writer.append(vec![blank(1, index)], IOFlushed::signal(callback)).await.expect("append");
            done.await.expect("callback fired").expect("durable");
        }
    });
    let image = tempfile::tempdir().expect("crash image dir");
    let image_path = image.path().join("log.redb");
    for (from, to) in log_files(&path).iter().zip(log_files(&image_path)) {
        std::fs::copy(from, to).expect("copy log file");
    }
    drop(hold);
    drop(writer);
    drop(store);
    drop(runtime);

    let [first, second] = journal_paths(&image_path);
    let second_seqs: Vec<u64> = records(&second).iter().map(|record| record.seq).collect();
    assert_eq!(second_seqs, (JOURNAL_CHECKPOINT_RECORDS + 1..=total).collect::<Vec<_>>());
    let last = records(&first)[JOURNAL_CHECKPOINT_RECORDS as usize - 1];
    assert_eq!(last.seq, JOURNAL_CHECKPOINT_RECORDS);
    // The file was synced before appends moved on: only a disk fault can damage it now.
    write_at(&first, last.end() - 8, &[0u8; 8]);
    let error = RedbLogStore::open(&image_path).err().expect("refuses to open");
    let last_index = JOURNAL_CHECKPOINT_RECORDS;
    assert_eq!(refusal(&error), (name(&first), last.offset, last.seq, Some(last_index), Some(last_index - 1)));
    assert!(error.to_string().contains(&name(&second)), "names the file with the later records: {error}");
}
