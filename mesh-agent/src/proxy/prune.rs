//! Forgetting what has left the mesh: every table the proxy keeps per
//! endpoint, service or workload is pruned against the current mesh state
//! by the proxy's 1 s reaper, so churn (pods, endpoints, services coming
//! and going) leaves the agent's memory where it was.
//!
//! | table | key | pruned |
//! |---|---|---|
//! | balancer | endpoint address | not a pod's address on a service target port, and no connection on it |
//! | services (circuit breaker, `/status`) | `namespace/name` | service gone, and no request holds it |
//! | HTTP client pool | source pod, endpoint | source pod or endpoint gone (and idle for [`super::pool::IDLE_TIMEOUT`] anyway) |
//! | tunnel pool, app connections | ... | idle or closed (their own reapers) |
//! | policy, route and series caches | the snapshot | replaced with the snapshot |
//! | metric series | Istio labels | a party gone from the state (no pod with its workload, canonical service and revision, version), or a bare address, and unchanged for [`SERIES_IDLE`] |
//!
//! Workload certificates and per-pod counters go when the pod is
//! unenrolled (`enroll`).

use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::Proxy;
use crate::{metrics::Labels, state::MeshState};

/// How long a metric series of something gone from the mesh (or of a bare
/// address) stays exported after its last change: long enough for any
/// scrape interval to see its final value.
pub const SERIES_IDLE: Duration = Duration::from_secs(300);

/// What of the mesh state the proxy's tables may name.
struct Live<'a> {
    state: &'a MeshState,
    target_ports: HashSet<u16>,
    services: HashSet<(&'a str, &'a str)>,
    /// `(namespace, workload, canonical service, canonical revision,
    /// version)` of each pod, as metrics name them: a series whose labels
    /// no pod has any more (a new `version` rolled out) is pruned too.
    workloads: HashSet<(&'a str, &'a str, &'a str, &'a str, &'a str)>,
}

impl<'a> Live<'a> {
    fn new(state: &'a MeshState) -> Self {
        Self {
            state,
            target_ports: state.services.iter().flat_map(|s| s.ports.iter().map(|p| p.target_port)).collect(),
            services: state.services.iter().map(|s| (s.namespace.as_str(), s.name.as_str())).collect(),
            workloads: state
                .pods
                .values()
                .map(|p| {
                    let w = super::observe::WorkloadLabels::of(p);
                    (p.key.namespace.as_str(), w.workload, w.canonical_service, w.canonical_revision, w.version)
                })
                .collect(),
        }
    }

    /// A service endpoint of the state: a pod's address on a target port.
    fn endpoint(&self, addr: SocketAddr) -> bool {
        self.target_ports.contains(&addr.port()) && self.state.pod_by_ip(addr.ip().to_canonical()).is_some()
    }

    fn workload(&self, namespace: &str, workload: &str, service: &str, revision: &str, version: &str) -> bool {
        workload == "unknown" || self.workloads.contains(&(namespace, workload, service, revision, version))
    }

    /// Every party the series names is in the state (a service, not an
    /// address, as its destination).
    fn series(&self, l: &Labels) -> bool {
        self.workload(
            &l.source_workload_namespace,
            &l.source_workload,
            &l.source_canonical_service,
            &l.source_canonical_revision,
            &l.source_version,
        ) && self.workload(
            &l.destination_workload_namespace,
            &l.destination_workload,
            &l.destination_canonical_service,
            &l.destination_canonical_revision,
            &l.destination_version,
        )
            && self
                .services
                .contains(&(l.destination_service_namespace.as_str(), l.destination_service_name.as_str()))
    }
}

/// How many entries each pruned table holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableSizes {
    pub endpoints: usize,
    pub services: usize,
    pub http_clients: (usize, usize),
    pub app_connections: (usize, usize),
    pub tunnel_pool: (usize, usize),
    pub metric_series: usize,
}

impl Proxy {
    /// One pass of the reaper over the tables it prunes.
    pub(super) fn prune(&self) {
        self.prune_at(SERIES_IDLE, Instant::now());
    }

    pub(super) fn prune_at(&self, series_idle: Duration, now: Instant) {
        let snapshot = self.inputs.state.borrow().clone();
        let live = Live::new(&snapshot);
        let endpoints = self.outbound.balancer.retain(|a| live.endpoint(a));
        // An Istio port or subset override counts apart under `name:port/subset`
        // (a service name has neither character).
        let services = self.outbound.services.retain(|ns, name| live.services.contains(&(ns, name.split([':', '/']).next().unwrap_or(name))));
        self.outbound.http_clients.retain(|src, a| snapshot.pods.contains_key(src) && live.endpoint(a));
        let series = self.inputs.telemetry.metrics.prune(|l| live.series(l), series_idle, now);
        if endpoints + services + series > 0 {
            tracing::debug!(endpoints, services, series, "forgot what left the mesh");
        }
    }

    /// Entries of the tables pruned against the mesh state.
    pub fn table_sizes(&self) -> TableSizes {
        TableSizes {
            endpoints: self.outbound.balancer.entries(),
            services: self.outbound.services.entries(),
            http_clients: self.outbound.http_clients.entries(),
            app_connections: self.inbound.app_connections.entries(),
            tunnel_pool: self.outbound.pool.entries(),
            metric_series: self.inputs.telemetry.metrics.series_count(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
