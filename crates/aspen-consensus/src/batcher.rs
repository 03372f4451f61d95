//! Groups concurrent client writes into Raft entries, so one entry (one append, one fsync,
//! one apply transaction) carries many writes. This is where write throughput comes from.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aspen_api::limits::{MAX_BATCH_SIZE, MAX_VALUE_SIZE};
use aspen_api::{ApplyError, KvError, WriteCommand, WriteResponse};
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
    /// The command.
    pub command: WriteCommand,
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
        let mut group = vec![first];
        // A client's own batch is an entry by itself (batches do not nest).
        if !matches!(group[0].command, WriteCommand::Batch(_)) {
            let mut bytes = payload_bytes(&group[0].command);
            while group.len() < MAX_BATCH_SIZE && bytes < MAX_BATCH_BYTES {
                let Ok(next) = queue.try_recv() else { break };
                if matches!(next.command, WriteCommand::Batch(_))
                    || bytes + payload_bytes(&next.command) > MAX_BATCH_BYTES
                {
                    carry = Some(next);
                    break;
                }
                bytes += payload_bytes(&next.command);
                group.push(next);
            }
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
    command: WriteCommand,
    write_timeout: Duration,
) -> Result<WriteResponse, KvError> {
    match rt::timeout(write_timeout, raft.client_write(command)).await {
        Ok(Ok(response)) => entry_result(response.data),
        Ok(Err(error)) => Err(client_write_error(error)),
        Err(_) => Err(KvError::Timeout { after_ms: write_timeout.as_millis() as u64 }),
    }
}

async fn propose(raft: &AspenRaft, mut group: Vec<PendingWrite>, write_timeout: Duration) {
    let timed_out = || KvError::Timeout { after_ms: write_timeout.as_millis() as u64 };
    if group.len() == 1 {
        let Some(write) = group.pop() else { return };
        let _ = write.reply.send(propose_one(raft, write.command, write_timeout).await);
        return;
    }
    let (commands, replies): (Vec<_>, Vec<_>) = group.into_iter().map(|write| (write.command, write.reply)).unzip();
    let count = commands.len();
    let written = match rt::timeout(write_timeout, raft.client_write(WriteCommand::Batch(commands))).await {
        Ok(written) => written,
        Err(_) => return fail_all(replies, timed_out()),
    };
    match written {
        Ok(response) => match entry_result(response.data) {
            Ok(WriteResponse::Batch(results)) if results.len() == count => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result.map_err(KvError::from));
                }
            }
            other => fail_all(replies, KvError::Storage(format!("batch of {count} produced {other:?}"))),
        },
        Err(error) => fail_all(replies, client_write_error(error)),
    }
}

/// Answers every write of a batch with the same error.
fn fail_all(replies: Vec<oneshot::Sender<Result<WriteResponse, KvError>>>, error: KvError) {
    for reply in replies {
        let _ = reply.send(Err(error.clone()));
    }
}

fn entry_result(response: EntryResponse) -> Result<WriteResponse, KvError> {
    match response {
        EntryResponse::Write(result) => result.map_err(|error: ApplyError| KvError::Apply(error)),
        EntryResponse::NoOp => Err(KvError::Storage("write entry produced no response".into())),
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
