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
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use aspen_sim::config::{SimConfig, faults_to_string, parse_faults};
    use aspen_sim::history::history_json;
    use aspen_sim::run::{SeedReport, run_seed};
    use clap::Parser;
    use serde_json::json;

    /// Runs seeds of Aspen's deterministic simulation and checks every history.
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
        /// Run every seed twice and fail if the two traces differ.
        #[arg(long)]
        check_determinism: bool,
        /// Where failing seeds write their artifacts.
        #[arg(long, default_value = "target/sim-artifacts")]
        artifacts: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
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

    fn run_in_thread(config: SimConfig, root: PathBuf) -> Result<SeedReport> {
        // A fresh thread per seed: thread-local state (hash seeds, RNGs) starts the same
        // for every run of a seed, whichever seeds ran before it.
        std::thread::Builder::new()
            .name(format!("seed-{}", config.seed))
            .stack_size(64 * 1024 * 1024)
            .spawn(move || run_seed(&config, &root))
            .context("spawning a seed thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("seed thread panicked outside the simulation"))
    }

    pub fn main() -> Result<()> {
        let args = Args::parse();
        let built_bug = if cfg!(feature = "bug-stale-read") { Some("stale-read") } else { None };
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
        let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
        let root = data_root();
        eprintln!(
            "aspen-sim: {count} seed(s) from {first}, faults {}, {} s simulated each, {} clients, {} keys, {jobs} job(s){}",
            faults_to_string(&template.faults),
            args.secs,
            args.clients,
            args.keys,
            built_bug.map(|bug| format!(", deliberate bug {bug}")).unwrap_or_default()
        );

        let next = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let results: Arc<Mutex<Vec<(u64, String, String, Option<PathBuf>)>>> = Arc::default();
        let totals = Arc::new(Mutex::new((Duration::ZERO, 0u64, 0u64)));
        let wall = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..jobs {
            let (next, stop, done, results, totals) =
                (next.clone(), stop.clone(), done.clone(), results.clone(), totals.clone());
            let (template, root, artifacts, bug) =
                (template.clone(), root.clone(), args.artifacts.clone(), args.bug.clone());
            let (expect_failure, check_determinism) = (args.expect_failure, args.check_determinism);
            workers.push(std::thread::spawn(move || -> Result<()> {
                loop {
                    let offset = next.fetch_add(1, Ordering::Relaxed);
                    if offset >= count || stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let config = SimConfig { seed: first + offset, ..template.clone() };
                    // An artifact from an earlier run of this seed would be mistaken for this one's.
                    let _ = std::fs::remove_dir_all(artifacts.join(format!("seed-{}", config.seed)));
                    let report = run_in_thread(config.clone(), root.clone())?;
                    let mut failure = report.failure.clone().map(|(kind, message)| {
                        (
                            serde_json::to_value(&kind)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            message,
                        )
                    });
                    if check_determinism && failure.is_none() {
                        let again = run_in_thread(config.clone(), root.clone())?;
                        if again.trace.digest() != report.trace.digest() || again.history != report.history {
                            failure = Some((
                                "nondeterministic".into(),
                                format!(
                                    "two runs of seed {} differ: trace {} vs {}, {} vs {} operations",
                                    config.seed,
                                    report.trace.digest(),
                                    again.trace.digest(),
                                    report.history.len(),
                                    again.history.len()
                                ),
                            ));
                        }
                    }
                    {
                        let mut totals = totals.lock().unwrap_or_else(|p| p.into_inner());
                        totals.0 += report.sim_elapsed;
                        totals.1 += report.history.len() as u64;
                        totals.2 += report.history.iter().filter(|op| op.ret.is_none()).count() as u64;
                    }
                    if let Some((kind, message)) = failure {
                        let artifact = write_artifact(&artifacts, &report, bug.as_deref(), &kind, &message)?;
                        eprintln!("seed {} FAILED ({kind}): {}", config.seed, message.lines().next().unwrap_or(""));
                        eprintln!("  artifact: {}", artifact.display());
                        eprintln!("  replay:   {}", config.replay_command(bug.as_deref()));
                        results.lock().unwrap_or_else(|p| p.into_inner()).push((
                            config.seed,
                            kind,
                            message,
                            Some(artifact),
                        ));
                        if expect_failure {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if finished % 10 == 0 || finished == count {
                        let failed = results.lock().unwrap_or_else(|p| p.into_inner()).len();
                        eprintln!(
                            "[{finished}/{count}] seeds done, {failed} failed, {:.0} s wall",
                            wall.elapsed().as_secs_f64()
                        );
                    }
                }
            }));
        }
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        let _ = std::fs::remove_dir_all(&root);
        let wall = wall.elapsed();
        let (simulated, operations, unknown) = *totals.lock().unwrap_or_else(|p| p.into_inner());
        let failures = results.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let seeds_run = done.load(Ordering::Relaxed);
        let sim_hours_per_minute = simulated.as_secs_f64() / 3600.0 / (wall.as_secs_f64() / 60.0).max(1e-9);
        if args.json {
            let failures: Vec<_> = failures
                .iter()
                .map(|(seed, kind, message, artifact)| json!({"seed": seed, "kind": kind, "explanation": message, "artifact": artifact}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "seeds_run": seeds_run,
                    "faults": faults_to_string(&template.faults),
                    "bug": args.bug,
                    "failures": failures,
                    "operations": operations,
                    "unknown_outcomes": unknown,
                    "simulated_secs": simulated.as_secs_f64(),
                    "wall_secs": wall.as_secs_f64(),
                    "simulated_hours_per_wall_minute": sim_hours_per_minute,
                }))?
            );
        } else {
            println!(
                "{seeds_run} seed(s), {} failed; {operations} operations checked ({unknown} with unknown outcome); {:.2} simulated hours in {:.1} s wall ({sim_hours_per_minute:.2} simulated hours per wall minute)",
                failures.len(),
                simulated.as_secs_f64() / 3600.0,
                wall.as_secs_f64()
            );
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
