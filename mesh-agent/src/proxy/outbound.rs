//! Outbound: a pod's redirected connection, relayed to where it was going.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::net::TcpStream;

use super::{
    Outbound, PodHandle,
    balance::{Outcome, l4_outlier_detection},
    connect::Upstream,
};
use crate::state::Destination;

/// Endpoints a connection to a service may try before failing.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Where a redirected connection was going (the eBPF original-destination
/// map in production; a table in tests).
pub trait OrigDstLookup: Send + Sync {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr>;
}

impl Outbound {
    /// Serves one connection a local pod opened: HTTP per request when the
    /// service port is declared HTTP, else relayed as bytes.
    pub(super) async fn serve(self: Arc<Self>, mut app: TcpStream, client: SocketAddr, pod: Arc<PodHandle>) {
        let stats = &pod.stats;
        let Some(orig) = self.inputs.orig_dst.take(client) else {
            // Someone connected to the listener directly: there is nowhere
            // to send it.
            tracing::warn!(%client, "connection on the outbound port was not redirected by the mesh; closing it");
            stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        stats.outbound.fetch_add(1, Ordering::Relaxed);
        let (candidates, trust_domain, http) = {
            let state = self.inputs.state.borrow();
            let http = state.service_target(orig).and_then(|t| t.port.http_version().filter(|_| !t.endpoints.is_empty()));
            (state.resolve_all(orig), state.trust_domain.clone(), http)
        };
        // A service port declared HTTP: routed, balanced and retried per
        // request by the HTTP layer.
        // Boxed, here and around `establish`: this future lives as long as
        // the connection, and what only one phase or path needs (the HTTP
        // server, the handshakes) would otherwise be carried all along.
        if let Some(version) = http {
            return Box::pin(self.serve_http(app, pod, orig, version)).await;
        }
        let pod = &*pod;
        let is_service = candidates.len() > 1;
        let mut tried = Vec::new();
        let mut last_err = None;
        // A service gets up to three endpoints before the client sees a
        // failure; a pod or plain address gets one try.
        while tried.len() < MAX_CONNECT_ATTEMPTS {
            // Only service endpoints are balanced (and remembered): a single
            // destination needs no choice, and remembering every address a
            // pod ever dials would grow without bound.
            let (dest, _in_use) = if is_service {
                let Some(picked) = self.balancer.pick(&candidates, &tried, None) else { break };
                (picked.0, Some(picked.1))
            } else if tried.is_empty() {
                (candidates[0].clone(), None)
            } else {
                break;
            };
            tried.push(dest.addr());
            match Box::pin(self.establish(pod, &dest, &trust_domain)).await {
                Ok(mut upstream) => {
                    if is_service {
                        self.balancer.report(dest.addr(), Outcome::Success, l4_outlier_detection(), &candidates);
                    }
                    let labels = {
                        let snapshot = self.inputs.state.borrow().clone();
                        let (dst_pod, mtls) = match &dest {
                            Destination::MeshPod { pod, .. } => (Some(pod), true),
                            Destination::Passthrough(_) => (None, false),
                        };
                        let service = snapshot.service_target(orig).map(|t| (t.service.namespace.clone(), t.service.name.clone()));
                        super::observe::Parties {
                            state: &snapshot,
                            reporter: "source",
                            src_pod: Some(&pod.key),
                            src_ip: None,
                            src_id: None,
                            dst_pod,
                            dst_addr: Some(dest.addr()),
                            service: service.as_ref().map(|(ns, n)| (ns.as_str(), n.as_str())),
                            mtls,
                        }
                        .labels("tcp")
                    };
                    let labels = self.inputs.telemetry.metrics.tcp_opened(labels);
                    let opened = std::time::Instant::now();
                    let mut span = self.inputs.telemetry.tracer.start_span(crate::telemetry::trace::SpanKind::Client, "tcp outbound", None);
                    if span.is_recording() {
                        span.set_attribute(crate::telemetry::trace::attr::MESH_SOURCE_WORKLOAD, pod.key.to_string());
                        span.set_attribute(crate::telemetry::trace::attr::NETWORK_PEER_ADDRESS, dest.addr().to_string());
                    }
                    // What only the choice needed is not kept for the
                    // connection's life.
                    let to = dest.addr();
                    drop((candidates, tried, dest));
                    let mut counted = super::observe::Counted::new(&mut app);
                    let result = match &mut upstream {
                        Upstream::Tunnel(up, _slot) => super::relay::copy_bidirectional(&mut counted, up).await,
                        Upstream::Direct(up) => super::relay::copy_bidirectional(&mut counted, up).await,
                    };
                    let (received, sent) = counted.totals();
                    self.inputs.telemetry.tcp_done(&labels, opened.elapsed(), sent, received, to);
                    span.end();
                    match result {
                        Ok(_) => tracing::debug!(%orig, %to, "outbound connection closed"),
                        Err(e) => tracing::debug!(%orig, %to, error = %e, "outbound connection ended with an error"),
                    }
                    return;
                }
                Err(e) => {
                    tracing::info!(%orig, to = %dest.addr(), error = %e, "outbound connection failed");
                    if is_service {
                        self.balancer.report(dest.addr(), Outcome::ConnectFailure, l4_outlier_detection(), &candidates);
                    }
                    last_err = Some(e);
                }
            }
        }
        stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%orig, error = ?last_err.map(|e| e.to_string()), tried = tried.len(), "outbound connection gave up");
    }
}
