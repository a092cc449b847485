//! Outbound: a pod's redirected connection, relayed to where it was going.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{
    balance::{Outcome, l4_outlier_detection},
    CONNECTION_WINDOW, FRAME_SIZE, PodHandle, Proxy, STREAM_WINDOW, connect_from, count_peer,
    pool::{PoolKey, StreamSlot},
};
use crate::{identity::SpiffeId, state::Destination};

/// Endpoints a connection to a service may try before failing.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The way to one destination: a tunnel stream or a direct connection.
pub(super) enum Upstream {
    Tunnel(TokioIo<hyper::upgrade::Upgraded>, StreamSlot),
    Direct(TcpStream),
}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_read(cx, buf),
            Upstream::Direct(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_write(cx, buf),
            Upstream::Direct(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_flush(cx),
            Upstream::Direct(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_shutdown(cx),
            Upstream::Direct(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Direct(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Tunnel(s, _) => s.is_write_vectored(),
            Upstream::Direct(s) => s.is_write_vectored(),
        }
    }
}

/// Where a redirected connection was going (the eBPF original-destination
/// map in production; a table in tests).
pub trait OrigDstLookup: Send + Sync {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr>;
}

impl Proxy {
    pub(super) async fn outbound(self: Arc<Self>, mut app: TcpStream, peer: SocketAddr, pod: Arc<PodHandle>) {
        let stats = &pod.stats;
        let Some(orig) = self.orig_dst.take(peer) else {
            // Someone connected to the listener directly: there is nowhere
            // to send it.
            tracing::warn!(%peer, "connection on the outbound port was not redirected by the mesh; closing it");
            stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        stats.outbound.fetch_add(1, Ordering::Relaxed);
        let (candidates, trust_domain, http) = {
            let state = self.state.borrow();
            let http = state.service_target(orig).and_then(|t| t.port.http_version().filter(|_| !t.endpoints.is_empty()));
            (state.resolve_all(orig), state.trust_domain.clone(), http)
        };
        // A service port declared HTTP: routed, balanced and retried per
        // request by the HTTP layer.
        if let Some(version) = http {
            return self.serve_http_outbound(app, pod, orig, version).await;
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
            match self.establish(pod, &dest, &trust_domain).await {
                Ok(mut upstream) => {
                    if is_service {
                        self.balancer.report(dest.addr(), Outcome::Success, l4_outlier_detection(), &candidates);
                    }
                    let labels = {
                        let snapshot = self.state.borrow().clone();
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
                    self.telemetry.metrics.tcp_opened(&labels);
                    let opened = std::time::Instant::now();
                    let mut span = self.telemetry.tracer.start_span(crate::telemetry::trace::SpanKind::Client, "tcp outbound", None);
                    if span.is_recording() {
                        span.set_attribute(crate::telemetry::trace::attr::MESH_SOURCE_WORKLOAD, pod.key.to_string());
                        span.set_attribute(crate::telemetry::trace::attr::NETWORK_PEER_ADDRESS, dest.addr().to_string());
                    }
                    let mut counted = super::observe::Counted::new(&mut app);
                    let result = match &mut upstream {
                        Upstream::Tunnel(up, _slot) => super::relay::copy_bidirectional(&mut counted, up).await,
                        Upstream::Direct(up) => super::relay::copy_bidirectional(&mut counted, up).await,
                    };
                    let (received, sent) = counted.totals();
                    self.telemetry.tcp_done(&labels, opened.elapsed(), sent, received, dest.addr());
                    span.end();
                    match result {
                        Ok(_) => tracing::debug!(%orig, to = %dest.addr(), "outbound connection closed"),
                        Err(e) => tracing::debug!(%orig, to = %dest.addr(), error = %e, "outbound connection ended with an error"),
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

    /// Opens the way to one destination: an mTLS tunnel stream for a mesh
    /// pod, a direct connection otherwise (both from the source pod's netns).
    pub(super) async fn establish(&self, pod: &PodHandle, dest: &Destination, trust_domain: &str) -> std::io::Result<Upstream> {
        let stats = &pod.stats;
        match dest {
            Destination::MeshPod { pod: dst_pod, addr } => {
                let dst_id = {
                    let state = self.state.borrow();
                    let p = state.pods.get(dst_pod).ok_or_else(|| std::io::Error::other(format!("destination {dst_pod} is gone")))?;
                    SpiffeId::new(trust_domain, &p.key.namespace, &p.service_account)
                        .map_err(|e| std::io::Error::other(format!("destination {dst_pod} has no valid identity: {e}")))?
                };
                let tunnel = SocketAddr::new(addr.ip(), self.ports.tunnel);
                tracing::debug!(dst = %dst_pod, %tunnel, %dst_id, "outbound via mTLS tunnel");
                let (upgraded, slot) = self.open_stream(pod, tunnel, dst_id.clone(), *addr).await?;
                stats.outbound_tunneled.fetch_add(1, Ordering::Relaxed);
                count_peer(&stats.outbound_peers, &dst_id);
                Ok(Upstream::Tunnel(TokioIo::new(upgraded), slot))
            }
            Destination::Passthrough(addr) => {
                tracing::debug!(dst = %addr, "outbound direct (destination not in the mesh)");
                let up = connect_from(&pod.netns, *addr).await?;
                stats.outbound_direct.fetch_add(1, Ordering::Relaxed);
                Ok(Upstream::Direct(up))
            }
        }
    }

    /// One CONNECT stream to the destination pod's tunnel listener, on a
    /// pooled mTLS connection when one has room, else on a new one opened
    /// from the source pod's namespace with the source workload's
    /// certificate, verifying the destination workload's identity.
    async fn open_stream(
        &self,
        pod: &PodHandle,
        tunnel: SocketAddr,
        dst_id: SpiffeId,
        target: SocketAddr,
    ) -> std::io::Result<(hyper::upgrade::Upgraded, StreamSlot)> {
        let key = PoolKey { src: pod.key.clone(), dst: dst_id.clone(), tunnel };
        let req = || {
            http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(target.to_string())
                .body(Empty::<Bytes>::new())
                .map_err(std::io::Error::other)
        };
        // A pooled connection the destination agent is draining (GOAWAY, or
        // gone) fails the stream before it is processed: open it again on a
        // new connection, which reaches the agent serving now.
        let pooled = self.pool.checkout(&key);
        let (sender, slot, res) = match pooled {
            Some((mut sender, slot)) => match sender.send_request(req()?).await {
                Ok(res) => (sender, slot, res),
                Err(e) => {
                    tracing::debug!(%tunnel, error = %e, "pooled tunnel connection refused the stream; opening a new one");
                    drop(slot);
                    let (mut sender, slot) = self.new_tunnel(pod, &key, tunnel, &dst_id, true).await?;
                    let res = sender.send_request(req()?).await.map_err(std::io::Error::other)?;
                    (sender, slot, res)
                }
            },
            None => {
                let (mut sender, slot) = self.checkout_or_connect(pod, &key, tunnel, &dst_id).await?;
                let res = sender.send_request(req()?).await.map_err(std::io::Error::other)?;
                (sender, slot, res)
            }
        };
        drop(sender);
        if res.status() != http::StatusCode::OK {
            let reason = res
                .headers()
                .get(super::tunnel::REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("tunnel to {tunnel} refused {target}: {} {reason}", res.status()),
            ));
        }
        let upgraded = hyper::upgrade::on(res).await.map_err(std::io::Error::other)?;
        Ok((upgraded, slot))
    }

    /// A pooled connection with room, or a new one (one connect at a time
    /// per key).
    async fn checkout_or_connect(
        &self,
        pod: &PodHandle,
        key: &PoolKey,
        tunnel: SocketAddr,
        dst_id: &SpiffeId,
    ) -> std::io::Result<(hyper::client::conn::http2::SendRequest<Empty<Bytes>>, StreamSlot)> {
        if let Some(c) = self.pool.checkout(key) {
            return Ok(c);
        }
        self.new_tunnel(pod, key, tunnel, dst_id, false).await
    }

    async fn new_tunnel(
        &self,
        pod: &PodHandle,
        key: &PoolKey,
        tunnel: SocketAddr,
        dst_id: &SpiffeId,
        fresh: bool,
    ) -> std::io::Result<(hyper::client::conn::http2::SendRequest<Empty<Bytes>>, StreamSlot)> {
        let lock = self.pool.connect_lock(key);
        let _connecting = lock.lock().await;
        // Someone else may have connected while we waited (not after a
        // pooled connection failed: that one may still look usable).
        if !fresh && let Some(c) = self.pool.checkout(key) {
            return Ok(c);
        }
        let sender = self.connect_tunnel(pod, tunnel, dst_id).await?;
        Ok(self.pool.add(key.clone(), sender))
    }

    async fn connect_tunnel(
        &self,
        pod: &PodHandle,
        tunnel: SocketAddr,
        dst_id: &SpiffeId,
    ) -> std::io::Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>> {
        let cert = pod.cert.borrow().clone().ok_or_else(|| {
            std::io::Error::other(format!(
                "pod {} has no workload certificate yet: is the CA reachable? (see /status)",
                pod.key
            ))
        })?;
        let config = crate::tls::client_config(&cert, dst_id, self.tls_stats.clone()).map_err(std::io::Error::other)?;
        let tcp = connect_from(&pod.netns, tunnel).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("tunnel to {tunnel} failed: {e}: is the destination node running the agent?"),
            )
        })?;
        let (tls, server_id) = crate::tls::connect(config, tcp)
            .await
            .map_err(|e| std::io::Error::other(format!("mTLS to {tunnel} ({dst_id}) failed: {e}")))?;
        tracing::debug!(%tunnel, server = %server_id, client = %cert.id, "mTLS tunnel connection established");
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(FRAME_SIZE)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "tunnel connection ended");
            }
        });
        Ok(sender)
    }
}
