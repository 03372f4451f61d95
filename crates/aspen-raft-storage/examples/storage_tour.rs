//! A tour of Aspen's storage layer on real files: append entries to the hash-chained redb
//! log, apply them to the SQLite state machine, read, query with SQL, snapshot, detect
//! tampering. Run: `cargo run -p aspen-raft-storage --example storage_tour [DATA_DIR]`.

use std::time::Instant;

use aspen_api::{KeyRange, ScanRequest, SqlRequest, WriteCommand};
use aspen_raft_storage::{Entry, RedbLogStore, SqliteStateMachine};
use openraft::EntryPayload;

const ENTRIES: u64 = 10_000;
const BATCH: u64 = 500;

fn entry(index: u64, command: WriteCommand) -> Entry {
    Entry { log_id: openraft::LogId::new(1u64.into(), index), payload: EntryPayload::Normal(command) }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args().nth(1);
    if matches!(arg.as_deref(), Some("--help" | "-h")) {
        println!("usage: storage_tour [DATA_DIR]   (default: a fresh temporary directory)");
        return Ok(());
    }
    let temp = tempfile::tempdir()?;
    let dir = arg.map_or_else(|| temp.path().to_path_buf(), std::path::PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    let log = RedbLogStore::open(dir.join("raft-log.redb"))?;
    let state_machine = SqliteStateMachine::open(dir.join("state-machine"))?;
    let first = log.log_state().last_log_id.map_or(1, |log_id| log_id.index + 1);
    println!("data dir: {}", dir.display());

    let started = Instant::now();
    for start in (first..first + ENTRIES).step_by(BATCH as usize) {
        let entries: Vec<Entry> = (start..start + BATCH)
            .map(|index| {
                let key = format!("services/web-{:03}/replicas", index % 300).into_bytes();
                entry(index, WriteCommand::Put { key, value: index.to_string().into_bytes(), lease: None })
            })
            .collect();
        log.append_entries(&entries)?;
        state_machine.apply_entries(&entries)?;
        print!("\rappended and applied {:>6}/{ENTRIES} entries", start + BATCH - first);
    }
    let elapsed = started.elapsed();
    println!(
        "\n{ENTRIES} entries in {elapsed:.2?} ({:.0} entries/s, one fsync per {BATCH})",
        ENTRIES as f64 / elapsed.as_secs_f64()
    );

    let summary = log.verify()?;
    println!("hash chain verified: {} entries, last {:?}", summary.entries, summary.last.map(|log_id| log_id.index));

    let reader = state_machine.reader();
    let got = reader.get(b"services/web-042/replicas")?;
    if let Some(kv) = got.kv {
        println!(
            "get services/web-042/replicas = {} (version {}, mod_revision {})",
            String::from_utf8_lossy(&kv.value),
            kv.version,
            kv.mod_revision
        );
    }
    let mut count =
        ScanRequest { range: KeyRange::prefix(b"services/".to_vec()), ..ScanRequest::prefix(Vec::new(), 0) };
    count.count_only = true;
    println!("keys under services/: {}", reader.scan(&count)?.count);

    let sql = "SELECT CAST(key AS TEXT) AS key, version FROM kv ORDER BY version DESC, key LIMIT 3";
    let rows = reader.sql(&SqlRequest::new(sql))?;
    println!("sql> {sql}");
    for row in rows.rows {
        println!("     {row:?}");
    }
    match reader.sql(&SqlRequest::new("DELETE FROM kv")) {
        Err(error) => println!("sql> DELETE FROM kv  ->  refused: {error}"),
        Ok(_) => println!("sql> DELETE FROM kv  ->  unexpectedly allowed"),
    }

    let (meta, snapshot) = state_machine.build_snapshot_now()?;
    println!("snapshot at {:?}: {} bytes", meta.last_log_id.map(|log_id| log_id.index), snapshot.size());

    let victim = summary.last.map_or(1, |log_id| log_id.index) - 7;
    if let Some(mut row) = log.read_raw_row(victim)? {
        let last = row.len() - 1;
        row[last] ^= 0x01;
        log.overwrite_raw_row(victim, &row)?;
        match log.verify() {
            Err(error) => println!("tampered with entry {victim}: {error}"),
            Ok(_) => println!("tampering with entry {victim} went unnoticed"),
        }
    }
    Ok(())
}
