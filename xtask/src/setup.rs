//! `cargo xtask setup`: makes this machine able to build and test the mesh.
//!
//! Every step checks before it acts, so a second run only looks and takes well
//! under a second. Each step prints one line; a step that cannot do its job
//! stops setup with an error naming the step and what to do about it.

mod bench;
mod host;
mod packages;
pub mod python;
mod toolchain;

use anyhow::{Context, Result};

pub use bench::path_with_cargo_bin;
pub use host::is_root;

/// What a step found or did, for its one line of output.
enum Outcome {
    Ok(String),
    /// Setup carries on, but something later (tests, pinning) will need this fixed.
    Warn(String),
}

pub fn run() -> Result<()> {
    // Host checks first: they are instant, and an unfit kernel should stop us
    // before a minute of compiling.
    step("kernel", host::kernel)?;
    step("root", host::root)?;
    step("cgroup v2", host::cgroup2)?;
    step("debian packages", packages::ensure)?;
    let nightly = step_with("nightly toolchain", toolchain::nightly)?;
    step("bpf-linker", || toolchain::bpf_linker(&nightly))?;
    step("cargo-fuzz", toolchain::cargo_fuzz)?;
    step("bpffs", host::bpffs)?;
    step("python tools", python::ensure)?;
    Ok(())
}

/// Only what building the agent needs: the Debian build packages, the
/// nightly with `rust-src` and bpf-linker. `cargo xtask setup --build-only`
/// (deploy/Dockerfile's build stage: no host checks, no test tools).
pub fn build() -> Result<()> {
    step("debian packages (build)", || packages::ensure_these(packages::BUILD))?;
    let nightly = step_with("nightly toolchain", toolchain::nightly)?;
    step("bpf-linker", || toolchain::bpf_linker(&nightly))
}

/// What `cargo xtask image` writes the image with (umoci, skopeo).
pub fn image_tools() -> Result<()> {
    step("debian packages (image)", || packages::ensure_these(packages::IMAGE))
}

/// cargo-fuzz alone (`cargo xtask fuzz` on a machine set up before it).
pub fn cargo_fuzz() -> Result<()> {
    step("cargo-fuzz", toolchain::cargo_fuzz)
}

/// The bench-only step: the peer proxy and the load generators (`cargo
/// xtask bench`, and `cargo xtask test` for the bench's smoke test).
pub fn bench_tools() -> Result<()> {
    step("bench packages", bench::packages)?;
    step("oha", bench::oha)?;
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<Outcome>) -> Result<()> {
    step_with(name, || f().map(|outcome| (outcome, ())))
}

/// A step that also hands a value to later steps.
fn step_with<T>(name: &str, f: impl FnOnce() -> Result<(Outcome, T)>) -> Result<T> {
    let (outcome, value) = f().with_context(|| format!("setup step `{name}` failed"))?;
    match outcome {
        Outcome::Ok(detail) => eprintln!("setup: {name}: ok ({detail})"),
        Outcome::Warn(detail) => eprintln!("setup: {name}: WARNING: {detail}"),
    }
    Ok(value)
}
