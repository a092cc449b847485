//! Giving memory back after a connection storm.
//!
//! The agent allocates with mimalloc (`main.rs`), which keeps freed pages
//! in the heap of the thread that owns them and returns them to the kernel
//! only when that thread next works in the allocator. A data thread that
//! goes idle after 10,000 connections closed never does, so the agent's
//! resident memory stayed at about twice its idle level although nothing
//! held it.
//!
//! So the agent watches how many descriptors it holds (every connection it
//! carries costs at least one: accepted from a pod, to an app, to a peer; a
//! count of its own connection table would miss the tunnel streams a
//! destination agent carries over one accepted connection). When that moved
//! by at least [`STORM`] from its last high or low point and settled (many
//! connections closed, or many opened: their first exchanges' buffers are
//! freed too), or when many exchanges ended on connections that stay open
//! (an idle HTTP/1.1 connection frees its server's buffers) and stopped, it
//! starts a collection
//! round ([`collect_now`]): each runtime thread collects its own heap the
//! next time it parks ([`on_park`], installed on the runtimes in `app.rs`),
//! that is when it has nothing else to do; a second round follows once the
//! pools have closed the connections the storm left idle. Cheap: a
//! directory read every [`CHECK_EVERY`], an atomic load per park, a
//! collection per thread only after a storm settled.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the descriptor count is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Descriptors (connections) that must have closed since the high point
/// before collecting.
pub const STORM: usize = 1_000;

/// Collection rounds started so far; a thread that has not collected in
/// the current round does so when it parks.
static ROUND: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COLLECTED: Cell<u64> = const { Cell::new(0) };
}

/// Events that each freed about a connection's worth of buffers (16 KiB or
/// more) while the connections go on: an idle HTTP/1.1 connection letting
/// its server's buffers go (`proxy::http::idle`), a pooled connection to an
/// app or a peer closed for idleness. Counted for [`Trimmer`].
static CHURN: AtomicU64 = AtomicU64::new(0);

/// Churn events since the last collection that make a storm: about 4 MiB
/// of buffers.
pub const CHURN_STORM: u64 = 256;

/// Notes an event that freed a connection's transient memory.
pub fn note_churn() {
    CHURN.fetch_add(1, Ordering::Relaxed);
}

/// A pool's `retain` verdict on one of its connections: one dropped is
/// churn.
pub fn kept(keep: bool) -> bool {
    if !keep {
        note_churn();
    }
    keep
}

/// When to collect, apart from the allocator (so it is tested on its own).
#[derive(Debug, Default)]
pub struct Trimmer {
    high: usize,
    low: usize,
    last: usize,
    /// [`CHURN`] at the last collection, and at the last look.
    churn_since: u64,
    churn_last: u64,
    /// Looks left until the follow-up of the last collection.
    follow_up: Option<u32>,
}

/// How long after a storm's collection a second one comes: by then the
/// pools have closed the connections the storm left idle (their idle
/// timeout and their reaper's period, which `proxy::pool` checks against
/// this), and what those held is free too.
pub const FOLLOW_UP_AFTER: Duration = Duration::from_secs(6);

/// [`FOLLOW_UP_AFTER`] in looks.
pub const FOLLOW_UP_LOOKS: u32 = FOLLOW_UP_AFTER.as_secs().div_ceil(CHECK_EVERY.as_secs()) as u32;

impl Trimmer {
    /// `open` descriptors and the `churn` count now: true when a
    /// collection is due. Either the descriptors moved by [`STORM`] or
    /// more from the highest or the lowest count seen since the last
    /// collection (many connections closed and freed theirs, or many
    /// opened and freed what their set-up needed), or [`CHURN_STORM`]
    /// churn events happened since it; and both counts have settled (each
    /// moved by less than a tenth of its storm since the last look). Collected mid-storm, the memory of the
    /// connections still opening, closing or busy would be freed after the
    /// collection and stay with idle threads; under steady load nothing
    /// settles and nothing is collected (busy threads reuse what they
    /// free). A collection is followed by a second one
    /// [`FOLLOW_UP_LOOKS`] looks later.
    pub fn observe(&mut self, open: usize, churn: u64) -> bool {
        let settled = open.abs_diff(self.last) < STORM / 10 && churn - self.churn_last < CHURN_STORM / 10;
        (self.last, self.churn_last) = (open, churn);
        self.high = self.high.max(open);
        self.low = self.low.min(open);
        let stormed = self.high - open >= STORM || open - self.low >= STORM || churn - self.churn_since >= CHURN_STORM;
        if settled && stormed {
            (self.high, self.low, self.churn_since) = (open, open, churn);
            self.follow_up = Some(FOLLOW_UP_LOOKS);
            return true;
        }
        match &mut self.follow_up {
            Some(1) => {
                self.follow_up = None;
                true
            }
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    }
}

/// Runs until dropped: a collection round after each storm of connections.
pub async fn trim_after_storms() {
    let mut trimmer = Trimmer::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(now) = open_descriptors() else { continue };
        if trimmer.observe(now, CHURN.load(Ordering::Relaxed)) {
            tracing::debug!(open_descriptors = now, rss_kib = resident_kib(), "a connection storm settled (or its follow-up is due): threads return free memory when idle");
            collect_now();
        }
    }
}

/// Starts a collection round and collects the calling thread's heap.
pub fn collect_now() {
    ROUND.fetch_add(1, Ordering::Relaxed);
    on_park();
}

/// A runtime thread parks (it is idle): collects its heap if a round
/// started since it last did. Returns whether it collected.
pub fn on_park() -> bool {
    let round = ROUND.load(Ordering::Relaxed);
    if COLLECTED.get() == round {
        return false;
    }
    COLLECTED.set(round);
    // SAFETY: mimalloc's collection entry point; it works on the calling
    // thread's heap (and abandoned ones). A no-op when mimalloc is linked
    // but not the global allocator (the library's tests).
    unsafe { libmimalloc_sys::mi_collect(true) };
    true
}

/// Descriptors this process holds (None if `/proc` cannot be read, e.g.
/// out of descriptors itself: the next look will tell).
fn open_descriptors() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// Resident memory (KiB) from `/proc/self/statm`, for the log line.
fn resident_kib() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    pages * page / 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a collection: nothing for a few looks, then its follow-up,
    /// then nothing, with `open` descriptors and `churn` unchanged.
    fn follow_up(t: &mut Trimmer, open: usize, churn: u64) {
        for look in 1..FOLLOW_UP_LOOKS {
            assert!(!t.observe(open, churn), "look {look} after a collection");
        }
        assert!(t.observe(open, churn), "the follow-up");
        assert!(!t.observe(open, churn), "after the follow-up");
    }

    #[test]
    fn collects_once_per_storm_once_settled() {
        const { assert!(FOLLOW_UP_LOOKS >= 2) };
        let mut t = Trimmer::default();
        // Small moves: nothing to give back.
        for open in [0, 10, 500, 480, 900, 900] {
            assert!(!t.observe(open, 0), "at {open}");
        }
        // Rising: not yet, connections are still opening.
        assert!(!t.observe(1_500, 0));
        // 1,000 more than the low point and settled: collect, once.
        assert!(t.observe(1_520, 0));
        follow_up(&mut t, 1_520, 0);
        // Falling: not yet, connections are still closing.
        assert!(!t.observe(800, 0));
        assert!(!t.observe(450, 0));
        // 1,000 fewer than the high point and settled: collect, once.
        assert!(t.observe(420, 0));
        follow_up(&mut t, 400, 0);
        // A new storm measured from where the last one settled, either way.
        assert!(!t.observe(3_000, 0));
        assert!(!t.observe(0, 0));
        assert!(t.observe(0, 0));
        follow_up(&mut t, 0, 0);
        assert!(!t.observe(600, 0));
        assert!(!t.observe(1_100, 0));
        assert!(t.observe(1_100, 0));
    }

    /// Exchanges ending on connections that stay open: collected once
    /// they stop, never while they go on.
    #[test]
    fn collects_after_churn_settles() {
        let mut t = Trimmer::default();
        assert!(!t.observe(50, 0));
        // Steady load: 5,000 exchanges a look, never settled.
        for look in 1..=5 {
            assert!(!t.observe(50, look * 5_000), "look {look}");
        }
        // It stops: collect, once.
        assert!(t.observe(50, 25_010));
        follow_up(&mut t, 50, 25_010);
        // A little more is not a storm; enough of it, once settled, is.
        assert!(!t.observe(50, 25_200));
        assert!(!t.observe(50, 25_200));
        assert!(!t.observe(50, 25_250));
        assert!(t.observe(50, 25_270));
    }

    #[test]
    fn each_thread_collects_once_per_round() {
        std::thread::spawn(|| {
            collect_now();
            // Collected already in this round: parking does nothing more.
            assert!(!on_park());
            // Another thread's round: this thread collects at its next park.
            std::thread::spawn(|| ROUND.fetch_add(1, Ordering::Relaxed)).join().unwrap();
            assert!(on_park());
            assert!(!on_park());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn resident_memory_and_descriptors_are_read() {
        assert!(resident_kib() > 0);
        let before = open_descriptors().unwrap();
        let files: Vec<_> = (0..10).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        assert!(open_descriptors().unwrap() >= before + files.len() - 2, "other tests' files come and go");
    }
}
