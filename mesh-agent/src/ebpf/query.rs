//! Which programs the kernel really has attached to a cgroup or netns
//! (`BPF_PROG_QUERY`), so reconcile can see drift that aya's own bookkeeping
//! cannot: a link detached behind the agent's back still looks attached to us.

use std::{io, os::fd::AsRawFd};

pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_SK_LOOKUP: u32 = 36;
const BPF_PROG_QUERY: libc::c_long = 16;

/// IDs of the programs attached directly (not inherited) to `target` for
/// `attach_type`.
pub fn attached_program_ids(target: &impl AsRawFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    // union bpf_attr, the BPF_PROG_QUERY member: target_fd, attach_type,
    // query_flags, attach_flags, prog_ids (u64 pointer), prog_cnt; zeroed past
    // that so newer kernels see their extra fields unset.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr of the size we pass; prog_ids points to
    // `ids`, with its length in prog_cnt.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let count = u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes")) as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}
