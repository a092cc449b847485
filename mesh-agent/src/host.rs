//! Facts about the node the agent discovers rather than assumes.

use std::path::{Path, PathBuf};

/// Capabilities `mesh-agent run` needs (bit, name, what for).
const NEEDED_CAPS: [(u32, &str, &str); 3] = [
    (39, "CAP_BPF", "load eBPF programs and maps"),
    (12, "CAP_NET_ADMIN", "attach cgroup and sk_lookup programs"),
    (21, "CAP_SYS_ADMIN", "enter pods' network namespaces"),
];

/// The capabilities of [`NEEDED_CAPS`] this process lacks (none for root
/// with a full set), from `/proc/self/status` `CapEff`.
pub fn missing_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    NEEDED_CAPS.iter().filter(|(bit, _, _)| eff & (1 << bit) == 0).map(|(_, name, _)| *name).collect()
}

/// Says which privilege is missing, before anything fails with a bare EPERM.
pub fn check_privileges() -> Result<(), Error> {
    let missing = missing_capabilities();
    if missing.is_empty() {
        return Ok(());
    }
    let why: Vec<String> = NEEDED_CAPS
        .iter()
        .filter(|(_, n, _)| missing.contains(n))
        .map(|(_, n, what)| format!("{n} ({what})"))
        .collect();
    Err(Error::Privileges(why.join(", ")))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no cgroup v2 hierarchy is mounted (no `cgroup2` entry in /proc/mounts)")]
    NoCgroup2,
    #[error("this process has no cgroup v2 membership (no `0::` line in /proc/self/cgroup)")]
    NoMembership,
    #[error("the agent must run as root or with the capabilities it lacks: {0}")]
    Privileges(String),
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let text = read("/proc/mounts")?;
    parse_cgroup2_mount(&text).ok_or(Error::NoCgroup2)
}

pub(crate) fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// This process's cgroup v2 directory, and whether it is the root.
pub fn own_cgroup() -> Result<(PathBuf, bool), Error> {
    let mount = cgroup2_mount()?;
    let rel = parse_membership(&read("/proc/self/cgroup")?).ok_or(Error::NoMembership)?;
    let is_root = rel == "/";
    Ok((mount.join(rel.trim_start_matches('/')), is_root))
}

pub(crate) fn parse_membership(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

fn read(path: &str) -> Result<String, Error> {
    std::fs::read_to_string(Path::new(path)).map_err(|source| Error::Read { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(parse_cgroup2_mount(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn membership_is_the_v2_line() {
        let hybrid = "12:pids:/user.slice\n1:name=systemd:/user.slice\n0::/kubepods/pod1/abc\n";
        assert_eq!(parse_membership(hybrid).as_deref(), Some("/kubepods/pod1/abc"));
        assert_eq!(parse_membership("0::/\n").as_deref(), Some("/"));
    }
}
