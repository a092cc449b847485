//! `mesh_e2e`: the namespaced end-to-end harness.
//!
//! A *pod* is a network namespace with an address on a private bridge plus a
//! cgroup v2 directory; a *node* is one `mesh-agent` process. A [`Testbed`]
//! owns everything it creates (a private "fabric" netns holding the bridge,
//! pod namespaces, cgroups, a temp dir) and removes it on drop, also while a
//! test panics. The host's own interfaces and routes are never touched, and
//! only the pod ranges below are ever addressed.
//!
//! ```no_run
//! use mesh_e2e::{PodSpec, Testbed};
//! # fn main() -> anyhow::Result<()> {
//! let mut tb = Testbed::new("my_test")?;
//! let server = tb.add_pod(PodSpec::new("server", "shop", "node-a", [198, 51, 100, 12].into()))?;
//! let client = tb.add_pod(PodSpec::new("client", "shop", "node-a", [198, 51, 100, 11].into()))?;
//! let _echo = server.start_echo(9000)?;
//! let out = client.run("meshtest", ["send", "--to", "198.51.100.12:9000", "--bytes", "1024"])?;
//! # Ok(()) }
//! ```
//!
//! | module | what it holds |
//! | --- | --- |
//! | `host` | preflight checks (root, `ip`, cgroup2 mount) and binary discovery |
//! | `netns` | the `ip` invocations (netns, veth, bridge) |
//! | `cgroup` | create, kill and remove cgroup v2 directories |
//! | `process` | captured output and child handles shared by pods and agents |
//! | `testbed` | [`Testbed`], naming, cleanup and the sweep of leftovers |
//! | `pod` | [`Pod`]: running processes inside a pod's netns and cgroup |
//! | `config` | the agent's local YAML config, generated from the testbed |
//! | `agent` | [`Agent`]: one node agent process and its admin API |
//! | `ca` | [`Ca`]: the mesh's certificate authority, node tokens |
//! | `capture` | [`Capture`]: raw frames on the fabric bridge |
//! | `status` | typed view of the agent's `/status` JSON |
//! | [`otlp`] | a real OTLP/gRPC trace receiver (`meshotlp`), its output parsed |
//! | `wait` | deadline-bounded polling |
//! | [`conformance`] | Gateway API mesh conformance: `manifests.yaml` on the test API server, echo pods, two agents |
//! | [`kubeapi`] | a Kubernetes API server for tests (list, watch, 410, bookmarks, RBAC denials) |
//! | [`image`] | the agent's OCI image under podman, run as `deploy/agent.yaml`'s DaemonSet runs it |

mod agent;
mod ca;
mod capture;
mod cgroup;
pub mod conformance;
mod config;
mod host;
pub mod image;
pub mod kubeapi;
mod netns;
pub mod otlp;
mod pod;
mod process;
mod status;
mod testbed;
mod wait;

pub use agent::{Agent, http_get_once as http_get};
pub use ca::{Ca, CaOptions};
pub use capture::{Capture, Frames, TcpSegment};
pub use config::{
    ENROLL_LABEL, ENROLL_VALUE, LocalConfig, NamespaceEntry, NodeEntry, PeerAuthMode,
    PeerAuthenticationEntry, PodEntry, ServiceEntry, ServicePortEntry, write_atomic,
};
pub use host::{agent_bin, cgroup2_mount, meshecho_bin, meshhttp_bin, meshotlp_bin, meshtest_bin};
pub use pod::{Pod, PodProcess, RUN_TIMEOUT};
pub use status::{
    CertificateStatus, ConfigStatus, EbpfStatus, PodCounters, PodEbpf, PodProxy, PodStatus, Status,
    TlsStatus, peers_since,
};
pub use testbed::{CleanupHandle, POD_RANGES, PodSpec, ServicePort, ServiceSpec, SignalTeardown, Testbed};
pub use wait::{wait_for, wait_until};
