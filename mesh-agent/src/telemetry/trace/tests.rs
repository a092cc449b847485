//! The tracer against a real OTLP/gRPC receiver on loopback (the protos'
//! generated tonic server), a dead port, and a collector that never answers.

use std::{net::SocketAddr, time::Duration};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{self as proto, span, status},
};
use tokio::sync::mpsc;

use super::*;

/// Records every request; or, with `hang`, never answers.
struct Receiver {
    seen: mpsc::UnboundedSender<ExportTraceServiceRequest>,
    hang: bool,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        let _ = self.seen.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn receiver(hang: bool) -> (String, mpsc::UnboundedReceiver<ExportTraceServiceRequest>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { seen, hang }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (format!("http://{addr}"), rx)
}

/// A loopback port nothing listens on (bound, then closed).
fn dead_endpoint() -> String {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    format!("http://{addr}")
}

fn config(endpoint: String, sampling: f64) -> TraceConfig {
    TraceConfig {
        service_name: "agent-test".into(),
        ..TraceConfig::new(Some(endpoint), sampling)
    }
}

fn spans_of(requests: &[ExportTraceServiceRequest]) -> Vec<proto::Span> {
    requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| ss.spans.clone())
        .collect()
}

fn attr<'a>(span: &'a proto::Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn drain<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn traceparent(flags: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER}-{flags}").parse().unwrap(),
    );
    h
}

#[tokio::test]
async fn exports_spans_with_ids_parents_kinds_and_attributes() {
    let (endpoint, mut rx) = receiver(false).await;
    let tracer = Tracer::start(config(endpoint, 0.0), &tokio::runtime::Handle::current()).unwrap();

    // A sampled caller is followed even at ratio 0.
    let parent = tracer.extract(&traceparent("01")).unwrap();
    let mut server = tracer.start_span(SpanKind::Server, "inbound", Some(&parent));
    server.set_attribute(attr::HTTP_REQUEST_METHOD, "GET");
    server.set_attribute(attr::HTTP_RESPONSE_STATUS_CODE, 503u16);
    server.set_attribute(attr::MESH_MTLS, true);
    server.set_error("upstream connect failed");
    let mut client = tracer.start_span(
        SpanKind::Client,
        format!("outbound {}", 8080),
        server.context(),
    );
    client.set_attribute("net.peer.name", String::from("reviews"));
    let mut to_app = HeaderMap::new();
    client.inject(&mut to_app);
    let (server_id, client_id) = (
        server.context().unwrap().span_id(),
        client.context().unwrap().span_id(),
    );
    client.end();
    drop(server);
    let internal = tracer.start_span(SpanKind::Internal, "root", None);
    let root_trace = internal.context().unwrap().trace_id();
    drop(internal); // ratio 0: not sampled, not exported

    tracer.flush().await;
    let requests = drain(&mut rx);
    let spans = spans_of(&requests);
    assert_eq!(spans.len(), 2, "{spans:?}");
    let resource = requests[0].resource_spans[0].resource.as_ref().unwrap();
    assert_eq!(resource.attributes[0].key, "service.name");
    assert_eq!(
        resource.attributes[0].value.as_ref().unwrap().value,
        Some(Value::StringValue("agent-test".into()))
    );

    let client = &spans[0];
    let server = &spans[1];
    assert_eq!(client.trace_id, server.trace_id);
    assert_eq!(
        TraceId(client.trace_id.clone().try_into().unwrap()).to_string(),
        TRACE
    );
    assert_eq!(server.span_id, server_id.0);
    assert_eq!(server.parent_span_id, parent.span_id().0);
    assert_eq!(client.span_id, client_id.0);
    assert_eq!(client.parent_span_id, server_id.0);
    assert_eq!(server.kind, span::SpanKind::Server as i32);
    assert_eq!(client.kind, span::SpanKind::Client as i32);
    assert_eq!(server.name, "inbound");
    assert_eq!(client.name, "outbound 8080");
    assert_eq!(
        attr(server, "http.request.method"),
        Some(&Value::StringValue("GET".into()))
    );
    assert_eq!(
        attr(server, "http.response.status_code"),
        Some(&Value::IntValue(503))
    );
    assert_eq!(attr(server, "mesh.mtls"), Some(&Value::BoolValue(true)));
    assert_eq!(
        attr(client, "net.peer.name"),
        Some(&Value::StringValue("reviews".into()))
    );
    let st = server.status.as_ref().unwrap();
    assert_eq!(
        (st.code, st.message.as_str()),
        (status::StatusCode::Error as i32, "upstream connect failed")
    );
    assert_eq!(client.status, None);
    // The server span's parent came over the wire; the client's did not.
    assert_eq!(server.flags & 0x301, 0x301);
    assert_eq!(client.flags & 0x301, 0x101);
    assert!(
        server.start_time_unix_nano <= server.end_time_unix_nano && server.start_time_unix_nano > 0
    );

    // The application sees the client span as its parent.
    let seen = tracer.extract(&to_app).unwrap();
    assert_eq!(seen.trace_id().to_string(), TRACE);
    assert_eq!(seen.span_id(), client_id);
    assert!(seen.is_sampled());
    assert_ne!(root_trace.to_string(), TRACE);

    assert_eq!(
        tracer.stats(),
        TraceStats {
            started: 3,
            sampled: 2,
            exported: 2,
            dropped_queue_full: 0,
            dropped_export_failed: 0
        }
    );
}

#[tokio::test]
async fn unsampled_spans_propagate_but_are_not_exported() {
    let (endpoint, mut rx) = receiver(false).await;
    let tracer = Tracer::start(config(endpoint, 1.0), &tokio::runtime::Handle::current()).unwrap();
    // The caller said no: followed even at ratio 1.
    let parent = tracer.extract(&traceparent("00")).unwrap();
    let mut span = tracer.start_span(SpanKind::Server, "inbound", Some(&parent));
    assert!(!span.is_recording());
    span.set_attribute("ignored", "value");
    span.set_error("ignored");
    let mut out = traceparent("01");
    span.inject(&mut out);
    let ctx = span.context().unwrap().clone();
    assert_eq!(
        out["traceparent"],
        format!("00-{TRACE}-{}-00", ctx.span_id())
    );
    assert_ne!(ctx.span_id(), parent.span_id());
    drop(span);
    tracer.flush().await;
    assert!(drain(&mut rx).is_empty());
    assert_eq!(
        tracer.stats(),
        TraceStats {
            started: 1,
            ..TraceStats::default()
        }
    );
}

#[test]
fn disabled_tracer_changes_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let tracer = Tracer::start(TraceConfig::new(None, 1.0), rt.handle()).unwrap();
    assert!(!tracer.is_enabled());
    // Extraction still works (e.g. for access logs).
    let parent = tracer.extract(&traceparent("01"));
    assert!(parent.is_some());
    let mut span = tracer.start_span(SpanKind::Server, "inbound", parent.as_ref());
    span.set_attribute("k", 1);
    assert!(span.context().is_none());
    let mut headers = traceparent("01");
    let before = headers.clone();
    span.inject(&mut headers);
    assert_eq!(headers, before);
    span.end();
    assert_eq!(tracer.stats(), TraceStats::default());
    rt.block_on(tracer.flush());
    assert_eq!(Tracer::disabled().stats(), TraceStats::default());
}

#[test]
fn invalid_config_is_an_error_at_start() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let err = Tracer::start(
        TraceConfig::new(Some("http://127.0.0.1:4317".into()), 1.5),
        rt.handle(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("--trace-sampling 1.5"), "{err}");
    let err = Tracer::start(
        TraceConfig::new(Some("127.0.0.1:4317".into()), 0.5),
        rt.handle(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("--otlp-endpoint"), "{err}");
}

/// A runtime that is never driven: the exporter task is spawned but never
/// runs, so the queue only fills.
fn parked_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn sampling_ratio() {
    let rt = parked_runtime();
    for (ratio, n) in [(0.0, 2000), (1.0, 2000), (0.5, 10_000)] {
        let tracer = Tracer::start(config(dead_endpoint(), ratio), rt.handle()).unwrap();
        let sampled = (0..n)
            .filter(|_| {
                tracer
                    .start_span(SpanKind::Server, "s", None)
                    .is_recording()
            })
            .count();
        match ratio {
            0.0 => assert_eq!(sampled, 0),
            1.0 => assert_eq!(sampled, n),
            // 10,000 fair coin flips: 5,000 +- 50 (1 sigma); +-1,000 is 20 sigma.
            _ => assert!((4000..=6000).contains(&sampled), "{sampled} of {n}"),
        }
        let stats = tracer.stats();
        assert_eq!((stats.started, stats.sampled), (n as u64, sampled as u64));
    }
}

#[test]
fn children_inherit_the_root_decision() {
    let rt = parked_runtime();
    let tracer = Tracer::start(config(dead_endpoint(), 0.5), rt.handle()).unwrap();
    for _ in 0..200 {
        let root = tracer.start_span(SpanKind::Server, "root", None);
        let child = tracer.start_span(SpanKind::Client, "child", root.context());
        assert_eq!(child.is_recording(), root.is_recording());
        assert_eq!(
            child.context().unwrap().trace_id(),
            root.context().unwrap().trace_id()
        );
    }
    // A B3 caller that deferred the decision: the ratio decides, and the same
    // way for the same trace id.
    let mut h = HeaderMap::new();
    h.insert("x-b3-traceid", TRACE.parse().unwrap());
    h.insert("x-b3-spanid", CALLER.parse().unwrap());
    let deferred = tracer.extract(&h).unwrap();
    let first = tracer
        .start_span(SpanKind::Server, "a", Some(&deferred))
        .is_recording();
    for _ in 0..20 {
        assert_eq!(
            tracer
                .start_span(SpanKind::Server, "a", Some(&deferred))
                .is_recording(),
            first
        );
    }
}

#[test]
fn full_queue_drops_and_counts_without_blocking() {
    let rt = parked_runtime();
    let mut cfg = config(dead_endpoint(), 1.0);
    cfg.queue_size = 4;
    cfg.max_batch = 4;
    let tracer = Tracer::start(cfg, rt.handle()).unwrap();
    for i in 0..10 {
        let mut span = tracer.start_span(SpanKind::Client, "c", None);
        span.set_attribute("i", i);
        span.end();
    }
    let stats = tracer.stats();
    assert_eq!((stats.sampled, stats.dropped_queue_full), (10, 6));
    // Once the exporter runs, the 4 queued spans meet a dead collector.
    rt.block_on(tracer.flush());
    let stats = tracer.stats();
    assert_eq!(
        (
            stats.exported,
            stats.dropped_export_failed,
            stats.dropped_queue_full
        ),
        (0, 4, 6)
    );
}

#[tokio::test]
async fn dead_collector_counts_export_failures() {
    let tracer = Tracer::start(
        config(dead_endpoint(), 1.0),
        &tokio::runtime::Handle::current(),
    )
    .unwrap();
    for _ in 0..5 {
        tracer.start_span(SpanKind::Server, "s", None).end();
    }
    tracer.flush().await;
    let stats = tracer.stats();
    assert_eq!(
        (stats.sampled, stats.exported, stats.dropped_export_failed),
        (5, 0, 5)
    );
    // Still failing later: spans keep being dropped, nothing piles up.
    tracer.start_span(SpanKind::Server, "s", None).end();
    tracer.flush().await;
    assert_eq!(tracer.stats().dropped_export_failed, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_that_never_answers_times_out_and_spans_keep_flowing() {
    let (endpoint, _rx) = receiver(true).await;
    let mut cfg = config(endpoint, 1.0);
    cfg.queue_size = 8;
    cfg.max_batch = 8;
    cfg.export_timeout = Duration::from_millis(200);
    let tracer = Tracer::start(cfg, &tokio::runtime::Handle::current()).unwrap();
    for _ in 0..3 {
        tracer.start_span(SpanKind::Server, "s", None).end();
    }
    // While the exporter waits on the collector, the data path goes on:
    // spans end into the queue or are dropped, never waited on.
    let flush = tokio::spawn({
        let tracer = tracer.clone();
        async move { tracer.flush().await }
    });
    for _ in 0..100 {
        tracer.start_span(SpanKind::Server, "s", None).end();
    }
    flush.await.unwrap();
    tracer.flush().await; // whatever was queued behind the first flush
    let stats = tracer.stats();
    assert_eq!(stats.sampled, 103);
    assert_eq!(stats.exported, 0);
    assert_eq!(
        stats.dropped_export_failed + stats.dropped_queue_full,
        103,
        "{stats:?}"
    );
    assert!(stats.dropped_export_failed >= 3);
}

#[tokio::test]
async fn exporter_ends_with_the_last_tracer_and_exports_what_is_left() {
    let (endpoint, mut rx) = receiver(false).await;
    let tracer = Tracer::start(config(endpoint, 1.0), &tokio::runtime::Handle::current()).unwrap();
    tracer.start_span(SpanKind::Internal, "last", None).end();
    drop(tracer);
    let request = rx
        .recv()
        .await
        .expect("the last span is exported when the tracer goes");
    assert_eq!(spans_of(&[request])[0].name, "last");
}

#[test]
fn b3_callers_get_b3_back() {
    let rt = parked_runtime();
    let tracer = Tracer::start(config(dead_endpoint(), 0.0), rt.handle()).unwrap();
    let mut h = HeaderMap::new();
    h.insert("b3", format!("{TRACE}-{CALLER}-1").parse().unwrap());
    let parent = tracer.extract(&h).unwrap();
    let span = tracer.start_span(SpanKind::Server, "inbound", Some(&parent));
    assert!(span.is_recording());
    span.inject(&mut h);
    let me = span.context().unwrap().span_id();
    assert_eq!(h["b3"], format!("{TRACE}-{me}-1-{CALLER}"));
    assert_eq!(h["traceparent"], format!("00-{TRACE}-{me}-01"));
}

#[test]
fn handles_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Tracer>();
    send_sync::<Span>();
    send_sync::<SpanContext>();
}

#[test]
fn stats_serialize_camel_case() {
    let json = serde_json::to_value(TraceStats {
        dropped_queue_full: 2,
        ..TraceStats::default()
    })
    .unwrap();
    assert_eq!(json["droppedQueueFull"], 2);
    assert!(json.get("droppedExportFailed").is_some());
}

#[test]
fn too_many_attributes_are_counted() {
    let rt = parked_runtime();
    let tracer = Tracer::start(config(dead_endpoint(), 1.0), rt.handle()).unwrap();
    let mut span = tracer.start_span(SpanKind::Internal, "busy", None);
    for i in 0..40 {
        span.set_attribute("k", i);
    }
    let SpanState::Recording { data, .. } = &span.inner else {
        panic!("not recording")
    };
    assert_eq!(
        (data.attributes.len(), data.dropped_attributes),
        (MAX_ATTRIBUTES, 40 - MAX_ATTRIBUTES as u32)
    );
}
