//! A built agent: what [`super::build`] returns, and the shutdown
//! sequence ([`Bound::wait`]).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{Error, view::Admin};
use crate::{
    admin::AdminSource,
    enroll::{Enrollment, Kernel},
    lifecycle::handoff,
    proxy::Proxy,
    state::PodKey,
    telemetry::trace::Tracer,
};

/// What SIGTERM does to a [`Bound`] agent: stop accepting, drain, stop.
/// Cloned freely; triggering twice is triggering once.
#[derive(Clone, Debug)]
pub struct Shutdown(pub(super) CancellationToken);

impl Shutdown {
    pub fn trigger(&self) {
        self.0.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// Whether the agent is ready (what `/ready` answers), to wait on.
#[derive(Clone)]
pub struct Readiness(Arc<dyn AdminSource>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.ready()
    }

    /// Returns once the agent is ready.
    pub async fn wait(&self) {
        // Readiness is a property of several parts (certificates,
        // enrollment, the Kubernetes sync), not an event: looked at often.
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            check.tick().await;
            if self.0.ready() {
                return;
            }
        }
    }
}

pub(super) struct Tasks {
    pub(super) admin: tokio::task::JoinHandle<()>,
    pub(super) metrics: Option<tokio::task::JoinHandle<()>>,
    pub(super) watch: tokio::task::JoinHandle<()>,
    pub(super) reconcile: tokio::task::JoinHandle<()>,
    pub(super) trim: tokio::task::JoinHandle<()>,
}

/// A built agent, serving: its bound addresses, its readiness, its
/// shutdown trigger, and [`Bound::wait`] for the shutdown sequence.
pub struct Bound<K: Kernel> {
    pub(super) node: String,
    pub(super) admin_addr: SocketAddr,
    pub(super) metrics_addr: Option<SocketAddr>,
    pub(super) admin: Arc<Admin<K>>,
    pub(super) enrollment: Arc<Mutex<Enrollment<K>>>,
    pub(super) proxy: Arc<Proxy>,
    pub(super) tracer: Tracer,
    pub(super) data: tokio::runtime::Handle,
    pub(super) drain_timeout: Duration,
    pub(super) node_lock: Option<crate::lifecycle::NodeLock>,
    pub(super) handoff: Option<handoff::Server>,
    /// A successor took over (the handoff server says so).
    pub(super) taken: tokio::sync::mpsc::UnboundedReceiver<()>,
    pub(super) shutdown: Shutdown,
    pub(super) tasks: Tasks,
}

impl<K: Kernel> Bound<K> {
    /// The admin listener's address (the one bound: `--admin` may name port 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics listener's address, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn readiness(&self) -> Readiness {
        Readiness(self.admin.clone())
    }

    pub fn shutdown_trigger(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// The addresses a local pod's listeners are bound to; none while it
    /// is not served.
    pub fn pod_listeners(&self, pod: &PodKey) -> Vec<SocketAddr> {
        self.enrollment.lock().expect("poisoned").listener_addrs(pod)
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Serves until the shutdown is triggered or a successor took over,
    /// then shuts down in order: the pods' listeners close (the kernel
    /// state stays), the open connections drain until the deadline, the
    /// telemetry is flushed, the admin listeners close and the node is
    /// released.
    pub async fn wait(mut self) -> Result<(), Error> {
        let handed_over = tokio::select! {
            _ = self.shutdown.0.cancelled() => false,
            Some(()) = self.taken.recv() => true,
        };
        // The listeners close; the pinned kernel state stays, so the pods fail
        // closed (or, with failure policy open, go direct) until the next agent
        // serves them. The connections in flight finish until the deadline.
        let tasks = self.tasks;
        tasks.reconcile.abort();
        tasks.trim.abort();
        tasks.watch.abort();
        self.enrollment.lock().expect("poisoned").stop_listeners();
        if handed_over {
            // The successor serves the admin and metrics listeners and owns
            // the node from here on; this agent only finishes its connections.
            tasks.admin.abort();
            if let Some(t) = &tasks.metrics {
                t.abort();
            }
            drop(self.node_lock.take());
        }
        let deadline = self.drain_timeout;
        let p = self.proxy.clone();
        let left = self
            .data
            .spawn(async move { p.drain(deadline).await })
            .await
            .unwrap_or_default();
        if left > 0 {
            tracing::warn!(open = left, ?deadline, "drain deadline passed; closing the remaining connections");
        } else {
            tracing::info!("drained");
        }
        // Spans of the last requests, if the collector takes them in time, and
        // the access log lines still buffered.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracer.flush()).await;
        self.proxy.telemetry().access_log.flush_and_stop(Duration::from_secs(2));
        // Awaited: the listeners are closed once the tasks are gone.
        tasks.admin.abort();
        let _ = tasks.admin.await;
        if let Some(t) = tasks.metrics {
            t.abort();
            let _ = t.await;
        }
        // Its duplicates of the admin listeners close with it.
        if let Some(h) = self.handoff.take() {
            let _ = tokio::task::spawn_blocking(move || h.stop()).await;
        }
        drop(self.node_lock);
        Ok(())
    }
}
