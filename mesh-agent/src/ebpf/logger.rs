//! Forwards the programs' aya-log records into the agent's log.

use tokio::io::unix::AsyncFd;

/// Starts draining the programs' log ring buffer on the current runtime.
/// Without a logger map (programs built without logging) this does nothing.
pub fn spawn_logger(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "eBPF programs' logs are not available");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd for its whole life and
    // moves into the AsyncFd with it.
    let registered = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "eBPF programs' logs are not available");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
