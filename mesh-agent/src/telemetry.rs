//! Telemetry the agent emits about the traffic it carries.
//!
//! | module | job |
//! | --- | --- |
//! | [`trace`] | distributed tracing: W3C/B3 propagation, spans, OTLP/gRPC export |
//!
//! Metrics and access logs (issue 6) are to join here.

pub mod trace;
