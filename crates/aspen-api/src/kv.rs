//! Key-value data model: stored records, key ranges, reads and writes.

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::limits::{MAX_BATCH_SIZE, MAX_KEY_SIZE, MAX_LEASE_TTL_SECS, MAX_SCAN_LIMIT, MAX_VALUE_SIZE};
use crate::txn::TxnRequest;

/// A cluster revision: the Raft log index of the entry that made a change.
pub type Revision = u64;
/// Identifies a lease. Valid ids are `1..=MAX_LEASE_ID`.
pub type LeaseId = u64;

/// Largest lease id: ids are stored as SQLite integers, which are signed 64-bit.
pub const MAX_LEASE_ID: LeaseId = i64::MAX as u64;

/// Checks that a lease id is in `1..=MAX_LEASE_ID`.
pub fn validate_lease_id(id: LeaseId) -> Result<(), ValidationError> {
    if id == 0 || id > MAX_LEASE_ID {
        return Err(ValidationError::InvalidLease { id });
    }
    Ok(())
}

/// One stored key with its revision bookkeeping (etcd's `mvccpb.KeyValue`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key bytes.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value bytes; empty when the read asked for keys only.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last delete).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since the key was created; 1 after creation.
    pub version: u64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A half-open key range `[start, end)`; `end = None` means unbounded.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRange {
    /// First key in the range (inclusive).
    #[serde(with = "serde_bytes")]
    pub start: Vec<u8>,
    /// First key past the range (exclusive); `None` reaches the end of the keyspace.
    #[serde(with = "serde_bytes")]
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key that starts with `prefix` (every key when `prefix` is empty).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let start = prefix.into();
        let end = prefix_end(&start);
        KeyRange { start, end }
    }

    /// The keys in `[start, end)`.
    pub fn between(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        KeyRange { start: start.into(), end: Some(end.into()) }
    }

    /// Whether `key` falls inside the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }

    /// Checks the bounds' sizes and that the range is not inverted.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.start.len() > MAX_KEY_SIZE {
            return Err(ValidationError::KeyTooLarge { size: self.start.len(), max: MAX_KEY_SIZE });
        }
        if let Some(end) = &self.end {
            if end.len() > MAX_KEY_SIZE + 1 {
                return Err(ValidationError::KeyTooLarge { size: end.len(), max: MAX_KEY_SIZE });
            }
            if end.as_slice() < self.start.as_slice() {
                return Err(ValidationError::InvertedRange);
            }
        }
        Ok(())
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` if no such
/// key exists (empty prefix, or a prefix of only 0xff bytes).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Checks a key: non-empty and at most [`MAX_KEY_SIZE`] bytes.
pub fn validate_key(key: &[u8]) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(ValidationError::EmptyKey);
    }
    if key.len() > MAX_KEY_SIZE {
        return Err(ValidationError::KeyTooLarge { size: key.len(), max: MAX_KEY_SIZE });
    }
    Ok(())
}

/// Checks an inline value: at most [`MAX_VALUE_SIZE`] bytes.
pub fn validate_value(value: &[u8]) -> Result<(), ValidationError> {
    if value.len() > MAX_VALUE_SIZE {
        return Err(ValidationError::ValueTooLarge { size: value.len(), max: MAX_VALUE_SIZE });
    }
    Ok(())
}

/// A state-changing command; each one is applied atomically as (part of) one Raft entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteCommand {
    /// Set `key` to `value`, optionally attached to a lease.
    Put {
        /// Key to write.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// New value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Lease to attach the key to; the lease must exist.
        lease: Option<LeaseId>,
    },
    /// Remove one key.
    Delete {
        /// Key to remove.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Remove every key in a range (use [`KeyRange::prefix`] for a prefix).
    DeleteRange {
        /// Keys to remove.
        range: KeyRange,
    },
    /// A multi-key compare-then-act transaction.
    Txn(TxnRequest),
    /// Create a lease. `id = 0` lets the state machine assign the entry's revision as id.
    LeaseGrant {
        /// Requested lease id, or 0 to assign one.
        id: LeaseId,
        /// Time to live in seconds, enforced by the leader.
        ttl_secs: u64,
    },
    /// Remove a lease and every key attached to it (also how the leader expires leases).
    LeaseRevoke {
        /// Lease to revoke.
        id: LeaseId,
    },
    /// Several independent commands in one entry, each with its own result.
    /// This is how concurrent client writes share one Raft entry and one fsync.
    Batch(Vec<WriteCommand>),
}

impl std::fmt::Display for WriteCommand {
    /// A one-line summary for logs: the operation and its key, never the value bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteCommand::Put { key, value, lease } => {
                write!(f, "put {} ({} bytes, lease {lease:?})", String::from_utf8_lossy(key), value.len())
            }
            WriteCommand::Delete { key } => write!(f, "delete {}", String::from_utf8_lossy(key)),
            WriteCommand::DeleteRange { range } => write!(
                f,
                "delete-range [{}, {})",
                String::from_utf8_lossy(&range.start),
                range.end.as_deref().map_or("end".into(), String::from_utf8_lossy)
            ),
            WriteCommand::Txn(txn) => {
                write!(f, "txn ({} compares, {}/{} ops)", txn.compare.len(), txn.success.len(), txn.failure.len())
            }
            WriteCommand::LeaseGrant { id, ttl_secs } => write!(f, "lease-grant {id} ttl {ttl_secs}s"),
            WriteCommand::LeaseRevoke { id } => write!(f, "lease-revoke {id}"),
            WriteCommand::Batch(commands) => write!(f, "batch of {}", commands.len()),
        }
    }
}

impl WriteCommand {
    /// Checks every bound on the command before it is proposed.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            WriteCommand::Put { key, value, lease } => {
                validate_key(key)?;
                validate_value(value)?;
                lease.map_or(Ok(()), validate_lease_id)
            }
            WriteCommand::Delete { key } => validate_key(key),
            WriteCommand::DeleteRange { range } => range.validate(),
            WriteCommand::Txn(txn) => txn.validate(),
            WriteCommand::LeaseGrant { id, ttl_secs } => {
                if *id != 0 {
                    validate_lease_id(*id)?;
                }
                if *ttl_secs == 0 || *ttl_secs > MAX_LEASE_TTL_SECS {
                    return Err(ValidationError::InvalidLeaseTtl { ttl_secs: *ttl_secs, max: MAX_LEASE_TTL_SECS });
                }
                Ok(())
            }
            WriteCommand::LeaseRevoke { id } => validate_lease_id(*id),
            WriteCommand::Batch(commands) => {
                if commands.len() > MAX_BATCH_SIZE {
                    return Err(ValidationError::BatchTooLarge { count: commands.len(), max: MAX_BATCH_SIZE });
                }
                for command in commands {
                    if matches!(command, WriteCommand::Batch(_)) {
                        return Err(ValidationError::NestedBatch);
                    }
                    command.validate()?;
                }
                Ok(())
            }
        }
    }
}

/// What applying a [`WriteCommand`] produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteResponse {
    /// A put was applied.
    Put {
        /// Revision of the write.
        revision: Revision,
    },
    /// A delete or delete-range was applied.
    Delete {
        /// Revision of the write.
        revision: Revision,
        /// How many keys were removed.
        deleted: u64,
    },
    /// A transaction was applied.
    Txn(crate::txn::TxnResponse),
    /// A lease was created.
    LeaseGrant {
        /// Revision of the grant.
        revision: Revision,
        /// The lease's id.
        id: LeaseId,
        /// Its time to live.
        ttl_secs: u64,
    },
    /// A lease was revoked.
    LeaseRevoke {
        /// Revision of the revoke.
        revision: Revision,
        /// How many attached keys were removed.
        deleted: u64,
    },
    /// One result per command of a batch, in order.
    Batch(Vec<Result<WriteResponse, crate::error::ApplyError>>),
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadConsistency {
    /// Reflects every write acknowledged before the read began (ReadIndex).
    #[default]
    Linearizable,
    /// Served from the local state machine; may lag the leader.
    Stale,
}

/// Read one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    /// Key to read.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Freshness required.
    pub consistency: ReadConsistency,
}

/// The result of a [`GetRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetResponse {
    /// The record, if the key exists.
    pub kv: Option<KeyValue>,
    /// The state machine's revision when the read was served.
    pub revision: Revision,
}

/// Read a range of keys, in key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRequest {
    /// Keys to read.
    pub range: KeyRange,
    /// Most keys to return, at most [`MAX_SCAN_LIMIT`]; 0 means [`MAX_SCAN_LIMIT`].
    pub limit: u32,
    /// Return keys and metadata without values.
    pub keys_only: bool,
    /// Return only the number of matching keys.
    pub count_only: bool,
    /// Resume strictly after this key (the previous page's continuation token).
    #[serde(with = "serde_bytes")]
    pub after: Option<Vec<u8>>,
    /// Freshness required.
    pub consistency: ReadConsistency,
}

impl ScanRequest {
    /// A scan of every key under `prefix`, up to `limit` keys.
    pub fn prefix(prefix: impl Into<Vec<u8>>, limit: u32) -> Self {
        ScanRequest {
            range: KeyRange::prefix(prefix),
            limit,
            keys_only: false,
            count_only: false,
            after: None,
            consistency: ReadConsistency::Linearizable,
        }
    }

    /// Checks the range and the limit.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.range.validate()?;
        if self.limit > MAX_SCAN_LIMIT {
            return Err(ValidationError::ScanLimitTooLarge { limit: self.limit, max: MAX_SCAN_LIMIT });
        }
        if let Some(after) = &self.after {
            validate_key(after)?;
        }
        Ok(())
    }
}

/// The result of a [`ScanRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanResponse {
    /// Matching records, in key order (empty for `count_only`).
    pub kvs: Vec<KeyValue>,
    /// For `count_only` scans, the number of matching keys; otherwise the number returned.
    pub count: u64,
    /// Resume token when more keys remain: pass it as `after` for the next page.
    #[serde(with = "serde_bytes")]
    pub continuation: Option<Vec<u8>>,
    /// The state machine's revision when the scan was served.
    pub revision: Revision,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_carries_over_0xff_bytes() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"a", Some(b"b")),
            (b"a\xff", Some(b"b")),
            (b"\xff\xff", None),
            (b"", None),
            (b"ab\xfe", Some(b"ab\xff")),
        ];
        for (prefix, expected) in cases {
            assert_eq!(prefix_end(prefix).as_deref(), *expected, "prefix {prefix:?}");
        }
    }

    #[test]
    fn prefix_range_contains_exactly_the_prefixed_keys() {
        bolero::check!().with_type::<(Vec<u8>, Vec<u8>)>().for_each(|(prefix, key)| {
            let range = KeyRange::prefix(prefix.clone());
            assert_eq!(range.contains(key), key.starts_with(prefix));
        });
    }

    #[test]
    fn validation_rejects_each_bound_with_its_error() {
        let big_key = vec![1u8; MAX_KEY_SIZE + 1];
        let big_value = vec![1u8; MAX_VALUE_SIZE + 1];
        let cases = [
            (WriteCommand::Put { key: vec![], value: vec![], lease: None }, ValidationError::EmptyKey),
            (
                WriteCommand::Put { key: big_key.clone(), value: vec![], lease: None },
                ValidationError::KeyTooLarge { size: MAX_KEY_SIZE + 1, max: MAX_KEY_SIZE },
            ),
            (
                WriteCommand::Put { key: b"k".to_vec(), value: big_value, lease: None },
                ValidationError::ValueTooLarge { size: MAX_VALUE_SIZE + 1, max: MAX_VALUE_SIZE },
            ),
            (WriteCommand::Batch(vec![WriteCommand::Batch(vec![])]), ValidationError::NestedBatch),
            (
                WriteCommand::Batch(vec![WriteCommand::Delete { key: b"k".to_vec() }; MAX_BATCH_SIZE + 1]),
                ValidationError::BatchTooLarge { count: MAX_BATCH_SIZE + 1, max: MAX_BATCH_SIZE },
            ),
            (
                WriteCommand::LeaseGrant { id: 0, ttl_secs: 0 },
                ValidationError::InvalidLeaseTtl { ttl_secs: 0, max: MAX_LEASE_TTL_SECS },
            ),
            (
                WriteCommand::DeleteRange { range: KeyRange::between(b"b".to_vec(), b"a".to_vec()) },
                ValidationError::InvertedRange,
            ),
        ];
        for (command, expected) in cases {
            assert_eq!(command.validate(), Err(expected));
        }
        let ok = WriteCommand::Put { key: vec![7; MAX_KEY_SIZE], value: vec![0; MAX_VALUE_SIZE], lease: None };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn scan_limit_is_bounded() {
        let mut scan = ScanRequest::prefix(b"p".to_vec(), MAX_SCAN_LIMIT);
        assert!(scan.validate().is_ok());
        scan.limit = MAX_SCAN_LIMIT + 1;
        assert_eq!(
            scan.validate(),
            Err(ValidationError::ScanLimitTooLarge { limit: MAX_SCAN_LIMIT + 1, max: MAX_SCAN_LIMIT })
        );
    }
}
