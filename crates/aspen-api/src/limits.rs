//! Every bound Aspen enforces, in one place (Tiger Style: put a limit on everything).
//!
//! Each limit is checked at the edge (request validation, decoding, snapshot receive)
//! and exceeding it is a typed error, never a panic or a silent truncation.

/// Largest key, in bytes. Keys are also never empty.
pub const MAX_KEY_SIZE: usize = 1024;
/// Largest value stored inline in the state machine, in bytes; larger values go to blobs.
pub const MAX_VALUE_SIZE: usize = 1024 * 1024;
/// Most writes grouped into one Raft entry, and most entries in one storage batch.
pub const MAX_BATCH_SIZE: usize = 1000;
/// Largest snapshot a node builds or accepts, in bytes.
pub const MAX_SNAPSHOT_SIZE: u64 = 100 * 1024 * 1024;
/// Most keys a snapshot may hold.
pub const MAX_SNAPSHOT_ENTRIES: u64 = 1_000_000;
/// Largest chunk a snapshot is streamed in, in bytes.
pub const MAX_SNAPSHOT_CHUNK_SIZE: usize = 1024 * 1024;
/// Most operations in each branch (success or failure) of a transaction (etcd's default).
pub const MAX_TXN_OPS: usize = 128;
/// Most compares in one transaction.
pub const MAX_TXN_COMPARES: usize = 128;
/// Most keys one scan returns.
pub const MAX_SCAN_LIMIT: u32 = 10_000;
/// Most rows one SQL query returns.
pub const MAX_SQL_ROWS: u32 = 10_000;
/// Longest SQL query text, in bytes.
pub const MAX_SQL_QUERY_SIZE: usize = 16 * 1024;
/// Longest a SQL query may run before it is interrupted, in milliseconds.
pub const MAX_SQL_TIMEOUT_MS: u64 = 10_000;
/// Largest SQL result, in bytes of values: a reply must fit in one RPC message, with room
/// for its encoding. Also SQLite's `SQLITE_LIMIT_LENGTH` while a query runs: no string,
/// blob or row larger than a whole reply is worth building.
pub const MAX_SQL_RESPONSE_SIZE: usize = MAX_RPC_MESSAGE_SIZE / 2;
/// Most columns a SQL query's result, or a table, index or sort it builds, may have
/// (SQLite's `SQLITE_LIMIT_COLUMN`, 2000 by default); the `kv` view has 6.
pub const MAX_SQL_COLUMNS: usize = 64;
/// Most heap memory one SQL query may add to SQLite's, in bytes. Room for what a
/// legitimate query needs: its connection's page cache filling up (16 MiB), a sort's
/// in-memory run (at most the cache size, 16 MiB) and a few full-size values.
pub const MAX_SQL_QUERY_MEMORY: usize = 48 * 1024 * 1024;
/// Longest lease time-to-live, in seconds (one year).
pub const MAX_LEASE_TTL_SECS: u64 = 365 * 24 * 3600;
/// Most live leases in a cluster.
pub const MAX_LEASES: u64 = 1_000_000;
/// Most nodes (voters and learners) in one cluster.
pub const MAX_PEERS: usize = 64;
/// Most simultaneous inbound connections one node accepts.
pub const MAX_CONCURRENT_CONNECTIONS: usize = 500;
/// Most concurrent streams on one connection.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// Most idle request lanes (bi-streams kept open for reuse) a client pools per peer and
/// protocol; well under `MAX_STREAMS_PER_CONNECTION`, so idle lanes never starve new calls.
pub const MAX_IDLE_LANES_PER_PEER: usize = 32;
/// Largest single RPC message, in bytes.
pub const MAX_RPC_MESSAGE_SIZE: usize = 10 * 1024 * 1024;
/// Largest frame read from a stream that has not proven its credentials yet (its hello:
/// a client token of at most 256 bytes, or a 32-byte secret proof), in bytes. A peer
/// without credentials gets no more than this read, and nothing it sends decoded, before
/// it is refused.
pub const MAX_UNAUTHENTICATED_FRAME_SIZE: usize = 4 * 1024;
/// Most concurrent watchers on one node.
pub const MAX_WATCHERS: usize = 10_000;
/// Largest encoded Raft entry payload the log accepts, in bytes: a full batch of
/// maximum writes can never fit, so batches are also cut by size.
pub const MAX_ENTRY_SIZE: usize = MAX_RPC_MESSAGE_SIZE;
