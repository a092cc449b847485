//! Gateway API for mesh (GAMMA): `HTTPRoute` and `GRPCRoute` objects whose
//! `parentRefs` name a Service, turned into the route model
//! ([`HttpRoute`] with an [`Attachment`]), plus the route status the spec
//! asks for, per parent. Pure: the Kubernetes source and the local file
//! both call [`convert`] and get the same routes and conditions.
//!
//! # What is ours
//!
//! A parentRef is ours when it is `group: ""` (or `core`) and `kind:
//! Service`. Other parents (Gateways) belong to a gateway controller: we
//! neither apply the route for them nor write status for them.
//!
//! # Conditions, per Service parent (controller [`CONTROLLER_NAME`])
//!
//! | condition | status | reason | when |
//! | --- | --- | --- | --- |
//! | `Accepted` | True | `Accepted` | applied for this parent |
//! | `Accepted` | False | `NoMatchingParent` | the Service, or the parentRef's port on it, does not exist |
//! | `Accepted` | False | `UnsupportedValue` | a field the mesh cannot apply (named in the message: `sectionName`, a filter type, a regular expression that does not compile, a port that is not HTTP, ...); nothing of the route is applied |
//! | `ResolvedRefs` | True | `ResolvedRefs` | every backendRef (and mirror) resolves |
//! | `ResolvedRefs` | False | `InvalidKind` | a backendRef is not a core Service |
//! | `ResolvedRefs` | False | `RefNotPermitted` | a backendRef to another namespace (only the route's own Service parents may be named across namespaces: ReferenceGrant is not read yet) |
//! | `ResolvedRefs` | False | `BackendNotFound` | the Service or its port does not exist |
//!
//! A route with unresolved backends is still applied: the share of
//! requests that would go to an invalid backend is answered 500, as the
//! spec requires.
//!
//! # Defaults and choices
//!
//! - The schema's defaults are applied here (the local file has no API
//!   server to default): a rule without `matches` matches `PathPrefix /`,
//!   a path without `type` is `PathPrefix`, header and query matches are
//!   `Exact`, a backendRef's `weight` is 1, a redirect's `statusCode` 302.
//! - `hostnames` are ignored: for a Service parent the Service names the
//!   traffic (GAMMA).
//! - A parentRef without `port` attaches to every HTTP port of the
//!   Service; with one, to that port, which must be declared HTTP.
//! - Regular expressions (paths, headers, query parameters, gRPC methods)
//!   are Rust `regex` syntax (RE2-like: no backreferences or lookaround),
//!   matched against the whole value.
//! - gRPC methods become paths: `Exact` service and method is the path
//!   `/service/method`, a service alone the prefix `/service`, a method
//!   alone (or `RegularExpression`) a regular expression over the path.
//! - `timeouts.request` bounds the whole request (retries included),
//!   `timeouts.backendRequest` each try; `0s` disables either.
//! - `retry` is not in the standard channel this agent reads (the shipped
//!   schema has no such field): a rule gets the mesh's default retries.
//! - Repeated header names in one match: the first counts (spec).

use std::{collections::BTreeSet, time::Duration};

use http::{HeaderName, HeaderValue};

use super::{
    Attachment, Backend, BackendService, Filter, GatewayKind, HeaderMatch, HeaderModifier, HttpMatch, HttpRoute, PathMatch,
    PathModifier, QueryMatch, Redirect, RetryPolicy, RouteDuration, RouteRule,
};
use crate::state::Service;

pub mod api;

/// The `controllerName` of our `status.parents` entries.
pub const CONTROLLER_NAME: &str = "nodemesh.io/mesh-agent";

/// One route object, whichever source carries it.
#[derive(Clone, Debug)]
pub struct RouteObject<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `metadata.creationTimestamp`, RFC 3339.
    pub created: Option<String>,
    pub spec: Spec<'a>,
}

#[derive(Clone, Copy, Debug)]
pub enum Spec<'a> {
    Http(&'a api::HttpRouteSpec),
    Grpc(&'a api::GrpcRouteSpec),
}

impl Spec<'_> {
    pub fn kind(&self) -> GatewayKind {
        match self {
            Spec::Http(_) => GatewayKind::Http,
            Spec::Grpc(_) => GatewayKind::Grpc,
        }
    }

    fn parent_refs(&self) -> &[api::ParentRef] {
        match self {
            Spec::Http(s) => &s.parent_refs,
            Spec::Grpc(s) => &s.parent_refs,
        }
    }
}

/// A status condition as the spec names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Our verdict for one Service parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentStatus {
    pub parent_ref: api::ParentRef,
    pub accepted: Condition,
    pub resolved_refs: Condition,
}

impl ParentStatus {
    pub fn conditions(&self) -> [&Condition; 2] {
        [&self.accepted, &self.resolved_refs]
    }
}

/// What a route object becomes: the routes to apply (one per accepted
/// Service parent) and a status per Service parent.
#[derive(Clone, Debug, Default)]
pub struct Converted {
    pub routes: Vec<HttpRoute>,
    pub parents: Vec<ParentStatus>,
}

impl Converted {
    /// The first refusal, for logs and `/status`: `parentRef: reason: message`.
    pub fn refusal(&self) -> Option<String> {
        self.parents.iter().find(|p| !p.accepted.status).map(|p| {
            format!("parent {}: {}: {}", parent_name(&p.parent_ref), p.accepted.reason, p.accepted.message)
        })
    }
}

fn parent_name(p: &api::ParentRef) -> String {
    match (&p.namespace, p.port) {
        (Some(ns), Some(port)) => format!("Service {ns}/{}:{port}", p.name),
        (Some(ns), None) => format!("Service {ns}/{}", p.name),
        (None, Some(port)) => format!("Service {}:{port}", p.name),
        (None, None) => format!("Service {}", p.name),
    }
}

/// A field and why it cannot be applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Unsupported {
    pub field: String,
    pub reason: String,
}

fn unsupported(field: impl Into<String>, reason: impl Into<String>) -> Unsupported {
    Unsupported { field: field.into(), reason: reason.into() }
}

fn at(prefix: String) -> impl Fn(Unsupported) -> Unsupported {
    move |e| Unsupported { field: if e.field.is_empty() { prefix.clone() } else { format!("{prefix}.{}", e.field) }, reason: e.reason }
}

/// Converts a route object against the services of the state.
pub fn convert(obj: &RouteObject<'_>, services: &[Service]) -> Converted {
    let kind = obj.spec.kind();
    let parents: Vec<&api::ParentRef> = obj.spec.parent_refs().iter().filter(|p| p.is_service()).collect();
    let mut out = Converted::default();
    if parents.is_empty() {
        return out;
    }
    let own_parents: Vec<(String, String)> =
        parents.iter().map(|p| (p.namespace.clone().unwrap_or_else(|| obj.namespace.to_owned()), p.name.clone())).collect();
    let resolver = Resolver { route_ns: obj.namespace, services, parents: &own_parents };
    let rules = match obj.spec {
        Spec::Http(s) => http_rules(s, &resolver),
        Spec::Grpc(s) => grpc_rules(s, &resolver),
    };
    let resolved_refs = match &rules {
        Ok((_, problems)) => refs_condition(problems),
        // The rules did not convert: what their references say is moot.
        Err(_) => cond("ResolvedRefs", true, "ResolvedRefs", "not evaluated: the route is not accepted".into()),
    };
    let mut seen = BTreeSet::new();
    for (p, (pns, pname)) in parents.iter().zip(&own_parents) {
        if !seen.insert((*p).clone()) {
            continue;
        }
        let accepted = match (&rules, attach(p, pns, pname, kind, services)) {
            (_, Err((reason, message))) => cond("Accepted", false, reason, message),
            (Err(e), Ok(_)) => cond("Accepted", false, "UnsupportedValue", format!("{e}; nothing of the route is applied")),
            (Ok((rules, _)), Ok(port)) => {
                out.routes.push(HttpRoute {
                    name: obj.name.to_owned(),
                    namespace: obj.namespace.to_owned(),
                    service: pname.clone(),
                    rules: rules.clone(),
                    circuit_breaker: Default::default(),
                    outlier_detection: Default::default(),
                    load_balancer: Default::default(),
                    gateway: Some(Attachment { kind, service_namespace: pns.clone(), port, created: obj.created.clone() }),
                    overrides: Vec::new(),
                    exhaustive: false,
                });
                cond("Accepted", true, "Accepted", format!("applied by the mesh agents to {}", parent_name(p)))
            }
        };
        out.parents.push(ParentStatus { parent_ref: (*p).clone(), accepted, resolved_refs: resolved_refs.clone() });
    }
    out
}

fn cond(kind: &'static str, status: bool, reason: &'static str, message: String) -> Condition {
    Condition { kind, status, reason, message }
}

/// Whether the parent Service (and port) exists and can carry the route:
/// the port the route is limited to, if any.
fn attach(p: &api::ParentRef, ns: &str, name: &str, kind: GatewayKind, services: &[Service]) -> Result<Option<u16>, (&'static str, String)> {
    if p.section_name.is_some() {
        return Err(("UnsupportedValue", "parentRef.sectionName: not supported for a Service parent; name the port with `port`".into()));
    }
    let Some(svc) = services.iter().find(|s| s.namespace == ns && s.name == name) else {
        return Err(("NoMatchingParent", format!("service {ns}/{name} does not exist")));
    };
    let wants_h2 = kind == GatewayKind::Grpc;
    let fits = |sp: &crate::state::ServicePort| match sp.http_version() {
        Some(crate::state::AppHttp::Http2) => true,
        Some(crate::state::AppHttp::Http1) => !wants_h2,
        None => false,
    };
    match p.port {
        Some(port) => {
            let Some(sp) = svc.ports.iter().find(|sp| i32::from(sp.port) == port) else {
                return Err(("NoMatchingParent", format!("service {ns}/{name} has no port {port}")));
            };
            if !fits(sp) {
                return Err(("UnsupportedValue", format!(
                    "parentRef.port: port {port} of service {ns}/{name} is not declared {} (appProtocol, or a port name such as {})",
                    if wants_h2 { "HTTP/2 or gRPC" } else { "HTTP" },
                    if wants_h2 { "grpc" } else { "http" }
                )));
            }
            Ok(Some(sp.port))
        }
        None if svc.ports.iter().any(fits) => Ok(None),
        None => Err(("UnsupportedValue", format!(
            "service {ns}/{name} has no port declared {}: set appProtocol or name a port {}",
            if wants_h2 { "HTTP/2 or gRPC" } else { "HTTP" },
            if wants_h2 { "grpc" } else { "http" }
        ))),
    }
}

/// Why a reference does not resolve, as `ResolvedRefs` says it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RefProblem {
    reason: &'static str,
    message: String,
}

fn refs_condition(problems: &[RefProblem]) -> Condition {
    // The spec's order of precedence among reasons is not stated; the one
    // an operator must act on first (a wrong kind) comes first.
    let rank = |r: &str| match r {
        "InvalidKind" => 0,
        "RefNotPermitted" => 1,
        _ => 2,
    };
    match problems.iter().min_by_key(|p| rank(p.reason)) {
        None => cond("ResolvedRefs", true, "ResolvedRefs", "every backendRef resolves".into()),
        Some(first) => {
            let all: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
            cond("ResolvedRefs", false, first.reason, format!("{}; requests for these backends are answered 500", all.join("; ")))
        }
    }
}

struct Resolver<'a> {
    route_ns: &'a str,
    services: &'a [Service],
    /// The route's Service parents (namespace, name): the only services
    /// another namespace's route may name as backends without a grant.
    parents: &'a [(String, String)],
}

impl Resolver<'_> {
    /// A backend (or mirror) reference: the Service port, or why not.
    fn resolve(&self, field: &str, group: Option<&str>, kind: Option<&str>, name: &str, namespace: Option<&str>, port: Option<i32>) -> Result<Result<BackendService, RefProblem>, Unsupported> {
        let group = group.unwrap_or("");
        let kind = kind.unwrap_or("Service");
        if !matches!(group, "" | "core") || kind != "Service" {
            return Ok(Err(RefProblem { reason: "InvalidKind", message: format!("{field}: {kind} of group {group:?} is not a Service (the only backend kind supported)") }));
        }
        let Some(port) = port else {
            return Err(unsupported(format!("{field}.port"), "a Service backend needs a port"));
        };
        let port = u16::try_from(port).ok().filter(|p| *p > 0).ok_or_else(|| unsupported(format!("{field}.port"), format!("{port} is not a port")))?;
        let ns = namespace.unwrap_or(self.route_ns);
        if ns != self.route_ns && !self.parents.iter().any(|(pns, pn)| pns == ns && pn == name) {
            return Ok(Err(RefProblem {
                reason: "RefNotPermitted",
                message: format!("{field}: service {ns}/{name} is in another namespace and is not this route's parent (ReferenceGrant is not supported yet)"),
            }));
        }
        let Some(svc) = self.services.iter().find(|s| s.namespace == ns && s.name == name) else {
            return Ok(Err(RefProblem { reason: "BackendNotFound", message: format!("{field}: service {ns}/{name} does not exist") }));
        };
        if !svc.ports.iter().any(|p| p.port == port) {
            return Ok(Err(RefProblem { reason: "BackendNotFound", message: format!("{field}: service {ns}/{name} has no port {port}") }));
        }
        Ok(Ok(BackendService { namespace: ns.to_owned(), name: name.to_owned(), port }))
    }
}

type Rules = (Vec<RouteRule>, Vec<RefProblem>);

/// The schema's limits (the same for HTTPRoute and GRPCRoute), enforced
/// by the API server; checked here for the local file, which has none.
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
/// Filters, backendRefs, a backend's filters, a match's headers and query
/// parameters.
const MAX_ITEMS: usize = 16;

/// `items` within the schema's `maxItems`.
fn bounded<T>(field: impl std::fmt::Display, items: &[T], max: usize) -> Result<(), Unsupported> {
    if items.len() > max {
        return Err(unsupported(field.to_string(), format!("{} items, at most {max}", items.len())));
    }
    Ok(())
}

/// The rules of a route (absent: one default rule), each converted by
/// `rule` with its field name, within the schema's limit.
fn each_rule<R: Default>(
    rules: Option<&Vec<R>>,
    mut rule: impl FnMut(&str, &R, &mut Vec<RefProblem>) -> Result<RouteRule, Unsupported>,
) -> Result<Rules, Unsupported> {
    let default = vec![R::default()];
    let rules = rules.unwrap_or(&default);
    bounded("spec.rules", rules, MAX_RULES)?;
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        out.push(rule(&format!("spec.rules[{i}]"), r, &mut problems)?);
    }
    Ok((out, problems))
}

/// A rule's matches, converted, within the schema's limit.
fn converted<M>(f: &str, ms: &[M], convert: impl Fn(&M) -> Result<HttpMatch, Unsupported>) -> Result<Vec<HttpMatch>, Unsupported> {
    bounded(format_args!("{f}.matches"), ms, MAX_MATCHES)?;
    ms.iter().enumerate().map(|(j, m)| convert(m).map_err(at(format!("{f}.matches[{j}]")))).collect()
}

fn http_rules(spec: &api::HttpRouteSpec, r: &Resolver<'_>) -> Result<Rules, Unsupported> {
    each_rule(spec.rules.as_ref(), |f, rule: &api::HttpRouteRule, problems| {
        // "If no matches are specified, the default is a prefix path match
        // on "/"": absent and an empty list alike (the API server fills in
        // the default only for an absent field).
        let matches = match &rule.matches {
            Some(ms) if !ms.is_empty() => converted(f, ms, http_match)?,
            _ => vec![HttpMatch { path: Some(PathMatch { prefix: Some("/".into()), ..Default::default() }), ..Default::default() }],
        };
        let timeouts = rule.timeouts.clone().unwrap_or_default();
        let request = timeouts.request.as_deref().map(|t| duration(t).map_err(|e| unsupported(format!("{f}.timeouts.request"), e))).transpose()?.flatten();
        let backend = timeouts.backend_request.as_deref().map(|t| duration(t).map_err(|e| unsupported(format!("{f}.timeouts.backendRequest"), e))).transpose()?.flatten();
        if let (Some(req), Some(be)) = (request, backend)
            && be > req
        {
            return Err(unsupported(format!("{f}.timeouts.backendRequest"), format!("{} is longer than the request timeout {}", RouteDuration(be), RouteDuration(req))));
        }
        let retries = RetryPolicy { per_try_timeout: backend.map(RouteDuration), ..Default::default() };
        rule_of(f, matches, &rule.filters, &rule.backend_refs, request, retries, GatewayKind::Http, r, problems)
    })
}

fn grpc_rules(spec: &api::GrpcRouteSpec, r: &Resolver<'_>) -> Result<Rules, Unsupported> {
    each_rule(spec.rules.as_ref(), |f, rule: &api::GrpcRouteRule, problems| {
        let matches = match &rule.matches {
            Some(ms) if !ms.is_empty() => converted(f, ms, grpc_match)?,
            _ => vec![HttpMatch::default()],
        };
        rule_of(f, matches, &rule.filters, &rule.backend_refs, None, RetryPolicy::default(), GatewayKind::Grpc, r, problems)
    })
}

#[allow(clippy::too_many_arguments)]
fn rule_of(
    f: &str,
    matches: Vec<HttpMatch>,
    filters: &[api::RouteFilter],
    backend_refs: &[api::BackendRef],
    timeout: Option<Duration>,
    retries: RetryPolicy,
    kind: GatewayKind,
    r: &Resolver<'_>,
    problems: &mut Vec<RefProblem>,
) -> Result<RouteRule, Unsupported> {
    bounded(format_args!("{f}.filters"), filters, MAX_ITEMS)?;
    bounded(format_args!("{f}.backendRefs"), backend_refs, MAX_ITEMS)?;
    let all_prefix = matches.iter().all(|m| m.path.as_ref().is_some_and(|p| p.prefix.is_some()));
    let filters = convert_filters(&format!("{f}.filters"), filters, kind, all_prefix, r, problems)?;
    let redirects = filters.iter().any(|x| matches!(x, Filter::RequestRedirect(_)));
    if redirects && filters.iter().any(|x| matches!(x, Filter::UrlRewrite { .. })) {
        return Err(unsupported(format!("{f}.filters"), "RequestRedirect and URLRewrite cannot both be set"));
    }
    if redirects && !backend_refs.is_empty() {
        return Err(unsupported(format!("{f}.backendRefs"), "a rule with a RequestRedirect filter cannot have backendRefs"));
    }
    let mut backends = Vec::new();
    for (k, b) in backend_refs.iter().enumerate() {
        let bf = format!("{f}.backendRefs[{k}]");
        let weight = b.weight.unwrap_or(1);
        let weight = u32::try_from(weight).ok().filter(|w| *w <= 1_000_000).ok_or_else(|| unsupported(format!("{bf}.weight"), format!("{weight} is not a weight (0 to 1000000)")))?;
        let (service, invalid) = match r.resolve(&bf, b.group.as_deref(), b.kind.as_deref(), &b.name, b.namespace.as_deref(), b.port)? {
            Ok(s) => (Some(s), None),
            Err(p) => {
                let m = p.message.clone();
                problems.push(p);
                (None, Some(m))
            }
        };
        bounded(format_args!("{bf}.filters"), &b.filters, MAX_ITEMS)?;
        let filters = convert_filters(&format!("{bf}.filters"), &b.filters, kind, all_prefix, r, problems)?;
        if filters.iter().any(|x| matches!(x, Filter::RequestRedirect(_) | Filter::UrlRewrite { .. })) {
            return Err(unsupported(format!("{bf}.filters"), "RequestRedirect and URLRewrite apply to a whole rule, not to one backend"));
        }
        backends.push(Backend { subset: None, weight: Some(weight), service, filters, invalid, subset_name: None });
    }
    Ok(RouteRule { matches: Some(matches), backends, timeout: timeout.map(RouteDuration), retries, filters })
}

fn http_match(m: &api::HttpRouteMatch) -> Result<HttpMatch, Unsupported> {
    let p = m.path.clone().unwrap_or_default();
    let value = p.value.unwrap_or_else(|| "/".into());
    let path = match p.kind.as_deref().unwrap_or("PathPrefix") {
        "Exact" => PathMatch { exact: Some(check_path("path.value", &value)?), ..Default::default() },
        "PathPrefix" => PathMatch { prefix: Some(check_path("path.value", &value)?), ..Default::default() },
        "RegularExpression" => PathMatch { regex: Some(check_regex("path.value", &value)?), ..Default::default() },
        other => return Err(unsupported("path.type", format!("{other:?} is not Exact, PathPrefix or RegularExpression"))),
    };
    let method = m
        .method
        .as_ref()
        .map(|x| match x.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH" => Ok(x.clone()),
            _ => Err(unsupported("method", format!("{x:?} is not one of the methods the schema allows"))),
        })
        .transpose()?;
    Ok(HttpMatch {
        path: Some(path),
        method,
        headers: headers(&m.headers)?,
        cookies: None,
        query_params: query_params(&m.query_params)?,
        source_namespace: None,
    })
}

fn grpc_match(m: &api::GrpcRouteMatch) -> Result<HttpMatch, Unsupported> {
    let path = match &m.method {
        None => None,
        Some(mm) => {
            let kind = mm.kind.as_deref().unwrap_or("Exact");
            let (svc, meth) = (mm.service.as_deref(), mm.method.as_deref());
            if svc.is_none() && meth.is_none() {
                return Err(unsupported("method", "set service, method or both"));
            }
            match kind {
                "Exact" => {
                    for (f, v) in [("method.service", svc), ("method.method", meth)] {
                        if let Some(v) = v
                            && (v.is_empty() || v.contains('/') || v.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()))
                        {
                            return Err(unsupported(f, format!("{v:?} is not a gRPC service or method name")));
                        }
                    }
                    Some(match (svc, meth) {
                        (Some(s), Some(x)) => PathMatch { exact: Some(format!("/{s}/{x}")), ..Default::default() },
                        (Some(s), None) => PathMatch { prefix: Some(format!("/{s}")), ..Default::default() },
                        (None, Some(x)) => PathMatch { regex: Some(format!("/[^/]+/{}", regex::escape(x))), ..Default::default() },
                        (None, None) => unreachable!("checked above"),
                    })
                }
                "RegularExpression" => {
                    let s = svc.map(|s| check_regex("method.service", s)).transpose()?.unwrap_or_else(|| "[^/]+".into());
                    let x = meth.map(|x| check_regex("method.method", x)).transpose()?.unwrap_or_else(|| "[^/]+".into());
                    Some(PathMatch { regex: Some(format!("/(?:{s})/(?:{x})")), ..Default::default() })
                }
                other => return Err(unsupported("method.type", format!("{other:?} is not Exact or RegularExpression"))),
            }
        }
    };
    Ok(HttpMatch { path, headers: headers(&m.headers)?, ..Default::default() })
}

fn headers(hs: &[api::ValueMatch]) -> Result<Option<Vec<HeaderMatch>>, Unsupported> {
    bounded("headers", hs, MAX_ITEMS)?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (k, h) in hs.iter().enumerate() {
        let f = format!("headers[{k}]");
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| unsupported(format!("{f}.name"), format!("{:?} is not a header name", h.name)))?;
        // "Only the first entry with an equivalent name MUST be considered."
        if !seen.insert(name.as_str().to_owned()) {
            continue;
        }
        let m = match h.kind.as_deref().unwrap_or("Exact") {
            "Exact" => {
                HeaderValue::from_str(&h.value).map_err(|_| unsupported(format!("{f}.value"), format!("{:?} is not a header value", h.value)))?;
                HeaderMatch { name: h.name.clone(), exact: Some(h.value.clone()), ..Default::default() }
            }
            "RegularExpression" => HeaderMatch { name: h.name.clone(), regex: Some(check_regex(&format!("{f}.value"), &h.value)?), ..Default::default() },
            other => return Err(unsupported(format!("{f}.type"), format!("{other:?} is not Exact or RegularExpression"))),
        };
        out.push(m);
    }
    Ok((!out.is_empty()).then_some(out))
}

fn query_params(qs: &[api::ValueMatch]) -> Result<Vec<QueryMatch>, Unsupported> {
    bounded("queryParams", qs, MAX_ITEMS)?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (k, q) in qs.iter().enumerate() {
        let f = format!("queryParams[{k}]");
        if q.name.is_empty() || q.name.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'&' || b == b'=' || b == b'#') {
            return Err(unsupported(format!("{f}.name"), format!("{:?} is not a query parameter name", q.name)));
        }
        // Names are case-sensitive here; the first entry of a name counts.
        if !seen.insert(q.name.clone()) {
            continue;
        }
        out.push(match q.kind.as_deref().unwrap_or("Exact") {
            "Exact" => QueryMatch { name: q.name.clone(), exact: Some(q.value.clone()), regex: None },
            "RegularExpression" => QueryMatch { name: q.name.clone(), exact: None, regex: Some(check_regex(&format!("{f}.value"), &q.value)?) },
            other => return Err(unsupported(format!("{f}.type"), format!("{other:?} is not Exact or RegularExpression"))),
        });
    }
    Ok(out)
}

fn check_path(field: &str, p: &str) -> Result<String, Unsupported> {
    super::validate::check_path(field, p).map_err(|e| unsupported(e.field, e.reason))?;
    Ok(p.to_owned())
}

fn check_regex(field: &str, re: &str) -> Result<String, Unsupported> {
    regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| unsupported(field, format!("{re:?} is not a regular expression this agent supports: {e}")))?;
    Ok(re.to_owned())
}

fn convert_filters(
    f: &str,
    filters: &[api::RouteFilter],
    kind: GatewayKind,
    all_prefix: bool,
    r: &Resolver<'_>,
    problems: &mut Vec<RefProblem>,
) -> Result<Vec<Filter>, Unsupported> {
    let mut out = Vec::new();
    let mut once = BTreeSet::new();
    for (k, x) in filters.iter().enumerate() {
        let ff = format!("{f}[{k}]");
        let grpc_ok = matches!(x.kind.as_str(), "RequestHeaderModifier" | "ResponseHeaderModifier" | "RequestMirror");
        if kind == GatewayKind::Grpc && !grpc_ok {
            return Err(unsupported(format!("{ff}.type"), format!("{} is not a GRPCRoute filter", x.kind)));
        }
        // The schema allows each of these once per rule (mirrors may repeat).
        if x.kind != "RequestMirror" && !once.insert(x.kind.clone()) {
            return Err(unsupported(format!("{ff}.type"), format!("{} may appear once", x.kind)));
        }
        let missing = |field: &str| unsupported(format!("{ff}.{field}"), format!("type {} needs `{field}`", x.kind));
        let filter = match x.kind.as_str() {
            "RequestHeaderModifier" => Filter::RequestHeaderModifier(header_modifier(&format!("{ff}.requestHeaderModifier"), x.request_header_modifier.as_ref().ok_or_else(|| missing("requestHeaderModifier"))?)?),
            "ResponseHeaderModifier" => Filter::ResponseHeaderModifier(header_modifier(&format!("{ff}.responseHeaderModifier"), x.response_header_modifier.as_ref().ok_or_else(|| missing("responseHeaderModifier"))?)?),
            "URLRewrite" => {
                let u = x.url_rewrite.as_ref().ok_or_else(|| missing("urlRewrite"))?;
                Filter::UrlRewrite {
                    hostname: u.hostname.as_deref().map(|h| check_hostname(&format!("{ff}.urlRewrite.hostname"), h)).transpose()?,
                    path: u.path.as_ref().map(|p| path_modifier(&format!("{ff}.urlRewrite.path"), p, all_prefix)).transpose()?,
                }
            }
            "RequestRedirect" => {
                let d = x.request_redirect.as_ref().ok_or_else(|| missing("requestRedirect"))?;
                let rf = format!("{ff}.requestRedirect");
                let scheme = d.scheme.as_ref().map(|s| match s.as_str() {
                    "http" | "https" => Ok(s.clone()),
                    _ => Err(unsupported(format!("{rf}.scheme"), format!("{s:?} is not http or https"))),
                }).transpose()?;
                let status_code = d.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&status_code) {
                    return Err(unsupported(format!("{rf}.statusCode"), format!("{status_code} is not 301, 302, 303, 307 or 308")));
                }
                let port = d.port.map(|p| u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| unsupported(format!("{rf}.port"), format!("{p} is not a port")))).transpose()?;
                Filter::RequestRedirect(Redirect {
                    scheme,
                    hostname: d.hostname.as_deref().map(|h| check_hostname(&format!("{rf}.hostname"), h)).transpose()?,
                    path: d.path.as_ref().map(|p| path_modifier(&format!("{rf}.path"), p, all_prefix)).transpose()?,
                    port,
                    status_code: status_code as u16,
                })
            }
            "RequestMirror" => {
                let m = x.request_mirror.as_ref().ok_or_else(|| missing("requestMirror"))?;
                let mf = format!("{ff}.requestMirror");
                let per_million = match (m.percent, &m.fraction) {
                    (Some(_), Some(_)) => return Err(unsupported(&mf, "set percent or fraction, not both")),
                    (Some(p), None) if (0..=100).contains(&p) => p as u32 * 10_000,
                    (Some(p), None) => return Err(unsupported(format!("{mf}.percent"), format!("{p} is not a percentage"))),
                    (None, Some(fr)) => {
                        let d = fr.denominator.unwrap_or(100);
                        if d <= 0 || fr.numerator < 0 || fr.numerator > d {
                            return Err(unsupported(format!("{mf}.fraction"), format!("{}/{d} is not a fraction of at most 1", fr.numerator)));
                        }
                        (i64::from(fr.numerator) * 1_000_000 / i64::from(d)) as u32
                    }
                    (None, None) => 1_000_000,
                };
                let b = &m.backend_ref;
                match r.resolve(&format!("{mf}.backendRef"), b.group.as_deref(), b.kind.as_deref(), &b.name, b.namespace.as_deref(), b.port)? {
                    Ok(backend) => Filter::RequestMirror { backend, per_million, subset: None },
                    Err(p) => {
                        // Fire-and-forget: an unresolved mirror is left out.
                        problems.push(p);
                        continue;
                    }
                }
            }
            "ExtensionRef" | "CORS" => return Err(unsupported(format!("{ff}.type"), format!("{} filters are not supported", x.kind))),
            other => return Err(unsupported(format!("{ff}.type"), format!("{other:?} is not a filter type"))),
        };
        out.push(filter);
    }
    Ok(out)
}

fn header_modifier(f: &str, h: &api::HeaderFilter) -> Result<HeaderModifier, Unsupported> {
    let mut names = BTreeSet::new();
    let mut pairs = |list: &[api::NameValue], field: &str| -> Result<Vec<(String, String)>, Unsupported> {
        list.iter()
            .enumerate()
            .map(|(k, nv)| {
                let name = HeaderName::from_bytes(nv.name.as_bytes()).map_err(|_| unsupported(format!("{f}.{field}[{k}].name"), format!("{:?} is not a header name", nv.name)))?;
                HeaderValue::from_str(&nv.value).map_err(|_| unsupported(format!("{f}.{field}[{k}].value"), format!("{:?} is not a header value", nv.value)))?;
                // The schema makes names unique per list, without case.
                if !names.insert((field.to_owned(), name.as_str().to_owned())) {
                    return Err(unsupported(format!("{f}.{field}[{k}].name"), format!("{} appears twice", nv.name)));
                }
                Ok((name.as_str().to_owned(), nv.value.clone()))
            })
            .collect()
    };
    let set = pairs(&h.set, "set")?;
    let add = pairs(&h.add, "add")?;
    let remove = h
        .remove
        .iter()
        .enumerate()
        .map(|(k, n)| HeaderName::from_bytes(n.as_bytes()).map(|n| n.as_str().to_owned()).map_err(|_| unsupported(format!("{f}.remove[{k}]"), format!("{n:?} is not a header name"))))
        .collect::<Result<_, _>>()?;
    Ok(HeaderModifier { set, add, remove })
}

fn path_modifier(f: &str, p: &api::PathModifier, all_prefix: bool) -> Result<PathModifier, Unsupported> {
    match (p.kind.as_str(), &p.replace_full_path, &p.replace_prefix_match) {
        ("ReplaceFullPath", Some(v), None) => Ok(PathModifier::ReplaceFullPath(check_path(&format!("{f}.replaceFullPath"), v)?)),
        ("ReplacePrefixMatch", None, Some(v)) => {
            if !all_prefix {
                return Err(unsupported(f, "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match"));
            }
            Ok(PathModifier::ReplacePrefixMatch(check_path(&format!("{f}.replacePrefixMatch"), v)?))
        }
        ("ReplaceFullPath" | "ReplacePrefixMatch", _, _) => Err(unsupported(f, format!("type {} needs exactly its own field set", p.kind))),
        (other, _, _) => Err(unsupported(format!("{f}.type"), format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"))),
    }
}

fn check_hostname(f: &str, h: &str) -> Result<String, Unsupported> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
        });
    if !ok {
        return Err(unsupported(f, format!("{h:?} is not a precise hostname (lower-case DNS labels)")));
    }
    Ok(h.to_owned())
}

/// A Gateway API duration: up to four `<1-5 digits><h|m|s|ms>` parts
/// (`1h30m`, `500ms`); `0s` (any zero) disables the timeout (`None`).
pub fn duration(s: &str) -> Result<Option<Duration>, String> {
    let bad = || format!("{s:?} is not a duration (such as 10s, 500ms or 1h30m)");
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.as_bytes()[0] {
                b'h' => (Duration::from_secs(3600), 1),
                b'm' => (Duration::from_secs(60), 1),
                b's' => (Duration::from_secs(1), 1),
                _ => return Err(bad()),
            }
        };
        rest = &rest[len..];
        total += unit * n as u32;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok((!total.is_zero()).then_some(total))
}

#[cfg(test)]
mod tests;
