//! What `cargo xtask bench` (and its smoke test in `cargo xtask test`) needs
//! beyond the build and the tests: the peer proxy and the load generators.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use super::{Outcome, packages};
use crate::cmd;

/// - haproxy: the peer the agents are compared with
/// - wrk: saturation (max requests/s)
/// - curl: the bulk stream (already a test package)
/// - libssl-dev, pkg-config: oha's TLS (native-tls) builds against OpenSSL;
///   its rustls flavour would need cmake for aws-lc
const PACKAGES: &[&str] = &["haproxy", "wrk", "curl", "libssl-dev", "pkg-config"];

/// oha (crates.io): fixed-rate load with latency percentiles, JSON output.
/// Pinned so that every machine measures with the same generator.
const OHA_VERSION: &str = "1.16.0";

pub fn packages() -> Result<Outcome> {
    packages::ensure_these(PACKAGES)
}

pub fn oha() -> Result<Outcome> {
    if let Some(version) = oha_version()
        && version == OHA_VERSION
    {
        return Ok(Outcome::Ok(format!("oha {version}")));
    }
    cmd::run(
        crate::workspace::cargo()
            .args(["install", "oha", "--locked", "--version", OHA_VERSION])
            .args(["--no-default-features", "--features", "native-tls"]),
    )
    .context("installing oha from crates.io (a few minutes on two cores)")?;
    let version = oha_version().context("oha was installed but does not run")?;
    Ok(Outcome::Ok(format!("installed oha {version}")))
}

/// `oha --version` -> `1.16.0`, from PATH or cargo's bin directory.
fn oha_version() -> Option<String> {
    let out = cmd::output(Command::new("oha").arg("--version").env("PATH", path_with_cargo_bin())).ok()?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

/// `$PATH` with cargo's bin directory (`$CARGO_HOME/bin`, `~/.cargo/bin`) in
/// front: where `cargo install` puts oha, even when a non-login shell's
/// PATH lacks it. For the bench and the tests' children.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    let Some(cargo_bin) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"))
    else {
        return rest;
    };
    if std::env::split_paths(&rest).any(|d| d == cargo_bin) {
        return rest;
    }
    let dirs = std::iter::once(cargo_bin).chain(std::env::split_paths(&rest));
    std::env::join_paths(dirs).unwrap_or(rest)
}
