//! The Raft log in redb, protected by a blake3 hash chain.
//!
//! One table holds entries keyed by index; each row is `hash || term || entry_bytes`
//! (see [`chain`]). A second table holds the vote, the committed log id and the purge
//! point with its anchor hash. The chain is verified in full when the store opens and
//! for every range read; a mismatch is [`LogStoreError::ChainMismatch`] naming the index.
//! Appends are made durable through a sequential [`journal`] (two files used in turn) beside
//! the redb file and checkpointed into redb's durable state off the write lock, one journal
//! file at a time. The newest entries are also kept
//! in memory ([`tail`]) for the reads that follow an append (replication, apply).
//! [`RedbLogStore::hash_at`] gives an entry's chain hash, which consensus compares with the
//! leader's to find a log that diverged from the cluster's.

pub mod chain;
pub mod journal;
#[cfg(madsim)]
pub mod sim_crash;
mod store;
pub mod tail;

pub use store::{ChainHashes, LeaderSwitch, LogStoreWatch, LogSummary, RedbLogStore};
