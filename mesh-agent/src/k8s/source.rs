//! The watchers and the state they build.
//!
//! One kube-rs `watcher` + reflector per input, each restarting with
//! exponential backoff (0.8 s doubling to 30 s, with jitter) after any
//! error; a relist (after a `410 Gone`, a dropped watch or a restart)
//! replaces a store's contents at once, so the state converges to what the
//! API holds. While the API is unreachable the stores keep their contents
//! and the last state keeps serving. Each change wakes one builder that
//! turns the stores into a whole [`MeshState`] and publishes it when it
//! differs from the last one.
//!
//! | input | scope | why |
//! | --- | --- | --- |
//! | Namespaces | cluster | the enrollment label (`--enrollment-label`) and Istio ambient's |
//! | Pods, `spec.nodeName=<node>` | this node | the pods this agent enrolls (netns and cgroup found on the node) |
//! | Pods | cluster | destinations on other nodes: address, labels, service account (the identity to expect) |
//! | Services, EndpointSlices | cluster | virtual IPs, ports, `appProtocol`, ready endpoints |
//! | `security.istio.io/v1` AuthorizationPolicy, PeerAuthentication | cluster | policies (Istio's kinds, [`crate::objects`]); optional, see below |
//! | Gateway API `HTTPRoute`, `GRPCRoute` | cluster | routes (GAMMA: parentRefs to Services, [`super::gateway`]); optional, see below |
//!
//! A mesh object that cannot be read (unknown field, wrong type) or fails
//! validation is reported on its status; if an earlier version of the same
//! object was valid, that version stays in force, so a bad edit never
//! changes enforcement. Otherwise it is left out, unless leaving it out
//! would open access: a DENY policy, or a STRICT peer authentication, then
//! stands in a fail-closed form ([`crate::objects::istio`]).
//!
//! Istio's and Gateway API's CRDs are the cluster operator's to install,
//! and may be absent: the API answers 404 for their lists. Nobody can have
//! created such objects then, so "no policies" / "no routes" is exactly
//! right: the agent logs it once, builds its state without them, and the
//! watch keeps retrying with backoff, so they apply as soon as the CRDs are
//! installed. Any other error (a 403, the API down) keeps the state from
//! being built until the list succeeds. Route status is written as the
//! Gateway API spec says ([`super::gateway`]).

use std::{
    collections::BTreeMap,
    fmt::Debug,
    future::Future,
    hash::Hash,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    core::DeserializeGuard,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{Notify, watch};

use super::{
    convert::{self, Rejected},
    gateway, istio,
    status::{self, Verdict},
};
use crate::{
    route::HttpRoute,
    state::{self, MeshState, Snapshot},
};

/// Where a local pod's network namespace and cgroup are, found on the node.
pub trait PodLocator: Send + Sync {
    /// `(netns, cgroup)`, or why they cannot be found (yet).
    fn locate(&self, pod: &Pod) -> Result<(PathBuf, PathBuf), String>;
}

/// For a reader with no node of its own (the CA): never asked.
pub struct NoPods;

impl PodLocator for NoPods {
    fn locate(&self, _: &Pod) -> Result<(PathBuf, PathBuf), String> {
        Err("this reader has no pods of its own".into())
    }
}

#[derive(Clone)]
pub struct Options {
    /// This node; empty for a cluster-wide reader with no pods of its own
    /// (the CA): then there is no node-local pod watch.
    pub node: String,
    pub trust_domain: String,
    pub locator: Arc<dyn PodLocator>,
    /// Write `Accepted` conditions on the mesh objects' status.
    pub write_status: bool,
    /// Only namespaces and pods (the CA: where pods run, nothing else), so
    /// its RBAC stays that small.
    pub pods_only: bool,
    /// The namespace label that enrolls (`--enrollment-label`), the
    /// cluster id (`--cluster-id`).
    pub scope: state::Scope,
}

/// What `/status` reports under `kube`.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<StatsView>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsView {
    /// Per input: synced, events, errors, last error.
    pub watches: BTreeMap<&'static str, WatchView>,
    /// Whether a state has been built from the API (every input listed).
    pub built: bool,
    /// States built and published.
    pub generation: u64,
    /// Mesh objects refused, by `kind namespace/name`, with the reason.
    pub refused: BTreeMap<String, String>,
    /// Optional inputs whose resource the API does not have (Istio's CRDs
    /// not installed): they hold nothing.
    pub absent: Vec<&'static str>,
    /// Pods of this node left out of the state, with the reason.
    pub unlocated_pods: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchView {
    pub synced: bool,
    pub events: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

impl Stats {
    pub fn view(&self) -> StatsView {
        self.inner.lock().expect("poisoned").clone()
    }

    fn update(&self, f: impl FnOnce(&mut StatsView)) {
        f(&mut self.inner.lock().expect("poisoned"));
    }
}

/// One input: what it is called in logs and errors, and the RBAC it needs.
#[derive(Clone, Copy, Debug)]
struct Input {
    name: &'static str,
    /// API group ("" for core) and resource, for messages naming a permission.
    group: &'static str,
    resource: &'static str,
}

const NAMESPACES: Input = Input { name: "namespaces", group: "", resource: "namespaces" };
const LOCAL_PODS: Input = Input { name: "pods (this node)", group: "", resource: "pods" };
const PODS: Input = Input { name: "pods", group: "", resource: "pods" };
const SERVICES: Input = Input { name: "services", group: "", resource: "services" };
const SLICES: Input = Input { name: "endpointslices", group: "discovery.k8s.io", resource: "endpointslices" };
const AUTHZ: Input = Input { name: "authorizationpolicies", group: crate::objects::istio::SECURITY_GROUP, resource: "authorizationpolicies" };
const PEER_AUTH: Input = Input { name: "peerauthentications", group: crate::objects::istio::SECURITY_GROUP, resource: "peerauthentications" };
const VIRTUAL_SERVICES: Input = Input { name: "virtualservices", group: crate::objects::istio_traffic::NETWORKING_GROUP, resource: "virtualservices" };
const DESTINATION_RULES: Input = Input { name: "destinationrules", group: crate::objects::istio_traffic::NETWORKING_GROUP, resource: "destinationrules" };
const HTTP_ROUTES: Input = Input { name: "httproutes", group: crate::route::gateway::api::GROUP, resource: "httproutes" };
const GRPC_ROUTES: Input = Input { name: "grpcroutes", group: crate::route::gateway::api::GROUP, resource: "grpcroutes" };

/// Every (group, resource, verb) the watchers use (cluster-wide), with or
/// without [`Options::pods_only`].
pub fn watch_permissions(pods_only: bool) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let inputs: &[Input] = if pods_only { &[NAMESPACES, PODS] } else { &[NAMESPACES, PODS, SERVICES, SLICES, AUTHZ, PEER_AUTH, VIRTUAL_SERVICES, DESTINATION_RULES, HTTP_ROUTES, GRPC_ROUTES] };
    for i in inputs {
        for verb in ["list", "watch"] {
            out.push((i.group.to_owned(), i.resource.to_owned(), verb.to_owned()));
        }
    }
    out
}

/// What reporting the mesh objects' status takes (`write_status`).
pub fn status_permissions() -> Vec<(String, String, String)> {
    [AUTHZ, PEER_AUTH, VIRTUAL_SERVICES, DESTINATION_RULES, HTTP_ROUTES, GRPC_ROUTES]
        .iter()
        .map(|i| (i.group.to_owned(), format!("{}/status", i.resource), "patch".to_owned()))
        .collect()
}

/// An operator's reading of a watch error: a 403 names the permission, a
/// 404 on a mesh kind says the CRDs are missing.
pub fn describe(input: &str, group: &str, resource: &str, e: &watcher::Error) -> String {
    let api = |e: &kube::Error| match e {
        kube::Error::Api(s) => Some((s.code, s.message.clone())),
        _ => None,
    };
    let status = match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => api(e),
        watcher::Error::WatchError(s) => Some((s.code, s.message.clone())),
        watcher::Error::NoResourceVersion => None,
    };
    let verb = match e {
        watcher::Error::InitialListFailed(_) => "list",
        _ => "watch",
    };
    let g = if group.is_empty() { "\"\" (core)".to_owned() } else { format!("{group:?}") };
    match status {
        Some((403, msg)) => format!(
            "{input}: permission denied: the agent's service account may not {verb} {resource} (API group {g}); \
             grant `{verb}` (and `list`, `watch`) on {resource} in its ClusterRole (deploy/rbac.yaml). API server said: {msg}"
        ),
        Some((404, msg)) if group == crate::route::gateway::api::GROUP => format!(
            "{input}: the API has no {resource}.{group}: Gateway API's CRDs are not installed, so no routes are read \
             (the agent works on without them and reads them once they are installed). API server said: {msg}"
        ),
        Some((404, msg)) if group == crate::objects::istio::SECURITY_GROUP => format!(
            "{input}: the API has no {resource}.{group}: Istio's CRDs are not installed, so there are no such policies; \
             watching on, they apply once the CRDs are installed. API server said: {msg}"
        ),
        _ => format!("{input}: {}", crate::error_chain(e)),
    }
}

/// Starts every watcher; the state is published once every input has been
/// listed. The returned future runs the watchers and the builder.
pub fn start(client: Client, opts: Options) -> (watch::Receiver<Snapshot>, Arc<Stats>, impl Future<Output = ()>) {
    let nodes = if opts.node.is_empty() { vec![] } else { vec![opts.node.clone()] };
    let empty = MeshState::new(opts.trust_domain.clone(), nodes, vec![], vec![], vec![]).with_scope(opts.scope.clone());
    let (tx, rx) = watch::channel(Arc::new(empty));
    let stats = Arc::new(Stats::default());
    let wake = Arc::new(Notify::new());
    let mut tasks: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = Vec::new();

    macro_rules! input {
        ($api:expr, $cfg:expr, $what:expr) => {{
            let (store, fut) = reflect($api, $cfg, $what, None, stats.clone(), wake.clone());
            tasks.push(Box::pin(fut));
            store
        }};
    }
    // Istio's and Gateway API's kinds: a 404 (CRDs not installed) counts
    // as listed, empty.
    macro_rules! optional {
        ($api:expr, $what:expr) => {{
            let (absent, absent_rx) = watch::channel(false);
            let (store, fut) = reflect($api, watcher::Config::default(), $what, Some(absent), stats.clone(), wake.clone());
            tasks.push(Box::pin(fut));
            (store, absent_rx)
        }};
    }
    let local_cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node));
    let stores = Stores {
        namespaces: input!(Api::<Namespace>::all(client.clone()), watcher::Config::default(), NAMESPACES),
        local_pods: (!opts.node.is_empty()).then(|| input!(Api::<Pod>::all(client.clone()), local_cfg, LOCAL_PODS)),
        pods: input!(Api::<Pod>::all(client.clone()), watcher::Config::default(), PODS),
        services: (!opts.pods_only).then(|| input!(Api::<Service>::all(client.clone()), watcher::Config::default(), SERVICES)),
        slices: (!opts.pods_only).then(|| input!(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default(), SLICES)),
        authz: (!opts.pods_only).then(|| optional!(Api::all(client.clone()), AUTHZ)),
        peer_auth: (!opts.pods_only).then(|| optional!(Api::all(client.clone()), PEER_AUTH)),
        virtual_services: (!opts.pods_only).then(|| optional!(Api::all(client.clone()), VIRTUAL_SERVICES)),
        destination_rules: (!opts.pods_only).then(|| optional!(Api::all(client.clone()), DESTINATION_RULES)),
        http_routes: (!opts.pods_only).then(|| optional!(Api::all(client.clone()), HTTP_ROUTES)),
        grpc_routes: (!opts.pods_only).then(|| optional!(Api::all(client.clone()), GRPC_ROUTES)),
    };
    let builder = build_loop(client, opts, stores, tx, stats.clone(), wake);
    let fut = async move {
        let watchers = futures::future::join_all(tasks);
        tokio::select! {
            _ = watchers => {}
            _ = builder => {}
        }
    };
    (rx, stats, fut)
}

// Pods lose what the mesh never reads before they are stored: a node agent
// holds every pod of the cluster.
fn slim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    if let Some(spec) = p.spec.as_mut() {
        for c in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
            c.env = None;
            c.env_from = None;
            c.volume_mounts = None;
            c.command = None;
            c.args = None;
        }
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
    }
}

/// `absent`: for an optional input, set while the API has no such resource
/// (404), which counts as listed and empty.
fn reflect<K>(
    api: Api<K>,
    cfg: watcher::Config,
    what: Input,
    absent: Option<watch::Sender<bool>>,
    stats: Arc<Stats>,
    wake: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()> + Send)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static + Slim,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let (store, writer) = reflector::store();
    let fut = async move {
        let mut events = std::pin::pin!(
            watcher(api, cfg)
                .default_backoff()
                .modify(K::slim)
                .reflect(writer)
        );
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    let done = matches!(ev, watcher::Event::InitDone);
                    if done
                        && let Some(a) = &absent
                        && a.send_replace(false)
                    {
                        tracing::info!(input = what.name, "the API serves {} now: they are read", what.resource);
                        stats.update(|s| s.absent.retain(|n| *n != what.name));
                    }
                    stats.update(|s| {
                        let w = s.watches.entry(what.name).or_default();
                        w.events += 1;
                        if done {
                            w.synced = true;
                            w.last_error = None;
                        }
                    });
                    if done {
                        tracing::debug!(input = what.name, "listed");
                    }
                    wake.notify_one();
                }
                Err(e) => {
                    let msg = describe(what.name, what.group, what.resource, &e);
                    if let Some(a) = &absent
                        && is_not_found(&e)
                    {
                        // Logged once per absence, not at every retry.
                        if !a.send_replace(true) {
                            tracing::info!("{msg}");
                            stats.update(|s| s.absent.push(what.name));
                            wake.notify_one();
                        }
                        continue;
                    }
                    tracing::warn!("kubernetes watch failed (retrying with backoff): {msg}");
                    stats.update(|s| {
                        let w = s.watches.entry(what.name).or_default();
                        w.errors += 1;
                        w.last_error = Some(msg);
                    });
                }
            }
        }
    };
    (store, fut)
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// What a watcher drops from each object before storing it.
pub trait Slim {
    fn slim(&mut self) {}
}
impl Slim for Pod {
    fn slim(&mut self) {
        slim_pod(self);
    }
}
impl Slim for Namespace {}
impl Slim for Service {}
impl Slim for EndpointSlice {
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
    }
}
impl<K> Slim for DeserializeGuard<K> {}
impl Slim for istio::AuthorizationPolicy {
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
    }
}
impl Slim for istio::PeerAuthentication {
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
    }
}
impl Slim for istio::VirtualService {
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
    }
}
impl Slim for istio::DestinationRule {
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
    }
}

/// An optional input: its store, and whether its resource is absent.
type Optional<K> = (Store<K>, watch::Receiver<bool>);

struct Stores {
    namespaces: Store<Namespace>,
    local_pods: Option<Store<Pod>>,
    pods: Store<Pod>,
    services: Option<Store<Service>>,
    slices: Option<Store<EndpointSlice>>,
    authz: Option<Optional<istio::AuthorizationPolicy>>,
    peer_auth: Option<Optional<istio::PeerAuthentication>>,
    virtual_services: Option<Optional<istio::VirtualService>>,
    destination_rules: Option<Optional<istio::DestinationRule>>,
    http_routes: Option<Optional<DeserializeGuard<gateway::HttpRoute>>>,
    grpc_routes: Option<Optional<DeserializeGuard<gateway::GrpcRoute>>>,
}

/// A store's objects; none for an input not watched.
fn objects<K: Clone + kube::runtime::reflector::Lookup>(store: &Option<Store<K>>) -> Vec<Arc<K>>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store.as_ref().map(Store::state).unwrap_or_default()
}

async fn ready<K: Clone + kube::runtime::reflector::Lookup>(store: &Option<Store<K>>)
where
    K::DynamicType: Eq + Hash + Clone,
{
    if let Some(s) = store {
        let _ = s.wait_until_ready().await;
    }
}

/// Listed, or known absent.
async fn optional_ready<K: Clone + kube::runtime::reflector::Lookup>(input: &Option<Optional<K>>)
where
    K::DynamicType: Eq + Hash + Clone,
{
    if let Some((store, absent)) = input {
        let mut absent = absent.clone();
        tokio::select! {
            _ = store.wait_until_ready() => {}
            _ = absent.wait_for(|a| *a) => {}
        }
    }
}

fn optional_objects<K: Clone + kube::runtime::reflector::Lookup>(input: &Option<Optional<K>>) -> Vec<Arc<K>>
where
    K::DynamicType: Eq + Hash + Clone,
{
    input.as_ref().map(|(s, _)| s.state()).unwrap_or_default()
}

impl Stores {
    async fn wait_until_ready(&self) {
        let _ = self.namespaces.wait_until_ready().await;
        if let Some(local) = &self.local_pods {
            let _ = local.wait_until_ready().await;
        }
        let _ = self.pods.wait_until_ready().await;
        ready(&self.services).await;
        ready(&self.slices).await;
        optional_ready(&self.authz).await;
        optional_ready(&self.peer_auth).await;
        optional_ready(&self.virtual_services).await;
        optional_ready(&self.destination_rules).await;
        optional_ready(&self.http_routes).await;
        optional_ready(&self.grpc_routes).await;
    }
}

/// The last valid version of each mesh object, by `namespace/name` and uid.
struct LastValid<T> {
    by_key: BTreeMap<(String, String), (String, T)>,
}

impl<T> Default for LastValid<T> {
    fn default() -> Self {
        Self { by_key: BTreeMap::new() }
    }
}

/// The versions in force and a verdict per object.
struct Judged<T> {
    in_force: Vec<T>,
    verdicts: Vec<Verdict>,
}

impl<T: Clone> LastValid<T> {
    /// Judges every object of a store, remembering the valid ones. A
    /// refused object with no earlier valid version enforces its stand-in,
    /// if it has one (never remembered: it is judged again each time).
    fn judge<O>(
        &mut self,
        kind: &'static str,
        objects: Vec<Arc<O>>,
        convert: impl Fn(&O) -> (k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, Result<T, Rejected<T>>),
    ) -> Judged<T> {
        let mut verdicts = Vec::new();
        let mut seen = BTreeMap::new();
        let mut stand_ins = Vec::new();
        for obj in objects {
            let (meta, result) = convert(&obj);
            let key = (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
            let uid = meta.uid.clone().unwrap_or_default();
            seen.insert(key.clone(), ());
            let (refused, fails_closed) = match result {
                Ok(t) => {
                    self.by_key.insert(key.clone(), (uid, t));
                    (None, false)
                }
                Err(Rejected { refused, stand_in }) => {
                    // An earlier valid version of this same object stays.
                    if self.by_key.get(&key).is_some_and(|(u, _)| *u != uid) {
                        self.by_key.remove(&key);
                    }
                    let earlier = self.by_key.contains_key(&key);
                    let fails_closed = !earlier && stand_in.is_some();
                    if fails_closed {
                        stand_ins.extend(stand_in.map(|s| *s));
                    }
                    (Some(refused), fails_closed)
                }
            };
            verdicts.push(Verdict { kind, meta, refused, fails_closed });
        }
        self.by_key.retain(|k, _| seen.contains_key(k));
        let mut in_force: Vec<T> = self.by_key.values().map(|(_, t)| t.clone()).collect();
        in_force.extend(stand_ins);
        Judged { in_force, verdicts }
    }
}

async fn build_loop(
    client: Client,
    opts: Options,
    stores: Stores,
    tx: watch::Sender<Snapshot>,
    stats: Arc<Stats>,
    wake: Arc<Notify>,
) {
    stores.wait_until_ready().await;
    tracing::info!("kubernetes inputs listed; building the mesh state");
    let mut authz = LastValid::default();
    let mut peer_auth = LastValid::default();
    let mut traffic = (LastValid::default(), LastValid::default());
    let mut routes = RouteMemory::new();
    let statuses = status::Writer::new(client.clone(), opts.write_status);
    loop {
        let built = build(&opts, &stores, &mut authz, &mut peer_auth, &mut traffic, &mut routes);
        let unlocated = !built.unlocated.is_empty();
        stats.update(|s| {
            s.refused = built
                .verdicts
                .iter()
                .filter_map(|v| v.refused.as_ref().map(|r| (v.describe(), r.message.clone())))
                .chain(built.route_refusals.clone())
                .collect();
            s.unlocated_pods = built.unlocated.clone();
            s.built = true;
        });
        let changed = tx.send_if_modified(|cur| {
            if **cur == built.state {
                return false;
            }
            *cur = Arc::new(built.state);
            true
        });
        if changed {
            stats.update(|s| s.generation += 1);
            tracing::info!(pods = tx.borrow().pods.len(), services = tx.borrow().services.len(), "mesh state updated from kubernetes");
        }
        statuses.report(built.verdicts);
        // Every agent judges a route the same way; the first write makes
        // the others' identical verdicts no-ops (compared with the status
        // the watch shows).
        if opts.write_status {
            for w in built.route_status {
                tokio::spawn(gateway::write_status(client.clone(), w.kind, w.meta, w.parents));
            }
        }
        // Batch bursts (a relist is many events); retry locating pods whose
        // sandbox was not there yet.
        if unlocated {
            let _ = tokio::time::timeout(Duration::from_secs(2), wake.notified()).await;
        } else {
            wake.notified().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Built {
    state: MeshState,
    verdicts: Vec<Verdict>,
    unlocated: BTreeMap<String, String>,
    route_status: Vec<RouteStatusWrite>,
    route_refusals: BTreeMap<String, String>,
}

fn build(
    opts: &Options,
    stores: &Stores,
    authz: &mut LastValid<state::AuthorizationPolicy>,
    peer_auth: &mut LastValid<state::PeerAuthentication>,
    traffic: &mut (LastValid<state::traffic::VirtualService>, LastValid<state::traffic::DestinationRule>),
    routes: &mut RouteMemory,
) -> Built {
    let namespaces: Vec<_> = stores.namespaces.state().iter().filter_map(|n| convert::namespace(n)).collect();

    let mut unlocated = BTreeMap::new();
    let mut pods: BTreeMap<state::PodKey, state::Pod> = BTreeMap::new();
    for p in stores.pods.state() {
        if stores.local_pods.is_some() && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(opts.node.as_str()) {
            continue; // from the node's own watch, below
        }
        if let Ok(pod) = convert::pod(&p, None) {
            pods.insert(pod.key.clone(), pod);
        }
    }
    for p in stores.local_pods.iter().flat_map(|s| s.state()) {
        let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
        let paths = match opts.locator.locate(&p) {
            Ok(paths) => paths,
            Err(reason) => {
                // Not running yet is normal; report only pods that have an IP.
                if convert::pod(&p, None).is_ok() {
                    unlocated.insert(key, reason);
                }
                continue;
            }
        };
        match convert::pod(&p, Some(paths)) {
            Ok(pod) => {
                pods.insert(pod.key.clone(), pod);
            }
            Err(why) => tracing::debug!(pod = %key, "not in the mesh state: {why}"),
        }
    }
    let slices = objects(&stores.slices);
    let by_service = convert::slices_by_service(slices.iter().map(|s| s.as_ref()));
    let services: Vec<state::Service> = objects(&stores.services)
        .iter()
        .filter_map(|s| {
            let key = (s.namespace().unwrap_or_default(), s.name_any());
            convert::service(s, by_service.get(&key).map(Vec::as_slice).unwrap_or(&[]))
        })
        .collect();

    let a = authz.judge("AuthorizationPolicy", optional_objects(&stores.authz), |o| (o.metadata.clone(), convert::authorization_policy(o)));
    let p = peer_auth.judge("PeerAuthentication", optional_objects(&stores.peer_auth), |o| (o.metadata.clone(), convert::peer_authentication(o)));
    let vs = traffic.0.judge("VirtualService", optional_objects(&stores.virtual_services), |o| (o.metadata.clone(), convert::virtual_service(o)));
    let dr = traffic.1.judge("DestinationRule", optional_objects(&stores.destination_rules), |o| (o.metadata.clone(), convert::destination_rule(o)));
    let (mut in_force, route_status, route_refusals) = gateway_routes(stores, routes, &services);
    let mut authz_in_force = a.in_force;
    authz_in_force.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
    let mut peer_in_force = p.in_force;
    peer_in_force.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
    in_force.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
    let mut vs_in_force = vs.in_force;
    vs_in_force.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
    let mut dr_in_force = dr.in_force;
    dr_in_force.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));

    let state = MeshState::new(
        opts.trust_domain.clone(),
        if opts.node.is_empty() { vec![] } else { vec![opts.node.clone()] },
        namespaces,
        dedup_ips(pods, &opts.node),
        services,
    )
    .with_peer_authentications(peer_in_force)
    .with_authorization_policies(authz_in_force)
    .with_routes(in_force)
    .with_istio_traffic(vs_in_force, dr_in_force)
    .with_scope(opts.scope.clone());
    let mut verdicts = a.verdicts;
    verdicts.extend(p.verdicts);
    verdicts.extend(vs.verdicts);
    verdicts.extend(dr.verdicts);
    Built { state, verdicts, unlocated, route_status, route_refusals }
}

/// The last routes of each Gateway API object (by kind, namespace, name)
/// whose spec the agent could apply, with the object's uid: an edit the
/// agent cannot apply (`UnsupportedValue`) leaves the earlier version in
/// force, as for the mesh's own objects.
type RouteMemory = BTreeMap<(&'static str, String, String), (String, Vec<HttpRoute>)>;

/// A route object whose `status.parents` must be written.
struct RouteStatusWrite {
    kind: &'static str,
    meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    parents: Vec<serde_json::Value>,
}

/// Every HTTPRoute and GRPCRoute judged against the services: the routes
/// in force, the status writes due, and the refusals for `/status`.
fn gateway_routes(stores: &Stores, memory: &mut RouteMemory, services: &[state::Service]) -> (Vec<HttpRoute>, Vec<RouteStatusWrite>, BTreeMap<String, String>) {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let mut judged = Vec::new();
    let mut refusals = BTreeMap::new();
    fn read<S>(kind: &str, objs: Vec<Arc<DeserializeGuard<gateway::RouteResource<S>>>>, services: &[state::Service], judged: &mut Vec<gateway::Judged>, refusals: &mut BTreeMap<String, String>)
    where
        gateway::RouteResource<S>: gateway::RouteKind + Resource<DynamicType = ()>,
    {
        for o in objs {
            match &o.0 {
                Ok(r) => judged.push(gateway::judge(r, r.status.as_ref(), services)),
                // Unreadable (a field of another channel, a wrong type): its
                // parents cannot be known, so no status; reported here.
                Err(invalid) => {
                    let m = &invalid.metadata;
                    refusals.insert(format!("{kind} {}/{}", m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default()), format!("cannot read the object: {}", invalid.error));
                }
            }
        }
    }
    read("HTTPRoute", optional_objects(&stores.http_routes), services, &mut judged, &mut refusals);
    read("GRPCRoute", optional_objects(&stores.grpc_routes), services, &mut judged, &mut refusals);
    let mut in_force = Vec::new();
    let mut writes = Vec::new();
    let mut seen = BTreeMap::new();
    for j in judged {
        let key = (j.kind, j.meta.namespace.clone().unwrap_or_default(), j.meta.name.clone().unwrap_or_default());
        let uid = j.meta.uid.clone().unwrap_or_default();
        seen.insert(key.clone(), ());
        let unsupported = j.converted.parents.iter().any(|p| p.accepted.reason == "UnsupportedValue");
        if let Some(why) = j.converted.refusal() {
            refusals.insert(format!("{} {}/{}", key.0, key.1, key.2), why);
        }
        match memory.get(&key) {
            Some((u, earlier)) if unsupported && *u == uid => in_force.extend(earlier.iter().cloned()),
            _ => {
                memory.insert(key, (uid, j.converted.routes.clone()));
                in_force.extend(j.converted.routes.iter().cloned());
            }
        }
        if let Some(parents) = gateway::desired_parents(&j, &now) {
            writes.push(RouteStatusWrite { kind: j.kind, meta: j.meta, parents });
        }
    }
    memory.retain(|k, _| seen.contains_key(k));
    (in_force, writes, refusals)
}

/// During churn two pods can briefly claim one IP (a deleted pod's address
/// reused before its deletion arrives). The state maps an address to one
/// pod, so keep the local one, else the first by name, and drop the other's
/// claim.
fn dedup_ips(pods: BTreeMap<state::PodKey, state::Pod>, node: &str) -> Vec<state::Pod> {
    let mut ordered: Vec<state::Pod> = pods.into_values().collect();
    ordered.sort_by_key(|p| p.node != node);
    let mut taken = std::collections::HashSet::new();
    let mut out = Vec::new();
    for mut p in ordered {
        p.ips.retain(|ip| taken.insert(*ip));
        if !p.ips.is_empty() {
            out.push(p);
        }
    }
    out
}
