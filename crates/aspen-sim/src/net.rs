//! The simulated network: madsim datagrams between simulated hosts, carrying the same
//! postcard-encoded [`RaftRpc`]s and client requests production carries over QUIC.
//!
//! madsim drops (`packet_loss_rate`), delays and reorders (`send_latency`) messages and
//! clogs links for partitions; this layer adds duplication and long delays. Raft requests
//! are resent while unanswered, as QUIC retransmits lost packets.
//! A request without a reply before its deadline is a timeout: it may or may not have been
//! handled, exactly as over QUIC.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aspen_api::{ClusterNode, NodeId};
use aspen_consensus::{RaftRpc, RaftRpcClient, RaftRpcReply, RpcFailure};
use madsim::net::Endpoint;

/// The port every simulated node listens on.
pub const PORT: u16 = 7000;
/// Tag of Raft requests.
pub const RAFT_TAG: u64 = 1;
/// Tag of client requests.
pub const CLIENT_TAG: u64 = 2;
/// Deadline of one Raft RPC.
pub const RAFT_RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest encoded message (the same bound as the production transport).
pub const MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;

/// The address of simulated node `id`.
pub fn node_addr(id: NodeId) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)), PORT)
}

/// The IP of simulated client `index`.
pub fn client_ip(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, index as u8 + 1))
}

/// One message: the bytes and the tag the reply must carry.
struct Frame {
    reply_tag: u64,
    bytes: Vec<u8>,
}

/// Faults this layer adds on top of madsim's, in parts per million so they can change
/// during a run without locks.
#[derive(Debug, Default)]
pub struct NetFaults {
    /// Chance a request is sent twice.
    pub duplicate_ppm: AtomicU64,
    /// Chance a request is held back before sending.
    pub delay_ppm: AtomicU64,
    /// Longest hold-back, in milliseconds.
    pub max_delay_ms: AtomicU64,
    /// Chance a reply is lost after the request was handled.
    pub lose_reply_ppm: AtomicU64,
}

fn chance(ppm: &AtomicU64) -> bool {
    let ppm = ppm.load(Ordering::Relaxed);
    ppm > 0 && madsim::rand::random::<u64>() % 1_000_000 < ppm
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The request could not be sent at all (it never left this host).
    #[error("send failed: {0}")]
    Send(String),
    /// No reply in time; the request may or may not have been handled.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The reply was not a frame.
    #[error("malformed reply")]
    Malformed,
}

impl NetError {
    /// Whether the request certainly did not reach the peer.
    pub fn is_before_send(&self) -> bool {
        matches!(self, NetError::Send(_))
    }
}

/// Whether the network may deliver a request twice.
///
/// QUIC delivers a stream's bytes exactly once, but clients resend writes whose outcome they
/// do not know, and Raft resends its own messages (heartbeats, appends, votes, snapshot
/// chunks after a timeout). Everything that is safe to apply twice may be duplicated here:
/// Raft messages and writes with an identity (applied at most once by the state machine);
/// writes without one may not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// May arrive twice (idempotent by protocol), and is resent while unanswered, as QUIC
    /// retransmits what it lost: Raft's RPCs between nodes.
    Resent,
    /// May arrive twice (idempotent by protocol), sent once: a client's write with an
    /// identity, whose resending is the client's own logic under test.
    AtLeastOnce,
    /// Arrives at most once.
    AtMostOnce,
}

impl Delivery {
    fn may_duplicate(self) -> bool {
        matches!(self, Delivery::Resent | Delivery::AtLeastOnce)
    }
}

/// Sends `bytes` to `dst` under `tag` from a fresh endpoint of the current host and
/// waits up to `deadline` for the reply.
pub async fn request(
    faults: &NetFaults,
    dst: SocketAddr,
    tag: u64,
    bytes: Vec<u8>,
    deadline: Duration,
    delivery: Delivery,
) -> Result<Vec<u8>, NetError> {
    let endpoint = Endpoint::bind("0.0.0.0:0").await.map_err(|error| NetError::Send(error.to_string()))?;
    // Reply tags are above the request tags; random so that stale replies never match.
    let reply_tag = madsim::rand::random::<u64>() | (1 << 63);
    if chance(&faults.delay_ppm) {
        let max = faults.max_delay_ms.load(Ordering::Relaxed).max(1);
        madsim::time::sleep(Duration::from_millis(madsim::rand::random::<u64>() % max)).await;
    }
    let copies = if delivery.may_duplicate() && chance(&faults.duplicate_ppm) { 2 } else { 1 };
    let started = madsim::time::Instant::now();
    let mut resend_after = RESEND_AFTER_MIN;
    loop {
        for _ in 0..copies {
            let frame = Frame { reply_tag, bytes: bytes.clone() };
            endpoint.send_to_raw(dst, tag, Box::new(frame)).await.map_err(|error| NetError::Send(error.to_string()))?;
        }
        let left = deadline.saturating_sub(started.elapsed());
        // Raft's requests are resent while unanswered, as QUIC retransmits a lost packet: a
        // single lost datagram costs a retransmission timeout, not the whole deadline.
        // Client requests are sent once: resending them is aspen-client's job, under test.
        let wait = if delivery == Delivery::Resent { left.min(resend_after) } else { left };
        match madsim::time::timeout(wait, endpoint.recv_from_raw(reply_tag)).await {
            Ok(Ok((payload, _))) => {
                let frame = payload.downcast::<Frame>().map_err(|_| NetError::Malformed)?;
                return Ok(frame.bytes);
            }
            Ok(Err(_)) => return Err(NetError::Timeout(deadline)),
            Err(_) if started.elapsed() >= deadline => return Err(NetError::Timeout(deadline)),
            Err(_) => resend_after = (resend_after * 2).min(RESEND_AFTER_MAX),
        }
    }
}

/// First retransmission timeout of a request that may arrive twice: above the longest round
/// trip the simulated network has (2 x 40 ms), as QUIC's probe timeout is above its RTT.
pub const RESEND_AFTER_MIN: Duration = Duration::from_millis(200);
/// Longest retransmission timeout (it doubles after each resend, as QUIC's does).
pub const RESEND_AFTER_MAX: Duration = Duration::from_secs(1);

/// Serves requests under `tag` on `endpoint` with `handle`, one task per request.
pub async fn serve<H, F>(endpoint: Arc<Endpoint>, tag: u64, faults: Arc<NetFaults>, handle: H)
where
    H: Fn(Vec<u8>) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Vec<u8>> + Send + 'static,
{
    let handle = Arc::new(handle);
    loop {
        let Ok((payload, from)) = endpoint.recv_from_raw(tag).await else { return };
        let Ok(frame) = payload.downcast::<Frame>() else { continue };
        let endpoint = Arc::clone(&endpoint);
        let handle = Arc::clone(&handle);
        let faults = Arc::clone(&faults);
        madsim::task::spawn(async move {
            let reply = handle(frame.bytes).await;
            // Handled, and the caller never hears of it: its timeout, an unknown outcome.
            if chance(&faults.lose_reply_ppm) {
                return;
            }
            let reply = Frame { reply_tag: 0, bytes: reply };
            // A lost reply is the caller's timeout.
            let _ = endpoint.send_to_raw(from, frame.reply_tag, Box::new(reply)).await;
        });
    }
}

/// The Raft network of one simulated node: the seam production fills with iroh.
pub struct SimRaftClient {
    faults: Arc<NetFaults>,
}

impl SimRaftClient {
    /// A client sharing the run's network faults.
    pub fn new(faults: Arc<NetFaults>) -> Self {
        SimRaftClient { faults }
    }
}

impl RaftRpcClient for SimRaftClient {
    async fn call(&self, target: NodeId, node: &ClusterNode, request: RaftRpc) -> Result<RaftRpcReply, RpcFailure> {
        let addr: SocketAddr = node
            .addr
            .parse()
            .map_err(|_| RpcFailure::Unreachable { node: target, reason: format!("bad address {:?}", node.addr) })?;
        let bytes = postcard::to_stdvec(&request)
            .map_err(|error| RpcFailure::Network { node: target, reason: format!("encode: {error}") })?;
        if bytes.len() > MAX_MESSAGE_SIZE {
            return Err(RpcFailure::Network { node: target, reason: format!("request of {} bytes", bytes.len()) });
        }
        // A forwarded write without an identity must not apply twice; everything else is
        // deduplicated by Raft or by the write's session.
        let delivery = match &request {
            RaftRpc::Forward(write) if write.id.is_none() => Delivery::AtMostOnce,
            _ => Delivery::Resent,
        };
        let reply =
            self::request(&self.faults, addr, RAFT_TAG, bytes, RAFT_RPC_TIMEOUT, delivery).await.map_err(|error| {
                match error {
                    NetError::Timeout(after) => {
                        RpcFailure::Timeout { node: target, after_ms: after.as_millis() as u64 }
                    }
                    NetError::Send(reason) => RpcFailure::Unreachable { node: target, reason },
                    NetError::Malformed => RpcFailure::Network { node: target, reason: "malformed reply".into() },
                }
            })?;
        postcard::from_bytes(&reply)
            .map_err(|error| RpcFailure::Network { node: target, reason: format!("decode: {error}") })
    }
}
