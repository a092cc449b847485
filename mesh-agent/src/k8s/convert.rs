//! Kubernetes objects to mesh-state values: pure functions, no I/O.
//!
//! Core objects (validated by the API server) are converted leniently: what
//! the mesh cannot use is left out with a reason. The mesh's own objects and
//! Istio's are validated with the local file's rules (Istio's by the same
//! code, [`crate::objects`]) and either accepted or refused with a reason for
//! their status.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::crd;
use crate::{objects, state};

/// EndpointSlices name their service with this label.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub fn namespace(ns: &Namespace) -> Option<state::Namespace> {
    Some(state::Namespace {
        name: ns.metadata.name.clone()?,
        labels: crd::labels(&ns.metadata.labels),
    })
}

/// Why a pod is not (yet) part of the mesh state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PodSkipped {
    #[error("not scheduled to a node yet")]
    Unscheduled,
    #[error("has no IP address yet")]
    NoIp,
    #[error("has finished (phase {0})")]
    Finished(String),
    #[error("uses the node's network (hostNetwork): it cannot be enrolled")]
    HostNetwork,
    #[error("its status has an invalid IP address {0:?}")]
    BadIp(String),
}

/// A pod as the mesh sees it; `paths` are its netns and cgroup (known only
/// for pods on this node; empty for the others).
pub fn pod(p: &Pod, paths: Option<(PathBuf, PathBuf)>) -> Result<state::Pod, PodSkipped> {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Err(PodSkipped::HostNetwork);
    }
    let node = spec.and_then(|s| s.node_name.clone()).ok_or(PodSkipped::Unscheduled)?;
    // A finished pod's address may already belong to a new pod.
    if let Some(phase @ ("Succeeded" | "Failed")) = status.and_then(|s| s.phase.as_deref()) {
        return Err(PodSkipped::Finished(phase.to_owned()));
    }
    let mut ips = Vec::new();
    let listed = status.and_then(|s| s.pod_ips.as_ref()).map(|v| v.iter().map(|i| i.ip.clone()).collect::<Vec<_>>());
    let listed = listed.filter(|v| !v.is_empty()).or_else(|| status.and_then(|s| s.pod_ip.clone()).map(|ip| vec![ip]));
    for text in listed.into_iter().flatten() {
        let ip: IpAddr = text.parse().map_err(|_| PodSkipped::BadIp(text.clone()))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(PodSkipped::NoIp);
    }
    let (netns, cgroup) = paths.unwrap_or_default();
    Ok(state::Pod {
        key: state::PodKey {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
        },
        node,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        ips,
        labels: crd::labels(&p.metadata.labels),
        netns,
        cgroup,
    })
}

/// A service with its ports resolved against its EndpointSlices (named
/// target ports) and, when it has slices, its ready endpoint addresses.
pub fn service(s: &Service, slices: &[&EndpointSlice]) -> Option<state::Service> {
    let spec = s.spec.as_ref()?;
    let mut ips = Vec::new();
    let listed = spec.cluster_ips.clone().filter(|v| !v.is_empty()).or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]));
    for text in listed.into_iter().flatten() {
        // "None": a headless service has no virtual address.
        if let Ok(ip) = text.parse::<IpAddr>() {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for sp in spec.ports.iter().flatten() {
        if sp.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let name = sp.name.clone().unwrap_or_default();
        let target = match &sp.target_port {
            None => Some(sp.port),
            Some(IntOrString::Int(n)) => Some(*n),
            // A named port: each slice says what it resolved to.
            Some(IntOrString::String(_)) => slices
                .iter()
                .flat_map(|sl| sl.ports.iter().flatten())
                .find(|p| p.name.as_deref().unwrap_or_default() == name)
                .and_then(|p| p.port),
        };
        let (Ok(port), Some(Ok(target_port))) = (u16::try_from(sp.port), target.map(u16::try_from)) else {
            continue;
        };
        if port == 0 || target_port == 0 {
            continue;
        }
        ports.push(state::ServicePort {
            name,
            port,
            target_port,
            app_protocol: sp.app_protocol.clone(),
        });
    }
    let endpoint_ips = (!slices.is_empty()).then(|| {
        let mut eps: Vec<IpAddr> = slices
            .iter()
            .flat_map(|sl| sl.endpoints.iter())
            // Kubernetes: an unknown readiness is to be read as ready.
            .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|ep| ep.addresses.iter())
            .filter_map(|a| a.parse().ok())
            .collect();
        eps.sort();
        eps.dedup();
        eps
    });
    Some(state::Service {
        name: s.metadata.name.clone()?,
        namespace: s.metadata.namespace.clone()?,
        ips,
        selector: spec.selector.clone().unwrap_or_default(),
        ports,
        endpoint_ips,
    })
}

/// EndpointSlices grouped by `(namespace, service)`.
pub fn slices_by_service<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> BTreeMap<(String, String), Vec<&'a EndpointSlice>> {
    let mut out: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for sl in slices {
        let (Some(ns), Some(svc)) = (
            sl.metadata.namespace.clone(),
            sl.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned(),
        ) else {
            continue;
        };
        out.entry((ns, svc)).or_default().push(sl);
    }
    out
}

/// Why one of the mesh's objects is refused: `reason` is a CamelCase word
/// for the condition, `message` names the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: &'static str,
    pub message: String,
}

fn name_and_namespace(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (meta.name.clone().unwrap_or_default(), meta.namespace.clone().unwrap_or_default())
}

/// A refused object and what, if anything, enforces in its place (see
/// [`crate::objects::Refused::stand_in`]).
#[derive(Clone, Debug)]
pub struct Rejected<T> {
    pub refused: Refused,
    pub stand_in: Option<Box<T>>,
}

impl<T> From<Refused> for Rejected<T> {
    fn from(refused: Refused) -> Self {
        Self { refused, stand_in: None }
    }
}

/// An Istio object, converted exactly as the local file converts it.
fn istio_object<T>(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: &serde_json::Value,
    pick: fn(objects::Converted) -> Option<T>,
) -> Result<T, Rejected<T>> {
    let (name, namespace) = name_and_namespace(meta);
    let annotations = meta.annotations.clone().unwrap_or_default();
    let group = match kind {
        "VirtualService" | "DestinationRule" => objects::istio_traffic::NETWORKING_GROUP,
        _ => objects::istio::SECURITY_GROUP,
    };
    let k = objects::find(&format!("{group}/{}", super::istio::VERSION), kind).expect("a kind of the table");
    let created = meta.creation_timestamp.as_ref().map(|t| t.0.to_string());
    let m = objects::Meta { name: &name, namespace: &namespace, annotations: &annotations, created: created.as_deref() };
    k.convert(&m, spec).map(|c| pick(c).expect("the kind converts to its own value")).map_err(|r| Rejected {
        refused: Refused { reason: r.reason, message: r.message },
        stand_in: r.stand_in.and_then(|c| pick(*c)).map(Box::new),
    })
}

pub fn authorization_policy(obj: &super::istio::AuthorizationPolicy) -> Result<state::AuthorizationPolicy, Rejected<state::AuthorizationPolicy>> {
    istio_object("AuthorizationPolicy", &obj.metadata, &obj.spec, |c| match c {
        objects::Converted::AuthorizationPolicy(p) => Some(p),
        _ => None,
    })
}

pub fn virtual_service(obj: &super::istio::VirtualService) -> Result<state::traffic::VirtualService, Rejected<state::traffic::VirtualService>> {
    istio_object("VirtualService", &obj.metadata, &obj.spec, |c| match c {
        objects::Converted::VirtualService(v) => Some(v),
        _ => None,
    })
}

pub fn destination_rule(obj: &super::istio::DestinationRule) -> Result<state::traffic::DestinationRule, Rejected<state::traffic::DestinationRule>> {
    istio_object("DestinationRule", &obj.metadata, &obj.spec, |c| match c {
        objects::Converted::DestinationRule(d) => Some(d),
        _ => None,
    })
}

pub fn peer_authentication(obj: &super::istio::PeerAuthentication) -> Result<state::PeerAuthentication, Rejected<state::PeerAuthentication>> {
    istio_object("PeerAuthentication", &obj.metadata, &obj.spec, |c| match c {
        objects::Converted::PeerAuthentication(p) => Some(p),
        _ => None,
    })
}


#[cfg(test)]
mod tests;
