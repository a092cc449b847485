//! File descriptors: the agent's limit, running out of them, and keeping
//! the admin listener answering when the data plane has used them all.
//!
//! Every proxied connection costs the agent two descriptors (more with a
//! tunnel), so the agent raises its soft `RLIMIT_NOFILE` to the hard limit
//! at start ([`raise_nofile`]). When descriptors run out anyway, accept
//! loops count the error, log it at a bounded rate ([`RateLimited`]) and
//! back off instead of spinning; the admin listener holds one spare
//! descriptor ([`Reserve`]) it gives up to take a connection.

use std::{
    fs::File,
    sync::Mutex,
    time::{Duration, Instant},
};

/// The soft and hard `RLIMIT_NOFILE` before and after raising.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// Raises the soft limit on open files to the hard limit.
pub fn raise_nofile() -> std::io::Result<NoFile> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(NoFile { before, after: lim.rlim_max, hard: lim.rlim_max })
}

/// Why an accept failed, as `nodemesh_accept_errors_total{reason}` says.
pub fn accept_error_reason(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => "process_fd_limit",
        Some(libc::ENFILE) => "system_fd_limit",
        Some(libc::ENOBUFS | libc::ENOMEM) => "no_memory",
        _ => "other",
    }
}

/// EMFILE or ENFILE: out of descriptors (the process's or the system's).
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// How long an accept loop waits after running out of descriptors (or
/// memory) before trying again: connections must close first.
pub const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line per `every`; the lines in between are counted and
/// the next line says how many were suppressed.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    inner: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    pub const fn new(every: Duration) -> Self {
        Self { every, inner: Mutex::new((None, 0)) }
    }

    /// `Some(suppressed)` when a line may be logged now (with how many
    /// were suppressed since the last one), else None (counted).
    pub fn hit(&self, now: Instant) -> Option<u64> {
        let mut g = self.inner.lock().expect("poisoned");
        let (last, suppressed) = &mut *g;
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            *suppressed += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(suppressed))
    }
}

/// One descriptor held back (`/dev/null`) so that a listener that must
/// keep answering can still take a connection when the process has none
/// left: give it up, accept, take it back once descriptors are free.
#[derive(Debug, Default)]
pub struct Reserve(Option<File>);

impl Reserve {
    pub fn new() -> Self {
        let mut r = Self(None);
        r.refill();
        r
    }

    /// Gives the descriptor up; false if there was none to give.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes a descriptor back if there is none (and one is free).
    pub fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = File::open("/dev/null").ok();
        }
    }

    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_suppressed_count() {
        let log = RateLimited::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(log.hit(t0), Some(0));
        for i in 1..=999u64 {
            assert_eq!(log.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.hit(t0 + Duration::from_secs(5)), Some(999));
        assert_eq!(log.hit(t0 + Duration::from_secs(6)), None);
        assert_eq!(log.hit(t0 + Duration::from_secs(10)), Some(1));
    }

    #[test]
    fn reasons_name_the_limit() {
        let e = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(accept_error_reason(&e(libc::EMFILE)), "process_fd_limit");
        assert_eq!(accept_error_reason(&e(libc::ENFILE)), "system_fd_limit");
        assert_eq!(accept_error_reason(&e(libc::ECONNABORTED)), "other");
        assert!(is_exhaustion(&e(libc::EMFILE)) && is_exhaustion(&e(libc::ENFILE)) && !is_exhaustion(&e(libc::ENOMEM)));
    }

    #[test]
    fn the_reserve_gives_up_its_descriptor_and_takes_it_back() {
        let mut r = Reserve::new();
        assert!(r.is_held());
        assert!(r.release());
        assert!(!r.release());
        r.refill();
        assert!(r.is_held());
    }
}
