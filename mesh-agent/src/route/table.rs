//! The compiled routes of a state snapshot, indexed by service, and
//! per-request selection.

use std::{cmp::Reverse, collections::HashMap, time::Duration};

use http::{HeaderMap, HeaderName};
use regex::Regex;

use super::{Backend, CircuitBreaker, HttpRoute, OutlierDetection, PathMatch, RetryPolicy, RouteRule};
use crate::state::MeshState;

/// What selection looks at in a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    /// The normalized path ([`crate::policy::NormalizedPath::path`]); a
    /// query, if any is left, is ignored.
    pub path: &'a str,
    /// The query, verbatim, without the `?` (Gateway API `queryParams`).
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The namespace of the client pod: a Gateway API consumer route
    /// applies to its own namespace's clients only.
    pub client_namespace: &'a str,
    /// The service port the client dialled (a parentRef may name one).
    pub port: u16,
}

/// The outcome of [`RouteTable::select`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection<'a> {
    /// No route applies to this service (port, client): any endpoint.
    NoRoute,
    /// Gateway API routes are attached but none of their rules matches, or
    /// an Istio VirtualService's rules do not: 404, as the spec requires
    /// (and Envoy answers).
    Unmatched { route: &'a str },
    Rule(Selected<'a>),
}

impl<'a> Selection<'a> {
    /// The rule, if one was selected.
    pub fn rule(self) -> Option<Selected<'a>> {
        match self {
            Selection::Rule(s) => Some(s),
            _ => None,
        }
    }
}

/// A selected rule and backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected<'a> {
    /// `namespace/name` of the route.
    pub route: &'a str,
    pub rule_index: usize,
    pub rule: &'a RouteRule,
    /// `None`: the rule has nothing to forward to (no backendRefs, or every
    /// weight 0): 500 unless a filter answers (a redirect).
    pub backend: Option<&'a Backend>,
    /// The `PathPrefix` value that matched, without a trailing `/` (for
    /// `ReplacePrefixMatch`).
    pub matched_prefix: Option<&'a str>,
    pub timeout: Option<Duration>,
    pub retry: &'a RetryPolicy,
}

/// Service-level resilience settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePolicy {
    pub circuit_breaker: CircuitBreaker,
    pub outlier_detection: OutlierDetection,
    pub load_balancer: super::LoadBalancer,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    /// (namespace, service) -> its routes.
    by_service: HashMap<(String, String), ServiceRoutes>,
}

#[derive(Debug, Default)]
struct ServiceRoutes {
    /// The `httpRoutes` form: one per service, rules in order. Its
    /// service-level settings apply whichever routes decide.
    local: Option<Compiled>,
    /// Gateway API routes attached to the service, producer and consumer.
    gateway: Vec<Compiled>,
    /// Every match of `gateway`, in precedence order: (route, rule, match).
    ranked: Vec<(usize, usize, usize)>,
}

#[derive(Debug)]
struct Compiled {
    id: Box<str>,
    route: HttpRoute,
    policy: ServicePolicy,
    /// Each override, its policy, and the key its limits are counted under.
    overrides: Vec<(super::PolicyOverride, ServicePolicy, String)>,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    /// `None`: matches everything.
    matches: Option<Vec<Match>>,
    /// Running sums of the backends' weights; the last is the total.
    cumulative: Vec<u64>,
}

#[derive(Debug, Default)]
struct Match {
    path: Option<Path>,
    method: Option<http::Method>,
    headers: Vec<(HeaderName, Cond)>,
    cookies: Vec<(String, String)>,
    query: Vec<(String, Cond)>,
    source_namespace: Option<String>,
}

#[derive(Debug)]
enum Path {
    Exact(String),
    /// Without a trailing '/'; empty for `/`.
    Prefix(String),
    /// Istio's string prefix; `true`: without ASCII case.
    StartsWith(String, bool),
    Regex(Regex),
}

#[derive(Debug)]
enum Cond {
    Exact(String),
    Prefix(String),
    Present(bool),
    Regex(Regex),
}

static DEFAULT_POLICY: std::sync::LazyLock<ServicePolicy> = std::sync::LazyLock::new(ServicePolicy::default);

impl RouteTable {
    /// Compiles the routes of a snapshot. A local route that does not
    /// validate (the local file refuses those; this guards other sources)
    /// or names a service an earlier route already took is left out, with
    /// a warning; so is a Gateway API route whose parent service is gone
    /// (its source judged it against the same state).
    pub fn from_state(state: &MeshState) -> Self {
        let mut by_service: HashMap<(String, String), ServiceRoutes> = HashMap::new();
        for route in &state.routes {
            let id = format!("{}/{}", route.namespace, route.name);
            match &route.gateway {
                None => {
                    if let Err(e) = super::validate(route, &state.services) {
                        tracing::warn!(route = %id, "HTTP route left out: {e}");
                        continue;
                    }
                    let entry = by_service.entry((route.namespace.clone(), route.service.clone())).or_default();
                    if let Some(other) = &entry.local {
                        tracing::warn!(route = %id, "HTTP route left out: route {} already routes service {}", other.id, route.service);
                        continue;
                    }
                    entry.local = Some(compile(id, route));
                }
                Some(a) => {
                    if !state.services.iter().any(|s| s.namespace == a.service_namespace && s.name == route.service) {
                        tracing::warn!(route = %id, "{} left out: service {}/{} is gone", a.kind, a.service_namespace, route.service);
                        continue;
                    }
                    let entry = by_service.entry((a.service_namespace.clone(), route.service.clone())).or_default();
                    entry.gateway.push(compile(format!("{}/{}", route.namespace, route.name), route));
                }
            }
        }
        // Istio's VirtualServices and DestinationRules take the slot of
        // the `httpRoutes` form (rules in order), where it is free.
        for route in super::istio::routes(state) {
            let entry = by_service.entry((route.namespace.clone(), route.service.clone())).or_default();
            let id = format!("{}/{}", route.namespace, route.name);
            if let Some(other) = &entry.local {
                tracing::warn!(route = %id, "VirtualService left out: route {} already routes service {}", other.id, route.service);
                continue;
            }
            entry.local = Some(compile(id, &route));
        }
        for routes in by_service.values_mut() {
            routes.ranked = rank(&routes.gateway);
        }
        Self { by_service }
    }

    /// The rule and backend for a request to service `ns/name`. Gateway API
    /// routes attached to the service (for this port and client) decide
    /// when there are any, across routes by the spec's precedence
    /// ([`super`]); else the service's `httpRoutes` entry, rules in order.
    /// `rand` picks among weighted backends (`rand % total` against
    /// cumulative weights); pass a uniform random number.
    pub fn select<'a>(&'a self, ns: &str, name: &str, req: &RequestView<'_>, rand: u32) -> Selection<'a> {
        let Some(routes) = self.by_service.get(&(ns.to_owned(), name.to_owned())) else {
            return Selection::NoRoute;
        };
        let (path, query) = match req.path.split_once('?') {
            Some((p, q)) => (p, req.query.or(Some(q))),
            None => (req.path, req.query),
        };
        let mut cookies: Option<Vec<(&str, &str)>> = None;
        let applies = |c: &Compiled| {
            let a = c.route.gateway.as_ref().expect("gateway routes carry their attachment");
            a.port.is_none_or(|p| p == req.port)
        };
        // Consumer routes of the client's namespace replace the producer's
        // routes for that client (GAMMA).
        let consumer = |c: &Compiled| c.route.namespace != ns && c.route.namespace == req.client_namespace;
        let producer = |c: &Compiled| c.route.namespace == ns;
        let by_consumer = routes.gateway.iter().any(|c| applies(c) && consumer(c));
        let chosen = |c: &Compiled| applies(c) && if by_consumer { consumer(c) } else { producer(c) };
        if let Some(first) = routes.gateway.iter().find(|c| chosen(c)) {
            for &(r, i, j) in &routes.ranked {
                let c = &routes.gateway[r];
                if !chosen(c) {
                    continue;
                }
                let m = &c.rules[i].matches.as_ref().expect("gateway rules have matches")[j];
                if m.matches(req, path, query, &mut cookies) {
                    let prefix = match &m.path {
                        Some(Path::Prefix(p)) => Some(p.as_str()),
                        _ => None,
                    };
                    return Selection::Rule(c.selected(i, prefix, rand));
                }
            }
            return Selection::Unmatched { route: &first.id };
        }
        let Some(c) = &routes.local else { return Selection::NoRoute };
        for (i, rule) in c.rules.iter().enumerate() {
            let hit = match &rule.matches {
                None => Some(None),
                Some(ms) => ms.iter().find(|m| m.matches(req, path, query, &mut cookies)).map(Some),
            };
            if let Some(m) = hit {
                // What a string-prefix rewrite replaces: the prefix matched,
                // `/` when the path was not matched at all (Istio's
                // implicit prefix), nothing for exact and regex matches.
                let prefix = match m.and_then(|m| m.path.as_ref()) {
                    Some(Path::StartsWith(p, _)) => Some(p.as_str()),
                    Some(Path::Prefix(p)) => Some(p.as_str()),
                    Some(Path::Exact(_) | Path::Regex(_)) => None,
                    None => Some("/"),
                };
                return Selection::Rule(c.selected(i, prefix, rand));
            }
        }
        if c.route.exhaustive {
            return Selection::Unmatched { route: &c.id };
        }
        Selection::NoRoute
    }

    /// Circuit breaker and outlier detection of a service: its local
    /// route's, or the defaults (Gateway API routes carry none).
    pub fn service_policy(&self, ns: &str, name: &str) -> &ServicePolicy {
        self.by_service
            .get(&(ns.to_owned(), name.to_owned()))
            .and_then(|r| r.local.as_ref())
            .map_or(&*DEFAULT_POLICY, |c| &c.policy)
    }

    /// The settings for traffic to `port` of a service and, when the
    /// backend is an Istio subset, that subset: the most specific of the
    /// route's overrides (port and subset, then subset, then port), else
    /// [`Self::service_policy`]. The second value names the override, so
    /// its limits are counted apart (`None`: the service's).
    pub fn policy_for(&self, ns: &str, name: &str, port: u16, subset: Option<&str>) -> (&ServicePolicy, Option<&str>) {
        let Some(c) = self.by_service.get(&(ns.to_owned(), name.to_owned())).and_then(|r| r.local.as_ref()) else {
            return (&DEFAULT_POLICY, None);
        };
        if c.overrides.is_empty() {
            return (&c.policy, None);
        }
        let find = |p: Option<u16>, s: Option<&str>| c.overrides.iter().find(|(o, _, _)| o.port == p && o.subset.as_deref() == s);
        let hit = subset
            .and_then(|s| find(Some(port), Some(s)).or_else(|| find(None, Some(s))))
            .or_else(|| find(Some(port), None));
        match hit {
            Some((_, policy, key)) => (policy, Some(key)),
            None => (&c.policy, None),
        }
    }

    /// The local route (as configured) of a service, if any.
    pub fn route(&self, ns: &str, name: &str) -> Option<&HttpRoute> {
        self.by_service.get(&(ns.to_owned(), name.to_owned()))?.local.as_ref().map(|c| &c.route)
    }

    /// Routes in the table, of both forms.
    pub fn len(&self) -> usize {
        self.by_service.values().map(|r| r.gateway.len() + usize::from(r.local.is_some())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Compiled {
    fn selected<'a>(&'a self, i: usize, matched_prefix: Option<&'a str>, rand: u32) -> Selected<'a> {
        let spec = &self.route.rules[i];
        let cumulative = &self.rules[i].cumulative;
        let total = cumulative.last().copied().unwrap_or(0);
        let backend = (total > 0).then(|| {
            let r = u64::from(rand) % total;
            let b = cumulative.iter().position(|&cum| r < cum).unwrap_or(cumulative.len() - 1);
            &spec.backends[b]
        });
        Selected {
            route: &self.id,
            rule_index: i,
            rule: spec,
            backend,
            matched_prefix,
            timeout: spec.timeout.map(|t| t.0),
            retry: &spec.retries,
        }
    }
}

/// How specific a Gateway API match is, greatest first, as the HTTPRoute
/// spec orders them: an exact path, then the longest prefix, then (ours:
/// regular expressions are implementation-specific) a path regular
/// expression, then a method, then more headers, then more query
/// parameters.
fn specificity(m: &Match) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        Some(Path::Exact(p)) => (3, p.len()),
        // Without the trailing '/', as matched ("/" is the empty prefix).
        Some(Path::Prefix(p) | Path::StartsWith(p, _)) => (2, p.len()),
        Some(Path::Regex(r)) => (1, r.as_str().len()),
        None => (0, 0),
    };
    (kind, len, m.method.is_some(), m.headers.len(), m.query.len())
}

/// Every match of the Gateway API routes of one service, most specific
/// first; ties go to the oldest route, then `namespace/name`, then rule
/// and match order within a route (the spec's order).
fn rank(routes: &[Compiled]) -> Vec<(usize, usize, usize)> {
    let mut all = Vec::new();
    for (r, c) in routes.iter().enumerate() {
        for (i, rule) in c.rules.iter().enumerate() {
            for j in 0..rule.matches.as_ref().map_or(0, Vec::len) {
                all.push((r, i, j));
            }
        }
    }
    let created = |r: usize| {
        let c = routes[r].route.gateway.as_ref().and_then(|a| a.created.as_deref());
        // A route without a timestamp (the local file may omit it) counts
        // as the newest.
        (c.is_none(), c.map(str::to_owned))
    };
    all.sort_by_cached_key(|&(r, i, j)| {
        let m = &routes[r].rules[i].matches.as_ref().expect("counted above")[j];
        (Reverse(specificity(m)), created(r), routes[r].id.clone(), i, j)
    });
    all
}

/// `^(?:re)$`: Gateway API regular expressions match the whole value.
fn whole(re: &str) -> Option<Regex> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| tracing::warn!("regular expression {re:?} left out: {e}")).ok()
}

fn compile(id: String, route: &HttpRoute) -> Compiled {
    let rules = route
        .rules
        .iter()
        .map(|rule| {
            let mut sum = 0u64;
            let cumulative = rule
                .backends
                .iter()
                .map(|b| {
                    sum += u64::from(b.weight.unwrap_or(100));
                    sum
                })
                .collect();
            let matches = rule.matches.as_ref().map(|ms| ms.iter().map(compile_match).collect());
            Rule { matches, cumulative }
        })
        .collect();
    Compiled {
        id: id.into(),
        route: route.clone(),
        policy: ServicePolicy {
            circuit_breaker: route.circuit_breaker.clone(),
            outlier_detection: route.outlier_detection.clone(),
            load_balancer: route.load_balancer,
        },
        overrides: route
            .overrides
            .iter()
            .map(|o| {
                let policy = ServicePolicy {
                    circuit_breaker: o.circuit_breaker.clone(),
                    outlier_detection: o.outlier_detection.clone(),
                    load_balancer: o.load_balancer,
                };
                let key = match (o.port, &o.subset) {
                    (Some(p), Some(s)) => format!("{}:{p}/{s}", route.service),
                    (None, Some(s)) => format!("{}/{s}", route.service),
                    (Some(p), None) => format!("{}:{p}", route.service),
                    (None, None) => route.service.clone(),
                };
                (o.clone(), policy, key)
            })
            .collect(),
        rules,
    }
}

fn compile_match(m: &super::HttpMatch) -> Match {
    // A regular expression that does not compile never matches (the
    // sources refuse such routes; this guards the rest).
    let never = || Path::Regex(Regex::new("[^\\s\\S]").expect("a valid expression"));
    Match {
        path: m.path.as_ref().and_then(|p| match p {
            PathMatch { exact: Some(p), ignore_case: true, .. } => {
                Some(Regex::new(&format!("(?i)^{}$", regex::escape(p))).map_or_else(|_| never(), Path::Regex))
            }
            PathMatch { exact: Some(p), .. } => Some(Path::Exact(p.clone())),
            PathMatch { starts_with: Some(p), ignore_case, .. } => Some(Path::StartsWith(p.clone(), *ignore_case)),
            PathMatch { prefix: Some(p), .. } => Some(Path::Prefix(p.trim_end_matches('/').to_owned())),
            PathMatch { regex: Some(r), .. } => Some(whole(r).map_or_else(never, Path::Regex)),
            _ => None,
        }),
        method: m.method.as_ref().and_then(|s| http::Method::from_bytes(s.to_ascii_uppercase().as_bytes()).ok()),
        headers: m
            .headers
            .iter()
            .flatten()
            .filter_map(|h| {
                let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                let cond = match (&h.exact, &h.prefix, &h.regex, h.present) {
                    (Some(v), _, _, _) => Cond::Exact(v.clone()),
                    (_, Some(v), _, _) => Cond::Prefix(v.clone()),
                    (_, _, Some(r), _) => Cond::Regex(whole(r).unwrap_or_else(|| Regex::new("[^\\s\\S]").expect("valid"))),
                    (_, _, _, p) => Cond::Present(p.unwrap_or(true)),
                };
                Some((name, cond))
            })
            .collect(),
        cookies: m.cookies.iter().flatten().map(|c| (c.name.clone(), c.exact.clone())).collect(),
        query: m
            .query_params
            .iter()
            .map(|q| {
                let cond = match (&q.exact, &q.regex) {
                    (Some(v), _) => Cond::Exact(v.clone()),
                    (_, Some(r)) => Cond::Regex(whole(r).unwrap_or_else(|| Regex::new("[^\\s\\S]").expect("valid"))),
                    _ => Cond::Present(true),
                };
                (q.name.clone(), cond)
            })
            .collect(),
        source_namespace: m.source_namespace.clone(),
    }
}

impl Cond {
    fn test(&self, v: &[u8]) -> bool {
        match self {
            Cond::Exact(x) => v == x.as_bytes(),
            Cond::Prefix(x) => v.starts_with(x.as_bytes()),
            Cond::Regex(r) => std::str::from_utf8(v).is_ok_and(|s| r.is_match(s)),
            Cond::Present(_) => true,
        }
    }
}

impl Match {
    fn matches<'r>(&self, req: &RequestView<'r>, path: &str, query: Option<&str>, cookies: &mut Option<Vec<(&'r str, &'r str)>>) -> bool {
        match &self.path {
            Some(Path::Exact(p)) if path != p => return false,
            Some(Path::Prefix(p)) => {
                let ok = path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
                if !ok {
                    return false;
                }
            }
            Some(Path::StartsWith(p, ignore_case)) => {
                let head = path.as_bytes().get(..p.len());
                let ok = head.is_some_and(|h| if *ignore_case { h.eq_ignore_ascii_case(p.as_bytes()) } else { h == p.as_bytes() });
                if !ok {
                    return false;
                }
            }
            Some(Path::Regex(r)) if !r.is_match(path) => return false,
            _ => {}
        }
        if self.source_namespace.as_deref().is_some_and(|ns| ns != req.client_namespace) {
            return false;
        }
        if let Some(m) = &self.method
            && !m.as_str().eq_ignore_ascii_case(req.method.as_str())
        {
            return false;
        }
        for (name, cond) in &self.headers {
            let mut values = req.headers.get_all(name).iter();
            let ok = match cond {
                Cond::Present(want) => values.next().is_some() == *want,
                c => values.any(|x| c.test(x.as_bytes())),
            };
            if !ok {
                return false;
            }
        }
        for (name, cond) in &self.query {
            // The first occurrence of a parameter counts (Gateway API
            // leaves several to the implementation).
            let value = query.into_iter().flat_map(|q| q.split('&')).find_map(|pair| {
                let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                (n == name).then_some(v)
            });
            if !value.is_some_and(|v| cond.test(v.as_bytes())) {
                return false;
            }
        }
        if !self.cookies.is_empty() {
            let jar = cookies.get_or_insert_with(|| parse_cookies(req.headers));
            for (name, value) in &self.cookies {
                if !jar.iter().any(|(n, v)| n == name && v == value) {
                    return false;
                }
            }
        }
        true
    }
}

/// The cookies of a request, in order, from every `cookie` header
/// (`a=1; b=2`): pairs split at the first '=', whitespace around them
/// trimmed, a value in double quotes unquoted. Pairs without '=' and headers
/// that are not UTF-8 are skipped.
pub fn parse_cookies(headers: &HeaderMap) -> Vec<(&str, &str)> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (n, v) = pair.split_once('=')?;
            let n = n.trim();
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            (!n.is_empty()).then_some((n, v))
        })
        .collect()
}
