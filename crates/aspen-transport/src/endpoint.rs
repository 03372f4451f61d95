//! Binding the node's iroh endpoint: relays off unless configured, no public discovery,
//! no port mapping, and a secret key persisted so the endpoint id survives restarts.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use aspen_api::limits::MAX_STREAMS_PER_CONNECTION;
use iroh::address_lookup::{DnsAddressLookup, MemoryLookup, PkarrPublisher, PkarrResolver};
use iroh::endpoint::{IdleTimeout, NetReportConfig, PortmapperConfig, QuicTransportConfig, VarInt, presets};
use iroh::{Endpoint, RelayMode, SecretKey};

use crate::error::TransportError;

/// A connection with no traffic for this long is closed; keep-alives run well inside it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive period on idle connections.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Bytes of unread datagrams a connection keeps. Datagrams carry only the liveness probes
/// of the RPC client's connection watcher (see `rpc`), acknowledged by QUIC and never read;
/// beyond this the oldest are dropped, which costs nothing.
pub const DATAGRAM_RECEIVE_BUFFER: usize = 4096;
/// The round-trip time a client assumes before its first sample (QUIC's default is 333 ms).
/// A connection closed while its handshake is under way, such as a dial to a crashed node
/// that a client stops waiting for, drains for three probe timeouts, nine times this, and
/// closing the endpoint waits for that: 3 s at QUIC's default, 18 ms here, so a command-line
/// call that dialed a dead node exits at once. The cost is on long paths only: a client
/// 100 ms away resends its first handshake packet a few times before the answer comes.
pub const CLIENT_INITIAL_RTT: Duration = Duration::from_millis(2);

/// Loads the 32-byte secret key at `path`, or creates one (mode 0600) if none exists.
pub fn load_or_create_secret_key(path: &Path) -> Result<SecretKey, TransportError> {
    let key_error = |reason: String| TransportError::KeyFile { path: path.display().to_string(), reason };
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| key_error(format!("holds {} bytes, a key is 32", bytes.len())))?;
            Ok(SecretKey::from_bytes(&bytes))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            let temp = path.with_extension("tmp");
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&temp).map_err(|error| key_error(error.to_string()))?;
            file.write_all(&key.to_bytes()).map_err(|error| key_error(error.to_string()))?;
            file.sync_all().map_err(|error| key_error(error.to_string()))?;
            std::fs::rename(&temp, path).map_err(|error| key_error(error.to_string()))?;
            Ok(key)
        }
        Err(error) => Err(key_error(error.to_string())),
    }
}

/// Internet-facing services, all off by default: these machines may have no internet, and
/// binding must never wait on unreachable relays or DNS. Turn them on for deployments
/// across NATs or without a static address list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InternetServices {
    /// Use n0's public relays for NAT traversal and as a fallback path.
    pub relays: bool,
    /// Resolve peers' addresses through n0's DNS discovery service.
    pub dns_discovery: bool,
    /// Publish and resolve this node's address records through n0's pkarr relay.
    pub pkarr_discovery: bool,
}

/// Binds an endpoint on `bind_addr` that accepts `alpns`.
pub async fn bind_endpoint(
    secret_key: SecretKey,
    bind_addr: SocketAddr,
    alpns: Vec<Vec<u8>>,
) -> Result<Endpoint, TransportError> {
    bind_endpoint_with_lookup(secret_key, bind_addr, alpns, None, InternetServices::default()).await
}

/// Binds a client's endpoint on `bind_addr`: it accepts nothing, and assumes
/// [`CLIENT_INITIAL_RTT`] before its first round trip.
pub async fn bind_client_endpoint(secret_key: SecretKey, bind_addr: SocketAddr) -> Result<Endpoint, TransportError> {
    bind(secret_key, bind_addr, Vec::new(), None, InternetServices::default(), Some(CLIENT_INITIAL_RTT)).await
}

/// Binds an endpoint that also resolves endpoint ids through `lookup` (a static address
/// book that gossip discovery fills), so peers can be dialed by id alone.
pub async fn bind_endpoint_with_lookup(
    secret_key: SecretKey,
    bind_addr: SocketAddr,
    alpns: Vec<Vec<u8>>,
    lookup: Option<MemoryLookup>,
    internet: InternetServices,
) -> Result<Endpoint, TransportError> {
    bind(secret_key, bind_addr, alpns, lookup, internet, None).await
}

async fn bind(
    secret_key: SecretKey,
    bind_addr: SocketAddr,
    alpns: Vec<Vec<u8>>,
    lookup: Option<MemoryLookup>,
    internet: InternetServices,
    initial_rtt: Option<Duration>,
) -> Result<Endpoint, TransportError> {
    let bind_error = |reason: String| TransportError::Bind { addr: bind_addr.to_string(), reason };
    let idle = IdleTimeout::try_from(IDLE_TIMEOUT).map_err(|error| bind_error(error.to_string()))?;
    let mut transport = QuicTransportConfig::builder()
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(KEEP_ALIVE)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION as u32))
        .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER));
    if let Some(rtt) = initial_rtt {
        transport = transport.initial_rtt(rtt);
    }
    let transport = transport.build();
    let mut builder = Endpoint::builder(presets::Minimal);
    if let Some(lookup) = lookup {
        builder = builder.address_lookup(lookup);
    }
    if internet.dns_discovery {
        builder = builder.address_lookup(DnsAddressLookup::n0_dns());
    }
    if internet.pkarr_discovery {
        builder = builder.address_lookup(PkarrPublisher::n0_dns()).address_lookup(PkarrResolver::n0_dns());
    }
    // By default no relays and no n0 DNS/pkarr lookup: peers are dialed by id + direct
    // address, so binding never waits on unreachable internet services.
    let relay_mode = if internet.relays { RelayMode::Default } else { RelayMode::Disabled };
    builder
        .secret_key(secret_key)
        .relay_mode(relay_mode)
        .clear_ip_transports()
        .bind_addr(bind_addr)
        .map_err(|error| bind_error(error.to_string()))?
        .portmapper_config(PortmapperConfig::Disabled)
        .net_report_config(NetReportConfig::minimal())
        .transport_config(transport)
        .alpns(alpns)
        .bind()
        .await
        .map_err(|error| bind_error(error.to_string()))
}
