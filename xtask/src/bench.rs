//! `cargo xtask bench`: the data-path benchmark (the `bench` binary of
//! mesh-e2e) on release builds, plus the policy benchmark (criterion).
//! Results land in `bench/results/<timestamp>/` and `bench/results/latest.md`.
//! `--baseline-agent PATH` measures a saved `mesh-agent` (the code before a
//! change) beside the current build in the same run.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use crate::{cmd, setup, workspace};

#[derive(clap::Args)]
pub struct Args {
    /// One repetition of short runs (a couple of minutes), no criterion.
    #[arg(long)]
    quick: bool,
    /// Repetitions (default: 5; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Only these variants, comma-separated (e.g. `direct,agent-l7/accel-off`;
    /// with `--baseline-agent` also `agent-l7/accel-off@before`).
    #[arg(long)]
    only: Option<String>,
    /// A saved `mesh-agent` binary (e.g. a release build of the commit before
    /// a change): every agent variant also runs as `<variant>@before` on it,
    /// interleaved in the same repetitions, and the report adds after/before
    /// ratios.
    #[arg(long, value_name = "PATH")]
    baseline_agent: Option<PathBuf>,
    /// Where the results go (default `bench/results`, whose `latest.md` the
    /// README links): another directory keeps a trial run out of it.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Skip the policy benchmark (criterion), which a full run includes.
    #[arg(long)]
    no_policy: bool,
}

pub fn run(args: &Args) -> Result<()> {
    // Before the (long) release build: a wrong path fails at once.
    let baseline = args.baseline_agent.as_deref().map(baseline_agent).transpose()?;
    let target = workspace::target_dir()?;
    let current = target.join("release").join("mesh-agent");
    if let Some(path) = &baseline
        && std::fs::canonicalize(&current).is_ok_and(|c| c == *path)
    {
        bail!(
            "--baseline-agent {}: that is the binary this command rebuilds from the current code; \
             copy the old build elsewhere first (see bench/README.md)",
            path.display()
        );
    }
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
    let out = match &args.out {
        Some(dir) => std::path::absolute(dir)?,
        None => workspace::root().join("bench").join("results"),
    };
    let mut bench = Command::new(target.join("release").join("bench"));
    bench
        .args(["--mode", if args.quick { "quick" } else { "full" }])
        .arg("--out")
        .arg(out)
        .current_dir(workspace::root())
        .env(workspace::MESH_AGENT_BIN, &current)
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
    if let Some(path) = &baseline {
        bench.arg("--baseline-agent").arg(path);
    }
    cmd::run(&mut bench)
}

/// `--baseline-agent`: an executable file, made absolute (the bench runs in
/// the workspace root). The bench checks it is a `mesh-agent`.
fn baseline_agent(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "--baseline-agent {}: no such file (build the old commit's agent first, see bench/README.md)",
            path.display()
        )
    })?;
    if !meta.is_file() {
        bail!("--baseline-agent {}: not a file", path.display());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("--baseline-agent {}: not executable (chmod +x it)", path.display());
    }
    std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))
}
