//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the cargo-fuzz
//! targets of `fuzz/` (one build for all) and runs each for a bounded time
//! on its committed seed corpus. New inputs go to a scratch corpus under the
//! target directory, so `fuzz/corpus/<target>/` stays the reviewed seeds; a
//! crash leaves its input in `fuzz/artifacts/<target>/` and fails the run
//! (make it a regression test in the normal suite, see fuzz/README.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cmd, setup, workspace};

/// Every target of `fuzz/Cargo.toml`, in the order they run.
pub const TARGETS: [&str; 5] = ["front_door", "connect_authority", "path", "localfile", "certificates"];

#[derive(clap::Args)]
pub struct Args {
    /// How long each target runs.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Only these targets (default: all).
    targets: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    setup::cargo_fuzz()?;
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target `{t}`: the targets are {}", TARGETS.join(", "));
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    fuzz(&targets, args.seconds)
}

/// Builds every target, then runs each of `targets` for `seconds`.
pub fn fuzz(targets: &[&str], seconds: u64) -> Result<()> {
    let dir = fuzz_dir();
    let target_dir = workspace::target_dir()?.join("fuzz");
    cmd::run(&mut cargo_fuzz(&dir, "build", &target_dir)).context("building the fuzz targets")?;
    for t in targets {
        let scratch = target_dir.join("corpus").join(t);
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let seeds = dir.join("corpus").join(t);
        cmd::run(
            cargo_fuzz(&dir, "run", &target_dir)
                .arg(t)
                .arg(&scratch)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                // A slow input is a finding too; so is unbounded memory.
                .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]),
        )
        .with_context(|| format!("fuzz target `{t}` found a crash: the input is in {}", dir.join("artifacts").join(t).display()))?;
    }
    eprintln!("xtask fuzz: {} targets, {seconds}s each: no crash", targets.len());
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    workspace::root().join("fuzz")
}

/// `cargo fuzz` on the nightly (it needs `-Z sanitizer`), over `fuzz/`;
/// the agent's eBPF object is not needed for parsers.
fn cargo_fuzz(dir: &Path, subcommand: &str, target_dir: &Path) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz", subcommand])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(dir)
        .env("AYA_BUILD_SKIP", "1");
    // What the outer cargo (running xtask on stable) exports would change
    // build scripts' fingerprints: run as from a clean shell, so a direct
    // `cargo fuzz` and this one share the build.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let outer = (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR")
            || matches!(&*k, "CARGO" | "RUSTC" | "RUSTDOC" | "RUSTUP_TOOLCHAIN" | "RUSTC_WRAPPER" | "RUSTFLAGS");
        if outer {
            c.env_remove(&*k);
        }
    }
    c
}
