//! Groups concurrent client writes into Raft entries, so one entry (one append, one fsync,
//! one apply transaction) carries many writes. This is where write throughput comes from.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aspen_api::limits::{MAX_BATCH_SIZE, MAX_VALUE_SIZE};
use aspen_api::{ApplyError, ClientWrite, KvError, Proposal, WriteCommand, WriteResponse};
use aspen_raft_storage::rt;
use aspen_raft_storage::{EntryResponse, SqliteStateMachine, TypeConfig};
use openraft::Raft;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::errors::client_write_error;

/// Most payload bytes (keys and values) grouped into one entry: a few maximum-size values,
/// well under the entry and RPC message limits.
pub const MAX_BATCH_BYTES: usize = 4 * MAX_VALUE_SIZE;

/// The raft handle type.
pub type AspenRaft = Raft<TypeConfig, SqliteStateMachine>;

/// A write waiting to be proposed.
pub struct PendingWrite {
    /// The write and its identity.
    pub write: ClientWrite,
    /// Where its result goes.
    pub reply: oneshot::Sender<Result<WriteResponse, KvError>>,
}

/// The proposal slots shared by the batcher and the direct path.
pub struct Proposals {
    slots: Arc<Semaphore>,
    /// Entries proposed and not yet answered.
    proposing: AtomicUsize,
}

/// A proposal in flight: holds its slot and counts in `proposing` until dropped.
pub struct Proposing<'a> {
    proposals: &'a Proposals,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Proposing<'_> {
    fn drop(&mut self) {
        self.proposals.proposing.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Proposals {
    /// At most `max_in_flight` entries proposed at once.
    pub fn new(max_in_flight: usize) -> Arc<Proposals> {
        Arc::new(Proposals { slots: Arc::new(Semaphore::new(max_in_flight)), proposing: AtomicUsize::new(0) })
    }

    fn start(&self, slot: OwnedSemaphorePermit) -> Proposing<'_> {
        self.proposing.fetch_add(1, Ordering::AcqRel);
        Proposing { proposals: self, _slot: slot }
    }

    /// A slot for a write to be proposed straight from its caller's task, skipping the
    /// batcher's two task hand-offs, when it could share an entry with nothing: no write is
    /// queued (`queue_empty`) and no entry is being proposed. A lone client's writes take
    /// this path; concurrent ones find a proposal in flight and queue up to be grouped.
    pub fn try_direct(&self, queue_empty: bool) -> Option<Proposing<'_>> {
        if !queue_empty || self.proposing.load(Ordering::Acquire) != 0 {
            return None;
        }
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        Some(self.start(slot))
    }
}

fn payload_bytes(command: &WriteCommand) -> usize {
    match command {
        WriteCommand::Put { key, value, .. } => key.len() + value.len(),
        WriteCommand::Batch(commands) => commands.iter().map(payload_bytes).sum(),
        _ => 64,
    }
}

/// Runs until the queue closes: takes whatever writes are queued, groups them, and
/// proposes each group as one entry, with at most `max_in_flight` groups outstanding.
/// A group holds its slot for at most `write_timeout` (its clients then get `Timeout`, an
/// unknown outcome): openraft answers a proposal only once its entry is applied, truncated
/// or purged, which for an entry left in a deposed leader's log can take indefinitely.
/// Without the bound such entries held both slots and stalled every later write on the
/// node (simulator seed 12 with all faults: no write accepted for 60 s after healing).
pub async fn run(
    raft: AspenRaft,
    mut queue: mpsc::Receiver<PendingWrite>,
    proposals: Arc<Proposals>,
    write_timeout: Duration,
) {
    let mut carry: Option<PendingWrite> = None;
    loop {
        // The slot comes first and the group second: writes that arrive while every slot
        // is busy wait in the queue and all join the next group, instead of that group
        // being fixed at whatever was queued when its first write came.
        let Ok(slot) = Arc::clone(&proposals.slots).acquire_owned().await else { return };
        let first = match carry.take() {
            Some(write) => write,
            None => match queue.recv().await {
                Some(write) => write,
                None => return,
            },
        };
        let mut bytes = payload_bytes(&first.write.command);
        let mut group = vec![first];
        while group.len() < MAX_BATCH_SIZE && bytes < MAX_BATCH_BYTES {
            let Ok(next) = queue.try_recv() else { break };
            if bytes + payload_bytes(&next.write.command) > MAX_BATCH_BYTES {
                carry = Some(next);
                break;
            }
            bytes += payload_bytes(&next.write.command);
            group.push(next);
        }
        let (raft, proposals) = (raft.clone(), Arc::clone(&proposals));
        rt::spawn(async move {
            let _proposing = proposals.start(slot);
            propose(&raft, group, write_timeout).await;
        });
    }
}

/// Proposes one write as an entry of its own and waits for its result.
pub async fn propose_one(
    raft: &AspenRaft,
    write: ClientWrite,
    write_timeout: Duration,
) -> Result<WriteResponse, KvError> {
    let mut results = propose_writes(raft, vec![write], write_timeout).await?;
    match (results.pop(), results.is_empty()) {
        (Some(result), true) => result.map_err(KvError::from),
        _ => Err(KvError::OutcomeUnknown("one write produced several results".into())),
    }
}

/// Proposes `writes` as one entry stamped with this leader's clock, and waits for their results.
async fn propose_writes(
    raft: &AspenRaft,
    writes: Vec<ClientWrite>,
    write_timeout: Duration,
) -> Result<Vec<Result<WriteResponse, ApplyError>>, KvError> {
    let count = writes.len();
    let proposal = Proposal { time_ms: rt::wall_clock_ms(), writes };
    let written = rt::timeout(write_timeout, raft.client_write(proposal))
        .await
        .map_err(|_| KvError::Timeout { after_ms: write_timeout.as_millis() as u64 })?
        .map_err(client_write_error)?;
    match written.data {
        EntryResponse::Writes(results) if results.len() == count => Ok(results),
        // Applied, but the answers are not what was proposed: the outcome of each write is
        // not known, and the writes' identities make a retry safe.
        other => Err(KvError::OutcomeUnknown(format!("{count} writes produced {other:?}"))),
    }
}

async fn propose(raft: &AspenRaft, group: Vec<PendingWrite>, write_timeout: Duration) {
    let (writes, replies): (Vec<_>, Vec<_>) = group.into_iter().map(|pending| (pending.write, pending.reply)).unzip();
    match propose_writes(raft, writes, write_timeout).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result.map_err(KvError::from));
            }
        }
        Err(error) => fail_all(replies, error),
    }
}

/// Answers every write of a batch with the same error.
fn fail_all(replies: Vec<oneshot::Sender<Result<WriteResponse, KvError>>>, error: KvError) {
    for reply in replies {
        let _ = reply.send(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_path_is_taken_only_when_nothing_is_queued_or_proposed() {
        let proposals = Proposals::new(2);
        assert!(proposals.try_direct(false).is_none(), "writes are queued: group with them");
        let first = proposals.try_direct(true).expect("idle: a lone write goes straight to Raft");
        assert!(proposals.try_direct(true).is_none(), "an entry is being proposed: queue up to be grouped");
        drop(first);
        assert_eq!(proposals.proposing.load(Ordering::Acquire), 0);

        // The batcher's slots count too: with every slot taken there is no direct path.
        let held: Vec<_> = (0..2).map(|_| Arc::clone(&proposals.slots).try_acquire_owned().expect("slot")).collect();
        assert!(proposals.try_direct(true).is_none(), "no free slot");
        drop(held);
        let direct = proposals.try_direct(true).expect("slots free again");
        assert_eq!(proposals.slots.available_permits(), 1, "the direct write holds a slot");
        drop(direct);
        assert_eq!(proposals.slots.available_permits(), 2);
    }
}
