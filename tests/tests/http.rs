//! Issue (L7, first part): per-request authorization at the destination
//! node's agent for ports declared HTTP, with path normalization.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_e2e::{Pod, ServicePort, ServiceSpec, wait_until};

const APP: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_one(self):
        n = int(self.headers.get('content-length') or 0)
        data = self.rfile.read(n) if n else b""
        print(json.dumps({"method": self.command, "path": self.path, "bytes": len(data), "conn": self.client_address[1]}), flush=True)
        if self.path.startswith("/echo"):
            body = data
        else:
            body = ("ok %s %s peer=%s\n" % (self.command, self.path, self.headers.get('x-mesh-peer-identity'))).encode()
        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers(); self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = handle_one
    def log_message(self, *a): pass
ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

const POLICIES: &str = r#"authorizationPolicies:
  - name: get-only
    namespace: shop
    selector: {app: shop-server}
    action: ALLOW
    rules:
      - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/shop-client"]}]
        to: [{methods: [GET]}]
  - name: deny-admin
    namespace: shop
    action: DENY
    rules:
      - to: [{paths: ["/admin", "/admin/*"]}]
"#;

/// `curl` in `pod`: (status, body).
fn curl(pod: &Pod, method: &str, path: &str, extra: &[&str]) -> Result<(u16, String)> {
    let url = format!("http://198.51.100.12:8080{path}");
    let mut args = vec!["-s", "--path-as-is", "-X", method, "-w", "\n%{http_code}", "--max-time", "10"];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = pod.run("curl", &args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').with_context(|| format!("curl output {text:?}"))?;
    Ok((code.trim().parse().with_context(|| format!("status in {text:?}"))?, body.to_owned()))
}

#[test]
fn requests_are_authorized_one_by_one() -> Result<()> {
    let opts = MeshOpts { enrolled: &["shop", "legacy"], named_service_accounts: true, ..MeshOpts::default() };
    let mut m = mesh_with("http", &opts)?;
    let mut svc = ServiceSpec::new("shop-server", "shop").select("app", "shop-server");
    svc.ports.push(ServicePort { name: "http".into(), port: 8080, target_port: 8080 });
    m.tb.add_service(svc)?;
    let script = m.tb.dir().join("app.py");
    std::fs::write(&script, APP)?;
    let app = m.shop_server.spawn("python3", [script.to_str().context("utf-8")?])?;
    // Policies and the service in one edit.
    write_with_extra(&m, &["shop", "legacy"], POLICIES)?;
    wait_until(SETTLE, || Ok(curl(&m.shop_client, "GET", "/ready", &[]).map(|r| r.0 == 200).unwrap_or(false)))?;

    // GET allowed, with the verified identity (a forged one is replaced).
    let (code, body) = curl(&m.shop_client, "GET", "/hello", &["-H", "x-mesh-peer-identity: spiffe://evil/ns/x/sa/y"])?;
    ensure!(code == 200, "{code} {body}");
    ensure!(body.contains("peer=spiffe://cluster.local/ns/shop/sa/shop-client"), "{body}");
    // POST denied for the same principal; a second principal denied everything.
    let (code, body) = curl(&m.shop_client, "POST", "/hello", &["-d", "x"])?;
    ensure!(code == 403 && body.contains("RBAC"), "{code} {body}");
    ensure!(curl(&m.legacy_client, "GET", "/hello", &[])?.0 == 403);

    // DENY on /admin: no spelling gets through, and the app never sees one.
    for p in [
        "/admin", "//admin", "/./admin", "/x/../admin", "/%61dmin", "/admin/", "/admin?x=1", "/admin/x",
        "/admin%2f", "/admin%2Fx", "/%2e/admin", "/%2E%2E/admin", "/x/..%2fadmin", "/admin;x", "/admin%00",
    ] {
        let (code, body) = curl(&m.shop_client, "GET", p, &[])?;
        ensure!(code == 403 || code == 400, "{p}: {code} {body}");
    }
    let seen = app.stdout_lines();
    ensure!(!seen.iter().any(|l| l.to_ascii_lowercase().contains("admin")), "the app saw: {seen:?}");
    ensure!(!seen.iter().any(|l| l.contains("POST")), "the app saw a denied POST: {seen:?}");
    // Normalized requests reach the app normalized.
    ensure!(curl(&m.shop_client, "GET", "/a//b/./c/../d", &[])?.0 == 200);
    ensure!(app.stdout_lines().iter().any(|l| l.contains("\"/a/b/d\"")), "{:?}", app.stdout_lines());
    // Malformed HTTP (bad header syntax, oversized headers): refused by the
    // agent with a 4xx, counted, never forwarded.
    let before = counter(&m.b, "shop", "shop-server", "proxy.httpRejected")?;
    let big = "x".repeat(100 << 10);
    for raw in [
        format!("GET /big HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"),
        "GET /bad HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n".to_owned(),
    ] {
        let out = m.shop_client.run("meshtest", ["raw", "--to", "198.51.100.12:8080", "--text", &raw])?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "HTTP/1.1 4" in hex, and not the policy's 403 ("HTTP/1.1 403").
        ensure!(text.contains("\"firstBytesHex\":\"485454502f312e312034"), "{}: {text}", &raw[..20]);
        ensure!(!text.contains("\"firstBytesHex\":\"485454502f312e3120343033"), "{}: {text}", &raw[..20]);
    }
    wait_until(SETTLE, || Ok(counter(&m.b, "shop", "shop-server", "proxy.httpRejected")? >= before + 2))
        .with_context(|| format!("httpRejected {:?} (before {before}); log: {}", counter(&m.b, "shop", "shop-server", "proxy.httpRejected"), m.b.log().lines().filter(|l| l.contains("HTTP")).collect::<Vec<_>>().join("\n")))?;
    let seen = app.stdout_lines();
    ensure!(!seen.iter().any(|l| l.contains("/big") || l.contains("/bad")), "{seen:?}");
    let denied = pod_json(&m.b, "shop", "shop-server")?["proxy"]["inboundDenied"].clone();
    ensure!(denied["shop/deny-admin"].as_u64().unwrap_or(0) >= 8, "{denied}");
    Ok(())
}

/// Without policies: HTTP/1.1 keep-alive, HTTP/2 (h2c) multiplexing and
/// multi-megabyte request and response bodies through both agents.
#[test]
fn http1_keepalive_http2_and_large_bodies() -> Result<()> {
    let opts = MeshOpts { enrolled: &["shop"], named_service_accounts: true, ..MeshOpts::default() };
    let mut m = mesh_with("httpbig", &opts)?;
    let mut svc = ServiceSpec::new("shop-server", "shop").select("app", "shop-server");
    svc.ports.push(ServicePort { name: "http".into(), port: 8080, target_port: 8080 });
    m.tb.add_service(svc)?;
    m.tb.write_config(&m.tb.config_path(), &["shop"])?;
    let script = m.tb.dir().join("app.py");
    std::fs::write(&script, APP)?;
    let app = m.shop_server.spawn("python3", [script.to_str().context("utf-8")?])?;
    wait_until(SETTLE, || Ok(m.b.status()?["config"]["generation"] == 2))?;
    wait_until(SETTLE, || Ok(curl(&m.shop_client, "GET", "/ready", &[]).map(|r| r.0 == 200).unwrap_or(false)))?;

    // Keep-alive: three requests, one connection (one redirected connect).
    let before = counter(&m.a, "shop", "shop-client", "ebpf.redirected")?;
    let out = m.shop_client.run(
        "curl",
        ["-s", "-o", "/dev/null", "-w", "%{http_code}\n", "http://198.51.100.12:8080/1", "http://198.51.100.12:8080/2", "http://198.51.100.12:8080/3"],
    )?;
    ensure!(String::from_utf8_lossy(&out.stdout).lines().filter(|l| *l == "200").count() == 3, "{out:?}");
    ensure!(counter(&m.a, "shop", "shop-client", "ebpf.redirected")? == before + 1, "not one connection");

    // Client connections come and go; the agent keeps its connections to
    // the app: ten clients one after the other, one request each, reach the
    // app over one or two connections (not ten).
    for i in 0..10 {
        ensure!(curl(&m.shop_client, "GET", &format!("/reuse{i}"), &[])?.0 == 200);
    }
    let ports: std::collections::BTreeSet<u64> = app
        .stdout_lines()
        .iter()
        .filter(|l| l.contains("/reuse"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["conn"].as_u64())
        .collect();
    ensure!(!ports.is_empty() && ports.len() <= 2, "the app saw the 10 requests on connections from ports {ports:?}");

    // HTTP/2 with prior knowledge (h2c), on two connections at once; the
    // agent speaks HTTP/1.1 to this app (its port is declared `http`).
    let out = m.shop_client.run(
        "curl",
        ["-s", "-Z", "--parallel-immediate", "--http2-prior-knowledge", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_version} %{http_code}\n",
         "http://198.51.100.12:8080/h2a", "http://198.51.100.12:8080/h2b"],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.lines().filter(|l| *l == "2 200").count() == 2, "{text} {}", String::from_utf8_lossy(&out.stderr));

    // 6 MB up and back down, intact.
    let blob = m.tb.dir().join("blob");
    let data: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&blob, &data)?;
    let got = m.tb.dir().join("got");
    let (code, _) = curl(
        &m.shop_client,
        "POST",
        "/echo",
        &["--data-binary", &format!("@{}", blob.display()), "-H", "content-type: application/octet-stream", "-o", got.to_str().context("utf-8")?],
    )?;
    ensure!(code == 200, "{code}");
    ensure!(std::fs::read(&got)? == data, "echoed body differs");
    ensure!(app.stdout_lines().iter().any(|l| l.contains(&format!("\"bytes\": {}", 6u32 << 20))), "{:?}", app.stdout_lines());
    Ok(())
}

const DENY_ADMIN_ONLY: &str = r#"authorizationPolicies:
  - name: deny-admin
    namespace: shop
    action: DENY
    rules:
      - to: [{paths: ["/admin", "/admin/*"]}]
"#;

/// A port no service declares, under a policy that names paths: the agent
/// detects HTTP from the first bytes and authorizes each request (at L4 the
/// DENY would have refused every connection); a client that does not speak
/// HTTP is refused as before. Over the tunnel and from plaintext clients.
#[test]
fn undeclared_port_is_detected_as_http_when_policy_needs_it() -> Result<()> {
    let opts = MeshOpts { enrolled: &["shop"], named_service_accounts: true, ..MeshOpts::default() };
    let m = mesh_with("sniff", &opts)?;
    let script = m.tb.dir().join("app.py");
    std::fs::write(&script, APP)?;
    let app = m.shop_server.spawn("python3", [script.to_str().context("utf-8")?])?;
    write_with_extra(&m, &["shop"], DENY_ADMIN_ONLY)?;
    for client in [&m.shop_client, &m.legacy_client] {
        wait_until(SETTLE, || Ok(curl(client, "GET", "/ready", &[]).map(|r| r.0 == 200).unwrap_or(false)))
            .with_context(|| format!("{}: {}", client.name(), m.b.log()))?;
        let (code, body) = curl(client, "GET", "/hello", &[])?;
        ensure!(code == 200, "{}: {code} {body}", client.name());
        for p in ["/admin", "//admin/x", "/%61dmin"] {
            let (code, body) = curl(client, "GET", p, &[])?;
            ensure!(code == 403 || code == 400, "{} {p}: {code} {body}", client.name());
        }
    }
    // Only the mesh client's identity reaches the app.
    ensure!(curl(&m.shop_client, "GET", "/who", &[])?.1.contains("peer=spiffe://cluster.local/ns/shop/sa/shop-client"));
    ensure!(!app.stdout_lines().iter().any(|l| l.contains("admin")), "{:?}", app.stdout_lines());
    // Not HTTP: the connection-level DENY applies.
    let before = pod_json(&m.b, "shop", "shop-server")?["proxy"]["inboundDenied"]["shop/deny-admin"].as_u64().unwrap_or(0);
    ensure!(send(&m.shop_client, &server(&m.shop_server), 1024).is_err(), "a non-HTTP client got through");
    let after = pod_json(&m.b, "shop", "shop-server")?["proxy"]["inboundDenied"]["shop/deny-admin"].as_u64().unwrap_or(0);
    ensure!(after > before, "denial not counted");
    Ok(())
}
