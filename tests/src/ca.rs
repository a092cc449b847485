//! [`Ca`]: the mesh's certificate authority (`mesh-agent ca`) for one
//! testbed, in the host netns on loopback, with one token per node.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::agent::AgentProc;
use crate::process::{self, Captured};
use crate::testbed::CleanupHandle;

/// How long the CA may take to print its ready line.
pub const CA_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Ca::stop`] waits after SIGTERM.
const CA_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Ca::restart`] keeps retrying when its old port is not free yet.
const REBIND_TIMEOUT: Duration = Duration::from_secs(15);

/// Options of [`crate::Testbed::start_ca_with`].
#[derive(Clone, Debug, Default)]
pub struct CaOptions {
    /// `--ttl`: the longest certificate lifetime the CA issues (e.g. `4s`).
    pub ttl: Option<String>,
    /// More `mesh-agent ca` arguments.
    pub args: Vec<String>,
}

impl CaOptions {
    pub fn new() -> CaOptions {
        CaOptions::default()
    }

    pub fn ttl(mut self, ttl: impl Into<String>) -> CaOptions {
        self.ttl = Some(ttl.into());
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> CaOptions {
        self.args.push(arg.into());
        self
    }
}

/// Where a CA's files live, and what it was started with.
struct CaSetup {
    bin: PathBuf,
    config: PathBuf,
    state_dir: PathBuf,
    tokens_file: PathBuf,
    token_files: BTreeMap<String, PathBuf>,
    log_dir: PathBuf,
    opts: CaOptions,
    cleanup: CleanupHandle,
}

struct Running {
    proc_: Arc<AgentProc>,
    pid: u32,
    log_path: PathBuf,
    stdout: Arc<Captured>,
}

struct CaInner {
    setup: CaSetup,
    /// Fixed once the first start picked a port: agents are configured with
    /// it, so a restart listens on the same address.
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
    starts: Mutex<u64>,
}

/// The testbed's CA. A cheap handle (clones share the process); the
/// testbed keeps one and kills the process when it is dropped.
#[derive(Clone)]
pub struct Ca {
    inner: Arc<CaInner>,
}

impl Ca {
    /// Writes the tokens (one random 64-hex-char token per node, a file per
    /// node for its agent and the CA's `nodes:` YAML), then starts the CA.
    pub(crate) fn start(
        bin: &Path,
        config: &Path,
        dir: &Path,
        nodes: &[String],
        opts: CaOptions,
        cleanup: CleanupHandle,
    ) -> Result<Ca> {
        ensure!(!nodes.is_empty(), "a CA needs at least one node: add pods or nodes first");
        let state_dir = dir.join("ca");
        let token_dir = dir.join("ca-tokens");
        std::fs::create_dir_all(&token_dir)
            .with_context(|| format!("creating {}", token_dir.display()))?;
        let mut token_files = BTreeMap::new();
        let mut yaml = String::from("nodes:\n");
        for node in nodes {
            let token = random_hex(32)?;
            let file = token_dir.join(format!("{node}.token"));
            std::fs::write(&file, format!("{token}\n"))
                .with_context(|| format!("writing {}", file.display()))?;
            yaml.push_str(&format!("  {node}: {token}\n"));
            token_files.insert(node.clone(), file);
        }
        let tokens_file = dir.join("ca-tokens.yaml");
        std::fs::write(&tokens_file, yaml)
            .with_context(|| format!("writing {}", tokens_file.display()))?;
        let setup = CaSetup {
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            state_dir,
            tokens_file,
            token_files,
            log_dir: dir.to_path_buf(),
            opts,
            cleanup,
        };
        let starts = Mutex::new(0);
        let running = spawn(&setup, "127.0.0.1:0".parse().expect("literal"), &starts)?;
        let addr = parse_ready(&running.stdout.text()).context("ready line vanished")?;
        let ca = Ca {
            inner: Arc::new(CaInner {
                setup,
                addr,
                running: Mutex::new(Some(running)),
                starts,
            }),
        };
        ensure!(
            ca.roots_path().is_file(),
            "the CA is ready but {} does not exist",
            ca.roots_path().display()
        );
        Ok(ca)
    }

    /// `IP:PORT` the CA serves gRPC over TLS on (loopback), the same across
    /// restarts.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `https://IP:PORT`, for the agents' `--ca-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.inner.addr)
    }

    /// The CA's state directory (root key and trust bundle), kept across
    /// restarts.
    pub fn state_dir(&self) -> &Path {
        &self.inner.setup.state_dir
    }

    /// The active root's certificate: what the CA's serving certificate
    /// chains to, for the agents' `--ca-roots`.
    pub fn roots_path(&self) -> PathBuf {
        self.inner.setup.state_dir.join("root-cert.pem")
    }

    /// The CA's `--tokens` file.
    pub fn tokens_path(&self) -> &Path {
        &self.inner.setup.tokens_file
    }

    /// `node`'s token file (for its agent's `--ca-token-file`).
    pub fn token_path(&self, node: &str) -> Option<&Path> {
        self.inner.setup.token_files.get(node).map(PathBuf::as_path)
    }

    /// `node`'s token.
    pub fn token(&self, node: &str) -> Result<String> {
        let path = self.token_path(node).with_context(|| format!("the CA has no token for {node}"))?;
        Ok(std::fs::read_to_string(path)?.trim().to_string())
    }

    /// The `mesh-agent run` flags that point `node`'s agent at this CA.
    pub fn agent_args(&self, node: &str) -> Result<Vec<String>> {
        let token = self.token_path(node).with_context(|| {
            format!(
                "the CA has no token for node {node}: nodes must be declared (add_node/add_pod) \
                 before start_ca"
            )
        })?;
        Ok(vec![
            "--ca-endpoint".into(),
            self.endpoint(),
            "--ca-roots".into(),
            self.roots_path().display().to_string(),
            "--ca-token-file".into(),
            token.display().to_string(),
        ])
    }

    /// The running process' PID, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(|r| r.pid)
    }

    /// Whether the CA process runs (a process that exited is forgotten).
    pub fn is_running(&self) -> bool {
        let mut g = self.lock();
        let alive = g
            .as_ref()
            .is_some_and(|r| r.proc_.child().try_wait().ok().flatten().is_none());
        if !alive {
            *g = None;
        }
        alive
    }

    /// The current (or last) process' log.
    pub fn log(&self) -> String {
        self.log_path()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The current (or last) process' log file.
    pub fn log_path(&self) -> Option<PathBuf> {
        if let Some(r) = self.lock().as_ref() {
            return Some(r.log_path.clone());
        }
        let starts = *self.inner.starts.lock().unwrap_or_else(|e| e.into_inner());
        starts
            .checked_sub(1)
            .map(|n| self.inner.setup.log_dir.join(format!("ca-{n}.log")))
    }

    /// Everything every CA process of this testbed logged, oldest first.
    pub fn all_logs(&self) -> String {
        let starts = *self.inner.starts.lock().unwrap_or_else(|e| e.into_inner());
        (0..starts)
            .map(|n| {
                let p = self.inner.setup.log_dir.join(format!("ca-{n}.log"));
                format!("--- {}\n{}", p.display(), std::fs::read_to_string(&p).unwrap_or_default())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM, then wait; no-op if it is not running.
    pub fn stop(&self) -> Result<Option<ExitStatus>> {
        let Some(r) = self.lock().take() else {
            return Ok(None);
        };
        let mut child = r.proc_.child();
        process::signal(&mut child, nix::sys::signal::Signal::SIGTERM)?;
        match process::wait_timeout(&mut child, CA_STOP_TIMEOUT)? {
            Some(status) => Ok(Some(status)),
            None => {
                process::kill_and_reap(&mut child);
                bail!("the CA was still running {CA_STOP_TIMEOUT:?} after SIGTERM, killed")
            }
        }
    }

    /// SIGKILL and reap; no-op if it is not running.
    pub fn kill(&self) -> Option<ExitStatus> {
        self.lock().take().and_then(|r| r.proc_.kill())
    }

    /// Stops the CA if it runs (SIGTERM) and starts it again on the same
    /// address with the same state dir (so the same root) and tokens.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            match spawn(&self.inner.setup, self.inner.addr, &self.inner.starts) {
                Ok(r) => {
                    *self.lock() = Some(r);
                    return Ok(());
                }
                // The port may linger for a moment; nothing else should take it.
                Err(e) if Instant::now() < deadline && format!("{e:#}").contains("cannot listen") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e.context(format!("restarting the CA on {}", self.inner.addr))),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.inner.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CaInner {
    fn drop(&mut self) {
        if let Some(r) = self.running.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            r.proc_.kill();
        }
    }
}

/// `BIN ca --config .. --state-dir .. --tokens .. --listen ADDR [--ttl ..]`,
/// stderr to `ca-N.log`; returns once it prints its ready line.
fn spawn(setup: &CaSetup, listen: SocketAddr, starts: &Mutex<u64>) -> Result<Running> {
    let n = {
        let mut s = starts.lock().unwrap_or_else(|e| e.into_inner());
        *s += 1;
        *s - 1
    };
    let log_path = setup.log_dir.join(format!("ca-{n}.log"));
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(&setup.bin);
    cmd.arg("ca")
        .arg("--config")
        .arg(&setup.config)
        .arg("--state-dir")
        .arg(&setup.state_dir)
        .arg("--tokens")
        .arg(&setup.tokens_file)
        .arg("--listen")
        .arg(listen.to_string());
    if let Some(ttl) = &setup.opts.ttl {
        cmd.args(["--ttl", ttl]);
    }
    cmd.args(&setup.opts.args)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let mut child = process::spawn_supervised(&mut cmd, None)
        .with_context(|| format!("starting the CA {}", setup.bin.display()))?;
    let pid = child.id();
    let (stdout, _reader) = Captured::drain(child.stdout.take().expect("piped"));
    let proc_ = Arc::new(AgentProc::new(child));
    setup.cleanup.track_agent(Arc::downgrade(&proc_));
    if let Err(e) = stdout.wait_line(CA_READY_TIMEOUT, "CA ready line", |l| parse_ready(l).is_some()) {
        let status = proc_.kill();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "the CA did not become ready: {e:#} (exit: {}); stdout: {:?}; log {}:\n{}",
            status.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
            stdout.text(),
            log_path.display(),
            tail.join("\n")
        );
    }
    Ok(Running {
        proc_,
        pid,
        log_path,
        stdout,
    })
}

/// The address from `{"event":"ready","ca":"IP:PORT"}` (any line of `text`).
fn parse_ready(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        if v.get("event")?.as_str()? != "ready" {
            return None;
        }
        v.get("ca")?.as_str()?.parse().ok()
    })
}

/// `n` bytes from the kernel's CSPRNG, hex-encoded.
pub(crate) fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ready_line() {
        let text = "INFO x\n{\"event\":\"ready\",\"ca\":\"127.0.0.1:4433\"}\n";
        assert_eq!(parse_ready(text), Some("127.0.0.1:4433".parse().unwrap()));
        assert_eq!(parse_ready(r#"{"event":"ready","admin":"127.0.0.1:1"}"#), None);
        let t = random_hex(32).unwrap();
        assert!(t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, random_hex(32).unwrap());
    }
}
