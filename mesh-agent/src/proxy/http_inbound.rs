//! Inbound HTTP: for a pod port declared HTTP (by a service's `appProtocol`
//! or port name), the destination agent terminates HTTP/1.1 or HTTP/2 (h2c)
//! on the stream it delivers, authorizes **each request** with the pod's
//! policies, and forwards the allowed ones to the app.
//!
//! - The request target is normalized first (`policy::normalize_path`); a
//!   target that cannot be normalized safely gets 400, and the request the
//!   app receives carries exactly the normalized target that was checked.
//! - Before that, the front door ([`validate`]) refuses with 400 what RFC
//!   9112 / 9110 / 9113 say a server must not guess at: two `Host` lines,
//!   no `Host` (HTTP/1.1), `Host` and `:authority` that disagree,
//!   `Content-Length` with `Transfer-Encoding`, a `#fragment`. Policies must
//!   see what the app sees. Malformed syntax and header blocks over 64 KiB
//!   are refused by hyper itself (400 / 431). All are counted
//!   (`httpRejected`) and never forwarded; a request body with broken
//!   framing is answered 400 too, not blamed on the app.
//! - Headers that claim an identity ([`super::http::validate::IDENTITY_HEADERS`]) are
//!   stripped from the client's request and its trailers; the verified peer
//!   identity goes to the app in `x-mesh-peer-identity` (absent for
//!   plaintext clients), before authorization, so a policy's `when` on the
//!   header sees what the app will.
//! - A denied request gets 403 with a short body naming the policy; it is
//!   logged and counted (`inboundDenied`), and the app never sees it.
//! - An `x-mesh-reply` the app sends (header or trailer) is removed: only
//!   the agent's own answers ([`super::reply`]) carry one.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    PodHandle, Proxy,
    connect::AppError,
    reply::{self, LocalReply},
};
use crate::{
    telemetry::trace::{SpanKind, attr},
    identity::SpiffeId,
    policy::{self, Connection, Peer, WorkloadPolicy},
    state::{AppHttp, Snapshot},
};

use super::http::{
    PEER_IDENTITY_HEADER, count_http_end, http_server, is_upgrade, join_upgraded,
    validate::{self, BodyFault, ClientBody, FrontDoor, Violation},
};

type Body = BoxBody<Bytes, hyper::Error>;

/// Connections from the agent to the apps of this node's pods, shared by
/// every downstream connection (an app sees a few keep-alive connections
/// from its agent rather than one per client connection): per (pod network
/// namespace, app address), one HTTP/2 connection for all requests, or
/// HTTP/1.1 connections carrying one request at a time that go back to an
/// idle list once the response has been read. Idle for
/// [`super::pool::IDLE_TIMEOUT`]: closed.
#[derive(Default)]
pub(super) struct AppConnections {
    h2: std::sync::Mutex<HashMap<AppKey, H2Sender>>,
    /// Idle connections, each with the time it went idle.
    h1: std::sync::Mutex<HashMap<AppKey, Vec<(H1Sender, Instant)>>>,
}

type H1Sender = hyper::client::conn::http1::SendRequest<ClientBody>;
type H2Sender = hyper::client::conn::http2::SendRequest<ClientBody>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AppKey {
    /// The pod's network ([`super::PodSockets::network`]): a pod re-created
    /// with the same address is another key.
    network: u64,
    target: SocketAddr,
}

impl AppConnections {
    /// Closes HTTP/1.1 connections idle for too long, and forgets closed
    /// HTTP/2 ones.
    pub fn reap(&self) {
        let now = Instant::now();
        self.h2.lock().expect("poisoned").retain(|_, s| !s.is_closed());
        let mut h1 = self.h1.lock().expect("poisoned");
        for list in h1.values_mut() {
            list.retain(|(s, since)| !s.is_closed() && now - *since < super::pool::IDLE_TIMEOUT);
        }
        h1.retain(|_, l| !l.is_empty());
    }

    /// Keys with a pooled connection (HTTP/2, HTTP/1.1).
    pub fn entries(&self) -> (usize, usize) {
        (self.h2.lock().expect("poisoned").len(), self.h1.lock().expect("poisoned").len())
    }

    fn idle_h1(&self, key: &AppKey) -> Option<H1Sender> {
        let mut h1 = self.h1.lock().expect("poisoned");
        let list = h1.get_mut(key)?;
        while let Some((s, _)) = list.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }
}

struct Conn {
    /// What the app speaks: requests are translated when the client spoke
    /// the other version.
    app: AppHttp,
    /// The client's address (a source pod's, for tunnel streams).
    client: SocketAddr,
    pod: Arc<PodHandle>,
    peer: Option<(SpiffeId, Peer)>,
    /// `x-mesh-peer-identity`'s value, formatted once.
    peer_header: Option<HeaderValue>,
    target: SocketAddr,
    /// The pod's compiled policy, for as long as the mesh state stays the
    /// same: requests skip the agent-wide policy cache.
    policy: std::sync::Mutex<Option<(Snapshot, Arc<WorkloadPolicy>)>>,
    series: super::observe::SeriesCache,
    door: FrontDoor,
}

impl Conn {
    fn policy(&self, proxy: &Proxy, snapshot: &Snapshot) -> Arc<WorkloadPolicy> {
        let mut cached = self.policy.lock().expect("poisoned");
        match &*cached {
            Some((s, p)) if Arc::ptr_eq(s, snapshot) => p.clone(),
            _ => {
                let p = proxy.inbound.authz.workload(snapshot, &self.pod.key);
                *cached = Some((snapshot.clone(), p.clone()));
                p
            }
        }
    }
}

impl Proxy {
    /// Serves HTTP on `io` (a tunnel stream or a captured plaintext
    /// connection) for `target` inside `pod`, until the client closes it.
    pub(super) async fn serve_http_inbound<IO>(
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
        let conn = Arc::new(Conn {
            app,
            client,
            pod,
            peer_header: peer.as_ref().and_then(|id| HeaderValue::from_str(&id.to_string()).ok()),
            peer: peer.map(|id| {
                let p = Peer::new(&id);
                (id, p)
            }),
            target,
            policy: std::sync::Mutex::new(None),
            series: super::observe::SeriesCache::default(),
            door,
        });
        let this = self.clone();
        let drain = super::http::DrainHttp::default();
        let svc_drain = drain.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let conn = conn.clone();
            let drain = svc_drain.clone();
            async move {
                let version = drain.saw(&req);
                let res = this.http_request(&conn, req).await;
                Ok::<_, Infallible>(drain.mark(&this.inputs.draining, version, res))
            }
        });
        let server = http_server();
        let conn = server.serve_connection_with_upgrades(TokioIo::new(io), svc);
        // Draining: `Connection: close` on the next response (HTTP/1.1) or
        // GOAWAY (HTTP/2); the client's next request finds the new agent.
        let result = super::until_drained(conn, &self.inputs.draining, |c| {
            if drain.is_h2() {
                c.graceful_shutdown();
            }
        })
        .await;
        count_http_end(result, &stats, target, "inbound");
    }

    /// Authorizes and forwards one request, and records its metrics, span
    /// and access log line.
    async fn http_request(&self, conn: &Conn, mut req: Request<Incoming>) -> Response<Body> {
        let start = std::time::Instant::now();
        let protocol = super::observe::protocol(req.headers());
        let request_bytes = hyper::body::Body::size_hint(req.body()).exact().unwrap_or(0);
        // The server span: child of the source agent's client span (or of
        // the plaintext client's context); the app sees it as its parent.
        let tracer = &self.inputs.telemetry.tracer;
        let parent = tracer.extract(req.headers());
        let mut span = tracer.start_span(SpanKind::Server, "inbound", parent.as_ref());
        span.inject(req.headers_mut());
        let mut info = super::observe::RequestInfo::of(&req, &span);
        info.upstream = Some(conn.target);
        let (res, decision) = self.authorize_and_forward(conn, req).await;
        info.decision = decision;
        let snapshot = self.inputs.state.borrow().clone();
        let code = res.status().as_u16();
        let flags = reply::flags(&res);
        let series = conn.series.get(&self.inputs.telemetry.metrics, &snapshot, (None, protocol, code, flags), || {
            super::observe::Parties {
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
        let telemetry = self.inputs.telemetry.clone();
        res.map(|b| super::observe::Recorded::new(b, telemetry, series, info, start, request_bytes).boxed())
    }

    /// The response, and the policy decision when one was made.
    async fn authorize_and_forward(&self, conn: &Conn, mut req: Request<Incoming>) -> (Response<Body>, Option<(&'static str, Option<String>)>) {
        let pod = &conn.pod;
        if let Err(v) = conn.door.check(&req) {
            return (reply::refuse(&v, req.version(), &pod.stats, "inbound"), None);
        }
        // What the app will see of who the client is, before the policy
        // looks: only the verified peer speaks for it.
        validate::strip_identity(req.headers_mut());
        if let Some(v) = &conn.peer_header {
            req.headers_mut().insert(PEER_IDENTITY_HEADER, v.clone());
        }
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let path = match policy::normalize_path(target) {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(pod = %pod.key, %target, error = %e, "request refused: unsafe request target");
                return (reply::refuse(&Violation::Target(e.to_string()), req.version(), &pod.stats, "inbound"), None);
            }
        };
        let rewritten = path.as_str() != target;
        // The front door made sure Host and :authority agree.
        let host_header = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
        let authority = req.uri().authority().map(http::uri::Authority::as_str);
        let host = authority.or(host_header).unwrap_or_default();
        let snapshot = self.inputs.state.borrow().clone();
        let wp = conn.policy(self, &snapshot);
        let c = Connection { peer: conn.peer.as_ref().map(|(_, p)| p), port: conn.target.port() };
        let d = wp.check_http(&c, &policy::Request { method: req.method().as_str(), path: &path, host, headers: req.headers() });
        if !d.allowed {
            let name = d.policy.unwrap_or("(default deny)").to_owned();
            *pod.stats.inbound_denied.lock().expect("poisoned").entry(name.clone()).or_default() += 1;
            let who = conn.peer.as_ref().map(|(id, _)| id.to_string()).unwrap_or_else(|| "plaintext client".into());
            tracing::info!(pod = %pod.key, peer = %who, method = %req.method(), path = path.as_str(), policy = %name, "request denied by authorization policy");
            let r = reply::respond(&LocalReply::Denied { decision: d.to_string() }, req.version());
            return (r, Some(("deny", Some(name))));
        }
        let allowed = Some(("allow", d.policy.map(str::to_owned)));
        // Forward exactly what was checked.
        if rewritten {
            match http::uri::PathAndQuery::try_from(path.as_str()) {
                Ok(pq) => {
                    let mut parts = req.uri().clone().into_parts();
                    parts.path_and_query = Some(pq);
                    if let Ok(uri) = http::Uri::from_parts(parts) {
                        *req.uri_mut() = uri;
                    }
                }
                Err(e) => return (reply::refuse(&Violation::Target(e.to_string()), req.version(), &pod.stats, "inbound"), None),
            }
        }
        let downstream = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let version = req.version();
        let fault = BodyFault::default();
        let req = req.map(|b| ClientBody::new(b, fault.clone(), true));
        let res = match self.forward(conn, req).await {
            Ok(mut res) => {
                if let Some(down) = downstream
                    && res.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let up = hyper::upgrade::on(&mut res);
                    self.inputs.connections.spawn(join_upgraded(down, up));
                }
                reply::from_app(res).map(|b| b.boxed())
            }
            // The client's body broke (bad chunk syntax, or it went away):
            // the app is not to blame.
            Err(source) => match fault.get() {
                Some(v) => reply::refuse(&v, version, &pod.stats, "inbound"),
                None => {
                    tracing::info!(pod = %pod.key, target = %conn.target, error = %source, "the application did not answer");
                    reply::respond(&LocalReply::AppUnavailable { target: conn.target, source }, version)
                }
            },
        };
        (res, allowed)
    }

    async fn forward(&self, conn: &Conn, mut req: Request<ClientBody>) -> Result<Response<Incoming>, AppError> {
        let h2 = conn.app == AppHttp::Http2;
        if !h2 {
            // To HTTP/1.1: origin-form target and a Host header.
            if let Some(a) = req.uri().authority().cloned()
                && !req.headers().contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            if req.uri().scheme().is_some()
                && let Some(pq) = req.uri().path_and_query().cloned()
            {
                *req.uri_mut() = http::Uri::from(pq);
            }
            *req.version_mut() = http::Version::HTTP_11;
        } else {
            *req.version_mut() = http::Version::HTTP_2;
        }
        let key = AppKey { network: conn.pod.sockets.network(), target: conn.target };
        let apps = &self.inbound.app_connections;
        if h2 {
            let existing = apps.h2.lock().expect("poisoned").get(&key).filter(|s| !s.is_closed()).cloned();
            let mut s = match existing {
                Some(s) => s,
                None => {
                    let (tcp, slot) = self.connect_app(&conn.pod, conn.target).await?;
                    let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
                    tokio::spawn(async move {
                        let _slot = slot;
                        let _ = c.await;
                    });
                    apps.h2.lock().expect("poisoned").insert(key, s.clone());
                    s
                }
            };
            // HTTP/2 to the app: the URI carries scheme and authority.
            if req.uri().scheme().is_none() {
                let mut parts = req.uri().clone().into_parts();
                parts.scheme = Some(http::uri::Scheme::HTTP);
                parts.authority = parts.authority.or_else(|| conn.target.to_string().parse().ok());
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
            s.ready().await?;
            return Ok(s.send_request(req).await?);
        }
        let mut s = match apps.idle_h1(&key) {
            Some(s) => s,
            None => {
                let (tcp, slot) = self.connect_app(&conn.pod, conn.target).await?;
                let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = c.with_upgrades().await;
                });
                s
            }
        };
        let res = s.send_request(req).await?;
        // Back to the idle list once the response has been read (an
        // upgraded connection never is: it belongs to its client).
        let this = self.self_arc();
        tokio::spawn(async move {
            if s.ready().await.is_ok() {
                this.inbound.app_connections.h1.lock().expect("poisoned").entry(key).or_default().push((s, Instant::now()));
            }
        });
        Ok(res)
    }
}

#[cfg(test)]
mod tests;
