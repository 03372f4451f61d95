//! Crash safety: a child process appends to the redb log and applies to the SQLite state
//! machine as a node does (log first, apply later), and is killed with SIGKILL at a
//! random moment, again and again. After each kill the files must hold a valid chain
//! ending at or after the last append the child reported durable, and a state machine
//! equal to the model at its last_applied, at or after the last apply it reported.
//!
//! Odd rounds append with `append_entries` (one fsync per append). Even rounds append the
//! way openraft does, through `RaftLogStorage::append`: appends return before they are
//! durable, a group flusher fsyncs many at once, and an append counts as durable only when
//! its callback fires; the child keeps appending while earlier appends wait for their fsync.
//!
//! This binary is both sides: with `ASPEN_CRASH_CHILD_DIR` set it is the child.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use aspen_api::{Compare, CompareOp, CompareTarget, KeyRange, ScanRequest, TxnOp, TxnRequest, WriteCommand};
use aspen_raft_storage::{Entry, RedbLogStore, SqliteStateMachine, TypeConfig};
use common::model::Model;
use common::normal;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::OneshotReceiverOf;
use tokio::sync::mpsc;

const CHILD_DIR_ENV: &str = "ASPEN_CRASH_CHILD_DIR";
/// Set (to anything) in the child when it appends through the group-commit path.
const GROUP_ENV: &str = "ASPEN_CRASH_GROUP_COMMIT";
/// Appends the group-commit child lets wait for their fsync at once.
const GROUP_IN_FLIGHT: usize = 16;
const ROUNDS: u64 = 6;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The command at log index `index`: a pure function, so the parent can rebuild the model.
fn command_for(index: u64) -> WriteCommand {
    let random = splitmix(index);
    let key = format!("key-{:02}", random % 32).into_bytes();
    let value = format!("value-{index}").into_bytes();
    match (random >> 8) % 10 {
        0 => WriteCommand::Delete { key },
        1 => WriteCommand::DeleteRange { range: KeyRange::prefix(format!("key-{}", random % 4).into_bytes()) },
        2 | 3 => WriteCommand::Txn(TxnRequest {
            compare: vec![Compare { key: key.clone(), op: CompareOp::Less, target: CompareTarget::Version(3) }],
            success: vec![TxnOp::Put { key: key.clone(), value, lease: None }],
            failure: vec![TxnOp::Delete { key }],
        }),
        _ => WriteCommand::Put { key, value, lease: None },
    }
}

/// The child: resume from the files, re-apply what the log holds beyond last_applied,
/// then append and apply forever, reporting each durable step on stdout.
fn child(dir: &Path) -> ! {
    let log = RedbLogStore::open(dir.join("log.redb")).expect("child opens log");
    let state_machine = SqliteStateMachine::open(dir.join("sm")).expect("child opens state machine");
    let term = std::env::var("ASPEN_CRASH_TERM").ok().and_then(|term| term.parse().ok()).unwrap_or(1);
    let applied = state_machine.applied_state_now().last_applied.map_or(0, |log_id| log_id.index);
    let pending = log.read_entries(applied + 1..).expect("child reads unapplied entries");
    if !pending.is_empty() {
        state_machine.apply_entries(&pending).expect("child re-applies");
    }
    let next = log.log_state().last_log_id.map_or(1, |log_id| log_id.index + 1);
    if std::env::var_os(GROUP_ENV).is_some() {
        group_commit_child(log, state_machine, term, next)
    }
    let mut next = next;
    let mut reporter = Reporter::default();
    loop {
        let entries = next_batch(term, &mut next);
        log.append_entries(&entries).expect("child appends");
        reporter.durable(&state_machine, entries);
    }
}

/// The entries of the next append, from `next` on.
fn next_batch(term: u64, next: &mut u64) -> Vec<Entry> {
    let batch = 1 + splitmix(*next ^ 0xABCD) % 40;
    let entries = (*next..*next + batch).map(|index| normal(term, index, command_for(index))).collect();
    *next += batch;
    entries
}

/// Reports durable appends and applies them, lagging, as a node applies committed entries.
#[derive(Default)]
struct Reporter {
    unapplied: Vec<Entry>,
}

impl Reporter {
    fn durable(&mut self, state_machine: &SqliteStateMachine, entries: Vec<Entry>) {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "appended {}", entries.last().map_or(0, |entry| entry.log_id.index)).expect("report");
        stdout.flush().expect("flush");
        self.unapplied.extend(entries);
        // Apply lags the log, as in a node where commit follows replication.
        if self.unapplied.len() > 60 {
            state_machine.apply_entries(&self.unapplied).expect("child applies");
            writeln!(stdout, "applied {}", self.unapplied.last().map_or(0, |entry| entry.log_id.index))
                .expect("report");
            stdout.flush().expect("flush");
            self.unapplied.clear();
        }
    }
}

/// Appends through `RaftLogStorage::append` without waiting for durability, up to
/// `GROUP_IN_FLIGHT` appends ahead; reports (and applies) each append once its callback says
/// it is durable, in order.
fn group_commit_child(mut log: RedbLogStore, state_machine: SqliteStateMachine, term: u64, mut next: u64) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("child runtime");
    runtime.block_on(async move {
        let (flushed, mut waiting) =
            mpsc::channel::<(Vec<Entry>, OneshotReceiverOf<TypeConfig, std::io::Result<()>>)>(GROUP_IN_FLIGHT);
        let reporter = tokio::spawn(async move {
            let mut reporter = Reporter::default();
            while let Some((entries, done)) = waiting.recv().await {
                done.await.expect("flush callback fired").expect("flush succeeded");
                reporter.durable(&state_machine, entries);
            }
        });
        loop {
            let entries = next_batch(term, &mut next);
            let (callback, done) = TypeConfig::oneshot();
            log.append(entries.clone(), IOFlushed::signal(callback)).await.expect("child appends");
            if flushed.send((entries, done)).await.is_err() {
                break;
            }
        }
        reporter.await.expect("reporter");
    });
    panic!("the group-commit child stopped appending")
}

fn run_parent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("own path");
    let mut last_durable_append = 0u64;
    let mut last_reported_apply = 0u64;
    for round in 1..=ROUNDS {
        let kill_after = 200 + splitmix(round) % 800;
        let mut command = Command::new(&exe);
        command.env(CHILD_DIR_ENV, dir.path()).env("ASPEN_CRASH_TERM", round.to_string()).stdout(Stdio::piped());
        if round % 2 == 0 {
            command.env(GROUP_ENV, "1");
        }
        let mut child = command.spawn().expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read child line");
            let (what, index) = line.split_once(' ').expect("report format");
            let index: u64 = index.parse().expect("report index");
            match what {
                "appended" => last_durable_append = index,
                "applied" => last_reported_apply = index,
                other => panic!("unexpected report {other}"),
            }
            if last_durable_append >= kill_after * round {
                break;
            }
        }
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");

        let log = RedbLogStore::open(dir.path().join("log.redb")).expect("log reopens after SIGKILL");
        let summary = log.verify().expect("chain is valid after SIGKILL");
        let last = summary.last.expect("log has entries").index;
        assert!(last >= last_durable_append, "round {round}: log ends at {last}, child reported {last_durable_append}");
        let entries = log.read_entries(..).expect("read log");
        assert_eq!(entries.len() as u64, last, "no gaps from index 1");
        for entry in &entries {
            let openraft::EntryPayload::Normal(proposal) = &entry.payload else { panic!("only normal entries") };
            assert_eq!(proposal, &command_for(entry.log_id.index).into(), "entry {} content", entry.log_id.index);
        }

        let state_machine = SqliteStateMachine::open(dir.path().join("sm")).expect("state machine reopens");
        let applied = state_machine.applied_state_now().last_applied.map_or(0, |log_id| log_id.index);
        assert!(applied >= last_reported_apply, "round {round}: applied {applied} < reported {last_reported_apply}");
        assert!(applied <= last, "state machine cannot be ahead of the durable log");
        let mut model = Model::default();
        for index in 1..=applied {
            let _ = model.apply(index, &command_for(index));
        }
        let contents = state_machine.reader().scan(&ScanRequest::prefix(Vec::new(), 0)).expect("scan");
        assert_eq!(contents.kvs, model.kvs.values().cloned().collect::<Vec<_>>(), "round {round}: state at {applied}");
        println!("round {round}: killed at log {last} (reported {last_durable_append}), applied {applied}: ok");
    }
}

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        child(Path::new(&dir));
    }
    println!("running 1 test");
    run_parent();
    println!("test sigkill_mid_stream_leaves_valid_chain_and_state_equal_to_model ... ok");
}
