//! Outbound HTTP: a pod's connection to a service port declared HTTP is
//! terminated by the **source** node's agent, which routes, balances,
//! retries and bounds each request (the model is in [`crate::route`]).
//! Each concern is one layer of the connection's stack ([`Outbound::stack`],
//! read top to bottom):
//!
//! | layer | what it does |
//! | --- | --- |
//! | [`Telemetry`] | client span, metrics, access log of what the client got |
//! | [`CheckFrontDoor`] | 400 for ambiguous requests ([`super::http::validate`]) |
//! | [`Route`] | the service's rule and weighted backend (a label subset of its endpoints, or another service's port); the rule's Gateway API filters ([`filters`]: header modifiers, rewrites, redirects answered here, mirrors); 400 for a target that cannot be normalized, 404 when Gateway API routes are attached and none matches, 500 for an invalid backend, 503 when the backend has no endpoint |
//! | [`fault::Fault`] | Istio fault injection: a delay, or the fault's status answered here (`fault-abort`) |
//! | [`CircuitBreaker`] | `maxRequests`, else 503 `overflow` at once |
//! | [`upgrade::Upgrades`] | HTTP/1.1 `Upgrade` (WebSocket) sent once and joined |
//! | [`Timeout`] | the rule's timeout until the response head: 504 |
//! | [`retry::Retry`] | connect failures, resets and the configured codes retried on another endpoint (idempotent methods, budget, kept bodies up to [`MAX_RETRY_BODY`], jittered backoff) |
//! | [`endpoint::Balance`] | an endpoint (least requests of two, ejected ones skipped); its outcome to outlier detection |
//! | [`endpoint::PerTryTimeout`] | the rule's per-try timeout: a reset, retried |
//! | [`endpoint::EndpointClient`] | the try on a pooled connection in the app's HTTP version, through the destination's agent |
//!
//! Local answers ([`super::reply`]) carry `x-mesh-reply` (`overflow`,
//! `timeout`, `no-endpoint`, `connect-failure`, `reset`, `bad-request`) so
//! a client or an operator can tell them from the application's; the
//! header is believed, and passed on, only on responses from the
//! destination's agent (over the mTLS tunnel). A request body that
//! breaks its framing is the client's fault: 400, never a retry, an
//! ejection or a 5xx of the endpoint.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Version};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use tokio::net::TcpStream;
use tower::ServiceBuilder;

use super::{
    Outbound, PodHandle,
    front_door::CheckFrontDoor,
    http::{HttpFuture, HttpService, RespBody, ready, validate::{FrontDoor, Violation}},
    observe::{Parties, Recorded, RequestInfo, SeriesCache},
    reply::{self, LocalReply},
    services::{self, ServiceState},
};
use crate::{
    policy,
    route::{self, RequestView, RouteTable},
    state::{AppHttp, Destination, Snapshot},
    telemetry::trace::{SpanKind, attr},
};

mod endpoint;
mod fault;
mod filters;
mod retry;
mod upgrade;

/// Request bodies up to this size are kept so the request can be retried;
/// a larger (or unknown-length, streamed) body is sent once.
pub const MAX_RETRY_BODY: u64 = 64 * 1024;

/// The compiled routes of the current snapshot.
#[derive(Default)]
pub struct RouteCache {
    inner: Mutex<Option<(Snapshot, Arc<RouteTable>)>>,
}

impl RouteCache {
    fn get(&self, snapshot: &Snapshot) -> Arc<RouteTable> {
        let mut inner = self.inner.lock().expect("poisoned");
        match inner.as_ref() {
            Some((s, t)) if Arc::ptr_eq(s, snapshot) => t.clone(),
            _ => {
                let t = Arc::new(RouteTable::from_state(snapshot));
                *inner = Some((snapshot.clone(), t.clone()));
                t
            }
        }
    }

    /// Compiles `snapshot`'s routes off the data path (see
    /// [`super::authz::Cache::warm`]: the same rules).
    pub(super) fn warm(&self, snapshot: &Snapshot, current: impl Fn() -> bool) -> bool {
        if self.inner.lock().expect("poisoned").as_ref().is_some_and(|(s, _)| Arc::ptr_eq(s, snapshot)) {
            return false;
        }
        let t = Arc::new(RouteTable::from_state(snapshot));
        let mut inner = self.inner.lock().expect("poisoned");
        if !current() || inner.as_ref().is_some_and(|(s, _)| Arc::ptr_eq(s, snapshot)) {
            return false;
        }
        *inner = Some((snapshot.clone(), t));
        true
    }
}

/// The agent's own answer (none of these closes the connection, so the
/// client's HTTP version does not matter).
fn local(r: LocalReply) -> Response<RespBody> {
    reply::respond(&r, Version::HTTP_11)
}

/// An upstream's response: its `x-mesh-reply` believed only from the
/// destination's agent (`dest` a mesh pod: the response came over the
/// verified mTLS tunnel).
fn upstream_response(res: Response<Incoming>, dest: &Destination) -> Response<RespBody> {
    let from_peer_agent = matches!(dest, Destination::MeshPod { .. });
    reply::from_upstream(res, from_peer_agent).map(|b| b.boxed())
}

/// One downstream connection: what its layers share.
struct Conn {
    pod: Arc<PodHandle>,
    /// The service address the app dialled.
    orig: SocketAddr,
    /// What the application behind the service speaks.
    version: AppHttp,
}

/// What [`Route`] decided, for the layers under it (a request extension).
struct Routed {
    /// `namespace/name` of the service.
    service: String,
    svc: Arc<ServiceState>,
    /// The route that matched, or `(none)`.
    route: String,
    policy: route::ServicePolicy,
    retry: route::RetryPolicy,
    timeout: Option<Duration>,
    /// The selected backend's endpoints (never empty).
    endpoints: Vec<Destination>,
    /// The rule's Istio fault injection, if any ([`fault::Fault`]).
    fault: Option<route::Fault>,
}

/// The endpoint that answered last, if any (a response extension, for
/// [`Telemetry`]'s labels).
#[derive(Clone)]
struct Answered(Destination);

fn routed<B>(req: &Request<B>) -> Arc<Routed> {
    req.extensions()
        .get::<Arc<Routed>>()
        .cloned()
        .expect("the route layer sits above every layer that reads its decision")
}

fn answered(mut res: Response<RespBody>, dest: Option<Destination>) -> Response<RespBody> {
    if let Some(d) = dest {
        res.extensions_mut().insert(Answered(d));
    }
    res
}

impl Outbound {
    pub(super) async fn serve_http(self: Arc<Self>, app: TcpStream, pod: Arc<PodHandle>, orig: SocketAddr, version: AppHttp) {
        let stats = pod.stats.clone();
        let door = FrontDoor::default();
        let app = door.inspect(app);
        let conn = Arc::new(Conn { pod, orig, version });
        let stack = self.stack(conn, door);
        super::http::serve(app, stack, &self.inputs.draining, &stats, orig, "outbound").await;
    }

    /// The layers every request of one connection goes through, top to
    /// bottom (the module doc says what each does).
    fn stack(self: &Arc<Self>, conn: Arc<Conn>, door: FrontDoor) -> impl HttpService {
        let retry = retry::Retry::layer(self.clone(), conn.clone());
        let lower = ServiceBuilder::new()
            // Picks per try, so a retry can go elsewhere and each outcome
            // reaches outlier detection.
            .layer(endpoint::Balance::layer(self.clone()))
            // Bounds one try only: a slow endpoint's try is retried.
            .layer(endpoint::PerTryTimeout::layer())
            .service(endpoint::EndpointClient { outbound: self.clone(), conn: conn.clone() });
        ServiceBuilder::new()
            // Outermost: it sees what the client gets, local answers included.
            .layer(Telemetry::layer(self.clone(), conn.clone()))
            // Before anything reads the request: what it says must be unambiguous.
            .layer(CheckFrontDoor::layer(door, conn.pod.stats.clone(), "outbound"))
            // Decides the backend and the limits every layer below applies.
            .layer(Route::layer(self.clone(), conn.clone()))
            // Before admission, as Envoy's fault filter sits before its
            // router: an injected abort never counts against the limits, an
            // injected delay is not part of the rule's timeout.
            .layer(fault::Fault::layer(self.clone()))
            // Admission before any time is spent: a full service answers at once.
            .layer(CircuitBreaker::layer())
            // An upgrade leaves the request/response model: no timeout, no retry.
            .layer(upgrade::Upgrades::layer(self.clone(), conn.clone()))
            // Around the retries: the rule's timeout bounds all tries together.
            .layer(Timeout::layer())
            .layer(retry)
            .service(lower)
    }
}

/// The client span, the request's metric series and its access log line,
/// recorded once the response body ends; the series cache is per
/// connection.
#[derive(Clone)]
struct Telemetry<S> {
    outbound: Arc<Outbound>,
    conn: Arc<Conn>,
    series: Arc<SeriesCache>,
    inner: S,
}

impl<S> Telemetry<S> {
    fn layer(outbound: Arc<Outbound>, conn: Arc<Conn>) -> impl tower::Layer<S, Service = Self> {
        let series = Arc::new(SeriesCache::default());
        tower::layer::layer_fn(move |inner| Telemetry { outbound: outbound.clone(), conn: conn.clone(), series: series.clone(), inner })
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for Telemetry<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, mut req: Request<Incoming>) -> HttpFuture {
        let start = std::time::Instant::now();
        let protocol = super::observe::protocol(req.headers());
        let request_bytes = req.body().size_hint().exact().unwrap_or(0);
        // A client span, child of the app's context; the destination's
        // server span will be its child.
        let tracer = &self.outbound.inputs.telemetry.tracer;
        let parent = tracer.extract(req.headers());
        let mut span = tracer.start_span(SpanKind::Client, "outbound", parent.as_ref());
        span.inject(req.headers_mut());
        let mut info = RequestInfo::of(&req, &span);
        if span.is_recording() {
            span.set_attribute(attr::HTTP_REQUEST_METHOD, info.method.clone());
            span.set_attribute(attr::URL_PATH, info.path.clone());
            span.set_attribute(attr::SERVER_ADDRESS, info.authority.clone());
            span.set_attribute(attr::MESH_SOURCE_WORKLOAD, self.conn.pod.key.to_string());
        }
        let run = self.inner.call(req);
        let (outbound, conn, series) = (self.outbound.clone(), self.conn.clone(), self.series.clone());
        Box::pin(async move {
            let inputs = &outbound.inputs;
            let res = run.await?;
            let dest = res.extensions().get::<Answered>().map(|a| a.0.clone());
            let snapshot = inputs.state.borrow().clone();
            let code = res.status().as_u16();
            let flags = reply::flags(&res);
            let dst_pod = match &dest {
                Some(Destination::MeshPod { pod, .. }) => Some(pod),
                _ => None,
            };
            let key = (dest.as_ref().map(Destination::addr), protocol, code, flags);
            let series = series.get(&inputs.telemetry.metrics, &snapshot, key, || {
                let service = snapshot.service_target(conn.orig).map(|t| (t.service.namespace.clone(), t.service.name.clone()));
                Parties {
                    state: &snapshot,
                    reporter: "source",
                    src_pod: Some(&conn.pod.key),
                    src_ip: None,
                    src_id: None,
                    dst_pod,
                    dst_addr: dest.as_ref().map(Destination::addr),
                    service: service.as_ref().map(|(ns, n)| (ns.as_str(), n.as_str())),
                    mtls: dst_pod.is_some(),
                }
                .labels(protocol)
            });
            let labels = &series.labels;
            info.upstream = dest.as_ref().map(Destination::addr);
            if span.is_recording() {
                span.set_attribute(attr::HTTP_RESPONSE_STATUS_CODE, labels.response_code);
                span.set_attribute(attr::MESH_DESTINATION_WORKLOAD, format!("{}/{}", labels.destination_workload_namespace, labels.destination_workload));
                span.set_attribute(attr::MESH_MTLS, dst_pod.is_some());
                if res.status().is_server_error() {
                    span.set_error(format!("{} {}", labels.response_code, labels.response_flags));
                }
            }
            span.end();
            let telemetry = inputs.telemetry.clone();
            Ok(res.map(|b| Recorded::new(b, telemetry, series.clone(), info, start, request_bytes).boxed()))
        })
    }
}

/// The service's route: rule, weighted backend, the backend's endpoints,
/// and the limits the layers below apply ([`Routed`]).
#[derive(Clone)]
struct Route<S> {
    outbound: Arc<Outbound>,
    conn: Arc<Conn>,
    inner: S,
}

impl<S> Route<S> {
    fn layer(outbound: Arc<Outbound>, conn: Arc<Conn>) -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(move |inner| Route { outbound: outbound.clone(), conn: conn.clone(), inner })
    }

    /// A local answer instead when the request goes nowhere (boxed: the
    /// way through should not pay for moving a response). The rule's
    /// request filters are applied to `req` on the way; the response
    /// header modifiers are returned for the way back.
    fn decide(&self, req: &mut Request<Incoming>) -> Result<(Routed, Vec<route::HeaderModifier>), Box<Response<RespBody>>> {
        let (outbound, conn) = (&self.outbound, &self.conn);
        let snapshot = outbound.inputs.state.borrow().clone();
        let routes = outbound.routes.get(&snapshot);
        let Some(target) = snapshot.service_target(conn.orig) else {
            return Err(Box::new(local(LocalReply::NotAService { orig: conn.orig })));
        };
        let (ns, name) = (target.service.namespace.as_str(), target.service.name.as_str());
        // The filters below change `req`: the target is read from a copy
        // of its URI (shared bytes, no allocation).
        let uri = req.uri().clone();
        let raw = uri.path_and_query().map_or("/", |p| p.as_str());
        // Matched on the normalized path; forwarded as sent (the
        // destination agent normalizes what it authorizes and forwards),
        // unless a rewrite says otherwise.
        let path = policy::normalize_path(raw)
            .map_err(|e| Box::new(reply::refuse(&Violation::Target(e.to_string()), req.version(), &conn.pod.stats, "outbound")))?;
        let view = RequestView {
            method: req.method(),
            path: path.path(),
            query: path.query(),
            headers: req.headers(),
            client_namespace: &conn.pod.key.namespace,
            port: conn.orig.port(),
        };
        let service = format!("{ns}/{name}");
        let selected = match routes.select(ns, name, &view, outbound.balancer.random() as u32) {
            route::Selection::NoRoute => None,
            route::Selection::Unmatched { route } => {
                tracing::debug!(%service, %route, "no rule of the attached routes matches");
                return Err(Box::new(local(LocalReply::NoRouteMatched { service, route: route.to_owned() })));
            }
            route::Selection::Rule(s) => Some(s),
        };
        let route = selected.map_or("(none)", |s| s.route).to_owned();
        let mut response_headers = Vec::new();
        let endpoints: Vec<Destination> = match selected {
            None => target.endpoints.iter().map(|e| e.dest.clone()).collect(),
            Some(sel) => {
                if let Some(r) = sel.rule.filters.iter().find_map(|f| match f {
                    route::Filter::RequestRedirect(r) => Some(r),
                    _ => None,
                }) {
                    let location = filters::location(r, &filters::request_host(req), conn.orig.port(), path.path(), path.query(), sel.matched_prefix);
                    return Err(Box::new(local(LocalReply::Redirect { status: r.status_code, location })));
                }
                let backend = match sel.backend {
                    None => {
                        let why = "the rule has no backend to forward to (no backendRefs, or every weight is 0)".to_owned();
                        return Err(Box::new(local(LocalReply::InvalidBackend { service, route, why })));
                    }
                    Some(b) => b,
                };
                if let Some(why) = &backend.invalid {
                    return Err(Box::new(local(LocalReply::InvalidBackend { service, route, why: why.clone() })));
                }
                // Rule filters first, then the backend's (the spec's order).
                let (norm, query) = (path.path().to_owned(), path.query().map(str::to_owned));
                for f in sel.rule.filters.iter().chain(&backend.filters) {
                    if let route::Filter::RequestMirror { backend: to, per_million, subset } = f
                        && outbound.balancer.chance(*per_million)
                    {
                        outbound.mirror(conn, req, to, subset.as_ref());
                    }
                }
                filters::apply_to_request(req, &sel.rule.filters, &norm, query.as_deref(), sel.matched_prefix);
                filters::apply_to_request(req, &backend.filters, &norm, query.as_deref(), sel.matched_prefix);
                response_headers = filters::response_modifiers(sel.rule.filters.iter().chain(&backend.filters));
                match &backend.service {
                    // Another service's port (Gateway API backendRef).
                    Some(bs) => snapshot
                        .service_port_target(&bs.namespace, &bs.name, bs.port)
                        .map(|t| t.endpoints.iter().filter(|e| backend.selects(e.labels)).map(|e| e.dest.clone()).collect())
                        .unwrap_or_default(),
                    None => target.endpoints.iter().filter(|e| backend.selects(e.labels)).map(|e| e.dest.clone()).collect(),
                }
            }
        };
        // A DestinationRule's port or subset policy counts its limits apart.
        let subset = selected.and_then(|s| s.backend).and_then(|b| b.subset_name.as_deref());
        let (policy, key) = routes.policy_for(ns, name, conn.orig.port(), subset);
        let svc = outbound.services.get(ns, key.unwrap_or(name));
        svc.requests.fetch_add(1, Ordering::Relaxed);
        if endpoints.is_empty() {
            svc.no_endpoint.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%service, %route, "no endpoint for the selected backend");
            return Err(Box::new(local(LocalReply::NoEndpointForRoute { service, route })));
        }
        let routed = Routed {
            service,
            svc,
            route,
            policy: policy.clone(),
            fault: selected.and_then(|s| {
                s.rule.filters.iter().find_map(|f| match f {
                    route::Filter::Fault(f) => Some(f.clone()),
                    _ => None,
                })
            }),
            retry: selected.map_or_else(|| route::default_retry_policy().clone(), |s| s.retry.clone()),
            timeout: selected.and_then(|s| s.timeout),
            endpoints,
        };
        Ok((routed, response_headers))
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for Route<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, mut req: Request<Incoming>) -> HttpFuture {
        match self.decide(&mut req) {
            Ok((r, response_headers)) => {
                req.extensions_mut().insert(Arc::new(r));
                let run = self.inner.call(req);
                if response_headers.is_empty() {
                    return run;
                }
                Box::pin(async move {
                    let mut res = run.await?;
                    for m in &response_headers {
                        filters::modify_headers(res.headers_mut(), m);
                    }
                    Ok(res)
                })
            }
            Err(res) => Box::pin(async move { Ok(*res) }),
        }
    }
}

/// The service's `maxRequests`: admitted requests are counted until their
/// response head; past the limit, 503 `overflow` at once.
#[derive(Clone)]
struct CircuitBreaker<S> {
    inner: S,
}

impl<S> CircuitBreaker<S> {
    fn layer() -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(|inner| CircuitBreaker { inner })
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for CircuitBreaker<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, req: Request<Incoming>) -> HttpFuture {
        let r = routed(&req);
        let max = r.policy.circuit_breaker.max_requests;
        let Some(active) = services::admit(&r.svc, max) else {
            r.svc.overflow_requests.fetch_add(1, Ordering::Relaxed);
            tracing::info!(service = %r.service, limit = max, "circuit breaker: too many requests");
            let res = local(LocalReply::TooManyRequests { service: r.service.clone() });
            return Box::pin(async move { Ok(res) });
        };
        // Admitted before anything below runs; the slot is held until the
        // response head.
        let run = self.inner.call(req);
        Box::pin(async move {
            let res = run.await;
            drop(active);
            res
        })
    }
}

/// The rule's timeout, over every try: 504 `timeout` when no response head
/// came in time.
#[derive(Clone)]
struct Timeout<S> {
    inner: S,
}

impl<S> Timeout<S> {
    fn layer() -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(|inner| Timeout { inner })
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for Timeout<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, req: Request<Incoming>) -> HttpFuture {
        let r = routed(&req);
        let run = self.inner.call(req);
        let Some(t) = r.timeout else { return run };
        Box::pin(async move {
            match tokio::time::timeout(t, run).await {
                Ok(res) => res,
                Err(_) => {
                    r.svc.timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(service = %r.service, route = %r.route, timeout = ?t, "request timed out");
                    Ok(local(LocalReply::Timeout { service: r.service.clone(), timeout: route::RouteDuration(t) }))
                }
            }
        })
    }
}
