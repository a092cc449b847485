//! What the proxy reports per request and per connection: Istio-labelled
//! metrics ([`crate::metrics`]) computed from the mesh state, access log
//! lines ([`crate::access_log`]) and spans ([`crate::telemetry::trace`]).

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::{
    access_log::AccessLog,
    identity::SpiffeId,
    metrics::{Labels, Metrics, RequestSeries},
    state::{MeshState, Pod, PodKey, Snapshot},
    telemetry::trace::Tracer,
};

/// Where the proxy's reports go.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLog>,
    pub tracer: Tracer,
}

/// What an access log line says beyond the metric labels.
#[derive(Default)]
pub(super) struct RequestInfo {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub upstream: Option<SocketAddr>,
    /// `allow` / `deny`, and the deciding policy (destination side).
    pub decision: Option<(&'static str, Option<String>)>,
    pub trace_id: Option<String>,
}

impl RequestInfo {
    /// Method, target and authority of `req`, and the span's trace id.
    pub fn of<B>(req: &http::Request<B>, span: &crate::telemetry::trace::Span) -> Self {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
        Self {
            method: req.method().to_string(),
            path: req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            authority: authority.unwrap_or_default(),
            trace_id: span.context().map(|c| c.trace_id().to_string()),
            ..Default::default()
        }
    }
}

impl Telemetry {
    pub(super) fn request_done(&self, series: &RequestSeries, info: &RequestInfo, elapsed: std::time::Duration, request_bytes: u64, response_bytes: u64) {
        series.record(elapsed, request_bytes, response_bytes);
        if self.access_log.enabled() {
            let labels = &series.labels;
            let (policy_decision, policy) = match &info.decision {
                Some((d, p)) => (Some(*d), Some(p.as_deref())),
                None => (None, None),
            };
            self.access_log.log(&Entry {
                common: Common::new("http", labels, elapsed),
                detail: Detail::Http {
                    method: &info.method,
                    path: &info.path,
                    authority: &info.authority,
                    request_bytes,
                    response_bytes,
                    upstream: info.upstream,
                    policy_decision,
                    policy,
                    trace_id: info.trace_id.as_deref(),
                },
            });
        }
    }

    pub(super) fn tcp_done(&self, labels: &Labels, elapsed: std::time::Duration, sent: u64, received: u64, upstream: SocketAddr) {
        self.metrics.tcp_closed(labels, sent, received);
        if self.access_log.enabled() {
            self.access_log.log(&Entry {
                common: Common::new("tcp", labels, elapsed),
                detail: Detail::Tcp { sent_bytes: sent, received_bytes: received, upstream },
            });
        }
    }
}

/// One access log line: the metric labels, then what the kind adds.
#[derive(serde::Serialize)]
struct Entry<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    #[serde(flatten)]
    detail: Detail<'a>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Common<'a> {
    time: String,
    kind: &'static str,
    reporter: &'static str,
    source_workload: &'a str,
    source_namespace: &'a str,
    source_principal: &'a str,
    destination_workload: &'a str,
    destination_namespace: &'a str,
    destination_principal: &'a str,
    destination_service: &'a str,
    protocol: &'static str,
    response_code: u16,
    response_flags: &'static str,
    connection_security_policy: &'static str,
    duration_ms: f64,
}

impl<'a> Common<'a> {
    fn new(kind: &'static str, l: &'a Labels, elapsed: std::time::Duration) -> Self {
        Self {
            time: crate::identity::humantime(std::time::SystemTime::now()),
            kind,
            reporter: l.reporter,
            source_workload: &l.source_workload,
            source_namespace: &l.source_workload_namespace,
            source_principal: &l.source_principal,
            destination_workload: &l.destination_workload,
            destination_namespace: &l.destination_workload_namespace,
            destination_principal: &l.destination_principal,
            destination_service: &l.destination_service,
            protocol: l.request_protocol,
            response_code: l.response_code,
            response_flags: l.response_flags,
            connection_security_policy: l.connection_security_policy,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
        }
    }
}

#[derive(serde::Serialize)]
#[serde(untagged, rename_all_fields = "camelCase")]
enum Detail<'a> {
    Http {
        method: &'a str,
        path: &'a str,
        authority: &'a str,
        request_bytes: u64,
        response_bytes: u64,
        upstream: Option<SocketAddr>,
        #[serde(skip_serializing_if = "Option::is_none")]
        policy_decision: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        policy: Option<Option<&'a str>>,
        trace_id: Option<&'a str>,
    },
    Tcp {
        sent_bytes: u64,
        received_bytes: u64,
        upstream: SocketAddr,
    },
}

/// Workload, app, namespace and principal of one side of the traffic, as
/// metrics name them (`unknown` for what the agent cannot tell), with the
/// canonical service and revision, version and cluster Kiali groups by.
struct Party {
    workload: String,
    app: String,
    namespace: String,
    principal: String,
    canonical_service: String,
    canonical_revision: String,
    version: String,
    cluster: String,
}

/// What metrics say of a pod's workload, from its labels alone (so the
/// pruning of series can tell which still name a pod, [`super::prune`]).
pub(super) struct WorkloadLabels<'a> {
    /// The pod's `app` label, or its name.
    pub workload: &'a str,
    /// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`,
    /// else the workload: Istio's order.
    pub canonical_service: &'a str,
    /// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`,
    /// `version`, else `latest`.
    pub canonical_revision: &'a str,
    /// `version`, else `unknown`.
    pub version: &'a str,
}

impl<'a> WorkloadLabels<'a> {
    pub fn of(p: &'a Pod) -> Self {
        let label = |keys: &[&str]| keys.iter().find_map(|k| p.labels.get(*k)).map(String::as_str);
        let workload = label(&["app"]).unwrap_or(&p.key.name);
        Self {
            workload,
            canonical_service: label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]).unwrap_or(workload),
            canonical_revision: label(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]).unwrap_or("latest"),
            version: label(&["version"]).unwrap_or("unknown"),
        }
    }
}

/// One side of the traffic, as metrics name it. A workload is its pod's
/// `app` label, or the pod's name.
fn party(state: &MeshState, pod: Option<&Pod>) -> Party {
    let unknown = || "unknown".to_owned();
    let Some(p) = pod else {
        return Party {
            workload: unknown(),
            app: unknown(),
            namespace: unknown(),
            principal: unknown(),
            canonical_service: unknown(),
            canonical_revision: "latest".to_owned(),
            version: unknown(),
            cluster: unknown(),
        };
    };
    let w = WorkloadLabels::of(p);
    let principal = SpiffeId::new(&state.trust_domain, &p.key.namespace, &p.service_account)
        .map_or_else(|_| unknown(), |id| id.to_string());
    Party {
        workload: w.workload.to_owned(),
        app: w.workload.to_owned(),
        namespace: p.key.namespace.clone(),
        principal,
        canonical_service: w.canonical_service.to_owned(),
        canonical_revision: w.canonical_revision.to_owned(),
        version: w.version.to_owned(),
        cluster: state.cluster_id.clone(),
    }
}

/// Labels for traffic from `src` (a pod, or a peer identity, or nothing)
/// to `dst` (a pod key or address).
pub(super) struct Parties<'a> {
    pub state: &'a MeshState,
    pub reporter: &'static str,
    pub src_pod: Option<&'a PodKey>,
    pub src_ip: Option<IpAddr>,
    pub src_id: Option<&'a SpiffeId>,
    pub dst_pod: Option<&'a PodKey>,
    pub dst_addr: Option<SocketAddr>,
    /// The service the client addressed, if any (`namespace`, `name`).
    pub service: Option<(&'a str, &'a str)>,
    pub mtls: bool,
}

impl Parties<'_> {
    pub fn labels(&self, protocol: &'static str) -> Labels {
        let mut l = Labels {
            reporter: self.reporter,
            request_protocol: protocol,
            response_flags: "-",
            connection_security_policy: if self.mtls { "mutual_tls" } else { "none" },
            ..Labels::default()
        };
        let local = self.src_pod.and_then(|k| self.state.pods.get(k));
        let src = local.or_else(|| self.src_ip.and_then(|ip| self.state.pod_by_ip(ip)));
        let p = party(self.state, src);
        (l.source_workload, l.source_app, l.source_workload_namespace, l.source_principal) = (p.workload, p.app, p.namespace, p.principal);
        (l.source_canonical_service, l.source_canonical_revision, l.source_version, l.source_cluster) =
            (p.canonical_service, p.canonical_revision, p.version, p.cluster);
        if local.is_none() {
            // An address says where a client is, never who: a principal
            // comes from a verified certificate (or from being the local
            // pod), else it is `unknown`, as Istio reports plaintext peers.
            l.source_principal = "unknown".to_owned();
        }
        if let Some(id) = self.src_id {
            // The verified identity wins over what the address suggests.
            l.source_principal = id.to_string();
            l.source_workload_namespace = id.namespace().to_owned();
        }
        let dst = self
            .dst_pod
            .and_then(|k| self.state.pods.get(k))
            .or_else(|| self.dst_addr.and_then(|a| self.state.pod_by_ip(a.ip())));
        let p = party(self.state, dst);
        (l.destination_workload, l.destination_app, l.destination_workload_namespace, l.destination_principal) =
            (p.workload, p.app, p.namespace, p.principal);
        (l.destination_canonical_service, l.destination_canonical_revision, l.destination_version, l.destination_cluster) =
            (p.canonical_service, p.canonical_revision, p.version, p.cluster);
        let service = self.service.map(|(ns, n)| (ns.to_owned(), n.to_owned())).or_else(|| {
            // Addressed to a pod: the first service selecting it, as Istio does.
            let p = dst?;
            self.state
                .services
                .iter()
                .find(|s| s.selects(p))
                .map(|s| (s.namespace.clone(), s.name.clone()))
        });
        match service {
            Some((ns, name)) => {
                l.destination_service = format!("{name}.{ns}.svc.cluster.local");
                l.destination_service_name = name;
                l.destination_service_namespace = ns;
            }
            None => {
                let unknown = || "unknown".to_owned();
                let host = self.dst_addr.map_or_else(unknown, |a| a.ip().to_string());
                l.destination_service = host.clone();
                l.destination_service_name = host;
                l.destination_service_namespace = unknown();
            }
        }
        l
    }
}

/// What distinguishes the request series of one connection: the upstream
/// address (the source side balances each request), protocol, response code
/// and flags.
pub(super) type SeriesKey = (Option<SocketAddr>, &'static str, u16, &'static str);

/// A connection's request series, so that its requests skip computing the
/// labels (pod lookups, a dozen strings) and the metric families' lookups:
/// each is computed once per mesh state and key.
#[derive(Default)]
pub(super) struct SeriesCache(std::sync::Mutex<Option<CachedSeries>>);

/// The series computed under one mesh state and metrics generation. The
/// state is held weakly: an idle connection must not keep a replaced mesh
/// state (its policies, routes, pods) alive. While the `Weak` lives, the
/// allocation it points to is not reused, so an address match is the same
/// state.
type CachedSeries = (std::sync::Weak<MeshState>, u64, Vec<(SeriesKey, Arc<RequestSeries>)>);

impl SeriesCache {
    /// Distinct keys kept per connection (a few codes times a few endpoints).
    const MAX: usize = 32;

    /// The series of `key`; `labels` computes the labels on a miss (its
    /// protocol, code and flags are set from the key).
    pub fn get(&self, metrics: &Metrics, snapshot: &Snapshot, key: SeriesKey, labels: impl FnOnce() -> Labels) -> Arc<RequestSeries> {
        let mut guard = self.0.lock().expect("poisoned");
        let generation = metrics.generation();
        if guard.as_ref().is_none_or(|(s, g, _)| !std::ptr::eq(s.as_ptr(), Arc::as_ptr(snapshot)) || *g != generation) {
            *guard = Some((Arc::downgrade(snapshot), generation, Vec::new()));
        }
        let (_, _, cached) = guard.as_mut().expect("set above");
        if let Some((_, s)) = cached.iter().find(|(k, _)| *k == key) {
            return s.clone();
        }
        if cached.len() >= Self::MAX {
            cached.clear();
        }
        let mut l = labels();
        (l.request_protocol, l.response_code, l.response_flags) = (key.1, key.2, key.3);
        let series = Arc::new(metrics.request_series(l));
        cached.push((key, series.clone()));
        series
    }
}

/// `http` or `grpc` (by the request's content type).
pub(super) fn protocol(headers: &http::HeaderMap) -> &'static str {
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc { "grpc" } else { "http" }
}

/// A response body that records the request's metrics when it ends (or is
/// dropped): duration to the end of the body, and its size.
pub(super) struct Recorded<B> {
    inner: B,
    bytes: u64,
    done: Option<Done>,
}

struct Done {
    telemetry: Arc<Telemetry>,
    series: Arc<RequestSeries>,
    info: RequestInfo,
    start: Instant,
    request_bytes: u64,
}

impl<B> Recorded<B> {
    pub fn new(inner: B, telemetry: Arc<Telemetry>, series: Arc<RequestSeries>, info: RequestInfo, start: Instant, request_bytes: u64) -> Self {
        Self { inner, bytes: 0, done: Some(Done { telemetry, series, info, start, request_bytes }) }
    }

    fn finish(&mut self) {
        if let Some(d) = self.done.take() {
            d.telemetry.request_done(&d.series, &d.info, d.start.elapsed(), d.request_bytes, self.bytes);
        }
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Recorded<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream that counts the bytes read from it and written to it.
pub(super) struct Counted<IO> {
    io: IO,
    read: u64,
    written: u64,
}

impl<IO> Counted<IO> {
    pub fn new(io: IO) -> Self {
        Self { io, read: 0, written: 0 }
    }

    /// (bytes read, bytes written).
    pub fn totals(&self) -> (u64, u64) {
        (self.read, self.written)
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.written += *n as u64;
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing;

    fn source(src_ip: &str, src_id: Option<&SpiffeId>, state: &MeshState) -> (String, String, String) {
        let l = Parties {
            state,
            reporter: "destination",
            src_pod: None,
            src_ip: Some(src_ip.parse().unwrap()),
            src_id,
            dst_pod: Some(&testing::pod("shop", "db")),
            dst_addr: None,
            service: None,
            mtls: src_id.is_some(),
        }
        .labels("http");
        (l.source_principal, l.source_workload, l.source_workload_namespace)
    }

    /// Canonical service, revision, version and cluster as Istio derives
    /// them from the pod's labels, for both sides.
    #[test]
    fn kiali_labels_follow_istios_label_precedence() {
        let mut state = testing::mesh_state();
        let labels = |state: &MeshState| {
            let l = Parties {
                state,
                reporter: "source",
                src_pod: Some(&testing::pod("shop", "web")),
                src_ip: None,
                src_id: None,
                dst_pod: Some(&testing::pod("shop", "db")),
                dst_addr: None,
                service: None,
                mtls: true,
            }
            .labels("http");
            let dst = [&l.destination_canonical_service, &l.destination_canonical_revision, &l.destination_version, &l.destination_cluster];
            let src = [&l.source_canonical_service, &l.source_canonical_revision, &l.source_version, &l.source_cluster];
            (src.map(|s| s.to_owned()), dst.map(|s| s.to_owned()), l.destination_workload.clone())
        };
        let db = testing::pod("shop", "db");
        let set = |state: &mut MeshState, k: &str, v: &str| {
            state.pods.get_mut(&db).unwrap().labels.insert(k.into(), v.into());
        };
        let app = state.pods[&db].labels.get("app").cloned().unwrap_or_else(|| "db".into());
        let (src, dst, workload) = labels(&state);
        assert_eq!(src, ["web", "latest", "unknown", "Kubernetes"]);
        assert_eq!(dst, [app.as_str(), "latest", "unknown", "Kubernetes"]);
        assert_eq!(workload, app);
        set(&mut state, "version", "v1");
        assert_eq!(labels(&state).1, [app.as_str(), "v1", "v1", "Kubernetes"], "version: the revision and the version");
        set(&mut state, "app.kubernetes.io/version", "1.2");
        set(&mut state, "app.kubernetes.io/name", "database");
        assert_eq!(labels(&state).1, ["database", "1.2", "v1", "Kubernetes"]);
        set(&mut state, "service.istio.io/canonical-revision", "canary");
        set(&mut state, "service.istio.io/canonical-name", "db-canonical");
        assert_eq!(labels(&state).1, ["db-canonical", "canary", "v1", "Kubernetes"]);
        assert_eq!(labels(&state).2, app, "the workload stays the app label");
        state.pods.get_mut(&db).unwrap().labels.clear();
        assert_eq!(labels(&state).1, ["db", "latest", "unknown", "Kubernetes"], "no labels: the workload (pod name)");
        let state = state.with_scope(crate::state::Scope { cluster_id: "east".into(), ..Default::default() });
        assert_eq!(labels(&state).0[3], "east");
        // A party the agent does not know.
        let l = Parties { state: &state, reporter: "destination", src_pod: None, src_ip: Some("203.0.113.9".parse().unwrap()), src_id: None, dst_pod: Some(&db), dst_addr: None, service: None, mtls: false }.labels("tcp");
        assert_eq!(
            [l.source_canonical_service, l.source_canonical_revision, l.source_version, l.source_cluster],
            ["unknown", "latest", "unknown", "unknown"]
        );
    }

    /// A connection's series cache hits under the state it computed the
    /// series in, misses under a new one, and never keeps a replaced state
    /// alive (an idle connection would otherwise pin every state it saw).
    #[test]
    fn the_series_cache_follows_the_state_without_holding_it() {
        let metrics = Metrics::default();
        let cache = SeriesCache::default();
        let key: SeriesKey = (None, "http", 200, "-");
        let computed = std::cell::Cell::new(0);
        let labels = || {
            computed.set(computed.get() + 1);
            crate::metrics::Labels::default()
        };
        let first: Snapshot = Arc::new(testing::mesh_state());
        let a = cache.get(&metrics, &first, key, labels);
        let b = cache.get(&metrics, &first, key, labels);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(computed.get(), 1, "a hit under the same state");
        let held = Arc::downgrade(&first);
        drop(first);
        assert!(held.upgrade().is_none(), "the cache kept the replaced state alive");
        let second: Snapshot = Arc::new(testing::mesh_state());
        cache.get(&metrics, &second, key, labels);
        assert_eq!(computed.get(), 2, "a miss under a new state");
    }

    #[test]
    fn a_plaintext_client_has_no_principal_whatever_its_address() {
        let state = testing::mesh_state();
        let unknown = || "unknown".to_owned();
        // From a mesh pod's address but without a certificate: the mesh
        // knows the workload there, not who is speaking.
        assert_eq!(source("198.51.100.11", None, &state), (unknown(), "web".to_owned(), "shop".to_owned()));
        // From outside the mesh: nothing known.
        assert_eq!(source("203.0.113.9", None, &state), (unknown(), unknown(), unknown()));
        // A verified peer is its certificate's principal.
        let web = testing::id("shop", "web");
        assert_eq!(source("198.51.100.11", Some(&web), &state).0, web.to_string());
        // The source agent reports its own pod's principal.
        let l = Parties { state: &state, reporter: "source", src_pod: Some(&testing::pod("shop", "web")), src_ip: None, src_id: None, dst_pod: None, dst_addr: None, service: None, mtls: false }.labels("http");
        assert_eq!(l.source_principal, web.to_string());
    }
}
