//! Tracing settings: flags, environment variables and defaults side by side,
//! and the checks that turn a bad value into an operator-readable error.

use std::time::Duration;

use super::Error;

pub const ENV_OTLP_ENDPOINT: &str = "MESH_OTLP_ENDPOINT";
pub const ENV_TRACE_SAMPLING: &str = "MESH_TRACE_SAMPLING";
/// Istio's default: tracing every request of a busy mesh costs more than the
/// traces are worth; a caller that samples its own requests (`sampled=1`)
/// is always followed, whatever the ratio.
pub const DEFAULT_TRACE_SAMPLING: &str = "0.01";
pub const DEFAULT_SERVICE_NAME: &str = "nodemesh-agent";
/// The OpenTelemetry SDKs' batch processor defaults (2048 queued, 512 per
/// export): a second of a few thousand sampled requests fits.
pub const DEFAULT_QUEUE_SIZE: usize = 2048;
pub const DEFAULT_MAX_BATCH: usize = 512;
pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// A collector that does not answer within this is treated as down: the
/// batch is dropped rather than letting the queue back up behind it.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the tracer needs. Build it with [`TraceArgs::into_config`] (flags) or
/// [`TraceConfig::new`], then [`validate`](TraceConfig::validate) (which
/// [`Tracer::start`](super::Tracer::start) also does).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// OTLP/gRPC collector, `http://host:port`; `None`: tracing is off.
    pub endpoint: Option<String>,
    /// Share of new traces recorded, 0.0..=1.0. A parent's decision wins.
    pub sampling: f64,
    /// The `service.name` resource attribute of every exported span.
    pub service_name: String,
    /// Finished spans waiting for export; beyond it spans are dropped.
    pub queue_size: usize,
    /// Spans per export request.
    pub max_batch: usize,
    /// How long a partial batch may wait before it is exported.
    pub export_interval: Duration,
    /// Bound on one export call (connect included).
    pub export_timeout: Duration,
}

impl TraceConfig {
    /// `endpoint` and `sampling` as given; the rest from the defaults.
    pub fn new(endpoint: Option<String>, sampling: f64) -> TraceConfig {
        TraceConfig {
            endpoint,
            sampling,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            queue_size: DEFAULT_QUEUE_SIZE,
            max_batch: DEFAULT_MAX_BATCH,
            export_interval: DEFAULT_EXPORT_INTERVAL,
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
        }
    }

    /// Checks every field; the first problem is returned.
    pub fn validate(&self) -> Result<(), Error> {
        check_sampling(self.sampling)?;
        if let Some(endpoint) = &self.endpoint {
            check_endpoint(endpoint)?;
        }
        if self.service_name.trim().is_empty() {
            return Err(Error::ServiceName);
        }
        if self.queue_size == 0 || self.queue_size > 1 << 20 {
            return Err(Error::QueueSize(self.queue_size));
        }
        if self.max_batch == 0 || self.max_batch > self.queue_size {
            return Err(Error::MaxBatch {
                max_batch: self.max_batch,
                queue_size: self.queue_size,
            });
        }
        if self.export_interval < Duration::from_millis(10)
            || self.export_interval > Duration::from_secs(60)
        {
            return Err(Error::ExportInterval(self.export_interval));
        }
        if self.export_timeout.is_zero() || self.export_timeout > Duration::from_secs(60) {
            return Err(Error::ExportTimeout(self.export_timeout));
        }
        Ok(())
    }
}

/// The tracing flags of `mesh-agent run`, to `#[command(flatten)]` into it.
#[derive(Clone, Debug, clap::Args)]
pub struct TraceArgs {
    /// OTLP/gRPC collector for spans, e.g. http://127.0.0.1:4317 (default: no tracing).
    #[arg(long = "otlp-endpoint", env = ENV_OTLP_ENDPOINT, value_parser = parse_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces to record (0.0 to 1.0); callers' own decisions are kept.
    #[arg(long = "trace-sampling", env = ENV_TRACE_SAMPLING, default_value = DEFAULT_TRACE_SAMPLING,
          value_parser = parse_sampling)]
    pub trace_sampling: f64,
}

impl TraceArgs {
    /// The config these flags describe (other fields at their defaults).
    pub fn into_config(self) -> TraceConfig {
        TraceConfig::new(self.otlp_endpoint, self.trace_sampling)
    }
}

/// `value_parser` for `--trace-sampling`: a number in 0.0..=1.0.
pub fn parse_sampling(s: &str) -> Result<f64, String> {
    let ratio: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: not a number (a ratio such as 0.01)"))?;
    check_sampling(ratio).map_err(|e| e.to_string())?;
    Ok(ratio)
}

/// `value_parser` for `--otlp-endpoint`: `http://host:port`.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    check_endpoint(s.trim()).map_err(|e| e.to_string())?;
    Ok(s.trim().to_owned())
}

fn check_sampling(ratio: f64) -> Result<(), Error> {
    // `contains` is false for NaN too.
    if (0.0..=1.0).contains(&ratio) {
        Ok(())
    } else {
        Err(Error::Sampling(ratio))
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), Error> {
    let bad = |reason: &'static str| Error::Endpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let uri: http::Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // No TLS client roots are configured for the collector: it is
        // expected on the node or in the cluster, next to the agent.
        Some("https") => {
            return Err(bad(
                "https is not supported; use http:// to a node-local or in-cluster collector",
            ));
        }
        _ => return Err(bad("must start with http://")),
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    if authority.port_u16().is_none() {
        return Err(bad("no port (OTLP/gRPC usually listens on 4317)"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("must not have a path: OTLP/gRPC uses its own"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_validate() {
        assert!(TraceConfig::new(None, 0.01).validate().is_ok());
        assert!(
            TraceConfig::new(Some("http://127.0.0.1:4317".into()), 1.0)
                .validate()
                .is_ok()
        );
        assert!(
            TraceConfig::new(
                Some("http://otel-collector.observability:4317/".into()),
                0.0
            )
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn bad_sampling_ratios() {
        for ratio in [1.5, -0.1, f64::NAN, f64::INFINITY] {
            let err = TraceConfig::new(None, ratio).validate().unwrap_err();
            assert!(matches!(err, Error::Sampling(_)), "{ratio}: {err}");
        }
        assert!(
            parse_sampling("1.5")
                .unwrap_err()
                .contains("between 0.0 and 1.0")
        );
        assert!(parse_sampling("NaN").is_err());
        assert!(parse_sampling("lots").unwrap_err().contains("not a number"));
        assert_eq!(parse_sampling(" 0.25 "), Ok(0.25));
    }

    #[test]
    fn bad_endpoints() {
        for endpoint in [
            "127.0.0.1:4317",
            "grpc://127.0.0.1:4317",
            "https://collector:4317",
            "http://collector",
            "http://:4317",
            "http://user:pw@collector:4317",
            "http://collector:4317/v1/traces",
            "http://collector:99999",
            "not a url",
            "",
        ] {
            let err = TraceConfig::new(Some(endpoint.into()), 0.5)
                .validate()
                .unwrap_err();
            assert!(matches!(err, Error::Endpoint { .. }), "{endpoint}: {err}");
            assert!(err.to_string().contains("--otlp-endpoint"), "{err}");
        }
    }

    #[test]
    fn bad_sizes() {
        let mut c = TraceConfig::new(None, 0.5);
        c.queue_size = 0;
        assert!(matches!(c.validate(), Err(Error::QueueSize(0))));
        let mut c = TraceConfig::new(None, 0.5);
        c.max_batch = c.queue_size + 1;
        assert!(matches!(c.validate(), Err(Error::MaxBatch { .. })));
        let mut c = TraceConfig::new(None, 0.5);
        c.export_interval = Duration::ZERO;
        assert!(matches!(c.validate(), Err(Error::ExportInterval(_))));
        let mut c = TraceConfig::new(None, 0.5);
        c.service_name = " ".into();
        assert!(matches!(c.validate(), Err(Error::ServiceName)));
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        trace: TraceArgs,
    }

    #[test]
    fn from_flags() {
        let cli = Cli::try_parse_from([
            "agent",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--trace-sampling",
            "1",
        ])
        .unwrap();
        let cfg = cli.trace.into_config();
        assert_eq!(cfg.endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(cfg.sampling, 1.0);
        assert!(cfg.validate().is_ok());

        let cli = Cli::try_parse_from(["agent", "--trace-sampling", "0.5"]).unwrap();
        assert_eq!(cli.trace.into_config().sampling, 0.5);

        let err = Cli::try_parse_from(["agent", "--trace-sampling", "1.5"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("between 0.0 and 1.0"), "{err}");
        let err = Cli::try_parse_from(["agent", "--otlp-endpoint", "collector:4317"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("http://"), "{err}");
    }
}
