//! mesh-agent: the node agent of a sidecarless mesh.
//!
//! | module | job |
//! | --- | --- |
//! | [`config`] | the agent's own settings, validated |
//! | [`state`] | the in-memory mesh state (pure) |
//! | [`localfile`] | the YAML source that writes `state` |
//! | [`ebpf`] | load and attach programs, maps (the only aya user) |
//! | [`netns`] | sockets inside pods' network namespaces |
//! | [`proxy`] | in-pod listeners, tunnel, relays |
//! | [`enroll`] | keeps kernel and listeners in line with `state` |
//! | [`admin`] | `/healthz`, `/ready`, `/status` |
//! | [`app`] | wiring, runtimes, shutdown |

pub mod admin;
pub mod app;
pub mod config;
pub mod ebpf;
pub mod enroll;
pub mod localfile;
pub mod netns;
pub mod proxy;
pub mod state;
