//! Inbound HTTP: for a pod port declared HTTP (by a service's `appProtocol`
//! or port name), the destination agent terminates HTTP/1.1 or HTTP/2 (h2c)
//! on the stream it delivers, authorizes **each request** with the pod's
//! policies, and forwards the allowed ones to the app. Each concern is one
//! layer of the connection's stack ([`Inbound::stack`], top to bottom):
//!
//! | layer | what it does |
//! | --- | --- |
//! | [`Telemetry`] | server span, metrics, access log (with the policy decision) |
//! | [`CheckFrontDoor`] | 400 for what RFC 9112 / 9110 / 9113 say a server must not guess at: two `Host` lines, no `Host` (HTTP/1.1), `Host` and `:authority` that disagree, `Content-Length` with `Transfer-Encoding`, a `#fragment` |
//! | [`Normalize`] | the target normalized (`policy::normalize_path`), 400 when it cannot be safely; the app receives exactly the target that was checked |
//! | [`IdentityHeader`] | identity-claiming headers ([`super::http::validate::IDENTITY_HEADERS`]) stripped from the request and its trailers; the verified peer in `x-mesh-peer-identity` (absent for plaintext clients) |
//! | [`Authorize`] | the pod's policies on the request: 403 naming the policy, logged and counted (`inboundDenied`); the app never sees it |
//! | [`app::App`] | the request to the app in its HTTP version; its `x-mesh-reply` (header or trailer) removed: only the agents' own answers ([`super::reply`]) carry one |
//!
//! Malformed syntax and header blocks over 64 KiB are refused by hyper
//! itself (400 / 431). All refusals are counted (`httpRejected`) and never
//! forwarded; a request body with broken framing is answered 400 too, not
//! blamed on the app.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceBuilder;

use super::{
    Inbound, PodHandle,
    front_door::CheckFrontDoor,
    http::{
        HttpFuture, HttpService, PEER_IDENTITY_HEADER, RespBody, ready,
        validate::{self, FrontDoor, Violation},
    },
    observe::{Parties, Recorded, RequestInfo, SeriesCache},
    reply::{self, LocalReply},
};
use crate::{
    identity::SpiffeId,
    policy::{self, Peer, WorkloadPolicy},
    state::{AppHttp, Snapshot},
    telemetry::trace::{SpanKind, attr},
};

mod app;

pub(super) use app::AppConnections;

/// One downstream connection: what its layers share.
struct Conn {
    /// What the app speaks: requests are translated when the client spoke
    /// the other version.
    app: AppHttp,
    /// The client's address (a source pod's, for tunnel streams).
    client: SocketAddr,
    pod: Arc<PodHandle>,
    peer: Option<(SpiffeId, Peer)>,
    target: SocketAddr,
}

/// The policy decision on a request, `allow` / `deny` and the deciding
/// policy (a response extension, for [`Telemetry`]).
#[derive(Clone)]
struct Decision(&'static str, Option<String>);

impl Inbound {
    /// Serves HTTP on `io` (a tunnel stream or a captured plaintext
    /// connection) for `target` inside `pod`, until the client closes it.
    pub(super) async fn serve_http<IO>(
        self: Arc<Self>,
        io: IO,
        pod: Arc<PodHandle>,
        client: SocketAddr,
        peer: Option<SpiffeId>,
        target: SocketAddr,
        app: AppHttp,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stats = pod.stats.clone();
        let door = FrontDoor::default();
        let io = door.inspect(io);
        let peer_header = peer.as_ref().and_then(|id| HeaderValue::from_str(&id.to_string()).ok());
        let conn = Arc::new(Conn {
            app,
            client,
            pod,
            peer: peer.map(|id| {
                let p = Peer::new(&id);
                (id, p)
            }),
            target,
        });
        let stack = self.stack(conn, door, peer_header);
        super::http::serve(io, stack, &self.inputs.draining, &stats, target, "inbound").await;
    }

    /// The layers every request of one connection goes through, top to
    /// bottom (the module doc says what each does).
    fn stack(self: &Arc<Self>, conn: Arc<Conn>, door: FrontDoor, peer_header: Option<HeaderValue>) -> impl HttpService {
        ServiceBuilder::new()
            // Outermost: it sees what the client gets, refusals included.
            .layer(Telemetry::layer(self.clone(), conn.clone()))
            // Before anything reads the request: what it says must be unambiguous.
            .layer(CheckFrontDoor::layer(door, conn.pod.stats.clone(), "inbound"))
            // Policies and the app must read the same target.
            .layer(Normalize::layer(conn.clone()))
            // Before authorization, so that a policy's `when` on the header
            // sees what the app will; only the verified peer speaks for it.
            .layer(IdentityHeader::layer(peer_header))
            // Last before the app: it decides on the request as delivered.
            .layer(Authorize::layer(self.clone(), conn.clone()))
            .service(app::App { inbound: self.clone(), conn })
    }
}

/// The server span, the request's metric series and its access log line
/// (with the policy decision), recorded once the response body ends; the
/// series cache is per connection.
#[derive(Clone)]
struct Telemetry<S> {
    inbound: Arc<Inbound>,
    conn: Arc<Conn>,
    series: Arc<SeriesCache>,
    inner: S,
}

impl<S> Telemetry<S> {
    fn layer(inbound: Arc<Inbound>, conn: Arc<Conn>) -> impl tower::Layer<S, Service = Self> {
        let series = Arc::new(SeriesCache::default());
        tower::layer::layer_fn(move |inner| Telemetry { inbound: inbound.clone(), conn: conn.clone(), series: series.clone(), inner })
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
        let request_bytes = hyper::body::Body::size_hint(req.body()).exact().unwrap_or(0);
        // The server span: child of the source agent's client span (or
        // of the plaintext client's context); the app sees it as its
        // parent.
        let tracer = &self.inbound.inputs.telemetry.tracer;
        let parent = tracer.extract(req.headers());
        let mut span = tracer.start_span(SpanKind::Server, "inbound", parent.as_ref());
        span.inject(req.headers_mut());
        let mut info = RequestInfo::of(&req, &span);
        info.upstream = Some(self.conn.target);
        let run = self.inner.call(req);
        let (inbound, conn, series) = (self.inbound.clone(), self.conn.clone(), self.series.clone());
        Box::pin(async move {
            let inputs = &inbound.inputs;
            let mut res = run.await?;
            // Taken, not copied: nothing after this layer reads it.
            info.decision = res.extensions_mut().remove::<Decision>().map(|d| (d.0, d.1));
            let snapshot = inputs.state.borrow().clone();
            let code = res.status().as_u16();
            let flags = reply::flags(&res);
            let series = series.get(&inputs.telemetry.metrics, &snapshot, (None, protocol, code, flags), || {
                Parties {
                    state: &snapshot,
                    reporter: "destination",
                    src_pod: None,
                    src_ip: Some(conn.client.ip().to_canonical()),
                    src_id: conn.peer.as_ref().map(|(id, _)| id),
                    dst_pod: Some(&conn.pod.key),
                    dst_addr: Some(conn.target),
                    service: None,
                    mtls: conn.peer.is_some(),
                }
                .labels(protocol)
            });
            if span.is_recording() {
                span.set_attribute(attr::HTTP_REQUEST_METHOD, info.method.clone());
                span.set_attribute(attr::URL_PATH, info.path.clone());
                span.set_attribute(attr::HTTP_RESPONSE_STATUS_CODE, code);
                span.set_attribute(attr::MESH_DESTINATION_WORKLOAD, conn.pod.key.to_string());
                if let Some((id, _)) = &conn.peer {
                    span.set_attribute(attr::MESH_PEER_PRINCIPAL, id.to_string());
                }
                span.set_attribute(attr::MESH_MTLS, conn.peer.is_some());
                if let Some((d, p)) = &info.decision {
                    span.set_attribute(attr::MESH_POLICY_DECISION, *d);
                    if let Some(p) = p {
                        span.set_attribute(attr::MESH_POLICY_NAME, p.clone());
                    }
                }
            }
            span.end();
            let telemetry = inputs.telemetry.clone();
            Ok(res.map(|b| Recorded::new(b, telemetry, series, info, start, request_bytes).boxed()))
        })
    }
}

/// Puts the request target in normal form, rewriting the request when
/// normalization changed it; 400 for a target that cannot be normalized
/// safely.
#[derive(Clone)]
struct Normalize<S> {
    conn: Arc<Conn>,
    inner: S,
}

impl<S> Normalize<S> {
    fn layer(conn: Arc<Conn>) -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(move |inner| Normalize { conn: conn.clone(), inner })
    }

    /// The refusal is boxed: a response is large, and the way through
    /// should not pay for moving one.
    fn normalize(&self, req: &mut Request<Incoming>) -> Result<(), Box<Response<RespBody>>> {
        let (pod, version) = (&self.conn.pod, req.version());
        let refuse = |e: String| Box::new(reply::refuse(&Violation::Target(e), version, &pod.stats, "inbound"));
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let path = match policy::normalize_path(target) {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(pod = %pod.key, %target, error = %e, "request refused: unsafe request target");
                return Err(refuse(e.to_string()));
            }
        };
        if path.is_rewritten() {
            let pq = http::uri::PathAndQuery::try_from(path.as_str()).map_err(|e| refuse(e.to_string()))?;
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq);
            *req.uri_mut() = http::Uri::from_parts(parts).map_err(|e| refuse(e.to_string()))?;
        }
        Ok(())
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for Normalize<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, mut req: Request<Incoming>) -> HttpFuture {
        match self.normalize(&mut req) {
            Ok(()) => self.inner.call(req),
            Err(res) => Box::pin(async move { Ok(*res) }),
        }
    }
}

/// What the app is told of who the client is: only the verified peer.
#[derive(Clone)]
struct IdentityHeader<S> {
    /// `x-mesh-peer-identity`'s value, formatted once per connection.
    peer: Option<HeaderValue>,
    inner: S,
}

impl<S> IdentityHeader<S> {
    fn layer(peer: Option<HeaderValue>) -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(move |inner| IdentityHeader { peer: peer.clone(), inner })
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for IdentityHeader<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, mut req: Request<Incoming>) -> HttpFuture {
        validate::strip_identity(req.headers_mut());
        if let Some(v) = &self.peer {
            req.headers_mut().insert(PEER_IDENTITY_HEADER, v.clone());
        }
        self.inner.call(req)
    }
}

/// The compiled policy of the pod, and the state it was compiled from.
type PolicyCache = Mutex<Option<(Snapshot, Arc<WorkloadPolicy>)>>;

/// The pod's policies on each request. The compiled policy is kept per
/// connection for as long as the mesh state stays the same, so requests
/// skip the agent-wide cache.
#[derive(Clone)]
struct Authorize<S> {
    inbound: Arc<Inbound>,
    conn: Arc<Conn>,
    policy: Arc<PolicyCache>,
    inner: S,
}

impl<S> Authorize<S> {
    fn layer(inbound: Arc<Inbound>, conn: Arc<Conn>) -> impl tower::Layer<S, Service = Self> {
        let policy = Arc::new(Mutex::new(None));
        tower::layer::layer_fn(move |inner| Authorize { inbound: inbound.clone(), conn: conn.clone(), policy: policy.clone(), inner })
    }

    fn policy(&self, snapshot: &Snapshot) -> Arc<WorkloadPolicy> {
        let mut cached = self.policy.lock().expect("poisoned");
        match &*cached {
            Some((s, p)) if Arc::ptr_eq(s, snapshot) => p.clone(),
            _ => {
                let p = self.inbound.authz.workload(snapshot, &self.conn.pod.key);
                *cached = Some((snapshot.clone(), p.clone()));
                p
            }
        }
    }

    /// The decision, and the 403 when it denies.
    fn check(&self, req: &Request<Incoming>) -> (Decision, Option<Response<RespBody>>) {
        let (pod, conn) = (&self.conn.pod, &self.conn);
        // [`Normalize`] rewrote the target: in normal form already, it
        // comes back borrowed, as the app receives it. Fail closed if not.
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let path = match policy::normalize_path(target) {
            Ok(p) if !p.is_rewritten() => p,
            _ => {
                let r = reply::respond(&LocalReply::Denied { decision: "the request target is not in normal form".into() }, req.version());
                return (Decision("deny", None), Some(r));
            }
        };
        // The front door made sure Host and :authority agree.
        let host_header = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
        let authority = req.uri().authority().map(http::uri::Authority::as_str);
        let host = authority.or(host_header).unwrap_or_default();
        let snapshot = self.inbound.inputs.state.borrow().clone();
        let wp = self.policy(&snapshot);
        let c = super::authz::connection(conn.peer.as_ref().map(|(_, p)| p), conn.client, conn.target);
        let d = wp.check_http(&c, &policy::Request { method: req.method().as_str(), path: &path, host, headers: req.headers() });
        if let Some(audit) = d.audit {
            tracing::info!(pod = %pod.key, method = %req.method(), path = path.as_str(), %audit, allowed = d.allowed, "request audited by authorization policy");
        }
        if d.allowed {
            return (Decision("allow", d.policy.map(str::to_owned)), None);
        }
        let name = d.policy.unwrap_or("(default deny)").to_owned();
        *pod.stats.inbound_denied.lock().expect("poisoned").entry(name.clone()).or_default() += 1;
        let who = conn.peer.as_ref().map(|(id, _)| id.to_string()).unwrap_or_else(|| "plaintext client".into());
        tracing::info!(pod = %pod.key, peer = %who, method = %req.method(), path = path.as_str(), policy = %name, "request denied by authorization policy");
        let r = reply::respond(&LocalReply::Denied { decision: d.to_string() }, req.version());
        (Decision("deny", Some(name)), Some(r))
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for Authorize<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, req: Request<Incoming>) -> HttpFuture {
        let (decision, denied) = self.check(&req);
        if let Some(mut res) = denied {
            res.extensions_mut().insert(decision);
            return Box::pin(async move { Ok(res) });
        }
        let run = self.inner.call(req);
        Box::pin(async move {
            let mut res = run.await?;
            res.extensions_mut().insert(decision);
            Ok(res)
        })
    }
}

#[cfg(test)]
mod tests;
