//! Real iroh endpoints on 127.0.0.1: every stream opens with a hello carrying the caller's
//! credentials, checked before anything else is read. A peer without them is refused after
//! at most `MAX_UNAUTHENTICATED_FRAME_SIZE` bytes, with nothing it sent decoded; a caller
//! with them sends a large first request with no extra step. Both server shapes: lanes
//! (`RpcProtocol`, Raft) and one multiplexed stream (`MuxProtocol`, clients).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aspen_api::limits::MAX_UNAUTHENTICATED_FRAME_SIZE;
use aspen_transport::rpc::CLOSE_UNAUTHENTICATED;
use aspen_transport::{
    EndpointId, MuxProtocol, PeerAddr, RpcClient, RpcHandler, RpcProtocol, SecretKey, TransportError, bind_endpoint,
};
use iroh::endpoint::{ConnectionError, VarInt};
use iroh::protocol::Router;
use serde::{Deserialize, Serialize};

const LANES_ALPN: &[u8] = b"aspen-hello-lanes-test/1";
const MUX_ALPN: &[u8] = b"aspen-hello-mux-test/1";
const TOKEN: &str = "letmein";
/// A first request far over the unauthenticated bound.
const LARGE: usize = 1024 * 1024;
/// A hostile first frame: more than QUIC lets a sender buffer ahead of the reader, so
/// writing it all needs the server to read it.
const HOSTILE: usize = 8 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Echo(#[serde(with = "serde_bytes")] Vec<u8>);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Reply {
    Echoed(usize),
    Rejected(String),
}

/// Admits streams whose hello is [`TOKEN`]; counts what it was asked.
#[derive(Default)]
struct TokenHandler {
    hellos: AtomicU64,
    requests: AtomicU64,
}

impl RpcHandler for TokenHandler {
    type Hello = String;
    type Request = Echo;
    type Response = Reply;

    fn authenticate(&self, _peer: EndpointId, hello: String) -> Result<(), String> {
        self.hellos.fetch_add(1, Ordering::Relaxed);
        if hello == TOKEN { Ok(()) } else { Err("wrong token".into()) }
    }

    async fn handle(&self, _peer: EndpointId, request: Echo) -> Reply {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Reply::Echoed(request.0.len())
    }

    fn reject(&self, _peer: EndpointId, error: TransportError) -> Reply {
        Reply::Rejected(error.to_string())
    }
}

struct Server {
    router: Router,
    addr: PeerAddr,
    lanes: Arc<TokenHandler>,
    mux: Arc<TokenHandler>,
}

async fn server() -> Server {
    let alpns = vec![LANES_ALPN.to_vec(), MUX_ALPN.to_vec()];
    let endpoint =
        bind_endpoint(SecretKey::generate(), "127.0.0.1:0".parse().expect("addr"), alpns).await.expect("bind");
    let addr = PeerAddr { id: endpoint.id(), addrs: endpoint.bound_sockets() };
    let lanes = Arc::new(TokenHandler::default());
    let mux = Arc::new(TokenHandler::default());
    let router = Router::builder(endpoint)
        .accept(LANES_ALPN, RpcProtocol::new(Arc::clone(&lanes)))
        .accept(MUX_ALPN, MuxProtocol::new(Arc::clone(&mux)))
        .spawn();
    Server { router, addr, lanes, mux }
}

async fn client() -> RpcClient {
    let endpoint =
        bind_endpoint(SecretKey::generate(), "127.0.0.1:0".parse().expect("addr"), vec![]).await.expect("bind");
    RpcClient::new(endpoint)
}

fn name(alpn: &[u8]) -> String {
    String::from_utf8_lossy(alpn).into_owned()
}

async fn call(
    client: &RpcClient,
    addr: &PeerAddr,
    alpn: &'static [u8],
    request: &Echo,
) -> Result<Reply, TransportError> {
    if alpn == MUX_ALPN { client.call_muxed(addr, alpn, request).await } else { client.call(addr, alpn, request).await }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_frame_before_credentials_closes_the_connection_unread() {
    let server = server().await;
    let client = client().await;
    for (alpn, handler) in [(LANES_ALPN, &server.lanes), (MUX_ALPN, &server.mux)] {
        // A peer speaking the protocol without a hello: its first frame is a large request.
        let connection = client.connect(&server.addr, alpn).await.expect("connect");
        let (mut send, _recv) = connection.open_bi().await.expect("open");
        let mut frame = (HOSTILE as u32).to_le_bytes().to_vec();
        frame.extend(std::iter::repeat_n(7u8, HOSTILE));
        let writer = tokio::spawn(async move { send.write_all(&frame).await });
        let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await.expect("closed in time");
        let ConnectionError::ApplicationClosed(close) = closed else { panic!("{}: closed by {closed:?}", name(alpn)) };
        assert_eq!(close.error_code, VarInt::from_u32(CLOSE_UNAUTHENTICATED), "{}", name(alpn));
        let reason = String::from_utf8_lossy(&close.reason).into_owned();
        assert!(reason.contains(&MAX_UNAUTHENTICATED_FRAME_SIZE.to_string()), "{}: {reason}", name(alpn));
        // The server never got as far as decoding anything: not a hello, not a request.
        assert_eq!(handler.hellos.load(Ordering::Relaxed), 0, "{}", name(alpn));
        assert_eq!(handler.requests.load(Ordering::Relaxed), 0, "{}", name(alpn));
        let written = writer.await.expect("join");
        assert!(written.is_err(), "{}: the server took the whole frame: {written:?}", name(alpn));
    }
    server.router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_credentials_get_a_typed_refusal_and_no_request_is_decoded() {
    let server = server().await;
    for (alpn, handler) in [(LANES_ALPN, &server.lanes), (MUX_ALPN, &server.mux)] {
        let wrong = client().await;
        wrong.set_hello(alpn, &"guess".to_string()).expect("hello");
        let missing = client().await;
        for (who, client) in [("wrong", &wrong), ("missing", &missing)] {
            let error = call(client, &server.addr, alpn, &Echo(vec![1; LARGE])).await.expect_err("refused");
            assert!(matches!(error, TransportError::Unauthenticated { .. }), "{} {who}: {error:?}", name(alpn));
            assert!(error.is_before_send(), "the request was never handled");
            // Every retry is refused alike, on a new connection.
            let again = call(client, &server.addr, alpn, &Echo(vec![1; 10])).await.expect_err("refused again");
            assert!(matches!(again, TransportError::Unauthenticated { .. }), "{} {who}: {again:?}", name(alpn));
        }
        assert_eq!(handler.requests.load(Ordering::Relaxed), 0, "{}: no request reached the handler", name(alpn));
    }
    let error = client().await.set_hello(LANES_ALPN, &"x".repeat(MAX_UNAUTHENTICATED_FRAME_SIZE)).expect_err("big");
    assert!(matches!(error, TransportError::MessageTooLarge { max: MAX_UNAUTHENTICATED_FRAME_SIZE, .. }), "{error}");
    server.router.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_with_credentials_sends_a_large_first_request() {
    let server = server().await;
    for alpn in [LANES_ALPN, MUX_ALPN] {
        let client = client().await;
        client.set_hello(alpn, &TOKEN.to_string()).expect("hello");
        let reply = call(&client, &server.addr, alpn, &Echo(vec![1; LARGE])).await.expect("first request");
        assert_eq!(reply, Reply::Echoed(LARGE), "{}", name(alpn));
        let reply = call(&client, &server.addr, alpn, &Echo(vec![2; 3])).await.expect("next request");
        assert_eq!(reply, Reply::Echoed(3), "{}", name(alpn));
    }
    assert_eq!(server.lanes.requests.load(Ordering::Relaxed), 2);
    assert_eq!(server.mux.requests.load(Ordering::Relaxed), 2);
    server.router.shutdown().await.expect("shutdown");
}
