//! cgroup v2 directories for pods: create, kill everything inside, remove.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub(crate) fn create(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// PIDs directly in this cgroup.
pub(crate) fn procs(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn children(path: &Path) -> Vec<PathBuf> {
    fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL every process in the subtree: `cgroup.kill` (Linux 5.14+) does it
/// atomically, so forks racing the kill are caught; older kernels fall back
/// to signalling the listed PIDs.
pub(crate) fn kill_all(path: &Path) {
    if !path.exists() {
        return;
    }
    if fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for child in children(path) {
        kill_all(&child);
    }
    for pid in procs(path) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills the subtree and removes it, leaves first. rmdir fails with EBUSY
/// until killed processes have actually exited, so retry until `timeout`.
pub(crate) fn remove_tree(path: &Path, timeout: Duration) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    kill_all(path);
    let deadline = Instant::now() + timeout;
    remove_rec(path, deadline)
}

fn remove_rec(path: &Path, deadline: Instant) -> Result<()> {
    for child in children(path) {
        remove_rec(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                kill_all(path);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!(
                "cannot remove cgroup {} ({e}); processes still in it: {:?}",
                path.display(),
                procs(path)
            ),
        }
    }
}
