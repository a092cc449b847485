//! Outbound HTTP: a pod's connection to a service port declared HTTP is
//! terminated by the **source** node's agent, which routes, balances,
//! retries and bounds each request (the model is in [`crate::route`]):
//!
//! 0. the front door ([`super::http::validate`]) refuses ambiguous
//!    requests (two `Host`s, no `Host`, `Host` against `:authority`,
//!    `Content-Length` with `Transfer-Encoding`, `#fragment`) with 400;
//! 1. the request's target is normalized for matching (a target that cannot
//!    be normalized gets 400; the request itself is forwarded as sent: the
//!    destination agent normalizes what it authorizes and forwards);
//! 2. the service's route picks a rule and a weighted backend (a label
//!    subset of the service's endpoints); no route or no matching rule: any
//!    endpoint, default retries, no timeout;
//! 3. the circuit breaker admits it (`maxRequests`) or answers 503 at once;
//! 4. an endpoint of the backend is chosen (least requests of two, outlier
//!    ejection skipped) and the request sent on a pooled connection in the
//!    application's HTTP version, through the destination's agent;
//! 5. connect failures, resets and the configured status codes are retried
//!    on another endpoint when the method is idempotent (or the rule allows
//!    every method), the retry budget has room and the body was small
//!    enough to keep ([`MAX_RETRY_BODY`]), after a jittered backoff;
//! 6. the rule's timeout bounds all of it until the response head: 504.
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
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{
    PodHandle, Proxy,
    balance::Outcome,
    http_client::{ReqBody, TryError},
    http::{
        DrainHttp, count_http_end, http_server, is_upgrade, join_upgraded, strip_hop_by_hop,
        validate::{BodyFault, ClientBody, FrontDoor, Violation},
    },
    reply::{self, LocalReply, ResetCause},
    services::{self, ServiceState},
};
use crate::{
    policy,
    route::{self, RequestView, RetryOn, RouteTable},
    state::{AppHttp, Destination, Snapshot},
    telemetry::trace::{SpanKind, attr},
};

type RespBody = BoxBody<Bytes, hyper::Error>;

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

/// What every request on one downstream connection shares.
struct Conn {
    pod: Arc<PodHandle>,
    /// The service address the app dialled.
    orig: SocketAddr,
    /// What the application behind the service speaks.
    version: AppHttp,
    series: super::observe::SeriesCache,
    door: FrontDoor,
}

impl Proxy {
    pub(super) async fn serve_http_outbound(self: Arc<Self>, app: TcpStream, pod: Arc<PodHandle>, orig: SocketAddr, version: AppHttp) {
        let stats = pod.stats.clone();
        let door = FrontDoor::default();
        let app = door.inspect(app);
        let conn = Arc::new(Conn { pod, orig, version, series: super::observe::SeriesCache::default(), door });
        let this = self.clone();
        let drain = DrainHttp::default();
        let svc_drain = drain.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let conn = conn.clone();
            let drain = svc_drain.clone();
            async move {
                let version = drain.saw(&req);
                let res = this.outbound_request(&conn, req).await;
                Ok::<_, Infallible>(drain.mark(&this.inputs.draining, version, res))
            }
        });
        let server = http_server();
        let conn = server.serve_connection_with_upgrades(TokioIo::new(app), svc);
        // Draining: `Connection: close` / GOAWAY, as on the inbound side.
        let result = super::until_drained(conn, &self.inputs.draining, |c| {
            if drain.is_h2() {
                c.graceful_shutdown();
            }
        })
        .await;
        count_http_end(result, &stats, orig, "outbound");
    }

    async fn outbound_request(&self, conn: &Conn, mut req: Request<Incoming>) -> Response<RespBody> {
        let start = std::time::Instant::now();
        let protocol = super::observe::protocol(req.headers());
        let request_bytes = req.body().size_hint().exact().unwrap_or(0);
        // A client span, child of the app's context; the destination's
        // server span will be its child.
        let tracer = &self.inputs.telemetry.tracer;
        let parent = tracer.extract(req.headers());
        let mut span = tracer.start_span(SpanKind::Client, "outbound", parent.as_ref());
        span.inject(req.headers_mut());
        let mut info = super::observe::RequestInfo::of(&req, &span);
        if span.is_recording() {
            span.set_attribute(attr::HTTP_REQUEST_METHOD, info.method.clone());
            span.set_attribute(attr::URL_PATH, info.path.clone());
            span.set_attribute(attr::SERVER_ADDRESS, info.authority.clone());
            span.set_attribute(attr::MESH_SOURCE_WORKLOAD, conn.pod.key.to_string());
        }
        let (res, dest) = self.route_request(conn, req).await;
        let snapshot = self.inputs.state.borrow().clone();
        let code = res.status().as_u16();
        let flags = reply::flags(&res);
        let dst_pod = match &dest {
            Some(Destination::MeshPod { pod, .. }) => Some(pod),
            _ => None,
        };
        let key = (dest.as_ref().map(Destination::addr), protocol, code, flags);
        let series = conn.series.get(&self.inputs.telemetry.metrics, &snapshot, key, || {
            let service = snapshot.service_target(conn.orig).map(|t| (t.service.namespace.clone(), t.service.name.clone()));
            super::observe::Parties {
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
        let telemetry = self.inputs.telemetry.clone();
        res.map(|b| super::observe::Recorded::new(b, telemetry, series.clone(), info, start, request_bytes).boxed())
    }

    /// Routes, balances and sends one request; also says which endpoint
    /// answered last, if any.
    async fn route_request(&self, conn: &Conn, req: Request<Incoming>) -> (Response<RespBody>, Option<Destination>) {
        if let Err(v) = conn.door.check(&req) {
            return (reply::refuse(&v, req.version(), &conn.pod.stats, "outbound"), None);
        }
        let snapshot = self.inputs.state.borrow().clone();
        let routes = self.outbound.routes.get(&snapshot);
        let Some(target) = snapshot.service_target(conn.orig) else {
            return (local(LocalReply::NotAService { orig: conn.orig }), None);
        };
        let (ns, name) = (target.service.namespace.as_str(), target.service.name.as_str());
        let raw = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let path = match policy::normalize_path(raw) {
            Ok(p) => p,
            Err(e) => return (reply::refuse(&Violation::Target(e.to_string()), req.version(), &conn.pod.stats, "outbound"), None),
        };
        let view = RequestView { method: req.method(), path: path.path(), headers: req.headers() };
        let selected = routes.select(ns, name, &view, (self.outbound.balancer.random() % 100) as u32);
        let endpoints: Vec<Destination> = target
            .endpoints
            .iter()
            .filter(|e| selected.is_none_or(|s| s.backend.selects(e.labels)))
            .map(|e| e.dest.clone())
            .collect();
        let svc = self.outbound.services.get(ns, name);
        svc.requests.fetch_add(1, Ordering::Relaxed);
        let route_name = selected.map_or("(none)", |s| s.route);
        if endpoints.is_empty() {
            svc.no_endpoint.fetch_add(1, Ordering::Relaxed);
            tracing::info!(service = %format_args!("{ns}/{name}"), route = route_name, "no endpoint for the selected backend");
            return (local(LocalReply::NoEndpointForRoute { service: format!("{ns}/{name}"), route: route_name.to_owned() }), None);
        }
        let policy = routes.service_policy(ns, name).clone();
        let Some(_active) = services::acquire(&svc.active, policy.circuit_breaker.max_requests) else {
            svc.overflow_requests.fetch_add(1, Ordering::Relaxed);
            tracing::info!(service = %format_args!("{ns}/{name}"), limit = policy.circuit_breaker.max_requests, "circuit breaker: too many requests");
            return (local(LocalReply::TooManyRequests { service: format!("{ns}/{name}") }), None);
        };
        let retry = match selected {
            Some(s) => s.retry.clone(),
            None => route::default_retry_policy().clone(),
        };
        let timeout = selected.and_then(|s| s.timeout);
        let job = Job { conn, svc: &svc, policy: &policy, retry: &retry, endpoints: &endpoints };
        if is_upgrade(&req) && conn.version == AppHttp::Http1 {
            return self.upgrade(&job, req).await;
        }
        let run = self.send_with_retries(&job, req);
        match timeout {
            None => run.await,
            Some(t) => match tokio::time::timeout(t, run).await {
                Ok(r) => r,
                Err(_) => {
                    svc.timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(service = %format_args!("{ns}/{name}"), route = route_name, timeout = ?t, "request timed out");
                    (local(LocalReply::Timeout { service: format!("{ns}/{name}"), timeout: route::RouteDuration(t) }), None)
                }
            },
        }
    }

    async fn send_with_retries(&self, job: &Job<'_>, req: Request<Incoming>) -> (Response<RespBody>, Option<Destination>) {
        let (mut parts, body) = req.into_parts();
        let client_version = parts.version;
        prepare(&mut parts, job.conn);
        // Keep the body for retries when it is small and the method may be
        // retried at all; otherwise stream it through once.
        let len = body.size_hint().upper();
        let keep = job.retry.allows_method(&parts.method) && len.is_some_and(|l| l <= MAX_RETRY_BODY);
        let mut streamed = None;
        let fault = BodyFault::default();
        let kept = if keep {
            match body.collect().await {
                Ok(b) => Some(b.to_bytes()),
                Err(e) => return (reply::refuse(&Violation::Body(crate::error_chain(&e)), client_version, &job.conn.pod.stats, "outbound"), None),
            }
        } else {
            streamed = Some(ClientBody::new(body, fault.clone(), false));
            None
        };
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries = 0u32;
        let mut _retrying: Option<services::Gauge<'_>> = None;
        loop {
            // A retry prefers an endpoint not tried yet.
            let exclude: &[SocketAddr] = if tried.len() < job.endpoints.len() { &tried } else { &[] };
            let cursor = (job.policy.load_balancer == route::LoadBalancer::RoundRobin).then_some(&job.svc.cursor);
            let Some((dest, _in_use)) = self.outbound.balancer.pick(job.endpoints, exclude, cursor) else {
                return (local(LocalReply::NoEndpointLeft), None);
            };
            tried.push(dest.addr());
            let body: ReqBody = match (&kept, streamed.take()) {
                (Some(b), _) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
                (None, Some(s)) => s.boxed(),
                (None, None) => unreachable!("a streamed body is only sent once: retries need a kept body"),
            };
            let mut req = Request::from_parts(parts.clone(), body);
            *req.extensions_mut() = http::Extensions::new();
            let attempt = self.http_try(&job.conn.pod, &dest, job.conn.version, job.svc, &job.policy.circuit_breaker, req);
            let result = match job.retry.per_try_timeout {
                Some(t) => tokio::time::timeout(t.0, attempt).await.unwrap_or(Err(TryError::Reset(ResetCause::PerTryTimeout(t)))),
                None => attempt.await,
            };
            // The client's body broke under way: its fault, not the
            // endpoint's (no ejection, no retry, no 5xx).
            if result.is_err()
                && let Some(v) = fault.get()
            {
                return (reply::refuse(&v, client_version, &job.conn.pod.stats, "outbound"), Some(dest));
            }
            let (outcome, cause, reply) = match result {
                Ok(res) => {
                    let outcome = if res.status().is_server_error() { Outcome::ServerError } else { Outcome::Success };
                    (outcome, RetryOn::Status(u32::from(res.status().as_u16())), Ok(res))
                }
                Err(TryError::Overflow) => {
                    tracing::info!(endpoint = %dest.addr(), "circuit breaker: too many pending requests");
                    return (local(LocalReply::TooManyPending), Some(dest));
                }
                Err(TryError::Connect(source)) => {
                    tracing::info!(endpoint = %dest.addr(), error = %source, "upstream connect failed");
                    let r = LocalReply::ConnectFailure { endpoint: dest.addr(), source };
                    (Outcome::ConnectFailure, RetryOn::ConnectFailure, Err(r))
                }
                Err(TryError::Reset(cause)) => {
                    tracing::info!(endpoint = %dest.addr(), error = %cause, "upstream reset before the response");
                    let r = LocalReply::Reset { endpoint: dest.addr(), cause };
                    (Outcome::ConnectFailure, RetryOn::Reset, Err(r))
                }
            };
            if self.outbound.balancer.report(dest.addr(), outcome, &job.policy.outlier_detection, job.endpoints).is_some() {
                job.svc.ejections.fetch_add(1, Ordering::Relaxed);
            }
            let may_retry = kept.is_some()
                && retries < job.retry.attempts
                && job.retry.retries_on(cause)
                && job.retry.budget_allows(job.svc.active.load(Ordering::Relaxed), job.svc.retries_in_flight.load(Ordering::Relaxed));
            if !may_retry {
                let res = match reply {
                    Ok(mut res) => {
                        strip_hop_by_hop(res.headers_mut());
                        upstream_response(res, &dest)
                    }
                    Err(r) => local(r),
                };
                return (res, Some(dest));
            }
            drop(reply);
            job.svc.retries.fetch_add(1, Ordering::Relaxed);
            _retrying = Some(services::enter(&job.svc.retries_in_flight));
            tracing::debug!(endpoint = %dest.addr(), %cause, retry = retries + 1, "retrying");
            let pause: Duration = job.retry.backoff(retries, self.outbound.balancer.random() as u32);
            tokio::time::sleep(pause).await;
            retries += 1;
        }
    }
}

impl Proxy {
    /// An HTTP/1.1 `Upgrade` (WebSocket and the like): sent once, on a
    /// connection of its own; on `101` the two upgraded connections are
    /// joined and carry bytes until either side closes. No retries and no
    /// route timeout (the exchange is long-lived by nature).
    async fn upgrade(&self, job: &Job<'_>, mut req: Request<Incoming>) -> (Response<RespBody>, Option<Destination>) {
        let cursor = (job.policy.load_balancer == route::LoadBalancer::RoundRobin).then_some(&job.svc.cursor);
        let Some((dest, _in_use)) = self.outbound.balancer.pick(job.endpoints, &[], cursor) else {
            return (local(LocalReply::NoEndpointToUpgrade), None);
        };
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        prepare(&mut parts, job.conn);
        if let Some(p) = protocol {
            parts.headers.insert(header::UPGRADE, p);
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let io = match self.upstream_io(&job.conn.pod, &dest).await {
            Ok(io) => io,
            Err(source) => return (local(LocalReply::ConnectFailure { endpoint: dest.addr(), source }), Some(dest)),
        };
        let sent = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn.with_upgrades());
            sender.send_request(Request::from_parts(parts, body.boxed())).await
        };
        let mut res = match sent.await {
            Ok(r) => r,
            Err(source) => return (local(LocalReply::UpgradeFailed { endpoint: dest.addr(), source }), Some(dest)),
        };
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut res);
            self.inputs.connections.spawn(join_upgraded(downstream, upstream));
        }
        (upstream_response(res, &dest), Some(dest))
    }
}

struct Job<'a> {
    conn: &'a Conn,
    svc: &'a Arc<ServiceState>,
    policy: &'a route::ServicePolicy,
    retry: &'a route::RetryPolicy,
    endpoints: &'a [Destination],
}

/// Puts the request in the form of the application's HTTP version.
fn prepare(parts: &mut http::request::Parts, conn: &Conn) {
    strip_hop_by_hop(&mut parts.headers);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_else(|| conn.orig.to_string());
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match conn.version {
        AppHttp::Http1 => {
            if !parts.headers.contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(&authority)
            {
                parts.headers.insert(header::HOST, v);
            }
            parts.uri = http::Uri::from(pq);
            parts.version = http::Version::HTTP_11;
        }
        AppHttp::Http2 => {
            let mut p = http::uri::Parts::default();
            p.scheme = Some(parts.uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP));
            p.authority = authority.parse().ok();
            p.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(p) {
                parts.uri = uri;
            }
            // :authority carries it; a Host header that disagrees would be
            // refused by the destination.
            parts.headers.remove(header::HOST);
            parts.version = http::Version::HTTP_2;
        }
    }
}
