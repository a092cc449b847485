//! Where a pod's sockets come from. Every socket the proxy opens for a pod,
//! listening or connecting, comes from the pod's [`PodSockets`]: in the
//! agent, the pod's own network namespace ([`Netns`], so redirection stays
//! on the pod's loopback and the source address is the pod's); in tests, a
//! loopback address of this host standing in for the pod ([`Loopback`]), so
//! the whole data path (listeners, tunnel, mTLS, HTTP layers) runs
//! in-process without root and without namespaces. Nothing else in the
//! proxy tells the two apart.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
};

use futures::future::BoxFuture;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;

use crate::netns::Netns;

/// Backlog of the in-pod listeners.
const BACKLOG: i32 = 1024;

/// A pod's sockets: where its listeners listen and its connections start.
pub trait PodSockets: Send + Sync + 'static {
    /// A non-blocking listening socket on `port` of the pod.
    fn listen(&self, port: u16) -> Result<std::net::TcpListener, SocketError>;
    /// An unconnected socket of the pod, to reach `dst` from it (the caller
    /// connects, under its own timeout).
    fn for_connect(&self, dst: SocketAddr) -> BoxFuture<'_, Result<TcpSocket, SocketError>>;
    /// The pod's network, as a number (a pod re-created with the same
    /// address is another network): keys the connections to its apps.
    fn network(&self) -> u64;
}

/// Why a pod's socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
    #[error("cannot listen on {addr} in its network namespace: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot use loopback address {addr} for the pod: {source}")]
    Loopback { addr: SocketAddr, source: io::Error },
}

impl PodSockets for Netns {
    fn listen(&self, port: u16) -> Result<std::net::TcpListener, SocketError> {
        // Every address of the pod: whatever the CNI gave it, and its loopback
        // (where the connect hooks send its own connections).
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let sock = self.socket(Domain::IPV4)?;
        let err = |source| SocketError::Listen { addr, source };
        sock.set_reuse_address(true).map_err(err)?;
        sock.bind(&addr.into()).map_err(err)?;
        sock.listen(BACKLOG).map_err(err)?;
        Ok(sock.into())
    }

    fn for_connect(&self, dst: SocketAddr) -> BoxFuture<'_, Result<TcpSocket, SocketError>> {
        Box::pin(async move {
            let domain = if dst.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
            // Made on the namespace's thread, already non-blocking and marked.
            let sock = self.socket_async(domain).await?;
            Ok(TcpSocket::from_std_stream(sock.into()))
        })
    }

    fn network(&self) -> u64 {
        self.cookie()
    }
}

/// A pod played by one loopback address of this host (`127.x.y.z`: Linux
/// answers the whole of `127.0.0.0/8`): its listeners listen on that address
/// only and its connections start from it, so two agents and their pods
/// share one network namespace without sharing a port, and a destination
/// agent sees the source pod's address as it would between nodes.
pub struct Loopback {
    ip: IpAddr,
    network: u64,
}

impl Loopback {
    pub fn new(ip: IpAddr) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self { ip, network: NEXT.fetch_add(1, Ordering::Relaxed) }
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl PodSockets for Loopback {
    fn listen(&self, port: u16) -> Result<std::net::TcpListener, SocketError> {
        let addr = SocketAddr::new(self.ip, port);
        let err = |source| SocketError::Loopback { addr, source };
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP)).map_err(err)?;
        sock.set_reuse_address(true).map_err(err)?;
        sock.bind(&addr.into()).map_err(err)?;
        sock.listen(BACKLOG).map_err(err)?;
        sock.set_nonblocking(true).map_err(err)?;
        Ok(sock.into())
    }

    fn for_connect(&self, dst: SocketAddr) -> BoxFuture<'_, Result<TcpSocket, SocketError>> {
        let from = SocketAddr::new(self.ip, 0);
        let made = (|| {
            let sock = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            sock.bind(from)?;
            Ok(sock)
        })();
        Box::pin(std::future::ready(made.map_err(|source| SocketError::Loopback { addr: from, source })))
    }

    fn network(&self) -> u64 {
        self.network
    }
}
