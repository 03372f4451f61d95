//! Helpers shared by the aspen-cli integration tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The aspen-cli binary under test.
pub const CLI: &str = env!("CARGO_BIN_EXE_aspen-cli");

/// The aspen-node binary beside aspen-cli. `cargo test --workspace` builds it; when this
/// package is tested alone it is built here.
pub fn node_binary() -> PathBuf {
    let node_bin = PathBuf::from(CLI).with_file_name("aspen-node");
    if !node_bin.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--package", "aspen-node", "--bin", "aspen-node"])
            .status()
            .expect("run cargo build for aspen-node");
        assert!(status.success(), "building aspen-node failed");
    }
    assert!(node_bin.is_file(), "aspen-node is not at {}", node_bin.display());
    node_bin
}

/// A running `aspen-cli dev`, stopped (SIGTERM) on drop.
pub struct DevCluster {
    child: Child,
}

impl DevCluster {
    /// Starts `aspen-cli dev` (none of the user's ASPEN_* settings) and waits for its
    /// ready line.
    pub fn start(data_dir: &Path, base_port: u16) -> (DevCluster, Duration) {
        let node_bin = node_binary();
        let started = Instant::now();
        let mut command = Command::new(CLI);
        command
            .args(["dev", "--nodes", "3", "--base-port", &base_port.to_string(), "--data-dir"])
            .arg(data_dir)
            .arg("--node-bin")
            .arg(&node_bin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ASPEN_") {
                command.env_remove(name);
            }
        }
        let mut child = command.spawn().expect("start aspen-cli dev");
        let stdout = child.stdout.take().expect("stdout");
        let first_line = BufReader::new(stdout).lines().next().expect("a ready line").expect("read");
        assert!(first_line.starts_with("Aspen dev cluster ready"), "{first_line}");
        (DevCluster { child }, started.elapsed())
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}
