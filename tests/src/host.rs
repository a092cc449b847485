//! What the harness needs from the host, checked up front so a test fails
//! with a sentence instead of an `EPERM` deep inside setup.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Fails unless we are root, `ip` runs and a cgroup2 hierarchy is mounted.
/// Returns the cgroup2 mount point.
pub(crate) fn preflight() -> Result<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "mesh-e2e needs root (network namespaces, veth, cgroup v2, eBPF); \
             run the tests as root, e.g. `sudo -E cargo test -p mesh-e2e`"
        );
    }
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match ip {
        Ok(s) if s.success() => {}
        Ok(s) => bail!("`ip -V` failed ({s}): is iproute2 installed and working?"),
        Err(e) => bail!("cannot run `ip` ({e}): install iproute2 (`apt-get install iproute2`)"),
    }
    cgroup2_mount()
}

/// Where the cgroup v2 hierarchy is mounted, read from `/proc/mounts`:
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    parse_cgroup2_mount(&mounts).context(
        "no cgroup2 filesystem in /proc/mounts: mount one \
         (`mount -t cgroup2 none /sys/fs/cgroup/unified`) before running mesh-e2e",
    )
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `mesh-agent` binary: `$MESH_AGENT_BIN`, else next to the running
/// executable (`target/debug/` for `demo`) or one level up (`target/debug/`
/// seen from a test binary in `target/debug/deps/`).
pub fn agent_bin() -> Result<PathBuf> {
    find_bin(
        "mesh-agent",
        "MESH_AGENT_BIN",
        "run `cargo build -p mesh-agent` first",
    )
}

/// The `meshtest` tool binary, found like [`agent_bin`] (`$MESHTEST_BIN`).
/// Integration tests of this crate can use `env!("CARGO_BIN_EXE_meshtest")`.
pub fn meshtest_bin() -> Result<PathBuf> {
    find_bin(
        "meshtest",
        "MESHTEST_BIN",
        "run `cargo build -p mesh-e2e --bin meshtest` first",
    )
}

pub fn meshhttp_bin() -> Result<PathBuf> {
    find_bin(
        "meshhttp",
        "MESHHTTP_BIN",
        "run `cargo build -p mesh-e2e --bin meshhttp` first",
    )
}

/// The Gateway API conformance echo app and its client (`$MESHECHO_BIN`).
pub fn meshecho_bin() -> Result<PathBuf> {
    find_bin(
        "meshecho",
        "MESHECHO_BIN",
        "run `cargo build -p mesh-e2e --bin meshecho` first",
    )
}

/// The `meshotlp` OTLP receiver, found like [`agent_bin`] (`$MESHOTLP_BIN`).
pub fn meshotlp_bin() -> Result<PathBuf> {
    find_bin(
        "meshotlp",
        "MESHOTLP_BIN",
        "run `cargo build -p mesh-e2e --bin meshotlp` first",
    )
}

fn find_bin(name: &str, env: &str, hint: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("${env} is set to {} but no such file exists", p.display());
    }
    let exe = std::env::current_exe().context("finding the current executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates: Vec<PathBuf> = [Some(dir.join(name)), dir.parent().map(|d| d.join(name))]
        .into_iter()
        .flatten()
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<OsString> = candidates
        .iter()
        .map(|p| p.clone().into_os_string())
        .collect();
    bail!("cannot find the `{name}` binary (looked at {looked:?}; set ${env} to override): {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid).unwrap(),
            Path::new("/sys/fs/cgroup/unified")
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(unified).unwrap(),
            Path::new("/sys/fs/cgroup")
        );
        assert!(parse_cgroup2_mount("proc /proc proc rw 0 0\n").is_none());
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
    }
}
