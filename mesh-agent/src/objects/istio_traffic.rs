//! Istio's `networking.istio.io` `VirtualService` and `DestinationRule`,
//! checked one object at a time into [`state::traffic`] values, in the
//! shapes Istio publishes (`http[].match[].uri.prefix`,
//! `route[].destination.subset`, `trafficPolicy.connectionPool.tcp`, ...).
//! Hosts and subsets name other objects; [`crate::route::istio`] resolves
//! them against the state. The conformance table, field by field, is
//! `docs/istio-traffic.md`.
//!
//! Unknown fields are refused (Istio's validation refuses them too). A
//! field of the schema this mesh does not do (`corsPolicy`, `delegate`,
//! `tcp`, `tls`, consistent hashing, ...) refuses the whole object with
//! `Unsupported` naming the field: routing is not security, so nothing
//! stands in; the source keeps an earlier valid version of the object in
//! force, and without one the object is simply not applied.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;
use serde_json::Value;

use super::{Converted, Meta, Refused, istio::read};
use crate::state::{
    Labels,
    route::{
        CircuitBreaker, Fault, FaultAbort, FaultDelay, Filter, HeaderMatch, HeaderModifier, HttpMatch, LoadBalancer,
        OutlierDetection, PathMatch, PathModifier, QueryMatch, Redirect, RetryOn, RetryPolicy, RouteDuration,
    },
    traffic::{DestinationRule, Subset, TrafficPolicy, VirtualService, VsDestination, VsMirror, VsRule, VsTarget},
};

pub const NETWORKING_GROUP: &str = "networking.istio.io";

type Unset = Option<Value>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VirtualServiceSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<HttpRouteSpec>,
    tcp: Unset,
    tls: Unset,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteSpec {
    name: Option<String>,
    #[serde(rename = "match", default)]
    matches: Vec<MatchSpec>,
    #[serde(default)]
    route: Vec<RouteDestination>,
    redirect: Option<RedirectSpec>,
    direct_response: Unset,
    delegate: Unset,
    rewrite: Option<RewriteSpec>,
    timeout: Option<String>,
    retries: Option<RetriesSpec>,
    fault: Option<FaultSpec>,
    mirror: Option<DestinationSpec>,
    mirror_percent: Option<u32>,
    #[serde(rename = "mirror_percent")]
    mirror_percent_snake: Option<u32>,
    mirror_percentage: Option<Percent>,
    #[serde(default)]
    mirrors: Vec<MirrorSpec>,
    cors_policy: Unset,
    headers: Option<HeadersSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StringMatch {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MatchSpec {
    name: Option<String>,
    uri: Option<StringMatch>,
    scheme: Unset,
    method: Option<StringMatch>,
    authority: Unset,
    #[serde(default)]
    headers: BTreeMap<String, StringMatch>,
    port: Unset,
    source_labels: Unset,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    ignore_uri_case: bool,
    #[serde(default)]
    without_headers: BTreeMap<String, StringMatch>,
    source_namespace: Option<String>,
    stat_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DestinationSpec {
    #[serde(default)]
    host: String,
    subset: Option<String>,
    port: Option<PortSelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortSelector {
    number: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteDestination {
    destination: Option<DestinationSpec>,
    weight: Option<i64>,
    headers: Option<HeadersSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MirrorSpec {
    destination: Option<DestinationSpec>,
    percentage: Option<Percent>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Percent {
    #[serde(default)]
    value: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HeadersSpec {
    request: Option<HeaderOps>,
    response: Option<HeaderOps>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HeaderOps {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RedirectSpec {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<u32>,
    derive_port: Option<String>,
    scheme: Option<String>,
    redirect_code: Option<u32>,
    prefix_rewrite: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RewriteSpec {
    uri: Option<String>,
    authority: Option<String>,
    uri_regex_rewrite: Unset,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RetriesSpec {
    #[serde(default)]
    attempts: i64,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
    retry_remote_localities: Option<bool>,
    retry_ignore_previous_hosts: Option<bool>,
    backoff: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FaultSpec {
    delay: Option<DelaySpec>,
    abort: Option<AbortSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DelaySpec {
    fixed_delay: Option<String>,
    exponential_delay: Unset,
    percentage: Option<Percent>,
    percent: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AbortSpec {
    http_status: Option<i64>,
    grpc_status: Unset,
    http2_error: Unset,
    percentage: Option<Percent>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DestinationRuleSpec {
    #[serde(default)]
    host: String,
    traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    subsets: Vec<SubsetSpec>,
    #[serde(default)]
    export_to: Vec<String>,
    workload_selector: Unset,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SubsetSpec {
    #[serde(default)]
    name: String,
    #[serde(default)]
    labels: Labels,
    traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TrafficPolicySpec {
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierSpec>,
    tls: Unset,
    #[serde(default)]
    port_level_settings: Vec<PortPolicySpec>,
    tunnel: Unset,
    proxy_protocol: Unset,
    retry_budget: Unset,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortPolicySpec {
    port: Option<PortSelector>,
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierSpec>,
    tls: Unset,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadBalancerSpec {
    simple: Option<String>,
    consistent_hash: Unset,
    locality_lb_setting: Unset,
    warmup_duration_secs: Unset,
    warmup: Unset,
    zone_aware_lb_setting: Unset,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConnectionPoolSpec {
    tcp: Option<TcpPoolSpec>,
    http: Option<HttpPoolSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpPoolSpec {
    max_connections: Option<i64>,
    connect_timeout: Unset,
    tcp_keepalive: Unset,
    max_connection_duration: Unset,
    idle_timeout: Unset,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpPoolSpec {
    http1_max_pending_requests: Option<i64>,
    http2_max_requests: Option<i64>,
    max_requests_per_connection: Option<i64>,
    max_retries: Option<i64>,
    idle_timeout: Unset,
    h2_upgrade_policy: Option<String>,
    use_client_protocol: Option<bool>,
    max_concurrent_streams: Unset,
    http2_keep_alive: Unset,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OutlierSpec {
    split_external_local_origin_errors: Option<bool>,
    consecutive_local_origin_failures: Option<i64>,
    consecutive_gateway_errors: Option<i64>,
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<i64>,
    consecutive_errors: Option<i64>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<i64>,
    min_health_percent: Option<i64>,
    outlier_detection_http_error_codes: Unset,
}

/// A field path and why it is refused.
type Bad = (String, String);

fn bad(field: impl Into<String>, why: impl Into<String>) -> Bad {
    (field.into(), why.into())
}

fn refused((field, why): Bad, unsupported: bool) -> Refused {
    let message = format!("{field}: {why}");
    if unsupported { Refused::unsupported(message) } else { Refused::invalid(message) }
}

/// Set fields of the schema that this mesh does not do: `Unsupported`.
fn none_of(at: &str, fields: &[(&str, bool)], why: &str) -> Result<(), Bad> {
    match fields.iter().find(|(_, set)| *set) {
        Some((f, _)) => Err(bad(format!("{at}.{f}"), why.to_owned())),
        None => Ok(()),
    }
}

/// The refusal of a field Istio defines that the mesh does not do.
struct Check {
    unsupported: bool,
    bad: Bad,
}

fn unsupported(b: Bad) -> Check {
    Check { unsupported: true, bad: b }
}

fn invalid(b: Bad) -> Check {
    Check { unsupported: false, bad: b }
}

pub fn virtual_service(meta: &Meta<'_>, spec: &Value) -> Result<Converted, Refused> {
    let s: VirtualServiceSpec = read(spec)?;
    convert_vs(meta, &s).map(Converted::VirtualService).map_err(|c| refused(c.bad, c.unsupported))
}

pub fn destination_rule(meta: &Meta<'_>, spec: &Value) -> Result<Converted, Refused> {
    let s: DestinationRuleSpec = read(spec)?;
    convert_dr(meta, &s).map(Converted::DestinationRule).map_err(|c| refused(c.bad, c.unsupported))
}

/// Whether a VirtualService (or one of its matches) applies to mesh
/// traffic: no `gateways`, or `mesh` among them.
fn for_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

fn export_to(at: &str, e: &[String]) -> Result<(), Check> {
    if e.is_empty() || e.iter().any(|x| x == "*") {
        return Ok(());
    }
    Err(unsupported(bad(format!("{at}.exportTo"), "visibility narrower than \"*\" is not implemented: every namespace's clients use the object")))
}

fn host(at: &str, h: &str) -> Result<String, Check> {
    if h.is_empty() {
        return Err(invalid(bad(at, "a host is required")));
    }
    if h.contains('*') {
        return Err(unsupported(bad(at, format!("{h:?}: wildcard hosts are not implemented (name a Kubernetes Service)"))));
    }
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Err(unsupported(bad(at, format!("{h:?}: an IP address is a gateway host; mesh hosts are Services"))));
    }
    if !h.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')) {
        return Err(invalid(bad(at, format!("{h:?} is not a host name"))));
    }
    Ok(h.to_ascii_lowercase())
}

fn convert_vs(meta: &Meta<'_>, s: &VirtualServiceSpec) -> Result<VirtualService, Check> {
    none_of("spec", &[("tcp", s.tcp.is_some()), ("tls", s.tls.is_some())], "TCP and TLS routes are not implemented (HTTP routes only)").map_err(unsupported)?;
    export_to("spec", &s.export_to)?;
    if s.hosts.is_empty() {
        return Err(invalid(bad("spec.hosts", "a VirtualService names at least one host")));
    }
    let hosts = s.hosts.iter().enumerate().map(|(i, h)| host(&format!("spec.hosts[{i}]"), h)).collect::<Result<Vec<_>, _>>()?;
    // Bound only to gateways: none of it is mesh traffic.
    let rules = if for_mesh(&s.gateways) {
        let mut rules = Vec::new();
        for (i, r) in s.http.iter().enumerate() {
            if let Some(rule) = http_rule(&format!("spec.http[{i}]"), r)? {
                rules.push(rule);
            }
        }
        rules
    } else {
        Vec::new()
    };
    Ok(VirtualService { name: meta.name.to_owned(), namespace: meta.namespace.to_owned(), created: meta.created.map(str::to_owned), hosts, rules })
}

/// A rule, or `None` when every match of it is bound to gateways only.
fn http_rule(at: &str, r: &HttpRouteSpec) -> Result<Option<VsRule>, Check> {
    none_of(
        at,
        &[("directResponse", r.direct_response.is_some()), ("delegate", r.delegate.is_some()), ("corsPolicy", r.cors_policy.is_some())],
        "not implemented by this mesh",
    )
    .map_err(unsupported)?;
    let matches = if r.matches.is_empty() {
        None
    } else {
        let mut ms = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            if for_mesh(&m.gateways) {
                ms.push(http_match(&format!("{at}.match[{j}]"), m)?);
            }
        }
        if ms.is_empty() {
            return Ok(None);
        }
        Some(ms)
    };
    if r.redirect.is_some() && !r.route.is_empty() {
        return Err(invalid(bad(format!("{at}.redirect"), "a rule either redirects or routes, not both")));
    }
    if r.redirect.is_none() && r.route.is_empty() {
        return Err(invalid(bad(format!("{at}.route"), "a rule needs a route (or a redirect)")));
    }
    let mut filters = Vec::new();
    if let Some(f) = &r.fault {
        filters.push(Filter::Fault(fault(&format!("{at}.fault"), f)?));
    }
    if let Some(h) = &r.headers {
        filters.extend(headers(&format!("{at}.headers"), h)?);
    }
    if let Some(rw) = &r.rewrite {
        let f = format!("{at}.rewrite");
        if rw.uri_regex_rewrite.is_some() {
            return Err(unsupported(bad(format!("{f}.uriRegexRewrite"), "not implemented by this mesh")));
        }
        let path = rw.uri.as_deref().map(|u| uri_value(&format!("{f}.uri"), u)).transpose()?.map(PathModifier::ReplaceStringPrefix);
        let hostname = rw.authority.as_deref().map(|a| authority(&format!("{f}.authority"), a)).transpose()?;
        if path.is_some() || hostname.is_some() {
            filters.push(Filter::UrlRewrite { hostname, path });
        }
    }
    let redirect = r.redirect.as_ref().map(|x| redirect(&format!("{at}.redirect"), x)).transpose()?;
    let mut route = Vec::new();
    let several = r.route.len() > 1;
    for (k, d) in r.route.iter().enumerate() {
        let f = format!("{at}.route[{k}]");
        let target = target(&format!("{f}.destination"), d.destination.as_ref())?;
        let weight = match d.weight {
            Some(w) if !(0..=i64::from(u32::MAX)).contains(&w) => return Err(invalid(bad(format!("{f}.weight"), format!("{w} is not a weight")))),
            Some(w) => w as u32,
            // One destination takes everything; among several, an unset
            // weight is 0 (Istio's proto default).
            None if several => 0,
            None => 100,
        };
        let filters = match &d.headers {
            Some(h) => headers(&format!("{f}.headers"), h)?,
            None => Vec::new(),
        };
        route.push(VsDestination { target, weight: if several { weight } else { 100 }, filters });
    }
    let mut mirrors = Vec::new();
    if let Some(m) = &r.mirror {
        let share = match (&r.mirror_percentage, r.mirror_percent.or(r.mirror_percent_snake)) {
            (Some(p), _) => per_million(&format!("{at}.mirrorPercentage.value"), p.value)?,
            (None, Some(p)) => per_million(&format!("{at}.mirrorPercent"), f64::from(p))?,
            (None, None) => 1_000_000,
        };
        mirrors.push(VsMirror { target: target(&format!("{at}.mirror"), Some(m))?, per_million: share });
    }
    for (k, m) in r.mirrors.iter().enumerate() {
        let f = format!("{at}.mirrors[{k}]");
        let share = match &m.percentage {
            Some(p) => per_million(&format!("{f}.percentage.value"), p.value)?,
            None => 1_000_000,
        };
        mirrors.push(VsMirror { target: target(&format!("{f}.destination"), m.destination.as_ref())?, per_million: share });
    }
    let timeout = r.timeout.as_deref().map(|t| duration(&format!("{at}.timeout"), t)).transpose()?.filter(|d| !d.0.is_zero());
    let retries = match &r.retries {
        Some(x) => retries(&format!("{at}.retries"), x)?,
        None => RetryPolicy::default(),
    };
    Ok(Some(VsRule { name: r.name.clone(), matches, route, redirect, timeout, retries, filters, mirrors }))
}

fn http_match(at: &str, m: &MatchSpec) -> Result<HttpMatch, Check> {
    none_of(
        at,
        &[("scheme", m.scheme.is_some()), ("authority", m.authority.is_some()), ("port", m.port.is_some()), ("sourceLabels", m.source_labels.is_some())],
        "not implemented by this mesh (a rule cannot depend on it)",
    )
    .map_err(unsupported)?;
    let _ = (&m.name, &m.stat_prefix);
    let mut out = HttpMatch::default();
    if let Some(u) = &m.uri {
        let f = format!("{at}.uri");
        out.path = Some(match one_of(&f, u)? {
            ("exact", v) => PathMatch { exact: Some(uri_value(&format!("{f}.exact"), v)?), ignore_case: m.ignore_uri_case, ..Default::default() },
            ("prefix", v) => PathMatch { starts_with: Some(uri_value(&format!("{f}.prefix"), v)?), ignore_case: m.ignore_uri_case, ..Default::default() },
            (_, v) => PathMatch { regex: Some(regex(&format!("{f}.regex"), v)?), ..Default::default() },
        });
    }
    if let Some(x) = &m.method {
        let f = format!("{at}.method");
        match one_of(&f, x)? {
            ("exact", v) if http::Method::from_bytes(v.as_bytes()).is_ok() => out.method = Some(v.to_owned()),
            ("exact", v) => return Err(invalid(bad(format!("{f}.exact"), format!("{v:?} is not an HTTP method")))),
            (k, _) => return Err(unsupported(bad(format!("{f}.{k}"), "methods match exactly here"))),
        }
    }
    let mut hs = Vec::new();
    for (name, v) in &m.headers {
        let f = format!("{at}.headers.{name}");
        header_name(&f, name)?;
        let mut h = HeaderMatch { name: name.to_ascii_lowercase(), ..Default::default() };
        match string_match(&f, v)? {
            None => h.present = Some(true),
            Some(("exact", x)) => h.exact = Some(x.to_owned()),
            Some(("prefix", x)) => h.prefix = Some(x.to_owned()),
            Some((_, x)) => h.regex = Some(regex(&format!("{f}.regex"), x)?),
        }
        hs.push(h);
    }
    for (name, v) in &m.without_headers {
        let f = format!("{at}.withoutHeaders.{name}");
        header_name(&f, name)?;
        match string_match(&f, v)? {
            None => hs.push(HeaderMatch { name: name.to_ascii_lowercase(), present: Some(false), ..Default::default() }),
            Some((k, _)) => return Err(unsupported(bad(format!("{f}.{k}"), "only the absence of a header ({}) can be matched"))),
        }
    }
    if !hs.is_empty() {
        out.headers = Some(hs);
    }
    for (name, v) in &m.query_params {
        let f = format!("{at}.queryParams.{name}");
        let mut q = QueryMatch { name: name.clone(), ..Default::default() };
        match string_match(&f, v)? {
            None => {}
            Some(("exact", x)) => q.exact = Some(x.to_owned()),
            Some(("prefix", _)) => return Err(invalid(bad(format!("{f}.prefix"), "Istio does not support prefix matches of query parameters"))),
            Some((_, x)) => q.regex = Some(regex(&format!("{f}.regex"), x)?),
        }
        out.query_params.push(q);
    }
    out.source_namespace = m.source_namespace.clone();
    Ok(out)
}

/// The one field set of a string match (`exact`, `prefix` or `regex`).
fn one_of<'a>(at: &str, s: &'a StringMatch) -> Result<(&'static str, &'a str), Check> {
    string_match(at, s)?.ok_or_else(|| invalid(bad(at, "set one of exact, prefix, regex")))
}

/// `None` for `{}` (Istio: the header is present).
fn string_match<'a>(at: &str, s: &'a StringMatch) -> Result<Option<(&'static str, &'a str)>, Check> {
    let set: Vec<(&'static str, &str)> =
        [("exact", &s.exact), ("prefix", &s.prefix), ("regex", &s.regex)].into_iter().filter_map(|(k, v)| v.as_deref().map(|v| (k, v))).collect();
    match set.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(invalid(bad(at, "set only one of exact, prefix, regex"))),
    }
}

fn uri_value(at: &str, v: &str) -> Result<String, Check> {
    if !v.starts_with('/') || v.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'#') {
        return Err(invalid(bad(at, format!("{v:?} is not a path (it starts with '/', without spaces or controls)"))));
    }
    Ok(v.to_owned())
}

fn regex(at: &str, re: &str) -> Result<String, Check> {
    regex::Regex::new(&format!("^(?:{re})$"))
        .map(|_| re.to_owned())
        .map_err(|e| unsupported(bad(at, format!("{re:?} does not compile as a regular expression here (RE2-like syntax): {e}"))))
}

fn header_name(at: &str, name: &str) -> Result<(), Check> {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.starts_with(':') {
        return Err(invalid(bad(at, format!("{name:?} is not a header name"))));
    }
    Ok(())
}

fn authority(at: &str, a: &str) -> Result<String, Check> {
    if a.is_empty() || http::uri::Authority::try_from(a).is_err() {
        return Err(invalid(bad(at, format!("{a:?} is not an authority"))));
    }
    Ok(a.to_owned())
}

fn target(at: &str, d: Option<&DestinationSpec>) -> Result<VsTarget, Check> {
    let d = d.ok_or_else(|| invalid(bad(at, "a destination is required")))?;
    let port = match d.port.as_ref().and_then(|p| p.number) {
        Some(n) if (1..=65535).contains(&n) => Some(n as u16),
        Some(n) => return Err(invalid(bad(format!("{at}.port.number"), format!("{n} is not a port")))),
        None => None,
    };
    if let Some(s) = &d.subset
        && s.is_empty()
    {
        return Err(invalid(bad(format!("{at}.subset"), "an empty subset name")));
    }
    Ok(VsTarget { host: host(&format!("{at}.host"), &d.host)?, subset: d.subset.clone(), port })
}

fn headers(at: &str, h: &HeadersSpec) -> Result<Vec<Filter>, Check> {
    let mut out = Vec::new();
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        let f = format!("{at}.{side}");
        let mut m = HeaderModifier::default();
        for (op, map, list) in [("set", &ops.set, &mut m.set), ("add", &ops.add, &mut m.add)] {
            for (name, value) in map {
                header_name(&format!("{f}.{op}.{name}"), name)?;
                if http::HeaderValue::from_str(value).is_err() {
                    return Err(invalid(bad(format!("{f}.{op}.{name}"), format!("{value:?} is not a header value"))));
                }
                list.push((name.to_ascii_lowercase(), value.clone()));
            }
        }
        for (k, name) in ops.remove.iter().enumerate() {
            header_name(&format!("{f}.remove[{k}]"), name)?;
            m.remove.push(name.to_ascii_lowercase());
        }
        out.push(if side == "request" { Filter::RequestHeaderModifier(m) } else { Filter::ResponseHeaderModifier(m) });
    }
    Ok(out)
}

fn redirect(at: &str, r: &RedirectSpec) -> Result<Redirect, Check> {
    let status_code = match r.redirect_code {
        None => 301,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
        Some(c) => return Err(unsupported(bad(format!("{at}.redirectCode"), format!("{c}: redirects here answer 301, 302, 303, 307 or 308")))),
    };
    if r.uri.is_some() && r.prefix_rewrite.is_some() {
        return Err(invalid(bad(format!("{at}.prefixRewrite"), "set either uri or prefixRewrite")));
    }
    let path = match (&r.uri, &r.prefix_rewrite) {
        (Some(u), _) => Some(PathModifier::ReplaceFullPath(uri_value(&format!("{at}.uri"), u)?)),
        (_, Some(p)) => Some(PathModifier::ReplaceStringPrefix(uri_value(&format!("{at}.prefixRewrite"), p)?)),
        _ => None,
    };
    let scheme = match r.scheme.as_deref() {
        None => None,
        Some(s @ ("http" | "https")) => Some(s.to_owned()),
        Some(s) => return Err(invalid(bad(format!("{at}.scheme"), format!("{s:?} is not http or https")))),
    };
    let port = match (r.port, r.derive_port.as_deref()) {
        (Some(_), Some(_)) => return Err(invalid(bad(format!("{at}.derivePort"), "set either port or derivePort"))),
        (Some(p), None) if (1..=65535).contains(&p) => Some(p as u16),
        (Some(p), None) => return Err(invalid(bad(format!("{at}.port"), format!("{p} is not a port")))),
        // The scheme's well-known port.
        (None, Some("FROM_PROTOCOL_DEFAULT")) => Some(if scheme.as_deref() == Some("https") { 443 } else { 80 }),
        (None, Some("FROM_REQUEST_PORT") | None) => None,
        (None, Some(d)) => return Err(invalid(bad(format!("{at}.derivePort"), format!("{d:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT")))),
    };
    let hostname = r.authority.as_deref().map(|a| authority(&format!("{at}.authority"), a)).transpose()?;
    Ok(Redirect { scheme, hostname, path, port, status_code })
}

fn fault(at: &str, f: &FaultSpec) -> Result<Fault, Check> {
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let fd = format!("{at}.delay");
            if d.exponential_delay.is_some() {
                return Err(unsupported(bad(format!("{fd}.exponentialDelay"), "not implemented by this mesh (use fixedDelay)")));
            }
            let fixed = d.fixed_delay.as_deref().ok_or_else(|| invalid(bad(format!("{fd}.fixedDelay"), "a delay needs fixedDelay")))?;
            let fixed = duration(&format!("{fd}.fixedDelay"), fixed)?;
            // Istio: without a percentage, no request is delayed.
            let share = match (&d.percentage, d.percent) {
                (Some(p), _) => per_million(&format!("{fd}.percentage.value"), p.value)?,
                (None, Some(p)) => per_million(&format!("{fd}.percent"), f64::from(p))?,
                (None, None) => 0,
            };
            Some(FaultDelay { fixed, per_million: share })
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let fa = format!("{at}.abort");
            none_of(&fa, &[("grpcStatus", a.grpc_status.is_some()), ("http2Error", a.http2_error.is_some())], "not implemented by this mesh (use httpStatus)")
                .map_err(unsupported)?;
            let status = match a.http_status {
                Some(s) if (200..=599).contains(&s) => s as u16,
                Some(s) => return Err(invalid(bad(format!("{fa}.httpStatus"), format!("{s} is not an HTTP status (200-599)")))),
                None => return Err(invalid(bad(format!("{fa}.httpStatus"), "an abort needs httpStatus"))),
            };
            let share = match &a.percentage {
                Some(p) => per_million(&format!("{fa}.percentage.value"), p.value)?,
                None => 0,
            };
            Some(FaultAbort { status, per_million: share })
        }
    };
    Ok(Fault { delay, abort })
}

fn per_million(at: &str, percent: f64) -> Result<u32, Check> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(invalid(bad(at, format!("{percent} is not a percentage (0-100)"))));
    }
    Ok((percent * 10_000.0).round() as u32)
}

/// Istio's retry policy: `retryOn` is Envoy's comma-separated list.
fn retries(at: &str, r: &RetriesSpec) -> Result<RetryPolicy, Check> {
    let _ = (r.retry_remote_localities, r.retry_ignore_previous_hosts);
    let attempts = match r.attempts {
        a @ 0..=10 => a as u32,
        a => return Err(unsupported(bad(format!("{at}.attempts"), format!("{a} retries is too many here (at most 10)")))),
    };
    let mut p = RetryPolicy { attempts, ..RetryPolicy::default() };
    if let Some(t) = &r.per_try_timeout {
        p.per_try_timeout = Some(duration(&format!("{at}.perTryTimeout"), t)?).filter(|d| !d.0.is_zero());
    }
    if let Some(b) = &r.backoff {
        let b = duration(&format!("{at}.backoff"), b)?;
        if b.0.is_zero() {
            return Err(invalid(bad(format!("{at}.backoff"), "must be longer than zero")));
        }
        p.base_backoff = b;
        p.max_backoff = RouteDuration(b.0.saturating_mul(10));
    }
    if let Some(on) = &r.retry_on {
        p.retry_on = retry_on(&format!("{at}.retryOn"), on)?;
        if p.retry_on.is_empty() {
            // Only gRPC conditions, or nothing: no HTTP outcome retried.
            p.attempts = 0;
            p.retry_on = RetryPolicy::default().retry_on;
        }
    }
    Ok(p)
}

fn retry_on(at: &str, on: &str) -> Result<Vec<RetryOn>, Check> {
    let mut out = Vec::new();
    let mut add = |x: RetryOn| {
        if !out.contains(&x) {
            out.push(x);
        }
    };
    for token in on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match token {
            // Envoy: any 5xx, or no response at all.
            "5xx" => {
                add(RetryOn::ConnectFailure);
                add(RetryOn::Reset);
                (500..=599).for_each(|c| add(RetryOn::Status(c)));
            }
            "gateway-error" => {
                add(RetryOn::ConnectFailure);
                add(RetryOn::Reset);
                [502, 503, 504].into_iter().for_each(|c| add(RetryOn::Status(c)));
            }
            "connect-failure" => add(RetryOn::ConnectFailure),
            "reset" | "refused-stream" | "reset-before-request" => add(RetryOn::Reset),
            "retriable-4xx" => add(RetryOn::Status(409)),
            // The codes are listed as numbers alongside.
            "retriable-status-codes" => {}
            // gRPC status conditions: gRPC answers are not retried on
            // their status here (documented).
            "cancelled" | "deadline-exceeded" | "internal" | "resource-exhausted" | "unavailable" => {}
            t if !t.is_empty() && t.len() <= 3 && t.bytes().all(|b| b.is_ascii_digit()) => match t.parse::<u32>() {
                Ok(c) if (100..=599).contains(&c) => add(RetryOn::Status(c)),
                _ => return Err(invalid(bad(at, format!("{t:?} is not an HTTP status code")))),
            },
            t => {
                return Err(unsupported(bad(
                    at,
                    format!("{t:?} is not a retry condition this mesh does (5xx, gateway-error, connect-failure, reset, refused-stream, retriable-4xx, retriable-status-codes, status codes, gRPC conditions)"),
                )));
            }
        }
    }
    Ok(out)
}

/// Istio's durations (`2s`, `0.5s`, `1m30s`, `250ms`): numbers with an
/// optional fraction, each followed by a unit (`h`, `m`, `s`, `ms`, `us`,
/// `ns`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (such as \"2s\", \"0.5s\", \"1m30s\", \"250ms\")");
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (num, tail) = rest.split_at(n);
        let value: f64 = num.parse().map_err(|_| bad())?;
        let u = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(u);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = next;
    }
    if !total.is_finite() || total > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

fn duration(at: &str, s: &str) -> Result<RouteDuration, Check> {
    parse_duration(s).map(RouteDuration).map_err(|e| invalid(bad(at, e)))
}

fn convert_dr(meta: &Meta<'_>, s: &DestinationRuleSpec) -> Result<DestinationRule, Check> {
    export_to("spec", &s.export_to)?;
    if s.workload_selector.is_some() {
        return Err(unsupported(bad("spec.workloadSelector", "a DestinationRule for some clients only is not implemented")));
    }
    let host = host("spec.host", &s.host)?;
    let traffic_policy = match &s.traffic_policy {
        Some(p) => policy("spec.trafficPolicy", p)?,
        None => TrafficPolicy::default(),
    };
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, x) in s.subsets.iter().enumerate() {
        let at = format!("spec.subsets[{i}]");
        if x.name.is_empty() {
            return Err(invalid(bad(format!("{at}.name"), "a subset needs a name")));
        }
        if subsets.iter().any(|o| o.name == x.name) {
            return Err(invalid(bad(format!("{at}.name"), format!("subset {:?} is defined twice", x.name))));
        }
        let traffic_policy = match &x.traffic_policy {
            Some(p) => policy(&format!("{at}.trafficPolicy"), p)?,
            None => TrafficPolicy::default(),
        };
        subsets.push(Subset { name: x.name.clone(), labels: x.labels.clone(), traffic_policy });
    }
    Ok(DestinationRule { name: meta.name.to_owned(), namespace: meta.namespace.to_owned(), created: meta.created.map(str::to_owned), host, traffic_policy, subsets })
}

fn policy(at: &str, p: &TrafficPolicySpec) -> Result<TrafficPolicy, Check> {
    none_of(
        at,
        &[("tls", p.tls.is_some()), ("tunnel", p.tunnel.is_some()), ("proxyProtocol", p.proxy_protocol.is_some()), ("retryBudget", p.retry_budget.is_some())],
        "not implemented by this mesh (mTLS between agents is always on; retry budgets are per rule)",
    )
    .map_err(unsupported)?;
    let mut out = sections(at, p.load_balancer.as_ref(), p.connection_pool.as_ref(), p.outlier_detection.as_ref())?;
    for (i, x) in p.port_level_settings.iter().enumerate() {
        let f = format!("{at}.portLevelSettings[{i}]");
        if x.tls.is_some() {
            return Err(unsupported(bad(format!("{f}.tls"), "not implemented by this mesh (mTLS between agents is always on)")));
        }
        let port = match x.port.as_ref().and_then(|p| p.number) {
            Some(n) if (1..=65535).contains(&n) => n as u16,
            _ => return Err(invalid(bad(format!("{f}.port.number"), "a port-level setting names its port"))),
        };
        if out.port_level.iter().any(|(p, _)| *p == port) {
            return Err(invalid(bad(format!("{f}.port.number"), format!("port {port} has two settings"))));
        }
        let s = sections(&f, x.load_balancer.as_ref(), x.connection_pool.as_ref(), x.outlier_detection.as_ref())?;
        out.port_level.push((port, s));
    }
    Ok(out)
}

fn sections(at: &str, lb: Option<&LoadBalancerSpec>, pool: Option<&ConnectionPoolSpec>, od: Option<&OutlierSpec>) -> Result<TrafficPolicy, Check> {
    let load_balancer = lb.map(|l| load_balancer(&format!("{at}.loadBalancer"), l)).transpose()?.flatten();
    let connection_pool = pool.map(|c| connection_pool(&format!("{at}.connectionPool"), c)).transpose()?;
    let outlier_detection = od.map(|o| outlier(&format!("{at}.outlierDetection"), o)).transpose()?;
    Ok(TrafficPolicy { connection_pool, outlier_detection, load_balancer, port_level: Vec::new() })
}

/// `None` for `UNSPECIFIED` (the mesh's default).
fn load_balancer(at: &str, l: &LoadBalancerSpec) -> Result<Option<LoadBalancer>, Check> {
    none_of(
        at,
        &[
            ("consistentHash", l.consistent_hash.is_some()),
            ("localityLbSetting", l.locality_lb_setting.is_some()),
            ("warmupDurationSecs", l.warmup_duration_secs.is_some()),
            ("warmup", l.warmup.is_some()),
            ("zoneAwareLbSetting", l.zone_aware_lb_setting.is_some()),
        ],
        "not implemented by this mesh",
    )
    .map_err(unsupported)?;
    Ok(match l.simple.as_deref() {
        None | Some("UNSPECIFIED") => None,
        Some("ROUND_ROBIN") => Some(LoadBalancer::RoundRobin),
        // LEAST_CONN is Istio's deprecated name of LEAST_REQUEST.
        Some("LEAST_REQUEST" | "LEAST_CONN") => Some(LoadBalancer::LeastRequest),
        Some("RANDOM") => Some(LoadBalancer::Random),
        Some("PASSTHROUGH") => return Err(unsupported(bad(format!("{at}.simple"), "PASSTHROUGH (the original destination) is not implemented"))),
        Some(x) => return Err(invalid(bad(format!("{at}.simple"), format!("{x:?} is not a load balancer")))),
    })
}

fn limit(at: &str, v: Option<i64>, default: u32) -> Result<u32, Check> {
    match v {
        None => Ok(default),
        Some(n) if n >= 1 => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
        Some(n) => Err(invalid(bad(at, format!("{n}: a limit is at least 1")))),
    }
}

fn connection_pool(at: &str, c: &ConnectionPoolSpec) -> Result<CircuitBreaker, Check> {
    let d = CircuitBreaker::default();
    let mut out = d.clone();
    if let Some(t) = &c.tcp {
        let f = format!("{at}.tcp");
        none_of(
            &f,
            &[
                ("connectTimeout", t.connect_timeout.is_some()),
                ("tcpKeepalive", t.tcp_keepalive.is_some()),
                ("maxConnectionDuration", t.max_connection_duration.is_some()),
                ("idleTimeout", t.idle_timeout.is_some()),
            ],
            "not implemented by this mesh",
        )
        .map_err(unsupported)?;
        out.max_connections = limit(&format!("{f}.maxConnections"), t.max_connections, d.max_connections)?;
    }
    if let Some(h) = &c.http {
        let f = format!("{at}.http");
        none_of(
            &f,
            &[("idleTimeout", h.idle_timeout.is_some()), ("maxConcurrentStreams", h.max_concurrent_streams.is_some()), ("http2KeepAlive", h.http2_keep_alive.is_some())],
            "not implemented by this mesh",
        )
        .map_err(unsupported)?;
        if let Some(p) = h.h2_upgrade_policy.as_deref().filter(|p| *p != "DEFAULT" && *p != "DO_NOT_UPGRADE") {
            return Err(unsupported(bad(format!("{f}.h2UpgradePolicy"), format!("{p}: the agents speak the app's own HTTP version"))));
        }
        if h.use_client_protocol == Some(true) {
            return Err(unsupported(bad(format!("{f}.useClientProtocol"), "the agents speak the service port's declared HTTP version")));
        }
        out.max_pending_requests = limit(&format!("{f}.http1MaxPendingRequests"), h.http1_max_pending_requests, d.max_pending_requests)?;
        out.max_requests = limit(&format!("{f}.http2MaxRequests"), h.http2_max_requests, d.max_requests)?;
        out.max_requests_per_connection = match h.max_requests_per_connection {
            None | Some(0) => None,
            Some(n) if n > 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            Some(n) => return Err(invalid(bad(format!("{f}.maxRequestsPerConnection"), format!("{n} is not a count")))),
        };
        if h.max_retries.is_some_and(|n| n < 0) {
            return Err(invalid(bad(format!("{f}.maxRetries"), "not a count")));
        }
    }
    Ok(out)
}

fn outlier(at: &str, o: &OutlierSpec) -> Result<OutlierDetection, Check> {
    if o.min_health_percent.is_some_and(|p| p > 0) {
        return Err(unsupported(bad(format!("{at}.minHealthPercent"), "panic thresholds are not implemented (at least one endpoint is never ejected)")));
    }
    if o.outlier_detection_http_error_codes.is_some() {
        return Err(unsupported(bad(format!("{at}.outlierDetectionHttpErrorCodes"), "not implemented by this mesh (5xx answers count)")));
    }
    if o.consecutive_gateway_errors.is_some_and(|n| n > 0) {
        return Err(unsupported(bad(format!("{at}.consecutiveGatewayErrors"), "not implemented by this mesh (use consecutive5xxErrors)")));
    }
    let count = |f: &str, v: Option<i64>, d: u32| -> Result<u32, Check> {
        match v {
            None => Ok(d),
            Some(n) if n >= 0 => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
            Some(n) => Err(invalid(bad(format!("{at}.{f}"), format!("{n} is not a count")))),
        }
    };
    // Istio's defaults for a set `outlierDetection`: 5 consecutive 5xx,
    // 30s base ejection, 10% at most.
    let c5xx = count("consecutive5xxErrors", o.consecutive_5xx_errors.or(o.consecutive_errors), 5)?;
    let local = if o.split_external_local_origin_errors == Some(true) {
        count("consecutiveLocalOriginFailures", o.consecutive_local_origin_failures, 5)?
    } else {
        // Not split: connect failures count as 5xx, with the same threshold.
        c5xx
    };
    if let Some(i) = &o.interval {
        duration(&format!("{at}.interval"), i)?;
    }
    let base = match &o.base_ejection_time {
        Some(b) => duration(&format!("{at}.baseEjectionTime"), b)?,
        None => RouteDuration(Duration::from_secs(30)),
    };
    if base.0.is_zero() {
        return Err(invalid(bad(format!("{at}.baseEjectionTime"), "must be longer than zero")));
    }
    let max_percent = match o.max_ejection_percent {
        None => 10,
        Some(p @ 0..=100) => p as u32,
        Some(p) => return Err(invalid(bad(format!("{at}.maxEjectionPercent"), format!("{p} is not a percentage")))),
    };
    Ok(OutlierDetection {
        consecutive_5xx: c5xx,
        consecutive_connect_failures: local,
        base_ejection_time: base,
        max_ejection_time: RouteDuration(base.0.max(OutlierDetection::default().max_ejection_time.0)),
        max_ejection_percent: max_percent,
    })
}
