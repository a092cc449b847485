//! Issue: the foundation data path, end to end in network namespaces (root).
//! Every data-path test runs twice: with socket acceleration on and off.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_e2e::{Agent, agent_bin, wait_until};

/// Enrolled pod on node A -> server pod on node B: a multi-megabyte transfer
/// arrives intact, and both agents' counters show the connection.
fn cross_node_transfer_is_intact_and_counted(accelerate: bool) -> Result<()> {
    let m = mesh("xnode", accelerate, &["shop"])?;
    let before_b = counter(&m.b, "shop", "shop-server", "proxy.inbound")?;
    let r = send(&m.shop_client, &server(&m.shop_server), 8 << 20)?;
    ensure!(r["received"] == 8u64 << 20, "{r}");
    ensure!(counter(&m.a, "shop", "shop-client", "ebpf.redirected")? == 1);
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outbound")? == 1);
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == 1);
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inbound")? == before_b + 1);
    // A service address resolves through the agent too.
    Ok(())
}
both_paths!(cross_node_transfer_is_intact_and_counted);

/// An unenrolled pod's connections never touch an agent, whichever way.
fn unenrolled_pods_bypass_the_agents(accelerate: bool) -> Result<()> {
    let m = mesh("bypass", accelerate, &["shop"])?;
    let inbound_before = counter(&m.b, "shop", "shop-server", "proxy.inbound")?;
    send(&m.legacy_client, &server(&m.shop_server), 1 << 20)?;
    send(&m.legacy_client, &server(&m.legacy_server), 1 << 20)?;
    let p = pod_json(&m.a, "legacy", "legacy-client")?;
    ensure!(p["enrolled"] == false, "{p}");
    ensure!(p["ebpf"]["redirected"] == 0 && p["ebpf"]["passedThrough"] == 2, "{p}");
    ensure!(p["proxy"]["outbound"] == 0, "{p}");
    // The enrolled server was reached, but not through the tunnel: plaintext
    // from outside the mesh is captured on 15006 instead (PERMISSIVE, the
    // default).
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inbound")? == inbound_before);
    Ok(())
}
both_paths!(unenrolled_pods_bypass_the_agents);

/// Enrolling a namespace at runtime (editing the file) sends new connections
/// through the agent while a connection opened before keeps working; leaving
/// the mesh likewise, for a connection opened through the agent.
fn enrolment_changes_keep_established_connections(accelerate: bool) -> Result<()> {
    let m = mesh("enrol", accelerate, &[])?;
    let dir = m.tb.dir().to_owned();
    let direct = Hold::start(&m.shop_client, &server(&m.shop_server), &dir, "direct")?;
    ensure!(counter(&m.a, "shop", "shop-client", "ebpf.redirected")? == 0);

    m.tb.set_enrolled(&m.tb.config_path(), &["shop"])?;
    wait_enrolled(&m.a, "shop", "shop-client", true)?;
    wait_enrolled(&m.b, "shop", "shop-server", true)?;
    direct.wait_roundtrips(20)?;
    send(&m.shop_client, &server(&m.shop_server), 256 << 10)?;
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == 1, "new connection not via the agent");
    let meshed = Hold::start(&m.shop_client, &server(&m.shop_server), &dir, "meshed")?;
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == 2);

    m.tb.set_enrolled(&m.tb.config_path(), &[])?;
    wait_enrolled(&m.a, "shop", "shop-client", false)?;
    wait_enrolled(&m.b, "shop", "shop-server", false)?;
    // Past the listeners' grace period: the relayed connection lives on.
    std::thread::sleep(Duration::from_secs(3));
    meshed.wait_roundtrips(20)?;
    direct.wait_roundtrips(20)?;
    send(&m.shop_client, &server(&m.shop_server), 256 << 10)?;
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outbound")? == 2, "new connection still via the agent");
    ensure!(meshed.finish()? > 40);
    ensure!(direct.finish()? > 40);
    Ok(())
}
both_paths!(enrolment_changes_keep_established_connections);

/// A service's virtual address resolves to its endpoints in the agent.
fn service_address_reaches_an_endpoint(accelerate: bool) -> Result<()> {
    let mut m = mesh("svc", accelerate, &["shop"])?;
    m.tb.add_service(
        mesh_e2e::ServiceSpec::new("shop-server", "shop")
            .port(80, ECHO_PORT)
            .select("app", "shop-server")
            .ip([198, 51, 100, 250].into()),
    )?;
    m.tb.write_config(&m.tb.config_path(), &["shop"])?;
    wait_until(SETTLE, || Ok(m.a.status()?["config"]["generation"] == 2))?;
    send(&m.shop_client, "198.51.100.250:80", 64 << 10)?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inbound")? >= 1);
    Ok(())
}
both_paths!(service_address_reaches_an_endpoint);

/// The agent's own outbound sockets are never redirected, even when the
/// agent runs inside an enrolled pod's cgroup so the connect hook sees them:
/// its socket mark exempts them. Without it the tunnel connect would loop
/// back into the agent.
#[test]
fn agent_sockets_are_not_redirected() -> Result<()> {
    let m = mesh("noloop", true, &["shop"])?;
    // A third agent for node-a, started inside the client pod's own cgroup.
    m.a.stop()?;
    let inside = m.tb.start_agent_in(m.shop_client.cgroup_path(), "node-a", &agent_args(true))?;
    wait_enrolled(&inside, "shop", "shop-client", true)?;
    send(&m.shop_client, &server(&m.shop_server), 1 << 20)?;
    let p = pod_json(&inside, "shop", "shop-client")?;
    // Exactly the app's one connect was redirected; the agent's own connect
    // (to node-b's tunnel port, from inside the pod) was not.
    ensure!(p["ebpf"]["redirected"] == 1, "{p}");
    ensure!(p["ebpf"]["passedThrough"] == 0, "{p}");
    ensure!(p["proxy"]["outbound"] == 1 && p["proxy"]["outboundTunneled"] == 1, "{p}");
    ensure!(p["proxy"]["outboundFailed"] == 0, "{p}");
    Ok(())
}

/// An invalid config file at start: non-zero exit and an error naming the
/// file, the field and the reason.
#[test]
fn invalid_config_at_start_is_a_clear_error() -> Result<()> {
    let mut tb = mesh_e2e::Testbed::new("badcfg")?;
    // A CA (on a valid config), so the CA flags are not what fails.
    tb.add_node("node-a");
    tb.write_config(&tb.config_path(), &[])?;
    let ca = tb.start_ca()?;
    let path = tb.dir().join("bad.yaml");
    std::fs::write(
        &path,
        "nodes: [{name: node-a}]\nnamespaces: [{name: shop}]\npods:\n  - {name: p, namespace: shop, node: node-a, ip: 198.51.100.300, netns: /run/netns/x, cgroup: /sys/fs/cgroup/x}\n",
    )?;
    let mut args: Vec<String> =
        ["run", "--config", path.to_str().expect("utf-8"), "--node", "node-a", "--admin", "127.0.0.1:0"]
            .map(String::from)
            .to_vec();
    args.extend(ca.agent_args("node-a")?);
    args.extend(tb.node_state_args());
    let out = Agent::run_once(&agent_bin()?, &args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "agent started on an invalid config");
    ensure!(stderr.contains(path.to_str().expect("utf-8")), "no file name: {stderr}");
    ensure!(stderr.contains("pods[0].ip") && stderr.contains("invalid IP address"), "no field/reason: {stderr}");
    ensure!(out.stdout.is_empty(), "printed a ready line: {}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// An invalid edit at runtime is rejected with the error on /status, and
/// traffic keeps flowing on the last good config; a valid edit then applies.
#[test]
fn invalid_edit_is_rejected_and_traffic_unaffected() -> Result<()> {
    let m = mesh("badedit", true, &["shop"])?;
    let path = m.tb.config_path();
    let good = std::fs::read_to_string(&path)?;
    let bad = good.replacen("ip: 198.51.100.12", "ip: 198.51.100.11", 1);
    ensure!(bad != good, "test edit did not apply");
    // Atomically: a reader must never see a cut-off file (which may parse).
    mesh_e2e::write_atomic(&path, &bad)?;
    wait_until(SETTLE, || Ok(m.a.status()?["config"]["rejected"] == 1))?;
    let status = m.a.status()?;
    let err = status["config"]["lastError"].as_str().context("no lastError")?;
    ensure!(err.contains("pods[") && err.contains("198.51.100.11 is already the address of pod"), "{err}");
    ensure!(status["config"]["generation"] == 1, "{status}");
    send(&m.shop_client, &server(&m.shop_server), 1 << 20)?;
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == 1);
    // A valid edit afterwards is accepted and clears the error.
    mesh_e2e::write_atomic(&path, &good.replace("labels: {}", "labels: {team: legacy}"))?;
    wait_until(SETTLE, || Ok(m.a.status()?["config"]["generation"] == 2))?;
    ensure!(m.a.status()?["config"]["lastError"].is_null());
    Ok(())
}

/// A service with two endpoints, one of them broken (nothing listens):
/// every connection to the service address succeeds, the broken endpoint
/// is ejected after its first failure, and the load is spread otherwise.
#[test]
fn service_endpoints_are_balanced_and_failures_ejected() -> Result<()> {
    let mut m = mesh("lb", false, &["shop"])?;
    let spare = m.tb.add_pod(mesh_e2e::PodSpec::new("shop-server-2", "shop", "node-b", [198, 51, 100, 13].into()).label("role", "echo"))?;
    let third = m.tb.add_pod(mesh_e2e::PodSpec::new("shop-server-3", "shop", "node-b", [198, 51, 100, 14].into()).label("role", "echo"))?;
    let _echo = third.start_echo(ECHO_PORT)?;
    m.tb.add_service(
        mesh_e2e::ServiceSpec::new("echo", "shop").port(80, ECHO_PORT).select("role", "echo").ip([198, 51, 100, 251].into()),
    )?;
    m.tb.write_config(&m.tb.config_path(), &["shop"])?;
    wait_until(SETTLE, || Ok(m.a.status()?["config"]["generation"] == 2 && m.b.status()?["config"]["generation"] == 2))?;
    wait_enrolled(&m.b, "shop", "shop-server-2", true)?;
    wait_enrolled(&m.b, "shop", "shop-server-3", true)?;
    // shop-server-2 runs no server: its agent refuses the stream (503).
    let _ = spare;
    for _ in 0..10 {
        send(&m.shop_client, "198.51.100.251:80", 4096)?;
    }
    let eps = m.a.status()?["endpoints"].clone();
    ensure!(eps["198.51.100.13:9000"]["failures"].as_u64().unwrap_or(0) >= 1, "{eps}");
    ensure!(eps["198.51.100.14:9000"]["picked"].as_u64().unwrap_or(0) >= 10, "{eps}");
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundFailed")? == 0);

    // Two healthy endpoints share the load.
    let _echo2 = spare.start_echo(ECHO_PORT)?;
    std::thread::sleep(std::time::Duration::from_secs(6)); // past the ejection
    for _ in 0..20 {
        send(&m.shop_client, "198.51.100.251:80", 1024)?;
    }
    let eps = m.a.status()?["endpoints"].clone();
    let picked = |a: &str| eps[a]["picked"].as_u64().unwrap_or(0);
    ensure!(picked("198.51.100.13:9000") >= 3 && picked("198.51.100.14:9000") >= 13, "{eps}");
    Ok(())
}
