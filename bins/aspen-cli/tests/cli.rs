//! aspen-cli as a user runs it: exit codes, error output, and a real dev cluster of
//! aspen-node processes.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;

use common::{CLI, DevCluster};

/// A well-formed address nobody listens on.
const SILENT_PEER: &str = "d59a253c4238f35ced0003979c3a86157534787a6cfe5ebc2f99a38033847565@127.0.0.1:9";

/// Runs aspen-cli in `dir` with none of the user's ASPEN_* settings.
fn cli(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(CLI);
    command.current_dir(dir).args(args).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ASPEN_") {
            command.env_remove(name);
        }
    }
    command.output().expect("run aspen-cli")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_documents_the_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = cli(dir.path(), &["kv", "get", "--help"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(text(&output.stdout).contains("3  `kv get`: the key does not exist"), "{}", text(&output.stdout));
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [&["kv", "scan", "--limit", "0"][..], &["kv", "frobnicate"], &["sql"]] {
        assert_eq!(cli(dir.path(), args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn without_a_cluster_the_error_says_how_to_get_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = cli(dir.path(), &["kv", "get", "k"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("aspen-cli dev"), "{}", text(&output.stderr));

    let output = cli(dir.path(), &["--json", "kv", "get", "k"]);
    assert_eq!(output.status.code(), Some(1));
    let error: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json error on stdout");
    assert!(error["error"].as_str().is_some_and(|message| message.contains("--peers")), "{error}");
}

#[test]
fn txn_syntax_errors_point_at_the_problem_before_any_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output =
        cli(dir.path(), &["--peers", SILENT_PEER, "--token", "t", "kv", "txn", "if version(\"k\") = 0 then get \"k\""]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("line 1, column 17: `=` is not an operator"), "{stderr}");
    assert!(stderr.contains("\n                  ^"), "{stderr}");
}

#[test]
fn dev_cluster_is_ready_fast_serves_every_command_and_survives_a_restart() {
    let work = tempfile::tempdir().expect("tempdir");
    let data_dir = work.path().join("aspen-dev");
    let (cluster, elapsed) = DevCluster::start(&data_dir, 7401);
    assert!(elapsed < Duration::from_secs(10), "ready after {elapsed:?}");

    // From the directory holding ./aspen-dev no connection options are needed.
    let run = |args: &[&str]| cli(work.path(), args);
    assert_eq!(run(&["kv", "put", "greeting", "hello"]).status.code(), Some(0));
    let get = run(&["--json", "kv", "get", "greeting"]);
    let body: serde_json::Value = serde_json::from_slice(&get.stdout).expect("json");
    assert_eq!(body["kv"]["value"], "hello");
    assert_eq!(run(&["kv", "get", "missing"]).status.code(), Some(3));

    let txn = run(&[
        "--json",
        "kv",
        "txn",
        "if value(\"greeting\") == \"hello\" then put \"greeting\" \"hi\" else get \"x\"",
    ]);
    let body: serde_json::Value = serde_json::from_slice(&txn.stdout).expect("json");
    assert_eq!(body["succeeded"], true, "{body}");

    let sql = run(&["--json", "sql", "SELECT value FROM kv WHERE key = CAST('greeting' AS BLOB)"]);
    let body: serde_json::Value = serde_json::from_slice(&sql.stdout).expect("json");
    assert_eq!(body["rows"][0][0], "hi", "{body}");

    let status = run(&["cluster", "status"]);
    assert_eq!(status.status.code(), Some(0));
    assert_eq!(text(&status.stdout).matches("leader").count(), 1, "{}", text(&status.stdout));
    drop(cluster);

    let (cluster, _) = DevCluster::start(&data_dir, 7401);
    let get = cli(work.path(), &["--json", "kv", "get", "greeting"]);
    let body: serde_json::Value = serde_json::from_slice(&get.stdout).expect("json");
    assert_eq!(body["kv"]["value"], "hi");
    drop(cluster);
}
