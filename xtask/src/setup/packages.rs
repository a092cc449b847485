//! Debian packages the build and the tests use.

use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::Outcome;
use crate::cmd;

/// - iproute2: `ip netns`, veth and bridges for the test pods
/// - curl, netcat-openbsd, python3: clients and servers inside the pods
/// - protobuf-compiler: `protoc` for gRPC code generation (OTLP)
/// - tshark: checking on the wire that pod-to-pod bytes are TLS
/// - bpftool: tests that change eBPF state behind the agent's back (drift)
/// - python3-venv: the virtualenv for kubernetes-validate (manifest checks)
const PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "curl",
    "netcat-openbsd",
    "protobuf-compiler",
    "python3",
    "python3-venv",
    "tshark",
];

pub fn ensure() -> Result<Outcome> {
    ensure_these(PACKAGES)
}

/// Installs whichever of `packages` are missing (one `apt-get install`).
pub fn ensure_these(packages: &[&str]) -> Result<Outcome> {
    let missing = packages
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect::<Vec<_>>();
    if missing.is_empty() {
        return Ok(Outcome::Ok(format!("{} installed", packages.len())));
    }
    let hint = "apt-get must run as root and reach the Debian mirrors";
    cmd::run(apt_get().args(["update", "-q"])).context(hint)?;
    cmd::run(apt_get().args(["install", "-y", "-q"]).args(&missing)).context(hint)?;
    Ok(Outcome::Ok(format!("installed {}", missing.join(" "))))
}

fn is_installed(package: &str) -> bool {
    // An unknown package makes dpkg-query fail: that is "not installed" too.
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status == "install ok installed")
}

/// apt-get that never waits for a human: no debconf questions (tshark asks
/// whether non-root users may capture), no stdin, and a wait for the dpkg
/// lock instead of failing when another apt is running.
fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", "DPkg::Lock::Timeout=120"])
        .stdin(Stdio::null());
    cmd
}
