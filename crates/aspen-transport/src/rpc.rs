//! Bounded request/response RPC over QUIC: one request per bi-stream, each message a
//! postcard frame of at most `MAX_RPC_MESSAGE_SIZE` bytes, every step under a timeout,
//! connections pooled per (peer, ALPN) and re-established when they die.
//!
//! Why not irpc: its message bound is a fixed 16 MiB and an oversized message tears down
//! the shared connection; Aspen needs its own 10 MiB bound, checked before sending with a
//! typed error and no collateral damage to other calls (see docs/adr/0002).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aspen_api::limits::{MAX_CONCURRENT_CONNECTIONS, MAX_RPC_MESSAGE_SIZE};
use iroh::endpoint::{Connection, ConnectionError, ReadToEndError, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{Endpoint, EndpointId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::error::TransportError;
use crate::peer::PeerAddr;

/// Longest wait for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait to open a stream on a connection.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a reply once the request is sent.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Stream reset code for a request over the size limit.
const RESET_TOO_LARGE: u32 = 413;
/// Connection close code when the node is at its connection limit.
const CLOSE_BUSY: u32 = 503;

/// Sends requests to peers over pooled connections.
pub struct RpcClient {
    endpoint: Endpoint,
    pool: Mutex<HashMap<(EndpointId, &'static [u8]), Connection>>,
    read_timeout: Duration,
}

impl fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcClient").field("endpoint", &self.endpoint.id()).finish()
    }
}

fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, TransportError> {
    let bytes = postcard::to_stdvec(message).map_err(|error| TransportError::Codec(error.to_string()))?;
    if bytes.len() > MAX_RPC_MESSAGE_SIZE {
        return Err(TransportError::MessageTooLarge { size: bytes.len(), max: MAX_RPC_MESSAGE_SIZE });
    }
    Ok(bytes)
}

impl RpcClient {
    /// A client sending from `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        RpcClient { endpoint, pool: Mutex::new(HashMap::new()), read_timeout: READ_TIMEOUT }
    }

    /// A client with a custom reply timeout (for long operations such as snapshot installs).
    pub fn with_read_timeout(endpoint: Endpoint, read_timeout: Duration) -> Self {
        RpcClient { endpoint, pool: Mutex::new(HashMap::new()), read_timeout }
    }

    /// The endpoint requests are sent from.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn pooled(&self, key: &(EndpointId, &'static [u8])) -> Option<Connection> {
        let pool = self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pool.get(key).filter(|connection| connection.close_reason().is_none()).cloned()
    }

    fn forget(&self, key: &(EndpointId, &'static [u8])) {
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(key);
    }

    /// Connects to `peer` on `alpn` (or reuses the pooled connection), without a request.
    pub async fn connect(&self, peer: &PeerAddr, alpn: &'static [u8]) -> Result<Connection, TransportError> {
        let key = (peer.id, alpn);
        if let Some(connection) = self.pooled(&key) {
            return Ok(connection);
        }
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint.connect(peer.endpoint_addr(), alpn))
            .await
            .map_err(|_| TransportError::ConnectTimeout {
                peer: peer.short(),
                after_ms: CONNECT_TIMEOUT.as_millis() as u64,
            })?
            .map_err(|error| TransportError::Connect { peer: peer.short(), reason: error.to_string() })?;
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key, connection.clone());
        Ok(connection)
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
        let bytes = encode(request)?;
        let key = (peer.id, alpn);
        // A pooled connection may have died since last use; opening a stream tells, and
        // nothing was sent yet, so one retry on a fresh connection is always safe.
        let mut attempt = 0;
        let (mut send, mut recv) = loop {
            let connection = self.connect(peer, alpn).await?;
            let opened = tokio::time::timeout(STREAM_OPEN_TIMEOUT, connection.open_bi()).await;
            match opened {
                Ok(Ok(streams)) => break streams,
                Ok(Err(error)) if attempt == 0 => {
                    tracing::debug!(peer = %peer.short(), %error, "pooled connection is dead; reconnecting");
                    self.forget(&key);
                    attempt += 1;
                }
                Ok(Err(error)) => {
                    self.forget(&key);
                    return Err(TransportError::Connect { peer: peer.short(), reason: error.to_string() });
                }
                Err(_) => {
                    self.forget(&key);
                    let after_ms = STREAM_OPEN_TIMEOUT.as_millis() as u64;
                    return Err(TransportError::OpenTimeout { peer: peer.short(), after_ms });
                }
            }
        };
        let stream_error = |reason: String| TransportError::Stream { peer: peer.short(), reason };
        let exchange = async {
            send.write_all(&bytes).await.map_err(|error| stream_error(error.to_string()))?;
            send.finish().map_err(|error| stream_error(error.to_string()))?;
            match recv.read_to_end(MAX_RPC_MESSAGE_SIZE).await {
                Ok(reply) => Ok(reply),
                Err(ReadToEndError::TooLong) => {
                    Err(TransportError::MessageTooLarge { size: MAX_RPC_MESSAGE_SIZE + 1, max: MAX_RPC_MESSAGE_SIZE })
                }
                Err(error) => Err(stream_error(error.to_string())),
            }
        };
        let reply = tokio::time::timeout(self.read_timeout, exchange).await.map_err(|_| {
            TransportError::ReadTimeout { peer: peer.short(), after_ms: self.read_timeout.as_millis() as u64 }
        })??;
        postcard::from_bytes(&reply).map_err(|error| TransportError::Codec(error.to_string()))
    }

    /// Closes every pooled connection.
    pub fn close_all(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (_, connection) in pool.drain() {
            connection.close(VarInt::from_u32(0), b"closing");
        }
    }
}

/// The server side of one ALPN: decodes requests, hands them to the handler, encodes replies.
pub trait RpcHandler: Send + Sync + 'static {
    /// The request type.
    type Request: DeserializeOwned + Send;
    /// The reply type.
    type Response: Serialize + Send;

    /// Handles one request from the authenticated endpoint `peer`.
    fn handle(&self, peer: EndpointId, request: Self::Request) -> impl Future<Output = Self::Response> + Send;

    /// The reply to a request that could not be decoded or was too large.
    fn reject(&self, peer: EndpointId, error: TransportError) -> Self::Response;
}

/// Serves an [`RpcHandler`] as an iroh protocol, with connection and message bounds.
pub struct RpcProtocol<H> {
    handler: Arc<H>,
    connections: Arc<Semaphore>,
}

impl<H> RpcProtocol<H> {
    /// Serves `handler`, accepting at most `MAX_CONCURRENT_CONNECTIONS` connections at once.
    pub fn new(handler: Arc<H>) -> Self {
        RpcProtocol { handler, connections: Arc::new(Semaphore::new(MAX_CONCURRENT_CONNECTIONS)) }
    }
}

impl<H> fmt::Debug for RpcProtocol<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcProtocol").field("free_connections", &self.connections.available_permits()).finish()
    }
}

impl<H: RpcHandler> ProtocolHandler for RpcProtocol<H> {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let peer = connection.remote_id();
        let Ok(_permit) = Arc::clone(&self.connections).try_acquire_owned() else {
            tracing::warn!(peer = %peer.fmt_short(), "connection limit reached; refusing");
            connection.close(VarInt::from_u32(CLOSE_BUSY), b"too many connections");
            return Ok(());
        };
        loop {
            let (mut send, mut recv) = match connection.accept_bi().await {
                Ok(streams) => streams,
                Err(ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed) => return Ok(()),
                Err(error) => {
                    tracing::debug!(peer = %peer.fmt_short(), %error, "connection ended");
                    return Ok(());
                }
            };
            let handler = Arc::clone(&self.handler);
            // Streams are bounded per connection by the QUIC config
            // (MAX_STREAMS_PER_CONNECTION), so these tasks are bounded too.
            tokio::spawn(async move {
                let reply = match tokio::time::timeout(READ_TIMEOUT, recv.read_to_end(MAX_RPC_MESSAGE_SIZE)).await {
                    Ok(Ok(bytes)) => match postcard::from_bytes::<H::Request>(&bytes) {
                        Ok(request) => handler.handle(peer, request).await,
                        Err(error) => {
                            tracing::warn!(peer = %peer.fmt_short(), %error, "malformed request");
                            handler.reject(peer, TransportError::Codec(error.to_string()))
                        }
                    },
                    Ok(Err(ReadToEndError::TooLong)) => {
                        tracing::warn!(peer = %peer.fmt_short(), "request over the size limit");
                        let _ = send.reset(VarInt::from_u32(RESET_TOO_LARGE));
                        return;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(peer = %peer.fmt_short(), %error, "request stream failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer.fmt_short(), "request not received in time");
                        return;
                    }
                };
                let bytes = match encode(&reply) {
                    Ok(bytes) => bytes,
                    Err(error) => match encode(&handler.reject(peer, error)) {
                        Ok(bytes) => bytes,
                        Err(_) => return,
                    },
                };
                if send.write_all(&bytes).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
    }
}
