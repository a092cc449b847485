//! A failed accept on an in-pod listener: out of descriptors (EMFILE,
//! ENFILE) above all. Counted (`nodemesh_accept_errors_total{listener,
//! reason}`), logged at most once per [`LOG_EVERY`] for the whole agent
//! (with how many were suppressed), and backed off so the loop does not
//! spin while connections close.

use std::time::{Duration, Instant};

use super::{PodHandle, Proxy};
use crate::fdlimit::{self, RateLimited};

/// At most one accept-error line per this long, agent-wide.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

static LOG: RateLimited = RateLimited::new(LOG_EVERY);

/// How long an accept loop waits after an error it cannot name as
/// running out of resources.
const OTHER_BACKOFF: Duration = Duration::from_millis(50);

impl Proxy {
    pub(super) async fn accept_failed(&self, pod: &PodHandle, listener: &'static str, e: &std::io::Error) {
        let reason = fdlimit::accept_error_reason(e);
        self.telemetry.metrics.accept_error(listener, reason);
        if let Some(suppressed) = LOG.hit(Instant::now()) {
            tracing::warn!(pod = %pod.key, listener, reason, error = %e, suppressed, "accept failed; backing off (similar errors suppressed for {}s)", LOG_EVERY.as_secs());
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
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        for _ in 0..3 {
            p.accept_failed(&pod, "outbound", &emfile).await;
        }
        p.accept_failed(&pod, "tunnel", &std::io::Error::from_raw_os_error(libc::ENFILE)).await;
        let m = &p.telemetry.metrics;
        assert_eq!(m.accept_errors("process_fd_limit"), 3);
        assert_eq!(m.accept_errors("system_fd_limit"), 1);
        let text = m.encode();
        assert!(text.contains(r#"nodemesh_accept_errors_total{listener="outbound",reason="process_fd_limit"} 3"#), "{text}");
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
        let first = p.connect_app(&pod, target).await.expect("first");
        let _second = p.connect_app(&pod, target).await.expect("second");
        let err = p.connect_app(&pod, target).await.err().expect("over the cap");
        assert!(err.to_string().contains("--max-app-connections"), "{err}");
        assert_eq!(p.telemetry.metrics.connection_overflows("app"), 1);
        assert_eq!(pod.stats.app_connections.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop(first);
        let _third = p.connect_app(&pod, target).await.expect("a slot freed by the closed connection");
        assert!(p.telemetry.metrics.encode().contains(r#"nodemesh_connection_overflows_total{limit="app"} 1"#));
    }
}
