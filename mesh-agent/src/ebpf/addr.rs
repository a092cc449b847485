//! Conversions between std socket addresses and the maps' `SockAddr`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_common::{AF_INET6, SockAddr};

pub(crate) fn to_sock_addr(a: SocketAddr) -> SockAddr {
    match a.ip().to_canonical() {
        IpAddr::V4(ip) => SockAddr::v4(u32::from_ne_bytes(ip.octets()), a.port()),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            SockAddr::v6([w(0), w(4), w(8), w(12)], a.port())
        }
    }
}

pub(crate) fn from_sock_addr(a: &SockAddr) -> SocketAddr {
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

