//! Enrollment against the in-memory kernel: what reconcile attaches,
//! enrolls and captures as the state changes, and how a failure is
//! reported and retried. The pods' listeners are real (loopback), their
//! certificates come from an in-memory CA.

use std::{path::Path, sync::Arc, time::Duration};

use super::Enrollment;
use crate::{
    metrics::Metrics,
    testing::{MemoryKernel, Mesh},
};

/// A guard against hanging, never a measurement.
const PATIENCE: Duration = Duration::from_secs(10);

/// A mesh state with `pods` (local-file lines, `NET` addresses): the
/// namespace `shop` is in the mesh, `plain` is not.
fn yaml(pods: &[&str]) -> String {
    let mut y = String::from(
        "nodes: [{name: node-a}, {name: node-b}]\n\
         namespaces:\n  - {name: shop, labels: {nodemesh.io/dataplane-mode: enabled}}\n  - {name: plain}\npods:\n",
    );
    for p in pods {
        y.push_str("  - ");
        y.push_str(p);
        y.push('\n');
    }
    y
}

const WEB: &str = "{name: web, namespace: shop, node: node-a, serviceAccount: web, ip: NET.11, netns: /run/netns/web, cgroup: /cg/web}";
const API: &str = "{name: api, namespace: shop, node: node-a, serviceAccount: api, ip: NET.12, netns: /run/netns/api, cgroup: /cg/api}";
const ELSEWHERE: &str =
    "{name: elsewhere, namespace: shop, node: node-b, serviceAccount: web, ip: NET.21, netns: /run/netns/x, cgroup: /cg/x}";
const OUTSIDE: &str =
    "{name: outside, namespace: plain, node: node-a, serviceAccount: default, ip: NET.13, netns: /run/netns/outside, cgroup: /cg/outside}";

/// The agent of node-a's enrollment over `kernel`.
fn enrollment(mesh: &Mesh, kernel: &MemoryKernel) -> Enrollment<MemoryKernel> {
    let proxy = mesh.proxy("node-a", kernel.orig_dst(), Arc::new(Metrics::default()));
    Enrollment::new("node-a".into(), kernel.clone(), proxy, crate::proxy::Ports::default().outbound, false)
}

/// Reconciles with `mesh`'s state until the enrollment is ready (the
/// certificates arrive in the background and wake it).
async fn reconcile_until_ready(e: &mut Enrollment<MemoryKernel>, mesh: &Mesh) {
    let wake = e.wake.clone();
    tokio::time::timeout(PATIENCE, async {
        loop {
            e.reconcile(&mesh.snapshot(), true);
            if e.ready() {
                return;
            }
            wake.notified().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not ready within the patience: {:?}", e.not_ready()));
}

#[tokio::test]
async fn pods_are_enrolled_captured_and_unenrolled_on_removal() {
    let mesh = Mesh::new(&yaml(&[WEB, API, ELSEWHERE, OUTSIDE]));
    let kernel = MemoryKernel::new();
    let mut e = enrollment(&mesh, &kernel);
    reconcile_until_ready(&mut e, &mesh).await;

    let k = kernel.state();
    let (web, api, outside) = (mesh.ip(11), mesh.ip(12), mesh.ip(13));
    assert_eq!(k.enrolled_ips(), [web, api].into(), "the two enrolled-namespace pods of node-a, not node-b's");
    // Every local pod has its hooks, in the mesh or not (outside it they
    // count and pass through); node-b's pod has none here.
    for cgroup in ["/cg/web", "/cg/api", "/cg/outside"] {
        assert!(k.attached.contains(Path::new(cgroup)), "{cgroup} attached: {k:?}");
    }
    assert!(!k.attached.contains(Path::new("/cg/x")));
    assert_eq!(k.entry_of(web).map(|e| e.outbound_port), Some(15001));
    assert_eq!(k.captured.get(&web), Some(&false), "captured, failing closed");
    assert_eq!(k.inbound_listeners.get(&web), Some(&mesh.addr(11, 15006)), "capture goes to the pod's plaintext listener");
    assert!(!k.captured.contains_key(&outside) && k.entry_of(outside).is_none(), "a pod outside the mesh is left alone");
    let status = serde_json::to_value(e.status()).unwrap();
    let web_status = status.as_array().unwrap().iter().find(|p| p["name"] == "web").expect("web in the status");
    assert_eq!(web_status["enrolled"], true);
    assert_eq!(web_status["attached"], true);
    assert_eq!(web_status["inboundCapture"], true);
    assert_eq!(web_status["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    assert!(web_status["listeners"].as_array().unwrap().contains(&mesh.addr(11, 15001).to_string().into()), "{web_status}");

    // api leaves the node's state: its entry, capture and hooks go.
    mesh.update(&yaml(&[WEB, ELSEWHERE, OUTSIDE]));
    e.reconcile(&mesh.snapshot(), true);
    let k = kernel.state();
    assert_eq!(k.enrolled_ips(), [web].into());
    assert!(!k.captured.contains_key(&api) && !k.inbound_listeners.contains_key(&api));
    assert!(!k.attached.contains(Path::new("/cg/api")));
    assert!(e.status().iter().all(|p| serde_json::to_value(p).unwrap()["name"] != "api"));

    // Its namespace unlabelled, web leaves the mesh but stays on the node.
    mesh.update(&yaml(&[WEB, ELSEWHERE, OUTSIDE]).replace("{nodemesh.io/dataplane-mode: enabled}", "{}"));
    e.reconcile(&mesh.snapshot(), true);
    let k = kernel.state();
    assert!(k.enrolled.is_empty() && k.captured.is_empty(), "{k:?}");
    assert!(k.attached.contains(Path::new("/cg/web")), "a local pod keeps its (pass-through) hooks");
}

#[tokio::test]
async fn a_failed_attach_is_reported_and_retried() {
    let mesh = Mesh::new(&yaml(&[WEB, API]));
    let kernel = MemoryKernel::new();
    kernel.fail_attach("/cg/web", 1);
    let mut e = enrollment(&mesh, &kernel);
    e.reconcile(&mesh.snapshot(), true);

    assert!(!e.ready());
    assert!(e.not_ready().contains(&("shop/web".into(), "error")), "{:?}", e.not_ready());
    let status = serde_json::to_value(e.status()).unwrap();
    let web = status.as_array().unwrap().iter().find(|p| p["name"] == "web").expect("web in the status");
    assert!(web["error"].as_str().unwrap().contains("attaching to /cg/web failed"), "{web}");
    assert_eq!(web["enrolled"], false);
    assert!(kernel.state().entry_of(mesh.ip(11)).is_none(), "not enrolled before its hooks are attached");
    assert!(kernel.state().entry_of(mesh.ip(12)).is_some(), "one pod's failure does not hold the others back");

    // The next pass tries again; the attach succeeds and the error clears.
    reconcile_until_ready(&mut e, &mesh).await;
    assert!(kernel.state().entry_of(mesh.ip(11)).is_some());
    let status = serde_json::to_value(e.status()).unwrap();
    let web = status.as_array().unwrap().iter().find(|p| p["name"] == "web").unwrap();
    assert!(web["error"].is_null(), "{web}");
}

#[tokio::test]
async fn lost_hooks_are_repaired_and_counted() {
    let mesh = Mesh::new(&yaml(&[WEB]));
    let kernel = MemoryKernel::new();
    let mut e = enrollment(&mesh, &kernel);
    reconcile_until_ready(&mut e, &mesh).await;
    assert_eq!(e.repairs, 0);

    kernel.lose_attachment(Path::new("/cg/web"));
    e.reconcile(&mesh.snapshot(), true);
    assert!(kernel.state().attached.contains(Path::new("/cg/web")));
    assert_eq!(e.repairs, 1, "drift undone once, and counted");
}

#[tokio::test]
async fn pinned_state_of_pods_this_agent_does_not_know_is_pruned() {
    // What a previous agent left: a pod in the mesh that then left the
    // node while no agent ran.
    let gone = "{name: gone, namespace: shop, node: node-a, serviceAccount: gone, ip: NET.14, netns: /run/netns/gone, cgroup: /cg/gone}";
    let mesh = Mesh::new(&yaml(&[gone]));
    let kernel = MemoryKernel::new();
    let mut previous = enrollment(&mesh, &kernel);
    reconcile_until_ready(&mut previous, &mesh).await;
    previous.stop_listeners();
    drop(previous);
    assert!(kernel.state().entry_of(mesh.ip(14)).is_some());

    mesh.update(&yaml(&[WEB]));
    let mut e = enrollment(&mesh, &kernel);
    // Not complete (a Kubernetes source still syncing): nothing goes.
    e.reconcile(&mesh.snapshot(), false);
    assert!(kernel.state().entry_of(mesh.ip(14)).is_some());
    e.reconcile(&mesh.snapshot(), true);
    let k = kernel.state();
    assert!(k.entry_of(mesh.ip(14)).is_none() && !k.captured.contains_key(&mesh.ip(14)), "{k:?}");
    assert!(!k.attached.contains(Path::new("/cg/gone")));
    assert!(k.entry_of(mesh.ip(11)).is_some(), "the pods this agent serves keep theirs");
}
