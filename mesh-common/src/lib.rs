//! Types shared by the eBPF programs (`mesh-ebpf`) and the node agent.
//!
//! Every type here is a map key or value: `#[repr(C)]`, explicit padding, no
//! `bool`, so that the kernel side and the host side agree on the layout byte
//! for byte. Map names and sizes live next to the types that go in them.
#![cfg_attr(not(test), no_std)]

/// The agent's in-pod listener for redirected outbound connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's in-pod plaintext capture listener (inbound, not via a tunnel).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The agent's in-pod tunnel listener: connections from other agents.
pub const INBOUND_TUNNEL_PORT: u16 = 15008;

/// `SO_MARK` set on every socket the agent opens. The connect hooks never
/// redirect a marked socket, so the agent cannot loop into itself even when it
/// opens a socket inside an enrolled pod's network namespace.
pub const AGENT_SOCKET_MARK: u32 = 0x4d53_4801;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Enrolled pods, keyed by the network namespace cookie (`u64`).
/// A pod is in the mesh exactly when its entry is present.
pub const ENROLLED_MAP: &str = "ENROLLED";
pub const ENROLLED_MAX: u32 = 4096;

/// Per-pod connect counters (per CPU), keyed by netns cookie. The agent
/// creates an entry for every pod it knows on its node, enrolled or not.
pub const POD_COUNTERS_MAP: &str = "POD_COUNTERS";
pub const POD_COUNTERS_MAX: u32 = 4096;

/// Original destinations keyed by the connecting socket's cookie, written by
/// `connect4`/`connect6` before the socket has a local port.
pub const PENDING_MAP: &str = "PENDING_ORIG_DST";
pub const PENDING_MAX: u32 = 65536;

/// Original destinations keyed by the client's address (IP + local port), moved
/// from `PENDING_ORIG_DST` by `sock_ops` once the port is assigned. The agent
/// looks an accepted connection's peer address up here. LRU so that entries of
/// connections the agent never accepted age out.
pub const ORIG_DST_MAP: &str = "ORIG_DST";
pub const ORIG_DST_MAX: u32 = 65536;

/// The agent's in-pod plaintext capture listeners, keyed by the pod's address
/// (`SockAddr` with port 0). `sk_lookup` hands inbound connections for the
/// pod's ports to the listener found here.
pub const INBOUND_LISTENERS_MAP: &str = "INBOUND_LISTENERS";
pub const INBOUND_LISTENERS_MAX: u32 = 4096;

/// Pods whose inbound connections are captured, keyed by the pod's address
/// (`SockAddr` with port 0), value: `POD_FLAG_*` flags (`POD_FLAG_FAIL_OPEN`).
/// Outlives the agent (pinned) like `INBOUND_LISTENERS`' keys do not: a
/// listener's entry vanishes with its socket, this one says the address is
/// still the mesh's, so `sk_lookup` refuses what no agent can take.
pub const CAPTURED_MAP: &str = "CAPTURED";
pub const CAPTURED_MAX: u32 = 4096;

/// Established TCP sockets whose peer is on this node too, keyed by
/// [`SockPair`]: the agent's tunnel connections between two of the node's
/// pods, and (with `ACCELERATE_ALL`) connections inside one enrolled pod
/// (the app and the agent's in-pod listener). `sk_msg` moves bytes from one
/// end to the other without the TCP/IP stack.
pub const LOCAL_SOCKS_MAP: &str = "LOCAL_SOCKS";
pub const LOCAL_SOCKS_MAX: u32 = 65536;

/// Global (u8) set at load time: which connections socket-to-socket
/// acceleration takes, one of the `ACCELERATE_*` values.
pub const ACCELERATE_GLOBAL: &str = "ACCELERATE";
/// `ACCELERATE`: none.
pub const ACCELERATE_OFF: u8 = 0;
/// `ACCELERATE`: the agent's own tunnel connections between two pods of the
/// node (both ends the agent's sockets).
pub const ACCELERATE_TUNNELS: u8 = 1;
/// `ACCELERATE`: those, and the in-pod hops between an app and the agent
/// (the app's socket joins the sockhash).
pub const ACCELERATE_ALL: u8 = 2;

/// Ports the kernel hooks never capture: the agent's own listeners.
pub const AGENT_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_TUNNEL_PORT];

/// `PodEntry::flags`: the pod has an IPv6 address (`ip6` is valid).
pub const POD_FLAG_IPV6: u32 = 1;
/// `PodEntry::flags` and `CAPTURED` values: the pod's failure policy is
/// `open`: while no agent listens for it, its connections go direct (outbound)
/// and reach the app unpoliced (inbound). Without it (the default) they are
/// refused.
pub const POD_FLAG_FAIL_OPEN: u32 = 2;

/// The maps pinned in the node's bpffs directory, so they outlive the agent:
/// a restarted agent finds the same enrollment, original destinations,
/// capture entries and counters. `LOCAL_SOCKS` is not among them: it only
/// holds sockets of the agent that made it.
pub const PINNED_MAPS: [&str; 6] = [
    ENROLLED_MAP,
    POD_COUNTERS_MAP,
    PENDING_MAP,
    ORIG_DST_MAP,
    INBOUND_LISTENERS_MAP,
    CAPTURED_MAP,
];

/// What the connect hooks need to know about an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// The pod's IPv4 address, network byte order (as the kernel's contexts hold it).
    pub ip4: u32,
    /// The pod's IPv6 address, network byte order, valid with `POD_FLAG_IPV6`.
    pub ip6: [u32; 4],
    pub flags: u32,
    /// The agent's outbound listener port inside the pod, host byte order.
    pub outbound_port: u16,
    pub _pad: [u8; 6],
}

/// Redirect counters of one pod (one copy per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// TCP connects rewritten to the agent's outbound listener.
    pub redirected: u64,
    /// TCP connects of an unenrolled pod, or to loopback / the pod itself.
    pub passed: u64,
}

/// An IPv4 or IPv6 socket address as the kernel gives it. IPv4 uses `ip[0]`
/// (network byte order) and zeroes the rest; IPv4-mapped IPv6 addresses are
/// stored as IPv4 so both families of client socket meet the same key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
}

impl SockAddr {
    pub const fn v4(ip_be: u32, port: u16) -> Self {
        Self {
            ip: [ip_be, 0, 0, 0],
            port,
            family: AF_INET,
        }
    }

    /// An IPv6 address given as the kernel's four network-order words; a
    /// v4-mapped address (`::ffff:a.b.c.d`) becomes IPv4.
    pub const fn v6(ip_be: [u32; 4], port: u16) -> Self {
        if ip_be[0] == 0 && ip_be[1] == 0 && u32::from_be(ip_be[2]) == 0xffff {
            return Self::v4(ip_be[3], port);
        }
        Self {
            ip: ip_be,
            port,
            family: AF_INET6,
        }
    }
}

/// One end of a local TCP connection: its own address and its peer's, as the
/// socket sees them. The peer socket's key is the same pair swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockPair {
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub family: u32,
}

impl SockPair {
    pub const fn peer(&self) -> Self {
        Self {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
        }
    }
}

/// `sock_ops` and `sk_msg` contexts hold the remote port in network byte order
/// in the upper 16 bits of a u32 (on little-endian hosts); this returns it in
/// host order.
#[inline(always)]
pub const fn ctx_remote_port(raw: u32) -> u16 {
    u16::from_be((raw >> 16) as u16)
}

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::SockPair {}
    // SAFETY: plain-old-data, repr(C), every bit pattern valid, no implicit padding.
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::SockAddr {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_are_pinned() {
        assert_eq!(size_of::<PodEntry>(), 32);
        assert_eq!(align_of::<PodEntry>(), 4);
        assert_eq!(size_of::<PodCounters>(), 16);
        assert_eq!(size_of::<SockAddr>(), 20);
        assert_eq!(size_of::<SockPair>(), 40);
        assert_eq!(align_of::<SockPair>(), 4);
    }

    #[test]
    fn peer_of_peer_is_self() {
        let p = SockPair { local_ip: [1, 0, 0, 0], remote_ip: [2, 0, 0, 0], local_port: 3, remote_port: 4, family: 2 };
        assert_eq!(p.peer().peer(), p);
        assert_eq!(p.peer().local_port, 4);
        // 8080 in network order in the upper half, as the kernel presents it.
        assert_eq!(ctx_remote_port((8080u16.to_be() as u32) << 16), 8080);
    }

    #[test]
    fn v4_mapped_v6_is_stored_as_v4() {
        let ip = 0xc633_640b_u32.to_be(); // 198.51.100.11
        let mapped = SockAddr::v6([0, 0, 0xffff_u32.to_be(), ip], 80);
        assert_eq!(mapped, SockAddr::v4(ip, 80));
        let real = SockAddr::v6([0x2001_0db8_u32.to_be(), 0, 0, 1_u32.to_be()], 80);
        assert_eq!(real.family, AF_INET6);
    }
}
