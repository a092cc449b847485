//! Hitless restart: the running agent hands its listening sockets and the
//! workload certificates they serve with to its successor over a unix
//! socket (`<run-dir>/<node>/handoff.sock`, `SOCK_SEQPACKET`, descriptors
//! passed with `SCM_RIGHTS`), so no connect is refused while agents change.
//!
//! Why a handoff rather than `SO_REUSEPORT` groups: the same sockets carry
//! on, so the connections already queued in their accept backlogs are not
//! reset when the old agent closes (a reuseport listener's queue dies with
//! it unless `tcp_migrate_req` is set in every pod), and the `sk_lookup`
//! capture entries, which point at the sockets themselves, stay valid.
//!
//! The exchange (each line one datagram, JSON):
//! 1. successor: `{"hello": PID}`;
//! 2. old agent: pauses its reconcile (the successor owns the kernel from
//!    now on), then sends `{"admin": ADDR}` with the admin listener,
//!    `{"metrics": ADDR}` with the metrics listener if any, one
//!    `{"pod": ...}` per pod with its three listeners and certificate, and
//!    `{"end": true}`;
//! 3. successor: adopts everything, reconciles, then `{"taken": true}`;
//! 4. old agent: stops accepting, releases the node lock, drains, exits.
//!
//! If the successor goes away before `taken`, the old agent resumes as if
//! nothing happened (its listeners never stopped) and repairs whatever the
//! successor changed in the kernel. Only a process of the same user may
//! connect (`SO_PEERCRED`), and the directory is 0700: the private keys
//! never leave the node.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

use crate::state::PodKey;

/// How long each side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_MESSAGE: usize = 256 << 10;

pub fn socket_path(run_dir: &Path, node: &str) -> PathBuf {
    super::node_dir(run_dir, node).join("handoff.sock")
}

/// A workload certificate in transit (PEM).
#[derive(Clone, Serialize, Deserialize)]
pub struct CertPem {
    pub chain: String,
    pub key: String,
    pub trust_bundle: String,
    pub not_before: u64,
    pub not_after: u64,
    pub serial: String,
}

impl CertPem {
    pub fn of(c: &crate::identity::WorkloadCert) -> Self {
        let unix = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CertPem {
            chain: c.chain_pem(),
            key: c.key_pem(),
            trust_bundle: c.trust_bundle_pem(),
            not_before: unix(c.not_before),
            not_after: unix(c.not_after),
            serial: c.serial.clone(),
        }
    }

    pub fn into_cert(self, id: crate::identity::SpiffeId) -> Result<crate::identity::WorkloadCert, String> {
        use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
        let chain = crate::identity::certs_from_pem(&self.chain).map_err(|e| format!("chain: {e}"))?;
        let trust_bundle = crate::identity::certs_from_pem(&self.trust_bundle).map_err(|e| format!("bundle: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes()).map_err(|e| format!("key: {e}"))?;
        let at = |s: u64| std::time::UNIX_EPOCH + Duration::from_secs(s);
        Ok(crate::identity::WorkloadCert {
            id,
            chain,
            key,
            not_before: at(self.not_before),
            not_after: at(self.not_after),
            trust_bundle,
            serial: self.serial,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Message {
    Hello(u32),
    Admin(std::net::SocketAddr),
    Metrics(std::net::SocketAddr),
    Pod(PodMessage),
    End(bool),
    Taken(bool),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodMessage {
    namespace: String,
    name: String,
    netns_cookie: u64,
    identity: Option<String>,
    cert: Option<CertPem>,
}

/// One pod's listeners as the old agent hands them over.
pub struct PodOffer {
    pub pod: PodKey,
    pub netns_cookie: u64,
    /// outbound, tunnel, plaintext.
    pub listeners: [OwnedFd; 3],
    pub identity: Option<String>,
    pub cert: Option<CertPem>,
}

/// Everything the old agent hands over.
#[derive(Default)]
pub struct Offer {
    pub admin: Option<(std::net::SocketAddr, OwnedFd)>,
    pub metrics: Option<(std::net::SocketAddr, OwnedFd)>,
    pub pods: Vec<PodOffer>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("handoff socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("handoff: {0}")]
    Protocol(String),
    #[error("handoff: the other agent went away ({0})")]
    Gone(String),
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(nix_io)
}

fn set_timeout(fd: &OwnedFd, t: Duration) {
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as i64, 0);
    let _ = socket::setsockopt(fd, sockopt::ReceiveTimeout, &tv);
    let _ = socket::setsockopt(fd, sockopt::SendTimeout, &tv);
}

fn send(fd: &OwnedFd, msg: &Message, fds: &[RawFd]) -> Result<(), Error> {
    let bytes = serde_json::to_vec(msg).map_err(|e| Error::Protocol(e.to_string()))?;
    let iov = [io::IoSlice::new(&bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| Error::Gone(format!("send: {e}")))?;
    Ok(())
}

fn recv(fd: &OwnedFd) -> Result<(Message, Vec<OwnedFd>), Error> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| Error::Gone(format!("receive: {e}")))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| Error::Protocol(e.to_string()))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: descriptors the kernel just installed for us.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let n = msg.bytes;
    if n == 0 {
        return Err(Error::Gone("connection closed".into()));
    }
    let m = serde_json::from_slice(&buf[..n]).map_err(|e| Error::Protocol(format!("bad message: {e}")))?;
    Ok((m, fds))
}

/// What the old agent provides and does during a handoff.
pub trait Source: Send + Sync {
    /// Stop touching the kernel (the successor owns it from now on) and
    /// return what to hand over.
    fn pause_and_offer(&self) -> Offer;
    /// The successor went away before taking over: carry on.
    fn resume(&self);
    /// The successor serves: stop accepting and drain.
    fn taken(&self);
}

/// The old agent's side: serves handoffs on `path` until one succeeds or
/// [`Server::stop`]. Runs on a thread of its own.
pub fn serve(path: &Path, source: std::sync::Arc<dyn Source>) -> Result<Server, Error> {
    let sock_err = |source| Error::Socket { path: path.to_owned(), source };
    let listener = seqpacket().map_err(sock_err)?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(sock_err(e)),
        _ => {}
    }
    let addr = UnixAddr::new(path).map_err(|e| sock_err(nix_io(e)))?;
    socket::bind(listener.as_raw_fd(), &addr).map_err(|e| sock_err(nix_io(e)))?;
    socket::listen(&listener, socket::Backlog::new(4).expect("valid backlog")).map_err(|e| sock_err(nix_io(e)))?;
    let wake = listener.try_clone().map_err(sock_err)?;
    let stopping = std::sync::Arc::new(AtomicBool::new(false));
    let stop = stopping.clone();
    let path = path.to_owned();
    let thread = std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            loop {
                let accepted = socket::accept(listener.as_raw_fd());
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let conn = match accepted {
                    // SAFETY: accept returned a new descriptor we own.
                    Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                    Err(e) => {
                        tracing::warn!(error = %e, "handoff: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(&conn, source.as_ref()) {
                    Ok(()) => {
                        // The socket path is the successor's to bind now.
                        tracing::info!(socket = %path.display(), "handoff: the new agent took over; draining");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "handoff aborted; this agent keeps serving"),
                }
            }
        })
        .map_err(|e| Error::Socket { path: PathBuf::new(), source: e })?;
    Ok(Server { thread, stopping, wake })
}

/// The handoff server of a running agent.
pub struct Server {
    thread: std::thread::JoinHandle<()>,
    stopping: std::sync::Arc<AtomicBool>,
    /// The listening socket, to wake the thread's `accept`.
    wake: OwnedFd,
}

impl Server {
    /// Stops serving (the agent is done) and waits for the thread, so what
    /// the [`Source`] holds (duplicates of the agent's listeners) is closed
    /// when this returns. A handoff under way finishes first.
    pub fn stop(self) {
        self.stopping.store(true, Ordering::Release);
        // Shutting the listening socket down fails its `accept` (EINVAL):
        // no connection to the path, which may be a successor's by now.
        let _ = socket::shutdown(self.wake.as_raw_fd(), socket::Shutdown::Read);
        let _ = self.thread.join();
    }
}

fn hand_over(conn: &OwnedFd, source: &dyn Source) -> Result<(), Error> {
    let me = nix::unistd::geteuid().as_raw();
    let cred = socket::getsockopt(conn, sockopt::PeerCredentials).map_err(|e| Error::Protocol(e.to_string()))?;
    if cred.uid() != me {
        return Err(Error::Protocol(format!("refused a handoff request from uid {} (pid {})", cred.uid(), cred.pid())));
    }
    set_timeout(conn, STEP_TIMEOUT);
    let (hello, _) = recv(conn)?;
    let Message::Hello(pid) = hello else { return Err(Error::Protocol("expected hello".into())) };
    tracing::info!(successor = pid, "handoff: a new agent for this node asks to take over");
    let offer = source.pause_and_offer();
    let result = (|| {
        if let Some((addr, fd)) = &offer.admin {
            send(conn, &Message::Admin(*addr), &[fd.as_raw_fd()])?;
        }
        if let Some((addr, fd)) = &offer.metrics {
            send(conn, &Message::Metrics(*addr), &[fd.as_raw_fd()])?;
        }
        for p in &offer.pods {
            let m = PodMessage {
                namespace: p.pod.namespace.clone(),
                name: p.pod.name.clone(),
                netns_cookie: p.netns_cookie,
                identity: p.identity.clone(),
                cert: p.cert.clone(),
            };
            let fds: Vec<RawFd> = p.listeners.iter().map(AsRawFd::as_raw_fd).collect();
            send(conn, &Message::Pod(m), &fds)?;
        }
        send(conn, &Message::End(true), &[])?;
        match recv(conn)? {
            (Message::Taken(true), _) => Ok(()),
            _ => Err(Error::Protocol("expected taken".into())),
        }
    })();
    match result {
        Ok(()) => {
            source.taken();
            Ok(())
        }
        Err(e) => {
            source.resume();
            Err(e)
        }
    }
}

/// The successor's side, once the offer is adopted.
pub struct Taking {
    conn: OwnedFd,
}

impl Taking {
    /// Tells the old agent to stop accepting and drain.
    pub fn confirm(self) -> Result<(), Error> {
        send(&self.conn, &Message::Taken(true), &[])
    }
}

/// Asks the agent serving `path` for its sockets. `Ok(None)`: nobody
/// answers there (no agent, or one still starting).
pub fn request(path: &Path) -> Result<Option<(Offer, Taking)>, Error> {
    let conn = seqpacket().map_err(|source| Error::Socket { path: path.to_owned(), source })?;
    let addr = UnixAddr::new(path).map_err(|e| Error::Socket { path: path.to_owned(), source: nix_io(e) })?;
    match socket::connect(conn.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(Error::Socket { path: path.to_owned(), source: nix_io(e) }),
    }
    set_timeout(&conn, STEP_TIMEOUT);
    send(&conn, &Message::Hello(std::process::id()), &[])?;
    let mut offer = Offer::default();
    loop {
        let (m, mut fds) = recv(&conn)?;
        match m {
            Message::Admin(a) => offer.admin = fds.pop().map(|fd| (a, fd)),
            Message::Metrics(a) => offer.metrics = fds.pop().map(|fd| (a, fd)),
            Message::Pod(p) => {
                let [o, t, pl]: [OwnedFd; 3] = fds
                    .try_into()
                    .map_err(|_| Error::Protocol(format!("pod {}/{}: expected three listeners", p.namespace, p.name)))?;
                offer.pods.push(PodOffer {
                    pod: PodKey { namespace: p.namespace, name: p.name },
                    netns_cookie: p.netns_cookie,
                    listeners: [o, t, pl],
                    identity: p.identity,
                    cert: p.cert,
                });
            }
            Message::End(_) => return Ok(Some((offer, Taking { conn }))),
            _ => return Err(Error::Protocol("unexpected message".into())),
        }
    }
}

/// Waits up to `timeout` for either the node lock (no agent: start fresh)
/// or a handoff from the agent holding it.
pub fn lock_or_offer(
    run_dir: &Path,
    node: &str,
    timeout: Duration,
) -> Result<Result<super::NodeLock, (Offer, Taking)>, super::Error> {
    let until = Instant::now() + timeout;
    let path = socket_path(run_dir, node);
    loop {
        if let Some(lock) = super::NodeLock::try_acquire(run_dir, node)? {
            return Ok(Ok(lock));
        }
        match request(&path) {
            Ok(Some(o)) => return Ok(Err(o)),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "handoff failed; retrying"),
        }
        if Instant::now() >= until {
            return Err(super::Error::NoHandoff {
                node: node.to_owned(),
                pid: super::NodeLock::holder(run_dir, node),
                path: path.clone(),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<&'static str>>,
        listener: Mutex<Option<std::net::TcpListener>>,
    }

    impl Source for Recorder {
        fn pause_and_offer(&self) -> Offer {
            self.events.lock().unwrap().push("paused");
            let l = self.listener.lock().unwrap();
            let l = l.as_ref().expect("listener");
            let dup = || OwnedFd::from(l.try_clone().unwrap());
            Offer {
                admin: Some((l.local_addr().unwrap(), dup())),
                metrics: None,
                pods: vec![PodOffer {
                    pod: PodKey { namespace: "shop".into(), name: "web-0".into() },
                    netns_cookie: 7,
                    listeners: [dup(), dup(), dup()],
                    identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
                    cert: None,
                }],
            }
        }
        fn resume(&self) {
            self.events.lock().unwrap().push("resumed");
        }
        fn taken(&self) {
            self.events.lock().unwrap().push("taken");
        }
    }

    fn setup(name: &str) -> (PathBuf, Arc<Recorder>, std::net::SocketAddr) {
        let dir = std::env::temp_dir().join(format!("mesh-handoff-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = Arc::new(Recorder::default());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        *rec.listener.lock().unwrap() = Some(l);
        (dir.join("handoff.sock"), rec, addr)
    }

    fn wait_for(rec: &Recorder, event: &str) {
        for _ in 0..200 {
            if rec.events.lock().unwrap().contains(&event) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no {event}: {:?}", rec.events.lock().unwrap());
    }

    #[test]
    fn the_same_sockets_reach_the_successor() {
        let (path, rec, addr) = setup("ok");
        let server = serve(&path, rec.clone()).unwrap();
        let (offer, taking) = request(&path).unwrap().expect("someone serves");
        let (admin_addr, admin) = offer.admin.expect("admin listener");
        assert_eq!(admin_addr, addr);
        // The very socket: a connection to it is accepted through our copy.
        let admin = std::net::TcpListener::from(admin);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        assert!(admin.accept().is_ok());
        assert_eq!(offer.pods.len(), 1);
        assert_eq!(offer.pods[0].pod.name, "web-0");
        assert_eq!(offer.pods[0].netns_cookie, 7);
        taking.confirm().unwrap();
        server.stop();
        assert_eq!(*rec.events.lock().unwrap(), ["paused", "taken"]);
    }

    #[test]
    fn a_stopped_server_lets_go_of_what_it_would_hand_over() {
        let (path, rec, _) = setup("stop");
        let server = serve(&path, rec.clone()).unwrap();
        assert_eq!(Arc::strong_count(&rec), 2, "the server holds the source");
        server.stop();
        assert_eq!(Arc::strong_count(&rec), 1, "the source (and the listeners it holds) released");
        assert!(request(&path).unwrap().is_none(), "nobody serves handoffs any more");
        assert!(rec.events.lock().unwrap().is_empty(), "no handoff started: {:?}", rec.events.lock().unwrap());
    }

    #[test]
    fn a_successor_that_goes_away_leaves_the_agent_serving() {
        let (path, rec, _) = setup("gone");
        let _server = serve(&path, rec.clone()).unwrap();
        let (offer, taking) = request(&path).unwrap().expect("someone serves");
        drop(offer);
        drop(taking);
        wait_for(&rec, "resumed");
        assert!(!rec.events.lock().unwrap().contains(&"taken"));
        // And it serves the next one.
        let (_, taking) = request(&path).unwrap().expect("still serving handoffs");
        taking.confirm().unwrap();
        wait_for(&rec, "taken");
    }

    #[test]
    fn nobody_there_is_no_offer() {
        let dir = std::env::temp_dir().join(format!("mesh-handoff-none-{}", std::process::id()));
        assert!(request(&dir.join("handoff.sock")).unwrap().is_none());
    }
}
