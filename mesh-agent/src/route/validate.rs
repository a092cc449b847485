//! What serde cannot check about a route: references, lists, weights,
//! ranges, names. Name, namespace and uniqueness across routes are the
//! source's job (it knows its declared namespaces and all routes).

use std::time::Duration;

use http::HeaderName;

use super::{HeaderMatch, HttpMatch, HttpRoute, PathMatch, RetryOn, RetryPolicy, RouteRule};
use crate::state::Service;

/// Why a route is invalid: `field` is relative to the route
/// (`rules[1].backends`), so each source can prefix its own location.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidRoute {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidRoute {
    InvalidRoute {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks a route against the services it may name.
pub fn validate(route: &HttpRoute, services: &[Service]) -> Result<(), InvalidRoute> {
    let Some(svc) = services
        .iter()
        .find(|s| s.namespace == route.namespace && s.name == route.service)
    else {
        return Err(invalid(
            "service",
            format!("service {}/{} is not declared under `services`", route.namespace, route.service),
        ));
    };
    if !svc.ports.iter().any(|p| p.is_http()) {
        return Err(invalid(
            "service",
            format!(
                "service {}/{} has no HTTP port (name a port http, http2 or grpc, or set appProtocol)",
                route.namespace, route.service
            ),
        ));
    }
    if route.rules.is_empty() {
        return Err(invalid("rules", "a route needs at least one rule"));
    }
    for (i, rule) in route.rules.iter().enumerate() {
        check_rule(rule).map_err(|e| invalid(format!("rules[{i}].{}", e.field), e.reason))?;
    }
    let cb = &route.circuit_breaker;
    for (f, v) in [
        ("maxConnections", cb.max_connections),
        ("maxPendingRequests", cb.max_pending_requests),
        ("maxRequests", cb.max_requests),
    ] {
        if v == 0 {
            return Err(invalid(format!("circuitBreaker.{f}"), "must be at least 1"));
        }
    }
    let od = &route.outlier_detection;
    if od.max_ejection_percent > 100 {
        return Err(invalid(
            "outlierDetection.maxEjectionPercent",
            format!("{} is not a percentage (0-100)", od.max_ejection_percent),
        ));
    }
    positive("outlierDetection.baseEjectionTime", od.base_ejection_time.0)?;
    if od.max_ejection_time < od.base_ejection_time {
        return Err(invalid(
            "outlierDetection.maxEjectionTime",
            format!("{} is shorter than baseEjectionTime {}", od.max_ejection_time, od.base_ejection_time),
        ));
    }
    Ok(())
}

fn positive(field: &str, d: Duration) -> Result<(), InvalidRoute> {
    if d.is_zero() {
        return Err(invalid(field, "must be longer than zero"));
    }
    Ok(())
}

fn check_rule(rule: &RouteRule) -> Result<(), InvalidRoute> {
    if let Some(matches) = &rule.matches {
        if matches.is_empty() {
            return Err(invalid(
                "matches",
                "an empty list is ambiguous: omit `matches` to match every request",
            ));
        }
        for (j, m) in matches.iter().enumerate() {
            check_match(m).map_err(|e| invalid(format!("matches[{j}].{}", e.field), e.reason))?;
        }
    }
    if rule.backends.is_empty() {
        return Err(invalid("backends", "a rule needs at least one backend"));
    }
    for (j, b) in rule.backends.iter().enumerate() {
        if b.subset.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(invalid(
                format!("backends[{j}].subset"),
                "an empty subset is ambiguous: omit it for every endpoint",
            ));
        }
        if rule.backends.len() > 1 && b.weight.is_none() {
            return Err(invalid(
                format!("backends[{j}].weight"),
                "every backend needs a weight when there are several",
            ));
        }
    }
    let sum: u64 = rule.backends.iter().map(|b| u64::from(b.weight.unwrap_or(100))).sum();
    if sum != 100 {
        return Err(invalid("backends", format!("weights add up to {sum}, not 100")));
    }
    if let Some(t) = rule.timeout {
        positive("timeout", t.0)?;
    }
    check_retries(&rule.retries).map_err(|e| invalid(format!("retries.{}", e.field), e.reason))
}

fn check_match(m: &HttpMatch) -> Result<(), InvalidRoute> {
    match &m.path {
        Some(PathMatch { exact: Some(p), prefix: None, regex: None, starts_with: None, ignore_case: false }) => check_path("path.exact", p)?,
        Some(PathMatch { exact: None, prefix: Some(p), regex: None, starts_with: None, ignore_case: false }) => check_path("path.prefix", p)?,
        Some(_) => return Err(invalid("path", "set exactly one of `exact`, `prefix`")),
        None => {}
    }
    if let Some(method) = &m.method
        && http::Method::from_bytes(method.as_bytes()).is_err()
    {
        return Err(invalid("method", format!("{method:?} is not an HTTP method")));
    }
    if let Some(headers) = &m.headers {
        if headers.is_empty() {
            return Err(invalid("headers", "an empty list is ambiguous: omit it"));
        }
        for (k, h) in headers.iter().enumerate() {
            check_header(h).map_err(|e| invalid(format!("headers[{k}]{}", e.field), e.reason))?;
        }
    }
    if let Some(cookies) = &m.cookies {
        if cookies.is_empty() {
            return Err(invalid("cookies", "an empty list is ambiguous: omit it"));
        }
        for (k, c) in cookies.iter().enumerate() {
            // RFC 6265 cookie-name: a token.
            if http::Method::from_bytes(c.name.as_bytes()).is_err() {
                return Err(invalid(format!("cookies[{k}].name"), format!("{:?} is not a cookie name", c.name)));
            }
            if c.exact.bytes().any(|b| b == b';' || b == b',' || b.is_ascii_whitespace() || b.is_ascii_control()) {
                return Err(invalid(
                    format!("cookies[{k}].exact"),
                    format!("{:?} cannot be a cookie value", c.exact),
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn check_path(field: &str, p: &str) -> Result<(), InvalidRoute> {
    if !p.starts_with('/') {
        return Err(invalid(field, format!("{p:?}: a path must start with '/'")));
    }
    if p.contains(['?', '#']) || p.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(invalid(field, format!("{p:?} is not a path (no query, fragment, spaces or controls)")));
    }
    match crate::policy::normalize_path(p) {
        Ok(n) if n.path() == p => Ok(()),
        _ => Err(invalid(
            field,
            format!("{p:?} is not in normalized form (no '//', '.' or '..' segments, no needless escapes), so no request would match it"),
        )),
    }
}

/// `field` is the suffix after `headers[k]` (`.name`, `` for the whole).
fn check_header(h: &HeaderMatch) -> Result<(), InvalidRoute> {
    if HeaderName::from_bytes(h.name.as_bytes()).is_err() {
        return Err(invalid(".name", format!("{:?} is not a header name", h.name)));
    }
    let set = [h.exact.is_some(), h.prefix.is_some(), h.present.is_some()];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(invalid("", "set exactly one of `exact`, `prefix`, `present`"));
    }
    for (f, v) in [(".exact", &h.exact), (".prefix", &h.prefix)] {
        if let Some(v) = v
            && http::HeaderValue::from_str(v).is_err()
        {
            return Err(invalid(f, format!("{v:?} is not a header value")));
        }
    }
    Ok(())
}

fn check_retries(r: &RetryPolicy) -> Result<(), InvalidRoute> {
    if r.attempts > 10 {
        return Err(invalid("attempts", format!("{} retries is too many (at most 10)", r.attempts)));
    }
    if let Some(t) = r.per_try_timeout {
        positive("perTryTimeout", t.0)?;
    }
    if r.retry_on.is_empty() {
        return Err(invalid("retryOn", "an empty list is ambiguous: set `attempts: 0` to disable retries"));
    }
    for (k, on) in r.retry_on.iter().enumerate() {
        if let RetryOn::Status(c) = on
            && !(100..=599).contains(c)
        {
            return Err(invalid(format!("retryOn[{k}]"), format!("{c} is not an HTTP status code (100-599)")));
        }
    }
    if r.budget_percent > 100 {
        return Err(invalid("budgetPercent", format!("{} is not a percentage (0-100)", r.budget_percent)));
    }
    if r.max_backoff < r.base_backoff {
        return Err(invalid(
            "maxBackoff",
            format!("{} is shorter than baseBackoff {}", r.max_backoff, r.base_backoff),
        ));
    }
    Ok(())
}
