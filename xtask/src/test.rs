//! `cargo xtask test`: the whole suite, as CI runs it.

use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::{cmd, fuzz, image, manifests, setup, workspace};

#[derive(clap::Args)]
pub struct Args {
    /// Also run clippy (host crates, then the eBPF crate) with warnings denied.
    #[arg(long)]
    lint: bool,
    /// Seconds each fuzz target runs as the last step (0: no fuzzing).
    #[arg(long, default_value_t = 15)]
    fuzz_seconds: u64,
    /// Passed to `cargo test` (after `--`); a second `--` reaches the test binaries.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    // The end-to-end tests create network namespaces, cgroups and eBPF links;
    // without root they could only skip, and a skipped suite must not pass.
    if !setup::is_root() {
        bail!(
            "`cargo xtask test` must run as root: the end-to-end tests create network \
             namespaces and cgroups and load eBPF programs (try `sudo -E cargo xtask test`)"
        );
    }
    let mut progress = Progress::new();
    progress.step("setup", setup::run)?;
    // The bench's smoke test (tests/tests/bench.rs) runs HAProxy and the
    // load generators.
    progress.step("bench tools", setup::bench_tools)?;
    progress.step("manifests", manifests::run)?;
    progress.step("build", workspace::build_bins)?;
    // The release agent's OCI image, which tests/tests/image.rs runs with
    // podman as the DaemonSet would.
    progress.step("image", || image::build(true))?;
    let agent = workspace::debug_bin("mesh-agent")?;
    let archive = image::archive()?;
    progress.step("tests", || {
        cmd::run(
            workspace::cargo_host("test")
                .args(&args.cargo_test_args)
                .env(workspace::MESH_AGENT_BIN, &agent)
                .env(image::MESH_AGENT_IMAGE, &archive)
                .env("PATH", setup::path_with_cargo_bin()),
        )
    })?;
    if args.lint {
        progress.step("clippy", || {
            cmd::run(workspace::cargo_host("clippy").args([
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
        progress.step("clippy (eBPF)", clippy_ebpf)?;
    }
    // Every fuzz target, briefly: a regression in a parser at the edge
    // shows here even when no unit test covers the input.
    if args.fuzz_seconds > 0 {
        progress.step("fuzz", || fuzz::fuzz(&fuzz::TARGETS, args.fuzz_seconds))?;
    }
    eprintln!(
        "xtask test: ok: {} in {}",
        progress.passed.join(", "),
        progress.elapsed()
    );
    Ok(())
}

/// The eBPF crate is linted on its own, for its real target: linted with the
/// host crates it would be built for the host, and feature unification would
/// give it two panic handlers.
fn clippy_ebpf() -> Result<()> {
    cmd::run(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--package",
                "mesh-ebpf",
            ])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"])
            .current_dir(workspace::root()),
    )
}

/// Names the steps that passed, so the last line says how far a run got.
struct Progress {
    started: Instant,
    passed: Vec<&'static str>,
}

impl Progress {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            passed: Vec::new(),
        }
    }

    fn step(&mut self, name: &'static str, step: impl FnOnce() -> Result<()>) -> Result<()> {
        let started = Instant::now();
        match step() {
            Ok(()) => {
                eprintln!("xtask test: {name}: ok in {:.1}s", started.elapsed().as_secs_f64());
                self.passed.push(name);
                Ok(())
            }
            Err(err) => {
                let passed = match self.passed.as_slice() {
                    [] => "nothing".to_owned(),
                    passed => passed.join(", "),
                };
                Err(err.context(format!(
                    "xtask test: FAILED at {name} after {} (passed: {passed})",
                    self.elapsed()
                )))
            }
        }
    }

    fn elapsed(&self) -> String {
        format!("{:.1}s", self.started.elapsed().as_secs_f64())
    }
}
