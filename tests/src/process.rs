//! Pieces shared by pod processes and agents: an output pipe drained by a
//! thread into a buffer that can be waited on, and waiting with a deadline.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Everything a child wrote to one pipe so far.
#[derive(Default)]
pub(crate) struct Captured {
    inner: Mutex<CapturedInner>,
    changed: Condvar,
}

#[derive(Default)]
struct CapturedInner {
    bytes: Vec<u8>,
    eof: bool,
}

impl Captured {
    /// Drains `pipe` on a thread until EOF.
    pub(crate) fn drain(pipe: impl Read + Send + 'static) -> (Arc<Captured>, JoinHandle<()>) {
        let cap = Arc::new(Captured::default());
        let c = cap.clone();
        let handle = std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c.inner.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
                        c.changed.notify_all();
                    }
                }
            }
            c.inner.lock().unwrap().eof = true;
            c.changed.notify_all();
        });
        (cap, handle)
    }

    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.inner.lock().unwrap().bytes.clone()
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Complete lines (and the trailing partial one once the pipe is closed).
    pub(crate) fn lines(&self) -> Vec<String> {
        let g = self.inner.lock().unwrap();
        split_lines(&g.bytes, g.eof)
    }

    /// Waits until the pipe is closed or `timeout` passes; true if closed.
    pub(crate) fn wait_eof(&self, timeout: Duration) -> bool {
        let g = self.inner.lock().unwrap();
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |g| !g.eof)
            .unwrap();
        g.eof
    }

    /// Waits for a line matching `pred`. Fails at the deadline, or as soon
    /// as the pipe closes without one.
    pub(crate) fn wait_line(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.inner.lock().unwrap();
        loop {
            if let Some(l) = split_lines(&g.bytes, g.eof).into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if g.eof {
                bail!("output closed before {what}");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("no {what} within {timeout:?}");
            }
            g = self.changed.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

fn split_lines(bytes: &[u8], eof: bool) -> Vec<String> {
    let mut parts: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // The last piece is a partial line (or empty after a final newline).
    let last = parts.pop().unwrap_or_default();
    let mut lines: Vec<String> = parts
        .into_iter()
        .map(|l| {
            String::from_utf8_lossy(l)
                .trim_end_matches('\r')
                .to_string()
        })
        .collect();
    if eof && !last.is_empty() {
        lines.push(String::from_utf8_lossy(last).into_owned());
    }
    lines
}

/// Polls `child` until it exits or `timeout` passes (then `Ok(None)`).
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// For `pre_exec`: an empty signal mask in the child. std leaves the
/// parent thread's mask in place across exec, and a program that blocks
/// SIGTERM/SIGINT to `sigwait` for them (the demo does) would otherwise hand
/// its children signals they can never receive. Async-signal-safe.
pub(crate) fn unblock_all_signals() -> std::io::Result<()> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes `set`; pthread_sigmask reads it.
    let rc = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Spawns a long-running helper (agent, CA) with a clean signal mask, in
/// `cgroup` if given, and with `PR_SET_PDEATHSIG(SIGKILL)`: if the test
/// process dies, the kernel kills it. The signal follows the *thread* that
/// spawns, so spawn from the thread that runs the test.
pub(crate) fn spawn_supervised(cmd: &mut Command, cgroup: Option<&Path>) -> Result<Child> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let procs = cgroup
        .map(|c| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", c.display()))
        })
        .transpose()?;
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    let parent = std::process::id() as libc::pid_t;
    let die_with_parent = move || {
        unblock_all_signals()?;
        if let Some(fd) = procs_fd {
            // SAFETY: plain syscall on a descriptor opened before fork;
            // "0" moves the writing process.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: plain syscalls.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died before prctl took effect.
        // SAFETY: plain syscall.
        if unsafe { libc::getppid() } != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: only async-signal-safe syscalls, no allocation.
    unsafe { cmd.pre_exec(die_with_parent) };
    let child = cmd.spawn()?;
    drop(procs);
    Ok(child)
}

/// SIGKILL and reap; quiet if the child is already gone.
pub(crate) fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.kill();
    child.wait().ok()
}

/// Sends `sig` unless the child was already reaped (its PID may be reused).
pub(crate) fn signal(child: &mut Child, sig: nix::sys::signal::Signal) -> Result<()> {
    if child.try_wait().context("checking child")?.is_some() {
        return Ok(());
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, sig).with_context(|| format!("sending {sig} to pid {pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_partial_tail_only_at_eof() {
        assert_eq!(split_lines(b"a\nb\r\nc", false), vec!["a", "b"]);
        assert_eq!(split_lines(b"a\nb\r\nc", true), vec!["a", "b", "c"]);
        assert_eq!(split_lines(b"a\n", true), vec!["a"]);
    }
}
