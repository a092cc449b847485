//! Issue (observability): a request through two agents makes a client span
//! (source agent) and a server span (destination agent) in the caller's
//! trace, received by a real OTLP/gRPC receiver (`meshotlp`); the app sees
//! the server span as its parent; a collector that goes away costs spans,
//! never requests.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_e2e::{otlp::parse_spans, wait_until};

const APP: &str = r#"
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        body = ("traceparent=%s\n" % self.headers.get('traceparent')).encode()
        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
print("listening", flush=True)
ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

struct Receiver {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
    addr: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn receiver() -> Result<Receiver> {
    let mut child = Command::new(mesh_e2e::meshotlp_bin()?)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting meshotlp")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().context("meshotlp printed nothing")??)?;
    let addr = first["addr"].as_str().context("no addr")?.to_owned();
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let mut o = sink.lock().expect("poisoned");
            o.push_str(&l);
            o.push('\n');
        }
    });
    Ok(Receiver { child, out, addr })
}

#[test]
fn client_and_server_spans_share_the_callers_trace() -> Result<()> {
    let mut collector = receiver()?;
    let endpoint = format!("http://{}", collector.addr);
    let agent_args = ["--otlp-endpoint", endpoint.as_str(), "--trace-sampling", "1"];
    let opts = MeshOpts { enrolled: &["shop"], named_service_accounts: true, agent_args: &agent_args, ..MeshOpts::default() };
    let mut m = mesh_with("tracing", &opts)?;
    let _app = serve_http_app(&mut m, APP)?;
    write_with_extra(&m, &["shop"], "")?;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let get = || -> Result<String> {
        let out = m.shop_client.run(
            "curl",
            ["-s", "--max-time", "10", "-H", &format!("traceparent: 00-{trace_id}-{caller_span}-01"), "http://198.51.100.100:80/t"],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut body = String::new();
    wait_until(SETTLE, || {
        body = get()?;
        Ok(body.starts_with("traceparent="))
    })?;
    // The app's parent: the destination agent's server span, same trace.
    let seen = body.trim().trim_start_matches("traceparent=").to_owned();
    let parts: Vec<&str> = seen.split('-').collect();
    ensure!(parts.len() == 4 && parts[1] == trace_id && parts[3] == "01", "the app saw {seen:?}");
    let app_parent = parts[2].to_owned();
    ensure!(app_parent != caller_span, "the app's parent is the caller's span, not the agent's");

    // Both spans reach the receiver (exported in batches, every second).
    let mut spans = Vec::new();
    wait_until(SETTLE, || {
        spans = parse_spans(&collector.out.lock().expect("poisoned"))?;
        let server = spans.iter().any(|s| s.trace_id == trace_id && s.kind == "SERVER" && s.span_id == app_parent);
        Ok(server && spans.iter().any(|s| s.trace_id == trace_id && s.kind == "CLIENT"))
    })
    .with_context(|| format!("spans so far: {spans:?}"))?;
    let server = spans.iter().find(|s| s.span_id == app_parent).context("server span")?;
    let client = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.kind == "CLIENT" && s.span_id == server.parent_span_id)
        .with_context(|| format!("no client span is the server span's parent: {spans:?}"))?;
    ensure!(client.parent_span_id == caller_span, "client span's parent {}", client.parent_span_id);
    ensure!(server.attributes["http.response.status_code"] == 200, "{:?}", server.attributes);
    ensure!(server.attributes["mesh.peer.principal"] == "spiffe://cluster.local/ns/shop/sa/shop-client", "{:?}", server.attributes);
    ensure!(client.attributes["mesh.mtls"] == true, "{:?}", client.attributes);

    // The collector goes away: requests still work, spans are dropped and
    // counted.
    let _ = collector.child.kill();
    let _ = collector.child.wait();
    for _ in 0..5 {
        ensure!(get()?.starts_with("traceparent=00-"), "a request failed with the collector down");
    }
    wait_until(SETTLE, || {
        let s = m.a.status()?;
        Ok(s["tracing"]["droppedExportFailed"].as_u64().unwrap_or(0) > 0)
    })
    .with_context(|| format!("tracing stats: {}", m.a.status().map(|s| s["tracing"].clone()).unwrap_or_default()))?;
    // The access log has a line for each request, with the trace id (the
    // log is written every 100 ms).
    let has_line = |l: &str| l.contains("\"kind\":\"http\"") && l.contains(trace_id);
    wait_until(SETTLE, || Ok(m.b.stdout().lines().any(has_line)))
        .with_context(|| format!("no access log line with the trace id: {}", m.b.stdout()))?;
    let log = m.b.stdout();
    let line = log.lines().find(|l| has_line(l)).expect("found above");
    let v: serde_json::Value = serde_json::from_str(line)?;
    ensure!(v["reporter"] == "destination" && v["responseCode"] == 200 && v["path"] == "/t", "{v}");
    ensure!(v["sourcePrincipal"] == "spiffe://cluster.local/ns/shop/sa/shop-client", "{v}");
    Ok(())
}
