//! Real iroh endpoints on 127.0.0.1 exchanging bounded RPCs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aspen_api::limits::{MAX_IDLE_LANES_PER_PEER, MAX_RPC_MESSAGE_SIZE};
use aspen_transport::rpc::PEER_SILENCE_LIMIT;
use aspen_transport::{
    EndpointId, PeerAddr, Reachability, RpcClient, RpcHandler, RpcProtocol, SecretKey, TransportError, bind_endpoint,
    load_or_create_secret_key,
};
use iroh::protocol::Router;
use serde::{Deserialize, Serialize};

const TEST_ALPN: &[u8] = b"aspen-test/1";
/// The hello frame of a caller without credentials: an empty body.
const EMPTY_HELLO: [u8; 4] = [0; 4];

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Request {
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    Slow(u64),
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Reply {
    Echo { from: String, bytes: usize },
    Rejected(String),
}

struct EchoHandler;

impl RpcHandler for EchoHandler {
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
                Reply::Echo { from: peer.to_string(), bytes: 0 }
            }
        }
    }

    fn reject(&self, _peer: EndpointId, error: TransportError) -> Reply {
        Reply::Rejected(error.to_string())
    }
}

async fn server(key: SecretKey) -> (Router, PeerAddr) {
    let endpoint =
        bind_endpoint(key, "127.0.0.1:0".parse().expect("addr"), vec![TEST_ALPN.to_vec()]).await.expect("bind");
    let addr = PeerAddr { id: endpoint.id(), addrs: endpoint.bound_sockets() };
    let router = Router::builder(endpoint).accept(TEST_ALPN, RpcProtocol::new(Arc::new(EchoHandler))).spawn();
    (router, addr)
}

async fn client() -> RpcClient {
    let endpoint =
        bind_endpoint(SecretKey::generate(), "127.0.0.1:0".parse().expect("addr"), vec![]).await.expect("bind");
    RpcClient::new(endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_carries_the_authenticated_peer_id() {
    let (router, addr) = server(SecretKey::generate()).await;
    let client = client().await;
    let reply: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![1; 1000])).await.expect("call");
    assert_eq!(reply, Reply::Echo { from: client.endpoint().id().to_string(), bytes: 1000 });
    // The pooled connection serves many calls, concurrently.
    let client = Arc::new(client);
    let mut calls = Vec::new();
    for i in 0..50 {
        let client = Arc::clone(&client);
        let addr = addr.clone();
        calls.push(tokio::spawn(
            async move { client.call::<_, Reply>(&addr, TEST_ALPN, &Request::Echo(vec![0; i])).await },
        ));
    }
    for (i, call) in calls.into_iter().enumerate() {
        assert!(matches!(call.await.expect("join"), Ok(Reply::Echo { bytes, .. }) if bytes == i));
    }
    router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_are_reused_and_bounded() {
    let (router, addr) = server(SecretKey::generate()).await;
    let client = Arc::new(client().await);
    // Sequential calls ride one lane.
    for i in 0..20 {
        let reply: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![3; i])).await.expect("call");
        assert!(matches!(reply, Reply::Echo { bytes, .. } if bytes == i), "{reply:?}");
        assert_eq!(client.idle_lanes(&addr, TEST_ALPN), 1);
    }
    // Concurrent calls each need a lane; afterwards the pool keeps at most its bound.
    let concurrent = MAX_IDLE_LANES_PER_PEER + 8;
    let mut calls = Vec::new();
    for i in 0..concurrent {
        let client = Arc::clone(&client);
        let addr = addr.clone();
        calls.push(tokio::spawn(async move {
            client.call::<_, Reply>(&addr, TEST_ALPN, &Request::Slow(100 + i as u64 % 3)).await
        }));
    }
    for call in calls {
        assert!(matches!(call.await.expect("join"), Ok(Reply::Echo { bytes: 0, .. })));
    }
    let idle = client.idle_lanes(&addr, TEST_ALPN);
    assert!(idle > 1 && idle <= MAX_IDLE_LANES_PER_PEER, "{idle} idle lanes");
    // Every pooled lane still answers its own request.
    for i in 0..(2 * MAX_IDLE_LANES_PER_PEER) {
        let reply: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![1; i])).await.expect("call");
        assert!(matches!(reply, Reply::Echo { bytes, .. } if bytes == i), "{reply:?}");
    }
    router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_header_resets_only_its_lane() {
    let (router, addr) = server(SecretKey::generate()).await;
    let client = client().await;
    let _: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![])).await.expect("first");
    // A hostile peer announces a frame over the limit on its own stream (after the empty
    // hello this server asks for).
    let connection = client.connect(&addr, TEST_ALPN).await.expect("pooled connection");
    let (mut send, mut recv) = connection.open_bi().await.expect("open");
    send.write_all(&EMPTY_HELLO).await.expect("write hello");
    send.write_all(&(MAX_RPC_MESSAGE_SIZE as u32 + 1).to_le_bytes()).await.expect("write header");
    let outcome = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024)).await.expect("answered");
    assert!(outcome.is_err(), "the stream is reset: {outcome:?}");
    // A frame that ends mid-body, then the stream finishes: dropped without a reply.
    let (mut send, mut recv) = connection.open_bi().await.expect("open");
    send.write_all(&EMPTY_HELLO).await.expect("write hello");
    send.write_all(&100u32.to_le_bytes()).await.expect("write header");
    send.write_all(&[0; 10]).await.expect("write part");
    send.finish().expect("finish");
    let outcome = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024)).await.expect("answered");
    assert!(matches!(outcome, Ok(ref bytes) if bytes.is_empty()) || outcome.is_err(), "{outcome:?}");
    // The connection and the pooled lane are unharmed.
    let reply: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![5; 5])).await.expect("still works");
    assert!(matches!(reply, Reply::Echo { bytes: 5, .. }));
    router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_get_typed_errors_and_the_connection_survives() {
    let (router, addr) = server(SecretKey::generate()).await;
    let client = client().await;
    let huge = Request::Echo(vec![0; MAX_RPC_MESSAGE_SIZE + 1]);
    let error = client.call::<_, Reply>(&addr, TEST_ALPN, &huge).await.expect_err("too large");
    assert!(matches!(error, TransportError::MessageTooLarge { max: MAX_RPC_MESSAGE_SIZE, .. }), "{error}");
    assert!(error.is_before_send());

    // A frame the server cannot decode (a different type on the same ALPN).
    let reply: Reply = client.call(&addr, TEST_ALPN, &"not a request".to_string()).await.expect("reply to garbage");
    assert!(matches!(reply, Reply::Rejected(ref reason) if reason.contains("malformed")), "{reply:?}");

    let reply: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![9; 10])).await.expect("still works");
    assert!(matches!(reply, Reply::Echo { bytes: 10, .. }));
    router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peer_fails_within_the_connect_timeout() {
    let client = client().await;
    // A peer id with an address nobody listens on.
    let nobody = PeerAddr { id: SecretKey::generate().public(), addrs: vec!["127.0.0.1:9".parse().expect("addr")] };
    let started = Instant::now();
    let error = client.call::<_, Reply>(&nobody, TEST_ALPN, &Request::Echo(vec![])).await.expect_err("unreachable");
    assert!(matches!(error, TransportError::ConnectTimeout { .. } | TransportError::Connect { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(8), "bounded by the connect timeout");

    // Now known to be down: the next call fails at once instead of dialing and waiting again.
    assert!(matches!(client.reachability(&nobody, TEST_ALPN), Reachability::Down { .. }));
    let started = Instant::now();
    let error = client.call::<_, Reply>(&nobody, TEST_ALPN, &Request::Echo(vec![])).await.expect_err("down");
    assert!(matches!(error, TransportError::PeerDown { .. }), "{error}");
    assert!(error.is_before_send(), "nothing was sent to a peer known down");
    assert!(started.elapsed() < Duration::from_secs(1), "no connect timeout for a peer known down");

    // Right address, wrong identity: the handshake refuses it.
    let (router, addr) = server(SecretKey::generate()).await;
    let impostor = PeerAddr { id: SecretKey::generate().public(), addrs: addr.addrs.clone() };
    let error = client.call::<_, Reply>(&impostor, TEST_ALPN, &Request::Echo(vec![])).await.expect_err("wrong id");
    assert!(matches!(error, TransportError::Connect { .. } | TransportError::ConnectTimeout { .. }), "{error}");
    router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_server_restarts_with_the_same_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("node.key");
    let key = load_or_create_secret_key(&key_path).expect("create key");
    assert_eq!(load_or_create_secret_key(&key_path).expect("reload").public(), key.public(), "identity is stable");
    std::fs::write(dir.path().join("bad.key"), b"short").expect("write");
    assert!(matches!(load_or_create_secret_key(&dir.path().join("bad.key")), Err(TransportError::KeyFile { .. })));

    let (router, addr) = server(key.clone()).await;
    let client = client().await;
    let _: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![])).await.expect("first");
    let port = addr.addrs[0];
    router.shutdown().await.expect("shutdown");
    drop(router);

    // Same key, same port: the pooled connection is dead, the client must reconnect.
    // The closed endpoint's socket is released asynchronously; retry the bind briefly.
    let mut endpoint = None;
    for _ in 0..50 {
        match bind_endpoint(key.clone(), port, vec![TEST_ALPN.to_vec()]).await {
            Ok(bound) => {
                endpoint = Some(bound);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let endpoint = endpoint.expect("rebind the same port");
    let router = Router::builder(endpoint).accept(TEST_ALPN, RpcProtocol::new(Arc::new(EchoHandler))).spawn();
    let mut result = client.call::<_, Reply>(&addr, TEST_ALPN, &Request::Echo(vec![1])).await;
    for _ in 0..3 {
        if result.is_ok() {
            break;
        }
        result = client.call::<_, Reply>(&addr, TEST_ALPN, &Request::Echo(vec![1])).await;
    }
    assert!(matches!(result, Ok(Reply::Echo { bytes: 1, .. })), "{result:?}");
    router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_peer_slower_to_answer_than_the_silence_limit_is_not_taken_for_gone() {
    // The peer acknowledges the request, then says nothing until it answers: the watcher's
    // probes must find it alive, not close the connection under the waiting call.
    let (router, addr) = server(SecretKey::generate()).await;
    let client = client().await;
    let slow = PEER_SILENCE_LIMIT + Duration::from_millis(500);
    let reply: Reply =
        client.call(&addr, TEST_ALPN, &Request::Slow(slow.as_millis() as u64)).await.expect("slow reply");
    assert!(matches!(reply, Reply::Echo { bytes: 0, .. }), "{reply:?}");
    assert_eq!(client.reachability(&addr, TEST_ALPN), Reachability::Connected, "the connection stayed up");
    router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reply_hits_the_read_timeout() {
    let (router, addr) = server(SecretKey::generate()).await;
    let endpoint =
        bind_endpoint(SecretKey::generate(), "127.0.0.1:0".parse().expect("addr"), vec![]).await.expect("bind");
    let client = RpcClient::with_read_timeout(endpoint, Duration::from_millis(200));
    let error = client.call::<_, Reply>(&addr, TEST_ALPN, &Request::Slow(400)).await.expect_err("timeout");
    assert!(matches!(error, TransportError::ReadTimeout { after_ms: 200, .. }), "{error}");
    assert_eq!(client.idle_lanes(&addr, TEST_ALPN), 0, "a timed-out lane is never reused");
    // The late reply to the slow request must never be read as the answer to a later one.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reply: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![7; 7])).await.expect("next call");
    assert!(matches!(reply, Reply::Echo { bytes: 7, .. }), "{reply:?}");
    router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_and_internet_discovery_switched_on_do_not_stall_binding_or_direct_rpc_offline() {
    // These machines cannot reach n0's relays, DNS or pkarr: turning them on must cost
    // neither a stalled bind nor the direct loopback path.
    let everything = aspen_transport::InternetServices { relays: true, dns_discovery: true, pkarr_discovery: true };
    let started = Instant::now();
    let server_endpoint = aspen_transport::bind_endpoint_with_lookup(
        SecretKey::generate(),
        "127.0.0.1:0".parse().expect("addr"),
        vec![TEST_ALPN.to_vec()],
        None,
        everything,
    )
    .await
    .expect("bind with internet services on");
    let client_endpoint = aspen_transport::bind_endpoint_with_lookup(
        SecretKey::generate(),
        "127.0.0.1:0".parse().expect("addr"),
        vec![],
        None,
        everything,
    )
    .await
    .expect("bind");
    assert!(started.elapsed() < Duration::from_secs(5), "binding took {:?}", started.elapsed());
    let addr = PeerAddr { id: server_endpoint.id(), addrs: server_endpoint.bound_sockets() };
    let router = Router::builder(server_endpoint).accept(TEST_ALPN, RpcProtocol::new(Arc::new(EchoHandler))).spawn();
    let client = RpcClient::new(client_endpoint);
    let reply: Reply = client.call(&addr, TEST_ALPN, &Request::Echo(vec![1, 2, 3])).await.expect("direct rpc");
    assert!(matches!(reply, Reply::Echo { bytes: 3, .. }));
    router.shutdown().await.expect("shutdown");
}
