//! The agent as the admin endpoints show it: readiness, `/status`,
//! `/metrics`, `/config_dump`.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::{
    admin::AdminSource,
    enroll::{Enrollment, Kernel},
    localfile::ReloadStats,
    metrics::Metrics,
    proxy::Proxy,
    state::Snapshot,
};

/// What the admin endpoints show, from the parts [`super::build`] made.
pub(super) struct Admin<K: Kernel> {
    pub(super) node: String,
    pub(super) enrollment: Arc<Mutex<Enrollment<K>>>,
    pub(super) reloads: Arc<ReloadStats>,
    pub(super) proxy: Arc<Proxy>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) state: watch::Receiver<Snapshot>,
    /// With `--source kube`: the watchers' state.
    pub(super) kube: Option<Arc<crate::k8s::Stats>>,
}

impl<K: Kernel> AdminSource for Admin<K> {
    fn ready(&self) -> bool {
        // With Kubernetes, not before the first state built from the API.
        self.kube.as_ref().is_none_or(|k| k.view().built) && self.enrollment.lock().expect("poisoned").ready()
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn config_dump(&self) -> serde_json::Value {
        let state = self.state.borrow().clone();
        // Pods are keyed by a struct in the state: listed here instead.
        let value = |v: Result<serde_json::Value, serde_json::Error>| v.unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}));
        serde_json::json!({
            "node": self.node,
            "config": self.reloads.view(),
            "state": {
                "trustDomain": state.trust_domain,
                "nodes": state.nodes,
                "namespaces": value(serde_json::to_value(&state.namespaces)),
                "pods": value(serde_json::to_value(state.pods.values().collect::<Vec<_>>())),
                "services": value(serde_json::to_value(&state.services)),
                "peerAuthentications": value(serde_json::to_value(&state.peer_authentications)),
                "authorizationPolicies": value(serde_json::to_value(&state.authorization_policies)),
                "routes": value(serde_json::to_value(&state.routes)),
            },
            "certificates": value(serde_json::to_value(self.proxy.certs().status())),
        })
    }

    fn status(&self) -> serde_json::Value {
        let e = self.enrollment.lock().expect("poisoned");
        let (tunnels_open, tunnels_opened) = self.proxy.tunnel_connections();
        serde_json::json!({
            "node": self.node,
            "ready": e.ready(),
            "config": self.reloads.view(),
            "ebpf": {
                "loaded": true,
                "acceleration": e.acceleration().name(),
                "acceleratedSockets": e.accelerated_sockets(),
            },
            "repairs": e.repairs,
            "notReady": e.not_ready().into_iter().map(|(pod, why)| serde_json::json!({"pod": pod, "reason": why})).collect::<Vec<_>>(),
            "openConnections": self.proxy.open_connections(),
            "tunnelConnections": { "open": tunnels_open, "opened": tunnels_opened },
            "tls": self.proxy.tls_stats().view(),
            "endpoints": self.proxy.endpoints(),
            "services": self.proxy.services(),
            "tracing": self.proxy.telemetry().tracer.stats(),
            "accessLog": self.proxy.telemetry().access_log.stats(),
            "reconcileChanges": e.changes,
            "pods": e.status(),
            "kube": self.kube.as_ref().map(|k| k.view()),
        })
    }
}
