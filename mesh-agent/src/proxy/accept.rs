//! A failed accept on an in-pod listener: out of descriptors (EMFILE,
//! ENFILE) above all. Counted (`nodemesh_accept_errors_total{listener,
//! reason}`), logged at most once per [`LOG_EVERY`] for the whole agent
//! (with how many were suppressed), and backed off so the loop does not
//! spin while connections close.
//!
//! Out of descriptors, the connections already waiting in the listen
//! backlog would wait for a slot nobody frees soon (their clients see a
//! connection that never answers). So the data listeners share one spare
//! descriptor ([`SHED`]): a listener gives it up, accepts the oldest waiting
//! connection, resets it at once (counted as
//! `nodemesh_connection_overflows_total{limit="descriptors"}`) and takes the
//! spare back: clients are refused promptly instead of hanging.

use std::sync::{LazyLock, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::{PodHandle, Proxy};
use crate::fdlimit::{self, RateLimited, Reserve};

/// At most one accept-error line per this long, agent-wide.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

static LOG: RateLimited = RateLimited::new(LOG_EVERY);

/// How long an accept loop waits after an error it cannot name as
/// running out of resources.
const OTHER_BACKOFF: Duration = Duration::from_millis(50);

/// The data listeners' spare descriptor for refusing connections when the
/// agent has no descriptor left (the admin listener has its own).
static SHED: LazyLock<Mutex<Reserve>> = LazyLock::new(|| Mutex::new(Reserve::new()));

/// Takes the spare now, while descriptors are plentiful (an accept loop
/// starting): taken lazily, it would be taken when there are none.
pub(super) fn hold_spare() {
    LazyLock::force(&SHED);
}

/// Out of descriptors: resets the oldest connection waiting on `listener`
/// using the shared spare. True if one was refused (try the next at once).
pub(super) fn shed_one(listener: &TcpListener) -> bool {
    let mut spare = SHED.lock().unwrap_or_else(|e| e.into_inner());
    if !spare.release() {
        return false;
    }
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let shed = match listener.poll_accept(&mut cx) {
        Poll::Ready(Ok((stream, _))) => {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
            true
        }
        Poll::Ready(Err(_)) | Poll::Pending => false,
    };
    spare.refill();
    shed
}

impl Proxy {
    pub(super) async fn accept_failed(&self, pod: &PodHandle, listener: &'static str, e: &std::io::Error, on: &TcpListener) {
        let reason = fdlimit::accept_error_reason(e);
        self.inputs.telemetry.metrics.accept_error(listener, reason);
        if let Some(suppressed) = LOG.hit(Instant::now()) {
            tracing::warn!(pod = %pod.key, listener, reason, error = %e, suppressed, "accept failed; refusing waiting connections and backing off (similar errors suppressed for {}s)", LOG_EVERY.as_secs());
        }
        if fdlimit::is_exhaustion(e) && shed_one(on) {
            self.inputs.telemetry.metrics.connection_overflow("descriptors");
            return;
        }
        let pause = if reason == "other" { OTHER_BACKOFF } else { fdlimit::EXHAUSTED_BACKOFF };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::prune::tests::{pod_handle, proxy};

    #[tokio::test]
    async fn out_of_descriptors_is_counted_per_reason_and_backed_off() {
        let (p, _tx, _dir) = proxy(std::sync::Arc::new(crate::state::MeshState::default()));
        let pod = pod_handle();
        // Nobody waits on this listener: nothing to refuse, so it backs off.
        let idle = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        for _ in 0..3 {
            p.accept_failed(&pod, "outbound", &emfile, &idle).await;
        }
        p.accept_failed(&pod, "tunnel", &std::io::Error::from_raw_os_error(libc::ENFILE), &idle).await;
        let m = &p.inputs.telemetry.metrics;
        assert_eq!(m.accept_errors("process_fd_limit"), 3);
        assert_eq!(m.accept_errors("system_fd_limit"), 1);
        assert_eq!(m.connection_overflows("descriptors"), 0);
        let text = m.encode();
        assert!(text.contains(r#"nodemesh_accept_errors_total{listener="outbound",reason="process_fd_limit"} 3"#), "{text}");
    }

    /// Out of descriptors with a client waiting in the backlog: the client
    /// is reset at once (not left hanging) and the refusal counted.
    #[tokio::test]
    async fn out_of_descriptors_refuses_a_waiting_connection_with_a_reset() {
        use tokio::io::AsyncReadExt as _;
        let (p, _tx, _dir) = proxy(std::sync::Arc::new(crate::state::MeshState::default()));
        let pod = pod_handle();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        // The handshake completes in the kernel; wait until the listener
        // sees the connection, as an accept that failed with EMFILE would.
        backlog_not_empty(&listener).await;
        p.accept_failed(&pod, "outbound", &std::io::Error::from_raw_os_error(libc::EMFILE), &listener).await;
        assert_eq!(p.inputs.telemetry.metrics.connection_overflows("descriptors"), 1);
        let mut buf = [0u8; 1];
        let err = client.read(&mut buf).await.expect_err("reset, not data or EOF");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        // The spare is back: the next refusal works too.
        let _second = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        backlog_not_empty(&listener).await;
        assert!(super::shed_one(&listener));
    }

    /// Until a connection waits in `listener`'s backlog (without taking it).
    async fn backlog_not_empty(listener: &tokio::net::TcpListener) {
        use std::os::fd::AsRawFd as _;
        let fd = listener.as_raw_fd();
        tokio::task::spawn_blocking(move || {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: poll on a descriptor the listener keeps open.
            unsafe { libc::poll(&mut pfd, 1, 5_000) };
        })
        .await
        .unwrap();
    }

    /// Connections to one pod's applications are capped: over the cap a
    /// delivery is refused and counted; a closed one frees its slot.
    #[tokio::test]
    async fn connections_to_an_app_are_capped_and_counted() {
        let (p, _tx, _dir) = proxy(std::sync::Arc::new(crate::state::MeshState::default()));
        let pod = pod_handle();
        p.set_limits(10, 2);
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = app.local_addr().unwrap();
        let first = p.inbound.connect_app(&pod, target).await.expect("first");
        let _second = p.inbound.connect_app(&pod, target).await.expect("second");
        let err = p.inbound.connect_app(&pod, target).await.err().expect("over the cap");
        assert!(err.to_string().contains("--max-app-connections"), "{err}");
        assert_eq!(p.inputs.telemetry.metrics.connection_overflows("app"), 1);
        assert_eq!(pod.stats.app_connections.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop(first);
        let _third = p.inbound.connect_app(&pod, target).await.expect("a slot freed by the closed connection");
        assert!(p.inputs.telemetry.metrics.encode().contains(r#"nodemesh_connection_overflows_total{limit="app"} 1"#));
    }
}
