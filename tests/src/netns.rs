//! Network plumbing through `ip` (iproute2).
//!
//! Shelling out is deliberate here: this is test infrastructure, `ip` is the
//! tool an operator would use to inspect what a test built, and it keeps a
//! netlink client out of the harness. Every command is scoped with `-n NETNS`
//! to a namespace the testbed created; nothing here runs against the host's
//! own interfaces.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

pub(crate) const NETNS_DIR: &str = "/run/netns";
/// The bridge in every testbed's fabric netns.
pub(crate) const BRIDGE: &str = "br0";

/// `ip netns add` makes `/run/netns` a shared bind mount the first time it
/// runs; two first calls racing each other stack two mounts. Serialize
/// within the process (tests run on parallel threads).
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running `ip {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub(crate) fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

pub(crate) fn add(name: &str) -> Result<()> {
    let _guard = NETNS_ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "add", name])
}

pub(crate) fn del(name: &str) -> Result<()> {
    if !path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

pub(crate) fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A bridge named `br0` inside `fabric`, up, no address: it only switches.
pub(crate) fn add_bridge(fabric: &str) -> Result<()> {
    ip(&["-n", fabric, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", fabric, "link", "set", BRIDGE, "up"])
}

/// A veth pair: `eth0` with `addr/24` in `pod_ns`, `peer` enslaved to the
/// fabric's bridge. Only the connected /24 route exists in the pod.
pub(crate) fn plug_pod(fabric: &str, peer: &str, pod_ns: &str, addr: &str) -> Result<()> {
    ip(&[
        "-n", fabric, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", pod_ns,
    ])?;
    ip(&["-n", fabric, "link", "set", peer, "master", BRIDGE])?;
    ip(&["-n", fabric, "link", "set", peer, "up"])?;
    ip(&["-n", pod_ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        pod_ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", pod_ns, "link", "set", "eth0", "up"])
}
