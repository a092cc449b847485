//! Choosing among a service's endpoints: least requests by the power of two
//! choices, skipping endpoints ejected after connection failures.
//!
//! An endpoint whose connection (TCP, mTLS or the CONNECT) fails is ejected
//! for 5 s, doubling with each consecutive ejection up to 60 s; a success
//! clears its record. If every candidate is ejected, all are tried anyway:
//! ejection must never take a whole service down.

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

use crate::state::Destination;

const BASE_EJECTION: Duration = Duration::from_secs(5);
const MAX_EJECTION: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Endpoint {
    active: usize,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    total_failures: u64,
    picked: u64,
}

#[derive(Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, Endpoint>>,
    rng: AtomicU64,
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    active: usize,
    picked: u64,
    failures: u64,
    ejected: bool,
}

impl Balancer {
    fn random(&self) -> u64 {
        // splitmix64 over a shared counter: cheap, good enough to break ties.
        let mut z = self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Picks one of `candidates` not in `exclude` (already tried), or None.
    pub fn pick<'a>(&'a self, candidates: &[Destination], exclude: &[SocketAddr]) -> Option<(Destination, InUse<'a>)> {
        let mut eps = self.endpoints.lock().expect("poisoned");
        let now = Instant::now();
        let open: Vec<&Destination> = candidates.iter().filter(|d| !exclude.contains(&d.addr())).collect();
        if open.is_empty() {
            return None;
        }
        let healthy: Vec<&Destination> = open
            .iter()
            .copied()
            .filter(|d| eps.get(&d.addr()).and_then(|e| e.ejected_until).is_none_or(|t| t <= now))
            .collect();
        let pool = if healthy.is_empty() { open } else { healthy };
        let chosen = if pool.len() == 1 {
            pool[0]
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

    pub fn success(&self, addr: SocketAddr) {
        if let Some(e) = self.endpoints.lock().expect("poisoned").get_mut(&addr) {
            e.consecutive_failures = 0;
            e.ejections = 0;
            e.ejected_until = None;
        }
    }

    /// A connection to `addr` failed: eject it for a growing interval.
    pub fn failure(&self, addr: SocketAddr) {
        let mut eps = self.endpoints.lock().expect("poisoned");
        let e = eps.entry(addr).or_default();
        e.consecutive_failures += 1;
        e.total_failures += 1;
        let ejection = BASE_EJECTION.saturating_mul(1 << e.ejections.min(4)).min(MAX_EJECTION);
        e.ejections += 1;
        e.ejected_until = Some(Instant::now() + ejection);
        tracing::info!(endpoint = %addr, ?ejection, "endpoint ejected after a connection failure");
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
                        ejected: e.ejected_until.is_some_and(|t| t > now),
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(port: u16) -> Destination {
        Destination::Passthrough(SocketAddr::from(([198, 51, 100, 1], port)))
    }

    #[test]
    fn least_loaded_wins_and_ejected_endpoints_are_skipped() {
        let b = Balancer::default();
        let c = [d(1), d(2)];
        let (first, _held) = b.pick(&c, &[]).unwrap();
        // With one endpoint busy, the other is always chosen.
        for _ in 0..20 {
            let (next, _g) = b.pick(&c, &[]).unwrap();
            assert_ne!(next, first);
        }
        b.failure(d(2).addr());
        for _ in 0..20 {
            assert_eq!(b.pick(&c, &[]).unwrap().0, d(1));
        }
        // Never ejecting all: with both ejected, both are still tried.
        b.failure(d(1).addr());
        assert!(b.pick(&c, &[]).is_some());
        assert!(b.pick(&c, &[d(1).addr(), d(2).addr()]).is_none());
        b.success(d(2).addr());
        assert_eq!(b.pick(&c, &[]).unwrap().0, d(2));
    }
}
