//! The only wiring: builds every part from the config, runs until a signal,
//! then shuts down in order. Two runtimes: the data plane (multi-thread) and
//! the control plane + admin (one thread), so neither can stall the other.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    admin::{self, AdminSource},
    config::Config,
    ebpf::{self, Datapath},
    enroll::Enrollment,
    identity::{CertManager, GrpcCaClient, ManagerConfig},
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

struct Admin {
    node: String,
    enrollment: Arc<Mutex<Enrollment>>,
    reloads: Arc<ReloadStats>,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    state: watch::Receiver<Snapshot>,
    /// With `--source kube`: the watchers' state.
    kube: Option<Arc<crate::k8s::Stats>>,
}

impl AdminSource for Admin {
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
                "accelerating": e.accelerating(),
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
        accelerate = cfg.accelerate,
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

async fn control(cfg: Config, data: tokio::runtime::Handle, mut on_event: impl FnMut(Event)) -> Result<(), Error> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;

    let (state, reloads, watcher, kube) = source(&cfg).await?;
    crate::host::check_privileges()?;
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
    let mut datapath = Datapath::load(ebpf::Options {
        accelerate: cfg.accelerate,
        bpffs: cfg.bpffs.clone(),
        node: cfg.node.clone(),
    })?;
    ebpf::spawn_logger(datapath.ebpf_mut());
    if cfg.accelerate {
        let (own, is_root) = crate::host::own_cgroup()?;
        if datapath.attach_agent_cgroup(&own, is_root)? {
            tracing::info!(cgroup = %own.display(), "socket acceleration on");
        }
    }
    let roots = std::fs::read_to_string(&cfg.ca.roots)
        .map_err(|source| Error::CaFile { what: "CA roots", path: cfg.ca.roots.clone(), source })?;
    let token = std::fs::read_to_string(&cfg.ca.token_file)
        .map_err(|source| Error::CaFile { what: "node token", path: cfg.ca.token_file.clone(), source })?;
    let ca = GrpcCaClient::new(&cfg.ca.endpoint, &roots, token.trim(), None)?.reread_token_from(cfg.ca.token_file.clone());
    // Certificates are fetched and rotated on the control runtime.
    let certs = CertManager::new(Arc::new(ca), ManagerConfig { ttl: cfg.ca.cert_ttl, ..ManagerConfig::default() });
    let metrics = Arc::new(Metrics::default());
    let tracer = Tracer::start(cfg.trace.clone(), &tokio::runtime::Handle::current()).map_err(Error::Trace)?;
    let access_log = Arc::new(AccessLog::start(&cfg.access_log).map_err(Error::AccessLog)?);
    let telemetry = Arc::new(Telemetry { metrics: metrics.clone(), access_log, tracer: tracer.clone() });
    let proxy = Proxy::new(
        state.clone(),
        Arc::new(datapath.orig_dst()),
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
    let metrics_task = match metrics_listener {
        Some((addr, l)) => {
            metrics_fd = Some((addr, dup_listener(&l).map_err(|source| Error::Admin { addr, source })?));
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
    on_event(Event::Admin(admin_addr));

    // Serve handoffs to the next agent (once this one owns the node).
    let (taken_tx, mut taken_rx) = tokio::sync::mpsc::unbounded_channel();
    if node_lock.is_some() {
        let source = Arc::new(HandoffSource {
            enrollment: enrollment.clone(),
            admin: (admin_addr, admin_fd),
            metrics: metrics_fd,
            taken: taken_tx,
        });
        handoff::serve(&handoff::socket_path(&cfg.run_dir, &cfg.node), source).map_err(|e| Error::Handoff(e.to_string()))?;
    }

    let mut ready_check = tokio::time::interval(Duration::from_millis(50));
    let mut reported_ready = false;
    let mut handed_over = false;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: draining"); break }
            Some(()) = taken_rx.recv() => { handed_over = true; break }
            _ = ready_check.tick(), if !reported_ready => {
                if admin.ready() {
                    reported_ready = true;
                    tracing::info!(%admin_addr, node = %cfg.node, "agent ready");
                    on_event(Event::Ready(admin_addr));
                }
            }
        }
    }
    // The listeners close; the pinned kernel state stays, so the pods fail
    // closed (or, with failure policy open, go direct) until the next agent
    // serves them. The connections in flight finish until the deadline.
    reconcile_task.abort();
    trim_task.abort();
    watch_task.abort();
    enrollment.lock().expect("poisoned").stop_listeners();
    if handed_over {
        // The successor serves the admin and metrics listeners and owns
        // the node from here on; this agent only finishes its connections.
        admin_task.abort();
        if let Some(t) = &metrics_task {
            t.abort();
        }
        drop(node_lock.take());
    }
    let deadline = cfg.drain_timeout;
    let p = proxy.clone();
    let left = data
        .spawn(async move { p.drain(deadline).await })
        .await
        .unwrap_or_default();
    if left > 0 {
        tracing::warn!(open = left, ?deadline, "drain deadline passed; closing the remaining connections");
    } else {
        tracing::info!("drained");
    }
    // Spans of the last requests, if the collector takes them in time, and
    // the access log lines still buffered.
    let _ = tokio::time::timeout(Duration::from_secs(2), tracer.flush()).await;
    proxy.telemetry().access_log.flush_and_stop(Duration::from_secs(2));
    admin_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    drop(node_lock);
    Ok(())
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
struct HandoffSource {
    enrollment: Arc<Mutex<Enrollment>>,
    admin: (SocketAddr, std::os::fd::OwnedFd),
    metrics: Option<(SocketAddr, std::os::fd::OwnedFd)>,
    taken: tokio::sync::mpsc::UnboundedSender<()>,
}

impl handoff::Source for HandoffSource {
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

type Source = (
    watch::Receiver<Snapshot>,
    Arc<ReloadStats>,
    std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    Option<Arc<crate::k8s::Stats>>,
);

/// The mesh state's source: the local file, or the Kubernetes API.
async fn source(cfg: &Config) -> Result<Source, Error> {
    let Some(kube_cfg) = &cfg.kube else {
        let (state, reloads, watcher) = localfile::start(cfg.config_file.clone(), cfg.config_poll, cfg.scope.clone()).await?;
        localfile::check_node(&cfg.config_file, &state.borrow(), &cfg.node)?;
        return Ok((state, reloads, Box::pin(watcher), None));
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
    Ok((state, reloads, Box::pin(watcher), Some(stats)))
}

async fn reconcile_loop(
    enrollment: Arc<Mutex<Enrollment>>,
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
