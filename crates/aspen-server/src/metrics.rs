//! Prometheus metrics: Raft state from openraft's metrics, request counters and latency
//! histograms, security refusals; served as text on the node's HTTP metrics port and over
//! the client protocol.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aspen_consensus::RaftNode;
use aspen_raft_storage::timings::{Histogram, HistogramSnapshot};
use openraft::ServerState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::raft_rpc::IrohRaftClient;

/// Upper bounds of the latency histogram buckets, in microseconds.
const BUCKETS_US: [u64; 12] =
    [250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000];
/// Most concurrent scrapes served.
const MAX_SCRAPES: usize = 16;
/// Largest HTTP request head read from a scraper.
const MAX_HTTP_REQUEST: usize = 8 * 1024;
/// Longest a scraper may take to send its request.
const SCRAPE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Count, errors and latency histogram of one kind of request.
#[derive(Debug)]
pub struct OpStats {
    latency: Histogram,
    errors: Counter,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats { latency: Histogram::new(&BUCKETS_US), errors: Counter::default() }
    }
}

impl OpStats {
    /// Runs `work`, recording its latency and whether it failed.
    pub async fn time<T, E>(&self, work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let started = Instant::now();
        let result = work.await;
        self.record(started, result.is_err());
        result
    }

    /// Records one request that began at `started` and ends now.
    pub fn record(&self, started: Instant, failed: bool) {
        self.latency.record(started.elapsed());
        if failed {
            self.errors.inc();
        }
    }

    fn render(&self, out: &mut String, name: &str) {
        let latency = self.latency.snapshot();
        let _ = writeln!(out, "# TYPE aspen_{name}_total counter\naspen_{name}_total {}", latency.count);
        let _ =
            writeln!(out, "# TYPE aspen_{name}_errors_total counter\naspen_{name}_errors_total {}", self.errors.get());
        render_histogram(out, &format!("aspen_{name}_latency_seconds"), &latency);
    }
}

/// Writes a Prometheus histogram `metric`.
fn render_histogram(out: &mut String, metric: &str, histogram: &HistogramSnapshot) {
    let _ = writeln!(out, "# TYPE {metric} histogram");
    let mut cumulative = 0;
    for (bound_us, in_bucket) in histogram.bounds.iter().zip(&histogram.buckets) {
        cumulative += in_bucket;
        let _ = writeln!(out, "{metric}_bucket{{le=\"{}\"}} {cumulative}", *bound_us as f64 / 1e6);
    }
    let _ = writeln!(out, "{metric}_bucket{{le=\"+Inf\"}} {}", histogram.count);
    let sum = histogram.sum_us as f64 / 1e6;
    let _ = writeln!(out, "{metric}_sum {sum}\n{metric}_count {}", histogram.count);
}

/// Writes one of the log's disk timing histograms (see [`aspen_raft_storage::timings`]).
fn render_disk(out: &mut String, metric: &str, help: &str, snapshot: &HistogramSnapshot) {
    let _ = writeln!(out, "# HELP {metric} {help}");
    render_histogram(out, metric, snapshot);
}

/// Everything the node counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Client reads (get, scan, sql).
    pub reads: OpStats,
    /// Client writes.
    pub writes: OpStats,
    /// Raft RPCs this node sent (append entries, votes, snapshot chunks, forwards), timed
    /// from send to reply.
    pub raft_rpcs: OpStats,
    /// Raft RPCs this node served, timed from decoded request to reply (the receiver's
    /// share of `raft_rpcs` on the sender).
    pub raft_served: OpStats,
    /// Client connections and requests refused for a wrong or missing token, or for a data
    /// token asking for an admin operation.
    pub unauthorized: Counter,
    /// Raft RPCs refused for a wrong cluster secret.
    pub raft_denied: Arc<AtomicU64>,
}

/// Renders the Prometheus text exposition of the node.
pub fn render(node: &RaftNode<IrohRaftClient>, metrics: &Metrics) -> String {
    let raft = node.metrics();
    let mut out = String::with_capacity(4096);
    let id = node.id();
    let state = match raft.state {
        ServerState::Leader => 3,
        ServerState::Candidate => 2,
        ServerState::Follower => 1,
        ServerState::Learner => 0,
        ServerState::Shutdown => -1,
    };
    let gauge = |out: &mut String, name: &str, help: &str, value: i128| {
        let _ = writeln!(
            out,
            "# HELP aspen_{name} {help}\n# TYPE aspen_{name} gauge\naspen_{name}{{node=\"{id}\"}} {value}"
        );
    };
    gauge(&mut out, "raft_is_leader", "1 if this node leads", i128::from(raft.current_leader == Some(id)));
    gauge(&mut out, "raft_state", "3 leader, 2 candidate, 1 follower, 0 learner, -1 shutdown", state);
    gauge(&mut out, "raft_term", "current term", i128::from(raft.current_term));
    gauge(&mut out, "raft_leader", "current leader id (0 if unknown)", i128::from(raft.current_leader.unwrap_or(0)));
    gauge(&mut out, "raft_last_log_index", "last log index", i128::from(raft.last_log_index.unwrap_or(0)));
    let applied = raft.last_applied.map_or(0, |log_id| log_id.index);
    gauge(&mut out, "raft_applied_index", "last applied index", i128::from(applied));
    gauge(
        &mut out,
        "raft_snapshot_index",
        "last snapshot index",
        i128::from(raft.snapshot.map_or(0, |log_id| log_id.index)),
    );
    gauge(&mut out, "raft_purged_index", "last purged index", i128::from(raft.purged.map_or(0, |log_id| log_id.index)));
    if let Some(replication) = &raft.replication {
        let _ = writeln!(out, "# HELP aspen_raft_replication_lag entries the follower is behind the leader's log");
        let _ = writeln!(out, "# TYPE aspen_raft_replication_lag gauge");
        let last = raft.last_log_index.unwrap_or(0);
        for (follower, matched) in replication {
            let matched = matched.map_or(0, |log_id| log_id.index);
            let _ = writeln!(
                out,
                "aspen_raft_replication_lag{{node=\"{id}\",follower=\"{follower}\"}} {}",
                last.saturating_sub(matched)
            );
        }
    }
    let _ = writeln!(out, "# HELP aspen_peer_up failure detector: 1 healthy, 0.5 suspect, 0 down");
    let _ = writeln!(out, "# TYPE aspen_peer_up gauge");
    let peers = node.health().snapshot();
    for peer in &peers {
        let up = match peer.liveness {
            aspen_api::Liveness::Healthy => "1",
            aspen_api::Liveness::Suspect => "0.5",
            aspen_api::Liveness::Down => "0",
        };
        let _ = writeln!(out, "aspen_peer_up{{node=\"{id}\",peer=\"{}\"}} {up}", peer.node_id);
    }
    let _ = writeln!(out, "# HELP aspen_peer_clock_offset_ms peer clock minus local clock (warn at 100, alert at 500)");
    let _ = writeln!(out, "# TYPE aspen_peer_clock_offset_ms gauge");
    for peer in &peers {
        if let Some(offset) = peer.clock_offset_ms {
            let _ = writeln!(out, "aspen_peer_clock_offset_ms{{node=\"{id}\",peer=\"{}\"}} {offset}", peer.node_id);
        }
    }
    let disk = node.disk_timings();
    render_disk(
        &mut out,
        "aspen_disk_log_journal_sync_duration_seconds",
        "fdatasync of the log journal: every acknowledged write waits for one",
        &disk.journal_sync.snapshot(),
    );
    render_disk(
        &mut out,
        "aspen_disk_log_commit_duration_seconds",
        "durable redb commits of the log (checkpoints, truncations, purges, votes)",
        &disk.log_commit.snapshot(),
    );
    metrics.reads.render(&mut out, "client_reads");
    metrics.writes.render(&mut out, "client_writes");
    metrics.raft_rpcs.render(&mut out, "raft_rpcs");
    metrics.raft_served.render(&mut out, "raft_served");
    let _ = writeln!(
        out,
        "# TYPE aspen_client_unauthorized_total counter\naspen_client_unauthorized_total {}",
        metrics.unauthorized.get()
    );
    let denied = metrics.raft_denied.load(Ordering::Relaxed);
    let _ = writeln!(out, "# TYPE aspen_raft_rpc_denied_total counter\naspen_raft_rpc_denied_total {denied}");
    let chain = node.chain_stats();
    let _ = writeln!(
        out,
        "# HELP aspen_raft_chain_divergence_total times this node found its log diverged from the leader's \
         (it then refuses entries until wiped and rejoined)\n# TYPE aspen_raft_chain_divergence_total counter\n\
         aspen_raft_chain_divergence_total {}",
        chain.divergences
    );
    let _ = writeln!(
        out,
        "# HELP aspen_raft_chain_checks_total requests whose leader chain hash this node compared with its own\n\
         # TYPE aspen_raft_chain_checks_total counter\naspen_raft_chain_checks_total {}",
        chain.checked
    );
    out
}

/// Serves `GET /metrics` on `addr` until the task is aborted.
pub async fn serve_http(listener: TcpListener, node: RaftNode<IrohRaftClient>, metrics: Arc<Metrics>) {
    let scrapes = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else { continue };
        let Ok(permit) = Arc::clone(&scrapes).try_acquire_owned() else { continue };
        let node = node.clone();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buffer = [0u8; 1024];
            let read = tokio::time::timeout(SCRAPE_READ_TIMEOUT, async {
                while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < MAX_HTTP_REQUEST {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return false,
                        Ok(count) => head.extend_from_slice(&buffer[..count]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                tracing::debug!(%peer, "metrics scrape did not send a request head");
                return;
            }
            let (status, body) = if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET / ") {
                ("200 OK", render(&node, &metrics))
            } else {
                ("404 Not Found", "not found; try /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            drop(permit);
        });
    }
}

/// Binds the metrics listener (separately, so a taken port is a startup error).
pub async fn bind_http(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
