//! Project chores as Rust commands: `cargo xtask ci | bench | deny`.

use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
cargo xtask <command>

Commands:
  ci      format check, clippy -D warnings on all targets, every test (what CI runs)
  bench   storage benchmarks (criterion, target/criterion/) and the 3-node cluster
          closed-loop benchmark (target/bench/cluster.json); extra args go to criterion
  deny    cargo-deny license/ban/source checks (installs cargo-deny if missing)
  help    this text
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
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
    Ok(())
}

fn bench(extra: &[String]) -> Result<()> {
    let mut args = vec!["bench", "--package", "aspen-raft-storage", "--bench", "storage", "--"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)?;
    cargo(&["bench", "--package", "aspen-server", "--bench", "cluster"])
}

fn deny() -> Result<()> {
    let installed = Command::new("cargo-deny").arg("--version").output().is_ok_and(|output| output.status.success());
    if !installed {
        cargo(&["install", "--locked", "cargo-deny"])?;
    }
    // Advisories need the RustSec database from GitHub, which these machines cannot reach.
    cargo(&["deny", "--offline", "check", "bans", "licenses", "sources"])
}
