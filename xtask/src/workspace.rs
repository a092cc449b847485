//! The workspace xtask drives: where it is, which cargo to call, what the
//! host builds, and where the binaries land.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd;

/// Tells the end-to-end tests and the demo which agent binary to start.
pub const MESH_AGENT_BIN: &str = "MESH_AGENT_BIN";

/// What the host toolchain builds, tests and lints: every member except the
/// eBPF crate. That one only builds for `bpfel-unknown-none` with the nightly
/// (mesh-agent's build.rs builds it), and in a host build its panic handler
/// would clash with std's.
const HOST_PACKAGES: [&str; 3] = ["--workspace", "--exclude", "mesh-ebpf"];

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// The cargo that runs xtask (`$CARGO`), so nested builds use the same
/// toolchain, started in the workspace root whatever the caller's directory.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// `cargo <subcommand>` over the host packages.
pub fn cargo_host(subcommand: &str) -> Command {
    let mut cmd = cargo();
    cmd.arg(subcommand).args(HOST_PACKAGES);
    cmd
}

pub fn build_bins() -> Result<()> {
    cmd::run(cargo_host("build").arg("--bins"))
}

/// Path of a binary from the last `build_bins`.
pub fn debug_bin(name: &str) -> Result<PathBuf> {
    Ok(target_dir()?.join("debug").join(name))
}

/// Asks cargo rather than assuming `target/`, so `CARGO_TARGET_DIR` and
/// `build.target-dir` are honoured.
pub fn target_dir() -> Result<PathBuf> {
    let metadata = cmd::output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("`cargo metadata` printed invalid JSON")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` has no `target_directory`")?;
    Ok(PathBuf::from(dir))
}
