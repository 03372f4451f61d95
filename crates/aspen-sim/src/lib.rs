//! Aspen's deterministic simulator.
//!
//! Built with `--cfg madsim` (`cargo xtask sim`), it runs the real `RaftNode`, the real
//! redb log and the real SQLite state machine of several nodes inside one madsim runtime:
//! simulated time, a seeded scheduler and seeded randomness, so a seed replays one execution
//! exactly. Nodes talk through an in-memory network (madsim datagrams) behind the same
//! [`RaftRpcClient`](aspen_consensus::RaftRpcClient) trait production fills with iroh, with
//! drops, delays, duplicates, reordering and partitions; a nemesis crashes, pauses, skews
//! and reconfigures nodes. Clients record every operation; invariants are checked while it
//! runs, and the history is checked for linearizability at the end.
//!
//! Storage runs on real files in a per-seed directory: file I/O is synchronous and takes no
//! simulated time, so it does not disturb determinism, and it is the code production runs.
//!
//! Architecture invariant: depends on consensus, storage and the checker, never on iroh.

pub mod config;
pub mod history;

#[cfg(madsim)]
pub mod cluster;
#[cfg(madsim)]
pub mod invariants;
#[cfg(madsim)]
pub mod net;
#[cfg(madsim)]
pub mod run;
#[cfg(madsim)]
pub mod workload;
