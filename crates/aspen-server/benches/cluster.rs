//! Closed-loop load against a 3-node cluster on loopback: real nodes (redb log with fsync,
//! SQLite, iroh QUIC) driven by the real client. N clients each issue the next request when
//! the last returns. Reports ops/s, p50 and p99 per workload and writes
//! target/bench/cluster.json.
//!
//! Run: `cargo xtask bench` (or `cargo bench -p aspen-server --bench cluster`).
//! `ASPEN_BENCH_SECS` sets the duration of each workload (default 5).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aspen_api::{ClusterNode, GetRequest, ReadConsistency};
use aspen_client::AspenClient;
use aspen_server::{NodeConfig, Server};

const SECRET: &str = "bench-cluster-secret";
const TOKEN: &str = "bench-token";
const ADMIN_TOKEN: &str = "bench-admin-token";
const VALUE_SIZE: usize = 256;
const KEY_SPACE: u64 = 10_000;
const CLIENT_CONNECTIONS: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Workload {
    Put,
    LinearizableGet,
    StaleGet,
}

struct Row {
    name: String,
    clients: usize,
    ops: u64,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

async fn start_cluster(root: &std::path::Path) -> Vec<Server> {
    let mut servers = Vec::new();
    for id in 1..=3 {
        let config = NodeConfig::local(id, root.join(format!("node-{id}")), SECRET, TOKEN, ADMIN_TOKEN);
        servers.push(Server::start(config).await.expect("start node"));
    }
    let peers: Vec<ClusterNode> = servers[1..].iter().map(Server::member).collect();
    servers[0].init_if_new(peers).await.expect("init");
    for _ in 0..200 {
        if servers.iter().all(|server| server.node().metrics().current_leader.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    servers
}

async fn run(clients: &[Arc<AspenClient>], workload: Workload, concurrency: usize, duration: Duration) -> Row {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let client = Arc::clone(&clients[worker % clients.len()]);
        let stop = Arc::clone(&stop);
        let errors = Arc::clone(&errors);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut i = worker as u64 * 7919;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = format!("bench/{:06}", i % KEY_SPACE).into_bytes();
                let started = Instant::now();
                let ok = match workload {
                    Workload::Put => client.put(key, vec![b'x'; VALUE_SIZE]).await.is_ok(),
                    Workload::LinearizableGet | Workload::StaleGet => {
                        let consistency = match workload {
                            Workload::StaleGet => ReadConsistency::Stale,
                            _ => ReadConsistency::Linearizable,
                        };
                        client.get_with(GetRequest { key, consistency }).await.is_ok()
                    }
                };
                if ok {
                    latencies.push(started.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("worker"));
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Row {
        name: format!("{workload:?}"),
        clients: concurrency,
        ops: latencies.len() as u64,
        seconds,
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes flags such as --bench; this harness takes none.
    let seconds: u64 = std::env::var("ASPEN_BENCH_SECS").ok().and_then(|value| value.parse().ok()).unwrap_or(5);
    let duration = Duration::from_secs(seconds);
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench dir on the target disk");
    eprintln!("starting a 3-node cluster under {}", root.path().display());
    let servers = start_cluster(root.path()).await;
    let leader = servers[0].node().metrics().current_leader.expect("leader");
    // Leader first, so the client's first choice needs no forwarding hop.
    let mut addrs: Vec<_> = servers.iter().map(|server| server.addr().clone()).collect();
    addrs.sort_by_key(|addr| addr != servers[(leader - 1) as usize].addr());
    let mut clients = Vec::new();
    for _ in 0..CLIENT_CONNECTIONS {
        clients.push(Arc::new(AspenClient::connect(addrs.clone(), TOKEN).await.expect("client")));
    }
    // Preload the key space so reads hit existing keys.
    eprintln!("preloading {KEY_SPACE} keys");
    run(&clients, Workload::Put, 64, Duration::from_secs(2)).await;

    let plan = [
        (Workload::Put, 1),
        (Workload::Put, 16),
        (Workload::Put, 64),
        (Workload::LinearizableGet, 1),
        (Workload::LinearizableGet, 16),
        (Workload::LinearizableGet, 64),
        (Workload::StaleGet, 16),
    ];
    let mut rows = Vec::new();
    for (step, (workload, concurrency)) in plan.iter().enumerate() {
        eprintln!("[{}/{}] {workload:?} with {concurrency} clients for {seconds}s", step + 1, plan.len());
        rows.push(run(&clients, *workload, *concurrency, duration).await);
    }
    println!("\n| workload | clients | ops/s | p50 | p99 | errors |\n| --- | --- | --- | --- | --- | --- |");
    for row in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            row.name,
            row.clients,
            row.ops as f64 / row.seconds,
            row.p50_us as f64 / 1000.0,
            row.p99_us as f64 / 1000.0,
            row.errors
        );
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "workload": row.name, "clients": row.clients, "ops_per_sec": row.ops as f64 / row.seconds,
                "p50_us": row.p50_us, "p99_us": row.p99_us, "errors": row.errors,
            })
        })
        .collect();
    let out_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../bench");
    if std::fs::create_dir_all(&out_dir).is_ok() {
        let path = out_dir.join("cluster.json");
        match std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default()) {
            Ok(()) => eprintln!("wrote {}", path.display()),
            Err(error) => eprintln!("could not write {}: {error}", path.display()),
        }
    }
    for server in servers {
        server.shutdown().await;
    }
}
