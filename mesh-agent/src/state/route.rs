//! The HTTP route model: what `httpRoutes` (local file) and Gateway API
//! `HTTPRoute` / `GRPCRoute` objects (converted by [`crate::route::gateway`])
//! say, as data. Its semantics (matching, precedence, weights, filters,
//! retries, defaults) are documented and implemented in [`crate::route`].
//!
//! The `httpRoutes` schema is the serde form of these types; the parts only
//! Gateway API can express (regular expressions, query parameters, other
//! services as backends, filters, the attachment) are `skip_deserializing`:
//! they come from Gateway API objects, whose own schema and checks apply.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use super::{Labels, Selector};

/// The fewest retries the budget always allows in flight (Envoy's
/// `min_retry_concurrency`), so a quiet service can still retry.
pub const MIN_RETRY_CONCURRENCY: u32 = 3;

/// An HTTP route for one service: ordered rules, plus the service-level
/// resilience settings. Also the config schema (camelCase, unknown fields
/// refused); [`validate`] checks what serde cannot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    /// The service of `namespace` whose traffic this route steers.
    pub service: String,
    pub rules: Vec<RouteRule>,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Set for a route converted from Gateway API: what it attaches to and
    /// how it ranks. `None`: the `httpRoutes` form (one route per service,
    /// rules in order).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Attachment>,
    /// Istio DestinationRule subset and port-level policies: the settings
    /// above replaced, for traffic to one port and/or one subset.
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<PolicyOverride>,
    /// Istio VirtualService: its rules are every route of the host, so a
    /// request none matches is answered 404 (Envoy's "no route"), not sent
    /// to any endpoint.
    #[serde(default, skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub exhaustive: bool,
}

/// Service-level settings for part of a service's traffic (Istio: each
/// port and subset is its own cluster, with its own limits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyOverride {
    /// The service port; `None`: every port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The subset ([`Backend::subset_name`]); `None`: every backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub circuit_breaker: CircuitBreaker,
    pub outlier_detection: OutlierDetection,
    pub load_balancer: LoadBalancer,
}

/// Which Gateway API kind a route came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum GatewayKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

impl fmt::Display for GatewayKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GatewayKind::Http => "HTTPRoute",
            GatewayKind::Grpc => "GRPCRoute",
        })
    }
}

/// A Gateway API route's attachment to one Service parent (GAMMA). The
/// route's `namespace` is where the route object lives; when it differs
/// from `service_namespace` the route is a *consumer* route, applied only
/// to clients of its own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub kind: GatewayKind,
    pub service_namespace: String,
    /// The service port the parentRef names; `None`: every HTTP port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The object's `metadata.creationTimestamp` (RFC 3339, UTC), the
    /// first tie-breaker of precedence across routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// How a service's endpoints take turns (per agent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// The less busy of two endpoints picked at random (requests in flight
    /// from this agent).
    #[default]
    LeastRequest,
    /// Each endpoint in turn.
    RoundRobin,
    /// Any endpoint, uniformly at random (Istio `RANDOM`).
    Random,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// `None`: the rule matches every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<HttpMatch>>,
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<RouteDuration>,
    #[serde(default)]
    pub retries: RetryPolicy,
    /// Gateway API filters, applied in order (see [`Filter`]).
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    #[schemars(skip)]
    pub filters: Vec<Filter>,
}

/// What a Gateway API filter does to a request routed by its rule (or to
/// the share sent to one backend, for a backend's filters).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    /// Rewrites the request before it is forwarded.
    UrlRewrite {
        #[serde(skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<PathModifier>,
    },
    /// Answered by the agent itself: nothing is forwarded.
    RequestRedirect(Redirect),
    /// A copy of the request to another service, its answer ignored.
    RequestMirror {
        backend: BackendService,
        /// Share of requests mirrored, in parts per million.
        per_million: u32,
        /// Istio: the labels of the mirror's subset; `None`: every endpoint.
        #[serde(skip_serializing_if = "Option::is_none")]
        subset: Option<Labels>,
    },
    /// Istio fault injection: a delay before forwarding, or an answer
    /// instead of forwarding, each for a share of requests.
    Fault(Fault),
}

/// Istio `fault`: shares in parts per million, each drawn on its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed: RouteDuration,
    pub per_million: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// 200-599.
    pub status: u16,
    pub per_million: u32,
}

/// `set` replaces, `add` appends, `remove` deletes; header names without
/// case.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part of the path the rule's `PathPrefix` matched.
    ReplacePrefixMatch(String),
    /// Istio `rewrite.uri` / `redirect.prefixRewrite`: replaces the string
    /// prefix the rule matched (the whole path when it matched otherwise).
    ReplaceStringPrefix(String),
}

/// Gateway API `RequestRedirect`; unset parts keep the request's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302, 303, 307 or 308.
    pub status_code: u16,
}

/// A Service port as a backend (Gateway API `backendRef`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendService {
    pub namespace: String,
    pub name: String,
    pub port: u16,
}

impl fmt::Display for BackendService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
    }
}

/// Every set part must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<HeaderMatch>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookies: Option<Vec<CookieMatch>>,
    /// Gateway API `queryParams`: every one must match.
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    #[schemars(skip)]
    pub query_params: Vec<QueryMatch>,
    /// Istio `sourceNamespace`: the client pod's namespace.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub source_namespace: Option<String>,
}

/// A query parameter, by its exact (case-sensitive) name: the first
/// occurrence's value must equal `exact`, or match `regex` (whole value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryMatch {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// `{exact: /x}` or `{prefix: /api}` (whole segments): exactly one
/// (or, from Gateway API, `regex`: the whole path).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub regex: Option<String>,
    /// Istio `uri.prefix`: the path starts with this string (not by
    /// segments: `/api` matches `/apix`).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub starts_with: Option<String>,
    /// Istio `ignoreUriCase`: `exact` and `startsWith` without ASCII case.
    #[serde(default, skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(skip)]
    pub ignore_case: bool,
}

/// `name` plus exactly one of `exact`, `prefix`, `present`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// Gateway API `RegularExpression`: the whole value.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub regex: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieMatch {
    pub name: String,
    pub exact: String,
}

/// A weighted share of the service's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// Pod labels the backend's endpoints carry; `None`: every endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<Labels>,
    /// Percent of the rule's requests; omitted only for a single backend.
    /// (From Gateway API: a proportion of the rule's total, 0 for none.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Gateway API: the Service port the share goes to; `None`: the
    /// route's own service.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub service: Option<BackendService>,
    /// Gateway API: filters applied to this backend's share only.
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    #[schemars(skip)]
    pub filters: Vec<Filter>,
    /// Gateway API: why the reference is invalid; its share of requests is
    /// answered 500, as the spec requires.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub invalid: Option<String>,
    /// Istio: the DestinationRule subset `subset` came from, for its
    /// policy ([`PolicyOverride`]).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub subset_name: Option<String>,
}

impl Backend {
    /// Whether a pod of the service (by its labels) belongs to this backend.
    pub fn selects(&self, pod_labels: &Labels) -> bool {
        self.subset.as_ref().is_none_or(|s| Selector(s).matches(pod_labels))
    }
}

/// What a retry is attempted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// The connection to the endpoint could not be made.
    ConnectFailure,
    /// The connection or stream was reset before a response.
    Reset,
    /// The endpoint answered with this status (validated to 100-599).
    Status(u32),
}

/// Retries of one rule; see the module doc for the defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try; 0 disables retries.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<RouteDuration>,
    pub retry_on: Vec<RetryOn>,
    /// Retries in flight as a percent of requests in flight (0-100).
    pub budget_percent: u32,
    /// Also retry methods that are not idempotent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all_methods: bool,
    pub base_backoff: RouteDuration,
    pub max_backoff: RouteDuration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::Status(503)],
            budget_percent: 20,
            all_methods: false,
            base_backoff: RouteDuration(Duration::from_millis(25)),
            max_backoff: RouteDuration(Duration::from_millis(250)),
        }
    }
}

/// The retry policy of requests no rule matched (the defaults).
pub fn default_retry_policy() -> &'static RetryPolicy {
    static DEFAULT: std::sync::OnceLock<RetryPolicy> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(RetryPolicy::default)
}

impl RetryPolicy {
    /// Whether a request with this method may be retried at all.
    pub fn allows_method(&self, method: &http::Method) -> bool {
        self.attempts > 0 && (self.all_methods || is_idempotent(method))
    }

    /// Whether this outcome of a try calls for a retry (method and budget
    /// checked separately).
    pub fn retries_on(&self, outcome: RetryOn) -> bool {
        self.retry_on.contains(&outcome)
    }

    /// Whether the budget lets one more retry start, given the requests and
    /// the retries (of this service, on this agent) already in flight.
    pub fn budget_allows(&self, requests_in_flight: u32, retries_in_flight: u32) -> bool {
        let share = u64::from(requests_in_flight) * u64::from(self.budget_percent) / 100;
        u64::from(retries_in_flight) < share.max(u64::from(MIN_RETRY_CONCURRENCY))
    }

    /// The pause before retry number `retry` (0 for the first retry): full
    /// jitter, `rand` scaled into `[0, min(max, base * 2^retry))`.
    pub fn backoff(&self, retry: u32, rand: u32) -> Duration {
        let base = self.base_backoff.0.as_nanos();
        let ceiling = base.saturating_mul(1u128 << retry.min(32)).min(self.max_backoff.0.as_nanos());
        let nanos = ceiling * u128::from(rand) / (u128::from(u32::MAX) + 1);
        Duration::from_nanos(nanos as u64)
    }
}

/// Per service and per agent; excess fails fast with 503.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct CircuitBreaker {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// Requests an upstream connection carries before it is closed;
    /// `None`: no limit (Istio `maxRequestsPerConnection`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_requests_per_connection: None,
        }
    }
}

/// Per service and per agent: ejects failing endpoints for a while.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers that eject an endpoint; 0 disables.
    #[serde(rename = "consecutive5xx")]
    pub consecutive_5xx: u32,
    /// Consecutive connect failures that eject an endpoint; 0 disables.
    pub consecutive_connect_failures: u32,
    pub base_ejection_time: RouteDuration,
    pub max_ejection_time: RouteDuration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_connect_failures: 5,
            base_ejection_time: RouteDuration(Duration::from_secs(30)),
            max_ejection_time: RouteDuration(Duration::from_secs(300)),
            max_ejection_percent: 50,
        }
    }
}

impl OutlierDetection {
    /// How long an endpoint is ejected for its `times`-th ejection (1 for
    /// the first): `base * times`, capped at `maxEjectionTime`.
    pub fn ejection_time(&self, times: u32) -> Duration {
        self.base_ejection_time.0.saturating_mul(times.max(1)).min(self.max_ejection_time.0)
    }

    /// How many of `endpoints` may be ejected at once: `maxEjectionPercent`
    /// of them rounded down, but at least one and never all (none when
    /// there is only one endpoint).
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        if endpoints <= 1 {
            return 0;
        }
        let share = endpoints * self.max_ejection_percent.min(100) as usize / 100;
        share.max(1).min(endpoints - 1)
    }
}

/// Idempotent by RFC 9110: GET, HEAD, OPTIONS, TRACE, PUT, DELETE.
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE].contains(method)
}

/// A duration written as an integer and a unit: `250ms`, `2s`, `1m`, `1h`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteDuration(pub Duration);

impl std::str::FromStr for RouteDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a duration (an integer and ms, s, m or h, such as \"250ms\" or \"2s\")");
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(bad());
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        Ok(Self(d))
    }
}

impl fmt::Display for RouteDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for RouteDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RouteDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RouteDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"250ms\" or \"2s\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RouteDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryOn::ConnectFailure => f.write_str("connect-failure"),
            RetryOn::Reset => f.write_str("reset"),
            RetryOn::Status(c) => write!(f, "{c}"),
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::Status(c) => s.serialize_u32(*c),
            _ => s.collect_str(self),
        }
    }
}

/// `connect-failure`, `reset`, or a status code (a number, or digits in a
/// string). The code's range is checked by [`validate`], to name the field.
impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RetryOn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connect-failure, reset or an HTTP status code")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RetryOn, E> {
                Ok(RetryOn::Status(u32::try_from(v).unwrap_or(u32::MAX)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RetryOn, E> {
                Ok(RetryOn::Status(u32::try_from(v).unwrap_or(u32::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RetryOn, E> {
                match v {
                    "connect-failure" => Ok(RetryOn::ConnectFailure),
                    "reset" => Ok(RetryOn::Reset),
                    _ if !v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit()) => {
                        Ok(RetryOn::Status(v.parse().unwrap_or(u32::MAX)))
                    }
                    _ => Err(E::custom(format!(
                        "{v:?} is not a retry condition (connect-failure, reset or an HTTP status code)"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}



/// Schema for the CRD (`crate::k8s::crd`): a string such as `250ms`, so
/// the API server refuses other shapes before the agent sees them.
impl schemars::JsonSchema for RouteDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RouteDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]+(ms|s|m|h)$",
            "description": "An integer and a unit (ms, s, m, h), such as 250ms or 2s.",
        })
    }
}

/// Schema for the CRD: `connect-failure`, `reset` or a status code, as a
/// number or a string (Kubernetes' int-or-string).
impl schemars::JsonSchema for RetryOn {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RetryOn".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "connect-failure, reset, or an HTTP status code (100-599).",
        })
    }
}
