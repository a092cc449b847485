//! The exporter task: drains the bounded queue into batches and sends each
//! with OTLP/gRPC `TraceService/Export`. One export at a time: while the
//! collector is slow the queue fills and the data path drops (and counts)
//! instead of anything waiting.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{self as proto, ResourceSpans, ScopeSpans, span, status},
};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use super::{AttrValue, Counters, Error, SpanData, SpanKind, TraceConfig};

/// OTLP span flags: bit 8 says bit 9 is meaningful; bit 9 is "the parent is
/// remote" (it came from another process).
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

pub(super) enum Msg {
    Span(Box<SpanData>),
    /// Export what is queued, then answer.
    Flush(oneshot::Sender<()>),
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Span(_) => "Span",
            Msg::Flush(_) => "Flush",
        })
    }
}

pub(super) struct Exporter {
    endpoint: Endpoint,
    resource: Resource,
    max_batch: usize,
    interval: Duration,
    timeout: Duration,
}

impl Exporter {
    pub(super) fn new(endpoint: &str, cfg: &TraceConfig) -> Result<Exporter, Error> {
        let endpoint = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|_| Error::Endpoint {
                endpoint: endpoint.to_owned(),
                reason: "not a URL",
            })?
            .connect_timeout(cfg.export_timeout)
            .timeout(cfg.export_timeout)
            .tcp_nodelay(true);
        Ok(Exporter {
            endpoint,
            resource: Resource {
                attributes: vec![key_value(
                    "service.name",
                    &AttrValue::Str(cfg.service_name.clone().into()),
                )],
                ..Resource::default()
            },
            max_batch: cfg.max_batch,
            interval: cfg.export_interval,
            timeout: cfg.export_timeout,
        })
    }

    pub(super) async fn run(self, mut rx: mpsc::Receiver<Msg>, counters: Arc<Counters>) {
        let target = self.endpoint.uri().to_string();
        // One early attempt so an unreachable collector shows in the log at
        // start, not at the first sampled request; the channel reconnects on
        // its own afterwards, one attempt per batch.
        let channel = match tokio::time::timeout(self.timeout, self.endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %target, error = %crate::error_chain(&e),
                    "OTLP collector unreachable: spans are dropped and counted until it answers");
                self.endpoint.connect_lazy()
            }
            Err(_) => {
                tracing::warn!(endpoint = %target, timeout = ?self.timeout,
                    "OTLP collector did not accept a connection in time: spans are dropped and counted until it answers");
                self.endpoint.connect_lazy()
            }
        };
        let mut batcher = Batcher {
            client: TraceServiceClient::new(channel),
            resource: self.resource,
            timeout: self.timeout,
            counters,
            batch: Vec::with_capacity(self.max_batch),
            failing: false,
            target,
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Span(span)) => {
                        batcher.batch.push(*span);
                        if batcher.batch.len() >= self.max_batch {
                            batcher.export().await;
                        }
                    }
                    Some(Msg::Flush(done)) => {
                        batcher.export().await;
                        let _ = done.send(());
                    }
                    None => {
                        batcher.export().await;
                        return;
                    }
                },
                _ = tick.tick() => batcher.export().await,
            }
        }
    }
}

struct Batcher {
    client: TraceServiceClient<Channel>,
    resource: Resource,
    timeout: Duration,
    counters: Arc<Counters>,
    batch: Vec<SpanData>,
    /// The last export failed: logged once per outage, not per batch.
    failing: bool,
    target: String,
}

impl Batcher {
    async fn export(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len() as u64;
        let spans = self.batch.drain(..).map(to_proto).collect();
        let mut request = tonic::Request::new(ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "nodemesh".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        });
        request.set_timeout(self.timeout);
        let failure = match tokio::time::timeout(self.timeout, self.client.export(request)).await {
            Ok(Ok(response)) => {
                let rejected = response
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0).min(n));
                Counters::add(&self.counters.exported, n - rejected);
                Counters::add(&self.counters.dropped_export_failed, rejected);
                if self.failing {
                    tracing::info!(endpoint = %self.target, "OTLP collector answers again");
                    self.failing = false;
                }
                return;
            }
            Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        Counters::add(&self.counters.dropped_export_failed, n);
        if self.failing {
            tracing::debug!(endpoint = %self.target, spans = n, error = %failure, "span export failed");
        } else {
            tracing::warn!(endpoint = %self.target, spans = n, error = %failure,
                "span export failed: spans dropped (counted in droppedExportFailed)");
            self.failing = true;
        }
    }
}

fn to_proto(s: SpanData) -> proto::Span {
    let remote = if s.remote_parent { FLAG_IS_REMOTE } else { 0 };
    proto::Span {
        trace_id: s.ctx.trace_id.0.to_vec(),
        span_id: s.ctx.span_id.0.to_vec(),
        trace_state: s.ctx.trace_state().unwrap_or_default().to_owned(),
        parent_span_id: s.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        // Only sampled spans are exported: trace flags 01.
        flags: 0x01 | FLAG_HAS_IS_REMOTE | remote,
        name: s.name.into_owned(),
        kind: match s.kind {
            SpanKind::Client => span::SpanKind::Client,
            SpanKind::Server => span::SpanKind::Server,
            SpanKind::Internal => span::SpanKind::Internal,
        } as i32,
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.end),
        attributes: s.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
        dropped_attributes_count: s.dropped_attributes,
        status: s.error.map(|msg| proto::Status {
            message: msg.into_owned(),
            code: status::StatusCode::Error as i32,
        }),
        ..proto::Span::default()
    }
}

fn key_value(key: &str, value: &AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(s.clone().into_owned()),
        AttrValue::I64(i) => any_value::Value::IntValue(*i),
        AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
