//! Enrollment: keeps the kernel (programs attached, map entries) and the
//! in-pod listeners in line with the mesh state for the pods on this node.
//!
//! Order matters for never black-holing a connection: on enrol the listeners
//! open before the pod's map entry appears; on leaving the map entry goes
//! first and the listeners close a little later, so a connect redirected just
//! before the change still finds its listener. Connections already relayed are
//! never touched by enrollment changes.
//!
//! Kernel state outlives the agent (it is pinned, see [`crate::ebpf`]):
//! stopping the agent closes its listeners and nothing else, so an enrolled
//! pod fails closed until the next agent serves it (or, with failure policy
//! `open`, goes direct). A pod is enrolled (redirected and captured) as soon
//! as its listeners are open, before its certificate arrives: meanwhile its
//! connections to mesh destinations fail (no identity to present), never go
//! around the mesh, and the agent is not ready.
//!
//! The kernel is reached only through [`Kernel`] ([`kernel`]): the eBPF
//! datapath on a node, an in-memory one in tests, so this module runs
//! without root in `enroll/tests.rs` and in the in-process agents.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::AsFd as _,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use crate::{
    ebpf,
    identity::SpiffeId,
    proxy::{PodHandle, PodListeners, PodSockets as _, PodStats, PodStatsView, Proxy},
    state::{PodKey, Snapshot},
};

pub mod kernel;

pub use kernel::{Kernel, KeepPod};

/// How long a pod's listeners stay open after it leaves the mesh.
const LISTENER_GRACE: Duration = Duration::from_secs(2);

struct ManagedPod<N> {
    netns_path: PathBuf,
    cgroup: PathBuf,
    ips: Vec<IpAddr>,
    netns: Option<Arc<N>>,
    listeners: Option<PodListeners>,
    enrolled: bool,
    /// Enrolled but without a workload certificate yet.
    cert_pending: bool,
    /// The state wants the pod in the mesh (its namespace is labelled).
    wanted: bool,
    /// Its failure policy is `open`.
    fail_open: bool,
    stats: Arc<PodStats>,
    error: Option<String>,
    /// The kernel side was set up once; anything found missing later is drift.
    set_up: bool,
    /// The workload identity the listeners serve (while enrolled).
    id: Option<SpiffeId>,
    /// Wakes reconcile whenever the pod's certificate comes or goes.
    cert_watcher: Option<tokio::task::JoinHandle<()>>,
}

impl<N> ManagedPod<N> {
    fn stop_cert_watch(&mut self) {
        if let Some(w) = self.cert_watcher.take() {
            w.abort();
        }
    }
}

/// What `ensure` needs besides the kernel and the pod.
struct EnsureCtx<'a> {
    proxy: &'a Arc<Proxy>,
    outbound_port: u16,
    wake: &'a Arc<tokio::sync::Notify>,
    fail_open: bool,
    /// The pod's listeners from the previous agent, if it handed them over.
    inherited: Option<(u64, [std::os::fd::OwnedFd; 3])>,
}

/// What one reconcile pass did to one pod.
#[derive(Default)]
struct Changes {
    changed: u32,
    repaired: Vec<String>,
}

impl Changes {
    /// Something had to be (re)done; if it had been done before, it is a repair.
    fn note(&mut self, was_done: bool, what: String) {
        self.changed += 1;
        if was_done {
            self.repaired.push(what);
        }
    }
}

pub struct Enrollment<K: Kernel> {
    node: String,
    /// The eBPF datapath on a node; in tests, an in-memory one.
    kernel: K,
    proxy: Arc<Proxy>,
    outbound_port: u16,
    /// The mesh-wide failure policy (`--failure-policy`); a namespace label
    /// overrides it.
    fail_open: bool,
    /// Pinned state of pods this agent does not manage was removed once.
    pruned: bool,
    /// Listening sockets handed over by the agent this one replaces, by
    /// pod, with the netns cookie they belong to; used once.
    inherited: BTreeMap<PodKey, (u64, [std::os::fd::OwnedFd; 3])>,
    /// A successor is taking over: this agent no longer touches the kernel.
    pub paused: bool,
    pods: BTreeMap<PodKey, ManagedPod<K::Netns>>,
    /// Reconcile passes that had to change something.
    pub changes: u64,
    /// Drift found and undone: programs, map entries or listeners the agent
    /// had set up that were gone.
    pub repairs: u64,
    /// Asks the reconcile loop for a pass now (a certificate arrived).
    pub wake: Arc<tokio::sync::Notify>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    name: String,
    namespace: String,
    ip: Option<IpAddr>,
    enrolled: bool,
    certificate_pending: bool,
    failure_policy: &'static str,
    attached: bool,
    inbound_capture: bool,
    listeners: Vec<String>,
    ebpf: EbpfCounters,
    proxy: PodStatsView,
    identity: Option<String>,
    certificate: Option<crate::identity::manager::WorkloadCertStatus>,
    error: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EbpfCounters {
    redirected: u64,
    passed_through: u64,
}

impl<K: Kernel> Enrollment<K> {
    pub fn new(node: String, kernel: K, proxy: Arc<Proxy>, outbound_port: u16, fail_open: bool) -> Self {
        Self {
            node,
            kernel,
            proxy,
            outbound_port,
            fail_open,
            pruned: false,
            inherited: BTreeMap::new(),
            paused: false,
            pods: BTreeMap::new(),
            changes: 0,
            repairs: 0,
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Brings this node's pods in line with `state`. Failures are per pod:
    /// recorded, logged, and retried on the next pass. `complete`: the state
    /// lists every pod of the node (not a Kubernetes source still syncing),
    /// so pinned state of any other pod can go.
    pub fn reconcile(&mut self, state: &Snapshot, complete: bool) {
        if self.paused {
            return;
        }
        let node = self.node.clone();
        let wanted: BTreeMap<&PodKey, _> = state
            .pods_on_node(&node)
            .map(|p| (&p.key, (p, state.is_enrolled(p), state.fails_open(p, self.fail_open))))
            .collect();

        let gone: Vec<PodKey> = self.pods.keys().filter(|k| !wanted.contains_key(k)).cloned().collect();
        for key in gone {
            if let Some(mp) = self.pods.remove(&key) {
                tracing::info!(pod = %key, "pod left this node");
                self.forget_pod(&key, mp);
                self.changes += 1;
            }
        }

        for (key, (pod, enrolled, fail_open)) in wanted {
            let id = SpiffeId::new(&state.trust_domain, &pod.key.namespace, &pod.service_account)
                .map_err(|e| format!("pod {key} has no valid workload identity: {e}"));
            // A pod whose sandbox changed is a new pod to the kernel.
            let sandbox_changed = self
                .pods
                .get(key)
                .is_some_and(|mp| mp.netns_path != pod.netns || mp.cgroup != pod.cgroup || mp.ips != pod.ips);
            if sandbox_changed && let Some(old) = self.pods.remove(key) {
                self.forget_pod(key, old);
            }
            self.pods.entry(key.clone()).or_insert_with(|| ManagedPod {
                netns_path: pod.netns.clone(),
                cgroup: pod.cgroup.clone(),
                ips: pod.ips.clone(),
                netns: None,
                listeners: None,
                enrolled: false,
                cert_pending: false,
                wanted: false,
                fail_open: false,
                stats: Arc::new(PodStats::default()),
                error: None,
                set_up: false,
                id: None,
                cert_watcher: None,
            });
            let mp = self.pods.get_mut(key).expect("inserted above");
            let inherited = self.inherited.remove(key);
            let ctx = EnsureCtx { proxy: &self.proxy, outbound_port: self.outbound_port, wake: &self.wake, fail_open, inherited };
            mp.wanted = enrolled;
            mp.fail_open = fail_open;
            let result = id.and_then(|id| Self::ensure(&mut self.kernel, ctx, key, mp, enrolled, id));
            match result {
                Ok(ch) => {
                    if ch.changed > 0 {
                        self.changes += 1;
                    }
                    for what in &ch.repaired {
                        tracing::warn!(pod = %key, repaired = %what, "drift repaired");
                    }
                    self.repairs += ch.repaired.len() as u64;
                    mp.error = None;
                }
                Err(e) => {
                    if mp.error.as_deref() != Some(&e) {
                        tracing::error!(pod = %key, error = %e, "cannot enrol pod");
                    }
                    mp.error = Some(e);
                }
            }
        }
        if complete {
            self.prune();
        }
    }

    /// Removes pinned state of pods this agent does not manage (they left
    /// the mesh or the node while no agent ran), once every local pod is
    /// known to the kernel side: a pod whose namespace could not be opened
    /// yet might own some of it.
    fn prune(&mut self) {
        let mut keep = Vec::with_capacity(self.pods.len());
        for mp in self.pods.values() {
            let Some(ns) = &mp.netns else { return };
            keep.push(KeepPod { cgroup: &mp.cgroup, cookie: ns.network(), ips: &mp.ips });
        }
        let Some(removed) = self.kernel.retain(&keep) else { return };
        if removed > 0 || !self.pruned {
            tracing::info!(removed, "pinned state checked against this node's pods");
        }
        self.pruned = true;
    }

    /// Makes one pod's kernel and listener state match `enrolled`. Returns
    /// the changes made; the ones that undid drift (state the agent had set
    /// up and found gone) are repairs.
    fn ensure(
        kernel: &mut K,
        ctx: EnsureCtx<'_>,
        key: &PodKey,
        mp: &mut ManagedPod<K::Netns>,
        enrolled: bool,
        id: SpiffeId,
    ) -> Result<Changes, String> {
        let EnsureCtx { proxy, outbound_port, wake, fail_open, inherited } = ctx;
        let mut ch = Changes::default();
        if mp.netns.is_none() {
            mp.netns = Some(Arc::new(kernel.open_netns(&mp.netns_path, &mp.ips).map_err(|e| e.to_string())?));
            ch.changed += 1;
        }
        let netns = mp.netns.clone().expect("opened above");
        // The kernel's cookie for the namespace: what the programs key on.
        let cookie = netns.network();

        let n = kernel.attach(&mp.cgroup).map_err(|e| crate::error_chain(&e))?;
        if n > 0 {
            ch.note(mp.set_up, format!("{n} cgroup program(s) attached to {}", mp.cgroup.display()));
        }
        if kernel
            .attach_netns(&netns, &mp.netns_path)
            .map_err(|e| crate::error_chain(&e))?
        {
            ch.note(mp.set_up, format!("inbound capture attached to {}", mp.netns_path.display()));
        }
        kernel.track(cookie).map_err(|e| e.to_string())?;

        if enrolled {
            // The certificate is fetched in the background (and rotated);
            // the listeners serve with whatever the channel holds.
            let cert = proxy.certs().ensure(key, &id);
            if mp.id.as_ref() != Some(&id) {
                // A new identity needs listeners whose TLS serves it.
                if let Some(l) = mp.listeners.take() {
                    close_later(l);
                }
                mp.id = Some(id.clone());
                mp.stop_cert_watch();
            }
            if mp.cert_watcher.is_none() {
                let mut w = cert.clone();
                let wake = wake.clone();
                mp.cert_watcher = Some(tokio::spawn(async move {
                    while w.changed().await.is_ok() {
                        wake.notify_one();
                    }
                }));
            }
            let has_cert = cert.borrow().is_some();
            if mp.listeners.as_ref().is_none_or(|l| !l.is_serving()) {
                let handle = PodHandle {
                    key: key.clone(),
                    id,
                    ips: mp.ips.clone(),
                    sockets: netns.clone(),
                    stats: mp.stats.clone(),
                    cert,
                };
                let inherited = match inherited {
                    Some((c, fds)) if c == cookie && mp.listeners.is_none() => Some(fds),
                    Some(_) => {
                        tracing::warn!(pod = %key, "handed-over listeners belong to another network namespace; opening new ones");
                        None
                    }
                    None => None,
                };
                let took_over = inherited.is_some();
                mp.listeners = Some(proxy.serve_pod(&handle, inherited).map_err(|e| e.to_string())?);
                if took_over {
                    tracing::info!(pod = %key, "serving the listeners handed over by the previous agent");
                }
                ch.note(mp.enrolled, "in-pod listeners opened".into());
            }
            let listeners = mp.listeners.as_ref().expect("opened above");
            for ip in &mp.ips {
                if !kernel.has_inbound_listener(*ip) {
                    kernel
                        .set_inbound_listener(*ip, listeners.plaintext.as_fd())
                        .map_err(|e| e.to_string())?;
                    ch.note(mp.enrolled, format!("inbound capture entry for {ip} set"));
                }
                if !kernel.set_captured(*ip, fail_open).map_err(|e| e.to_string())? {
                    ch.note(mp.enrolled, format!("capture mark for {ip} set"));
                }
            }
            // Enrolled with or without a certificate: without one (until it
            // arrives, or while the CA is down past expiry) the pod's
            // connections to mesh destinations fail rather than go around
            // the mesh; the agent reports not ready meanwhile.
            if !has_cert && !mp.cert_pending {
                tracing::warn!(pod = %key, "no workload certificate yet: the pod's connections to the mesh fail until one arrives (fail closed)");
            }
            mp.cert_pending = !has_cert;
            let entry = ebpf::pod_entry(&mp.ips, outbound_port, fail_open);
            if kernel.enrollment(cookie) != Some(entry) {
                kernel.enroll(cookie, entry).map_err(|e| e.to_string())?;
                if !mp.enrolled {
                    tracing::info!(pod = %key, "pod enrolled: its new connections go through the agent");
                }
                ch.note(mp.enrolled, "enrollment map entry set".into());
            }
            mp.enrolled = true;
        } else {
            if mp.enrolled || kernel.enrollment(cookie).is_some() {
                kernel.unenroll(cookie).map_err(|e| e.to_string())?;
                tracing::info!(pod = %key, "pod left the mesh: its new connections go direct");
                ch.changed += 1;
            }
            for ip in &mp.ips {
                kernel.remove_captured(*ip);
                kernel.remove_inbound_listener(*ip);
            }
            mp.enrolled = false;
            mp.cert_pending = false;
            if let Some(l) = mp.listeners.take() {
                close_later(l);
            }
            if mp.id.take().is_some() {
                proxy.certs().forget(key);
            }
            mp.stop_cert_watch();
        }
        mp.set_up = true;
        Ok(ch)
    }

    /// Undoes everything the agent set up for a pod it no longer manages:
    /// enrollment and capture entries first (new connections go direct),
    /// then programs, counters, certificate and listeners.
    fn forget_pod(&mut self, key: &PodKey, mut mp: ManagedPod<K::Netns>) {
        if let Some(ns) = &mp.netns {
            if let Err(e) = self.kernel.unenroll(ns.network()) {
                tracing::warn!(pod = %key, error = %e, "removing enrollment failed");
            }
            self.kernel.detach_netns(ns.network());
            self.kernel.untrack(ns.network());
        }
        for ip in &mp.ips {
            self.kernel.remove_captured(*ip);
            self.kernel.remove_inbound_listener(*ip);
        }
        if let Err(e) = self.kernel.detach(&mp.cgroup) {
            tracing::warn!(pod = %key, error = %e, "detach failed");
        }
        if let Some(l) = mp.listeners.take() {
            close_later(l);
        }
        if mp.id.take().is_some() {
            self.proxy.certs().forget(key);
        }
        mp.stop_cert_watch();
    }

    /// Listening sockets handed over by the previous agent, served by
    /// [`Self::reconcile`] instead of new ones.
    pub fn inherit(&mut self, pods: Vec<crate::lifecycle::handoff::PodOffer>) {
        for p in pods {
            self.inherited.insert(p.pod, (p.netns_cookie, p.listeners));
        }
    }

    /// Pods whose handed-over listeners are not served yet.
    pub fn inherited_pending(&self) -> usize {
        self.inherited.len()
    }

    /// What a successor needs to take over every served pod: its
    /// listening sockets (duplicates) and its certificate.
    pub fn offer(&self) -> Vec<crate::lifecycle::handoff::PodOffer> {
        let certs = self.proxy.certs();
        self.pods
            .iter()
            .filter_map(|(key, mp)| {
                let (l, ns) = (mp.listeners.as_ref()?, mp.netns.as_ref()?);
                let listeners = match l.dup() {
                    Ok(fds) => fds,
                    Err(e) => {
                        tracing::warn!(pod = %key, error = %e, "cannot hand over the pod's listeners");
                        return None;
                    }
                };
                let cert = certs.watch(key).and_then(|w| w.borrow().as_ref().map(|c| crate::lifecycle::handoff::CertPem::of(c)));
                Some(crate::lifecycle::handoff::PodOffer {
                    pod: key.clone(),
                    netns_cookie: ns.network(),
                    listeners,
                    identity: mp.id.as_ref().map(ToString::to_string),
                    cert,
                })
            })
            .collect()
    }

    /// For shutdown: the listeners stop accepting; the kernel state stays,
    /// so the pods fail closed (or, with failure policy `open`, go direct)
    /// until the next agent serves them.
    pub fn stop_listeners(&mut self) {
        for mp in self.pods.values_mut() {
            mp.stop_cert_watch();
            if let Some(l) = mp.listeners.take() {
                l.close();
            }
        }
    }

    /// The addresses `pod`'s listeners are bound to; none while it is not
    /// served.
    pub fn listener_addrs(&self, pod: &PodKey) -> Vec<std::net::SocketAddr> {
        self.pods.get(pod).and_then(|mp| mp.listeners.as_ref()).map(|l| l.addrs.clone()).unwrap_or_default()
    }

    pub fn acceleration(&self) -> crate::config::Acceleration {
        self.kernel.acceleration()
    }

    pub fn accelerated_sockets(&self) -> usize {
        self.kernel.accelerated_sockets()
    }

    /// Ready when every local pod is set up and every pod the state puts in
    /// the mesh is enrolled (redirected, captured) and holds a workload
    /// certificate to serve with.
    pub fn ready(&self) -> bool {
        self.pods.values().all(|p| p.error.is_none() && p.wanted == p.enrolled && !p.cert_pending)
    }

    /// Pods that keep the agent from being ready, with why.
    pub fn not_ready(&self) -> Vec<(String, &'static str)> {
        self.pods
            .iter()
            .filter_map(|(k, p)| {
                let why = if p.error.is_some() {
                    "error"
                } else if p.wanted && !p.enrolled {
                    "not enrolled"
                } else if p.cert_pending {
                    "certificate pending"
                } else {
                    return None;
                };
                Some((k.to_string(), why))
            })
            .collect()
    }

    pub fn status(&self) -> Vec<PodStatus> {
        let mut certs: BTreeMap<PodKey, crate::identity::manager::WorkloadCertStatus> =
            self.proxy.certs().status().into_iter().map(|c| (c.pod.clone(), c)).collect();
        self.pods
            .iter()
            .map(|(key, mp)| {
                let counters = mp
                    .netns
                    .as_ref()
                    .map(|ns| self.kernel.counters(ns.network()))
                    .unwrap_or_default();
                PodStatus {
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                    ip: mp.ips.first().copied(),
                    enrolled: mp.enrolled,
                    certificate_pending: mp.cert_pending,
                    failure_policy: if mp.fail_open { "open" } else { "closed" },
                    attached: self.kernel.is_attached(&mp.cgroup),
                    inbound_capture: mp.netns.as_ref().is_some_and(|ns| self.kernel.is_netns_attached(ns))
                        && mp.ips.iter().all(|ip| self.kernel.has_inbound_listener(*ip)),
                    listeners: mp
                        .listeners
                        .as_ref()
                        .map(|l| l.addrs.iter().map(ToString::to_string).collect())
                        .unwrap_or_default(),
                    ebpf: EbpfCounters {
                        redirected: counters.redirected,
                        passed_through: counters.passed,
                    },
                    proxy: mp.stats.view(),
                    identity: mp.id.as_ref().map(ToString::to_string),
                    certificate: certs.remove(key),
                    error: mp.error.clone(),
                }
            })
            .collect()
    }
}

fn close_later(l: PodListeners) {
    tokio::spawn(async move {
        tokio::time::sleep(LISTENER_GRACE).await;
        l.close();
    });
}

#[cfg(test)]
mod tests;
