//! [`Testbed`]: one test's private little cluster, and its cleanup.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::agent::{self, Agent, AgentProc};
use crate::ca::{Ca, CaOptions};
use crate::capture::Capture;
use crate::config::{self, LocalConfig, PeerAuthenticationEntry};
use crate::pod::Pod;
use crate::{cgroup, host, netns};

/// The only addresses pods may have (RFC 5737 documentation ranges): test
/// traffic can never reach a real host, and there is no default route.
pub const POD_RANGES: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 0),
    Ipv4Addr::new(203, 0, 113, 0),
];

/// Prefix of every netns and cgroup a testbed creates: `mt-NAME-PID-N`.
const PREFIX: &str = "mt";
/// Parent of all testbeds' cgroups, under the cgroup2 mount.
const CGROUP_PARENT: &str = "mesh-e2e";
const CGROUP_REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// What a pod is: the Kubernetes-ish facts the agent config needs, plus its
/// address. Pod names must be unique within a testbed (they name the netns
/// and cgroup), even across namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    /// Kubernetes namespace: only a string for the generated config.
    pub namespace: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

impl PodSpec {
    /// A pod labelled `app: NAME`, service account `default`.
    pub fn new(
        name: impl Into<String>,
        namespace: impl Into<String>,
        node: impl Into<String>,
        ip: Ipv4Addr,
    ) -> Self {
        let name = name.into();
        PodSpec {
            labels: BTreeMap::from([("app".to_string(), name.clone())]),
            name,
            namespace: namespace.into(),
            node: node.into(),
            ip,
            service_account: "default".into(),
        }
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Replaces all labels (including the default `app`).
    pub fn labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.labels = labels;
        self
    }

    pub fn service_account(mut self, sa: impl Into<String>) -> Self {
        self.service_account = sa.into();
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
}

impl ServicePort {
    pub fn tcp(port: u16, target_port: u16) -> Self {
        ServicePort {
            name: "tcp".into(),
            port,
            target_port,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    /// Virtual IP; must lie in [`POD_RANGES`] when set. Nothing owns it.
    pub ip: Option<Ipv4Addr>,
}

impl ServiceSpec {
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        ServiceSpec {
            name: name.into(),
            namespace: namespace.into(),
            ports: Vec::new(),
            selector: BTreeMap::new(),
            ip: None,
        }
    }

    pub fn port(mut self, port: u16, target_port: u16) -> Self {
        let name = if self.ports.is_empty() {
            "tcp".to_string()
        } else {
            format!("tcp-{port}")
        };
        self.ports.push(ServicePort {
            name,
            port,
            target_port,
        });
        self
    }

    pub fn select(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.selector.insert(key.into(), value.into());
        self
    }

    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(ip);
        self
    }
}

/// Everything a testbed created, kept apart from [`Testbed`] so that a
/// signal handler thread (Ctrl-C in the demo) can tear it down too.
struct Resources {
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    agents: Vec<Weak<AgentProc>>,
    dir: PathBuf,
    /// The testbed's own bpf filesystem (agents pin their state there).
    bpffs: Option<PathBuf>,
    done: bool,
}

/// Tears a testbed down from anywhere (e.g. a signal-handling thread).
/// Idempotent: the first call does the work, later calls return `Ok`.
#[derive(Clone)]
pub struct CleanupHandle(Arc<Mutex<Resources>>);

/// Ctrl-C for the tools that run a testbed (demo, bench): SIGINT and
/// SIGTERM are blocked in every thread (threads inherit the mask; spawned
/// processes get a clean one from std), and once armed one thread waits for
/// them, tears the testbed down and exits, whatever main is blocked on.
pub struct SignalTeardown(nix::sys::signal::SigSet);

impl SignalTeardown {
    /// Blocks the signals: call it before any thread starts.
    pub fn block() -> Result<Self> {
        use nix::sys::signal::{SigSet, Signal};
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGINT);
        signals.add(Signal::SIGTERM);
        signals.thread_block().context("blocking SIGINT/SIGTERM")?;
        Ok(Self(signals))
    }

    /// From now on a signal tears `tb` down and exits with 130.
    pub fn arm(self, tb: &Testbed) {
        let cleanup = tb.cleanup_handle();
        std::thread::spawn(move || {
            if let Ok(sig) = self.0.wait() {
                eprintln!("\n{sig:?} received: tearing the testbed down");
                if let Err(e) = cleanup.cleanup() {
                    eprintln!("cleanup incomplete: {e:#}");
                }
                std::process::exit(130);
            }
        });
    }
}

impl CleanupHandle {
    /// Kills agents and every process in the pods' cgroups, deletes the
    /// namespaces (which removes the veths and the bridge), removes the
    /// cgroups leaf first, and the temp dir unless the thread is panicking
    /// or `MESH_E2E_KEEP` is set (so logs survive a failing test).
    pub fn cleanup(&self) -> Result<()> {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if r.done {
            return Ok(());
        }
        r.done = true;
        let mut errors = Vec::new();
        for agent in r.agents.drain(..) {
            if let Some(agent) = agent.upgrade() {
                agent.kill();
            }
        }
        for cg in r.cgroups.iter().rev() {
            cgroup::kill_all(cg);
        }
        for ns in r.netns.iter().rev() {
            if let Err(e) = netns::del(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        // Unmounting the testbed's bpffs drops every pin in it: the links
        // detach and the maps go with the last reference.
        if let Some(fs) = r.bpffs.take()
            && let Err(e) = nix::mount::umount2(&fs, nix::mount::MntFlags::MNT_DETACH)
            && e != nix::errno::Errno::EINVAL
        {
            errors.push(format!("unmounting {}: {e}", fs.display()));
        }
        for cg in r.cgroups.iter().rev() {
            if let Err(e) = cgroup::remove_tree(cg, CGROUP_REMOVE_TIMEOUT) {
                errors.push(format!("{e:#}"));
            }
        }
        let keep = std::thread::panicking() || std::env::var_os("MESH_E2E_KEEP").is_some();
        if !keep
            && r.dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&r.dir)
        {
            errors.push(format!("removing {}: {e}", r.dir.display()));
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(())
    }

    fn track_netns(&self, name: &str) {
        self.0.lock().unwrap().netns.push(name.to_string());
    }

    fn track_cgroup(&self, path: &Path) {
        self.0.lock().unwrap().cgroups.push(path.to_path_buf());
    }

    pub(crate) fn track_agent(&self, agent: Weak<AgentProc>) {
        self.0.lock().unwrap().agents.push(agent);
    }
}

/// One test's cluster on this machine. See the crate docs.
pub struct Testbed {
    name: String,
    dir: PathBuf,
    cgroup: PathBuf,
    pods: Vec<Pod>,
    services: Vec<ServiceSpec>,
    peer_authentications: Vec<PeerAuthenticationEntry>,
    nodes: BTreeSet<String>,
    ca: Option<Ca>,
    agent_env: agent::AgentEnv,
    /// The binary agents start from ([`Self::set_agent_bin`]); None:
    /// [`crate::agent_bin`]. Behind a lock so a benchmark sharing `&Testbed`
    /// can switch it between variants.
    agent_bin: Mutex<Option<PathBuf>>,
    cleanup: CleanupHandle,
}

impl Testbed {
    /// Checks the host (root, `ip`, cgroup2; fails loudly otherwise), sweeps
    /// leftovers of dead test processes, then creates the fabric netns with
    /// its bridge, the testbed cgroup and a temp dir.
    pub fn new(test_name: &str) -> Result<Testbed> {
        let cg_root = host::preflight()?;
        sweep_leftovers(&cg_root);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{PREFIX}-{}-{}-{n}",
            short_name(test_name),
            std::process::id()
        );
        let dir = std::env::temp_dir().join("mesh-e2e").join(&name);
        let cgroup = cg_root.join(CGROUP_PARENT).join(&name);
        let cleanup = CleanupHandle(Arc::new(Mutex::new(Resources {
            netns: Vec::new(),
            cgroups: Vec::new(),
            agents: Vec::new(),
            dir: dir.clone(),
            bpffs: None,
            done: false,
        })));
        // From here on, an early return drops `tb`, which undoes what was made.
        let tb = Testbed {
            name: name.clone(),
            dir: dir.clone(),
            cgroup: cgroup.clone(),
            pods: Vec::new(),
            services: Vec::new(),
            peer_authentications: Vec::new(),
            nodes: BTreeSet::new(),
            ca: None,
            agent_env: agent::AgentEnv::default(),
            agent_bin: Mutex::new(None),
            cleanup,
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let fs = tb.bpffs();
        std::fs::create_dir_all(&fs).with_context(|| format!("creating {}", fs.display()))?;
        tb.cleanup.0.lock().unwrap().bpffs = Some(fs.clone());
        nix::mount::mount(Some("bpf"), &fs, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting a bpf filesystem at {}", fs.display()))?;
        tb.cleanup.track_cgroup(&cgroup);
        cgroup::create(&cgroup)?;
        tb.cleanup.track_netns(&name);
        netns::add(&name).context("creating the fabric netns")?;
        netns::add_bridge(&name).context("creating the fabric bridge")?;
        Ok(tb)
    }

    /// The testbed's bpf filesystem: agents pin their node state under it.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// The testbed's run directory (node locks, handoff sockets).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// `--bpffs` and `--run-dir` for `mesh-agent run` / `uninstall` on this
    /// testbed: its nodes' state stays inside it.
    pub fn node_state_args(&self) -> Vec<String> {
        vec![
            "--bpffs".into(),
            self.bpffs().display().to_string(),
            "--run-dir".into(),
            self.run_dir().display().to_string(),
        ]
    }

    /// Unique name, `mt-NAME-PID-N`; also the fabric netns' name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The netns holding the bridge `br0` all pods are plugged into.
    pub fn fabric_netns(&self) -> &str {
        &self.name
    }

    /// Temp dir for configs and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    pub fn cleanup_handle(&self) -> CleanupHandle {
        self.cleanup.clone()
    }

    /// `RUST_LOG` for the agents started from now on (default `debug`, which
    /// tests want; a benchmark wants `warn`: debug logging per connection
    /// would be what it measures).
    pub fn set_agent_log_filter(&mut self, filter: impl Into<String>) {
        self.agent_env.log_filter = filter.into();
    }

    /// The binary the agents started from now on run (`start_agent*`, not
    /// [`Self::start_agent_with`], which names its own; not the CA, which
    /// stays [`crate::agent_bin`]): e.g. a saved build of an older commit, to
    /// measure before and after a change side by side. None: back to
    /// [`crate::agent_bin`].
    pub fn set_agent_bin(&self, bin: Option<PathBuf>) {
        *self.agent_bin.lock().unwrap() = bin;
    }

    /// The binary [`Self::start_agent`] runs now: the one given to
    /// [`Self::set_agent_bin`], else [`crate::agent_bin`].
    pub fn agent_bin(&self) -> Result<PathBuf> {
        match self.agent_bin.lock().unwrap().clone() {
            Some(bin) => Ok(bin),
            None => host::agent_bin(),
        }
    }

    /// `RLIMIT_NOFILE` (soft, hard) of the agents started from now on
    /// (None, the default: the test's own).
    pub fn set_agent_nofile(&mut self, nofile: Option<(u64, u64)>) {
        self.agent_env.nofile = nofile;
    }

    /// Declares a node with no pods (nodes of pods are declared implicitly).
    pub fn add_node(&mut self, name: impl Into<String>) {
        self.nodes.insert(name.into());
    }

    /// Creates the pod's netns (`<testbed>-<pod>`, with `lo` up and `eth0`
    /// at `ip/24` plugged into the bridge) and its cgroup.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<Pod> {
        validate_name(&spec.name).context("pod name")?;
        ensure!(
            !spec.node.is_empty(),
            "pod {}: node name is empty",
            spec.name
        );
        check_pod_ip(spec.ip).with_context(|| format!("pod {}", spec.name))?;
        if let Some(p) = self
            .pods
            .iter()
            .find(|p| p.name() == spec.name || p.ip() == spec.ip)
        {
            bail!(
                "pod {} ({}) clashes with pod {} ({})",
                spec.name,
                spec.ip,
                p.name(),
                p.ip()
            );
        }
        let ns = format!("{}-{}", self.name, spec.name);
        let cg = self.cgroup.join(&spec.name);
        let peer = format!("v{}", self.pods.len());
        self.cleanup.track_netns(&ns);
        netns::add(&ns).with_context(|| format!("creating netns for pod {}", spec.name))?;
        netns::plug_pod(&self.name, &peer, &ns, &spec.ip.to_string())
            .with_context(|| format!("wiring pod {}", spec.name))?;
        self.cleanup.track_cgroup(&cg);
        cgroup::create(&cg)?;
        self.nodes.insert(spec.node.clone());
        let pod = Pod::new(spec, ns, cg);
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Records a service for the generated config (no networking involved).
    pub fn add_service(&mut self, spec: ServiceSpec) -> Result<()> {
        validate_name(&spec.name).context("service name")?;
        if let Some(ip) = spec.ip {
            check_pod_ip(ip).with_context(|| format!("service {}", spec.name))?;
        }
        ensure!(
            !self
                .services
                .iter()
                .any(|s| s.name == spec.name && s.namespace == spec.namespace),
            "service {}/{} added twice",
            spec.namespace,
            spec.name
        );
        self.services.push(spec);
        Ok(())
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name() == name)
    }

    pub fn services(&self) -> &[ServiceSpec] {
        &self.services
    }

    /// Records a `peerAuthentications` entry for the generated config, or
    /// replaces the one with the same namespace and name (to switch a
    /// policy's mode). Takes effect at the next [`Self::write_config`].
    pub fn add_peer_authentication(&mut self, entry: PeerAuthenticationEntry) -> Result<()> {
        validate_name(&entry.name).context("peer authentication name")?;
        match self
            .peer_authentications
            .iter_mut()
            .find(|p| p.name == entry.name && p.namespace == entry.namespace)
        {
            Some(existing) => *existing = entry,
            None => self.peer_authentications.push(entry),
        }
        Ok(())
    }

    /// Forgets a `peerAuthentications` entry; true if there was one.
    pub fn remove_peer_authentication(&mut self, namespace: &str, name: &str) -> bool {
        let before = self.peer_authentications.len();
        self.peer_authentications
            .retain(|p| !(p.namespace == namespace && p.name == name));
        self.peer_authentications.len() != before
    }

    pub fn peer_authentications(&self) -> &[PeerAuthenticationEntry] {
        &self.peer_authentications
    }

    /// The agent config for this testbed; namespaces in `enrolled` carry the
    /// enrolment label. Edit the result to build invalid configs.
    pub fn config(&self, enrolled: &[&str]) -> LocalConfig {
        config::build(
            &self.nodes,
            &self.pods,
            &self.services,
            &self.peer_authentications,
            enrolled,
        )
    }

    pub fn config_yaml(&self, enrolled: &[&str]) -> String {
        self.config(enrolled).to_yaml()
    }

    /// Default config location: `<dir>/mesh.yaml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("mesh.yaml")
    }

    /// Writes the config atomically (temp file + rename), so an agent
    /// watching `path` never reads half a file.
    pub fn write_config(&self, path: &Path, enrolled: &[&str]) -> Result<()> {
        config::write_atomic(path, &self.config_yaml(enrolled))
    }

    /// Rewrites the config with a new set of enrolled namespaces (atomic).
    pub fn set_enrolled(&self, path: &Path, enrolled: &[&str]) -> Result<()> {
        self.write_config(path, enrolled)
    }

    /// Starts the mesh's CA (`mesh-agent ca`, [`crate::agent_bin`]) in the
    /// host netns on `127.0.0.1:0`, watching [`Self::config_path`] (write the
    /// config first), with its state in `<dir>/ca` and one random token per
    /// node declared so far. From then on every agent this testbed starts
    /// gets `--ca-endpoint`, `--ca-roots` and `--ca-token-file` for its node.
    /// Killed when the testbed is dropped.
    pub fn start_ca(&mut self) -> Result<Ca> {
        self.start_ca_with(CaOptions::default())
    }

    /// [`Self::start_ca`] with options (`--ttl`, more arguments).
    pub fn start_ca_with(&mut self, opts: CaOptions) -> Result<Ca> {
        ensure!(self.ca.is_none(), "this testbed already has a CA");
        let config = self.config_path();
        ensure!(
            config.is_file(),
            "write the config ({}) before starting the CA: it reads it",
            config.display()
        );
        let nodes: Vec<String> = self.nodes.iter().cloned().collect();
        let ca = Ca::start(&host::agent_bin()?, &config, &self.dir, &nodes, opts, self.cleanup.clone())?;
        self.ca = Some(ca.clone());
        Ok(ca)
    }

    /// The testbed's CA, once started.
    pub fn ca(&self) -> Option<&Ca> {
        self.ca.as_ref()
    }

    /// `node`'s CA flags followed by `args`; `args` alone when there is no
    /// CA or when they already name a CA endpoint (a test's override).
    fn agent_args_for(&self, node: &str, args: &[&str]) -> Result<Vec<String>> {
        let mut all = Vec::new();
        if let Some(ca) = &self.ca
            && !args.contains(&"--ca-endpoint")
        {
            all = ca.agent_args(node)?;
        }
        if !args.contains(&"--bpffs") {
            all.extend(self.node_state_args());
        }
        all.extend(args.iter().map(|a| a.to_string()));
        Ok(all)
    }

    /// Captures every frame crossing the fabric bridge `br0` until
    /// [`Capture::stop`]. Ready when this returns.
    pub fn capture_fabric(&self) -> Result<Capture> {
        Capture::start(&self.name, netns::BRIDGE)
    }

    /// Starts `node`'s agent with [`Self::agent_bin`] (by default
    /// [`crate::agent_bin`]) on [`Self::config_path`]; it is killed when the
    /// testbed is dropped.
    pub fn start_agent(&self, node: &str) -> Result<Agent> {
        self.start_agent_args(node, &[])
    }

    /// Starts `node`'s agent in a cgroup of its own under the testbed's (as a
    /// DaemonSet pod would be), with extra `mesh-agent run` arguments (e.g.
    /// `--cert-ttl 4s`). With a CA, its flags for `node` come first.
    pub fn start_agent_args(&self, node: &str, args: &[&str]) -> Result<Agent> {
        self.start_agent_until(node, args, "ready")
    }

    /// Like [`Self::start_agent_args`], returning once its admin listener
    /// serves, before it is ready (a pod it cannot enrol, a CA that is down).
    pub fn start_agent_unready(&self, node: &str, args: &[&str]) -> Result<Agent> {
        self.start_agent_until(node, args, "admin")
    }

    /// In a cgroup of its own, until the agent prints `event`.
    fn start_agent_until(&self, node: &str, args: &[&str], event: &str) -> Result<Agent> {
        let args = self.agent_args_for(node, args)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let cg = self.cgroup.join(format!("agent-{node}-{n}"));
        cgroup::create(&cg)?;
        self.cleanup.track_cgroup(&cg);
        let agent =
            Agent::start_until(&self.agent_bin()?, &self.config_path(), node, &self.dir, Some(&cg), &self.agent_env, &args, event)?;
        self.adopt_agent(&agent);
        Ok(agent)
    }

    /// Starts `node`'s agent inside an existing cgroup (e.g. a pod's, to
    /// test that the agent's own sockets are exempt from the pod's hooks).
    pub fn start_agent_in(&self, cgroup: &Path, node: &str, args: &[&str]) -> Result<Agent> {
        let args = self.agent_args_for(node, args)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start_in(&self.agent_bin()?, &self.config_path(), node, &self.dir, Some(cgroup), &self.agent_env, &args)?;
        self.adopt_agent(&agent);
        Ok(agent)
    }

    /// Starts `bin` as `node`'s agent on `config` (with the CA's flags when
    /// the testbed has a CA), in the test's own cgroup.
    pub fn start_agent_with(&self, bin: &Path, config: &Path, node: &str) -> Result<Agent> {
        let args = self.agent_args_for(node, &[])?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start_in(bin, config, node, &self.dir, None, &self.agent_env, &args)?;
        self.adopt_agent(&agent);
        Ok(agent)
    }

    /// Makes the testbed's cleanup kill `agent` too.
    pub fn adopt_agent(&self, agent: &Agent) {
        self.cleanup.track_agent(agent.proc_weak());
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup.cleanup() {
            eprintln!("mesh-e2e: cleanup of {} incomplete: {e}", self.name);
        }
        if self.dir.exists() {
            eprintln!(
                "mesh-e2e: kept {} (configs, agent logs)",
                self.dir.display()
            );
        }
    }
}

/// `[a-z0-9_]`, at most 16 chars: no `-`, so names parse back unambiguously.
fn short_name(test_name: &str) -> String {
    let tail = test_name.rsplit("::").next().unwrap_or(test_name);
    let s: String = tail
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(16)
        .collect();
    if s.is_empty() { "t".into() } else { s }
}

/// A DNS label, as Kubernetes requires of pod and service names.
fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    ensure!(
        ok,
        "{name:?} is not a DNS label ([a-z0-9-], at most 63, no leading/trailing '-')"
    );
    Ok(())
}

fn check_pod_ip(ip: Ipv4Addr) -> Result<()> {
    let o = ip.octets();
    let net = Ipv4Addr::new(o[0], o[1], o[2], 0);
    ensure!(
        POD_RANGES.contains(&net) && o[3] != 0 && o[3] != 255,
        "{ip} is outside the pod ranges 198.51.100.0/24 and 203.0.113.0/24 \
         (or is a network/broadcast address): tests only use addresses of their own namespaces"
    );
    Ok(())
}

/// `mt-NAME-PID-N[-POD]` -> (`mt-NAME-PID-N`, PID).
fn parse_testbed_name(s: &str) -> Option<(String, i32)> {
    let parts: Vec<&str> = s.splitn(5, '-').collect();
    if parts.len() < 4 || parts[0] != PREFIX {
        return None;
    }
    let pid: i32 = parts[2].parse().ok()?;
    parts[3].parse::<u64>().ok()?;
    Some((parts[..4].join("-"), pid))
}

/// Best effort: removes netns and cgroups of testbeds whose process is gone
/// (a test killed with SIGKILL cannot clean up after itself). Agents of such
/// testbeds died with their parent (`PR_SET_PDEATHSIG`).
fn sweep_leftovers(cg_root: &Path) {
    let is_stale = |name: &str| {
        parse_testbed_name(name).filter(|(_, pid)| {
            *pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists()
        })
    };
    let cg_parent = cg_root.join(CGROUP_PARENT);
    let cg_names: Vec<String> = std::fs::read_dir(&cg_parent)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let all_ns = netns::list();
    let stale: BTreeSet<String> = all_ns
        .iter()
        .chain(cg_names.iter())
        .filter_map(|n| is_stale(n).map(|(tb, _)| tb))
        .collect();
    // bpf filesystems of dead testbeds (their agents' pins).
    let e2e_tmp = std::env::temp_dir().join("mesh-e2e");
    for line in std::fs::read_to_string("/proc/mounts").unwrap_or_default().lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(mnt), Some("bpf")) = (f.next(), f.next(), f.next()) else { continue };
        let mnt = Path::new(mnt);
        let Ok(rest) = mnt.strip_prefix(&e2e_tmp) else { continue };
        let Some(tb) = rest.components().next().and_then(|c| c.as_os_str().to_str()) else { continue };
        if is_stale(tb).is_some() {
            let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    for tb in &stale {
        let _ = cgroup::remove_tree(&cg_parent.join(tb), Duration::from_secs(2));
        for ns in all_ns
            .iter()
            .filter(|n| parse_testbed_name(n).is_some_and(|(t, _)| &t == tb))
        {
            let _ = netns::del(ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(short_name("harness::two-pods"), "two_pods");
        assert_eq!(
            short_name("a_very_long_test_name_indeed"),
            "a_very_long_test"
        );
        let tb = format!("mt-{}-42-7", short_name("x-y"));
        assert_eq!(parse_testbed_name(&tb), Some((tb.clone(), 42)));
        assert_eq!(
            parse_testbed_name(&format!("{tb}-shop-client")),
            Some((tb, 42))
        );
        assert_eq!(parse_testbed_name("mt-foo"), None);
        assert_eq!(parse_testbed_name("other-a-1-2"), None);
    }

    #[test]
    fn pod_ips_are_confined() {
        assert!(check_pod_ip(Ipv4Addr::new(198, 51, 100, 11)).is_ok());
        assert!(check_pod_ip(Ipv4Addr::new(203, 0, 113, 9)).is_ok());
        assert!(check_pod_ip(Ipv4Addr::new(10, 0, 0, 1)).is_err());
        assert!(check_pod_ip(Ipv4Addr::new(198, 51, 100, 255)).is_err());
        assert!(validate_name("shop-client").is_ok());
        assert!(validate_name("Shop").is_err());
    }
}
