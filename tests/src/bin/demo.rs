//! `cargo run -p mesh-e2e --bin demo [-- --keep]` (as root): a CA, two
//! nodes, six pods, two namespaces (`shop` enrolled, `legacy` not). First four
//! checksummed transfers and what each agent says it did with them (and which
//! verified identities it saw); then the product's tour, each stop with the
//! numbers measured right then: authorization policy, STRICT peer
//! authentication, canary and A/B routing, retries, circuit breaking, the
//! agents' Istio metrics and one trace from an OTLP collector the demo runs.
//! `--keep` leaves the mesh up, with commands to try, until Ctrl-C.

#[path = "demo/tour.rs"]
mod tour;
#[path = "demo/observe.rs"]
mod observe;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use mesh_e2e::{Agent, Pod, PodCounters, PodSpec, ServiceSpec, Status, Testbed, peers_since, wait_until};
use serde_json::Value;

const PORT: u16 = 9000;
const BYTES: u64 = 1024 * 1024;
const NODES: [&str; 2] = ["node-a", "node-b"];
/// How long the demo waits for something the mesh should do at once.
const SETTLE: Duration = Duration::from_secs(20);

#[derive(Parser)]
#[command(about = "A two-node mesh on this machine, shown in plain words (needs root)")]
struct Args {
    /// Leave the mesh running after the tour, with commands to try, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("demo: at least one transfer or tour stop failed (see FAILED above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    let started = std::time::Instant::now();
    // Ctrl-C tears the testbed down (blocked here, before any thread starts).
    let signals = mesh_e2e::SignalTeardown::block()?;

    let agent_bin = mesh_e2e::agent_bin()?;
    mesh_e2e::meshtest_bin()?;
    mesh_e2e::meshhttp_bin()?;
    let collector = observe::Collector::start()?;
    let mut tb = Testbed::new("demo")?;
    signals.arm(&tb);
    // Per-connection debug logs would slow the tour's ~800 requests down.
    tb.set_agent_log_filter("info");

    let specs = [
        ("shop-client", "shop", "node-a", 11),
        ("shop-server", "shop", "node-b", 12),
        ("legacy-client", "legacy", "node-a", 21),
        ("legacy-server", "legacy", "node-b", 22),
    ];
    let mut pods = BTreeMap::new();
    for (name, ns, node, last) in specs {
        let pod = tb.add_pod(
            PodSpec::new(name, ns, node, Ipv4Addr::new(198, 51, 100, last)).service_account(name),
        )?;
        println!("pod {:<22} on {node}  ip {}", pod.id(), pod.ip());
        pods.insert(name, pod);
    }
    for pod in tour::add_to(&mut tb)? {
        println!("pod {:<22} on {}  ip {} ({})", pod.id(), pod.node(), pod.ip(), pod.spec().labels["version"]);
        let name = tour::BACKENDS.iter().map(|b| b.0).find(|n| *n == pod.name()).expect("a backend");
        pods.insert(name, pod);
    }
    for (name, ns) in [("shop-server", "shop"), ("legacy-server", "legacy")] {
        tb.add_service(
            ServiceSpec::new(name, ns)
                .port(PORT, PORT)
                .select("app", name),
        )?;
    }
    let config = tb.config_path();
    tour::write_config(&tb)?;
    println!(
        "config {} (enrolled namespaces: shop; services web {} and limited {} on port 80, HTTP; policies and routes for the tour)",
        config.display(),
        std::net::Ipv4Addr::from(tour::WEB_IP),
        std::net::Ipv4Addr::from(tour::LIMITED_IP)
    );
    println!("otlp collector {} (in this process)", collector.endpoint);

    let ca = tb.start_ca()?;
    println!(
        "ca: pid {}, {} (gRPC over TLS), root {}, log {}",
        ca.pid().unwrap_or_default(),
        ca.endpoint(),
        ca.roots_path().display(),
        ca.log_path().map(|p| p.display().to_string()).unwrap_or_default()
    );

    let mut agents = BTreeMap::new();
    let agent_args = [
        "--otlp-endpoint",
        collector.endpoint.as_str(),
        "--trace-sampling",
        "1.0",
        "--config-poll",
        "100ms",
    ];
    for node in NODES {
        let agent = tb.start_agent_args(node, &agent_args)?;
        println!(
            "agent {node}: pid {}, admin http://{}, log {}",
            agent.pid(),
            agent.admin(),
            agent.log_path().display()
        );
        agents.insert(node, agent);
    }
    wait_for_attachment(&agents, &pods);
    print_identities(&agents, &pods);

    let _servers = [
        pods["shop-server"].start_echo(PORT)?,
        pods["legacy-server"].start_echo(PORT)?,
    ];
    let backends: Vec<Pod> = tour::BACKENDS.iter().map(|b| pods[b.0].clone()).collect();
    let _apps = tour::start_apps(tb.dir(), &backends, &pods["shop-client"])?;

    let flows = [
        ("shop-client", "shop-server"),
        ("shop-client", "legacy-server"),
        ("legacy-client", "shop-server"),
        ("legacy-client", "legacy-server"),
    ];
    let mut all_ok = true;
    let mut report = Vec::new();
    for (c, s) in flows {
        let (client, server) = (&pods[c], &pods[s]);
        let before = snapshot(&agents);
        let outcome = transfer(client, server);
        let after = settled_snapshot(&agents);
        all_ok &= outcome.is_ok();
        report.push((client, server, outcome, before, after));
    }

    println!("\nWhat happened, according to the agents' /status counters:");
    for (client, server, outcome, before, after) in &report {
        let (cd, sd) = (delta(before, after, client), delta(before, after, server));
        println!("\n  {} -> {}:", client.id(), server.id());
        match outcome {
            Ok(v) => {
                let sha = v["sha256"].as_str().unwrap_or_default();
                println!(
                    "    transfer: {} bytes echoed intact (sha256 {}...), {} ms",
                    v["received"],
                    &sha[..sha.len().min(12)],
                    v["millis"]
                );
            }
            Err(e) => println!("    transfer: FAILED: {e:#}"),
        }
        let peers = Peers {
            verified_server: peer_delta(before, after, client, |p| &p.proxy.outbound_peers),
            verified_client: peer_delta(before, after, server, |p| &p.proxy.inbound_peers),
        };
        println!("    path: {}", explain(client, server, cd, sd, &peers));
        if let Some(d) = cd {
            println!(
                "    {} counters on {}: {}",
                client.name(),
                client.node(),
                fmt_delta(&d)
            );
        }
        if let Some(d) = sd {
            println!(
                "    {} counters on {}: {}",
                server.name(),
                server.node(),
                fmt_delta(&d)
            );
        }
    }

    all_ok &= tour::Tour { tb: &mut tb, agents: &agents, pods: &pods }.run();
    all_ok &= tour::section("Metrics: Istio's names, from the agents", || observe::metrics(&agents));
    all_ok &= tour::section("A trace: one request through both agents", || observe::trace(&collector, &pods["shop-client"]));
    println!("\nthe tour took {:.1} s", started.elapsed().as_secs_f64());

    if args.keep {
        print_try_it(&tb, &agent_bin, &agents, &pods);
        // The signal thread tears the testbed down and exits.
        loop {
            std::thread::park();
        }
    }

    println!();
    for (node, agent) in &agents {
        match agent.stop() {
            Ok(s) if s.success() => println!("agent {node} stopped cleanly"),
            Ok(s) => println!("agent {node} stopped with {s}"),
            Err(e) => println!("agent {node}: {e:#}"),
        }
        if !all_ok {
            let log = agent.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            println!("last lines of {node}'s log:");
            for l in tail.iter().rev() {
                println!("  {l}");
            }
        }
    }
    drop(agents);
    match ca.stop() {
        Ok(Some(s)) if s.success() => println!("ca stopped cleanly"),
        Ok(Some(s)) => println!("ca stopped with {s}"),
        Ok(None) => println!("ca was not running"),
        Err(e) => println!("ca: {e:#}"),
    }
    drop(tb);
    println!("testbed removed");
    Ok(all_ok)
}

/// Enrolled pods should be attached, with a certificate, soon after the
/// agents are ready; the demo goes on either way (the counters will tell what
/// happened).
fn wait_for_attachment(agents: &BTreeMap<&str, Agent>, pods: &BTreeMap<&str, Pod>) {
    let attached = || -> Result<bool> {
        for (node, agent) in agents {
            let status = agent.status_typed()?;
            let expected = pods
                .values()
                .filter(|p| p.node() == *node && p.namespace() == "shop");
            for p in expected {
                let ok = status.pod(p.namespace(), p.name()).is_some_and(|s| {
                    s.attached && s.certificate.as_ref().is_some_and(|c| c.not_after.is_some())
                });
                if !ok {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    };
    if let Err(e) = wait_until(Duration::from_secs(20), attached) {
        println!("warning: enrolled pods not all reported attached with a certificate: {e:#}");
    }
}

/// Each pod's workload identity and certificate, as its agent reports them.
fn print_identities(agents: &BTreeMap<&str, Agent>, pods: &BTreeMap<&str, Pod>) {
    for pod in pods.values() {
        let Some(agent) = agents.get(pod.node()) else { continue };
        match agent.pod_status(pod.namespace(), pod.name()) {
            Ok(Some(s)) if s.identity.is_none() && s.certificate.is_none() => {
                println!("identity {:<22} none (not in the mesh)", pod.id())
            }
            Ok(Some(s)) => {
                let cert = match &s.certificate {
                    Some(c) if c.not_after.is_some() => format!(
                        "certificate valid until {} (serial {})",
                        c.not_after.as_deref().unwrap_or_default(),
                        c.serial.as_str().map(str::to_owned).unwrap_or_else(|| c.serial.to_string())
                    ),
                    Some(c) => format!(
                        "no certificate yet ({} CA errors{})",
                        c.errors,
                        c.last_error.as_deref().map(|e| format!(", last: {e}")).unwrap_or_default()
                    ),
                    None => "no certificate reported".to_string(),
                };
                println!(
                    "identity {:<22} {}: {cert}",
                    pod.id(),
                    s.identity.as_deref().unwrap_or("(no identity reported)")
                );
            }
            Ok(None) => println!("identity {:<22} not listed by {}'s agent", pod.id(), pod.node()),
            Err(e) => println!("identity {:<22} {}'s agent: {e:#}", pod.id(), pod.node()),
        }
    }
}

fn transfer(client: &Pod, server: &Pod) -> Result<Value> {
    let to = format!("{}:{PORT}", server.ip());
    let out = client.run(
        "meshtest",
        ["send", "--to", &to, "--bytes", &BYTES.to_string()],
    )?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = line
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "meshtest send printed no JSON; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    anyhow::ensure!(out.status.success() && v["ok"] == true, "{}", v);
    Ok(v)
}

type Snapshot = BTreeMap<String, Option<Status>>;

fn snapshot(agents: &BTreeMap<&str, Agent>) -> Snapshot {
    agents
        .iter()
        .map(|(node, agent)| {
            let s = agent.status_typed();
            if let Err(e) = &s {
                println!("warning: {node}'s agent: {e:#}");
            }
            (node.to_string(), s.ok())
        })
        .collect()
}

/// Counters may be bumped when connections close, just after the client
/// exits: wait (briefly) until two snapshots agree.
fn settled_snapshot(agents: &BTreeMap<&str, Agent>) -> Snapshot {
    let key = |s: &Snapshot| -> Vec<Vec<PodCounters>> {
        s.values()
            .map(|st| {
                st.iter()
                    .flat_map(|st| st.pods.iter().map(|p| p.counters()))
                    .collect()
            })
            .collect()
    };
    let mut last = snapshot(agents);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let next = snapshot(agents);
        if key(&next) == key(&last) {
            return next;
        }
        last = next;
    }
    last
}

fn delta(before: &Snapshot, after: &Snapshot, pod: &Pod) -> Option<PodCounters> {
    let get = |s: &Snapshot| {
        s.get(pod.node())?
            .as_ref()?
            .pod(pod.namespace(), pod.name())
            .map(|p| p.counters())
    };
    let a = get(after)?;
    Some(a.since(&get(before).unwrap_or_default()))
}

/// Verified peer identities one pod gained between two snapshots.
struct Peers {
    /// Server identities the client pod's outbound tunnel verified.
    verified_server: BTreeMap<String, u64>,
    /// Client identities the server pod's agent verified on inbound streams.
    verified_client: BTreeMap<String, u64>,
}

fn peer_delta(
    before: &Snapshot,
    after: &Snapshot,
    pod: &Pod,
    peers: impl Fn(&mesh_e2e::PodStatus) -> &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    let get = |s: &Snapshot| {
        s.get(pod.node())?
            .as_ref()?
            .pod(pod.namespace(), pod.name())
            .map(|p| peers(p).clone())
    };
    let Some(a) = get(after) else { return BTreeMap::new() };
    peers_since(&a, &get(before).unwrap_or_default())
}

fn names(peers: &BTreeMap<String, u64>) -> String {
    if peers.is_empty() {
        "none reported".to_string()
    } else {
        peers.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// The sentence for one connection, derived only from the counter deltas.
fn explain(client: &Pod, server: &Pod, c: Option<PodCounters>, s: Option<PodCounters>, peers: &Peers) -> String {
    let (cn, sn) = (client.node(), server.node());
    let mut parts = Vec::new();
    match c {
        None => parts.push(format!(
            "{cn}'s agent does not list {} (no counters)",
            client.id()
        )),
        Some(d) => {
            parts.push(if d.redirected > 0 {
                format!("redirected by eBPF on {cn}")
            } else if d.passed_through > 0 {
                format!("passed through by eBPF on {cn} (not redirected)")
            } else {
                format!("not seen by eBPF on {cn}")
            });
            parts.push(if d.outbound_tunneled > 0 && !peers.verified_server.is_empty() {
                format!(
                    "tunneled {cn} -> {sn} over mTLS (client {}, server {})",
                    names(&peers.verified_client),
                    names(&peers.verified_server)
                )
            } else if d.outbound_tunneled > 0 {
                format!("tunneled {cn} -> {sn} (no verified server identity reported)")
            } else if d.outbound_direct > 0 {
                format!("sent directly by {cn}'s agent (destination outside the mesh)")
            } else if d.outbound > 0 {
                format!("accepted by {cn}'s agent but neither tunneled nor sent directly")
            } else {
                format!("bypassed {cn}'s agent")
            });
        }
    }
    parts.push(match s {
        None => format!("{sn}'s agent does not list {} (no counters)", server.id()),
        Some(d) if d.inbound > 0 => format!("delivered by {sn}'s agent"),
        Some(d) if d.inbound_plaintext_refused > 0 => format!(
            "refused by {sn}'s agent as plaintext from outside the mesh (STRICT peer authentication)"
        ),
        Some(d) if d.inbound_plaintext > 0 => format!(
            "captured in the kernel (sk_lookup) by {sn}'s agent as plaintext from outside the mesh and delivered to {}",
            server.id()
        ),
        Some(_) => format!("reached {} without {sn}'s agent", server.id()),
    });
    parts.join(", ")
}

fn fmt_delta(d: &PodCounters) -> String {
    format!(
        "+{} redirected, +{} passed through, +{} outbound ({} tunneled, {} direct), +{} inbound (+{} plaintext captured, +{} plaintext refused)",
        d.redirected,
        d.passed_through,
        d.outbound,
        d.outbound_tunneled,
        d.outbound_direct,
        d.inbound,
        d.inbound_plaintext,
        d.inbound_plaintext_refused
    )
}

/// `--keep`: what to try against the running mesh.
fn print_try_it(tb: &Testbed, agent_bin: &std::path::Path, agents: &BTreeMap<&str, Agent>, pods: &BTreeMap<&str, Pod>) {
    // A pod is its netns *and* its cgroup: the connect hooks sit on the
    // cgroup, so a process must join both to be redirected into the mesh.
    let in_pod = |pod: &Pod, cmd: &str| {
        format!(
            "sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} {cmd}'",
            pod.cgroup_path().display(),
            pod.netns_name()
        )
    };
    let web = std::net::Ipv4Addr::from(tour::WEB_IP);
    let client = &pods["shop-client"];
    println!("\nThe mesh keeps running; press Ctrl-C to tear it down. Try (as root):");
    println!("  # a request from shop-client through both agents (route, mTLS, policy)");
    println!("  {}", in_pod(client, &format!("curl -s -H \"x-canary: 1\" http://{web}/")));
    println!("  # denied by the DENY policy deny-admin");
    println!("  {}", in_pod(client, &format!("curl -s http://{web}/admin/users")));
    println!("  # from outside the mesh (legacy-client: its netns alone), plaintext, denied by default");
    println!(
        "  ip netns exec {} curl -s http://198.51.100.{}:8080/",
        pods["legacy-client"].netns_name(),
        tour::BACKENDS[0].2
    );
    for (node, agent) in agents {
        println!("  # {node}'s agent");
        println!("  {} status --admin {}", agent_bin.display(), agent.admin());
        println!("  curl -s http://{}/metrics | grep istio_requests_total", agent.admin());
    }
    println!(
        "  # configs, agent logs: {} (removed at Ctrl-C unless MESH_E2E_KEEP=1 is set)",
        tb.dir().display()
    );
}
