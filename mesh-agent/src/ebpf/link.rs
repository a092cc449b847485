//! BPF links the agent owns through their file descriptors, and the bpffs
//! directory they are pinned in, with the raw `bpf(2)` commands aya does not
//! expose for them (`BPF_LINK_UPDATE` to swap a program in place,
//! `BPF_LINK_DETACH` to detach whatever else holds the link).
//!
//! A pinned link keeps its program attached with no process holding it: that
//! is what makes redirection and capture outlive the agent.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `statfs.f_type` of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; 64]) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the length
    // passed; each caller fills the member its command reads.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn put_u32(attr: &mut [u8; 64], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a cgroup or netns fd) for
/// `attach_type`; the link lives as long as its fd or a pin.
pub fn create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 64];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, target.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach_type);
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: the link runs `prog` from now on, atomically (no
/// moment without a program).
pub fn update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u8; 64];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `BPF_LINK_DETACH`: detaches the link's program now, whoever else still
/// holds the link (a pin, an agent handing over).
pub fn detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u8; 64];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// `BPF_OBJ_PIN`.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let mut attr = [0u8; 64];
    attr[0..8].copy_from_slice(&(p.as_ptr() as u64).to_ne_bytes());
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut attr = [0u8; 64];
    attr[0..8].copy_from_slice(&(p.as_ptr() as u64).to_ne_bytes());
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{path} is not a bpf filesystem: the agent pins its programs and maps there so that they outlive it; \
         mount one (`mount -t bpf bpf {path}`; the DaemonSet mounts the host's /sys/fs/bpf) or choose another with --bpffs"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot use the bpf filesystem at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("node name {0:?} cannot name a directory (it must be a DNS subdomain)")]
    NodeName(String),
}

/// `<bpffs>/nodemesh/<node>/`: everything this node's agent pins. `maps/`
/// holds [`mesh_common::PINNED_MAPS`]; `links/cgroup-<inode>/` a pod
/// cgroup's `connect4`, `connect6` and `sock_ops` links; `links/netns-<cookie>/`
/// a pod network namespace's `inbound_capture` (sk_lookup) link.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// The node's directory under `bpffs`, which must be a bpf filesystem.
    /// Created unless `create` is false (uninstall: nothing to create).
    pub fn new(bpffs: &Path, node: &str, create: bool) -> Result<Self, PinError> {
        let valid = !node.is_empty()
            && node.len() <= 253
            && node.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !node.starts_with('.');
        if !valid {
            return Err(PinError::NodeName(node.to_owned()));
        }
        if !is_bpffs(bpffs).map_err(|source| PinError::Io { path: bpffs.to_owned(), source })? {
            return Err(PinError::NotBpffs { path: bpffs.to_owned() });
        }
        let pins = PinDir { root: bpffs.join("nodemesh").join(node) };
        if create {
            for d in [pins.maps(), pins.links()] {
                std::fs::create_dir_all(&d).map_err(|source| PinError::Io { path: d.clone(), source })?;
            }
        }
        Ok(pins)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn exists(&self) -> bool {
        self.root.exists()
    }

    /// The link directories present (`cgroup-N`, `netns-N`).
    pub fn link_dirs(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.links()) else { return Vec::new() };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    }

    /// Detaches every pinned link of `dir` and removes the directory.
    pub fn remove_links(&self, dir: &str) -> io::Result<()> {
        let path = self.links().join(dir);
        if let Ok(rd) = std::fs::read_dir(&path) {
            for e in rd.flatten() {
                if let Ok(fd) = open_pinned(&e.path()) {
                    let _ = detach(std::os::fd::AsFd::as_fd(&fd));
                }
                std::fs::remove_file(e.path())?;
            }
        }
        match std::fs::remove_dir(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Uninstall: every link detached, every map unpinned, the node's
    /// directory gone. Returns how many links were detached.
    pub fn remove_all(&self) -> io::Result<usize> {
        let dirs = self.link_dirs();
        for d in &dirs {
            self.remove_links(d)?;
        }
        if let Ok(rd) = std::fs::read_dir(self.maps()) {
            for e in rd.flatten() {
                std::fs::remove_file(e.path())?;
            }
        }
        for d in [self.links(), self.maps(), self.root.clone()] {
            match std::fs::remove_dir(&d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(dirs.len())
    }
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let p = c_path(path)?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(p.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}
