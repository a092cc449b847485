//! `cargo xtask bench`: the data-path benchmark (the `bench` binary of
//! mesh-e2e) on release builds, plus the policy benchmark (criterion).
//! Results land in `bench/results/<timestamp>/` and `bench/results/latest.md`.

use std::process::Command;
use std::time::SystemTime;

use anyhow::{Result, bail};

use crate::{cmd, setup, workspace};

#[derive(clap::Args)]
pub struct Args {
    /// One repetition of short runs (a couple of minutes), no criterion.
    #[arg(long)]
    quick: bool,
    /// Repetitions (default: 5; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Only these variants, comma-separated (e.g. `direct,agent-l7/accel-off`).
    #[arg(long)]
    only: Option<String>,
    /// Skip the policy benchmark (criterion), which a full run includes.
    #[arg(long)]
    no_policy: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "`cargo xtask bench` must run as root: it creates network namespaces and cgroups \
             and loads eBPF programs (try `sudo -E cargo xtask bench`)"
        );
    }
    setup::run()?;
    setup::bench_tools()?;
    workspace::build_release_bins()?;
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let policy = !args.quick && !args.no_policy;
    if policy {
        // `--noplot`: the numbers, not criterion's HTML report.
        cmd::run(workspace::cargo().args([
            "bench", "--package", "mesh-agent", "--bench", "policy", "--", "--noplot",
        ]))?;
    }
    let target = workspace::target_dir()?;
    let mut bench = Command::new(target.join("release").join("bench"));
    bench
        .args(["--mode", if args.quick { "quick" } else { "full" }])
        .arg("--out")
        .arg(workspace::root().join("bench").join("results"))
        .current_dir(workspace::root())
        .env(workspace::MESH_AGENT_BIN, target.join("release").join("mesh-agent"))
        .env("MESHTEST_BIN", target.join("release").join("meshtest"))
        .env("PATH", setup::path_with_cargo_bin());
    if policy {
        bench
            .arg("--criterion-dir")
            .arg(target.join("criterion"))
            .args(["--criterion-since", &since.to_string()]);
    }
    if let Some(reps) = args.reps {
        bench.args(["--reps", &reps.to_string()]);
    }
    if let Some(only) = &args.only {
        bench.args(["--only", only]);
    }
    cmd::run(&mut bench)
}
