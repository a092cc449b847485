//! The agent's own settings (not the mesh state): which node it is, where its
//! inputs are, its ports and timeouts. Names of flags, environment variables
//! and defaults sit together here; nothing else reads the environment.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub const ENV_NODE_NAME: &str = "NODE_NAME";
pub const ENV_CONFIG: &str = "MESH_CONFIG";
pub const ENV_ADMIN: &str = "MESH_ADMIN_ADDR";
pub const ENV_ACCESS_LOG: &str = "MESH_ACCESS_LOG";
pub const ENV_METRICS: &str = "MESH_METRICS_ADDR";
pub const ENV_CA_ENDPOINT: &str = "MESH_CA_ENDPOINT";
pub const ENV_CA_ROOTS: &str = "MESH_CA_ROOTS";
pub const ENV_CA_TOKEN_FILE: &str = "MESH_CA_TOKEN_FILE";
pub const ENV_SOURCE: &str = "MESH_SOURCE";
pub const ENV_TRUST_DOMAIN: &str = "MESH_TRUST_DOMAIN";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
/// Kubernetes gives a pod 30 s by default between SIGTERM and SIGKILL; the
/// drain must end before that.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "20s";
pub const DEFAULT_CONFIG_POLL: &str = "500ms";
pub const DEFAULT_RECONCILE_INTERVAL: &str = "5s";
pub const ENV_BPFFS: &str = "MESH_BPFFS";
pub const ENV_RUN_DIR: &str = "MESH_RUN_DIR";
pub const ENV_FAILURE_POLICY: &str = "MESH_FAILURE_POLICY";
pub const ENV_ENROLLMENT_LABEL: &str = "MESH_ENROLLMENT_LABEL";
pub const ENV_CLUSTER_ID: &str = "MESH_CLUSTER_ID";
pub const ENV_ROOT_NAMESPACE: &str = "MESH_ROOT_NAMESPACE";
/// `--enrollment-label`'s default: [`crate::state::DATAPLANE_MODE_LABEL`]`=enabled`.
pub const DEFAULT_ENROLLMENT_LABEL: &str = "nodemesh.io/dataplane-mode=enabled";
/// Where programs, links and maps are pinned (under `nodemesh/<node>/`).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// The node lock and the handoff socket (under `<node>/`).
pub const DEFAULT_RUN_DIR: &str = "/run/nodemesh";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--admin {0}: the admin listener must be on a loopback address (it is unauthenticated)")]
    AdminNotLoopback(SocketAddr),
    #[error("--node: a node name is required (flag or {ENV_NODE_NAME})")]
    NoNode,
    #[error("--config-poll {0:?}: must be between 10ms and 60s")]
    Poll(Duration),
    #[error("--drain-timeout {0:?}: must be at most 10m")]
    Drain(Duration),
    #[error("--reconcile-interval {0:?}: must be between 100ms and 10m")]
    Reconcile(Duration),
    #[error("--ca-endpoint {0:?}: must be an https:// URL (the CA is only served over TLS)")]
    CaEndpoint(String),
    #[error("--cert-ttl {0:?}: must be between 1s and 30 days")]
    CertTtl(Duration),
    #[error("--config: the local config file is required unless --source kube")]
    NoConfigFile,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub config_file: PathBuf,
    pub admin_addr: SocketAddr,
    pub drain_timeout: Duration,
    pub config_poll: Duration,
    /// Worker threads of the data-plane runtime.
    pub data_threads: usize,
    /// Which connections skip the TCP/IP stack (sockhash + sk_msg).
    pub accelerate: Acceleration,
    /// How often enrollment is checked against the kernel even without a
    /// state change (drift repair).
    pub reconcile_interval: Duration,
    pub ca: CaConfig,
    /// `Some`: the mesh state comes from the Kubernetes API, not `config_file`.
    pub kube: Option<KubeConfig>,
    /// Distributed tracing (`--otlp-endpoint`, `--trace-sampling`).
    pub trace: crate::telemetry::trace::TraceConfig,
    /// The public metrics listener (`--metrics`), if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Where access logs go.
    pub access_log: crate::access_log::Target,
    /// The bpf filesystem the node's kernel state is pinned in.
    pub bpffs: PathBuf,
    /// The node lock and handoff socket live under `<run_dir>/<node>/`.
    pub run_dir: PathBuf,
    /// Mesh-wide failure policy `open` (`--failure-policy open`); a
    /// namespace's `nodemesh.io/failure-policy` label overrides it.
    pub fail_open: bool,
    /// Caps on concurrent connections: per agent, and to each pod's apps.
    pub max_connections: usize,
    pub max_app_connections: usize,
    /// The namespace label that enrolls (`--enrollment-label`) and the
    /// cluster id of metrics (`--cluster-id`), for either source.
    pub scope: crate::state::Scope,
}

/// The Kubernetes source (`--source kube`): the API server is the one of the
/// cluster the agent runs in, or `KUBECONFIG`'s.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    pub trust_domain: String,
    /// A kubeconfig file instead of the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
}

/// Where workload certificates come from.
#[derive(Clone, Debug)]
pub struct CaConfig {
    /// `https://host:port` of `mesh-agent ca`.
    pub endpoint: String,
    /// PEM bundle the CA's serving certificate chains to.
    pub roots: PathBuf,
    /// This node's credential for the CA (a bootstrap token in local mode).
    pub token_file: PathBuf,
    /// Certificate lifetime to ask for; `None`: the CA's default (24 h).
    pub cert_ttl: Option<Duration>,
}

impl Config {
    /// Cross-field rules; run once at start and logged.
    pub fn validate(&self) -> Result<(), Error> {
        if self.node.trim().is_empty() {
            return Err(Error::NoNode);
        }
        if !self.admin_addr.ip().is_loopback() {
            return Err(Error::AdminNotLoopback(self.admin_addr));
        }
        if self.config_poll < Duration::from_millis(10) || self.config_poll > Duration::from_secs(60) {
            return Err(Error::Poll(self.config_poll));
        }
        if self.drain_timeout > Duration::from_secs(600) {
            return Err(Error::Drain(self.drain_timeout));
        }
        if self.reconcile_interval < Duration::from_millis(100) || self.reconcile_interval > Duration::from_secs(600) {
            return Err(Error::Reconcile(self.reconcile_interval));
        }
        if self.kube.is_none() && self.config_file.as_os_str().is_empty() {
            return Err(Error::NoConfigFile);
        }
        if !self.ca.endpoint.starts_with("https://") {
            return Err(Error::CaEndpoint(self.ca.endpoint.clone()));
        }
        if let Some(ttl) = self.ca.cert_ttl
            && (ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 86400))
        {
            return Err(Error::CertTtl(ttl));
        }
        Ok(())
    }
}

/// The `run` flags: each one's name, environment variable, default and
/// help, parsed by clap; [`RunArgs::into_config`] turns them into the
/// [`Config`] the agent runs with (checked by [`Config::validate`]).
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The local mesh config file (YAML), watched for changes (`--source file`).
    #[arg(long, env = ENV_CONFIG, required_if_eq("source", "file"))]
    pub config: Option<PathBuf>,
    /// Where the mesh state comes from: the local file, or the Kubernetes
    /// API (in-cluster service account, or KUBECONFIG).
    #[arg(long, env = ENV_SOURCE, value_enum, default_value_t = Source::File)]
    pub source: Source,
    /// With `--source kube`: a kubeconfig file instead of the in-cluster
    /// service account (or KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The SPIFFE trust domain with `--source kube` (the file names its own).
    #[arg(long, env = ENV_TRUST_DOMAIN, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// This node's name, as in the config file.
    #[arg(long, env = ENV_NODE_NAME)]
    pub node: String,
    /// Admin listener (loopback only); port 0 picks a free port.
    #[arg(long, env = ENV_ADMIN, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// How long in-flight connections may take to finish on shutdown.
    #[arg(long, default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How often the config file is checked for changes.
    #[arg(long, default_value = DEFAULT_CONFIG_POLL, value_parser = parse_duration)]
    pub config_poll: Duration,
    /// Worker threads of the data plane. One by default: on the
    /// benchmark's 2-core node one thread had 35-40% less added latency
    /// and 10-15% less CPU than two, and no lower throughput (every
    /// hop between two threads is a wake-up); raise it on nodes whose
    /// agent needs more than one core.
    #[arg(long, default_value_t = 1)]
    pub data_threads: usize,
    /// Socket-to-socket acceleration: `tunnels` (the default) moves the
    /// bytes of the agent's tunnels between two pods of this node socket
    /// to socket, past the TCP/IP stack (both ends are the agent's own
    /// sockets); `on` also the hops between apps and the agent inside a
    /// pod, where a blocking reader that shares its socket with a writer
    /// thread can get spurious EAGAIN from the kernel (README); `off`
    /// neither.
    #[arg(long, value_enum, default_value_t = Acceleration::Tunnels)]
    pub accelerate: Acceleration,
    /// How often enrollment is re-checked against the kernel (drift repair).
    #[arg(long, default_value = DEFAULT_RECONCILE_INTERVAL, value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// The certificate authority (`mesh-agent ca`), e.g. https://127.0.0.1:15012.
    #[arg(long, env = ENV_CA_ENDPOINT)]
    pub ca_endpoint: String,
    /// PEM file with the roots the CA's serving certificate chains to.
    #[arg(long, env = ENV_CA_ROOTS)]
    pub ca_roots: PathBuf,
    /// File holding this node's token for the CA.
    #[arg(long, env = ENV_CA_TOKEN_FILE)]
    pub ca_token_file: PathBuf,
    /// Workload certificate lifetime to request (default: the CA's, 24h);
    /// certificates rotate at half-life.
    #[arg(long, value_parser = parse_duration)]
    pub cert_ttl: Option<Duration>,
    /// A second listener serving only /metrics, /healthz and /ready, for
    /// Prometheus and the kubelet (e.g. 0.0.0.0:15020); off by default.
    #[arg(long, env = ENV_METRICS)]
    pub metrics: Option<SocketAddr>,
    /// Distributed tracing: `--otlp-endpoint`, `--trace-sampling`.
    #[command(flatten)]
    pub trace: crate::telemetry::trace::TraceArgs,
    /// Access log: one JSON line per request and per connection, to
    /// `stdout`, `stderr`, a file path, or `off`.
    #[arg(long, env = ENV_ACCESS_LOG, default_value = "stdout", value_parser = crate::access_log::parse_target)]
    pub access_log: crate::access_log::Target,
    /// Where the node's state outlives the agent: `--bpffs`, `--run-dir`.
    #[command(flatten)]
    pub node_state: NodeStateArgs,
    /// What an enrolled pod's connections do while no agent serves it
    /// (restart, crash): `closed` refuses them (never plaintext, never
    /// unpoliced), `open` lets them go direct. A namespace's
    /// `nodemesh.io/failure-policy` label overrides it.
    #[arg(long, env = ENV_FAILURE_POLICY, value_enum, default_value_t = FailurePolicy::Closed)]
    pub failure_policy: FailurePolicy,
    /// Connections the agent carries at once, all pods together; beyond
    /// it new connections are reset and counted
    /// (`nodemesh_connection_overflows_total{limit="agent"}`).
    #[arg(long, default_value_t = crate::proxy::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections the agent keeps open to one pod's applications;
    /// beyond it a delivery is refused (L4: reset; HTTP: 503) and
    /// counted (`{limit="app"}`).
    #[arg(long, default_value_t = crate::proxy::DEFAULT_MAX_APP_CONNECTIONS)]
    pub max_app_connections: usize,
    #[command(flatten)]
    pub enrollment: EnrollmentArgs,
    /// The cluster's name in metrics (`source_cluster`,
    /// `destination_cluster`), as Istio's `CLUSTER_ID`.
    #[arg(long, env = ENV_CLUSTER_ID, default_value = crate::state::DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,
}

/// `--enrollment-label` (`run`, `check` and `ca`: all read the local file
/// the same way).
#[derive(clap::Args, Clone, Debug)]
pub struct EnrollmentArgs {
    /// The namespace label KEY=VALUE that puts a namespace's pods in the
    /// mesh; a pod opts out with KEY=disabled. The same on every agent.
    /// Pods Istio ambient captures (`istio.io/dataplane-mode=ambient` on
    /// the pod or its namespace) are never enrolled, and Istio's key is
    /// refused, so the two meshes never both take a pod.
    #[arg(long = "enrollment-label", value_name = "KEY=VALUE", env = ENV_ENROLLMENT_LABEL,
          default_value = DEFAULT_ENROLLMENT_LABEL, value_parser = crate::state::Enrollment::parse)]
    pub label: crate::state::Enrollment,
    /// The namespace whose AuthorizationPolicy and PeerAuthentication
    /// objects apply mesh-wide, as Istio's `rootNamespace` (beside it here
    /// because the local file's check follows it too). The same on every agent.
    #[arg(long = "root-namespace", value_name = "NAMESPACE", env = ENV_ROOT_NAMESPACE,
          default_value = crate::state::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
}

impl EnrollmentArgs {
    /// The scope of a reader that reports no metrics (`check`, `ca`): the
    /// default cluster id.
    pub fn scope(&self) -> crate::state::Scope {
        crate::state::Scope { enrollment: self.label.clone(), root_namespace: self.root_namespace.clone(), ..Default::default() }
    }
}

/// Where a node's state outlives the agent (`run` and `uninstall`).
#[derive(clap::Args, Clone, Debug)]
pub struct NodeStateArgs {
    /// The bpf filesystem where the node's programs, links and maps are
    /// pinned (under `nodemesh/<node>/`).
    #[arg(long, env = ENV_BPFFS, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Directory of the node lock and the handoff socket (under `<node>/`).
    #[arg(long, env = ENV_RUN_DIR, default_value = DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
}

// The values of the choice flags below carry no doc comments on purpose:
// clap would print them as a "Possible values:" list under the flag, and
// the flag's own help already says what each one does.

/// `--source`: where the mesh state comes from, `file` or `kube`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    // The local config file (`--config`).
    File,
    // The Kubernetes API.
    Kube,
}

/// `--accelerate`: which connections skip the TCP/IP stack.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceleration {
    // None.
    Off,
    // The agent's tunnels between two pods of the node.
    Tunnels,
    // Those, and the in-pod hops between apps and the agent.
    On,
}

impl Acceleration {
    /// The flag's value, as `/status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Acceleration::Off => "off",
            Acceleration::Tunnels => "tunnels",
            Acceleration::On => "on",
        }
    }
}

/// `--failure-policy`: what an enrolled pod's connections do while no agent
/// serves it, `closed` or `open` (the config holds it as `fail_open`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    // Refused: never plaintext, never unpoliced.
    Closed,
    // Direct, past the mesh.
    Open,
}

impl RunArgs {
    /// The agent's settings from its flags; cross-field rules are left to
    /// [`Config::validate`] (run by the agent at start, and logged).
    pub fn into_config(self) -> Config {
        Config {
            node: self.node,
            config_file: self.config.unwrap_or_default(),
            admin_addr: self.admin,
            drain_timeout: self.drain_timeout,
            config_poll: self.config_poll,
            data_threads: self.data_threads.max(1),
            accelerate: self.accelerate,
            reconcile_interval: self.reconcile_interval,
            ca: CaConfig {
                endpoint: self.ca_endpoint,
                roots: self.ca_roots,
                token_file: self.ca_token_file,
                cert_ttl: self.cert_ttl,
            },
            kube: (self.source == Source::Kube)
                .then_some(KubeConfig { trust_domain: self.trust_domain, kubeconfig: self.kubeconfig }),
            metrics_addr: self.metrics,
            trace: self.trace.into_config(),
            access_log: self.access_log,
            bpffs: self.node_state.bpffs,
            run_dir: self.node_state.run_dir,
            fail_open: self.failure_policy == FailurePolicy::Open,
            max_connections: self.max_connections,
            max_app_connections: self.max_app_connections,
            scope: crate::state::Scope {
                enrollment: self.enrollment.label,
                cluster_id: self.cluster_id,
                root_namespace: self.enrollment.root_namespace,
            },
        }
    }
}

/// Parses "250ms", "5s", "2m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?}: missing unit (ms, s or m)"))?;
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: not a number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s or m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            node: "node-a".into(),
            config_file: "/x".into(),
            admin_addr: DEFAULT_ADMIN.parse().unwrap(),
            drain_timeout: parse_duration(DEFAULT_DRAIN_TIMEOUT).unwrap(),
            config_poll: parse_duration(DEFAULT_CONFIG_POLL).unwrap(),
            data_threads: 1,
            accelerate: Acceleration::On,
            reconcile_interval: parse_duration(DEFAULT_RECONCILE_INTERVAL).unwrap(),
            ca: CaConfig {
                endpoint: "https://127.0.0.1:15012".into(),
                roots: "/x".into(),
                token_file: "/y".into(),
                cert_ttl: None,
            },
            kube: None,
            metrics_addr: None,
            trace: crate::telemetry::trace::TraceConfig::new(None, 0.01),
            access_log: crate::access_log::Target::Off,
            bpffs: DEFAULT_BPFFS.into(),
            run_dir: DEFAULT_RUN_DIR.into(),
            fail_open: false,
            max_connections: 100_000,
            max_app_connections: 16_384,
            scope: crate::state::Scope::default(),
        }
    }

    /// `run`'s flags as the binary parses them (environment aside).
    fn run_args(args: &[&str]) -> Result<Config, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let required = ["--node", "node-a", "--ca-endpoint", "https://127.0.0.1:15012", "--ca-roots", "/r", "--ca-token-file", "/t"];
        let argv = ["run"].into_iter().chain(required).chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).map(|c| c.run.into_config())
    }

    #[test]
    fn run_flags_make_the_config() {
        for var in [ENV_SOURCE, ENV_FAILURE_POLICY, ENV_CONFIG, ENV_ENROLLMENT_LABEL, ENV_CLUSTER_ID, ENV_ROOT_NAMESPACE] {
            if std::env::var_os(var).is_some() {
                return; // set by the caller: the defaults below do not apply
            }
        }
        let c = run_args(&["--config", "/m.yaml"]).unwrap();
        assert!(c.kube.is_none() && !c.fail_open);
        assert_eq!(c.accelerate, Acceleration::Tunnels, "the agent's own tunnels only, by default");
        assert_eq!(c.config_file, PathBuf::from("/m.yaml"));
        assert_eq!(c.drain_timeout, parse_duration(DEFAULT_DRAIN_TIMEOUT).unwrap());
        assert_eq!(c.scope, crate::state::Scope::default());
        assert_eq!(c.scope.cluster_id, "Kubernetes");
        assert_eq!(DEFAULT_ENROLLMENT_LABEL, crate::state::Enrollment::default().to_string());
        let c = run_args(&["--config", "/m.yaml", "--enrollment-label", "mesh.example.com/member=yes", "--cluster-id", "east"]).unwrap();
        assert_eq!((c.scope.enrollment.key.as_str(), c.scope.enrollment.value.as_str()), ("mesh.example.com/member", "yes"));
        assert_eq!(c.scope.cluster_id, "east");
        assert_eq!(c.scope.root_namespace, "istio-system");
        let c = run_args(&["--config", "/m.yaml", "--root-namespace", "mesh-root"]).unwrap();
        assert_eq!(c.scope.root_namespace, "mesh-root");
        let c = run_args(&["--source", "kube", "--accelerate", "on", "--failure-policy", "open", "--data-threads", "0"]).unwrap();
        assert!(c.accelerate == Acceleration::On && c.fail_open);
        assert_eq!(run_args(&["--accelerate", "off"]).unwrap().accelerate, Acceleration::Off);
        assert_eq!(c.data_threads, 1);
        assert_eq!(c.kube.map(|k| k.trust_domain), Some(DEFAULT_TRUST_DOMAIN.to_owned()));
        for bad in [
            ["--source", "File"],
            ["--accelerate", "yes"],
            ["--failure-policy", "fail-open"],
            ["--enrollment-label", "istio.io/dataplane-mode=ambient"],
            ["--enrollment-label", "member"],
        ] {
            assert!(run_args(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn validation() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.admin_addr = "0.0.0.0:15000".parse().unwrap();
        assert!(matches!(c.validate(), Err(Error::AdminNotLoopback(_))));
        let mut c = cfg();
        c.node = String::new();
        assert!(matches!(c.validate(), Err(Error::NoNode)));
        let mut c = cfg();
        c.ca.endpoint = "http://127.0.0.1:15012".into();
        assert!(matches!(c.validate(), Err(Error::CaEndpoint(_))));
        let mut c = cfg();
        c.config_file = PathBuf::new();
        assert!(matches!(c.validate(), Err(Error::NoConfigFile)));
        c.kube = Some(KubeConfig { trust_domain: DEFAULT_TRUST_DOMAIN.into(), kubeconfig: None });
        assert!(c.validate().is_ok());
    }
}
