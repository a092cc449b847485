//! Issue (observability): Istio-compatible metrics on both agents for a
//! known mix of requests and bytes; `/config_dump` without secrets.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_e2e::{Agent, wait_until};

const APP: &str = r#"
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def handle_one(self):
        n = int(self.headers.get('content-length') or 0)
        if n: self.rfile.read(n)
        body = b"x" * 100
        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers(); self.wfile.write(body)
    do_GET = do_POST = handle_one
    def log_message(self, *a): pass
print("listening", flush=True)
ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

const GET_ONLY: &str = r#"authorizationPolicies:
  - name: get-only
    namespace: shop
    selector: {app: shop-server}
    action: ALLOW
    rules:
      - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/shop-client"]}]
"#;

const GET_ONLY_HTTP: &str = r#"        to: [{methods: [GET], ports: [8080]}]
      - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/shop-client"]}]
        to: [{ports: [9000]}]
"#;

#[test]
fn metrics_count_requests_and_bytes_on_both_agents() -> Result<()> {
    // A public metrics port on each agent (a free port, picked here).
    let free = || -> Result<String> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string()) };
    let (pa, pb) = (free()?, free()?);
    let (fa, fb) = (["--metrics", pa.as_str()], ["--metrics", pb.as_str()]);
    let node_args: [(&str, &[&str]); 2] = [("node-a", &fa), ("node-b", &fb)];
    let opts = MeshOpts { enrolled: &["shop"], named_service_accounts: true, node_args: &node_args, ..MeshOpts::default() };
    let mut m = mesh_with("metrics", &opts)?;
    let _app = serve_http_app(&mut m, APP)?;
    write_with_extra(&m, &["shop"], &format!("{GET_ONLY}{GET_ONLY_HTTP}"))?;
    let url = "http://198.51.100.100:80/x";
    wait_until(SETTLE, || {
        let out = m.shop_client.run("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", url])?;
        Ok(String::from_utf8_lossy(&out.stdout) == "200")
    })?;
    // The probe above made at least one request; count from here.
    let base = |agent: &Agent, reporter: &str, code: &str| {
        metric(agent, "istio_requests_total", &[("reporter", reporter), ("response_code", code), ("source_workload", "shop-client")])
    };
    let before = [base(&m.a, "source", "200")?, base(&m.b, "destination", "200")?];

    // The mix: 5 GETs allowed, 3 POSTs denied by policy, one 1,000-byte
    // plain TCP exchange.
    for _ in 0..5 {
        let out = m.shop_client.run("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", url])?;
        ensure!(String::from_utf8_lossy(&out.stdout) == "200");
    }
    for _ in 0..3 {
        let out = m.shop_client.run("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-d", "abc", url])?;
        ensure!(String::from_utf8_lossy(&out.stdout) == "403");
    }
    send(&m.shop_client, &server(&m.shop_server), 1000)?;

    let common = [
        ("source_workload", "shop-client"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/shop-client"),
        ("destination_workload", "shop-server"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/shop-server"),
        ("destination_service", "shop-server.shop.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "http"),
        // What Kiali groups by, as Istio derives it from the pods' labels
        // (`app` only here) and the cluster id (Istio's default).
        ("source_canonical_service", "shop-client"),
        ("source_canonical_revision", "latest"),
        ("source_version", "unknown"),
        ("source_cluster", "Kubernetes"),
        ("destination_canonical_service", "shop-server"),
        ("destination_canonical_revision", "latest"),
        ("destination_version", "unknown"),
        ("destination_cluster", "Kubernetes"),
    ];
    for (agent, reporter, i) in [(&m.a, "source", 0), (&m.b, "destination", 1)] {
        let with = |code: &'static str| {
            let mut l = common.to_vec();
            l.extend([("reporter", reporter), ("response_code", code)]);
            l
        };
        // Recorded when the response ends: give the last one a moment.
        wait_until(SETTLE, || Ok(metric(agent, "istio_requests_total", &with("403"))? == 3.0))
            .with_context(|| format!("{reporter}: 403s: {:?}", metric(agent, "istio_requests_total", &with("403"))))?;
        let ok = metric(agent, "istio_requests_total", &with("200"))? - before[i];
        ensure!(ok == 5.0, "{reporter}: {ok} requests with 200");
        let count = metric(agent, "istio_request_duration_milliseconds_count", &with("403"))?;
        ensure!(count == 3.0, "{reporter}: duration count {count}");
        // Request bodies: 3 bytes each for the POSTs.
        let sum = metric(agent, "istio_request_bytes_sum", &with("403"))?;
        ensure!(sum == 9.0, "{reporter}: request bytes {sum}");
    }
    // Destination: the denial flag; both: the 200s' response bodies.
    let denied = metric(&m.b, "istio_requests_total", &[("reporter", "destination"), ("response_code", "403"), ("response_flags", "RBAC")])?;
    ensure!(denied == 3.0, "{denied}");
    // TCP on both agents: one connection, 1,000 bytes each way.
    for (agent, reporter) in [(&m.a, "source"), (&m.b, "destination")] {
        let l = [
            ("reporter", reporter),
            ("request_protocol", "tcp"),
            ("destination_workload", "shop-server"),
            ("source_workload", "shop-client"),
            ("source_canonical_service", "shop-client"),
            ("source_cluster", "Kubernetes"),
            ("destination_canonical_service", "shop-server"),
            ("destination_canonical_revision", "latest"),
            ("destination_cluster", "Kubernetes"),
        ];
        wait_until(SETTLE, || Ok(metric(agent, "istio_tcp_connections_closed_total", &l)? == 1.0))
            .with_context(|| format!("{reporter}: TCP closed"))?;
        ensure!(metric(agent, "istio_tcp_connections_opened_total", &l)? == 1.0);
        ensure!(metric(agent, "istio_tcp_received_bytes_total", &l)? == 1000.0, "{reporter}: received");
        ensure!(metric(agent, "istio_tcp_sent_bytes_total", &l)? == 1000.0, "{reporter}: sent");
    }
    // The agent's own health.
    let (_, body) = m.b.get("/metrics")?;
    let text = String::from_utf8(body)?;
    let denials: f64 = text
        .lines()
        .filter(|l| l.starts_with("nodemesh_policy_denials_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    ensure!(denials == 3.0, "policy denials {denials}");
    for want in ["nodemesh_enrolled_pods 1.0", "process_resident_memory_bytes ", "nodemesh_certificate_expiry_timestamp_seconds{namespace=\"shop\",pod=\"shop-server\"}"] {
        ensure!(text.contains(want), "{want} missing in /metrics");
    }
    // The config dump: the state, and never a private key.
    let (code, body) = m.b.get("/config_dump")?;
    let dump = String::from_utf8(body)?;
    ensure!(code == 200 && dump.contains("\"get-only\"") && dump.contains("shop-server"), "{code} {dump}");
    ensure!(!dump.contains("PRIVATE KEY") && !dump.contains("-----BEGIN"), "{dump}");
    // The public metrics port serves /metrics, the probes and /status
    // (for `status --all-nodes` through the API server), nothing else.
    for (addr, agent) in [(&pa, &m.a), (&pb, &m.b)] {
        let addr: std::net::SocketAddr = addr.parse()?;
        let (code, body) = mesh_e2e::http_get(addr, "/metrics")?;
        ensure!(code == 200 && String::from_utf8_lossy(&body).contains("istio_requests_total{"), "{}: {code}", agent.node());
        ensure!(mesh_e2e::http_get(addr, "/ready")?.0 == 200);
        let (code, body) = mesh_e2e::http_get(addr, "/status")?;
        ensure!(code == 200 && serde_json::from_slice::<serde_json::Value>(&body)?["node"] == agent.node(), "/status: {code}");
        ensure!(mesh_e2e::http_get(addr, "/config_dump")?.0 == 404, "config dump exposed on the public port");
        ensure!(mesh_e2e::http_get(addr, "/logging")?.0 == 404, "the log filter exposed on the public port");
    }
    // Every metric the Grafana dashboard queries exists.
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/observability/grafana-dashboard.json"))?;
    let dash: serde_json::Value = serde_json::from_str(&dashboard)?;
    let all = format!("{}{}", String::from_utf8(m.a.get("/metrics")?.1)?, text);
    let mut names = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().context("targets")? {
            let expr = t["expr"].as_str().context("expr")?;
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if ["istio_", "nodemesh_", "process_"].iter().any(|p| word.starts_with(p)) {
                    names.insert(word.to_owned());
                }
            }
        }
    }
    ensure!(names.len() >= 10, "{names:?}");
    for n in &names {
        ensure!(all.lines().any(|l| l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n} "))), "the dashboard queries {n}, which no agent exports");
    }
    // The same through the CLI; and the log filter changes at run time.
    let bin = mesh_e2e::agent_bin()?;
    let admin = m.b.admin().to_string();
    let out = Agent::run_once(&bin, ["config-dump", "--admin", &admin])?;
    ensure!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"get-only\""), "{out:?}");
    let out = Agent::run_once(&bin, ["log-level", "--admin", &admin, "info,mesh_agent::proxy=debug"])?;
    ensure!(out.status.success(), "{out:?}");
    let (code, body) = m.b.get("/logging")?;
    ensure!(code == 200 && String::from_utf8_lossy(&body).trim() == "info,mesh_agent::proxy=debug", "{code}");
    // An invalid filter is refused with the reason; the filter in force stays.
    let out = Agent::run_once(&bin, ["log-level", "--admin", &admin, "info,[[["])?;
    ensure!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("invalid log filter"), "{out:?}");
    ensure!(String::from_utf8_lossy(&m.b.get("/logging")?.1).trim() == "info,mesh_agent::proxy=debug");
    Ok(())
}
