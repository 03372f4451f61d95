//! Bounded request/response RPC over QUIC. A bi-stream is a lane: the client writes one
//! request frame, the server answers with one reply frame, and the lane goes back to a pool
//! for the next call to the same peer, so steady traffic opens no streams and the server
//! spawns no task per request. Each frame is a little-endian u32 length and a postcard
//! message of at most `MAX_RPC_MESSAGE_SIZE` bytes; every step runs under a timeout;
//! connections are pooled per (peer, ALPN) and re-established when they die.
//!
//! A connection dies visibly when the peer closes it, but a peer that crashed sends no
//! close, and once restarted it silently drops packets of the connection it no longer
//! knows; QUIC alone would notice only at its idle timeout, cutting the peer off for that
//! long. So each pooled connection is watched: a peer that sends nothing at all for
//! [`PEER_SILENCE_LIMIT`] while a request to it waits is taken for gone, the connection is
//! closed, and the peer is marked down: calls to it fail at once while it is redialed in
//! the background (see [`crate::dial`]), so no caller waits out a connect timeout. A peer
//! may also die after acknowledging a request and before answering it; while a request
//! waits and the peer has been quiet for a check period, the watcher sends it a one-byte
//! datagram, which a live peer's QUIC stack acknowledges within its ack delay whatever its
//! application is doing, so that silence is noticed too.
//!
//! Every stream opens with a hello: one frame carrying the caller's credentials (the
//! handler's [`RpcHandler::Hello`]), at most `MAX_UNAUTHENTICATED_FRAME_SIZE` bytes. The
//! server reads and checks it before it reads anything else on the stream, so a peer
//! without credentials never gets a request of up to `MAX_RPC_MESSAGE_SIZE` read or
//! decoded: an oversized, malformed or refused hello closes the connection
//! ([`CLOSE_UNAUTHENTICATED`], the reason as close reason). The client writes the hello and
//! its first request together, so even a first request of megabytes costs no extra round
//! trip.
//!
//! Why not irpc: its message bound is a fixed 16 MiB and an oversized message tears down
//! the shared connection; Aspen needs its own 10 MiB bound, checked before sending with a
//! typed error and no collateral damage to other calls (see docs/adr/0002).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use aspen_api::limits::{
    MAX_CONCURRENT_CONNECTIONS, MAX_IDLE_LANES_PER_PEER, MAX_RPC_MESSAGE_SIZE, MAX_UNAUTHENTICATED_FRAME_SIZE,
};
use iroh::endpoint::{Connection, ConnectionError, ReadExactError, RecvStream, SendStream, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{Endpoint, EndpointId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::dial::{Dials, PoolKey, Reachability};
use crate::error::TransportError;
use crate::mux::MuxSession;
use crate::peer::PeerAddr;

/// Longest wait for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait to open a stream on a connection.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a reply once the request is sent (and for the rest of a frame once its
/// first byte arrived).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The server ends a lane that brings no new request for this long.
pub const LANE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The client reuses a pooled lane only if it has been idle for less than this: half the
/// server's [`LANE_IDLE_TIMEOUT`], so a reused lane is never one the server just ended.
pub const LANE_REUSE_WINDOW: Duration = Duration::from_secs(30);

/// A peer that sends no frame at all for this long while a request to it waits to be heard
/// is taken for gone (crashed, paused, cut off, or restarted and no longer knowing the
/// connection) and the connection is closed. A live peer acknowledges a request within a
/// round trip plus its ack delay (25 ms), however long it takes to answer, so this is
/// generous even on a loaded machine.
pub const PEER_SILENCE_LIMIT: Duration = Duration::from_secs(2);
/// How often each pooled connection is checked for a silent peer (and, while a request
/// waits on a quiet peer, probed).
const SILENCE_CHECK_PERIOD: Duration = Duration::from_millis(100);
/// The liveness probe: an unreliable datagram, acknowledged by the peer's QUIC stack and
/// never read by its application.
const PROBE_DATAGRAM: &[u8] = b"?";

/// Bytes of the length prefix in front of every frame.
const FRAME_HEADER_SIZE: usize = 4;
/// Most bytes a frame body's buffer grows by per read.
const FRAME_READ_CHUNK: usize = 64 * 1024;
/// Stream reset code for a request over the size limit.
const RESET_TOO_LARGE: u32 = 413;
/// Connection close code when the node is at its connection limit.
const CLOSE_BUSY: u32 = 503;
/// Connection close code for a peer that went silent.
const CLOSE_SILENT: u32 = 408;
/// Connection close code for a peer whose hello was oversized, malformed or refused.
pub const CLOSE_UNAUTHENTICATED: u32 = 401;
/// Most bytes of a refusal's reason sent as the close reason (it must fit in one packet).
const MAX_CLOSE_REASON: usize = 200;

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A pooled connection, watched for a peer gone silent.
struct WatchedConnection {
    connection: Connection,
    /// While a request waits to be heard: when it was sent and how many frames the
    /// connection had received by then. Cleared once any frame arrives after that.
    unheard: Mutex<Option<(Instant, u64)>>,
    /// Requests on this connection waiting for their replies.
    waiting: AtomicUsize,
}

/// Counts one request as waiting on a connection until dropped.
struct WaitingReply<'a>(&'a WatchedConnection);

impl Drop for WaitingReply<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WatchedConnection {
    /// Frames received from the peer that prove it still holds the connection: datagrams
    /// alone do not, since a restarted peer answers packets of a connection it no longer
    /// knows (with stateless resets that fail authentication here), while only the peer
    /// that holds the keys sends frames that decrypt: acknowledgements, pings, stream data.
    fn received(&self) -> u64 {
        let frames = self.connection.stats().frame_rx;
        frames.acks + frames.path_acks + frames.ping + frames.stream + frames.max_data + frames.max_stream_data
    }

    /// Notes that a request is about to be sent. The oldest unheard request is the one
    /// watched; a frame received since it was sent means it was heard, and this one is next.
    fn request_sent(&self) {
        let received = self.received();
        let mut unheard = lock(&self.unheard);
        match *unheard {
            Some((_, before)) if before == received => {}
            _ => *unheard = Some((Instant::now(), received)),
        }
    }

    /// Counts a request as waiting for its reply until the returned guard drops.
    fn wait_for_reply(&self) -> WaitingReply<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingReply(self)
    }

    /// How long the peer has sent nothing while a request waited to be heard, if it has.
    fn silent_for(&self) -> Option<Duration> {
        let mut unheard = lock(&self.unheard);
        let (since, received) = (*unheard)?;
        if self.received() > received {
            *unheard = None;
            return None;
        }
        Some(since.elapsed())
    }
}

/// Closes `watched`'s connection once its peer has been silent for [`PEER_SILENCE_LIMIT`]
/// and marks the peer down in `dials`; ends when the connection closes or leaves the pool
/// and every lane on it is gone.
async fn close_when_silent(watched: Weak<WatchedConnection>, dials: Dials, key: PoolKey, peer: String) {
    let mut received_before = 0;
    loop {
        tokio::time::sleep(SILENCE_CHECK_PERIOD).await;
        let Some(watched) = watched.upgrade() else { return };
        if watched.connection.close_reason().is_some() {
            return;
        }
        // A reply is awaited and the peer sent nothing for a whole period: make it answer
        // (its acknowledgement of the probe), and count the probe as a request to be heard.
        let received = watched.received();
        if watched.waiting.load(Ordering::Relaxed) > 0 && received == received_before {
            watched.request_sent();
            // A peer without datagram support just keeps the old rule.
            let _ = watched.connection.send_datagram(bytes::Bytes::from_static(PROBE_DATAGRAM));
        }
        received_before = received;
        if let Some(silent) = watched.silent_for()
            && silent >= PEER_SILENCE_LIMIT
        {
            let silent_ms = silent.as_millis() as u64;
            tracing::warn!(peer, silent_ms, "peer went silent; closing the connection");
            watched.connection.close(VarInt::from_u32(CLOSE_SILENT), b"peer silent");
            dials.mark_down(key, format!("sent nothing for {silent_ms} ms while a request waited"));
            return;
        }
    }
}

/// One bi-stream carrying sequential request/reply exchanges.
struct Lane {
    send: SendStream,
    recv: RecvStream,
    /// The connection the streams belong to.
    connection: Arc<WatchedConnection>,
    idle_since: Instant,
}

/// A pooled connection, its idle lanes (most recently used last) and its multiplexed
/// stream, once a call used one.
struct PoolEntry {
    connection: Arc<WatchedConnection>,
    idle: Vec<Lane>,
    mux: Option<Arc<MuxSession>>,
}

/// The connection pool, shared with the dial tasks that fill it.
type Pool = Arc<Mutex<HashMap<PoolKey, PoolEntry>>>;

/// Sends requests to peers over pooled connections and lanes.
pub struct RpcClient {
    endpoint: Endpoint,
    pool: Pool,
    dials: Dials,
    read_timeout: Duration,
    /// Per peer, held while a multiplexed stream to it is being opened, so that callers
    /// arriving together open one stream, not one each (and a peer slow to answer holds up
    /// no other).
    mux_opening: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    /// The encoded hello each new stream opens with, by ALPN ([`EMPTY_HELLO`] if none).
    hellos: Mutex<HashMap<&'static [u8], Vec<u8>>>,
}

impl fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcClient").field("endpoint", &self.endpoint.id()).finish()
    }
}

impl Drop for RpcClient {
    fn drop(&mut self) {
        // A dial task holds the pool, not the client: stop it with the client.
        self.dials.abort_all();
    }
}

/// Dials `peer` on `alpn` from `endpoint` within [`CONNECT_TIMEOUT`] and pools the
/// connection, watched for silence.
async fn open_connection(
    endpoint: Endpoint,
    pool: Pool,
    dials: Dials,
    peer: PeerAddr,
    alpn: &'static [u8],
) -> Result<(), TransportError> {
    let connection = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(peer.endpoint_addr(), alpn))
        .await
        .map_err(|_| TransportError::ConnectTimeout {
            peer: peer.short(),
            after_ms: CONNECT_TIMEOUT.as_millis() as u64,
        })?
        .map_err(|error| TransportError::Connect { peer: peer.short(), reason: error.to_string() })?;
    let key = (peer.id, alpn);
    let watched = Arc::new(WatchedConnection { connection, unheard: Mutex::new(None), waiting: AtomicUsize::new(0) });
    tokio::spawn(close_when_silent(Arc::downgrade(&watched), dials, key, peer.short()));
    lock(&pool).insert(key, PoolEntry { connection: watched, idle: Vec::new(), mux: None });
    Ok(())
}

/// Encodes `message` as one frame (length prefix and postcard bytes), refusing one over
/// `MAX_RPC_MESSAGE_SIZE` before anything is sent.
fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, TransportError> {
    encode_with_header(message, FRAME_HEADER_SIZE)
}

/// Encodes a stream's hello frame, refusing one over `MAX_UNAUTHENTICATED_FRAME_SIZE`.
fn encode_hello<T: Serialize>(hello: &T) -> Result<Vec<u8>, TransportError> {
    let frame = encode_frame(hello)?;
    let size = frame.len() - FRAME_HEADER_SIZE;
    if size > MAX_UNAUTHENTICATED_FRAME_SIZE {
        return Err(TransportError::MessageTooLarge { size, max: MAX_UNAUTHENTICATED_FRAME_SIZE });
    }
    Ok(frame)
}

/// The hello of a caller with no credentials for an ALPN: an empty body, which decodes as
/// `()` (a handler that asks for nothing) and as nothing else.
const EMPTY_HELLO: [u8; FRAME_HEADER_SIZE] = [0; FRAME_HEADER_SIZE];

/// Encodes `message` behind a `header`-byte header whose first four bytes get the body's
/// little-endian length (the caller fills in the rest), refusing a body over
/// `MAX_RPC_MESSAGE_SIZE` before anything is sent.
pub(crate) fn encode_with_header<T: Serialize>(message: &T, header: usize) -> Result<Vec<u8>, TransportError> {
    let mut frame =
        postcard::to_extend(message, vec![0; header]).map_err(|error| TransportError::Codec(error.to_string()))?;
    let size = frame.len() - header;
    if size > MAX_RPC_MESSAGE_SIZE {
        return Err(TransportError::MessageTooLarge { size, max: MAX_RPC_MESSAGE_SIZE });
    }
    frame[..FRAME_HEADER_SIZE].copy_from_slice(&(size as u32).to_le_bytes());
    Ok(frame)
}

/// Decodes one request body, has `handler` answer it and encodes the reply with `encode`;
/// a body that does not decode or a reply too large to send gets the handler's rejection
/// instead. `None` if not even the rejection encodes.
pub(crate) async fn answer<H: RpcHandler>(
    handler: &H,
    peer: EndpointId,
    body: &[u8],
    encode: impl Fn(&H::Response) -> Result<Vec<u8>, TransportError> + Send,
) -> Option<Vec<u8>> {
    let reply = match postcard::from_bytes::<H::Request>(body) {
        Ok(request) => handler.handle(peer, request).await,
        Err(error) => {
            tracing::warn!(peer = %peer.fmt_short(), %error, "malformed request");
            handler.reject(peer, TransportError::Codec(error.to_string()))
        }
    };
    match encode(&reply) {
        Ok(frame) => Some(frame),
        Err(error) => encode(&handler.reject(peer, error)).ok(),
    }
}

/// Why a frame could not be read.
enum FrameError {
    /// The stream ended cleanly where a frame would start.
    Ended,
    /// The length prefix announces more than the limit.
    TooLarge(usize),
    /// The stream failed or ended inside a frame.
    Stream(String),
}

/// Reads the length prefix of the next frame, of at most `max` bytes.
async fn read_frame_header(recv: &mut RecvStream, max: usize) -> Result<usize, FrameError> {
    let mut header = [0u8; FRAME_HEADER_SIZE];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(FrameError::Ended),
        Err(error) => return Err(FrameError::Stream(error.to_string())),
    }
    let size = u32::from_le_bytes(header) as usize;
    if size > max {
        return Err(FrameError::TooLarge(size));
    }
    Ok(size)
}

/// Reads a frame body of `size` bytes (already checked against the limit). The buffer
/// grows as bytes arrive, never ahead of them: a peer that announces a large frame and
/// sends nothing costs no memory.
async fn read_frame_body(recv: &mut RecvStream, size: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::with_capacity(size.min(FRAME_READ_CHUNK));
    while body.len() < size {
        match recv.read_chunk((size - body.len()).min(FRAME_READ_CHUNK)).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => {
                return Err(format!("stream ended {} bytes into a {size}-byte frame", body.len()));
            }
            Err(error) => return Err(error.to_string()),
        }
    }
    Ok(body)
}

impl RpcClient {
    /// A client sending from `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        RpcClient::with_read_timeout(endpoint, READ_TIMEOUT)
    }

    /// A client with a custom reply timeout (for long operations such as snapshot installs).
    pub fn with_read_timeout(endpoint: Endpoint, read_timeout: Duration) -> Self {
        RpcClient {
            endpoint,
            pool: Pool::default(),
            dials: Dials::default(),
            read_timeout,
            mux_opening: Mutex::new(HashMap::new()),
            hellos: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the credentials every new stream on `alpn` opens with (the server's
    /// [`RpcHandler::Hello`]); at most `MAX_UNAUTHENTICATED_FRAME_SIZE` bytes encoded.
    pub fn set_hello<T: Serialize>(&self, alpn: &'static [u8], hello: &T) -> Result<(), TransportError> {
        let frame = encode_hello(hello)?;
        lock(&self.hellos).insert(alpn, frame);
        Ok(())
    }

    fn hello_frame(&self, alpn: &'static [u8]) -> Vec<u8> {
        lock(&self.hellos).get(alpn).cloned().unwrap_or_else(|| EMPTY_HELLO.to_vec())
    }

    /// The typed refusal if the peer closed `watched` for our credentials.
    fn refusal(watched: &WatchedConnection, peer: &PeerAddr) -> Option<TransportError> {
        match watched.connection.close_reason()? {
            ConnectionError::ApplicationClosed(close)
                if close.error_code == VarInt::from_u32(CLOSE_UNAUTHENTICATED) =>
            {
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                Some(TransportError::Unauthenticated { peer: peer.short(), reason })
            }
            _ => None,
        }
    }

    /// The endpoint requests are sent from.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn lock_pool(&self) -> MutexGuard<'_, HashMap<PoolKey, PoolEntry>> {
        lock(&self.pool)
    }

    fn pooled(&self, key: &PoolKey) -> Option<Arc<WatchedConnection>> {
        let pool = self.lock_pool();
        pool.get(key)
            .map(|entry| &entry.connection)
            .filter(|watched| watched.connection.close_reason().is_none())
            .cloned()
    }

    fn forget(&self, key: &PoolKey) {
        self.lock_pool().remove(key);
    }

    /// An idle lane to `key` on a live connection, dropping lanes too old to trust.
    fn take_idle_lane(&self, key: &PoolKey) -> Option<Lane> {
        let mut pool = self.lock_pool();
        let entry = pool.get_mut(key)?;
        if entry.connection.connection.close_reason().is_some() {
            pool.remove(key);
            return None;
        }
        entry.idle.retain(|lane| lane.idle_since.elapsed() < LANE_REUSE_WINDOW);
        entry.idle.pop()
    }

    /// Returns `lane` to the pool, unless its connection was replaced or the pool is full
    /// (then dropping it finishes the stream and the server's task ends).
    fn return_lane(&self, key: PoolKey, mut lane: Lane) {
        let mut pool = self.lock_pool();
        let Some(entry) = pool.get_mut(&key) else { return };
        if !Arc::ptr_eq(&entry.connection, &lane.connection) || entry.idle.len() >= MAX_IDLE_LANES_PER_PEER {
            return;
        }
        lane.idle_since = Instant::now();
        entry.idle.push(lane);
    }

    /// How many idle lanes are pooled for `peer` on `alpn`.
    pub fn idle_lanes(&self, peer: &PeerAddr, alpn: &'static [u8]) -> usize {
        self.lock_pool().get(&(peer.id, alpn)).map_or(0, |entry| entry.idle.len())
    }

    /// Connects to `peer` on `alpn` (or reuses the pooled connection), without a request.
    /// Fails at once with [`TransportError::PeerDown`] while the peer is taken for down.
    pub async fn connect(&self, peer: &PeerAddr, alpn: &'static [u8]) -> Result<Connection, TransportError> {
        Ok(self.watched_connection(peer, alpn).await?.connection.clone())
    }

    /// What the pool knows about reaching `peer` on `alpn`.
    pub fn reachability(&self, peer: &PeerAddr, alpn: &'static [u8]) -> Reachability {
        let key = (peer.id, alpn);
        if self.pooled(&key).is_some() {
            return Reachability::Connected;
        }
        self.dials.reachability(&key).unwrap_or(Reachability::Unknown)
    }

    /// The pooled connection to `peer` on `alpn`, or a new one (then watched for silence),
    /// dialed once however many callers need it; fails at once while the peer is down.
    async fn watched_connection(
        &self,
        peer: &PeerAddr,
        alpn: &'static [u8],
    ) -> Result<Arc<WatchedConnection>, TransportError> {
        let key = (peer.id, alpn);
        if let Some(watched) = self.pooled(&key) {
            return Ok(watched);
        }
        let (endpoint, pool, dials) = (self.endpoint.clone(), Arc::clone(&self.pool), self.dials.clone());
        let target = peer.clone();
        self.dials.dial(key, &peer.short(), move || open_connection(endpoint, pool, dials, target, alpn)).await?;
        self.pooled(&key).ok_or_else(|| TransportError::Connect {
            peer: peer.short(),
            reason: "the new connection closed at once".into(),
        })
    }

    /// A lane to `peer`: an idle pooled one, or a new stream.
    async fn lane(&self, peer: &PeerAddr, alpn: &'static [u8]) -> Result<Lane, TransportError> {
        let key = (peer.id, alpn);
        if let Some(lane) = self.take_idle_lane(&key) {
            return Ok(lane);
        }
        let (connection, send, recv) = self.open_stream(peer, alpn).await?;
        Ok(Lane { send, recv, connection, idle_since: Instant::now() })
    }

    /// Opens a bi-stream to `peer` on `alpn`, on the pooled connection or a new one, and
    /// writes its hello.
    async fn open_stream(
        &self,
        peer: &PeerAddr,
        alpn: &'static [u8],
    ) -> Result<(Arc<WatchedConnection>, SendStream, RecvStream), TransportError> {
        let key = (peer.id, alpn);
        let hello = self.hello_frame(alpn);
        // A pooled connection may have died since last use; opening a stream tells, and
        // no request was sent yet, so one retry on a fresh connection is always safe.
        let mut attempt = 0;
        loop {
            let watched = self.watched_connection(peer, alpn).await?;
            let open = async {
                let (mut send, recv) = watched.connection.open_bi().await.map_err(|error| error.to_string())?;
                // Returns once quinn holds it (no round trip): the first request follows at once.
                send.write_all(&hello).await.map_err(|error| error.to_string())?;
                Ok::<_, String>((send, recv))
            };
            let opened = tokio::time::timeout(STREAM_OPEN_TIMEOUT, open).await;
            match opened {
                Ok(Ok((send, recv))) => return Ok((watched, send, recv)),
                Ok(Err(error)) if attempt == 0 => {
                    tracing::debug!(peer = %peer.short(), %error, "pooled connection is dead; reconnecting");
                    self.forget(&key);
                    attempt += 1;
                }
                Ok(Err(error)) => {
                    self.forget(&key);
                    return Err(TransportError::Connect { peer: peer.short(), reason: error });
                }
                Err(_) => {
                    self.forget(&key);
                    let after_ms = STREAM_OPEN_TIMEOUT.as_millis() as u64;
                    return Err(TransportError::OpenTimeout { peer: peer.short(), after_ms });
                }
            }
        }
    }

    /// Sends `request` to `peer` on `alpn` and decodes the reply.
    pub async fn call<Req, Resp>(
        &self,
        peer: &PeerAddr,
        alpn: &'static [u8],
        request: &Req,
    ) -> Result<Resp, TransportError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let frame = encode_frame(request)?;
        let mut lane = self.lane(peer, alpn).await?;
        let stream_error = |reason: String| TransportError::Stream { peer: peer.short(), reason };
        // A failed or timed-out exchange drops the lane (its stream is finished, never
        // reused), so a late reply can never be read as the answer to a later request.
        lane.connection.request_sent();
        let connection = Arc::clone(&lane.connection);
        let waiting = connection.wait_for_reply();
        let exchange = async {
            lane.send.write_all(&frame).await.map_err(|error| stream_error(error.to_string()))?;
            let size = match read_frame_header(&mut lane.recv, MAX_RPC_MESSAGE_SIZE).await {
                Ok(size) => size,
                Err(FrameError::TooLarge(size)) => {
                    return Err(TransportError::MessageTooLarge { size, max: MAX_RPC_MESSAGE_SIZE });
                }
                Err(FrameError::Ended) => return Err(stream_error("the peer ended the stream".into())),
                Err(FrameError::Stream(reason)) => return Err(stream_error(reason)),
            };
            read_frame_body(&mut lane.recv, size).await.map_err(stream_error)
        };
        let reply = tokio::time::timeout(self.read_timeout, exchange)
            .await
            .map_err(|_| TransportError::ReadTimeout {
                peer: peer.short(),
                after_ms: self.read_timeout.as_millis() as u64,
            })?
            .map_err(|error| RpcClient::refusal(&lane.connection, peer).unwrap_or(error))?;
        drop(waiting);
        self.return_lane((peer.id, alpn), lane);
        postcard::from_bytes(&reply).map_err(|error| TransportError::Codec(error.to_string()))
    }

    /// The pooled multiplexed stream for `key`, if it and its connection still work.
    fn pooled_mux(&self, key: &PoolKey) -> Option<(Arc<WatchedConnection>, Arc<MuxSession>)> {
        let pool = self.lock_pool();
        let entry = pool.get(key)?;
        let session = entry.mux.as_ref()?;
        if entry.connection.connection.close_reason().is_some() || session.is_broken() {
            return None;
        }
        Some((Arc::clone(&entry.connection), Arc::clone(session)))
    }

    /// The multiplexed stream to `peer` on `alpn`: the pooled one while it works, or a new
    /// one (on a new connection if the pooled one died).
    async fn mux_session(
        &self,
        peer: &PeerAddr,
        alpn: &'static [u8],
    ) -> Result<(Arc<WatchedConnection>, Arc<MuxSession>), TransportError> {
        let key = (peer.id, alpn);
        if let Some(found) = self.pooled_mux(&key) {
            return Ok(found);
        }
        let opening = Arc::clone(lock(&self.mux_opening).entry(key).or_default());
        let _opening = opening.lock().await;
        if let Some(found) = self.pooled_mux(&key) {
            return Ok(found);
        }
        let (watched, send, recv) = self.open_stream(peer, alpn).await?;
        let session = MuxSession::start(send, recv, peer.short());
        if let Some(entry) = self.lock_pool().get_mut(&key)
            && Arc::ptr_eq(&entry.connection, &watched)
        {
            entry.mux = Some(Arc::clone(&session));
        }
        Ok((watched, session))
    }

    /// Sends `request` to `peer` on `alpn` over the connection's multiplexed stream (see
    /// [`crate::mux`]) and decodes the reply; the server must serve `alpn` with a
    /// [`crate::mux::MuxProtocol`]. Many calls may wait on the stream at once.
    pub async fn call_muxed<Req, Resp>(
        &self,
        peer: &PeerAddr,
        alpn: &'static [u8],
        request: &Req,
    ) -> Result<Resp, TransportError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let (watched, session) = self.mux_session(peer, alpn).await?;
        let _waiting = watched.wait_for_reply();
        let exchange = async {
            watched.request_sent();
            let mut claim = session.send(request).await?;
            claim.reply(&session).await
        };
        let reply = tokio::time::timeout(self.read_timeout, exchange)
            .await
            .map_err(|_| TransportError::ReadTimeout {
                peer: peer.short(),
                after_ms: self.read_timeout.as_millis() as u64,
            })?
            .map_err(|error| RpcClient::refusal(&watched, peer).unwrap_or(error))?;
        postcard::from_bytes(&reply).map_err(|error| TransportError::Codec(error.to_string()))
    }

    /// Cancels every dial under way and closes every pooled connection.
    pub fn close_all(&self) {
        self.dials.abort_all();
        lock(&self.mux_opening).clear();
        let mut pool = self.lock_pool();
        for (_, entry) in pool.drain() {
            entry.connection.connection.close(VarInt::from_u32(0), b"closing");
        }
    }
}

/// The server side of one ALPN: checks each stream's hello, decodes requests, hands them
/// to the handler, encodes replies.
pub trait RpcHandler: Send + Sync + 'static {
    /// The credentials that open every stream (`()` for none), at most
    /// `MAX_UNAUTHENTICATED_FRAME_SIZE` bytes encoded.
    type Hello: DeserializeOwned + Send;
    /// The request type.
    type Request: DeserializeOwned + Send;
    /// The reply type.
    type Response: Serialize + Send;

    /// Checks a stream's hello from the authenticated endpoint `peer` before any request on
    /// the stream is read; `Err(reason)` closes the connection with that reason.
    fn authenticate(&self, peer: EndpointId, hello: Self::Hello) -> Result<(), String>;

    /// Handles one request from the authenticated endpoint `peer`.
    fn handle(&self, peer: EndpointId, request: Self::Request) -> impl Future<Output = Self::Response> + Send;

    /// The reply to a request that could not be decoded or was too large.
    fn reject(&self, peer: EndpointId, error: TransportError) -> Self::Response;
}

/// Serves an [`RpcHandler`] as an iroh protocol, with connection and message bounds.
pub struct RpcProtocol<H> {
    handler: Arc<H>,
    connections: ConnectionLimit,
}

impl<H> RpcProtocol<H> {
    /// Serves `handler`, accepting at most `MAX_CONCURRENT_CONNECTIONS` connections at once.
    pub fn new(handler: Arc<H>) -> Self {
        RpcProtocol { handler, connections: ConnectionLimit::default() }
    }
}

impl<H> fmt::Debug for RpcProtocol<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcProtocol").field("free_connections", &self.connections.free()).finish()
    }
}

impl<H: RpcHandler> ProtocolHandler for RpcProtocol<H> {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let peer = connection.remote_id();
        let Some(_permit) = self.connections.admit(&connection) else { return Ok(()) };
        accept_streams(&connection, |send, recv| {
            tokio::spawn(serve_lane(Arc::clone(&self.handler), connection.clone(), peer, send, recv));
        })
        .await;
        Ok(())
    }
}

/// Admits at most `MAX_CONCURRENT_CONNECTIONS` connections at once.
pub(crate) struct ConnectionLimit(Arc<Semaphore>);

impl Default for ConnectionLimit {
    fn default() -> Self {
        ConnectionLimit(Arc::new(Semaphore::new(MAX_CONCURRENT_CONNECTIONS)))
    }
}

impl ConnectionLimit {
    /// How many more connections would be admitted now.
    pub(crate) fn free(&self) -> usize {
        self.0.available_permits()
    }

    /// A place for `connection`, held until dropped, or `None` once the connection has been
    /// closed as refused.
    pub(crate) fn admit(&self, connection: &Connection) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.0).try_acquire_owned().ok();
        if permit.is_none() {
            tracing::warn!(peer = %connection.remote_id().fmt_short(), "connection limit reached; refusing");
            connection.close(VarInt::from_u32(CLOSE_BUSY), b"too many connections");
        }
        permit
    }
}

/// Hands every bi-stream the peer opens on `connection` to `serve` until the connection ends.
/// Streams are bounded per connection by the QUIC config (MAX_STREAMS_PER_CONNECTION), so
/// whatever `serve` spawns per stream is bounded too.
pub(crate) async fn accept_streams(connection: &Connection, mut serve: impl FnMut(SendStream, RecvStream)) {
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => serve(send, recv),
            Err(ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed) => return,
            Err(error) => {
                tracing::debug!(peer = %connection.remote_id().fmt_short(), %error, "connection ended");
                return;
            }
        }
    }
}

/// Reads the hello that opens a stream and has `handler` check it; whether requests may
/// follow. A hello that is oversized (its body is never read), malformed or refused closes
/// the whole connection: every stream on it is the same peer's. A stream that ends or
/// breaks before its hello, or sends none in time, just ends.
pub(crate) async fn authenticate_stream<H: RpcHandler>(
    handler: &H,
    connection: &Connection,
    peer: EndpointId,
    recv: &mut RecvStream,
) -> bool {
    let hello = async {
        let size = read_frame_header(recv, MAX_UNAUTHENTICATED_FRAME_SIZE).await?;
        read_frame_body(recv, size).await.map_err(FrameError::Stream)
    };
    let verdict = match tokio::time::timeout(READ_TIMEOUT, hello).await {
        Ok(Ok(body)) => match postcard::from_bytes::<H::Hello>(&body) {
            Ok(hello) => handler.authenticate(peer, hello),
            Err(error) => Err(format!("malformed hello: {error}")),
        },
        Ok(Err(FrameError::TooLarge(size))) => Err(format!(
            "a first frame of {size} bytes before credentials; the limit is {MAX_UNAUTHENTICATED_FRAME_SIZE}"
        )),
        Ok(Err(FrameError::Ended | FrameError::Stream(_))) | Err(_) => return false,
    };
    match verdict {
        Ok(()) => true,
        Err(mut reason) => {
            tracing::warn!(peer = %peer.fmt_short(), %reason, "refused a peer's credentials; closing the connection");
            if reason.len() > MAX_CLOSE_REASON {
                let mut end = MAX_CLOSE_REASON;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            connection.close(VarInt::from_u32(CLOSE_UNAUTHENTICATED), reason.as_bytes());
            false
        }
    }
}

/// Answers the requests of one lane in order, after its hello, until the client finishes
/// it, it stays idle for `LANE_IDLE_TIMEOUT`, or it breaks.
async fn serve_lane<H: RpcHandler>(
    handler: Arc<H>,
    connection: Connection,
    peer: EndpointId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    if !authenticate_stream(&*handler, &connection, peer, &mut recv).await {
        return;
    }
    drop(connection);
    // The request that opened the lane is already on its way; later ones may take a while.
    let mut wait_for_request = READ_TIMEOUT;
    loop {
        let size =
            match tokio::time::timeout(wait_for_request, read_frame_header(&mut recv, MAX_RPC_MESSAGE_SIZE)).await {
                Ok(Ok(size)) => size,
                Ok(Err(FrameError::Ended)) => return,
                Ok(Err(FrameError::TooLarge(size))) => {
                    tracing::warn!(peer = %peer.fmt_short(), size, "request over the size limit");
                    let _ = send.reset(VarInt::from_u32(RESET_TOO_LARGE));
                    let _ = recv.stop(VarInt::from_u32(RESET_TOO_LARGE));
                    return;
                }
                Ok(Err(FrameError::Stream(reason))) => {
                    tracing::debug!(peer = %peer.fmt_short(), %reason, "request stream failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer.fmt_short(), "lane idle; ending it");
                    return;
                }
            };
        let body = match tokio::time::timeout(READ_TIMEOUT, read_frame_body(&mut recv, size)).await {
            Ok(Ok(body)) => body,
            Ok(Err(reason)) => {
                tracing::debug!(peer = %peer.fmt_short(), %reason, "request stream failed mid-frame");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %peer.fmt_short(), "request not received in time");
                return;
            }
        };
        let Some(frame) = answer(&*handler, peer, &body, encode_frame).await else { return };
        if send.write_all(&frame).await.is_err() {
            return;
        }
        wait_for_request = LANE_IDLE_TIMEOUT;
    }
}
