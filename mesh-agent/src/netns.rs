//! Entering a pod's network namespace to open sockets there.
//!
//! A socket belongs to the network namespace of the thread that created it,
//! for its whole life. Each pod gets one long-lived thread that has done
//! `setns` into the pod's namespace and creates sockets on request; the
//! sockets are then used from the async runtime like any other (a data-path
//! connect waits for its socket asynchronously, so the runtime thread serves
//! other connections meanwhile). Moving a
//! runtime thread between namespaces would be cheaper per call, but one
//! forgotten switch-back would put unrelated sockets in the wrong pod.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::mpsc,
};

use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("network namespace {path}: its thread has stopped")]
    Gone { path: PathBuf },
    #[error("network namespace {path}: cannot create a socket: {source}")]
    Socket { path: PathBuf, source: io::Error },
}

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a pod's network namespace. Dropping it stops the thread.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    /// The namespace itself, for attaching programs to it.
    file: File,
    /// The kernel's cookie for this namespace (what the eBPF programs key on).
    cookie: u64,
}

impl Netns {
    /// Opens `path` (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`) and starts
    /// the pod's socket thread in it.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        let keep = file.try_clone().map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let p = path.to_owned();
        std::thread::Builder::new()
            .name(format!("netns:{}", short_name(path)))
            .spawn(move || {
                let entered = nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from);
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|source| Error::Enter {
                path: p.clone(),
                source,
            })?;
        ready_rx
            .recv()
            .map_err(|_| Error::Gone { path: p.clone() })?
            .map_err(|source| Error::Enter {
                path: p.clone(),
                source,
            })?;
        let mut ns = Self {
            path: p,
            jobs,
            file: keep,
            cookie: 0,
        };
        let probe = ns.socket(Domain::IPV4)?;
        ns.cookie = netns_cookie(&probe).map_err(|source| Error::Socket {
            path: ns.path.clone(),
            source,
        })?;
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the namespace's thread and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| Error::Gone { path: self.path.clone() })?;
        rx.recv().map_err(|_| Error::Gone { path: self.path.clone() })
    }

    /// Runs `f` on the namespace's thread; the caller's task waits without
    /// holding its runtime thread (the data plane may have just one).
    pub async fn run_async<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| Error::Gone { path: self.path.clone() })?;
        rx.await.map_err(|_| Error::Gone { path: self.path.clone() })
    }

    /// A non-blocking TCP socket in this namespace, carrying the agent's mark
    /// so the connect hooks never redirect it.
    pub fn socket(&self, domain: Domain) -> Result<Socket, Error> {
        self.run(move || new_socket(domain))?.map_err(|source| Error::Socket {
            path: self.path.clone(),
            source,
        })
    }

    /// [`Netns::socket`] for async callers (the data path's connects).
    pub async fn socket_async(&self, domain: Domain) -> Result<Socket, Error> {
        self.run_async(move || new_socket(domain)).await?.map_err(|source| Error::Socket {
            path: self.path.clone(),
            source,
        })
    }
}

fn new_socket(domain: Domain) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    s.set_mark(mesh_common::AGENT_SOCKET_MARK)?;
    Ok(s)
}

fn short_name(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.chars().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect()
}

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie `bpf_get_netns_cookie` returns.
pub fn netns_cookie(s: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, output buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
