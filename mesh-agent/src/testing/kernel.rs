//! The kernel as enrollment sees it, in memory: what would be attached,
//! enrolled and captured is recorded in maps a test reads
//! ([`MemoryKernel::state`]); failures are injected on demand; a pod's
//! network namespace is its loopback address ([`Loopback`]).
//!
//! It also plays the connect hooks, as far as the agent can see them
//! ([`MemoryKernel::connect`]): a connection from an enrolled pod's address
//! goes to the pod's outbound listener with its original destination
//! recorded, any other goes where it was going. That is a model of the
//! hooks, not the hooks: what the real programs do (and `sk_lookup`
//! capture, failure policy `open`, acceleration) is tested end to end
//! against the kernel in `tests/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use futures::future::BoxFuture;
use mesh_common::{PodCounters, PodEntry};
use tokio::net::{TcpSocket, TcpStream};

use super::OrigDstTable;
use crate::{
    enroll::{KeepPod, Kernel},
    proxy::{Loopback, OrigDstLookup, PodSockets, sockets::SocketError},
};

/// How many hooks go on a cgroup (connect4, connect6, sock_ops), as the
/// eBPF side counts them.
const CGROUP_HOOKS: u32 = 3;

/// What the in-memory kernel holds: the maps and attachments the eBPF
/// side would have, keyed the same way.
#[derive(Clone, Debug, Default)]
pub struct KernelState {
    /// Every namespace opened, by path, with its cookie.
    pub namespaces: BTreeMap<PathBuf, u64>,
    /// Cgroups with the connect and sock_ops hooks.
    pub attached: BTreeSet<PathBuf>,
    /// Namespaces (by cookie) with inbound capture.
    pub capture_attached: BTreeSet<u64>,
    /// The enrollment map.
    pub enrolled: BTreeMap<u64, PodEntry>,
    /// Namespaces whose connects are counted.
    pub tracked: BTreeSet<u64>,
    /// Captured addresses, with their failure policy (`true`: open).
    pub captured: BTreeMap<IpAddr, bool>,
    /// Where capture sends each address's inbound connections: the
    /// agent's plaintext listener.
    pub inbound_listeners: BTreeMap<IpAddr, SocketAddr>,
}

impl KernelState {
    /// The enrollment entry of the pod at `ip`, if its namespace is enrolled.
    pub fn entry_of(&self, ip: IpAddr) -> Option<PodEntry> {
        let IpAddr::V4(v4) = ip else { return None };
        let ip4 = u32::from_ne_bytes(v4.octets());
        self.enrolled.values().find(|e| e.ip4 == ip4).copied()
    }

    /// The addresses of every enrolled pod (their IPv4 ones).
    pub fn enrolled_ips(&self) -> BTreeSet<IpAddr> {
        self.enrolled
            .values()
            .map(|e| IpAddr::V4(Ipv4Addr::from(e.ip4.to_ne_bytes())))
            .collect()
    }
}

#[derive(Default)]
struct Inner {
    state: KernelState,
    next_cookie: u64,
    /// Attaches to these cgroups fail, so many more times.
    failing: BTreeMap<PathBuf, u32>,
    /// Namespaces that cannot be opened.
    missing: BTreeSet<PathBuf>,
}

/// An in-memory [`Kernel`]; clones share one state, so a test keeps one
/// and hands another to the agent.
#[derive(Clone, Default)]
pub struct MemoryKernel {
    inner: Arc<Mutex<Inner>>,
    orig_dst: Arc<OrigDstTable>,
}

/// Why the in-memory kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot open network namespace {0}: no such namespace")]
    NoNamespace(PathBuf),
    #[error("network namespace {0}: the pod has no IPv4 address to stand in for it")]
    NoAddress(PathBuf),
    #[error("attaching to {0} failed: the test made it fail")]
    Injected(PathBuf),
}

impl MemoryKernel {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("poisoned")
    }

    /// What the kernel holds now.
    pub fn state(&self) -> KernelState {
        self.lock().state.clone()
    }

    /// The next `times` attaches to `cgroup` fail.
    pub fn fail_attach(&self, cgroup: impl Into<PathBuf>, times: u32) {
        self.lock().failing.insert(cgroup.into(), times);
    }

    /// The hooks on `cgroup` vanish behind the agent's back (someone
    /// detached them with `bpftool`): drift for reconcile to repair.
    pub fn lose_attachment(&self, cgroup: &Path) {
        self.lock().state.attached.remove(cgroup);
    }

    /// The namespace at `path` cannot be opened (the pod's sandbox is gone).
    pub fn make_missing(&self, path: impl Into<PathBuf>) {
        self.lock().missing.insert(path.into());
    }

    /// The original-destination lookup the connect hooks fill, for the
    /// agent's proxy.
    pub fn orig_dst(&self) -> Arc<dyn OrigDstLookup> {
        self.orig_dst.clone()
    }

    /// A connection from the pod at `from` to `orig`, as the connect hooks
    /// would make it: redirected to the pod's outbound listener when the
    /// pod is enrolled, direct otherwise.
    pub async fn connect(&self, from: IpAddr, orig: SocketAddr) -> io::Result<TcpStream> {
        let entry = self.lock().state.entry_of(from);
        let sock = if from.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        sock.bind(SocketAddr::new(from, 0))?;
        let Some(entry) = entry else { return sock.connect(orig).await };
        let client = sock.local_addr()?;
        self.orig_dst.0.lock().expect("poisoned").insert(client, orig);
        sock.connect(SocketAddr::new(from, entry.outbound_port)).await
    }
}

/// A pod's namespace in memory: its loopback address, and the cookie the
/// in-memory maps know it by.
pub struct MemoryNetns {
    sockets: Loopback,
    cookie: u64,
}

impl PodSockets for MemoryNetns {
    fn listen(&self, port: u16) -> Result<std::net::TcpListener, SocketError> {
        self.sockets.listen(port)
    }

    fn for_connect(&self, dst: SocketAddr) -> BoxFuture<'_, Result<TcpSocket, SocketError>> {
        self.sockets.for_connect(dst)
    }

    fn network(&self) -> u64 {
        self.cookie
    }
}

impl Kernel for MemoryKernel {
    type Netns = MemoryNetns;
    type Error = MemoryError;

    fn open_netns(&mut self, path: &Path, ips: &[IpAddr]) -> Result<MemoryNetns, MemoryError> {
        let mut inner = self.lock();
        if inner.missing.contains(path) {
            return Err(MemoryError::NoNamespace(path.to_owned()));
        }
        let ip = *ips.iter().find(|ip| ip.is_ipv4()).ok_or_else(|| MemoryError::NoAddress(path.to_owned()))?;
        // The same namespace opened again has the same cookie.
        let cookie = match inner.state.namespaces.get(path) {
            Some(c) => *c,
            None => {
                inner.next_cookie += 1;
                let c = inner.next_cookie;
                inner.state.namespaces.insert(path.to_owned(), c);
                c
            }
        };
        Ok(MemoryNetns { sockets: Loopback::new(ip), cookie })
    }

    fn attach(&mut self, cgroup: &Path) -> Result<u32, MemoryError> {
        let mut inner = self.lock();
        if let Some(left) = inner.failing.get_mut(cgroup)
            && *left > 0
        {
            *left -= 1;
            return Err(MemoryError::Injected(cgroup.to_owned()));
        }
        Ok(if inner.state.attached.insert(cgroup.to_owned()) { CGROUP_HOOKS } else { 0 })
    }

    fn detach(&mut self, cgroup: &Path) -> Result<(), MemoryError> {
        self.lock().state.attached.remove(cgroup);
        Ok(())
    }

    fn is_attached(&self, cgroup: &Path) -> bool {
        self.lock().state.attached.contains(cgroup)
    }

    fn attach_netns(&mut self, netns: &MemoryNetns, _path: &Path) -> Result<bool, MemoryError> {
        Ok(self.lock().state.capture_attached.insert(netns.cookie))
    }

    fn detach_netns(&mut self, cookie: u64) {
        self.lock().state.capture_attached.remove(&cookie);
    }

    fn is_netns_attached(&self, netns: &MemoryNetns) -> bool {
        self.lock().state.capture_attached.contains(&netns.cookie)
    }

    fn track(&mut self, cookie: u64) -> Result<(), MemoryError> {
        self.lock().state.tracked.insert(cookie);
        Ok(())
    }

    fn untrack(&mut self, cookie: u64) {
        self.lock().state.tracked.remove(&cookie);
    }

    fn counters(&self, _cookie: u64) -> PodCounters {
        // The hooks count; there are none here.
        PodCounters::default()
    }

    fn enroll(&mut self, cookie: u64, entry: PodEntry) -> Result<(), MemoryError> {
        self.lock().state.enrolled.insert(cookie, entry);
        Ok(())
    }

    fn unenroll(&mut self, cookie: u64) -> Result<(), MemoryError> {
        self.lock().state.enrolled.remove(&cookie);
        Ok(())
    }

    fn enrollment(&self, cookie: u64) -> Option<PodEntry> {
        self.lock().state.enrolled.get(&cookie).copied()
    }

    fn set_captured(&mut self, ip: IpAddr, fail_open: bool) -> Result<bool, MemoryError> {
        Ok(self.lock().state.captured.insert(ip, fail_open).is_some())
    }

    fn remove_captured(&mut self, ip: IpAddr) {
        self.lock().state.captured.remove(&ip);
    }

    fn set_inbound_listener(&mut self, ip: IpAddr, listener: BorrowedFd<'_>) -> Result<(), MemoryError> {
        // The address, not the socket: holding a descriptor would keep a
        // closed listener alive.
        let addr = socket2::SockRef::from(&listener)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or_else(|| SocketAddr::new(ip, 0));
        self.lock().state.inbound_listeners.insert(ip, addr);
        Ok(())
    }

    fn has_inbound_listener(&self, ip: IpAddr) -> bool {
        self.lock().state.inbound_listeners.contains_key(&ip)
    }

    fn remove_inbound_listener(&mut self, ip: IpAddr) {
        self.lock().state.inbound_listeners.remove(&ip);
    }

    fn retain(&mut self, pods: &[KeepPod<'_>]) -> Option<usize> {
        let mut inner = self.lock();
        let s = &mut inner.state;
        // As on a node: a cgroup never attached is not known yet.
        if !pods.iter().all(|p| s.attached.contains(p.cgroup)) {
            return None;
        }
        let cgroups: BTreeSet<&Path> = pods.iter().map(|p| p.cgroup).collect();
        let cookies: BTreeSet<u64> = pods.iter().map(|p| p.cookie).collect();
        let ips: BTreeSet<IpAddr> = pods.iter().flat_map(|p| p.ips.iter().copied()).collect();
        let before = s.attached.len() + s.capture_attached.len() + s.enrolled.len() + s.captured.len();
        s.attached.retain(|c| cgroups.contains(c.as_path()));
        s.capture_attached.retain(|c| cookies.contains(c));
        s.enrolled.retain(|c, _| cookies.contains(c));
        s.tracked.retain(|c| cookies.contains(c));
        s.captured.retain(|ip, _| ips.contains(ip));
        s.inbound_listeners.retain(|ip, _| ips.contains(ip));
        Some(before - (s.attached.len() + s.capture_attached.len() + s.enrolled.len() + s.captured.len()))
    }

    fn acceleration(&self) -> crate::config::Acceleration {
        crate::config::Acceleration::Off
    }

    fn accelerated_sockets(&self) -> usize {
        0
    }
}
