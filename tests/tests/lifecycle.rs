//! The agent's lifecycle: kernel state outlives the agent, so an enrolled pod
//! fails closed while no agent serves it (or, with failure policy `open`,
//! goes direct); a restarted agent adopts the pinned state; `mesh-agent
//! uninstall` returns the node to direct traffic; readiness tells the truth.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_e2e::{Agent, PeerAuthMode, PeerAuthenticationEntry, wait_until};

/// Connections from `from` to `to` refused `n` times in a row.
fn refused_n(from: &mesh_e2e::Pod, to: &str, n: usize) -> Result<()> {
    for i in 0..n {
        send_refused(from, to, 1024).with_context(|| format!("attempt {i}"))?;
    }
    Ok(())
}

/// TCP segments on the fabric from `client` to `port` of `server` (SYNs
/// included): a connection attempt that left the pod at all.
fn segments_to(frames: &mesh_e2e::Frames, client: std::net::Ipv4Addr, server: std::net::Ipv4Addr, port: u16) -> usize {
    frames.tcp_segments().filter(|s| s.src.0 == client && s.dst == (server, port)).count()
}

fn uninstall(m: &Mesh, node: &str) -> Result<std::process::Output> {
    let mut args = vec!["uninstall".to_owned(), "--node".into(), node.into()];
    args.extend(m.tb.node_state_args());
    Agent::run_once(&mesh_e2e::agent_bin()?, &args)
}

/// The source agent down (SIGKILL, then SIGTERM of its successor): the
/// enrolled pod's new connections are refused and nothing of them crosses
/// the fabric in plaintext; a restarted agent adopts the pinned state and
/// serves; `uninstall` is refused while an agent runs and afterwards the pod
/// connects directly.
#[test]
fn source_agent_down_fails_closed_and_uninstall_opens() -> Result<()> {
    let m = mesh("srcdown", false, &["shop"])?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;

    let cap = m.tb.capture_fabric()?;
    m.a.kill()?;
    refused_n(&m.shop_client, &server(&m.shop_server), 5).context("to a mesh pod while node-a's agent is dead")?;
    refused_n(&m.shop_client, &server(&m.legacy_server), 3).context("to a pod outside the mesh")?;
    let frames = cap.stop()?;
    for to in [&m.shop_server, &m.legacy_server] {
        let n = segments_to(&frames, m.shop_client.ip(), to.ip(), ECHO_PORT);
        ensure!(n == 0, "{n} plaintext segments from shop-client to {}:{ECHO_PORT} on the wire", to.ip());
    }
    // The unenrolled pod on the same node is untouched.
    send(&m.legacy_client, &server(&m.legacy_server), 64 << 10).context("legacy pod while the agent is dead")?;

    let a2 = m.tb.start_agent_args("node-a", &agent_args(false))?;
    ensure!(a2.log().contains("adopted pinned links"), "no adoption logged: {}", a2.log());
    wait_enrolled(&a2, "shop", "shop-client", true)?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;
    ensure!(counter(&a2, "shop", "shop-client", "proxy.outboundTunneled")? == 1);
    let refused = uninstall(&m, "node-a")?;
    ensure!(!refused.status.success(), "uninstall ran while an agent serves the node");
    let err = String::from_utf8_lossy(&refused.stderr);
    ensure!(err.contains("an agent for node node-a is running"), "{err}");

    let status = a2.stop()?;
    ensure!(status.success(), "graceful stop exited with {status}: {}", a2.log());
    ensure!(a2.log().contains("drained"), "no drain in the log");
    refused_n(&m.shop_client, &server(&m.shop_server), 3).context("after SIGTERM")?;

    let out = uninstall(&m, "node-a")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(stdout.contains("pods connect directly again"), "{stdout}");
    ensure!(!m.tb.bpffs().join("nodemesh/node-a").exists(), "pinned state left after uninstall");
    ensure!(m.tb.bpffs().join("nodemesh/node-b").exists(), "uninstall of node-a touched node-b");
    let inbound = counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10).context("after uninstall")?;
    // Direct: it reached node-b in plaintext (captured there), not through a tunnel.
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")? == inbound + 1);
    Ok(())
}

/// `--failure-policy open`: while the agent is down the pod's connections
/// go direct, the documented opposite of the default.
#[test]
fn failure_policy_open_goes_direct_while_the_agent_is_down() -> Result<()> {
    let m = mesh_with(
        "failopen",
        &MeshOpts { enrolled: &["shop"], node_args: &[("node-a", &["--failure-policy", "open"])], ..MeshOpts::default() },
    )?;
    ensure!(pod_json(&m.a, "shop", "shop-client")?["failurePolicy"] == "open");
    ensure!(pod_json(&m.b, "shop", "shop-server")?["failurePolicy"] == "closed");
    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;
    let plaintext = counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")?;
    m.a.kill()?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10).context("fail open, agent dead")?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")? == plaintext + 1, "not direct");
    // Restarted, it serves again through the tunnel.
    let a2 = m.tb.start_agent_args("node-a", &[agent_args(false), vec!["--failure-policy", "open"]].concat())?;
    wait_enrolled(&a2, "shop", "shop-client", true)?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;
    ensure!(counter(&a2, "shop", "shop-client", "proxy.outboundTunneled")? == 1);
    Ok(())
}

/// SIGKILL of the destination agent with STRICT: plaintext from a pod
/// outside the mesh and tunnels from the mesh reach the app 0 times during
/// the gap; the restarted agent serves with identity and refuses plaintext.
#[test]
fn destination_agent_killed_with_strict_lets_nothing_in() -> Result<()> {
    let strict = PeerAuthenticationEntry::namespace_wide("strict", "shop", PeerAuthMode::Strict);
    let m = mesh_with(
        "dstkill",
        &MeshOpts { enrolled: &["shop"], peer_authentications: vec![strict], ..MeshOpts::default() },
    )?;
    let shop_echo = &m.echoes[0];
    send(&m.shop_client, &server(&m.shop_server), 1024)?;
    send_refused(&m.legacy_client, &server(&m.shop_server), 1024).context("STRICT with the agent up")?;
    let before = accepted(shop_echo);

    m.b.kill()?;
    let killed = Instant::now();
    refused_n(&m.legacy_client, &server(&m.shop_server), 10).context("plaintext during the gap")?;
    refused_n(&m.shop_client, &server(&m.shop_server), 3).context("mesh client during the gap")?;
    ensure!(accepted(shop_echo) == before, "a connection reached the app while no agent served it");

    let b2 = m.tb.start_agent_args("node-b", &agent_args(false))?;
    wait_enrolled(&b2, "shop", "shop-server", true)?;
    eprintln!("destination agent serving again {:?} after SIGKILL", killed.elapsed());
    send(&m.shop_client, &server(&m.shop_server), 1024).context("after the restart")?;
    let p = pod_status(&b2, "shop", "shop-server")?;
    ensure!(p.proxy.inbound_peers.contains_key(&spiffe("shop", "default")), "{:?}", p.proxy.inbound_peers);
    send_refused(&m.legacy_client, &server(&m.shop_server), 1024).context("STRICT after the restart")?;
    ensure!(accepted(shop_echo) == before + 1, "exactly the one mesh connection reached the app");
    Ok(())
}

/// A restarted agent switches the pinned links to its own programs (here a
/// different object: acceleration on): the kernel reports exactly one of
/// our programs per hook per pod and the pod is redirected to the new agent.
/// (Drift repair on pinned links: `kernel.rs`.)
#[test]
fn restart_replaces_programs_in_place() -> Result<()> {
    let m = mesh("upgrade", false, &["shop"])?;
    m.a.stop()?;
    let a2 = m.tb.start_agent_args("node-a", &agent_args(true))?;
    wait_enrolled(&a2, "shop", "shop-client", true)?;
    let cgroup = m.shop_client.cgroup_path().to_owned();
    // bpftool names them `connect4` or `cgroup_inet4_connect` by version.
    for attach in [["connect4", "cgroup_inet4_connect"], ["connect6", "cgroup_inet6_connect"], ["sock_ops", "cgroup_sock_ops"]] {
        let (progs, raw) = attached(&cgroup, &attach)?;
        ensure!(progs.len() == 1, "{attach:?}: {progs:?} in {raw}");
    }
    // The link's program is the new agent's: the pod is redirected to it.
    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;
    ensure!(counter(&a2, "shop", "shop-client", "proxy.outboundTunneled")? == 1);
    Ok(())
}

/// Programs attached to `cgroup` for `attach` (bpftool's names), by id,
/// and bpftool's whole answer.
fn attached(cgroup: &std::path::Path, attach: &[&str]) -> Result<(Vec<u64>, String)> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .context("bpftool")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool cgroup show")?;
    let ids = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["attach_type"].as_str().is_some_and(|t| attach.contains(&t)))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    Ok((ids, v.to_string()))
}

/// With the CA down a fresh agent serves its admin API but is not ready:
/// `/ready` 503, no ready line, the pod shown waiting for its certificate
/// and still redirected (fail closed); ready once the CA is back.
#[test]
fn ready_waits_for_the_certificate() -> Result<()> {
    let m = mesh("certwait", false, &["shop"])?;
    m.ca.stop()?;
    m.a.stop()?;
    let a2 = m.tb.start_agent_unready("node-a", &agent_args(false))?;
    let pending = |a: &Agent| -> Result<bool> { Ok(pod_json(a, "shop", "shop-client")?["certificatePending"] == true) };
    wait_until(SETTLE, || pending(&a2))?;
    for _ in 0..10 {
        let (code, _) = a2.get("/ready")?;
        ensure!(code == 503, "/ready {code} while the pod waits for its certificate");
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(!a2.printed_ready(), "ready line printed: {}", a2.stdout());
    let s = a2.status()?;
    ensure!(s["notReady"][0]["reason"] == "certificate pending", "{s}");
    ensure!(pod_json(&a2, "shop", "shop-client")?["enrolled"] == true, "not redirected while waiting");
    send_refused(&m.shop_client, &server(&m.shop_server), 1024).context("no certificate: fail closed")?;
    m.ca.restart()?;
    a2.wait_ready(SETTLE)?;
    ensure!(a2.get("/ready")?.0 == 200);
    send(&m.shop_client, &server(&m.shop_server), 1024)?;
    Ok(())
}

/// An HTTP app that reports the identity the mesh vouched for
/// (`x-mesh-peer-identity`, or `none`) in `x-backend`.
const IDENTITY_APP: &str = r#"
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        who = self.headers.get('x-mesh-peer-identity', 'none')
        self.send_response(200)
        self.send_header('x-backend', who)
        self.send_header('content-length', '2')
        self.end_headers()
        self.wfile.write(b'ok')
    def log_message(self, *a): pass
print("listening", flush=True)
ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

/// Steady HTTP load during a restart of one node's agent (the new agent
/// started beside the old one, as a DaemonSet surge does): keep-alive to the
/// service address and new connections to the pod address; 0 failed
/// requests and every request at the app with the verified identity; a raw
/// TCP connection opened before keeps flowing and closes cleanly.
fn restart_under_load(test: &str, node: &str) -> Result<()> {
    let mut m = mesh(test, false, &["shop"])?;
    let _app = serve_http_app(&mut m, IDENTITY_APP)?;
    m.tb.write_config(&m.tb.config_path(), &["shop"])?;
    wait_until(SETTLE, || Ok(m.a.status()?["config"]["generation"] == 2 && m.b.status()?["config"]["generation"] == 2))?;
    // Keep-alive HTTP/1.1 and h2c to the service address, new HTTP/1.1
    // connections every third request to the pod address.
    let pod_url = format!("http://{}:8080/", m.shop_server.ip());
    let loads = [
        ("http://198.51.100.100:80/", "0", false),
        ("http://198.51.100.100:80/", "0", true),
        (pod_url.as_str(), "3", false),
    ]
    .map(|(url, fresh, h2)| {
        let mut args = vec!["load", "--url", url, "--requests", "150", "--interval-ms", "20", "--fresh-every", fresh];
        if h2 {
            args.push("--http2");
        }
        m.shop_client.spawn("meshhttp", args)
    });
    let hold = Hold::start(&m.shop_client, &server(&m.shop_server), m.tb.dir(), "restart")?;
    std::thread::sleep(Duration::from_millis(700));
    let old = if node == "node-a" { &m.a } else { &m.b };
    let started = Instant::now();
    let new = m.tb.start_agent_args(node, &agent_args(false))?;
    eprintln!("{node}: the new agent took over and was ready {:?} after it started", started.elapsed());
    ensure!(new.log().contains("taking over from the running agent"), "no handoff: {}", new.log());
    hold.wait_roundtrips(20).context("long-lived connection across the handoff")?;
    ensure!(hold.finish()? >= 30);
    // The old agent drains and exits by itself.
    wait_until(SETTLE, || Ok(old.try_wait()?.is_some())).context("the old agent did not exit after handing over")?;
    ensure!(old.log().contains("handoff: the new agent took over"), "{}", old.log());
    let identity = spiffe("shop", "default");
    for (i, l) in loads.into_iter().enumerate() {
        let out = l?.wait_output(Duration::from_secs(60))?;
        let v = parse_ok(&m.shop_client, &out).with_context(|| format!("load {i}"))?;
        ensure!(v["status"]["200"] == 150, "load {i}: {v}");
        ensure!(v["backend"][&identity] == 150, "load {i}: requests at the app without the verified identity: {v}");
        if i == 1 && node == "node-a" {
            // The old agent's GOAWAY moved the h2 client to a new connection.
            ensure!(v["reconnects"].as_u64() >= Some(1), "load {i}: no GOAWAY seen: {v}");
        }
    }
    // The new agent serves the same admin address and the node.
    ensure!(new.admin() == old.admin(), "admin listener not handed over");
    send(&m.shop_client, &server(&m.shop_server), 1024)?;
    Ok(())
}

#[test]
fn source_agent_restart_under_load_drops_nothing() -> Result<()> {
    restart_under_load("rstsrc", "node-a")
}

#[test]
fn destination_agent_restart_under_load_drops_nothing() -> Result<()> {
    restart_under_load("rstdst", "node-b")
}
