//! The agent's in-pod listeners and the connections they carry.
//!
//! For every enrolled pod on this node the agent listens, inside the pod's
//! network namespace, on
//! - `15001` outbound: the pod's own connections, redirected there by the
//!   connect hooks; the original destination comes from the eBPF map;
//! - `15008` tunnel: connections from other agents (and this one) to the pod:
//!   mutual TLS 1.3 with SPIFFE workload certificates (the client presents the
//!   source workload's, the server the destination workload's), HTTP/2 inside,
//!   one CONNECT stream per relayed connection (the HBONE shape);
//! - `15006` plaintext: connections from outside the mesh to the pod's ports,
//!   handed there by the `sk_lookup` hook; the accepted socket's local
//!   address is the port the client asked for.
//!
//! A connection to a pod in the mesh goes to that pod's tunnel listener
//! (wherever its node is), opened from the source pod's namespace so the
//! source address is the client pod's. Anything else is connected directly.
//! This module never sees Kubernetes or eBPF types, only the mesh state and
//! the original-destination lookup.
//!
//! Naming: `peer` is always an identity, the verified SPIFFE ID of the
//! other end of a tunnel (or the policy's view of it, [`crate::policy::Peer`]);
//! an address is never a peer: the other end's socket address is the
//! `client` (of an accepted connection), and where a connection goes is its
//! `target`, `orig` or `dest`.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{
    identity::{CertManager, CertWatch, SpiffeId},
    state::{PodKey, Snapshot},
    tls::TlsStats,
};

mod accept;
mod authz;
mod connect;
mod front_door;
pub mod balance;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz_hooks;
mod http;
mod http_client;
mod http_inbound;
mod http_outbound;
mod inbound;
mod outbound;
mod observe;
mod pool;
mod prune;
mod relay;
mod reply;
mod services;
mod sniff;
pub mod sockets;
mod tunnel;

pub use observe::Telemetry;
pub use outbound::OrigDstLookup;
pub use prune::TableSizes;
pub use sockets::{Loopback, PodSockets};

/// How long the agent waits for a client's first bytes to tell whether it
/// speaks HTTP (only where policy makes it matter: see [`authz`]).
const DETECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent waits for a TCP handshake it starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 flow-control windows of the tunnel: large enough that one stream
/// can fill a fast link (the 64 KiB default caps a stream at a few MB/s per
/// millisecond of round trip).
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame an agent accepts on the tunnel: a relay read (up to
/// 64 KiB) travels as one DATA frame instead of four 16 KiB ones.
const FRAME_SIZE: u32 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {pod}: {source}")]
    Sockets {
        pod: PodKey,
        #[source]
        source: sockets::SocketError,
    },
    #[error("pod {pod}: cannot listen on {addr} in its network namespace: {source}")]
    Listen {
        pod: PodKey,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("pod {pod}: the socket handed over for port {port} listens on {local}")]
    HandedOver { pod: PodKey, port: u16, local: SocketAddr },
    #[error("pod {pod}: {source}")]
    Tls {
        pod: PodKey,
        #[source]
        source: crate::tls::Error,
    },
}

/// Per-pod connection counters kept by the proxy.
#[derive(Debug, Default)]
pub struct PodStats {
    pub outbound: AtomicU64,
    pub outbound_tunneled: AtomicU64,
    pub outbound_direct: AtomicU64,
    pub outbound_failed: AtomicU64,
    pub inbound: AtomicU64,
    pub inbound_refused: AtomicU64,
    pub inbound_plaintext: AtomicU64,
    pub inbound_plaintext_refused: AtomicU64,
    pub inbound_failed: AtomicU64,
    /// Connections open from the agent to the pod's applications.
    pub app_connections: AtomicU64,
    /// HTTP requests refused before policy: unsafe request targets.
    pub http_rejected: AtomicU64,
    /// Inbound connections refused by authorization policy, by policy.
    pub inbound_denied: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Verified client identities of tunnel streams delivered to the pod.
    pub inbound_peers: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Verified server identities of the pod's outbound tunnels.
    pub outbound_peers: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

fn count_peer(map: &std::sync::Mutex<std::collections::BTreeMap<String, u64>>, id: &SpiffeId) {
    *map.lock().expect("poisoned").entry(id.to_string()).or_default() += 1;
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatsView {
    outbound: u64,
    outbound_tunneled: u64,
    outbound_direct: u64,
    outbound_failed: u64,
    inbound: u64,
    inbound_refused: u64,
    inbound_plaintext: u64,
    inbound_plaintext_refused: u64,
    inbound_failed: u64,
    http_rejected: u64,
    inbound_denied: std::collections::BTreeMap<String, u64>,
    inbound_peers: std::collections::BTreeMap<String, u64>,
    outbound_peers: std::collections::BTreeMap<String, u64>,
}

impl PodStats {
    pub fn view(&self) -> PodStatsView {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PodStatsView {
            outbound: l(&self.outbound),
            outbound_tunneled: l(&self.outbound_tunneled),
            outbound_direct: l(&self.outbound_direct),
            outbound_failed: l(&self.outbound_failed),
            inbound: l(&self.inbound),
            inbound_refused: l(&self.inbound_refused),
            inbound_plaintext: l(&self.inbound_plaintext),
            inbound_plaintext_refused: l(&self.inbound_plaintext_refused),
            inbound_failed: l(&self.inbound_failed),
            http_rejected: l(&self.http_rejected),
            inbound_denied: self.inbound_denied.lock().expect("poisoned").clone(),
            inbound_peers: self.inbound_peers.lock().expect("poisoned").clone(),
            outbound_peers: self.outbound_peers.lock().expect("poisoned").clone(),
        }
    }
}

/// Ports of the in-pod listeners.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub tunnel: u16,
    pub plaintext: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            outbound: mesh_common::OUTBOUND_PORT,
            tunnel: mesh_common::INBOUND_TUNNEL_PORT,
            plaintext: mesh_common::INBOUND_PLAINTEXT_PORT,
        }
    }
}

/// Shared by every listener and connection of this agent: the inputs every
/// role reads, and what only one role owns ([`Outbound`], [`Inbound`]), so
/// that a field's place says which side of a connection uses it.
pub struct Proxy {
    inputs: Arc<Inputs>,
    outbound: Arc<Outbound>,
    inbound: Arc<Inbound>,
}

/// What the agent hands in, and the bookkeeping of every connection, both
/// roles alike.
struct Inputs {
    state: watch::Receiver<Snapshot>,
    orig_dst: Arc<dyn OrigDstLookup>,
    certs: CertManager,
    tls_stats: Arc<TlsStats>,
    ports: Ports,
    telemetry: Arc<observe::Telemetry>,
    /// Every connection task, so shutdown can wait for them to finish.
    connections: TaskTracker,
    /// Caps on concurrent connections (`--max-connections`,
    /// `--max-app-connections`).
    limits: Limits,
    /// Cancelled when the agent drains: HTTP connections finish gracefully
    /// (HTTP/1.1 `Connection: close` on the response in flight, HTTP/2
    /// GOAWAY) so that clients move to the agent that serves next.
    draining: CancellationToken,
    runtime: tokio::runtime::Handle,
}

/// The source side's own: the way from a local pod to its destinations
/// ([`outbound`]: L4 relay; [`http_outbound`]: the HTTP stack).
struct Outbound {
    inputs: Arc<Inputs>,
    /// Pooled mTLS tunnel connections to other agents.
    pool: pool::Pool,
    routes: http_outbound::RouteCache,
    balancer: balance::Balancer,
    /// Per-service HTTP state: circuit breakers, retry budgets.
    services: services::Services,
    /// Pooled HTTP connections to endpoints.
    http_clients: http_client::HttpClients,
}

/// The destination side's own: what reaches a local pod ([`tunnel`],
/// [`inbound`]: L4; [`http_inbound`]: the HTTP stack).
struct Inbound {
    inputs: Arc<Inputs>,
    authz: authz::Cache,
    app_connections: http_inbound::AppConnections,
}

impl Outbound {
    fn new(inputs: Arc<Inputs>) -> Self {
        Outbound {
            inputs,
            pool: Default::default(),
            routes: Default::default(),
            balancer: Default::default(),
            services: Default::default(),
            http_clients: Default::default(),
        }
    }
}

impl Inbound {
    fn new(inputs: Arc<Inputs>) -> Self {
        Inbound { inputs, authz: Default::default(), app_connections: Default::default() }
    }
}

/// A local pod the proxy serves.
pub struct PodHandle {
    pub key: PodKey,
    pub id: SpiffeId,
    pub ips: Vec<IpAddr>,
    /// Where its listeners listen and its connections start: its network
    /// namespace (a loopback address in tests).
    pub sockets: Arc<dyn PodSockets>,
    pub stats: Arc<PodStats>,
    /// The pod's workload certificate, rotated behind this channel.
    pub cert: CertWatch,
}

/// The listeners of one pod; dropping it does not close them, `close` does.
pub struct PodListeners {
    pub addrs: Vec<SocketAddr>,
    /// The plaintext capture listener, for the `sk_lookup` map (a duplicate
    /// descriptor of the socket the accept loop owns).
    pub plaintext: OwnedFd,
    /// Duplicates of the outbound and tunnel listeners, for a handoff.
    outbound: OwnedFd,
    tunnel: OwnedFd,
    cancel: CancellationToken,
}

impl PodListeners {
    /// Stops accepting. Connections already accepted carry on.
    pub fn close(self) {
        self.cancel.cancel();
    }

    pub fn is_serving(&self) -> bool {
        !self.cancel.is_cancelled()
    }

    /// Duplicates of the three listening sockets (outbound, tunnel,
    /// plaintext) for the agent that takes over.
    pub fn dup(&self) -> std::io::Result<[OwnedFd; 3]> {
        Ok([self.outbound.try_clone()?, self.tunnel.try_clone()?, self.plaintext.try_clone()?])
    }
}

impl Proxy {
    pub fn new(
        state: watch::Receiver<Snapshot>,
        orig_dst: Arc<dyn OrigDstLookup>,
        certs: CertManager,
        tls_stats: Arc<TlsStats>,
        ports: Ports,
        runtime: tokio::runtime::Handle,
        telemetry: Arc<observe::Telemetry>,
    ) -> Arc<Self> {
        let inputs = Arc::new(Inputs {
                state,
                orig_dst,
                certs,
                tls_stats,
                ports,
                telemetry,
                connections: TaskTracker::new(),
                limits: Limits::default(),
                draining: CancellationToken::new(),
            runtime,
        });
        let proxy = Arc::new(Self {
            outbound: Arc::new(Outbound::new(inputs.clone())),
            inbound: Arc::new(Inbound::new(inputs.clone())),
            inputs,
        });
        let weak = Arc::downgrade(&proxy);
        proxy.inputs.runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(p) = weak.upgrade() else { return };
                p.outbound.pool.reap(pool::IDLE_TIMEOUT);
                p.outbound.http_clients.reap();
                p.inbound.app_connections.reap();
                p.prune();
            }
        });
        // Each new snapshot's policies and routes are compiled on a
        // blocking thread, not by the data path's first connection.
        let weak = Arc::downgrade(&proxy);
        let mut state = proxy.inputs.state.clone();
        proxy.inputs.runtime.spawn(async move {
            loop {
                let snapshot = state.borrow_and_update().clone();
                let Some(p) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || p.warm(&snapshot)).await;
                if state.changed().await.is_err() {
                    return;
                }
            }
        });
        proxy
    }

    /// Compiles `snapshot`'s authorization policies and routes ahead of the
    /// data path, unless a newer snapshot (or a connection) got there first.
    fn warm(&self, snapshot: &Snapshot) {
        let current = || Arc::ptr_eq(&*self.inputs.state.borrow(), snapshot);
        self.inbound.authz.warm(snapshot, current);
        self.outbound.routes.warm(snapshot, current);
    }

    /// Opens the pod's listeners in its namespace and starts serving them on
    /// the data-plane runtime.
    /// `inherited`: the pod's listening sockets (outbound, tunnel,
    /// plaintext) handed over by the agent this one replaces, served as they
    /// are instead of opening new ones.
    pub fn serve_pod(self: &Arc<Self>, pod: &PodHandle, inherited: Option<[OwnedFd; 3]>) -> Result<PodListeners, Error> {
        let cancel = CancellationToken::new();
        let (outbound, tunnel, plaintext) = match inherited {
            Some([o, t, p]) => (
                self.adopt_listener(pod, self.inputs.ports.outbound, o)?,
                self.adopt_listener(pod, self.inputs.ports.tunnel, t)?,
                self.adopt_listener(pod, self.inputs.ports.plaintext, p)?,
            ),
            None => (
                self.listen(pod, self.inputs.ports.outbound)?,
                self.listen(pod, self.inputs.ports.tunnel)?,
                self.listen(pod, self.inputs.ports.plaintext)?,
            ),
        };
        let dup = |l: &TcpListener, port: u16| {
            socket2::SockRef::from(l).try_clone().map(OwnedFd::from).map_err(|source| Error::Listen {
                pod: pod.key.clone(),
                addr: SocketAddr::from(([0, 0, 0, 0], port)),
                source,
            })
        };
        let plaintext_fd = dup(&plaintext, self.inputs.ports.plaintext)?;
        let outbound_fd = dup(&outbound, self.inputs.ports.outbound)?;
        let tunnel_fd = dup(&tunnel, self.inputs.ports.tunnel)?;
        let addrs = [&outbound, &tunnel, &plaintext]
            .into_iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let server_tls = crate::tls::server_config(pod.cert.clone(), self.inputs.tls_stats.clone())
            .map_err(|source| Error::Tls { pod: pod.key.clone(), source })?;
        let pod = Arc::new(PodHandle {
            key: pod.key.clone(),
            id: pod.id.clone(),
            ips: pod.ips.clone(),
            sockets: pod.sockets.clone(),
            stats: pod.stats.clone(),
            cert: pod.cert.clone(),
        });
        let this = self.clone();
        self.inputs.runtime.spawn(this.clone().accept_loop(outbound, pod.clone(), cancel.clone(), Kind::Outbound));
        self.inputs.runtime.spawn(this.clone().accept_loop(tunnel, pod.clone(), cancel.clone(), Kind::Tunnel(server_tls)));
        self.inputs.runtime.spawn(this.accept_loop(plaintext, pod, cancel.clone(), Kind::Plaintext));
        Ok(PodListeners { addrs, plaintext: plaintext_fd, outbound: outbound_fd, tunnel: tunnel_fd, cancel })
    }

    /// A listening socket handed over by the previous agent, checked to be
    /// the one expected.
    fn adopt_listener(&self, pod: &PodHandle, port: u16, fd: OwnedFd) -> Result<TcpListener, Error> {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let listen_err = |source| Error::Listen { pod: pod.key.clone(), addr, source };
        let std_listener = std::net::TcpListener::from(fd);
        let local = std_listener.local_addr().map_err(listen_err)?;
        if local.port() != port {
            return Err(Error::HandedOver { pod: pod.key.clone(), port, local });
        }
        std_listener.set_nonblocking(true).map_err(listen_err)?;
        let _rt = self.inputs.runtime.enter();
        TcpListener::from_std(std_listener).map_err(listen_err)
    }

    fn listen(&self, pod: &PodHandle, port: u16) -> Result<TcpListener, Error> {
        let listener = pod.sockets.listen(port).map_err(|source| Error::Sockets { pod: pod.key.clone(), source })?;
        let _rt = self.inputs.runtime.enter();
        TcpListener::from_std(listener).map_err(|source| Error::Listen {
            pod: pod.key.clone(),
            addr: SocketAddr::from(([0, 0, 0, 0], port)),
            source,
        })
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, pod: Arc<PodHandle>, cancel: CancellationToken, kind: Kind) {
        let local = listener.local_addr().ok();
        accept::hold_spare();
        loop {
            let (stream, client) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: counted, logged at a bounded
                        // rate, backed off instead of spinning.
                        self.accept_failed(&pod, kind.name(), &e, &listener).await;
                        continue;
                    }
                },
            };
            // Over the agent's cap: refused with a reset at once, counted,
            // rather than accepted into a queue nobody serves.
            if self.inputs.connections.len() >= self.inputs.limits.max_connections.load(Ordering::Relaxed) {
                self.inputs.telemetry.metrics.connection_overflow("agent");
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let pod = pod.clone();
            let span = tracing::debug_span!("conn", pod = %pod.key, %client, kind = kind.name());
            // One task per kind, each the size of its own future: a task
            // lives as long as its connection, and a future that could be
            // any of the three would be the size of the largest.
            let connections = &self.inputs.connections;
            match &kind {
                Kind::Outbound => connections.spawn(this.outbound.clone().serve(stream, client, pod).instrument(span)),
                Kind::Tunnel(tls) => connections.spawn(this.inbound.clone().tunnel(stream, client, pod, tls.clone()).instrument(span)),
                Kind::Plaintext => connections.spawn(this.inbound.clone().plaintext(stream, client, pod).instrument(span)),
            };
        }
        tracing::debug!(pod = %pod.key, ?local, kind = kind.name(), "listener closed");
    }

    /// Stops tracking new connections and waits up to `deadline` for the open
    /// ones to finish; returns how many were still open.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.start_draining();
        if tokio::time::timeout(deadline, self.inputs.connections.wait()).await.is_err() {
            return self.inputs.connections.len();
        }
        0
    }

    /// From here on HTTP connections finish gracefully, and new
    /// connections are not waited for ([`Proxy::drain`] begins with it).
    pub fn start_draining(&self) {
        self.inputs.draining.cancel();
        self.inputs.connections.close();
    }

    pub fn open_connections(&self) -> usize {
        self.inputs.connections.len()
    }

    /// Pooled mTLS tunnel connections open now, and opened in all.
    pub fn tunnel_connections(&self) -> (usize, usize) {
        (self.outbound.pool.open_connections(), self.outbound.pool.opened.load(Ordering::Relaxed))
    }

    /// Per-endpoint load-balancing state (active, picked, failures, ejected).
    pub fn endpoints(&self) -> std::collections::BTreeMap<String, balance::EndpointView> {
        self.outbound.balancer.view()
    }

    /// Per-service state of the HTTP layer (requests, retries, limits).
    pub fn services(&self) -> std::collections::BTreeMap<String, services::ServiceView> {
        self.outbound.services.view()
    }

    pub fn telemetry(&self) -> &Arc<observe::Telemetry> {
        &self.inputs.telemetry
    }

    pub fn tls_stats(&self) -> &Arc<TlsStats> {
        &self.inputs.tls_stats
    }

    pub fn certs(&self) -> &CertManager {
        &self.inputs.certs
    }
}

/// Serves an HTTP connection to its end; once the agent drains, asks it to
/// finish gracefully first (`graceful`: hyper's `graceful_shutdown`).
async fn until_drained<C: std::future::Future>(
    conn: C,
    draining: &CancellationToken,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
) -> C::Output {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = draining.cancelled() => {}
    }
    graceful(conn.as_mut());
    conn.await
}

/// Caps on concurrent connections, changeable at run time.
pub struct Limits {
    /// Connections the agent carries at once (all pods); beyond it new
    /// ones are reset.
    pub max_connections: std::sync::atomic::AtomicUsize,
    /// Connections the agent holds open to one pod's applications.
    pub max_app_connections: std::sync::atomic::AtomicUsize,
}

/// Defaults: far above what a node's pods need, low enough that a flood
/// exhausts neither the agent's descriptors nor an app's.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
pub const DEFAULT_MAX_APP_CONNECTIONS: usize = 16_384;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS.into(),
            max_app_connections: DEFAULT_MAX_APP_CONNECTIONS.into(),
        }
    }
}

impl Proxy {
    /// Sets the connection caps.
    pub fn set_limits(&self, max_connections: usize, max_app_connections: usize) {
        self.inputs.limits.max_connections.store(max_connections.max(1), Ordering::Relaxed);
        self.inputs.limits.max_app_connections.store(max_app_connections.max(1), Ordering::Relaxed);
    }
}

#[derive(Clone)]
enum Kind {
    Outbound,
    /// With the pod's TLS server config (its certificate, hot-swapped).
    Tunnel(Arc<rustls::ServerConfig>),
    Plaintext,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Outbound => "outbound",
            Kind::Tunnel(_) => "tunnel",
            Kind::Plaintext => "plaintext",
        }
    }
}
