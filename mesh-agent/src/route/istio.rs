//! Istio `VirtualService`s and `DestinationRule`s of a state
//! ([`crate::state::traffic`]) resolved against its services into the
//! route model: one [`HttpRoute`] per routed service, in the slot of the
//! `httpRoutes` form (rules in order, the first match wins, as Istio's).
//! Pure; [`super::RouteTable::from_state`] calls [`routes`].
//!
//! # Resolution, and the choices made
//!
//! - **Hosts** are Kubernetes Services: `reviews` (the object's own
//!   namespace), `reviews.shop`, `reviews.shop.svc`,
//!   `reviews.shop.svc.<cluster domain>`. A host that names no Service of
//!   the state applies to nothing (Istio: no such service in the registry).
//!   Only services with an HTTP port are routed; a VirtualService's `http`
//!   routes never apply to TCP ports.
//! - **Several VirtualServices for one host**: the oldest
//!   (`creationTimestamp`, then namespace/name) is applied and the others
//!   are left out for that host, with a warning (Istio merges them only at
//!   gateways). A service's `httpRoutes` entry of the local file wins over
//!   any VirtualService. Gateway API routes attached to the service decide
//!   its requests before either (Istio: an HTTPRoute takes precedence over a
//!   VirtualService for the same service); the DestinationRule's policies
//!   still apply to them.
//! - **DestinationRule** for a service: the one in the service's own
//!   namespace, else the oldest elsewhere (Istio looks in the client's
//!   namespace first; the route table here is the same for every client).
//! - **Subsets**: a destination's `subset` is the labels its
//!   DestinationRule gives it, on top of the service's selector. A subset
//!   no DestinationRule defines is an invalid backend: its share of
//!   requests is answered 500 `invalid-backend` (Istio answers 503: no
//!   cluster), with the reason in the body and the log.
//! - **No rule matching**: 404 `no-route` (Envoy's `NR`): a
//!   VirtualService's rules are all the routes of its host.
//! - **Destinations** to the routed service itself without a port keep
//!   the port the client dialled; to another service (or with a port),
//!   that service's `port`, else its only HTTP port.
//! - **Policies**: the DestinationRule's `trafficPolicy` sections become
//!   the service's circuit breaker, outlier detection and load balancer;
//!   a subset's or a port's sections replace them for that subset's or
//!   port's traffic, whose limits are then counted apart (Istio: each
//!   subset and port is its own cluster). Sections left unset take the
//!   mesh's defaults ([`super::CircuitBreaker::default`], ...).

use std::collections::{BTreeMap, HashMap};

use super::{
    Backend, BackendService, CircuitBreaker, Filter, HttpRoute, LoadBalancer, OutlierDetection, PolicyOverride, RouteRule,
};
use crate::state::{
    MeshState, Service,
    traffic::{DestinationRule, TrafficPolicy, VirtualService, VsTarget},
};

type Key<'a> = (&'a str, &'a str);

/// A destination's service and, for a subset, its name and labels.
type Found<'s, 'v> = (&'s Service, Option<(&'v str, crate::state::Labels)>);

/// The service `host` names, written in namespace `ns`.
fn resolve<'a>(services: &'a [Service], ns: &str, host: &str) -> Option<&'a Service> {
    let labels: Vec<&str> = host.split('.').collect();
    let (name, namespace) = match labels.as_slice() {
        [name] => (*name, ns),
        [name, namespace] => (*name, *namespace),
        [name, namespace, "svc", ..] => (*name, *namespace),
        _ => return None,
    };
    services.iter().find(|s| s.name == name && s.namespace == namespace)
}

fn age_key(created: &Option<String>, ns: &str, name: &str) -> (bool, Option<String>, String) {
    // Without a timestamp (the local file may omit it): the newest.
    (created.is_none(), created.clone(), format!("{ns}/{name}"))
}

/// Every route the state's Istio traffic objects make, one per service.
pub fn routes(state: &MeshState) -> Vec<HttpRoute> {
    if state.virtual_services.is_empty() && state.destination_rules.is_empty() {
        return Vec::new();
    }
    let services = &state.services;
    let rules = destination_rules(state);
    let mut vss: Vec<&VirtualService> = state.virtual_services.iter().collect();
    vss.sort_by_cached_key(|v| age_key(&v.created, &v.namespace, &v.name));
    let mut taken: BTreeMap<Key<'_>, &VirtualService> = BTreeMap::new();
    let mut out = Vec::new();
    for vs in vss {
        for host in &vs.hosts {
            let Some(svc) = resolve(services, &vs.namespace, host) else {
                tracing::debug!(virtual_service = %format!("{}/{}", vs.namespace, vs.name), %host, "host is not a service of the mesh");
                continue;
            };
            if !svc.ports.iter().any(|p| p.is_http()) {
                continue;
            }
            let key = (svc.namespace.as_str(), svc.name.as_str());
            if let Some(first) = taken.get(&key) {
                if !std::ptr::eq(*first, vs) {
                    tracing::warn!(
                        virtual_service = %format!("{}/{}", vs.namespace, vs.name),
                        "left out for {}/{}: VirtualService {}/{} is older and routes it", key.0, key.1, first.namespace, first.name
                    );
                }
                continue;
            }
            taken.insert(key, vs);
            out.push(route_of(vs, svc, services, &rules));
        }
    }
    // A DestinationRule without a VirtualService: the policies alone.
    for (&key, dr) in &rules {
        if taken.contains_key(&key) {
            continue;
        }
        let Some(svc) = services.iter().find(|s| (s.namespace.as_str(), s.name.as_str()) == key) else { continue };
        let mut route = empty_route(svc, &dr.namespace, &dr.name);
        apply_policy(&mut route, dr);
        out.push(route);
    }
    out
}

/// The DestinationRule of each service (see the module doc).
fn destination_rules(state: &MeshState) -> BTreeMap<Key<'_>, &DestinationRule> {
    let mut drs: Vec<&DestinationRule> = state.destination_rules.iter().collect();
    drs.sort_by_cached_key(|d| age_key(&d.created, &d.namespace, &d.name));
    let mut out: BTreeMap<Key<'_>, &DestinationRule> = BTreeMap::new();
    for dr in drs {
        let Some(svc) = resolve(&state.services, &dr.namespace, &dr.host) else { continue };
        let key = (svc.namespace.as_str(), svc.name.as_str());
        let own = |d: &DestinationRule| d.namespace == svc.namespace;
        match out.get(&key) {
            Some(first) if own(first) || !own(dr) => {
                tracing::debug!(destination_rule = %format!("{}/{}", dr.namespace, dr.name), "DestinationRule {}/{} applies to {}/{} instead", first.namespace, first.name, key.0, key.1);
            }
            _ => {
                out.insert(key, dr);
            }
        }
    }
    out
}

fn empty_route(svc: &Service, ns: &str, name: &str) -> HttpRoute {
    HttpRoute {
        name: if ns == svc.namespace { name.to_owned() } else { format!("{name}.{ns}") },
        namespace: svc.namespace.clone(),
        service: svc.name.clone(),
        rules: Vec::new(),
        circuit_breaker: CircuitBreaker::default(),
        outlier_detection: OutlierDetection::default(),
        load_balancer: LoadBalancer::default(),
        gateway: None,
        overrides: Vec::new(),
        exhaustive: false,
    }
}

fn route_of(vs: &VirtualService, svc: &Service, services: &[Service], rules: &BTreeMap<Key<'_>, &DestinationRule>) -> HttpRoute {
    let mut route = empty_route(svc, &vs.namespace, &vs.name);
    route.exhaustive = !vs.rules.is_empty();
    let find = |t: &VsTarget| -> Result<Found<'_, '_>, String> {
        let dest = resolve(services, &vs.namespace, &t.host).ok_or_else(|| format!("host {} is not a service of the mesh", t.host))?;
        let subset = match &t.subset {
            None => None,
            Some(name) => {
                let dr = rules.get(&(dest.namespace.as_str(), dest.name.as_str())).ok_or_else(|| format!("no DestinationRule defines subsets of {}/{}", dest.namespace, dest.name))?;
                let s = dr
                    .subsets
                    .iter()
                    .find(|s| &s.name == name)
                    .ok_or_else(|| format!("subset {name:?} is not defined by DestinationRule {}/{}", dr.namespace, dr.name))?;
                Some((s.name.as_str(), s.labels.clone()))
            }
        };
        Ok((dest, subset))
    };
    let port_of = |dest: &Service, t: &VsTarget| -> Result<Option<u16>, String> {
        if std::ptr::eq(dest, svc) && t.port.is_none() {
            return Ok(None);
        }
        if let Some(p) = t.port {
            return dest.ports.iter().any(|x| x.port == p).then_some(Some(p)).ok_or_else(|| format!("service {}/{} has no port {p}", dest.namespace, dest.name));
        }
        let http: Vec<u16> = dest.ports.iter().filter(|p| p.is_http()).map(|p| p.port).collect();
        match http.as_slice() {
            [one] => Ok(Some(*one)),
            [] => Err(format!("service {}/{} has no HTTP port", dest.namespace, dest.name)),
            _ => Err(format!("service {}/{} has several HTTP ports: name one (destination.port)", dest.namespace, dest.name)),
        }
    };
    for rule in &vs.rules {
        let mut backends = Vec::new();
        for d in &rule.route {
            let mut b = Backend { weight: Some(d.weight), filters: d.filters.clone(), ..Default::default() };
            match find(&d.target).and_then(|(dest, subset)| port_of(dest, &d.target).map(|p| (dest, subset, p))) {
                Ok((dest, subset, port)) => {
                    if let Some((name, labels)) = subset {
                        b.subset = (!labels.is_empty()).then_some(labels);
                        b.subset_name = Some(name.to_owned());
                    }
                    b.service = port.map(|port| BackendService { namespace: dest.namespace.clone(), name: dest.name.clone(), port });
                }
                Err(why) => {
                    tracing::warn!(virtual_service = %format!("{}/{}", vs.namespace, vs.name), "destination {}: {why}", d.target.host);
                    b.invalid = Some(why);
                }
            }
            backends.push(b);
        }
        let mut filters = rule.filters.clone();
        if let Some(r) = &rule.redirect {
            filters.push(Filter::RequestRedirect(r.clone()));
        }
        for m in &rule.mirrors {
            let resolved = find(&m.target).and_then(|(dest, subset)| {
                let port = port_of(dest, &m.target)?.or_else(|| svc.ports.iter().find(|p| p.is_http()).map(|p| p.port));
                let port = port.ok_or_else(|| format!("service {}/{} has no HTTP port", dest.namespace, dest.name))?;
                Ok(Filter::RequestMirror {
                    backend: BackendService { namespace: dest.namespace.clone(), name: dest.name.clone(), port },
                    per_million: m.per_million,
                    subset: subset.map(|(_, l)| l).filter(|l| !l.is_empty()),
                })
            });
            match resolved {
                Ok(f) => filters.push(f),
                Err(why) => tracing::warn!(virtual_service = %format!("{}/{}", vs.namespace, vs.name), "mirror {} left out: {why}", m.target.host),
            }
        }
        route.rules.push(RouteRule { matches: rule.matches.clone(), backends, timeout: rule.timeout, retries: rule.retries.clone(), filters });
    }
    if let Some(dr) = rules.get(&(svc.namespace.as_str(), svc.name.as_str())) {
        apply_policy(&mut route, dr);
    }
    route
}

/// The service-level sections of a policy (its `port_level` is not read).
fn sections(p: &TrafficPolicy) -> (CircuitBreaker, OutlierDetection, LoadBalancer) {
    (p.connection_pool.clone().unwrap_or_default(), p.outlier_detection.clone().unwrap_or_default(), p.load_balancer.unwrap_or_default())
}

/// The DestinationRule's service-level sections, and an override for each
/// port-level setting, each subset with its own policy, and each pair.
fn apply_policy(route: &mut HttpRoute, dr: &DestinationRule) {
    let base = &dr.traffic_policy;
    (route.circuit_breaker, route.outlier_detection, route.load_balancer) = sections(base);
    let mut overrides: HashMap<(Option<u16>, Option<String>), TrafficPolicy> = HashMap::new();
    for (port, _) in &base.port_level {
        overrides.insert((Some(*port), None), base.for_port(*port));
    }
    for s in &dr.subsets {
        if s.traffic_policy == TrafficPolicy::default() {
            continue;
        }
        let merged = base.overridden_by(&s.traffic_policy);
        overrides.insert((None, Some(s.name.clone())), merged.clone());
        for (port, _) in base.port_level.iter().chain(&s.traffic_policy.port_level) {
            overrides.insert((Some(*port), Some(s.name.clone())), merged.for_port(*port));
        }
    }
    let mut list: Vec<PolicyOverride> = overrides
        .into_iter()
        .map(|((port, subset), p)| {
            let (circuit_breaker, outlier_detection, load_balancer) = sections(&p);
            PolicyOverride { port, subset, circuit_breaker, outlier_detection, load_balancer }
        })
        .collect();
    list.sort_by(|a, b| (a.port, &a.subset).cmp(&(b.port, &b.subset)));
    route.overrides = list;
}

#[cfg(test)]
mod tests;
