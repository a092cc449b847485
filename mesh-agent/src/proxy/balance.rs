//! Choosing among a service's endpoints: least requests by the power of two
//! choices, skipping endpoints ejected by outlier detection.
//!
//! Every try reports its outcome ([`Outcome`]). Consecutive connection
//! failures, or consecutive 5xx answers on the HTTP path, eject an endpoint
//! for `baseEjectionTime` times the number of times it was ejected (capped),
//! as the service's [`OutlierDetection`] says. L4 connections, which have
//! no route, use [`l4_outlier_detection`]: one connection failure ejects
//! for 5 s, growing to 60 s. At most `maxEjectionPercent` of a service's
//! endpoints are ejected at once, and never all: if every candidate is
//! ejected anyway (endpoints shared between services), all are tried.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    route::{OutlierDetection, RouteDuration},
    state::Destination,
};

/// Outlier detection for L4 connections to a service (no route applies):
/// the first failed connection ejects the endpoint for 5 s, then 10 s, ...
/// up to 60 s; up to all but one endpoint may be ejected.
pub fn l4_outlier_detection() -> &'static OutlierDetection {
    static L4: std::sync::OnceLock<OutlierDetection> = std::sync::OnceLock::new();
    L4.get_or_init(|| OutlierDetection {
        consecutive_5xx: 0,
        consecutive_connect_failures: 1,
        base_ejection_time: RouteDuration(Duration::from_secs(5)),
        max_ejection_time: RouteDuration(Duration::from_secs(60)),
        max_ejection_percent: 100,
    })
}

/// What one try at an endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Connected (L4), or answered with a status below 500.
    Success,
    /// No connection (TCP, mTLS or the tunnel's CONNECT), or reset before
    /// an answer.
    ConnectFailure,
    /// Answered with a 5xx status.
    ServerError,
}

#[derive(Default)]
struct Endpoint {
    active: usize,
    consecutive_connect_failures: u32,
    consecutive_5xx: u32,
    /// Times ejected; forgotten once the endpoint has been back and
    /// healthy for `maxEjectionTime`.
    ejections: u32,
    ejected_until: Option<Instant>,
    total_failures: u64,
    total_ejections: u64,
    picked: u64,
}

impl Endpoint {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }
}

pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, Endpoint>>,
    rng: AtomicU64,
}

impl Default for Balancer {
    /// Seeded from the OS: agents (and restarts of one) must not all draw
    /// the same sequence, or their random picks and weighted splits would
    /// move in lockstep across the cluster.
    fn default() -> Self {
        Balancer { endpoints: Mutex::default(), rng: AtomicU64::new(rand::random()) }
    }
}

/// Held while a connection uses an endpoint.
pub struct InUse<'a> {
    balancer: &'a Balancer,
    addr: SocketAddr,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.balancer.endpoints.lock().expect("poisoned").get_mut(&self.addr) {
            e.active = e.active.saturating_sub(1);
        }
    }
}

/// How [`Balancer::pick_as`] chooses among the healthy candidates.
#[derive(Clone, Copy)]
enum Mode<'a> {
    LeastOfTwo,
    InTurn(&'a AtomicU64),
    Random,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    active: usize,
    picked: u64,
    failures: u64,
    ejections: u64,
    ejected: bool,
}

impl Balancer {
    pub fn random(&self) -> u64 {
        // splitmix64 over a shared counter: cheap, good enough to break ties.
        let mut z = self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw that falls in a share of `per_million` (mirrors, faults).
    pub fn chance(&self, per_million: u32) -> bool {
        self.random() % 1_000_000 < u64::from(per_million)
    }

    /// Picks one of `candidates` not in `exclude` (already tried), or None:
    /// least requests of two, or in turn with a round-robin `cursor`.
    pub fn pick<'a>(&'a self, candidates: &[Destination], exclude: &[SocketAddr], cursor: Option<&AtomicU64>) -> Option<(Destination, InUse<'a>)> {
        self.pick_as(candidates, exclude, cursor.map_or(Mode::LeastOfTwo, Mode::InTurn))
    }

    /// [`Self::pick`] as a service's load balancer setting says: round
    /// robin over `cursor`, uniformly at random, or least requests of two.
    pub fn pick_by<'a>(&'a self, candidates: &[Destination], exclude: &[SocketAddr], lb: crate::route::LoadBalancer, cursor: &AtomicU64) -> Option<(Destination, InUse<'a>)> {
        use crate::route::LoadBalancer as Lb;
        let mode = match lb {
            Lb::LeastRequest => Mode::LeastOfTwo,
            Lb::RoundRobin => Mode::InTurn(cursor),
            Lb::Random => Mode::Random,
        };
        self.pick_as(candidates, exclude, mode)
    }

    fn pick_as<'a>(&'a self, candidates: &[Destination], exclude: &[SocketAddr], mode: Mode<'_>) -> Option<(Destination, InUse<'a>)> {
        let mut eps = self.endpoints.lock().expect("poisoned");
        let now = Instant::now();
        let open: Vec<&Destination> = candidates.iter().filter(|d| !exclude.contains(&d.addr())).collect();
        if open.is_empty() {
            return None;
        }
        let healthy: Vec<&Destination> = open
            .iter()
            .copied()
            .filter(|d| eps.get(&d.addr()).is_none_or(|e| !e.is_ejected(now)))
            .collect();
        let pool = if healthy.is_empty() { open } else { healthy };
        let chosen = if pool.len() == 1 {
            pool[0]
        } else if let Mode::InTurn(c) = mode {
            pool[(c.fetch_add(1, Ordering::Relaxed) % pool.len() as u64) as usize]
        } else if let Mode::Random = mode {
            pool[(self.random() % pool.len() as u64) as usize]
        } else {
            let n = pool.len() as u64;
            let a = (self.random() % n) as usize;
            let mut b = (self.random() % (n - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let load = |d: &Destination| eps.get(&d.addr()).map_or(0, |e| e.active);
            if load(pool[b]) < load(pool[a]) { pool[b] } else { pool[a] }
        };
        let e = eps.entry(chosen.addr()).or_default();
        e.active += 1;
        e.picked += 1;
        Some((chosen.clone(), InUse { balancer: self, addr: chosen.addr() }))
    }

    /// Records the outcome of a try at `addr`, one of `endpoints` (the
    /// service's, for the ejection limit). Returns how long the endpoint is
    /// now ejected for, if this outcome ejected it.
    pub fn report(&self, addr: SocketAddr, outcome: Outcome, policy: &OutlierDetection, endpoints: &[Destination]) -> Option<Duration> {
        let mut eps = self.endpoints.lock().expect("poisoned");
        let now = Instant::now();
        let e = eps.entry(addr).or_default();
        let tripped = match outcome {
            Outcome::Success => {
                e.consecutive_connect_failures = 0;
                e.consecutive_5xx = 0;
                if e.ejected_until.is_some_and(|t| t + policy.max_ejection_time.0 <= now) {
                    e.ejections = 0;
                    e.ejected_until = None;
                }
                false
            }
            Outcome::ConnectFailure => {
                e.total_failures += 1;
                e.consecutive_connect_failures += 1;
                policy.consecutive_connect_failures > 0 && e.consecutive_connect_failures >= policy.consecutive_connect_failures
            }
            Outcome::ServerError => {
                e.total_failures += 1;
                e.consecutive_5xx += 1;
                policy.consecutive_5xx > 0 && e.consecutive_5xx >= policy.consecutive_5xx
            }
        };
        if !tripped || e.is_ejected(now) {
            return None;
        }
        let ejected_now = endpoints
            .iter()
            .filter(|d| d.addr() != addr && eps.get(&d.addr()).is_some_and(|o| o.is_ejected(now)))
            .count();
        if ejected_now >= policy.max_ejected(endpoints.len().max(1)) {
            tracing::info!(endpoint = %addr, ?outcome, ejected = ejected_now, "endpoint not ejected: the service is at its ejection limit");
            return None;
        }
        let e = eps.get_mut(&addr).expect("inserted above");
        e.ejections += 1;
        e.total_ejections += 1;
        e.consecutive_connect_failures = 0;
        e.consecutive_5xx = 0;
        let ejection = policy.ejection_time(e.ejections);
        e.ejected_until = Some(now + ejection);
        tracing::info!(endpoint = %addr, ?outcome, ?ejection, times = e.ejections, "endpoint ejected");
        Some(ejection)
    }

    /// Forgets endpoints `keep` no longer names (gone from the mesh
    /// state), except those a connection is using: they go once it ends.
    /// Returns how many were forgotten.
    pub fn retain(&self, keep: impl Fn(SocketAddr) -> bool) -> usize {
        let mut eps = self.endpoints.lock().expect("poisoned");
        let before = eps.len();
        eps.retain(|a, e| e.active > 0 || keep(*a));
        before - eps.len()
    }

    /// Endpoints with a record.
    pub fn entries(&self) -> usize {
        self.endpoints.lock().expect("poisoned").len()
    }

    pub fn view(&self) -> std::collections::BTreeMap<String, EndpointView> {
        let now = Instant::now();
        self.endpoints
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(a, e)| {
                (
                    a.to_string(),
                    EndpointView {
                        active: e.active,
                        picked: e.picked,
                        failures: e.total_failures,
                        ejections: e.total_ejections,
                        ejected: e.is_ejected(now),
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_balancers_draw_different_sequences() {
        let (a, b) = (Balancer::default(), Balancer::default());
        let seq = |x: &Balancer| (0..8).map(|_| x.random()).collect::<Vec<_>>();
        assert_ne!(seq(&a), seq(&b), "every agent would make the same random choices");
    }

    fn d(port: u16) -> Destination {
        Destination::Passthrough(SocketAddr::from(([198, 51, 100, 1], port)))
    }

    #[test]
    fn least_loaded_wins_and_ejected_endpoints_are_skipped() {
        let b = Balancer::default();
        let c = [d(1), d(2)];
        let l4 = l4_outlier_detection();
        let (first, _held) = b.pick(&c, &[], None).unwrap();
        // With one endpoint busy, the other is always chosen.
        for _ in 0..20 {
            let (next, _g) = b.pick(&c, &[], None).unwrap();
            assert_ne!(next, first);
        }
        assert_eq!(b.report(d(2).addr(), Outcome::ConnectFailure, l4, &c), Some(Duration::from_secs(5)));
        for _ in 0..20 {
            assert_eq!(b.pick(&c, &[], None).unwrap().0, d(1));
        }
        // Never ejecting all: the last healthy endpoint stays in.
        assert_eq!(b.report(d(1).addr(), Outcome::ConnectFailure, l4, &c), None);
        assert!(b.pick(&c, &[d(1).addr(), d(2).addr()], None).is_none());
    }

    #[test]
    fn round_robin_takes_turns_among_healthy_endpoints() {
        let b = Balancer::default();
        let c = [d(1), d(2), d(3)];
        let cursor = AtomicU64::new(0);
        let picks: Vec<_> = (0..6).map(|_| b.pick(&c, &[], Some(&cursor)).unwrap().0).collect();
        assert_eq!(picks, [d(1), d(2), d(3), d(1), d(2), d(3)]);
        b.report(d(2).addr(), Outcome::ConnectFailure, l4_outlier_detection(), &c);
        let picks: Vec<_> = (0..4).map(|_| b.pick(&c, &[], Some(&cursor)).unwrap().0).collect();
        assert!(!picks.contains(&d(2)) && picks.contains(&d(1)) && picks.contains(&d(3)), "{picks:?}");
    }

    #[test]
    fn consecutive_5xx_eject_for_a_growing_time_within_the_limit() {
        let b = Balancer::default();
        let c = [d(1), d(2), d(3), d(4)];
        let policy = OutlierDetection { consecutive_5xx: 3, ..OutlierDetection::default() };
        // Two 5xx then a success: the streak is broken.
        for o in [Outcome::ServerError, Outcome::ServerError, Outcome::Success, Outcome::ServerError, Outcome::ServerError] {
            assert_eq!(b.report(d(1).addr(), o, &policy, &c), None);
        }
        assert_eq!(b.report(d(1).addr(), Outcome::ServerError, &policy, &c), Some(Duration::from_secs(30)));
        // 50% of four endpoints: a second one may go, a third may not.
        for _ in 0..2 {
            assert_eq!(b.report(d(2).addr(), Outcome::ServerError, &policy, &c), None);
        }
        assert!(b.report(d(2).addr(), Outcome::ServerError, &policy, &c).is_some());
        for _ in 0..3 {
            assert_eq!(b.report(d(3).addr(), Outcome::ServerError, &policy, &c), None);
        }
        for _ in 0..50 {
            let (p, _g) = b.pick(&c, &[], None).unwrap();
            assert!(p == d(3) || p == d(4), "{p:?}");
        }
        // A second ejection lasts twice as long (set the first one as over).
        b.endpoints.lock().unwrap().get_mut(&d(1).addr()).unwrap().ejected_until = Some(Instant::now());
        for _ in 0..2 {
            b.report(d(1).addr(), Outcome::ServerError, &policy, &c);
        }
        assert_eq!(b.report(d(1).addr(), Outcome::ServerError, &policy, &c), Some(Duration::from_secs(60)));
        // Connect failures count separately.
        let v = b.view();
        assert_eq!(v[&d(1).addr().to_string()].ejections, 2);
    }
}
