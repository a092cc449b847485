//! Issue (L7): routing, load balancing and resilience applied by the
//! **source** node's agent to requests for service ports declared HTTP; and
//! HTTP/2 multiplexing and gRPC through the mesh.

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_e2e::{Pod, PodProcess, PodSpec, ServicePort, ServiceSpec, wait_until};
use serde_json::Value;

/// A backend: `app.py NAME`. Answers carry `x-backend: NAME`.
/// `/slow?ms=N` sleeps; `/flaky...` fails every third request with 503;
/// `POST /control/broken` makes every other path answer 500 until
/// `POST /control/fixed`; `/echo` returns the body; `/stats` reports the
/// most requests it ever had in flight at once.
const APP: &str = r#"
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs
NAME = sys.argv[1]
lock = threading.Lock()
state = {"n": 0, "broken": False, "inflight": 0, "max_inflight": 0}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are two writes: without this, Nagle holds the body
    # until the client's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True
    def handle_one(self):
        with lock:
            state["inflight"] += 1
            state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        try:
            self.answer()
        finally:
            with lock:
                state["inflight"] -= 1
    def answer(self):
        n = int(self.headers.get('content-length') or 0)
        data = self.rfile.read(n) if n else b""
        url = urlparse(self.path)
        code, body = 200, (NAME + "\n").encode()
        if url.path == "/upgrade" and self.headers.get("upgrade") == "echo":
            # Switch to a raw echo protocol until the client closes.
            self.send_response(101)
            self.send_header("upgrade", "echo")
            self.send_header("connection", "upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True
            return
        if url.path == "/control/broken":
            state["broken"] = True
        elif url.path == "/control/fixed":
            state["broken"] = False
        elif url.path == "/stats":
            body = json.dumps(state).encode()
        elif state["broken"]:
            code = 500
        elif url.path.startswith("/slow"):
            time.sleep(int(parse_qs(url.query).get("ms", ["0"])[0]) / 1000)
        elif "flaky" in url.path:
            with lock:
                state["n"] += 1
                if state["n"] % 3 == 0:
                    code = 503
        elif url.path == "/echo":
            body = data
        self.send_response(code)
        self.send_header('x-backend', NAME)
        self.send_header('content-length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = handle_one
    def log_message(self, *a): pass
print("listening", flush=True)
ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

const WEB_IP: [u8; 4] = [198, 51, 100, 100];
const WEB: &str = "198.51.100.100:80";

struct L7 {
    m: Mesh,
    apps: Vec<PodProcess>,
    backends: Vec<Pod>,
}

/// The mesh plus `backends` (name, version, last octet) on node-b behind
/// service `web` (port 80 -> 8080, declared `http`), with `routes` applied.
fn l7_mesh(test: &str, backends: &[(&str, &str, u8)], extra_services: &[ServiceSpec], routes: &str) -> Result<L7> {
    let opts = MeshOpts { enrolled: &["shop"], named_service_accounts: true, ..MeshOpts::default() };
    let mut m = mesh_with(test, &opts)?;
    let mut pods = Vec::new();
    for (name, version, last) in backends {
        let spec = PodSpec::new(*name, "shop", "node-b", [198, 51, 100, *last].into())
            .label("app", "web")
            .label("version", *version)
            .service_account("web");
        pods.push(m.tb.add_pod(spec)?);
    }
    let mut web = ServiceSpec::new("web", "shop").select("app", "web").ip(WEB_IP.into());
    web.ports.push(ServicePort { name: "http".into(), port: 80, target_port: 8080 });
    m.tb.add_service(web)?;
    for s in extra_services {
        m.tb.add_service(s.clone())?;
    }
    let script = m.tb.dir().join("app.py");
    std::fs::write(&script, APP)?;
    let mut apps = Vec::new();
    for p in &pods {
        let app = p.spawn("python3", [script.to_str().context("utf-8")?, p.name()])?;
        app.wait_for_stdout(SETTLE, |l| l.contains("listening"))?;
        apps.push(app);
    }
    write_with_extra(&m, &["shop"], routes)?;
    for p in &pods {
        wait_enrolled(&m.b, "shop", p.name(), true)?;
    }
    let l7 = L7 { m, apps, backends: pods };
    // Every backend answers through the mesh.
    for p in &l7.backends {
        let url = format!("http://{}:8080/ready", p.ip());
        wait_until(SETTLE, || Ok(curl(&l7.m.shop_client, &["-X", "GET", &url])?.0 == 200))
            .with_context(|| format!("{} never answered: {}", p.name(), l7.m.b.log()))?;
    }
    Ok(l7)
}

/// `curl ARGS` in `pod`: (status, the `x-mesh-reply` header, body).
fn curl(pod: &Pod, args: &[&str]) -> Result<(u16, String, String)> {
    let mut all = vec!["-s", "--max-time", "15", "-w", "\n%{http_code} %header{x-mesh-reply}"];
    all.extend_from_slice(args);
    let out = pod.run("curl", &all)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').with_context(|| format!("curl output {text:?}"))?;
    let (code, reply) = tail.split_once(' ').unwrap_or((tail, ""));
    Ok((code.trim().parse().with_context(|| format!("status in {text:?}"))?, reply.trim().to_owned(), body.to_owned()))
}

/// `meshhttp load` from the client: counts by status and by backend.
fn load(m: &Mesh, path: &str, requests: usize, headers: &[&str]) -> Result<Value> {
    let url = format!("http://{WEB}{path}");
    let n = requests.to_string();
    let mut args = vec!["load", "--url", &url, "--requests", &n];
    for h in headers {
        args.extend(["--header", h]);
    }
    let out = m.shop_client.run("meshhttp", &args)?;
    parse_ok(&m.shop_client, &out)
}

fn count(v: &Value, group: &str, key: &str) -> u64 {
    v[group][key].as_u64().unwrap_or(0)
}

const CANARY_ROUTES: &str = r#"httpRoutes:
  - name: web
    namespace: shop
    service: web
    rules:
      - matches:
          - headers: [{name: x-canary, exact: "1"}]
          - cookies: [{name: group, exact: beta}]
        backends: [{subset: {version: v2}}]
      - matches: [{path: {prefix: /canary}, method: GET}]
        backends:
          - {subset: {version: v1}, weight: 90}
          - {subset: {version: v2}, weight: 10}
      - backends: [{subset: {version: v1}}]
"#;

#[test]
fn canary_and_ab_routing_by_header_and_cookie() -> Result<()> {
    let l7 = l7_mesh("canary", &[("web-v1", "v1", 31), ("web-v2", "v2", 33)], &[], CANARY_ROUTES)?;
    let m = &l7.m;
    // 90/10 over 2,000 requests: v2 gets 200 +- 5 standard deviations
    // (sd = sqrt(2000 * 0.1 * 0.9) = 13.4).
    let v = load(m, "/canary/item", 2000, &[])?;
    ensure!(count(&v, "status", "200") == 2000, "{v}");
    let v2 = count(&v, "backend", "web-v2");
    ensure!((133..=267).contains(&v2), "canary share off: {v}");
    ensure!(count(&v, "backend", "web-v1") == 2000 - v2, "{v}");
    // A/B: the header or the cookie sends every request to v2.
    let v = load(m, "/canary/item", 200, &["x-canary: 1"])?;
    ensure!(count(&v, "backend", "web-v2") == 200, "{v}");
    let v = load(m, "/anything", 200, &["cookie: session=abc; group=beta"])?;
    ensure!(count(&v, "backend", "web-v2") == 200, "{v}");
    // Another cookie value, or no match: the last rule, v1 only.
    let v = load(m, "/anything", 200, &["cookie: group=alpha"])?;
    ensure!(count(&v, "backend", "web-v1") == 200, "{v}");
    // The agent counted the service's requests.
    let svc = &m.a.status()?["services"]["shop/web"];
    ensure!(svc["requests"].as_u64().unwrap_or(0) >= 2600, "{svc}");
    Ok(())
}

const RESILIENCE_ROUTES: &str = r#"httpRoutes:
  - name: web
    namespace: shop
    service: web
    rules:
      - matches: [{path: {prefix: /noretry}}]
        backends: [{}]
        retries: {attempts: 0}
      - matches: [{path: {prefix: /slow}}]
        backends: [{}]
        timeout: 500ms
      - backends: [{}]
    outlierDetection: {consecutive5xx: 3, baseEjectionTime: 5s, maxEjectionTime: 5s}
  - name: limited
    namespace: shop
    service: limited
    rules:
      - backends: [{}]
    circuitBreaker: {maxRequests: 2}
"#;

#[test]
fn retries_timeouts_ejection_and_circuit_breaking() -> Result<()> {
    let mut limited = ServiceSpec::new("limited", "shop").select("app", "web").ip([198, 51, 100, 101].into());
    limited.ports.push(ServicePort { name: "http".into(), port: 80, target_port: 8080 });
    let l7 = l7_mesh("resilience", &[("web-a", "v1", 41), ("web-b", "v1", 42)], &[limited], RESILIENCE_ROUTES)?;
    let m = &l7.m;

    // Every backend fails one request in three. Without retries the client
    // sees those failures; with the default retries it sees none.
    let v = load(m, "/noretry/flaky", 150, &[])?;
    ensure!(count(&v, "status", "503") >= 30, "the backends do not fail as expected: {v}");
    let before = m.a.status()?["services"]["shop/web"]["retries"].as_u64().unwrap_or(0);
    let v = load(m, "/flaky", 300, &[])?;
    ensure!(count(&v, "status", "200") == 300, "retries did not hide the failures: {v}");
    let retries = m.a.status()?["services"]["shop/web"]["retries"].as_u64().unwrap_or(0) - before;
    ensure!(retries >= 60, "{retries} retries for ~100 failures");
    // A non-idempotent request is not retried by default.
    let mut posts = BTreeMap::<u16, u32>::new();
    for _ in 0..9 {
        *posts.entry(curl(&m.shop_client, &["-X", "POST", "-d", "x", &format!("http://{WEB}/flaky")])?.0).or_default() += 1;
    }
    ensure!(posts.get(&503).copied().unwrap_or(0) >= 1, "POSTs were retried: {posts:?}");

    // A slow backend: 504 at the route's timeout, from the agent.
    let (code, reply, _) = curl(&m.shop_client, &[&format!("http://{WEB}/slow?ms=3000")])?;
    ensure!(code == 504 && reply == "timeout", "{code} {reply}");
    ensure!(curl(&m.shop_client, &[&format!("http://{WEB}/slow?ms=10")])?.0 == 200);

    // An endpoint answering 500 is ejected after 3 in a row; the client
    // sees exactly those 3, then only the healthy endpoint. First a
    // success at web-b: the flaky requests above can leave it one or two
    // 5xx into a run, and only a success ends a run.
    wait_until(SETTLE, || Ok(count(&load(m, "/noretry/x", 10, &[])?, "backend", "web-b") > 0))
        .context("web-b never answered")?;
    let broken = format!("http://{}:8080/control/broken", l7.backends[1].ip());
    ensure!(curl(&m.shop_client, &["-X", "POST", &broken])?.0 == 200);
    let v = load(m, "/noretry/x", 60, &[])?;
    ensure!(count(&v, "status", "500") == 3 && count(&v, "status", "200") == 57, "{v}");
    ensure!(count(&v, "backend", "web-b") == 3, "{v}");
    let ep = format!("{}:8080", l7.backends[1].ip());
    let endpoints = m.a.status()?["endpoints"].clone();
    ensure!(endpoints[&ep]["ejected"] == true && endpoints[&ep]["ejections"] == 1, "{endpoints}");
    // Mended, it comes back once the ejection time is over.
    let fixed = format!("http://{}:8080/control/fixed", l7.backends[1].ip());
    curl(&m.shop_client, &["-X", "POST", &fixed])?;
    wait_until(SETTLE, || Ok(count(&load(m, "/noretry/x", 20, &[])?, "backend", "web-b") > 0))
        .context("the ejected endpoint never came back")?;
    ensure!(m.a.status()?["services"]["shop/web"]["ejections"].as_u64() == Some(1));

    // Circuit breaker: two requests at most in flight to `limited`; the
    // rest fail fast with 503 from the agent.
    let url = "http://198.51.100.101:80/slow?ms=2000";
    let mut args = vec!["-s", "-Z", "--parallel-immediate", "--parallel-max", "8", "--max-time", "15"];
    for _ in 0..8 {
        args.extend(["-o", "/dev/null", "-w", "%{http_code} %header{x-mesh-reply}\n", url]);
    }
    let out = m.shop_client.run("curl", &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = text.lines().filter(|l| l.trim() == "200").count();
    let overflow = text.lines().filter(|l| l.trim() == "503 overflow").count();
    ensure!(ok == 2 && overflow == 6, "{text}");
    let svc = &m.a.status()?["services"]["shop/limited"];
    ensure!(svc["overflowRequests"] == 6, "{svc}");
    drop(l7.apps);
    Ok(())
}

#[test]
fn http2_multiplexing_grpc_and_large_bodies_through_a_service() -> Result<()> {
    let mut grpc = ServiceSpec::new("grpc", "shop").select("app", "grpc").ip([198, 51, 100, 102].into());
    grpc.ports.push(ServicePort { name: "grpc".into(), port: 9090, target_port: 9090 });
    let rr = "httpRoutes:\n  - {name: web, namespace: shop, service: web, rules: [{backends: [{}]}], loadBalancer: roundRobin}\n";
    let mut l7 = l7_mesh("h2grpc", &[("web-1", "v1", 51), ("web-2", "v1", 52)], &[grpc], rr)?;
    let grpc_pod = l7.m.tb.add_pod(PodSpec::new("grpc-server", "shop", "node-b", [198, 51, 100, 53].into()).label("app", "grpc"))?;
    let _server = grpc_pod.spawn("meshhttp", ["grpc-serve", "--port", "9090", "--name", "nodemesh.test"])?;
    _server.wait_for_stdout(SETTLE, |l| l.contains("listening"))?;
    write_with_extra(&l7.m, &["shop"], rr)?;
    wait_enrolled(&l7.m.b, "shop", "grpc-server", true)?;
    let m = &l7.m;

    // Ten concurrent streams on one HTTP/2 connection (one redirected
    // connect), to an HTTP/1.1 app: the agent fans them out.
    let before = counter(&m.a, "shop", "shop-client", "ebpf.redirected")?;
    let out = m.shop_client.run("meshhttp", ["multiplex", "--url", &format!("http://{WEB}/slow?ms=500"), "--streams", "10"])?;
    parse_ok(&m.shop_client, &out)?;
    ensure!(counter(&m.a, "shop", "shop-client", "ebpf.redirected")? == before + 1, "not one connection");
    let mut max_inflight = 0;
    for p in &l7.backends {
        let (_, _, body) = curl(&m.shop_client, &[&format!("http://{}:8080/stats", p.ip())])?;
        let s: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        max_inflight += s["max_inflight"].as_u64().unwrap_or(0);
    }
    ensure!(max_inflight >= 3, "the streams were not served concurrently (max in flight {max_inflight})");

    // An HTTP/1.1 Upgrade (the WebSocket handshake's shape): 101 through
    // both agents, then raw bytes both ways on the same connection.
    let client = r#"
import socket, sys
s = socket.create_connection(("198.51.100.100", 80), timeout=10)
s.sendall(b"GET /upgrade HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(1)
    if not chunk:
        sys.exit("closed before the response head: %r" % head)
    head += chunk
assert head.startswith(b"HTTP/1.1 101"), head
for i in range(3):
    msg = ("frame-%d" % i).encode() * 1000
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        got += s.recv(65536)
    assert got == msg, (len(got), len(msg))
print("upgraded ok")
"#;
    let out = m.shop_client.run("python3", ["-c", client])?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains("upgraded ok"), "{out:?}");

    // Round robin: the two endpoints take turns.
    let v = load(m, "/rr", 20, &[])?;
    ensure!(count(&v, "backend", "web-1") == 10 && count(&v, "backend", "web-2") == 10, "{v}");

    // A gRPC unary call, through the service and to the pod directly.
    for addr in ["198.51.100.102:9090", "198.51.100.53:9090"] {
        let out = m.shop_client.run("meshhttp", ["grpc-call", "--addr", addr, "--service", "nodemesh.test"])?;
        parse_ok(&m.shop_client, &out).with_context(|| format!("gRPC via {addr}: {}", m.a.log()))?;
    }

    // 6 MB up and back through the source agent's HTTP layer, intact (too
    // big to keep for a retry: streamed).
    let blob = m.tb.dir().join("blob");
    let data: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    std::fs::write(&blob, &data)?;
    let got = m.tb.dir().join("got");
    let (code, _, _) = curl(
        &m.shop_client,
        &["-X", "POST", "--data-binary", &format!("@{}", blob.display()), "-o", got.to_str().context("utf-8")?, &format!("http://{WEB}/echo")],
    )?;
    ensure!(code == 200, "{code}");
    ensure!(std::fs::read(&got)? == data, "the echoed body differs");
    l7.apps.clear();
    Ok(())
}
