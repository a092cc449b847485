//! A real OTLP/gRPC trace receiver: the `TraceService` server generated from
//! the OpenTelemetry protos (`opentelemetry-proto`), not a mock of the
//! agent's exporter. The `meshotlp` binary serves it and prints what it gets;
//! tests parse that output with [`parse_spans`].

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{span::SpanKind, status::StatusCode},
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// One received span, as `meshotlp` prints it (one JSON object per line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceivedSpan {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits.
    pub span_id: String,
    /// 16 hex digits, or empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `SERVER`, `CLIENT`, `INTERNAL`, `PRODUCER`, `CONSUMER` or `UNSPECIFIED`.
    pub kind: String,
    /// Strings, integers, booleans and doubles as JSON values; anything else
    /// as its debug text.
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// The `service.name` resource attribute (empty if none).
    pub service_name: String,
    /// The status message when the span's status is `ERROR`.
    pub error: Option<String>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

/// Flattens an export request into spans.
pub fn spans_of(request: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let service_name = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| kv.value.as_ref())
            .map(|v| match json_value(v) {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            })
            .unwrap_or_default();
        for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
            let kind = SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified);
            let error = span
                .status
                .as_ref()
                .filter(|s| s.code == StatusCode::Error as i32)
                .map(|s| s.message.clone());
            out.push(ReceivedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                name: span.name.clone(),
                kind: kind
                    .as_str_name()
                    .trim_start_matches("SPAN_KIND_")
                    .to_owned(),
                attributes: attributes(&span.attributes),
                service_name: service_name.clone(),
                error,
                start_unix_nano: span.start_time_unix_nano,
                end_unix_nano: span.end_time_unix_nano,
            });
        }
    }
    out
}

/// The spans in `meshotlp`'s output, skipping its event lines.
pub fn parse_spans(output: &str) -> Result<Vec<ReceivedSpan>> {
    output
        .lines()
        .filter(|l| l.contains("\"traceId\""))
        .map(|l| {
            serde_json::from_str(l)
                .with_context(|| format!("meshotlp printed an unexpected line: {l}"))
        })
        .collect()
}

/// Serves `TraceService/Export` on `listener` until the task is dropped.
/// Each export is answered after `delay` (a slow collector); its spans are
/// sent to `spans` once answered, so an export the client gave up on
/// before the delay is not reported (the server drops the handler when the
/// client resets the stream).
pub async fn serve_otlp(
    listener: tokio::net::TcpListener,
    delay: Duration,
    spans: mpsc::UnboundedSender<ReceivedSpan>,
) -> Result<()> {
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Receiver { delay, spans }))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await
        .context("serving OTLP/gRPC")
}

struct Receiver {
    delay: Duration,
    spans: mpsc::UnboundedSender<ReceivedSpan>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        for span in spans_of(request.get_ref()) {
            let _ = self.spans.send(span);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, serde_json::Value> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value
                    .as_ref()
                    .map_or(serde_json::Value::Null, json_value),
            )
        })
        .collect()
}

fn json_value(v: &AnyValue) -> serde_json::Value {
    match &v.value {
        Some(Value::StringValue(s)) => s.clone().into(),
        Some(Value::IntValue(i)) => (*i).into(),
        Some(Value::BoolValue(b)) => (*b).into(),
        Some(Value::DoubleValue(d)) => (*d).into(),
        Some(other) => format!("{other:?}").into(),
        None => serde_json::Value::Null,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::trace_service_client::TraceServiceClient,
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span, Status},
    };

    use super::*;

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        }
    }

    fn request() -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", Value::StringValue("agent-a".into()))],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![0xab; 16],
                        span_id: vec![1, 2, 3, 4, 5, 6, 7, 8],
                        parent_span_id: vec![0xff; 8],
                        name: "inbound".into(),
                        kind: SpanKind::Server as i32,
                        attributes: vec![
                            kv("http.response.status_code", Value::IntValue(403)),
                            kv("mesh.mtls", Value::BoolValue(true)),
                        ],
                        status: Some(Status {
                            message: "denied".into(),
                            code: StatusCode::Error as i32,
                        }),
                        start_time_unix_nano: 1,
                        end_time_unix_nano: 2,
                        ..Span::default()
                    }],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    #[tokio::test]
    async fn receives_exports_over_grpc() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let server = tokio::spawn(serve_otlp(listener, Duration::from_millis(1), tx));
        let mut client = TraceServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client.export(request()).await.unwrap();
        let span = rx.recv().await.unwrap();
        assert_eq!(span.trace_id, "ab".repeat(16));
        assert_eq!(span.span_id, "0102030405060708");
        assert_eq!(span.parent_span_id, "ff".repeat(8));
        assert_eq!(span.kind, "SERVER");
        assert_eq!(span.service_name, "agent-a");
        assert_eq!(span.attributes["http.response.status_code"], 403);
        assert_eq!(span.attributes["mesh.mtls"], true);
        assert_eq!(span.error.as_deref(), Some("denied"));

        let line = serde_json::to_string(&span).unwrap();
        let output = format!("{{\"event\":\"listening\",\"addr\":\"{addr}\"}}\n{line}\n");
        assert_eq!(parse_spans(&output).unwrap(), vec![span]);
        server.abort();
    }
}
