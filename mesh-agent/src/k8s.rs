//! The Kubernetes source: the mesh's CRDs, and kube-rs watchers that build
//! the same [`crate::state::MeshState`] the local file does. The only module
//! that imports kube.
//!
//! | module | job |
//! | --- | --- |
//! | [`crd`] | the custom resources as Rust types; `deploy/crds.yaml` is generated from them |
//! | [`convert`] | Kubernetes objects to state values (pure) |
//! | [`source`] | watchers + reflectors, the state builder, `/status` numbers |
//! | [`status`] | the `Accepted` condition on the mesh's objects |
//! | [`podpaths`] | a pod's netns and cgroup on a real node, from /proc and the runtime's cgroup layout |
//! | [`tokenreview`] | the CA's check of an agent's projected service-account token |

pub mod convert;
pub mod crd;
pub mod podpaths;
pub mod source;
pub mod status;
pub mod tokenreview;

pub use source::{Options, PodLocator, Stats, start};

/// A client for the cluster the agent runs in (in-cluster service account),
/// or the one `KUBECONFIG` / `~/.kube/config` names.
pub async fn client() -> Result<kube::Client, kube::Error> {
    kube::Client::try_default().await
}
