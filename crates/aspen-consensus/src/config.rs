//! Consensus tuning, with the defaults and why.

use std::time::Duration;

use aspen_api::NodeId;

/// Tuning of one Raft node. Defaults suit loopback and LAN clusters on small machines.
#[derive(Clone, Debug)]
pub struct ConsensusConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// A name that tells clusters apart in logs.
    pub cluster_name: String,
    /// Leader heartbeat period. 100 ms: on a LAN a round trip is well under 1 ms, so this
    /// is about liveness under load (a busy 2-core machine can stall tasks for tens of ms).
    pub heartbeat_interval_ms: u64,
    /// Election timeout range, randomized per term so candidates rarely collide. At 3-6x
    /// the heartbeat, a follower tolerates several lost or late heartbeats before campaigning.
    ///
    /// It sets how long a cluster is without a leader after its leader crashes. openraft's
    /// leader lease is the upper end, and a follower campaigns (with a pre-vote) only once
    /// it has heard nothing from the leader for the lease plus its timeout; by then the
    /// other followers' leases have run out too, so that pre-vote wins. A new leader comes
    /// after the lease plus the smaller of two timeouts: 0.9-1.2 s here, measured 1.0-1.3 s
    /// from a leader's SIGKILL to a client's next acknowledged write (at 500-1000 ms it was
    /// 1.5-2.0 s and measured 1.8-2.0 s; etcd's default 1 s base elects in 1-2 s). Lower
    /// still and a leader stalled for the lease (a loaded 2-core machine stalls tasks for
    /// tens, rarely a couple hundred milliseconds) is deposed, and a leader whose quorum
    /// acknowledgements are older than the lease refuses writes.
    pub election_timeout_min_ms: u64,
    /// Upper end of the election timeout range; also openraft's leader lease.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers catch up
    /// from the log instead of a whole snapshot.
    pub log_entries_kept_after_snapshot: u64,
    /// Most entries in one AppendEntries.
    pub max_entries_per_append: u64,
    /// How long a write may wait for commit before it reports an unknown outcome.
    pub write_timeout: Duration,
    /// How long a linearizable read may wait for its read point.
    pub read_timeout: Duration,
    /// Most client writes queued for batching; a full queue pushes back on callers.
    pub max_pending_writes: usize,
    /// Most batches proposed to Raft at once (pipelining depth). 2: while one batch
    /// commits, the next fills up. On a CPU-bound machine, a deeper pipeline only splits
    /// the same writes into more, smaller entries (more appends, RPCs and apply
    /// transactions per write); one batch at a time leaves the disk and network idle
    /// between rounds. Same-run A/B, put ops/s: 8 -> 2 took x16 from 5247/5054 to
    /// 5446-5528 and x64 p99.9 from 61-68 ms to 23-25 ms; 1 was below 2 on every row.
    pub max_batches_in_flight: usize,
}

impl ConsensusConfig {
    /// Defaults for `node_id`.
    pub fn new(node_id: NodeId) -> Self {
        ConsensusConfig {
            node_id,
            cluster_name: "aspen".into(),
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_after_entries: 10_000,
            log_entries_kept_after_snapshot: 1_000,
            max_entries_per_append: 300,
            write_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(5),
            max_pending_writes: 4096,
            max_batches_in_flight: 2,
        }
    }

    /// The openraft configuration these settings stand for.
    pub fn raft_config(&self) -> Result<openraft::Config, openraft::ConfigError> {
        openraft::Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            max_payload_entries: self.max_entries_per_append,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.log_entries_kept_after_snapshot,
            install_snapshot_timeout: 10_000,
            // A restarted leader runs an election like any other node instead of taking
            // its old term back. Restored leadership trusts the committed log id found in
            // storage, which here lags (it rides along with log checkpoints) and may lag
            // far after an OS crash rebuilt the state machine (ADR 0003): the restored
            // leader's read index is then that stale id and linearizable reads return old
            // values until the next write commits. The simulator found it (seed 74, all
            // faults, 16-record journal files). A new term commits a blank entry first,
            // which carries the commit index past everything stored.
            enable_leader_restore: Some(false),
            // Pre-Vote: on election timeout a node first asks whether a majority would vote
            // for it at term + 1, and only then bumps its term. A node cut off from the others
            // (or just restarted, or lagging) gets no such majority and keeps its term, so
            // when it comes back it cannot depose a healthy leader with a higher term; without
            // it, a follower isolated for 4 s climbed from term 1 to 63 and every return
            // forced a new election. Peers refuse a pre-vote while they hear from a leader, or
            // while the candidate's log is behind theirs; a transport failure is no grant.
            enable_pre_vote: Some(true),
            // CheckQuorum, openraft's way: a leader whose quorum acknowledgements are older
            // than its lease (the longest election timeout) already refuses new writes; with
            // this it also stops heartbeating for a while, then probes, then goes quiet
            // again, each phase this long. Followers that still hear it (a minority, or it
            // would have a quorum) then stop renewing its lease and may vote with the others,
            // so the connected majority can elect even when it needs their votes. openraft
            // requires at least lease + longest election timeout, which is what this is: long
            // enough for every lease it granted to lapse and for one election to run.
            quorum_loss_probe_interval: Some(2 * self.election_timeout_max_ms),
            // A leader that removed itself from the membership leads until that change
            // commits (it replicates it), then after one heartbeat period (which carries the
            // commit to the remaining voters) hands leadership to the most up-to-date voter
            // and becomes a learner outside the membership. openraft's default, 150 ms, is
            // tuned to its own 50 ms heartbeat.
            removed_leader_step_down: openraft::StepDownPolicy::After(self.heartbeat_interval_ms),
            ..Default::default()
        }
        .validate()
    }
}
