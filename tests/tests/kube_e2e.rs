//! The Kubernetes source end to end: a real agent process (`--source kube`)
//! on the test API server, with real pods of the namespaced harness.
//! Labelling the namespace through the API enrolls the pod and its traffic
//! starts going through the agent; removing the label takes it out again.
//!
//! The harness's pods are named `pod<uid>`, so their cgroups carry the
//! Kubernetes pod UID the way the kubelet's cgroupfs layout does: the agent
//! finds their netns and cgroup from `/proc` exactly as on a node.

mod common;

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, PodIP, PodSpec as KPodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use mesh_e2e::{PodSpec, Testbed, kubeapi::ApiServer, wait_until};

use common::{ECHO_PORT, SETTLE, counter, pod_json, send, wait_enrolled};

const CLIENT_UID: &str = "5a1d0c3e-8f21-4b6a-9c47-0e2f6b1d7a01";
const SERVER_UID: &str = "5a1d0c3e-8f21-4b6a-9c47-0e2f6b1d7a02";

fn k8s_pod(name: &str, uid: &str, node: &str, ip: Ipv4Addr) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(KPodSpec { node_name: Some(node.into()), service_account_name: Some("default".into()), ..Default::default() }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.to_string()),
            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
            ..Default::default()
        }),
    }
}

fn namespace(enrolled: bool) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some("shop".into()),
            labels: enrolled.then(|| [("nodemesh.io/dataplane-mode".to_string(), "enabled".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn labelling_a_namespace_through_the_api_sends_a_pods_traffic_through_the_agent() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let api = rt.block_on(ApiServer::start())?;

    let mut tb = Testbed::new("kubeenroll")?;
    let (client_name, server_name) = (format!("pod{CLIENT_UID}"), format!("pod{SERVER_UID}"));
    let (client_ip, server_ip) = (Ipv4Addr::new(198, 51, 100, 11), Ipv4Addr::new(198, 51, 100, 12));
    let client = tb.add_pod(PodSpec::new(client_name.clone(), "shop", "node-a", client_ip))?;
    let server = tb.add_pod(PodSpec::new(server_name.clone(), "shop", "node-a", server_ip))?;
    // The CA runs in file mode on the testbed's config, which names the same pods.
    tb.write_config(&tb.config_path(), &[])?;
    let _ca = tb.start_ca()?;
    let _echo = server.start_echo(ECHO_PORT)?;
    // A process that stays in the client pod, as its containers would.
    let _client_process = client.spawn("sleep", ["3600"])?;

    api.apply(&namespace(false))?;
    api.apply(&k8s_pod(&client_name, CLIENT_UID, "node-a", client_ip))?;
    api.apply(&k8s_pod(&server_name, SERVER_UID, "node-a", server_ip))?;
    let kubeconfig = tb.dir().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let kubeconfig = kubeconfig.to_str().context("utf-8 path")?.to_owned();
    let agent = tb.start_agent_args(
        "node-a",
        &["--source", "kube", "--kubeconfig", &kubeconfig, "--reconcile-interval", "500ms", "--drain-timeout", "2s"],
    )?;

    // Known from the API, located on the node, not in the mesh yet.
    wait_until(SETTLE, || Ok(pod_json(&agent, "shop", &client_name).is_ok_and(|p| p["enrolled"] == false)))
        .with_context(|| format!("the agent never listed the client pod: {}", agent.log()))?;
    let to = format!("{server_ip}:{ECHO_PORT}");
    send(&client, &to, 4096)?;
    ensure!(counter(&agent, "shop", &client_name, "ebpf.redirected")? == 0, "redirected before enrollment");

    api.apply(&namespace(true))?;
    wait_enrolled(&agent, "shop", &client_name, true)?;
    wait_enrolled(&agent, "shop", &server_name, true)?;
    send(&client, &to, 64 << 10)?;
    let p = pod_json(&agent, "shop", &client_name)?;
    ensure!(p["ebpf"]["redirected"].as_u64() >= Some(1), "not redirected to the agent: {p}");
    ensure!(p["proxy"]["outboundTunneled"].as_u64() >= Some(1), "not tunneled: {p}");
    ensure!(counter(&agent, "shop", &server_name, "proxy.inbound")? >= 1, "the server's agent did not deliver it");

    // An Istio AuthorizationPolicy through the API, as Istio documents it:
    // the connection is refused while it exists, and its status says Accepted.
    api.apply_json(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-default-sa", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/default"]}}],
            "to": [{"operation": {"ports": [ECHO_PORT.to_string()]}}]}]}
    }))?;
    wait_until(SETTLE, || {
        let accepted = api.get("AuthorizationPolicy", "shop", "deny-default-sa").is_some_and(|o| o["status"]["conditions"][0]["status"] == "True");
        Ok(accepted && common::send_refused(&client, &to, 1024).is_ok())
    })
    .with_context(|| format!("the Istio DENY was never enforced: {}", agent.log()))?;
    ensure!(agent.log().contains("connection denied by authorization policy"), "the denial was not logged");
    api.delete("AuthorizationPolicy", "shop", "deny-default-sa")?;
    wait_until(SETTLE, || Ok(send(&client, &to, 1024).is_ok()))?;

    // Un-labelled: new connections go direct again.
    api.apply(&namespace(false))?;
    wait_enrolled(&agent, "shop", &client_name, false)?;
    let before = counter(&agent, "shop", &client_name, "ebpf.redirected")?;
    send(&client, &to, 4096)?;
    ensure!(counter(&agent, "shop", &client_name, "ebpf.redirected")? == before, "still redirected after un-labelling");
    Ok(())
}
