//! Simulated clients: put, linearizable get, delete, compare-and-set and scan over a few
//! shared keys, made by aspen-client's own [`Client`] (its retries, redirects, leader
//! tracking, write sessions and client-confirmed reads) over the simulated network
//! ([`SimConnector`]), every operation recorded with its simulated call and return times for
//! the linearizability checker. A write the client reports as `OutcomeUnknown` is recorded
//! as unknown; any other error is taken at its word (not applied), so a client that lies
//! about an outcome is caught by the checker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aspen_api::{
    ClientRequest, ClientResponse, Compare, CompareOp, CompareTarget, GetRequest, KeyRange, KvError, NodeId,
    ReadConsistency, ScanRequest, ScanResponse, TxnOp, TxnRequest, WriteCommand,
};
use aspen_checker::{Input, Operation, Output};
use aspen_client::{Client, ClientConnector, ClientError, NodeUnreachable, Reachability};

use crate::history::{History, Trace};
use crate::net::{self, CLIENT_TAG, Delivery, NetFaults};

/// Deadline of one attempt; past it the outcome is unknown.
pub const CLIENT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long one operation keeps retrying (simulated time).
pub const CLIENT_RETRY_DEADLINE: Duration = Duration::from_secs(10);

/// Client requests over the simulated network: one datagram exchange per request, no
/// connections. Writes that carry an identity may be delivered twice (the `duplicate`
/// fault): the state machine applies them at most once.
pub struct SimConnector {
    faults: Arc<NetFaults>,
}

fn unreachable(peer: &SocketAddr, reason: String, before_send: bool) -> ClientError {
    ClientError::Unreachable(NodeUnreachable { message: format!("{peer}: {reason}"), reason, before_send })
}

impl ClientConnector for SimConnector {
    type Peer = SocketAddr;

    async fn call(&self, peer: &SocketAddr, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        let delivery = match &request {
            ClientRequest::Write(write) if write.id.is_some() => Delivery::AtLeastOnce,
            _ => Delivery::AtMostOnce,
        };
        let bytes = postcard::to_stdvec(&request).map_err(|error| ClientError::Rejected(format!("encode: {error}")))?;
        let reply = net::request(&self.faults, *peer, CLIENT_TAG, bytes, CLIENT_ATTEMPT_TIMEOUT, delivery)
            .await
            .map_err(|error| unreachable(peer, error.to_string(), error.is_before_send()))?;
        postcard::from_bytes(&reply).map_err(|error| unreachable(peer, format!("undecodable reply: {error}"), false))
    }

    async fn connect(&self, _peer: &SocketAddr) -> Result<(), ClientError> {
        Ok(())
    }

    /// Connectionless: every call goes out at once.
    fn reachability(&self, _peer: &SocketAddr) -> Reachability {
        Reachability::Connected
    }

    async fn close(&self) {}
}

/// aspen-client over the simulated network.
type SimAspenClient = Client<SimConnector>;

/// One simulated client.
pub struct SimClient {
    /// Client number (also the checker's client id).
    pub index: usize,
    /// Node ids the client knows.
    pub nodes: Vec<NodeId>,
    /// Network faults of the run.
    pub faults: Arc<NetFaults>,
    /// Where operations are recorded.
    pub history: History,
    /// The run's trace.
    pub trace: Trace,
    /// Keys to use.
    pub keys: usize,
    seq: u64,
}

fn now_ns() -> u64 {
    madsim::time::TimeHandle::current().elapsed().as_nanos() as u64
}

fn key_name(index: usize) -> Vec<u8> {
    format!("k{index}").into_bytes()
}

/// The two clients one simulated user runs: the default (client-confirmed linearizable
/// reads, falling back to ReadIndex) and one with confirmed reads off (every linearizable
/// read a ReadIndex round on the node it reaches).
struct Clients {
    confirming: SimAspenClient,
    read_index: SimAspenClient,
}

impl SimClient {
    /// A client over `nodes`.
    pub fn new(
        index: usize,
        nodes: Vec<NodeId>,
        faults: Arc<NetFaults>,
        history: History,
        trace: Trace,
        keys: usize,
    ) -> Self {
        SimClient { index, nodes, faults, history, trace, keys, seq: 0 }
    }

    /// A fresh aspen-client (a new session, nothing known about the leader) whose node list
    /// starts at `first`, as a user who just connected through that node; `confirmed`:
    /// client-confirmed linearizable reads.
    async fn open(&self, first: usize, confirmed: bool) -> Option<SimAspenClient> {
        let mut peers: Vec<SocketAddr> = self.nodes.iter().map(|id| net::node_addr(*id)).collect();
        let count = peers.len().max(1);
        peers.rotate_left(first % count);
        let connector = SimConnector { faults: Arc::clone(&self.faults) };
        let client = Client::new(connector, peers).await.ok()?;
        Some(client.with_retry_deadline(CLIENT_RETRY_DEADLINE).with_confirmed_reads(confirmed))
    }

    /// Runs random operations until `until` (simulated time since start).
    pub async fn run(mut self, until: Duration) {
        let (Some(confirming), Some(read_index)) = (self.open(0, true).await, self.open(0, false).await) else {
            return self.note("cannot create a client");
        };
        let mut clients = Clients { confirming, read_index };
        while madsim::time::TimeHandle::current().elapsed() < until {
            // The plain reader often reconnects through a random node, as a client that just
            // connected would: its reads then land on followers too.
            if madsim::rand::random::<u64>().is_multiple_of(4)
                && let Some(fresh) = self.open(madsim::rand::random::<usize>(), false).await
            {
                clients.read_index = fresh;
            }
            // The main client seldom does (a new session, the leader to learn again): most of
            // the time it keeps what it learned, as a long-lived client does, and so meets
            // the leaders it cached being deposed.
            if madsim::rand::random::<u64>().is_multiple_of(32)
                && let Some(fresh) = self.open(madsim::rand::random::<usize>(), true).await
            {
                clients.confirming = fresh;
            }
            self.one_operation(&clients).await;
            let pause = madsim::rand::random::<u64>() % 20;
            madsim::time::sleep(Duration::from_millis(pause)).await;
        }
        let paths = clients.confirming.read_paths();
        self.note(&format!("last client's reads: {} confirmed, {} ReadIndex", paths.confirmed, paths.read_index));
    }

    /// After healing: one put that must be acknowledged before `deadline`. Recorded like any
    /// other write.
    pub async fn probe_write(mut self, deadline: Duration) -> bool {
        let start = madsim::time::Instant::now();
        let Some(client) = self.open(0, true).await else {
            self.note("cannot create a client");
            return false;
        };
        while start.elapsed() < deadline {
            self.seq += 1;
            let key = key_name(0);
            let value = format!("probe-{}", self.seq).into_bytes();
            let call = now_ns();
            match client.put(key.clone(), value.clone()).await {
                Ok(_) => {
                    self.record(key, call, Input::Put(value), Some(Output::Ok));
                    return true;
                }
                Err(error) => self.write_failed(key, call, Input::Put(value), &error),
            }
        }
        false
    }

    async fn one_operation(&mut self, clients: &Clients) {
        let key = key_name(madsim::rand::random::<usize>() % self.keys);
        self.seq += 1;
        let value = format!("c{}-{}", self.index, self.seq).into_bytes();
        match madsim::rand::random::<u64>() % 10 {
            0..=2 => {
                let write = WriteCommand::Put { key: key.clone(), value: value.clone(), lease: None };
                self.write(&clients.confirming, key, Input::Put(value), write).await;
            }
            3 => {
                let write = WriteCommand::Delete { key: key.clone() };
                self.write(&clients.confirming, key, Input::Delete, write).await;
            }
            4 | 5 => self.compare_and_set(clients, key, value).await,
            6 => self.get(&clients.read_index, key).await,
            7 | 8 => self.get(&clients.confirming, key).await,
            // Half the scans are client-confirmed (ADR 0004), the others ReadIndex on the node.
            _ if madsim::rand::random::<bool>() => self.scan(&clients.confirming).await,
            _ => self.scan(&clients.read_index).await,
        }
    }

    fn note(&self, message: &str) {
        self.trace.event(crate::cluster::now_ms(), format!("client {}: {message}", self.index));
    }

    fn record(&self, key: Vec<u8>, call: u64, input: Input, output: Option<Output>) {
        let ret = output.as_ref().map(|_| now_ns());
        let op = Operation { client: self.index as u64, key, call, ret, input, output };
        self.note(&op.to_string());
        self.history.record(op);
    }

    /// A write that failed: recorded as unknown when the client says its outcome is,
    /// else not recorded (the client says it was not applied).
    fn write_failed(&self, key: Vec<u8>, call: u64, input: Input, error: &ClientError) {
        if let ClientError::Kv(KvError::OutcomeUnknown(reason)) = error {
            self.note(&format!("outcome unknown: {reason}"));
            self.record(key, call, input, None);
        } else {
            self.note(&format!("not applied: {error}"));
        }
    }

    async fn write(&self, client: &SimAspenClient, key: Vec<u8>, input: Input, command: WriteCommand) {
        let call = now_ns();
        match client.write(command).await {
            Ok(_) => self.record(key, call, input, Some(Output::Ok)),
            Err(error) => self.write_failed(key, call, input, &error),
        }
    }

    async fn compare_and_set(&self, clients: &Clients, key: Vec<u8>, new: Vec<u8>) {
        // Expect what a read says now, so the CAS often succeeds. The read is history too.
        let call = now_ns();
        let expected = match clients.confirming.get_with(get(&key)).await {
            Ok(response) => response.kv.map(|kv| kv.value),
            Err(error) => return self.note(&format!("read failed: {error}")),
        };
        self.record(key.clone(), call, Input::Get, Some(Output::Value(expected.clone())));
        let compare = match &expected {
            Some(value) => {
                Compare { key: key.clone(), op: CompareOp::Equal, target: CompareTarget::Value(value.clone()) }
            }
            None => Compare { key: key.clone(), op: CompareOp::Equal, target: CompareTarget::Version(0) },
        };
        let txn = TxnRequest {
            compare: vec![compare],
            success: vec![TxnOp::Put { key: key.clone(), value: new.clone(), lease: None }],
            failure: vec![],
        };
        let input = Input::Cas { expected, new: Some(new) };
        let call = now_ns();
        match clients.confirming.txn(txn).await {
            Ok(response) => self.record(key, call, input, Some(Output::CasResult(response.succeeded))),
            Err(error) => self.write_failed(key, call, input, &error),
        }
    }

    async fn get(&self, client: &SimAspenClient, key: Vec<u8>) {
        let call = now_ns();
        match client.get_with(get(&key)).await {
            Ok(response) => self.record(key, call, Input::Get, Some(Output::Value(response.kv.map(|kv| kv.value)))),
            Err(error) => self.note(&format!("read failed: {error}")),
        }
    }

    /// A linearizable scan of every key: recorded as one read per key at the same interval
    /// (each key's value must be linearizable on its own).
    async fn scan(&self, client: &SimAspenClient) {
        let request = ScanRequest {
            range: KeyRange { start: b"k".to_vec(), end: Some(b"l".to_vec()) },
            limit: 0,
            keys_only: false,
            count_only: false,
            after: None,
            consistency: ReadConsistency::Linearizable,
        };
        let call = now_ns();
        let response: ScanResponse = match client.scan(request).await {
            Ok(response) => response,
            Err(error) => return self.note(&format!("scan failed: {error}")),
        };
        for index in 0..self.keys {
            let key = key_name(index);
            let value = response.kvs.iter().find(|kv| kv.key == key).map(|kv| kv.value.clone());
            self.record(key, call, Input::Get, Some(Output::Value(value)));
        }
    }
}

fn get(key: &[u8]) -> GetRequest {
    GetRequest { key: key.to_vec(), consistency: ReadConsistency::Linearizable }
}
