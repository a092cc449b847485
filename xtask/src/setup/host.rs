//! Checks on the host the tests run on, and the bpffs mount.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Outcome;
use crate::cmd;

const MIN_KERNEL: (u32, u32) = (5, 10);
const BPFFS: &str = "/sys/fs/bpf";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn kernel() -> Result<Outcome> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let version = parse_kernel_version(release)
        .with_context(|| format!("cannot read a version from kernel release `{release}`"))?;
    if version < MIN_KERNEL {
        bail!(
            "kernel {release} is older than {}.{}: the eBPF hooks (sk_lookup, cgroup sock_addr, \
             sockhash sk_msg) need a newer kernel; use a machine with Linux >= {0}.{1}",
            MIN_KERNEL.0,
            MIN_KERNEL.1,
        );
    }
    Ok(Outcome::Ok(release.to_owned()))
}

pub fn root() -> Result<Outcome> {
    Ok(if is_root() {
        Outcome::Ok("running as root".to_owned())
    } else {
        Outcome::Warn(
            "not running as root: setup can check but not install or mount, \
             and the end-to-end tests need root"
                .to_owned(),
        )
    })
}

pub fn cgroup2() -> Result<Outcome> {
    let mounts = read_mounts()?;
    match mount_of_type(&mounts, "cgroup2") {
        Some(path) => Ok(Outcome::Ok(format!("mounted at {path}"))),
        None => bail!(
            "no cgroup2 filesystem in /proc/mounts: pods are cgroup v2 groups; \
             mount one (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)"
        ),
    }
}

/// Pinning maps and links needs bpffs; these machines do not mount it by
/// default. Only pinning needs it, so failing here is a warning.
pub fn bpffs() -> Result<Outcome> {
    let mounts = read_mounts()?;
    if is_bpffs(&mounts) {
        return Ok(Outcome::Ok(format!("mounted at {BPFFS}")));
    }
    let mounted = cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]));
    Ok(match mounted {
        Ok(()) => Outcome::Ok(format!("mounted it at {BPFFS}")),
        Err(err) => Outcome::Warn(format!(
            "could not mount bpffs at {BPFFS} ({err:#}); pinning will fail until \
             `mount -t bpf bpf {BPFFS}` works"
        )),
    })
}

fn read_mounts() -> Result<String> {
    std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")
}

/// Mount point of the first filesystem of type `fstype`.
fn mount_of_type<'a>(mounts: &'a str, fstype: &str) -> Option<&'a str> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then_some(target)
    })
}

fn is_bpffs(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let fields: Vec<_> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, target, "bpf", ..] if Path::new(target) == Path::new(BPFFS))
    })
}

/// `6.18.44-fc-v669` -> (6, 18).
fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn finds_cgroup2_in_a_hybrid_hierarchy() {
        assert_eq!(
            mount_of_type(MOUNTS, "cgroup2"),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(mount_of_type(MOUNTS, "bpf"), None);
    }

    #[test]
    fn bpffs_must_be_at_sys_fs_bpf() {
        assert!(!is_bpffs(MOUNTS));
        assert!(is_bpffs(&format!(
            "{MOUNTS}bpf /sys/fs/bpf bpf rw,relatime 0 0\n"
        )));
        assert!(!is_bpffs("bpf /run/bpf bpf rw 0 0\n"));
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_kernel_version("5.10"), Some((5, 10)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!(parse_kernel_version("5.4.0").unwrap() < MIN_KERNEL);
        assert!(parse_kernel_version("5.15.0").unwrap() >= MIN_KERNEL);
    }
}
