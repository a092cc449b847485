//! Inbound plaintext: connections from outside the mesh, captured by
//! `sk_lookup`, delivered to the application inside the pod when the pod's
//! peer authentication is PERMISSIVE, refused with a reset when STRICT.
//!
//! The application sees the connection come from the pod's own address, not
//! the client's: preserving the client address would need `IP_TRANSPARENT`
//! plus policy routing for the replies inside the pod (marks and a local
//! route table), which is the iptables-era machinery this design avoids.
//! The client's address is in the agent's log and, with L7, in a header.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::net::TcpStream;

use super::{Inbound, PodHandle, authz::L4Verdict};
use crate::state::PeerAuthMode;

impl Inbound {
    /// Serves one captured plaintext connection from outside the mesh.
    pub(super) async fn plaintext(self: Arc<Self>, mut conn: TcpStream, client: SocketAddr, pod: Arc<PodHandle>) {
        let target = match conn.local_addr() {
            Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
            Err(e) => {
                tracing::info!(%client, error = %e, "captured connection has no local address");
                return;
            }
        };
        let mode = self.inputs.state.borrow().peer_auth_mode(&pod.key, target.port());
        if mode == PeerAuthMode::Strict {
            pod.stats.inbound_plaintext_refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%client, %target, pod = %pod.key, "plaintext connection refused: the pod's peer authentication is STRICT");
            let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
        let app_http = self.inputs.state.borrow().app_http(&pod.key, target.port());
        if let Some(app) = app_http {
            pod.stats.inbound_plaintext.fetch_add(1, Ordering::Relaxed);
            self.clone().serve_http(conn, pod, client, None, target, app).await;
            return;
        }
        match self.check_l4(&pod, None, client, target) {
            L4Verdict::Allow => {}
            L4Verdict::Deny(_) => {
                let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
                return;
            }
            L4Verdict::DependsOnHttp => {
                let (http, io) = super::sniff::detect(conn, super::DETECT_TIMEOUT).await;
                match http {
                    Some(app) => {
                        pod.stats.inbound_plaintext.fetch_add(1, Ordering::Relaxed);
                        self.clone().serve_http(io, pod, client, None, target, app).await;
                    }
                    None => {
                        let _ = self.authorize_connection(&pod, None, client, target);
                    }
                }
                return;
            }
        }
        pod.stats.inbound_plaintext.fetch_add(1, Ordering::Relaxed);
        match self.connect_app(&pod, target).await {
            Ok((mut app, _slot)) => {
                tracing::debug!(%client, %target, "plaintext inbound delivered");
                if let Err(e) = super::relay::copy_bidirectional(&mut conn, &mut app).await {
                    tracing::debug!(%client, %target, error = %e, "plaintext inbound ended with an error");
                }
            }
            Err(e) => {
                pod.stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%client, %target, error = %e, "plaintext inbound: the application refused; resetting the client");
                // Nothing listens there: tell the client the way the kernel
                // would have, with a reset rather than an accept-then-close.
                let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
            }
        }
    }
}
