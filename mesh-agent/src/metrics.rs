//! Prometheus metrics (`prometheus-client`), served on the admin port's
//! `/metrics`.
//!
//! Traffic metrics use **Istio's standard names and labels**, so existing
//! Grafana and Kiali dashboards work unchanged:
//!
//! | metric | type | recorded |
//! |---|---|---|
//! | `istio_requests_total` | counter | per HTTP request, when the response ends |
//! | `istio_request_duration_milliseconds` | histogram | request start to response end |
//! | `istio_request_bytes` / `istio_response_bytes` | histogram | body bytes |
//! | `istio_tcp_connections_opened_total` / `_closed_total` | counter | per L4 connection |
//! | `istio_tcp_sent_bytes_total` / `istio_tcp_received_bytes_total` | counter | bytes of the response (server to client) / of the request (client to server), as Istio counts them |
//!
//! Labels ([`Labels`]): `reporter` (`source`: the client's node agent,
//! `destination`: the server's), `source_workload`,
//! `source_canonical_service`, `source_canonical_revision`,
//! `source_workload_namespace`, `source_principal`, `source_app`,
//! `source_version`, `source_cluster`, `destination_workload`,
//! `destination_workload_namespace`, `destination_principal`,
//! `destination_app`, `destination_version`, `destination_service`
//! (`name.namespace.svc.cluster.local`), `destination_canonical_service`,
//! `destination_canonical_revision`, `destination_service_name`,
//! `destination_service_namespace`, `destination_cluster`,
//! `request_protocol` (`http`, `grpc`,
//! `tcp`), `response_code` (`0` for TCP), `response_flags` (`-`, or the
//! agent's own reply: `UO` overflow, `UT` timeout, `UF` connect failure,
//! `UR` reset, `NR` no endpoint, `RBAC` denied), `connection_security_policy`
//! (`mutual_tls` or `none`). A workload is its pod's `app` label (Istio uses
//! the owning Deployment; pods without `app` use their name), `unknown` when
//! the agent cannot tell. As Istio derives them from the pod's labels: the
//! canonical service is `service.istio.io/canonical-name`, else
//! `app.kubernetes.io/name`, else `app`, else the workload; the canonical
//! revision `service.istio.io/canonical-revision`, else
//! `app.kubernetes.io/version`, else `version`, else `latest`; the version
//! the `version` label, else `unknown`; the cluster the agent's
//! `--cluster-id` (default `Kubernetes`, Istio's). A party the agent does
//! not know is `unknown` in all of them but the revision (`latest`).
//! `grpc_response_status` is not reported (README: Observability).
//!
//! The agent's own health (`nodemesh_*`, and `process_*`) is read at scrape
//! time from the same data as `/status`: see [`HealthCollector`].

use std::{borrow::Cow, sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};
use serde_json::Value;

/// Istio's labels for request and TCP metrics.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Labels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

type Hist = Family<Labels, Histogram, fn() -> Histogram>;

/// Labels of `nodemesh_accept_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptLabels {
    /// `outbound`, `tunnel`, `plaintext`.
    pub listener: &'static str,
    /// [`crate::fdlimit::accept_error_reason`].
    pub reason: &'static str,
}

/// Labels of `nodemesh_connection_overflows_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    /// `agent` or `app`.
    pub limit: &'static str,
}

/// Istio's duration buckets (milliseconds).
fn duration_histogram() -> Histogram {
    Histogram::new([0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0])
}

/// Istio's size buckets (bytes): 1 to 10^8 in powers of ten.
fn size_histogram() -> Histogram {
    Histogram::new((0..9).map(|e| 10f64.powi(e)))
}

pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    requests: Family<Labels, Counter>,
    duration: Hist,
    request_bytes: Hist,
    response_bytes: Hist,
    tcp_opened: Family<Labels, Counter>,
    tcp_closed: Family<Labels, Counter>,
    tcp_sent: Family<Labels, Counter>,
    tcp_received: Family<Labels, Counter>,
    accept_errors: Family<AcceptLabels, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    /// Every label set with a series, and when its count last moved: what
    /// [`Metrics::prune`] walks (the families cannot be iterated). The key
    /// is also the one copy of the label set that connections hold (an
    /// idle connection keeps a pointer, not two dozen strings).
    series: std::sync::Mutex<std::collections::HashMap<Arc<Labels>, Moved>>,
    /// Bumped whenever series are dropped, so handles cached elsewhere
    /// ([`RequestSeries`]) are looked up again.
    generation: std::sync::atomic::AtomicU64,
}

/// A series' count at the last prune pass, and since when it is that.
struct Moved {
    count: u64,
    since: std::time::Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let duration: Hist = Family::new_with_constructor(duration_histogram);
        let request_bytes: Hist = Family::new_with_constructor(size_histogram);
        let response_bytes: Hist = Family::new_with_constructor(size_histogram);
        let tcp_opened = Family::<Labels, Counter>::default();
        let tcp_closed = Family::<Labels, Counter>::default();
        let tcp_sent = Family::<Labels, Counter>::default();
        let tcp_received = Family::<Labels, Counter>::default();
        let accept_errors = Family::<AcceptLabels, Counter>::default();
        let overflows = Family::<OverflowLabels, Counter>::default();
        // prometheus-client appends `_total` to counters.
        registry.register("istio_requests", "Requests, by response code", requests.clone());
        registry.register("istio_request_duration_milliseconds", "Request duration", duration.clone());
        registry.register("istio_request_bytes", "Request body size", request_bytes.clone());
        registry.register("istio_response_bytes", "Response body size", response_bytes.clone());
        registry.register("istio_tcp_connections_opened", "TCP connections opened", tcp_opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", tcp_closed.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the client (response direction)", tcp_sent.clone());
        registry.register("istio_tcp_received_bytes", "Bytes received from the client (request direction)", tcp_received.clone());
        registry.register("nodemesh_accept_errors", "Failed accepts on the in-pod listeners, by listener and reason", accept_errors.clone());
        registry.register(
            "nodemesh_connection_overflows",
            "Connections refused over a cap: agent (--max-connections) or app (--max-app-connections)",
            overflows.clone(),
        );
        Self {
            registry: std::sync::Mutex::new(registry),
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            accept_errors,
            overflows,
            series: Default::default(),
            generation: Default::default(),
        }
    }
}

/// The request metrics of one label set, looked up once: recording through
/// it costs no hashing of the labels (a connection keeps its series for the
/// requests it carries).
pub struct RequestSeries {
    pub labels: Arc<Labels>,
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestSeries {
    /// One finished HTTP request.
    pub fn record(&self, elapsed: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(elapsed.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

impl Metrics {
    /// The series of `labels`, created on first use. The handles stay the
    /// exported ones until [`Metrics::prune`] drops the series (which bumps
    /// [`Metrics::generation`] so cached handles are looked up again).
    pub fn request_series(&self, labels: Labels) -> RequestSeries {
        let labels = self.track(labels);
        RequestSeries {
            requests: self.requests.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            request_bytes: self.request_bytes.get_or_create(&labels).clone(),
            response_bytes: self.response_bytes.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// A TCP connection opened; returns the labels to close it with.
    pub fn tcp_opened(&self, labels: Labels) -> Arc<Labels> {
        let labels = self.track(labels);
        self.tcp_opened.get_or_create(&labels).inc();
        labels
    }

    /// A TCP connection closed after `received` bytes from the client (the
    /// request direction) and `sent` bytes back to it (the response
    /// direction).
    pub fn tcp_closed(&self, labels: &Labels, sent: u64, received: u64) {
        self.track_ref(labels);
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_sent.get_or_create(labels).inc_by(sent);
        self.tcp_received.get_or_create(labels).inc_by(received);
    }

    /// A failed accept on an in-pod listener.
    pub fn accept_error(&self, listener: &'static str, reason: &'static str) {
        self.accept_errors.get_or_create(&AcceptLabels { listener, reason }).inc();
    }

    /// A connection refused over a cap (`agent` or `app`).
    pub fn connection_overflow(&self, limit: &'static str) {
        self.overflows.get_or_create(&OverflowLabels { limit }).inc();
    }

    /// Connections refused over the `limit` cap so far.
    pub fn connection_overflows(&self, limit: &'static str) -> u64 {
        self.overflows.get(&OverflowLabels { limit }).map_or(0, |c| c.get())
    }

    /// Failed accepts so far, of every listener and reason.
    pub fn accept_errors(&self, reason: &'static str) -> u64 {
        ["outbound", "tunnel", "plaintext"]
            .into_iter()
            .map(|listener| self.accept_errors.get(&AcceptLabels { listener, reason }).map_or(0, |c| c.get()))
            .sum()
    }

    /// Records that `labels` has a series; returns the shared copy.
    fn track(&self, labels: Labels) -> Arc<Labels> {
        let mut series = self.series.lock().expect("poisoned");
        if let Some((shared, _)) = series.get_key_value(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        series.insert(shared.clone(), Moved { count: u64::MAX, since: std::time::Instant::now() });
        shared
    }

    /// [`Metrics::track`] for labels held elsewhere (a series pruned while
    /// its connection was open comes back when the connection closes).
    fn track_ref(&self, labels: &Labels) {
        let mut series = self.series.lock().expect("poisoned");
        if !series.contains_key(labels) {
            series.insert(Arc::new(labels.clone()), Moved { count: u64::MAX, since: std::time::Instant::now() });
        }
    }

    /// Label sets with a series.
    pub fn series_count(&self) -> usize {
        self.series.lock().expect("poisoned").len()
    }

    /// Changes whenever [`Metrics::prune`] drops series.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Drops the series `keep` refuses (their workload or service has left
    /// the mesh state, or they name a bare address) once their count has
    /// not moved for `idle` (so a scrape has seen the last value). Returns
    /// how many label sets were dropped.
    pub fn prune(&self, keep: impl Fn(&Labels) -> bool, idle: Duration, now: std::time::Instant) -> usize {
        let count = |l: &Labels| -> u64 {
            let c = |f: &Family<Labels, Counter>| f.get(l).map_or(0, |c| c.get());
            c(&self.requests) + c(&self.tcp_opened) + c(&self.tcp_closed)
        };
        let mut series = self.series.lock().expect("poisoned");
        let before = series.len();
        series.retain(|l, moved| {
            let n = count(l);
            if n != moved.count {
                *moved = Moved { count: n, since: now };
                return true;
            }
            if keep(l) || now.saturating_duration_since(moved.since) < idle {
                return true;
            }
            self.requests.remove(l);
            self.duration.remove(l);
            self.request_bytes.remove(l);
            self.response_bytes.remove(l);
            self.tcp_opened.remove(l);
            self.tcp_closed.remove(l);
            self.tcp_sent.remove(l);
            self.tcp_received.remove(l);
            false
        });
        let dropped = before - series.len();
        if dropped > 0 {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        dropped
    }

    /// Adds the agent's health collector (called once, at start).
    pub fn register_health(&self, c: HealthCollector) {
        self.registry.lock().expect("poisoned").register_collector(Box::new(c));
    }

    /// The OpenMetrics text of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().expect("poisoned")) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Reads the agent's health at scrape time from the `/status` document.
pub struct HealthCollector {
    pub status: Arc<dyn Fn() -> Value + Send + Sync>,
}

impl std::fmt::Debug for HealthCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HealthCollector")
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

type Pairs = Vec<(Cow<'static, str>, Cow<'static, str>)>;

fn pairs<const N: usize>(kv: [(&'static str, &str); N]) -> Pairs {
    kv.into_iter().map(|(k, v)| (Cow::Borrowed(k), Cow::Owned(v.to_owned()))).collect()
}

struct Out<'a, 'b>(&'a mut DescriptorEncoder<'b>);

impl Out<'_, '_> {
    fn counter(&mut self, name: &str, help: &str, rows: &[(Pairs, u64)]) -> Result<(), std::fmt::Error> {
        let mut m = self.0.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in rows {
            if labels.is_empty() {
                ConstCounter::new(*v).encode(m)?;
                return Ok(());
            }
            ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, rows: &[(Pairs, f64)]) -> Result<(), std::fmt::Error> {
        let mut m = self.0.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in rows {
            if labels.is_empty() {
                ConstGauge::new(*v).encode(m)?;
                return Ok(());
            }
            ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
        }
        Ok(())
    }
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = (self.status)();
        let pods = s["pods"].as_array().cloned().unwrap_or_default();
        let pod_labels = |p: &Value| pairs([("namespace", p["namespace"].as_str().unwrap_or("")), ("pod", p["name"].as_str().unwrap_or(""))]);
        let mut out = Out(&mut encoder);
        let enrolled = pods.iter().filter(|p| p["enrolled"] == true).count();
        out.gauge("nodemesh_enrolled_pods", "Pods of this node in the mesh", &[(Vec::new(), enrolled as f64)])?;
        let ready = if s["ready"] == true { 1.0 } else { 0.0 };
        out.gauge("nodemesh_ready", "1 when every local pod is enrolled, attached and certified", &[(Vec::new(), ready)])?;
        // Pods keeping the agent from being ready, by why (never silently
        // direct: a pod waiting for its certificate is counted here).
        let not_ready = |reason: &str| s["notReady"].as_array().map_or(0, |v| v.iter().filter(|p| p["reason"] == reason).count());
        let rows: Vec<_> = ["error", "not enrolled", "certificate pending"]
            .into_iter()
            .map(|r| (pairs([("reason", r)]), not_ready(r) as f64))
            .collect();
        out.gauge("nodemesh_pods_not_ready", "Local pods not (yet) served as the state wants, by reason", &rows)?;
        let rows: Vec<_> = pods.iter().map(|p| (pod_labels(p), u(&p["ebpf"]["redirected"]))).collect();
        out.counter("nodemesh_ebpf_redirected_connections", "Connections the connect hooks redirected to the agent", &rows)?;
        let rows: Vec<_> = pods.iter().map(|p| (pod_labels(p), u(&p["ebpf"]["passedThrough"]))).collect();
        out.counter("nodemesh_ebpf_passed_connections", "Connections the connect hooks let through unchanged", &rows)?;
        let rows: Vec<_> = pods
            .iter()
            .filter_map(|p| p["certificate"]["notAfterUnix"].as_u64().map(|t| (pod_labels(p), t as f64)))
            .collect();
        out.gauge("nodemesh_certificate_expiry_timestamp_seconds", "When each workload certificate expires", &rows)?;
        let rows: Vec<_> = pods.iter().map(|p| (pod_labels(p), u(&p["certificate"]["errors"]))).collect();
        out.counter("nodemesh_ca_errors", "Failed certificate requests to the CA", &rows)?;
        out.counter(
            "nodemesh_config_reloads",
            "Configuration changes, by result",
            &[
                (pairs([("result", "accepted")]), u(&s["config"]["accepted"])),
                (pairs([("result", "rejected")]), u(&s["config"]["rejected"])),
            ],
        )?;
        let mut denials: std::collections::BTreeMap<String, u64> = Default::default();
        for p in &pods {
            for (policy, n) in p["proxy"]["inboundDenied"].as_object().into_iter().flatten() {
                *denials.entry(policy.clone()).or_default() += u(n);
            }
        }
        let rows: Vec<_> = denials.iter().map(|(k, v)| (pairs([("policy", k.as_str())]), *v)).collect();
        out.counter("nodemesh_policy_denials", "Requests and connections refused by authorization policy", &rows)?;
        let rows: Vec<_> = pods.iter().map(|p| (pod_labels(p), u(&p["proxy"]["httpRejected"]))).collect();
        out.counter("nodemesh_http_rejected", "Malformed or unsafe HTTP requests refused", &rows)?;
        let services = s["services"].as_object().cloned().unwrap_or_default();
        for (name, field, help) in [
            ("nodemesh_http_retries", "retries", "Retries, by service"),
            ("nodemesh_http_timeouts", "timeouts", "Requests answered 504 at the route's timeout"),
            ("nodemesh_circuit_breaker_overflows", "overflowRequests", "Requests refused by maxRequests"),
            ("nodemesh_circuit_breaker_pending_overflows", "overflowPending", "Requests refused by maxPendingRequests"),
            ("nodemesh_outlier_ejections", "ejections", "Endpoints ejected by outlier detection"),
        ] {
            let rows: Vec<_> = services.iter().map(|(svc, v)| (pairs([("service", svc.as_str())]), u(&v[field]))).collect();
            out.counter(name, help, &rows)?;
        }
        let m = out.0.encode_descriptor("process_cpu_seconds", "CPU time of the agent (user + system)", None, MetricType::Counter)?;
        ConstCounter::new(cpu_seconds()).encode(m)?;
        out.gauge("process_resident_memory_bytes", "Resident memory of the agent", &[(Vec::new(), resident_bytes() as f64)])?;
        Ok(())
    }
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which may contain spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 here.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections with the same labels share one copy of them: what an
    /// idle connection holds for its series is a pointer.
    #[test]
    fn connections_share_one_copy_of_a_label_set() {
        let m = Metrics::default();
        let l = Labels { request_protocol: "tcp", source_workload: "web".into(), ..Default::default() };
        let a = m.tcp_opened(l.clone());
        let b = m.tcp_opened(l.clone());
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&m.request_series(l.clone()).labels, &a));
        let other = m.tcp_opened(Labels { source_workload: "db".into(), ..l });
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(m.series_count(), 2);
    }

    #[test]
    fn istio_names_and_health_are_encoded() {
        let m = Metrics::default();
        let l = Labels { reporter: "source", request_protocol: "http", response_code: 200, response_flags: "-", connection_security_policy: "mutual_tls", ..Labels::default() };
        // Two connections' handles on the same label set: one series.
        m.request_series(l.clone()).record(Duration::from_millis(3), 10, 2000);
        m.request_series(l.clone()).record(Duration::from_millis(7), 0, 5);
        m.tcp_opened(Labels { request_protocol: "tcp", ..l.clone() });
        m.tcp_closed(&Labels { request_protocol: "tcp", ..l.clone() }, 100, 7);
        m.register_health(HealthCollector {
            status: Arc::new(|| {
                serde_json::json!({"ready": true, "config": {"accepted": 3, "rejected": 1},
                    "notReady": [{"pod": "shop/b", "reason": "certificate pending"}],
                    "pods": [{"namespace": "shop", "name": "a", "enrolled": true, "ebpf": {"redirected": 4, "passedThrough": 1},
                              "certificate": {"notAfterUnix": 1_900_000_000u64, "errors": 2},
                              "proxy": {"inboundDenied": {"shop/deny": 5}, "httpRejected": 1}}],
                    "services": {"shop/web": {"retries": 9, "timeouts": 1, "overflowRequests": 2, "overflowPending": 0, "ejections": 1}}})
            }),
        });
        let text = m.encode();
        for want in [
            "istio_requests_total{reporter=\"source\"",
            "response_code=\"200\"",
            "connection_security_policy=\"mutual_tls\"",
            "istio_request_duration_milliseconds_bucket{",
            "istio_response_bytes_sum{",
            "istio_tcp_sent_bytes_total{",
            "nodemesh_enrolled_pods 1.0",
            "nodemesh_pods_not_ready{reason=\"certificate pending\"} 1.0",
            "nodemesh_pods_not_ready{reason=\"error\"} 0.0",
            "nodemesh_ebpf_redirected_connections_total{namespace=\"shop\",pod=\"a\"} 4",
            "nodemesh_certificate_expiry_timestamp_seconds{namespace=\"shop\",pod=\"a\"} 1900000000.0",
            "nodemesh_config_reloads_total{result=\"rejected\"} 1",
            "nodemesh_policy_denials_total{policy=\"shop/deny\"} 5",
            "nodemesh_http_retries_total{service=\"shop/web\"} 9",
            "process_resident_memory_bytes ",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
        let line = text.lines().find(|l| l.starts_with("istio_requests_total{")).unwrap();
        assert!(line.ends_with(" 2"), "{line}");
    }
}
