//! Simulated clients: put, linearizable get, delete, compare-and-set and scan over a few
//! shared keys, through aspen-client's retry policy (`aspen_api::retry`) and its write
//! sessions (`aspen_api::session`: every write carries an identity and is resent until
//! answered), every operation recorded with its simulated call and return times for the
//! linearizability checker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aspen_api::retry::{self, AttemptFailure, RETRY_PAUSE, RetryAction};
use aspen_api::session::{ClientSession, SessionId};
use aspen_api::{
    ClientRequest, ClientResponse, ClientWrite, Compare, CompareOp, CompareTarget, GetRequest, KeyRange, KvError,
    NodeId, ReadConsistency, ScanRequest, Stamped, TermReply, TxnOp, TxnRequest, WriteCommand, WriteResponse,
};
use aspen_checker::{Input, Operation, Output};

use crate::history::{History, Trace};
use crate::net::{self, CLIENT_TAG, Delivery, NetFaults};

/// Deadline of one attempt; past it the outcome is unknown.
pub const CLIENT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long one operation keeps retrying (simulated time).
pub const CLIENT_RETRY_DEADLINE: Duration = Duration::from_secs(10);

/// How an operation ended.
enum CallResult {
    /// A reply.
    Done(ClientResponse),
    /// Certainly not applied.
    Failed(String),
    /// May or may not have been applied.
    Unknown(String),
}

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
    preferred: usize,
    /// The leader whose stamp was last confirmed: confirmed gets go there, as aspen-client's
    /// cached read quorum does, until one is not confirmed.
    stamp_leader: Option<NodeId>,
    seq: u64,
    /// The client's write session, numbered as aspen-client numbers its writes.
    session: ClientSession,
}

fn new_session() -> ClientSession {
    let high = u128::from(madsim::rand::random::<u64>());
    ClientSession::new(SessionId(high << 64 | u128::from(madsim::rand::random::<u64>())))
}

fn now_ns() -> u64 {
    madsim::time::TimeHandle::current().elapsed().as_nanos() as u64
}

fn key_name(index: usize) -> Vec<u8> {
    format!("k{index}").into_bytes()
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
        SimClient {
            index,
            nodes,
            faults,
            history,
            trace,
            keys,
            preferred: 0,
            stamp_leader: None,
            seq: 0,
            session: new_session(),
        }
    }

    /// Runs random operations until `until` (simulated time since start).
    pub async fn run(mut self, until: Duration) {
        while madsim::time::TimeHandle::current().elapsed() < until {
            self.one_operation().await;
            let pause = madsim::rand::random::<u64>() % 20;
            madsim::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// After healing: one put that must be acknowledged before `deadline`. Recorded like any
    /// other write.
    pub async fn probe_write(mut self, deadline: Duration) -> bool {
        let start = madsim::time::Instant::now();
        while start.elapsed() < deadline {
            self.seq += 1;
            let key = key_name(0);
            let value = format!("probe-{}", self.seq).into_bytes();
            let call = now_ns();
            let command = WriteCommand::Put { key: key.clone(), value: value.clone(), lease: None };
            match self.send_write(command).await {
                CallResult::Done(ClientResponse::Write(Ok(_))) => {
                    self.record(key, call, Input::Put(value), Some(Output::Ok));
                    return true;
                }
                CallResult::Unknown(_) => self.record(key, call, Input::Put(value), None),
                _ => {}
            }
        }
        false
    }

    async fn one_operation(&mut self) {
        let key = key_name(madsim::rand::random::<usize>() % self.keys);
        self.seq += 1;
        let value = format!("c{}-{}", self.index, self.seq).into_bytes();
        // Sometimes start at a random node, as a client that just connected would: reads
        // then land on followers too.
        if madsim::rand::random::<u64>().is_multiple_of(4) {
            self.preferred = madsim::rand::random::<usize>() % self.nodes.len();
        }
        match madsim::rand::random::<u64>() % 10 {
            0..=2 => {
                let write = WriteCommand::Put { key: key.clone(), value: value.clone(), lease: None };
                self.write(key, Input::Put(value), write).await;
            }
            3 => {
                let write = WriteCommand::Delete { key: key.clone() };
                self.write(key, Input::Delete, write).await;
            }
            4 | 5 => self.compare_and_set(key, value).await,
            6 => self.get(key).await,
            7 | 8 => self.confirmed_get(key).await,
            _ => self.scan().await,
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

    /// Sends a write with a new identity of this client's session, resending it (as
    /// aspen-client does) until it is answered or the retry deadline passes.
    async fn send_write(&mut self, command: WriteCommand) -> CallResult {
        let id = match self.session.begin() {
            Some(id) => id,
            None => {
                self.session = new_session();
                match self.session.begin() {
                    Some(id) => id,
                    None => return CallResult::Failed("a new session has no room".into()),
                }
            }
        };
        let result = self.call(ClientRequest::Write(ClientWrite { id: Some(id), command }), true).await;
        self.session.finish(id);
        result
    }

    async fn write(&mut self, key: Vec<u8>, input: Input, command: WriteCommand) {
        let call = now_ns();
        match self.send_write(command).await {
            CallResult::Done(ClientResponse::Write(Ok(_))) => self.record(key, call, input, Some(Output::Ok)),
            CallResult::Unknown(reason) => {
                self.note(&format!("write outcome unknown: {reason}"));
                self.record(key, call, input, None)
            }
            CallResult::Failed(reason) => self.note(&format!("write not applied: {reason}")),
            CallResult::Done(response) => self.note(&format!("write refused: {response:?}")),
        }
    }

    async fn compare_and_set(&mut self, key: Vec<u8>, new: Vec<u8>) {
        // Expect what a read says now, so the CAS often succeeds. The read is history too.
        let call = now_ns();
        let expected = match self.call(ClientRequest::Get(get(&key)), true).await {
            CallResult::Done(ClientResponse::Get(Ok(response))) => response.kv.map(|kv| kv.value),
            _ => return,
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
        match self.send_write(WriteCommand::Txn(txn)).await {
            CallResult::Done(ClientResponse::Write(Ok(WriteResponse::Txn(response)))) => {
                self.record(key, call, input, Some(Output::CasResult(response.succeeded)))
            }
            CallResult::Unknown(reason) => {
                self.note(&format!("cas outcome unknown: {reason}"));
                self.record(key, call, input, None)
            }
            CallResult::Failed(reason) => self.note(&format!("cas not applied: {reason}")),
            CallResult::Done(response) => self.note(&format!("cas refused: {response:?}")),
        }
    }

    async fn get(&mut self, key: Vec<u8>) {
        let call = now_ns();
        if let CallResult::Done(ClientResponse::Get(Ok(response))) =
            self.call(ClientRequest::Get(get(&key)), true).await
        {
            self.record(key, call, Input::Get, Some(Output::Value(response.kv.map(|kv| kv.value))));
        }
    }

    /// A client-confirmed linearizable get (ADR 0004).
    async fn confirmed_get(&mut self, key: Vec<u8>) {
        let call = now_ns();
        if let Some(response) =
            self.confirmed(ClientRequest::StampedGet(get(&key)), ClientResponse::into_stamped_get).await
        {
            self.record(key, call, Input::Get, Some(Output::Value(response.kv.map(|kv| kv.value))));
        }
    }

    /// A client-confirmed read as aspen-client makes it: the stamped read at the last
    /// confirmed leader (else the preferred node) and, sent at the same time, a term check
    /// at every other node. The response only when the voters confirm the stamp (or the
    /// node ran a ReadIndex round itself and sent none); else the client would retry the
    /// slow way.
    async fn confirmed<T>(
        &mut self,
        request: ClientRequest,
        unpack: fn(ClientResponse) -> Option<Stamped<T>>,
    ) -> Option<T> {
        let target = self.stamp_leader.unwrap_or(self.nodes[self.preferred % self.nodes.len()]);
        let others: Vec<NodeId> = self.nodes.iter().copied().filter(|id| *id != target).collect();
        let read = self.attempt(target, request);
        let terms = futures::future::join_all(others.iter().map(|id| self.attempt(*id, ClientRequest::Term)));
        let (read, terms) = futures::join!(read, terms);
        let replies: Vec<TermReply> = terms
            .into_iter()
            .filter_map(|response| match response {
                Some(ClientResponse::Term(Ok(reply))) => Some(reply),
                _ => None,
            })
            .collect();
        let Some(stamped) = read.and_then(unpack) else {
            self.stamp_leader = None;
            self.note("stamped read failed");
            return None;
        };
        let confirmed = match &stamped.stamp {
            None => true,
            // The deliberate bug: trust the leader's stamp alone.
            Some(_) if cfg!(feature = "bug-unconfirmed-read") => true,
            Some(stamp) => stamp.confirmed_by(&replies),
        };
        self.stamp_leader = match (&stamped.stamp, confirmed) {
            (Some(stamp), true) => Some(stamp.leader),
            _ => None,
        };
        if !confirmed {
            self.note(&format!("stamped read not confirmed: {:?} by {replies:?}", stamped.stamp));
            return None;
        }
        Some(stamped.response)
    }

    /// One request to one node, once; `None` if it got no decodable reply.
    async fn attempt(&self, node: NodeId, request: ClientRequest) -> Option<ClientResponse> {
        let bytes = postcard::to_stdvec(&request).ok()?;
        let target = net::node_addr(node);
        let reply =
            net::request(&self.faults, target, CLIENT_TAG, bytes, CLIENT_ATTEMPT_TIMEOUT, Delivery::AtMostOnce).await;
        postcard::from_bytes(&reply.ok()?).ok()
    }

    /// A linearizable scan of every key: recorded as one read per key at the same interval
    /// (each key's value must be linearizable on its own).
    async fn scan(&mut self) {
        let request = ScanRequest {
            range: KeyRange { start: b"k".to_vec(), end: Some(b"l".to_vec()) },
            limit: 0,
            keys_only: false,
            count_only: false,
            after: None,
            consistency: ReadConsistency::Linearizable,
        };
        let call = now_ns();
        // Half the scans are client-confirmed (ADR 0004), the others ReadIndex on the node.
        let response = if madsim::rand::random::<bool>() {
            self.confirmed(ClientRequest::StampedScan(request), ClientResponse::into_stamped_scan).await
        } else {
            match self.call(ClientRequest::Scan(request), true).await {
                CallResult::Done(ClientResponse::Scan(Ok(response))) => Some(response),
                _ => None,
            }
        };
        if let Some(response) = response {
            for index in 0..self.keys {
                let key = key_name(index);
                let value = response.kvs.iter().find(|kv| kv.key == key).map(|kv| kv.value.clone());
                self.record(key, call, Input::Get, Some(Output::Value(value)));
            }
        }
    }

    /// Sends `request`, retrying by aspen-client's policy until the retry deadline.
    async fn call(&mut self, request: ClientRequest, idempotent: bool) -> CallResult {
        let started = madsim::time::Instant::now();
        let bytes = match postcard::to_stdvec(&request) {
            Ok(bytes) => bytes,
            Err(error) => return CallResult::Failed(format!("encode: {error}")),
        };
        let mut redirect: Option<SocketAddr> = None;
        let mut maybe_applied = false;
        loop {
            let target =
                redirect.take().unwrap_or_else(|| net::node_addr(self.nodes[self.preferred % self.nodes.len()]));
            let reply = net::request(
                &self.faults,
                target,
                CLIENT_TAG,
                bytes.clone(),
                CLIENT_ATTEMPT_TIMEOUT,
                Delivery::AtMostOnce,
            )
            .await;
            let response = match reply {
                Ok(reply) => match postcard::from_bytes::<ClientResponse>(&reply) {
                    Ok(response) => Ok(response),
                    Err(error) => return CallResult::Unknown(format!("undecodable reply: {error}")),
                },
                Err(error) => Err(error),
            };
            let failure_kv: Option<KvError> = match &response {
                Ok(ClientResponse::Get(Err(error)))
                | Ok(ClientResponse::Scan(Err(error)))
                | Ok(ClientResponse::Write(Err(error))) => Some(error.clone()),
                Ok(_) => None,
                Err(_) => None,
            };
            let failure = match (&response, &failure_kv) {
                (Ok(response), None) => return self.done(response.clone(), target),
                // The state machine's answer for this write: final, whatever came before.
                (Ok(response), Some(error)) if retry::is_verdict(error) => return self.done(response.clone(), target),
                (Ok(_), Some(error)) => AttemptFailure::Kv(error),
                (Err(error), _) => AttemptFailure::Unreachable { before_send: error.is_before_send() },
            };
            maybe_applied |= retry::may_have_applied(failure);
            let action = retry::after_failure(failure, idempotent);
            let describe = match (&response, &failure_kv) {
                (_, Some(error)) => error.to_string(),
                (Err(error), _) => error.to_string(),
                _ => String::new(),
            };
            if action == RetryAction::Stop || started.elapsed() >= CLIENT_RETRY_DEADLINE {
                return match (response, maybe_applied) {
                    (Ok(response), false) => CallResult::Done(response),
                    (_, true) => CallResult::Unknown(describe),
                    (Err(_), false) => CallResult::Failed(describe),
                };
            }
            match action {
                RetryAction::Redirect(addr) => redirect = addr.parse().ok(),
                RetryAction::NextNode | RetryAction::Stop => {}
            }
            if redirect.is_none() {
                self.preferred += 1;
                madsim::time::sleep(RETRY_PAUSE).await;
            }
        }
    }

    fn done(&mut self, response: ClientResponse, target: SocketAddr) -> CallResult {
        if let Some(position) = self.nodes.iter().position(|id| net::node_addr(*id) == target) {
            self.preferred = position;
        }
        CallResult::Done(response)
    }
}

fn get(key: &[u8]) -> GetRequest {
    GetRequest { key: key.to_vec(), consistency: ReadConsistency::Linearizable }
}
