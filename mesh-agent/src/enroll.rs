//! Enrollment: keeps the kernel (programs attached, map entries) and the
//! in-pod listeners in line with the mesh state for the pods on this node.
//!
//! Order matters for never black-holing a connection: on enrol the listeners
//! open before the pod's map entry appears; on leaving the map entry goes
//! first and the listeners close a little later, so a connect redirected just
//! before the change still finds its listener. Connections already relayed are
//! never touched by enrollment changes.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use crate::{
    ebpf::{self, Datapath},
    netns::Netns,
    proxy::{PodHandle, PodListeners, PodStats, PodStatsView, Proxy},
    state::{PodKey, Snapshot},
};

/// How long a pod's listeners stay open after it leaves the mesh.
const LISTENER_GRACE: Duration = Duration::from_secs(2);

struct ManagedPod {
    netns_path: PathBuf,
    cgroup: PathBuf,
    ips: Vec<IpAddr>,
    netns: Option<Arc<Netns>>,
    listeners: Option<PodListeners>,
    enrolled: bool,
    stats: Arc<PodStats>,
    error: Option<String>,
}

pub struct Enrollment {
    node: String,
    datapath: Datapath,
    proxy: Arc<Proxy>,
    outbound_port: u16,
    pods: BTreeMap<PodKey, ManagedPod>,
    /// Reconcile passes that had to change something.
    pub changes: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    name: String,
    namespace: String,
    ip: Option<IpAddr>,
    enrolled: bool,
    attached: bool,
    listeners: Vec<String>,
    ebpf: EbpfCounters,
    proxy: PodStatsView,
    error: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EbpfCounters {
    redirected: u64,
    passed_through: u64,
}

impl Enrollment {
    pub fn new(node: String, datapath: Datapath, proxy: Arc<Proxy>, outbound_port: u16) -> Self {
        Self {
            node,
            datapath,
            proxy,
            outbound_port,
            pods: BTreeMap::new(),
            changes: 0,
        }
    }

    /// Brings this node's pods in line with `state`. Failures are per pod:
    /// recorded, logged, and retried on the next pass.
    pub fn reconcile(&mut self, state: &Snapshot) {
        let node = self.node.clone();
        let wanted: BTreeMap<&PodKey, _> = state
            .pods_on_node(&node)
            .map(|p| (&p.key, (p, state.is_enrolled(p))))
            .collect();

        let gone: Vec<PodKey> = self.pods.keys().filter(|k| !wanted.contains_key(k)).cloned().collect();
        for key in gone {
            if let Some(mut mp) = self.pods.remove(&key) {
                tracing::info!(pod = %key, "pod left this node");
                self.leave(&key, &mut mp);
                if let Some(ns) = &mp.netns {
                    self.datapath.untrack(ns.cookie());
                }
                if let Err(e) = self.datapath.detach(&mp.cgroup) {
                    tracing::warn!(pod = %key, error = %e, "detach failed");
                }
                self.changes += 1;
            }
        }

        for (key, (pod, enrolled)) in wanted {
            // A pod whose sandbox changed is a new pod to the kernel.
            let sandbox_changed = self
                .pods
                .get(key)
                .is_some_and(|mp| mp.netns_path != pod.netns || mp.cgroup != pod.cgroup || mp.ips != pod.ips);
            if sandbox_changed && let Some(mut old) = self.pods.remove(key) {
                self.leave(key, &mut old);
                if let Some(ns) = &old.netns {
                    self.datapath.untrack(ns.cookie());
                }
                let _ = self.datapath.detach(&old.cgroup);
            }
            self.pods.entry(key.clone()).or_insert_with(|| ManagedPod {
                netns_path: pod.netns.clone(),
                cgroup: pod.cgroup.clone(),
                ips: pod.ips.clone(),
                netns: None,
                listeners: None,
                enrolled: false,
                stats: Arc::new(PodStats::default()),
                error: None,
            });
            let mp = self.pods.get_mut(key).expect("inserted above");
            let result = Self::ensure(&mut self.datapath, &self.proxy, self.outbound_port, key, mp, enrolled);
            match result {
                Ok(changed) => {
                    if changed {
                        self.changes += 1;
                    }
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
    }

    /// Makes one pod's kernel and listener state match `enrolled`; returns
    /// whether anything had to change.
    fn ensure(
        datapath: &mut Datapath,
        proxy: &Arc<Proxy>,
        outbound_port: u16,
        key: &PodKey,
        mp: &mut ManagedPod,
        enrolled: bool,
    ) -> Result<bool, String> {
        let mut changed = false;
        if mp.netns.is_none() {
            mp.netns = Some(Arc::new(Netns::open(&mp.netns_path).map_err(|e| e.to_string())?));
            changed = true;
        }
        let netns = mp.netns.clone().expect("opened above");
        if !datapath.is_attached(&mp.cgroup) {
            datapath.attach(&mp.cgroup).map_err(|e| crate::error_chain(&e))?;
            tracing::info!(pod = %key, cgroup = %mp.cgroup.display(), "eBPF programs attached");
            changed = true;
        }
        datapath.track(netns.cookie()).map_err(|e| e.to_string())?;
        if enrolled {
            if mp.listeners.is_none() {
                let handle = PodHandle {
                    key: key.clone(),
                    ips: mp.ips.clone(),
                    netns: netns.clone(),
                    stats: mp.stats.clone(),
                };
                mp.listeners = Some(proxy.serve_pod(&handle).map_err(|e| e.to_string())?);
                changed = true;
            }
            let entry = ebpf::pod_entry(&mp.ips, outbound_port);
            if datapath.enrollment(netns.cookie()) != Some(entry) {
                datapath.enroll(netns.cookie(), entry).map_err(|e| e.to_string())?;
                if !mp.enrolled {
                    tracing::info!(pod = %key, "pod enrolled: its new connections go through the agent");
                }
                changed = true;
            }
            mp.enrolled = true;
        } else {
            if mp.enrolled || datapath.enrollment(netns.cookie()).is_some() {
                datapath.unenroll(netns.cookie()).map_err(|e| e.to_string())?;
                tracing::info!(pod = %key, "pod left the mesh: its new connections go direct");
                changed = true;
            }
            mp.enrolled = false;
            if let Some(l) = mp.listeners.take() {
                close_later(l);
            }
        }
        Ok(changed)
    }

    fn leave(&mut self, key: &PodKey, mp: &mut ManagedPod) {
        if let Some(ns) = &mp.netns
            && let Err(e) = self.datapath.unenroll(ns.cookie())
        {
            tracing::warn!(pod = %key, error = %e, "removing enrollment failed");
        }
        mp.enrolled = false;
        if let Some(l) = mp.listeners.take() {
            close_later(l);
        }
    }

    /// For shutdown: every pod's new connections go direct from now on
    /// (programs detached, entries removed), and the listeners close.
    pub fn release_all(&mut self) {
        let keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        for key in keys {
            let mut mp = self.pods.remove(&key).expect("listed above");
            if let Some(ns) = &mp.netns {
                let _ = self.datapath.unenroll(ns.cookie());
            }
            if let Err(e) = self.datapath.detach(&mp.cgroup) {
                tracing::warn!(pod = %key, error = %e, "detach failed");
            }
            if let Some(l) = mp.listeners.take() {
                l.close();
            }
        }
    }

    pub fn ready(&self) -> bool {
        self.pods.values().all(|p| p.error.is_none())
    }

    pub fn status(&self) -> Vec<PodStatus> {
        self.pods
            .iter()
            .map(|(key, mp)| {
                let counters = mp
                    .netns
                    .as_ref()
                    .map(|ns| self.datapath.counters(ns.cookie()))
                    .unwrap_or_default();
                PodStatus {
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                    ip: mp.ips.first().copied(),
                    enrolled: mp.enrolled,
                    attached: self.datapath.is_attached(&mp.cgroup),
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
