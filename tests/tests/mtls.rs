//! Issue 4: workload identity and mutual TLS between node agents, end to end
//! (root). Each test has its own testbed with a CA (`mesh-agent ca`) and two
//! agents; `common::mesh` starts the CA for every other e2e test too.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_e2e::{CaOptions, PeerAuthMode, PeerAuthenticationEntry, PodSpec, Status, wait_for, wait_until};
use serde_json::Value;

/// Certificates can take a CA retry backoff to arrive: more than SETTLE.
const CERT_DEADLINE: Duration = Duration::from_secs(90);
/// The tunnel port on every enrolled pod.
const TUNNEL_PORT: u16 = 15008;

/// A string no other traffic contains.
fn marker() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("MESH-E2E-CLEARTEXT-MARKER-{:x}-{nanos:x}", std::process::id())
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, last)
}

/// The pod's certificate view; fails if the agent reports none.
fn certificate(agent: &mesh_e2e::Agent, ns: &str, name: &str) -> Result<mesh_e2e::CertificateStatus> {
    pod_status(agent, ns, name)?
        .certificate
        .with_context(|| format!("{ns}/{name} on {}: no `certificate` in /status", agent.node()))
}

fn tls(agent: &mesh_e2e::Agent) -> Result<mesh_e2e::TlsStatus> {
    agent.status_typed()?.tls.with_context(|| format!("{}: no `tls` in /status", agent.node()))
}

/// Cross-node traffic between enrolled pods is TLS on the wire: a capture on
/// the fabric bridge sees the tunnel's bytes but never the marker the client
/// sent in cleartext. The same marker between two pods outside the mesh is
/// in the capture, which proves the capture sees payloads.
#[test]
fn tunnel_traffic_is_encrypted_on_the_wire() -> Result<()> {
    let m = mesh("mtls_wire", false, &["shop"])?;
    let marker = marker();
    let bytes: u64 = 256 << 10;

    let cap = m.tb.capture_fabric()?;
    send_pattern(&m.shop_client, &server(&m.shop_server), bytes, &marker)?;
    let frames = cap.stop()?;
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == 1, "not tunneled");
    ensure!(frames.drops == 0, "the capture dropped {} frames: inconclusive", frames.drops);
    let tunneled = frames.tcp_payload_between(m.shop_client.ip(), m.shop_server.ip(), TUNNEL_PORT);
    // The payload went out and came back, encrypted and framed: at least as
    // many bytes as the cleartext both ways.
    ensure!(
        tunneled >= 2 * bytes,
        "the capture saw only {tunneled} tunnel bytes for a {bytes}-byte echo ({} frames, {} bytes)",
        frames.frames.len(),
        frames.total_bytes()
    );
    ensure!(
        frames.tcp_payload_between(m.shop_client.ip(), m.shop_server.ip(), ECHO_PORT) == 0,
        "the app's port appeared on the wire: the connection did not go through the tunnel"
    );
    ensure!(!frames.contains(marker.as_bytes()), "the cleartext marker is on the wire between enrolled pods");

    // Control: outside the mesh, the same bytes are plaintext on the bridge.
    let cap = m.tb.capture_fabric()?;
    send_pattern(&m.legacy_client, &server(&m.legacy_server), bytes, &marker)?;
    let frames = cap.stop()?;
    ensure!(
        frames.contains(marker.as_bytes()),
        "the capture does not show the marker sent in plaintext between unenrolled pods ({} frames, {} bytes): \
         it cannot prove anything",
        frames.frames.len(),
        frames.total_bytes()
    );
    Ok(())
}

/// With distinct service accounts, each side of a tunnel verified the other's
/// SPIFFE ID: the server pod saw exactly the client's identity on its inbound
/// streams, the client pod's outbound tunnel verified exactly the server's.
#[test]
fn both_ends_verify_each_others_identity() -> Result<()> {
    let m = mesh_with(
        "mtls_ids",
        &MeshOpts { enrolled: &["shop"], named_service_accounts: true, ..MeshOpts::default() },
    )?;
    let client_id = spiffe("shop", "shop-client");
    let server_id = spiffe("shop", "shop-server");
    let c = pod_status(&m.a, "shop", "shop-client")?;
    let s = pod_status(&m.b, "shop", "shop-server")?;
    ensure!(c.identity.as_deref() == Some(client_id.as_str()), "client identity: {:?}", c.identity);
    ensure!(s.identity.as_deref() == Some(server_id.as_str()), "server identity: {:?}", s.identity);
    ensure!(c.proxy.outbound_peers.is_empty() && s.proxy.inbound_peers.is_empty(), "peers before any traffic");

    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;
    send(&m.shop_client, &server(&m.shop_server), 1 << 10)?;
    let want_in = BTreeMap::from([(client_id.clone(), 2u64)]);
    let want_out = BTreeMap::from([(server_id.clone(), 2u64)]);
    // Counted per stream; possibly as the stream ends, just after the client.
    wait_until(SETTLE, || {
        let s = pod_status(&m.b, "shop", "shop-server")?;
        let c = pod_status(&m.a, "shop", "shop-client")?;
        Ok(s.proxy.inbound_peers == want_in && c.proxy.outbound_peers == want_out)
    })
    .with_context(|| {
        format!(
            "peers: server inboundPeers {:?}, client outboundPeers {:?}",
            pod_status(&m.b, "shop", "shop-server").map(|p| p.proxy.inbound_peers).unwrap_or_default(),
            pod_status(&m.a, "shop", "shop-client").map(|p| p.proxy.outbound_peers).unwrap_or_default()
        )
    })?;
    // Nothing attributed the other way round.
    ensure!(pod_status(&m.a, "shop", "shop-client")?.proxy.inbound_peers.is_empty());
    ensure!(pod_status(&m.b, "shop", "shop-server")?.proxy.outbound_peers.is_empty());
    for agent in [&m.a, &m.b] {
        let t = tls(agent)?;
        ensure!(t.verified >= 1, "{}: no verified handshake: {t:?}", agent.node());
        ensure!(t.rejected.values().all(|n| *n == 0), "{}: rejections: {t:?}", agent.node());
    }
    // Pods outside the mesh have no identity-bearing traffic.
    let legacy = pod_status(&m.a, "legacy", "legacy-client")?;
    ensure!(legacy.proxy.outbound_peers.is_empty(), "{:?}", legacy.proxy.outbound_peers);
    Ok(())
}

/// With certificates living 4 s, the agents rotate them at half-life, several
/// times, while one long-lived connection and a stream of new connections
/// keep working without a single failure.
#[test]
fn certificates_rotate_under_traffic() -> Result<()> {
    let m = mesh_with(
        "mtls_rotate",
        &MeshOpts {
            enrolled: &["shop"],
            ca: CaOptions::new().ttl("4s"),
            agent_args: &["--cert-ttl", "4s"],
            ..MeshOpts::default()
        },
    )?;
    let pods = [(&m.a, "shop-client"), (&m.b, "shop-server")];
    let hold = Hold::start(&m.shop_client, &server(&m.shop_server), m.tb.dir(), "rotate")?;
    let start: Vec<u64> = pods
        .iter()
        .map(|(agent, name)| certificate(agent, "shop", name).map(|c| c.fetched))
        .collect::<Result<_>>()?;
    let first_serials: Vec<Value> = pods
        .iter()
        .map(|(agent, name)| certificate(agent, "shop", name).map(|c| c.serial))
        .collect::<Result<_>>()?;
    let mut connections = 0u64;
    wait_until(CERT_DEADLINE, || {
        send(&m.shop_client, &server(&m.shop_server), 16 << 10)
            .with_context(|| format!("new connection #{} during rotation", connections + 1))?;
        connections += 1;
        let mut rotated = true;
        for ((agent, name), start) in pods.iter().zip(&start) {
            rotated &= certificate(agent, "shop", name)?.fetched >= start + 3;
        }
        Ok(rotated)
    })
    .with_context(|| {
        format!(
            "certificates did not rotate 3 times: client {:?}, server {:?}",
            certificate(&m.a, "shop", "shop-client").ok(),
            certificate(&m.b, "shop", "shop-server").ok()
        )
    })?;
    hold.wait_roundtrips(10).context("the long-lived connection after the rotations")?;
    let roundtrips = hold.finish()?;
    ensure!(roundtrips > 0);
    for ((agent, name), first) in pods.iter().zip(&first_serials) {
        let c = certificate(agent, "shop", name)?;
        ensure!(c.errors == 0, "{name}: CA errors during rotation: {c:?}");
        ensure!(c.serial != *first, "{name}: the serial never changed: {c:?}");
        ensure!(c.not_after.is_some(), "{name}: {c:?}");
    }
    // Every new connection was tunneled (none fell back to plaintext).
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundTunneled")? == connections + 1);
    ensure!(counter(&m.a, "shop", "shop-client", "proxy.outboundFailed").unwrap_or(0) == 0);
    Ok(())
}

/// With the CA down, existing and new connections work on cached
/// certificates; a namespace enrolled meanwhile cannot get certificates (its
/// pods say why) and nothing else is disturbed; once the CA is back (same
/// state, same root) the new pods get theirs and their traffic works.
#[test]
fn ca_outage_is_survived_on_cached_certificates() -> Result<()> {
    let mut m = mesh("mtls_caout", false, &["shop"])?;
    let root_before = std::fs::read(m.ca.roots_path())?;
    let hold = Hold::start(&m.shop_client, &server(&m.shop_server), m.tb.dir(), "caout")?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10)?;

    m.ca.kill().context("the CA was not running")?;
    hold.wait_roundtrips(20).context("long-lived connection with the CA down")?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10).context("new connection with the CA down")?;

    // Enrol a new namespace while the CA is down.
    let extra_client = m.tb.add_pod(PodSpec::new("extra-client", "extra", "node-a", ip(31)))?;
    let extra_server = m.tb.add_pod(PodSpec::new("extra-server", "extra", "node-b", ip(32)))?;
    let _extra_echo = extra_server.start_echo(ECHO_PORT)?;
    m.tb.write_config(&m.tb.config_path(), &["shop", "extra"])?;
    for (agent, name) in [(&m.a, "extra-client"), (&m.b, "extra-server")] {
        wait_until(CERT_DEADLINE, || {
            // Listed once the agent has read the new config.
            let c = agent.pod_status("extra", name)?.and_then(|p| p.certificate);
            Ok(c.is_some_and(|c| c.errors > 0 && c.last_error.is_some() && c.not_after.is_none()))
        })
        .with_context(|| {
            format!(
                "extra/{name} on {} reports no certificate error: {}",
                agent.node(),
                pod_json(agent, "extra", name).map(|p| p.to_string()).unwrap_or_default()
            )
        })?;
    }
    // The others are served meanwhile.
    send(&m.shop_client, &server(&m.shop_server), 64 << 10).context("shop traffic while extra has no certificates")?;
    hold.wait_roundtrips(10)?;
    for agent in [&m.a, &m.b] {
        ensure!(agent.try_wait()?.is_none(), "{}'s agent exited: {}", agent.node(), agent.log());
    }

    m.ca.restart()?;
    ensure!(std::fs::read(m.ca.roots_path())? == root_before, "the CA's root changed across the restart");
    for (agent, name) in [(&m.a, "extra-client"), (&m.b, "extra-server")] {
        wait_until(CERT_DEADLINE, || Ok(certificate(agent, "extra", name)?.not_after.is_some())).with_context(|| {
            format!(
                "extra/{name} on {} got no certificate after the CA came back: {}\nCA log:\n{}",
                agent.node(),
                pod_json(agent, "extra", name).map(|p| p.to_string()).unwrap_or_default(),
                m.ca.all_logs()
            )
        })?;
        wait_enrolled(agent, "extra", name, true)?;
    }
    send(&extra_client, &format!("{}:{ECHO_PORT}", extra_server.ip()), 256 << 10)?;
    ensure!(counter(&m.a, "extra", "extra-client", "proxy.outboundTunneled")? == 1, "extra traffic not tunneled");
    let extra_id = spiffe("extra", "default");
    wait_until(SETTLE, || {
        Ok(pod_status(&m.b, "extra", "extra-server")?.proxy.inbound_peers.get(&extra_id) == Some(&1))
    })
    .context("extra-server did not see extra-client's identity")?;
    send(&m.shop_client, &server(&m.shop_server), 64 << 10).context("shop traffic after the CA returned")?;
    hold.finish()?;
    Ok(())
}

/// STRICT: a plaintext client outside the mesh is refused before the app
/// sees anything, and counted; mesh traffic still flows. Switched to
/// PERMISSIVE by editing the config, the same client is accepted.
#[test]
fn strict_refuses_plaintext_and_permissive_accepts_it() -> Result<()> {
    let strict = PeerAuthenticationEntry::selecting("strict-shop", "shop", "app", "shop-server", PeerAuthMode::Strict);
    let mut m = mesh_with(
        "mtls_strict",
        &MeshOpts { enrolled: &["shop"], peer_authentications: vec![strict.clone()], ..MeshOpts::default() },
    )?;
    let to = server(&m.shop_server);
    let echo = &m.echoes[0];

    let refused = send_refused(&m.legacy_client, &to, 64 << 10)?;
    wait_until(SETTLE, || Ok(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintextRefused")? == 1))
        .with_context(|| format!("refusal not counted ({refused}): {}", pod_json(&m.b, "shop", "shop-server").unwrap_or_default()))?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")? == 0);

    // Mesh traffic under STRICT. It also orders things: had the refused
    // connection reached the app, its accept would be logged before this one.
    send(&m.shop_client, &to, 64 << 10)?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inbound")? == 1);
    ensure!(accepted(echo) == 1, "the app saw the refused connection: {}", echo.stdout());
    // A pod the policy does not select is not affected.
    send(&m.shop_client, &server(&m.legacy_server), 1 << 10)?;

    m.tb.add_peer_authentication(PeerAuthenticationEntry { mode: PeerAuthMode::Permissive, ..strict })?;
    m.tb.write_config(&m.tb.config_path(), &["shop"])?;
    wait_until(SETTLE, || Ok(m.b.status()?["config"]["generation"] == 2))
        .with_context(|| format!("PERMISSIVE edit not applied: {}", m.b.status().unwrap_or_default()["config"]))?;
    send(&m.legacy_client, &to, 64 << 10).context("plaintext under PERMISSIVE")?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")? == 1);
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintextRefused")? == 1);
    ensure!(accepted(echo) == 2, "{}", echo.stdout());
    send(&m.shop_client, &to, 1 << 10).context("mesh traffic under PERMISSIVE")?;
    Ok(())
}

/// A policy selecting the workload beats the namespace-wide one; without the
/// workload policy, the namespace's applies.
#[test]
fn workload_policy_beats_namespace_policy() -> Result<()> {
    let mut m = mesh_with(
        "mtls_precedence",
        &MeshOpts {
            enrolled: &["shop"],
            peer_authentications: vec![
                PeerAuthenticationEntry::namespace_wide("shop-wide", "shop", PeerAuthMode::Strict),
                PeerAuthenticationEntry::selecting("server-open", "shop", "app", "shop-server", PeerAuthMode::Permissive),
            ],
            ..MeshOpts::default()
        },
    )?;
    let to = server(&m.shop_server);
    send(&m.legacy_client, &to, 64 << 10).context("PERMISSIVE workload policy under a STRICT namespace")?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")? == 1);

    ensure!(m.tb.remove_peer_authentication("shop", "server-open"));
    m.tb.write_config(&m.tb.config_path(), &["shop"])?;
    wait_until(SETTLE, || Ok(m.b.status()?["config"]["generation"] == 2))?;
    send_refused(&m.legacy_client, &to, 64 << 10).context("namespace-wide STRICT")?;
    wait_until(SETTLE, || Ok(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintextRefused")? == 1))?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inboundPlaintext")? == 1);
    send(&m.shop_client, &to, 1 << 10).context("mesh traffic under namespace-wide STRICT")?;
    Ok(())
}

/// What `meshtest raw` reported; it must say the peer closed the connection
/// without speaking HTTP/2.
fn raw_refused(pod: &mesh_e2e::Pod, to: &str, what: &[&str]) -> Result<Value> {
    let mut args = vec!["raw", "--to", to];
    args.extend_from_slice(what);
    let out = pod.run("meshtest", &args)?;
    let v = parse_ok(pod, &out).with_context(|| format!("{what:?} to {to} was not closed by the agent"))?;
    ensure!(v["h2Frames"] == false, "{what:?}: the agent answered in cleartext HTTP/2: {v}");
    Ok(v)
}

/// Garbage, a cleartext HTTP/2 CONNECT (the tunnel protocol without TLS), a
/// plaintext HTTP/1 request, a plain TCP client and a TLS client without a
/// certificate on an enrolled pod's tunnel port: each connection is closed
/// and counted as a failed handshake, nothing reaches the app, and the agent
/// keeps serving.
#[test]
fn garbage_and_plaintext_on_the_tunnel_port_are_refused() -> Result<()> {
    let m = mesh("mtls_garbage", false, &["shop"])?;
    let tunnel = format!("{}:{TUNNEL_PORT}", m.shop_server.ip());
    let before = tls(&m.b)?;
    let refused_before = pod_status(&m.b, "shop", "shop-server")?.proxy.inbound_refused;

    let garbage = raw_refused(&m.legacy_client, &tunnel, &["--garbage", "4096"])?;
    let h2c = raw_refused(&m.legacy_client, &tunnel, &["--h2c-connect", &server(&m.shop_server)])?;
    let http1 = raw_refused(&m.legacy_client, &tunnel, &["--text", "GET / HTTP/1.1\r\nHost: shop-server\r\n\r\n"])?;
    let plain = send_refused(&m.legacy_client, &tunnel, 64 << 10)?;
    let out = m.legacy_client.run("meshtest", ["tls-probe", "--to", &tunnel])?;
    let no_cert = parse_ok(&m.legacy_client, &out).context("a TLS client without a certificate was not refused")?;
    ensure!(no_cert["serverCertificate"] == true, "the agent presented no certificate: {no_cert}");
    let probes = format!("garbage {garbage}\nh2c {h2c}\nhttp/1 {http1}\nplain {plain}\nno cert {no_cert}");

    // Per pod: five refused tunnel connections.
    wait_until(SETTLE, || Ok(pod_status(&m.b, "shop", "shop-server")?.proxy.inbound_refused >= refused_before + 5))
        .with_context(|| {
            format!(
                "shop-server's proxy.inboundRefused does not count 5 refusals: {}\n{probes}",
                pod_json(&m.b, "shop", "shop-server").unwrap_or_default()
            )
        })?;
    // Per agent: the TLS counters say why.
    let after: mesh_e2e::TlsStatus = wait_for(SETTLE, || {
        let t = tls(&m.b)?;
        Ok((t.no_client_certificate > before.no_client_certificate && t.failures() >= before.failures() + 5).then_some(t))
    })
    .with_context(|| {
        format!(
            "node-b's tls stats do not count 5 failed handshakes (1 without a client certificate): \
             before {before:?}, now {:?}\n{probes}",
            tls(&m.b).ok()
        )
    })?;
    ensure!(after.verified == before.verified, "a bad client was verified: {after:?}");
    ensure!(m.b.try_wait()?.is_none(), "node-b's agent exited: {}", m.b.log());
    ensure!(accepted(&m.echoes[0]) == 0, "the app saw a connection: {}", m.echoes[0].stdout());

    // Still serving: a mesh transfer, verified as usual.
    send(&m.shop_client, &server(&m.shop_server), 1 << 20)?;
    ensure!(counter(&m.b, "shop", "shop-server", "proxy.inbound")? == 1);
    ensure!(accepted(&m.echoes[0]) == 1);
    let s: Status = m.b.status_typed()?;
    ensure!(s.tls.is_some_and(|t| t.verified > after.verified), "the mesh transfer's handshake was not verified");
    Ok(())
}
