//! A minimal etcd v3 gRPC client: the few messages the benchmark sends, written by hand as
//! prost structs with the field numbers of etcd's `rpc.proto` and `kv.proto` (packages
//! `etcdserverpb` and `mvccpb`), called through tonic's generic unary client. Hand-written
//! so the workspace builds without `protoc`; fields the benchmark never sets are left out
//! (proto3 decoders skip unknown fields, and an absent field reads as its default).

use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// How long connecting to an etcd member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The endpoint URL is invalid or the connection failed.
    #[error("cannot connect to etcd at {endpoint}: {source}")]
    Connect {
        /// The endpoint URL.
        endpoint: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The call failed (transport or an error status from etcd).
    #[error("etcd call {method} failed: {status}")]
    Call {
        /// The gRPC method path.
        method: &'static str,
        /// The status etcd or the transport returned.
        status: Box<tonic::Status>,
    },
}

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// ID of the cluster that sent the response.
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    /// ID of the member that sent the response.
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    /// The key-value store revision when the request was applied.
    #[prost(int64, tag = "3")]
    pub revision: i64,
    /// The raft term when the request was applied.
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// `mvccpb.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Revision of the last creation of the key.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// Revision of the last modification of the key.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// Number of modifications since creation.
    #[prost(int64, tag = "4")]
    pub version: i64,
    /// The value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// Attached lease, 0 for none.
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// `etcdserverpb.RangeRequest` (without sorting and revision filters).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    /// First key of the range.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// First key past the range; empty for the single key `key`.
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    /// Most keys returned, 0 for no limit.
    #[prost(int64, tag = "3")]
    pub limit: i64,
    /// Read as of this revision, 0 for the latest.
    #[prost(int64, tag = "4")]
    pub revision: i64,
    /// Serve from the local member without a quorum round (stale reads allowed).
    #[prost(bool, tag = "7")]
    pub serializable: bool,
    /// Return keys without values.
    #[prost(bool, tag = "8")]
    pub keys_only: bool,
    /// Return only the count.
    #[prost(bool, tag = "9")]
    pub count_only: bool,
}

/// `etcdserverpb.RangeResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    /// Response header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The records found.
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    /// Whether more keys remain past the limit.
    #[prost(bool, tag = "3")]
    pub more: bool,
    /// Number of keys in the range.
    #[prost(int64, tag = "4")]
    pub count: i64,
}

/// `etcdserverpb.PutRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    /// Lease to attach, 0 for none.
    #[prost(int64, tag = "3")]
    pub lease: i64,
    /// Return the previous record.
    #[prost(bool, tag = "4")]
    pub prev_kv: bool,
}

/// `etcdserverpb.PutResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    /// Response header; its revision is the put's.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The previous record, when asked for.
    #[prost(message, optional, tag = "2")]
    pub prev_kv: Option<KeyValue>,
}

/// `etcdserverpb.Compare.CompareResult`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CompareResult {
    /// Stored == operand.
    Equal = 0,
    /// Stored > operand.
    Greater = 1,
    /// Stored < operand.
    Less = 2,
    /// Stored != operand.
    NotEqual = 3,
}

/// `etcdserverpb.Compare.CompareTarget`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CompareTarget {
    /// The key's version.
    Version = 0,
    /// The key's create revision.
    Create = 1,
    /// The key's mod revision.
    Mod = 2,
    /// The value.
    Value = 3,
    /// The attached lease.
    Lease = 4,
}

/// The operand of a `Compare` (`oneof target_union`).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum CompareOperand {
    /// Compared with the key's version.
    #[prost(int64, tag = "4")]
    Version(i64),
    /// Compared with the key's create revision.
    #[prost(int64, tag = "5")]
    CreateRevision(i64),
    /// Compared with the key's mod revision.
    #[prost(int64, tag = "6")]
    ModRevision(i64),
    /// Compared with the value.
    #[prost(bytes = "vec", tag = "7")]
    Value(Vec<u8>),
    /// Compared with the attached lease.
    #[prost(int64, tag = "8")]
    Lease(i64),
}

/// `etcdserverpb.Compare` (single key; `range_end` left out).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Compare {
    /// The relation that must hold.
    #[prost(enumeration = "CompareResult", tag = "1")]
    pub result: i32,
    /// The field compared.
    #[prost(enumeration = "CompareTarget", tag = "2")]
    pub target: i32,
    /// The key compared.
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    /// The operand, matching `target`.
    #[prost(oneof = "CompareOperand", tags = "4, 5, 6, 7, 8")]
    pub operand: Option<CompareOperand>,
}

/// The operation of a `RequestOp` (`oneof request`; deletes and nested txns left out).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    /// A range read.
    #[prost(message, tag = "1")]
    Range(RangeRequest),
    /// A put.
    #[prost(message, tag = "2")]
    Put(PutRequest),
}

/// `etcdserverpb.RequestOp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestOp {
    /// The operation.
    #[prost(oneof = "Request", tags = "1, 2")]
    pub request: Option<Request>,
}

/// The result of a `ResponseOp` (`oneof response`; others decode as `None`).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    /// What a range read found.
    #[prost(message, tag = "1")]
    Range(RangeResponse),
    /// A put's result.
    #[prost(message, tag = "2")]
    Put(PutResponse),
}

/// `etcdserverpb.ResponseOp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseOp {
    /// The result.
    #[prost(oneof = "Response", tags = "1, 2")]
    pub response: Option<Response>,
}

/// `etcdserverpb.TxnRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnRequest {
    /// Guards, all of which must hold for `success` to run.
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    /// Operations run when every compare holds.
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
    /// Operations run otherwise.
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<RequestOp>,
}

/// `etcdserverpb.TxnResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnResponse {
    /// Response header; its revision is the txn's.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Whether every compare held.
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
    /// One result per op of the branch that ran.
    #[prost(message, repeated, tag = "3")]
    pub responses: Vec<ResponseOp>,
}

/// `etcdserverpb.StatusRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

/// `etcdserverpb.StatusResponse` (the fields the benchmark reads).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    /// Response header; `member_id` is the answering member.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The server's version.
    #[prost(string, tag = "2")]
    pub version: String,
    /// Size of the backend database, bytes.
    #[prost(int64, tag = "3")]
    pub db_size: i64,
    /// Member id of the current leader, 0 if none.
    #[prost(uint64, tag = "4")]
    pub leader: u64,
}

const PUT: &str = "/etcdserverpb.KV/Put";
const RANGE: &str = "/etcdserverpb.KV/Range";
const TXN: &str = "/etcdserverpb.KV/Txn";
const STATUS: &str = "/etcdserverpb.Maintenance/Status";

/// One HTTP/2 connection to one etcd member; clones share it.
#[derive(Clone)]
pub struct EtcdClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl EtcdClient {
    /// Connects to `endpoint` (`http://host:port`).
    pub async fn connect(endpoint: &str) -> Result<Self, EtcdError> {
        let connect_error = |source| EtcdError::Connect { endpoint: endpoint.to_string(), source };
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(connect_error)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(connect_error)?;
        Ok(EtcdClient { grpc: tonic::client::Grpc::new(channel) })
    }

    async fn unary<Req, Resp>(&self, method: &'static str, request: Req) -> Result<Resp, EtcdError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let failed = |status| EtcdError::Call { method, status: Box::new(status) };
        let mut grpc = self.grpc.clone();
        grpc.ready().await.map_err(|error| failed(tonic::Status::unavailable(error.to_string())))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let response =
            grpc.unary(tonic::Request::new(request), PathAndQuery::from_static(method), codec).await.map_err(failed)?;
        Ok(response.into_inner())
    }

    /// `KV/Put`.
    pub async fn put(&self, request: PutRequest) -> Result<PutResponse, EtcdError> {
        self.unary(PUT, request).await
    }

    /// `KV/Range`.
    pub async fn range(&self, request: RangeRequest) -> Result<RangeResponse, EtcdError> {
        self.unary(RANGE, request).await
    }

    /// `KV/Txn`.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, EtcdError> {
        self.unary(TXN, request).await
    }

    /// `Maintenance/Status` of the member this client is connected to.
    pub async fn status(&self) -> Result<StatusResponse, EtcdError> {
        self.unary(STATUS, StatusRequest {}).await
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn requests_encode_to_the_bytes_etcd_expects() {
        // Field keys are (number << 3) | wire type; wire type 2 is length-delimited, 0 varint.
        let put = PutRequest { key: b"k".to_vec(), value: b"vv".to_vec(), lease: 0, prev_kv: false };
        assert_eq!(put.encode_to_vec(), [0x0a, 1, b'k', 0x12, 2, b'v', b'v']);

        let range =
            RangeRequest { key: b"a".to_vec(), range_end: b"b".to_vec(), serializable: true, ..Default::default() };
        assert_eq!(range.encode_to_vec(), [0x0a, 1, b'a', 0x12, 1, b'b', 0x38, 1]);

        // result EQUAL is the proto3 default and is omitted; a oneof member is always sent.
        let compare = Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: b"k".to_vec(),
            operand: Some(CompareOperand::ModRevision(0)),
        };
        assert_eq!(compare.encode_to_vec(), [0x10, 2, 0x1a, 1, b'k', 0x30, 0]);

        let txn = TxnRequest {
            compare: vec![compare],
            success: vec![RequestOp { request: Some(Request::Put(put)) }],
            failure: vec![RequestOp {
                request: Some(Request::Range(RangeRequest { key: b"k".to_vec(), ..Default::default() })),
            }],
        };
        let expected: &[u8] = &[
            0x0a, 7, 0x10, 2, 0x1a, 1, b'k', 0x30, 0, // compare
            0x12, 9, 0x12, 7, 0x0a, 1, b'k', 0x12, 2, b'v', b'v', // success: RequestOp { request_put }
            0x1a, 5, 0x0a, 3, 0x0a, 1, b'k', // failure: RequestOp { request_range }
        ];
        assert_eq!(txn.encode_to_vec(), expected);
    }

    #[test]
    fn responses_decode_from_known_bytes() {
        let bytes: &[u8] = &[
            0x0a, 4, 0x10, 9, 0x18, 42, // header { member_id: 9, revision: 42 }
            0x12, 10, 0x0a, 1, b'k', 0x18, 41, 0x20, 3, 0x2a, 1, b'v', // kvs[0]
            0x20, 1, // count: 1
            0x28, 5, // field 5 is not ours: skipped
        ];
        let response = RangeResponse::decode(bytes).expect("decodes");
        assert_eq!(response.header.as_ref().map(|header| (header.member_id, header.revision)), Some((9, 42)));
        assert_eq!(response.count, 1);
        assert_eq!(response.kvs.len(), 1);
        assert_eq!(response.kvs[0].key, b"k");
        assert_eq!(response.kvs[0].value, b"v");
        assert_eq!(response.kvs[0].mod_revision, 41);
        assert_eq!(response.kvs[0].version, 3);

        let txn = TxnResponse::decode(&[0x10, 1, 0x1a, 4, 0x12, 2, 0x0a, 0][..]).expect("decodes");
        assert!(txn.succeeded);
        assert_eq!(
            txn.responses,
            [ResponseOp {
                response: Some(Response::Put(PutResponse { header: Some(ResponseHeader::default()), prev_kv: None }))
            }]
        );

        assert!(RangeResponse::decode(&[0x12, 50, 0x0a][..]).is_err(), "truncated input is an error");
    }
}
