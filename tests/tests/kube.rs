//! The agent's Kubernetes source (kube-rs watchers, reflectors, the state
//! builder) against the test API server: real list/watch protocol, real
//! object JSON. In-process and on loopback only, no root needed.

use std::{path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use mesh_agent::{
    k8s::{self, PodLocator},
    state::{Destination, MeshState, PodKey, Snapshot},
};
use mesh_e2e::kubeapi::ApiServer;
use serde_json::{Value, json};
use tokio::sync::watch;

const ENROLL: (&str, &str) = ("nodemesh.io/dataplane-mode", "enabled");

/// Netns and cgroup paths named after the pod: the source's logic, not the
/// node's layout, is under test here.
struct NamedPaths;

impl PodLocator for NamedPaths {
    fn locate(&self, pod: &Pod) -> Result<(PathBuf, PathBuf), String> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        Ok((format!("/run/netns/{name}").into(), format!("/sys/fs/cgroup/test/{name}").into()))
    }
}

struct Agent {
    state: watch::Receiver<Snapshot>,
    stats: Arc<k8s::Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn client(api: &ApiServer) -> kube::Client {
    let cfg = kube::Config::new(api.url().parse().expect("a URL"));
    kube::Client::try_from(cfg).expect("a client")
}

fn start_agent(api: &ApiServer, node: &str) -> Agent {
    start_agent_with(api, node, Default::default())
}

fn start_agent_with(api: &ApiServer, node: &str, scope: mesh_agent::state::Scope) -> Agent {
    let (state, stats, fut) = k8s::start(
        client(api),
        k8s::Options {
            node: node.into(),
            trust_domain: "cluster.local".into(),
            locator: Arc::new(NamedPaths),
            write_status: true,
            pods_only: false,
            scope,
        },
    );
    Agent { state, stats, task: tokio::spawn(fut) }
}

/// Bounds every wait so a broken build fails instead of hanging; never an
/// assertion about speed.
const PATIENCE: Duration = Duration::from_secs(90);

impl Agent {
    /// Waits until the published state satisfies `cond`.
    async fn until(&mut self, what: &str, cond: impl Fn(&MeshState) -> bool) -> Snapshot {
        let wait = async {
            loop {
                let s = self.state.borrow_and_update().clone();
                if self.stats.view().built && cond(&s) {
                    return s;
                }
                if self.state.changed().await.is_err() {
                    panic!("the source stopped while waiting for: {what}");
                }
            }
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(s) => s,
            Err(_) => panic!(
                "not reached: {what}\nstate: {}\nkube: {:#?}",
                serde_json::to_string_pretty(&**self.state.borrow()).unwrap(),
                self.stats.view()
            ),
        }
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(PATIENCE, wait).await.is_err() {
        panic!("not reached: {what}");
    }
}

fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        labels: (!labels.is_empty()).then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace { metadata: meta(None, name, labels), ..Default::default() }
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: meta(Some(ns), name, labels),
        spec: Some(PodSpec { node_name: Some(node.into()), service_account_name: Some(name.into()), ..Default::default() }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    }
}

fn service(ns: &str, name: &str, vip: &str, selector: &[(&str, &str)]) -> Service {
    Service {
        metadata: meta(Some(ns), name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.into()),
            cluster_ips: Some(vec![vip.into()]),
            selector: Some(selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("web".into())),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(ns: &str, svc: &str, endpoints: &[(&str, bool)]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(Some(ns), &format!("{svc}-x1"), &[("kubernetes.io/service-name", svc)]),
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort { name: Some("http".into()), port: Some(8080), ..Default::default() }]),
        endpoints: endpoints
            .iter()
            .map(|(ip, ready)| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions { ready: Some(*ready), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
    }
}

fn key(ns: &str, name: &str) -> PodKey {
    PodKey { namespace: ns.into(), name: name.into() }
}

fn enrolled(s: &MeshState, ns: &str, name: &str) -> bool {
    s.pods.get(&key(ns, name)).is_some_and(|p| s.is_enrolled(p))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelling_a_namespace_enrolls_this_nodes_pods_only_and_the_opt_out_wins() {
    let api = ApiServer::start().await.unwrap();
    api.apply(&namespace("shop", &[])).unwrap();
    api.apply(&pod("shop", "a1", "node-a", "10.1.0.11", &[("app", "a")])).unwrap();
    api.apply(&pod("shop", "a2", "node-a", "10.1.0.12", &[("nodemesh.io/dataplane-mode", "disabled")])).unwrap();
    api.apply(&pod("shop", "b1", "node-b", "10.1.0.21", &[])).unwrap();
    let mut agent = start_agent(&api, "node-a");

    let s = agent.until("three pods, none enrolled", |s| s.pods.len() == 3).await;
    assert!(!enrolled(&s, "shop", "a1") && !enrolled(&s, "shop", "a2"));
    let local: Vec<_> = s.pods_on_node("node-a").map(|p| p.key.name.clone()).collect();
    assert_eq!(local, ["a1", "a2"], "this node's pods");
    assert_eq!(s.pods[&key("shop", "a1")].netns, PathBuf::from("/run/netns/a1"));
    assert_eq!(s.pods[&key("shop", "b1")].netns, PathBuf::new(), "another node's pod is not located here");
    assert_eq!(s.pods[&key("shop", "b1")].service_account, "b1", "remote identity comes from the pod");
    assert!(
        api.requests().iter().any(|r| r.contains("/api/v1/pods?") && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "this node's pods are watched with a field selector: {:#?}",
        api.requests()
    );

    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    let s = agent.until("a1 enrolled", |s| enrolled(s, "shop", "a1")).await;
    assert!(!enrolled(&s, "shop", "a2"), "the pod opt-out label wins over the namespace label");
    assert!(matches!(s.resolve("10.1.0.11:80".parse().unwrap(), |_| 0), Destination::MeshPod { .. }));

    api.apply(&namespace("shop", &[])).unwrap();
    agent.until("a1 un-enrolled", |s| !enrolled(s, "shop", "a1") && s.pods.len() == 3).await;
}

/// `--enrollment-label` with the Kubernetes source: the configured label
/// enrolls, the default one no longer does, and a pod Istio ambient
/// captures (its namespace labelled `istio.io/dataplane-mode=ambient` too)
/// is never ours unless it opts out of ambient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_enrollment_label_enrolls_and_istio_ambient_keeps_its_pods() {
    let api = ApiServer::start().await.unwrap();
    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    api.apply(&namespace("mixed", &[("mesh.example.com/member", "yes"), ("istio.io/dataplane-mode", "ambient")])).unwrap();
    api.apply(&pod("shop", "s1", "node-a", "10.1.0.11", &[])).unwrap();
    api.apply(&pod("mixed", "m1", "node-a", "10.1.0.12", &[])).unwrap();
    api.apply(&pod("mixed", "m2", "node-a", "10.1.0.13", &[("istio.io/dataplane-mode", "none")])).unwrap();
    let scope = mesh_agent::state::Scope {
        enrollment: mesh_agent::state::Enrollment::parse("mesh.example.com/member=yes").unwrap(),
        cluster_id: "east".into(),
        ..Default::default()
    };
    let mut agent = start_agent_with(&api, "node-a", scope);
    let s = agent.until("m2 enrolled", |s| s.pods.len() == 3 && enrolled(s, "mixed", "m2")).await;
    assert!(!enrolled(&s, "shop", "s1"), "the default label no longer enrolls");
    assert!(!enrolled(&s, "mixed", "m1"), "ambient's pod");
    assert_eq!(s.cluster_id, "east");
    api.apply(&namespace("shop", &[("mesh.example.com/member", "yes")])).unwrap();
    agent.until("s1 enrolled", |s| enrolled(s, "shop", "s1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_and_endpointslice_changes_show_up_in_state_and_routing() {
    let api = ApiServer::start().await.unwrap();
    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    api.apply(&pod("shop", "w1", "node-a", "10.1.0.11", &[("app", "web")])).unwrap();
    api.apply(&pod("shop", "w2", "node-b", "10.1.0.12", &[("app", "web")])).unwrap();
    api.apply(&service("shop", "web", "10.96.0.10", &[("app", "web")])).unwrap();
    api.apply(&slice("shop", "web", &[("10.1.0.11", true), ("10.1.0.12", false)])).unwrap();
    let mut agent = start_agent(&api, "node-a");
    let vip = "10.96.0.10:80".parse().unwrap();
    let endpoints = |s: &MeshState| -> Vec<String> { s.resolve_all(vip).iter().map(|d| d.addr().to_string()).collect() };

    let s = agent.until("the service", |s| !s.services.is_empty() && s.pods.len() == 2).await;
    assert_eq!(endpoints(&s), ["10.1.0.11:8080"], "only ready endpoints, named target port resolved from the slice");
    assert!(s.app_http(&key("shop", "w1"), 8080).is_some(), "appProtocol makes the port HTTP");

    api.apply(&slice("shop", "web", &[("10.1.0.11", true), ("10.1.0.12", true)])).unwrap();
    agent.until("w2 ready", |s| endpoints(s) == ["10.1.0.11:8080", "10.1.0.12:8080"]).await;

    api.apply(&pod("shop", "w1", "node-a", "10.1.0.11", &[("app", "other")])).unwrap();
    agent.until("w1 relabelled out of the service", |s| endpoints(s) == ["10.1.0.12:8080"]).await;

    api.delete("Pod", "shop", "w2").unwrap();
    agent.until("w2 deleted", |s| !s.pods.contains_key(&key("shop", "w2"))).await;

    api.apply(&pod("shop", "w3", "node-a", "10.1.0.13", &[("app", "web")])).unwrap();
    api.apply(&slice("shop", "web", &[("10.1.0.13", true)])).unwrap();
    let s = agent.until("w3 created and in the slice", |s| endpoints(s) == ["10.1.0.13:8080"]).await;
    assert!(enrolled(&s, "shop", "w3"));
}

fn list_requests(api: &ApiServer, path: &str) -> usize {
    api.requests().iter().filter(|r| r.starts_with(&format!("GET {path}")) && !r.contains("watch=")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_and_a_410_gone_converge() {
    let api = ApiServer::start().await.unwrap();
    api.apply(&namespace("shop", &[])).unwrap();
    api.apply(&pod("shop", "a1", "node-a", "10.1.0.11", &[])).unwrap();
    api.apply(&pod("shop", "a2", "node-a", "10.1.0.12", &[])).unwrap();
    let mut agent = start_agent(&api, "node-a");
    agent.until("listed", |s| s.pods.len() == 2).await;

    // Dropped watches: clients resume from their resourceVersion.
    let lists = list_requests(&api, "/api/v1/namespaces");
    api.drop_watches();
    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    agent.until("label seen after a dropped watch", |s| enrolled(s, "shop", "a1")).await;

    // History compacted while watches are cut: resuming gets 410 Gone and the
    // client relists; a deletion it never saw as an event must still land.
    api.compact();
    api.drop_watches();
    api.delete("Pod", "shop", "a2").unwrap();
    api.apply(&namespace("shop", &[])).unwrap();
    api.compact();
    api.drop_watches();
    agent
        .until("converged after 410", |s| !s.pods.contains_key(&key("shop", "a2")) && !enrolled(s, "shop", "a1"))
        .await;
    until("namespaces relisted", || list_requests(&api, "/api/v1/namespaces") > lists).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_being_down_keeps_the_last_state() {
    let api = ApiServer::start().await.unwrap();
    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    api.apply(&pod("shop", "a1", "node-a", "10.1.0.11", &[])).unwrap();
    let mut agent = start_agent(&api, "node-a");
    let before = agent.until("enrolled", |s| enrolled(s, "shop", "a1")).await;

    api.set_down(true);
    let stats = agent.stats.clone();
    until("the outage is noticed", || stats.view().watches.values().any(|w| w.errors > 0)).await;
    assert_eq!(*agent.state.borrow().clone(), *before, "the last state keeps serving during the outage");

    api.set_down(false);
    api.apply(&pod("shop", "a2", "node-a", "10.1.0.12", &[])).unwrap();
    agent.until("back in sync after the outage", |s| enrolled(s, "shop", "a2") && enrolled(s, "shop", "a1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rbac_denial_names_the_missing_permission() {
    let api = ApiServer::start().await.unwrap();
    api.deny("list", "endpointslices");
    let agent = start_agent(&api, "node-a");
    let stats = agent.stats.clone();
    until("the denial is reported", || {
        stats.view().watches.get("endpointslices").is_some_and(|w| w.last_error.is_some())
    })
    .await;
    let err = stats.view().watches["endpointslices"].last_error.clone().unwrap();
    for part in ["permission denied", "may not list endpointslices", "\"discovery.k8s.io\"", "ClusterRole"] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    assert!(!stats.view().built, "no state is built from a partial view");
}

fn condition(api: &ApiServer, kind: &str, name: &str) -> Option<Value> {
    let obj = api.get(kind, "shop", name)?;
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Accepted").cloned()
}

async fn until_condition(api: &ApiServer, kind: &str, name: &str, status: &str, generation: i64) -> Value {
    let mut found = None;
    until(&format!("{kind} {name}: Accepted={status} (generation {generation})"), || {
        found = condition(api, kind, name).filter(|c| c["status"] == status && c["observedGeneration"] == generation);
        found.is_some()
    })
    .await;
    found.unwrap()
}

const ISTIO: &str = "security.istio.io/v1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_mesh_objects_are_reported_and_never_change_enforcement() {
    use mesh_agent::state::AuthzAction;
    let api = ApiServer::start().await.unwrap();
    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    let policy = |extra: Value| {
        let mut spec = json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"apiVersion": ISTIO, "kind": "AuthorizationPolicy",
               "metadata": {"name": "deny-admin", "namespace": "shop"}, "spec": spec})
    };
    api.apply_json(policy(json!({}))).unwrap();
    let mut agent = start_agent(&api, "node-a");
    let good = agent.until("the valid policy", |s| s.authorization_policies.len() == 1).await;
    until_condition(&api, "AuthorizationPolicy", "deny-admin", "True", 1).await;

    // An unknown field: refused, and the previous version stays in force.
    api.apply_json(policy(json!({"colour": "blue"}))).unwrap();
    let c = until_condition(&api, "AuthorizationPolicy", "deny-admin", "False", 2).await;
    assert_eq!(c["reason"], "Invalid");
    assert!(c["message"].as_str().unwrap().contains("colour"), "{c}");
    assert_eq!(agent.state.borrow().authorization_policies, good.authorization_policies);

    // An impossible value in a new ALLOW: refused with the field named; it
    // allows nothing meanwhile (what it selects stays default-deny).
    api.apply_json(json!({"apiVersion": ISTIO, "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad-port", "namespace": "shop"},
        "spec": {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["70000"]}}]}]}}))
    .unwrap();
    let c = until_condition(&api, "AuthorizationPolicy", "bad-port", "False", 1).await;
    assert!(c["message"].as_str().unwrap().starts_with("spec.rules[0].to[0].operation.ports[0]"), "{c}");
    assert!(c["message"].as_str().unwrap().contains("fails closed"), "{c}");
    // An unsupported field in a new ALLOW: refused, named; enforced
    // without the rule that sets it.
    api.apply_json(json!({"apiVersion": ISTIO, "kind": "AuthorizationPolicy",
        "metadata": {"name": "jwt-only", "namespace": "shop"},
        "spec": {"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}}))
    .unwrap();
    let c = until_condition(&api, "AuthorizationPolicy", "jwt-only", "False", 1).await;
    assert_eq!(c["reason"], "Unsupported");
    assert!(c["message"].as_str().unwrap().starts_with("spec.rules[0].from[0].source.requestPrincipals"), "{c}");
    // A wrong type (a PERMISSIVE one: left out) and a route to a service
    // that does not exist.
    api.apply_json(json!({"apiVersion": ISTIO, "kind": "PeerAuthentication",
        "metadata": {"name": "permissive", "namespace": "shop"}, "spec": {"mtls": {"mode": 3}}}))
    .unwrap();
    api.apply_json(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "canary", "namespace": "shop"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "nowhere"}, {"name": "some-gateway"}],
                 "rules": [{"backendRefs": [{"name": "nowhere", "port": 80}]}]}}))
    .unwrap();
    let c = until_condition(&api, "PeerAuthentication", "permissive", "False", 1).await;
    assert_eq!(c["reason"], "Invalid");
    assert!(c["message"].as_str().unwrap().starts_with("spec.mtls.mode"), "{c}");
    // Gateway API route status: one entry, ours (the Gateway parent is not).
    let mut parents = Value::Null;
    until("HTTPRoute canary: status.parents written", || {
        parents = api.get("HTTPRoute", "shop", "canary").map(|o| o["status"]["parents"].clone()).unwrap_or_default();
        parents.as_array().is_some_and(|p| !p.is_empty())
    })
    .await;
    assert_eq!(parents.as_array().unwrap().len(), 1, "{parents}");
    assert_eq!(parents[0]["controllerName"], "nodemesh.io/mesh-agent");
    assert_eq!(parents[0]["parentRef"]["name"], "nowhere");
    let accepted = &parents[0]["conditions"][0];
    assert_eq!((&accepted["type"], &accepted["status"], &accepted["reason"]), (&json!("Accepted"), &json!("False"), &json!("NoMatchingParent")), "{parents}");
    let s = agent.state.borrow().clone();
    let kept: Vec<_> = s.authorization_policies.iter().filter(|p| p.name == "deny-admin").cloned().collect();
    assert_eq!(kept, good.authorization_policies, "the refused edit changed nothing");
    for name in ["bad-port", "jwt-only"] {
        let p = s.authorization_policies.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("{name} stands in: {s:?}"));
        assert!(p.action == AuthzAction::Allow && p.rules.is_empty(), "{name} allows nothing: {p:?}");
    }
    assert_eq!(s.authorization_policies.len(), 3, "{:?}", s.authorization_policies);
    assert!(s.peer_authentications.is_empty() && s.routes.is_empty());
    let refused = agent.stats.view().refused;
    assert_eq!(refused.len(), 5, "{refused:#?}");

    // A valid edit applies again.
    api.apply_json(policy(json!({"action": "ALLOW"}))).unwrap();
    agent
        .until("the fixed policy", |s| s.authorization_policies.iter().any(|p| p.name == "deny-admin" && p.action == AuthzAction::Allow))
        .await;
    until_condition(&api, "AuthorizationPolicy", "deny-admin", "True", 3).await;
}

/// Istio's traffic kinds from the cluster: an accepted VirtualService and
/// DestinationRule say so; an edit the mesh cannot apply is refused with
/// the field named and the earlier version stays in force; a new object
/// that cannot be read is left out; a valid edit applies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_traffic_objects_are_judged_and_a_refused_edit_keeps_the_last_good_version() {
    const NET: &str = "networking.istio.io/v1";
    let api = ApiServer::start().await.unwrap();
    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    let vs = |http: Value| {
        json!({"apiVersion": NET, "kind": "VirtualService", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"hosts": ["web"], "http": http}})
    };
    let route_v1 = json!([{"route": [{"destination": {"host": "web", "subset": "v1"}}]}]);
    api.apply_json(vs(route_v1.clone())).unwrap();
    api.apply_json(json!({"apiVersion": NET, "kind": "DestinationRule", "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
                 "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 5}}}}}))
    .unwrap();
    let mut agent = start_agent(&api, "node-a");
    let good = agent.until("the VirtualService and DestinationRule", |s| s.virtual_services.len() == 1 && s.destination_rules.len() == 1).await;
    until_condition(&api, "VirtualService", "web", "True", 1).await;
    until_condition(&api, "DestinationRule", "web", "True", 1).await;

    // An unsupported field: refused, named, the previous version in force.
    api.apply_json(vs(json!([{"corsPolicy": {"allowOrigins": [{"exact": "x"}]}, "route": [{"destination": {"host": "web", "subset": "v2"}}]}]))).unwrap();
    let c = until_condition(&api, "VirtualService", "web", "False", 2).await;
    assert_eq!(c["reason"], "Unsupported");
    assert!(c["message"].as_str().unwrap().starts_with("spec.http[0].corsPolicy"), "{c}");
    assert_eq!(agent.state.borrow().virtual_services, good.virtual_services, "the refused edit changed nothing");
    // An invalid value in a new object: refused, left out.
    api.apply_json(json!({"apiVersion": NET, "kind": "DestinationRule", "metadata": {"name": "bad", "namespace": "shop"},
        "spec": {"host": "api", "trafficPolicy": {"outlierDetection": {"baseEjectionTime": "soon"}}}}))
    .unwrap();
    let c = until_condition(&api, "DestinationRule", "bad", "False", 1).await;
    assert_eq!(c["reason"], "Invalid");
    assert!(c["message"].as_str().unwrap().starts_with("spec.trafficPolicy.outlierDetection.baseEjectionTime"), "{c}");
    assert_eq!(agent.state.borrow().destination_rules, good.destination_rules);
    let refused = agent.stats.view().refused;
    assert_eq!(refused.len(), 2, "{refused:#?}");

    // A valid edit applies again.
    api.apply_json(vs(json!([{"timeout": "2s", "route": [{"destination": {"host": "web", "subset": "v1"}}]}]))).unwrap();
    agent.until("the fixed VirtualService", |s| s.virtual_services.first().is_some_and(|v| v.rules[0].timeout.is_some())).await;
    until_condition(&api, "VirtualService", "web", "True", 3).await;
}

/// Refusing a DENY would open what it denies: a new DENY that cannot be
/// used stands as a DENY of everything it selects, a DENY with an
/// unsupported field is enforced without it, and a STRICT peer
/// authentication that cannot be read stays STRICT; each says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deny_policies_and_strict_peer_authentication_fail_closed() {
    use mesh_agent::state::{AuthzAction, PeerAuthMode};
    let api = ApiServer::start().await.unwrap();
    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    api.apply(&pod("shop", "api", "node-a", "198.51.100.11", &[("app", "api")])).unwrap();
    api.apply_json(json!({"apiVersion": ISTIO, "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-ops", "namespace": "shop"},
        "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "api"}}, "rules": [{"from": [{"source": {"namespaces": "ops"}}]}]}}))
    .unwrap();
    api.apply_json(json!({"apiVersion": ISTIO, "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-jwt", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["batch"], "notRequestPrincipals": ["*"]}}]}]}}))
    .unwrap();
    api.apply_json(json!({"apiVersion": ISTIO, "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT", "colour": "blue"}}}))
    .unwrap();
    let mut agent = start_agent(&api, "node-a");
    let s = agent.until("the stand-ins", |s| s.authorization_policies.len() == 2 && s.peer_authentications.len() == 1).await;
    let deny_ops = s.authorization_policies.iter().find(|p| p.name == "deny-ops").unwrap();
    assert_eq!(deny_ops.action, AuthzAction::Deny);
    assert_eq!(deny_ops.rules, vec![Default::default()], "denies everything");
    assert_eq!(deny_ops.selector, Some([("app".to_string(), "api".to_string())].into()), "that it selects");
    let deny_jwt = s.authorization_policies.iter().find(|p| p.name == "deny-jwt").unwrap();
    assert_eq!(deny_jwt.rules[0].from.as_ref().unwrap()[0].namespaces, Some(vec!["batch".to_string()]), "kept without the JWT field");
    assert_eq!(s.peer_auth_mode(&key("shop", "api"), 8080), PeerAuthMode::Strict);
    for (kind, name, reason, says) in [
        ("AuthorizationPolicy", "deny-ops", "Invalid", "spec.rules[0].from[0].source.namespaces"),
        ("AuthorizationPolicy", "deny-jwt", "Unsupported", "spec.rules[0].from[0].source.notRequestPrincipals"),
        ("PeerAuthentication", "strict", "Invalid", "spec.mtls"),
    ] {
        let c = until_condition(&api, kind, name, "False", 1).await;
        assert_eq!(c["reason"], reason, "{c}");
        let m = c["message"].as_str().unwrap();
        assert!(m.starts_with(says) && m.contains("fails closed"), "{c}");
    }
    // Fixed: the real policy replaces the stand-in.
    api.apply_json(json!({"apiVersion": ISTIO, "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-ops", "namespace": "shop"},
        "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "api"}}, "rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}]}}))
    .unwrap();
    agent
        .until("the fixed DENY", |s| s.authorization_policies.iter().any(|p| p.name == "deny-ops" && p.refused.is_none()))
        .await;
    until_condition(&api, "AuthorizationPolicy", "deny-ops", "True", 2).await;
}

/// Without Istio's CRDs the API answers 404: nobody can have created such
/// policies, so the state is built without them (the agent neither waits
/// nor spins), and they apply once the CRDs are installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_istio_crds_mean_no_policies_until_installed() {
    let api = ApiServer::start().await.unwrap();
    api.uninstall("authorizationpolicies");
    api.uninstall("peerauthentications");
    api.apply(&namespace("shop", &[ENROLL])).unwrap();
    api.apply(&pod("shop", "api", "node-a", "198.51.100.11", &[("app", "api")])).unwrap();
    let mut agent = start_agent(&api, "node-a");
    let s = agent.until("a state without Istio's kinds", |s| enrolled(s, "shop", "api")).await;
    assert!(s.authorization_policies.is_empty() && s.peer_authentications.is_empty());
    let mut view = agent.stats.view();
    assert!(view.built);
    view.absent.sort();
    assert_eq!(view.absent, vec!["authorizationpolicies", "peerauthentications"], "{view:#?}");
    api.install("authorizationpolicies");
    api.apply_json(json!({"apiVersion": ISTIO, "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-nothing", "namespace": "shop"}, "spec": {}}))
    .unwrap();
    agent.until("the policy, once its CRD is there", |s| s.authorization_policies.len() == 1).await;
    assert_eq!(agent.stats.view().absent, vec!["peerauthentications"]);
}

mod ca {
    use mesh_agent::{
        ca::{Authn, start_with},
        identity::{Authority, GrpcCaClient, SpiffeId, client::fetch},
    };
    use mesh_agent::k8s::tokenreview::TokenReviewer;

    use super::*;

    const AGENT: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";

    fn review(username: &str, node: &str, audience: &str) -> Value {
        json!({"authenticated": true, "audiences": [audience],
               "user": {"username": username, "extra": {"authentication.kubernetes.io/node-name": [node]}}})
    }

    /// The CA in Kubernetes mode, in-process, against the test API server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn certificates_only_for_reviewed_tokens_and_pods_on_the_callers_node() {
        let api = ApiServer::start().await.unwrap();
        api.apply(&namespace("shop", &[ENROLL])).unwrap();
        api.apply(&pod("shop", "web-a", "node-a", "198.51.100.11", &[])).unwrap();
        api.apply(&pod("shop", "web-b", "node-b", "10.1.0.21", &[])).unwrap();
        api.set_token("token-node-a", review(AGENT, "node-a", "nodemesh-ca"));
        api.set_token("token-for-the-apiserver", review(AGENT, "node-a", "https://kubernetes.default.svc"));
        api.set_token("token-other-account", review("system:serviceaccount:shop:web-a", "node-a", "nodemesh-ca"));
        api.set_token("token-unbound", json!({"authenticated": true, "audiences": ["nodemesh-ca"], "user": {"username": AGENT}}));

        // The CA reads namespaces and pods only: its RBAC grants nothing else.
        for resource in ["services", "endpointslices", "authorizationpolicies", "peerauthentications", "httproutes", "grpcroutes"] {
            api.deny("list", resource);
            api.deny("watch", resource);
        }
        let (state, stats, watchers) = k8s::start(
            client(&api),
            k8s::Options {
                node: String::new(),
                trust_domain: "cluster.local".into(),
                locator: Arc::new(k8s::source::NoPods),
                write_status: false,
                pods_only: true,
                scope: Default::default(),
            },
        );
        let _watchers = tokio::spawn(watchers);
        let mut reader = Agent { state, stats, task: tokio::spawn(async {}) };
        reader.until("the CA sees both pods", |s| s.pods.len() == 2).await;

        let authority = Arc::new(Authority::in_memory().unwrap());
        let reviewer = TokenReviewer::new(client(&api), "nodemesh-ca", "nodemesh-system/nodemesh-agent").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ca = start_with(authority.clone(), Authn::Kube(Arc::new(reviewer)), reader.state.clone(), listener, &[]).unwrap();
        let sign = |token: &'static str, pod_name: &'static str| {
            let authority = authority.clone();
            let addr = ca.addr;
            async move {
                let c = GrpcCaClient::new(&format!("https://{addr}"), &authority.trust_bundle_pem(), token, None).unwrap();
                let id = SpiffeId::new("cluster.local", "shop", pod_name).unwrap();
                fetch(&c, &key("shop", pod_name), &id, None).await.map_err(|e| mesh_agent::error_chain(&e))
            }
        };

        let cert = sign("token-node-a", "web-a").await.expect("a certificate for a pod on the caller's node");
        assert_eq!(cert.id.to_string(), "spiffe://cluster.local/ns/shop/sa/web-a");

        let e = sign("token-node-a", "web-b").await.unwrap_err();
        assert!(e.contains("node-b"), "a pod on another node: {e}");
        for (token, why) in [
            ("no-such-token", "not accepted"),
            ("token-for-the-apiserver", "not accepted"),
            ("token-other-account", "not to the node agents' service account"),
            ("token-unbound", "not bound to a pod on a node"),
        ] {
            let e = sign(token, "web-a").await.unwrap_err();
            assert!(e.contains(why), "{token}: {e}");
        }

        api.deny("create", "tokenreviews");
        let e = sign("token-node-a", "web-a").await.unwrap_err();
        assert!(e.contains("may not create tokenreviews"), "{e}");
    }

    /// The agents verify the CA with the trust bundle it publishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ca_publishes_its_trust_bundle() {
        let api = ApiServer::start().await.unwrap();
        let authority = Authority::in_memory().unwrap();
        let pem = authority.trust_bundle_pem();
        k8s::publish_roots(client(&api), "nodemesh-system/nodemesh-ca-roots", &pem).await.unwrap();
        k8s::publish_roots(client(&api), "nodemesh-system/nodemesh-ca-roots", &pem).await.unwrap();
        let cm = api.get("ConfigMap", "nodemesh-system", "nodemesh-ca-roots").unwrap();
        assert_eq!(cm["data"][k8s::ROOTS_KEY], pem.as_str());

        api.deny("patch", "configmaps");
        let e = k8s::publish_roots(client(&api), "nodemesh-system/nodemesh-ca-roots", &pem).await.unwrap_err();
        assert!(e.contains("may not patch configmap nodemesh-system/nodemesh-ca-roots"), "{e}");
    }
}
