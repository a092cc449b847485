//! Gateway API routes from the cluster: `HTTPRoute` and `GRPCRoute`
//! (`gateway.networking.k8s.io/v1`) as kube resources, judged with
//! [`crate::route::gateway::convert`] against the state's services, and
//! the route status the spec asks for (`status.parents[]`, our
//! [`CONTROLLER_NAME`] entries only).
//!
//! The CRDs are Gateway API's own (installed by the cluster's operator,
//! not by `deploy/crds.yaml`); without them the agent works on, reading
//! no routes, and says so once ([`super::source`]).

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{Api, Client, api::{Patch, PatchParams}};
use serde::{Deserialize, Serialize};

use crate::route::gateway::{self, CONTROLLER_NAME, Converted, ParentStatus, RouteObject, Spec, api};

/// A Gateway API route object: metadata, a spec of the kind, status.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteResource<S> {
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<api::RouteStatus>,
}

pub type HttpRoute = RouteResource<api::HttpRouteSpec>;
pub type GrpcRoute = RouteResource<api::GrpcRouteSpec>;

/// What tells the two kinds apart for kube.
pub trait RouteKind {
    const KIND: &'static str;
    const PLURAL: &'static str;
    fn spec(&self) -> Spec<'_>;
}

impl RouteKind for HttpRoute {
    const KIND: &'static str = "HTTPRoute";
    const PLURAL: &'static str = "httproutes";
    fn spec(&self) -> Spec<'_> {
        Spec::Http(&self.spec)
    }
}

impl RouteKind for GrpcRoute {
    const KIND: &'static str = "GRPCRoute";
    const PLURAL: &'static str = "grpcroutes";
    fn spec(&self) -> Spec<'_> {
        Spec::Grpc(&self.spec)
    }
}

impl<S> kube::Resource for RouteResource<S>
where
    Self: RouteKind,
{
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Self::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        api::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        api::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Self::PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// One route object's conversion, with what the status writer needs.
pub struct Judged {
    pub kind: &'static str,
    pub meta: ObjectMeta,
    /// `status.parents` as the object carries it now.
    pub current: Vec<serde_json::Value>,
    pub converted: Converted,
}

/// Converts a route object against the services of the state.
pub fn judge<R: RouteKind + kube::Resource<DynamicType = ()>>(obj: &R, status: Option<&api::RouteStatus>, services: &[crate::state::Service]) -> Judged {
    let meta = obj.meta().clone();
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let created = meta.creation_timestamp.as_ref().map(|t| t.0.to_string());
    let converted = gateway::convert(&RouteObject { namespace: &ns, name: &name, created, spec: obj.spec() }, services);
    Judged { kind: R::KIND, meta, current: status.map(|s| s.parents.clone()).unwrap_or_default(), converted }
}

/// The `status.parents` the object should carry: every other controller's
/// entry as it is, then ours for each Service parent, a condition keeping
/// its `lastTransitionTime` while its status does not change. `None`:
/// nothing of ours would change.
pub fn desired_parents(j: &Judged, now: &Time) -> Option<Vec<serde_json::Value>> {
    let ours = |v: &serde_json::Value| v.get("controllerName").and_then(|c| c.as_str()) == Some(CONTROLLER_NAME);
    let mut out: Vec<serde_json::Value> = j.current.iter().filter(|v| !ours(v)).cloned().collect();
    let previous: BTreeMap<String, &serde_json::Value> =
        j.current.iter().filter(|v| ours(v)).map(|v| (v["parentRef"].to_string(), v)).collect();
    let mut changed = previous.len() != j.converted.parents.len();
    for p in &j.converted.parents {
        let parent_ref = serde_json::to_value(&p.parent_ref).expect("a parentRef serializes");
        let before = previous.get(&parent_ref.to_string()).copied();
        let entry = entry(p, &parent_ref, before, j.meta.generation, now);
        if before.is_none_or(|b| !same_entry(b, &entry)) {
            changed = true;
        }
        out.push(entry);
    }
    changed.then_some(out)
}

fn entry(p: &ParentStatus, parent_ref: &serde_json::Value, before: Option<&serde_json::Value>, generation: Option<i64>, now: &Time) -> serde_json::Value {
    let conditions: Vec<serde_json::Value> = p
        .conditions()
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let previous = before
                .and_then(|b| b["conditions"].as_array())
                .and_then(|cs| cs.iter().find(|x| x["type"] == c.kind))
                .filter(|x| x["status"] == status)
                .map(|x| x["lastTransitionTime"].clone());
            serde_json::json!({
                "type": c.kind,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": generation,
                "lastTransitionTime": previous.unwrap_or_else(|| serde_json::to_value(now).expect("a time serializes")),
            })
        })
        .collect();
    serde_json::json!({ "parentRef": parent_ref, "controllerName": CONTROLLER_NAME, "conditions": conditions })
}

/// Equal but for the times.
fn same_entry(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(cs) = v["conditions"].as_array_mut() {
            for c in cs {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    strip(a) == strip(b)
}

/// Writes `status.parents` of one route (a merge patch of the status
/// subresource: the list is replaced whole, other controllers' entries
/// included as read).
pub async fn write_status(client: Client, kind: &'static str, meta: ObjectMeta, parents: Vec<serde_json::Value>) {
    let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else { return };
    let body = serde_json::json!({ "status": { "parents": parents } });
    let pp = PatchParams::default();
    let patch = Patch::Merge(&body);
    let (plural, result) = match kind {
        "GRPCRoute" => (GrpcRoute::PLURAL, Api::<GrpcRoute>::namespaced(client, ns).patch_status(name, &pp, &patch).await.map(|_| ())),
        _ => (HttpRoute::PLURAL, Api::<HttpRoute>::namespaced(client, ns).patch_status(name, &pp, &patch).await.map(|_| ())),
    };
    match result {
        Ok(()) => tracing::debug!(route = %format!("{kind} {ns}/{name}"), "route status written"),
        Err(kube::Error::Api(s)) if s.code == 403 => tracing::warn!(
            route = %format!("{kind} {ns}/{name}"),
            "cannot report the route's status: the agent's service account may not patch {plural}/status (API group {:?}); grant `patch` on {plural}/status in its ClusterRole",
            api::GROUP
        ),
        Err(e) => tracing::warn!(route = %format!("{kind} {ns}/{name}"), "cannot report the route's status: {}", crate::error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(current: Vec<serde_json::Value>) -> Judged {
        let services = crate::localfile::parse(
            std::path::Path::new("x"),
            "namespaces: [{name: shop}]\nservices: [{name: echo, namespace: shop, selector: {app: echo}, ports: [{name: http, port: 80}]}]\n",
        )
        .unwrap()
        .services;
        let route: HttpRoute = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop", "generation": 3},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}, {"name": "gw"}],
                     "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}]},
        }))
        .unwrap();
        let status = api::RouteStatus { parents: current };
        judge(&route, Some(&status), &services)
    }

    #[test]
    fn only_our_entries_are_written_and_unchanged_ones_are_left_alone() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000_000).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000_000).unwrap());
        let gateway_entry = serde_json::json!({"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway", "conditions": []});
        let j = judged(vec![gateway_entry.clone()]);
        let parents = desired_parents(&j, &t0).expect("ours is missing");
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0], gateway_entry, "another controller's entry kept as is");
        let ours = &parents[1];
        assert_eq!(ours["controllerName"], CONTROLLER_NAME);
        assert_eq!(ours["parentRef"], serde_json::json!({"group": "", "kind": "Service", "name": "echo"}));
        let conds: Vec<(&str, &str, &str)> = ours["conditions"].as_array().unwrap().iter().map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap(), c["reason"].as_str().unwrap())).collect();
        assert_eq!(conds, [("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]);
        assert_eq!(ours["conditions"][0]["observedGeneration"], 3);
        // Written once: the same verdict later is no write at all.
        let again = judged(parents.clone());
        assert_eq!(desired_parents(&again, &t1), None);
        // A stale entry of ours (a parent removed) is dropped; others stay.
        let stale = serde_json::json!({"parentRef": {"name": "old", "kind": "Service", "group": ""}, "controllerName": CONTROLLER_NAME, "conditions": []});
        let mut current = parents.clone();
        current.push(stale);
        let fixed = desired_parents(&judged(current), &t1).expect("the stale entry goes");
        assert_eq!(fixed.len(), 2);
        assert_eq!(fixed[1]["conditions"][0]["lastTransitionTime"], serde_json::to_value(&t0).unwrap(), "unchanged conditions keep their time");
    }
}
