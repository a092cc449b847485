//! Shared set-up for the end-to-end tests: a two-node mesh with an enrolled
//! namespace (`shop`) and one outside the mesh (`legacy`), one client and one
//! echo server in each, and the mesh's CA: agents tunnel over mutual TLS.
#![allow(dead_code)]

use std::{path::Path, process::Output, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use mesh_e2e::{Agent, Ca, CaOptions, PeerAuthenticationEntry, Pod, PodProcess, PodSpec, Testbed, wait_until};
use serde_json::Value;

pub const ECHO_PORT: u16 = 9000;
pub const SETTLE: Duration = Duration::from_secs(20);

pub struct Mesh {
    pub ca: Ca,
    pub a: Agent,
    pub b: Agent,
    pub shop_client: Pod,
    pub shop_server: Pod,
    pub legacy_client: Pod,
    pub legacy_server: Pod,
    pub echoes: Vec<PodProcess>,
    // Last: dropped after the agents and processes above.
    pub tb: Testbed,
}

/// Agent flags for the tests: fast config polling and reconcile, and the
/// acceleration switch under test.
pub fn agent_args(accelerate: bool) -> Vec<&'static str> {
    let mut v = vec!["--accelerate", if accelerate { "on" } else { "off" }];
    v.extend(TIMING_ARGS);
    v
}

/// The agent flags every test mesh runs with besides `--accelerate`.
const TIMING_ARGS: [&str; 6] = ["--config-poll", "100ms", "--reconcile-interval", "500ms", "--drain-timeout", "5s"];

pub fn mesh(test: &str, accelerate: bool, enrolled: &[&str]) -> Result<Mesh> {
    mesh_with(test, &MeshOpts { accelerate, enrolled, ..MeshOpts::default() })
}

/// What [`mesh_with`] builds beyond the defaults of [`mesh`].
#[derive(Default)]
pub struct MeshOpts<'a> {
    pub accelerate: bool,
    /// The `--accelerate` flag and value, in place of `accelerate`'s `on`
    /// or `off` (empty: no flag, the agent's default).
    pub accelerate_flag: Option<&'a [&'a str]>,
    pub enrolled: &'a [&'a str],
    /// The CA's options (`--ttl`).
    pub ca: CaOptions,
    /// More agent flags (e.g. `--cert-ttl 4s`).
    pub agent_args: &'a [&'a str],
    /// Service account = pod name (`shop-client`, ...) instead of `default`.
    pub named_service_accounts: bool,
    /// Written with the first config.
    pub peer_authentications: Vec<PeerAuthenticationEntry>,
    /// More flags for one node's agent only: (node, flags).
    pub node_args: &'a [(&'a str, &'a [&'a str])],
    /// `RLIMIT_NOFILE` (soft, hard) one node's agent starts with.
    pub nofile: &'a [(&'a str, (u64, u64))],
}

pub fn mesh_with(test: &str, o: &MeshOpts) -> Result<Mesh> {
    let mut tb = Testbed::new(test)?;
    let spec = |name: &str, ns: &str, node: &str, last: u8| {
        let s = PodSpec::new(name, ns, node, [198, 51, 100, last].into());
        if o.named_service_accounts { s.service_account(name) } else { s }
    };
    let shop_client = tb.add_pod(spec("shop-client", "shop", "node-a", 11))?;
    let shop_server = tb.add_pod(spec("shop-server", "shop", "node-b", 12))?;
    let legacy_client = tb.add_pod(spec("legacy-client", "legacy", "node-a", 21))?;
    let legacy_server = tb.add_pod(spec("legacy-server", "legacy", "node-b", 22))?;
    for pa in &o.peer_authentications {
        tb.add_peer_authentication(pa.clone())?;
    }
    tb.write_config(&tb.config_path(), o.enrolled)?;
    let ca = tb.start_ca_with(o.ca.clone())?;
    let echoes = vec![shop_server.start_echo(ECHO_PORT)?, legacy_server.start_echo(ECHO_PORT)?];
    let mut args = match o.accelerate_flag {
        Some(flag) => flag.iter().copied().chain(TIMING_ARGS).collect(),
        None => agent_args(o.accelerate),
    };
    args.extend_from_slice(o.agent_args);
    let for_node = |node: &str| -> Vec<&str> {
        let mut v = args.clone();
        for (n, extra) in o.node_args {
            if *n == node {
                v.extend_from_slice(extra);
            }
        }
        v
    };
    let nofile = |node: &str| o.nofile.iter().find(|(n, _)| *n == node).map(|(_, l)| *l);
    tb.set_agent_nofile(nofile("node-a"));
    let a = tb.start_agent_args("node-a", &for_node("node-a"))?;
    tb.set_agent_nofile(nofile("node-b"));
    let b = tb.start_agent_args("node-b", &for_node("node-b"))?;
    tb.set_agent_nofile(None);
    let m = Mesh { ca, a, b, shop_client, shop_server, legacy_client, legacy_server, echoes, tb };
    for ns in o.enrolled {
        for (agent, pod) in [(&m.a, format!("{ns}-client")), (&m.b, format!("{ns}-server"))] {
            wait_enrolled(agent, ns, &pod, true)?;
        }
    }
    Ok(m)
}

/// Address of the `shop-server` service that [`serve_http_app`] declares.
pub const SHOP_SERVICE_IP: [u8; 4] = [198, 51, 100, 100];

/// Declares service `shop/shop-server` at `198.51.100.100:80` (-> 8080,
/// port name `http`) and runs the Python `app` in the shop-server pod until
/// it prints `listening`. The service reaches the agents with the next
/// config write.
pub fn serve_http_app(m: &mut Mesh, app: &str) -> Result<PodProcess> {
    let mut svc = mesh_e2e::ServiceSpec::new("shop-server", "shop").select("app", "shop-server").ip(SHOP_SERVICE_IP.into());
    svc.ports.push(mesh_e2e::ServicePort { name: "http".into(), port: 80, target_port: 8080 });
    m.tb.add_service(svc)?;
    let script = m.tb.dir().join("app.py");
    std::fs::write(&script, app)?;
    let proc_ = m.shop_server.spawn("python3", [script.to_str().context("utf-8 path")?])?;
    proc_.wait_for_stdout(SETTLE, |l| l.contains("listening"))?;
    Ok(proc_)
}

/// The value of the one series of `name` whose labels include all `labels`
/// (0 when there is none; an error when several match).
pub fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let (code, body) = agent.get("/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    let text = String::from_utf8(body)?;
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && wanted.iter().all(|w| l.contains(w.as_str())))
        .collect();
    ensure!(rows.len() <= 1, "several series of {name} match {labels:?}: {rows:?}");
    Ok(rows.first().and_then(|l| l.rsplit(' ').next()).map(str::parse).transpose()?.unwrap_or(0.0))
}

/// The pod's entry in the agent's /status.
pub fn pod_json(agent: &Agent, ns: &str, name: &str) -> Result<Value> {
    let s = agent.status()?;
    s["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["namespace"] == ns && p["name"] == name).cloned())
        .with_context(|| format!("pod {ns}/{name} not in {}'s status: {s}", agent.node()))
}

pub fn counter(agent: &Agent, ns: &str, name: &str, path: &str) -> Result<u64> {
    let p = pod_json(agent, ns, name)?;
    let v = path.split('.').fold(&p, |v, k| &v[k]);
    v.as_u64().with_context(|| format!("{path} missing in {p}"))
}

/// Waits until the pod is (not) enrolled and attached; an enrolled pod must
/// also hold a workload certificate (`certificate.notAfter`), since its agent
/// cannot tunnel for it before (agents without mTLS report no `certificate`).
pub fn wait_enrolled(agent: &Agent, ns: &str, name: &str, enrolled: bool) -> Result<()> {
    wait_until(SETTLE, || {
        let p = pod_json(agent, ns, name)?;
        let certified = !enrolled || p.get("certificate").is_none() || p["certificate"]["notAfter"].is_string();
        Ok(p["enrolled"] == enrolled && p["error"].is_null() && p["attached"] == true && certified)
    })
    .with_context(|| format!("{ns}/{name} on {} never became enrolled={enrolled}: {}", agent.node(), agent.log()))
}

/// `meshtest send` from `pod` to `to`; the transfer must arrive intact.
pub fn send(pod: &Pod, to: &str, bytes: u64) -> Result<Value> {
    let out = pod.run("meshtest", ["send", "--to", to, "--bytes", &bytes.to_string()])?;
    parse_ok(pod, &out)
}

pub fn parse_ok(pod: &Pod, out: &Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line)
        .with_context(|| format!("meshtest in {}: no JSON result: {stdout} {}", pod.id(), String::from_utf8_lossy(&out.stderr)))?;
    if !out.status.success() || v["ok"] != true {
        bail!("meshtest in {} failed: {v}", pod.id());
    }
    Ok(v)
}

pub fn server(pod: &Pod) -> String {
    format!("{}:{ECHO_PORT}", pod.ip())
}

/// A long-lived connection that pings every 50 ms until told to stop.
pub struct Hold {
    pub proc_: PodProcess,
    control: std::path::PathBuf,
}

impl Hold {
    pub fn start(pod: &Pod, to: &str, dir: &Path, name: &str) -> Result<Hold> {
        let control = dir.join(format!("stop-{name}"));
        let proc_ = pod.spawn(
            "meshtest",
            ["hold", "--to", to, "--interval-ms", "50", "--control", control.to_str().expect("utf-8 path")],
        )?;
        let h = Hold { proc_, control };
        h.wait_roundtrips(10)?;
        Ok(h)
    }

    /// Round trips reported so far.
    pub fn roundtrips(&self) -> u64 {
        self.proc_
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["roundtrips"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// Waits until `more` further round trips have completed.
    pub fn wait_roundtrips(&self, more: u64) -> Result<()> {
        let target = self.roundtrips() + more;
        wait_until(SETTLE, || {
            ensure!(
                !self.proc_.stdout().contains("\"ok\":false"),
                "long-lived connection failed: {} {}",
                self.proc_.stdout(),
                self.proc_.stderr()
            );
            Ok(self.roundtrips() >= target)
        })
    }

    pub fn finish(mut self) -> Result<u64> {
        std::fs::write(&self.control, b"stop")?;
        let status = self.proc_.wait_timeout(SETTLE)?.context("hold did not stop")?;
        ensure!(status.success(), "long-lived connection failed: {} {}", self.proc_.stdout(), self.proc_.stderr());
        Ok(self.roundtrips())
    }
}

/// Generates one test per acceleration mode from `fn NAME(accelerate: bool)`.
#[macro_export]
macro_rules! both_paths {
    ($name:ident) => {
        mod $name {
            #[test]
            fn accelerated() -> anyhow::Result<()> {
                super::$name(true)
            }
            #[test]
            fn plain() -> anyhow::Result<()> {
                super::$name(false)
            }
        }
    };
}

/// `meshtest send --pattern PATTERN`: `bytes` of PATTERN repeated (cleartext
/// a capture can recognise), echoed intact.
pub fn send_pattern(pod: &Pod, to: &str, bytes: u64, pattern: &str) -> Result<Value> {
    let out = pod.run("meshtest", ["send", "--to", to, "--bytes", &bytes.to_string(), "--pattern", pattern])?;
    parse_ok(pod, &out)
}

/// `meshtest send` that must NOT succeed; returns its JSON line.
pub fn send_refused(pod: &Pod, to: &str, bytes: u64) -> Result<Value> {
    let out = pod.run("meshtest", ["send", "--to", to, "--bytes", &bytes.to_string(), "--io-timeout", "10"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("meshtest in {}: no JSON result: {stdout}", pod.id()))?;
    ensure!(!out.status.success() && v["ok"] == false, "{} -> {to} was not refused: {v}", pod.id());
    Ok(v)
}

/// How many connections the echo server accepted so far.
pub fn accepted(echo: &PodProcess) -> usize {
    echo.stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["accepted"].is_string())
        .count()
}

/// The pod's typed entry in the agent's /status.
pub fn pod_status(agent: &Agent, ns: &str, name: &str) -> Result<mesh_e2e::PodStatus> {
    agent
        .pod_status(ns, name)?
        .with_context(|| format!("pod {ns}/{name} not in {}'s status", agent.node()))
}

/// `spiffe://cluster.local/ns/NS/sa/SA`.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Writes the testbed's config plus `extra` YAML (e.g. policies), atomically, and waits until
/// both agents have accepted it.
pub fn write_with_extra(m: &Mesh, enrolled: &[&str], extra: &str) -> Result<()> {
    let path = m.tb.config_path();
    let generation = |a: &mesh_e2e::Agent| -> Result<u64> { Ok(a.status()?["config"]["generation"].as_u64().unwrap_or(0)) };
    let (ga, gb) = (generation(&m.a)?, generation(&m.b)?);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n{extra}", m.tb.config_yaml(enrolled)))?;
    std::fs::rename(&tmp, &path)?;
    wait_until(SETTLE, || Ok(generation(&m.a)? > ga && generation(&m.b)? > gb))
}

