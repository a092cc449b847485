//! mesh-agent: the node agent of a sidecarless mesh.
//!
//! | module | job |
//! | --- | --- |
//! | [`config`] | the agent's own settings, validated |
//! | [`state`] | the in-memory mesh state (pure), with the route and authorization schemas: the bottom layer |
//! | [`objects`] | Kubernetes-shaped objects (Istio's security kinds) into `state`, for both sources |
//! | [`localfile`] | the YAML source that writes `state` |
//! | [`k8s`] | the Kubernetes source that writes `state`: CRDs, watchers (the only kube user) |
//! | [`spiffe`] | SPIFFE IDs: `spiffe://<td>/ns/<ns>/sa/<sa>`, strictly parsed |
//! | [`identity`] | certificates: the CA's rules, CA clients, workload certificates |
//! | [`ca`] | the CA process, `mesh-agent ca` (gRPC + TLS, node tokens) |
//! | [`tls`] | rustls configs for the tunnel, SPIFFE verifiers |
//! | [`ebpf`] | load and attach programs, maps (the only aya user) |
//! | [`host`] | facts discovered on the node (cgroup v2 mount, own cgroup) |
//! | [`fdlimit`] | the open-files limit, running out of descriptors, the admin's spare |
//! | [`memory`] | freed memory returned to the kernel after a connection storm |
//! | [`netns`] | sockets inside pods' network namespaces |
//! | [`proxy`] | in-pod listeners, tunnel, relays |
//! | [`policy`] | authorization: path normalization, pure policy evaluation |
//! | [`route`] | HTTP routing: validation, pure route selection (the schema is [`state::route`]) |
//! | [`enroll`] | keeps kernel and listeners in line with `state`; the kernel behind [`enroll::Kernel`] (eBPF on a node) |
//! | [`lifecycle`] | the node lock, `mesh-agent uninstall` |
//! | [`access_log`] | one JSON line per request and connection, never blocking |
//! | [`logging`] | the agent's log filter, changeable at run time |
//! | [`metrics`] | Prometheus metrics (Istio's names), health collector |
//! | [`telemetry`] | distributed tracing (OTLP/gRPC) |
//! | [`admin`] | `/healthz`, `/ready`, `/status`, `/metrics`, `/config_dump`, `/logging` |
//! | [`status_view`] | `/status` as the tables of `mesh-agent status` (one node, all nodes) |
//! | [`app`] | wiring: [`app::build`] returns the agent bound ([`app::Bound`]: addresses, readiness, shutdown); [`app::run`]: runtimes, signals |
//! | `testing` | (feature `testing`; unit tests) in-process proxies and whole agents: pods on loopback, the kernel in memory |

pub mod access_log;
pub mod admin;
pub mod app;
pub mod ca;
pub mod config;
pub mod ebpf;
pub mod enroll;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod fdlimit;
pub mod host;
pub mod identity;
pub mod k8s;
pub mod lifecycle;
pub mod localfile;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod objects;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod spiffe;
pub mod state;
pub mod status_view;
pub mod telemetry;
pub mod tls;
// In the crate's own unit tests too: they share the in-memory kernel and
// the loopback mesh with the integration tests.
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod layering;

/// An error and its sources on one line, for logs and status.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}
