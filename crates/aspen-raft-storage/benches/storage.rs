//! Storage hot paths: log append with fsync at several batch sizes (against raw redb
//! insert+commit of the same bytes as the baseline, measured in the same run), state
//! machine apply throughput, and point reads from the pool with 1 and 4 threads.
//!
//! Run with `cargo bench -p aspen-raft-storage`. Files live under the target dir (a real
//! disk), never tmpfs, so fsync costs what it costs in production.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aspen_api::WriteCommand;
use aspen_api::session::{ClientWrite, Proposal, SessionId, WriteId};
use aspen_raft_storage::log::chain;
use aspen_raft_storage::{Entry, RedbLogStore, SqliteStateMachine};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use openraft::EntryPayload;

const VALUE_SIZE: usize = 256;
const BATCH_SIZES: [u64; 4] = [1, 10, 100, 1000];
const READ_KEYS: u64 = 10_000;

fn bench_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench dir on the target disk")
}

fn put_entry(index: u64) -> Entry {
    let key = format!("bench/key/{:08}", index % READ_KEYS).into_bytes();
    let command = WriteCommand::Put { key, value: vec![b'x'; VALUE_SIZE], lease: None };
    Entry { log_id: openraft::LogId::new(1u64.into(), index), payload: EntryPayload::Normal(command.into()) }
}

fn log_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_append_fsync");
    group.measurement_time(Duration::from_secs(4));
    for batch in BATCH_SIZES {
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(BenchmarkId::new("aspen_redb_log", batch), &batch, |b, &batch| {
            let dir = bench_dir();
            let log = RedbLogStore::open(dir.path().join("log.redb")).expect("open");
            let mut next = 1;
            b.iter(|| {
                let entries: Vec<Entry> = (next..next + batch).map(put_entry).collect();
                log.append_entries(&entries).expect("append");
                next += batch;
            });
        });
        // Baseline: the same encoded bytes, inserted into a plain redb table and committed
        // with the same durability, without hashing or our bookkeeping.
        group.bench_with_input(BenchmarkId::new("raw_redb_baseline", batch), &batch, |b, &batch| {
            let dir = bench_dir();
            let db = redb::Database::create(dir.path().join("raw.redb")).expect("create");
            let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("raw");
            let mut next = 1;
            b.iter(|| {
                let rows: Vec<(u64, Vec<u8>)> = (next..next + batch)
                    .map(|index| {
                        let bytes = postcard::to_stdvec(&put_entry(index)).expect("encode");
                        (index, chain::encode_row(&chain::GENESIS, 1, &bytes))
                    })
                    .collect();
                let txn = db.begin_write().expect("begin");
                {
                    let mut raw = txn.open_table(table).expect("table");
                    for (index, row) in &rows {
                        raw.insert(*index, row.as_slice()).expect("insert");
                    }
                }
                txn.commit().expect("commit");
                next += batch;
            });
        });
    }
    group.finish();
}

fn state_machine_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_machine_apply");
    group.measurement_time(Duration::from_secs(4));
    for batch in [1u64, 100] {
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(BenchmarkId::new("sqlite_put", batch), &batch, |b, &batch| {
            let dir = bench_dir();
            let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
            let mut next = 1;
            b.iter(|| {
                let entries: Vec<Entry> = (next..next + batch).map(put_entry).collect();
                black_box(state_machine.apply_entries(&entries).expect("apply"));
                next += batch;
            });
        });
    }
    group.finish();
}

/// Writers in one entry of the session benchmark: one entry as the leader's batcher builds
/// it under 64 closed-loop clients.
const SESSION_WRITERS: u64 = 64;

/// One entry of `SESSION_WRITERS` puts, one per client; with `ids`, each carries its
/// client's write identity (exactly-once writes), as every aspen-client write does.
fn session_entry(index: u64, ids: bool) -> Entry {
    let writes = (0..SESSION_WRITERS)
        .map(|client| {
            let key = format!("bench/key/{:08}", (index * SESSION_WRITERS + client) % READ_KEYS).into_bytes();
            let command = WriteCommand::Put { key, value: vec![b'x'; VALUE_SIZE], lease: None };
            let id = ids.then(|| WriteId {
                session: SessionId(u128::from(client + 1) << 64 | 0x5e55),
                seq: index,
                first_outstanding: index,
            });
            ClientWrite { id, command }
        })
        .collect();
    let proposal = Proposal { time_ms: 1_800_000_000_000 + index, writes };
    Entry { log_id: openraft::LogId::new(1u64.into(), index), payload: EntryPayload::Normal(proposal) }
}

/// What exactly-once writes cost the state machine: the same entries of 64 puts from 64
/// clients, with and without write identities (the baseline), in the same run.
fn session_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_machine_apply_64_clients");
    group.measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(SESSION_WRITERS));
    for (name, ids) in [("without_identities", false), ("with_identities", true)] {
        group.bench_function(name, |b| {
            let dir = bench_dir();
            let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
            let mut next = 1;
            b.iter(|| {
                black_box(state_machine.apply_entries(&[session_entry(next, ids)]).expect("apply"));
                next += 1;
            });
        });
    }
    group.finish();
}

fn point_reads(c: &mut Criterion) {
    let dir = bench_dir();
    let state_machine = SqliteStateMachine::open(dir.path()).expect("open");
    let entries: Vec<Entry> = (1..=READ_KEYS).map(put_entry).collect();
    for chunk in entries.chunks(1000) {
        state_machine.apply_entries(chunk).expect("load");
    }
    let reader = Arc::new(state_machine.reader());
    let mut group = c.benchmark_group("point_read_pool");
    group.measurement_time(Duration::from_secs(4));
    for threads in [1u64, 4] {
        group.throughput(Throughput::Elements(threads));
        group.bench_with_input(BenchmarkId::new("get", threads), &threads, |b, &threads| {
            b.iter_custom(|iterations| {
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for thread in 0..threads {
                        let reader = Arc::clone(&reader);
                        scope.spawn(move || {
                            for i in 0..iterations {
                                let key = format!("bench/key/{:08}", (i * 7919 + thread * 104_729) % READ_KEYS);
                                black_box(reader.get(key.as_bytes()).expect("get"));
                            }
                        });
                    }
                });
                start.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, log_append, state_machine_apply, session_apply, point_reads);
criterion_main!(benches);
