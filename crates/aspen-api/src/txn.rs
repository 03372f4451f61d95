//! Multi-key transactions: compares over several keys, then the success or the failure
//! branch, applied atomically as one Raft entry (etcd's `Txn`).

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::kv::{KeyRange, KeyValue, LeaseId, Revision, validate_key, validate_lease_id, validate_value};
use crate::limits::{MAX_TXN_COMPARES, MAX_TXN_OPS};

/// How a compare relates the stored field to the given operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    /// Stored == operand.
    Equal,
    /// Stored != operand.
    NotEqual,
    /// Stored < operand.
    Less,
    /// Stored > operand.
    Greater,
}

/// The field of a key a compare looks at, with the operand.
///
/// A missing key has version, create_revision and mod_revision 0; a value compare on a
/// missing key is always false (as in etcd: a missing value is not an empty value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The value bytes, compared lexicographically.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The key's version.
    Version(u64),
    /// The key's create revision.
    CreateRevision(Revision),
    /// The key's mod revision.
    ModRevision(Revision),
}

/// One guard of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// Key whose record is compared.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Relation between the stored field and the operand.
    pub op: CompareOp,
    /// Field and operand.
    pub target: CompareTarget,
}

impl Compare {
    /// Evaluates the compare against the stored record (`None` when the key is missing).
    pub fn holds(&self, stored: Option<&KeyValue>) -> bool {
        let ordering = match (&self.target, stored) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(operand), Some(kv)) => kv.value.as_slice().cmp(operand.as_slice()),
            (CompareTarget::Version(operand), kv) => kv.map_or(0, |kv| kv.version).cmp(operand),
            (CompareTarget::CreateRevision(operand), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(operand),
            (CompareTarget::ModRevision(operand), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(operand),
        };
        match self.op {
            CompareOp::Equal => ordering.is_eq(),
            CompareOp::NotEqual => ordering.is_ne(),
            CompareOp::Less => ordering.is_lt(),
            CompareOp::Greater => ordering.is_gt(),
        }
    }
}

/// An operation inside a transaction branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Read one key as of the transaction's point in the history.
    Get {
        /// Key to read.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Write one key.
    Put {
        /// Key to write.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// New value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Lease to attach the key to.
        lease: Option<LeaseId>,
    },
    /// Remove one key.
    Delete {
        /// Key to remove.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Remove every key in a range.
    DeleteRange {
        /// Keys to remove.
        range: KeyRange,
    },
}

/// The result of one [`TxnOp`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOpResponse {
    /// What a `Get` read.
    Get(Option<KeyValue>),
    /// A `Put` was applied.
    Put,
    /// A delete removed this many keys.
    Delete {
        /// Keys removed.
        deleted: u64,
    },
}

/// Compare, then run `success` if every compare holds and `failure` otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    /// Guards, all of which must hold for `success` to run.
    pub compare: Vec<Compare>,
    /// Operations run when every compare holds.
    pub success: Vec<TxnOp>,
    /// Operations run otherwise.
    pub failure: Vec<TxnOp>,
}

impl TxnRequest {
    /// Checks the number of compares and ops and every key and value in them.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.compare.len() > MAX_TXN_COMPARES {
            return Err(ValidationError::TooManyCompares { count: self.compare.len(), max: MAX_TXN_COMPARES });
        }
        for branch in [&self.success, &self.failure] {
            if branch.len() > MAX_TXN_OPS {
                return Err(ValidationError::TooManyTxnOps { count: branch.len(), max: MAX_TXN_OPS });
            }
        }
        for compare in &self.compare {
            validate_key(&compare.key)?;
            if let CompareTarget::Value(value) = &compare.target {
                validate_value(value)?;
            }
        }
        for op in self.success.iter().chain(&self.failure) {
            match op {
                TxnOp::Get { key } | TxnOp::Delete { key } => validate_key(key)?,
                TxnOp::Put { key, value, lease } => {
                    validate_key(key)?;
                    validate_value(value)?;
                    if let Some(lease) = lease {
                        validate_lease_id(*lease)?;
                    }
                }
                TxnOp::DeleteRange { range } => range.validate()?,
            }
        }
        Ok(())
    }
}

/// The result of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Revision of the entry that applied the transaction.
    pub revision: Revision,
    /// Whether every compare held (so `success` ran).
    pub succeeded: bool,
    /// One response per op of the branch that ran.
    pub responses: Vec<TxnOpResponse>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(value: &[u8], version: u64) -> KeyValue {
        KeyValue {
            key: b"k".to_vec(),
            value: value.to_vec(),
            create_revision: 3,
            mod_revision: 7,
            version,
            lease: None,
        }
    }

    #[test]
    fn compares_follow_etcd_semantics() {
        let stored = kv(b"b", 2);
        let cases = [
            (CompareOp::Equal, CompareTarget::Value(b"b".to_vec()), Some(&stored), true),
            (CompareOp::Less, CompareTarget::Value(b"c".to_vec()), Some(&stored), true),
            (CompareOp::Greater, CompareTarget::Value(b"c".to_vec()), Some(&stored), false),
            (CompareOp::NotEqual, CompareTarget::Value(b"b".to_vec()), None, false),
            (CompareOp::Equal, CompareTarget::Value(vec![]), None, false),
            (CompareOp::Equal, CompareTarget::Version(0), None, true),
            (CompareOp::Equal, CompareTarget::Version(2), Some(&stored), true),
            (CompareOp::Greater, CompareTarget::CreateRevision(2), Some(&stored), true),
            (CompareOp::Less, CompareTarget::ModRevision(7), Some(&stored), false),
            (CompareOp::Equal, CompareTarget::ModRevision(0), None, true),
        ];
        for (op, target, stored, expected) in cases {
            let compare = Compare { key: b"k".to_vec(), op, target: target.clone() };
            assert_eq!(compare.holds(stored), expected, "{op:?} {target:?} on {stored:?}");
        }
    }

    #[test]
    fn txn_with_too_many_ops_is_rejected() {
        let ops = vec![TxnOp::Delete { key: b"k".to_vec() }; MAX_TXN_OPS + 1];
        let txn = TxnRequest { compare: vec![], success: vec![], failure: ops };
        assert_eq!(txn.validate(), Err(ValidationError::TooManyTxnOps { count: MAX_TXN_OPS + 1, max: MAX_TXN_OPS }));
    }
}
