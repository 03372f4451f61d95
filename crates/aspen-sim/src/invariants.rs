//! Invariants checked while the simulation runs and once it has converged:
//! at most one leader per term; a log index, once applied anywhere, holds the same entry on
//! every node forever; state machines at the same revision have the same digest.

use std::collections::{BTreeMap, BTreeSet};

use aspen_api::NodeId;
use aspen_raft_storage::log::chain;
use openraft::ServerState;

use crate::cluster::{LiveNode, Registry, now_ms};
use crate::history::Trace;

/// Most log indexes remembered (older ones are forgotten first).
pub const MAX_TRACKED_INDEXES: usize = 100_000;

/// What the monitor has seen so far.
#[derive(Default)]
pub struct Monitor {
    leaders: BTreeMap<u64, NodeId>,
    /// Entry digest (blake3 of term and entry bytes) per applied index, and who showed it first.
    entries: BTreeMap<u64, ([u8; 32], NodeId)>,
    /// State digest per revision, and who showed it first.
    states: BTreeMap<u64, ([u8; 32], NodeId)>,
}

fn entry_digest(node: &LiveNode, index: u64) -> Option<[u8; 32]> {
    let row = node.log.read_raw_row(index).ok()??;
    let row = chain::decode_row(&row)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&row.term.to_le_bytes());
    hasher.update(row.entry_bytes);
    Some(*hasher.finalize().as_bytes())
}

fn remember(map: &mut BTreeMap<u64, ([u8; 32], NodeId)>, key: u64, digest: [u8; 32], node: NodeId) -> Option<NodeId> {
    match map.get(&key) {
        Some((seen, first)) if *seen != digest => Some(*first),
        Some(_) => None,
        None => {
            map.insert(key, (digest, node));
            if map.len() > MAX_TRACKED_INDEXES {
                map.pop_first();
            }
            None
        }
    }
}

impl Monitor {
    /// Looks at every running node once, recording violations in `trace`.
    pub fn observe(&mut self, registry: &Registry, trace: &Trace) {
        for (id, node) in registry.live() {
            let metrics = node.raft.metrics();
            // A leader is a node in the Leader state whose committed vote names itself; a
            // deposed leader that has not noticed yet holds a vote for someone else.
            let vote = &metrics.vote;
            if metrics.state == ServerState::Leader && vote.is_committed() && vote.leader_id().voted_for == id {
                let term = vote.leader_id().term;
                match self.leaders.get(&term) {
                    Some(other) if *other != id => trace.violation(
                        now_ms(),
                        format!("two leaders in term {term}: node {other} and node {id} (vote of {id}: {vote:?})"),
                    ),
                    Some(_) => {}
                    None => {
                        self.leaders.insert(term, id);
                        trace.event(now_ms(), format!("node {id} leads term {term}"));
                    }
                }
            }
            if let Some(applied) = metrics.last_applied {
                self.check_entry(id, &node, applied.index, trace);
            }
            self.check_state(id, &node, trace);
        }
    }

    fn check_entry(&mut self, id: NodeId, node: &LiveNode, index: u64, trace: &Trace) {
        // Purged or not yet written locally (a snapshot covers it): nothing to compare.
        let Some(digest) = entry_digest(node, index) else { return };
        if let Some(first) = remember(&mut self.entries, index, digest, id) {
            trace.violation(now_ms(), format!("applied entry {index} differs between node {first} and node {id}"));
        }
    }

    fn check_state(&mut self, id: NodeId, node: &LiveNode, trace: &Trace) {
        match node.state_machine.reader().digest() {
            Ok((revision, digest)) => {
                if let Some(first) = remember(&mut self.states, revision, digest, id) {
                    trace.violation(
                        now_ms(),
                        format!("state machines differ at revision {revision}: node {first} and node {id}"),
                    );
                }
            }
            Err(error) => trace.violation(now_ms(), format!("node {id}: state machine unreadable: {error}")),
        }
    }

    /// After convergence: every node's whole log re-verifies, every applied index any two
    /// nodes both hold has the same entry, and members at the same revision are equal.
    pub fn final_check(&mut self, registry: &Registry, members: &BTreeSet<NodeId>, trace: &Trace) {
        let live = registry.live();
        for (id, node) in &live {
            match node.log.verify() {
                Ok(summary) => trace.event(now_ms(), format!("node {id}: log chain verified ({summary:?})")),
                Err(error) => trace.violation(now_ms(), format!("node {id}: log chain broken: {error}")),
            }
            let metrics = node.raft.metrics();
            // Only applied (so committed) entries: a deposed or removed leader may keep an
            // uncommitted tail that nobody will ever ask it to truncate.
            let first = metrics.purged.map_or(1, |purged| purged.index + 1);
            let last = metrics.last_applied.map_or(0, |applied| applied.index);
            for index in first..=last {
                self.check_entry(*id, node, index, trace);
            }
        }
        let digests: BTreeMap<NodeId, (u64, [u8; 32])> = live
            .iter()
            .filter(|(id, _)| members.contains(id))
            .filter_map(|(id, node)| Some((*id, node.state_machine.reader().digest().ok()?)))
            .collect();
        // Equal digests at equal revisions; a member one entry ahead (a blank entry applied
        // after the convergence check) is not a divergence.
        let mut by_revision: BTreeMap<u64, BTreeSet<[u8; 32]>> = BTreeMap::new();
        for (revision, digest) in digests.values() {
            by_revision.entry(*revision).or_default().insert(*digest);
        }
        if by_revision.values().any(|digests| digests.len() > 1) {
            let summary: Vec<String> = digests
                .iter()
                .map(|(id, (revision, digest))| format!("node {id} at {revision}: {}", hex(&digest[..6])))
                .collect();
            trace.violation(now_ms(), format!("state machines differ after convergence: {}", summary.join("; ")));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
