//! [`Pod`]: run processes inside a pod's network namespace and cgroup.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use std::sync::Arc;

use crate::host;
use crate::process::{self, Captured};
use crate::testbed::PodSpec;

/// How long [`Pod::run`] lets a command run before killing it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A pod of a [`crate::Testbed`]. Cheap to clone; the testbed owns the
/// namespace and cgroup, so a `Pod` is only valid while its testbed lives.
#[derive(Clone, Debug)]
pub struct Pod {
    spec: PodSpec,
    netns_name: String,
    cgroup: PathBuf,
}

impl Pod {
    pub(crate) fn new(spec: PodSpec, netns_name: String, cgroup: PathBuf) -> Pod {
        Pod {
            spec,
            netns_name,
            cgroup,
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn namespace(&self) -> &str {
        &self.spec.namespace
    }

    pub fn node(&self) -> &str {
        &self.spec.node
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.spec.ip
    }

    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }

    /// `namespace/name`, as operators write it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.spec.namespace, self.spec.name)
    }

    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// `/run/netns/<testbed>-<pod>`.
    pub fn netns_path(&self) -> PathBuf {
        crate::netns::path(&self.netns_name)
    }

    /// Absolute path of the pod's cgroup v2 directory.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// Spawns `program args` in the pod (netns + cgroup), stdin closed,
    /// stdout and stderr captured. A bare `meshtest` (`meshhttp`, `meshecho`) is
    /// resolved with [`crate::meshtest_bin`] ([`crate::meshhttp_bin`], [`crate::meshecho_bin`]). The process is killed when the handle drops.
    pub fn spawn<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<PodProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let mut cmd = if program == "meshtest" {
            Command::new(host::meshtest_bin()?)
        } else if program == "meshhttp" {
            Command::new(host::meshhttp_bin()?)
        } else if program == "meshecho" {
            Command::new(host::meshecho_bin()?)
        } else {
            Command::new(program)
        };
        cmd.args(args);
        self.spawn_command(cmd)
    }

    /// Like [`Pod::spawn`] for a prepared command (env, cwd...). Its stdio
    /// settings are replaced.
    pub fn spawn_command(&self, mut cmd: Command) -> Result<PodProcess> {
        let what = format!("{:?} in pod {}", cmd, self.id());
        // Opened before fork: after fork only async-signal-safe syscalls are
        // allowed, so the child gets raw fds and does setns + write.
        let netns = File::open(self.netns_path())
            .with_context(|| format!("opening {}", self.netns_path().display()))?;
        let procs_path = self.cgroup.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("opening {}", procs_path.display()))?;
        let (ns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
        let enter_pod = move || {
            process::unblock_all_signals()?;
            // SAFETY: plain syscalls on fds that are open (see below).
            if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" means "the writing process" to cgroup.procs.
            // SAFETY: as above; the buffer is a static literal.
            if unsafe { libc::write(procs_fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: `enter_pod` only makes async-signal-safe syscalls and does
        // not allocate; both fds stay open until `spawn` has returned.
        unsafe { cmd.pre_exec(enter_pod) };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        drop((netns, procs));
        let (stdout, out_thread) = Captured::drain(child.stdout.take().expect("piped"));
        let (stderr, err_thread) = Captured::drain(child.stderr.take().expect("piped"));
        Ok(PodProcess {
            child,
            what,
            stdout,
            stderr,
            _readers: vec![out_thread, err_thread],
        })
    }

    /// Runs to completion (killed after [`RUN_TIMEOUT`], which is an error).
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn(program, args)?.wait_output(RUN_TIMEOUT)
    }

    /// `meshtest echo --listen 0.0.0.0:PORT`, returned once it listens.
    pub fn start_echo(&self, port: u16) -> Result<PodProcess> {
        let listen = format!("0.0.0.0:{port}");
        let p = self.spawn("meshtest", ["echo", "--listen", &listen])?;
        p.wait_for_stdout(Duration::from_secs(10), |l| l.contains("\"listening\""))
            .with_context(|| format!("echo server in pod {}: {}", self.id(), p.stderr()))?;
        Ok(p)
    }
}

/// A process running in a pod. Killed (SIGKILL) and reaped on drop.
pub struct PodProcess {
    child: Child,
    what: String,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    // Detached on drop; they end when the pipes close.
    _readers: Vec<JoinHandle<()>>,
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lines()
    }

    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits for a stdout line matching `pred`; fails at the deadline or if
    /// the process closes stdout first.
    pub fn wait_for_stdout(
        &self,
        timeout: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        self.stdout.wait_line(
            timeout,
            &format!("matching stdout line from {}", self.what),
            pred,
        )
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for exit; `Ok(None)` if still running after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        process::wait_timeout(&mut self.child, timeout)
    }

    /// SIGTERM (no-op if it already exited).
    pub fn terminate(&mut self) -> Result<()> {
        process::signal(&mut self.child, nix::sys::signal::Signal::SIGTERM)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        process::kill_and_reap(&mut self.child)
    }

    /// Waits for exit and all output. Past `timeout` the process is killed
    /// and this fails, with whatever it printed.
    pub fn wait_output(mut self, timeout: Duration) -> Result<Output> {
        let status = match self.wait_timeout(timeout)? {
            Some(s) => s,
            None => {
                self.kill();
                bail!(
                    "{} still running after {timeout:?}, killed; stdout: {} stderr: {}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
        };
        // A grandchild could hold the pipes open: wait for EOF only briefly.
        self.stdout.wait_eof(Duration::from_secs(2));
        self.stderr.wait_eof(Duration::from_secs(2));
        Ok(Output {
            status,
            stdout: self.stdout.bytes(),
            stderr: self.stderr.bytes(),
        })
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
