//! Gateway API (GAMMA) routes through the real data path, in-process: a
//! source agent (node-a) and a destination agent (node-b), the routes as
//! Kubernetes objects in the local-file YAML stream, and echo apps that
//! report what they received (pod, method, path, host, headers) as JSON.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_agent::testing::{Agent, Mesh};
use tokio::{net::TcpListener, sync::mpsc};

/// A guard against hanging, never a measurement.
const PATIENCE: Duration = Duration::from_secs(10);

const MESH: &str = r#"
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - {name: shop, labels: {nodemesh.io/dataplane-mode: enabled}}
  - {name: consumer, labels: {nodemesh.io/dataplane-mode: enabled}}
pods:
  - {name: client, namespace: shop, node: node-a, labels: {app: client}, ip: NET.11, netns: /nonexistent, cgroup: /nonexistent}
  - {name: client, namespace: consumer, node: node-a, labels: {app: client}, ip: NET.12, netns: /nonexistent, cgroup: /nonexistent}
  - {name: echo-v1, namespace: shop, node: node-b, labels: {app: echo, version: v1}, ip: NET.21, netns: /nonexistent, cgroup: /nonexistent}
  - {name: echo-v2, namespace: shop, node: node-b, labels: {app: echo, version: v2}, ip: NET.22, netns: /nonexistent, cgroup: /nonexistent}
  - {name: shadow, namespace: shop, node: node-b, labels: {app: shadow}, ip: NET.23, netns: /nonexistent, cgroup: /nonexistent}
services:
  - {name: echo, namespace: shop, ip: NET.100, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}, {name: http-alt, port: 8080}]}
  - {name: echo-v1, namespace: shop, ip: NET.101, selector: {app: echo, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
  - {name: echo-v2, namespace: shop, ip: NET.102, selector: {app: echo, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
  - {name: shadow, namespace: shop, ip: NET.103, selector: {app: shadow}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
      filters:
        - {type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}], add: [{name: X-Header-Add, value: added}], remove: [X-Header-Remove]}}
      backendRefs:
        - name: echo-v1
          port: 80
          filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Backend, value: v1}]}}]
    - matches: [{path: {type: Exact, value: /weighted}}]
      backendRefs: [{name: echo-v1, port: 80, weight: 1}, {name: echo-v2, port: 80, weight: 1}]
    - matches: [{path: {type: PathPrefix, value: /redirect}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, port: 8083, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /moved}}}]
    - matches: [{path: {type: PathPrefix, value: /https}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 308}}]
    - matches: [{path: {type: PathPrefix, value: /missing}}]
      backendRefs: [{name: nowhere, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /mirrored}}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: version, value: two}]}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer-view, namespace: consumer}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v1, namespace: shop}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Consumer, value: "yes"}]}}]
      backendRefs: [{name: echo-v1, namespace: shop, port: 80}]
"#;

/// What an echo app received, as it reports it.
#[derive(Debug, serde::Deserialize)]
struct Echoed {
    pod: String,
    method: String,
    path: String,
    host: String,
    headers: std::collections::BTreeMap<String, Vec<String>>,
}

/// An echo app of `pod` on `NET.last:8080`; every request it gets is also
/// sent on the returned channel.
async fn echo(mesh: &Mesh, last: u8, pod: &'static str) -> mpsc::UnboundedReceiver<Echoed> {
    let l = TcpListener::bind(mesh.addr(last, 8080)).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let mut headers = std::collections::BTreeMap::<String, Vec<String>>::new();
                    for (k, v) in req.headers() {
                        headers.entry(k.as_str().to_owned()).or_default().push(v.to_str().unwrap_or_default().to_owned());
                    }
                    let host = req.uri().host().map(str::to_owned).or_else(|| req.headers().get("host").map(|h| h.to_str().unwrap().to_owned())).unwrap_or_default();
                    let json = serde_json::json!({
                        "pod": pod, "method": req.method().as_str(), "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
                        "host": host, "headers": headers,
                    });
                    let _ = tx.send(serde_json::from_value::<Echoed>(json.clone()).unwrap());
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(json.to_string()))))
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    rx
}

struct Fixture {
    mesh: Mesh,
    source: Agent,
    _destination: Agent,
    v1: mpsc::UnboundedReceiver<Echoed>,
    v2: mpsc::UnboundedReceiver<Echoed>,
    shadow: mpsc::UnboundedReceiver<Echoed>,
}

async fn fixture() -> Fixture {
    let mesh = Mesh::new(MESH);
    let v1 = echo(&mesh, 21, "echo-v1").await;
    let v2 = echo(&mesh, 22, "echo-v2").await;
    let shadow = echo(&mesh, 23, "shadow").await;
    let source = mesh.agent("node-a").await;
    let destination = mesh.agent("node-b").await;
    Fixture { mesh, source, _destination: destination, v1, v2, shadow }
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn get_from(f: &Fixture, client: &str, orig: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    let io = TokioIo::new(f.source.connect(client, orig).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "echo");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = tokio::time::timeout(PATIENCE, sender.send_request(req.body(Empty::<Bytes>::new()).unwrap())).await.expect("an answer").unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
}

async fn get(f: &Fixture, path: &str, headers: &[(&str, &str)]) -> Got {
    get_from(f, "shop/client", f.mesh.addr(100, 80), path, headers).await
}

fn echoed(g: &Got) -> Echoed {
    serde_json::from_str(&g.body).unwrap_or_else(|e| panic!("{e}: {}", g.body))
}

#[tokio::test]
async fn rewrite_and_header_filters_reach_the_backend_service() {
    let mut f = fixture().await;
    let got = get(&f, "/prefix/one/two?x=1", &[("x-header-set", "old"), ("x-header-add", "first"), ("x-header-remove", "gone")]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    let e = echoed(&got);
    assert_eq!((e.pod.as_str(), e.method.as_str(), e.path.as_str(), e.host.as_str()), ("echo-v1", "GET", "/one/two?x=1", "rewritten.example"));
    assert_eq!(e.headers["x-header-set"], ["set-overwrites-values"]);
    assert_eq!(e.headers["x-header-add"], ["first", "added"]);
    assert!(!e.headers.contains_key("x-header-remove"));
    assert_eq!(got.headers["x-backend"], "v1", "the backend's response filter");
    f.v1.recv().await.unwrap();
}

#[tokio::test]
async fn weights_split_between_backend_services_and_headers_pick_by_precedence() {
    let f = fixture().await;
    let mut pods = std::collections::BTreeSet::new();
    // Equal weights over random numbers: both are seen well within 64 tries
    // (each try misses one with probability 1/2).
    for _ in 0..64 {
        pods.insert(echoed(&get(&f, "/weighted", &[]).await).pod);
        if pods.len() == 2 {
            break;
        }
    }
    assert_eq!(pods.into_iter().collect::<Vec<_>>(), ["echo-v1", "echo-v2"]);
    // A header match is more specific than the same prefix alone.
    assert_eq!(echoed(&get(&f, "/v2/x", &[("version", "two")]).await).pod, "echo-v2");
    assert_eq!(echoed(&get(&f, "/v2/x", &[]).await).pod, "echo-v1");
}

#[tokio::test]
async fn redirects_are_answered_by_the_source_agent() {
    let mut f = fixture().await;
    let got = get(&f, "/redirect/a?b=1", &[]).await;
    assert_eq!(got.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(got.headers["location"], "http://example.org:8083/moved/a?b=1");
    assert_eq!(got.headers["x-mesh-reply"], "redirect");
    let got = get(&f, "/https/x", &[]).await;
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(got.headers["location"], "https://echo/https/x");
    assert!(f.v1.try_recv().is_err() && f.v2.try_recv().is_err(), "nothing was forwarded");
}

#[tokio::test]
async fn unmatched_requests_get_404_and_invalid_backends_500() {
    let f = fixture().await;
    let got = get(&f, "/nothing-matches", &[]).await;
    assert_eq!((got.status, &got.headers["x-mesh-reply"]), (StatusCode::NOT_FOUND, &"no-route".parse::<http::HeaderValue>().unwrap()));
    let got = get(&f, "/missing", &[]).await;
    assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(got.headers["x-mesh-reply"], "invalid-backend");
    assert!(got.body.contains("service shop/nowhere does not exist"), "{}", got.body);
    // Another port of the service has no route attached: any endpoint.
    let got = get_from(&f, "shop/client", f.mesh.addr(100, 8080), "/nothing-matches", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn mirrors_get_a_copy_and_the_client_the_backend_answer() {
    let mut f = fixture().await;
    let got = get(&f, "/mirrored/x", &[("x-test", "1")]).await;
    assert_eq!(echoed(&got).pod, "echo-v2");
    let copy = tokio::time::timeout(PATIENCE, f.shadow.recv()).await.expect("the mirror's copy").unwrap();
    assert_eq!((copy.pod.as_str(), copy.path.as_str()), ("shadow", "/mirrored/x"));
    assert_eq!(copy.headers["x-test"], ["1"]);
    f.v2.recv().await.unwrap();
}

#[tokio::test]
async fn a_consumer_route_applies_to_its_namespace_only() {
    let f = fixture().await;
    let v1 = f.mesh.addr(101, 80);
    let got = get_from(&f, "consumer/client", v1, "/", &[]).await;
    assert_eq!((got.status, echoed(&got).pod.as_str()), (StatusCode::OK, "echo-v1"));
    assert_eq!(got.headers["x-consumer"], "yes");
    let got = get_from(&f, "shop/client", v1, "/", &[]).await;
    assert_eq!((got.status, echoed(&got).pod.as_str()), (StatusCode::OK, "echo-v1"));
    assert!(!got.headers.contains_key("x-consumer"));
}
