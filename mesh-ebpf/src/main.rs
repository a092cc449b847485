//! Kernel side of the mesh: redirect enrolled pods' TCP connects to the node
//! agent's in-pod outbound listener and remember where they were going.
//!
//! Each hook is a thin `#[program]` over a `try_*` function so `?` works; every
//! decision is logged at debug level through aya-log.
// Built for bpfel-unknown-none by mesh-agent's build.rs. On the host (e.g.
// `cargo build --workspace`, clippy) it compiles to an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

use aya_ebpf::{
    Global,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuHashMap, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    ACCELERATE_ALL, ACCELERATE_OFF, AGENT_PORTS, AGENT_SOCKET_MARK, AF_INET, AF_INET6, CAPTURED_MAX, ENROLLED_MAX,
    INBOUND_TUNNEL_PORT,
    INBOUND_LISTENERS_MAX, LOCAL_SOCKS_MAX, ORIG_DST_MAX, PENDING_MAX, POD_COUNTERS_MAX,
    POD_FLAG_FAIL_OPEN, POD_FLAG_IPV6, PodCounters, PodEntry, SockAddr, SockPair, ctx_remote_port,
};

/// cgroup/connect*: 1 lets the connect() proceed (with our rewrite, if any).
const ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;

#[map(name = "ENROLLED")]
static ENROLLED: HashMap<u64, PodEntry> = HashMap::with_max_entries(ENROLLED_MAX, 0);

#[map(name = "POD_COUNTERS")]
static POD_COUNTERS: PerCpuHashMap<u64, PodCounters> =
    PerCpuHashMap::with_max_entries(POD_COUNTERS_MAX, 0);

#[map(name = "PENDING_ORIG_DST")]
static PENDING_ORIG_DST: LruHashMap<u64, SockAddr> = LruHashMap::with_max_entries(PENDING_MAX, 0);

#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<SockAddr, SockAddr> = LruHashMap::with_max_entries(ORIG_DST_MAX, 0);

#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<SockAddr> = SockHash::with_max_entries(INBOUND_LISTENERS_MAX, 0);

#[map(name = "CAPTURED")]
static CAPTURED: HashMap<SockAddr, u32> = HashMap::with_max_entries(CAPTURED_MAX, 0);

#[map(name = "LOCAL_SOCKS")]
static LOCAL_SOCKS: SockHash<SockPair> = SockHash::with_max_entries(LOCAL_SOCKS_MAX, 0);

/// Which connections socket-to-socket acceleration takes (`ACCELERATE_*`);
/// set by the agent at load.
#[unsafe(no_mangle)]
static ACCELERATE: Global<u8> = Global::new(ACCELERATE_ALL);

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
/// `BPF_F_CURRENT_NETNS` (-1): look sockets up in the calling socket's netns.
const CURRENT_NETNS: u64 = u64::MAX;

/// `struct bpf_sock_tuple`'s IPv4 member, network byte order.
#[repr(C)]
struct Tuple4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// Whether an agent listens for this pod (its outbound listener exists in the
/// pod's netns). Asked only for pods whose failure policy is `open`: with
/// `closed` the connect is redirected whether or not anyone listens, and a
/// missing agent means a refused connection, never a direct one.
#[inline(always)]
fn agent_listening(ctx: &SockAddrContext, pod: &PodEntry) -> bool {
    let mut t = Tuple4 { saddr: 0, daddr: pod.ip4, sport: 0, dport: pod.outbound_port.to_be() };
    // SAFETY: helper valid for cgroup sock_addr programs; the tuple is on
    // the stack with the size of the IPv4 member; the socket it returns is
    // released before we return.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            (&raw mut t).cast(),
            core::mem::size_of::<Tuple4>() as u32,
            CURRENT_NETNS,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// Reads a 4-word address out of a context one 32-bit load at a time: the
/// verifier refuses wider loads and copies through a moved context pointer,
/// which is what a plain array copy compiles to.
#[inline(always)]
fn ip6_words(p: *const [u32; 4]) -> [u32; 4] {
    let w = p.cast::<u32>();
    // SAFETY: `p` points at a 4-word field of the program's context.
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}

enum Verdict {
    Redirected,
    Passed,
}

fn count(netns: u64, verdict: Verdict) {
    if let Some(c) = POD_COUNTERS.get_ptr_mut(netns) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        unsafe {
            match verdict {
                Verdict::Redirected => (*c).redirected += 1,
                Verdict::Passed => (*c).passed += 1,
            }
        }
    }
}

/// The socket's `SO_MARK`: the agent marks all of its sockets.
fn socket_mark(sa: *mut bpf_sock_addr) -> u32 {
    // SAFETY: `sk` is always set for cgroup/connect* contexts; the verifier
    // checks the field access.
    unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 0;
        }
        (*sk).mark
    }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: reads of the context the verifier hands us.
    let (protocol, dst_ip, dst_port_be) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    if protocol != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    if socket_mark(sa) == AGENT_SOCKET_MARK {
        debug!(ctx, "connect4: agent socket, not redirected");
        return Ok(ALLOW);
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let dst_port = u16::from_be(dst_port_be as u16);
    let Some(pod) = ENROLLED.get_ptr(netns) else {
        debug!(ctx, "connect4: netns {} not enrolled, pass to {:i}:{}", netns, u32::from_be(dst_ip), dst_port);
        count(netns, Verdict::Passed);
        return Ok(ALLOW);
    };
    // SAFETY: pointer from a successful lookup.
    let pod = unsafe { *pod };
    // Loopback stays in the pod (sidecar-style helpers); a pod talking to
    // itself never needs the agent.
    if (u32::from_be(dst_ip) >> 24) == 127 || dst_ip == pod.ip4 {
        debug!(ctx, "connect4: local destination {:i}:{}, pass", u32::from_be(dst_ip), dst_port);
        count(netns, Verdict::Passed);
        return Ok(ALLOW);
    }
    if pod.flags & POD_FLAG_FAIL_OPEN != 0 && !agent_listening(ctx, &pod) {
        debug!(ctx, "connect4: no agent and failure policy open: pass to {:i}:{}", u32::from_be(dst_ip), dst_port);
        count(netns, Verdict::Passed);
        return Ok(ALLOW);
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = SockAddr::v4(dst_ip, dst_port);
    if PENDING_ORIG_DST.insert(cookie, orig, 0).is_err() {
        // Without the original destination the agent could not relay it:
        // better to let the connection go direct than to break it.
        debug!(ctx, "connect4: cannot record original destination, pass");
        count(netns, Verdict::Passed);
        return Ok(ALLOW);
    }
    // SAFETY: writes to the context fields the program type may rewrite.
    unsafe {
        (*sa).user_ip4 = pod.ip4;
        (*sa).user_port = u32::from(pod.outbound_port.to_be());
    }
    debug!(ctx, "connect4: redirect {:i}:{} to agent port {}", u32::from_be(dst_ip), dst_port, pod.outbound_port);
    count(netns, Verdict::Redirected);
    Ok(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: reads of the context the verifier hands us.
    let (protocol, dst_port_be) = unsafe { ((*sa).protocol, (*sa).user_port) };
    if protocol != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    if socket_mark(sa) == AGENT_SOCKET_MARK {
        debug!(ctx, "connect6: agent socket, not redirected");
        return Ok(ALLOW);
    }
    // SAFETY: field of the context.
    let dst_ip = ip6_words(unsafe { &raw const (*sa).user_ip6 });
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let dst_port = u16::from_be(dst_port_be as u16);
    let Some(pod) = ENROLLED.get_ptr(netns) else {
        debug!(ctx, "connect6: netns {} not enrolled, pass", netns);
        count(netns, Verdict::Passed);
        return Ok(ALLOW);
    };
    // SAFETY: pointer from a successful lookup.
    let pod = unsafe { *pod };
    let orig = SockAddr::v6(dst_ip, dst_port);
    let to_self = if orig.family == AF_INET {
        orig.ip[0] == pod.ip4 || (u32::from_be(orig.ip[0]) >> 24) == 127
    } else {
        orig.ip == pod.ip6
            || (dst_ip[0] == 0 && dst_ip[1] == 0 && dst_ip[2] == 0 && u32::from_be(dst_ip[3]) == 1)
    };
    // An IPv6 destination can only be redirected to the pod's own IPv6
    // address; a v4-mapped one goes to the pod's IPv4 in mapped form.
    if to_self || (orig.family == AF_INET6 && pod.flags & POD_FLAG_IPV6 == 0) {
        debug!(ctx, "connect6: local or unsupported destination, pass");
        count(netns, Verdict::Passed);
        return Ok(ALLOW);
    }
    if pod.flags & POD_FLAG_FAIL_OPEN != 0 && !agent_listening(ctx, &pod) {
        debug!(ctx, "connect6: no agent and failure policy open: pass");
        count(netns, Verdict::Passed);
        return Ok(ALLOW);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING_ORIG_DST.insert(cookie, orig, 0).is_err() {
        debug!(ctx, "connect6: cannot record original destination, pass");
        count(netns, Verdict::Passed);
        return Ok(ALLOW);
    }
    // SAFETY: writes to the context fields the program type may rewrite.
    unsafe {
        if orig.family == AF_INET6 {
            (*sa).user_ip6[0] = pod.ip6[0];
            (*sa).user_ip6[1] = pod.ip6[1];
            (*sa).user_ip6[2] = pod.ip6[2];
            (*sa).user_ip6[3] = pod.ip6[3];
        } else {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = 0xffff_u32.to_be();
            (*sa).user_ip6[3] = pod.ip4;
        }
        (*sa).user_port = u32::from(pod.outbound_port.to_be());
    }
    debug!(ctx, "connect6: redirect port {} to agent port {}", dst_port, pod.outbound_port);
    count(netns, Verdict::Redirected);
    Ok(ALLOW)
}

/// Two jobs, on sockets of enrolled pods (attached to pods' cgroups and to
/// the agent's own cgroup):
/// - `TCP_CONNECT_CB` (after the local port is bound, before the SYN leaves):
///   re-key a redirected socket's original destination by the client address
///   the agent will see as the accepted connection's peer;
/// - `*_ESTABLISHED_CB`: an agent tunnel connection between two pods of this
///   node, and with `ACCELERATE_ALL` a connection whose two ends are the same
///   pod address (app <-> the agent's in-pod listener), joins `LOCAL_SOCKS`,
///   where `sk_msg` can move its bytes socket to socket.
#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match try_sock_ops(&ctx) {
        Ok(()) | Err(()) => 1,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        return record_orig_dst(ctx);
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return track_local_pair(ctx);
    }
    Ok(())
}

fn record_orig_dst(ctx: &SockOpsContext) -> Result<(), ()> {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = PENDING_ORIG_DST.get_ptr(cookie) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup.
    let orig = unsafe { *orig };
    let port = ctx.local_port() as u16;
    let client = if ctx.family() == u32::from(AF_INET6) {
        // SAFETY: field of the context.
        SockAddr::v6(ip6_words(unsafe { &raw const (*ctx.ops).local_ip6 }), port)
    } else {
        SockAddr::v4(ctx.local_ip4(), port)
    };
    let _ = ORIG_DST.insert(client, orig, 0);
    let _ = PENDING_ORIG_DST.remove(cookie);
    debug!(ctx, "sock_ops: client port {} keyed to original destination port {}", port, orig.port);
    Ok(())
}

fn track_local_pair(ctx: &SockOpsContext) -> Result<(), ()> {
    let mode = ACCELERATE.load();
    if mode == ACCELERATE_OFF {
        return Ok(());
    }
    // SAFETY: helper valid for sock_ops programs (Linux 5.15+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if ENROLLED.get_ptr(netns).is_none() {
        return Ok(());
    }
    let mut key = if ctx.family() == u32::from(AF_INET6) {
        // SAFETY: fields of the context.
        SockPair {
            local_ip: ip6_words(unsafe { &raw const (*ctx.ops).local_ip6 }),
            remote_ip: ip6_words(unsafe { &raw const (*ctx.ops).remote_ip6 }),
            local_port: ctx.local_port() as u16,
            remote_port: ctx_remote_port(ctx.remote_port()),
            family: u32::from(AF_INET6),
        }
    } else {
        SockPair {
            local_ip: [ctx.local_ip4(), 0, 0, 0],
            remote_ip: [ctx.remote_ip4(), 0, 0, 0],
            local_port: ctx.local_port() as u16,
            remote_port: ctx_remote_port(ctx.remote_port()),
            family: u32::from(AF_INET),
        }
    };
    if key.local_ip == key.remote_ip {
        // Inside one pod (both ends on the pod's address): one end is the
        // app's socket, whose reads then change (README): only when asked.
        if mode != ACCELERATE_ALL {
            return Ok(());
        }
    } else if !same_node_tunnel(ctx, &key) {
        return Ok(());
    }
    // SAFETY: the context is a live bpf_sock_ops for this socket.
    let ops = unsafe { &mut *ctx.ops };
    if LOCAL_SOCKS.update(&mut key, ops, u64::from(BPF_ANY)).is_ok() {
        debug!(ctx, "sock_ops: local pair {} <-> {} accelerated", key.local_port, key.remote_port);
    }
    Ok(())
}

/// One end of the agent's tunnel between two pods of this node: the socket
/// is the agent's (its mark; an accepted socket has its listener's), one
/// end is the tunnel port, and the other end's address is a pod this
/// node's agent captures. Both ends of such a connection are the agent's
/// own non-blocking sockets, so what moves between them is nothing an app
/// reads. A tunnel to another node's pod never matches: its peer is not a
/// pod of this node (and not in this node's sockhash).
#[inline(always)]
fn same_node_tunnel(ctx: &SockOpsContext, key: &SockPair) -> bool {
    if key.local_port != INBOUND_TUNNEL_PORT && key.remote_port != INBOUND_TUNNEL_PORT {
        return false;
    }
    // SAFETY: field of the context; the kernel sets it for full sockets
    // (an established one is), NULL otherwise.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-NULL `sk` of a sock_ops context points at its socket.
    if unsafe { (*sk).mark } != AGENT_SOCKET_MARK {
        return false;
    }
    let peer = if key.family == u32::from(AF_INET6) {
        SockAddr::v6(key.remote_ip, 0)
    } else {
        SockAddr::v4(key.remote_ip[0], 0)
    };
    CAPTURED.get_ptr(&peer).is_some()
}

/// On every send from a socket in `LOCAL_SOCKS`: if its peer is there too,
/// put the bytes straight on the peer's receive queue. Otherwise (or when the
/// peer is gone) the bytes take the normal TCP path.
#[sk_msg]
pub fn accelerate(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: reads of the sk_msg context.
    let mut peer = unsafe {
        if (*md).family == u32::from(AF_INET6) {
            SockPair {
                local_ip: ip6_words(&raw const (*md).remote_ip6),
                remote_ip: ip6_words(&raw const (*md).local_ip6),
                local_port: ctx_remote_port((*md).remote_port),
                remote_port: (*md).local_port as u16,
                family: u32::from(AF_INET6),
            }
        } else {
            SockPair {
                local_ip: [(*md).remote_ip4, 0, 0, 0],
                remote_ip: [(*md).local_ip4, 0, 0, 0],
                local_port: ctx_remote_port((*md).remote_port),
                remote_port: (*md).local_port as u16,
                family: u32::from(AF_INET),
            }
        }
    };
    // On success the helper returns SK_PASS with the redirect recorded; on a
    // miss it returns SK_DROP, which must not drop the bytes: pass them on.
    let _ = LOCAL_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    SK_PASS
}

/// Inbound capture, attached to each pod's network namespace: a TCP
/// connection from another host for any port of an enrolled pod other than
/// the agent's goes to the agent's plaintext listener instead.
///
/// "From another host" is decided by address: a connection whose source is
/// the pod's own address was opened inside the pod, by the app or by the
/// agent delivering a connection to the app, and is never captured (that
/// is what keeps the agent's own delivery from looping back into it).
/// Loopback traffic never matches a pod address in the listener map.
///
/// While no agent listens (restart, crash), a captured address is refused
/// in the kernel, unless the pod's failure policy is `open`.
#[sk_lookup]
pub fn inbound_capture(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: reads of the sk_lookup context.
    let (protocol, family, port) = unsafe { ((*l).protocol, (*l).family, (*l).local_port as u16) };
    if protocol != 6 {
        return SK_PASS;
    }
    let mut i = 0;
    while i < AGENT_PORTS.len() {
        if AGENT_PORTS[i] == port {
            return SK_PASS;
        }
        i += 1;
    }
    // SAFETY: reads of the sk_lookup context.
    let (key, from_self) = unsafe {
        if family == u32::from(AF_INET6) {
            let local = ip6_words(&raw const (*l).local_ip6);
            let remote = ip6_words(&raw const (*l).remote_ip6);
            (SockAddr::v6(local, 0), local == remote)
        } else {
            let local = core::ptr::read_volatile(&raw const (*l).local_ip4);
            let remote = core::ptr::read_volatile(&raw const (*l).remote_ip4);
            (SockAddr::v4(local, 0), local == remote)
        }
    };
    if from_self {
        return SK_PASS;
    }
    if INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
        debug!(&ctx, "sk_lookup: inbound port {} captured by the agent", port);
        return SK_PASS;
    }
    // No listener: the agent is gone (its socket left the map with it), or
    // the address is not the mesh's. A captured address is refused unless
    // its failure policy is open: plaintext never reaches a mesh app behind
    // the policy's back.
    // SAFETY: pointer from a successful lookup of a u32 value.
    match CAPTURED.get_ptr(&key).map(|f| unsafe { *f }) {
        Some(flags) if flags & POD_FLAG_FAIL_OPEN == 0 => {
            debug!(&ctx, "sk_lookup: inbound port {} refused: no agent listener (failure policy closed)", port);
            SK_DROP
        }
        _ => SK_PASS,
    }
}

/// Never attached and never loaded by the agent: a program the verifier must
/// refuse (it reads far outside its context). The agent's tests load it to
/// prove that a rejected program's error carries the verifier's log.
#[cgroup_sock_addr(connect4)]
pub fn verifier_canary(ctx: SockAddrContext) -> i32 {
    // SAFETY: not safe at all, on purpose; the kernel refuses to load it.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u32).add(4096)) as i32 }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
