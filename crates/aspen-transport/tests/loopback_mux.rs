//! Real iroh endpoints on 127.0.0.1 exchanging multiplexed RPCs (the client protocol's
//! framing): many callers on one stream, replies out of order, coalesced writes, bounds.

use std::sync::Arc;
use std::time::Duration;

use aspen_api::limits::MAX_RPC_MESSAGE_SIZE;
use aspen_transport::mux::{MAX_MUX_IN_FLIGHT, MUX_HEADER_SIZE, encode_mux_frame};
use aspen_transport::{
    EndpointId, MuxProtocol, PeerAddr, RpcClient, RpcHandler, SecretKey, TransportError, bind_endpoint,
};
use iroh::protocol::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

const TEST_ALPN: &[u8] = b"aspen-mux-test/1";
/// The hello frame of a caller without credentials: an empty body.
const EMPTY_HELLO: [u8; 4] = [0; 4];

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Request {
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    Slow(u64),
    /// Answered once the test opens the gate, all at the same moment.
    Gated(u32),
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Reply {
    Echo { from: String, bytes: usize },
    Slept(u64),
    Released(u32),
    Rejected(String),
}

struct Handler {
    gate: watch::Receiver<bool>,
}

impl RpcHandler for Handler {
    type Hello = ();
    type Request = Request;
    type Response = Reply;

    fn authenticate(&self, _peer: EndpointId, _hello: ()) -> Result<(), String> {
        Ok(())
    }

    async fn handle(&self, peer: EndpointId, request: Request) -> Reply {
        match request {
            Request::Echo(bytes) => Reply::Echo { from: peer.to_string(), bytes: bytes.len() },
            Request::Slow(millis) => {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                Reply::Slept(millis)
            }
            Request::Gated(n) => {
                let mut gate = self.gate.clone();
                let _ = gate.wait_for(|open| *open).await;
                Reply::Released(n)
            }
        }
    }

    fn reject(&self, _peer: EndpointId, error: TransportError) -> Reply {
        Reply::Rejected(error.to_string())
    }
}

struct Server {
    router: Router,
    addr: PeerAddr,
    gate: watch::Sender<bool>,
}

async fn server() -> Server {
    let endpoint = bind_endpoint(SecretKey::generate(), "127.0.0.1:0".parse().expect("addr"), vec![TEST_ALPN.to_vec()])
        .await
        .expect("bind");
    let addr = PeerAddr { id: endpoint.id(), addrs: endpoint.bound_sockets() };
    let (gate, gate_rx) = watch::channel(false);
    let router =
        Router::builder(endpoint).accept(TEST_ALPN, MuxProtocol::new(Arc::new(Handler { gate: gate_rx }))).spawn();
    Server { router, addr, gate }
}

async fn client(read_timeout: Duration) -> Arc<RpcClient> {
    let endpoint =
        bind_endpoint(SecretKey::generate(), "127.0.0.1:0".parse().expect("addr"), vec![]).await.expect("bind");
    Arc::new(RpcClient::with_read_timeout(endpoint, read_timeout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_each_get_their_own_reply_and_a_slow_one_blocks_none() {
    let server = server().await;
    let client = client(Duration::from_secs(10)).await;
    let slow = {
        let (client, addr) = (Arc::clone(&client), server.addr.clone());
        tokio::spawn(async move { client.call_muxed::<_, Reply>(&addr, TEST_ALPN, &Request::Slow(1500)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let calls: Vec<_> = (0..200usize)
        .map(|i| {
            let (client, addr) = (Arc::clone(&client), server.addr.clone());
            tokio::spawn(
                async move { client.call_muxed::<_, Reply>(&addr, TEST_ALPN, &Request::Echo(vec![1; i])).await },
            )
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let reply = call.await.expect("join").expect("call");
        assert!(matches!(reply, Reply::Echo { bytes, .. } if bytes == i), "call {i} got {reply:?}");
    }
    assert!(!slow.is_finished(), "the echoes were answered while the slow request still ran");
    assert_eq!(slow.await.expect("join").expect("slow call"), Reply::Slept(1500));
    server.router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_finished_together_share_datagrams() {
    let server = server().await;
    let client = client(Duration::from_secs(10)).await;
    let _: Reply = client.call_muxed(&server.addr, TEST_ALPN, &Request::Echo(vec![])).await.expect("warm up");
    const CALLS: u32 = 64;
    let calls: Vec<_> = (0..CALLS)
        .map(|n| {
            let (client, addr) = (Arc::clone(&client), server.addr.clone());
            tokio::spawn(async move { client.call_muxed::<_, Reply>(&addr, TEST_ALPN, &Request::Gated(n)).await })
        })
        .collect();
    // Every request has reached the server once it acknowledged them all; give it time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connection = client.connect(&server.addr, TEST_ALPN).await.expect("pooled connection");
    let before = connection.stats().frame_rx.stream;
    server.gate.send_replace(true);
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.expect("join").expect("call"), Reply::Released(n as u32));
    }
    let stream_frames = connection.stats().frame_rx.stream - before;
    // 64 replies of ~7 bytes each: written as one batch they arrive in one or two STREAM
    // frames; one write per reply (a lane per call) would take 64.
    assert!(stream_frames <= 8, "64 replies finished together came in {stream_frames} STREAM frames");
    server.router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_callers_than_the_in_flight_bound_all_get_answers() {
    let server = server().await;
    let client = client(Duration::from_secs(30)).await;
    let calls: Vec<_> = (0..(MAX_MUX_IN_FLIGHT + 200) as u32)
        .map(|n| {
            let (client, addr) = (Arc::clone(&client), server.addr.clone());
            tokio::spawn(async move { client.call_muxed::<_, Reply>(&addr, TEST_ALPN, &Request::Gated(n)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.gate.send_replace(true);
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.expect("join").expect("call"), Reply::Released(n as u32));
    }
    server.router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_never_receives_a_later_reply_and_the_stream_lives_on() {
    let server = server().await;
    let client = client(Duration::from_millis(200)).await;
    let error = client.call_muxed::<_, Reply>(&server.addr, TEST_ALPN, &Request::Slow(400)).await.expect_err("timeout");
    assert!(matches!(error, TransportError::ReadTimeout { after_ms: 200, .. }), "{error}");
    // The slow reply arrives while this call waits: dropped by its id, not taken as this one's.
    let reply: Reply = client.call_muxed(&server.addr, TEST_ALPN, &Request::Slow(150)).await.expect("next call");
    assert_eq!(reply, Reply::Slept(150));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply: Reply = client.call_muxed(&server.addr, TEST_ALPN, &Request::Echo(vec![7; 7])).await.expect("call");
    assert!(matches!(reply, Reply::Echo { bytes: 7, .. }), "{reply:?}");
    server.router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_get_typed_errors_and_the_stream_survives() {
    let server = server().await;
    let client = client(Duration::from_secs(10)).await;
    let huge = Request::Echo(vec![0; MAX_RPC_MESSAGE_SIZE + 1]);
    let error = client.call_muxed::<_, Reply>(&server.addr, TEST_ALPN, &huge).await.expect_err("too large");
    assert!(matches!(error, TransportError::MessageTooLarge { max: MAX_RPC_MESSAGE_SIZE, .. }), "{error}");
    assert!(error.is_before_send());

    let reply: Reply =
        client.call_muxed(&server.addr, TEST_ALPN, &"not a request".to_string()).await.expect("reply to garbage");
    assert!(matches!(reply, Reply::Rejected(ref reason) if reason.contains("malformed")), "{reply:?}");

    // The largest allowed message still goes through.
    let big = Request::Echo(vec![3; MAX_RPC_MESSAGE_SIZE - 16]);
    let reply: Reply = client.call_muxed(&server.addr, TEST_ALPN, &big).await.expect("big call");
    assert!(matches!(reply, Reply::Echo { bytes, .. } if bytes == MAX_RPC_MESSAGE_SIZE - 16), "{reply:?}");
    server.router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_frame_resets_only_its_own_stream() {
    let server = server().await;
    let client = client(Duration::from_secs(10)).await;
    let _: Reply = client.call_muxed(&server.addr, TEST_ALPN, &Request::Echo(vec![])).await.expect("first");
    let connection = client.connect(&server.addr, TEST_ALPN).await.expect("pooled connection");

    // A header announcing a body over the limit (after the empty hello this server asks
    // for): that stream is reset.
    let (mut send, mut recv) = connection.open_bi().await.expect("open");
    send.write_all(&EMPTY_HELLO).await.expect("write hello");
    let mut header = [0u8; MUX_HEADER_SIZE];
    header[..4].copy_from_slice(&(MAX_RPC_MESSAGE_SIZE as u32 + 1).to_le_bytes());
    send.write_all(&header).await.expect("write header");
    let outcome = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024)).await.expect("answered");
    assert!(outcome.is_err(), "the stream is reset: {outcome:?}");

    // A good request followed by a truncated one, then the stream ends: the good one is
    // answered, the truncated one dropped, and the stream finished.
    let (mut send, mut recv) = connection.open_bi().await.expect("open");
    send.write_all(&EMPTY_HELLO).await.expect("write hello");
    send.write_all(&encode_mux_frame(9, &Request::Echo(vec![1; 3])).expect("encode")).await.expect("write");
    let truncated = encode_mux_frame(10, &Request::Echo(vec![1; 100])).expect("encode");
    send.write_all(&truncated[..50]).await.expect("write part");
    send.finish().expect("finish");
    let answered = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024)).await.expect("answered");
    let answered = answered.expect("the stream ends cleanly");
    assert!(answered.len() > MUX_HEADER_SIZE, "{answered:?}");
    let body_len = u32::from_le_bytes(answered[..4].try_into().expect("length")) as usize;
    assert_eq!(answered.len(), MUX_HEADER_SIZE + body_len, "exactly one reply");
    assert_eq!(u64::from_le_bytes(answered[4..MUX_HEADER_SIZE].try_into().expect("id")), 9);

    let reply: Reply =
        client.call_muxed(&server.addr, TEST_ALPN, &Request::Echo(vec![5; 5])).await.expect("still works");
    assert!(matches!(reply, Reply::Echo { bytes: 5, .. }));
    server.router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_cleanly_when_the_server_goes_away_and_work_again_once_it_is_back() {
    let server = server().await;
    let client = client(Duration::from_secs(10)).await;
    let _: Reply = client.call_muxed(&server.addr, TEST_ALPN, &Request::Echo(vec![])).await.expect("first");
    let waiting = {
        let (client, addr) = (Arc::clone(&client), server.addr.clone());
        tokio::spawn(async move { client.call_muxed::<_, Reply>(&addr, TEST_ALPN, &Request::Gated(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.router.shutdown().await.expect("shutdown");
    let outcome = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("failed in time").expect("join");
    assert!(matches!(outcome, Err(TransportError::Stream { .. })), "{outcome:?}");

    // A new server (new identity, new port): the client's pool holds nothing stale for it.
    let server = self::server().await;
    let reply: Reply = client.call_muxed(&server.addr, TEST_ALPN, &Request::Echo(vec![2; 2])).await.expect("call");
    assert!(matches!(reply, Reply::Echo { bytes: 2, .. }));
    server.router.shutdown().await.expect("shutdown");
}
