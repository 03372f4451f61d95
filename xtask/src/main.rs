//! Project chores as Rust commands: `cargo xtask ci | bench | deny`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
cargo xtask <command>

Commands:
  ci      format check, clippy -D warnings on all targets, every test (what CI runs)
  bench [all]       every benchmark below, in this order
  bench storage     storage benchmarks (criterion, target/criterion/); extra args go to
                    criterion (e.g. --noplot)
  bench cluster     closed-loop load on 3 in-process nodes (target/bench/cluster.json)
  bench etcd        Aspen vs etcd, 3 nodes each, same machine, same load generator:
                    installs etcd 3.4 from Debian (etcd-server, etcd-client) and a font if
                    missing, builds release binaries, runs aspen-bench; markdown on stdout,
                    target/bench/etcd-vs-aspen.{json,png}. Extra args go to aspen-bench,
                    e.g. --quick, --secs 10, --rounds 2, --workloads put,get, --json
                    (see `cargo run -p aspen-bench -- --help`)
  sim     deterministic simulation (madsim): builds crates/aspen-sim with --cfg madsim
          (target/sim/) and runs it; failing seeds write target/sim-artifacts/seed-N/.
          e.g. sim --seeds 10000 --faults all        a long run
               sim --seed 42 --faults crash,drop     replay one seed
               sim --bug stale-read --seeds 50 --expect-failure
                                                    prove a deliberate bug is caught
                                                    (bugs: stale-read, unconfirmed-read, no-dedup)
          other flags: --secs, --clients, --keys, --jobs, --check-determinism, --json
          (all passed to aspen-sim; see `cargo xtask sim --help`)
  deny    cargo-deny license/ban/source checks (installs cargo-deny if missing)
  help    this text
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("sim") => sim(&args[1..]),
        Some("deny") => deny(),
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> cargo {}", args.join(" "));
    let status = Command::new(&cargo).args(args).status().with_context(|| format!("running cargo {args:?}"))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"])?;
    cargo(&["test", "--workspace", "--locked", "--no-fail-fast"])?;
    // The simulator's own code only compiles with --cfg madsim: lint it there too.
    sim_cargo(&["clippy", "-p", "aspen-sim", "--all-targets", "--locked", "--", "-D", "warnings"])?;
    // A bounded number of seeds with every fault, one seed replayed for determinism, and the
    // deliberate bug, which must be caught.
    sim(&["--seeds", "200", "--faults", "all"].map(String::from))?;
    sim(&["--seeds", "2", "--first-seed", "1000", "--check-determinism"].map(String::from))?;
    sim(&["--bug", "stale-read", "--seeds", "50", "--expect-failure"].map(String::from))?;
    sim(&["--bug", "unconfirmed-read", "--seeds", "50", "--expect-failure"].map(String::from))?;
    sim(&["--bug", "no-dedup", "--seeds", "50", "--expect-failure"].map(String::from))?;
    Ok(())
}

/// Runs cargo for the simulator: `--cfg madsim`, in its own target directory so the normal
/// build is not invalidated.
fn sim_cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> RUSTFLAGS=\"--cfg madsim\" cargo {}", args.join(" "));
    let target = workspace_root().join("target").join("sim");
    let status = Command::new(&cargo)
        .args(args)
        .env("RUSTFLAGS", "--cfg madsim")
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .with_context(|| format!("running cargo {args:?}"))?;
    if !status.success() {
        bail!("cargo {} (--cfg madsim) failed with {status}", args.join(" "));
    }
    Ok(())
}

fn sim(args: &[String]) -> Result<()> {
    let bug = args.iter().position(|arg| arg == "--bug").and_then(|index| args.get(index + 1));
    let mut build = vec!["build", "-p", "aspen-sim", "--locked"];
    match bug.map(String::as_str) {
        None => {}
        Some("stale-read") => build.extend(["--features", "bug-stale-read"]),
        Some("unconfirmed-read") => build.extend(["--features", "bug-unconfirmed-read"]),
        Some("no-dedup") => build.extend(["--features", "bug-no-dedup"]),
        Some(other) => bail!("unknown deliberate bug {other:?}; known: stale-read, unconfirmed-read, no-dedup"),
    }
    sim_cargo(&build)?;
    let root = workspace_root();
    let binary = root.join("target/sim/debug/aspen-sim");
    let artifacts = root.join("target/sim-artifacts");
    eprintln!("==> aspen-sim {}", args.join(" "));
    let mut command = Command::new(&binary);
    command.args(args);
    if !args.iter().any(|arg| arg == "--artifacts") {
        command.arg("--artifacts").arg(&artifacts);
    }
    let status = command.status().with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        bail!("aspen-sim {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let (which, extra) = match args.split_first() {
        Some((first, rest)) if !first.starts_with('-') => (first.as_str(), rest),
        _ => ("all", args),
    };
    match which {
        "storage" => bench_storage(extra),
        "cluster" => bench_cluster(),
        "etcd" => bench_etcd(extra),
        "all" => {
            bench_storage(extra)?;
            bench_cluster()?;
            bench_etcd(&[])
        }
        other => bail!("unknown benchmark {other:?}\n\n{USAGE}"),
    }
}

fn bench_storage(extra: &[String]) -> Result<()> {
    let mut args = vec!["bench", "--package", "aspen-raft-storage", "--bench", "storage", "--"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

fn bench_cluster() -> Result<()> {
    cargo(&["bench", "--package", "aspen-server", "--bench", "cluster"])
}

/// Font files aspen-bench can draw the chart's text with (its first choice first).
const FONT_FILES: [&str; 2] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

fn bench_etcd(extra: &[String]) -> Result<()> {
    if !succeeds(Command::new("etcd").arg("--version")) {
        eprintln!("==> etcd not found: installing etcd-server and etcd-client from Debian");
        apt_install(&["etcd-server", "etcd-client"])?;
    }
    if !FONT_FILES.iter().any(|path| Path::new(path).is_file())
        && let Err(error) = apt_install(&["fonts-dejavu-core"])
    {
        eprintln!("warning: no font for the chart's text ({error:#}); the chart will have bars only");
    }
    cargo(&["build", "--release", "--package", "aspen-node", "--package", "aspen-bench"])?;
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let target = if target.is_absolute() { target } else { root.join(target) };
    let out_dir = target.join("bench");
    let binary = target.join("release").join("aspen-bench");
    eprintln!("==> {} {}", binary.display(), extra.join(" "));
    let status = Command::new(&binary)
        .arg("--out-dir")
        .arg(&out_dir)
        .arg("--data-dir")
        .arg(out_dir.join("etcd-vs-aspen"))
        .arg("--node-bin")
        .arg(target.join("release").join("aspen-node"))
        .args(extra)
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        bail!("aspen-bench failed with {status}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().map_or(manifest_dir.clone(), Path::to_path_buf)
}

fn succeeds(command: &mut Command) -> bool {
    command.output().is_ok_and(|output| output.status.success())
}

/// `apt-get install -y PACKAGES` (through sudo unless root), with `apt-get update` and a
/// second try if the first fails (a fresh machine has no package lists).
fn apt_install(packages: &[&str]) -> Result<()> {
    let is_root =
        Command::new("id").arg("-u").output().is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0");
    let apt_get = |args: &[&str]| -> Result<bool> {
        // sudo resets the environment, so the variable goes through `env`.
        let mut command = if is_root { Command::new("env") } else { Command::new("sudo") };
        if !is_root {
            command.arg("env");
        }
        command.arg("DEBIAN_FRONTEND=noninteractive").arg("apt-get").args(args);
        eprintln!("==> apt-get {}", args.join(" "));
        Ok(command.status().with_context(|| format!("running apt-get {}", args.join(" ")))?.success())
    };
    let mut install = vec!["install", "-y"];
    install.extend_from_slice(packages);
    if apt_get(&install)? {
        return Ok(());
    }
    if !apt_get(&["update"])? {
        bail!("apt-get update failed");
    }
    if !apt_get(&install)? {
        bail!("apt-get install -y {} failed", packages.join(" "));
    }
    Ok(())
}

fn deny() -> Result<()> {
    let installed = Command::new("cargo-deny").arg("--version").output().is_ok_and(|output| output.status.success());
    if !installed {
        cargo(&["install", "--locked", "cargo-deny"])?;
    }
    // Advisories need the RustSec database from GitHub, which these machines cannot reach.
    cargo(&["deny", "--offline", "check", "bans", "licenses", "sources"])
}
