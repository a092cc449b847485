//! Istio traffic management as data: `VirtualService` and `DestinationRule`
//! objects after their own checks ([`crate::objects::istio_traffic`]),
//! with hosts and subsets still as written. They name each other and
//! services by host, so they are resolved together, against the services
//! of the state, into routes by [`crate::route::istio`].

use serde::Serialize;

use super::{
    Labels,
    route::{CircuitBreaker, Filter, HttpMatch, LoadBalancer, OutlierDetection, Redirect, RetryPolicy, RouteDuration},
};

/// A `networking.istio.io` `VirtualService` for mesh traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    pub name: String,
    pub namespace: String,
    /// `metadata.creationTimestamp` (RFC 3339): the oldest of several for
    /// one host wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// As written: short names are relative to `namespace`.
    pub hosts: Vec<String>,
    /// `http`, in order: the first rule that matches decides.
    pub rules: Vec<VsRule>,
}

/// One entry of `http`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `None`: every request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<HttpMatch>>,
    pub route: Vec<VsDestination>,
    /// Answered by the source agent; `route` is then empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<RouteDuration>,
    pub retries: RetryPolicy,
    /// Fault, header manipulation and rewrite, as route filters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<VsMirror>,
}

/// A weighted destination of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsDestination {
    pub target: VsTarget,
    /// A proportion of the rule's requests (Istio's weights add up to 100
    /// when written as documented; any sum is read as proportions).
    pub weight: u32,
    /// The destination's own header manipulation.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

/// `destination`: a host, optionally a subset of a DestinationRule and a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsTarget {
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsMirror {
    pub target: VsTarget,
    /// Share of requests mirrored, in parts per million.
    pub per_million: u32,
}

/// A `networking.istio.io` `DestinationRule`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// As written: a short name is relative to `namespace`.
    pub host: String,
    pub traffic_policy: TrafficPolicy,
    pub subsets: Vec<Subset>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    /// On top of the service's selector.
    pub labels: Labels,
    /// Overrides the rule's policy, section by section, for the subset's
    /// share of traffic.
    pub traffic_policy: TrafficPolicy,
}

/// A `trafficPolicy`: each section set replaces the one it overrides
/// whole (Istio's merge of subset over service level); unset fields of a
/// set section take the mesh's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<CircuitBreaker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// `portLevelSettings`: the service port they apply to, and the
    /// sections that port overrides.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub port_level: Vec<(u16, TrafficPolicy)>,
}

impl TrafficPolicy {
    /// `self` with `over`'s sections in place of its own.
    pub fn overridden_by(&self, over: &TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            connection_pool: over.connection_pool.clone().or_else(|| self.connection_pool.clone()),
            outlier_detection: over.outlier_detection.clone().or_else(|| self.outlier_detection.clone()),
            load_balancer: over.load_balancer.or(self.load_balancer),
            port_level: if over.port_level.is_empty() { self.port_level.clone() } else { over.port_level.clone() },
        }
    }

    /// The policy for traffic to `port`: a port-level entry for it
    /// overrides the sections it sets.
    pub fn for_port(&self, port: u16) -> TrafficPolicy {
        let base = TrafficPolicy { port_level: Vec::new(), ..self.clone() };
        match self.port_level.iter().find(|(p, _)| *p == port) {
            Some((_, over)) => base.overridden_by(over),
            None => base,
        }
    }
}
