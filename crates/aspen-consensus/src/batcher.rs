//! Groups concurrent client writes into Raft entries, so one entry (one append, one fsync,
//! one apply transaction) carries many writes. This is where write throughput comes from.

use std::sync::Arc;
use std::time::Duration;

use aspen_api::limits::{MAX_BATCH_SIZE, MAX_VALUE_SIZE};
use aspen_api::{ApplyError, KvError, WriteCommand, WriteResponse};
use aspen_raft_storage::rt;
use aspen_raft_storage::{EntryResponse, SqliteStateMachine, TypeConfig};
use openraft::Raft;
use tokio::sync::{Semaphore, mpsc, oneshot};

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
    max_in_flight: usize,
    write_timeout: Duration,
) {
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let mut carry: Option<PendingWrite> = None;
    loop {
        // The slot comes first and the group second: writes that arrive while every slot
        // is busy wait in the queue and all join the next group, instead of that group
        // being fixed at whatever was queued when its first write came.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { return };
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
        let raft = raft.clone();
        rt::spawn(async move {
            propose(&raft, group, write_timeout).await;
            drop(permit);
        });
    }
}

async fn propose(raft: &AspenRaft, mut group: Vec<PendingWrite>, write_timeout: Duration) {
    let timed_out = || KvError::Timeout { after_ms: write_timeout.as_millis() as u64 };
    if group.len() == 1 {
        let Some(write) = group.pop() else { return };
        let result = match rt::timeout(write_timeout, raft.client_write(write.command)).await {
            Ok(Ok(response)) => entry_result(response.data),
            Ok(Err(error)) => Err(client_write_error(error)),
            Err(_) => Err(timed_out()),
        };
        let _ = write.reply.send(result);
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
