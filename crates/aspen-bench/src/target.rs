//! The operations the load generator issues, once per system: [`KvTarget`] over
//! aspen-client and over the etcd gRPC client, each doing the same thing on the wire that
//! an application would (one request per operation, no client-side batching).

use std::future::Future;

use aspen_api::{
    Compare, CompareOp, CompareTarget, GetRequest, KeyRange, ReadConsistency, ScanRequest, TxnOp, TxnOpResponse,
    TxnRequest,
};
use aspen_client::{AspenClient, ClientError};
use serde::Serialize;

use crate::etcd::{self, EtcdClient, EtcdError};

/// The systems compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// Aspen: aspen-node processes through aspen-client.
    Aspen,
    /// etcd: etcd processes through gRPC.
    Etcd,
}

impl System {
    /// The name shown in tables.
    pub fn label(self) -> &'static str {
        match self {
            System::Aspen => "Aspen",
            System::Etcd => "etcd",
        }
    }
}

/// Why one benchmark operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// aspen-client returned an error.
    #[error(transparent)]
    Aspen(#[from] ClientError),
    /// The etcd call failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The call succeeded but the answer is not what the preloaded data implies.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// No answer within the per-operation deadline.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// The result of a compare-and-swap on a key's mod revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the compare held and the put ran.
    pub succeeded: bool,
    /// The key's mod revision afterwards, as far as this client saw it.
    pub mod_revision: i64,
}

/// A key-value system under load. Implementations hold one connection; the load generator
/// spreads its clients over several.
pub trait KvTarget: Send + Sync + 'static {
    /// Writes `value` at `key` (durably, through consensus).
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> impl Future<Output = Result<(), OpError>> + Send;

    /// Reads `key`, linearizably or from the serving node's local state (stale), and fails
    /// if it is missing: every key read was preloaded.
    fn get(&self, key: Vec<u8>, linearizable: bool) -> impl Future<Output = Result<(), OpError>> + Send;

    /// Reads up to `limit` keys under `prefix` (linearizable) and returns how many came back.
    fn scan_prefix(&self, prefix: Vec<u8>, limit: u32) -> impl Future<Output = Result<usize, OpError>> + Send;

    /// The mod revision of `key`, 0 when missing.
    fn mod_revision(&self, key: Vec<u8>) -> impl Future<Output = Result<i64, OpError>> + Send;

    /// If `key`'s mod revision is `expected`, puts `value`; otherwise reads the key's
    /// current mod revision. One transaction either way.
    fn compare_and_swap(
        &self,
        key: Vec<u8>,
        expected: i64,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<CasOutcome, OpError>> + Send;
}

fn revision_i64(revision: u64) -> Result<i64, OpError> {
    i64::try_from(revision).map_err(|_| OpError::Unexpected(format!("revision {revision} above i64::MAX")))
}

impl KvTarget for AspenClient {
    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        AspenClient::put(self, key, value).await?;
        Ok(())
    }

    async fn get(&self, key: Vec<u8>, linearizable: bool) -> Result<(), OpError> {
        let consistency = if linearizable { ReadConsistency::Linearizable } else { ReadConsistency::Stale };
        match self.get_with(GetRequest { key, consistency }).await?.kv {
            Some(_) => Ok(()),
            None => Err(OpError::Unexpected("preloaded key missing".into())),
        }
    }

    async fn scan_prefix(&self, prefix: Vec<u8>, limit: u32) -> Result<usize, OpError> {
        Ok(self.scan(ScanRequest::prefix(prefix, limit)).await?.kvs.len())
    }

    async fn mod_revision(&self, key: Vec<u8>) -> Result<i64, OpError> {
        match self.get(key).await?.kv {
            Some(kv) => revision_i64(kv.mod_revision),
            None => Ok(0),
        }
    }

    async fn compare_and_swap(&self, key: Vec<u8>, expected: i64, value: Vec<u8>) -> Result<CasOutcome, OpError> {
        let expected = u64::try_from(expected).map_err(|_| OpError::Unexpected(format!("revision {expected}")))?;
        let request = TxnRequest {
            compare: vec![Compare {
                key: key.clone(),
                op: CompareOp::Equal,
                target: CompareTarget::ModRevision(expected),
            }],
            success: vec![TxnOp::Put { key: key.clone(), value, lease: None }],
            failure: vec![TxnOp::Get { key }],
        };
        let response = self.txn(request).await?;
        if response.succeeded {
            // Every write of one log entry (a batch) carries that entry's revision.
            return Ok(CasOutcome { succeeded: true, mod_revision: revision_i64(response.revision)? });
        }
        match response.responses.first() {
            Some(TxnOpResponse::Get(kv)) => Ok(CasOutcome {
                succeeded: false,
                mod_revision: kv.as_ref().map_or(Ok(0), |kv| revision_i64(kv.mod_revision))?,
            }),
            other => Err(OpError::Unexpected(format!("txn failure branch answered {other:?}"))),
        }
    }
}

/// A range request for one key, or for `[key, range_end)`.
fn range_request(key: Vec<u8>, range_end: Vec<u8>, limit: i64, serializable: bool) -> etcd::RangeRequest {
    etcd::RangeRequest { key, range_end, limit, serializable, ..Default::default() }
}

impl KvTarget for EtcdClient {
    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        EtcdClient::put(self, etcd::PutRequest { key, value, lease: 0, prev_kv: false }).await?;
        Ok(())
    }

    async fn get(&self, key: Vec<u8>, linearizable: bool) -> Result<(), OpError> {
        let response = self.range(range_request(key, Vec::new(), 0, !linearizable)).await?;
        if response.kvs.is_empty() {
            return Err(OpError::Unexpected("preloaded key missing".into()));
        }
        Ok(())
    }

    async fn scan_prefix(&self, prefix: Vec<u8>, limit: u32) -> Result<usize, OpError> {
        // Same range as Aspen's KeyRange::prefix: every key starting with `prefix`.
        let range_end = KeyRange::prefix(prefix.clone()).end.unwrap_or_else(|| vec![0]);
        let response = self.range(range_request(prefix, range_end, i64::from(limit), false)).await?;
        Ok(response.kvs.len())
    }

    async fn mod_revision(&self, key: Vec<u8>) -> Result<i64, OpError> {
        let response = self.range(range_request(key, Vec::new(), 0, false)).await?;
        Ok(response.kvs.first().map_or(0, |kv| kv.mod_revision))
    }

    async fn compare_and_swap(&self, key: Vec<u8>, expected: i64, value: Vec<u8>) -> Result<CasOutcome, OpError> {
        let request = etcd::TxnRequest {
            compare: vec![etcd::Compare {
                result: etcd::CompareResult::Equal as i32,
                target: etcd::CompareTarget::Mod as i32,
                key: key.clone(),
                operand: Some(etcd::CompareOperand::ModRevision(expected)),
            }],
            success: vec![etcd::RequestOp {
                request: Some(etcd::Request::Put(etcd::PutRequest {
                    key: key.clone(),
                    value,
                    lease: 0,
                    prev_kv: false,
                })),
            }],
            failure: vec![etcd::RequestOp {
                request: Some(etcd::Request::Range(range_request(key, Vec::new(), 0, false))),
            }],
        };
        let response = self.txn(request).await?;
        if response.succeeded {
            // The header's revision is the txn's, which is the key's new mod revision.
            let revision = response.header.map(|header| header.revision);
            let revision = revision.ok_or_else(|| OpError::Unexpected("txn response without header".into()))?;
            return Ok(CasOutcome { succeeded: true, mod_revision: revision });
        }
        match response.responses.first().and_then(|op| op.response.as_ref()) {
            Some(etcd::Response::Range(range)) => {
                Ok(CasOutcome { succeeded: false, mod_revision: range.kvs.first().map_or(0, |kv| kv.mod_revision) })
            }
            other => Err(OpError::Unexpected(format!("txn failure branch answered {other:?}"))),
        }
    }
}
