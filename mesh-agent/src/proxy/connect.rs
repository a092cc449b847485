//! Connection establishment, for every role: the way from a source pod to
//! a destination ([`Upstream`]: an mTLS tunnel stream to a mesh pod, a
//! direct TCP connection otherwise, both opened from the source pod's
//! network namespace), and the destination agent's connections to its
//! pods' applications ([`Inbound::connect_app`], within the pod's cap).
//! Failures are typed ([`ConnectError`], [`AppError`]) with what an
//! operator needs to act on them.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{
    CONNECT_TIMEOUT, CONNECTION_WINDOW, FRAME_SIZE, Inbound, Outbound, PodHandle, PodStats, STREAM_WINDOW, count_peer,
    pool::{PoolKey, StreamSlot},
};
use crate::{
    identity::{SpiffeId, SpiffeIdError},
    state::{Destination, PodKey},
};

/// Why no connection to a destination (or an app) could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Socket(#[from] super::sockets::SocketError),
    #[error("connect to {0} timed out")]
    TimedOut(SocketAddr),
    /// The kernel's answer (refused, unreachable, ...), as it gave it.
    #[error("{source}")]
    Tcp { addr: SocketAddr, source: io::Error },
    #[error("destination {0} is gone")]
    DestinationGone(PodKey),
    #[error("destination {pod} has no valid identity: {source}")]
    NoIdentity { pod: PodKey, source: SpiffeIdError },
    #[error("pod {0} has no workload certificate yet: is the CA reachable? (see /status)")]
    NoCertificate(PodKey),
    #[error("{0}")]
    TlsConfig(#[from] crate::tls::Error),
    #[error("tunnel to {tunnel} failed: {source}: is the destination node running the agent?")]
    Tunnel { tunnel: SocketAddr, source: Box<ConnectError> },
    #[error("mTLS to {tunnel} ({peer}) failed: {source}")]
    Mtls { tunnel: SocketAddr, peer: Box<SpiffeId>, source: Box<crate::tls::HandshakeError> },
    #[error("HTTP/2 on the tunnel to {tunnel}: {source}")]
    TunnelHttp { tunnel: SocketAddr, source: hyper::Error },
    #[error("CONNECT request for {target}: {source}")]
    BadTarget { target: SocketAddr, source: http::Error },
    #[error("tunnel to {tunnel} refused {target}: {status} {reason}")]
    Refused { tunnel: SocketAddr, target: SocketAddr, status: http::StatusCode, reason: String },
    /// The HTTP handshake on a new upstream connection (source side).
    #[error("{0}")]
    Handshake(hyper::Error),
}

/// Why a request or connection could not be delivered to an application
/// of a local pod.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{max} connections to pod {pod}'s applications already open (--max-app-connections)")]
    Overflow { max: u64, pod: PodKey },
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// The way to one destination: a tunnel stream or a direct connection.
pub(super) enum Upstream {
    Tunnel(TokioIo<hyper::upgrade::Upgraded>, StreamSlot),
    Direct(TcpStream),
}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_read(cx, buf),
            Upstream::Direct(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_write(cx, buf),
            Upstream::Direct(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_flush(cx),
            Upstream::Direct(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(s, _) => Pin::new(s).poll_shutdown(cx),
            Upstream::Direct(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
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

type TunnelSender = http2::SendRequest<Empty<Bytes>>;

impl Outbound {
    /// Opens the way to one destination: an mTLS tunnel stream for a mesh
    /// pod, a direct connection otherwise (both from the source pod's netns).
    pub(super) async fn establish(&self, pod: &PodHandle, dest: &Destination, trust_domain: &str) -> Result<Upstream, ConnectError> {
        let stats = &pod.stats;
        match dest {
            Destination::MeshPod { pod: dst_pod, addr } => {
                let dst_id = {
                    let state = self.inputs.state.borrow();
                    let p = state.pods.get(dst_pod).ok_or_else(|| ConnectError::DestinationGone(dst_pod.clone()))?;
                    SpiffeId::new(trust_domain, &p.key.namespace, &p.service_account)
                        .map_err(|source| ConnectError::NoIdentity { pod: dst_pod.clone(), source })?
                };
                let tunnel = SocketAddr::new(addr.ip(), self.inputs.ports.tunnel);
                tracing::debug!(dst = %dst_pod, %tunnel, %dst_id, "outbound via mTLS tunnel");
                let (upgraded, slot) = self.open_stream(pod, tunnel, dst_id.clone(), *addr).await?;
                stats.outbound_tunneled.fetch_add(1, Ordering::Relaxed);
                count_peer(&stats.outbound_peers, &dst_id);
                Ok(Upstream::Tunnel(TokioIo::new(upgraded), slot))
            }
            Destination::Passthrough(addr) => {
                tracing::debug!(dst = %addr, "outbound direct (destination not in the mesh)");
                let up = connect_from(&*pod.sockets, *addr).await?;
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
    ) -> Result<(hyper::upgrade::Upgraded, StreamSlot), ConnectError> {
        let key = PoolKey { src: pod.key.clone(), dst: dst_id.clone(), tunnel };
        let req = || {
            http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(target.to_string())
                .body(Empty::<Bytes>::new())
                .map_err(|source| ConnectError::BadTarget { target, source })
        };
        let stream_err = |source| ConnectError::TunnelHttp { tunnel, source };
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
                    let res = sender.send_request(req()?).await.map_err(stream_err)?;
                    (sender, slot, res)
                }
            },
            None => {
                let (mut sender, slot) = self.checkout_or_connect(pod, &key, tunnel, &dst_id).await?;
                let res = sender.send_request(req()?).await.map_err(stream_err)?;
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
            return Err(ConnectError::Refused { tunnel, target, status: res.status(), reason });
        }
        let upgraded = hyper::upgrade::on(res).await.map_err(stream_err)?;
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
    ) -> Result<(TunnelSender, StreamSlot), ConnectError> {
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
    ) -> Result<(TunnelSender, StreamSlot), ConnectError> {
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

    async fn connect_tunnel(&self, pod: &PodHandle, tunnel: SocketAddr, dst_id: &SpiffeId) -> Result<TunnelSender, ConnectError> {
        let cert = pod.cert.borrow().clone().ok_or_else(|| ConnectError::NoCertificate(pod.key.clone()))?;
        let config = crate::tls::client_config(&cert, dst_id, self.inputs.tls_stats.clone())?;
        let tcp = connect_from(&*pod.sockets, tunnel)
            .await
            .map_err(|e| ConnectError::Tunnel { tunnel, source: Box::new(e) })?;
        let (tls, server_id) = crate::tls::connect(config, tcp)
            .await
            .map_err(|source| ConnectError::Mtls { tunnel, peer: Box::new(dst_id.clone()), source: Box::new(source) })?;
        tracing::debug!(%tunnel, server = %server_id, client = %cert.id, "mTLS tunnel connection established");
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(FRAME_SIZE)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ConnectError::TunnelHttp { tunnel, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "tunnel connection ended");
            }
        });
        Ok(sender)
    }
}

impl Inbound {
    /// A connection to one of `pod`'s applications, within the pod's cap;
    /// the slot must live as long as the connection.
    pub(crate) async fn connect_app(&self, pod: &PodHandle, target: SocketAddr) -> Result<(TcpStream, AppSlot), AppError> {
        let max = self.inputs.limits.max_app_connections.load(Ordering::Relaxed) as u64;
        if pod.stats.app_connections.fetch_add(1, Ordering::Relaxed) >= max {
            pod.stats.app_connections.fetch_sub(1, Ordering::Relaxed);
            self.inputs.telemetry.metrics.connection_overflow("app");
            return Err(AppError::Overflow { max, pod: pod.key.clone() });
        }
        let slot = AppSlot(pod.stats.clone());
        Ok((connect_from(&*pod.sockets, target).await?, slot))
    }
}

/// One open connection to a pod's application, counted while it lives.
pub(crate) struct AppSlot(Arc<PodStats>);

impl Drop for AppSlot {
    fn drop(&mut self) {
        self.0.app_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP connect from the pod (inside its namespace, with the agent's mark).
pub(super) async fn connect_from(sockets: &dyn super::PodSockets, dst: SocketAddr) -> Result<TcpStream, ConnectError> {
    let sock = sockets.for_connect(dst).await?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .map_err(|_| ConnectError::TimedOut(dst))?
        .map_err(|source| ConnectError::Tcp { addr: dst, source })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
