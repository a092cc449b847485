//! The tour's last two stops: the agents' Istio-named metrics about what
//! just happened, and one request's trace from an OTLP collector the demo
//! runs itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use mesh_e2e::otlp::{ReceivedSpan, serve_otlp};
use mesh_e2e::{Agent, Pod, wait_until};

use crate::SETTLE;
use crate::tour::{WEB_IP, curl};

/// A real OTLP/gRPC receiver ([`serve_otlp`]) on loopback, in this process;
/// the agents export to it.
pub struct Collector {
    pub endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    // Dropping the runtime stops the server.
    _rt: tokio::runtime::Runtime,
}

impl Collector {
    pub fn start() -> Result<Collector> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the collector's runtime")?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("binding the OTLP collector on loopback")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        rt.spawn(async move {
            if let Err(e) = serve_otlp(listener, std::time::Duration::ZERO, tx).await {
                eprintln!("OTLP collector: {e:#}");
            }
        });
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        rt.spawn(async move {
            while let Some(s) = rx.recv().await {
                sink.lock().expect("poisoned").push(s);
            }
        });
        Ok(Collector { endpoint, spans, _rt: rt })
    }

    fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        let spans = self.spans.lock().expect("poisoned");
        spans.iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }

    pub fn received(&self) -> usize {
        self.spans.lock().expect("poisoned").len()
    }
}

/// One `/metrics` sample: name, labels, value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)),
                None => (series, BTreeMap::new()),
            };
            Some(Sample { name: name.to_owned(), labels, value })
        })
        .collect()
}

/// `k="v",k2="v2"` (values may hold escaped quotes and commas).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end..];
    }
    out
}

fn scrape(agent: &Agent) -> Result<Vec<Sample>> {
    let (code, body) = agent.get("/metrics")?;
    ensure!(code == 200, "/metrics on {} answered {code}", agent.node());
    Ok(parse_metrics(&String::from_utf8(body)?))
}

/// `istio_requests_total` for the tour's HTTP services, summed over the
/// workload labels, and the agents' own counters for what the tour did.
pub fn metrics(agents: &BTreeMap<&'static str, Agent>) -> Result<()> {
    println!("  scraped from each agent's /metrics (http://ADMIN/metrics), summed over the workload labels:");
    let mut requests = 0.0;
    for (node, agent) in agents {
        let samples = scrape(agent)?;
        let mut rows: BTreeMap<Vec<String>, f64> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == "istio_requests_total") {
            let svc = s.labels.get("destination_service_name").map(String::as_str).unwrap_or("");
            if !["web", "limited"].contains(&svc) {
                continue;
            }
            let key = ["reporter", "destination_service_name", "response_code", "response_flags", "connection_security_policy"]
                .iter()
                .map(|k| format!("{k}=\"{}\"", s.labels.get(*k).map(String::as_str).unwrap_or("")))
                .collect();
            *rows.entry(key).or_default() += s.value;
        }
        println!("  {node}:");
        for (labels, v) in &rows {
            requests += v;
            println!("    istio_requests_total{{{}}} {v}", labels.join(","));
        }
        for s in samples.iter().filter(|s| {
            ["nodemesh_http_retries_total", "nodemesh_circuit_breaker_overflows_total", "nodemesh_policy_denials_total"]
                .contains(&s.name.as_str())
                && s.value > 0.0
        }) {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            println!("    {}{{{}}} {}", s.name, labels.join(","), s.value);
        }
    }
    println!("  (reporter=\"source\" is what the client saw, reporter=\"destination\" what the apps answered: their 503s differ by what the retries absorbed; RBAC = denied by policy, UO = circuit breaker overflow)");
    ensure!(requests > 0.0, "no istio_requests_total series for the web services");
    Ok(())
}

/// One request with a caller's `traceparent`, and its spans as a tree.
pub fn trace(collector: &Collector, client: &Pod) -> Result<()> {
    let mut random = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut random)?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let (trace_id, caller) = hex.split_at(32);
    let traceparent = format!("traceparent: 00-{trace_id}-{caller}-01");
    let url = format!("http://{}:80/trace", std::net::Ipv4Addr::from(WEB_IP));
    let r = curl(client, &["-H", &traceparent, &url])?;
    ensure!(r.code == 200, "the traced request answered {}", r.code);
    println!("  shop-client GET /trace with {traceparent}");
    let app_saw = r.body.split("traceparent ").nth(1).map(|s| s.trim().trim_end_matches(')')).unwrap_or("none");
    let mut spans = Vec::new();
    wait_until(SETTLE, || {
        spans = collector.trace(trace_id);
        let client_span = spans.iter().any(|s| s.kind == "CLIENT");
        Ok(client_span && spans.iter().any(|s| s.kind == "SERVER"))
    })
    .with_context(|| format!("the collector did not get both spans of trace {trace_id} (it got {spans:?})"))?;
    println!("  trace {trace_id}, from the collector (it received {} spans during the demo):", collector.received());
    println!("  - caller span {caller} (curl in shop-client; not exported)");
    print_children(&spans, caller, 2);
    println!("  the app (web-v1) received traceparent {app_saw}: its parent is the destination agent's span");
    Ok(())
}

fn print_children(spans: &[ReceivedSpan], parent: &str, depth: usize) {
    let mut children: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent_span_id == parent).collect();
    children.sort_by_key(|s| s.start_unix_nano);
    for s in children {
        let ms = s.end_unix_nano.saturating_sub(s.start_unix_nano) as f64 / 1e6;
        let attrs: Vec<String> = ["http.response.status_code", "mesh.peer.principal", "mesh.mtls", "server.address"]
            .iter()
            .filter_map(|k| s.attributes.get(*k).map(|v| format!("{k}={}", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))))
            .collect();
        println!(
            "  {}- {} span {} `{}` from {} ({ms:.1} ms){}{}",
            "  ".repeat(depth - 1),
            s.kind,
            s.span_id,
            s.name,
            if s.service_name.is_empty() { "?" } else { &s.service_name },
            if attrs.is_empty() { String::new() } else { format!(": {}", attrs.join(", ")) },
            s.error.as_deref().map(|e| format!(" ERROR {e}")).unwrap_or_default()
        );
        print_children(spans, &s.span_id, depth + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_lines() {
        let text = "# TYPE x counter\nistio_requests_total{reporter=\"source\",response_code=\"503\",p=\"a\\\"b,c\"} 3\nnodemesh_ready 1.0\n";
        let s = parse_metrics(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["reporter"], "source");
        assert_eq!(s[0].labels["response_code"], "503");
        assert_eq!(s[0].labels["p"], "a\"b,c");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].name, "nodemesh_ready");
    }
}
