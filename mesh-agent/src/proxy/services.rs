//! Per-service state of the source-side HTTP layer: the circuit breaker's
//! gauges (requests, pending requests, upstream connections, retries in
//! flight) and the counters `/status` reports, per service and per agent.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use serde::Serialize;
use tokio::sync::Notify;

/// `namespace/name` of a service.
pub type ServiceName = String;

#[derive(Default)]
pub struct ServiceState {
    /// Requests admitted and not finished.
    pub active: AtomicU32,
    /// Requests waiting for an upstream connection.
    pub pending: AtomicU32,
    /// Upstream HTTP connections open.
    pub connections: AtomicU32,
    pub retries_in_flight: AtomicU32,
    /// Round-robin position.
    pub cursor: AtomicU64,
    /// Woken when an upstream connection becomes idle or closes.
    pub connection_freed: Notify,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub timeouts: AtomicU64,
    pub ejections: AtomicU64,
    pub no_endpoint: AtomicU64,
    /// Requests refused by the circuit breaker, by the limit that refused.
    pub overflow_requests: AtomicU64,
    pub overflow_pending: AtomicU64,
}

/// A slot in one of the gauges, released when dropped.
pub struct Gauge<'a>(&'a AtomicU32);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes a slot in `gauge` unless it is at `max` already.
pub fn acquire(gauge: &AtomicU32, max: u32) -> Option<Gauge<'_>> {
    // Lazily: a `Gauge` made and dropped on refusal would release a slot.
    take(gauge, max).then(|| Gauge(gauge))
}

fn take(gauge: &AtomicU32, max: u32) -> bool {
    gauge.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
}

/// A request the circuit breaker admitted: its slot in the service's
/// `active`, owned so that it travels with the request's future.
pub struct Admitted(Arc<ServiceState>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Admits a request unless `max` requests of the service are active.
pub fn admit(svc: &Arc<ServiceState>, max: u32) -> Option<Admitted> {
    take(&svc.active, max).then(|| Admitted(svc.clone()))
}

/// Takes a slot whatever the count (gauges that only report).
pub fn enter(gauge: &AtomicU32) -> Gauge<'_> {
    gauge.fetch_add(1, Ordering::AcqRel);
    Gauge(gauge)
}

#[derive(Default)]
pub struct Services {
    by_name: Mutex<HashMap<ServiceName, Arc<ServiceState>>>,
}

impl Services {
    pub fn get(&self, namespace: &str, name: &str) -> Arc<ServiceState> {
        let key = format!("{namespace}/{name}");
        let mut map = self.by_name.lock().expect("poisoned");
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        map.entry(key).or_default().clone()
    }

    /// Forgets services `keep` no longer names (gone from the mesh state),
    /// except those a request still holds. Returns how many were forgotten.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) -> usize {
        let mut map = self.by_name.lock().expect("poisoned");
        let before = map.len();
        map.retain(|k, s| {
            let (ns, name) = k.split_once('/').unwrap_or(("", k));
            Arc::strong_count(s) > 1 || keep(ns, name)
        });
        before - map.len()
    }

    pub fn entries(&self) -> usize {
        self.by_name.lock().expect("poisoned").len()
    }

    pub fn view(&self) -> BTreeMap<ServiceName, ServiceView> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let g = |c: &AtomicU32| c.load(Ordering::Relaxed);
        self.by_name
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    ServiceView {
                        active: g(&s.active),
                        pending: g(&s.pending),
                        connections: g(&s.connections),
                        requests: l(&s.requests),
                        retries: l(&s.retries),
                        timeouts: l(&s.timeouts),
                        ejections: l(&s.ejections),
                        no_endpoint: l(&s.no_endpoint),
                        overflow_requests: l(&s.overflow_requests),
                        overflow_pending: l(&s.overflow_pending),
                    },
                )
            })
            .collect()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    active: u32,
    pending: u32,
    connections: u32,
    requests: u64,
    retries: u64,
    timeouts: u64,
    ejections: u64,
    no_endpoint: u64,
    overflow_requests: u64,
    overflow_pending: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_refuse_past_the_limit_and_free_on_drop() {
        let g = AtomicU32::new(0);
        let a = acquire(&g, 2).unwrap();
        let _b = acquire(&g, 2).unwrap();
        assert!(acquire(&g, 2).is_none());
        drop(a);
        assert!(acquire(&g, 2).is_some());
        assert_eq!(g.load(Ordering::Relaxed), 1);
        let _e = enter(&g);
        assert_eq!(g.load(Ordering::Relaxed), 2);
    }
}
