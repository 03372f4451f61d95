//! Helpers shared by the storage integration tests: entry builders, a random-op
//! generator, and the in-memory model the state machine must agree with.
#![allow(dead_code)]

pub mod model;

use aspen_api::{Compare, CompareOp, CompareTarget, KeyRange, TxnOp, TxnRequest, WriteCommand};
use aspen_raft_storage::{Entry, LogId};
use openraft::EntryPayload;

/// A log id of `term` led by node 1.
pub fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(term.into(), index)
}

/// A normal entry carrying `command`.
pub fn normal(term: u64, index: u64, command: WriteCommand) -> Entry {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(command.into()) }
}

/// A blank entry.
pub fn blank(term: u64, index: u64) -> Entry {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Blank }
}

/// A randomly generated operation over a tiny key space, so operations collide.
#[derive(Clone, Debug, bolero::TypeGenerator)]
pub enum Op {
    Put { key: u8, value: Vec<u8>, lease: Option<u8> },
    Delete { key: u8 },
    DeletePrefix { prefix: u8 },
    Cas { key: u8, expected_version: u8, value: Vec<u8> },
    CompareValue { key: u8, op: u8, operand: Vec<u8>, then_put: u8, else_delete: u8 },
    LeaseGrant { id: u8, ttl: u8 },
    LeaseRevoke { id: u8 },
    Batch { ops: Vec<(u8, Vec<u8>)> },
    Invalid { key_len: u16 },
}

fn key(byte: u8) -> Vec<u8> {
    // Two prefixes ("a", "b") and eight keys under each.
    let prefix = if byte & 0x8 == 0 { b'a' } else { b'b' };
    vec![prefix, b'0' + (byte & 0x7)]
}

fn value(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().take(16).copied().collect()
}

fn lease(byte: u8) -> u64 {
    u64::from(byte % 4) + 1
}

impl Op {
    /// The command this op stands for.
    pub fn command(&self) -> WriteCommand {
        match self {
            Op::Put { key: k, value: v, lease: l } => {
                WriteCommand::Put { key: key(*k), value: value(v), lease: l.map(lease) }
            }
            Op::Delete { key: k } => WriteCommand::Delete { key: key(*k) },
            Op::DeletePrefix { prefix } => {
                let prefix = if prefix & 1 == 0 { b"a".to_vec() } else { b"b".to_vec() };
                WriteCommand::DeleteRange { range: KeyRange::prefix(prefix) }
            }
            Op::Cas { key: k, expected_version, value: v } => WriteCommand::Txn(TxnRequest {
                compare: vec![Compare {
                    key: key(*k),
                    op: CompareOp::Equal,
                    target: CompareTarget::Version(u64::from(expected_version % 4)),
                }],
                success: vec![TxnOp::Put { key: key(*k), value: value(v), lease: None }, TxnOp::Get { key: key(*k) }],
                failure: vec![TxnOp::Get { key: key(*k) }],
            }),
            Op::CompareValue { key: k, op, operand, then_put, else_delete } => {
                let op =
                    [CompareOp::Equal, CompareOp::NotEqual, CompareOp::Less, CompareOp::Greater][(op % 4) as usize];
                WriteCommand::Txn(TxnRequest {
                    compare: vec![Compare { key: key(*k), op, target: CompareTarget::Value(value(operand)) }],
                    success: vec![TxnOp::Put {
                        key: key(*then_put),
                        value: value(operand),
                        lease: Some(lease(*then_put)),
                    }],
                    failure: vec![TxnOp::DeleteRange { range: KeyRange::between(key(*else_delete), b"b".to_vec()) }],
                })
            }
            Op::LeaseGrant { id, ttl } => {
                WriteCommand::LeaseGrant { id: if id % 5 == 0 { 0 } else { lease(*id) }, ttl_secs: u64::from(*ttl % 3) }
            }
            Op::LeaseRevoke { id } => WriteCommand::LeaseRevoke { id: lease(*id) },
            Op::Batch { ops } => WriteCommand::Batch(
                ops.iter()
                    .take(8)
                    .map(|(k, v)| WriteCommand::Put { key: key(*k), value: value(v), lease: None })
                    .collect(),
            ),
            Op::Invalid { key_len } => WriteCommand::Put {
                key: vec![b'x'; usize::from(*key_len) % (aspen_api::limits::MAX_KEY_SIZE * 2)],
                value: vec![],
                lease: None,
            },
        }
    }
}
