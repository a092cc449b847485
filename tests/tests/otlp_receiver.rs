//! `meshotlp`, the OTLP/gRPC receiver the tracing end-to-end tests run: its
//! output contract (no root needed).

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};
use mesh_e2e::otlp::parse_spans;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind},
};
use serde_json::Value as Json;

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn meshotlp_prints_listening_then_one_line_per_span() -> Result<()> {
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_meshotlp"))
            .args(["--listen", "127.0.0.1:0", "--delay-ms", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting meshotlp")?,
    );
    let mut lines = BufReader::new(child.0.stdout.take().context("no stdout")?).lines();
    let first: Json = serde_json::from_str(&lines.next().context("no output")??)?;
    ensure!(first["event"] == "listening", "{first}");
    let addr = first["addr"].as_str().context("no addr")?.to_owned();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{addr}")).await?;
        client.export(request()).await?;
        anyhow::Ok(())
    })?;

    let mut out = String::new();
    for _ in 0..2 {
        out.push_str(&lines.next().context("meshotlp ended early")??);
        out.push('\n');
    }
    let spans = parse_spans(&out)?;
    ensure!(spans.len() == 2, "{out}");
    ensure!(
        spans[0].trace_id == "01".repeat(16) && spans[0].parent_span_id.is_empty(),
        "{out}"
    );
    ensure!(spans[1].parent_span_id == spans[0].span_id, "{out}");
    ensure!(
        spans[0].kind == "SERVER" && spans[1].kind == "CLIENT",
        "{out}"
    );
    ensure!(
        spans.iter().all(|s| s.service_name == "node-a-agent"),
        "{out}"
    );
    ensure!(spans[1].attributes["peer"] == "reviews", "{out}");
    Ok(())
}

fn request() -> ExportTraceServiceRequest {
    let span = |id: u8, parent: Option<u8>, kind: SpanKind, attributes| Span {
        trace_id: vec![1; 16],
        span_id: vec![id; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: format!("span-{id}"),
        kind: kind as i32,
        attributes,
        ..Span::default()
    };
    let kv = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
        ..KeyValue::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "node-a-agent")],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![
                    span(2, None, SpanKind::Server, vec![]),
                    span(3, Some(2), SpanKind::Client, vec![kv("peer", "reviews")]),
                ],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}
