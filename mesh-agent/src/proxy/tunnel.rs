//! Inbound tunnel: HTTP/2 CONNECT streams from agents, delivered to the pod.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{CONNECTION_WINDOW, FRAME_SIZE, Inbound, PodHandle, STREAM_WINDOW, authz::L4Verdict, count_peer};
use crate::identity::SpiffeId;

/// Response header saying why a CONNECT was refused, for the other agent's log.
pub const REASON_HEADER: &str = "x-mesh-refusal";

impl Inbound {
    /// Serves one mTLS tunnel connection from an agent: each CONNECT
    /// stream on it is authorized and delivered to the pod.
    pub(super) async fn tunnel(
        self: Arc<Self>,
        stream: TcpStream,
        client: SocketAddr,
        pod: Arc<PodHandle>,
        tls: Arc<rustls::ServerConfig>,
    ) {
        // Mutual TLS first: the client must present a workload certificate
        // of our trust domain. Garbage, plaintext and certificate-less
        // clients end here, logged and counted.
        let (stream, client_id) = match crate::tls::accept(tls, stream, &self.inputs.tls_stats).await {
            Ok(s) => s,
            Err(e) => {
                pod.stats.inbound_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%client, pod = %pod.key, error = %e, "tunnel connection refused: mTLS handshake failed");
                return;
            }
        };
        tracing::debug!(%client, peer = %client_id, server = %pod.id, "mTLS tunnel connection accepted");
        let client_id = Arc::new(client_id);
        let this = self.clone();
        let svc_pod = pod.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let pod = svc_pod.clone();
            let client_id = client_id.clone();
            async move { Ok::<_, std::convert::Infallible>(this.connect_stream(req, client, pod, &client_id).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(FRAME_SIZE)
            .serve_connection(TokioIo::new(stream), service);
        // Draining: GOAWAY, so the source agent opens its next streams to
        // the agent that serves next; open streams carry on.
        let result = super::until_drained(conn, &self.inputs.draining, |c| c.graceful_shutdown()).await;
        if let Err(e) = result {
            // Not HTTP/2 inside the TLS session.
            pod.stats.inbound_refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%client, error = %e, "tunnel connection rejected: not HTTP/2 CONNECT");
        }
    }

    async fn connect_stream(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
        pod: Arc<PodHandle>,
        client_id: &SpiffeId,
    ) -> Response<Empty<Bytes>> {
        let refuse = |status: StatusCode, reason: String| {
            pod.stats.inbound_refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%client, pod = %pod.key, %status, %reason, "tunnel stream refused");
            let mut res = Response::new(Empty::new());
            *res.status_mut() = status;
            if let Ok(v) = http::HeaderValue::from_str(&reason) {
                res.headers_mut().insert(REASON_HEADER, v);
            }
            res
        };
        if req.method() != http::Method::CONNECT {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not CONNECT", req.method()));
        }
        let Some(target) = req
            .uri()
            .authority()
            .and_then(|a| connect_target(a.as_str()))
        else {
            return refuse(StatusCode::BAD_REQUEST, format!("authority {:?} is not an IP:port", req.uri().authority().map(|a| a.as_str())));
        };
        // The agent's own ports are never a destination.
        if mesh_common::AGENT_PORTS.contains(&target.port()) {
            return refuse(StatusCode::BAD_REQUEST, format!("{target} is a port of the mesh agent, not of the application"));
        }
        // The listener is inside this pod: it only delivers to this pod.
        if !pod.ips.contains(&target.ip().to_canonical()) {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                format!("{target} is not an address of pod {}", pod.key),
            );
        }
        let app_http = self.inputs.state.borrow().app_http(&pod.key, target.port());
        let peer = crate::policy::Peer::new(client_id);
        // HTTP ports are authorized per request instead (a DENY on a path
        // must not refuse the whole connection).
        let mut detect = false;
        if app_http.is_none() {
            match self.check_l4(&pod, Some(&peer), client, target) {
                L4Verdict::Allow => {}
                L4Verdict::Deny(reason) => {
                    let mut res = Response::new(Empty::new());
                    *res.status_mut() = StatusCode::FORBIDDEN;
                    if let Ok(v) = http::HeaderValue::from_str(&reason.to_string()) {
                        res.headers_mut().insert(REASON_HEADER, v);
                    }
                    return res;
                }
                L4Verdict::DependsOnHttp => detect = true,
            }
        }
        // HTTP, declared or to be detected: served per request on the
        // stream once it is upgraded.
        if detect || app_http.is_some() {
            pod.stats.inbound.fetch_add(1, Ordering::Relaxed);
            count_peer(&pod.stats.inbound_peers, client_id);
            let this = self.clone();
            let client_id = client_id.clone();
            self.inputs.connections.spawn(async move {
                let upgraded = match hyper::upgrade::on(req).await {
                    Ok(u) => TokioIo::new(u),
                    Err(e) => return tracing::info!(%target, error = %e, "tunnel stream upgrade failed"),
                };
                if let Some(app) = app_http {
                    return this.serve_http(upgraded, pod, client, Some(client_id), target, app).await;
                }
                let (http, io) = super::sniff::detect(upgraded, super::DETECT_TIMEOUT).await;
                match http {
                    Some(app) => this.serve_http(io, pod, client, Some(client_id), target, app).await,
                    None => {
                        let peer = crate::policy::Peer::new(&client_id);
                        let _ = this.authorize_connection(&pod, Some(&peer), client, target);
                    }
                }
            });
            return Response::new(Empty::new());
        }
        let (app, slot) = match self.connect_app(&pod, target).await {
            Ok(s) => s,
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("connect to {target} failed: {e}")),
        };
        pod.stats.inbound.fetch_add(1, Ordering::Relaxed);
        count_peer(&pod.stats.inbound_peers, client_id);
        tracing::debug!(%client, %target, peer = %client_id, "tunnel stream delivered");
        let labels = {
            let snapshot = self.inputs.state.borrow().clone();
            super::observe::Parties {
                state: &snapshot,
                reporter: "destination",
                src_pod: None,
                src_ip: Some(client.ip().to_canonical()),
                src_id: Some(client_id),
                dst_pod: Some(&pod.key),
                dst_addr: Some(target),
                service: None,
                mtls: true,
            }
            .labels("tcp")
        };
        let telemetry = self.inputs.telemetry.clone();
        let labels = telemetry.metrics.tcp_opened(labels);
        let opened = std::time::Instant::now();
        let mut span = telemetry.tracer.start_span(crate::telemetry::trace::SpanKind::Server, "tcp inbound", None);
        if span.is_recording() {
            span.set_attribute(crate::telemetry::trace::attr::MESH_PEER_PRINCIPAL, client_id.to_string());
            span.set_attribute(crate::telemetry::trace::attr::MESH_DESTINATION_WORKLOAD, pod.key.to_string());
        }
        self.inputs.connections.spawn(async move {
            let mut app = app;
            let _slot = slot;
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let mut upgraded = super::observe::Counted::new(TokioIo::new(upgraded));
                    if let Err(e) = super::relay::copy_bidirectional(&mut upgraded, &mut app).await {
                        tracing::debug!(%target, error = %e, "tunnel stream ended with an error");
                    }
                    let (received, sent) = upgraded.totals();
                    telemetry.tcp_done(&labels, opened.elapsed(), sent, received, target);
                    span.end();
                }
                Err(e) => tracing::info!(%target, error = %e, "tunnel stream upgrade failed"),
            }
        });
        Response::new(Empty::new())
    }
}

/// The destination a CONNECT stream's `:authority` names: an IP:port,
/// nothing else (no names, no userinfo).
pub(super) fn connect_target(authority: &str) -> Option<SocketAddr> {
    authority.parse::<SocketAddr>().ok()
}
