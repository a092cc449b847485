//! The kernel data path: load the eBPF programs, attach them to pods'
//! cgroups, keep the enrollment map in sync, read the counters, and answer
//! "where was this connection going?". The only module that imports aya.
//!
//! Links are owned by this process and not pinned: when the agent exits, for
//! any reason, the kernel detaches the programs and pods' connections go
//! straight to their destinations again (fail open). See the README.

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use mesh_common::{
    AF_INET6, ENROLLED_MAP, ORIG_DST_MAP, POD_COUNTERS_MAP, POD_FLAG_IPV6, PodCounters, PodEntry,
    SockAddr,
};

mod logger;
pub use logger::spawn_logger;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

const CONNECT4: &str = "connect4";
const CONNECT6: &str = "connect6";
const SOCK_OPS: &str = "sock_ops";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this agent was built with AYA_BUILD_SKIP=1 and has no eBPF programs: rebuild it without it"
    )]
    NotEmbedded,
    #[error("loading the eBPF object failed: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("eBPF program {program} is missing from the object")]
    MissingProgram { program: &'static str },
    #[error("eBPF map {map} is missing from the object")]
    MissingMap { map: &'static str },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    // ProgramError's Display carries the verifier log on load failures.
    #[error("eBPF program {program} was rejected by the kernel: {source}")]
    Load {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("attaching {program} to cgroup {path} failed: {source}")]
    Attach {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("detaching {program} from cgroup {path} failed: {source}")]
    Detach {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
}

#[derive(Default)]
struct Attachment {
    connect4: Option<aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId>,
    connect6: Option<aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId>,
    sock_ops: Option<aya::programs::sock_ops::SockOpsLinkId>,
}

/// The loaded programs and the maps the control side writes.
pub struct Datapath {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodEntry>,
    counters: PerCpuHashMap<MapData, u64, PodCounters>,
    orig_dst: OrigDst,
    attached: StdHashMap<PathBuf, Attachment>,
    nr_cpus: usize,
}

/// Lookup of redirected connections' original destinations, shared with the
/// data plane.
#[derive(Clone)]
pub struct OrigDst(Arc<Mutex<HashMap<MapData, SockAddr, SockAddr>>>);

impl OrigDst {
    /// The original destination of an accepted connection from `client`, if
    /// the connect hook redirected it; the entry is consumed.
    pub fn take(&self, client: SocketAddr) -> Option<SocketAddr> {
        let key = to_sock_addr(client);
        let mut map = self.0.lock().expect("poisoned");
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(from_sock_addr(&orig))
    }
}

fn to_sock_addr(a: SocketAddr) -> SockAddr {
    match a.ip().to_canonical() {
        IpAddr::V4(ip) => SockAddr::v4(u32::from_ne_bytes(ip.octets()), a.port()),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            SockAddr::v6([w(0), w(4), w(8), w(12)], a.port())
        }
    }
}

fn from_sock_addr(a: &SockAddr) -> SocketAddr {
    let ip = if a.family == AF_INET6 {
        let mut o = [0u8; 16];
        for (i, w) in a.ip.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(a.ip[0].to_ne_bytes()))
    };
    SocketAddr::new(ip, a.port)
}

/// What the hooks need about an enrolled pod.
pub fn pod_entry(ips: &[IpAddr], outbound_port: u16) -> PodEntry {
    let mut e = PodEntry {
        ip4: 0,
        ip6: [0; 4],
        flags: 0,
        outbound_port,
        _pad: [0; 6],
    };
    for ip in ips {
        match ip {
            IpAddr::V4(v4) if e.ip4 == 0 => e.ip4 = u32::from_ne_bytes(v4.octets()),
            IpAddr::V6(v6) if e.flags & POD_FLAG_IPV6 == 0 => {
                e.ip6 = to_sock_addr(SocketAddr::new(IpAddr::V6(*v6), 0)).ip;
                e.flags |= POD_FLAG_IPV6;
            }
            _ => {}
        }
    }
    e
}

impl Datapath {
    /// Loads the embedded programs into the kernel (not attached anywhere yet).
    pub fn load() -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NotEmbedded);
        }
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(Error::Object)?;
        for name in [CONNECT4, CONNECT6] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram { program: static_name(name) })?
                .try_into()
                .map_err(|source| Error::Load { program: static_name(name), source })?;
            prog.load().map_err(|source| Error::Load { program: static_name(name), source })?;
        }
        let prog: &mut SockOps = ebpf
            .program_mut(SOCK_OPS)
            .ok_or(Error::MissingProgram { program: SOCK_OPS })?
            .try_into()
            .map_err(|source| Error::Load { program: SOCK_OPS, source })?;
        prog.load().map_err(|source| Error::Load { program: SOCK_OPS, source })?;

        let enrolled = HashMap::try_from(
            ebpf.take_map(ENROLLED_MAP).ok_or(Error::MissingMap { map: ENROLLED_MAP })?,
        )
        .map_err(|source| Error::Map { map: ENROLLED_MAP, source })?;
        let counters = PerCpuHashMap::try_from(
            ebpf.take_map(POD_COUNTERS_MAP).ok_or(Error::MissingMap { map: POD_COUNTERS_MAP })?,
        )
        .map_err(|source| Error::Map { map: POD_COUNTERS_MAP, source })?;
        let orig_dst = HashMap::try_from(
            ebpf.take_map(ORIG_DST_MAP).ok_or(Error::MissingMap { map: ORIG_DST_MAP })?,
        )
        .map_err(|source| Error::Map { map: ORIG_DST_MAP, source })?;
        let nr_cpus = aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1);
        Ok(Self {
            ebpf,
            enrolled,
            counters,
            orig_dst: OrigDst(Arc::new(Mutex::new(orig_dst))),
            attached: StdHashMap::new(),
            nr_cpus,
        })
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn orig_dst(&self) -> OrigDst {
        self.orig_dst.clone()
    }

    /// Attaches the programs to a pod's cgroup (idempotent). aya attaches
    /// with a BPF link (kernel >= 5.7), which the kernel always treats as one
    /// of several programs on the cgroup and which refuses any attach flag;
    /// hence `Single` here, which means "no flags". Scoping the
    /// attachment to the pod's own cgroup means a bug in a hook can only
    /// affect pods the agent manages, never the node's own traffic.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), Error> {
        let att = self.attached.entry(cgroup.to_owned()).or_default();
        if att.connect4.is_some() && att.connect6.is_some() && att.sock_ops.is_some() {
            return Ok(());
        }
        let fd = File::open(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let attach_err = |program: &'static str| {
            move |source| Error::Attach {
                program,
                path: cgroup.to_owned(),
                source,
            }
        };
        for (name, slot) in [(CONNECT4, &mut att.connect4), (CONNECT6, &mut att.connect6)] {
            if slot.is_none() {
                let prog: &mut CgroupSockAddr = self
                    .ebpf
                    .program_mut(name)
                    .ok_or(Error::MissingProgram { program: static_name(name) })?
                    .try_into()
                    .map_err(attach_err(static_name(name)))?;
                *slot = Some(prog.attach(&fd, CgroupAttachMode::Single).map_err(attach_err(static_name(name)))?);
            }
        }
        if att.sock_ops.is_none() {
            let prog: &mut SockOps = self
                .ebpf
                .program_mut(SOCK_OPS)
                .ok_or(Error::MissingProgram { program: SOCK_OPS })?
                .try_into()
                .map_err(attach_err(SOCK_OPS))?;
            att.sock_ops = Some(prog.attach(&fd, CgroupAttachMode::Single).map_err(attach_err(SOCK_OPS))?);
        }
        Ok(())
    }

    pub fn is_attached(&self, cgroup: &Path) -> bool {
        self.attached
            .get(cgroup)
            .is_some_and(|a| a.connect4.is_some() && a.connect6.is_some() && a.sock_ops.is_some())
    }

    /// Detaches the programs from a pod's cgroup. A cgroup that is already
    /// gone has lost its programs with it; that is not an error.
    pub fn detach(&mut self, cgroup: &Path) -> Result<(), Error> {
        let Some(att) = self.attached.remove(cgroup) else {
            return Ok(());
        };
        let cgroup_gone = !cgroup.exists();
        let gone = |e: &aya::programs::ProgramError| {
            cgroup_gone || matches!(e, aya::programs::ProgramError::NotAttached)
        };
        for (name, id) in [(CONNECT4, att.connect4), (CONNECT6, att.connect6)] {
            if let Some(id) = id
                && let Some(Ok(prog)) = self.ebpf.program_mut(name).map(<&mut CgroupSockAddr>::try_from)
                && let Err(source) = prog.detach(id)
                && !gone(&source)
            {
                return Err(Error::Detach { program: static_name(name), path: cgroup.to_owned(), source });
            }
        }
        if let Some(id) = att.sock_ops
            && let Some(Ok(prog)) = self.ebpf.program_mut(SOCK_OPS).map(<&mut SockOps>::try_from)
            && let Err(source) = prog.detach(id)
            && !gone(&source)
        {
            return Err(Error::Detach { program: SOCK_OPS, path: cgroup.to_owned(), source });
        }
        Ok(())
    }

    pub fn attached_cgroups(&self) -> Vec<PathBuf> {
        self.attached.keys().cloned().collect()
    }

    pub fn enroll(&mut self, netns_cookie: u64, entry: PodEntry) -> Result<(), Error> {
        self.enrolled
            .insert(netns_cookie, entry, 0)
            .map_err(|source| Error::Map { map: ENROLLED_MAP, source })
    }

    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), Error> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map { map: ENROLLED_MAP, source }),
        }
    }

    pub fn enrollment(&self, netns_cookie: u64) -> Option<PodEntry> {
        self.enrolled.get(&netns_cookie, 0).ok()
    }

    /// Starts counting a pod's connects (keeps existing counts).
    pub fn track(&mut self, netns_cookie: u64) -> Result<(), Error> {
        if self.counters.get(&netns_cookie, 0).is_ok() {
            return Ok(());
        }
        let zeros = PerCpuValues::try_from(vec![PodCounters::default(); self.nr_cpus])
            .map_err(|e| Error::Map { map: POD_COUNTERS_MAP, source: aya::maps::MapError::IoError(e) })?;
        self.counters
            .insert(netns_cookie, zeros, 0)
            .map_err(|source| Error::Map { map: POD_COUNTERS_MAP, source })
    }

    pub fn untrack(&mut self, netns_cookie: u64) {
        let _ = self.counters.remove(&netns_cookie);
    }

    /// A pod's counters summed over CPUs.
    pub fn counters(&self, netns_cookie: u64) -> PodCounters {
        self.counters
            .get(&netns_cookie, 0)
            .map(|per_cpu| {
                per_cpu.iter().fold(PodCounters::default(), |acc, c| PodCounters {
                    redirected: acc.redirected + c.redirected,
                    passed: acc.passed + c.passed,
                })
            })
            .unwrap_or_default()
    }
}

fn static_name(name: &str) -> &'static str {
    match name {
        CONNECT4 => CONNECT4,
        CONNECT6 => CONNECT6,
        _ => SOCK_OPS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test loads eBPF programs and must run as root (CI does): run `cargo xtask test` as root"
        );
    }

    #[test]
    fn programs_load_on_this_kernel() {
        require_root();
        let dp = Datapath::load().unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
        assert!(dp.attached_cgroups().is_empty(), "load attaches nothing");
    }

    #[test]
    fn a_rejected_program_reports_the_verifier_log() {
        require_root();
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("object parses");
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut("verifier_canary")
            .expect("canary in object")
            .try_into()
            .expect("cgroup sock_addr program");
        let err = prog
            .load()
            .map_err(|source| Error::Load { program: "verifier_canary", source })
            .expect_err("the verifier must refuse the canary");
        let msg = crate::error_chain(&err);
        assert!(msg.contains("verifier_canary was rejected by the kernel"), "{msg}");
        assert!(msg.contains("invalid bpf_context access"), "verifier log missing: {msg}");
    }

    #[test]
    fn addresses_round_trip_through_map_form() {
        for a in ["198.51.100.7:15001", "[2001:db8::7]:80"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(from_sock_addr(&to_sock_addr(a)), a);
        }
        let mapped: SocketAddr = "[::ffff:203.0.113.9]:5".parse().unwrap();
        assert_eq!(from_sock_addr(&to_sock_addr(mapped)), "203.0.113.9:5".parse().unwrap());
    }

    #[test]
    fn pod_entry_holds_network_order_addresses() {
        let e = pod_entry(&["198.51.100.7".parse().unwrap(), "2001:db8::7".parse().unwrap()], 15001);
        assert_eq!(e.ip4.to_ne_bytes(), [198, 51, 100, 7]);
        assert_eq!(e.flags, POD_FLAG_IPV6);
        assert_eq!(e.outbound_port, 15001);
    }
}
