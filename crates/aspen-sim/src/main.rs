//! `aspen-sim`: runs seeds of the deterministic simulation. Build and run it with
//! `cargo xtask sim` (it needs `--cfg madsim`); see `cargo xtask sim --help`.

#[cfg(not(madsim))]
fn main() {
    eprintln!("aspen-sim must be built with RUSTFLAGS=\"--cfg madsim\"; run it with `cargo xtask sim --help`.");
    std::process::exit(2);
}

#[cfg(madsim)]
fn main() -> anyhow::Result<()> {
    sim_main::main()
}

#[cfg(madsim)]
mod sim_main {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Mutex, MutexGuard};
    use std::time::Instant;

    use anyhow::{Context, Result, bail};
    use aspen_sim::config::{SimConfig, faults_to_string, parse_faults};
    use aspen_sim::history::history_json;
    use aspen_sim::run::{SeedReport, run_seed};
    use clap::Parser;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    /// Runs seeds of Aspen's deterministic simulation and checks every history.
    ///
    /// Every seed runs in its own process, so a seed's execution never depends on which
    /// seeds ran before it: the printed replay command reproduces it exactly.
    #[derive(Parser, Debug)]
    #[command(name = "aspen-sim", version)]
    struct Args {
        /// How many seeds to run, starting at --first-seed.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        /// Run exactly this seed (replay); overrides --seeds and --first-seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Faults: all, none, or a list of drop,delay,duplicate,reorder,partition,one-way,
        /// crash,pause,clock-skew,membership,snapshot.
        #[arg(long, default_value = "all")]
        faults: String,
        /// Simulated seconds of workload per seed.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// Concurrent simulated clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Keys the clients share.
        #[arg(long, default_value_t = 3)]
        keys: usize,
        /// Seeds run at once (default: available cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// The deliberate bug this binary was built with (must match the build; set by xtask).
        #[arg(long)]
        bug: Option<String>,
        /// Succeed only if some seed fails (proves the simulator catches --bug); stops at the first.
        #[arg(long)]
        expect_failure: bool,
        /// Run every seed twice, in two processes, and fail if the two traces differ.
        #[arg(long)]
        check_determinism: bool,
        /// Where failing seeds write their artifacts.
        #[arg(long, default_value = "target/sim-artifacts")]
        artifacts: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Internal: run the one seed given by --seed in this process and print its result.
        #[arg(long, hide = true)]
        worker: bool,
    }

    /// What one seed's process reports.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct SeedResult {
        seed: u64,
        failure: Option<String>,
        explanation: Option<String>,
        artifact: Option<PathBuf>,
        operations: u64,
        unknown_outcomes: u64,
        simulated_secs: f64,
        trace_digest: String,
        /// Writes through the majority's leader while a minority was cut off, in ms.
        #[serde(default)]
        minority_writes_ms: Vec<u64>,
        /// From cutting off the leader to the majority's new leader committing, in ms.
        #[serde(default)]
        leader_cut_offs_ms: Vec<u64>,
    }

    /// Availability timings of a run, over every seed.
    #[derive(Serialize)]
    struct Latencies {
        count: usize,
        p50_ms: Option<u64>,
        p99_ms: Option<u64>,
        max_ms: Option<u64>,
        /// The seed with the longest one.
        max_seed: Option<u64>,
    }

    impl Latencies {
        fn of(results: &BTreeMap<u64, SeedResult>, pick: impl Fn(&SeedResult) -> &Vec<u64>) -> Latencies {
            let mut all: Vec<(u64, u64)> =
                results.values().flat_map(|result| pick(result).iter().map(|ms| (*ms, result.seed))).collect();
            all.sort_unstable();
            let at = |percent: usize| all.get((all.len() * percent / 100).min(all.len().saturating_sub(1)));
            Latencies {
                count: all.len(),
                p50_ms: at(50).map(|(ms, _)| *ms),
                p99_ms: at(99).map(|(ms, _)| *ms),
                max_ms: all.last().map(|(ms, _)| *ms),
                max_seed: all.last().map(|(_, seed)| *seed),
            }
        }

        fn line(&self) -> Option<String> {
            let (p50, p99, max, seed) = (self.p50_ms?, self.p99_ms?, self.max_ms?, self.max_seed?);
            Some(format!("{} (p50 {p50} ms, p99 {p99} ms, max {max} ms at seed {seed})", self.count))
        }
    }

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn data_root() -> PathBuf {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        base.join(format!("aspen-sim-{}", std::process::id()))
    }

    fn write_artifact(
        dir: &Path,
        report: &SeedReport,
        bug: Option<&str>,
        kind: &str,
        message: &str,
    ) -> Result<PathBuf> {
        let dir = dir.join(format!("seed-{}", report.config.seed));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let summary = json!({
            "seed": report.config.seed,
            "config": report.config,
            "bug": bug,
            "failure": kind,
            "explanation": message,
            "replay": report.config.replay_command(bug),
            "simulated_secs": report.sim_elapsed.as_secs_f64(),
            "operations": report.history.len(),
            "trace_digest": report.trace.digest(),
        });
        std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
        std::fs::write(dir.join("trace.log"), report.trace.render())?;
        std::fs::write(dir.join("history.json"), serde_json::to_string_pretty(&history_json(&report.history))?)?;
        std::fs::write(dir.join("explanation.txt"), format!("{kind}\n\n{message}\n"))?;
        Ok(dir)
    }

    /// Worker mode: one seed in this process.
    fn worker(config: SimConfig, bug: Option<&str>, artifacts: &Path) -> Result<()> {
        let root = data_root();
        let _ = std::fs::remove_dir_all(artifacts.join(format!("seed-{}", config.seed)));
        let report = run_seed(&config, &root);
        if std::env::var_os("ASPEN_SIM_LOG").is_some() {
            eprintln!("--- trace of seed {} ---\n{}", config.seed, report.trace.render());
        }
        let _ = std::fs::remove_dir_all(&root);
        let mut result = SeedResult {
            seed: config.seed,
            failure: None,
            explanation: None,
            artifact: None,
            operations: report.history.len() as u64,
            unknown_outcomes: report.history.iter().filter(|op| op.ret.is_none()).count() as u64,
            simulated_secs: report.sim_elapsed.as_secs_f64(),
            trace_digest: report.trace.digest(),
            minority_writes_ms: report.trace.minority_writes_ms(),
            leader_cut_offs_ms: report.trace.leader_cut_offs_ms(),
        };
        if let Some((kind, message)) = &report.failure {
            let kind = serde_json::to_value(kind)?.as_str().unwrap_or("failure").to_string();
            result.artifact = Some(write_artifact(artifacts, &report, bug, &kind, message)?);
            result.failure = Some(kind);
            result.explanation = Some(message.clone());
        }
        println!("{}", serde_json::to_string(&result)?);
        Ok(())
    }

    /// Runs `config`'s seed in a child process of this binary.
    fn spawn_seed(config: &SimConfig, args: &Args) -> Result<SeedResult> {
        let exe = std::env::current_exe().context("locating aspen-sim")?;
        let mut command = Command::new(exe);
        command
            .arg("--worker")
            .args(["--seed", &config.seed.to_string()])
            .args(["--faults", &faults_to_string(&config.faults)])
            .args(["--secs", &config.sim_secs.to_string()])
            .args(["--clients", &config.clients.to_string()])
            .args(["--keys", &config.keys.to_string()])
            .arg("--artifacts")
            .arg(&args.artifacts)
            .stdout(Stdio::piped());
        if let Some(bug) = &args.bug {
            command.args(["--bug", bug]);
        }
        let output = command.output().context("running a seed process")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or("");
        match serde_json::from_str::<SeedResult>(line) {
            Ok(result) => Ok(result),
            Err(_) => Ok(SeedResult {
                seed: config.seed,
                failure: Some("crashed".into()),
                explanation: Some(format!("the seed's process exited with {} and no result", output.status)),
                artifact: None,
                operations: 0,
                unknown_outcomes: 0,
                simulated_secs: 0.0,
                trace_digest: String::new(),
                minority_writes_ms: Vec::new(),
                leader_cut_offs_ms: Vec::new(),
            }),
        }
    }

    pub fn main() -> Result<()> {
        let args = Args::parse();
        let built_bug = if cfg!(feature = "bug-stale-read") {
            Some("stale-read")
        } else if cfg!(feature = "bug-no-dedup") {
            Some("no-dedup")
        } else if cfg!(feature = "bug-unconfirmed-read") {
            Some("unconfirmed-read")
        } else {
            None
        };
        if args.bug.as_deref() != built_bug {
            bail!("--bug {:?} does not match this build ({built_bug:?}); use `cargo xtask sim`", args.bug);
        }
        let faults = parse_faults(&args.faults)?;
        let (first, count) = match args.seed {
            Some(seed) => (seed, 1),
            None => (args.first_seed, args.seeds),
        };
        let template = SimConfig { seed: first, faults, sim_secs: args.secs, clients: args.clients, keys: args.keys };
        template.validate()?;
        if args.worker {
            // Debugging aid: `ASPEN_SIM_LOG=openraft=debug,aspen=debug` prints the nodes'
            // own tracing to stderr (simulated wall clock), next to the seed's trace.
            // `Targets`, not `EnvFilter`: the latter's hash maps draw seeds from getrandom,
            // which madsim answers from the seed's RNG, so logging would change the run.
            if let Ok(filter) = std::env::var("ASPEN_SIM_LOG") {
                use tracing_subscriber::layer::SubscriberExt;
                use tracing_subscriber::util::SubscriberInitExt;
                let targets: tracing_subscriber::filter::Targets =
                    filter.parse().context("ASPEN_SIM_LOG is not a list of target=level")?;
                tracing_subscriber::registry()
                    .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false))
                    .with(targets)
                    .init();
            }
            return worker(template, args.bug.as_deref(), &args.artifacts);
        }
        let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
        eprintln!(
            "aspen-sim: {count} seed(s) from {first}, faults {}, {} s simulated each, {} clients, {} keys, {jobs} job(s){}",
            faults_to_string(&template.faults),
            args.secs,
            args.clients,
            args.keys,
            built_bug.map(|bug| format!(", deliberate bug {bug}")).unwrap_or_default()
        );

        let next = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let results: Mutex<BTreeMap<u64, SeedResult>> = Mutex::default();
        let wall = Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let mut workers = Vec::new();
            for _ in 0..jobs {
                workers.push(scope.spawn(|| -> Result<()> {
                    loop {
                        let offset = next.fetch_add(1, Ordering::Relaxed);
                        if offset >= count || stop.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let config = SimConfig { seed: first + offset, ..template.clone() };
                        let mut result = spawn_seed(&config, &args)?;
                        if args.check_determinism && result.failure.is_none() {
                            let again = spawn_seed(&config, &args)?;
                            if again.trace_digest != result.trace_digest {
                                result.failure = Some("nondeterministic".into());
                                result.explanation = Some(format!(
                                    "two runs of seed {} differ: trace digests {} and {}",
                                    config.seed, result.trace_digest, again.trace_digest
                                ));
                            }
                        }
                        if let (Some(kind), Some(message)) = (&result.failure, &result.explanation) {
                            eprintln!("seed {} FAILED ({kind}): {}", config.seed, message.lines().next().unwrap_or(""));
                            if let Some(artifact) = &result.artifact {
                                eprintln!("  artifact: {}", artifact.display());
                            }
                            eprintln!("  replay:   {}", config.replay_command(args.bug.as_deref()));
                            if args.expect_failure {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                        let mut results = lock(&results);
                        results.insert(config.seed, result);
                        let finished = results.len() as u64;
                        if finished.is_multiple_of(10) || finished == count {
                            let failed = results.values().filter(|result| result.failure.is_some()).count();
                            eprintln!(
                                "[{finished}/{count}] seeds done, {failed} failed, {:.0} s wall",
                                wall.elapsed().as_secs_f64()
                            );
                        }
                    }
                }));
            }
            for worker in workers {
                worker.join().map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
            }
            Ok(())
        })?;

        let wall = wall.elapsed();
        let results = results.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
        let failures: Vec<&SeedResult> = results.values().filter(|result| result.failure.is_some()).collect();
        let seeds_run = results.len();
        let operations: u64 = results.values().map(|result| result.operations).sum();
        let unknown: u64 = results.values().map(|result| result.unknown_outcomes).sum();
        let simulated: f64 = results.values().map(|result| result.simulated_secs).sum();
        let sim_hours_per_minute = simulated / 3600.0 / (wall.as_secs_f64() / 60.0).max(1e-9);
        let minority_writes = Latencies::of(&results, |result| &result.minority_writes_ms);
        let leader_cut_offs = Latencies::of(&results, |result| &result.leader_cut_offs_ms);
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "seeds_run": seeds_run,
                    "faults": faults_to_string(&template.faults),
                    "bug": args.bug,
                    "failures": failures,
                    "operations": operations,
                    "unknown_outcomes": unknown,
                    "simulated_secs": simulated,
                    "wall_secs": wall.as_secs_f64(),
                    "simulated_hours_per_wall_minute": sim_hours_per_minute,
                    "minority_writes": minority_writes,
                    "leader_cut_offs": leader_cut_offs,
                    "trace_digests": results.values().map(|result| (result.seed, result.trace_digest.clone())).collect::<BTreeMap<_, _>>(),
                }))?
            );
        } else {
            println!(
                "{seeds_run} seed(s), {} failed; {operations} operations checked ({unknown} with unknown outcome); {:.2} simulated hours in {:.1} s wall ({sim_hours_per_minute:.2} simulated hours per wall minute)",
                failures.len(),
                simulated / 3600.0,
                wall.as_secs_f64()
            );
            if let Some(line) = minority_writes.line() {
                println!("writes through the majority's leader with a minority cut off: {line}");
            }
            if let Some(line) = leader_cut_offs.line() {
                println!("from cutting off the leader to a new leader's first commit: {line}");
            }
        }
        match (args.expect_failure, failures.is_empty()) {
            (false, true) => Ok(()),
            (false, false) => bail!("{} seed(s) failed", failures.len()),
            (true, false) => {
                println!("the deliberate bug was caught after {seeds_run} seed(s)");
                Ok(())
            }
            (true, true) => bail!("expected a failure, but {seeds_run} seed(s) passed"),
        }
    }
}
