//! Helpers shared by the aspen-cli integration tests.

use std::path::PathBuf;
use std::process::Command;

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
