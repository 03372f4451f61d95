//! `aspen-bench`: starts a 3-node etcd cluster and a 3-node Aspen cluster on this machine,
//! drives both with the same closed-loop load, and reports the comparison (markdown on
//! stdout, JSON and a PNG chart in the output directory). `cargo xtask bench etcd` installs
//! etcd, builds the release binaries and runs this.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use aspen_bench::chart;
use aspen_bench::cluster::{AspenCluster, AspenConfig, EtcdCluster, EtcdConfig};
use aspen_bench::etcd::EtcdClient;
use aspen_bench::failover::{self, EtcdMembers};
use aspen_bench::fsync::{self, FsyncProbe};
use aspen_bench::report::{
    Comparison, Environment, FailoverRound, Report, Settings, Skipped, baseline_fsyncs_per_sec, failover_table,
};
use aspen_bench::target::{OpError, System};
use aspen_bench::workload::{
    self, HOT_KEYS, KEY_SPACE, Measurement, RowRun, SCAN_KEYS, Step, VALUE_SIZE, Workload, key, value,
};
use aspen_client::AspenClient;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::signal::unix::{SignalKind, signal};

/// Longest measured duration of one row.
const SECS_MAX: f64 = 600.0;
/// Most A/B rounds.
const ROUNDS_MAX: usize = 20;
/// Most client connections per system.
const CONNECTIONS_MAX: usize = 64;
/// The fsync probe before each write row: short, since it runs 2 x rounds x write rows.
const ROW_PROBE: Duration = Duration::from_millis(500);
/// The `--workloads` name of the failover measurement (not a load row: see `failover`).
const FAILOVER: &str = "failover";

/// Aspen vs etcd, 3 nodes each, on this machine, with the same closed-loop load generator.
///
/// Starts both clusters as real processes on loopback (data dirs under --data-dir, fsync on,
/// default settings), preloads the same keys into both, then runs every workload row on
/// Aspen and on etcd in turn (A/B interleaved; rounds alternate who goes first). Prints
/// markdown tables to stdout (or JSON with --json), writes etcd-vs-aspen.json and
/// etcd-vs-aspen.png to --out-dir. Every process it starts is killed when it exits.
#[derive(Debug, Parser)]
#[command(name = "aspen-bench", version)]
struct Args {
    /// Measured seconds per row and system.
    #[arg(long, env = "ASPEN_BENCH_SECS", default_value_t = 5.0)]
    secs: f64,
    /// Smoke run: every workload once at 16 clients, 1 s rows (overrides --secs).
    #[arg(long)]
    quick: bool,
    /// A/B rounds; each row's rounds are merged (totals, percentiles over all samples).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Only these workloads (comma-separated): put, get, stale-get, mixed, scan, cas, and
    /// failover (the leader SIGKILLed under a closed-loop writer, once per round; only when
    /// named).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Only rows with these client counts (comma-separated), e.g. `1,16`.
    #[arg(long, value_delimiter = ',')]
    clients: Vec<usize>,
    /// Client connections per system; clients are spread over them round-robin.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds of the fsync probe (run before and after the load).
    #[arg(long, default_value_t = 2.0)]
    fsync_secs: f64,
    /// Directory for the clusters' data and the fsync probe (emptied first).
    #[arg(long, default_value = "target/bench/etcd-vs-aspen")]
    data_dir: PathBuf,
    /// Directory for etcd-vs-aspen.json and etcd-vs-aspen.png.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// The aspen-node binary (default: next to this binary, else on PATH).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// First of the loopback ports: etcd uses base..base+3 and base+10..base+13, Aspen
    /// base+20..base+23 (their Prometheus metrics on base+30..base+33).
    #[arg(long, default_value_t = 23790)]
    base_port: u16,
    /// Print the report as JSON instead of markdown.
    #[arg(long)]
    json: bool,
    /// Also write every row's requests, one `end_us,latency_us` line each (microseconds
    /// since the row started, after a `# <row start, Unix microseconds>` line), to
    /// `<workload>-x<clients>-<system>-r<round>.csv` in this directory: for lining up slow
    /// requests with node logs and disk activity.
    #[arg(long)]
    timeline_dir: Option<PathBuf>,
}

impl Args {
    fn plan(&self) -> anyhow::Result<Vec<Step>> {
        let mut plan = if self.quick { workload::quick_plan() } else { workload::full_plan() };
        if !self.clients.is_empty() {
            plan.retain(|step| self.clients.contains(&step.clients));
        }
        if self.workloads.is_empty() {
            return Ok(plan);
        }
        let mut chosen = Vec::new();
        for name in self.workloads.iter().filter(|name| name.trim() != FAILOVER) {
            let names: Vec<&str> = Workload::ALL.iter().map(|workload| workload.name()).collect();
            let workload = Workload::from_name(name.trim())
                .with_context(|| format!("unknown workload {name:?}; choose from {}", names.join(", ")))?;
            chosen.push(workload);
        }
        Ok(plan.into_iter().filter(|step| chosen.contains(&step.workload)).collect())
    }

    /// Whether the failover measurement was asked for.
    fn failover(&self) -> bool {
        self.workloads.iter().any(|name| name.trim() == FAILOVER)
    }

    fn secs_per_row(&self) -> f64 {
        if self.quick { 1.0 } else { self.secs }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !(self.secs_per_row() > 0.0 && self.secs_per_row() <= SECS_MAX) {
            bail!("--secs must be in (0, {SECS_MAX}]");
        }
        if !(self.fsync_secs > 0.0 && self.fsync_secs <= SECS_MAX) {
            bail!("--fsync-secs must be in (0, {SECS_MAX}]");
        }
        if self.rounds == 0 || self.rounds > ROUNDS_MAX {
            bail!("--rounds must be in 1..={ROUNDS_MAX}");
        }
        if self.connections == 0 || self.connections > CONNECTIONS_MAX {
            bail!("--connections must be in 1..={CONNECTIONS_MAX}");
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.validate()?;
    let plan = args.plan()?;
    if plan.is_empty() && !args.failover() {
        bail!("no workload selected");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        // Dropping `run` on a signal drops the clusters, which kills their processes.
        tokio::select! {
            result = run(&args, &plan) => result,
            _ = interrupt.recv() => bail!("interrupted; the clusters were stopped"),
            _ = terminate.recv() => bail!("terminated; the clusters were stopped"),
        }
    })
}

/// Seconds of unmeasured load before each row: long enough for connections, batches and
/// caches to settle, short next to the row.
fn warmup(secs_per_row: f64) -> Duration {
    Duration::from_secs_f64((secs_per_row / 5.0).clamp(0.2, 1.0))
}

async fn run(args: &Args, plan: &[Step]) -> anyhow::Result<()> {
    let node_bin = args.node_bin.clone().unwrap_or_else(default_node_bin);
    let load_average_before = read_trimmed("/proc/loadavg");
    let fsync_duration = Duration::from_secs_f64(args.fsync_secs);
    eprintln!("fsync probe in {} ({} s)", args.data_dir.display(), args.fsync_secs);
    let fsync_before = probe_fsync(&args.data_dir, fsync_duration).await?;
    eprintln!("  {:.0} fsyncs/s, p50 {} us", fsync_before.fsyncs_per_sec, fsync_before.latency.p50_us);

    eprintln!("starting 3 etcd members ({})", args.etcd_bin.display());
    let etcd_config =
        EtcdConfig { bin: args.etcd_bin.clone(), dir: args.data_dir.join("etcd"), base_port: args.base_port };
    let mut etcd = EtcdCluster::start(&etcd_config).await.context("starting the etcd cluster")?;
    eprintln!("  etcd {} serving, leader {}", etcd.version, etcd.leader_url);
    eprintln!("starting 3 aspen-node processes ({})", node_bin.display());
    let aspen_config = AspenConfig {
        bin: node_bin,
        dir: args.data_dir.join("aspen"),
        base_port: args.base_port.checked_add(20).context("--base-port too high")?,
        token: "aspen-bench-token".into(),
        admin_token: "aspen-bench-admin-token".into(),
        secret: "aspen-bench-cluster-secret".into(),
    };
    let mut aspen = AspenCluster::start(&aspen_config).await.context("starting the Aspen cluster")?;
    eprintln!("  Aspen serving, leader {}", aspen.leader);

    // Every connection goes to the leader on both systems: no forwarding hop for either.
    let mut aspen_connections = Vec::new();
    let mut etcd_connections = Vec::new();
    for _ in 0..args.connections {
        let client = AspenClient::connect(vec![aspen.leader.clone()], aspen_config.token.clone()).await?;
        aspen_connections.push(Arc::new(client));
        etcd_connections.push(Arc::new(EtcdClient::connect(&etcd.leader_url).await?));
    }
    if !plan.is_empty() {
        eprintln!("preloading {KEY_SPACE} keys of {VALUE_SIZE} B and {HOT_KEYS} hot keys into both");
        workload::preload(&aspen_connections).await.context("preloading Aspen")?;
        workload::preload(&etcd_connections).await.context("preloading etcd")?;
    }

    let secs_per_row = args.secs_per_row();
    let duration = Duration::from_secs_f64(secs_per_row);
    let warmup = warmup(secs_per_row);
    let total = plan.len() * 2 * args.rounds;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows, eta {eta}: {msg}")
            .context("progress bar template")?,
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut runs: HashMap<(usize, System), Vec<RowRun>> = HashMap::new();
    // This disk's fsync rate drifts by 10x and more within a run: each write row gets a
    // probe taken just before it.
    let mut row_fsyncs: HashMap<usize, Vec<f64>> = HashMap::new();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [System::Aspen, System::Etcd] } else { [System::Etcd, System::Aspen] };
        for (index, step) in plan.iter().enumerate() {
            if step.workload.writes_only() {
                bar.set_message(format!("fsync probe before {} x{}", step.workload.name(), step.clients));
                let probe = probe_fsync(&args.data_dir, ROW_PROBE).await?;
                row_fsyncs.entry(index).or_default().push(probe.fsyncs_per_sec);
            }
            for system in order {
                bar.set_message(format!(
                    "{} x{} on {} (round {}/{})",
                    step.workload.name(),
                    step.clients,
                    system.label(),
                    round + 1,
                    args.rounds
                ));
                let run = match system {
                    System::Aspen => workload::run_step(&aspen_connections, *step, warmup, duration).await?,
                    System::Etcd => workload::run_step(&etcd_connections, *step, warmup, duration).await?,
                };
                let line = format!(
                    "{:>9} x{:<3} {:<5} {:>8.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                    step.workload.name(),
                    step.clients,
                    system.label(),
                    run.measurement.ops_per_sec,
                    run.measurement.latency.p50_us as f64 / 1000.0,
                    run.measurement.latency.p99_us as f64 / 1000.0,
                    run.measurement.errors
                );
                // A hidden bar (no terminal) drops its println; the rows still get logged.
                if bar.is_hidden() {
                    eprintln!("{line}")
                } else {
                    bar.println(line)
                }
                if let Some(dir) = &args.timeline_dir {
                    write_timeline(dir, step, system, round, &run)?;
                }
                runs.entry((index, system)).or_default().push(run);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    for connection in &aspen_connections {
        connection.close().await;
    }
    let mut failover = Vec::new();
    if args.failover() {
        for round in 0..args.rounds {
            eprintln!(
                "failover round {}/{}: SIGKILL of each leader under a closed-loop writer",
                round + 1,
                args.rounds
            );
            let aspen_run = failover_aspen(&mut aspen, aspen_config.token.expose()).await.context("Aspen failover")?;
            let etcd_run = failover_etcd(&mut etcd).await.context("etcd failover")?;
            failover.push(FailoverRound { aspen: aspen_run, etcd: etcd_run });
            eprint!("{}", failover_table(&failover[failover.len() - 1..]));
        }
    }
    let etcd_version = etcd.version.clone();
    drop((aspen, etcd));

    // The stopped clusters leave dirty pages behind; flush them so the probe measures the
    // disk, not their writeback.
    let synced = tokio::task::spawn_blocking(|| std::process::Command::new("sync").status()).await;
    if !matches!(synced, Ok(Ok(status)) if status.success()) {
        eprintln!("warning: `sync` failed; the second fsync probe may include writeback");
    }
    let fsync_after = probe_fsync(&args.data_dir, fsync_duration).await?;
    let fsyncs_per_sec = baseline_fsyncs_per_sec(&fsync_before, Some(&fsync_after));
    let mut rows = Vec::new();
    for (index, step) in plan.iter().enumerate() {
        let aspen_runs = runs.remove(&(index, System::Aspen)).unwrap_or_default();
        let etcd_runs = runs.remove(&(index, System::Etcd)).unwrap_or_default();
        let rounds = |runs: &[RowRun]| runs.iter().map(|run| run.measurement.ops_per_sec).collect::<Vec<_>>();
        let (aspen_rounds, etcd_rounds) = (rounds(&aspen_runs), rounds(&etcd_runs));
        let aspen = Measurement::merge(aspen_runs);
        let etcd = Measurement::merge(etcd_runs);
        let row_rate = row_fsyncs.remove(&index).and_then(|rates| rates.into_iter().reduce(f64::max));
        rows.push(
            Comparison::new(step.workload, step.clients, aspen, etcd, row_rate)
                .with_rounds(&aspen_rounds, &etcd_rounds),
        );
    }
    let report = Report {
        settings: Settings {
            secs_per_row,
            warmup_secs: warmup.as_secs_f64(),
            rounds: args.rounds,
            value_bytes: VALUE_SIZE,
            key_space: KEY_SPACE,
            scan_keys: SCAN_KEYS,
            hot_keys: HOT_KEYS,
            connections: args.connections,
        },
        environment: Environment {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            etcd_version,
            data_dir: std::fs::canonicalize(&args.data_dir)
                .unwrap_or_else(|_| args.data_dir.clone())
                .display()
                .to_string(),
            load_average_before,
        },
        fsync_before,
        fsync_after: Some(fsync_after),
        fsyncs_per_sec,
        rows,
        skipped: vec![Skipped {
            workload: "Watch".into(),
            reason: "Aspen has no watch API yet, so there is nothing to compare etcd's watch with; not run.".into(),
        }],
        failover,
    };
    write_outputs(args, &report)
}

/// One failover of the Aspen cluster: a writer through a client given every node (the
/// leader first, as an application that just talked to it), the leader SIGKILLed, then
/// restarted and caught up.
async fn failover_aspen(aspen: &mut AspenCluster, token: &str) -> anyhow::Result<failover::Failover> {
    let mut peers = aspen.peers.clone();
    peers.sort_by_key(|peer| peer.id != aspen.leader.id);
    let client = Arc::new(AspenClient::connect(peers, token).await?);
    let writer = Arc::clone(&client);
    let write = move |n: u64| {
        let writer = Arc::clone(&writer);
        async move { writer.put(key(n), value(n)).await.map(|_| ()).map_err(OpError::from) }
    };
    let cluster = &mut *aspen;
    let kill = move || async move {
        let index = cluster.kill_leader().await?;
        Ok::<_, aspen_bench::cluster::ClusterError>((format!("node {}", index + 1), index))
    };
    let measured = failover::measure(write, kill).await;
    client.close().await;
    let (measured, killed) = measured?;
    aspen.restart(killed).await.context("restarting the killed Aspen node")?;
    Ok(measured)
}

/// One failover of the etcd cluster: a writer through every member (the leader first), the
/// leader SIGKILLed, then restarted.
async fn failover_etcd(etcd: &mut EtcdCluster) -> anyhow::Result<failover::Failover> {
    let members = Arc::new(EtcdMembers::connect(&etcd.client_urls, &etcd.leader_url).await?);
    let write = move |n: u64| {
        let members = Arc::clone(&members);
        async move { members.put(key(n), value(n)).await }
    };
    let cluster = &mut *etcd;
    let kill = move || async move {
        let index = cluster.kill_leader().await?;
        Ok::<_, aspen_bench::cluster::ClusterError>((format!("e{}", index + 1), index))
    };
    let (measured, killed) = failover::measure(write, kill).await?;
    etcd.restart(killed).await.context("restarting the killed etcd member")?;
    Ok(measured)
}

async fn probe_fsync(dir: &Path, duration: Duration) -> anyhow::Result<FsyncProbe> {
    let dir = dir.to_path_buf();
    let shown = dir.display().to_string();
    tokio::task::spawn_blocking(move || fsync::probe(&dir, duration))
        .await
        .context("fsync probe task")?
        .with_context(|| format!("fsync probe in {shown}"))
}

/// A small /proc file's contents, or empty when unreadable (the report then says nothing).
fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|text| text.trim().to_string()).unwrap_or_default()
}

/// aspen-node next to this executable (how cargo lays out a workspace), else on PATH.
fn default_node_bin() -> PathBuf {
    match std::env::current_exe() {
        Ok(exe) if exe.with_file_name("aspen-node").is_file() => exe.with_file_name("aspen-node"),
        _ => PathBuf::from("aspen-node"),
    }
}

/// Writes one row's requests for `--timeline-dir`.
fn write_timeline(dir: &Path, step: &Step, system: System, round: usize, run: &RowRun) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("{}-x{}-{}-r{round}.csv", step.workload.name(), step.clients, system.label());
    let path = dir.join(name);
    let mut text = format!("# {}\n", run.epoch_unix_us);
    for (end, latency) in &run.timeline {
        text += &format!("{end},{latency}\n");
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_outputs(args: &Args, report: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let json = serde_json::to_string_pretty(report).context("encoding the report")?;
    if report.rows.is_empty() {
        // A failover-only run has no chart, and must not replace a full run's report.
        let json_path = args.out_dir.join("etcd-vs-aspen-failover.json");
        std::fs::write(&json_path, &json).with_context(|| format!("cannot write {}", json_path.display()))?;
        eprintln!("wrote {}", json_path.display());
        if args.json {
            println!("{json}");
        } else {
            println!("{}", report.markdown());
        }
        return Ok(());
    }
    let json_path = args.out_dir.join("etcd-vs-aspen.json");
    std::fs::write(&json_path, &json).with_context(|| format!("cannot write {}", json_path.display()))?;
    let png_path = args.out_dir.join("etcd-vs-aspen.png");
    let with_text = chart::load_font();
    if !with_text {
        eprintln!("no font found in {:?}: the chart has bars but no text", chart::FONT_PATHS);
    }
    chart::draw(report, &png_path, with_text)?;
    eprintln!("wrote {} and {}", json_path.display(), png_path.display());
    if args.json {
        println!("{json}");
    } else {
        println!("{}", report.markdown());
    }
    Ok(())
}
