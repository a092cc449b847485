//! Whole agents in-process: each one built by [`app::build`] from a
//! config, as the binary builds it, on the in-memory kernel
//! ([`MemoryKernel`]), with an in-process CA shared by the agents of one
//! [`FileMesh`], the local-file source reading a real file (watched and
//! hot-reloaded), a run directory of its own (node lock, handoff socket)
//! and its pods on loopback addresses. No root.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use super::{DOC_NET, MemoryKernel, fresh_net, on_loopback};
use crate::{
    app::{self, Bound, Ca, KernelLoader, Parts},
    config::{CaConfig, Config},
    identity::Authority,
    proxy::OrigDstLookup,
};

/// How often a test agent looks at its file and at the kernel: the
/// smallest the config allows, so a test's change shows up at once.
const CONFIG_POLL: Duration = Duration::from_millis(10);
const RECONCILE_INTERVAL: Duration = Duration::from_millis(100);
/// Longer than any test's in-flight request: a drain that ends earlier
/// ended because its connections did.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A mesh whose state is a local file, with its CA, for whole agents.
pub struct FileMesh {
    dir: PathBuf,
    file: PathBuf,
    net: [u8; 3],
    ca: Arc<Authority>,
}

impl FileMesh {
    /// `yaml`: a local-file mesh state whose addresses are written `NET.n`
    /// (this mesh's own `127.x.y.n` once the agents read it).
    pub fn new(yaml: &str) -> Self {
        let net = fresh_net();
        let dir = std::env::temp_dir().join(format!("nodemesh-test-{}-{}-{}", std::process::id(), net[1], net[2]));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let mesh = Self { file: dir.join("mesh.yaml"), dir, net, ca: Arc::new(Authority::in_memory().expect("an in-memory CA")) };
        mesh.write(yaml);
        mesh
    }

    /// Replaces the file (atomically: an agent never reads half of it).
    pub fn write(&self, yaml: &str) {
        let tmp = self.dir.join("mesh.yaml.new");
        std::fs::write(&tmp, yaml.replace("NET", DOC_NET)).expect("writing the mesh file");
        std::fs::rename(&tmp, &self.file).expect("replacing the mesh file");
    }

    /// `NET.last`, as the agents see it.
    pub fn ip(&self, last: u8) -> IpAddr {
        IpAddr::from([self.net[0], self.net[1], self.net[2], last])
    }

    pub fn addr(&self, last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(last), port)
    }

    /// The config the agent of `node` runs with: the mesh's file, admin
    /// and metrics listeners on free loopback ports, its own run directory.
    pub fn config(&self, node: &str) -> Config {
        Config {
            node: node.into(),
            config_file: self.file.clone(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            drain_timeout: DRAIN_TIMEOUT,
            config_poll: CONFIG_POLL,
            data_threads: 1,
            accelerate: crate::config::Acceleration::Off,
            reconcile_interval: RECONCILE_INTERVAL,
            // Never dialled: the CA is in the process (`Ca::InProcess`).
            ca: CaConfig {
                endpoint: "https://127.0.0.1:15012".into(),
                roots: self.dir.join("unused-roots.pem"),
                token_file: self.dir.join("unused-token"),
                cert_ttl: None,
            },
            kube: None,
            trace: crate::telemetry::trace::TraceConfig::new(None, 0.0),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            access_log: crate::access_log::Target::Off,
            bpffs: self.dir.join("bpffs"),
            run_dir: self.dir.join("run"),
            fail_open: false,
            max_connections: crate::proxy::DEFAULT_MAX_CONNECTIONS,
            max_app_connections: crate::proxy::DEFAULT_MAX_APP_CONNECTIONS,
            scope: crate::state::Scope::default(),
        }
    }

    /// The parts of an in-process agent over `kernel`.
    pub fn parts(&self, kernel: MemoryKernel) -> Parts<MemoryKernel> {
        let net = self.net;
        Parts {
            kernel,
            ca: Ca::InProcess(self.ca.clone()),
            data: tokio::runtime::Handle::current(),
            state_map: Some(Arc::new(move |s: &crate::state::MeshState| on_loopback(s.clone(), net))),
        }
    }

    /// The agent of `node`, built with [`FileMesh::config`].
    pub async fn start(&self, node: &str) -> Node {
        self.build(self.config(node), MemoryKernel::new()).await.unwrap_or_else(|e| panic!("the agent of {node} starts: {}", crate::error_chain(&e)))
    }

    /// An agent built from `cfg` (a [`FileMesh::config`], changed) on
    /// `kernel` (a new one, or another agent's: what is pinned on its node).
    pub async fn build(&self, cfg: Config, kernel: MemoryKernel) -> Result<Node, app::Error> {
        let bound = app::build(cfg, self.parts(kernel.clone())).await?;
        Ok(Node { bound, kernel })
    }
}

impl Drop for FileMesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One node's agent, as [`app::build`] returned it, and its kernel.
pub struct Node {
    pub bound: Bound<MemoryKernel>,
    /// What the agent attached, enrolled and captured.
    pub kernel: MemoryKernel,
}

impl Node {
    /// A connection from the pod at `from` to `orig`, through the kernel's
    /// connect hooks (to the agent when the pod is enrolled).
    pub async fn connect(&self, from: IpAddr, orig: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        self.kernel.connect(from, orig).await
    }

    /// Waits (up to the harness's patience) until the agent is ready.
    pub async fn ready(&self) {
        let readiness = self.bound.readiness();
        tokio::time::timeout(super::PATIENCE, readiness.wait()).await.expect("the agent ready within the patience");
    }
}

/// Nothing in memory needs privileges, and the connect hooks' original
/// destinations are the kernel's own table.
impl KernelLoader for MemoryKernel {
    type Kernel = MemoryKernel;

    fn check(&self) -> Result<(), app::Error> {
        Ok(())
    }

    fn load(self, _cfg: &Config) -> Result<(MemoryKernel, Arc<dyn OrigDstLookup>), app::Error> {
        let orig_dst = self.orig_dst();
        Ok((self, orig_dst))
    }
}
