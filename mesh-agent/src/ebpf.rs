//! The kernel data path: load the eBPF programs, attach them to pods'
//! cgroups, keep the enrollment map in sync, read the counters, and answer
//! "where was this connection going?". The only module that imports aya.
//!
//! Everything a pod's protection depends on is pinned in the node's bpffs
//! directory ([`PinDir`]): the maps, and one BPF link per hook per pod. So
//! when the agent exits, for any reason, redirection and capture stay in
//! place and the pod fails closed (its connections are refused: nobody
//! listens where they are sent) until an agent serves it again. A starting
//! agent adopts what is pinned: the same maps (original destinations,
//! counters and enrollment survive), and each pinned link switched to the
//! agent's own freshly loaded program with `BPF_LINK_UPDATE`, atomically.
//! Only leaving the mesh (or `mesh-agent uninstall`) removes a pod's state.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs::File,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapInfo, PerCpuHashMap, PerCpuValues, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps},
};
use mesh_common::{
    ACCELERATE_ALL, ACCELERATE_GLOBAL, ACCELERATE_OFF, ACCELERATE_TUNNELS, CAPTURED_MAP, ENROLLED_MAP, INBOUND_LISTENERS_MAP, LOCAL_SOCKS_MAP, ORIG_DST_MAP,
    PINNED_MAPS, POD_COUNTERS_MAP, POD_FLAG_FAIL_OPEN, POD_FLAG_IPV6, PodCounters, PodEntry, SockAddr, SockPair,
};

mod addr;
pub mod link;
mod logger;
mod query;

use addr::{from_sock_addr, to_sock_addr};
pub use link::{PinDir, PinError};
pub use logger::spawn_logger;

use crate::config::Acceleration;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

const CONNECT4: &str = "connect4";
const CONNECT6: &str = "connect6";
const SOCK_OPS: &str = "sock_ops";
const SK_MSG: &str = "accelerate";
const SK_LOOKUP: &str = "inbound_capture";

/// The hooks on a pod's cgroup and on its network namespace: program name
/// (also the pin's file name) and attach type.
const CGROUP_HOOKS: [(&str, u32); 3] = [
    (CONNECT4, query::BPF_CGROUP_INET4_CONNECT),
    (CONNECT6, query::BPF_CGROUP_INET6_CONNECT),
    (SOCK_OPS, query::BPF_CGROUP_SOCK_OPS),
];
const NETNS_HOOKS: [(&str, u32); 1] = [(SK_LOOKUP, query::BPF_SK_LOOKUP)];

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
    #[error("attaching {program} to {path} failed: {source}")]
    Attach {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching {program} to cgroup {path} failed: {source}")]
    AttachAgent {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error("pinning {path} failed: {source}")]
    Pin { path: PathBuf, source: std::io::Error },
    #[error(
        "the pinned map {path} was made by an incompatible agent version ({found}; this agent needs {wanted}): \
         the pods it protects stay as they are (fail closed); run `mesh-agent uninstall` on this node to start afresh"
    )]
    Incompatible { path: PathBuf, found: String, wanted: String },
}

/// Kernel IDs of our loaded programs, to recognise them in `BPF_PROG_QUERY`.
struct ProgIds {
    connect4: u32,
    connect6: u32,
    sock_ops: u32,
    sk_lookup: u32,
}

impl ProgIds {
    fn of(&self, program: &str) -> u32 {
        match program {
            CONNECT4 => self.connect4,
            CONNECT6 => self.connect6,
            SOCK_OPS => self.sock_ops,
            _ => self.sk_lookup,
        }
    }
}

/// Options fixed at load time.
#[derive(Clone, Debug)]
pub struct Options {
    /// Which connections socket-to-socket acceleration (sockhash +
    /// sk_msg) takes.
    pub accelerate: Acceleration,
    /// The bpf filesystem to pin under (`--bpffs`).
    pub bpffs: PathBuf,
    /// This node's name: its directory under `bpffs`.
    pub node: String,
}

/// One pod target's pinned links (a cgroup's three, a netns' one), by program.
type TargetLinks = BTreeMap<&'static str, OwnedFd>;

/// The loaded programs and the maps the control side writes.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinDir,
    enrolled: HashMap<MapData, u64, PodEntry>,
    counters: PerCpuHashMap<MapData, u64, PodCounters>,
    orig_dst: OrigDst,
    inbound_listeners: SockHash<MapData, SockAddr>,
    captured: HashMap<MapData, SockAddr, u32>,
    local_socks: SockHash<MapData, SockPair>,
    /// Pinned links by their directory (`cgroup-<inode>`, `netns-<cookie>`).
    links: BTreeMap<String, TargetLinks>,
    /// Link directory of each cgroup path attached by this agent (a cgroup
    /// that is gone can no longer be asked its inode).
    cgroup_dirs: StdHashMap<PathBuf, String>,
    /// `sock_ops` on the agent's own cgroup (acceleration): not pinned, it
    /// belongs to this process.
    agent_sock_ops: Option<aya::programs::sock_ops::SockOpsLinkId>,
    ids: ProgIds,
    accelerate: Acceleration,
    nr_cpus: usize,
    /// Pinned links found at start and switched to this agent's programs.
    pub adopted: usize,
}

/// What [`Datapath::retain`] keeps: the state of the pods the agent manages.
#[derive(Debug, Default)]
pub struct Keep {
    /// Link directories (`cgroup-<inode>`, `netns-<cookie>`).
    pub link_dirs: std::collections::BTreeSet<String>,
    pub cookies: std::collections::BTreeSet<u64>,
    pub ips: Vec<IpAddr>,
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
pub fn pod_entry(ips: &[IpAddr], outbound_port: u16, fail_open: bool) -> PodEntry {
    let mut e = PodEntry {
        ip4: 0,
        ip6: [0; 4],
        flags: if fail_open { POD_FLAG_FAIL_OPEN } else { 0 },
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

/// Refuses pinned maps whose shape differs from what this object declares:
/// reusing them would feed the programs misread entries. Such pins are
/// left alone (and so are the links using them: the pods stay protected by
/// the old programs) until the operator uninstalls.
fn check_pinned_maps(pins: &PinDir) -> Result<(), Error> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| Error::Object(aya::EbpfError::ParseError(e)))?;
    for name in PINNED_MAPS {
        let path = pins.maps().join(name);
        if !path.exists() {
            continue;
        }
        let Some(want) = obj.maps.get(name) else { continue };
        let wanted = format!(
            "type {}, key {} B, value {} B, {} entries",
            want.map_type(),
            want.key_size(),
            want.value_size(),
            want.max_entries()
        );
        let found = match MapInfo::from_pin(&path) {
            Ok(i) => format!(
                "type {}, key {} B, value {} B, {} entries",
                i.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
                i.key_size(),
                i.value_size(),
                i.max_entries()
            ),
            Err(e) => format!("unreadable: {e}"),
        };
        if found != wanted {
            return Err(Error::Incompatible { path, found, wanted });
        }
    }
    Ok(())
}

impl Datapath {
    /// Loads the embedded programs into the kernel, reusing the node's
    /// pinned maps, and switches every pinned link to the new programs.
    pub fn load(opts: Options) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NotEmbedded);
        }
        let pins = PinDir::new(&opts.bpffs, &opts.node, true)?;
        check_pinned_maps(&pins)?;
        let accelerate = match opts.accelerate {
            Acceleration::Off => ACCELERATE_OFF,
            Acceleration::Tunnels => ACCELERATE_TUNNELS,
            Acceleration::On => ACCELERATE_ALL,
        };
        let map_paths: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|m| (*m, pins.maps().join(m))).collect();
        let mut loader = EbpfLoader::new();
        loader.override_global(ACCELERATE_GLOBAL, &accelerate, true);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(Error::Object)?;
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
        let captured = HashMap::try_from(take_map(&mut ebpf, CAPTURED_MAP)?).map_err(map_err(CAPTURED_MAP))?;
        let local_socks: SockHash<MapData, SockPair> =
            SockHash::try_from(take_map(&mut ebpf, LOCAL_SOCKS_MAP)?).map_err(map_err(LOCAL_SOCKS_MAP))?;

        // Acceleration is an optimisation: a kernel without sk_msg support
        // runs on the plain path, said once in the log.
        let mut accelerating = opts.accelerate;
        if accelerating != Acceleration::Off {
            let attached = program::<SkMsg>(&mut ebpf, SK_MSG).and_then(|p| {
                p.load().map_err(|source| Error::Load { program: SK_MSG, source })?;
                p.attach(local_socks.fd()).map_err(|source| Error::Load { program: SK_MSG, source })
            });
            if let Err(e) = attached {
                tracing::warn!(error = %crate::error_chain(&e), "socket acceleration unavailable on this kernel; using the plain TCP path");
                accelerating = Acceleration::Off;
            }
        }
        let nr_cpus = aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1);
        let mut dp = Self {
            ebpf,
            pins,
            enrolled,
            counters,
            orig_dst: OrigDst(Arc::new(Mutex::new(orig_dst))),
            inbound_listeners,
            captured,
            local_socks,
            links: BTreeMap::new(),
            cgroup_dirs: StdHashMap::new(),
            agent_sock_ops: None,
            ids,
            accelerate: accelerating,
            nr_cpus,
            adopted: 0,
        };
        dp.adopt_links();
        Ok(dp)
    }

    /// Switches every pinned link to this agent's programs (an upgrade
    /// replaces the code in place; a restart swaps in the same code). A link
    /// that cannot be updated (its cgroup or netns is gone) is removed.
    fn adopt_links(&mut self) {
        for dir in self.pins.link_dirs() {
            let hooks: &[(&'static str, u32)] = if dir.starts_with("cgroup-") {
                &CGROUP_HOOKS
            } else if dir.starts_with("netns-") {
                &NETNS_HOOKS
            } else {
                tracing::warn!(dir = %dir, "unknown pinned link directory left alone");
                continue;
            };
            let mut target = TargetLinks::new();
            for (name, _) in hooks {
                let path = self.pins.links().join(&dir).join(name);
                let Ok(fd) = link::open_pinned(&path) else { continue };
                let updated = self
                    .ebpf
                    .program(name)
                    .and_then(|p| p.fd().ok())
                    .ok_or_else(|| std::io::Error::other("program not loaded"))
                    .and_then(|prog| link::update(fd.as_fd(), prog.as_fd()));
                match updated {
                    Ok(()) => {
                        target.insert(name, fd);
                        self.adopted += 1;
                    }
                    Err(e) => {
                        tracing::info!(link = %path.display(), error = %e, "pinned link no longer usable (its pod is gone): removed");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            if target.is_empty() {
                let _ = self.pins.remove_links(&dir);
            } else {
                self.links.insert(dir, target);
            }
        }
        if self.adopted > 0 {
            tracing::info!(links = self.adopted, dir = %self.pins.root().display(), "adopted pinned links: switched to this agent's programs");
        }
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn pin_dir(&self) -> &PinDir {
        &self.pins
    }

    pub fn orig_dst(&self) -> OrigDst {
        self.orig_dst.clone()
    }

    pub fn acceleration(&self) -> Acceleration {
        self.accelerate
    }

    /// Makes sure our programs are attached to a pod's cgroup through pinned
    /// links, as the kernel sees it; returns how many had to be (re)attached.
    /// Scoping attachments to the pod's own cgroup means a bug in a hook can
    /// only affect pods the agent manages, never the node's own traffic.
    pub fn attach(&mut self, cgroup: &Path) -> Result<u32, Error> {
        let cgroup_err = |source| Error::Cgroup { path: cgroup.to_owned(), source };
        let fd = File::open(cgroup).map_err(cgroup_err)?;
        // By inode: stable while the cgroup exists.
        let dir = format!("cgroup-{}", fd.metadata().map_err(cgroup_err)?.ino());
        self.cgroup_dirs.insert(cgroup.to_owned(), dir.clone());
        self.ensure_links(&dir, fd.as_fd(), &CGROUP_HOOKS, cgroup)
    }

    /// The link directory of a cgroup this agent attached to.
    pub fn cgroup_dir(&self, cgroup: &Path) -> Option<&str> {
        self.cgroup_dirs.get(cgroup).map(String::as_str)
    }

    pub fn netns_dir(cookie: u64) -> String {
        format!("netns-{cookie}")
    }

    /// For each hook: if the kernel does not report our program attached to
    /// `target`, a new pinned link replaces the stale one (new first, then
    /// the old detached: two programs for a moment, never none).
    fn ensure_links(
        &mut self,
        dir: &str,
        target: std::os::fd::BorrowedFd<'_>,
        hooks: &[(&'static str, u32)],
        path: &Path,
    ) -> Result<u32, Error> {
        let link_dir = self.pins.links().join(dir);
        std::fs::create_dir_all(&link_dir).map_err(|source| Error::Pin { path: link_dir.clone(), source })?;
        let mut attached = 0;
        for &(name, attach_type) in hooks {
            let ours = self.ids.of(name);
            let present = query::attached_program_ids(&target, attach_type).is_ok_and(|ids| ids.contains(&ours));
            let have = self.links.get(dir).is_some_and(|l| l.contains_key(name));
            if present && have {
                continue;
            }
            let prog = self
                .ebpf
                .program(name)
                .ok_or(Error::MissingProgram { program: name })?
                .fd()
                .map_err(|source| Error::Load { program: name, source })?;
            let new = link::create(prog.as_fd(), target, attach_type)
                .map_err(|source| Error::Attach { program: name, path: path.to_owned(), source })?;
            let pin = link_dir.join(name);
            let stale = self.links.entry(dir.to_owned()).or_default().remove(name);
            let _ = std::fs::remove_file(&pin);
            link::pin(new.as_fd(), &pin).map_err(|source| Error::Pin { path: pin.clone(), source })?;
            if let Some(old) = stale {
                let _ = link::detach(old.as_fd());
            }
            self.links.entry(dir.to_owned()).or_default().insert(name, new);
            attached += 1;
        }
        Ok(attached)
    }

    /// Whether all our cgroup programs are attached to `cgroup`, per the kernel.
    pub fn is_attached(&self, cgroup: &Path) -> bool {
        let Ok(fd) = File::open(cgroup) else { return false };
        CGROUP_HOOKS
            .into_iter()
            .all(|(name, t)| query::attached_program_ids(&fd, t).is_ok_and(|ids| ids.contains(&self.ids.of(name))))
    }

    /// Detaches the programs from a pod's cgroup and unpins their links. A
    /// cgroup that is already gone has lost its programs with it.
    pub fn detach(&mut self, cgroup: &Path) -> Result<(), Error> {
        let Some(dir) = self.cgroup_dirs.remove(cgroup) else {
            return Ok(());
        };
        self.remove_target(&dir);
        Ok(())
    }

    fn remove_target(&mut self, dir: &str) {
        if let Some(links) = self.links.remove(dir) {
            for fd in links.values() {
                let _ = link::detach(fd.as_fd());
            }
        }
        if let Err(e) = self.pins.remove_links(dir) {
            tracing::warn!(dir = %dir, error = %e, "removing pinned links failed");
        }
    }

    /// Attaches `sock_ops` to the agent's own cgroup, so the agent's
    /// sockets (its tunnels, its ends of in-pod connections) can join the
    /// sockhash. Refused for the root cgroup: that would put a hook on
    /// every socket of the machine.
    pub fn attach_agent_cgroup(&mut self, cgroup: &Path, is_root: bool) -> Result<bool, Error> {
        if self.accelerate == Acceleration::Off {
            return Ok(false);
        }
        if is_root {
            let why = "the agent runs in the root cgroup; socket acceleration needs it in a cgroup of its own and is off";
            // Asked for explicitly, its absence is news; the default just
            // says so.
            if self.accelerate == Acceleration::On {
                tracing::warn!("{why}");
            } else {
                tracing::info!("{why}");
            }
            self.accelerate = Acceleration::Off;
            return Ok(false);
        }
        let fd = File::open(cgroup).map_err(|source| Error::Cgroup { path: cgroup.to_owned(), source })?;
        if self.agent_sock_ops.is_none() {
            self.agent_sock_ops = Some(
                program::<SockOps>(&mut self.ebpf, SOCK_OPS)?
                    .attach(&fd, CgroupAttachMode::Single)
                    .map_err(|source| Error::AttachAgent { program: SOCK_OPS, path: cgroup.to_owned(), source })?,
            );
        }
        Ok(true)
    }

    /// Makes sure inbound capture (`sk_lookup`) is attached to a pod's network
    /// namespace; returns whether it had to be (re)attached.
    pub fn attach_netns(&mut self, cookie: u64, netns: &File, path: &Path) -> Result<bool, Error> {
        Ok(self.ensure_links(&Self::netns_dir(cookie), netns.as_fd(), &NETNS_HOOKS, path)? > 0)
    }

    pub fn is_netns_attached(&self, netns: &File) -> bool {
        query::attached_program_ids(netns, query::BPF_SK_LOOKUP).is_ok_and(|ids| ids.contains(&self.ids.sk_lookup))
    }

    pub fn detach_netns(&mut self, cookie: u64) {
        self.remove_target(&Self::netns_dir(cookie));
    }

    /// Removes pinned state that belongs to no pod in `keep`: links of other
    /// cgroups and namespaces, enrollment, counters and capture entries of
    /// other namespaces and addresses. Run once the agent knows every local
    /// pod (a pod that left the mesh while no agent ran).
    pub fn retain(&mut self, keep: &Keep) -> usize {
        let mut removed = 0;
        let stale: Vec<String> = self
            .links
            .keys()
            .cloned()
            .chain(self.pins.link_dirs())
            .filter(|d| !keep.link_dirs.contains(d))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for d in stale {
            tracing::info!(dir = %d, "pinned links of a pod no longer in the mesh on this node: removed");
            self.remove_target(&d);
            removed += 1;
        }
        let cookies: Vec<u64> = self.enrolled.keys().filter_map(Result::ok).filter(|c| !keep.cookies.contains(c)).collect();
        for c in cookies {
            let _ = self.enrolled.remove(&c);
            removed += 1;
        }
        let cookies: Vec<u64> = self.counters.keys().filter_map(Result::ok).filter(|c| !keep.cookies.contains(c)).collect();
        for c in cookies {
            let _ = self.counters.remove(&c);
        }
        let keep_addrs: Vec<SockAddr> = keep.ips.iter().map(|ip| to_sock_addr(SocketAddr::new(*ip, 0))).collect();
        let addrs: Vec<SockAddr> = self.captured.keys().filter_map(Result::ok).filter(|a| !keep_addrs.contains(a)).collect();
        for a in addrs {
            let _ = self.captured.remove(&a);
            removed += 1;
        }
        let addrs: Vec<SockAddr> =
            self.inbound_listeners.keys().filter_map(Result::ok).filter(|a| !keep_addrs.contains(a)).collect();
        for a in addrs {
            let _ = self.inbound_listeners.remove(&a);
        }
        removed
    }

    /// The cookies of every namespace with an enrollment entry.
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Marks `ip` as captured: with no agent listener, `sk_lookup` refuses
    /// its inbound connections (unless `fail_open`). Returns whether the
    /// address was captured before (with whatever policy).
    pub fn set_captured(&mut self, ip: IpAddr, fail_open: bool) -> Result<bool, Error> {
        let key = to_sock_addr(SocketAddr::new(ip, 0));
        let flags = if fail_open { POD_FLAG_FAIL_OPEN } else { 0 };
        let before = self.captured.get(&key, 0).ok();
        if before != Some(flags) {
            self.captured.insert(key, flags, 0).map_err(|source| Error::Map { map: CAPTURED_MAP, source })?;
        }
        Ok(before.is_some())
    }

    pub fn is_captured(&self, ip: IpAddr) -> bool {
        self.captured.get(&to_sock_addr(SocketAddr::new(ip, 0)), 0).is_ok()
    }

    pub fn remove_captured(&mut self, ip: IpAddr) {
        let _ = self.captured.remove(&to_sock_addr(SocketAddr::new(ip, 0)));
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

    /// A private bpf filesystem for one test, unmounted on drop.
    struct TestBpffs(PathBuf);

    impl TestBpffs {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("mesh-bpffs-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            nix::mount::mount(Some("bpf"), &dir, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
                .expect("mounting a bpf filesystem (root needed)");
            TestBpffs(dir)
        }
    }

    impl Drop for TestBpffs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn options(fs: &TestBpffs, accelerate: bool) -> Options {
        let accelerate = if accelerate { Acceleration::On } else { Acceleration::Off };
        Options { accelerate, bpffs: fs.0.clone(), node: "node-t".into() }
    }

    #[test]
    fn programs_load_on_this_kernel() {
        require_root();
        let fs = TestBpffs::new("load");
        let dp = Datapath::load(options(&fs, true)).unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
        assert_eq!(dp.acceleration(), Acceleration::On, "sk_msg acceleration loads on this kernel");
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
    fn maps_are_pinned_and_reused_by_the_next_agent() {
        require_root();
        let fs = TestBpffs::new("reuse");
        let entry = pod_entry(&["198.51.100.7".parse().unwrap()], 15001, false);
        {
            let mut dp = Datapath::load(options(&fs, false)).unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
            dp.enroll(42, entry).unwrap();
            dp.set_captured("198.51.100.7".parse().unwrap(), false).unwrap();
        }
        for m in PINNED_MAPS {
            assert!(fs.0.join("nodemesh/node-t/maps").join(m).exists(), "{m} pinned");
        }
        // A second agent (the first one gone) sees the same entries.
        let mut dp = Datapath::load(options(&fs, false)).unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)));
        assert_eq!(dp.enrollment(42), Some(entry));
        assert!(dp.is_captured("198.51.100.7".parse().unwrap()));
        // Nothing of it belongs to a pod the agent knows: retain removes it.
        assert_eq!(dp.retain(&Keep::default()), 2);
        assert_eq!(dp.enrollment(42), None);
        drop(dp);
        let pins = PinDir::new(&fs.0, "node-t", false).unwrap();
        pins.remove_all().unwrap();
        assert!(!fs.0.join("nodemesh/node-t").exists(), "uninstall leaves nothing");
    }

    #[test]
    fn an_incompatible_pinned_map_is_refused_with_its_shape() {
        require_root();
        let fs = TestBpffs::new("incompat");
        let pins = PinDir::new(&fs.0, "node-t", true).unwrap();
        // Pin a per-CPU map where ENROLLED (a hash of 32-byte entries) goes.
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("object");
        let counters = ebpf.take_map(POD_COUNTERS_MAP).expect("map");
        match &counters {
            aya::maps::Map::PerCpuHashMap(m) => m.pin(pins.maps().join(ENROLLED_MAP)).expect("pin"),
            _ => panic!("POD_COUNTERS is a per-CPU hash"),
        }
        let err = Datapath::load(options(&fs, false)).err().expect("an incompatible pin is refused");
        let msg = crate::error_chain(&err);
        assert!(msg.contains("incompatible agent version") && msg.contains("ENROLLED") && msg.contains("mesh-agent uninstall"), "{msg}");
    }

    #[test]
    fn a_plain_directory_is_not_a_bpffs() {
        let dir = std::env::temp_dir();
        let err = PinDir::new(&dir, "node-t", true).expect_err("refused");
        assert!(err.to_string().contains("is not a bpf filesystem"), "{err}");
        assert!(PinDir::new(&dir, "../x", true).is_err());
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
        let e = pod_entry(&["198.51.100.7".parse().unwrap(), "2001:db8::7".parse().unwrap()], 15001, false);
        assert_eq!(e.ip4.to_ne_bytes(), [198, 51, 100, 7]);
        assert_eq!(e.flags, POD_FLAG_IPV6);
        assert_eq!(e.outbound_port, 15001);
    }
}
