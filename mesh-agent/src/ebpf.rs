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
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps},
};
use mesh_common::{
    ACCELERATE_GLOBAL, ENROLLED_MAP, INBOUND_LISTENERS_MAP, LOCAL_SOCKS_MAP, ORIG_DST_MAP,
    POD_COUNTERS_MAP, POD_FLAG_IPV6, PodCounters, PodEntry, SockAddr, SockPair,
};

mod addr;
mod logger;
mod query;

use addr::{from_sock_addr, to_sock_addr};
pub use logger::spawn_logger;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

const CONNECT4: &str = "connect4";
const CONNECT6: &str = "connect6";
const SOCK_OPS: &str = "sock_ops";
const SK_MSG: &str = "accelerate";
const SK_LOOKUP: &str = "inbound_capture";

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
struct CgroupLinks {
    connect4: Option<aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId>,
    connect6: Option<aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId>,
    sock_ops: Option<aya::programs::sock_ops::SockOpsLinkId>,
}

/// Kernel IDs of our loaded programs, to recognise them in `BPF_PROG_QUERY`.
struct ProgIds {
    connect4: u32,
    connect6: u32,
    sock_ops: u32,
    sk_lookup: u32,
}

/// Options fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Socket-to-socket acceleration (sockhash + sk_msg) for in-pod hops.
    pub accelerate: bool,
}

/// The loaded programs and the maps the control side writes.
pub struct Datapath {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodEntry>,
    counters: PerCpuHashMap<MapData, u64, PodCounters>,
    orig_dst: OrigDst,
    inbound_listeners: SockHash<MapData, SockAddr>,
    local_socks: SockHash<MapData, SockPair>,
    cgroups: StdHashMap<PathBuf, CgroupLinks>,
    netns: StdHashMap<u64, aya::programs::sk_lookup::SkLookupLinkId>,
    ids: ProgIds,
    accelerate: bool,
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

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { program: name })?
        .try_into()
        .map_err(|source| Error::Load { program: name, source })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap { map: name })
}

impl Datapath {
    /// Loads the embedded programs into the kernel (not attached anywhere yet).
    pub fn load(opts: Options) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NotEmbedded);
        }
        let accelerate = u8::from(opts.accelerate);
        let mut ebpf = EbpfLoader::new()
            .override_global(ACCELERATE_GLOBAL, &accelerate, true)
            .load(OBJECT)
            .map_err(Error::Object)?;
        let id = |name: &'static str, info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>| {
            info.map(|i| i.id()).map_err(|source| Error::Load { program: name, source })
        };
        program::<CgroupSockAddr>(&mut ebpf, CONNECT4)?.load().map_err(|source| Error::Load { program: CONNECT4, source })?;
        program::<CgroupSockAddr>(&mut ebpf, CONNECT6)?.load().map_err(|source| Error::Load { program: CONNECT6, source })?;
        program::<SockOps>(&mut ebpf, SOCK_OPS)?.load().map_err(|source| Error::Load { program: SOCK_OPS, source })?;
        program::<SkLookup>(&mut ebpf, SK_LOOKUP)?.load().map_err(|source| Error::Load { program: SK_LOOKUP, source })?;
        let ids = ProgIds {
            connect4: id(CONNECT4, program::<CgroupSockAddr>(&mut ebpf, CONNECT4)?.info())?,
            connect6: id(CONNECT6, program::<CgroupSockAddr>(&mut ebpf, CONNECT6)?.info())?,
            sock_ops: id(SOCK_OPS, program::<SockOps>(&mut ebpf, SOCK_OPS)?.info())?,
            sk_lookup: id(SK_LOOKUP, program::<SkLookup>(&mut ebpf, SK_LOOKUP)?.info())?,
        };

        let map_err = |map: &'static str| move |source| Error::Map { map, source };
        let enrolled = HashMap::try_from(take_map(&mut ebpf, ENROLLED_MAP)?).map_err(map_err(ENROLLED_MAP))?;
        let counters = PerCpuHashMap::try_from(take_map(&mut ebpf, POD_COUNTERS_MAP)?).map_err(map_err(POD_COUNTERS_MAP))?;
        let orig_dst = HashMap::try_from(take_map(&mut ebpf, ORIG_DST_MAP)?).map_err(map_err(ORIG_DST_MAP))?;
        let inbound_listeners =
            SockHash::try_from(take_map(&mut ebpf, INBOUND_LISTENERS_MAP)?).map_err(map_err(INBOUND_LISTENERS_MAP))?;
        let local_socks: SockHash<MapData, SockPair> =
            SockHash::try_from(take_map(&mut ebpf, LOCAL_SOCKS_MAP)?).map_err(map_err(LOCAL_SOCKS_MAP))?;

        // Acceleration is an optimisation: a kernel without sk_msg support
        // runs on the plain path, said once in the log.
        let mut accelerating = opts.accelerate;
        if accelerating {
            let attached = program::<SkMsg>(&mut ebpf, SK_MSG).and_then(|p| {
                p.load().map_err(|source| Error::Load { program: SK_MSG, source })?;
                p.attach(local_socks.fd()).map_err(|source| Error::Load { program: SK_MSG, source })
            });
            if let Err(e) = attached {
                tracing::warn!(error = %crate::error_chain(&e), "socket acceleration unavailable on this kernel; using the plain TCP path");
                accelerating = false;
            }
        }
        let nr_cpus = aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1);
        Ok(Self {
            ebpf,
            enrolled,
            counters,
            orig_dst: OrigDst(Arc::new(Mutex::new(orig_dst))),
            inbound_listeners,
            local_socks,
            cgroups: StdHashMap::new(),
            netns: StdHashMap::new(),
            ids,
            accelerate: accelerating,
            nr_cpus,
        })
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn orig_dst(&self) -> OrigDst {
        self.orig_dst.clone()
    }

    pub fn accelerating(&self) -> bool {
        self.accelerate
    }

    /// Makes sure our programs are attached to a pod's cgroup, as the kernel
    /// sees it; returns how many had to be (re)attached. Scoping attachments
    /// to the pod's own cgroup means a bug in a hook can only affect pods the
    /// agent manages, never the node's own traffic.
    ///
    /// aya attaches with a BPF link (kernel >= 5.7), which the kernel always
    /// treats as one of several programs on the cgroup and which refuses any
    /// attach flag: hence `Single` below, which means "no flags".
    pub fn attach(&mut self, cgroup: &Path) -> Result<u32, Error> {
        let fd = File::open(cgroup).map_err(|source| Error::Cgroup { path: cgroup.to_owned(), source })?;
        let links = self.cgroups.entry(cgroup.to_owned()).or_default();
        let present = |attach_type, id| {
            query::attached_program_ids(&fd, attach_type).map(|ids| ids.contains(&id)).unwrap_or(false)
        };
        let attach_err = |program: &'static str| move |source| Error::Attach { program, path: cgroup.to_owned(), source };
        let mut attached = 0;
        for (name, slot, attach_type, id) in [
            (CONNECT4, &mut links.connect4, query::BPF_CGROUP_INET4_CONNECT, self.ids.connect4),
            (CONNECT6, &mut links.connect6, query::BPF_CGROUP_INET6_CONNECT, self.ids.connect6),
        ] {
            if slot.is_some() && present(attach_type, id) {
                continue;
            }
            let prog = program::<CgroupSockAddr>(&mut self.ebpf, name)?;
            if let Some(stale) = slot.take() {
                let _ = prog.detach(stale);
            }
            *slot = Some(prog.attach(&fd, CgroupAttachMode::Single).map_err(attach_err(name))?);
            attached += 1;
        }
        if links.sock_ops.is_none() || !present(query::BPF_CGROUP_SOCK_OPS, self.ids.sock_ops) {
            let prog = program::<SockOps>(&mut self.ebpf, SOCK_OPS)?;
            if let Some(stale) = links.sock_ops.take() {
                let _ = prog.detach(stale);
            }
            links.sock_ops = Some(prog.attach(&fd, CgroupAttachMode::Single).map_err(attach_err(SOCK_OPS))?);
            attached += 1;
        }
        Ok(attached)
    }

    /// Whether all our cgroup programs are attached to `cgroup`, per the kernel.
    pub fn is_attached(&self, cgroup: &Path) -> bool {
        let Ok(fd) = File::open(cgroup) else { return false };
        [
            (query::BPF_CGROUP_INET4_CONNECT, self.ids.connect4),
            (query::BPF_CGROUP_INET6_CONNECT, self.ids.connect6),
            (query::BPF_CGROUP_SOCK_OPS, self.ids.sock_ops),
        ]
        .into_iter()
        .all(|(t, id)| query::attached_program_ids(&fd, t).is_ok_and(|ids| ids.contains(&id)))
    }

    /// Detaches the programs from a pod's cgroup. A cgroup that is already
    /// gone has lost its programs with it; that is not an error.
    pub fn detach(&mut self, cgroup: &Path) -> Result<(), Error> {
        let Some(links) = self.cgroups.remove(cgroup) else {
            return Ok(());
        };
        let cgroup_gone = !cgroup.exists();
        let gone = |e: &aya::programs::ProgramError| cgroup_gone || matches!(e, aya::programs::ProgramError::NotAttached);
        for (name, id) in [(CONNECT4, links.connect4), (CONNECT6, links.connect6)] {
            if let Some(id) = id
                && let Err(source) = program::<CgroupSockAddr>(&mut self.ebpf, name)?.detach(id)
                && !gone(&source)
            {
                return Err(Error::Detach { program: name, path: cgroup.to_owned(), source });
            }
        }
        if let Some(id) = links.sock_ops
            && let Err(source) = program::<SockOps>(&mut self.ebpf, SOCK_OPS)?.detach(id)
            && !gone(&source)
        {
            return Err(Error::Detach { program: SOCK_OPS, path: cgroup.to_owned(), source });
        }
        Ok(())
    }

    /// Attaches `sock_ops` to the agent's own cgroup, so the agent's ends of
    /// in-pod connections can join the sockhash. Refused for the root cgroup:
    /// that would put a hook on every socket of the machine.
    pub fn attach_agent_cgroup(&mut self, cgroup: &Path, is_root: bool) -> Result<bool, Error> {
        if !self.accelerate {
            return Ok(false);
        }
        if is_root {
            tracing::warn!(
                "the agent runs in the root cgroup; socket acceleration needs it in a cgroup of its own and is off"
            );
            self.accelerate = false;
            return Ok(false);
        }
        self.attach_sock_ops_only(cgroup)?;
        Ok(true)
    }

    fn attach_sock_ops_only(&mut self, cgroup: &Path) -> Result<(), Error> {
        let fd = File::open(cgroup).map_err(|source| Error::Cgroup { path: cgroup.to_owned(), source })?;
        let links = self.cgroups.entry(cgroup.to_owned()).or_default();
        if links.sock_ops.is_none() {
            links.sock_ops = Some(
                program::<SockOps>(&mut self.ebpf, SOCK_OPS)?
                    .attach(&fd, CgroupAttachMode::Single)
                    .map_err(|source| Error::Attach { program: SOCK_OPS, path: cgroup.to_owned(), source })?,
            );
        }
        Ok(())
    }

    /// Makes sure inbound capture (`sk_lookup`) is attached to a pod's network
    /// namespace; returns whether it had to be (re)attached.
    pub fn attach_netns(&mut self, cookie: u64, netns: &File, path: &Path) -> Result<bool, Error> {
        let present = query::attached_program_ids(netns, query::BPF_SK_LOOKUP)
            .is_ok_and(|ids| ids.contains(&self.ids.sk_lookup));
        if self.netns.contains_key(&cookie) && present {
            return Ok(false);
        }
        let prog = program::<SkLookup>(&mut self.ebpf, SK_LOOKUP)?;
        if let Some(stale) = self.netns.remove(&cookie) {
            let _ = prog.detach(stale);
        }
        let id = prog
            .attach(netns)
            .map_err(|source| Error::Attach { program: SK_LOOKUP, path: path.to_owned(), source })?;
        self.netns.insert(cookie, id);
        Ok(true)
    }

    pub fn is_netns_attached(&self, netns: &File) -> bool {
        query::attached_program_ids(netns, query::BPF_SK_LOOKUP).is_ok_and(|ids| ids.contains(&self.ids.sk_lookup))
    }

    pub fn detach_netns(&mut self, cookie: u64) {
        if let Some(id) = self.netns.remove(&cookie)
            && let Ok(prog) = program::<SkLookup>(&mut self.ebpf, SK_LOOKUP)
        {
            let _ = prog.detach(id);
        }
    }

    /// Points inbound capture for `ip` at the agent's plaintext listener.
    pub fn set_inbound_listener(&mut self, ip: IpAddr, listener: &impl AsRawFd) -> Result<(), Error> {
        self.inbound_listeners
            .insert(to_sock_addr(SocketAddr::new(ip, 0)), listener.as_raw_fd(), 0)
            .map_err(|source| Error::Map { map: INBOUND_LISTENERS_MAP, source })
    }

    pub fn has_inbound_listener(&self, ip: IpAddr) -> bool {
        // A sockhash lookup from user space fails (ENOSPC) for any key when
        // the value is 4 bytes, so walk the keys instead.
        let key = to_sock_addr(SocketAddr::new(ip, 0));
        self.inbound_listeners.keys().any(|k| k.is_ok_and(|k| k == key))
    }

    pub fn remove_inbound_listener(&mut self, ip: IpAddr) {
        let _ = self.inbound_listeners.remove(&to_sock_addr(SocketAddr::new(ip, 0)));
    }

    /// Sockets currently in the acceleration sockhash.
    pub fn accelerated_sockets(&self) -> usize {
        self.local_socks.keys().filter(Result::is_ok).count()
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
        let dp = Datapath::load(Options { accelerate: true }).unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
        assert!(dp.accelerating(), "sk_msg acceleration loads on this kernel");
        assert_eq!(dp.accelerated_sockets(), 0);
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
