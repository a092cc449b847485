//! What enrollment asks of the kernel, as one trait: open a pod's network
//! namespace, attach the hooks to its cgroup and namespace, and keep its
//! entries in the enrollment, capture and counter maps. On a node the
//! answer is the eBPF datapath ([`Datapath`], below, a thin forward to
//! [`crate::ebpf`]); in tests it is an in-memory kernel that records what
//! would be attached and enrolled (`testing::MemoryKernel`), so
//! [`super::Enrollment`] and the whole agent run without root.
//!
//! The trait is shaped by what [`super::Enrollment`] does, not by the maps:
//! every method is one step of `ensure`, `forget_pod`, `prune` or `status`,
//! and the pod's namespace is whatever [`Kernel::open_netns`] returned (the
//! eBPF side needs the namespace's file; a test's needs none).

use std::{
    net::IpAddr,
    os::fd::BorrowedFd,
    path::Path,
};

use mesh_common::{PodCounters, PodEntry};

use crate::{
    ebpf::{self, Datapath},
    netns::Netns,
    proxy::PodSockets,
};

/// A pod that [`Kernel::retain`] keeps: its cgroup, its namespace's cookie,
/// its addresses.
pub struct KeepPod<'a> {
    pub cgroup: &'a Path,
    pub cookie: u64,
    pub ips: &'a [IpAddr],
}

/// The kernel side of enrollment.
pub trait Kernel: Send + 'static {
    /// A pod's opened network namespace: where its listeners listen and its
    /// connections start, and, as [`PodSockets::network`], the cookie the
    /// programs and maps know the namespace by.
    type Netns: PodSockets;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Opens the pod's network namespace at `path`; `ips` are the pod's
    /// addresses (a test's kernel stands the pod in by them).
    fn open_netns(&mut self, path: &Path, ips: &[IpAddr]) -> Result<Self::Netns, Self::Error>;

    // The connect and sock_ops hooks on the pod's cgroup.
    /// Makes sure the hooks are attached; returns how many had to be.
    fn attach(&mut self, cgroup: &Path) -> Result<u32, Self::Error>;
    fn detach(&mut self, cgroup: &Path) -> Result<(), Self::Error>;
    fn is_attached(&self, cgroup: &Path) -> bool;

    // Inbound capture (`sk_lookup`) on the pod's namespace.
    /// Makes sure it is attached; returns whether it had to be.
    fn attach_netns(&mut self, netns: &Self::Netns, path: &Path) -> Result<bool, Self::Error>;
    fn detach_netns(&mut self, cookie: u64);
    fn is_netns_attached(&self, netns: &Self::Netns) -> bool;

    // The pod's connect counters.
    /// Starts counting (keeps existing counts).
    fn track(&mut self, cookie: u64) -> Result<(), Self::Error>;
    fn untrack(&mut self, cookie: u64);
    fn counters(&self, cookie: u64) -> PodCounters;

    // The enrollment map: which namespaces' connections go to the agent.
    fn enroll(&mut self, cookie: u64, entry: PodEntry) -> Result<(), Self::Error>;
    fn unenroll(&mut self, cookie: u64) -> Result<(), Self::Error>;
    fn enrollment(&self, cookie: u64) -> Option<PodEntry>;

    // Capture of the pod's addresses: the mark that refuses (or, fail
    // open, passes) their inbound connections, and the agent's plaintext
    // listener that takes them.
    /// Returns whether the address was captured before.
    fn set_captured(&mut self, ip: IpAddr, fail_open: bool) -> Result<bool, Self::Error>;
    fn remove_captured(&mut self, ip: IpAddr);
    fn set_inbound_listener(&mut self, ip: IpAddr, listener: BorrowedFd<'_>) -> Result<(), Self::Error>;
    fn has_inbound_listener(&self, ip: IpAddr) -> bool;
    fn remove_inbound_listener(&mut self, ip: IpAddr);

    /// Removes whatever belongs to none of `pods`; how much went. `None`
    /// when the kernel side does not know every one of them yet (nothing
    /// is removed: an unknown pod might own some of it).
    fn retain(&mut self, pods: &[KeepPod<'_>]) -> Option<usize>;

    /// What socket-to-socket acceleration takes, and how many sockets it
    /// holds.
    fn acceleration(&self) -> crate::config::Acceleration;
    fn accelerated_sockets(&self) -> usize;
}

/// What the eBPF kernel side fails with.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(transparent)]
    Ebpf(#[from] ebpf::Error),
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
}

/// The node's kernel: each method is the [`Datapath`] call of the same
/// name (called by path, so the forward is never mistaken for recursion).
impl Kernel for Datapath {
    type Netns = Netns;
    type Error = EbpfError;

    fn open_netns(&mut self, path: &Path, _ips: &[IpAddr]) -> Result<Netns, EbpfError> {
        Ok(Netns::open(path)?)
    }

    fn attach(&mut self, cgroup: &Path) -> Result<u32, EbpfError> {
        Ok(Datapath::attach(self, cgroup)?)
    }

    fn detach(&mut self, cgroup: &Path) -> Result<(), EbpfError> {
        Ok(Datapath::detach(self, cgroup)?)
    }

    fn is_attached(&self, cgroup: &Path) -> bool {
        Datapath::is_attached(self, cgroup)
    }

    fn attach_netns(&mut self, netns: &Netns, path: &Path) -> Result<bool, EbpfError> {
        Ok(Datapath::attach_netns(self, netns.cookie(), netns.file(), path)?)
    }

    fn detach_netns(&mut self, cookie: u64) {
        Datapath::detach_netns(self, cookie);
    }

    fn is_netns_attached(&self, netns: &Netns) -> bool {
        Datapath::is_netns_attached(self, netns.file())
    }

    fn track(&mut self, cookie: u64) -> Result<(), EbpfError> {
        Ok(Datapath::track(self, cookie)?)
    }

    fn untrack(&mut self, cookie: u64) {
        Datapath::untrack(self, cookie);
    }

    fn counters(&self, cookie: u64) -> PodCounters {
        Datapath::counters(self, cookie)
    }

    fn enroll(&mut self, cookie: u64, entry: PodEntry) -> Result<(), EbpfError> {
        Ok(Datapath::enroll(self, cookie, entry)?)
    }

    fn unenroll(&mut self, cookie: u64) -> Result<(), EbpfError> {
        Ok(Datapath::unenroll(self, cookie)?)
    }

    fn enrollment(&self, cookie: u64) -> Option<PodEntry> {
        Datapath::enrollment(self, cookie)
    }

    fn set_captured(&mut self, ip: IpAddr, fail_open: bool) -> Result<bool, EbpfError> {
        Ok(Datapath::set_captured(self, ip, fail_open)?)
    }

    fn remove_captured(&mut self, ip: IpAddr) {
        Datapath::remove_captured(self, ip);
    }

    fn set_inbound_listener(&mut self, ip: IpAddr, listener: BorrowedFd<'_>) -> Result<(), EbpfError> {
        Ok(Datapath::set_inbound_listener(self, ip, &listener)?)
    }

    fn has_inbound_listener(&self, ip: IpAddr) -> bool {
        Datapath::has_inbound_listener(self, ip)
    }

    fn remove_inbound_listener(&mut self, ip: IpAddr) {
        Datapath::remove_inbound_listener(self, ip);
    }

    fn retain(&mut self, pods: &[KeepPod<'_>]) -> Option<usize> {
        let mut keep = ebpf::Keep::default();
        for p in pods {
            // A cgroup this agent never attached to: its pinned links are
            // not known by directory yet.
            let dir = self.cgroup_dir(p.cgroup)?;
            keep.link_dirs.insert(dir.to_owned());
            keep.link_dirs.insert(Datapath::netns_dir(p.cookie));
            keep.cookies.insert(p.cookie);
            keep.ips.extend(p.ips.iter().copied());
        }
        Some(Datapath::retain(self, &keep))
    }

    fn acceleration(&self) -> crate::config::Acceleration {
        Datapath::acceleration(self)
    }

    fn accelerated_sockets(&self) -> usize {
        Datapath::accelerated_sockets(self)
    }
}
