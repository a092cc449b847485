//! Finding a pod's network namespace and cgroup v2 directory on a real node,
//! from the container runtime's cgroup layout and `/proc` (the agent runs
//! with the host's PID namespace and cgroup filesystem).
//!
//! Every process's `/proc/PID/cgroup` names its cgroup v2 path (the `0::`
//! line; on a cgroup v1 *hybrid* host too, where systemd mirrors its slices
//! into the unified hierarchy). Kubelet puts each pod in a cgroup whose name
//! carries the pod UID, and the runtime puts each container below it:
//!
//! | kubelet cgroup driver | runtime | container process's v2 path |
//! | --- | --- | --- |
//! | systemd | containerd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope` |
//! | systemd | CRI-O | `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid with _>.slice/crio-<id>.scope` |
//! | cgroupfs | containerd, CRI-O | `/kubepods/burstable/pod<uid>/<id>` (Guaranteed pods: `/kubepods/pod<uid>/<id>`) |
//!
//! (kind and other nested setups add a prefix such as `/kubelet.slice/kubelet-kubepods.slice`.)
//! The pod's cgroup is the path up to the component naming the UID, under
//! the cgroup v2 mount found in `/proc/mounts`. The network namespace is
//! `/proc/PID/ns/net` of the pod's sandbox process (`pause`), else of its
//! lowest PID: every container of a pod shares the sandbox's namespace.
//!
//! In a container with its own cgroup namespace (the default on cgroup v2),
//! `/proc/PID/cgroup` shows other pods' paths relative to the agent's own
//! cgroup, starting with `/..`. The host's cgroup tree is bind-mounted into
//! the agent (the DaemonSet's hostPath, the last `cgroup2` entry in
//! `/proc/mounts`), so such a path is resolved by finding the one directory
//! under the kubelet's known roots (`kubepods.slice`, `kubepods`,
//! `kubelet.slice/kubelet-kubepods.slice`, or the mount itself) where the
//! rest of it exists.
//!
//! Not supported, and reported as such: cgroup v1 hosts whose kubelet uses
//! the cgroupfs driver (pods then have no cgroup v2 directory for the eBPF
//! programs to attach to).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;

use super::source::PodLocator;

/// A pod found in `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub pid: u32,
    /// The pod-level cgroup path, relative to the cgroup v2 mount.
    pub cgroup: String,
    pub runtime: Runtime,
    is_sandbox: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// A layout whose container component we do not recognise (the pod-level
    /// cgroup is still found by its UID).
    Other,
}

/// The pod UID and pod-level cgroup a v2 cgroup path belongs to, if any.
pub fn pod_of(path: &str) -> Option<(String, String, Runtime)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').skip_while(|p| *p == "..").collect();
    let relative = path.trim_start_matches('/').starts_with("..");
    for (i, part) in parts.iter().enumerate() {
        let Some(uid) = uid_in(part) else { continue };
        // `../` marks a path outside our cgroup namespace: resolved later.
        let cgroup = format!("{}/{}", if relative { ".." } else { "" }, parts[..=i].join("/"));
        let runtime = match parts.get(i + 1) {
            Some(c) if c.starts_with("cri-containerd-") => Runtime::Containerd,
            Some(c) if c.starts_with("crio-") => Runtime::CriO,
            Some(c) if c.starts_with("docker-") => Runtime::Docker,
            _ => Runtime::Other,
        };
        return Some((uid, cgroup, runtime));
    }
    None
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid with _>.slice`
/// (systemd), with a well-formed UID.
fn uid_in(component: &str) -> Option<String> {
    let rest = if let Some(s) = component.strip_suffix(".slice") {
        s.rsplit_once("-pod")?.1.replace('_', "-")
    } else {
        component.strip_prefix("pod")?.to_owned()
    };
    let ok = rest.len() == 36
        && rest.char_indices().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() });
    ok.then_some(rest)
}

/// Scans a `/proc` tree: pod UID to the process to take its netns from.
pub fn scan(proc_root: &Path) -> HashMap<String, Found> {
    let mut out: HashMap<String, Found> = HashMap::new();
    let Ok(dir) = std::fs::read_dir(proc_root) else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path().join("cgroup")) else { continue };
        let Some(path) = crate::host::parse_membership(&text) else { continue };
        let Some((uid, cgroup, runtime)) = pod_of(&path) else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let found = Found { pid, cgroup, runtime, is_sandbox: comm.trim() == "pause" };
        match out.get(&uid) {
            Some(cur) if (cur.is_sandbox, std::cmp::Reverse(cur.pid)) >= (found.is_sandbox, std::cmp::Reverse(found.pid)) => {}
            _ => {
                out.insert(uid, found);
            }
        }
    }
    out
}

/// Where the kubelet puts pods, relative to the cgroup v2 root.
const KUBELET_ROOTS: &[&str] = &["", "kubepods.slice", "kubepods", "kubelet.slice/kubelet-kubepods.slice", "kubelet.slice"];

/// The last `cgroup2` mount: the host's tree bind-mounted over the
/// container's own namespaced one, when the DaemonSet mounts it there.
fn last_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().rev().find_map(crate::host::parse_cgroup2_mount)
}

/// The locator the agent uses on a node.
pub struct ProcLocator {
    proc_root: PathBuf,
    /// `None`: no cgroup v2 hierarchy (pure cgroup v1 host).
    cgroup2: Option<PathBuf>,
    cache: Mutex<(Option<Instant>, HashMap<String, Found>)>,
}

/// A rescan is at most this frequent, however many pods are missing.
const RESCAN: Duration = Duration::from_millis(500);

impl ProcLocator {
    /// `proc_root` is `/proc` on a node; `mounts` the text of its `/proc/mounts`.
    pub fn new(proc_root: PathBuf, mounts: &str) -> Self {
        Self {
            proc_root,
            cgroup2: last_cgroup2_mount(mounts),
            cache: Mutex::new((None, HashMap::new())),
        }
    }

    pub fn host() -> Self {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        Self::new("/proc".into(), &mounts)
    }

    fn find(&self, uid: &str) -> Option<Found> {
        let mut cache = self.cache.lock().expect("poisoned");
        let stale = cache.0.is_none_or(|t| t.elapsed() >= RESCAN);
        let found = cache.1.get(uid).filter(|f| self.proc_root.join(f.pid.to_string()).exists()).cloned();
        if found.is_some() || !stale {
            return found;
        }
        cache.1 = scan(&self.proc_root);
        cache.0 = Some(Instant::now());
        cache.1.get(uid).cloned()
    }
}

impl PodLocator for ProcLocator {
    fn locate(&self, pod: &Pod) -> Result<(PathBuf, PathBuf), String> {
        let uid = pod.metadata.uid.as_deref().ok_or("the pod has no UID")?;
        let Some(mount) = &self.cgroup2 else {
            return Err("this node has no cgroup v2 hierarchy (only cgroup v1): the mesh needs cgroup v2".into());
        };
        let Some(found) = self.find(uid) else {
            return Err(format!(
                "no process of pod UID {uid} in {} (not started yet, or its cgroup has no v2 path: \
                 a cgroup v1 node whose kubelet uses the cgroupfs driver is not supported)",
                self.proc_root.display()
            ));
        };
        let cgroup = match found.cgroup.strip_prefix("../") {
            None => mount.join(found.cgroup.trim_start_matches('/')),
            Some(rest) => KUBELET_ROOTS
                .iter()
                .map(|root| mount.join(root).join(rest))
                .find(|p| p.is_dir())
                .ok_or_else(|| {
                    format!(
                        "pod UID {uid}: its cgroup {rest} is outside this container's cgroup namespace and was not found under {} \
                         (is the host's /sys/fs/cgroup mounted into the agent?)",
                        mount.display()
                    )
                })?,
        };
        Ok((self.proc_root.join(found.pid.to_string()).join("ns/net"), cgroup))
    }
}

#[cfg(test)]
mod tests;
