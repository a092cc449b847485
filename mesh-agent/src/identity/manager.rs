//! One certificate per local workload, kept fresh.
//!
//! Each workload gets a task that fetches its certificate, publishes it in a
//! `watch` channel (TLS configs read the latest value, so a rotation never
//! drops a connection), and fetches the next one at half of the remaining
//! lifetime. While the CA is down it retries with exponential backoff and
//! jitter and the cached certificate keeps serving; only when that one has
//! expired does the channel go back to `None`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};

use super::{SpiffeId, WorkloadCert, client::CaClient, humantime};
use crate::state::PodKey;

/// The latest certificate of one workload; `None` before the first one
/// arrives and after the last one expired.
pub type CertWatch = watch::Receiver<Option<Arc<WorkloadCert>>>;

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Lifetime to ask for; `None`: the CA's default.
    pub ttl: Option<Duration>,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            ttl: None,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Counters of one workload's certificate, for metrics and status.
#[derive(Debug, Default)]
pub struct WorkloadCertStats {
    /// Certificates obtained (the first one and every rotation).
    pub fetched: AtomicU64,
    /// Failed attempts.
    pub errors: AtomicU64,
    /// Unix seconds; 0 when there is no certificate.
    pub not_after: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadCertStatus {
    pub pod: PodKey,
    pub id: SpiffeId,
    /// RFC 3339; absent when there is no usable certificate.
    pub not_after: Option<String>,
    /// The same, in seconds since the epoch (for metrics).
    pub not_after_unix: Option<u64>,
    pub serial: Option<String>,
    pub fetched: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

struct Workload {
    id: SpiffeId,
    tx: Arc<watch::Sender<Option<Arc<WorkloadCert>>>>,
    stats: Arc<WorkloadCertStats>,
    task: JoinHandle<()>,
}

/// Certificates of the workloads on this node. Cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<dyn CaClient>,
    config: ManagerConfig,
    runtime: tokio::runtime::Handle,
    workloads: Mutex<HashMap<PodKey, Workload>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (_, w) in self.workloads.get_mut().expect("poisoned").drain() {
            w.task.abort();
        }
    }
}

impl CertManager {
    /// Rotation tasks run on the runtime this is called in.
    pub fn new(ca: Arc<dyn CaClient>, config: ManagerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                config,
                runtime: tokio::runtime::Handle::current(),
                workloads: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Starts keeping a certificate for `pod` as `id` (idempotent) and
    /// returns its channel. If the pod's identity changed, its certificate is
    /// withdrawn at once and a new one fetched.
    pub fn ensure(&self, pod: &PodKey, id: &SpiffeId) -> CertWatch {
        let mut workloads = self.inner.workloads.lock().expect("poisoned");
        if let Some(w) = workloads.get_mut(pod) {
            if w.id == *id && !w.task.is_finished() {
                return w.tx.subscribe();
            }
            tracing::info!(%pod, old = %w.id, new = %id, "workload identity changed; replacing its certificate");
            w.task.abort();
            w.tx.send_replace(None);
            w.stats.not_after.store(0, Ordering::Relaxed);
            w.id = id.clone();
            w.task = self.spawn(pod.clone(), id.clone(), w.tx.clone(), w.stats.clone());
            return w.tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        let stats = Arc::new(WorkloadCertStats::default());
        let task = self.spawn(pod.clone(), id.clone(), tx.clone(), stats.clone());
        workloads.insert(
            pod.clone(),
            Workload {
                id: id.clone(),
                tx,
                stats,
                task,
            },
        );
        rx
    }

    /// Starts managing `pod` with a certificate handed over by the agent
    /// this one replaces: served at once, renewed at half its remaining
    /// life as usual.
    pub fn adopt(&self, pod: &PodKey, cert: WorkloadCert) {
        let mut workloads = self.inner.workloads.lock().expect("poisoned");
        if workloads.contains_key(pod) {
            return;
        }
        let id = cert.id.clone();
        let stats = Arc::new(WorkloadCertStats::default());
        stats.not_after.store(unix(cert.not_after), Ordering::Relaxed);
        let (tx, _) = watch::channel(Some(Arc::new(cert)));
        let tx = Arc::new(tx);
        let task = self.spawn(pod.clone(), id.clone(), tx.clone(), stats.clone());
        workloads.insert(pod.clone(), Workload { id, tx, stats, task });
    }

    /// The channel of a workload already being managed.
    pub fn watch(&self, pod: &PodKey) -> Option<CertWatch> {
        self.inner.workloads.lock().expect("poisoned").get(pod).map(|w| w.tx.subscribe())
    }

    /// The pod left: stop rotating. Receivers see `None`.
    pub fn forget(&self, pod: &PodKey) -> bool {
        let Some(w) = self.inner.workloads.lock().expect("poisoned").remove(pod) else {
            return false;
        };
        w.task.abort();
        w.tx.send_replace(None);
        tracing::debug!(%pod, id = %w.id, "stopped managing the workload's certificate");
        true
    }

    pub fn stats(&self, pod: &PodKey) -> Option<Arc<WorkloadCertStats>> {
        self.inner.workloads.lock().expect("poisoned").get(pod).map(|w| w.stats.clone())
    }

    /// Every managed workload, sorted by pod.
    pub fn status(&self) -> Vec<WorkloadCertStatus> {
        let workloads = self.inner.workloads.lock().expect("poisoned");
        let mut out: Vec<_> = workloads
            .iter()
            .map(|(pod, w)| {
                let cert = w.tx.borrow().clone();
                WorkloadCertStatus {
                    pod: pod.clone(),
                    id: w.id.clone(),
                    not_after: cert.as_ref().map(|c| humantime(c.not_after)),
                    not_after_unix: cert.as_ref().map(|c| unix(c.not_after)),
                    serial: cert.as_ref().map(|c| c.serial.clone()),
                    fetched: w.stats.fetched.load(Ordering::Relaxed),
                    errors: w.stats.errors.load(Ordering::Relaxed),
                    last_error: w.stats.last_error.lock().expect("poisoned").clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        out
    }

    fn spawn(
        &self,
        pod: PodKey,
        id: SpiffeId,
        tx: Arc<watch::Sender<Option<Arc<WorkloadCert>>>>,
        stats: Arc<WorkloadCertStats>,
    ) -> JoinHandle<()> {
        let ca = self.inner.ca.clone();
        let config = self.inner.config.clone();
        let span = tracing::info_span!("workload_cert", %pod, %id);
        self.inner.runtime.spawn(tracing::Instrument::instrument(
            keep_fresh(ca, config, pod, id, tx, stats),
            span,
        ))
    }
}

async fn keep_fresh(
    ca: Arc<dyn CaClient>,
    config: ManagerConfig,
    pod: PodKey,
    id: SpiffeId,
    tx: Arc<watch::Sender<Option<Arc<WorkloadCert>>>>,
    stats: Arc<WorkloadCertStats>,
) {
    let mut backoff = config.initial_backoff;
    // An adopted certificate: renew at half of what is left.
    let adopted = tx.borrow().as_ref().map(|c| c.not_after);
    if let Some(not_after) = adopted {
        let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        tracing::info!(not_after = %humantime(not_after), "workload certificate adopted from the previous agent");
        tokio::time::sleep(left / 2).await;
    }
    loop {
        match super::client::fetch(ca.as_ref(), &pod, &id, config.ttl).await {
            Ok(cert) => {
                backoff = config.initial_backoff;
                let now = SystemTime::now();
                // Half of what is left from now, not from notBefore: the CA
                // backdates certificates, which would otherwise make short
                // lifetimes rotate immediately.
                let refresh_in = cert.not_after.duration_since(now).unwrap_or_default() / 2;
                let first = stats.fetched.fetch_add(1, Ordering::Relaxed) == 0;
                stats.not_after.store(unix(cert.not_after), Ordering::Relaxed);
                *stats.last_error.lock().expect("poisoned") = None;
                tracing::info!(
                    serial = %cert.serial,
                    not_after = %humantime(cert.not_after),
                    refresh_in = ?refresh_in,
                    "{}",
                    if first { "workload certificate obtained" } else { "workload certificate rotated" }
                );
                tx.send_replace(Some(Arc::new(cert)));
                tokio::time::sleep(refresh_in.max(Duration::from_millis(100))).await;
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().expect("poisoned") = Some(e.to_string());
                let now = SystemTime::now();
                let cached_until = tx.borrow().as_ref().map(|c| c.not_after);
                let mut sleep = jitter(backoff);
                match cached_until {
                    Some(until) if until > now => {
                        tracing::warn!(error = %e, retry_in = ?sleep, cached_until = %humantime(until), "cannot renew the workload certificate; the cached one keeps serving");
                        // Wake up at expiry at the latest, to withdraw it on time.
                        sleep = sleep.min(until.duration_since(now).unwrap_or_default());
                    }
                    Some(until) => {
                        tracing::error!(error = %e, expired = %humantime(until), "the workload certificate expired and cannot be renewed: mTLS for this workload fails until the CA answers");
                        tx.send_replace(None);
                        stats.not_after.store(0, Ordering::Relaxed);
                    }
                    None => tracing::warn!(error = %e, retry_in = ?sleep, "cannot obtain the workload certificate"),
                }
                tokio::time::sleep(sleep.max(Duration::from_millis(10))).await;
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
}

/// Between half and all of `d`, so that agents that lost the CA together do
/// not all come back at the same instant.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random::<f64>().mul_add(0.5, 0.5))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
