//! The reference model: a BTreeMap with revisions, written independently of the SQLite
//! state machine, following the semantics documented in aspen-api.

use std::collections::BTreeMap;

use aspen_api::limits::MAX_LEASES;
use aspen_api::{
    ApplyError, KeyRange, KeyValue, LeaseId, TxnOp, TxnOpResponse, TxnResponse, WriteCommand, WriteResponse,
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub kvs: BTreeMap<Vec<u8>, KeyValue>,
    pub leases: BTreeMap<LeaseId, u64>,
}

impl Model {
    pub fn apply(&mut self, revision: u64, command: &WriteCommand) -> Result<WriteResponse, ApplyError> {
        if let Err(error) = command.validate() {
            return Err(ApplyError::Invalid(error));
        }
        self.apply_valid(revision, command)
    }

    fn apply_valid(&mut self, revision: u64, command: &WriteCommand) -> Result<WriteResponse, ApplyError> {
        match command {
            WriteCommand::Put { key, value, lease } => {
                self.check_lease(*lease)?;
                self.put(revision, key, value, *lease);
                Ok(WriteResponse::Put { revision })
            }
            WriteCommand::Delete { key } => {
                Ok(WriteResponse::Delete { revision, deleted: u64::from(self.kvs.remove(key).is_some()) })
            }
            WriteCommand::DeleteRange { range } => {
                Ok(WriteResponse::Delete { revision, deleted: self.delete_range(range) })
            }
            WriteCommand::Txn(txn) => {
                let succeeded = txn.compare.iter().all(|compare| compare.holds(self.kvs.get(&compare.key)));
                let ops = if succeeded { &txn.success } else { &txn.failure };
                for op in ops {
                    if let TxnOp::Put { lease, .. } = op {
                        self.check_lease(*lease)?;
                    }
                }
                let responses = ops
                    .iter()
                    .map(|op| match op {
                        TxnOp::Get { key } => TxnOpResponse::Get(self.kvs.get(key).cloned()),
                        TxnOp::Put { key, value, lease } => {
                            self.put(revision, key, value, *lease);
                            TxnOpResponse::Put
                        }
                        TxnOp::Delete { key } => {
                            TxnOpResponse::Delete { deleted: u64::from(self.kvs.remove(key).is_some()) }
                        }
                        TxnOp::DeleteRange { range } => TxnOpResponse::Delete { deleted: self.delete_range(range) },
                    })
                    .collect();
                Ok(WriteResponse::Txn(TxnResponse { revision, succeeded, responses }))
            }
            WriteCommand::LeaseGrant { id, ttl_secs } => {
                if self.leases.len() as u64 >= MAX_LEASES {
                    return Err(ApplyError::TooManyLeases { max: MAX_LEASES });
                }
                let id = match *id {
                    0 if !self.leases.contains_key(&revision) => revision,
                    0 => self.leases.keys().next_back().map_or(1, |max| max + 1),
                    id if self.leases.contains_key(&id) => return Err(ApplyError::LeaseExists { id }),
                    id => id,
                };
                self.leases.insert(id, *ttl_secs);
                Ok(WriteResponse::LeaseGrant { revision, id, ttl_secs: *ttl_secs })
            }
            WriteCommand::LeaseRevoke { id } => {
                if self.leases.remove(id).is_none() {
                    return Err(ApplyError::LeaseNotFound { id: *id });
                }
                let before = self.kvs.len();
                self.kvs.retain(|_, kv| kv.lease != Some(*id));
                Ok(WriteResponse::LeaseRevoke { revision, deleted: (before - self.kvs.len()) as u64 })
            }
            WriteCommand::Batch(commands) => {
                Ok(WriteResponse::Batch(commands.iter().map(|command| self.apply_valid(revision, command)).collect()))
            }
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), ApplyError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(ApplyError::LeaseNotFound { id }),
            _ => Ok(()),
        }
    }

    fn put(&mut self, revision: u64, key: &[u8], value: &[u8], lease: Option<LeaseId>) {
        let (create_revision, version) = match self.kvs.get(key) {
            Some(existing) => (existing.create_revision, existing.version + 1),
            None => (revision, 1),
        };
        self.kvs.insert(
            key.to_vec(),
            KeyValue {
                key: key.to_vec(),
                value: value.to_vec(),
                create_revision,
                mod_revision: revision,
                version,
                lease,
            },
        );
    }

    fn delete_range(&mut self, range: &KeyRange) -> u64 {
        let before = self.kvs.len();
        self.kvs.retain(|key, _| !range.contains(key));
        (before - self.kvs.len()) as u64
    }
}
