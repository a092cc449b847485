//! `bench` (run by `cargo xtask bench`, as root): the data path measured side
//! by side on one machine. One testbed (a client pod on node-a, a server pod
//! on node-b, the mesh's CA), then every variant, interleaved, repetition
//! after repetition:
//!
//! | variant | what carries the client's connections |
//! | --- | --- |
//! | `direct` | nothing: the namespace is not enrolled, no agent runs |
//! | `agent-mtls` | two agents, mTLS HTTP/2 CONNECT tunnel, port not HTTP (L4) |
//! | `agent-l7` | two agents, mTLS, port named `http` + authorization policies |
//! | `haproxy-tcp` | HAProxy in each pod's netns, TLS between them, TCP mode |
//! | `haproxy-http` | the same in HTTP mode (HTTP/2 over TLS between them, ACLs) |
//!
//! each agent variant with `--accelerate off` and `on`. With
//! `--baseline-agent PATH`, every agent variant also runs as
//! `<variant>@before` on the binary at PATH (a build of the code before a
//! change), interleaved in the same repetitions like any other variant, and
//! the report adds after/before ratios. Scenarios, see
//! [`load`]; report (Markdown, JSON, SVG), see [`report`]. Every number is a
//! median over the repetitions with its spread; nothing here asserts a
//! timing: `--mode smoke` only checks that every variant produced numbers.

mod load;
mod peer;
mod report;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use mesh_e2e::{Agent, Pod, PodProcess, PodSpec, ServicePortEntry, ServiceEntry, Testbed, wait_until};

use load::{Metrics, Profile, Target};

/// The app's port in the server pod.
const APP_PORT: u16 = 8080;
/// HAProxy: client-side listener (in the client pod, on loopback) and
/// server-side TLS listener (on the server pod's address).
const PEER_FRONT_PORT: u16 = 18080;
const PEER_TLS_PORT: u16 = 18443;
const NAMESPACE: &str = "bench";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
/// How long a variant may take to serve its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(name = "bench", about = "nodemesh data-path benchmark (run it through `cargo xtask bench`)")]
struct Cli {
    /// `full`: 5 repetitions of 10 s runs; `quick`: 1 repetition, short runs;
    /// `smoke`: the shortest run that exercises every variant and scenario.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    mode: Mode,
    /// Overrides the mode's number of repetitions.
    #[arg(long)]
    reps: Option<usize>,
    /// Results go to `OUT/<timestamp>/`, the table also to `OUT/latest.md`.
    #[arg(long)]
    out: PathBuf,
    /// Criterion's output directory (`target/criterion`): the policy
    /// benchmark's estimates written after `--criterion-since` (Unix seconds)
    /// are included in the report.
    #[arg(long)]
    criterion_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    criterion_since: u64,
    /// Only these scenarios (comma-separated: latency, open-conns,
    /// saturation, connrate, bulk), e.g. to profile one kind of load.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// An extra `mesh-agent run` argument for the agent variants (repeat
    /// it), to compare settings: `--agent-arg=--data-threads --agent-arg=2`.
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Re-render the report of an earlier run from its `results.json` (into
    /// `--out`), measuring nothing.
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Only these variants (comma-separated names, e.g. `direct,agent-l7/accel-off`;
    /// `agent-l7/accel-off@before` with `--baseline-agent`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// A `mesh-agent` binary to compare the current one with (e.g. a release
    /// build of the commit before a change): every agent variant also runs
    /// as `<variant>@before` on it, in the same repetitions, and the report
    /// adds after/before ratios. The CA stays the current binary.
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

/// One way of carrying the client's traffic to the server. `before`: the
/// agents run the `--baseline-agent` binary (named `<variant>@before`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    Direct,
    AgentMtls { accelerate: bool, before: bool },
    AgentL7 { accelerate: bool, before: bool },
    HaproxyTcp,
    HaproxyHttp,
}

impl Variant {
    /// Every variant on the current build, in report order.
    pub const ALL: [Variant; 7] = [
        Variant::Direct,
        Variant::AgentMtls { accelerate: false, before: false },
        Variant::AgentMtls { accelerate: true, before: false },
        Variant::AgentL7 { accelerate: false, before: false },
        Variant::AgentL7 { accelerate: true, before: false },
        Variant::HaproxyTcp,
        Variant::HaproxyHttp,
    ];

    /// The agent variants on the `--baseline-agent` binary.
    pub const BEFORE: [Variant; 4] = [
        Variant::AgentMtls { accelerate: false, before: true },
        Variant::AgentMtls { accelerate: true, before: true },
        Variant::AgentL7 { accelerate: false, before: true },
        Variant::AgentL7 { accelerate: true, before: true },
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::AgentMtls { accelerate: false, before: false } => "agent-mtls/accel-off",
            Variant::AgentMtls { accelerate: true, before: false } => "agent-mtls/accel-on",
            Variant::AgentL7 { accelerate: false, before: false } => "agent-l7/accel-off",
            Variant::AgentL7 { accelerate: true, before: false } => "agent-l7/accel-on",
            Variant::AgentMtls { accelerate: false, before: true } => "agent-mtls/accel-off@before",
            Variant::AgentMtls { accelerate: true, before: true } => "agent-mtls/accel-on@before",
            Variant::AgentL7 { accelerate: false, before: true } => "agent-l7/accel-off@before",
            Variant::AgentL7 { accelerate: true, before: true } => "agent-l7/accel-on@before",
            Variant::HaproxyTcp => "haproxy-tcp",
            Variant::HaproxyHttp => "haproxy-http",
        }
    }

    /// Every name [`Variant::from_name`] knows: [`Variant::ALL`], then
    /// [`Variant::BEFORE`].
    pub fn known() -> impl Iterator<Item = Variant> {
        Variant::ALL.into_iter().chain(Variant::BEFORE)
    }

    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::known().find(|v| v.name() == name)
    }

    /// This agent variant on the `--baseline-agent` binary; None for the
    /// others (and for a variant that already is `@before`).
    pub fn before(self) -> Option<Variant> {
        match self {
            Variant::AgentMtls { accelerate, before: false } => Some(Variant::AgentMtls { accelerate, before: true }),
            Variant::AgentL7 { accelerate, before: false } => Some(Variant::AgentL7 { accelerate, before: true }),
            _ => None,
        }
    }

    /// The variant on the current build: `self` but for `@before` ones.
    pub fn current(self) -> Variant {
        match self {
            Variant::AgentMtls { accelerate, .. } => Variant::AgentMtls { accelerate, before: false },
            Variant::AgentL7 { accelerate, .. } => Variant::AgentL7 { accelerate, before: false },
            v => v,
        }
    }

    /// Runs the `--baseline-agent` binary.
    pub fn is_before(self) -> bool {
        matches!(self, Variant::AgentMtls { before: true, .. } | Variant::AgentL7 { before: true, .. })
    }

    /// The HAProxy mode doing the same job: what a reader compares with.
    pub fn peer(self) -> Option<Variant> {
        match self {
            Variant::AgentMtls { .. } => Some(Variant::HaproxyTcp),
            Variant::AgentL7 { .. } => Some(Variant::HaproxyHttp),
            _ => None,
        }
    }

    fn is_agent(self) -> bool {
        matches!(self, Variant::AgentMtls { .. } | Variant::AgentL7 { .. })
    }
}

/// Variants the issue names that cannot run, with the reason (reported).
pub const SKIPPED: &[(&str, &str)] = &[(
    "agent-l4",
    "no plaintext tunnel mode exists: agents always carry pod-to-pod traffic over mutual TLS \
     (agent-mtls is the L4 variant)",
)];

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // Ctrl-C tears the testbed down (agents, HAProxy, load generators die
    // with it); blocked here, before any thread starts.
    let signals = mesh_e2e::SignalTeardown::block()?;

    if let Some(path) = &cli.from_json {
        let run = report::read_json(path)?;
        let dir = report::write(&cli.out, &run)?;
        println!("{}", report::markdown(&run));
        eprintln!("bench: report rewritten in {}", dir.display());
        return Ok(());
    }
    let mut profile = Profile::for_mode(cli.mode);
    if let Some(reps) = cli.reps {
        profile.reps = reps.max(1);
    }
    for s in &cli.scenarios {
        ensure!(load::SCENARIOS.contains(&s.as_str()), "unknown scenario {s:?}; known: {}", load::SCENARIOS.join(", "));
    }
    profile.only = cli.scenarios.clone();
    let baseline = cli.baseline_agent.as_deref().map(check_baseline_agent).transpose()?;
    let variants = select_variants(&cli.only, baseline.is_some())?;
    load::check_tools()?;
    raise_fd_limit();
    let machine = report::Machine::probe();
    let started = SystemTime::now();
    let wall = Instant::now();

    let agents = report::AgentBins {
        current: agent_version(&mesh_e2e::agent_bin()?)?,
        before: baseline.as_ref().map(|(_, version)| version.clone()),
    };
    mesh_e2e::meshtest_bin()?;
    let mut tb = Testbed::new("bench")?;
    // Debug logging per connection would be what the benchmark measures.
    tb.set_agent_log_filter("warn");
    signals.arm(&tb);
    let client = tb.add_pod(PodSpec::new("bench-client", NAMESPACE, "node-a", CLIENT_IP).service_account("bench-client"))?;
    let server = tb.add_pod(PodSpec::new("bench-server", NAMESPACE, "node-b", SERVER_IP).service_account("bench-server"))?;
    for pod in [&client, &server] {
        tune_pod(pod)?;
    }
    write_config(&tb, Variant::Direct)?;
    tb.start_ca()?;
    let app = server.spawn("meshtest", ["http-serve", "--listen", &format!("0.0.0.0:{APP_PORT}")])?;
    app.wait_for_stdout(Duration::from_secs(10), |l| l.contains("\"listening\""))
        .with_context(|| format!("the HTTP app did not start: {}", app.stderr()))?;
    let peer_files = peer::write_files(tb.dir(), SERVER_IP, PEER_TLS_PORT, PEER_FRONT_PORT, APP_PORT)?;

    eprintln!(
        "bench: mode {:?}, {} repetition(s) of {} variant(s), scenarios: {}",
        cli.mode,
        profile.reps,
        variants.len(),
        profile.describe()
    );
    let mut samples = Vec::new();
    for rep in 0..profile.reps {
        // Rotate the order each repetition, so no variant always runs
        // first (cold caches) or right after the same neighbour.
        let mut order = variants.clone();
        let n = order.len();
        order.rotate_left(rep % n);
        for variant in order {
            // Agents (not the CA) of an `@before` variant run the baseline.
            tb.set_agent_bin(baseline.as_ref().filter(|_| variant.is_before()).map(|(path, _)| path.clone()));
            let t = Instant::now();
            let metrics = run_variant(&tb, &client, &server, &peer_files, variant, &profile, &cli.agent_arg)
                .with_context(|| format!("variant {} (repetition {})", variant.name(), rep + 1))?;
            eprintln!(
                "bench: rep {}/{} {:<27} {} ({:.0}s)",
                rep + 1,
                profile.reps,
                variant.name(),
                metrics.summary(),
                t.elapsed().as_secs_f64()
            );
            samples.push(report::Sample { variant, rep, metrics });
        }
    }
    tb.set_agent_bin(None);
    drop(app);
    drop(tb);

    let policy = match &cli.criterion_dir {
        Some(dir) => report::criterion_estimates(dir, cli.criterion_since)?,
        None => Vec::new(),
    };
    let run = report::Run {
        mode: cli.mode,
        profile,
        machine,
        started,
        elapsed: wall.elapsed(),
        variants,
        samples,
        policy,
        agents,
    };
    let dir = report::write(&cli.out, &run)?;
    println!("{}", report::markdown(&run));
    eprintln!("bench: results in {}", dir.display());
    if cli.mode == Mode::Smoke {
        run.check_complete()?;
    }
    Ok(())
}

/// Runs every scenario once on `variant`: brings its proxies up, waits until
/// a request goes through, measures, and takes them down again.
fn run_variant(
    tb: &Testbed,
    client: &Pod,
    server: &Pod,
    peer_files: &peer::Files,
    variant: Variant,
    profile: &Profile,
    agent_args: &[String],
) -> Result<Metrics> {
    write_config(tb, variant)?;
    let mut agents: Vec<Agent> = Vec::new();
    let mut proxies: Vec<PodProcess> = Vec::new();
    let target = match variant {
        Variant::Direct => Target::new(SERVER_IP, APP_PORT),
        Variant::AgentMtls { accelerate, .. } | Variant::AgentL7 { accelerate, .. } => {
            let accelerate = if accelerate { "on" } else { "off" };
            let mut args = vec!["--accelerate", accelerate, "--drain-timeout", "1s"];
            args.extend(agent_args.iter().map(String::as_str));
            agents.push(tb.start_agent_args("node-a", &args)?);
            agents.push(tb.start_agent_args("node-b", &args)?);
            for (agent, pod) in agents.iter().zip([client, server]) {
                wait_enrolled(agent, pod)?;
            }
            Target::new(SERVER_IP, APP_PORT)
        }
        Variant::HaproxyTcp | Variant::HaproxyHttp => {
            let http = variant == Variant::HaproxyHttp;
            // Server side first, so the client side's first connect works.
            proxies.push(peer::start(server, &peer_files.server_config(http))?);
            proxies.push(peer::start(client, &peer_files.client_config(http))?);
            Target::new(Ipv4Addr::LOCALHOST, PEER_FRONT_PORT)
        }
    };
    let pids: Vec<u32> = if variant.is_agent() {
        agents.iter().map(Agent::pid).collect()
    } else {
        proxies.iter().map(PodProcess::pid).collect()
    };
    wait_until(READY_TIMEOUT, || Ok(load::probe(client, &target).is_ok())).with_context(|| {
        let why = load::probe(client, &target).err().map(|e| format!("{e:#}")).unwrap_or_default();
        let logs: String = agents.iter().map(|a| a.log()).collect::<Vec<_>>().join("\n");
        let proxy_out: String = proxies.iter().map(|p| p.stderr()).collect::<Vec<_>>().join("\n");
        format!("no request went through {}: {why}\n{logs}{proxy_out}", variant.name())
    })?;
    let h2_front = matches!(variant, Variant::AgentL7 { .. } | Variant::HaproxyHttp);
    // HAProxy cannot hold more than its maxconn (see `peer::MAXCONN`).
    let mut profile = profile.clone();
    if matches!(variant, Variant::HaproxyTcp | Variant::HaproxyHttp) {
        profile.idle_conns.retain(|&n| n <= peer::MAXCONN);
    }
    let profile = &profile;
    let mut metrics = load::scenarios(client, &target, &pids, h2_front, profile)?;
    if variant.is_agent() && profile.wants("restart") {
        restart(tb, server, &target, &mut agents, &agent_variant_args(variant, agent_args), profile, &mut metrics, client)?;
    }
    for agent in &agents {
        // Stopped, not killed: a crash or a hang at shutdown is worth seeing.
        let status = agent.stop()?;
        ensure!(status.success(), "agent for {} exited with {status}: {}", agent.node(), agent.log());
    }
    if variant.is_agent() {
        // The pinned state outlives the agents: remove the mesh from the
        // nodes, so the next variant's pods talk directly.
        for node in ["node-a", "node-b"] {
            let mut args = vec!["uninstall".to_owned(), "--node".into(), node.into()];
            args.extend(tb.node_state_args());
            // The binary that pinned the state removes it.
            let out = Agent::run_once(&tb.agent_bin()?, &args)?;
            ensure!(out.status.success(), "uninstall {node}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    drop(proxies);
    Ok(metrics)
}

/// The variants `--only` names (all of [`Variant::ALL`] without it), each
/// agent one followed, with a baseline, by its `@before` twin unless
/// `--only` places that itself; duplicates dropped.
fn select_variants(only: &[String], baseline: bool) -> Result<Vec<Variant>> {
    let mut picked: Vec<Variant> = Vec::new();
    if only.is_empty() {
        picked = Variant::ALL.to_vec();
    }
    for name in only {
        let v = Variant::from_name(name).with_context(|| {
            let known: Vec<&str> = Variant::known().map(Variant::name).collect();
            format!("unknown variant {name:?}; known: {}", known.join(", "))
        })?;
        if v.is_before() && !baseline {
            bail!("variant {name} runs the agent binary of --baseline-agent PATH: give one");
        }
        if !picked.contains(&v) {
            picked.push(v);
        }
    }
    if baseline {
        // Appended after the others: the rotation of the order each
        // repetition then runs a variant before its twin in some
        // repetitions and after it in others.
        let twins: Vec<Variant> = picked.iter().filter_map(|v| v.before()).filter(|t| !picked.contains(t)).collect();
        picked.extend(twins);
    }
    Ok(picked)
}

/// `--baseline-agent`: an executable `mesh-agent` (it answers `--version`);
/// its absolute path and that version line.
fn check_baseline_agent(path: &Path) -> Result<(PathBuf, String)> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("--baseline-agent {}: no such file (build the old commit's agent first)", path.display()))?;
    ensure!(meta.is_file(), "--baseline-agent {}: not a file", path.display());
    ensure!(
        meta.permissions().mode() & 0o111 != 0,
        "--baseline-agent {}: not executable (chmod +x it)",
        path.display()
    );
    let path = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let version = agent_version(&path).with_context(|| format!("--baseline-agent {}", path.display()))?;
    Ok((path, version))
}

/// `BIN (mesh-agent X.Y.Z)`: what the report says ran; fails if `bin` is
/// not a `mesh-agent`.
fn agent_version(bin: &Path) -> Result<String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().next().unwrap_or_default().trim();
    ensure!(
        out.status.success() && line.starts_with("mesh-agent"),
        "{} --version printed {line:?}, not `mesh-agent …` ({}): not a mesh-agent binary {}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(format!("{} ({line})", bin.display()))
}

/// The agent flags of a variant.
fn agent_variant_args(variant: Variant, extra: &[String]) -> Vec<String> {
    let accelerate =
        matches!(variant, Variant::AgentMtls { accelerate: true, .. } | Variant::AgentL7 { accelerate: true, .. });
    let mut args: Vec<String> =
        ["--accelerate", if accelerate { "on" } else { "off" }, "--drain-timeout", "1s"].map(String::from).to_vec();
    args.extend(extra.iter().cloned());
    args
}

/// The restart scenario: steady load while node-a's agent, then node-b's,
/// is replaced the way a DaemonSet rollout does it (the new agent started
/// beside the old one takes its listeners over; the old one drains and
/// exits). Failed requests and p99 during it; plaintext deliveries at the
/// destination (requests at the app without a verified identity).
#[allow(clippy::too_many_arguments)]
fn restart(
    tb: &Testbed,
    server: &Pod,
    target: &Target,
    agents: &mut [Agent],
    args: &[String],
    profile: &Profile,
    m: &mut Metrics,
    client: &Pod,
) -> Result<()> {
    let secs = profile.restart_secs.max(2);
    let run = load::oha_spawn(client, target, secs)?;
    let quarter = Duration::from_millis(secs * 250);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for (i, node) in ["node-a", "node-b"].into_iter().enumerate() {
        std::thread::sleep(quarter);
        let new = tb.start_agent_args(node, &args)?;
        wait_until(READY_TIMEOUT, || Ok(agents[i].try_wait()?.is_some()))
            .with_context(|| format!("the old {node} agent did not exit after handing over: {}", agents[i].log()))?;
        agents[i] = new;
    }
    load::restart_numbers(run, secs, m)?;
    let plaintext = agents[1].pod_status(server.namespace(), server.name())?.map_or(0, |p| p.proxy.inbound_plaintext);
    m.set("restart_plaintext", plaintext as f64);
    Ok(())
}

/// The config each variant runs on: nothing enrolled (direct, HAProxy);
/// enrolled with the app's port undeclared (agent-mtls: L4); enrolled with
/// the port named `http` and the authorization policies (agent-l7).
fn write_config(tb: &Testbed, variant: Variant) -> Result<()> {
    let enrolled: &[&str] = if variant.is_agent() { &[NAMESPACE] } else { &[] };
    let mut config = tb.config(enrolled);
    let mut extra = String::new();
    if let Variant::AgentL7 { .. } = variant {
        config.services.push(ServiceEntry {
            name: "bench-server".into(),
            namespace: NAMESPACE.into(),
            ip: None,
            selector: BTreeMap::from([("app".into(), "bench-server".into())]),
            ports: vec![ServicePortEntry { name: "http".into(), port: APP_PORT, target_port: APP_PORT }],
        });
        extra = policies();
    }
    let path = tb.config_path();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n{extra}", config.to_yaml()))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Policies for the server, shaped like a real service's: an ALLOW for its
/// known callers (the benchmark's client among them: method and path
/// prefixes), others for monitoring and operators (a header condition),
/// DENYs for internal paths and a blocked caller family, and a namespace-wide
/// DENY. The benchmark's requests pass every rule that applies.
fn policies() -> String {
    let td = "spiffe://cluster.local";
    let mut callers = String::new();
    for i in 0..20 {
        callers.push_str(&format!(
            "      - from: [{{principals: [\"{td}/ns/team{i}/sa/frontend\"]}}]\n        to: [{{methods: [GET, HEAD], paths: [\"/api/v1/team{i}/*\"]}}]\n"
        ));
    }
    format!(
        r#"authorizationPolicies:
  - name: bench-server-callers
    namespace: {NAMESPACE}
    selector: {{app: bench-server}}
    action: ALLOW
    rules:
      - from: [{{principals: ["{td}/ns/{NAMESPACE}/sa/bench-client"]}}]
        to: [{{methods: [GET, HEAD], paths: ["/api/*", "/bulk"]}}]
      - from: [{{namespaces: [monitoring]}}]
        to: [{{methods: [GET], paths: ["/metrics", "/healthz"]}}]
      - from: [{{principals: ["{td}/ns/ops/sa/*"]}}]
        to: [{{methods: [POST, PUT, DELETE], paths: ["/api/admin/*"]}}]
        when: [{{header: x-change-ticket, values: ["CHG-*"]}}]
{callers}  - name: bench-server-deny-internal
    namespace: {NAMESPACE}
    selector: {{app: bench-server}}
    action: DENY
    rules:
      - to: [{{paths: ["/internal", "/internal/*", "/debug/*"]}}]
      - from: [{{principals: ["{td}/ns/{NAMESPACE}/sa/blocked-*"]}}]
  - name: deny-legacy-namespace
    namespace: {NAMESPACE}
    action: DENY
    rules:
      - from: [{{namespaces: [legacy]}}]
"#
    )
}

/// Waits until the agent reports `pod` enrolled, attached, with a
/// certificate.
fn wait_enrolled(agent: &Agent, pod: &Pod) -> Result<()> {
    wait_until(READY_TIMEOUT, || {
        let status = agent.status_typed()?;
        Ok(status.pod(pod.namespace(), pod.name()).is_some_and(|p| {
            p.enrolled && p.attached && p.certificate.as_ref().is_some_and(|c| c.not_after.is_some())
        }))
    })
    .with_context(|| format!("{} never became enrolled on {}: {}", pod.id(), agent.node(), agent.log()))
}

/// Thousands of short connections per second leave sockets in TIME_WAIT:
/// let new connects reuse them and widen the port range, in the pod's own
/// netns (these sysctls are per namespace), so the connection-rate scenario
/// does not run out of ports. The range starts above the agent's in-pod
/// listener ports (15001, 15006, 15008): a client socket lingering in
/// TIME_WAIT on one of them would keep the next variant's agent from
/// listening there.
fn tune_pod(pod: &Pod) -> Result<()> {
    let script = "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse && \
                  echo '16000 65000' > /proc/sys/net/ipv4/ip_local_port_range && \
                  echo 4096 > /proc/sys/net/core/somaxconn";
    let out = pod.run("sh", ["-c", script])?;
    ensure!(out.status.success(), "tuning {}: {}", pod.id(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// 1,000 connections through two proxies need a few thousand descriptors:
/// the soft limit goes up to the hard one, for us and every child.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[Variant]) -> Vec<&'static str> {
        v.iter().map(|v| v.name()).collect()
    }

    #[test]
    fn names_round_trip_and_twins() {
        for v in Variant::known() {
            assert_eq!(Variant::from_name(v.name()), Some(v));
            assert_eq!(v.is_before(), v.name().ends_with("@before"));
            assert!(!v.current().is_before());
            if let Some(b) = v.before() {
                assert_eq!(b.name(), format!("{}@before", v.name()));
                assert_eq!(b.current(), v);
                assert_eq!(b.peer(), v.peer());
            }
        }
        assert_eq!(Variant::ALL.iter().filter_map(|v| v.before()).collect::<Vec<_>>(), Variant::BEFORE.to_vec());
    }

    #[test]
    fn baseline_adds_twins_and_only_takes_before_names() {
        let only = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(select_variants(&[], false).unwrap(), Variant::ALL.to_vec());
        let all = select_variants(&[], true).unwrap();
        assert_eq!(all.len(), 11);
        assert_eq!(&all[7..], &Variant::BEFORE);
        let v = select_variants(&only(&["direct", "agent-mtls/accel-off", "agent-mtls/accel-off@before"]), true).unwrap();
        assert_eq!(names(&v), ["direct", "agent-mtls/accel-off", "agent-mtls/accel-off@before"]);
        let v = select_variants(&only(&["agent-l7/accel-on", "haproxy-http"]), true).unwrap();
        assert_eq!(names(&v), ["agent-l7/accel-on", "haproxy-http", "agent-l7/accel-on@before"]);
        let v = select_variants(&only(&["agent-l7/accel-on@before"]), true).unwrap();
        assert_eq!(names(&v), ["agent-l7/accel-on@before"]);
        assert!(select_variants(&only(&["agent-l7/accel-on@before"]), false).is_err());
        assert!(select_variants(&only(&["direct@before"]), true).is_err());
    }
}
