//! Outbound: a pod's redirected connection, relayed to where it was going.

use std::{net::SocketAddr, sync::atomic::Ordering};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{CONNECTION_WINDOW, PodHandle, Proxy, STREAM_WINDOW, connect_from};
use crate::state::Destination;

/// Where a redirected connection was going (the eBPF original-destination
/// map in production; a table in tests).
pub trait OrigDstLookup: Send + Sync {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr>;
}

impl Proxy {
    pub(super) async fn outbound(&self, mut app: TcpStream, peer: SocketAddr, pod: &PodHandle) {
        let stats = &pod.stats;
        let Some(orig) = self.orig_dst.take(peer) else {
            // Someone connected to the listener directly: there is nowhere
            // to send it.
            tracing::warn!(%peer, "connection on the outbound port was not redirected by the mesh; closing it");
            stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        stats.outbound.fetch_add(1, Ordering::Relaxed);
        let dest = {
            let state = self.state.borrow();
            state.resolve(orig, |n| self.next_endpoint.fetch_add(1, Ordering::Relaxed) % n)
        };
        let result = match &dest {
            Destination::MeshPod { pod: dst_pod, addr } => {
                let tunnel = SocketAddr::new(addr.ip(), self.ports.tunnel);
                tracing::debug!(%orig, dst = %dst_pod, %tunnel, "outbound via tunnel");
                match self.open_tunnel(pod, tunnel, *addr).await {
                    Ok(upgraded) => {
                        stats.outbound_tunneled.fetch_add(1, Ordering::Relaxed);
                        let mut upgraded = TokioIo::new(upgraded);
                        tokio::io::copy_bidirectional(&mut app, &mut upgraded).await.map(|_| ())
                    }
                    Err(e) => Err(e),
                }
            }
            Destination::Passthrough(addr) => {
                tracing::debug!(%orig, dst = %addr, "outbound direct (destination not in the mesh)");
                match connect_from(&pod.netns, *addr).await {
                    Ok(mut upstream) => {
                        stats.outbound_direct.fetch_add(1, Ordering::Relaxed);
                        tokio::io::copy_bidirectional(&mut app, &mut upstream).await.map(|_| ())
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(()) => tracing::debug!(%orig, "outbound connection closed"),
            Err(e) => {
                stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%orig, error = %e, "outbound connection failed");
            }
        }
    }

    /// One HTTP/2 CONNECT stream to the destination pod's tunnel listener,
    /// opened from the source pod's namespace.
    async fn open_tunnel(
        &self,
        pod: &PodHandle,
        tunnel: SocketAddr,
        target: SocketAddr,
    ) -> std::io::Result<hyper::upgrade::Upgraded> {
        let stream = connect_from(&pod.netns, tunnel).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("tunnel to {tunnel} failed: {e}: is the destination node running the agent?"),
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "tunnel connection ended");
            }
        });
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(std::io::Error::other)?;
        let res = sender.send_request(req).await.map_err(std::io::Error::other)?;
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
        hyper::upgrade::on(res).await.map_err(std::io::Error::other)
    }
}
