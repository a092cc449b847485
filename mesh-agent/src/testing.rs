//! The agent in-process, for tests, at two sizes, without root,
//! namespaces or eBPF:
//! - [`Mesh`] and [`Agent`]: the data path alone, real [`Proxy`]s (one per
//!   node) serving the pods the state puts on their node, with their real
//!   listeners, tunnel, mTLS and HTTP layers over real loopback TCP;
//! - [`FileMesh`] and [`Node`]: whole agents, each built by
//!   [`crate::app::build`] from a config as the binary builds it (a real
//!   local file, run directory, admin and metrics listeners, enrollment),
//!   on the in-memory kernel [`MemoryKernel`].
//!
//! What stands in for the kernel and the control plane:
//! - a pod is a loopback address of its own ([`Loopback`]): its listeners
//!   listen there (so the agents of two "nodes" share the host's network
//!   namespace without sharing a port) and its connections start there;
//! - the connect hooks' original-destination map is a table filled before
//!   an app's connection reaches the outbound listener ([`Agent::connect`],
//!   [`MemoryKernel::connect`]);
//! - the CA is one in-memory [`Authority`] the agents get certificates
//!   from, through the same [`CertManager`] the agent uses;
//! - the mesh state is local-file YAML whose addresses are written `NET.n`:
//!   each mesh gets its own `127.x.y.0/24` for them, so tests run side by
//!   side.
//!
//! Not covered (the kernel's part, tested end to end in `tests/`):
//! redirection itself, `sk_lookup` capture of plaintext connections (the
//! plaintext listener listens, but a connection to it names the listener,
//! not the app), the hooks' refusal while no agent serves, failure policy
//! `open`, socket acceleration.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpStream, sync::watch};

use crate::{
    access_log::{AccessLog, Target},
    identity::{Authority, CertManager, LocalCaClient, ManagerConfig, SpiffeId},
    metrics::Metrics,
    proxy::{Loopback, OrigDstLookup, PodHandle, PodListeners, Ports, Proxy, Telemetry},
    state::{MeshState, PodKey, Snapshot},
    telemetry::trace::Tracer,
};

/// How long the harness waits for something that takes milliseconds (a
/// certificate): a guard against hanging, not a measurement.
const PATIENCE: Duration = Duration::from_secs(10);

mod kernel;
mod node;

pub use kernel::{KernelState, MemoryError, MemoryKernel, MemoryNetns};
pub use node::{FileMesh, Node};

/// A mesh state and its CA, shared by the agents of a test.
pub struct Mesh {
    state: watch::Sender<Snapshot>,
    ca: Arc<Authority>,
    net: [u8; 3],
}

impl Mesh {
    /// `yaml`: a local-file mesh state; every `NET` in it becomes this
    /// mesh's own `127.x.y` prefix.
    pub fn new(yaml: &str) -> Self {
        let net = fresh_net();
        let (tx, _) = watch::channel(Arc::new(on_loopback(parse(yaml), net)));
        Self { state: tx, ca: Arc::new(Authority::in_memory().expect("an in-memory CA")), net }
    }

    /// `NET.last`.
    pub fn ip(&self, last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(self.net[0], self.net[1], self.net[2], last))
    }

    /// `NET.last:port`.
    pub fn addr(&self, last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(last), port)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.borrow().clone()
    }

    /// The agent of `node`, serving each enrolled pod the state puts there,
    /// every one with its workload certificate.
    pub async fn agent(&self, node: &str) -> Agent {
        let orig = Arc::new(OrigDstTable::default());
        let metrics = Arc::new(Metrics::default());
        let ports = Ports::default();
        let proxy = self.proxy(node, orig.clone(), metrics.clone());
        let state = self.snapshot();
        let mut pods = BTreeMap::new();
        for pod in state.pods_on_node(node).filter(|p| state.is_enrolled(p)) {
            let id = SpiffeId::new(&state.trust_domain, &pod.key.namespace, &pod.service_account).expect("a valid workload identity");
            let mut cert = proxy.certs().ensure(&pod.key, &id);
            tokio::time::timeout(PATIENCE, cert.wait_for(Option::is_some))
                .await
                .expect("the workload certificate within the patience")
                .expect("the certificate manager runs");
            let ip = *pod.ips.first().expect("a pod with an address");
            let handle = PodHandle {
                key: pod.key.clone(),
                id,
                ips: pod.ips.clone(),
                sockets: Arc::new(Loopback::new(ip)),
                stats: Arc::default(),
                cert,
            };
            let listeners = proxy.serve_pod(&handle, None).unwrap_or_else(|e| panic!("serving {}: {e}", pod.key));
            pods.insert(pod.key.clone(), (ip, listeners));
        }
        Agent { proxy, orig, ports, pods, metrics }
    }
}

impl Mesh {
    /// A new mesh state (same rules as [`Mesh::new`]), for the agents to see.
    pub fn update(&self, yaml: &str) {
        self.state.send_replace(Arc::new(on_loopback(parse(yaml), self.net)));
    }

    /// A proxy for `node`, serving no pod yet: its certificates from this
    /// mesh's CA, original destinations from `orig`.
    pub fn proxy(&self, node: &str, orig: Arc<dyn OrigDstLookup>, metrics: Arc<Metrics>) -> Arc<Proxy> {
        let rx = self.state.subscribe();
        let certs = CertManager::new(Arc::new(LocalCaClient::new(self.ca.clone(), node, rx.clone())), ManagerConfig::default());
        let access_log = Arc::new(AccessLog::start(&Target::Off).expect("no access log"));
        let telemetry = Arc::new(Telemetry { metrics, access_log, tracer: Tracer::disabled() });
        Proxy::new(rx, orig, certs, Arc::default(), Ports::default(), tokio::runtime::Handle::current(), telemetry)
    }
}

/// A `127.x.y` prefix of a test's own.
pub(crate) fn fresh_net() -> [u8; 3] {
    // Random per process, then one after the other: tests of one binary
    // never share a prefix, and two binaries rarely do.
    static BASE: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let n = BASE.get_or_init(rand::random).wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    [127, (n >> 8) as u8 % 254 + 1, n as u8]
}

/// A test's mesh state: every `NET` written as the documentation prefix
/// the local file accepts (it refuses loopback pod addresses, rightly, on
/// a node), to be moved onto loopback by [`on_loopback`].
fn parse(yaml: &str) -> MeshState {
    let text = yaml.replace("NET", DOC_NET);
    crate::localfile::parse(Path::new("testing.yaml"), &text).expect("the test's mesh state parses")
}

/// The prefix a test's `NET` is written as in a file.
const DOC_NET: &str = "198.51.100";

/// The state with its `198.51.100.n` pod and service addresses moved to
/// `net.n`.
pub(crate) fn on_loopback(s: MeshState, net: [u8; 3]) -> MeshState {
    let move_ip = |ip: &mut IpAddr| {
        if let IpAddr::V4(v4) = ip
            && v4.octets()[..3] == [198, 51, 100]
        {
            *ip = IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], v4.octets()[3]));
        }
    };
    let mut pods: Vec<_> = s.pods.into_values().collect();
    for p in &mut pods {
        p.ips.iter_mut().for_each(move_ip);
    }
    let mut services = s.services;
    for svc in &mut services {
        svc.ips.iter_mut().for_each(move_ip);
        svc.endpoint_ips.iter_mut().flatten().for_each(move_ip);
    }
    MeshState::new(s.trust_domain, s.nodes, s.namespaces.into_values().collect(), pods, services)
        .with_peer_authentications(s.peer_authentications)
        .with_authorization_policies(s.authorization_policies)
        .with_routes(s.routes)
}

/// One node's agent.
pub struct Agent {
    proxy: Arc<Proxy>,
    orig: Arc<OrigDstTable>,
    ports: Ports,
    pods: BTreeMap<PodKey, (IpAddr, PodListeners)>,
    metrics: Arc<Metrics>,
}

impl Agent {
    /// A connection from `pod` (`namespace/name`) to `orig`, as the connect
    /// hooks would hand it to the agent: to the pod's outbound listener,
    /// with `orig` in the original-destination table.
    pub async fn connect(&self, pod: &str, orig: SocketAddr) -> TcpStream {
        let (ns, name) = pod.split_once('/').expect("a pod as namespace/name");
        let key = PodKey { namespace: ns.into(), name: name.into() };
        let (ip, _) = self.pods.get(&key).unwrap_or_else(|| panic!("{pod} is not served by this agent"));
        let sock = tokio::net::TcpSocket::new_v4().expect("a socket");
        sock.bind(SocketAddr::new(*ip, 0)).expect("binding the pod's address");
        let from = sock.local_addr().expect("a bound socket's address");
        self.orig.0.lock().expect("poisoned").insert(from, orig);
        sock.connect(SocketAddr::new(*ip, self.ports.outbound)).await.expect("the pod's outbound listener")
    }

    /// The addresses `pod`'s listeners are bound to.
    pub fn listeners(&self, pod: &str) -> Vec<SocketAddr> {
        let (ns, name) = pod.split_once('/').expect("a pod as namespace/name");
        let key = PodKey { namespace: ns.into(), name: name.into() };
        self.pods.get(&key).map(|(_, l)| l.addrs.clone()).unwrap_or_default()
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The agent's Prometheus text.
    pub fn metrics(&self) -> String {
        self.metrics.encode()
    }

    /// Starts draining, as on SIGTERM after the listeners closed: returns
    /// once the open connections are done or `deadline` passed (how many
    /// were left).
    pub fn drain(&self, deadline: Duration) -> tokio::task::JoinHandle<usize> {
        // At once: the next response already sees it.
        self.proxy.start_draining();
        let proxy = self.proxy.clone();
        tokio::spawn(async move { proxy.drain(deadline).await })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for (_, (_, l)) in std::mem::take(&mut self.pods) {
            l.close();
        }
    }
}

/// The original-destination map: client address -> where it was going.
#[derive(Default)]
pub(crate) struct OrigDstTable(Mutex<HashMap<SocketAddr, SocketAddr>>);

impl OrigDstLookup for OrigDstTable {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.0.lock().expect("poisoned").remove(&client)
    }
}
