//! [`Capture`]: every frame crossing the fabric bridge, read with a raw
//! `AF_PACKET` socket inside the fabric netns (no tcpdump/tshark needed).
//!
//! The socket is bound to `br0` with promiscuous membership: a Linux bridge
//! only passes frames it *forwards* between ports up to its own device (where
//! packet sockets see them) while the device is promiscuous, as tcpdump
//! makes it.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};

use crate::netns;

const ETH_P_ALL: u16 = 0x0003;
/// Larger than any GSO/GRO super-frame a veth hands the bridge.
const FRAME_BUF: usize = 1 << 20;
const RCVBUF: libc::c_int = 64 << 20;

/// A running capture; [`Capture::stop`] returns what it saw.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Frames>>>,
}

/// Frames captured, in order, and the kernel's drop count.
#[derive(Debug, Default)]
pub struct Frames {
    pub frames: Vec<Vec<u8>>,
    /// Frames the kernel dropped because the socket's buffer was full.
    pub drops: u32,
}

/// (source, destination) of one direction of a TCP connection.
type Flow = ((Ipv4Addr, u16), (Ipv4Addr, u16));

/// One TCP segment over IPv4, parsed from a captured frame.
#[derive(Clone, Copy, Debug)]
pub struct TcpSegment<'a> {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub payload: &'a [u8],
}

impl Capture {
    /// Starts capturing on `iface` in the netns `netns_name`; returns once
    /// the socket is bound, so everything sent afterwards is seen.
    pub(crate) fn start(netns_name: &str, iface: &str) -> Result<Capture> {
        let ns = File::open(netns::path(netns_name))
            .with_context(|| format!("opening netns {netns_name}"))?;
        let iface = std::ffi::CString::new(iface)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Result<()>>();
        let stop2 = stop.clone();
        // A thread of its own: setns only moves the calling thread, which
        // never leaves the fabric netns and ends with the capture.
        let thread = std::thread::spawn(move || -> Result<Frames> {
            let sock = match open_socket(&ns, &iface) {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Ok(Frames::default());
                }
            };
            read_frames(&sock, &stop2)
        });
        match rx.recv() {
            Ok(Ok(())) => Ok(Capture {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("the capture thread died before binding its socket"),
        }
    }

    /// Drains what the kernel queued so far and stops.
    pub fn stop(mut self) -> Result<Frames> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().expect("stopped once").join() {
            Ok(r) => r,
            Err(_) => bail!("the capture thread panicked"),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Frames {
    /// Whether `needle` occurs in any frame, or in the TCP payload of one
    /// direction of a connection across two consecutive segments.
    pub fn contains(&self, needle: &[u8]) -> bool {
        if needle.is_empty() {
            return true;
        }
        if self.frames.iter().any(|f| find(f, needle)) {
            return true;
        }
        let keep = needle.len() - 1;
        let mut tails: std::collections::HashMap<Flow, Vec<u8>> = std::collections::HashMap::new();
        for seg in self.tcp_segments().filter(|s| !s.payload.is_empty()) {
            let tail = tails.entry((seg.src, seg.dst)).or_default();
            let mut joined = std::mem::take(tail);
            joined.extend_from_slice(seg.payload);
            if find(&joined, needle) {
                return true;
            }
            *tail = joined[joined.len().saturating_sub(keep)..].to_vec();
        }
        false
    }

    /// IPv4 TCP segments, in capture order.
    pub fn tcp_segments(&self) -> impl Iterator<Item = TcpSegment<'_>> {
        self.frames.iter().filter_map(|f| parse_tcp(f))
    }

    /// TCP payload bytes between `a` and `b` (either direction) where one
    /// side uses `port`. Every segment is counted as often as it was seen.
    pub fn tcp_payload_between(&self, a: Ipv4Addr, b: Ipv4Addr, port: u16) -> u64 {
        self.tcp_segments()
            .filter(|s| {
                let ips = (s.src.0, s.dst.0);
                (ips == (a, b) || ips == (b, a)) && (s.src.1 == port || s.dst.1 == port)
            })
            .map(|s| s.payload.len() as u64)
            .sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.frames.iter().map(|f| f.len() as u64).sum()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.len() >= needle.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Ethernet II (optionally one 802.1Q tag) / IPv4 / TCP.
fn parse_tcp(f: &[u8]) -> Option<TcpSegment<'_>> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]);
    off += 2;
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*f.get(off + 2)?, *f.get(off + 3)?]);
        off += 4;
    }
    if ethertype != 0x0800 {
        return None;
    }
    let ip = f.get(off..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || *ip.get(9)? != 6 || ihl < 20 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    // GSO super-frames can carry total length 0; then the frame bounds it.
    let end = if total >= ihl && total <= ip.len() { total } else { ip.len() };
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = ip.get(ihl..end)?;
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    Some(TcpSegment {
        src: (src, sport),
        dst: (dst, dport),
        payload: tcp.get(doff..)?,
    })
}

fn os_err(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", std::io::Error::last_os_error())
}

fn setsockopt<T>(fd: libc::c_int, level: libc::c_int, name: libc::c_int, val: &T) -> libc::c_int {
    // SAFETY: `val` points to a live T of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    }
}

fn open_socket(ns: &File, iface: &std::ffi::CStr) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; the fd comes from an open File.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(os_err("setns into the fabric netns"));
    }
    // SAFETY: plain syscall.
    let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
    if ifindex == 0 {
        return Err(os_err(&format!("no interface {iface:?} in the fabric netns")));
    }
    // SAFETY: plain syscall; the result is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // Best effort: a big buffer so a burst does not overflow it.
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RCVBUF) != 0 {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &RCVBUF);
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv) != 0 {
        return Err(os_err("SO_RCVTIMEO"));
    }
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err("binding the capture socket"));
    }
    // SAFETY: all-zero is a valid packet_mreq.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as i32;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    if setsockopt(fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq) != 0 {
        return Err(os_err("PACKET_MR_PROMISC"));
    }
    // Frames queued before promiscuous mode took effect may be partial
    // views; nothing was sent yet anyway. Reset the statistics.
    packet_drops(fd);
    Ok(sock)
}

/// Drops since the last call (PACKET_STATISTICS resets on read).
fn packet_drops(fd: libc::c_int) -> u32 {
    let mut st = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `st` and `len` are valid for the kernel to write.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if rc == 0 { st.tp_drops } else { 0 }
}

fn read_frames(sock: &OwnedFd, stop: &AtomicBool) -> Result<Frames> {
    let fd = sock.as_raw_fd();
    let mut out = Frames::default();
    let mut buf = vec![0u8; FRAME_BUF];
    loop {
        // After the stop flag: keep reading without waiting until the queue
        // is empty, so everything sent before `stop` is in.
        let stopping = stop.load(Ordering::SeqCst);
        let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            out.frames.push(buf[..n as usize].to_vec());
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if stopping => break,
            Some(libc::EAGAIN) => continue,
            _ => bail!("reading the capture socket: {err}"),
        }
    }
    out.drops = packet_drops(fd);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 198, 51, 100, 11, 198, 51, 100, 12];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&15008u16.to_be_bytes());
        tcp[12] = 5 << 4;
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn finds_markers_and_parses_segments() {
        let frames = Frames {
            frames: vec![frame(b"xxMARK"), frame(b"ERyy")],
            drops: 0,
        };
        assert!(frames.contains(b"MARKER"));
        assert!(!frames.contains(b"MARKERS"));
        let a = Ipv4Addr::new(198, 51, 100, 11);
        let b = Ipv4Addr::new(198, 51, 100, 12);
        assert_eq!(frames.tcp_payload_between(b, a, 15008), 10);
        assert_eq!(frames.tcp_payload_between(a, b, 9000), 0);
        let s = frames.tcp_segments().next().unwrap();
        assert_eq!((s.src.1, s.dst.1, s.payload), (40000, 15008, &b"xxMARK"[..]));
    }
}
