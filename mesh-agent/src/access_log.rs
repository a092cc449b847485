//! Access logs: one JSON line per HTTP request and per TCP connection, with
//! the metrics' labels plus timings, sizes, the policy decision and the
//! trace id. On by default, to stdout (`--access-log stdout|stderr|PATH|off`).
//!
//! The data path never waits for the log: each line is serialized into a
//! bounded buffer that a writer thread empties every 100 ms; when the buffer
//! is full (a stalled stdout pipe, a slow disk) lines are dropped and counted
//! (`accessLog.dropped` in `/status`). Shutdown writes what is left.

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;

/// Bytes of lines waiting for the writer at most; beyond, lines are dropped.
const BUFFER_LIMIT: usize = 4 << 20;
/// How often the writer thread writes what has accumulated. The data path
/// never wakes it: one write per interval rather than a thread wake-up (a
/// futex call and a context switch) per request. Envoy flushes its access
/// log files every second by default.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Off,
    Stdout,
    Stderr,
    File(PathBuf),
}

/// `--access-log`: `stdout`, `stderr`, `off`, or a file path (appended to).
pub fn parse_target(s: &str) -> Result<Target, String> {
    match s.trim() {
        "" => Err("an empty access log target: use stdout, stderr, off or a file path".into()),
        "off" => Ok(Target::Off),
        "stdout" | "-" => Ok(Target::Stdout),
        "stderr" => Ok(Target::Stderr),
        p if p.starts_with('/') || p.starts_with('.') => Ok(Target::File(PathBuf::from(p))),
        other => Err(format!("{other:?} is not an access log target: use stdout, stderr, off or a path starting with / or .")),
    }
}

/// Lines serialized by the data path, waiting for the writer.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    written: AtomicU64,
    dropped: AtomicU64,
    /// Lines handed to the writer (written or failed), for `flush`.
    taken: AtomicU64,
    /// Lines accepted into the buffer.
    queued: AtomicU64,
    stop: AtomicBool,
}

#[derive(Default)]
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
    writer: Option<std::thread::Thread>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogStats {
    enabled: bool,
    written: u64,
    dropped: u64,
}

impl AccessLog {
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Opens the target (a file is created or appended to) and starts the
    /// writer thread.
    pub fn start(target: &Target) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(Self::disabled()),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::Stderr => Box::new(std::io::stderr()),
            Target::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot open the access log {}: {e}", p.display()))
            })?),
        };
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let writer = std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let mut spare = Vec::new();
            loop {
                let stopping = s.stop.load(Ordering::Acquire);
                let lines = {
                    let mut p = s.pending.lock().expect("poisoned");
                    std::mem::swap(&mut p.bytes, &mut spare);
                    std::mem::take(&mut p.lines)
                };
                if lines > 0 {
                    let ok = out.write_all(&spare).is_ok() && out.flush().is_ok();
                    if ok {
                        s.written.fetch_add(lines, Ordering::Relaxed);
                    } else {
                        s.dropped.fetch_add(lines, Ordering::Relaxed);
                    }
                    s.taken.fetch_add(lines, Ordering::Release);
                    spare.clear();
                    // Keep a buffer for the next round, not a burst's worth.
                    spare.shrink_to(64 * 1024);
                }
                if stopping {
                    return;
                }
                std::thread::park_timeout(FLUSH_INTERVAL);
            }
        })?;
        Ok(Self { writer: Some(writer.thread().clone()), shared: Some(shared) })
    }

    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Queues one entry as a JSON line; never blocks on the output.
    pub fn log(&self, entry: &impl Serialize) {
        let Some(s) = &self.shared else { return };
        let mut p = s.pending.lock().expect("poisoned");
        if p.bytes.len() >= BUFFER_LIMIT {
            drop(p);
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = p.bytes.len();
        if serde_json::to_writer(&mut p.bytes, entry).is_err() {
            p.bytes.truncate(before);
            drop(p);
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        p.bytes.push(b'\n');
        p.lines += 1;
        s.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes what is queued now and stops the writer (at shutdown): waits
    /// for the output up to `timeout`.
    pub fn flush_and_stop(&self, timeout: Duration) {
        let (Some(s), Some(w)) = (&self.shared, &self.writer) else { return };
        s.stop.store(true, Ordering::Release);
        w.unpark();
        let deadline = std::time::Instant::now() + timeout;
        while s.taken.load(Ordering::Acquire) < s.queued.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self) -> AccessLogStats {
        let (written, dropped) = self.shared.as_ref().map_or((0, 0), |s| {
            (s.written.load(Ordering::Relaxed), s.dropped.load(Ordering::Relaxed))
        });
        AccessLogStats { enabled: self.enabled(), written, dropped }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if let (Some(s), Some(w)) = (&self.shared, &self.writer) {
            s.stop.store(true, Ordering::Release);
            w.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_clear_errors() {
        assert_eq!(parse_target("off"), Ok(Target::Off));
        assert_eq!(parse_target("stdout"), Ok(Target::Stdout));
        assert_eq!(parse_target("/var/log/a.log"), Ok(Target::File("/var/log/a.log".into())));
        assert!(parse_target("sdtout").unwrap_err().contains("not an access log target"));
        assert!(parse_target(" ").is_err());
    }

    #[test]
    fn lines_reach_the_file_and_a_disabled_log_costs_nothing() {
        let dir = std::env::temp_dir().join(format!("access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let log = AccessLog::start(&Target::File(path.clone())).unwrap();
        for i in 0..10 {
            log.log(&serde_json::json!({"n": i}));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.stats().written < 10 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 10, "{text}");
        assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        // Shutdown: what is buffered is written at once, not at the next
        // interval.
        for i in 10..15 {
            log.log(&serde_json::json!({"n": i}));
        }
        log.flush_and_stop(std::time::Duration::from_secs(5));
        assert_eq!(log.stats().written, 15);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 15);
        let off = AccessLog::disabled();
        off.log(&serde_json::json!({}));
        assert_eq!(off.stats().written + off.stats().dropped, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
