//! Debian packages the build, the image and the tests use.

use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::Outcome;
use crate::cmd;

/// What building the agent needs: `protoc` for gRPC code generation (the
/// CA's service, OTLP). `deploy/Dockerfile`'s build stage installs only these.
pub const BUILD: &[&str] = &["protobuf-compiler"];

/// `cargo xtask image`: umoci writes the OCI image from the root filesystem
/// it assembles itself (no base image, no registry), skopeo the archive.
pub const IMAGE: &[&str] = &["skopeo", "umoci"];

/// What the tests run:
/// - iproute2: `ip netns`, veth and bridges for the test pods
/// - curl, netcat-openbsd, python3: clients and servers inside the pods
/// - tshark: checking on the wire that pod-to-pod bytes are TLS
/// - bpftool: tests that change eBPF state behind the agent's back (drift)
/// - python3-venv: the virtualenv for kubernetes-validate (manifest checks)
/// - podman, runc: `tests/tests/image.rs` runs the image as the DaemonSet
///   would (runc, because crun refuses hosts with a hybrid cgroup
///   hierarchy whose v2 part has controllers, as these machines have)
const TEST: &[&str] = &[
    "bpftool",
    "iproute2",
    "curl",
    "netcat-openbsd",
    "podman",
    "python3",
    "python3-venv",
    "runc",
    "tshark",
];

/// Everything: one `apt-get install` on a fresh machine.
pub fn ensure() -> Result<Outcome> {
    let all: Vec<&str> = [BUILD, IMAGE, TEST].concat();
    ensure_these(&all)
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
