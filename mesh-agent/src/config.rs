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
    /// Socket-to-socket acceleration of in-pod hops (sockhash + sk_msg).
    pub accelerate: bool,
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
            accelerate: true,
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
