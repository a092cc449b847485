//! What [`super::build`] is given besides the config: the parts an agent
//! on a node and an agent in a test do differently.

use std::sync::Arc;

use super::Error;
use crate::{
    config::Config,
    ebpf::{self, Datapath},
    enroll::Kernel,
    identity::Authority,
    proxy::OrigDstLookup,
    state::MeshState,
};

/// What [`super::build`] takes besides the config: the parts an agent on a node
/// and an agent in a test do differently.
pub struct Parts<L> {
    /// The kernel side, loaded once the node is claimed and the admin
    /// listeners are bound.
    pub kernel: L,
    /// Where workload certificates come from.
    pub ca: Ca,
    /// The data-plane runtime the proxy serves on.
    pub data: tokio::runtime::Handle,
    /// A rewrite of every mesh state the source publishes, before anything
    /// reads it. `None` on a node. Tests move the file's pod and service
    /// addresses onto `127.x.y.z` ones: the local file refuses loopback pod
    /// addresses, rightly on a node, and loopback is all a test has.
    pub state_map: Option<StateMap>,
}

pub type StateMap = Arc<dyn Fn(&MeshState) -> MeshState + Send + Sync>;

impl Parts<Ebpf> {
    /// The agent on a node: the eBPF kernel, the CA of the config over gRPC.
    pub fn node(data: tokio::runtime::Handle) -> Self {
        Parts { kernel: Ebpf, ca: Ca::Grpc, data, state_map: None }
    }
}

/// Where workload certificates come from.
pub enum Ca {
    /// `mesh-agent ca` over gRPC, as the config says (`--ca-*`).
    Grpc,
    /// An authority in this process, with the same rules as the CA
    /// (certificates only for this node's pods).
    InProcess(Arc<Authority>),
}

/// Loads the kernel side of the agent.
pub trait KernelLoader {
    type Kernel: Kernel;
    /// Before the node is claimed: whether this process can do what the
    /// kernel side needs, with what is missing if not.
    fn check(&self) -> Result<(), Error>;
    /// The kernel side, and where redirected connections were going.
    fn load(self, cfg: &Config) -> Result<(Self::Kernel, Arc<dyn OrigDstLookup>), Error>;
}

/// The node's kernel: the embedded eBPF programs, loaded and attached.
pub struct Ebpf;

impl KernelLoader for Ebpf {
    type Kernel = Datapath;

    fn check(&self) -> Result<(), Error> {
        Ok(crate::host::check_privileges()?)
    }

    fn load(self, cfg: &Config) -> Result<(Datapath, Arc<dyn OrigDstLookup>), Error> {
        let mut datapath = Datapath::load(ebpf::Options {
            accelerate: cfg.accelerate,
            bpffs: cfg.bpffs.clone(),
            node: cfg.node.clone(),
        })?;
        ebpf::spawn_logger(datapath.ebpf_mut());
        if cfg.accelerate != crate::config::Acceleration::Off {
            let (own, is_root) = crate::host::own_cgroup()?;
            if datapath.attach_agent_cgroup(&own, is_root)? {
                tracing::info!(cgroup = %own.display(), takes = datapath.acceleration().name(), "socket acceleration on");
            }
        }
        let orig_dst = Arc::new(datapath.orig_dst());
        Ok((datapath, orig_dst))
    }
}
