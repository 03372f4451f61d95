//! Typed transport errors.

/// Why a transport operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The endpoint could not bind.
    #[error("cannot bind endpoint on {addr}: {reason}")]
    Bind {
        /// The requested address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The secret key file is unreadable or malformed.
    #[error("secret key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A peer address string does not parse.
    #[error("invalid peer address {input:?}: {reason} (expected <endpoint-id>@<ip:port>[,<ip:port>] or a ticket)")]
    InvalidPeerAddr {
        /// The input.
        input: String,
        /// Why.
        reason: String,
    },
    /// No connection within the connect timeout.
    #[error("connecting to {peer} timed out after {after_ms} ms")]
    ConnectTimeout {
        /// The peer.
        peer: String,
        /// The timeout.
        after_ms: u64,
    },
    /// The connection was refused or failed during the handshake.
    #[error("cannot connect to {peer}: {reason}")]
    Connect {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A stream could not be opened in time.
    #[error("opening a stream to {peer} timed out after {after_ms} ms")]
    OpenTimeout {
        /// The peer.
        peer: String,
        /// The timeout.
        after_ms: u64,
    },
    /// No reply within the read timeout; the request may have been handled.
    #[error("no reply from {peer} within {after_ms} ms")]
    ReadTimeout {
        /// The peer.
        peer: String,
        /// The timeout.
        after_ms: u64,
    },
    /// A message is larger than the RPC limit (checked before sending and while reading).
    #[error("message of {size} bytes exceeds the RPC limit of {max} bytes")]
    MessageTooLarge {
        /// Size of the message (or at least this many bytes).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The stream failed mid-exchange (reset, closed connection).
    #[error("stream to {peer} failed: {reason}")]
    Stream {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A message could not be encoded or decoded.
    #[error("malformed message: {0}")]
    Codec(String),
    /// The peer refused this endpoint's credentials (the hello that opens each stream) and
    /// closed the connection before reading any request on it.
    #[error("{peer} refused our credentials: {reason}")]
    Unauthenticated {
        /// The peer.
        peer: String,
        /// The peer's reason.
        reason: String,
    },
    /// The peer is taken for down (its last dial failed or its connection went silent), so
    /// the request was not sent; it is redialed in the background.
    #[error("{peer} is unreachable ({reason}; down for {for_ms} ms)")]
    PeerDown {
        /// The peer.
        peer: String,
        /// How long it has been down, in milliseconds.
        for_ms: u64,
        /// Why it was taken for down.
        reason: String,
    },
    /// The request was not sent: the stream it would have gone on had already failed.
    #[error("not sent to {peer}: {reason}")]
    NotSent {
        /// The peer.
        peer: String,
        /// Why the stream failed.
        reason: String,
    },
}

impl TransportError {
    /// What went wrong, without naming the peer (for lists that name it already).
    pub fn reason(&self) -> String {
        match self {
            TransportError::ConnectTimeout { after_ms, .. } => format!("connecting timed out after {after_ms} ms"),
            TransportError::Connect { reason, .. }
            | TransportError::Stream { reason, .. }
            | TransportError::NotSent { reason, .. } => reason.clone(),
            TransportError::OpenTimeout { after_ms, .. } => format!("opening a stream timed out after {after_ms} ms"),
            TransportError::ReadTimeout { after_ms, .. } => format!("no reply within {after_ms} ms"),
            TransportError::PeerDown { for_ms, reason, .. } => format!("{reason}; down for {for_ms} ms"),
            other => other.to_string(),
        }
    }

    /// Whether the request certainly did not reach the peer's handler (safe to retry anything).
    pub fn is_before_send(&self) -> bool {
        matches!(
            self,
            TransportError::ConnectTimeout { .. }
                | TransportError::Connect { .. }
                | TransportError::OpenTimeout { .. }
                | TransportError::InvalidPeerAddr { .. }
                | TransportError::MessageTooLarge { .. }
                | TransportError::NotSent { .. }
                | TransportError::Unauthenticated { .. }
                | TransportError::PeerDown { .. }
        )
    }
}
