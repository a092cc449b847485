//! The HTTP servers' front door with real bytes: a [`Proxy`] in-process,
//! its inbound (and outbound) HTTP server on a loopback socket, an app that
//! records what reaches it. The pod's sockets are plain loopback ones
//! ([`Loopback`]), so connecting to the app needs no pod and no root.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::super::{Loopback, PodHandle, PodStats, Ports, Proxy, observe::Telemetry};
use crate::{
    access_log::AccessLog,
    identity::{Authority, CertManager, LocalCaClient, ManagerConfig, SpiffeId, testing},
    metrics::Metrics,
    state::{AppHttp, MeshState},
    telemetry::trace::Tracer,
};

const MESH: &str = r#"
nodes: [{name: node-a}]
namespaces:
  - name: shop
    labels: {nodemesh.io/dataplane-mode: enabled}
pods:
  - {name: web, namespace: shop, node: node-a, serviceAccount: web, labels: {app: web}, ip: 198.51.100.11, netns: /proc/self/ns/net, cgroup: /sys/fs/cgroup/web}
  - {name: cart, namespace: shop, node: node-a, serviceAccount: cart, labels: {app: cart}, ip: 198.51.100.12, netns: /proc/self/ns/net, cgroup: /sys/fs/cgroup/cart}
authorizationPolicies:
  - name: deny-admin-host
    namespace: shop
    selector: {app: web}
    action: DENY
    rules:
      - to: [{hosts: ["admin.shop"]}]
"#;

/// What the app received.
#[derive(Debug)]
struct Seen {
    uri: String,
    headers: HeaderMap,
    trailers: Option<HeaderMap>,
}

/// An app on loopback speaking `version`; every request it gets is sent on.
async fn app(version: AppHttp) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let collected = body.collect().await;
                    let trailers = collected.ok().and_then(|c| c.trailers().cloned());
                    let _ = tx.send(Seen { uri: parts.uri.to_string(), headers: parts.headers, trailers });
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            let io = TokioIo::new(s);
            tokio::spawn(async move {
                let _ = match version {
                    AppHttp::Http1 => hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await.map_err(|e| e.to_string()),
                    AppHttp::Http2 => hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                        .map_err(|e| e.to_string()),
                };
            });
        }
    });
    (addr, rx)
}

struct Mesh {
    proxy: Arc<Proxy>,
    pod: Arc<PodHandle>,
    metrics: Arc<Metrics>,
    _state: tokio::sync::watch::Sender<crate::state::Snapshot>,
    _dir: testing::TempDir,
    log: std::path::PathBuf,
}

fn mesh(edit: impl FnOnce(&mut MeshState)) -> Mesh {
    let mut state = crate::localfile::parse(Path::new("tests.rs"), MESH).expect("the fixture parses");
    edit(&mut state);
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(state));
    let ca = Arc::new(Authority::in_memory().unwrap());
    let web = testing::id("shop", "web");
    let cert = ca.mint(&web, Duration::from_secs(3600)).unwrap();
    let (_cert_tx, cert) = testing::cert_watch(cert);
    std::mem::forget(_cert_tx);
    let certs = CertManager::new(Arc::new(LocalCaClient::new(ca, "node-a", rx.clone())), ManagerConfig::default());
    let metrics = Arc::new(Metrics::default());
    let dir = testing::TempDir::new("front-door");
    let log = dir.path().join("access.log");
    let access_log = Arc::new(AccessLog::start(&crate::access_log::Target::File(log.clone())).unwrap());
    let telemetry = Arc::new(Telemetry { metrics: metrics.clone(), access_log, tracer: Tracer::disabled() });
    struct NoOrigDst;
    impl super::super::OrigDstLookup for NoOrigDst {
        fn take(&self, _: SocketAddr) -> Option<SocketAddr> {
            None
        }
    }
    let proxy = Proxy::new(rx, Arc::new(NoOrigDst), certs, Arc::default(), Ports::default(), tokio::runtime::Handle::current(), telemetry);
    let pod = Arc::new(PodHandle {
        key: testing::pod("shop", "web"),
        id: web,
        ips: vec!["198.51.100.11".parse().unwrap()],
        sockets: Arc::new(Loopback::new("127.0.0.1".parse().unwrap())),
        stats: Arc::new(PodStats::default()),
        cert,
    });
    Mesh { proxy, pod, metrics, _state: tx, _dir: dir, log }
}

impl Mesh {
    /// The pod's inbound HTTP server for `app` on a loopback listener; each
    /// connection as from `client`, with `peer` as its verified identity.
    async fn inbound(&self, app: SocketAddr, version: AppHttp, client: SocketAddr, peer: Option<SpiffeId>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (proxy, pod) = (self.proxy.clone(), self.pod.clone());
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(proxy.inbound.clone().serve_http(s, pod.clone(), client, peer.clone(), app, version));
            }
        });
        addr
    }

    /// The pod's outbound HTTP server, as if the pod dialled `orig`.
    async fn outbound(&self, orig: SocketAddr, version: AppHttp) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (proxy, pod) = (self.proxy.clone(), self.pod.clone());
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(proxy.outbound.clone().serve_http(s, pod.clone(), orig, version));
            }
        });
        addr
    }

    fn rejected(&self) -> u64 {
        self.pod.stats.http_rejected.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One HTTP/1 response off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A raw client: writes bytes, reads responses (Content-Length framed, as
/// the agent's and the app's are).
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self { s: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// The next response, or `None` once the server closed.
    async fn reply(&mut self) -> Option<Reply> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = res.parse(&self.buf).unwrap() {
                let headers: Vec<(String, String)> =
                    res.headers.iter().map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned())).collect();
                let status = res.code.unwrap();
                let len: usize = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("content-length")).map_or(0, |(_, v)| v.parse().unwrap());
                while self.buf.len() < n + len {
                    self.fill().await.then_some(())?;
                }
                self.buf.drain(..n + len);
                return Some(Reply { status, headers });
            }
            self.fill().await.then_some(())?;
        }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0; 4096];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }
}

const PLAIN: &str = "203.0.113.9:40000";

/// Sends `bytes` on a fresh connection; the first reply.
async fn once(at: SocketAddr, bytes: &[u8]) -> Reply {
    let mut c = Raw::connect(at).await;
    c.send(bytes).await;
    c.reply().await.expect("a reply")
}

fn assert_bad_request(r: &Reply, what: &str) {
    assert_eq!(r.status, 400, "{what}: {r:?}");
    assert_eq!(r.header("x-mesh-reply"), Some("bad-request"), "{what}: a typed local reply");
}

/// Ambiguous HTTP/1.1 heads: each refused with 400 before authorization,
/// counted, never forwarded; the same connection's well-formed requests
/// (and fresh connections') still pass.
#[tokio::test]
async fn inbound_http1_front_door_refuses_ambiguous_requests() {
    let m = mesh(|_| {});
    let (app, mut seen) = app(AppHttp::Http1).await;
    let at = m.inbound(app, AppHttp::Http1, PLAIN.parse().unwrap(), None).await;
    let cases: [(&str, &[u8]); 6] = [
        ("two Host lines", b"GET / HTTP/1.1\r\nHost: ok.shop\r\nHost: admin.shop\r\n\r\n"),
        ("two Host lines, DENY host second", b"GET / HTTP/1.1\r\nHost: admin.shop\r\nHost: ok.shop\r\n\r\n"),
        ("no Host", b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"),
        ("Content-Length and Transfer-Encoding", b"POST / HTTP/1.1\r\nHost: ok.shop\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("Transfer-Encoding then Content-Length", b"POST / HTTP/1.1\r\nHost: ok.shop\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ("a fragment", b"GET /public#/../admin HTTP/1.1\r\nHost: ok.shop\r\n\r\n"),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let r = once(at, bytes).await;
        assert_bad_request(&r, what);
        assert_eq!(m.rejected(), i as u64 + 1, "{what}: counted");
    }
    let fragment_query = once(at, b"GET /a?x=1#frag HTTP/1.1\r\nHost: ok.shop\r\n\r\n").await;
    assert_bad_request(&fragment_query, "a fragment after the query");
    // Framing doubts close the connection after the 400.
    let mut c = Raw::connect(at).await;
    c.send(b"POST / HTTP/1.1\r\nHost: ok.shop\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: ok.shop\r\n\r\n").await;
    let r = c.reply().await.unwrap();
    assert_bad_request(&r, "CL+TE, pipelined");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.reply().await.is_none(), "nothing after a CL+TE request is served");
    assert!(seen.try_recv().is_err(), "the app saw none of them");

    // Well-formed requests, pipelined with bodies of both framings, pass.
    let mut c = Raw::connect(at).await;
    c.send(b"POST /one HTTP/1.1\r\nHost: ok.shop\r\nContent-Length: 4\r\n\r\nGET POST /two HTTP/1.1\r\nHost: ok.shop\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nGET \r\n0\r\n\r\nGET /three HTTP/1.1\r\nhost: OK.shop\r\n\r\n").await;
    for path in ["/one", "/two", "/three"] {
        let r = c.reply().await.unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(seen.recv().await.unwrap().uri, path);
    }
    // HTTP/1.0 may omit Host.
    assert_eq!(once(at, b"GET /old HTTP/1.0\r\n\r\n").await.status, 200);
    // One Host naming the denied host is denied by policy (not refused).
    assert_eq!(once(at, b"GET / HTTP/1.1\r\nHost: admin.shop\r\n\r\n").await.status, 403);
    assert_eq!(m.rejected(), 8, "only the refused ones are counted");
}

/// A request body with broken chunk syntax is the client's fault: 400,
/// counted as rejected, not a 503 from the app.
#[tokio::test]
async fn inbound_bad_chunk_is_the_clients_fault() {
    let m = mesh(|_| {});
    let (app, _seen) = app(AppHttp::Http1).await;
    let at = m.inbound(app, AppHttp::Http1, PLAIN.parse().unwrap(), None).await;
    let r = once(at, b"POST /upload HTTP/1.1\r\nHost: ok.shop\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\nzz\r\n").await;
    assert_bad_request(&r, "bad chunk size");
    assert_eq!(m.rejected(), 1);
    let text = m.metrics.encode();
    assert!(!text.lines().any(|l| l.starts_with("istio_requests_total") && l.contains("response_code=\"503\"")), "no 503 recorded:\n{text}");
}

/// Identity headers from the client never reach the app (any case, `_` for
/// `-`, in headers or chunked trailers); the verified peer's does.
#[tokio::test]
async fn inbound_identity_headers_come_only_from_the_verified_peer() {
    let m = mesh(|_| {});
    let (app, mut seen) = app(AppHttp::Http1).await;
    let forged = "spiffe://cluster.local/ns/shop/sa/admin";
    let request = format!(
        "POST / HTTP/1.1\r\nHost: ok.shop\r\nX-Mesh-Peer-Identity: {forged}\r\nx_mesh_peer_identity: {forged}\r\nX-Forwarded-Client-Cert: By=x\r\nx-envoy-peer-metadata: e30=\r\nx_spiffe_id: {forged}\r\nx-ssl-client-cert: x\r\nx-client-cert: x\r\nx-istio-attributes: x\r\nx-envoy-peer-metadata-id: x\r\nx-other: kept\r\nTrailer: x-mesh-peer-identity, x_mesh_peer_identity, x-checksum\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-mesh-peer-identity: {forged}\r\nx_mesh_peer_identity: {forged}\r\nx-checksum: 1\r\n\r\n"
    );
    let plain = m.inbound(app, AppHttp::Http1, PLAIN.parse().unwrap(), None).await;
    assert_eq!(once(plain, request.as_bytes()).await.status, 200);
    let got = seen.recv().await.unwrap();
    for name in got.headers.keys() {
        assert!(!super::super::http::validate::is_identity_header(name), "{name} reached the app: {:?}", got.headers);
    }
    assert_eq!(got.headers.get("x-other").unwrap(), "kept");
    let trailers = got.trailers.expect("trailers forwarded");
    assert_eq!(trailers.get("x-checksum").unwrap(), "1", "other trailers pass: {trailers:?}");
    assert!(trailers.keys().all(|n| !super::super::http::validate::is_identity_header(n)), "{trailers:?}");

    let verified = m.inbound(app, AppHttp::Http1, "198.51.100.12:40000".parse().unwrap(), Some(testing::id("shop", "cart"))).await;
    assert_eq!(once(verified, request.as_bytes()).await.status, 200);
    let got = seen.recv().await.unwrap();
    let ids: Vec<_> = got.headers.get_all("x-mesh-peer-identity").iter().collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/shop/sa/cart"], "exactly the verified peer");
}

/// HTTP/2: `:authority` and `host` must agree, one `host` at most; trailers
/// lose identity headers too.
#[tokio::test]
async fn inbound_http2_front_door() {
    let m = mesh(|_| {});
    let (app, mut seen) = app(AppHttp::Http2).await;
    let at = m.inbound(app, AppHttp::Http2, PLAIN.parse().unwrap(), None).await;
    let tcp = TcpStream::connect(at).await.unwrap();
    let (mut client, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    type B = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
    async fn send(c: &mut hyper::client::conn::http2::SendRequest<B>, hosts: &[&str], trailers: Option<HeaderMap>) -> Response<Incoming> {
        let mut b = Request::post("http://ok.shop/x");
        for h in hosts {
            b = b.header(http::header::HOST, *h);
        }
        let frames = [Ok(hyper::body::Frame::data(Bytes::from_static(b"hi")))].into_iter().chain(trailers.map(|t| Ok(hyper::body::Frame::trailers(t))));
        let body: B = http_body_util::StreamBody::new(futures::stream::iter(frames.collect::<Vec<_>>())).boxed();
        c.ready().await.unwrap();
        c.send_request(b.body(body).unwrap()).await.unwrap()
    }
    for (what, hosts) in [("host disagrees with :authority", &["admin.shop"][..]), ("two host", &["ok.shop", "ok.shop"][..])] {
        let r = send(&mut client, hosts, None).await;
        assert_eq!(r.status(), 400, "{what}");
        assert_eq!(r.headers().get("x-mesh-reply").unwrap(), "bad-request", "{what}");
    }
    assert_eq!(m.rejected(), 2);
    let mut t = HeaderMap::new();
    t.insert("x_mesh_peer_identity", "spiffe://cluster.local/ns/shop/sa/admin".parse().unwrap());
    t.insert("grpc-status", "0".parse().unwrap());
    let r = send(&mut client, &["ok.shop"], Some(t)).await;
    assert_eq!(r.status(), 200);
    let got = seen.recv().await.unwrap();
    let trailers = got.trailers.expect("trailers forwarded");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert!(trailers.keys().all(|n| !super::super::http::validate::is_identity_header(n)), "{trailers:?}");
}

/// The source agent's server has the same front door: refused before
/// routing (the service address here has no route, no endpoint).
#[tokio::test]
async fn outbound_front_door_refuses_before_routing() {
    let m = mesh(|_| {});
    let at = m.outbound("10.96.0.10:80".parse().unwrap(), AppHttp::Http1).await;
    for (what, bytes) in [
        ("two Host lines", &b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"[..]),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n"),
        ("CL+TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("fragment", b"GET /#x HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("Host against the absolute target", b"GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n"),
    ] {
        assert_bad_request(&once(at, bytes).await, what);
    }
    assert_eq!(m.rejected(), 5);
    let r = once(at, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!((r.status, r.header("x-mesh-reply")), (503, Some("no-endpoint")), "a good request goes on to routing");
}

/// A service `legacy/legacy` (`10.96.0.20:80`, HTTP) in front of a pod
/// outside the mesh, listening at `app` on loopback (the fixture format
/// refuses loopback pod addresses).
fn legacy_service(app: SocketAddr) -> impl FnOnce(&mut MeshState) {
    move |s| {
        let extra = crate::localfile::parse(
            Path::new("tests.rs"),
            &format!(
                "nodes: [{{name: node-a}}]\nnamespaces: [{{name: legacy}}]\npods:\n  - {{name: app, namespace: legacy, node: node-a, labels: {{app: legacy}}, ip: 198.51.100.40, netns: /proc/self/ns/net, cgroup: /sys/fs/cgroup/app}}\nservices:\n  - {{name: legacy, namespace: legacy, ip: 10.96.0.20, selector: {{app: legacy}}, ports: [{{name: http, port: 80, targetPort: {}}}]}}\n",
                app.port()
            ),
        )
        .unwrap();
        s.namespaces.extend(extra.namespaces);
        for (k, mut p) in extra.pods {
            p.ips = vec![app.ip()];
            s.pods.insert(k, p);
        }
        s.services.extend(extra.services);
    }
}

/// At the source, a broken request body is answered 400: no retry, no 5xx,
/// no ejection of the endpoint that was reading it.
#[tokio::test]
async fn outbound_bad_chunk_is_not_an_upstream_failure() {
    let (app, _seen) = app(AppHttp::Http1).await;
    let m = mesh(legacy_service(app));
    let at = m.outbound("10.96.0.20:80".parse().unwrap(), AppHttp::Http1).await;
    // A streamed (chunked) body is sent as it comes.
    let mut c = Raw::connect(at).await;
    c.send(b"POST /upload HTTP/1.1\r\nHost: legacy\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n").await;
    tokio::task::yield_now().await;
    c.send(b"zz\r\n").await;
    let r = c.reply().await.expect("a reply");
    assert_bad_request(&r, "bad chunk, streamed");
    assert_eq!(m.rejected(), 1);
    let endpoints = m.proxy.endpoints();
    assert!(endpoints.values().all(|e| serde_json::to_value(e).unwrap()["failures"] == 0), "{:?}", serde_json::to_value(&endpoints).unwrap());
    let services = serde_json::to_value(m.proxy.services()).unwrap();
    assert_eq!(services["legacy/legacy"]["retries"], 0, "{services}");
}

/// A plaintext client is `unknown` as a principal in metrics and access
/// logs, even from a mesh pod's address (the workload there is known).
#[tokio::test]
async fn plaintext_client_principal_is_unknown_in_metrics_and_access_log() {
    let m = mesh(|_| {});
    let (app, _seen) = app(AppHttp::Http1).await;
    let at = m.inbound(app, AppHttp::Http1, "198.51.100.12:40000".parse().unwrap(), None).await;
    assert_eq!(once(at, b"GET /x HTTP/1.1\r\nHost: ok.shop\r\n\r\n").await.status, 200);
    let text = m.metrics.encode();
    let line = text.lines().find(|l| l.starts_with("istio_requests_total{")).unwrap_or_else(|| panic!("{text}"));
    for label in ["source_principal=\"unknown\"", "source_workload=\"cart\"", "source_workload_namespace=\"shop\"", "connection_security_policy=\"none\""] {
        assert!(line.contains(label), "{label} in {line}");
    }
    m.proxy.telemetry().access_log.flush_and_stop(Duration::from_secs(10));
    let log = std::fs::read_to_string(&m.log).unwrap();
    let entry: serde_json::Value = serde_json::from_str(log.lines().next().expect("one access log line")).unwrap();
    assert_eq!(entry["sourcePrincipal"], "unknown", "{entry}");
    assert_eq!(entry["sourceWorkload"], "cart", "{entry}");
}

/// An app that answers every request 403 and claims, in a header and a
/// trailer, that the mesh denied it.
async fn spoofing_app(version: AppHttp) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                let mut trailers = HeaderMap::new();
                trailers.insert("x-mesh-reply", "denied".parse().unwrap());
                trailers.insert("grpc-status", "7".parse().unwrap());
                let frames = vec![Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"RBAC: access denied\n"))), Ok(hyper::body::Frame::trailers(trailers))];
                let mut res = Response::new(http_body_util::StreamBody::new(futures::stream::iter(frames)));
                *res.status_mut() = http::StatusCode::FORBIDDEN;
                res.headers_mut().insert("x-mesh-reply", "denied".parse().unwrap());
                Ok::<_, std::convert::Infallible>(res)
            });
            let io = TokioIo::new(s);
            tokio::spawn(async move {
                let _ = match version {
                    AppHttp::Http1 => hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await.map_err(|e| e.to_string()),
                    AppHttp::Http2 => hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                        .map_err(|e| e.to_string()),
                };
            });
        }
    });
    addr
}

/// One HTTP/2 request to `at`; the response head and its trailers.
async fn h2_get(at: SocketAddr, uri: &str) -> (http::response::Parts, Option<HeaderMap>) {
    let tcp = TcpStream::connect(at).await.unwrap();
    let (mut client, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(uri).body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let (parts, body) = client.send_request(req).await.unwrap().into_parts();
    (parts, body.collect().await.unwrap().trailers().cloned())
}

/// The `istio_requests_total` lines of `reporter` with `code` and `flags`
/// (any, for `None`), once there are some: a response is recorded when its
/// body ends.
async fn request_lines(m: &Mesh, reporter: &str, code: u16, flags: Option<&str>) -> Vec<String> {
    let mut want = vec![format!("reporter=\"{reporter}\""), format!("response_code=\"{code}\"")];
    want.extend(flags.map(|f| format!("response_flags=\"{f}\"")));
    for _ in 0..100 {
        let text = m.metrics.encode();
        let lines: Vec<String> = text.lines().filter(|l| l.starts_with("istio_requests_total{") && want.iter().all(|w| l.contains(w.as_str()))).map(str::to_owned).collect();
        if !lines.is_empty() {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no {reporter} series for {code}:\n{}", m.metrics.encode());
}

/// The destination agent: an app's own `x-mesh-reply` (header or trailer)
/// never reaches the client, and its 403 is the app's in the metrics, not
/// a policy denial.
#[tokio::test]
async fn an_apps_x_mesh_reply_is_removed_at_the_destination() {
    let m = mesh(|_| {});
    let app = spoofing_app(AppHttp::Http2).await;
    let at = m.inbound(app, AppHttp::Http2, "198.51.100.12:40000".parse().unwrap(), Some(testing::id("shop", "cart"))).await;
    let (head, trailers) = h2_get(at, "http://ok.shop/x").await;
    assert_eq!(head.status, 403);
    assert!(head.headers.get("x-mesh-reply").is_none(), "{:?}", head.headers);
    let trailers = trailers.expect("the app's trailers are forwarded");
    assert_eq!(trailers.get("grpc-status").unwrap(), "7");
    assert!(trailers.get("x-mesh-reply").is_none(), "{trailers:?}");
    for line in request_lines(&m, "destination", 403, None).await {
        assert!(line.contains("response_flags=\"-\""), "the app's 403 is not a mesh denial: {line}");
    }
    // HTTP/1 to the client, the same.
    let http1 = m.inbound(app, AppHttp::Http2, PLAIN.parse().unwrap(), None).await;
    let r = once(http1, b"GET / HTTP/1.1\r\nHost: ok.shop\r\n\r\n").await;
    assert_eq!((r.status, r.header("x-mesh-reply")), (403, None), "{r:?}");
    // The agent's own denial still says so.
    let r = once(http1, b"GET / HTTP/1.1\r\nHost: admin.shop\r\n\r\n").await;
    assert_eq!((r.status, r.header("x-mesh-reply")), (403, Some("denied")), "{r:?}");
    let flagged = request_lines(&m, "destination", 403, Some("RBAC")).await;
    assert_eq!(flagged.len(), 1, "only the agent's denial is RBAC: {flagged:?}");
    assert!(flagged[0].ends_with(" 1"), "{}", flagged[0]);
}

/// The source agent: from an endpoint outside the mesh (no tunnel, no peer
/// agent) `x-mesh-reply` is not believed, not passed on, and changes no
/// flags.
#[tokio::test]
async fn the_source_believes_x_mesh_reply_only_from_a_peer_agent() {
    let app = spoofing_app(AppHttp::Http2).await;
    let m = mesh(legacy_service(app));
    let at = m.outbound("10.96.0.20:80".parse().unwrap(), AppHttp::Http2).await;
    let (head, trailers) = h2_get(at, "http://legacy/x").await;
    assert_eq!(head.status, 403);
    assert!(head.headers.get("x-mesh-reply").is_none(), "{:?}", head.headers);
    let trailers = trailers.expect("the endpoint's trailers are forwarded");
    assert_eq!(trailers.get("grpc-status").unwrap(), "7");
    assert!(trailers.get("x-mesh-reply").is_none(), "{trailers:?}");
    for line in request_lines(&m, "source", 403, None).await {
        assert!(line.contains("response_flags=\"-\""), "{line}");
    }
    let r = once(at, b"GET / HTTP/1.1\r\nHost: legacy\r\n\r\n").await;
    assert_eq!((r.status, r.header("x-mesh-reply")), (403, None), "{r:?}");
}
