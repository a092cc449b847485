//! The compiled routes of a state snapshot, indexed by service, and
//! per-request selection.

use std::{collections::HashMap, time::Duration};

use http::{HeaderMap, HeaderName};

use super::{Backend, CircuitBreaker, HttpRoute, OutlierDetection, PathMatch, RetryPolicy};
use crate::state::MeshState;

/// What selection looks at in a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    /// The normalized path ([`crate::policy::NormalizedPath::path`]); a
    /// query, if any is left, is ignored.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome of [`RouteTable::select`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected<'a> {
    /// `namespace/name` of the route.
    pub route: &'a str,
    pub rule_index: usize,
    pub backend: &'a Backend,
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
    /// namespace -> service -> route.
    by_service: HashMap<String, HashMap<String, Compiled>>,
}

#[derive(Debug)]
struct Compiled {
    id: Box<str>,
    route: HttpRoute,
    policy: ServicePolicy,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    /// `None`: matches everything.
    matches: Option<Vec<Match>>,
    /// Running sums of the backends' weights (the last is 100).
    cumulative: Vec<u32>,
}

#[derive(Debug, Default)]
struct Match {
    path: Option<Path>,
    method: Option<http::Method>,
    headers: Vec<(HeaderName, Cond)>,
    cookies: Vec<(String, String)>,
}

#[derive(Debug)]
enum Path {
    Exact(String),
    /// Without a trailing '/'; empty for `/`.
    Prefix(String),
}

#[derive(Debug)]
enum Cond {
    Exact(String),
    Prefix(String),
    Present(bool),
}

static DEFAULT_POLICY: std::sync::LazyLock<ServicePolicy> = std::sync::LazyLock::new(ServicePolicy::default);

impl RouteTable {
    /// Compiles the routes of a snapshot. A route that does not validate
    /// (the local file refuses those; this guards other sources) or names a
    /// service an earlier route already took is left out, with a warning.
    pub fn from_state(state: &MeshState) -> Self {
        let mut by_service: HashMap<String, HashMap<String, Compiled>> = HashMap::new();
        for route in &state.routes {
            let id = format!("{}/{}", route.namespace, route.name);
            if let Err(e) = super::validate(route, &state.services) {
                tracing::warn!(route = %id, "HTTP route left out: {e}");
                continue;
            }
            let per_ns = by_service.entry(route.namespace.clone()).or_default();
            if let Some(other) = per_ns.get(&route.service) {
                tracing::warn!(route = %id, "HTTP route left out: route {} already routes service {}", other.id, route.service);
                continue;
            }
            per_ns.insert(route.service.clone(), compile(id, route));
        }
        Self { by_service }
    }

    /// The route, rule and backend for a request to service `ns/name`;
    /// `None` when no route names the service or no rule matches. `rand`
    /// picks among weighted backends (`rand % 100` against cumulative
    /// weights); pass a uniform random number.
    pub fn select<'a>(&'a self, ns: &str, name: &str, req: &RequestView<'_>, rand: u32) -> Option<Selected<'a>> {
        let c = self.by_service.get(ns)?.get(name)?;
        let path = req.path.split_once('?').map_or(req.path, |(p, _)| p);
        let mut cookies: Option<Vec<(&str, &str)>> = None;
        for (i, rule) in c.rules.iter().enumerate() {
            let hit = match &rule.matches {
                None => true,
                Some(ms) => ms.iter().any(|m| m.matches(req, path, &mut cookies)),
            };
            if !hit {
                continue;
            }
            let spec = &c.route.rules[i];
            let r = rand % 100;
            let b = rule.cumulative.iter().position(|&cum| r < cum).unwrap_or(rule.cumulative.len() - 1);
            return Some(Selected {
                route: &c.id,
                rule_index: i,
                backend: &spec.backends[b],
                timeout: spec.timeout.map(|t| t.0),
                retry: &spec.retries,
            });
        }
        None
    }

    /// Circuit breaker and outlier detection of a service: its route's, or
    /// the defaults.
    pub fn service_policy(&self, ns: &str, name: &str) -> &ServicePolicy {
        self.by_service
            .get(ns)
            .and_then(|m| m.get(name))
            .map_or(&*DEFAULT_POLICY, |c| &c.policy)
    }

    /// The route (as configured) of a service, if any.
    pub fn route(&self, ns: &str, name: &str) -> Option<&HttpRoute> {
        self.by_service.get(ns)?.get(name).map(|c| &c.route)
    }

    pub fn len(&self) -> usize {
        self.by_service.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn compile(id: String, route: &HttpRoute) -> Compiled {
    let rules = route
        .rules
        .iter()
        .map(|rule| {
            let mut sum = 0;
            let cumulative = rule
                .backends
                .iter()
                .map(|b| {
                    sum += b.weight.unwrap_or(100);
                    sum
                })
                .collect();
            let matches = rule.matches.as_ref().map(|ms| {
                ms.iter()
                    .map(|m| Match {
                        path: m.path.as_ref().and_then(|p| match p {
                            PathMatch { exact: Some(p), .. } => Some(Path::Exact(p.clone())),
                            PathMatch { prefix: Some(p), .. } => Some(Path::Prefix(p.trim_end_matches('/').to_owned())),
                            _ => None,
                        }),
                        method: m.method.as_ref().and_then(|s| http::Method::from_bytes(s.to_ascii_uppercase().as_bytes()).ok()),
                        headers: m
                            .headers
                            .iter()
                            .flatten()
                            .filter_map(|h| {
                                let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                                let cond = match (&h.exact, &h.prefix, h.present) {
                                    (Some(v), _, _) => Cond::Exact(v.clone()),
                                    (_, Some(v), _) => Cond::Prefix(v.clone()),
                                    (_, _, p) => Cond::Present(p.unwrap_or(true)),
                                };
                                Some((name, cond))
                            })
                            .collect(),
                        cookies: m.cookies.iter().flatten().map(|c| (c.name.clone(), c.exact.clone())).collect(),
                    })
                    .collect()
            });
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
        rules,
    }
}

impl Match {
    fn matches<'r>(&self, req: &RequestView<'r>, path: &str, cookies: &mut Option<Vec<(&'r str, &'r str)>>) -> bool {
        match &self.path {
            Some(Path::Exact(p)) if path != p => return false,
            Some(Path::Prefix(p)) => {
                let ok = path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
                if !ok {
                    return false;
                }
            }
            _ => {}
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
                Cond::Exact(v) => values.any(|x| x.as_bytes() == v.as_bytes()),
                Cond::Prefix(v) => values.any(|x| x.as_bytes().starts_with(v.as_bytes())),
            };
            if !ok {
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
