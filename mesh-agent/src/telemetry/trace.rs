//! Distributed tracing: a span per request (or connection) per agent, trace
//! context read from and written to W3C and B3 headers, and spans exported to
//! an OpenTelemetry collector with OTLP over gRPC.
//!
//! ```text
//! let tracer = Tracer::start(TraceArgs{..}.into_config(), control_plane_runtime.handle())?;
//! // inbound request
//! let parent = tracer.extract(req.headers());
//! let mut span = tracer.start_span(SpanKind::Server, "inbound", parent.as_ref());
//! span.set_attribute("http.response.status_code", 200);
//! span.inject(req.headers_mut());        // the application sees our span as its parent
//! // outbound hop made while serving it
//! let child = tracer.start_span(SpanKind::Client, "outbound", span.context());
//! drop(span);                             // or span.end(): ended spans are queued for export
//! ```
//!
//! The API:
//! - [`TraceConfig`] (+ [`TraceArgs`], the `--otlp-endpoint` and
//!   `--trace-sampling` flags) and [`TraceConfig::validate`];
//! - [`Tracer`]: `disabled()`, `start(cfg, &Handle)`, `extract(&HeaderMap)`,
//!   `start_span(kind, name, parent)`, `stats()`, `flush().await`;
//! - [`Span`]: `context()`, `is_recording()`, `inject(&mut HeaderMap)`,
//!   `set_attribute(key, value)`, `set_error(msg)`, `end()` (or drop);
//! - [`SpanContext`], [`TraceId`], [`SpanId`], [`Formats`], [`SpanKind`],
//!   [`AttrValue`], [`TraceStats`]; [`attr`]: attribute keys.
//!
//! Rules the data path can rely on:
//! - nothing here blocks or awaits: an ended span is `try_send`-ed into a
//!   bounded queue, and a full queue drops it (counted);
//! - a trace is sampled (or not) once, at its root, by the configured ratio;
//!   every hop below follows the parent's flag. Unsampled spans allocate
//!   nothing for names or attributes but still propagate (`sampled=0`), so a
//!   trace is never half-recorded;
//! - an unreachable, failing or slow collector costs only the spans of the
//!   batches it fails (counted); exports are bounded by a timeout and the
//!   connection is re-made lazily on the next batch;
//! - a disabled tracer (no endpoint) gives spans with no context whose
//!   `inject` writes nothing: the application's own headers pass untouched.
//!
//! Hand-rolled spans over `opentelemetry-proto` rather than the
//! `opentelemetry` SDK: the queue bound, the drop accounting and the
//! never-block rule are the point, and they are a few lines here.

use std::{
    borrow::Cow,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub mod attr;
mod config;
mod export;
mod propagation;
#[cfg(test)]
mod tests;

pub use config::{
    DEFAULT_EXPORT_INTERVAL, DEFAULT_EXPORT_TIMEOUT, DEFAULT_MAX_BATCH, DEFAULT_QUEUE_SIZE,
    DEFAULT_SERVICE_NAME, DEFAULT_TRACE_SAMPLING, ENV_OTLP_ENDPOINT, ENV_TRACE_SAMPLING, TraceArgs,
    TraceConfig, parse_endpoint, parse_sampling,
};

/// Attributes kept per span; more are counted as dropped (OTLP carries the
/// count) so one noisy call site cannot make spans unbounded.
const MAX_ATTRIBUTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--trace-sampling {0}: must be a ratio between 0.0 and 1.0")]
    Sampling(f64),
    #[error(
        "--otlp-endpoint {endpoint:?}: {reason} (expected http://host:port, e.g. http://127.0.0.1:4317)"
    )]
    Endpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("tracing service name is empty")]
    ServiceName,
    #[error("trace queue size {0}: must be between 1 and 1048576")]
    QueueSize(usize),
    #[error(
        "trace export batch {max_batch}: must be at least 1 and at most the queue size ({queue_size})"
    )]
    MaxBatch { max_batch: usize, queue_size: usize },
    #[error("trace export interval {0:?}: must be between 10ms and 60s")]
    ExportInterval(Duration),
    #[error("trace export timeout {0:?}: must be more than 0 and at most 60s")]
    ExportTimeout(Duration),
}

/// 16 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// 8 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    fn random() -> TraceId {
        loop {
            let id: [u8; 16] = rand::random();
            if id != [0; 16] {
                return TraceId(id);
            }
        }
    }
}

impl SpanId {
    fn random() -> SpanId {
        loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                return SpanId(id);
            }
        }
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

/// Lower-case hex, as in `traceparent`.
impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}
impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}
impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}
impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// Which propagation formats a request carried. What was seen is written
/// back on the way out, so a B3-only application keeps getting B3.
/// `traceparent` is always written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Formats {
    pub w3c: bool,
    /// The single `b3` header.
    pub b3_single: bool,
    /// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`.
    pub b3_multi: bool,
}

/// A position in a trace: what crosses process boundaries in headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanContext {
    trace_id: TraceId,
    span_id: SpanId,
    /// `None` only for a B3 caller that deferred the decision: then the
    /// ratio decides, as at a root.
    sampled: Option<bool>,
    /// Carried verbatim (bounded, see `propagation`); cheap to clone.
    trace_state: Option<HeaderValue>,
    formats: Formats,
    /// Came from headers rather than from a span of this process.
    remote: bool,
}

impl SpanContext {
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }
    pub fn is_sampled(&self) -> bool {
        self.sampled == Some(true)
    }
    pub fn trace_state(&self) -> Option<&str> {
        self.trace_state.as_ref().and_then(|v| v.to_str().ok())
    }
    pub fn formats(&self) -> Formats {
        self.formats
    }
    pub fn is_remote(&self) -> bool {
        self.remote
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// The agent's side of a request or connection it makes (source agent).
    Client,
    /// The agent's side of a request or connection it accepts.
    Server,
    Internal,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(Cow<'static, str>),
    I64(i64),
    Bool(bool),
}

impl From<&'static str> for AttrValue {
    fn from(v: &'static str) -> Self {
        AttrValue::Str(Cow::Borrowed(v))
    }
}
impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(Cow::Owned(v))
    }
}
impl From<Cow<'static, str>> for AttrValue {
    fn from(v: Cow<'static, str>) -> Self {
        AttrValue::Str(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::I64(v)
    }
}
impl From<i32> for AttrValue {
    fn from(v: i32) -> Self {
        AttrValue::I64(v.into())
    }
}
impl From<u16> for AttrValue {
    fn from(v: u16) -> Self {
        AttrValue::I64(v.into())
    }
}
impl From<u32> for AttrValue {
    fn from(v: u32) -> Self {
        AttrValue::I64(v.into())
    }
}
/// Saturates at `i64::MAX` (OTLP integers are signed).
impl From<u64> for AttrValue {
    fn from(v: u64) -> Self {
        AttrValue::I64(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<usize> for AttrValue {
    fn from(v: usize) -> Self {
        AttrValue::I64(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

/// Counters for `/status` and metrics. Every sampled span ends up in exactly
/// one of `exported`, `dropped_queue_full`, `dropped_export_failed` (or is
/// still queued or open).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceStats {
    /// Spans started while tracing is on, sampled or not.
    pub started: u64,
    pub sampled: u64,
    /// Accepted by the collector.
    pub exported: u64,
    /// Ended while the export queue was full (or the exporter was gone).
    pub dropped_queue_full: u64,
    /// In a batch the collector refused, failed or did not answer in time.
    pub dropped_export_failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    started: AtomicU64,
    sampled: AtomicU64,
    exported: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_export_failed: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> TraceStats {
        TraceStats {
            started: self.started.load(Ordering::Relaxed),
            sampled: self.sampled.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Ordering::Relaxed),
            dropped_export_failed: self.dropped_export_failed.load(Ordering::Relaxed),
        }
    }
}

/// Creates spans and owns the export queue. Cheap to clone; the exporter
/// task ends (after a last export) when every clone and span is gone.
#[derive(Clone, Debug, Default)]
pub struct Tracer {
    inner: Option<Arc<Shared>>,
}

#[derive(Debug)]
struct Shared {
    queue: mpsc::Sender<export::Msg>,
    sampling: f64,
    counters: Arc<Counters>,
}

impl Tracer {
    /// No spans, no export, no header changes.
    pub fn disabled() -> Tracer {
        Tracer { inner: None }
    }

    /// Validates `cfg` and, if it names an endpoint, starts the exporter on
    /// `rt` (best the control-plane runtime: export work then never competes
    /// with the data path). Only invalid configuration is an error: a
    /// collector that cannot be reached is logged, and spans are dropped and
    /// counted until it can be.
    pub fn start(cfg: TraceConfig, rt: &tokio::runtime::Handle) -> Result<Tracer, Error> {
        cfg.validate()?;
        let Some(endpoint) = cfg.endpoint.as_deref() else {
            return Ok(Tracer::disabled());
        };
        let exporter = export::Exporter::new(endpoint, &cfg)?;
        let (queue, rx) = mpsc::channel(cfg.queue_size);
        let counters = Arc::new(Counters::default());
        rt.spawn(exporter.run(rx, counters.clone()));
        tracing::info!(
            endpoint,
            sampling = cfg.sampling,
            service = cfg.service_name,
            queue = cfg.queue_size,
            "tracing on: spans exported with OTLP/gRPC"
        );
        Ok(Tracer {
            inner: Some(Arc::new(Shared {
                queue,
                sampling: cfg.sampling,
                counters,
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The caller's trace context: W3C `traceparent` (+ `tracestate`) first,
    /// then the single `b3` header, then the `x-b3-*` headers. Anything
    /// malformed counts as absent. Works on a disabled tracer too.
    pub fn extract(&self, headers: &HeaderMap) -> Option<SpanContext> {
        propagation::extract(headers)
    }

    /// Starts a span: a child of `parent`, or the root of a new trace.
    pub fn start_span(
        &self,
        kind: SpanKind,
        name: impl Into<Cow<'static, str>>,
        parent: Option<&SpanContext>,
    ) -> Span {
        let Some(shared) = &self.inner else {
            return Span {
                inner: SpanState::Disabled,
            };
        };
        Counters::add(&shared.counters.started, 1);
        let (trace_id, sampled, trace_state, formats) = match parent {
            Some(p) => {
                let sampled = p
                    .sampled
                    .unwrap_or_else(|| ratio_says(shared.sampling, p.trace_id));
                (p.trace_id, sampled, p.trace_state.clone(), p.formats)
            }
            None => {
                let id = TraceId::random();
                (
                    id,
                    ratio_says(shared.sampling, id),
                    None,
                    Formats {
                        w3c: true,
                        ..Formats::default()
                    },
                )
            }
        };
        let ctx = SpanContext {
            trace_id,
            span_id: SpanId::random(),
            sampled: Some(sampled),
            trace_state,
            formats,
            remote: false,
        };
        let parent_id = parent.map(|p| p.span_id);
        if !sampled {
            return Span {
                inner: SpanState::Unsampled {
                    ctx,
                    parent: parent_id,
                },
            };
        }
        Counters::add(&shared.counters.sampled, 1);
        let data = Box::new(SpanData {
            ctx,
            parent: parent_id,
            remote_parent: parent.is_some_and(|p| p.remote),
            name: name.into(),
            kind,
            start: SystemTime::now(),
            started: Instant::now(),
            end: SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes: 0,
            error: None,
        });
        Span {
            inner: SpanState::Recording {
                shared: shared.clone(),
                data,
            },
        }
    }

    pub fn stats(&self) -> TraceStats {
        self.inner
            .as_ref()
            .map(|s| s.counters.snapshot())
            .unwrap_or_default()
    }

    /// Waits until every span ended before this call has been exported (or
    /// dropped): for shutdown and tests. Never needed on the data path.
    pub async fn flush(&self) {
        let Some(shared) = &self.inner else { return };
        let (done, wait) = oneshot::channel();
        if shared.queue.send(export::Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// The ratio decision, on the trace id so every agent that has to decide for
/// the same trace (a B3 caller that deferred) decides the same way. Our own
/// trace ids are random, so the low 8 bytes are uniform.
fn ratio_says(ratio: f64, trace_id: TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let low = u64::from_be_bytes(trace_id.0[8..].try_into().unwrap_or_default());
    // 53 bits: exactly representable as f64.
    ((low >> 11) as f64 / (1u64 << 53) as f64) < ratio
}

/// One span. Ends (and is queued for export, if sampled) when
/// [`end`](Span::end) is called or it is dropped.
#[derive(Debug)]
pub struct Span {
    inner: SpanState,
}

#[derive(Debug)]
enum SpanState {
    Disabled,
    Unsampled {
        ctx: SpanContext,
        parent: Option<SpanId>,
    },
    Recording {
        shared: Arc<Shared>,
        data: Box<SpanData>,
    },
    Ended,
}

/// What is exported for a sampled span.
#[derive(Debug)]
struct SpanData {
    ctx: SpanContext,
    parent: Option<SpanId>,
    remote_parent: bool,
    name: Cow<'static, str>,
    kind: SpanKind,
    start: SystemTime,
    /// The duration comes from the monotonic clock: a wall-clock step while
    /// the span is open does not make it negative or huge.
    started: Instant,
    end: SystemTime,
    attributes: Vec<(&'static str, AttrValue)>,
    dropped_attributes: u32,
    error: Option<Cow<'static, str>>,
}

impl Span {
    /// This span's context (to parent other spans on), `None` when tracing
    /// is off. Fits `Tracer::start_span`'s `parent` as is.
    pub fn context(&self) -> Option<&SpanContext> {
        match &self.inner {
            SpanState::Unsampled { ctx, .. } => Some(ctx),
            SpanState::Recording { data, .. } => Some(&data.ctx),
            SpanState::Disabled | SpanState::Ended => None,
        }
    }

    /// Whether attributes set on it are kept: callers can skip building
    /// expensive values when not.
    pub fn is_recording(&self) -> bool {
        matches!(self.inner, SpanState::Recording { .. })
    }

    /// Writes this span as the parent for the next hop: `traceparent`,
    /// `tracestate` (removed if there is none), and the B3 headers in the
    /// formats the caller used. Replaces any previous values. Nothing when
    /// tracing is off.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let (ctx, parent) = match &self.inner {
            SpanState::Unsampled { ctx, parent } => (ctx, *parent),
            SpanState::Recording { data, .. } => (&data.ctx, data.parent),
            SpanState::Disabled | SpanState::Ended => return,
        };
        propagation::inject(ctx, parent, headers);
    }

    pub fn set_attribute(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        if let SpanState::Recording { data, .. } = &mut self.inner {
            if data.attributes.len() < MAX_ATTRIBUTES {
                data.attributes.push((key, value.into()));
            } else {
                data.dropped_attributes += 1;
            }
        }
    }

    /// Marks the span failed (OTLP status `ERROR`) with a message.
    pub fn set_error(&mut self, msg: impl Into<Cow<'static, str>>) {
        if let SpanState::Recording { data, .. } = &mut self.inner {
            data.error = Some(msg.into());
        }
    }

    pub fn end(self) {
        drop(self);
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        let SpanState::Recording { shared, mut data } =
            std::mem::replace(&mut self.inner, SpanState::Ended)
        else {
            return;
        };
        data.end = data.start + data.started.elapsed();
        if shared.queue.try_send(export::Msg::Span(data)).is_err() {
            Counters::add(&shared.counters.dropped_queue_full, 1);
        }
    }
}
