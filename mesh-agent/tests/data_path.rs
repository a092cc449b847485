//! The data path in-process: a source agent (node-a) and a destination
//! agent (node-b) in this process, their pods on loopback addresses, real
//! TCP, real mTLS with certificates of one in-memory CA, and apps that are
//! small hyper servers. No root, no namespaces, no eBPF: the harness is
//! `mesh_agent::testing`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_agent::testing::{Agent, Mesh};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::mpsc,
};

/// A guard against hanging, never a measurement.
const PATIENCE: Duration = Duration::from_secs(10);

const MESH: &str = r#"
nodes: [{name: node-a}, {name: node-b}, {name: node-c}]
namespaces:
  - name: shop
    labels: {nodemesh.io/dataplane-mode: enabled}
pods:
  - {name: client, namespace: shop, node: node-a, serviceAccount: client, labels: {app: client}, ip: NET.11, netns: /nonexistent, cgroup: /nonexistent}
  - {name: web-v1, namespace: shop, node: node-b, serviceAccount: web, labels: {app: web, version: v1}, ip: NET.21, netns: /nonexistent, cgroup: /nonexistent}
  - {name: web-v2, namespace: shop, node: node-b, serviceAccount: web, labels: {app: web, version: v2}, ip: NET.22, netns: /nonexistent, cgroup: /nonexistent}
  - {name: mute, namespace: shop, node: node-b, serviceAccount: mute, labels: {app: mute}, ip: NET.23, netns: /nonexistent, cgroup: /nonexistent}
  - {name: ghost, namespace: shop, node: node-c, serviceAccount: ghost, labels: {app: ghost}, ip: NET.31, netns: /nonexistent, cgroup: /nonexistent}
services:
  - {name: web, namespace: shop, ip: NET.100, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
  - {name: mute, namespace: shop, ip: NET.101, selector: {app: mute}, ports: [{name: http, port: 80, targetPort: 8080}]}
  - {name: ghost, namespace: shop, ip: NET.102, selector: {app: ghost}, ports: [{name: http, port: 80, targetPort: 8080}]}
httpRoutes:
  - name: web
    namespace: shop
    service: web
    rules:
      - matches: [{headers: [{name: x-canary, exact: "1"}]}]
        backends: [{subset: {version: v2}}]
      - matches: [{path: {prefix: /nowhere}}]
        backends: [{subset: {version: v9}}]
      - matches: [{path: {prefix: /slow}}]
        backends: [{subset: {version: v1}}]
        timeout: 300ms
      - matches: [{path: {prefix: /stuck}}]
        backends: [{subset: {version: v1}}]
        retries: {attempts: 0, perTryTimeout: 300ms}
      - matches: [{path: {prefix: /noretry}}]
        backends: [{subset: {version: v1}}]
        retries: {attempts: 0}
      - matches: [{path: {prefix: /hold}}]
        backends: [{subset: {version: v1}}]
      - backends: [{subset: {version: v1}}]
    circuitBreaker: {maxRequests: 1}
authorizationPolicies:
  - name: deny-admin
    namespace: shop
    selector: {app: web}
    action: DENY
    rules:
      - to: [{paths: ["/admin", "/admin/*"]}]
"#;

/// What an app received.
#[derive(Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
}

/// An app of `pod` on its address, port 8080: answers `200 <pod>`, or 503
/// while `fail` is above zero (counting it down); never answers `/hold`,
/// `/slow` and `/stuck`.
struct App {
    seen: mpsc::UnboundedReceiver<Seen>,
    fail: Arc<AtomicU32>,
}

async fn app(mesh: &Mesh, last: u8, pod: &'static str) -> App {
    let l = TcpListener::bind(mesh.addr(last, 8080)).await.unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    let fail = Arc::new(AtomicU32::new(0));
    let failing = fail.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (tx, fail) = (tx.clone(), failing.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (tx, fail) = (tx.clone(), fail.clone());
                async move {
                    let path = req.uri().path().to_owned();
                    let _ = tx.send(Seen { path: path.clone(), headers: req.headers().clone() });
                    if ["/hold", "/slow", "/stuck"].iter().any(|p| path.starts_with(p)) {
                        std::future::pending::<()>().await;
                    }
                    let failed = fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                    let (status, body) = if failed { (StatusCode::SERVICE_UNAVAILABLE, "failing") } else { (StatusCode::OK, pod) };
                    let mut res = Response::new(Full::new(Bytes::from(body)));
                    *res.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(res)
                }
            });
            tokio::spawn(async move {
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = server.serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    App { seen, fail }
}

/// The two agents of the mesh and the web apps.
struct Fixture {
    mesh: Mesh,
    source: Agent,
    destination: Agent,
    v1: App,
    /// Kept so that its app serves while the test runs.
    _v2: App,
}

async fn fixture() -> Fixture {
    let mesh = Mesh::new(MESH);
    let v1 = app(&mesh, 21, "web-v1").await;
    let v2 = app(&mesh, 22, "web-v2").await;
    let source = mesh.agent("node-a").await;
    let destination = mesh.agent("node-b").await;
    Fixture { mesh, source, destination, v1, _v2: v2 }
}

/// A response, read to its end.
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn reply(&self) -> Option<&str> {
        self.headers.get("x-mesh-reply").map(|v| v.to_str().unwrap())
    }
}

async fn read(res: Response<Incoming>) -> Got {
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// An HTTP/1.1 client connection from the client pod to `orig`.
async fn h1(f: &Fixture, orig: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let io = TokioIo::new(f.source.connect("shop/client", orig).await);
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// One request on a connection of its own.
async fn get(f: &Fixture, orig: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut sender = h1(f, orig).await;
    let mut req = Request::get(path).header("host", "web.shop");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = tokio::time::timeout(PATIENCE, sender.send_request(req.body(Empty::new()).unwrap())).await.expect("an answer").unwrap();
    read(res).await
}

fn web(f: &Fixture) -> SocketAddr {
    f.mesh.addr(100, 80)
}

/// The `istio_requests_total` series of `text` with these labels.
fn requests(text: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{") && labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test]
async fn a_request_crosses_both_agents_over_mtls_with_the_verified_identity() {
    let mut f = fixture().await;
    let got = get(&f, web(&f), "/hello", &[]).await;
    assert_eq!((got.status, got.body.as_str(), got.reply()), (StatusCode::OK, "web-v1", None));
    let seen = f.v1.seen.recv().await.unwrap();
    assert_eq!(seen.path, "/hello");
    assert_eq!(seen.headers["x-mesh-peer-identity"], "spiffe://cluster.local/ns/shop/sa/client");

    // HTTP/2 from the client (h2c), HTTP/1.1 to the app.
    let io = TokioIo::new(f.source.connect("shop/client", web(&f)).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let uri = format!("http://{}/h2", web(&f));
    let got = read(sender.send_request(Request::get(uri).body(Empty::<Bytes>::new()).unwrap()).await.unwrap()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "web-v1"));
    assert_eq!(f.v1.seen.recv().await.unwrap().path, "/h2");

    // Both agents reported the requests as mutual TLS, each from its side.
    let mtls = "connection_security_policy=\"mutual_tls\"";
    // With the labels Kiali groups by, as Istio derives them from the pods'
    // labels (client: app only; web-v1: app and version).
    let kiali = [
        "source_canonical_service=\"client\"",
        "source_canonical_revision=\"latest\"",
        "source_version=\"unknown\"",
        "source_cluster=\"Kubernetes\"",
        "destination_version=\"v1\"",
        "destination_canonical_service=\"web\"",
        "destination_canonical_revision=\"v1\"",
        "destination_cluster=\"Kubernetes\"",
        "request_protocol=\"http\"",
    ];
    let with = |reporter: &'static str| [[reporter, "response_code=\"200\"", mtls].as_slice(), &kiali].concat();
    assert_eq!(requests(&f.source.metrics(), &with("reporter=\"source\"")), 2);
    assert_eq!(requests(&f.destination.metrics(), &with("reporter=\"destination\"")), 2);
    let (open, opened) = f.source.proxy().tunnel_connections();
    assert_eq!((open, opened), (1, 1), "one pooled mTLS connection carries both");
}

#[tokio::test]
async fn the_route_picks_the_backend_by_header() {
    let f = fixture().await;
    for _ in 0..10 {
        assert_eq!(get(&f, web(&f), "/", &[("x-canary", "1")]).await.body, "web-v2");
        assert_eq!(get(&f, web(&f), "/", &[]).await.body, "web-v1");
    }
}

#[tokio::test]
async fn a_503_is_retried_unless_the_rule_says_no_retries() {
    let mut f = fixture().await;
    f.v1.fail.store(1, Ordering::SeqCst);
    let got = get(&f, web(&f), "/flaky", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "web-v1"));
    assert_eq!(f.v1.seen.recv().await.unwrap().path, "/flaky");
    assert_eq!(f.v1.seen.recv().await.unwrap().path, "/flaky", "the retry reached the app");

    f.v1.fail.store(1, Ordering::SeqCst);
    let got = get(&f, web(&f), "/noretry", &[]).await;
    // The app's own 503: passed on as it is, no mesh tag.
    assert_eq!((got.status, got.body.as_str(), got.reply()), (StatusCode::SERVICE_UNAVAILABLE, "failing", None));
    let services = serde_json::to_value(f.source.proxy().services()).unwrap();
    assert_eq!(services["shop/web"]["retries"], 1, "{services}");
}

#[tokio::test]
async fn authorization_denies_by_path_and_the_app_never_sees_it() {
    let mut f = fixture().await;
    let denied = get(&f, web(&f), "/admin/users", &[]).await;
    assert_eq!((denied.status, denied.reply()), (StatusCode::FORBIDDEN, Some("denied")));
    assert!(denied.body.contains("deny-admin"), "{}", denied.body);
    // The normalized path is what is checked.
    let sneaky = get(&f, web(&f), "/public/../admin", &[]).await;
    assert_eq!(sneaky.status, StatusCode::FORBIDDEN);
    let allowed = get(&f, web(&f), "/public", &[]).await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(f.v1.seen.recv().await.unwrap().path, "/public", "the first request the app sees is the allowed one");
}

/// Each answer the agents make themselves: status, `x-mesh-reply` tag and
/// the response flag the agent that made it reports.
#[tokio::test]
async fn every_local_reply_has_its_status_tag_and_flag() {
    let mut f = fixture().await;
    let src = |f: &Fixture, flag: &str, code: &str| {
        requests(&f.source.metrics(), &["reporter=\"source\"", &format!("response_flags=\"{flag}\""), &format!("response_code=\"{code}\"")])
    };

    // Bad request: two Host lines, refused by the source agent's front door.
    let mut raw = f.source.connect("shop/client", web(&f)).await;
    raw.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await.unwrap();
    let mut head = vec![0; 1024];
    let n = tokio::time::timeout(PATIENCE, raw.read(&mut head)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(head.contains("x-mesh-reply: bad-request"), "{head}");
    assert_eq!(src(&f, "DPE", "400"), 1);

    // Denied, by the destination agent.
    let got = get(&f, web(&f), "/admin", &[]).await;
    assert_eq!((got.status, got.reply()), (StatusCode::FORBIDDEN, Some("denied")));
    assert_eq!(requests(&f.destination.metrics(), &["reporter=\"destination\"", "response_flags=\"RBAC\"", "response_code=\"403\""]), 1);

    // No endpoint in the selected backend.
    let got = get(&f, web(&f), "/nowhere", &[]).await;
    assert_eq!((got.status, got.reply()), (StatusCode::SERVICE_UNAVAILABLE, Some("no-endpoint")));
    assert_eq!(src(&f, "NR", "503"), 1);

    // The route's timeout.
    let got = get(&f, web(&f), "/slow", &[]).await;
    assert_eq!((got.status, got.reply()), (StatusCode::GATEWAY_TIMEOUT, Some("timeout")));
    assert_eq!(src(&f, "UT", "504"), 1);

    // The per-try timeout with no retry left: the endpoint "reset".
    let got = get(&f, web(&f), "/stuck", &[]).await;
    assert_eq!((got.status, got.reply()), (StatusCode::BAD_GATEWAY, Some("reset")));
    assert_eq!(src(&f, "UR", "502"), 1);

    // No agent serves node-c: the tunnel cannot be opened.
    let got = get(&f, f.mesh.addr(102, 80), "/", &[]).await;
    assert_eq!((got.status, got.reply()), (StatusCode::SERVICE_UNAVAILABLE, Some("connect-failure")));
    assert_eq!(src(&f, "UF", "503"), 1);

    // No app listens in pod mute: the destination agent's 503, untagged.
    let got = get(&f, f.mesh.addr(101, 80), "/", &[]).await;
    assert_eq!((got.status, got.reply()), (StatusCode::SERVICE_UNAVAILABLE, None));
    assert!(requests(&f.destination.metrics(), &["reporter=\"destination\"", "response_flags=\"-\"", "response_code=\"503\""]) >= 1);

    // The circuit breaker (maxRequests 1): one request held, the next refused.
    while f.v1.seen.try_recv().is_ok() {}
    let mut held = h1(&f, web(&f)).await;
    let held = tokio::spawn(async move { held.send_request(Request::get("/hold").header("host", "web").body(Empty::new()).unwrap()).await });
    assert_eq!(f.v1.seen.recv().await.unwrap().path, "/hold");
    let got = get(&f, web(&f), "/", &[]).await;
    assert_eq!((got.status, got.reply()), (StatusCode::SERVICE_UNAVAILABLE, Some("overflow")));
    assert_eq!(src(&f, "UO", "503"), 1);
    held.abort();
}

#[tokio::test]
async fn draining_closes_http1_after_the_next_response() {
    let mut f = fixture().await;
    let mut sender = h1(&f, web(&f)).await;
    let req = || Request::get("/").header("host", "web").body(Empty::new()).unwrap();
    let first = read(sender.send_request(req()).await.unwrap()).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.headers.contains_key("connection"), "{:?}", first.headers);
    let drained = f.source.drain(PATIENCE * 3);
    sender.ready().await.unwrap();
    let second = read(sender.send_request(req()).await.unwrap()).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.headers["connection"], "close");
    assert_eq!(drained.await.unwrap(), 0, "the connection closed after it, so the drain finished");
    assert_eq!(f.v1.seen.recv().await.unwrap().path, "/");
}

#[tokio::test]
async fn draining_sends_http2_clients_goaway() {
    let f = fixture().await;
    let io = TokioIo::new(f.source.connect("shop/client", web(&f)).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    let conn = tokio::spawn(conn);
    let uri = format!("http://{}/", web(&f));
    let first = read(sender.send_request(Request::get(&uri).body(Empty::<Bytes>::new()).unwrap()).await.unwrap()).await;
    assert_eq!(first.status, StatusCode::OK);
    let drained = f.source.drain(PATIENCE * 3);
    // GOAWAY with no stream open: the client's connection ends cleanly.
    tokio::time::timeout(PATIENCE, conn).await.expect("GOAWAY ends the connection").unwrap().unwrap();
    assert!(sender.send_request(Request::get(&uri).body(Empty::new()).unwrap()).await.is_err());
    assert_eq!(drained.await.unwrap(), 0);
}
