//! Crash safety: a child process appends to the redb log and applies to the SQLite state
//! machine as a node does (log first, apply later), and is killed with SIGKILL at a
//! random moment, again and again. After each kill the files must hold a valid chain
//! ending at or after the last append the child reported durable, and a state machine
//! equal to the model at its last_applied, at or after the last apply it reported.
//!
//! This binary is both sides: with `ASPEN_CRASH_CHILD_DIR` set it is the child.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use aspen_api::{Compare, CompareOp, CompareTarget, KeyRange, ScanRequest, TxnOp, TxnRequest, WriteCommand};
use aspen_raft_storage::{Entry, RedbLogStore, SqliteStateMachine};
use common::model::Model;
use common::normal;

const CHILD_DIR_ENV: &str = "ASPEN_CRASH_CHILD_DIR";
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
    let mut next = log.log_state().last_log_id.map_or(1, |log_id| log_id.index + 1);
    let mut unapplied: Vec<Entry> = Vec::new();
    let mut stdout = std::io::stdout().lock();
    loop {
        let batch = 1 + splitmix(next ^ 0xABCD) % 40;
        let entries: Vec<Entry> = (next..next + batch).map(|index| normal(term, index, command_for(index))).collect();
        log.append_entries(&entries).expect("child appends");
        next += batch;
        writeln!(stdout, "appended {}", next - 1).expect("report");
        stdout.flush().expect("flush");
        unapplied.extend(entries);
        // Apply lags the log, as in a node where commit follows replication.
        if unapplied.len() > 60 {
            state_machine.apply_entries(&unapplied).expect("child applies");
            writeln!(stdout, "applied {}", unapplied.last().map_or(0, |entry| entry.log_id.index)).expect("report");
            stdout.flush().expect("flush");
            unapplied.clear();
        }
    }
}

fn run_parent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("own path");
    let mut last_durable_append = 0u64;
    let mut last_reported_apply = 0u64;
    for round in 1..=ROUNDS {
        let kill_after = 200 + splitmix(round) % 800;
        let mut child = Command::new(&exe)
            .env(CHILD_DIR_ENV, dir.path())
            .env("ASPEN_CRASH_TERM", round.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
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
            let openraft::EntryPayload::Normal(command) = &entry.payload else { panic!("only normal entries") };
            assert_eq!(command, &command_for(entry.log_id.index), "entry {} content", entry.log_id.index);
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
