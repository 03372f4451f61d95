//! One seed, start to finish: build the cluster, run clients and the nemesis, heal,
//! converge, check invariants, check the history.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aspen_api::{ClusterController, KeyValueStore, NodeId, WriteCommand};
use aspen_checker::{Operation, Verdict};
use aspen_consensus::ConsensusConfig;
use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle, Runtime};

use crate::cluster::{self, LiveNode, NodeSpec, Registry, member, now_ms};
use crate::config::{Fault, SimConfig};
use crate::history::{History, Trace};
use crate::invariants::Monitor;
use crate::net::{NetFaults, client_ip};
use crate::workload::SimClient;

/// Voters the cluster starts with.
pub const VOTERS: u64 = 3;
/// Voters in the seeds that run a larger cluster: every fourth seed (those with
/// `seed % 4 == 3`), so quorums of 3 of 5 and two-node minorities are exercised too.
pub const VOTERS_LARGE: u64 = 5;

/// Longest a write through the majority's leader may take while only a minority is cut off
/// before the simulator calls it a stall. Over seeds 1-200 with every fault such writes take
/// p50 90 ms, p99 800 ms, max 1.4 s (a voter of the majority still catching up from a
/// leader change); `aspen-sim` prints these numbers after every run. The 4 s stalls seen
/// before came from the simulated network itself: a lost datagram cost a whole 2 s RPC
/// deadline (QUIC retransmits it after a round trip or two), and round trips of up to 120 ms
/// outlasted openraft's heartbeat timeout (the heartbeat interval, 100 ms).
pub const MINORITY_WRITE_BOUND: Duration = Duration::from_secs(3);

/// Longest the majority may go without a leader that commits a write after the old leader
/// was cut off into a minority: the voters wait out its lease (the maximum election
/// timeout, 600 ms), then an election timeout, a pre-vote and a vote; the rest is slack for
/// the network faults that run at the same time.
pub const LEADER_CUT_OFF_BOUND: Duration = Duration::from_secs(4);

/// How many voters the run of `seed` starts with.
pub fn voters_for_seed(seed: u64) -> u64 {
    if seed % 4 == 3 { VOTERS_LARGE } else { VOTERS }
}
/// How often the monitor looks at every node (simulated).
pub const MONITOR_INTERVAL: Duration = Duration::from_millis(25);
/// Longest the healed cluster may take to serve a write and converge (simulated).
pub const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);
/// Simulated time allowed beyond the workload before the run counts as hung.
pub const TIME_LIMIT_SLACK: Duration = Duration::from_secs(900);

/// Why a seed failed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// An invariant was violated during the run or after convergence.
    Invariant,
    /// The client history is not linearizable.
    NotLinearizable,
    /// The healed cluster did not serve a write or did not converge.
    NoProgress,
    /// Something panicked (a node, the simulator, or the run exceeded its time limit).
    Panic,
}

/// The result of one seed.
pub struct SeedReport {
    /// What ran.
    pub config: SimConfig,
    /// `None` if the seed passed.
    pub failure: Option<(FailureKind, String)>,
    /// The checker's verdict, if it ran.
    pub verdict: Option<Verdict>,
    /// Simulated time the run covered.
    pub sim_elapsed: Duration,
    /// Wall-clock time it took.
    pub wall: Duration,
    /// The trace of the run.
    pub trace: Trace,
    /// The recorded operations.
    pub history: Vec<Operation>,
}

/// What the simulated part hands back.
struct SimOutcome {
    sim_elapsed: Duration,
    progress_error: Option<String>,
}

fn madsim_config(config: &SimConfig) -> madsim::Config {
    let mut sim = madsim::Config::default();
    if config.faults.contains(&Fault::Drop) {
        sim.net.packet_loss_rate = 0.02;
    }
    // Reordering spreads one-way latency up to 40 ms: round trips stay under the
    // heartbeat interval (100 ms), which is also openraft's heartbeat timeout. Longer round
    // trips need a longer `heartbeat_interval_ms` (docs/operations.md); with the default, a
    // leader's quorum lease lapses between heartbeats and a rejoining node's pre-vote wins.
    sim.net.send_latency = if config.faults.contains(&Fault::Reorder) {
        Duration::from_micros(200)..Duration::from_millis(40)
    } else {
        Duration::from_micros(500)..Duration::from_millis(2)
    };
    sim
}

/// Runs one seed with its node files under `data_root`. Never panics: a panic inside the
/// simulation is the seed's failure.
pub fn run_seed(config: &SimConfig, data_root: &Path) -> SeedReport {
    let trace = Trace::default();
    let history = History::default();
    let dir = data_root.join(format!("seed-{}", config.seed));
    let _ = std::fs::remove_dir_all(&dir);
    let wall_start = Instant::now();
    let outcome = {
        let (trace, history, config, dir) = (trace.clone(), history.clone(), config.clone(), dir.clone());
        std::panic::catch_unwind(AssertUnwindSafe(move || {
            let mut runtime = Runtime::with_seed_and_config(config.seed, madsim_config(&config));
            runtime.set_time_limit(Duration::from_secs(config.sim_secs) + TIME_LIMIT_SLACK);
            runtime.block_on(simulate(config, dir, trace, history))
        }))
    };
    let wall = wall_start.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    let history = history.operations();
    let mut report = SeedReport {
        config: config.clone(),
        failure: None,
        verdict: None,
        sim_elapsed: Duration::ZERO,
        wall,
        trace,
        history,
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_else(|| "panic".into());
            report.failure = Some((FailureKind::Panic, message));
            return report;
        }
    };
    report.sim_elapsed = outcome.sim_elapsed;
    let violations = report.trace.violations();
    if !violations.is_empty() {
        report.failure = Some((FailureKind::Invariant, violations.join("\n")));
        return report;
    }
    let verdict = aspen_checker::check(&report.history);
    match &verdict {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable { key, explanation } => {
            let key = String::from_utf8_lossy(key);
            report.failure = Some((FailureKind::NotLinearizable, format!("key {key:?}: {explanation}")));
        }
        Verdict::Unknown { .. } => {
            // The checker gave up within its bounds: not a failure, but said in the report.
        }
    }
    report.verdict = Some(verdict);
    if report.failure.is_none()
        && let Some(error) = outcome.progress_error
    {
        report.failure = Some((FailureKind::NoProgress, error));
    }
    report
}

fn consensus_config(id: NodeId, faults: &BTreeSet<Fault>) -> ConsensusConfig {
    let mut config = ConsensusConfig::new(id);
    config.cluster_name = "sim".into();
    if faults.contains(&Fault::Snapshot) {
        config.snapshot_after_entries = 40;
        config.log_entries_kept_after_snapshot = 5;
    }
    config
}

fn random_range(low: u64, high: u64) -> u64 {
    low + madsim::rand::random::<u64>() % (high - low).max(1)
}

fn pick<T: Copy>(items: &[T]) -> Option<T> {
    if items.is_empty() { None } else { Some(items[madsim::rand::random::<usize>() % items.len()]) }
}

/// The hosts of the run and what the nemesis did to them.
struct Cluster {
    handle: Handle,
    hosts: BTreeMap<NodeId, NodeHandle>,
    registry: Registry,
    trace: Trace,
    faults: Arc<NetFaults>,
    root: PathBuf,
    os_crashes: bool,
}

impl Cluster {
    fn leader(&self) -> Option<NodeId> {
        self.registry.live().into_iter().find_map(|(id, node)| {
            let metrics = node.raft.metrics();
            (metrics.state == openraft::ServerState::Leader).then_some(id)
        })
    }

    /// A handle to node `id`'s host that spawns into its current boot (a handle kept from
    /// before a restart spawns into the killed one, whose tasks never run).
    fn host_now(&self, id: NodeId) -> Option<NodeHandle> {
        self.handle.get_node(self.hosts.get(&id)?.id())
    }

    fn members(&self) -> BTreeSet<NodeId> {
        let Some(leader) = self.leader().and_then(|id| self.registry.get(id)) else { return BTreeSet::new() };
        let metrics = leader.raft.metrics();
        metrics.membership_config.membership().nodes().map(|(id, _)| *id).collect()
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        let Some(leader) = self.leader().and_then(|id| self.registry.get(id)) else { return BTreeSet::new() };
        let metrics = leader.raft.metrics();
        metrics.membership_config.membership().voter_ids().collect()
    }

    async fn crash(&self, id: NodeId) {
        let Some(host) = self.hosts.get(&id) else { return };
        self.registry.remove(id);
        self.handle.kill(host.id());
        self.trace.event(now_ms(), format!("nemesis: crash node {id}"));
        let down = random_range(200, 3000);
        madsim::time::sleep(Duration::from_millis(down)).await;
        if self.os_crashes && madsim::rand::random::<bool>() {
            self.registry.wait_closed(id, 100).await;
            self.os_crash(id);
        }
        self.handle.restart(host.id());
        self.trace.event(now_ms(), format!("nemesis: restart node {id} after {down} ms"));
    }

    /// Stages an OS crash of a stopped node on its files: the state machine's marker names
    /// the boot that was running (no clean close happened), SQLite's unsynced writes are
    /// damaged (the WAL loses a tail, the database file a tail of pages), and the node comes
    /// back under a new boot, which must rebuild its state machine from snapshot and log.
    fn os_crash(&self, id: NodeId) {
        let dir = cluster::node_dir(&self.root, id);
        let running = cluster::boot_of(&dir);
        let sm = dir.join("sm");
        let marked = aspen_raft_storage::state_machine::boot::record_running(&sm, &running);
        let mut damage = Vec::new();
        for file in ["state.db-wal", "state.db"] {
            let path = sm.join(file);
            if let Ok(metadata) = std::fs::metadata(&path)
                && metadata.len() > 0
            {
                let keep = madsim::rand::random::<u64>() % (metadata.len() + 1);
                let cut = std::fs::OpenOptions::new().write(true).open(&path).and_then(|file| file.set_len(keep));
                damage.push(format!("{file}: {keep} of {} bytes kept ({cut:?})", metadata.len()));
            }
        }
        // The log journal loses what it wrote since its last sync: a random number of its
        // newest unsynced writes, and the one before them is torn at a random byte.
        for path in aspen_raft_storage::log::journal::journal_paths(&dir.join("raft.redb")) {
            let lost = madsim::rand::random::<usize>() % 4;
            let torn_keep = madsim::rand::random::<usize>() % 4096;
            damage.push(aspen_raft_storage::log::sim_crash::lose_unsynced(&path, lost, torn_keep));
        }
        let rebooted = cluster::next_boot(&dir);
        self.trace.event(
            now_ms(),
            format!(
                "nemesis: node {id} crashes with its OS ({marked:?}, {}; next boot: {rebooted:?})",
                damage.join(", ")
            ),
        );
    }

    async fn membership_swap(&self) {
        let Some(leader) = self.leader() else { return };
        // A third of the swaps take the leader out through `remove`, the path an operator
        // uses (`aspen-cli cluster remove`): it must hand over, never panic a node.
        if madsim::rand::random::<u64>().is_multiple_of(3) {
            return self.remove_leader(leader).await;
        }
        let voters = self.voters();
        let spare: Vec<NodeId> = self.hosts.keys().copied().filter(|id| !voters.contains(id)).collect();
        let (Some(remove), Some(add)) = (pick(&voters.iter().copied().collect::<Vec<_>>()), pick(&spare)) else {
            return;
        };
        let Some(node) = self.registry.get(leader) else { return };
        let Some(host) = self.host_now(leader) else { return };
        let mut new_voters = voters.clone();
        new_voters.remove(&remove);
        new_voters.insert(add);
        self.trace.event(now_ms(), format!("nemesis: membership {voters:?} -> {new_voters:?} via leader {leader}"));
        self.add_voter(&node, &host, add, new_voters).await;
    }

    /// The leader and its term, as the leader reports them.
    fn leader_and_term(&self) -> Option<(NodeId, u64)> {
        let leader = self.leader()?;
        let metrics = self.registry.get(leader)?.raft.metrics();
        Some((leader, metrics.current_term))
    }

    /// A write through `leader`'s own node: `Some(committed)`, or `None` if it could not be
    /// started there.
    async fn probe_write(&self, leader: NodeId) -> Option<bool> {
        let (node, host) = (self.registry.get(leader)?, self.host_now(leader)?);
        let raft = node.raft.clone();
        let probe = WriteCommand::Put { key: b"probe/minority".to_vec(), value: b"up".to_vec(), lease: None };
        let written =
            madsim::time::timeout(MINORITY_WRITE_BOUND, host.spawn(async move { raft.write(probe.into()).await }))
                .await;
        match written {
            Ok(Ok(result)) => Some(result.is_ok()),
            Ok(Err(_)) => None,
            Err(_) => Some(false),
        }
    }

    /// While `minority` is cut off for `held`: the majority's leader stays leader of `term`
    /// and a write through it commits within `MINORITY_WRITE_BOUND`.
    async fn check_quiet_minority(&self, minority: &[NodeId], leader: NodeId, term: u64, held: Duration) {
        let started = madsim::time::Instant::now();
        let committed = madsim::time::timeout(MINORITY_WRITE_BOUND, self.probe_write(leader)).await;
        self.trace
            .event(now_ms(), format!("availability: with {minority:?} cut off a write took {:?}", started.elapsed()));
        if matches!(committed, Ok(Some(true))) {
            self.trace.minority_write(started.elapsed().as_millis() as u64);
        }
        // `Ok(None)`: the probe could not be started on the leader's host; no verdict.
        if self.registry.get(leader).is_some() && matches!(committed, Ok(Some(false)) | Err(_)) {
            self.trace.violation(
                now_ms(),
                format!("with only {minority:?} cut off, leader {leader} did not commit a write within {MINORITY_WRITE_BOUND:?}: {committed:?}"),
            );
        }
        madsim::time::sleep(held.saturating_sub(started.elapsed())).await;
        if let Some((now_leader, now_term)) = self.leader_and_term()
            && (now_leader, now_term) != (leader, term)
        {
            self.trace.violation(
                now_ms(),
                format!("while only {minority:?} was cut off, leadership moved from node {leader} term {term} to node {now_leader} term {now_term}"),
            );
        }
    }

    /// With the leader cut off into `minority`: a node of `majority` becomes leader and
    /// commits a write within [`LEADER_CUT_OFF_BOUND`] of the cut (checked only while the
    /// partition lasts that long).
    async fn check_leader_cut_off(&self, minority: &[NodeId], majority: &[NodeId], held: Duration) {
        let started = madsim::time::Instant::now();
        let bound = LEADER_CUT_OFF_BOUND.min(held);
        while started.elapsed() < bound {
            let new_leader = majority.iter().copied().find(|id| {
                self.registry.get(*id).is_some_and(|node| node.raft.metrics().state == openraft::ServerState::Leader)
            });
            if let Some(new_leader) = new_leader {
                let left = bound.saturating_sub(started.elapsed());
                let committed = madsim::time::timeout(left, self.probe_write(new_leader)).await;
                // `None`: the probe cannot be started on that node's host; no verdict.
                if matches!(committed, Ok(None)) {
                    return;
                }
                if let Ok(Some(true)) = committed {
                    let took = started.elapsed();
                    self.trace.event(
                        now_ms(),
                        format!("availability: with the leader in {minority:?} cut off, node {new_leader} led and committed after {took:?}"),
                    );
                    self.trace.leader_cut_off(took.as_millis() as u64);
                    return;
                }
            }
            madsim::time::sleep(Duration::from_millis(20)).await;
        }
        if held >= LEADER_CUT_OFF_BOUND {
            self.trace.violation(
                now_ms(),
                format!(
                    "with the leader cut off in {minority:?}, no node of {majority:?} led and committed a write within {LEADER_CUT_OFF_BOUND:?}"
                ),
            );
        }
    }

    /// Removes the leader from the voters through `ClusterController::remove`, then brings
    /// the voter count back with a spare node, through whoever leads next.
    async fn remove_leader(&self, leader: NodeId) {
        let voters = self.voters();
        let (Some(node), Some(host)) = (self.registry.get(leader), self.host_now(leader)) else { return };
        self.trace.event(now_ms(), format!("nemesis: remove the leader {leader} from {voters:?}"));
        let raft = node.raft.clone();
        let result = host.spawn(async move { raft.remove(leader).await }).await;
        self.trace.event(now_ms(), format!("nemesis: removing the leader finished: {result:?}"));
        if !matches!(result, Ok(Ok(()))) {
            return;
        }
        madsim::time::sleep(Duration::from_millis(random_range(200, 2000))).await;
        let Some(new_leader) = self.leader().filter(|id| *id != leader) else { return };
        let mut new_voters = self.voters();
        let spare: Vec<NodeId> = self.hosts.keys().copied().filter(|id| !new_voters.contains(id)).collect();
        let Some(add) = pick(&spare) else { return };
        new_voters.insert(add);
        let (Some(node), Some(host)) = (self.registry.get(new_leader), self.host_now(new_leader)) else { return };
        self.trace.event(now_ms(), format!("nemesis: add node {add} back as a voter via leader {new_leader}"));
        self.add_voter(&node, &host, add, new_voters).await;
    }

    /// Through the leader `node` on `host`: adds `add` as a learner, then makes `voters` the
    /// voters; the result goes to the trace.
    async fn add_voter(&self, node: &LiveNode, host: &NodeHandle, add: NodeId, voters: BTreeSet<NodeId>) {
        let raft = node.raft.clone();
        let result = host
            .spawn(async move {
                raft.add_learner(member(add)).await?;
                raft.change_membership(voters).await
            })
            .await;
        self.trace.event(now_ms(), format!("nemesis: membership change finished: {result:?}"));
    }

    async fn nemesis_step(&self, enabled: &[Fault]) {
        let Some(fault) = pick(enabled) else { return };
        let ids: Vec<NodeId> = self.hosts.keys().copied().collect();
        let net = NetSim::current();
        match fault {
            Fault::Partition => {
                let mut left = Vec::new();
                let mut right = Vec::new();
                for id in &ids {
                    if madsim::rand::random::<bool>() { left.push(*id) } else { right.push(*id) }
                }
                if left.is_empty() || right.is_empty() {
                    return;
                }
                self.trace.event(now_ms(), format!("nemesis: partition {left:?} | {right:?}"));
                // Cutting off a minority that does not hold the leader must cost nothing
                // (Pre-Vote): the same leader and term throughout, and writes keep committing.
                let voters = self.voters();
                // Armed only behind a leader that commits a write now: a leader deposed by an
                // earlier step that has not noticed yet is no baseline.
                let before = match self.leader_and_term() {
                    Some((leader, term)) if self.probe_write(leader).await == Some(true) => {
                        self.leader_and_term().filter(|now| *now == (leader, term))
                    }
                    _ => None,
                };
                let quiet_minority = before.and_then(|(leader, _)| {
                    let minority = if left.contains(&leader) { &right } else { &left };
                    let cut = minority.iter().filter(|id| voters.contains(id)).count();
                    (2 * cut < voters.len()).then(|| minority.clone())
                });
                // The leader cut off into a minority: the majority must elect a leader and
                // commit within about an election (the voters first wait out the old
                // leader's lease, then a pre-vote and a vote round).
                let cut_off_leader = before.and_then(|(leader, _)| {
                    let (minority, majority) = if left.contains(&leader) { (&left, &right) } else { (&right, &left) };
                    let kept = majority.iter().filter(|id| voters.contains(id)).count();
                    (2 * kept > voters.len()
                        && self.registry.live().keys().filter(|id| majority.contains(id)).count() == majority.len())
                    .then(|| (minority.clone(), majority.clone()))
                });
                for a in &left {
                    for b in &right {
                        net.clog_link(self.hosts[a].id(), self.hosts[b].id());
                        net.clog_link(self.hosts[b].id(), self.hosts[a].id());
                    }
                }
                let held = Duration::from_millis(random_range(500, 5000));
                if let (Some(minority), Some((leader, term))) = (&quiet_minority, before) {
                    self.check_quiet_minority(minority, leader, term, held).await;
                } else if let Some((minority, majority)) = &cut_off_leader {
                    let started = madsim::time::Instant::now();
                    self.check_leader_cut_off(minority, majority, held).await;
                    madsim::time::sleep(held.saturating_sub(started.elapsed())).await;
                } else {
                    madsim::time::sleep(held).await;
                }
                for a in &left {
                    for b in &right {
                        net.unclog_link(self.hosts[a].id(), self.hosts[b].id());
                        net.unclog_link(self.hosts[b].id(), self.hosts[a].id());
                    }
                }
                self.trace.event(now_ms(), "nemesis: partition healed");
                if let (Some(minority), Some((leader, term))) = (&quiet_minority, before) {
                    // The cut-off nodes rejoin: with Pre-Vote they cannot depose the leader.
                    madsim::time::sleep(Duration::from_secs(2)).await;
                    if let Some((now_leader, now_term)) = self.leader_and_term()
                        && (now_leader, now_term) != (leader, term)
                        && self.registry.get(leader).is_some()
                    {
                        self.trace.violation(
                            now_ms(),
                            format!(
                                "minority partition of {minority:?} cost the majority its leader: node {leader} term \
                                 {term} before, node {now_leader} term {now_term} 2 s after healing"
                            ),
                        );
                    }
                }
            }
            Fault::OneWay => {
                let (Some(from), Some(to)) = (pick(&ids), pick(&ids)) else { return };
                if from == to {
                    return;
                }
                self.trace.event(now_ms(), format!("nemesis: one-way link {from} -> {to} cut"));
                net.clog_link(self.hosts[&from].id(), self.hosts[&to].id());
                madsim::time::sleep(Duration::from_millis(random_range(500, 5000))).await;
                net.unclog_link(self.hosts[&from].id(), self.hosts[&to].id());
                self.trace.event(now_ms(), "nemesis: one-way link healed");
            }
            Fault::Crash => {
                if let Some(id) = pick(&ids) {
                    self.crash(id).await;
                }
            }
            Fault::Pause => {
                let Some(id) = pick(&ids) else { return };
                let pause = random_range(200, 3000);
                self.trace.event(now_ms(), format!("nemesis: pause node {id} for {pause} ms"));
                self.handle.pause(self.hosts[&id].id());
                madsim::time::sleep(Duration::from_millis(pause)).await;
                self.handle.resume(self.hosts[&id].id());
            }
            Fault::ClockSkew => {
                let Some(id) = pick(&ids) else { return };
                let rate = [0.5, 0.8, 1.3, 2.0][madsim::rand::random::<usize>() % 4];
                self.trace.event(now_ms(), format!("nemesis: node {id} timers at {rate}x"));
                aspen_raft_storage::rt::set_timer_rate(self.hosts[&id].id(), rate);
                madsim::time::sleep(Duration::from_millis(random_range(1000, 6000))).await;
                aspen_raft_storage::rt::set_timer_rate(self.hosts[&id].id(), 1.0);
                self.trace.event(now_ms(), format!("nemesis: node {id} timers back to 1x"));
            }
            Fault::Membership => self.membership_swap().await,
            Fault::Snapshot => {
                let Some(id) = pick(&ids) else { return };
                let (Some(node), Some(host)) = (self.registry.get(id), self.host_now(id)) else { return };
                let raft = node.raft.clone();
                let result = host.spawn(async move { raft.trigger_snapshot().await }).await;
                self.trace.event(now_ms(), format!("nemesis: snapshot on node {id}: {result:?}"));
            }
            // Message faults are on for the whole workload.
            Fault::Drop | Fault::Delay | Fault::Duplicate | Fault::Reorder | Fault::LostReply => {}
        }
    }

    /// Ends every fault: links, pauses, skews, dead nodes, message faults.
    fn heal(&self) {
        let net = NetSim::current();
        net.update_config(|config| config.packet_loss_rate = 0.0);
        self.faults.duplicate_ppm.store(0, Ordering::Relaxed);
        self.faults.delay_ppm.store(0, Ordering::Relaxed);
        self.faults.lose_reply_ppm.store(0, Ordering::Relaxed);
        for host in self.hosts.values() {
            for other in self.hosts.values() {
                net.unclog_link(host.id(), other.id());
            }
            self.handle.resume(host.id());
            aspen_raft_storage::rt::set_timer_rate(host.id(), 1.0);
        }
        for (id, host) in &self.hosts {
            if self.registry.get(*id).is_none() {
                self.handle.restart(host.id());
                self.trace.event(now_ms(), format!("heal: restart node {id}"));
            }
        }
        self.trace.event(now_ms(), "heal: all faults off");
    }
}

async fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = madsim::time::Instant::now();
    while start.elapsed() < deadline {
        if done() {
            return true;
        }
        madsim::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

async fn simulate(config: SimConfig, root: PathBuf, trace: Trace, history: History) -> SimOutcome {
    let handle = Handle::current();
    let faults = Arc::new(NetFaults::default());
    if config.faults.contains(&Fault::Duplicate) {
        faults.duplicate_ppm.store(20_000, Ordering::Relaxed);
    }
    if config.faults.contains(&Fault::Delay) {
        faults.delay_ppm.store(20_000, Ordering::Relaxed);
        faults.max_delay_ms.store(1000, Ordering::Relaxed);
    }
    if config.faults.contains(&Fault::LostReply) {
        faults.lose_reply_ppm.store(20_000, Ordering::Relaxed);
    }
    let registry = Registry::default();
    let voters = voters_for_seed(config.seed);
    let node_count = if config.faults.contains(&Fault::Membership) { voters + 1 } else { voters };
    let mut hosts = BTreeMap::new();
    for id in 1..=node_count {
        let spec = NodeSpec {
            id,
            dir: cluster::node_dir(&root, id),
            config: consensus_config(id, &config.faults),
            faults: Arc::clone(&faults),
            registry: registry.clone(),
            trace: trace.clone(),
        };
        hosts.insert(id, cluster::create_node(&handle, spec));
    }
    let cluster = Cluster {
        handle: handle.clone(),
        hosts,
        registry: registry.clone(),
        trace: trace.clone(),
        faults: Arc::clone(&faults),
        root,
        os_crashes: config.faults.contains(&Fault::Crash),
    };
    let started = madsim::time::Instant::now();
    if !wait_until(Duration::from_secs(10), || registry.live().len() == node_count as usize).await {
        return SimOutcome { sim_elapsed: started.elapsed(), progress_error: Some("nodes did not start".into()) };
    }
    // Only a clone of node 1's Raft handle: holding its LiveNode here would keep its files
    // open across a crash.
    let (Some(raft), Some(first_host)) = (registry.get(1).map(|node| node.raft.clone()), cluster.hosts.get(&1)) else {
        return SimOutcome { sim_elapsed: started.elapsed(), progress_error: Some("node 1 missing".into()) };
    };
    let init = first_host.spawn(async move { raft.init((1..=voters).map(member).collect()).await }).await;
    trace.event(now_ms(), format!("init voters 1..={voters}: {init:?}"));

    // The monitor checks invariants every few simulated milliseconds until the end.
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (registry, trace, stop) = (registry.clone(), trace.clone(), Arc::clone(&stop));
        madsim::task::spawn(async move {
            let mut monitor = Monitor::default();
            while !stop.load(Ordering::Relaxed) {
                monitor.observe(&registry, &trace);
                madsim::time::sleep(MONITOR_INTERVAL).await;
            }
            monitor
        })
    };

    let workload_end = started.elapsed() + Duration::from_secs(config.sim_secs);
    let node_ids: Vec<NodeId> = cluster.hosts.keys().copied().collect();
    let mut clients = Vec::new();
    for index in 0..config.clients {
        let host = handle.create_node().name(format!("client-{index}")).ip(client_ip(index)).build();
        let client =
            SimClient::new(index, node_ids.clone(), Arc::clone(&faults), history.clone(), trace.clone(), config.keys);
        clients.push(host.spawn(client.run(workload_end)));
    }

    let episodes: Vec<Fault> = config
        .faults
        .iter()
        .copied()
        .filter(|fault| {
            !matches!(fault, Fault::Drop | Fault::Delay | Fault::Duplicate | Fault::Reorder | Fault::LostReply)
        })
        .collect();
    while started.elapsed() < workload_end {
        madsim::time::sleep(Duration::from_millis(random_range(300, 2000))).await;
        if started.elapsed() < workload_end {
            cluster.nemesis_step(&episodes).await;
        }
    }
    cluster.heal();
    for client in clients {
        let _ = client.await;
    }
    trace.event(now_ms(), format!("workload done: {} operations recorded", history.operations().len()));

    // The healed cluster must serve a write, then every member must catch up to it.
    let progress_error = converge(&cluster, &history, &trace, &faults, &node_ids).await;
    stop.store(true, Ordering::Relaxed);
    let mut monitor = match monitor.await {
        Ok(monitor) => monitor,
        Err(error) => {
            return SimOutcome { sim_elapsed: started.elapsed(), progress_error: Some(format!("monitor: {error}")) };
        }
    };
    let members = cluster.members();
    monitor.final_check(&registry, &members, &trace);
    SimOutcome { sim_elapsed: started.elapsed(), progress_error }
}

async fn converge(
    cluster: &Cluster,
    history: &History,
    trace: &Trace,
    faults: &Arc<NetFaults>,
    node_ids: &[NodeId],
) -> Option<String> {
    let host = cluster.handle.create_node().name("prober").ip(client_ip(200)).build();
    let probe = SimClient::new(10_000, node_ids.to_vec(), Arc::clone(faults), history.clone(), trace.clone(), 1);
    let wrote = host.spawn(probe.probe_write(CONVERGE_DEADLINE)).await.unwrap_or(false);
    if !wrote {
        return Some(format!("the healed cluster did not accept a write within {CONVERGE_DEADLINE:?}"));
    }
    let registry = cluster.registry.clone();
    let converged = wait_until(CONVERGE_DEADLINE, || {
        let members = cluster.members();
        let live = registry.live();
        let applied: BTreeSet<Option<u64>> = members
            .iter()
            .map(|id| live.get(id).and_then(|node| node.raft.metrics().last_applied.map(|log_id| log_id.index)))
            .collect();
        !members.is_empty() && applied.len() == 1 && !applied.contains(&None)
    })
    .await;
    trace.event(now_ms(), format!("converged: {converged}"));
    if converged { None } else { Some(format!("members did not converge within {CONVERGE_DEADLINE:?}")) }
}
