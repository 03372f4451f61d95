//! Multiplexed request/response RPC over one QUIC bi-stream per connection, for many
//! concurrent callers (the client protocol): every request carries an id, the server answers
//! them in whatever order they finish, and each side writes whatever has queued up since its
//! last write in one go. A batch of writes committed together therefore goes back to a client
//! connection as one stream write (one datagram for small replies), and that client's next
//! requests go out together too, as HTTP/2 does for etcd's gRPC. With a lane per call (see
//! [`crate::rpc`]), each reply and each request was its own write, its own datagram and
//! its own acknowledgement: most of a write's packets.
//!
//! The stream opens with the caller's hello (a lane frame, see [`crate::rpc`]), checked
//! before anything else on the stream is read. After it, a frame is a little-endian u32
//! body length, a little-endian u64 request id and a postcard body of at most
//! `MAX_RPC_MESSAGE_SIZE` bytes. At most [`MAX_MUX_IN_FLIGHT`] requests wait
//! per stream on either side: callers beyond it wait for a slot, and a server at the bound
//! stops reading, which QUIC's flow control turns into back-pressure. A reply that comes
//! after its caller gave up is dropped by id, so it can never answer another request.
//!
//! The price is head-of-line blocking within one connection: a 10 MiB reply delays the small
//! ones queued behind it by its transfer time, as on any single ordered stream.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aspen_api::limits::MAX_RPC_MESSAGE_SIZE;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use iroh::EndpointId;
use iroh::endpoint::{Connection, RecvStream, SendStream, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::error::TransportError;
use crate::rpc::{ConnectionLimit, RpcHandler, accept_streams, answer, authenticate_stream, encode_with_header, lock};

/// Most requests waiting for their reply on one multiplexed stream, on either side.
pub const MAX_MUX_IN_FLIGHT: usize = 1024;
/// Most bytes one write gathers from queued frames (a frame larger than this goes alone).
pub const MAX_MUX_WRITE_BATCH: usize = 256 * 1024;
/// Bytes in front of every multiplexed frame: body length (u32) and request id (u64).
pub const MUX_HEADER_SIZE: usize = 12;
/// Most bytes read from the stream at a time.
const MUX_READ_CHUNK: usize = 64 * 1024;
/// Stream reset code for a frame over the size limit.
const RESET_TOO_LARGE: u32 = 413;

/// Encodes `message` as a multiplexed frame with request id `id`, refusing one over
/// `MAX_RPC_MESSAGE_SIZE` before anything is sent.
pub fn encode_mux_frame<T: Serialize>(id: u64, message: &T) -> Result<Vec<u8>, TransportError> {
    let mut frame = encode_with_header(message, MUX_HEADER_SIZE)?;
    frame[4..MUX_HEADER_SIZE].copy_from_slice(&id.to_le_bytes());
    Ok(frame)
}

/// What the front of a buffer of received bytes holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole frame yet.
    Incomplete,
    /// A frame: its request id and where its body lies in the buffer; it ends at `body.end`.
    Frame {
        /// The request id.
        id: u64,
        /// The body's byte range in the buffer.
        body: std::ops::Range<usize>,
    },
    /// A header announcing a body over `MAX_RPC_MESSAGE_SIZE`.
    TooLarge(usize),
}

/// Parses the frame starting at `start` of `buffer`.
pub fn parse_mux_frame(buffer: &[u8], start: usize) -> Parsed {
    let Some(header) = buffer.get(start..start + MUX_HEADER_SIZE) else { return Parsed::Incomplete };
    let mut size = [0u8; 4];
    size.copy_from_slice(&header[..4]);
    let size = u32::from_le_bytes(size) as usize;
    if size > MAX_RPC_MESSAGE_SIZE {
        return Parsed::TooLarge(size);
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&header[4..]);
    let body = start + MUX_HEADER_SIZE..start + MUX_HEADER_SIZE + size;
    if buffer.len() < body.end {
        return Parsed::Incomplete;
    }
    Parsed::Frame { id: u64::from_le_bytes(id), body }
}

/// Callers waiting for their reply, by request id.
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Result<Vec<u8>, TransportError>>>,
    /// Set once the stream broke: no request is registered after that.
    broken: Option<TransportError>,
}

/// The client side of one multiplexed stream.
pub(crate) struct MuxSession {
    peer: String,
    next_id: AtomicU64,
    /// Frames for the writer task.
    outbox: mpsc::Sender<Vec<u8>>,
    pending: Arc<Mutex<Pending>>,
    slots: Arc<Semaphore>,
}

impl fmt::Debug for MuxSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSession").field("peer", &self.peer).finish()
    }
}

/// A caller's claim on a reply: unregisters its id if dropped before the reply came.
pub(crate) struct ReplySlot {
    id: u64,
    reply: oneshot::Receiver<Result<Vec<u8>, TransportError>>,
    pending: Arc<Mutex<Pending>>,
    _slot: OwnedSemaphorePermit,
}

impl ReplySlot {
    /// Waits for the reply's body.
    pub(crate) async fn reply(&mut self, session: &MuxSession) -> Result<Vec<u8>, TransportError> {
        match (&mut self.reply).await {
            Ok(reply) => reply,
            Err(_) => Err(TransportError::Stream { peer: session.peer.clone(), reason: "the stream closed".into() }),
        }
    }
}

impl Drop for ReplySlot {
    fn drop(&mut self) {
        lock(&self.pending).waiting.remove(&self.id);
    }
}

impl MuxSession {
    /// Starts the writer and reader tasks of a newly opened multiplexed stream.
    pub(crate) fn start(send: SendStream, recv: RecvStream, peer: String) -> Arc<MuxSession> {
        let (outbox, queue) = mpsc::channel(MAX_MUX_IN_FLIGHT);
        let pending = Arc::new(Mutex::new(Pending { waiting: HashMap::new(), broken: None }));
        tokio::spawn(write_frames(send, queue, Arc::clone(&pending), peer.clone()));
        tokio::spawn(read_replies(recv, Arc::clone(&pending), peer.clone()));
        Arc::new(MuxSession {
            peer,
            next_id: AtomicU64::new(0),
            outbox,
            pending,
            slots: Arc::new(Semaphore::new(MAX_MUX_IN_FLIGHT)),
        })
    }

    /// Whether the stream broke (a new session is needed).
    pub(crate) fn is_broken(&self) -> bool {
        lock(&self.pending).broken.is_some()
    }

    /// Queues `request` and returns the claim on its reply.
    pub(crate) async fn send<T: Serialize>(&self, request: &T) -> Result<ReplySlot, TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_mux_frame(id, request)?;
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| TransportError::NotSent { peer: self.peer.clone(), reason: "session closed".into() })?;
        let (tx, reply) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if let Some(error) = &pending.broken {
                return Err(TransportError::NotSent { peer: self.peer.clone(), reason: error.to_string() });
            }
            pending.waiting.insert(id, tx);
        }
        let claim = ReplySlot { id, reply, pending: Arc::clone(&self.pending), _slot: slot };
        if self.outbox.send(frame).await.is_err() {
            let reason = "the stream's writer ended".to_string();
            return Err(TransportError::NotSent { peer: self.peer.clone(), reason });
        }
        Ok(claim)
    }
}

/// Fails every waiting caller with `error` and refuses new requests.
fn break_session(pending: &Mutex<Pending>, error: TransportError) {
    let mut pending = lock(pending);
    if pending.broken.is_none() {
        pending.broken = Some(error.clone());
    }
    for (_, waiter) in pending.waiting.drain() {
        let _ = waiter.send(Err(error.clone()));
    }
}

/// Writes queued frames, everything queued so far in one write, until every sender is gone
/// (then finishes the stream) or the stream fails.
async fn write_frames(
    mut send: SendStream,
    mut queue: mpsc::Receiver<Vec<u8>>,
    pending: Arc<Mutex<Pending>>,
    peer: String,
) {
    while let Some(mut batch) = queue.recv().await {
        while batch.len() < MAX_MUX_WRITE_BATCH {
            match queue.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        if let Err(error) = send.write_all(&batch).await {
            break_session(&pending, TransportError::Stream { peer, reason: error.to_string() });
            return;
        }
    }
    let _ = send.finish();
}

/// Hands each reply to its caller until the stream ends or fails.
async fn read_replies(mut recv: RecvStream, pending: Arc<Mutex<Pending>>, peer: String) {
    let mut buffer = Vec::new();
    let error = loop {
        let mut start = 0;
        loop {
            match parse_mux_frame(&buffer, start) {
                Parsed::Incomplete => break,
                Parsed::TooLarge(size) => {
                    let _ = recv.stop(VarInt::from_u32(RESET_TOO_LARGE));
                    break_session(&pending, TransportError::MessageTooLarge { size, max: MAX_RPC_MESSAGE_SIZE });
                    return;
                }
                Parsed::Frame { id, body } => {
                    let waiter = lock(&pending).waiting.remove(&id);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(Ok(buffer[body.clone()].to_vec()));
                    }
                    start = body.end;
                }
            }
        }
        buffer.drain(..start);
        match recv.read_chunk(MUX_READ_CHUNK).await {
            Ok(Some(chunk)) => buffer.extend_from_slice(&chunk),
            Ok(None) => break "the peer ended the stream".to_string(),
            Err(error) => break error.to_string(),
        }
    };
    break_session(&pending, TransportError::Stream { peer, reason: error });
}

/// Serves an [`RpcHandler`] over multiplexed streams, with connection and in-flight bounds.
pub struct MuxProtocol<H> {
    handler: Arc<H>,
    connections: ConnectionLimit,
}

impl<H> MuxProtocol<H> {
    /// Serves `handler`, accepting at most `MAX_CONCURRENT_CONNECTIONS` connections at once.
    pub fn new(handler: Arc<H>) -> Self {
        MuxProtocol { handler, connections: ConnectionLimit::default() }
    }
}

impl<H> fmt::Debug for MuxProtocol<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxProtocol").field("free_connections", &self.connections.free()).finish()
    }
}

impl<H: RpcHandler> ProtocolHandler for MuxProtocol<H> {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let peer = connection.remote_id();
        let Some(_permit) = self.connections.admit(&connection) else { return Ok(()) };
        accept_streams(&connection, |send, recv| {
            tokio::spawn(serve_stream(Arc::clone(&self.handler), connection.clone(), peer, send, recv));
        })
        .await;
        Ok(())
    }
}

/// Handles one request body.
async fn handle<H: RpcHandler>(handler: &H, peer: EndpointId, id: u64, body: Vec<u8>) -> Option<Vec<u8>> {
    answer(handler, peer, &body, |reply| encode_mux_frame(id, reply)).await
}

/// Serves one multiplexed stream, after its hello (see [`crate::rpc`]): runs up to
/// [`MAX_MUX_IN_FLIGHT`] requests at once on this task and writes every reply finished by
/// the time it gets to write in one go. Ends when the client finishes the stream and every
/// reply is written, or the stream fails.
async fn serve_stream<H: RpcHandler>(
    handler: Arc<H>,
    connection: Connection,
    peer: EndpointId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let handler = &*handler;
    if !authenticate_stream(handler, &connection, peer, &mut recv).await {
        return;
    }
    drop(connection);
    let mut in_flight = FuturesUnordered::new();
    let mut inbox: Vec<u8> = Vec::new();
    let mut replies: Vec<u8> = Vec::new();
    let mut requests_ended = false;
    loop {
        let mut start = 0;
        while in_flight.len() < MAX_MUX_IN_FLIGHT {
            match parse_mux_frame(&inbox, start) {
                Parsed::Incomplete => break,
                Parsed::TooLarge(size) => {
                    tracing::warn!(peer = %peer.fmt_short(), size, "request over the size limit");
                    let _ = send.reset(VarInt::from_u32(RESET_TOO_LARGE));
                    let _ = recv.stop(VarInt::from_u32(RESET_TOO_LARGE));
                    return;
                }
                Parsed::Frame { id, body } => {
                    in_flight.push(handle(handler, peer, id, inbox[body.clone()].to_vec()));
                    start = body.end;
                }
            }
        }
        inbox.drain(..start);
        if requests_ended && in_flight.is_empty() {
            if !inbox.is_empty() {
                // Finished, not reset: the replies already written still reach the client.
                tracing::debug!(peer = %peer.fmt_short(), bytes = inbox.len(), "request stream ended inside a frame");
            }
            let _ = send.finish();
            return;
        }
        let can_read = !requests_ended && in_flight.len() < MAX_MUX_IN_FLIGHT;
        tokio::select! {
            Some(frame) = in_flight.next(), if !in_flight.is_empty() => {
                replies.extend(frame.into_iter().flatten());
                // Every other reply that is ready goes in the same write.
                while replies.len() < MAX_MUX_WRITE_BATCH {
                    match in_flight.next().now_or_never() {
                        Some(Some(frame)) => replies.extend(frame.into_iter().flatten()),
                        _ => break,
                    }
                }
                if send.write_all(&replies).await.is_err() {
                    return;
                }
                replies.clear();
            }
            chunk = recv.read_chunk(MUX_READ_CHUNK), if can_read => match chunk {
                Ok(Some(chunk)) => inbox.extend_from_slice(&chunk),
                Ok(None) => requests_ended = true,
                Err(error) => {
                    tracing::debug!(peer = %peer.fmt_short(), %error, "request stream failed");
                    return;
                }
            },
            else => return,
        }
    }
}
