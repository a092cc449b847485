//! The only wiring: [`build`] makes every part from the config and returns
//! them bound and serving ([`Bound`]: the real addresses, readiness, the
//! shutdown trigger); [`run`] is the binary's agent: two runtimes, the
//! eBPF kernel, a build, then signals until the shutdown sequence
//! ([`Bound::wait`]). The data plane runs on its own multi-thread runtime,
//! the control plane and admin on one thread, so neither can stall the
//! other.
//!
//! What differs between an agent on a node and one in a test is handed to
//! [`build`] as [`Parts`]: the kernel side ([`KernelLoader`]: [`Ebpf`] on a
//! node, `testing::MemoryKernel` in tests), the CA (gRPC or an authority in
//! the process) and a rewrite of the state's addresses (tests put pods on
//! loopback addresses the local file refuses).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

mod bound;
mod parts;
mod view;

pub use bound::{Bound, Readiness, Shutdown};
pub use parts::{Ca, Ebpf, KernelLoader, Parts, StateMap};
use bound::Tasks;
use view::Admin;

use crate::{
    admin::{self, AdminSource},
    config::Config,
    ebpf,
    enroll::{Enrollment, Kernel},
    identity::{CaClient, CertManager, GrpcCaClient, LocalCaClient, ManagerConfig},
    tls::TlsStats,
    localfile::{self, ReloadStats},
    metrics::{HealthCollector, Metrics},
    access_log::AccessLog,
    telemetry::trace::Tracer,
    proxy::{OrigDstLookup, Ports, Proxy, Telemetry},
    state::Snapshot,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    LocalFile(#[from] localfile::Error),
    // Boxed: the eBPF error carries the verifier log and is large.
    #[error(transparent)]
    Ebpf(Box<ebpf::Error>),
    #[error("cannot listen on admin address {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error(
        "cannot listen on the {flag} address {addr} (--{flag}): {source}; is another agent or program using it? \
         Nothing was loaded or attached to the kernel"
    )]
    Bind { flag: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Trace(crate::telemetry::trace::Error),
    #[error("{0}")]
    AccessLog(std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Host(#[from] crate::host::Error),
    #[error(transparent)]
    Lifecycle(#[from] crate::lifecycle::Error),
    #[error("{0}")]
    Handoff(String),
    #[error("cannot read {what} {path}: {source}")]
    CaFile { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("the CA client cannot be set up: {0}")]
    CaClient(#[from] crate::identity::FetchError),
    #[error("cannot set up the Kubernetes client (in-cluster service account, KUBECONFIG or --kubeconfig)")]
    Kube(#[from] crate::k8s::ClientError),
}

impl From<ebpf::Error> for Error {
    fn from(e: ebpf::Error) -> Self {
        Error::Ebpf(Box::new(e))
    }
}

impl OrigDstLookup for ebpf::OrigDst {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr> {
        ebpf::OrigDst::take(self, client)
    }
}

/// What the agent tells its supervisor (stdout lines in `main`).
pub enum Event {
    /// The admin listener serves (`/status` tells what is not ready yet).
    Admin(SocketAddr),
    /// Every local pod the state puts in the mesh is redirected, captured
    /// and holds its workload certificate: `/ready` answers 200.
    Ready(SocketAddr),
}

/// Runs the agent until SIGTERM or SIGINT, reporting [`Event`]s.
pub fn run(cfg: Config, on_event: impl FnMut(Event)) -> Result<(), Error> {
    cfg.validate()?;
    tracing::info!(
        node = %cfg.node,
        source = if cfg.kube.is_some() { "kube" } else { "file" },
        config = %cfg.config_file.display(),
        admin = %cfg.admin_addr,
        metrics = ?cfg.metrics_addr,
        ca = %cfg.ca.endpoint,
        drain_timeout = ?cfg.drain_timeout,
        failure_policy = if cfg.fail_open { "open" } else { "closed" },
        accelerate = cfg.accelerate.name(),
        data_threads = cfg.data_threads,
        bpffs = %cfg.bpffs.display(),
        run_dir = %cfg.run_dir.display(),
        enrollment_label = %cfg.scope.enrollment,
        cluster_id = %cfg.scope.cluster_id,
        "starting"
    );
    let data_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.data_threads)
        .thread_name("data")
        // Idle after a connection storm: return the freed memory.
        .on_thread_park(|| {
            crate::memory::on_park();
        })
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let control_rt = tokio::runtime::Builder::new_current_thread()
        .on_thread_park(|| {
            crate::memory::on_park();
        })
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let result = control_rt.block_on(control(cfg, data_rt.handle().clone(), on_event));
    data_rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The binary's control plane: the agent built on the eBPF kernel, then
/// signals until it has shut down.
async fn control(cfg: Config, data: tokio::runtime::Handle, mut on_event: impl FnMut(Event)) -> Result<(), Error> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let bound = build(cfg, Parts::node(data)).await?;
    let admin_addr = bound.admin_addr();
    on_event(Event::Admin(admin_addr));
    let shutdown = bound.shutdown_trigger();
    let readiness = bound.readiness();
    let node = bound.node.clone();
    let mut done = std::pin::pin!(bound.wait());
    let mut reported_ready = false;
    loop {
        tokio::select! {
            r = &mut done => return r,
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); shutdown.trigger() }
            _ = sigint.recv() => { tracing::info!("SIGINT: draining"); shutdown.trigger() }
            _ = readiness.wait(), if !reported_ready && !shutdown.is_triggered() => {
                reported_ready = true;
                tracing::info!(%admin_addr, node = %node, "agent ready");
                on_event(Event::Ready(admin_addr));
            }
        }
    }
}

/// Builds the agent from `cfg` and `parts`, up to serving: the state
/// source, the node claimed (or taken over from the agent holding it), the
/// admin and metrics listeners, the kernel side, the proxy, every local
/// pod reconciled once, the admin serving and the handoff socket open.
/// Must run on the control runtime (the admin and reconcile tasks are
/// spawned on the current one).
pub async fn build<L: KernelLoader>(cfg: Config, parts: Parts<L>) -> Result<Bound<L::Kernel>, Error> {
    cfg.validate()?;
    let Parts { kernel, ca, data, state_map } = parts;
    let (state, reloads, watcher, kube) = source(&cfg, state_map).await?;
    kernel.check()?;
    // One agent owns a node's pinned state at a time: take the node's lock,
    // or, if an agent holds it, take over from it (a restart or a
    // DaemonSet surge: same command line, no flag).
    let (run_dir, node) = (cfg.run_dir.clone(), cfg.node.clone());
    let claim = tokio::task::spawn_blocking(move || handoff::lock_or_offer(&run_dir, &node, HANDOFF_WAIT))
        .await
        .map_err(|e| Error::Runtime(std::io::Error::other(e)))??;
    let (mut node_lock, mut taking) = match claim {
        Ok(lock) => (Some(lock), None),
        Err((offer, taking)) => {
            tracing::info!(pods = offer.pods.len(), "taking over from the running agent");
            (None, Some((offer, taking)))
        }
    };
    // The admin and metrics listeners before anything touches the kernel:
    // a port another process holds stops the agent here, having loaded and
    // attached nothing, rather than after it enrolled the node's pods. Now
    // that this agent owns the node (or is taking it over), the addresses
    // are free or are the predecessor's, handed over with the same command
    // line (a port 0 admin means "whatever the previous agent had"). If a
    // bind fails during a takeover, dropping `taking` makes the previous
    // agent resume as if nothing happened.
    let (inherited_admin, inherited_metrics) = match taking.as_mut() {
        Some((offer, _)) => {
            let same = |want: SocketAddr, had: SocketAddr| want == had || (want.port() == 0 && want.ip() == had.ip());
            (
                offer.admin.take().filter(|(a, _)| same(cfg.admin_addr, *a)),
                offer.metrics.take().filter(|(a, _)| cfg.metrics_addr.is_some_and(|m| same(m, *a))),
            )
        }
        None => (None, None),
    };
    let listener = match inherited_admin {
        Some((addr, fd)) => inherit_listener(fd).map_err(|source| Error::Admin { addr, source })?,
        None => admin::bind(cfg.admin_addr)
            .await
            .map_err(|source| Error::Bind { flag: "admin", addr: cfg.admin_addr, source })?,
    };
    let metrics_listener = match (cfg.metrics_addr, inherited_metrics) {
        (None, _) => None,
        (Some(_), Some((addr, fd))) => Some((addr, inherit_listener(fd).map_err(|source| Error::Admin { addr, source })?)),
        (Some(addr), None) => {
            Some((addr, admin::bind(addr).await.map_err(|source| Error::Bind { flag: "metrics", addr, source })?))
        }
    };
    let (datapath, orig_dst) = kernel.load(&cfg)?;
    let ca: Arc<dyn CaClient> = match ca {
        Ca::Grpc => {
            let roots = std::fs::read_to_string(&cfg.ca.roots)
                .map_err(|source| Error::CaFile { what: "CA roots", path: cfg.ca.roots.clone(), source })?;
            let token = std::fs::read_to_string(&cfg.ca.token_file)
                .map_err(|source| Error::CaFile { what: "node token", path: cfg.ca.token_file.clone(), source })?;
            Arc::new(GrpcCaClient::new(&cfg.ca.endpoint, &roots, token.trim(), None)?.reread_token_from(cfg.ca.token_file.clone()))
        }
        Ca::InProcess(authority) => Arc::new(LocalCaClient::new(authority, cfg.node.clone(), state.clone())),
    };
    // Certificates are fetched and rotated on the control runtime.
    let certs = CertManager::new(ca, ManagerConfig { ttl: cfg.ca.cert_ttl, ..ManagerConfig::default() });
    let metrics = Arc::new(Metrics::default());
    let tracer = Tracer::start(cfg.trace.clone(), &tokio::runtime::Handle::current()).map_err(Error::Trace)?;
    let access_log = Arc::new(AccessLog::start(&cfg.access_log).map_err(Error::AccessLog)?);
    let telemetry = Arc::new(Telemetry { metrics: metrics.clone(), access_log, tracer: tracer.clone() });
    let proxy = Proxy::new(
        state.clone(),
        orig_dst,
        certs,
        Arc::new(TlsStats::default()),
        Ports::default(),
        data.clone(),
        telemetry,
    );
    proxy.set_limits(cfg.max_connections, cfg.max_app_connections);
    let enrollment = Arc::new(Mutex::new(Enrollment::new(
        cfg.node.clone(),
        datapath,
        proxy.clone(),
        Ports::default().outbound,
        cfg.fail_open,
    )));
    let complete = {
        let kube = kube.clone();
        move || kube.as_ref().is_none_or(|k| k.view().built)
    };
    if let Some((offer, _)) = taking.as_mut() {
        for p in &mut offer.pods {
            let (Some(id), Some(cert)) = (p.identity.as_deref(), p.cert.take()) else { continue };
            match id.parse().map_err(|e: crate::identity::SpiffeIdError| e.to_string()).and_then(|id| cert.into_cert(id)) {
                Ok(cert) => proxy.certs().adopt(&p.pod, cert),
                Err(e) => tracing::warn!(pod = %p.pod, error = %e, "handed-over certificate unusable; fetching a new one"),
            }
        }
        enrollment.lock().expect("poisoned").inherit(std::mem::take(&mut offer.pods));
    }
    enrollment.lock().expect("poisoned").reconcile(&state.borrow().clone(), complete());
    if let Some((_, taking)) = taking.take() {
        let pending = enrollment.lock().expect("poisoned").inherited_pending();
        if pending > 0 {
            tracing::warn!(pods = pending, "handed-over listeners of pods no longer on this node closed");
        }
        // The previous agent stops accepting and drains; its lock is ours.
        taking.confirm().map_err(|e| Error::Handoff(e.to_string()))?;
        let (run_dir, node) = (cfg.run_dir.clone(), cfg.node.clone());
        node_lock = tokio::task::spawn_blocking(move || crate::lifecycle::NodeLock::acquire(&run_dir, &node, HANDOFF_WAIT))
            .await
            .map_err(|e| Error::Runtime(std::io::Error::other(e)))??;
        if node_lock.is_none() {
            tracing::warn!("the previous agent still holds the node lock after handing over; serving anyway");
        }
    }

    let admin_fd = dup_listener(&listener).map_err(|source| Error::Admin { addr: cfg.admin_addr, source })?;
    let admin_addr = listener
        .local_addr()
        .map_err(|source| Error::Admin { addr: cfg.admin_addr, source })?;
    let admin = Arc::new(Admin {
        node: cfg.node.clone(),
        enrollment: enrollment.clone(),
        reloads,
        proxy: proxy.clone(),
        metrics: metrics.clone(),
        state: state.clone(),
        kube,
    });
    let weak = Arc::downgrade(&admin);
    metrics.register_health(HealthCollector {
        status: Arc::new(move || weak.upgrade().map_or(serde_json::Value::Null, |a| a.status())),
    });
    let mut metrics_fd = None;
    let mut metrics_addr = None;
    let metrics_task = match metrics_listener {
        Some((addr, l)) => {
            metrics_fd = Some((addr, dup_listener(&l).map_err(|source| Error::Admin { addr, source })?));
            // The address bound (`--metrics` may name port 0).
            metrics_addr = Some(l.local_addr().map_err(|source| Error::Admin { addr, source })?);
            tracing::info!(%addr, "metrics listener (/metrics, /healthz, /ready)");
            Some(tokio::spawn(admin::serve(l, admin.clone(), admin::Scope::Public)))
        }
        None => None,
    };
    let admin_task = tokio::spawn(admin::serve(listener, admin.clone(), admin::Scope::Admin));
    let watch_task = tokio::spawn(watcher);
    let reconcile_task = tokio::spawn(reconcile_loop(enrollment.clone(), state, cfg.reconcile_interval, complete));
    let trim_task = tokio::spawn(crate::memory::trim_after_storms());
    tracing::info!(%admin_addr, node = %cfg.node, "admin listener serving");

    // Serve handoffs to the next agent (once this one owns the node).
    let (taken_tx, taken_rx) = tokio::sync::mpsc::unbounded_channel();
    let handoff_server = match node_lock {
        Some(_) => {
            let source = Arc::new(HandoffSource {
                enrollment: enrollment.clone(),
                admin: (admin_addr, admin_fd),
                metrics: metrics_fd,
                taken: taken_tx,
            });
            Some(
                handoff::serve(&handoff::socket_path(&cfg.run_dir, &cfg.node), source)
                    .map_err(|e| Error::Handoff(e.to_string()))?,
            )
        }
        None => None,
    };
    Ok(Bound {
        node: cfg.node,
        admin_addr,
        metrics_addr,
        admin,
        enrollment,
        proxy,
        tracer,
        data,
        drain_timeout: cfg.drain_timeout,
        node_lock,
        handoff: handoff_server,
        taken: taken_rx,
        shutdown: Shutdown(CancellationToken::new()),
        tasks: Tasks { admin: admin_task, metrics: metrics_task, watch: watch_task, reconcile: reconcile_task, trim: trim_task },
    })
}


/// How long a starting agent waits for the node lock or a handoff.
const HANDOFF_WAIT: Duration = Duration::from_secs(30);

use crate::lifecycle::handoff;

/// A listening socket handed over by the previous agent, for tokio.
fn inherit_listener(fd: std::os::fd::OwnedFd) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

fn dup_listener(l: &tokio::net::TcpListener) -> std::io::Result<std::os::fd::OwnedFd> {
    socket2::SockRef::from(l).try_clone().map(std::os::fd::OwnedFd::from)
}

/// This agent's side of a handoff to its successor.
struct HandoffSource<K: Kernel> {
    enrollment: Arc<Mutex<Enrollment<K>>>,
    admin: (SocketAddr, std::os::fd::OwnedFd),
    metrics: Option<(SocketAddr, std::os::fd::OwnedFd)>,
    taken: tokio::sync::mpsc::UnboundedSender<()>,
}

impl<K: Kernel> handoff::Source for HandoffSource<K> {
    fn pause_and_offer(&self) -> handoff::Offer {
        let mut e = self.enrollment.lock().expect("poisoned");
        e.paused = true;
        let dup = |(a, fd): &(SocketAddr, std::os::fd::OwnedFd)| fd.try_clone().ok().map(|fd| (*a, fd));
        handoff::Offer { admin: dup(&self.admin), metrics: self.metrics.as_ref().and_then(dup), pods: e.offer() }
    }

    fn resume(&self) {
        self.enrollment.lock().expect("poisoned").paused = false;
    }

    fn taken(&self) {
        let _ = self.taken.send(());
    }
}

type Source = (watch::Receiver<Snapshot>, Arc<ReloadStats>, Watcher, Option<Arc<crate::k8s::Stats>>);

/// The mesh state's source: the local file, or the Kubernetes API; each
/// state rewritten by `map`, if any.
async fn source(cfg: &Config, map: Option<StateMap>) -> Result<Source, Error> {
    let Some(kube_cfg) = &cfg.kube else {
        let (state, reloads, watcher) = localfile::start(cfg.config_file.clone(), cfg.config_poll, cfg.scope.clone()).await?;
        localfile::check_node(&cfg.config_file, &state.borrow(), &cfg.node)?;
        let (state, watcher) = mapped(state, Box::pin(watcher), map);
        return Ok((state, reloads, watcher, None));
    };
    let client = crate::k8s::client_from(kube_cfg.kubeconfig.as_deref()).await?;
    let (state, stats, watcher) = crate::k8s::start(
        client,
        crate::k8s::Options {
            node: cfg.node.clone(),
            trust_domain: kube_cfg.trust_domain.clone(),
            locator: Arc::new(crate::k8s::podpaths::ProcLocator::host()),
            write_status: true,
            pods_only: false,
            scope: cfg.scope.clone(),
        },
    );
    // `/status` keeps its `config` block; the Kubernetes details are under `kube`.
    let reloads = Arc::new(ReloadStats::new("kubernetes API".into()));
    let (state, watcher) = mapped(state, Box::pin(watcher), map);
    Ok((state, reloads, watcher, Some(stats)))
}

type Watcher = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The states of `state` rewritten by `map`, published by the returned
/// watcher alongside the source's own. Without a map, the source as it is.
fn mapped(state: watch::Receiver<Snapshot>, watcher: Watcher, map: Option<StateMap>) -> (watch::Receiver<Snapshot>, Watcher) {
    let Some(map) = map else { return (state, watcher) };
    let mut from = state;
    let (tx, rx) = watch::channel(Arc::new(map(&from.borrow_and_update())));
    let relay = async move {
        while from.changed().await.is_ok() {
            let next = Arc::new(map(&from.borrow_and_update()));
            tx.send_replace(next);
        }
    };
    (rx, Box::pin(async move { futures::future::join(watcher, relay).await; }))
}

async fn reconcile_loop<K: Kernel>(
    enrollment: Arc<Mutex<Enrollment<K>>>,
    mut state: watch::Receiver<Snapshot>,
    every: Duration,
    complete: impl Fn() -> bool,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wake = enrollment.lock().expect("poisoned").wake.clone();
    loop {
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
            _ = wake.notified() => {}
        }
        let snapshot = state.borrow_and_update().clone();
        enrollment.lock().expect("poisoned").reconcile(&snapshot, complete());
    }
}
