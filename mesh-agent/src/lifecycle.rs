//! The agent's life on a node beyond one process: the node lock that says
//! which agent owns the node's pinned state, and `mesh-agent uninstall`.
//!
//! `<run-dir>/<node>/` (default `/run/nodemesh/<node>/`, mode 0700) holds
//! `agent.lock`, locked (`flock`) by the agent that serves the node, with its
//! pid inside for messages.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, Write},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::ebpf::{PinDir, PinError};

pub mod handoff;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot use the run directory {path}: {source}")]
    RunDir { path: PathBuf, source: io::Error },
    #[error(
        "an agent for node {node} is running (pid {pid}, holding {path}): stop it first \
         (in a cluster: delete the DaemonSet, or its pod on this node)"
    )]
    Running { node: String, pid: String, path: PathBuf },
    #[error(
        "an agent for node {node} is running (pid {pid}) and did not hand over within {waited:?} \
         (its handoff socket {path}): it keeps serving the node"
    )]
    NoHandoff { node: String, pid: String, path: PathBuf, waited: std::time::Duration },
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error("removing the pinned state in {path} failed: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// The node's run directory.
pub fn node_dir(run_dir: &Path, node: &str) -> PathBuf {
    run_dir.join(node)
}

/// Held while this process owns the node; released on drop (or exit).
#[derive(Debug)]
pub struct NodeLock {
    file: File,
    path: PathBuf,
}

impl NodeLock {
    /// Takes the node's lock if no other agent holds it: `Ok(None)` when one does.
    pub fn try_acquire(run_dir: &Path, node: &str) -> Result<Option<NodeLock>, Error> {
        let dir = node_dir(run_dir, node);
        let dir_err = |source| Error::RunDir { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(dir_err)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(dir_err)?;
        let path = dir.join("agent.lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| Error::RunDir { path: path.clone(), source })?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(Error::RunDir { path, source: e });
        }
        let mut lock = NodeLock { file, path };
        lock.write_pid().map_err(|source| Error::RunDir { path: lock.path.clone(), source })?;
        Ok(Some(lock))
    }

    /// Waits up to `timeout` for the lock (the previous agent releases it
    /// when it hands over).
    pub fn acquire(run_dir: &Path, node: &str, timeout: Duration) -> Result<Option<NodeLock>, Error> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(l) = Self::try_acquire(run_dir, node)? {
                return Ok(Some(l));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn write_pid(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        write!(self.file, "{}", std::process::id())?;
        self.file.flush()
    }

    /// The pid written by the agent holding the lock, for messages.
    pub fn holder(run_dir: &Path, node: &str) -> String {
        let mut s = String::new();
        let _ = File::open(node_dir(run_dir, node).join("agent.lock")).and_then(|mut f| f.read_to_string(&mut s));
        let s = s.trim();
        if s.is_empty() { "unknown".into() } else { s.to_owned() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What `mesh-agent uninstall` did.
#[derive(Debug)]
pub struct Uninstalled {
    pub pin_dir: PathBuf,
    pub targets: usize,
    pub existed: bool,
}

/// Removes everything an agent pinned for `node`: every pod's programs are
/// detached and its connections go direct again. Refused while an agent
/// runs for the node (it would put them back).
pub fn uninstall(bpffs: &Path, run_dir: &Path, node: &str) -> Result<Uninstalled, Error> {
    let Some(_lock) = NodeLock::try_acquire(run_dir, node)? else {
        return Err(Error::Running {
            node: node.to_owned(),
            pid: NodeLock::holder(run_dir, node),
            path: node_dir(run_dir, node).join("agent.lock"),
        });
    };
    let pins = PinDir::new(bpffs, node, false)?;
    if !pins.exists() {
        return Ok(Uninstalled { pin_dir: pins.root().to_owned(), targets: 0, existed: false });
    }
    let targets = pins.remove_all().map_err(|source| Error::Remove { path: pins.root().to_owned(), source })?;
    Ok(Uninstalled { pin_dir: pins.root().to_owned(), targets, existed: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_agent_holds_a_node_at_a_time() {
        let dir = std::env::temp_dir().join(format!("mesh-lock-{}", std::process::id()));
        let first = NodeLock::try_acquire(&dir, "node-a").unwrap().expect("free");
        assert!(NodeLock::try_acquire(&dir, "node-a").unwrap().is_none(), "held");
        assert!(NodeLock::try_acquire(&dir, "node-b").unwrap().is_some(), "another node is another lock");
        assert_eq!(NodeLock::holder(&dir, "node-a"), std::process::id().to_string());
        let err = uninstall(Path::new("/nonexistent"), &dir, "node-a").unwrap_err();
        assert!(err.to_string().contains("an agent for node node-a is running"), "{err}");
        drop(first);
        assert!(NodeLock::acquire(&dir, "node-a", Duration::from_secs(1)).unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
