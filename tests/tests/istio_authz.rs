//! Issue 15, item 1: Istio's own AuthorizationPolicy and PeerAuthentication
//! objects, shaped as Istio's documentation writes them (the "allow
//! nothing", "deny by namespace" and "allow GET from a service account"
//! examples, the mesh-wide STRICT default), applied through the local file
//! as more documents of its YAML stream, against real pods.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_e2e::{Pod, ServicePort, ServiceSpec, wait_until};

const APP: &str = r#"
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_one(self):
        print(json.dumps({"method": self.command, "path": self.path}), flush=True)
        body = ("ok %s %s\n" % (self.command, self.path)).encode()
        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers(); self.wfile.write(body)
    do_GET = do_POST = handle_one
    def log_message(self, *a): pass
ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

/// Istio's "allow nothing": an ALLOW policy without rules.
const ALLOW_NOTHING: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: shop
spec:
  {}
"#;

/// Istio's "deny requests from other namespaces".
const DENY_OTHER_NAMESPACES: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: shop-server-deny
  namespace: shop
spec:
  selector:
    matchLabels:
      app: shop-server
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["shop"]
"#;

/// Istio's "allow GET from a service account", with a DENY on /admin.
const ALLOW_GET: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: shop-server-get
  namespace: shop
spec:
  selector:
    matchLabels:
      app: shop-server
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/shop-client"]
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: shop
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*"]
"#;

/// Istio's mesh-wide mutual TLS: STRICT in the root namespace.
const MESH_STRICT: &str = r#"---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"#;

/// `curl` in `pod` to the shop server: (status, body); status 0 when the
/// connection itself failed.
fn curl(pod: &Pod, method: &str, path: &str) -> Result<(u16, String)> {
    let url = format!("http://198.51.100.12:8080{path}");
    let out = pod.run("curl", ["-s", "--path-as-is", "-X", method, "-w", "\n%{http_code}", "--max-time", "10", url.as_str()])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').with_context(|| format!("curl output {text:?}"))?;
    Ok((code.trim().parse().with_context(|| format!("status in {text:?}"))?, body.to_owned()))
}

#[test]
fn istio_documentation_examples_apply_unchanged() -> Result<()> {
    let opts = MeshOpts { enrolled: &["shop", "legacy"], named_service_accounts: true, ..MeshOpts::default() };
    let mut m = mesh_with("istio-authz", &opts)?;
    let mut svc = ServiceSpec::new("shop-server", "shop").select("app", "shop-server");
    svc.ports.push(ServicePort { name: "http".into(), port: 8080, target_port: 8080 });
    m.tb.add_service(svc)?;
    let script = m.tb.dir().join("app.py");
    std::fs::write(&script, APP)?;
    let _app = m.shop_server.spawn("python3", [script.to_str().context("utf-8")?])?;
    write_with_extra(&m, &["shop", "legacy"], "")?;
    wait_until(SETTLE, || Ok(curl(&m.shop_client, "GET", "/ready").map(|r| r.0 == 200).unwrap_or(false)))?;
    ensure!(curl(&m.legacy_client, "GET", "/hello")?.0 == 200, "no policy: open");

    // Allow nothing: every request is denied, naming why.
    write_with_extra(&m, &["shop", "legacy"], ALLOW_NOTHING)?;
    let (code, body) = curl(&m.shop_client, "GET", "/hello")?;
    ensure!(code == 403 && body.contains("no ALLOW policy matched"), "{code} {body}");

    // Deny by namespace: legacy's client is denied by the policy, shop's is not.
    write_with_extra(&m, &["shop", "legacy"], DENY_OTHER_NAMESPACES)?;
    let (code, body) = curl(&m.legacy_client, "GET", "/hello")?;
    ensure!(code == 403 && body.contains("shop/shop-server-deny"), "{code} {body}");
    ensure!(curl(&m.shop_client, "GET", "/hello")?.0 == 200);

    // Allow GET from one service account; /admin denied to it too.
    write_with_extra(&m, &["shop", "legacy"], ALLOW_GET)?;
    let (code, body) = curl(&m.shop_client, "GET", "/hello")?;
    ensure!(code == 200 && body.starts_with("ok GET /hello"), "{code} {body}");
    let (code, body) = curl(&m.shop_client, "POST", "/hello")?;
    ensure!(code == 403 && body.contains("no ALLOW policy matched"), "{code} {body}");
    let (code, body) = curl(&m.shop_client, "GET", "/x/../admin")?;
    ensure!(code == 403 && body.contains("shop/deny-admin"), "{code} {body}");
    ensure!(curl(&m.legacy_client, "GET", "/hello")?.0 == 403, "another service account");

    // Mesh-wide STRICT: a plaintext client (legacy, out of the mesh) is
    // refused before any policy; the mesh client still gets through.
    write_with_extra(&m, &["shop"], &format!("{ALLOW_GET}{MESH_STRICT}"))?;
    wait_enrolled(&m.a, "legacy", "legacy-client", false)?;
    ensure!(curl(&m.legacy_client, "GET", "/hello")?.0 == 0, "plaintext got an answer under mesh-wide STRICT");
    ensure!(curl(&m.shop_client, "GET", "/hello")?.0 == 200);
    let proxy = &pod_json(&m.b, "shop", "shop-server")?["proxy"];
    ensure!(proxy["inboundPlaintextRefused"].as_u64() >= Some(1), "the refusal was not counted: {proxy}");
    Ok(())
}
