//! The tour after the L4 paths: authorization, STRICT peer authentication,
//! routing and resilience, each shown with the numbers measured right then.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use mesh_e2e::{Agent, PeerAuthMode, PeerAuthenticationEntry, Pod, PodProcess, PodSpec, ServicePort, ServiceSpec, Testbed, wait_until};
use serde_json::Value;

use crate::SETTLE;

/// The HTTP backends behind service `web`: (pod, version, last octet).
pub const BACKENDS: [(&str, &str, u8); 2] = [("web-v1", "v1", 31), ("web-v2", "v2", 32)];
pub const WEB_IP: [u8; 4] = [198, 51, 100, 100];
pub const LIMITED_IP: [u8; 4] = [198, 51, 100, 101];
const APP_PORT: u16 = 8080;

/// Policies and routes on top of the testbed's generated config, and an
/// Istio DestinationRule as a document of the same stream. They only
/// select the `web` pods and services, so the L4 paths shown first are not
/// affected.
pub const L7_CONFIG: &str = r#"authorizationPolicies:
  - name: deny-admin
    namespace: shop
    selector: {app: web}
    action: DENY
    rules:
      - to: [{paths: ["/admin/*"]}]
  - name: allow-shop
    namespace: shop
    selector: {app: web}
    action: ALLOW
    rules:
      - from: [{namespaces: [shop]}]
httpRoutes:
  - name: web
    namespace: shop
    service: web
    rules:
      - matches: [{headers: [{name: x-canary, exact: "1"}]}]
        backends: [{subset: {version: v2}}]
      - matches: [{path: {prefix: /canary}, method: GET}]
        backends:
          - {subset: {version: v1}, weight: 90}
          - {subset: {version: v2}, weight: 10}
      - matches: [{path: {prefix: /noretry}}]
        backends: [{}]
        retries: {attempts: 0}
      - matches: [{path: {prefix: /flaky}}]
        backends: [{}]
      - backends: [{subset: {version: v1}}]
---
# Istio's own kind, as `kubectl apply` takes it: the same YAML works here
# and in a cluster.
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: limited, namespace: shop}
spec:
  host: limited
  trafficPolicy:
    connectionPool:
      http: {http2MaxRequests: 2}
"#;

/// The backends' app: `web.py NAME` on :8080. Answers carry `x-backend:
/// NAME` and echo the `traceparent` the app received; a path containing
/// `flaky` fails every third such request with 503; `/slow?ms=N` sleeps;
/// `/stats` reports how many requests it answered and how many it failed.
const APP: &str = r#"
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs
NAME = sys.argv[1]
lock = threading.Lock()
state = {"requests": 0, "flaky": 0, "failed": 0}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def handle_one(self):
        n = int(self.headers.get('content-length') or 0)
        if n: self.rfile.read(n)
        url = urlparse(self.path)
        code = 200
        body = "%s: hello (traceparent %s)\n" % (NAME, self.headers.get("traceparent"))
        with lock:
            state["requests"] += 1
        if url.path == "/stats":
            body = json.dumps(state)
        elif url.path.startswith("/slow"):
            time.sleep(int(parse_qs(url.query).get("ms", ["0"])[0]) / 1000)
        elif "flaky" in url.path:
            with lock:
                state["flaky"] += 1
                if state["flaky"] % 3 == 0:
                    state["failed"] += 1
                    code = 503
        body = body.encode()
        self.send_response(code)
        self.send_header('x-backend', NAME)
        self.send_header('content-length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = handle_one
    def log_message(self, *a): pass
print("listening", flush=True)
ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

/// Adds the backend pods (node-b, labelled `app: web` and their version)
/// and the two HTTP services to the testbed, before the config is written.
pub fn add_to(tb: &mut Testbed) -> Result<Vec<Pod>> {
    let mut pods = Vec::new();
    for (name, version, last) in BACKENDS {
        let spec = PodSpec::new(name, "shop", "node-b", [198, 51, 100, last].into())
            .label("app", "web")
            .label("version", version)
            .service_account("web");
        pods.push(tb.add_pod(spec)?);
    }
    for (name, ip) in [("web", WEB_IP), ("limited", LIMITED_IP)] {
        let mut svc = ServiceSpec::new(name, "shop").select("app", "web").ip(ip.into());
        svc.ports.push(ServicePort { name: "http".into(), port: 80, target_port: APP_PORT });
        tb.add_service(svc)?;
    }
    Ok(pods)
}

/// The testbed's config plus [`L7_CONFIG`], written atomically (agents
/// poll the file).
pub fn write_config(tb: &Testbed) -> Result<()> {
    let path = tb.config_path();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n{L7_CONFIG}", tb.config_yaml(&["shop"])))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Starts the app in each backend pod; returns once each answers through
/// the mesh from `client`.
pub fn start_apps(dir: &Path, backends: &[Pod], client: &Pod) -> Result<Vec<PodProcess>> {
    let script = dir.join("web.py");
    std::fs::write(&script, APP)?;
    let mut apps = Vec::new();
    for p in backends {
        let app = p.spawn("python3", [script.to_str().context("utf-8 path")?, p.name()])?;
        app.wait_for_stdout(SETTLE, |l| l.contains("listening"))
            .with_context(|| format!("the app in {} did not start: {}", p.id(), app.stderr()))?;
        apps.push(app);
    }
    for p in backends {
        let url = format!("http://{}:{APP_PORT}/ready", p.ip());
        wait_until(SETTLE, || Ok(curl(client, &[&url])?.code == 200))
            .with_context(|| format!("{} never answered through the mesh", p.id()))?;
    }
    Ok(apps)
}

/// What the tour works with.
pub struct Tour<'a> {
    pub tb: &'a mut Testbed,
    pub agents: &'a BTreeMap<&'static str, Agent>,
    pub pods: &'a BTreeMap<&'static str, Pod>,
}

impl Tour<'_> {
    fn pod(&self, name: &str) -> &Pod {
        &self.pods[name]
    }

    fn agent(&self, node: &str) -> &Agent {
        &self.agents[node]
    }

    /// Every section, in order; a failing section is reported and the tour
    /// goes on. Returns whether all of them showed what they should.
    pub fn run(&mut self) -> bool {
        let mut ok = true;
        ok &= section("Authorization policy (ALLOW / DENY, per HTTP request)", || self.authorization());
        ok &= section("STRICT peer authentication", || self.strict());
        ok &= section("Routing at the source: a 90/10 canary and an A/B route", || self.routing());
        ok &= section("Retries: a flaky backend", || self.retries());
        ok &= section("Circuit breaker: an Istio DestinationRule, more requests than http2MaxRequests", || self.circuit_breaker());
        ok
    }

    fn authorization(&self) -> Result<()> {
        println!("  policies on the web pods: DENY `deny-admin` (paths /admin/*), ALLOW `allow-shop` (from namespace shop; anyone else is denied by default)");
        let client = self.pod("shop-client");
        let web = format!("http://{}", ip(WEB_IP));
        let denied = curl(client, &[&format!("{web}/admin/users")])?;
        println!(
            "  shop-client GET /admin/users -> {} {} (x-mesh-reply: {})",
            denied.code,
            denied.body.trim(),
            denied.reply
        );
        let allowed = curl(client, &[&format!("{web}/")])?;
        println!("  shop-client GET / -> {} from {}", allowed.code, allowed.body.split(':').next().unwrap_or_default());
        let outsider = self.pod("legacy-client");
        let v1 = format!("http://{}.{}:{APP_PORT}/", "198.51.100", BACKENDS[0].2);
        let plain = curl(outsider, &[&v1])?;
        println!(
            "  legacy-client (outside the mesh, plaintext, no identity) GET {v1} -> {} {}",
            plain.code,
            plain.body.trim()
        );
        let denials = self.denials()?;
        println!("  denials counted by node-b's agent (/status proxy.inboundDenied): {}", fmt_map(&denials));
        ensure!(denied.code == 403 && denied.body.contains("deny-admin"), "the /admin request was not denied by deny-admin");
        ensure!(allowed.code == 200, "the allowed request failed");
        ensure!(plain.code == 403, "the plaintext client was not denied");
        Ok(())
    }

    /// `proxy.inboundDenied` summed over the web pods, by policy.
    fn denials(&self) -> Result<BTreeMap<String, u64>> {
        let status = self.agent("node-b").status()?;
        let mut out = BTreeMap::new();
        for p in status["pods"].as_array().into_iter().flatten() {
            if p["name"].as_str().is_some_and(|n| n.starts_with("web-")) {
                for (policy, n) in p["proxy"]["inboundDenied"].as_object().into_iter().flatten() {
                    *out.entry(policy.clone()).or_default() += n.as_u64().unwrap_or(0);
                }
            }
        }
        Ok(out)
    }

    fn strict(&mut self) -> Result<()> {
        let strict = PeerAuthenticationEntry::selecting("strict-shop-server", "shop", "app", "shop-server", PeerAuthMode::Strict);
        self.tb.add_peer_authentication(strict)?;
        self.apply_config()?;
        println!("  peerAuthentications: strict-shop-server (STRICT for app=shop-server), applied by editing the config file");
        let (client, outsider, server) = (self.pod("shop-client"), self.pod("legacy-client"), self.pod("shop-server"));
        let b = self.agent("node-b");
        let counter = |k: &str| -> Result<u64> {
            let p = b.pod_status("shop", "shop-server")?.context("shop-server not in node-b's status")?;
            Ok(match k {
                "refused" => p.proxy.inbound_plaintext_refused,
                _ => p.proxy.inbound,
            })
        };
        let (refused0, inbound0) = (counter("refused")?, counter("inbound")?);
        let to = format!("{}:{}", server.ip(), crate::PORT);
        let out = outsider.run("meshtest", ["send", "--to", &to, "--bytes", "65536", "--io-timeout", "10"])?;
        let plain_ok = out.status.success();
        let sent = client.run("meshtest", ["send", "--to", &to, "--bytes", "65536"])?;
        let mesh_ok = sent.status.success();
        let mut refused = 0;
        let _ = wait_until(SETTLE, || {
            refused = counter("refused")? - refused0;
            Ok(refused >= 1)
        });
        let inbound = counter("inbound")? - inbound0;
        println!(
            "  legacy-client -> shop-server:{} in plaintext: {} (node-b's agent: +{refused} plaintext refused); a moment ago, under PERMISSIVE, the same connection was delivered",
            crate::PORT,
            if plain_ok { "DELIVERED" } else { "reset by the agent" }
        );
        println!(
            "  shop-client -> shop-server over mTLS: {} (+{inbound} inbound)",
            if mesh_ok { "delivered, 64 KiB echoed intact" } else { "FAILED" }
        );
        ensure!(!plain_ok && refused >= 1, "the plaintext client was not refused");
        ensure!(mesh_ok, "mesh traffic failed under STRICT");
        Ok(())
    }

    /// Rewrites the config and waits until both agents have applied it.
    fn apply_config(&self) -> Result<()> {
        let generation = |a: &Agent| -> Result<u64> { Ok(a.status()?["config"]["generation"].as_u64().unwrap_or(0)) };
        let before: Vec<u64> = self.agents.values().map(generation).collect::<Result<_>>()?;
        write_config(&*self.tb)?;
        wait_until(SETTLE, || {
            let now: Vec<u64> = self.agents.values().map(generation).collect::<Result<_>>()?;
            Ok(now.iter().zip(&before).all(|(n, b)| n > b))
        })
        .context("the agents did not apply the edited config")
    }

    fn routing(&self) -> Result<()> {
        println!("  route `web`: x-canary: 1 -> v2; GET /canary* -> v1 90%, v2 10%; everything else -> v1");
        const CANARY: usize = 1000;
        let canary = self.load("/canary/item", CANARY, &[])?;
        let share = backend(&canary, "web-v2") as f64 * 100.0 / CANARY as f64;
        println!("  canary: {CANARY} requests to /canary/item: {} (v2 took {share:.1}%)", fmt_backends(&canary));
        let ab = self.load("/item", 50, &["x-canary: 1"])?;
        println!("  A/B: 50 requests with x-canary: 1: {}", fmt_backends(&ab));
        let plain = self.load("/item", 50, &[])?;
        println!("  A/B: 50 requests without the header: {}", fmt_backends(&plain));
        let (v1, v2) = (backend(&canary, "web-v1"), backend(&canary, "web-v2"));
        ensure!(status(&canary, "200") == CANARY as u64 && v1 > 0 && v2 > 0 && v1 > v2, "the canary split is off: {canary}");
        ensure!(backend(&ab, "web-v2") == 50, "the header route missed: {ab}");
        ensure!(backend(&plain, "web-v1") == 50, "the default route missed: {plain}");
        Ok(())
    }

    /// `meshhttp load` from shop-client to the `web` service.
    fn load(&self, path: &str, requests: usize, headers: &[&str]) -> Result<Value> {
        let url = format!("http://{}:80{path}", ip(WEB_IP));
        let n = requests.to_string();
        let mut args = vec!["load", "--url", &url, "--requests", &n];
        for h in headers {
            args.extend(["--header", h]);
        }
        let client = self.pod("shop-client");
        let out = client.run("meshhttp", &args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .with_context(|| format!("meshhttp load printed no JSON: {stdout} {}", String::from_utf8_lossy(&out.stderr)))?;
        ensure!(v["failed"] == 0, "{} requests failed: {v}", v["failed"]);
        Ok(v)
    }

    /// 503s the backends' apps answered so far (their own count).
    fn app_failures(&self) -> Result<u64> {
        let client = self.pod("shop-client");
        let mut failed = 0;
        for (_, _, last) in BACKENDS {
            let r = curl(client, &[&format!("http://198.51.100.{last}:{APP_PORT}/stats")])?;
            let v: Value = serde_json::from_str(&r.body).with_context(|| format!("/stats: {}", r.body))?;
            failed += v["failed"].as_u64().unwrap_or(0);
        }
        Ok(failed)
    }

    fn service_stat(&self, service: &str, field: &str) -> Result<u64> {
        Ok(self.agent("node-a").status()?["services"][service][field].as_u64().unwrap_or(0))
    }

    fn retries(&self) -> Result<()> {
        const N: usize = 90;
        println!("  both backends answer 503 to every third /…flaky… request");
        let f0 = self.app_failures()?;
        let without = self.load("/noretry/flaky", N, &[])?;
        let f1 = self.app_failures()?;
        let r0 = self.service_stat("shop/web", "retries")?;
        let with = self.load("/flaky", N, &[])?;
        let f2 = self.app_failures()?;
        let retries = self.service_stat("shop/web", "retries")? - r0;
        let seen = |v: &Value| N as u64 - status(v, "200");
        println!(
            "  without retries (route rule attempts: 0): {N} requests, the apps failed {}, the client saw {} failures",
            f1 - f0,
            seen(&without)
        );
        println!(
            "  with the default retries (2 attempts, on another endpoint): {N} requests, the apps failed {}, the client saw {} failures; node-a's agent retried {retries} times (/status services.shop/web.retries)",
            f2 - f1,
            seen(&with)
        );
        ensure!(f2 - f1 > 0 && retries > 0, "no failure was retried");
        ensure!(seen(&with) < f2 - f1, "the retries did not hide the failures");
        Ok(())
    }

    fn circuit_breaker(&self) -> Result<()> {
        const PARALLEL: usize = 8;
        println!("  service `limited` (the same pods): DestinationRule `limited`, connectionPool.http.http2MaxRequests: 2; {PARALLEL} requests at once that each take 1.5 s");
        let o0 = self.service_stat("shop/limited", "overflowRequests")?;
        let url = format!("http://{}:80/slow?ms=1500", ip(LIMITED_IP));
        let max = PARALLEL.to_string();
        let mut args = vec!["-s", "-Z", "--parallel-immediate", "--parallel-max", max.as_str(), "--max-time", "15"];
        for _ in 0..PARALLEL {
            args.extend(["-o", "/dev/null", "-w", "%{http_code} %{time_total} %header{x-mesh-reply}\n", url.as_str()]);
        }
        let out = self.pod("shop-client").run("curl", &args)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (mut ok, mut overflow) = (Vec::new(), Vec::new());
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let secs = f.get(1).and_then(|t| t.parse::<f64>().ok()).unwrap_or_default();
            match (f.first(), f.get(2)) {
                (Some(&"200"), _) => ok.push(secs),
                (Some(&"503"), Some(&"overflow")) => overflow.push(secs),
                _ => println!("  unexpected answer: {l}"),
            }
        }
        let ms = |v: &[f64]| v.iter().copied().fold(0.0, f64::max) * 1000.0;
        let overflows = self.service_stat("shop/limited", "overflowRequests")? - o0;
        println!(
            "  {} answered 200 (slowest {:.0} ms); {} got 503 x-mesh-reply: overflow at once (slowest {:.0} ms); node-a's agent counted {overflows} overflows",
            ok.len(),
            ms(&ok),
            overflow.len(),
            ms(&overflow)
        );
        ensure!(!ok.is_empty() && !overflow.is_empty(), "no overflow: {text}");
        Ok(())
    }
}

/// Prints a section's heading, runs it, reports a failure in words.
pub fn section(title: &str, f: impl FnOnce() -> Result<()>) -> bool {
    println!("\n== {title} ==");
    match f() {
        Ok(()) => true,
        Err(e) => {
            println!("  FAILED: {e:#}");
            false
        }
    }
}

pub struct Reply {
    pub code: u16,
    pub reply: String,
    pub body: String,
}

/// `curl ARGS` in `pod`: status, `x-mesh-reply` and body.
pub fn curl(pod: &Pod, args: &[&str]) -> Result<Reply> {
    let mut all = vec!["-s", "--max-time", "15", "-w", "\n%{http_code} %header{x-mesh-reply}"];
    all.extend_from_slice(args);
    let out = pod.run("curl", &all)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').with_context(|| format!("curl output {text:?}"))?;
    let (code, reply) = tail.split_once(' ').unwrap_or((tail, ""));
    Ok(Reply {
        code: code.trim().parse().with_context(|| format!("status in {text:?}"))?,
        reply: reply.trim().to_owned(),
        body: body.to_owned(),
    })
}

fn ip(o: [u8; 4]) -> std::net::Ipv4Addr {
    o.into()
}

fn status(v: &Value, code: &str) -> u64 {
    v["status"][code].as_u64().unwrap_or(0)
}

fn backend(v: &Value, name: &str) -> u64 {
    v["backend"][name].as_u64().unwrap_or(0)
}

fn fmt_backends(v: &Value) -> String {
    let mut parts: Vec<String> = BACKENDS.iter().map(|(n, _, _)| format!("{n} {}", backend(v, n))).collect();
    let errors: u64 = v["status"].as_object().into_iter().flatten().filter(|(k, _)| *k != "200").filter_map(|(_, n)| n.as_u64()).sum();
    if errors > 0 {
        parts.push(format!("{errors} not 200"));
    }
    parts.join(", ")
}

fn fmt_map(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
}
