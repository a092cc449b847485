//! Issue: the kernel data path — inbound capture (sk_lookup), socket-to-socket
//! acceleration (sockhash + sk_msg) and enrollment that heals itself.

mod common;

use std::{collections::BTreeMap, os::unix::fs::MetadataExt, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use mesh_e2e::{Agent, wait_until};
use serde_json::Value;

/// A plaintext client outside the mesh -> an enrolled server pod: the
/// connection reaches the app through the agent's 15006 listener, and the app
/// sees it. Tunnel traffic is not captured a second time.
fn plaintext_inbound_is_captured(accelerate: bool) -> Result<()> {
    let m = mesh("capture", accelerate, &["shop"])?;
    send(&m.legacy_client, &server(&m.shop_server), 4 << 20)?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")? == 1);
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inbound")? == 0);
    // The application accepted the connection, from the agent inside its pod.
    let accepted: Vec<String> = m.echoes[0]
        .stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["accepted"].as_str().map(str::to_owned))
        .collect();
    ensure!(accepted.len() == 1 && accepted[0].starts_with("198.51.100.12:"), "{accepted:?}");

    // Through the tunnel: delivered once, not captured again on the way in.
    send(&m.shop_client, &server(&m.shop_server), 1 << 20)?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inbound")? == 1);
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")? == 1);

    // A pod outside the mesh is not captured.
    send(&m.shop_client, &server(&m.legacy_server), 64 << 10)?;
    let p = pod_json(&m.b, "legacy", "legacy-server")?;
    ensure!(p["proxy"]["inboundPlaintext"] == 0 && p["inboundCapture"] == false, "{p}");
    // A port nothing listens on is refused, as without the mesh.
    let out = m.legacy_client.run("meshtest", ["send", "--to", "198.51.100.12:9999", "--bytes", "10"])?;
    ensure!(!out.status.success(), "connection to a closed port succeeded");
    Ok(())
}
both_paths!(plaintext_inbound_is_captured);

/// Transfers of several sizes, half-close, a reset and 200 concurrent
/// connections all deliver exactly the bytes sent; afterwards no connection
/// and no sockhash entry is left behind.
fn transfers_deliver_exact_bytes(accelerate: bool) -> Result<()> {
    let m = mesh("sizes", accelerate, &["shop"])?;
    let to = server(&m.shop_server);
    for bytes in [1u64, 64 << 10, 50 << 20] {
        // `send` half-closes after writing and reads the echo to EOF.
        let r = send(&m.shop_client, &to, bytes).with_context(|| format!("{bytes} bytes"))?;
        ensure!(r["received"] == bytes, "{r}");
    }
    let out = m.shop_client.run("meshtest", ["reset", "--to", &to])?;
    parse_ok(&m.shop_client, &out)?;
    let out = m.shop_client.run(
        "meshtest",
        ["burst", "--to", &to, "--connections", "200", "--bytes", &(64u64 << 10).to_string()],
    )?;
    let r = parse_ok(&m.shop_client, &out)?;
    ensure!(r["succeeded"] == 200, "{r}");
    send(&m.shop_client, &to, 1 << 20).context("after the reset and the burst")?;
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == 205);
    for agent in [&m.a, &m.b] {
        wait_until(SETTLE, || {
            let s = agent.status()?;
            Ok(s["openConnections"] == 0 && s["ebpf"]["acceleratedSockets"] == 0)
        })
        .with_context(|| format!("{} kept connections or sockhash entries: {}", agent.node(), agent.status().unwrap_or_default()))?;
    }
    Ok(())
}
both_paths!(transfers_deliver_exact_bytes);

/// With acceleration on, an open in-pod connection's two ends are in the
/// sockhash (the bytes skip the TCP/IP stack); with it off, nothing is.
fn acceleration_follows_the_switch(accelerate: bool) -> Result<()> {
    let m = mesh("accel", accelerate, &["shop"])?;
    let hold = Hold::start(&m.shop_client, &server(&m.shop_server), m.tb.dir(), "accel")?;
    for agent in [&m.a, &m.b] {
        let s = agent.status()?;
        ensure!(s["ebpf"]["acceleration"] == if accelerate { "on" } else { "off" }, "{s}");
        let n = s["ebpf"]["acceleratedSockets"].as_u64().context("acceleratedSockets")?;
        // node-a: the app's socket and the agent's accepted one (15001);
        // node-b: the agent's socket to the app and the app's accepted one.
        ensure!(n == if accelerate { 2 } else { 0 }, "{}: {n} accelerated sockets", agent.node());
    }
    hold.finish()?;
    Ok(())
}
both_paths!(acceleration_follows_the_switch);

/// The agent's tunnel between two pods of one node moves its bytes socket to
/// socket by default (`--accelerate tunnels`): with a connection open, the
/// tunnel's two sockets are in the sockhash and the apps' are not; a 50 MB
/// transfer arrives exact while hardly any of it crosses the client pod's
/// interface; sizes, half-close, a reset and a burst of 200 connections
/// arrive exact; the destination still names the client's verified
/// identity; nothing is left behind. A tunnel to the other node never
/// joins. With `--accelerate off` the same transfer crosses the interface
/// in full (what makes the measurement mean something).
fn same_node_tunnel(flag: &[&str], accelerated: bool) -> Result<()> {
    let mut m = mesh_with(
        if accelerated { "tunaccel" } else { "tunplain" },
        &MeshOpts { accelerate_flag: Some(flag), enrolled: &["shop"], ..MeshOpts::default() },
    )?;
    let local = m.tb.add_pod(mesh_e2e::PodSpec::new("shop-local", "shop", "node-a", [198, 51, 100, 13].into()))?;
    let _echo = local.start_echo(ECHO_PORT)?;
    m.tb.write_config(&m.tb.config_path(), &["shop"])?;
    wait_until(SETTLE, || Ok(m.a.status()?["config"]["generation"] == 2))?;
    wait_enrolled(&m.a, "shop", "shop-local", true)?;
    let expected = if accelerated { "tunnels" } else { "off" };
    for agent in [&m.a, &m.b] {
        ensure!(agent.status()?["ebpf"]["acceleration"] == expected, "{}", agent.status()?);
    }
    let accelerated_sockets = |agent: &Agent| -> Result<u64> {
        agent.status()?["ebpf"]["acceleratedSockets"].as_u64().context("acceleratedSockets")
    };

    // Across nodes: never.
    let far = Hold::start(&m.shop_client, &server(&m.shop_server), m.tb.dir(), "far")?;
    for agent in [&m.a, &m.b] {
        ensure!(accelerated_sockets(agent)? == 0, "{}: a cross-node tunnel was accelerated", agent.node());
    }
    far.finish()?;

    // On one node: the tunnel's two sockets (the client pod's end and the
    // one its listener accepted), not the apps'.
    let to = server(&local);
    let near = Hold::start(&m.shop_client, &to, m.tb.dir(), "near")?;
    ensure!(accelerated_sockets(&m.a)? == if accelerated { 2 } else { 0 }, "node-a: {}", m.a.status()?);
    ensure!(accelerated_sockets(&m.b)? == 0);
    near.finish()?;

    let before = tx_bytes(&m.shop_client)?;
    let r = send(&m.shop_client, &to, 50 << 20)?;
    ensure!(r["received"] == 50u64 << 20, "{r}");
    let crossed = tx_bytes(&m.shop_client)? - before;
    if accelerated {
        ensure!(crossed < 5 << 20, "{crossed} bytes crossed the client pod's interface for a 50 MB transfer");
    } else {
        ensure!(crossed > 50 << 20, "only {crossed} bytes crossed the client pod's interface for a 50 MB transfer");
    }
    for bytes in [1u64, 64 << 10] {
        let r = send(&m.shop_client, &to, bytes).with_context(|| format!("{bytes} bytes"))?;
        ensure!(r["received"] == bytes, "{r}");
    }
    let out = m.shop_client.run("meshtest", ["reset", "--to", &to])?;
    parse_ok(&m.shop_client, &out)?;
    let out = m.shop_client.run("meshtest", ["burst", "--to", &to, "--connections", "200", "--bytes", &(64u64 << 10).to_string()])?;
    ensure!(parse_ok(&m.shop_client, &out)?["succeeded"] == 200);
    let client_id = spiffe("shop", "default");
    let peers = pod_status(&m.a, "shop", "shop-local")?.proxy.inbound_peers;
    ensure!(peers.get(&client_id).copied().unwrap_or(0) >= 200, "inbound peers of shop-local: {peers:?}");
    // The pooled tunnel connections close once idle, and their sockets
    // leave the sockhash with them.
    wait_until(SETTLE, || Ok(accelerated_sockets(&m.a)? == 0 && m.a.status()?["openConnections"] == 0))
        .with_context(|| format!("node-a kept sockhash entries or connections: {}", m.a.status().unwrap_or_default()))?;
    Ok(())
}

#[test]
fn same_node_tunnels_are_accelerated_by_default() -> Result<()> {
    same_node_tunnel(&[], true)
}

#[test]
fn same_node_tunnels_are_plain_with_acceleration_off() -> Result<()> {
    same_node_tunnel(&["--accelerate", "off"], false)
}

/// Bytes sent on `eth0` of `pod`'s namespace so far (`/proc/net/dev`).
fn tx_bytes(pod: &mesh_e2e::Pod) -> Result<u64> {
    let out = pod.run("cat", ["/proc/net/dev"])?;
    let text = String::from_utf8(out.stdout)?;
    let line = text.lines().find(|l| l.trim_start().starts_with("eth0:")).with_context(|| format!("no eth0 in {text}"))?;
    let fields: Vec<&str> = line.split(':').nth(1).unwrap_or_default().split_whitespace().collect();
    // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit bytes.
    fields.get(8).context("eth0: no transmit bytes")?.parse().context("eth0 transmit bytes")
}

/// A cgroup link an agent holds: (link id, cgroup inode, attach type).
type CgroupLink = (u32, u64, u32);

/// The eBPF objects an agent process holds, from /proc/PID/fdinfo: map ids
/// and cgroup links.
fn agent_bpf_objects(agent: &Agent) -> Result<(Vec<u32>, Vec<CgroupLink>)> {
    let mut maps = Vec::new();
    let mut links = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{}/fdinfo", agent.pid()))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else { continue };
        let fields: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        if let Some(id) = fields.get("map_id") {
            maps.push(id.parse()?);
        }
        if fields.get("link_type") == Some(&"cgroup")
            && let (Some(id), Some(cg), Some(at)) =
                (fields.get("link_id"), fields.get("cgroup_id"), fields.get("attach_type"))
        {
            links.push((id.parse()?, cg.parse()?, at.parse()?));
        }
    }
    Ok((maps, links))
}

fn bpftool(args: &[&str]) -> Result<String> {
    let out = Command::new("bpftool").args(args).output().context("running bpftool (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn map_named(agent: &Agent, name: &str) -> Result<u32> {
    for id in agent_bpf_objects(agent)?.0 {
        let info: Value = serde_json::from_str(&bpftool(&["-j", "map", "show", "id", &id.to_string()])?)?;
        if info["name"] == name {
            return Ok(id);
        }
    }
    bail!("agent {} holds no map named {name}", agent.node())
}

fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

fn repairs(agent: &Agent) -> Result<u64> {
    agent.status()?["repairs"].as_u64().context("repairs missing")
}

/// Someone deletes the pod's enrollment entry behind the agent's back: the
/// agent puts it back within its reconcile interval, counts the repair, and
/// new connections are redirected again.
#[test]
fn drift_repair_restores_a_deleted_map_entry() -> Result<()> {
    let m = mesh("driftmap", true, &["shop"])?;
    let id = map_named(&m.a, "ENROLLED")?.to_string();
    let dump: Value = serde_json::from_str(&bpftool(&["-j", "map", "dump", "id", &id])?)?;
    let entries = dump.as_array().context("map dump")?;
    ensure!(entries.len() == 1, "node-a has one enrolled pod: {dump}");
    let key: Vec<String> = entries[0]["key"]
        .as_array()
        .context("key bytes")?
        .iter()
        .map(|b| b.as_str().map(str::to_owned).context("hex byte"))
        .collect::<Result<_>>()?;
    let before = repairs(&m.a)?;
    let mut args = vec!["map", "delete", "id", &id, "key", "hex"];
    args.extend(key.iter().map(|b| b.trim_start_matches("0x")));
    bpftool(&args)?;
    wait_until(SETTLE, || Ok(repairs(&m.a)? > before)).context("no repair counted")?;
    ensure!(m.a.log().contains("drift repaired"), "repair not logged");
    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == 1, "not redirected after repair");
    Ok(())
}

/// Someone detaches the pod's programs behind the agent's back: the agent
/// re-attaches them within its reconcile interval and new connections are
/// redirected again.
#[test]
fn drift_repair_reattaches_detached_programs() -> Result<()> {
    let m = mesh("driftprog", true, &["shop"])?;
    let cg = cgroup_id(m.shop_client.cgroup_path())?;
    let links: Vec<_> = agent_bpf_objects(&m.a)?.1.into_iter().filter(|(_, c, _)| *c == cg).collect();
    ensure!(links.len() == 3, "connect4, connect6, sock_ops on the pod's cgroup: {links:?}");
    let before = repairs(&m.a)?;
    for (id, _, _) in &links {
        bpftool(&["link", "detach", "id", &id.to_string()])?;
    }
    wait_until(SETTLE, || Ok(repairs(&m.a)? > before)).context("no repair counted")?;
    wait_until(SETTLE, || Ok(pod_json(&m.a, "shop", "shop-client")?["attached"] == true))?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;
    ensure!(counter(&m.a, "shop", "shop-client", "ebpf.redirected")? == 1, "not redirected after repair");
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == 1);
    Ok(())
}

/// A pod the agent cannot enrol (its network namespace is missing) is
/// reported with the reason, and the others are served.
#[test]
fn a_pod_that_cannot_be_enrolled_is_reported() -> Result<()> {
    let m = mesh("badpod", true, &["shop"])?;
    let path = m.tb.config_path();
    let text = std::fs::read_to_string(&path)?;
    let broken = text.replacen(&m.shop_client.netns_path().display().to_string(), "/run/netns/does-not-exist", 1);
    std::fs::write(&path, broken)?;
    wait_until(SETTLE, || Ok(pod_json(&m.a, "shop", "shop-client")?["error"].is_string()))?;
    let err = pod_json(&m.a, "shop", "shop-client")?["error"].as_str().unwrap_or_default().to_owned();
    ensure!(err.contains("/run/netns/does-not-exist"), "{err}");
    ensure!(m.a.status()?["ready"] == false, "ready while a pod cannot be enrolled");
    // node-b is unaffected.
    send(&m.legacy_client, &server(&m.shop_server), 64 << 10)?;
    let _ = Duration::ZERO;
    Ok(())
}

/// `mesh-agent status` lists the node's pods with their enrollment, attach
/// state, listeners and redirect counters.
#[test]
fn status_command_lists_pods_and_counters() -> Result<()> {
    let m = mesh("statuscmd", false, &["shop"])?;
    send(&m.shop_client, &server(&m.shop_server), 1024)?;
    let out = Command::new(mesh_e2e::agent_bin()?)
        .args(["status", "--admin", &m.a.admin().to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let row = text.lines().find(|l| l.starts_with("shop/shop-client")).with_context(|| text.to_string())?;
    let cols: Vec<&str> = row.split_whitespace().collect();
    // POD IP ENROLLED ATTACHED CAPTURE REDIRECTED PASSED OUTBOUND INBOUND LISTENERS
    ensure!(cols[1] == "198.51.100.11" && cols[2] == "true" && cols[3] == "true" && cols[4] == "true", "{row}");
    ensure!(cols[5] == "1" && cols[7] == "1", "{row}");
    ensure!(row.contains(":15001") && row.contains(":15008") && row.contains(":15006"), "{row}");
    let legacy = text.lines().find(|l| l.starts_with("legacy/legacy-client")).with_context(|| text.to_string())?;
    ensure!(legacy.split_whitespace().nth(2) == Some("false"), "{legacy}");
    Ok(())
}
