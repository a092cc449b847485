//! Access logs: one JSON line per HTTP request and per TCP connection, with
//! the metrics' labels plus timings, sizes, the policy decision and the
//! trace id. On by default, to stdout (`--access-log stdout|stderr|PATH|off`).
//!
//! The data path never waits for the log: lines go through a bounded queue
//! to a writer thread; when it is full (a stalled stdout pipe, a slow disk)
//! lines are dropped and counted (`accessLog.dropped` in `/status`).

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use serde::Serialize;

/// Lines waiting for the writer at most.
const QUEUE: usize = 16 * 1024;

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

#[derive(Default)]
pub struct AccessLog {
    tx: Option<mpsc::SyncSender<String>>,
    written: Arc<AtomicU64>,
    dropped: AtomicU64,
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
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                // Write what has queued up in one go, then flush.
                let mut n = 1;
                let mut ok = writeln!(out, "{first}").is_ok();
                while let Ok(line) = rx.try_recv() {
                    ok &= writeln!(out, "{line}").is_ok();
                    n += 1;
                }
                ok &= out.flush().is_ok();
                if ok {
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
        })?;
        Ok(Self { tx: Some(tx), written, dropped: AtomicU64::new(0) })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one entry; never blocks.
    pub fn log(&self, entry: &serde_json::Value) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(entry.to_string()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> AccessLogStats {
        AccessLogStats {
            enabled: self.enabled(),
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
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
        let off = AccessLog::disabled();
        off.log(&serde_json::json!({}));
        assert_eq!(off.stats().written + off.stats().dropped, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
