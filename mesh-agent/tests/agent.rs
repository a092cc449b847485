//! The whole agent in-process, built by `app::build` from a config as the
//! binary builds it: the local-file source reading a real file, the node
//! lock and handoff socket in a run directory, the admin and metrics
//! listeners, enrollment, the proxy. What stands in: the kernel (in
//! memory: it records what would be attached, enrolled and captured, and
//! plays the connect hooks), the pods (loopback addresses), the CA (in
//! the process, shared by the agents of a mesh). No root, no eBPF: the
//! harness is `mesh_agent::testing::{FileMesh, Node}`.
//!
//! What only the kernel can show (redirection itself, `sk_lookup`
//! capture, refusal of a stopped agent's pods' connections by the hooks,
//! failure policy `open`) is tested end to end in the workspace's
//! `tests/` (root, namespaces, eBPF).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_agent::{
    app,
    state::PodKey,
    testing::{FileMesh, MemoryKernel, Node},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

/// A guard against hanging, never a measurement.
const PATIENCE: Duration = Duration::from_secs(10);

const HEAD: &str = r#"
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - name: shop
    labels: {nodemesh.io/dataplane-mode: enabled}
services:
  - {name: web, namespace: shop, ip: NET.100, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
httpRoutes:
  - name: web
    namespace: shop
    service: web
    rules:
      - matches: [{headers: [{name: x-canary, exact: "1"}]}]
        backends: [{subset: {version: v2}}]
      - matches: [{path: {prefix: /slow}}]
        backends: [{subset: {version: v1}}]
        timeout: 200ms
      - backends: [{subset: {version: v1}}]
authorizationPolicies:
  - name: deny-admin
    namespace: shop
    selector: {app: web}
    action: DENY
    rules:
      - to: [{paths: ["/admin", "/admin/*"]}]
pods:
"#;

const CLIENT: &str = "  - {name: client, namespace: shop, node: node-a, serviceAccount: client, labels: {app: client}, ip: NET.11, netns: /run/netns/client, cgroup: /cg/client}\n";
const BATCH: &str = "  - {name: batch, namespace: shop, node: node-a, serviceAccount: batch, labels: {app: batch}, ip: NET.12, netns: /run/netns/batch, cgroup: /cg/batch}\n";
const WEB_V1: &str = "  - {name: web-v1, namespace: shop, node: node-b, serviceAccount: web, labels: {app: web, version: v1}, ip: NET.21, netns: /run/netns/web-v1, cgroup: /cg/web-v1}\n";
const WEB_V2: &str = "  - {name: web-v2, namespace: shop, node: node-b, serviceAccount: web, labels: {app: web, version: v2}, ip: NET.22, netns: /run/netns/web-v2, cgroup: /cg/web-v2}\n";

fn client() -> PodKey {
    PodKey { namespace: "shop".into(), name: "client".into() }
}

fn mesh_file(pods: &[&str]) -> String {
    let mut y = HEAD.to_owned();
    pods.iter().for_each(|p| y.push_str(p));
    y
}

/// An admin request's answer.
struct Admin {
    status: StatusCode,
    body: String,
}

impl Admin {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// GET `path` on an admin listener.
async fn admin_get(addr: SocketAddr, path: &str) -> Admin {
    let io = TokioIo::new(TcpStream::connect(addr).await.expect("the admin listener"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(path).header("host", "admin").body(Empty::<Bytes>::new()).unwrap();
    let res = tokio::time::timeout(PATIENCE, sender.send_request(req)).await.expect("an answer").unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Admin { status, body: String::from_utf8_lossy(&body).into_owned() }
}

/// The value of the metric line `name` (with its labels, if any) in `text`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `check` until it holds, within the patience (what it waits for
/// happens in the background: a file reload, a reconcile pass).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < give_up, "not within the patience: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An app on `addr`: answers `200 <name>`; a request to `/hold` or
/// `/slow` gets its answer when the test sends on the channel it is given.
struct App {
    held: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
}

async fn app(addr: SocketAddr, name: &'static str) -> App {
    let l = TcpListener::bind(addr).await.unwrap();
    let (tx, held) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    if ["/hold", "/slow"].contains(&req.uri().path()) {
                        let (release, released) = oneshot::channel();
                        let _ = tx.send(release);
                        let _ = released.await;
                    }
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(name))))
                }
            });
            tokio::spawn(async move {
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = server.serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    App { held }
}

/// An HTTP/1.1 connection from the pod at `NET.from` to `orig`, through
/// the node's (in-memory) connect hooks.
async fn h1(node: &Node, mesh: &FileMesh, from: u8, orig: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = node.connect(mesh.ip(from), orig).await.expect("the pod's connection");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

struct Got {
    status: StatusCode,
    reply: Option<String>,
    connection: Option<String>,
    body: String,
}

async fn send(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = Request::get(path).header("host", "web.shop");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender.ready().await.expect("the connection takes another request");
    let res = tokio::time::timeout(PATIENCE, sender.send_request(req.body(Empty::new()).unwrap())).await.expect("an answer").unwrap();
    let header = |h: &str| res.headers().get(h).map(|v| v.to_str().unwrap().to_owned());
    let (status, reply, connection) = (res.status(), header("x-mesh-reply"), header("connection"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Got { status, reply, connection, body: String::from_utf8_lossy(&body).into_owned() }
}

/// Whether a TCP connect to `addr` is refused (nothing listens).
async fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_agent_serves_its_admin_and_reports_ready() {
    let mesh = FileMesh::new(&mesh_file(&[CLIENT, WEB_V1]));
    let a = mesh.start("node-a").await;
    let admin = a.bound.admin_addr();
    assert!(admin.ip().is_loopback() && admin.port() != 0, "the address bound, not the one asked for: {admin}");
    a.ready().await;

    assert_eq!(admin_get(admin, "/ready").await.status, StatusCode::OK);
    assert_eq!(admin_get(admin, "/healthz").await.body, "ok\n");
    let status = admin_get(admin, "/status").await.json();
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["ready"], true);
    let pods = status["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "only node-a's pod: {status}");
    assert_eq!((&pods[0]["name"], &pods[0]["enrolled"], &pods[0]["attached"]), (&"client".into(), &true.into(), &true.into()));
    assert_eq!(pods[0]["identity"], "spiffe://cluster.local/ns/shop/sa/client");
    let listeners: Vec<String> = [15001, 15008, 15006].map(|p| mesh.addr(11, p).to_string()).into();
    assert_eq!(pods[0]["listeners"], serde_json::json!(listeners));
    assert_eq!(a.bound.pod_listeners(&client()), [15001, 15008, 15006].map(|p| mesh.addr(11, p)));

    let metrics = admin_get(admin, "/metrics").await;
    assert_eq!(metric(&metrics.body, "nodemesh_enrolled_pods"), Some(1.0), "{}", metrics.body);
    assert_eq!(metric(&metrics.body, "nodemesh_ready"), Some(1.0));

    // The metrics listener: its own bound address, the public paths only.
    let public = a.bound.metrics_addr().expect("a metrics listener");
    assert_ne!(public, admin);
    assert_eq!(metric(&admin_get(public, "/metrics").await.body, "nodemesh_ready"), Some(1.0));
    assert_eq!(admin_get(public, "/config_dump").await.status, StatusCode::NOT_FOUND);
    let dump = admin_get(admin, "/config_dump").await.json();
    assert_eq!(dump["node"], "node-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_follows_the_file() {
    let mesh = FileMesh::new(&mesh_file(&[CLIENT]));
    let a = mesh.start("node-a").await;
    a.ready().await;
    let (client, batch) = (mesh.ip(11), mesh.ip(12));
    assert_eq!(a.kernel.state().enrolled_ips(), [client].into());

    // A pod added to the file: attached, captured, enrolled, served.
    mesh.write(&mesh_file(&[CLIENT, BATCH]));
    let admin = a.bound.admin_addr();
    eventually("batch enrolled", async || a.kernel.state().enrolled_ips().contains(&batch)).await;
    let k = a.kernel.state();
    assert!(k.attached.contains(std::path::Path::new("/cg/batch")));
    assert_eq!(k.captured.get(&batch), Some(&false), "captured, failing closed");
    assert_eq!(k.inbound_listeners.get(&batch), Some(&mesh.addr(12, 15006)));
    eventually("batch ready in /status", async || {
        let s = admin_get(admin, "/status").await.json();
        s["ready"] == true && s["pods"].as_array().unwrap().iter().any(|p| p["name"] == "batch" && p["enrolled"] == true)
    })
    .await;
    let status = admin_get(admin, "/status").await.json();
    assert!(status["config"]["accepted"].as_u64().unwrap() >= 1, "the reload counted: {}", status["config"]);

    // Removed from the file: its entries go, and so does it from /status.
    mesh.write(&mesh_file(&[CLIENT]));
    eventually("batch unenrolled", async || !a.kernel.state().enrolled_ips().contains(&batch)).await;
    let k = a.kernel.state();
    assert!(!k.captured.contains_key(&batch) && !k.inbound_listeners.contains_key(&batch), "{k:?}");
    assert!(!k.attached.contains(std::path::Path::new("/cg/batch")));
    let status = admin_get(admin, "/status").await.json();
    assert!(status["pods"].as_array().unwrap().iter().all(|p| p["name"] != "batch"), "{status}");
    assert_eq!(a.kernel.state().enrolled_ips(), [client].into(), "the other pod untouched");

    // A file the agent refuses changes nothing.
    mesh.write("pods: [not a pod]\n");
    eventually("the bad file seen", async || {
        admin_get(admin, "/status").await.json()["config"]["rejected"].as_u64().is_some_and(|n| n >= 1)
    })
    .await;
    assert_eq!(a.kernel.state().enrolled_ips(), [client].into());
}

/// node-a (the client) and node-b (web-v1, web-v2): two agents, one CA.
struct TwoNodes {
    mesh: FileMesh,
    a: Node,
    b: Node,
    v1: App,
    _v2: App,
}

async fn two_nodes() -> TwoNodes {
    let mesh = FileMesh::new(&mesh_file(&[CLIENT, WEB_V1, WEB_V2]));
    let v1 = app(mesh.addr(21, 8080), "web-v1").await;
    let v2 = app(mesh.addr(22, 8080), "web-v2").await;
    let (a, b) = (mesh.start("node-a").await, mesh.start("node-b").await);
    a.ready().await;
    b.ready().await;
    TwoNodes { mesh, a, b, v1, _v2: v2 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cross_two_built_agents_routed_and_authorized() {
    let t = two_nodes().await;
    let web = t.mesh.addr(100, 80);
    let mut c = h1(&t.a, &t.mesh, 11, web).await;

    let got = send(&mut c, "/", &[]).await;
    assert_eq!((got.status, got.body.as_str(), got.reply), (StatusCode::OK, "web-v1", None));
    // The route: the canary header picks v2.
    let got = send(&mut c, "/", &[("x-canary", "1")]).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "web-v2"));
    // The destination agent's policy: 403, naming it.
    let denied = send(&mut c, "/admin/users", &[]).await;
    assert_eq!((denied.status, denied.reply.as_deref()), (StatusCode::FORBIDDEN, Some("denied")));
    assert!(denied.body.contains("deny-admin"), "{}", denied.body);
    // The route's timeout, answered by the source agent.
    let slow = send(&mut c, "/slow", &[]).await;
    assert_eq!((slow.status, slow.reply.as_deref()), (StatusCode::GATEWAY_TIMEOUT, Some("timeout")));

    // Each agent counted its side, over mutual TLS; the timeout by the
    // source alone, with its flag.
    let count = |text: &str, labels: &[&str]| {
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{") && labels.iter().all(|want| l.contains(want)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    let mtls = "connection_security_policy=\"mutual_tls\"";
    let source = admin_get(t.a.bound.admin_addr(), "/metrics").await.body;
    let destination = admin_get(t.b.bound.metrics_addr().unwrap(), "/metrics").await.body;
    for (text, reporter) in [(&source, "reporter=\"source\""), (&destination, "reporter=\"destination\"")] {
        let ok = count(text, &[reporter, mtls, "response_code=\"200\""]);
        let denied = count(text, &[reporter, mtls, "response_code=\"403\""]);
        assert_eq!((ok, denied), (2, 1), "{reporter}: {text}");
    }
    assert_eq!(count(&source, &["reporter=\"source\"", "response_code=\"504\"", "response_flags=\"UT\""]), 1, "{source}");
    let status = admin_get(t.a.bound.admin_addr(), "/status").await.json();
    // One pooled mTLS connection per destination pod (v1, v2), the second
    // request to v1 on the first one's.
    assert_eq!(status["tunnelConnections"]["opened"], 2, "{status}");
    assert_eq!(status["tls"]["verified"], 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_drains_in_flight_requests_then_closes_every_listener() {
    let mut t = two_nodes().await;
    let web = t.mesh.addr(100, 80);
    let mut c = h1(&t.a, &t.mesh, 11, web).await;
    assert_eq!(send(&mut c, "/", &[]).await.status, StatusCode::OK);
    // Closed by its client: an idle HTTP/1.1 connection would hold the
    // drain until its deadline (it is closed after its next response).
    drop(c);

    // A request in flight through node-a.
    let mut held = h1(&t.a, &t.mesh, 11, web).await;
    let in_flight = tokio::spawn(async move { send(&mut held, "/hold", &[]).await });
    let release = tokio::time::timeout(PATIENCE, t.v1.held.recv()).await.expect("the request reached the app").unwrap();

    // What SIGTERM does.
    let (admin, metrics) = (t.a.bound.admin_addr(), t.a.bound.metrics_addr().unwrap());
    let listeners = t.a.bound.pod_listeners(&client());
    assert_eq!(listeners.len(), 3);
    t.a.bound.shutdown_trigger().trigger();
    let stopped = tokio::spawn(t.a.bound.wait());

    // The pod's listeners close at once: new connections are refused...
    for l in &listeners {
        eventually(&format!("{l} refused"), async || refused(*l).await).await;
    }
    let redirected = t.a.kernel.connect(t.mesh.ip(11), web).await;
    assert_eq!(redirected.err().map(|e| e.kind()), Some(std::io::ErrorKind::ConnectionRefused));
    // ...while the one in flight is still being served, and the agent
    // still answers its admin.
    assert!(!stopped.is_finished());
    assert_eq!(admin_get(admin, "/healthz").await.status, StatusCode::OK);
    release.send(()).unwrap();
    let got = tokio::time::timeout(PATIENCE, in_flight).await.expect("the held request answered").unwrap();
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "web-v1"));
    assert_eq!(got.connection.as_deref(), Some("close"), "draining: the connection ends after its response");

    // The drain ended with its connections (not at its deadline), and
    // then the admin and metrics listeners closed.
    tokio::time::timeout(PATIENCE, stopped).await.expect("drained").unwrap().expect("a clean stop");
    assert!(refused(admin).await, "the admin listener is closed");
    assert!(refused(metrics).await, "the metrics listener is closed");

    // The kernel state stays (on a node it is pinned): the pod is still
    // enrolled and captured, so its connections keep going to the
    // agent's (closed) listeners: refused, never direct. Fail closed.
    let k = t.a.kernel.state();
    assert!(k.entry_of(t.mesh.ip(11)).is_some() && k.captured.get(&t.mesh.ip(11)) == Some(&false), "{k:?}");
    let after = t.a.kernel.connect(t.mesh.ip(11), web).await;
    assert_eq!(after.err().map(|e| e.kind()), Some(std::io::ErrorKind::ConnectionRefused));

    // The other node's agent is untouched.
    assert_eq!(admin_get(t.b.bound.admin_addr(), "/ready").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_for_the_same_node_takes_over_without_refusing() {
    let mesh = FileMesh::new(&mesh_file(&[CLIENT]));
    let first = mesh.start("node-a").await;
    first.ready().await;
    let (listeners, admin) = (first.bound.pod_listeners(&client()), first.bound.admin_addr());
    // Serving, as the binary does, until told to stop or taken over.
    let first_done = tokio::spawn(first.bound.wait());

    // Same config (same run directory), same (pinned) kernel state: the
    // handoff, not a second owner.
    let second = mesh.build(mesh.config("node-a"), first.kernel.clone()).await.expect("the successor starts");
    second.ready().await;
    assert_eq!(second.bound.pod_listeners(&client()), listeners, "the very sockets, handed over");
    assert_eq!(second.bound.admin_addr(), admin, "and the admin listener (port 0: whatever the first had)");
    tokio::time::timeout(PATIENCE, first_done).await.expect("the first agent stops once taken over").unwrap().unwrap();
    for l in &listeners {
        assert!(!refused(*l).await, "{l} still accepts: the successor serves it");
    }
    let status = admin_get(admin, "/status").await.json();
    assert_eq!((&status["pods"][0]["enrolled"], &status["ready"]), (&true.into(), &true.into()), "{status}");
    assert!(second.kernel.state().entry_of(mesh.ip(11)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_admin_port_stops_the_agent_before_the_kernel_is_touched() {
    let mesh = FileMesh::new(&mesh_file(&[CLIENT]));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = mesh.config("node-a");
    cfg.admin_addr = taken.local_addr().unwrap();
    let kernel = MemoryKernel::new();
    let err = mesh.build(cfg, kernel.clone()).await.err().expect("the port is taken");
    assert!(matches!(err, app::Error::Bind { flag: "admin", .. }), "{err}");
    assert!(err.to_string().contains("Nothing was loaded or attached to the kernel"), "{err}");
    let k = kernel.state();
    assert!(k.namespaces.is_empty() && k.attached.is_empty() && k.enrolled.is_empty(), "{k:?}");

    // The node is free again: an agent on a free port starts.
    let a = mesh.build(mesh.config("node-a"), kernel.clone()).await.expect("the next agent starts");
    a.ready().await;
    assert_eq!(kernel.state().enrolled_ips(), [mesh.ip(11)].into());
}
