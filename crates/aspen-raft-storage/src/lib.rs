//! Aspen's durable storage: the Raft log in redb, protected by a blake3 hash chain, and
//! the state machine in SQLite with snapshots and read-only SQL. Both implement
//! openraft's v2 storage traits and pass its storage test suite.
//!
//! Architecture invariant: this crate does storage only. It never depends on iroh or any
//! network code, so the simulator can run it unchanged; consensus wires it to openraft.

pub mod close;
pub mod error;
pub mod log;
pub mod rt;
pub mod state_machine;
pub mod timings;
pub mod type_config;

pub use error::{LogStoreError, SnapshotError, SqlError, StateMachineError};
pub use log::RedbLogStore;
pub use state_machine::snapshot::{SnapshotFile, SnapshotReceiver};
pub use state_machine::{SqliteStateMachine, StateMachineReader};
pub use timings::DiskTimings;
pub use type_config::{Entry, EntryResponse, LogId, SnapshotMeta, StoredMembership, TypeConfig, Vote};
