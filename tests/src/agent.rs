//! [`Agent`]: one `mesh-agent run` process (a node) in the host netns, and
//! a tiny HTTP/1.1 client for its admin API.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::process::{self, Captured};
use crate::status::{PodStatus, Status};

/// `RUST_LOG` of agents unless the testbed says otherwise: tests read the
/// debug lines (decisions, eBPF events) when they fail.
pub const DEFAULT_LOG_FILTER: &str = "debug";
/// How long an agent may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Agent::stop`] waits after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const RUN_ONCE_TIMEOUT: Duration = Duration::from_secs(60);

static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How the agent process is started, beyond its arguments.
#[derive(Clone, Debug)]
pub struct AgentEnv {
    /// `RUST_LOG`.
    pub log_filter: String,
    /// `RLIMIT_NOFILE` (soft, hard) the agent starts with instead of the
    /// test's own (what a node's container runtime would give it).
    pub nofile: Option<(u64, u64)>,
}

impl Default for AgentEnv {
    fn default() -> Self {
        AgentEnv { log_filter: DEFAULT_LOG_FILTER.into(), nofile: None }
    }
}

/// The child process (an agent or a CA), shared (weakly) with the testbed's
/// cleanup.
pub(crate) struct AgentProc {
    child: Mutex<Child>,
}

impl AgentProc {
    pub(crate) fn new(child: Child) -> AgentProc {
        AgentProc {
            child: Mutex::new(child),
        }
    }

    /// The child, locked (a poisoned lock is taken over).
    pub(crate) fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn kill(&self) -> Option<ExitStatus> {
        process::kill_and_reap(&mut self.child.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A running node agent. Killed (SIGKILL) on drop.
///
/// The agent gets `PR_SET_PDEATHSIG(SIGKILL)`: if the test process dies, the
/// kernel kills it, so no agent (and no eBPF program it attached) outlives
/// its test. The signal follows the *thread* that started the agent, so
/// start agents from the thread that runs the test.
pub struct Agent {
    proc_: Arc<AgentProc>,
    pid: u32,
    node: String,
    admin: SocketAddr,
    log_path: PathBuf,
    stdout: Arc<Captured>,
}

impl Agent {
    /// `BIN run --config CONFIG --node NODE --admin 127.0.0.1:0` with
    /// `RUST_LOG=debug`, stderr to `agent-NODE-N.log` next to the config;
    /// returns once it prints `{"event":"ready","admin":...}` (30 s max).
    pub fn start(bin: &Path, config: &Path, node: &str) -> Result<Agent> {
        let dir = config
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Agent::start_logging_to(bin, config, node, dir)
    }

    pub(crate) fn start_logging_to(
        bin: &Path,
        config: &Path,
        node: &str,
        log_dir: &Path,
    ) -> Result<Agent> {
        Agent::start_in(bin, config, node, log_dir, None, &AgentEnv::default(), &[])
    }

    /// Like [`Agent::start`], in the cgroup `cgroup` (as a DaemonSet pod's
    /// agent is in its own; socket acceleration needs that) and with extra
    /// `run` arguments, as `env` says.
    pub(crate) fn start_in(
        bin: &Path,
        config: &Path,
        node: &str,
        log_dir: &Path,
        cgroup: Option<&Path>,
        env: &AgentEnv,
        extra_args: &[&str],
    ) -> Result<Agent> {
        Agent::start_until(bin, config, node, log_dir, cgroup, env, extra_args, "ready")
    }

    /// Like [`Agent::start_in`], returning once the agent prints `event`
    /// (`admin`: its admin listener serves, before it is ready).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_until(
        bin: &Path,
        config: &Path,
        node: &str,
        log_dir: &Path,
        cgroup: Option<&Path>,
        env: &AgentEnv,
        extra_args: &[&str],
        event: &str,
    ) -> Result<Agent> {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .args(["--node", node, "--admin", "127.0.0.1:0"])
            .args(extra_args)
            .env("RUST_LOG", &env.log_filter);
        if let Some((soft, hard)) = env.nofile {
            let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            // SAFETY: one async-signal-safe syscall on a struct copied in.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        Agent::start_command(cmd, node, log_dir, cgroup, event)
    }

    /// Runs `cmd`, a command whose stdout is an agent's (e.g. `podman run`
    /// of the agent's image), with stderr to `agent-NODE-N.log` in
    /// `log_dir`; returns once it prints `event` (`ready` or `admin`).
    pub fn start_command(mut cmd: Command, node: &str, log_dir: &Path, cgroup: Option<&Path>, event: &str) -> Result<Agent> {
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log_path = log_dir.join(format!("agent-{node}-{n}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("creating agent log {}", log_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        let mut child = process::spawn_supervised(&mut cmd, cgroup)
            .with_context(|| format!("starting {:?} for {node}", cmd.get_program()))?;
        let pid = child.id();
        let (stdout, _reader) = Captured::drain(child.stdout.take().expect("piped"));
        let proc_ = Arc::new(AgentProc::new(child));
        let ready = stdout.wait_line(READY_TIMEOUT, "ready line", |l| parse_event(l, event).is_some());
        let admin = match ready.map(|l| parse_event(&l, event).expect("matched")) {
            Ok(addr) => addr,
            Err(e) => {
                let status = proc_.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "agent for {node} did not become ready: {e:#} (exit: {}); stdout: {:?}; \
                     log {}:\n{}",
                    status.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                    stdout.text(),
                    log_path.display(),
                    tail(&log, 40)
                );
            }
        };
        // The admin API must be on loopback: tests address nothing else.
        ensure!(
            admin.ip().is_loopback(),
            "agent for {node} reported non-loopback admin {admin}"
        );
        Ok(Agent {
            proc_,
            pid,
            node: node.to_string(),
            admin,
            log_path,
            stdout,
        })
    }

    /// Runs the agent binary once with `args` (e.g. an invalid config that
    /// must be rejected), killing it after 60 s.
    pub fn run_once<I, S>(bin: &Path, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin);
        // SAFETY: async-signal-safe syscalls only.
        unsafe { cmd.pre_exec(process::unblock_all_signals) };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        let (out, _) = Captured::drain(child.stdout.take().expect("piped"));
        let (err, _) = Captured::drain(child.stderr.take().expect("piped"));
        let Some(status) = process::wait_timeout(&mut child, RUN_ONCE_TIMEOUT)? else {
            process::kill_and_reap(&mut child);
            bail!(
                "{} still running after {RUN_ONCE_TIMEOUT:?}, killed",
                bin.display()
            );
        };
        out.wait_eof(Duration::from_secs(2));
        err.wait_eof(Duration::from_secs(2));
        Ok(Output {
            status,
            stdout: out.bytes(),
            stderr: err.bytes(),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The admin address from the ready line (always loopback).
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// `GET /status` as JSON.
    pub fn status(&self) -> Result<serde_json::Value> {
        let (code, body) = self.get("/status")?;
        ensure!(
            code == 200,
            "GET /status on {}'s agent: HTTP {code}: {}",
            self.node,
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body)
            .with_context(|| format!("GET /status on {}'s agent: body is not JSON", self.node))
    }

    /// `GET /status`, typed.
    pub fn status_typed(&self) -> Result<Status> {
        Status::from_value(&self.status()?)
    }

    /// This pod's entry in `/status`, if the agent lists it.
    pub fn pod_status(&self, namespace: &str, name: &str) -> Result<Option<PodStatus>> {
        Ok(self.status_typed()?.pod(namespace, name).cloned())
    }

    /// Any admin GET: `(status code, body)`.
    pub fn get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        http_get(self.admin, path, HTTP_TIMEOUT)
            .with_context(|| format!("GET {path} on {}'s agent at {}", self.node, self.admin))
    }

    /// SIGTERM, then wait up to [`STOP_TIMEOUT`]; returns the exit status.
    /// If it does not exit in time it is killed and this fails.
    pub fn stop(&self) -> Result<ExitStatus> {
        self.stop_timeout(STOP_TIMEOUT)
    }

    pub fn stop_timeout(&self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.proc_.child.lock().unwrap_or_else(|e| e.into_inner());
        process::signal(&mut child, nix::sys::signal::Signal::SIGTERM)?;
        match process::wait_timeout(&mut child, timeout)? {
            Some(status) => Ok(status),
            None => {
                process::kill_and_reap(&mut child);
                bail!(
                    "agent for {} still running {timeout:?} after SIGTERM, killed; log tail:\n{}",
                    self.node,
                    tail(&self.log(), 40)
                )
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.proc_.kill().context("reaping the agent")
    }

    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        Ok(self
            .proc_
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait()?)
    }

    /// Everything the agent logged (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Waits for the ready line (an agent started with
    /// [`crate::Testbed::start_agent_unready`]).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.stdout.wait_line(timeout, "ready line", |l| parse_ready(l).is_some()).map(drop)
    }

    /// Whether the agent has printed its ready line.
    pub fn printed_ready(&self) -> bool {
        self.stdout.text().lines().any(|l| parse_ready(l).is_some())
    }

    /// Everything the agent printed on stdout (the ready line, at least).
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    pub(crate) fn proc_weak(&self) -> Weak<AgentProc> {
        Arc::downgrade(&self.proc_)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc_.kill();
    }
}

fn parse_ready(line: &str) -> Option<SocketAddr> {
    parse_event(line, "ready")
}

/// The admin address of `{"event":EVENT,"admin":...}`.
fn parse_event(line: &str, event: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    if v.get("event")?.as_str()? != event {
        return None;
    }
    v.get("admin")?.as_str()?.parse().ok()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Minimal blocking HTTP/1.1 GET (`Connection: close`), enough for the
/// admin API; avoids pulling an HTTP client into the harness.
/// `GET path` on a loopback HTTP/1.1 endpoint (an agent's admin or
/// metrics port): (status, body).
pub fn http_get_once(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    http_get(addr, path, HTTP_TIMEOUT).with_context(|| format!("GET {path} on {addr}"))
}

fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>)> {
    let end = find(buf, b"\r\n\r\n").context("HTTP response without end of headers")?;
    let head = std::str::from_utf8(&buf[..end]).context("HTTP headers are not UTF-8")?;
    let body = &buf[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
    let (mut chunked, mut length) = (false, None);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(v.parse::<usize>().context("bad Content-Length")?);
        }
    }
    let body = if chunked {
        decode_chunked(body)?
    } else if let Some(len) = length {
        ensure!(
            body.len() >= len,
            "HTTP body truncated: {} of {len} bytes",
            body.len()
        );
        body[..len].to_vec()
    } else {
        body.to_vec()
    };
    Ok((code, body))
}

fn decode_chunked(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").context("chunk size line without CRLF")?;
        let size_str = std::str::from_utf8(&b[..eol])?;
        let size_str = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_str, 16)
            .with_context(|| format!("bad chunk size {size_str:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let data = eol + 2;
        ensure!(b.len() >= data + size + 2, "chunk truncated");
        out.extend_from_slice(&b[data..data + size]);
        b = &b[data + size + 2..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_line() {
        let a = parse_ready(r#"{"event":"ready","admin":"127.0.0.1:4321"}"#).unwrap();
        assert_eq!(a, "127.0.0.1:4321".parse().unwrap());
        assert!(parse_ready(r#"{"event":"starting"}"#).is_none());
        assert!(parse_ready("INFO hello").is_none());
    }

    #[test]
    fn parses_http_bodies() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r).unwrap(), (200, b"{}".to_vec()));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (200, b"{\"a\":1}".to_vec()));
        let r = b"HTTP/1.1 404 Not Found\r\n\r\nnope";
        assert_eq!(parse_response(r).unwrap(), (404, b"nope".to_vec()));
    }
}
